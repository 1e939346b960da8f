"""Ctrl-C (SIGINT) during a long dataset run or trace returns control within a second, keeps the work
done (trace_dataset: interrupted=True and the rows so far) and leaves the model usable.

The C core releases the GIL during a forward pass; Python raises KeyboardInterrupt between C calls, so
the delay is at most one C call (milliseconds on the fixture models; for a large model, one batched
forward pass of the trace)."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path


ROOT = Path(__file__).resolve().parents[1]
FIX = ROOT / "tests" / "fixtures" / "models"

CHILD = r"""
import json, sys, time
import numpy as np
import factrace
mode, path = sys.argv[1], sys.argv[2]
m = factrace.load(path)
ids = m.encode("The Eiffel Tower is located in the city of")
before = m.run(ids, capture=True)
rec = {"prompt": "The Eiffel Tower is located in the city of", "subject": "The Eiffel Tower", "attribute": " Paris"}
t0 = time.monotonic()   # warm-up (imports pandas) and the time of one fact, printed for the parent
factrace.trace_dataset(m, [rec] * 2, known_only=False, noise=0.1, samples=3, window=3, progress=False)
print("READY %.4f" % ((time.monotonic() - t0) / 2), flush=True)
out = {}
if mode == "dataset":
    dt = factrace.trace_dataset(m, [rec] * 100000, known_only=False, noise=0.1, samples=3, window=3,
                                progress=False)
    t = time.monotonic()
    out.update(interrupted=dt.interrupted, rows=len(dt.frame), facts=len(dt.facts))
else:
    try:
        while True:
            factrace.trace_all(m, rec["prompt"], rec["subject"], samples=5, noise=0.1)
    except KeyboardInterrupt:
        t = time.monotonic()
        out.update(interrupted=True)
out["returned_at"] = t
after = m.run(ids, capture=True)
out["same"] = bool(np.array_equal(before.logits, after.logits) and np.array_equal(before.mlp_out, after.mlp_out))
r = factrace.trace(m, rec["prompt"], rec["subject"], kind="mlp", samples=2, noise=0.1)
out["trace_ok"] = bool(np.isfinite(r.scores).all())
print("RESULT " + json.dumps(out), flush=True)
"""


def _interrupt(mode, model="gpt2", wait=2.0):
    """Start the child, SIGINT it after `wait` s (longer on a slow build: at least 3 facts' time); return
    its result with ``delay`` (s from the signal to the return) and ``per_fact`` (s per traced fact)."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), OPENBLAS_NUM_THREADS="1")
    p = subprocess.Popen([sys.executable, "-c", CHILD, mode, str(FIX / model)], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, env=env)
    try:
        line = p.stdout.readline()
        assert line.startswith("READY"), line + p.stderr.read()
        per_fact = float(line.split()[1])
        time.sleep(max(wait, 3 * per_fact))
        sent = time.monotonic()          # CLOCK_MONOTONIC is system-wide on Linux: comparable across processes
        p.send_signal(signal.SIGINT)
        out, err = p.communicate(timeout=60)
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == 0, err
    res = json.loads(next(l for l in out.splitlines() if l.startswith("RESULT "))[7:])
    res["delay"] = res["returned_at"] - sent
    res["per_fact"] = per_fact
    # within a second; a sanitizer or debug build may need one C call longer (bounded by one fact's time)
    res["limit"] = max(1.0, per_fact)
    print(f"{mode}: returned {res['delay']:.3f} s after SIGINT ({per_fact:.3f} s per fact)")
    return res


def test_ctrl_c_during_trace_dataset():
    r = _interrupt("dataset")
    assert r["interrupted"] is True
    assert r["rows"] > 0 and r["facts"] > 0          # the work done is kept
    assert r["delay"] < r["limit"], r
    assert r["same"] and r["trace_ok"], r            # the model still runs, unchanged


def test_ctrl_c_during_traces():
    r = _interrupt("trace")
    assert r["interrupted"] is True
    assert r["delay"] < r["limit"], r
    assert r["same"] and r["trace_ok"], r
