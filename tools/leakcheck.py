#!/usr/bin/env python
"""Leak check of load / run / free cycles; exits 1 on a leak (``make leakcheck``).

Each cycle loads fixture models (a safetensors directory, the sharded one, and a GGUF file written with
tests/gguf_builders.py: the fuzz seed ``tiny_llama``), runs them with full captures and with
interventions (noise, restore, zero, attention blocking), a causal trace, then drops every reference.
After ``--warmup`` cycles the process RSS (/proc/self/statm) and the Python heap (tracemalloc) must not
grow by more than the bounds; a C-level leak of even one weight array per cycle (~100 KB) fails it.

    python tools/leakcheck.py [--cycles 40] [--warmup 8] [--rss-kib 4096] [--py-kib 512]
    python tools/leakcheck.py --valgrind      # the same cycles (fewer) under valgrind, factrace frames only
"""
from __future__ import annotations

import argparse
import gc
import os
import subprocess
import sys
import tempfile
import tracemalloc
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FIX = ROOT / "tests" / "fixtures" / "models"
for p in (str(ROOT), str(ROOT / "tests"), str(ROOT / "fuzz")):
    if p not in sys.path:
        sys.path.insert(0, p)


def rss_kib() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") // 1024


def make_gguf(dirpath) -> Path:
    from make_corpus import tiny_llama_gguf

    p = Path(dirpath) / "tiny_llama.gguf"
    p.write_bytes(tiny_llama_gguf("F32"))
    return p


def one_cycle(sources) -> None:
    import numpy as np

    import factrace as ft

    for src in sources:
        m = ft.load(src)
        ids = np.array([1, 5, 9, 14, 3, 7], dtype=np.int32)
        clean = m.run(ids, capture=True)
        noise = np.full((3, m.config.d_model), 0.1, np.float32)
        m.run([ids, ids[:4]], capture=["mlp_out", "attn_out"], interventions=[
            ft.add("embed", noise, positions=[0, 1, 2]),
            ft.set_values("mlp_out", clean.mlp_out[:, [3]], layers=list(range(m.config.n_layers)), positions=[3]),
            ft.zero("attn_out", layers=[0]),
            ft.block_attention(layers=[0], queries=[-1], keys=[1, 2]),
        ])
        if m.tokenizer is not None:
            ft.trace(m, "The Eiffel Tower is in", "The Eiffel", kind="mlp", samples=2, window=2, noise=0.1)
        del m, clean


def measure(cycles: int = 40, warmup: int = 8, sources=None, verbose: bool = True) -> dict:
    """Run the cycles; return RSS and tracemalloc growth (KiB) between the end of warmup and the end."""
    with tempfile.TemporaryDirectory() as td:
        if sources is None:
            sources = [FIX / "gpt2", FIX / "llama_sharded", FIX / "qwen3", make_gguf(td)]
        for _ in range(warmup):
            one_cycle(sources)
        gc.collect()
        tracemalloc.start()
        py0, rss0 = tracemalloc.get_traced_memory()[0], rss_kib()
        peak_rss = rss0
        for i in range(cycles):
            one_cycle(sources)
            gc.collect()
            peak_rss = max(peak_rss, rss_kib())
            if verbose and (i + 1) % 10 == 0:
                print(f"cycle {warmup + i + 1}: rss {rss_kib()} KiB, python heap "
                      f"{tracemalloc.get_traced_memory()[0] // 1024} KiB", flush=True)
        py1, rss1 = tracemalloc.get_traced_memory()[0], rss_kib()
        tracemalloc.stop()
    return dict(rss_growth_kib=rss1 - rss0, py_growth_kib=(py1 - py0) // 1024, rss_start_kib=rss0,
                rss_end_kib=rss1, cycles=cycles, warmup=warmup, models=len(sources))


VALGRIND_SCRIPT = """
import sys; sys.path[:0] = {paths!r}
import leakcheck
leakcheck.measure(cycles={cycles}, warmup=1, verbose=False)
"""


def run_valgrind(cycles: int) -> int:
    """valgrind --leak-check=full over a few cycles; fails on a definite/indirect leak whose stack has a
    frame in one of factrace's own extension modules (_core, _gguf, _attrib)."""
    script = VALGRIND_SCRIPT.format(paths=[str(ROOT), str(ROOT / "tools"), str(ROOT / "tests"), str(ROOT / "fuzz")],
                                    cycles=cycles)
    with tempfile.TemporaryDirectory() as td:
        log = Path(td) / "vg.log"
        env = dict(os.environ, PYTHONMALLOC="malloc", OPENBLAS_NUM_THREADS="1")
        cmd = ["valgrind", "--leak-check=full", "--show-leak-kinds=definite,indirect", "--num-callers=30",
               f"--log-file={log}", sys.executable, "-c", script]
        rc = subprocess.call(cmd, env=env)
        text = log.read_text(errors="replace")
    import re

    plain = "\n".join(re.sub(r"^==\d+== ?", "", line) for line in text.splitlines())
    records = [r for r in plain.split("\n\n") if "loss record" in r and ("definitely lost" in r or "indirectly lost" in r)]
    ours = [r for r in records if re.search(r"factrace/_(core|gguf|attrib)\.", r)]
    blocks = records
    summary = [line for line in text.splitlines() if "definitely lost:" in line or "indirectly lost:" in line]
    print("\n".join(summary[-2:]))
    if rc != 0:
        print(f"valgrind exited {rc}")
    if ours:
        print(f"LEAK: {len(ours)} loss record(s) through factrace's extension modules:")
        for r in ours[:5]:
            print(r)
        return 1
    print(f"valgrind: no leak through factrace's extension modules ({len(blocks)} loss records, all elsewhere)")
    return 0 if rc == 0 else 1


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cycles", type=int, default=40)
    ap.add_argument("--warmup", type=int, default=8)
    ap.add_argument("--rss-kib", type=int, default=4096, help="allowed RSS growth after warmup")
    ap.add_argument("--py-kib", type=int, default=512, help="allowed Python heap growth after warmup")
    ap.add_argument("--valgrind", action="store_true", help="also run a few cycles under valgrind")
    a = ap.parse_args(argv)
    r = measure(a.cycles, a.warmup)
    ok = r["rss_growth_kib"] <= a.rss_kib and r["py_growth_kib"] <= a.py_kib
    print(f"leakcheck: {r['models']} models x {r['cycles']} cycles after {r['warmup']} warmup: RSS "
          f"{r['rss_start_kib']} -> {r['rss_end_kib']} KiB (growth {r['rss_growth_kib']} KiB, bound {a.rss_kib}); "
          f"python heap growth {r['py_growth_kib']} KiB (bound {a.py_kib}): {'OK' if ok else 'LEAK'}")
    rc = 0 if ok else 1
    if a.valgrind:
        rc |= run_valgrind(cycles=2)
    return rc


if __name__ == "__main__":
    sys.exit(main())
