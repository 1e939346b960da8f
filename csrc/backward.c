/* The backward pass of forward.c: gradients of a scalar metric of the logits with respect to activations
 * (no weight gradients), one function per operation's backward. Notation as in factrace.h; every
 * gradient is float32, the reductions of the norms and of the softmaxes in float64.
 *
 * What it reads from the forward pass (the tape: Capture fields filled by model_forward when asked):
 *   resid_pre, resid_mid   the inputs of the norms before attention and MLP (their scales and normed
 *                          vectors are recomputed per row: O(d), cheaper than storing them)
 *   q, k                   queries and keys before q/k norm (q/k norm backward), after patches
 *   q_cache, k_cache, v    after q/k norm and rotary: the attention backward recomputes the scores and the
 *                          softmax from them (the forward's own softmax_row; exact, and no (H, N, P) store)
 *   mlp_pre                the MLP's pre-activations [gate | up] (recomputing them would cost the MLP's
 *                          largest product again)
 *   attn_pre_norm, mlp_pre_norm   the post-norms' inputs (Gemma)
 *   resid_final            the final norm's input; logits of the seed rows
 * Without weight gradients every projection costs in the backward what it costs in the forward (one product
 * g @ W, csrc/matmul.c's mat_mul_t), so keeping these costs memory (about L N (3d + 2qd + 3kvd + 2F) floats)
 * and saves recomputing a whole forward pass. */
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "blas.h"
#include "factrace.h"
#include "pool.h"

/* ------------------------------------------------------------------------------------------ */
/* elementwise pieces                                                                            */

/* dx (d,) (+)= the gradient w.r.t. the input x (d,) of one norm row given dout (d,) (see forward.c norm_row):
 * y = (x - mean) rs (LayerNorm) or x rs (RMSNorm), out = w y (+ b); dy = w dout;
 * LayerNorm: dx = rs (dy - mean(dy) - y mean(dy y)); RMSNorm: dx = rs (dy - y mean(dy y)). accumulate: add
 * into dx instead of setting it. dx may be dout. */
static void norm_backward(float *dx, const float *x, const float *dout, int d, const float *w, float eps, int kind,
                          int accumulate) {
    double s = 0.0;
    float mean = 0.0f, rs;
    if (kind == NORM_LAYER) {
        for (int i = 0; i < d; i++) s += x[i];
        mean = (float)(s / d);
        double v = 0.0;
        for (int i = 0; i < d; i++) {
            double c = (double)x[i] - mean;
            v += c * c;
        }
        rs = 1.0f / sqrtf((float)(v / d) + eps);
    } else {
        for (int i = 0; i < d; i++) s += (double)x[i] * x[i];
        rs = 1.0f / sqrtf((float)(s / d) + eps);
    }
    double sdy = 0.0, sdyy = 0.0;
    for (int i = 0; i < d; i++) {
        double dy = (double)dout[i] * (w ? w[i] : 1.0f), y = ((double)x[i] - mean) * rs;
        sdy += dy;
        sdyy += dy * y;
    }
    double mdy = kind == NORM_LAYER ? sdy / d : 0.0, mdyy = sdyy / d;
    for (int i = 0; i < d; i++) {
        double dy = (double)dout[i] * (w ? w[i] : 1.0f), y = ((double)x[i] - mean) * rs;
        float g = (float)(rs * (dy - mdy - y * mdyy));
        dx[i] = accumulate ? dx[i] + g : g;
    }
}

typedef struct {
    float *dx; const float *x, *dout, *w; int d, kind, accumulate; float eps;
    int64_t dx_stride, x_stride, dout_stride; /* floats between rows */
} NormBackLoop;

static void norm_back_range(void *ctx, int64_t lo, int64_t hi, int tid) {
    NormBackLoop *a = ctx;
    for (int64_t i = lo; i < hi; i++)
        norm_backward(a->dx + i * a->dx_stride, a->x + i * a->x_stride, a->dout + i * a->dout_stride, a->d, a->w,
                      a->eps, a->kind, a->accumulate);
}

/* dx (N rows of d, stride dxs) (+)= norm backward of dout (stride ds) at inputs x (stride xs); dx may be dout */
static void norm_back_rows(Pool *pool, float *dx, int64_t dxs, const float *x, int64_t xs, const float *dout,
                           int64_t ds, int64_t N, int d, const float *w, float eps, int kind, int accumulate) {
    NormBackLoop a = {dx, x, dout, w, d, kind, accumulate, eps, dxs, xs, ds};
    pool_for(pool, N, ft_grain(pool, N, (int64_t)d * 4), norm_back_range, &a);
}

/* Derivative of the activation (forward.c act_one) at x: value *f and slope returned.
 * gelu tanh: f = x / (1 + exp(-2u)) = 0.5 x (1 + tanh u), u = k (x + 0.044715 x^3),
 *            f' = 0.5 (1 + tanh u) + 0.5 x (1 - tanh^2 u) k (1 + 3 * 0.044715 x^2);
 * gelu erf:  f' = Phi(x) + x phi(x);  silu: f' = s (1 + x (1 - s)), s = sigmoid(x);  relu: [x > 0]. */
static inline float act_grad(float x, int act, float *f) {
    switch (act) {
    case ACT_SILU: {
        double sg = 1.0 / (1.0 + exp(-(double)x));
        *f = (float)(x * sg);
        return (float)(sg * (1.0 + x * (1.0 - sg)));
    }
    case ACT_GELU_ERF: {
        double cdf = 0.5 * (1.0 + erf(x * 0.70710678118654752));
        *f = (float)(x * cdf);
        return (float)(cdf + x * exp(-0.5 * (double)x * x) * 0.3989422804014327);
    }
    case ACT_RELU: *f = x > 0.0f ? x : 0.0f; return x > 0.0f ? 1.0f : 0.0f;
    default: {
        const double k = 0.7978845608028654;
        double u = k * (x + 0.044715 * (double)x * x * x), t = tanh(u);
        *f = (float)(0.5 * x * (1.0 + t));
        return (float)(0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * k * (1.0 + 3.0 * 0.044715 * (double)x * x));
    }
    }
}

typedef struct { float *gpre; const float *pre, *ghid; int F, act, gated; } ActBackLoop;

/* rows lo .. hi-1: gated hid = act(gate) * up:  d gate = ghid * up * act'(gate), d up = ghid * act(gate);
 * else hid = act(up): d up = ghid * act'(up). pre and gpre rows are [gate | up] (2F) or up (F). */
static void act_back_range(void *ctx, int64_t lo, int64_t hi, int tid) {
    ActBackLoop *a = ctx;
    int F = a->F, w = a->gated ? 2 * F : F;
    for (int64_t r = lo; r < hi; r++) {
        const float *p = a->pre + r * w, *gh = a->ghid + r * F;
        float *gp = a->gpre + r * w;
        for (int j = 0; j < F; j++) {
            float f;
            if (a->gated) {
                float s = act_grad(p[j], a->act, &f);
                gp[j] = gh[j] * p[F + j] * s;
                gp[F + j] = gh[j] * f;
            } else {
                gp[j] = gh[j] * act_grad(p[j], a->act, &f);
            }
        }
    }
}

/* Rotary backward of one head vector's gradient g (dh,) in place: the forward's rotation by angle_i (times
 * mscale) transposed: ga = gy_a cos + gy_b sin, gb = -gy_a sin + gy_b cos, on pairs (i, i + rot/2)
 * (rotate-half) or (2i, 2i+1) (interleaved, GPT-J); dims rot .. dh-1 pass through. */
static void rope_backward_head(float *g, int rot, int pos, const float *inv_freq, float mscale, int interleaved) {
    int half = rot / 2;
    for (int i = 0; i < half; i++) {
        float ang = (float)pos * inv_freq[i];
        float c = cosf(ang) * mscale, s = sinf(ang) * mscale;
        int ia = interleaved ? 2 * i : i, ib = interleaved ? 2 * i + 1 : i + half;
        float ya = g[ia], yb = g[ib];
        g[ia] = ya * c + yb * s;
        g[ib] = -ya * s + yb * c;
    }
}

typedef struct {
    float *g; const float *raw, *w; int nh, dh, qk_norm, rope, rot, interleaved; float eps, ms;
    const int *pos; const float *inv;
} HeadBackLoop;

/* rows lo .. hi-1 of g (N, nh*dh): rotary backward, then the per-head RMSNorm's backward at the raw vectors */
static void head_back_range(void *ctx, int64_t lo, int64_t hi, int tid) {
    HeadBackLoop *a = ctx;
    for (int64_t r = lo; r < hi; r++)
        for (int h = 0; h < a->nh; h++) {
            float *gh = a->g + (r * a->nh + h) * a->dh;
            if (a->rope) rope_backward_head(gh, a->rot, a->pos[r], a->inv, a->ms, a->interleaved);
            if (a->qk_norm) norm_backward(gh, a->raw + (r * a->nh + h) * a->dh, gh, a->dh, a->w, a->eps, NORM_RMS, 0);
        }
}

/* ------------------------------------------------------------------------------------------ */
/* patches, transposed                                                                           */

/* The transpose of one patch's operation on the gradient g (n,) of its output: set / zero -> 0, add -> g,
 * multiply -> g * value, project out u -> g - (g.u / u.u) u (the projection is symmetric). */
static void unpatch_op(float *g, int n, int op, const float *u) {
    switch (op) {
    case OP_ZERO: case OP_SET: memset(g, 0, sizeof(float) * n); break;
    case OP_ADD: break;
    case OP_MUL: for (int j = 0; j < n; j++) g[j] *= u[j]; break;
    default: {
        double gu = 0.0, uu = 0.0;
        for (int j = 0; j < n; j++) { gu += (double)g[j] * u[j]; uu += (double)u[j] * u[j]; }
        if (uu > 0.0) {
            float c = (float)(gu / uu);
            for (int j = 0; j < n; j++) g[j] -= c * u[j];
        }
    }
    }
}

/* The gradient g (N, w) through the patches of (site, layer), last applied first. */
static void unpatch(float *g, int w, int site, int layer, const Patch *p, int64_t np) {
    for (int64_t i = np - 1; i >= 0; i--)
        if (p[i].site == site && p[i].layer == layer && p[i].op != OP_ADD)
            unpatch_op(g + p[i].row * w + p[i].offset, p[i].width, p[i].op, p[i].value);
}

static void copy_to(float *dst, const float *src, int64_t n) {
    if (dst) memcpy(dst, src, sizeof(float) * n);
}

/* ------------------------------------------------------------------------------------------ */
/* attention                                                                                     */

typedef struct {
    const Config *c;
    const Batch *b;
    int l, window;
    const float *q, *k, *v;  /* (N, H*dh) queries, (N, KV*dh) keys after norm and rotary, values */
    const float *gz;         /* (N, H*dh) gradient w.r.t. z (after z's patches were transposed) */
    float *gq, *gk, *gv;     /* outputs (N, H*dh), (N, KV*dh) */
    float *gattn;            /* (H, attn_total) optional: w.r.t. the probabilities used */
    int64_t attn_total;
    const int64_t *row0, *attn_off;
    const EdgeBlock *blocks; int64_t n_blocks;
    const Patch *ap; int64_t nap; /* SITE_ATTN patches of this layer */
    int64_t maxn;
    int failed;
} AttnBackLoop;

/* Items lo .. hi-1 = (sequence i, kv head g). For each query head h of the group, with K, V (P, dh) the
 * kv head's keys and values and Q, dZ (n, dh) the head's rows:
 *   S = Q K^T, p = softmax_row(S) (the forward's masks, scale and soft-cap), pu = p with SITE_ATTN patches
 *   dPu = dZ V^T        (the gradient w.r.t. the probabilities used; recorded), dP = dPu through the patches
 *   dS = p (dP - rowsum(p dP)) * (1 - tanh^2) (soft-cap) * scale
 *   dQ = dS K,  dK += dS^T Q,  dV += pu^T dZ
 * Single-threaded sgemms inside an item; items run on the pool. */
static void attn_back_range(void *ctx, int64_t lo, int64_t hi, int tid) {
    AttnBackLoop *a = ctx;
    const Config *c = a->c;
    int H = c->n_heads, KV = c->n_kv_heads, dh = c->d_head, qd = H * dh, kvd = KV * dh, group = H / KV;
    int64_t maxn = a->maxn;
    float *K = malloc(sizeof(float) * maxn * dh), *Vv = malloc(sizeof(float) * maxn * dh);
    float *dK = malloc(sizeof(float) * maxn * dh), *dV = malloc(sizeof(float) * maxn * dh);
    float *S = malloc(sizeof(float) * maxn * maxn), *R = malloc(sizeof(float) * maxn * maxn);
    float *Pu = malloc(sizeof(float) * maxn * maxn), *dP = malloc(sizeof(float) * maxn * maxn);
    unsigned char *blocked = a->n_blocks ? malloc((size_t)(maxn * maxn)) : NULL;
    if (!K || !Vv || !dK || !dV || !S || !R || !Pu || !dP || (a->n_blocks && !blocked)) {
        __atomic_store_n(&a->failed, 1, __ATOMIC_RELAXED);
        lo = hi;
    }
    for (int64_t it = lo; it < hi; it++) {
        int64_t i = it / KV;
        int kh = (int)(it % KV), n = a->b->len[i], P = n;
        int64_t r0 = a->row0[i];
        for (int t = 0; t < n; t++) {
            memcpy(K + (int64_t)t * dh, a->k + (r0 + t) * kvd + kh * dh, sizeof(float) * dh);
            memcpy(Vv + (int64_t)t * dh, a->v + (r0 + t) * kvd + kh * dh, sizeof(float) * dh);
        }
        memset(dK, 0, sizeof(float) * (size_t)P * dh);
        memset(dV, 0, sizeof(float) * (size_t)P * dh);
        const unsigned char *blk = NULL;
        for (int64_t e = 0; e < a->n_blocks; e++) { /* this sequence's blocked edges in this layer (n, P) */
            const EdgeBlock *eb = &a->blocks[e];
            if (eb->layer != a->l || eb->row < r0 || eb->row >= r0 + n || eb->key < 0 || eb->key >= P) continue;
            if (!blk) memset(blocked, 0, (size_t)n * P);
            blk = blocked;
            blocked[(eb->row - r0) * P + eb->key] = 1;
        }
        for (int h = kh * group; h < (kh + 1) * group; h++) {
            const float *Q = a->q + r0 * qd + h * dh, *dZ = a->gz + r0 * qd + h * dh;
            cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, n, P, dh, 1.0f, Q, qd, K, dh, 0.0f, S, P);
            if (c->attn_softcap > 0.0f) memcpy(R, S, sizeof(float) * (size_t)n * P);
            int any_patch = 0;
            for (int r = 0; r < n; r++) {
                int pos = r, wlo = (a->window > 0 && pos - a->window + 1 > 0) ? pos - a->window + 1 : 0;
                ft_softmax_row(S + (int64_t)r * P, P, wlo, pos, blk ? blk + (int64_t)r * P : NULL, c);
            }
            for (int64_t e = 0; e < a->nap; e++) any_patch |= a->ap[e].head == h && a->ap[e].row >= r0 &&
                                                              a->ap[e].row < r0 + n;
            const float *pu = S;
            if (any_patch) { /* the probabilities used: the forward's patches on a copy */
                memcpy(Pu, S, sizeof(float) * (size_t)n * P);
                for (int64_t e = 0; e < a->nap; e++) {
                    const Patch *p = &a->ap[e];
                    if (p->head != h || p->row < r0 || p->row >= r0 + n) continue;
                    float *x = Pu + (p->row - r0) * P + p->offset;
                    switch (p->op) {
                    case OP_ZERO: memset(x, 0, sizeof(float) * p->width); break;
                    case OP_SET: memcpy(x, p->value, sizeof(float) * p->width); break;
                    case OP_ADD: for (int j = 0; j < p->width; j++) x[j] += p->value[j]; break;
                    case OP_MUL: for (int j = 0; j < p->width; j++) x[j] *= p->value[j]; break;
                    default: {
                        double xu = 0.0, uu = 0.0;
                        for (int j = 0; j < p->width; j++) { xu += (double)x[j] * p->value[j]; uu += (double)p->value[j] * p->value[j]; }
                        if (uu > 0.0) { float cc = (float)(xu / uu); for (int j = 0; j < p->width; j++) x[j] -= cc * p->value[j]; }
                    }
                    }
                }
                pu = Pu;
            }
            /* dPu (n, P) = dZ (n, dh) @ V^T */
            cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, n, P, dh, 1.0f, dZ, qd, Vv, dh, 0.0f, dP, P);
            if (a->gattn) memcpy(a->gattn + (int64_t)h * a->attn_total + a->attn_off[i], dP, sizeof(float) * (size_t)n * P);
            if (any_patch)
                for (int64_t e = a->nap - 1; e >= 0; e--) {
                    const Patch *p = &a->ap[e];
                    if (p->head == h && p->row >= r0 && p->row < r0 + n && p->op != OP_ADD)
                        unpatch_op(dP + (p->row - r0) * P + p->offset, p->width, p->op, p->value);
                }
            /* dV (P, dh) += pu^T (P, n) @ dZ (n, dh) */
            cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, P, dh, n, 1.0f, pu, P, dZ, qd, 1.0f, dV, dh);
            /* softmax, soft-cap and scale backward: dS into dP */
            for (int r = 0; r < n; r++) {
                float *pr = S + (int64_t)r * P, *gr = dP + (int64_t)r * P;
                double dot = 0.0;
                for (int j = 0; j < P; j++) dot += (double)pr[j] * gr[j];
                for (int j = 0; j < P; j++) {
                    float ds = pr[j] == 0.0f ? 0.0f : (float)(pr[j] * (gr[j] - dot));
                    if (c->attn_softcap > 0.0f && ds != 0.0f) {
                        float t = tanhf(R[(int64_t)r * P + j] * c->attn_scale / c->attn_softcap);
                        ds *= 1.0f - t * t;
                    }
                    gr[j] = ds * c->attn_scale;
                }
            }
            /* dQ (n, dh) = dS (n, P) @ K (P, dh); dK (P, dh) += dS^T @ Q */
            cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, n, dh, P, 1.0f, dP, P, K, dh, 0.0f,
                        a->gq + r0 * qd + h * dh, qd);
            cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, P, dh, n, 1.0f, dP, P, Q, qd, 1.0f, dK, dh);
        }
        for (int t = 0; t < n; t++) {
            memcpy(a->gk + (r0 + t) * kvd + kh * dh, dK + (int64_t)t * dh, sizeof(float) * dh);
            memcpy(a->gv + (r0 + t) * kvd + kh * dh, dV + (int64_t)t * dh, sizeof(float) * dh);
        }
    }
    free(K); free(Vv); free(dK); free(dV); free(S); free(R); free(Pu); free(dP); free(blocked);
}

/* ------------------------------------------------------------------------------------------ */
/* unembedding and metrics                                                                       */

/* The seeds' gradient w.r.t. the final norm's output of each seed row: dlogits (n_rows, V) in float64
 * softmaxes from the logits (after the final soft-cap), then the soft-cap's backward, then @ W_U.
 * rows (n_rows,) the distinct seed rows, logits (n_rows, V); gx (n_rows, d) out; metric (n_seeds,) out. */
static int metric_backward(Pool *pool, const Model *m, const Seed *seeds, int64_t n_seeds, const int64_t *rows,
                           int64_t n_rows, const float *logits, float *gx, double *metric) {
    const Config *c = &m->cfg;
    int64_t V = c->vocab_size;
    int d = c->d_model, dense = 0;
    for (int64_t i = 0; i < n_seeds; i++) dense |= seeds[i].kind == METRIC_LOGPROB || seeds[i].kind == METRIC_PROB;
    float *dl = calloc((size_t)(n_rows * V), sizeof(float));
    double *lse = malloc(sizeof(double) * (n_rows ? n_rows : 1));
    if (!dl || !lse) { free(dl); free(lse); return -1; }
    for (int64_t r = 0; r < n_rows; r++) { /* log-sum-exp of each seed row */
        const float *x = logits + r * V;
        double mx = -INFINITY, s = 0.0;
        for (int64_t j = 0; j < V; j++) mx = x[j] > mx ? x[j] : mx;
        for (int64_t j = 0; j < V; j++) s += exp((double)x[j] - mx);
        lse[r] = mx + log(s);
    }
    for (int64_t i = 0; i < n_seeds; i++) {
        const Seed *sd = &seeds[i];
        int64_t r = 0;
        while (rows[r] != sd->row) r++;
        const float *x = logits + r * V;
        float *g = dl + r * V;
        double w = sd->weight, pa = exp((double)x[sd->a] - lse[r]);
        switch (sd->kind) {
        case METRIC_LOGIT: metric[i] = x[sd->a]; g[sd->a] += (float)w; break;
        case METRIC_LOGIT_DIFF:
            metric[i] = (double)x[sd->a] - x[sd->b];
            g[sd->a] += (float)w;
            g[sd->b] -= (float)w;
            break;
        case METRIC_LOGPROB: /* e_a - softmax */
            metric[i] = (double)x[sd->a] - lse[r];
            for (int64_t j = 0; j < V; j++) g[j] -= (float)(w * exp((double)x[j] - lse[r]));
            g[sd->a] += (float)w;
            break;
        default: /* METRIC_PROB: p_a (e_a - softmax) */
            metric[i] = pa;
            for (int64_t j = 0; j < V; j++) g[j] -= (float)(w * pa * exp((double)x[j] - lse[r]));
            g[sd->a] += (float)(w * pa);
        }
    }
    if (c->final_softcap > 0.0f) /* x = cap tanh(u / cap): du = dx (1 - (x / cap)^2) */
        for (int64_t i = 0; i < n_rows * V; i++) {
            float t = logits[i] / c->final_softcap;
            dl[i] *= 1.0f - t * t;
        }
    int rc = 0;
    if (dense) {
        rc = mat_mul_t(pool, gx, dl, n_rows, &m->w.W_U);
    } else { /* a few tokens per row: their rows of W_U */
        float *wr = malloc(sizeof(float) * d);
        if (!wr) rc = -1;
        memset(gx, 0, sizeof(float) * (size_t)(n_rows * d));
        for (int64_t i = 0; !rc && i < n_seeds; i++) {
            int64_t r = 0;
            while (rows[r] != seeds[i].row) r++;
            int64_t toks[2] = {seeds[i].a, seeds[i].b};
            for (int k = 0; k < (seeds[i].kind == METRIC_LOGIT_DIFF ? 2 : 1); k++) {
                float coef = dl[r * V + toks[k]];
                if (coef == 0.0f) continue;
                dl[r * V + toks[k]] = 0.0f; /* each (row, token) once */
                mat_rows_f32(&m->w.W_U, toks[k], toks[k] + 1, wr);
                for (int j = 0; j < d; j++) gx[r * d + j] += coef * wr[j];
            }
        }
        free(wr);
    }
    free(dl);
    free(lse);
    return rc;
}

/* ------------------------------------------------------------------------------------------ */
/* the backward pass                                                                             */

/* out (N, n_in) (+)= g (N, n_out) @ W through the matrix-product layer; tmp (N, n_in) scratch for accumulate */
static void project_back(Pool *pool, int *oom, float *out, float *tmp, const float *g, int64_t N, const Mat *W,
                         int accumulate) {
    if (!accumulate) {
        if (mat_mul_t(pool, out, g, N, W)) *oom = 1;
        return;
    }
    if (mat_mul_t(pool, tmp, g, N, W)) *oom = 1;
    ft_add_into(pool, out, tmp, N * W->n_in);
}

/* A Mat of rows r0 .. r0+n-1 of W (any storage type: rows are independent) */
static Mat mat_rows_view(const Mat *W, int64_t r0, int64_t n) {
    Mat v = *W;
    v.n_out = n;
    v.data = W->data + r0 * W->row_bytes;
    return v;
}

typedef struct {
    float *g, *tmp, *ga, *gm, *gz, *gq, *gk, *gv, *gqkv, *ghid, *gpre, *gin, *h; /* see model_backward */
} BackScratch;

/* dM/d(x) through one node's input projection: rows of W (the head's dh rows) applied to the head's
 * gradient g (N, dh of stride gs), then the norm at x: out (N, d) rows of stride os */
static void node_input_grad(Pool *pool, int *oom, float *out, int64_t os, float *tmp, const float *g, int64_t gs,
                            int64_t N, const Mat *W, int64_t r0, int dh, const float *x, const float *nw, const Config *c) {
    Mat v = mat_rows_view(W, r0, dh);
    float *gc = tmp + N * c->d_model; /* (N, dh) contiguous copy after the (N, d) product */
    for (int64_t r = 0; r < N; r++) memcpy(gc + r * dh, g + r * gs, sizeof(float) * dh);
    if (mat_mul_t(pool, tmp, gc, N, &v)) { *oom = 1; return; }
    norm_back_rows(pool, out, os, x, c->d_model, tmp, c->d_model, N, c->d_model, nw, c->norm_eps, c->norm, 0);
}

#define FAIL(...) do { snprintf(err, errlen, __VA_ARGS__); goto done; } while (0)

int model_backward(const Model *m, Pool *pool, const Batch *b, const int32_t *ids, const Patch *patches,
                   int64_t n_patches, const EdgeBlock *blocks, int64_t n_blocks, const Seed *seeds, int64_t n_seeds,
                   Capture *user, Grads *grads, int n_pass, double *metric, char *err, size_t errlen) {
    const Config *c = &m->cfg;
    const Weights *w = &m->w;
    int d = c->d_model, H = c->n_heads, dh = c->d_head, KV = c->n_kv_heads, F = c->d_mlp, L = c->n_layers;
    int qd = H * dh, kvd = KV * dh, gated = c->gated_mlp, fw = gated ? 2 * F : F;
    int rc = -1, oom = 0;
    int64_t N = 0, maxn = 0, attn_total = 0, n_rows = 0;
    for (int i = 0; i < b->n_seq; i++) {
        if (b->start[i] != 0) { snprintf(err, errlen, "a backward pass runs sequences from position 0 (no prefix)"); return -1; }
        N += b->len[i];
        if (b->len[i] > maxn) maxn = b->len[i];
        attn_total += (int64_t)b->len[i] * b->len[i];
    }
    int64_t LN = (int64_t)L * N;
    Capture cap = *user; /* the tape: the caller's arrays where given, else our own */
    float *own[12] = {NULL};
    int n_own = 0;
    int64_t *rows = NULL, *row0 = NULL, *attn_off = NULL;
    int *pos = NULL;
    float *logits = NULL, *gx = NULL;
    BackScratch s = {0};
    Patch *ap = NULL;
#define TAPE(field, n) do { if (!cap.field) { cap.field = own[n_own++] = malloc(sizeof(float) * (size_t)(n)); \
                             if (!cap.field) FAIL("out of memory for the backward pass's tape"); } } while (0)
    TAPE(resid_pre, LN * d);
    if (!c->parallel) TAPE(resid_mid, LN * d);
    if (c->qk_norm) { TAPE(q, LN * qd); TAPE(k, LN * kvd); }
    TAPE(q_cache, LN * qd);
    TAPE(k_cache, LN * kvd);
    TAPE(v_cache, LN * kvd);
    TAPE(mlp_pre, LN * fw);
    if (c->post_norms) { TAPE(attn_pre_norm, LN * d); TAPE(mlp_pre_norm, LN * d); }
    TAPE(resid_final, N * d);
#undef TAPE
    /* the distinct seed rows, whose logits the forward computes */
    rows = malloc(sizeof(int64_t) * (n_seeds ? n_seeds : 1));
    if (!rows) FAIL("out of memory");
    for (int64_t i = 0; i < n_seeds; i++) {
        int64_t r = 0;
        while (r < n_rows && rows[r] != seeds[i].row) r++;
        if (r == n_rows) rows[n_rows++] = seeds[i].row;
    }
    logits = malloc(sizeof(float) * (size_t)((n_rows ? n_rows : 1) * c->vocab_size));
    gx = malloc(sizeof(float) * (size_t)((n_rows ? n_rows : 1) * d));
    if (!logits || !gx) FAIL("out of memory for %lld rows of logits", (long long)n_rows);
    cap.logit_rows = rows;
    cap.n_logit_rows = n_rows;
    cap.logits = logits;
    cap.final_scale = NULL;
    cap.targets = NULL;
    cap.target_prob = NULL;
    if (model_forward(m, pool, b, ids, NULL, 0, L, patches, n_patches, blocks, n_blocks, &cap, err, errlen)) goto done;
    if (metric_backward(pool, m, seeds, n_seeds, rows, n_rows, logits, gx, metric))
        FAIL("out of memory in the metric's backward");

    /* scratch */
    int64_t wmax = qd + 2 * kvd > d ? qd + 2 * kvd : d;
    s.g = malloc(sizeof(float) * N * d);
    s.tmp = malloc(sizeof(float) * N * (d + (fw > wmax ? fw : wmax)));
    s.ga = malloc(sizeof(float) * N * d);
    s.gm = malloc(sizeof(float) * N * d);
    s.gin = malloc(sizeof(float) * N * d);
    s.h = malloc(sizeof(float) * N * d);
    s.gz = malloc(sizeof(float) * N * qd);
    s.gqkv = malloc(sizeof(float) * N * (qd + 2 * kvd));
    s.gq = malloc(sizeof(float) * N * qd);
    s.gk = malloc(sizeof(float) * N * kvd);
    s.gv = malloc(sizeof(float) * N * kvd);
    s.ghid = malloc(sizeof(float) * N * F);
    s.gpre = malloc(sizeof(float) * N * fw);
    row0 = malloc(sizeof(int64_t) * b->n_seq);
    attn_off = malloc(sizeof(int64_t) * b->n_seq);
    pos = malloc(sizeof(int) * (N + 1));
    if (!s.g || !s.tmp || !s.ga || !s.gm || !s.gin || !s.h || !s.gz || !s.gqkv || !s.gq || !s.gk || !s.gv || !s.ghid ||
        !s.gpre || !row0 || !attn_off || !pos)
        FAIL("out of memory for the backward pass of %lld rows", (long long)N);
    for (int64_t i = 0, r = 0, off = 0; i < b->n_seq; i++) {
        row0[i] = r;
        attn_off[i] = off;
        for (int t = 0; t < b->len[i]; t++) pos[r + t] = t;
        r += b->len[i];
        off += (int64_t)b->len[i] * b->len[i];
    }

    for (int pass = 0; pass < n_pass; pass++) {
        Grads *G = &grads[pass];
        float *g = s.g;
        /* the final norm's backward at the seed rows; every other row of the last block's output has no gradient */
        memset(g, 0, sizeof(float) * N * d);
        for (int64_t r = 0; r < n_rows; r++)
            norm_backward(g + rows[r] * d, cap.resid_final + rows[r] * d, gx + r * d, d, w->ln_f_w, c->norm_eps,
                          c->norm, 0);
        for (int l = L - 1; l >= 0; l--) {
            const LayerWeights *lw = &w->layers[l];
            int64_t off = (int64_t)l * N;
            int drop = l == G->drop_layer;
            const float *x_pre = cap.resid_pre + off * d, *x_mlp = c->parallel ? x_pre : cap.resid_mid + off * d;
            copy_to(G->resid_post ? G->resid_post + off * d : NULL, g, N * d);
            unpatch(g, d, SITE_RESID_POST, l, patches, n_patches);

            /* MLP: mlp_out = postnorm(hid W_down^T + b), hid = act(gate) * up | act(up), [gate|up] = norm2(x) W^T */
            memcpy(s.gm, g, sizeof(float) * N * d);
            if (drop) memset(s.gm, 0, sizeof(float) * N * d);
            copy_to(G->mlp_out ? G->mlp_out + off * d : NULL, s.gm, N * d);
            unpatch(s.gm, d, SITE_MLP_OUT, l, patches, n_patches);
            if (c->post_norms)
                norm_back_rows(pool, s.gm, d, cap.mlp_pre_norm + off * d, d, s.gm, d, N, d, lw->post_mlp_norm_w,
                               c->norm_eps, NORM_RMS, 0);
            project_back(pool, &oom, s.ghid, s.tmp, s.gm, N, &lw->W_down, 0);
            copy_to(G->mlp_post ? G->mlp_post + off * F : NULL, s.ghid, N * F);
            unpatch(s.ghid, F, SITE_MLP_POST, l, patches, n_patches);
            ActBackLoop ab = {s.gpre, cap.mlp_pre + off * fw, s.ghid, F, c->act, gated};
            pool_for(pool, N, ft_grain(pool, N, (int64_t)F * 16), act_back_range, &ab);
            if (gated && lw->W_gate_up.data) {
                project_back(pool, &oom, s.h, s.tmp, s.gpre, N, &lw->W_gate_up, 0);
            } else if (gated) { /* gate and up in separate formats: split [gate | up] rows into two blocks */
                float *gg = s.tmp + N * d, *gu_buf = s.ghid; /* (N, F) each; ghid is read no more */
                for (int64_t r = 0; r < N; r++) {
                    memcpy(gg + r * F, s.gpre + r * fw, sizeof(float) * F);
                    memcpy(gu_buf + r * F, s.gpre + r * fw + F, sizeof(float) * F);
                }
                memcpy(s.gpre, gg, sizeof(float) * N * F); /* gate block, contiguous */
                if (mat_mul_t(pool, s.h, s.gpre, N, &lw->W_gate)) oom = 1;
                project_back(pool, &oom, s.h, s.tmp, gu_buf, N, &lw->W_up, 1);
            } else {
                project_back(pool, &oom, s.h, s.tmp, s.gpre, N, &lw->W_up, 0);
            }
            /* s.h = dM/d(norm2 output); through the norm at the MLP's input */
            norm_back_rows(pool, s.gin, d, x_mlp, d, s.h, d, N, d, lw->ln2_w, c->norm_eps, c->norm, 0);
            copy_to(G->mlp_in ? G->mlp_in + off * d : NULL, s.gin, N * d);
            if (!c->parallel) {
                ft_add_into(pool, g, s.gin, N * d);
                copy_to(G->resid_mid ? G->resid_mid + off * d : NULL, g, N * d);
                unpatch(g, d, SITE_RESID_MID, l, patches, n_patches);
            }

            /* attention: attn_out = postnorm(z W_O^T + b_O), z = attention(rope(qknorm(q, k)), v) */
            memcpy(s.ga, g, sizeof(float) * N * d);
            if (drop) memset(s.ga, 0, sizeof(float) * N * d);
            copy_to(G->attn_out ? G->attn_out + off * d : NULL, s.ga, N * d);
            unpatch(s.ga, d, SITE_ATTN_OUT, l, patches, n_patches);
            if (c->post_norms)
                norm_back_rows(pool, s.ga, d, cap.attn_pre_norm + off * d, d, s.ga, d, N, d, lw->post_attn_norm_w,
                               c->norm_eps, NORM_RMS, 0);
            project_back(pool, &oom, s.gz, s.tmp, s.ga, N, &lw->W_O, 0);
            copy_to(G->z ? G->z + off * qd : NULL, s.gz, N * qd);
            unpatch(s.gz, qd, SITE_Z, l, patches, n_patches);
            int64_t nap = 0;
            for (int64_t i = 0; i < n_patches; i++) nap += patches[i].site == SITE_ATTN && patches[i].layer == l;
            free(ap);
            ap = nap ? malloc(sizeof(Patch) * nap) : NULL;
            if (nap && !ap) FAIL("out of memory");
            for (int64_t i = 0, k = 0; i < n_patches; i++)
                if (patches[i].site == SITE_ATTN && patches[i].layer == l) ap[k++] = patches[i];
            AttnBackLoop al = {c, b, l, c->layer_window ? c->layer_window[l] : 0, cap.q_cache + off * qd,
                               cap.k_cache + off * kvd, cap.v_cache + off * kvd, s.gz, s.gq, s.gk, s.gv,
                               G->attn ? G->attn + (int64_t)l * H * attn_total : NULL, attn_total, row0, attn_off,
                               blocks, n_blocks, ap, nap, maxn, 0};
            int64_t items = (int64_t)b->n_seq * KV;
            pool_for(pool, items, ft_grain(pool, items, 8 * maxn * maxn * (H / KV) * dh), attn_back_range, &al);
            if (al.failed) FAIL("out of memory in the attention backward");
            /* rotary and q/k norm backward: gradients w.r.t. q and k as projected (and patched) */
            for (int which = 0; which < 2; which++) {
                int tbl = c->layer_rope ? c->layer_rope[l] : 0, rot = c->rope_dim > 0 ? c->rope_dim : dh;
                HeadBackLoop hb = {which ? s.gk : s.gq, c->qk_norm ? (which ? cap.k + off * kvd : cap.q + off * qd) : NULL,
                                   which ? lw->k_norm_w : lw->q_norm_w, which ? KV : H, dh, c->qk_norm, c->rope, rot,
                                   c->rope_interleaved, c->norm_eps, c->rope ? c->rope_mscale[tbl] : 1.0f, pos,
                                   c->rope ? c->rope_inv_freq + (int64_t)tbl * (rot / 2) : NULL};
                if (c->rope || c->qk_norm)
                    pool_for(pool, N, ft_grain(pool, N, (int64_t)hb.nh * dh * 16), head_back_range, &hb);
            }
            copy_to(G->q ? G->q + off * qd : NULL, s.gq, N * qd);
            copy_to(G->k ? G->k + off * kvd : NULL, s.gk, N * kvd);
            copy_to(G->v ? G->v + off * kvd : NULL, s.gv, N * kvd);
            unpatch(s.gq, qd, SITE_Q, l, patches, n_patches);
            unpatch(s.gk, kvd, SITE_K, l, patches, n_patches);
            unpatch(s.gv, kvd, SITE_V, l, patches, n_patches);
            /* one node's input: dM/dx through head h's query (key, value) alone */
            for (int h = 0; G->q_in && h < H; h++)
                node_input_grad(pool, &oom, G->q_in + (off * H + h) * d, (int64_t)H * d, s.tmp, s.gq + h * dh, qd, N,
                                &lw->W_Q, (int64_t)h * dh, dh, x_pre, lw->ln1_w, c);
            for (int h = 0; G->k_in && h < KV; h++)
                node_input_grad(pool, &oom, G->k_in + (off * KV + h) * d, (int64_t)KV * d, s.tmp, s.gk + h * dh, kvd, N,
                                &lw->W_K, (int64_t)h * dh, dh, x_pre, lw->ln1_w, c);
            for (int h = 0; G->v_in && h < KV; h++)
                node_input_grad(pool, &oom, G->v_in + (off * KV + h) * d, (int64_t)KV * d, s.tmp, s.gv + h * dh, kvd, N,
                                &lw->W_V, (int64_t)h * dh, dh, x_pre, lw->ln1_w, c);
            /* dM/d(norm1 output) = [gq | gk | gv] @ W_QKV (or the three products), then the norm's backward */
            if (lw->W_QKV.data) {
                for (int64_t r = 0; r < N; r++) {
                    float *dst = s.gqkv + r * (qd + 2 * kvd);
                    memcpy(dst, s.gq + r * qd, sizeof(float) * qd);
                    memcpy(dst + qd, s.gk + r * kvd, sizeof(float) * kvd);
                    memcpy(dst + qd + kvd, s.gv + r * kvd, sizeof(float) * kvd);
                }
                project_back(pool, &oom, s.h, s.tmp, s.gqkv, N, &lw->W_QKV, 0);
            } else {
                project_back(pool, &oom, s.h, s.tmp, s.gq, N, &lw->W_Q, 0);
                project_back(pool, &oom, s.h, s.tmp, s.gk, N, &lw->W_K, 1);
                project_back(pool, &oom, s.h, s.tmp, s.gv, N, &lw->W_V, 1);
            }
            norm_back_rows(pool, g, d, x_pre, d, s.h, d, N, d, lw->ln1_w, c->norm_eps, c->norm, 1);
            if (c->parallel) ft_add_into(pool, g, s.gin, N * d);
            copy_to(G->resid_pre ? G->resid_pre + off * d : NULL, g, N * d);
            unpatch(g, d, SITE_RESID_PRE, l, patches, n_patches);
            if (oom) FAIL("out of memory in the matrix products of layer %d's backward", l);
        }
        /* the embedding: learned positions are added after SITE_EMBED's patches (identity for the gradient) */
        copy_to(G->embed, g, N * d);
    }
    rc = 0;
done:
    for (int i = 0; i < n_own; i++) free(own[i]);
    free(rows); free(logits); free(gx); free(row0); free(attn_off); free(pos); free(ap);
    free(s.g); free(s.tmp); free(s.ga); free(s.gm); free(s.gin); free(s.h); free(s.gz); free(s.gqkv); free(s.gq);
    free(s.gk); free(s.gv); free(s.ghid); free(s.gpre);
    return rc;
}
