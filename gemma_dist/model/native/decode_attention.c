/* Attention of decode rows (one new token per sequence) over the paged KV cache, in place
 * (x86-64, AVX2 + FMA, fp32). The torch form gathers every sequence's key and value pages into new
 * tensors, then runs two batched products, a scale, a mask fill and a softmax: about a dozen ops a
 * layer, which at batch 1 cost more in dispatch than in arithmetic, and at batch 32 copy the whole
 * context twice. Here one call reads each key and value where the cache holds it.
 *
 * Per sequence b and KV head h, for each of its `per_kv` query heads: s_j = (q . k_j) * scale
 * (softcapped: cap * tanh(s_j / cap)) over the keys the row's mask shows, p_j = exp(s_j - max) / sum,
 * out = sum_j p_j v_j, in key order. Each output is one fixed sequence of operations whatever else
 * is in the call or how many threads run (batch-invariant); the dot products and sums are not in
 * the torch form's order, so results differ from it in the last bits.
 *
 * Built by gemma_dist/model/native/__init__.py (-O3 -mavx2 -mfma -fopenmp); called through ctypes.
 */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>

static inline float dot(const float *a, const float *b, int64_t d) {
    __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
    int64_t i = 0;
    for (; i + 16 <= d; i += 16) {
        acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc0);
        acc1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 8), _mm256_loadu_ps(b + i + 8), acc1);
    }
    for (; i + 8 <= d; i += 8) acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc0);
    const __m256 both = _mm256_add_ps(acc0, acc1);
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(both), _mm256_extractf128_ps(both, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    float total = _mm_cvtss_f32(s);
    for (; i < d; i++) total += a[i] * b[i];
    return total;
}

/* out (d) += p * v (d). */
static inline void axpy(float p, const float *v, float *out, int64_t d) {
    const __m256 vp = _mm256_set1_ps(p);
    int64_t i = 0;
    for (; i + 8 <= d; i += 8) _mm256_storeu_ps(out + i, _mm256_fmadd_ps(vp, _mm256_loadu_ps(v + i), _mm256_loadu_ps(out + i)));
    for (; i < d; i++) out[i] += p * v[i];
}

typedef struct {
    const float *k_cache, *v_cache; /* (num_pages, block_size, hkv, d) */
    int64_t block_size, hkv, d;
    const int64_t *pages; /* (B, nb) page ids of each sequence's visible blocks, in position order */
    int64_t nb;
    const uint8_t *mask; /* (B, nb * block_size): nonzero where the row may attend the key */
    float scale, softcap;  /* softcap 0: none */
} Cache;

static inline const float *slot(const float *cache, const Cache *c, const int64_t *pages, int64_t j, int64_t h) {
    const int64_t page = pages[j / c->block_size], offset = j % c->block_size;
    return cache + ((page * c->block_size + offset) * c->hkv + h) * c->d;
}

/* One query head's row q (d) of sequence b over KV head h into out (d); scores: scratch (nb * block_size). */
static void attend(const Cache *c, int64_t b, int64_t h, const float *q, float *out, float *scores) {
    const int64_t keys = c->nb * c->block_size, d = c->d;
    const int64_t *pages = c->pages + b * c->nb;
    const uint8_t *mask = c->mask + b * keys;
    float top = -INFINITY;
    for (int64_t j = 0; j < keys; j++) {
        if (!mask[j]) continue;
        float s = dot(q, slot(c->k_cache, c, pages, j, h), d) * c->scale;
        if (c->softcap > 0.0f) s = tanhf(s / c->softcap) * c->softcap;
        scores[j] = s;
        if (s > top) top = s;
    }
    float sum = 0.0f;
    for (int64_t j = 0; j < keys; j++) {
        if (!mask[j]) continue;
        scores[j] = expf(scores[j] - top);
        sum += scores[j];
    }
    for (int64_t i = 0; i < d; i++) out[i] = 0.0f;
    for (int64_t j = 0; j < keys; j++) {
        if (mask[j]) axpy(scores[j] / sum, slot(c->v_cache, c, pages, j, h), out, d);
    }
}

/* Task t = (sequence b, KV head h): every query head of b that reads h, from q[rows[b]] (hq, d)
 * into out (B, hq * d). */
static void attend_task(const Cache *c, int64_t t, const float *q, const int64_t *rows, int64_t q_stride, int64_t hq,
                        float *out, float *scores) {
    const int64_t b = t / c->hkv, h = t % c->hkv, per_kv = hq / c->hkv, d = c->d;
    for (int64_t i = 0; i < per_kv; i++)
        attend(c, b, h, q + rows[b] * q_stride + (h * per_kv + i) * d, out + (b * hq + h * per_kv + i) * d, scores);
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
        float *scores = (float *)malloc((size_t)keys * sizeof(float));
        if (scores == NULL) return -1;
        for (int64_t t = 0; t < tasks; t++) attend_task(&c, t, q, rows, q_stride, hq, out, scores);
        free(scores);
        return 0;
    }
#pragma omp parallel num_threads(threads) reduction(| : failed)
    {
        float *scores = (float *)malloc((size_t)keys * sizeof(float));
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
