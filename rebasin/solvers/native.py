"""numpy-facing wrappers of the C passes in ``rebasin.solvers._lapcore`` (built by setup.py when a C
compiler is present; ``native_available()`` says whether it was). The certified solver uses them
on CPU inputs and its torch path otherwise. See ``_lapcore.c`` for the math of each pass.
"""
from __future__ import annotations

import functools

import numpy as np


@functools.cache
def _module():
    try:
        from rebasin.solvers import _lapcore
    except ImportError:
        return None
    return _lapcore


def native_available() -> bool:
    """True when the C extension ``rebasin.solvers._lapcore`` is importable."""
    return _module() is not None


def _c_array(a: np.ndarray) -> np.ndarray:
    """``a`` as a C-contiguous float32/float64 array (a copy only when it is not one already)."""
    if a.dtype not in (np.float32, np.float64):
        a = a.astype(np.float64)
    return a if a.flags.c_contiguous else np.ascontiguousarray(a)


def first_nonfinite(c: np.ndarray) -> int:
    """Flat index of the first NaN/Inf of the float array ``c``, or -1 (one pass, one thread)."""
    return _module().nonfinite(_c_array(c))


def objective_checked(c: np.ndarray, perm: np.ndarray) -> tuple[np.ndarray, int]:
    """(float64 ``sum_i c[k, i, perm[k, i]]`` per problem (b,), the first problem whose ``perm`` row is
    not a permutation of 0..n-1 or -1) for c (b, n, n), perm (b, n) int64."""
    obj = np.empty(c.shape[0])
    bad = _module().objective(_c_array(c), np.ascontiguousarray(perm, dtype=np.int64), obj)
    return obj, bad


def prepare(c: np.ndarray, sign: float, out: np.ndarray | None, best: np.ndarray, ndistinct: np.ndarray) -> int:
    """auto's fused first pass over c (b, n, n) C-contiguous float32/64 (see ``_lapcore.c``): fills
    best (b, n) int64 (each row's first argmin of ``sign * c``), ndistinct (b,) int64 (distinct best
    columns per problem) and, when given, out (like c) = sign * c. Returns the flat index of the
    first NaN/Inf, or -1."""
    return _module().prepare(c, float(sign), out, best, ndistinct)


# status codes of ``jv``
JV_OK, JV_DEFERRED, JV_NONFINITE, JV_BROKEN = 0, 1, 2, 3


def jv(c: np.ndarray, sign: float, threads: int = 1, min_matched: float = 0.0
       ) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """Dense Jonker-Volgenant (``_lapcore.c``) on every problem of c (b, n, n) C-contiguous
    float32/64, minimising ``sign * c``; ``threads`` workers over the batch.

    Returns perm (b, n) int64, obj (b,) float64 (``sum_i c[k, i, perm[k, i]]`` of the input values),
    status (b,) int64 per problem — JV_OK; JV_DEFERRED (fewer than ``min_matched * n`` rows matched
    by the column reduction: a hard problem, not solved, left to the caller); JV_NONFINITE (NaN/Inf
    in the problem); JV_BROKEN (not a permutation: cannot happen) — and how many are not JV_OK.
    perm and obj are only meaningful where status is JV_OK.
    """
    b, n = c.shape[0], c.shape[1]
    perm = np.empty((b, n), dtype=np.int64)
    obj = np.empty(b)
    status = np.empty(b, dtype=np.int64)
    bad = _module().jv(c, sign, perm, obj, status, threads, min_matched)
    return perm, obj, status, bad


def first_bad_perm(perm: np.ndarray) -> int:
    """The first row of the (b, n) int64 ``perm`` that is not a permutation of 0..n-1, or -1."""
    return _module().permcheck(np.ascontiguousarray(perm, dtype=np.int64))


def candidates(c: np.ndarray, sign: float, k: int
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, float]:
    """Reductions and candidate edges of the costs to minimise ``sign * c`` (c (n, n) float32/64).

    Returns f (n,), g (n,) float64 (``g_j = min_i s c_ij``, ``f_i = min_j (s c_ij - g_j)``), the
    edges (rows, cols) (2 n k,) int64: the k smallest reduced costs of every row, then of every
    column, and ``max |c|``.
    """
    n = c.shape[0]
    k = min(k, n)
    f, g = np.empty(n), np.empty(n)
    rowk, colk = np.empty((n, k), dtype=np.int64), np.empty((n, k), dtype=np.int64)
    lo, hi = _module().candidates(np.ascontiguousarray(c), float(sign), k, f, g, rowk, colk)
    ar = np.arange(n, dtype=np.int64)
    ei = np.concatenate([np.repeat(ar, k), colk.reshape(-1)])
    ej = np.concatenate([rowk.reshape(-1), np.repeat(ar, k)])
    return f, g, ei, ej, max(abs(lo), abs(hi))


def check(c: np.ndarray, sign: float, u: np.ndarray, v: np.ndarray, tol: float, add: int, rows: np.ndarray,
          rowmin: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
    """Dense float64 certificate of duals (u, v) for the costs ``sign * c`` on the given ``rows``:
    R_ij = (s c_ij - v_j) - u_i for every column j.

    Writes ``rowmin[i] = min_j R_ij`` for those rows (rowmin (n,) float64, updated in place) and
    returns the violating edges (rows (e,), cols (e,)) — the ``add`` most negative entries below
    -tol of each row whose minimum is below -tol — and how many rows those are.
    """
    n = c.shape[0]
    add = max(1, min(add, n))
    rows = np.ascontiguousarray(rows, dtype=np.int64)
    out_r, out_c = np.empty(rows.size * add, dtype=np.int64), np.empty(rows.size * add, dtype=np.int64)
    count, bad = _module().check(np.ascontiguousarray(c), float(sign), np.ascontiguousarray(u, np.float64),
                                 np.ascontiguousarray(v, np.float64), float(tol), add, rows, rowmin, out_r, out_c)
    return out_r[:count].copy(), out_c[:count].copy(), bad


class SparseMatcher:
    """Min-cost perfect matching on a growing candidate edge set, warm-started between calls.

    ``solve(ei, ej, w)`` takes the whole current edge set (deduplicated or not; costs w float64 to
    minimise) and returns perm (n,) int64, optimal on those edges, with its float64 duals ``u``,
    ``v`` (attributes): ``w_ij - u_i - v_j >= 0`` on the edges up to rounding, 0 on the matching.
    A later call on a superset re-augments only the rows whose new edges violate the duals.
    Returns None when the edges hold no perfect matching.
    """

    def __init__(self, n: int, v0: np.ndarray):
        self.n = n
        self.u = np.zeros(n)
        self.v = np.array(v0, dtype=np.float64)
        self.x = np.full(n, -1, dtype=np.int64)
        self.y = np.full(n, -1, dtype=np.int64)

    def solve(self, ei: np.ndarray, ej: np.ndarray, w: np.ndarray) -> np.ndarray | None:
        n = self.n
        order = np.lexsort((ej, ei))
        ei, ej, w = ei[order], ej[order], np.ascontiguousarray(w[order], dtype=np.float64)
        indptr = np.zeros(n + 1, dtype=np.int64)
        np.cumsum(np.bincount(ei, minlength=n), out=indptr[1:])
        x, y, u, v = self.x.copy(), self.y.copy(), self.u.copy(), self.v.copy()
        status = _module().sap(indptr, np.ascontiguousarray(ej, dtype=np.int64), w, u, v, x, y)
        if status != 0:
            return None
        self.x, self.y, self.u, self.v = x, y, u, v
        return x.copy()
