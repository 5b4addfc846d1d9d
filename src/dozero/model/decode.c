/* One decoded token through every block of a quantized model, for one sequence, in one call.
 *
 * Why it exists: a one-token step of a deep, narrow model is many small operations. SmolLM2-135M (30 blocks
 * of width 576) makes ~500 tensor calls a token even when planned (generate/layout.py's `OneTokenStep`),
 * and each costs Python, the dispatcher and a wake-up of the threads, several microseconds: with its
 * weights in 4 bits, reading them takes ~4.5 ms a token and the calls took ~3 more. Here a block is the
 * same arithmetic as `OneTokenStep`'s, written out for one row, in one OpenMP team that lives for the whole
 * token: the products (gemv.c) split their weight rows between the threads, attention its query heads,
 * the feed-forward its hidden units; the rest (norms, RoPE, the residual adds) is a few thousand numbers,
 * done by one thread while the others wait at the next barrier.
 *
 * Per block, as in model/gpt.py (legend there; T = 1, g = nh / nkv query heads per key/value head):
 *
 *     h = norm1(x);  q, k, v = h Wqkv + b;  q, k = RoPE(q, k);  cache[slot] = k, v
 *     y = softmax(q K^T / sqrt(hs) + mask) V          (query head i reads key/value head i / g)
 *     x += y Wout + b;  h = norm2(x)
 *     x += act(h Wfc + b) Wproj + b       (SwiGLU: silu(gate) * up, gate and up the two halves of Wfc)
 *
 * Built with gemv.c by model/native.py; called by generate/layout.py.
 */
#include <immintrin.h>
#include <math.h>

#include "gemv.h"

enum { SWIGLU = 0, GELU_TANH = 1, GELU_ERF = 2 };

struct block { /* model/native.py's `Block`: the same fields, in the same order */
    struct matrix qkv, out, fc, proj;
    const float *bias[4];                         /* of qkv, out, fc, proj: (N) or NULL */
    const float *norm1, *shift1, *norm2, *shift2; /* scales (C); shifts (C): LayerNorm, NULL: RMSNorm */
    float eps1, eps2;
    float *cache; /* (2 nkv, S, hs): the block's keys, then its values; slot s of key head j at (j S + s) hs */
};

struct shape { /* model/native.py's `Shape` */
    long C, nh, nkv, hs, hidden, S; /* width, query heads, key/value heads, head size, feed-forward width, slots */
    long activation;                /* SWIGLU, GELU_TANH or GELU_ERF */
};

/* The token's buffers, in `work`: h (C), heads ((nh + 2 nkv) hs), y (nh hs), t (C), ff (2 hidden), act
 * (hidden), scores (nh S), then the products' scratch memory. */
struct buffers {
    float *h, *heads, *y, *t, *ff, *act, *scores;
    void *scratch;
};

static long buffer_floats(const struct shape *s) {
    long floats = 2 * s->C + (2 * s->nh + 2 * s->nkv) * s->hs + 3 * s->hidden + s->nh * s->S;
    return (floats + 15) / 16 * 16; /* the scratch memory after them 64-byte aligned */
}

static struct buffers buffers_of(const struct shape *s, float *work) {
    struct buffers b;
    b.h = work;
    b.heads = b.h + s->C;
    b.y = b.heads + (s->nh + 2 * s->nkv) * s->hs;
    b.t = b.y + s->nh * s->hs;
    b.ff = b.t + s->C;
    b.act = b.ff + 2 * s->hidden;
    b.scores = b.act + s->hidden;
    b.scratch = work + buffer_floats(s);
    return b;
}

/* Bytes of `work` decode_blocks needs. */
long decode_work_bytes(const struct block *blocks, long layers, const struct shape *s) {
    long scratch = 0;
    for (long l = 0; l < layers; l++) {
        const struct matrix *m[4] = {&blocks[l].qkv, &blocks[l].out, &blocks[l].fc, &blocks[l].proj};
        for (int i = 0; i < 4; i++) scratch = gemv_scratch_bytes(m[i], 1) > scratch ? gemv_scratch_bytes(m[i], 1) : scratch;
    }
    return 4 * buffer_floats(s) + scratch;
}

/* LayerNorm (shift given) or RMSNorm of one row: the mean and variance (or mean square) over its C values */
static void norm(const float *x, long C, const float *scale, const float *shift, float eps, float *h) {
    float mean = 0.0f, var = 0.0f;
    if (shift) {
#pragma omp simd reduction(+ : mean)
        for (long i = 0; i < C; i++) mean += x[i];
        mean /= C;
    }
#pragma omp simd reduction(+ : var)
    for (long i = 0; i < C; i++) var += (x[i] - mean) * (x[i] - mean);
    float inv = 1.0f / sqrtf(var / C + eps);
    for (long i = 0; i < C; i++) h[i] = (x[i] - mean) * inv * scale[i] + (shift ? shift[i] : 0.0f);
}

/* e^x for 16 floats: 2^n e^f with n = round(x / ln 2) and |f| <= ln(2) / 2, e^f by its Taylor series to
 * degree 7 (what it leaves, f^8 / 8!, is below 5e-9 of it). Softmax, SiLU and tanh call exp thousands of
 * times a token; glibc's expf, one value per call, took ~0.4 ms of SmolLM2's ~5 ms step. */
static __m512 exp16(__m512 x) {
    x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-104.0f)), _mm512_set1_ps(88.5f)); /* e^-104 rounds to 0 */
    __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504f)), _MM_FROUND_TO_NEAREST_INT);
    __m512 f = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145752f), x);  /* x - n ln 2, ln 2 in two parts */
    f = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.42860677e-6f), f);
    __m512 p = _mm512_set1_ps(1.0f / 5040);
    static const float taylor[] = {1.0f / 720, 1.0f / 120, 1.0f / 24, 1.0f / 6, 0.5f, 1.0f, 1.0f};
    for (int i = 0; i < 7; i++) p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(taylor[i]));
    return _mm512_scalef_ps(p, n);
}

static __mmask16 first16(long n) { return n >= 16 ? 0xFFFF : (__mmask16)((1u << n) - 1); }

static void add_bias(float *y, const float *bias, long n) {
    if (bias)
        for (long i = 0; i < n; i++) y[i] += bias[i];
}

/* RoPE on the query and key heads (x cos + rotate_half(x) sin, rotate_half's signs already in `sin`, as
 * in generate/layout.py), then this token's keys and values into the cache at `slot`. */
static void rotate_and_store(const struct shape *s, float *heads, const float *cos, const float *sin, float *cache,
                             long slot) {
    long hs = s->hs, half = hs / 2;
    if (cos)
        for (long i = 0; i < s->nh + s->nkv; i++) {
            float *h = heads + i * hs, r[hs];
            for (long d = 0; d < hs; d++) r[d] = h[d] * cos[d] + h[(d + half) % hs] * sin[d];
            for (long d = 0; d < hs; d++) h[d] = r[d];
        }
    for (long j = 0; j < 2 * s->nkv; j++) { /* keys, then values: heads nh ... nh + 2 nkv - 1 */
        const float *from = heads + (s->nh + j) * hs;
        float *to = cache + (j * s->S + slot) * hs;
        for (long d = 0; d < hs; d++) to[d] = from[d];
    }
}

/* y (nh hs) = each query head's softmax(q K^T / sqrt(hs) + mask) V over the slots [0, window); the mask
 * is 0 for a slot holding a token, -inf for one not yet filled. The team shares the query heads. */
static void attention(const struct shape *s, const float *heads, const float *cache, const float *mask, long window,
                      float *scores, float *y) {
    long hs = s->hs, S = s->S, group = s->nh / s->nkv;
    float scale = 1.0f / sqrtf((float)hs);
#pragma omp for schedule(static)
    for (long i = 0; i < s->nh; i++) {
        const float *q = heads + i * hs, *keys = cache + i / group * S * hs, *values = cache + (s->nkv + i / group) * S * hs;
        float *p = scores + i * S, *out = y + i * hs, top = -INFINITY, sum = 0.0f;
        for (long t = 0; t < window; t++) {
            float dot = 0.0f;
#pragma omp simd reduction(+ : dot)
            for (long d = 0; d < hs; d++) dot += q[d] * keys[t * hs + d];
            p[t] = dot * scale + mask[t];
            top = p[t] > top ? p[t] : top;
        }
        __m512 sums = _mm512_setzero_ps();
        for (long t = 0; t < window; t += 16) { /* p = e^(p - top), exactly 0 for a masked slot */
            __mmask16 m = first16(window - t);
            __m512 v = _mm512_maskz_loadu_ps(m, p + t);
            __m512 e = _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(v, _mm512_set1_ps(-INFINITY), _CMP_NEQ_OQ) & m,
                                           exp16(_mm512_sub_ps(v, _mm512_set1_ps(top))));
            _mm512_mask_storeu_ps(p + t, m, e);
            sums = _mm512_add_ps(sums, e);
        }
        sum = _mm512_reduce_add_ps(sums);
        for (long d = 0; d < hs; d++) out[d] = 0.0f;
        for (long t = 0; t < window; t++) {
            float w = p[t] / sum;
            if (w != 0.0f)
                for (long d = 0; d < hs; d++) out[d] += w * values[t * hs + d];
        }
    }
}

/* act (hidden) = silu(gate) * up (SwiGLU: ff holds gate, then up) or GELU(ff), biases first. The team
 * shares the hidden units, 16 at a time. */
static void activation(const struct shape *s, const float *ff, const float *bias, float *act) {
    long H = s->hidden;
#pragma omp for schedule(static)
    for (long i = 0; i < H; i += 16) {
        __mmask16 m = first16(H - i);
        __m512 a = _mm512_maskz_loadu_ps(m, ff + i), one = _mm512_set1_ps(1.0f), half = _mm512_set1_ps(0.5f);
        if (bias) a = _mm512_add_ps(a, _mm512_maskz_loadu_ps(m, bias + i));
        if (s->activation == SWIGLU) { /* a sigmoid(a) up */
            __m512 up = _mm512_maskz_loadu_ps(m, ff + H + i);
            if (bias) up = _mm512_add_ps(up, _mm512_maskz_loadu_ps(m, bias + H + i));
            __m512 silu = _mm512_div_ps(a, _mm512_add_ps(one, exp16(_mm512_sub_ps(_mm512_setzero_ps(), a))));
            _mm512_mask_storeu_ps(act + i, m, _mm512_mul_ps(silu, up));
        } else if (s->activation == GELU_TANH) { /* 0.5 a (1 + tanh(z)), tanh(z) = 1 - 2 / (e^2z + 1) */
            __m512 z = _mm512_mul_ps(_mm512_set1_ps(0.7978845608f), /* sqrt(2 / pi) */
                                     _mm512_fmadd_ps(_mm512_mul_ps(_mm512_set1_ps(0.044715f), a), _mm512_mul_ps(a, a), a));
            __m512 e = exp16(_mm512_add_ps(z, z));
            __m512 tanh = _mm512_sub_ps(one, _mm512_div_ps(_mm512_set1_ps(2.0f), _mm512_add_ps(e, one)));
            _mm512_mask_storeu_ps(act + i, m, _mm512_mul_ps(_mm512_mul_ps(half, a), _mm512_add_ps(one, tanh)));
        } else {
            float v[16];
            _mm512_storeu_ps(v, a);
            for (int j = 0; j < 16 && i + j < H; j++) act[i + j] = 0.5f * v[j] * (1.0f + erff(v[j] * 0.70710678f));
        }
    }
}

/* One block, called by every thread of the team; each `single` and `for` ends at a barrier. */
static void block_step(const struct block *b, const struct shape *s, float *x, const float *cos, const float *sin,
                       const float *mask, long window, long slot, const struct buffers *w) {
    long C = s->C;
#pragma omp single
    norm(x, C, b->norm1, b->shift1, b->eps1, w->h);
    gemv_team(&b->qkv, w->h, 1, w->heads, w->scratch);
#pragma omp single
    {
        add_bias(w->heads, b->bias[0], b->qkv.N);
        rotate_and_store(s, w->heads, cos, sin, b->cache, slot);
    }
    attention(s, w->heads, b->cache, mask, window, w->scores, w->y);
    gemv_team(&b->out, w->y, 1, w->t, w->scratch);
#pragma omp single
    {
        add_bias(w->t, b->bias[1], C);
        for (long i = 0; i < C; i++) x[i] += w->t[i];
        norm(x, C, b->norm2, b->shift2, b->eps2, w->h);
    }
    gemv_team(&b->fc, w->h, 1, w->ff, w->scratch);
    activation(s, w->ff, b->bias[2], w->act);
    gemv_team(&b->proj, w->act, 1, w->t, w->scratch);
#pragma omp single
    {
        add_bias(w->t, b->bias[3], C);
        for (long i = 0; i < C; i++) x[i] += w->t[i];
    }
}

/* x (C), the residual stream of the token at cache slot `slot`, through `layers` blocks, in place. cos, sin:
 * RoPE's rows for its position (hs each), NULL without RoPE; mask: (window) additive; work:
 * decode_work_bytes. */
void decode_blocks(const struct block *blocks, long layers, const struct shape *s, float *x, const float *cos,
                   const float *sin, const float *mask, long window, long slot, float *work, int threads) {
    struct buffers w = buffers_of(s, work);
#pragma omp parallel num_threads(threads)
    for (long l = 0; l < layers; l++) block_step(blocks + l, s, x, cos, sin, mask, window, slot, &w);
}
