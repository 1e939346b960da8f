/* gguf.c - validating GGUF reader. See gguf.h for the layout. */
#define _POSIX_C_SOURCE 200809L
#include "gguf.h"

#include "quant.h"

#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

static const uint64_t TYPE_SIZE[GGUF_TYPE_COUNT] = {1, 1, 2, 2, 4, 4, 4, 1, 0, 0, 8, 8, 8};
static const char *const TYPE_NAME[GGUF_TYPE_COUNT] = {
    "uint8", "int8", "uint16", "int16", "uint32", "int32", "float32",
    "bool",  "string", "array", "uint64", "int64", "float64"};

uint64_t gguf_type_size(uint32_t type) { return type < GGUF_TYPE_COUNT ? TYPE_SIZE[type] : 0; }

const char *gguf_type_name(uint32_t type) { return type < GGUF_TYPE_COUNT ? TYPE_NAME[type] : "unknown"; }

uint64_t gguf_rd_u64(const uint8_t *p) {
    uint64_t v = 0;
    for (int i = 7; i >= 0; i--) v = (v << 8) | p[i];
    return v;
}

uint32_t gguf_rd_u32(const uint8_t *p) {
    return (uint32_t)p[0] | ((uint32_t)p[1] << 8) | ((uint32_t)p[2] << 16) | ((uint32_t)p[3] << 24);
}

/* ---- bounded cursor over the buffer ---- */

typedef struct {
    const uint8_t *data;
    uint64_t size, pos;
    char *err;
    size_t errlen;
} cursor;

static int fail(cursor *c, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(c->err, c->errlen, fmt, ap);
    va_end(ap);
    return -1;
}

static uint64_t remaining(const cursor *c) { return c->size - c->pos; }

/* Ensure n more bytes exist; `what`/`idx` describe the item for the error message. */
static int need(cursor *c, uint64_t n, const char *what, uint64_t idx) {
    if (n > remaining(c))
        return fail(c, "file truncated: %s %" PRIu64 " needs %" PRIu64 " bytes at offset %" PRIu64
                       " but the file has %" PRIu64 " bytes", what, idx, n, c->pos, c->size);
    return 0;
}

static int rd_u32(cursor *c, uint32_t *v, const char *what, uint64_t idx) {
    if (need(c, 4, what, idx)) return -1;
    *v = gguf_rd_u32(c->data + c->pos);
    c->pos += 4;
    return 0;
}

static int rd_u64(cursor *c, uint64_t *v, const char *what, uint64_t idx) {
    if (need(c, 8, what, idx)) return -1;
    *v = gguf_rd_u64(c->data + c->pos);
    c->pos += 8;
    return 0;
}

/* string = u64 len | bytes. Returns offset and length of the bytes. */
static int rd_str(cursor *c, uint64_t *off, uint64_t *len, const char *what, uint64_t idx) {
    uint64_t start = c->pos;
    if (rd_u64(c, len, what, idx)) return -1;
    if (*len > remaining(c))
        return fail(c, "string too long: %s %" PRIu64 " at offset %" PRIu64 " claims %" PRIu64
                       " bytes but only %" PRIu64 " remain in the file", what, idx, start, *len, remaining(c));
    *off = c->pos;
    c->pos += *len;
    return 0;
}

/* Grow a table to hold at least n items (doubling), so a lying count costs memory only for items
 * actually present in the file. */
static int grow(cursor *c, void **tab, uint64_t *cap, uint64_t n, size_t item) {
    if (n <= *cap) return 0;
    uint64_t nc = *cap ? *cap * 2 : 16;
    while (nc < n) nc *= 2;
    void *p = realloc(*tab, (size_t)nc * item);
    if (!p) return fail(c, "out of memory");
    *tab = p;
    *cap = nc;
    return 0;
}

/* ---- metadata ---- */

/* Skip one value of `type`; arrays only one level deep. */
static int skip_array(cursor *c, gguf_kv *kv, uint64_t idx) {
    uint32_t at;
    uint64_t n;
    if (rd_u32(c, &at, "array element type of metadata entry", idx)) return -1;
    if (rd_u64(c, &n, "array length of metadata entry", idx)) return -1;
    if (at == GGUF_TYPE_ARRAY) return fail(c, "nested arrays are not supported (metadata entry %" PRIu64 ")", idx);
    if (at >= GGUF_TYPE_COUNT)
        return fail(c, "unknown array element type %" PRIu32 " in metadata entry %" PRIu64, at, idx);
    kv->arr_type = at;
    kv->arr_count = n;
    kv->val_off = c->pos;
    if (at == GGUF_TYPE_STRING) {
        if (n > remaining(c) / 8)
            return fail(c, "array length %" PRIu64 " of metadata entry %" PRIu64
                           " exceeds the file size (%" PRIu64 " bytes)", n, idx, c->size);
        for (uint64_t i = 0; i < n; i++) {
            uint64_t off, len;
            if (rd_str(c, &off, &len, "string array element of metadata entry", idx)) return -1;
        }
        return 0;
    }
    uint64_t es = TYPE_SIZE[at];
    if (n > remaining(c) / es)
        return fail(c, "array length %" PRIu64 " of metadata entry %" PRIu64 " (%s) exceeds the file size "
                       "(%" PRIu64 " bytes)", n, idx, TYPE_NAME[at], c->size);
    c->pos += n * es;
    return 0;
}

static int parse_kv(cursor *c, gguf_kv *kv, uint64_t idx) {
    if (rd_str(c, &kv->key_off, &kv->key_len, "key of metadata entry", idx)) return -1;
    if (rd_u32(c, &kv->type, "value type of metadata entry", idx)) return -1;
    kv->arr_type = 0;
    kv->arr_count = 0;
    kv->val_off = c->pos;
    if (kv->type >= GGUF_TYPE_COUNT)
        return fail(c, "unknown value type %" PRIu32 " in metadata entry %" PRIu64 " ('%.*s')", kv->type, idx,
                    (int)(kv->key_len > 200 ? 200 : kv->key_len), (const char *)c->data + kv->key_off);
    if (kv->type == GGUF_TYPE_ARRAY) return skip_array(c, kv, idx);
    if (kv->type == GGUF_TYPE_STRING) {
        uint64_t off, len;
        return rd_str(c, &off, &len, "string value of metadata entry", idx);
    }
    if (need(c, TYPE_SIZE[kv->type], "value of metadata entry", idx)) return -1;
    c->pos += TYPE_SIZE[kv->type];
    return 0;
}

/* ---- duplicate detection (sort names, compare neighbours) ---- */

typedef struct {
    const uint8_t *p;
    uint64_t len;
} name_ref;

static int cmp_name(const void *a, const void *b) {
    const name_ref *x = a, *y = b;
    uint64_t n = x->len < y->len ? x->len : y->len;
    int r = n ? memcmp(x->p, y->p, (size_t)n) : 0;
    if (r) return r;
    return (x->len > y->len) - (x->len < y->len);
}

/* Finds a duplicate among n names given as (offset, length) pairs at stride `stride` bytes. */
static int check_unique(cursor *c, const void *items, uint64_t n, size_t stride, const char *what) {
    if (n < 2) return 0;
    name_ref *refs = malloc((size_t)n * sizeof *refs);
    if (!refs) return fail(c, "out of memory");
    for (uint64_t i = 0; i < n; i++) {
        const uint64_t *ol = (const uint64_t *)((const char *)items + i * stride); /* off, len first */
        refs[i].p = c->data + ol[0];
        refs[i].len = ol[1];
    }
    qsort(refs, (size_t)n, sizeof *refs, cmp_name);
    for (uint64_t i = 1; i < n; i++) {
        if (cmp_name(&refs[i - 1], &refs[i]) == 0) {
            int len = (int)(refs[i].len > 200 ? 200 : refs[i].len);
            fail(c, "duplicate %s '%.*s'", what, len, (const char *)refs[i].p);
            free(refs);
            return -1;
        }
    }
    free(refs);
    return 0;
}

/* ---- tensor infos ---- */

static int parse_tensor(cursor *c, gguf_tensor *t, uint64_t idx, uint64_t alignment) {
    if (rd_str(c, &t->name_off, &t->name_len, "name of tensor info", idx)) return -1;
    int nl = (int)(t->name_len > 200 ? 200 : t->name_len);
    const char *nm = (const char *)c->data + t->name_off;
    if (rd_u32(c, &t->n_dims, "n_dims of tensor info", idx)) return -1;
    if (t->n_dims > GGUF_MAX_DIMS)
        return fail(c, "tensor '%.*s' has %" PRIu32 " dimensions (at most %d are supported)", nl, nm, t->n_dims,
                    GGUF_MAX_DIMS);
    uint64_t n = 1;
    for (int d = 0; d < GGUF_MAX_DIMS; d++) t->ne[d] = 1;
    for (uint32_t d = 0; d < t->n_dims; d++) {
        if (rd_u64(c, &t->ne[d], "dimension of tensor info", idx)) return -1;
        if (t->ne[d] == 0) return fail(c, "tensor '%.*s' has a dimension of size 0", nl, nm);
        if (t->ne[d] > (uint64_t)INT64_MAX / n)
            return fail(c, "tensor '%.*s': element count overflows (dimension %" PRIu32 " = %" PRIu64 ")", nl, nm,
                        d, t->ne[d]);
        n *= t->ne[d];
    }
    t->n_elements = n;
    if (rd_u32(c, &t->type, "type of tensor info", idx)) return -1;
    const quant_type_info *qt = quant_type(t->type);
    if (!qt) return fail(c, "tensor '%.*s' has unknown ggml type %" PRIu32, nl, nm, t->type);
    if (t->ne[0] % (uint64_t)qt->block_size != 0)
        return fail(c, "tensor '%.*s': row length %" PRIu64 " is not a multiple of the %s block size %" PRId64, nl,
                    nm, t->ne[0], qt->name, qt->block_size);
    uint64_t nblocks = n / (uint64_t)qt->block_size;
    if (nblocks > UINT64_MAX / (uint64_t)qt->type_size)
        return fail(c, "tensor '%.*s': byte size overflows", nl, nm);
    t->nbytes = nblocks * (uint64_t)qt->type_size;
    if (rd_u64(c, &t->offset, "data offset of tensor info", idx)) return -1;
    if (t->offset % alignment != 0)
        return fail(c, "tensor '%.*s': data offset %" PRIu64 " is not a multiple of the alignment %" PRIu64, nl, nm,
                    t->offset, alignment);
    return 0;
}

/* general.alignment: must be a uint32 power of two. */
static int find_alignment(cursor *c, const gguf_kv *kv, uint64_t n_kv, uint64_t *alignment) {
    static const char KEY[] = "general.alignment";
    *alignment = GGUF_DEFAULT_ALIGNMENT;
    for (uint64_t i = 0; i < n_kv; i++) {
        if (kv[i].key_len != sizeof KEY - 1 || memcmp(c->data + kv[i].key_off, KEY, sizeof KEY - 1) != 0) continue;
        if (kv[i].type != GGUF_TYPE_UINT32)
            return fail(c, "general.alignment must be of type uint32, not %s", TYPE_NAME[kv[i].type]);
        uint32_t a = gguf_rd_u32(c->data + kv[i].val_off);
        if (a == 0 || (a & (a - 1)) != 0)
            return fail(c, "general.alignment must be a non-zero power of two, got %" PRIu32, a);
        *alignment = a;
    }
    return 0;
}

int gguf_parse(gguf_file *f, const uint8_t *data, uint64_t size, char *err, size_t errlen) {
    memset(f, 0, sizeof *f);
    f->data = data;
    f->size = size;
    cursor cur = {data, size, 0, err, errlen}, *c = &cur;
    uint64_t cap_kv = 0, cap_t = 0;

    /* header */
    if (need(c, 4, "magic", 0)) goto bad;
    if (memcmp(data, "GGUF", 4) != 0) {
        fail(c, "not a GGUF file (magic bytes %02x %02x %02x %02x)", data[0], data[1], data[2], data[3]);
        goto bad;
    }
    c->pos = 4;
    if (rd_u32(c, &f->version, "version", 0)) goto bad;
    if (f->version == 1) {
        fail(c, "GGUF version 1 is not supported (only versions 2 and 3)");
        goto bad;
    }
    if (f->version != 2 && f->version != 3) {
        fail(c, "unsupported GGUF version %" PRIu32 "%s (only versions 2 and 3)", f->version,
             (f->version & 0xffff) == 0 ? ", big-endian file?" : "");
        goto bad;
    }
    if (rd_u64(c, &f->n_tensors, "tensor count", 0) || rd_u64(c, &f->n_kv, "metadata count", 0)) goto bad;
    /* smallest metadata entry: key length 8 + type 4 + 1 value byte; smallest tensor info: 24 bytes */
    if (f->n_kv > remaining(c) / 13) {
        fail(c, "metadata count %" PRIu64 " cannot fit in a file of %" PRIu64 " bytes", f->n_kv, size);
        goto bad;
    }
    if (f->n_tensors > remaining(c) / 24) {
        fail(c, "tensor count %" PRIu64 " cannot fit in a file of %" PRIu64 " bytes", f->n_tensors, size);
        goto bad;
    }

    /* metadata */
    for (uint64_t i = 0; i < f->n_kv; i++) {
        if (grow(c, (void **)&f->kv, &cap_kv, i + 1, sizeof *f->kv)) goto bad;
        if (parse_kv(c, &f->kv[i], i)) goto bad;
    }
    if (check_unique(c, f->kv, f->n_kv, sizeof *f->kv, "metadata key")) goto bad;
    if (find_alignment(c, f->kv, f->n_kv, &f->alignment)) goto bad;

    /* tensor infos */
    for (uint64_t i = 0; i < f->n_tensors; i++) {
        if (grow(c, (void **)&f->tensors, &cap_t, i + 1, sizeof *f->tensors)) goto bad;
        if (parse_tensor(c, &f->tensors[i], i, f->alignment)) goto bad;
    }
    if (check_unique(c, f->tensors, f->n_tensors, sizeof *f->tensors, "tensor name")) goto bad;

    /* data section: starts at the next multiple of the alignment */
    uint64_t pad = (f->alignment - c->pos % f->alignment) % f->alignment;
    f->data_start = c->pos + pad; /* c->pos <= size and pad < 2^32: no overflow */
    for (uint64_t i = 0; i < f->n_tensors; i++) {
        const gguf_tensor *t = &f->tensors[i];
        int nl = (int)(t->name_len > 200 ? 200 : t->name_len);
        const char *nm = (const char *)data + t->name_off;
        if (f->data_start > size) {
            fail(c, "file truncated: data section would start at offset %" PRIu64 " but the file has %" PRIu64
                    " bytes", f->data_start, size);
            goto bad;
        }
        uint64_t avail = size - f->data_start;
        if (t->offset > avail || t->nbytes > avail - t->offset) {
            fail(c, "tensor '%.*s': data [%" PRIu64 ", +%" PRIu64 ") relative to the data section at %" PRIu64
                    " runs past the end of the file (%" PRIu64 " bytes)", nl, nm, t->offset, t->nbytes,
                 f->data_start, size);
            goto bad;
        }
    }
    return 0;
bad:
    free(f->kv);
    free(f->tensors);
    f->kv = NULL;
    f->tensors = NULL;
    return -1;
}

int gguf_open(gguf_file *f, const char *path, char *err, size_t errlen) {
    memset(f, 0, sizeof *f);
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) {
        snprintf(err, errlen, "cannot open");
        return -2;
    }
    struct stat st;
    if (fstat(fd, &st) != 0) {
        int e = errno;
        close(fd);
        errno = e;
        snprintf(err, errlen, "cannot stat");
        return -2;
    }
    if (!S_ISREG(st.st_mode)) {
        close(fd);
        snprintf(err, errlen, "not a regular file");
        return -1;
    }
    uint64_t size = (uint64_t)st.st_size;
    if (size == 0) {
        close(fd);
        snprintf(err, errlen, "file is empty (not a GGUF file)");
        return -1;
    }
    if (size > (uint64_t)SIZE_MAX) {
        close(fd);
        snprintf(err, errlen, "file too large to map");
        return -1;
    }
    void *p = mmap(NULL, (size_t)size, PROT_READ, MAP_PRIVATE, fd, 0);
    int e = errno;
    close(fd);
    if (p == MAP_FAILED) {
        errno = e;
        snprintf(err, errlen, "cannot mmap");
        return -2;
    }
    if (gguf_parse(f, p, size, err, errlen) != 0) {
        munmap(p, (size_t)size);
        memset(f, 0, sizeof *f);
        return -1;
    }
    f->mapped = 1;
    return 0;
}

void gguf_close(gguf_file *f) {
    if (f->mapped && f->data) munmap((void *)f->data, (size_t)f->size);
    free(f->kv);
    free(f->tensors);
    memset(f, 0, sizeof *f);
}

int64_t gguf_find_tensor(const gguf_file *f, const char *name, size_t len) {
    for (uint64_t i = 0; i < f->n_tensors; i++) {
        const gguf_tensor *t = &f->tensors[i];
        if (t->name_len == len && memcmp(f->data + t->name_off, name, len) == 0) return (int64_t)i;
    }
    return -1;
}
