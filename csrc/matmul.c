/* matmul.c - products with weights as stored (F32, F16, BF16, GGML blocks); see matmul.h.
 *
 * Layout of this file:
 *   1. common helpers
 *   2. the portable baseline of three operations:
 *        dequant   one row, columns k0..k1-1 -> float32 (bit-identical to quant_dequantize)
 *        dot_tile  out (N, nr) = x (N, K) @ w (nr, K)^T (+ bias)        (nr <= 4 rows of W)
 *        axpy_tile out (N, K) += g (N, nr) @ w (nr, K)                   (for mat_mul_t)
 *   3. x86: GGML block decoders (block -> small integers + float32 scales), then the AVX-512 and the
 *      AVX2 variants of the three operations
 *   4. dispatch (resolved once from the CPU; FACTRACE_ISA / mat_set_isa override)
 *   5. drivers: few rows (the tiles above, threads claim chunks of output features) and many rows
 *      (panels of weight rows unpacked to float32 and multiplied by single-threaded cblas_sgemm)
 *
 * Exactness: dequantization is the same float32 operations as quant.c in the same order (d*sc rounded
 * first, then d*q, then +m / -m). (With f16 scales every product d*sc*q of these formats has at most 23
 * significant bits, so it is exact and a contracted FMA could not change a value either; -std=c11, as
 * setup.py compiles, does not contract.) tests/test_matmul_kernels.py checks rows_f32 bit for bit for
 * every variant, and that one-hot rows of x return the dequantized weights bit for bit from every kernel.
 * FMA is used in the dot products (summation rounding only). */
#if defined(__clang__)
#pragma STDC FP_CONTRACT OFF
#endif

#include "matmul.h"

#include <stdlib.h>
#include <string.h>

#include "blas.h"
#include "quant.h"

#if (defined(__x86_64__) || defined(__i386__)) && defined(__GNUC__) && !defined(FACTRACE_NO_SIMD)
#define MATMUL_X86 1
#include <immintrin.h>
#endif

#define INLINE static inline __attribute__((always_inline))
#define TILE_ROWS 4 /* rows of W per tile of the few-rows kernels */

enum { T_F32 = 0, T_F16 = 1, T_BF16 = 30 };
enum { DQ_MUL, DQ_ADD, DQ_SUB }; /* y = dl*q, (dl*q) + ml, (dl*q) - ml */

/* Weight bytes the few-rows kernels ask for (into L2) ahead of use: the next tile's rows, a few cache
 * lines per step, at the pace the current tile is read. The tiles alternate between reading weights and
 * computing; without this the memory idles while they compute. One thread, 768 -> 3072, no prefetch /
 * the next tile in one burst / spread over the steps: F32 N = 16 1.36 / 1.26 / 0.98 ms, N = 1 0.60 /
 * 0.53 / 0.35-0.47 ms; BF16 N = 1 0.44 / 0.26 / 0.27 ms. */
typedef struct {
    const uint8_t *p, *end;
} Ahead;

static int supported(int type) {
    switch (type) {
    case 0: case 1: case 30: case 2: case 3: case 6: case 7: case 8: case 10: case 11: case 12: case 13: case 14:
        return 1;
    default:
        return 0;
    }
}

int mat_row_bytes(int type, int64_t n_in, int64_t *row_bytes) {
    const quant_type_info *t = supported(type) ? quant_type((uint32_t)type) : NULL;
    if (!t || n_in < 0 || n_in % t->block_size) return -1;
    if (n_in / t->block_size > INT64_MAX / t->type_size) return -1;
    *row_bytes = n_in / t->block_size * t->type_size;
    return 0;
}

/* ------------------------------------------------------------------------------------------ */
/* 1. common                                                                                    */

static inline uint16_t rd16(const uint8_t *p) { return (uint16_t)(p[0] | (p[1] << 8)); }
static inline uint32_t rd32(const uint8_t *p) {
    return (uint32_t)p[0] | ((uint32_t)p[1] << 8) | ((uint32_t)p[2] << 16) | ((uint32_t)p[3] << 24);
}

/* quant_fp16_to_fp32, inlined here (one call per block scale) */
INLINE float half_to_float(uint16_t h) {
    const uint32_t shifted_exp = 0x7c00u << 13;
    uint32_t o = (uint32_t)(h & 0x7fffu) << 13, exp = o & shifted_exp, magic = 113u << 23;
    float f, m;
    o += (uint32_t)(127 - 15) << 23;
    if (exp == shifted_exp) {
        o += (uint32_t)(128 - 16) << 23;
    } else if (exp == 0) {
        o += 1u << 23;
        memcpy(&f, &o, 4);
        memcpy(&m, &magic, 4);
        f -= m;
        memcpy(&o, &f, 4);
    }
    o |= (uint32_t)(h & 0x8000u) << 16;
    memcpy(&f, &o, 4);
    return f;
}

/* ------------------------------------------------------------------------------------------ */
/* 2. portable baseline (dequantization: quant.c itself)                                      */

/* one row, values k0..k1-1 (multiples of the block size) -> y (k1-k0) */
static void dequant_base(int type, const uint8_t *row, int64_t k0, int64_t k1, float *y) {
    const quant_type_info *t = quant_type((uint32_t)type);
    quant_dequantize((uint32_t)type, row + k0 / t->block_size * t->type_size, y, k1 - k0);
}

/* out[n*ldo + r] = x[n] . w[r] (+ bias[r]) for n < N, r < nr; x: (N, K) */
static void dot_tile_base(const float *const *w, int nr, const float *x, int64_t N, int64_t K, float *out,
                          int64_t ldo, const float *bias, Ahead *ahead) {
    for (int64_t n = 0; n < N; n++) {
        const float *xn = x + n * K;
        for (int r = 0; r < nr; r++) {
            float s[8] = {0};
            int64_t k = 0;
            for (; k + 8 <= K; k += 8)
                for (int l = 0; l < 8; l++) s[l] += w[r][k + l] * xn[k + l];
            for (; k < K; k++) s[0] += w[r][k] * xn[k];
            float t = ((s[0] + s[1]) + (s[2] + s[3])) + ((s[4] + s[5]) + (s[6] + s[7]));
            out[n * ldo + r] = bias ? t + bias[r] : t;
        }
    }
}

/* out[n*ldo + k] += sum_r g[n*ldg + r] * w[r][k] for n < N, k < K, r < nr */
static void axpy_tile_base(const float *const *w, int nr, const float *g, int64_t ldg, int64_t N, int64_t K,
                           float *out, int64_t ldo) {
    for (int64_t n = 0; n < N; n++) {
        float *o = out + n * ldo;
        for (int r = 0; r < nr; r++) {
            float gr = g[n * ldg + r];
            for (int64_t k = 0; k < K; k++) o[k] += gr * w[r][k];
        }
    }
}

#ifdef MATMUL_X86
#define T512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")))
#define T256 __attribute__((target("avx2,fma,f16c")))

/* ------------------------------------------------------------------------------------------ */
/* 3. x86: block decoders (AVX2 integer ops, shared by both SIMD variants)                     */

/* A GGML block decodes in two parts: block_scales gives the float32 scale dl and offset ml of each group
 * of 16 values (the same float32 operations as quant.c), block_q32 the small integers q of values
 * 32s .. 32s+31; they combine as block_op says (DQ_*). With a constant type (and s) everything folds. */

INLINE T256 __m128i load16(const uint8_t *p) { return _mm_loadu_si128((const __m128i *)p); }
INLINE T256 __m256i load32(const uint8_t *p) { return _mm256_loadu_si256((const __m256i *)p); }
INLINE T256 __m256i bytes(int v) { return _mm256_set1_epi8((char)v); }
/* 32 bytes (b >> s) & m (a 16-bit shift; the mask drops the bits from the neighbour byte) */
INLINE T256 __m256i field(__m256i b, int s, int m) { return _mm256_and_si256(_mm256_srli_epi16(b, s), bytes(m)); }
/* 16 bytes b -> 32 bytes: low nibbles, then high nibbles */
INLINE T256 __m256i nibbles(__m128i b) {
    __m128i lo = _mm_and_si128(b, _mm_set1_epi8(15)), hi = _mm_and_si128(_mm_srli_epi16(b, 4), _mm_set1_epi8(15));
    return _mm256_set_m128i(hi, lo);
}
/* qh u32 -> 32 bytes, byte i = bit i of qh << 4 */
INLINE T256 __m256i high_bits(uint32_t qh) {
    const __m256i spread = _mm256_setr_epi8(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1,
                                            2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3, 3, 3, 3);
    const __m256i bit = _mm256_set1_epi64x(0x8040201008040201ll);
    __m256i v = _mm256_and_si256(_mm256_shuffle_epi8(_mm256_set1_epi32((int)qh), spread), bit);
    return _mm256_and_si256(_mm256_cmpeq_epi8(v, bit), bytes(0x10));
}

/* asks for the next n cache lines of *a (into L2) */
INLINE void ahead_lines(Ahead *a, int n) {
    for (int i = 0; i < n && a->p < a->end; i++, a->p += 64) _mm_prefetch((const char *)a->p, _MM_HINT_T1);
}

/* a block's f16 scale -> float32 with F16C (exact; a signaling NaN comes out quiet, which the products
 * that use it would do anyway, so the dequantized values keep quant.c's bits) */
INLINE T256 float h2f(const uint8_t *p) { return _cvtsh_ss(rd16(p)); }

INLINE int block_size(int type) { return type >= 10 && type <= 14 ? 256 : 32; } /* F16/BF16: groups of 32 */
INLINE int block_bytes(int type) {
    switch (type) {
    case 2: return 18;
    case 3: return 20;
    case 6: return 22;
    case 7: return 24;
    case 8: return 34;
    case 10: return 84;
    case 11: return 110;
    case 12: return 144;
    case 13: return 176;
    case 14: return 210;
    default: return 64; /* 32 F16/BF16 values */
    }
}
/* how q and the scales combine: Q4_1, Q5_1 add an offset, Q2_K, Q4_K, Q5_K subtract one */
INLINE int block_op(int type) {
    if (type == 3 || type == 7) return DQ_ADD;
    if (type == 10 || type == 12 || type == 13) return DQ_SUB;
    return DQ_MUL;
}

INLINE uint32_t ld32(const uint8_t *p) { /* little-endian, like the format (x86 only) */
    uint32_t v;
    memcpy(&v, p, 4);
    return v;
}

/* y[i] = d * (float)b[i], i < 16 (bytes b signed or not) */
INLINE T256 void scale_bytes(float *y, float d, __m128i b, const int is_signed) {
    __m256 vd = _mm256_set1_ps(d);
    __m256i lo = is_signed ? _mm256_cvtepi8_epi32(b) : _mm256_cvtepu8_epi32(b);
    __m256i hi = is_signed ? _mm256_cvtepi8_epi32(_mm_srli_si128(b, 8)) : _mm256_cvtepu8_epi32(_mm_srli_si128(b, 8));
    _mm256_storeu_ps(y, _mm256_mul_ps(vd, _mm256_cvtepi32_ps(lo)));
    _mm256_storeu_ps(y + 8, _mm256_mul_ps(vd, _mm256_cvtepi32_ps(hi)));
}

/* dl[g], ml[g]: scale and offset of values 16g .. 16g+15 of block x (F16, BF16: none), each d * sc
 * rounded to float32 as quant.c does (the bit fields unpacked 4 or 8 bytes at a time) */
INLINE T256 void block_scales(const int type, const uint8_t *x, float *dl, float *ml) {
    switch (type) {
    case T_F16: case T_BF16:
        break;
    case 2: case 6: case 8: /* Q4_0, Q5_0, Q8_0: d first; y = d * q */
        dl[0] = dl[1] = h2f(x);
        break;
    case 3: case 7: /* Q4_1, Q5_1: d | m first; y = (d * q) + m */
        dl[0] = dl[1] = h2f(x);
        ml[0] = ml[1] = h2f(x + 2);
        break;
    case 10: { /* Q2_K: scales[16] (lo 4 bits scale, hi 4 bits min) at 0, d at 80, dmin at 82 */
        __m128i b = load16(x), m = _mm_set1_epi8(15);
        scale_bytes(dl, h2f(x + 80), _mm_and_si128(b, m), 0);
        scale_bytes(ml, h2f(x + 82), _mm_and_si128(_mm_srli_epi16(b, 4), m), 0);
        break;
    }
    case 11: { /* Q3_K: 16 6-bit scales at 96 (low 4 bits: bytes 0-7, low then high nibbles; high 2 bits:
                * bytes 8-11, 2 bits at a time), d at 108; dl = d * (sc - 32) */
        uint64_t a = (uint64_t)ld32(x + 96) | (uint64_t)ld32(x + 100) << 32, c = ld32(x + 104);
        uint64_t h01 = (c & 0x03030303u) | ((c >> 2) & 0x03030303u) << 32;
        uint64_t h23 = ((c >> 4) & 0x03030303u) | ((c >> 6) & 0x03030303u) << 32;
        __m128i sc = _mm_set_epi64x((long long)(((a >> 4) & 0x0f0f0f0f0f0f0f0full) | h23 << 4),
                                    (long long)((a & 0x0f0f0f0f0f0f0f0full) | h01 << 4));
        scale_bytes(dl, h2f(x + 108), _mm_sub_epi8(sc, _mm_set1_epi8(32)), 1);
        break;
    }
    case 12: case 13: { /* Q4_K, Q5_K: d, dmin, then 12 bytes of 6-bit scales and mins, one per 32 values:
                         * scale g < 4 = s[g] & 63, scale g+4 = (s[8+g] & 15) | (s[g] >> 6) << 4, mins
                         * likewise from s[4+g] and the high nibbles of s[8+g] */
        uint32_t a = ld32(x + 4), b = ld32(x + 8), c = ld32(x + 12);
        uint64_t sc = (a & 0x3f3f3f3fu) | (uint64_t)((c & 0x0f0f0f0fu) | ((a >> 2) & 0x30303030u)) << 32;
        uint64_t mn = (b & 0x3f3f3f3fu) | (uint64_t)(((c >> 4) & 0x0f0f0f0fu) | ((b >> 2) & 0x30303030u)) << 32;
        __m128i s8 = _mm_cvtsi64_si128((long long)sc), m8 = _mm_cvtsi64_si128((long long)mn);
        scale_bytes(dl, h2f(x), _mm_unpacklo_epi8(s8, s8), 0); /* each twice: groups of 16 */
        scale_bytes(ml, h2f(x + 2), _mm_unpacklo_epi8(m8, m8), 0);
        break;
    }
    case 14: /* Q6_K: int8 scales[16] at 192, d at 208 */
        scale_bytes(dl, h2f(x + 208), load16(x + 192), 1);
        break;
    }
}

/* q of values 32s .. 32s+31 of block x */
INLINE T256 __m256i block_q32(const int type, const uint8_t *x, const int s) {
    switch (type) {
    case 2: /* Q4_0 (18 B): d | qs[16]; q = nibble - 8, low nibbles first */
        return _mm256_sub_epi8(nibbles(load16(x + 2)), bytes(8));
    case 3: /* Q4_1 (20 B): d | m | qs[16] */
        return nibbles(load16(x + 4));
    case 6: /* Q5_0 (22 B): d | qh u32 (bit i: high bit of value i) | qs[16]; q = (nibble | high << 4) - 16 */
        return _mm256_sub_epi8(_mm256_or_si256(nibbles(load16(x + 6)), high_bits(rd32(x + 2))), bytes(16));
    case 7: /* Q5_1 (24 B): d | m | qh u32 | qs[16] */
        return _mm256_or_si256(nibbles(load16(x + 8)), high_bits(rd32(x + 4)));
    case 8: /* Q8_0 (34 B): d | qs int8[32] */
        return load32(x + 2);
    case 10: /* Q2_K (84 B): scales[16] | qs[64] | d | dmin. Value j*128 + s'*32 + l: (qs[j*32+l] >> 2s') & 3 */
        return field(load32(x + 16 + (s / 4) * 32), 2 * (s % 4), 3);
    case 11: { /* Q3_K (110 B): hmask[32] | qs[64] | scales[12] | d. Value j*128 + s'*32 + l:
                * ((qs[j*32+l] >> 2s') & 3) - (bit j*4+s' of hmask[l] ? 0 : 4) */
        __m256i hm = _mm256_and_si256(load32(x), bytes(1 << s));
        __m256i clear = _mm256_cmpeq_epi8(hm, _mm256_setzero_si256());
        return _mm256_sub_epi8(field(load32(x + 32 + (s / 4) * 32), 2 * (s % 4), 3), _mm256_and_si256(clear, bytes(4)));
    }
    case 12: /* Q4_K (144 B): d | dmin | scales[12] | qs[128]. Value 32s + l: (qs[(s/2)*32+l] >> 4(s%2)) & 15 */
        return field(load32(x + 16 + (s / 2) * 32), 4 * (s % 2), 15);
    case 13: /* Q5_K (176 B): d | dmin | scales[12] | qh[32] | qs[128]: as Q4_K | ((qh[l] >> s) & 1) << 4 */
        return _mm256_or_si256(field(load32(x + 48 + (s / 2) * 32), 4 * (s % 2), 15),
                               _mm256_slli_epi16(field(load32(x + 16), s, 1), 4));
    case 14:
    default: { /* Q6_K (210 B): ql[128] | qh[64] | scales[16] | d. Value j*128 + t*32 + l (s = 4j + t):
                * ((ql[j*64 + (t%2)*32 + l] >> 4(t/2)) & 15 | ((qh[j*32+l] >> 2t) & 3) << 4) - 32 */
        int j = s / 4, t = s % 4;
        __m256i lo = field(load32(x + j * 64 + (t % 2) * 32), 4 * (t / 2), 15);
        __m256i hi = _mm256_slli_epi16(field(load32(x + 128 + j * 32), 2 * t, 3), 4);
        return _mm256_sub_epi8(_mm256_or_si256(lo, hi), bytes(32));
    }
    }
}

/* ------------------------------------------------------------------------------------------ */
/* 3a. AVX-512 (F, BW, VL, DQ) + FMA + F16C                                                    */

/* F16 -> F32 with vcvtph2ps; inf/NaN lanes rebuilt by bits (the instruction quiets signaling NaNs,
 * quant.c keeps the payload as is) */
T512 static void f16_row_512(const uint8_t *x, float *y, int64_t n) {
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) {
        __m256i h = _mm256_loadu_si256((const __m256i *)(x + 2 * i));
        __m512 f = _mm512_cvtph_ps(h);
        __mmask16 special = _mm256_cmpeq_epi16_mask(_mm256_and_si256(h, _mm256_set1_epi16(0x7c00)),
                                                    _mm256_set1_epi16(0x7c00));
        if (special) {
            __m512i u = _mm512_cvtepu16_epi32(h);
            __m512i s = _mm512_slli_epi32(_mm512_and_si512(u, _mm512_set1_epi32(0x8000)), 16);
            __m512i m = _mm512_slli_epi32(_mm512_and_si512(u, _mm512_set1_epi32(0x3ff)), 13);
            __m512i b = _mm512_or_si512(_mm512_or_si512(s, m), _mm512_set1_epi32(0x7f800000));
            f = _mm512_mask_mov_ps(f, special, _mm512_castsi512_ps(b));
        }
        _mm512_storeu_ps(y + i, f);
    }
    for (; i < n; i++) y[i] = half_to_float(rd16(x + 2 * i));
}

T512 static void bf16_row_512(const uint8_t *x, float *y, int64_t n) {
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) {
        __m512i u = _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)(x + 2 * i)));
        _mm512_storeu_ps(y + i, _mm512_castsi512_ps(_mm512_slli_epi32(u, 16)));
    }
    for (; i < n; i++) {
        uint32_t u = (uint32_t)rd16(x + 2 * i) << 16;
        memcpy(y + i, &u, 4);
    }
}

/* 16 int8 q -> (dl * q) (+ or - ml), the product rounded first */
INLINE T512 __m512 scale16_512(__m128i q, const float *dl, const float *ml, const int op) {
    __m512 v = _mm512_mul_ps(_mm512_set1_ps(*dl), _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(q)));
    if (op == DQ_ADD) v = _mm512_add_ps(v, _mm512_set1_ps(*ml));
    if (op == DQ_SUB) v = _mm512_sub_ps(v, _mm512_set1_ps(*ml));
    return v;
}

/* values 32s .. 32s+31 of one block x (or of 32 F16/BF16 values) -> w[0], w[1] */
INLINE T512 void block_w32_512(const int type, const uint8_t *x, const int s, const float *dl, const float *ml,
                                __m512 w[2]) {
    if (type == T_F16 || type == T_BF16) {
#pragma GCC unroll 2
        for (int i = 0; i < 2; i++) {
            __m256i h = _mm256_loadu_si256((const __m256i *)(x + 32 * i));
            w[i] = type == T_F16 ? _mm512_cvtph_ps(h)
                                 : _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
        }
    } else {
        __m256i q = block_q32(type, x, s);
        w[0] = scale16_512(_mm256_castsi256_si128(q), dl + 2 * s, ml + 2 * s, block_op(type));
        w[1] = scale16_512(_mm256_extracti128_si256(q, 1), dl + 2 * s + 1, ml + 2 * s + 1, block_op(type));
    }
}

/* nb blocks of `type` (a constant once inlined) -> y (nb * block_size) */
INLINE T512 void blocks_512(const int type, const uint8_t *x, int64_t nb, float *y) {
    float dl[16], ml[16];
    for (int64_t b = 0; b < nb; b++, x += block_bytes(type), y += block_size(type)) {
        block_scales(type, x, dl, ml);
#pragma GCC unroll 8
        for (int s = 0; s < block_size(type) / 32; s++) {
            __m512 w[2];
            block_w32_512(type, x, s, dl, ml, w);
            _mm512_storeu_ps(y + 32 * s, w[0]);
            _mm512_storeu_ps(y + 32 * s + 16, w[1]);
        }
    }
}

T512 static void dequant_512(int type, const uint8_t *row, int64_t k0, int64_t k1, float *y) {
    if (type == T_F32) { memcpy(y, row + 4 * k0, (size_t)(k1 - k0) * 4); return; }
    if (type == T_F16) { f16_row_512(row + 2 * k0, y, k1 - k0); return; }
    if (type == T_BF16) { bf16_row_512(row + 2 * k0, y, k1 - k0); return; }
    int64_t b0 = k0 / block_size(type), nb = (k1 - k0) / block_size(type);
    const uint8_t *x = row + b0 * block_bytes(type);
    switch (type) {
    case 2: blocks_512(2, x, nb, y); break;
    case 3: blocks_512(3, x, nb, y); break;
    case 6: blocks_512(6, x, nb, y); break;
    case 7: blocks_512(7, x, nb, y); break;
    case 8: blocks_512(8, x, nb, y); break;
    case 10: blocks_512(10, x, nb, y); break;
    case 11: blocks_512(11, x, nb, y); break;
    case 12: blocks_512(12, x, nb, y); break;
    case 13: blocks_512(13, x, nb, y); break;
    default: blocks_512(14, x, nb, y); break;
    }
}

/* 4 vectors -> their 4 sums */
INLINE T512 __m128 hsum4_256(__m256 a, __m256 b, __m256 c, __m256 d) {
    __m256 abcd = _mm256_hadd_ps(_mm256_hadd_ps(a, b), _mm256_hadd_ps(c, d));
    return _mm_add_ps(_mm256_castps256_ps128(abcd), _mm256_extractf128_ps(abcd, 1));
}
INLINE T512 __m256 half_512(__m512 a) {
    return _mm256_add_ps(_mm512_castps512_ps256(a), _mm512_extractf32x8_ps(a, 1));
}

/* out[c*ldo + r] = the sum of acc[c][r] (+ bias[r]) for c < NC, r < nr */
INLINE T512 void store_sums_512(__m512 (*acc)[4], const int NC, int nr, float *out, int64_t ldo, const float *bias) {
#pragma GCC unroll 8
    for (int c = 0; c < NC; c++) {
        __mmask8 m = (__mmask8)((1u << nr) - 1);
        __m128 sums = hsum4_256(half_512(acc[c][0]), half_512(acc[c][1]), half_512(acc[c][2]), half_512(acc[c][3]));
        if (bias) sums = _mm_add_ps(sums, _mm_maskz_loadu_ps(m, bias));
        _mm_mask_storeu_ps(out + c * ldo, m, sums);
    }
}

/* out[c*ldo + r] = x[c] . w[r] (+ bias[r]) for c < NC (<= 6), r < nr; x rows K apart.
 * 4 x NC accumulators: per 16 values 4 + NC loads feed 4*NC FMAs. */
INLINE T512 void dot_block_512(const float *const *w, int nr, const float *x, int64_t K, const int NC, float *out,
                                int64_t ldo, const float *bias, Ahead *ahead) {
    __m512 acc[6][4];
#pragma GCC unroll 8
    for (int c = 0; c < NC; c++)
#pragma GCC unroll 8
        for (int r = 0; r < 4; r++) acc[c][r] = _mm512_setzero_ps();
    for (int64_t k = 0; k < K; k += 16) { /* the last step masked (F32/F16/BF16 widths) */
        __mmask16 m = K - k >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (K - k)) - 1);
        ahead_lines(ahead, 4); /* what this step reads of 4 F32 rows */
        __m512 w0 = _mm512_maskz_loadu_ps(m, w[0] + k), w1 = _mm512_maskz_loadu_ps(m, w[1] + k);
        __m512 w2 = _mm512_maskz_loadu_ps(m, w[2] + k), w3 = _mm512_maskz_loadu_ps(m, w[3] + k);
#pragma GCC unroll 8
        for (int c = 0; c < NC; c++) {
            __m512 xv = _mm512_maskz_loadu_ps(m, x + c * K + k);
            acc[c][0] = _mm512_fmadd_ps(w0, xv, acc[c][0]);
            acc[c][1] = _mm512_fmadd_ps(w1, xv, acc[c][1]);
            acc[c][2] = _mm512_fmadd_ps(w2, xv, acc[c][2]);
            acc[c][3] = _mm512_fmadd_ps(w3, xv, acc[c][3]);
        }
    }
    store_sums_512(acc, NC, nr, out, ldo, bias);
}

T512 static void dot_tile_512(const float *const *w, int nr, const float *x, int64_t N, int64_t K, float *out,
                              int64_t ldo, const float *bias, Ahead *ahead) {
    int64_t n = 0;
    for (; n + 6 <= N; n += 6) dot_block_512(w, nr, x + n * K, K, 6, out + n * ldo, ldo, bias, ahead);
    const float *xn = x + n * K;
    float *on = out + n * ldo;
    switch (N - n) {
    case 5: dot_block_512(w, nr, xn, K, 5, on, ldo, bias, ahead); break;
    case 4: dot_block_512(w, nr, xn, K, 4, on, ldo, bias, ahead); break;
    case 3: dot_block_512(w, nr, xn, K, 3, on, ldo, bias, ahead); break;
    case 2: dot_block_512(w, nr, xn, K, 2, on, ldo, bias, ahead); break;
    case 1: dot_block_512(w, nr, xn, K, 1, on, ldo, bias, ahead); break;
    default: break;
    }
}

/* out[c*ldo + r] = x[c] . W_r (+ bias[r]) for c < NC (<= 4), r < nr: the 4 rows (raw `type` blocks, or
 * F16/BF16 values; rows beyond nr repeat row 0) are dequantized in registers 32 values at a time */
INLINE T512 void dotq_block_512(const int type, const uint8_t *const *row, int nr, const float *x, int64_t K,
                                 const int NC, float *out, int64_t ldo, const float *bias, Ahead *ahead) {
    __m512 acc[4][4];
#pragma GCC unroll 8
    for (int c = 0; c < NC; c++)
#pragma GCC unroll 8
        for (int r = 0; r < 4; r++) acc[c][r] = _mm512_setzero_ps();
    for (int64_t k0 = 0, off = 0; k0 < K; k0 += block_size(type), off += block_bytes(type)) {
        float dl[4][16], ml[4][16];
        ahead_lines(ahead, (4 * block_bytes(type) + 63) / 64); /* what this step reads of 4 rows */
#pragma GCC unroll 4
        for (int r = 0; r < 4; r++) block_scales(type, row[r] + off, dl[r], ml[r]);
#pragma GCC unroll 8
        for (int s = 0; s < block_size(type) / 32; s++) {
#pragma GCC unroll 4
            for (int r = 0; r < 4; r++) {
                __m512 w[2];
                block_w32_512(type, row[r] + off, s, dl[r], ml[r], w);
#pragma GCC unroll 4
                for (int c = 0; c < NC; c++) {
                    const float *xc = x + c * K + k0 + 32 * s;
                    acc[c][r] = _mm512_fmadd_ps(w[0], _mm512_loadu_ps(xc), acc[c][r]);
                    acc[c][r] = _mm512_fmadd_ps(w[1], _mm512_loadu_ps(xc + 16), acc[c][r]);
                }
            }
        }
    }
    store_sums_512(acc, NC, nr, out, ldo, bias);
}

INLINE T512 void dotq_rows_512(const int type, const uint8_t *const *row, int nr, const float *x, int64_t N,
                                int64_t K, float *out, int64_t ldo, const float *bias, Ahead *ahead) {
    switch (N) {
    case 4: dotq_block_512(type, row, nr, x, K, 4, out, ldo, bias, ahead); break;
    case 3: dotq_block_512(type, row, nr, x, K, 3, out, ldo, bias, ahead); break;
    case 2: dotq_block_512(type, row, nr, x, K, 2, out, ldo, bias, ahead); break;
    default: dotq_block_512(type, row, nr, x, K, 1, out, ldo, bias, ahead); break;
    }
}

/* out (N <= 4, nr) = x (N, K) @ W_rows^T (+ bias), weights dequantized in registers (K: block multiple) */
T512 static void dotq_tile_512(int type, const uint8_t *const *row, int nr, const float *x, int64_t N, int64_t K,
                               float *out, int64_t ldo, const float *bias, Ahead *ahead) {
    switch (type) {
    case 1: dotq_rows_512(1, row, nr, x, N, K, out, ldo, bias, ahead); break;
    case 30: dotq_rows_512(30, row, nr, x, N, K, out, ldo, bias, ahead); break;
    case 2: dotq_rows_512(2, row, nr, x, N, K, out, ldo, bias, ahead); break;
    case 3: dotq_rows_512(3, row, nr, x, N, K, out, ldo, bias, ahead); break;
    case 6: dotq_rows_512(6, row, nr, x, N, K, out, ldo, bias, ahead); break;
    case 7: dotq_rows_512(7, row, nr, x, N, K, out, ldo, bias, ahead); break;
    case 8: dotq_rows_512(8, row, nr, x, N, K, out, ldo, bias, ahead); break;
    case 10: dotq_rows_512(10, row, nr, x, N, K, out, ldo, bias, ahead); break;
    case 11: dotq_rows_512(11, row, nr, x, N, K, out, ldo, bias, ahead); break;
    case 12: dotq_rows_512(12, row, nr, x, N, K, out, ldo, bias, ahead); break;
    case 13: dotq_rows_512(13, row, nr, x, N, K, out, ldo, bias, ahead); break;
    default: dotq_rows_512(14, row, nr, x, N, K, out, ldo, bias, ahead); break;
    }
}

/* out[c*ldo + k] += sum_{r < NR} g[c*ldg + r] * w[r][k] for c < NC (<= 4), k < K */
INLINE T512 void axpy_block_512(const float *const *w_, const int NR, const float *g, int64_t ldg, const int NC,
                                 int64_t K, float *out, int64_t ldo) {
    __m512 gv[4][4], wv[4];
    const float *w[4]; /* a local copy: the stores to out could alias w_ */
#pragma GCC unroll 8
    for (int r = 0; r < NR; r++) w[r] = w_[r];
#pragma GCC unroll 8
    for (int c = 0; c < NC; c++)
#pragma GCC unroll 8
        for (int r = 0; r < NR; r++) gv[c][r] = _mm512_set1_ps(g[c * ldg + r]);
    int64_t k = 0;
    for (; k + 16 <= K; k += 16) {
#pragma GCC unroll 8
        for (int r = 0; r < NR; r++) wv[r] = _mm512_loadu_ps(w[r] + k);
#pragma GCC unroll 8
        for (int c = 0; c < NC; c++) {
            __m512 o = _mm512_loadu_ps(out + c * ldo + k);
#pragma GCC unroll 8
            for (int r = 0; r < NR; r++) o = _mm512_fmadd_ps(gv[c][r], wv[r], o);
            _mm512_storeu_ps(out + c * ldo + k, o);
        }
    }
    if (k < K) {
        __mmask16 m = (__mmask16)((1u << (K - k)) - 1);
#pragma GCC unroll 8
        for (int r = 0; r < NR; r++) wv[r] = _mm512_maskz_loadu_ps(m, w[r] + k);
#pragma GCC unroll 8
        for (int c = 0; c < NC; c++) {
            __m512 o = _mm512_maskz_loadu_ps(m, out + c * ldo + k);
#pragma GCC unroll 8
            for (int r = 0; r < NR; r++) o = _mm512_fmadd_ps(gv[c][r], wv[r], o);
            _mm512_mask_storeu_ps(out + c * ldo + k, m, o);
        }
    }
}

INLINE T512 void axpy_rows_512(const float *const *w, const int NR, const float *g, int64_t ldg, int64_t N,
                                int64_t K, float *out, int64_t ldo) {
    int64_t n = 0;
    for (; n + 4 <= N; n += 4) axpy_block_512(w, NR, g + n * ldg, ldg, 4, K, out + n * ldo, ldo);
    switch (N - n) {
    case 3: axpy_block_512(w, NR, g + n * ldg, ldg, 3, K, out + n * ldo, ldo); break;
    case 2: axpy_block_512(w, NR, g + n * ldg, ldg, 2, K, out + n * ldo, ldo); break;
    case 1: axpy_block_512(w, NR, g + n * ldg, ldg, 1, K, out + n * ldo, ldo); break;
    default: break;
    }
}

T512 static void axpy_tile_512(const float *const *w, int nr, const float *g, int64_t ldg, int64_t N, int64_t K,
                               float *out, int64_t ldo) {
    switch (nr) {
    case 4: axpy_rows_512(w, 4, g, ldg, N, K, out, ldo); break;
    case 3: axpy_rows_512(w, 3, g, ldg, N, K, out, ldo); break;
    case 2: axpy_rows_512(w, 2, g, ldg, N, K, out, ldo); break;
    default: axpy_rows_512(w, 1, g, ldg, N, K, out, ldo); break;
    }
}

/* ------------------------------------------------------------------------------------------ */
/* 3b. AVX2 + FMA + F16C                                                                       */

static const int32_t TAIL_MASK[16] = {-1, -1, -1, -1, -1, -1, -1, -1, 0, 0, 0, 0, 0, 0, 0, 0};
INLINE T256 __m256i tail_mask_256(int64_t n) { return _mm256_loadu_si256((const __m256i *)(TAIL_MASK + 8 - n)); }

T256 static void f16_row_256(const uint8_t *x, float *y, int64_t n) {
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
        __m128i h = _mm_loadu_si128((const __m128i *)(x + 2 * i));
        __m256 f = _mm256_cvtph_ps(h);
        __m128i special = _mm_cmpeq_epi16(_mm_and_si128(h, _mm_set1_epi16(0x7c00)), _mm_set1_epi16(0x7c00));
        if (_mm_movemask_epi8(special)) {
            __m256i u = _mm256_cvtepu16_epi32(h);
            __m256i s = _mm256_slli_epi32(_mm256_and_si256(u, _mm256_set1_epi32(0x8000)), 16);
            __m256i m = _mm256_slli_epi32(_mm256_and_si256(u, _mm256_set1_epi32(0x3ff)), 13);
            __m256i b = _mm256_or_si256(_mm256_or_si256(s, m), _mm256_set1_epi32(0x7f800000));
            f = _mm256_blendv_ps(f, _mm256_castsi256_ps(b), _mm256_castsi256_ps(_mm256_cvtepi16_epi32(special)));
        }
        _mm256_storeu_ps(y + i, f);
    }
    for (; i < n; i++) y[i] = half_to_float(rd16(x + 2 * i));
}

T256 static void bf16_row_256(const uint8_t *x, float *y, int64_t n) {
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
        __m256i u = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)(x + 2 * i)));
        _mm256_storeu_ps(y + i, _mm256_castsi256_ps(_mm256_slli_epi32(u, 16)));
    }
    for (; i < n; i++) {
        uint32_t u = (uint32_t)rd16(x + 2 * i) << 16;
        memcpy(y + i, &u, 4);
    }
}

/* 8 int8 q (the low 8 bytes) -> (dl * q) (+ or - ml) */
INLINE T256 __m256 scale8_256(__m128i q, const float *dl, const float *ml, const int op) {
    __m256 v = _mm256_mul_ps(_mm256_set1_ps(*dl), _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(q)));
    if (op == DQ_ADD) v = _mm256_add_ps(v, _mm256_set1_ps(*ml));
    if (op == DQ_SUB) v = _mm256_sub_ps(v, _mm256_set1_ps(*ml));
    return v;
}

/* values 32s .. 32s+31 of one block x (or of 32 F16/BF16 values) -> w[0..3] */
INLINE T256 void block_w32_256(const int type, const uint8_t *x, const int s, const float *dl, const float *ml,
                                __m256 w[4]) {
    if (type == T_F16 || type == T_BF16) {
#pragma GCC unroll 4
        for (int i = 0; i < 4; i++) {
            __m128i h = _mm_loadu_si128((const __m128i *)(x + 16 * i));
            w[i] = type == T_F16 ? _mm256_cvtph_ps(h)
                                 : _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
        }
    } else {
        __m256i q = block_q32(type, x, s);
        __m128i lo = _mm256_castsi256_si128(q), hi = _mm256_extracti128_si256(q, 1);
        w[0] = scale8_256(lo, dl + 2 * s, ml + 2 * s, block_op(type));
        w[1] = scale8_256(_mm_unpackhi_epi64(lo, lo), dl + 2 * s, ml + 2 * s, block_op(type));
        w[2] = scale8_256(hi, dl + 2 * s + 1, ml + 2 * s + 1, block_op(type));
        w[3] = scale8_256(_mm_unpackhi_epi64(hi, hi), dl + 2 * s + 1, ml + 2 * s + 1, block_op(type));
    }
}

INLINE T256 void blocks_256(const int type, const uint8_t *x, int64_t nb, float *y) {
    float dl[16], ml[16];
    for (int64_t b = 0; b < nb; b++, x += block_bytes(type), y += block_size(type)) {
        block_scales(type, x, dl, ml);
#pragma GCC unroll 8
        for (int s = 0; s < block_size(type) / 32; s++) {
            __m256 w[4];
            block_w32_256(type, x, s, dl, ml, w);
#pragma GCC unroll 4
            for (int i = 0; i < 4; i++) _mm256_storeu_ps(y + 32 * s + 8 * i, w[i]);
        }
    }
}

T256 static void dequant_256(int type, const uint8_t *row, int64_t k0, int64_t k1, float *y) {
    if (type == T_F32) { memcpy(y, row + 4 * k0, (size_t)(k1 - k0) * 4); return; }
    if (type == T_F16) { f16_row_256(row + 2 * k0, y, k1 - k0); return; }
    if (type == T_BF16) { bf16_row_256(row + 2 * k0, y, k1 - k0); return; }
    int64_t b0 = k0 / block_size(type), nb = (k1 - k0) / block_size(type);
    const uint8_t *x = row + b0 * block_bytes(type);
    switch (type) {
    case 2: blocks_256(2, x, nb, y); break;
    case 3: blocks_256(3, x, nb, y); break;
    case 6: blocks_256(6, x, nb, y); break;
    case 7: blocks_256(7, x, nb, y); break;
    case 8: blocks_256(8, x, nb, y); break;
    case 10: blocks_256(10, x, nb, y); break;
    case 11: blocks_256(11, x, nb, y); break;
    case 12: blocks_256(12, x, nb, y); break;
    case 13: blocks_256(13, x, nb, y); break;
    default: blocks_256(14, x, nb, y); break;
    }
}

INLINE T256 __m128 hsum4_avx2(__m256 a, __m256 b, __m256 c, __m256 d) {
    __m256 abcd = _mm256_hadd_ps(_mm256_hadd_ps(a, b), _mm256_hadd_ps(c, d));
    return _mm_add_ps(_mm256_castps256_ps128(abcd), _mm256_extractf128_ps(abcd, 1));
}

/* out[c*ldo + r] = the sum of acc[c][r] (+ bias[r]) for c < NC, r < nr */
INLINE T256 void store_sums_256(__m256 (*acc)[4], const int NC, int nr, float *out, int64_t ldo, const float *bias) {
    __m128i m = _mm_loadu_si128((const __m128i *)(TAIL_MASK + 8 - nr));
#pragma GCC unroll 2
    for (int c = 0; c < NC; c++) {
        __m128 sums = hsum4_avx2(acc[c][0], acc[c][1], acc[c][2], acc[c][3]);
        if (bias) sums = _mm_add_ps(sums, _mm_maskload_ps(bias, m));
        _mm_maskstore_ps(out + c * ldo, m, sums);
    }
}

/* out[c*ldo + r] = x[c] . w[r] (+ bias[r]) for c < NC (<= 2), r < nr (16 registers: 8 accumulators) */
INLINE T256 void dot_block_256(const float *const *w, int nr, const float *x, int64_t K, const int NC, float *out,
                                int64_t ldo, const float *bias, Ahead *ahead) {
    __m256 acc[2][4];
#pragma GCC unroll 8
    for (int c = 0; c < NC; c++)
#pragma GCC unroll 8
        for (int r = 0; r < 4; r++) acc[c][r] = _mm256_setzero_ps();
    int64_t k = 0;
    for (; k + 8 <= K; k += 8) {
        ahead_lines(ahead, 2);
        __m256 w0 = _mm256_loadu_ps(w[0] + k), w1 = _mm256_loadu_ps(w[1] + k);
        __m256 w2 = _mm256_loadu_ps(w[2] + k), w3 = _mm256_loadu_ps(w[3] + k);
#pragma GCC unroll 8
        for (int c = 0; c < NC; c++) {
            __m256 xv = _mm256_loadu_ps(x + c * K + k);
            acc[c][0] = _mm256_fmadd_ps(w0, xv, acc[c][0]);
            acc[c][1] = _mm256_fmadd_ps(w1, xv, acc[c][1]);
            acc[c][2] = _mm256_fmadd_ps(w2, xv, acc[c][2]);
            acc[c][3] = _mm256_fmadd_ps(w3, xv, acc[c][3]);
        }
    }
    if (k < K) {
        __m256i m = tail_mask_256(K - k);
        __m256 w0 = _mm256_maskload_ps(w[0] + k, m), w1 = _mm256_maskload_ps(w[1] + k, m);
        __m256 w2 = _mm256_maskload_ps(w[2] + k, m), w3 = _mm256_maskload_ps(w[3] + k, m);
#pragma GCC unroll 8
        for (int c = 0; c < NC; c++) {
            __m256 xv = _mm256_maskload_ps(x + c * K + k, m);
            acc[c][0] = _mm256_fmadd_ps(w0, xv, acc[c][0]);
            acc[c][1] = _mm256_fmadd_ps(w1, xv, acc[c][1]);
            acc[c][2] = _mm256_fmadd_ps(w2, xv, acc[c][2]);
            acc[c][3] = _mm256_fmadd_ps(w3, xv, acc[c][3]);
        }
    }
    store_sums_256(acc, NC, nr, out, ldo, bias);
}

T256 static void dot_tile_256(const float *const *w, int nr, const float *x, int64_t N, int64_t K, float *out,
                              int64_t ldo, const float *bias, Ahead *ahead) {
    int64_t n = 0;
    for (; n + 2 <= N; n += 2) dot_block_256(w, nr, x + n * K, K, 2, out + n * ldo, ldo, bias, ahead);
    if (n < N) dot_block_256(w, nr, x + n * K, K, 1, out + n * ldo, ldo, bias, ahead);
}

/* out[c*ldo + r] = x[c] . W_r (+ bias[r]) for c < NC (<= 2), r < nr, weights dequantized in registers */
INLINE T256 void dotq_block_256(const int type, const uint8_t *const *row, int nr, const float *x, int64_t K,
                                 const int NC, float *out, int64_t ldo, const float *bias, Ahead *ahead) {
    __m256 acc[2][4];
#pragma GCC unroll 8
    for (int c = 0; c < NC; c++)
#pragma GCC unroll 8
        for (int r = 0; r < 4; r++) acc[c][r] = _mm256_setzero_ps();
    for (int64_t k0 = 0, off = 0; k0 < K; k0 += block_size(type), off += block_bytes(type)) {
        float dl[4][16], ml[4][16];
        ahead_lines(ahead, (4 * block_bytes(type) + 63) / 64); /* what this step reads of 4 rows */
#pragma GCC unroll 4
        for (int r = 0; r < 4; r++) block_scales(type, row[r] + off, dl[r], ml[r]);
#pragma GCC unroll 8
        for (int s = 0; s < block_size(type) / 32; s++) {
#pragma GCC unroll 4
            for (int r = 0; r < 4; r++) {
                __m256 w[4];
                block_w32_256(type, row[r] + off, s, dl[r], ml[r], w);
#pragma GCC unroll 2
                for (int c = 0; c < NC; c++) {
                    const float *xc = x + c * K + k0 + 32 * s;
#pragma GCC unroll 4
                    for (int i = 0; i < 4; i++)
                        acc[c][r] = _mm256_fmadd_ps(w[i], _mm256_loadu_ps(xc + 8 * i), acc[c][r]);
                }
            }
        }
    }
    store_sums_256(acc, NC, nr, out, ldo, bias);
}

INLINE T256 void dotq_rows_256(const int type, const uint8_t *const *row, int nr, const float *x, int64_t N,
                                int64_t K, float *out, int64_t ldo, const float *bias, Ahead *ahead) {
    if (N == 2) dotq_block_256(type, row, nr, x, K, 2, out, ldo, bias, ahead);
    else dotq_block_256(type, row, nr, x, K, 1, out, ldo, bias, ahead);
}

T256 static void dotq_tile_256(int type, const uint8_t *const *row, int nr, const float *x, int64_t N, int64_t K,
                               float *out, int64_t ldo, const float *bias, Ahead *ahead) {
    switch (type) {
    case 1: dotq_rows_256(1, row, nr, x, N, K, out, ldo, bias, ahead); break;
    case 30: dotq_rows_256(30, row, nr, x, N, K, out, ldo, bias, ahead); break;
    case 2: dotq_rows_256(2, row, nr, x, N, K, out, ldo, bias, ahead); break;
    case 3: dotq_rows_256(3, row, nr, x, N, K, out, ldo, bias, ahead); break;
    case 6: dotq_rows_256(6, row, nr, x, N, K, out, ldo, bias, ahead); break;
    case 7: dotq_rows_256(7, row, nr, x, N, K, out, ldo, bias, ahead); break;
    case 8: dotq_rows_256(8, row, nr, x, N, K, out, ldo, bias, ahead); break;
    case 10: dotq_rows_256(10, row, nr, x, N, K, out, ldo, bias, ahead); break;
    case 11: dotq_rows_256(11, row, nr, x, N, K, out, ldo, bias, ahead); break;
    case 12: dotq_rows_256(12, row, nr, x, N, K, out, ldo, bias, ahead); break;
    case 13: dotq_rows_256(13, row, nr, x, N, K, out, ldo, bias, ahead); break;
    default: dotq_rows_256(14, row, nr, x, N, K, out, ldo, bias, ahead); break;
    }
}

/* out[c*ldo + k] += sum_{r < NR} g[c*ldg + r] * w[r][k] for c < NC (<= 2), k < K */
INLINE T256 void axpy_block_256(const float *const *w_, const int NR, const float *g, int64_t ldg, const int NC,
                                 int64_t K, float *out, int64_t ldo) {
    __m256 gv[2][4], wv[4];
    const float *w[4]; /* a local copy: the stores to out could alias w_ */
#pragma GCC unroll 8
    for (int r = 0; r < NR; r++) w[r] = w_[r];
#pragma GCC unroll 8
    for (int c = 0; c < NC; c++)
#pragma GCC unroll 8
        for (int r = 0; r < NR; r++) gv[c][r] = _mm256_set1_ps(g[c * ldg + r]);
    int64_t k = 0;
    for (; k + 8 <= K; k += 8) {
#pragma GCC unroll 8
        for (int r = 0; r < NR; r++) wv[r] = _mm256_loadu_ps(w[r] + k);
#pragma GCC unroll 8
        for (int c = 0; c < NC; c++) {
            __m256 o = _mm256_loadu_ps(out + c * ldo + k);
#pragma GCC unroll 8
            for (int r = 0; r < NR; r++) o = _mm256_fmadd_ps(gv[c][r], wv[r], o);
            _mm256_storeu_ps(out + c * ldo + k, o);
        }
    }
    if (k < K) {
        __m256i m = tail_mask_256(K - k);
#pragma GCC unroll 8
        for (int r = 0; r < NR; r++) wv[r] = _mm256_maskload_ps(w[r] + k, m);
#pragma GCC unroll 8
        for (int c = 0; c < NC; c++) {
            __m256 o = _mm256_maskload_ps(out + c * ldo + k, m);
#pragma GCC unroll 8
            for (int r = 0; r < NR; r++) o = _mm256_fmadd_ps(gv[c][r], wv[r], o);
            _mm256_maskstore_ps(out + c * ldo + k, m, o);
        }
    }
}

INLINE T256 void axpy_rows_256(const float *const *w, const int NR, const float *g, int64_t ldg, int64_t N,
                                int64_t K, float *out, int64_t ldo) {
    int64_t n = 0;
    for (; n + 2 <= N; n += 2) axpy_block_256(w, NR, g + n * ldg, ldg, 2, K, out + n * ldo, ldo);
    if (n < N) axpy_block_256(w, NR, g + n * ldg, ldg, 1, K, out + n * ldo, ldo);
}

T256 static void axpy_tile_256(const float *const *w, int nr, const float *g, int64_t ldg, int64_t N, int64_t K,
                               float *out, int64_t ldo) {
    switch (nr) {
    case 4: axpy_rows_256(w, 4, g, ldg, N, K, out, ldo); break;
    case 3: axpy_rows_256(w, 3, g, ldg, N, K, out, ldo); break;
    case 2: axpy_rows_256(w, 2, g, ldg, N, K, out, ldo); break;
    default: axpy_rows_256(w, 1, g, ldg, N, K, out, ldo); break;
    }
}
#endif /* MATMUL_X86 */

/* ------------------------------------------------------------------------------------------ */
/* 4. dispatch                                                                                 */

typedef struct {
    const char *name;
    void (*dequant)(int type, const uint8_t *row, int64_t k0, int64_t k1, float *y);
    void (*dot_tile)(const float *const *w, int nr, const float *x, int64_t N, int64_t K, float *out, int64_t ldo,
                     const float *bias, Ahead *ahead);
    void (*axpy_tile)(const float *const *w, int nr, const float *g, int64_t ldg, int64_t N, int64_t K, float *out,
                      int64_t ldo);
    /* out (N, nr) = x (N, K) @ W_rows^T (+ bias) for N <= fused_rows, weights dequantized in registers */
    void (*dotq_tile)(int type, const uint8_t *const *row, int nr, const float *x, int64_t N, int64_t K, float *out,
                      int64_t ldo, const float *bias, Ahead *ahead);
    int fused_rows;
} Isa;

static const Isa ISAS[] = {
#ifdef MATMUL_X86
    {"avx512", dequant_512, dot_tile_512, axpy_tile_512, dotq_tile_512, 4},
    {"avx2", dequant_256, dot_tile_256, axpy_tile_256, dotq_tile_256, 2},
#endif
    {"baseline", dequant_base, dot_tile_base, axpy_tile_base, NULL, 0},
};
#define N_ISAS ((int)(sizeof ISAS / sizeof ISAS[0]))

static int cpu_has(const Isa *isa) {
#ifdef MATMUL_X86
    if (strcmp(isa->name, "avx512") == 0)
        return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
               __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
               __builtin_cpu_supports("fma") && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("f16c");
    if (strcmp(isa->name, "avx2") == 0)
        return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
#endif
    return strcmp(isa->name, "baseline") == 0;
}

static const Isa *find_isa(const char *name) {
    for (int i = 0; name && i < N_ISAS; i++)
        if (strcmp(ISAS[i].name, name) == 0) return cpu_has(&ISAS[i]) ? &ISAS[i] : NULL;
    return NULL;
}

/* the variant in use: resolved once (FACTRACE_ISA if set and supported, else the best the CPU has) */
static const Isa *isa_current;

static const Isa *isa(void) {
    const Isa *i = __atomic_load_n(&isa_current, __ATOMIC_ACQUIRE);
    if (i) return i;
#ifdef MATMUL_X86
    __builtin_cpu_init();
#endif
    i = find_isa(getenv("FACTRACE_ISA"));
    for (int k = 0; !i && k < N_ISAS; k++)
        if (cpu_has(&ISAS[k])) i = &ISAS[k];
    __atomic_store_n(&isa_current, i, __ATOMIC_RELEASE); /* racing resolvers store the same value */
    return i;
}

const char *mat_isa(void) { return isa()->name; }

int mat_isa_supported(const char *name) {
    isa();
    return find_isa(name) != NULL;
}

int mat_set_isa(const char *name) {
    isa();
    const Isa *i = find_isa(name);
    if (!i) return -1;
    __atomic_store_n(&isa_current, i, __ATOMIC_RELEASE);
    return 0;
}

/* ------------------------------------------------------------------------------------------ */
/* 5. drivers                                                                                  */

/* Smallest N that takes the many-rows (sgemm) regime. Measured on the Zen 4 test machine (one thread, best
 * of interleaved runs, weights streamed from memory; GPT-2 768 <-> 3072 and Qwen 896 -> 4864 shapes): the
 * two regimes run within ~10% of each other from N = 48 to 128; few rows wins longer for wide inputs
 * (3072 -> 768: up to N ~ 128-192) and for the formats whose unpacked panel costs more to write than to
 * read (all but F32). mat_mul_t's few-rows kernel rereads its (N, n_in) partial sum per 4 weight rows,
 * so sgemm takes over early (N ~ 32 for 3072-wide inputs, ~96 for 768-wide). */
int64_t mat_crossover(int type, int transposed) {
    if (transposed) return 32;
    switch (type) {
    case 0: case 1: case 30: return 64;
    default: return 96;
    }
}

#ifndef PANEL_BYTES
/* float32 weight panel of the many-rows regime: within the 1 MiB L2 (sgemm repacks x for every panel,
 * so panels much smaller cost: 3072 -> 768 at N = 512 ran at 60, 78, 85 GFLOP/s on one core with 192,
 * 384, 768 KiB panels, single-threaded sgemm itself at 93) */
#define PANEL_BYTES (768 * 1024)
#endif

static int f32_in_place(const Mat *W) { return W->type == T_F32 && (uintptr_t)W->data % sizeof(float) == 0; }
static const uint8_t *row_ptr(const Mat *W, int64_t r) { return W->data + r * W->row_bytes; }
static int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }
static int64_t max64(int64_t a, int64_t b) { return a > b ? a : b; }
static int64_t round_up(int64_t a, int64_t m) { return (a + m - 1) / m * m; }
static int fits_int(int64_t a) { return a <= 0x7fffffff; }

void mat_rows_f32(const Mat *W, int64_t r0, int64_t r1, float *out) {
    const Isa *i = isa();
    for (int64_t r = r0; r < r1; r++) i->dequant(W->type, row_ptr(W, r), 0, W->n_in, out + (r - r0) * W->n_in);
}

typedef struct {
    const Isa *isa;
    const Mat *W;
    const float *x;    /* (N, n_in) for mat_mul, g (N, n_out) for mat_mul_t */
    int64_t N;
    float *out;        /* (N, n_out) for mat_mul, (N, n_in) for mat_mul_t */
    const float *bias; /* (n_out,) or NULL */
    int64_t step;      /* rows (mat_mul) or columns (mat_mul_t) per panel */
    float *scratch;    /* per thread: `per` floats */
    int64_t per;
    float *parts;      /* mat_mul_t few rows: n_parts partial sums (N, n_in) */
    int64_t n_parts;
} Job;

static float *thread_buf(const Job *j, int tid) { return j->scratch ? j->scratch + tid * j->per : NULL; }

/* few rows, rows o..o+nr-1 of W (nr <= TILE_ROWS): out[:, o:o+nr] = x @ W[o:o+nr]^T (+ bias) */
static void few_tile(const Job *j, int64_t o, int nr, float *buf /* (TILE_ROWS, K) */, Ahead *ahead) {
    const Mat *W = j->W;
    int64_t K = W->n_in;
    const float *bias = j->bias ? j->bias + o : NULL;
    if (j->N <= j->isa->fused_rows && W->type != T_F32 && K % 32 == 0) { /* dequantized in registers */
        const uint8_t *row[TILE_ROWS];
        for (int r = 0; r < TILE_ROWS; r++) row[r] = row_ptr(W, o + (r < nr ? r : 0));
        j->isa->dotq_tile(W->type, row, nr, j->x, j->N, K, j->out + o, W->n_out, bias, ahead);
        return;
    }
    const float *w[TILE_ROWS] = {NULL};
    for (int r = 0; r < TILE_ROWS; r++) {
        if (r >= nr) {
            w[r] = w[0]; /* padding rows: computed, dropped */
        } else if (f32_in_place(W)) {
            w[r] = (const float *)row_ptr(W, o + r);
        } else {
            j->isa->dequant(W->type, row_ptr(W, o + r), 0, K, buf + r * K);
            w[r] = buf + r * K;
        }
    }
    j->isa->dot_tile(w, nr, j->x, j->N, K, j->out + o, W->n_out, bias, ahead);
}

static void few_range(void *ctx, int64_t lo, int64_t hi, int tid) {
    const Job *j = ctx;
    for (int64_t o = lo; o < hi; o += TILE_ROWS) {
        int nr = (int)min64(TILE_ROWS, hi - o);
        Ahead ahead = {row_ptr(j->W, o + nr), row_ptr(j->W, min64(hi, o + nr + TILE_ROWS))}; /* the next tile */
        few_tile(j, o, nr, thread_buf(j, tid), &ahead);
    }
}

/* many rows, rows lo..hi-1 of W: unpack to float32 (F32: in place), one single-threaded sgemm */
static void many_panel(const Job *j, int64_t lo, int64_t hi, float *buf /* (step, K) */) {
    const Mat *W = j->W;
    int64_t K = W->n_in, P = hi - lo, ldo = W->n_out;
    const float *panel = (const float *)row_ptr(W, lo); /* (P, K) */
    if (!f32_in_place(W)) {
        for (int64_t r = lo; r < hi; r++) j->isa->dequant(W->type, row_ptr(W, r), 0, K, buf + (r - lo) * K);
        panel = buf;
    }
    float *out = j->out + lo;
    if (j->bias)
        for (int64_t n = 0; n < j->N; n++) memcpy(out + n * ldo, j->bias + lo, sizeof(float) * (size_t)P);
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, (int)j->N, (int)P, (int)K, 1.0f, j->x, (int)K, panel, (int)K,
                j->bias ? 1.0f : 0.0f, out, (int)ldo);
}

static void many_range(void *ctx, int64_t lo, int64_t hi, int tid) {
    const Job *j = ctx;
    for (int64_t a = lo; a < hi; a += j->step) many_panel(j, a, min64(hi, a + j->step), thread_buf(j, tid));
}

/* few rows, transposed: each chunk of `step` rows of W adds g[:, rows] @ W[rows] into its own partial sum
 * (chunk 0: out itself; chunk c: parts + (c-1) N K), summed in chunk order afterwards: the result does not
 * depend on which thread ran which chunk */
static void few_t_range(void *ctx, int64_t lo, int64_t hi, int tid) {
    const Job *j = ctx;
    const Mat *W = j->W;
    int64_t K = W->n_in, n_out = W->n_out;
    float *buf = thread_buf(j, tid); /* (TILE_ROWS, K) unless F32 in place */
    for (int64_t a = lo; a < hi; a += j->step) {
        int64_t c = a / j->step, b = min64(hi, a + j->step);
        float *acc = c ? j->parts + (c - 1) * j->N * K : j->out; /* (N, K) */
        memset(acc, 0, sizeof(float) * (size_t)(j->N * K));
        for (int64_t o = a; o < b; o += TILE_ROWS) {
            int nr = (int)min64(TILE_ROWS, b - o);
            const float *w[TILE_ROWS] = {NULL};
            for (int r = 0; r < nr; r++) {
                if (f32_in_place(W)) {
                    w[r] = (const float *)row_ptr(W, o + r);
                } else {
                    j->isa->dequant(W->type, row_ptr(W, o + r), 0, K, buf + r * K);
                    w[r] = buf + r * K;
                }
            }
            j->isa->axpy_tile(w, nr, j->x + o, n_out, j->N, K, acc, K);
        }
    }
}

/* out[i] += parts[0][i] + parts[1][i] + ... (in that order) for i in lo..hi-1 */
static void sum_parts_range(void *ctx, int64_t lo, int64_t hi, int tid) {
    const Job *j = ctx;
    int64_t size = j->N * j->W->n_in;
    for (int64_t c = 0; c < j->n_parts; c++) {
        const float *p = j->parts + c * size;
        for (int64_t i = lo; i < hi; i++) j->out[i] += p[i];
    }
}

/* many rows, transposed, columns lo..hi-1: out[:, lo:hi] = sum over row blocks of g[:, o0:o1] @ W[o0:o1, lo:hi] */
static void many_t_panel(const Job *j, int64_t lo, int64_t hi, float *buf /* (per / step, step) */) {
    const Mat *W = j->W;
    int64_t kc = hi - lo, K = W->n_in, n_out = W->n_out;
    int64_t rows = buf ? j->per / j->step : n_out; /* rows per block */
    for (int64_t o0 = 0; o0 < n_out; o0 += rows) {
        int64_t o1 = min64(n_out, o0 + rows), ldw = K;
        const float *panel = (const float *)row_ptr(W, o0) + lo; /* (o1-o0, kc), ldw apart */
        if (buf) {
            for (int64_t o = o0; o < o1; o++) j->isa->dequant(W->type, row_ptr(W, o), lo, hi, buf + (o - o0) * kc);
            panel = buf;
            ldw = kc;
        }
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, (int)j->N, (int)kc, (int)(o1 - o0), 1.0f, j->x + o0,
                    (int)n_out, panel, (int)ldw, o0 ? 1.0f : 0.0f, j->out + lo, (int)K);
    }
}

static void many_t_range(void *ctx, int64_t lo, int64_t hi, int tid) {
    const Job *j = ctx;
    for (int64_t a = lo; a < hi; a += j->step) many_t_panel(j, a, min64(hi, a + j->step), thread_buf(j, tid));
}

/* runs fn over n items in chunks of `step` with `per` floats of scratch per thread */
static int run(Pool *pool, Job *j, int64_t step, int64_t per, int64_t n, RangeFn fn) {
    j->step = step;
    j->per = per;
    j->scratch = NULL;
    if (per > 0) {
        j->scratch = malloc(sizeof(float) * (size_t)(per * pool_threads(pool)));
        if (!j->scratch) return -1;
    }
    pool_for(pool, n, step, fn, j);
    free(j->scratch);
    return 0;
}

int mat_mul_path(Pool *pool, float *out, const float *x, int64_t N, const Mat *W, const float *bias, int path) {
    int64_t rb, n_out = W->n_out, K = W->n_in;
    if (N < 0 || n_out < 0 || mat_row_bytes(W->type, K, &rb) || W->row_bytes != rb) return -1;
    if (N == 0 || n_out == 0) return 0;
    if (K == 0) {
        for (int64_t n = 0; n < N; n++)
            for (int64_t o = 0; o < n_out; o++) out[n * n_out + o] = bias ? bias[o] : 0.0f;
        return 0;
    }
    int threads = pool_threads(pool);
    int can_many = fits_int(N) && fits_int(n_out) && fits_int(K);
    if (path == MAT_AUTO) path = N >= mat_crossover(W->type, 0) ? MAT_MANY : MAT_FEW;
    Job j = {.isa = isa(), .W = W, .x = x, .N = N, .out = out, .bias = bias};
    if (path == MAT_MANY && can_many) {
        /* panels of P rows: P*K floats within PANEL_BYTES, a multiple of 8, two or more per thread */
        int64_t P = max64(8, PANEL_BYTES / (4 * K) / 8 * 8);
        P = min64(P, max64(8, round_up((n_out + 2 * threads - 1) / (2 * threads), 8)));
        return run(pool, &j, P, f32_in_place(W) ? 0 : P * K, n_out, many_range);
    }
    /* chunks of TILE_ROWS-multiples, about 8 per thread, at most 64 rows */
    int64_t step = round_up(min64(64, max64(TILE_ROWS, n_out / (8 * threads))), TILE_ROWS);
    return run(pool, &j, step, f32_in_place(W) ? 0 : TILE_ROWS * K, n_out, few_range);
}

int mat_mul(Pool *pool, float *out, const float *x, int64_t N, const Mat *W, const float *bias) {
    return mat_mul_path(pool, out, x, N, W, bias, MAT_AUTO);
}

int mat_mul_t_path(Pool *pool, float *out, const float *g, int64_t N, const Mat *W, int path) {
    int64_t rb, n_out = W->n_out, K = W->n_in;
    if (N < 0 || n_out < 0 || mat_row_bytes(W->type, K, &rb) || W->row_bytes != rb) return -1;
    if (N == 0 || K == 0) return 0;
    if (n_out == 0) {
        memset(out, 0, sizeof(float) * (size_t)(N * K));
        return 0;
    }
    int threads = pool_threads(pool);
    int64_t bs = quant_type((uint32_t)W->type)->block_size;
    int can_many = fits_int(N) && fits_int(n_out) && fits_int(K);
    if (path == MAT_AUTO) path = N >= mat_crossover(W->type, 1) ? MAT_MANY : MAT_FEW;
    Job j = {.isa = isa(), .W = W, .x = g, .N = N, .out = out};
    if (path == MAT_MANY && can_many) {
        /* column panels: about 2 per thread, 64..512 wide; row blocks within PANEL_BYTES */
        int64_t kc = round_up(min64(512, max64(64, K / (2 * threads))), bs);
        int64_t rows = max64(16, PANEL_BYTES / (4 * kc));
        return run(pool, &j, kc, f32_in_place(W) ? 0 : rows * kc, K, many_t_range);
    }
    /* chunks of rows, each summed into its own (N, K) partial: about 3 per thread while the partials
     * stay under half the weight bytes (they are written and summed once), at least one per thread */
    int64_t tiles = (n_out + TILE_ROWS - 1) / TILE_ROWS;
    int64_t chunks = min64(tiles, max64(threads, min64(3 * threads, n_out * rb / 2 / (4 * N * K) + 1)));
    if (threads == 1) chunks = 1;
    int64_t step = (tiles + chunks - 1) / chunks * TILE_ROWS;
    chunks = (n_out + step - 1) / step;
    j.n_parts = chunks - 1;
    if (j.n_parts && !(j.parts = malloc(sizeof(float) * (size_t)(j.n_parts * N * K)))) return -1;
    int rc = run(pool, &j, step, f32_in_place(W) ? 0 : TILE_ROWS * K, n_out, few_t_range);
    if (rc == 0 && j.n_parts) pool_for(pool, N * K, max64(4096, N * K / (4 * threads)), sum_parts_range, &j);
    free(j.parts);
    return rc;
}

int mat_mul_t(Pool *pool, float *out, const float *g, int64_t N, const Mat *W) {
    return mat_mul_t_path(pool, out, g, N, W, MAT_AUTO);
}
