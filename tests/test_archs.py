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
    """(model, compare_with_reference): the fixture model, or for a Gemma fixture whose
    query_pre_attn_scalar GGUF cannot store, the same checkpoint with it set to head_dim (then the GGUF file
    is compared with that safetensors model only). None when GGUF cannot express the config at all."""
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
    """Gemma 3's config with what llama.cpp's gemma3 GGUF fixes: query_pre_attn_scalar = head_dim, every
    6th layer global."""
    L = cfg.n_layers
    return dict(cfg.raw, query_pre_attn_scalar=cfg.d_head,
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
