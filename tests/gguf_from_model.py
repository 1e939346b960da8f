"""Write a loaded model as a GGUF file with gguf-py, in llama.cpp's conventions, by walking the same
architecture-table entry the loader reads (its GGUF metadata keys and tensor names) and inverting each
named transform (fused q/k/v concatenated again, llama.cpp's Q/K row permutation applied, ...).

Used by the architecture-table test: the file then loads through the GGUF path and must reproduce the
safetensors fixture's reference logits. Only what GGUF can express is written: ``representable`` says why
a config cannot be (llama3 rope factors, Gemma's query_pre_attn_scalar != head_dim, ...).
"""
from __future__ import annotations

import numpy as np

from factrace.io import archs as A
from factrace.io.weights import TRANSFORMS, canonical_shape


def permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf permutation of Q/K rows (rotate-half -> interleaved pairs)."""
    return np.ascontiguousarray(w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2)
                                .reshape(w.shape))


def _inverse(fn: str, parts: list, cfg) -> np.ndarray:
    """The stored GGUF tensor whose transform ``fn`` gives the canonical ``parts``."""
    if fn in ("", "gguf_norm1p"):  # GGUF stores Gemma's norms as 1 + w: the canonical factor itself
        return parts[0]
    if fn == "split":
        return np.concatenate(parts, 0)
    if fn == "unpermute_q":
        return permute(parts[0], cfg.n_heads)
    if fn == "unpermute_k":
        return permute(parts[0], cfg.n_kv_heads)
    raise ValueError(f"no GGUF inverse for transform {fn!r}")


def representable(cfg) -> str:
    """'' when GGUF metadata can express this config, else the reason it cannot."""
    arch = A.ARCHS[cfg.arch]
    raw = cfg.raw
    if arch.gguf is None:
        return f"{cfg.arch} has no GGUF entry"
    rs = raw.get("rope_scaling") or (raw.get("rope_parameters") or {})
    kind = rs.get("rope_type", rs.get("type", "default")) if isinstance(rs, dict) else "default"
    if kind not in ("default", "linear") or "full_attention" in rs:
        return f"rope scaling {kind!r} / per-layer-type rope parameters"
    if arch.gguf.extra == "gemma" and raw.get("query_pre_attn_scalar", cfg.d_head) != cfg.d_head:
        return "Gemma's query_pre_attn_scalar differs from head_dim (GGUF stores only the key length)"
    sw = max(cfg.layer_window)
    if arch.gguf.extra == "gemma" and cfg.layer_window != [sw if (i + 1) % 6 else 0 for i in range(cfg.n_layers)]:
        return "Gemma's layer types differ from llama.cpp's fixed pattern (every 6th layer global)"
    if cfg.mlp_bias and not any("b_down" in t.to for t in arch.gguf.tensors):
        return "llama.cpp's llama tensors have no MLP biases"
    fixed_act = arch.gguf.fixed.get(arch.act.names[0])
    if fixed_act is not None and fixed_act != cfg.act:
        return f"GGUF does not store the activation; llama.cpp's {arch.gguf.arch} loads as {fixed_act}, not {cfg.act}"
    return ""


def write_gguf(m, path) -> None:
    """Write model ``m`` (its weights as F32 tensors) to ``path`` as llama.cpp would, for its table entry."""
    import gguf

    cfg = m.config
    arch = A.ARCHS[cfg.arch]
    spec = arch.gguf
    w = gguf.GGUFWriter(str(path), spec.arch)
    raw = dict(cfg.raw)
    hf = {"hidden_size": cfg.d_model, "n_embd": cfg.d_model, "num_hidden_layers": cfg.n_layers,
          "n_layer": cfg.n_layers, "num_attention_heads": cfg.n_heads, "n_head": cfg.n_heads,
          "num_key_value_heads": cfg.n_kv_heads, "intermediate_size": cfg.d_mlp, "n_inner": cfg.d_mlp,
          "max_position_embeddings": cfg.n_ctx, "n_positions": cfg.n_ctx, "head_dim": cfg.d_head,
          "rms_norm_eps": cfg.norm_eps, "layer_norm_epsilon": cfg.norm_eps, "layer_norm_eps": cfg.norm_eps,
          "use_parallel_residual": bool(cfg.parallel)}
    theta = (raw.get("rope_theta") or (raw.get("rope_parameters") or {}).get("rope_theta")
             or raw.get("rotary_emb_base"))
    if theta is not None:
        hf["rope_theta"] = hf["rotary_emb_base"] = theta
    if any(cfg.layer_window):
        hf["sliding_window"] = max(cfg.layer_window)
    for hf_key, (key, default) in spec.keys.items():
        if hf_key not in hf:
            continue
        v = hf[hf_key]
        name = f"{spec.arch}.{key}"
        if isinstance(v, bool):
            w.add_bool(name, v)
        elif isinstance(v, float) or key.endswith(("epsilon", "freq_base")):
            w.add_float32(name, float(v))
        else:
            w.add_uint32(name, int(v))
    if cfg.rope:  # llama.cpp writes the rotated dims per head (GPT-NeoX: int(head_size * rotary_pct))
        w.add_uint32(f"{spec.arch}.rope.dimension_count", int(cfg.rope_dim or cfg.d_head))
    rs = raw.get("rope_scaling") or raw.get("rope_parameters") or {}
    if isinstance(rs, dict) and rs.get("rope_type", rs.get("type")) == "linear":
        w.add_string(f"{spec.arch}.rope.scaling.type", "linear")
        w.add_float32(f"{spec.arch}.rope.scaling.factor", float(rs["factor"]))
    for t in spec.tensors:
        if t.when is not None and not _flag(cfg, t.when):
            continue
        for i in [None] if t.glob else range(cfg.n_layers):
            names = list(t.to) if t.glob else [f"blocks.{i}.{x}" for x in t.to]
            parts = [m.W(n) for n in names]
            if any(p is None for p in parts):
                continue  # an optional tensor this model does not have
            shapes = [canonical_shape(x, cfg) for x in t.to]
            stored = _inverse(t.fn, parts, cfg)
            assert tuple(stored.shape) == tuple(TRANSFORMS[t.fn][0](shapes))
            w.add_tensor(t.name.format(i=i), np.ascontiguousarray(stored, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def _flag(cfg, cond) -> bool:
    if isinstance(cond, bool):
        return cond
    return bool(getattr(cfg, cond.lstrip("!"))) != cond.startswith("!")
