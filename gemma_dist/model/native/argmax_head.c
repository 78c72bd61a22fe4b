/* The greedy LM head of a narrow model (x86-64, AVX2 + FMA): per row of x (M, K), the largest fp32
 * logit x . w_v over vocabulary rows v < limit of W (V, K), and its index, without writing the
 * (M, V) logits anywhere. With K small (the overhead bench's hidden 64) a GEMM's output is the
 * expensive part: 268 MB of logits at M = 256, written and read again by the argmax; here each
 * 6 x 16 tile of logits lives in 12 registers, is reduced to its rows' maxima at once and dropped.
 *
 * W is packed once (pack_panels) into panels of 16 vocabulary rows, K-major: panel p holds
 * W[16p + j, k] at [p][k][j], so one k step of a tile is two 8-wide loads. Each logit is
 * fma(x[k], w[k], acc) for k = 0 .. K - 1 from acc = 0: one fixed sequence of operations whatever
 * M, V, the tiling or the thread count (batch-invariant), the same as a plain K-ordered dot product.
 *
 * Ties go to the lowest index (argmax's rule): each thread scans its own contiguous panel range in
 * increasing order and replaces its best only on a strictly larger value; the threads' bests are
 * merged in range order the same way. NaN logits are never picked (comparisons with NaN are false).
 *
 * Built by gemma_dist/model/native/__init__.py (-O3 -mavx2 -mfma -fopenmp); called through ctypes.
 */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>

#include "lanes.h"

#define NR 16 /* vocabulary rows per panel: two 8-wide vectors */
#define MR 6  /* x rows per tile: 6 x 2 accumulators + 2 panel vectors + 1 broadcast of 16 registers */

/* W (V, K) row-major -> packed (ceil(V / 16), K, 16); rows past V are zeros. */
void pack_panels(const float *w, int64_t v, int64_t k, float *packed) {
    const int64_t panels = (v + NR - 1) / NR;
    for (int64_t p = 0; p < panels; p++) {
        float *out = packed + p * k * NR;
        for (int64_t j = 0; j < NR; j++) {
            const int64_t row = p * NR + j;
            for (int64_t i = 0; i < k; i++) out[i * NR + j] = row < v ? w[row * k + i] : 0.0f;
        }
    }
}

/* Fold one row's 16 logits of panel `col` (columns col .. col + 15, those at or past `limit`
 * ignored) into its running best. The vector maximum first: a tile rarely beats the row's best,
 * and only then is it stored and scanned for its first maximal column. */
static inline void fold(__m256 lo, __m256 hi, int64_t col, int64_t limit, float *best, int64_t *id) {
    if (col + NR > limit) { /* the vocabulary's tail: columns past the limit become -inf */
        float vals[NR];
        _mm256_storeu_ps(vals, lo);
        _mm256_storeu_ps(vals + 8, hi);
        for (int64_t j = limit - col; j < NR; j++) vals[j] = -INFINITY;
        lo = _mm256_loadu_ps(vals);
        hi = _mm256_loadu_ps(vals + 8);
    }
    const float top = hmax8(_mm256_max_ps(lo, hi));
    if (!(top > *best)) return;
    float vals[NR];
    _mm256_storeu_ps(vals, lo);
    _mm256_storeu_ps(vals + 8, hi);
    for (int j = 0; j < NR; j++) {
        if (vals[j] == top) {
            *best = top;
            *id = col + j;
            return;
        }
    }
}

/* Rows m0 .. m0 + rows - 1 (rows <= MR) of x (row stride ldx) against panels p0 .. p1 - 1. */
static void tile_rows(const float *x, int64_t ldx, int64_t m0, int rows, int64_t k, const float *packed,
                      int64_t p0, int64_t p1, int64_t limit, float *best, int64_t *id) {
    const float *xr[MR];
    for (int r = 0; r < MR; r++) xr[r] = x + (m0 + (r < rows ? r : 0)) * ldx; /* spare lanes redo row m0 */
    for (int64_t p = p0; p < p1; p++) {
        const float *b = packed + p * k * NR;
        __m256 acc[MR][2];
        for (int r = 0; r < MR; r++) acc[r][0] = acc[r][1] = _mm256_setzero_ps();
        for (int64_t i = 0; i < k; i++) {
            const __m256 b0 = _mm256_loadu_ps(b + i * NR), b1 = _mm256_loadu_ps(b + i * NR + 8);
            for (int r = 0; r < MR; r++) {
                const __m256 a = _mm256_broadcast_ss(xr[r] + i);
                acc[r][0] = _mm256_fmadd_ps(a, b0, acc[r][0]);
                acc[r][1] = _mm256_fmadd_ps(a, b1, acc[r][1]);
            }
        }
        /* Through memory: indexed by the runtime `rows`, the accumulators themselves would live on
         * the stack, stored at every k step (measured 2.5x slower). */
        __m256 tile[MR][2];
        for (int r = 0; r < MR; r++) {
            tile[r][0] = acc[r][0];
            tile[r][1] = acc[r][1];
        }
        for (int r = 0; r < rows; r++) fold(tile[r][0], tile[r][1], p * NR, limit, best + m0 + r, id + m0 + r);
    }
}

/* Panels p0 .. p1 - 1 for every row of x (M rows), into best / id (M each, initialized). */
static void panel_range(const float *x, int64_t m, int64_t k, const float *packed, int64_t p0, int64_t p1,
                        int64_t limit, float *best, int64_t *id) {
    /* Panels in groups that stay in L1 (16 KB of packed W) while every row block passes over them. */
    const int64_t group = k * NR * 4 <= 16384 ? 16384 / (k * NR * 4) : 1;
    for (int64_t g = p0; g < p1; g += group) {
        const int64_t g1 = g + group < p1 ? g + group : p1;
        for (int64_t m0 = 0; m0 < m; m0 += MR)
            tile_rows(x, k, m0, (int)(m - m0 < MR ? m - m0 : MR), k, packed, g, g1, limit, best, id);
    }
}

/* best (M,), id (M,) = the largest logit of each row of x (M, K) contiguous over columns below
 * `limit` of packed W (pack_panels) and its lowest index; (-inf, 0) where no logit beats -inf.
 * The panels are cut into CHUNKS_PER_THREAD contiguous ranges per thread, which `threads` OpenMP
 * threads (torch's own team: the same libgomp) take as they come free: a thread the OS deschedules
 * (other processes of a served replica share the cores) delays one small range, not half the
 * product. Each range's winners go to its own slot, merged in range order: the result does not
 * depend on which thread took what. Returns 0, or -1 when the scratch could not be allocated. */
#define CHUNKS_PER_THREAD 8
int argmax_head(const float *x, int64_t m, int64_t k, const float *packed, int64_t limit, int64_t threads,
                float *best, int64_t *id) {
    const int64_t panels = (limit + NR - 1) / NR;
    if (threads < 1) threads = 1;
    int64_t chunks = threads == 1 ? 1 : threads * CHUNKS_PER_THREAD;
    if (chunks > panels) chunks = panels > 0 ? panels : 1;
    if (threads > chunks) threads = chunks;
    float *bests = (float *)malloc((size_t)(chunks * m) * sizeof(float));
    int64_t *ids = (int64_t *)malloc((size_t)(chunks * m) * sizeof(int64_t));
    if (bests == NULL || ids == NULL) {
        free(bests);
        free(ids);
        return -1;
    }
    for (int64_t i = 0; i < chunks * m; i++) {
        bests[i] = -INFINITY;
        ids[i] = 0;
    }
#pragma omp parallel for num_threads(threads) schedule(dynamic, 1)
    for (int64_t c = 0; c < chunks; c++) {
        const int64_t p0 = panels * c / chunks, p1 = panels * (c + 1) / chunks;
        panel_range(x, m, k, packed, p0, p1, limit, bests + c * m, ids + c * m);
    }
    for (int64_t r = 0; r < m; r++) {
        best[r] = -INFINITY;
        id[r] = 0;
        for (int64_t c = 0; c < chunks; c++) { /* range order: an equal later maximum keeps the first */
            if (bests[c * m + r] > best[r]) {
                best[r] = bests[c * m + r];
                id[r] = ids[c * m + r];
            }
        }
    }
    free(bests);
    free(ids);
    return 0;
}

/* best (M,), id (M,) = each row's largest value of y (M rows of n values, row stride ld) and its
 * lowest index: the greedy pick over logits a kernel has already written (the int8 LM head's). One
 * vector pass for the maximum, one scan for its first column; torch's argmax measured ~4x slower
 * over a (1, 262144) row. NaN is never picked; a row with nothing above -inf gives (-inf, 0). */
void rows_argmax(const float *y, int64_t m, int64_t n, int64_t ld, float *best, int64_t *id) {
    for (int64_t r = 0; r < m; r++) {
        const float *row = y + r * ld;
        __m256 acc = _mm256_set1_ps(-INFINITY);
        int64_t j = 0;
        for (; j + 8 <= n; j += 8) acc = _mm256_max_ps(_mm256_loadu_ps(row + j), acc); /* NaN in the load: acc kept */
        float top = hmax8(acc);
        for (; j < n; j++)
            if (row[j] > top) top = row[j];
        best[r] = top;
        id[r] = 0;
        if (top == -INFINITY) continue;
        for (j = 0; j < n; j++) {
            if (row[j] == top) {
                id[r] = j;
                break;
            }
        }
    }
}
