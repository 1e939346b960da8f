"""Model configuration: one :class:`ModelConfig` for every architecture, built from a Hugging Face
``config.json`` by :func:`from_hf_config` (GGUF metadata is first turned into such a dict, ``weights.py``).

The parser is generic: what differs between architectures is read from their entries in the
architecture table (``archs.py``). The config carries everything the C core needs, including the rotary
tables computed exactly as Hugging Face's ``rope_init_fn`` computes them (float32), so the C forward
pass matches transformers.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np

from ..errors import ConfigError
from . import archs as A
from .checks import num, pos_int, rope_inv_freq  # noqa: F401  (rope_inv_freq: re-exported for users)

SUPPORTED_ARCHS = A.SUPPORTED_ARCHS

NORM_LAYER, NORM_RMS = 0, 1
ACTS = {"gelu_new": 0, "gelu_pytorch_tanh": 0, "gelu_fast": 0, "gelu_tanh": 0, "silu": 1, "swish": 1,
        "gelu": 2, "relu": 3}


@dataclass
class ModelConfig:
    """Architecture and hyperparameters of a loaded model.

    Fields (shapes use L = n_layers, H = n_heads, dh = d_head):
        arch: Hugging Face architecture name, e.g. ``"LlamaForCausalLM"``.
        n_layers, n_heads, n_kv_heads, d_model, d_head, d_mlp, vocab_size, n_ctx: sizes.
        norm: ``"layernorm"`` or ``"rmsnorm"``; norm_eps: epsilon.
        act: activation name (``"gelu_new"``, ``"silu"``, ``"gelu_pytorch_tanh"`` ...); gated_mlp: SwiGLU/GeGLU.
        learned_pos: GPT-2 position embeddings; rope: rotary embeddings.
        rope_dim: rotated dims at the start of each head (0 = all dh; GPT-NeoX: int(dh * rotary_pct), GPT-J:
            rotary_dim); rope_interleaved: rotary pairs (2i, 2i+1) (GPT-J) instead of rotate-half (i, i + r/2).
        rope_inv_freq: (n_tables, r/2) float32 inverse frequencies (r = rope_dim or dh); rope_mscale:
            (n_tables,) cos/sin scale.
        layer_window: (L,) sliding-window size per layer, 0 = full attention; layer_rope: (L,) table index.
        qk_norm: per-head q/k RMSNorm; post_norms: Gemma's norms on sub-layer outputs.
        parallel: parallel residual block ``x + attn(ln1(x)) + mlp(ln2(x))`` (GPT-NeoX with
            use_parallel_residual, GPT-J with ln2 = ln1): both sub-blocks read resid_pre, no resid_mid.
        embed_scale: factor on token embeddings (Gemma: sqrt(d_model) in float32).
        attn_scale: factor on q.k scores; attn_softcap / final_softcap: 0 = none.
        tied: unembedding shares the token-embedding matrix; unembed_bias: the unembedding has a bias b_U
            (GPT-J's lm_head).
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
    rope_dim: int = 0
    rope_interleaved: bool = False
    layer_window: list = field(default_factory=list)
    layer_rope: list = field(default_factory=list)
    qk_norm: bool = False
    post_norms: bool = False
    parallel: bool = False
    embed_scale: float = 1.0
    attn_scale: float = 1.0
    attn_softcap: float = 0.0
    final_softcap: float = 0.0
    tied: bool = False
    attn_bias: bool = False      # q/k/v biases present
    o_bias: bool = False         # output projection bias
    mlp_bias: bool = False
    unembed_bias: bool = False   # lm_head bias b_U (GPT-J)
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
            parallel=int(self.parallel), rope_dim=int(self.rope_dim), rope_interleaved=int(self.rope_interleaved),
        )
        if self.rope:
            d["rope_inv_freq"] = np.ascontiguousarray(self.rope_inv_freq, dtype=np.float32)
            d["rope_mscale"] = np.ascontiguousarray(self.rope_mscale, dtype=np.float32)
        return d

    def summary(self) -> dict:
        """Plain-Python view of the main fields (for printing and reports)."""
        out = {k: v for k, v in asdict(self).items() if k not in ("raw", "rope_inv_freq", "rope_mscale")}
        return out


def from_hf_config(c: dict, where: str = "config.json") -> ModelConfig:
    """Build a :class:`ModelConfig` from a Hugging Face config dict, reading the architecture's entry of
    the table (``archs.ARCHS``).

    Raises :class:`ConfigError` naming ``where`` for unsupported architectures and bad values.

    Example:
        >>> from_hf_config({"architectures": ["LlamaForCausalLM"], "hidden_size": 64,
        ...     "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
        ...     "vocab_size": 100, "max_position_embeddings": 64}).n_kv_heads
        4
    """
    if not isinstance(c, dict):
        raise ConfigError(f"{where}: expected a JSON object")
    names = c.get("architectures") or []
    if not isinstance(names, list) or not all(isinstance(a, str) for a in names):
        raise ConfigError(f"{where}: architectures must be a list of strings, not {names!r:.80}")
    name = names[0] if names else None
    if name is None:
        mt = c.get("model_type")
        name = A.MODEL_TYPES.get(mt) if isinstance(mt, str) else None
    arch = A.lookup(name, where)
    try:
        return _build(c, arch, where)
    except ConfigError:
        raise
    except KeyError as e:
        raise ConfigError(f"{where}: config lacks {e}") from None
    except (TypeError, ValueError, AttributeError, ZeroDivisionError, OverflowError) as e:
        # backstop: a value of the wrong JSON type that no explicit check caught
        raise ConfigError(f"{where}: bad config value ({e})") from None


def read_key(c: dict, field_name: str, key: "A.Key", got: dict, where: str):
    """The value of one table :class:`~factrace.io.archs.Key` from config dict ``c``, checked."""
    for k in key.names:
        if c.get(k) is not None:
            v, name = c[k], k
            break
    else:
        if key.default is A.REQUIRED:
            raise ConfigError(f"{where}: config lacks '{key.names[0]}'")
        v = key.default(got, where) if callable(key.default) else key.default
        name = key.names[0] if key.names else field_name
        if key.check in ("str", "bool"):
            return v
    if key.check == "int":
        return pos_int(v, name, where, hi=key.hi)
    if key.check in ("num", "num0"):
        return num(v, name, where, zero_ok=key.check == "num0")
    if key.check == "bool":
        return bool(v)
    return v


def _build(c: dict, arch: "A.Arch", where: str) -> ModelConfig:
    for key, message in arch.reject:
        if c.get(key):
            raise ConfigError(f"{where}: {message}")
    got: dict = {}
    for f, key in arch.sizes.items():
        got[f] = read_key(c, f, key, got, where)
    H, KV, dh = got["n_heads"], got["n_kv_heads"], got["d_head"]
    if H % KV:
        raise ConfigError(f"{where}: num_attention_heads={H} is not a multiple of num_key_value_heads={KV}")
    act = read_key(c, "act", arch.act, got, where)
    if not isinstance(act, str) or act not in ACTS:
        raise ConfigError(f"{where}: activation {act!r:.80} is not supported (supported: {', '.join(ACTS)})")
    cfg = ModelConfig(arch=arch.name, act=act, tied=bool(c.get("tie_word_embeddings", arch.tied)),
                      bos_token_id=c.get("bos_token_id"), eos_token_id=c.get("eos_token_id"), raw=c, **got)
    for f, v in arch.flags.items():
        setattr(cfg, f, v)
    for f, key in arch.options.items():
        setattr(cfg, f, read_key(c, f, key, got, where))
    A.SCALE_RULES[arch.scales](c, cfg, where)
    windows = A.WINDOW_RULES[arch.windows](c, cfg, where)
    if len(windows) != cfg.n_layers:
        raise ConfigError(f"{where}: layer_types has {len(windows)} entries for {cfg.n_layers} layers")
    for w in windows:
        if isinstance(w, bool) or not isinstance(w, int) or not 0 <= w <= 1 << 30:
            raise ConfigError(f"{where}: sliding_window must be a non-negative integer, got {w!r}")
    cfg.layer_window = windows
    cfg.rope = arch.rope != "none"
    if cfg.rope and dh % 2:
        raise ConfigError(f"{where}: head_dim={dh} must be even for rotary embeddings")
    A.ROPE_RULES[arch.rope](c, cfg, where)
    return cfg
