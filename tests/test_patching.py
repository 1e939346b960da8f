"""Activation patching and path patching: the fast grid equals a naive loop of full runs (the public
intervention API) and an independent torch + hooks implementation (live, marked oracle); exact anchors
(every position of a layer's resid_pre restores the clean metric, 1.0); shapes, metrics, refusals."""
import numpy as np
import pytest

import factrace
import factrace.interventions as fi
from conftest import ARCH_FIXTURES, FIXTURES, MODEL_FIXTURES, expected, fixture_model

GRIDS = [("resid_pre", ("layer", "position")), ("resid_post", ("layer", "position")), ("attn_out", ("position", "layer")),
         ("mlp_out", ("layer", "position")), ("resid_mid", ("layer", "position")), ("embed", ("position",)),
         ("z", ("layer", "head")), ("q", ("layer", "head", "position")), ("k", ("layer", "head")),
         ("v", ("layer", "position")), ("attn", ("layer", "head")), ("mlp_post", ("layer",)),
         ("z", ("layer",))]


def _pair(name, k=2):
    """Prompt p0 of a fixture (clean) and a copy with tokens 2 .. 2+k-1 changed (corrupted)."""
    a = expected(name)["p0_ids"].astype(np.int32)
    b = a.copy()
    b[2:2 + k] = (b[2:2 + k] + 97) % fixture_model(name).config.vocab_size
    return a, b


@pytest.mark.parametrize("name", ARCH_FIXTURES)
def test_fast_grid_equals_naive_loop(name):
    m = fixture_model(name)
    a, b = _pair(name)
    for site, per in GRIDS:
        if site == "resid_mid" and m.config.parallel:
            continue
        for direction in ("denoise", "noise"):
            f = factrace.activation_patching(m, a, b, site=site, per=per, direction=direction)
            n = factrace.activation_patching(m, a, b, site=site, per=per, direction=direction, engine="naive")
            sizes = {"layer": m.config.n_layers, "position": len(a), "neuron": m.config.d_mlp,
                     "head": m.config.n_kv_heads if site in ("k", "v") else m.config.n_heads}
            assert f.scores.shape == tuple(sizes[x] for x in per) == f.raw.shape
            scale = max(1.0, abs(f.clean_metric), abs(f.corrupted_metric))
            assert np.abs(f.raw - n.raw).max() <= 1e-5 * scale, (site, per, direction)
            assert f.clean_metric == n.clean_metric and f.corrupted_metric == n.corrupted_metric


@pytest.mark.parametrize("name", MODEL_FIXTURES)
def test_every_position_of_a_layer_restores_the_clean_metric(name):
    m = fixture_model(name)
    a, b = _pair(name)
    r = factrace.activation_patching(m, a, b, site="resid_pre", per=("layer",))
    np.testing.assert_allclose(r.scores, 1.0, atol=1e-5)
    r = factrace.activation_patching(m, a, b, site="resid_pre", per=("layer",), direction="noise")
    np.testing.assert_allclose(r.scores, 0.0, atol=1e-5)
    # the last block's output at the last position is what the metric reads: score 1 there
    g = factrace.activation_patching(m, a, b, site="resid_post")
    assert abs(g.scores[-1, -1] - 1.0) <= 1e-5
    # positions before the first corrupted token carry nothing: score 0 in every layer
    np.testing.assert_allclose(g.scores[:, :2], 0.0, atol=1e-5)
    # layer 0's input differs only at the corrupted tokens: one of them restores, others are 0
    g0 = factrace.activation_patching(m, a, b, site="resid_pre", per=("layer", "position"))
    np.testing.assert_allclose(g0.scores[0, 4:], 0.0, atol=1e-5)


def test_result_api():
    m = fixture_model("llama_gqa2_tied")
    a, b = _pair("llama_gqa2_tied")
    r = factrace.activation_patching(m, a, b, site="z", per=("layer", "head"), layers=[1], heads=[0, 3])
    assert r.scores.shape == (2, 4) and np.isnan(r.scores[0]).all() and np.isnan(r.scores[1, [1, 2]]).all()
    assert np.isfinite(r.scores[1, [0, 3]]).all()
    assert r.site == "z" and r.per == ("layer", "head") and r.direction == "denoise" and r.metric == "logit_diff"
    assert len(r.answer) == 1 and len(r.foil) == 1
    full = factrace.activation_patching(m, a, b, site="z", per=("layer", "head"))
    np.testing.assert_array_equal(r.scores[1, [0, 3]], full.scores[1, [0, 3]])
    df = full.to_frame()
    assert list(df.columns[:2]) == ["layer", "head"] and len(df) == full.scores.size
    g = factrace.activation_patching(m, a, b)
    df = g.to_frame()
    assert {"layer", "position", "token", "corrupted_token", "score", "raw"} <= set(df.columns)
    assert len(g.top(3)) == 3
    for res in (g, full, factrace.activation_patching(m, a, b, site="q", per=("layer", "head", "position")),
                factrace.activation_patching(m, a, b, per=("layer",))):
        fig = res.plot()
        assert fig is not None and "PatchingResult" in res._repr_html_()
    # metrics
    ans = int(np.argmax(m.run(a, logits="last").logits[0]))
    for metric in ("prob", "logprob", "logit"):
        rr = factrace.activation_patching(m, a, b, site="resid_post", metric=metric, answer=ans)
        assert np.isfinite(rr.scores).all() and abs(rr.scores[-1, -1] - 1) < 1e-5
    fn = factrace.activation_patching(m, a, b, metric=lambda lg: float(lg[ans]))
    np.testing.assert_allclose(fn.raw, factrace.activation_patching(m, a, b, metric="logit", answer=ans).raw, atol=1e-5)
    # an explicit foil list: the mean of their logits
    two = factrace.activation_patching(m, a, b, answer=ans, foil=[5, 6])
    lg = m.run(a, logits="last").logits[0].astype(np.float64)
    assert abs(two.clean_metric - (lg[ans] - lg[[5, 6]].mean())) < 1e-5


def test_refusals():
    m = fixture_model("gpt2")
    a, b = _pair("gpt2")
    with pytest.raises(factrace.InputError, match="same number of tokens"):
        factrace.activation_patching(m, a, b[:-1])
    with pytest.raises(ValueError, match="head site"):
        factrace.activation_patching(m, a, b, site="resid_pre", per=("layer", "head"))
    with pytest.raises(ValueError, match="per"):
        factrace.activation_patching(m, a, b, per=("layer", "token"))
    with pytest.raises(ValueError, match="include 'layer'"):
        factrace.activation_patching(m, a, b, per=("position",))
    with pytest.raises(ValueError, match="direction"):
        factrace.activation_patching(m, a, b, direction="both")
    with pytest.raises(ValueError, match="metric"):
        factrace.activation_patching(m, a, b, metric="kl")
    with pytest.raises(ValueError, match="resid_mid"):
        factrace.activation_patching(fixture_model("gptj"), *_pair("gptj"), site="resid_mid")
    with pytest.warns(UserWarning, match="equal"):
        r = factrace.activation_patching(m, a, a)
    assert np.isnan(r.scores).all()


def test_text_prompts():
    m = fixture_model("gpt2")
    clean, corrupted = "The capital of France is", "The capital of Spain is"
    if len(m.encode(clean)) != len(m.encode(corrupted)):
        pytest.skip("the fixture tokenizer splits these differently")
    r = factrace.activation_patching(m, clean, corrupted)
    assert r.scores.shape == (m.config.n_layers, len(m.encode(clean)))
    assert r.tokens == m.token_strings(m.encode(clean))


# ---------------------------------------------------------------------------------------------------------
# path patching

def _naive_path(m, base_ids, src_ids, senders, receivers, rin):
    """Path patching with full runs of the public API: step 1 freezes every non-sender head's z and every
    MLP at the base run, senders from the source; step 2 patches the receivers' inputs."""
    c = m.config
    L, H, KV = c.n_layers, c.n_heads, c.n_kv_heads
    base = m.run(base_ids, capture=["z", "mlp_out"])
    src = m.run(src_ids, capture=["z"])
    ivs = []
    for l in range(L):
        mine = [h for sl, h in senders if sl == l]
        others = [h for h in range(H) if h not in mine]
        if others:
            ivs.append(fi.freeze("z", base, layers=[l], heads=others))
        if mine:
            ivs.append(fi.freeze("z", src, layers=[l], heads=mine))
        ivs.append(fi.freeze("mlp_out", base, layers=[l]))
    if receivers == "logits":
        return m.run(base_ids, interventions=ivs, logits="last").logits[0]
    s1 = m.run(base_ids, interventions=ivs, capture=list(rin))
    ivs2 = []
    for s in rin:
        for rl, rh in receivers:
            hh = rh if s == "q" else rh // (H // KV)
            ivs2.append(fi.freeze(s, s1, layers=[rl], heads=[hh]))
    return m.run(base_ids, interventions=ivs2, logits="last").logits[0]


@pytest.mark.parametrize("name", ["gpt2", "llama_gqa2_tied", "llama_sharded", "pythia_parallel"])
def test_path_patching_equals_naive(name):
    m = fixture_model(name)
    a, b = _pair(name)
    c = m.config
    L, H = c.n_layers, c.n_heads
    lg_a, lg_b = m.run(a, logits="last").logits[0], m.run(b, logits="last").logits[0]
    ans, foil = int(np.argmax(lg_a)), int(np.argmax(lg_b))
    if ans == foil:
        foil = int(np.argsort(-lg_b)[1])

    def metric(lg):
        return float(lg[ans]) - float(lg[foil])

    for receivers, rin in (("logits", ()), ([(L - 1, 0), (L - 1, H - 1)], ("q", "k", "v")), ([(L - 1, 1)], ("v",))):
        grid = factrace.path_patching(m, a, b, receivers=receivers, receiver_input=rin or ("q",), answer=ans, foil=foil)
        assert grid.scores.shape == (L, H)
        for l, h in [(0, 0), (0, H - 1), (L - 1, 1)] + ([(1, 2)] if L > 2 else []):
            want = metric(_naive_path(m, b, a, [(l, h)], receivers, rin or ("q",)))
            if receivers != "logits" and l >= L - 1:
                want = metric(lg_b)  # a sender in the receivers' layer does not reach them
            assert abs(grid.raw[l, h] - want) <= 1e-5 * max(1, abs(want)), (receivers, l, h)
        one = factrace.path_patching(m, a, b, senders=[(0, 0), (0, 1)], receivers=receivers,
                                     receiver_input=rin or ("q",), answer=ans, foil=foil)
        want = metric(_naive_path(m, b, a, [(0, 0), (0, 1)], receivers, rin or ("q",)))
        assert one.scores.shape == () and abs(float(one.raw) - want) <= 1e-5 * max(1, abs(want))
    # every head a sender to the logits = the plain source run's z everywhere, MLPs frozen
    allh = factrace.path_patching(m, a, b, senders=[(l, h) for l in range(L) for h in range(H)], answer=ans, foil=foil)
    assert np.isfinite(allh.scores)
    assert "PathPatchingResult" in allh._repr_html_() and len(grid.to_frame()) == L * H and grid.plot()


# ---------------------------------------------------------------------------------------------------------
# live: an independent torch + hooks implementation (what a TransformerLens user writes)

@pytest.mark.oracle
@pytest.mark.parametrize("name", ARCH_FIXTURES)
def test_grid_equals_torch_hook_loop(name):
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    import oracle
    import site_oracle

    hf = oracle.load_hf(str(FIXTURES / name))
    parts = site_oracle.Parts(hf)
    m = fixture_model(name)
    a, b = _pair(name)
    T = len(a)
    for site, per in (("resid_pre", ("layer", "position")), ("z", ("layer", "head")), ("mlp_out", ("layer", "position"))):
        r = factrace.activation_patching(m, a, b, site=site, per=per)
        ans, foil = r.answer[0], r.foil[0]
        clean = site_oracle.run(hf, a, capture=[site], parts=parts)
        cor = site_oracle.run(hf, b, parts=parts)

        def metric(lg):
            return float(lg[-1, ans]) - float(lg[-1, foil])

        assert abs(metric(clean["logits"]) - r.clean_metric) <= 1e-4 and abs(metric(cor["logits"]) - r.corrupted_metric) <= 1e-4
        want = np.empty(r.scores.shape)
        for l in range(m.config.n_layers):
            for j in range(r.scores.shape[1]):
                if per[1] == "position":
                    e = dict(site=site, op="set", layers=[l], positions=[j], value=clean[site][l, j][None, None])
                else:
                    e = dict(site=site, op="set", layers=[l], positions=list(range(T)), heads=[j],
                             value=clean[site][l][:, j][None, :, None])
                want[l, j] = metric(site_oracle.run(hf, b, [e], parts=parts)["logits"])
        scale = max(1.0, np.abs(want).max())
        assert np.abs(r.raw - want).max() <= 1e-5 * scale, site
