"""Model.generate: greedy tokens equal transformers' ``generate(do_sample=False)`` (committed ids from
tests/make_generation_fixtures.py; live when torch + transformers are installed), the key/value cache
equals full re-runs, sampling is reproducible with a seed, interventions apply at every step, stops."""
import json
from pathlib import Path

import numpy as np
import pytest

import factrace
import factrace.interventions as fi
from conftest import FIXTURES, MODEL_FIXTURES, expected, fixture_model

HERE = Path(__file__).resolve().parent
REF = json.loads((HERE / "fixtures" / "generation.json").read_text())


def _naive_greedy(m, ids, n, interventions=(), stop_ids=()):
    """Greedy decoding by a full forward pass of the whole sequence per step (no cache)."""
    out = [int(i) for i in ids]
    for _ in range(n):
        r = m.run(np.array(out, np.int32), logits="last", interventions=list(interventions))
        tok = int(np.argmax(r.logits[0]))
        out.append(tok)
        if tok in stop_ids:
            break
    return out[len(ids):]


def _eos(m):
    e = m.config.eos_token_id
    return set(e if isinstance(e, list) else [] if e is None else [e])


@pytest.mark.parametrize("name", MODEL_FIXTURES)
def test_greedy_matches_transformers_generate(name):
    m = fixture_model(name)
    ref = REF["fixtures"][name]
    g = m.generate(np.array(ref["prompt_ids"], np.int32), max_new_tokens=20)
    assert list(g.new_ids) == ref["new_ids"]
    assert list(g.ids[:g.prompt_len]) == ref["prompt_ids"]
    assert g.stopped == ("eos" if len(ref["new_ids"]) < 20 else "length")


@pytest.mark.parametrize("name", MODEL_FIXTURES)
def test_cache_equals_full_reruns(name):
    m = fixture_model(name)
    ids = expected(name)["p0_ids"]
    g = m.generate(ids, max_new_tokens=12, stop=[])
    assert len(g.new_ids) == 12 and g.stopped == "length"
    assert list(g.new_ids) == _naive_greedy(m, ids, 12)


@pytest.mark.parametrize("name", ["gpt2", "llama_gqa2_tied", "gemma3", "pythia_parallel", "mistral"])
def test_interventions_at_every_step_equal_full_reruns(name):
    """positions=None: every position, generated ones too (steering); positions in the prompt (absolute,
    negative from the end of the prompt): those positions of every step's sequence."""
    m = fixture_model(name)
    ids = expected(name)["p0_ids"]
    T0, c = len(ids), m.config
    u = np.random.default_rng(1).normal(0, 1.0, c.d_model).astype(np.float32)
    cases = [
        ([fi.add_direction("resid_post", u, 2.0, layers=0)], [fi.add_direction("resid_post", u, 2.0, layers=0)]),
        ([fi.zero("z", layers=c.n_layers - 1, positions=[-1], heads=[0])],
         [fi.zero("z", layers=c.n_layers - 1, positions=[T0 - 1], heads=[0])]),
        ([fi.scale("mlp_post", 0.0, layers=0, positions=[1, 2], neurons=[0, 1, 2])],
         [fi.scale("mlp_post", 0.0, layers=0, positions=[1, 2], neurons=[0, 1, 2])]),
        ([fi.block_attention(layers=[0], queries=[-1], keys=[0])], [fi.block_attention(layers=[0], queries=[T0 - 1], keys=[0])]),
    ]
    for ivs, naive_ivs in cases:
        g = m.generate(ids, max_new_tokens=8, stop=[], interventions=ivs)
        assert list(g.new_ids) == _naive_greedy(m, ids, 8, naive_ivs), ivs[0]
    # an intervention changes the generation (the steering one, at least)
    assert list(m.generate(ids, 8, stop=[], interventions=cases[0][0]).new_ids) != list(m.generate(ids, 8, stop=[]).new_ids)


def test_value_with_a_positions_axis_applies_per_position():
    m = fixture_model("gpt2")
    ids = expected("gpt2")["p0_ids"]
    vals = np.random.default_rng(2).normal(0, 1.0, (1, 2, m.config.d_model)).astype(np.float32)
    T0 = len(ids)
    ivs = [fi.add("resid_pre", vals, layers=1, positions=[1, T0 + 2])]  # a prompt position and a generated one
    g = m.generate(ids, max_new_tokens=6, stop=[], interventions=ivs)
    out = [int(i) for i in ids]
    for step in range(6):
        pos = [1] + ([T0 + 2] if len(out) > T0 + 2 else [])
        iv = fi.add("resid_pre", vals[:, :len(pos)], layers=1, positions=pos)
        out.append(int(np.argmax(m.run(np.array(out, np.int32), logits="last", interventions=[iv]).logits[0])))
    assert list(g.new_ids) == out[T0:]


def test_sampling_is_reproducible():
    m = fixture_model("llama_gqa2_tied")
    ids = expected("llama_gqa2_tied")["p0_ids"]
    kw = dict(max_new_tokens=15, do_sample=True, temperature=1.5, stop=[])
    a = m.generate(ids, seed=7, **kw)
    b = m.generate(ids, seed=7, **kw)
    assert list(a.new_ids) == list(b.new_ids)
    others = {tuple(m.generate(ids, seed=s, **kw).new_ids) for s in range(8, 14)}
    assert len(others | {tuple(a.new_ids)}) > 1  # different seeds draw different sequences
    greedy = list(m.generate(ids, max_new_tokens=15, stop=[]).new_ids)
    assert list(m.generate(ids, max_new_tokens=15, do_sample=True, top_k=1, seed=3, stop=[]).new_ids) == greedy
    assert list(m.generate(ids, max_new_tokens=15, do_sample=True, top_p=1e-6, seed=3, stop=[]).new_ids) == greedy
    assert list(m.generate(ids, max_new_tokens=15, do_sample=True, temperature=1e-4, seed=3, stop=[]).new_ids) == greedy
    # top_k restricts the draws to the k most likely tokens of each step
    s = m.generate(ids, max_new_tokens=10, do_sample=True, top_k=3, seed=5, stop=[])
    seq = [int(i) for i in ids]
    for t in s.new_ids:
        lg = m.run(np.array(seq, np.int32), logits="last").logits[0]
        assert t in set(np.argsort(-lg)[:3].tolist())
        seq.append(int(t))


def test_stops():
    m = fixture_model("gpt2")
    ids = expected("gpt2")["p0_ids"]
    free = m.generate(ids, max_new_tokens=10, stop=[])
    first = int(free.new_ids[3])
    g = m.generate(ids, max_new_tokens=10, stop=first)
    assert g.stopped == "stop" and list(g.new_ids) == list(free.new_ids[:list(free.new_ids).index(first) + 1])
    text = m.decode(free.new_ids[:4])
    g2 = m.generate(ids, max_new_tokens=10, stop=[text[-1]])
    assert g2.stopped == "stop" and g2.text.endswith(text[-1]) and len(g2.new_ids) <= 4
    assert len(m.generate(ids, max_new_tokens=0).new_ids) == 0
    with pytest.raises(factrace.InputError, match="context"):
        m.generate(ids, max_new_tokens=m.config.n_ctx)
    with pytest.raises(ValueError):
        m.generate(ids, max_new_tokens=-1)
    g3 = m.generate(m.decode(ids), max_new_tokens=3, stop=[])  # a str prompt
    assert isinstance(g3.text, str) and g3.prompt_len == len(m.encode(m.decode(ids)))
    assert "new tokens" in g3._repr_html_()


# ---------------------------------------------------------------------------------------------------------
# packaged real models (committed transformers ids; 20 greedy tokens)

@pytest.mark.realmodel
@pytest.mark.parametrize("name", ["smollm2", "gemma3-270m", "qwen2.5-coder-0.5b"])
def test_real_model_greedy_matches_transformers(name):
    from factrace.io import packaged

    if not packaged.is_installed(name):
        pytest.skip(f"{name} is not installed")
    if name not in REF["real"]:
        pytest.skip(f"no committed ids for {name}")
    m = factrace.load(name)
    for case in REF["real"][name]:
        ids = m.encode(case["prompt"])
        assert list(ids) == case["prompt_ids"]
        g = m.generate(case["prompt"], max_new_tokens=20)
        assert list(g.new_ids) == case["new_ids"], (case["prompt"], g.text, case["text"])
        assert g.text == case["text"]


# ---------------------------------------------------------------------------------------------------------
# live: transformers' generate now

@pytest.mark.oracle
@pytest.mark.parametrize("name", MODEL_FIXTURES)
def test_live_greedy_matches_transformers_generate(name):
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    import make_generation_fixtures as mg
    import oracle

    hf = oracle.load_hf(str(FIXTURES / name))
    m = fixture_model(name)
    for ids in (expected(name)["p1_ids"], expected(name)["p0_ids"][:3]):
        assert list(m.generate(ids, max_new_tokens=20).new_ids) == mg.hf_greedy(hf, ids)


@pytest.mark.oracle
@pytest.mark.realmodel
def test_live_smollm2_greedy_matches_transformers():
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    import make_generation_fixtures as mg

    from factrace.io import packaged

    if not packaged.is_installed("smollm2"):
        pytest.skip("smollm2 is not installed")
    path = packaged.resolve("smollm2")
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                           dtype=torch.float32).eval()
    m = factrace.load("smollm2")
    ids = m.encode("The capital of Japan is")
    assert list(m.generate(ids, max_new_tokens=20).new_ids) == mg.hf_greedy(hf, ids)
