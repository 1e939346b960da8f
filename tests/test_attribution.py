"""Direct logit attribution, head-by-source split, logit lens and attention knockout
(factrace.methods.dla / lens / attention_knockout + the C kernels of factrace._attrib).

Exactness tests run on every fixture architecture (tests/fixtures/models); the numbers are checked against
independent NumPy computations from the captured states, and live against transformers + torch
(``@pytest.mark.oracle``) where it applies."""
import io

import numpy as np
import pytest

import factrace
from factrace.methods import attention_knockout as AK
from factrace.methods import dla as A
from factrace.methods import lens as LN
from conftest import FIXTURES, MODEL_FIXTURES, PARALLEL_FIXTURES, expected, fixture_model

TOL = 1e-4


def _ids(name, p="p1"):
    return expected(name)[f"{p}_ids"]


# ---------------------------------------------------------------------------------------------------------
# independent NumPy references


def _np_direction(m, r, q, pos, neg):
    """Final-norm-frozen direction u (float64) and the final bias term, recomputed from resid_final."""
    c = m.config
    x = r.resid_final[q].astype(np.float64)
    u0 = m.W("W_U")[pos].astype(np.float64).sum(0)
    if neg:
        u0 = u0 - m.W("W_U")[neg].astype(np.float64).mean(0)
    w = m.W("ln_f_w").astype(np.float64)
    if c.norm == "layernorm":
        rs = 1.0 / np.sqrt(((x - x.mean()) ** 2).mean() + c.norm_eps)
        u = rs * w * u0
        return u - u.mean(), float(m.W("ln_f_b").astype(np.float64) @ u0)
    rs = 1.0 / np.sqrt((x ** 2).mean() + c.norm_eps)
    return rs * w * u0, 0.0


def _np_head_source(m, r, q):
    """(L, H, T, d) head-by-source split from attn, v_cache and W_O in NumPy (float64)."""
    c = m.config
    L, H, KV, dh = c.n_layers, c.n_heads, c.n_kv_heads, c.d_head
    T = len(r.ids)
    out = np.zeros((L, H, T, c.d_model))
    for l in range(L):
        WO = m.W("W_O", l).astype(np.float64)
        for h in range(H):
            kv = h // (H // KV)
            v = r.v_cache[l, :, kv * dh:(kv + 1) * dh].astype(np.float64)  # (T, dh)
            y = v @ WO[:, h * dh:(h + 1) * dh].T                               # (T, d)
            y = r.attn[l, h, q][:, None].astype(np.float64) * y
            if c.post_norms:
                y = y * m.W("post_attn_norm_w", l).astype(np.float64) * float(r.norm_scale_attn[l, q])
            out[l, h] = y
    return out


# ---------------------------------------------------------------------------------------------------------
# the C kernels


@pytest.mark.parametrize("name", MODEL_FIXTURES)
def test_head_source_split_sums_to_head_out(name):
    m = fixture_model(name)
    ids = _ids(name)
    r = m.run(ids, capture=["attn", "v_cache", "norm_scale_attn", "head_out"])
    for q in (len(ids) - 1, 4):
        s = A.head_source_split(m, r, position=q)
        assert s.shape == (m.config.n_layers, m.config.n_heads, len(ids), m.config.d_model)
        np.testing.assert_allclose(s.sum(2), r.head_out[:, :, q], atol=1e-5, rtol=1e-5)
        assert not s[:, :, q + 1:].any()  # no edges to later positions
        np.testing.assert_allclose(s, _np_head_source(m, r, q), atol=1e-5, rtol=1e-5)
    part = A.head_source_split(m, r, position=-1, layers=[m.config.n_layers - 1])
    np.testing.assert_array_equal(part[0], A.head_source_split(m, r)[-1])


@pytest.mark.parametrize("name", MODEL_FIXTURES)
def test_head_source_project_all_heads_at_once(name):
    m = fixture_model(name)
    ids = _ids(name)
    r = m.run(ids, capture=["attn", "v_cache", "norm_scale_attn", "head_out"])
    rng = np.random.default_rng(0)
    U = rng.standard_normal((3, m.config.d_model))
    qs = [len(ids) - 1, 2, -3]
    p = A.head_source_project(m, r, U, qs)
    assert p.shape == (3, m.config.n_layers, m.config.n_heads, len(ids))
    for j, q in enumerate(qs):
        ref = np.einsum("lhkd,d->lhk", _np_head_source(m, r, q), U[j])
        np.testing.assert_allclose(p[j], ref, atol=1e-4, rtol=1e-4)
        np.testing.assert_allclose(p[j].sum(-1), r.head_out[:, :, q] @ U[j], atol=1e-4, rtol=1e-4)


def test_attrib_kernel_errors():
    from factrace import _attrib

    m = fixture_model("llama_gqa2_tied")
    r = m.run(_ids("llama_gqa2_tied"), capture=["attn", "v_cache"])
    WO = [m.W("W_O", l) for l in range(m.config.n_layers)]
    U = np.zeros((1, m.config.n_layers, m.config.d_model), np.float32)
    with pytest.raises(IndexError):
        _attrib.project(r.attn, r.v_cache, WO, U, np.array([99]), m.config.n_kv_heads)
    with pytest.raises(ValueError):
        _attrib.project(r.attn, r.v_cache, WO[:1], U, np.array([0]), m.config.n_kv_heads)
    with pytest.raises(ValueError):
        _attrib.project(r.attn, r.v_cache[:, :3], WO, U, np.array([0]), m.config.n_kv_heads)
    with pytest.raises(ValueError):
        _attrib.project(r.attn, r.v_cache, WO, U, np.array([0]), 3)
    with pytest.raises(IndexError):
        _attrib.split(r.attn, r.v_cache, WO, 50, m.config.n_kv_heads)
    with pytest.raises(IndexError):
        _attrib.split(r.attn, r.v_cache, WO, 0, m.config.n_kv_heads, layers=[7])


# ---------------------------------------------------------------------------------------------------------
# DLA


@pytest.mark.parametrize("name", MODEL_FIXTURES)
def test_dla_parts_add_up_to_the_logit(name):
    m = fixture_model(name)
    ids = _ids(name)
    r = m.run(ids)
    for target, q in ((None, -1), (17, -1), ((5, 9), -1), ((5, [7, 9, 11]), 6)):
        res = factrace.dla(m, ids, target=target, subject=(2, 5), position=q)
        assert abs(res.total - res.logit) <= TOL * max(1.0, abs(res.logit)), (target, res.total, res.logit)
        # the logit is the clean run's
        row = r.logits[q]
        if target is None:
            assert res.logit == pytest.approx(float(row.max()), abs=1e-6)
        mech = res.mechanisms()
        assert mech["total"] == pytest.approx(res.total, abs=1e-9)
        df = res.frame()
        assert df["value"].sum() == pytest.approx(res.logit, abs=TOL * max(1.0, abs(res.logit)))


@pytest.mark.parametrize("name", MODEL_FIXTURES)
def test_dla_matches_numpy_from_captured_states(name):
    m = fixture_model(name)
    c = m.config
    ids = _ids(name)
    r = m.run(ids, capture=True)
    r = m.run(ids, capture=[n for n in factrace.model.CAPTURE_NAMES if not (n == "resid_mid" and c.parallel)])
    q = len(ids) - 1
    res = factrace.dla(m, ids, target=(3, 8), subject=(1, 4))
    u, fb = _np_direction(m, r, q, [3], [8])
    np.testing.assert_allclose(res.heads, r.head_out[:, :, q].astype(np.float64) @ u, atol=TOL)
    np.testing.assert_allclose(res.head_source, np.einsum("lhkd,d->lhk", _np_head_source(m, r, q), u), atol=TOL)
    bO = np.array([m.b_O(l).astype(np.float64) @ u for l in range(c.n_layers)])
    np.testing.assert_allclose(res.attn_bias, bO, atol=TOL)
    np.testing.assert_allclose(res.heads.sum(1) + res.attn_bias, r.attn_out[:, q].astype(np.float64) @ u, atol=TOL)
    np.testing.assert_allclose(res.mlp + res.mlp_bias, r.mlp_out[:, q].astype(np.float64) @ u, atol=TOL)
    assert res.embed + res.pos == pytest.approx(float(r.embed[q].astype(np.float64) @ u), abs=TOL)
    assert res.final_bias == pytest.approx(fb, abs=TOL)
    b_U = m.W("b_U")  # GPT-J's lm_head bias: a part of its own
    assert res.unembed_bias == (0.0 if b_U is None else pytest.approx(float(b_U[3]) - float(b_U[8]), abs=1e-6))
    want = float(r.logits[q, 3]) - float(r.logits[q, 8])
    assert res.logit == pytest.approx(want, abs=1e-6)


def test_dla_layernorm_centering_and_bias_rows():
    m = fixture_model("llama_linear_rope_f16_headdim")  # q,k,v,o and MLP biases
    res = factrace.dla(m, _ids("llama_linear_rope_f16_headdim"), subject=(1, 3))
    assert np.abs(res.attn_bias).max() > 0 and np.abs(res.mlp_bias).max() > 0
    df = res.frame()
    assert set(df["component"]) == {"head", "attn_bias", "mlp", "mlp_bias", "embed", "pos", "final_bias"}
    assert df[df.component == "attn_bias"]["source_pos"].isna().all()
    g = factrace.dla(fixture_model("gpt2"), _ids("gpt2"), subject=(1, 3))
    assert g.pos != 0 and g.final_bias != 0  # GPT-2: learned positions and the final LayerNorm's bias
    j = factrace.dla(fixture_model("gptj"), _ids("gptj"), subject=(1, 3))  # GPT-J: lm_head's bias, its own row
    assert j.unembed_bias != 0 and (j.frame()["component"] == "unembed_bias").sum() == 1
    assert j.mechanisms()["direct"] == pytest.approx(j.embed + j.final_bias + j.unembed_bias + j.attn_bias.sum()
                                                     + j.mlp_bias.sum(), abs=1e-9)


def test_dla_rejects_final_softcap():
    m = factrace.load(FIXTURES / "gemma3")
    m.config.final_softcap = 30.0
    with pytest.raises(ValueError, match="softcap"):
        factrace.dla(m, _ids("gemma3"))


def test_token_groups_from_subject_string():
    m = fixture_model("gpt2")
    prompt = "Fact: The capital of France is the city of"
    ids, offs = m.tokenizer.encode_with_offsets(prompt)
    b, e = A.subject_span(m, prompt, "France")
    start = prompt.index("France")
    covered = [i for i, (s, t) in enumerate(offs) if s < start + 6 and t > start]
    assert (b, e) == (covered[0], covered[-1] + 1)
    g = A.token_groups(len(ids), (b, e))
    assert list(g[b:e]) == ["SUBJECT"] * (e - b)
    assert g[-1] == "END" and all(x == "RELATION" for x in g[e:-1]) and all(x == "OTHER" for x in g[:b])
    res = factrace.dla(m, prompt, subject="France", relation="The capital of")
    rel = [i for i, x in enumerate(res.groups) if x == "RELATION"]
    assert rel and max(rel) < b
    res2 = factrace.dla(m, prompt, subject="France", relation=[0, 1])
    assert list(res2.groups[:2]) == ["RELATION", "RELATION"]
    with pytest.raises(ValueError):
        A.subject_span(m, prompt, "Germany")


def test_head_classes_and_mechanisms_synthetic():
    L, H, T = 2, 3, 5
    hs = np.zeros((L, H, T), np.float32)
    groups = np.array(["OTHER", "SUBJECT", "SUBJECT", "RELATION", "END"], dtype=object)
    hs[0, 0] = [0, 2.0, 1.0, 0.1, 0]      # subject head
    hs[0, 1] = [0, 0.0, 0.1, 3.0, 0.2]    # relation head
    hs[1, 0] = [0, 1.0, 0.0, 1.2, 0]      # mixed head
    hs[1, 1] = [0, -0.1, 0, 0, -2.0]      # significant, END-dominated: other
    hs[1, 2] = [0.01, 0, 0, 0, 0]         # not significant
    res = A.DLAResult(prompt="p", ids=np.arange(T), tokens=list("abcde"), position=T - 1, target="t",
                      target_ids=((1,), ()), logit=0.0, groups=groups, subject=(1, 3), head_source=hs,
                      attn_bias=np.array([0.1, 0.0]), mlp=np.array([1.0, 2.0]), mlp_bias=np.zeros(2),
                      embed=0.5, pos=0.0, final_bias=0.0)
    res.logit = res.total
    cls = res.classify()
    assert cls[0, 0] == "subject" and cls[0, 1] == "relation" and cls[1, 0] == "mixed"
    assert cls[1, 1] == "other" and cls[1, 2] == "" and cls[0, 2] == ""
    mech = res.mechanisms()
    assert mech["subject_heads"] == pytest.approx(3.1, abs=1e-6)
    assert mech["relation_heads"] == pytest.approx(3.3, abs=1e-6)
    assert mech["mixed_heads"] == pytest.approx(2.2, abs=1e-6)
    assert mech["mlp_boosting"] == pytest.approx(3.0)
    assert mech["direct"] == pytest.approx(0.6)
    assert mech["total"] == pytest.approx(res.logit, abs=1e-6)
    assert res.classify(share=0.99)[0, 0] == "other"  # thresholds are parameters
    hf = res.head_frame()
    assert list(hf.columns) == ["layer", "head", *A.GROUPS, "total", "cls"]


def test_dla_dataset_and_plots():
    m = fixture_model("gpt2")
    recs = [("The capital of France is the city of", "France", " Paris"),
            {"prompt": "The dog did not care, and the fox", "subject": "dog", "object": "ran"},
            ("Water boils at one hundred", "Water", None)]
    s = A.dla_dataset(m, recs, batch_size=2)
    assert len(s.frame) == 3
    for _, row in s.frame.iterrows():
        parts = sum(row[k] for k in A.MECHANISMS)
        assert parts == pytest.approx(row["logit"], abs=TOL * max(1.0, abs(row["logit"])))
    single = factrace.dla(m, recs[0][0], " Paris", subject="France")
    assert s.results[0].total == pytest.approx(single.total, abs=1e-5)
    summ = s.summary()
    assert list(summ["mechanism"]) == list(A.MECHANISMS)
    assert set(s.head_counts()) == {"subject", "relation", "mixed"}
    from matplotlib.figure import Figure

    figs = [single.plot_heads(), single.plot_heads("all"), single.plot_heads("SUBJECT"), single.plot_mechanisms(),
            s.plot(), s.plot(per_prompt=True)]
    for f in figs:
        assert isinstance(f, Figure)
        f.savefig(io.BytesIO(), format="png")


def test_dla_dataset_contrast_candidates():
    import warnings

    from factrace.study.datasets import load_dataset

    m = fixture_model("gpt2")
    # the fixture's tiny tokenizer gives most candidates the same first token (" "); these differ
    recs = [r for r in load_dataset("facts") if r.relation == "athlete_sport"][:2]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        s = A.dla_dataset(m, recs, contrast="candidates")
    assert len(s.frame) == 2
    for rec, res in zip(recs, s.results):
        pos, neg = res.target_ids
        assert pos[0] == int(m.encode(" " + rec.object, add_special_tokens=False)[0]) and neg and pos[0] not in neg
        lg = m.run(m.encode(rec.prompt), logits="last").logits[0].astype(np.float64)
        assert res.logit == pytest.approx(lg[pos[0]] - lg[list(neg)].mean(), abs=1e-5)
        assert res.total == pytest.approx(res.logit, abs=TOL * max(1.0, abs(res.logit)))


# ---------------------------------------------------------------------------------------------------------
# logit lens


def _np_lens_logits(m, x):
    c = m.config
    x = x.astype(np.float64)
    w = m.W("ln_f_w").astype(np.float64)
    if c.norm == "layernorm":
        y = (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + c.norm_eps) * w
        y = y + m.W("ln_f_b")
    else:
        y = x / np.sqrt((x ** 2).mean(-1, keepdims=True) + c.norm_eps) * w
    y = y @ m.W("W_U").astype(np.float64).T
    return y if m.W("b_U") is None else y + m.W("b_U")


@pytest.mark.parametrize("name", MODEL_FIXTURES)
def test_logit_lens_matches_numpy(name):
    m = fixture_model(name)
    ids = _ids(name)
    r = m.run(ids, capture=True)
    lens = factrace.logit_lens(m, ids, target=7, k=3)
    L, T = m.config.n_layers, len(ids)
    assert lens.topk_ids.shape == (L + 1, T, 3)
    states = np.concatenate([r.resid_pre, r.resid_final[None]], 0)
    ref = _np_lens_logits(m, states)
    np.testing.assert_allclose(lens.target_logit, ref[..., 7], atol=TOL, rtol=TOL)
    np.testing.assert_allclose(lens.topk_logits[..., 0], ref.max(-1), atol=TOL, rtol=TOL)
    np.testing.assert_allclose(lens.topk_logits[-1, :, 0], r.logits.max(-1), atol=TOL)  # last row = the model
    p = np.exp(ref - ref.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    np.testing.assert_allclose(lens.target_prob, p[..., 7], atol=1e-5)
    assert (lens.target_rank == (ref > ref[..., 7:8] + 1e-4).sum(-1)).mean() > 0.95
    # attribute extraction: attention / MLP output at the last position on the embedding matrix
    pred = int(r.logits[-1].argmax())
    sub = np.stack([r.attn_out[:, -1], r.mlp_out[:, -1]], 1) @ m.W("W_E").T
    np.testing.assert_array_equal(lens.sub_top1, sub.argmax(-1))
    np.testing.assert_array_equal(lens.extracts, sub.argmax(-1) == pred)
    assert lens.table("token").shape == (L + 1, T)


def test_logit_lens_positions_tables_plot_and_extraction_rate():
    m = fixture_model("llama_gqa2_tied")
    prompt = "The capital of France is the city of"
    lens = factrace.logit_lens(m, prompt, positions=[-1, 2], k=4)
    assert lens.topk_ids.shape[1] == 2
    assert lens.target == lens.prediction and lens.target_rank[-1, 0] == 0
    f = lens.frame()
    assert len(f) == (m.config.n_layers + 1) * 2 * 4
    fig = lens.plot()
    fig.savefig(io.BytesIO(), format="png")
    rate = LN.attribute_extraction_rate(m, [prompt, "The dog did not care", ("Water boils at", None, None)])
    assert list(rate.columns) == ["layer", "attn", "mlp"] and len(rate) == m.config.n_layers
    assert 0 <= rate.attrs["any_attn"] <= 100


# ---------------------------------------------------------------------------------------------------------
# attention knockout


def test_knockout_windows():
    assert list(AK.knockout_window(0, 12)) == [0, 1, 2, 3, 4]
    assert list(AK.knockout_window(6, 12)) == [2, 3, 4, 5, 6, 7, 8, 9, 10]
    assert list(AK.knockout_window(11, 12)) == [7, 8, 9, 10, 11]
    assert AK.knockout_keys(6, (1, 3), "non_subject") == [0, 3, 4]
    assert AK.knockout_keys(6, (1, 3), "last") == [5]


@pytest.mark.parametrize("name", ["gpt2", "llama_gqa2_tied", "mistral", "gemma3"] + PARALLEL_FIXTURES)
def test_knockout_of_no_edges_changes_nothing_and_batch_equals_single(name):
    m = fixture_model(name)
    ids = _ids(name)
    ko = factrace.attention_knockout(m, ids, subject=(2, 5), kinds=[[]], window=3)
    np.testing.assert_array_equal(ko.rel_change["custom"], 0.0)
    base = m.run(ids, logits="last")
    empty = m.run(ids, logits="last", interventions=[factrace.block_attention(range(m.config.n_layers), [-1], [])])
    np.testing.assert_array_equal(base.logits, empty.logits)
    ko = factrace.attention_knockout(m, ids, subject=(2, 5), window=3)
    assert set(ko.rel_change) == set(AK.KNOCKOUT_KINDS)
    for kind in AK.KNOCKOUT_KINDS:
        for l in range(m.config.n_layers):
            keys = AK.knockout_keys(len(ids), (2, 5), kind)
            one = m.run(ids, logits="last", interventions=[
                factrace.block_attention(list(AK.knockout_window(l, m.config.n_layers, 3)), [-1], keys)])
            assert ko.p_new[kind][l] == pytest.approx(float(one.probs[0, ko.target]), abs=1e-6)
    f = ko.frame()
    assert len(f) == 3 * m.config.n_layers
    np.testing.assert_allclose(f["rel_change"], (f["p_new"] - f["p_base"]) / f["p_base"] * 100)
    ko.plot().savefig(io.BytesIO(), format="png")


def test_knockout_dataset():
    m = fixture_model("gpt2")
    recs = [("The capital of France is the city of", "France", None), ("The dog did not care, and", "dog", None)]
    d = AK.attention_knockout_dataset(m, recs, window=1)
    assert d.n == 2 and set(d.mean) == set(AK.KNOCKOUT_KINDS)
    assert d.mean["subject"].shape == (m.config.n_layers,)
    d.plot().savefig(io.BytesIO(), format="png")


# ---------------------------------------------------------------------------------------------------------
# live comparisons with transformers + torch


@pytest.fixture(scope="module")
def hf():
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    import oracle

    cache = {}

    def get(name, tmp):
        if name not in cache:
            d = oracle.build(name, str(tmp / name))
            cache[name] = (oracle.load_hf(d), factrace.load(d))
        return cache[name]

    return get


LIVE = ["gpt2", "llama_gqa2_tied", "gemma3", "mistral", "pythia_parallel", "gptj"]


@pytest.mark.oracle
@pytest.mark.parametrize("name", LIVE)
def test_logit_lens_live_vs_transformers(name, hf, tmp_path_factory):
    import torch
    import oracle

    hm, m = hf(name, tmp_path_factory.mktemp("hf"))
    ids = _ids(name)
    with torch.no_grad():
        out = hm(input_ids=torch.tensor([ids.tolist()]), output_hidden_states=True, use_cache=False)
        _, norm, _ = oracle._parts(hm)
        hs = out.hidden_states
        L = m.config.n_layers
        ref = [hm.lm_head(norm(hs[i]))[0].float().numpy() for i in range(L)] + [out.logits[0].float().numpy()]
    ref = np.stack(ref)
    lens = factrace.logit_lens(m, ids, target=11, k=2)
    np.testing.assert_allclose(lens.target_logit, ref[..., 11], atol=TOL, rtol=TOL)
    np.testing.assert_allclose(lens.topk_logits[..., 0], ref.max(-1), atol=TOL, rtol=TOL)


@pytest.mark.oracle
@pytest.mark.parametrize("name", LIVE)
def test_knockout_live_vs_transformers_masks(name, hf, tmp_path_factory):
    """Edges from the last position to the subject removed in transformers (eager attention) by editing
    the 4-D float attention mask each chosen layer's attention module receives (forward pre-hooks)."""
    import torch
    import oracle

    hm, m = hf(name, tmp_path_factory.mktemp("hf"))
    ids = _ids(name)
    T, L = len(ids), m.config.n_layers
    span = (2, 5)
    layers_, _, _ = oracle._parts(hm)

    def hf_probs(block_layers):
        hooks = []

        def pre(mod, args, kwargs):
            am = kwargs.get("attention_mask")
            if am is None:
                am = torch.full((1, 1, T, T), float("-inf")).triu(1)
            am = am.clone()
            am[..., T - 1, span[0]:span[1]] = float("-inf")
            kwargs["attention_mask"] = am
            return args, kwargs

        for l in block_layers:
            blk = layers_[l]
            mod = next(getattr(blk, a) for a in ("attn", "self_attn", "attention") if hasattr(blk, a))
            hooks.append(mod.register_forward_pre_hook(pre, with_kwargs=True))
        try:
            with torch.no_grad():
                lg = hm(input_ids=torch.tensor([ids.tolist()]), use_cache=False).logits[0, -1].double()
        finally:
            for h in hooks:
                h.remove()
        return torch.softmax(lg, -1).numpy()

    p0 = hf_probs([])
    top = int(p0.argmax())
    # all layers at once: a window wide enough to cover every layer
    ko = factrace.attention_knockout(m, ids, subject=span, kinds=["subject"], window=2 * L + 1)
    assert ko.target == top and ko.p_base == pytest.approx(p0[top], abs=1e-5)
    p_all = hf_probs(range(L))
    np.testing.assert_allclose(ko.p_new["subject"], p_all[top], atol=1e-5)
    # one layer at a time (window 1)
    ko1 = factrace.attention_knockout(m, ids, subject=span, kinds=["subject"], window=1)
    for l in range(L):
        assert ko1.p_new["subject"][l] == pytest.approx(hf_probs([l])[top], abs=1e-5)
    # and the whole distribution of one blocked run, not only the top-1 probability
    r = m.run(ids, logits="last", interventions=[factrace.block_attention(range(L), [-1], list(range(*span)))])
    np.testing.assert_allclose(r.probs[0], p_all, atol=1e-5)


@pytest.mark.oracle
@pytest.mark.parametrize("name", ["gpt2", "qwen2", "gemma3", "pythia_parallel", "gptj"])
def test_dla_live_vs_torch_hooks(name, hf, tmp_path_factory):
    """Each head's DLA from torch: o_proj's input hooked, head slices through o_proj (and Gemma's
    post-attention norm at its frozen scale), final norm frozen, against factrace.dla."""
    import torch
    import oracle

    hm, m = hf(name, tmp_path_factory.mktemp("hf"))
    ids = _ids(name)
    L, H, dh = m.config.n_layers, m.config.n_heads, m.config.d_head
    _, norm, mods = oracle._parts(hm)
    cap = {}
    hooks = [mods[l][2].register_forward_pre_hook(
        lambda mod, args, l=l: cap.__setitem__(("z", l), args[0][0, -1].detach().double())) for l in range(L)]
    hooks += [mods[l][0].register_forward_hook(
        lambda mod, args, out, l=l: cap.__setitem__(("a", l), (out[0] if isinstance(out, tuple) else out)[0, -1].detach().double()))
        for l in range(L)]
    hooks.append(norm.register_forward_pre_hook(lambda mod, args: cap.__setitem__("x", args[0][0, -1].detach().double())))
    try:
        with torch.no_grad():
            logits = hm(input_ids=torch.tensor([ids.tolist()]), use_cache=False).logits[0, -1].double()
    finally:
        for h in hooks:
            h.remove()
    tgt = int(logits.argmax())
    x = cap["x"]
    w = torch.tensor(m.W("ln_f_w"), dtype=torch.float64)
    u0 = torch.tensor(m.W("W_U")[tgt], dtype=torch.float64)
    if m.config.norm == "layernorm":
        rs = 1 / torch.sqrt(((x - x.mean()) ** 2).mean() + m.config.norm_eps)
        u = rs * w * u0
        u = u - u.mean()
    else:
        u = (1 / torch.sqrt((x ** 2).mean() + m.config.norm_eps)) * w * u0
    want = np.zeros((L, H))
    for l in range(L):
        WO = torch.tensor(m.W("W_O", l), dtype=torch.float64)
        z = cap[("z", l)]
        for h in range(H):
            o = WO[:, h * dh:(h + 1) * dh] @ z[h * dh:(h + 1) * dh]
            if m.config.post_norms:  # frozen scale of the post-attention norm
                full = WO @ z
                rs_a = 1 / torch.sqrt((full ** 2).mean() + m.config.norm_eps)
                o = torch.tensor(m.W("post_attn_norm_w", l), dtype=torch.float64) * o * rs_a
            want[l, h] = float(o @ u)
    res = factrace.dla(m, ids)
    np.testing.assert_allclose(res.heads, want, atol=TOL, rtol=TOL)
    assert res.logit == pytest.approx(float(logits[tgt]), abs=TOL)
    assert res.total == pytest.approx(float(logits[tgt]), abs=TOL)


def test_contrast_tokens_equal_to_the_target_are_dropped():
    m = fixture_model("gpt2")
    with pytest.warns(UserWarning):
        pos, neg, _ = A.resolve_target(m, (5, [5, 6]))
    assert pos == [5] and neg == [6]
    with pytest.raises(ValueError), pytest.warns(UserWarning):
        A.resolve_target(m, (5, [5]))


@pytest.mark.realmodel
def test_dla_on_a_real_model():
    try:
        m = factrace.load("smollm2")
    except Exception as e:  # the packaged model is optional
        pytest.skip(f"smollm2 not available: {e}")
    prompt = "Fact: The Colosseum is in the country of"
    res = factrace.dla(m, prompt, target=(" Italy", " France"), subject="The Colosseum")
    assert res.total == pytest.approx(res.logit, abs=1e-3)
    assert list(res.groups[-1:]) == ["END"] and "SUBJECT" in set(res.groups)
    mech = res.mechanisms()
    assert mech["total"] == pytest.approx(res.logit, abs=1e-3)
    lens = factrace.logit_lens(m, prompt, positions=[-1])
    assert lens.target_rank[-1, 0] == 0
