/* quant.c - dequantization of ggml block formats to float32.
 *
 * Each dequant_* function mirrors gguf-py (gguf/quants.py) operation by operation in float32 so the
 * results are bit-identical: scale products such as d*sc are rounded to float32 first, then d*q - m.
 * No fused multiply-add is allowed (it would skip a rounding step): clang obeys the pragma below; GCC
 * does not contract in ISO mode (-std=c11, as setup.py compiles), and tests/test_gguf_dequant.py checks. */
#if defined(__clang__)
#pragma STDC FP_CONTRACT OFF
#endif

#include "quant.h"

#include <stddef.h>
#include <string.h>

#define QK 32   /* block size of the legacy formats */
#define QK_K 256 /* block size of the k-quants */

static const quant_type_info TYPES[QUANT_MAX_TYPE] = {
    [0] = {"F32", 1, 4, 1},        [1] = {"F16", 1, 2, 1},         [2] = {"Q4_0", 32, 18, 1},
    [3] = {"Q4_1", 32, 20, 1},     [6] = {"Q5_0", 32, 22, 1},      [7] = {"Q5_1", 32, 24, 1},
    [8] = {"Q8_0", 32, 34, 1},     [9] = {"Q8_1", 32, 40, 0},      [10] = {"Q2_K", 256, 84, 1},
    [11] = {"Q3_K", 256, 110, 1},  [12] = {"Q4_K", 256, 144, 1},   [13] = {"Q5_K", 256, 176, 1},
    [14] = {"Q6_K", 256, 210, 1},  [15] = {"Q8_K", 256, 292, 0},   [16] = {"IQ2_XXS", 256, 66, 0},
    [17] = {"IQ2_XS", 256, 74, 0}, [18] = {"IQ3_XXS", 256, 98, 0}, [19] = {"IQ1_S", 256, 50, 0},
    [20] = {"IQ4_NL", 32, 18, 0},  [21] = {"IQ3_S", 256, 110, 0},  [22] = {"IQ2_S", 256, 82, 0},
    [23] = {"IQ4_XS", 256, 136, 0}, [24] = {"I8", 1, 1, 0},        [25] = {"I16", 1, 2, 0},
    [26] = {"I32", 1, 4, 0},       [27] = {"I64", 1, 8, 0},        [28] = {"F64", 1, 8, 0},
    [29] = {"IQ1_M", 256, 56, 0},  [30] = {"BF16", 1, 2, 1},       [34] = {"TQ1_0", 256, 54, 0},
    [35] = {"TQ2_0", 256, 66, 0},  [39] = {"MXFP4", 32, 17, 0},    [40] = {"NVFP4", 64, 36, 0},
    [41] = {"Q1_0", 128, 18, 0},
};

const quant_type_info *quant_type(uint32_t type) {
    if (type >= QUANT_MAX_TYPE || TYPES[type].name == NULL) return NULL;
    return &TYPES[type];
}

const char *quant_type_name(uint32_t type) {
    const quant_type_info *t = quant_type(type);
    return t ? t->name : NULL;
}

static inline uint16_t rd16(const uint8_t *p) { return (uint16_t)(p[0] | (p[1] << 8)); }

static inline uint32_t rd32(const uint8_t *p) {
    return (uint32_t)p[0] | ((uint32_t)p[1] << 8) | ((uint32_t)p[2] << 16) | ((uint32_t)p[3] << 24);
}

static inline float bits_to_f32(uint32_t u) {
    float f;
    memcpy(&f, &u, 4);
    return f;
}

float quant_fp16_to_fp32(uint16_t h) {
    /* move exponent+mantissa into place and rebias; inf/nan get a further rebias, zero/subnormals are
     * renormalised by an exact float subtraction of 2^-14 */
    const uint32_t shifted_exp = 0x7c00u << 13;
    uint32_t o = (uint32_t)(h & 0x7fffu) << 13;
    uint32_t exp = o & shifted_exp;
    o += (uint32_t)(127 - 15) << 23;
    if (exp == shifted_exp) {
        o += (uint32_t)(128 - 16) << 23;
    } else if (exp == 0) {
        o += 1u << 23;
        float f = bits_to_f32(o) - bits_to_f32(113u << 23);
        memcpy(&o, &f, 4);
    }
    return bits_to_f32(o | ((uint32_t)(h & 0x8000u) << 16));
}

float quant_bf16_to_fp32(uint16_t h) { return bits_to_f32((uint32_t)h << 16); }

/* F32: x (n * 4 bytes) -> y (n) */
static void dequant_f32(const uint8_t *restrict x, float *restrict y, int64_t n) { memcpy(y, x, (size_t)n * 4); }

/* F16: x (n * 2 bytes) -> y (n). Same result as quant_fp16_to_fp32, written with selects so it vectorizes. */
static void dequant_f16(const uint8_t *restrict x, float *restrict y, int64_t n) {
    const uint32_t shifted_exp = 0x7c00u << 13;
    const float magic = bits_to_f32(113u << 23);
    for (int64_t i = 0; i < n; i++) {
        uint32_t h = rd16(x + 2 * i);
        uint32_t o = (h & 0x7fffu) << 13;
        uint32_t exp = o & shifted_exp;
        uint32_t normal = o + ((uint32_t)(127 - 15) << 23);
        uint32_t infnan = normal + ((uint32_t)(128 - 16) << 23);
        float sub = bits_to_f32(normal + (1u << 23)) - magic;
        uint32_t subu;
        memcpy(&subu, &sub, 4);
        uint32_t r = exp == shifted_exp ? infnan : (exp == 0 ? subu : normal);
        y[i] = bits_to_f32(r | ((h & 0x8000u) << 16));
    }
}

/* BF16: x (n * 2 bytes) -> y (n) */
static void dequant_bf16(const uint8_t *restrict x, float *restrict y, int64_t n) {
    for (int64_t i = 0; i < n; i++) y[i] = quant_bf16_to_fp32(rd16(x + 2 * i));
}

/* Q4_0 block (18 B): d f16 | qs[16]; y[l] = d * ((qs[l] & 15) - 8), y[l+16] = d * ((qs[l] >> 4) - 8) */
static void dequant_q4_0(const uint8_t *restrict x, float *restrict y, int64_t nb) {
    for (int64_t b = 0; b < nb; b++, x += 18, y += QK) {
        float d = quant_fp16_to_fp32(rd16(x));
        const uint8_t *qs = x + 2;
        for (int l = 0; l < 16; l++) y[l] = d * (float)((int)(qs[l] & 15) - 8);
        for (int l = 0; l < 16; l++) y[l + 16] = d * (float)((int)(qs[l] >> 4) - 8);
    }
}

/* Q4_1 block (20 B): d f16 | m f16 | qs[16]; y = (d * q) + m, q in 0..15 */
static void dequant_q4_1(const uint8_t *restrict x, float *restrict y, int64_t nb) {
    for (int64_t b = 0; b < nb; b++, x += 20, y += QK) {
        float d = quant_fp16_to_fp32(rd16(x));
        float m = quant_fp16_to_fp32(rd16(x + 2));
        const uint8_t *qs = x + 4;
        for (int l = 0; l < 16; l++) {
            float p = d * (float)(qs[l] & 15);
            y[l] = p + m;
        }
        for (int l = 0; l < 16; l++) {
            float p = d * (float)(qs[l] >> 4);
            y[l + 16] = p + m;
        }
    }
}

/* HIGH_BITS[b]: byte i = ((b >> i) & 1) << 4 (little-endian), spreads 8 high bits to 8 bytes */
static const uint64_t HIGH_BITS[256] = {
    0x0000000000000000ull, 0x0000000000000010ull, 0x0000000000001000ull, 0x0000000000001010ull,
    0x0000000000100000ull, 0x0000000000100010ull, 0x0000000000101000ull, 0x0000000000101010ull,
    0x0000000010000000ull, 0x0000000010000010ull, 0x0000000010001000ull, 0x0000000010001010ull,
    0x0000000010100000ull, 0x0000000010100010ull, 0x0000000010101000ull, 0x0000000010101010ull,
    0x0000001000000000ull, 0x0000001000000010ull, 0x0000001000001000ull, 0x0000001000001010ull,
    0x0000001000100000ull, 0x0000001000100010ull, 0x0000001000101000ull, 0x0000001000101010ull,
    0x0000001010000000ull, 0x0000001010000010ull, 0x0000001010001000ull, 0x0000001010001010ull,
    0x0000001010100000ull, 0x0000001010100010ull, 0x0000001010101000ull, 0x0000001010101010ull,
    0x0000100000000000ull, 0x0000100000000010ull, 0x0000100000001000ull, 0x0000100000001010ull,
    0x0000100000100000ull, 0x0000100000100010ull, 0x0000100000101000ull, 0x0000100000101010ull,
    0x0000100010000000ull, 0x0000100010000010ull, 0x0000100010001000ull, 0x0000100010001010ull,
    0x0000100010100000ull, 0x0000100010100010ull, 0x0000100010101000ull, 0x0000100010101010ull,
    0x0000101000000000ull, 0x0000101000000010ull, 0x0000101000001000ull, 0x0000101000001010ull,
    0x0000101000100000ull, 0x0000101000100010ull, 0x0000101000101000ull, 0x0000101000101010ull,
    0x0000101010000000ull, 0x0000101010000010ull, 0x0000101010001000ull, 0x0000101010001010ull,
    0x0000101010100000ull, 0x0000101010100010ull, 0x0000101010101000ull, 0x0000101010101010ull,
    0x0010000000000000ull, 0x0010000000000010ull, 0x0010000000001000ull, 0x0010000000001010ull,
    0x0010000000100000ull, 0x0010000000100010ull, 0x0010000000101000ull, 0x0010000000101010ull,
    0x0010000010000000ull, 0x0010000010000010ull, 0x0010000010001000ull, 0x0010000010001010ull,
    0x0010000010100000ull, 0x0010000010100010ull, 0x0010000010101000ull, 0x0010000010101010ull,
    0x0010001000000000ull, 0x0010001000000010ull, 0x0010001000001000ull, 0x0010001000001010ull,
    0x0010001000100000ull, 0x0010001000100010ull, 0x0010001000101000ull, 0x0010001000101010ull,
    0x0010001010000000ull, 0x0010001010000010ull, 0x0010001010001000ull, 0x0010001010001010ull,
    0x0010001010100000ull, 0x0010001010100010ull, 0x0010001010101000ull, 0x0010001010101010ull,
    0x0010100000000000ull, 0x0010100000000010ull, 0x0010100000001000ull, 0x0010100000001010ull,
    0x0010100000100000ull, 0x0010100000100010ull, 0x0010100000101000ull, 0x0010100000101010ull,
    0x0010100010000000ull, 0x0010100010000010ull, 0x0010100010001000ull, 0x0010100010001010ull,
    0x0010100010100000ull, 0x0010100010100010ull, 0x0010100010101000ull, 0x0010100010101010ull,
    0x0010101000000000ull, 0x0010101000000010ull, 0x0010101000001000ull, 0x0010101000001010ull,
    0x0010101000100000ull, 0x0010101000100010ull, 0x0010101000101000ull, 0x0010101000101010ull,
    0x0010101010000000ull, 0x0010101010000010ull, 0x0010101010001000ull, 0x0010101010001010ull,
    0x0010101010100000ull, 0x0010101010100010ull, 0x0010101010101000ull, 0x0010101010101010ull,
    0x1000000000000000ull, 0x1000000000000010ull, 0x1000000000001000ull, 0x1000000000001010ull,
    0x1000000000100000ull, 0x1000000000100010ull, 0x1000000000101000ull, 0x1000000000101010ull,
    0x1000000010000000ull, 0x1000000010000010ull, 0x1000000010001000ull, 0x1000000010001010ull,
    0x1000000010100000ull, 0x1000000010100010ull, 0x1000000010101000ull, 0x1000000010101010ull,
    0x1000001000000000ull, 0x1000001000000010ull, 0x1000001000001000ull, 0x1000001000001010ull,
    0x1000001000100000ull, 0x1000001000100010ull, 0x1000001000101000ull, 0x1000001000101010ull,
    0x1000001010000000ull, 0x1000001010000010ull, 0x1000001010001000ull, 0x1000001010001010ull,
    0x1000001010100000ull, 0x1000001010100010ull, 0x1000001010101000ull, 0x1000001010101010ull,
    0x1000100000000000ull, 0x1000100000000010ull, 0x1000100000001000ull, 0x1000100000001010ull,
    0x1000100000100000ull, 0x1000100000100010ull, 0x1000100000101000ull, 0x1000100000101010ull,
    0x1000100010000000ull, 0x1000100010000010ull, 0x1000100010001000ull, 0x1000100010001010ull,
    0x1000100010100000ull, 0x1000100010100010ull, 0x1000100010101000ull, 0x1000100010101010ull,
    0x1000101000000000ull, 0x1000101000000010ull, 0x1000101000001000ull, 0x1000101000001010ull,
    0x1000101000100000ull, 0x1000101000100010ull, 0x1000101000101000ull, 0x1000101000101010ull,
    0x1000101010000000ull, 0x1000101010000010ull, 0x1000101010001000ull, 0x1000101010001010ull,
    0x1000101010100000ull, 0x1000101010100010ull, 0x1000101010101000ull, 0x1000101010101010ull,
    0x1010000000000000ull, 0x1010000000000010ull, 0x1010000000001000ull, 0x1010000000001010ull,
    0x1010000000100000ull, 0x1010000000100010ull, 0x1010000000101000ull, 0x1010000000101010ull,
    0x1010000010000000ull, 0x1010000010000010ull, 0x1010000010001000ull, 0x1010000010001010ull,
    0x1010000010100000ull, 0x1010000010100010ull, 0x1010000010101000ull, 0x1010000010101010ull,
    0x1010001000000000ull, 0x1010001000000010ull, 0x1010001000001000ull, 0x1010001000001010ull,
    0x1010001000100000ull, 0x1010001000100010ull, 0x1010001000101000ull, 0x1010001000101010ull,
    0x1010001010000000ull, 0x1010001010000010ull, 0x1010001010001000ull, 0x1010001010001010ull,
    0x1010001010100000ull, 0x1010001010100010ull, 0x1010001010101000ull, 0x1010001010101010ull,
    0x1010100000000000ull, 0x1010100000000010ull, 0x1010100000001000ull, 0x1010100000001010ull,
    0x1010100000100000ull, 0x1010100000100010ull, 0x1010100000101000ull, 0x1010100000101010ull,
    0x1010100010000000ull, 0x1010100010000010ull, 0x1010100010001000ull, 0x1010100010001010ull,
    0x1010100010100000ull, 0x1010100010100010ull, 0x1010100010101000ull, 0x1010100010101010ull,
    0x1010101000000000ull, 0x1010101000000010ull, 0x1010101000001000ull, 0x1010101000001010ull,
    0x1010101000100000ull, 0x1010101000100010ull, 0x1010101000101000ull, 0x1010101000101010ull,
    0x1010101010000000ull, 0x1010101010000010ull, 0x1010101010001000ull, 0x1010101010001010ull,
    0x1010101010100000ull, 0x1010101010100010ull, 0x1010101010101000ull, 0x1010101010101010ull,
};

/* qh (4 bytes, bit i = high bit of element i) -> hb[i] = bit << 4 */
static inline void expand_high_bits(const uint8_t *qh, uint8_t hb[32]) {
    for (int k = 0; k < 4; k++) {
        uint64_t v = HIGH_BITS[qh[k]];
        for (int b = 0; b < 8; b++) hb[k * 8 + b] = (uint8_t)(v >> (8 * b)); /* endian-independent */
    }
}

/* Q5_0 block (22 B): d f16 | qh u32 (bit i = high bit of element i) | qs[16];
 * y[i] = d * ((low4 | high << 4) - 16) */
static void dequant_q5_0(const uint8_t *restrict x, float *restrict y, int64_t nb) {
    for (int64_t b = 0; b < nb; b++, x += 22, y += QK) {
        float d = quant_fp16_to_fp32(rd16(x));
        uint8_t hb[32];
        expand_high_bits(x + 2, hb);
        const uint8_t *qs = x + 6;
        for (int l = 0; l < 16; l++) y[l] = d * (float)(((qs[l] & 15) | hb[l]) - 16);
        for (int l = 0; l < 16; l++) y[l + 16] = d * (float)(((qs[l] >> 4) | hb[l + 16]) - 16);
    }
}

/* Q5_1 block (24 B): d f16 | m f16 | qh u32 | qs[16]; y = (d * q) + m, q in 0..31 */
static void dequant_q5_1(const uint8_t *restrict x, float *restrict y, int64_t nb) {
    for (int64_t b = 0; b < nb; b++, x += 24, y += QK) {
        float d = quant_fp16_to_fp32(rd16(x));
        float m = quant_fp16_to_fp32(rd16(x + 2));
        uint8_t hb[32];
        expand_high_bits(x + 4, hb);
        const uint8_t *qs = x + 8;
        for (int l = 0; l < 16; l++) {
            float p = d * (float)((qs[l] & 15) | hb[l]);
            y[l] = p + m;
        }
        for (int l = 0; l < 16; l++) {
            float p = d * (float)((qs[l] >> 4) | hb[l + 16]);
            y[l + 16] = p + m;
        }
    }
}

/* Q8_0 block (34 B): d f16 | qs int8[32]; y = q * d */
static void dequant_q8_0(const uint8_t *restrict x, float *restrict y, int64_t nb) {
    for (int64_t b = 0; b < nb; b++, x += 34, y += QK) {
        float d = quant_fp16_to_fp32(rd16(x));
        const int8_t *qs = (const int8_t *)(x + 2);
        for (int l = 0; l < QK; l++) y[l] = (float)qs[l] * d;
    }
}

/* Q2_K block (84 B): scales[16] (low 4 bits scale, high 4 bits min) | qs[64] | d f16 | dmin f16.
 * Element i = j*128 + s*32 + l (j<2, s<4, l<32): q = (qs[j*32+l] >> 2s) & 3, group g = i/16,
 * y = (d*sc_g) * q - (dmin*m_g) */
static void dequant_q2_k(const uint8_t *restrict x, float *restrict y, int64_t nb) {
    for (int64_t b = 0; b < nb; b++, x += 84, y += QK_K) {
        const uint8_t *sc = x, *qs = x + 16;
        float d = quant_fp16_to_fp32(rd16(x + 80));
        float dmin = quant_fp16_to_fp32(rd16(x + 82));
        for (int j = 0; j < 2; j++) {
            for (int s = 0; s < 4; s++) {
                for (int h = 0; h < 2; h++) {
                    int g = j * 8 + s * 2 + h;
                    float dl = d * (float)(sc[g] & 15);
                    float ml = dmin * (float)(sc[g] >> 4);
                    float *yy = y + j * 128 + s * 32 + h * 16;
                    const uint8_t *q = qs + j * 32 + h * 16;
                    for (int l = 0; l < 16; l++) {
                        float p = dl * (float)((q[l] >> (2 * s)) & 3);
                        yy[l] = p - ml;
                    }
                }
            }
        }
    }
}

/* Q3_K block (110 B): hmask[32] | qs[64] | scales[12] (16 x 6-bit) | d f16.
 * Element i = j*128 + s*32 + l: low = (qs[j*32+l] >> 2s) & 3, hbit = (hmask[l] >> (j*4+s)) & 1,
 * q = low - (hbit ? 0 : 4), y = (d * (sc_g - 32)) * q with g = i/16 */
static void dequant_q3_k(const uint8_t *restrict x, float *restrict y, int64_t nb) {
    for (int64_t b = 0; b < nb; b++, x += 110, y += QK_K) {
        const uint8_t *hm = x, *qs = x + 32, *sc = x + 96;
        float d = quant_fp16_to_fp32(rd16(x + 108));
        float dl[16];
        for (int i = 0; i < 16; i++) {
            int lo = (sc[i % 8] >> (4 * (i / 8))) & 15;
            int hi = (sc[8 + i % 4] >> (2 * (i / 4))) & 3;
            dl[i] = d * (float)((lo | (hi << 4)) - 32);
        }
        for (int j = 0; j < 2; j++) {
            for (int s = 0; s < 4; s++) {
                int bit = j * 4 + s;
                for (int h = 0; h < 2; h++) {
                    float dg = dl[j * 8 + s * 2 + h];
                    float *yy = y + j * 128 + s * 32 + h * 16;
                    const uint8_t *q = qs + j * 32 + h * 16, *m = hm + h * 16;
                    for (int l = 0; l < 16; l++) {
                        int low = (q[l] >> (2 * s)) & 3;
                        int hb = (m[l] >> bit) & 1;
                        yy[l] = dg * (float)(low - ((hb ^ 1) << 2));
                    }
                }
            }
        }
    }
}

/* 8 x 6-bit scales and mins of Q4_K / Q5_K from 12 packed bytes */
static void get_scale_min_k4(const uint8_t *s, uint8_t sc[8], uint8_t mn[8]) {
    for (int k = 0; k < 4; k++) {
        sc[k] = s[k] & 63;
        mn[k] = s[4 + k] & 63;
        sc[4 + k] = (uint8_t)((s[8 + k] & 15) | ((s[k] >> 2) & 0x30));
        mn[4 + k] = (uint8_t)((s[8 + k] >> 4) | ((s[4 + k] >> 2) & 0x30));
    }
}

/* Q4_K block (144 B): d f16 | dmin f16 | scales[12] | qs[128].
 * Element i = j*64 + s*32 + l (j<4, s<2): q = (qs[j*32+l] >> 4s) & 15, g = j*2+s,
 * y = (d*sc_g) * q - (dmin*m_g) */
static void dequant_q4_k(const uint8_t *restrict x, float *restrict y, int64_t nb) {
    for (int64_t b = 0; b < nb; b++, x += 144, y += QK_K) {
        float d = quant_fp16_to_fp32(rd16(x));
        float dmin = quant_fp16_to_fp32(rd16(x + 2));
        uint8_t sc[8], mn[8];
        get_scale_min_k4(x + 4, sc, mn);
        const uint8_t *qs = x + 16;
        for (int g = 0; g < 8; g++) {
            float dg = d * (float)sc[g];
            float mg = dmin * (float)mn[g];
            const uint8_t *q = qs + (g / 2) * 32;
            int shift = 4 * (g % 2);
            float *yy = y + g * 32;
            for (int l = 0; l < 32; l++) {
                float p = dg * (float)((q[l] >> shift) & 15);
                yy[l] = p - mg;
            }
        }
    }
}

/* Q5_K block (176 B): d f16 | dmin f16 | scales[12] | qh[32] | qs[128].
 * As Q4_K with q |= ((qh[l] >> g) & 1) << 4 */
static void dequant_q5_k(const uint8_t *restrict x, float *restrict y, int64_t nb) {
    for (int64_t b = 0; b < nb; b++, x += 176, y += QK_K) {
        float d = quant_fp16_to_fp32(rd16(x));
        float dmin = quant_fp16_to_fp32(rd16(x + 2));
        uint8_t sc[8], mn[8];
        get_scale_min_k4(x + 4, sc, mn);
        const uint8_t *qh = x + 16, *qs = x + 48;
        for (int g = 0; g < 8; g++) {
            float dg = d * (float)sc[g];
            float mg = dmin * (float)mn[g];
            const uint8_t *q = qs + (g / 2) * 32;
            int shift = 4 * (g % 2);
            float *yy = y + g * 32;
            for (int l = 0; l < 32; l++) {
                int v = ((q[l] >> shift) & 15) | (((qh[l] >> g) & 1) << 4);
                float p = dg * (float)v;
                yy[l] = p - mg;
            }
        }
    }
}

/* Q6_K block (210 B): ql[128] | qh[64] | scales int8[16] | d f16.
 * Element i = j*128 + r (j<2, r<128): low = (ql[j*64 + r%64] >> 4*(r/64)) & 15,
 * high = (qh[j*32 + r%32] >> 2*(r/32)) & 3, q = (low | high << 4) - 32, y = (d * sc[i/16]) * q */
static void dequant_q6_k(const uint8_t *restrict x, float *restrict y, int64_t nb) {
    for (int64_t b = 0; b < nb; b++, x += 210, y += QK_K) {
        const uint8_t *ql = x, *qh = x + 128;
        const int8_t *sc = (const int8_t *)(x + 192);
        float d = quant_fp16_to_fp32(rd16(x + 208));
        float dl[16];
        for (int i = 0; i < 16; i++) dl[i] = d * (float)sc[i];
        for (int j = 0; j < 2; j++) {
            for (int t = 0; t < 4; t++) {
                for (int h = 0; h < 2; h++) {
                    float dg = dl[j * 8 + t * 2 + h];
                    const uint8_t *lo = ql + j * 64 + (t % 2) * 32 + h * 16, *hi = qh + j * 32 + h * 16;
                    float *yy = y + j * 128 + t * 32 + h * 16;
                    for (int l = 0; l < 16; l++) {
                        int low = (lo[l] >> (4 * (t / 2))) & 15;
                        int high = (hi[l] >> (2 * t)) & 3;
                        yy[l] = dg * (float)((low | (high << 4)) - 32);
                    }
                }
            }
        }
    }
}

int quant_dequantize(uint32_t type, const uint8_t *src, float *dst, int64_t n_elements) {
    const quant_type_info *t = quant_type(type);
    if (t == NULL || !t->can_dequant || n_elements < 0 || n_elements % t->block_size != 0) return -1;
    int64_t nb = n_elements / t->block_size;
    switch (type) {
    case 0: dequant_f32(src, dst, nb); break;
    case 1: dequant_f16(src, dst, nb); break;
    case 30: dequant_bf16(src, dst, nb); break;
    case 2: dequant_q4_0(src, dst, nb); break;
    case 3: dequant_q4_1(src, dst, nb); break;
    case 6: dequant_q5_0(src, dst, nb); break;
    case 7: dequant_q5_1(src, dst, nb); break;
    case 8: dequant_q8_0(src, dst, nb); break;
    case 10: dequant_q2_k(src, dst, nb); break;
    case 11: dequant_q3_k(src, dst, nb); break;
    case 12: dequant_q4_k(src, dst, nb); break;
    case 13: dequant_q5_k(src, dst, nb); break;
    case 14: dequant_q6_k(src, dst, nb); break;
    default: return -1;
    }
    return 0;
}
