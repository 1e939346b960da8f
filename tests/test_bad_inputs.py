"""Malformed checkpoints, configs, inputs and interventions raise clear Python exceptions that name the
file and the problem, never crash the process (a crash in the C core or the reader kills pytest, so
this run failing loudly is the point). No torch needed: safetensors files are written by hand."""
import json
import os
import shutil
import struct

import numpy as np
import pytest

import factrace
from factrace import CheckpointError, ConfigError, InputError
from factrace.io.safetensors import SafetensorsFile
from factrace.errors import TokenizerError

from conftest import FIXTURES, fixture_model

# ----------------------------------------------------------------------------------------------------------
# helpers


def st_bytes(header, data=b"", raw_header=None):
    """A safetensors file from a header dict (or raw header bytes) and a data buffer."""
    hb = raw_header if raw_header is not None else json.dumps(header).encode()
    return struct.pack("<Q", len(hb)) + hb + data


def read_st(path):
    """(metadata, {name: [dtype, shape, bytes]}) of a safetensors file, in file order."""
    b = open(path, "rb").read()
    n = struct.unpack("<Q", b[:8])[0]
    h = json.loads(b[8:8 + n])
    meta = h.pop("__metadata__", None)
    data = b[8 + n:]
    out = {}
    for k, v in sorted(h.items(), key=lambda kv: kv[1]["data_offsets"][0]):
        s, e = v["data_offsets"]
        out[k] = [v["dtype"], list(v["shape"]), data[s:e]]
    return meta, out


def write_st(path, tensors, meta=None):
    """Write {name: (dtype, shape, bytes)} with contiguous offsets in the given order."""
    header, chunks, pos = {}, [], 0
    if meta is not None:
        header["__metadata__"] = meta
    for k, (dt, shape, data) in tensors.items():
        header[k] = {"dtype": dt, "shape": list(shape), "data_offsets": [pos, pos + len(data)]}
        chunks.append(data)
        pos += len(data)
    with open(path, "wb") as f:
        f.write(st_bytes(header, b"".join(chunks)))


def copy_fixture(name, tmp_path):
    d = tmp_path / name
    shutil.copytree(FIXTURES / name, d)
    for p in d.iterdir():
        os.chmod(p, 0o644)
    return d


def edit_config(d, **changes):
    p = d / "config.json"
    c = json.loads(p.read_text())
    for k, v in changes.items():
        if v is _DEL:
            c.pop(k, None)
        else:
            c[k] = v
    p.write_text(json.dumps(c))


_DEL = object()


def load_err(exc, path, *parts):
    """factrace.load(path) raises exc whose message contains every part (case-insensitive)."""
    with pytest.raises(exc) as ei:
        factrace.load(path)
    msg = str(ei.value)
    for part in parts:
        assert str(part).lower() in msg.lower(), f"{part!r} not in message: {msg}"
    return msg


def st_err(path, *parts):
    with pytest.raises(CheckpointError) as ei:
        SafetensorsFile(path).close()
    msg = str(ei.value)
    assert str(path) in msg, msg
    for part in parts:
        assert str(part).lower() in msg.lower(), f"{part!r} not in message: {msg}"
    return msg


F4 = np.arange(6, dtype="<f4").tobytes()  # 24 bytes: a (2, 3) F32 tensor


# ----------------------------------------------------------------------------------------------------------
# directory and config.json


def test_missing_directory(tmp_path):
    p = tmp_path / "no_such_model"
    load_err(FileNotFoundError, p, str(p))


def test_missing_config(tmp_path):
    d = copy_fixture("gpt2", tmp_path)
    (d / "config.json").unlink()
    load_err((CheckpointError, FileNotFoundError, ConfigError), d, "config.json", "missing")


@pytest.mark.parametrize("text,what", [
    ("{not json", "unreadable"),
    ("", "unreadable"),
    ('{"a": 1', "unreadable"),
    ("[1, 2, 3]", "json object"),
    ('"a string"', "json object"),
    ("null", "json object"),
    ("42", "json object"),
])
def test_unreadable_config(tmp_path, text, what):
    d = copy_fixture("gpt2", tmp_path)
    (d / "config.json").write_text(text)
    load_err(ConfigError, d, "config.json", what)


def test_config_not_utf8(tmp_path):
    d = copy_fixture("gpt2", tmp_path)
    (d / "config.json").write_bytes(b'{"architectures": ["\xff\xfe"]}')
    load_err(ConfigError, d, "config.json", "unreadable")


def test_config_is_a_directory(tmp_path):
    d = copy_fixture("gpt2", tmp_path)
    (d / "config.json").unlink()
    (d / "config.json").mkdir()
    load_err((ConfigError, CheckpointError), d, "config.json")


@pytest.mark.parametrize("arch", ["BertModel", "T5ForConditionalGeneration", "MixtralForCausalLM", ""])
def test_unsupported_architecture(tmp_path, arch):
    d = copy_fixture("llama_gqa2_tied", tmp_path)
    edit_config(d, architectures=[arch], model_type="bert")
    msg = load_err(ConfigError, d, "config.json", "not supported", *factrace.SUPPORTED_ARCHS)
    if arch:
        assert arch in msg


def test_no_architecture_at_all(tmp_path):
    d = copy_fixture("llama_gqa2_tied", tmp_path)
    edit_config(d, architectures=_DEL, model_type="bert")
    load_err(ConfigError, d, "config.json", "not supported", "LlamaForCausalLM")


@pytest.mark.parametrize("key,value,what", [
    ("hidden_size", -32, "hidden_size"),
    ("hidden_size", 32.0, "hidden_size"),
    ("hidden_size", "32", "hidden_size"),
    ("hidden_size", True, "hidden_size"),
    ("num_hidden_layers", 0, "num_hidden_layers"),
    ("num_attention_heads", None, "num_attention_heads"),
    ("vocab_size", _DEL, "vocab_size"),
    ("num_key_value_heads", 3, "num_key_value_heads"),
    ("head_dim", 7, "head_dim"),
    ("hidden_act", "tanhshrink", "tanhshrink"),
    ("rope_parameters", {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0}, "yarn"),
])
def test_bad_config_values(tmp_path, key, value, what):
    d = copy_fixture("llama_gqa2_tied", tmp_path)
    edit_config(d, **{key: value})
    load_err(ConfigError, d, "config.json", what)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.parametrize("fixture,changes", [
    ("llama_gqa2_tied", {"rope_parameters": {"rope_type": "linear", "rope_theta": 1e4}}),
    ("llama_gqa2_tied", {"rope_parameters": {"rope_type": "llama3", "rope_theta": 1e4, "factor": 8.0}}),
    ("llama_gqa2_tied", {"rms_norm_eps": "x"}),
    ("gemma3", {"sliding_window": "a"}),
    ("gemma3", {"layer_types": _DEL, "sliding_window_pattern": 0}),
    ("llama_gqa2_tied", {"rope_parameters": {"rope_type": "linear", "rope_theta": 1e4, "factor": 0}}),
    ("mistral", {"sliding_window": -3}),
])
def test_bad_config_values_known_bugs(tmp_path, fixture, changes):
    d = copy_fixture(fixture, tmp_path)
    edit_config(d, **changes)
    load_err(ConfigError, d, "config.json")


# Every key of every fixture's config (and of its nested objects) set to a value of each wrong JSON type:
# the loader either builds a model that runs or raises ConfigError/CheckpointError naming config.json.
# (The fuzzer found `"rope_scaling": 1` raising AttributeError; this sweeps the whole family.)
_WRONG_TYPES = [7, -1, 0.5, "x", "", [], [1, "a"], {}, {"rope_type": 3}, True, None, 1e308]


def _config_paths(obj, prefix=()):
    for k, v in obj.items():
        yield prefix + (k,)
        if isinstance(v, dict):
            yield from _config_paths(v, prefix + (k,))


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.parametrize("fixture", sorted(p.name for p in FIXTURES.iterdir() if (p / "config.json").exists()))
def test_config_type_confusion(tmp_path, fixture):
    d = copy_fixture(fixture, tmp_path)
    original = json.loads((d / "config.json").read_text())
    paths = list(_config_paths(original)) + [("rope_scaling",), ("rope_parameters",), ("layer_types",),
                                              ("rope_parameters", "full_attention"), ("sliding_window",)]
    tried = 0
    for path in paths:
        for value in _WRONG_TYPES:
            cfg = json.loads(json.dumps(original))
            node = cfg
            for k in path[:-1]:
                if not isinstance(node.get(k), dict):
                    node[k] = {}
                node = node[k]
            node[path[-1]] = value
            (d / "config.json").write_text(json.dumps(cfg))
            try:
                m = factrace.load(d)
            except (ConfigError, CheckpointError) as e:
                assert "config.json" in str(e) or str(d) in str(e), (path, value, str(e))
                continue
            tried += 1
            r = m.run([1, 2, 3])
            assert r.logits.shape == (3, m.config.vocab_size), (path, value)
    assert tried > 0  # some edits (e.g. to bos_token_id or unused keys) leave a loadable model


def test_gemma_layer_types_length(tmp_path):
    d = copy_fixture("gemma3", tmp_path)
    edit_config(d, layer_types=["full_attention"])
    load_err(ConfigError, d, "config.json", "layer_types")


def test_multimodal_gemma_rejected(tmp_path):
    d = copy_fixture("gemma3", tmp_path)
    edit_config(d, model_type="gemma3", text_config={"hidden_size": 32})
    load_err(ConfigError, d, "config.json", "not supported")


# ----------------------------------------------------------------------------------------------------------
# config values that do not fit the tensors


@pytest.mark.parametrize("fixture,changes,parts", [
    ("gpt2", {"n_embd": 64}, ["wte.weight", "shape"]),
    ("gpt2", {"vocab_size": 301}, ["wte.weight", "shape"]),
    ("gpt2", {"n_positions": 128}, ["wpe.weight", "shape"]),
    ("gpt2", {"n_layer": 3}, ["missing tensor", "h.2."]),
    ("gpt2", {"n_layer": 1}, ["unexpected tensors", "h.1."]),
    ("gpt2", {"n_inner": 64}, ["c_fc", "shape"]),
    ("llama_gqa2_tied", {"hidden_size": 64}, ["embed_tokens", "shape"]),
    ("llama_gqa2_tied", {"num_key_value_heads": 4}, ["k_proj", "shape"]),
    ("llama_gqa2_tied", {"intermediate_size": 32}, ["proj", "shape"]),
    ("llama_gqa2_tied", {"tie_word_embeddings": False}, ["lm_head.weight", "missing"]),
    ("llama_gqa2_tied", {"attention_bias": True}, ["missing tensor", "q_proj.bias"]),
    ("llama_gqa2_tied", {"num_hidden_layers": 3}, ["missing tensor", "layers.2"]),
    ("qwen3", {"head_dim": 8}, ["q_proj", "shape"]),
])
def test_config_does_not_fit_tensors(tmp_path, fixture, changes, parts):
    d = copy_fixture(fixture, tmp_path)
    edit_config(d, **changes)
    load_err(CheckpointError, d, d.name, *parts)


# ----------------------------------------------------------------------------------------------------------
# missing / unreadable safetensors


def test_no_safetensors(tmp_path):
    d = copy_fixture("gpt2", tmp_path)
    (d / "model.safetensors").unlink()
    load_err(CheckpointError, d, str(d), "safetensors")


def test_safetensors_is_a_directory(tmp_path):
    d = copy_fixture("gpt2", tmp_path)
    (d / "model.safetensors").unlink()
    (d / "model.safetensors").mkdir()
    load_err(CheckpointError, d, "model.safetensors")


def test_safetensors_dangling_symlink(tmp_path):
    d = copy_fixture("gpt2", tmp_path)
    (d / "model.safetensors").unlink()
    (d / "weights.safetensors").symlink_to(tmp_path / "nowhere.safetensors")
    load_err(CheckpointError, d, "weights.safetensors", "cannot open")


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files regardless of permissions")
def test_safetensors_unreadable(tmp_path):
    d = copy_fixture("gpt2", tmp_path)
    os.chmod(d / "model.safetensors", 0)
    load_err(CheckpointError, d, "model.safetensors", "cannot open")


def test_empty_safetensors(tmp_path):
    d = copy_fixture("gpt2", tmp_path)
    (d / "model.safetensors").write_bytes(b"")
    load_err(CheckpointError, d, "model.safetensors", "truncated")


# ----------------------------------------------------------------------------------------------------------
# truncation at many byte positions


def _cut_positions(size, header_end):
    pos = set(range(0, min(size, header_end + 80)))          # header length, header, first data bytes
    pos.update(range(header_end, size, 97))                   # through the data
    pos.update(range(max(0, size - 40), size))                # the last bytes
    return sorted((p for p in pos if p < size), reverse=True)


def test_truncated_everywhere(tmp_path):
    src = FIXTURES / "gpt2" / "model.safetensors"
    full = src.read_bytes()
    n = struct.unpack("<Q", full[:8])[0]
    path = tmp_path / "model.safetensors"
    path.write_bytes(full)
    SafetensorsFile(path).close()  # the untouched copy is fine
    cuts = _cut_positions(len(full), 8 + n)
    assert len(cuts) > 1000
    with open(path, "r+b") as f:
        for cut in cuts:  # descending: truncate the same file further each time
            f.truncate(cut)
            f.flush()
            msg = st_err(path)
            assert any(w in msg for w in ("truncated", "outside the data buffer", "tensors cover")), (cut, msg)


def test_truncated_model_dir_loads_fail(tmp_path):
    """The same through factrace.load, at a few positions of every region, for a single file and a shard."""
    for name in ("gpt2", "llama_sharded"):
        d = copy_fixture(name, tmp_path)
        files = sorted(d.glob("*.safetensors"))
        target = files[len(files) // 2]
        full = target.read_bytes()
        n = struct.unpack("<Q", full[:8])[0]
        for cut in (0, 3, 7, 8, 9, 8 + n // 2, 8 + n - 1, 8 + n, 8 + n + 1, (8 + n + len(full)) // 2, len(full) - 1):
            target.write_bytes(full[:cut])
            load_err(CheckpointError, d, target.name)
        target.write_bytes(full)
        factrace.load(d)


def test_trailing_garbage(tmp_path):
    path = tmp_path / "x.safetensors"
    path.write_bytes((FIXTURES / "gpt2" / "model.safetensors").read_bytes() + b"\0" * 5)
    st_err(path, "cover")


# ----------------------------------------------------------------------------------------------------------
# headers that lie


def T(dt="F32", shape=(2, 3), offs=(0, 24)):
    return {"dtype": dt, "shape": list(shape), "data_offsets": list(offs)}


@pytest.mark.parametrize("header,data,parts", [
    ({"a": T(offs=(0, 24))}, F4[:20], ["'a'", "outside the data buffer"]),
    ({"a": T(offs=(100, 124))}, F4, ["'a'", "outside the data buffer"]),
    ({"a": T(offs=(-24, 0))}, F4, ["'a'", "outside"]),
    ({"a": T(offs=(24, 0))}, F4, ["'a'", "outside"]),
    ({"a": T(offs=(0, 24)), "b": T(offs=(12, 36))}, F4 + F4[:12], ["overlaps"]),
    ({"a": T(offs=(0, 24)), "b": T(offs=(0, 24))}, F4, ["overlaps"]),
    ({"b": T(offs=(32, 56)), "a": T(shape=(2,), offs=(0, 8))}, F4 + F4 + F4[:8], ["hole", "'b'"]),
    ({"a": T(offs=(8, 32))}, F4 + F4[:8], ["hole", "'a'"]),
    ({"a": T(shape=(2, 4), offs=(0, 24))}, F4, ["'a'", "do not match shape"]),
    ({"a": T(dt="F16", offs=(0, 24))}, F4, ["'a'", "do not match shape"]),
    ({"a": T(shape=(2 ** 39, 2 ** 39), offs=(0, 24))}, F4, ["'a'", "do not match shape"]),
    ({"a": T(shape=(2 ** 41, 1), offs=(0, 24))}, F4, ["'a'", "bad shape"]),
    ({"a": T(shape=[1] * 9, offs=(0, 4))}, F4[:4], ["'a'", "bad shape"]),
    ({"a": T(shape=(2.0, 3), offs=(0, 24))}, F4, ["'a'", "bad shape"]),
    ({"a": T(shape=("2", 3), offs=(0, 24))}, F4, ["'a'", "bad shape"]),
    ({"a": T(shape=(True, 6), offs=(0, 24))}, F4, ["'a'", "bad shape"]),
    ({"a": T(shape=(-2, -3), offs=(0, 24))}, F4, ["'a'", "bad shape"]),
    ({"a": T(shape=([2], 3), offs=(0, 24))}, F4, ["'a'", "bad shape"]),
    ({"a": {"dtype": "F32", "shape": 6, "data_offsets": [0, 24]}}, F4, ["'a'", "bad shape"]),
    ({"a": {"dtype": "F32", "shape": [6], "data_offsets": [0.0, 24]}}, F4, ["'a'", "data_offsets"]),
    ({"a": {"dtype": "F32", "shape": [6], "data_offsets": [0]}}, F4, ["'a'", "data_offsets"]),
    ({"a": {"dtype": "F32", "shape": [6], "data_offsets": "0,24"}}, F4, ["'a'", "data_offsets"]),
    ({"a": {"dtype": "F32", "shape": [6]}}, F4, ["'a'", "data_offsets"]),
    ({"a": {"dtype": "F32", "shape": [6], "data_offsets": [0, 24], "extra": 1}}, F4, ["'a'", "exactly"]),
    ({"a": [1, 2, 3]}, F4, ["'a'", "exactly"]),
    ({"a": T(dt="F17")}, F4, ["'a'", "unknown dtype", "F17"]),
    ({"a": T(dt="float32")}, F4, ["'a'", "unknown dtype"]),
    ({"a": T(dt=None)}, F4, ["'a'", "unknown dtype"]),
    ({"a": T(), "__metadata__": {"format": 1}}, F4, ["__metadata__"]),
    ({"a": T(), "__metadata__": "pt"}, F4, ["__metadata__"]),
])
def test_lying_header(tmp_path, header, data, parts):
    path = tmp_path / "bad.safetensors"
    path.write_bytes(st_bytes(header, data))
    st_err(path, *parts)


@pytest.mark.parametrize("raw,parts", [
    (b'{"a": {"dtype": "F32", "shape": [6], "data_offsets": [0, 24]}, '
     b'"a": {"dtype": "F32", "shape": [6], "data_offsets": [0, 24]}}', ["duplicate", "'a'"]),
    (b'{"a": {"dtype": "F32", "dtype": "F16", "shape": [6], "data_offsets": [0, 24]}}', ["duplicate"]),
    (b"[1, 2]", ["not a json object"]),
    (b'"x"', ["not a json object"]),
    (b"{not json}", ["not valid json"]),
    (b'{"a": \xff}', ["not valid json"]),
    (b"\0" * 16, ["not valid json"]),
])
def test_bad_header_json(tmp_path, raw, parts):
    path = tmp_path / "bad.safetensors"
    path.write_bytes(st_bytes(None, F4, raw_header=raw))
    st_err(path, *parts)


@pytest.mark.parametrize("n", [0, 1, 2 ** 63, 2 ** 64 - 1, 2 ** 32, 200 * 1024 * 1024])
def test_absurd_header_length(tmp_path, n):
    path = tmp_path / "bad.safetensors"
    path.write_bytes(struct.pack("<Q", n) + b'{"a": 1}' + F4)
    msg = st_err(path)
    assert "absurd" in msg or "truncated" in msg, msg


def test_valid_handmade_file_reads(tmp_path):
    """The helpers write valid files: a sanity check for the negative tests above."""
    path = tmp_path / "ok.safetensors"
    write_st(path, {"a": ("F32", (2, 3), F4), "b": ("F16", (4,), np.ones(4, "<f2").tobytes()),
                    "e": ("F32", (0, 3), b"")}, meta={"format": "pt"})
    with SafetensorsFile(path) as f:
        np.testing.assert_array_equal(f.tensor("a"), np.arange(6, dtype=np.float32).reshape(2, 3))
        np.testing.assert_array_equal(f.tensor("b"), np.ones(4, np.float32))
        assert f.tensor("e").shape == (0, 3)
        assert f.metadata == {"format": "pt"}


# ----------------------------------------------------------------------------------------------------------
# tensors that do not fit the model (rewriting a real fixture)

GPT2_WTE = "transformer.wte.weight"


def _rewrite(d, fn):
    p = d / "model.safetensors"
    meta, t = read_st(p)
    fn(t)
    write_st(p, t, meta)


@pytest.mark.parametrize("dt", ["I32", "U32", "I64", "I8", "BOOL", "F64", "F8_E4M3", "U16"])
def test_weight_in_unsupported_dtype(tmp_path, dt):
    d = copy_fixture("gpt2", tmp_path)
    size = {"I32": 4, "U32": 4, "I64": 8, "I8": 1, "BOOL": 1, "F64": 8, "F8_E4M3": 1, "U16": 2}[dt]

    def f(t):
        shape = t[GPT2_WTE][1]
        t[GPT2_WTE] = [dt, shape, b"\0" * (size * shape[0] * shape[1])]

    _rewrite(d, f)
    load_err(CheckpointError, d, "model.safetensors", GPT2_WTE, dt, "F32, F16 or BF16")


def test_unknown_dtype_in_model(tmp_path):
    d = copy_fixture("gpt2", tmp_path)
    _rewrite(d, lambda t: t[GPT2_WTE].__setitem__(0, "Q4_K"))
    load_err(CheckpointError, d, "model.safetensors", GPT2_WTE, "unknown dtype", "Q4_K")


def test_missing_tensor(tmp_path):
    d = copy_fixture("gpt2", tmp_path)
    _rewrite(d, lambda t: t.pop("transformer.h.1.ln_2.bias"))
    load_err(CheckpointError, d, str(d), "missing tensor", "transformer.h.1.ln_2.bias")


def test_misshaped_tensor(tmp_path):
    d = copy_fixture("gpt2", tmp_path)
    _rewrite(d, lambda t: t[GPT2_WTE].__setitem__(1, t[GPT2_WTE][1][::-1]))
    load_err(CheckpointError, d, "model.safetensors", GPT2_WTE, "shape (32, 300)", "(300, 32)")


def test_misshaped_norm(tmp_path):
    d = copy_fixture("llama_gqa2_tied", tmp_path)
    name = "model.layers.1.input_layernorm.weight"

    def f(t):
        t[name] = ["F32", [31], t[name][2][:124]]

    _rewrite(d, f)
    load_err(CheckpointError, d, "model.safetensors", name, "(31,)", "(32,)")


def test_unexpected_tensor(tmp_path):
    d = copy_fixture("llama_gqa2_tied", tmp_path)
    _rewrite(d, lambda t: t.__setitem__("model.layers.0.self_attn.rotary_bogus.weight", ["F32", [6], F4]))
    load_err(CheckpointError, d, "unexpected tensors", "rotary_bogus")


def test_header_lies_in_model_file(tmp_path):
    d = copy_fixture("gpt2", tmp_path)
    p = d / "model.safetensors"
    b = p.read_bytes()
    n = struct.unpack("<Q", b[:8])[0]
    h = json.loads(b[8:8 + n])
    s, e = h[GPT2_WTE]["data_offsets"]
    h[GPT2_WTE]["data_offsets"] = [s, e + 10 ** 9]
    p.write_bytes(st_bytes(h, b[8 + n:]))
    load_err(CheckpointError, d, "model.safetensors", GPT2_WTE, "outside the data buffer")


# ----------------------------------------------------------------------------------------------------------
# sharded checkpoints

INDEX = "model.safetensors.index.json"


def _edit_index(d, fn):
    p = d / INDEX
    idx = json.loads(p.read_text())
    fn(idx["weight_map"])
    p.write_text(json.dumps(idx))


@pytest.mark.parametrize("target,parts", [
    ("model-00009-of-00005.safetensors", ["model-00009-of-00005.safetensors", "does not exist"]),
    ("sub/model-00001-of-00005.safetensors", ["bad file name", "sub/model"]),
    ("../model-00001-of-00005.safetensors", ["bad file name", ".."]),
    ("..", ["bad file name", "'..'"]),
    ("/etc/passwd", ["bad file name", "/etc/passwd"]),
    ("..\\model-00001-of-00005.safetensors", ["bad file name"]),
    ("", ["bad file name"]),
    ("config.json", ["bad file name", "config.json"]),
    (5, ["bad file name"]),
    (None, ["bad file name"]),
])
def test_index_points_to_bad_file(tmp_path, target, parts):
    d = copy_fixture("llama_sharded", tmp_path)
    _edit_index(d, lambda wm: wm.__setitem__("model.norm.weight", target))
    load_err(CheckpointError, d, INDEX, "model.norm.weight", *parts)


def test_index_tensor_not_in_shard(tmp_path):
    d = copy_fixture("llama_sharded", tmp_path)
    _edit_index(d, lambda wm: wm.__setitem__("model.norm.weight", "model-00001-of-00005.safetensors"))
    load_err(CheckpointError, d, INDEX, "model.norm.weight", "is not in", "model-00001-of-00005.safetensors")


def test_index_names_a_tensor_no_shard_has(tmp_path):
    d = copy_fixture("llama_sharded", tmp_path)
    _edit_index(d, lambda wm: wm.__setitem__("model.bogus.weight", "model-00001-of-00005.safetensors"))
    load_err(CheckpointError, d, INDEX, "model.bogus.weight", "is not in")


def test_index_omits_a_tensor(tmp_path):
    d = copy_fixture("llama_sharded", tmp_path)
    _edit_index(d, lambda wm: wm.pop("model.norm.weight"))
    load_err(CheckpointError, d, "not listed in the index", "model.norm.weight")


@pytest.mark.parametrize("text,what", [
    ("{", "unreadable index"), ("[]", "weight_map"), ('{"weight_map": {}}', "weight_map"),
    ('{"weight_map": [1]}', "weight_map"), ('{"metadata": {}}', "weight_map"),
])
def test_index_unreadable(tmp_path, text, what):
    d = copy_fixture("llama_sharded", tmp_path)
    (d / INDEX).write_text(text)
    load_err(CheckpointError, d, INDEX, what)


def test_missing_shard_file(tmp_path):
    d = copy_fixture("llama_sharded", tmp_path)
    (d / "model-00003-of-00005.safetensors").unlink()
    load_err(CheckpointError, d, "model-00003-of-00005.safetensors", "does not exist")


# ----------------------------------------------------------------------------------------------------------
# tokenizer files


def test_bad_tokenizer_json(tmp_path):
    d = copy_fixture("gpt2", tmp_path)
    (d / "tokenizer.json").write_text("{nope")
    load_err(TokenizerError, d, "tokenizer.json")


def test_bad_tokenizer_config(tmp_path):
    d = copy_fixture("gpt2", tmp_path)
    (d / "tokenizer_config.json").write_text("{nope")
    load_err(TokenizerError, d, "tokenizer_config.json", "unreadable")


@pytest.mark.parametrize("text", ["[1, 2]", "7", '"bos"', "null"])
def test_tokenizer_config_not_an_object(tmp_path, text):
    d = copy_fixture("gpt2", tmp_path)
    (d / "tokenizer_config.json").write_text(text)
    load_err(TokenizerError, d, "tokenizer_config.json", "JSON object")


@pytest.mark.parametrize("value", [7, [1], {"content": 5}, {"content": ["x"]}, None, "not-a-token"])
def test_tokenizer_config_odd_special_tokens(tmp_path, value):
    d = copy_fixture("gpt2", tmp_path)
    (d / "tokenizer_config.json").write_text(json.dumps({"bos_token": value, "eos_token": value}))
    m = factrace.load(d)   # odd values are ignored: no bos/eos id, the tokenizer still works
    assert m.tokenizer.bos_id is None and m.tokenizer.eos_id is None
    assert len(m.encode("hello")) > 0


def test_no_tokenizer_means_ids_only(tmp_path):
    d = copy_fixture("gpt2", tmp_path)
    (d / "tokenizer.json").unlink()
    m = factrace.load(d)
    with pytest.raises(RuntimeError, match="no tokenizer"):
        m.encode("hello")
    with pytest.raises(RuntimeError, match="no tokenizer"):
        m.run("hello")
    assert m.run(np.array([1, 2, 3])).logits.shape == (3, 300)


# ----------------------------------------------------------------------------------------------------------
# run inputs


@pytest.fixture(scope="module")
def gpt2():
    return fixture_model("gpt2")


@pytest.mark.parametrize("ids,parts", [
    (np.array([1, -1, 2]), ["token id -1", "outside the vocabulary", "[0, 300)"]),
    (np.array([1, 300]), ["token id 300", "outside the vocabulary"]),
    (np.array([2 ** 40]), ["outside the vocabulary"]),
    (np.array([2 ** 63], np.uint64), ["outside the vocabulary"]),
    ([1, 2, -5], ["token id -5"]),
    ([[1, 2], [3, 1000]], ["sequence 1", "token id 1000"]),
    (np.array([], np.int64), ["empty"]),
    ([], ["empty"]),
    ([[]], ["empty"]),
    ([[1, 2], []], ["sequence 1", "empty"]),
    (np.zeros((0, 3), np.int64), ["empty batch"]),
    (np.array([1.0, 2.0]), ["integers", "float64"]),
    (np.array([1.5]), ["integers"]),
    ([np.array([1, 2]), np.array([1.0, 2.0], np.float32)], ["sequence 1", "integers"]),
    (np.array([True, False]), ["integers", "bool"]),
    ([2 ** 70], ["integers"]),
    (np.arange(65) % 300, ["65 tokens", "context is 64"]),
    ([list(range(10)), list(range(100))], ["sequence 1", "100 tokens", "64"]),
    (None, ["cannot run on NoneType"]),
    (3.5, ["cannot run on float"]),
    (np.zeros((2, 3, 4), np.int64), ["cannot run on"]),
])
def test_bad_ids(gpt2, ids, parts):
    with pytest.raises(InputError) as ei:
        gpt2.run(ids)
    msg = str(ei.value)
    for p in parts:
        assert p in msg, f"{p!r} not in {msg!r}"


def test_float_list_ids_rejected(gpt2):
    with pytest.raises(InputError):
        gpt2.run([1.5, 2.0])


def test_ids_at_limits_accepted(gpt2):
    assert gpt2.run(np.array([0, 299])).logits.shape == (2, 300)
    assert gpt2.run(np.arange(64) % 300).logits.shape == (64, 300)
    for dt in (np.int8, np.uint8, np.int16, np.uint16, np.int32, np.uint32, np.int64, np.uint64):
        np.testing.assert_array_equal(gpt2.run(np.array([3, 4], dt)).logits, gpt2.run(np.array([3, 4])).logits)


def test_non_contiguous_ids(gpt2):
    ids = np.arange(20)[::2]
    np.testing.assert_array_equal(gpt2.run(ids).logits, gpt2.run(np.ascontiguousarray(ids)).logits)


@pytest.mark.parametrize("capture", [["bogus"], ["attn_out", "mlp"], ["logits"], ("Embed",)])
def test_bad_capture_names(gpt2, capture):
    with pytest.raises(ValueError) as ei:
        gpt2.run(np.array([1, 2, 3]), capture=capture)
    msg = str(ei.value)
    assert "unknown capture" in msg and "resid_pre" in msg
    assert [c for c in capture if c not in ("attn_out",)][0] in msg


def test_bad_logits_mode(gpt2):
    with pytest.raises(ValueError, match="logits must be"):
        gpt2.run(np.array([1, 2, 3]), logits="first")


# ----------------------------------------------------------------------------------------------------------
# interventions

D = 32  # d_model of the gpt2 fixture; 2 layers


@pytest.mark.parametrize("make,exc,parts", [
    (lambda: factrace.add("embed", np.zeros(D), positions=[5]), IndexError, ["embed", "out of range", "5 tokens"]),
    (lambda: factrace.add("embed", np.zeros(D), positions=[-6]), IndexError, ["out of range"]),
    (lambda: factrace.zero("mlp_out", positions=[100]), IndexError, ["mlp_out", "out of range"]),
    (lambda: factrace.zero("mlp_out", layers=[2]), IndexError, ["layers", "out of range"]),
    (lambda: factrace.zero("attn_out", layers=[-3]), IndexError, ["layers", "out of range"]),
    (lambda: factrace.set_values("resid_post", np.zeros((2, 3, D)), layers=[0, 1], positions=[0, 1]), ValueError,
     ["does not broadcast", "(2, 3, 32)", "(2, 2, 32)"]),
    (lambda: factrace.add("attn_out", np.zeros(D + 1)), ValueError, ["does not broadcast", "(33,)"]),
    (lambda: factrace.add("embed", np.zeros((3, D)), positions=[0, 1]), ValueError, ["does not broadcast"]),
    (lambda: factrace.add("embed", np.zeros(D), layers=[0]), ValueError, ["'embed' site has no layers"]),
    (lambda: factrace.block_attention(layers=[7], queries=[-1], keys=[0]), IndexError, ["block_attention", "layer 7"]),
    (lambda: factrace.block_attention(layers=[0], queries=[9], keys=[0]), IndexError, ["block_attention queries"]),
    (lambda: factrace.block_attention(layers=[0], queries=[-1], keys=[-9]), IndexError, ["block_attention keys"]),
    (lambda: factrace.zero("mlp_out", seq=1), IndexError, ["sequence 1", "batch has 1"]),
    (lambda: factrace.zero("mlp_out", seq=-1), IndexError, ["sequence -1"]),
])
def test_bad_interventions(gpt2, make, exc, parts):
    with pytest.raises(exc) as ei:
        gpt2.run(np.arange(5), interventions=[make()])
    msg = str(ei.value)
    for p in parts:
        assert p in msg, f"{p!r} not in {msg!r}"


def test_bad_intervention_objects(gpt2):
    with pytest.raises(ValueError, match="unknown site 'resid_mid_x'"):
        factrace.zero("resid_mid_x")
    with pytest.raises(TypeError, match="Intervention objects"):
        gpt2.run(np.arange(5), interventions=[("zero", "mlp_out")])
    r = gpt2.run(np.arange(5), capture=["attn_out"])
    with pytest.raises(ValueError, match="did not capture 'mlp_out'"):
        factrace.freeze("mlp_out", r)


def test_intervention_error_leaves_model_usable(gpt2):
    ids = np.arange(6)
    before = gpt2.run(ids, capture=True)
    with pytest.raises(IndexError):
        gpt2.run(ids, interventions=[factrace.zero("mlp_out", positions=[0]), factrace.zero("mlp_out", layers=[9])])
    after = gpt2.run(ids, capture=True)
    np.testing.assert_array_equal(before.logits, after.logits)
    np.testing.assert_array_equal(before.resid_final, after.resid_final)


def test_float_positions_rejected(gpt2):
    with pytest.raises((TypeError, ValueError)):
        gpt2.run(np.arange(5), interventions=[factrace.zero("mlp_out", positions=[1.5])])
