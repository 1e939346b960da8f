"""Every intervention site x operation on every fixture, against transformers with torch forward hooks doing
the same thing (tests/site_oracle.py; the cases are tests/site_cases.py).

* committed references (tests/fixtures/models/<name>/sites.npz, written by tests/make_site_fixtures.py):
  the default run checks the C side without torch: each case's resid_final sketch and the q / k / v /
  mlp_post captures;
* live (marked oracle, needs torch + transformers): the full logits, resid_final and the patched site's
  capture of each case, against the hooks run now;
* locality: ablating a head changes nothing else of its layer (the other heads' z), a neuron only itself;
* semantics: projections over non-contiguous neurons, embed values from captured runs (learned
  positions), resid_post captures, refusals.

Tolerance: 1e-5 relative to max(1, max |reference|).
"""
import numpy as np
import pytest

import factrace
import factrace.interventions as fi
import site_cases
from conftest import FIXTURES, MODEL_FIXTURES, PARALLEL_FIXTURES, expected, fixture_model

TOL = 1e-5
SITES = site_cases.SITES


def _close(got, want, what):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    assert got.shape == want.shape, f"{what}: shape {got.shape} vs {want.shape}"
    err = np.abs(got - want).max() / max(1.0, np.abs(want).max())
    assert err <= TOL, f"{what}: differs by {err:.2e} (relative)"


def _setup(name):
    m = fixture_model(name)
    ids = expected(name)["p0_ids"].astype(np.int32)
    return m, ids, site_cases.other_prompts(name, m.config, len(ids))


def _committed(name):
    p = FIXTURES / name / "sites.npz"
    if not p.exists():
        pytest.skip(f"{p} not written (python tests/make_site_fixtures.py {name})")
    return dict(np.load(p))


# ---------------------------------------------------------------------------------------------------------
# committed references

@pytest.mark.parametrize("name", MODEL_FIXTURES)
def test_captures_match_committed(name):
    m, ids, _ = _setup(name)
    ref, e = _committed(name), expected(name)
    r = m.run(ids, capture=["q", "k", "v", "z", "mlp_post", "attn"])
    c = m.config
    assert r.q.shape == (c.n_layers, len(ids), c.n_heads, c.d_head)
    assert r.k.shape == r.v.shape == (c.n_layers, len(ids), c.n_kv_heads, c.d_head)
    assert r.mlp_post.shape == (c.n_layers, len(ids), c.d_mlp)
    for s in ("q", "k", "v", "mlp_post"):
        _close(getattr(r, s), ref[s], f"{name} {s}")
    _close(r.z.reshape(c.n_layers, len(ids), -1), e["p0_attn_z"], f"{name} z")
    _close(r.attn, e["p0_attn"], f"{name} attn")


@pytest.mark.parametrize("site", SITES)
@pytest.mark.parametrize("name", MODEL_FIXTURES)
def test_site_ops_match_committed(name, site):
    m, ids, others = _setup(name)
    ref = _committed(name)
    sketch = dict(zip(ref["case_ids"].tolist(), ref["cases"]))
    R = site_cases.sketch_matrix(m.config.d_model)
    n = 0
    for case in site_cases.cases(name, m.config, len(ids)):
        if case["site"] != site:
            continue
        r = m.run(ids, capture=["resid_final"], interventions=site_cases.factrace_interventions(m, case, ids, others))
        _close(r.resid_final.astype(np.float64) @ R, sketch[case["id"]], f"{name} {case['id']}")
        n += 1
    assert n == len(site_cases.ops_for(site, m.config.parallel))


# ---------------------------------------------------------------------------------------------------------
# live: torch + transformers now

@pytest.fixture(scope="module", params=MODEL_FIXTURES)
def live(request):
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    import oracle
    import site_oracle

    name = request.param
    hf = oracle.load_hf(str(FIXTURES / name))
    return name, hf, site_oracle.Parts(hf), {}


@pytest.mark.oracle
@pytest.mark.parametrize("site", SITES)
def test_live_site_ops_match_torch_hooks(live, site):
    import site_oracle

    name, hf, parts, cache = live
    m, ids, others = _setup(name)
    cap = [] if (site == "resid_mid" and m.config.parallel) else [site]
    n = 0
    for case in site_cases.cases(name, m.config, len(ids)):
        if case["site"] != site:
            continue
        got = m.run(ids, capture=cap + ["resid_final"], interventions=site_cases.factrace_interventions(m, case, ids, others))
        want = site_oracle.run(hf, ids, site_cases.oracle_edits(hf, parts, case, ids, others, cache), capture=cap,
                               parts=parts)
        where = f"{name} {case['id']}"
        _close(got.logits, want["logits"], where + " logits")
        _close(got.resid_final, want["resid_final"], where + " resid_final")
        if site == "embed":  # the capture is the total embedding (token + learned positions)
            _close(got.embed, want["embed_total"], where + " embed")
        elif cap:
            _close(getattr(got, site), want[site], where + f" {site} capture")
        n += 1
    assert n == len(site_cases.ops_for(site, m.config.parallel))


@pytest.mark.oracle
def test_live_captures_match_torch_hooks(live):
    import site_oracle

    name, hf, parts, _ = live
    m, ids, _ = _setup(name)
    sites = [s for s in SITES if not (s == "resid_mid" and m.config.parallel)]
    want = site_oracle.run(hf, ids, capture=sites, parts=parts)
    got = m.run(ids, capture=sites)
    for s in sites:
        _close(got.embed if s == "embed" else getattr(got, s), want["embed_total" if s == "embed" else s],
               f"{name} {s}")


# ---------------------------------------------------------------------------------------------------------
# locality: an ablation changes only what it should

@pytest.mark.parametrize("name", MODEL_FIXTURES)
def test_head_ablation_leaves_other_heads_unchanged(name):
    m, ids, _ = _setup(name)
    c = m.config
    L, H, KV = c.n_layers, c.n_heads, c.n_kv_heads
    l, h = L - 1, H - 1
    base = m.run(ids, capture=["z", "q", "mlp_post"])
    for site, heads, group in (("z", [h], [h]), ("q", [h], [h]), ("attn", [h], [h]),
                               ("k", [KV - 1], list(range((KV - 1) * (H // KV), H))),
                               ("v", [0], list(range(H // KV)))):
        r = m.run(ids, capture=["z"], interventions=[fi.zero(site, layers=l, heads=heads)])
        others = [g for g in range(H) if g not in group]
        np.testing.assert_array_equal(r.z[l][:, others], base.z[l][:, others], err_msg=f"{name} {site}")
        np.testing.assert_array_equal(r.z[:l], base.z[:l], err_msg=f"{name} {site} earlier layers")
        if site in ("z", "attn", "v"):  # no probabilities, or no values: the head mixes nothing
            assert np.all(r.z[l][:, group] == 0), f"{name} {site}"
        else:
            assert np.abs(r.z[l][:, group] - base.z[l][:, group]).max() > 0, f"{name} {site} changed nothing"
    # one neuron: the others of its layer keep their values
    r = m.run(ids, capture=["mlp_post"], interventions=[fi.zero("mlp_post", layers=0, neurons=[3])])
    keep = [j for j in range(c.d_mlp) if j != 3]
    np.testing.assert_array_equal(r.mlp_post[0][:, keep], base.mlp_post[0][:, keep])
    assert np.all(r.mlp_post[0][:, 3] == 0)


@pytest.mark.parametrize("name", ["gpt2", "llama_gqa2_tied"])
def test_positions_and_layers_are_local(name):
    m, ids, _ = _setup(name)
    base = m.run(ids, capture=["resid_pre", "z"])
    r = m.run(ids, capture=["resid_pre", "z"], interventions=[fi.zero("z", layers=1, positions=[4], heads=[0])])
    np.testing.assert_array_equal(r.resid_pre[:2], base.resid_pre[:2])      # before and at layer 1: untouched
    np.testing.assert_array_equal(r.z[1][:4], base.z[1][:4])               # earlier positions of layer 1
    np.testing.assert_array_equal(r.z[1][5:], base.z[1][5:])               # later positions (same layer)
    assert np.all(r.z[1][4, 0] == 0)


# ---------------------------------------------------------------------------------------------------------
# semantics

def test_project_out_non_contiguous_neurons_is_one_projection():
    m, ids, _ = _setup("llama_gqa2_tied")
    u = np.array([1.0, -2.0, 0.5], np.float32)
    nr = [1, 2, 5]
    base = m.run(ids, capture=["mlp_post"], interventions=[])
    r = m.run(ids, capture=["mlp_post"], interventions=[fi.project_out("mlp_post", u, layers=0, neurons=nr)])
    x = base.mlp_post[0][:, nr].astype(np.float64)
    want = x - (x @ u)[:, None] / (u @ u) * u
    np.testing.assert_allclose(r.mlp_post[0][:, nr], want, atol=1e-6)
    keep = [j for j in range(m.config.d_mlp) if j not in nr]
    np.testing.assert_array_equal(r.mlp_post[0][:, keep], base.mlp_post[0][:, keep])
    # contiguous neurons: the same projection
    r2 = m.run(ids, capture=["mlp_post"], interventions=[fi.project_out("mlp_post", u, layers=0, neurons=[4, 5, 6])])
    x = base.mlp_post[0][:, 4:7].astype(np.float64)
    np.testing.assert_allclose(r2.mlp_post[0][:, 4:7], x - (x @ u)[:, None] / (u @ u) * u, atol=1e-6)


@pytest.mark.parametrize("name", ["gpt2", "llama_gqa2_tied"])
def test_freeze_embed_from_the_same_run_changes_nothing(name):
    """RunResult.embed includes GPT-2's learned positions; freezing / mean-ablating 'embed' with it must not
    add them twice."""
    m, ids, _ = _setup(name)
    r0 = m.run(ids, capture=["embed", "resid_final"])
    for iv in (fi.freeze("embed", r0), fi.freeze("embed", r0, positions=[1, -1]), fi.mean_ablate("embed", [r0])):
        r = m.run(ids, capture=["embed", "resid_final"], interventions=[iv])
        np.testing.assert_allclose(r.embed, r0.embed, atol=1e-6)
        np.testing.assert_allclose(r.resid_final, r0.resid_final, atol=1e-5)


def test_resid_post_is_capturable_and_freezable():
    m, ids, _ = _setup("gpt2")
    r = m.run(ids, capture=["resid_post"])
    assert r.resid_post.shape == (m.config.n_layers, len(ids), m.config.d_model)
    r2 = m.run(ids, capture=["hidden"], interventions=[fi.freeze("resid_post", r, layers=0)])
    np.testing.assert_allclose(r2.resid_post, r.resid_post, atol=1e-6)


def test_attention_edits_use_what_is_set():
    """Probabilities set on masked keys (a future key, one outside the sliding window) are used, in the
    row-by-row attention path (short sequences) and the matrix-product path (>= 32 rows) alike."""
    m = fixture_model("mistral")  # sliding window 4
    rng = np.random.default_rng(0)
    for T in (7, 40):
        ids = rng.integers(3, m.config.vocab_size, T).astype(np.int32)
        base = m.run(ids, capture=["v", "z", "attn"])
        iv = fi.set_values("attn", np.float32(0.5), layers=1, positions=[1, T - 1], heads=[0], keys=[0, 3])
        r = m.run(ids, capture=["z", "attn"], interventions=[iv])
        for p in (1, T - 1):
            w = base.attn[1, 0, p].astype(np.float64).copy()
            w[[0, 3]] = 0.5
            assert np.all(r.attn[1, 0, p] == w.astype(np.float32))
            v = base.v[1][:, 0].astype(np.float64)  # kv head 0 serves query head 0
            np.testing.assert_allclose(r.z[1][p, 0], w @ v, atol=2e-5, rtol=1e-5)


def test_refusals():
    m, ids, _ = _setup("gpt2")
    r = m.run(ids, capture=["attn"])
    with pytest.raises(ValueError, match="attention patterns"):
        fi.mean_ablate("attn", [r])
    with pytest.raises(ValueError, match="takes no neurons"):
        fi.zero("z", neurons=[1])
    with pytest.raises(ValueError, match="takes no heads"):
        fi.zero("mlp_post", heads=[1])
    with pytest.raises(IndexError, match="out of range"):
        m.run(ids, interventions=[fi.zero("z", layers=0, heads=[m.config.n_heads])])
    with pytest.raises(ValueError, match="does not broadcast"):
        m.run(ids, interventions=[fi.set_values("q", np.zeros(3), layers=0)])
    for name in PARALLEL_FIXTURES:
        pm = fixture_model(name)
        with pytest.raises(ValueError, match="no resid_mid"):
            pm.run(ids, interventions=[fi.zero("resid_mid", layers=0)])
    assert factrace.interventions.SITES["hidden"] == factrace.interventions.SITES["resid_post"]
