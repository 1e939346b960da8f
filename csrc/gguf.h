/* gguf.h - validating GGUF (v2, v3) reader over a read-only memory map.
 *
 * Layout (little-endian):
 *   header:  magic "GGUF" | u32 version | u64 n_tensors | u64 n_kv
 *   n_kv x:  string key | u32 value type | value
 *   n_tensors x: string name | u32 n_dims | u64 ne[n_dims] | u32 ggml type | u64 offset
 *   padding to `alignment` (general.alignment, default 32), then the data section;
 *   tensor offsets are relative to the data section and multiples of `alignment`.
 *   string = u64 length | bytes (no terminator); array = u32 element type | u64 count | elements.
 *
 * gguf_parse checks every count, length, offset and dimension against the buffer size and against
 * integer overflow; after it succeeds every offset stored below is safe to read. */
#ifndef FACTRACE_GGUF_H
#define FACTRACE_GGUF_H

#include <stddef.h>
#include <stdint.h>

enum {
    GGUF_TYPE_UINT8 = 0, GGUF_TYPE_INT8 = 1, GGUF_TYPE_UINT16 = 2, GGUF_TYPE_INT16 = 3,
    GGUF_TYPE_UINT32 = 4, GGUF_TYPE_INT32 = 5, GGUF_TYPE_FLOAT32 = 6, GGUF_TYPE_BOOL = 7,
    GGUF_TYPE_STRING = 8, GGUF_TYPE_ARRAY = 9, GGUF_TYPE_UINT64 = 10, GGUF_TYPE_INT64 = 11,
    GGUF_TYPE_FLOAT64 = 12, GGUF_TYPE_COUNT = 13
};

#define GGUF_MAX_DIMS 4
#define GGUF_DEFAULT_ALIGNMENT 32
#define GGUF_ERR_LEN 512

typedef struct {
    uint64_t key_off, key_len; /* key bytes at data + key_off (not NUL-terminated) */
    uint32_t type;             /* GGUF_TYPE_* */
    uint32_t arr_type;         /* element type when type == ARRAY */
    uint64_t arr_count;        /* element count when type == ARRAY */
    uint64_t val_off;          /* offset of the scalar value / string length / first array element */
} gguf_kv;

typedef struct {
    uint64_t name_off, name_len;
    uint32_t n_dims;           /* 0..4 */
    uint64_t ne[GGUF_MAX_DIMS];/* ggml order: ne[0] is the row length (fastest varying); unused = 1 */
    uint32_t type;             /* ggml type id */
    uint64_t offset;           /* relative to data_start */
    uint64_t n_elements;       /* product of ne */
    uint64_t nbytes;           /* n_elements / block_size * type_size */
} gguf_tensor;

typedef struct {
    const uint8_t *data;       /* the whole file (mapped read-only) */
    uint64_t size;
    int mapped;                /* 1 if data is an mmap owned by this struct */
    uint32_t version;
    uint64_t n_kv, n_tensors;
    gguf_kv *kv;               /* (n_kv,) */
    gguf_tensor *tensors;      /* (n_tensors,) */
    uint64_t alignment;
    uint64_t data_start;       /* file offset of the data section */
} gguf_file;

/* Map `path` read-only and parse it. Returns 0 on success; -1 for a malformed file (message in err);
 * -2 for an OS error (errno set, short message in err). On failure *f holds nothing to free. */
int gguf_open(gguf_file *f, const char *path, char *err, size_t errlen);

/* Parse an in-memory buffer (not copied; must outlive f). Returns 0 or -1 (message in err). */
int gguf_parse(gguf_file *f, const uint8_t *data, uint64_t size, char *err, size_t errlen);

/* Free the tables and unmap the file (if mapped). Safe to call twice. */
void gguf_close(gguf_file *f);

/* Index of the tensor named name[0..len), or -1. */
int64_t gguf_find_tensor(const gguf_file *f, const char *name, size_t len);

/* Size in bytes of one element of a scalar value type (0 for STRING / ARRAY / unknown). */
uint64_t gguf_type_size(uint32_t type);

/* Name of a GGUF value type ("uint8", ..., "float64"), or "unknown". */
const char *gguf_type_name(uint32_t type);

/* Read helpers for validated offsets (little-endian, unaligned-safe). */
uint64_t gguf_rd_u64(const uint8_t *p);
uint32_t gguf_rd_u32(const uint8_t *p);

#endif
