"""``factrace.load``: from a model directory, a cached Hugging Face repo id, a GGUF file or a short name
to a :class:`factrace.Model`. The two formats' loaders (:func:`load_hf_dir`, :func:`load_gguf`) read the
config and the tensors through the architecture table (``archs.py``, ``weights.py``).
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path

import numpy as np

from ..errors import CheckpointError, ConfigError, GGUFError, ModelNotFoundError
from .config import from_hf_config
from .weights import GGUFSource, SafetensorsSource, build_weights, check_memory, hf_config_from_gguf
from . import archs as A


def load_hf_dir(directory, name: str | None = None):
    """Load a Hugging Face model directory (config.json + safetensors + tokenizer.json).

    Returns a :class:`factrace.Model`. Tensors stored as F32, F16 or BF16 become float32.

    Example:
        >>> m = load_hf_dir("path/to/gpt2")          # doctest: +SKIP
    """
    from ..model import Model
    from .safetensors import Checkpoint
    from .tokenizer import Tokenizer

    directory = Path(directory)
    cpath = directory / "config.json"
    try:
        raw = json.loads(cpath.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{cpath}: missing (a model directory needs config.json)") from None
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise ConfigError(f"{cpath}: unreadable ({e})") from None
    if isinstance(raw, dict) and "text_config" in raw and raw.get("model_type") == "gemma3":
        raise ConfigError(f"{cpath}: Gemma3ForConditionalGeneration (multimodal) is not supported; "
                          f"use a text-only Gemma3ForCausalLM checkpoint")
    cfg = from_hf_config(raw, where=str(cpath))
    arch = A.ARCHS[cfg.arch]
    with Checkpoint(directory) as ck:
        check_memory(sum(int(np.prod(ck.shape(n), dtype=object)) for n in ck.names), directory)  # before converting
        weights = build_weights(arch, arch.tensors, cfg, SafetensorsSource(ck))
    tok = None
    tpath = directory / "tokenizer.json"
    if tpath.exists():
        tok = Tokenizer.from_file(tpath, directory)
    return Model(cfg, weights, tokenizer=tok, name=name or directory.name, source=str(directory))


def load_gguf(path, name: str | None = None):
    """Load a GGUF file (architectures: the table's GGUF entries, ``archs.GGUF_ARCHS``; weights F32, F16,
    BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q2_K .. Q6_K) as a float32 :class:`factrace.Model`, with the
    tokenizer built from ``tokenizer.ggml.*``. The result matches ``transformers`` loading the same file
    (``from_pretrained(dir, gguf_file=...)``).

    Example:
        >>> m = load_gguf("SmolLM2-135M-Instruct.Q4_1.gguf")    # doctest: +SKIP
    """
    from ..model import Model
    from .gguf import GGUFFile
    from .tokenizer import Tokenizer

    path = Path(path)
    with GGUFFile(path) as f:
        md, tensors = f.metadata, f.tensors
        try:
            raw = hf_config_from_gguf(md, tensors, path)
        except (ConfigError, GGUFError):
            raise
        except (TypeError, ValueError, KeyError, IndexError, AttributeError, OverflowError) as e:
            # metadata of an unexpected type (a string where a count belongs, an array for a scalar ...)
            raise ConfigError(f"{path}: bad GGUF metadata value ({type(e).__name__}: {e})") from None
        cfg = from_hf_config(raw, where=str(path))
        check_memory(sum(int(t.n_elements) for t in tensors.values()), path)  # before any tensor is converted
        arch = A.ARCHS[cfg.arch]
        W = build_weights(arch, arch.gguf.tensors, cfg, GGUFSource(f, path))
        tk = None
        if "tokenizer.ggml.model" in md:
            from .gguf_tokenizer import load_tokenizer

            try:
                t, sp = load_tokenizer(md)
            except (ValueError, KeyError, TypeError) as e:
                raise GGUFError(f"{path}: cannot build the tokenizer from tokenizer.ggml.* ({e})") from None
            tk = Tokenizer(t, sp.bos_id, sp.eos_id, source=path)
    return Model(cfg, W, tokenizer=tk, name=name or path.stem, source=str(path))


def hf_cache_dir() -> Path:
    """The Hugging Face hub cache: $HF_HUB_CACHE, else $HF_HOME/hub, else ~/.cache/huggingface/hub."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    if os.environ.get("HUGGINGFACE_HUB_CACHE"):
        return Path(os.environ["HUGGINGFACE_HUB_CACHE"])
    home = os.environ.get("HF_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")),
                                                    "huggingface")
    return Path(home) / "hub"


def resolve_repo_id(repo_id: str, revision: str = "main") -> Path:
    """The snapshot directory of a repo already in the local Hugging Face cache (no network).

    Example:
        >>> resolve_repo_id("openai-community/gpt2")   # doctest: +SKIP
        PosixPath('/root/.cache/huggingface/hub/models--openai-community--gpt2/snapshots/607a30d...')
    """
    cache = hf_cache_dir()
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    if not repo.is_dir():
        raise ModelNotFoundError(
            f"{repo_id!r} is not a local directory and not in the Hugging Face cache at {cache} "
            f"(factrace never downloads weights: fetch them first, e.g. `huggingface-cli download {repo_id}`)")
    snap = None
    ref = repo / "refs" / revision
    if ref.is_file():
        commit = ref.read_text().strip()
        if re.fullmatch(r"[0-9a-f]{40}", commit):
            snap = repo / "snapshots" / commit
    elif re.fullmatch(r"[0-9a-f]{40}", revision):
        snap = repo / "snapshots" / revision
    if snap is not None and not snap.is_dir():
        raise ModelNotFoundError(f"{repo}: revision {revision!r} points to snapshot {snap.name}, which is not in "
                                f"the cache (factrace never downloads: `huggingface-cli download {repo_id}`)")
    if snap is None:
        snaps = sorted((repo / "snapshots").glob("*"), key=lambda p: p.stat().st_mtime) if (repo / "snapshots").is_dir() else []
        if not snaps:
            raise ModelNotFoundError(f"{repo}: no snapshot in the Hugging Face cache for {repo_id!r}")
        snap = snaps[-1]
    return snap


def load(source, name: str | None = None):
    """Load a model for analysis.

    ``source`` may be:
      * a Hugging Face model directory (config.json, model.safetensors or sharded
        model-0000x-of-0000y.safetensors with model.safetensors.index.json, tokenizer.json);
      * a ``.gguf`` file (quantized or not);
      * a Hugging Face repo id already in the local cache (``HF_HOME`` / ``HF_HUB_CACHE``; no network);
      * a short name of a model that an installed package ships: ``"smollm2"``, ``"gemma3-270m"``, ...

    Returns a :class:`factrace.Model`. Supported architectures: GPT-2, Llama (1/2/3, rope scaling
    linear and llama3), Qwen2/2.5 (DeepSeek-R1-Distill-Qwen), Qwen3, Mistral, Gemma 3.

    Example:
        >>> import factrace
        >>> m = factrace.load("smollm2")                                     # doctest: +SKIP
        >>> r = m.run(m.encode("The Eiffel Tower is located in the city of"))  # doctest: +SKIP
        >>> m.decode([int(r.logits[-1].argmax())])                           # doctest: +SKIP
        ' Paris'
    """
    s = str(source)
    p = Path(s).expanduser()
    if p.is_dir():
        return load_hf_dir(p, name)
    if p.suffix == ".gguf" or (p.is_file() and _is_gguf(p)):
        return load_gguf(p, name)
    if p.exists():
        raise CheckpointError(f"{p}: not a model directory or a GGUF file")
    from . import packaged

    if s in packaged.KNOWN or s in getattr(packaged, "ALIASES", {}):
        return load(packaged.resolve(s), name or s)
    if re.fullmatch(r"[\w.-]+/[\w.-]+", s):
        return load_hf_dir(resolve_repo_id(s), name or s)
    known = ", ".join(sorted(getattr(packaged, "KNOWN", {})))
    raise ModelNotFoundError(f"{s!r}: no such file or directory, not a cached Hugging Face repo id, and not a "
                            f"known short name ({known})")


def _is_gguf(p: Path) -> bool:
    try:
        with open(p, "rb") as f:
            return f.read(4) == b"GGUF"
    except OSError:
        return False
