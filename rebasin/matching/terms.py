"""Canonical 2-D views of the tensors touching a group: the inputs of every cost matrix.

For a plain group ``g`` and a tensor ``W`` with ``g`` on axis ``a``, a *term* is the pair
``(W_B as (n, m), W_A as (n, m), col_index)`` with ``g`` moved to rows and all other axes
flattened into columns; ``col_index`` gathers ``W_A``'s columns through the current
permutations of the other axes, so that

    C_g += W_B_2d @ W_A_2d[:, col_index].T        (n × n)

is the matching cost (docs/design.md, "Matching") without materialising a permuted copy of ``W_A``.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

from rebasin.permutation import axis_index, has_rotation, permute_tensor
from rebasin.specs import Spec


@dataclass(frozen=True)
class Term:
    """Tensor ``name`` contributes to a group through its axis ``axis``."""

    name: str
    axis: int


def group_terms(spec: Spec, group: str) -> list[Term]:
    """Every (tensor, axis) where ``group`` appears, in spec order."""
    return [Term(name, axis) for name, axes in spec.axes.items()
            for axis, ref in enumerate(axes) if ref is not None and ref.group == group]


def as_rows(t: torch.Tensor, axis: int) -> torch.Tensor:
    """(…, n on ``axis``, …) -> (n, m) view/reshape with ``axis`` first."""
    if t.dim() == 0:
        return t.reshape(1, 1)
    moved = t.movedim(axis, 0)
    return moved.reshape(moved.shape[0], -1)


def other_index(spec: Spec, name: str, axis: int, perms: Mapping[str, torch.Tensor],
                shape: tuple[int, ...], device: torch.device) -> torch.Tensor | None:
    """Gather index over the flattened non-``axis`` dims of tensor ``name`` (None when nothing moves).

    The flattened order is that of ``as_rows``: the remaining axes in their original order.
    """
    refs = [(i, r) for i, r in enumerate(spec.axes[name]) if i != axis]
    if all(r is None for _, r in refs):
        return None
    idx = torch.zeros((), dtype=torch.long, device=device)
    for i, ref in refs:
        size = shape[i]
        ax_idx = axis_index(spec, perms, ref).to(device) if ref is not None else torch.arange(size, device=device)
        idx = idx[..., None] * size + ax_idx
    return idx.reshape(-1)


def mapped_a(spec: Spec, name: str, axis: int, perms: Mapping[str, torch.Tensor],
             ta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A's tensor as (n, m) rows for a term on ``axis``, every other axis mapped through π:
    ``(rows, col_index)``. Where π only permutes the other axes that is ``as_rows(ta)`` and the
    gather index of :func:`other_index` (no copy); where a rotation acts on one of them (an
    attention group's orthogonal maps mix columns) it is the mapped tensor itself and None."""
    if any(ref is not None and i != axis and has_rotation(spec, perms, ref) for i, ref in enumerate(spec.axes[name])):
        return as_rows(permute_tensor(spec, name, ta, perms, skip_axes=(axis,)), axis), None
    return as_rows(ta, axis), other_index(spec, name, axis, perms, tuple(ta.shape), ta.device)
