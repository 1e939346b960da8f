"""Matrix products with weights as stored (csrc/matmul.c via factrace._kernels) vs OpenBLAS and torch.

    python benchmarks/matmul.py [--threads 2] [--rounds 5] [--shapes gpt2] [--types F32,Q4_0] [--ns 1,16]
                                [--paths auto] [--quick]

Prints the CPU, the SIMD variant, the OpenBLAS sgemm rate (one call, 512x3072x768, `threads` threads) and
the read bandwidth (numpy sums of a 512 MB array, one part per thread), then per shape (in -> out), row
count N and weight type: time per call (median over interleaved rounds, and the best round), GFLOP/s,
weight GB/s, the ratio to the weight-streaming floor (weight bytes / read bandwidth), and the speed-up over
(a) OpenBLAS sgemm with `threads` threads on float32 weights (the call the forward pass makes today) and
(b) torch F.linear on float32 weights with torch.set_num_threads(threads). K-quants need n_in % 256 == 0
(SmolLM2's 576 and Qwen's 896 widths are skipped for them).

Each candidate cycles through copies of its weights totalling >= 96 MB (3x the L3 of the test machine) so
every call streams its weights from memory, as a forward pass over many layers does."""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import threading
import time

import numpy as np

_here = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, _here)  # common.py (it picks and prints the factrace: installed, or the tree built in place)
from common import print_table  # noqa: E402

SHAPES = {  # name: (n_in, n_out)
    "gpt2 qkv": (768, 2304), "gpt2 attn_out": (768, 768), "gpt2 mlp_up": (768, 3072),
    "gpt2 mlp_down": (3072, 768), "gpt2 lm_head": (768, 50257),
    "smollm2 up": (576, 1536), "smollm2 down": (1536, 576),
    "qwen2.5 up": (896, 4864), "qwen2.5 down": (4864, 896),
}
TYPES = ["F32", "BF16", "F16", "Q8_0", "Q4_0", "Q4_1", "Q4_K", "Q6_K"]
TYPE_ID = {"F32": 0, "F16": 1, "BF16": 30, "Q4_0": 2, "Q4_1": 3, "Q5_0": 6, "Q5_1": 7, "Q8_0": 8, "Q2_K": 10,
           "Q3_K": 11, "Q4_K": 12, "Q5_K": 13, "Q6_K": 14}
BLOCK = {"Q4_0": (32, 18, [0]), "Q4_1": (32, 20, [0, 2]), "Q5_0": (32, 22, [0]), "Q5_1": (32, 24, [0, 2]),
         "Q8_0": (32, 34, [0]), "Q2_K": (256, 84, [80, 82]), "Q3_K": (256, 110, [108]),
         "Q4_K": (256, 144, [0, 2]), "Q5_K": (256, 176, [0, 2]), "Q6_K": (256, 210, [208])}
ROTATE_BYTES = 96 << 20


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or "?"


def weights(rng, name, n_out, n_in):
    """raw bytes (n_out, row_bytes) of random weights of type `name` (valid blocks, finite scales)"""
    if name in ("F32", "F16", "BF16"):
        w = rng.standard_normal((n_out, n_in), dtype=np.float32) * 0.05
        if name == "F32":
            return w.view(np.uint8)
        if name == "F16":
            return w.astype(np.float16).view(np.uint8)
        return (w.view(np.uint32) >> 16).astype(np.uint16).view(np.uint8)
    bs, ts, f16 = BLOCK[name]
    raw = rng.integers(0, 256, size=(n_out * n_in // bs, ts), dtype=np.uint8)
    for off in f16:
        raw[:, off:off + 2] = np.full(raw.shape[0], 0.01, np.float16).view(np.uint8).reshape(-1, 2)
    return raw.reshape(n_out, -1)


def copies(make, nbytes):
    """enough copies of make() to total ROTATE_BYTES (at least one, at most 256)"""
    n = int(min(256, max(1, -(-ROTATE_BYTES // max(1, nbytes)))))
    first = make()
    return [first] + [first.copy() for _ in range(n - 1)]


class Cycle:
    def __init__(self, items):
        self.items, self.i = items, 0

    def next(self):
        self.i = (self.i + 1) % len(self.items)
        return self.items[self.i]


def measure(cands, rounds, batch_s=0.004):
    """cands: {name: (fn, before, after)}; interleaved rounds; median seconds per call of each"""
    reps = {}
    for name, (fn, before, after) in cands.items():
        before()
        fn()
        t = time.perf_counter()
        fn()
        t = time.perf_counter() - t
        after()
        reps[name] = max(1, min(200, int(batch_s / max(t, 1e-7))))
    times = {name: [] for name in cands}
    for _ in range(rounds):
        for name, (fn, before, after) in cands.items():
            before()
            t = time.perf_counter()
            for _ in range(reps[name]):
                fn()
            times[name].append((time.perf_counter() - t) / reps[name])
            after()
    return {name: (statistics.median(v), min(v)) for name, v in times.items()}


def read_bandwidth(threads):
    a = np.ones(1 << 27, np.float32)  # 512 MB
    parts = np.array_split(a, threads)
    best = []
    for _ in range(5):
        ths = [threading.Thread(target=np.sum, args=(p,)) for p in parts]
        t = time.perf_counter()
        for th in ths:
            th.start()
        for th in ths:
            th.join()
        best.append(time.perf_counter() - t)
    return a.nbytes / statistics.median(best) / 1e9


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=5, help="interleaved rounds per case (median reported)")
    ap.add_argument("--shapes", default="", help="comma-separated substrings of shape names (default: all)")
    ap.add_argument("--types", default=",".join(TYPES))
    ap.add_argument("--ns", default="1,16,64,512")
    ap.add_argument("--paths", default="auto", help="regimes to time: auto, few, many (comma-separated)")
    ap.add_argument("--no-ref", action="store_true", help="skip the OpenBLAS and torch references")
    ap.add_argument("--quick", action="store_true", help="3 rounds, N = 1,16,512, GPT-2 shapes only")
    args = ap.parse_args(argv)
    if args.quick:
        args.rounds, args.ns, args.shapes = 3, "1,16,512", args.shapes or "gpt2"

    import factrace  # noqa: F401  (preloads OpenBLAS)
    from factrace import _core, _kernels

    torch = None
    if not args.no_ref:
        try:
            import torch

            torch.set_num_threads(args.threads)
        except ImportError:
            print("torch not installed: no torch reference")
    T = args.threads
    pool = _kernels.Pool(T)

    def blas_threads(n):
        return lambda: _core.set_num_threads(n)

    print(f"CPU: {cpu_model()}, {os.cpu_count()} logical CPUs; kernels ISA: {_kernels.isa()}; "
          f"BLAS: {_kernels.BLAS}; threads: {T}")
    rng = np.random.default_rng(0)
    a = rng.standard_normal((512, 768), dtype=np.float32)
    b = rng.standard_normal((3072, 768), dtype=np.float32)
    _core.set_num_threads(T)
    t = measure({"sgemm": (lambda: _core.sgemm(a, b), lambda: None, lambda: None)}, 5)["sgemm"][0]
    _core.set_num_threads(1)
    sgemm_rate = 2 * 512 * 3072 * 768 / t / 1e9
    bw = read_bandwidth(T)
    print(f"OpenBLAS sgemm 512x3072x768, {T} threads: {sgemm_rate:.1f} GFLOP/s; read bandwidth ({T} threads): "
          f"{bw:.1f} GB/s")
    print()

    noop = lambda: None  # noqa: E731
    shapes = [s for s in SHAPES if not args.shapes or any(p in s for p in args.shapes.split(","))]
    types = [t for t in args.types.split(",") if t]
    ns = [int(n) for n in args.ns.split(",")]
    paths = args.paths.split(",")
    rows = []
    for shape in shapes:
        n_in, n_out = SHAPES[shape]
        flops_per_row = 2 * n_in * n_out
        skipped = [t for t in types if n_in % BLOCK.get(t, (1,))[0]]
        if skipped:
            print(f"{shape}: {', '.join(skipped)} skipped (n_in = {n_in} is not a multiple of the block size)")
        raws = {name: Cycle(copies(lambda: weights(rng, name, n_out, n_in),
                                   n_out * _kernels.row_bytes(TYPE_ID[name], n_in)))
                for name in types if name not in skipped}
        f32 = Cycle(copies(lambda: rng.standard_normal((n_out, n_in), dtype=np.float32), 4 * n_out * n_in))
        tw = Cycle([torch.from_numpy(w) for w in f32.items]) if torch is not None else None
        for N in ns:
            x = rng.standard_normal((N, n_in), dtype=np.float32)
            cands = {}
            for name in [t for t in types if n_in % BLOCK.get(t, (1,))[0] == 0]:
                for path in paths:
                    def fn(name=name, path=path):
                        _kernels.matmul(x, raws[name].next(), TYPE_ID[name], n_out, n_in, threads=pool, path=path)
                    cands[(name, path)] = (fn, noop, noop)
            if not args.no_ref:
                cands["sgemm"] = (lambda: _core.sgemm(x, f32.next()), blas_threads(T), blas_threads(1))
                if torch is not None:
                    tx = torch.from_numpy(x)

                    def tfn():
                        with torch.inference_mode():
                            torch.nn.functional.linear(tx, tw.next())
                    cands["torch"] = (tfn, noop, lambda: time.sleep(0.01))  # let torch's OpenMP threads settle
            med = measure(cands, args.rounds)
            ref_s, ref_t = (med[k][0] if k in med else None for k in ("sgemm", "torch"))
            for key, (s, best) in med.items():
                if key in ("sgemm", "torch"):
                    name, path, wbytes = f"[{key} f32]", "", 4 * n_out * n_in
                else:
                    (name, path), wbytes = key, n_out * _kernels.row_bytes(TYPE_ID[key[0]], n_in)
                    if path == "auto":
                        path = "many" if N >= _kernels.crossover(TYPE_ID[name]) else "few"
                floor = wbytes / (bw * 1e9)
                rows.append([f"{shape} {n_in}->{n_out}", N, name, path, f"{s * 1e3:.3f}", f"{best * 1e3:.3f}",
                             f"{flops_per_row * N / s / 1e9:.1f}", f"{wbytes / s / 1e9:.1f}", f"{s / floor:.2f}",
                             f"{ref_s / s:.2f}" if ref_s else "-", f"{ref_t / s:.2f}" if ref_t else "-"])
            sys.stdout.flush()
    print()
    print("ms: median over rounds (best: fastest round); GFLOP/s, wGB/s (weight bytes / time), x floor (time /"
          " weight-streaming floor) and the speed-ups vs sgemm / torch (their time / this time) use the median")
    print_table(rows, ["shape", "N", "type", "path", "ms", "best", "GFLOP/s", "wGB/s", "x floor", "vs sgemm",
                       "vs torch"])


if __name__ == "__main__":
    main()
