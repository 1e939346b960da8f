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

/* out (N, W->n_out) = x (N, W->n_in) @ W^T + bias (n_out,) when given. Every projection goes through the
 * matrix-product layer (csrc/matmul.c), which reads the weight in its stored format (F32, F16, BF16, GGML
 * blocks) and splits the output features over the pool's threads. Sets *oom when out of memory. */
static void project(Pool *pool, int *oom, float *out, const float *x, int64_t N, const Mat *W, const float *bias) {
    if (N > 0 && mat_mul(pool, out, x, N, W, bias)) *oom = 1;
}

typedef struct { float *q, *k, *v; const float *qkv; int qd, kvd; } SplitLoop;

static void split_range(void *ctx, int64_t lo, int64_t hi, int tid) {
    SplitLoop *a = ctx;
    int64_t w = a->qd + 2 * a->kvd;
    for (int64_t r = lo; r < hi; r++) {
        const float *src = a->qkv + r * w;
        memcpy(a->q + r * a->qd, src, sizeof(float) * a->qd);
        memcpy(a->k + r * a->kvd, src + a->qd, sizeof(float) * a->kvd);
        memcpy(a->v + r * a->kvd, src + a->qd + a->kvd, sizeof(float) * a->kvd);
    }
}

/* q (N, H*dh), k, v (N, KV*dh) = h (N, d) through W_Q, W_K, W_V (+ biases). With the three fused at load
 * (lw->W_QKV): one product into qkv (N, H*dh + 2*KV*dh), whose column blocks are then copied out. */
static void qkv_rows(Pool *pool, int *oom, float *q, float *k, float *v, float *qkv, const float *h, int64_t N,
                     const LayerWeights *lw, const Config *c) {
    int qd = c->n_heads * c->d_head, kvd = c->n_kv_heads * c->d_head;
    if (lw->W_QKV.data && qkv) {
        project(pool, oom, qkv, h, N, &lw->W_QKV, lw->b_QKV);
        SplitLoop a = {q, k, v, qkv, qd, kvd};
        pool_for(pool, N, grain_of(pool, N, qd + 2 * kvd), split_range, &a);
        return;
    }
    project(pool, oom, q, h, N, &lw->W_Q, lw->b_Q);
    project(pool, oom, k, h, N, &lw->W_K, lw->b_K);
    project(pool, oom, v, h, N, &lw->W_V, lw->b_V);
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


/* ------------------------------------------------------------------------------------------ */
/* interventions                                                                                */

/* One patch's operation on x (n,): set, add, zero, multiply, or project out the direction u = value. */
static void patch_op(float *x, int n, int op, const float *u) {
    switch (op) {
    case OP_ZERO: memset(x, 0, sizeof(float) * n); break;
    case OP_SET: memcpy(x, u, sizeof(float) * n); break;
    case OP_ADD: for (int j = 0; j < n; j++) x[j] += u[j]; break;
    case OP_MUL: for (int j = 0; j < n; j++) x[j] *= u[j]; break;
    default: { /* OP_PROJECT: x -= (x.u / u.u) u, the dot products in double */
        double xu = 0.0, uu = 0.0;
        for (int j = 0; j < n; j++) { xu += (double)x[j] * u[j]; uu += (double)u[j] * u[j]; }
        if (uu > 0.0) {
            float c = (float)(xu / uu);
            for (int j = 0; j < n; j++) x[j] -= c * u[j];
        }
    }
    }
}

/* Apply the patches of (site, layer) to x (N, w): each acts on elements offset .. offset+width-1 of its
 * row; want (N,) optional: only to these rows. */
static void apply_patches(float *x, int w, int site, int layer, const Patch *p, int64_t np,
                          const unsigned char *want) {
    for (int64_t i = 0; i < np; i++) {
        if (p[i].site != site || p[i].layer != layer || (want && !want[p[i].row])) continue;
        patch_op(x + p[i].row * w + p[i].offset, p[i].width, p[i].op, p[i].value);
    }
}

/* The patches of one site and layer copied into a new array (*n of them): the attention and MLP loops
 * scan only these. NULL with *n = 0 when there are none; *n = -1 when out of memory. */
static Patch *site_patches(const Patch *p, int64_t np, int site, int layer, int64_t *n) {
    int64_t k = 0;
    for (int64_t i = 0; i < np; i++) k += p[i].site == site && p[i].layer == layer;
    *n = 0;
    if (!k) return NULL;
    Patch *out = malloc(sizeof(Patch) * k);
    if (!out) { *n = -1; return NULL; }
    for (int64_t i = 0; i < np; i++)
        if (p[i].site == site && p[i].layer == layer) out[(*n)++] = p[i];
    return out;
}

/* The SITE_ATTN patches of (row, head) on that query's probabilities s (P,) (keys offset ..). */
static void patch_probs(float *s, int64_t row, int head, const Patch *ap, int64_t nap) {
    for (int64_t i = 0; i < nap; i++)
        if (ap[i].row == row && ap[i].head == head) patch_op(s + ap[i].offset, ap[i].width, ap[i].op, ap[i].value);
}

typedef struct { float *out; const float *gate, *up; int64_t ld; int F, act; } ActLoop;

/* Rows lo .. hi-1: out[r] (F,) = act(gate[r]) * up[r] (gated MLP) or act(up[r]); gate and up rows are ld
 * floats apart (F, or 2F when gate and up come from one fused product); out may be up. One loop per
 * common activation so that it vectorizes. */
VECTOR_CLONES static void act_range(void *ctx, int64_t lo, int64_t hi, int tid) {
    ActLoop *a = ctx;
    int F = a->F;
    for (int64_t r = lo; r < hi; r++) {
        float *o = a->out + r * F;
        const float *u = a->up + r * a->ld, *g = a->gate ? a->gate + r * a->ld : NULL;
        if (g && a->act == ACT_SILU)
            for (int j = 0; j < F; j++) o[j] = silu(g[j]) * u[j];
        else if (g && a->act == ACT_GELU_TANH)
            for (int j = 0; j < F; j++) o[j] = gelu_tanh(g[j]) * u[j];
        else if (g)
            for (int j = 0; j < F; j++) o[j] = act_one(g[j], a->act) * u[j];
        else if (a->act == ACT_GELU_TANH)
            for (int j = 0; j < F; j++) o[j] = gelu_tanh(u[j]);
        else
            for (int j = 0; j < F; j++) o[j] = act_one(u[j], a->act);
    }
}

/* What happens to the MLP's hidden activations act (N, F) of layer `layer` between the activation and
 * W_down: the SITE_MLP_POST patches of that layer (p, np) and the mlp_post capture (cap: that layer's
 * (N_batch, F) block, or NULL). Row j of act is row rows[j] of the batch (rows ascending; NULL: row j).
 * cap_pre (N_batch, 2F or F) / cap_prenorm (N_batch, d): the pre-activations ([gate | up], or up) and
 * W_down's output before the post-MLP norm, for a backward pass (or NULL). */
typedef struct { const Patch *p; int64_t np; int layer; const int64_t *rows; float *cap, *cap_pre, *cap_prenorm; } MlpHook;

/* rows of x (N, w) into the batch rows of cap (N_batch, w) */
static void capture_rows(float *cap, const float *x, int64_t N, int w, const int64_t *rows) {
    for (int64_t j = 0; j < N; j++) memcpy(cap + (rows ? rows[j] : j) * w, x + j * w, sizeof(float) * w);
}

static int64_t local_row(const int64_t *rows, int64_t N, int64_t row) {
    if (!rows) return row < N ? row : -1;
    int64_t lo = 0, hi = N; /* binary search in the ascending rows */
    while (lo < hi) {
        int64_t mid = (lo + hi) / 2;
        if (rows[mid] < row) lo = mid + 1; else hi = mid;
    }
    return lo < N && rows[lo] == row ? lo : -1;
}

/* apply_patches for a compact buffer x (n, w) whose row j is row rows[j] of the batch (rows ascending) */
static void apply_patches_rows(float *x, int w, int site, int layer, const Patch *p, int64_t np, const int64_t *rows,
                               int64_t n) {
    for (int64_t i = 0; i < np; i++) {
        int64_t j = p[i].site == site && p[i].layer == layer ? local_row(rows, n, p[i].row) : -1;
        if (j >= 0) patch_op(x + j * w + p[i].offset, p[i].width, p[i].op, p[i].value);
    }
}

static void mlp_post_hook(float *act, int64_t N, int F, const MlpHook *hk) {
    for (int64_t i = 0; i < hk->np; i++) {
        const Patch *p = &hk->p[i];
        int64_t j = p->site == SITE_MLP_POST && p->layer == hk->layer ? local_row(hk->rows, N, p->row) : -1;
        if (j >= 0) patch_op(act + j * F + p->offset, p->width, p->op, p->value);
    }
    if (hk->cap)
        for (int64_t j = 0; j < N; j++)
            memcpy(hk->cap + (hk->rows ? hk->rows[j] : j) * F, act + j * F, sizeof(float) * F);
}

/* out (N, d) = MLP(x (N, d)): h = norm(x); down(act(gate h) * up h) or down(act(up h)); Gemma: then the
 * post-MLP norm. h (N, d), up (N, F), gate (N, 2F) scratch: with gate and up fused at load
 * (lw->W_gate_up) one product fills gate with [gate | up] rows. hk: patches and capture of the hidden
 * activations (mlp_post), or NULL. */
static void mlp_rows(Pool *pool, int *oom, float *out, float *h, float *up, float *gate, const float *x, int64_t N,
                     const LayerWeights *lw, const Config *c, const MlpHook *hk) {
    int d = c->d_model, F = c->d_mlp;
    norm_rows(pool, h, NULL, x, N, d, lw->ln2_w, lw->ln2_b, c->norm_eps, c->norm);
    ActLoop a = {up, c->gated_mlp ? gate : NULL, up, F, F, c->act};
    if (c->gated_mlp && lw->W_gate_up.data) {
        project(pool, oom, gate, h, N, &lw->W_gate_up, lw->b_gate_up);
        a.up = gate + F;
        a.ld = 2 * F;
    } else {
        project(pool, oom, up, h, N, &lw->W_up, lw->b_up);
        if (c->gated_mlp) project(pool, oom, gate, h, N, &lw->W_gate, lw->b_gate);
    }
    if (hk && hk->cap_pre) { /* [gate | up] rows (gated), or up rows */
        int w = c->gated_mlp ? 2 * F : F;
        for (int64_t j = 0; j < N; j++) {
            float *dst = hk->cap_pre + (hk->rows ? hk->rows[j] : j) * w;
            if (c->gated_mlp) memcpy(dst, a.gate + j * a.ld, sizeof(float) * F);
            memcpy(dst + (w - F), a.up + j * a.ld, sizeof(float) * F);
        }
    }
    pool_for(pool, N, grain_of(pool, N, (int64_t)F * 8), act_range, &a);
    if (hk) mlp_post_hook(up, N, F, hk);
    project(pool, oom, out, up, N, &lw->W_down, lw->b_down);
    if (hk && hk->cap_prenorm && c->post_norms) capture_rows(hk->cap_prenorm, out, N, d, hk->rows);
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

/* Sequences with at least this many new rows attend through matrix products (attend_head_gemm). */
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

/* One query head h over one sequence through two single-threaded sgemms (the pool's threads run several
 * heads at once):
 *   S (n, P) = q_h (n, dh; row stride H*dh) @ k^T (dh, P; rows of stride ks)
 *   S = softmax_row(S[i]) per row (masked entries exactly 0)
 *   z_h (n, dh; row stride H*dh) = S (n, P) @ v (P, dh; rows of stride ks)
 * S is the head's probability block when probs are captured, else the scratch sw (n, P). A fully masked
 * row gives z = 0, like the loop. The SITE_ATTN patches ap (nap) of rows r0 .. and head h act on the
 * probabilities before the values are mixed (nothing is renormalised). */
static void attend_head_gemm(float *z, float *S, const float *q, const float *k, const float *v, int ks, int n,
                             int start, const Config *c, int window, const unsigned char *blocked, int64_t r0, int h,
                             const Patch *ap, int64_t nap) {
    int dh = c->d_head, qd = c->n_heads * dh, P = start + n;
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, n, P, dh, 1.0f, q, qd, k, ks, 0.0f, S, P);
    for (int i = 0; i < n; i++) {
        int pos = start + i;
        int lo = (window > 0 && pos - window + 1 > 0) ? pos - window + 1 : 0;
        softmax_row(S + (int64_t)i * P, P, lo, pos, blocked ? blocked + (int64_t)i * P : NULL, c);
        if (nap) patch_probs(S + (int64_t)i * P, r0 + i, h, ap, nap);
    }
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, n, dh, P, 1.0f, S, P, v, ks, 0.0f, z, qd);
}

/* One query head h over one sequence, row by row: dot products, softmax_row, weighted sum of values.
 * Rows not in want (n,) are skipped (their z and probs rows are left untouched). probs: the head's (n, P)
 * block or NULL; scores (P,) scratch; SITE_ATTN patches as in attend_head_gemm. */
static void attend_head_rows(float *z, float *probs, const float *q, const float *k, const float *v, int ks, int n,
                             int start, const Config *c, int window, const unsigned char *blocked,
                             const unsigned char *want, float *scores, int64_t r0, int h, const Patch *ap,
                             int64_t nap) {
    int dh = c->d_head, qd = c->n_heads * dh, P = start + n;
    for (int i = 0; i < n; i++) {
        if (want && !want[i]) continue;
        int pos = start + i;
        int lo = (window > 0 && pos - window + 1 > 0) ? pos - window + 1 : 0;
        const float *qi = q + (int64_t)i * qd;
        for (int j = lo; j <= pos; j++) {
            const float *kj = k + (int64_t)j * ks;
            float s = 0.0f;
            for (int t = 0; t < dh; t++) s += qi[t] * kj[t];
            scores[j] = s;
        }
        softmax_row(scores, P, lo, pos, blocked ? blocked + (int64_t)i * P : NULL, c);
        /* with SITE_ATTN patches what is set is used, masked keys included (as the gemm path's S @ v) */
        int jlo = lo, jhi = pos;
        if (nap) {
            patch_probs(scores, r0 + i, h, ap, nap);
            jlo = 0;
            jhi = P - 1;
        }
        float *zi = z + (int64_t)i * qd;
        memset(zi, 0, sizeof(float) * dh);
        if (probs) memcpy(probs + (int64_t)i * P, scores, sizeof(float) * P);
        for (int j = jlo; j <= jhi; j++) {
            float a = scores[j];
            if (a == 0.0f) continue;
            const float *vj = v + (int64_t)j * ks;
            for (int t = 0; t < dh; t++) zi[t] += a * vj[t];
        }
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
    const Patch *ap;  /* SITE_ATTN patches of this layer */
    int64_t nap;
    int failed;
} AttnLoop;

/* The edges blocked for sequence i in layer l as an (n, P) byte mask (1 = removed) in blocked, or NULL. */
static unsigned char *blocked_edges(const AttnLoop *a, int64_t i, unsigned char *blocked) {
    int n = a->b->len[i], P = a->b->start[i] + n;
    int64_t r0 = a->row0[i];
    unsigned char *blk = NULL;
    for (int64_t e = 0; e < a->n_blocks; e++) {
        const EdgeBlock *eb = &a->blocks[e];
        if (eb->layer != a->l || eb->row < r0 || eb->row >= r0 + n || eb->key < 0 || eb->key >= P) continue;
        if (!blk) memset(blocked, 0, (size_t)n * P);
        blk = blocked;
        blocked[(eb->row - r0) * P + eb->key] = 1;
    }
    return blk;
}

/* Items lo .. hi-1 of attention_layer: item = (sequence i, kv head kh), i = item / KV. Each gathers its kv
 * head's keys and values (prefix cache rows, then this call's rows) into (P, dh) scratch and attends for
 * the query heads that share it: through matrix products when the sequence has at least
 * ATTN_GEMM_MIN_ROWS new rows (and every row is wanted), else row by row. */
static void attn_range(void *ctx, int64_t lo, int64_t hi, int tid) {
    AttnLoop *a = ctx;
    const Config *c = a->c;
    const Batch *b = a->b;
    int H = c->n_heads, KV = c->n_kv_heads, dh = c->d_head, kvd = KV * dh, qd = H * dh, group = H / KV, l = a->l;
    int64_t maxn = a->maxn, maxP = a->maxP;
    /* scratch: one kv head's keys/values (P, dh), scores (P,), blocked (n, P), S of the gemm path (n, P) */
    float *kh_all = malloc(sizeof(float) * maxP * dh), *vh_all = malloc(sizeof(float) * maxP * dh);
    float *scores = malloc(sizeof(float) * (maxP + 1));
    unsigned char *blocked = a->n_blocks > 0 ? malloc((size_t)(maxn * maxP)) : NULL;
    float *sw = maxn >= ATTN_GEMM_MIN_ROWS && !a->probs ? malloc(sizeof(float) * maxn * maxP) : NULL;
    if (!kh_all || !vh_all || !scores || (a->n_blocks > 0 && !blocked) ||
        (maxn >= ATTN_GEMM_MIN_ROWS && !a->probs && !sw)) {
        __atomic_store_n(&a->failed, 1, __ATOMIC_RELAXED);
        lo = hi;
    }
    for (int64_t it = lo; it < hi; it++) {
        int64_t i = it / KV;
        int kh = (int)(it % KV);
        int n = b->len[i], st = b->start[i];
        int64_t r0 = a->row0[i];
        if (a->want) { /* skip sequences with no wanted row */
            int any = 0;
            for (int t = 0; t < n && !any; t++) any = a->want[r0 + t];
            if (!any) continue;
        }
        for (int p = 0; p < st; p++) {
            memcpy(kh_all + (int64_t)p * dh, b->pk[i] + l * b->pstride + (int64_t)p * kvd + kh * dh, sizeof(float) * dh);
            memcpy(vh_all + (int64_t)p * dh, b->pv[i] + l * b->pstride + (int64_t)p * kvd + kh * dh, sizeof(float) * dh);
        }
        for (int t = 0; t < n; t++) {
            memcpy(kh_all + (int64_t)(st + t) * dh, a->k + (r0 + t) * kvd + kh * dh, sizeof(float) * dh);
            memcpy(vh_all + (int64_t)(st + t) * dh, a->v + (r0 + t) * kvd + kh * dh, sizeof(float) * dh);
        }
        const unsigned char *blk = blocked_edges(a, i, blocked);
        for (int h = kh * group; h < (kh + 1) * group; h++) {
            /* this head's rows of q and z (row stride H*dh) and its probability block (n, P) */
            const float *qh = a->q + r0 * qd + h * dh;
            float *zh = a->z + r0 * qd + h * dh;
            float *ph = a->probs ? a->probs + (int64_t)h * a->attn_total + a->attn_off[i] : NULL;
            if (n >= ATTN_GEMM_MIN_ROWS && !a->want)
                attend_head_gemm(zh, ph ? ph : sw, qh, kh_all, vh_all, dh, n, st, c, a->window, blk, r0, h, a->ap,
                                 a->nap);
            else
                attend_head_rows(zh, ph, qh, kh_all, vh_all, dh, n, st, c, a->window, blk,
                                 a->want ? a->want + r0 : NULL, scores, r0, h, a->ap, a->nap);
        }
    }
    free(kh_all); free(vh_all); free(scores); free(blocked); free(sw);
}

/* One layer's attention for every sequence of the batch, on the pool over (sequence, kv head) items.
 * q (N, H*dh), k, v (N, KV*dh) this layer's new rows; each sequence's keys/values are its prefix cache
 * rows followed by its new rows. z (N, H*dh) output; probs (H, attn_total) optional, laid out per head as
 * each sequence's (n, P) block at attn_off[s]; want (N,) optional: only these query rows are computed
 * (their q rows are the only ones read); maxn, maxP: the largest new-row count and key count of a
 * sequence (scratch sizes). Returns 0, or -1 if out of memory. */
static int attention_layer(Pool *pool, float *z, float *probs, int64_t attn_total, const float *q, const float *k,
                           const float *v, const Batch *b, int l, const Config *c, const EdgeBlock *blocks,
                           int64_t n_blocks, const int64_t *row0, const int64_t *attn_off, int64_t maxn,
                           int64_t maxP, const unsigned char *want, const Patch *patches, int64_t n_patches) {
    int64_t nap;
    Patch *ap = site_patches(patches, n_patches, SITE_ATTN, l, &nap);
    if (nap < 0) return -1;
    AttnLoop a = {z, probs, attn_total, q, k, v, b, l, c->layer_window ? c->layer_window[l] : 0, c, blocks,
                  n_blocks, row0, attn_off, maxn, maxP, want, ap, nap, 0};
    int64_t items = (int64_t)b->n_seq * c->n_kv_heads;
    int64_t per_item = 4 * maxn * maxP * (c->n_heads / c->n_kv_heads) * c->d_head; /* ~ floats of work */
    pool_for(pool, items, grain_of(pool, items, per_item), attn_range, &a);
    free(ap);
    return a.failed ? -1 : 0;
}

/* ------------------------------------------------------------------------------------------ */
/* unembedding                                                                                  */

/* logits (n, V) = h (n, d) @ W_U^T (+ b_U, GPT-J), then the final softcap (Gemma 2 style) if any */
static void unembed(Pool *pool, int *oom, float *logits, const float *h, int64_t n, const Model *m) {
    const Config *c = &m->cfg;
    int64_t V = c->vocab_size;
    project(pool, oom, logits, h, n, &m->w.W_U, m->w.b_U);
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
    Pool *pool;               /* threads of this call (owned by the caller), or NULL */
    int oom;                  /* set by a product that ran out of memory */
    float *x, *h, *q, *k, *v, *z, *a, *up, *gate, *tmp, *rs;
    float *qkv;               /* (N, H*dh + 2*KV*dh) output of the fused q/k/v product */
    float *wo;                /* (d, H*dh) float32 W_O for the head_out capture, when W_O is not F32 */
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
    free(s->want); free(s->wrow); free(s->wpos); free(s->set); free(s->krow); free(s->qkv); free(s->wo);
    free(s->x0);
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
                      int64_t N, float *cap_post, float *cap_pre, float *cap_prenorm) {
    int d = c->d_model;
    const float *xin = c->parallel ? s->x0 : s->x;
    int any = 0;
    for (int64_t i = 0; !cap_post && !cap_pre && i < np; i++) /* a patch setting a whole row (not with mlp_post
                                                                * or the pre-activations captured) */
        if (p[i].site == SITE_MLP_OUT && p[i].layer == l && p[i].op == OP_SET && p[i].offset == 0 && p[i].width == d) {
            if (!any) memset(s->set, 0, (size_t)N);
            any = 1;
            s->set[p[i].row] = 1;
        }
    MlpHook hk = {p, np, l, NULL, cap_post, cap_pre, cap_prenorm};
    if (!any) {
        mlp_rows(s->pool, &s->oom, s->a, s->h, s->up, s->gate, xin, N, lw, c, &hk);
        return;
    }
    int64_t nk = 0; /* gather the computed rows into tmp (nk, d); MLP into h (a as scratch); scatter */
    for (int64_t r = 0; r < N; r++)
        if (!s->set[r]) s->krow[nk++] = r;
    gather_rows(s->tmp, xin, s->krow, nk, d);
    hk.rows = s->krow;
    mlp_rows(s->pool, &s->oom, s->h, s->a, s->up, s->gate, s->tmp, nk, lw, c, &hk);
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
    int qd = H * dh;
    const LayerWeights *lw = &m->w.layers[l];
    const int64_t *wrow = s->wrow;

    /* h = norm(x) (N, d); keys and values (N, KV*dh) of every row */
    int kvd = KV * dh, F = c->d_mlp;
    norm_rows(s->pool, s->h, NULL, s->x, N, d, lw->ln1_w, lw->ln1_b, c->norm_eps, c->norm);
    project(s->pool, &s->oom, s->k, s->h, N, &lw->W_K, lw->b_K);
    project(s->pool, &s->oom, s->v, s->h, N, &lw->W_V, lw->b_V);
    apply_patches(s->k, kvd, SITE_K, l, patches, n_patches, NULL);
    apply_patches(s->v, kvd, SITE_V, l, patches, n_patches, NULL);
    if (c->qk_norm) head_norm_rows(s->pool, s->k, N * KV, dh, lw->k_norm_w, c->norm_eps);
    if (c->rope) rope_rows(s->pool, s->k, N, KV, s->pos, c, l);

    /* queries of the wanted rows: h rows gathered into tmp (nw, d), q into z (nw, H*dh), then scattered */
    gather_rows(s->tmp, s->h, wrow, nw, d);
    for (int64_t i = 0; i < nw; i++) s->wpos[i] = s->pos[wrow[i]];
    project(s->pool, &s->oom, s->z, s->tmp, nw, &lw->W_Q, lw->b_Q);
    apply_patches_rows(s->z, qd, SITE_Q, l, patches, n_patches, wrow, nw);
    if (c->qk_norm) head_norm_rows(s->pool, s->z, nw * H, dh, lw->q_norm_w, c->norm_eps);
    if (c->rope) rope_rows(s->pool, s->z, nw, H, s->wpos, c, l);
    scatter_rows(s->q, s->z, wrow, nw, qd);
    if (attention_layer(s->pool, s->z, NULL, 0, s->q, s->k, s->v, b, l, c, blocks, n_blocks, s->row0, s->attn_off,
                        maxn, maxP, s->want, patches, n_patches))
        return -1;
    apply_patches(s->z, qd, SITE_Z, l, patches, n_patches, s->want);

    /* attn_out of the wanted rows: z gathered into q (nw, H*dh), projected into h (nw, d), scattered into a */
    gather_rows(s->q, s->z, wrow, nw, qd);
    project(s->pool, &s->oom, s->h, s->q, nw, &lw->W_O, lw->b_O);
    if (c->post_norms) norm_rows(s->pool, s->h, NULL, s->h, nw, d, lw->post_attn_norm_w, NULL, c->norm_eps, NORM_RMS);
    scatter_rows(s->a, s->h, wrow, nw, d);
    apply_patches(s->a, d, SITE_ATTN_OUT, l, patches, n_patches, s->want);

    /* x += attn_out; the MLP of the gathered rows tmp (nw, d) into h (a as its scratch, free once added to
     * x), scattered into a; x += mlp_out. A parallel block's MLP reads the rows before the attention add. */
    if (c->parallel) gather_rows(s->tmp, s->x, wrow, nw, d);
    add_rows_at(s->x, s->a, wrow, nw, d);
    apply_patches(s->x, d, SITE_RESID_MID, l, patches, n_patches, s->want);
    if (!c->parallel) gather_rows(s->tmp, s->x, wrow, nw, d);
    MlpHook hk = {patches, n_patches, l, wrow, NULL, NULL, NULL};
    (void)F;
    mlp_rows(s->pool, &s->oom, s->h, s->a, s->up, s->gate, s->tmp, nw, lw, c, &hk);
    scatter_rows(s->a, s->h, wrow, nw, d);
    apply_patches(s->a, d, SITE_MLP_OUT, l, patches, n_patches, s->want);
    add_rows_at(s->x, s->a, wrow, nw, d);
    apply_patches(s->x, d, SITE_RESID_POST, l, patches, n_patches, s->want);
    return 0;
}

#define FAIL(...) do { snprintf(err, errlen, __VA_ARGS__); goto done; } while (0)

int model_forward(const Model *m, Pool *pool, const Batch *b, const int32_t *ids, const float *resid_in, int start_layer,
                  int end_layer,
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
    s.gate = malloc(sizeof(float) * N * F * 2); /* [gate | up] rows of a fused product */
    s.tmp = malloc(sizeof(float) * ((cap->logit_rows && cap->n_logit_rows > N) ? cap->n_logit_rows : N) * d);
    s.rs = malloc(sizeof(float) * (N + 1));
    s.row0 = malloc(sizeof(int64_t) * b->n_seq);
    s.attn_off = malloc(sizeof(int64_t) * b->n_seq);
    s.pos = malloc(sizeof(int) * (N + 1));
    s.set = malloc((size_t)N + 1);
    s.krow = malloc(sizeof(int64_t) * (N + 1));
    int fused = 0;
    for (int l = start_layer; l < end_layer; l++) fused |= w->layers[l].W_QKV.data != NULL;
    if (fused) s.qkv = malloc(sizeof(float) * N * (qd + 2 * kvd));
    if (cap->head_out) s.wo = malloc(sizeof(float) * (size_t)d * qd);
    if (c->parallel) s.x0 = malloc(sizeof(float) * N * d);
    if (!s.x || !s.h || !s.a || !s.q || !s.z || !s.k || !s.v || !s.up || !s.gate || !s.tmp || !s.rs || !s.row0 ||
        !s.attn_off || !s.pos || !s.set || !s.krow || (fused && !s.qkv) || (cap->head_out && !s.wo) ||
        (c->parallel && !s.x0))
        FAIL("out of memory for a batch of %lld rows", (long long)N);
    int64_t *row0 = s.row0, *attn_off = s.attn_off;
    s.pool = pool; /* the loops below decide by their size whether to use it (grain_of) */

    /* Last-block pruning: when only some rows' logits are wanted and no per-layer state or resid_final is
     * captured, the last block computes the wanted rows only (plus every row's keys and values). */
    int64_t nw = 0;
    int prune = end_layer == L && start_layer < L && cap->logit_rows && cap->n_logit_rows < N && !cap->resid_pre &&
                !cap->resid_mid && !cap->attn_out && !cap->mlp_out && !cap->head_out && !cap->attn && !cap->z &&
                !cap->norm_scale_attn && !cap->k_cache && !cap->v_cache && !cap->resid_final && !cap->q && !cap->k &&
                !cap->v && !cap->mlp_post && !cap->mlp_pre && !cap->attn_pre_norm && !cap->mlp_pre_norm &&
                !cap->q_cache;
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
            for (int t = 0; t < b->len[i]; t++, r++) { /* the token's row of W_E as float32, times the scale */
                float *xr = s.x + r * d;
                mat_rows_f32(&w->W_E, ids[r], ids[r] + 1, xr);
                for (int j = 0; j < d; j++) xr[j] = xr[j] * c->embed_scale;
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
        apply_patches(s.x, d, SITE_RESID_PRE, l, patches, n_patches, NULL);
        if (prune && l == L - 1) {
            if (last_block_rows(&s, m, b, nw, N, patches, n_patches, blocks, n_blocks, maxn, maxP))
                FAIL("out of memory in attention");
            break;
        }
        const LayerWeights *lw = &w->layers[l];
        int64_t LN = (int64_t)l * N;
        if (cap->resid_pre) memcpy(cap->resid_pre + LN * d, s.x, sizeof(float) * N * d);
        if (c->parallel) memcpy(s.x0, s.x, sizeof(float) * N * d); /* the parallel MLP's input */

        /* attention: h = norm(x); q, k, v = h W^T + b (patched and captured before q/k norm and rotary) */
        norm_rows(s.pool, s.h, NULL, s.x, N, d, lw->ln1_w, lw->ln1_b, c->norm_eps, c->norm);
        qkv_rows(s.pool, &s.oom, s.q, s.k, s.v, s.qkv, s.h, N, lw, c);
        apply_patches(s.q, qd, SITE_Q, l, patches, n_patches, NULL);
        apply_patches(s.k, kvd, SITE_K, l, patches, n_patches, NULL);
        apply_patches(s.v, kvd, SITE_V, l, patches, n_patches, NULL);
        if (cap->q) memcpy(cap->q + LN * qd, s.q, sizeof(float) * N * qd);
        if (cap->k) memcpy(cap->k + LN * kvd, s.k, sizeof(float) * N * kvd);
        if (cap->v) memcpy(cap->v + LN * kvd, s.v, sizeof(float) * N * kvd);
        if (c->qk_norm) {
            head_norm_rows(s.pool, s.q, N * H, dh, lw->q_norm_w, c->norm_eps);
            head_norm_rows(s.pool, s.k, N * KV, dh, lw->k_norm_w, c->norm_eps);
        }
        if (c->rope) {
            rope_rows(s.pool, s.q, N, H, s.pos, c, l);
            rope_rows(s.pool, s.k, N, KV, s.pos, c, l);
        }
        if (cap->k_cache) memcpy(cap->k_cache + LN * kvd, s.k, sizeof(float) * N * kvd);
        if (cap->q_cache) memcpy(cap->q_cache + LN * qd, s.q, sizeof(float) * N * qd);
        if (cap->v_cache) memcpy(cap->v_cache + LN * kvd, s.v, sizeof(float) * N * kvd);

        /* per sequence: gather prefix + new keys/values, attend */
        if (attention_layer(s.pool, s.z, cap->attn ? cap->attn + (int64_t)l * H * attn_total : NULL, attn_total, s.q, s.k,
                            s.v, b, l, c, blocks, n_blocks, row0, attn_off, maxn, maxP, NULL, patches, n_patches))
            FAIL("out of memory in attention");
        apply_patches(s.z, qd, SITE_Z, l, patches, n_patches, NULL);
        if (cap->z) memcpy(cap->z + LN * qd, s.z, sizeof(float) * N * qd);

        /* attn_out = z W_O^T + b_O (Gemma: then the post-attention norm) */
        project(s.pool, &s.oom, s.a, s.z, N, &lw->W_O, lw->b_O);
        if (c->post_norms && cap->attn_pre_norm) memcpy(cap->attn_pre_norm + LN * d, s.a, sizeof(float) * N * d);
        if (c->post_norms) {
            norm_rows(s.pool, s.a, s.rs, s.a, N, d, lw->post_attn_norm_w, NULL, c->norm_eps, NORM_RMS);
            if (cap->norm_scale_attn) memcpy(cap->norm_scale_attn + LN, s.rs, sizeof(float) * N);
        }
        if (cap->head_out) {
            /* head h: z[:, h] (N, dh) @ W_O[:, h]^T (dh -> d), W_O as float32 (dequantized into s.wo unless it
             * is stored as F32); Gemma: times the frozen norm factor and w */
            const float *wo = (const float *)lw->W_O.data;
            if (lw->W_O.type != 0) {
                mat_rows_f32(&lw->W_O, 0, d, s.wo);
                wo = s.wo;
            }
            for (int h = 0; h < H; h++) {
                float *ho = cap->head_out + ((int64_t)l * H + h) * N * d;
                cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, (int)N, d, dh, 1.0f, s.z + h * dh, qd,
                            wo + h * dh, qd, 0.0f, ho, d);
                if (c->post_norms)
                    for (int64_t i = 0; i < N; i++)
                        for (int j = 0; j < d; j++) ho[i * d + j] = lw->post_attn_norm_w[j] * (ho[i * d + j] * s.rs[i]);
            }
        }
        apply_patches(s.a, d, SITE_ATTN_OUT, l, patches, n_patches, NULL);
        if (cap->attn_out) memcpy(cap->attn_out + LN * d, s.a, sizeof(float) * N * d);
        add_into(s.pool, s.x, s.a, N * d);
        apply_patches(s.x, d, SITE_RESID_MID, l, patches, n_patches, NULL);
        if (cap->resid_mid) memcpy(cap->resid_mid + LN * d, s.x, sizeof(float) * N * d);

        /* MLP (of the rows whose output no patch sets; parallel block: of the block input x0), then
         * x = (x + attn_out) + mlp_out in both block kinds */
        mlp_block(&s, lw, c, l, patches, n_patches, N, cap->mlp_post ? cap->mlp_post + LN * F : NULL,
                  cap->mlp_pre ? cap->mlp_pre + LN * F * (c->gated_mlp ? 2 : 1) : NULL,
                  cap->mlp_pre_norm ? cap->mlp_pre_norm + LN * d : NULL);
        apply_patches(s.a, d, SITE_MLP_OUT, l, patches, n_patches, NULL);
        if (cap->mlp_out) memcpy(cap->mlp_out + LN * d, s.a, sizeof(float) * N * d);
        add_into(s.pool, s.x, s.a, N * d);
        apply_patches(s.x, d, SITE_RESID_POST, l, patches, n_patches, NULL);
        if (s.oom) FAIL("out of memory in the matrix products of layer %d", l);
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
        if (cap->logits) unembed(s.pool, &s.oom, cap->logits, s.tmp, nr, m);
        if (cap->target_prob) {
            /* from the captured logits, or from chunks of rows unembedded into a scratch buffer */
            int64_t chunk = cap->logits ? nr : ((1 << 22) / V > 0 ? (1 << 22) / V : 1);
            if (chunk > nr) chunk = nr;
            float *buf = cap->logits ? NULL : malloc(sizeof(float) * chunk * V);
            if (!cap->logits && !buf) FAIL("out of memory for %lld rows of logits", (long long)chunk);
            for (int64_t r0 = 0; r0 < nr; r0 += chunk) {
                int64_t n = nr - r0 < chunk ? nr - r0 : chunk;
                float *lg = cap->logits ? cap->logits + r0 * V : buf;
                if (!cap->logits) unembed(s.pool, &s.oom, lg, s.tmp + r0 * d, n, m);
                TargetLoop a = {lg, V, cap->targets + r0, cap->target_prob + r0};
                pool_for(s.pool, n, grain_of(s.pool, n, V * 4), target_range, &a);
            }
            free(buf);
        }
    }
    if (s.oom) FAIL("out of memory in the matrix products");
    rc = 0;
done:
    scratch_free(&s);
    return rc;
}

/* ------------------------------------------------------------------------------------------ */
/* helpers shared with backward.c (the same arithmetic as the forward's)                         */

int64_t ft_grain(const Pool *pool, int64_t n, int64_t per_item) { return grain_of(pool, n, per_item); }
void ft_add_into(Pool *pool, float *x, const float *y, int64_t n) { add_into(pool, x, y, n); }

float ft_norm_row(float *out, const float *x, int d, const float *w, const float *b, float eps, int kind) {
    return norm_row(out, x, d, w, b, eps, kind);
}

int ft_softmax_row(float *s, int P, int lo, int pos, const unsigned char *bl, const Config *c) {
    return softmax_row(s, P, lo, pos, bl, c);
}
