"""``sinkhorn`` backend and the log-domain Sinkhorn dispatch shared with ``certified``.

Math (minimisation; maximisation solves ``-C``): entropic assignment with unit marginals,

    f_i = -eps * log sum_j exp((g_j - C_ij) / eps)
    g_j = -eps * log sum_i exp((f_i - C_ij) / eps)

(the math of ``rebasin_kernels.sinkhorn.sinkhorn_reference``). The plan ``P_ij = exp((f_i + g_j - C_ij)/eps)``
is rounded to a permutation exactly (scipy on ``-log P``, i.e. on the reduced cost, restricted
to nothing: dense) or greedily. Approximate: certified=False.

Gap bound: any (u, v) with ``u_i + v_j <= C_ij`` for all i, j bounds the optimum from below by
``sum u + sum v`` (LP weak duality). We make the Sinkhorn duals feasible with ``v = g``,
``u_i = min_j (C_ij - v_j)`` and report ``gap = objective - (sum u + sum v)`` (>= true gap).

``log_sinkhorn(cost, eps, n_iters)`` is the dispatch point: on CUDA ``rebasin_kernels.sinkhorn.log_sinkhorn``
(the Triton kernel when usable), otherwise a chunked, clamped float32 torch implementation (torch's CPU ``logsumexp`` is ~10x slower when
terms underflow to denormals; we clamp exponents at -60 and work on cache-sized row blocks).
"""
from __future__ import annotations

import numpy as np
import torch
from rebasin_kernels.sinkhorn import log_sinkhorn as kernel_log_sinkhorn
from scipy.optimize import linear_sum_assignment

from rebasin.solvers._common import Array, Assignment, make_result

_CLAMP = -60.0


def _half_step(s: torch.Tensor, other: torch.Tensor, out: torch.Tensor, chunk: int) -> None:
    """out_i = -log sum_j exp(other_j - s_ij), rows of s in blocks of ``chunk`` (all in eps units)."""
    n = s.shape[0]
    for lo in range(0, n, chunk):
        blk = torch.sub(other[None, :], s[lo:lo + chunk])
        m = blk.amax(dim=1)
        blk.sub_(m[:, None]).clamp_(min=_CLAMP).exp_()
        out[lo:lo + chunk] = -(m + blk.sum(dim=1).log_())


def sinkhorn_torch(
    cost: torch.Tensor,
    eps: float,
    n_iters: int,
    *,
    cost_t: torch.Tensor | None = None,
    g0: torch.Tensor | None = None,
    tol: float = 0.0,
    chunk: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Log-domain Sinkhorn on one (n, n) cost to minimise; returns float32 (f, g, iters).

    ``cost_t`` may pass a contiguous transpose (reused by the caller); ``g0`` warm-starts g.
    Stops early when the largest column-marginal error is below ``tol`` (checked for free
    after each g-update: it is exactly ``max_j |sum_i P_ij - 1|`` before that update).
    """
    c = cost.float()
    n = c.shape[0]
    if chunk is None:
        chunk = max(8, min(256, (1 << 19) // max(n, 1)))
    s = c / eps
    st = (cost_t.float() / eps) if cost_t is not None else s.T.contiguous()
    fs = torch.empty(n, dtype=torch.float32, device=c.device)
    gs = (g0.float() / eps).clone() if g0 is not None else torch.zeros(n, dtype=torch.float32, device=c.device)
    it = 0
    for it in range(1, n_iters + 1):
        _half_step(s, gs, fs, chunk)
        g_old = gs.clone()
        _half_step(st, fs, gs, chunk)
        if tol > 0 and float((gs - g_old).abs().max()) < tol:
            break
    return fs * eps, gs * eps, it


def log_sinkhorn(cost: torch.Tensor, eps: float, n_iters: int, **kw) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Dispatch: (n, n) cost to minimise -> float32 duals (f, g) and iterations run.

    CUDA: ``rebasin_kernels.sinkhorn.log_sinkhorn`` (the fused Triton kernel when usable, else the plain
    reference: torch's GPU logsumexp is fine). CPU: the chunked implementation above.
    """
    if cost.is_cuda:
        f, g, it = kernel_log_sinkhorn(cost[None].float(), eps, n_iters, tol=0.0)
        return f[0], g[0], int(it)
    return sinkhorn_torch(cost, eps, n_iters, **kw)


def default_eps(c: torch.Tensor, rel: float) -> float:
    """eps = rel * (a robust spread of the costs): the std of C (max-min for constant-ish)."""
    std = float(c.float().std()) if c.numel() > 1 else 0.0
    if not np.isfinite(std) or std <= 0:
        spread = float(c.max() - c.min()) if c.numel() else 0.0
        std = spread if spread > 0 else 1.0
    return rel * std


def dual_gap(c64: np.ndarray, g: np.ndarray, objective_min: float) -> float:
    """objective - (sum u + sum v) for the feasible duals v = g, u_i = min_j (C_ij - v_j)."""
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
    t = cost if isinstance(cost, torch.Tensor) else torch.from_numpy(np.asarray(cost))
    b, n = t.shape[0], t.shape[1]
    perm = np.empty((b, n), dtype=np.int64)
    gaps, iters = [], []
    for k in range(b):
        c = t[k].detach().float()
        if maximize:
            c = -c
        if n <= 1:
            perm[k] = np.arange(n)
            gaps.append(0.0)
            iters.append(0)
            continue
        eps = default_eps(c, eps_rel)
        f, g, it = log_sinkhorn(c, eps, n_iters)
        iters.append(it)
        red = (c - f[:, None] - g[None, :]).cpu().numpy().astype(np.float64)
        if rounding == "exact":
            _, cols = linear_sum_assignment(red)
        elif rounding == "greedy":
            cols = _greedy(red)
        else:
            raise ValueError(f"rounding must be 'exact' or 'greedy', got {rounding!r}")
        perm[k] = cols
        c64 = t[k].detach().cpu().double().numpy()
        if maximize:
            c64 = -c64
        obj = float(c64[np.arange(n), cols].sum())
        gaps.append(dual_gap(c64, g.cpu().double().numpy(), obj))
    return make_result(cost, perm, "sinkhorn", certified=False, gap=max(gaps) if gaps else 0.0,
                       stats={"iters": iters, "gaps": gaps, "rounding": rounding})


def _greedy(red: np.ndarray) -> np.ndarray:
    """Greedy rounding: take edges by increasing reduced cost, skipping used rows/columns."""
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
