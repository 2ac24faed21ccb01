"""Structured attention groups: whole KV heads, query heads inside a group, within-head maps.

Keys of a group ``G`` (docs/design.md, Permutations file):

==============  ======================  ===================================================
``G.heads``     (n_kv_heads,) int64     KV slot ``k`` takes KV head ``σ[k]`` with its query heads
``G.qgroup``    (n_kv_heads, q) int64   query ``j`` of slot ``k`` is query ``τ[k, j]`` of head ``σ[k]``
``G.qk``        (n_kv_heads, d) int64   Q/K dims of slot ``k`` (identity with RoPE)
``G.vo``        (n_kv_heads, d) int64   V dims / O input columns of slot ``k``
``G.qk_rot``    (n_kv_heads, d, d) f64  optional: orthogonal map of the Q/K dims of slot ``k``
``G.vo_rot``    (n_kv_heads, d, d) f64  optional: orthogonal map of the V dims / O columns
==============  ======================  ===================================================

A rotation acts after the gather: Q rows of slot ``(k, j)`` become
``qk_rot[k] @ Q_A[σ[k], τ[k, j]][qk[k]]`` (rows of the head block), and likewise K with
``qk_rot[k]``, V rows and O input columns with ``vo_rot[k]``. For an orthogonal ``R`` the
same formula serves rows and columns: O's columns need ``O Rᵀ``, whose transpose is ``R Oᵀ``.
An absent rotation key is the identity.

What is allowed (exact in real arithmetic; docs/design.md, Symmetries):

* ``vo_rot``: any orthogonal matrix per KV head (V rows and the O columns of all its query heads).
* ``qk_rot`` without RoPE: any orthogonal matrix per KV head, since ``(Rq)·(Rk) = q·k``; not
  with a per-dimension Q/K norm (``qk_shared``, then it must be the identity).
* ``qk_rot`` with RoPE: a 2×2 rotation of each frequency pair — ``(i, i + d/2)`` for the
  ``half`` layout (HF ``rotate_half``), ``(2i, 2i+1)`` for ``interleaved`` — zero elsewhere.
  Plane rotations commute with RoPE's ``R(t·ω)``; reflections and cross-pair maps do not.
  With a per-dimension norm weight ``γ`` applied before RoPE (Qwen3's ``q_norm``/``k_norm``,
  shared by all heads and left unchanged), ``γ ⊙ (S u) = S (γ ⊙ u)`` holds for a pair rotation
  ``S(θ)`` iff ``θ ∈ {0, π}`` or ``γ_i = γ_j`` (for ``diag(a, b)`` with ``a ≠ b`` the only
  commuting rotations are ``±I``), for the q and the k norm both. RMS normalisation is
  invariant under any orthogonal map of the head vector.
* ``qk_rot`` with partial RoPE (``group.rope_dim``: only the first ``r`` dims of a head are
  rotated, the pairs lie inside them): pair rotations on the first ``r`` dims, and any
  orthogonal map ``P`` of the ``d − r`` pass-through dims (no position acts on them, so
  ``(Pq)·(Pk) = q·k``); nothing may mix a rotated with a pass-through dim. Under a
  per-dimension norm ``P`` must commute with ``diag(γ)`` on those dims for both weights: it may
  only mix dims whose (q, k) norm weights are equal (:func:`pass_classes`; distinct weights
  leave ``±1`` per dim).
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch

from rebasin.errors import ArchitectureError
from rebasin.specs import Group
from rebasin.symmetry.base import (
    Norms,
    Perms,
    SymmetryKind,
    arange_rows,
    fixed_error,
    gather,
    inverse_perm,
    is_perm_rows,
)

ATTN_PARTS = ("heads", "qgroup", "qk", "vo")
ROT_PARTS = ("qk_rot", "vo_rot")
ORTHO_TOL = 1e-5  # |R Rᵀ − I| allowed in a file (float32 files round at ~1e-7)
STRUCT_TOL = 1e-6  # entries that must be zero (off the RoPE pairs, the sine of a forbidden pair)


def rotary_dims(group: Group) -> int:
    """How many leading dims of a Q/K head RoPE rotates (``d_head`` unless partial rotary)."""
    return getattr(group, "rope_dim", 0) or group.d_head


def rope_pairs(group: Group) -> torch.Tensor:
    """(r/2, 2) the dims that RoPE rotates together, ``r`` = :func:`rotary_dims`: ``(i, i + r/2)``
    (``half``) or ``(2i, 2i+1)`` (``interleaved``)."""
    r = rotary_dims(group)
    half = torch.arange(r // 2)
    if getattr(group, "rope_layout", "half") == "interleaved":
        return torch.stack([2 * half, 2 * half + 1], dim=1)
    return torch.stack([half, half + r // 2], dim=1)


def pass_dims(group: Group) -> torch.Tensor:
    """(d_head − r,) int64 the Q/K dims partial RoPE leaves unrotated (empty for full RoPE)."""
    return torch.arange(rotary_dims(group), group.d_head)


def pass_classes(group: Group, norms: Norms) -> list[torch.Tensor] | None:
    """The pass-through dims (:func:`pass_dims`) split into classes an orthogonal map may mix.

    Without per-dimension norms: one class (any orthogonal map). With them (``norms`` (d_head, n))
    the dims whose norm weights are equal in every column form a class (only those commute with
    ``diag(γ)``); None when the weights are unknown. Each class is an int64 tensor of head dims.
    """
    dims = pass_dims(group)
    if not dims.numel():
        return []
    if not group.qk_shared:
        return [dims]
    if norms is None:
        return None
    n = norms.detach().cpu().double()[dims]
    if n.shape[1] == 0:
        return [dims]
    _, label = torch.unique(n, dim=0, return_inverse=True)
    return [dims[label == c] for c in range(int(label.max()) + 1)]


def continuous_pairs(group: Group, norms: Norms) -> torch.Tensor | None:
    """(d_head/2,) bool: pairs that may take any angle (else only 0 or π); None when unknown.

    Without per-dimension norms every pair is free; with them (``norms`` (d_head, n), the q and
    k norm weights as columns) a pair is free only where the weights are equal on both dims.
    """
    pairs = rope_pairs(group)
    if not group.qk_shared:
        return torch.ones(len(pairs), dtype=torch.bool)
    if norms is None:
        return None
    n = norms.detach().cpu()
    return (n[pairs[:, 0]] == n[pairs[:, 1]]).all(dim=-1)


def pair_rotation(angles: torch.Tensor, group: Group) -> torch.Tensor:
    """(..., r/2) angles -> (..., d_head, d_head) float64 block rotations on the RoPE pairs
    (identity on the pass-through dims of partial rotary)."""
    pairs = rope_pairs(group).to(angles.device)
    d = group.d_head
    c, s = torch.cos(angles.double()), torch.sin(angles.double())
    r = torch.zeros(*angles.shape[:-1], d, d, dtype=torch.float64, device=angles.device)
    rest = pass_dims(group).to(angles.device)
    r[..., rest, rest] = 1.0
    i, j = pairs[:, 0], pairs[:, 1]
    r[..., i, i] = c
    r[..., j, j] = c
    r[..., i, j] = -s
    r[..., j, i] = s
    return r


def haar_orthogonal(batch: int, d: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """(batch, d, d) float64 random orthogonal matrices (Haar: QR of a Gaussian, signs fixed)."""
    q, r = torch.linalg.qr(torch.randn(batch, d, d, generator=generator, dtype=torch.float64))
    return q * torch.sign(torch.diagonal(r, dim1=-2, dim2=-1)).unsqueeze(-2)


def _amax(x: torch.Tensor) -> float:
    return float(x.abs().max()) if x.numel() else 0.0


def _eye_like(rot: torch.Tensor) -> torch.Tensor:
    return torch.eye(rot.shape[-1], dtype=rot.dtype, device=rot.device).expand(rot.shape)


def is_identity_rotation(rot: torch.Tensor | None) -> bool:
    return rot is None or torch.equal(rot, _eye_like(rot))


def _rotate(t: torch.Tensor, axis: int, rot: torch.Tensor, per_kv: int) -> torch.Tensor:
    """Blocks of ``axis`` laid out (n_kv, per_kv, d): ``new_block[k, j] = rot[k] @ block[k, j]``."""
    kv, d = rot.shape[0], rot.shape[-1]
    moved = t.movedim(axis, 0)
    dtype = torch.float64 if t.device.type == "cpu" or t.dtype == torch.float64 else torch.float32
    x = moved.reshape(kv, per_kv, d, -1).to(dtype)
    y = torch.einsum("kab,kjbm->kjam", rot.to(t.device, dtype), x)
    return y.reshape(moved.shape).movedim(0, axis).to(t.dtype).contiguous()


class AttentionSymmetry(SymmetryKind):
    """Heads, query groups, within-head permutations and orthogonal maps (module docstring)."""

    name = "attention"

    def keys(self, group: Group) -> list[str]:
        return [f"{group.name}.{p}" for p in ATTN_PARTS]

    def optional_keys(self, group: Group) -> list[str]:
        return [f"{group.name}.{p}" for p in ROT_PARTS]

    def shape(self, group: Group, key: str) -> tuple[int, ...]:
        part = key.rsplit(".", 1)[1]
        kv, d = group.n_kv_heads, group.d_head
        return {"heads": (kv,), "qgroup": (kv, group.q_per_kv), "qk": (kv, d), "vo": (kv, d),
                "qk_rot": (kv, d, d), "vo_rot": (kv, d, d)}[part]

    def identity(self, group: Group) -> Perms:
        return {key: arange_rows(self.shape(group, key)) for key in self.keys(group)}

    def rotations_allowed(self, group: Group) -> dict[str, str]:
        """part -> what its rotation may be: ``orthogonal``, ``rope-pairs`` or ``none``."""
        if group.rope:
            qk = "rope-pairs"
        else:
            qk = "none" if group.qk_shared else "orthogonal"
        return {"qk_rot": qk, "vo_rot": "orthogonal"}

    def random(self, group: Group, generator: torch.Generator | None, *, rotations: bool = False,
               norms: Norms = None) -> Perms:
        """A uniformly random valid element; with ``rotations`` Haar V/O (and non-RoPE Q/K) maps
        and uniform RoPE pair angles (0 or π on pairs whose norm weights differ or are unknown)."""
        if group.fixed:
            return self.identity(group)
        g, kv, d = group.name, group.n_kv_heads, group.d_head

        def rp(n: int) -> torch.Tensor:
            return torch.randperm(n, generator=generator)

        out = self.identity(group)
        out[f"{g}.heads"] = rp(kv)
        out[f"{g}.qgroup"] = torch.stack([rp(group.q_per_kv) for _ in range(kv)])
        out[f"{g}.vo"] = torch.stack([rp(d) for _ in range(kv)])
        if not group.rope:
            qk = torch.stack([rp(d) for _ in range(kv)])
            if group.qk_shared:
                qk = qk[:1].expand(kv, -1).clone()
            out[f"{g}.qk"] = qk
        if not rotations:
            return out
        out[f"{g}.vo_rot"] = haar_orthogonal(kv, d, generator)
        allowed = self.rotations_allowed(group)["qk_rot"]
        if allowed == "orthogonal":
            out[f"{g}.qk_rot"] = haar_orthogonal(kv, d, generator)
        elif allowed == "rope-pairs":
            npairs = rotary_dims(group) // 2
            angles = (torch.rand(kv, npairs, generator=generator, dtype=torch.float64) * 2 - 1) * math.pi
            free = continuous_pairs(group, norms)
            free = torch.zeros(npairs, dtype=torch.bool) if free is None else free
            signs = torch.randint(0, 2, (kv, npairs), generator=generator).double() * math.pi
            rot = pair_rotation(torch.where(free, angles, signs), group)
            classes = pass_classes(group, norms)
            if classes is None:  # norm weights unknown: only sign flips surely commute with them
                classes = [dim[None] for dim in pass_dims(group)]
            for cls in classes:
                rot[:, cls[:, None], cls[None, :]] = haar_orthogonal(kv, len(cls), generator)
            out[f"{g}.qk_rot"] = rot
        return out

    def validate(self, group: Group, perms: Mapping[str, torch.Tensor], *, where: object = None,
                 headless: str | None = None, norms: Norms = None) -> None:
        g = group.name
        for key in self.keys(group):
            if key not in perms:
                raise ArchitectureError("permutation missing for this group", file=where, tensor=key)
            t, want = perms[key], self.shape(group, key)
            if tuple(t.shape) != want:
                raise ArchitectureError(f"shape {list(t.shape)} does not match the model's group shape {list(want)}",
                                        file=where, tensor=key)
            if t.dtype.is_floating_point or not is_perm_rows(t):
                raise ArchitectureError("is not a permutation (each row must hold 0..n-1 once)", file=where, tensor=key)
            if group.fixed and not bool((t == arange_rows(want, t.device)).all()):
                raise fixed_error(headless, key, where)
        qk = perms[f"{g}.qk"]
        if group.rope and not bool((qk == arange_rows(tuple(qk.shape), qk.device)).all()):
            raise ArchitectureError("RoPE attention: the Q/K within-head permutation must be the identity "
                                    "(permuting dims breaks rotary frequency pairs)", file=where, tensor=f"{g}.qk")
        if group.qk_shared and not bool((qk == qk[:1]).all()):
            raise ArchitectureError("per-head Q/K norm: the Q/K within-head permutation must be the same for "
                                    "all heads", file=where, tensor=f"{g}.qk")
        allowed = self.rotations_allowed(group)
        for part in ROT_PARTS:
            key = f"{g}.{part}"
            if key not in perms:
                continue
            self._validate_rotation(group, perms[key], key, allowed[part], where, headless, norms)

    def _validate_rotation(self, group: Group, r: torch.Tensor, key: str, allowed: str, where: object,
                           headless: str | None, norms: Norms) -> None:
        want = self.shape(group, key)
        if tuple(r.shape) != want:
            raise ArchitectureError(f"shape {list(r.shape)} does not match the model's group shape {list(want)}",
                                    file=where, tensor=key)
        if not r.dtype.is_floating_point or not bool(torch.isfinite(r).all()):
            raise ArchitectureError("a rotation must be a finite float tensor", file=where, tensor=key)
        r = r.detach().double().cpu()
        if r.numel() and float((r @ r.transpose(-1, -2) - _eye_like(r)).abs().max()) > ORTHO_TOL:
            raise ArchitectureError(f"is not orthogonal (|R Rᵀ − I| > {ORTHO_TOL:g})", file=where, tensor=key)
        off = (r - _eye_like(r)).abs()
        if group.fixed and off.numel() and float(off.max()) > STRUCT_TOL:
            raise fixed_error(headless, key, where)
        if allowed == "orthogonal":
            return
        if allowed == "none":
            if off.numel() and float(off.max()) > STRUCT_TOL:
                raise ArchitectureError("per-dimension Q/K norm without RoPE: the Q/K rotation must be the identity",
                                        file=where, tensor=key)
            return
        pairs = rope_pairs(group)
        i, j = pairs[:, 0], pairs[:, 1]
        block = torch.zeros(want[-2:], dtype=torch.bool)
        block[i, i] = block[j, j] = block[i, j] = block[j, i] = True
        rest = pass_dims(group)
        block[rest[:, None], rest[None, :]] = True
        if _amax(r[:, ~block]) > STRUCT_TOL:
            what = "frequency pairs" if not rest.numel() else (
                f"frequency pairs inside the {rotary_dims(group)} rotary dims, and map the pass-through dims "
                "among themselves")
            raise ArchitectureError(f"RoPE attention: the Q/K rotation may only rotate {what} "
                                    f"({getattr(group, 'rope_layout', 'half')} layout); it mixes dims of different "
                                    "frequencies", file=where, tensor=key)
        classes = pass_classes(group, norms)
        if classes is not None and rest.numel():
            same = torch.zeros(want[-2:], dtype=torch.bool)
            for cls in classes:
                same[cls[:, None], cls[None, :]] = True
            if _amax(r[:, block & ~same & (torch.arange(want[-1]) >= rotary_dims(group))]) > STRUCT_TOL:
                raise ArchitectureError("per-dimension Q/K norm: the pass-through map may only mix dims whose "
                                        "norm weights are equal (no other map commutes with the norm)",
                                        file=where, tensor=key)
        if (_amax(r[:, i, i] - r[:, j, j]) > ORTHO_TOL
                or _amax(r[:, i, j] + r[:, j, i]) > ORTHO_TOL):
            raise ArchitectureError("RoPE attention: each frequency pair must be rotated, not reflected "
                                    "(a reflection reverses the rotary angle)", file=where, tensor=key)
        free = continuous_pairs(group, norms)
        if free is not None and _amax(r[:, j, i][:, ~free]) > STRUCT_TOL:
            raise ArchitectureError("per-dimension Q/K norm: a frequency pair whose two norm weights differ may only "
                                    "be rotated by 0 or π (no other rotation commutes with the norm)", file=where,
                                    tensor=key)

    def invert(self, group: Group, perms: Mapping[str, torch.Tensor]) -> Perms:
        """Sub-permutations are indexed by target slot: re-indexed by σ⁻¹ and inverted row-wise.

        A slot maps ``new_k = R P_ρ old_σk``; the inverse slot ``σk`` maps ``old = P_ρᵀ Rᵀ new_k``,
        written again as gather-then-rotate: ``ρ' = ρ⁻¹`` and ``R' = P_ρᵀ Rᵀ P_ρ``, i.e.
        ``R'[a, b] = R[ρ⁻¹[b], ρ⁻¹[a]]``.
        """
        g = group.name
        heads_inv = inverse_perm(perms[f"{g}.heads"])
        out = {f"{g}.heads": heads_inv}
        for part in ("qgroup", "qk", "vo"):
            out[f"{g}.{part}"] = inverse_perm(perms[f"{g}.{part}"][heads_inv])
        for part, within in (("qk_rot", "qk"), ("vo_rot", "vo")):
            key = f"{g}.{part}"
            if key not in perms:
                continue
            rt = perms[key][heads_inv].transpose(-1, -2)
            rinv = out[f"{g}.{within}"]
            d = rt.shape[-1]
            rt = torch.gather(rt, 1, rinv[:, :, None].expand(-1, -1, d))
            out[key] = torch.gather(rt, 2, rinv[:, None, :].expand(-1, d, -1))
        return out

    def gather_index(self, group: Group, perms: Mapping[str, torch.Tensor], role: str) -> torch.Tensor:
        """Gather index for one attention role (module docstring, before any rotation)."""
        g, d = group.name, group.d_head
        sigma = perms[f"{g}.heads"]
        if role == "qk_dim":
            return perms[f"{g}.qk"][0]
        if role == "qkv":
            q = self.gather_index(group, perms, "q")
            k = self.gather_index(group, perms, "k") + group.n_heads * d
            v = self.gather_index(group, perms, "v") + (group.n_heads + group.n_kv_heads) * d
            return torch.cat([q, k, v])
        within = perms[f"{g}.qk"] if role in ("q", "k") else perms[f"{g}.vo"]  # (kv, d)
        if role in ("k", "v"):
            return (sigma[:, None] * d + within).reshape(-1)
        q = group.q_per_kv
        head = sigma[:, None] * q + perms[f"{g}.qgroup"]  # (kv, q) source query head of each slot
        return (head[:, :, None] * d + within[:, None, :]).reshape(-1)

    def _rotations(self, group: Group, perms: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor | None, ...]:
        g = group.name
        return tuple(None if is_identity_rotation(perms.get(f"{g}.{p}")) else perms[f"{g}.{p}"] for p in ROT_PARTS)

    def has_rotation(self, group: Group, perms: Mapping[str, torch.Tensor], role: str) -> bool:
        qk, vo = self._rotations(group, perms)
        return (role in ("q", "k", "qkv") and qk is not None) or (role in ("v", "o", "qkv") and vo is not None)

    def apply_axis(self, group: Group, perms: Mapping[str, torch.Tensor], role: str, tensor: torch.Tensor,
                   axis: int) -> torch.Tensor:
        out = gather(tensor, axis, self.gather_index(group, perms, role))
        if role == "qk_dim":  # allowed rotations commute with the norm weight: it stays put
            return out
        qk, vo = self._rotations(group, perms)
        g = group.q_per_kv
        if role == "qkv":
            d, h, kv = group.d_head, group.n_heads, group.n_kv_heads
            q, k, v = out.split([h * d, kv * d, kv * d], dim=axis)
            if qk is not None:
                q, k = _rotate(q, axis, qk, g), _rotate(k, axis, qk, 1)
            if vo is not None:
                v = _rotate(v, axis, vo, 1)
            return torch.cat([q, k, v], dim=axis)
        rot = qk if role in ("q", "k") else vo
        if rot is None:
            return out
        return _rotate(out, axis, rot, g if role in ("q", "o") else 1)

    def moved(self, group: Group, perms: Mapping[str, torch.Tensor]) -> float:
        p = perms[f"{group.name}.heads"]
        return float((p != torch.arange(p.numel(), device=p.device)).float().mean()) if p.numel() else 0.0

    def rotation(self, group: Group, perms: Mapping[str, torch.Tensor]) -> float:
        """Mean over the present rotations of ‖R − I‖_F / (2√d) (0: identity, 1: −I)."""
        vals = []
        for part in ROT_PARTS:
            r = perms.get(f"{group.name}.{part}")
            if r is not None and r.numel():
                r = r.double()
                vals.append(float(torch.linalg.matrix_norm(r - _eye_like(r)).mean()) / (2 * math.sqrt(r.shape[-1])))
        return sum(vals) / len(vals) if vals else 0.0

    def rotated_blocks(self, group: Group, perms: Mapping[str, torch.Tensor]) -> int:
        """KV-head slots whose ``qk_rot`` or ``vo_rot`` (each (n_kv_heads, d, d)) differs from I."""
        moved = torch.zeros(group.n_kv_heads, dtype=torch.bool)
        for part in ROT_PARTS:
            r = perms.get(f"{group.name}.{part}")
            if r is not None and r.numel():
                r = r.detach().double().cpu()
                moved |= (r - _eye_like(r)).abs().amax(dim=(-1, -2)) > STRUCT_TOL
        return int(moved.sum())

    def rotation_blocks(self, group: Group) -> int:
        return group.n_kv_heads

    def describe(self, group: Group) -> dict[str, Any]:
        allowed = self.rotations_allowed(group)
        qk = allowed["qk_rot"]
        if qk == "rope-pairs":
            layout = getattr(group, "rope_layout", "half")
            qk = f"rope-pairs ({layout})" + (", norm-restricted" if group.qk_shared else "")
            if rotary_dims(group) < group.d_head:
                qk += (f"; partial rotary: pairs on the first {rotary_dims(group)} of {group.d_head} dims, "
                       "orthogonal on the rest")
        return {"qk_rot": qk, "vo_rot": allowed["vo_rot"]}
