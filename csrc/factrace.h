/* factrace C core: configuration, weights and the batched forward pass.
 *
 * Notation used in every shape comment:
 *   N   rows of a batch (all sequences' new tokens stacked)      d   d_model
 *   L   layers     H  query heads     KV  key/value heads        dh  d_head
 *   F   MLP width  V  vocabulary      P   key positions seen by a query (prefix + new)
 * Activations are float32, row-major. Linear weights are (out, in) like torch nn.Linear, kept in the
 * format they are stored in (Mat, csrc/matmul.h); norms, biases and learned positions are float32.
 */
#ifndef FACTRACE_H
#define FACTRACE_H

#include <stddef.h>
#include <stdint.h>

#include "matmul.h" /* Mat: a weight matrix as stored (F32, F16, BF16, GGML blocks) */
#include "pool.h"

enum { NORM_LAYER = 0, NORM_RMS = 1 };
enum { ACT_GELU_TANH = 0, ACT_SILU = 1, ACT_GELU_ERF = 2, ACT_RELU = 3 };

/* Intervention sites: where a patch acts, and the vector of one row it acts on (its width). Per layer
 * unless noted; in the order a block computes them. */
enum {
    SITE_EMBED = 0,      /* token-embedding output (before learned positions are added), no layer (d) */
    SITE_ATTN_OUT = 1,   /* what the attention sub-block adds to the residual (d) */
    SITE_MLP_OUT = 2,    /* what the MLP sub-block adds to the residual (d) */
    SITE_RESID_POST = 3, /* block output = next block's input (d) */
    SITE_RESID_PRE = 4,  /* block input, before the first norm (d) */
    SITE_RESID_MID = 5,  /* residual after the attention add (d; sequential blocks only) */
    SITE_Q = 6,          /* queries: W_Q projection (+ bias), before q-norm and rotary (H*dh, head-major) */
    SITE_K = 7,          /* keys: W_K projection (+ bias), before k-norm and rotary (KV*dh) */
    SITE_V = 8,          /* values (KV*dh) */
    SITE_Z = 9,          /* per-head mixed values, the input of W_O (H*dh) */
    SITE_ATTN = 10,      /* attention probabilities of one query row and head over its keys (P) */
    SITE_MLP_POST = 11,  /* MLP hidden activations, the input of W_down (F) */
    N_SITES = 12
};
/* Operations on the elements [offset, offset + width) of a row's site vector, with value (width,):
 * set, add, zero, multiply elementwise, and project out the direction value (x -= (x.u / u.u) u). */
enum { OP_SET = 0, OP_ADD = 1, OP_ZERO = 2, OP_MUL = 3, OP_PROJECT = 4, N_OPS = 5 };

typedef struct {
    int n_layers, n_heads, n_kv_heads, d_model, d_head, d_mlp, vocab_size, n_ctx;
    int norm;            /* NORM_LAYER (mean/var, bias) or NORM_RMS */
    float norm_eps;
    int act;             /* ACT_* */
    int gated_mlp;       /* 1: down(act(gate x) * up x), 0: down(act(up x)) */
    int learned_pos;     /* 1: W_pos[position] added after the token embedding (GPT-2) */
    int rope;            /* 1: rotary embeddings on q and k (rotate-half convention) */
    int qk_norm;         /* 1: per-head RMSNorm on q and k before rope (Qwen3, Gemma 3) */
    int post_norms;      /* 1: norms on attention / MLP outputs before the residual add (Gemma 3) */
    float embed_scale;   /* multiplies token embeddings (Gemma: sqrt(d) rounded to float32), else 1 */
    float attn_scale;    /* multiplies q.k */
    float attn_softcap;  /* 0 = none, else cap * tanh(score / cap) */
    float final_softcap; /* 0 = none */
    int parallel;        /* 1: parallel residual block x + attn(ln1 x) + mlp(ln2 x) (GPT-NeoX, GPT-J): the MLP
                          * reads the block input; there is no resid_mid */
    int rope_dim;        /* rotated dims at the start of each head (even, <= dh; the rest pass through) */
    int rope_interleaved; /* 1: rotary pairs (2i, 2i+1) (GPT-J), 0: (i, i + rope_dim/2) (rotate-half) */
    /* Per-layer attention flavour. rope tables: inv_freq[t] (dh/2,), cos/sin times rope_mscale[t]. */
    const int *layer_window;    /* (L,) 0 = full causal attention, w > 0 = keys p-w+1 .. p */
    const int *layer_rope;      /* (L,) index of the rope table used by the layer */
    int n_rope_tables;
    const float *rope_inv_freq; /* (n_rope_tables, rope_dim/2) */
    const float *rope_mscale;   /* (n_rope_tables,) attention scaling applied to cos and sin */
} Config;

typedef struct {
    const float *ln1_w, *ln1_b;            /* (d,) norm before attention; b only for LayerNorm */
    Mat W_QKV; const float *b_QKV;         /* (H*dh + 2*KV*dh, d): q, k, v rows fused at load, or data NULL */
    Mat W_Q; const float *b_Q;             /* (H*dh, d), (H*dh,) */
    Mat W_K, W_V; const float *b_K, *b_V;  /* (KV*dh, d), (KV*dh,) */
    const float *q_norm_w, *k_norm_w;      /* (dh,) */
    Mat W_O; const float *b_O;             /* (d, H*dh), (d,) */
    const float *post_attn_norm_w;         /* (d,) Gemma */
    const float *ln2_w, *ln2_b;            /* (d,) norm before the MLP */
    Mat W_gate_up; const float *b_gate_up; /* (2F, d): gate then up rows fused at load, or data NULL */
    Mat W_gate, W_up; const float *b_gate, *b_up; /* (F, d), (F,) */
    Mat W_down; const float *b_down;       /* (d, F), (d,) */
    const float *post_mlp_norm_w;          /* (d,) Gemma */
} LayerWeights;

typedef struct {
    Mat W_E;              /* (V, d) token embedding (rows gathered, dequantized) */
    const float *W_pos;   /* (n_ctx, d) learned positions or NULL */
    const float *ln_f_w, *ln_f_b; /* (d,) final norm */
    Mat W_U;              /* (V, d) unembedding (may share W_E's data) */
    const float *b_U;     /* (V,) unembedding bias (GPT-J's lm_head) or NULL */
    LayerWeights *layers; /* (L,) */
} Weights;

/* A batch: n_seq sequences whose new rows are stacked. Sequence s has len[s] new rows starting at
 * absolute position start[s]; its first start[s] positions come from a prefix K/V cache. */
typedef struct {
    int n_seq;
    const int *len;           /* (S,) */
    const int *start;         /* (S,) 0 when there is no prefix */
    const float *const *pk;   /* (S,) prefix keys of layer l, position p: pk[s][l*pstride + p*KV*dh] */
    const float *const *pv;   /* (S,) same for values; NULL entries when start[s] == 0 */
    int64_t pstride;          /* floats between layers in the prefix caches */
} Batch;

/* A patch of row `row` of a site in `layer` (-1 for SITE_EMBED): the elements offset .. offset+width-1 of
 * the row's site vector (for SITE_ATTN: the probabilities of keys offset .. of query head `head`). */
typedef struct {
    int site, layer, op, head;
    int64_t row, offset;
    int width;
    const float *value; /* (width,), NULL for OP_ZERO */
} Patch;
typedef struct { int layer; int64_t row; int key; /* absolute key position */ } EdgeBlock;

/* Optional outputs: NULL pointers are not captured. Per-layer captures hold L layers of N rows each;
 * layers before start_layer are left untouched. */
typedef struct {
    float *embed;       /* (N, d) */
    float *resid_pre;   /* (L, N, d) */
    float *resid_mid;   /* (L, N, d) residual after the attention add (not for parallel blocks) */
    float *attn_out;    /* (L, N, d) */
    float *mlp_out;     /* (L, N, d) */
    float *head_out;    /* (L, H, N, d) each head's share of attn_out without b_O */
    float *attn;        /* (L, H, sum_s len[s] * (start[s] + len[s])) attention probabilities */
    float *z;           /* (L, N, H*dh) attention mixed values (input of W_O) */
    float *q;           /* (L, N, H*dh) queries before q-norm and rotary */
    float *k;           /* (L, N, KV*dh) keys before k-norm and rotary */
    float *v;           /* (L, N, KV*dh) values */
    float *mlp_post;    /* (L, N, F) MLP hidden activations (input of W_down) */
    /* intermediates a backward pass reads (backward.c's tape; any caller may ask for them) */
    float *mlp_pre;     /* (L, N, 2F) gated: [gate | up] before the activation; (L, N, F) else: up */
    float *attn_pre_norm; /* (L, N, d) W_O's output before the post-attention norm (post_norms only) */
    float *mlp_pre_norm;  /* (L, N, d) W_down's output before the post-MLP norm (post_norms only) */
    float *q_cache;     /* (L, N, H*dh) queries after q-norm and rotary */
    float *norm_scale_attn; /* (L, N) scale of the post-attention norm (Gemma), for exact head_out */
    float *k_cache;     /* (L, N, KV*dh) keys after norm and rope */
    float *v_cache;     /* (L, N, KV*dh) values */
    float *resid_final; /* (N, d) before the final norm */
    float *final_scale; /* (N,) the final norm's 1/sqrt(var+eps) per row */
    const int64_t *logit_rows; int64_t n_logit_rows; /* rows whose logits are wanted */
    float *logits;      /* (n_logit_rows, V) */
    const int64_t *targets; double *target_prob; /* (n_logit_rows,): softmax probability of targets[i] */
} Capture;

typedef struct {
    Config cfg;
    Weights w;
} Model;

/* forward.c: runs blocks start_layer .. end_layer-1 on the embeddings of ids, or on resid_in (N, d) if
 * given. With end_layer < L the pass stops there: resid_final receives the residual stream after block
 * end_layer-1 and no logits are computed. pool: the threads to run on (NULL: the calling thread only);
 * the caller owns it and must not use it elsewhere during the call. */
int model_forward(const Model *m, Pool *pool, const Batch *b, const int32_t *ids, const float *resid_in,
                  int start_layer, int end_layer, const Patch *patches, int64_t n_patches,
                  const EdgeBlock *blocks, int64_t n_blocks, Capture *cap, char *err, size_t errlen);

/* ---- backward.c: gradients of a scalar metric of the logits w.r.t. activations (no weight gradients) ---- */

/* The metric M = sum_i weight[i] * m_i, m_i a function of the final (soft-capped) logits x (V,) of batch row
 * row[i]: x[a] (METRIC_LOGIT), log softmax(x)[a] (METRIC_LOGPROB), softmax(x)[a] (METRIC_PROB) or x[a] - x[b]
 * (METRIC_LOGIT_DIFF). ROME's mean answer probability over S noise samples: one METRIC_PROB seed per
 * corrupted row with weight 1/S. */
enum { METRIC_LOGIT = 0, METRIC_LOGPROB = 1, METRIC_PROB = 2, METRIC_LOGIT_DIFF = 3 };
typedef struct { int64_t row; int kind; int64_t a, b; double weight; } Seed;

/* dM/d(site) where NULL is not wanted; layouts as the captures of the same name. The gradient of a site is
 * taken w.r.t. the value the rest of the model reads there (after that site's patches); through a patch it
 * flows as the patch's transpose (set/zero: 0, add: 1, mul: times the value, project: projected). */
typedef struct {
    float *embed;                                  /* (N, d) */
    float *resid_pre, *resid_mid, *attn_out, *mlp_out, *resid_post; /* (L, N, d) */
    float *q, *z;                                  /* (L, N, H*dh) */
    float *k, *v;                                  /* (L, N, KV*dh) */
    float *attn;                                   /* (L, H, attn_total) w.r.t. the probabilities, every key */
    float *mlp_post;                               /* (L, N, F) */
    /* the residual-stream input of one node (edge attribution): dM/d(x) through that node alone, x being
     * the block input (the MLP's: resid_mid, parallel blocks: resid_pre) seen by its norm */
    float *q_in;                                   /* (L, N, H, d) through head h's query */
    float *k_in, *v_in;                            /* (L, N, KV, d) through kv head g's key / value */
    float *mlp_in;                                 /* (L, N, d) through the MLP */
    int drop_layer;                                /* GradDrop: -1, or a block whose attention and MLP pass no
                                                      gradient (only its residual path does) */
} Grads;

/* Runs the forward pass of ids (sequences from position 0; no prefix caches) with patches and edge blocks as
 * model_forward, keeping what the backward needs (the fields of cap that are given are filled as well), then
 * for each of the n_pass entries of g one backward pass from the seeds. metric (n_seeds,) receives each
 * m_i. Returns 0, or -1 with err. */
int model_backward(const Model *m, Pool *pool, const Batch *b, const int32_t *ids, const Patch *patches,
                   int64_t n_patches, const EdgeBlock *blocks, int64_t n_blocks, const Seed *seeds, int64_t n_seeds,
                   Capture *cap, Grads *g, int n_pass, double *metric, char *err, size_t errlen);

/* forward.c helpers shared with backward.c */
int64_t ft_grain(const Pool *pool, int64_t n, int64_t per_item);
/* x (n,) += y (n,) on the pool (forward.c; the backward pass shares it) */
void ft_add_into(Pool *pool, float *x, const float *y, int64_t n);
float ft_norm_row(float *out, const float *x, int d, const float *w, const float *b, float eps, int kind);
int ft_softmax_row(float *s, int P, int lo, int pos, const unsigned char *bl, const Config *c);

/* convert.c: storage formats to float32 */
void f16_to_f32(const uint16_t *in, float *out, int64_t n);
void bf16_to_f32(const uint16_t *in, float *out, int64_t n);

#endif
