"""Write the seed corpus of every fuzz target into OUT/<target>/ from valid tiny files: the fixture models
of tests/fixtures/models/ and GGUF files written with tests/gguf_builders.py (including a tiny llama
model with a byte-level BPE tokenizer converted from tests/fixtures/models/llama_gqa2_tied).

    python fuzz/make_corpus.py OUT
"""
from __future__ import annotations

import json
import struct
import sys

import numpy as np

import _common

import gguf_builders as gb  # noqa: E402  (tests/ is on sys.path)
from gguf_builders import ARRAY, FLOAT32, GGML_ID, INT32, STRING, UINT32, GGUFBuilder  # noqa: E402

FIX = _common.FIXTURES


def st_file(tensors: dict, meta: dict | None = None) -> bytes:
    """A valid safetensors file from name -> numpy array (F32/F16/I64/U8 or (dtype, raw bytes, shape))."""
    header, blobs, pos = {}, [], 0
    for name, v in tensors.items():
        dt, raw, shape = v
        header[name] = {"dtype": dt, "shape": list(shape), "data_offsets": [pos, pos + len(raw)]}
        blobs.append(raw)
        pos += len(raw)
    if meta is not None:
        header["__metadata__"] = meta
    h = json.dumps(header, separators=(",", ":")).encode()
    h += b" " * (-len(h) % 8)
    return struct.pack("<Q", len(h)) + h + b"".join(blobs)


def safetensors_seeds():
    r = np.random.default_rng(0)
    a = r.standard_normal((2, 3)).astype(np.float32)
    yield "tiny_f32", st_file({"w": ("F32", a.tobytes(), a.shape)}, {"format": "pt"})
    yield "tiny_mixed", st_file({
        "a": ("F16", a.astype(np.float16).tobytes(), a.shape),
        "b": ("BF16", (a.view(np.uint32) >> 16).astype(np.uint16).tobytes(), a.shape),
        "c": ("I64", np.arange(3, dtype=np.int64).tobytes(), (3,)),
        "d": ("U8", b"\x01\x02", (2,)),
        "e": ("F32", b"", (0, 4)),
        "s": ("F32", np.float32(1.5).tobytes(), ()),
    })
    yield "empty_header", st_file({})
    yield "shard4", (FIX / "llama_sharded" / "model-00004-of-00005.safetensors").read_bytes()


def tiny_llama_gguf(quant: str = "F32", with_tokenizer: bool = True) -> bytes:
    """tests/fixtures/models/llama_gqa2_tied as a GGUF file (weights not permuted: only the structure
    matters for a seed)."""
    from factrace.io.safetensors import Checkpoint

    d = FIX / "llama_gqa2_tied"
    cfg = json.loads((d / "config.json").read_text())
    b = GGUFBuilder(version=3)
    b.add_kv("general.architecture", STRING, "llama").add_kv("general.name", STRING, "tiny")
    for k, v in (("block_count", cfg["num_hidden_layers"]), ("embedding_length", cfg["hidden_size"]),
                 ("attention.head_count", cfg["num_attention_heads"]),
                 ("attention.head_count_kv", cfg["num_key_value_heads"]),
                 ("feed_forward_length", cfg["intermediate_size"]),
                 ("context_length", cfg["max_position_embeddings"]), ("attention.key_length", cfg["head_dim"])):
        b.add_kv(f"llama.{k}", UINT32, v)
    b.add_kv("llama.attention.layer_norm_rms_epsilon", FLOAT32, 1e-5)
    b.add_kv("llama.rope.freq_base", FLOAT32, 10000.0)
    if with_tokenizer:
        add_bpe_tokenizer(b, d)
    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight"}
    per = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
           "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
           "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}
    with Checkpoint(d) as ck:
        for n in ck.names:
            if n in names:
                g = names[n]
            else:
                parts = n.split(".")            # model.layers.{i}.<a>.<b>.weight
                g = f"blk.{parts[2]}.{per['.'.join(parts[3:-1])]}.weight"
            t = ck.tensor(n)
            ne = tuple(reversed(t.shape))
            if t.ndim == 2 and quant == "Q8_0" and ne[0] % 32 == 0:
                b.add_tensor(g, ne, GGML_ID["Q8_0"])            # random blocks of the right size
            elif t.ndim == 2 and quant == "F16":
                b.add_tensor(g, ne, GGML_ID["F16"], data=t.astype(np.float16).tobytes())
            else:
                b.add_tensor(g, ne, GGML_ID["F32"], data=t.astype(np.float32).tobytes())
    return b.build()


def add_bpe_tokenizer(b: GGUFBuilder, model_dir):
    t = json.loads((model_dir / "tokenizer.json").read_text())
    vocab = t["model"]["vocab"]
    tokens = [tok for tok, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    merges = [" ".join(m) if isinstance(m, list) else m for m in t["model"]["merges"]]
    types = [3 if tok in ("<s>", "</s>") else 1 for tok in tokens]
    b.add_kv("tokenizer.ggml.model", STRING, "gpt2").add_kv("tokenizer.ggml.pre", STRING, "smollm")
    b.add_kv("tokenizer.ggml.tokens", ARRAY, tokens, STRING)
    b.add_kv("tokenizer.ggml.token_type", ARRAY, types, INT32)
    b.add_kv("tokenizer.ggml.merges", ARRAY, merges, STRING)
    b.add_kv("tokenizer.ggml.bos_token_id", UINT32, 0).add_kv("tokenizer.ggml.eos_token_id", UINT32, 1)


def sentencepiece_tokenizer(model: str = "llama") -> bytes:
    b = GGUFBuilder(version=3)
    b.add_kv("general.architecture", STRING, "llama")
    pieces = ["<unk>", "<s>", "</s>"] + [f"<0x{i:02X}>" for i in range(256)] + \
        ["▁", "▁the", "▁T", "he", "ow", "er", "▁is", "▁in", "▁Paris", "E", "iff", "el", "."]
    scores = [0.0] * 259 + [-float(i) for i in range(len(pieces) - 259)]
    types = [2, 3, 3] + [6] * 256 + [1] * (len(pieces) - 259)
    b.add_kv("tokenizer.ggml.model", STRING, model)
    b.add_kv("tokenizer.ggml.tokens", ARRAY, pieces, STRING)
    b.add_kv("tokenizer.ggml.scores", ARRAY, scores, FLOAT32)
    b.add_kv("tokenizer.ggml.token_type", ARRAY, types, INT32)
    for k, v in (("bos", 1), ("eos", 2), ("unknown", 0)):
        b.add_kv(f"tokenizer.ggml.{k}_token_id", UINT32, v)
    b.add_tensor("token_embd.weight", (4, len(pieces)), GGML_ID["F32"])
    return b.build()


def bpe_tokenizer_only() -> bytes:
    b = GGUFBuilder(version=3)
    b.add_kv("general.architecture", STRING, "qwen2")
    add_bpe_tokenizer(b, FIX / "qwen2")
    return b.build()


def gguf_seeds():
    yield "all_types_v3", gb.all_types_builder(version=3).build()
    yield "all_types_v2_a64", gb.all_types_builder(version=2, alignment=64).build()
    b = GGUFBuilder(version=3)
    for i, name in enumerate(gb.DEQUANT_TYPES):
        bs = gb.GGML[GGML_ID[name]][1]
        b.add_tensor(f"t{i}", (bs,), GGML_ID[name])
    yield "every_dequant_type", b.build()
    yield "tiny_llama_f32", tiny_llama_gguf("F32")
    yield "tiny_llama_q8_0", tiny_llama_gguf("Q8_0", with_tokenizer=False)
    yield "tiny_llama_f16", tiny_llama_gguf("F16", with_tokenizer=False)


def tokenizer_seeds():
    yield "spm_llama", sentencepiece_tokenizer("llama")
    yield "spm_gemma4", sentencepiece_tokenizer("gemma4")
    yield "spm_t5", sentencepiece_tokenizer("t5")
    yield "bpe_qwen2", bpe_tokenizer_only()


def dequant_seeds():
    r = np.random.default_rng(1)
    for name in gb.DEQUANT_TYPES:
        tid = GGML_ID[name]
        _, bs, ts = gb.GGML[tid]
        yield f"{name}", bytes([tid]) + r.integers(0, 256, size=ts * (2 if bs > 1 else 8), dtype=np.uint8).tobytes()


def config_seeds():
    names = sorted(p.name for p in FIX.iterdir() if (p / "model.safetensors").exists())
    for i, n in enumerate(names):
        yield n, bytes([i]) + (FIX / n / "config.json").read_bytes()


def index_seeds():
    idx = (FIX / "llama_sharded" / "model.safetensors.index.json").read_bytes()
    yield "index", idx
    yield "index_compact", json.dumps(json.loads(idx), separators=(",", ":")).encode()


TARGETS = {
    "safetensors": safetensors_seeds,
    "st_index": index_seeds,
    "config": config_seeds,
    "gguf": lambda: list(gguf_seeds()) + list(tokenizer_seeds()),
    "gguf_tokenizer": lambda: list(tokenizer_seeds()) + [("tiny_llama_f32", tiny_llama_gguf("F32"))],
    "c_gguf": lambda: list(gguf_seeds()) + list(tokenizer_seeds()),
    "c_dequant": dequant_seeds,
}


def main(out):
    from pathlib import Path

    out = Path(out)
    for target, seeds in TARGETS.items():
        d = out / target
        d.mkdir(parents=True, exist_ok=True)
        n = 0
        for name, data in seeds():
            (d / f"seed_{name}").write_bytes(data)
            n += 1
        print(f"{target}: {n} seeds")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "fuzz/corpus")
