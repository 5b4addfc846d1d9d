/* One input row times an int8 matrix, for batch-1 decoding: y[n] = scale[n] * sum_k x[k] * q[n][k].
 *
 * Why it exists: decoding one token reads every weight once, so a kernel should run at the speed the
 * memory delivers (~20 GB/s on this project's 2-core Xeon). PyTorch's `_weight_int8pack_mm` converts
 * each int8 weight to a float before multiplying and reaches ~9 GB/s on weights that are not in cache:
 * the conversions, not the memory, set its pace. Here the CPU's int8 dot-product instruction
 * (AVX-512 VNNI `vpdpbusd`: 64 byte products summed into 16 int32 lanes, one instruction) does the
 * work, and the row x is what gets converted, once per call instead of once per weight.
 *
 * x as integers: x[k] ~= sx * xi[k], xi a 16-bit integer (|xi| <= 32767, sx = max|x| / 32767), so the
 * input is rounded to 1/65534 of its largest value (bfloat16, what `_weight_int8pack_mm` takes, keeps
 * 8 significant bits). `vpdpbusd` multiplies unsigned bytes by signed bytes, so xi is split into two
 * unsigned bytes, xi = 256 * (hu - 128) + lo with hu, lo in [0, 255]:
 *
 *     sum_k xi[k] q[k] = 256 * (sum_k hu[k] q[k] - 128 * sum_k q[k]) + sum_k lo[k] q[k]
 *
 * sum_k q[k] (`rowsum`) is computed once, when the weight is packed. Two dot products per 64 weights,
 * four rows at a time sharing each load of hu and lo. The int32 sums cannot overflow for rows shorter
 * than 66,000 (255 * 127 * K < 2^31).
 *
 * Built on first use by model/native.py (`cc -O3 -march=native -fopenmp`), only on CPUs with AVX-512 VNNI.
 */
#include <immintrin.h>
#include <stdint.h>

#ifndef PF
#define PF 1
#endif
#define ROWS 4 /* rows per step: 8 accumulators, and the loads of hu and lo shared by 4 rows */

/* x -> sx and the bytes hu, lo of xi = round(x / sx), 16 values at a time (the row's last values masked) */
static void split_row(const float *x, long K, uint8_t *hu, uint8_t *lo, float *sx) {
    __m512 amax = _mm512_setzero_ps();
    for (long k = 0; k < K; k += 16) {
        __mmask16 m = K - k >= 16 ? 0xFFFF : (1u << (K - k)) - 1;
        amax = _mm512_max_ps(amax, _mm512_abs_ps(_mm512_maskz_loadu_ps(m, x + k)));
    }
    float top = _mm512_reduce_max_ps(amax);
    *sx = top / 32767.0f;
    __m512 inv = _mm512_set1_ps(top > 0.0f ? 32767.0f / top : 0.0f);
    for (long k = 0; k < K; k += 16) {
        __mmask16 m = K - k >= 16 ? 0xFFFF : (1u << (K - k)) - 1;
        __m512i xi = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_maskz_loadu_ps(m, x + k), inv)); /* to nearest */
        xi = _mm512_max_epi32(_mm512_min_epi32(xi, _mm512_set1_epi32(32767)), _mm512_set1_epi32(-32767));
        __m512i low = _mm512_and_si512(xi, _mm512_set1_epi32(255));
        __m512i high = _mm512_add_epi32(_mm512_srai_epi32(xi, 8), _mm512_set1_epi32(128)); /* (xi - low) / 256 */
        _mm512_mask_cvtepi32_storeu_epi8(lo + k, m, low);
        _mm512_mask_cvtepi32_storeu_epi8(hu + k, m, high);
    }
}

/* rows [n0, n0 + R) of y, R <= ROWS */
static void rows_product(const uint8_t *hu, const uint8_t *lo, float sx, const int8_t *q, const int32_t *rowsum,
                         const float *scale, float *y, long n0, int R, long K) {
    __m512i acc_hu[ROWS], acc_lo[ROWS];
    for (int r = 0; r < ROWS; r++) acc_hu[r] = acc_lo[r] = _mm512_setzero_si512();
    for (long k = 0; k < K; k += 64) {
        __mmask64 m = K - k >= 64 ? ~0ULL : (1ULL << (K - k)) - 1; /* the row's last, partial 64 */
        __m512i h = _mm512_maskz_loadu_epi8(m, hu + k), l = _mm512_maskz_loadu_epi8(m, lo + k);
        for (int r = 0; r < R; r++) {
            __m512i w = _mm512_maskz_loadu_epi8(m, q + (n0 + r) * K + k);
            _mm_prefetch((const char *)(q + (n0 + r + PF * ROWS) * K + k), _MM_HINT_T0);
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

/* x (K) float, q (N, K) int8 row-major, rowsum (N), scale (N) -> y (N); hu, lo: K bytes of scratch each. */
void int8_gemv(const float *x, long K, uint8_t *hu, uint8_t *lo, const int8_t *q, const int32_t *rowsum,
               const float *scale, float *y, long N, int threads) {
    float sx;
    split_row(x, K, hu, lo, &sx);
    long steps = N / ROWS + N % ROWS; /* whole groups of 4 rows, then the last rows one by one */
#pragma omp parallel for num_threads(threads) schedule(static)
    for (long i = 0; i < steps; i++) {
        long whole = N / ROWS;
        long n0 = i < whole ? i * ROWS : whole * ROWS + (i - whole);
        rows_product(hu, lo, sx, q, rowsum, scale, y, n0, i < whole ? ROWS : 1, K);
    }
}
