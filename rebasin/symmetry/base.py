"""The seam every symmetry kind plugs into (docs/design.md, Symmetries and Permutations file).

A symmetry ``π`` of a resolved :class:`~rebasin.specs.Spec` is a flat mapping key -> tensor
(the permutations file holds exactly these tensors). Each group has one *kind*, chosen by
``group.kind``; the kind owns everything about its part of ``π``:

==================  ===================================================================
keys / shapes       :meth:`SymmetryKind.keys` (always present), :meth:`optional_keys`
                    (absent means the identity, e.g. rotations), :meth:`shape`
identity, random    :meth:`identity`, :meth:`random`
validate            :meth:`validate` (shapes, permutation rows, orthogonality, what the
                    architecture allows: RoPE pairs, per-dimension norms, ``fixed`` groups)
invert              :meth:`invert` (``apply(apply(W, π), π⁻¹) == W``; bit for bit without rotations)
act on an axis      :meth:`gather_index` (the permutation part, an int64 gather index) and
                    :meth:`apply_axis` (gather, then any rotation of the kind)
statistics          :meth:`moved`, :meth:`rotation`
matcher step        ``rebasin.symmetry.ops.MATCHER_STEPS`` (kind -> step, the engine's only
                    dispatch): plain ``rebasin.matching.engine.plain_step``, attention
                    ``rebasin.matching.engine.attention_step``
file entries        integer keys are stored int64, float keys (rotations) float64
                    (:mod:`rebasin.io.perms_file`)
==================  ===================================================================

Convention: gather indexed by target slot, ``new[i] = old[p[i]]``; a rotation ``R`` acts after
the gather on blocks of an axis, ``new_block = R @ gathered_block``.
"""
from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

import torch

from rebasin.errors import ArchitectureError
from rebasin.specs import Group

Perms = dict[str, torch.Tensor]
Norms = torch.Tensor | None  # (d_head, n) per-dimension norm weights of an attention group, or None


def gather(tensor: torch.Tensor, axis: int, index: torch.Tensor) -> torch.Tensor:
    """``tensor.index_select(axis, index)``, bit for bit. On CPU the last axis of a large tensor is
    gathered by the C loop of ``_gathercore`` (the hidden axis of a 151936 × 896 bfloat16 matrix:
    185 ms against 379 ms by advanced indexing on 2 cores, ``python -m benchmarks gather``), other
    inner axes by advanced indexing (about twice index_select's speed there: it walks the strided
    axis element by element)."""
    index = index.to(tensor.device)
    dim = tensor.dim()
    if axis % max(dim, 1) == 0 or tensor.device.type != "cpu":
        return tensor.index_select(axis, index)
    if axis % dim == dim - 1 and _native_last(tensor, index):
        return _gather_last(tensor, index)
    return tensor[(slice(None),) * (axis % dim) + (index,)].contiguous()  # as index_select's, always


NATIVE_MIN = 1 << 16  # elements: smaller gathers stay with torch (the call costs more than the loop)
_BITS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}  # items copied as these bits


@functools.cache
def _gathercore() -> Any:
    try:
        from rebasin.symmetry import _gathercore
    except ImportError:  # built by setup.py where a C compiler was found
        return None
    return _gathercore


def _native_last(tensor: torch.Tensor, index: torch.Tensor) -> bool:
    """Whether :func:`_gather_last` serves this gather: a large plain strided tensor of 1–8-byte items
    (no grad to record, no lazy negation or conjugation), a 1-D int32/int64 index, the extension built."""
    return (tensor.numel() >= NATIVE_MIN and tensor.layout == torch.strided and tensor.element_size() in _BITS
            and not tensor.is_complex() and not tensor.is_neg() and index.dim() == 1
            and index.dtype in (torch.int32, torch.int64)
            and not (tensor.requires_grad and torch.is_grad_enabled()) and _gathercore() is not None)


def _gather_last(tensor: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``tensor[..., index]`` ``(..., k)`` of a CPU tensor ``(..., m)`` and an index ``(k,)`` in [0, m), by
    ``_gathercore.gather_last`` with its rows split among torch's threads (IndexError out of range)."""
    src = tensor.detach().contiguous()
    index = index.to(torch.int64).contiguous()
    m, k = src.shape[-1], index.numel()
    out = torch.empty((*src.shape[:-1], k), dtype=src.dtype)
    bits = _BITS[src.element_size()]
    _gathercore().gather_last(src.view(bits).numpy(), index.numpy(), out.view(bits).numpy(), src.numel() // m, m, k,
                              torch.get_num_threads())
    return out


def arange_rows(shape: tuple[int, ...], device: torch.device | None = None) -> torch.Tensor:
    """Identity permutations of shape ``shape`` (every row 0..n-1)."""
    return torch.arange(shape[-1], device=device).expand(shape).clone()


def is_perm_rows(t: torch.Tensor) -> bool:
    n = t.shape[-1]
    rows = t.reshape(-1, n)
    if rows.numel() == 0:
        return True
    sorted_rows = rows.sort(dim=1).values
    return bool((sorted_rows == torch.arange(n, device=t.device)).all())


def inverse_perm(p: torch.Tensor) -> torch.Tensor:
    """Row-wise inverse of (..., n) permutations."""
    return torch.argsort(p, dim=-1)


def fixed_error(spec_headless: str | None, key: str, where: object) -> ArchitectureError:
    return ArchitectureError(
        f"must be the identity for this model: {spec_headless or 'it has no head'}, so permuting the "
        "residual stream would permute the model's output features (not a symmetry); use permutations "
        "that `rebasin match` found for this model", file=where, tensor=key)


class SymmetryKind:
    """One kind of symmetry group; subclasses implement every method for their ``group.kind``."""

    name = ""

    def keys(self, group: Group) -> list[str]:
        raise NotImplementedError

    def optional_keys(self, group: Group) -> list[str]:
        return []

    def shape(self, group: Group, key: str) -> tuple[int, ...]:
        raise NotImplementedError

    def identity(self, group: Group) -> Perms:
        raise NotImplementedError

    def random(self, group: Group, generator: torch.Generator | None, *, rotations: bool = False,
               norms: Norms = None) -> Perms:
        raise NotImplementedError

    def validate(self, group: Group, perms: Mapping[str, torch.Tensor], *, where: object = None,
                 headless: str | None = None, norms: Norms = None) -> None:
        raise NotImplementedError

    def invert(self, group: Group, perms: Mapping[str, torch.Tensor]) -> Perms:
        raise NotImplementedError

    def gather_index(self, group: Group, perms: Mapping[str, torch.Tensor], role: str) -> torch.Tensor:
        raise NotImplementedError

    def has_rotation(self, group: Group, perms: Mapping[str, torch.Tensor], role: str) -> bool:
        """Whether :meth:`apply_axis` does more than gather for ``role``."""
        return False

    def apply_axis(self, group: Group, perms: Mapping[str, torch.Tensor], role: str, tensor: torch.Tensor,
                   axis: int) -> torch.Tensor:
        return gather(tensor, axis, self.gather_index(group, perms, role))

    def moved(self, group: Group, perms: Mapping[str, torch.Tensor]) -> float:
        raise NotImplementedError

    def rotation(self, group: Group, perms: Mapping[str, torch.Tensor]) -> float:
        """How far the rotations of the group are from the identity (0 when it has none)."""
        return 0.0

    def rotated_blocks(self, group: Group, perms: Mapping[str, torch.Tensor]) -> int:
        """How many blocks of the group (KV-head slots for attention) a non-identity rotation
        maps (0 when the kind has no rotations)."""
        return 0

    def rotation_blocks(self, group: Group) -> int:
        """How many blocks the kind's rotations act on per group (0 when it has none)."""
        return 0

    def describe(self, group: Group) -> dict[str, Any]:
        """What the kind allows for this group (for ``rebasin inspect``)."""
        return {}
