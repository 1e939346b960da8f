"""Forward-pass speed of factrace vs transformers/PyTorch on a GPT-2-small-shaped model (random weights).

    python benchmarks/forward.py [--threads N] [--repeat R]

Prints, with the same thread count for both:
 (a) one 16-token prompt; (b) a 512-token batch as 1 x 512 and as 8 x 64 — factrace time, torch time
 (eval, inference_mode, float32, sdpa, use_cache=False), torch / factrace;
 (c) factrace's GFLOP/s on the batches as a fraction of the OpenBLAS sgemm rate measured in this run
 (512x3072x768, the MLP's shape, and a 2048^3 square);
 (d) max |logits difference| between factrace and torch on every case.
"""
from __future__ import annotations

import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # common.py (it picks and prints the factrace)
from common import (bench, gpt2_forward_flops, gpt2_small_pair, print_table, setup_threads,  # noqa: E402
                    sgemm_gflops)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=None, help="threads for both (default: all cores)")
    ap.add_argument("--repeat", type=int, default=5, help="timed runs per case (best and median shown)")
    args = ap.parse_args(argv)

    import torch

    import factrace

    threads = setup_threads(args.threads)
    fm, tm, tmpdir = gpt2_small_pair()
    cfg = fm.config
    print(f"factrace {factrace.__version__} BLAS={factrace.BLAS}; torch {torch.__version__}; threads={threads}")
    print(f"model: GPT-2-small shape L={cfg.n_layers} d={cfg.d_model} H={cfg.n_heads} V={cfg.vocab_size} "
          f"(random weights, float32), all-position logits")

    rng = np.random.default_rng(1)
    cases = [("(a) prompt 1x16", [16]), ("(b) batch 1x512", [512]), ("(b) batch 8x64", [64] * 8)]
    inputs = {name: [rng.integers(0, cfg.vocab_size, n).astype(np.int32) for n in lens] for name, lens in cases}
    # all factrace timings first, then all torch timings: interleaving them lets each library's idle
    # worker threads (spinning after their last parallel region) slow the other one down
    ftimes, ttimes, diffs = {}, {}, {}
    for name, lens in cases:
        seqs = inputs[name]
        reps = args.repeat * (4 if sum(lens) <= 64 else 1)
        ftimes[name] = bench(lambda: fm.run(seqs), warmup=2, repeat=reps)
    for name, lens in cases:
        seqs = inputs[name]
        ids_t = torch.from_numpy(np.stack(seqs).astype(np.int64))  # equal lengths: no padding needed

        def run_t():
            with torch.inference_mode():
                return tm(ids_t, use_cache=False).logits

        reps = args.repeat * (4 if sum(lens) <= 64 else 1)
        ttimes[name] = bench(run_t, warmup=2, repeat=reps)
        lt = run_t().numpy()
        diffs[name] = max(float(np.abs(r.logits - lt[i]).max()) for i, r in enumerate(fm.run(seqs)))
    rows, results = [], {}
    for name, lens in cases:
        tf, tt = ftimes[name], ttimes[name]
        results[name] = (lens, tf)
        rows.append([name, f"{tf['best'] * 1e3:.1f} / {tf['median'] * 1e3:.1f}",
                     f"{tt['best'] * 1e3:.1f} / {tt['median'] * 1e3:.1f}",
                     f"{tt['best'] / tf['best']:.2f}x", f"{diffs[name]:.2e}"])
    print()
    print_table(rows, ["case", "factrace ms best/med", "torch ms best/med", "torch/factrace", "(d) max|dlogit|"])

    print()
    g_mlp = sgemm_gflops(512, 3072, 768)
    g_sq = sgemm_gflops(2048, 2048, 2048, repeat=3)
    print(f"OpenBLAS sgemm (a @ b.T) this run: 512x3072x768 {g_mlp:.1f} GFLOP/s; 2048^3 {g_sq:.1f} GFLOP/s")
    rows = []
    for name, (lens, tf) in results.items():
        if sum(lens) < 512:
            continue
        fl = gpt2_forward_flops(cfg, lens)
        g = fl / tf["best"] / 1e9
        rows.append([f"(c) {name[4:]}", f"{fl / 1e9:.1f}", f"{g:.1f}", f"{100 * g / g_mlp:.0f}%", f"{100 * g / g_sq:.0f}%"])
    print_table(rows, ["case", "GFLOP", "GFLOP/s", "% of 512x3072x768", "% of 2048^3"])
    tmpdir.cleanup()


if __name__ == "__main__":
    main()
