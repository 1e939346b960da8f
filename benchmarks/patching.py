"""Activation-patching grids: factrace vs the PyTorch forward-hook loop a TransformerLens user would write.

    python benchmarks/patching.py [--threads N] [--repeat R] [--models gpt2 smollm2] [--grids resid z] [--quick]

Grids (denoising: the corrupted prompt runs, one clean activation is patched in per cell; metric
logit[answer] - logit[foil] at the last position):
  resid  resid_pre x position: ``factrace.activation_patching(m, clean, corrupted, site="resid_pre")``
         (per=("layer", "position"));
  z      z x head: ``site="z", per=("layer", "head")`` (each head's attention output before the output
         projection, at every position).
The torch side runs the clean prompt once caching the activations (forward hooks), then one full forward
per cell (``use_cache=False``, inference mode) with a hook replacing the activation by the cached clean one:
a forward pre-hook on decoder block l (its input hidden states = resid_pre) at one position, or on the
attention output projection (c_proj / o_proj; its input = the heads' z, concatenated) for one head's
columns. Both use the same thread count (``setup_threads``).

Models (``--models``): ``gpt2``: GPT-2-small shape with random weights (``gpt2_small_pair``; the prompts
are random token ids of equal length, answer / foil the clean and corrupted runs' top tokens); ``smollm2``:
the packaged SmolLM2-135M GGUF (factrace keeps the quantized blocks, torch is transformers loading the same
file dequantized to float32), with "The Eiffel Tower is located in the city of" vs "The Colosseum is
located in the city of" (equal length in its tokenizer; answer " Paris", foil " Rome"). Both sides are fed
the same token ids.

Printed: the CPU model, the OpenBLAS sgemm rate measured in this run, the thread count, and per model x
grid the cells, factrace and torch time (best of the repeats), torch / factrace (goal >= 5x), and the max
|difference| of the two grids of raw metrics and of the normalised scores. ``--quick``: three layers only,
one timed run each (a check that it works, not a timing).
"""
from __future__ import annotations

import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # common.py (it picks and prints the factrace)
from common import bench, cpu_model, gpt2_small_pair, print_table, setup_threads, sgemm_gflops  # noqa: E402

GRIDS = {"resid": dict(site="resid_pre", per=("layer", "position")),
         "z": dict(site="z", per=("layer", "head"))}
SMOL_PAIRS = [("The Eiffel Tower is located in the city of", "The Colosseum is located in the city of", " Paris", " Rome"),
              ("The Eiffel Tower is in the city of", "The Colosseum is in the city of", " Paris", " Rome"),
              ("The capital of France is", "The capital of Italy is", " Paris", " Rome")]


def gguf_models(name: str):
    """(factrace model, torch model) of a packaged GGUF model; torch: transformers dequantizing the file."""
    import torch
    from transformers import AutoModelForCausalLM

    import factrace
    from factrace.io import packaged

    path = packaged.resolve(name)
    tm = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()
    return factrace.load(name), tm


def _blocks(tm):
    """(decoder blocks, attention output projections) of a transformers causal LM (GPT-2 or Llama-like)."""
    if hasattr(tm, "transformer"):  # GPT-2
        blocks = list(tm.transformer.h)
        return blocks, [b.attn.c_proj for b in blocks]
    blocks = list(tm.model.layers)
    return blocks, [b.self_attn.o_proj for b in blocks]


class TorchPatcher:
    """The hook loop: one clean run caching resid_pre (block inputs) and z (output-projection inputs), then a
    full forward of the corrupted prompt per cell with one hook replacing the cell's activation."""

    def __init__(self, tm, n_heads):
        import torch

        self.torch, self.tm, self.H = torch, tm, n_heads
        self.blocks, self.oprojs = _blocks(tm)

    def logits_last(self, ids):
        with self.torch.inference_mode():
            return self.tm(ids, use_cache=False).logits[0, -1].double().numpy()

    def cache(self, ids):
        """{"resid_pre": [L x (T, d)], "z": [L x (T, H*dh)]} of a run (the 'run_with_cache')."""
        store = {"resid_pre": [None] * len(self.blocks), "z": [None] * len(self.blocks)}
        hs = []
        for l, (b, o) in enumerate(zip(self.blocks, self.oprojs)):
            hs.append(b.register_forward_pre_hook(lambda mod, args, l=l: store["resid_pre"].__setitem__(l, args[0][0].clone())))
            hs.append(o.register_forward_pre_hook(lambda mod, args, l=l: store["z"].__setitem__(l, args[0][0].clone())))
        try:
            self.logits_last(ids)
        finally:
            for h in hs:
                h.remove()
        return store

    def grid(self, clean, corrupted, grid, layers, answer, foil):
        """raw metric grid (L, T) or (L, H) (NaN outside ``layers``)."""
        torch = self.torch
        cid = torch.tensor(np.asarray(clean, np.int64)[None])
        kid = torch.tensor(np.asarray(corrupted, np.int64)[None])
        T = cid.shape[1]
        cache = self.cache(cid)
        L = len(self.blocks)
        if grid == "resid":
            shape, mods, key = (L, T), self.blocks, "resid_pre"
        else:
            shape, mods, key = (L, self.H), self.oprojs, "z"
        raw = np.full(shape, np.nan)
        for l in layers:
            src = cache[key][l]
            dh = src.shape[-1] // self.H
            for j in range(shape[1]):
                if grid == "resid":
                    def hook(mod, args, j=j, src=src):
                        x = args[0].clone()
                        x[0, j] = src[j]
                        return (x,) + tuple(args[1:])
                else:
                    def hook(mod, args, j=j, src=src, dh=dh):
                        x = args[0].clone()
                        x[0, :, j * dh:(j + 1) * dh] = src[:, j * dh:(j + 1) * dh]
                        return (x,) + tuple(args[1:])
                h = mods[l].register_forward_pre_hook(hook)
                try:
                    lg = self.logits_last(kid)
                finally:
                    h.remove()
                raw[l, j] = lg[answer] - lg[foil]
        clean_m = self.logits_last(cid)
        cor_m = self.logits_last(kid)
        mc, mk = clean_m[answer] - clean_m[foil], cor_m[answer] - cor_m[foil]
        return raw, mc, mk


def prompts_for(name, fm, rng, T):
    """(clean ids, corrupted ids, answer id, foil id) for a model."""
    if name == "gpt2":
        V = fm.config.vocab_size
        clean = rng.integers(0, V, T).astype(np.int32)
        cor = clean.copy()
        cor[: max(1, T // 3)] = rng.integers(0, V, max(1, T // 3))  # a corrupted "subject" at the start
        a = int(np.argmax(fm.run(clean, logits="last").logits[0]))
        lk = fm.run(cor, logits="last").logits[0].astype(np.float64)
        lk[a] = -np.inf
        return clean, cor, a, int(np.argmax(lk))
    for c, k, ans, foil in SMOL_PAIRS:
        ci, ki = fm.encode(c), fm.encode(k)
        if len(ci) == len(ki):
            return ci, ki, int(fm.encode(ans, add_special_tokens=False)[0]), int(fm.encode(foil, add_special_tokens=False)[0])
    raise SystemExit(f"{name}: no prompt pair of equal token length")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=None, help="threads for both (default: all cores)")
    ap.add_argument("--repeat", type=int, default=3, help="timed runs of each grid (best is reported)")
    ap.add_argument("--models", nargs="*", default=["gpt2", "smollm2"], choices=["gpt2", "smollm2"])
    ap.add_argument("--grids", nargs="*", default=list(GRIDS), choices=list(GRIDS))
    ap.add_argument("--tokens", type=int, default=12, help="prompt length of the GPT-2-small case (random ids)")
    ap.add_argument("--quick", action="store_true", help="three layers, one timed run: checks that it works")
    args = ap.parse_args(argv)

    import torch

    import factrace
    from factrace.io import packaged

    threads = setup_threads(args.threads)
    sg = sgemm_gflops(512, 3072, 768, threads)
    print(f"CPU: {cpu_model()}; threads: {threads} (factrace and torch); factrace {factrace.__version__}, "
          f"BLAS {factrace.BLAS}; torch {torch.__version__}")
    print(f"measured in this run: OpenBLAS sgemm 512x3072x768 on {threads} threads {sg:.1f} GFLOP/s")
    repeat, warmup = (1, 0) if args.quick else (args.repeat, 1)
    rng = np.random.default_rng(0)
    rows = []
    for name in args.models:
        tmp = None
        if name == "gpt2":
            fm, tm, tmp = gpt2_small_pair()
        elif not packaged.is_installed(name):
            print(f"{name}: not installed, skipped")
            continue
        else:
            fm, tm = gguf_models(name)
        c = fm.config
        clean, cor, ans, foil = prompts_for(name, fm, rng, args.tokens)
        L = c.n_layers
        layers = sorted({0, L // 2, L - 1}) if args.quick else list(range(L))
        tp = TorchPatcher(tm, c.n_heads)
        for g in args.grids:
            kw = dict(GRIDS[g], metric="logit_diff", answer=ans, foil=foil, layers=layers)
            out = {}

            def run_f():
                out["f"] = factrace.activation_patching(fm, clean, cor, **kw)

            def run_t():
                out["t"] = tp.grid(clean, cor, g, layers, ans, foil)

            ft = bench(run_f, warmup=warmup, repeat=repeat)
            tt = bench(run_t, warmup=warmup, repeat=repeat)
            r = out["f"]
            raw_t, mc, mk = out["t"]
            sc_t = (raw_t - mk) / (mc - mk)
            ok = np.isfinite(r.raw)
            d_raw = float(np.abs(r.raw[ok] - raw_t[ok]).max())
            d_sc = float(np.abs(r.scores[ok] - sc_t[ok]).max())
            cells = int(ok.sum())
            rows.append([name, f"{GRIDS[g]['site']} x {GRIDS[g]['per'][1]}", f"{cells} (T={len(clean)})",
                         f"{ft['best'] * 1e3:.1f}", f"{tt['best'] * 1e3:.1f}", f"{tt['best'] / ft['best']:.1f}x",
                         f"{d_raw:.1e}", f"{d_sc:.1e}", f"{r.clean_metric - r.corrupted_metric:+.3f}"])
        fm = tm = tp = None  # free each model before the next
        if tmp is not None:
            tmp.cleanup()
    print()
    print_table(rows, ["model", "grid", "cells", "factrace ms", "torch ms", "torch/factrace", "max|d raw|",
                       "max|d score|", "clean-corr"])


if __name__ == "__main__":
    main()
