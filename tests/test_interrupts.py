"""Ctrl-C (SIGINT) during a long dataset run or trace returns control within a second, keeps the work
done (trace_dataset: interrupted=True and the rows so far) and leaves the model usable.

The C core releases the GIL during a forward pass; Python raises KeyboardInterrupt between C calls, so
the delay is at most one C call (milliseconds on the fixture models; for a large model, one batched
forward pass of the trace).

The child installs Python's SIGINT handler itself (``PROLOGUE``): a process started with SIGINT ignored
(what a non-interactive shell does to a background job, ``pytest ... &``, and what its children inherit)
never sees KeyboardInterrupt otherwise; that, not a hang in factrace, made these tests time out after
60 s in a full run. If the child still does not finish in time, the test dumps its Python stacks
(faulthandler, SIGUSR1) before killing it, so a failure explains itself."""
import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest


ROOT = Path(__file__).resolve().parents[1]
FIX = ROOT / "tests" / "fixtures" / "models"

# Run first in every child: stacks on SIGUSR1, and Ctrl-C raising KeyboardInterrupt as in a terminal or a
# notebook whatever the disposition the child inherited.
PROLOGUE = r"""
import faulthandler, signal, sys
faulthandler.register(signal.SIGUSR1, all_threads=True)
INHERITED = "ignored" if signal.getsignal(signal.SIGINT) is signal.SIG_IGN else "not ignored"
signal.signal(signal.SIGINT, signal.default_int_handler)
"""

CHILD = PROLOGUE + r"""
import json, time
import numpy as np
import factrace
mode, path = sys.argv[1], sys.argv[2]
rec = {"prompt": "The Eiffel Tower is located in the city of", "subject": "The Eiffel Tower", "attribute": " Paris"}
if mode == "pool":   # a model big enough for the C core's thread pool, 2 threads: what a notebook runs
    sys.path.insert(0, path)
    from test_threads import _big_model
    factrace.set_num_threads(2)
    m = _big_model(d=256, L=2, n_ctx=128, V=1024)
    ids = np.random.default_rng(0).integers(0, 1024, 128)
    batch = [ids] * 2   # 256 rows x d 256: the pool runs the loops between the matrix products
    rec = {"prompt": ids, "subject": (2, 5)}
    before = m.run(batch, capture=["mlp_out"])
    t0 = time.monotonic()
    m.run(batch, capture=["mlp_out"])
else:
    m = factrace.load(path)
    ids = m.encode(rec["prompt"])
    before = m.run(ids, capture=True)
    t0 = time.monotonic()   # warm-up (imports pandas) and the time of one fact, printed for the parent
    factrace.trace_dataset(m, [rec] * 2, known_only=False, noise=0.1, samples=3, window=3, progress=False)
print("READY %.4f %s" % ((time.monotonic() - t0) / (1 if mode == "pool" else 2), INHERITED), flush=True)
out = {}
if mode == "pool":
    try:
        while True:
            start = time.monotonic()
            m.run(batch, capture=["mlp_out"])
    except KeyboardInterrupt:
        t = time.monotonic()
        out.update(interrupted=True, last_call=t - start)   # the call running when the signal came, + return
    ids = batch
elif mode == "dataset":
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
after = m.run(ids, capture=["mlp_out"] if mode == "pool" else True)
before, after = (x if isinstance(x, list) else [x] for x in (before, after))
out["same"] = all(np.array_equal(b.logits, a.logits) and np.array_equal(b.mlp_out, a.mlp_out) for b, a in zip(before, after))
r = factrace.trace(m, rec["prompt"], rec["subject"], kind="mlp", samples=2, noise=0.1)
out["trace_ok"] = bool(np.isfinite(r.scores).all())
print("RESULT " + json.dumps(out), flush=True)
"""

# A slow (loaded, sanitizer) machine gets more time; what is checked does not change.
READY_TIMEOUT = 300.0   # s to load the fixture model and trace the two warm-up facts
EXIT_TIMEOUT = 60.0     # s from the signal to the child's exit, at least (see _interrupt)


class _Child:
    """A child process whose stdout and stderr lines are collected by threads (so waiting for a line
    has a deadline), with ``stacks()`` to get its Python stacks before it is killed."""

    def __init__(self, args, **kw):
        self.p = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)
        self.lines, self.err = queue.Queue(), []
        self.threads = [threading.Thread(target=self._pump, args=(self.p.stdout, self.lines.put, True), daemon=True),
                        threading.Thread(target=self._pump, args=(self.p.stderr, self.err.append, False), daemon=True)]
        for t in self.threads:
            t.start()
        self.out = []

    @staticmethod
    def _pump(f, put, end):
        for line in f:
            put(line)
        if end:
            put(None)  # end of file

    def readline(self, timeout):
        try:
            line = self.lines.get(timeout=timeout)
        except queue.Empty:
            return None
        if line is not None:
            self.out.append(line)
        return line or ""

    def wait(self, timeout):
        try:
            self.p.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return False
        for t in self.threads:
            t.join(5)
        while True:
            try:
                line = self.lines.get_nowait()
            except queue.Empty:
                break
            if line is not None:
                self.out.append(line)
        return True

    def stacks(self):
        """SIGUSR1 (faulthandler dumps every thread's stack on stderr), then kill; stderr so far."""
        if self.p.poll() is None:
            self.p.send_signal(signal.SIGUSR1)
            time.sleep(2.0)
            self.p.kill()
        self.p.wait(30)
        for t in self.threads:
            t.join(5)
        return "".join(self.err)

    def kill(self):
        if self.p.poll() is None:
            self.p.kill()
            self.p.wait(30)


def _interrupt(mode, model="gpt2", wait=2.0):
    """Start the child, SIGINT it after `wait` s (longer on a slow build: at least 3 facts' time); return
    its result with ``delay`` (s from the signal to the return) and ``per_fact`` (s per traced fact)."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), OPENBLAS_NUM_THREADS="1")
    c = _Child([sys.executable, "-c", CHILD, mode, str(ROOT / "tests" if mode == "pool" else FIX / model)], env=env)
    try:
        line = c.readline(READY_TIMEOUT)
        if line is None:
            pytest.fail(f"the child printed no READY line within {READY_TIMEOUT:.0f} s; its stacks:\n{c.stacks()}")
        assert line.startswith("READY"), line + c.stacks()
        per_fact, inherited = float(line.split()[1]), line.split(maxsplit=2)[2].strip()
        time.sleep(max(wait, 3 * per_fact))
        sent = time.monotonic()          # CLOCK_MONOTONIC is system-wide on Linux: comparable across processes
        c.p.send_signal(signal.SIGINT)
        # the rest of the child: finish the interrupted call, re-run, one 2-sample trace, exit
        limit = max(EXIT_TIMEOUT, 30 * per_fact)
        if not c.wait(limit):
            pytest.fail(f"{mode}: the child did not exit within {limit:.0f} s of SIGINT (SIGINT was {inherited} "
                        f"when it started); its Python stacks:\n{c.stacks()}")
    finally:
        c.kill()
    err = "".join(c.err)
    assert c.p.returncode == 0, err
    res = json.loads(next(l for l in c.out if l.startswith("RESULT "))[7:])
    res["delay"] = res["returned_at"] - sent
    res["per_fact"] = per_fact
    # within a second; a sanitizer or debug build may need one C call longer (bounded by one fact's time)
    res["limit"] = max(1.0, per_fact)
    print(f"{mode}: returned {res['delay']:.3f} s after SIGINT ({per_fact:.3f} s per fact; SIGINT {inherited} "
          f"at the child's start)")
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


def test_ctrl_c_during_threaded_forward_passes():
    """Interrupted between forward passes that run on the C core's thread pool (2 threads, as in a
    notebook): no pool thread or lock is left behind; the model gives the same results and still traces."""
    r = _interrupt("pool")
    assert r["interrupted"] is True
    # within a second, or else at the end of the forward pass that was running when the signal came (on a
    # loaded machine one pass of 2 threads can take longer than a second); 0.25 s: signal delivery
    assert r["delay"] < max(r["limit"], r["last_call"] + 0.25), r
    assert r["same"] and r["trace_ok"], r


def _ignore_sigint():
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def test_child_started_with_sigint_ignored_still_interrupts():
    """The cause of the old 60 s timeouts: a child started with SIGINT ignored (a background job of a
    non-interactive shell) ignores Ctrl-C. With PROLOGUE it raises KeyboardInterrupt."""
    code = PROLOGUE + ("import time\ntry:\n    print('READY', INHERITED, flush=True)\n    time.sleep(60)\n"
                       "except KeyboardInterrupt:\n    print('INTERRUPTED', flush=True)\n")
    c = _Child([sys.executable, "-c", code], preexec_fn=_ignore_sigint)
    try:
        assert c.readline(60) == "READY ignored\n"
        c.p.send_signal(signal.SIGINT)
        assert c.wait(30), c.stacks()
    finally:
        c.kill()
    assert c.out[-1] == "INTERRUPTED\n" and c.p.returncode == 0, "".join(c.err)
