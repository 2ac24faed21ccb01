"""``jv`` backend: the C dense Jonker-Volgenant of ``rebasin.solvers._lapcore`` (built by setup.py
when a C compiler is present).

Math: ``min_perm sum_i C[i, perm[i]]`` (maximisation reads ``-C`` on the fly, no negated copy) by
JV's column reduction, reduction transfer and augmenting row reduction, then shortest augmenting
paths by Dijkstra over the unscanned columns, with vectorised (AVX2 where the CPU has it) scans.
Costs are read in their own dtype and widened to float64; potentials and distances are float64,
as in scipy: exact, certified=True, gap=0. Batches are shared by ``n_threads`` pthreads (default:
the caller's thread budget, ``outer_threads()``). Fastest on small problems and easy ones; ``auto``
sends hard problems above n = 256 to lapjvr instead (``rebasin.solvers.auto.JV_KNOTS``).
"""
from __future__ import annotations

import numpy as np

from rebasin.solvers import native
from rebasin.solvers._common import Array, Assignment, SolverUnavailable, make_result, outer_threads, to_numpy


def jv_available() -> bool:
    """True when the C extension is built."""
    return native.native_available()


def solve_jv(cost: Array, maximize: bool = True, *, n_threads: int = 0) -> Assignment:
    """Solve each (n, n) slice of a (b, n, n) cost with the C dense JV; perm (b, n)."""
    if not jv_available():
        raise SolverUnavailable("solver 'jv' needs the C extension rebasin.solvers._lapcore (built by "
                                "`pip install` with a C compiler); it is not importable here")
    x = to_numpy(cost)
    if x.dtype not in (np.float32, np.float64):
        x = x.astype(np.float64)
    x = np.ascontiguousarray(x)
    perm, _, status, _ = native.jv(x, -1.0 if maximize else 1.0, n_threads if n_threads > 0 else outer_threads())
    if (status == native.JV_NONFINITE).any():
        raise ValueError(f"cost matrix contains NaN/Inf (batch {int(np.argmax(status == native.JV_NONFINITE))})")
    if status.any():
        raise RuntimeError("solver 'jv' returned a non-permutation")
    return make_result(x, perm, "jv", certified=True, gap=0.0)
