"""A set of permutations for a resolved spec, and the one generic engine that applies it.

Convention (gather, indexed by *target* slots): for a plain group with permutation ``p``,
applying it to a tensor axis gives ``new[i] = old[p[i]]``. ``rebasin match SOURCE TARGET``
returns ``π`` with ``apply(SOURCE, π) ≈ TARGET``.

Tensors stored per group (the permutations file, :mod:`rebasin.io.perms_file`, holds exactly
these, as int64):

===============================  ====================  =========================================
key                              shape                 meaning
===============================  ====================  =========================================
``G`` (plain group)              (size,)               unit ``i`` of the result is unit ``p[i]``
``G.heads`` (attention)          (n_kv_heads,)         KV-head slot ``k`` takes KV head ``σ[k]``
``G.qgroup``                     (n_kv_heads, q)       query ``j`` of slot ``k`` is query ``τ[k, j]``
                                                       of KV head ``σ[k]`` (q = heads per KV head)
``G.qk``                         (n_kv_heads, d_head)  Q/K dims of slot ``k`` (identity with RoPE)
``G.vo``                         (n_kv_heads, d_head)  V dims / O input columns of slot ``k``
===============================  ====================  =========================================

So Q row ``((k·q + j)·d_head + d)`` of the result is Q row
``((σ[k]·q + τ[k,j])·d_head + ρ_qk[k,d])`` of the source; K/V rows and O columns likewise.
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch

from rebasin.errors import ArchitectureError
from rebasin.specs import AxisRef, Group, Spec

ATTN_PARTS = ("heads", "qgroup", "qk", "vo")

Perms = dict[str, torch.Tensor]


def group_keys(group: Group) -> list[str]:
    return [f"{group.name}.{part}" for part in ATTN_PARTS] if group.is_attention else [group.name]


def part_shape(group: Group, part: str | None) -> tuple[int, ...]:
    if not group.is_attention:
        return (group.size,)
    return {"heads": (group.n_kv_heads,), "qgroup": (group.n_kv_heads, group.q_per_kv),
            "qk": (group.n_kv_heads, group.d_head), "vo": (group.n_kv_heads, group.d_head)}[part]


def _arange(shape: tuple[int, ...]) -> torch.Tensor:
    return torch.arange(shape[-1]).expand(shape).clone()


def identity(spec: Spec) -> Perms:
    """The identity permutation of every group."""
    perms: Perms = {}
    for group in spec.groups.values():
        if group.is_attention:
            for part in ATTN_PARTS:
                perms[f"{group.name}.{part}"] = _arange(part_shape(group, part))
        else:
            perms[group.name] = torch.arange(group.size)
    return perms


def random_perms(spec: Spec, generator: torch.Generator | None = None, *, groups: Iterable[str] | None = None) -> Perms:
    """A uniformly random *valid* π: RoPE keeps Q/K within-head order, ``qk_shared`` ties it across heads."""
    chosen = set(groups) if groups is not None else set(spec.groups)

    def rp(n: int) -> torch.Tensor:
        return torch.randperm(n, generator=generator)

    perms = identity(spec)
    for group in spec.groups.values():
        if group.name not in chosen:
            continue
        if not group.is_attention:
            perms[group.name] = rp(group.size)
            continue
        g, kv = group.name, group.n_kv_heads
        perms[f"{g}.heads"] = rp(kv)
        perms[f"{g}.qgroup"] = torch.stack([rp(group.q_per_kv) for _ in range(kv)])
        perms[f"{g}.vo"] = torch.stack([rp(group.d_head) for _ in range(kv)])
        if not group.rope:
            qk = torch.stack([rp(group.d_head) for _ in range(kv)])
            if group.qk_shared:
                qk = qk[:1].expand(kv, -1).clone()
            perms[f"{g}.qk"] = qk
    return perms


def _is_perm_rows(t: torch.Tensor) -> bool:
    n = t.shape[-1]
    rows = t.reshape(-1, n)
    if rows.numel() == 0:
        return True
    sorted_rows = rows.sort(dim=1).values
    return bool((sorted_rows == torch.arange(n, device=t.device)).all())


def validate(spec: Spec, perms: Mapping[str, torch.Tensor], *, where: object = None) -> None:
    """Check π fits ``spec``: every key present with the right shape, every row a permutation,
    RoPE Q/K dims untouched, shared Q/K dims equal across heads. Raises ArchitectureError."""
    for group in spec.groups.values():
        parts = ATTN_PARTS if group.is_attention else (None,)
        for part in parts:
            key = f"{group.name}.{part}" if part else group.name
            if key not in perms:
                raise ArchitectureError("permutation missing for this group", file=where, tensor=key)
            t = perms[key]
            want = part_shape(group, part)
            if tuple(t.shape) != want:
                raise ArchitectureError(f"shape {list(t.shape)} does not match the model's group shape {list(want)}",
                                        file=where, tensor=key)
            if t.dtype.is_floating_point or not _is_perm_rows(t):
                raise ArchitectureError("is not a permutation (each row must hold 0..n-1 once)", file=where, tensor=key)
        if group.is_attention:
            qk = perms[f"{group.name}.qk"]
            if group.rope and not bool((qk == _arange(tuple(qk.shape)).to(qk.device)).all()):
                raise ArchitectureError("RoPE attention: the Q/K within-head permutation must be the identity "
                                        "(permuting dims breaks rotary frequency pairs)", file=where,
                                        tensor=f"{group.name}.qk")
            if group.qk_shared and not bool((qk == qk[:1]).all()):
                raise ArchitectureError("per-head Q/K norm: the Q/K within-head permutation must be the same for "
                                        "all heads", file=where, tensor=f"{group.name}.qk")
    extra = sorted(set(perms) - {k for g in spec.groups.values() for k in group_keys(g)})
    if extra:
        raise ArchitectureError("permutation for a group this model does not have", file=where, tensor=extra[0])


def inverse_perm(p: torch.Tensor) -> torch.Tensor:
    """Row-wise inverse of (..., n) permutations."""
    return torch.argsort(p, dim=-1)


def invert(spec: Spec, perms: Mapping[str, torch.Tensor]) -> Perms:
    """π⁻¹ with ``apply(apply(W, π), π⁻¹) == W`` bit for bit.

    For attention groups the sub-permutations are indexed by target slot, so their
    inverses are re-indexed by the inverse head permutation.
    """
    out: Perms = {}
    for group in spec.groups.values():
        if not group.is_attention:
            out[group.name] = inverse_perm(perms[group.name])
            continue
        g = group.name
        heads_inv = inverse_perm(perms[f"{g}.heads"])
        out[f"{g}.heads"] = heads_inv
        for part in ("qgroup", "qk", "vo"):
            out[f"{g}.{part}"] = inverse_perm(perms[f"{g}.{part}"][heads_inv])
    return out


def _head_index(group: Group, perms: Mapping[str, torch.Tensor], role: str) -> torch.Tensor:
    """Gather index for one attention role (see the module docstring)."""
    g, d = group.name, group.d_head
    sigma = perms[f"{g}.heads"]
    if role == "qk_dim":
        return perms[f"{g}.qk"][0]
    if role == "qkv":
        q = _head_index(group, perms, "q")
        k = _head_index(group, perms, "k") + group.n_heads * d
        v = _head_index(group, perms, "v") + (group.n_heads + group.n_kv_heads) * d
        return torch.cat([q, k, v])
    within = perms[f"{g}.qk"] if role in ("q", "k") else perms[f"{g}.vo"]  # (kv, d)
    if role in ("k", "v"):
        return (sigma[:, None] * d + within).reshape(-1)
    q = group.q_per_kv
    head = sigma[:, None] * q + perms[f"{g}.qgroup"]  # (kv, q) source query head of each slot
    return (head[:, :, None] * d + within[:, None, :]).reshape(-1)


def axis_index(spec: Spec, perms: Mapping[str, torch.Tensor], ref: AxisRef) -> torch.Tensor:
    """The int64 gather index (axis length,) that ``ref`` applies along its axis."""
    group = spec.groups[ref.group]
    if group.is_attention:
        return _head_index(group, perms, ref.role)
    return perms[group.name]


def permute_tensor(spec: Spec, name: str, tensor: torch.Tensor, perms: Mapping[str, torch.Tensor],
                   *, skip_group: str | None = None) -> torch.Tensor:
    """Apply π to one tensor along every permuted axis (optionally leaving ``skip_group`` axes alone)."""
    out = tensor
    for axis, ref in enumerate(spec.axes[name]):
        if ref is None or ref.group == skip_group:
            continue
        idx = axis_index(spec, perms, ref).to(out.device)
        out = out.index_select(axis, idx)
    return out


def apply_to_state(spec: Spec, perms: Mapping[str, torch.Tensor],
                   state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Apply π to every tensor of a state dict (invariant tensors pass through)."""
    return {name: permute_tensor(spec, name, t, perms) if name in spec.axes else t for name, t in state.items()}


def moved_fraction(perms: Mapping[str, torch.Tensor], key: str) -> float:
    p = perms[key]
    return float((p != _arange(tuple(p.shape)).to(p.device)).float().mean()) if p.numel() else 0.0


_MOVED_TO_IO = ("FORMAT", "FORMAT_VERSION", "load_perms", "save_perms")


def __getattr__(name: str) -> Any:
    # The file format now lives in rebasin.io.perms_file; rebasin/demo.py and tests/test_demo.py
    # still import it from here. Drop this once they import rebasin.io.perms_file.
    if name in _MOVED_TO_IO:
        from rebasin.io import perms_file

        return getattr(perms_file, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
