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
        for (long t = 0; t < window; t++) sum += p[t] = expf(p[t] - top); /* -inf: 0 */
        for (long d = 0; d < hs; d++) out[d] = 0.0f;
        for (long t = 0; t < window; t++) {
            float w = p[t] / sum;
            if (w != 0.0f)
                for (long d = 0; d < hs; d++) out[d] += w * values[t * hs + d];
        }
    }
}

/* act (hidden) = silu(gate) * up (SwiGLU: ff holds gate, then up) or GELU(ff), biases first. The team
 * shares the hidden units. */
static void activation(const struct shape *s, const float *ff, const float *bias, float *act) {
    long H = s->hidden;
#pragma omp for schedule(static)
    for (long i = 0; i < H; i++) {
        float a = ff[i] + (bias ? bias[i] : 0.0f);
        if (s->activation == SWIGLU)
            act[i] = a / (1.0f + expf(-a)) * (ff[H + i] + (bias ? bias[H + i] : 0.0f));
        else if (s->activation == GELU_TANH)
            act[i] = 0.5f * a * (1.0f + tanhf(0.7978845608f * (a + 0.044715f * a * a * a))); /* sqrt(2 / pi) */
        else
            act[i] = 0.5f * a * (1.0f + erff(a * 0.70710678f));
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
