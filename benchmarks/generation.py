"""Greedy generation speed: factrace ``Model.generate`` (KV cache in the C core) vs transformers ``generate``.

    python benchmarks/generation.py [--threads N] [--repeat R] [--new N] [--models gpt2 smollm2] [--quick]

Both generate ``--new`` tokens greedily from the same prompt token ids, end to end (the prompt pass
included), on the same thread count (``setup_threads``): factrace ``m.generate(ids, max_new_tokens=N,
stop=[])`` (no stop token: exactly N tokens), transformers ``generate(ids, do_sample=False,
max_new_tokens=N)`` with its KV cache, the end-of-sequence token disabled (inference mode).

Models (``--models``): ``gpt2``: GPT-2-small shape with random weights (``gpt2_small_pair``; a prompt of
random token ids); ``gpt2-bf16`` (not in the default list): the same weights saved in bfloat16, which
factrace keeps as bf16 (half the bytes streamed per token) while torch computes in float32; ``smollm2``: the packaged SmolLM2-135M GGUF (factrace keeps the quantized blocks, torch
is transformers loading the same file dequantized to float32), prompt "The Eiffel Tower is located in the
city of".

Printed: the CPU model, the OpenBLAS sgemm rate measured in this run, the thread count, and per model the
new tokens per second of each (best of the repeats), factrace / torch (goal >= 3x), and whether the
generated token ids are identical (else the first position where they differ). ``--quick``: 8 new tokens,
one timed run.
"""
from __future__ import annotations

import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # common.py (it picks and prints the factrace)
from common import bench, cpu_model, gpt2_small_pair, print_table, setup_threads, sgemm_gflops  # noqa: E402

PROMPT = "The Eiffel Tower is located in the city of"


def gguf_models(name: str):
    """(factrace model, torch model) of a packaged GGUF model; torch: transformers dequantizing the file."""
    import torch
    from transformers import AutoModelForCausalLM

    import factrace
    from factrace.io import packaged

    path = packaged.resolve(name)
    tm = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()
    return factrace.load(name), tm


def torch_generate(tm, ids, n):
    import torch

    x = torch.tensor(np.asarray(ids, np.int64)[None])
    with torch.inference_mode():
        out = tm.generate(x, attention_mask=torch.ones_like(x), do_sample=False, max_new_tokens=n, min_new_tokens=0,
                          eos_token_id=None, pad_token_id=0, use_cache=True)
    return out[0, len(ids):].numpy()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=None, help="threads for both (default: all cores)")
    ap.add_argument("--repeat", type=int, default=3, help="timed runs (best is reported)")
    ap.add_argument("--new", type=int, default=64, help="new tokens per generation")
    ap.add_argument("--tokens", type=int, default=16, help="prompt length of the GPT-2-small case (random ids)")
    ap.add_argument("--models", nargs="*", default=["gpt2", "smollm2"], choices=["gpt2", "gpt2-bf16", "smollm2"])
    ap.add_argument("--quick", action="store_true", help="8 new tokens, one timed run: checks that it works")
    args = ap.parse_args(argv)

    import torch
    import transformers

    import factrace
    from factrace.io import packaged

    threads = setup_threads(args.threads)
    sg = sgemm_gflops(512, 3072, 768, threads)
    print(f"CPU: {cpu_model()}; threads: {threads} (factrace and torch); factrace {factrace.__version__}, "
          f"BLAS {factrace.BLAS}; torch {torch.__version__}, transformers {transformers.__version__}")
    print(f"measured in this run: OpenBLAS sgemm 512x3072x768 on {threads} threads {sg:.1f} GFLOP/s")
    n = 8 if args.quick else args.new
    repeat, warmup = (1, 1) if args.quick else (args.repeat, 1)
    rng = np.random.default_rng(0)
    rows = []
    for name in args.models:
        tmp = None
        if name.startswith("gpt2"):
            fm, tm, tmp = gpt2_small_pair(dtype="bfloat16" if name == "gpt2-bf16" else "float32")
            ids = rng.integers(0, fm.config.vocab_size, args.tokens).astype(np.int32)
        elif not packaged.is_installed(name):
            print(f"{name}: not installed, skipped")
            continue
        else:
            fm, tm = gguf_models(name)
            ids = fm.encode(PROMPT)
        out = {}

        def run_f():
            out["f"] = fm.generate(ids, max_new_tokens=n, stop=[]).new_ids

        def run_t():
            out["t"] = torch_generate(tm, ids, n)

        ft = bench(run_f, warmup=warmup, repeat=repeat)
        tt = bench(run_t, warmup=warmup, repeat=repeat)
        a, b = np.asarray(out["f"]), np.asarray(out["t"])
        if len(a) == len(b) and (a == b).all():
            same = "yes"
        else:
            k = next((i for i in range(min(len(a), len(b))) if a[i] != b[i]), min(len(a), len(b)))
            same = f"no (first differs at new token {k}; lengths {len(a)} / {len(b)})"
        f_tps, t_tps = n / ft["best"], n / tt["best"]
        rows.append([name, f"{len(ids)} + {n}", f"{f_tps:.1f}", f"{t_tps:.1f}", f"{f_tps / t_tps:.2f}x", same])
        if not name.startswith("gpt2") and fm.tokenizer is not None:
            print(f"{name}: factrace text {fm.decode(a)!r}")
        fm = tm = None  # free each model before the next
        if tmp is not None:
            tmp.cleanup()
    print()
    print_table(rows, ["model", "prompt + new", "factrace tok/s", "torch tok/s", "factrace/torch", "same ids"])


if __name__ == "__main__":
    main()
