"""Byte-by-byte writers of synthetic GGUF files (valid and deliberately malformed) for the GGUF tests.

GGUFBuilder assembles header | metadata | tensor infos | padding | data with every field overridable,
so a test can make one field lie while the rest of the file stays well formed.
"""
from __future__ import annotations

import struct

import numpy as np

# GGUF value types
UINT8, INT8, UINT16, INT16, UINT32, INT32, FLOAT32, BOOL, STRING, ARRAY, UINT64, INT64, FLOAT64 = range(13)
SCALAR_FMT = {UINT8: "<B", INT8: "<b", UINT16: "<H", INT16: "<h", UINT32: "<I", INT32: "<i", FLOAT32: "<f",
              BOOL: "<?", UINT64: "<Q", INT64: "<q", FLOAT64: "<d"}
NUMPY_DTYPE = {UINT8: np.uint8, INT8: np.int8, UINT16: np.uint16, INT16: np.int16, UINT32: np.uint32,
               INT32: np.int32, FLOAT32: np.float32, BOOL: np.bool_, UINT64: np.uint64, INT64: np.int64,
               FLOAT64: np.float64}
VALUE_TYPE_NAME = {UINT8: "uint8", INT8: "int8", UINT16: "uint16", INT16: "int16", UINT32: "uint32",
                   INT32: "int32", FLOAT32: "float32", BOOL: "bool", STRING: "string", ARRAY: "array",
                   UINT64: "uint64", INT64: "int64", FLOAT64: "float64"}

# ggml tensor types: id -> (name, block_size, type_size)
GGML = {0: ("F32", 1, 4), 1: ("F16", 1, 2), 2: ("Q4_0", 32, 18), 3: ("Q4_1", 32, 20), 6: ("Q5_0", 32, 22),
        7: ("Q5_1", 32, 24), 8: ("Q8_0", 32, 34), 9: ("Q8_1", 32, 40), 10: ("Q2_K", 256, 84),
        11: ("Q3_K", 256, 110), 12: ("Q4_K", 256, 144), 13: ("Q5_K", 256, 176), 14: ("Q6_K", 256, 210),
        15: ("Q8_K", 256, 292), 17: ("IQ2_XS", 256, 74), 30: ("BF16", 1, 2), 34: ("TQ1_0", 256, 54)}
GGML_ID = {v[0]: k for k, v in GGML.items()}
DEQUANT_TYPES = ["F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K",
                 "Q6_K"]
# byte offsets of the f16 scale fields inside one block
F16_FIELDS = {"Q4_0": [0], "Q4_1": [0, 2], "Q5_0": [0], "Q5_1": [0, 2], "Q8_0": [0], "Q2_K": [80, 82],
              "Q3_K": [108], "Q4_K": [0, 2], "Q5_K": [0, 2], "Q6_K": [208]}


def u32(v: int) -> bytes:
    return struct.pack("<I", v)


def u64(v: int) -> bytes:
    return struct.pack("<Q", v)


def gstr(s: str | bytes, length: int | None = None) -> bytes:
    """GGUF string: u64 length | bytes. `length` overrides the stored length (to lie)."""
    b = s.encode() if isinstance(s, str) else s
    return u64(len(b) if length is None else length) + b


def scalar(vtype: int, value) -> bytes:
    if vtype == STRING:
        return gstr(value)
    return struct.pack(SCALAR_FMT[vtype], value)


def value(vtype: int, v, elem_type: int | None = None) -> bytes:
    """Encoded value (without the leading value-type u32)."""
    if vtype == ARRAY:
        return u32(elem_type) + u64(len(v)) + b"".join(scalar(elem_type, x) for x in v)
    return scalar(vtype, v)


def kv(key: str | bytes, vtype: int, v, elem_type: int | None = None) -> bytes:
    """One metadata entry: key | u32 type | value."""
    return gstr(key) + u32(vtype) + value(vtype, v, elem_type)


def nbytes_of(ne, ggml_type: int) -> int:
    _, bs, ts = GGML[ggml_type]
    n = 1
    for d in ne:
        n *= d
    return n // bs * ts


class GGUFBuilder:
    """Assemble a GGUF file.

    Example::

        b = GGUFBuilder(version=3, alignment=64)
        b.add_kv("general.name", STRING, "x")
        b.add_tensor("w", ne=(64, 2), ggml_type=GGML_ID["Q8_0"])   # numpy shape (2, 64), random bytes
        data = b.build()
    """

    def __init__(self, version: int = 3, alignment: int | None = None, seed: int = 0):
        self.version = version
        self.alignment = alignment if alignment is not None else 32
        self.kvs: list[bytes] = []
        self.tensors: list[dict] = []
        self.rng = np.random.default_rng(seed)
        if alignment is not None:
            self.add_kv("general.alignment", UINT32, alignment)

    def add_kv(self, key, vtype, v, elem_type=None) -> "GGUFBuilder":
        self.kvs.append(kv(key, vtype, v, elem_type))
        return self

    def add_kv_raw(self, raw: bytes) -> "GGUFBuilder":
        self.kvs.append(raw)
        return self

    def add_tensor(self, name, ne, ggml_type, data: bytes | None = None, offset: int | None = None,
                   n_dims: int | None = None, info_raw: bytes | None = None) -> "GGUFBuilder":
        """ne in ggml order (ne[0] = row length). data defaults to random bytes of the right size.
        offset overrides the computed (aligned) data offset; info_raw replaces the whole tensor info."""
        if data is None:
            try:
                size = nbytes_of(ne, ggml_type)
            except KeyError:
                size = 64
            data = self.rng.integers(0, 256, size=min(size, 1 << 20), dtype=np.uint8).tobytes()
        self.tensors.append(dict(name=name, ne=list(ne), type=ggml_type, data=data, offset=offset,
                                 n_dims=n_dims, info_raw=info_raw))
        return self

    def layout(self, n_tensors=None, n_kv=None, magic=b"GGUF"):
        """Return (bytes, sections) where sections maps section name -> (start, end) byte offsets."""
        sec = {}
        out = bytearray(magic + u32(self.version))
        sec["magic+version"] = (0, len(out))
        nt = len(self.tensors) if n_tensors is None else n_tensors
        nk = len(self.kvs) if n_kv is None else n_kv
        if self.version == 1:
            out += u32(nt) + u32(nk)
        else:
            out += u64(nt) + u64(nk)
        sec["counts"] = (8, len(out))
        start = len(out)
        for k in self.kvs:
            out += k
        sec["metadata"] = (start, len(out))
        # data offsets
        offsets, cur = [], 0
        for t in self.tensors:
            cur = (cur + self.alignment - 1) // self.alignment * self.alignment
            offsets.append(cur if t["offset"] is None else t["offset"])
            cur += len(t["data"])
        start = len(out)
        for t, off in zip(self.tensors, offsets):
            if t["info_raw"] is not None:
                out += t["info_raw"]
                continue
            nd = len(t["ne"]) if t["n_dims"] is None else t["n_dims"]
            out += gstr(t["name"]) + u32(nd) + b"".join(u64(d) for d in t["ne"]) + u32(t["type"]) + u64(off)
        sec["tensor_infos"] = (start, len(out))
        pad = (-len(out)) % self.alignment
        out += b"\0" * pad
        data_start = len(out)
        sec["data"] = (data_start, None)
        cur = 0
        for t in self.tensors:
            cur = (cur + self.alignment - 1) // self.alignment * self.alignment
            if data_start + cur > len(out):
                out += b"\0" * (data_start + cur - len(out))
            out += t["data"]
            cur += len(t["data"])
        sec["data"] = (data_start, len(out))
        return bytes(out), sec

    def build(self, **kw) -> bytes:
        return self.layout(**kw)[0]

    def write(self, path, **kw):
        with open(path, "wb") as f:
            f.write(self.build(**kw))
        return path


def all_types_builder(version: int = 3, alignment: int | None = None) -> GGUFBuilder:
    """A valid file using every metadata value type (scalars and arrays) and several tensor types."""
    b = GGUFBuilder(version=version, alignment=alignment)
    b.add_kv("general.architecture", STRING, "llama")
    b.add_kv("t.u8", UINT8, 255).add_kv("t.i8", INT8, -128).add_kv("t.u16", UINT16, 65535)
    b.add_kv("t.i16", INT16, -32768).add_kv("t.u32", UINT32, 2**32 - 1).add_kv("t.i32", INT32, -2**31)
    b.add_kv("t.f32", FLOAT32, 1.5).add_kv("t.bool_t", BOOL, True).add_kv("t.bool_f", BOOL, False)
    b.add_kv("t.str", STRING, "héllo ✓").add_kv("t.str_empty", STRING, "")
    b.add_kv("t.u64", UINT64, 2**64 - 1).add_kv("t.i64", INT64, -2**63).add_kv("t.f64", FLOAT64, -2.25e300)
    for vt, vals in [(UINT8, [0, 1, 255]), (INT8, [-1, 2]), (UINT16, [7]), (INT16, [-7, 8]),
                     (UINT32, [1, 2, 3]), (INT32, [-5]), (FLOAT32, [0.5, -1.25]), (BOOL, [True, False, True]),
                     (UINT64, [2**64 - 1]), (INT64, [-2**63, 5]), (FLOAT64, [3.5]), (STRING, ["a", "", "ü"])]:
        b.add_kv(f"t.arr_{VALUE_TYPE_NAME[vt]}", ARRAY, vals, vt)
    b.add_kv("t.arr_empty", ARRAY, [], INT32)
    b.add_tensor("f32", (8, 3), GGML_ID["F32"])
    b.add_tensor("f16", (5,), GGML_ID["F16"])
    b.add_tensor("q8", (64, 2), GGML_ID["Q8_0"])
    b.add_tensor("q4k", (256, 1, 2), GGML_ID["Q4_K"])
    b.add_tensor("q6k", (512,), GGML_ID["Q6_K"])
    return b
