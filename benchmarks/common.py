"""Shared helpers for factrace's benchmarks.

- Importing this module picks the factrace the benchmark runs against and prints it: the source tree
  when its C core is built in place (``python setup.py build_ext --inplace``, or an editable install),
  else the installed package (the source tree is then taken off ``sys.path``, so it cannot shadow the
  installed package). :func:`child_env` gives a subprocess the same choice.
- :func:`setup_threads` sets the same thread count for factrace (OpenBLAS) and torch.
- :func:`bench` times a callable: warmup runs, then ``repeat`` timed runs; best and median.
- :func:`sgemm_gflops` measures the linked OpenBLAS sgemm rate through ``factrace._core.sgemm``
  (a @ b.T, the same library and call the C core uses).
- :func:`gpt2_small_pair` builds one GPT-2-small-shaped model with random weights, saves it with
  ``save_pretrained`` (safetensors) and loads it both as a transformers ``GPT2LMHeadModel`` and with
  ``factrace.load`` from that directory, so both run identical weights.
- :func:`print_table` prints rows of columns aligned.
"""
from __future__ import annotations

import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def built_in_place(root: Path = ROOT) -> bool:
    """Whether the source tree's factrace has its C core built next to the sources."""
    pkg = root / "factrace"
    return any(pkg.glob("_core*.so")) or any(pkg.glob("_core*.pyd"))


def _same_dir(entry: str, root: Path) -> bool:
    try:
        return Path(entry or ".").resolve() == root
    except OSError:  # pragma: no cover
        return False


def use_factrace(quiet: bool = False):
    """Import factrace from the source tree if it is built in place, else the installed package (the
    source tree is removed from ``sys.path``); print which. Returns the module."""
    if "factrace" not in sys.modules:
        sys.path[:] = [p for p in sys.path if not _same_dir(p, ROOT)]
        if built_in_place():
            sys.path.insert(0, str(ROOT))
    try:
        import factrace
    except ImportError as e:
        raise SystemExit(f"benchmark: cannot import factrace ({e}). Install it (pip install .) or build the "
                         f"source tree in place (python setup.py build_ext --inplace).") from None
    loc = Path(factrace.__file__).resolve().parent
    what = "the source tree, built in place" if loc.parent == ROOT else "the installed package"
    if not quiet:
        print(f"benchmark: factrace {factrace.__version__} from {loc} ({what}); BLAS {factrace.BLAS}", flush=True)
    return factrace


def child_env(env=None) -> dict:
    """Environment for a subprocess that must import the same factrace as this benchmark."""
    env = dict(os.environ if env is None else env)
    import factrace

    loc = Path(factrace.__file__).resolve().parent
    if loc.parent == ROOT:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    else:  # the installed package: keep the source tree off the child's path, also the current directory
        parts = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p and not _same_dir(p, ROOT)]
        env["PYTHONPATH"] = os.pathsep.join(parts)
        env["PYTHONSAFEPATH"] = "1"  # `python -c` run in the checkout would put it first (Python >= 3.11)
    return env


use_factrace()


def default_threads() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover
        return os.cpu_count() or 1


def setup_threads(n: int | None) -> int:
    """Use ``n`` threads (default: all cores) in both factrace's OpenBLAS and torch; returns n."""
    import factrace

    n = n or default_threads()
    factrace.set_num_threads(n)
    try:
        import torch

        torch.set_num_threads(n)
    except ImportError:
        pass
    return n


def bench(fn, warmup: int = 2, repeat: int = 5, min_time: float = 0.0) -> dict:
    """Time ``fn()``: ``warmup`` untimed calls, then ``repeat`` timed ones (more while the total is
    under ``min_time`` seconds). Returns {"best", "median", "n"} in seconds."""
    for _ in range(warmup):
        fn()
    times = []
    t_start = time.perf_counter()
    while len(times) < repeat or time.perf_counter() - t_start < min_time:
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return {"best": min(times), "median": statistics.median(times), "n": len(times)}


def sgemm_gflops(M: int, N: int, K: int, repeat: int = 5) -> float:
    """GFLOP/s of the linked OpenBLAS on C (M, N) = A (M, K) @ B (N, K)^T (best of ``repeat``)."""
    from factrace import _core

    rng = np.random.default_rng(0)
    a = rng.standard_normal((M, K), dtype=np.float32)
    b = rng.standard_normal((N, K), dtype=np.float32)
    t = bench(lambda: _core.sgemm(a, b), warmup=1, repeat=repeat)["best"]
    return 2.0 * M * N * K / t / 1e9


GPT2_SMALL = dict(n_layer=12, n_embd=768, n_head=12, vocab_size=50257, n_positions=1024)


def gpt2_small_pair(seed: int = 0, tmpdir: str | None = None, **overrides):
    """(factrace model, transformers GPT2LMHeadModel, directory) with identical random weights.

    The torch model is in eval mode, float32, default (sdpa) attention; factrace loads the directory that
    ``save_pretrained`` wrote (safetensors). Keep the returned directory object alive while using the
    models (factrace may memory-map the weights)."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    import factrace

    cfg = GPT2Config(**{**GPT2_SMALL, **overrides})
    torch.manual_seed(seed)
    tm = GPT2LMHeadModel(cfg).eval().float()
    d = tempfile.TemporaryDirectory(dir=tmpdir, prefix="factrace-bench-")
    tm.save_pretrained(d.name, safe_serialization=True)
    fm = factrace.load(d.name)
    return fm, tm, d


def gpt2_forward_flops(cfg, lens) -> int:
    """Exact multiply-add FLOPs (2 per MAC) of factrace's GPT-2 forward with all logits.

    Per token and layer: QKV (d -> 3d), out proj (d -> d), MLP (d -> F -> d); lm_head (d -> V) per token;
    attention per sequence of length n, per layer and head: QK^T and AV over the causal triangle
    (query i attends to i + 1 keys), dh MACs each."""
    d, F, V, L, H, dh = cfg.d_model, cfg.d_mlp, cfg.vocab_size, cfg.n_layers, cfg.n_heads, cfg.d_head
    N = int(sum(lens))
    dense = N * L * (d * 3 * d + d * d + 2 * d * F) + N * d * V
    pairs = sum(n * (n + 1) // 2 for n in lens)
    attn = L * H * pairs * dh * 2
    return 2 * (dense + attn)


def print_table(rows, header=None) -> None:
    rows = [list(map(str, r)) for r in ([header] if header else []) + list(rows)]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for k, r in enumerate(rows):
        print("  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))))
        if header and k == 0:
            print("  ".join("-" * w for w in widths))
