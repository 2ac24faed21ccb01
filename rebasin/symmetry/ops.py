"""Whole-spec operations: each loops over the groups and defers to the group's kind."""
from __future__ import annotations

import importlib
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch

from rebasin.errors import ArchitectureError, RebasinError
from rebasin.specs import AxisRef, Group, Spec
from rebasin.symmetry.attention import ROT_PARTS, AttentionSymmetry
from rebasin.symmetry.base import Perms, SymmetryKind
from rebasin.symmetry.plain import PlainPermutation

KINDS: dict[str, SymmetryKind] = {"plain": PlainPermutation(), "attention": AttentionSymmetry()}
SYMMETRIES = ("perm", "full")  # what a job may use: permutations only, or every exact map implemented

# The matcher step of each kind (docs/design.md, Matching), the one place the engine dispatches on a
# group's kind. Written "module:function" and looked up on use: the matcher imports this package.
# Every step is ``step(work, a, b, group, perms, *, solver, timer, proposals, rotations)`` and returns
# ``(changed, gain in J)``; it may change only ``group``'s keys of ``perms``.
MATCHER_STEPS: dict[str, str] = {
    "plain": "rebasin.matching.engine:plain_step",
    "attention": "rebasin.matching.engine:attention_step",
}

MatcherStep = Callable[..., tuple[bool, float]]


def matcher_step(group: Group) -> MatcherStep:
    """The matcher step of ``group``'s kind (:data:`MATCHER_STEPS`)."""
    path = MATCHER_STEPS.get(group.kind)
    if path is None:
        raise RebasinError(f"no matcher step for symmetry kind '{group.kind}' (group {group.name})")
    module, _, name = path.partition(":")
    step: Any = getattr(importlib.import_module(module), name)
    return step


def kind_of(group: Group) -> SymmetryKind:
    return KINDS[group.kind]


def group_keys(group: Group) -> list[str]:
    return kind_of(group).keys(group)


def all_keys(spec: Spec) -> set[str]:
    """Every key a π of ``spec`` may hold (required and optional)."""
    return {k for g in spec.groups.values() for k in (*kind_of(g).keys(g), *kind_of(g).optional_keys(g))}


def identity(spec: Spec) -> Perms:
    """The identity of every group (permutation keys only: absent rotations are the identity)."""
    out: Perms = {}
    for group in spec.groups.values():
        out.update(kind_of(group).identity(group))
    return out


NormGetter = Callable[[Group], torch.Tensor | None]


def norm_weights(spec: Spec, group: Group, get: Callable[[str], torch.Tensor]) -> torch.Tensor:
    """(d_head, n) the per-dimension Q/K norm weights of an attention group (n = 0 when none)."""
    cols = [get(name).detach().float().reshape(-1, 1) for name, axes in spec.axes.items()
            if any(r is not None and r.group == group.name and r.role == "qk_dim" for r in axes)]
    return torch.cat(cols, dim=1).cpu() if cols else torch.zeros(group.d_head, 0)


def _norm_getter(spec: Spec, state: Mapping[str, torch.Tensor] | Callable[[str], torch.Tensor] | None) -> NormGetter:
    if state is None:
        return lambda _g: None
    get = state if callable(state) else state.__getitem__
    return lambda g: norm_weights(spec, g, get) if g.is_attention and g.qk_shared else None


def random_perms(spec: Spec, generator: torch.Generator | None = None, *, groups: Iterable[str] | None = None,
                 rotations: bool = False, state: Mapping[str, torch.Tensor] | None = None) -> Perms:
    """A uniformly random *valid* π: RoPE keeps Q/K within-head order, ``qk_shared`` ties it across heads,
    and a ``fixed`` group (the output basis of a headless model) stays the identity.

    ``rotations``: also random orthogonal within-head maps (see :mod:`rebasin.symmetry.attention`);
    ``state`` (the weights π will act on) lets a norm-restricted RoPE pair take any angle where
    its norm weights are equal (without it such pairs get 0 or π).
    """
    chosen = set(groups) if groups is not None else set(spec.groups)
    norms = _norm_getter(spec, state)
    out = identity(spec)
    for group in spec.groups.values():
        if group.name in chosen:
            out.update(kind_of(group).random(group, generator, rotations=rotations, norms=norms(group)))
    return out


def validate(spec: Spec, perms: Mapping[str, torch.Tensor], *, where: object = None,
             state: Mapping[str, torch.Tensor] | Callable[[str], torch.Tensor] | None = None) -> None:
    """Check π fits ``spec`` (every kind's rules; see :meth:`SymmetryKind.validate`). Raises
    ArchitectureError. ``state`` (or a getter) supplies the weights π acts on, to check what
    depends on them (which RoPE pairs a per-dimension Q/K norm lets rotate)."""
    norms = _norm_getter(spec, state)
    for group in spec.groups.values():
        kind_of(group).validate(group, perms, where=where, headless=spec.headless, norms=norms(group))
    extra = sorted(set(perms) - all_keys(spec))
    if extra:
        raise ArchitectureError("permutation for a group this model does not have", file=where, tensor=extra[0])


def invert(spec: Spec, perms: Mapping[str, torch.Tensor]) -> Perms:
    """π⁻¹ with ``apply(apply(W, π), π⁻¹) == W`` (bit for bit when π has no rotations)."""
    out: Perms = {}
    for group in spec.groups.values():
        out.update(kind_of(group).invert(group, perms))
    return out


def axis_index(spec: Spec, perms: Mapping[str, torch.Tensor], ref: AxisRef) -> torch.Tensor:
    """The int64 gather index (axis length,) of the permutation part of π along ``ref``."""
    group = spec.groups[ref.group]
    return kind_of(group).gather_index(group, perms, ref.role)


def has_rotation(spec: Spec, perms: Mapping[str, torch.Tensor], ref: AxisRef) -> bool:
    """Whether π does more than gather along ``ref`` (a non-identity rotation acts on it)."""
    group = spec.groups[ref.group]
    return kind_of(group).has_rotation(group, perms, ref.role)


def apply_axis(spec: Spec, perms: Mapping[str, torch.Tensor], ref: AxisRef, tensor: torch.Tensor,
               axis: int) -> torch.Tensor:
    """π along one axis of ``tensor``, that axis being ``ref`` (gather, then any rotation)."""
    group = spec.groups[ref.group]
    return kind_of(group).apply_axis(group, perms, ref.role, tensor, axis)


def permute_tensor(spec: Spec, name: str, tensor: torch.Tensor, perms: Mapping[str, torch.Tensor],
                   *, skip_group: str | None = None, skip_axes: Iterable[int] = ()) -> torch.Tensor:
    """Apply π to one tensor along every moved axis (leaving ``skip_group``'s and ``skip_axes`` alone)."""
    skip = set(skip_axes)
    out = tensor
    for axis, ref in enumerate(spec.axes[name]):
        if ref is None or ref.group == skip_group or axis in skip:
            continue
        out = apply_axis(spec, perms, ref, out, axis)
    return out


def apply_to_state(spec: Spec, perms: Mapping[str, torch.Tensor],
                   state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Apply π to every tensor of a state dict (invariant tensors pass through)."""
    return {name: permute_tensor(spec, name, t, perms) if name in spec.axes else t for name, t in state.items()}


def moved_fraction(perms: Mapping[str, torch.Tensor], key: str) -> float:
    p = perms[key]
    if not p.numel():
        return 0.0
    return float((p != torch.arange(p.shape[-1], device=p.device).expand(p.shape)).float().mean())


def rotation_amount(spec: Spec, perms: Mapping[str, torch.Tensor], group: str) -> float:
    g = spec.groups[group]
    return kind_of(g).rotation(g, perms)


def has_rotations(perms: Mapping[str, torch.Tensor]) -> bool:
    """Whether π holds any rotation key."""
    return any(k.rsplit(".", 1)[-1] in ROT_PARTS for k in perms)


def restrict(perms: Mapping[str, torch.Tensor], symmetries: str) -> Perms:
    """π restricted to the kinds ``symmetries`` allows: ``perm`` drops the rotations, ``full`` keeps all."""
    if symmetries not in SYMMETRIES:
        raise RebasinError(f"unknown symmetries '{symmetries}' (choose from {', '.join(SYMMETRIES)})")
    if symmetries == "full":
        return dict(perms)
    return {k: v for k, v in perms.items() if k.rsplit(".", 1)[-1] not in ROT_PARTS}


_rotated: dict = {}  # key -> π(tensor): the last whole tensors mapped by rotated_rows (at most 2)


def rotated_rows(spec: Spec, name: str, tensor: torch.Tensor, perms: Mapping[str, torch.Tensor], start: int,
                 stop: int) -> torch.Tensor:
    """Rows ``start:stop`` of π(tensor) when a rotation acts on one of its axes.

    A rotation of axis 0 mixes the rows of a head block, so the whole tensor is mapped; the
    result is kept for the next calls on the same tensor and π (callers walk a tensor's rows
    chunk by chunk, ``transfer`` two tensors at once: A and A_ft) and dropped after the last
    chunk, so each tensor is mapped once.
    """
    key = (name, tensor.data_ptr(), tuple(tensor.shape), tensor.dtype, id(perms))
    full = _rotated.get(key)
    if full is None:
        while len(_rotated) >= 2:
            _rotated.pop(next(iter(_rotated)))
        full = _rotated[key] = permute_tensor(spec, name, tensor, perms)
    if full.dim() == 0:
        _rotated.pop(key, None)
        return full
    if stop >= full.shape[0]:
        _rotated.pop(key, None)  # the last chunk: nothing more to serve
    return full[start:stop]
