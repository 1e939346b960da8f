"""Gradients and attribution patching: speed against the forward pass and torch autograd, and estimates
against the exact engine.

    python benchmarks/gradients.py [--threads N] [--parts speed atp trace] [--models ...] [--facts 20]

Parts:
  speed  one gradients() call (a forward pass keeping the tape + one backward pass; all-layer resid_pre
         gradients) vs one forward pass (logits of the last position), and vs torch autograd on the same
         CPU and threads (transformers eager float32, parameters frozen, resid_pre gradients retained:
         the same work); one 16-token prompt and a ROME batch of 10 x 16 tokens.
  atp    the attribution-patching grid (AtP, and AtP* for q/k) against the exact activation-patching grid
         (every unit patched, batched): time of each, their ratio and the Spearman rank correlation per site
         kind, on a clean / corrupted pair (the subject tokens replaced by other tokens).
  trace  ROME causal tracing at the last subject token over known facts of each packaged model: the
         exact engine (trace_all, positions="last_subject") vs engine="atp" (one backward pass); Spearman
         correlation of the per-layer curves per kind (mean and median over facts) and the time ratio.

Models (``--models``): gpt2-small (GPT-2-small shape, random weights, float32), and the packaged GGUF models
smollm2, gemma3-270m, qwen2.5-coder-0.5b (when installed; torch reads the same GGUF file dequantized, not for
gemma3-270m). The CPU and thread count are printed first.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import bench, cpu_model, gpt2_small_pair, print_table, setup_threads, sgemm_gflops  # noqa: E402

REAL = ("smollm2", "gemma3-270m", "qwen2.5-coder-0.5b")


def load(name, with_torch):
    """(factrace model, torch model or None, keep-alive)"""
    import factrace

    if name == "gpt2-small":
        if with_torch:
            fm, tm, d = gpt2_small_pair()
            return fm, tm, d
        import tempfile

        import torch
        from transformers import GPT2Config, GPT2LMHeadModel

        from common import GPT2_SMALL

        torch.manual_seed(0)
        d = tempfile.TemporaryDirectory(prefix="factrace-bench-")
        GPT2LMHeadModel(GPT2Config(**GPT2_SMALL)).save_pretrained(d.name)
        return factrace.load(d.name), None, d
    fm = factrace.load(name)
    tm = None
    if with_torch and name != "gemma3-270m":
        import torch
        from transformers import AutoModelForCausalLM

        from factrace.io import packaged

        p = packaged.resolve(name)
        tm = AutoModelForCausalLM.from_pretrained(str(p.parent), gguf_file=p.name, dtype=torch.float32,
                                                  attn_implementation="eager").eval()
    return fm, tm, None


def torch_grad_fn(tm, ids_batch, tok):
    """forward + backward of torch autograd: mean answer probability at the last position, gradients of
    every block input (hidden_states[:-1] retained), parameters frozen."""
    import torch

    for p in tm.parameters():
        p.requires_grad_(False)
    x = torch.tensor(np.stack(ids_batch), dtype=torch.long)
    emb = tm.get_input_embeddings()

    def run():
        e = emb(x).detach().requires_grad_(True)
        out = tm(inputs_embeds=e, output_hidden_states=True, use_cache=False)
        hs = out.hidden_states
        for h in hs[:-1]:
            if h.requires_grad:
                h.retain_grad()
        torch.softmax(out.logits[:, -1].float(), -1)[:, tok].mean().backward()
        return [h.grad for h in hs[:-1]]

    return run


def part_speed(names, threads, repeat):
    import factrace

    rows = []
    for name in names:
        fm, tm, keep = load(name, with_torch=True)
        rng = np.random.default_rng(0)
        for label, S in (("1x16", 1), ("10x16", 10)):
            ids = [rng.integers(10, fm.config.vocab_size, 16).astype(np.int32)] * S
            tok = 123
            f = bench(lambda: fm.run(ids, logits="last"), warmup=1, repeat=repeat)["median"]
            g = bench(lambda: factrace.gradients(fm, ids, ("prob", tok), sites=["resid_pre"], reduce="mean"),
                      warmup=1, repeat=repeat)["median"]
            tape = bench(lambda: fm._core.forward(np.full(S, 16, np.int32), ids=np.concatenate(ids), capture={
                k: np.empty(shape, np.float32) for k, shape in _tape_shapes(fm.config, 16 * S).items()}),
                warmup=1, repeat=repeat)["median"]
            tt = None
            if tm is not None:
                import torch

                torch.set_num_threads(threads)
                tt = bench(torch_grad_fn(tm, ids, tok), warmup=1, repeat=repeat)["median"]
            rows.append([name, label, f"{f * 1e3:.1f}", f"{g * 1e3:.1f}", f"{g / f:.2f}",
                         f"{(g - tape) * 1e3:.1f}", f"{(g - tape) / f:.2f}",
                         "-" if tt is None else f"{tt * 1e3:.1f}", "-" if tt is None else f"{tt / g:.2f}"])
        fm = tm = None  # free this model before loading the next
        del keep
    print_table(rows, ["model", "batch", "forward ms", "grad ms", "grad/fwd", "backward ms", "bwd/fwd",
                       "torch ms", "torch/grad"])
    print("grad = factrace.gradients (tape forward + backward); backward = grad - the tape forward alone")


def _tape_shapes(cfg, N):
    L, d, F = cfg.n_layers, cfg.d_model, cfg.d_mlp
    qd, kvd = cfg.n_heads * cfg.d_head, cfg.n_kv_heads * cfg.d_head
    out = {"resid_pre": (L, N, d), "q_cache": (L, N, qd), "k_cache": (L, N, kvd), "v_cache": (L, N, kvd),
           "mlp_pre": (L, N, F * (2 if cfg.gated_mlp else 1)), "resid_final": (N, d)}
    if not cfg.parallel:
        out["resid_mid"] = (L, N, d)
    if cfg.qk_norm:
        out.update(q=(L, N, qd), k=(L, N, kvd))
    if cfg.post_norms:
        out.update(attn_pre_norm=(L, N, d), mlp_pre_norm=(L, N, d))
    return out


PAIRS = [("The Eiffel Tower is located in the city of", "The Eiffel Tower"),
         ("The Space Needle is located in the city of", "The Space Needle")]


def pair_ids(fm, rng):
    """clean ids, corrupted ids (the subject's tokens replaced by random ordinary tokens), span"""
    from factrace.methods._common import subject_span

    if fm.tokenizer is None:
        clean = rng.integers(10, fm.config.vocab_size, 12).astype(np.int32)
        span = (2, 5)
    else:
        prompt, subj = PAIRS[0]
        clean = fm.encode(prompt)
        span = subject_span(fm, prompt, subj)
    corr = clean.copy()
    corr[span[0]:span[1]] = rng.integers(1000, min(20000, fm.config.vocab_size), span[1] - span[0])
    return clean, corr, span


def part_atp(names):
    import factrace
    from factrace.methods.attribution_patching import exact_patching, spearman, topk_overlap

    rows = []
    for name in names:
        fm, _, keep = load(name, with_torch=False)
        clean, corr, _ = pair_ids(fm, np.random.default_rng(1))
        sites = ["resid_pre", "attn_out", "mlp_out", "z", "v", "q", "k"]
        t_all_ex = t_all_est = 0.0
        for method in ("atp", "atp*"):
            t0 = time.perf_counter()
            r = factrace.attribution_patching(fm, clean, corr, metric="logit_diff", sites=sites, method=method)
            t_est = time.perf_counter() - t0
            for s in sites if method == "atp" else ["q", "k"]:
                units = list(np.ndindex(r.estimates[s].shape))
                t1 = time.perf_counter()
                ex = exact_patching(fm, r.extra["ctx"]["base_ids"], r.extra["ctx"]["src_run"], s, units, r.per[s],
                                    r.metric) - r.extra["ctx"]["base_metric"]
                t_ex = time.perf_counter() - t1
                if method == "atp":
                    t_all_ex += t_ex
                est = r.estimates[s].ravel()
                rank = r.ranking(s).ravel() if method == "atp*" else est
                sp = spearman(rank, np.abs(ex) if method == "atp*" else ex)
                rows.append([name, method, s, "x".join(map(str, r.estimates[s].shape)), f"{t_est:.2f}",
                             f"{t_ex:.2f}", f"{t_ex / t_est:.0f}", f"{sp:.3f}",
                             f"{spearman(np.abs(est), np.abs(ex)):.3f}", f"{topk_overlap(rank, ex, 10):.1f}"])
            if method == "atp":
                t_all_est = t_est
        rows.append([name, "atp", "all", "", f"{t_all_est:.2f}", f"{t_all_ex:.2f}", f"{t_all_ex / t_all_est:.0f}",
                     "", "", ""])
        del fm, keep
    print_table(rows, ["model", "method", "site", "grid", "AtP s (all sites)", "exact s", "exact/AtP",
                       "spearman", "spearman |.|", "top-10 overlap"])
    print("AtP s: one attribution_patching call for all sites (AtP*: GradDrop's L+1 backward passes); exact s: "
          "that site's grid; AtP* spearman over GradDrop magnitude vs |exact|")


def part_trace(names, n_facts, data_path):
    import factrace
    from factrace.methods.attribution_patching import spearman
    from factrace.study.datasets import load_dataset

    recs = load_dataset("known_1000", path=data_path)
    rows = []
    for name in names:
        if name == "gpt2-small":
            continue
        fm = factrace.load(name)
        known, _ = factrace.known_facts(fm, recs[:400])
        known = known[:n_facts]
        sps = {k: [] for k in ("hidden", "mlp", "attn")}
        t_ex = t_ap = 0.0
        for rec, ans in known:
            t0 = time.perf_counter()
            ex = factrace.trace_all(fm, rec.prompt, rec.subject, positions="last_subject", target=ans)
            t1 = time.perf_counter()
            ap = factrace.trace_all(fm, rec.prompt, rec.subject, positions="last_subject", target=ans, engine="atp")
            t2 = time.perf_counter()
            t_ex += t1 - t0
            t_ap += t2 - t1
            for k in sps:
                e = ex[k].subject_range[1] - 1
                sps[k].append(spearman(ap[k].scores[e], ex[k].scores[e]))
        for k, v in sps.items():
            v = np.array(v)
            rows.append([name, len(known), k, f"{np.nanmean(v):.3f}", f"{np.nanmedian(v):.3f}",
                         f"{np.mean(v > 0.5):.2f}", f"{t_ex:.1f}", f"{t_ap:.1f}", f"{t_ex / t_ap:.1f}"])
    print_table(rows, ["model", "facts", "kind", "spearman mean", "median", "share > 0.5", "exact s", "atp s",
                       "exact/atp"])
    print("curves: scores at the last subject token over layers (hidden: one layer; mlp/attn: window 10); "
          "times for all three kinds together (trace_all), noise s3, 10 samples")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--parts", nargs="+", default=["speed", "atp", "trace"])
    ap.add_argument("--models", nargs="+", default=["gpt2-small", *REAL])
    ap.add_argument("--facts", type=int, default=20)
    shared = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared", "data")
    ap.add_argument("--data", default=os.environ.get("FACTRACE_SHARED_DATA") or (shared if os.path.isdir(shared) else None),
                    help="folder with known_1000.json (default: ../shared/data beside the checkout, else downloaded)")
    a = ap.parse_args()
    import factrace
    from factrace.io import packaged

    n = setup_threads(a.threads)
    names = [x for x in a.models if x == "gpt2-small" or packaged.is_installed(x)]
    print(f"CPU: {cpu_model()}; threads: {n}; factrace BLAS: {factrace.BLAS}; load average: "
          f"{os.getloadavg()[0]:.1f}; OpenBLAS sgemm 512x3072x768 on {n} threads: "
          f"{sgemm_gflops(512, 3072, 768, n):.1f} GFLOP/s (this run)")
    if "speed" in a.parts:
        part_speed(names, n, a.repeat)
    if "atp" in a.parts:
        part_atp(names)
    if "trace" in a.parts:
        part_trace(names, a.facts, a.data)


if __name__ == "__main__":
    main()
