/* matmul.h - matrix products with weights as stored: F32, F16, BF16 and GGML quantized blocks.
 *
 * Every weight enters a product as exactly the float32 value quant_dequantize (quant.c, bit-identical
 * to gguf-py) gives it; only the summation order differs from a float64 reference.
 *
 * Two regimes, picked per call from the row count N (mat_crossover):
 *   few rows  - each weight row is streamed once: a tile of 4 rows is dequantized into a small per-thread
 *               buffer (F32 rows are used in place) and multiplied against all N rows of x with a
 *               register-blocked SIMD kernel; threads claim small chunks of output features.
 *   many rows - each thread takes a panel of weight rows whose float32 copy fits in L2, unpacks it and
 *               runs single-threaded cblas_sgemm of all N rows against it. OpenBLAS must be set to one
 *               thread (openblas_set_num_threads(1)) while these products run.
 *
 * SIMD variants (AVX-512, AVX2+FMA+F16C, portable C) are resolved once from the CPU, or from the
 * environment variable FACTRACE_ISA ("avx512" | "avx2" | "baseline"); mat_set_isa overrides it. */
#ifndef FACTRACE_MATMUL_H
#define FACTRACE_MATMUL_H
#include <stdint.h>

#include "pool.h"

typedef struct {
    int type;            /* ggml type id: 0 F32, 1 F16, 30 BF16, 2 Q4_0, 3 Q4_1, 6 Q5_0, 7 Q5_1, 8 Q8_0,
                            10 Q2_K, 11 Q3_K, 12 Q4_K, 13 Q5_K, 14 Q6_K */
    int64_t n_out, n_in; /* logical shape (out_features, in_features), like torch nn.Linear */
    const uint8_t *data; /* n_out rows, each row_bytes long (GGML layout: a row is n_in/block_size blocks) */
    int64_t row_bytes;
} Mat;

enum { MAT_AUTO = 0, MAT_FEW = 1, MAT_MANY = 2 }; /* regimes (mat_mul_path / mat_mul_t_path) */

/* out (N, n_out) = x (N, n_in) @ W^T (+ bias (n_out,) when not NULL). pool NULL = serial.
 * Returns 0, -1 on OOM or an unsupported W. */
int mat_mul(Pool *pool, float *out, const float *x, int64_t N, const Mat *W, const float *bias);
/* out (N, n_in) = g (N, n_out) @ W   (the product a backward pass needs: gradient w.r.t. the input) */
int mat_mul_t(Pool *pool, float *out, const float *g, int64_t N, const Mat *W);
/* the same with the regime forced (MAT_FEW / MAT_MANY) or picked (MAT_AUTO) */
int mat_mul_path(Pool *pool, float *out, const float *x, int64_t N, const Mat *W, const float *bias, int path);
int mat_mul_t_path(Pool *pool, float *out, const float *g, int64_t N, const Mat *W, int path);

/* rows r0..r1-1 of W as float32 (r1-r0, n_in), bit-identical to quant_dequantize */
void mat_rows_f32(const Mat *W, int64_t r0, int64_t r1, float *out);
/* bytes of one row of n_in values; -1 if n_in is not a multiple of the block size / type unsupported */
int mat_row_bytes(int type, int64_t n_in, int64_t *row_bytes);
/* smallest N that takes the many-rows regime for this type (measured, see matmul.c) */
int64_t mat_crossover(int type, int transposed);

/* SIMD variant in use: "avx512", "avx2" or "baseline". mat_set_isa(name) switches to another one the
 * CPU supports (a test hook); returns -1 (and changes nothing) when it is unknown or unsupported. */
const char *mat_isa(void);
int mat_set_isa(const char *name);
int mat_isa_supported(const char *name);
#endif
