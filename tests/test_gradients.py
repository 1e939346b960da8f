"""Gradients from the C backward pass (factrace.gradients, csrc/backward.c) against:

* torch autograd through transformers (eager, float32; tests/grad_oracle.py): committed reference
  gradients of every fixture at every site (tests/fixtures/gradients.npz, tests/make_grad_fixtures.py)
  in the default run, and live (other metrics, positions and a batch) when torch is installed;
* float64 central differences of the C forward pass itself (perturbations added through interventions),
  with interventions in the pass (the gradient through their transposes);
* identities: the node-input gradients add up to the block input's, batches equal single runs, GradDrop's
  pass without a drop equals the plain pass, thread counts, stored weights equal the float32 loader.
Every comparison is relative to the gradient's largest magnitude (1e-4)."""
import numpy as np
import pytest

import factrace
from factrace import interventions as iv
from factrace.io import packaged
from conftest import FIXTURES, MODEL_FIXTURES, PARALLEL_FIXTURES, expected, fixture_model

from grad_oracle import SITES

REF = FIXTURES.parent / "gradients.npz"
TOL = 1e-4


def _ref():
    return np.load(REF)


def _metric(ref, name):
    a = [str(x) for x in ref[f"{name}/metric"]]
    return (a[0],) + tuple(int(x) for x in a[1:])


def _close(a, b, what, tol=TOL):
    scale = max(float(np.abs(b).max()), 1e-30)
    err = float(np.abs(np.asarray(a, np.float64) - b).max()) / scale
    assert err <= tol, f"{what}: relative error {err:.2e}"
    return err


@pytest.mark.parametrize("name", MODEL_FIXTURES)
def test_fixture_gradients_equal_torch_autograd(name):
    ref = _ref()
    m = fixture_model(name)
    ids = expected(name)["p1_ids"]
    metric = _metric(ref, name)
    sites = [s for s in SITES if f"{name}/{s}" in ref]
    assert len(sites) == len(SITES) - bool(m.config.parallel)  # every site (parallel blocks: no resid_mid)
    g = factrace.gradients(m, ids, metric, sites=sites)
    assert abs(g.metric - float(ref[f"{name}/value"][0])) <= 1e-5 * max(1.0, abs(g.metric))
    for s in sites:
        assert g[s].shape == ref[f"{name}/{s}"].shape, s
        _close(g[s], ref[f"{name}/{s}"], f"{name} {s}")


@pytest.fixture(scope="module")
def torch_ok():
    pytest.importorskip("torch")
    pytest.importorskip("transformers")


@pytest.mark.parametrize("name", MODEL_FIXTURES)
def test_live_torch_other_metrics_positions_batch(name, torch_ok):
    from grad_oracle import hf_gradients
    from oracle import load_hf

    hf = load_hf(str(FIXTURES / name))
    m = fixture_model(name)
    e = expected(name)
    seqs = [e["p0_ids"], e["p1_ids"]]
    metrics = [("logit", 11), ("logit_diff", 12, 40)] if name < "l" else [("prob", 7), ("logprob", 21)]
    pos = [-2, 5]
    sites = [s for s in SITES if not (s == "resid_mid" and m.config.parallel)]
    g = factrace.gradients(m, seqs, metrics, sites=sites, position=pos)
    for i in range(2):
        ref = hf_gradients(hf, seqs[i], metrics[i], position=pos[i])
        assert abs(g.values[i] - ref["metric"]) <= 1e-5 * max(1.0, abs(ref["metric"]))
        for s in sites:
            _close(g.grads[s][i], ref[s], f"{name} seq {i} {s}")


# ---------------------------------------------------------------------------------------------
# central differences of the C forward pass, in float64

def _metric_of(logits_row, metric):
    x = logits_row.astype(np.float64)
    lse = x.max() + np.log(np.exp(x - x.max()).sum())
    k = metric[0]
    if k == "logit":
        return x[metric[1]]
    if k == "logit_diff":
        return x[metric[1]] - x[metric[2]]
    return x[metric[1]] - lse if k == "logprob" else np.exp(x[metric[1]] - lse)


def _fd(m, ids, metric, site, layer, direction, base_ivs, h):
    vals = []
    for sgn in (1, -1):
        kw = {} if site == "embed" else {"layers": layer}
        if site == "attn":
            add = iv.add("attn", np.float32(sgn * h) * direction, **kw)
        else:
            add = iv.add(site, np.float32(sgn * h) * direction, **kw)
        r = m.run(ids, interventions=list(base_ivs) + [add], logits="last")
        vals.append(_metric_of(r.logits[0], metric))
    return (vals[0] - vals[1]) / (2 * h)


CD_CASES = [("gpt2", ("logprob", 5)), ("gemma3", ("prob", 9)), ("gptj", ("logit_diff", 3, 8)),
            ("qwen3", ("logprob", 30)), ("pythia_parallel", ("logit", 17))]


@pytest.mark.parametrize("name,metric", CD_CASES)
@pytest.mark.parametrize("with_interventions", [False, True])
def test_central_differences(name, metric, with_interventions):
    m = fixture_model(name)
    c = m.config
    ids = expected(name)["p1_ids"]
    T = len(ids)
    rng = np.random.default_rng(0)
    base = []
    if with_interventions:  # a scale, a projection, a set on attention probabilities, blocked edges, a frozen row
        base = [iv.scale("attn_out", 0.7, layers=0), iv.project_out("resid_post", rng.standard_normal(c.d_model), layers=0),
                iv.set_values("attn", 0.25, layers=c.n_layers - 1, positions=[T - 1], keys=[T - 2]),
                iv.block_attention(layers=[0], queries=[T - 1], keys=[2, 3]),
                iv.set_values("mlp_out", 0.1, layers=0, positions=[4])]
    sites = ["embed", "resid_pre", "attn_out", "mlp_out", "resid_post", "q", "k", "v", "z", "attn", "mlp_post"]
    if not c.parallel:
        sites.append("resid_mid")
    g = factrace.gradients(m, ids, metric, sites=sites, interventions=base)
    probs = m.run(ids, capture=["attn"], interventions=base).attn
    for site in sites:
        layer = 0 if site != "embed" else None
        grad = g[site] if site == "embed" else g[site][0]
        d = rng.standard_normal(grad.shape)
        if site == "attn":  # keys the query reads (the forward mixes only those; torch's gradient has them all)
            d *= probs[0] != 0
            grad, d = np.moveaxis(grad, 0, 1), np.moveaxis(d, 0, 1)  # (T, H, T) like the value of an add
        d /= np.linalg.norm(d)
        fd = _fd(m, ids, metric, site, layer, d.astype(np.float32), base, 1e-2)
        an = float((grad.astype(np.float64) * d).sum())
        gn = float(np.linalg.norm(grad))
        assert abs(fd - an) <= 2e-3 * gn + 1e-7, (site, fd, an, gn)


# ---------------------------------------------------------------------------------------------
# identities

@pytest.mark.parametrize("name", ["gpt2", "llama_gqa4_llama3rope_bf16", "gemma3"] + PARALLEL_FIXTURES)
def test_node_inputs_add_up(name):
    m = fixture_model(name)
    ids = expected(name)["p1_ids"]
    sites = ["resid_pre", "resid_post", "q_in", "k_in", "v_in", "mlp_in"] + ([] if m.config.parallel else ["resid_mid"])
    g = factrace.gradients(m, ids, ("logprob", 3), sites=sites)
    heads = g["q_in"].sum(2) + g["k_in"].sum(2) + g["v_in"].sum(2)
    if m.config.parallel:  # x_out = x + attn(x) + mlp(x)
        _close(g["resid_post"] + heads + g["mlp_in"], g["resid_pre"], name, 1e-5)
    else:  # x_mid = x + attn(x), x_out = x_mid + mlp(x_mid)
        _close(g["resid_post"] + g["mlp_in"], g["resid_mid"], name, 1e-5)
        _close(g["resid_mid"] + heads, g["resid_pre"], name, 1e-5)


def test_batch_equals_single_and_reduce_mean():
    m = fixture_model("mistral")
    e = expected("mistral")
    seqs = [e["p1_ids"], e["p0_ids"], e["p1_ids"][:9]]
    sites = ["embed", "resid_pre", "z", "attn", "k"]
    gb = factrace.gradients(m, seqs, ("prob", 4), sites=sites)
    gm = factrace.gradients(m, seqs, ("prob", 4), sites=sites, reduce="mean")
    assert np.isclose(gm.metric, gb.values.mean()) and np.isclose(gb.metric, gb.values.sum())
    for i, s in enumerate(seqs):
        g1 = factrace.gradients(m, s, ("prob", 4), sites=sites)
        assert np.isclose(g1.metric, gb.values[i])
        for site in sites:
            _close(gb.grads[site][i], g1[site], site, 1e-6)
            # the mean's seed is 1/3 (rounded): the products differ from the sum's by float rounding only
            _close(gm.grads[site][i] * 3, g1[site], site, 1e-5)


def test_graddrop_passes():
    m = fixture_model("llama_sharded")
    ids = expected("llama_sharded")["p1_ids"]
    L = m.config.n_layers
    sites = ["resid_pre", "resid_post", "attn_out", "mlp_out", "z"]
    g0 = factrace.gradients(m, ids, ("logit", 3), sites=sites)
    gd = factrace.gradients(m, ids, ("logit", 3), sites=sites, drop_layers=[-1, L - 1, 0])
    assert gd["resid_pre"].shape == (3,) + g0["resid_pre"].shape
    for s in sites:
        np.testing.assert_array_equal(gd[s][0], g0[s])
    assert not gd["attn_out"][1][L - 1].any() and not gd["z"][1][L - 1].any()
    np.testing.assert_array_equal(gd["resid_pre"][1][L - 1], gd["resid_post"][1][L - 1])  # only the residual path
    np.testing.assert_array_equal(gd["z"][2][1:], g0["z"][1:])  # a drop changes nothing above it
    assert not np.allclose(gd["z"][1][0], g0["z"][0])


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_threads(threads):
    m = factrace.load(FIXTURES / "qwen2", threads=threads)
    ids = [expected("qwen2")["p1_ids"]] * 5
    g = factrace.gradients(m, ids, ("logprob", 9), sites=["embed", "q", "attn", "mlp_post"])
    ref = factrace.gradients(fixture_model("qwen2"), ids, ("logprob", 9), sites=["embed", "q", "attn", "mlp_post"])
    for s in ("embed", "q", "attn", "mlp_post"):
        _close(np.stack(g.grads[s]), np.stack(ref.grads[s]), s, 1e-5)


def test_captures_in_the_same_pass():
    m = fixture_model("gpt2")
    ids = expected("gpt2")["p1_ids"]
    g = factrace.gradients(m, ids, ("logit", 2), sites=["z"], capture=["z", "mlp_out", "resid_pre", "attn"])
    r = m.run(ids, capture=["z", "mlp_out", "resid_pre", "attn"])
    for f in ("z", "mlp_out", "resid_pre", "attn"):
        np.testing.assert_array_equal(getattr(g.runs[0], f), getattr(r, f))


def test_bad_arguments():
    m = fixture_model("pythia_parallel")
    ids = expected("pythia_parallel")["p0_ids"]
    with pytest.raises(ValueError):
        factrace.gradients(m, ids, ("logits", 3))
    with pytest.raises(ValueError):
        factrace.gradients(m, ids, ("logit_diff", 3))
    with pytest.raises(ValueError):
        factrace.gradients(m, ids, ("logit", 3), sites=["nope"])
    with pytest.raises(factrace.InputError):
        factrace.gradients(m, ids, ("logit", 3), sites=["resid_mid"])
    with pytest.raises(factrace.InputError):
        factrace.gradients(m, ids, ("logit", 10 ** 6))
    with pytest.raises(IndexError):
        factrace.gradients(m, ids, ("logit", 3), position=len(ids))
    with pytest.raises(ValueError):
        m._core.backward(np.array([len(ids)], np.int32), ids=ids.astype(np.int32), seed_row=np.array([99]),
                         seed_kind=np.array([0], np.int32), seed_tok=np.array([[1, 0]]), seed_weight=np.array([1.0]),
                         metric=np.empty(1))
    with pytest.raises(TypeError):
        m._core.forward(np.array([len(ids)], np.int32), ids=ids.astype(np.int32), metric=np.empty(1))


REAL = [n for n in ("smollm2", "gemma3-270m", "qwen2.5-coder-0.5b") if packaged.is_installed(n)]


@pytest.mark.realmodel
@pytest.mark.parametrize("name", REAL)
def test_real_model_stored_blocks_equal_float32(name):
    s, f = factrace.load(name), factrace.load(name, weights="float32")
    ids = s.encode("The Eiffel Tower is located in the city of")
    tok = int(s.run(ids).logits[-1].argmax())
    sites = ["embed", "resid_pre", "attn_out", "mlp_out", "z", "v", "attn", "mlp_post"]
    gs = factrace.gradients(s, ids, ("prob", tok), sites=sites)
    gf = factrace.gradients(f, ids, ("prob", tok), sites=sites)
    for site in sites:
        _close(gs[site], gf[site], site, 1e-3)
