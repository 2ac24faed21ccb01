"""Batched exact linear assignment for many small problems (all heads of a model in one launch).

Algorithm: Hungarian method in its shortest-augmenting-path form (Jonker–Volgenant /
Kuhn–Munkres with potentials, the O(n^3) "e-maxx" formulation). Rows are inserted one at a
time; each insertion runs a Dijkstra-like search over columns on reduced costs
``C - u - v`` (kept >= 0) until it reaches a free column, then flips the path. The
potentials are started from a column reduction (``v_j = min_i C_ij``, ``u = 0``).

Triton: ONE program per problem; the program holds length-BLOCK vectors (potentials,
matching, Dijkstra labels) and re-reads one cost row per search step from global memory
(cache-resident), so n is not limited by registers; data-dependent ``while`` loops drive
the search. Each search step marks one more column as visited and always picks an
unvisited column, so every search ends at a free column within n steps whatever the
numbers are (NaN included): the result is a permutation by construction, and the wrapper
checks it anyway and fails loudly if it were not.

Duals. ``batched_lap`` returns ``(perm, u, v)``:

- minimisation (``maximize=False``): ``C[i, j] - u[i] - v[j] >= 0`` for all i, j, and
  ``= 0`` on ``j = perm[i]`` (up to float rounding);
- maximisation (``maximize=True``):  ``u[i] + v[j] - C[i, j] >= 0``, ``= 0`` on the assignment.

So ``sum(u) + sum(v)`` equals the optimal objective and certifies it.

Precision: the kernel works in fp32. Each row is shifted by its minimum (in the input's
dtype, fp64 stays fp64 for that step) before the cast; the shift is added back into ``u``.
"""
from __future__ import annotations

import numpy as np
import torch

from .backend import pick_backend, triton_usable

try:  # optional: the reference path must work without triton
    import triton
    import triton.language as tl
except Exception:
    triton = None
    tl = None


def _check_input(cost: torch.Tensor) -> torch.Tensor:
    if cost.dim() == 2:
        cost = cost.unsqueeze(0)
    if cost.dim() != 3 or cost.shape[1] != cost.shape[2]:
        raise ValueError(f"batched_lap: cost must be (b, n, n), got {tuple(cost.shape)}")
    if not cost.is_floating_point():
        cost = cost.float()
    if cost.numel() and not bool(torch.isfinite(cost).all()):
        bad = torch.nonzero(~torch.isfinite(cost).reshape(cost.shape[0], -1).all(dim=1)).flatten()
        raise ValueError(f"batched_lap: cost has NaN/Inf in problem(s) {bad[:10].tolist()}")
    return cost


def _dual_dtype(cost: torch.Tensor) -> torch.dtype:
    return torch.float64 if cost.dtype == torch.float64 else torch.float32


def column_hits(perm: torch.Tensor | np.ndarray) -> torch.Tensor | np.ndarray:
    """How many rows of each problem chose column j: (b, n) int64 counts of a (b, n) ``perm`` in 0..n-1.

    numpy in, numpy out (a bincount); a tensor stays on its device (a scatter-add).
    """
    b, n = perm.shape
    if isinstance(perm, np.ndarray):
        flat = (perm + (np.arange(b) * n)[:, None]).ravel()
        return np.bincount(flat, minlength=b * n).reshape(b, n)
    hits = torch.zeros(b, n, dtype=torch.int64, device=perm.device)
    return hits.scatter_add_(1, perm.long(), torch.ones_like(perm, dtype=torch.int64))


def check_permutations(perm: torch.Tensor | np.ndarray) -> bool:
    """True when every row of ``perm`` (b, n) is a permutation of 0..n-1."""
    if perm.size == 0 if isinstance(perm, np.ndarray) else perm.numel() == 0:
        return True
    n = perm.shape[1]
    if isinstance(perm, torch.Tensor) and perm.device.type == "cpu":  # numpy: cheap for small solves
        perm = perm.numpy()
    if isinstance(perm, np.ndarray):  # in range, then b*n values in b*n slots: all hit once iff none twice
        if perm.min() < 0 or perm.max() >= n:
            return False
        return int(column_hits(perm).max()) == 1
    if bool(perm.min() < 0) or bool(perm.max() >= n):
        return False
    return bool((column_hits(perm) == 1).all())


# --------------------------------------------------------------------------------------
# reference: scipy per problem + duals by Bellman–Ford (vectorised over the batch, fp64)
# --------------------------------------------------------------------------------------
def _duals_from_assignment(c: torch.Tensor, perm: torch.Tensor, max_rounds: int | None = None):
    """Dual potentials of an optimal assignment of the *minimisation* problem ``c`` (b, n, n) fp64.

    With ``sigma = perm``: u_i + v_j <= c_ij and equality on (i, sigma(i)) is the system of
    difference constraints v_j - v_sigma(i) <= c_ij - c_i,sigma(i); its shortest-path
    solution (Bellman–Ford from a virtual source) exists iff the assignment is optimal.
    """
    b, n, _ = c.shape
    rows = torch.arange(n, device=c.device)
    inv = torch.empty_like(perm)
    inv.scatter_(1, perm, rows.expand(b, n).contiguous())
    matched = c.gather(2, perm.unsqueeze(2)).squeeze(2)  # c_i,sigma(i)
    # W[k, j] = c[inv(k), j] - c[inv(k), k]: edge from column k to column j
    c_by_col = c.gather(1, inv.unsqueeze(2).expand(b, n, n))
    w = c_by_col - matched.gather(1, inv).unsqueeze(2)
    d = torch.zeros(b, n, dtype=c.dtype, device=c.device)
    scale = float(c.abs().max()) if c.numel() else 1.0
    for _ in range(max_rounds or n + 1):
        d_new = torch.minimum(d, (d.unsqueeze(2) + w).min(dim=1).values)
        if bool(((d - d_new) <= 1e-13 * max(scale, 1.0)).all()):
            d = d_new
            break
        d = d_new
    v = d
    u = matched - v.gather(1, perm)
    return u, v


def batched_lap_reference(
    cost: torch.Tensor, maximize: bool = True
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Exact assignment per problem with ``scipy.optimize.linear_sum_assignment``, plus duals.

    Arguments and returns as :func:`batched_lap` (without ``backend``): ``perm`` (b, n) int64
    with ``perm[k, i]`` the column of row i, and potentials ``u`` (b, n), ``v`` (b, n)
    (conventions in the module docstring).
    """
    from scipy.optimize import linear_sum_assignment

    squeeze = cost.dim() == 2
    c = _check_input(cost)
    b, n, _ = c.shape
    dev = c.device
    c64 = c.detach().to("cpu", torch.float64)
    arr = c64.numpy()
    perm = np.empty((b, n), dtype=np.int64)
    for k in range(b):
        _, cols = linear_sum_assignment(arr[k], maximize=maximize)
        perm[k] = cols
    perm_t = torch.from_numpy(perm)
    sign = -1.0 if maximize else 1.0
    u, v = _duals_from_assignment(sign * c64, perm_t)
    u, v = sign * u, sign * v
    dt = _dual_dtype(c)
    out = perm_t.to(dev), u.to(dev, dt), v.to(dev, dt)
    if squeeze:
        return out[0][0], out[1][0], out[2][0]
    return out


# --------------------------------------------------------------------------------------
# Triton kernel
# --------------------------------------------------------------------------------------
if triton is not None:

    @triton.jit
    def _lap_kernel(
        c_ptr, perm_ptr, u_ptr, v_ptr,
        N, stride_cb, stride_ci, stride_cj,
        SIGN: tl.constexpr, BLOCK: tl.constexpr,
    ):
        pid = tl.program_id(0).to(tl.int64)
        offs = tl.arange(0, BLOCK)
        valid = offs < N
        base = c_ptr + pid * stride_cb
        col_off = offs.to(tl.int64) * stride_cj
        INF = float("inf")

        # feasible start: v_j = min_i C_ij, u = 0
        v = tl.full((BLOCK,), INF, tl.float32)
        for r in range(0, N):
            crow = tl.load(base + r * stride_ci + col_off, mask=valid, other=0.0).to(tl.float32) * SIGN
            v = tl.minimum(v, crow)
        v = tl.where(valid, v, 0.0)
        u = tl.zeros((BLOCK,), dtype=tl.float32)
        p = tl.full((BLOCK,), -1, tl.int32)  # p[j] = row matched to column j, -1 = free

        for i in range(0, N):
            # --- Dijkstra over columns from row i (virtual start column = -1) ---
            minv = tl.full((BLOCK,), INF, tl.float32)
            way = tl.full((BLOCK,), -1, tl.int32)
            used = offs >= N  # padding columns are never candidates
            row_used = offs == i
            i0 = i + tl.zeros((), tl.int32)
            j0 = tl.full((), -1, tl.int32)
            j1 = tl.zeros((), tl.int32)
            searching = tl.full((), 1, tl.int32)
            steps = tl.zeros((), tl.int32)
            while (searching != 0) & (steps <= N):
                crow = tl.load(base + i0 * stride_ci + col_off, mask=valid, other=0.0).to(tl.float32) * SIGN
                u_i0 = tl.sum(tl.where(offs == i0, u, 0.0), axis=0)
                cur = crow - u_i0 - v
                better = (~used) & (cur < minv)
                minv = tl.where(better, cur, minv)
                way = tl.where(better, j0, way)
                cand = tl.where(used, INF, minv)
                delta = tl.min(cand, axis=0)
                j1 = tl.min(tl.where((~used) & (cand == delta), offs, BLOCK), axis=0)
                # only if the labels were NaN: take any unvisited column (progress is guaranteed)
                nan_labels = j1 >= BLOCK
                j1 = tl.where(nan_labels, tl.min(tl.where(~used, offs, BLOCK), axis=0), j1)
                delta = tl.where(nan_labels, 0.0, delta)
                u = tl.where(row_used, u + delta, u)
                v = tl.where(used, v - delta, v)
                minv = tl.where(used, minv, minv - delta)
                hit = offs == j1
                used = used | hit
                pj1 = tl.sum(tl.where(hit, p, 0), axis=0)
                # branch-free: a free column ends the search, a matched one extends the tree
                free = pj1 < 0
                searching = tl.where(free, 0, 1)
                row_used = row_used | (offs == pj1)  # pj1 = -1 matches nothing
                i0 = tl.where(free, i0, pj1)
                j0 = tl.where(free, j0, j1)
                steps += 1
            # --- flip the augmenting path ending at the free column j1 ---
            j = j1
            flips = tl.zeros((), tl.int32)
            while (j >= 0) & (flips <= N):
                wj = tl.sum(tl.where(offs == j, way, 0), axis=0)
                pw = tl.where(wj < 0, i, tl.sum(tl.where(offs == wj, p, 0), axis=0))
                p = tl.where(offs == j, pw, p)
                j = wj
                flips += 1

        # perm[row] = column: scatter through the matching
        tl.store(perm_ptr + pid * N + p, offs.to(tl.int64), mask=valid & (p >= 0))
        tl.store(u_ptr + pid * N + offs, u * SIGN, mask=valid)
        tl.store(v_ptr + pid * N + offs, v * SIGN, mask=valid)


def batched_lap_triton(
    cost: torch.Tensor, maximize: bool = True
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Triton version of :func:`batched_lap_reference`: one program per problem, fp32 inside."""
    if triton is None:
        raise RuntimeError("batched_lap_triton: triton is not installed")
    squeeze = cost.dim() == 2
    c = _check_input(cost)
    if not triton_usable(c.device):
        raise RuntimeError(f"batched_lap_triton: triton cannot run on {c.device}")
    b, n, _ = c.shape
    dt = _dual_dtype(c)
    if b == 0 or n == 0:
        e = torch.zeros(b, n, dtype=dt, device=c.device)
        out = torch.zeros(b, n, dtype=torch.int64, device=c.device), e, e.clone()
    else:
        # shift rows by their best entry (exact in the input dtype), then fp32 for the kernel
        shift = c.max(dim=2).values if maximize else c.min(dim=2).values
        c32 = (c - shift.unsqueeze(2)).float()
        perm = torch.full((b, n), -1, dtype=torch.int64, device=c.device)
        u = torch.empty(b, n, dtype=torch.float32, device=c.device)
        v = torch.empty(b, n, dtype=torch.float32, device=c.device)
        block = max(triton.next_power_of_2(n), 16)
        warps = 1 if block <= 256 else 4
        _lap_kernel[(b,)](
            c32, perm, u, v, n, c32.stride(0), c32.stride(1), c32.stride(2),
            SIGN=-1.0 if maximize else 1.0, BLOCK=block, num_warps=warps,
        )
        if not check_permutations(perm):  # impossible by construction; never return garbage
            raise RuntimeError("batched_lap_triton: kernel returned a non-permutation")
        u = u.to(dt) + shift.to(dt)
        out = perm, u, v.to(dt)
    if squeeze:
        return out[0][0], out[1][0], out[2][0]
    return out


def batched_lap(
    cost: torch.Tensor, maximize: bool = True, backend: str = "auto"
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Solve ``b`` independent n x n assignment problems exactly.

    Args:
        cost: (b, n, n) (or (n, n)) finite costs; NaN/Inf raise ``ValueError``.
        maximize: maximise ``sum_i C[i, perm[i]]`` (default) instead of minimising it.
        backend: "auto" (Triton on CUDA when usable, else the scipy reference), "triton", "torch".

    Returns:
        perm (b, n) int64 — ``perm[k, i]`` is the column of row i, always a permutation;
        u (b, n), v (b, n) — dual potentials (float32, float64 for float64 costs) certifying
        optimality, conventions in the module docstring.
    """
    fn = batched_lap_triton if pick_backend(backend, cost.device) == "triton" else batched_lap_reference
    return fn(cost, maximize)


def assignment_objective(cost: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
    """``sum_i cost[k, i, perm[k, i]]`` per problem, in float64."""
    c = cost.unsqueeze(0) if cost.dim() == 2 else cost
    p = perm.unsqueeze(0) if perm.dim() == 1 else perm
    obj = c.gather(2, p.to(c.device, torch.int64).unsqueeze(2)).squeeze(2).double().sum(dim=1)
    return obj[0] if cost.dim() == 2 else obj
