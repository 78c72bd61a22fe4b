/* Attention of decode rows (one new token per sequence) over the paged KV cache, in place
 * (x86-64, AVX2 + FMA, fp32). The torch form gathers every sequence's key and value pages into new
 * tensors, then runs two batched products, a scale, a mask fill and a softmax: about a dozen ops a
 * layer, which at batch 1 cost more in dispatch than in arithmetic, and at batch 32 copy the whole
 * context twice. Here one call reads each key and value where the cache holds it.
 *
 * Per sequence b and KV head h, for its `per_kv` query heads together (each key and value row read
 * once for all of them): s_j = (q . k_j) * scale (softcapped: cap * tanh(s_j / cap)) over the keys
 * the row's mask shows, p_j = e^(s_j - max) / sum (e^x eight lanes at a time: exp_nonpositive),
 * out = sum_j p_j v_j, in key order. Each output is one fixed sequence of operations whatever else
 * is in the call or how many threads run (batch-invariant); the dot products and sums are not in
 * the torch form's order and e^x is not libm's, so results differ from it in the last bits.
 *
 * Built by gemma_dist/model/native/__init__.py (-O3 -mavx2 -mfma -fopenmp); called through ctypes.
 */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>

#include "lanes.h"

/* The fold of a dot product's two 8-lane accumulators into one float, in a fixed order. */
static inline float fold(__m256 acc0, __m256 acc1) { return hsum8(_mm256_add_ps(acc0, acc1)); }

/* a . b over d values: accumulator 0 takes the even 8-value steps, 1 the odd ones (and a last odd
 * 8 goes to 0), then `fold`, then the tail by FMAs. `dots4` runs exactly these operations for four
 * rows at once. */
static inline float dot(const float *a, const float *b, int64_t d) {
    __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
    int64_t i = 0;
    for (; i + 16 <= d; i += 16) {
        acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc0);
        acc1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 8), _mm256_loadu_ps(b + i + 8), acc1);
    }
    for (; i + 8 <= d; i += 8) acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc0);
    float total = fold(acc0, acc1);
    for (; i < d; i++) total = fmaf(a[i], b[i], total);
    return total;
}

/* s[r] = dot(a + r * d, b, d) for rows r < 4, bitwise: b is loaded once for the four, and their eight
 * independent FMA chains keep the FMA units busy where one row's two chains wait on latency (head_dim
 * 256: one key against four query heads). */
static void dots4(const float *a, const float *b, int64_t d, float *s) {
    __m256 acc[4][2];
    for (int r = 0; r < 4; r++) acc[r][0] = acc[r][1] = _mm256_setzero_ps();
    int64_t i = 0;
    for (; i + 16 <= d; i += 16) {
        const __m256 b0 = _mm256_loadu_ps(b + i), b1 = _mm256_loadu_ps(b + i + 8);
        for (int r = 0; r < 4; r++) {
            acc[r][0] = _mm256_fmadd_ps(_mm256_loadu_ps(a + r * d + i), b0, acc[r][0]);
            acc[r][1] = _mm256_fmadd_ps(_mm256_loadu_ps(a + r * d + i + 8), b1, acc[r][1]);
        }
    }
    for (; i + 8 <= d; i += 8) {
        const __m256 b0 = _mm256_loadu_ps(b + i);
        for (int r = 0; r < 4; r++) acc[r][0] = _mm256_fmadd_ps(_mm256_loadu_ps(a + r * d + i), b0, acc[r][0]);
    }
    for (int r = 0; r < 4; r++) {
        float total = fold(acc[r][0], acc[r][1]);
        for (int64_t t = i; t < d; t++) total = fmaf(a[r * d + t], b[t], total);
        s[r] = total;
    }
}

/* s[r] = a_r . b for `rows` rows of a (row stride d): four at a time, the rest one by one (the same
 * operations per row either way). */
static void dots(const float *a, int64_t rows, const float *b, int64_t d, float *s) {
    int64_t r = 0;
    for (; r + 4 <= rows; r += 4) dots4(a + r * d, b, d, s + r);
    for (; r < rows; r++) s[r] = dot(a + r * d, b, d);
}

/* out_r (d, row stride d) += p[r] * v (d) for `rows` rows, v loaded once for all of them; per value
 * one FMA, as a row alone would do it. */
static void axpys(const float *p, const float *v, float *out, int64_t rows, int64_t d) {
    int64_t i = 0;
    for (; i + 8 <= d; i += 8) {
        const __m256 vv = _mm256_loadu_ps(v + i);
        for (int64_t r = 0; r < rows; r++) {
            float *o = out + r * d + i;
            _mm256_storeu_ps(o, _mm256_fmadd_ps(_mm256_set1_ps(p[r]), vv, _mm256_loadu_ps(o)));
        }
    }
    for (; i < d; i++)
        for (int64_t r = 0; r < rows; r++) out[r * d + i] = fmaf(p[r], v[i], out[r * d + i]);
}

/* e^x for 8 lanes, x <= 0 (scores minus their maximum): Cody-Waite reduction x = n ln2 + r, |r| <=
 * ln2 / 2, then e^r = 1 + r + r^2 P(r) with P a degree-5 polynomial (the classic single-precision
 * minimax coefficients; within 2 ulp of e^x), times 2^n through the exponent bits. x below -87.3
 * (e^x under FLT_MIN) clamps there: a weight under 1e-38 next to the maximum's weight of 1. One call
 * replaces eight libm expf calls, which were most of a small head's attention (head_dim 16: the
 * overhead bench's decode attention measured ~0.9 ms a layer at 256 rows, nearly all expf). */
static inline __m256 exp_nonpositive(__m256 x) {
    x = _mm256_max_ps(x, _mm256_set1_ps(-87.33654f));
    const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                     _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);  /* ln2's high part: exact product */
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);       /* and its low part */
    __m256 poly = _mm256_set1_ps(1.9875691500e-4f);
    poly = _mm256_fmadd_ps(poly, r, _mm256_set1_ps(1.3981999507e-3f));
    poly = _mm256_fmadd_ps(poly, r, _mm256_set1_ps(8.3334519073e-3f));
    poly = _mm256_fmadd_ps(poly, r, _mm256_set1_ps(4.1665795894e-2f));
    poly = _mm256_fmadd_ps(poly, r, _mm256_set1_ps(1.6666665459e-1f));
    poly = _mm256_fmadd_ps(poly, r, _mm256_set1_ps(5.0000001201e-1f));
    const __m256 e_r = _mm256_add_ps(_mm256_fmadd_ps(poly, _mm256_mul_ps(r, r), r), _mm256_set1_ps(1.0f));
    const __m256i two_n = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(e_r, _mm256_castsi256_ps(two_n));
}

typedef struct {
    const float *k_cache, *v_cache; /* (num_pages, block_size, hkv, d) */
    int64_t block_size, hkv, d;
    const int64_t *pages; /* (B, nb) page ids of each sequence's visible blocks, in position order */
    int64_t nb;
    const uint8_t *mask; /* (B, nb * block_size): nonzero where the row may attend the key */
    float scale, softcap;  /* softcap 0: none */
} Cache;

/* KV head h's row at offset 0 of `page` in a cache; the next offset's row is c->hkv * c->d further. */
static inline const float *page_row(const float *cache, const Cache *c, int64_t page, int64_t h) {
    return cache + (page * c->block_size * c->hkv + h) * c->d;
}

/* Ask for KV head h's rows of `page` (block_size rows of d floats, `step` floats apart) ahead of
 * their use: a sequence's pages lie anywhere in a cache of up to gigabytes, so each page is a fresh
 * run of memory the hardware prefetcher cannot guess (the overhead bench's decode attention, pages
 * spread over 200 MB: 1.6 ms a call at 256 rows without, on one thread). */
static inline void prefetch_page(const float *cache, const Cache *c, int64_t page, int64_t h, int64_t step) {
    const char *row = (const char *)page_row(cache, c, page, h);
    for (int64_t offset = 0; offset < c->block_size; offset++, row += step * (int64_t)sizeof(float))
        for (int64_t line = 0; line < c->d * (int64_t)sizeof(float); line += 64) _mm_prefetch(row + line, _MM_HINT_T0);
}

/* Whether block `blk` of a row exists and shows it a key (a row's shown keys are one run: its
 * causal prefix, or its window's part of it, so a block shows one where either end does). */
static inline int block_shown(const Cache *c, const uint8_t *mask, int64_t blk) {
    return blk < c->nb && (mask[blk * c->block_size] || mask[blk * c->block_size + c->block_size - 1]);
}

/* Query heads of one (sequence, KV head) pair handled together, so each key and value row is read
 * once for all of them (Gemma 3 270M: four query heads per KV head). */
#define HEADS_AT_ONCE 8

/* Scores row (keys) of one query head after its scores are in place: p_j = e^(s_j - top) for the
 * keys the mask shows (exactly 0 elsewhere), returning their sum (added in key order). */
static float exponentiate(float *scores, const uint8_t *mask, int64_t keys, float top) {
    const __m256 vtop = _mm256_set1_ps(top);
    int64_t j = 0;
    for (; j + 8 <= keys; j += 8) {
        const __m256i shown = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(mask + j)));
        const __m256 keep = _mm256_castsi256_ps(_mm256_cmpgt_epi32(shown, _mm256_setzero_si256()));
        const __m256 e = exp_nonpositive(_mm256_sub_ps(_mm256_loadu_ps(scores + j), vtop));
        _mm256_storeu_ps(scores + j, _mm256_and_ps(e, keep));  /* masked lanes held garbage: now 0 */
    }
    for (; j < keys; j++) {
        float tail[8] = {0};
        tail[0] = scores[j] - top;
        float e[8];
        _mm256_storeu_ps(e, exp_nonpositive(_mm256_loadu_ps(tail)));
        scores[j] = mask[j] ? e[0] : 0.0f;
    }
    float sum = 0.0f;
    for (j = 0; j < keys; j++) sum += scores[j];  /* masked keys add exact zeros */
    return sum;
}

/* `heads` (<= HEADS_AT_ONCE) query heads q[i] (d each, row stride d) of sequence b over KV head h
 * into out[i] (d each, row stride d); scores: scratch (HEADS_AT_ONCE * nb * block_size). */
static void attend_heads(const Cache *c, int64_t b, int64_t h, const float *q, int64_t heads, float *out,
                         float *scores) {
    const int64_t keys = c->nb * c->block_size, d = c->d;
    const int64_t *pages = c->pages + b * c->nb;
    const uint8_t *mask = c->mask + b * keys;
    float top[HEADS_AT_ONCE], sum[HEADS_AT_ONCE];
    const int64_t step = c->hkv * d;  /* from one offset's row of a page to the next */
    for (int64_t i = 0; i < heads; i++) top[i] = -INFINITY;
    for (int64_t blk = 0, j = 0; blk < c->nb; blk++) {  /* page by page: no division per key */
        if (block_shown(c, mask, blk + 1)) prefetch_page(c->k_cache, c, pages[blk + 1], h, step);
        const float *key = page_row(c->k_cache, c, pages[blk], h);
        for (int64_t offset = 0; offset < c->block_size; offset++, j++, key += step) {
            if (!mask[j]) continue;
            float raw[HEADS_AT_ONCE];
            dots(q, heads, key, d, raw);
            for (int64_t i = 0; i < heads; i++) {
                float s = raw[i] * c->scale;
                if (c->softcap > 0.0f) s = tanhf(s / c->softcap) * c->softcap;
                scores[i * keys + j] = s;
                if (s > top[i]) top[i] = s;
            }
        }
    }
    for (int64_t blk = 0; blk < c->nb; blk++)  /* the first shown values' page, for the pass below */
        if (block_shown(c, mask, blk)) {
            prefetch_page(c->v_cache, c, pages[blk], h, step);
            break;
        }
    for (int64_t i = 0; i < heads; i++) {
        sum[i] = exponentiate(scores + i * keys, mask, keys, top[i]);
        for (int64_t e = 0; e < d; e++) out[i * d + e] = 0.0f;
    }
    for (int64_t blk = 0, j = 0; blk < c->nb; blk++) {
        if (block_shown(c, mask, blk + 1)) prefetch_page(c->v_cache, c, pages[blk + 1], h, step);
        const float *value = page_row(c->v_cache, c, pages[blk], h);
        for (int64_t offset = 0; offset < c->block_size; offset++, j++, value += step) {
            if (!mask[j]) continue;
            float weight[HEADS_AT_ONCE];
            for (int64_t i = 0; i < heads; i++) weight[i] = scores[i * keys + j] / sum[i];
            axpys(weight, value, out, heads, d);
        }
    }
}

/* Task t = (sequence b, KV head h): every query head of b that reads h, from q[rows[b]] (hq, d)
 * into out (B, hq * d), HEADS_AT_ONCE at a time. */
static void attend_task(const Cache *c, int64_t t, const float *q, const int64_t *rows, int64_t q_stride, int64_t hq,
                        float *out, float *scores) {
    const int64_t b = t / c->hkv, h = t % c->hkv, per_kv = hq / c->hkv, d = c->d;
    for (int64_t i = 0; i < per_kv; i += HEADS_AT_ONCE) {
        const int64_t first = h * per_kv + i;
        attend_heads(c, b, h, q + rows[b] * q_stride + first * d, per_kv - i < HEADS_AT_ONCE ? per_kv - i : HEADS_AT_ONCE,
                     out + (b * hq + first) * d, scores);
    }
}

/* out (B, hq * d) = attention of query rows q[rows[b]] (each (hq, d), row stride q_stride floats)
 * over the cache; query head qh reads KV head qh / (hq / hkv). The (sequence, KV head) pairs split
 * over `threads` OpenMP threads (torch's own team) when given more than one. Returns 0, or -1 when
 * the scores' scratch could not be allocated. */
int decode_attention(const float *q, const int64_t *rows, int64_t q_stride, int64_t batch, int64_t hq, int64_t hkv,
                     int64_t d, const float *k_cache, const float *v_cache, int64_t block_size, const int64_t *pages,
                     int64_t nb, const uint8_t *mask, float scale, float softcap, float *out, int64_t threads) {
    const Cache c = {k_cache, v_cache, block_size, hkv, d, pages, nb, mask, scale, softcap};
    const int64_t tasks = batch * hkv, keys = nb * block_size;
    int failed = 0;
    if (threads < 2 || tasks < 2) {
        float *scores = (float *)malloc((size_t)(HEADS_AT_ONCE * keys) * sizeof(float));
        if (scores == NULL) return -1;
        for (int64_t t = 0; t < tasks; t++) attend_task(&c, t, q, rows, q_stride, hq, out, scores);
        free(scores);
        return 0;
    }
#pragma omp parallel num_threads(threads) reduction(| : failed)
    {
        float *scores = (float *)malloc((size_t)(HEADS_AT_ONCE * keys) * sizeof(float));
        /* Taken as threads come free (each task's output is its own: no order to keep), so a
         * thread the OS deschedules delays a few tasks, not its static half. */
#pragma omp for schedule(dynamic, 4)
        for (int64_t t = 0; t < tasks; t++) { /* every thread meets the loop, even one without scratch */
            if (scores == NULL) {
                failed = 1;
                continue;
            }
            attend_task(&c, t, q, rows, q_stride, hq, out, scores);
        }
        free(scores);
    }
    return failed ? -1 : 0;
}
