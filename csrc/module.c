/* factrace._core: the Python face of the C core.
 *   Model(config: dict, weights: dict, threads=1)  holds references to the weights (no copies): float32
 *                                       arrays, and linear weights as stored (objects with .type, .shape, .data)
 *   Model.forward(...)                  validates every argument, then runs model_forward without the GIL on the
 *                                       model's thread pool (a second thread calling meanwhile gets its own)
 *   Model.threads / set_threads(n)      the pool's size
 *   matmul(x, w, bias=None, threads=1)  x @ w^T with a weight as stored (the C matrix-product layer)
 *   dequant_rows(data, type, n_in)      rows of a stored weight as float32
 *   convert(raw, kind) / sgemm(a, b) / BLAS
 * OpenBLAS is kept single-threaded: factrace's own pool owns the threads (csrc/pool.c, csrc/matmul.c).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <numpy/arrayobject.h>
#include <stdlib.h>
#include <string.h>

#include "blas.h"
#include "factrace.h"

#ifndef FACTRACE_BLAS_NAME
#define FACTRACE_BLAS_NAME "unknown"
#endif

typedef struct {
    PyObject_HEAD
    Model m;
    PyObject *refs; /* list: every array the Model points into */
    LayerWeights *layers;
    int *layer_window, *layer_rope;
    float *rope_inv_freq, *rope_mscale;
    int n_threads;  /* threads of a forward call (the caller included) */
    Pool *pool;     /* created on first use; used by one call at a time */
    int pool_busy;  /* atomic: a call holds the pool */
} PyModel;

/* ------------------------------------------------------------------------------------------ */
/* helpers                                                                                      */

static int dict_int(PyObject *d, const char *key, int *out, int required) {
    PyObject *v = PyDict_GetItemString(d, key);
    if (!v) {
        if (required) { PyErr_Format(PyExc_KeyError, "core config lacks '%s'", key); return -1; }
        return 0;
    }
    long x = PyLong_AsLong(v);
    if (x == -1 && PyErr_Occurred()) return -1;
    if (x < -2147483647L || x > 2147483647L) {
        PyErr_Format(PyExc_ValueError, "core config '%s' = %ld is out of range", key, x);
        return -1;
    }
    *out = (int)x;
    return 0;
}

static int dict_float(PyObject *d, const char *key, float *out, int required) {
    PyObject *v = PyDict_GetItemString(d, key);
    if (!v) {
        if (required) { PyErr_Format(PyExc_KeyError, "core config lacks '%s'", key); return -1; }
        return 0;
    }
    double x = PyFloat_AsDouble(v);
    if (x == -1.0 && PyErr_Occurred()) return -1;
    *out = (float)x;
    return 0;
}

/* A float32 C-contiguous array of exactly the given shape (dims < 0 are not checked), kept in refs. */
static const float *get_weight(PyModel *self, PyObject *weights, const char *name, int required, int ndim,
                               npy_intp d0, npy_intp d1) {
    PyObject *a = PyDict_GetItemString(weights, name);
    if (!a || a == Py_None) {
        if (required) PyErr_Format(PyExc_KeyError, "missing weight '%s'", name);
        return NULL;
    }
    if (!PyArray_Check(a) || PyArray_TYPE((PyArrayObject *)a) != NPY_FLOAT32 ||
        !PyArray_IS_C_CONTIGUOUS((PyArrayObject *)a) || !PyArray_ISALIGNED((PyArrayObject *)a)) {
        PyErr_Format(PyExc_TypeError, "weight '%s' must be an aligned C-contiguous float32 array", name);
        return NULL;
    }
    PyArrayObject *arr = (PyArrayObject *)a;
    npy_intp want[2] = {d0, d1};
    if (PyArray_NDIM(arr) != ndim) goto bad;
    for (int i = 0; i < ndim; i++)
        if (PyArray_DIM(arr, i) != want[i]) goto bad;
    if (PyList_Append(self->refs, a) < 0) return NULL;
    return (const float *)PyArray_DATA(arr);
bad:
    if (ndim == 1)
        PyErr_Format(PyExc_ValueError, "weight '%s' should have shape (%zd,)", name, (Py_ssize_t)d0);
    else
        PyErr_Format(PyExc_ValueError, "weight '%s' should have shape (%zd, %zd)", name, (Py_ssize_t)d0,
                     (Py_ssize_t)d1);
    return NULL;
}

/* A linear weight of shape (n_out, n_in): a float32 C-contiguous array (F32), or a weight kept as stored: an
 * object with .type (ggml type id), .shape (n_out, n_in) and .data (uint8, C-contiguous, n_out rows of the
 * type's row bytes). Fills *out (data NULL when absent and not required); the data array is kept in refs. */
static int get_mat(PyModel *self, PyObject *weights, const char *name, int required, npy_intp n_out, npy_intp n_in,
                   Mat *out) {
    memset(out, 0, sizeof *out);
    PyObject *a = PyDict_GetItemString(weights, name);
    if (!a || a == Py_None) {
        if (required) PyErr_Format(PyExc_KeyError, "missing weight '%s'", name);
        return required ? -1 : 0;
    }
    if (PyArray_Check(a)) {
        if (!get_weight(self, weights, name, 1, 2, n_out, n_in)) return -1;
        *out = (Mat){0, n_out, n_in, PyArray_DATA((PyArrayObject *)a), (int64_t)n_in * 4};
        return 0;
    }
    PyObject *ot = PyObject_GetAttrString(a, "type"), *os = ot ? PyObject_GetAttrString(a, "shape") : NULL;
    PyObject *od = os ? PyObject_GetAttrString(a, "data") : NULL;
    int rc = -1;
    if (!od) goto done;
    long type = PyLong_AsLong(ot);
    Py_ssize_t s0 = -1, s1 = -1;
    if (PyTuple_Check(os) && PyTuple_GET_SIZE(os) == 2) {
        s0 = PyLong_AsSsize_t(PyTuple_GET_ITEM(os, 0));
        s1 = PyLong_AsSsize_t(PyTuple_GET_ITEM(os, 1));
    }
    if (PyErr_Occurred()) goto done;
    int64_t rb = 0;
    if (type < 0 || type > 64 || mat_row_bytes((int)type, n_in, &rb) != 0) {
        PyErr_Format(PyExc_ValueError, "weight '%s' has a storage type (%ld) or width (%zd) the C core cannot use",
                     name, type, (Py_ssize_t)n_in);
        goto done;
    }
    PyArrayObject *d = (PyArrayObject *)od;
    if (s0 != n_out || s1 != n_in || !PyArray_Check(od) || PyArray_TYPE(d) != NPY_UINT8 ||
        !PyArray_IS_C_CONTIGUOUS(d) || PyArray_NBYTES(d) != (npy_intp)(rb * n_out)) {
        PyErr_Format(PyExc_ValueError, "weight '%s' should be (%zd, %zd) with %lld bytes of uint8 data", name,
                     (Py_ssize_t)n_out, (Py_ssize_t)n_in, (long long)(rb * n_out));
        goto done;
    }
    if (PyList_Append(self->refs, od) < 0) goto done;
    *out = (Mat){(int)type, n_out, n_in, PyArray_DATA(d), rb};
    rc = 0;
done:
    Py_XDECREF(ot); Py_XDECREF(os); Py_XDECREF(od);
    return rc;
}

#define WEIGHT(dst, req, nd, a, b)                                                                          \
    do {                                                                                                  \
        dst = get_weight(self, weights, name, req, nd, a, b);                                            \
        if (!dst && PyErr_Occurred()) return -1;                                                          \
    } while (0)

/* ------------------------------------------------------------------------------------------ */
/* Model                                                                                        */

static void Model_dealloc(PyModel *self) {
    pool_free(self->pool);
    Py_XDECREF(self->refs);
    free(self->layers);
    free(self->layer_window);
    free(self->layer_rope);
    free(self->rope_inv_freq);
    free(self->rope_mscale);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static int Model_init(PyModel *self, PyObject *args, PyObject *kw) {
    PyObject *cfgd, *weights;
    int threads = 1;
    static char *kwlist[] = {"config", "weights", "threads", NULL};
    if (!PyArg_ParseTupleAndKeywords(args, kw, "O!O!|i", kwlist, &PyDict_Type, &cfgd, &PyDict_Type, &weights, &threads))
        return -1;
    if (threads < 1 || threads > 1024) { PyErr_SetString(PyExc_ValueError, "threads must be in [1, 1024]"); return -1; }
    self->n_threads = threads;
    if (self->refs) { PyErr_SetString(PyExc_RuntimeError, "Model already initialised"); return -1; }
    self->refs = PyList_New(0);
    if (!self->refs) return -1;
    Config *c = &self->m.cfg;
    memset(c, 0, sizeof(*c));
    c->embed_scale = 1.0f;
    if (dict_int(cfgd, "n_layers", &c->n_layers, 1) || dict_int(cfgd, "n_heads", &c->n_heads, 1) ||
        dict_int(cfgd, "n_kv_heads", &c->n_kv_heads, 1) || dict_int(cfgd, "d_model", &c->d_model, 1) ||
        dict_int(cfgd, "d_head", &c->d_head, 1) || dict_int(cfgd, "d_mlp", &c->d_mlp, 1) ||
        dict_int(cfgd, "vocab_size", &c->vocab_size, 1) || dict_int(cfgd, "n_ctx", &c->n_ctx, 1) ||
        dict_int(cfgd, "norm", &c->norm, 1) || dict_float(cfgd, "norm_eps", &c->norm_eps, 1) ||
        dict_int(cfgd, "act", &c->act, 1) || dict_int(cfgd, "gated_mlp", &c->gated_mlp, 1) ||
        dict_int(cfgd, "learned_pos", &c->learned_pos, 1) || dict_int(cfgd, "rope", &c->rope, 1) ||
        dict_int(cfgd, "qk_norm", &c->qk_norm, 0) || dict_int(cfgd, "post_norms", &c->post_norms, 0) ||
        dict_float(cfgd, "embed_scale", &c->embed_scale, 0) || dict_float(cfgd, "attn_scale", &c->attn_scale, 1) ||
        dict_float(cfgd, "attn_softcap", &c->attn_softcap, 0) ||
        dict_float(cfgd, "final_softcap", &c->final_softcap, 0) || dict_int(cfgd, "parallel", &c->parallel, 0) ||
        dict_int(cfgd, "rope_dim", &c->rope_dim, 0) || dict_int(cfgd, "rope_interleaved", &c->rope_interleaved, 0))
        return -1;
    int L = c->n_layers, d = c->d_model, H = c->n_heads, KV = c->n_kv_heads, dh = c->d_head, F = c->d_mlp;
    if (L < 1 || d < 1 || H < 1 || KV < 1 || dh < 1 || F < 1 || c->vocab_size < 1 || c->n_ctx < 1 ||
        H % KV != 0 || (c->rope && dh % 2) || L > 100000 || d > (1 << 20) || dh > (1 << 16) ||
        (int64_t)H * dh > (1 << 24) || F > (1 << 24)) {
        PyErr_Format(PyExc_ValueError,
                     "inconsistent core config: n_layers=%d d_model=%d n_heads=%d n_kv_heads=%d d_head=%d d_mlp=%d",
                     L, d, H, KV, dh, F);
        return -1;
    }
    if (c->norm != NORM_LAYER && c->norm != NORM_RMS) { PyErr_SetString(PyExc_ValueError, "bad norm kind"); return -1; }
    if (c->rope_dim == 0) c->rope_dim = dh;
    if (c->rope && (c->rope_dim < 2 || c->rope_dim > dh || c->rope_dim % 2)) {
        PyErr_Format(PyExc_ValueError, "rope_dim=%d must be even and in [2, d_head=%d]", c->rope_dim, dh);
        return -1;
    }
    /* per-layer tables */
    self->layer_window = calloc(L, sizeof(int));
    self->layer_rope = calloc(L, sizeof(int));
    self->layers = calloc(L, sizeof(LayerWeights));
    if (!self->layer_window || !self->layer_rope || !self->layers) { PyErr_NoMemory(); return -1; }
    PyObject *lw = PyDict_GetItemString(cfgd, "layer_window"), *lr = PyDict_GetItemString(cfgd, "layer_rope");
    for (int i = 0; i < 2; i++) {
        PyObject *seq = i ? lr : lw;
        int *dst = i ? self->layer_rope : self->layer_window;
        if (!seq) continue;
        if (!PyList_Check(seq) || PyList_GET_SIZE(seq) != L) {
            PyErr_SetString(PyExc_ValueError, "layer_window / layer_rope must be lists of n_layers ints");
            return -1;
        }
        for (int l = 0; l < L; l++) {
            long x = PyLong_AsLong(PyList_GET_ITEM(seq, l));
            if (x == -1 && PyErr_Occurred()) return -1;
            if (x < 0 || x > 2147483647L) { PyErr_SetString(PyExc_ValueError, "bad per-layer value"); return -1; }
            dst[l] = (int)x;
        }
    }
    c->layer_window = self->layer_window;
    c->layer_rope = self->layer_rope;
    if (c->rope) {
        PyObject *inv = PyDict_GetItemString(cfgd, "rope_inv_freq"), *ms = PyDict_GetItemString(cfgd, "rope_mscale");
        PyArrayObject *ia = inv ? (PyArrayObject *)PyArray_FROMANY(inv, NPY_FLOAT32, 2, 2, NPY_ARRAY_CARRAY) : NULL;
        PyArrayObject *ma = ms ? (PyArrayObject *)PyArray_FROMANY(ms, NPY_FLOAT32, 1, 1, NPY_ARRAY_CARRAY) : NULL;
        if (!ia || !ma || PyArray_DIM(ia, 1) != c->rope_dim / 2 || PyArray_DIM(ma, 0) != PyArray_DIM(ia, 0) ||
            PyArray_DIM(ia, 0) < 1) {
            Py_XDECREF(ia); Py_XDECREF(ma);
            if (!PyErr_Occurred())
                PyErr_SetString(PyExc_ValueError, "rope_inv_freq must be (n_tables, rope_dim/2) with one mscale per table");
            return -1;
        }
        int nt = (int)PyArray_DIM(ia, 0);
        self->rope_inv_freq = malloc(sizeof(float) * nt * (c->rope_dim / 2));
        self->rope_mscale = malloc(sizeof(float) * nt);
        if (!self->rope_inv_freq || !self->rope_mscale) { Py_DECREF(ia); Py_DECREF(ma); PyErr_NoMemory(); return -1; }
        memcpy(self->rope_inv_freq, PyArray_DATA(ia), sizeof(float) * nt * (c->rope_dim / 2));
        memcpy(self->rope_mscale, PyArray_DATA(ma), sizeof(float) * nt);
        Py_DECREF(ia); Py_DECREF(ma);
        c->n_rope_tables = nt;
        c->rope_inv_freq = self->rope_inv_freq;
        c->rope_mscale = self->rope_mscale;
        for (int l = 0; l < L; l++)
            if (self->layer_rope[l] >= nt) { PyErr_SetString(PyExc_ValueError, "layer_rope index out of range"); return -1; }
    }

    Weights *w = &self->m.w;
    const char *name;
    int V = c->vocab_size, is_ln = c->norm == NORM_LAYER;
    if (get_mat(self, weights, "W_E", 1, V, d, &w->W_E) || get_mat(self, weights, "W_U", 1, V, d, &w->W_U)) return -1;
    name = "b_U"; WEIGHT(w->b_U, 0, 1, V, 0);
    name = "ln_f_w"; WEIGHT(w->ln_f_w, 1, 1, d, 0);
    name = "ln_f_b"; WEIGHT(w->ln_f_b, 0, 1, d, 0);
    if (c->learned_pos) { name = "W_pos"; WEIGHT(w->W_pos, 1, 2, c->n_ctx, d); }
    w->layers = self->layers;
    char buf[64];
    name = buf;
    for (int l = 0; l < L; l++) {
        LayerWeights *y = &self->layers[l];
#define LW(field, req, nd, a, b) snprintf(buf, sizeof buf, "blocks.%d." #field, l); WEIGHT(y->field, req, nd, a, b)
#define LM(field, req, a, b) snprintf(buf, sizeof buf, "blocks.%d." #field, l); \
        if (get_mat(self, weights, buf, req, a, b, &y->field)) return -1
        LW(ln1_w, 1, 1, d, 0); LW(ln1_b, is_ln, 1, d, 0);
        LM(W_QKV, 0, (H + 2 * KV) * dh, d); LW(b_QKV, 0, 1, (H + 2 * KV) * dh, 0);
        LM(W_Q, 1, H * dh, d); LW(b_Q, 0, 1, H * dh, 0);
        LM(W_K, 1, KV * dh, d); LW(b_K, 0, 1, KV * dh, 0);
        LM(W_V, 1, KV * dh, d); LW(b_V, 0, 1, KV * dh, 0);
        LW(q_norm_w, c->qk_norm, 1, dh, 0); LW(k_norm_w, c->qk_norm, 1, dh, 0);
        LM(W_O, 1, d, H * dh); LW(b_O, 0, 1, d, 0);
        LW(post_attn_norm_w, c->post_norms, 1, d, 0);
        LW(ln2_w, 1, 1, d, 0); LW(ln2_b, is_ln, 1, d, 0);
        if (c->gated_mlp) { LM(W_gate_up, 0, 2 * F, d); LW(b_gate_up, 0, 1, 2 * F, 0); }
        LM(W_gate, c->gated_mlp, F, d); LW(b_gate, 0, 1, F, 0);
        LM(W_up, 1, F, d); LW(b_up, 0, 1, F, 0);
        LM(W_down, 1, d, F); LW(b_down, 0, 1, d, 0);
        LW(post_mlp_norm_w, c->post_norms, 1, d, 0);
        /* a fused product replaces its parts' biases only when it carries them all */
        if (y->W_QKV.data && !y->b_QKV && (y->b_Q || y->b_K || y->b_V)) {
            PyErr_Format(PyExc_ValueError, "blocks.%d.W_QKV: the parts have biases but b_QKV is missing", l);
            return -1;
        }
        if (y->W_gate_up.data && !y->b_gate_up && (y->b_gate || y->b_up)) {
            PyErr_Format(PyExc_ValueError, "blocks.%d.W_gate_up: the parts have biases but b_gate_up is missing", l);
            return -1;
        }
#undef LW
#undef LM
    }
    return 0;
}

/* ------------------------------------------------------------------------------------------ */
/* forward                                                                                      */

/* Borrowed-or-converted input array; NULL (no error) when obj is None/NULL. */
static PyArrayObject *in_array(PyObject *obj, int type, int ndim, const char *what) {
    if (!obj || obj == Py_None) return NULL;
    PyArrayObject *a = (PyArrayObject *)PyArray_FROMANY(obj, type, ndim, ndim, NPY_ARRAY_CARRAY_RO);
    if (!a && !PyErr_Occurred()) PyErr_Format(PyExc_TypeError, "bad array for %s", what);
    return a;
}

/* A capture output of numpy type `type`, C-contiguous, writeable, exactly n elements. */
static void *out_array_of(PyObject *capd, const char *key, int64_t n, int type, const char *tname) {
    PyObject *a = PyDict_GetItemString(capd, key);
    if (!a || a == Py_None) return NULL;
    PyArrayObject *arr = (PyArrayObject *)a;
    if (!PyArray_Check(a) || PyArray_TYPE(arr) != type || !PyArray_IS_C_CONTIGUOUS(arr) ||
        !PyArray_ISWRITEABLE(arr) || !PyArray_ISALIGNED(arr) || PyArray_SIZE(arr) != n) {
        PyErr_Format(PyExc_ValueError, "capture '%s' must be a writeable C-contiguous %s array of %lld elements",
                     key, tname, (long long)n);
        return NULL;
    }
    return PyArray_DATA(arr);
}

static float *out_array(PyObject *capd, const char *key, int64_t n) {
    return out_array_of(capd, key, n, NPY_FLOAT32, "float32");
}

/* Width of one row's vector at a site (SITE_ATTN: the keys P of the row's sequence). */
static int64_t site_width(const Config *c, int site, int64_t P) {
    int qd = c->n_heads * c->d_head, kvd = c->n_kv_heads * c->d_head;
    switch (site) {
    case SITE_Q: case SITE_Z: return qd;
    case SITE_K: case SITE_V: return kvd;
    case SITE_MLP_POST: return c->d_mlp;
    case SITE_ATTN: return P;
    default: return c->d_model;
    }
}

/* The patch arrays of Model.forward, checked: site, layer, row, op (n,) and either value (n, d) (whole
 * residual-width rows) or offset, width, head (n,) with value flat float32 and voff (n,) its offsets.
 * On success *out (n) point into arrays kept alive by *keep. Returns 0, or -1 with an exception. */
static int parse_patches(PyModel *self, PyObject *o_ps, PyObject *o_pl, PyObject *o_pr, PyObject *o_po, PyObject *o_pval,
                         PyObject *o_poff, PyObject *o_pw, PyObject *o_ph, PyObject *o_pvo, int64_t N, int S,
                         const int *len, const int *st, int from_resid, Patch **out, int64_t *out_n, PyObject **keep) {
    const Config *c = &self->m.cfg;
    int L = c->n_layers, d = c->d_model, flat = o_pw && o_pw != Py_None;
    PyArrayObject *a[9] = {NULL};
    const char *names[9] = {"patch_site", "patch_layer", "patch_row", "patch_op", "patch_value", "patch_offset",
                            "patch_width", "patch_head", "patch_voff"};
    PyObject *objs[9] = {o_ps, o_pl, o_pr, o_po, o_pval, o_poff, o_pw, o_ph, o_pvo};
    int types[9] = {NPY_INT32, NPY_INT32, NPY_INT64, NPY_INT32, NPY_FLOAT32, NPY_INT64, NPY_INT32, NPY_INT32, NPY_INT64};
    int *row_seq = NULL, rc = -1;
    *keep = PyList_New(0);
    if (!*keep) return -1;
    for (int i = 0; i < 9; i++) {
        if (i >= 5 && !flat) break;
        int nd = i == 4 && !flat ? 2 : 1;
        a[i] = in_array(objs[i], types[i], nd, names[i]);
        if (PyErr_Occurred()) goto done;
        if (!a[i] && i != 4) { PyErr_Format(PyExc_ValueError, "%s missing", names[i]); goto done; }
        if (a[i]) { /* the list keeps it alive */
            int bad = PyList_Append(*keep, (PyObject *)a[i]) < 0;
            Py_DECREF(a[i]);
            if (bad) goto done;
        }
    }
    int64_t n = PyArray_DIM(a[0], 0), nval = a[4] ? PyArray_SIZE(a[4]) : 0;
    for (int i = 1; i < (flat ? 9 : 4); i++)
        if (i != 4 && PyArray_DIM(a[i], 0) != n) { PyErr_SetString(PyExc_ValueError, "patch arrays differ in length"); goto done; }
    if (!flat && a[4] && (PyArray_DIM(a[4], 0) != n || PyArray_DIM(a[4], 1) != d)) {
        PyErr_SetString(PyExc_ValueError, "patch_value must be (n_patches, d_model)");
        goto done;
    }
    Patch *p = calloc(n ? n : 1, sizeof(Patch));
    row_seq = malloc(sizeof(int) * (N ? N : 1));
    if (!p || !row_seq) { free(p); PyErr_NoMemory(); goto done; }
    *out = p;
    for (int i = 0, r = 0; i < S; i++)
        for (int t = 0; t < len[i]; t++) row_seq[r++] = i;
    const int *s_ = PyArray_DATA(a[0]), *l_ = PyArray_DATA(a[1]), *o_ = PyArray_DATA(a[3]);
    const int64_t *r_ = PyArray_DATA(a[2]);
    const float *vals = a[4] ? PyArray_DATA(a[4]) : NULL;
    for (int64_t i = 0; i < n; i++, p++) {
        p->site = s_[i]; p->layer = l_[i]; p->row = r_[i]; p->op = o_[i]; p->head = -1;
        int64_t voff = i * d;
        p->offset = 0;
        p->width = d;
        if (flat) {
            p->offset = ((const int64_t *)PyArray_DATA(a[5]))[i];
            p->width = ((const int *)PyArray_DATA(a[6]))[i];
            p->head = ((const int *)PyArray_DATA(a[7]))[i];
            voff = ((const int64_t *)PyArray_DATA(a[8]))[i];
        }
        int lay_ok = p->site == SITE_EMBED ? p->layer == -1 : (p->layer >= 0 && p->layer < L);
        int ok = p->site >= 0 && p->site < N_SITES && lay_ok && p->row >= 0 && p->row < N && p->op >= 0 && p->op < N_OPS;
        if (ok) {
            int q = row_seq[p->row];
            int64_t W = site_width(c, p->site, (int64_t)st[q] + len[q]);
            ok = p->offset >= 0 && p->width >= 1 && p->offset + p->width <= W && !(c->parallel && p->site == SITE_RESID_MID) &&
                 (p->site != SITE_ATTN || (p->head >= 0 && p->head < c->n_heads)) &&
                 (p->op == OP_ZERO || (vals && voff >= 0 && voff + p->width <= nval));
        }
        if (!ok) {
            PyErr_Format(PyExc_ValueError, "patch %lld is invalid (site %d, layer %d, row %lld, op %d, offset %lld, "
                         "width %d, head %d)", (long long)i, p->site, p->layer, (long long)p->row, p->op,
                         (long long)p->offset, p->width, p->head);
            goto done;
        }
        p->value = p->op == OP_ZERO ? NULL : vals + voff;
        if (p->site == SITE_EMBED && from_resid) { PyErr_SetString(PyExc_ValueError, "an embedding patch needs a run from token ids"); goto done; }
    }
    *out_n = n;
    rc = 0;
done:
    free(row_seq);
    return rc;
}

/* The pool a forward call runs on: the model's own (created on first use, of n_threads threads;
 * *hold = 2) unless another call holds it, then a pool of its own (*hold = 1); NULL (serial) for one
 * thread (*hold = 0). No GIL needed. */
static Pool *acquire_pool(PyModel *self, int *hold) {
    *hold = 0;
    int n = __atomic_load_n(&self->n_threads, __ATOMIC_RELAXED);
    if (n < 2) return NULL;
    if (__atomic_exchange_n(&self->pool_busy, 1, __ATOMIC_ACQUIRE)) {
        *hold = 1;
        return pool_new(n);
    }
    *hold = 2;
    if (self->pool && pool_threads(self->pool) != n) {
        pool_free(self->pool);
        self->pool = NULL;
    }
    if (!self->pool) self->pool = pool_new(n); /* NULL if no thread starts: serial */
    return self->pool;
}

static void release_pool(PyModel *self, Pool *pool, int hold) {
    if (hold == 1) pool_free(pool);
    if (hold == 2) __atomic_store_n(&self->pool_busy, 0, __ATOMIC_RELEASE);
}

/* The seeds of a backward call: seed_row (n,) int64, seed_kind (n,) int32 (METRIC_*), seed_tok (n, 2) int64
 * (a, b), seed_weight (n,) float64, checked against the batch; *out (n) allocated. */
static int parse_seeds(const Config *c, PyObject *o_row, PyObject *o_kind, PyObject *o_tok, PyObject *o_w, int64_t N,
                       Seed **out, int64_t *n_out) {
    PyArrayObject *r = in_array(o_row, NPY_INT64, 1, "seed_row"), *k = NULL, *t = NULL, *w = NULL;
    int rc = -1;
    if (r) k = in_array(o_kind, NPY_INT32, 1, "seed_kind");
    if (k) t = in_array(o_tok, NPY_INT64, 2, "seed_tok");
    if (t) w = in_array(o_w, NPY_FLOAT64, 1, "seed_weight");
    if (!w) {
        if (!PyErr_Occurred()) PyErr_SetString(PyExc_ValueError, "backward needs seed_row, seed_kind, seed_tok and seed_weight");
        goto done;
    }
    int64_t n = PyArray_DIM(r, 0);
    if (n < 1 || PyArray_DIM(k, 0) != n || PyArray_DIM(t, 0) != n || PyArray_DIM(t, 1) != 2 || PyArray_DIM(w, 0) != n) {
        PyErr_SetString(PyExc_ValueError, "seed arrays: seed_row, seed_kind, seed_weight (n,) and seed_tok (n, 2), n >= 1");
        goto done;
    }
    Seed *sd = calloc(n, sizeof(Seed));
    if (!sd) { PyErr_NoMemory(); goto done; }
    const int64_t *rr = PyArray_DATA(r), *tt = PyArray_DATA(t);
    const int *kk = PyArray_DATA(k);
    const double *ww = PyArray_DATA(w);
    for (int64_t i = 0; i < n; i++) {
        sd[i] = (Seed){rr[i], kk[i], tt[2 * i], tt[2 * i + 1], ww[i]};
        if (rr[i] < 0 || rr[i] >= N || kk[i] < METRIC_LOGIT || kk[i] > METRIC_LOGIT_DIFF || tt[2 * i] < 0 ||
            tt[2 * i] >= c->vocab_size || (kk[i] == METRIC_LOGIT_DIFF && (tt[2 * i + 1] < 0 || tt[2 * i + 1] >= c->vocab_size)) ||
            !isfinite(ww[i])) {
            PyErr_Format(PyExc_ValueError, "seed %lld is invalid (row %lld, kind %d, tokens %lld %lld)", (long long)i,
                         (long long)rr[i], kk[i], (long long)tt[2 * i], (long long)tt[2 * i + 1]);
            free(sd);
            goto done;
        }
    }
    *out = sd;
    *n_out = n;
    rc = 0;
done:
    Py_XDECREF(r); Py_XDECREF(k); Py_XDECREF(t); Py_XDECREF(w);
    return rc;
}

/* The gradient outputs of a backward call: dict of site -> float32 array of n_pass times the site's size. */
static int parse_grads(const Config *c, PyObject *gd, int64_t N, int64_t attn_total, int n_pass, Grads *g) {
    int64_t L = c->n_layers, d = c->d_model, qd = (int64_t)c->n_heads * c->d_head, kvd = (int64_t)c->n_kv_heads * c->d_head;
    struct { const char *name; float **dst; int64_t n; } f[] = {
        {"embed", &g->embed, N * d}, {"resid_pre", &g->resid_pre, L * N * d}, {"resid_mid", &g->resid_mid, L * N * d},
        {"attn_out", &g->attn_out, L * N * d}, {"mlp_out", &g->mlp_out, L * N * d},
        {"resid_post", &g->resid_post, L * N * d}, {"q", &g->q, L * N * qd}, {"z", &g->z, L * N * qd},
        {"k", &g->k, L * N * kvd}, {"v", &g->v, L * N * kvd}, {"attn", &g->attn, L * c->n_heads * attn_total},
        {"mlp_post", &g->mlp_post, L * N * c->d_mlp}, {"q_in", &g->q_in, L * N * c->n_heads * d},
        {"k_in", &g->k_in, L * N * c->n_kv_heads * d}, {"v_in", &g->v_in, L * N * c->n_kv_heads * d},
        {"mlp_in", &g->mlp_in, L * N * d}};
    int nf = (int)(sizeof f / sizeof f[0]), known = 0;
    for (int i = 0; i < nf; i++) {
        PyObject *a = gd ? PyDict_GetItemString(gd, f[i].name) : NULL;
        if (!a || a == Py_None) continue;
        known++;
        float *p = out_array(gd, f[i].name, f[i].n * n_pass);
        if (!p) return -1;
        if (c->parallel && strcmp(f[i].name, "resid_mid") == 0) {
            PyErr_SetString(PyExc_ValueError, "a parallel-residual block has no resid_mid");
            return -1;
        }
        size_t field = (size_t)((char *)f[i].dst - (char *)g); /* the field's offset in a Grads */
        for (int k = 0; k < n_pass; k++) *(float **)((char *)&g[k] + field) = p + k * f[i].n;
    }
    if (gd && PyDict_Size(gd) != known) { PyErr_SetString(PyExc_ValueError, "grads: unknown site"); return -1; }
    return 0;
}

/* forward(...) and backward(...): one argument parser (backward = 1 adds the seeds, grads, metric and
 * drop_layers, and runs model_backward) */
static PyObject *run_call(PyModel *self, PyObject *args, PyObject *kw, int backward) {
    static char *kwlist[] = {"seq_lens", "ids", "resid_in", "seq_starts", "start_layer", "prefix_k", "prefix_v",
                             "prefix_rows", "patch_site", "patch_layer", "patch_row", "patch_op", "patch_value",
                             "blocks", "capture", "logit_rows", "end_layer", "logit_targets", "patch_offset",
                             "patch_width", "patch_head", "patch_voff", "seed_row", "seed_kind", "seed_tok",
                             "seed_weight", "grads", "metric", "drop_layers", NULL};
    PyObject *o_lens, *o_ids = NULL, *o_resid = NULL, *o_starts = NULL, *o_pk = NULL, *o_pv = NULL, *o_prow = NULL;
    PyObject *o_ps = NULL, *o_pl = NULL, *o_pr = NULL, *o_po = NULL, *o_pval = NULL, *o_blocks = NULL, *capd = NULL;
    PyObject *o_lrows = NULL, *o_targets = NULL, *o_poff = NULL, *o_pw = NULL, *o_ph = NULL, *o_pvo = NULL;
    PyObject *o_srow = NULL, *o_skind = NULL, *o_stok = NULL, *o_sw = NULL, *o_grads = NULL, *o_metric = NULL,
             *o_drop = NULL;
    int start_layer = 0, end_layer = -1;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "O|OOOiOOOOOOOOOO!OiOOOOOOOOOO!OO", kwlist, &o_lens, &o_ids, &o_resid,
                                     &o_starts, &start_layer, &o_pk, &o_pv, &o_prow, &o_ps, &o_pl, &o_pr, &o_po, &o_pval,
                                     &o_blocks, &PyDict_Type, &capd, &o_lrows, &end_layer, &o_targets, &o_poff, &o_pw,
                                     &o_ph, &o_pvo, &o_srow, &o_skind, &o_stok, &o_sw, &PyDict_Type, &o_grads,
                                     &o_metric, &o_drop))
        return NULL;
    if (!backward && (o_srow || o_skind || o_stok || o_sw || o_grads || o_metric || o_drop)) {
        PyErr_SetString(PyExc_TypeError, "forward() takes no seeds, grads, metric or drop_layers (see backward())");
        return NULL;
    }
    if (backward && ((o_resid && o_resid != Py_None) || start_layer != 0 || (end_layer >= 0 && end_layer != self->m.cfg.n_layers) ||
                     (o_lrows && o_lrows != Py_None) || (o_targets && o_targets != Py_None) ||
                     (o_pk && o_pk != Py_None))) {
        PyErr_SetString(PyExc_ValueError, "backward() runs whole sequences from token ids: no resid_in, start_layer, "
                        "end_layer, prefix caches, logit_rows or logit_targets");
        return NULL;
    }
    if (!self->refs) { PyErr_SetString(PyExc_RuntimeError, "Model not initialised"); return NULL; }
    const Config *c = &self->m.cfg;
    int L = c->n_layers, d = c->d_model, H = c->n_heads, kvd = c->n_kv_heads * c->d_head, V = c->vocab_size;
    PyObject *result = NULL;
    PyArrayObject *lens = NULL, *starts = NULL, *ids = NULL, *resid = NULL, *pk = NULL, *pv = NULL, *prow = NULL;
    PyArrayObject *blk = NULL, *lrows = NULL;
    PyArrayObject *targets = NULL;
    int *zero_starts = NULL;
    const float **pkp = NULL, **pvp = NULL;
    Patch *patches = NULL;
    PyObject *pin = NULL; /* the patch arrays patches point into */
    EdgeBlock *blocks = NULL;
    int64_t np = 0, nb = 0;
    Capture cap;
    memset(&cap, 0, sizeof cap);
    Seed *seeds = NULL;
    int64_t n_seeds = 0;
    Grads *grads = NULL;
    PyArrayObject *drop = NULL;
    int n_pass = 1;

    lens = in_array(o_lens, NPY_INT32, 1, "seq_lens");
    if (!lens) goto done;
    int S = (int)PyArray_DIM(lens, 0);
    const int *len = PyArray_DATA(lens);
    if (S < 1) { PyErr_SetString(PyExc_ValueError, "empty batch: no sequences"); goto done; }
    int64_t N = 0, attn_total = 0;
    starts = in_array(o_starts, NPY_INT32, 1, "seq_starts");
    if (PyErr_Occurred()) goto done;
    if (starts && PyArray_DIM(starts, 0) != S) { PyErr_SetString(PyExc_ValueError, "seq_starts length != seq_lens"); goto done; }
    if (!starts) {
        zero_starts = calloc(S, sizeof(int));
        if (!zero_starts) { PyErr_NoMemory(); goto done; }
    }
    const int *st = starts ? (const int *)PyArray_DATA(starts) : zero_starts;
    int any_prefix = 0;
    for (int i = 0; i < S; i++) {
        if (len[i] < 1) { PyErr_Format(PyExc_ValueError, "sequence %d is empty", i); goto done; }
        if (st[i] < 0 || (int64_t)st[i] + len[i] > c->n_ctx) {
            PyErr_Format(PyExc_ValueError, "sequence %d needs positions up to %lld but the model's context is %d", i,
                         (long long)st[i] + len[i], c->n_ctx);
            goto done;
        }
        if (st[i] > 0) any_prefix = 1;
        N += len[i];
        attn_total += (int64_t)len[i] * (st[i] + len[i]);
    }
    if (end_layer < 0) end_layer = L;
    if (start_layer < 0 || start_layer > L) { PyErr_Format(PyExc_ValueError, "start_layer %d outside [0, %d]", start_layer, L); goto done; }
    if (end_layer < start_layer || end_layer > L) { PyErr_Format(PyExc_ValueError, "end_layer %d outside [%d, %d]", end_layer, start_layer, L); goto done; }
    resid = in_array(o_resid, NPY_FLOAT32, 2, "resid_in");
    if (PyErr_Occurred()) goto done;
    if (resid) {
        if (PyArray_DIM(resid, 0) != N || PyArray_DIM(resid, 1) != d) { PyErr_SetString(PyExc_ValueError, "resid_in must be (sum(seq_lens), d_model)"); goto done; }
    } else if (start_layer == 0) {
        ids = in_array(o_ids, NPY_INT32, 1, "ids");
        if (!ids) { if (!PyErr_Occurred()) PyErr_SetString(PyExc_ValueError, "ids or resid_in are required"); goto done; }
        if (PyArray_DIM(ids, 0) != N) { PyErr_SetString(PyExc_ValueError, "ids length != sum(seq_lens)"); goto done; }
        const int32_t *id = PyArray_DATA(ids);
        for (int64_t i = 0; i < N; i++)
            if (id[i] < 0 || id[i] >= V) {
                PyErr_Format(PyExc_ValueError, "token id %d at row %lld is outside the vocabulary [0, %d)", id[i], (long long)i, V);
                goto done;
            }
    } else {
        PyErr_SetString(PyExc_ValueError, "resid_in is required when start_layer > 0");
        goto done;
    }
    Batch b = {S, len, st, NULL, NULL, 0};
    if (any_prefix) {
        pk = in_array(o_pk, NPY_FLOAT32, 3, "prefix_k");
        pv = pk ? in_array(o_pv, NPY_FLOAT32, 3, "prefix_v") : NULL;
        prow = pv ? in_array(o_prow, NPY_INT64, 1, "prefix_rows") : NULL;
        if (!prow) { if (!PyErr_Occurred()) PyErr_SetString(PyExc_ValueError, "sequences with a start need prefix_k, prefix_v and prefix_rows"); goto done; }
        npy_intp NB = PyArray_DIM(pk, 1);
        if (PyArray_DIM(pk, 0) != L || PyArray_DIM(pk, 2) != kvd || PyArray_DIM(pv, 0) != L || PyArray_DIM(pv, 1) != NB ||
            PyArray_DIM(pv, 2) != kvd || PyArray_DIM(prow, 0) != S) {
            PyErr_SetString(PyExc_ValueError, "prefix caches must be (n_layers, rows, n_kv_heads*d_head) and prefix_rows (n_seq,)");
            goto done;
        }
        pkp = calloc(S, sizeof(float *));
        pvp = calloc(S, sizeof(float *));
        if (!pkp || !pvp) { PyErr_NoMemory(); goto done; }
        const int64_t *rows = PyArray_DATA(prow);
        for (int i = 0; i < S; i++) {
            if (st[i] == 0) continue;
            if (rows[i] < 0 || rows[i] + st[i] > NB) { PyErr_Format(PyExc_ValueError, "prefix rows of sequence %d are out of range", i); goto done; }
            pkp[i] = (const float *)PyArray_DATA(pk) + rows[i] * kvd;
            pvp[i] = (const float *)PyArray_DATA(pv) + rows[i] * kvd;
        }
        b.pk = pkp; b.pv = pvp; b.pstride = (int64_t)NB * kvd;
    }
    /* patches */
    if (o_ps && o_ps != Py_None && parse_patches(self, o_ps, o_pl, o_pr, o_po, o_pval, o_poff, o_pw, o_ph, o_pvo, N, S, len,
                                                 st, resid != NULL, &patches, &np, &pin))
        goto done;
    /* edge blocks: (n, 3) int64 rows of (layer, row, key position) */
    blk = in_array(o_blocks, NPY_INT64, 2, "blocks");
    if (PyErr_Occurred()) goto done;
    if (blk) {
        if (PyArray_DIM(blk, 1) != 3) { PyErr_SetString(PyExc_ValueError, "blocks must be (n, 3): layer, row, key"); goto done; }
        nb = PyArray_DIM(blk, 0);
        blocks = calloc(nb ? nb : 1, sizeof(EdgeBlock));
        if (!blocks) { PyErr_NoMemory(); goto done; }
        const int64_t *e = PyArray_DATA(blk);
        for (int64_t i = 0; i < nb; i++) {
            if (e[3 * i] < 0 || e[3 * i] >= L || e[3 * i + 1] < 0 || e[3 * i + 1] >= N || e[3 * i + 2] < 0 || e[3 * i + 2] >= c->n_ctx) {
                PyErr_Format(PyExc_ValueError, "edge block %lld is out of range", (long long)i);
                goto done;
            }
            blocks[i].layer = (int)e[3 * i]; blocks[i].row = e[3 * i + 1]; blocks[i].key = (int)e[3 * i + 2];
        }
    }
    /* captures */
    if (capd) {
        int64_t LN = (int64_t)L * N;
        if (!(cap.embed = out_array(capd, "embed", N * d)) && PyErr_Occurred()) goto done;
        if (!(cap.resid_pre = out_array(capd, "resid_pre", LN * d)) && PyErr_Occurred()) goto done;
        if (!(cap.resid_mid = out_array(capd, "resid_mid", LN * d)) && PyErr_Occurred()) goto done;
        if (cap.resid_mid && c->parallel) {
            PyErr_SetString(PyExc_ValueError, "a parallel-residual block has no resid_mid (attention and MLP both read "
                            "resid_pre); use resid_pre + attn_out");
            goto done;
        }
        if (!(cap.attn_out = out_array(capd, "attn_out", LN * d)) && PyErr_Occurred()) goto done;
        if (!(cap.mlp_out = out_array(capd, "mlp_out", LN * d)) && PyErr_Occurred()) goto done;
        if (!(cap.head_out = out_array(capd, "head_out", LN * H * d)) && PyErr_Occurred()) goto done;
        if (!(cap.attn = out_array(capd, "attn", (int64_t)L * H * attn_total)) && PyErr_Occurred()) goto done;
        if (!(cap.z = out_array(capd, "z", LN * H * c->d_head)) && PyErr_Occurred()) goto done;
        if (!(cap.q = out_array(capd, "q", LN * H * c->d_head)) && PyErr_Occurred()) goto done;
        if (!(cap.k = out_array(capd, "k", LN * kvd)) && PyErr_Occurred()) goto done;
        if (!(cap.v = out_array(capd, "v", LN * kvd)) && PyErr_Occurred()) goto done;
        if (!(cap.mlp_post = out_array(capd, "mlp_post", LN * c->d_mlp)) && PyErr_Occurred()) goto done;
        if (!(cap.mlp_pre = out_array(capd, "mlp_pre", LN * c->d_mlp * (c->gated_mlp ? 2 : 1))) && PyErr_Occurred()) goto done;
        if (!(cap.attn_pre_norm = out_array(capd, "attn_pre_norm", LN * d)) && PyErr_Occurred()) goto done;
        if (!(cap.mlp_pre_norm = out_array(capd, "mlp_pre_norm", LN * d)) && PyErr_Occurred()) goto done;
        if (!(cap.q_cache = out_array(capd, "q_cache", LN * H * c->d_head)) && PyErr_Occurred()) goto done;
        if ((cap.attn_pre_norm || cap.mlp_pre_norm) && !c->post_norms) {
            PyErr_SetString(PyExc_ValueError, "attn_pre_norm / mlp_pre_norm exist only with post-norms (Gemma)");
            goto done;
        }
        if (!(cap.norm_scale_attn = out_array(capd, "norm_scale_attn", LN)) && PyErr_Occurred()) goto done;
        if (!(cap.k_cache = out_array(capd, "k_cache", LN * kvd)) && PyErr_Occurred()) goto done;
        if (!(cap.v_cache = out_array(capd, "v_cache", LN * kvd)) && PyErr_Occurred()) goto done;
        if (!(cap.resid_final = out_array(capd, "resid_final", N * d)) && PyErr_Occurred()) goto done;
        int64_t R = N;
        lrows = in_array(o_lrows, NPY_INT64, 1, "logit_rows");
        if (PyErr_Occurred()) goto done;
        if (lrows) {
            R = PyArray_DIM(lrows, 0);
            const int64_t *lr = PyArray_DATA(lrows);
            for (int64_t i = 0; i < R; i++)
                if (lr[i] < 0 || lr[i] >= N) { PyErr_Format(PyExc_ValueError, "logit row %lld out of range", (long long)lr[i]); goto done; }
            cap.logit_rows = lr;
            cap.n_logit_rows = R;
        }
        if (!(cap.logits = out_array(capd, "logits", R * V)) && PyErr_Occurred()) goto done;
        if (!(cap.final_scale = out_array(capd, "final_scale", R)) && PyErr_Occurred()) goto done;
        if (!(cap.target_prob = out_array_of(capd, "target_prob", R, NPY_FLOAT64, "float64")) && PyErr_Occurred())
            goto done;
        if (cap.target_prob) { /* softmax probability of logit_targets[i] in logit row i */
            targets = in_array(o_targets, NPY_INT64, 1, "logit_targets");
            if (PyErr_Occurred()) goto done;
            if (!targets || PyArray_DIM(targets, 0) != R) {
                PyErr_Format(PyExc_ValueError, "capture 'target_prob' needs logit_targets: %lld token ids", (long long)R);
                goto done;
            }
            const int64_t *tg = PyArray_DATA(targets);
            for (int64_t i = 0; i < R; i++)
                if (tg[i] < 0 || tg[i] >= V) { PyErr_Format(PyExc_ValueError, "logit target %lld out of range", (long long)tg[i]); goto done; }
            cap.targets = tg;
        }
    }
    double *metric = NULL;
    if (backward) {
        if (cap.logits || cap.final_scale || cap.target_prob) {
            PyErr_SetString(PyExc_ValueError, "backward(): the metric values come back in `metric`; capture no logits");
            goto done;
        }
        if (parse_seeds(c, o_srow, o_skind, o_stok, o_sw, N, &seeds, &n_seeds)) goto done;
        drop = in_array(o_drop, NPY_INT32, 1, "drop_layers");
        if (PyErr_Occurred()) goto done;
        if (drop) n_pass = (int)PyArray_DIM(drop, 0);
        if (n_pass < 1) { PyErr_SetString(PyExc_ValueError, "drop_layers must not be empty"); goto done; }
        grads = calloc(n_pass, sizeof(Grads));
        if (!grads) { PyErr_NoMemory(); goto done; }
        for (int k = 0; k < n_pass; k++) {
            grads[k].drop_layer = drop ? ((const int *)PyArray_DATA(drop))[k] : -1;
            if (grads[k].drop_layer < -1 || grads[k].drop_layer >= L) {
                PyErr_Format(PyExc_ValueError, "drop layer %d outside [-1, %d)", grads[k].drop_layer, L);
                goto done;
            }
        }
        if (parse_grads(c, o_grads, N, attn_total, n_pass, grads)) goto done;
        PyArrayObject *ma = (PyArrayObject *)o_metric;
        if (!o_metric || !PyArray_Check(o_metric) || PyArray_TYPE(ma) != NPY_FLOAT64 || !PyArray_IS_C_CONTIGUOUS(ma) ||
            !PyArray_ISWRITEABLE(ma) || PyArray_SIZE(ma) != n_seeds) {
            PyErr_Format(PyExc_ValueError, "backward() needs metric: a writeable float64 array of %lld", (long long)n_seeds);
            goto done;
        }
        metric = PyArray_DATA(ma);
    }
    char err[256] = "";
    int rc;
    Py_BEGIN_ALLOW_THREADS
    int hold;
    Pool *pool = acquire_pool(self, &hold);
    if (backward)
        rc = model_backward(&self->m, pool, &b, PyArray_DATA(ids), patches, np, blocks, nb, seeds, n_seeds, &cap, grads,
                            n_pass, metric, err, sizeof err);
    else
        rc = model_forward(&self->m, pool, &b, ids ? PyArray_DATA(ids) : NULL, resid ? PyArray_DATA(resid) : NULL,
                           start_layer, end_layer, patches, np, blocks, nb, &cap, err, sizeof err);
    release_pool(self, pool, hold);
    Py_END_ALLOW_THREADS
    if (rc) {
        PyErr_SetString(strstr(err, "memory") ? PyExc_MemoryError : PyExc_RuntimeError, err);
        goto done;
    }
    result = Py_None;
    Py_INCREF(result);
done:
    Py_XDECREF(lens); Py_XDECREF(starts); Py_XDECREF(ids); Py_XDECREF(resid); Py_XDECREF(pk); Py_XDECREF(pv);
    Py_XDECREF(prow);
    Py_XDECREF(blk); Py_XDECREF(lrows); Py_XDECREF(targets); Py_XDECREF(pin);
    free(zero_starts); free(pkp); free(pvp); free(patches); free(blocks); free(seeds); free(grads);
    Py_XDECREF(drop);
    return result;
}

static PyObject *Model_forward(PyModel *self, PyObject *args, PyObject *kw) { return run_call(self, args, kw, 0); }

static PyObject *Model_backward(PyModel *self, PyObject *args, PyObject *kw) { return run_call(self, args, kw, 1); }

static PyObject *Model_set_threads(PyModel *self, PyObject *args) {
    int n;
    if (!PyArg_ParseTuple(args, "i", &n)) return NULL;
    if (n < 1 || n > 1024) { PyErr_SetString(PyExc_ValueError, "threads must be in [1, 1024]"); return NULL; }
    __atomic_store_n(&self->n_threads, n, __ATOMIC_RELAXED); /* the pool is resized by the next call */
    Py_RETURN_NONE;
}

static PyObject *Model_get_threads(PyModel *self, void *c) { return PyLong_FromLong(self->n_threads); }

static PyGetSetDef Model_getset[] = {{"threads", (getter)Model_get_threads, NULL, "threads of a forward call", NULL},
                                     {NULL, NULL, NULL, NULL, NULL}};

static PyMethodDef Model_methods[] = {
    {"set_threads", (PyCFunction)Model_set_threads, METH_VARARGS,
     "set_threads(n): run forward calls on n threads (the caller included)"},
    {"forward", (PyCFunction)(void (*)(void))Model_forward, METH_VARARGS | METH_KEYWORDS,
     "forward(seq_lens, ids=None, resid_in=None, seq_starts=None, start_layer=0, prefix_k=None, prefix_v=None,\n"
     "        prefix_rows=None, patch_site=None, patch_layer=None, patch_row=None, patch_op=None, patch_value=None,\n"
     "        blocks=None, capture=None, logit_rows=None, end_layer=n_layers, logit_targets=None)\n"
     "Low-level batched forward pass writing into the preallocated float32 arrays of `capture`. Use factrace.Model.run."},
    {"backward", (PyCFunction)(void (*)(void))Model_backward, METH_VARARGS | METH_KEYWORDS,
     "backward(seq_lens, ids, seed_row, seed_kind, seed_tok, seed_weight, metric, grads={}, capture=None,\n"
     "         drop_layers=None, patch_*=..., blocks=None)\n"
     "One forward pass of whole sequences (patches and edge blocks as forward) and, per entry of drop_layers\n"
     "(default [-1]), one backward pass of M = sum_i seed_weight[i] * metric_i (seed_kind: METRIC_*, at batch row\n"
     "seed_row[i], tokens seed_tok[i]) into the float32 arrays of `grads` (site -> n_pass x the capture's size;\n"
     "sites as forward's captures plus q_in, k_in, v_in, mlp_in). metric (n_seeds,) float64 receives each metric_i.\n"
     "Use factrace.gradients."},
    {NULL, NULL, 0, NULL}};

static PyTypeObject ModelType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "factrace._core.Model",
    .tp_basicsize = sizeof(PyModel),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "Model(config: dict, weights: dict): C model over float32 weight arrays (held, not copied).",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Model_init,
    .tp_dealloc = (destructor)Model_dealloc,
    .tp_methods = Model_methods,
    .tp_getset = Model_getset,
};

/* ------------------------------------------------------------------------------------------ */
/* module functions                                                                              */

/* convert(raw: uint16 array, kind: "f16" | "bf16") -> float32 array of the same shape */
static PyObject *py_convert(PyObject *mod, PyObject *args) {
    PyObject *o;
    const char *kind;
    if (!PyArg_ParseTuple(args, "Os", &o, &kind)) return NULL;
    int is_bf = strcmp(kind, "bf16") == 0;
    if (!is_bf && strcmp(kind, "f16") != 0) { PyErr_Format(PyExc_ValueError, "unknown kind '%s'", kind); return NULL; }
    PyArrayObject *in = (PyArrayObject *)PyArray_FROMANY(o, NPY_UINT16, 0, 0, NPY_ARRAY_CARRAY_RO);
    if (!in) return NULL;
    PyArrayObject *out = (PyArrayObject *)PyArray_SimpleNew(PyArray_NDIM(in), PyArray_DIMS(in), NPY_FLOAT32);
    if (!out) { Py_DECREF(in); return NULL; }
    int64_t n = PyArray_SIZE(in);
    const uint16_t *src = PyArray_DATA(in);
    float *dst = PyArray_DATA(out);
    Py_BEGIN_ALLOW_THREADS
    if (is_bf) bf16_to_f32(src, dst, n); else f16_to_f32(src, dst, n);
    Py_END_ALLOW_THREADS
    Py_DECREF(in);
    return (PyObject *)out;
}

/* sgemm(a (M, K), b (N, K)) -> a @ b.T with the linked BLAS (for benchmarks) */
static PyObject *py_sgemm(PyObject *mod, PyObject *args) {
    PyObject *oa, *ob;
    int threads = 1;
    if (!PyArg_ParseTuple(args, "OO|i", &oa, &ob, &threads)) return NULL;
    if (threads < 1 || threads > 1024) { PyErr_SetString(PyExc_ValueError, "threads must be in [1, 1024]"); return NULL; }
    PyArrayObject *a = (PyArrayObject *)PyArray_FROMANY(oa, NPY_FLOAT32, 2, 2, NPY_ARRAY_CARRAY_RO);
    PyArrayObject *b = a ? (PyArrayObject *)PyArray_FROMANY(ob, NPY_FLOAT32, 2, 2, NPY_ARRAY_CARRAY_RO) : NULL;
    if (!b) { Py_XDECREF(a); return NULL; }
    npy_intp M = PyArray_DIM(a, 0), K = PyArray_DIM(a, 1), N = PyArray_DIM(b, 0);
    if (PyArray_DIM(b, 1) != K || M > INT32_MAX || N > INT32_MAX || K > INT32_MAX) {
        Py_DECREF(a); Py_DECREF(b);
        PyErr_SetString(PyExc_ValueError, "sgemm: a (M, K) and b (N, K) must share K");
        return NULL;
    }
    npy_intp dims[2] = {M, N};
    PyArrayObject *c = (PyArrayObject *)PyArray_SimpleNew(2, dims, NPY_FLOAT32);
    if (c && M > 0 && N > 0) {
        const float *pa = PyArray_DATA(a), *pb = PyArray_DATA(b);
        float *pc = PyArray_DATA(c);
        Py_BEGIN_ALLOW_THREADS
        if (threads > 1) openblas_set_num_threads(threads); /* OpenBLAS's own threads, for this call only */
        if (K > 0) cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, (int)M, (int)N, (int)K, 1.0f, pa, (int)K, pb, (int)K, 0.0f, pc, (int)N);
        else memset(pc, 0, sizeof(float) * M * N);
        if (threads > 1) openblas_set_num_threads(1);
        Py_END_ALLOW_THREADS
    }
    Py_DECREF(a); Py_DECREF(b);
    return (PyObject *)c;
}

static PyObject *py_get_num_threads(PyObject *mod, PyObject *args) { return PyLong_FromLong(openblas_get_num_threads()); }

/* A weight for matmul(): a float32 (n_out, n_in) array or an object with .type, .shape, .data (see get_mat). */
static int any_mat(PyObject *o, Mat *out, PyObject **keep) {
    PyModel tmp = {0};
    tmp.refs = PyList_New(0);
    if (!tmp.refs) return -1;
    PyObject *d = PyDict_New();
    int rc = -1;
    npy_intp n_out = -1, n_in = -1;
    if (d && PyDict_SetItemString(d, "w", o) == 0) {
        if (PyArray_Check(o) && PyArray_NDIM((PyArrayObject *)o) == 2) {
            n_out = PyArray_DIM((PyArrayObject *)o, 0);
            n_in = PyArray_DIM((PyArrayObject *)o, 1);
        } else {
            PyObject *sh = PyObject_GetAttrString(o, "shape");
            if (sh && PyTuple_Check(sh) && PyTuple_GET_SIZE(sh) == 2) {
                n_out = PyLong_AsSsize_t(PyTuple_GET_ITEM(sh, 0));
                n_in = PyLong_AsSsize_t(PyTuple_GET_ITEM(sh, 1));
            }
            Py_XDECREF(sh);
        }
        if (!PyErr_Occurred() && (n_out < 1 || n_in < 1))
            PyErr_SetString(PyExc_ValueError, "w must be a 2-D float32 array or a stored weight (.type, .shape, .data)");
        if (!PyErr_Occurred()) rc = get_mat(&tmp, d, "w", 1, n_out, n_in, out);
    }
    Py_XDECREF(d);
    *keep = tmp.refs;
    return rc;
}

/* matmul(x (N, n_in) float32, w, bias=None, threads=1) -> x @ w^T (+ bias) (N, n_out) with the C core's
 * matrix-product layer on w as stored */
static PyObject *py_matmul(PyObject *mod, PyObject *args, PyObject *kw) {
    static char *kwlist[] = {"x", "w", "bias", "threads", NULL};
    PyObject *ox, *ow, *ob = NULL;
    int threads = 1;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "OO|Oi", kwlist, &ox, &ow, &ob, &threads)) return NULL;
    if (threads < 1 || threads > 1024) { PyErr_SetString(PyExc_ValueError, "threads must be in [1, 1024]"); return NULL; }
    Mat W;
    PyObject *keep = NULL, *res = NULL;
    PyArrayObject *x = NULL, *bias = NULL, *out = NULL;
    if (any_mat(ow, &W, &keep)) goto done;
    x = (PyArrayObject *)PyArray_FROMANY(ox, NPY_FLOAT32, 2, 2, NPY_ARRAY_CARRAY_RO);
    if (!x) goto done;
    if (PyArray_DIM(x, 1) != W.n_in) { PyErr_Format(PyExc_ValueError, "x has %zd columns, w has %lld inputs", (Py_ssize_t)PyArray_DIM(x, 1), (long long)W.n_in); goto done; }
    if (ob && ob != Py_None) {
        bias = (PyArrayObject *)PyArray_FROMANY(ob, NPY_FLOAT32, 1, 1, NPY_ARRAY_CARRAY_RO);
        if (!bias) goto done;
        if (PyArray_DIM(bias, 0) != W.n_out) { PyErr_SetString(PyExc_ValueError, "bias must be (n_out,)"); goto done; }
    }
    npy_intp dims[2] = {PyArray_DIM(x, 0), (npy_intp)W.n_out};
    out = (PyArrayObject *)PyArray_SimpleNew(2, dims, NPY_FLOAT32);
    if (!out) goto done;
    int rc = 0;
    Py_BEGIN_ALLOW_THREADS
    Pool *pool = threads > 1 ? pool_new(threads) : NULL;
    if (dims[0] > 0) rc = mat_mul(pool, PyArray_DATA(out), PyArray_DATA(x), dims[0], &W, bias ? PyArray_DATA(bias) : NULL);
    pool_free(pool);
    Py_END_ALLOW_THREADS
    if (rc) { PyErr_NoMemory(); goto done; }
    res = (PyObject *)out;
    out = NULL;
done:
    Py_XDECREF(keep); Py_XDECREF(x); Py_XDECREF(bias); Py_XDECREF(out);
    return res;
}

/* dequant_rows(data uint8 (n, row_bytes), type, n_in) -> float32 (n, n_in), exactly quant_dequantize */
static PyObject *py_dequant_rows(PyObject *mod, PyObject *args) {
    PyObject *od;
    int type;
    Py_ssize_t n_in;
    if (!PyArg_ParseTuple(args, "Oin", &od, &type, &n_in)) return NULL;
    int64_t rb = 0;
    if (n_in < 1 || mat_row_bytes(type, n_in, &rb) != 0) { PyErr_SetString(PyExc_ValueError, "unsupported type or width"); return NULL; }
    PyArrayObject *d = (PyArrayObject *)PyArray_FROMANY(od, NPY_UINT8, 2, 2, NPY_ARRAY_CARRAY_RO);
    if (!d) return NULL;
    if (PyArray_DIM(d, 1) != rb) { Py_DECREF(d); PyErr_Format(PyExc_ValueError, "rows of %lld bytes expected", (long long)rb); return NULL; }
    npy_intp dims[2] = {PyArray_DIM(d, 0), n_in};
    PyArrayObject *out = (PyArrayObject *)PyArray_SimpleNew(2, dims, NPY_FLOAT32);
    if (out) {
        Mat W = {type, dims[0], n_in, PyArray_DATA(d), rb};
        Py_BEGIN_ALLOW_THREADS
        mat_rows_f32(&W, 0, dims[0], PyArray_DATA(out));
        Py_END_ALLOW_THREADS
    }
    Py_DECREF(d);
    return (PyObject *)out;
}

static PyMethodDef module_methods[] = {
    {"convert", py_convert, METH_VARARGS, "convert(raw_uint16, 'f16'|'bf16') -> float32 array (exact)"},
    {"sgemm", py_sgemm, METH_VARARGS,
     "sgemm(a (M,K), b (N,K), threads=1) -> a @ b.T by the linked OpenBLAS on its own threads (a benchmark\n"
     "reference: do not run factrace models meanwhile)"},
    {"get_num_threads", py_get_num_threads, METH_NOARGS, "get_num_threads() -> OpenBLAS threads (1: factrace's pool owns the threads)"},
    {"matmul", (PyCFunction)(void (*)(void))py_matmul, METH_VARARGS | METH_KEYWORDS,
     "matmul(x, w, bias=None, threads=1) -> x @ w^T (+ bias), w float32 or a weight as stored"},
    {"dequant_rows", py_dequant_rows, METH_VARARGS, "dequant_rows(data, type, n_in) -> float32 rows of a stored weight"},
    {NULL, NULL, 0, NULL}};

static struct PyModuleDef moduledef = {PyModuleDef_HEAD_INIT, "factrace._core", "factrace C core", -1, module_methods};

PyMODINIT_FUNC PyInit__core(void) {
    import_array();
    openblas_set_num_threads(1); /* products run on factrace's pool; each thread calls single-threaded sgemm */
    if (PyType_Ready(&ModelType) < 0) return NULL;
    PyObject *m = PyModule_Create(&moduledef);
    if (!m) return NULL;
    Py_INCREF(&ModelType);
    /* the ids of the intervention sites and operations (factrace/interventions.py maps names onto them) */
    static const struct { const char *name; int value; } consts[] = {
        {"SITE_EMBED", SITE_EMBED}, {"SITE_ATTN_OUT", SITE_ATTN_OUT}, {"SITE_MLP_OUT", SITE_MLP_OUT},
        {"SITE_RESID_POST", SITE_RESID_POST}, {"SITE_RESID_PRE", SITE_RESID_PRE}, {"SITE_RESID_MID", SITE_RESID_MID},
        {"SITE_Q", SITE_Q}, {"SITE_K", SITE_K}, {"SITE_V", SITE_V}, {"SITE_Z", SITE_Z}, {"SITE_ATTN", SITE_ATTN},
        {"SITE_MLP_POST", SITE_MLP_POST}, {"OP_SET", OP_SET}, {"OP_ADD", OP_ADD}, {"OP_ZERO", OP_ZERO},
        {"OP_MUL", OP_MUL}, {"OP_PROJECT", OP_PROJECT}, {"METRIC_LOGIT", METRIC_LOGIT},
        {"METRIC_LOGPROB", METRIC_LOGPROB}, {"METRIC_PROB", METRIC_PROB}, {"METRIC_LOGIT_DIFF", METRIC_LOGIT_DIFF}};
    int bad = PyModule_AddObject(m, "Model", (PyObject *)&ModelType) < 0 ||
              PyModule_AddStringConstant(m, "BLAS", FACTRACE_BLAS_NAME) < 0;
    for (size_t i = 0; !bad && i < sizeof consts / sizeof consts[0]; i++)
        bad = PyModule_AddIntConstant(m, consts[i].name, consts[i].value) < 0;
    if (bad) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
