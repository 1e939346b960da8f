"""Hugging Face oracle for the factrace tests.

Builds tiny, deterministic, randomly initialised checkpoints with `transformers` (``build``) and runs them
with Hugging Face's own eager float32 implementation, capturing every part of the residual stream
(``hf_run``).  torch / transformers / tokenizers are imported lazily, inside the functions, so that this
module can be imported (e.g. for ``SPECS``) without them; the default test run only uses the committed
fixtures in tests/fixtures/models written by tests/make_fixtures.py.

Capture definitions (T tokens, L layers, d hidden, H query heads, dh head dim, V vocab), all float32:

    logits      (T, V)        the model's output logits (after Gemma's final softcapping, if any).
    embed       (T, d)        the input hidden_states of decoder block 0 (GPT-2: wte + wpe; Gemma 3:
                              embedding * sqrt(d), the scale rounded to the weight dtype = float32).
    resid_pre   (L, T, d)     the input hidden_states of each decoder block (resid_pre[0] == embed).
    attn_out    (L, T, d)     what the attention sub-block adds to the residual stream: output[0] of the
                              attention module (GPT-2 ``attn``: c_proj incl. its bias; Llama/Qwen/Mistral
                              ``self_attn``: o_proj incl. bias if any; GPT-NeoX ``attention``: dense;
                              GPT-J ``attn``: out_proj); Gemma 3: the OUTPUT of
                              ``post_attention_layernorm``.
    mlp_out     (L, T, d)     likewise for the MLP (``mlp`` output; Gemma 3: ``post_feedforward_layernorm``
                              output).
    resid_final (T, d)        the input of the final norm (``ln_f`` / ``norm``) = output of the last block.
    attn        (L, H, T, T)  attention probabilities (``output_attentions=True``; after softmax, rows
                              sum to 1, masked entries are exactly 0).
    attn_z      (L, T, H*dh)  the input of the attention output projection (``attn.c_proj`` / ``o_proj``),
                              head-major (head h is columns h*dh:(h+1)*dh), so head h's contribution to
                              attn_out is attn_z[:, h*dh:(h+1)*dh] @ W_O[:, h*dh:(h+1)*dh].T (+ b_O once).
"""

from __future__ import annotations

import json
import os
import shutil

import numpy as np

# ----------------------------------------------------------------------------------------------------------
# Specs
# ----------------------------------------------------------------------------------------------------------
#
# Each spec:
#   arch          transformers class name (…ForCausalLM / GPT2LMHeadModel)
#   config_class  transformers config class name
#   config        kwargs for the config class
#   dtype         storage dtype of the safetensors ("float32", "bfloat16", "float16")
#   shard_size    max_shard_size for save_pretrained (None = single model.safetensors)
#   tied          tie_word_embeddings (also in config)
#   seed          torch seed for the random init
#   special       special tokens of the tokenizer, in id order (they get ids 0, 1, ...)
#   scale         std of linear weights / embeddings / biases and spread of norm weights
#   noprefix      GPT-2 only: rewrite the file like openai-community/gpt2 (no "transformer." prefix, no
#                 lm_head, with h.N.attn.bias / h.N.attn.masked_bias buffers)
#   legacy_config rewrite config.json the way pre-v5 checkpoints on the Hub look: "rope_theta" and
#                 "rope_scaling" (and for Gemma 3 "rope_local_base_freq"; for GPT-NeoX "rotary_pct" and
#                 "rotary_emb_base", without "attention_bias", like Pythia's) instead of transformers 5's
#                 "rope_parameters", and "torch_dtype" instead of "dtype".
#   prompt_lens   lengths of the two fixture prompts
#   covers        one line for tests/fixtures/models/README.md

V = 300  # vocab size of every fixture
NPOS = 64

_DEFAULT_SCALE = {"linear": 0.2, "embed": 0.3, "bias": 0.1, "norm": 0.25}

SPECS: dict[str, dict] = {
    "gpt2": dict(
        arch="GPT2LMHeadModel", config_class="GPT2Config",
        config=dict(vocab_size=V, n_positions=NPOS, n_embd=32, n_layer=2, n_head=4, n_inner=None,
                    activation_function="gelu_new", layer_norm_epsilon=1e-5,
                    bos_token_id=0, eos_token_id=0, tie_word_embeddings=True),
        dtype="float32", shard_size=None, tied=True, seed=1, special=["<|endoftext|>"],
        covers="GPT-2 as written by GPT2LMHeadModel.save_pretrained: 'transformer.' prefix, Conv1D weights, "
               "learned positions, LayerNorm with biases, gelu_new, tied lm_head (not stored), fp32.",
    ),
    "gpt2_noprefix": dict(
        arch="GPT2LMHeadModel", config_class="GPT2Config",
        config=dict(vocab_size=V, n_positions=NPOS, n_embd=32, n_layer=2, n_head=4, n_inner=None,
                    activation_function="gelu_new", layer_norm_epsilon=1e-5,
                    bos_token_id=0, eos_token_id=0, tie_word_embeddings=True),
        dtype="float32", shard_size=None, tied=True, seed=2, special=["<|endoftext|>"],
        noprefix=True, legacy_config=True,
        covers="GPT-2 laid out like openai-community/gpt2's model.safetensors: no 'transformer.' prefix, no "
               "lm_head, extra h.N.attn.bias (1,1,64,64) and h.N.attn.masked_bias buffers to be ignored.",
    ),
    "llama_gqa2_tied": dict(
        arch="LlamaForCausalLM", config_class="LlamaConfig",
        config=dict(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=NPOS,
                    rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=True,
                    bos_token_id=0, eos_token_id=1),
        dtype="float32", shard_size=None, tied=True, seed=3, special=["<s>", "</s>"],
        covers="Llama, GQA with 2 query heads per kv head, tied embeddings (no lm_head stored), default "
               "RoPE theta 1e4, fp32, transformers-5 config (rope_parameters).",
    ),
    "llama_gqa4_llama3rope_bf16": dict(
        arch="LlamaForCausalLM", config_class="LlamaConfig",
        config=dict(vocab_size=V, hidden_size=64, intermediate_size=64, num_hidden_layers=2,
                    num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=NPOS,
                    rms_norm_eps=1e-5, rope_theta=500000.0,
                    rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                  "high_freq_factor": 4.0, "original_max_position_embeddings": 16},
                    tie_word_embeddings=False, bos_token_id=0, eos_token_id=1),
        dtype="bfloat16", shard_size=None, tied=False, seed=4,
        special=["<|begin_of_text|>", "<|end_of_text|>"], legacy_config=True,
        covers="Llama 3 style: GQA 4 query heads per kv head, untied lm_head, llama3 rope_scaling (factor 8, "
               "orig 16, theta 5e5), weights stored bf16, legacy config keys (rope_theta/rope_scaling).",
    ),
    "llama_linear_rope_f16_headdim": dict(
        arch="LlamaForCausalLM", config_class="LlamaConfig",
        config=dict(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=4, head_dim=12,
                    max_position_embeddings=NPOS, rms_norm_eps=1e-6, rope_theta=10000.0,
                    rope_scaling={"rope_type": "linear", "factor": 2.0},
                    attention_bias=True, mlp_bias=True, tie_word_embeddings=False,
                    bos_token_id=0, eos_token_id=1),
        dtype="float16", shard_size=None, tied=False, seed=5, special=["<s>", "</s>"],
        covers="Llama MHA with explicit head_dim 12 != 32/4, linear RoPE scaling factor 2, attention_bias "
               "(q,k,v,o biases) and mlp_bias, weights stored f16, transformers-5 config.",
    ),
    "llama_sharded": dict(
        arch="LlamaForCausalLM", config_class="LlamaConfig",
        config=dict(vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
                    num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=NPOS,
                    rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False,
                    bos_token_id=0, eos_token_id=1),
        dtype="float32", shard_size="40KB", tied=False, seed=6, special=["<s>", "</s>"],
        covers="Llama MHA, 3 layers, untied, fp32, sharded into several model-0000k-of-0000n.safetensors "
               "files with model.safetensors.index.json.",
    ),
    "qwen2": dict(
        arch="Qwen2ForCausalLM", config_class="Qwen2Config",
        config=dict(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=NPOS,
                    rms_norm_eps=1e-6, rope_theta=1000000.0, tie_word_embeddings=True,
                    use_sliding_window=False, bos_token_id=0, eos_token_id=0),
        dtype="float32", shard_size=None, tied=True, seed=7, special=["<|endoftext|>"],
        covers="Qwen2 / Qwen2.5-0.5B style: q/k/v biases (no o bias), GQA 2 per kv head, tied, theta 1e6.",
    ),
    "qwen3": dict(
        arch="Qwen3ForCausalLM", config_class="Qwen3Config",
        config=dict(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                    max_position_embeddings=NPOS, rms_norm_eps=1e-6, rope_theta=1000000.0,
                    tie_word_embeddings=True, bos_token_id=0, eos_token_id=0),
        dtype="float32", shard_size=None, tied=True, seed=8, special=["<|endoftext|>"],
        covers="Qwen3: per-head q_norm/k_norm RMSNorm, explicit head_dim 16 (H*dh=64 != d=32), GQA, tied.",
    ),
    "mistral": dict(
        arch="MistralForCausalLM", config_class="MistralConfig",
        config=dict(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                    max_position_embeddings=NPOS, rms_norm_eps=1e-5, rope_theta=10000.0,
                    sliding_window=4, tie_word_embeddings=False, bos_token_id=0, eos_token_id=1),
        dtype="float32", shard_size=None, tied=False, seed=9, special=["<s>", "</s>"],
        covers="Mistral: GQA, untied, sliding_window=4 on every layer (key j visible from query i iff "
               "i-4 < j <= i); prompt p1 is longer than the window.",
    ),
    "gemma3": dict(
        arch="Gemma3ForCausalLM", config_class="Gemma3TextConfig",
        config=dict(vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
                    num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                    max_position_embeddings=NPOS, rms_norm_eps=1e-6,
                    rope_theta=1000000.0, rope_local_base_freq=10000.0, rope_scaling=None,
                    query_pre_attn_scalar=12, sliding_window=4,
                    layer_types=["sliding_attention", "full_attention", "sliding_attention"],
                    hidden_activation="gelu_pytorch_tanh", final_logit_softcapping=None,
                    attn_logit_softcapping=None, tie_word_embeddings=True,
                    pad_token_id=0, eos_token_id=1, bos_token_id=2),
        dtype="float32", shard_size=None, tied=True, seed=10, special=["<pad>", "<eos>", "<bos>"],
        legacy_config=True,
        covers="Gemma 3 text (1B style): embed*sqrt(d), (1+w) RMSNorms incl. q/k norms and post-attn/post-mlp "
               "norms, layers sliding/full/sliding with window 4, local theta 1e4 vs global 1e6, "
               "query_pre_attn_scalar 12 != head_dim 16, gelu_pytorch_tanh, tied, legacy config keys.",
    ),
    "gemma3_linear_rope": dict(
        arch="Gemma3ForCausalLM", config_class="Gemma3TextConfig",
        config=dict(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=1, head_dim=8,
                    max_position_embeddings=NPOS, rms_norm_eps=1e-6,
                    rope_theta=1000000.0, rope_local_base_freq=10000.0,
                    rope_scaling={"rope_type": "linear", "factor": 8.0},
                    query_pre_attn_scalar=8, sliding_window=4,
                    layer_types=["full_attention", "sliding_attention"],
                    hidden_activation="gelu_pytorch_tanh", final_logit_softcapping=None,
                    attn_logit_softcapping=None, tie_word_embeddings=True,
                    pad_token_id=0, eos_token_id=1, bos_token_id=2),
        dtype="bfloat16", shard_size=None, tied=True, seed=11, special=["<pad>", "<eos>", "<bos>"],
        covers="Gemma 3 4B+ style: linear rope_scaling factor 8 applied to full-attention layers only (sliding "
               "layers use plain theta 1e4), MQA (1 kv head), full layer first, bf16 storage, "
               "transformers-5 config (per-layer-type rope_parameters).",
    ),
    "pythia_parallel": dict(
        arch="GPTNeoXForCausalLM", config_class="GPTNeoXConfig",
        config=dict(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                    num_attention_heads=2, max_position_embeddings=NPOS, layer_norm_eps=1e-5,
                    rotary_pct=0.25, rotary_emb_base=5000, hidden_act="gelu", use_parallel_residual=True,
                    tie_word_embeddings=False, bos_token_id=0, eos_token_id=0),
        dtype="float16", shard_size=None, tied=False, seed=12, special=["<|endoftext|>"], legacy_config=True,
        covers="GPT-NeoX / Pythia: parallel residual, query_key_value fused per head, rotary on the first 4 of "
               "16 head dims (rotary_pct 0.25, rotary_emb_base 5000), exact gelu, LayerNorm and attention/MLP "
               "biases, untied embed_out, f16 storage, Pythia's legacy config keys.",
    ),
    "neox_sequential": dict(
        arch="GPTNeoXForCausalLM", config_class="GPTNeoXConfig",
        config=dict(vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
                    num_attention_heads=4, max_position_embeddings=NPOS, layer_norm_eps=1e-5,
                    rotary_pct=1.0, rotary_emb_base=10000, hidden_act="gelu_new", use_parallel_residual=False,
                    attention_bias=False, tie_word_embeddings=False, bos_token_id=0, eos_token_id=0),
        dtype="float32", shard_size="40KB", tied=False, seed=13, special=["<|endoftext|>"],
        covers="GPT-NeoX sequential block (use_parallel_residual false), rotary on the whole head (rotary_pct "
               "1.0), gelu_new, attention_bias false (MLP biases only), 3 layers, fp32, sharded, "
               "transformers-5 config (rope_parameters with partial_rotary_factor).",
    ),
    "gptj": dict(
        arch="GPTJForCausalLM", config_class="GPTJConfig",
        config=dict(vocab_size=V, n_positions=NPOS, n_embd=32, n_layer=2, n_head=4, rotary_dim=4, n_inner=None,
                    activation_function="gelu_new", layer_norm_epsilon=1e-5, tie_word_embeddings=False,
                    bos_token_id=0, eos_token_id=0),
        dtype="bfloat16", shard_size=None, tied=False, seed=14, special=["<|endoftext|>"],
        covers="GPT-J: parallel block with one shared ln_1, no q/k/v/out biases, interleaved rotary on the "
               "first 4 of 8 head dims (rotary_dim), gelu_new, lm_head with a bias, bf16 storage.",
    ),
}


# ----------------------------------------------------------------------------------------------------------
# Tokenizer
# ----------------------------------------------------------------------------------------------------------

CORPUS = """\
The quick brown fox jumps over the lazy dog. The dog did not care, and the fox ran back into the forest
where the trees were tall and the light came through the leaves in thin green lines.

In the morning the town woke slowly. The baker opened the shop, the children walked to school, and the
old man on the corner read the newspaper while his coffee grew cold. Nobody was in a hurry on that day.

Language models predict the next token from the tokens that came before it. Each layer reads from the
residual stream and writes back into it, so the final state is the sum of what every part has written.
Attention heads move information between positions, and the feed forward layers transform it in place.

The capital of France is Paris. The capital of Italy is Rome. The capital of Germany is Berlin, and the
capital of Spain is Madrid. Water boils at one hundred degrees and freezes at zero on the Celsius scale.

She said that the meeting would start at nine, but the train was late and they arrived at half past ten.
There was still time to talk about the plan, the budget, the people they needed, and the work ahead.
"""


def build_tokenizer(vocab_size: int, special: list[str]):
    """A tiny byte-level BPE (GPT-2 style pre-tokenizer) trained on CORPUS; special tokens get ids 0.."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(special),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False, min_frequency=1)
    tok.train_from_iterator(CORPUS.splitlines(keepends=True), trainer=trainer)
    if tok.get_vocab_size() != vocab_size:
        raise RuntimeError(f"tokenizer has {tok.get_vocab_size()} tokens, wanted {vocab_size}")
    return tok


# ----------------------------------------------------------------------------------------------------------
# Build
# ----------------------------------------------------------------------------------------------------------

def _randomise(model, spec):
    """Deterministically re-initialise all parameters with large enough values (see module doc)."""
    import torch

    sc = dict(_DEFAULT_SCALE)
    sc.update(spec.get("scale", {}))
    gemma = spec["arch"].startswith("Gemma")
    g = torch.Generator().manual_seed(spec["seed"])
    with torch.no_grad():
        for name, p in sorted(model.named_parameters(), key=lambda kv: kv[0]):
            shape = tuple(p.shape)
            r = torch.randn(shape, generator=g, dtype=torch.float32)
            leaf = name.rsplit(".", 1)[0].rsplit(".", 1)[-1]
            is_norm = ("norm" in leaf) or leaf.startswith("ln_") or leaf == "ln_f"
            if is_norm and name.endswith("weight"):
                # Gemma stores w and applies (1 + w): keep (1 + w) around 1 as well.
                v = r * sc["norm"] if gemma else 1.0 + r * sc["norm"]
            elif is_norm:  # LayerNorm bias
                v = r * sc["bias"]
            elif name.endswith("bias"):
                v = r * sc["bias"]
            elif p.dim() == 2 and ("wte" in name or "wpe" in name or "embed" in name or "lm_head" in name):
                v = r * sc["embed"]
            else:
                v = r * sc["linear"]
            p.copy_(v.to(p.dtype))


def _legacy_config(cfg: dict, spec: dict) -> dict:
    """Rewrite a transformers-5 config.json dict into the pre-v5 layout found on the Hub."""
    out = {}
    if cfg.get("model_type") == "gpt_neox":  # Pythia: rotary_pct / rotary_emb_base, no attention_bias key
        rp = cfg.pop("rope_parameters")
        out["rotary_pct"], out["rotary_emb_base"] = rp["partial_rotary_factor"], rp["rope_theta"]
        if cfg.get("attention_bias") is True:
            del cfg["attention_bias"]
    for k, v in cfg.items():
        if k == "dtype":
            out["torch_dtype"] = v
        elif k == "rope_parameters":
            rp = v
            if isinstance(rp, dict) and "full_attention" in rp:  # Gemma 3: per layer type
                full = dict(rp["full_attention"])
                out["rope_theta"] = full.pop("rope_theta")
                out["rope_local_base_freq"] = rp["sliding_attention"]["rope_theta"]
                out["rope_scaling"] = None if full.get("rope_type", "default") == "default" else full
            elif isinstance(rp, dict):
                rp = dict(rp)
                out["rope_theta"] = rp.pop("rope_theta")
                out["rope_scaling"] = None if rp.get("rope_type", "default") == "default" else rp
        else:
            out[k] = v
    return out


def _gpt2_noprefix(out_dir: str, n_layer: int, n_pos: int):
    """Rewrite model.safetensors like openai-community/gpt2 (no prefix, no lm_head, attn buffers)."""
    import torch
    from safetensors.torch import load_file, save_file

    path = os.path.join(out_dir, "model.safetensors")
    sd = load_file(path)
    new = {}
    for k, v in sd.items():
        if k.startswith("lm_head."):
            continue
        new[k[len("transformer."):] if k.startswith("transformer.") else k] = v.contiguous()
    tril = torch.tril(torch.ones((n_pos, n_pos), dtype=torch.float32)).view(1, 1, n_pos, n_pos)
    for i in range(n_layer):
        new[f"h.{i}.attn.bias"] = tril.clone()
        new[f"h.{i}.attn.masked_bias"] = torch.tensor(-1e4, dtype=torch.float32)
    save_file(new, path, metadata={"format": "pt"})


def build(name: str, out_dir: str) -> str:
    """Write the checkpoint for SPECS[name] into out_dir (cleared first). Deterministic. Returns out_dir."""
    import torch
    import transformers
    from transformers import PreTrainedTokenizerFast

    spec = SPECS[name]
    if os.path.isdir(out_dir):
        for f in os.listdir(out_dir):
            if f != "expected.npz":
                p = os.path.join(out_dir, f)
                shutil.rmtree(p) if os.path.isdir(p) else os.remove(p)
    os.makedirs(out_dir, exist_ok=True)

    cfg_cls = getattr(transformers, spec["config_class"])
    model_cls = getattr(transformers, spec["arch"])
    config = cfg_cls(**spec["config"])
    torch.manual_seed(spec["seed"])
    model = model_cls(config).to(torch.float32).eval()
    _randomise(model, spec)
    if spec["tied"]:
        model.tie_weights()
    dt = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[spec["dtype"]]
    model = model.to(dt)
    kw = {"safe_serialization": True}
    if spec.get("shard_size"):
        kw["max_shard_size"] = spec["shard_size"]
    model.save_pretrained(out_dir, **kw)

    # Fixed, minimal generation config (save_pretrained may or may not write one).
    gen = {k: spec["config"][k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if k in spec["config"]}
    gen["transformers_version"] = transformers.__version__
    with open(os.path.join(out_dir, "generation_config.json"), "w") as f:
        json.dump(gen, f, indent=2, sort_keys=True)
        f.write("\n")

    cfg_path = os.path.join(out_dir, "config.json")
    with open(cfg_path) as f:
        cfg = json.load(f)
    if spec.get("legacy_config"):
        cfg = _legacy_config(cfg, spec)
    with open(cfg_path, "w") as f:
        json.dump(cfg, f, indent=2, sort_keys=True)
        f.write("\n")

    if spec.get("noprefix"):
        _gpt2_noprefix(out_dir, spec["config"]["n_layer"], spec["config"]["n_positions"])

    tok = build_tokenizer(spec["config"]["vocab_size"], spec["special"])
    tok.save(os.path.join(out_dir, "tokenizer.json"))
    ids = spec["config"]
    sp = spec["special"]

    def _tokname(i):
        return sp[i] if i is not None and i < len(sp) else None

    tcfg = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": NPOS,
        "eos_token": _tokname(ids.get("eos_token_id")),
        "bos_token": _tokname(ids.get("bos_token_id")),
        "add_bos_token": False,
        "add_eos_token": False,
    }
    if ids.get("pad_token_id") is not None:
        tcfg["pad_token"] = _tokname(ids["pad_token_id"])
    with open(os.path.join(out_dir, "tokenizer_config.json"), "w") as f:
        json.dump(tcfg, f, indent=2, sort_keys=True)
        f.write("\n")
    # make sure transformers can use it
    PreTrainedTokenizerFast(tokenizer_file=os.path.join(out_dir, "tokenizer.json"))
    for f in os.listdir(out_dir):
        os.chmod(os.path.join(out_dir, f), 0o644)
    return out_dir


# ----------------------------------------------------------------------------------------------------------
# Run
# ----------------------------------------------------------------------------------------------------------

def _parts(model):
    """(layers, final_norm, per-layer (attn_out module, mlp_out module, o_proj module))."""
    mt = model.config.model_type
    if mt == "gpt_neox":
        base = model.gpt_neox
        layers = list(base.layers)
        return layers, base.final_layer_norm, [(l.attention, l.mlp, l.attention.dense) for l in layers]
    if mt == "gptj":
        base = model.transformer
        layers = list(base.h)
        return layers, base.ln_f, [(l.attn, l.mlp, l.attn.out_proj) for l in layers]
    if mt == "gpt2":
        base = model.transformer
        layers = list(base.h)
        return layers, base.ln_f, [(l.attn, l.mlp, l.attn.c_proj) for l in layers]
    base = model.model
    layers = list(base.layers)
    if mt.startswith("gemma3"):
        return layers, base.norm, [(l.post_attention_layernorm, l.post_feedforward_layernorm, l.self_attn.o_proj)
                                   for l in layers]
    return layers, base.norm, [(l.self_attn, l.mlp, l.self_attn.o_proj) for l in layers]


def load_hf(model_dir: str):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="eager")
    return model.eval()


def hf_run(model_dir, sequences, model=None) -> list[dict]:
    """Run each id sequence (one at a time, batch 1) through HF eager float32; see module doc for keys."""
    import torch

    if model is None:
        model = load_hf(model_dir)
    layers, final_norm, mods = _parts(model)
    L = len(layers)
    results = []
    for ids in sequences:
        ids = [int(i) for i in ids]
        cap: dict = {}
        hooks = []

        def _first(x):
            return x[0] if isinstance(x, (tuple, list)) else x

        def pre_hidden(key, idx):
            def f(mod, args, kwargs):
                h = args[0] if args else kwargs["hidden_states"]
                cap[(key, idx)] = h.detach()[0].float().clone()
            return f

        def post_out(key, idx):
            def f(mod, args, out):
                cap[(key, idx)] = _first(out).detach()[0].float().clone()
            return f

        try:
            for i, layer in enumerate(layers):
                hooks.append(layer.register_forward_pre_hook(pre_hidden("resid_pre", i), with_kwargs=True))
                a, m, o = mods[i]
                hooks.append(a.register_forward_hook(post_out("attn_out", i)))
                hooks.append(m.register_forward_hook(post_out("mlp_out", i)))
                hooks.append(o.register_forward_pre_hook(pre_hidden("attn_z", i), with_kwargs=True))
            hooks.append(final_norm.register_forward_pre_hook(pre_hidden("resid_final", 0), with_kwargs=True))
            with torch.no_grad():
                out = model(input_ids=torch.tensor([ids], dtype=torch.long), output_attentions=True,
                            use_cache=False)
        finally:
            for h in hooks:
                h.remove()
        atts = out.attentions
        if atts is None or len(atts) != L or any(a is None for a in atts):
            raise RuntimeError("attentions were not returned")
        r = {
            "logits": out.logits[0].float().numpy().astype(np.float32),
            "embed": cap[("resid_pre", 0)].numpy().astype(np.float32),
            "resid_final": cap[("resid_final", 0)].numpy().astype(np.float32),
        }
        for key in ("resid_pre", "attn_out", "mlp_out", "attn_z"):
            r[key] = np.stack([cap[(key, i)].numpy() for i in range(L)]).astype(np.float32)
        r["attn"] = np.stack([a[0].float().numpy() for a in atts]).astype(np.float32)
        results.append(r)
    return results


def hf_logits(model_dir, ids) -> np.ndarray:
    """(T, V) float32 logits of one id sequence."""
    return hf_run(model_dir, [ids])[0]["logits"]
