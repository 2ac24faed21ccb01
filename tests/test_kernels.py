"""Triton kernels vs their torch references.

On CPU the Triton kernels run in the interpreter (``TRITON_INTERPRET=1``, set below before
anything can import triton), at small sizes. bf16 ``tl.dot`` is wrong in the interpreter,
so bf16 inputs are up-cast to fp32 inside the cost kernel there (the wrapper does it).
Tests marked ``gpu`` run realistic sizes and skip cleanly without CUDA.

Tolerances:
- cost builder, fp32 inputs: atol = rtol = 1e-4 (ieee fp32 dot, different summation order);
  fp16 / bf16 inputs: both sides see the same rounded inputs and accumulate in fp32,
  atol = rtol = 2e-3 relative to sqrt(m) scale;
- Sinkhorn with a fixed iteration count: potentials within 1e-4 of the reference
  (exp2/log2 in base-2 units vs torch.logsumexp); with ``tol``: every problem meets the
  marginal criterion and the iteration count matches the reference's (+-1);
- assignment: objective equal to scipy's to 1e-9 relative (fp64 objective of either
  permutation), exactly equal on integer costs; duals feasible up to 1e-6 * n * max|C|.
"""
from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import importlib.util

import numpy as np
import pytest
import torch
from rebasin_kernels.backend import triton_usable
from rebasin_kernels.cost_builder import gathered_cost, gathered_cost_reference
from rebasin_kernels.hungarian import (
    assignment_objective,
    batched_lap,
    batched_lap_reference,
    check_permutations,
)
from rebasin_kernels.sinkhorn import log_sinkhorn, sinkhorn_reference
from reference import ref_objective

HAS_TRITON = importlib.util.find_spec("triton") is not None
CPU_TRITON = HAS_TRITON and triton_usable("cpu")
HAS_CUDA = torch.cuda.is_available() and HAS_TRITON

needs_triton = pytest.mark.skipif(not CPU_TRITON, reason="triton (interpreter mode) not available")


# ======================================================================================
# cost builder
# ======================================================================================
def _tols(dtype):
    return (1e-4, 1e-4) if dtype == torch.float32 else (2e-3, 2e-3)


def test_cost_reference_matches_definition():
    g = torch.Generator().manual_seed(0)
    b = torch.randn(5, 7, generator=g)
    a = torch.randn(6, 7, generator=g)
    col = torch.randperm(7, generator=g)
    want = b.double() @ a.double()[:, col].T
    got = gathered_cost(b, a, col, backend="torch")
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)
    out = torch.ones(5, 6)
    res = gathered_cost(b, a, col, out=out, backend="torch")
    assert res is out
    torch.testing.assert_close(out.double(), want + 1, atol=1e-5, rtol=1e-5)


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize(
    "n, n_a, m", [(1, 1, 1), (5, 3, 7), (33, 40, 70), (64, 32, 32)], ids=lambda s: str(s)
)
def test_cost_triton_2d(dtype, n, n_a, m):
    g = torch.Generator().manual_seed(n * 1000 + m)
    b = torch.randn(n, m, generator=g).to(dtype)
    a = torch.randn(n_a, m, generator=g).to(dtype)
    col = torch.randperm(m, generator=g)
    for c in (None, col):
        got = gathered_cost(b, a, c, backend="triton")
        want = gathered_cost_reference(b, a, c)
        assert got.dtype == torch.float32 and got.shape == (n, n_a)
        atol, rtol = _tols(dtype)
        torch.testing.assert_close(got, want, atol=atol * max(1.0, m**0.5), rtol=rtol)


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_cost_triton_batched_gather_noncontiguous(dtype):
    g = torch.Generator().manual_seed(1)
    batch, n, n_a, m = 3, 37, 29, 45
    b = torch.randn(batch, m, n, generator=g).to(dtype).transpose(1, 2)  # (3, 37, 45), non-contiguous
    a = torch.randn(batch, m, n_a, generator=g).to(dtype).transpose(1, 2)  # (3, 29, 45) like w.T of Conv1D
    assert not b.is_contiguous() and not a.is_contiguous()
    col = torch.randint(0, m, (m,), generator=g)  # a gather, not only a permutation
    got = gathered_cost(b, a, col, backend="triton")
    want = gathered_cost_reference(b, a, col)
    atol, rtol = _tols(dtype)
    torch.testing.assert_close(got, want, atol=atol * m**0.5, rtol=rtol)
    # broadcasting a single a-batch, and accumulating into a strided out buffer
    big = torch.full((batch, n_a, n), 2.0).transpose(1, 2)  # (3, 37, 29) non-contiguous fp32
    res = gathered_cost(b, a[:1], col, out=big, backend="triton")
    assert res is big
    want2 = gathered_cost_reference(b, a[:1], col) + 2.0
    torch.testing.assert_close(big, want2, atol=atol * m**0.5, rtol=rtol)


@needs_triton
def test_cost_triton_mixed_dtypes_and_slices():
    g = torch.Generator().manual_seed(2)
    w = torch.randn(50, 80, generator=g)
    b = w[3:40:2, ::2]  # strided slice (19, 40)
    a = torch.randn(23, 40, generator=g).half()
    col = torch.randperm(40, generator=g)
    got = gathered_cost(b, a, col, backend="triton")
    want = gathered_cost_reference(b, a, col)
    torch.testing.assert_close(got, want, atol=1e-3, rtol=1e-4)


@needs_triton
def test_cost_accumulates_terms():
    """A group's cost: several terms accumulated into one buffer (as the matching engine does)."""
    g = torch.Generator().manual_seed(3)
    n = 20
    terms = []
    want = torch.zeros(n, n, dtype=torch.float64)
    for m in (16, 33, 9):
        b = torch.randn(n, m, generator=g)
        a = torch.randn(n, m, generator=g)
        col = torch.randperm(m, generator=g) if m != 9 else None
        terms.append((b, a, col))
        aa = a if col is None else a[:, col]
        want += b.double() @ aa.double().T
    for backend in ("triton", "torch"):
        got = torch.zeros(n, n)
        for b, a, col in terms:
            assert gathered_cost(b, a, col, out=got, backend=backend) is got
        torch.testing.assert_close(got.double(), want, atol=1e-4, rtol=1e-5)


def test_cost_errors_and_auto_backend():
    b = torch.randn(4, 5)
    with pytest.raises(ValueError):
        gathered_cost(b, torch.randn(3, 6))
    with pytest.raises(ValueError):
        gathered_cost(b, torch.randn(3, 5), torch.arange(4))
    with pytest.raises(TypeError):
        gathered_cost(b, torch.randn(3, 5), out=torch.zeros(4, 3, dtype=torch.float64))
    with pytest.raises(ValueError):
        gathered_cost(b, torch.randn(3, 5), backend="cuda")
    # auto on CPU is the torch path even in interpreter mode
    torch.testing.assert_close(gathered_cost(b, torch.eye(5)), b)


# ======================================================================================
# Sinkhorn
# ======================================================================================
def _row_err(cost, f, g, eps):
    p = torch.exp((f[..., :, None] + g[..., None, :] - cost.float()) / eps)
    return (p.sum(-1) - 1).abs().amax(-1)


@needs_triton
@pytest.mark.parametrize("b, n", [(3, 1), (4, 17), (2, 64), (2, 100)])
def test_sinkhorn_small_fixed_iters(b, n):
    g = torch.Generator().manual_seed(n)
    cost = torch.rand(b, n, n, generator=g)
    f1, g1, i1 = log_sinkhorn(cost, 0.05, 30, 0.0, backend="triton")
    f2, g2, i2 = sinkhorn_reference(cost, 0.05, 30, 0.0)
    assert i1 == i2 == 30
    torch.testing.assert_close(f1, f2, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(g1, g2, atol=1e-4, rtol=1e-4)


@needs_triton
@pytest.mark.parametrize("b, n", [(3, 17), (2, 64), (1, 5), (3, 3)])
def test_sinkhorn_small_tol(b, n):
    """``tol`` is per problem: each problem equals the reference run on that problem alone."""
    g = torch.Generator().manual_seed(7 + n)
    cost = torch.rand(b, n, n, generator=g) * 2
    f1, g1, i1 = log_sinkhorn(cost, 0.05, 120, 1e-3, backend="triton")
    _, _, i2 = sinkhorn_reference(cost, 0.05, 120, 1e-3)
    assert abs(i1 - i2) <= 1
    per_problem_iters = []
    for k in range(b):
        fr, gr, ir = sinkhorn_reference(cost[k], 0.05, 120, 1e-3)
        per_problem_iters.append(ir)
        torch.testing.assert_close(f1[k], fr, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(g1[k], gr, atol=1e-4, rtol=1e-4)
        if ir < 120:
            assert float(_row_err(cost[k], f1[k], g1[k], 0.05)) < 1e-3 * 1.01
    assert i1 == max(per_problem_iters)
    fs, _, it_s = log_sinkhorn(cost[0], 0.05, 120, 1e-3, backend="triton")  # 2-d input
    assert fs.shape == (n,) and it_s == per_problem_iters[0]


@needs_triton
def test_sinkhorn_tiled_path():
    from rebasin_kernels.sinkhorn import sinkhorn_triton

    g = torch.Generator().manual_seed(11)
    cost = torch.rand(2, 37, 37, generator=g)
    # fixed count: tiles of 16 over n=37 (not a multiple), row/column passes
    f1, g1, i1 = sinkhorn_triton(cost, 0.1, 6, 0.0, small_max=8, block=16)
    f2, g2, i2 = sinkhorn_reference(cost, 0.1, 6, 0.0)
    assert i1 == i2 == 6
    torch.testing.assert_close(f1, f2, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(g1, g2, atol=1e-4, rtol=1e-4)
    # with tol and a host check every 2 iterations: exact first-converged iterate per problem
    cost2 = torch.rand(2, 20, 20, generator=g)
    f3, g3, i3 = sinkhorn_triton(cost2, 0.2, 40, 1e-3, small_max=8, block=16, check_every=2)
    _, _, i4 = sinkhorn_reference(cost2, 0.2, 40, 1e-3)
    assert abs(i3 - i4) <= 1
    assert float(_row_err(cost2, f3, g3, 0.2).max()) < 1e-3 * 1.01


def test_sinkhorn_auto_is_reference_on_cpu():
    cost = torch.rand(2, 6, 6)
    f1, _, i1 = log_sinkhorn(cost, 0.1)
    f2, _, i2 = sinkhorn_reference(cost, 0.1)
    assert i1 == i2
    torch.testing.assert_close(f1, f2)


# ======================================================================================
# batched exact assignment
# ======================================================================================
def _check_lap(cost, perm, u, v, maximize, exact=False):
    b, n, _ = cost.shape
    assert perm.shape == (b, n) and perm.dtype == torch.int64
    assert check_permutations(perm)
    obj = assignment_objective(cost, perm).numpy()
    ref = ref_objective(cost, maximize)
    scale = max(float(cost.double().abs().max()), 1e-30)
    if exact:
        np.testing.assert_array_equal(obj, ref)
    else:
        np.testing.assert_allclose(obj, ref, rtol=1e-9, atol=1e-9 * n * scale)
    # duals: feasibility and complementary slackness (sign flips for maximisation)
    sign = -1.0 if maximize else 1.0
    red = sign * (cost.double() - u.double()[:, :, None] - v.double()[:, None, :])
    tol = 1e-6 * n * scale
    assert float(red.min()) >= -tol
    assert float(red.gather(2, perm[:, :, None]).abs().max()) <= tol
    np.testing.assert_allclose((u.double().sum(1) + v.double().sum(1)).numpy(), ref, atol=tol * n, rtol=1e-6)


def _lap_cases():
    g = torch.Generator().manual_seed(5)
    n = 10
    ij = (torch.arange(n)[:, None] * torch.arange(n)[None, :]).float()
    return {
        "random": torch.rand(2, n, n, generator=g),
        "int_ties": torch.randint(0, 3, (2, n, n), generator=g).float(),
        "constant": torch.full((2, n, n), -2.5),
        "product_ij": ij.expand(2, n, n).contiguous(),
        "dynamic_range": torch.randn(2, n, n, generator=g) * torch.logspace(-3, 5, n)[None, :, None],
        "offset_fp64": 1e6 + torch.rand(2, n, n, generator=g, dtype=torch.float64),
        "rank_one": torch.randn(2, n, 1, generator=g) @ torch.randn(2, 1, n, generator=g),
    }


@pytest.mark.parametrize("maximize", [True, False])
def test_lap_reference(maximize):
    for name, cost in _lap_cases().items():
        perm, u, v = batched_lap_reference(cost, maximize)
        _check_lap(cost, perm, u, v, maximize, exact=name in ("int_ties", "constant", "product_ij"))


@needs_triton
@pytest.mark.parametrize("maximize", [True, False])
def test_lap_triton_adversarial(maximize):
    for name, cost in _lap_cases().items():
        perm, u, v = batched_lap(cost, maximize, backend="triton")
        _check_lap(cost, perm, u, v, maximize, exact=name in ("int_ties", "constant", "product_ij"))


@needs_triton
@pytest.mark.parametrize("n, b", [(1, 3), (3, 4), (17, 3), (64, 1), (100, 1)])
def test_lap_triton_sizes(n, b):
    g = torch.Generator().manual_seed(n)
    cost = torch.rand(b, n, n, generator=g)
    maximize = n % 2 == 1
    perm, u, v = batched_lap(cost, maximize, backend="triton")
    _check_lap(cost, perm, u, v, maximize)


@needs_triton
def test_lap_triton_mixed_batch_and_noncontiguous():
    g = torch.Generator().manual_seed(9)
    n = 14
    cost = torch.stack([
        torch.rand(n, n, generator=g),  # easy
        torch.randint(0, 2, (n, n), generator=g).float(),  # massive ties
        torch.zeros(n, n),  # all equal
        (torch.arange(n)[:, None] - torch.arange(n)[None, :]).abs().float(),  # banded
        torch.rand(n, n, generator=g).T,  # transposed data
    ]).transpose(1, 2)  # non-contiguous batch
    perm, u, v = batched_lap(cost, True, backend="triton")
    _check_lap(cost, perm, u, v, True)
    perm2, _, _ = batched_lap(cost[0], True, backend="triton")  # 2-d input
    assert perm2.shape == (n,)
    assert float(assignment_objective(cost[0], perm2)) == pytest.approx(ref_objective(cost[:1], True)[0])


def test_lap_rejects_nonfinite():
    cost = torch.rand(2, 4, 4)
    cost[1, 2, 3] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        batched_lap(cost, backend="torch")
    if CPU_TRITON:
        with pytest.raises(ValueError, match="NaN"):
            batched_lap(cost, backend="triton")


# ======================================================================================
# GPU: realistic sizes (skipped without CUDA)
# ======================================================================================
@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA and triton")
def test_gpu_cost_builder_large():
    dev = "cuda"
    g = torch.Generator(device=dev).manual_seed(0)
    n, m = 4096, 11008
    b = torch.randn(n, m, device=dev, generator=g, dtype=torch.bfloat16)
    a = torch.randn(m, n, device=dev, generator=g, dtype=torch.bfloat16).T  # non-contiguous view
    col = torch.randperm(m, device=dev, generator=g)
    got = gathered_cost(b, a, col, backend="triton")
    want = gathered_cost_reference(b, a, col)
    torch.testing.assert_close(got, want, atol=1e-2, rtol=1e-3)
    # fp32 must be exact-ish (ieee, no TF32)
    b32, a32 = b[:512].float(), a[:384].float()
    got32 = gathered_cost(b32, a32, col, backend="triton")
    want32 = (b32.double() @ a32.double()[:, col].T).float()
    torch.testing.assert_close(got32, want32, atol=1e-3, rtol=1e-4)
    # batched, and one a broadcast over the batch
    bb = torch.randn(8, 256, 1024, device=dev, dtype=torch.float16)
    c2 = torch.randperm(1024, device=dev)
    for aa in (torch.randn(8, 200, 1024, device=dev, dtype=torch.float16),
               torch.randn(1, 200, 1024, device=dev, dtype=torch.float16)):
        torch.testing.assert_close(gathered_cost(bb, aa, c2, backend="triton"),
                                   gathered_cost_reference(bb, aa, c2), atol=5e-2, rtol=1e-3)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA and triton")
def test_gpu_sinkhorn():
    dev = "cuda"
    cost = torch.rand(1024, 64, 64, device=dev)
    f1, _, _ = log_sinkhorn(cost, 0.05, 50, 0.0, backend="triton")
    f2, _, _ = sinkhorn_reference(cost, 0.05, 50, 0.0)
    torch.testing.assert_close(f1, f2, atol=1e-4, rtol=1e-4)
    big = torch.rand(2, 1000, 1000, device=dev)
    f1, _, _ = log_sinkhorn(big, 0.05, 20, 0.0, backend="triton")
    f2, _, _ = sinkhorn_reference(big, 0.05, 20, 0.0)
    torch.testing.assert_close(f1, f2, atol=1e-4, rtol=1e-4)
    f3, g3, i3 = log_sinkhorn(big, 0.05, 300, 1e-3, backend="triton")
    assert float(_row_err(big, f3, g3, 0.05).max()) < 1e-3 * 1.01 or i3 == 300


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA and triton")
def test_gpu_lap_1024x64():
    import time

    dev = "cuda"
    cost = torch.rand(1024, 64, 64, device=dev)
    batched_lap(cost[:2], backend="triton")  # compile
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    perm, u, v = batched_lap(cost, backend="triton")
    torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    _check_lap(cost.cpu(), perm.cpu(), u.cpu(), v.cpu(), True)
    print(f"batched_lap 1024 x 64^2 on GPU: {dt * 1e3:.2f} ms (target <= 10 ms)")
    ints = torch.randint(0, 5, (256, 128, 128), device=dev).float()
    perm, u, v = batched_lap(ints, maximize=False, backend="triton")
    _check_lap(ints.cpu(), perm.cpu(), u.cpu(), v.cpu(), False, exact=True)
