"""``scipy`` backend: ``scipy.optimize.linear_sum_assignment`` (the reference), one call per problem.

Math: ``min/max_perm sum_i C[i, perm[i]]`` by a shortest-augmenting-path (Jonker-Volgenant
style, Crouse 2016) algorithm in float64. Exact: certified=True, gap=0.
"""
from __future__ import annotations

import numpy as np
from scipy.optimize import linear_sum_assignment

from rebasin.solvers._common import Array, Assignment, OneSolve, solve_each, to_numpy


def solve_scipy(cost: Array, maximize: bool = True, **opts) -> Assignment:
    """Solve each (n, n) slice of a (b, n, n) cost exactly with scipy; perm (b, n)."""
    if opts:
        raise TypeError(f"scipy backend takes no options, got {sorted(opts)}")
    c = to_numpy(cost)
    if c.dtype not in (np.float32, np.float64):
        c = c.astype(np.float64)

    def one(k: int) -> OneSolve:
        return linear_sum_assignment(c[k], maximize=maximize)[1], 0.0, {}

    return solve_each(cost, "scipy", one, certified=True, summarize=lambda per: {"calls": len(per)})
