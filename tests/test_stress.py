"""Concurrency stress: traces (trace / trace_all / sever / knockout) and attributions (dla, logit_lens,
attention_knockout when the attribution kernels are there) run from several Python threads, on one model
and on several models at once, give exactly the single-threaded results."""
import dataclasses
import random
import threading

import numpy as np

import factrace

from conftest import fixture_model, join_or_dump

MODELS = ["gpt2", "llama_gqa2_tied", "gemma3"]
PROMPT, SUBJECT = "The Eiffel Tower is located in the city of", "The Eiffel Tower"
THREADS, ROUNDS = 3, 1


def _jobs(name):
    m = fixture_model(name)
    kw = dict(samples=3, noise=0.1, seed=3)
    jobs = [
        ("trace_mlp", lambda: factrace.trace(m, PROMPT, SUBJECT, kind="mlp", window=3, **kw)),
        ("trace_all", lambda: factrace.trace_all(m, PROMPT, SUBJECT, window=2, **kw)),
        ("sever", lambda: factrace.sever(m, PROMPT, SUBJECT, frozen="mlp", **kw)),
        ("knockout", lambda: factrace.knockout(m, PROMPT, SUBJECT, kind="attn", window=1, topk=20)),
    ]
    try:
        import factrace as at
    except ImportError:
        at = None
    if at is not None:
        if hasattr(at, "dla"):
            jobs.append(("dla", lambda: at.dla(m, PROMPT, subject=SUBJECT)))
        if hasattr(at, "logit_lens"):
            jobs.append(("logit_lens", lambda: at.logit_lens(m, PROMPT)))
        if hasattr(at, "attention_knockout"):
            jobs.append(("attn_knockout", lambda: at.attention_knockout(m, PROMPT, subject=SUBJECT, window=1)))
    return [(f"{name}/{label}", fn) for label, fn in jobs]


def _equal(a, b, where=""):
    """Exact equality of results (NaN equals NaN); dataclasses, dicts, sequences, arrays, frames."""
    if dataclasses.is_dataclass(a) and not isinstance(a, type):
        assert type(a) is type(b), where
        for f in dataclasses.fields(a):
            _equal(getattr(a, f.name), getattr(b, f.name), f"{where}.{f.name}")
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            _equal(a[k], b[k], f"{where}[{k!r}]")
    elif isinstance(a, np.ndarray):
        assert isinstance(b, np.ndarray) and a.dtype == b.dtype and a.shape == b.shape, where
        assert np.array_equal(a, b, equal_nan=a.dtype.kind in "fc"), where
    elif hasattr(a, "equals") and hasattr(a, "columns"):       # pandas DataFrame
        assert a.equals(b), where
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _equal(x, y, f"{where}[{i}]")
    elif isinstance(a, float) and np.isnan(a):
        assert isinstance(b, float) and np.isnan(b), where
    else:
        assert a == b, where


def _stress(jobs):
    reference = {label: fn() for label, fn in jobs}          # single-threaded
    errors, results = [], []
    lock = threading.Lock()

    def worker(seed):
        order = jobs * ROUNDS
        random.Random(seed).shuffle(order)
        try:
            for label, fn in order:
                r = fn()
                with lock:
                    results.append((label, r))
        except BaseException as e:  # noqa: BLE001  (reported below)
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(s,)) for s in range(THREADS)]
    for t in threads:
        t.start()
    join_or_dump(threads, 1200, "a stress worker")
    if errors:
        raise errors[0]
    assert len(results) == THREADS * ROUNDS * len(jobs)
    for label, r in results:
        _equal(reference[label], r, label)


def test_threads_one_model():
    _stress(_jobs("gpt2"))


def test_threads_several_models():
    jobs = [j for name in MODELS for j in _jobs(name)]
    _stress(jobs)
