"""``sinkhorn`` backend: entropic assignment rounded to a permutation, with a dual gap bound.

Math (minimisation; maximisation solves ``-C``): entropic assignment with unit marginals,

    f_i = -eps * log sum_j exp((g_j - C_ij) / eps)
    g_j = -eps * log sum_i exp((f_i - C_ij) / eps)

computed by ``rebasin_kernels.sinkhorn.log_sinkhorn`` (the Triton kernel on CUDA, its clamped,
blocked float32 torch reference elsewhere). The plan ``P_ij = exp((f_i + g_j - C_ij)/eps)``
is rounded to a permutation exactly (scipy on ``-log P``, i.e. on the reduced cost, restricted
to nothing: dense) or greedily. Approximate: certified=False.

Gap bound: any (u, v) with ``u_i + v_j <= C_ij`` for all i, j bounds the optimum from below by
``sum u + sum v`` (LP weak duality). We make the Sinkhorn duals feasible with ``v = g``,
``u_i = min_j (C_ij - v_j)`` and report ``gap = objective - (sum u + sum v)`` (>= true gap).
"""
from __future__ import annotations

import numpy as np
import torch
from rebasin_kernels.sinkhorn import log_sinkhorn
from scipy.optimize import linear_sum_assignment

from rebasin.solvers._common import Array, Assignment, OneSolve, per_key_lists, solve_each


def default_eps(c: torch.Tensor, rel: float) -> float:
    """eps = rel * (a robust spread of the (n, n) costs ``c``): their std (max-min for constant-ish)."""
    std = float(c.float().std()) if c.numel() > 1 else 0.0
    if not np.isfinite(std) or std <= 0:
        spread = float(c.max() - c.min()) if c.numel() else 0.0
        std = spread if spread > 0 else 1.0
    return rel * std


def dual_gap(c64: np.ndarray, g: np.ndarray, objective_min: float) -> float:
    """objective - (sum u + sum v) for the feasible duals v = g (n,), u_i = min_j (C_ij - v_j); C (n, n)."""
    u = (c64 - g[None, :]).min(axis=1)
    return max(0.0, float(objective_min - (u.sum() + g.sum())))


def solve_sinkhorn(
    cost: Array,
    maximize: bool = True,
    *,
    eps_rel: float = 0.02,
    n_iters: int = 50,
    rounding: str = "exact",
) -> Assignment:
    """Entropic Sinkhorn per (n, n) slice of a (b, n, n) cost, rounded to a permutation.

    rounding: "exact" (scipy on the reduced cost ``C - f - g``: the optimal permutation for
    C itself, since row/column shifts do not change the argmin — use to study the bound), or
    "greedy" (largest plan entry first; O(n^2 log n), a true heuristic).
    """
    if rounding not in ("exact", "greedy"):
        raise ValueError(f"rounding must be 'exact' or 'greedy', got {rounding!r}")
    t = torch.as_tensor(cost).detach()
    sign = -1.0 if maximize else 1.0

    def one(k: int) -> OneSolve:
        c = sign * t[k].float()
        f, g, it = log_sinkhorn(c, default_eps(c, eps_rel), n_iters, 0.0)
        red = (c - f[:, None] - g[None, :]).cpu().numpy().astype(np.float64)
        cols = linear_sum_assignment(red)[1] if rounding == "exact" else _greedy(red)
        c64 = sign * t[k].cpu().double().numpy()
        gap = dual_gap(c64, g.cpu().double().numpy(), float(c64[np.arange(len(cols)), cols].sum()))
        return cols, gap, {"iters": it, "gaps": gap}

    return solve_each(cost, "sinkhorn", one, certified=False, trivial={"iters": 0, "gaps": 0.0},
                      summarize=lambda per: {**per_key_lists(per), "rounding": rounding})


def _greedy(red: np.ndarray) -> np.ndarray:
    """Greedy rounding of an (n, n) reduced cost: edges by increasing value, skipping used rows/columns; perm (n,)."""
    n = red.shape[0]
    order = np.argsort(red, axis=None, kind="stable")
    perm = -np.ones(n, dtype=np.int64)
    used = np.zeros(n, dtype=bool)
    left = n
    for e in order:
        i, j = divmod(int(e), n)
        if perm[i] < 0 and not used[j]:
            perm[i] = j
            used[j] = True
            left -= 1
            if left == 0:
                break
    return perm
