/* gguf_module.c - Python bindings for the GGUF reader and dequantizers (factrace._gguf).
 *
 * Reader(path): maps and validates a GGUF file. Errors in the file raise ValueError (factrace.gguf maps
 * them to GGUFError and adds the path); OS errors raise OSError. All arrays returned are fresh copies. */
#define _GNU_SOURCE /* madvise, MADV_DONTNEED */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <numpy/arrayobject.h>

#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include "gguf.h"
#include "quant.h"

typedef struct {
    PyObject_HEAD
    gguf_file f;
    int open;
    int busy; /* calls running without the GIL that read the map; close() refuses while > 0 */
} Reader;

static int reader_check(Reader *r) {
    if (!r->open) {
        PyErr_SetString(PyExc_ValueError, "GGUF file is closed");
        return -1;
    }
    return 0;
}

static int Reader_init(Reader *self, PyObject *args, PyObject *kwds) {
    static char *kwlist[] = {"path", NULL};
    PyObject *path_obj = NULL;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "O&", kwlist, PyUnicode_FSConverter, &path_obj)) return -1;
    if (self->open) {
        PyErr_SetString(PyExc_RuntimeError, "Reader already initialised");
        Py_DECREF(path_obj);
        return -1;
    }
    const char *path = PyBytes_AS_STRING(path_obj);
    char err[GGUF_ERR_LEN] = {0};
    int rc;
    Py_BEGIN_ALLOW_THREADS
    rc = gguf_open(&self->f, path, err, sizeof err);
    Py_END_ALLOW_THREADS
    if (rc == -2) {
        PyErr_SetFromErrnoWithFilenameObject(PyExc_OSError, path_obj);
        Py_DECREF(path_obj);
        return -1;
    }
    Py_DECREF(path_obj);
    if (rc != 0) {
        PyObject *msg = PyUnicode_DecodeUTF8(err, (Py_ssize_t)strlen(err), "replace");
        if (msg) {
            PyErr_SetObject(PyExc_ValueError, msg);
            Py_DECREF(msg);
        }
        return -1;
    }
    self->open = 1;
    return 0;
}

static void Reader_dealloc(Reader *self) {
    if (self->open) gguf_close(&self->f);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyObject *Reader_close(Reader *self, PyObject *unused) {
    if (self->busy > 0) {
        PyErr_SetString(PyExc_RuntimeError, "cannot close a GGUF file while another thread reads from it");
        return NULL;
    }
    if (self->open) gguf_close(&self->f);
    self->open = 0;
    Py_RETURN_NONE;
}

/* strict UTF-8 for keys and tensor names */
static PyObject *decode_name(const uint8_t *p, uint64_t len, const char *what, uint64_t idx) {
    PyObject *s = PyUnicode_DecodeUTF8((const char *)p, (Py_ssize_t)len, "strict");
    if (!s) {
        PyErr_Clear();
        PyErr_Format(PyExc_ValueError, "%s %llu is not valid UTF-8", what, (unsigned long long)idx);
    }
    return s;
}

/* metadata string values: invalid UTF-8 bytes become lone surrogates (errors="surrogateescape") */
static PyObject *decode_value_str(const uint8_t *p, uint64_t len) {
    return PyUnicode_DecodeUTF8((const char *)p, (Py_ssize_t)len, "surrogateescape");
}

static PyObject *scalar_value(uint32_t type, const uint8_t *p) {
    uint64_t u;
    float f32;
    double f64;
    switch (type) {
    case GGUF_TYPE_UINT8: return PyLong_FromUnsignedLong(p[0]);
    case GGUF_TYPE_INT8: return PyLong_FromLong((int8_t)p[0]);
    case GGUF_TYPE_UINT16: return PyLong_FromUnsignedLong((unsigned long)(p[0] | (p[1] << 8)));
    case GGUF_TYPE_INT16: return PyLong_FromLong((int16_t)(uint16_t)(p[0] | (p[1] << 8)));
    case GGUF_TYPE_UINT32: return PyLong_FromUnsignedLong(gguf_rd_u32(p));
    case GGUF_TYPE_INT32: return PyLong_FromLong((int32_t)gguf_rd_u32(p));
    case GGUF_TYPE_UINT64: return PyLong_FromUnsignedLongLong(gguf_rd_u64(p));
    case GGUF_TYPE_INT64: u = gguf_rd_u64(p); return PyLong_FromLongLong((long long)(int64_t)u);
    case GGUF_TYPE_FLOAT32: {
        uint32_t b = gguf_rd_u32(p);
        memcpy(&f32, &b, 4);
        return PyFloat_FromDouble((double)f32);
    }
    case GGUF_TYPE_FLOAT64:
        u = gguf_rd_u64(p);
        memcpy(&f64, &u, 8);
        return PyFloat_FromDouble(f64);
    case GGUF_TYPE_BOOL: return PyBool_FromLong(p[0] != 0);
    default: PyErr_Format(PyExc_ValueError, "unknown value type %u", type); return NULL;
    }
}

static int npy_type_of(uint32_t type) {
    switch (type) {
    case GGUF_TYPE_UINT8: return NPY_UINT8;
    case GGUF_TYPE_INT8: return NPY_INT8;
    case GGUF_TYPE_UINT16: return NPY_UINT16;
    case GGUF_TYPE_INT16: return NPY_INT16;
    case GGUF_TYPE_UINT32: return NPY_UINT32;
    case GGUF_TYPE_INT32: return NPY_INT32;
    case GGUF_TYPE_FLOAT32: return NPY_FLOAT32;
    case GGUF_TYPE_UINT64: return NPY_UINT64;
    case GGUF_TYPE_INT64: return NPY_INT64;
    case GGUF_TYPE_FLOAT64: return NPY_FLOAT64;
    case GGUF_TYPE_BOOL: return NPY_BOOL;
    default: return -1;
    }
}

/* numeric / bool arrays -> 1-D numpy copy (count,); string arrays -> list[str] */
static PyObject *array_value(const gguf_file *f, const gguf_kv *kv) {
    const uint8_t *p = f->data + kv->val_off;
    if (kv->arr_type == GGUF_TYPE_STRING) {
        PyObject *list = PyList_New((Py_ssize_t)kv->arr_count);
        if (!list) return NULL;
        for (uint64_t i = 0; i < kv->arr_count; i++) {
            uint64_t len = gguf_rd_u64(p);
            PyObject *s = decode_value_str(p + 8, len);
            if (!s) {
                Py_DECREF(list);
                return NULL;
            }
            PyList_SET_ITEM(list, (Py_ssize_t)i, s);
            p += 8 + len;
        }
        return list;
    }
    int nt = npy_type_of(kv->arr_type);
    if (nt < 0) {
        PyErr_Format(PyExc_ValueError, "unknown array element type %u", kv->arr_type);
        return NULL;
    }
    npy_intp dims[1] = {(npy_intp)kv->arr_count};
    PyObject *arr = PyArray_SimpleNew(1, dims, nt);
    if (!arr) return NULL;
    uint8_t *dst = PyArray_DATA((PyArrayObject *)arr);
    if (kv->arr_type == GGUF_TYPE_BOOL) {
        for (uint64_t i = 0; i < kv->arr_count; i++) dst[i] = p[i] != 0;
    } else {
        memcpy(dst, p, (size_t)(kv->arr_count * gguf_type_size(kv->arr_type))); /* little-endian host */
    }
    return arr;
}

/* metadata() -> list of (key, value, value_type, array_element_type or None) in file order */
static PyObject *Reader_metadata(Reader *self, PyObject *unused) {
    if (reader_check(self)) return NULL;
    const gguf_file *f = &self->f;
    PyObject *out = PyList_New((Py_ssize_t)f->n_kv);
    if (!out) return NULL;
    for (uint64_t i = 0; i < f->n_kv; i++) {
        const gguf_kv *kv = &f->kv[i];
        PyObject *key = decode_name(f->data + kv->key_off, kv->key_len, "metadata key", i);
        if (!key) goto fail;
        PyObject *val;
        if (kv->type == GGUF_TYPE_ARRAY)
            val = array_value(f, kv);
        else if (kv->type == GGUF_TYPE_STRING)
            val = decode_value_str(f->data + kv->val_off + 8, gguf_rd_u64(f->data + kv->val_off));
        else
            val = scalar_value(kv->type, f->data + kv->val_off);
        if (!val) {
            Py_DECREF(key);
            goto fail;
        }
        PyObject *t = kv->type == GGUF_TYPE_ARRAY
                          ? Py_BuildValue("(NNss)", key, val, gguf_type_name(kv->type), gguf_type_name(kv->arr_type))
                          : Py_BuildValue("(NNsO)", key, val, gguf_type_name(kv->type), Py_None);
        if (!t) goto fail;
        PyList_SET_ITEM(out, (Py_ssize_t)i, t);
    }
    return out;
fail:
    Py_DECREF(out);
    return NULL;
}

/* tensor_infos() -> list of (name, ne (ggml order), ggml_type, offset, nbytes) in file order */
static PyObject *Reader_tensor_infos(Reader *self, PyObject *unused) {
    if (reader_check(self)) return NULL;
    const gguf_file *f = &self->f;
    PyObject *out = PyList_New((Py_ssize_t)f->n_tensors);
    if (!out) return NULL;
    for (uint64_t i = 0; i < f->n_tensors; i++) {
        const gguf_tensor *t = &f->tensors[i];
        PyObject *name = decode_name(f->data + t->name_off, t->name_len, "tensor name", i);
        if (!name) goto fail;
        PyObject *ne = PyTuple_New(t->n_dims);
        if (!ne) {
            Py_DECREF(name);
            goto fail;
        }
        for (uint32_t d = 0; d < t->n_dims; d++) PyTuple_SET_ITEM(ne, d, PyLong_FromUnsignedLongLong(t->ne[d]));
        PyObject *tup = Py_BuildValue("(NNIKK)", name, ne, t->type, (unsigned long long)t->offset,
                                      (unsigned long long)t->nbytes);
        if (!tup) goto fail;
        PyList_SET_ITEM(out, (Py_ssize_t)i, tup);
    }
    return out;
fail:
    Py_DECREF(out);
    return NULL;
}

static const gguf_tensor *get_tensor(Reader *self, PyObject *arg) {
    if (reader_check(self)) return NULL;
    Py_ssize_t i = PyLong_AsSsize_t(arg);
    if (i == -1 && PyErr_Occurred()) return NULL;
    if (i < 0 || (uint64_t)i >= self->f.n_tensors) {
        PyErr_SetString(PyExc_IndexError, "tensor index out of range");
        return NULL;
    }
    return &self->f.tensors[i];
}

/* Drop the mapped pages wholly inside bytes [p, p + n) of the file from this process's memory once a tensor
 * has been copied out (they stay in the page cache; a later read faults them back in), so that loading a
 * model holds its weights once, not twice. */
static void release_pages(const Reader *self, const uint8_t *p, uint64_t n) {
    if (!self->f.mapped) return;
    uintptr_t page = (uintptr_t)sysconf(_SC_PAGESIZE);
    uintptr_t a = ((uintptr_t)p + page - 1) / page * page, b = ((uintptr_t)p + n) / page * page;
    if (b > a) madvise((void *)a, b - a, MADV_DONTNEED);
}

/* tensor(index) -> float32 array, shape = reversed ne (numpy order) */
static PyObject *Reader_tensor(Reader *self, PyObject *arg) {
    const gguf_tensor *t = get_tensor(self, arg);
    if (!t) return NULL;
    const quant_type_info *qt = quant_type(t->type);
    if (!qt->can_dequant) {
        PyErr_Format(PyExc_ValueError, "tensor type %s (%u) is not supported for dequantization", qt->name, t->type);
        return NULL;
    }
    npy_intp dims[GGUF_MAX_DIMS];
    for (uint32_t d = 0; d < t->n_dims; d++) dims[t->n_dims - 1 - d] = (npy_intp)t->ne[d];
    PyObject *arr = PyArray_SimpleNew((int)t->n_dims, dims, NPY_FLOAT32);
    if (!arr) return NULL;
    const uint8_t *src = self->f.data + self->f.data_start + t->offset;
    float *dst = PyArray_DATA((PyArrayObject *)arr);
    int rc;
    self->busy++;
    Py_BEGIN_ALLOW_THREADS
    rc = quant_dequantize(t->type, src, dst, (int64_t)t->n_elements);
    release_pages(self, src, t->nbytes);
    Py_END_ALLOW_THREADS
    self->busy--;
    if (rc != 0) {
        Py_DECREF(arr);
        PyErr_Format(PyExc_ValueError, "cannot dequantize tensor of type %s", qt->name);
        return NULL;
    }
    return arr;
}

/* raw(index) -> uint8 array (nbytes,), a copy of the stored bytes */
static PyObject *Reader_raw(Reader *self, PyObject *arg) {
    const gguf_tensor *t = get_tensor(self, arg);
    if (!t) return NULL;
    npy_intp dims[1] = {(npy_intp)t->nbytes};
    PyObject *arr = PyArray_SimpleNew(1, dims, NPY_UINT8);
    if (!arr) return NULL;
    const uint8_t *src = self->f.data + self->f.data_start + t->offset;
    void *dst = PyArray_DATA((PyArrayObject *)arr);
    self->busy++;
    Py_BEGIN_ALLOW_THREADS
    memcpy(dst, src, (size_t)t->nbytes);
    release_pages(self, src, t->nbytes);
    Py_END_ALLOW_THREADS
    self->busy--;
    return arr;
}

static PyObject *Reader_get_version(Reader *self, void *c) {
    if (reader_check(self)) return NULL;
    return PyLong_FromUnsignedLong(self->f.version);
}
static PyObject *Reader_get_alignment(Reader *self, void *c) {
    if (reader_check(self)) return NULL;
    return PyLong_FromUnsignedLongLong(self->f.alignment);
}
static PyObject *Reader_get_data_start(Reader *self, void *c) {
    if (reader_check(self)) return NULL;
    return PyLong_FromUnsignedLongLong(self->f.data_start);
}
static PyObject *Reader_get_size(Reader *self, void *c) {
    if (reader_check(self)) return NULL;
    return PyLong_FromUnsignedLongLong(self->f.size);
}
static PyObject *Reader_get_closed(Reader *self, void *c) { return PyBool_FromLong(!self->open); }

static PyMethodDef Reader_methods[] = {
    {"metadata", (PyCFunction)Reader_metadata, METH_NOARGS,
     "metadata() -> list of (key, value, value_type, array_element_type or None)"},
    {"tensor_infos", (PyCFunction)Reader_tensor_infos, METH_NOARGS,
     "tensor_infos() -> list of (name, ne in ggml order, ggml_type, offset, nbytes)"},
    {"tensor", (PyCFunction)Reader_tensor, METH_O, "tensor(index) -> float32 array (numpy order shape)"},
    {"raw", (PyCFunction)Reader_raw, METH_O, "raw(index) -> uint8 copy of the stored bytes"},
    {"close", (PyCFunction)Reader_close, METH_NOARGS, "close() -> None; unmaps the file"},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef Reader_getset[] = {
    {"version", (getter)Reader_get_version, NULL, "GGUF version", NULL},
    {"alignment", (getter)Reader_get_alignment, NULL, "data alignment in bytes", NULL},
    {"data_start", (getter)Reader_get_data_start, NULL, "file offset of the data section", NULL},
    {"size", (getter)Reader_get_size, NULL, "file size in bytes", NULL},
    {"closed", (getter)Reader_get_closed, NULL, "True after close()", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyTypeObject ReaderType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "factrace._gguf.Reader",
    .tp_basicsize = sizeof(Reader),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "Reader(path): memory-mapped, validated GGUF file",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Reader_init,
    .tp_dealloc = (destructor)Reader_dealloc,
    .tp_methods = Reader_methods,
    .tp_getset = Reader_getset,
};

/* dequantize(buffer, ggml_type, n_elements) -> float32 array (n_elements,) */
static PyObject *mod_dequantize(PyObject *mod, PyObject *args) {
    Py_buffer buf;
    unsigned int type;
    long long n;
    if (!PyArg_ParseTuple(args, "y*IL", &buf, &type, &n)) return NULL;
    PyObject *arr = NULL;
    const quant_type_info *qt = quant_type(type);
    if (!qt) {
        PyErr_Format(PyExc_ValueError, "unknown ggml type %u", type);
        goto done;
    }
    if (!qt->can_dequant) {
        PyErr_Format(PyExc_ValueError, "ggml type %s (%u) is not supported for dequantization", qt->name, type);
        goto done;
    }
    if (n < 0 || n % qt->block_size != 0) {
        PyErr_Format(PyExc_ValueError, "n_elements %lld is not a non-negative multiple of the %s block size %lld",
                     n, qt->name, (long long)qt->block_size);
        goto done;
    }
    unsigned long long need = (unsigned long long)(n / qt->block_size) * (unsigned long long)qt->type_size;
    if ((unsigned long long)buf.len != need) {
        PyErr_Format(PyExc_ValueError, "%lld %s elements need %llu bytes, got %zd", n, qt->name, need, buf.len);
        goto done;
    }
    npy_intp dims[1] = {(npy_intp)n};
    arr = PyArray_SimpleNew(1, dims, NPY_FLOAT32);
    if (!arr) goto done;
    float *dst = PyArray_DATA((PyArrayObject *)arr);
    Py_BEGIN_ALLOW_THREADS
    quant_dequantize(type, buf.buf, dst, n);
    Py_END_ALLOW_THREADS
done:
    PyBuffer_Release(&buf);
    return arr;
}

/* type_info(ggml_type) -> (name, block_size, type_size, can_dequantize) or None */
static PyObject *mod_type_info(PyObject *mod, PyObject *arg) {
    unsigned long t = PyLong_AsUnsignedLong(arg);
    if (t == (unsigned long)-1 && PyErr_Occurred()) {
        PyErr_Clear();
        Py_RETURN_NONE;
    }
    const quant_type_info *qt = t <= UINT32_MAX ? quant_type((uint32_t)t) : NULL;
    if (!qt) Py_RETURN_NONE;
    return Py_BuildValue("(sLLO)", qt->name, (long long)qt->block_size, (long long)qt->type_size,
                         qt->can_dequant ? Py_True : Py_False);
}

static PyMethodDef mod_methods[] = {
    {"dequantize", mod_dequantize, METH_VARARGS, "dequantize(buffer, ggml_type, n_elements) -> float32 array"},
    {"type_info", mod_type_info, METH_O, "type_info(ggml_type) -> (name, block_size, type_size, can_dequantize)"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef moddef = {PyModuleDef_HEAD_INIT, "_gguf", "GGUF reader and dequantizers (C)", -1,
                                    mod_methods};

PyMODINIT_FUNC PyInit__gguf(void) {
    import_array();
    if (PyType_Ready(&ReaderType) < 0) return NULL;
    PyObject *m = PyModule_Create(&moddef);
    if (!m) return NULL;
    Py_INCREF(&ReaderType);
    if (PyModule_AddObject(m, "Reader", (PyObject *)&ReaderType) < 0) {
        Py_DECREF(&ReaderType);
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
