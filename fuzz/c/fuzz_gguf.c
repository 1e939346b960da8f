/* libFuzzer target for the C GGUF reader and dequantizers (csrc/gguf.c + csrc/quant.c).
 *
 *   clang -g -O1 -fsanitize=fuzzer,address,undefined -Icsrc fuzz/c/fuzz_gguf.c csrc/gguf.c csrc/quant.c
 *
 * The input is a whole GGUF file. gguf_parse must either reject it or return tables whose every offset
 * is safe: the target then reads every key, every scalar / string / array value, every tensor name and
 * every tensor's bytes, and dequantizes each tensor whose type has a dequantizer (ASan catches any read
 * outside the buffer; the buffer is an exact-size heap copy). */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "gguf.h"
#include "quant.h"

static volatile uint64_t sink;

static uint64_t touch(const uint8_t *p, uint64_t n) {
    uint64_t s = 0;
    for (uint64_t i = 0; i < n; i++) s += p[i];
    return s;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    uint8_t *buf = malloc(size ? size : 1);   /* exact-size copy: reads past the end are caught */
    if (!buf) return 0;
    memcpy(buf, data, size);
    gguf_file f;
    char err[GGUF_ERR_LEN];
    if (gguf_parse(&f, buf, size, err, sizeof err) != 0) {
        if (strnlen(err, sizeof err) == sizeof err) __builtin_trap();   /* message must be terminated */
        free(buf);
        return 0;
    }
    uint64_t s = 0;
    for (uint64_t i = 0; i < f.n_kv; i++) {
        const gguf_kv *kv = &f.kv[i];
        s += touch(f.data + kv->key_off, kv->key_len);
        if (kv->type == GGUF_TYPE_STRING) {
            uint64_t n = gguf_rd_u64(f.data + kv->val_off);
            s += touch(f.data + kv->val_off + 8, n);
        } else if (kv->type == GGUF_TYPE_ARRAY) {
            uint64_t off = kv->val_off;
            for (uint64_t j = 0; j < kv->arr_count; j++) {
                if (kv->arr_type == GGUF_TYPE_STRING) {
                    uint64_t n = gguf_rd_u64(f.data + off);
                    s += touch(f.data + off + 8, n);
                    off += 8 + n;
                } else {
                    uint64_t n = gguf_type_size(kv->arr_type);
                    s += touch(f.data + off, n);
                    off += n;
                }
            }
        } else {
            s += touch(f.data + kv->val_off, gguf_type_size(kv->type));
        }
    }
    for (uint64_t i = 0; i < f.n_tensors; i++) {
        const gguf_tensor *t = &f.tensors[i];
        s += touch(f.data + t->name_off, t->name_len);
        if (gguf_find_tensor(&f, (const char *)f.data + t->name_off, t->name_len) != (int64_t)i)
            __builtin_trap();                   /* names are unique and findable */
        const uint8_t *src = f.data + f.data_start + t->offset;
        s += touch(src, t->nbytes);
        const quant_type_info *qt = quant_type(t->type);
        if (qt && qt->can_dequant && t->n_elements <= (1u << 22)) {
            float *dst = malloc((t->n_elements ? t->n_elements : 1) * sizeof(float));
            if (dst) {
                if (quant_dequantize(t->type, src, dst, (int64_t)t->n_elements) != 0) __builtin_trap();
                for (uint64_t j = 0; j < t->n_elements; j++) s += (uint64_t)(dst[j] == dst[j]);
                free(dst);
            }
        }
    }
    sink = s;
    gguf_close(&f);
    free(buf);
    return 0;
}
