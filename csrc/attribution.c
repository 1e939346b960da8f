/* factrace._attrib: head-by-source decomposition of attention outputs (pure functions on NumPy arrays).
 *
 * A head's output at query position q is  o_h(q) = sum_k A[h, q, k] * v_{k, kv(h)} W_O,h^T  (+ its share of
 * nothing: b_O belongs to no head and no source). Both functions take the captures of a factrace run:
 *
 *   attn  (L, H, T, T)    attention probabilities          v  (L, T, KV*dh) values (input of A @ V)
 *   W_O   list of L arrays (d, H*dh) (out, in) row-major  head h uses kv head h / (H / KV)
 *
 *   project(attn, v, W_O, U, queries) -> (J, L, H, T) float32
 *       out[j, l, h, k] = A[l, h, q_j, k] * (v[l, k, kv(h)] . (W_O[l][:, h*dh:(h+1)*dh]^T U[j, l]))
 *       U (J, L, d): one direction per job and layer (the caller folds frozen norm scales into it), so
 *       all heads of all layers by all sources cost L * (J*d*H*dh + J*H*T*dh) multiply-adds.
 *   split(attn, v, W_O, query, layers=None, post_w=None, post_scale=None) -> (nl, H, T, d) float32
 *       out[i, h, k, :] = A[l, h, q, k] * (W_O,h v[l, k, kv(h)])  [* post_w[l] * post_scale[l]]
 *       with l = layers[i]; Gemma 3's post-attention RMSNorm enters through its frozen scale.
 *
 * Keys after the query (k > q) get exact zeros. No global state; the GIL is released around the loops;
 * errors are Python exceptions (ValueError for shapes, IndexError for positions).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <numpy/arrayobject.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "blas.h"

static PyArrayObject *as_f32(PyObject *o, int ndim, const char *what) {
    PyArrayObject *a = (PyArrayObject *)PyArray_FROMANY(o, NPY_FLOAT32, ndim, ndim, NPY_ARRAY_CARRAY_RO);
    if (!a) {
        PyErr_Clear();
        PyErr_Format(PyExc_ValueError, "%s must be a %d-D float32-convertible array", what, ndim);
    }
    return a;
}

/* Convert a sequence of L arrays (each 2-D (d, HD) or 1-D (d,)) into borrowed float pointers, kept alive in
 * the returned list. Returns NULL with an exception set on error. */
static PyObject *array_list(PyObject *seq, Py_ssize_t L, int ndim, npy_intp d0, npy_intp d1, const float **ptrs,
                            const char *what) {
    PyObject *fast = PySequence_Fast(seq, "");
    if (!fast) {
        PyErr_Format(PyExc_TypeError, "%s must be a list of %zd arrays", what, L);
        return NULL;
    }
    if (PySequence_Fast_GET_SIZE(fast) != L) {
        PyErr_Format(PyExc_ValueError, "%s has %zd entries, expected %zd (one per layer)", what,
                     PySequence_Fast_GET_SIZE(fast), L);
        Py_DECREF(fast);
        return NULL;
    }
    PyObject *keep = PyList_New(L);
    if (!keep) { Py_DECREF(fast); return NULL; }
    for (Py_ssize_t l = 0; l < L; l++) {
        PyArrayObject *a = as_f32(PySequence_Fast_GET_ITEM(fast, l), ndim, what);
        if (!a) { Py_DECREF(fast); Py_DECREF(keep); return NULL; }
        PyList_SET_ITEM(keep, l, (PyObject *)a);
        if (PyArray_DIM(a, 0) != d0 || (ndim == 2 && PyArray_DIM(a, 1) != d1)) {
            if (ndim == 2)
                PyErr_Format(PyExc_ValueError, "%s[%zd] must have shape (%ld, %ld)", what, l, (long)d0, (long)d1);
            else
                PyErr_Format(PyExc_ValueError, "%s[%zd] must have shape (%ld,)", what, l, (long)d0);
            Py_DECREF(fast); Py_DECREF(keep);
            return NULL;
        }
        ptrs[l] = (const float *)PyArray_DATA(a);
    }
    Py_DECREF(fast);
    return keep;
}

/* Common checks of attn (L, H, T, T) and v (L, T, KV*dh); fills sizes. */
static int check_attn_v(PyArrayObject *attn, PyArrayObject *v, int n_kv, npy_intp *L, npy_intp *H, npy_intp *T,
                        npy_intp *dh) {
    *L = PyArray_DIM(attn, 0);
    *H = PyArray_DIM(attn, 1);
    *T = PyArray_DIM(attn, 2);
    if (PyArray_DIM(attn, 3) != *T) {
        PyErr_SetString(PyExc_ValueError, "attn must be (L, H, T, T)");
        return -1;
    }
    if (PyArray_DIM(v, 0) != *L || PyArray_DIM(v, 1) != *T) {
        PyErr_Format(PyExc_ValueError, "v_cache must be (L=%ld, T=%ld, KV*dh), got (%ld, %ld, %ld)", (long)*L,
                     (long)*T, (long)PyArray_DIM(v, 0), (long)PyArray_DIM(v, 1), (long)PyArray_DIM(v, 2));
        return -1;
    }
    if (n_kv < 1 || *H % n_kv || PyArray_DIM(v, 2) % n_kv) {
        PyErr_Format(PyExc_ValueError, "n_kv_heads=%d must divide H=%ld and v_cache's last dimension %ld", n_kv,
                     (long)*H, (long)PyArray_DIM(v, 2));
        return -1;
    }
    *dh = PyArray_DIM(v, 2) / n_kv;
    if (*L < 1 || *H < 1 || *T < 1 || *dh < 1) {
        PyErr_SetString(PyExc_ValueError, "empty attn / v_cache");
        return -1;
    }
    return 0;
}

/* ------------------------------------------------------------------------------------------ */

static PyObject *py_project(PyObject *mod, PyObject *args, PyObject *kw) {
    static char *kwlist[] = {"attn", "v", "W_O", "U", "queries", "n_kv_heads", NULL};
    PyObject *oa, *ov, *ow, *ou, *oq;
    int n_kv;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "OOOOOi", kwlist, &oa, &ov, &ow, &ou, &oq, &n_kv)) return NULL;
    PyArrayObject *attn = NULL, *v = NULL, *U = NULL, *q = NULL, *out = NULL;
    PyObject *keep = NULL;
    const float **W = NULL;
    float *wall = NULL;
    npy_intp L, H, T, dh;
    attn = as_f32(oa, 4, "attn");
    if (!attn) goto fail;
    v = as_f32(ov, 3, "v_cache");
    if (!v) goto fail;
    if (check_attn_v(attn, v, n_kv, &L, &H, &T, &dh) < 0) goto fail;
    U = as_f32(ou, 3, "U");
    if (!U) goto fail;
    npy_intp J = PyArray_DIM(U, 0), d = PyArray_DIM(U, 2);
    if (PyArray_DIM(U, 1) != L || d < 1) {
        PyErr_Format(PyExc_ValueError, "U must be (J, L=%ld, d), got (%ld, %ld, %ld)", (long)L, (long)J,
                     (long)PyArray_DIM(U, 1), (long)d);
        goto fail;
    }
    q = (PyArrayObject *)PyArray_FROMANY(oq, NPY_INT64, 1, 1, NPY_ARRAY_CARRAY_RO);
    if (!q) goto fail;
    if (PyArray_DIM(q, 0) != J) {
        PyErr_Format(PyExc_ValueError, "queries has %ld entries for %ld directions", (long)PyArray_DIM(q, 0), (long)J);
        goto fail;
    }
    const int64_t *qp = (const int64_t *)PyArray_DATA(q);
    for (npy_intp j = 0; j < J; j++)
        if (qp[j] < 0 || qp[j] >= T) {
            PyErr_Format(PyExc_IndexError, "query position %lld is out of range for T=%ld", (long long)qp[j], (long)T);
            goto fail;
        }
    npy_intp HD = H * dh;
    if (HD > INT32_MAX || d > INT32_MAX || J > INT32_MAX) {
        PyErr_SetString(PyExc_ValueError, "project: sizes too large");
        goto fail;
    }
    W = calloc((size_t)L, sizeof(float *));
    if (!W) { PyErr_NoMemory(); goto fail; }
    keep = array_list(ow, L, 2, d, HD, W, "W_O");
    if (!keep) goto fail;
    npy_intp dims[4] = {J, L, H, T};
    out = (PyArrayObject *)PyArray_ZEROS(4, dims, NPY_FLOAT32, 0);
    if (!out) goto fail;
    wall = malloc(sizeof(float) * (size_t)(J > 0 ? J : 1) * (size_t)HD);
    if (!wall) { PyErr_NoMemory(); goto fail; }
    if (J > 0) {
        const float *A = PyArray_DATA(attn), *V = PyArray_DATA(v), *Up = PyArray_DATA(U);
        float *o = PyArray_DATA(out);
        const npy_intp KVD = n_kv * dh, G = H / n_kv;
        Py_BEGIN_ALLOW_THREADS
        for (npy_intp l = 0; l < L; l++) {
            /* wall (J, H*dh) = U[:, l] (J, d) @ W_O[l] (d, H*dh): every head's direction in value space */
            cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, (int)J, (int)HD, (int)d, 1.0f, Up + l * d,
                        (int)(L * d), W[l], (int)HD, 0.0f, wall, (int)HD);
            for (npy_intp j = 0; j < J; j++) {
                const int64_t qq = qp[j];
                for (npy_intp h = 0; h < H; h++) {
                    const float *wh = wall + j * HD + h * dh;
                    const float *arow = A + ((l * H + h) * T + qq) * T;
                    const float *vb = V + l * T * KVD + (h / G) * dh;
                    float *orow = o + ((j * L + l) * H + h) * T;
                    for (npy_intp k = 0; k <= qq; k++) {
                        const float a = arow[k];
                        if (a == 0.0f) continue;
                        const float *vk = vb + k * KVD;
                        double s = 0.0;
                        for (npy_intp i = 0; i < dh; i++) s += (double)vk[i] * wh[i];
                        orow[k] = (float)(a * s);
                    }
                }
            }
        }
        Py_END_ALLOW_THREADS
    }
    free(wall);
    free(W);
    Py_DECREF(keep);
    Py_DECREF(attn); Py_DECREF(v); Py_DECREF(U); Py_DECREF(q);
    return (PyObject *)out;
fail:
    free(wall);
    free(W);
    Py_XDECREF(keep);
    Py_XDECREF(attn); Py_XDECREF(v); Py_XDECREF(U); Py_XDECREF(q); Py_XDECREF(out);
    return NULL;
}

/* ------------------------------------------------------------------------------------------ */

static PyObject *py_split(PyObject *mod, PyObject *args, PyObject *kw) {
    static char *kwlist[] = {"attn", "v", "W_O", "query", "n_kv_heads", "layers", "post_w", "post_scale", NULL};
    PyObject *oa, *ov, *ow, *ol = Py_None, *opw = Py_None, *ops = Py_None;
    long long query;
    int n_kv;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "OOOLi|OOO", kwlist, &oa, &ov, &ow, &query, &n_kv, &ol, &opw, &ops))
        return NULL;
    PyArrayObject *attn = NULL, *v = NULL, *lay = NULL, *ps = NULL, *out = NULL;
    PyObject *keep = NULL, *keep_pw = NULL;
    const float **W = NULL, **PW = NULL;
    npy_intp L, H, T, dh;
    attn = as_f32(oa, 4, "attn");
    if (!attn) goto fail;
    v = as_f32(ov, 3, "v_cache");
    if (!v) goto fail;
    if (check_attn_v(attn, v, n_kv, &L, &H, &T, &dh) < 0) goto fail;
    if (query < 0) query += T;
    if (query < 0 || query >= T) {
        PyErr_Format(PyExc_IndexError, "query position out of range for T=%ld", (long)T);
        goto fail;
    }
    W = calloc((size_t)L, sizeof(float *));
    PW = calloc((size_t)L, sizeof(float *));
    if (!W || !PW) { PyErr_NoMemory(); goto fail; }
    /* d from the first W_O entry */
    npy_intp HD = H * dh, d;
    {
        PyObject *first = PySequence_Check(ow) && PySequence_Size(ow) > 0 ? PySequence_GetItem(ow, 0) : NULL;
        if (!first) { PyErr_Clear(); PyErr_SetString(PyExc_ValueError, "W_O must be a non-empty list of arrays"); goto fail; }
        PyArrayObject *fa = as_f32(first, 2, "W_O[0]");
        Py_DECREF(first);
        if (!fa) goto fail;
        d = PyArray_DIM(fa, 0);
        Py_DECREF(fa);
    }
    keep = array_list(ow, L, 2, d, HD, W, "W_O");
    if (!keep) goto fail;
    if (ol == Py_None) {
        lay = (PyArrayObject *)PyArray_Arange(0, (double)L, 1, NPY_INT64);
    } else {
        lay = (PyArrayObject *)PyArray_FROMANY(ol, NPY_INT64, 1, 1, NPY_ARRAY_CARRAY_RO);
    }
    if (!lay) goto fail;
    npy_intp nl = PyArray_DIM(lay, 0);
    const int64_t *lp = (const int64_t *)PyArray_DATA(lay);
    for (npy_intp i = 0; i < nl; i++)
        if (lp[i] < 0 || lp[i] >= L) {
            PyErr_Format(PyExc_IndexError, "layer %lld out of range for L=%ld", (long long)lp[i], (long)L);
            goto fail;
        }
    const float *psp = NULL;
    if (opw != Py_None) {
        keep_pw = array_list(opw, L, 1, d, 0, PW, "post_w");
        if (!keep_pw) goto fail;
        if (ops == Py_None) { PyErr_SetString(PyExc_ValueError, "post_w needs post_scale (L,)"); goto fail; }
        ps = as_f32(ops, 1, "post_scale");
        if (!ps) goto fail;
        if (PyArray_DIM(ps, 0) != L) { PyErr_SetString(PyExc_ValueError, "post_scale must be (L,)"); goto fail; }
        psp = PyArray_DATA(ps);
    }
    if (d > INT32_MAX || HD > INT32_MAX || T > INT32_MAX) { PyErr_SetString(PyExc_ValueError, "split: sizes too large"); goto fail; }
    npy_intp dims[4] = {nl, H, T, d};
    out = (PyArrayObject *)PyArray_ZEROS(4, dims, NPY_FLOAT32, 0);
    if (!out) goto fail;
    {
        const float *A = PyArray_DATA(attn), *V = PyArray_DATA(v);
        float *o = PyArray_DATA(out);
        const npy_intp KVD = n_kv * dh, G = H / n_kv, nq = query + 1;
        Py_BEGIN_ALLOW_THREADS
        for (npy_intp i = 0; i < nl; i++) {
            const npy_intp l = lp[i];
            for (npy_intp h = 0; h < H; h++) {
                float *ob = o + (i * H + h) * T * d;
                /* (nq, d) = V[l, :nq, kv(h)] (nq, dh) @ W_O[l][:, h*dh:(h+1)*dh]^T */
                cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, (int)nq, (int)d, (int)dh, 1.0f,
                            V + l * T * KVD + (h / G) * dh, (int)KVD, W[l] + h * dh, (int)HD, 0.0f, ob, (int)d);
                const float *arow = A + ((l * H + h) * T + query) * T;
                for (npy_intp k = 0; k < nq; k++) {
                    const float a = arow[k];
                    float *row = ob + k * d;
                    if (psp) {
                        const float *pw = PW[l];
                        const float s = psp[l];
                        /* Gemma: w * ((a * y) * rs), in the order the C core applies the norm factor */
                        for (npy_intp c = 0; c < d; c++) row[c] = pw[c] * ((a * row[c]) * s);
                    } else {
                        for (npy_intp c = 0; c < d; c++) row[c] *= a;
                    }
                }
            }
        }
        Py_END_ALLOW_THREADS
    }
    free(W); free(PW);
    Py_XDECREF(keep); Py_XDECREF(keep_pw);
    Py_DECREF(attn); Py_DECREF(v); Py_DECREF(lay); Py_XDECREF(ps);
    return (PyObject *)out;
fail:
    free(W); free(PW);
    Py_XDECREF(keep); Py_XDECREF(keep_pw);
    Py_XDECREF(attn); Py_XDECREF(v); Py_XDECREF(lay); Py_XDECREF(ps); Py_XDECREF(out);
    return NULL;
}

static PyMethodDef methods[] = {
    {"project", (PyCFunction)(void (*)(void))py_project, METH_VARARGS | METH_KEYWORDS,
     "project(attn (L,H,T,T), v (L,T,KV*dh), W_O [L x (d,H*dh)], U (J,L,d), queries (J,), n_kv_heads)\n"
     "-> (J, L, H, T) float32: out[j,l,h,k] = A[l,h,q_j,k] * (v[l,k,kv(h)] . (W_O,h^T U[j,l]))"},
    {"split", (PyCFunction)(void (*)(void))py_split, METH_VARARGS | METH_KEYWORDS,
     "split(attn, v, W_O, query, n_kv_heads, layers=None, post_w=None, post_scale=None)\n"
     "-> (nl, H, T, d) float32: out[i,h,k] = A[l,h,q,k] * W_O,h v[l,k,kv(h)] (Gemma: * post_w[l] * post_scale[l])"},
    {NULL, NULL, 0, NULL}};

static struct PyModuleDef moduledef = {PyModuleDef_HEAD_INIT, "factrace._attrib",
                                       "factrace head-by-source attribution kernels (pure functions)", -1, methods};

PyMODINIT_FUNC PyInit__attrib(void) {
    import_array();
    return PyModule_Create(&moduledef);
}
