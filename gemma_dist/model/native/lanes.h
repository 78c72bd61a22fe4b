/* Horizontal reductions of one 8-lane fp32 vector (x86-64, AVX2), each in one fixed order (the two
 * 128-bit halves, then pairs, then the last two lanes), shared by the kernels so every caller
 * reduces alike: a kernel's result must not depend on which of its loops reduced it.
 *
 * Included by source files that gemma_dist/model/native/__init__.py builds (a header's bytes are
 * part of every library's build digest).
 */
#ifndef GEMMA_DIST_LANES_H
#define GEMMA_DIST_LANES_H
#include <immintrin.h>

/* The sum of v's 8 lanes. */
static inline float hsum8(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* The largest of v's 8 lanes. */
static inline float hmax8(__m256 v) {
    __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    m = _mm_max_ps(m, _mm_movehl_ps(m, m));
    m = _mm_max_ss(m, _mm_movehdup_ps(m));
    return _mm_cvtss_f32(m);
}

#endif
