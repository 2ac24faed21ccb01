"""Plain groups: one permutation of ``size`` units (residual streams, FFN hidden units, ...)."""
from __future__ import annotations

from collections.abc import Mapping

import torch

from rebasin.errors import ArchitectureError
from rebasin.specs import Group
from rebasin.symmetry.base import (
    Norms,
    Perms,
    SymmetryKind,
    arange_rows,
    fixed_error,
    inverse_perm,
    is_perm_rows,
)


class PlainPermutation(SymmetryKind):
    """Key ``G`` (size,): unit ``i`` of the result is unit ``p[i]``."""

    name = "plain"

    def keys(self, group: Group) -> list[str]:
        return [group.name]

    def shape(self, group: Group, key: str) -> tuple[int, ...]:
        return (group.size,)

    def identity(self, group: Group) -> Perms:
        return {group.name: torch.arange(group.size)}

    def random(self, group: Group, generator: torch.Generator | None, *, rotations: bool = False,
               norms: Norms = None) -> Perms:
        if group.fixed:
            return self.identity(group)
        return {group.name: torch.randperm(group.size, generator=generator)}

    def validate(self, group: Group, perms: Mapping[str, torch.Tensor], *, where: object = None,
                 headless: str | None = None, norms: Norms = None) -> None:
        key = group.name
        if key not in perms:
            raise ArchitectureError("permutation missing for this group", file=where, tensor=key)
        t = perms[key]
        if tuple(t.shape) != (group.size,):
            raise ArchitectureError(f"shape {list(t.shape)} does not match the model's group shape {[group.size]}",
                                    file=where, tensor=key)
        if t.dtype.is_floating_point or not is_perm_rows(t):
            raise ArchitectureError("is not a permutation (each row must hold 0..n-1 once)", file=where, tensor=key)
        if group.fixed and not bool((t == arange_rows((group.size,), t.device)).all()):
            raise fixed_error(headless, key, where)

    def invert(self, group: Group, perms: Mapping[str, torch.Tensor]) -> Perms:
        return {group.name: inverse_perm(perms[group.name])}

    def gather_index(self, group: Group, perms: Mapping[str, torch.Tensor], role: str) -> torch.Tensor:
        return perms[group.name]

    def moved(self, group: Group, perms: Mapping[str, torch.Tensor]) -> float:
        p = perms[group.name]
        return float((p != torch.arange(p.numel(), device=p.device)).float().mean()) if p.numel() else 0.0
