"""Shared helpers for factrace's benchmarks.

- Importing this module picks the factrace the benchmark runs against and prints it: the source tree
  when its C core is built in place (``python setup.py build_ext --inplace``, or an editable install),
  else the installed package (the source tree is then taken off ``sys.path``, so it cannot shadow the
  installed package). :func:`child_env` gives a subprocess the same choice.
- :func:`setup_threads` sets the same thread count for factrace and torch.
- :func:`bench` times a callable: warmup runs, then ``repeat`` timed runs; best and median.
- :func:`sgemm_gflops` measures the linked OpenBLAS sgemm rate through ``factrace._core.sgemm``
  (a @ b.T on OpenBLAS's own threads: the reference rate of the machine).
- :func:`read_bandwidth` measures the memory read bandwidth (NumPy sums of a 512 MB array, one slice per
  thread); :func:`weight_bytes` the bytes of a model's weights as factrace holds them: together the
  weight-streaming floor of a forward pass.
- :func:`forward_flops` counts the FLOPs of a forward pass of any model; :func:`cpu_model` names the CPU.
- :func:`gpt2_small_pair` builds one GPT-2-small-shaped model with random weights, saves it with
  ``save_pretrained`` (safetensors, float32 or bfloat16) and loads it both as a transformers
  ``GPT2LMHeadModel`` (float32) and with ``factrace.load`` from that directory, so both run identical
  weights.
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


def sgemm_gflops(M: int, N: int, K: int, threads: int = 1, repeat: int = 5) -> float:
    """GFLOP/s of the linked OpenBLAS on C (M, N) = A (M, K) @ B (N, K)^T on ``threads`` threads (best of
    ``repeat``)."""
    from factrace import _core

    rng = np.random.default_rng(0)
    a = rng.standard_normal((M, K), dtype=np.float32)
    b = rng.standard_normal((N, K), dtype=np.float32)
    t = bench(lambda: _core.sgemm(a, b, threads), warmup=1, repeat=repeat)["best"]
    return 2.0 * M * N * K / t / 1e9


def read_bandwidth(threads: int, mbytes: int = 512, repeat: int = 5) -> float:
    """Memory read bandwidth in GB/s: ``threads`` Python threads each sum one slice of a float32 array of
    ``mbytes`` MB (NumPy releases the GIL); best of ``repeat``."""
    import threading

    a = np.ones(mbytes * (1 << 20) // 4, np.float32)
    parts = np.array_split(a, threads)

    def once():
        ts = [threading.Thread(target=np.add.reduce, args=(p,)) for p in parts]
        for t in ts:
            t.start()
        for t in ts:
            t.join()

    t = bench(once, warmup=1, repeat=repeat)["best"]
    return a.nbytes / t / 1e9


def weight_bytes(m) -> int:
    """Bytes of a factrace model's weights as it holds them (each array once)."""
    seen, total = set(), 0
    for w in m.weights.values():
        base = getattr(w, "data", w)
        while getattr(base, "base", None) is not None:
            base = base.base
        if id(base) not in seen:
            seen.add(id(base))
            total += base.nbytes
    return total


def cpu_model() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine()


def forward_flops(cfg, lens) -> int:
    """FLOPs (2 per multiply-add) of a forward pass with all logits, for any factrace ModelConfig: per
    token and layer the q/k/v, output and MLP products (gated: three F x d matrices), the unembedding per
    token, and per sequence, layer and head the causal QK^T and AV (query i attends to i + 1 keys, or the
    sliding window)."""
    d, F, V, L, H, KV, dh = (cfg.d_model, cfg.d_mlp, cfg.vocab_size, cfg.n_layers, cfg.n_heads, cfg.n_kv_heads,
                             cfg.d_head)
    N = int(sum(lens))
    per_tok = L * (d * (H + 2 * KV) * dh + H * dh * d + (3 if cfg.gated_mlp else 2) * d * F) + d * V
    attn = 0
    for l in range(L):
        w = cfg.layer_window[l] if cfg.layer_window else 0
        attn += sum(sum(min(i + 1, w) if w else i + 1 for i in range(n)) for n in lens) * H * dh * 2
    return 2 * (N * per_tok + attn)


GPT2_SMALL = dict(n_layer=12, n_embd=768, n_head=12, vocab_size=50257, n_positions=1024)


def gpt2_small_pair(seed: int = 0, tmpdir: str | None = None, dtype: str = "float32", **overrides):
    """(factrace model, transformers GPT2LMHeadModel, directory) with identical random weights.

    The checkpoint is saved (safetensors) in ``dtype`` ("float32" or "bfloat16"); factrace loads that
    directory and keeps the weights as stored; the torch model is loaded from it in float32 (eval mode,
    default sdpa attention), as Hugging Face-exact users run a bf16 checkpoint. Keep the returned directory
    object alive while using the models."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    import factrace

    cfg = GPT2Config(**{**GPT2_SMALL, **overrides})
    torch.manual_seed(seed)
    tm = GPT2LMHeadModel(cfg).eval()
    d = tempfile.TemporaryDirectory(dir=tmpdir, prefix="factrace-bench-")
    tm.to(getattr(torch, dtype)).save_pretrained(d.name, safe_serialization=True)
    if dtype != "float32":
        tm = GPT2LMHeadModel.from_pretrained(d.name, torch_dtype=torch.float32).eval()
    fm = factrace.load(d.name)
    return fm, tm, d


def print_table(rows, header=None) -> None:
    rows = [list(map(str, r)) for r in ([header] if header else []) + list(rows)]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for k, r in enumerate(rows):
        print("  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))))
        if header and k == 0:
            print("  ".join("-" * w for w in widths))
