"""Replays every input in tests/fuzz_crashes/ (found by fuzz/run.sh) and checks the parser now answers
with a documented error (or loads), plus a named test of each bug found.

File names are ``<target>-<hash>``; the target says how the input is fed (as in fuzz/fuzz_<target>.py).
"""
import json
import os
import shutil
import sys
from pathlib import Path

import pytest

sys.path.insert(0, os.path.dirname(__file__))
import gguf_builders as gb  # noqa: E402

from factrace.errors import ConfigError
from factrace.io.config import from_hf_config# noqa: E402
from factrace.errors import GGUFError
from factrace.io.gguf import GGUFFile# noqa: E402
from factrace.io.load import load_gguf# noqa: E402
from factrace.io.gguf_tokenizer import load_tokenizer# noqa: E402
from factrace.io.load import load_hf_dir# noqa: E402
from factrace.errors import InputError# noqa: E402
from factrace.io.safetensors import SafetensorsFile
from factrace.errors import CheckpointError# noqa: E402
from factrace.errors import TokenizerError# noqa: E402

HERE = Path(__file__).resolve().parent
CRASHES = HERE / "fuzz_crashes"
FIX = HERE / "fixtures" / "models"
DOCUMENTED = (CheckpointError, GGUFError, ConfigError, TokenizerError, InputError)
INPUTS = sorted(p.name for p in CRASHES.iterdir()) if CRASHES.exists() else []


def _replay(target, data, tmp_path):
    if target == "safetensors":
        with SafetensorsFile(_write(tmp_path / "m.safetensors", data)) as f:
            for n in f.tensors:
                f.raw(n)
    elif target == "st_index":
        d = tmp_path / "sharded"
        shutil.copytree(FIX / "llama_sharded", d)
        _write(d / "model.safetensors.index.json", data)
        load_hf_dir(d).run([1, 2, 3])
    elif target == "config":
        names = sorted(p.name for p in FIX.iterdir() if (p / "model.safetensors").exists())
        d = tmp_path / "model"
        shutil.copytree(FIX / names[data[0] % len(names)], d)
        _write(d / "config.json", data[1:])
        m = load_hf_dir(d)
        m.run([1, 2, 3][:m.config.n_ctx])
    elif target in ("gguf", "c_gguf"):
        p = _write(tmp_path / "m.gguf", data)
        with GGUFFile(p) as f:
            for n, info in f.tensors.items():
                f.raw(n)
                if info.type_name in gb.DEQUANT_TYPES:
                    f.tensor(n)
        m = load_gguf(p)
        V, n_ctx = m.config.vocab_size, m.config.n_ctx  # as the fuzz target runs it
        ids = m.encode("The Eiffel Tower is in") if m.tokenizer is not None else [1 % V, 2 % V]
        if len(ids[:n_ctx]):
            m.run(list(ids)[:n_ctx])
    elif target == "gguf_tokenizer":
        with GGUFFile(_write(tmp_path / "t.gguf", data)) as f:
            md = f.metadata
        try:
            tk, _ = load_tokenizer(md)
        except (ValueError, KeyError, TypeError):  # what load_gguf turns into GGUFError
            return
        enc = tk.encode("The Eiffel Tower is in Paris. ü ✓ 123")  # as the fuzz target does
        tk.decode(enc.ids, skip_special_tokens=False)
    else:
        raise AssertionError(f"unknown fuzz target {target!r}")


def _write(path, data):
    Path(path).write_bytes(data)
    return path


@pytest.mark.parametrize("name", INPUTS)
def test_fuzz_crash_input(name, tmp_path):
    target = name.rsplit("-", 1)[0]
    data = (CRASHES / name).read_bytes()
    try:
        _replay(target, data, tmp_path)
    except DOCUMENTED:
        pass


# ---- the bugs, one by one ----

@pytest.mark.parametrize("archs", [1, "LlamaForCausalLM", {"a": 1}, [1], [["LlamaForCausalLM"]]])
def test_config_architectures_not_a_list(archs):
    # fuzz config-e4352da7655e: `architectures: 1` raised TypeError: 'int' object is not subscriptable
    with pytest.raises(ConfigError, match="architectures must be a list of strings"):
        from_hf_config({"architectures": archs, "hidden_size": 8})


def test_config_model_type_unhashable():
    with pytest.raises(ConfigError, match="not supported"):
        from_hf_config({"model_type": ["llama"], "hidden_size": 8})


def _llama_gguf(**overrides):
    b = gb.GGUFBuilder(version=3)
    b.add_kv("general.architecture", gb.STRING, "llama")
    kvs = {"block_count": 1, "embedding_length": 32, "attention.head_count": 4, "feed_forward_length": 64}
    kvs.update(overrides)
    for k, v in kvs.items():
        if v is None:
            continue
        if isinstance(v, str):
            b.add_kv(f"llama.{k}", gb.STRING, v)
        elif isinstance(v, list):
            b.add_kv(f"llama.{k}", gb.ARRAY, v, gb.UINT32)
        else:
            b.add_kv(f"llama.{k}", gb.UINT32, v)
    b.add_tensor("token_embd.weight", (32, 10), gb.GGML_ID["F32"])
    return b.build()


@pytest.mark.parametrize("overrides", [dict(feed_forward_length=None), dict(embedding_length="abc"),
                                       dict(block_count=[1, 2]), dict(context_length="x")])
def test_gguf_metadata_of_wrong_type(tmp_path, overrides):
    # fuzz gguf-3b857db2968e: a missing llama.feed_forward_length raised TypeError from int(None)
    p = _write(tmp_path / "m.gguf", _llama_gguf(**overrides))
    with pytest.raises(ConfigError, match=str(p)):
        load_gguf(p)


def test_gguf_tokenizer_merge_out_of_vocabulary(tmp_path):
    # fuzz gguf_tokenizer-3e1444cd0a39: a merge naming a token not in the vocabulary made `tokenizers`
    # raise a bare Exception that load_gguf did not turn into GGUFError
    md = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.tokens": ["a", "b", "ab"],
          "tokenizer.ggml.merges": ["m e"]}
    with pytest.raises(ValueError, match="out of vocabulary"):
        load_tokenizer(md)


@pytest.mark.parametrize("dtype", [[2, 3], {"F32": 1}, 5, None])
def test_safetensors_dtype_not_a_string(tmp_path, dtype):
    # fuzz safetensors-0c5c1f770e70: `"dtype": [2, 3]` raised TypeError: unhashable type: 'list'
    header = json.dumps({"w": {"dtype": dtype, "shape": [1], "data_offsets": [0, 4]}}).encode()
    p = _write(tmp_path / "m.safetensors", len(header).to_bytes(8, "little") + header + b"\0" * 4)
    with pytest.raises(CheckpointError, match="unknown dtype"):
        SafetensorsFile(p)


@pytest.mark.parametrize("rope_scaling", [1, "linear", [1, 2], True])
def test_config_rope_scaling_not_an_object(rope_scaling):
    # fuzz (CI, config): `"rope_scaling": 1` raised AttributeError: 'int' object has no attribute 'get'
    with pytest.raises(ConfigError, match="rope"):
        from_hf_config({"architectures": ["LlamaForCausalLM"], "hidden_size": 64, "intermediate_size": 128,
                        "num_hidden_layers": 2, "num_attention_heads": 4, "vocab_size": 100,
                        "rope_scaling": rope_scaling})


def test_gguf_architecture_not_a_string(tmp_path):
    # the GGUF twin of the two above: general.architecture stored as an array of strings
    b = gb.GGUFBuilder(version=3)
    b.add_kv("general.architecture", gb.ARRAY, ["llama", "qwen2"], gb.STRING)
    b.add_tensor("token_embd.weight", (32, 10), gb.GGML_ID["F32"])
    p = _write(tmp_path / "m.gguf", b.build())
    with pytest.raises((ConfigError, GGUFError), match="architecture"):
        load_gguf(p)


def test_index_shard_name_too_long(tmp_path):
    # fuzz st_index: a 300-byte shard name made Path.is_file raise OSError (ENAMETOOLONG)
    d = tmp_path / "sharded"
    shutil.copytree(FIX / "llama_sharded", d)
    index = d / "model.safetensors.index.json"
    data = json.loads(index.read_text())
    name = next(iter(data["weight_map"]))
    data["weight_map"][name] = "m" * 300 + ".safetensors"
    index.write_text(json.dumps(data))
    with pytest.raises(CheckpointError, match="bad file name"):
        load_hf_dir(d)


def test_config_tiny_context_loads_and_refuses_longer_input(tmp_path):
    # fuzz config-0afa9096c562 (a harness bug, not a parser bug): max_position_embeddings = 2 is a valid
    # config; the model loads, runs 2 tokens and refuses 3 with InputError naming the context
    d = tmp_path / "model"
    shutil.copytree(FIX / "llama_gqa2_tied", d)
    cfg = json.loads((d / "config.json").read_text())
    cfg["max_position_embeddings"] = 2
    (d / "config.json").write_text(json.dumps(cfg))
    m = load_hf_dir(d)
    assert m.run([1, 2]).logits.shape == (2, m.config.vocab_size)
    with pytest.raises(InputError, match="context is 2"):
        m.run([1, 2, 3])


@pytest.mark.parametrize("unk_id", [None, 999, -1, "0"])
def test_gguf_gemma_tokenizer_without_unk_token(unk_id):
    # fuzz gguf_tokenizer-d0bd5a3ff8ea: a Gemma vocabulary without '<unk>' and no unknown_token_id built a
    # tokenizer whose encode() raised a bare Exception ("Unk token `<unk>` not found in the vocabulary")
    md = {"general.architecture": "gemma3", "tokenizer.ggml.model": "llama",
          "tokenizer.ggml.tokens": ["<pad>", "a", "b", "ab"] + [f"<0x{i:02X}>" for i in range(256)],
          "tokenizer.ggml.scores": [0.0] * 260}
    if unk_id is not None:
        md["tokenizer.ggml.unknown_token_id"] = unk_id
        with pytest.raises(ValueError, match="unknown_token_id"):
            load_tokenizer(md)
        return
    tk, _ = load_tokenizer(md)
    assert len(tk.encode("ab ü ✓").ids) > 0
