/* factrace._kernels - test and benchmark entry points of csrc/matmul.c.
 *
 *   matmul(x (N, n_in) f32, data (raw bytes), type, n_out, n_in, bias=None, threads=1, path="auto") -> (N, n_out)
 *   matmul_t(g (N, n_out) f32, data, type, n_out, n_in, threads=1, path="auto") -> (N, n_in)
 *   rows_f32(data, type, n_out, n_in, r0, r1) -> (r1 - r0, n_in)
 *   row_bytes(type, n_in), crossover(type, transposed=False), set_isa(name), isa(), isas()
 *   Pool(n): a persistent thread pool to pass as `threads` (benchmarks: no thread start-up per call)
 *   pool_bench(threads, loops, chunks, work_ns, gap_ns): seconds for pool_for loops of busy chunks
 *
 * OpenBLAS is set to one thread at import: the many-rows regime calls sgemm from every pool thread. */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <numpy/arrayobject.h>
#include <string.h>
#include <time.h>

#include "blas.h"
#include "matmul.h"
#include "quant.h"

/* ---- Pool object ---- */

typedef struct {
    PyObject_HEAD
    Pool *pool;
    int n;
    int busy; /* one computation at a time */
} PoolObject;

static int PoolObject_init(PoolObject *self, PyObject *args, PyObject *kw) {
    int n;
    if (!PyArg_ParseTuple(args, "i", &n)) return -1;
    if (n < 1 || n > 1024) {
        PyErr_SetString(PyExc_ValueError, "Pool: threads must be in 1..1024");
        return -1;
    }
    pool_free(self->pool);
    self->pool = pool_new(n);
    self->n = pool_threads(self->pool);
    return 0;
}

static void PoolObject_dealloc(PoolObject *self) {
    pool_free(self->pool);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyObject *PoolObject_threads(PoolObject *self, void *closure) { return PyLong_FromLong(self->n ? self->n : 1); }

static PyGetSetDef PoolObject_getset[] = {
    {"threads", (getter)PoolObject_threads, NULL, "threads (the caller included)", NULL},
    {NULL, NULL, NULL, NULL, NULL}};

static PyTypeObject PoolType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "factrace._kernels.Pool",
    .tp_basicsize = sizeof(PoolObject),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "Pool(n): n threads (the caller and n - 1 workers) for matmul / matmul_t",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)PoolObject_init,
    .tp_dealloc = (destructor)PoolObject_dealloc,
    .tp_getset = PoolObject_getset,
};

/* `threads` argument: an int (a pool made for this call), a Pool, or NULL (1). Sets *pool, *owned, *po. */
static int get_pool(PyObject *threads, Pool **pool, int *owned, PoolObject **po) {
    *pool = NULL;
    *owned = 0;
    *po = NULL;
    if (!threads) return 0;
    if (PyObject_TypeCheck(threads, &PoolType)) {
        PoolObject *p = (PoolObject *)threads;
        if (__atomic_exchange_n(&p->busy, 1, __ATOMIC_ACQUIRE)) {
            PyErr_SetString(PyExc_RuntimeError, "Pool is in use by another call");
            return -1;
        }
        *pool = p->pool;
        *po = p;
        return 0;
    }
    long n = PyLong_AsLong(threads);
    if (n == -1 && PyErr_Occurred()) {
        PyErr_SetString(PyExc_TypeError, "threads must be an int or a Pool");
        return -1;
    }
    if (n < 1 || n > 1024) {
        PyErr_SetString(PyExc_ValueError, "threads must be in 1..1024");
        return -1;
    }
    if (n > 1) {
        *pool = pool_new((int)n);
        *owned = 1;
    }
    return 0;
}

static void put_pool(Pool *pool, int owned, PoolObject *po) {
    if (owned) pool_free(pool);
    if (po) __atomic_store_n(&po->busy, 0, __ATOMIC_RELEASE);
}

/* ---- argument checks ---- */

static int get_path(const char *s, int *path) {
    if (strcmp(s, "auto") == 0) *path = MAT_AUTO;
    else if (strcmp(s, "few") == 0) *path = MAT_FEW;
    else if (strcmp(s, "many") == 0) *path = MAT_MANY;
    else {
        PyErr_Format(PyExc_ValueError, "path must be 'auto', 'few' or 'many', not '%s'", s);
        return -1;
    }
    return 0;
}

/* W from (data, type, n_out, n_in); holds a buffer view of data that the caller releases */
static int get_mat(PyObject *data, int type, long long n_out, long long n_in, Mat *W, Py_buffer *view) {
    const quant_type_info *t = type >= 0 ? quant_type((uint32_t)type) : NULL;
    int64_t rb;
    if (!t) {
        PyErr_Format(PyExc_ValueError, "unknown ggml type %d", type);
        return -1;
    }
    if (n_out < 0 || n_in < 0) {
        PyErr_SetString(PyExc_ValueError, "n_out and n_in must be >= 0");
        return -1;
    }
    if (mat_row_bytes(type, n_in, &rb)) {
        if (n_in % t->block_size)
            PyErr_Format(PyExc_ValueError, "n_in = %lld is not a multiple of the %s block size %lld", n_in, t->name,
                         (long long)t->block_size);
        else
            PyErr_Format(PyExc_ValueError, "type %s is not supported by the matmul kernels", t->name);
        return -1;
    }
    if (PyObject_GetBuffer(data, view, PyBUF_C_CONTIGUOUS) < 0) return -1;
    if (rb && n_out > PY_SSIZE_T_MAX / rb) {
        PyBuffer_Release(view);
        PyErr_SetString(PyExc_ValueError, "n_out * row_bytes overflows");
        return -1;
    }
    if (view->len != (Py_ssize_t)(n_out * rb)) {
        PyErr_Format(PyExc_ValueError, "data has %zd bytes; %lld rows of %lld %s values need %lld", view->len, n_out,
                     n_in, t->name, (long long)(n_out * rb));
        PyBuffer_Release(view);
        return -1;
    }
    *W = (Mat){type, n_out, n_in, view->buf, rb};
    return 0;
}

/* a C-contiguous float32 array (new reference) of `ndim` dims whose last dim is `last` (>= 0) */
static PyArrayObject *get_f32(PyObject *o, const char *name, int ndim, long long last) {
    if (!PyArray_Check(o) || PyArray_TYPE((PyArrayObject *)o) != NPY_FLOAT32) {
        PyErr_Format(PyExc_TypeError, "%s must be a float32 numpy array", name);
        return NULL;
    }
    if (PyArray_NDIM((PyArrayObject *)o) != ndim) {
        PyErr_Format(PyExc_ValueError, "%s must have %d dimension%s, not %d", name, ndim, ndim > 1 ? "s" : "",
                     PyArray_NDIM((PyArrayObject *)o));
        return NULL;
    }
    if (PyArray_DIM((PyArrayObject *)o, ndim - 1) != last) {
        PyErr_Format(PyExc_ValueError, "%s has %lld columns, expected %lld", name,
                     (long long)PyArray_DIM((PyArrayObject *)o, ndim - 1), last);
        return NULL;
    }
    return (PyArrayObject *)PyArray_FROMANY(o, NPY_FLOAT32, ndim, ndim, NPY_ARRAY_CARRAY_RO);
}

/* ---- entry points ---- */

static PyObject *py_matmul(PyObject *mod, PyObject *args, PyObject *kw) {
    static char *kwlist[] = {"x", "data", "type", "n_out", "n_in", "bias", "threads", "path", NULL};
    PyObject *ox, *odata, *obias = Py_None, *othreads = NULL;
    int type;
    long long n_out, n_in;
    const char *spath = "auto";
    int path;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "OOiLL|OOs", kwlist, &ox, &odata, &type, &n_out, &n_in, &obias,
                                     &othreads, &spath))
        return NULL;
    if (get_path(spath, &path)) return NULL;
    Mat W;
    Py_buffer view;
    if (get_mat(odata, type, n_out, n_in, &W, &view)) return NULL;
    PyArrayObject *x = get_f32(ox, "x", 2, n_in), *bias = NULL, *out = NULL;
    if (x && obias != Py_None) {
        bias = get_f32(obias, "bias", 1, n_out);
        if (!bias) Py_CLEAR(x);
    }
    Pool *pool;
    int owned;
    PoolObject *po;
    if (x && get_pool(othreads, &pool, &owned, &po) == 0) {
        npy_intp dims[2] = {PyArray_DIM(x, 0), (npy_intp)n_out};
        out = (PyArrayObject *)PyArray_SimpleNew(2, dims, NPY_FLOAT32);
        if (out) {
            int rc;
            Py_BEGIN_ALLOW_THREADS
            rc = mat_mul_path(pool, PyArray_DATA(out), PyArray_DATA(x), dims[0], &W,
                              bias ? PyArray_DATA(bias) : NULL, path);
            Py_END_ALLOW_THREADS
            if (rc) {
                Py_CLEAR(out);
                PyErr_NoMemory();
            }
        }
        put_pool(pool, owned, po);
    }
    Py_XDECREF(x);
    Py_XDECREF(bias);
    PyBuffer_Release(&view);
    return (PyObject *)out;
}

static PyObject *py_matmul_t(PyObject *mod, PyObject *args, PyObject *kw) {
    static char *kwlist[] = {"g", "data", "type", "n_out", "n_in", "threads", "path", NULL};
    PyObject *og, *odata, *othreads = NULL;
    int type;
    long long n_out, n_in;
    const char *spath = "auto";
    int path;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "OOiLL|Os", kwlist, &og, &odata, &type, &n_out, &n_in, &othreads,
                                     &spath))
        return NULL;
    if (get_path(spath, &path)) return NULL;
    Mat W;
    Py_buffer view;
    if (get_mat(odata, type, n_out, n_in, &W, &view)) return NULL;
    PyArrayObject *g = get_f32(og, "g", 2, n_out), *out = NULL;
    Pool *pool;
    int owned;
    PoolObject *po;
    if (g && get_pool(othreads, &pool, &owned, &po) == 0) {
        npy_intp dims[2] = {PyArray_DIM(g, 0), (npy_intp)n_in};
        out = (PyArrayObject *)PyArray_SimpleNew(2, dims, NPY_FLOAT32);
        if (out) {
            int rc;
            Py_BEGIN_ALLOW_THREADS
            rc = mat_mul_t_path(pool, PyArray_DATA(out), PyArray_DATA(g), dims[0], &W, path);
            Py_END_ALLOW_THREADS
            if (rc) {
                Py_CLEAR(out);
                PyErr_NoMemory();
            }
        }
        put_pool(pool, owned, po);
    }
    Py_XDECREF(g);
    PyBuffer_Release(&view);
    return (PyObject *)out;
}

static PyObject *py_rows_f32(PyObject *mod, PyObject *args) {
    PyObject *odata;
    int type;
    long long n_out, n_in, r0, r1;
    if (!PyArg_ParseTuple(args, "OiLLLL", &odata, &type, &n_out, &n_in, &r0, &r1)) return NULL;
    Mat W;
    Py_buffer view;
    if (get_mat(odata, type, n_out, n_in, &W, &view)) return NULL;
    if (r0 < 0 || r1 < r0 || r1 > n_out) {
        PyBuffer_Release(&view);
        PyErr_Format(PyExc_ValueError, "rows %lld..%lld out of range 0..%lld", r0, r1, n_out);
        return NULL;
    }
    npy_intp dims[2] = {(npy_intp)(r1 - r0), (npy_intp)n_in};
    PyArrayObject *out = (PyArrayObject *)PyArray_SimpleNew(2, dims, NPY_FLOAT32);
    if (out) {
        Py_BEGIN_ALLOW_THREADS
        mat_rows_f32(&W, r0, r1, PyArray_DATA(out));
        Py_END_ALLOW_THREADS
    }
    PyBuffer_Release(&view);
    return (PyObject *)out;
}

static PyObject *py_row_bytes(PyObject *mod, PyObject *args) {
    int type;
    long long n_in;
    int64_t rb;
    if (!PyArg_ParseTuple(args, "iL", &type, &n_in)) return NULL;
    if (mat_row_bytes(type, n_in, &rb)) {
        PyErr_Format(PyExc_ValueError, "type %d with n_in = %lld is not supported", type, n_in);
        return NULL;
    }
    return PyLong_FromLongLong(rb);
}

static PyObject *py_crossover(PyObject *mod, PyObject *args) {
    int type, transposed = 0;
    if (!PyArg_ParseTuple(args, "i|p", &type, &transposed)) return NULL;
    return PyLong_FromLongLong(mat_crossover(type, transposed));
}

static PyObject *py_set_isa(PyObject *mod, PyObject *args) {
    const char *name;
    if (!PyArg_ParseTuple(args, "s", &name)) return NULL;
    if (mat_set_isa(name)) {
        PyErr_Format(PyExc_ValueError, "ISA '%s' is unknown or not supported by this CPU", name);
        return NULL;
    }
    Py_RETURN_NONE;
}

static PyObject *py_isa(PyObject *mod, PyObject *args) { return PyUnicode_FromString(mat_isa()); }

static PyObject *py_isas(PyObject *mod, PyObject *args) {
    static const char *names[] = {"avx512", "avx2", "baseline"};
    PyObject *l = PyList_New(0);
    for (int i = 0; l && i < 3; i++) {
        if (!mat_isa_supported(names[i])) continue;
        PyObject *s = PyUnicode_FromString(names[i]);
        if (!s || PyList_Append(l, s)) {
            Py_XDECREF(s);
            Py_CLEAR(l);
            break;
        }
        Py_DECREF(s);
    }
    return l;
}

/* ---- pool latency benchmark: loops of `chunks` chunks of busy work, `gap_ns` of caller work between loops ---- */

static int64_t mono_ns(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (int64_t)t.tv_sec * 1000000000 + t.tv_nsec;
}

static void busy(int64_t ns) {
    for (int64_t t0 = mono_ns(); mono_ns() - t0 < ns;) {
    }
}

static void busy_range(void *ctx, int64_t lo, int64_t hi, int tid) { busy((hi - lo) * *(const int64_t *)ctx); }

static PyObject *py_pool_bench(PyObject *mod, PyObject *args) {
    PyObject *othreads;
    long long loops, chunks, work_ns, gap_ns;
    if (!PyArg_ParseTuple(args, "OLLLL", &othreads, &loops, &chunks, &work_ns, &gap_ns)) return NULL;
    if (loops < 0 || chunks < 0 || work_ns < 0 || gap_ns < 0) {
        PyErr_SetString(PyExc_ValueError, "pool_bench: loops, chunks, work_ns and gap_ns must be >= 0");
        return NULL;
    }
    Pool *pool;
    int owned;
    PoolObject *po;
    if (get_pool(othreads, &pool, &owned, &po)) return NULL;
    int64_t t0, t1, w = work_ns;
    Py_BEGIN_ALLOW_THREADS
    t0 = mono_ns();
    for (long long i = 0; i < loops; i++) {
        pool_for(pool, chunks, 1, busy_range, &w);
        busy(gap_ns);
    }
    t1 = mono_ns();
    Py_END_ALLOW_THREADS
    put_pool(pool, owned, po);
    return PyFloat_FromDouble((double)(t1 - t0) * 1e-9);
}

static PyMethodDef methods[] = {
    {"matmul", (PyCFunction)(void (*)(void))py_matmul, METH_VARARGS | METH_KEYWORDS,
     "matmul(x, data, type, n_out, n_in, bias=None, threads=1, path='auto') -> x @ W.T (+ bias)"},
    {"matmul_t", (PyCFunction)(void (*)(void))py_matmul_t, METH_VARARGS | METH_KEYWORDS,
     "matmul_t(g, data, type, n_out, n_in, threads=1, path='auto') -> g @ W"},
    {"rows_f32", py_rows_f32, METH_VARARGS, "rows_f32(data, type, n_out, n_in, r0, r1) -> W[r0:r1] as float32"},
    {"row_bytes", py_row_bytes, METH_VARARGS, "row_bytes(type, n_in) -> bytes per row"},
    {"crossover", py_crossover, METH_VARARGS, "crossover(type, transposed=False) -> smallest N of the sgemm regime"},
    {"set_isa", py_set_isa, METH_VARARGS, "set_isa('avx512' | 'avx2' | 'baseline') (test hook)"},
    {"isa", py_isa, METH_NOARGS, "isa() -> the SIMD variant in use"},
    {"isas", py_isas, METH_NOARGS, "isas() -> the SIMD variants this CPU supports, best first"},
    {"pool_bench", py_pool_bench, METH_VARARGS,
     "pool_bench(threads, loops, chunks, work_ns, gap_ns) -> seconds: pool_for loops of busy chunks (benchmark)"},
    {NULL, NULL, 0, NULL}};

static struct PyModuleDef moduledef = {PyModuleDef_HEAD_INIT, "factrace._kernels", "matmul kernels (tests, benchmarks)",
                                       -1, methods};

PyMODINIT_FUNC PyInit__kernels(void) {
    import_array();
    if (PyType_Ready(&PoolType) < 0) return NULL;
    PyObject *m = PyModule_Create(&moduledef);
    if (!m) return NULL;
    openblas_set_num_threads(1); /* sgemm runs inside pool threads, one thread each */
    Py_INCREF(&PoolType);
    if (PyModule_AddObject(m, "Pool", (PyObject *)&PoolType) < 0 ||
        PyModule_AddStringConstant(m, "BLAS", FACTRACE_BLAS_NAME) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
