"""The report's files: atomic writes (temporary file, fsync, rename) and the per-model store of stage
results, finished chunks and the manifest that says which stages are complete for which settings.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
import time
from pathlib import Path

from .._optional import need

FORMAT_VERSION = 2


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix="." + path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def _atomic_parquet(df, path: Path) -> None:
    import io

    need("pyarrow", "writing the report's parquet files")
    buf = io.BytesIO()
    df.to_parquet(buf, index=False)
    _atomic_write_bytes(path, buf.getvalue())


def _atomic_text(path: Path, text: str) -> None:
    _atomic_write_bytes(path, text.encode("utf-8"))


def _slug(s: str) -> str:
    s = re.sub(r"[^A-Za-z0-9._-]+", "_", str(s)).strip("._") or "model"
    return s[:80]


def _hash(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


class _Store:
    """The per-model data folder: stage files, chunk parts and the manifest."""

    def __init__(self, root: Path, key: str):
        self.root = root
        self.key = key
        self.path = root / "manifest.json"
        root.mkdir(parents=True, exist_ok=True)
        self.man = {"format": FORMAT_VERSION, "key": key, "stages": {}}
        if self.path.exists():
            try:
                old = json.loads(self.path.read_text())
                if old.get("key") == key and old.get("format") == FORMAT_VERSION:
                    self.man = old
            except (OSError, ValueError):
                pass  # a damaged manifest: start over

    def _save(self):
        _atomic_text(self.path, json.dumps(self.man, indent=1, sort_keys=True))

    def file(self, stage: str) -> Path:
        return self.root / f"{stage}.parquet"

    def done(self, stage: str) -> bool:
        ent = self.man["stages"].get(stage)
        p = self.file(stage)
        return bool(ent) and p.exists() and p.stat().st_size == ent.get("bytes")

    def load(self, stage: str):
        pd = need("pandas", "the report")
        need("pyarrow", "reading the report's parquet files")

        return pd.read_parquet(self.file(stage))

    def meta(self, stage: str) -> dict:
        return self.man["stages"].get(stage, {}).get("meta", {})

    def seconds(self, stage: str) -> float:
        return float(self.man["stages"].get(stage, {}).get("seconds", 0.0))

    def finish(self, stage: str, df, seconds: float, meta: dict | None = None) -> None:
        p = self.file(stage)
        _atomic_parquet(df, p)
        self.man["stages"][stage] = {"bytes": p.stat().st_size, "rows": int(len(df)), "seconds": float(seconds),
                                     "meta": meta or {}, "finished": time.strftime("%Y-%m-%dT%H:%M:%S")}
        self._save()
        pdir = self.parts_dir(stage)
        if pdir.exists():
            for q in pdir.glob("*"):
                q.unlink()
            pdir.rmdir()
            try:
                pdir.parent.rmdir()  # "parts" when empty
            except OSError:
                pass

    def invalidate(self, stage: str) -> None:
        if self.man["stages"].pop(stage, None) is not None:
            self._save()

    def parts_dir(self, stage: str) -> Path:
        return self.root / "parts" / f"{stage}-{self.key}"

    def part(self, stage: str, i: int) -> Path:
        return self.parts_dir(stage) / f"{i:05d}.parquet"

