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
"""
from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rebasin.errors import ArchitectureError

ATTENTION_ROLES = ("q", "k", "v", "o", "qkv", "qk_dim")


@dataclass(frozen=True)
class Group:
    """One permutation group of a resolved spec.

    Plain groups permute ``size`` units. Attention groups are structured
    (DESIGN §2): KV heads move as blocks carrying their ``n_heads // n_kv_heads`` query
    heads; query heads may permute inside their group; within-head Q/K dims and V/O dims
    permute per KV head (shared with its query heads). With ``rope`` the Q/K within-head
    permutation is fixed to the identity (a permutation breaking RoPE frequency pairs is
    not a symmetry); with ``qk_shared`` it must be the same for every KV head.
    """

    name: str
    kind: str = "plain"
    size: int = 0
    n_heads: int = 0
    n_kv_heads: int = 0
    d_head: int = 0
    rope: bool = False
    qk_shared: bool = False

    @property
    def is_attention(self) -> bool:
        return self.kind == "attention"

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
        groups: name -> Group, in a stable order (residual groups first).
        axes: tensor name -> one entry per axis (AxisRef, or None for an invariant axis).
        shapes: tensor name -> shape.
    """

    family: str
    groups: dict[str, Group]
    axes: dict[str, tuple[AxisRef | None, ...]]
    shapes: dict[str, tuple[int, ...]]
    sizes: dict[str, int] = field(default_factory=dict)

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
    description: str
    sizes: dict[str, str]
    groups: dict[str, dict[str, Any]]
    tensor_table: tuple[tuple[str, tuple[str, ...]], ...]
    architectures: dict[str, dict[str, list[str]]]
    source: Path

    @classmethod
    def from_file(cls, path: Path) -> FamilySpec:
        """Parse a family file, merging its ``inherits`` parent (child entries win)."""
        data = tomllib.loads(path.read_text(encoding="utf-8"))
        parent_name = data.get("inherits")
        if parent_name:
            parent = cls.from_file(path.parent / f"{parent_name}.toml")
            sizes = {**parent.sizes, **data.get("sizes", {})}
            groups = {**parent.groups, **data.get("groups", {})}
            tensors = {**data.get("tensors", {}), **dict(parent.tensor_table)}
            architectures = {**parent.architectures, **data.get("architectures", {})}
        else:
            sizes, groups = data.get("sizes", {}), data.get("groups", {})
            tensors, architectures = data.get("tensors", {}), data.get("architectures", {})
        return cls(
            name=data["family"],
            model_types=tuple(data.get("model_types", [data["family"]])),
            description=data.get("description", ""),
            sizes=dict(sizes),
            groups=dict(groups),
            tensor_table=tuple((k, tuple(v)) for k, v in tensors.items()),
            architectures={k: dict(v.get("tensors", {})) for k, v in architectures.items()},
            source=path,
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

        Raises ArchitectureError naming the tensor (and ``where``, the file) for an
        unknown tensor, a wrong number of axes, or an axis whose size does not match.
        """
        sizes = self.resolve_sizes(config)
        groups: dict[str, Group] = {}
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
                group = groups.get(gname) or self._make_group(gname, template, sizes)
                groups[gname] = group
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
        ordered = dict(sorted(groups.items(), key=lambda kv: _group_order(kv[0])))
        return Spec(self.name, ordered, axes, dict(shapes), sizes)

    def _make_group(self, name: str, template: str, sizes: dict[str, int]) -> Group:
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
            return Group(name, "attention", n_heads * d_head, n_heads, n_kv, d_head,
                         bool(g.get("rope", False)), bool(g.get("qk_shared", False)))
        return Group(name, "plain", size("size"))


def _group_order(name: str) -> tuple[int, list[Any]]:
    parts = [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name)]
    return (0 if "layers" not in name else 1, parts)


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
