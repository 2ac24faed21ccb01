"""Dense Jonker-Volgenant through the ``lapjvr`` family: ``lap.lapjvr`` (lapx >= 0.11) and
``laprust.lapjv`` (laprust, the same solver in Rust). Shared by the ``lapx`` and ``laprust`` backends.

Math: ``min_perm sum_i C[i, perm[i]]`` (maximisation solves ``-C``) by JV's column reduction,
reduction transfer, augmenting row reduction and shortest augmenting paths. The costs are read in
the dtype they are given (float32 stays float32: half the memory traffic of a float64 copy) while
the potentials and path lengths are float64, so every reduced cost ``C_ij - u_i - v_j`` is formed
in float64 from the exact input values, as scipy does: exact, certified=True, gap=0.
``precision="float32"`` rounds float64 costs to float32 first (faster on float64 input, but then
the answer is optimal for the rounded costs only: certified=False unless the input was float32).

Batches go to the native batch entry point (one call, a reused native worker pool) with
``n_threads`` workers; the default (0) takes the caller's thread budget ``outer_threads()`` —
torch's thread count outside the solver's single-threaded scans (docs/design.md, Thread policy).
"""
from __future__ import annotations

import functools
from collections.abc import Callable

import numpy as np

from rebasin.solvers._common import Array, Assignment, make_result, outer_threads, to_numpy


def minimisation_array(c: np.ndarray, maximize: bool, precision: str) -> tuple[np.ndarray, bool]:
    """The (b, n, n) C-contiguous costs to minimise (from the numpy costs ``c``), in the working
    dtype, and whether it is exact.

    float32 and float64 inputs keep their dtype (``precision="float64"``: exact); ``"float32"``
    casts to float32 (exact only when the input was float32 already). One fused pass: the
    negation (maximisation) and the cast happen together; a contiguous minimisation input is
    borrowed, not copied.
    """
    if precision not in ("float64", "float32"):
        raise ValueError(f"precision must be 'float64' or 'float32', got {precision!r}")
    if c.dtype not in (np.float32, np.float64):
        c = c.astype(np.float64)
    dtype = np.float32 if precision == "float32" else c.dtype
    exact = dtype == c.dtype
    if maximize:
        return np.negative(c, dtype=dtype), exact
    return np.ascontiguousarray(c, dtype=dtype), exact


def solve_jvr(
    name: str,
    single: Callable,
    batch: Callable,
    cost: Array,
    maximize: bool,
    precision: str,
    n_threads: int,
) -> Assignment:
    """Solve every (n, n) slice of the (b, n, n) ``cost`` with ``single`` (one problem) or
    ``batch`` (several); both have lapjvr's signature. perm (b, n)."""
    x = to_numpy(cost)
    c, exact = minimisation_array(x, maximize, precision)
    b, n = c.shape[0], c.shape[1]
    if n <= 1:
        perm = np.zeros((b, n), dtype=np.int64)
    elif b == 1:
        perm = single(c[0], return_cost=False)[1][None]
    else:
        threads = n_threads if n_threads > 0 else outer_threads()
        perm = np.stack(batch(c, return_cost=False, n_threads=threads)[1])
    # square, every row matched: the rows come back sorted 0..n-1, so cols is the permutation
    return make_result(x, perm, name, certified=exact, gap=0.0 if exact else None,
                       stats={"precision": "float32" if c.dtype == np.float32 else "float64"})


@functools.cache
def jvr_functions(name: str) -> tuple[Callable, Callable]:
    """(single, batch) lapjvr-style functions of the ``laprust`` or ``lapx`` package."""
    if name == "laprust":
        import laprust

        return laprust.lapjv, laprust.lapjv_batch
    import lap

    return lap.lapjvr, lap.lapjvr_batch
