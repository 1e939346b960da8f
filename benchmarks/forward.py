"""Forward-pass speed of factrace vs transformers/PyTorch on the same CPU, the same thread count, in one run.

    python benchmarks/forward.py [--threads N] [--repeat R] [--models a b c ...] [--cases 16 512 8x64]

Models (``--models``; default all that are available):
  gpt2-f32   GPT-2-small shape, random weights saved in float32 (safetensors);
  gpt2-bf16  the same weights saved in bfloat16: factrace keeps them as bf16, torch computes in float32
             (transformers loading the checkpoint with torch_dtype=float32, as Hugging Face-exact users do);
  smollm2, qwen2.5-coder-0.5b   the packaged GGUF models (Q4_1 / Q4_K_M): factrace keeps the blocks,
             torch is transformers loading the same file (dequantized to float32).
Cases: one 16-token prompt, one 512-token sequence, 8 x 64 tokens; all-position logits.

For each model and case: factrace and torch time (best / median of the repeats), torch / factrace, the
weight-streaming floor (bytes of the weights as factrace holds them / the read bandwidth measured in this
run) and factrace / floor, factrace's GFLOP/s as a share of the OpenBLAS sgemm rate measured in this run
(512x3072x768 on the same threads), and max |logits difference|. The CPU model and both measured rates
are printed first.
"""
from __future__ import annotations

import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # common.py (it picks and prints the factrace)
from common import (bench, cpu_model, forward_flops, gpt2_small_pair, print_table, read_bandwidth,  # noqa: E402
                    setup_threads, sgemm_gflops, weight_bytes)

CASES = {"16": [16], "512": [512], "8x64": [64] * 8}


def gguf_models(name: str):
    """(factrace model, torch model) of a packaged GGUF model; torch: transformers dequantizing the file."""
    import torch
    from transformers import AutoModelForCausalLM

    import factrace
    from factrace.io import packaged

    path = packaged.resolve(name)
    tm = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, torch_dtype=torch.float32).eval()
    return factrace.load(name), tm


def available(names):
    from factrace.io import packaged

    out = []
    for n in names:
        if n.startswith("gpt2") or packaged.is_installed(n):
            out.append(n)
        else:
            print(f"{n}: not installed, skipped")
    return out


def time_model(name, fm, tm, cases, repeat, rng):
    """Rows of the table for one model: factrace timed on every case first, then torch (interleaving lets
    one library's idle threads slow the other down)."""
    import torch

    V = fm.config.vocab_size
    inputs = {c: [rng.integers(0, V, n).astype(np.int32) for n in CASES[c]] for c in cases}
    ft, tt, diff = {}, {}, {}
    for c in cases:
        reps = repeat * (3 if sum(CASES[c]) <= 64 else 1)
        ft[c] = bench(lambda: fm.run(inputs[c]), warmup=2, repeat=reps)
    for c in cases:
        ids = torch.from_numpy(np.stack(inputs[c]).astype(np.int64))

        def run_t():
            with torch.inference_mode():
                return tm(ids, use_cache=False).logits

        reps = repeat * (3 if sum(CASES[c]) <= 64 else 1)
        tt[c] = bench(run_t, warmup=2, repeat=reps)
        lt = run_t().float().numpy()
        diff[c] = max(float(np.abs(r.logits - lt[i]).max()) for i, r in enumerate(fm.run(inputs[c])))
    return ft, tt, diff


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=None, help="threads for both (default: all cores)")
    ap.add_argument("--repeat", type=int, default=5, help="timed runs per case (x3 for the small cases)")
    ap.add_argument("--models", nargs="*", default=["gpt2-f32", "gpt2-bf16", "smollm2", "qwen2.5-coder-0.5b"])
    ap.add_argument("--cases", nargs="*", default=list(CASES), choices=list(CASES))
    args = ap.parse_args(argv)

    import torch

    import factrace

    threads = setup_threads(args.threads)
    sg = sgemm_gflops(512, 3072, 768, threads)
    bw = read_bandwidth(threads)
    print(f"CPU: {cpu_model()}; threads: {threads} (factrace and torch); factrace {factrace.__version__} "
          f"({factrace.__file__}), BLAS {factrace.BLAS}; torch {torch.__version__}")
    print(f"measured in this run: OpenBLAS sgemm 512x3072x768 on {threads} threads {sg:.1f} GFLOP/s; "
          f"read bandwidth {bw:.1f} GB/s")
    rng = np.random.default_rng(1)
    rows = []
    for name in available(args.models):
        tmp = None
        if name.startswith("gpt2"):
            fm, tm, tmp = gpt2_small_pair(dtype={"gpt2-f32": "float32", "gpt2-bf16": "bfloat16"}[name])
        else:
            fm, tm = gguf_models(name)
        wb = weight_bytes(fm)
        ft, tt, diff = time_model(name, fm, tm, args.cases, args.repeat, rng)
        for c in args.cases:
            f, t = ft[c]["best"], tt[c]["best"]
            floor = wb / (bw * 1e9)
            gf = forward_flops(fm.config, CASES[c]) / f / 1e9
            rows.append([name, c, f"{f * 1e3:.1f} / {ft[c]['median'] * 1e3:.1f}",
                         f"{t * 1e3:.1f} / {tt[c]['median'] * 1e3:.1f}", f"{t / f:.2f}x",
                         f"{floor * 1e3:.1f}", f"{f / floor:.2f}", f"{gf:.0f} ({100 * gf / sg:.0f}%)",
                         f"{diff[c]:.1e}"])
        del fm, tm
        if tmp is not None:
            tmp.cleanup()
    print()
    print_table(rows, ["model", "case", "factrace ms best/med", "torch ms best/med", "torch/factrace",
                       "floor ms", "factrace/floor", "GFLOP/s (% sgemm)", "max|dlogit|"])


if __name__ == "__main__":
    main()
