"""Solvers: every exact backend equals scipy's optimum; certified proves it; contract holds."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.optimize import linear_sum_assignment

from rebasin.solvers import SOLVERS, auto_choice, available_solvers, solve
from rebasin.solvers.problems import KINDS, make_cost

EXACT = [s for s in available_solvers() if s != "auto" and SOLVERS[s].exact and s != "triton"] + ["auto"]


def _scipy_opt(c: torch.Tensor, maximize: bool) -> float:
    c64 = c.double().numpy()
    r, col = linear_sum_assignment(c64, maximize=maximize)
    return float(c64[r, col].sum())


def _is_perm(p: torch.Tensor) -> bool:
    n = p.shape[-1]
    return bool((p.sort(dim=-1).values == torch.arange(n)).all())


@pytest.mark.parametrize("method", EXACT)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("n", [1, 2, 7, 64, 300])
def test_exact_solvers_match_scipy(method, kind, n):
    for maximize in (True, False):
        c = make_cost(kind, n, seed=n)
        res = solve(c, method=method, maximize=maximize)
        assert res.perm.shape == (n,) and res.perm.dtype == torch.int64 and _is_perm(res.perm)
        assert res.objective.dtype == torch.float64
        want = _scipy_opt(c, maximize)
        assert float(res.objective) == pytest.approx(want, rel=1e-9, abs=1e-9)
        assert res.certified and res.gap == pytest.approx(0.0, abs=1e-6 * max(1.0, abs(want)))


@pytest.mark.parametrize("method", EXACT)
def test_batched_mixed_difficulty(method):
    c = torch.stack([make_cost(k, 48, seed=i) for i, k in enumerate(KINDS)])
    res = solve(c, method=method)
    assert res.perm.shape == (len(KINDS), 48) and _is_perm(res.perm)
    for i in range(len(KINDS)):
        assert float(res.objective[i]) == pytest.approx(_scipy_opt(c[i], True), rel=1e-9, abs=1e-9)


@pytest.mark.parametrize("kind", ["strong", "weak", "uniform", "integer", "adversarial"])
@pytest.mark.parametrize("n", [512, 2048])
def test_certified_large_equals_scipy(kind, n):
    c = make_cost(kind, n, seed=3)
    res = solve(c, method="certified")
    assert res.certified and _is_perm(res.perm)
    assert float(res.objective) == pytest.approx(_scipy_opt(c, True), rel=1e-9)


def test_certificate_loop_adds_edges():
    """On weak-signal costs the initial candidates miss the optimum: the certificate must act."""
    c = make_cost("weak", 1024, seed=0)
    res = solve(c, method="certified", k=2)
    assert res.stats["rounds"] > 1
    assert float(res.objective) == pytest.approx(_scipy_opt(c, True), rel=1e-12)


def test_numpy_input_and_minimize():
    c = np.random.default_rng(0).random((5, 5))
    res = solve(c, method="certified", maximize=False)
    assert isinstance(res.perm, torch.Tensor)
    assert float(res.objective) == pytest.approx(_scipy_opt(torch.from_numpy(c), False))


def test_sinkhorn_is_approximate_with_a_valid_gap_bound():
    for kind in ("weak", "uniform", "strong"):
        c = make_cost(kind, 200, seed=1)
        res = solve(c, method="sinkhorn")
        assert _is_perm(res.perm) and not res.certified
        true_gap = _scipy_opt(c, True) - float(res.objective)
        assert true_gap >= -1e-9
        assert res.gap is not None and res.gap >= true_gap - 1e-6


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_costs_raise(bad):
    c = torch.rand(3, 8, 8)
    c[2, 1, 5] = bad
    for method in EXACT + ["sinkhorn"]:
        with pytest.raises(ValueError, match="NaN/Inf.*batch 2"):
            solve(c, method=method)


def test_shape_errors_and_unknown_solver():
    with pytest.raises(ValueError, match="square"):
        solve(torch.rand(3, 4))
    with pytest.raises(ValueError, match="unknown solver"):
        solve(torch.rand(3, 3), method="magic")
    res = solve(torch.rand(0, 4, 4))
    assert res.perm.shape == (0, 4)
    res = solve(torch.rand(2, 0, 0))
    assert res.perm.shape == (2, 0)


def test_auto_choice_policy():
    assert auto_choice(1, 100, "cpu") in ("lapx", "scipy")
    assert auto_choice(1, 16384, "cpu") == "certified"
    weak, strong = make_cost("weak", 4096, seed=0), make_cost("strong", 4096, seed=0)
    assert auto_choice(1, 4096, "cpu", weak[None]) == "certified"
    if "lapx" in available_solvers():
        assert auto_choice(1, 4096, "cpu", strong[None]) == "lapx"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_triton_and_certified_on_cuda():
    c = make_cost("weak", 64, batch=256, seed=0).cuda()
    res = solve(c, method="auto")
    assert res.stats["auto"] == "triton" and res.perm.is_cuda
    ref = solve(c.cpu(), method="scipy")
    torch.testing.assert_close(res.objective, ref.objective, rtol=1e-9, atol=1e-6)
    big = make_cost("weak", 4096, seed=1).cuda()
    res = solve(big, method="certified")
    assert float(res.objective) == pytest.approx(_scipy_opt(big.cpu(), True), rel=1e-9)
