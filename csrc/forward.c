/* The forward pass of a decoder-only transformer, one function per operation.
 * Numerics follow Hugging Face transformers in float32 (see each function). */
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "blas.h"
#include "factrace.h"
#include "pool.h"

/* Loops between the matrix products run on the pool (pool.c) in chunks of at least this many floats of
 * work, and in about 4 chunks per thread. */
#define PAR_MIN (1 << 14)

/* The elementwise loops with exps (activations, softmax over the vocabulary) are compiled for AVX-512
 * and AVX2 too, picked at load time (GCC function multiversioning on x86-64 Linux); the arithmetic is
 * the same IEEE operations in every version (no FMA contraction under -std=c11). */
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define VECTOR_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define VECTOR_CLONES
#endif

/* Chunk size for a loop of n items of `per_item` floats each. */
static int64_t grain_of(const Pool *pool, int64_t n, int64_t per_item) {
    int64_t g = (n + 4 * pool_threads(pool) - 1) / (4 * pool_threads(pool));
    int64_t min_items = (PAR_MIN + per_item - 1) / (per_item > 0 ? per_item : 1);
    return g > min_items ? g : min_items;
}

/* ------------------------------------------------------------------------------------------ */
/* elementary operations                                                                       */

typedef struct { float *out; const float *bias; int n_out; } BiasLoop;

static void bias_fill_range(void *ctx, int64_t lo, int64_t hi, int tid) {
    BiasLoop *a = ctx;
    for (int64_t i = lo; i < hi; i++) memcpy(a->out + i * a->n_out, a->bias, sizeof(float) * a->n_out);
}

/* out (N, n_out) = x (N, n_in) @ W^T (W: (n_out, n_in)) + bias (n_out,). With a bias, out starts as the
 * bias rows and the product is accumulated into it (beta = 1), as torch's addmm does for nn.Linear. */
static void matmul(Pool *pool, float *out, const float *x, const float *W, const float *bias, int64_t N, int n_in,
                   int n_out) {
    if (N <= 0) return;
    if (bias) {
        BiasLoop a = {out, bias, n_out};
        pool_for(pool, N, grain_of(pool, N, n_out), bias_fill_range, &a);
    }
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, (int)N, n_out, n_in, 1.0f, x, n_in, W, n_in,
                bias ? 1.0f : 0.0f, out, n_out);
}

typedef struct { float *x; const float *y; } AddLoop;

static void add_range(void *ctx, int64_t lo, int64_t hi, int tid) {
    AddLoop *a = ctx;
    for (int64_t i = lo; i < hi; i++) a->x[i] += a->y[i];
}

/* x (n,) += y (n,) */
static void add_into(Pool *pool, float *x, const float *y, int64_t n) {
    AddLoop a = {x, y};
    pool_for(pool, n, grain_of(pool, n, 1), add_range, &a);
}

/* One row of a norm. LayerNorm: (x - mean) / sqrt(var + eps) * w + b (biased variance, like torch).
 * RMSNorm: w * (x * rsqrt(mean(x^2) + eps)) like HF's LlamaRMSNorm (Gemma's (1 + w) folded into w).
 * Returns the factor 1/sqrt(...) so callers can decompose the norm linearly. */
static float norm_row(float *out, const float *x, int d, const float *w, const float *b, float eps, int kind) {
    if (kind == NORM_LAYER) {
        double s = 0.0;
        for (int i = 0; i < d; i++) s += x[i];
        float mean = (float)(s / d);
        double v = 0.0;
        for (int i = 0; i < d; i++) {
            double c = (double)x[i] - mean;
            v += c * c;
        }
        float rs = 1.0f / sqrtf((float)(v / d) + eps);
        for (int i = 0; i < d; i++) {
            float y = (x[i] - mean) * rs;
            out[i] = w ? y * w[i] + (b ? b[i] : 0.0f) : y;
        }
        return rs;
    }
    double s = 0.0;
    for (int i = 0; i < d; i++) s += (double)x[i] * x[i];
    float rs = 1.0f / sqrtf((float)(s / d) + eps);
    for (int i = 0; i < d; i++) {
        float y = x[i] * rs;
        out[i] = w ? w[i] * y : y;
    }
    return rs;
}

typedef struct { float *out, *scale; const float *x, *w, *b; int d, kind; float eps; } NormLoop;

static void norm_range(void *ctx, int64_t lo, int64_t hi, int tid) {
    NormLoop *a = ctx;
    for (int64_t i = lo; i < hi; i++) {
        float rs = norm_row(a->out + i * a->d, a->x + i * a->d, a->d, a->w, a->b, a->eps, a->kind);
        if (a->scale) a->scale[i] = rs;
    }
}

/* out (N, d) = norm(x (N, d)) (in place when out == x); scale (N,) optional */
static void norm_rows(Pool *pool, float *out, float *scale, const float *x, int64_t N, int d, const float *w,
                      const float *b, float eps, int kind) {
    NormLoop a = {out, scale, x, w, b, d, kind, eps};
    pool_for(pool, N, grain_of(pool, N, d), norm_range, &a);
}

/* exp(x) in float32 for the activations and the softmax over the vocabulary: x = n ln2 + r (two-part
 * ln2), exp(r) by Cephes' degree-6 polynomial, times 2^n built in the exponent bits. Largest relative
 * error 8e-8 (glibc's expf: 6e-8), branch-free so that loops of it vectorize; x clamped to
 * [-87, 88] (exp(-87) = 1.6e-38 stands in for anything smaller); callers keep NaN themselves (x / (1 + e)
 * is NaN for x = NaN). */
static inline float fast_expf(float x) {
    x = x > -87.0f ? x : -87.0f; /* NaN -> -87: the conversion to int below stays defined */
    x = x < 88.0f ? x : 88.0f;
    float n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f; /* round(x / ln2) */
    float r = x - n * 0.693359375f + n * 2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    float y = p * r * r + r + 1.0f;
    int32_t bits = ((int32_t)n + 127) << 23;
    float scale;
    memcpy(&scale, &bits, sizeof scale);
    return y * scale;
}

/* SiLU x sigmoid(x) = x / (1 + exp(-x)) */
static inline float silu(float x) { return x / (1.0f + fast_expf(-x)); }

/* tanh-approximated GELU (gelu_new, gelu_pytorch_tanh): 0.5 x (1 + tanh(u)), u = sqrt(2/pi) (x + 0.044715
 * x^3), written as x / (1 + exp(-2u)) (the same function, one exp) */
static inline float gelu_tanh(float x) {
    const float k = 0.7978845608028654f; /* sqrt(2 / pi) */
    float u = k * (x + 0.044715f * x * x * x);
    return x / (1.0f + fast_expf(-2.0f * u));
}

static inline float act_one(float x, int act) {
    switch (act) {
    case ACT_SILU: return silu(x);
    case ACT_GELU_ERF: return 0.5f * x * (1.0f + erff(x * 0.70710678118654752f));
    case ACT_RELU: return x > 0.0f ? x : 0.0f;
    default: return gelu_tanh(x);
    }
}

/* Rotary embedding of one head vector (dh,), rotate-half convention of HF Llama:
 * out[i] = x[i] cos_i - x[i + dh/2] sin_i,  out[i + dh/2] = x[i + dh/2] cos_i + x[i] sin_i,
 * with angle_i = pos * inv_freq[i] computed in float32 and cos/sin multiplied by mscale. */
static void rope_head(float *x, int dh, int pos, const float *inv_freq, float mscale) {
    int half = dh / 2;
    for (int i = 0; i < half; i++) {
        float ang = (float)pos * inv_freq[i];
        float c = cosf(ang) * mscale, s = sinf(ang) * mscale;
        float a = x[i], b2 = x[i + half];
        x[i] = a * c - b2 * s;
        x[i + half] = b2 * c + a * s;
    }
}

/* Rotary embedding of the first `rot` dims of one head vector in the interleaved convention of GPT-J
 * (pairs (2i, 2i+1)): out[2i] = x[2i] cos_i - x[2i+1] sin_i, out[2i+1] = x[2i+1] cos_i + x[2i] sin_i,
 * angle_i = pos * inv_freq[i] in float32, cos/sin times mscale; dims rot .. dh-1 pass through. */
static void rope_head_interleaved(float *x, int rot, int pos, const float *inv_freq, float mscale) {
    for (int i = 0; i < rot / 2; i++) {
        float ang = (float)pos * inv_freq[i];
        float c = cosf(ang) * mscale, s = sinf(ang) * mscale;
        float a = x[2 * i], b2 = x[2 * i + 1];
        x[2 * i] = a * c - b2 * s;
        x[2 * i + 1] = b2 * c + a * s;
    }
}

typedef struct { float *up; const float *gate; int act; } ActLoop;

/* up = act(gate) * up (gated MLP) or act(up); one loop per common activation so that it vectorizes */
VECTOR_CLONES static void act_range(void *ctx, int64_t lo, int64_t hi, int tid) {
    ActLoop *a = ctx;
    float *up = a->up;
    const float *g = a->gate;
    if (g && a->act == ACT_SILU)
        for (int64_t i = lo; i < hi; i++) up[i] = silu(g[i]) * up[i];
    else if (g && a->act == ACT_GELU_TANH)
        for (int64_t i = lo; i < hi; i++) up[i] = gelu_tanh(g[i]) * up[i];
    else if (g)
        for (int64_t i = lo; i < hi; i++) up[i] = act_one(g[i], a->act) * up[i];
    else if (a->act == ACT_GELU_TANH)
        for (int64_t i = lo; i < hi; i++) up[i] = gelu_tanh(up[i]);
    else
        for (int64_t i = lo; i < hi; i++) up[i] = act_one(up[i], a->act);
}

/* out (N, d) = MLP(x (N, d)): h = norm(x); down(act(gate h) * up h) or down(act(up h)); Gemma: then the
 * post-MLP norm. h (N, d), up, gate (N, F) scratch. */
static void mlp_rows(Pool *pool, float *out, float *h, float *up, float *gate, const float *x, int64_t N,
                     const LayerWeights *lw, const Config *c) {
    int d = c->d_model, F = c->d_mlp;
    norm_rows(pool, h, NULL, x, N, d, lw->ln2_w, lw->ln2_b, c->norm_eps, c->norm);
    matmul(pool, up, h, lw->W_up, lw->b_up, N, d, F);
    if (c->gated_mlp) matmul(pool, gate, h, lw->W_gate, lw->b_gate, N, d, F);
    ActLoop a = {up, c->gated_mlp ? gate : NULL, c->act};
    pool_for(pool, N * F, grain_of(pool, N * F, 8), act_range, &a);
    matmul(pool, out, up, lw->W_down, lw->b_down, N, F, d);
    if (c->post_norms) norm_rows(pool, out, NULL, out, N, d, lw->post_mlp_norm_w, NULL, c->norm_eps, NORM_RMS);
}

/* Per-head RMSNorm (Qwen3/Gemma q_norm, k_norm) in place: x (n_vec, dh) */
static void head_norm_rows(Pool *pool, float *x, int64_t n_vec, int dh, const float *w, float eps) {
    norm_rows(pool, x, NULL, x, n_vec, dh, w, NULL, eps, NORM_RMS);
}

typedef struct { float *x; int nh, dh; const int *pos; const float *inv; float ms; int rot, interleaved; } RopeLoop;

/* rotate-half on the first rot dims of each head is rope_head of a rot-dim vector (partial rotary,
 * GPT-NeoX: rot = dh * rotary_pct); the other dims are not touched */
static void rope_range(void *ctx, int64_t lo, int64_t hi, int tid) {
    RopeLoop *a = ctx;
    for (int64_t r = lo; r < hi; r++)
        for (int h = 0; h < a->nh; h++) {
            float *xh = a->x + (r * a->nh + h) * a->dh;
            if (a->interleaved) rope_head_interleaved(xh, a->rot, a->pos[r], a->inv, a->ms);
            else rope_head(xh, a->rot, a->pos[r], a->inv, a->ms);
        }
}

/* Rotary embedding in place of x (N, nh*dh), row r at absolute position pos[r], with layer l's table */
static void rope_rows(Pool *pool, float *x, int64_t N, int nh, const int *pos, const Config *c, int l) {
    int dh = c->d_head, tbl = c->layer_rope ? c->layer_rope[l] : 0, rot = c->rope_dim > 0 ? c->rope_dim : dh;
    RopeLoop a = {x, nh, dh, pos, c->rope_inv_freq + (int64_t)tbl * (rot / 2), c->rope_mscale[tbl], rot,
                  c->rope_interleaved};
    pool_for(pool, N, grain_of(pool, N, (int64_t)nh * dh * 8), rope_range, &a);
}

/* ------------------------------------------------------------------------------------------ */
/* attention                                                                                    */

/* Sequences with at least this many new rows attend through matrix products (attend_heads_gemm). */
#define ATTN_GEMM_MIN_ROWS 32

/* Softmax of one row of scores in place (used by both attention paths): keys j < lo or
 * j > pos or blocked (bl[j] = 1) get probability 0; s[j] = raw q.k for the others (scaled and softcapped
 * here). Returns 0, or -1 (row zeroed) when every key is masked. */
static int softmax_row(float *s, int P, int lo, int pos, const unsigned char *bl, const Config *c) {
    float mx = -INFINITY;
    for (int j = 0; j < P; j++) {
        if (j < lo || j > pos || (bl && bl[j])) {
            s[j] = -INFINITY;
            continue;
        }
        float v = s[j] * c->attn_scale;
        if (c->attn_softcap > 0.0f) v = c->attn_softcap * tanhf(v / c->attn_softcap);
        s[j] = v;
        if (v > mx) mx = v;
    }
    if (mx == -INFINITY) {
        memset(s, 0, sizeof(float) * P);
        return -1;
    }
    float sum = 0.0f;
    for (int j = 0; j < P; j++) {
        float e = s[j] == -INFINITY ? 0.0f : expf(s[j] - mx);
        s[j] = e;
        sum += e;
    }
    float inv = 1.0f / sum;
    for (int j = 0; j < P; j++) s[j] *= inv;
    return 0;
}

/* attend_sequence through two sgemms per head (same arguments; sw: (n, P) scratch, or NULL when probs
 * is given, whose (H, n, P) blocks are then used in place). Per head h with kv head kh:
 *   S (n, P) = q[:, h] (n, dh; row stride H*dh) @ k[:, kh]^T (dh, P; k rows of stride KV*dh)
 *   S = softmax_row(S[i]) per row (masked entries exactly 0)
 *   z[:, h] (n, dh; row stride H*dh) = S (n, P) @ v[:, kh] (P, dh; row stride KV*dh)
 * A fully masked row gives z = 0, like the loop. */
static void attend_heads_gemm(float *z, float *probs, const float *q, const float *kall, const float *vall, int n,
                              int start, const Config *c, int window, const unsigned char *blocked, float *sw) {
    int H = c->n_heads, dh = c->d_head, kvd = c->n_kv_heads * dh, group = c->n_heads / c->n_kv_heads;
    int qd = H * dh, P = start + n;
    for (int h = 0; h < H; h++) {
        int kh = h / group;
        float *S = probs ? probs + (int64_t)h * n * P : sw;
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, n, P, dh, 1.0f, q + h * dh, qd, kall + kh * dh, kvd,
                    0.0f, S, P);
        for (int i = 0; i < n; i++) {
            int pos = start + i;
            int lo = (window > 0 && pos - window + 1 > 0) ? pos - window + 1 : 0;
            softmax_row(S + (int64_t)i * P, P, lo, pos, blocked ? blocked + (int64_t)i * P : NULL, c);
        }
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, n, dh, P, 1.0f, S, P, vall + kh * dh, kvd, 0.0f,
                    z + h * dh, qd);
    }
}

/* Causal (optionally sliding-window) attention of one sequence for all heads.
 * q (n, H*dh) rows of this sequence at absolute positions start .. start+n-1 (row stride H*dh)
 * kall, vall (P, KV*dh) keys/values of positions 0 .. P-1 with P = start + n
 * z (n, H*dh) output; probs (H, n, P) optional; blocked (n, P) bytes optional (1 = edge removed). */
static void attend_sequence(float *z, float *probs, const float *q, const float *kall, const float *vall, int n,
                            int start, const Config *c, int window, const unsigned char *blocked,
                            const unsigned char *want /* (n,) rows to compute, or NULL: all */,
                            float *scores /* (P,) scratch */) {
    int H = c->n_heads, dh = c->d_head, kvd = c->n_kv_heads * dh, group = c->n_heads / c->n_kv_heads;
    int P = start + n;
    if (n >= ATTN_GEMM_MIN_ROWS && !want) { /* long sequence: matrix products per head */
        float *sw = probs ? NULL : malloc(sizeof(float) * (size_t)n * P);
        if (probs || sw) {
            attend_heads_gemm(z, probs, q, kall, vall, n, start, c, window, blocked, sw);
            free(sw);
            return;
        }
    } /* short sequence (or no memory for the scratch): dot products, softmax_row, weighted sum */
    for (int h = 0; h < H; h++) {
        int kh = h / group;
        for (int i = 0; i < n; i++) {
            if (want && !want[i]) continue; /* z and probs rows of unwanted queries are left untouched */
            int pos = start + i;
            int lo = (window > 0 && pos - window + 1 > 0) ? pos - window + 1 : 0;
            const float *qi = q + (int64_t)i * H * dh + h * dh;
            for (int j = lo; j <= pos; j++) {
                const float *kj = kall + (int64_t)j * kvd + kh * dh;
                float s = 0.0f;
                for (int t = 0; t < dh; t++) s += qi[t] * kj[t];
                scores[j] = s;
            }
            softmax_row(scores, P, lo, pos, blocked ? blocked + (int64_t)i * P : NULL, c);
            float *zi = z + (int64_t)i * H * dh + h * dh;
            memset(zi, 0, sizeof(float) * dh);
            if (probs) memcpy(probs + ((int64_t)h * n + i) * P, scores, sizeof(float) * P);
            for (int j = lo; j <= pos; j++) {
                float a = scores[j];
                if (a == 0.0f) continue;
                const float *vj = vall + (int64_t)j * kvd + kh * dh;
                for (int t = 0; t < dh; t++) zi[t] += a * vj[t];
            }
        }
    }
}

/* ------------------------------------------------------------------------------------------ */
/* interventions                                                                                */

/* Apply the patches of (site, layer) to x (N, d); want (N,) optional: only to these rows. */
static void apply_patches(float *x, int d, int site, int layer, const Patch *p, int64_t np,
                          const unsigned char *want) {
    for (int64_t i = 0; i < np; i++) {
        if (p[i].site != site || p[i].layer != layer || (want && !want[p[i].row])) continue;
        float *r = x + p[i].row * d;
        if (p[i].op == OP_ZERO) memset(r, 0, sizeof(float) * d);
        else if (p[i].op == OP_SET) memcpy(r, p[i].value, sizeof(float) * d);
        else for (int j = 0; j < d; j++) r[j] += p[i].value[j];
    }
}

typedef struct {
    float *z, *probs;
    int64_t attn_total;
    const float *q, *k, *v;
    const Batch *b;
    int l, window;
    const Config *c;
    const EdgeBlock *blocks;
    int64_t n_blocks;
    const int64_t *row0, *attn_off;
    int64_t maxn, maxP;
    const unsigned char *want;
    int failed;
} AttnLoop;

/* Sequences lo .. hi-1 of attention_layer, with their own scratch. */
static void attn_range(void *ctx, int64_t lo, int64_t hi, int tid) {
    AttnLoop *a = ctx;
    const Config *c = a->c;
    const Batch *b = a->b;
    int H = c->n_heads, kvd = c->n_kv_heads * c->d_head, qd = H * c->d_head, l = a->l;
    int64_t maxn = a->maxn, maxP = a->maxP;
    /* scratch: keys/values (P, KV*dh), scores (P,), blocked (n, P), probs (H, n, P) */
    float *kall = malloc(sizeof(float) * maxP * kvd), *vall = malloc(sizeof(float) * maxP * kvd);
    float *scores = malloc(sizeof(float) * (maxP + 1));
    unsigned char *blocked = a->n_blocks > 0 ? malloc((size_t)(maxn * maxP)) : NULL;
    float *tmp = a->probs ? malloc(sizeof(float) * (size_t)H * maxn * maxP) : NULL;
    if (!kall || !vall || !scores || (a->n_blocks > 0 && !blocked) || (a->probs && !tmp)) {
        __atomic_store_n(&a->failed, 1, __ATOMIC_RELAXED);
        lo = hi;
    }
    for (int64_t i = lo; i < hi; i++) {
        int n = b->len[i], st = b->start[i], P = st + n;
        int64_t r0 = a->row0[i];
        if (a->want) { /* skip sequences with no wanted row */
            int any = 0;
            for (int t = 0; t < n && !any; t++) any = a->want[r0 + t];
            if (!any) continue;
        }
        if (st > 0) {
            memcpy(kall, b->pk[i] + l * b->pstride, sizeof(float) * st * kvd);
            memcpy(vall, b->pv[i] + l * b->pstride, sizeof(float) * st * kvd);
        }
        memcpy(kall + (int64_t)st * kvd, a->k + r0 * kvd, sizeof(float) * n * kvd);
        memcpy(vall + (int64_t)st * kvd, a->v + r0 * kvd, sizeof(float) * n * kvd);
        unsigned char *blk = NULL;
        for (int64_t e = 0; e < a->n_blocks; e++) {
            const EdgeBlock *eb = &a->blocks[e];
            if (eb->layer != l || eb->row < r0 || eb->row >= r0 + n || eb->key < 0 || eb->key >= P) continue;
            if (!blk) memset(blocked, 0, (size_t)n * P);
            blk = blocked;
            blocked[(eb->row - r0) * P + eb->key] = 1;
        }
        attend_sequence(a->z + r0 * qd, tmp, a->q + r0 * qd, kall, vall, n, st, c, a->window, blk,
                        a->want ? a->want + r0 : NULL, scores);
        if (tmp) /* layout (H, attn_total): per head, this sequence's (n, P) block */
            for (int h = 0; h < H; h++)
                memcpy(a->probs + (int64_t)h * a->attn_total + a->attn_off[i], tmp + (int64_t)h * n * P,
                       sizeof(float) * n * P);
    }
    free(kall); free(vall); free(scores); free(blocked); free(tmp);
}

/* One layer's attention for every sequence of the batch (on the pool, over sequences, when all are
 * short; long ones attend through matrix products, one sequence at a time). q (N, H*dh), k, v (N, KV*dh)
 * this layer's new rows; each sequence's keys/values are its prefix cache rows followed by its new rows.
 * z (N, H*dh) output; probs (H, attn_total) optional, laid out per head as each sequence's (n, P) block
 * at attn_off[s]; want (N,) optional: only these query rows are computed (their q rows are the only
 * ones read); maxn, maxP: the largest new-row count and key count of a sequence (scratch sizes).
 * Returns 0, or -1 if out of memory. */
static int attention_layer(Pool *pool, float *z, float *probs, int64_t attn_total, const float *q, const float *k,
                           const float *v, const Batch *b, int l, const Config *c, const EdgeBlock *blocks,
                           int64_t n_blocks, const int64_t *row0, const int64_t *attn_off, int64_t maxn,
                           int64_t maxP, const unsigned char *want) {
    AttnLoop a = {z, probs, attn_total, q, k, v, b, l, c->layer_window ? c->layer_window[l] : 0, c, blocks,
                  n_blocks, row0, attn_off, maxn, maxP, want, 0};
    int64_t per_seq = 4 * maxn * maxP * c->n_heads * c->d_head; /* ~ floats of work per sequence */
    Pool *p = maxn < ATTN_GEMM_MIN_ROWS ? pool : NULL;
    pool_for(p, b->n_seq, grain_of(p, b->n_seq, per_seq), attn_range, &a);
    return a.failed ? -1 : 0;
}

/* ------------------------------------------------------------------------------------------ */
/* unembedding                                                                                  */

/* logits (n, V) = h (n, d) @ W_U^T (+ b_U, GPT-J), then the final softcap (Gemma 2 style) if any */
static void unembed(Pool *pool, float *logits, const float *h, int64_t n, const Model *m) {
    const Config *c = &m->cfg;
    int64_t V = c->vocab_size;
    matmul(pool, logits, h, m->w.W_U, m->w.b_U, n, c->d_model, (int)V);
    if (c->final_softcap > 0.0f)
        for (int64_t i = 0; i < n * V; i++) logits[i] = c->final_softcap * tanhf(logits[i] / c->final_softcap);
}

typedef struct { const float *logits; int64_t V; const int64_t *target; double *prob; } TargetLoop;

/* Per row: softmax probability of the target token, p = exp(x_t - max - log(sum_j exp(x_j - max))), the
 * exps in float32 (fast_expf) summed in blocks of 8 float lanes x 32 terms, the blocks in float64. */
VECTOR_CLONES static void target_range(void *ctx, int64_t lo, int64_t hi, int tid) {
    TargetLoop *a = ctx;
    int64_t V = a->V, V8 = V / 8 * 8;
    for (int64_t i = lo; i < hi; i++) {
        const float *x = a->logits + i * a->V;
        float m8[8];
        for (int k = 0; k < 8; k++) m8[k] = -INFINITY;
        for (int64_t j = 0; j < V8; j += 8)
            for (int k = 0; k < 8; k++) m8[k] = x[j + k] > m8[k] ? x[j + k] : m8[k];
        float mx = -INFINITY;
        for (int k = 0; k < 8; k++) mx = m8[k] > mx ? m8[k] : mx;
        for (int64_t j = V8; j < V; j++) mx = x[j] > mx ? x[j] : mx;
        double sum = 0.0;
        int64_t j = 0;
        for (; j + 256 <= V; j += 256) {
            float acc[8] = {0};
            for (int64_t u = j; u < j + 256; u += 8)
                for (int k = 0; k < 8; k++) acc[k] += fast_expf(x[u + k] - mx);
            for (int k = 0; k < 8; k++) sum += acc[k];
        }
        for (; j < V; j++) sum += fast_expf(x[j] - mx);
        a->prob[i] = exp((double)x[a->target[i]] - (double)mx - log(sum));
    }
}

/* ------------------------------------------------------------------------------------------ */
/* the forward pass                                                                             */

typedef struct {
    Pool *pool;               /* threads for the loops between matrix products, or NULL */
    float *x, *h, *q, *k, *v, *z, *a, *up, *gate, *tmp, *rs;
    float *x0;                /* (N, d) the block input, read by a parallel block's MLP, or NULL */
    int64_t *row0, *attn_off; /* (S,) first row and attention-probability offset of each sequence */
    int *pos;                 /* (N,) absolute position of each row */
    unsigned char *want;      /* (N,) rows read after the last block (last-block pruning), or NULL */
    unsigned char *set;       /* (N,) rows whose MLP output a patch sets (not computed) */
    int64_t *krow;            /* (N,) the other rows */
    int64_t *wrow;            /* (nw,) those rows in order */
    int *wpos;                /* (nw,) their positions */
} Scratch;

static void scratch_free(Scratch *s) {
    free(s->x); free(s->h); free(s->q); free(s->k); free(s->v); free(s->z); free(s->a);
    free(s->up); free(s->gate); free(s->tmp); free(s->rs); free(s->row0); free(s->attn_off); free(s->pos);
    free(s->want); free(s->wrow); free(s->wpos); free(s->set); free(s->krow); free(s->x0);
    pool_free(s->pool);
}

/* dst (n, w) = rows idx[0..n) of src (., w) */
static void gather_rows(float *dst, const float *src, const int64_t *idx, int64_t n, int w) {
    for (int64_t i = 0; i < n; i++) memcpy(dst + i * w, src + idx[i] * w, sizeof(float) * w);
}

/* rows idx[0..n) of dst (., w) = src (n, w) */
static void scatter_rows(float *dst, const float *src, const int64_t *idx, int64_t n, int w) {
    for (int64_t i = 0; i < n; i++) memcpy(dst + idx[i] * w, src + i * w, sizeof(float) * w);
}

/* rows idx[0..n) of x (., d) += the same rows of a */
static void add_rows_at(float *x, const float *a, const int64_t *idx, int64_t n, int d) {
    for (int64_t i = 0; i < n; i++)
        for (int j = 0; j < d; j++) x[idx[i] * d + j] += a[idx[i] * d + j];
}

/* The MLP of block l for every row of s->x (a parallel block: of its input s->x0) into s->a, except rows
 * whose output a SET patch of (SITE_MLP_OUT, l) replaces: those are not computed (zeros until the patch
 * sets them). */
static void mlp_block(Scratch *s, const LayerWeights *lw, const Config *c, int l, const Patch *p, int64_t np,
                      int64_t N) {
    int d = c->d_model;
    const float *xin = c->parallel ? s->x0 : s->x;
    int any = 0;
    for (int64_t i = 0; i < np; i++)
        if (p[i].site == SITE_MLP_OUT && p[i].layer == l && p[i].op == OP_SET) {
            if (!any) memset(s->set, 0, (size_t)N);
            any = 1;
            s->set[p[i].row] = 1;
        }
    if (!any) {
        mlp_rows(s->pool, s->a, s->h, s->up, s->gate, xin, N, lw, c);
        return;
    }
    int64_t nk = 0; /* gather the computed rows into tmp (nk, d); MLP into h (a as scratch); scatter */
    for (int64_t r = 0; r < N; r++)
        if (!s->set[r]) s->krow[nk++] = r;
    gather_rows(s->tmp, xin, s->krow, nk, d);
    mlp_rows(s->pool, s->h, s->a, s->up, s->gate, s->tmp, nk, lw, c);
    for (int64_t r = 0; r < N; r++)
        if (s->set[r]) memset(s->a + r * d, 0, sizeof(float) * d);
    scatter_rows(s->a, s->h, s->krow, nk, d);
}

/* The last block when only the rows s->wrow[0..nw) (mask s->want) are read afterwards, for their
 * logits: keys and values for every row (the wanted rows attend to them); the query, attention, W_O and
 * the MLP for the wanted rows only, gathered into compact (nw, .) buffers. Row for row the operations
 * of the full block; the other rows of x keep the block's input. Returns 0, or -1 if out of memory. */
static int last_block_rows(Scratch *s, const Model *m, const Batch *b, int64_t nw, int64_t N, const Patch *patches,
                           int64_t n_patches, const EdgeBlock *blocks, int64_t n_blocks, int64_t maxn, int64_t maxP) {
    const Config *c = &m->cfg;
    int l = c->n_layers - 1, d = c->d_model, H = c->n_heads, dh = c->d_head, KV = c->n_kv_heads;
    int qd = H * dh, kvd = KV * dh;
    const LayerWeights *lw = &m->w.layers[l];
    const int64_t *wrow = s->wrow;

    /* h = norm(x) (N, d); keys and values (N, KV*dh) of every row */
    norm_rows(s->pool, s->h, NULL, s->x, N, d, lw->ln1_w, lw->ln1_b, c->norm_eps, c->norm);
    matmul(s->pool, s->k, s->h, lw->W_K, lw->b_K, N, d, kvd);
    matmul(s->pool, s->v, s->h, lw->W_V, lw->b_V, N, d, kvd);
    if (c->qk_norm) head_norm_rows(s->pool, s->k, N * KV, dh, lw->k_norm_w, c->norm_eps);
    if (c->rope) rope_rows(s->pool, s->k, N, KV, s->pos, c, l);

    /* queries of the wanted rows: h rows gathered into tmp (nw, d), q into z (nw, H*dh), then scattered */
    gather_rows(s->tmp, s->h, wrow, nw, d);
    for (int64_t i = 0; i < nw; i++) s->wpos[i] = s->pos[wrow[i]];
    matmul(s->pool, s->z, s->tmp, lw->W_Q, lw->b_Q, nw, d, qd);
    if (c->qk_norm) head_norm_rows(s->pool, s->z, nw * H, dh, lw->q_norm_w, c->norm_eps);
    if (c->rope) rope_rows(s->pool, s->z, nw, H, s->wpos, c, l);
    scatter_rows(s->q, s->z, wrow, nw, qd);
    if (attention_layer(s->pool, s->z, NULL, 0, s->q, s->k, s->v, b, l, c, blocks, n_blocks, s->row0, s->attn_off,
                        maxn, maxP, s->want))
        return -1;

    /* attn_out of the wanted rows: z gathered into q (nw, H*dh), projected into h (nw, d), scattered into a */
    gather_rows(s->q, s->z, wrow, nw, qd);
    matmul(s->pool, s->h, s->q, lw->W_O, lw->b_O, nw, qd, d);
    if (c->post_norms) norm_rows(s->pool, s->h, NULL, s->h, nw, d, lw->post_attn_norm_w, NULL, c->norm_eps, NORM_RMS);
    scatter_rows(s->a, s->h, wrow, nw, d);
    apply_patches(s->a, d, SITE_ATTN_OUT, l, patches, n_patches, s->want);

    /* x += attn_out; the MLP of the gathered rows tmp (nw, d) into h (a as its scratch, free once added to
     * x), scattered into a; x += mlp_out. A parallel block's MLP reads the rows before the attention add. */
    if (c->parallel) gather_rows(s->tmp, s->x, wrow, nw, d);
    add_rows_at(s->x, s->a, wrow, nw, d);
    if (!c->parallel) gather_rows(s->tmp, s->x, wrow, nw, d);
    mlp_rows(s->pool, s->h, s->a, s->up, s->gate, s->tmp, nw, lw, c);
    scatter_rows(s->a, s->h, wrow, nw, d);
    apply_patches(s->a, d, SITE_MLP_OUT, l, patches, n_patches, s->want);
    add_rows_at(s->x, s->a, wrow, nw, d);
    apply_patches(s->x, d, SITE_RESID_POST, l, patches, n_patches, s->want);
    return 0;
}

#define FAIL(...) do { snprintf(err, errlen, __VA_ARGS__); goto done; } while (0)

int model_forward(const Model *m, const Batch *b, const int32_t *ids, const float *resid_in, int start_layer, int end_layer,
                  const Patch *patches, int64_t n_patches, const EdgeBlock *blocks, int64_t n_blocks,
                  Capture *cap, char *err, size_t errlen) {
    const Config *c = &m->cfg;
    const Weights *w = &m->w;
    int d = c->d_model, H = c->n_heads, dh = c->d_head, KV = c->n_kv_heads, F = c->d_mlp, L = c->n_layers;
    int qd = H * dh, kvd = KV * dh;
    int rc = -1;
    Scratch s = {0};

    int64_t N = 0, maxP = 0, maxn = 0, attn_total = 0;
    for (int i = 0; i < b->n_seq; i++) {
        N += b->len[i];
        int64_t P = (int64_t)b->start[i] + b->len[i];
        if (P > maxP) maxP = P;
        if (b->len[i] > maxn) maxn = b->len[i];
        attn_total += (int64_t)b->len[i] * P;
    }
    s.x = malloc(sizeof(float) * N * d);
    s.h = malloc(sizeof(float) * N * d);
    s.a = malloc(sizeof(float) * N * d);
    s.q = malloc(sizeof(float) * N * qd);
    s.z = malloc(sizeof(float) * N * qd);
    s.k = malloc(sizeof(float) * N * kvd);
    s.v = malloc(sizeof(float) * N * kvd);
    s.up = malloc(sizeof(float) * N * F);
    s.gate = malloc(sizeof(float) * N * F);
    s.tmp = malloc(sizeof(float) * ((cap->logit_rows && cap->n_logit_rows > N) ? cap->n_logit_rows : N) * d);
    s.rs = malloc(sizeof(float) * (N + 1));
    s.row0 = malloc(sizeof(int64_t) * b->n_seq);
    s.attn_off = malloc(sizeof(int64_t) * b->n_seq);
    s.pos = malloc(sizeof(int) * (N + 1));
    s.set = malloc((size_t)N + 1);
    s.krow = malloc(sizeof(int64_t) * (N + 1));
    if (c->parallel) s.x0 = malloc(sizeof(float) * N * d);
    if (!s.x || !s.h || !s.a || !s.q || !s.z || !s.k || !s.v || !s.up || !s.gate || !s.tmp || !s.rs || !s.row0 ||
        !s.attn_off || !s.pos || !s.set || !s.krow || (c->parallel && !s.x0))
        FAIL("out of memory for a batch of %lld rows", (long long)N);
    int64_t *row0 = s.row0, *attn_off = s.attn_off;
    if (N * d >= 4 * PAR_MIN) s.pool = pool_new(openblas_get_num_threads()); /* NULL: loops run serially */

    /* Last-block pruning: when only some rows' logits are wanted and no per-layer state or resid_final is
     * captured, the last block computes the wanted rows only (plus every row's keys and values). */
    int64_t nw = 0;
    int prune = end_layer == L && start_layer < L && cap->logit_rows && cap->n_logit_rows < N && !cap->resid_pre &&
                !cap->resid_mid && !cap->attn_out && !cap->mlp_out && !cap->head_out && !cap->attn && !cap->z &&
                !cap->norm_scale_attn && !cap->k_cache && !cap->v_cache && !cap->resid_final;
    if (prune) {
        s.want = calloc((size_t)N, 1);
        s.wrow = malloc(sizeof(int64_t) * N);
        s.wpos = malloc(sizeof(int) * N);
        if (!s.want || !s.wrow || !s.wpos) FAIL("out of memory for a batch of %lld rows", (long long)N);
        for (int64_t i = 0; i < cap->n_logit_rows; i++) s.want[cap->logit_rows[i]] = 1;
        for (int64_t r = 0; r < N; r++)
            if (s.want[r]) s.wrow[nw++] = r;
    }
    for (int64_t i = 0, r = 0, off = 0; i < b->n_seq; i++) {
        row0[i] = r;
        attn_off[i] = off;
        for (int t = 0; t < b->len[i]; t++) s.pos[r + t] = b->start[i] + t;
        r += b->len[i];
        off += (int64_t)b->len[i] * (b->start[i] + b->len[i]);
    }

    /* --- embeddings, or the given residual stream entering block start_layer ------------------ */
    if (!resid_in) {
        int64_t r = 0;
        for (int i = 0; i < b->n_seq; i++)
            for (int t = 0; t < b->len[i]; t++, r++) {
                const float *e = w->W_E + (int64_t)ids[r] * d;
                float *xr = s.x + r * d;
                for (int j = 0; j < d; j++) xr[j] = e[j] * c->embed_scale;
            }
        apply_patches(s.x, d, SITE_EMBED, -1, patches, n_patches, NULL);
        if (c->learned_pos) {
            r = 0;
            for (int i = 0; i < b->n_seq; i++)
                for (int t = 0; t < b->len[i]; t++, r++) {
                    const float *pe = w->W_pos + (int64_t)(b->start[i] + t) * d;
                    float *xr = s.x + r * d;
                    for (int j = 0; j < d; j++) xr[j] += pe[j];
                }
        }
        if (cap->embed) memcpy(cap->embed, s.x, sizeof(float) * N * d);
    } else {
        memcpy(s.x, resid_in, sizeof(float) * N * d);
    }

    /* --- blocks ------------------------------------------------------------------------------ */
    for (int l = start_layer; l < end_layer; l++) {
        if (prune && l == L - 1) {
            if (last_block_rows(&s, m, b, nw, N, patches, n_patches, blocks, n_blocks, maxn, maxP))
                FAIL("out of memory in attention");
            break;
        }
        const LayerWeights *lw = &w->layers[l];
        int64_t LN = (int64_t)l * N;
        if (cap->resid_pre) memcpy(cap->resid_pre + LN * d, s.x, sizeof(float) * N * d);
        if (c->parallel) memcpy(s.x0, s.x, sizeof(float) * N * d); /* the parallel MLP's input */

        /* attention: h = norm(x); q, k, v = h W^T + b */
        norm_rows(s.pool, s.h, NULL, s.x, N, d, lw->ln1_w, lw->ln1_b, c->norm_eps, c->norm);
        matmul(s.pool, s.q, s.h, lw->W_Q, lw->b_Q, N, d, qd);
        matmul(s.pool, s.k, s.h, lw->W_K, lw->b_K, N, d, kvd);
        matmul(s.pool, s.v, s.h, lw->W_V, lw->b_V, N, d, kvd);
        if (c->qk_norm) {
            head_norm_rows(s.pool, s.q, N * H, dh, lw->q_norm_w, c->norm_eps);
            head_norm_rows(s.pool, s.k, N * KV, dh, lw->k_norm_w, c->norm_eps);
        }
        if (c->rope) {
            rope_rows(s.pool, s.q, N, H, s.pos, c, l);
            rope_rows(s.pool, s.k, N, KV, s.pos, c, l);
        }
        if (cap->k_cache) memcpy(cap->k_cache + LN * kvd, s.k, sizeof(float) * N * kvd);
        if (cap->v_cache) memcpy(cap->v_cache + LN * kvd, s.v, sizeof(float) * N * kvd);

        /* per sequence: gather prefix + new keys/values, attend */
        if (attention_layer(s.pool, s.z, cap->attn ? cap->attn + (int64_t)l * H * attn_total : NULL, attn_total, s.q, s.k,
                            s.v, b, l, c, blocks, n_blocks, row0, attn_off, maxn, maxP, NULL))
            FAIL("out of memory in attention");
        if (cap->z) memcpy(cap->z + LN * qd, s.z, sizeof(float) * N * qd);

        /* attn_out = z W_O^T + b_O (Gemma: then the post-attention norm) */
        matmul(s.pool, s.a, s.z, lw->W_O, lw->b_O, N, qd, d);
        if (c->post_norms) {
            norm_rows(s.pool, s.a, s.rs, s.a, N, d, lw->post_attn_norm_w, NULL, c->norm_eps, NORM_RMS);
            if (cap->norm_scale_attn) memcpy(cap->norm_scale_attn + LN, s.rs, sizeof(float) * N);
        }
        if (cap->head_out) {
            /* head h: z[:, h] (N, dh) @ W_O[:, h]^T (dh -> d); Gemma: times the frozen norm factor and w */
            for (int h = 0; h < H; h++) {
                float *ho = cap->head_out + ((int64_t)l * H + h) * N * d;
                cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, (int)N, d, dh, 1.0f, s.z + h * dh, qd,
                            lw->W_O + h * dh, qd, 0.0f, ho, d);
                if (c->post_norms)
                    for (int64_t i = 0; i < N; i++)
                        for (int j = 0; j < d; j++) ho[i * d + j] = lw->post_attn_norm_w[j] * (ho[i * d + j] * s.rs[i]);
            }
        }
        apply_patches(s.a, d, SITE_ATTN_OUT, l, patches, n_patches, NULL);
        if (cap->attn_out) memcpy(cap->attn_out + LN * d, s.a, sizeof(float) * N * d);
        add_into(s.pool, s.x, s.a, N * d);
        if (cap->resid_mid) memcpy(cap->resid_mid + LN * d, s.x, sizeof(float) * N * d);

        /* MLP (of the rows whose output no patch sets; parallel block: of the block input x0), then
         * x = (x + attn_out) + mlp_out in both block kinds */
        mlp_block(&s, lw, c, l, patches, n_patches, N);
        apply_patches(s.a, d, SITE_MLP_OUT, l, patches, n_patches, NULL);
        if (cap->mlp_out) memcpy(cap->mlp_out + LN * d, s.a, sizeof(float) * N * d);
        add_into(s.pool, s.x, s.a, N * d);
        apply_patches(s.x, d, SITE_RESID_POST, l, patches, n_patches, NULL);
    }
    if (cap->resid_final) memcpy(cap->resid_final, s.x, sizeof(float) * N * d);

    /* --- final norm, unembedding and target probabilities of the wanted rows ------------------ */
    if ((cap->logits || cap->final_scale || cap->target_prob) && end_layer == L) {
        int64_t nr = cap->logit_rows ? cap->n_logit_rows : N, V = c->vocab_size;
        for (int64_t i = 0; i < nr; i++) {
            int64_t r = cap->logit_rows ? cap->logit_rows[i] : i;
            float rs = norm_row(s.tmp + i * d, s.x + r * d, d, w->ln_f_w, w->ln_f_b, c->norm_eps, c->norm);
            if (cap->final_scale) cap->final_scale[i] = rs;
        }
        if (cap->logits) unembed(s.pool, cap->logits, s.tmp, nr, m);
        if (cap->target_prob) {
            /* from the captured logits, or from chunks of rows unembedded into a scratch buffer */
            int64_t chunk = cap->logits ? nr : ((1 << 22) / V > 0 ? (1 << 22) / V : 1);
            if (chunk > nr) chunk = nr;
            float *buf = cap->logits ? NULL : malloc(sizeof(float) * chunk * V);
            if (!cap->logits && !buf) FAIL("out of memory for %lld rows of logits", (long long)chunk);
            for (int64_t r0 = 0; r0 < nr; r0 += chunk) {
                int64_t n = nr - r0 < chunk ? nr - r0 : chunk;
                float *lg = cap->logits ? cap->logits + r0 * V : buf;
                if (!cap->logits) unembed(s.pool, lg, s.tmp + r0 * d, n, m);
                TargetLoop a = {lg, V, cap->targets + r0, cap->target_prob + r0};
                pool_for(s.pool, n, grain_of(s.pool, n, V * 4), target_range, &a);
            }
            free(buf);
        }
    }
    rc = 0;
done:
    scratch_free(&s);
    return rc;
}
