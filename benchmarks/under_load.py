"""factrace and torch next to other CPU-bound work: a 16-token forward and a causal trace of a GPT-2-small-shaped
model (random weights), quiet and with one and two busy processes beside them, on all threads and on one.

    python benchmarks/under_load.py [--repeat R] [--busy 0 1 2]

Goals (issue "Weights as stored"): under the same load, factrace on all threads is never slower than on one
thread, and within 3x of its quiet time; torch's figures are printed beside. The trace is ``factrace.trace``
(kind hidden, 12 tokens, 3 noise samples) against ROME's algorithm in torch (tests/rome_reference.py) with
the same noise. The CPU model and the quiet sgemm rate are printed first.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from common import bench, cpu_model, gpt2_small_pair, print_table, sgemm_gflops  # noqa: E402

BUSY = "while True: pass"


def measure(fm, tm, threads, repeat, ids16, tids, span, draw):
    import torch

    import factrace
    import rome_reference

    fm.set_num_threads(threads)
    torch.set_num_threads(threads)
    ids_t = torch.from_numpy(ids16[None].astype(np.int64))

    def fwd_t():
        with torch.inference_mode():
            tm(ids_t, use_cache=False)

    out = {"fwd": bench(lambda: fm.run(ids16), warmup=2, repeat=repeat)["median"],
           "fwd_torch": bench(fwd_t, warmup=2, repeat=repeat)["median"]}
    t0 = time.perf_counter()
    factrace.trace(fm, tids, span, kind="hidden", noise=0.1, samples=3)
    out["trace"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    with torch.inference_mode():
        rome_reference.trace(tm, tids, span, "hidden", 10, draw)
    out["trace_torch"] = time.perf_counter() - t0
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=9)
    ap.add_argument("--busy", type=int, nargs="*", default=[0, 1, 2])
    a = ap.parse_args()
    import factrace

    all_threads = len(os.sched_getaffinity(0))
    fm, tm, tmp = gpt2_small_pair()
    rng = np.random.RandomState(0)
    ids16 = rng.randint(0, 50000, 16).astype(np.int32)
    tids = rng.randint(0, 50000, 12).astype(np.int32)
    span = (2, 5)
    draw = np.random.RandomState(1).randn(3, 3, 768) * 0.1
    print(f"CPU: {cpu_model()}; {all_threads} threads; factrace {factrace.__version__} ({factrace.__file__}); "
          f"quiet OpenBLAS sgemm 512x3072x768 on {all_threads} threads: {sgemm_gflops(512, 3072, 768, all_threads):.0f}"
          f" GFLOP/s")
    res = {}
    for busy in a.busy:
        procs = [subprocess.Popen([sys.executable, "-c", BUSY]) for _ in range(busy)]
        try:
            time.sleep(0.5)
            for th in sorted({1, all_threads}):
                res[busy, th] = measure(fm, tm, th, a.repeat, ids16, tids, span, draw)
        finally:
            for p in procs:
                p.kill()
                p.wait()
    rows = []
    for (busy, th), r in sorted(res.items()):
        q = res.get((0, th))
        one = res.get((busy, 1))
        rows.append([busy, th, f"{r['fwd'] * 1e3:.1f}", f"{r['fwd'] / q['fwd']:.2f}" if q else "",
                     f"{one['fwd'] / r['fwd']:.2f}" if one else "", f"{r['fwd_torch'] * 1e3:.1f}",
                     f"{r['trace']:.2f}", f"{r['trace'] / q['trace']:.2f}" if q else "",
                     f"{one['trace'] / r['trace']:.2f}" if one else "", f"{r['trace_torch']:.2f}"])
    print()
    print_table(rows, ["busy procs", "threads", "fwd16 ms", "x quiet", "1-thread/this", "torch fwd16 ms",
                       "trace s", "x quiet", "1-thread/this", "torch trace s"])
    tmp.cleanup()


if __name__ == "__main__":
    main()
