"""Tests of the linear-assignment solver registry (rebasin.solvers). CPU, fast."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from reference import ref_objective

from rebasin.solvers import SOLVERS, Assignment, available_solvers, solve
from rebasin.solvers import certified as cert_mod
from rebasin.solvers.problems import KINDS, make_cost

EXACT = [m for m in available_solvers() if SOLVERS[m].exact]


def assert_valid(res: Assignment, shape: tuple[int, ...]) -> None:
    assert res.perm.dtype == torch.int64 and tuple(res.perm.shape) == shape
    p = res.perm.reshape(-1, shape[-1]).numpy() if shape[-1] else res.perm.numpy()
    for row in np.atleast_2d(p):
        assert sorted(row.tolist()) == list(range(shape[-1]))


def test_registry():
    assert {"scipy", "emd", "sinkhorn", "certified", "auto"} <= set(available_solvers())
    assert SOLVERS["certified"].exact and not SOLVERS["sinkhorn"].exact
    with pytest.raises(ValueError, match="unknown solver"):
        solve(np.eye(3), method="nope")


@pytest.mark.parametrize("method", EXACT)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("n", [1, 2, 7, 64])
@pytest.mark.parametrize("maximize", [True, False])
def test_exact_small(method, kind, n, maximize):
    c = make_cost(kind, n, seed=n)
    res = solve(c, method=method, maximize=maximize)
    assert_valid(res, (n,))
    assert res.objective.dtype == torch.float64 and res.objective.shape == ()
    np.testing.assert_allclose(float(res.objective), ref_objective(c, maximize)[0], rtol=1e-9, atol=1e-9)
    assert res.certified and res.gap is not None and res.gap <= 1e-6 * max(1.0, abs(float(res.objective)))


@pytest.mark.parametrize("method", EXACT)
@pytest.mark.parametrize("kind", ["strong", "weak", "uniform", "integer", "adversarial"])
def test_exact_batched(method, kind):
    c = make_cost(kind, 48, batch=5, seed=3)
    for maximize in (True, False):
        res = solve(c, method=method, maximize=maximize)
        assert_valid(res, (5, 48))
        assert res.objective.shape == (5,)
        np.testing.assert_allclose(res.objective.numpy(), ref_objective(c, maximize), rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("method", ["certified", "auto", "lapx"])
@pytest.mark.parametrize("kind", KINDS)
def test_exact_large(method, kind):
    if method not in available_solvers():
        pytest.skip(f"{method} unavailable")
    n = 2048 if kind in ("weak", "uniform") else 1024
    c = make_cost(kind, n, seed=11)
    res = solve(c, method=method, maximize=True)
    assert_valid(res, (n,))
    np.testing.assert_allclose(float(res.objective), ref_objective(c, True)[0], rtol=1e-9)
    assert res.certified


def test_certified_loop_adds_edges():
    """k=3 candidates miss the optimum; the certificate must add edges (>1 round) and still be exact."""
    rounds = []
    for kind, n in [("uniform", 512), ("weak", 512)]:
        c = make_cost(kind, n, seed=5)
        for maximize in (True, False):
            res = solve(c, method="certified", maximize=maximize, k=3)
            np.testing.assert_allclose(float(res.objective), ref_objective(c, maximize)[0], rtol=1e-9)
            assert res.certified and res.gap == pytest.approx(0.0, abs=1e-9)
            assert "fallback" not in res.stats
            rounds.append(res.stats["rounds"])
    assert max(rounds) > 1


def test_certified_float64_and_numpy_input():
    c = make_cost("weak", 300, seed=2).double().numpy() * 1e3 + 5.0
    res = solve(c, method="certified", maximize=False)
    assert isinstance(res.perm, torch.Tensor)
    np.testing.assert_allclose(float(res.objective), ref_objective(torch.from_numpy(c), False)[0], rtol=1e-9)


def test_certified_with_sinkhorn_duals():
    c = make_cost("uniform", 400, seed=9)
    res = solve(c, method="certified", sinkhorn_iters=5)
    assert res.stats["sinkhorn_iters"] == 5
    np.testing.assert_allclose(float(res.objective), ref_objective(c, True)[0], rtol=1e-9)


def test_check_rejects_bad_duals():
    """The dense certificate must find violations of deliberately infeasible duals."""
    n = 64
    c = make_cost("uniform", n, seed=1)
    perm = np.arange(n)
    u = c.double().numpy()[np.arange(n), perm]
    v = np.zeros(n)
    _, br, _, gap, _ = cert_mod._check(c, c, perm, u, v, 1e-9, 4, 16)
    assert br.size > 0 and gap > 0


def test_sinkhorn_gap_bound():
    for kind in ("weak", "uniform", "strong"):
        c = make_cost(kind, 200, seed=4)
        for maximize in (True, False):
            res = solve(c, method="sinkhorn", maximize=maximize, n_iters=30, rounding="greedy")
            assert_valid(res, (200,))
            assert not res.certified and res.gap is not None
            true_gap = abs(ref_objective(c, maximize)[0] - float(res.objective))
            assert res.gap >= true_gap - 1e-9


def test_sinkhorn_bound_is_not_trivially_huge():
    c = make_cost("strong", 200, seed=4)
    res = solve(c, method="sinkhorn", n_iters=50)
    assert res.gap < 0.05 * abs(float(res.objective))


@pytest.mark.parametrize("method", available_solvers())
def test_bad_input(method):
    c = make_cost("uniform", 8, batch=4)
    c[3, 2, 5] = float("nan")
    with pytest.raises(ValueError, match=r"NaN/Inf \(batch 3\)"):
        solve(c, method=method)
    d = np.ones((4, 4))
    d[0, 0] = np.inf
    with pytest.raises(ValueError, match="NaN/Inf"):
        solve(d, method=method)
    with pytest.raises(ValueError, match="square"):
        solve(np.ones((3, 4)), method=method)
    with pytest.raises(ValueError):
        solve(np.ones(3), method=method)


@pytest.mark.parametrize("method", available_solvers())
def test_empty_and_tiny(method):
    r0 = solve(torch.zeros(0, 0), method=method)
    assert r0.perm.shape == (0,) and float(r0.objective) == 0.0
    r1 = solve(torch.tensor([[2.5]]), method=method)
    assert r1.perm.tolist() == [0] and float(r1.objective) == 2.5
    rb = solve(np.zeros((3, 0, 0)), method=method)
    assert rb.perm.shape == (3, 0)


def test_integer_input_and_minimize():
    c = np.array([[4, 1, 3], [2, 0, 5], [3, 2, 2]])
    res = solve(c, method="auto", maximize=False)
    assert float(res.objective) == 5.0


def test_check_perm_catches_non_permutation():
    from rebasin.solvers._common import check_perm

    with pytest.raises(RuntimeError):
        check_perm(np.array([[0, 0, 1]]), 3, "x")
    with pytest.raises(RuntimeError):
        check_perm(np.array([[0, 1, 3]]), 3, "x")


def test_lapx_unavailable_message(monkeypatch):
    import rebasin.solvers as S
    from rebasin.solvers._common import SolverUnavailable

    spec = S.SOLVERS["lapx"]
    monkeypatch.setitem(S.SOLVERS, "lapx", type(spec)("lapx", spec.fn, True, lambda: False))
    assert "lapx" not in S.available_solvers()
    with pytest.raises(SolverUnavailable, match="lapx"):
        S.solve(np.eye(3), method="lapx")


@pytest.mark.parametrize("maximize", [True, False])
def test_auto_row_bound_path_and_mixed_batches(maximize):
    strong = make_cost("strong", 600, seed=4) * (1 if maximize else -1)
    res = solve(strong, method="auto", maximize=maximize)
    assert res.stats["auto_choice"] == "row-best" and res.certified
    assert float(res.objective) == pytest.approx(ref_objective(strong, maximize)[0], rel=1e-12)
    # a batch where the row bound settles some problems and a backend the rest
    mixed = torch.cat([make_cost("strong", 256, batch=3, seed=5), make_cost("uniform", 256, batch=3, seed=6)])
    mixed = mixed[torch.tensor([0, 3, 1, 4, 2, 5])] * (1 if maximize else -1)
    res = solve(mixed, method="auto", maximize=maximize)
    assert res.stats["row_best"] == 3 and res.stats["auto_choice"] != "row-best"
    np.testing.assert_allclose(res.objective.numpy(), ref_objective(mixed, maximize), rtol=1e-12)
    assert_valid(res, (6, 256))
    # ties: every row's best column is column 0, not a permutation -> a backend decides
    res = solve(torch.ones(600, 600), method="auto", maximize=maximize)
    assert res.stats["row_best"] == 0 and float(res.objective) == 600.0
    # small inputs skip the bound
    assert "row_best" not in solve(make_cost("strong", 64, seed=1), method="auto").stats


def test_auto_choice_hook():
    from rebasin.solvers.auto import auto_choice as _auto_choice

    assert _auto_choice(1, 16, "cpu") in ("lapx", "scipy")
    assert _auto_choice(1, 10_000, "cpu") == "certified"
    dense = "lapx" if "lapx" in available_solvers() else "scipy"
    assert _auto_choice(1, 10_000, "cpu", distinct=0.9) == dense  # few conflicts: dense JV
    tied = make_cost("integer", 1024, seed=0)[None]
    assert _auto_choice(1, 1024, "cpu", 0.5, tied) == "scipy"


def test_auto_between_row_bound_and_dense_jv():
    """Planted costs with noise: the row bound settles none, JV or the certificate takes over,
    the optimum is scipy's either way."""
    g = torch.Generator().manual_seed(0)
    n, d = 1024, 256
    a = torch.randn(n, d, generator=g)
    for sigma, want in ((3.0, "lapx"), (6.0, "certified")):
        c = (a[torch.randperm(n, generator=g)] + sigma * torch.randn(n, d, generator=g)) @ a.T / d
        res = solve(c, method="auto")
        assert res.stats["row_best"] == 0 and res.certified
        if "lapx" in available_solvers():
            assert res.stats["auto_choice"] == want
        assert float(res.objective) == pytest.approx(ref_objective(c, True)[0], rel=1e-12)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_auto_uses_batched_hungarian_and_matches_scipy():
    c = make_cost("weak", 64, batch=256, seed=0).cuda()
    res = solve(c, method="auto")
    assert res.stats["auto_choice"] == "triton" and res.perm.is_cuda and res.certified
    want = torch.from_numpy(ref_objective(c, True))
    torch.testing.assert_close(res.objective, want, rtol=1e-6, atol=1e-6)
    big = make_cost("weak", 4096, seed=1).cuda()
    res = solve(big, method="certified")
    assert float(res.objective) == pytest.approx(float(ref_objective(big, True)[0]), rel=1e-9)
