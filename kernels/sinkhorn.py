"""Batched log-domain Sinkhorn for square assignment problems.

Math (minimisation, uniform marginals of ones): find potentials ``f, g`` such that the plan

    P_ij = exp((f_i + g_j - C_ij) / eps)

has every row and column summing to 1. Alternating exact updates:

    f_i = -eps * logsumexp_j((g_j - C_ij) / eps)
    g_j = -eps * logsumexp_i((f_i - C_ij) / eps)

As ``eps -> 0`` (``f``, ``g``) tend to optimal duals of the linear assignment problem
``min_perm sum_i C[i, perm[i]]``; ``C - f[:, None] - g[None, :]`` is then a reduced cost
whose small entries mark the likely optimal edges.
"""
from __future__ import annotations

import math

import torch

from .backend import interpret_mode, pick_backend, triton_usable

# Exponents (in eps units, relative to each row's maximum) are clamped here: the dropped terms are
# below e^-60 of the largest, and torch's CPU exp/sum is ~10x slower on the denormals they become.
_CLAMP = -60.0
# entries of C per block of a half-step: cache-sized on CPU, and bounds the temporaries anywhere
_BLOCK_ENTRIES = 1 << 19


def _block_shape(n: int) -> tuple[int, int]:
    """(problems, rows) per block of a half-step over (b, n, n) costs: about _BLOCK_ENTRIES
    entries, whole problems at a time when one fits, else at least 8 rows of one problem."""
    rows = max(8, min(256, _BLOCK_ENTRIES // max(n, 1)))
    if rows < n:
        return 1, rows
    return max(1, _BLOCK_ENTRIES // max(n * n, 1)), n


def _half_step(s: torch.Tensor, other: torch.Tensor, out: torch.Tensor) -> None:
    """One Sinkhorn half-step in eps units: ``out[k, i] = -log sum_j exp(other[k, j] - s[k, i, j])``.

    s: (b, n, n) float32 costs / eps (for the column update, their transpose); other: (b, n)
    float32, the potentials of the other side; out: (b, n) float32, written block by block.
    """
    b, n, _ = s.shape
    probs, rows = _block_shape(n)
    for p0 in range(0, b, probs):
        for r0 in range(0, n, rows):
            blk = torch.sub(other[p0:p0 + probs, None, :], s[p0:p0 + probs, r0:r0 + rows])
            m = blk.amax(dim=2)
            blk.sub_(m[..., None]).clamp_(min=_CLAMP).exp_()
            out[p0:p0 + probs, r0:r0 + rows] = -(m + blk.sum(dim=2).log_())


def sinkhorn_reference(
    cost: torch.Tensor, eps: float, n_iters: int = 100, tol: float = 1e-3
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Torch log-domain Sinkhorn: clamped logsumexp over cache-sized blocks, float32.

    Args:
        cost: (b, n, n) or (n, n) costs to *minimise*; computed in float32.
        eps: entropic regularisation, in the units of ``cost``.
        n_iters: maximum number of (f, g) update pairs.
        tol: stop at the first iterate whose largest row-marginal error
            ``max_i |sum_j P_ij - 1|`` (worst over the batch) is below it; ``tol <= 0`` runs
            ``n_iters`` pairs. The error of iterate t is read off the row update of t + 1
            (``sum_j P_ij = exp((f_t,i - f_t+1,i) / eps)``): no extra pass over C.

    Returns:
        f: (b, n) or (n,) row potentials, float32.
        g: (b, n) or (n,) column potentials, float32.
        iters: the number of update pairs of the returned iterate.
    """
    squeeze = cost.dim() == 2
    c = cost.float().unsqueeze(0) if squeeze else cost.float()
    b, n, m = c.shape
    if n != m:
        raise ValueError(f"sinkhorn needs square costs, got {tuple(cost.shape)}")
    f = torch.zeros(b, n, dtype=torch.float32, device=c.device)
    g = torch.zeros(b, n, dtype=torch.float32, device=c.device)
    it = 0
    if b and n:
        s = c / eps
        st = s.transpose(1, 2).contiguous()
        f_next = torch.empty_like(f)
        for t in range(1, n_iters + 1):
            _half_step(s, g, f_next)
            if t > 1 and tol > 0 and float((f - f_next).exp_().sub_(1).abs_().max()) < tol:
                break
            f, f_next = f_next, f
            _half_step(st, f, g)
            it = t
        f, g = f * eps, g * eps
    if squeeze:
        return f[0], g[0], it
    return f, g, it


# ======================================================================================
# Triton: batched log-domain Sinkhorn
# ======================================================================================
#
# Units. Inside the kernels potentials live in base-2 "eps units": F = f * log2(e) / eps,
# X = -C * log2(e) / eps, so every logsumexp is an exp2/log2 (the fast hardware path):
#
#     F_i = -lse2_j(G_j + X_ij),   G_j = -lse2_i(F_i + X_ij),   f = F * eps * ln 2.
#
# Free convergence check. After an update pair (F_t, G_t) the row marginal is
# r_i = sum_j 2^(F_t,i + G_t,j + X_ij) = 2^(F_t,i - F_t+1,i): the *next* row update
# yields it at no extra pass over the n x n tile (sinkhorn_reference reads it the same way,
# in base e). So the error of iterate t, max_i |r_i - 1|, is known during iteration t+1;
# when it is below ``tol`` iterate t is returned, exactly as the reference would.
# The error of the last iterate is never needed: at n_iters both stop anyway.
#
# Stopping is per problem: each problem of a batch stops at its own first iterate below
# ``tol`` (the reference stops the whole batch together, when the worst problem is below
# ``tol``). Every returned problem therefore meets the reference's criterion; ``iters`` is
# the largest per-problem count, which equals the reference's whenever the error decreases
# monotonically. With ``tol <= 0`` both run exactly ``n_iters`` and agree to rounding.
#
# Small n (<= SMALL_MAX = 128): one program per problem, the n x n tile is loaded once and
# stays in registers for all iterations, with a data-dependent while loop (no host syncs).
# Larger n: per iteration one row pass (program per (problem, row-block), online max /
# sum-exp over column tiles) and one column pass (program per (problem, column-block));
# the host looks at the per-iterate errors every ``check_every`` iterations (one sync
# each), and ring buffers of the last check_every+1 iterates let it return exactly the
# first converged iterate of each problem; converged problems are skipped by later passes.

try:  # optional: sinkhorn_reference must work without triton
    import triton
    import triton.language as tl
except Exception:
    triton = None
    tl = None

LOG2E = 1.0 / math.log(2.0)
SMALL_MAX = 128

if triton is not None:

    @triton.jit
    def _lse2_rows(x):
        # base-2 logsumexp along axis 1, safe for rows that are entirely -inf (padding)
        m = tl.max(x, axis=1)
        m = tl.where(m == float("-inf"), 0.0, m)
        s = tl.sum(tl.exp2(x - m[:, None]), axis=1)
        return m + tl.log2(tl.where(s > 0, s, 1.0))

    @triton.jit
    def _lse2_cols(x):
        m = tl.max(x, axis=0)
        m = tl.where(m == float("-inf"), 0.0, m)
        s = tl.sum(tl.exp2(x - m[None, :]), axis=0)
        return m + tl.log2(tl.where(s > 0, s, 1.0))

    @triton.jit
    def _sinkhorn_small_kernel(
        c_ptr, f_ptr, g_ptr, it_ptr,
        N, stride_cb, stride_ci, stride_cj,
        scale, out_scale, n_iters, tol,
        BLOCK: tl.constexpr,
    ):
        pid = tl.program_id(0).to(tl.int64)
        offs = tl.arange(0, BLOCK)
        valid = offs < N
        mask = valid[:, None] & valid[None, :]
        ptrs = (c_ptr + pid * stride_cb + offs.to(tl.int64)[:, None] * stride_ci
                + offs.to(tl.int64)[None, :] * stride_cj)
        # X = -C * log2(e) / eps, -inf outside the problem; loaded once, kept on chip
        x = tl.load(ptrs, mask=mask, other=0.0).to(tl.float32) * (-scale)
        x = tl.where(mask, x, float("-inf"))
        f = tl.zeros((BLOCK,), dtype=tl.float32)
        g = tl.zeros((BLOCK,), dtype=tl.float32)
        it = tl.zeros((), tl.int32)
        done = tl.zeros((), tl.int32)
        while (it < n_iters) & (done == 0):
            f_new = -_lse2_rows(x + g[None, :])
            f_new = tl.where(valid, f_new, 0.0)
            # row-marginal error of the current iterate (f, g), read off the new row update;
            # branch-free: a converged iterate is kept and the loop ends
            err = tl.max(tl.where(valid, tl.abs(tl.exp2(f - f_new) - 1.0), 0.0), axis=0)
            conv = (it > 0) & (err < tol)
            f = tl.where(conv, f, f_new)
            g_new = tl.where(valid, -_lse2_cols(x + f[:, None]), 0.0)
            g = tl.where(conv, g, g_new)
            done = tl.where(conv, 1, 0)
            it = tl.where(conv, it, it + 1)
        tl.store(f_ptr + pid * N + offs, f * out_scale, mask=valid)
        tl.store(g_ptr + pid * N + offs, g * out_scale, mask=valid)
        tl.store(it_ptr + pid, it)

    @triton.jit
    def _sinkhorn_row_pass(
        c_ptr, g_in_ptr, f_prev_ptr, f_out_ptr, err_ptr, active_ptr,
        N, stride_cb, stride_ci, stride_cj, scale, HAS_PREV: tl.constexpr,
        BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
    ):
        # F_i = -lse2_j(G_j + X_ij) for one row block; err = max_i |2^(F_prev - F) - 1|
        pid_b = tl.program_id(0).to(tl.int64)
        pid_r = tl.program_id(1)
        if tl.load(active_ptr + pid_b) != 0:
            rows = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
            rmask = rows < N
            cols0 = tl.arange(0, BLOCK_C)
            m = tl.full((BLOCK_R,), float("-inf"), tl.float32)
            s = tl.zeros((BLOCK_R,), dtype=tl.float32)
            c_rows = c_ptr + pid_b * stride_cb + rows.to(tl.int64)[:, None] * stride_ci
            for c0 in range(0, tl.cdiv(N, BLOCK_C)):
                cols = c0 * BLOCK_C + cols0
                cmask = cols < N
                msk = rmask[:, None] & cmask[None, :]
                cst = tl.load(c_rows + cols.to(tl.int64)[None, :] * stride_cj, mask=msk, other=0.0)
                gg = tl.load(g_in_ptr + pid_b * N + cols, mask=cmask, other=0.0)
                x = tl.where(msk, gg[None, :] - cst.to(tl.float32) * scale, float("-inf"))
                m_new = tl.maximum(m, tl.max(x, axis=1))
                m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
                s = s * tl.exp2(m - m_safe) + tl.sum(tl.exp2(x - m_safe[:, None]), axis=1)
                m = m_new
            m = tl.where(m == float("-inf"), 0.0, m)
            f_new = tl.where(rmask, -(m + tl.log2(tl.where(s > 0, s, 1.0))), 0.0)
            tl.store(f_out_ptr + pid_b * N + rows, f_new, mask=rmask)
            if HAS_PREV:
                fp = tl.load(f_prev_ptr + pid_b * N + rows, mask=rmask, other=0.0)
                err = tl.max(tl.where(rmask, tl.abs(tl.exp2(fp - f_new) - 1.0), 0.0), axis=0)
                tl.store(err_ptr + pid_b * tl.num_programs(1) + pid_r, err)

    @triton.jit
    def _sinkhorn_col_pass(
        c_ptr, f_in_ptr, g_out_ptr, active_ptr,
        N, stride_cb, stride_ci, stride_cj, scale,
        BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
    ):
        # G_j = -lse2_i(F_i + X_ij) for one column block, online over row tiles
        pid_b = tl.program_id(0).to(tl.int64)
        pid_c = tl.program_id(1)
        if tl.load(active_ptr + pid_b) != 0:
            cols = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
            cmask = cols < N
            rows0 = tl.arange(0, BLOCK_R)
            m = tl.full((BLOCK_C,), float("-inf"), tl.float32)
            s = tl.zeros((BLOCK_C,), dtype=tl.float32)
            c_cols = c_ptr + pid_b * stride_cb + cols.to(tl.int64)[None, :] * stride_cj
            for r0 in range(0, tl.cdiv(N, BLOCK_R)):
                rows = r0 * BLOCK_R + rows0
                rmask = rows < N
                msk = rmask[:, None] & cmask[None, :]
                cst = tl.load(c_cols + rows.to(tl.int64)[:, None] * stride_ci, mask=msk, other=0.0)
                ff = tl.load(f_in_ptr + pid_b * N + rows, mask=rmask, other=0.0)
                x = tl.where(msk, ff[:, None] - cst.to(tl.float32) * scale, float("-inf"))
                m_new = tl.maximum(m, tl.max(x, axis=0))
                m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
                s = s * tl.exp2(m - m_safe) + tl.sum(tl.exp2(x - m_safe[None, :]), axis=0)
                m = m_new
            m = tl.where(m == float("-inf"), 0.0, m)
            g_new = tl.where(cmask, -(m + tl.log2(tl.where(s > 0, s, 1.0))), 0.0)
            tl.store(g_out_ptr + pid_b * N + cols, g_new, mask=cmask)


def _sinkhorn_small(c: torch.Tensor, eps: float, n_iters: int, tol: float):
    b, n, _ = c.shape
    block = max(triton.next_power_of_2(n), 16)
    f = torch.empty(b, n, dtype=torch.float32, device=c.device)
    g = torch.empty_like(f)
    its = torch.empty(b, dtype=torch.int32, device=c.device)
    warps = 1 if block <= 32 else (4 if block <= 64 else 8)
    _sinkhorn_small_kernel[(b,)](
        c, f, g, its, n, c.stride(0), c.stride(1), c.stride(2),
        LOG2E / eps, eps / LOG2E, int(n_iters), float(tol), BLOCK=block, num_warps=warps,
    )
    return f, g, int(its.max()) if b else 0


def _sinkhorn_tiled(c: torch.Tensor, eps: float, n_iters: int, tol: float,
                    block_r: int, block_c: int, check_every: int):
    b, n, _ = c.shape
    dev = c.device
    scale = LOG2E / eps
    n_rb = triton.cdiv(n, block_r)
    n_cb = triton.cdiv(n, block_c)
    ring = check_every + 1
    f_ring = torch.zeros(ring, b, n, dtype=torch.float32, device=dev)
    g_ring = torch.zeros(ring, b, n, dtype=torch.float32, device=dev)  # slot of iterate 0 = zeros
    errs = torch.full((n_iters + 1, b, n_rb), float("inf"), dtype=torch.float32, device=dev)
    active = torch.ones(b, dtype=torch.int32, device=dev)
    f_out = torch.zeros(b, n, dtype=torch.float32, device=dev)
    g_out = torch.zeros(b, n, dtype=torch.float32, device=dev)
    stop_at = torch.full((b,), n_iters, dtype=torch.int64, device=dev)
    strides = (c.stride(0), c.stride(1), c.stride(2))
    checked = 0  # errors of iterates 1..checked have been examined

    def retire(lo: int, hi: int) -> None:
        """Return (and deactivate) each active problem's first iterate in lo..hi below tol."""
        hit = (errs[lo:hi + 1].amax(dim=2) < tol) & (active != 0)[None, :]  # (k, b)
        idx = torch.nonzero(hit.any(dim=0)).flatten()  # the sync
        if idx.numel():
            first = lo + hit.int().argmax(dim=0)[idx]
            f_out[idx] = f_ring[first % ring, idx]
            g_out[idx] = g_ring[first % ring, idx]
            stop_at[idx] = first
            active[idx] = 0

    for t in range(1, n_iters + 1):
        prev, cur = (t - 1) % ring, t % ring
        _sinkhorn_row_pass[(b, n_rb)](
            c, g_ring[prev], f_ring[prev], f_ring[cur], errs[t - 1], active,
            n, *strides, scale, HAS_PREV=t > 1, BLOCK_R=block_r, BLOCK_C=block_c,
        )
        _sinkhorn_col_pass[(b, n_cb)](
            c, f_ring[cur], g_ring[cur], active, n, *strides, scale,
            BLOCK_R=block_r, BLOCK_C=block_c,
        )
        # iterates checked+1 .. t-1 now have errors (computed in passes checked+2 .. t)
        if t < n_iters and tol > 0 and t % check_every == 0 and t - 1 >= checked + 1:
            retire(checked + 1, t - 1)
            if not bool(active.any()):
                break
            checked = t - 1
    # a final look at the errors not yet examined (iterates checked+1 .. last-1)
    last = t
    if tol > 0 and last - 1 >= checked + 1 and bool(active.any()):
        retire(checked + 1, last - 1)
    rest = torch.nonzero(active != 0).flatten()
    if rest.numel():
        f_out[rest] = f_ring[last % ring, rest]
        g_out[rest] = g_ring[last % ring, rest]
        stop_at[rest] = last
    out_scale = eps / LOG2E
    return f_out * out_scale, g_out * out_scale, int(stop_at.max()) if b else 0


def sinkhorn_triton(
    cost: torch.Tensor, eps: float, n_iters: int = 100, tol: float = 1e-3,
    *, small_max: int = SMALL_MAX, block: int | None = None, check_every: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Triton log-domain Sinkhorn; same arguments and returns as :func:`sinkhorn_reference`.

    ``tol`` is applied per problem (see the notes above): every returned problem meets
    ``max_i |sum_j P_ij - 1| < tol`` (or ran ``n_iters``), ``iters`` is the largest
    per-problem count. Keyword-only tuning knobs: ``small_max`` (largest n for the
    one-program-per-problem kernel), ``block`` (tile of the tiled path), ``check_every``
    (iterations between host checks on the tiled path; 8 on GPU, 1 in the interpreter).
    """
    if triton is None:
        raise RuntimeError("sinkhorn_triton: triton is not installed")
    squeeze = cost.dim() == 2
    c = cost.unsqueeze(0) if squeeze else cost
    if c.dim() != 3 or c.shape[1] != c.shape[2]:
        raise ValueError(f"sinkhorn needs square costs, got {tuple(cost.shape)}")
    if not triton_usable(c.device):
        raise RuntimeError(f"sinkhorn_triton: triton cannot run on {c.device}")
    if c.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        c = c.float()
    b, n, _ = c.shape
    if b == 0 or n == 0 or n_iters <= 0:
        z = torch.zeros(b, n, dtype=torch.float32, device=c.device)
        return (z[0], z[0].clone(), 0) if squeeze else (z, z.clone(), 0)
    if n <= small_max:
        f, g, it = _sinkhorn_small(c, float(eps), int(n_iters), float(tol))
    else:
        interp = interpret_mode() or c.device.type != "cuda"
        blk = block or (16 if interp else 64)
        every = check_every or (1 if interp else 8)
        f, g, it = _sinkhorn_tiled(c, float(eps), int(n_iters), float(tol), blk, blk, every)
    if squeeze:
        return f[0], g[0], it
    return f, g, it


def log_sinkhorn(
    cost: torch.Tensor, eps: float, n_iters: int = 100, tol: float = 1e-3, backend: str = "auto"
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Dispatch to :func:`sinkhorn_triton` (CUDA with triton) or :func:`sinkhorn_reference`."""
    if pick_backend(backend, cost.device) == "triton":
        return sinkhorn_triton(cost, eps, n_iters, tol)
    return sinkhorn_reference(cost, eps, n_iters, tol)
