"""The ``auto`` policy (docs/design.md, The auto policy): the row bound first, then the fastest exact
backend for the shape and device.

Row bound: if every row's best column is a different column, that permutation is optimal (no
assignment can beat the sum of row maxima; duals u = row maxima, v = 0 certify it). Planted,
same-lineage and other strong-signal costs are solved by this one O(n^2) pass; the rest go to the
backend ``auto_choice`` names.

CPU with the C extension (``solve_auto_cpu``, what ``solve`` runs): one fused C pass for the
NaN/Inf check and the row bound (up to JV_FIRST_MAX_N the C JV's column reduction does this);
problems it leaves go to the C dense JV (``native.jv``) when easy (many rows' best columns
distinct), to the lapjvr JV (laprust / lapx) when hard, or to ``certified`` when large and hard.
Elsewhere (GPU, no C extension, backend options): ``solve_auto``, the same decisions without the
C JV.
"""
from __future__ import annotations

import functools
import itertools
import math

import numpy as np
import torch
from rebasin_kernels.hungarian import column_hits

from rebasin.solvers import native
from rebasin.solvers._common import Array, Assignment, make_result, outer_threads, scan_threads
from rebasin.solvers.jvr import jvr_functions
from rebasin.solvers.laprust_backend import laprust_available
from rebasin.solvers.lapx_backend import lapx_available
from rebasin.solvers.scipy_backend import solve_scipy
from rebasin.solvers.triton_backend import triton_available

# ---- thresholds (measured on a 2-core CPU, see benchmarks/results/solvers-cpu.md) -----------
# Dense JV (laprust / lapx's lapjvr) against the certified sparse path, by n and by the fraction of
# distinct best columns of the rows (row_best_assignment): JV is fastest while few rows conflict
# and degrades fast as they do; certified stays flat. Certified where distinct < the threshold at
# n (log2-linear between knots; below the first knot always dense JV; past the last, its value).
# C passes, planted costs B = s A[perm] + noise, CPU seconds certified / laprust, 1 thread:
#   n = 2048: 0.62 -> 0.048/0.079, 0.69 -> 0.058/0.058, 0.75 -> 0.056/0.035, 0.85 -> 0.059/0.015;
#   n = 4096: 0.62 -> 0.22/0.56, 0.74 -> 0.21/0.31, 0.82 -> 0.18/0.16;
#   n = 8192: 0.62 -> 0.64/3.96, 0.79 -> 0.72/1.17, 0.88 -> 0.62/0.42; n = 1024: JV 2-6x faster.
# torch passes (no C compiler at install): weak n = 4096 1.3 s vs 1.2 s, n = 8192 5.5 s vs 6.6 s.
# CUDA (dense passes on the GPU): the earlier policy, dense up to 768 and certified below 0.85.
CERTIFIED_KNOTS = {
    "native": ((2048, 0.68), (4096, 0.79), (8192, 0.86), (16384, 0.90)),
    "torch": ((4096, 0.60), (8192, 0.70), (16384, 0.80)),
    "cuda": ((769, 0.85),),
}
# CUDA/general path: inputs below this many entries skip the row bound (it can save at most
# ~0.1 ms but costs ~0.05 ms of dispatch). On CPU the C JV's column reduction takes its place up
# to JV_FIRST_MAX_N, and above it the row bound is fused into the first pass.
ROW_BOUND_MIN_ENTRIES = 1 << 18
# The C dense JV (native.jv: vectorised init passes and Dijkstra scans over the unscanned
# columns) against lapjvr (laprust), by n and by the fraction of rows its column reduction
# matches: the C JV wins up to n = 128 on all but tied costs, 1.5-2x on easy problems at any n,
# and loses up to 1.35x on hard ones (long augmenting paths) from n = 512. CPU ms lapjvr / C JV,
# 1 thread, by matched fraction: n = 64 (batch 32): 0.63 -> 1.38/0.94, 0.95 -> 0.35/0.18,
# integer 0.19 -> 0.37/0.67; n = 128: 0.61 -> 1.30/1.10; n = 256: 0.57 -> 1.26/1.33,
# 0.65 -> 0.83/0.77, 0.77 -> 0.45/0.36; n = 512: 0.63 -> 2.37/3.22, 0.77 -> 0.97/0.94,
# 0.94 -> 0.33/0.22; n = 1024: 0.65 -> 11.3/13.6, 0.77 -> 5.2/5.1, 0.93 -> 1.27/0.97.
JV_MAX_N = 1024
# up to this n the C JV runs first and its column reduction decides (a hard problem costs one
# wasted pass, ~2% at n = 256); above it the fused first pass decides by the row bound's
# distinct fraction (weak n = 1024: the wasted pass plus lapjvr's negated copy cost 10-40%)
JV_FIRST_MAX_N = 256
JV_KNOTS = ((128, 0.30), (256, 0.55), (512, 0.77), (1024, 0.77))
# above JV_MAX_N: the C JV where at least this fraction of the rows' best columns is distinct
# (fused row bound pass), which also spares lapjvr's negated copy. Planted costs, CPU s lapjvr /
# C JV: n = 2048: 0.92 -> 0.012/0.012, 0.97 -> 0.011/0.008; n = 4096: 0.91 -> 0.060/0.054,
# 0.96 -> 0.046/0.029, 1.0 -> 0.047/0.027.
JV_LARGE_DISTINCT = 0.93
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


@functools.cache
def dense_backend() -> str:
    """The dense JV backend: ``laprust`` or ``lapx`` (the same lapjvr solver), else ``scipy``."""
    if laprust_available():
        return "laprust"
    return "lapx" if lapx_available() else "scipy"


def certified_threshold(n: int, regime: str) -> float:
    """The distinct-best-column fraction below which ``certified`` beats dense JV at size n
    (``CERTIFIED_KNOTS[regime]``, log2-linear between knots; 0.0 below the first knot)."""
    knots = CERTIFIED_KNOTS[regime]
    if n < knots[0][0]:
        return 0.0
    for (n0, t0), (n1, t1) in itertools.pairwise(knots):
        if n < n1:
            return t0 + (t1 - t0) * math.log2(n / n0) / math.log2(n1 / n0)
    return knots[-1][1]


def auto_choice(b: int, n: int, device: torch.device | str, distinct: float = 0.0,
                cost: torch.Tensor | None = None) -> str:
    """Backend name for a (b, n, n) problem on ``device`` that the row bound did not settle.

    ``distinct``: the smallest fraction of distinct best columns over the batch
    (``row_best_assignment``). CUDA, n <= TRITON_MAX_N: the batched GPU Hungarian. Batches, and
    single problems with distinct >= ``certified_threshold(n)``: dense JV (``dense_backend``).
    Otherwise ``certified``, unless ``cost`` is heavily tied (few distinct values in a sampled row:
    dual certificates degenerate), which goes to dense JV too.
    """
    dense = dense_backend()
    dev = torch.device(device)
    if dev.type == "cuda" and n <= TRITON_MAX_N and triton_available():
        return "triton"
    regime = "cuda" if dev.type == "cuda" else "native" if native.native_available() else "torch"
    if b > 1 or distinct >= certified_threshold(n, regime):
        return dense
    if cost is not None:
        row = cost[0, 0, : min(n, 512)]
        if int(torch.unique(row).numel()) < row.numel() // 4:
            return dense
    return "certified"


@functools.cache
def _solvers() -> dict:
    """The registry (imported late: the registry lists this module's solve_auto)."""
    from rebasin.solvers.registry import SOLVERS

    return SOLVERS


def _run_exact(name: str, c: torch.Tensor, maximize: bool, opts: dict) -> tuple[str, Assignment]:
    """Run backend ``name`` on c (b, n, n); an answer it cannot certify (the fp32 GPU Hungarian's
    float64 dual check failed) is replaced by scipy's. Returns (backend used, result)."""
    res = _solvers()[name].fn(c, maximize, **opts)
    return (name, res) if res.certified else ("scipy", solve_scipy(c, maximize))


@functools.lru_cache(maxsize=4096)
def jv_threshold(n: int) -> float:
    """The distinct-best-column fraction from which the C dense JV beats lapjvr at size n
    (``JV_KNOTS``, log2-linear between knots, clamped below; JV_LARGE_DISTINCT above JV_MAX_N)."""
    if n > JV_MAX_N:
        return JV_LARGE_DISTINCT
    if n <= JV_KNOTS[0][0]:
        return JV_KNOTS[0][1]
    for (n0, t0), (n1, t1) in itertools.pairwise(JV_KNOTS):
        if n <= n1:
            return t0 + (t1 - t0) * math.log2(n / n0) / math.log2(n1 / n0)
    return JV_KNOTS[-1][1]


def _cpu_array(cost: Array) -> np.ndarray | None:
    """``cost`` as a C-contiguous float32/float64 numpy array of shape (n, n) or (b, n, n) with
    n >= 2 and b >= 1 when it is a CPU float32/float64 input (a view; a copy only when it is not
    contiguous); otherwise None. (One torch call for a tensor: each costs 10-40 µs with cold caches.)"""
    if isinstance(cost, np.ndarray):
        arr = cost
    elif isinstance(cost, torch.Tensor):
        try:
            arr = cost.numpy()  # raises for GPU tensors and tensors that require grad
        except (TypeError, RuntimeError):
            return None
    else:
        return None
    shape = arr.shape
    if ((arr.dtype != np.float32 and arr.dtype != np.float64) or len(shape) not in (2, 3) or shape[-1] != shape[-2]
            or shape[-1] < 2 or arr.size == 0):
        return None
    return arr if arr.flags.c_contiguous else np.ascontiguousarray(arr)


def _nonfinite(at: int, n: int) -> ValueError:
    return ValueError(f"cost matrix contains NaN/Inf (batch {at // (n * n)})")


def _lapjvr(name: str, m: np.ndarray) -> np.ndarray:
    """perm (b, n) of the minimisation costs m (b, n, n) by the lapjvr package ``name``."""
    single, batch = jvr_functions(name)
    if m.shape[0] == 1:
        return single(m[0], return_cost=False)[1][None]
    return np.stack(batch(m, return_cost=False, n_threads=outer_threads())[1])


def _answer(arr: np.ndarray, perm: np.ndarray, obj: np.ndarray | None, method: str, gap: float,
            stats: dict) -> Assignment:
    """The Assignment in ``solve``'s final shapes; the objective (and the permutation check) by one
    C pass unless ``obj`` comes from the C JV, which checked its permutations itself."""
    if obj is None:
        n = arr.shape[-1]
        obj, bad = native.objective_checked(arr.reshape(-1, n, n), perm)
        if bad >= 0:
            raise RuntimeError(f"solver {method!r} returned a non-permutation (a row is not a permutation of "
                               f"0..{n - 1})")
    if arr.ndim == 2:
        perm, obj = perm[0], obj.reshape(())
    return Assignment(torch.from_numpy(perm), torch.from_numpy(obj), True, gap, method, stats)


def _solve_jv(arr: np.ndarray, maximize: bool, dense: str) -> Assignment:
    """n <= JV_FIRST_MAX_N (``solve_auto_cpu``): the C dense JV on every problem — its column
    reduction is also the NaN/Inf check and settles strong problems as fast as a row bound would — except
    those it finds hard (fewer than ``jv_threshold(n)`` rows matched by the column reduction: long
    augmenting paths, where list-based lapjvr wins), which go to lapjvr (laprust / lapx)."""
    n = arr.shape[-1]
    arr3 = arr.reshape(-1, n, n)
    s = -1.0 if maximize else 1.0
    threads = outer_threads() if arr3.shape[0] > 1 else 1
    perm, obj, status, bad = native.jv(arr3, s, threads, 0.0 if dense == "scipy" else jv_threshold(n))
    if bad:
        if (status == native.JV_NONFINITE).any():
            raise _nonfinite(int(np.argmax(status == native.JV_NONFINITE)) * n * n, n)
        if (status == native.JV_BROKEN).any():
            raise RuntimeError("solver 'jv' returned a non-permutation")
        idx = np.flatnonzero(status)
        sub = arr3 if idx.size == arr3.shape[0] else arr3[idx]
        perm[idx] = _lapjvr(dense, np.negative(sub) if maximize else sub)
        obj = None  # recomputed and checked by _answer
        name = dense if idx.size == arr3.shape[0] else f"jv+{dense}"
    else:
        name = "jv"
    return _answer(arr, perm, obj, name, 0.0, {"auto_choice": name})


def solve_auto_cpu(cost: Array, maximize: bool) -> Assignment | None:
    """``solve(cost, "auto")`` on CPU with the C extension, from the input as given; None when it
    does not apply (GPU, other dtypes, n < 2, no C extension: the general path ``solve_auto``).

    n <= JV_FIRST_MAX_N: ``_solve_jv``. Larger: one fused C pass (``native.prepare``) does the
    NaN/Inf check and the row bound (each row's best column, and how many distinct columns they
    are); problems the row bound settles are done, those with few conflicts (distinct >=
    ``jv_threshold(n)``) go to the C JV, the rest to ``auto_choice``'s backend (lapjvr on the
    negated copy it needs, or certified when large and hard). (Fusing that copy into the first
    pass saved a read for hard problems but cost a fresh n^2 allocation — page faults, 1-3 ms at
    n = 1024 on a loaded machine — for easy ones, which then never read it.) A last C pass checks every
    permutation and sums the float64 objective from the input. Answer and shapes as ``solve``
    (perm (n,) / (b, n), objective () / (b,)); stats: auto_choice (the backend of the problems not
    settled; "jv+laprust" when split), row_best (problems the row bound settled, n > JV_FIRST_MAX_N).
    Why: the general path's separate passes and per-call overheads (each numpy/torch call 1-3 µs
    on a loaded 2-core machine) cost 40-50 µs around a 0.1 ms solve at n = 256, and three O(n^2)
    passes before a large one.
    """
    arr = _cpu_array(cost)
    if arr is None or not native.native_available():
        return None
    dense = dense_backend()
    n = arr.shape[-1]
    if n <= JV_FIRST_MAX_N:
        return _solve_jv(arr, maximize, dense)
    arr3 = arr.reshape(-1, n, n)
    b = arr3.shape[0]
    s = -1.0 if maximize else 1.0
    best = np.empty((b, n), dtype=np.int64)
    ndistinct = np.empty(b, dtype=np.int64)
    first = native.prepare(arr3, s, None, best, ndistinct)
    if first >= 0:
        raise _nonfinite(first, n)
    settled = ndistinct == n
    n_ok = int(settled.sum())
    if n_ok == b:
        return _answer(arr, best, None, "auto", 0.0, {"auto_choice": "row-best", "row_best": b})
    easy = ~settled & (ndistinct >= (0.0 if dense == "scipy" and n <= JV_MAX_N else jv_threshold(n)) * n)
    hard = ~settled & ~easy
    perm, gap, stats, names = best, 0.0, {}, []
    if easy.any():  # few conflicts: the C JV, without a negated copy
        idx = np.flatnonzero(easy)
        p, _, _, bad = native.jv(arr3 if idx.size == b else arr3[idx], s, outer_threads(), 0.0)
        if bad:
            raise RuntimeError("solver 'jv' returned a non-permutation")
        perm[idx] = p
        names.append("jv")
    if hard.any():
        idx = np.flatnonzero(hard)
        name = auto_choice(idx.size, n, "cpu", float(ndistinct[idx].min()) / n,
                           torch.from_numpy(arr3[idx[0]:idx[0] + 1]))
        names.append(name)
        if name in ("laprust", "lapx"):
            m = arr3 if idx.size == b else arr3[idx]
            perm[idx] = _lapjvr(name, np.negative(m) if maximize else m)
        else:
            with scan_threads("cpu"):
                res = _solvers()[name].fn(torch.from_numpy(arr3 if idx.size == b else arr3[idx]), maximize)
            perm[idx] = res.perm.numpy()
            gap, stats = res.gap, res.stats
    name = "+".join(names)
    return _answer(arr, perm, None, name, gap, {**stats, "auto_choice": name, "row_best": n_ok})


def solve_auto(cost: Array, maximize: bool = True, **opts) -> Assignment:
    """Row bound first (``row_best_assignment``); the problems it leaves go to the fastest exact
    backend for the shape/device (``auto_choice``). perm (b, n), certified.

    CPU inputs without backend options take ``solve_auto_cpu`` (the C passes) when it applies."""
    if not opts:
        res = solve_auto_cpu(cost, maximize)
        if res is not None:
            return res
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
