"""The solver registry: name -> backend (``SOLVERS``), and ``solve``, which checks the input and
dispatches to one (docs/design.md, Solvers).

Every backend has the uniform signature ``fn(cost (b, n, n) tensor, maximize, **opts) -> Assignment``
(see ``_common``); ``solve`` normalises the input (numpy or tensor, (n, n) or (b, n, n), any
float dtype), rejects non-square or non-finite costs, answers empty problems itself, checks the
backend's permutations and squeezes a single problem's result. Backends run under the thread
policy (``_common.scan_threads``: the solvers' own CPU scans single-threaded, batches of
independent problems spread over the caller's threads; docs/design.md, Thread policy).
``method="auto"`` on a CPU float input goes straight to ``auto.solve_auto_cpu`` (the same checks
in fused C passes).
"""
from __future__ import annotations

import numpy as np
import torch

from rebasin.solvers._common import (
    Array,
    Assignment,
    SolverSpec,
    SolverUnavailable,
    check_perm,
    finite_check,
    scan_threads,
)
from rebasin.solvers.auto import solve_auto, solve_auto_cpu
from rebasin.solvers.certified import solve_certified
from rebasin.solvers.emd_backend import emd_available, solve_emd
from rebasin.solvers.jv_backend import jv_available, solve_jv
from rebasin.solvers.laprust_backend import laprust_available, solve_laprust
from rebasin.solvers.lapx_backend import lapx_available, solve_lapx
from rebasin.solvers.scipy_backend import solve_scipy
from rebasin.solvers.sinkhorn_backend import solve_sinkhorn
from rebasin.solvers.triton_backend import solve_triton, triton_available


def _always() -> bool:
    return True


SOLVERS: dict[str, SolverSpec] = {
    "scipy": SolverSpec("scipy", solve_scipy, True, _always),
    "jv": SolverSpec("jv", solve_jv, True, jv_available),
    "lapx": SolverSpec("lapx", solve_lapx, True, lapx_available),
    "laprust": SolverSpec("laprust", solve_laprust, True, laprust_available),
    "emd": SolverSpec("emd", solve_emd, True, emd_available),
    "sinkhorn": SolverSpec("sinkhorn", solve_sinkhorn, False, _always),
    "certified": SolverSpec("certified", solve_certified, True, _always),
    "triton": SolverSpec("triton", solve_triton, True, triton_available),
    "auto": SolverSpec("auto", solve_auto, True, _always),
}


def solver_names() -> list[str]:
    """Every registered method name, usable here or not (e.g. a CLI's ``--solver`` choices)."""
    return list(SOLVERS)


def available_solvers() -> list[str]:
    """Names of the backends usable here."""
    return [name for name, spec in SOLVERS.items() if spec.available()]


def _as_batch(cost: Array) -> torch.Tensor:
    """``cost`` as a float tensor (float32 at least, ints -> float64) of shape (n, n) or (b, n, n);
    ValueError for any other shape or a non-square one."""
    if not isinstance(cost, torch.Tensor):
        cost = np.asarray(cost)
        if not np.issubdtype(cost.dtype, np.floating):
            cost = cost.astype(np.float64)
        cost = torch.from_numpy(np.ascontiguousarray(cost))
    if not torch.is_floating_point(cost):
        cost = cost.to(torch.float64)
    if cost.dtype in (torch.float16, torch.bfloat16):
        cost = cost.float()
    if cost.ndim not in (2, 3):
        raise ValueError(f"cost must have shape (n, n) or (b, n, n), got {tuple(cost.shape)}")
    if cost.shape[-1] != cost.shape[-2]:
        raise ValueError(f"cost matrix must be square, got {tuple(cost.shape)}")
    return cost


def solve(cost: Array, method: str = "auto", maximize: bool = True, **opts) -> Assignment:
    """Solve ``max (or min) over permutations p of sum_i cost[..., i, p[i]]``.

    Args:
        cost: (n, n) or (b, n, n) tensor/array, float (ints are converted to float64).
        method: a name from ``available_solvers()``.
        maximize: maximise (default: matching maximises similarity) or minimise.
        **opts: backend options.
    Returns:
        Assignment with perm (n,) / (b, n) int64 (on the input tensor's device; CPU for numpy)
        and objective () / (b,) float64.
    Raises:
        ValueError: bad shape, non-square, NaN/Inf ("cost matrix contains NaN/Inf (batch k)"),
            unknown method. SolverUnavailable: the backend's dependency is missing.
    """
    if method == "auto" and not opts:
        res = solve_auto_cpu(cost, maximize)  # CPU: the same contract and answer, fused passes
        if res is not None:
            return res
    if method not in SOLVERS:
        raise ValueError(f"unknown solver {method!r}; choose from {', '.join(SOLVERS)}")
    spec = SOLVERS[method]
    if not spec.available():
        raise SolverUnavailable(f"solver {method!r} is not available here (missing optional dependency); "
                                f"available: {', '.join(available_solvers())}")
    t = _as_batch(cost)
    batched = t[None] if t.ndim == 2 else t
    if batched.numel():
        finite_check(batched)
    b, n = batched.shape[0], batched.shape[1]
    if b == 0 or n == 0:
        perm = torch.zeros((b, n), dtype=torch.int64)
        res = Assignment(perm, torch.zeros(b, dtype=torch.float64), True, 0.0, method, {"trivial": True})
    else:
        with scan_threads(batched.device):  # docs/design.md, Thread policy
            res = spec.fn(batched, maximize, **opts)
    check_perm(res.perm, n, res.method)
    if isinstance(cost, torch.Tensor) and res.perm.device != t.device:
        res.perm = res.perm.to(t.device)
    if t.ndim == 2:
        res.perm = res.perm[0]
        res.objective = res.objective[0]
    return res
