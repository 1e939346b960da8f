"""``factrace.load``: from a model directory, a cached Hugging Face repo id, a GGUF file or a short name
to a :class:`factrace.Model`. The two formats' loaders (:func:`load_hf_dir`, :func:`load_gguf`) read the
config and the tensors through the architecture table (``archs.py``, ``weights.py``).
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np

from ..errors import CheckpointError, ConfigError, GGUFError, ModelNotFoundError
from .config import from_hf_config
from .weights import GGUFSource, SafetensorsSource, build_weights, check_memory, hf_config_from_gguf
from . import archs as A


WEIGHT_MODES = ("stored", "float32")


def _mode(weights: str) -> bool:
    if weights not in WEIGHT_MODES:
        raise ValueError(f"weights must be 'stored' or 'float32', got {weights!r}")
    return weights == "stored"


def load_hf_dir(directory, name: str | None = None, weights: str = "stored", threads: int | None = None):
    """Load a Hugging Face model directory (config.json + safetensors + tokenizer.json).

    Returns a :class:`factrace.Model`. ``weights="stored"`` (default) keeps the linear weights as stored
    (F32, F16 or BF16); ``"float32"`` converts every tensor to float32 (exactly: the same values).

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
    stored = _mode(weights)
    with Checkpoint(directory) as ck:
        n_el = sum(int(np.prod(ck.shape(n), dtype=object)) for n in ck.names)
        check_memory(n_el, directory, sum(ck.nbytes(n) for n in ck.names) if stored else None)  # before converting
        W = build_weights(arch, arch.tensors, cfg, SafetensorsSource(ck), stored=stored)
    tok = None
    tpath = directory / "tokenizer.json"
    if tpath.exists():
        tok = Tokenizer.from_file(tpath, directory)
    return Model(cfg, W, tokenizer=tok, name=name or directory.name, source=str(directory), threads=threads)


def load_gguf(path, name: str | None = None, weights: str = "stored", threads: int | None = None):
    """Load a GGUF file (architectures: the table's GGUF entries, ``archs.GGUF_ARCHS``; weights F32, F16,
    BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q2_K .. Q6_K) as a :class:`factrace.Model`, with the tokenizer
    built from ``tokenizer.ggml.*``. ``weights="stored"`` (default) keeps the linear weights as their GGUF
    blocks (the C core dequantizes in registers); ``"float32"`` dequantizes every tensor at load. The
    numbers are the same either way (bit-identical to gguf-py's dequantization) and match ``transformers``
    loading the same file (``from_pretrained(dir, gguf_file=...)``).

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
        stored = _mode(weights)
        check_memory(sum(int(t.n_elements) for t in tensors.values()), path,  # before any tensor is converted
                     sum(int(t.nbytes) for t in tensors.values()) if stored else None)
        arch = A.ARCHS[cfg.arch]
        W = build_weights(arch, arch.gguf.tensors, cfg, GGUFSource(f, path), stored=stored)
        tk = None
        if "tokenizer.ggml.model" in md:
            from .gguf_tokenizer import load_tokenizer

            try:
                t, sp = load_tokenizer(md)
            except (ValueError, KeyError, TypeError) as e:
                raise GGUFError(f"{path}: cannot build the tokenizer from tokenizer.ggml.* ({e})") from None
            tk = Tokenizer(t, sp.bos_id, sp.eos_id, source=path)
    return Model(cfg, W, tokenizer=tk, name=name or path.stem, source=str(path), threads=threads)


def hf_cache_dir() -> Path:
    """The Hugging Face hub cache: $HF_HUB_CACHE, else $HF_HOME/hub, else ~/.cache/huggingface/hub."""
    from .hub import hub_cache_dir

    return hub_cache_dir()


def resolve_repo_id(repo_id: str, revision: str | None = None) -> Path:
    """The snapshot directory of a repo already in the local Hugging Face cache (no network); HubError when it
    is not cached (:func:`factrace.io.hub.cached_snapshot`).

    Example:
        >>> resolve_repo_id("openai-community/gpt2")   # doctest: +SKIP
        PosixPath('/root/.cache/huggingface/hub/models--openai-community--gpt2/snapshots/607a30d...')
    """
    from .hub import cached_snapshot

    return cached_snapshot(repo_id, revision)


REPO_ID = re.compile(r"[\w.-]+/[\w.-]+")


def load(source, name: str | None = None, *, weights: str = "stored", threads: int | None = None,
         revision: str | None = None, local_files_only: bool | None = None, gguf_file: str | None = None,
         token: str | bool | None = None):
    """Load a model for analysis.

    ``source`` may be:
      * a Hugging Face model directory (config.json, model.safetensors or sharded
        model-0000x-of-0000y.safetensors with model.safetensors.index.json, tokenizer.json);
      * a ``.gguf`` file (quantized or not);
      * a Hugging Face repo id ``"org/name"``: downloaded from the Hub (``HF_ENDPOINT``) into the standard
        cache (``HF_HUB_CACHE`` / ``HF_HOME``) as transformers does, but only config.json, the tokenizer
        files and the safetensors weights (or, with ``gguf_file``, that one file); the architecture is
        checked before any weight is downloaded. Offline (``HF_HUB_OFFLINE=1``) only the cache is used;
      * a short name of a model that an installed package ships: ``"smollm2"``, ``"gemma3-270m"``, ...

    ``weights``: ``"stored"`` (default) keeps every linear weight in the format it is stored in (F32, F16,
    BF16 safetensors; GGUF Q8_0 / Q4_0 / Q4_1 / Q5_0 / Q5_1 / K-quant blocks): the C core multiplies with
    it directly, so memory is about the file's size; ``"float32"`` converts everything at load (the
    behaviour of factrace 0.1). The weights' float32 values are the same either way.
    ``threads``: threads of this model's runs (default: :func:`factrace.set_num_threads`'s setting).

    Keyword arguments, for Hub repo ids only (ValueError for a local path or a short name):
      * ``revision``: branch, tag or commit hash; default ``"main"``;
      * ``local_files_only``: use only the cache; default None: True when ``HF_HUB_OFFLINE`` is set;
      * ``gguf_file``: load this ``.gguf`` file of the repo (only it is downloaded) instead of safetensors;
      * ``token``: Hub token for private or gated repos; default ``$HF_TOKEN``, else the saved login.

    Returns a :class:`factrace.Model`. Supported architectures: those of the architecture table
    (``factrace.SUPPORTED_ARCHS``): GPT-2, Llama (1/2/3, rope scaling linear and llama3), Qwen2/2.5
    (DeepSeek-R1-Distill-Qwen), Qwen3, Mistral, Gemma 3.

    Raises :class:`factrace.HubError` (a :class:`CheckpointError`) when a repo cannot be found, reached or
    downloaded (not found or private, gated, no network, revision or file missing, offline and not cached),
    :class:`ConfigError` for an unsupported architecture (before any weight is downloaded), and
    :class:`factrace.ModelNotFoundError` for a name that is neither a path, a repo id nor a short name.

    Example:
        >>> import factrace
        >>> m = factrace.load("smollm2")                                     # doctest: +SKIP
        >>> r = m.run(m.encode("The Eiffel Tower is located in the city of"))  # doctest: +SKIP
        >>> m.decode([int(r.logits[-1].argmax())])                           # doctest: +SKIP
        ' Paris'
        >>> m = factrace.load("HuggingFaceTB/SmolLM2-135M", revision="main")   # doctest: +SKIP
    """
    s = str(source)
    p = Path(s).expanduser()
    hub_opts = [k for k, v in (("revision", revision), ("gguf_file", gguf_file), ("token", token)) if v is not None]
    if hub_opts and (p.exists() or not REPO_ID.fullmatch(s)):
        raise ValueError(f"{s!r} is not a Hugging Face repo id: {', '.join(hub_opts)} apply to repo ids only")
    if p.is_dir():
        return load_hf_dir(p, name, weights, threads)
    if p.suffix == ".gguf" or (p.is_file() and _is_gguf(p)):
        return load_gguf(p, name, weights, threads)
    if p.exists():
        raise CheckpointError(f"{p}: not a model directory or a GGUF file")
    from . import packaged

    if s in packaged.KNOWN or s in getattr(packaged, "ALIASES", {}):
        return load(packaged.resolve(s), name or s, weights=weights, threads=threads)
    if REPO_ID.fullmatch(s):
        from .hub import resolve_hub

        local = resolve_hub(s, revision=revision, local_files_only=local_files_only, gguf_file=gguf_file, token=token,
                            check_config=lambda raw, where: from_hf_config(raw, where=where))
        return load(local, name or s, weights=weights, threads=threads)
    known = ", ".join(sorted(getattr(packaged, "KNOWN", {})))
    raise ModelNotFoundError(f"{s!r}: no such file or directory, not a Hugging Face repo id ('org/name'), and not a "
                             f"known short name ({known})")


def _is_gguf(p: Path) -> bool:
    try:
        with open(p, "rb") as f:
            return f.read(4) == b"GGUF"
    except OSError:
        return False
