/* What decode.c takes from gemv.c: one quantized matrix, and its product with one row inside an OpenMP team. */
#include <stdint.h>

/* One int8 or int4 matrix (model/native.py's `Matrix`: the same fields, in the same order). */
struct matrix {
    long N, K;         /* rows (outputs), columns (inputs) */
    long group;        /* int4: columns per scale; 0: int8, one scale per row */
    const void *q;     /* int8 (N, K), or int4 nibbles (N, K / 2), the even column in the low nibble */
    const void *scale; /* int8: float (N); int4: float16 (N, K / group) */
    const void *extra; /* int8: int32 row sums (N); int4: float16 zero points (N, K / group), NULL: -8 scale */
};

/* Bytes of scratch memory a product with M rows writes (the rows as integers). */
long gemv_scratch_bytes(const struct matrix *w, long M);

/* y (M, N) = x (M, K) W^T, called by every thread of an OpenMP team (or outside one: a team of one);
 * scratch is shared by the team. Returns after the whole product is written. */
void gemv_team(const struct matrix *w, const float *x, long M, float *y, void *scratch);
