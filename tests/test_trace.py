"""Causal tracing, severing, knockout and Gini: the fast engine against the naive one, hand-computed
cases, and (live) an independent ROME implementation with transformers + torch hooks."""
import numpy as np
import pytest

import factrace
from factrace import interventions as iv
from factrace.methods.tracing import _Tracer, trace, trace_all
from factrace.methods.knockout import gini, knockout
from factrace.methods.severing import sever
from conftest import ARCH_FIXTURES, MODEL_FIXTURES, PARALLEL_FIXTURES, expected, fixture_model, FIXTURES

SPAN = (2, 5)


@pytest.mark.parametrize("name", MODEL_FIXTURES)
def test_fast_equals_naive(name):
    m = fixture_model(name)
    ids = expected(name)["p1_ids"]
    for kind, window in (("hidden", 10), ("mlp", 3), ("attn", 2)):
        f = trace(m, ids, SPAN, kind=kind, window=window, noise=0.5, samples=4)
        n = trace(m, ids, SPAN, kind=kind, window=window, noise=0.5, samples=4, engine="naive")
        assert f.scores.shape == (len(ids), m.config.n_layers)
        np.testing.assert_allclose(f.scores, n.scores, atol=1e-5, rtol=0)
        assert f.low_score == n.low_score and f.high_score == n.high_score


def _deep_model(name, n_layers, seed=0):
    """A fixture's blocks repeated (each copy perturbed) to ``n_layers`` layers: a deeper random model, so
    that windows end and begin at many layers (the trunk and entry paths of the fast engine)."""
    import copy

    m = fixture_model(name)
    cfg = copy.deepcopy(m.config)
    L0 = cfg.n_layers
    rs = np.random.RandomState(seed)
    w = {k: m.W(k) for k in m.weights if not k.startswith("blocks.")}
    for i in range(n_layers):
        for k in m.weights:
            pre = f"blocks.{i % L0}."
            if k.startswith(pre):
                v = m.W(k)  # float32
                w[f"blocks.{i}." + k[len(pre):]] = (v + rs.randn(*v.shape).astype(np.float32) * 0.02).astype(np.float32)
    cfg.n_layers = n_layers
    cfg.layer_window = [cfg.layer_window[i % L0] if cfg.layer_window else 0 for i in range(n_layers)]
    cfg.layer_rope = [cfg.layer_rope[i % L0] if cfg.layer_rope else 0 for i in range(n_layers)]
    return factrace.Model(cfg, w, tokenizer=m.tokenizer, name=f"{name}-deep{n_layers}")


@pytest.mark.parametrize("name", sorted(set(ARCH_FIXTURES) | set(PARALLEL_FIXTURES)))
def test_fast_equals_naive_every_window_deep_model(name):
    """Every window size from 1 to beyond L on a 7-layer model: trunk groups ending at every layer,
    windows reaching the top, entries at every layer including the last."""
    m = _deep_model(name, 7)
    ids = expected(name)["p1_ids"][:8]
    for kind in ("mlp", "attn"):
        for window in (1, 2, 3, 4, 5, 7, 9, 14):
            f = trace(m, ids, (1, 3), kind=kind, window=window, noise=0.5, samples=3)
            n = trace(m, ids, (1, 3), kind=kind, window=window, noise=0.5, samples=3, engine="naive")
            np.testing.assert_allclose(f.scores, n.scores, atol=1e-5, rtol=0, err_msg=f"{kind} window {window}")
    f = trace(m, ids, (1, 3), kind="hidden", noise=0.5, samples=3)
    n = trace(m, ids, (1, 3), kind="hidden", noise=0.5, samples=3, engine="naive")
    np.testing.assert_allclose(f.scores, n.scores, atol=1e-5, rtol=0)


def test_cells_before_subject_are_exactly_low_and_last_cell_is_clean():
    m = fixture_model("llama_gqa2_tied")
    ids = expected("llama_gqa2_tied")["p1_ids"]
    r = trace(m, ids, (3, 6), noise=0.7)
    assert np.all(r.scores[:3] == r.low_score)
    assert r.scores[-1, -1] == r.high_score
    assert r.subject_range == (3, 6) and r.kind == "hidden" and r.window == 10
    assert 0 <= r.answer < m.config.vocab_size and len(r.tokens) == len(ids)


def test_noise_is_romes_draw_added_to_the_embedding_output():
    m = fixture_model("gpt2")
    ids = expected("gpt2")["p0_ids"]
    tr = _Tracer(m, ids, (1, 3), 10, 0.25, 1, None)
    draw = np.random.RandomState(1).randn(10, 2, m.config.d_model) * 0.25
    np.testing.assert_array_equal(tr.noise_draws[0], draw)
    want = (m.W("W_E")[ids[1:3]].astype(np.float64)[None] + draw).astype(np.float32)
    np.testing.assert_array_equal(tr.corrupt[0]["noised"].reshape(10, 2, -1), want)
    # the corrupted run's embedding output at the subject = noised token embedding + position embedding
    pos = m.W("W_pos")[1:3]
    np.testing.assert_allclose(tr.corrupt[0]["resid_pre"][0].reshape(10, len(ids), -1)[:, 1:3], want + pos, atol=1e-6)


def test_restoring_every_state_gives_back_the_clean_run():
    m = fixture_model("qwen3")
    ids = expected("qwen3")["p1_ids"]
    clean = m.run(ids, capture=["resid_pre", "resid_final"])
    noise = np.random.RandomState(0).randn(3, m.config.d_model).astype(np.float32)
    noisy = [iv.add("embed", noise, positions=[2, 3, 4])]
    corrupted = m.run(ids, interventions=noisy)
    assert np.abs(corrupted.logits - clean.logits).max() > 1e-3
    restored = m.run(ids, interventions=noisy + [iv.set_values("resid_post", clean.resid_post)])
    np.testing.assert_allclose(restored.logits, clean.logits, atol=1e-5)


def test_window_clipping_follows_the_reference():
    m = fixture_model("llama_sharded")  # 3 layers
    ids = expected("llama_sharded")["p1_ids"]
    L = m.config.n_layers
    assert L == 3
    # w = 4: layers max(0, l - 2) .. min(L, l + 2) - 1 -> l=0: 0..1, l=1: 0..2, l=2: 0..2
    hand = {0: [0, 1], 1: [0, 1, 2], 2: [0, 1, 2]}
    r = trace(m, ids, SPAN, kind="mlp", window=4, noise=0.5, samples=3)
    tr = _Tracer(m, ids, SPAN, 3, 0.5, 1, None)
    noised = tr.corrupt[0]["noised"].reshape(3, 3, -1)
    clean = m.run(ids, capture=["mlp_out"])
    t = 6
    for l, layers in hand.items():
        ivs = [iv.set_values("embed", noised[s], positions=range(2, 5), seq=s) for s in range(3)]
        ivs.append(iv.set_values("mlp_out", clean.mlp_out[layers, t][:, None], layers=layers, positions=t))
        rs = m.run([ids] * 3, interventions=ivs, logits="last")
        p = np.mean([r_.probs[0, tr.answer] for r_ in rs])
        assert abs(p - r.scores[t, l]) < 1e-5
    # odd window: w = 3 -> l-1 .. l+1
    r3 = trace(m, ids, SPAN, kind="attn", window=1, noise=0.5, samples=3)
    r3n = trace(m, ids, SPAN, kind="attn", window=1, noise=0.5, samples=3, engine="naive")
    np.testing.assert_allclose(r3.scores, r3n.scores, atol=1e-5)


@pytest.mark.parametrize("name", ["gpt2", "gemma3", "llama_sharded"] + PARALLEL_FIXTURES + ["neox_sequential"])
@pytest.mark.parametrize("reference_noise", [False, True])
def test_sever_fast_equals_naive(name, reference_noise):
    m = fixture_model(name)
    ids = expected(name)["p1_ids"]
    for frozen in ("mlp", "attn"):
        for span in ((2, 5), (2, len(ids))):
            f = sever(m, ids, span, frozen=frozen, noise=0.5, samples=3, reference_noise=reference_noise)
            n = sever(m, ids, span, frozen=frozen, noise=0.5, samples=3, reference_noise=reference_noise, engine="naive")
            np.testing.assert_allclose(f.effect, n.effect, atol=1e-6)
            np.testing.assert_allclose(f.unsevered, n.unsevered, atol=1e-6)


def test_sever_hand_computed():
    """Severing by hand: noise, restore the hidden state at (e-1, l), freeze MLP outputs at e-1."""
    m = fixture_model("llama_sharded")
    ids = expected("llama_sharded")["p1_ids"]
    b, e = 2, 5
    s = sever(m, ids, (b, e), frozen="mlp", noise=0.5, samples=2)
    tr = _Tracer(m, ids, (b, e), 2, 0.5, 1, None)
    noised = tr.corrupt[0]["noised"].reshape(2, e - b, -1)
    corrupted = m.run([ids] * 2, capture=["mlp_out"], interventions=[
        iv.set_values("embed", noised[k], positions=range(b, e), seq=k) for k in range(2)])
    clean = m.run(ids, capture=["resid_pre", "resid_final"])
    l = 0
    ps = []
    for k in range(2):
        r = m.run(ids, logits="last", interventions=[
            iv.set_values("embed", noised[k], positions=range(b, e)),
            iv.set_values("resid_post", clean.resid_post[l, e - 1], layers=l, positions=e - 1),
            iv.set_values("mlp_out", corrupted[k].mlp_out[:, e - 1][:, None], positions=e - 1)])
        ps.append(r.probs[0, tr.answer])
    assert abs(np.mean(ps) - s.low_score - s.effect[l]) < 1e-6
    # freezing matters: the severed effect differs from the unsevered one here
    assert abs(s.effect[0] - s.unsevered[0]) > 1e-6


def test_knockout_hand_computed():
    m = fixture_model("llama_sharded")
    ids = expected("llama_sharded")["p1_ids"]
    k = knockout(m, ids, (2, 5), kind="mlp", window=2)
    assert list(k.starts) == [0]  # exclude_last: the window 1..2 would include the last layer
    k2 = knockout(m, ids, (2, 5), kind="attn", window=2, exclude_last=False)
    assert list(k2.starts) == [0, 1]
    for kk, kind in ((k, "mlp"), (k2, "attn")):
        for s, p in zip(kk.starts, kk.probs):
            r = m.run(ids, interventions=[iv.zero(kind + "_out", layers=range(s, s + 2))], logits="last")
            assert abs(r.probs[0, kk.answer] - p) < 1e-6
    assert k.subject_topk.shape == (1, min(500, m.config.vocab_size))
    # the readout: final-normed state at the last subject token projected on W_E
    r = m.run(ids, capture=["resid_final"], interventions=[iv.zero("mlp_out", layers=[0, 1])])
    from factrace.methods.knockout import final_norm
    sc = final_norm(m, r.resid_final[4]) @ m.W("W_E").T
    assert k.subject_topk[0, 0] == int(np.argmax(sc))
    assert k.to_frame().shape[0] == 1


def test_gini_hand_computed():
    assert gini([0, 0, 0, 1]) == pytest.approx(0.75, abs=1e-6)
    assert gini([1, 2, 3]) == pytest.approx(4 / (2 * 3 * 1.5), abs=1e-6)
    assert gini([5, 5, 5]) == 0.0
    assert gini([0, 1]) == pytest.approx(0.5, abs=1e-6)
    # scale and shift invariant
    x = np.random.RandomState(0).rand(20)
    assert gini(x) == pytest.approx(gini(3 * x + 7), abs=1e-6)


def test_trace_result_frame_and_plot(tmp_path):
    m = fixture_model("gpt2")
    ids = expected("gpt2")["p1_ids"]
    res = trace_all(m, ids, SPAN, noise=0.5, samples=3, window=3)
    for kind, r in res.items():
        df = r.to_frame()
        assert len(df) == r.scores.size and set(df.columns) >= {"position", "layer", "token", "in_subject", "score"}
        assert df.in_subject.sum() == 3 * m.config.n_layers
        fig = r.plot()
        out = tmp_path / f"{kind}.png"
        fig.savefig(out)
        assert out.stat().st_size > 1000


def test_subject_span_from_offsets():
    m = fixture_model("gpt2")
    text = "The quick brown fox jumps over the lazy dog"
    b, e = factrace.subject_span(m, text, "brown fox")
    ids, offs = m.tokenizer.encode_with_offsets(text)
    start = text.index("brown fox")
    assert offs[b][0] <= start < offs[b][1] or offs[b][0] == start
    assert offs[e - 1][1] >= start + len("brown fox")
    assert all(offs[i][1] <= start for i in range(b))
    with pytest.raises(ValueError, match="does not occur"):
        factrace.subject_span(m, text, "purple cat")
    with pytest.raises(ValueError, match="not inside"):
        factrace.subject_span(m, text, (3, 99))


def test_trace_dataset_and_interrupt(monkeypatch):
    import factrace.study.dataset_trace as trmod

    m = fixture_model("gpt2")
    recs = [dict(prompt="The quick brown fox jumps over", subject="brown fox", attribute="the"),
            dict(prompt="Hello world of the", subject="world", attribute="x"),
            dict(prompt="Hello world", subject="moon", attribute="x")]
    dt = trmod.trace_dataset(m, recs, known_only=False, progress=False, samples=3, noise=0.5)
    assert len(dt.facts) == 2 and len(dt.rejected) == 1 and not dt.interrupted
    av = dt.averages()
    assert set(av.category) <= set(trmod.CATEGORIES)
    assert dt.ate() == pytest.approx(dt.facts.high_score.mean() - dt.facts.low_score.mean())
    # a single fact's last-subject-token row in the frame equals its own trace
    one = trace(m, recs[0]["prompt"], "brown fox", noise=0.5, samples=3)
    f = dt.frame
    row = f[(f.fact == 0) & (f.kind == "hidden") & (f.category == "last subject token")].sort_values("layer")
    np.testing.assert_allclose(row.score.values, one.scores[one.subject_range[1] - 1])
    # Ctrl-C after the first fact keeps it
    real = trmod._trace_rows
    calls = []

    def flaky(*a, **k):
        if calls:
            raise KeyboardInterrupt
        calls.append(1)
        return real(*a, **k)

    monkeypatch.setattr(trmod, "_trace_rows", flaky)
    dt2 = trmod.trace_dataset(m, recs[:2], known_only=False, progress=False, samples=3, noise=0.5)
    assert dt2.interrupted and len(dt2.facts) == 1


@pytest.mark.oracle
@pytest.mark.parametrize("name", ["gpt2", "llama_gqa2_tied", "qwen2", "qwen3", "mistral", "gemma3", "pythia_parallel",
                                  "neox_sequential", "gptj"])
def test_matches_independent_torch_reference(name):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    import rome_reference

    hf = transformers.AutoModelForCausalLM.from_pretrained(FIXTURES / name, dtype=torch.float32,
                                                           attn_implementation="eager").eval()
    m = fixture_model(name)
    ids = expected(name)["p1_ids"][:9]
    span = (2, 5)
    noise = np.random.RandomState(1).randn(10, 3, m.config.d_model) * 0.5
    for kind, window in (("hidden", 10), ("mlp", 3), ("attn", 3)):
        ref_scores, low, high, answer = rome_reference.trace(hf, ids, span, kind, window, noise)
        r = trace(m, ids, span, kind=kind, window=window, noise=0.5, samples=10, seed=1)
        assert r.answer == answer
        assert abs(r.low_score - low) < 1e-5 and abs(r.high_score - high) < 1e-5
        np.testing.assert_allclose(r.scores, ref_scores, atol=1e-5)


@pytest.mark.parametrize("name", ["gpt2", "qwen3", "gemma3"])
def test_positions_compute_those_rows_only(name):
    m = fixture_model(name)
    ids = expected(name)["p1_ids"][:10]
    span = (2, 5)
    full = trace_all(m, ids, span, noise=0.5, samples=3, window=3)
    for positions, rows in (("last_subject", [4]), ([3, -1], [3, 9]), ([0, 6], [0, 6])):
        part = trace_all(m, ids, span, noise=0.5, samples=3, window=3, positions=positions)
        for kind, r in part.items():
            for t in range(len(ids)):
                if t < span[0]:  # before the subject: low_score, whatever is asked
                    np.testing.assert_array_equal(r.scores[t], r.low_score)
                elif t in rows:
                    np.testing.assert_allclose(r.scores[t], full[kind].scores[t], atol=1e-6, err_msg=f"{kind} {t}")
                else:
                    assert np.isnan(r.scores[t]).all(), (kind, t)
    naive = trace(m, ids, span, kind="mlp", noise=0.5, samples=3, window=3, engine="naive", positions=[4])
    np.testing.assert_allclose(naive.scores[4], full["mlp"].scores[4], atol=1e-5)
    assert np.isnan(naive.scores[5]).all()
    with pytest.raises(ValueError, match="positions"):
        trace(m, ids, span, positions="middle")
    with pytest.raises(ValueError, match="not a token position"):
        trace(m, ids, span, positions=[len(ids)])


def test_trace_dataset_last_subject_only():
    m = fixture_model("gpt2")
    recs = [{"prompt": "a b c d e", "subject": "b c", "attribute": "x"}]
    dt = factrace.trace_dataset(m, recs, known_only=False, progress=False, samples=2, noise=0.5,
                                positions="last_subject")
    assert set(dt.frame.category) == {"last subject token"}
    ls = dt.last_subject_effects()
    assert len(ls) == 3 * m.config.n_layers

