/* Block-quantized int8 matrix products for the CPU int8 mode (x86-64, AVX2 + FMA + F16C).
 *
 * Both operands are int8 with one scale per block of QB values along the reduction: x (M, K) ->
 * xq (M, K) int8, xd (M, K / QB) fp32, and W (N, K) -> wq (N, K) int8, wd (N, K / WQB) fp16 (IEEE
 * half bits, widened by F16C: at M = 1 the product streams the weights from memory, and fp32 scales
 * were a fifth of its bytes at QB 16; the 262,144 x 640 LM head at M = 1 measured 7.4-8.1 ms with
 * fp16 scales against 9.3-10.5 with fp32 ones, alternating processes on a 2-core EPYC). Then
 *     y[m, n] = sum over blocks b of xd[m, b] * wd[n, b * QB / WQB] * sum_{i in b} xq[m, i] * wq[n, i],
 * the inner sums exact in int32 (AVX2 has no int8 dot instruction without VNNI: |w| (u8) times
 * x * sign(w) (s8) by maddubs gives int16 pair sums, at most 2 * 127 * 127 < 2^15, so nothing
 * saturates while values stay in [-127, 127]; madd with ones widens them to int32).
 * Each y[m, n] is one fixed sequence of operations whatever M, N or the tiling: batch-invariant.
 *
 * Built by gemma_dist/model/native/__init__.py (-O3 -mavx2 -mfma -mf16c -fopenmp -DQB=<block>
 * -DWQB=<weight block>); called through ctypes.
 */
#include <immintrin.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "lanes.h"

#ifndef QB
#define QB 32
#endif
#if QB != 32 && QB != 16
#error "QB must be 16 or 32"
#endif
/* Values per weight scale block (default QB): 32 with QB 16 gives each weight scale to both 16-value
 * halves of a chunk (the LM head's: a GGUF Q8_0 tensor quantizes back to its own codes and scales). */
#ifndef WQB
#define WQB QB
#endif
#if WQB != QB && !(QB == 16 && WQB == 32)
#error "WQB must be QB, or 32 with QB 16"
#endif

/* Rows of x (M, K) fp32 (row stride ldx) to int8 blocks: q (M, K), d (M, K / QB). Symmetric:
 * scale = max |x| / 127 per block (0 for a zero block), codes = x * (127 / max |x|) rounded to the
 * nearest integer, ties to even (cvtps rounds so). */
void q8_quantize(const float *x, int64_t m, int64_t k, int64_t ldx, int8_t *q, float *d) {
    const int64_t blocks = k / QB;
    const __m256 sign_bit = _mm256_set1_ps(-0.0f);
    for (int64_t row = 0; row < m; row++) {
        const float *xr = x + row * ldx;
        for (int64_t b = 0; b < blocks; b++) {
            const float *v = xr + b * QB;
            __m256 part[QB / 8];
            __m256 amax = _mm256_setzero_ps();
            for (int i = 0; i < QB / 8; i++) {
                part[i] = _mm256_loadu_ps(v + 8 * i);
                amax = _mm256_max_ps(amax, _mm256_andnot_ps(sign_bit, part[i]));
            }
            const float top = hmax8(amax);
            d[row * blocks + b] = top / 127.0f;
            const __m256 inv = _mm256_set1_ps(top > 0.0f ? 127.0f / top : 0.0f);
            int8_t *out = q + row * k + b * QB;
            for (int i = 0; i < QB / 8; i += 2) {  /* 16 values: two int32 vectors -> 16 int8 */
                const __m256i lo = _mm256_cvtps_epi32(_mm256_mul_ps(part[i], inv));
                const __m256i hi = _mm256_cvtps_epi32(_mm256_mul_ps(part[i + 1], inv));
                const __m128i w16 = _mm_packs_epi32(_mm256_castsi256_si128(lo), _mm256_extracti128_si256(lo, 1));
                const __m128i w16b = _mm_packs_epi32(_mm256_castsi256_si128(hi), _mm256_extracti128_si256(hi, 1));
                _mm_storeu_si128((__m128i *)(out + 8 * i), _mm_packs_epi16(w16, w16b));
            }
        }
    }
}

/* One operand row's scales for the 32 values of chunk j, one per int32 lane of `chunk_dot`: with
 * QB 32 one scale everywhere; with QB 16 block 2j's in lanes 0-3 and block 2j + 1's in lanes 4-7
 * (madd_epi16 keeps the register's 128-bit halves apart: bytes 0-15 sum into lanes 0-3). */
static inline __m256 chunk_scales(const float *d, int64_t j) {
#if QB == 32
    return _mm256_broadcast_ss(d + j);
#else
    const __m256 pair = _mm256_castpd_ps(_mm256_broadcast_sd((const double *)(d + 2 * j)));  /* a b a b ... */
    return _mm256_permutevar8x32_ps(pair, _mm256_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1));
#endif
}

/* chunk_scales of a weight row's fp16 scales (d: half bits, one per WQB values), widened to fp32. */
static inline __m256 chunk_scales_h(const uint16_t *d, int64_t j) {
#if WQB == 32
    return _mm256_set1_ps(_cvtsh_ss(d[j]));
#else
    int32_t pair;  /* blocks 2j, 2j + 1 */
    memcpy(&pair, d + 2 * j, sizeof pair);
    const __m256 two = _mm256_castps128_ps256(_mm_cvtph_ps(_mm_cvtsi32_si128(pair)));
    return _mm256_permutevar8x32_ps(two, _mm256_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1));
#endif
}

/* 8 int32 lanes of pair products of one 32-byte chunk: x (s8) times w (s8). */
static inline __m256 chunk_dot(__m256i aw, __m256i w, __m256i x) {
    const __m256i ones = _mm256_set1_epi16(1);
    const __m256i p16 = _mm256_maddubs_epi16(aw, _mm256_sign_epi8(x, w));
    return _mm256_cvtepi32_ps(_mm256_madd_epi16(p16, ones));
}

#define LOAD(p) _mm256_loadu_si256((const __m256i *)(p))

/* y rows m, m + 1 at columns n .. n + 3 (rows past n_end are computed from row n, not stored). */
static void tile_2x4(const int8_t *xq, const float *xd, int64_t k, const int8_t *wq, const uint16_t *wd,
                     int64_t n, int64_t n_end, float *y, int64_t ldy) {
    const int64_t chunks = k / 32, blocks = k / QB, w_blocks = k / WQB;
    const int8_t *w[4];
    const uint16_t *s[4];
    for (int r = 0; r < 4; r++) {
        const int64_t row = n + r < n_end ? n + r : n;
        w[r] = wq + row * k;
        s[r] = wd + row * w_blocks;
    }
    const int8_t *x0 = xq, *x1 = xq + k;
    const float *d0 = xd, *d1 = xd + blocks;
    __m256 a00 = _mm256_setzero_ps(), a01 = a00, a02 = a00, a03 = a00;
    __m256 a10 = a00, a11 = a00, a12 = a00, a13 = a00;
    for (int64_t j = 0; j < chunks; j++) {
        const __m256i xv0 = LOAD(x0 + 32 * j), xv1 = LOAD(x1 + 32 * j);
        const __m256 xs0 = chunk_scales(d0, j), xs1 = chunk_scales(d1, j);
#define ROW(r, acc0, acc1)                                                                    \
        {                                                                                     \
            const __m256i wv = LOAD(w[r] + 32 * j), aw = _mm256_sign_epi8(wv, wv);            \
            const __m256 ws = chunk_scales_h(s[r], j);                                        \
            acc0 = _mm256_fmadd_ps(chunk_dot(aw, wv, xv0), _mm256_mul_ps(xs0, ws), acc0);     \
            acc1 = _mm256_fmadd_ps(chunk_dot(aw, wv, xv1), _mm256_mul_ps(xs1, ws), acc1);     \
        }
        ROW(0, a00, a10) ROW(1, a01, a11) ROW(2, a02, a12) ROW(3, a03, a13)
#undef ROW
    }
    const __m256 acc[2][4] = {{a00, a01, a02, a03}, {a10, a11, a12, a13}};
    for (int c = 0; c < 2; c++)
        for (int r = 0; r < 4 && n + r < n_end; r++) y[c * ldy + n + r] = hsum8(acc[c][r]);
}

/* y[n0:n1] of one x row: the weight rows one after another, a single sequential stream (at M = 1
 * the product streams the weights once, from memory: tiles of 4 interleaved rows measured 4.8
 * GB/s there, this ~12). The same operations per output as tile_2x4: bitwise its results. */
static void row_by_row(const int8_t *xq, const float *xd, int64_t k, const int8_t *wq, const uint16_t *wd,
                       int64_t n0, int64_t n1, float *y) {
    const int64_t chunks = k / 32, w_blocks = k / WQB;
    for (int64_t n = n0; n < n1; n++) {
        const int8_t *w = wq + n * k;
        const uint16_t *s = wd + n * w_blocks;
        _mm_prefetch((const char *)(w + 4 * k), _MM_HINT_T0);
        __m256 acc = _mm256_setzero_ps();
        for (int64_t j = 0; j < chunks; j++) {
            const __m256i wv = LOAD(w + 32 * j), aw = _mm256_sign_epi8(wv, wv);
            acc = _mm256_fmadd_ps(chunk_dot(aw, wv, LOAD(xq + 32 * j)),
                                  _mm256_mul_ps(chunk_scales(xd, j), chunk_scales_h(s, j)), acc);
        }
        y[n] = hsum8(acc);
    }
}

/* y[:, n0:n1] (M rows, row stride ldy) of the block-quantized x (M, K) and W (N, K); K a multiple
 * of 32. Columns are visited in panels of `panel` weight rows so a panel stays in cache while
 * every x row passes over it. */
void q8_gemm(const int8_t *xq, const float *xd, int64_t m, int64_t k, const int8_t *wq, const uint16_t *wd,
             int64_t n0, int64_t n1, int64_t panel, float *y, int64_t ldy) {
    const int64_t blocks = k / QB;
    if (m == 1) {
        row_by_row(xq, xd, k, wq, wd, n0, n1, y);
        return;
    }
    for (int64_t p = n0; p < n1; p += panel) {
        const int64_t p_end = p + panel < n1 ? p + panel : n1;
        int64_t row = 0;
        for (; row + 2 <= m; row += 2)
            for (int64_t n = p; n < p_end; n += 4)
                tile_2x4(xq + row * k, xd + row * blocks, k, wq, wd, n, p_end, y + row * ldy, ldy);
        if (row < m)  /* an odd last row, over the panel still in cache */
            row_by_row(xq + row * k, xd + row * blocks, k, wq, wd, p, p_end, y + row * ldy);
    }
}

/* q8_gemm over `threads` OpenMP threads, the columns cut into CHUNKS_PER_THREAD ranges of whole
 * 4-row tiles per thread, taken as threads come free (a thread the OS deschedules, when other
 * processes of a served replica share the cores, delays one small range, not its static half);
 * each range by one thread, so every output is still one fixed sequence of operations. In a torch
 * process the team is torch's own (the same libgomp.so.1), already started and waiting, so even a
 * one-row product of a decode step splits profitably: 1536 x 640 at M = 1 measured 103 us on one
 * thread and 81 on two, where two threads by a pthread create + join per call took 152 (against 73
 * on one). Reached through q8_linear, called with the GIL held (ctypes.PyDLL), so no other Python
 * thread of the caller's process (a Ray worker has several) can delay the return (layers._q8_library). */
#define CHUNKS_PER_THREAD 4
void q8_gemm_threads(const int8_t *xq, const float *xd, int64_t m, int64_t k, const int8_t *wq, const uint16_t *wd,
                     int64_t n, int64_t panel, float *y, int64_t ldy, int64_t threads) {
    if (threads < 1) threads = 1;
    if (threads == 1) {
        q8_gemm(xq, xd, m, k, wq, wd, 0, n, panel, y, ldy);
        return;
    }
    const int64_t chunks = threads * CHUNKS_PER_THREAD;
#pragma omp parallel for num_threads(threads) schedule(dynamic, 1)
    for (int64_t c = 0; c < chunks; c++) {
        const int64_t a = (n * c / chunks + 3) / 4 * 4, b = (n * (c + 1) / chunks + 3) / 4 * 4;
        if (a < b && a < n) q8_gemm(xq, xd, m, k, wq, wd, a, b < n ? b : n, panel, y, ldy);
    }
}

/* y (M, N) = x (M, K) fp32 (K a multiple of 32, rows contiguous) times W^T, W block-quantized:
 * x quantized into scratch of its own (q8_quantize), then q8_gemm_threads. One call where a
 * decode step's one-row products would otherwise pay for two calls and two torch allocations.
 * Returns 0, or -1 when the scratch could not be allocated (y untouched). */
int q8_linear(const float *x, int64_t m, int64_t k, const int8_t *wq, const uint16_t *wd, int64_t n, int64_t panel,
              float *y, int64_t threads) {
    int8_t *xq = (int8_t *)malloc((size_t)(m * k));
    float *xd = (float *)malloc((size_t)(m * (k / QB)) * sizeof(float));
    if (xq == NULL || xd == NULL) {
        free(xq);
        free(xd);
        return -1;
    }
    q8_quantize(x, m, k, k, xq, xd);
    q8_gemm_threads(xq, xd, m, k, wq, wd, n, panel, y, n, threads);
    free(xq);
    free(xd);
    return 0;
}
