"""``factrace.load``: from a model directory, a cached Hugging Face repo id, a GGUF file or a short name
to a :class:`factrace.Model`.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path

import numpy as np

from .config import ConfigError, ModelConfig, from_hf_config
from .safetensors import Checkpoint, CheckpointError

# Buffers some checkpoints carry that are not weights.
IGNORED = re.compile(r"(^|\.)(attn\.bias|attn\.masked_bias|rotary_emb\.inv_freq)$")


class ModelTooLargeError(CheckpointError, MemoryError):
    """The checkpoint's weights as float32 would need more memory than is available (raised before any
    tensor is converted). Both a :class:`CheckpointError` and a :class:`MemoryError`."""


def available_memory() -> int | None:
    """Bytes the loader may use: ``FACTRACE_MAX_BYTES`` if set, else MemAvailable of /proc/meminfo (capped
    by the cgroup v2 memory limit when there is one); None when unknown (no check)."""
    env = os.environ.get("FACTRACE_MAX_BYTES")
    if env:
        try:
            return int(float(env))
        except ValueError:
            raise ValueError(f"FACTRACE_MAX_BYTES={env!r} is not a number of bytes") from None
    avail = None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    avail = int(line.split()[1]) * 1024
                    break
    except (OSError, ValueError, IndexError):
        return None
    try:
        lim = open("/sys/fs/cgroup/memory.max").read().strip()
        cur = int(open("/sys/fs/cgroup/memory.current").read())
        if lim != "max" and avail is not None:
            avail = min(avail, max(0, int(lim) - cur))
    except (OSError, ValueError):
        pass
    return avail


def check_memory(n_elements: int, where) -> None:
    """Refuse (ModelTooLargeError) a model whose ``n_elements`` float32 weights do not fit in memory."""
    need = 4 * int(n_elements)
    avail = available_memory()
    if avail is not None and need > avail:
        raise ModelTooLargeError(
            f"{where}: the weights need {need / 2**30:.2f} GiB as float32 but only {avail / 2**30:.2f} GiB of "
            f"memory is available ({'FACTRACE_MAX_BYTES' if os.environ.get('FACTRACE_MAX_BYTES') else 'MemAvailable'}"
            f"); nothing was loaded")


def _expect(ck: Checkpoint, name: str, shape: tuple) -> np.ndarray:
    if name not in ck.where:
        raise CheckpointError(f"{ck.dir}: missing tensor {name!r}")
    got = ck.shape(name)
    if tuple(got) != tuple(shape):
        raise CheckpointError(f"{ck.path_of(name)}: tensor {name!r} has shape {tuple(got)}, the config implies "
                              f"{tuple(shape)}")
    return ck.tensor(name)


def _gpt2_weights(cfg: ModelConfig, ck: Checkpoint, used: set) -> dict:
    p = "transformer." if "transformer.wte.weight" in ck.where else ""
    d, V, F = cfg.d_model, cfg.vocab_size, cfg.d_mlp
    W = {}

    def get(name, shape):
        used.add(p + name)
        return _expect(ck, p + name, shape)

    W["W_E"] = get("wte.weight", (V, d))
    W["W_pos"] = get("wpe.weight", (cfg.n_ctx, d))
    W["ln_f_w"] = get("ln_f.weight", (d,))
    W["ln_f_b"] = get("ln_f.bias", (d,))
    W["W_U"] = W["W_E"]
    if "lm_head.weight" in ck.where:  # GPT-2 ties it: like transformers, a stored copy is not used
        used.add("lm_head.weight")
    for i in range(cfg.n_layers):
        b = f"blocks.{i}."
        h = f"h.{i}."
        W[b + "ln1_w"] = get(h + "ln_1.weight", (d,))
        W[b + "ln1_b"] = get(h + "ln_1.bias", (d,))
        qkv = get(h + "attn.c_attn.weight", (d, 3 * d)).T  # Conv1D (in, out) -> (out, in)
        qkv_b = get(h + "attn.c_attn.bias", (3 * d,))
        for j, n in enumerate("QKV"):
            W[b + f"W_{n}"] = np.ascontiguousarray(qkv[j * d:(j + 1) * d])
            W[b + f"b_{n}"] = np.ascontiguousarray(qkv_b[j * d:(j + 1) * d])
        W[b + "W_O"] = np.ascontiguousarray(get(h + "attn.c_proj.weight", (d, d)).T)
        W[b + "b_O"] = get(h + "attn.c_proj.bias", (d,))
        W[b + "ln2_w"] = get(h + "ln_2.weight", (d,))
        W[b + "ln2_b"] = get(h + "ln_2.bias", (d,))
        W[b + "W_up"] = np.ascontiguousarray(get(h + "mlp.c_fc.weight", (d, F)).T)
        W[b + "b_up"] = get(h + "mlp.c_fc.bias", (F,))
        W[b + "W_down"] = np.ascontiguousarray(get(h + "mlp.c_proj.weight", (F, d)).T)
        W[b + "b_down"] = get(h + "mlp.c_proj.bias", (d,))
    return W


def _llama_weights(cfg: ModelConfig, ck: Checkpoint, used: set) -> dict:
    d, V, F, dh = cfg.d_model, cfg.vocab_size, cfg.d_mlp, cfg.d_head
    qd, kvd = cfg.n_heads * dh, cfg.n_kv_heads * dh
    gemma = cfg.arch == "Gemma3ForCausalLM"
    one = np.float32(1.0)
    W = {}

    def get(name, shape, optional=False, norm=False):
        if optional and name not in ck.where:
            return None
        used.add(name)
        t = _expect(ck, name, shape)
        if norm and gemma:  # Gemma3RMSNorm multiplies by (1 + w), computed in float32
            t = (one + t).astype(np.float32)
        return t

    W["W_E"] = get("model.embed_tokens.weight", (V, d))
    W["ln_f_w"] = get("model.norm.weight", (d,), norm=True)
    if "lm_head.weight" in ck.where and not cfg.tied:
        W["W_U"] = get("lm_head.weight", (V, d))
    elif cfg.tied:
        W["W_U"] = W["W_E"]
        if "lm_head.weight" in ck.where:
            used.add("lm_head.weight")
    else:
        raise CheckpointError(f"{ck.dir}: missing tensor 'lm_head.weight' (tie_word_embeddings is false)")
    for i in range(cfg.n_layers):
        b, p = f"blocks.{i}.", f"model.layers.{i}."
        a = p + "self_attn."
        W[b + "ln1_w"] = get(p + "input_layernorm.weight", (d,), norm=True)
        W[b + "W_Q"] = get(a + "q_proj.weight", (qd, d))
        W[b + "W_K"] = get(a + "k_proj.weight", (kvd, d))
        W[b + "W_V"] = get(a + "v_proj.weight", (kvd, d))
        W[b + "W_O"] = get(a + "o_proj.weight", (d, qd))
        W[b + "b_Q"] = get(a + "q_proj.bias", (qd,), optional=not cfg.attn_bias)
        W[b + "b_K"] = get(a + "k_proj.bias", (kvd,), optional=not cfg.attn_bias)
        W[b + "b_V"] = get(a + "v_proj.bias", (kvd,), optional=not cfg.attn_bias)
        W[b + "b_O"] = get(a + "o_proj.bias", (d,), optional=not cfg.o_bias)
        if cfg.qk_norm:
            W[b + "q_norm_w"] = get(a + "q_norm.weight", (dh,), norm=True)
            W[b + "k_norm_w"] = get(a + "k_norm.weight", (dh,), norm=True)
        if gemma:
            W[b + "post_attn_norm_w"] = get(p + "post_attention_layernorm.weight", (d,), norm=True)
            W[b + "ln2_w"] = get(p + "pre_feedforward_layernorm.weight", (d,), norm=True)
            W[b + "post_mlp_norm_w"] = get(p + "post_feedforward_layernorm.weight", (d,), norm=True)
        else:
            W[b + "ln2_w"] = get(p + "post_attention_layernorm.weight", (d,))
        m = p + "mlp."
        W[b + "W_gate"] = get(m + "gate_proj.weight", (F, d))
        W[b + "W_up"] = get(m + "up_proj.weight", (F, d))
        W[b + "W_down"] = get(m + "down_proj.weight", (d, F))
        W[b + "b_up"] = get(m + "up_proj.bias", (F,), optional=not cfg.mlp_bias)
        W[b + "b_down"] = get(m + "down_proj.bias", (d,), optional=not cfg.mlp_bias)
        W[b + "b_gate"] = get(m + "gate_proj.bias", (F,), optional=not cfg.mlp_bias)
    return {k: v for k, v in W.items() if v is not None}


def load_hf_dir(directory, name: str | None = None):
    """Load a Hugging Face model directory (config.json + safetensors + tokenizer.json).

    Returns a :class:`factrace.Model`. Tensors stored as F32, F16 or BF16 become float32.
    """
    from .model import Model
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
    with Checkpoint(directory) as ck:
        n_el = 0
        for n in ck.names:
            n_el += int(np.prod(ck.shape(n), dtype=object))
        check_memory(n_el, directory)  # before any tensor is converted
        used: set = set()
        if cfg.arch == "GPT2LMHeadModel":
            weights = _gpt2_weights(cfg, ck, used)
        else:
            weights = _llama_weights(cfg, ck, used)
        extra = [n for n in ck.names if n not in used and not IGNORED.search(n)]
        if extra:
            raise CheckpointError(f"{ck.dir}: unexpected tensors for {cfg.arch}: {extra[:5]}"
                                  f"{' ...' if len(extra) > 5 else ''}")
    tok = None
    tpath = directory / "tokenizer.json"
    if tpath.exists():
        tok = Tokenizer.from_file(tpath, directory)
    return Model(cfg, weights, tokenizer=tok, name=name or directory.name, source=str(directory))


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
        raise FileNotFoundError(
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
        raise FileNotFoundError(f"{repo}: revision {revision!r} points to snapshot {snap.name}, which is not in "
                                f"the cache (factrace never downloads: `huggingface-cli download {repo_id}`)")
    if snap is None:
        snaps = sorted((repo / "snapshots").glob("*"), key=lambda p: p.stat().st_mtime) if (repo / "snapshots").is_dir() else []
        if not snaps:
            raise FileNotFoundError(f"{repo}: no snapshot in the Hugging Face cache for {repo_id!r}")
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
        from .gguf_model import load_gguf

        return load_gguf(p, name)
    if p.exists():
        raise CheckpointError(f"{p}: not a model directory or a GGUF file")
    from . import packaged

    if s in packaged.KNOWN or s in getattr(packaged, "ALIASES", {}):
        return load(packaged.resolve(s), name or s)
    if re.fullmatch(r"[\w.-]+/[\w.-]+", s):
        return load_hf_dir(resolve_repo_id(s), name or s)
    known = ", ".join(sorted(getattr(packaged, "KNOWN", {})))
    raise FileNotFoundError(f"{s!r}: no such file or directory, not a cached Hugging Face repo id, and not a "
                            f"known short name ({known})")


def _is_gguf(p: Path) -> bool:
    try:
        with open(p, "rb") as f:
            return f.read(4) == b"GGUF"
    except OSError:
        return False
