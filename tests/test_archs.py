"""The architecture table (factrace/io/archs.py): every entry is well formed, parses its fixtures' configs,
loads them from safetensors and (where GGUF can express the config) from a GGUF file written from the
same table, and reproduces the committed reference logits of transformers."""
import json
import shutil
from dataclasses import fields

import numpy as np
import pytest

import factrace
from factrace.io import archs as A
from factrace.io.config import ACTS, ModelConfig, from_hf_config
from factrace.io.weights import TRANSFORMS, canonical_shape
from conftest import FIXTURES, MODEL_FIXTURES, expected, fixture_model
from gguf_from_model import representable, write_gguf

TOL = 1e-4


def _fixture_arch(name):
    cfg = json.loads((FIXTURES / name / "config.json").read_text())
    return A.ALIASES.get(cfg["architectures"][0], cfg["architectures"][0])


FIXTURE_ARCH = {n: _fixture_arch(n) for n in MODEL_FIXTURES}
CONFIG_FLAGS = {f.name for f in fields(ModelConfig)}


@pytest.mark.parametrize("arch", A.SUPPORTED_ARCHS)
def test_every_entry_has_a_fixture(arch):
    assert arch in FIXTURE_ARCH.values(), f"no fixture in tests/fixtures/models exercises {arch}"


@pytest.mark.parametrize("arch", A.SUPPORTED_ARCHS)
def test_entry_is_well_formed(arch):
    a = A.ARCHS[arch]
    assert a.windows in A.WINDOW_RULES and a.rope in A.ROPE_RULES and a.scales in A.SCALE_RULES
    assert set(a.sizes) <= CONFIG_FLAGS and set(a.flags) <= CONFIG_FLAGS and set(a.options) <= CONFIG_FLAGS
    assert a.act.default is A.REQUIRED or a.act.default in ACTS
    lists = [a.tensors] + ([a.gguf.tensors] if a.gguf else [])
    for tensors in lists:
        for t in tensors:
            assert t.fn in TRANSFORMS, t
            for cond in (t.when, t.optional):
                if isinstance(cond, str):
                    assert cond.lstrip("!") in CONFIG_FLAGS, t
            assert ("{i}" in t.name) != t.glob, t  # per-layer names carry the layer index
            cfg = from_hf_config(json.loads((FIXTURES / _first_fixture(arch) / "config.json").read_text()))
            for c in t.to:
                canonical_shape(c, cfg)  # a canonical name
        # no canonical weight is produced by two stored tensors
        outs = [c for t in tensors for c in t.to]
        assert len(outs) == len(set(outs)), arch
    if a.gguf:
        assert A.GGUF_ARCHS[a.gguf.arch] is a
        for k, (key, default) in a.gguf.keys.items():
            assert isinstance(key, str) and not key.startswith(a.gguf.arch)


def _first_fixture(arch):
    return next(n for n, a in FIXTURE_ARCH.items() if a == arch)


def test_lookup_tables_are_consistent():
    assert len(A.MODEL_TYPES) == sum(len(a.model_types) for a in A.ARCHS.values())
    for mt, name in A.MODEL_TYPES.items():
        assert from_hf_config({"model_type": mt, **_minimal(name)}).arch == name
    with pytest.raises(factrace.ConfigError, match="not supported; supported: GPT2LMHeadModel"):
        A.lookup("BertForMaskedLM", "x")


def _minimal(arch):
    """A config dict with only the required keys of an entry (the rest from its defaults)."""
    a = A.ARCHS[arch]
    vals = {"d_model": 256, "n_layers": 2, "n_heads": 4, "vocab_size": 50, "d_mlp": 64}
    out = {}
    for f, key in a.sizes.items():
        if key.default is A.REQUIRED:
            out[key.names[0]] = vals[f]
    return out


@pytest.mark.parametrize("name", MODEL_FIXTURES)
def test_fixture_through_its_entry(name):
    raw = json.loads((FIXTURES / name / "config.json").read_text())
    cfg = from_hf_config(raw, str(FIXTURES / name / "config.json"))
    assert cfg.arch == FIXTURE_ARCH[name]
    m = fixture_model(name)
    e = expected(name)
    for p in ("p0", "p1"):
        r = m.run(e[f"{p}_ids"], logits="all")
        assert np.abs(r.logits - e[f"{p}_logits"]).max() <= TOL


def _gguf_ready(name, tmp_path):
    """(model, compare_with_reference): the fixture model, or for a fixture with a value GGUF cannot store
    (Gemma's query_pre_attn_scalar, GPT-NeoX's gelu_new), the same checkpoint with it set to what llama.cpp
    fixes (then the GGUF file is compared with that safetensors model only). None when GGUF cannot express
    the config at all."""
    m = fixture_model(name)
    if not representable(m.config):
        return m, True
    raw = _patched(m.config)
    if representable(from_hf_config(raw)):
        return None
    d = tmp_path / "patched"
    shutil.copytree(FIXTURES / name, d)
    (d / "config.json").write_text(json.dumps(raw))
    return factrace.load(d), False


def _patched(cfg) -> dict:
    """The config with what llama.cpp's GGUF fixes: for Gemma 3 query_pre_attn_scalar = head_dim, every
    6th layer global; the activation where the format does not store it (gptneox: exact gelu)."""
    L = cfg.n_layers
    spec, act_key = A.ARCHS[cfg.arch].gguf, A.ARCHS[cfg.arch].act.names[0]
    act = {act_key: spec.fixed[act_key]} if spec is not None and act_key in spec.fixed else {}
    return dict(cfg.raw, query_pre_attn_scalar=cfg.d_head, **act,
                layer_types=["sliding_attention" if (i + 1) % 6 else "full_attention" for i in range(L)])


GGUF_READY = [n for n in MODEL_FIXTURES if not representable(fixture_model(n).config)
              or not representable(from_hf_config(_patched(fixture_model(n).config)))]


def test_gguf_covers_every_gguf_entry():
    covered = {FIXTURE_ARCH[n] for n in GGUF_READY}
    assert covered == {a.name for a in A.ARCHS.values() if a.gguf is not None}


@pytest.mark.parametrize("name", GGUF_READY)
def test_fixture_through_its_gguf_entry(name, tmp_path):
    pytest.importorskip("gguf")
    m, reference = _gguf_ready(name, tmp_path)
    path = tmp_path / f"{name}.gguf"
    write_gguf(m, path)
    g = factrace.load(path)
    assert g.config.arch == m.config.arch
    for f in ("n_layers", "n_heads", "n_kv_heads", "d_head", "d_mlp", "tied", "qk_norm", "post_norms",
              "layer_window", "layer_rope", "attn_scale", "embed_scale", "parallel", "rope_dim", "rope_interleaved",
              "act"):
        assert getattr(g.config, f) == getattr(m.config, f), f
    assert g.config.norm_eps == pytest.approx(m.config.norm_eps, rel=1e-6)  # GGUF stores it as float32
    e = expected(name)
    for p in ("p0", "p1"):
        r = g.run(e[f"{p}_ids"], logits="all")
        np.testing.assert_allclose(r.logits, m.run(e[f"{p}_ids"]).logits, atol=2e-5, rtol=0)
        if reference:
            assert np.abs(r.logits - e[f"{p}_logits"]).max() <= TOL


def _llama_cpp_qkv(t: np.ndarray, n_head: int) -> np.ndarray:
    """What llama.cpp's GPTNeoXModel converter does to query_key_value (weight (3d, d) or bias (3d,)): the
    per-head (n_head, 3, head_size, ...) rows regrouped into all q rows, then all k rows, then all v rows."""
    v = t.reshape(n_head, 3, t.shape[0] // (3 * n_head), *t.shape[1:])
    return np.concatenate([v[:, j].reshape(-1, *t.shape[1:]) for j in range(3)], 0)


def test_gptneox_gguf_has_llama_cpps_qkv_order_and_rotary_count(tmp_path):
    """The synthetic gptneox GGUF stores attn_qkv exactly as llama.cpp's converter writes it from the
    Hugging Face tensor, and the loader undoes exactly that (split into q, k, v); rope.dimension_count
    (the rotated dims per head) comes back as rotary_pct."""
    pytest.importorskip("gguf")
    from factrace.io.gguf import GGUFFile
    from factrace.io.safetensors import Checkpoint

    name = "pythia_parallel"
    m = fixture_model(name)
    path = tmp_path / "neox.gguf"
    write_gguf(m, path)
    f = GGUFFile(path)
    assert f.metadata["general.architecture"] == "gptneox"
    assert int(f.metadata["gptneox.rope.dimension_count"]) == m.config.rope_dim == 4
    assert bool(f.metadata["gptneox.use_parallel_residual"]) is True
    with Checkpoint(FIXTURES / name) as ck:
        for i in range(m.config.n_layers):
            for kind in ("weight", "bias"):
                hf = ck.tensor(f"gpt_neox.layers.{i}.attention.query_key_value.{kind}")
                np.testing.assert_array_equal(f.tensor(f"blk.{i}.attn_qkv.{kind}"), _llama_cpp_qkv(hf, m.config.n_heads))
    g = factrace.load(path)
    assert g.config.parallel and g.config.rope_dim == 4 and g.config.act == "gelu"
    for w in ("W_Q", "W_K", "W_V", "b_Q", "b_K", "b_V"):
        np.testing.assert_array_equal(g.W(w, 1), m.W(w, 1))


@pytest.mark.parametrize("n_rot,d,H", [(4, 32, 2), (20, 640, 8), (24, 640, 8), (32, 512, 8), (2, 96, 3), (64, 256, 1)])
def test_gptneox_gguf_rotary_count_round_trips(n_rot, d, H):
    c = {"hidden_size": d, "num_attention_heads": H}
    A.GGUF_EXTRAS["gptneox"](lambda k: n_rot if k == "rope.dimension_count" else None, c)
    assert int((d // H) * c["rotary_pct"]) == n_rot


@pytest.mark.parametrize("changes,rope_dim", [
    ({}, 4),                                                      # legacy rotary_pct 0.25 of 16
    ({"rotary_pct": 0.5}, 8),
    ({"rotary_pct": None, "rope_parameters": {"rope_theta": 5000, "partial_rotary_factor": 1.0}}, 16),
    ({"rotary_pct": None}, 4),                                    # transformers' default 0.25
])
def test_neox_partial_rotary_keys(changes, rope_dim):
    raw = dict(json.loads((FIXTURES / "pythia_parallel" / "config.json").read_text()), **changes)
    raw = {k: v for k, v in raw.items() if v is not None}
    cfg = from_hf_config(raw)
    assert cfg.rope_dim == rope_dim and cfg.rope_inv_freq.shape == (1, rope_dim // 2)
    base = raw.get("rope_parameters", {}).get("rope_theta", raw.get("rotary_emb_base"))
    np.testing.assert_allclose(cfg.rope_inv_freq[0, 1], base ** (-2 / rope_dim), rtol=1e-6)


@pytest.mark.parametrize("arch,changes,what", [
    ("pythia_parallel", {"rotary_pct": 0.1}, "rotary dims"),      # int(16 * 0.1) = 1: odd
    ("pythia_parallel", {"rotary_pct": 0.0}, "rotary_pct"),
    ("pythia_parallel", {"rotary_pct": 2.0}, "rotary dims"),
    ("gptj", {"rotary_dim": 3}, "rotary dims"),
    ("gptj", {"rotary_dim": 16}, "rotary dims"),                  # > head_dim 8
    ("gptj", {"rotary_dim": "4"}, "rotary_dim"),
])
def test_rotary_dims_are_checked(arch, changes, what):
    raw = dict(json.loads((FIXTURES / arch / "config.json").read_text()), **changes)
    with pytest.raises(factrace.ConfigError, match=what):
        from_hf_config(raw)
