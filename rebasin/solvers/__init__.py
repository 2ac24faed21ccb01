"""Linear-assignment solver registry: one contract, several backends.

    from rebasin.solvers import solve, Assignment, available_solvers, SOLVERS
    res = solve(cost, method="auto", maximize=True)

``cost``: torch.Tensor or numpy array of shape (n, n) or (b, n, n), any float dtype, any device.
Returns an :class:`Assignment` (perm int64 (n,)/(b, n) on the input's device, float64 objective,
certified, gap, method, stats). Every backend returns valid permutations or raises.

Backends (``SOLVERS``): scipy (reference), lapx (JV), emd (POT network simplex), sinkhorn
(entropic, approximate, with a dual gap bound), certified (Sinkhorn/reduction duals -> sparse
exact -> dense dual certificate), and ``auto`` which picks among them (see ``_auto_choice``).

``auto`` first tries the row bound (inputs of ROW_BOUND_MIN_ENTRIES entries or more): if every
row's best column is a different column, that permutation is optimal (no assignment can beat
the sum of row maxima; duals u = row maxima, v = 0 certify it). Planted, same-lineage and other
strong-signal costs are solved by this one O(n^2) pass; the rest go to the backend
``_auto_choice`` names.
"""
from __future__ import annotations

import numpy as np
import torch
from rebasin_kernels.hungarian import column_hits

from rebasin.solvers._common import (
    Array,
    Assignment,
    SolverSpec,
    SolverUnavailable,
    check_perm,
    finite_check,
)
from rebasin.solvers.certified import solve_certified
from rebasin.solvers.emd_backend import emd_available, solve_emd
from rebasin.solvers.lapx_backend import lapx_available, solve_lapx
from rebasin.solvers.scipy_backend import solve_scipy
from rebasin.solvers.sinkhorn_backend import solve_sinkhorn

__all__ = ["SOLVERS", "Assignment", "SolverSpec", "SolverUnavailable", "available_solvers", "solve"]

# ---- auto thresholds (measured on a 2-core CPU, see benchmarks/results/solvers-cpu.md) ------
# Below AUTO_DENSE_MAX_N a dense JV solve (lapx, else scipy) is always fastest: the certified
# path pays ~4 dense O(n^2) passes plus sparse overhead. Above it, dense JV is still fastest
# while the rows' best columns are mostly distinct (few conflicts left for JV's augmentations):
# planted costs with growing noise, n = 2048 / 8192, lapx vs certified seconds, by the fraction
# of distinct best columns: 0.92 -> 0.018/0.043, 0.51/1.30; 0.86 -> 0.032/0.079, 1.30/1.57;
# 0.80-0.83 -> 0.118/0.081, 2.27/1.72 (dense JV degrades fast below; certified stays flat).
AUTO_DENSE_MAX_N = 768
AUTO_EASY_DISTINCT = 0.85
# below this many cost entries the row bound can save at most ~0.1 ms but costs ~0.05 ms of
# dispatch: small inputs go straight to the backend
ROW_BOUND_MIN_ENTRIES = 1 << 18


TRITON_MAX_N = 128  # batched GPU Hungarian (rebasin_kernels.hungarian): one program per problem


def _triton_available() -> bool:
    from rebasin_kernels.backend import triton_installed

    return triton_installed() and torch.cuda.is_available()


def solve_triton(cost: Array, maximize: bool = True, **_: object) -> Assignment:
    """Batched Hungarian on the GPU (``rebasin_kernels.hungarian``, fp32), checked by its duals in float64:
    ``gap`` bounds the distance to the optimum and ``certified`` says it is within round-off."""
    from rebasin_kernels.hungarian import batched_lap

    from rebasin.solvers._common import make_result

    c = torch.as_tensor(cost)
    c = c if c.device.type == "cuda" else c.cuda()
    perm, u, v = batched_lap(c.float(), maximize=maximize, backend="triton")
    c64, u64, v64 = c.double(), u.double()[:, :, None], v.double()[:, None, :]
    red = (u64 + v64 - c64) if maximize else (c64 - u64 - v64)
    gap = float((-red.clamp(max=0).amin(dim=2)).sum(dim=1).max())
    tol = 1e-5 * max(1.0, float(c64.abs().amax())) * c.shape[-1]
    return make_result(c, perm.cpu().numpy(), "triton", certified=gap <= tol, gap=gap)


def row_best_assignment(c: torch.Tensor, maximize: bool) -> tuple[torch.Tensor, np.ndarray]:
    """Each row's best column, and the fraction of distinct columns among them, per problem.

    Args: c (b, n, n). Returns (perm (b, n) int64 on c's device, distinct (b,) float64 numpy).
    Where ``distinct == 1``, ``perm`` is a permutation attaining ``sum_i max_j c[i, j]`` (min
    for minimisation), a bound no assignment can beat: it is optimal, certified by the duals
    u = row maxima, v = 0.
    """
    b, n = c.shape[0], c.shape[1]
    if c.device.type == "cpu":  # numpy: ~3x faster argmax than torch's on CPU, cheaper small ops
        best_np = (np.argmax if maximize else np.argmin)(c.detach().numpy(), axis=2)
        return torch.from_numpy(best_np), (column_hits(best_np) > 0).mean(axis=1)
    best = (torch.argmax if maximize else torch.argmin)(c, dim=2)
    hit_t = torch.zeros(b, n, dtype=torch.bool, device=c.device).scatter_(1, best, True)
    return best, (hit_t.sum(dim=1) / max(n, 1)).cpu().double().numpy()


def _auto_choice(b: int, n: int, device: torch.device | str, distinct: float = 0.0,
                 cost: torch.Tensor | None = None) -> str:
    """Backend name for a (b, n, n) problem on ``device`` that the row bound did not settle.

    ``distinct``: the smallest fraction of distinct best columns over the batch
    (``row_best_assignment``). CUDA, n <= TRITON_MAX_N: the batched GPU Hungarian.
    n <= AUTO_DENSE_MAX_N or batches: dense JV (lapx, else scipy). Larger: dense JV when the
    best columns are mostly distinct (>= AUTO_EASY_DISTINCT); scipy on heavily tied ``cost``
    (few distinct values in a sampled row: dual certificates degenerate); else ``certified``.
    """
    dense = "lapx" if lapx_available() else "scipy"
    if torch.device(device).type == "cuda" and n <= TRITON_MAX_N and SOLVERS["triton"].available():
        return "triton"
    if n <= AUTO_DENSE_MAX_N or b > 1 or distinct >= AUTO_EASY_DISTINCT:
        return dense
    if cost is not None:
        row = cost[0, 0, : min(n, 512)]
        if int(torch.unique(row).numel()) < row.numel() // 4:
            return "scipy"
    return "certified"


def _run_exact(name: str, c: torch.Tensor, maximize: bool, opts: dict) -> tuple[str, Assignment]:
    """Run backend ``name``; an answer it cannot certify (the fp32 GPU Hungarian's float64 dual
    check failed) is replaced by scipy's. Returns (backend used, result)."""
    res = SOLVERS[name].fn(c, maximize, **opts)
    return (name, res) if res.certified else ("scipy", solve_scipy(c, maximize))


def _solve_auto(cost: Array, maximize: bool = True, **opts) -> Assignment:
    """Row bound first (``row_best_assignment``); the problems it leaves go to the fastest exact
    backend for the shape/device (``_auto_choice``). perm (b, n), certified."""
    from rebasin.solvers._common import make_result

    c = torch.as_tensor(cost)
    b, n = c.shape[0], c.shape[1]
    if c.numel() < ROW_BOUND_MIN_ENTRIES:
        name, res = _run_exact(_auto_choice(b, n, c.device, 0.0, c), c, maximize, opts)
        res.stats = {**res.stats, "auto_choice": name}
        return res
    best, distinct = row_best_assignment(c, maximize)
    ok = distinct == 1
    n_ok = int(ok.sum())
    if n_ok == b:
        res = make_result(c, best.cpu().numpy(), "auto", certified=True, gap=0.0)
        res.stats = {"auto_choice": "row-best", "row_best": b}
        return res
    rest = torch.from_numpy(np.flatnonzero(~ok))
    sub = c if n_ok == 0 else c.index_select(0, rest.to(c.device))
    name, res = _run_exact(_auto_choice(sub.shape[0], n, c.device, float(distinct[~ok].min()), sub), sub,
                           maximize, opts)
    if n_ok:
        perm = best.cpu().clone()
        perm[rest] = res.perm.cpu()
        merged = make_result(c, perm.numpy(), res.method, certified=res.certified, gap=res.gap)
        merged.stats = res.stats
        res = merged
    res.stats = {**res.stats, "auto_choice": name, "row_best": n_ok}
    return res


SOLVERS: dict[str, SolverSpec] = {
    "scipy": SolverSpec("scipy", solve_scipy, True, lambda: True, solve_scipy.__doc__ or ""),
    "lapx": SolverSpec("lapx", solve_lapx, True, lapx_available, solve_lapx.__doc__ or ""),
    "emd": SolverSpec("emd", solve_emd, True, emd_available, solve_emd.__doc__ or ""),
    "sinkhorn": SolverSpec("sinkhorn", solve_sinkhorn, False, lambda: True, solve_sinkhorn.__doc__ or ""),
    "certified": SolverSpec("certified", solve_certified, True, lambda: True, solve_certified.__doc__ or ""),
    "triton": SolverSpec("triton", solve_triton, True, _triton_available, solve_triton.__doc__ or ""),
    "auto": SolverSpec("auto", _solve_auto, True, lambda: True, _solve_auto.__doc__ or ""),
}


def available_solvers() -> list[str]:
    """Names of the backends usable here."""
    return [name for name, spec in SOLVERS.items() if spec.available()]


def solve(cost: Array, method: str = "auto", maximize: bool = True, **opts) -> Assignment:
    """Solve ``max (or min) over permutations p of sum_i cost[..., i, p[i]]``.

    Args:
        cost: (n, n) or (b, n, n) tensor/array, float (ints are converted to float64).
        method: a name from ``available_solvers()``.
        maximize: maximise (default: matching maximises similarity) or minimise.
        **opts: backend options.
    Raises:
        ValueError: bad shape, non-square, NaN/Inf ("cost matrix contains NaN/Inf (batch k)"),
            unknown method. SolverUnavailable: the backend's dependency is missing.
    """
    if method not in SOLVERS:
        raise ValueError(f"unknown solver {method!r}; choose from {', '.join(SOLVERS)}")
    spec = SOLVERS[method]
    if not spec.available():
        raise SolverUnavailable(f"solver {method!r} is not available here (missing optional dependency); "
                                f"available: {', '.join(available_solvers())}")
    is_tensor = isinstance(cost, torch.Tensor)
    if not is_tensor:
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
    squeeze = cost.ndim == 2
    batched = cost[None] if squeeze else cost
    if batched.numel():
        finite_check(batched)
    b, n = batched.shape[0], batched.shape[1]
    if b == 0 or n == 0:
        perm = torch.zeros((b, n), dtype=torch.int64)
        res = Assignment(perm, torch.zeros(b, dtype=torch.float64), True, 0.0, method, {"trivial": True})
    else:
        res = spec.fn(batched, maximize, **opts)
    check_perm(res.perm, n, res.method)
    if is_tensor:
        res.perm = res.perm.to(cost.device)
    if squeeze:
        res.perm = res.perm[0]
        res.objective = res.objective[0]
    return res
