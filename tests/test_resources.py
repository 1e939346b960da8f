"""Resource limits: models too large for memory are refused before any tensor is converted; a checkpoint
changed or truncated under a loaded model does not affect it; load/run/free cycles do not leak."""
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

import factrace
import factrace.io.weights as loader
from factrace.io.gguf import GGUFFile
from factrace.errors import ModelTooLargeError
from factrace.io.weights import check_memory
from factrace.errors import CheckpointError
from factrace.io.safetensors import SafetensorsFile

ROOT = Path(__file__).resolve().parents[1]
FIX = ROOT / "tests" / "fixtures" / "models"
sys.path[:0] = [str(ROOT / "tools"), str(ROOT / "fuzz")]


@pytest.fixture
def gguf_path(tmp_path):
    from make_corpus import tiny_llama_gguf

    p = tmp_path / "tiny.gguf"
    p.write_bytes(tiny_llama_gguf("F32"))
    return p


def _no_convert(monkeypatch):
    def boom(*a, **k):
        raise AssertionError("a tensor was converted before the memory check")

    monkeypatch.setattr(SafetensorsFile, "tensor", boom)
    monkeypatch.setattr(SafetensorsFile, "stored", boom)
    monkeypatch.setattr(GGUFFile, "tensor", boom)
    monkeypatch.setattr(GGUFFile, "raw", boom)


@pytest.mark.parametrize("weights", ["stored", "float32"])
@pytest.mark.parametrize("src", ["gpt2", "llama_sharded", "gguf"])
def test_too_large_refused_before_converting(src, weights, gguf_path, monkeypatch):
    path = gguf_path if src == "gguf" else FIX / src
    monkeypatch.setenv("FACTRACE_MAX_BYTES", "10000")
    _no_convert(monkeypatch)
    with pytest.raises(ModelTooLargeError, match=rf"need .* GiB as {weights} but only .*FACTRACE_MAX_BYTES") as ei:
        factrace.load(path, weights=weights)
    assert str(path) in str(ei.value)
    assert isinstance(ei.value, CheckpointError) and isinstance(ei.value, MemoryError)


def test_fits_under_limit(monkeypatch):
    monkeypatch.setenv("FACTRACE_MAX_BYTES", str(64 << 20))
    factrace.load(FIX / "gpt2").run([1, 2, 3])


def test_memavailable_check():
    os.environ.pop("FACTRACE_MAX_BYTES", None)
    avail = loader.available_memory()
    assert avail is None or avail > 0
    if avail is None:
        pytest.skip("no /proc/meminfo")
    with pytest.raises(ModelTooLargeError, match="MemAvailable"):
        check_memory(2 ** 50, "huge")          # 4 PiB of float32
    check_memory(1000, "small")


def test_bad_env_value(monkeypatch):
    monkeypatch.setenv("FACTRACE_MAX_BYTES", "lots")
    with pytest.raises(ValueError, match="FACTRACE_MAX_BYTES"):
        check_memory(1, "x")


def _mutilate(path: Path):
    size = path.stat().st_size
    with open(path, "r+b") as f:
        f.write(b"\xff" * min(size, 4096))
        f.truncate(size // 3)


@pytest.mark.parametrize("src", ["gpt2", "llama_sharded", "gguf"])
def test_file_truncated_under_a_loaded_model(src, tmp_path, gguf_path):
    if src == "gguf":
        path = gguf_path
        files = [gguf_path]
    else:
        path = tmp_path / src
        shutil.copytree(FIX / src, path)
        files = sorted(path.glob("*.safetensors"))
    m = factrace.load(path)
    ids = np.array([1, 4, 9, 2], np.int32)
    before = m.run(ids, capture=True)
    for f in files:           # overwrite in place and truncate: the mapping is gone after load
        _mutilate(f)
    after = m.run(ids, capture=True)
    np.testing.assert_array_equal(before.logits, after.logits)
    np.testing.assert_array_equal(before.mlp_out, after.mlp_out)
    for f in files:
        f.unlink()
    np.testing.assert_array_equal(m.run(ids).logits, before.logits)


def test_load_run_free_cycles_do_not_leak():
    if "asan" in os.environ.get("LD_PRELOAD", ""):
        pytest.skip("RSS says nothing under ASan (freed memory is quarantined); tools/leakcheck.py checks leaks")
    import leakcheck

    r = leakcheck.measure(cycles=8, warmup=4, verbose=False)
    assert r["rss_growth_kib"] <= 3072, r
    assert r["py_growth_kib"] <= 512, r
