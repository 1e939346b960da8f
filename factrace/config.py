"""Model configuration: one :class:`ModelConfig` for every architecture, built from a Hugging Face
``config.json`` (:func:`from_hf_config`) or from GGUF metadata (``factrace.gguf_model``).

The config carries everything the C core needs, including the rotary tables computed exactly as
Hugging Face's ``rope_init_fn`` computes them (float32), so the C forward pass matches transformers.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, asdict

import numpy as np

SUPPORTED_ARCHS = (
    "GPT2LMHeadModel",
    "LlamaForCausalLM",
    "Qwen2ForCausalLM",
    "Qwen3ForCausalLM",
    "MistralForCausalLM",
    "Gemma3ForCausalLM",
)

NORM_LAYER, NORM_RMS = 0, 1
ACTS = {"gelu_new": 0, "gelu_pytorch_tanh": 0, "gelu_fast": 0, "gelu_tanh": 0, "silu": 1, "swish": 1,
        "gelu": 2, "relu": 3}


class ConfigError(ValueError):
    """A config.json (or GGUF metadata) that factrace cannot use; the message names the file."""


@dataclass
class ModelConfig:
    """Architecture and hyperparameters of a loaded model.

    Fields (shapes use L = n_layers, H = n_heads, dh = d_head):
        arch: Hugging Face architecture name, e.g. ``"LlamaForCausalLM"``.
        n_layers, n_heads, n_kv_heads, d_model, d_head, d_mlp, vocab_size, n_ctx: sizes.
        norm: ``"layernorm"`` or ``"rmsnorm"``; norm_eps: epsilon.
        act: activation name (``"gelu_new"``, ``"silu"``, ``"gelu_pytorch_tanh"`` ...); gated_mlp: SwiGLU/GeGLU.
        learned_pos: GPT-2 position embeddings; rope: rotary embeddings.
        rope_inv_freq: (n_tables, dh/2) float32 inverse frequencies; rope_mscale: (n_tables,) cos/sin scale.
        layer_window: (L,) sliding-window size per layer, 0 = full attention; layer_rope: (L,) table index.
        qk_norm: per-head q/k RMSNorm; post_norms: Gemma's norms on sub-layer outputs.
        embed_scale: factor on token embeddings (Gemma: sqrt(d_model) in float32).
        attn_scale: factor on q.k scores; attn_softcap / final_softcap: 0 = none.
        tied: unembedding shares the token-embedding matrix.
        bos_token_id, eos_token_id: from the config, if any.

    Example:
        >>> cfg = from_hf_config({"architectures": ["GPT2LMHeadModel"], "n_embd": 64, "n_layer": 2,
        ...                       "n_head": 4, "vocab_size": 100, "n_positions": 32})
        >>> cfg.d_head
        16
    """

    arch: str
    n_layers: int
    n_heads: int
    n_kv_heads: int
    d_model: int
    d_head: int
    d_mlp: int
    vocab_size: int
    n_ctx: int
    norm: str = "rmsnorm"
    norm_eps: float = 1e-5
    act: str = "silu"
    gated_mlp: bool = True
    learned_pos: bool = False
    rope: bool = True
    rope_inv_freq: np.ndarray | None = None
    rope_mscale: np.ndarray | None = None
    layer_window: list = field(default_factory=list)
    layer_rope: list = field(default_factory=list)
    qk_norm: bool = False
    post_norms: bool = False
    embed_scale: float = 1.0
    attn_scale: float = 1.0
    attn_softcap: float = 0.0
    final_softcap: float = 0.0
    tied: bool = False
    attn_bias: bool = False      # q/k/v biases present
    o_bias: bool = False         # output projection bias
    mlp_bias: bool = False
    bos_token_id: int | None = None
    eos_token_id: int | list | None = None
    raw: dict = field(default_factory=dict, repr=False)

    @property
    def d_vocab(self) -> int:
        return self.vocab_size

    def core_dict(self) -> dict:
        """The dict that ``factrace._core.Model`` takes."""
        d = dict(
            n_layers=self.n_layers, n_heads=self.n_heads, n_kv_heads=self.n_kv_heads, d_model=self.d_model,
            d_head=self.d_head, d_mlp=self.d_mlp, vocab_size=self.vocab_size, n_ctx=self.n_ctx,
            norm=NORM_LAYER if self.norm == "layernorm" else NORM_RMS, norm_eps=float(self.norm_eps),
            act=ACTS[self.act], gated_mlp=int(self.gated_mlp), learned_pos=int(self.learned_pos),
            rope=int(self.rope), qk_norm=int(self.qk_norm), post_norms=int(self.post_norms),
            embed_scale=float(self.embed_scale), attn_scale=float(self.attn_scale),
            attn_softcap=float(self.attn_softcap), final_softcap=float(self.final_softcap),
            layer_window=[int(x) for x in (self.layer_window or [0] * self.n_layers)],
            layer_rope=[int(x) for x in (self.layer_rope or [0] * self.n_layers)],
        )
        if self.rope:
            d["rope_inv_freq"] = np.ascontiguousarray(self.rope_inv_freq, dtype=np.float32)
            d["rope_mscale"] = np.ascontiguousarray(self.rope_mscale, dtype=np.float32)
        return d

    def summary(self) -> dict:
        """Plain-Python view of the main fields (for printing and reports)."""
        out = {k: v for k, v in asdict(self).items() if k not in ("raw", "rope_inv_freq", "rope_mscale")}
        return out


# ---------------------------------------------------------------------------------------------
# rotary tables, exactly as transformers' rope init functions compute them (float32 tensors)

def rope_inv_freq(dim: int, base: float, scaling: dict | None = None, where: str = "config") -> tuple:
    """Inverse frequencies (dim/2,) float32 and the attention scaling factor for a rope config.

    ``scaling`` is the HF ``rope_scaling`` dict (``rope_type``/``type`` of ``default``, ``linear`` or
    ``llama3``); other types raise :class:`ConfigError`.

    Example:
        >>> inv, mscale = rope_inv_freq(64, 10000.0)
        >>> inv.shape, mscale
        ((32,), 1.0)
    """
    f32 = np.float32
    exps = np.arange(0, dim, 2, dtype=np.int64).astype(f32) / f32(dim)
    inv = (f32(1.0) / (f32(base) ** exps)).astype(f32)
    kind = "default"
    if scaling is not None and not isinstance(scaling, dict):
        raise ConfigError(f"{where}: rope scaling must be a JSON object, got {scaling!r:.80}")
    if scaling:
        kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "default":
        return inv, 1.0
    def pos(key):
        v = scaling.get(key)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
            raise ConfigError(f"{where}: rope scaling '{key}' must be a positive number, got {v!r}")
        return f32(v)

    if kind == "linear":
        return (inv / pos("factor")).astype(f32), 1.0
    if kind == "llama3":
        factor = pos("factor")
        low = pos("low_freq_factor")
        high = pos("high_freq_factor")
        old = pos("original_max_position_embeddings")
        if high == low:
            raise ConfigError(f"{where}: llama3 rope scaling needs high_freq_factor != low_freq_factor")
        low_wavelen = old / low
        high_wavelen = old / high
        wavelen = f32(2 * math.pi) / inv
        inv_l = np.where(wavelen > low_wavelen, inv / factor, inv).astype(f32)
        smooth = ((old / wavelen - low) / (high - low)).astype(f32)
        smoothed = ((f32(1) - smooth) * inv_l / factor + smooth * inv_l).astype(f32)
        medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
        return np.where(medium, smoothed, inv_l).astype(f32), 1.0
    raise ConfigError(f"{where}: rope scaling type '{kind}' is not supported (supported: default, linear, llama3)")


# ---------------------------------------------------------------------------------------------

def _req(cfg: dict, key: str, where: str, alt: tuple = ()):
    for k in (key,) + tuple(alt):
        if k in cfg and cfg[k] is not None:
            return cfg[k]
    raise ConfigError(f"{where}: config lacks '{key}'")


def _pos_int(v, key: str, where: str, lo: int = 1, hi: int = 1 << 24) -> int:
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or not lo <= int(v) <= hi:
        raise ConfigError(f"{where}: '{key}' must be an integer in [{lo}, {hi}], got {v!r}")
    return int(v)


def _num(v, key: str, where: str, zero_ok: bool = False) -> float:
    """A finite JSON number > 0 (>= 0 with ``zero_ok``); anything else is a ConfigError."""
    ok = (not isinstance(v, bool) and isinstance(v, (int, float)) and math.isfinite(v)
          and (v >= 0 if zero_ok else v > 0))
    if not ok:
        raise ConfigError(f"{where}: '{key}' must be a finite number {'>= 0' if zero_ok else '> 0'}, got {v!r:.80}")
    return float(v)


def _opt_dict(c: dict, key: str, where: str) -> dict | None:
    """``c[key]`` when it is a JSON object, None when absent or null; anything else is a ConfigError."""
    v = c.get(key)
    if v is None:
        return None
    if not isinstance(v, dict):
        raise ConfigError(f"{where}: '{key}' must be a JSON object, got {v!r:.80}")
    return v


def _opt_str_list(c: dict, key: str, where: str, n: int) -> list | None:
    """``c[key]`` as a list of ``n`` strings (None when absent, null or empty)."""
    v = c.get(key)
    if not v:
        return None
    if not isinstance(v, list) or len(v) != n or not all(isinstance(t, str) for t in v):
        raise ConfigError(f"{where}: '{key}' must be a list of {n} strings, got {v!r:.80}")
    return v


def _theta_scaling(rp: dict, where: str):
    """(theta, scaling-or-None) from one rope_parameters dict."""
    if "rope_theta" not in rp:
        raise ConfigError(f"{where}: rope_parameters lacks 'rope_theta'")
    kind = rp.get("rope_type", "default")
    return _num(rp["rope_theta"], "rope_theta", where), (rp if kind != "default" else None)


def _rope_params(c: dict, where: str, default_theta: float = 10000.0):
    """(theta, scaling) from either the classic keys or transformers v5's rope_parameters."""
    rp = _opt_dict(c, "rope_parameters", where)
    if rp is not None and "rope_theta" in rp:
        return _theta_scaling(rp, where)
    theta = c.get("rope_theta")
    theta = default_theta if theta is None else _num(theta, "rope_theta", where)
    return theta, _opt_dict(c, "rope_scaling", where)


def from_hf_config(c: dict, where: str = "config.json") -> ModelConfig:
    """Build a :class:`ModelConfig` from a Hugging Face config dict.

    Raises :class:`ConfigError` naming ``where`` for unsupported architectures and bad values.

    Example:
        >>> from_hf_config({"architectures": ["LlamaForCausalLM"], "hidden_size": 64,
        ...     "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
        ...     "vocab_size": 100, "max_position_embeddings": 64}).n_kv_heads
        4
    """
    if not isinstance(c, dict):
        raise ConfigError(f"{where}: expected a JSON object")
    archs = c.get("architectures") or []
    if not isinstance(archs, list) or not all(isinstance(a, str) for a in archs):
        raise ConfigError(f"{where}: architectures must be a list of strings, not {archs!r:.80}")
    arch = archs[0] if archs else None
    if arch is None:
        mt = c.get("model_type")
        mt = mt if isinstance(mt, str) else None
        arch = {"gpt2": "GPT2LMHeadModel", "llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM",
                "qwen3": "Qwen3ForCausalLM", "mistral": "MistralForCausalLM",
                "gemma3_text": "Gemma3ForCausalLM"}.get(mt)
    if arch == "GPT2Model":
        arch = "GPT2LMHeadModel"
    if arch not in SUPPORTED_ARCHS:
        raise ConfigError(f"{where}: architecture {arch!r} is not supported; supported: {', '.join(SUPPORTED_ARCHS)}")
    try:
        if arch == "GPT2LMHeadModel":
            return _gpt2(c, where)
        return _llama_family(c, arch, where)
    except ConfigError:
        raise
    except KeyError as e:
        raise ConfigError(f"{where}: config lacks {e}") from None
    except (TypeError, ValueError, AttributeError, ZeroDivisionError, OverflowError) as e:
        # backstop: a value of the wrong JSON type that no explicit check above caught
        raise ConfigError(f"{where}: bad config value ({e})") from None


def _qwen_windows(c: dict, L: int, where: str) -> list:
    """Per-layer sliding windows of Qwen2/Qwen3 (0 = full attention): only with use_sliding_window, on the
    layers layer_types marks, or else on the layers from max_window_layers on."""
    if not (c.get("use_sliding_window") and c.get("sliding_window")):
        return [0] * L
    sw = _pos_int(c["sliding_window"], "sliding_window", where, hi=1 << 30)
    mwl = _pos_int(c.get("max_window_layers", L), "max_window_layers", where, lo=0)
    types = (_opt_str_list(c, "layer_types", where, L)
             or ["sliding_attention" if i >= mwl else "full_attention" for i in range(L)])
    return [sw if t == "sliding_attention" else 0 for t in types]


def _gpt2(c: dict, where: str) -> ModelConfig:
    d = _pos_int(_req(c, "n_embd", where, ("hidden_size",)), "n_embd", where)
    L = _pos_int(_req(c, "n_layer", where, ("num_hidden_layers",)), "n_layer", where)
    H = _pos_int(_req(c, "n_head", where, ("num_attention_heads",)), "n_head", where)
    V = _pos_int(_req(c, "vocab_size", where), "vocab_size", where)
    n_ctx = _pos_int(c.get("n_positions", c.get("n_ctx", 1024)), "n_positions", where)
    if d % H:
        raise ConfigError(f"{where}: n_embd={d} is not divisible by n_head={H}")
    if c.get("scale_attn_by_inverse_layer_idx"):
        raise ConfigError(f"{where}: scale_attn_by_inverse_layer_idx=True is not supported")
    act = c.get("activation_function", "gelu_new")
    if act not in ACTS:
        raise ConfigError(f"{where}: activation_function {act!r} is not supported")
    dh = d // H
    scale = 1.0 / math.sqrt(dh) if c.get("scale_attn_weights", True) else 1.0
    return ModelConfig(
        arch="GPT2LMHeadModel", n_layers=L, n_heads=H, n_kv_heads=H, d_model=d, d_head=dh,
        d_mlp=_pos_int(c.get("n_inner") or 4 * d, "n_inner", where), vocab_size=V, n_ctx=n_ctx,
        norm="layernorm", norm_eps=_num(c.get("layer_norm_epsilon", 1e-5), "layer_norm_epsilon", where, zero_ok=True),
        act=act, gated_mlp=False,
        learned_pos=True, rope=False, attn_scale=scale, tied=True, attn_bias=True, o_bias=True, mlp_bias=True,
        bos_token_id=c.get("bos_token_id"), eos_token_id=c.get("eos_token_id"), raw=c,
    )


def _llama_family(c: dict, arch: str, where: str) -> ModelConfig:
    d = _pos_int(_req(c, "hidden_size", where), "hidden_size", where)
    L = _pos_int(_req(c, "num_hidden_layers", where), "num_hidden_layers", where)
    H = _pos_int(_req(c, "num_attention_heads", where), "num_attention_heads", where)
    KV = _pos_int(c.get("num_key_value_heads") or H, "num_key_value_heads", where)
    V = _pos_int(_req(c, "vocab_size", where), "vocab_size", where)
    F = _pos_int(_req(c, "intermediate_size", where), "intermediate_size", where)
    n_ctx = _pos_int(c.get("max_position_embeddings", 2048), "max_position_embeddings", where, hi=1 << 30)
    if H % KV:
        raise ConfigError(f"{where}: num_attention_heads={H} is not a multiple of num_key_value_heads={KV}")
    dh = c.get("head_dim")
    if dh is None:
        if d % H:
            raise ConfigError(f"{where}: hidden_size={d} is not divisible by num_attention_heads={H}")
        dh = d // H
    dh = _pos_int(dh, "head_dim", where)
    if dh % 2:
        raise ConfigError(f"{where}: head_dim={dh} must be even for rotary embeddings")
    gemma = arch == "Gemma3ForCausalLM"
    act = c.get("hidden_activation" if gemma else "hidden_act", c.get("hidden_act", "silu"))
    if gemma and act is None:
        act = "gelu_pytorch_tanh"
    if act not in ACTS:
        raise ConfigError(f"{where}: activation {act!r} is not supported")
    theta, scaling = _rope_params(c, where)
    tied = bool(c.get("tie_word_embeddings", gemma))
    cfg = ModelConfig(
        arch=arch, n_layers=L, n_heads=H, n_kv_heads=KV, d_model=d, d_head=dh, d_mlp=F, vocab_size=V,
        n_ctx=n_ctx, norm="rmsnorm", norm_eps=_num(c.get("rms_norm_eps", 1e-6), "rms_norm_eps", where, zero_ok=True),
        act=act, gated_mlp=True,
        learned_pos=False, rope=True, tied=tied, bos_token_id=c.get("bos_token_id"),
        eos_token_id=c.get("eos_token_id"), raw=c,
    )
    cfg.attn_scale = 1.0 / math.sqrt(dh)
    windows = [0] * L
    if arch == "LlamaForCausalLM":
        cfg.attn_bias = cfg.o_bias = bool(c.get("attention_bias", False))
        cfg.mlp_bias = bool(c.get("mlp_bias", False))
    elif arch == "Qwen2ForCausalLM":
        cfg.attn_bias = True
        windows = _qwen_windows(c, L, where)
    elif arch == "Qwen3ForCausalLM":
        cfg.attn_bias = cfg.o_bias = bool(c.get("attention_bias", False))
        cfg.qk_norm = True
        windows = _qwen_windows(c, L, where)
    elif arch == "MistralForCausalLM":
        if c.get("sliding_window"):
            windows = [_pos_int(c["sliding_window"], "sliding_window", where, hi=1 << 30)] * L
    if gemma:
        cfg.qk_norm = True
        cfg.post_norms = True
        cfg.embed_scale = float(np.float32(d ** 0.5))
        cfg.attn_scale = _num(c.get("query_pre_attn_scalar", dh), "query_pre_attn_scalar", where) ** -0.5
        cfg.attn_softcap = _num(c.get("attn_logit_softcapping") or 0.0, "attn_logit_softcapping", where, True)
        cfg.final_softcap = _num(c.get("final_logit_softcapping") or 0.0, "final_logit_softcapping", where, True)
        types = _opt_str_list(c, "layer_types", where, L)
        if not types:
            pattern = _pos_int(c.get("sliding_window_pattern", 6), "sliding_window_pattern", where)
            types = ["sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(L)]
        if not isinstance(types, list) or len(types) != L:
            raise ConfigError(f"{where}: layer_types has {len(types)} entries for {L} layers")
        sw = _pos_int(c.get("sliding_window") or 4096, "sliding_window", where, hi=1 << 30)
        windows = [sw if t == "sliding_attention" else 0 for t in types]
        rp = _opt_dict(c, "rope_parameters", where)
        if rp is not None and "full_attention" in rp:
            g = _opt_dict(rp, "full_attention", where)
            loc = _opt_dict(rp, "sliding_attention", where) if "sliding_attention" in rp else g
            if g is None or loc is None:
                raise ConfigError(f"{where}: rope_parameters.full_attention/sliding_attention must be objects")
            g_theta, g_scaling = _theta_scaling(g, where)
            l_theta, l_scaling = _theta_scaling(loc, where)
        else:
            g_theta, g_scaling = theta, scaling
            l_theta, l_scaling = _num(c.get("rope_local_base_freq", 10000.0), "rope_local_base_freq", where), None
        g_inv, g_ms = rope_inv_freq(dh, g_theta, g_scaling, where)
        l_inv, l_ms = rope_inv_freq(dh, l_theta, l_scaling, where)
        cfg.rope_inv_freq = np.stack([g_inv, l_inv])
        cfg.rope_mscale = np.array([g_ms, l_ms], np.float32)
        cfg.layer_rope = [1 if w else 0 for w in windows]
    else:
        inv, ms = rope_inv_freq(dh, theta, scaling, where)
        cfg.rope_inv_freq = inv[None, :]
        cfg.rope_mscale = np.array([ms], np.float32)
        cfg.layer_rope = [0] * L
    for w in windows:
        if isinstance(w, bool) or not isinstance(w, int) or not 0 <= w <= 1 << 30:
            raise ConfigError(f"{where}: sliding_window must be a non-negative integer, got {w!r}")
    cfg.layer_window = windows
    return cfg
