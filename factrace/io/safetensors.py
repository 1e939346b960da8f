"""A strict, memory-mapped reader of safetensors files and sharded checkpoints.

Every header field is checked before use: header length against the file size, JSON structure,
dtype names, shapes, data offsets (inside the data buffer, sorted, non-overlapping, no holes) and
that each tensor's byte size equals prod(shape) x itemsize. Problems raise :class:`CheckpointError`
naming the file and the tensor. Tensors are converted to float32 one at a time from the mapping, so
loading never holds two full copies of the weights.
"""
from __future__ import annotations

import json
import mmap
import os
from pathlib import Path

import numpy as np

from ..errors import CheckpointError

MAX_HEADER = 100 * 1024 * 1024
DTYPES = {  # name -> (numpy dtype, itemsize)
    "F64": ("<f8", 8), "F32": ("<f4", 4), "F16": ("<u2", 2), "BF16": ("<u2", 2),
    "I64": ("<i8", 8), "I32": ("<i4", 4), "I16": ("<i2", 2), "I8": ("i1", 1), "U8": ("u1", 1),
    "BOOL": ("u1", 1), "U16": ("<u2", 2), "U32": ("<u4", 4), "U64": ("<u8", 8),
    "F8_E4M3": ("u1", 1), "F8_E5M2": ("u1", 1),
}
FLOAT_DTYPES = ("F32", "F16", "BF16")




def _no_dupes(pairs):
    out = {}
    for k, v in pairs:
        if k in out:
            raise ValueError(f"duplicate key {k!r}")
        out[k] = v
    return out


class SafetensorsFile:
    """One memory-mapped ``.safetensors`` file.

    Attributes:
        path: the file.
        tensors: name -> (dtype name, shape tuple, (begin, end) byte range within the data buffer).
        metadata: the optional ``__metadata__`` dict of strings.

    Example:
        >>> with SafetensorsFile("model.safetensors") as f:          # doctest: +SKIP
        ...     w = f.tensor("model.embed_tokens.weight")             # float32 (V, d) copy
    """

    def __init__(self, path):
        self.path = Path(path)
        self._mm = None
        try:
            fd = os.open(self.path, os.O_RDONLY)
        except OSError as e:
            raise CheckpointError(f"{self.path}: cannot open ({e.strerror})") from None
        try:
            size = os.fstat(fd).st_size
            if size < 8:
                raise CheckpointError(f"{self.path}: truncated safetensors file ({size} bytes, no header length)")
            self._mm = mmap.mmap(fd, size, access=mmap.ACCESS_READ)
        except (OSError, ValueError) as e:
            if isinstance(e, CheckpointError):
                raise
            raise CheckpointError(f"{self.path}: cannot map file ({e})") from None
        finally:
            os.close(fd)
        try:
            self._parse(size)
        except Exception:
            self.close()
            raise

    def _err(self, msg):
        return CheckpointError(f"{self.path}: {msg}")

    def _parse(self, size: int) -> None:
        n = int.from_bytes(self._mm[:8], "little")
        if n < 2 or n > MAX_HEADER:
            raise self._err(f"header length {n} is absurd (file is {size} bytes)")
        if 8 + n > size:
            raise self._err(f"truncated: header needs {8 + n} bytes but the file has {size}")
        try:
            header = json.loads(bytes(self._mm[8:8 + n]).decode("utf-8"), object_pairs_hook=_no_dupes)
        except (UnicodeDecodeError, ValueError) as e:
            raise self._err(f"header is not valid JSON ({e})") from None
        if not isinstance(header, dict):
            raise self._err("header is not a JSON object")
        self.data_start = 8 + n
        data_len = size - self.data_start
        meta = header.pop("__metadata__", None)
        if meta is not None and not (isinstance(meta, dict) and all(isinstance(v, str) for v in meta.values())):
            raise self._err("__metadata__ must be an object of strings")
        self.metadata = meta or {}
        self.tensors = {}
        ranges = []
        for name, info in header.items():
            if not isinstance(info, dict) or set(info) - {"dtype", "shape", "data_offsets"}:
                raise self._err(f"tensor {name!r}: entry must have exactly dtype, shape, data_offsets")
            dt, shape, offs = info.get("dtype"), info.get("shape"), info.get("data_offsets")
            if not isinstance(dt, str) or dt not in DTYPES:
                raise self._err(f"tensor {name!r}: unknown dtype {dt!r}")
            if not isinstance(shape, list) or len(shape) > 8 or not all(
                    isinstance(x, int) and not isinstance(x, bool) and 0 <= x < 2 ** 40 for x in shape):
                raise self._err(f"tensor {name!r}: bad shape {shape!r}")
            if not (isinstance(offs, list) and len(offs) == 2 and all(
                    isinstance(x, int) and not isinstance(x, bool) for x in offs)):
                raise self._err(f"tensor {name!r}: bad data_offsets {offs!r}")
            begin, end = offs
            if not 0 <= begin <= end <= data_len:
                raise self._err(f"tensor {name!r}: data_offsets [{begin}, {end}] lie outside the data buffer "
                                f"of {data_len} bytes (file truncated or header lies)")
            numel = 1
            for x in shape:
                numel *= x
            if numel * DTYPES[dt][1] != end - begin:
                raise self._err(f"tensor {name!r}: {end - begin} bytes do not match shape {shape} x {dt}")
            self.tensors[name] = (dt, tuple(shape), (begin, end))
            ranges.append((begin, end, name))
        ranges.sort()
        pos = 0
        for begin, end, name in ranges:
            if begin < pos:
                raise self._err(f"tensor {name!r}: byte range [{begin}, {end}] overlaps another tensor")
            if begin > pos:
                raise self._err(f"hole in the data buffer before tensor {name!r} (bytes {pos}..{begin})")
            pos = end
        if pos != data_len:
            raise self._err(f"data buffer has {data_len} bytes but the tensors cover {pos}")

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self) -> None:
        if self._mm is not None:
            try:
                self._mm.close()
            except BufferError:  # a raw() view is still alive; the mapping goes with it
                pass
            self._mm = None

    def shape(self, name: str) -> tuple:
        return self.tensors[name][1]

    def dtype(self, name: str) -> str:
        return self.tensors[name][0]

    def raw(self, name: str) -> np.ndarray:
        """A read-only NumPy view of the stored tensor (valid while the file is open)."""
        dt, shape, (begin, end) = self.tensors[name]
        npdt = np.dtype(DTYPES[dt][0])
        count = (end - begin) // npdt.itemsize
        return np.frombuffer(self._mm, dtype=npdt, count=count, offset=self.data_start + begin).reshape(shape)

    def tensor(self, name: str) -> np.ndarray:
        """The tensor as a new C-contiguous float32 array (F32, F16 and BF16 are converted exactly)."""
        from .. import _core

        dt = self.tensors[name][0]
        if dt not in FLOAT_DTYPES:
            raise self._err(f"tensor {name!r} has dtype {dt}; weights must be F32, F16 or BF16")
        raw = self.raw(name)
        if dt == "F32":
            out = np.array(raw, dtype=np.float32, order="C", copy=True)
        else:
            out = _core.convert(raw, "f16" if dt == "F16" else "bf16")
        del raw
        self._release(name)
        return out

    def stored(self, name: str):
        """A 2-D F32 / F16 / BF16 tensor as a :class:`~factrace.io.stored.StoredWeight` (a copy of its bytes,
        in the stored format)."""
        from .stored import TYPE_IDS, StoredWeight

        dt, shape, _ = self.tensors[name]
        if dt not in FLOAT_DTYPES:
            raise self._err(f"tensor {name!r} has dtype {dt}; weights must be F32, F16 or BF16")
        if len(shape) != 2:
            raise self._err(f"tensor {name!r} has shape {shape}; a linear weight is 2-D")
        out = StoredWeight(TYPE_IDS[dt], shape, np.array(self.raw(name).view(np.uint8), copy=True))
        self._release(name)
        return out

    def _release(self, name: str) -> None:
        """Drop the mapped pages of a tensor already copied from this process's memory (they stay in the page
        cache), so that loading holds the weights once, not twice."""
        _, _, (begin, end) = self.tensors[name]
        page = mmap.PAGESIZE
        a = -(-(self.data_start + begin) // page) * page
        b = (self.data_start + end) // page * page
        if b > a and hasattr(self._mm, "madvise") and hasattr(mmap, "MADV_DONTNEED"):
            try:
                self._mm.madvise(mmap.MADV_DONTNEED, a, b - a)
            except (OSError, ValueError):
                pass


class Checkpoint:
    """All tensors of a model directory: ``model.safetensors`` or shards listed in
    ``model.safetensors.index.json``. ``names`` lists every tensor; ``tensor(name)`` returns float32.

    Example:
        >>> ck = Checkpoint("path/to/model_dir")            # doctest: +SKIP
        >>> ck.tensor("lm_head.weight").shape                # doctest: +SKIP
    """

    def __init__(self, directory):
        self.dir = Path(directory)
        self.files: dict[str, SafetensorsFile] = {}
        self.where: dict[str, str] = {}
        index = self.dir / "model.safetensors.index.json"
        single = self.dir / "model.safetensors"
        try:
            if index.exists():
                self._open_index(index)
            elif single.exists():
                f = self._open(single.name)
                for name in f.tensors:
                    self.where[name] = single.name
            else:
                found = sorted(p.name for p in self.dir.glob("*.safetensors"))
                if not found:
                    raise CheckpointError(f"{self.dir}: no model.safetensors, model.safetensors.index.json or "
                                          f"*.safetensors file")
                for fn in found:
                    f = self._open(fn)
                    for name in f.tensors:
                        if name in self.where:
                            raise CheckpointError(f"{self.dir / fn}: tensor {name!r} also in {self.where[name]}")
                        self.where[name] = fn
        except Exception:
            self.close()
            raise

    def _open(self, fn: str) -> SafetensorsFile:
        if fn not in self.files:
            self.files[fn] = SafetensorsFile(self.dir / fn)
        return self.files[fn]

    def _open_index(self, index: Path) -> None:
        try:
            data = json.loads(index.read_text(encoding="utf-8"), object_pairs_hook=_no_dupes)
        except (OSError, UnicodeDecodeError, ValueError) as e:
            raise CheckpointError(f"{index}: unreadable index ({e})") from None
        wm = data.get("weight_map") if isinstance(data, dict) else None
        if not isinstance(wm, dict) or not wm:
            raise CheckpointError(f"{index}: no weight_map object")
        for name, fn in wm.items():
            if not isinstance(fn, str) or "/" in fn or "\\" in fn or fn in ("", ".", "..") or not fn.endswith(".safetensors"):
                raise CheckpointError(f"{index}: tensor {name!r} points to a bad file name {fn!r}")
            try:
                exists = (self.dir / fn).is_file()
            except (OSError, ValueError) as e:  # e.g. a name longer than the file system allows
                raise CheckpointError(f"{index}: tensor {name!r} points to a bad file name {fn[:100]!r}... "
                                      f"({getattr(e, 'strerror', None) or e})") from None
            if not exists:
                raise CheckpointError(f"{index}: tensor {name!r} points to {fn}, which does not exist in {self.dir}")
            f = self._open(fn)
            if name not in f.tensors:
                raise CheckpointError(f"{index}: tensor {name!r} is not in {fn}")
            self.where[name] = fn
        for fn, f in self.files.items():
            extra = set(f.tensors) - set(wm)
            if extra:
                raise CheckpointError(f"{self.dir / fn}: tensors not listed in the index: {sorted(extra)[:3]}")

    @property
    def names(self) -> list:
        return list(self.where)

    def shape(self, name: str) -> tuple:
        return self.files[self.where[name]].shape(name)

    def tensor(self, name: str) -> np.ndarray:
        return self.files[self.where[name]].tensor(name)

    def stored(self, name: str):
        return self.files[self.where[name]].stored(name)

    def nbytes(self, name: str) -> int:
        """Bytes of a tensor as stored."""
        _, _, (begin, end) = self.files[self.where[name]].tensors[name]
        return end - begin

    def path_of(self, name: str) -> Path:
        return self.dir / self.where[name]

    def close(self) -> None:
        for f in self.files.values():
            f.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
