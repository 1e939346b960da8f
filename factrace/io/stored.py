"""Linear weights kept in the format they are stored in: F32, F16 and BF16 as in a safetensors file, GGUF
Q8_0 / Q4_0 / Q4_1 / Q5_0 / Q5_1 / Q2_K .. Q6_K as their blocks.

A :class:`StoredWeight` is an (out_features, in_features) matrix whose rows are ``row_bytes`` bytes each;
the C core multiplies with it directly (``csrc/matmul.c``), dequantizing in registers. Its float32 values
(:meth:`StoredWeight.float32`) are exactly those the float32 loader produces (F16/BF16 -> F32 is exact,
dequantization is bit-identical to gguf-py), so a model runs the same numbers either way, up to the
order of float32 summation.

Example:
    >>> import numpy as np
    >>> w = StoredWeight.from_float32(np.arange(6, dtype=np.float32).reshape(2, 3))
    >>> w.type_name, w.shape, w.float32()[1].tolist()
    ('F32', (2, 3), [3.0, 4.0, 5.0])
"""
from __future__ import annotations

import numpy as np

# ggml type ids of the formats kept as stored (the ids quant.c and matmul.c use)
TYPE_IDS = {"F32": 0, "F16": 1, "Q4_0": 2, "Q4_1": 3, "Q5_0": 6, "Q5_1": 7, "Q8_0": 8, "Q2_K": 10, "Q3_K": 11,
            "Q4_K": 12, "Q5_K": 13, "Q6_K": 14, "BF16": 30}
TYPE_NAMES = {v: k for k, v in TYPE_IDS.items()}
# (elements, bytes) per block
BLOCKS = {0: (1, 4), 1: (1, 2), 30: (1, 2), 2: (32, 18), 3: (32, 20), 6: (32, 22), 7: (32, 24), 8: (32, 34),
          10: (256, 84), 11: (256, 110), 12: (256, 144), 13: (256, 176), 14: (256, 210)}
ELEMENT_DTYPES = {0: np.float32, 1: np.uint16, 30: np.uint16}  # formats with one element per block


def row_bytes(type_id: int, n_in: int) -> int:
    """Bytes of one row of ``n_in`` values; ValueError when n_in is not a multiple of the block size."""
    if type_id not in BLOCKS:
        raise ValueError(f"weight type {type_id} is not one factrace computes with")
    be, bb = BLOCKS[type_id]
    if n_in % be:
        raise ValueError(f"a {TYPE_NAMES[type_id]} row of {n_in} values is not a whole number of {be}-value blocks")
    return n_in // be * bb


class StoredWeight:
    """An (out, in) weight matrix in its stored format.

    Attributes: ``type`` (ggml type id), ``type_name`` ("BF16", "Q4_K", ...), ``shape`` (out, in), ``data``
    (uint8, (out, row_bytes), C-contiguous, owned), ``nbytes``. Row operations (:meth:`rows`,
    :meth:`take`, :func:`concat`) work in any format; :meth:`transpose` only for F32/F16/BF16.
    """

    __slots__ = ("type", "shape", "data")

    def __init__(self, type_id: int, shape, data: np.ndarray):
        shape = (int(shape[0]), int(shape[1]))
        rb = row_bytes(type_id, shape[1])
        data = np.ascontiguousarray(data, dtype=np.uint8).reshape(shape[0], rb)
        self.type, self.shape, self.data = int(type_id), shape, data

    @classmethod
    def from_float32(cls, a: np.ndarray) -> "StoredWeight":
        """An F32 StoredWeight holding a copy of float32 matrix ``a``."""
        a = np.ascontiguousarray(a, dtype=np.float32)
        return cls(0, a.shape, a.view(np.uint8))

    @property
    def type_name(self) -> str:
        return TYPE_NAMES[self.type]

    @property
    def nbytes(self) -> int:
        return self.data.nbytes

    @property
    def ndim(self) -> int:
        return 2

    def __repr__(self):
        return f"StoredWeight({self.type_name}, shape={self.shape})"

    def float32(self, rows=None) -> np.ndarray:
        """The matrix (or the given rows: a slice or an index array) as float32, exactly as the float32
        loader converts it. Example: ``m.stored("W_U").float32([17, 42])`` (2, d)."""
        from .. import _core

        data = self.data if rows is None else self.data[rows]
        if data.ndim == 1:
            data = data[None]
        out = _core.dequant_rows(np.ascontiguousarray(data), self.type, self.shape[1])
        return out if rows is None or not np.isscalar(rows) else out[0]

    # -- row operations (the loader's transforms) ------------------------------------------------------
    def rows(self, start: int, stop: int) -> "StoredWeight":
        """Rows start..stop-1 (a fused q/k/v cut along its output rows)."""
        return StoredWeight(self.type, (stop - start, self.shape[1]), self.data[start:stop])

    def take(self, index) -> "StoredWeight":
        """Rows in the order of ``index`` (llama.cpp's Q/K row permutation undone)."""
        index = np.asarray(index)
        return StoredWeight(self.type, (len(index), self.shape[1]), self.data[index])

    def transpose(self) -> "StoredWeight":
        """The transposed matrix (GPT-2's Conv1D weights); only element formats (F32, F16, BF16)."""
        if self.type not in ELEMENT_DTYPES:
            raise ValueError(f"a {self.type_name} matrix cannot be transposed in its stored format")
        el = self.data.view(ELEMENT_DTYPES[self.type]).reshape(self.shape)
        t = np.ascontiguousarray(el.T)
        return StoredWeight(self.type, t.shape, t.view(np.uint8))


def concat(parts) -> StoredWeight:
    """Rows of several StoredWeights of one format and width, one after the other."""
    t, n_in = parts[0].type, parts[0].shape[1]
    if any(p.type != t or p.shape[1] != n_in for p in parts):
        raise ValueError("concat: the parts differ in format or width")
    return StoredWeight(t, (sum(p.shape[0] for p in parts), n_in), np.concatenate([p.data for p in parts]))


def as_float32(w) -> np.ndarray | None:
    """float32 view of a weight: an ndarray as is, a StoredWeight dequantized (None stays None)."""
    if w is None or isinstance(w, np.ndarray):
        return w
    return w.float32()
