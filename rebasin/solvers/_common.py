"""Shared types and plumbing of the solver backends: the result type, the batch loop, checks.

Every backend has the uniform signature

    fn(cost: np.ndarray | torch.Tensor  (b, n, n), maximize: bool, **opts) -> Assignment

with a *batched* (b, n, n) input that ``solve`` has already checked (square, finite, float);
the backend returns a batched Assignment (perm (b, n), objective (b,)), ``solve`` squeezes it.
Backends that solve one problem at a time do so through ``solve_each``.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from rebasin_kernels.hungarian import assignment_objective, check_permutations

from rebasin.solvers import native

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


def to_numpy(cost: Array, dtype: type | None = None) -> np.ndarray:
    """numpy view of ``cost`` (host), converted to ``dtype`` when given."""
    if isinstance(cost, torch.Tensor):
        if dtype is None and cost.device.type == "cpu":
            return cost.detach().numpy()
        t = cost.detach().cpu()
        if dtype is not None:
            t = t.to({np.float64: torch.float64, np.float32: torch.float32}[np.dtype(dtype).type])
        return t.numpy()
    return np.asarray(cost, dtype=dtype) if dtype is not None else np.asarray(cost)


def objective_of(cost: Array, perm: np.ndarray | torch.Tensor) -> torch.Tensor:
    """float64 ``sum_i cost[b, i, perm[b, i]]`` for a (b, n, n) cost and (b, n) perm; shape (b,), CPU."""
    if isinstance(cost, np.ndarray) or cost.device.type == "cpu":  # numpy: no torch dispatch, 1 thread
        c = to_numpy(cost)
        b, n = c.shape[0], c.shape[1]
        p = np.asarray(perm.cpu() if isinstance(perm, torch.Tensor) else perm, dtype=np.int64).reshape(-1)
        picked = c.reshape(b * n, n)[np.arange(b * n), p]
        return torch.from_numpy(picked.reshape(b, n).sum(axis=1, dtype=np.float64))
    return assignment_objective(cost, torch.as_tensor(perm)).cpu()


def check_perm(perm: np.ndarray | torch.Tensor, n: int, method: str) -> None:
    """Raise RuntimeError unless every row of the (b, n) ``perm`` is a permutation of 0..n-1."""
    if perm.ndim != 2 or perm.shape[1] != n:
        raise RuntimeError(f"solver {method!r} returned perm of shape {tuple(perm.shape)}, expected (b, {n})")
    on_cpu = isinstance(perm, np.ndarray) or perm.device.type == "cpu"
    if on_cpu and perm.dtype in (np.int64, torch.int64) and native.native_available():
        ok = native.first_bad_perm(perm.numpy() if isinstance(perm, torch.Tensor) else perm) < 0
    else:
        ok = check_permutations(perm)
    if not ok:
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
    perm = np.asarray(perm, dtype=np.int64)
    if perm.shape != (b, n) or not perm.flags.c_contiguous:
        perm = np.ascontiguousarray(perm.reshape(b, n))
    if native.native_available() and (isinstance(cost, np.ndarray) or cost.device.type == "cpu"):
        obj, bad = native.objective_checked(to_numpy(cost), perm)  # one C pass: objective + check
        if bad >= 0:
            raise RuntimeError(f"solver {method!r} returned a non-permutation (a row is not a permutation of "
                               f"0..{n - 1})")
        objective = torch.from_numpy(obj)
    else:
        check_perm(perm, n, method)
        objective = objective_of(cost, perm)
    return Assignment(
        perm=torch.from_numpy(perm),
        objective=objective,
        certified=certified,
        gap=gap,
        method=method,
        stats=stats or {},
    )


# one problem's answer from a backend's solve_one: perm (n,), gap bound (None: unknown), stats
OneSolve = tuple[np.ndarray, float | None, dict[str, Any]]


def per_key_lists(per_problem: list[dict[str, Any]]) -> dict[str, Any]:
    """The per-problem stats as one list per key: [{"a": 1}, {"a": 2}] -> {"a": [1, 2]}."""
    return {key: [st[key] for st in per_problem] for key in (per_problem[0] if per_problem else {})}


def solve_each(
    cost: Array,
    method: str,
    solve_one: Callable[[int], OneSolve],
    *,
    certified: bool,
    trivial: dict[str, Any] | None = None,
    summarize: Callable[[list[dict[str, Any]]], dict[str, Any]] = per_key_lists,
) -> Assignment:
    """A backend's batch loop: solve every problem of the (b, n, n) ``cost``, stack, wrap.

    ``solve_one(k)`` solves problem k (the backend has converted ``cost`` once, as it needs) and
    returns (perm (n,) int, gap bound or None, per-problem stats); problems of n <= 1 are not
    passed to it (perm = identity, gap 0, stats ``trivial``). The Assignment has perm (b, n),
    gap = the largest over the batch (None when one is unknown), stats = ``summarize`` of the
    per-problem stats.
    """
    b, n = cost.shape[0], cost.shape[1]
    perm = np.empty((b, n), dtype=np.int64)
    gaps: list[float | None] = []
    per_problem: list[dict[str, Any]] = []
    for k in range(b):
        p, gap, st = solve_one(k) if n > 1 else (np.arange(n), 0.0, dict(trivial or {}))
        perm[k] = p
        gaps.append(gap)
        per_problem.append(st)
    gap = None if None in gaps else max(gaps, default=0.0)
    return make_result(cost, perm, method, certified=certified, gap=gap, stats=summarize(per_problem))


# entries per finiteness test on CPU: a cache-sized block keeps the bool temporary small
FINITE_CHUNK = 1 << 18


def finite_check(cost: torch.Tensor) -> None:
    """ValueError naming the first batch entry holding NaN/Inf (cost is (b, n, n)).

    CPU: one single-threaded pass, in C (``native.first_nonfinite``) or numpy ``isfinite`` over
    cache-sized blocks (torch's threaded ``sum`` cost 1-3 ms at n = 256 on a loaded 2-core
    machine). GPU: one sum, the full scan only when the sum is not finite."""
    if cost.numel() and cost.device.type == "cpu":
        flat = cost.detach().numpy().reshape(-1)
        if native.native_available():
            first = native.first_nonfinite(flat)
            if first >= 0:
                raise ValueError(f"cost matrix contains NaN/Inf (batch {first // (cost.shape[1] * cost.shape[2])})")
            return
        for lo in range(0, flat.size, FINITE_CHUNK):
            block = flat[lo:lo + FINITE_CHUNK]
            ok = np.isfinite(block)
            if not ok.all():
                first = lo + int(np.argmin(ok))
                raise ValueError(f"cost matrix contains NaN/Inf (batch {first // (cost.shape[1] * cost.shape[2])})")
        return
    if cost.numel() == 0 or bool(torch.isfinite(cost.sum())):
        return  # NaN/Inf propagate into the sum; only an overflowing sum needs the full scan
    bad = ~torch.isfinite(cost).flatten(1).all(dim=1)
    if bool(bad.any()):
        raise ValueError(f"cost matrix contains NaN/Inf (batch {int(torch.nonzero(bad)[0, 0])})")



# ---- thread policy (docs/design.md, Thread policy) ---------------------------------------------
# torch threads for the solvers' own CPU passes (reductions, top-k, certificates, Sinkhorn): they
# are memory-bound scans that two threads barely speed up on an idle machine, while under load one
# descheduled thread stalls every parallel region (2.2x slower certified n = 4096 on a loaded
# 2-core machine). None: inherit torch's setting. GEMMs (the cost builder) are outside the solvers
# and keep every core; batch JV calls get ``outer_threads()`` workers.
SCAN_THREADS: int | None = 1
_OUTER_THREADS: list[int] = []


class scan_threads:
    """Run the body with ``SCAN_THREADS`` torch threads on CPU (restored after); no-op on GPU,
    when ``SCAN_THREADS`` is None, or nested. ``outer_threads()`` reads the caller's setting.
    A plain class, not a generator: it runs around every solve (~1 µs)."""

    __slots__ = ("active", "inner", "outer")

    def __init__(self, device: torch.device | str):
        kind = device.type if isinstance(device, torch.device) else torch.device(device).type
        self.active = kind == "cpu" and SCAN_THREADS is not None and not _OUTER_THREADS

    def __enter__(self) -> None:
        if self.active:
            self.outer = torch.get_num_threads()
            self.inner = max(1, min(self.outer, SCAN_THREADS))
            _OUTER_THREADS.append(self.outer)
            if self.inner != self.outer:
                torch.set_num_threads(self.inner)

    def __exit__(self, *exc: object) -> None:
        if self.active:
            if self.inner != self.outer:
                torch.set_num_threads(self.outer)
            _OUTER_THREADS.pop()


def outer_threads() -> int:
    """The caller's torch thread count (outside any ``scan_threads`` scope): the worker budget for
    coarse-grained parallel work such as a batch of independent JV solves."""
    return _OUTER_THREADS[-1] if _OUTER_THREADS else torch.get_num_threads()
