"""Gathered cost builder: ``out += b @ a[..., col_index].T`` in fp32.

This is the matcher's hot path. For a permutation group ``g`` the cost is

    C_g[i, j] = sum over tensors W touching g  < W_B[i, :], W_A[j, gathered] >

where ``gathered`` maps W_A's *other* axis through the current permutation of the group
that owns it. The Triton kernel applies ``col_index`` on the K-dimension loads of ``a``
(pointer gather) instead of materialising ``a[:, col_index]``, reads any strided view
(e.g. ``w.T`` of a transposed Conv1D weight) through its strides without a copy, and
accumulates into an fp32 ``out`` in place, so a group's cost is one buffer filled by one
pass per tensor.

Public API (kernel and reference take the same arguments; the dispatcher adds ``backend``):

- :func:`gathered_cost` — dispatcher (``backend="auto" | "triton" | "torch"``),
- :func:`gathered_cost_reference` — plain torch (index_select + matmul in fp32),
- :func:`gathered_cost_triton` — the Triton kernel (CUDA, or CPU under ``TRITON_INTERPRET=1``).

A group's cost is several calls accumulating into one ``out`` buffer
(``rebasin.matching.engine.plain_cost``).

``auto`` picks Triton only for CUDA tensors (the CPU interpreter is for tests, not speed).

Performance note (from the sm_90 PTX, not yet timed on a GPU): without ``col_index``, and
with ``col_index`` when ``a`` is K-major (stride 1 along n_a, e.g. ``a = w.T``: the gather
then selects whole rows), both operands are streamed with 16-byte ``cp.async`` into a
multi-stage pipeline feeding ``wgmma``. When ``a`` is K-contiguous (row-major (n_a, m)) the
gather along K becomes per-element 2-byte loads that are not pipelined: expect that case
to be L2/LSU-bound; if it measures below target, a per-tensor ``index_select`` into a
scratch buffer (~10% of the GEMM's time) or passing K-major operands are the remedies.
"""
from __future__ import annotations

import torch

from .backend import interpret_mode, pick_backend, triton_usable

try:  # triton is optional: the torch reference path must work without it
    import triton
    import triton.language as tl
except Exception:
    triton = None
    tl = None

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


# --------------------------------------------------------------------------------------
# shape handling shared by both paths
# --------------------------------------------------------------------------------------
def _canonical(
    b: torch.Tensor,
    a: torch.Tensor,
    col_index: torch.Tensor | None,
    out: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor, bool]:
    """Validate shapes; return 3-d views (b3, a3), indices, the 3-d out buffer and ``squeeze``."""
    if b.dim() not in (2, 3) or a.dim() not in (2, 3):
        raise ValueError(f"gathered_cost: b and a must be 2-d or 3-d, got {tuple(b.shape)} and {tuple(a.shape)}")
    if b.dtype not in _FLOAT_DTYPES or a.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"gathered_cost: float32/float16/bfloat16 inputs only, got {b.dtype} and {a.dtype}")
    if b.device != a.device:
        raise ValueError(f"gathered_cost: b on {b.device} but a on {a.device}")
    squeeze = b.dim() == 2
    b3 = b.unsqueeze(0) if squeeze else b
    a3 = a.unsqueeze(0) if a.dim() == 2 else a
    batch, n, m = b3.shape
    batch_a, n_a, m_a = a3.shape
    if col_index is not None:
        if col_index.dim() != 1 or col_index.shape[0] != m:
            raise ValueError(f"gathered_cost: col_index must be ({m},), got {tuple(col_index.shape)}")
        if col_index.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"gathered_cost: col_index must be an integer tensor, got {col_index.dtype}")
        col_index = col_index.to(device=b.device, dtype=torch.int64)
    elif m_a != m:
        raise ValueError(f"gathered_cost: inner dimensions differ: b {tuple(b.shape)}, a {tuple(a.shape)}")
    if batch_a != batch and batch_a != 1:
        raise ValueError(f"gathered_cost: batch of b ({batch}) and a ({batch_a}) differ (a batch of 1 broadcasts)")
    expected = (batch, n, n_a)
    if out is None:
        out3 = torch.zeros(expected, dtype=torch.float32, device=b.device)
    else:
        if out.dtype != torch.float32:
            raise TypeError(f"gathered_cost: out must be float32, got {out.dtype}")
        out3 = out.unsqueeze(0) if out.dim() == 2 else out
        if tuple(out3.shape) != expected:
            want = expected[1:] if squeeze else expected
            raise ValueError(f"gathered_cost: out must have shape {want}, got {tuple(out.shape)}")
    return b3, a3, col_index, out3, squeeze


def _result(out_given: torch.Tensor | None, out3: torch.Tensor, squeeze: bool) -> torch.Tensor:
    if out_given is not None:
        return out_given
    return out3[0] if squeeze else out3


# --------------------------------------------------------------------------------------
# torch reference
# --------------------------------------------------------------------------------------
def gathered_cost_reference(
    b: torch.Tensor,
    a: torch.Tensor,
    col_index: torch.Tensor | None = None,
    *,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """``out += b @ a[..., col_index].transpose(-1, -2)`` with index_select + fp32 matmul.

    Materialises the gathered copy of ``a`` (that is what the kernel avoids).
    """
    b3, a3, col, out3, squeeze = _canonical(b, a, col_index, out)
    aa = a3
    if aa.shape[0] != b3.shape[0]:
        aa = aa.expand(b3.shape[0], -1, -1)
    if col is not None:
        aa = aa.index_select(2, col)
    out3.add_(torch.matmul(b3.float(), aa.float().transpose(-1, -2)))
    return _result(out, out3, squeeze)


# --------------------------------------------------------------------------------------
# Triton kernel
# --------------------------------------------------------------------------------------
if triton is not None:

    @triton.jit
    def _gathered_cost_kernel(
        b_ptr, a_ptr, col_ptr, out_ptr,
        N, NA, K,
        stride_bb, stride_bn, stride_bk,
        stride_ab, stride_an, stride_ak,
        stride_ob, stride_on, stride_oa,
        HAS_COL: tl.constexpr, A_BATCHED: tl.constexpr,
        UPCAST: tl.constexpr, IEEE: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    ):
        pid = tl.program_id(0)
        pid_b = tl.program_id(1).to(tl.int64)
        # grouped ordering of output tiles: neighbouring programs share b row-blocks (L2 reuse)
        num_pid_m = tl.cdiv(N, BLOCK_M)
        num_pid_n = tl.cdiv(NA, BLOCK_N)
        num_pid_in_group = GROUP_M * num_pid_n
        group_id = pid // num_pid_in_group
        first_pid_m = group_id * GROUP_M
        group_size_m = tl.minimum(num_pid_m - first_pid_m, GROUP_M)
        pid_m = first_pid_m + ((pid % num_pid_in_group) % group_size_m)
        pid_n = (pid % num_pid_in_group) // group_size_m

        if A_BATCHED:
            a_batch = pid_b
        else:
            a_batch = pid_b * 0

        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_k = tl.arange(0, BLOCK_K)
        mask_m = offs_m < N
        mask_n = offs_n < NA
        b_base = b_ptr + pid_b * stride_bb + offs_m.to(tl.int64)[:, None] * stride_bn
        a_base = a_ptr + a_batch * stride_ab + offs_n.to(tl.int64)[None, :] * stride_an

        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, tl.cdiv(K, BLOCK_K)):
            kk = k0 * BLOCK_K + offs_k
            mask_k = kk < K
            if HAS_COL:
                # the gather: a's K coordinate goes through col_index, inside the load
                ka = tl.load(col_ptr + kk, mask=mask_k, other=0)
            else:
                ka = kk.to(tl.int64)
            b_tile = tl.load(b_base + kk.to(tl.int64)[None, :] * stride_bk,
                             mask=mask_m[:, None] & mask_k[None, :], other=0.0)
            a_tile = tl.load(a_base + ka[:, None] * stride_ak,
                             mask=mask_k[:, None] & mask_n[None, :], other=0.0)
            if UPCAST:
                b_tile = b_tile.to(tl.float32)
                a_tile = a_tile.to(tl.float32)
            if IEEE:
                acc = tl.dot(b_tile, a_tile, acc, input_precision="ieee")
            else:
                acc = tl.dot(b_tile, a_tile, acc)

        o_ptrs = (out_ptr + pid_b * stride_ob + offs_m.to(tl.int64)[:, None] * stride_on
                  + offs_n.to(tl.int64)[None, :] * stride_oa)
        o_mask = mask_m[:, None] & mask_n[None, :]
        prev = tl.load(o_ptrs, mask=o_mask, other=0.0)
        tl.store(o_ptrs, prev + acc, mask=o_mask)

    def _gpu_configs() -> list:
        cfgs = []
        for bm, bn, bk, warps, stages in [
            (128, 128, 64, 8, 3),
            (128, 256, 64, 8, 3),
            (256, 128, 64, 8, 3),
            (128, 128, 64, 4, 4),
            (128, 64, 64, 4, 4),
            (64, 128, 64, 4, 4),
            (128, 128, 32, 4, 4),
            (64, 64, 64, 4, 3),
            (64, 64, 32, 2, 5),
            (32, 32, 64, 2, 4),
        ]:
            cfgs.append(triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8},
                                      num_warps=warps, num_stages=stages))
        return cfgs

    def _prune(configs, named_args, **kwargs):
        # drop tiles far larger than the problem (small head-sized costs), keep at least one
        n, n_a = named_args["N"], named_args["NA"]
        cap_m, cap_n = max(32, triton.next_power_of_2(n)), max(32, triton.next_power_of_2(n_a))
        kept = [c for c in configs if c.kwargs["BLOCK_M"] <= cap_m and c.kwargs["BLOCK_N"] <= cap_n]
        return kept or configs[-1:]

    # autotuned variant for GPUs; ``restore_value`` because the kernel accumulates into out
    _gathered_cost_autotuned = triton.autotune(
        configs=_gpu_configs(),
        key=["N", "NA", "K", "HAS_COL", "UPCAST", "IEEE"],
        prune_configs_by={"early_config_prune": _prune},
        restore_value=["out_ptr"],
    )(_gathered_cost_kernel)

# small fixed tiles for the CPU interpreter (autotuning there would only waste minutes)
INTERPRET_CONFIG = {"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 4}


def gathered_cost_triton(
    b: torch.Tensor,
    a: torch.Tensor,
    col_index: torch.Tensor | None = None,
    *,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Triton version of :func:`gathered_cost_reference` (same signature and result, fp32 accumulation).

    fp32 inputs use ``input_precision="ieee"`` (no TF32); fp16/bf16 inputs go to the tensor
    cores as they are and accumulate in fp32; mixed input dtypes, and bf16 under the CPU
    interpreter (whose bf16 ``tl.dot`` is wrong), are up-cast to fp32 inside the kernel.
    """
    if triton is None:
        raise RuntimeError("gathered_cost_triton: triton is not installed")
    b3, a3, col, out3, squeeze = _canonical(b, a, col_index, out)
    if not triton_usable(b3.device):
        raise RuntimeError(f"gathered_cost_triton: triton cannot run on {b3.device} "
                           "(CUDA needed, or TRITON_INTERPRET=1 on CPU)")
    batch, n, k = b3.shape
    n_a = a3.shape[1]
    if batch == 0 or n == 0 or n_a == 0 or k == 0:
        return _result(out, out3, squeeze)
    interp = interpret_mode() or b3.device.type != "cuda"
    upcast = (b3.dtype != a3.dtype) or (b3.dtype == torch.float32) or (interp and b3.dtype == torch.bfloat16)
    ieee = upcast  # fp32 operands in tl.dot: keep them exact (no TF32)
    col_arg = col if col is not None else b3  # dummy pointer, never read
    args = (
        b3, a3, col_arg, out3,
        n, n_a, k,
        b3.stride(0), b3.stride(1), b3.stride(2),
        a3.stride(0), a3.stride(1), a3.stride(2),
        out3.stride(0), out3.stride(1), out3.stride(2),
    )
    flags = {"HAS_COL": col is not None, "A_BATCHED": a3.shape[0] != 1, "UPCAST": upcast, "IEEE": ieee}
    if interp:
        cfg = INTERPRET_CONFIG
        grid = (triton.cdiv(n, cfg["BLOCK_M"]) * triton.cdiv(n_a, cfg["BLOCK_N"]), batch)
        _gathered_cost_kernel[grid](*args, **flags, **cfg)
    else:
        with torch.cuda.device(b3.device):
            def grid(meta):
                return (triton.cdiv(n, meta["BLOCK_M"]) * triton.cdiv(n_a, meta["BLOCK_N"]), batch)
            _gathered_cost_autotuned[grid](*args, **flags)
    return _result(out, out3, squeeze)


# --------------------------------------------------------------------------------------
# dispatch
# --------------------------------------------------------------------------------------
def gathered_cost(
    b: torch.Tensor,
    a: torch.Tensor,
    col_index: torch.Tensor | None = None,
    *,
    out: torch.Tensor | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """``out += b @ a[..., col_index].transpose(-1, -2)``, fp32, no gathered copy of ``a``.

    Args:
        b: (n, m) or (batch, n, m), float32/float16/bfloat16, any strides.
        a: (n_a, m_a) or (batch_a, n_a, m_a), any strides; batch_a is batch or 1 (broadcast).
        col_index: (m,) int64 indices into a's last axis (None = identity, then m_a == m).
        out: (n, n_a) or (batch, n, n_a) float32, accumulated in place; zeros when None.
        backend: "auto" (Triton on CUDA when usable, torch otherwise), "triton" or "torch".

    Returns:
        ``out`` (the given buffer, or a new one).
    """
    fn = gathered_cost_triton if pick_backend(backend, b.device) == "triton" else gathered_cost_reference
    return fn(b, a, col_index, out=out)

