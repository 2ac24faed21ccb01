/* rebasin.solvers._lapcore: the single-threaded passes of the certified solver, in C.
 *
 * docs/design.md, Certified sparse-exact. Three functions, all on C-contiguous buffers (no numpy
 * headers: the buffer protocol only, so the extension builds with nothing but a C compiler):
 *
 *   candidates(c, sign, k, f, g, rowk, colk)
 *       c (n, n) float32/float64 read as s*c (s = sign = +1 or -1: maximisation without a negated
 *       copy). g_j = min_i s*c_ij, f_i = min_j (s*c_ij - g_j); rowk (n, k) int64: the k smallest
 *       reduced costs R_ij = s*c_ij - f_i - g_j of every row (their columns), colk (n, k) int64:
 *       of every column (their rows). Returns (min, max) of s*c. Two streaming passes over c.
 *
 *   check(c, sign, u, v, tol, add, rows, rowmin, out_rows, out_cols) -> (count, bad_rows)
 *       Dense dual certificate in float64 over the listed rows (int64): R_ij = (s*c_ij - v_j) - u_i
 *       for every column; rowmin[i] = min_j R_ij; for each row whose minimum is below -tol its
 *       `add` most negative entries below -tol go to out_rows / out_cols (capacity len(rows)*add);
 *       count = how many, bad_rows = how many rows. One streaming pass over those rows.
 *
 *   sap(indptr, indices, w, u, v, x, y) -> status
 *       Exact min-cost perfect matching on a sparse bipartite graph (CSR rows, float64 weights),
 *       warm-started: (u, v) potentials and x (row -> col, -1 free), y (col -> row) a partial
 *       matching from an earlier call on a subset of these edges. Each row's u_i is lowered to
 *       min_j (w_ij - v_j) where an edge is violated (or the row is free), which keeps every
 *       reduced cost w_ij - u_i - v_j >= 0; a matched edge no longer tight is unmatched. Then
 *       every free row is augmented by Dijkstra over reduced costs (binary heap, lazily
 *       initialised labels: cost proportional to the explored part of the graph). On return
 *       (status 0) x/y is a perfect matching optimal on the edges and (u, v) are its duals:
 *       w_ij - u_i - v_j >= 0 on every edge up to float64 rounding, = 0 on x. Status 1: no
 *       perfect matching exists on these edges; -1: out of memory.
 *
 *   prepare(c, sign, out, best, ndistinct) -> first NaN/Inf or -1
 *       auto's first pass over a (b, n, n) cost: finiteness, and when `best` is given each row's
 *       best column (first argmin of s*c: the row bound) and the number of distinct best columns
 *       per problem (ndistinct), and when `out` is given the minimisation copy out = s*c for a
 *       dense JV solver. One streaming pass.
 *
 *   jv(c, sign, perm, obj, status, threads, min_matched) -> number of problems not solved
 *       Dense Jonker-Volgenant per problem of a (b, n, n) cost (float64 potentials, costs read as
 *       s*c): column reduction (also the NaN/Inf check), reduction transfer, augmenting row
 *       reduction, then shortest augmenting paths by vectorised dense Dijkstra scans; `threads`
 *       pthreads share the batch. A problem whose column reduction matches fewer than
 *       min_matched*n rows is left unsolved (status 1): dense scans lose to list-based JV
 *       (laprust) on such hard problems. obj = the float64 objective of c, status 0 = solved.
 *
 *   nonfinite(c) -> flat index of the first NaN/Inf, or -1;  objective(c, perm, obj) -> first
 *       problem whose perm row is not a permutation, or -1; obj[k] = sum_i c[k, i, perm[k, i]] in
 *       float64;  permcheck(perm) -> first row that is not a permutation, or -1. The per-call
 *       checks of every solve, without numpy's per-call overheads.
 *
 * Everything here only proposes: the Python side recomputes the objective in float64 and the
 * certificate (check) decides optimality, so rounding inside sap can cost a round, never a wrong
 * "certified".
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* min reductions vectorise only when the compiler may reorder them (exact for min: no rounding);
 * the hot passes get an AVX2 clone beside the baseline, picked at load time (GCC, x86-64) */
#if defined(_OPENMP) || defined(__GNUC__)
#define DO_PRAGMA(x) _Pragma(#x)
#define SIMD_MIN(var) DO_PRAGMA(omp simd reduction(min : var))
#else
#define SIMD_MIN(var)
#endif
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define HOT __attribute__((target_clones("avx2", "default")))
#else
#define HOT
#endif

#define BLOCK 32 /* columns tested together in the top-k scan */
/* augmenting row reduction: a displaced row is re-processed at once at most ARR_CAP times per
 * round (then it waits for the next round or the Dijkstra phase); measured against lapjvr on
 * weak n = 64-1024: n/4 .. n within noise of each other, 4n (JV's unbounded loop) 10-30% slower */
#ifndef ARR_CAP
#define ARR_CAP (n / 2)
#endif

/* ---- buffers ------------------------------------------------------------------------------ */

static char fmt_code(const Py_buffer *b) {
    const char *f = b->format ? b->format : "B";
    while (*f == '@' || *f == '=' || *f == '<' || *f == '>' || *f == '!') f++;
    return *f;
}

/* kind: 'r' real (float32 or float64), 'd' float64, 'i' int64; ndim/size checked by caller */
static int get_buf(PyObject *obj, Py_buffer *b, char kind, int writable, const char *name) {
    int flags = PyBUF_C_CONTIGUOUS | PyBUF_FORMAT | (writable ? PyBUF_WRITABLE : 0);
    if (PyObject_GetBuffer(obj, b, flags) < 0) return -1;
    char code = fmt_code(b);
    int ok = 0;
    if (kind == 'r') ok = (code == 'f' && b->itemsize == 4) || (code == 'd' && b->itemsize == 8);
    else if (kind == 'd') ok = code == 'd' && b->itemsize == 8;
    else if (kind == 'i') ok = (code == 'l' || code == 'q') && b->itemsize == 8;
    if (!ok) {
        PyErr_Format(PyExc_TypeError, "_lapcore: %s has format '%s' (itemsize %zd), expected %s", name,
                     b->format ? b->format : "?", b->itemsize,
                     kind == 'r' ? "float32/float64" : kind == 'd' ? "float64" : "int64");
        PyBuffer_Release(b);
        return -1;
    }
    return 0;
}

static int need_len(const Py_buffer *b, Py_ssize_t want, const char *name) {
    if (b->len / b->itemsize < want) {
        PyErr_Format(PyExc_ValueError, "_lapcore: %s holds %zd items, needs %zd", name, b->len / b->itemsize, want);
        return -1;
    }
    return 0;
}

/* n of a square (n, n) buffer */
static Py_ssize_t square_n(const Py_buffer *b) {
    if (b->ndim != 2 || b->shape[0] != b->shape[1]) {
        PyErr_SetString(PyExc_ValueError, "_lapcore: cost must be a square 2-D array");
        return -1;
    }
    return b->shape[0];
}

/* insert (val, idx) into the ascending list vals[0..k) / idxs[0..k) (val < vals[k-1]) */
static inline void insert_sorted(double *vals, int64_t *idxs, int k, double val, int64_t idx) {
    int t = k - 1;
    while (t > 0 && vals[t - 1] > val) {
        vals[t] = vals[t - 1];
        idxs[t] = idxs[t - 1];
        t--;
    }
    vals[t] = val;
    idxs[t] = idx;
}

/* ---- candidates --------------------------------------------------------------------------- */

#define DEFINE_CANDIDATES(T, NAME)                                                                \
    HOT static double NAME(const T *c, Py_ssize_t n, double s, int k, double *f, double *g,      \
                           int64_t *rowk, int64_t *colk, double *r, double *colv, double *thr,    \
                           double *rv) {                                                         \
        double *gmax = thr; /* scratch until the column thresholds are needed */                 \
        for (Py_ssize_t j = 0; j < n; j++) gmax[j] = g[j] = s * (double)c[j];                    \
        for (Py_ssize_t i = 1; i < n; i++) {                                                     \
            const T *row = c + i * n;                                                            \
            for (Py_ssize_t j = 0; j < n; j++) {                                                 \
                double x = s * (double)row[j];                                                   \
                g[j] = x < g[j] ? x : g[j];                                                      \
                gmax[j] = x > gmax[j] ? x : gmax[j];                                             \
            }                                                                                    \
        }                                                                                        \
        double hi = -INFINITY;                                                                   \
        for (Py_ssize_t j = 0; j < n; j++) hi = gmax[j] > hi ? gmax[j] : hi;                     \
        for (Py_ssize_t t = 0; t < n * k; t++) colv[t] = INFINITY;                               \
        for (Py_ssize_t j = 0; j < n; j++) thr[j] = INFINITY;                                    \
        for (Py_ssize_t i = 0; i < n; i++) {                                                     \
            const T *row = c + i * n;                                                            \
            double m = INFINITY;                                                                 \
            SIMD_MIN(m)                                                                          \
            for (Py_ssize_t j = 0; j < n; j++) {                                                 \
                double x = s * (double)row[j] - g[j];                                            \
                r[j] = x;                                                                        \
                m = x < m ? x : m;                                                               \
            }                                                                                    \
            f[i] = m;                                                                            \
            int64_t *ri = rowk + i * k;                                                          \
            for (int t = 0; t < k; t++) { rv[t] = INFINITY; ri[t] = 0; }                         \
            double rthr = INFINITY;                                                              \
            for (Py_ssize_t j0 = 0; j0 < n; j0 += BLOCK) {                                       \
                Py_ssize_t j1 = j0 + BLOCK < n ? j0 + BLOCK : n;                                 \
                int hit = 0; /* vectorised test of a block; most blocks hold no candidate */    \
                for (Py_ssize_t j = j0; j < j1; j++) hit |= (r[j] < rthr) | (r[j] - m < thr[j]); \
                if (!hit) continue;                                                              \
                for (Py_ssize_t j = j0; j < j1; j++) {                                           \
                    double x = r[j];                                                             \
                    if (x < rthr) {                                                              \
                        insert_sorted(rv, ri, k, x, (int64_t)j);                                 \
                        rthr = rv[k - 1];                                                        \
                    }                                                                            \
                    double y = x - m;                                                            \
                    if (y < thr[j]) {                                                            \
                        insert_sorted(colv + j * k, colk + j * k, k, y, (int64_t)i);             \
                        thr[j] = colv[j * k + k - 1];                                            \
                    }                                                                            \
                }                                                                                \
            }                                                                                    \
        }                                                                                        \
        return hi;                                                                               \
    }

DEFINE_CANDIDATES(float, candidates_f32)
DEFINE_CANDIDATES(double, candidates_f64)

static PyObject *py_candidates(PyObject *self, PyObject *args) {
    PyObject *oc, *of, *og, *orow, *ocol;
    double s;
    int k;
    if (!PyArg_ParseTuple(args, "OdiOOOO", &oc, &s, &k, &of, &og, &orow, &ocol)) return NULL;
    Py_buffer c, f, g, rk, ck;
    if (get_buf(oc, &c, 'r', 0, "c") < 0) return NULL;
    Py_ssize_t n = square_n(&c);
    if (n < 0) { PyBuffer_Release(&c); return NULL; }
    if (get_buf(of, &f, 'd', 1, "f") < 0) { PyBuffer_Release(&c); return NULL; }
    if (get_buf(og, &g, 'd', 1, "g") < 0) { PyBuffer_Release(&c); PyBuffer_Release(&f); return NULL; }
    if (get_buf(orow, &rk, 'i', 1, "rowk") < 0) {
        PyBuffer_Release(&c); PyBuffer_Release(&f); PyBuffer_Release(&g); return NULL;
    }
    if (get_buf(ocol, &ck, 'i', 1, "colk") < 0) {
        PyBuffer_Release(&c); PyBuffer_Release(&f); PyBuffer_Release(&g); PyBuffer_Release(&rk); return NULL;
    }
    PyObject *ret = NULL;
    double *r = NULL, *colv = NULL, *thr = NULL, *rv = NULL;
    if (n == 0) { ret = Py_BuildValue("dd", 0.0, 0.0); goto done; }
    if (k < 1 || k > n) { PyErr_SetString(PyExc_ValueError, "_lapcore.candidates: need 1 <= k <= n"); goto done; }
    if (need_len(&f, n, "f") < 0 || need_len(&g, n, "g") < 0 || need_len(&rk, n * k, "rowk") < 0 ||
        need_len(&ck, n * k, "colk") < 0)
        goto done;
    r = malloc(sizeof(double) * n);
    colv = malloc(sizeof(double) * n * k);
    thr = malloc(sizeof(double) * n);
    rv = malloc(sizeof(double) * k);
    if (!r || !colv || !thr || !rv) { PyErr_NoMemory(); goto done; }
    double hi;
    Py_BEGIN_ALLOW_THREADS
    if (c.itemsize == 4)
        hi = candidates_f32((const float *)c.buf, n, s, k, f.buf, g.buf, rk.buf, ck.buf, r, colv, thr, rv);
    else
        hi = candidates_f64((const double *)c.buf, n, s, k, f.buf, g.buf, rk.buf, ck.buf, r, colv, thr, rv);
    Py_END_ALLOW_THREADS
    double lo = INFINITY;
    for (Py_ssize_t j = 0; j < n; j++) lo = ((double *)g.buf)[j] < lo ? ((double *)g.buf)[j] : lo;
    ret = Py_BuildValue("dd", lo, hi);
done:
    free(r); free(colv); free(thr); free(rv);
    PyBuffer_Release(&c); PyBuffer_Release(&f); PyBuffer_Release(&g); PyBuffer_Release(&rk); PyBuffer_Release(&ck);
    return ret;
}

/* ---- check -------------------------------------------------------------------------------- */

#define DEFINE_CHECK(T, NAME)                                                                     \
    HOT static Py_ssize_t NAME(const T *c, Py_ssize_t n, double s, const double *u, const double *v, \
                               double tol, int add, const int64_t *rows, Py_ssize_t nrows,        \
                               double *rowmin, int64_t *orow, int64_t *ocol, double *vals,        \
                               int64_t *idxs, Py_ssize_t *bad_out) {                              \
        Py_ssize_t count = 0, bad = 0;                                                           \
        for (Py_ssize_t q = 0; q < nrows; q++) {                                                 \
            Py_ssize_t i = rows[q];                                                              \
            const T *row = c + i * n;                                                            \
            double m = INFINITY;                                                                 \
            SIMD_MIN(m)                                                                          \
            for (Py_ssize_t j = 0; j < n; j++) {                                                 \
                double x = s * (double)row[j] - v[j];                                            \
                m = x < m ? x : m;                                                               \
            }                                                                                    \
            double rm = m - u[i];                                                                \
            rowmin[i] = rm;                                                                      \
            if (!(rm < -tol)) continue;                                                          \
            bad++;                                                                               \
            int got = 0;                                                                         \
            double vthr = -tol;                                                                  \
            for (Py_ssize_t j = 0; j < n; j++) {                                                 \
                double x = (s * (double)row[j] - v[j]) - u[i];                                   \
                if (x < vthr) {                                                                  \
                    if (got < add) {                                                             \
                        vals[got] = INFINITY;                                                    \
                        got++;                                                                   \
                    }                                                                            \
                    insert_sorted(vals, idxs, got, x, (int64_t)j);                               \
                    if (got == add) vthr = vals[add - 1];                                        \
                }                                                                                \
            }                                                                                    \
            for (int t = 0; t < got; t++) {                                                      \
                orow[count] = (int64_t)i;                                                        \
                ocol[count] = idxs[t];                                                           \
                count++;                                                                         \
            }                                                                                    \
        }                                                                                        \
        *bad_out = bad;                                                                          \
        return count;                                                                            \
    }

DEFINE_CHECK(float, check_f32)
DEFINE_CHECK(double, check_f64)

static PyObject *py_check(PyObject *self, PyObject *args) {
    PyObject *oc, *ou, *ov, *orows, *omin, *orow, *ocol;
    double s, tol;
    int add;
    if (!PyArg_ParseTuple(args, "OdOOdiOOOO", &oc, &s, &ou, &ov, &tol, &add, &orows, &omin, &orow, &ocol))
        return NULL;
    Py_buffer b[7];
    PyObject *objs[7] = {oc, ou, ov, orows, omin, orow, ocol};
    const char kinds[7] = {'r', 'd', 'd', 'i', 'd', 'i', 'i'};
    const int wr[7] = {0, 0, 0, 0, 1, 1, 1};
    const char *names[7] = {"c", "u", "v", "rows", "rowmin", "out_rows", "out_cols"};
    int got = 0;
    PyObject *ret = NULL;
    double *vals = NULL;
    int64_t *idxs = NULL;
    for (; got < 7; got++)
        if (get_buf(objs[got], &b[got], kinds[got], wr[got], names[got]) < 0) goto done;
    Py_ssize_t n = square_n(&b[0]);
    if (n < 0) goto done;
    Py_ssize_t nrows = b[3].len / 8;
    const int64_t *rows = b[3].buf;
    if (add < 1) { PyErr_SetString(PyExc_ValueError, "_lapcore.check: add must be >= 1"); goto done; }
    if (need_len(&b[1], n, "u") < 0 || need_len(&b[2], n, "v") < 0 || need_len(&b[4], n, "rowmin") < 0 ||
        need_len(&b[5], nrows * add, "out_rows") < 0 || need_len(&b[6], nrows * add, "out_cols") < 0)
        goto done;
    for (Py_ssize_t q = 0; q < nrows; q++)
        if (rows[q] < 0 || rows[q] >= n) { PyErr_SetString(PyExc_ValueError, "_lapcore.check: row out of range"); goto done; }
    vals = malloc(sizeof(double) * add);
    idxs = malloc(sizeof(int64_t) * add);
    if (!vals || !idxs) { PyErr_NoMemory(); goto done; }
    Py_ssize_t count, bad;
    Py_BEGIN_ALLOW_THREADS
    if (b[0].itemsize == 4)
        count = check_f32((const float *)b[0].buf, n, s, b[1].buf, b[2].buf, tol, add, rows, nrows, b[4].buf,
                          b[5].buf, b[6].buf, vals, idxs, &bad);
    else
        count = check_f64((const double *)b[0].buf, n, s, b[1].buf, b[2].buf, tol, add, rows, nrows, b[4].buf,
                          b[5].buf, b[6].buf, vals, idxs, &bad);
    Py_END_ALLOW_THREADS
    ret = Py_BuildValue("nn", count, bad);
done:
    free(vals); free(idxs);
    for (int t = 0; t < got; t++) PyBuffer_Release(&b[t]);
    return ret;
}

/* ---- sap: warm-started sparse shortest augmenting paths ---------------------------------- */

typedef struct {
    double *key;
    int64_t *col;
    Py_ssize_t size;
} Heap;

static inline void heap_push(Heap *h, double key, int64_t col) {
    Py_ssize_t t = h->size++;
    while (t > 0) {
        Py_ssize_t p = (t - 1) >> 1;
        if (h->key[p] <= key) break;
        h->key[t] = h->key[p];
        h->col[t] = h->col[p];
        t = p;
    }
    h->key[t] = key;
    h->col[t] = col;
}

static inline void heap_pop(Heap *h, double *key, int64_t *col) {
    *key = h->key[0];
    *col = h->col[0];
    Py_ssize_t last = --h->size;
    if (last == 0) return;
    double k = h->key[last];
    int64_t c = h->col[last];
    Py_ssize_t t = 0;
    for (;;) {
        Py_ssize_t a = 2 * t + 1;
        if (a >= last) break;
        if (a + 1 < last && h->key[a + 1] < h->key[a]) a++;
        if (h->key[a] >= k) break;
        h->key[t] = h->key[a];
        h->col[t] = h->col[a];
        t = a;
    }
    h->key[t] = k;
    h->col[t] = c;
}

/* the weight of edge (i, j) in CSR row i, or NAN when absent */
static inline double edge_weight(const int64_t *indptr, const int64_t *indices, const double *w, int64_t i,
                                 int64_t j) {
    for (int64_t e = indptr[i]; e < indptr[i + 1]; e++)
        if (indices[e] == j) return w[e];
    return NAN;
}

static int sap_run(Py_ssize_t n, const int64_t *indptr, const int64_t *indices, const double *w, double *u,
                   double *v, int64_t *x, int64_t *y) {
    Py_ssize_t nnz = indptr[n];
    double *lab = malloc(sizeof(double) * n);
    int64_t *seen = malloc(sizeof(int64_t) * n), *done = malloc(sizeof(int64_t) * n);
    int64_t *pred = malloc(sizeof(int64_t) * n), *vis = malloc(sizeof(int64_t) * n);
    int64_t *freel = malloc(sizeof(int64_t) * n);
    Heap h = {malloc(sizeof(double) * (nnz + n + 1)), malloc(sizeof(int64_t) * (nnz + n + 1)), 0};
    int status = 0;
    if (!lab || !seen || !done || !pred || !vis || !freel || !h.key || !h.col) { status = -1; goto out; }
    for (Py_ssize_t j = 0; j < n; j++) { seen[j] = -1; done[j] = -1; }
    /* 1. repair: u_i = min_j (w_ij - v_j) where a reduced cost went negative or the row is free;
     *    a matched edge no longer tight is unmatched; greedy: a free row takes its best column
     *    when that column is free */
    Py_ssize_t nfree = 0;
    for (Py_ssize_t i = 0; i < n; i++) {
        if (indptr[i] == indptr[i + 1]) { status = 1; goto out; }
        double m = INFINITY;
        int64_t best = -1;
        for (int64_t e = indptr[i]; e < indptr[i + 1]; e++) {
            double rc = w[e] - v[indices[e]];
            if (rc < m) { m = rc; best = indices[e]; }
        }
        if (x[i] < 0 || m < u[i]) {
            u[i] = m;
            if (x[i] >= 0 && best != x[i]) {
                double wm = edge_weight(indptr, indices, w, i, x[i]);
                if (!(wm - v[x[i]] - m <= 0.0)) { y[x[i]] = -1; x[i] = -1; }
            }
        }
        if (x[i] < 0) {
            if (y[best] < 0) { x[i] = best; y[best] = i; }
            else freel[nfree++] = i;
        }
    }
    /* 2. one Dijkstra per free row */
    for (Py_ssize_t q = 0; q < nfree; q++) {
        int64_t r = freel[q];
        int64_t stamp = q;
        Py_ssize_t nv = 0;
        h.size = 0;
        for (int64_t e = indptr[r]; e < indptr[r + 1]; e++) {
            int64_t j = indices[e];
            double d = w[e] - u[r] - v[j];
            if (d < 0) d = 0;
            if (seen[j] != stamp || d < lab[j]) { seen[j] = stamp; lab[j] = d; pred[j] = r; heap_push(&h, d, j); }
        }
        int64_t sink = -1;
        double D = 0;
        while (h.size) {
            double d;
            int64_t j;
            heap_pop(&h, &d, &j);
            if (done[j] == stamp || d > lab[j]) continue;
            done[j] = stamp;
            vis[nv++] = j;
            if (y[j] < 0) { sink = j; D = d; break; }
            int64_t i = y[j];
            for (int64_t e = indptr[i]; e < indptr[i + 1]; e++) {
                int64_t j2 = indices[e];
                if (done[j2] == stamp) continue;
                double rc = w[e] - u[i] - v[j2];
                double nd = d + (rc > 0 ? rc : 0);
                if (seen[j2] != stamp || nd < lab[j2]) { seen[j2] = stamp; lab[j2] = nd; pred[j2] = i; heap_push(&h, nd, j2); }
            }
        }
        if (sink < 0) { status = 1; goto out; }
        for (Py_ssize_t t = 0; t < nv; t++) {
            int64_t j = vis[t];
            double delta = D - lab[j];
            v[j] -= delta;
            if (y[j] >= 0) u[y[j]] += delta;
        }
        u[r] += D;
        for (int64_t j = sink;;) {
            int64_t i = pred[j], jprev = x[i];
            y[j] = i;
            x[i] = j;
            if (i == r) break;
            j = jprev;
        }
    }
    /* 3. u from v: every matched edge exactly tight */
    for (Py_ssize_t i = 0; i < n; i++) u[i] = edge_weight(indptr, indices, w, i, x[i]) - v[x[i]];
out:
    free(lab); free(seen); free(done); free(pred); free(vis); free(freel); free(h.key); free(h.col);
    return status;
}

static PyObject *py_sap(PyObject *self, PyObject *args) {
    PyObject *oip, *oid, *ow, *ou, *ov, *ox, *oy;
    if (!PyArg_ParseTuple(args, "OOOOOOO", &oip, &oid, &ow, &ou, &ov, &ox, &oy)) return NULL;
    Py_buffer b[7];
    PyObject *objs[7] = {oip, oid, ow, ou, ov, ox, oy};
    const char kinds[7] = {'i', 'i', 'd', 'd', 'd', 'i', 'i'};
    const int wr[7] = {0, 0, 0, 1, 1, 1, 1};
    const char *names[7] = {"indptr", "indices", "w", "u", "v", "x", "y"};
    int got = 0;
    PyObject *ret = NULL;
    for (; got < 7; got++)
        if (get_buf(objs[got], &b[got], kinds[got], wr[got], names[got]) < 0) goto done;
    Py_ssize_t n = b[0].len / 8 - 1;
    if (n < 0) { PyErr_SetString(PyExc_ValueError, "_lapcore.sap: indptr is empty"); goto done; }
    const int64_t *indptr = b[0].buf, *indices = b[1].buf;
    Py_ssize_t nnz = b[1].len / 8;
    if (indptr[0] != 0 || indptr[n] != nnz || b[2].len / 8 != nnz) {
        PyErr_SetString(PyExc_ValueError, "_lapcore.sap: inconsistent CSR arrays");
        goto done;
    }
    for (Py_ssize_t i = 0; i < n; i++)
        if (indptr[i + 1] < indptr[i]) { PyErr_SetString(PyExc_ValueError, "_lapcore.sap: indptr decreases"); goto done; }
    for (Py_ssize_t e = 0; e < nnz; e++)
        if (indices[e] < 0 || indices[e] >= n) { PyErr_SetString(PyExc_ValueError, "_lapcore.sap: column out of range"); goto done; }
    for (int t = 3; t < 7; t++)
        if (need_len(&b[t], n, names[t]) < 0) goto done;
    int64_t *x = b[5].buf, *y = b[6].buf;
    for (Py_ssize_t i = 0; i < n; i++) {
        if (x[i] < -1 || x[i] >= n || y[i] < -1 || y[i] >= n || (x[i] >= 0 && y[x[i]] != i)) {
            PyErr_SetString(PyExc_ValueError, "_lapcore.sap: x/y is not a consistent partial matching");
            goto done;
        }
    }
    int status;
    Py_BEGIN_ALLOW_THREADS
    status = sap_run(n, indptr, indices, b[2].buf, b[3].buf, b[4].buf, x, y);
    Py_END_ALLOW_THREADS
    if (status < 0) { PyErr_NoMemory(); goto done; }
    ret = PyLong_FromLong(status);
done:
    for (int t = 0; t < got; t++) PyBuffer_Release(&b[t]);
    return ret;
}

/* ---- small helpers of every solve: finiteness, objective + permutation check --------------- */

#define DEFINE_NONFINITE(T, NAME)                                                                 \
    HOT static Py_ssize_t NAME(const T *c, Py_ssize_t len) {                                      \
        for (Py_ssize_t lo = 0; lo < len; lo += 4096) {                                          \
            Py_ssize_t hi = lo + 4096 < len ? lo + 4096 : len;                                   \
            int bad = 0; /* x - x is 0 for finite x, NaN for NaN and +-Inf */                    \
            for (Py_ssize_t t = lo; t < hi; t++) bad |= (c[t] - c[t]) != 0;                      \
            if (bad)                                                                             \
                for (Py_ssize_t t = lo; t < hi; t++)                                             \
                    if ((c[t] - c[t]) != 0) return t;                                            \
        }                                                                                        \
        return -1;                                                                               \
    }

DEFINE_NONFINITE(float, nonfinite_f32)
DEFINE_NONFINITE(double, nonfinite_f64)

static PyObject *py_nonfinite(PyObject *self, PyObject *args) {
    PyObject *oc;
    if (!PyArg_ParseTuple(args, "O", &oc)) return NULL;
    Py_buffer c;
    if (get_buf(oc, &c, 'r', 0, "c") < 0) return NULL;
    Py_ssize_t len = c.len / c.itemsize, at;
    Py_BEGIN_ALLOW_THREADS
    at = c.itemsize == 4 ? nonfinite_f32(c.buf, len) : nonfinite_f64(c.buf, len);
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&c);
    return PyLong_FromSsize_t(at);
}

/* obj[k] = sum_i c[k, i, perm[k, i]] in float64 (sequential sum); returns the first problem whose
 * perm row is not a permutation of 0..n-1, or -1 */
#define DEFINE_OBJECTIVE(T, NAME)                                                                 \
    static Py_ssize_t NAME(const T *c, const int64_t *perm, Py_ssize_t b, Py_ssize_t n, double *obj, \
                           unsigned char *seen) {                                                \
        for (Py_ssize_t k = 0; k < b; k++) {                                                     \
            const T *ck = c + k * n * n;                                                         \
            const int64_t *pk = perm + k * n;                                                    \
            memset(seen, 0, n);                                                                  \
            double acc = 0.0;                                                                    \
            for (Py_ssize_t i = 0; i < n; i++) {                                                 \
                int64_t j = pk[i];                                                               \
                if (j < 0 || j >= n || seen[j]) return k;                                        \
                seen[j] = 1;                                                                     \
                acc += (double)ck[i * n + j];                                                    \
            }                                                                                    \
            obj[k] = acc;                                                                        \
        }                                                                                        \
        return -1;                                                                               \
    }

DEFINE_OBJECTIVE(float, objective_f32)
DEFINE_OBJECTIVE(double, objective_f64)

static PyObject *py_objective(PyObject *self, PyObject *args) {
    PyObject *oc, *op, *oo;
    if (!PyArg_ParseTuple(args, "OOO", &oc, &op, &oo)) return NULL;
    Py_buffer c, p, o;
    if (get_buf(oc, &c, 'r', 0, "c") < 0) return NULL;
    if (get_buf(op, &p, 'i', 0, "perm") < 0) { PyBuffer_Release(&c); return NULL; }
    if (get_buf(oo, &o, 'd', 1, "obj") < 0) { PyBuffer_Release(&c); PyBuffer_Release(&p); return NULL; }
    PyObject *ret = NULL;
    unsigned char *seen = NULL;
    if (c.ndim != 3 || c.shape[1] != c.shape[2] || p.ndim != 2 || p.shape[0] != c.shape[0] ||
        p.shape[1] != c.shape[1] || o.len / 8 < c.shape[0]) {
        PyErr_SetString(PyExc_ValueError, "_lapcore.objective: need c (b, n, n), perm (b, n), obj (b,)");
        goto done;
    }
    Py_ssize_t b = c.shape[0], n = c.shape[1], bad;
    seen = malloc(n > 0 ? n : 1);
    if (!seen) { PyErr_NoMemory(); goto done; }
    if (c.itemsize == 4) bad = objective_f32(c.buf, p.buf, b, n, o.buf, seen);
    else bad = objective_f64(c.buf, p.buf, b, n, o.buf, seen);
    ret = PyLong_FromSsize_t(bad);
done:
    free(seen);
    PyBuffer_Release(&c); PyBuffer_Release(&p); PyBuffer_Release(&o);
    return ret;
}

static PyObject *py_permcheck(PyObject *self, PyObject *args) {
    PyObject *op;
    if (!PyArg_ParseTuple(args, "O", &op)) return NULL;
    Py_buffer p;
    if (get_buf(op, &p, 'i', 0, "perm") < 0) return NULL;
    PyObject *ret = NULL;
    unsigned char *seen = NULL;
    if (p.ndim != 2) { PyErr_SetString(PyExc_ValueError, "_lapcore.permcheck: need perm (b, n)"); goto done; }
    Py_ssize_t b = p.shape[0], n = p.shape[1], bad = -1;
    seen = malloc(n > 0 ? n : 1);
    if (!seen) { PyErr_NoMemory(); goto done; }
    const int64_t *perm = p.buf;
    for (Py_ssize_t k = 0; k < b && bad < 0; k++) {
        memset(seen, 0, n);
        for (Py_ssize_t i = 0; i < n; i++) {
            int64_t j = perm[k * n + i];
            if (j < 0 || j >= n || seen[j]) { bad = k; break; }
            seen[j] = 1;
        }
    }
    ret = PyLong_FromSsize_t(bad);
done:
    free(seen);
    PyBuffer_Release(&p);
    return ret;
}

/* ---- prepare: the first pass of auto on CPU --------------------------------------------------- */

/* One pass over a (b, n, n) cost: the finiteness check, each row's best column (first argmin of
 * s*c: the row bound), optionally the minimisation copy out = s*c, and per problem the number of
 * distinct best columns. Returns the flat index of the first NaN/Inf (then nothing else is
 * meaningful), or -1. */
#define DEFINE_PREPARE(T, NAME)                                                                   \
    HOT static Py_ssize_t NAME(const T *c, Py_ssize_t b, Py_ssize_t n, T s, T *out, int64_t *best, \
                               int64_t *ndistinct, int64_t *stamp) {                             \
        for (Py_ssize_t j = 0; j < n; j++) stamp[j] = -1;                                        \
        for (Py_ssize_t k = 0; k < b; k++) {                                                     \
            int64_t distinct = 0;                                                                \
            for (Py_ssize_t i = 0; i < n; i++) {                                                 \
                Py_ssize_t off = (k * n + i) * n;                                                \
                const T *row = c + off;                                                          \
                T m = (T)INFINITY;                                                               \
                T z = 0; /* sum of y - y: 0 when every entry is finite, NaN otherwise */        \
                if (out) {                                                                       \
                    T *o = out + off;                                                            \
                    _Pragma("omp simd reduction(min : m) reduction(+ : z)")                      \
                    for (Py_ssize_t j = 0; j < n; j++) {                                         \
                        T y = s * row[j];                                                        \
                        o[j] = y;                                                                \
                        z += y - y;                                                              \
                        m = y < m ? y : m;                                                       \
                    }                                                                            \
                } else {                                                                         \
                    _Pragma("omp simd reduction(min : m) reduction(+ : z)")                      \
                    for (Py_ssize_t j = 0; j < n; j++) {                                         \
                        T y = s * row[j];                                                        \
                        z += y - y;                                                              \
                        m = y < m ? y : m;                                                       \
                    }                                                                            \
                }                                                                                \
                int bad = z != 0;                                                                \
                if (bad) {                                                                       \
                    for (Py_ssize_t j = 0; j < n; j++)                                           \
                        if ((row[j] - row[j]) != 0) return off + j;                              \
                }                                                                                \
                if (!best) continue;                                                             \
                Py_ssize_t j = 0, j0 = 0; /* first argmin: a vectorised test per block */       \
                for (;; j0 += BLOCK) {                                                           \
                    Py_ssize_t j1 = j0 + BLOCK < n ? j0 + BLOCK : n;                             \
                    int hit = 0;                                                                 \
                    for (Py_ssize_t t = j0; t < j1; t++) hit |= s * row[t] == m;                 \
                    if (hit) break;                                                              \
                }                                                                                \
                for (j = j0; s * row[j] != m; j++) {}                                            \
                best[k * n + i] = j;                                                             \
                if (stamp[j] != k) { stamp[j] = k; distinct++; }                                 \
            }                                                                                    \
            if (best) ndistinct[k] = distinct;                                                   \
        }                                                                                        \
        return -1;                                                                               \
    }

DEFINE_PREPARE(float, prepare_f32)
DEFINE_PREPARE(double, prepare_f64)

static PyObject *py_prepare(PyObject *self, PyObject *args) {
    PyObject *oc, *oout, *obest, *odist;
    double s;
    if (!PyArg_ParseTuple(args, "OdOOO", &oc, &s, &oout, &obest, &odist)) return NULL;
    Py_buffer b[4];
    int got = 0, has_out = oout != Py_None, has_best = obest != Py_None;
    PyObject *ret = NULL;
    int64_t *stamp = NULL;
    if (get_buf(oc, &b[0], 'r', 0, "c") < 0) return NULL;
    got = 1;
    if (has_out) {
        if (get_buf(oout, &b[1], 'r', 1, "out") < 0) goto done;
    } else {
        memset(&b[1], 0, sizeof(Py_buffer));
    }
    got = 2;
    if (has_best) {
        if (get_buf(obest, &b[2], 'i', 1, "best") < 0) goto done;
        got = 3;
        if (get_buf(odist, &b[3], 'i', 1, "ndistinct") < 0) goto done;
    } else {
        memset(&b[2], 0, 2 * sizeof(Py_buffer));
    }
    got = 4;
    if (b[0].ndim != 3 || b[0].shape[1] != b[0].shape[2]) {
        PyErr_SetString(PyExc_ValueError, "_lapcore.prepare: c must be (b, n, n)");
        goto done;
    }
    Py_ssize_t bb = b[0].shape[0], n = b[0].shape[1];
    if ((has_out && (b[1].itemsize != b[0].itemsize || b[1].len != b[0].len)) ||
        (has_best && (need_len(&b[2], bb * n, "best") < 0 || need_len(&b[3], bb, "ndistinct") < 0))) {
        if (!PyErr_Occurred()) PyErr_SetString(PyExc_ValueError, "_lapcore.prepare: out must match c");
        goto done;
    }
    stamp = malloc(sizeof(int64_t) * (n > 0 ? n : 1));
    if (!stamp) { PyErr_NoMemory(); goto done; }
    Py_ssize_t at = -1;
    if (n > 0) {
        Py_BEGIN_ALLOW_THREADS
        if (b[0].itemsize == 4)
            at = prepare_f32(b[0].buf, bb, n, (float)s, has_out ? b[1].buf : NULL, has_best ? b[2].buf : NULL,
                             has_best ? b[3].buf : NULL, stamp);
        else
            at = prepare_f64(b[0].buf, bb, n, s, has_out ? b[1].buf : NULL, has_best ? b[2].buf : NULL,
                             has_best ? b[3].buf : NULL, stamp);
        Py_END_ALLOW_THREADS
    }
    ret = PyLong_FromSsize_t(at);
done:
    free(stamp);
    for (int t = 0; t < got; t++)
        if ((t != 1 || has_out) && (t < 2 || has_best)) PyBuffer_Release(&b[t]);
    return ret;
}

/* ---- jv: dense Jonker-Volgenant for small problems and batches ---------------------------- */

/* Work arrays of one problem of size n (one set per thread). */
typedef struct {
    double *v, *td, *tv, *tf, *sd;
    int64_t *tp, *pred, *rowsol, *colsol, *freel, *arg, *scan;
    int32_t *tc;
} JVWork;

static void jv_free(JVWork *w) {
    free(w->v); free(w->td); free(w->tv); free(w->tf); free(w->sd);
    free(w->tp); free(w->pred); free(w->rowsol); free(w->colsol); free(w->freel); free(w->arg); free(w->scan);
    free(w->tc);
}

static int jv_alloc(JVWork *w, Py_ssize_t n) {
    size_t dn = sizeof(double) * (n + 1), in = sizeof(int64_t) * (n + 1);
    w->v = malloc(dn); w->td = malloc(dn); w->tv = malloc(dn); w->tf = malloc(dn); w->sd = malloc(dn);
    w->tp = malloc(in); w->pred = malloc(in); w->rowsol = malloc(in); w->colsol = malloc(in); w->freel = malloc(in);
    w->arg = malloc(in); w->scan = malloc(in);
    w->tc = malloc(sizeof(int32_t) * (n + 1));
    if (!w->v || !w->td || !w->tv || !w->tf || !w->sd || !w->tp || !w->pred || !w->rowsol || !w->colsol ||
        !w->freel || !w->arg || !w->scan || !w->tc) {
        jv_free(w);
        return -1;
    }
    return 0;
}

/* first j in [0, n) with a[j] == m (exists), by blocks */
static inline Py_ssize_t find_eq(const double *a, Py_ssize_t n, double m) {
    Py_ssize_t j0 = 0;
    for (;; j0 += BLOCK) {
        Py_ssize_t j1 = j0 + BLOCK < n ? j0 + BLOCK : n;
        int hit = 0;
        for (Py_ssize_t t = j0; t < j1; t++) hit |= a[t] == m;
        if (hit) break;
    }
    Py_ssize_t j = j0;
    while (a[j] != m) j++;
    return j;
}

/* first j in [0, n) with a[j] + b[j] == m (exists), by blocks */
static inline Py_ssize_t find_sum_eq(const double *a, const double *b, Py_ssize_t n, double m) {
    Py_ssize_t j0 = 0;
    for (;; j0 += BLOCK) {
        Py_ssize_t j1 = j0 + BLOCK < n ? j0 + BLOCK : n;
        int hit = 0;
        for (Py_ssize_t t = j0; t < j1; t++) hit |= a[t] + b[t] == m;
        if (hit) break;
    }
    Py_ssize_t j = j0;
    while (a[j] + b[j] != m) j++;
    return j;
}

/* One (n, n) problem: min sum_i s*c[i, perm[i]]. Column reduction, reduction transfer, two rounds
 * of augmenting row reduction (JV 1987), then one Dijkstra per free row over all columns with
 * vectorised scans over the unscanned columns, kept compacted (a scanned column is swapped out);
 * tf[j] = 0 marks free columns, so each scan also finds the nearest free column and a tie between
 * the minimum and a free column ends the search at once. Costs are read as s*c in their
 * own dtype and widened to float64: potentials and distances are float64, as in scipy. */
#define DEFINE_JV(T, NAME)                                                                        \
    HOT static int NAME(const T *c, Py_ssize_t n, double s, Py_ssize_t min_matched, int64_t *perm,  \
                        double *obj, JVWork *w) {                                                \
        double *v = w->v, *td = w->td, *tv = w->tv, *tf = w->tf, *sd = w->sd;                    \
        int64_t *tp = w->tp, *pred = w->pred, *rowsol = w->rowsol, *colsol = w->colsol;          \
        int64_t *freel = w->freel, *arg = w->arg, *scan = w->scan;                               \
        int32_t *tc = w->tc;                                                                     \
        /* column reduction: v_j = min_i s c_ij, arg_j its first row; z: NaN iff a NaN/Inf */    \
        double z = 0.0;                                                                          \
        for (Py_ssize_t j = 0; j < n; j++) {                                                     \
            v[j] = s * (double)c[j];                                                             \
            arg[j] = 0;                                                                          \
            z += v[j] - v[j];                                                                    \
        }                                                                                        \
        for (Py_ssize_t i = 1; i < n; i++) {                                                     \
            const T *row = c + i * n;                                                            \
            double zi = 0.0;                                                                     \
            _Pragma("omp simd reduction(+ : zi)")                                                \
            for (Py_ssize_t j = 0; j < n; j++) {                                                 \
                double x = s * (double)row[j];                                                   \
                int lt = x < v[j];                                                               \
                arg[j] = lt ? (int64_t)i : arg[j];                                               \
                v[j] = lt ? x : v[j];                                                            \
                zi += x - x;                                                                     \
            }                                                                                    \
            z += zi;                                                                             \
        }                                                                                        \
        if (z != 0.0) return 2;                                                                  \
        for (Py_ssize_t i = 0; i < n; i++) { rowsol[i] = -1; freel[i] = 0; }                     \
        for (Py_ssize_t j = n - 1; j >= 0; j--) {                                                \
            int64_t i = arg[j];                                                                  \
            freel[i]++; /* matches */                                                            \
            if (rowsol[i] < 0) { rowsol[i] = j; colsol[j] = i; }                                 \
            else colsol[j] = -1;                                                                 \
        }                                                                                        \
        /* too few rows matched by the column reduction: a hard problem, left to the caller */   \
        Py_ssize_t matched = 0;                                                                  \
        for (Py_ssize_t i = 0; i < n; i++) matched += freel[i] > 0;                              \
        if (matched < min_matched) return 1;                                                     \
        /* reduction transfer; free rows */                                                      \
        Py_ssize_t nfree = 0;                                                                    \
        for (Py_ssize_t i = 0; i < n; i++) {                                                     \
            int64_t matches = freel[i];                                                          \
            if (matches == 0) { scan[nfree++] = i; continue; }                                   \
            if (matches != 1) continue;                                                          \
            const T *row = c + i * n;                                                            \
            int64_t j1 = rowsol[i];                                                              \
            double m = INFINITY;                                                                 \
            SIMD_MIN(m)                                                                          \
            for (Py_ssize_t j = 0; j < n; j++) {                                                 \
                double h = s * (double)row[j] - v[j];                                            \
                h = j == j1 ? INFINITY : h;                                                      \
                m = h < m ? h : m;                                                               \
            }                                                                                    \
            if (m < INFINITY) v[j1] -= m; /* n = 1: no other column */                           \
        }                                                                                        \
        memcpy(freel, scan, sizeof(int64_t) * nfree);                                            \
        /* augmenting row reduction, two rounds */                                               \
        for (int loop = 0; loop < 2 && nfree; loop++) {                                          \
            Py_ssize_t k = 0, prv = nfree, steps = 0;                                            \
            nfree = 0;                                                                           \
            while (k < prv) {                                                                    \
                int64_t i = freel[k++];                                                          \
                const T *row = c + i * n;                                                        \
                double u1 = INFINITY, u2 = INFINITY;                                             \
                SIMD_MIN(u1)                                                                     \
                for (Py_ssize_t j = 0; j < n; j++) {                                             \
                    double h = s * (double)row[j] - v[j];                                        \
                    td[j] = h;                                                                   \
                    u1 = h < u1 ? h : u1;                                                        \
                }                                                                                \
                Py_ssize_t j1 = find_eq(td, n, u1);                                              \
                td[j1] = INFINITY;                                                               \
                SIMD_MIN(u2)                                                                     \
                for (Py_ssize_t j = 0; j < n; j++) u2 = td[j] < u2 ? td[j] : u2;                 \
                Py_ssize_t j2 = find_eq(td, n, u2);                                              \
                int64_t i0 = colsol[j1];                                                         \
                int strict = u1 < u2;                                                            \
                if (strict) v[j1] -= u2 - u1;                                                    \
                else if (i0 >= 0) { j1 = j2; i0 = colsol[j2]; }                                  \
                if (i0 >= 0) rowsol[i0] = -1;                                                    \
                rowsol[i] = j1;                                                                  \
                colsol[j1] = i;                                                                  \
                if (i0 >= 0) {                                                                   \
                    if (strict && ++steps < ARR_CAP) freel[--k] = i0;                            \
                    else freel[nfree++] = i0;                                                    \
                }                                                                                \
            }                                                                                    \
        }                                                                                        \
        /* shortest augmenting paths: Dijkstra over the unscanned columns, kept compacted in    \
         * positions 0..nt-1 (tc column, td distance, tp pred row, tv its v, tf 0 if free) */    \
        for (Py_ssize_t f = 0; f < nfree; f++) {                                                 \
            int64_t fr = freel[f];                                                               \
            const T *row = c + fr * n;                                                           \
            for (Py_ssize_t j = 0; j < n; j++) {                                                 \
                tc[j] = (int32_t)j;                                                              \
                tv[j] = v[j];                                                                    \
                td[j] = s * (double)row[j] - v[j];                                               \
                tp[j] = fr;                                                                      \
                tf[j] = colsol[j] < 0 ? 0.0 : INFINITY;                                          \
            }                                                                                    \
            Py_ssize_t nt = n;                                                                   \
            double mu = INFINITY, mf = INFINITY;                                                 \
            _Pragma("omp simd reduction(min : mu, mf)")                                          \
            for (Py_ssize_t t = 0; t < nt; t++) {                                                \
                mu = td[t] < mu ? td[t] : mu;                                                    \
                double y = td[t] + tf[t];                                                        \
                mf = y < mf ? y : mf;                                                            \
            }                                                                                    \
            Py_ssize_t nscan = 0;                                                                \
            int64_t end;                                                                         \
            for (;;) {                                                                           \
                if (mf <= mu) {                                                                  \
                    Py_ssize_t t = find_sum_eq(td, tf, nt, mf);                                  \
                    end = tc[t];                                                                 \
                    pred[end] = tp[t];                                                           \
                    mu = mf;                                                                     \
                    break;                                                                       \
                }                                                                                \
                Py_ssize_t t = find_eq(td, nt, mu);                                              \
                int64_t j1 = tc[t];                                                              \
                pred[j1] = tp[t];                                                                \
                scan[nscan] = j1;                                                                \
                sd[nscan++] = mu;                                                                \
                nt--;                                                                            \
                tc[t] = tc[nt]; td[t] = td[nt]; tp[t] = tp[nt]; tv[t] = tv[nt]; tf[t] = tf[nt];  \
                int64_t i = colsol[j1];                                                          \
                const T *ri = c + i * n;                                                         \
                double h = mu - (s * (double)ri[j1] - v[j1]);                                    \
                double nmu = INFINITY, nmf = INFINITY;                                           \
                _Pragma("omp simd reduction(min : nmu, nmf)")                                    \
                for (Py_ssize_t q = 0; q < nt; q++) {                                            \
                    double nd = (s * (double)ri[tc[q]] - tv[q]) + h;                             \
                    int lt = nd < td[q];                                                         \
                    td[q] = lt ? nd : td[q];                                                     \
                    tp[q] = lt ? i : tp[q];                                                      \
                    nmu = td[q] < nmu ? td[q] : nmu;                                             \
                    double y = td[q] + tf[q];                                                    \
                    nmf = y < nmf ? y : nmf;                                                     \
                }                                                                                \
                mu = nmu;                                                                        \
                mf = nmf;                                                                        \
            }                                                                                    \
            for (Py_ssize_t t = 0; t < nscan; t++) v[scan[t]] += sd[t] - mu;                     \
            for (;;) {                                                                           \
                int64_t i = pred[end], j1 = rowsol[i];                                           \
                colsol[end] = i;                                                                 \
                rowsol[i] = end;                                                                 \
                if (i == fr) break;                                                              \
                end = j1;                                                                        \
            }                                                                                    \
        }                                                                                        \
        /* the answer: a permutation by construction, checked anyway; float64 objective of c */ \
        double acc = 0.0;                                                                        \
        for (Py_ssize_t j = 0; j < n; j++) tf[j] = 0.0;                                          \
        for (Py_ssize_t i = 0; i < n; i++) {                                                     \
            int64_t j = rowsol[i];                                                               \
            if (j < 0 || j >= n || tf[j] != 0.0) return 3;                                       \
            tf[j] = 1.0;                                                                         \
            perm[i] = j;                                                                         \
            acc += (double)c[i * n + j];                                                         \
        }                                                                                        \
        *obj = acc;                                                                              \
        return 0;                                                                                \
    }

DEFINE_JV(float, jv_f32)
DEFINE_JV(double, jv_f64)

typedef struct {
    const char *c;
    Py_ssize_t b, n, itemsize;
    double s;
    int64_t *perm, *status;
    double *obj;
    Py_ssize_t min_matched;
    Py_ssize_t next; /* shared work counter (under lock) */
    Py_ssize_t deferred;
    pthread_mutex_t lock;
    int failed;
} JVJob;

static void *jv_worker(void *arg) {
    JVJob *job = arg;
    JVWork w;
    if (jv_alloc(&w, job->n) < 0) {
        pthread_mutex_lock(&job->lock);
        job->failed = 1;
        pthread_mutex_unlock(&job->lock);
        return NULL;
    }
    for (;;) {
        pthread_mutex_lock(&job->lock);
        Py_ssize_t k = job->next++;
        pthread_mutex_unlock(&job->lock);
        if (k >= job->b) break;
        const char *ck = job->c + k * job->n * job->n * job->itemsize;
        int64_t *pk = job->perm + k * job->n;
        double *ok = job->obj + k;
        int r = job->itemsize == 4 ? jv_f32((const float *)ck, job->n, job->s, job->min_matched, pk, ok, &w)
                                   : jv_f64((const double *)ck, job->n, job->s, job->min_matched, pk, ok, &w);
        job->status[k] = r;
        if (r) {
            pthread_mutex_lock(&job->lock);
            job->deferred++;
            pthread_mutex_unlock(&job->lock);
        }
    }
    jv_free(&w);
    return NULL;
}

static PyObject *py_jv(PyObject *self, PyObject *args) {
    PyObject *oc, *op, *oo, *ost;
    double s, min_frac;
    int threads;
    if (!PyArg_ParseTuple(args, "OdOOOid", &oc, &s, &op, &oo, &ost, &threads, &min_frac)) return NULL;
    Py_buffer c, p, o, st;
    if (get_buf(oc, &c, 'r', 0, "c") < 0) return NULL;
    if (get_buf(op, &p, 'i', 1, "perm") < 0) { PyBuffer_Release(&c); return NULL; }
    if (get_buf(oo, &o, 'd', 1, "obj") < 0) { PyBuffer_Release(&c); PyBuffer_Release(&p); return NULL; }
    if (get_buf(ost, &st, 'i', 1, "status") < 0) {
        PyBuffer_Release(&c); PyBuffer_Release(&p); PyBuffer_Release(&o); return NULL;
    }
    PyObject *ret = NULL;
    if (c.ndim != 3 || c.shape[1] != c.shape[2] || p.len / 8 < c.shape[0] * c.shape[1] || o.len / 8 < c.shape[0] ||
        st.len / 8 < c.shape[0]) {
        PyErr_SetString(PyExc_ValueError, "_lapcore.jv: need c (b, n, n), perm (b, n), obj (b,), status (b,)");
        goto done;
    }
    JVJob job = {c.buf, c.shape[0], c.shape[1], c.itemsize, s, p.buf, st.buf, o.buf};
    job.min_matched = (Py_ssize_t)ceil(min_frac * (double)job.n);
    job.next = job.deferred = 0;
    job.failed = 0;
    if (job.b == 0 || job.n == 0) { ret = PyLong_FromLong(0); goto done; }
    if (threads > job.b) threads = (int)job.b;
    if (threads < 1) threads = 1;
    pthread_mutex_init(&job.lock, NULL);
    Py_BEGIN_ALLOW_THREADS
    if (threads == 1) {
        jv_worker(&job);
    } else {
        pthread_t *tid = malloc(sizeof(pthread_t) * (threads - 1));
        int started = 0;
        if (tid)
            for (; started < threads - 1; started++)
                if (pthread_create(&tid[started], NULL, jv_worker, &job) != 0) break;
        jv_worker(&job); /* the calling thread works too; fewer helpers if creation failed */
        for (int t = 0; t < started; t++) pthread_join(tid[t], NULL);
        free(tid);
    }
    Py_END_ALLOW_THREADS
    pthread_mutex_destroy(&job.lock);
    if (job.failed && job.next < job.b) { PyErr_NoMemory(); goto done; }
    ret = PyLong_FromSsize_t(job.deferred);
done:
    PyBuffer_Release(&c); PyBuffer_Release(&p); PyBuffer_Release(&o); PyBuffer_Release(&st);
    return ret;
}

/* ---- module ------------------------------------------------------------------------------- */

static PyMethodDef methods[] = {
    {"candidates", py_candidates, METH_VARARGS,
     "candidates(c, sign, k, f, g, rowk, colk) -> (min, max) of sign*c; reductions and top-k candidate edges"},
    {"check", py_check, METH_VARARGS,
     "check(c, sign, u, v, tol, add, rows, rowmin, out_rows, out_cols) -> (count, bad_rows)"},
    {"sap", py_sap, METH_VARARGS, "sap(indptr, indices, w, u, v, x, y) -> status (0 ok, 1 no perfect matching)"},
    {"jv", py_jv, METH_VARARGS,
     "jv(c (b,n,n), sign, perm (b,n) out, obj (b,) out, status (b,) out, threads, min_matched) -> number not solved"},
    {"prepare", py_prepare, METH_VARARGS,
     "prepare(c (b,n,n), sign, out or None, best (b,n) int64, ndistinct (b,) int64) -> first NaN/Inf index or -1"},
    {"permcheck", py_permcheck, METH_VARARGS, "permcheck(perm (b,n) int64) -> first row that is not a permutation, or -1"},
    {"nonfinite", py_nonfinite, METH_VARARGS, "nonfinite(c) -> flat index of the first NaN/Inf of c, or -1"},
    {"objective", py_objective, METH_VARARGS,
     "objective(c (b,n,n), perm (b,n) int64, obj (b,) float64) -> first problem whose perm is invalid, or -1"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_lapcore",
                                    "Single-threaded C passes of the certified solver (rebasin.solvers.certified).",
                                    -1, methods};

PyMODINIT_FUNC PyInit__lapcore(void) { return PyModule_Create(&module); }
