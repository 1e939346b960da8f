"""The architecture table: every supported architecture is one :class:`Arch` entry that says, as data, how
it differs from the others.

An entry declares
* how its Hugging Face ``config.json`` keys map onto :class:`~factrace.io.config.ModelConfig` fields, with
  defaults (``sizes``, ``act``, ``options``),
* its fixed flags (``flags``: norm kind, gated MLP, learned positions, rotary, q/k norm, post-norms),
* which named rule computes what is not a plain key (``windows``, ``rope``, ``scales``: helpers below),
* its safetensors tensor names (``tensors``: one :class:`Tensor` per stored tensor, per-layer names with
  ``{i}``, transposes and fused-tensor splits as named transforms of ``weights.TRANSFORMS``),
* its GGUF architecture name, metadata keys and tensor names (``gguf``: a :class:`GGUFSpec`).

The config parser (``config.py``), the safetensors loader and the GGUF loader (``weights.py``) all read
the same entry; nothing outside this file branches on the architecture. To add an architecture, add an
entry (and, only if it computes something new, one C operation): see docs/ARCHITECTURE.md.

Example:
    >>> from factrace.io.archs import ARCHS
    >>> ARCHS["Qwen2ForCausalLM"].windows, ARCHS["Qwen2ForCausalLM"].gguf.arch
    ('qwen', 'qwen2')
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import numpy as np

from ..errors import ConfigError
from .checks import num, opt_dict, opt_str_list, pos_int, rope_inv_freq, rope_params, theta_scaling, window

REQUIRED = object()  # a Key default: the key must be present


@dataclass(frozen=True)
class Key:
    """A config.json value: the first of ``names`` that is present and not null, else ``default``
    (:data:`REQUIRED`: missing is an error; a callable ``f(values_so_far, where)``: derived from the fields
    read before it, see :func:`same_as`, :func:`times`, :func:`head_size`).
    ``check``: ``"int"`` (an integer in [1, hi]), ``"num"`` (finite > 0), ``"num0"`` (finite >= 0),
    ``"bool"`` (truthiness), ``"str"`` (any value, checked by the caller)."""

    names: tuple
    default: object = REQUIRED
    check: str = "int"
    hi: int = 1 << 24


def same_as(name: str):
    """A Key default: the value already read for another field (e.g. n_kv_heads = n_heads)."""
    return lambda got, where: got[name]


def times(name: str, k: int):
    """A Key default: k times another field (GPT-2's n_inner = 4 n_embd)."""
    return lambda got, where: k * got[name]


def head_size(got, where):
    """A Key default: d_model / n_heads, which must divide."""
    d, H = got["d_model"], got["n_heads"]
    if d % H:
        raise ConfigError(f"{where}: the model width {d} is not divisible by the number of heads {H}")
    return d // H


@dataclass(frozen=True)
class Tensor:
    """One stored tensor and the canonical tensor(s) it becomes (see docs/ARCHITECTURE.md for the
    canonical names and shapes).

    ``name``: the stored name, ``{i}`` for the layer index and ``{p}`` for the entry's name prefix;
    ``to``: the canonical name(s), per layer (``blocks.{i}.`` is prepended) unless ``glob`` is True;
    ``fn``: a named transform of ``weights.TRANSFORMS`` ("" = as stored, "T" = transpose, "split" / "T_split"
    = a fused tensor cut along its output rows into ``to``, "norm1p" ... );
    ``when``: a ModelConfig flag (``"!"`` negates) without which the tensor is not read (and a stored
    copy is unexpected); ``optional``: a flag under which the tensor may be absent (True: always).
    """

    name: str
    to: tuple
    fn: str = ""
    when: str | None = None
    optional: bool | str = False
    glob: bool = False


@dataclass(frozen=True)
class GGUFSpec:
    """How a GGUF file of this architecture maps onto the Hugging Face config and the canonical weights.

    ``arch``: the value of ``general.architecture``; ``keys``: HF config key -> (metadata key after the
    ``{arch}.`` prefix, default: a value, :data:`REQUIRED`, or a callable as for :class:`Key`); ``fixed``: HF config values that the
    GGUF format does not store; ``extra``: a named helper (``GGUF_EXTRAS``) for values derived from other
    metadata; ``tensors``: as :attr:`Arch.tensors`, with GGUF names."""

    arch: str
    keys: dict
    tensors: tuple
    fixed: dict = field(default_factory=dict)
    extra: str = ""


@dataclass(frozen=True)
class Arch:
    """One supported architecture (see the module docstring)."""

    name: str                       # Hugging Face architecture, e.g. "LlamaForCausalLM"
    model_types: tuple              # config.json model_type values that mean this architecture
    sizes: dict                     # ModelConfig size field -> Key
    act: Key                        # activation name (a key of config.ACTS)
    tensors: tuple                  # safetensors Tensor entries
    gguf: GGUFSpec | None = None
    flags: dict = field(default_factory=dict)    # fixed ModelConfig fields
    options: dict = field(default_factory=dict)  # ModelConfig flag -> Key read with check "bool"
    aliases: tuple = ()             # other HF architecture names loaded as this one
    prefixes: tuple = ("",)         # values of {p} in tensor names; the first whose tensors exist is used
    windows: str = "none"           # sliding-window rule: a key of WINDOW_RULES
    rope: str = "single"            # rotary rule: a key of ROPE_RULES
    scales: str = "default"         # attention / embedding scale rule: a key of SCALE_RULES
    tied: bool = False              # default of tie_word_embeddings
    reject: tuple = ()              # (config key, message): a truthy value is not supported


# ---------------------------------------------------------------------------------------------
# named rules: what a config implies beyond plain keys. Each takes (c: the HF dict, cfg: the ModelConfig
# being built, where: the file name) and sets fields of cfg.

def _windows_none(c, cfg, where):
    return [0] * cfg.n_layers


def _windows_mistral(c, cfg, where):
    """One sliding window on every layer, when ``sliding_window`` is set."""
    sw = c.get("sliding_window")
    return [window(sw, "sliding_window", where)] * cfg.n_layers if sw else [0] * cfg.n_layers


def _windows_qwen(c, cfg, where):
    """Qwen2/Qwen3: sliding windows only with ``use_sliding_window``, on the layers ``layer_types`` marks,
    or else on the layers from ``max_window_layers`` on."""
    L = cfg.n_layers
    if not (c.get("use_sliding_window") and c.get("sliding_window")):
        return [0] * L
    sw = window(c["sliding_window"], "sliding_window", where)
    mwl = pos_int(c.get("max_window_layers", L), "max_window_layers", where, lo=0)
    types = (opt_str_list(c, "layer_types", where, L)
             or ["sliding_attention" if i >= mwl else "full_attention" for i in range(L)])
    return [sw if t == "sliding_attention" else 0 for t in types]


def _windows_gemma(c, cfg, where):
    """Gemma 3: ``layer_types`` (or every ``sliding_window_pattern``-th layer full), window default 4096."""
    L = cfg.n_layers
    types = opt_str_list(c, "layer_types", where, L)
    if not types:
        pattern = pos_int(c.get("sliding_window_pattern", 6), "sliding_window_pattern", where)
        types = ["sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(L)]
    sw = window(c.get("sliding_window") or 4096, "sliding_window", where)
    return [sw if t == "sliding_attention" else 0 for t in types]


WINDOW_RULES = {"none": _windows_none, "mistral": _windows_mistral, "qwen": _windows_qwen, "gemma": _windows_gemma}


def _rope_none(c, cfg, where):
    """No rotary embeddings (GPT-2: learned positions)."""


def _rope_single(c, cfg, where):
    """One rotary table for every layer (theta from rope_theta / rope_parameters, optional scaling)."""
    theta, scaling = rope_params(c, where)
    inv, ms = rope_inv_freq(cfg.d_head, theta, scaling, where)
    cfg.rope_inv_freq, cfg.rope_mscale = inv[None, :], np.array([ms], np.float32)
    cfg.layer_rope = [0] * cfg.n_layers


def _rope_gemma(c, cfg, where):
    """Gemma 3: a global table for full-attention layers and a local one (base rope_local_base_freq,
    default 10000, no scaling) for sliding layers; or both from rope_parameters.{full,sliding}_attention."""
    rp = opt_dict(c, "rope_parameters", where)
    if rp is not None and "full_attention" in rp:
        g = opt_dict(rp, "full_attention", where)
        loc = opt_dict(rp, "sliding_attention", where) if "sliding_attention" in rp else g
        if g is None or loc is None:
            raise ConfigError(f"{where}: rope_parameters.full_attention/sliding_attention must be objects")
        (g_theta, g_scaling), (l_theta, l_scaling) = theta_scaling(g, where), theta_scaling(loc, where)
    else:
        g_theta, g_scaling = rope_params(c, where)
        l_theta, l_scaling = num(c.get("rope_local_base_freq", 10000.0), "rope_local_base_freq", where), None
    g_inv, g_ms = rope_inv_freq(cfg.d_head, g_theta, g_scaling, where)
    l_inv, l_ms = rope_inv_freq(cfg.d_head, l_theta, l_scaling, where)
    cfg.rope_inv_freq = np.stack([g_inv, l_inv])
    cfg.rope_mscale = np.array([g_ms, l_ms], np.float32)
    cfg.layer_rope = [1 if w else 0 for w in cfg.layer_window]


def _rotary_dims(rot, key, cfg, where) -> int:
    if not 2 <= rot <= cfg.d_head or rot % 2:
        raise ConfigError(f"{where}: {key} gives {rot} rotary dims per head; they must be even and in [2, {cfg.d_head}]")
    return rot


def _rope_neox(c, cfg, where):
    """GPT-NeoX: rotate-half on the first int(dh * partial_rotary_factor) dims of each head
    (rope_parameters, or the legacy rotary_pct, default 0.25), base rope_theta or rotary_emb_base (10000)."""
    theta, scaling = rope_params(c, where, theta_key="rotary_emb_base")
    rp = opt_dict(c, "rope_parameters", where) or {}
    key = "partial_rotary_factor" if "partial_rotary_factor" in rp else "rotary_pct"
    pct = num(rp.get(key, c.get(key, 0.25)), key, where)
    cfg.rope_dim = _rotary_dims(int(cfg.d_head * pct), key, cfg, where)
    inv, ms = rope_inv_freq(cfg.rope_dim, theta, scaling, where)
    cfg.rope_inv_freq, cfg.rope_mscale = inv[None, :], np.array([ms], np.float32)
    cfg.layer_rope = [0] * cfg.n_layers


def _rope_gptj(c, cfg, where):
    """GPT-J: interleaved pairs on the first rotary_dim dims of each head (default 64; null: the whole
    head), base 10000 (not configurable)."""
    rd = c.get("rotary_dim", 64)
    rot = cfg.d_head if rd is None else pos_int(rd, "rotary_dim", where)
    cfg.rope_dim = _rotary_dims(rot, "rotary_dim", cfg, where)
    inv, ms = rope_inv_freq(cfg.rope_dim, 10000.0, None, where)
    cfg.rope_inv_freq, cfg.rope_mscale = inv[None, :], np.array([ms], np.float32)
    cfg.layer_rope = [0] * cfg.n_layers


ROPE_RULES = {"none": _rope_none, "single": _rope_single, "gemma": _rope_gemma, "neox": _rope_neox,
              "gptj": _rope_gptj}


def _scales_default(c, cfg, where):
    cfg.attn_scale = 1.0 / math.sqrt(cfg.d_head)


def _scales_gpt2(c, cfg, where):
    """GPT-2: q.k / sqrt(dh) unless scale_attn_weights is false."""
    cfg.attn_scale = 1.0 / math.sqrt(cfg.d_head) if c.get("scale_attn_weights", True) else 1.0


def _scales_gemma(c, cfg, where):
    """Gemma 3: embeddings times sqrt(d) (rounded to float32), q.k times query_pre_attn_scalar^-1/2,
    attention and final logit soft-caps."""
    cfg.embed_scale = float(np.float32(cfg.d_model ** 0.5))
    cfg.attn_scale = num(c.get("query_pre_attn_scalar", cfg.d_head), "query_pre_attn_scalar", where) ** -0.5
    cfg.attn_softcap = num(c.get("attn_logit_softcapping") or 0.0, "attn_logit_softcapping", where, True)
    cfg.final_softcap = num(c.get("final_logit_softcapping") or 0.0, "final_logit_softcapping", where, True)


SCALE_RULES = {"default": _scales_default, "gpt2": _scales_gpt2, "gemma": _scales_gemma}


def _gguf_gemma_extra(md_get, c):
    """Gemma 3 GGUF: query_pre_attn_scalar follows the stored key length when there is one."""
    if "head_dim" in c:
        c["query_pre_attn_scalar"] = c["head_dim"]


def _gguf_neox_extra(md_get, c):
    """GPT-NeoX GGUF: llama.cpp stores the rotary dims (rope.dimension_count), transformers reads the
    fraction rotary_pct; chosen so that int(head_size * rotary_pct) gives the stored count back."""
    n_rot, d, H = md_get("rope.dimension_count"), c.get("hidden_size"), c.get("num_attention_heads")
    if all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) and v > 0 for v in (n_rot, d, H)) and d >= H:
        hs = int(d) // int(H)
        pct = int(n_rot) / hs
        c["rotary_pct"] = pct if int(hs * pct) == n_rot else (int(n_rot) + 0.5) / hs


GGUF_EXTRAS = {"": None, "gemma": _gguf_gemma_extra, "gptneox": _gguf_neox_extra}


# ---------------------------------------------------------------------------------------------
# config keys shared by several entries

GPT2_SIZES = dict(
    d_model=Key(("n_embd", "hidden_size")), n_layers=Key(("n_layer", "num_hidden_layers")),
    n_heads=Key(("n_head", "num_attention_heads")), n_kv_heads=Key((), same_as("n_heads")),
    vocab_size=Key(("vocab_size",)), n_ctx=Key(("n_positions", "n_ctx"), 1024),
    d_mlp=Key(("n_inner",), times("d_model", 4)), d_head=Key((), head_size), norm_eps=Key(("layer_norm_epsilon",), 1e-5, "num0"),
)
LLAMA_SIZES = dict(
    d_model=Key(("hidden_size",)), n_layers=Key(("num_hidden_layers",)), n_heads=Key(("num_attention_heads",)),
    n_kv_heads=Key(("num_key_value_heads",), same_as("n_heads")), vocab_size=Key(("vocab_size",)),
    d_mlp=Key(("intermediate_size",)), n_ctx=Key(("max_position_embeddings",), 2048, hi=1 << 30),
    d_head=Key(("head_dim",), head_size), norm_eps=Key(("rms_norm_eps",), 1e-6, "num0"),
)
ROTARY_RMS = dict(norm="rmsnorm", gated_mlp=True, learned_pos=False)
ATTN_BIAS_KEY = Key(("attention_bias",), False, "bool")

# GGUF metadata of the llama-like formats: HF key -> (metadata key after "{arch}.", default)
LLAMA_GGUF_KEYS = dict(
    hidden_size=("embedding_length", REQUIRED), num_hidden_layers=("block_count", REQUIRED),
    num_attention_heads=("attention.head_count", REQUIRED),
    num_key_value_heads=("attention.head_count_kv", same_as("num_attention_heads")),
    intermediate_size=("feed_forward_length", REQUIRED), max_position_embeddings=("context_length", 2048),
    rms_norm_eps=("attention.layer_norm_rms_epsilon", 1e-6), rope_theta=("rope.freq_base", 10000.0),
    head_dim=("attention.key_length", None),
)


# ---------------------------------------------------------------------------------------------
# tensor names

GPT2_TENSORS = (
    Tensor("{p}wte.weight", ("W_E",), glob=True),
    Tensor("{p}wpe.weight", ("W_pos",), glob=True),
    Tensor("{p}ln_f.weight", ("ln_f_w",), glob=True),
    Tensor("{p}ln_f.bias", ("ln_f_b",), glob=True),
    Tensor("lm_head.weight", ("W_U",), glob=True, when="!tied"),
    Tensor("{p}h.{i}.ln_1.weight", ("ln1_w",)),
    Tensor("{p}h.{i}.ln_1.bias", ("ln1_b",)),
    Tensor("{p}h.{i}.attn.c_attn.weight", ("W_Q", "W_K", "W_V"), "T_split"),  # Conv1D: (in, out)
    Tensor("{p}h.{i}.attn.c_attn.bias", ("b_Q", "b_K", "b_V"), "split"),
    Tensor("{p}h.{i}.attn.c_proj.weight", ("W_O",), "T"),
    Tensor("{p}h.{i}.attn.c_proj.bias", ("b_O",)),
    Tensor("{p}h.{i}.ln_2.weight", ("ln2_w",)),
    Tensor("{p}h.{i}.ln_2.bias", ("ln2_b",)),
    Tensor("{p}h.{i}.mlp.c_fc.weight", ("W_up",), "T"),
    Tensor("{p}h.{i}.mlp.c_fc.bias", ("b_up",)),
    Tensor("{p}h.{i}.mlp.c_proj.weight", ("W_down",), "T"),
    Tensor("{p}h.{i}.mlp.c_proj.bias", ("b_down",)),
)

GPT2_GGUF_TENSORS = (
    Tensor("token_embd.weight", ("W_E",), glob=True),
    Tensor("position_embd.weight", ("W_pos",), glob=True),
    Tensor("output_norm.weight", ("ln_f_w",), glob=True),
    Tensor("output_norm.bias", ("ln_f_b",), glob=True),
    Tensor("output.weight", ("W_U",), glob=True, when="!tied"),
    Tensor("blk.{i}.attn_norm.weight", ("ln1_w",)),
    Tensor("blk.{i}.attn_norm.bias", ("ln1_b",)),
    Tensor("blk.{i}.attn_qkv.weight", ("W_Q", "W_K", "W_V"), "split"),
    Tensor("blk.{i}.attn_qkv.bias", ("b_Q", "b_K", "b_V"), "split"),
    Tensor("blk.{i}.attn_output.weight", ("W_O",)),
    Tensor("blk.{i}.attn_output.bias", ("b_O",)),
    Tensor("blk.{i}.ffn_norm.weight", ("ln2_w",)),
    Tensor("blk.{i}.ffn_norm.bias", ("ln2_b",)),
    Tensor("blk.{i}.ffn_up.weight", ("W_up",)),
    Tensor("blk.{i}.ffn_up.bias", ("b_up",)),
    Tensor("blk.{i}.ffn_down.weight", ("W_down",)),
    Tensor("blk.{i}.ffn_down.bias", ("b_down",)),
)


def _neox_tensors() -> tuple:
    """GPTNeoXForCausalLM (Pythia): query_key_value fused per head (split_heads), untied embed_out."""
    b, a, m = "gpt_neox.layers.{i}.", "gpt_neox.layers.{i}.attention.", "gpt_neox.layers.{i}.mlp."
    return (
        Tensor("gpt_neox.embed_in.weight", ("W_E",), glob=True),
        Tensor("gpt_neox.final_layer_norm.weight", ("ln_f_w",), glob=True),
        Tensor("gpt_neox.final_layer_norm.bias", ("ln_f_b",), glob=True),
        Tensor("embed_out.weight", ("W_U",), glob=True, when="!tied"),
        Tensor(b + "input_layernorm.weight", ("ln1_w",)), Tensor(b + "input_layernorm.bias", ("ln1_b",)),
        Tensor(a + "query_key_value.weight", ("W_Q", "W_K", "W_V"), "split_heads"),
        Tensor(a + "query_key_value.bias", ("b_Q", "b_K", "b_V"), "split_heads", when="attn_bias"),
        Tensor(a + "dense.weight", ("W_O",)), Tensor(a + "dense.bias", ("b_O",), when="o_bias"),
        Tensor(b + "post_attention_layernorm.weight", ("ln2_w",)),
        Tensor(b + "post_attention_layernorm.bias", ("ln2_b",)),
        Tensor(m + "dense_h_to_4h.weight", ("W_up",)), Tensor(m + "dense_h_to_4h.bias", ("b_up",)),
        Tensor(m + "dense_4h_to_h.weight", ("W_down",)), Tensor(m + "dense_4h_to_h.bias", ("b_down",)),
    )


def _gptj_tensors() -> tuple:
    """GPTJForCausalLM: one ln_1 feeding attention and MLP (both canonical norms), no attention biases,
    lm_head with a bias."""
    b = "{p}h.{i}."
    return (
        Tensor("{p}wte.weight", ("W_E",), glob=True),
        Tensor("{p}ln_f.weight", ("ln_f_w",), glob=True), Tensor("{p}ln_f.bias", ("ln_f_b",), glob=True),
        Tensor("lm_head.weight", ("W_U",), glob=True, when="!tied"),
        Tensor("lm_head.bias", ("b_U",), glob=True, when="unembed_bias"),
        Tensor(b + "ln_1.weight", ("ln1_w", "ln2_w"), "dup"), Tensor(b + "ln_1.bias", ("ln1_b", "ln2_b"), "dup"),
        Tensor(b + "attn.q_proj.weight", ("W_Q",)), Tensor(b + "attn.k_proj.weight", ("W_K",)),
        Tensor(b + "attn.v_proj.weight", ("W_V",)), Tensor(b + "attn.out_proj.weight", ("W_O",)),
        Tensor(b + "mlp.fc_in.weight", ("W_up",)), Tensor(b + "mlp.fc_in.bias", ("b_up",)),
        Tensor(b + "mlp.fc_out.weight", ("W_down",)), Tensor(b + "mlp.fc_out.bias", ("b_down",)),
    )


# llama.cpp's gptneox GGUF: GPT-2's names without learned positions (its converter reorders the per-head
# query_key_value into q rows, k rows, v rows: a plain split); attention biases only if the model has them
NEOX_GGUF_TENSORS = tuple(replace(t, optional=True) if t.to in (("b_Q", "b_K", "b_V"), ("b_O",)) else t
                          for t in GPT2_GGUF_TENSORS if t.to != ("W_pos",))


def _llama_tensors(norm: str = "", post_norms: bool = False) -> tuple:
    """The model.layers.{i}.* names of Llama-like checkpoints. ``norm``: the transform of every norm weight
    (Gemma: "norm1p"); ``post_norms``: Gemma's four norms per layer (its post_attention_layernorm is the
    attention output's post-norm, not the norm before the MLP)."""
    a, m = "model.layers.{i}.self_attn.", "model.layers.{i}.mlp."
    out = [
        Tensor("model.embed_tokens.weight", ("W_E",), glob=True),
        Tensor("model.norm.weight", ("ln_f_w",), norm, glob=True),
        Tensor("lm_head.weight", ("W_U",), glob=True, when="!tied"),
        Tensor("model.layers.{i}.input_layernorm.weight", ("ln1_w",), norm),
        Tensor(a + "q_proj.weight", ("W_Q",)), Tensor(a + "k_proj.weight", ("W_K",)),
        Tensor(a + "v_proj.weight", ("W_V",)), Tensor(a + "o_proj.weight", ("W_O",)),
        Tensor(a + "q_proj.bias", ("b_Q",), optional="!attn_bias"),
        Tensor(a + "k_proj.bias", ("b_K",), optional="!attn_bias"),
        Tensor(a + "v_proj.bias", ("b_V",), optional="!attn_bias"),
        Tensor(a + "o_proj.bias", ("b_O",), optional="!o_bias"),
        Tensor(a + "q_norm.weight", ("q_norm_w",), norm, when="qk_norm"),
        Tensor(a + "k_norm.weight", ("k_norm_w",), norm, when="qk_norm"),
        Tensor(m + "gate_proj.weight", ("W_gate",)), Tensor(m + "up_proj.weight", ("W_up",)),
        Tensor(m + "down_proj.weight", ("W_down",)),
        Tensor(m + "gate_proj.bias", ("b_gate",), optional="!mlp_bias"),
        Tensor(m + "up_proj.bias", ("b_up",), optional="!mlp_bias"),
        Tensor(m + "down_proj.bias", ("b_down",), optional="!mlp_bias"),
    ]
    if post_norms:
        out += [Tensor("model.layers.{i}.post_attention_layernorm.weight", ("post_attn_norm_w",), norm),
                Tensor("model.layers.{i}.pre_feedforward_layernorm.weight", ("ln2_w",), norm),
                Tensor("model.layers.{i}.post_feedforward_layernorm.weight", ("post_mlp_norm_w",), norm)]
    else:
        out.append(Tensor("model.layers.{i}.post_attention_layernorm.weight", ("ln2_w",), norm))
    return tuple(out)


def _llama_gguf_tensors(qk: str = "", norm: str = "", post_norms: bool = False) -> tuple:
    """The blk.{i}.* names llama.cpp writes for Llama-like models. ``qk``: the transform of the Q/K rows
    ("unpermute" for llama.cpp's llama converter); ``norm``: of the norm weights (Gemma: "gguf_norm1p")."""
    b = "blk.{i}."
    q, k = ("unpermute_q", "unpermute_k") if qk else ("", "")
    out = [
        Tensor("token_embd.weight", ("W_E",), glob=True),
        Tensor("output_norm.weight", ("ln_f_w",), norm, glob=True),
        Tensor("output.weight", ("W_U",), glob=True, when="!tied"),
        Tensor(b + "attn_norm.weight", ("ln1_w",), norm),
        Tensor(b + "attn_q.weight", ("W_Q",), q), Tensor(b + "attn_k.weight", ("W_K",), k),
        Tensor(b + "attn_v.weight", ("W_V",)), Tensor(b + "attn_output.weight", ("W_O",)),
        Tensor(b + "attn_q.bias", ("b_Q",), q, optional=True), Tensor(b + "attn_k.bias", ("b_K",), k, optional=True),
        Tensor(b + "attn_v.bias", ("b_V",), optional=True), Tensor(b + "attn_output.bias", ("b_O",), optional=True),
        Tensor(b + "attn_q_norm.weight", ("q_norm_w",), norm, when="qk_norm"),
        Tensor(b + "attn_k_norm.weight", ("k_norm_w",), norm, when="qk_norm"),
        Tensor(b + "ffn_norm.weight", ("ln2_w",), norm),
        Tensor(b + "ffn_gate.weight", ("W_gate",)), Tensor(b + "ffn_up.weight", ("W_up",)),
        Tensor(b + "ffn_down.weight", ("W_down",)),
    ]
    if post_norms:
        out += [Tensor(b + "post_attention_norm.weight", ("post_attn_norm_w",), norm),
                Tensor(b + "post_ffw_norm.weight", ("post_mlp_norm_w",), norm)]
    return tuple(out)


# ---------------------------------------------------------------------------------------------
# the table

_ENTRIES = (
    Arch(
        name="GPT2LMHeadModel", model_types=("gpt2",), aliases=("GPT2Model",),
        sizes=GPT2_SIZES, act=Key(("activation_function",), "gelu_new", "str"),
        flags=dict(norm="layernorm", gated_mlp=False, learned_pos=True, attn_bias=True, o_bias=True, mlp_bias=True),
        rope="none", scales="gpt2", tied=True, prefixes=("transformer.", ""),
        reject=(("scale_attn_by_inverse_layer_idx", "scale_attn_by_inverse_layer_idx=True is not supported"),),
        tensors=GPT2_TENSORS,
        gguf=GGUFSpec("gpt2", dict(
            n_embd=("embedding_length", REQUIRED), n_layer=("block_count", REQUIRED),
            n_head=("attention.head_count", REQUIRED), n_positions=("context_length", 1024),
            n_inner=("feed_forward_length", times("n_embd", 4)), layer_norm_epsilon=("attention.layer_norm_epsilon", 1e-5)),
            GPT2_GGUF_TENSORS),
    ),
    Arch(
        name="LlamaForCausalLM", model_types=("llama",), sizes=LLAMA_SIZES, act=Key(("hidden_act",), "silu", "str"),
        flags=ROTARY_RMS, options=dict(attn_bias=ATTN_BIAS_KEY, o_bias=ATTN_BIAS_KEY,
                                       mlp_bias=Key(("mlp_bias",), False, "bool")),
        tensors=_llama_tensors(), gguf=GGUFSpec("llama", LLAMA_GGUF_KEYS, _llama_gguf_tensors(qk="unpermute")),
    ),
    Arch(
        name="Qwen2ForCausalLM", model_types=("qwen2",), sizes=LLAMA_SIZES, act=Key(("hidden_act",), "silu", "str"),
        flags=dict(ROTARY_RMS, attn_bias=True), windows="qwen",
        tensors=_llama_tensors(), gguf=GGUFSpec("qwen2", LLAMA_GGUF_KEYS, _llama_gguf_tensors()),
    ),
    Arch(
        name="Qwen3ForCausalLM", model_types=("qwen3",), sizes=LLAMA_SIZES, act=Key(("hidden_act",), "silu", "str"),
        flags=dict(ROTARY_RMS, qk_norm=True), options=dict(attn_bias=ATTN_BIAS_KEY, o_bias=ATTN_BIAS_KEY),
        windows="qwen", tensors=_llama_tensors(), gguf=GGUFSpec("qwen3", LLAMA_GGUF_KEYS, _llama_gguf_tensors()),
    ),
    Arch(
        name="MistralForCausalLM", model_types=("mistral",), sizes=LLAMA_SIZES,
        act=Key(("hidden_act",), "silu", "str"), flags=ROTARY_RMS, windows="mistral", tensors=_llama_tensors(),
        gguf=GGUFSpec("mistral", dict(LLAMA_GGUF_KEYS, sliding_window=("attention.sliding_window", None)),
                      _llama_gguf_tensors()),
    ),
    Arch(
        name="Gemma3ForCausalLM", model_types=("gemma3_text",), sizes=LLAMA_SIZES,
        act=Key(("hidden_activation", "hidden_act"), "gelu_pytorch_tanh", "str"),
        flags=dict(ROTARY_RMS, qk_norm=True, post_norms=True), windows="gemma", rope="gemma", scales="gemma",
        tied=True, tensors=_llama_tensors(norm="norm1p", post_norms=True),
        gguf=GGUFSpec("gemma3", dict(LLAMA_GGUF_KEYS, sliding_window=("attention.sliding_window", 4096)),
                      _llama_gguf_tensors(norm="gguf_norm1p", post_norms=True),
                      fixed=dict(hidden_activation="gelu_pytorch_tanh", query_pre_attn_scalar=256,
                                 rope_local_base_freq=10000.0, tie_word_embeddings=True, sliding_window_pattern=6),
                      extra="gemma"),
    ),
    Arch(
        name="GPTNeoXForCausalLM", model_types=("gpt_neox",), act=Key(("hidden_act",), "gelu", "str"),
        sizes=dict(LLAMA_SIZES, n_kv_heads=Key((), same_as("n_heads")), d_head=Key((), head_size),
                   norm_eps=Key(("layer_norm_eps",), 1e-5, "num0")),
        flags=dict(norm="layernorm", gated_mlp=False, learned_pos=False, mlp_bias=True),
        options=dict(parallel=Key(("use_parallel_residual",), True, "bool"),
                     attn_bias=Key(("attention_bias",), True, "bool"), o_bias=Key(("attention_bias",), True, "bool")),
        rope="neox", tensors=_neox_tensors(),
        gguf=GGUFSpec("gptneox", dict(
            hidden_size=("embedding_length", REQUIRED), num_hidden_layers=("block_count", REQUIRED),
            num_attention_heads=("attention.head_count", REQUIRED), intermediate_size=("feed_forward_length", REQUIRED),
            max_position_embeddings=("context_length", 2048), layer_norm_eps=("attention.layer_norm_epsilon", 1e-5),
            rotary_emb_base=("rope.freq_base", 10000.0), use_parallel_residual=("use_parallel_residual", True)),
            NEOX_GGUF_TENSORS, fixed=dict(hidden_act="gelu"), extra="gptneox"),
    ),
    Arch(
        name="GPTJForCausalLM", model_types=("gptj",), act=Key(("activation_function",), "gelu_new", "str"),
        sizes=dict(GPT2_SIZES, n_ctx=Key(("n_positions",), 2048)), rope="gptj", prefixes=("transformer.",),
        flags=dict(norm="layernorm", gated_mlp=False, learned_pos=False, parallel=True, rope_interleaved=True,
                   mlp_bias=True, unembed_bias=True),
        tensors=_gptj_tensors(),  # llama.cpp's converter writes no GPT-J GGUF (see docs/ARCHITECTURE.md)
    ),
)

ARCHS: dict = {a.name: a for a in _ENTRIES}
"""Hugging Face architecture name -> :class:`Arch`."""

SUPPORTED_ARCHS: tuple = tuple(ARCHS)
MODEL_TYPES: dict = {mt: a.name for a in _ENTRIES for mt in a.model_types}
ALIASES: dict = {al: a.name for a in _ENTRIES for al in a.aliases}
GGUF_ARCHS: dict = {a.gguf.arch: a for a in _ENTRIES if a.gguf is not None}
"""GGUF ``general.architecture`` -> :class:`Arch`."""


def lookup(name: str | None, where: str) -> Arch:
    """The entry for a Hugging Face architecture name (or an alias); ConfigError listing the supported ones."""
    name = ALIASES.get(name, name)
    if name not in ARCHS:
        raise ConfigError(f"{where}: architecture {name!r} is not supported; supported: {', '.join(SUPPORTED_ARCHS)}")
    return ARCHS[name]
