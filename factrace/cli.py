"""The ``factrace`` command line.

Examples:
  factrace run   --model smollm2 --prompt "The Eiffel Tower is located in the city of"
  factrace run   --model smollm2 --prompt "The Eiffel Tower is located in the city of" --generate 20
  factrace trace --model smollm2 --prompt "The Eiffel Tower is located in the city of" \\
                 --subject "The Eiffel Tower" --out out/
  factrace dla   --model smollm2 --prompt "Fact: The Colosseum is in the country of" --subject "The Colosseum"
  factrace lens  --model smollm2 --prompt "The capital of Japan is"
  factrace report --model smollm2 --model gemma3-270m --dataset known_1000 --n 100 --out report/
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

from ._optional import need


def _load(name):
    import factrace

    t0 = time.perf_counter()
    m = factrace.load(name)
    print(f"loaded {m} in {time.perf_counter() - t0:.1f}s (BLAS: {factrace.BLAS})", file=sys.stderr)
    return m


def _out_dir(path) -> Path | None:
    if path is None:
        return None
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise NotADirectoryError(f"--out {p} exists and is not a directory")
    p.mkdir(parents=True, exist_ok=True)
    return p


def cmd_run(a):
    m = _load(a.model)
    ids = m.encode(a.prompt, add_special_tokens=not a.no_special_tokens)
    r = m.run(ids, capture=True)
    p = r.probs[-1]
    top = np.argsort(-p)[: a.top]
    print(f"prompt tokens ({len(ids)}): {m.token_strings(ids)}")
    print("top next tokens:")
    for t in top:
        print(f"  {m.decode([t])!r:>16}  p={p[t]:.4f}  logit={r.logits[-1, t]:.3f}")
    print("captured states:")
    for n in ("embed", "resid_pre", "attn_out", "mlp_out", "head_out", "attn", "resid_final"):
        a_ = getattr(r, n)
        print(f"  {n:<12} {str(a_.shape):<22} |x|max={np.abs(a_).max():.3f}")
    err = np.abs(r.embed + r.attn_out.sum(0) + r.mlp_out.sum(0) - r.resid_final).max()
    print(f"resid_final - (embed + sum attn_out + sum mlp_out): max |err| = {err:.2e}")
    out = _out_dir(a.out)
    if out:
        np.savez_compressed(out / "run.npz", ids=ids, logits=r.logits, resid_pre=r.resid_pre, attn_out=r.attn_out,
                            mlp_out=r.mlp_out, resid_final=r.resid_final)
        print(f"wrote {out / 'run.npz'}")
    if a.generate:
        sample = bool(a.temperature) or a.top_k is not None or a.top_p is not None
        g = m.generate(ids, max_new_tokens=a.generate, do_sample=sample,
                       temperature=a.temperature or 1.0, top_k=a.top_k, top_p=a.top_p, seed=a.seed)
        how = (f"sampled: temperature {a.temperature or 1.0}, top-k {a.top_k}, top-p {a.top_p}, seed {a.seed}"
               if sample else "greedy")
        print(f"generated {len(g.new_ids)} tokens ({how}; stopped: {g.stopped}):")
        print(f"  ids:  {g.new_ids.tolist()}")
        print(f"  text: {g.text!r}")


def cmd_trace(a):
    import factrace

    out = _out_dir(a.out)
    if out:  # the files need these: say so before the trace, not after it
        need("pandas", "factrace trace --out")
        need("matplotlib", "factrace trace --out")
    m = _load(a.model)
    kinds = a.kind or ["hidden", "mlp", "attn"]
    t0 = time.perf_counter()
    res = factrace.trace_all(m, a.prompt, a.subject, kinds=kinds, window=a.window, samples=a.samples,
                             noise=float(a.noise) if a.noise[0].isdigit() else a.noise, seed=a.seed,
                             add_special_tokens=not a.no_special_tokens)
    dt = time.perf_counter() - t0
    first = next(iter(res.values()))
    b, e = first.subject_range
    print(f"answer {first.answer_str!r}: clean p={first.high_score:.4f}, corrupted p={first.low_score:.4f} "
          f"(noise {first.noise:.4f}, {first.samples} samples); subject tokens {b}..{e - 1}; {dt:.1f}s")
    for kind, r in res.items():
        eff = r.effect
        t, l = np.unravel_index(np.argmax(eff), eff.shape)
        print(f"  {kind:<6} strongest restoration: token {t} {r.tokens[t]!r}, layer {l}: effect {eff[t, l]:+.4f}; "
              f"last subject token peaks at layer {int(np.argmax(eff[e - 1]))}")
    if out:
        pd = need("pandas", "factrace trace --out")

        frames = []
        for kind, r in res.items():
            r.plot().savefig(out / f"trace_{kind}.png", bbox_inches="tight")
            frames.append(r.to_frame())
        pd.concat(frames).to_csv(out / "trace.csv", index=False)
        print(f"wrote {out}/trace_*.png and trace.csv")


def cmd_dla(a):
    import factrace

    m = _load(a.model)
    target = a.target if a.target is None or not a.target.lstrip("-").isdigit() else int(a.target)
    res = factrace.dla(m, a.prompt, target, subject=a.subject)
    print(f"target {res.target!r}: clean logit {res.logit:.4f}, sum of all parts {res.total:.4f}")
    mech = res.mechanisms()
    print("mechanisms: " + ", ".join(f"{k} {mech[k]:+.3f}" for k in ("subject_heads", "relation_heads",
                                                                       "mixed_heads", "mlp_boosting", "other_heads",
                                                                       "direct")))
    top = res.head_frame().sort_values("total", key=abs, ascending=False).head(a.top)
    print(f"top {a.top} heads by |DLA|:")
    print(top.to_string(index=False))
    out = _out_dir(a.out)
    if out:
        res.frame().to_csv(out / "dla.csv", index=False)
        res.plot_heads().savefig(out / "dla_heads.png", bbox_inches="tight")
        res.plot_mechanisms().savefig(out / "dla_mechanisms.png", bbox_inches="tight")
        print(f"wrote {out}/dla.csv, dla_heads.png, dla_mechanisms.png")


def cmd_lens(a):
    import factrace

    m = _load(a.model)
    res = factrace.logit_lens(m, a.prompt, target=a.target)
    print(res.table().to_string())
    out = _out_dir(a.out)
    if out:
        res.frame().to_csv(out / "lens.csv", index=False)
        res.plot().savefig(out / "lens.png", bbox_inches="tight")
        print(f"wrote {out}/lens.csv and lens.png")


def cmd_report(a):
    from .study import report

    report.main_from_args(a)


def build_parser():
    p = argparse.ArgumentParser(prog="factrace", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    sub = p.add_subparsers(dest="cmd", required=True)
    debug = argparse.ArgumentParser(add_help=False)
    debug.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                       help="show the full traceback of an error (also FACTRACE_TRACEBACK=1)")

    def common(sp):
        sp.add_argument("--model", required=True, help="model dir, .gguf file, cached repo id or short name (smollm2, ...)")
        sp.add_argument("--prompt", required=True)
        sp.add_argument("--out", help="directory for figures and tables")
        sp.add_argument("--no-special-tokens", action="store_true", help="tokenize without BOS etc.")

    r = sub.add_parser("run", parents=[debug], help="top next tokens and the captured residual stream of a prompt",
                       epilog='example: factrace run --model smollm2 --prompt "The capital of Japan is"')
    common(r)
    r.add_argument("--top", type=int, default=5)
    r.add_argument("--generate", type=int, default=0, metavar="N", help="then generate N tokens (greedy by default)")
    r.add_argument("--temperature", type=float, default=0.0, help="with --generate: sample at this temperature (0: greedy)")
    r.add_argument("--top-k", type=int, default=None, help="with --generate: sample from the k most likely tokens")
    r.add_argument("--top-p", type=float, default=None, help="with --generate: nucleus sampling (smallest set of mass p)")
    r.add_argument("--seed", type=int, default=None, help="with --generate: seed of the sampler")
    r.set_defaults(fn=cmd_run)

    t = sub.add_parser("trace", parents=[debug], help="causal trace (hidden, mlp, attn) of a fact",
                       epilog='example: factrace trace --model smollm2 --prompt "The Eiffel Tower is located in the '
                              'city of" --subject "The Eiffel Tower" --out out/')
    common(t)
    t.add_argument("--subject", required=True)
    t.add_argument("--kind", action="append", choices=["hidden", "mlp", "attn"], help="repeatable; default all")
    t.add_argument("--window", type=int, default=10)
    t.add_argument("--samples", type=int, default=10)
    t.add_argument("--noise", default="s3", help="a number or s<k> (k x std of subject embeddings)")
    t.add_argument("--seed", type=int, default=1)
    t.set_defaults(fn=cmd_trace)

    d = sub.add_parser("dla", parents=[debug], help="direct logit attribution by component, head and source token",
                       epilog='example: factrace dla --model smollm2 --prompt "Fact: The Colosseum is in the country of" '
                              '--subject "The Colosseum"')
    common(d)
    d.add_argument("--subject")
    d.add_argument("--target", help="target token string or id (default: the model's prediction)")
    d.add_argument("--top", type=int, default=10)
    d.set_defaults(fn=cmd_dla)

    ln = sub.add_parser("lens", parents=[debug], help="logit lens: top tokens per layer and position",
                        epilog='example: factrace lens --model smollm2 --prompt "The capital of Japan is"')
    common(ln)
    ln.add_argument("--target")
    ln.set_defaults(fn=cmd_lens)

    rp = sub.add_parser("report", parents=[debug], help="cross-architecture study report (restoration, severing, knockout, Gini)",
                        epilog="example: factrace report --model smollm2 --model gemma3-270m --dataset known_1000 "
                               "--n 100 --out report/")
    try:
        from .study import report

        report.add_arguments(rp)
    except ImportError:
        pass
    rp.set_defaults(fn=cmd_report)
    return p


def _one_line(e: BaseException) -> str:
    """``factrace: error: <message>`` on one line (a multi-line message, e.g. a pip command on its own
    line, is joined with single spaces)."""
    msg = " ".join(str(e).split()) or type(e).__name__
    return f"factrace: error: {msg}"


# optional packages a missing import of which is shown as one line (a MissingDependencyError raised
# somewhere factrace does not check first, e.g. inside pandas or matplotlib)
_OPTIONAL = ("pandas", "matplotlib", "pyarrow", "sentence_transformers", "rank_bm25", "dask", "distributed", "tqdm")


def main(argv=None):
    """Run the command line. Known errors (factrace's own: bad checkpoint, config, input, failed download,
    model too large, missing optional package, ...) and bad paths or values print ONE line on stderr,
    ``factrace: error: <message>``, and return 2; ``--debug`` (or ``FACTRACE_TRACEBACK=1``) shows the traceback
    instead. Ctrl-C returns 130. Anything else is a bug and keeps its traceback."""
    from .errors import FactraceError

    args = build_parser().parse_args(argv)
    debug = getattr(args, "debug", False) or os.environ.get("FACTRACE_TRACEBACK", "") not in ("", "0")
    try:
        args.fn(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except ImportError as e:
        if debug or not (isinstance(e, FactraceError) or (e.name or "").split(".")[0] in _OPTIONAL):
            raise
        if not isinstance(e, FactraceError):
            from ._optional import missing

            e = missing(e.name, f"factrace {args.cmd}", e)
        print(_one_line(e), file=sys.stderr)
        return 2
    except (FactraceError, FileNotFoundError, NotADirectoryError, ValueError) as e:
        if debug:
            raise
        print(_one_line(e), file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
