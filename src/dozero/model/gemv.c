/* A few input rows times an int8 or int4 matrix, for decoding (each row of x computed as if alone):
 *
 *     int8: y[m][n] = scale[n] * sum_k x[m][k] q[n][k]                    (one scale per row)
 *     int4: y[m][n] = sum_k x[m][k] (scale[n][g] u[n][k] + zero[n][g])    (g = k / G; u in [0, 15])
 *
 * Why they exist: decoding one token reads every weight once, so a kernel should run at the speed the
 * memory delivers (~20 GB/s on this project's 2-core Xeon). PyTorch's `_weight_int8pack_mm` and
 * `_weight_int4pack_mm_for_cpu` convert each weight to a float before multiplying and reach ~9 GB/s on
 * weights that are not in cache: the conversions, not the memory, set their pace. Here the CPU's
 * integer dot-product instruction (AVX-512 VNNI `vpdpbusd`: 64 products of an unsigned and a signed
 * byte, summed into 16 int32 lanes, in one instruction) does the work, and the row x is what gets
 * converted, once per call instead of once per weight.
 *
 * x as integers: x[k] ~= sx * xi[k], xi a 16-bit integer (|xi| <= 32767, sx = max|x| / 32767, for int4
 * 15 bits), so the input is rounded to 1/65534 of its largest value; bfloat16, what PyTorch's kernels
 * take, keeps 8 significant bits of each value. xi is split into two bytes for `vpdpbusd`:
 *
 *   int8 (signed weights): xi = 256 * (hu - 128) + lo with hu, lo unsigned in [0, 255], so
 *       sum_k xi q = 256 * (sum_k hu q - 128 * sum_k q) + sum_k lo q;  sum_k q (`rowsum`) is made once.
 *   int4 (unsigned nibbles u): xi = 256 * hi + lo with hi, lo signed, so
 *       sum_k xi u = 256 * sum_k hi u + sum_k lo u.
 *
 * Both: two dot products per 64 weights, four rows at a time sharing each load of the row's bytes. No
 * int32 sum can overflow for rows shorter than 66,000 values.
 *
 * Built on first use by model/native.py (`cc -O3 -march=native -fopenmp`), only on CPUs with AVX-512 VNNI.
 */
#include <immintrin.h>
#include <stdint.h>

#include "gemv.h"

#define ROWS 4 /* rows per step: their accumulators stay in registers, the row's bytes are loaded once */

/* The rows 4 steps ahead are prefetched as a step reads its own: the hardware prefetcher alone left ~10% of
 * the speed on matrices of SmolLM2's size, and int4 read from memory (not from cache) ran 8-18% faster
 * fetching 4 steps ahead than 1 (the int8 kernel, which computes less per byte, the same). */
#define AHEAD (4 * ROWS)
#define PREFETCH(p) _mm_prefetch((const char *)(p), _MM_HINT_T0)

static __mmask16 first16(long n) { return n >= 16 ? 0xFFFF : (__mmask16)((1u << n) - 1); }

static float max_abs(const float *x, long K) {
    __m512 m = _mm512_setzero_ps();
    for (long k = 0; k < K; k += 16) m = _mm512_max_ps(m, _mm512_abs_ps(_mm512_maskz_loadu_ps(first16(K - k), x + k)));
    return _mm512_reduce_max_ps(m);
}

/* 16 values of x times `inv`, rounded to the nearest integer, kept within +-limit */
static __m512i to_integers(const float *x, __mmask16 m, __m512 inv, int limit) {
    __m512i xi = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_maskz_loadu_ps(m, x), inv));
    return _mm512_max_epi32(_mm512_min_epi32(xi, _mm512_set1_epi32(limit)), _mm512_set1_epi32(-limit));
}

/* The rows are split between the threads in steps of ROWS rows; the last N % ROWS rows are steps of one. */
static long step_count(long N) { return N / ROWS + N % ROWS; }
static long step_first_row(long i, long N) { return i < N / ROWS ? i * ROWS : N / ROWS * ROWS + (i - N / ROWS); }
static int step_rows(long i, long N) { return i < N / ROWS ? ROWS : 1; }

/* ---------------------------------------------------------------- int8, one scale per row */

static void int8_rows(const uint8_t *hu, const uint8_t *lo, float sx, const int8_t *q, const int32_t *rowsum,
                      const float *scale, float *y, long n0, int R, long K) {
    __m512i acc_hu[ROWS], acc_lo[ROWS];
    for (int r = 0; r < ROWS; r++) acc_hu[r] = acc_lo[r] = _mm512_setzero_si512();
    for (long k = 0; k < K; k += 64) {
        __mmask64 m = K - k >= 64 ? ~0ULL : (1ULL << (K - k)) - 1; /* the row's last, partial 64 */
        __m512i h = _mm512_maskz_loadu_epi8(m, hu + k), l = _mm512_maskz_loadu_epi8(m, lo + k);
        for (int r = 0; r < R; r++) {
            __m512i w = _mm512_maskz_loadu_epi8(m, q + (n0 + r) * K + k);
            PREFETCH(q + (n0 + r + AHEAD) * K + k);
            acc_hu[r] = _mm512_dpbusd_epi32(acc_hu[r], h, w);
            acc_lo[r] = _mm512_dpbusd_epi32(acc_lo[r], l, w);
        }
    }
    for (int r = 0; r < R; r++) {
        double high = (double)_mm512_reduce_add_epi32(acc_hu[r]) - 128.0 * rowsum[n0 + r];
        double dot = 256.0 * high + (double)_mm512_reduce_add_epi32(acc_lo[r]);
        y[n0 + r] = (float)(dot * sx) * scale[n0 + r];
    }
}

/* rowsum[n] = sum_k q[n][k], once per matrix (in PyTorch, sum(dtype=int32) first copies q to int32) */
void int8_row_sums(const int8_t *q, long N, long K, int32_t *rowsum) {
    __m512i ones = _mm512_set1_epi8(1);
    for (long n = 0; n < N; n++) {
        __m512i acc = _mm512_setzero_si512();
        for (long k = 0; k < K; k += 64) {
            __mmask64 m = K - k >= 64 ? ~0ULL : (1ULL << (K - k)) - 1;
            acc = _mm512_dpbusd_epi32(acc, ones, _mm512_maskz_loadu_epi8(m, q + n * K + k));
        }
        rowsum[n] = _mm512_reduce_add_epi32(acc);
    }
}

/* one row x -> hu, lo; returns sx */
static float split_int8(const float *x, long K, uint8_t *hu, uint8_t *lo) {
    float top = max_abs(x, K);
    __m512 inv = _mm512_set1_ps(top > 0.0f ? 32767.0f / top : 0.0f);
    for (long k = 0; k < K; k += 16) {
        __mmask16 m = first16(K - k);
        __m512i xi = to_integers(x + k, m, inv, 32767);
        __m512i low = _mm512_and_si512(xi, _mm512_set1_epi32(255));
        __m512i high = _mm512_add_epi32(_mm512_srai_epi32(xi, 8), _mm512_set1_epi32(128)); /* (xi - low) / 256 */
        _mm512_mask_cvtepi32_storeu_epi8(lo + k, m, low);
        _mm512_mask_cvtepi32_storeu_epi8(hu + k, m, high);
    }
    return top / 32767.0f;
}

/* ---------------------------------------------------------------- int4, groups of G inputs */

/* A packed byte holds two columns, the even one in its low nibble. The row is read 64 bytes (128 columns)
 * at a time: its low nibbles are the even columns 0, 2, ..., 126, its high nibbles the odd ones, so the
 * row x is stored in that order too, per chunk of 128: 64 even values, then 64 odd ones (each as its two
 * bytes hi and lo: 4 x 64 bytes). Lane i of a dot product then sums columns 8i ... 8i + 7 of the chunk,
 * which belong to group 8i / G. A row ending in part of a chunk (K = 576: half) reads what is left.
 *
 * Without zero points (dozero's own int4: w = scale (u - 8)), 64 more bytes per chunk hold -8 times each
 * lane's sum of x, added to the lane's integer sum: sum x (u - 8) exactly, before the group's scale. With
 * them (GGUF Q4_1: w = scale u + min), sum_g min[g] (sum of x over g) is added at the row's end. */
#define CHUNK 128

/* 16 int32 -> signed bytes hi, lo with xi = 256 * hi + lo (|xi| <= 16383: hi in [-64, 64]) */
static void store_split(__m512i xi, int8_t *hi, int8_t *lo) {
    __m512i low = _mm512_and_si512(_mm512_add_epi32(xi, _mm512_set1_epi32(128)), _mm512_set1_epi32(255));
    low = _mm512_sub_epi32(low, _mm512_set1_epi32(128));
    _mm512_mask_cvtepi32_storeu_epi8(lo, 0xFFFF, low);
    _mm512_mask_cvtepi32_storeu_epi8(hi, 0xFFFF, _mm512_srai_epi32(_mm512_sub_epi32(xi, low), 8));
}

/* The scales of a chunk's groups (at most 4: `valid`) -> the scale of each lane's 8 columns */
static __m512 lane_scales(const uint16_t *s, __mmask8 valid, __m512i lane_group) {
    __m128 four = _mm_cvtph_ps(_mm_maskz_loadu_epi16(valid, s));
    return _mm512_permutexvar_ps(lane_group, _mm512_castps128_ps512(four));
}

static void int4_rows(const int8_t *xs, const float *xsum, float sx, const uint8_t *q, const uint16_t *scale,
                      const uint16_t *zero, float *y, long n0, int R, long K, long G) {
    long groups = K / G, chunks = (K + CHUNK - 1) / CHUNK;
    __m512i lane_group = _mm512_set_epi32(120 / G, 112 / G, 104 / G, 96 / G, 88 / G, 80 / G, 72 / G, 64 / G,
                                          56 / G, 48 / G, 40 / G, 32 / G, 24 / G, 16 / G, 8 / G, 0);
    __m512i nibble = _mm512_set1_epi8(0x0F), none = _mm512_setzero_si512();
    __m512 acc[ROWS];
    for (int r = 0; r < ROWS; r++) acc[r] = _mm512_setzero_ps();
    for (long c = 0; c < chunks; c++) {
        const int8_t *x = xs + 5 * 64 * c; /* hi even, lo even, hi odd, lo odd, the -8 offsets */
        __m512i offset = _mm512_loadu_si512(x + 256);
        __m512i he = _mm512_loadu_si512(x), le = _mm512_loadu_si512(x + 64);
        __m512i ho = _mm512_loadu_si512(x + 128), lo = _mm512_loadu_si512(x + 192);
        long bytes = K - c * CHUNK >= CHUNK ? 64 : (K - c * CHUNK) / 2; /* the row's last chunk may be short */
        __mmask64 m = bytes == 64 ? ~0ULL : (1ULL << bytes) - 1;
        long first = c * CHUNK / G, count = G >= CHUNK ? 1 : CHUNK / G; /* the chunk's groups */
        __mmask8 valid = (__mmask8)((1u << (count < groups - first ? count : groups - first)) - 1);
        for (int r = 0; r < R; r++) {
            const uint8_t *row = q + (n0 + r) * (K / 2) + 64 * c;
            __m512i b = _mm512_maskz_loadu_epi8(m, row);
            PREFETCH(row + AHEAD * (K / 2));
            __m512i even = _mm512_and_si512(b, nibble), odd = _mm512_and_si512(_mm512_srli_epi16(b, 4), nibble);
            __m512i high = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(none, even, he), odd, ho);
            __m512i both = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(_mm512_slli_epi32(high, 8), even, le), odd, lo);
            if (!zero) both = _mm512_add_epi32(both, offset);
            __m512 t = _mm512_cvtepi32_ps(both); /* 256 high + low */
            acc[r] = _mm512_fmadd_ps(t, lane_scales(scale + (n0 + r) * groups + first, valid, lane_group), acc[r]);
        }
    }
    for (int r = 0; r < R && !zero; r++) y[n0 + r] = _mm512_reduce_add_ps(acc[r]) * sx;
    for (int r = 0; r < R && zero; r++) { /* + sum_g zero[g] * (sum of x over g) */
        const uint16_t *z = zero + (n0 + r) * groups;
        __m512 zacc = _mm512_setzero_ps();
        for (long g = 0; g < groups; g += 16) {
            __mmask16 mg = first16(groups - g);
            zacc = _mm512_fmadd_ps(_mm512_cvtph_ps(_mm256_maskz_loadu_epi16(mg, z + g)),
                                   _mm512_maskz_loadu_ps(mg, xsum + g), zacc);
        }
        y[n0 + r] = _mm512_reduce_add_ps(_mm512_fmadd_ps(acc[r], _mm512_set1_ps(sx), zacc)); /* one sum, not two */
    }
}

/* one row x -> xs (in `int4_rows`' order) and xsum; returns sx */
static float split_int4(const float *x, long K, long G, int8_t *xs, float *xsum) {
    float top = max_abs(x, K), sx = top / 16383.0f;
    __m512 inv = _mm512_set1_ps(top > 0.0f ? 16383.0f / top : 0.0f);
    __m512i even = _mm512_set_epi32(30, 28, 26, 24, 22, 20, 18, 16, 14, 12, 10, 8, 6, 4, 2, 0);
    __m512i odd = _mm512_add_epi32(even, _mm512_set1_epi32(1));
    for (long g = 0; g < K / G; g++) xsum[g] = 0.0f;
    for (long c = 0; c < K; c += CHUNK) { /* columns c ... c + 127 */
        int8_t *out = xs + 5 * 64 * (c / CHUNK);
        int32_t *offset = (int32_t *)(out + 256), lanes[16 * 8];
        __m512i v[8];
        for (int j = 0; j < 8; j++) { /* the sums of the rounded x: the zero points then cancel its rounding */
            v[j] = c + 16 * j < K ? to_integers(x + c + 16 * j, 0xFFFF, inv, 16383) : _mm512_setzero_si512();
            if (c + 16 * j < K) xsum[(c + 16 * j) / G] += sx * (float)_mm512_reduce_add_epi32(v[j]);
            _mm512_storeu_si512(lanes + 16 * j, v[j]);
        }
        for (int i = 0; i < 16; i++) { /* -8 times each dot-product lane's 8 columns: the zero point of -8 */
            offset[i] = 0;
            for (int k = 0; k < 8; k++) offset[i] -= 8 * lanes[8 * i + k];
        }
        for (int j = 0; j < 4; j++) { /* even columns 32j ... 32j + 30, then the odd ones */
            store_split(_mm512_permutex2var_epi32(v[2 * j], even, v[2 * j + 1]), out + 16 * j, out + 64 + 16 * j);
            store_split(_mm512_permutex2var_epi32(v[2 * j], odd, v[2 * j + 1]), out + 128 + 16 * j, out + 192 + 16 * j);
        }
    }
    return sx;
}

/* ---------------------------------------------------------------- the product

 * Scratch memory: the rows' sx (64 bytes: up to 16 rows), then the rows as integers: int8 two bytes per
 * value (hu, then lo); int4 320 bytes per 128 columns (the last 128 counted whole: xs), then K / G floats
 * (xsum) per row. */
#define HEADER 64

static long int4_stride(long K) { return 5 * 64 * ((K + CHUNK - 1) / CHUNK); }

long gemv_scratch_bytes(const struct matrix *w, long M) {
    return HEADER + (w->group ? M * (int4_stride(w->K) + 4 * (w->K / w->group)) : 2 * M * w->K);
}

/* The team's share of the product: each thread takes its steps of ROWS weight rows, reading them once for
 * every x row (in cache after the first). Apart from gemv_team, so that the row kernel is inlined into a loop
 * of its own (inlined into gemv_team's, with both kinds' arguments live, it ran ~30% slower). */
static void int4_steps(const uint8_t *rows, const float *xsum, const float *sx, long M, long stride, const uint8_t *q,
                       const uint16_t *scale, const uint16_t *zero, float *y, long N, long K, long G) {
#pragma omp for schedule(static)
    for (long i = 0; i < step_count(N); i++)
        for (long j = 0; j < M; j++)
            int4_rows((const int8_t *)rows + j * stride, xsum + j * (K / G), sx[j], q, scale, zero, y + j * N,
                      step_first_row(i, N), step_rows(i, N), K, G);
}

static void int8_steps(const uint8_t *rows, const float *sx, long M, const int8_t *q, const int32_t *rowsum,
                       const float *scale, float *y, long N, long K) {
#pragma omp for schedule(static)
    for (long i = 0; i < step_count(N); i++)
        for (long j = 0; j < M; j++)
            int8_rows(rows + j * K, rows + (M + j) * K, sx[j], q, rowsum, scale, y + j * N, step_first_row(i, N),
                      step_rows(i, N), K);
}

/* One thread splits the rows into integers; then the team shares the product, each x row computed as if
 * alone. */
void gemv_team(const struct matrix *w, const float *x, long M, float *y, void *scratch) {
    long N = w->N, K = w->K, G = w->group, stride = int4_stride(K), groups = G ? K / G : 0;
    float *sx = scratch;
    uint8_t *rows = (uint8_t *)scratch + HEADER;
    float *xsum = (float *)(rows + M * stride);
#pragma omp single
    for (long j = 0; j < M; j++)
        sx[j] = G ? split_int4(x + j * K, K, G, (int8_t *)rows + j * stride, xsum + j * groups)
                  : split_int8(x + j * K, K, rows + j * K, rows + (M + j) * K);
    if (G)
        int4_steps(rows, xsum, sx, M, stride, w->q, w->scale, w->extra, y, N, K, G);
    else
        int8_steps(rows, sx, M, w->q, w->extra, w->scale, y, N, K);
}

/* x (M, K) float -> y (M, N) float: q int8 (N, K) with a float scale per row (the int32 row sums in `extra`,
 * from int8_row_sums), or int4 (N, K / 2) nibbles, u = q + 8, scale and zero (N, K / G) float16 (zero NULL:
 * -8 scale), K a multiple of 32, G 32 or a multiple of 64. M <= 16; scratch: gemv_scratch_bytes. */
void gemv(const struct matrix *w, const float *x, long M, float *y, void *scratch, int threads) {
#pragma omp parallel num_threads(threads)
    gemv_team(w, x, M, y, scratch);
}
