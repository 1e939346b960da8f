"""The C core's shortcuts, each against the plain computation:
* last-block pruning: when only some rows' logits are wanted (and no per-layer state is captured) the
  last block computes only those rows, plus every row's keys and values; the logits must equal those of
  the full block (which runs whenever resid_final is captured too), with interventions and edge blocks
  at the last layer, prefix caches, long sequences and odd logit_rows;
* rows whose MLP output a 'set' replaces are not computed;
* target probabilities (capture 'target_prob') computed in C from the logits, against numpy."""
import numpy as np
import pytest

from factrace import interventions as iv
from factrace.interventions import compile_interventions

from conftest import MODEL_FIXTURES, PARALLEL_FIXTURES, fixture_model


def _forward(m, lens, ids, logit_rows, full, **kw):
    V, N, d = m.config.vocab_size, int(sum(lens)), m.config.d_model
    cap = {"logits": np.empty((len(logit_rows), V), np.float32)}
    if full:  # capturing resid_final turns pruning off
        cap["resid_final"] = np.empty((N, d), np.float32)
    m._core.forward(np.asarray(lens, np.int32), ids=np.asarray(ids, np.int32), capture=cap,
                    logit_rows=np.asarray(logit_rows, np.int64), **kw)
    return cap["logits"]


def _check(m, lens, ids, rows, **kw):
    pruned = _forward(m, lens, ids, rows, False, **kw)
    full = _forward(m, lens, ids, rows, True, **kw)
    scale = max(1.0, float(np.abs(full).max()))
    np.testing.assert_allclose(pruned, full, rtol=0, atol=1e-5 * scale)
    return pruned


@pytest.mark.parametrize("name", MODEL_FIXTURES)
def test_pruned_last_block_equals_full(name):
    m = fixture_model(name)
    c = m.config
    rs = np.random.RandomState(0)
    lens = [5, 1, 40, 9]  # 40 rows: the full block attends through matrix products, the pruned one per row
    N = sum(lens)
    ids = rs.randint(0, c.vocab_size, N)
    row0 = np.concatenate([[0], np.cumsum(lens)[:-1]])
    last = row0 + np.array(lens) - 1
    _check(m, lens, ids, last)
    _check(m, lens, ids, [N - 1, 3, 3, 45, 0])           # unsorted, repeated, mid-sequence rows
    # interventions and edge blocks at the last layer, on wanted and unwanted rows
    L, d = c.n_layers, c.d_model
    ivs = [iv.set_values("attn_out", rs.randn(d).astype(np.float32), layers=L - 1, positions=[0, 4], seq=0),
           iv.add("mlp_out", rs.randn(d).astype(np.float32), layers=L - 1, positions=[2, 39], seq=2),
           iv.zero("resid_post", layers=L - 1, positions=[8], seq=3),
           iv.block_attention(layers=L - 1, queries=[4], keys=[0, 1], seq=0),
           iv.block_attention(layers=[L - 2, L - 1], queries=[39], keys=range(30), seq=2)]
    kw = compile_interventions(ivs, lens, m.config)
    out = _check(m, lens, ids, last, **kw)
    assert not np.allclose(out, _forward(m, lens, ids, last, True)), "the interventions changed nothing"


@pytest.mark.parametrize("name", ["gpt2", "qwen3", "gemma3"] + PARALLEL_FIXTURES)
def test_pruned_last_block_with_prefix_and_resid_in(name):
    """The tracing engine's calls: rows resumed at a layer from resid_in, earlier positions from a cache."""
    m = fixture_model(name)
    c = m.config
    T, S = 9, 3
    ids = np.random.RandomState(1).randint(0, c.vocab_size, T).astype(np.int32)
    kvd = c.n_kv_heads * c.d_head
    cap = {k: np.empty((c.n_layers, S * T, n), np.float32) for k, n in
           (("resid_pre", c.d_model), ("k_cache", kvd), ("v_cache", kvd))}
    m._core.forward(np.full(S, T, np.int32), ids=np.tile(ids, S), capture=cap)
    for start_layer in (1, c.n_layers - 1):
        for t in (0, 4, T - 1):
            lens = [T - t] * S
            x = np.concatenate([cap["resid_pre"][start_layer, s * T + t:(s + 1) * T] for s in range(S)])
            x[0] += 0.5  # a restored row
            kw = dict(resid_in=np.ascontiguousarray(x), start_layer=start_layer, seq_starts=np.full(S, t, np.int32),
                      prefix_k=cap["k_cache"], prefix_v=cap["v_cache"],
                      prefix_rows=(np.arange(S) * T).astype(np.int64))
            rows = np.cumsum(lens) - 1
            V = c.vocab_size
            outs = []
            for full in (False, True):
                o = {"logits": np.empty((S, V), np.float32)}
                if full:
                    o["resid_final"] = np.empty((S * (T - t), c.d_model), np.float32)
                m._core.forward(np.array(lens, np.int32), capture=o, logit_rows=rows.astype(np.int64), **kw)
                outs.append(o["logits"])
            np.testing.assert_allclose(outs[0], outs[1], rtol=0, atol=1e-5 * max(1.0, np.abs(outs[1]).max()))


def test_run_last_logits_pruned_matches_all_logits():
    """The public path: m.run(logits='last') (pruned) equals the last row of m.run() (all rows)."""
    m = fixture_model("llama_gqa2_tied")
    ids = [[1, 2, 3, 4, 5], [7, 8]]
    a = m.run(ids, logits="last")
    b = m.run(ids)
    for ra, rb in zip(a, b):
        np.testing.assert_allclose(ra.logits[0], rb.logits[-1], rtol=0, atol=1e-5)


@pytest.mark.parametrize("name", MODEL_FIXTURES)
def test_set_mlp_rows_are_not_computed_but_equal(name):
    """Rows whose MLP output a 'set' replaces are skipped by the C core; the result must equal computing
    the MLP and then replacing it, written here as an 'add' of (value - the computed mlp_out)."""
    m = fixture_model(name)
    c = m.config
    L = c.n_layers
    rs = np.random.RandomState(2)
    ids = [rs.randint(0, c.vocab_size, 7), rs.randint(0, c.vocab_size, 4)]
    cap = ["mlp_out", "resid_final"]
    value = rs.randn(2, 2, c.d_model).astype(np.float32)  # (layers 0 and L-1, positions 1 and 3 of seq 0)

    def set_at(layers, vals):
        return [iv.set_values("mlp_out", vals, layers=layers, positions=[1, 3], seq=0),
                iv.set_values("mlp_out", vals[:, 1:], layers=layers, positions=[3], seq=1)]

    def add_at(layers, vals, ref):
        return [iv.add("mlp_out", vals - ref[0].mlp_out[layers][:, [1, 3]], layers=layers, positions=[1, 3], seq=0),
                iv.add("mlp_out", vals[:, 1:] - ref[1].mlp_out[layers][:, [3]], layers=layers, positions=[3], seq=1)]

    def same(a, b):
        for ra, rb in zip(a, b):
            np.testing.assert_allclose(ra.mlp_out, rb.mlp_out, rtol=0, atol=1e-5)
            np.testing.assert_allclose(ra.logits, rb.logits, rtol=0, atol=1e-4)

    base = m.run(ids, capture=cap)
    first = m.run(ids, interventions=set_at([0], value[:1]), capture=cap)
    same(first, m.run(ids, interventions=add_at([0], value[:1], base), capture=cap))
    np.testing.assert_array_equal(first[0].mlp_out[0, [1, 3]], value[0])
    np.testing.assert_array_equal(first[1].mlp_out[0, 3], value[0, 1])
    last = m.run(ids, interventions=set_at([L - 1], value[1:]), capture=cap)
    same(last, m.run(ids, interventions=add_at([L - 1], value[1:], base), capture=cap))
    both = m.run(ids, interventions=set_at([0, L - 1], value), capture=cap)
    same(both, m.run(ids, interventions=add_at([0], value[:1], base) + add_at([L - 1], value[1:], first), capture=cap))
    assert not np.allclose(both[0].logits, base[0].logits)


@pytest.mark.parametrize("name", MODEL_FIXTURES)
def test_target_prob_equals_numpy_softmax(name):
    from factrace.methods._common import _softmax_prob

    m = fixture_model(name)
    c = m.config
    rs = np.random.RandomState(3)
    lens = [6, 3, 9]
    ids = rs.randint(0, c.vocab_size, sum(lens)).astype(np.int32)
    rows = np.array([5, 0, 8, 17, 17], np.int64)
    targets = rs.randint(0, c.vocab_size, len(rows)).astype(np.int64)
    targets[-1] = 0
    logits = _forward(m, lens, ids, rows, True)
    want = np.array([_softmax_prob(logits[i:i + 1], int(t))[0] for i, t in enumerate(targets)])
    for extra in ({}, {"logits": np.empty((len(rows), c.vocab_size), np.float32)}):  # own buffer / captured
        cap = {"target_prob": np.empty(len(rows), np.float64), **extra}
        m._core.forward(np.array(lens, np.int32), ids=ids, capture=cap, logit_rows=rows, logit_targets=targets)
        np.testing.assert_allclose(cap["target_prob"], want, rtol=1e-5, atol=1e-9)
        assert np.all((cap["target_prob"] > 0) & (cap["target_prob"] <= 1))


def test_target_prob_argument_checks():
    m = fixture_model("gpt2")
    cap = {"target_prob": np.empty(2, np.float64)}
    args = (np.array([3], np.int32),)
    kw = dict(ids=np.array([1, 2, 3], np.int32), logit_rows=np.array([1, 2], np.int64))
    with pytest.raises(ValueError, match="logit_targets"):
        m._core.forward(*args, capture=cap, **kw)
    with pytest.raises(ValueError, match="logit_targets"):
        m._core.forward(*args, capture=cap, logit_targets=np.array([1], np.int64), **kw)
    with pytest.raises(ValueError, match="out of range"):
        m._core.forward(*args, capture=cap, logit_targets=np.array([1, m.config.vocab_size], np.int64), **kw)
    with pytest.raises(ValueError, match="float64"):
        m._core.forward(*args, capture={"target_prob": np.empty(2, np.float32)}, logit_targets=np.array([1, 2]), **kw)


@pytest.mark.parametrize("name", ["gpt2", "llama_gqa2_tied", "gemma3"])
def test_nan_propagates_through_the_fast_exp(name):
    """A NaN entering the residual stream reaches the logits as NaN (the vectorized exp clamps NaN to a
    finite argument, the activation x / (1 + e) keeps it NaN), and target probabilities are NaN too."""
    m = fixture_model(name)
    d = m.config.d_model
    v = np.zeros(d, np.float32)
    v[3] = np.nan
    r = m.run([1, 2, 3], interventions=[iv.add("embed", v, positions=[1])], capture=["mlp_out"])
    assert np.isnan(r.logits[1:]).all() and np.isfinite(r.logits[0]).all()
    assert np.isnan(r.mlp_out[:, 1:]).all() and np.isfinite(r.mlp_out[:, 0]).all()
    kw = compile_interventions([iv.add("embed", v, positions=[1])], [3], m.config)
    cap = {"target_prob": np.empty(2, np.float64)}
    m._core.forward(np.array([3], np.int32), ids=np.array([1, 2, 3], np.int32), capture=cap,
                    logit_rows=np.array([0, 2], np.int64), logit_targets=np.array([5, 5], np.int64), **kw)
    assert np.isfinite(cap["target_prob"][0]) and np.isnan(cap["target_prob"][1])
