"""Weights kept as stored (factrace.load(..., weights="stored"), the default) against the float32 loader: the
same float32 values, the same runs, on every fixture and every packaged real model; the fused q/k/v and
gate/up matrices; the thread pool (any thread count, deterministic for a given one); StoredWeight's row
operations. The kernels themselves (every format x regime x row count x ISA) are in test_matmul_kernels.py."""
import numpy as np
import pytest

import factrace
from factrace.io import packaged
from factrace.io.stored import StoredWeight, concat
from conftest import FIXTURES, MODEL_FIXTURES, expected

REAL = [n for n in ("smollm2", "gemma3-270m", "qwen2.5-coder-0.5b") if packaged.is_installed(n)]
_cache = {}


def pair(src):
    if src not in _cache:
        _cache[src] = (factrace.load(src), factrace.load(src, weights="float32"))
    return _cache[src]


def _canon(m):
    return {k: v for k, v in m.weights.items()}


@pytest.mark.parametrize("name", MODEL_FIXTURES)
def test_fixture_stored_equals_float32(name):
    s, f = pair(FIXTURES / name)
    for k, w in _canon(f).items():
        np.testing.assert_array_equal(s.W(k), w, err_msg=k)  # the same float32 values
    e = expected(name)
    for p in ("p0", "p1"):
        rs, rf = s.run(e[f"{p}_ids"], capture=True), f.run(e[f"{p}_ids"], capture=True)
        for field in ("logits", "resid_pre", "attn_out", "mlp_out", "attn", "head_out", "resid_final"):
            np.testing.assert_allclose(getattr(rs, field), getattr(rf, field), rtol=1e-5, atol=1e-5, err_msg=field)
        assert np.abs(rs.logits - e[f"{p}_logits"]).max() <= 1e-4


def test_fixture_formats_are_kept():
    s, _ = pair(FIXTURES / "llama_gqa4_llama3rope_bf16")
    assert s.stored("W_down", 0).type_name == "BF16" and s.stored("W_U").type_name == "BF16"
    s, _ = pair(FIXTURES / "llama_linear_rope_f16_headdim")
    assert s.stored("W_Q", 0).type_name == "F16"
    assert isinstance(s.stored("ln1_w", 0), np.ndarray) and s.stored("ln1_w", 0).dtype == np.float32


@pytest.mark.parametrize("name", ["gpt2", "qwen2", "llama_gqa4_llama3rope_bf16"])
def test_fused_products_share_memory(name):
    s, _ = pair(FIXTURES / name)  # the canonical parts are views of one fused matrix: no second copy
    q, k, v = (s.stored(n, 0).data for n in ("W_Q", "W_K", "W_V"))
    assert q.base is not None and q.base is k.base is v.base
    assert q.__array_interface__["data"][0] + q.nbytes == k.__array_interface__["data"][0]
    if s.config.gated_mlp:
        assert s.stored("W_gate", 0).data.base is s.stored("W_up", 0).data.base


@pytest.mark.realmodel
@pytest.mark.parametrize("name", REAL)
def test_real_model_stored_equals_float32(name):
    s, f = pair(name)
    kinds = {w.type_name for w in s.weights.values() if isinstance(w, StoredWeight)}
    assert kinds - {"F32"}, kinds  # quantized blocks kept
    for key in ("W_E", "blocks.0.W_Q", "blocks.0.W_V", "blocks.1.W_down", "W_U"):
        np.testing.assert_array_equal(s.W(key), f.weights[key], err_msg=key)  # bit-identical dequantization
    rng = np.random.default_rng(0)
    for T in (1, 2, 7, 16, 17, 64, 300):
        ids = rng.integers(0, s.config.vocab_size, T).astype(np.int32)
        ls, lf = s.run(ids).logits, f.run(ids).logits
        scale = np.abs(lf).max()
        assert np.abs(ls - lf).max() <= 1e-4 * scale, T
    ids = s.encode("The Eiffel Tower is located in the city of")
    assert s.decode([int(s.run(ids).logits[-1].argmax())]) == " Paris"


@pytest.mark.realmodel
@pytest.mark.parametrize("name", REAL[:1])
def test_threads_any_count_deterministic_per_count(name):
    s, _ = pair(name)
    ids = [np.arange(1, 40, dtype=np.int32), np.arange(5, 9, dtype=np.int32)]
    out = {}
    try:
        for n in (1, 2, 3):
            s.set_num_threads(n)
            a, b = s.run(ids), s.run(ids)
            for ra, rb in zip(a, b):
                np.testing.assert_array_equal(ra.logits, rb.logits)  # the same thread count: bit-identical
            out[n] = a
        for n in (2, 3):
            for r1, rn in zip(out[1], out[n]):
                np.testing.assert_allclose(rn.logits, r1.logits, rtol=1e-5, atol=1e-4)
    finally:
        s.set_num_threads(factrace.get_num_threads())


def test_default_threads_follow_set_num_threads():
    m = factrace.load(FIXTURES / "gpt2")
    old = factrace.get_num_threads()
    try:
        factrace.set_num_threads(3)
        assert m.threads == 3
        m.set_num_threads(1)  # its own setting: no longer follows the default
        factrace.set_num_threads(2)
        assert m.threads == 1 and factrace.load(FIXTURES / "gpt2").threads == 2
    finally:
        factrace.set_num_threads(old)


def test_project_and_rows_match_float32():
    s, f = pair(FIXTURES / "llama_gqa4_llama3rope_bf16")
    x = np.random.default_rng(0).standard_normal((5, s.config.d_model)).astype(np.float32)
    np.testing.assert_allclose(s.project(x), x @ f.W("W_U").T, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(s.W_rows("W_E", [3, 0, 3]), f.W("W_E")[[3, 0, 3]])


def test_stored_weight_row_operations():
    rng = np.random.default_rng(0)
    a = rng.standard_normal((6, 4)).astype(np.float32)
    w = StoredWeight.from_float32(a)
    np.testing.assert_array_equal(w.transpose().float32(), a.T)
    np.testing.assert_array_equal(w.rows(1, 4).float32(), a[1:4])
    np.testing.assert_array_equal(w.take([5, 0, 2]).float32(), a[[5, 0, 2]])
    np.testing.assert_array_equal(concat([w.rows(0, 2), w.rows(4, 6)]).float32(), a[[0, 1, 4, 5]])
    bf = StoredWeight(30, (2, 4), (a[:2].view(np.uint32) >> 16).astype(np.uint16).view(np.uint8))
    np.testing.assert_array_equal(bf.transpose().float32(), bf.float32().T)
    q = StoredWeight(8, (2, 32), np.zeros((2, 34), np.uint8))  # Q8_0: blocks, no transpose
    with pytest.raises(ValueError, match="cannot be transposed"):
        q.transpose()
    with pytest.raises(ValueError, match="whole number"):
        StoredWeight(8, (2, 31), np.zeros((2, 34), np.uint8))


def test_bad_weights_mode():
    with pytest.raises(ValueError, match="stored.*float32"):
        factrace.load(FIXTURES / "gpt2", weights="int8")
