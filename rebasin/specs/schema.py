"""Permutation specs: what an architecture's symmetries are, as plain data.

A *family file* (``families/<name>.toml``) is a table of tensor-name patterns, each with one
entry per tensor axis naming the permutation group that moves that axis, or ``"-"`` for an
axis no permutation touches. Resolving a family against a checkpoint's config and tensor
names gives a :class:`Spec`: concrete groups with sizes, and every tensor's axes.

Axis entries:

* ``"-"`` — invariant (vocabulary rows, class outputs, image channels, ...).
* ``"G"`` — plain group ``G``: one permutation of that axis (``residual``, ``layers.{L}.ffn``).
* ``"G:role"`` — structured attention group ``G`` (``kind = "attention"``); role is one of
  ``q`` (Q rows, n_heads·d_head), ``k`` / ``v`` (K / V rows, n_kv_heads·d_head),
  ``o`` (O input columns, n_heads·d_head), ``qkv`` (fused [Q | K | V] rows, GPT-2's c_attn),
  ``qk_dim`` (a per-head norm over the Q/K head dimension shared by all heads, Qwen3's
  ``q_norm``/``k_norm``: forces one Q/K within-head permutation for all heads).

Pattern syntax: literal tensor names where ``{L}`` (any ``{NAME}``) matches a decimal index
and ``(text)?`` marks an optional part (e.g. the ``bert.`` prefix of task-head models).

Group templates: a group whose template has placeholders (``layers.{L}.ffn``) exists once per
layer; one without (``residual``, ``embed``) is global. Resolution records both on each
:class:`Group` (``template``, ``layer``) so nothing downstream parses group names.

Headless models: a group declared ``output = true`` (the residual stream) is the basis of the
model's output when no head maps it back (``BertModel``: ``last_hidden_state``). Permuting it
then permutes the output, so for such a checkpoint resolution marks it ``fixed``: every
consumer keeps it at the identity (see docs/design.md, Headless models). A checkpoint is
headless when ``config.json``'s ``architectures`` names one of the family's
``headless_architectures``, or, without ``architectures``, when it holds none of the family's
``head_tensors``.
"""
from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from rebasin.errors import ArchitectureError

ATTENTION_ROLES = ("q", "k", "v", "o", "qkv", "qk_dim")
_PLACEHOLDER = re.compile(r"\{(\w+)\}")


@dataclass(frozen=True)
class Group:
    """One permutation group of a resolved spec.

    Plain groups permute ``size`` units. Attention groups are structured
    (see docs/design.md, Symmetries): KV heads move as blocks carrying their
    ``n_heads // n_kv_heads`` query heads; query heads may permute inside their group;
    within-head Q/K dims and V/O dims permute per KV head (shared with its query heads).
    With ``rope`` the Q/K within-head permutation is fixed to the identity (a permutation
    breaking RoPE frequency pairs is not a symmetry); with ``qk_shared`` it must be the
    same for every KV head.

    Attributes:
        name: concrete name, e.g. ``layers.3.ffn`` or ``residual``.
        template: the family file's group key it came from, e.g. ``layers.{L}.ffn``
            (``layers.{G}.{L}.ffn`` for ALBERT's shared layers); equal to ``name`` for a
            global group.
        layer: depth index of the stored layer the group belongs to, None for a global
            group. With one placeholder it is that index (``layers.3.ffn`` -> 3); with
            several (ALBERT ``layers.{G}.{L}``) the indices are flattened in order,
            ``G * n_L + L`` with ``n_L`` stored layers per layer group.
        rope_layout: which Q/K dims RoPE rotates together (attention groups with ``rope``):
            ``half`` pairs (i, i + d_head/2), HF's ``rotate_half``; ``interleaved`` pairs (2i, 2i+1).
            The family file gives ``half``, ``interleaved`` or a config.json key selecting
            ``interleaved`` when true.
        rope_dim: partial rotary embeddings: RoPE rotates only the first ``rope_dim`` dims of
            each Q/K head (pairs per ``rope_layout`` inside them), the other ``d_head - rope_dim``
            pass through unrotated. 0 means the whole head (see :attr:`rotary_dims`). The family
            file gives ``rope_fraction`` (a number or config keys, e.g. ``partial_rotary_factor``:
            ``rope_dim = int(d_head * fraction)``) or ``rope_dim`` (a size expression, e.g. ``rotary_dim``).
        fixed: the group must stay the identity in this checkpoint (an output group of a
            headless model, see the module docstring). Not part of equality: two checkpoints
            of one shape have equal groups whether or not a head follows.
    """

    name: str
    template: str
    layer: int | None
    kind: str = "plain"
    size: int = 0
    n_heads: int = 0
    n_kv_heads: int = 0
    d_head: int = 0
    rope: bool = False
    qk_shared: bool = False
    rope_layout: str = "half"
    rope_dim: int = 0
    output: bool = False
    fixed: bool = field(default=False, compare=False)

    @property
    def is_attention(self) -> bool:
        return self.kind == "attention"

    @property
    def rotary_dims(self) -> int:
        """How many leading Q/K dims of a head RoPE rotates (``d_head`` unless partial rotary)."""
        return self.rope_dim or self.d_head

    @property
    def q_per_kv(self) -> int:
        return self.n_heads // self.n_kv_heads

    def role_size(self, role: str) -> int:
        h, kv, d = self.n_heads, self.n_kv_heads, self.d_head
        return {"q": h * d, "o": h * d, "k": kv * d, "v": kv * d, "qkv": (h + 2 * kv) * d, "qk_dim": d}[role]


@dataclass(frozen=True)
class AxisRef:
    """Axis of a tensor moved by group ``group`` (``role`` is "" for plain groups)."""

    group: str
    role: str = ""

    def __str__(self) -> str:
        return f"{self.group}:{self.role}" if self.role else self.group


@dataclass
class Spec:
    """A family resolved against one checkpoint.

    Attributes:
        family: family name (``llama``, ``bert``, ...).
        groups: name -> Group, in a stable order: global groups first, then per-layer groups by depth.
        axes: tensor name -> one entry per axis (AxisRef, or None for an invariant axis).
        shapes: tensor name -> shape.
        sizes: the family's named sizes (``d_model``, ...) evaluated on the config.
        headless: why this checkpoint counts as headless (its output groups are then
            ``fixed``), or None when a head maps the residual stream back.
    """

    family: str
    groups: dict[str, Group]
    axes: dict[str, tuple[AxisRef | None, ...]]
    shapes: dict[str, tuple[int, ...]]
    sizes: dict[str, int] = field(default_factory=dict)
    headless: str | None = None

    @property
    def fixed_groups(self) -> list[str]:
        """Groups that must stay the identity (output groups of a headless model)."""
        return [name for name, g in self.groups.items() if g.fixed]

    def free_output(self) -> Spec:
        """This spec with no group fixed: for a job whose output lives in another model's
        basis (``transfer`` writes ``B + α·π(τ)``, so π may move A's residual stream)."""
        return replace(self, groups={n: replace(g, fixed=False) for n, g in self.groups.items()})

    def tensors_of(self, group: str) -> list[str]:
        """Tensors with at least one axis in ``group``."""
        return [t for t, ax in self.axes.items() if any(a is not None and a.group == group for a in ax)]

    def permuted_tensors(self) -> list[str]:
        return [t for t, ax in self.axes.items() if any(a is not None for a in ax)]

    def invariant_tensors(self) -> list[str]:
        return [t for t, ax in self.axes.items() if all(a is None for a in ax)]


@dataclass(frozen=True)
class FamilySpec:
    """A parsed family file (see module docstring)."""

    name: str
    model_types: tuple[str, ...]
    sizes: dict[str, str]
    groups: dict[str, dict[str, Any]]
    tensor_table: tuple[tuple[str, tuple[str, ...]], ...]
    architectures: dict[str, dict[str, list[str]]]
    source: Path
    headless_architectures: tuple[str, ...] = ()
    head_tensors: tuple[str, ...] = ()

    @classmethod
    def from_file(cls, path: str | Path, *, _children: tuple[Path, ...] = ()) -> FamilySpec:
        """Parse a family file, merging the family it ``inherits`` (child entries win).

        The parent is ``<parent name>.toml`` in the same directory as ``path``. On a key both
        define (a size, a group, a tensor pattern, an architecture override) the child's
        entry replaces the parent's; the child's new tensor patterns are tried first.
        """
        path = Path(path)
        if not path.is_file():
            raise ArchitectureError("family file not found", file=path)
        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
            raise ArchitectureError(f"cannot read family file: {exc}", file=path) from None
        sizes: dict[str, str] = dict(data.get("sizes", {}))
        groups: dict[str, dict[str, Any]] = dict(data.get("groups", {}))
        tensors: dict[str, list[str]] = dict(data.get("tensors", {}))
        architectures = {k: dict(v.get("tensors", {})) for k, v in data.get("architectures", {}).items()}
        parent_name = data.get("inherits")
        if parent_name:
            if path.resolve() in _children:
                raise ArchitectureError(f"family files inherit in a cycle through '{parent_name}'", file=path)
            parent = cls.from_file(path.parent / f"{parent_name}.toml", _children=(*_children, path.resolve()))
            sizes = {**parent.sizes, **sizes}
            groups = {**parent.groups, **groups}
            tensors.update((k, list(v)) for k, v in parent.tensor_table if k not in tensors)
            architectures = {arch: {**parent.architectures.get(arch, {}), **architectures.get(arch, {})}
                             for arch in {**parent.architectures, **architectures}}
            data.setdefault("headless_architectures", list(parent.headless_architectures))
            data.setdefault("head_tensors", list(parent.head_tensors))
        return cls(
            name=data["family"],
            model_types=tuple(data.get("model_types", [data["family"]])),
            sizes=sizes,
            groups=groups,
            tensor_table=tuple((k, tuple(v)) for k, v in tensors.items()),
            architectures=architectures,
            source=path,
            headless_architectures=tuple(data.get("headless_architectures", ())),
            head_tensors=tuple(data.get("head_tensors", ())),
        )

    def tensor_patterns(self, config: dict[str, Any]) -> list[tuple[str, re.Pattern[str], tuple[str, ...]]]:
        """Patterns in match order: the config's ``architectures`` overrides first."""
        table: dict[str, tuple[str, ...]] = {}
        for arch in config.get("architectures") or []:
            table.update({k: tuple(v) for k, v in self.architectures.get(arch, {}).items()})
        for k, v in self.tensor_table:
            table.setdefault(k, v)
        return [(k, compile_pattern(k), v) for k, v in table.items()]

    def resolve_sizes(self, config: dict[str, Any]) -> dict[str, int]:
        return {key: eval_size(expr, config, key, self.name) for key, expr in self.sizes.items()}

    def resolve(self, config: dict[str, Any], shapes: dict[str, tuple[int, ...]], *, where: object = None) -> Spec:
        """Resolve against a checkpoint: every tensor must match exactly one pattern.

        Each group gets its ``template`` and ``layer`` here (see :class:`Group`). Raises
        ArchitectureError naming the tensor (and ``where``, the file) for an unknown tensor,
        a wrong number of axes, or an axis whose size does not match.
        """
        sizes = self.resolve_sizes(config)
        declared: dict[str, Group] = {}  # template -> its group, named after the template, no layer yet
        found: dict[str, tuple[str, tuple[int, ...]]] = {}  # group name -> (template, placeholder values)
        axes: dict[str, tuple[AxisRef | None, ...]] = {}
        patterns = self.tensor_patterns(config)
        for name, shape in shapes.items():
            hit = None
            for pattern, regex, entries in patterns:
                m = regex.fullmatch(name)
                if m:
                    hit = (pattern, m.groupdict(), entries)
                    break
            if hit is None:
                raise ArchitectureError(
                    f"tensor is not described by the '{self.name}' spec ({self.source.name}); "
                    "an unknown tensor may be a new variant of the architecture, refusing to guess",
                    file=where, tensor=name)
            pattern, idx, entries = hit
            if len(entries) != len(shape):
                raise ArchitectureError(f"has {len(shape)} axes (shape {list(shape)}) but the '{self.name}' spec "
                                        f"pattern '{pattern}' describes {len(entries)}", file=where, tensor=name)
            refs: list[AxisRef | None] = []
            for axis, entry in enumerate(entries):
                if entry == "-":
                    refs.append(None)
                    continue
                template, _, role = entry.partition(":")
                gname = template.format(**idx)
                group = declared.get(template) or self._make_group(template, sizes, config)
                declared[template] = group
                found.setdefault(gname, (template, tuple(int(idx[k]) for k in _PLACEHOLDER.findall(template))))
                if group.is_attention and role not in ATTENTION_ROLES:
                    raise ArchitectureError(f"spec error in {self.source.name}: attention group '{gname}' needs a "
                                            f"role from {ATTENTION_ROLES}, got '{entry}'")
                want = group.role_size(role) if group.is_attention else group.size
                if shape[axis] != want:
                    raise ArchitectureError(
                        f"axis {axis} has size {shape[axis]} but group '{entry.format(**idx)}' has size {want} "
                        f"(from config.json)", file=where, tensor=name)
                refs.append(AxisRef(gname, role))
            axes[name] = tuple(refs)
        layers = _layer_indices(found)
        headless = self.headless_reason(config, shapes)
        groups = [replace(declared[template], name=gname, layer=layers[gname],
                          fixed=bool(headless) and declared[template].output)
                  for gname, (template, _) in found.items()]
        ordered = {g.name: g for g in sorted(groups, key=_group_order)}
        return Spec(self.name, ordered, axes, dict(shapes), sizes,
                    headless if any(g.fixed for g in groups) else None)

    def headless_reason(self, config: dict[str, Any], shapes: dict[str, tuple[int, ...]]) -> str | None:
        """Why a checkpoint has no head mapping its residual stream back (None when it has one).

        ``architectures`` decides when config.json has it; without it, the absence of every
        ``head_tensors`` pattern does (a tied LM head stores no tensor of its own, so such a
        checkpoint counts as headless: the safe side, its residual stays put).
        """
        archs = [a for a in config.get("architectures") or [] if isinstance(a, str)]
        base = [a for a in archs if a in self.headless_architectures]
        if base:
            return f"config.json names {base[0]}, a base model without a head: its output is the last hidden state"
        if archs or not self.head_tensors:
            return None
        regexes = [compile_pattern(p) for p in self.head_tensors]
        if any(r.fullmatch(name) for name in shapes for r in regexes):
            return None
        return ("no head tensor (" + ", ".join(self.head_tensors[:3]) + ("…" if len(self.head_tensors) > 3 else "")
                + ") and no architectures in config.json: the output is taken to be the last hidden state")

    def _make_group(self, template: str, sizes: dict[str, int], config: dict[str, Any] | None = None) -> Group:
        """The group a template declares, named after the template and not yet given a layer."""
        if template not in self.groups:
            raise ArchitectureError(f"spec error in {self.source.name}: group '{template}' is not declared")
        g = self.groups[template]

        def size(key: str) -> int:
            value = g[key]
            return int(value) if isinstance(value, int) else sizes[value]

        if g.get("kind", "plain") == "attention":
            n_heads, n_kv, d_head = size("n_heads"), size("n_kv_heads"), size("d_head")
            if n_heads % n_kv:
                raise ArchitectureError(f"n_heads={n_heads} is not a multiple of n_kv_heads={n_kv}")
            rope = bool(g.get("rope", False))
            return Group(template, template, None, kind="attention", size=n_heads * d_head, n_heads=n_heads,
                         n_kv_heads=n_kv, d_head=d_head, rope=rope,
                         qk_shared=bool(g.get("qk_shared", False)), output=bool(g.get("output", False)),
                         rope_layout=_rope_layout(g.get("rope_layout", "half"), config or {}, self.source.name),
                         rope_dim=_rope_dim(g, d_head, sizes, config or {}, self.source.name) if rope else 0)
        return Group(template, template, None, kind="plain", size=size("size"), output=bool(g.get("output", False)))


def _rope_layout(value: str, config: dict[str, Any], source: str) -> str:
    """``rope_layout``: ``half`` (HF ``rotate_half``: pairs (i, i + d/2)), ``interleaved`` (pairs
    (2i, 2i+1)), or a config.json key whose truth selects ``interleaved`` (DeepSeek-V3's
    ``rope_interleave``; absent or false: ``half``)."""
    if value in ("half", "interleaved"):
        return value
    if not isinstance(value, str) or not value:
        raise ArchitectureError(f"spec error in {source}: rope_layout must be half, interleaved or a config key")
    return "interleaved" if _lookup(config, value) else "half"


def _rope_dim(g: dict[str, Any], d_head: int, sizes: dict[str, int], config: dict[str, Any], source: str) -> int:
    """Rotated dims per head of a RoPE group: ``rope_dim`` (an integer or a size name, e.g. one
    reading GPT-J's ``rotary_dim``) or ``int(d_head * f)`` for ``rope_fraction`` ``f`` (a number, or
    config keys with alternatives ``a|b``, the first present wins: ``partial_rotary_factor``).
    Neither given, or a factor absent from the config: the whole head (returned as 0)."""
    if "rope_dim" in g:
        value = g["rope_dim"]
        dims = int(value) if isinstance(value, int) else sizes.get(value)
        if dims is None:
            raise ArchitectureError(f"spec error in {source}: rope_dim must be an integer or a size name")
    elif "rope_fraction" in g:
        value = g["rope_fraction"]
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            factor: Any = value
        elif isinstance(value, str) and value:
            factor = next((v for v in (_lookup(config, k) for k in value.split("|")) if v is not None), 1.0)
        else:
            raise ArchitectureError(f"spec error in {source}: rope_fraction must be a number or config keys")
        dims = int(d_head * float(factor))
    else:
        return 0
    if dims % 2 or not 0 < dims <= d_head:
        raise ArchitectureError(f"rotary dims {dims} must be even and in (0, d_head={d_head}] ({source})")
    return 0 if dims == d_head else dims


def _layer_indices(found: dict[str, tuple[str, tuple[int, ...]]]) -> dict[str, int | None]:
    """Group name -> layer: None without placeholders, else the placeholder values of its
    template flattened in mixed radix (each radix: 1 + the largest value seen for it)."""
    radix: dict[str, list[int]] = {}
    for template, values in found.values():
        r = radix.setdefault(template, [0] * len(values))
        for i, v in enumerate(values):
            r[i] = max(r[i], v + 1)
    layers: dict[str, int | None] = {}
    for gname, (template, values) in found.items():
        layer = None
        for v, n in zip(values, radix[template], strict=True):
            layer = (layer or 0) * n + v
        layers[gname] = layer
    return layers


def _group_order(group: Group) -> tuple[bool, str, int, str]:
    """Global groups first (by name), then per-layer groups by template stem, depth and name."""
    return (group.layer is not None, group.template.split("{", 1)[0], group.layer or 0, group.name)


def compile_pattern(pattern: str) -> re.Pattern[str]:
    """``model.layers.{L}.mlp.up_proj.weight`` -> regex with named group L."""
    out = []
    i = 0
    while i < len(pattern):
        ch = pattern[i]
        if ch == "{":
            j = pattern.index("}", i)
            out.append(f"(?P<{pattern[i + 1:j]}>\\d+)")
            i = j + 1
            continue
        out.append({"(": "(?:", ")": ")", "?": "?", ".": r"\."}.get(ch, re.escape(ch)))
        i += 1
    return re.compile("".join(out))


_TERM = re.compile(r"^\s*([A-Za-z_][\w.]*|\d+)\s*(?:([*/])\s*([A-Za-z_][\w.]*|\d+))?\s*$")


def _lookup(config: dict[str, Any], key: str) -> Any:
    value: Any = config
    for part in key.split("."):
        if not isinstance(value, dict) or value.get(part) is None:
            return None
        value = value[part]
    return value


def eval_size(expr: str | int, config: dict[str, Any], key: str, family: str) -> int:
    """Evaluate a size expression: alternatives ``a|b``, each a key, an int, or ``x*y`` / ``x/y``."""
    if isinstance(expr, int):
        return expr
    for alt in str(expr).split("|"):
        m = _TERM.match(alt)
        if not m:
            raise ArchitectureError(f"spec error ({family}): bad size expression '{expr}'")
        operands = []
        for tok in (m.group(1), m.group(3)):
            if tok is None:
                continue
            operands.append(int(tok) if tok.isdigit() else _lookup(config, tok))
        if any(not isinstance(v, int) or isinstance(v, bool) for v in operands):
            continue
        if m.group(2) == "*":
            return operands[0] * operands[1]
        if m.group(2) == "/":
            return operands[0] // operands[1]
        return operands[0]
    raise ArchitectureError(f"config.json lacks what the '{family}' spec needs for '{key}' ({expr})")
