"""Write tests/fixtures/models/<name>/sites.npz: the torch-hook oracle's results for every site x operation
case of tests/site_cases.py on prompt p0 of each committed fixture (transformers, eager, float32, loaded
from the committed checkpoint), so that tests/test_sites.py checks the C side without torch.

    q, k, v (L, T, heads, dh), mlp_post (L, T, F)   the unpatched captures (z and attn are in expected.npz)
    case_ids (n,) str "<site>/<op>", cases (n, T, 4) resid_final of each patched run @ site_cases.sketch_matrix(d)

A sketch (four fixed random directions per position) keeps the file small: a wrong patch would have to
change resid_final orthogonally to all four directions at every position to go unnoticed. The live test
(tests/test_sites.py, marked oracle) compares the full logits, resid_final and the patched site.

    python tests/make_site_fixtures.py [name ...]
"""
from __future__ import annotations

import os
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import oracle  # noqa: E402
import site_cases  # noqa: E402
import site_oracle  # noqa: E402
from make_fixtures import save_npz_deterministic  # noqa: E402

OUT = os.path.join(HERE, "fixtures", "models")


def make(name: str) -> None:
    import json

    from factrace.io.config import from_hf_config

    d = os.path.join(OUT, name)
    cfg = from_hf_config(json.load(open(os.path.join(d, "config.json"))))
    hf = oracle.load_hf(d)
    parts = site_oracle.Parts(hf)
    ids = np.load(os.path.join(d, "expected.npz"))["p0_ids"]
    T = len(ids)
    others = site_cases.other_prompts(name, cfg, T)
    arrays = {}
    base = site_oracle.run(hf, ids, capture=["q", "k", "v", "mlp_post"], parts=parts)
    for s in ("q", "k", "v", "mlp_post"):
        arrays[s] = base[s].astype(np.float32)
    R = site_cases.sketch_matrix(cfg.d_model)
    cache, ids_out, sketches = {}, [], []
    for case in site_cases.cases(name, cfg, T):
        res = site_oracle.run(hf, ids, site_cases.oracle_edits(hf, parts, case, ids, others, cache), parts=parts)
        ids_out.append(case["id"])
        sketches.append((res["resid_final"].astype(np.float64) @ R).astype(np.float32))
    arrays["case_ids"] = np.array(ids_out)
    arrays["cases"] = np.stack(sketches)
    path = os.path.join(d, "sites.npz")
    save_npz_deterministic(path, arrays)
    print(f"{name:32s} {len(ids_out):4d} cases  {os.path.getsize(path) / 1024:6.1f} KB")


def main(argv):
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    names = argv or sorted(n for n in os.listdir(OUT) if os.path.exists(os.path.join(OUT, n, "expected.npz")))
    for n in names:
        make(n)


if __name__ == "__main__":
    main(sys.argv[1:])
