"""GGUF reading and dequantization (thin wrapper over the C extension ``factrace._gguf``).

The file is memory-mapped read-only and fully validated when opened: every count, length, offset and
dimension is checked against the file size and against integer overflow. Any problem with the file's
contents raises :class:`GGUFError` naming the path and the problem. Supported: GGUF versions 2 and 3,
every metadata value type (nested arrays are rejected), tensors of up to 4 dimensions.

Dequantization to float32 covers F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q2_K, Q3_K, Q4_K, Q5_K and
Q6_K and is bit-identical to gguf-py's ``gguf.quants.dequantize``. Other ggml types (IQ*, Q8_K, TQ*, ...)
can be read with :meth:`GGUFFile.raw` but :meth:`GGUFFile.tensor` raises :class:`GGUFError` for them.

Metadata string values are decoded as UTF-8 with ``errors="surrogateescape"``: invalid bytes become lone
surrogates, and ``s.encode("utf-8", "surrogateescape")`` gives back the stored bytes exactly. Keys and
tensor names must be valid UTF-8 (otherwise GGUFError).
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from .. import _gguf
from ..errors import GGUFError

__all__ = ["GGUFError", "GGUFFile", "TensorInfo", "dequantize", "type_name", "GGML_TYPES"]




def _build_type_table() -> dict[int, tuple[str, int, int, bool]]:
    out = {}
    for t in range(64):
        info = _gguf.type_info(t)
        if info is not None:
            out[t] = info
    return out


GGML_TYPES: dict[int, tuple[str, int, int, bool]] = _build_type_table()
"""ggml type id -> (name, block_size, type_size, can_dequantize)."""


def type_name(ggml_type: int) -> str:
    """ggml name of a tensor type id, e.g. ``type_name(12) == "Q4_K"``; ``"unknown(N)"`` if unknown."""
    info = GGML_TYPES.get(int(ggml_type))
    return info[0] if info else f"unknown({int(ggml_type)})"


@dataclass(frozen=True)
class TensorInfo:
    """One tensor's description.

    shape is in numpy order (ggml's ``ne`` reversed: ``ne = (in, out)`` gives ``shape = (out, in)``);
    offset is relative to the data section; nbytes is the stored (quantized) size.
    """

    name: str
    shape: tuple[int, ...]
    ggml_type: int
    type_name: str
    offset: int
    nbytes: int

    @property
    def n_elements(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


class GGUFFile:
    """A memory-mapped, validated GGUF file.

    Args:
        path: file path (str or os.PathLike).

    Attributes:
        path: the path as given (str).
        version: GGUF version (2 or 3).
        alignment: data alignment in bytes (``general.alignment``, default 32).
        metadata: key -> value. Scalars are int/float/bool/str; numeric and bool arrays are 1-D numpy
            arrays of the stored dtype; string arrays are lists of str.
        metadata_types: key -> GGUF value type name, e.g. ``"uint32"``, ``"string"``, ``"array[float32]"``.
        tensors: name -> TensorInfo, in file order.

    Raises:
        GGUFError: malformed or unsupported file (message names the path and the problem).
        OSError: the file cannot be opened or mapped.

    Example::

        with GGUFFile("model.gguf") as g:
            arch = g.metadata["general.architecture"]
            w = g.tensor("token_embd.weight")   # float32, shape (n_vocab, n_embd)
    """

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        if isinstance(self.path, bytes):
            self.path = os.fsdecode(self.path)
        try:
            self._r = _gguf.Reader(self.path)
            self.version: int = self._r.version
            self.alignment: int = self._r.alignment
            self.metadata: dict[str, object] = {}
            self.metadata_types: dict[str, str] = {}
            for key, value, vtype, atype in self._r.metadata():
                self.metadata[key] = value
                self.metadata_types[key] = f"array[{atype}]" if atype is not None else vtype
            self.tensors: dict[str, TensorInfo] = {}
            self._index: dict[str, int] = {}
            for i, (name, ne, gtype, offset, nbytes) in enumerate(self._r.tensor_infos()):
                shape = tuple(int(d) for d in reversed(ne))
                self.tensors[name] = TensorInfo(name, shape, gtype, type_name(gtype), offset, nbytes)
                self._index[name] = i
        except ValueError as exc:
            if hasattr(self, "_r"):
                self._r.close()
            raise GGUFError(f"{self.path}: {exc}") from None

    def _lookup(self, name: str) -> int:
        try:
            return self._index[name]
        except KeyError:
            raise KeyError(f"{self.path}: no tensor named {name!r}") from None

    def tensor(self, name: str) -> np.ndarray:
        """Dequantize tensor `name` to a fresh float32, C-contiguous array of shape ``tensors[name].shape``.

        The GIL is released while dequantizing. Raises KeyError for an unknown name and GGUFError for a
        tensor type without a dequantizer (the message names the type, e.g. ``IQ2_XS``).

        Example: ``g.tensor("blk.0.attn_q.weight").shape == (n_head * head_dim, n_embd)``
        """
        i = self._lookup(name)
        try:
            return self._r.tensor(i)
        except ValueError as exc:
            raise GGUFError(f"{self.path}: tensor {name!r}: {exc}") from None

    def raw(self, name: str) -> np.ndarray:
        """A uint8 copy of the stored bytes of tensor `name`, shape ``(tensors[name].nbytes,)``."""
        i = self._lookup(name)
        try:
            return self._r.raw(i)
        except ValueError as exc:
            raise GGUFError(f"{self.path}: tensor {name!r}: {exc}") from None

    def close(self) -> None:
        """Unmap the file. Later tensor()/raw() calls raise GGUFError. Safe to call twice."""
        self._r.close()

    def __enter__(self) -> "GGUFFile":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"GGUFFile({self.path!r}, version={self.version}, tensors={len(self.tensors)})"


def dequantize(raw, ggml_type: int, n_elements: int) -> np.ndarray:
    """Dequantize `n_elements` values of ggml type `ggml_type` stored in `raw` to float32.

    Args:
        raw: bytes-like or numpy array holding exactly ``n_elements / block_size * type_size`` bytes
            (a non-contiguous array is copied first).
        ggml_type: ggml type id (0 F32, 1 F16, 2 Q4_0, 3 Q4_1, 6 Q5_0, 7 Q5_1, 8 Q8_0, 10 Q2_K, 11 Q3_K,
            12 Q4_K, 13 Q5_K, 14 Q6_K, 30 BF16).
        n_elements: number of values; a multiple of the type's block size.

    Returns:
        float32 array of shape ``(n_elements,)``, bit-identical to gguf-py's dequantization.

    Raises:
        GGUFError: unknown or unsupported type, or a size mismatch.

    Example::

        x = dequantize(g.raw("blk.0.ffn_down.weight"), 14, 576 * 1536)   # Q6_K
    """
    if isinstance(raw, np.ndarray):
        raw = np.ascontiguousarray(raw).view(np.uint8).reshape(-1)
    try:
        return _gguf.dequantize(raw, int(ggml_type), int(n_elements))
    except ValueError as exc:
        raise GGUFError(str(exc)) from None
