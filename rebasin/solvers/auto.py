"""The ``auto`` policy (docs/design.md, The auto policy): the row bound first, then the fastest exact
backend for the shape and device.

Row bound (inputs of ROW_BOUND_MIN_ENTRIES entries or more): if every row's best column is a
different column, that permutation is optimal (no assignment can beat the sum of row maxima;
duals u = row maxima, v = 0 certify it). Planted, same-lineage and other strong-signal costs
are solved by this one O(n^2) pass; the rest go to the backend ``auto_choice`` names.
"""
from __future__ import annotations

import numpy as np
import torch
from rebasin_kernels.hungarian import column_hits

from rebasin.solvers._common import Array, Assignment, make_result
from rebasin.solvers.lapx_backend import lapx_available
from rebasin.solvers.scipy_backend import solve_scipy
from rebasin.solvers.triton_backend import triton_available

# ---- thresholds (measured on a 2-core CPU, see benchmarks/results/solvers-cpu.md) -----------
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


def row_best_assignment(c: torch.Tensor, maximize: bool) -> tuple[torch.Tensor, np.ndarray]:
    """Each row's best column, and the fraction of distinct columns among them, per problem.

    Args: c (b, n, n). Returns (perm (b, n) int64 on c's device, distinct (b,) float64 numpy).
    Where ``distinct == 1``, ``perm`` is a permutation attaining ``sum_i max_j c[i, j]`` (min
    for minimisation), a bound no assignment can beat: it is optimal, certified by the duals
    u = row maxima, v = 0.
    """
    if c.device.type == "cpu":  # numpy: ~3x faster argmax than torch's on CPU, cheaper small ops
        best_np = (np.argmax if maximize else np.argmin)(c.detach().numpy(), axis=2)
        return torch.from_numpy(best_np), (column_hits(best_np) > 0).mean(axis=1)
    best = (torch.argmax if maximize else torch.argmin)(c, dim=2)
    return best, (column_hits(best) > 0).double().mean(dim=1).cpu().numpy()


def auto_choice(b: int, n: int, device: torch.device | str, distinct: float = 0.0,
                cost: torch.Tensor | None = None) -> str:
    """Backend name for a (b, n, n) problem on ``device`` that the row bound did not settle.

    ``distinct``: the smallest fraction of distinct best columns over the batch
    (``row_best_assignment``). CUDA, n <= TRITON_MAX_N: the batched GPU Hungarian.
    n <= AUTO_DENSE_MAX_N or batches: dense JV (lapx, else scipy). Larger: dense JV when the
    best columns are mostly distinct (>= AUTO_EASY_DISTINCT); scipy on heavily tied ``cost``
    (few distinct values in a sampled row: dual certificates degenerate); else ``certified``.
    """
    dense = "lapx" if lapx_available() else "scipy"
    if torch.device(device).type == "cuda" and n <= TRITON_MAX_N and triton_available():
        return "triton"
    if n <= AUTO_DENSE_MAX_N or b > 1 or distinct >= AUTO_EASY_DISTINCT:
        return dense
    if cost is not None:
        row = cost[0, 0, : min(n, 512)]
        if int(torch.unique(row).numel()) < row.numel() // 4:
            return "scipy"
    return "certified"


def _run_exact(name: str, c: torch.Tensor, maximize: bool, opts: dict) -> tuple[str, Assignment]:
    """Run backend ``name`` on c (b, n, n); an answer it cannot certify (the fp32 GPU Hungarian's
    float64 dual check failed) is replaced by scipy's. Returns (backend used, result)."""
    from rebasin.solvers.registry import SOLVERS  # the registry lists this module's solve_auto

    res = SOLVERS[name].fn(c, maximize, **opts)
    return (name, res) if res.certified else ("scipy", solve_scipy(c, maximize))


def solve_auto(cost: Array, maximize: bool = True, **opts) -> Assignment:
    """Row bound first (``row_best_assignment``); the problems it leaves go to the fastest exact
    backend for the shape/device (``auto_choice``). perm (b, n), certified."""
    c = torch.as_tensor(cost)
    b, n = c.shape[0], c.shape[1]
    if c.numel() < ROW_BOUND_MIN_ENTRIES:
        name, res = _run_exact(auto_choice(b, n, c.device, 0.0, c), c, maximize, opts)
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
    name, res = _run_exact(auto_choice(sub.shape[0], n, c.device, float(distinct[~ok].min()), sub), sub,
                           maximize, opts)
    if n_ok:
        perm = best.cpu().clone()
        perm[rest] = res.perm.cpu()
        merged = make_result(c, perm.numpy(), res.method, certified=res.certified, gap=res.gap)
        merged.stats = res.stats
        res = merged
    res.stats = {**res.stats, "auto_choice": name, "row_best": n_ok}
    return res
