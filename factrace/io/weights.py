"""Checkpoint tensors to factrace's canonical weights, and GGUF metadata to a config, both driven by the
architecture table (``archs.py``): the same code serves every architecture and both formats.

* :func:`build_weights` reads the stored tensors an entry lists (safetensors names or GGUF names) from a
  tensor source, checks every shape against the one the config implies, applies the entry's named
  transforms (:data:`TRANSFORMS`: transposes, fused-tensor splits, Gemma's ``1 + w`` norms, llama.cpp's
  Q/K row order) and refuses tensors the architecture does not have.
* :func:`hf_config_from_gguf` turns GGUF metadata into a Hugging Face style config dict, with the
  defaults transformers' GGUF loader uses for keys the file lacks.
* :func:`check_memory` refuses a model that does not fit before any tensor is converted.

Example:
    >>> from factrace.io.weights import canonical_shape, TRANSFORMS
    >>> sorted(TRANSFORMS)[:3]
    ['', 'T', 'T_split']
"""
from __future__ import annotations

import os
import re

import numpy as np

from ..errors import CheckpointError, ConfigError, GGUFError, ModelTooLargeError
from . import archs as A
from .stored import StoredWeight, TYPE_IDS, row_bytes

# Buffers some safetensors checkpoints carry that are not weights.
IGNORED = re.compile(r"(^|\.)(attn\.bias|attn\.masked_bias|attention\.bias|attention\.masked_bias|rotary_emb\.inv_freq)$")
GGUF_IGNORED = re.compile(r"^rope_freqs\.weight$")


# ---------------------------------------------------------------------------------------------
# canonical names and shapes

def canonical_shape(name: str, cfg) -> tuple:
    """Shape of canonical weight ``name`` (global, or per layer without the ``blocks.{i}.`` prefix) for a
    config: linear weights are (out_features, in_features) like torch nn.Linear.

    Example: ``canonical_shape("W_K", cfg) == (cfg.n_kv_heads * cfg.d_head, cfg.d_model)``."""
    d, F, V = cfg.d_model, cfg.d_mlp, cfg.vocab_size
    qd, kvd = cfg.n_heads * cfg.d_head, cfg.n_kv_heads * cfg.d_head
    shapes = {
        "W_E": (V, d), "W_U": (V, d), "b_U": (V,), "W_pos": (cfg.n_ctx, d), "ln_f_w": (d,), "ln_f_b": (d,),
        "ln1_w": (d,), "ln1_b": (d,), "ln2_w": (d,), "ln2_b": (d,),
        "W_Q": (qd, d), "b_Q": (qd,), "W_K": (kvd, d), "b_K": (kvd,), "W_V": (kvd, d), "b_V": (kvd,),
        "q_norm_w": (cfg.d_head,), "k_norm_w": (cfg.d_head,), "W_O": (d, qd), "b_O": (d,),
        "post_attn_norm_w": (d,), "post_mlp_norm_w": (d,),
        "W_gate": (F, d), "b_gate": (F,), "W_up": (F, d), "b_up": (F,), "W_down": (d, F), "b_down": (d,),
    }
    return shapes[name]


# ---------------------------------------------------------------------------------------------
# transforms: (stored shape from the canonical shapes, function stored tensor -> canonical tensors).
# Each works on float32 arrays and, for linear weights kept as stored, on StoredWeight rows.

def _cut(t, r0, r1):
    return t.rows(r0, r1) if isinstance(t, StoredWeight) else np.ascontiguousarray(t[r0:r1])


def _split(t, shapes):
    """A fused tensor cut along its first axis into pieces of the canonical shapes' first sizes."""
    out, r = [], 0
    for s in shapes:
        out.append(_cut(t, r, r + s[0]))
        r += s[0]
    return out


def _split_heads(t, cfg, shapes):
    """A fused tensor laid out per head (GPT-NeoX's query_key_value: rows (H, len(shapes), dh)) cut into the
    canonical pieces, each (H*dh, ...) head-major (a row permutation: works on a StoredWeight too)."""
    idx = np.arange(_fused(shapes)[0]).reshape(cfg.n_heads, len(shapes), shapes[0][0] // cfg.n_heads)
    return [t.take(idx[:, j].reshape(-1)) if isinstance(t, StoredWeight) else np.ascontiguousarray(t[idx[:, j].reshape(-1)])
            for j in range(len(shapes))]


def _fused(shapes):
    return (sum(s[0] for s in shapes),) + tuple(shapes[0][1:])


def _transpose(t):
    return t.transpose() if isinstance(t, StoredWeight) else np.ascontiguousarray(t.T)


def unpermute(w, n_head: int):
    """Undo llama.cpp's reordering of Q/K rows: (n_head, 2, dh/2, in) interleaved -> rotate-half order
    (a float32 matrix or bias, or a StoredWeight whose rows are permuted in their stored format)."""
    if isinstance(w, StoredWeight):
        return w.take(unpermute(np.arange(w.shape[0]), n_head))
    rest = w.shape[1:]
    dim = w.shape[0] // n_head // 2
    return np.ascontiguousarray(w.reshape(n_head, dim, 2, *rest).swapaxes(1, 2).reshape(w.shape))


_ONE = np.float32(1.0)

TRANSFORMS = {
    "": (lambda shapes: shapes[0], lambda t, cfg, shapes: [t]),
    # GPT-2's Conv1D stores (in, out)
    "T": (lambda shapes: shapes[0][::-1], lambda t, cfg, shapes: [_transpose(t)]),
    # fused q/k/v (GPT-2's c_attn, GGUF's attn_qkv): rows q, then k, then v
    "split": (_fused, lambda t, cfg, shapes: _split(t, shapes)),
    "T_split": (lambda shapes: _fused(shapes)[::-1], lambda t, cfg, shapes: _split(_transpose(t), shapes)),
    # fused q/k/v laid out per head (GPT-NeoX): head 0's q, k, v rows, then head 1's, ...
    "split_heads": (_fused, _split_heads),
    # one stored tensor serving two canonical ones (GPT-J's ln_1 is the norm before attention and MLP)
    "dup": (lambda shapes: shapes[0], lambda t, cfg, shapes: [t] * len(shapes)),
    # Gemma3RMSNorm multiplies by (1 + w), computed in float32
    "norm1p": (lambda shapes: shapes[0], lambda t, cfg, shapes: [(_ONE + t).astype(np.float32)]),
    # GGUF stores Gemma's norms as 1 + w; transformers loads w - 1 and computes 1 + w (float32)
    "gguf_norm1p": (lambda shapes: shapes[0], lambda t, cfg, shapes: [(_ONE + (t - _ONE)).astype(np.float32)]),
    "unpermute_q": (lambda shapes: shapes[0], lambda t, cfg, shapes: [unpermute(t, cfg.n_heads)]),
    "unpermute_k": (lambda shapes: shapes[0], lambda t, cfg, shapes: [unpermute(t, cfg.n_kv_heads)]),
}

# canonical weights the C core multiplies with (or gathers rows of) in their stored format
LINEAR = frozenset({"W_E", "W_U", "W_Q", "W_K", "W_V", "W_O", "W_gate", "W_up", "W_down"})


def _flag(cfg, cond) -> bool:
    """A table condition: True/False, or a ModelConfig flag name with an optional leading "!"."""
    if isinstance(cond, bool):
        return cond
    neg = cond.startswith("!")
    return bool(getattr(cfg, cond.lstrip("!"))) != neg


# ---------------------------------------------------------------------------------------------
# the builder

class SafetensorsSource:
    """A :class:`~factrace.io.safetensors.Checkpoint` seen as a tensor source: names, shapes, float32
    tensors, and errors naming the file."""

    error = CheckpointError
    ignored = IGNORED

    def __init__(self, ck):
        self.ck = ck
        self.names = set(ck.names)
        self.where = str(ck.dir)

    def shape(self, name):
        return tuple(self.ck.shape(name))

    def file_of(self, name):
        return self.ck.path_of(name)

    def tensor(self, name):
        return self.ck.tensor(name)

    def stored(self, name):
        """The 2-D tensor as a StoredWeight (F32, F16, BF16 as in the file); its pages are released."""
        return self.ck.stored(name)


class GGUFSource:
    """A :class:`~factrace.io.gguf.GGUFFile` seen as a tensor source (shapes in numpy order)."""

    error = GGUFError
    ignored = GGUF_IGNORED

    def __init__(self, f, path):
        self.f = f
        self.names = set(f.tensors)
        self.where = str(path)

    def shape(self, name):
        return tuple(self.f.tensors[name].shape)

    def file_of(self, name):
        return self.where

    def tensor(self, name):
        return self.f.tensor(name)

    def stored(self, name):
        """The 2-D tensor as a StoredWeight in its GGUF block format (float32 for formats factrace does
        not compute with)."""
        info = self.f.tensors[name]
        if info.ggml_type not in TYPE_IDS.values():
            return StoredWeight.from_float32(self.f.tensor(name))
        raw = self.f.raw(name)
        return StoredWeight(info.ggml_type, info.shape, raw.reshape(info.shape[0], row_bytes(info.ggml_type, info.shape[1])))


def build_weights(arch: "A.Arch", tensors: tuple, cfg, src, stored: bool = False) -> dict:
    """The canonical weights of a model: every :class:`~factrace.io.archs.Tensor` of ``tensors`` (an
    entry's safetensors or GGUF list) read from ``src`` one at a time, shape-checked and transformed.
    With ``stored`` the linear weights (:data:`LINEAR`) are :class:`StoredWeight` objects in the file's
    format; everything else (norms, biases, learned positions) is float32. ``W_U`` is ``W_E`` itself (no
    copy) for tied models. Raises ``src.error`` for a missing tensor, a wrong shape or a tensor the
    architecture does not have."""
    prefix = _prefix(arch, tensors, src)
    used, W = set(), {}
    L = cfg.n_layers
    for spec in tensors:
        if spec.when is not None and not _flag(cfg, spec.when):
            continue
        for i in [None] if spec.glob else range(L):
            name = spec.name.format(p=prefix, i=i)
            targets = list(spec.to) if spec.glob else [f"blocks.{i}.{t}" for t in spec.to]
            if name not in src.names:
                if spec.optional and _flag(cfg, spec.optional):
                    continue
                raise src.error(f"{src.where}: missing tensor {name!r}")
            shapes = [canonical_shape(t, cfg) for t in spec.to]
            stored_shape, fn = TRANSFORMS[spec.fn]
            want, got = tuple(stored_shape(shapes)), src.shape(name)
            if got != want:
                raise src.error(f"{src.file_of(name)}: tensor {name!r} has shape {got}, the config implies {want}")
            used.add(name)
            keep = stored and all(c in LINEAR for c in spec.to)
            for t, arr in zip(targets, fn(src.stored(name) if keep else src.tensor(name), cfg, shapes)):
                W[t] = arr
    if cfg.tied:
        W["W_U"] = W["W_E"]
        for spec in tensors:  # a tied model may carry a stored copy of the unembedding: unused, as in transformers
            if spec.to == ("W_U",):
                used.add(spec.name.format(p=prefix, i=None))
    extra = sorted(n for n in src.names if n not in used and not src.ignored.search(n))
    if extra:
        raise src.error(f"{src.where}: unexpected tensors for {arch.name}: {extra[:5]}{' ...' if len(extra) > 5 else ''}")
    return W


def _prefix(arch, tensors, src) -> str:
    """The entry's name prefix this checkpoint uses: the first whose first tensor exists."""
    for p in arch.prefixes:
        if tensors[0].name.format(p=p, i=0) in src.names:
            return p
    return arch.prefixes[-1]


# ---------------------------------------------------------------------------------------------
# GGUF metadata -> a Hugging Face config dict

def _scalar(v):
    return v.item() if hasattr(v, "item") and getattr(v, "ndim", 0) == 0 else v


def hf_config_from_gguf(md: dict, tensors: dict, path) -> dict:
    """A Hugging Face style config dict from GGUF metadata (``md``) and tensor infos, through the entry of
    ``general.architecture`` in the architecture table: its metadata keys with transformers' GGUF
    defaults, its fixed values (e.g. Gemma 3's local rope base 10000 and query_pre_attn_scalar), and the
    checks every format shares (vocabulary size from ``token_embd``, rope scaling, no per-layer KV heads).

    Example: ``hf_config_from_gguf(f.metadata, f.tensors, "m.gguf")["num_hidden_layers"]``."""
    name = md.get("general.architecture")
    if not isinstance(name, str) or name not in A.GGUF_ARCHS:
        raise ConfigError(f"{path}: GGUF architecture {name!r:.80} is not supported; supported: {', '.join(A.GGUF_ARCHS)}")
    arch = A.GGUF_ARCHS[name]
    spec = arch.gguf

    def g(key):
        return _scalar(md.get(f"{name}.{key}"))

    missing = sorted(f"{name}.{k}" for k, d in spec.keys.values() if d is A.REQUIRED and g(k) is None)
    if missing:
        raise ConfigError(f"{path}: GGUF metadata lacks {', '.join(missing)}")
    if "token_embd.weight" not in tensors:
        raise GGUFError(f"{path}: no token_embd.weight tensor")
    vocab = int(tensors["token_embd.weight"].shape[0])
    if g("vocab_size") is not None and int(g("vocab_size")) != vocab:
        raise ConfigError(f"{path}: {name}.vocab_size={g('vocab_size')} but token_embd has {vocab} rows")
    tok = md.get("tokenizer.ggml.tokens")
    if tok is not None and len(tok) > vocab:
        raise ConfigError(f"{path}: {len(tok)} tokenizer tokens but token_embd has {vocab} rows")
    if hasattr(g("attention.head_count_kv"), "__len__"):
        raise ConfigError(f"{path}: per-layer head_count_kv arrays are not supported")
    if "rope_freqs.weight" in tensors:
        raise ConfigError(f"{path}: llama3 rope frequency factors (rope_freqs.weight) are not supported yet")
    c = {"architectures": [arch.name], "vocab_size": vocab, "tie_word_embeddings": "output.weight" not in tensors,
         "bos_token_id": _scalar(md.get("tokenizer.ggml.bos_token_id")),
         "eos_token_id": _scalar(md.get("tokenizer.ggml.eos_token_id"))}
    for hf_key, (key, default) in spec.keys.items():
        v = g(key)
        if v is None:
            if default is None:
                continue
            v = default(c, path) if callable(default) else default
        c[hf_key] = v
    if arch.rope != "none":
        st, sf = g("rope.scaling.type"), g("rope.scaling.factor")
        if st and st != "none" and sf:
            if st != "linear":
                raise ConfigError(f"{path}: GGUF rope scaling {st!r} is not supported")
            c["rope_scaling"] = {"rope_type": "linear", "factor": float(sf)}
    c.update(spec.fixed)
    if spec.extra:
        A.GGUF_EXTRAS[spec.extra](g, c)
    return c


# ---------------------------------------------------------------------------------------------
# memory

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


def check_memory(n_elements: int, where, nbytes: int | None = None) -> None:
    """Refuse (ModelTooLargeError) a model whose ``n_elements`` float32 weights (or ``nbytes`` bytes of
    weights kept as stored) do not fit in memory."""
    need = 4 * int(n_elements) if nbytes is None else int(nbytes)
    avail = available_memory()
    if avail is not None and need > avail:
        how = "as float32" if nbytes is None else "as stored"
        raise ModelTooLargeError(
            f"{where}: the weights need {need / 2**30:.2f} GiB {how} but only {avail / 2**30:.2f} GiB of "
            f"memory is available ({'FACTRACE_MAX_BYTES' if os.environ.get('FACTRACE_MAX_BYTES') else 'MemAvailable'}"
            f"); nothing was loaded")
