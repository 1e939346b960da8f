"""factrace vs Hugging Face transformers on tiny random models (committed reference outputs).

The references were produced by tests/oracle.py (transformers, eager attention, float32); the live
comparison is tests/test_parity_live.py."""
import numpy as np
import pytest

import factrace
from conftest import MODEL_FIXTURES, PARALLEL_FIXTURES, expected, fixture_model

TOL = 1e-4


@pytest.mark.parametrize("name", MODEL_FIXTURES)
@pytest.mark.parametrize("p", ["p0", "p1"])
def test_logits_and_states_match_transformers(name, p):
    m = fixture_model(name)
    e = expected(name)
    ids = e[f"{p}_ids"]
    r = m.run(ids, capture=True)
    assert np.abs(r.logits - e[f"{p}_logits"]).max() <= TOL
    for field in ("embed", "resid_pre", "attn_out", "mlp_out", "resid_final", "attn"):
        got, want = getattr(r, field), e[f"{p}_{field}"]
        assert got.shape == want.shape, field
        assert np.abs(got - want).max() <= TOL, field
    assert np.abs(r.z.reshape(r.z.shape[0], r.z.shape[1], -1) - e[f"{p}_attn_z"]).max() <= TOL


@pytest.mark.parametrize("name", MODEL_FIXTURES)
def test_parts_add_up(name):
    m = fixture_model(name)
    ids = expected(name)["p1_ids"]
    r = m.run(ids, capture=True)
    total = r.embed + r.attn_out.sum(0) + r.mlp_out.sum(0)
    scale = np.abs(r.resid_final).max()
    assert np.abs(total - r.resid_final).max() <= 1e-5 * max(1.0, scale)
    for l in range(m.config.n_layers):
        heads = r.head_out[l].sum(0) + m.b_O(l)
        if m.config.post_norms:  # Gemma: b_O is absent, heads are taken through the post-norm
            assert m.W("b_O", l) is None
        assert np.abs(heads - r.attn_out[l]).max() <= 1e-5 * max(1.0, np.abs(r.attn_out[l]).max())
    # each block's input is the previous block's input plus its two outputs
    for l in range(m.config.n_layers - 1):
        np.testing.assert_allclose(r.resid_pre[l + 1], r.resid_pre[l] + r.attn_out[l] + r.mlp_out[l], atol=1e-5)


@pytest.mark.parametrize("name", PARALLEL_FIXTURES)
def test_parallel_block_has_no_resid_mid(name):
    """GPT-NeoX (use_parallel_residual) and GPT-J: attention and MLP both read resid_pre, so there is no
    resid_mid: capture=True leaves it out, asking for it is an InputError (the C core refuses it too)."""
    m = fixture_model(name)
    assert m.config.parallel
    ids = expected(name)["p0_ids"]
    assert m.run(ids, capture=True).resid_mid is None
    with pytest.raises(factrace.InputError, match="no resid_mid"):
        m.run(ids, capture=["resid_mid"])
    with pytest.raises(ValueError, match="no resid_mid"):
        m._core.forward(np.array([len(ids)], np.int32), ids=ids.astype(np.int32),
                        capture={"resid_mid": np.empty((m.config.n_layers, len(ids), m.config.d_model), np.float32)})
    # the MLP reads the block input: its output is the MLP of ln2(resid_pre), not of resid_pre + attn_out
    r = m.run(ids, capture=["resid_pre", "mlp_out"])
    l = m.config.n_layers - 1
    h = _layernorm(r.resid_pre[l], m.W("ln2_w", l), m.W("ln2_b", l), m.config.norm_eps)
    up = h @ m.W("W_up", l).astype(np.float64).T + m.W("b_up", l)
    act = 0.5 * up * (1 + np.tanh(np.sqrt(2 / np.pi) * (up + 0.044715 * up ** 3))) if m.config.act == "gelu_new" else \
        0.5 * up * (1 + np.vectorize(__import__("math").erf)(up / np.sqrt(2)))
    np.testing.assert_allclose(act @ m.W("W_down", l).astype(np.float64).T + m.W("b_down", l), r.mlp_out[l], atol=1e-4)


def _layernorm(x, w, b, eps):
    x = x.astype(np.float64)
    return (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + eps) * w + b


@pytest.mark.parametrize("name", MODEL_FIXTURES)
def test_batch_equals_single_runs(name):
    m = fixture_model(name)
    e = expected(name)
    seqs = [e["p0_ids"], e["p1_ids"], e["p0_ids"][:3]]
    batch = m.run(seqs, capture=["attn_out", "attn", "head_out"])
    for s, rb in zip(seqs, batch):
        r1 = m.run(s, capture=["attn_out", "attn", "head_out"])
        np.testing.assert_allclose(rb.logits, r1.logits, atol=5e-5, rtol=1e-5)
        np.testing.assert_allclose(rb.attn_out, r1.attn_out, atol=5e-5, rtol=1e-5)
        np.testing.assert_allclose(rb.attn, r1.attn, atol=5e-6, rtol=0)  # GEMMs of other sizes round differently
        np.testing.assert_allclose(rb.head_out, r1.head_out, atol=5e-5, rtol=1e-5)
    last = m.run(seqs, logits="last")
    for s, rl, rb in zip(seqs, last, batch):
        np.testing.assert_allclose(rl.logits[0], rb.logits[-1], atol=5e-5, rtol=1e-5)
