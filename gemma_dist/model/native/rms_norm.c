/* Gemma's RMSNorm in one call (x86-64, AVX2 + FMA): y = (x * (1 / sqrt(mean(x^2) + eps))) * scale
 * per row of `dim` fp32 values, scale = 1 + w. The torch form runs six ops a norm (pow, mean, add,
 * rsqrt, two multiplies): a module call measured ~24 us for one 640-wide row, nearly all dispatch,
 * and Gemma 3 runs six norms per layer (3 ms a token of single-stream decode for the 270M model).
 * Through this kernel the whole call measured ~8 us, most of it ctypes and the output's allocation.
 *
 * Rows are addressed as (outer, inner) with their own strides, so the q/k norm reads q and k in
 * place from the fused QKV projection's output; y is contiguous (outer, inner, dim). Each row's
 * sum of squares is one fixed sequence of operations (four 8-lane accumulators over the row, then
 * their fixed pairwise fold), whatever else is in the call or how many threads run: batch-invariant.
 * It is not the summation order of torch's mean, so results differ from the torch form's in the
 * last bits; the two multiplies round as torch's do (x * inv first, then * scale).
 *
 * Built by gemma_dist/model/native/__init__.py (-O3 -mavx2 -mfma -fopenmp); called through ctypes.
 */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>

static float sum_of_squares(const float *x, int64_t dim) {
    __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
    int64_t i = 0;
    for (; i + 32 <= dim; i += 32) {
        for (int a = 0; a < 4; a++) {
            const __m256 v = _mm256_loadu_ps(x + i + 8 * a);
            acc[a] = _mm256_fmadd_ps(v, v, acc[a]);
        }
    }
    for (; i + 8 <= dim; i += 8) {
        const __m256 v = _mm256_loadu_ps(x + i);
        acc[0] = _mm256_fmadd_ps(v, v, acc[0]);
    }
    const __m256 both = _mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3]));
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(both), _mm256_extractf128_ps(both, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    float total = _mm_cvtss_f32(s);
    for (; i < dim; i++) total += x[i] * x[i];
    return total;
}

static void norm_row(const float *x, int64_t dim, const float *scale, float eps, float *y) {
    const float inv = 1.0f / sqrtf(sum_of_squares(x, dim) / (float)dim + eps);
    const __m256 vinv = _mm256_set1_ps(inv);
    int64_t i = 0;
    for (; i + 8 <= dim; i += 8) {
        const __m256 t = _mm256_mul_ps(_mm256_loadu_ps(x + i), vinv);
        _mm256_storeu_ps(y + i, _mm256_mul_ps(t, _mm256_loadu_ps(scale + i)));
    }
    for (; i < dim; i++) y[i] = (x[i] * inv) * scale[i];
}

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
