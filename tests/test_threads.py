"""Thread safety of the C core: concurrent forward passes from Python threads give bit-identical results
to single-threaded ones, and a forward pass releases the GIL."""
import threading
import time

import numpy as np
import pytest

import factrace
from factrace.io.config import from_hf_config
from factrace.model import Model

from conftest import expected, fixture_model, join_or_dump

ROUNDS = 12


def _work(m, name):
    """A fixed list of (label, callable) runs on model m: plain, capture, batch, interventions."""
    e = expected(name)
    p0, p1 = e["p0_ids"], e["p1_ids"]
    d, L = m.config.d_model, m.config.n_layers
    rng = np.random.default_rng(len(name))
    noise = (rng.standard_normal((3, d)) * 0.5).astype(np.float32)
    clean = m.run(p1, capture=["mlp_out", "resid_pre", "attn_out"])
    ivs = [factrace.add("embed", noise, positions=[0, 1, 2]),
           factrace.set_values("mlp_out", clean.mlp_out[: L, [2]], layers=list(range(L)), positions=[2]),
           factrace.zero("attn_out", layers=[L - 1]),
           factrace.block_attention(layers=[0], queries=[-1], keys=[1, 2])]
    return [
        ("plain", lambda: m.run(p0)),
        ("capture", lambda: m.run(p1, capture=True)),
        ("batch", lambda: m.run([p0, p1, p1[:4]], capture=["attn", "head_out", "z"])),
        ("interventions", lambda: m.run(p1, capture=True, interventions=ivs)),
        ("batch_iv", lambda: m.run([p1, p0], capture=["resid_pre", "mlp_out"], logits="last",
                                   interventions=[factrace.zero("mlp_out", layers=[0], seq=1)] + ivs[:1])),
    ]


def _flat(res):
    """Every array of a RunResult (or list of them) as a list of (key, array)."""
    if isinstance(res, list):
        return [(f"{i}.{k}", a) for i, r in enumerate(res) for k, a in _flat(r)]
    out = []
    for k, v in vars(res).items():
        if isinstance(v, np.ndarray):
            out.append((k, v))
    return out


def _same(a, b, where):
    fa, fb = _flat(a), _flat(b)
    assert [k for k, _ in fa] == [k for k, _ in fb], where
    for (k, x), (_, y) in zip(fa, fb):
        assert x.shape == y.shape and x.dtype == y.dtype, f"{where}: {k}"
        # bit for bit, NaN-safe
        bx = np.ascontiguousarray(x).view(np.uint8)
        by = np.ascontiguousarray(y).view(np.uint8)
        assert np.array_equal(bx, by), f"{where}: {k} differs (max abs {np.abs(x - y).max()})"


def _reference(m, name):
    return {label: fn() for label, fn in _work(m, name)}


def _hammer(jobs, rounds=ROUNDS):
    """Run jobs [(m, name, refs)] in one thread each, `rounds` times over the whole work list."""
    errors = []
    barrier = threading.Barrier(len(jobs))

    def worker(m, name, refs, seed):
        try:
            work = _work(m, name)
            rng = np.random.default_rng(seed)
            barrier.wait()
            for r in range(rounds):
                for i in rng.permutation(len(work)):
                    label, fn = work[i]
                    _same(fn(), refs[label], f"{name} {label} round {r}")
        except BaseException as ex:  # noqa: BLE001 - reported by the main thread
            errors.append(ex)

    threads = [threading.Thread(target=worker, args=(m, n, refs, i)) for i, (m, n, refs) in enumerate(jobs)]
    for t in threads:
        t.start()
    join_or_dump(threads, 600, "a forward-pass thread")
    if errors:
        raise errors[0]


def test_two_threads_two_models():
    a, b = "gpt2", "gemma3"
    ma, mb = fixture_model(a), fixture_model(b)
    _hammer([(ma, a, _reference(ma, a)), (mb, b, _reference(mb, b))])


def test_two_threads_one_model():
    name = "llama_gqa4_llama3rope_bf16"
    m = fixture_model(name)
    refs = _reference(m, name)
    _hammer([(m, name, refs), (m, name, refs)])


def test_four_threads_mixed():
    names = ["qwen3", "mistral", "qwen3", "llama_sharded"]
    models = {n: fixture_model(n) for n in set(names)}
    refs = {n: _reference(models[n], n) for n in models}
    _hammer([(models[n], n, refs[n]) for n in names], rounds=6)


# ----------------------------------------------------------------------------------------------------------
# GIL release


def _big_model(d=256, L=4, n_ctx=256, V=2048, seed=0):
    cfg = from_hf_config({"architectures": ["GPT2LMHeadModel"], "n_embd": d, "n_layer": L, "n_head": 8,
                          "vocab_size": V, "n_positions": n_ctx}, where="test")
    rng = np.random.default_rng(seed)

    def r(*shape, s=0.05):
        return (rng.standard_normal(shape) * s).astype(np.float32)

    W = {"W_E": r(V, d, s=0.3), "W_pos": r(n_ctx, d, s=0.1), "ln_f_w": 1 + r(d), "ln_f_b": r(d)}
    W["W_U"] = W["W_E"]
    F = cfg.d_mlp
    for i in range(L):
        b = f"blocks.{i}."
        W.update({b + "ln1_w": 1 + r(d), b + "ln1_b": r(d), b + "ln2_w": 1 + r(d), b + "ln2_b": r(d),
                  b + "W_Q": r(d, d), b + "W_K": r(d, d), b + "W_V": r(d, d), b + "W_O": r(d, d),
                  b + "b_Q": r(d), b + "b_K": r(d), b + "b_V": r(d), b + "b_O": r(d),
                  b + "W_up": r(F, d), b + "b_up": r(F), b + "W_down": r(d, F), b + "b_down": r(d)})
    return Model(cfg, W, name="big")


@pytest.fixture(scope="module")
def big():
    # d=256, L=2, T=128: ~100 ms per forward on an idle 2-core machine
    return _big_model(d=256, L=2, n_ctx=128, V=1024)


def test_big_model_threads_bitwise(big):
    ids = np.random.default_rng(1).integers(0, big.config.vocab_size, big.config.n_ctx)
    ref = big.run(ids, capture=["resid_final", "attn_out"])
    errors = []

    def worker():
        try:
            for _ in range(3):
                _same(big.run(ids, capture=["resid_final", "attn_out"]), ref, "big model")
        except BaseException as ex:  # noqa: BLE001
            errors.append(ex)

    ts = [threading.Thread(target=worker) for _ in range(2)]
    for t in ts:
        t.start()
    join_or_dump(ts, 600, "a big-model thread")
    if errors:
        raise errors[0]


def _counter_ratio(fn, n_calls):
    """Progress rate of a pure-Python counter thread while the main thread calls fn, relative to its
    rate while the main thread sleeps."""
    count = [0]
    stop = threading.Event()

    def counter():
        while not stop.is_set():
            count[0] += 1

    th = threading.Thread(target=counter)
    th.start()
    try:
        time.sleep(0.02)
        c0, t0 = count[0], time.perf_counter()
        time.sleep(0.2)
        rate_idle = (count[0] - c0) / (time.perf_counter() - t0)
        progress, busy = 0, 0.0
        for _ in range(n_calls):
            c0, t0 = count[0], time.perf_counter()
            fn()
            busy += time.perf_counter() - t0
            progress += count[0] - c0
    finally:
        stop.set()
        th.join()
    return (progress / busy) / rate_idle


def test_forward_releases_gil(big):
    ids = np.random.default_rng(2).integers(0, big.config.vocab_size, big.config.n_ctx)
    threads = factrace.get_num_threads()
    factrace.set_num_threads(1)  # leave a core to the counter thread
    try:
        big.run(ids, capture=True)  # warm up
        t0 = time.perf_counter()
        big.run(ids, capture=True)
        one = time.perf_counter() - t0
        k = max(1, min(32, int(0.4 / max(one, 1e-3))))  # one C call of ~400 ms: a batch of k copies
        batch = [ids] * k
        t0 = time.perf_counter()
        big.run(batch, capture=True)
        one = time.perf_counter() - t0
        n_calls = 2
        ratio = _counter_ratio(lambda: big.run(batch, capture=True), n_calls)
    finally:
        factrace.set_num_threads(threads)
    # Negative control: a C call that holds the GIL for about as long (builtin sum over a range never
    # returns to the eval loop) lets the counter run only around the calls (a switch interval or two).
    n = 1 << 20
    t0 = time.perf_counter()
    sum(range(n))
    per = time.perf_counter() - t0
    n = int(n * max(1.0, one / max(per, 1e-6)))
    control = _counter_ratio(lambda: sum(range(n)), n_calls)
    assert ratio > 0.2, (ratio, control, one)
    assert control < ratio / 2, (ratio, control, one)
