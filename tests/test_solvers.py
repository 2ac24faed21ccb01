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


@pytest.mark.parametrize("method", ["certified", "auto", "lapx", "laprust", "jv"])
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


@pytest.fixture
def no_native(monkeypatch):
    """The install without the C extension: numpy/torch paths only."""
    from rebasin.solvers import native

    monkeypatch.setattr(native, "native_available", lambda: False)
    assert "jv" not in available_solvers()


NATIVE = pytest.mark.skipif("jv" not in available_solvers(), reason="C extension not built")


@NATIVE
@pytest.mark.parametrize("maximize", [True, False])
def test_auto_row_bound_path_and_mixed_batches(maximize):
    sign = 1 if maximize else -1
    strong = make_cost("strong", 1100, seed=4) * sign  # above JV_MAX_N: the fused row bound
    res = solve(strong, method="auto", maximize=maximize)
    assert res.stats["auto_choice"] == "row-best" and res.certified
    assert float(res.objective) == pytest.approx(ref_objective(strong, maximize)[0], rel=1e-12)
    # a batch where the row bound settles some problems and a backend the rest
    mixed = torch.cat([make_cost("strong", 1100, batch=2, seed=5), make_cost("uniform", 1100, batch=2, seed=6)])
    mixed = mixed[torch.tensor([0, 2, 1, 3])] * sign
    res = solve(mixed, method="auto", maximize=maximize)
    assert res.stats["row_best"] == 2 and res.stats["auto_choice"] != "row-best"
    np.testing.assert_allclose(res.objective.numpy(), ref_objective(mixed, maximize), rtol=1e-12)
    assert_valid(res, (4, 1100))
    # ties: every row's best column is column 0, not a permutation -> a backend decides
    res = solve(torch.ones(1100, 1100), method="auto", maximize=maximize)
    assert res.stats["row_best"] == 0 and float(res.objective) == 1100.0


@pytest.mark.parametrize("maximize", [True, False])
def test_auto_general_path_row_bound(no_native, maximize):
    """Without the C extension: the torch/numpy row bound, mixed batches, small inputs skip it."""
    sign = 1 if maximize else -1
    strong = make_cost("strong", 600, seed=4) * sign
    res = solve(strong, method="auto", maximize=maximize)
    assert res.stats["auto_choice"] == "row-best" and res.certified
    assert float(res.objective) == pytest.approx(ref_objective(strong, maximize)[0], rel=1e-12)
    mixed = torch.cat([make_cost("strong", 256, batch=3, seed=5), make_cost("uniform", 256, batch=3, seed=6)])
    mixed = mixed[torch.tensor([0, 3, 1, 4, 2, 5])] * sign
    res = solve(mixed, method="auto", maximize=maximize)
    assert res.stats["row_best"] == 3 and res.stats["auto_choice"] != "row-best"
    np.testing.assert_allclose(res.objective.numpy(), ref_objective(mixed, maximize), rtol=1e-12)
    assert "row_best" not in solve(make_cost("strong", 64, seed=1), method="auto").stats
    for kind in ("weak", "integer"):
        c = make_cost(kind, 300, seed=2)
        assert float(solve(c, method="auto", maximize=maximize).objective) == pytest.approx(
            ref_objective(c, maximize)[0], rel=1e-12)
    c = make_cost("weak", 700, seed=3)
    res = solve(c, method="certified")
    assert "native" not in res.stats
    assert float(res.objective) == pytest.approx(ref_objective(c, True)[0], rel=1e-12)


def test_auto_choice_hook():
    from rebasin.solvers.auto import auto_choice as _auto_choice
    from rebasin.solvers.auto import certified_threshold, dense_backend

    dense = dense_backend()
    assert _auto_choice(1, 16, "cpu") == dense
    assert _auto_choice(4, 10_000, "cpu") == dense  # batches: dense JV
    assert _auto_choice(1, 10_000, "cpu") == "certified"
    assert _auto_choice(1, 10_000, "cpu", distinct=0.95) == dense  # few conflicts: dense JV
    tied = make_cost("integer", 3000, seed=0)[None]
    assert _auto_choice(1, 3000, "cpu", 0.5, tied) == dense  # degenerate duals: dense JV
    assert certified_threshold(1024, "native") == 0.0
    assert 0.68 <= certified_threshold(3000, "native") <= 0.79 <= certified_threshold(4096, "native")
    assert certified_threshold(100_000, "native") == 0.90


@NATIVE
def test_auto_routes_by_shape_and_difficulty():
    """CPU with the C extension: easy problems and head batches to the C JV, hard mid-size ones to
    lapjvr, large hard ones to certified, large strong ones to the row bound; always scipy's optimum."""
    from rebasin.solvers.auto import dense_backend, jv_threshold

    dense = dense_backend()
    cases = [
        (make_cost("moderate", 256, seed=1), {"jv"}),
        (make_cost("strong", 200, seed=1), {"jv"}),
        (make_cost("strong", 300, seed=1), {"row-best"}),  # above JV_FIRST_MAX_N: the fused row bound
        (make_cost("weak", 64, batch=64, seed=1), {"jv"}),  # attention heads
        (make_cost("weak", 128, batch=16, seed=1), {"jv"}),
        (make_cost("weak", 512, seed=1), {dense}),  # hard above n = 256
        (make_cost("moderate", 1024, seed=1), {"jv"}),
        (make_cost("weak", 520, batch=2, seed=1), {dense}),  # a batch above JV_FIRST_MAX_N
        (make_cost("integer", 256, seed=1), {dense}),  # ties: the column reduction matches few rows
        (make_cost("weak", 2048, seed=1), {"certified"}),
        (make_cost("moderate", 2048, seed=1), {"jv"}),  # few conflicts above JV_MAX_N: the C JV
    ]
    if dense == "scipy":  # without lapjvr the C JV takes every problem up to JV_MAX_N
        cases = [(c, {"jv"} if c.shape[-1] <= 1024 else want) for c, want in cases]
    for c, want in cases:
        for maximize in (True, False):
            res = solve(c, method="auto", maximize=maximize)
            if maximize:  # the kinds are similarities: minimising them is another (harder) problem
                assert res.stats["auto_choice"] in want, (tuple(c.shape), res.stats["auto_choice"])
            assert res.certified and res.gap == 0.0
            np.testing.assert_allclose(res.objective.numpy(), ref_objective(c, maximize), rtol=1e-12)
    assert jv_threshold(64) == jv_threshold(128) < jv_threshold(256) < jv_threshold(512) <= jv_threshold(1024) <= 1
    assert jv_threshold(1025) > jv_threshold(1024)


def test_auto_between_row_bound_and_dense_jv():
    """Planted costs with noise above JV_MAX_N: the row bound settles none, dense JV (the C one
    with few conflicts, lapjvr with more) or the certificate takes over (by the fraction of
    distinct best columns), the optimum is scipy's."""
    from rebasin.solvers.auto import dense_backend

    g = torch.Generator().manual_seed(0)
    n, d = 2048, 256
    a = torch.randn(n, d, generator=g)
    for sigma, want in ((2.0, {"jv"}), (3.5, {dense_backend()}), (6.0, {"certified"})):
        c = (a[torch.randperm(n, generator=g)] + sigma * torch.randn(n, d, generator=g)) @ a.T / d
        res = solve(c, method="auto")
        assert res.stats["row_best"] == 0 and res.certified
        if "jv" in available_solvers():
            assert res.stats["auto_choice"] in want, (sigma, res.stats)
        assert float(res.objective) == pytest.approx(ref_objective(c, True)[0], rel=1e-12)


@pytest.mark.parametrize("method", [m for m in ("jv", "laprust", "lapx", "auto") if m in available_solvers()])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_dense_backends_large_values_and_ties(method, dtype):
    """Large finite magnitudes (no -inf anywhere), exact ties, n = 1, batches, float32 and float64."""
    big = 1e30 if dtype == torch.float32 else 1e300
    cases = [
        make_cost("uniform", 50, batch=3, seed=1).to(dtype) * big,
        (make_cost("uniform", 40, seed=2).to(dtype) - 0.5) * big,
        make_cost("integer", 33, batch=2, seed=3).to(dtype),
        make_cost("constant", 20, seed=4).to(dtype),
        torch.full((1, 1), -big, dtype=dtype),
        make_cost("adversarial", 70, seed=5).to(dtype),
    ]
    for c in cases:
        for maximize in (True, False):
            res = solve(c, method=method, maximize=maximize)
            assert_valid(res, tuple(c.shape[:-1]))
            np.testing.assert_allclose(res.objective.numpy(), ref_objective(c, maximize), rtol=1e-12)


@NATIVE
def test_jv_defers_hard_problems_and_checks_input():
    from rebasin.solvers import native

    c = make_cost("weak", 64, batch=4, seed=0).numpy().copy()
    perm, obj, status, bad = native.jv(c, -1.0, 2, 0.0)
    assert (status == native.JV_OK).all() and bad == 0
    np.testing.assert_allclose(obj, ref_objective(torch.from_numpy(c), True), rtol=1e-12)
    assert (native.jv(c, -1.0, 1, 0.99)[2] == native.JV_DEFERRED).all()  # min_matched: left to lapjvr
    c[2, 5, 7] = np.nan
    assert native.jv(c, -1.0, 2, 0.0)[2].tolist() == [0, 0, native.JV_NONFINITE, 0]
    assert native.jv(c, -1.0, 2, 0.0)[3] == 1
    with pytest.raises(ValueError, match=r"NaN/Inf \(batch 2\)"):
        solve(c, method="auto")
    with pytest.raises(ValueError, match=r"NaN/Inf \(batch 2\)"):
        solve(c, method="jv")


@NATIVE
def test_native_certificate_and_sparse_matcher():
    """The C certificate finds violations of infeasible duals; the warm-started sparse matcher is
    optimal on its edges and re-augments after edges are added."""
    from rebasin.solvers import native

    n = 64
    c = make_cost("uniform", n, seed=1).numpy()
    rowmin = np.zeros(n)
    u, v = c[np.arange(n), np.arange(n)].astype(np.float64), np.zeros(n)
    br, _, bad = native.check(c, 1.0, u, v, 1e-9, 4, np.arange(n), rowmin)
    assert br.size > 0 and bad > 0 and rowmin.min() < 0
    f, g, ei, ej, scale = native.candidates(c, 1.0, 4)
    assert scale == pytest.approx(float(np.abs(c).max()))
    ar = np.arange(n)
    key = np.unique(np.r_[ei * n + ej, ar * (n + 1)])
    m = native.SparseMatcher(n, g)
    for extra in (np.zeros(0, dtype=np.int64), np.arange(n * n)):  # then all edges: the dense optimum
        key = np.union1d(key, extra)
        ei, ej = np.divmod(key, n)
        perm = m.solve(ei, ej, c[ei, ej].astype(np.float64))
        assert sorted(perm.tolist()) == list(range(n))
        red = c[ei, ej] - m.u[ei] - m.v[ej]
        assert red.min() > -1e-12 and np.abs(c[ar, perm] - m.u - m.v[perm]).max() < 1e-12
    assert float(c[ar, perm].sum()) == pytest.approx(ref_objective(torch.from_numpy(c), False)[0], rel=1e-12)


@pytest.mark.parametrize("kind", ["weak", "uniform", "moderate", "integer", "adversarial"])
def test_certified_native_and_torch_paths_agree(kind):
    n = 700 if kind != "adversarial" else 300
    c = make_cost(kind, n, seed=8)
    want = ref_objective(c, True)[0]
    for native_path in (None, False):
        res = solve(c, method="certified", native=native_path)
        assert res.certified
        assert float(res.objective) == pytest.approx(want, rel=1e-12)


def test_thread_policy_restores_and_budgets():
    from rebasin.solvers import _common

    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        with _common.scan_threads("cpu"):
            assert torch.get_num_threads() == 1 and _common.outer_threads() == 2
            with _common.scan_threads("cpu"):  # nested: a no-op
                assert torch.get_num_threads() == 1 and _common.outer_threads() == 2
        assert torch.get_num_threads() == 2 and _common.outer_threads() == 2
        solve(make_cost("weak", 600, seed=1), method="certified")
        solve(make_cost("weak", 64, batch=8, seed=1), method="auto")
        assert torch.get_num_threads() == 2
        with pytest.raises(ValueError):
            solve(torch.full((3, 3), float("nan")), method="certified")
        assert torch.get_num_threads() == 2  # restored on errors too
    finally:
        torch.set_num_threads(before)


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
