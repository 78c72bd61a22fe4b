/* Rotary position embedding in one call (x86-64, AVX2, fp32): y = x * cos + swap(x) * signed_sin,
 * swap(x) = (x2, x1) for x = (x1, x2) along head_dim, signed_sin = (-sin1, sin2) (layers.rope_cos_sin's
 * tables). The torch form is four ops (roll, two multiplies, an add) for each of q and k per layer,
 * about 0.7 ms a token of single-stream decode for Gemma 3 270M in dispatch alone.
 *
 * The same three roundings as the torch form, in the same order (each product rounded, then their
 * sum): fp-contract is off below, so no product is fused into an FMA and the result is bitwise the
 * torch form's.
 *
 * `attention_prologue` runs everything between a step's fused QKV projection and its
 * attention in one call: the q/k norms (norm_row.h, as rms_norm.c rounds them), RoPE on q and k, and
 * the new keys' and values' stores into the paged cache. Per layer that is one call instead of
 * seven ops (a split, two norms, two rotations, two cache copies), each value rounded as before.
 *
 * Built by gemma_dist/model/native/__init__.py (-O3 -mavx2 -mfma -fopenmp); called through ctypes.
 */
#pragma GCC optimize("fp-contract=off")
#include <immintrin.h>
#include <stdint.h>
#include <string.h>

#include "norm_row.h"

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

/* The widest head the prologue's per-row scratch holds (Gemma's largest head_dim is 256). */
#define PROLOGUE_MAX_HEAD_DIM 1024

/* Token r's heads: from its qkv row (hq query heads, then hkv key heads, then hkv value heads, each d
 * values), q_out's row r (hq, d) = rope(norm(q)), and the cache slot's keys = rope(norm(k)),
 * values = v (norm skipped where its scale is NULL). */
static void prologue_token(const float *qkv_row, int64_t hq, int64_t hkv, int64_t d, const float *q_scale,
                           const float *k_scale, float eps, const float *cos, const float *ssin, float *q_out,
                           float *k_slot, float *v_slot) {
    float normed[PROLOGUE_MAX_HEAD_DIM];
    for (int64_t h = 0; h < hq + hkv; h++) {
        const float *head = qkv_row + h * d, *scale = h < hq ? q_scale : k_scale;
        float *out = h < hq ? q_out + h * d : k_slot + (h - hq) * d;
        if (scale != NULL) {
            norm_row(head, d, scale, eps, normed);
            head = normed;
        }
        rotate(head, cos, ssin, d, out);
    }
    memcpy(v_slot, qkv_row + (hq + hkv) * d, (size_t)(hkv * d) * sizeof(float));
}

/* For T tokens, qkv (T, row_stride) rows as above; cos, ssin (T, d); q_out (T, hq, d); the caches
 * (num_slots, hkv, d) (pages x block_size flattened), token t's keys and values going to slot
 * slots[t]. The tokens split over `threads` OpenMP threads when given more than one. Returns 0, or -1
 * (nothing written) when a slot is outside the cache or d is wider than the scratch. */
int attention_prologue(const float *qkv, int64_t t, int64_t row_stride, int64_t hq, int64_t hkv, int64_t d,
                       const float *q_scale, const float *k_scale, float eps, const float *cos, const float *ssin,
                       float *q_out, float *k_cache, float *v_cache, const int64_t *slots, int64_t num_slots,
                       int64_t threads) {
    if (d > PROLOGUE_MAX_HEAD_DIM) return -1;
    for (int64_t r = 0; r < t; r++)
        if (slots[r] < 0 || slots[r] >= num_slots) return -1;
    const int64_t per_slot = hkv * d;
    if (threads < 2 || t < 2) {  /* no parallel region at all (see rms_norm.c) */
        for (int64_t r = 0; r < t; r++)
            prologue_token(qkv + r * row_stride, hq, hkv, d, q_scale, k_scale, eps, cos + r * d, ssin + r * d,
                           q_out + r * hq * d, k_cache + slots[r] * per_slot, v_cache + slots[r] * per_slot);
        return 0;
    }
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t r = 0; r < t; r++)
        prologue_token(qkv + r * row_stride, hq, hkv, d, q_scale, k_scale, eps, cos + r * d, ssin + r * d,
                       q_out + r * hq * d, k_cache + slots[r] * per_slot, v_cache + slots[r] * per_slot);
    return 0;
}
