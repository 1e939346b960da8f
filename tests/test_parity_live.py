"""Live parity: factrace vs Hugging Face transformers (eager, float32) on freshly built tiny models.

For every spec in tests/oracle.SPECS the checkpoint is written by transformers into a temporary
directory (tests/oracle.build), run by HF with hooks (tests/oracle.hf_run) and loaded by factrace.load.
Needs torch + transformers (marked ``oracle``); the committed-fixture version is test_parity_fixtures.py.
"""
import numpy as np
import pytest

pytestmark = pytest.mark.oracle

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("safetensors")

import factrace  # noqa: E402
import oracle  # noqa: E402

TOL = 1e-4
STATES = ("embed", "resid_pre", "attn_out", "mlp_out", "resid_final", "attn")
TEXT = "The capital of France is Paris, and the quick brown fox jumps over the lazy dog."


@pytest.fixture(scope="module", params=sorted(oracle.SPECS))
def built(request, tmp_path_factory):
    name = request.param
    d = tmp_path_factory.mktemp(name)
    oracle.build(name, str(d))
    hf = oracle.load_hf(str(d))
    m = factrace.load(d)
    return name, d, hf, m


def _prompts(m):
    """A tokenized text prompt (> sliding window 4), a short one, and one filling the whole context."""
    rng = np.random.default_rng(0)
    V, n_ctx = m.config.vocab_size, m.config.n_ctx
    text_ids = m.encode(TEXT)
    assert len(text_ids) > 8
    return [text_ids, np.array([5, 17, 42], np.int32), rng.integers(0, V, n_ctx).astype(np.int32)]


def _compare(r, e, where):
    assert r.logits.shape == e["logits"].shape, where
    dl = np.abs(r.logits - e["logits"]).max()
    assert dl <= TOL, f"{where}: logits differ by {dl}"
    for f in STATES:
        got, want = getattr(r, f), e[f]
        assert got.shape == want.shape, f"{where}: {f} shape {got.shape} vs {want.shape}"
        diff = np.abs(got - want).max()
        assert diff <= TOL, f"{where}: {f} differs by {diff}"
    z = r.z.reshape(r.z.shape[0], r.z.shape[1], -1)  # (L, T, H, dh) -> the oracle's (L, T, H*dh)
    assert z.shape == e["attn_z"].shape
    dz = np.abs(z - e["attn_z"]).max()
    assert dz <= TOL, f"{where}: z differs from attn_z by {dz}"


def test_config_matches_spec(built):
    name, d, hf, m = built
    spec = oracle.SPECS[name]
    assert m.config.arch == spec["arch"]
    assert m.config.vocab_size == spec["config"]["vocab_size"]
    if name in ("mistral", "gemma3", "gemma3_linear_rope"):
        assert any(m.config.layer_window), "sliding window not picked up"


def test_live_parity_single(built):
    name, d, hf, m = built
    prompts = _prompts(m)
    if name in ("mistral", "gemma3", "gemma3_linear_rope"):
        assert max(len(p) for p in prompts) > 4  # longer than the sliding window
    want = oracle.hf_run(str(d), prompts, model=hf)
    for i, (ids, e) in enumerate(zip(prompts, want)):
        r = m.run(ids, capture=True)
        _compare(r, e, f"{name} prompt {i} (T={len(ids)})")


def test_live_parity_batched(built):
    name, d, hf, m = built
    prompts = _prompts(m)
    want = oracle.hf_run(str(d), prompts, model=hf)
    rs = m.run(prompts, capture=True)
    assert isinstance(rs, list) and len(rs) == len(prompts)
    for i, (r, e) in enumerate(zip(rs, want)):
        _compare(r, e, f"{name} batched prompt {i} (T={len(prompts[i])})")
    last = m.run(prompts, logits="last")
    for i, (r, e) in enumerate(zip(last, want)):
        assert np.abs(r.logits[0] - e["logits"][-1]).max() <= TOL, f"{name} logits='last' prompt {i}"


def test_live_greedy_continuation(built):
    """A few greedy steps: the argmax token chosen by factrace is HF's at every step."""
    name, d, hf, m = built
    ids = list(m.encode(TEXT)[:6])
    for _ in range(4):
        with torch.no_grad():
            hl = hf(input_ids=torch.tensor([ids]), use_cache=False).logits[0, -1].float().numpy()
        fl = m.run(np.array(ids, np.int32), logits="last").logits[0]
        assert np.abs(fl - hl).max() <= TOL
        # argmax agrees unless the top two are within the tolerance
        top2 = np.sort(hl)[-2:]
        if top2[1] - top2[0] > 2 * TOL:
            assert int(fl.argmax()) == int(hl.argmax())
        ids.append(int(hl.argmax()))
