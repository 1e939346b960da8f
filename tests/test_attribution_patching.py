"""Attribution patching (factrace.attribution_patching, edge_attribution, trace(engine="atp")) against exact
patching:

* a test-built model with no nonlinearity anywhere (norms with a huge epsilon: affine; queries zero:
  uniform attention; ReLU above its kink): every estimate equals exact patching, every site, both
  directions, any grouping of units;
* node estimates equal (a_src - a_base) . grad from factrace.gradients, on real fixtures;
* the QK fix equals the exact change of the attention probabilities times dM/d(probabilities);
* GradDrop from the drop passes; verify(k) against exact patching done by hand;
* edge attribution: edges into MLPs and the logits against exact edge patching on the linear model, and
  the sum over senders equals the node estimate of the receiver's input;
* approximate tracing: the estimates from the gradient API by hand, verified cells equal the exact
  engine's."""
import dataclasses

import numpy as np
import pytest

import factrace
from factrace import interventions as iv
from factrace.methods import attribution_patching as ap
from factrace.model import Model
from conftest import FIXTURES, expected, fixture_model

ALL = ["embed", "resid_pre", "resid_mid", "attn_out", "mlp_out", "resid_post", "q", "k", "v", "z", "attn", "mlp_post"]


def linear_model():
    """GPT-2 fixture made affine from the embeddings to the logits: LayerNorm epsilon 1e12 (the scale is a
    constant 1e-6, compensated in the weights), W_Q = 0 (uniform causal attention whatever the input), ReLU
    with its inputs kept positive (b_up + 5, b_down compensating)."""
    base = factrace.load(FIXTURES / "gpt2", weights="float32")
    cfg = dataclasses.replace(base.config, norm_eps=1e12, act="relu")
    W = {}
    for k, v in base.weights.items():
        if "W_QKV" in k:
            continue
        v = np.array(v, np.float32)
        if k.endswith(("ln1_w", "ln2_w")):
            v = v * np.float32(1e5)
        elif k == "ln_f_w":
            v = v * np.float32(1e6)
        elif k.endswith(("W_Q", "b_Q")):
            v = np.zeros_like(v)
        elif k.endswith("b_up"):
            v = v + np.float32(5)
        W[k] = v
    for k in list(W):
        if k.endswith("b_down"):
            W[k] = (W[k] - 5 * W[k.replace("b_down", "W_down")].sum(1)).astype(np.float32)
    return Model(cfg, W, base.tokenizer, name="linear-gpt2")


@pytest.fixture(scope="module")
def lin():
    m = linear_model()
    e = expected("gpt2")
    clean = e["p1_ids"]
    corr = clean.copy()
    corr[3:7] = e["p0_ids"][:4]
    for ids in (clean, corr):  # above the kink everywhere
        assert m.run(ids, capture=["mlp_post"]).mlp_post.min() > 1.0
    return m, clean, corr


@pytest.mark.parametrize("direction", ["denoise", "noise"])
def test_linear_model_estimates_equal_exact_patching(lin, direction):
    m, clean, corr = lin
    for per in (None, {"q": ("layer", "position", "head"), "z": ("layer", "position", "head"),
                       "mlp_post": ("layer", "neuron"), "attn": ("layer", "head", "position"), "k": ("layer",)}):
        r = factrace.attribution_patching(m, clean, corr, metric="logit_diff", sites=ALL, per=per, direction=direction)
        v = r.verify(full=True)
        t = v.table
        scale = float(np.abs(t.exact).max())
        assert scale > 1e-3
        err = float(np.abs(t.estimate - t.exact).max())
        assert err <= 1e-3 * scale, (per, err, scale)  # float32 noise of two forward passes
        big = np.abs(t.exact) > 1e-2 * scale  # ranks of the units above the noise
        assert ap.spearman(t.estimate[big], t.exact[big]) > 0.999


def test_node_estimates_are_delta_dot_grad():
    for name in ("gemma3", "gptj", "qwen2"):
        m = fixture_model(name)
        e = expected(name)
        clean, corr = e["p1_ids"], e["p1_ids"].copy()
        corr[2:5] = e["p0_ids"][:3]
        sites = [s for s in ALL if not (s == "resid_mid" and m.config.parallel)]
        r = factrace.attribution_patching(m, clean, corr, metric="logprob", answer=7, sites=sites,
                                          per=("layer", "position"))
        g = factrace.gradients(m, corr, ("logprob", 7), sites=sites)
        rc = m.run(clean, capture=[s for s in sites if s != "resid_post"] + ["resid_pre", "resid_final"])
        rx = m.run(corr, capture=[s for s in sites if s != "resid_post"] + ["resid_pre", "resid_final"])
        for s in sites:
            a = lambda run: run.resid_post if s == "resid_post" else getattr(run, s)  # noqa: E731
            prod = (a(rc).astype(np.float64) - a(rx)) * g[s]
            if s == "embed":
                want = prod.sum(-1)[None]
            elif s == "attn":  # (L, H, Tq, Tk): per (layer, query position)
                want = prod.sum((1, 3))
            else:
                want = prod.reshape(prod.shape[0], prod.shape[1], -1).sum(-1)
            np.testing.assert_allclose(r.estimates[s], want, rtol=1e-5, atol=1e-6 * np.abs(want).max(), err_msg=f"{name} {s}")
        assert np.isclose(r.corrupted_metric, g.metric)


@pytest.mark.parametrize("name", ["gpt2", "mistral", "gemma3", "llama_gqa4_llama3rope_bf16"])
def test_qk_fix_is_the_exact_softmax_change(name):
    m = fixture_model(name)
    c = m.config
    e = expected(name)
    clean, corr = e["p1_ids"], e["p1_ids"].copy()
    corr[2:6] = e["p0_ids"][:4]
    metric = ("logit", 5)
    cap = ["q", "k", "q_cache", "k_cache", "attn"]
    src, base = m.run(clean, capture=cap), m.run(corr, capture=cap)
    g = factrace.gradients(m, corr, metric, sites=["attn"])
    T = len(clean)
    for site, nh in (("q", c.n_heads), ("k", c.n_kv_heads)):
        fix = ap.qk_fix(c, src, base, g["attn"], site)  # (L, T, heads)
        for l, t, h in [(0, T - 1, 0), (c.n_layers - 1, 3, nh - 1), (1, T - 2, nh // 2)]:
            r = m.run(corr, capture=["attn"], interventions=[iv.freeze(site, src, layers=l, positions=t, heads=[h])])
            dp = r.attn[l].astype(np.float64) - base.attn[l]
            want = float((dp * g["attn"][l]).sum())
            assert abs(fix[l, t, h] - want) <= 1e-5 * max(1e-3, np.abs(g["attn"][l]).max()), (site, l, t, h)


def test_graddrop_from_the_drop_passes():
    m = fixture_model("llama_sharded")
    e = expected("llama_sharded")
    clean, corr = e["p1_ids"], e["p1_ids"].copy()
    corr[1:4] = e["p0_ids"][:3]
    L = m.config.n_layers
    r = factrace.attribution_patching(m, clean, corr, metric=("logit_diff", 4, 9), sites=["resid_pre", "z"],
                                      method="atp*")
    g = factrace.gradients(m, corr, ("logit_diff", 4, 9), sites=["resid_pre", "z"], drop_layers=list(range(L)))
    rc, rx = m.run(clean, capture=["resid_pre", "z"]), m.run(corr, capture=["resid_pre", "z"])
    want = sum(np.abs(((rc.resid_pre.astype(np.float64) - rx.resid_pre) * g["resid_pre"][p]).sum(-1))
               for p in range(L)) / (L - 1)
    np.testing.assert_allclose(r.graddrop["resid_pre"], want, rtol=1e-6, atol=1e-9)
    assert r.graddrop["z"].shape == (L, m.config.n_heads)
    v = r.verify(5)
    assert len(v.table) == 5 and np.isfinite(v.spearman) | True


def test_verify_topk_against_hand_patching():
    m = fixture_model("qwen3")
    e = expected("qwen3")
    clean, corr = e["p1_ids"], e["p1_ids"].copy()
    corr[2:5] = e["p0_ids"][:3]
    r = factrace.attribution_patching(m, clean, corr, sites=["mlp_out", "z", "attn", "mlp_post"],
                                      per={"mlp_post": ("layer", "position", "neuron")})
    v = r.verify(8)
    t = v.table
    assert len(t) == 8
    top = sorted(((abs(float(x)), s, u) for s in r.estimates for u, x in np.ndenumerate(r.estimates[s])),
                 key=lambda x: -x[0])[:8]
    assert sorted(t.ranking.round(9)) == sorted(round(x, 9) for x, _, _ in top)
    src = m.run(clean, capture=["mlp_out", "z", "attn", "mlp_post"])
    base = r.corrupted_metric
    for _, row in t.iterrows():
        if row["site"] == "z":
            i = iv.freeze("z", src, layers=int(row["layer"]), heads=[int(row["head"])])
        elif row["site"] == "mlp_out":
            i = iv.freeze("mlp_out", src, layers=int(row["layer"]), positions=int(row["position"]))
        elif row["site"] == "mlp_post":
            i = iv.freeze("mlp_post", src, layers=int(row["layer"]), positions=int(row["position"]), neurons=[int(row["neuron"])])
        else:
            i = iv.Intervention("patch", "attn", "set", (int(row["layer"]),), None,
                                np.moveaxis(src.attn[[int(row["layer"])]], 1, 2)[:, :, [int(row["head"])]].copy(),
                                (int(row["head"]),), None, None)
        lg = m.run(corr, interventions=[i], logits="last").logits[0]
        assert abs(ap.metric_value(lg, r.metric) - base - row["exact"]) <= 1e-5
    assert -1 <= v.spearman <= 1 and 0 <= v.topk_overlap <= 1
    df = r.to_frame()
    assert set(df.site) == set(r.estimates) and len(df) == sum(a.size for a in r.estimates.values())
    fig = r.plot("mlp_out")
    assert fig is not None


def test_arguments():
    m = fixture_model("pythia_parallel")
    e = expected("pythia_parallel")
    with pytest.raises(factrace.InputError):
        factrace.attribution_patching(m, e["p0_ids"], e["p1_ids"])
    with pytest.raises(factrace.InputError):
        factrace.attribution_patching(m, e["p0_ids"], e["p0_ids"], sites=["resid_mid"])
    with pytest.raises(ValueError):
        factrace.attribution_patching(m, e["p0_ids"], e["p0_ids"], sites=["nope"])
    with pytest.raises(ValueError):
        factrace.attribution_patching(m, e["p0_ids"], e["p0_ids"], sites=["z"], per=("layer", "neuron"))
    with pytest.raises(ValueError):
        factrace.attribution_patching(m, e["p0_ids"], e["p0_ids"], direction="sideways")


def test_spearman_and_overlap():
    assert ap.spearman([1, 2, 3, 4], [10, 20, 30, 45]) == pytest.approx(1.0)
    assert ap.spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert ap.spearman([1, 1, 2], [1, 2, 3]) == pytest.approx(np.corrcoef([0.5, 0.5, 2], [0, 1, 2])[0, 1])
    assert np.isnan(ap.spearman([1, 1], [1, 2]))
    assert ap.topk_overlap([5, -4, 1, 0], [-6, 3, 0.1, 2], 2) == 1.0


# ---------------------------------------------------------------------------------------------
# approximate causal tracing

@pytest.mark.parametrize("name", ["gpt2", "gemma3", "pythia_parallel"])
def test_atp_trace_estimates_and_verified_cells(name):
    from factrace.methods.tracing import _Tracer

    m = fixture_model(name)
    ids = expected(name)["p1_ids"]
    span = (2, 5)
    res = factrace.trace_all(m, ids, span, engine="atp", noise=0.5, samples=4, window=2, verify_top=6)
    exact = factrace.trace_all(m, ids, span, noise=0.5, samples=4, window=2)
    tr = _Tracer(m, ids, span, 4, 0.5, 1, None)
    noised = tr.corrupt[0]["noised"].reshape(4, 3, -1)
    ivs = [iv.set_values("embed", noised[s], positions=range(2, 5), seq=s) for s in range(4)]
    g = factrace.gradients(m, [ids] * 4, ("prob", tr.answer), sites=["resid_post", "mlp_out", "attn_out"],
                           interventions=ivs, reduce="mean")
    L, T, d = tr.L, tr.T, tr.d
    for kind, site in (("hidden", "resid_post"), ("mlp", "mlp_out"), ("attn", "attn_out")):
        r = res[kind]
        assert r.low_score == exact[kind].low_score and r.high_score == exact[kind].high_score
        assert np.isclose(r.extra["gradient_low_score"], r.low_score, rtol=1e-5)
        clean = tr.clean_post if site == "resid_post" else getattr(tr.clean, site)
        corr = (tr.corrupt[0]["post"] if site == "resid_post" else tr.corrupt[0][site]).reshape(L, 4, T, d)
        per = sum(((clean.astype(np.float64) - corr[:, s]) * g.grads[site][s]).sum(-1) for s in range(4))  # (L, T)
        for l in range(L):
            w = range(max(0, l - 1), min(L, l + 1)) if kind != "hidden" else [l]
            want = r.low_score + per[list(w)].sum(0)
            np.testing.assert_allclose(r.extra["estimate"][2:, l], want[2:], rtol=1e-5, atol=1e-8)
        ver = r.extra["verified"]
        assert ver.sum() == 6 and not ver[:2].any()
        np.testing.assert_allclose(r.scores[ver], exact[kind].scores[ver], rtol=1e-6, atol=1e-9)
        np.testing.assert_allclose(r.scores[~ver], r.extra["estimate"][~ver])
    one = factrace.trace(m, ids, span, kind="mlp", engine="atp", noise=0.5, samples=4, window=2,
                         positions="last_subject")
    assert np.isnan(one.scores[[0, 1, 2, 3, 5]]).sum() == 3 * L and np.isfinite(one.scores[4]).all()


# ---------------------------------------------------------------------------------------------
# edge attribution

@pytest.mark.parametrize("ig_steps", [None, 3])
def test_edges_equal_exact_edge_patching_on_the_linear_model(lin, ig_steps):
    m, clean, corr = lin
    e = factrace.edge_attribution(m, clean, corr, ig_steps=ig_steps)
    assert e.method == ("eap-ig" if ig_steps else "eap")
    v = e.verify(40)
    t = v.table
    assert len(t) == 26 and set(t.receiver) <= {"logits", "m0", "m1"}  # every edge into an MLP or the logits
    scale = float(np.abs(t.exact).max())
    assert float(np.abs(t.estimate - t.exact).max()) <= 1e-3 * scale


@pytest.mark.parametrize("name", ["gpt2", "llama_gqa2_tied", "pythia_parallel"])
def test_edges_into_a_receiver_sum_to_its_input_estimate(name):
    m = fixture_model(name)
    c = m.config
    ex = expected(name)
    clean, corr = ex["p1_ids"], ex["p1_ids"].copy()
    corr[2:6] = ex["p0_ids"][:4]
    e = factrace.edge_attribution(m, clean, corr, metric=("logit_diff", 3, 7))
    g = factrace.gradients(m, corr, ("logit_diff", 3, 7), sites=["q_in", "k_in", "v_in", "mlp_in", "resid_post"])
    rc, rx = (m.run(x, capture=["resid_pre", "resid_final"] + ([] if c.parallel else ["resid_mid"])) for x in (clean, corr))
    R = {r: j for j, r in enumerate(e.receivers)}
    col = lambda r: np.nansum(e.scores[:, R[r]])  # noqa: E731
    for l in range(c.n_layers):
        dpre = rc.resid_pre[l].astype(np.float64) - rx.resid_pre[l]
        for h in range(c.n_heads):
            assert np.isclose(col(f"a{l}.h{h}.q"), (dpre * g["q_in"][l, :, h]).sum(), rtol=1e-4, atol=1e-7)
        for gh in range(c.n_kv_heads):
            assert np.isclose(col(f"a{l}.g{gh}.v"), (dpre * g["v_in"][l, :, gh]).sum(), rtol=1e-4, atol=1e-7)
        dmlp = dpre if c.parallel else rc.resid_mid[l].astype(np.float64) - rx.resid_mid[l]
        assert np.isclose(col(f"m{l}"), (dmlp * g["mlp_in"][l]).sum(), rtol=1e-4, atol=1e-7)
    dfin = rc.resid_final.astype(np.float64) - rx.resid_final
    assert np.isclose(col("logits"), (dfin * g["resid_post"][-1]).sum(), rtol=1e-4, atol=1e-7)
    df = e.top(5)
    assert len(df) == 5 and df.score.abs().is_monotonic_decreasing
    assert e.plot() is not None
    assert np.isnan(e.scores[e.senders.index("m0"), R["a0.h0.q"]])  # not upstream
