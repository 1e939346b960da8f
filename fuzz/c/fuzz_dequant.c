/* libFuzzer target for the dequantizers alone (csrc/quant.c): input = u8 type id | block bytes.
 * Every whole block of the input is dequantized into an exact-size buffer; ASan/UBSan catch any
 * out-of-bounds access or undefined shift / overflow. */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "quant.h"

static volatile float sink;

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    if (size < 1) return 0;
    uint32_t type = data[0] % QUANT_MAX_TYPE;
    const quant_type_info *qt = quant_type(type);
    if (!qt || !qt->can_dequant) return 0;
    size_t nb = (size - 1) / (size_t)qt->type_size;
    if (nb == 0) return 0;
    size_t bytes = nb * (size_t)qt->type_size;
    uint8_t *src = malloc(bytes);
    memcpy(src, data + 1, bytes);
    int64_t n = (int64_t)nb * qt->block_size;
    float *dst = malloc((size_t)n * sizeof(float));
    if (quant_dequantize(type, src, dst, n) != 0) __builtin_trap();
    float s = 0;
    for (int64_t i = 0; i < n; i++) s += dst[i] == dst[i];
    sink = s;
    free(dst);
    free(src);
    return 0;
}
