"""The reference presets (``reference="rome"`` / ``"caarm"``) against hand-built cases: one test per
difference between factrace's definitions and the papers' code (ROME's experiments/causal_trace.py and
notebooks, CAARM's scripts), plus the fixes that came with them (default s3 subjects, severing's unsevered
curve, knockout windows that shrink at the top, ROME's other noise forms and replace=True)."""
import copy
import json

import numpy as np
import pytest

import factrace
from factrace import interventions as iv
from factrace.methods import _reference as R
from factrace.methods.knockout import _mask_filled_runs, gini, knockout
from factrace.methods.severing import sever
from factrace.methods.tracing import _noise_value, _Tracer, noise_level, trace
from factrace.study import objects as O
from factrace.study.dataset_trace import known_facts, trace_dataset
from conftest import FIXTURES, fixture_model
from test_trace import _deep_model

PROMPT = "The quick brown fox jumps over the lazy dog and"
SUBJ = "brown fox"


def _with_bos(name):
    """A fixture model whose tokenizer adds a BOS token ``<s>`` (id 0), like Llama's."""
    from tokenizers import Tokenizer as TK

    from factrace.io.tokenizer import Tokenizer

    m = fixture_model(name)
    d = json.loads((FIXTURES / name / "tokenizer.json").read_text())
    d["post_processor"] = {"type": "Sequence", "processors": [
        d["post_processor"],
        {"type": "TemplateProcessing", "single": [{"SpecialToken": {"id": "<s>", "type_id": 0}},
                                                  {"Sequence": {"id": "A", "type_id": 0}}],
         "pair": [{"Sequence": {"id": "A", "type_id": 0}}], "special_tokens": {"<s>": {"id": "<s>", "ids": [0],
                                                                                      "tokens": ["<s>"]}}}]}
    tok = Tokenizer(TK.from_str(json.dumps(d)), bos_id=0)
    out = factrace.Model(copy.deepcopy(m.config), m.weights, tokenizer=tok, name=name + "-bos")
    assert out.encode("a b")[0] == 0 and out.encode("a b", add_special_tokens=False)[0] != 0
    return out


# ---------------------------------------------------------------------------------------------------------
# shared pieces


def test_check_reference():
    assert R.check_reference(None) is None and R.check_reference("ROME") == "rome"
    assert R.check_reference("none") is None
    with pytest.raises(ValueError, match="reference must be"):
        R.check_reference("geva")
    with pytest.raises(ValueError, match="reference must be"):
        trace(fixture_model("gpt2"), PROMPT, SUBJ, noise=0.5, samples=2, reference="geva")


def test_decoded_span_is_find_token_range():
    """ROME/CAARM decode every token and join: a subject whose character is split across byte tokens is not
    found (they raise), while the offsets-based span finds it; with a BOS both count it."""
    m = fixture_model("gpt2")
    assert factrace.subject_span(m, "Zoë likes Paris", "Zoë") == (0, 4)
    with pytest.raises(ValueError, match="find_token_range"):
        trace(m, "Zoë likes Paris", "Zoë", noise=0.5, samples=2, reference="rome")
    # a hand-computed case: tokens "Z", "o", "\ufffd", "\ufffd", " l", "i", "k", "es", ... ; " likes" spans 4..8
    ids = m.encode("Zoë likes Paris")
    assert R.decoded_span(m, ids, " likes") == factrace.subject_span(m, "Zoë likes Paris", " likes") == (4, 8)
    mb = _with_bos("gpt2")
    ids = mb.encode(PROMPT)
    assert R.decoded_span(mb, ids, SUBJ) == factrace.subject_span(mb, PROMPT, SUBJ)
    assert R.decoded_span(mb, ids, SUBJ)[0] > factrace.subject_span(fixture_model("gpt2"), PROMPT, SUBJ)[0]


def test_known_1000_subjects_shipped(shared_data):
    subs = R.known_1000_subjects()
    k = json.loads((shared_data / "known_1000.json").read_text())
    assert subs == tuple(r["subject"] for r in k) and len(subs) == 1209 and len(set(subs)) < 1209


def test_torch_std():
    x = np.random.RandomState(0).randn(1000, 7).astype(np.float32) * 3 + 1
    want = float(np.float32(x.astype(np.float64).std(ddof=1)))
    assert R.torch_std(x) == want
    torch = pytest.importorskip("torch")
    assert R.torch_std(x) == torch.from_numpy(x).std().item()


# ---------------------------------------------------------------------------------------------------------
# noise


def test_s3_default_subjects_are_known_1000():
    """trace(noise="s3") takes its level from known_1000's subjects (duplicates kept), not factrace's facts."""
    m = fixture_model("gpt2")
    want = noise_level(m, list(R.known_1000_subjects()), 3)
    assert noise_level(m) == want
    assert trace(m, PROMPT, SUBJ, samples=2).noise == want
    rows = np.concatenate([m.W("W_E")[m.encode(s, add_special_tokens=False)] for s in R.known_1000_subjects()])
    assert want == pytest.approx(3 * rows.astype(np.float64).std(), rel=1e-12)


def test_noise_level_presets():
    """ROME: subjects encoded WITH special tokens (a BOS counts) and torch's std; CAARM: without, torch's std."""
    m = _with_bos("llama_gqa2_tied")
    subs = ["brown fox", "lazy dog", "quick"]
    emb = lambda special: np.concatenate([m.W("W_E")[m.encode(s, add_special_tokens=special)] for s in subs])  # noqa
    assert noise_level(m, subs, 3) == pytest.approx(3 * emb(False).astype(np.float64).std(), rel=1e-12)
    assert noise_level(m, subs, 3, reference="caarm") == 3 * float(np.float32(emb(False).astype(np.float64).std(ddof=1)))
    assert noise_level(m, subs, 3, reference="rome") == 3 * float(np.float32(emb(True).astype(np.float64).std(ddof=1)))
    assert noise_level(m, subs, 3, reference="rome") != noise_level(m, subs, 3, reference="caarm")
    # a bare "s" is k = 1 in the references' parse_noise_rule, 3 in factrace
    assert _noise_value(m, "s", subs) == noise_level(m, subs, 3)
    assert _noise_value(m, "s", subs, "rome") == noise_level(m, subs, 1, reference="rome")


def test_noise_forms_are_romes():
    m = _deep_model("gpt2", 4)
    ids = m.encode(PROMPT)
    b, e = factrace.subject_span(m, PROMPT, SUBJ)
    S, d = 3, m.config.d_model
    # uniform: level * uniform(-1, 1) from RandomState(seed)
    tr = _Tracer(m, ids, (b, e), S, _noise_value(m, "u0.4", None), 1, None)
    np.testing.assert_array_equal(tr.noise_draws[0], 0.4 * np.random.RandomState(1).uniform(-1, 1, (S, e - b, d)))
    # m: randn through z @ W.T + mean, W W^T = the embeddings' unbiased covariance
    spec = factrace.embedding_noise(m, "m", texts=["brown fox", "lazy dog", "the quick brown fox jumps"])
    x = np.concatenate([m.W("W_E")[m.encode(t, add_special_tokens=False)] for t in
                        ["brown fox", "lazy dog", "the quick brown fox jumps"]]).astype(np.float64)
    np.testing.assert_allclose(spec.mean, x.mean(0), atol=1e-12)
    np.testing.assert_allclose(spec.W @ spec.W.T, np.cov(x.T), atol=1e-10)
    tr = _Tracer(m, ids, (b, e), S, spec, 1, None)
    np.testing.assert_allclose(tr.noise_draws[0], np.random.RandomState(1).randn(S, e - b, d) @ spec.W.T + spec.mean)
    # t3: the same, each (sample, token) scaled by sqrt((3 - 2) / u), u = RandomState(2).chisquare(3, 1000)
    t3 = factrace.embedding_noise(m, "t", texts=["brown fox", "lazy dog", "the quick brown fox jumps"], degrees=3)
    f = np.sqrt(1 / np.random.RandomState(2).chisquare(df=3, size=1000))[:S * (e - b)].reshape(S, e - b, 1)
    tr = _Tracer(m, ids, (b, e), S, t3, 1, None)
    np.testing.assert_allclose(tr.noise_draws[0], f * (np.random.RandomState(1).randn(S, e - b, d) @ t3.W.T + t3.mean))
    # the string rules reach trace
    for rule in ("u0.4", "m", "t3"):
        r = trace(m, PROMPT, SUBJ, noise=rule, samples=S, kind="mlp", window=2)
        n = trace(m, PROMPT, SUBJ, noise=rule, samples=S, kind="mlp", window=2, engine="naive")
        np.testing.assert_allclose(r.scores, n.scores, atol=1e-5)
        assert r.extra["noise_form"] == rule
    with pytest.raises(ValueError, match="noise must be"):
        trace(m, PROMPT, SUBJ, noise="x3", samples=2)


def test_replace_and_romes_additive_low_score():
    """replace=True puts the noise itself in the subject's embedding rows; ROME's calculate_hidden_flow then
    computes low_score WITHOUT replace (it does not pass it on), factrace from the replaced run."""
    m = _deep_model("gpt2", 4)
    ids = m.encode(PROMPT)
    b, e = factrace.subject_span(m, PROMPT, SUBJ)
    nz = np.random.RandomState(1).randn(3, e - b, m.config.d_model) * 0.5

    def corrupted(replace):
        ivs = [iv.set_values("embed", (nz[s] if replace else m.W("W_E")[ids[b:e]] + nz[s]).astype(np.float32),
                             positions=range(b, e), seq=s) for s in range(3)]
        rs = m.run([ids] * 3, interventions=ivs, logits="last")
        x = np.stack([r.logits[0] for r in rs]).astype(np.float64)
        p = np.exp(x - x.max(1, keepdims=True))
        return (p / p.sum(1, keepdims=True)).mean(0)

    clean = m.run(ids, logits="last").logits[0]
    a = int(np.argmax(clean))
    for ref, want in ((None, corrupted(True)[a]), ("rome", corrupted(False)[a]), ("caarm", corrupted(False)[a])):
        kw = dict(noise=0.5, samples=3, replace=True, reference=ref, kind="mlp", window=2,
                  add_special_tokens=True)
        r = trace(m, PROMPT, SUBJ, **kw)
        assert r.low_score == pytest.approx(want, abs=1e-6)
        assert r.scores[0, 0] == pytest.approx(corrupted(True)[a], abs=1e-6)  # cells: always the replaced run
        np.testing.assert_allclose(r.scores, trace(m, PROMPT, SUBJ, engine="naive", **kw).scores, atol=1e-5)
        assert r.extra["replace"]
    assert trace(m, PROMPT, SUBJ, noise=0.5, samples=3).low_score != trace(
        m, PROMPT, SUBJ, noise=0.5, samples=3, replace=True).low_score


def test_caarm_tokenizes_tracing_without_special_tokens():
    m = _with_bos("llama_gqa2_tied")
    r0 = trace(m, PROMPT, SUBJ, noise=0.5, samples=2)
    rr = trace(m, PROMPT, SUBJ, noise=0.5, samples=2, reference="rome")
    rc = trace(m, PROMPT, SUBJ, noise=0.5, samples=2, reference="caarm")
    assert len(r0.tokens) == len(rr.tokens) == len(rc.tokens) + 1 and r0.tokens[0] == "<s>"
    assert rr.subject_range[0] == rc.subject_range[0] + 1
    k = knockout(m, PROMPT, SUBJ, kind="mlp", window=1, reference="caarm")  # CAARM's knockout: WITH them
    assert k.subject_range == rr.subject_range


# ---------------------------------------------------------------------------------------------------------
# severing


@pytest.mark.parametrize("engine", ["fast", "naive"])
def test_unsevered_is_the_first_draws_curve_in_every_mode(engine):
    """The papers' unsevered ("ordinary") curve is the hidden trace at e-1 on the first noise draw, also with
    reference_noise=True (whose severed run uses the second draw)."""
    m = _deep_model("qwen3", 4)
    kw = dict(samples=3, noise=0.5, engine=engine)
    a = sever(m, PROMPT, SUBJ, reference_noise=False, **kw)
    b = sever(m, PROMPT, SUBJ, reference_noise=True, **kw)
    h = trace(m, PROMPT, SUBJ, kind="hidden", samples=3, noise=0.5)
    e1 = h.subject_range[1] - 1
    np.testing.assert_allclose(b.unsevered, a.unsevered, atol=1e-6)
    np.testing.assert_allclose(a.unsevered, h.scores[e1] - h.low_score, atol=1e-6)
    assert np.abs(b.effect - a.effect).max() > 1e-4  # the severed run's draw does differ


def test_sever_presets_default_to_reference_noise():
    m = _deep_model("gpt2", 4)
    kw = dict(samples=3, noise=0.5)
    assert not sever(m, PROMPT, SUBJ, **kw).reference_noise
    for ref in ("rome", "caarm"):
        s = sever(m, PROMPT, SUBJ, reference=ref, **kw)
        assert s.reference_noise and s.reference == ref
        np.testing.assert_allclose(s.effect, sever(m, PROMPT, SUBJ, reference_noise=True, **kw).effect, atol=1e-7)
        assert not sever(m, PROMPT, SUBJ, reference=ref, reference_noise=False, **kw).reference_noise


# ---------------------------------------------------------------------------------------------------------
# knockout


def test_knockout_windows_shrink_at_the_top_and_never_include_the_last_layer():
    m = _deep_model("gpt2", 7)
    k = knockout(m, PROMPT, SUBJ, kind="mlp", window=3)
    assert list(k.starts) == [0, 1, 2, 3] and k.layers[-1] == [3, 4, 5]
    k = knockout(m, PROMPT, SUBJ, kind="mlp", window=3, partial=True)
    assert list(k.starts) == [0, 1, 2, 3, 4, 5] and k.layers[-2:] == [[4, 5], [5]]
    k = knockout(m, PROMPT, SUBJ, kind="mlp", window=3, starts=[5])  # explicit: still never the last layer
    assert k.layers == [[5]]
    k = knockout(m, PROMPT, SUBJ, kind="mlp", window=3, starts=[5], exclude_last=False)
    assert k.layers == [[5, 6]]
    with pytest.raises(ValueError, match="out of range"):
        knockout(m, PROMPT, SUBJ, kind="mlp", window=3, starts=[6])
    # CAARM: num_block_layers = 5 blocks start .. start + 5 (6 layers), starts 0 .. L - 2, never layer L - 1
    k = knockout(m, PROMPT, SUBJ, kind="mlp", reference="caarm")
    assert k.window == 6 and list(k.starts) == list(range(6))
    assert k.layers == [list(range(s, 6)) for s in range(6)]
    assert knockout(m, PROMPT, SUBJ, kind="mlp").window == 5


def test_caarm_mlp_knockout_keeps_the_output_bias():
    """CAARM zeroes the MLP's input projection (up_proj / GPT-2's c_fc), so GPT-2's MLP still adds c_proj's
    bias; factrace zeroes the MLP output."""
    m = _deep_model("gpt2", 5)
    assert m.W("b_down", 0) is not None
    ids = m.encode(PROMPT)
    e1 = factrace.subject_span(m, PROMPT, SUBJ)[1] - 1
    kc = knockout(m, PROMPT, SUBJ, kind="mlp", window=2, starts=[1], reference="caarm")
    k0 = knockout(m, PROMPT, SUBJ, kind="mlp", window=2, starts=[1])
    ivs = [iv.set_values("mlp_out", np.stack([m.W("b_down", j) for j in (1, 2)])[:, None], layers=[1, 2])]
    r = m.run(ids, capture=["resid_final"], interventions=ivs, logits="last")
    x = r.logits[0].astype(np.float64)
    p = np.exp(x - x.max()) / np.exp(x - x.max()).sum()
    assert kc.probs[0] == pytest.approx(p[kc.answer], abs=1e-6)
    sc = m.final_norm(r.resid_final[e1]) @ m.W("W_E").T
    np.testing.assert_array_equal(kc.subject_topk[0], np.argsort(-sc)[:500])
    assert abs(kc.probs[0] - k0.probs[0]) > 1e-4
    # no bias (Llama): the same as zeroing the output
    ml = _deep_model("llama_gqa2_tied", 5)
    a = knockout(ml, PROMPT, SUBJ, kind="mlp", window=2, reference="caarm", starts=[0, 1])
    b = knockout(ml, PROMPT, SUBJ, kind="mlp", window=2, starts=[0, 1])
    np.testing.assert_allclose(a.probs, b.probs, atol=1e-7)


def _uniform_numpy(m, ids, layers):
    """Independent numpy check of mask-filled attention: every query's attention weights are 1/T over all T
    positions; computed with factrace's captured values of each layer's (already knocked-out) input."""
    c = m.config
    T = len(ids)
    x = m.run(ids, capture=["resid_pre"], logits=None).resid_pre[layers[0]]
    for j in layers:
        cap = {"v_cache": np.empty((c.n_layers, T, c.n_kv_heads * c.d_head), np.float32),
               "resid_final": np.empty((T, c.d_model), np.float32)}
        m._core.forward(np.array([T], np.int32), resid_in=x, start_layer=j, end_layer=j + 1, capture=cap)
        v = cap["v_cache"][j].reshape(T, c.n_kv_heads, c.d_head)
        rep = c.n_heads // c.n_kv_heads
        A = np.full((T, T), 1.0 / T)
        z = np.concatenate([A @ v[:, h // rep] for h in range(c.n_heads)], axis=1)  # (T, H*dh)
        attn = z @ m.W("W_O", j).T.astype(np.float64) + m.b_O(j)
        out = np.empty_like(x)
        m._core.forward(np.array([T], np.int32), resid_in=x, start_layer=j, end_layer=j + 1,
                        capture={"resid_final": out}, patch_site=np.full(T, 1, np.int32),
                        patch_layer=np.full(T, j, np.int32), patch_row=np.arange(T, dtype=np.int64),
                        patch_op=np.zeros(T, np.int32), patch_value=attn.astype(np.float32))
        x = out
    return x


def test_caarm_attention_knockout_is_uniform_over_all_positions():
    """CAARM fills the whole mask with the dtype minimum: uniform attention over every position, future ones
    included, so the last-subject readout moves with later tokens; factrace's zeroing does not."""
    for name in ("llama_gqa2_tied", "qwen2"):
        m = _deep_model(name, 5)
        ids = m.encode(PROMPT)
        e1 = factrace.subject_span(m, PROMPT, SUBJ)[1] - 1
        clean = m.run(ids, capture=["resid_pre"], logits=None)
        (x, lg), = _mask_filled_runs(m, ids, clean.resid_pre, [[1, 2]])
        want = _uniform_numpy(m, ids, [1, 2])
        tail = np.empty_like(want)
        m._core.forward(np.array([len(ids)], np.int32), resid_in=want, start_layer=3, end_layer=5,
                        capture={"resid_final": tail})
        np.testing.assert_allclose(x, tail, atol=2e-5)
        # the readout at e-1 depends on the tokens after it under CAARM's knockout only
        ids2 = ids.copy()
        ids2[-1] = (ids2[-1] + 7) % m.config.vocab_size
        kc = [knockout(m, i, (e1, e1 + 1), kind="attn", window=2, starts=[1], reference="caarm") for i in (ids, ids2)]
        k0 = [knockout(m, i, (e1, e1 + 1), kind="attn", window=2, starts=[1]) for i in (ids, ids2)]
        assert not np.array_equal(kc[0].subject_topk, kc[1].subject_topk)
        np.testing.assert_array_equal(k0[0].subject_topk, k0[1].subject_topk)


@pytest.mark.oracle
@pytest.mark.parametrize("name", ["llama_gqa2_tied", "qwen2"])
def test_caarm_knockouts_match_hooked_transformers(name):
    """The CAARM knockouts re-implemented with transformers hooks (attention_mask replaced by a (1, H, T, T)
    tensor of finfo.min; up_proj's output set to 0), compared with factrace's presets."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoModelForCausalLM.from_pretrained(FIXTURES / name, dtype=torch.float32,
                                                           attn_implementation="eager").eval()
    m = fixture_model(name)
    ids = m.encode(PROMPT)
    e1 = factrace.subject_span(m, PROMPT, SUBJ)[1] - 1
    inp = torch.tensor(ids[None].astype(np.int64))
    H, T = hf.config.num_attention_heads, len(ids)
    for kind in ("attn", "mlp"):
        k = knockout(m, PROMPT, SUBJ, kind=kind, window=1, starts=[0], exclude_last=True, reference="caarm")
        saved, hooks = [], []
        layer = hf.model.layers[0]
        if kind == "attn":
            fwd = layer.self_attn.forward

            def wrapped(*a, **kw):
                kw["attention_mask"] = torch.full((1, H, T, T), torch.finfo(torch.float32).min)
                return fwd(*a, **kw)
            layer.self_attn.forward = wrapped
            saved.append(fwd)
        else:
            hooks.append(layer.mlp.up_proj.register_forward_hook(lambda mod, a, out: out * 0))
        try:
            with torch.no_grad():
                out = hf(input_ids=inp, output_hidden_states=True)
        finally:
            if saved:
                layer.self_attn.forward = saved[0]
            for h in hooks:
                h.remove()
        hs = out.hidden_states[-1][0, e1].numpy()
        sc = hs @ m.W("W_E").T
        top = np.argsort(-sc)[:20]
        np.testing.assert_array_equal(k.subject_topk[0][:20], top)
        p = torch.softmax(out.logits[0, -1], -1)[k.answer].item()
        assert k.probs[0] == pytest.approx(p, abs=1e-5)


# ---------------------------------------------------------------------------------------------------------
# known-fact filter


def _greedy(m, p):
    return int(np.argmax(m.run(m.encode(p), logits="last").logits[0]))


def test_known_fact_criteria():
    """Three hand-picked facts for the gpt2 fixture: a one-token attribute (both criteria), a multi-token
    attribute whose first token is the greedy answer (the issue's "midfielder": first_token only), and a greedy
    token without the leading space whose text is the attribute (whole_attribute only)."""
    m = fixture_model("gpt2")
    p1, p2 = "sky a likes a over", "The quick brown fox jumps"
    a1, a2 = _greedy(m, p1), _greedy(m, p2)
    assert m.decode([a1]) == " b" and m.decode([a2]) == "in"
    first_tok = lambda w: int(m.encode(" " + w, add_special_tokens=False)[0])  # noqa: E731
    assert first_tok("b") == a1 and first_tok("bzzqx") == a1 and len(m.encode(" bzzqx", add_special_tokens=False)) > 1
    assert first_tok("in") != a2
    one = dict(prompt=p1, subject="sky", attribute="b")
    multi = dict(prompt=p1, subject="likes", attribute="bzzqx")
    nospace = dict(prompt=p2, subject="brown fox", attribute="in")
    recs = [one, multi, nospace]
    kept = lambda **kw: [r for r, _ in known_facts(m, recs, **kw)[0]]  # noqa: E731
    assert kept() == [one, multi]
    assert kept(criterion="whole_attribute") == [one, nospace]
    assert kept(reference="rome") == kept(reference="caarm") == [one, nospace]
    assert kept(reference="rome", criterion="first_token") == [one, multi]
    assert [a for _, a in known_facts(m, recs, reference="rome")[0]] == [a1, a2]
    with pytest.raises(ValueError, match="criterion"):
        known_facts(m, recs, criterion="exact")


def test_trace_dataset_presets():
    m = fixture_model("gpt2")
    recs = [dict(prompt="sky a likes a over", subject="likes", attribute="bzzqx"),
            dict(prompt="The quick brown fox jumps", subject="brown fox", attribute="in")]
    d0 = trace_dataset(m, recs, kinds=("hidden",), samples=2, progress=False, noise=0.5)
    dr = trace_dataset(m, recs, kinds=("hidden",), samples=2, progress=False, noise=0.5, reference="rome")
    assert list(d0.facts.subject) == ["likes"] and list(dr.facts.subject) == ["brown fox"]
    # s<k> from the records' subjects with the preset's std and tokenization
    for ref in (None, "caarm"):
        ds = trace_dataset(m, recs, kinds=("hidden",), samples=2, progress=False, noise="s3", reference=ref,
                           known_only=False)
        want = noise_level(m, ["likes", "brown fox"], 3, reference=ref)
        one = trace(m, recs[1]["prompt"], "brown fox", samples=2, noise=want, reference=ref)
        got = ds.frame[(ds.frame.fact == 1)].sort_values(["position", "layer"]).score.to_numpy()
        b, e = one.subject_range
        T = one.scores.shape[0]
        rows = sorted({b, *range(b + 1, e - 1), e - 1, *([e] if e < T else []), *range(e + 1, T - 1), T - 1})
        np.testing.assert_allclose(np.unique(got), np.unique(one.scores[rows]), atol=1e-12)


# ---------------------------------------------------------------------------------------------------------
# objects rate and Gini


def test_caarm_candidates_are_ascii_with_nltks_stopwords():
    toks = [" Zürich", " Paris", " also", " ain", " Tōkyō", " 1889", " of", "Paris", " would"]
    assert O.candidates_from_tokens(toks) == ["Zürich", "Paris", "ain", "Tōkyō", "Paris"]
    assert O.candidates_from_tokens(toks, reference="caarm") == ["Paris", "also", "Paris", "would"]
    assert "ain" in O.load_stopwords("nltk") and len(O.load_stopwords("nltk")) == 179
    assert O.is_word("Zürich") and not O.is_word("Zürich", reference="caarm")
    assert O.candidates_from_scores([3.0, 2.0, 1.0], [" Zürich", " Paris", " Rome"].__getitem__,
                                    reference="caarm") == ["Paris", "Rome"]


class _WordTokens:
    """A stand-in model whose tokenizer splits a text into the given tokens."""

    def __init__(self, tokens):
        self.tokens = tokens

    def encode(self, text):
        assert text == "".join(self.tokens)
        return np.arange(len(self.tokens))

    def decode(self, ids):
        return "".join(self.tokens[int(i)] for i in ids)


def test_caarm_reference_words_are_the_models_tokens():
    toks = ["The", " Tower", " of", " 1889", " in", " Paris", ".", " The", " Tower"]
    m = _WordTokens(toks)
    text = "".join(toks)
    # unstripped, deduplicated, case-sensitive stopwords ("The" stays, " of" goes), no alphabetic test (" 1889")
    assert O.reference_words(text, reference="caarm", model=m) == ["The", " Tower", " 1889", " Paris", " The"]
    assert O.reference_words(text) == ["Tower", "Paris"]
    with pytest.raises(ValueError, match="model="):
        O.reference_words(text, reference="caarm")
    real = fixture_model("gpt2")
    got = O.reference_words("The Tower of 1889 in Paris.", reference="caarm", model=real)
    assert got == list(dict.fromkeys(t for t in (real.decode([int(i)]) for i in real.encode("The Tower of 1889 in Paris."))
                                     if t.strip() not in O.load_stopwords("nltk") and len(t.strip()) > 2))


def test_caarm_objects_rate_divides_by_the_candidates_and_returns_minus_one():
    enc = {"x": [1, 0], "y": [0, 1], "r": [1, 0]}
    assert O.objects_rate(["x", "y"], ["r"], encoder=enc) == 2.0
    assert O.objects_rate(["x", "y"], ["r"], encoder=enc, reference="caarm") == 50.0
    assert O.objects_rate([], ["r"], encoder=enc, reference="caarm") == -1.0
    assert O.objects_rate(["x"], [], encoder=enc, reference="caarm") == -1.0
    assert O.objects_rate([], ["r"], encoder=enc) == 0.0
    many = ["x"] * 60
    assert O.objects_rate(many, ["r"], encoder=enc, reference="caarm") == 100.0  # its first 50


def test_gini_of_a_constant_vector():
    assert gini(np.full(5, 0.3)) == 0.0
    assert np.isnan(gini(np.full(5, 0.3), reference="caarm"))
    assert gini(np.full(5, 0.3), reference="rome") == 0.0
    assert gini([0, 0, 0, 1], reference="caarm") == gini([0, 0, 0, 1]) == pytest.approx(0.75)


# ---------------------------------------------------------------------------------------------------------
# the report


def test_settings_and_cli_carry_the_preset():
    from factrace.study.report import add_arguments, settings_from_args
    from factrace.study.settings import StudySettings
    import argparse

    s = StudySettings(reference="caarm")
    assert s.knockout_window == 6 and s.known_criterion == "whole_attribute" and s.to_dict()["reference"] == "caarm"
    s = StudySettings()
    assert s.knockout_window == 5 and s.known_criterion == "first_token" and s.reference is None
    assert StudySettings(reference="rome", noise="s").noise_spec == ("s", 1.0)
    with pytest.raises(ValueError):
        StudySettings(reference="x")
    ap = argparse.ArgumentParser()
    add_arguments(ap)
    a = ap.parse_args(["--model", "x", "--reference", "caarm"])
    assert settings_from_args(a).reference == "caarm" and settings_from_args(a).knockout_window == 6
    a = ap.parse_args(["--model", "x"])
    assert settings_from_args(a).reference is None


def test_report_records_the_preset(tmp_path):
    from factrace.study.report import run_report

    m = _deep_model("gpt2", 3)
    p = "The quick brown fox jumps"
    a = int(np.argmax(m.run(m.encode(p), logits="last").logits[0]))
    recs = [dict(prompt=p, subject="quick brown", attribute=m.decode([a]).strip())]
    res = run_report([m], recs, n=1, out=tmp_path / "r", samples=2, objects=False, progress=False,
                     reference="caarm", labels=["tiny"])
    md = res.markdown.read_text()
    assert "reference=caarm (CAARM's code semantics)" in md and "knockout_window=6" in md
    ko = res.tables["raw_knockout"]
    assert sorted(ko.start.unique()) == [0, 1]  # starts 0 .. L - 2, shrinking windows
