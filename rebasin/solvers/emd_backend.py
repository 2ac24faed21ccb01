"""``emd`` backend: POT's exact network simplex (``ot.emd``) with uniform marginals 1/n.

Math: the assignment LP ``min <P, C>`` over doubly-stochastic ``P`` (rows and columns summing
to 1/n) has a permutation/n matrix among its optimal vertices; the network simplex returns a
vertex, so ``perm[i] = argmax_j P[i, j]``. A degenerate/fractional plan (should not happen
for a vertex, but floating point) is rounded exactly by scipy on the plan's support, and if
that support holds no perfect matching, by scipy on the dense cost — never a non-permutation.
O(n^3)-ish time and a dense (n, n) float64 plan: fine up to a few thousand.
"""
from __future__ import annotations

import functools
import os
import warnings

import numpy as np
from scipy.optimize import linear_sum_assignment

from rebasin.solvers._common import Array, Assignment, OneSolve, SolverUnavailable, solve_each, to_numpy


@functools.cache
def _pot_emd():
    """Import ``ot.emd`` robustly.

    POT's backend discovery imports cupy/jax/tensorflow when installed; with cupy present but
    no GPU that can raise ImportError. Retry once with those backends disabled (we only ever
    pass numpy arrays, i.e. POT's numpy backend).
    """
    try:
        import ot

        return ot.emd
    except ImportError:
        keys = ("POT_BACKEND_DISABLE_CUPY", "POT_BACKEND_DISABLE_JAX", "POT_BACKEND_DISABLE_TENSORFLOW")
        old = {k: os.environ.get(k) for k in keys}
        try:
            for k in keys:
                os.environ[k] = "1"
            import sys

            for mod in [m for m in sys.modules if m == "ot" or m.startswith("ot.")]:
                del sys.modules[mod]
            import ot

            return ot.emd
        finally:
            for k, v in old.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v


def emd_available() -> bool:
    try:
        _pot_emd()
        return True
    except Exception:
        return False


def _plan_to_perm(plan: np.ndarray, c: np.ndarray) -> tuple[np.ndarray, str]:
    n = plan.shape[0]
    perm = plan.argmax(axis=1)
    if np.array_equal(np.sort(perm), np.arange(n)) and np.all(plan[np.arange(n), perm] > 0.5 / n):
        return perm, "argmax"
    # fractional/degenerate plan: exact rounding on the support (the support of an optimal
    # plan only holds optimal edges, so any perfect matching inside it of min cost is optimal)
    support = plan > 1e-9 / n
    big = np.where(support, c, np.inf)
    try:
        _, cols = linear_sum_assignment(big)
        if np.isfinite(big[np.arange(n), cols]).all():
            return cols, "support-rounding"
    except ValueError:
        pass
    _, cols = linear_sum_assignment(c)
    return cols, "dense-fallback"


def solve_emd(cost: Array, maximize: bool = True, *, num_iter_max: int = 10_000_000) -> Assignment:
    """Solve each (n, n) slice of a (b, n, n) cost with ``ot.emd``; perm (b, n)."""
    try:
        emd = _pot_emd()
    except Exception as exc:
        raise SolverUnavailable(f"solver 'emd' needs POT (pip install pot): {exc}") from exc
    c_all = to_numpy(cost, np.float64)
    if maximize:
        c_all = -c_all
    n = c_all.shape[1]
    ones = np.full(n, 1.0 / max(n, 1), dtype=np.float64)  # uniform marginals (POT wants the simplex)

    def one(k: int) -> OneSolve:
        c = np.ascontiguousarray(c_all[k])
        with warnings.catch_warnings():  # POT warns and reports the same thing in log["warning"]
            warnings.simplefilter("ignore", UserWarning)
            plan, log = emd(ones, ones, c, numItermax=num_iter_max, log=True)
        if log.get("warning"):
            # not converged (iteration cap): the plan is not proven optimal; solve exactly instead
            return linear_sum_assignment(c)[1], 0.0, {"rounding": f"scipy (emd: {log['warning']})"}
        perm, how = _plan_to_perm(np.asarray(plan), c)
        return perm, 0.0, {"rounding": how}

    return solve_each(cost, "emd", one, certified=True, trivial={"rounding": "trivial"})
