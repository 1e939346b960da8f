/* Storage formats to float32. Both conversions are exact (every f16 and bf16 value is a float32). */
#include <string.h>

#include "factrace.h"

/* in (n,) IEEE half -> out (n,) float */
void f16_to_f32(const uint16_t *in, float *out, int64_t n) {
    for (int64_t i = 0; i < n; i++) {
        uint32_t h = in[i], sign = (h & 0x8000u) << 16, exp = (h >> 10) & 0x1f, man = h & 0x3ffu, bits;
        if (exp == 0) {
            if (man == 0) bits = sign;
            else { /* subnormal: normalise */
                int e = -1;
                do { e++; man <<= 1; } while (!(man & 0x400u));
                bits = sign | ((uint32_t)(127 - 15 - e) << 23) | ((man & 0x3ffu) << 13);
            }
        } else if (exp == 31) {
            bits = sign | 0x7f800000u | (man << 13);
        } else {
            bits = sign | ((exp + 112u) << 23) | (man << 13);
        }
        memcpy(&out[i], &bits, 4);
    }
}

/* in (n,) bfloat16 -> out (n,) float: the upper 16 bits of a float32 */
void bf16_to_f32(const uint16_t *in, float *out, int64_t n) {
    for (int64_t i = 0; i < n; i++) {
        uint32_t bits = (uint32_t)in[i] << 16;
        memcpy(&out[i], &bits, 4);
    }
}
