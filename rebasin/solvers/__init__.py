"""Linear assignment solvers with one contract (POT style: one function per family).

Problem, for each (n, n) cost ``C`` of a batch:

    maximize (or minimize)  Σ_i C[i, perm[i]]   over permutations perm

    >>> from rebasin.solvers import solve
    >>> res = solve(cost)               # cost (n, n) or (b, n, n); torch or numpy; any device
    >>> res.perm, res.objective, res.certified, res.gap, res.method

Every backend returns a valid permutation or raises — never a non-permutation; NaN/Inf
costs raise ``ValueError``. Backends:

==============  =====  =====================================================================
name            exact  what
==============  =====  =====================================================================
``scipy``       yes    ``scipy.optimize.linear_sum_assignment`` (the reference)
``lapx``        yes    LAPJV from ``lapx`` (when installed; float64 by default)
``emd``         yes    POT ``ot.emd`` network simplex on uniform marginals
``sinkhorn``    no     entropic OT rounded to a permutation; ``gap`` is a dual upper bound
``certified``   yes    Sinkhorn duals → top-k candidate edges → sparse exact solve → dual
                       certificate over all n² edges (adds violating edges until none) —
                       an exact optimum with a proof, far faster than dense at large n
``triton``      yes    batched Hungarian, one GPU program per problem (CUDA; small n)
``auto``        yes    the fastest exact path for the size and device (:func:`auto_choice`)
==============  =====  =====================================================================
"""
from __future__ import annotations

import numpy as np
import torch

from rebasin.solvers._common import Array, Assignment, SolverSpec, SolverUnavailable, finite_check
from rebasin.solvers.certified import solve_certified
from rebasin.solvers.emd_backend import emd_available, solve_emd
from rebasin.solvers.lapx_backend import lapx_available, solve_lapx
from rebasin.solvers.scipy_backend import solve_scipy
from rebasin.solvers.sinkhorn_backend import solve_sinkhorn

__all__ = ["SOLVERS", "Assignment", "SolverSpec", "SolverUnavailable", "auto_choice", "available_solvers", "solve"]


def _triton_available() -> bool:
    from kernels.backend import triton_installed  # noqa: PLC0415

    return triton_installed() and torch.cuda.is_available()


def solve_triton(cost: Array, maximize: bool = True, **_: object) -> Assignment:
    """Batched Hungarian on the GPU (``kernels.hungarian``), verified by its duals in float64."""
    from kernels.hungarian import batched_lap  # noqa: PLC0415
    from rebasin.solvers._common import make_result  # noqa: PLC0415

    c = torch.as_tensor(cost)
    if c.device.type != "cuda":
        c = c.cuda()
    perm, u, v = batched_lap(c.float(), maximize=maximize, backend="triton")
    c64 = c.double()
    red = (u.double()[:, :, None] + v.double()[:, None, :] - c64) if maximize else (
        c64 - u.double()[:, :, None] - v.double()[:, None, :])
    tol = 1e-5 * float(c64.abs().amax().clamp_min(1.0)) * c.shape[-1]
    gap = float((-red.clamp(max=0).amin(dim=2)).sum(dim=1).max()) if c.numel() else 0.0
    return make_result(c, perm.cpu().numpy(), "triton", certified=gap <= tol, gap=gap)


SOLVERS: dict[str, SolverSpec] = {
    "scipy": SolverSpec("scipy", solve_scipy, True, lambda: True, "scipy.optimize.linear_sum_assignment"),
    "lapx": SolverSpec("lapx", solve_lapx, True, lapx_available, "lapx LAPJV"),
    "emd": SolverSpec("emd", solve_emd, True, emd_available, "POT network simplex"),
    "sinkhorn": SolverSpec("sinkhorn", solve_sinkhorn, False, lambda: True, "entropic OT, rounded (approximate)"),
    "certified": SolverSpec("certified", solve_certified, True, lambda: True,
                            "Sinkhorn -> sparse exact -> dual certificate"),
    "triton": SolverSpec("triton", solve_triton, True, _triton_available, "batched GPU Hungarian"),
}

# Measured on 2 CPU cores (benchmarks/results/solvers-cpu.md): below CERTIFIED_MIN_N dense
# LAPJV wins; from there the certified sparse path wins, except on near-permutation costs
# (the row-wise best columns are already almost a permutation), where LAPJV's greedy start
# makes it faster up to CERTIFIED_ALWAYS_N.
CERTIFIED_MIN_N = 2048
CERTIFIED_ALWAYS_N = 8192
NEAR_PERMUTATION = 0.9
TRITON_MAX_N = 128


def greedy_uniqueness(cost: Array, maximize: bool) -> float:
    """Fraction of distinct columns among the rows' best columns (1.0: a permutation)."""
    c = cost if isinstance(cost, torch.Tensor) else torch.from_numpy(np.asarray(cost))
    best = c.argmax(dim=-1) if maximize else c.argmin(dim=-1)
    return float(torch.unique(best).numel()) / max(1, best.numel())


def available_solvers() -> list[str]:
    return [name for name, spec in SOLVERS.items() if spec.available()] + ["auto"]


def auto_choice(b: int, n: int, device: torch.device | str, cost: Array | None = None, maximize: bool = True) -> str:
    """The backend ``auto`` uses for ``b`` problems of size n on ``device`` (``cost``: (b, n, n))."""
    device = torch.device(device)
    dense = "lapx" if SOLVERS["lapx"].available() else "scipy"
    if device.type == "cuda" and n <= TRITON_MAX_N and SOLVERS["triton"].available():
        return "triton"
    if n < CERTIFIED_MIN_N:
        return dense
    if n < CERTIFIED_ALWAYS_N and dense == "lapx" and cost is not None \
            and greedy_uniqueness(cost[0], maximize) >= NEAR_PERMUTATION:
        return dense
    return "certified"


def solve(cost: Array, method: str = "auto", maximize: bool = True, **opts: object) -> Assignment:
    """Solve one (n, n) or a batch (b, n, n) of assignment problems.

    Args:
        cost: torch tensor (any float dtype, any device) or numpy array.
        method: a name from :data:`SOLVERS` or ``"auto"``.
        maximize: maximise Σ C[i, perm[i]] (default — matching maximises similarity).
        opts: backend options (see each backend).
    Returns:
        Assignment with ``perm`` (n,) or (b, n) int64 on the input's device and ``objective``
        () or (b,) float64.
    Raises:
        ValueError: non-square, wrong rank, NaN/Inf, unknown method.
        SolverUnavailable: the backend's dependency is missing.
    """
    is_tensor = isinstance(cost, torch.Tensor)
    device = cost.device if is_tensor else torch.device("cpu")
    c = cost if is_tensor else np.asarray(cost)
    if c.ndim not in (2, 3) or c.shape[-1] != c.shape[-2]:
        raise ValueError(f"cost must be (n, n) or (b, n, n) square, got shape {tuple(c.shape)}")
    squeeze = c.ndim == 2
    if squeeze:
        c = c[None]
    if is_tensor:
        if not c.is_floating_point():
            c = c.double()
    elif not np.issubdtype(c.dtype, np.floating):
        c = c.astype(np.float64)
    finite_check(c)
    b, n = int(c.shape[0]), int(c.shape[1])
    name = auto_choice(b, n, device, c, maximize) if method == "auto" else method
    if name not in SOLVERS:
        raise ValueError(f"unknown solver {method!r}; choose from {', '.join(available_solvers())}")
    spec = SOLVERS[name]
    if not spec.available():
        raise SolverUnavailable(f"solver {name!r} is not available here ({spec.doc}); "
                                f"available: {', '.join(available_solvers())}")
    if b == 0 or n == 0:
        from rebasin.solvers._common import make_result  # noqa: PLC0415

        res = make_result(c, np.zeros((b, n), dtype=np.int64), name, certified=True, gap=0.0)
    else:
        res = spec.fn(c, maximize=maximize, **opts)
    if method == "auto":
        res.stats["auto"] = name
    res.perm = res.perm.to(device)
    if squeeze:
        res.perm, res.objective = res.perm[0], res.objective[0]
    return res
