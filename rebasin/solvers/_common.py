"""Shared types and plumbing of the solver registry: the result type, input checks, validation.

Every backend has the uniform signature

    fn(cost: np.ndarray | torch.Tensor  (b, n, n), maximize: bool, **opts) -> Assignment

with a *batched* (b, n, n) input that ``solve`` has already checked (square, finite, float);
the backend returns a batched Assignment (perm (b, n), objective (b,)), ``solve`` squeezes it.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from rebasin_kernels.hungarian import assignment_objective, check_permutations

Array = np.ndarray | torch.Tensor


class SolverUnavailable(RuntimeError):
    """The requested backend cannot run here (optional dependency missing, ...)."""


@dataclass
class Assignment:
    """The answer of a linear assignment solve.

    Attributes:
        perm: torch.int64, shape (n,) or (b, n): ``perm[i]`` is the column assigned to row ``i``.
            On the input's device when the input was a tensor (CPU for numpy inputs).
        objective: torch.float64, shape () or (b,): ``sum_i cost[i, perm[i]]`` computed in
            float64 from the input values.
        certified: True when the result is proven optimal (exact algorithm, or a dual
            certificate checked over all n^2 edges).
        gap: upper bound on ``|optimum - objective|`` (the largest over a batch); 0.0 for exact
            methods, None when no bound is known.
        method: the backend that produced the result.
        stats: free-form diagnostics (iterations, edges, rounds, per-problem gaps, ...).
    """

    perm: torch.Tensor
    objective: torch.Tensor
    certified: bool
    gap: float | None
    method: str
    stats: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class SolverSpec:
    """One registry entry: ``fn(cost (b, n, n), maximize, **opts) -> Assignment``."""

    name: str
    fn: Callable[..., Assignment]
    exact: bool
    available: Callable[[], bool]
    doc: str = ""


def to_numpy(cost: Array, dtype=None) -> np.ndarray:
    """numpy view of ``cost`` (host), converted to ``dtype`` when given."""
    if isinstance(cost, torch.Tensor):
        t = cost.detach().cpu()
        if dtype is not None:
            t = t.to({np.float64: torch.float64, np.float32: torch.float32}[np.dtype(dtype).type])
        return t.numpy()
    return np.asarray(cost, dtype=dtype) if dtype is not None else np.asarray(cost)


def objective_of(cost: Array, perm: np.ndarray | torch.Tensor) -> torch.Tensor:
    """float64 ``sum_i cost[b, i, perm[b, i]]`` for a (b, n, n) cost and (b, n) perm; shape (b,), CPU."""
    return assignment_objective(torch.as_tensor(cost), torch.as_tensor(perm)).cpu()


def check_perm(perm: np.ndarray | torch.Tensor, n: int, method: str) -> None:
    """Raise RuntimeError unless every row of the (b, n) ``perm`` is a permutation of 0..n-1."""
    if perm.ndim != 2 or perm.shape[1] != n:
        raise RuntimeError(f"solver {method!r} returned perm of shape {tuple(perm.shape)}, expected (b, {n})")
    if not check_permutations(perm):
        raise RuntimeError(f"solver {method!r} returned a non-permutation (a row is not a permutation of 0..{n - 1})")


def make_result(
    cost: Array,
    perm: np.ndarray,
    method: str,
    *,
    certified: bool,
    gap: float | None,
    stats: dict[str, Any] | None = None,
) -> Assignment:
    """Validate a (b, n) perm against the (b, n, n) cost and wrap it in an Assignment."""
    b, n = cost.shape[0], cost.shape[1]
    perm = np.asarray(perm, dtype=np.int64).reshape(b, n)
    check_perm(perm, n, method)
    return Assignment(
        perm=torch.from_numpy(np.ascontiguousarray(perm)),
        objective=objective_of(cost, perm),
        certified=certified,
        gap=gap,
        method=method,
        stats=stats or {},
    )


def finite_check(cost: Array) -> None:
    """ValueError naming the first batch entry holding NaN/Inf (cost is (b, n, n))."""
    if isinstance(cost, torch.Tensor):
        if cost.numel() == 0 or bool(torch.isfinite(cost.sum())):
            return  # NaN/Inf propagate into the sum; only an overflowing sum needs the full scan
        bad = ~torch.isfinite(cost).flatten(1).all(dim=1)
        if bool(bad.any()):
            idx = int(torch.nonzero(bad)[0, 0])
            raise ValueError(f"cost matrix contains NaN/Inf (batch {idx})")
    else:
        c = np.asarray(cost)
        if c.size == 0 or np.isfinite(c.sum(dtype=np.float64)):
            return
        bad = ~np.isfinite(c).reshape(c.shape[0], -1).all(axis=1)
        if bad.any():
            raise ValueError(f"cost matrix contains NaN/Inf (batch {int(np.flatnonzero(bad)[0])})")

