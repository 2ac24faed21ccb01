"""``certified`` backend: Sinkhorn -> sparse exact -> dual certificate over all n^2 edges.

Problem (minimisation; maximisation solves ``-C``):  min_perm sum_i C[i, perm[i]],
with LP dual  max sum_i u_i + sum_j v_j  s.t.  u_i + v_j <= C_ij.

Algorithm for one (n, n) cost (docs/design.md, Certified sparse-exact):

1. approximate duals (f, g): ``sinkhorn_iters`` log-domain Sinkhorn iterations
   (``rebasin_kernels.sinkhorn.log_sinkhorn``, float32; the Triton kernel on CUDA), or with
   ``sinkhorn_iters=0`` (the default) the plain reductions ``g_j = min_i C_ij``,
   ``f_i = min_j (C_ij - g_j)``. Measured on 2 CPU cores, n = 4096..8192: 3-10 Sinkhorn
   iterations cost 0.2-1.8 s and did not reduce the total (weak: same or 1 fewer certificate
   round; uniform: 4-5 rounds instead of 1), so reductions are the CPU default; on GPU, where
   Sinkhorn is cheap, pass ``sinkhorn_iters``;
2. candidate edges E: the k smallest reduced costs ``C_ij - f_i - g_j`` of every row and of every
   column;
3. the assignment restricted to E is solved exactly with
   ``scipy.sparse.csgraph.min_weight_full_bipartite_matching`` (weights shifted to be strictly
   positive: that routine drops explicit zeros); no perfect matching inside E -> k doubles;
4. exact float64 duals of that sparse optimum m: the column potentials v solve the difference
   constraints ``v_j - v_{m(i)} <= C_ij - C_{i,m(i)}`` for (i, j) in E — shortest paths in the
   column graph, found by vectorised Bellman-Ford rounds warm-started from the previous v
   (no negative cycle exists because m is optimal on E); ``u_i = C_{i,m(i)} - v_{m(i)}``;
5. certificate: the reduced costs ``R = C - u - v`` of ALL n^2 edges, dense, in row chunks, on
   the tensor's device. ``R >= -tol`` everywhere (tol = ``tol_rel * max|C|``) proves
   ``sum_i C[i, p(i)] >= sum u + sum v + sum_i min_j R_ij`` for every permutation p, while
   m attains ``sum u + sum v``: m is optimal up to ``gap = -sum_i min(0, min_j R_ij)``
   (reported; 0.0 when no reduced cost is negative). Otherwise the ``add_per_row`` most negative
   edges of each violating row join E and we go back to 3.

The check is float32-first but safe: R is computed in float32 and every row whose float32
minimum is below a margin that bounds the float32 rounding error is recomputed in float64;
only float64 values decide certification. After ``max_rounds`` rounds we fall back to the
dense JV solve (stats["fallback"]; scipy without laprust or lapx).

On CPU with the C extension (``_certified_native``, the default there) the same steps run as C
passes, single-threaded: reductions and top-k in two streaming passes, the sparse optimum by a
warm-started Dijkstra whose potentials are the exact duals (no Bellman-Ford), and a float64
certificate that after the first round rechecks only the rows whose u_i grew (see there).
Measured on 2 loaded CPU cores, 1 thread, CPU seconds torch path -> C: weak n = 4096
1.28 -> 0.24, n = 8192 5.4 -> 0.73 (laprust's dense JV: 0.63, 4.0).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import scipy.sparse as sp
import torch
from rebasin_kernels.sinkhorn import log_sinkhorn
from scipy.optimize import linear_sum_assignment
from scipy.sparse.csgraph import min_weight_full_bipartite_matching

from rebasin.solvers import native as _native
from rebasin.solvers._common import Array, Assignment, OneSolve, solve_each
from rebasin.solvers.sinkhorn_backend import default_eps


def _topk_edges(red: torch.Tensor, red_t: torch.Tensor | None, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(rows, cols) of the k smallest entries of every row of red and of every column (via red_t)."""
    n = red.shape[0]
    k = min(k, n)
    cols = torch.topk(red, k, dim=1, largest=False, sorted=False).indices
    rows = torch.arange(n, device=red.device)[:, None].expand(n, k)
    ei = [rows.reshape(-1), ]
    ej = [cols.reshape(-1), ]
    if red_t is not None:
        rws = torch.topk(red_t, k, dim=1, largest=False, sorted=False).indices
        ei.append(rws.reshape(-1))
        ej.append(torch.arange(n, device=red.device)[:, None].expand(n, k).reshape(-1))
    return torch.cat(ei).cpu().numpy(), torch.cat(ej).cpu().numpy()


def _reduced(c32: torch.Tensor, f: torch.Tensor, g: torch.Tensor, delta: float, seed: int = 0):
    """Reduced costs ``C - f - g`` (and transposed) plus a tie-breaking jitter
    ``delta * frac(a_i + b_j)`` (a, b uniform random): with massively tied costs (integers,
    constants) plain top-k picks the same low-index columns in every row and the candidate graph
    has no perfect matching; the jitter spreads the picks. It only affects which edges are
    *candidates*, never the solution's exactness."""
    n = c32.shape[0]
    gen = torch.Generator().manual_seed(seed)
    a = torch.rand(n, generator=gen).to(c32.device)
    b = torch.rand(n, generator=gen).to(c32.device)
    red = c32 - f[:, None]
    red.sub_(g[None, :])
    if delta > 0:
        red.add_(torch.add(a[:, None], b[None, :]).frac_().mul_(delta))
    return red, red.T.contiguous()


def _reduced_candidates(c32: torch.Tensor, k: int, chunk: int = 512
                        ) -> tuple[torch.Tensor, torch.Tensor, np.ndarray, np.ndarray]:
    """Row/column reductions and the top-k candidate edges in one chunked pass.

    ``g_j = min_i C_ij``, ``f_i = min_j (C_ij - g_j)``; candidates are the k smallest reduced
    costs ``C_ij - f_i - g_j`` of every row and of every column (columns merged across row
    chunks). Streaming row blocks through one reused buffer avoids allocating n² temporaries,
    which dominates the time on CPU.
    """
    n = c32.shape[0]
    k = min(k, n)
    g = c32.amin(dim=0)
    f = torch.empty(n, dtype=c32.dtype, device=c32.device)
    rows_k = torch.empty(n, k, dtype=torch.long, device=c32.device)
    col_v = torch.full((k, n), float("inf"), dtype=c32.dtype, device=c32.device)
    col_i = torch.zeros(k, n, dtype=torch.long, device=c32.device)
    buf = torch.empty(min(chunk, n), n, dtype=c32.dtype, device=c32.device)
    for lo in range(0, n, chunk):
        hi = min(n, lo + chunk)
        blk = buf[: hi - lo]
        torch.sub(c32[lo:hi], g[None, :], out=blk)
        fc = blk.amin(dim=1)
        blk.sub_(fc[:, None])
        f[lo:hi] = fc
        rows_k[lo:hi] = torch.topk(blk, k, dim=1, largest=False, sorted=False).indices
        kk = min(k, hi - lo)
        v, i = torch.topk(blk.T.contiguous(), kk, dim=1, largest=False, sorted=False)
        allv, alli = torch.cat([col_v, v.T]), torch.cat([col_i, i.T + lo])
        col_v, sel = torch.topk(allv, k, dim=0, largest=False, sorted=False)
        col_i = torch.gather(alli, 0, sel)
    ar = torch.arange(n, device=c32.device)
    ei = torch.cat([ar[:, None].expand(n, k).reshape(-1), col_i.reshape(-1)])
    ej = torch.cat([rows_k.reshape(-1), ar[None, :].expand(k, n).reshape(-1)])
    return f, g, ei.cpu().numpy(), ej.cpu().numpy()


def sparse_assignment(n: int, ei: np.ndarray, ej: np.ndarray, w: np.ndarray) -> np.ndarray | None:
    """Min-cost perfect matching on edges (ei, ej, w) (deduplicated); perm or None if none exists."""
    shift = float(w.min()) if w.size else 0.0
    scale = max(1.0, float(np.abs(w).max())) if w.size else 1.0
    wp = (w - shift) + scale  # strictly positive: the routine drops explicit zeros
    g = sp.csr_matrix((wp, (ei, ej)), shape=(n, n))
    try:
        r, c = min_weight_full_bipartite_matching(g)
    except ValueError:
        return None
    perm = np.empty(n, dtype=np.int64)
    perm[r] = c
    return perm


def sparse_duals(
    n: int, ei: np.ndarray, ej: np.ndarray, w: np.ndarray, perm: np.ndarray, v0: np.ndarray, max_rounds: int
) -> tuple[np.ndarray, np.ndarray, int]:
    """Float64 LP duals (u, v) of the optimal matching ``perm`` on edges (ei, ej, w).

    Bellman-Ford on the column graph: edge m(i) -> j with length w_ij - w_{i,m(i)}; v starts at
    ``v0`` and relaxes ``v_j = min(v_j, v_{m(i)} + len)`` (Jacobi rounds, segment-min by target
    column) until nothing changes. Returns (u, v, rounds); raises RuntimeError if it does not
    settle within ``max_rounds`` (a negative cycle: ``perm`` was not optimal on the edges).
    """
    wm = np.empty(n, dtype=np.float64)
    on = ej == perm[ei]
    wm[ei[on]] = w[on]
    src = perm[ei]  # column m(i)
    length = w - wm[ei]
    keep = ~on
    src, dst, length = src[keep], ej[keep], length[keep]
    order = np.argsort(dst, kind="stable")
    src, dst, length = src[order], dst[order], length[order]
    starts = np.flatnonzero(np.r_[True, dst[1:] != dst[:-1]]) if dst.size else np.zeros(0, dtype=np.int64)
    targets = dst[starts]
    v = v0.astype(np.float64).copy()
    rounds = 0
    if dst.size:
        while True:
            rounds += 1
            cand = v[src] + length
            best = np.minimum.reduceat(cand, starts)
            cur = v[targets]
            better = best < cur
            if not better.any():
                break
            v[targets[better]] = best[better]
            if rounds > max_rounds:
                raise RuntimeError("dual Bellman-Ford did not settle (negative cycle)")
    u = wm - v[perm]
    return u, v, rounds


_PAIR_CAP = 16  # a suspect row with more near entries than this is recomputed whole in float64


@dataclass
class _Tally:
    """Running result of the dense certificate over the rows checked so far.

    rmin: the smallest float64 reduced cost seen (0.0 when none is negative); gap: the gap term
    ``-sum_i min(0, min_j R_ij)``; rows, cols: the violating edges (R_ij < -tol), in pieces.
    """

    rmin: float = 0.0
    gap: float = 0.0
    rows: list[np.ndarray] = field(default_factory=list)
    cols: list[np.ndarray] = field(default_factory=list)

    def add_row_minima(self, m: torch.Tensor) -> None:
        """Account float64 row minima of R, m (r,) (rows not examined may count as 0.0)."""
        self.rmin = min(self.rmin, float(m.min()))
        self.gap += float((-m).clamp(min=0).sum())

    def add_violations(self, rows: torch.Tensor, cols: torch.Tensor) -> None:
        """Record violating edges: rows (e,), cols (e,) int64."""
        self.rows.append(rows.cpu().numpy())
        self.cols.append(cols.cpu().numpy())

    def edges(self) -> tuple[np.ndarray, np.ndarray]:
        """All violating edges recorded: rows (e,), cols (e,) int64 numpy."""
        if not self.rows:
            return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
        return np.concatenate(self.rows), np.concatenate(self.cols)


def _screen(c32: torch.Tensor, pm: torch.Tensor, u32: torch.Tensor, v32: torch.Tensor, lo: int, hi: int,
            margin: float) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 screening of rows lo..hi: which are suspects, and which of their entries are near.

    c32 (n, n) float32 costs, pm (n,) int64 the matching, u32, v32 (n,) float32 duals.
    R = C - u - v in float32 with the matched edges masked (+inf); a row is a suspect when its
    minimum is below ``margin``. Returns (suspects (s,) int64 row indices, near (s, n) bool: R < margin).
    """
    blk = torch.sub(c32[lo:hi], v32[None, :])
    blk.sub_(u32[lo:hi, None])
    blk[torch.arange(hi - lo, device=blk.device), pm[lo:hi]] = float("inf")
    s = torch.nonzero(blk.amin(dim=1) < margin).flatten()
    return s + lo, blk[s] < margin


def _recheck_entries(c: torch.Tensor, u64: torch.Tensor, v64: torch.Tensor, rows: torch.Tensor,
                     near: torch.Tensor, tol: float, tally: _Tally) -> None:
    """float64 recheck of the near entries of suspect rows into ``tally``.

    c (n, n) the input costs; u64, v64 (n,) float64 duals; rows (s,) int64 suspect rows; near
    (s, n) bool, their entries to recompute (every other entry is >= margin - error > -tol).
    """
    if not rows.numel():
        return
    rr, cc = torch.nonzero(near, as_tuple=True)
    ri = rows[rr]
    val = c[ri, cc].double() - u64[ri] - v64[cc]
    zeros = torch.zeros(c.shape[0], dtype=torch.float64, device=c.device)
    tally.add_row_minima(zeros.scatter_reduce(0, ri, val, "amin", include_self=True))
    bad = val < -tol
    if bool(bad.any()):
        tally.add_violations(ri[bad], cc[bad])


def _recheck_rows(c: torch.Tensor, u64: torch.Tensor, v64: torch.Tensor, rows: torch.Tensor, tol: float,
                  add: int, chunk: int, tally: _Tally) -> None:
    """float64 recheck of whole rows (those with too many near entries) into ``tally``.

    c (n, n) the input costs; u64, v64 (n,) float64 duals; rows (r,) int64, ``chunk`` at a time.
    The ``add`` (<= n) most negative entries of each violating row below -tol are its violations.
    """
    for lo in range(0, rows.numel(), chunk):
        r = rows[lo:lo + chunk]
        blk = c[r].double()
        blk.sub_(v64[None, :]).sub_(u64[r, None])
        m = blk.amin(dim=1)
        tally.add_row_minima(m)
        viol = torch.nonzero(m < -tol).flatten()
        if viol.numel():
            vals, cols = torch.topk(blk[viol], add, dim=1, largest=False, sorted=False)
            ok = vals < -tol
            tally.add_violations(r[viol][:, None].expand(-1, add)[ok], cols[ok])


def _check(
    c: torch.Tensor, c32: torch.Tensor, perm: np.ndarray, u: np.ndarray, v: np.ndarray, tol: float, add: int, chunk: int
) -> tuple[float, np.ndarray, np.ndarray, float, int]:
    """Dense certificate over all n^2 edges.

    Reduced cost R_ij = C_ij - u_i - v_j (c: the (n, n) input values, float32 or float64; c32:
    the same in float32; perm (n,) the matching; u, v (n,) float64 duals).

    Screening in float32 (matched edges masked): with B = max|C| + max|u| + max|v|, the float32
    value differs from the exact R_ij by at most ~4 roundings of size 2^-24 * B (C to float32,
    u and v to float32, two subtractions); any row whose float32 minimum is below
    ``margin = tol + 8 * 2^-24 * B`` is a *suspect*: its entries below the margin (or, when
    there are more than _PAIR_CAP of them, the whole row) are recomputed in float64 from ``c``.
    Only float64 values decide: a row passes iff its float64 minimum is >= -tol.

    Returns (min float64 reduced cost over suspects (0 if none), violating rows (e,), their
    cols (e,), gap term ``-sum_i min(0, min_j R_ij)``, number of rows recomputed whole).
    """
    n = c.shape[0]
    dev = c.device
    u64, v64 = torch.from_numpy(u).to(dev), torch.from_numpy(v).to(dev)
    u32, v32 = u64.float(), v64.float()
    pm = torch.from_numpy(perm).to(dev)
    bound = float(np.abs(u).max(initial=0) + np.abs(v).max(initial=0)) + max(float(c32.amax()), -float(c32.amin()))
    margin = tol + 8.0 * 2.0**-24 * bound
    tally = _Tally()
    whole = [torch.zeros(0, dtype=torch.int64, device=dev)]
    for lo in range(0, n, chunk):
        rows, near = _screen(c32, pm, u32, v32, lo, min(n, lo + chunk), margin)
        if not rows.numel():
            continue
        few = near.sum(dim=1) <= _PAIR_CAP
        whole.append(rows[~few])
        _recheck_entries(c, u64, v64, rows[few], near[few], tol, tally)
    rows = torch.cat(whole)
    _recheck_rows(c, u64, v64, rows, tol, min(add, n), chunk, tally)
    br, bc = tally.edges()
    return tally.rmin, br, bc, tally.gap, int(rows.numel())


@dataclass(frozen=True)
class _Candidates:
    """The candidate edge set E of one problem: rows ei, cols ej (m,) int64, deduplicated, and
    their float64 costs w (m,) read from ``c`` (n, n), the costs to minimise."""

    c: torch.Tensor
    ei: np.ndarray
    ej: np.ndarray
    w: np.ndarray

    @classmethod
    def of(cls, c: torch.Tensor, ei: np.ndarray, ej: np.ndarray) -> _Candidates:
        """E from edge lists (m,) that may repeat edges."""
        n = c.shape[0]
        key = np.unique(ei.astype(np.int64) * n + ej.astype(np.int64))
        ei, ej = key // n, key % n
        ti, tj = torch.from_numpy(ei).to(c.device), torch.from_numpy(ej).to(c.device)
        return cls(c, ei, ej, c[ti, tj].double().cpu().numpy())

    def plus(self, ei: np.ndarray, ej: np.ndarray) -> _Candidates:
        """E with the edges (ei, ej) (e,) added."""
        return _Candidates.of(self.c, np.r_[self.ei, ei], np.r_[self.ej, ej])


def _minimisation_costs(cost: torch.Tensor, maximize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The (n, n) costs to minimise: c (float32, or float64 when given so; contiguous) and c in float32."""
    c = cost.detach()
    if c.dtype not in (torch.float32, torch.float64):
        c = c.float()
    c = (-c if maximize else c).contiguous()
    return c, c.float()


def _initial_candidates(c32: torch.Tensor, k: int, sinkhorn_iters: int, eps: float, jitter: float
                        ) -> tuple[torch.Tensor, torch.Tensor, np.ndarray, np.ndarray, dict[str, Any]]:
    """Steps 1-2 on the (n, n) float32 costs ``c32``: approximate duals and candidate edges.

    Returns f (n,), g (n,) float32 duals; rows, cols (m,) int64 of the k smallest reduced costs
    of every row and every column (edges may repeat); stats (sinkhorn_iters, eps, t_sinkhorn).
    """
    t0 = time.perf_counter()
    if sinkhorn_iters <= 0 and jitter <= 0:
        f, g, ei, ej = _reduced_candidates(c32, k)
        return f, g, ei, ej, {"sinkhorn_iters": 0, "eps": eps, "t_sinkhorn": 0.0}
    if sinkhorn_iters > 0:
        f, g, it = log_sinkhorn(c32, eps, sinkhorn_iters, 0.0)
    else:
        g = c32.amin(dim=0)
        f = (c32 - g[None, :]).amin(dim=1)
        it = 0
    stats = {"sinkhorn_iters": it, "eps": eps, "t_sinkhorn": time.perf_counter() - t0}
    red, red_t = _reduced(c32, f, g, jitter * eps)
    ei, ej = _topk_edges(red, red_t, k)
    return f, g, ei, ej, stats


def _sparse_optimum(cand: _Candidates, c32: torch.Tensor, f: torch.Tensor, g: torch.Tensor, k: int, delta: float
                    ) -> tuple[np.ndarray, _Candidates, int]:
    """Step 3: the optimal matching on E, widening E until it holds a perfect matching.

    Widening doubles k and adds the k smallest jittered reduced costs ``C - f - g`` (c32 (n, n),
    f, g (n,)) of every row and column. Returns (perm (n,) int64, the candidates, final k).
    """
    n = c32.shape[0]
    perm = sparse_assignment(n, cand.ei, cand.ej, cand.w)
    while perm is None:
        k *= 2
        red, red_t = _reduced(c32, f, g, delta, seed=k)
        cand = cand.plus(*_topk_edges(red, red_t, k))
        perm = sparse_assignment(n, cand.ei, cand.ej, cand.w)
        if k >= n and perm is None:
            raise RuntimeError("no perfect matching on the full edge set (cannot happen)")
    return perm, cand, k


def _stalled(rounds: list[dict[str, Any]], n: int) -> bool:
    """Degenerate duals (massive ties, structured costs): many violating rows and fewer than half
    of them gone since the previous round — the loop converges too slowly."""
    if len(rounds) < 2:
        return False
    vr = rounds[-1]["violating_rows"]
    return vr > max(64, n // 16) and vr > 0.5 * rounds[-2]["violating_rows"]


def _certificate_loop(
    c: torch.Tensor, c32: torch.Tensor, f: torch.Tensor, g: torch.Tensor, cand: _Candidates, *,
    k: int, delta: float, max_rounds: int, add_per_row: int, tol: float, chunk: int,
) -> tuple[np.ndarray | None, float, dict[str, Any]]:
    """Steps 3-5, repeated: sparse optimum, its exact duals, the dense check; violations join E.

    c (n, n) costs to minimise, c32 the same in float32, f, g (n,) float32 approximate duals.
    Returns (perm (n,) int64 certified up to ``gap``, or None when the loop stalled or ran out of
    rounds; gap; stats).
    """
    n = c.shape[0]
    v = g.double().cpu().numpy()
    rounds: list[dict[str, Any]] = []
    t_sparse = t_duals = t_check = 0.0
    perm, gap = None, 0.0
    for rnd in range(1, max_rounds + 1):
        ta = time.perf_counter()
        perm, cand, k = _sparse_optimum(cand, c32, f, g, k, delta)
        tb = time.perf_counter()
        u, v, bf_rounds = sparse_duals(n, cand.ei, cand.ej, cand.w, perm, v, max_rounds=4 * n + 10)
        tc = time.perf_counter()
        # escalate: degenerate (tied, structured) problems need many edges; double the number of
        # edges added per violating row every round (4, 8, 16, ... up to 128)
        rmin, br, bc, gap, n_whole = _check(c, c32, perm, u, v, tol, min(128, add_per_row << (rnd - 1)), chunk)
        t_sparse, t_duals, t_check = t_sparse + tb - ta, t_duals + tc - tb, t_check + time.perf_counter() - tc
        rounds.append({"edges": int(cand.ei.size), "bf_rounds": bf_rounds, "min_reduced": rmin,
                       "violations": int(br.size), "violating_rows": int(np.unique(br).size),
                       "suspect_rows": n_whole})
        if br.size == 0 or _stalled(rounds, n):
            break
        cand = cand.plus(br, bc)
    stats = {"rounds": len(rounds), "round_info": rounds, "t_sparse": t_sparse, "t_duals": t_duals,
             "t_check": t_check, "k_final": k}
    certified = bool(rounds) and rounds[-1]["violations"] == 0
    return (perm if certified else None), gap, stats


def _dense_solve(c: torch.Tensor) -> np.ndarray:
    """Exact dense solve of the (n, n) costs to minimise ``c``: perm (n,) int64.

    The dense JV backend (laprust / lapx's lapjvr, float64 potentials) where installed, else scipy:
    on the degenerate costs that reach this point (the certificate loop stalled) lapjvr was
    measured 0.9-1.2x scipy's time on the adversarial kind and 8-10x faster on the integer kind
    (n = 1024-4096; lapx's older lapjvs had been up to 6x slower than scipy there).
    """
    from rebasin.solvers.auto import dense_backend  # auto imports this module
    from rebasin.solvers.registry import SOLVERS

    name = dense_backend()
    if name == "scipy":
        return np.asarray(linear_sum_assignment(c.double().cpu().numpy())[1], dtype=np.int64)
    return SOLVERS[name].fn(c.detach().cpu()[None], False).perm[0].numpy()


def _native_ok(cost: torch.Tensor, sinkhorn_iters: int, jitter: float) -> bool:
    """Whether the C path applies: a CPU float32/float64 cost, the C extension built, the default
    reduction duals (Sinkhorn duals and jitter are torch-path options)."""
    return (cost.device.type == "cpu" and cost.dtype in (torch.float32, torch.float64) and sinkhorn_iters <= 0
            and jitter <= 0 and _native.native_available())


def _certified_native(cost: torch.Tensor, maximize: bool, *, k: int, max_rounds: int, add_per_row: int,
                      tol_rel: float) -> tuple[np.ndarray, bool, float, dict]:
    """The certified solve on CPU with the C passes (``rebasin.solvers.native``); same steps, three
    changes: maximisation reads ``-C`` on the fly (no negated copy); the sparse optimum is
    warm-started from the previous round and its Dijkstra potentials are the exact duals (no
    Bellman-Ford); the certificate is float64 throughout and, after the first round, rechecks only
    the rows whose ``u_i`` grew (or that violated before): with ``u_i`` not grown and every ``v_j``
    not grown, each ``R_ij = (s C_ij - v_j) - u_i`` can only grow — float subtraction is monotone —
    so a row that passed keeps passing (all rows are rechecked if any ``v_j`` grew).
    Returns (perm (n,), certified, gap, stats) like ``certified_one``."""
    t0 = time.perf_counter()
    c = cost.detach().numpy()
    n = c.shape[0]
    s = -1.0 if maximize else 1.0
    _, g, ei, ej, scale = _native.candidates(c, s, k)
    ar = np.arange(n, dtype=np.int64)
    key = np.unique(np.concatenate([ei * n + ej, ar * (n + 1)]))  # + the identity: a perfect matching exists
    tol = tol_rel * (scale if scale > 0 else 1.0)
    stats: dict[str, Any] = {"n": n, "native": True, "sinkhorn_iters": 0, "t_sinkhorn": 0.0,
                             "t_candidates": time.perf_counter() - t0}
    matcher = _native.SparseMatcher(n, g)
    rowmin = np.zeros(n)
    rows = ar
    u_old = v_old = None
    rounds: list[dict[str, Any]] = []
    t_sparse = t_check = 0.0
    perm = None
    for rnd in range(1, max_rounds + 1):
        ta = time.perf_counter()
        ei, ej = np.divmod(key, n)
        w = c[ei, ej].astype(np.float64)
        if maximize:
            np.negative(w, out=w)
        perm = matcher.solve(ei, ej, w)
        if perm is None:  # cannot happen: the identity's edges are always candidates
            raise RuntimeError("certified: no perfect matching on the candidate edges")
        tb = time.perf_counter()
        u, v = matcher.u, matcher.v
        if u_old is not None:
            rows = ar if bool((v > v_old).any()) else np.flatnonzero((u > u_old) | (rowmin < -tol))
        br, bc, bad = _native.check(c, s, u, v, tol, min(128, add_per_row << (rnd - 1)), rows, rowmin)
        t_sparse, t_check = t_sparse + tb - ta, t_check + time.perf_counter() - tb
        rounds.append({"edges": int(key.size), "checked_rows": int(rows.size),
                       "min_reduced": min(0.0, float(rowmin.min())), "violations": int(br.size),
                       "violating_rows": bad})
        if br.size == 0 or _stalled(rounds, n):
            break
        u_old, v_old = u.copy(), v.copy()
        key = np.union1d(key, br * n + bc)
    gap = float(-np.minimum(rowmin, 0.0).sum())
    stats.update({"rounds": len(rounds), "round_info": rounds, "t_sparse": t_sparse, "t_duals": 0.0,
                  "t_check": t_check, "k_final": k})
    if not rounds or rounds[-1]["violations"]:
        perm, gap = _dense_solve(cost if not maximize else -cost.detach()), 0.0
        stats["fallback"] = "dense JV: certificate loop not converging"
    stats["t_total"] = time.perf_counter() - t0
    return perm, True, gap, stats


def certified_one(
    cost: torch.Tensor,
    maximize: bool,
    *,
    k: int = 8,
    sinkhorn_iters: int = 0,
    eps_rel: float = 0.05,
    max_rounds: int = 12,
    add_per_row: int = 4,
    tol_rel: float = 1e-9,
    jitter: float = 0.0,
    chunk: int | None = None,
    native: bool | None = None,
) -> tuple[np.ndarray, bool, float, dict]:
    """Solve one (n, n) problem; returns (perm (n,) int64, certified, gap, stats).

    The steps of the module docstring; when the certificate loop does not certify, the dense
    JV solve (stats["fallback"]). On CPU with the C extension built (and the default reduction
    duals) the C passes run them (``_certified_native``, stats["native"]); ``native=False`` forces
    the torch path.
    """
    if native is not False and _native_ok(cost, sinkhorn_iters, jitter):
        return _certified_native(cost, maximize, k=k, max_rounds=max_rounds, add_per_row=add_per_row, tol_rel=tol_rel)
    t0 = time.perf_counter()
    n = cost.shape[0]
    c, c32 = _minimisation_costs(cost, maximize)
    eps = default_eps(c32, eps_rel)
    f, g, ei, ej, step1 = _initial_candidates(c32, k, sinkhorn_iters, eps, jitter)
    # the identity's edges guarantee a perfect matching exists inside the candidate set
    # (heavily tied costs can concentrate every row's top-k on a few columns); if the sparse
    # optimum uses a poor identity edge, the certificate finds the better edges next round.
    ar = np.arange(n)
    cand = _Candidates.of(c, np.r_[ei, ar], np.r_[ej, ar])
    stats: dict[str, Any] = {"n": n, **step1, "t_candidates": time.perf_counter() - t0 - step1["t_sinkhorn"]}
    scale = max(float(c.amax()), -float(c.amin()))
    if chunk is None:
        chunk = max(8, min(4096, (1 << 22) // max(n, 1)))
    perm, gap, loop_stats = _certificate_loop(
        c, c32, f, g, cand, k=k, delta=max(jitter, 1e-2) * eps, max_rounds=max_rounds, add_per_row=add_per_row,
        tol=tol_rel * (scale if scale > 0 else 1.0), chunk=chunk)
    stats.update(loop_stats)
    if perm is None:
        perm, gap = _dense_solve(c), 0.0
        stats["fallback"] = "dense JV: certificate loop not converging"
    stats["t_total"] = time.perf_counter() - t0
    return perm, True, gap, stats


def _batch_stats(per_problem: list[dict[str, Any]]) -> dict[str, Any]:
    """One problem's stats as they are; a batch's as {"problems": [...], "rounds": the most rounds}."""
    if len(per_problem) == 1:
        return per_problem[0]
    return {"problems": per_problem, "rounds": max((s.get("rounds", 0) for s in per_problem), default=0)}


def solve_certified(cost: Array, maximize: bool = True, **opts) -> Assignment:
    """Certified-exact solve of each (n, n) slice of a (b, n, n) cost; perm (b, n).

    Options (see ``certified_one``): k, sinkhorn_iters, eps_rel, max_rounds, add_per_row,
    tol_rel, jitter, chunk. Works on CPU and CUDA tensors (dense passes run on the tensor's device).
    """
    t = torch.as_tensor(cost)

    def one(i: int) -> OneSolve:
        perm, _, gap, stats = certified_one(t[i], maximize, **opts)
        return perm, gap, stats

    return solve_each(cost, "certified", one, certified=True, trivial={"n": t.shape[1], "rounds": 0},
                      summarize=_batch_stats)
