/* Rotary position embedding in one call (x86-64, AVX2, fp32): y = x * cos + swap(x) * signed_sin,
 * swap(x) = (x2, x1) for x = (x1, x2) along head_dim, signed_sin = (-sin1, sin2) (layers.rope_cos_sin's
 * tables). The torch form is four ops (roll, two multiplies, an add) for each of q and k per layer,
 * about 0.7 ms a token of single-stream decode for Gemma 3 270M in dispatch alone.
 *
 * The same three roundings as the torch form, in the same order (each product rounded, then their
 * sum): fp-contract is off below, so no product is fused into an FMA and the result is bitwise the
 * torch form's.
 *
 * Built by gemma_dist/model/native/__init__.py (-O3 -mavx2 -mfma -fopenmp); called through ctypes.
 */
#pragma GCC optimize("fp-contract=off")
#include <immintrin.h>
#include <stdint.h>

/* One row: out (d) from row (d) at the tables' row c, s. */
static void rotate(const float *row, const float *c, const float *s, int64_t d, float *out) {
    const int64_t half = d / 2;
    int64_t j = 0;
    for (; j + 8 <= half; j += 8) {
        const __m256 x1 = _mm256_loadu_ps(row + j), x2 = _mm256_loadu_ps(row + half + j);
        _mm256_storeu_ps(out + j, _mm256_add_ps(_mm256_mul_ps(x1, _mm256_loadu_ps(c + j)),
                                                _mm256_mul_ps(x2, _mm256_loadu_ps(s + j))));
        _mm256_storeu_ps(out + half + j, _mm256_add_ps(_mm256_mul_ps(x2, _mm256_loadu_ps(c + half + j)),
                                                       _mm256_mul_ps(x1, _mm256_loadu_ps(s + half + j))));
    }
    for (; j < half; j++) {
        const float a = row[j] * c[j], b = row[half + j] * s[j];
        out[j] = a + b;
        const float e = row[half + j] * c[half + j], f = row[j] * s[half + j];
        out[half + j] = e + f;
    }
}

/* Row r = (token r / heads, head r % heads) of x into y's row r. */
static void rotate_row(const float *x, int64_t r, int64_t heads, int64_t s_t, int64_t s_h, int64_t d,
                       const float *cos, const float *ssin, float *y) {
    const int64_t token = r / heads;
    rotate(x + token * s_t + (r % heads) * s_h, cos + token * d, ssin + token * d, d, y + r * d);
}

/* y (T, heads, d) contiguous from rows x[t * s_t + h * s_h + 0 .. d - 1] and tables cos, ssin (T, d)
 * contiguous; d even. The rows split over `threads` OpenMP threads when given more than one (one
 * thread: no parallel region, see rms_norm.c). */
void rope(const float *x, int64_t t, int64_t heads, int64_t s_t, int64_t s_h, int64_t d, const float *cos,
          const float *ssin, float *y, int64_t threads) {
    const int64_t rows = t * heads;
    if (threads < 2 || rows < 2) {
        for (int64_t r = 0; r < rows; r++) rotate_row(x, r, heads, s_t, s_h, d, cos, ssin, y);
        return;
    }
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t r = 0; r < rows; r++) rotate_row(x, r, heads, s_t, s_h, d, cos, ssin, y);
}
