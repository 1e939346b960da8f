"""Regenerate tests/fixtures/models/<name>/ for every spec in tests/oracle.py.

Needs torch, transformers, safetensors and tokenizers; the default test run does not (it only reads the
committed files).  Usage:

    python tests/make_fixtures.py [name ...]

Each fixture directory holds the checkpoint written by oracle.build (config.json, *.safetensors,
tokenizer.json, ...) and expected.npz with Hugging Face's outputs (oracle.hf_run, eager, float32) for two
fixed prompts p0 (7 ids) and p1 (13 ids; longer than the sliding window 4 of mistral/gemma3):

    p{k}_ids (T,) int64, p{k}_logits (T,V), p{k}_embed (T,d), p{k}_resid_pre (L,T,d), p{k}_attn_out (L,T,d),
    p{k}_mlp_out (L,T,d), p{k}_resid_final (T,d), p{k}_attn (L,H,T,T), p{k}_attn_z (L,T,H*dh)

Running it twice gives byte-identical files (the npz is written with fixed zip timestamps).
"""

from __future__ import annotations

import io
import os
import sys
import zipfile
import zlib

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import oracle  # noqa: E402

OUT = os.path.join(HERE, "fixtures", "models")
PROMPT_LENS = (7, 13)


def prompts(name: str) -> list[np.ndarray]:
    spec = oracle.SPECS[name]
    lo = len(spec["special"])  # draw ordinary tokens only
    rng = np.random.default_rng(zlib.crc32(name.encode()))
    return [rng.integers(lo, spec["config"]["vocab_size"], size=n).astype(np.int64) for n in PROMPT_LENS]


def save_npz_deterministic(path: str, arrays: dict) -> None:
    """Like np.savez_compressed, but with fixed zip metadata so the bytes are reproducible."""
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for key in sorted(arrays):
            buf = io.BytesIO()
            np.lib.format.write_array(buf, np.ascontiguousarray(arrays[key]), allow_pickle=False)
            info = zipfile.ZipInfo(key + ".npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = 0o644 << 16
            zf.writestr(info, buf.getvalue(), compresslevel=9)


def make(name: str) -> None:
    d = os.path.join(OUT, name)
    oracle.build(name, d)
    ps = prompts(name)
    res = oracle.hf_run(d, ps)
    arrays = {}
    for k, (ids, r) in enumerate(zip(ps, res)):
        arrays[f"p{k}_ids"] = ids
        for key, v in r.items():
            arrays[f"p{k}_{key}"] = v.astype(np.float32)
    save_npz_deterministic(os.path.join(d, "expected.npz"), arrays)
    size = sum(os.path.getsize(os.path.join(d, f)) for f in os.listdir(d))
    mx = max(float(np.abs(r["logits"]).max()) for r in res)
    print(f"{name:32s} max|logit| {mx:6.2f}   {size / 1024:7.1f} KB")


def main(argv: list[str]) -> None:
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()
    except Exception:
        pass
    names = argv or list(oracle.SPECS)
    for n in names:
        if n not in oracle.SPECS:
            raise SystemExit(f"unknown fixture {n!r}; known: {', '.join(oracle.SPECS)}")
        make(n)
    total = 0
    for root, _, files in os.walk(OUT):
        total += sum(os.path.getsize(os.path.join(root, f)) for f in files)
    print(f"total tests/fixtures/models: {total / 1024:.1f} KB")


if __name__ == "__main__":
    main(sys.argv[1:])
