"""GGUF files to a :class:`factrace.Model`: hyperparameters from the metadata, weights dequantized to
float32 one tensor at a time (never two full copies), llama.cpp's Q/K row order undone for Llama,
Gemma 3's stored ``1 + w`` norms handled exactly as transformers loads them, and the tokenizer built
from ``tokenizer.ggml.*``. The result matches ``transformers`` loading the same file
(``from_pretrained(dir, gguf_file=...)``).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from .config import ConfigError, ModelConfig, from_hf_config
from .gguf import GGUFError, GGUFFile

ARCHS = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM",
         "gemma3": "Gemma3ForCausalLM", "gpt2": "GPT2LMHeadModel", "mistral": "MistralForCausalLM"}


def _scalar(v):
    return v.item() if hasattr(v, "item") and getattr(v, "ndim", 0) == 0 else v


def hf_config_from_gguf(md: dict, tensors: dict, path) -> dict:
    """A Hugging Face style config dict from GGUF metadata (the same defaults transformers' GGUF loader
    uses for keys the file lacks, e.g. Gemma 3's local rope base 10000 and query_pre_attn_scalar)."""
    arch = md.get("general.architecture")
    if not isinstance(arch, str) or arch not in ARCHS:
        raise ConfigError(f"{path}: GGUF architecture {arch!r} is not supported; supported: {', '.join(ARCHS)}")
    g = lambda k, default=None: _scalar(md.get(f"{arch}.{k}", default))  # noqa: E731
    req = {"block_count", "embedding_length", "attention.head_count"}
    missing = [k for k in req if f"{arch}.{k}" not in md]
    if missing:
        raise ConfigError(f"{path}: GGUF metadata lacks {', '.join(f'{arch}.{k}' for k in sorted(missing))}")
    tok = md.get("tokenizer.ggml.tokens")
    if "token_embd.weight" not in tensors:
        raise GGUFError(f"{path}: no token_embd.weight tensor")
    vocab = int(tensors["token_embd.weight"].shape[0])
    if g("vocab_size") is not None and int(g("vocab_size")) != vocab:
        raise ConfigError(f"{path}: {arch}.vocab_size={g('vocab_size')} but token_embd has {vocab} rows")
    if tok is not None and len(tok) > vocab:
        raise ConfigError(f"{path}: {len(tok)} tokenizer tokens but token_embd has {vocab} rows")
    d = int(g("embedding_length"))
    H = int(g("attention.head_count"))
    kv = g("attention.head_count_kv", H)
    if hasattr(kv, "__len__"):
        raise ConfigError(f"{path}: per-layer head_count_kv arrays are not supported")
    c = {"vocab_size": vocab, "bos_token_id": _scalar(md.get("tokenizer.ggml.bos_token_id")),
         "eos_token_id": _scalar(md.get("tokenizer.ggml.eos_token_id"))}
    if arch == "gpt2":
        c.update(architectures=["GPT2LMHeadModel"], n_embd=d, n_layer=int(g("block_count")), n_head=H,
                 n_positions=int(g("context_length", 1024)), n_inner=int(g("feed_forward_length", 4 * d)),
                 layer_norm_epsilon=float(g("attention.layer_norm_epsilon", 1e-5)))
        return c
    c.update(architectures=[ARCHS[arch]], hidden_size=d, num_hidden_layers=int(g("block_count")),
             num_attention_heads=H, num_key_value_heads=int(kv), intermediate_size=int(g("feed_forward_length")),
             max_position_embeddings=int(g("context_length", 2048)),
             rms_norm_eps=float(g("attention.layer_norm_rms_epsilon", 1e-6)),
             rope_theta=float(g("rope.freq_base", 10000.0)),
             tie_word_embeddings="output.weight" not in tensors)
    if g("attention.key_length") is not None:
        c["head_dim"] = int(g("attention.key_length"))
    st, sf = g("rope.scaling.type"), g("rope.scaling.factor")
    if st and st != "none" and sf:
        if st == "linear":
            c["rope_scaling"] = {"rope_type": "linear", "factor": float(sf)}
        else:
            raise ConfigError(f"{path}: GGUF rope scaling {st!r} is not supported")
    if arch == "llama":
        # llama3-style rope: llama.cpp stores the precomputed factors as rope_freqs.weight
        if "rope_freqs.weight" in tensors:
            c["_rope_freqs"] = True
    if arch == "gemma3":
        c.update(hidden_activation="gelu_pytorch_tanh", query_pre_attn_scalar=256,
                 sliding_window=int(g("attention.sliding_window", 4096)), rope_local_base_freq=10000.0,
                 tie_word_embeddings=True)
        if "head_dim" in c:
            c["query_pre_attn_scalar"] = c["head_dim"]
        c["sliding_window_pattern"] = 6
    if arch == "mistral" and g("attention.sliding_window"):
        c["sliding_window"] = int(g("attention.sliding_window"))
    return c


def _unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's reordering of Q/K rows: (n_head, 2, dh/2, in) interleaved -> rotate-half order."""
    out, rest = w.shape[0], w.shape[1:]
    dim = out // n_head // 2
    return np.ascontiguousarray(w.reshape(n_head, dim, 2, *rest).swapaxes(1, 2).reshape(w.shape))


def load_gguf(path, name: str | None = None):
    """Load a GGUF file (architectures llama, qwen2, qwen3, gemma3, gpt2, mistral; weights F32, F16, BF16,
    Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q2_K .. Q6_K) as a float32 :class:`factrace.Model`.

    Example:
        >>> m = load_gguf("SmolLM2-135M-Instruct.Q4_1.gguf")    # doctest: +SKIP
    """
    from .model import Model
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
        if raw.pop("_rope_freqs", False):
            raise ConfigError(f"{path}: llama3 rope frequency factors (rope_freqs.weight) are not supported yet")
        cfg = from_hf_config(raw, where=str(path))
        arch = md["general.architecture"]
        from .loader import check_memory

        check_memory(sum(int(t.n_elements) for t in tensors.values()), path)  # before any tensor is converted
        W = _weights(f, cfg, arch, path)
        tk = None
        if "tokenizer.ggml.model" in md:
            from .gguf_tokenizer import load_tokenizer

            try:
                t, sp = load_tokenizer(md)
            except (ValueError, KeyError, TypeError) as e:
                raise GGUFError(f"{path}: cannot build the tokenizer from tokenizer.ggml.* ({e})") from None
            tk = Tokenizer(t, sp.bos_id, sp.eos_id, source=path)
    return Model(cfg, W, tokenizer=tk, name=name or path.stem, source=str(path))


def _weights(f: GGUFFile, cfg: ModelConfig, arch: str, path) -> dict:
    d, F, V, dh = cfg.d_model, cfg.d_mlp, cfg.vocab_size, cfg.d_head
    qd, kvd = cfg.n_heads * dh, cfg.n_kv_heads * dh
    gemma = arch == "gemma3"
    one = np.float32(1.0)
    used = set()

    def get(name, shape, optional=False, norm=False):
        if name not in f.tensors:
            if optional:
                return None
            raise GGUFError(f"{path}: missing tensor {name!r}")
        info = f.tensors[name]
        if tuple(info.shape) != tuple(shape):
            raise GGUFError(f"{path}: tensor {name!r} has shape {tuple(info.shape)}, the metadata implies {tuple(shape)}")
        used.add(name)
        t = f.tensor(name)
        if norm and gemma:  # stored as 1 + w; transformers loads w - 1 and computes 1 + w (float32)
            t = (one + (t - one)).astype(np.float32)
        return t

    W = {"W_E": get("token_embd.weight", (V, d))}
    if arch == "gpt2":
        W["W_pos"] = get("position_embd.weight", (cfg.n_ctx, d))
        W["ln_f_w"] = get("output_norm.weight", (d,))
        W["ln_f_b"] = get("output_norm.bias", (d,))
        W["W_U"] = W["W_E"] if "output.weight" not in f.tensors else get("output.weight", (V, d))
        for i in range(cfg.n_layers):
            b, p = f"blocks.{i}.", f"blk.{i}."
            W[b + "ln1_w"], W[b + "ln1_b"] = get(p + "attn_norm.weight", (d,)), get(p + "attn_norm.bias", (d,))
            qkv, qkv_b = get(p + "attn_qkv.weight", (3 * d, d)), get(p + "attn_qkv.bias", (3 * d,))
            for j, n in enumerate("QKV"):
                W[b + f"W_{n}"] = np.ascontiguousarray(qkv[j * d:(j + 1) * d])
                W[b + f"b_{n}"] = np.ascontiguousarray(qkv_b[j * d:(j + 1) * d])
            W[b + "W_O"], W[b + "b_O"] = get(p + "attn_output.weight", (d, d)), get(p + "attn_output.bias", (d,))
            W[b + "ln2_w"], W[b + "ln2_b"] = get(p + "ffn_norm.weight", (d,)), get(p + "ffn_norm.bias", (d,))
            W[b + "W_up"], W[b + "b_up"] = get(p + "ffn_up.weight", (F, d)), get(p + "ffn_up.bias", (F,))
            W[b + "W_down"], W[b + "b_down"] = get(p + "ffn_down.weight", (d, F)), get(p + "ffn_down.bias", (d,))
    else:
        W["ln_f_w"] = get("output_norm.weight", (d,), norm=True)
        W["W_U"] = W["W_E"] if cfg.tied else get("output.weight", (V, d))
        for i in range(cfg.n_layers):
            b, p = f"blocks.{i}.", f"blk.{i}."
            W[b + "ln1_w"] = get(p + "attn_norm.weight", (d,), norm=True)
            q, k = get(p + "attn_q.weight", (qd, d)), get(p + "attn_k.weight", (kvd, d))
            if arch == "llama":
                q, k = _unpermute(q, cfg.n_heads), _unpermute(k, cfg.n_kv_heads)
            W[b + "W_Q"], W[b + "W_K"] = q, k
            W[b + "W_V"] = get(p + "attn_v.weight", (kvd, d))
            W[b + "W_O"] = get(p + "attn_output.weight", (d, qd))
            for n, size in (("q", qd), ("k", kvd), ("v", kvd)):
                bias = get(p + f"attn_{n}.bias", (size,), optional=True)
                if bias is not None:
                    if arch == "llama" and n in "qk":
                        bias = _unpermute(bias, cfg.n_heads if n == "q" else cfg.n_kv_heads)
                    W[b + f"b_{n.upper()}"] = bias
            bo = get(p + "attn_output.bias", (d,), optional=True)
            if bo is not None:
                W[b + "b_O"] = bo
            if cfg.qk_norm:
                W[b + "q_norm_w"] = get(p + "attn_q_norm.weight", (dh,), norm=True)
                W[b + "k_norm_w"] = get(p + "attn_k_norm.weight", (dh,), norm=True)
            if gemma:
                W[b + "post_attn_norm_w"] = get(p + "post_attention_norm.weight", (d,), norm=True)
                W[b + "post_mlp_norm_w"] = get(p + "post_ffw_norm.weight", (d,), norm=True)
            W[b + "ln2_w"] = get(p + "ffn_norm.weight", (d,), norm=True)
            W[b + "W_gate"] = get(p + "ffn_gate.weight", (F, d))
            W[b + "W_up"] = get(p + "ffn_up.weight", (F, d))
            W[b + "W_down"] = get(p + "ffn_down.weight", (d, F))
    extra = [n for n in f.tensors if n not in used and n != "rope_freqs.weight"]
    if extra:
        raise GGUFError(f"{path}: unexpected tensors for {arch}: {extra[:5]}")
    return W
