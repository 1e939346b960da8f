"""Write tests/fixtures/gradients.npz: torch autograd gradients (tests/grad_oracle.py, transformers eager,
float32) of one metric at the last position of prompt p1 of every model fixture, at every site, for the
default test run (tests/test_gradients.py). Needs torch and transformers:

    python tests/make_grad_fixtures.py            # every fixture
"""
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
from grad_oracle import SITES, hf_gradients  # noqa: E402
from make_fixtures import save_npz_deterministic  # noqa: E402
from oracle import load_hf  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
FIX = os.path.join(HERE, "fixtures", "models")
OUT = os.path.join(HERE, "fixtures", "gradients.npz")
KINDS = ("logprob", "prob", "logit_diff", "logit")


def metric_for(i: int, logits_last: np.ndarray) -> tuple:
    """The metric of the i-th fixture: the kinds in turn, on the clean top token (and the 5th for diffs)."""
    order = np.argsort(-logits_last)
    kind = KINDS[i % len(KINDS)]
    return (kind, int(order[0]), int(order[4])) if kind == "logit_diff" else (kind, int(order[0]))


def main():
    names = sorted(n for n in os.listdir(FIX) if os.path.exists(os.path.join(FIX, n, "expected.npz")))
    out = {}
    for i, name in enumerate(names):
        e = np.load(os.path.join(FIX, name, "expected.npz"))
        ids = e["p1_ids"]
        metric = metric_for(i, e["p1_logits"][-1])
        ref = hf_gradients(load_hf(os.path.join(FIX, name)), ids, metric)
        out[f"{name}/metric"] = np.array([str(x) for x in metric])
        out[f"{name}/value"] = np.array(ref["metric"])
        for s in SITES:
            if s in ref:
                out[f"{name}/{s}"] = ref[s].astype(np.float32)
        print(name, metric, flush=True)
    save_npz_deterministic(OUT, out)


if __name__ == "__main__":
    main()
