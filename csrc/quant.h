/* quant.h - ggml tensor type table and dequantization to float32.
 *
 * Block layouts follow ggml (little-endian, packed, no padding). Every dequantizer takes
 *   x: nb blocks of type_size bytes, y: nb * block_size floats (output),
 * and reproduces gguf-py's numpy dequantization bit for bit (same float32 operations, same order). */
#ifndef FACTRACE_QUANT_H
#define FACTRACE_QUANT_H

#include <stdint.h>

#define QUANT_MAX_TYPE 64

typedef struct {
    const char *name;    /* ggml name, e.g. "Q4_K"; NULL for ids that ggml does not define */
    int64_t block_size;  /* elements per block */
    int64_t type_size;   /* bytes per block */
    int can_dequant;     /* 1 if quant_dequantize supports it */
} quant_type_info;

/* Info for a ggml type id, or NULL when the id is unknown. */
const quant_type_info *quant_type(uint32_t type);

/* Name of a type id ("F32", "Q4_K", ...), or NULL when the id is unknown. */
const char *quant_type_name(uint32_t type);

/* IEEE half / bfloat16 bits -> float32 (exact; NaN payloads are kept, like numpy). */
float quant_fp16_to_fp32(uint16_t h);
float quant_bf16_to_fp32(uint16_t h);

/* Dequantize n_elements values of `type` from src (n_elements / block_size * type_size bytes) into
 * dst (n_elements floats). n_elements must be a multiple of the block size; the caller checks sizes.
 * Returns 0 on success, -1 if the type is unknown or has no dequantizer. Touches no global state and
 * is safe to call without the GIL. */
int quant_dequantize(uint32_t type, const uint8_t *src, float *dst, int64_t n_elements);

#endif
