/* Gemma's RMSNorm of one row (x86-64, AVX2 + FMA, fp32), shared by rms_norm.c (the norm alone, and
 * fused with the residual add) and rope.c (q/k norm fused with RoPE): every caller rounds a row
 * exactly alike. y = (x * (1 / sqrt(mean(x^2) + eps))) * scale, scale = 1 + w. The sum of squares is
 * one fixed sequence of operations (four 8-lane accumulators over the row, then their fixed pairwise
 * fold, the tail by explicit FMAs whatever the file's contraction setting), so a row's result does
 * not depend on its batch; it is not torch's mean's order, so results differ from the torch form's
 * in the last bits. The two multiplies round as torch's do (x * inv first, then * scale).
 *
 * Included by source files that gemma_dist/model/native/__init__.py builds (a header's bytes are
 * part of every library's build digest).
 */
#ifndef GEMMA_DIST_NORM_ROW_H
#define GEMMA_DIST_NORM_ROW_H
#include <immintrin.h>
#include <math.h>
#include <stdint.h>

#include "lanes.h"

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
    float total = hsum8(_mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3])));
    for (; i < dim; i++) total = fmaf(x[i], x[i], total);
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

#endif
