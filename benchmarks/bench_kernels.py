"""Kernel benchmarks: gathered cost builder, batched Sinkhorn, batched exact assignment.

``python -m benchmarks kernels [--quick] [--device cuda|cpu]``

- cost builder: ours (Triton, gather inside the K loads, fp32 accumulation) vs torch eager
  (index_select + fp32 matmul, what the reference does), vs eager-native (index_select +
  matmul in the input dtype, then .float()), vs plain ``torch.matmul`` on the same shapes
  in the input dtype without any gather (the practical roofline);
  TFLOP/s counts 2·batch·n·n_a·m.
- Sinkhorn: batched (1024 × 64²) ours vs ``sinkhorn_reference``, fixed iteration count.
- assignment: batched (1024 × 64²) ours vs a scipy ``linear_sum_assignment`` loop (and
  ``torch_linear_assignment.batch_linear_assignment`` when importable).

On CPU only the torch / scipy paths are timed: the Triton interpreter is a correctness
tool, not a benchmark, and the records say ``triton: "not measured (cpu)"``.
"""
from __future__ import annotations

import time

import numpy as np
import torch
from rebasin_kernels.backend import triton_usable
from rebasin_kernels.cost_builder import gathered_cost, gathered_cost_reference
from rebasin_kernels.hungarian import assignment_objective, batched_lap, batched_lap_reference
from rebasin_kernels.sinkhorn import log_sinkhorn, sinkhorn_reference

from benchmarks.common import synchronize, timeit, torch_linear_assignment_baseline

NOT_MEASURED = "not measured (cpu: the triton interpreter is not a benchmark)"


def _gpu_triton(device: str) -> bool:
    return device.startswith("cuda") and torch.cuda.is_available() and triton_usable(device)


# --------------------------------------------------------------------------------------
def _cost_cases(quick: bool, device: str):
    """(name, batch, n, n_a, m, dtype, a_transposed)"""
    on_gpu = device.startswith("cuda")
    if not on_gpu:
        if quick:
            return [("ffn-like", 1, 256, 256, 512, torch.float32, False),
                    ("heads-batched", 8, 64, 64, 256, torch.float32, False)]
        return [("ffn-like", 1, 1024, 1024, 2752, torch.float32, False),
                ("conv1d-wT", 1, 768, 768, 3072, torch.float32, True),
                ("heads-batched", 32, 128, 128, 1024, torch.float32, False)]
    if quick:
        return [("ffn-like bf16", 1, 1024, 1024, 2048, torch.bfloat16, False),
                ("fp32 ieee", 1, 1024, 1024, 1024, torch.float32, False)]
    return [
        ("llama-7b down (4096x11008)·(11008x4096) bf16", 1, 4096, 4096, 11008, torch.bfloat16, False),
        ("llama-3-8b ffn (14336x4096)·(4096x14336) bf16", 1, 14336, 14336, 4096, torch.bfloat16, False),
        ("residual (4096x14336)·(14336x4096) bf16", 1, 4096, 4096, 14336, torch.bfloat16, False),
        ("llama-7b down, a K-major (w.T) bf16", 1, 4096, 4096, 11008, torch.bfloat16, True),
        ("conv1d w.T (768x3072)·(3072x768) fp16", 1, 768, 768, 3072, torch.float16, True),
        ("heads batched 32x(128x4096) bf16", 32, 128, 128, 4096, torch.bfloat16, False),
        ("fp32 ieee (4096x4096)·(4096x4096)", 1, 4096, 4096, 4096, torch.float32, False),
    ]


def _cost_record(case: tuple, device: str, gpu: bool, repeat: int) -> dict:
    """One cost-builder case (see ``_cost_cases``) timed: eager, native, plain matmul, and ours on a GPU."""
    name, batch, n, n_a, m, dtype, a_t = case
    gen = torch.Generator(device=device).manual_seed(0)
    shape_b = (batch, n, m) if batch > 1 else (n, m)
    b = torch.randn(*shape_b, device=device, dtype=dtype, generator=gen)
    if a_t:  # a non-contiguous view, as w.T of a transposed Conv1D weight
        a = torch.randn(m, n_a, device=device, dtype=dtype, generator=gen).T
    else:
        a = torch.randn(*((batch, n_a, m) if batch > 1 else (n_a, m)), device=device, dtype=dtype, generator=gen)
    col = torch.randperm(m, device=device, generator=gen)
    flops = 2.0 * batch * n * n_a * m
    rec: dict = {"case": f"cost {name}", "dtype": str(dtype).replace("torch.", "")}
    t_eager, ref = timeit(lambda: gathered_cost_reference(b, a, col), device=device, repeat=repeat)
    t_mm, _ = timeit(lambda: torch.matmul(b, a.transpose(-1, -2)), device=device, repeat=repeat)
    # the practical torch way in the input dtype: gathered copy + native matmul, fp32 result
    t_native, _ = timeit(lambda: torch.matmul(b, a.index_select(-1, col).transpose(-1, -2)).float(),
                         device=device, repeat=repeat)
    rec["eager_seconds"] = t_eager
    rec["eager_native_seconds"] = t_native
    rec["matmul_seconds"] = t_mm
    rec["eager_tflops"] = flops / t_eager / 1e12
    rec["matmul_tflops"] = flops / t_mm / 1e12
    if gpu:
        t_ours, got = timeit(lambda: gathered_cost(b, a, col, backend="triton"), device=device,
                             repeat=repeat, warmup=2)
        rec["seconds"] = t_ours
        rec["tflops"] = flops / t_ours / 1e12
        rec["ratio_vs_eager"] = t_eager / t_ours
        rec["ratio_vs_eager_native"] = t_native / t_ours
        rec["fraction_of_matmul"] = t_mm / t_ours
        rec["max_abs_err"] = float((got - ref).abs().max())
    else:
        rec["seconds"] = t_eager
        rec["triton"] = NOT_MEASURED
    return rec


def bench_cost(quick: bool, device: str) -> list[dict]:
    gpu = _gpu_triton(device)
    repeat = 3 if quick else 10
    return [_cost_record(case, device, gpu, repeat) for case in _cost_cases(quick, device)]


# --------------------------------------------------------------------------------------
def _sinkhorn_record(b: int, n: int, iters: int, device: str, gpu: bool) -> dict:
    """Sinkhorn on (b, n, n) uniform costs, ``iters`` iterations: the reference, and ours on a GPU."""
    cost = torch.rand(b, n, n, device=device)
    eps = 0.05
    rec: dict = {"case": f"sinkhorn {b}x{n}^2 x{iters} it", "dtype": "float32"}
    t_ref, (f2, _, _) = timeit(lambda: sinkhorn_reference(cost, eps, iters, 0.0), device=device, repeat=3)
    rec["reference_seconds"] = t_ref
    if gpu:
        t_ours, (f1, _, _) = timeit(lambda: log_sinkhorn(cost, eps, iters, 0.0, backend="triton"),
                                    device=device, repeat=5, warmup=2)
        rec["seconds"] = t_ours
        rec["ratio_vs_reference"] = t_ref / t_ours
        rec["max_abs_err"] = float((f1 - f2).abs().max())
        t_tol, (_, _, it) = timeit(lambda: log_sinkhorn(cost, eps, iters, 1e-3, backend="triton"),
                                   device=device, repeat=5)
        rec["seconds_tol_1e-3"] = t_tol
        rec["iters_tol_1e-3"] = it
    else:
        rec["seconds"] = t_ref
        rec["triton"] = NOT_MEASURED
    return rec


def bench_sinkhorn(quick: bool, device: str) -> list[dict]:
    gpu = _gpu_triton(device)
    cases = [(1024, 64, 100), (4, 1024, 50)] if gpu else ([(16, 32, 20)] if quick else [(1024, 64, 100)])
    return [_sinkhorn_record(b, n, iters, device, gpu) for b, n, iters in cases]


# --------------------------------------------------------------------------------------
def _scipy_loop(cost: torch.Tensor) -> tuple[float, torch.Tensor]:
    from scipy.optimize import linear_sum_assignment

    arr = cost.detach().cpu().double().numpy()
    t0 = time.perf_counter()
    perms = [linear_sum_assignment(arr[k], maximize=True)[1] for k in range(arr.shape[0])]
    dt = time.perf_counter() - t0
    return dt, torch.from_numpy(np.stack(perms).astype(np.int64))


def _lap_record(b: int, n: int, device: str, gpu: bool) -> dict:
    """Assignment of (b, n, n) uniform costs: a scipy loop, the reference with duals, ours on a GPU."""
    cost = torch.rand(b, n, n, device=device)
    rec: dict = {"case": f"lap {b}x{n}^2 maximize", "dtype": "float32"}
    t_scipy, perm_s = _scipy_loop(cost)
    ref_obj = float(assignment_objective(cost.cpu(), perm_s).sum())
    rec["scipy_loop_seconds"] = t_scipy
    rec["reference_objective"] = ref_obj
    t_ref, _ = timeit(lambda: batched_lap_reference(cost, True), device=device, repeat=1, warmup=0)
    rec["reference_with_duals_seconds"] = t_ref
    if gpu:
        t_ours, (perm, _, _) = timeit(lambda: batched_lap(cost, True, backend="triton"), device=device,
                                      repeat=5, warmup=1)
        rec["seconds"] = t_ours
        rec["objective"] = float(assignment_objective(cost, perm).sum())
        rec["ratio_vs_scipy_loop"] = t_scipy / t_ours
    else:
        rec["seconds"] = t_scipy
        rec["objective"] = ref_obj
        rec["triton"] = NOT_MEASURED
    rec.update(torch_linear_assignment_baseline(cost, device))
    if gpu and "torch_linear_assignment_s" in rec:
        rec["ratio_vs_torch_linear_assignment"] = rec["torch_linear_assignment_s"] / rec["seconds"]
    synchronize(device)
    return rec


def bench_lap(quick: bool, device: str) -> list[dict]:
    gpu = _gpu_triton(device)
    cases = [(1024, 64), (256, 128)] if gpu else ([(128, 32)] if quick else [(1024, 64)])
    return [_lap_record(b, n, device, gpu) for b, n in cases]


def run(quick: bool, device: str) -> list[dict]:
    records = bench_cost(quick, device)
    records += bench_sinkhorn(quick, device)
    records += bench_lap(quick, device)
    return records
