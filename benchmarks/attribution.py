"""Benchmark: full head x source direct logit attribution on a GPT-2-small-shaped model (random weights).

factrace: ``factrace.dla`` (one C forward pass capturing attn / v_cache / mlp_out / final scale, then the
``_attrib.project`` kernel: every head of every layer split by source position, projected on the target's
unembedding direction through the frozen final LayerNorm).

transformers + torch: the same numbers the usual way: an eager forward with ``output_attentions=True``,
forward hooks caching every layer's value vectors (``c_attn`` output) and the final norm's input, then per
layer the per-source head outputs ``A[h, q, k] * v_{h,k} W_O,h`` materialised (H, T, d) and dotted with
the direction.

Both run identical weights (saved with save_pretrained, loaded by factrace.load from the same directory)
with the same thread count. The script checks that the (L, H, T) arrays agree and prints the timings and
the ratio.

    python benchmarks/attribution.py [--threads N] [--tokens 16 64] [--repeat 5]
"""
from __future__ import annotations

import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # common.py (it picks and prints the factrace)
from common import bench, gpt2_small_pair, print_table, setup_threads  # noqa: E402


def torch_forward_cache(tm, ids):
    """Eager forward with hooks caching every layer's values and the final norm's input at the last position."""
    import torch

    d = tm.config.n_embd
    blocks = tm.transformer.h
    cache = {}
    hooks = [blocks[l].attn.c_attn.register_forward_hook(
        lambda mod, args, out, l=l: cache.__setitem__(l, out[0, :, 2 * d:])) for l in range(len(blocks))]
    hooks.append(tm.transformer.ln_f.register_forward_pre_hook(lambda mod, args: cache.__setitem__("x", args[0][0, -1])))
    try:
        with torch.no_grad():
            out = tm(input_ids=torch.as_tensor(ids, dtype=torch.long)[None], output_attentions=True, use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    cache["attn"] = out.attentions
    cache["logits"] = out.logits[0, -1]
    return cache


def torch_decompose(tm, cache, target=None):
    """(L, H, T) head x source DLA at the last position from the cache, with the logit and the target."""
    import torch

    cfg = tm.config
    L, H, d = cfg.n_layer, cfg.n_head, cfg.n_embd
    dh = d // H
    with torch.no_grad():
        logits = cache["logits"]
        t = int(logits.argmax()) if target is None else target
        x = cache["x"]
        ln = tm.transformer.ln_f
        rs = torch.rsqrt(((x - x.mean()) ** 2).mean() + ln.eps)
        u = rs * ln.weight * tm.lm_head.weight[t]
        u = u - u.mean()
        T = cache[0].shape[0]
        res = torch.empty(L, H, T)
        for l in range(L):
            v = cache[l].reshape(T, H, dh).transpose(0, 1)                          # (H, T, dh)
            W = tm.transformer.h[l].attn.c_proj.weight.view(H, dh, d)               # Conv1D: (in, out)
            a = cache["attn"][l][0, :, -1]                                          # (H, T)
            per_src = a[:, :, None] * torch.bmm(v, W)                               # (H, T, d)
            res[l] = per_src @ u
    return res.numpy(), float(logits[t]), t


def torch_head_source_dla(tm, ids, target=None):
    """Forward + decomposition with transformers + torch."""
    return torch_decompose(tm, torch_forward_cache(tm, ids), target)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--tokens", type=int, nargs="+", default=[16, 64])
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args(argv)

    import torch

    import factrace
    import factrace.methods.dla as A

    n = setup_threads(args.threads)
    fm, tm, tmpdir = gpt2_small_pair(seed=0)
    tm.set_attn_implementation("eager")  # attention probabilities need eager attention
    print(f"factrace {factrace.__version__} BLAS={factrace.BLAS}; torch {torch.__version__}; threads={n}")
    print("model: GPT-2 small shape (L=12, H=12, d=768, V=50257), random weights; target = clean top-1")
    rng = np.random.default_rng(0)
    rows = []
    for T in args.tokens:
        ids = rng.integers(0, fm.config.vocab_size, T).astype(np.int32)
        res = factrace.dla(fm, ids)
        ref, logit, t = torch_head_source_dla(tm, ids)
        assert t == res.target_ids[0][0], "the two models disagree on the top-1 token"
        err = float(np.abs(res.head_source - ref).max())
        sum_err = abs(res.total - res.logit)
        assert err < 1e-3, f"head x source DLA disagrees: max abs diff {err}"
        tf = bench(lambda: factrace.dla(fm, ids), warmup=1, repeat=args.repeat)["best"]
        tt = bench(lambda: torch_head_source_dla(tm, ids), warmup=1, repeat=args.repeat)["best"]
        # the decomposition alone, from captured states
        r = fm.run(ids, capture=A._DLA_CAPTURE)
        u = res.extra["direction"]
        tk = bench(lambda: A.head_source_project(fm, r, u[None], [-1]), warmup=1, repeat=args.repeat)["best"]
        cache = torch_forward_cache(tm, ids)
        tdk = bench(lambda: torch_decompose(tm, cache, t), warmup=1, repeat=args.repeat)["best"]
        ts = bench(lambda: A.head_source_split(fm, r), warmup=1, repeat=args.repeat)["best"]
        rows.append([T, f"{tf * 1e3:.1f}", f"{tt * 1e3:.1f}", f"{tt / tf:.2f}x", f"{tk * 1e3:.2f}", f"{tdk * 1e3:.2f}",
                     f"{tdk / tk:.1f}x", f"{ts * 1e3:.1f}", f"{err:.1e}", f"{sum_err:.1e}"])
    print()
    print_table(rows, header=["T", "factrace dla ms", "torch+hooks ms", "ratio", "C project ms", "torch decomp ms",
                              "ratio", "C split (L,H,T,d) ms", "max|diff|", "|sum-logit|"])
    print(f"\nbest of {args.repeat}. dla / torch+hooks: full head x source DLA including the forward pass; "
          "C project / torch decomp: the decomposition alone from captured states (ratio = torch / factrace); "
          "C split: every per-source vector (L, H, T, d) materialised. max|diff|: factrace vs torch (L, H, T) "
          "arrays; |sum-logit|: all DLA parts vs the clean logit.")
    tmpdir.cleanup()


if __name__ == "__main__":
    main()
