/* Gemma's RMSNorm in one call (x86-64, AVX2 + FMA): y = (x * (1 / sqrt(mean(x^2) + eps))) * scale
 * per row of `dim` fp32 values, scale = 1 + w (one row's arithmetic: norm_row.h). The torch form
 * runs six ops a norm (pow, mean, add, rsqrt, two multiplies): a module call measured ~24 us for
 * one 640-wide row, nearly all dispatch, and Gemma 3 runs six norms per layer (3 ms a token of
 * single-stream decode for the 270M model). Through this kernel the whole call measured ~8 us,
 * most of it ctypes and the output's allocation.
 *
 * `rms_norm` addresses rows as (outer, inner) with their own strides, so it reads strided views in
 * place; y is contiguous (outer, inner, dim). `residual_rms_norm` fuses a decoder layer's residual
 * step (Gemma 2/3's post-norm of the sublayer's output, the add to the residual stream, and the
 * next sublayer's pre-norm): three ops and two allocations fewer per step, the same roundings.
 * Each row is one fixed sequence of operations whatever else is in the call or how many threads
 * run: batch-invariant.
 *
 * Built by gemma_dist/model/native/__init__.py (-O3 -mavx2 -mfma -fopenmp); called through ctypes.
 */
#include "norm_row.h"

/* Row r = (r / inner, r % inner) of x. */
static inline const float *row_at(const float *x, int64_t r, int64_t inner, int64_t s_outer, int64_t s_inner) {
    return x + (r / inner) * s_outer + (r % inner) * s_inner;
}

/* y (outer, inner, dim) contiguous = the norm of each row x[o * s_outer + n * s_inner + 0 .. dim - 1];
 * the rows split over `threads` OpenMP threads (torch's own team) when there are at least two. */
void rms_norm(const float *x, int64_t outer, int64_t inner, int64_t s_outer, int64_t s_inner, int64_t dim,
              const float *scale, float eps, float *y, int64_t threads) {
    const int64_t rows = outer * inner;
    /* One thread: no parallel region at all. With a one-thread region per norm, fp32 single-stream
     * decode of Gemma 3 270M measured 84 ms a token against 77-81 for the torch norms (its oneDNN
     * products run right after); without it, 75-78. */
    if (threads < 2 || rows < 2) {
        for (int64_t r = 0; r < rows; r++) norm_row(row_at(x, r, inner, s_outer, s_inner), dim, scale, eps, y + r * dim);
        return;
    }
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t r = 0; r < rows; r++) norm_row(row_at(x, r, inner, s_outer, s_inner), dim, scale, eps, y + r * dim);
}

/* One row of residual_rms_norm: sum = x + (post ? norm(h, post) : h), normed = norm(sum, pre). */
static void residual_row(const float *x, const float *h, int64_t dim, const float *post, const float *pre, float eps,
                         float *sum, float *normed) {
    const float *added = h;
    if (post != NULL) {
        norm_row(h, dim, post, eps, sum);  /* the post-norm lands in `sum`, then the add overwrites it */
        added = sum;
    }
    int64_t i = 0;
    for (; i + 8 <= dim; i += 8)
        _mm256_storeu_ps(sum + i, _mm256_add_ps(_mm256_loadu_ps(x + i), _mm256_loadu_ps(added + i)));
    for (; i < dim; i++) sum[i] = x[i] + added[i];
    norm_row(sum, dim, pre, eps, normed);
}

/* A decoder layer's residual step over `rows` contiguous rows of `dim` values: sum = x + post(h)
 * (x + h where post_scale is NULL: Gemma 1 has no post-norms) and normed = pre(sum), each the exact
 * roundings of the separate norm, add and norm. The rows split over `threads` OpenMP threads when
 * there are at least two. */
void residual_rms_norm(const float *x, const float *h, int64_t rows, int64_t dim, const float *post_scale,
                       const float *pre_scale, float eps, float *sum, float *normed, int64_t threads) {
    if (threads < 2 || rows < 2) {
        for (int64_t r = 0; r < rows; r++)
            residual_row(x + r * dim, h + r * dim, dim, post_scale, pre_scale, eps, sum + r * dim, normed + r * dim);
        return;
    }
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t r = 0; r < rows; r++)
        residual_row(x + r * dim, h + r * dim, dim, post_scale, pre_scale, eps, sum + r * dim, normed + r * dim);
}
