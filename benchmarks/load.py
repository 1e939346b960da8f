"""Load time, peak memory and forward time: the packaged GGUF models, a bfloat16 checkpoint, and a 7B-shaped
Llama in Q4_K (random weights, written by this script with gguf-py, about 4 GB).

    python benchmarks/load.py [--threads N] [--models ...] [--no-7b] [--tmp DIR]

Each model is loaded in a fresh subprocess: wall time of ``factrace.load``, peak resident memory of the
process after the load (ru_maxrss, the Python interpreter included) against the size of the weights file
(goal: <= 1.2 x file + 256 MB), and the forward time of a 16-token prompt and of 8 x 64 tokens (the 7B
model: a 32-token forward and its tokens/s). ``--weights float32`` measures the float32 loader instead.
The CPU model is printed first.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # common.py (it picks and prints the factrace)
import common  # noqa: E402
from common import cpu_model  # noqa: E402

CHILD = r"""
import json, sys, time
import numpy as np
import factrace
def hwm_mb():  # this process's own peak RSS (VmHWM): ru_maxrss would include the parent's RSS at fork time
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
src, threads, weights, big = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4] == "1"
factrace.set_num_threads(threads)
t0 = time.perf_counter(); m = factrace.load(src, weights=weights); t_load = time.perf_counter() - t0
peak_load = hwm_mb()
rng = np.random.default_rng(0)
def best(fn, n):
    fn(); ts = []
    for _ in range(n):
        t = time.perf_counter(); fn(); ts.append(time.perf_counter() - t)
    return min(ts)
out = dict(load_s=t_load, peak_load_mb=peak_load)
if big:
    ids = rng.integers(0, m.config.vocab_size, 32)
    t = best(lambda: m.run(ids, logits="last"), 2)
    out.update(fwd32_s=t, tok_s=32 / t)
else:
    ids16 = rng.integers(0, m.config.vocab_size, 16)
    batch = [rng.integers(0, m.config.vocab_size, 64) for _ in range(8)]
    out.update(fwd16_ms=1000 * best(lambda: m.run(ids16), 3), fwd512_ms=1000 * best(lambda: m.run(batch), 2))
out["peak_mb"] = hwm_mb()
print(json.dumps(out))
"""


def bf16_checkpoint(tmp: Path) -> Path:
    """A GPT-2-small-shaped checkpoint saved in bfloat16 (random weights), written with transformers."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    d = tmp / "gpt2-bf16"
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(n_layer=12, n_embd=768, n_head=12)).to(torch.bfloat16).save_pretrained(d)
    return d


def llama7b_q4k(path: Path) -> Path:
    """A Llama-2-7B-shaped GGUF (32 layers, d 4096, MLP 11008, vocab 32000) whose linear weights are random
    valid Q4_K blocks (f16 scales set small and finite), norms F32; written one tensor at a time."""
    import gguf
    import numpy as np

    L, d, F, V = 32, 4096, 11008, 32000
    rng = np.random.default_rng(0)
    Q4K = gguf.GGMLQuantizationType.Q4_K
    bs, ts = gguf.GGML_QUANT_SIZES[Q4K]
    scale = np.frombuffer(np.float16(1e-3).tobytes(), np.uint8)

    def q4k(n_out, n_in):
        nb = n_out * n_in // bs
        raw = rng.integers(0, 256, (nb, ts), dtype=np.uint8)
        raw[:, 0:2] = scale  # d
        raw[:, 2:4] = scale  # dmin
        return raw.reshape(n_out, n_in // bs * ts)

    names = [("token_embd.weight", (V, d), Q4K), ("output_norm.weight", (d,), None), ("output.weight", (V, d), Q4K)]
    for i in range(L):
        names += [(f"blk.{i}.attn_norm.weight", (d,), None), (f"blk.{i}.ffn_norm.weight", (d,), None)]
        names += [(f"blk.{i}.attn_{x}.weight", (d, d), Q4K) for x in ("q", "k", "v", "output")]
        names += [(f"blk.{i}.ffn_gate.weight", (F, d), Q4K), (f"blk.{i}.ffn_up.weight", (F, d), Q4K),
                  (f"blk.{i}.ffn_down.weight", (d, F), Q4K)]
    w = gguf.GGUFWriter(str(path), "llama")
    for k, v in dict(block_count=L, embedding_length=d, feed_forward_length=F, context_length=4096).items():
        w.add_uint32(f"llama.{k}", v)
    w.add_uint32("llama.attention.head_count", 32)
    w.add_uint32("llama.attention.head_count_kv", 32)
    w.add_float32("llama.attention.layer_norm_rms_epsilon", 1e-5)
    for name, shape, t in names:
        if t is None:
            w.add_tensor_info(name, shape, np.dtype(np.float32), 4 * shape[0])
        else:
            byte_shape = (shape[0], shape[1] // bs * ts)  # gguf-py takes a quantized tensor's shape in bytes
            w.add_tensor_info(name, byte_shape, np.dtype(np.uint8), byte_shape[0] * byte_shape[1], raw_dtype=t)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    for name, shape, t in names:
        w.write_tensor_data(np.ones(shape, np.float32) if t is None else q4k(*shape))
    w.close()
    return path


def run_child(src, threads, weights, big=False):
    r = subprocess.run([sys.executable, "-c", CHILD, str(src), str(threads), weights, "1" if big else "0"],
                       capture_output=True, text=True, env=common.child_env())
    if r.returncode:
        print(r.stderr[-3000:])
        return None
    return json.loads(r.stdout.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    ap.add_argument("--models", nargs="*", default=["smollm2", "gemma3-270m", "qwen2.5-coder-0.5b", "gpt2-bf16"])
    ap.add_argument("--weights", default="stored", choices=["stored", "float32"])
    ap.add_argument("--no-7b", action="store_true", help="skip the 7B-shaped Q4_K model (a 4 GB file)")
    ap.add_argument("--tmp", default=None, help="folder for the written checkpoints (default: a temp dir)")
    a = ap.parse_args()
    import factrace
    from factrace.io import packaged

    print(f"CPU: {cpu_model()}; threads {a.threads}; factrace {factrace.__version__} ({factrace.__file__}); "
          f"weights={a.weights}")
    rows = []
    with tempfile.TemporaryDirectory(dir=a.tmp, prefix="factrace-load-") as tmp:
        tmp = Path(tmp)
        for name in a.models:
            if name == "gpt2-bf16":
                src = bf16_checkpoint(tmp)
                size = sum(p.stat().st_size for p in src.glob("*.safetensors"))
            elif packaged.is_installed(name):
                src = packaged.resolve(name)  # assemble split files once, outside the measurement
                size = src.stat().st_size
            else:
                print(f"{name}: not installed, skipped")
                continue
            d = run_child(src, a.threads, a.weights)
            if d:
                rows.append((name, size, d))
        if not a.no_7b:
            t0 = time.perf_counter()
            src = llama7b_q4k(tmp / "llama7b-q4k.gguf")
            print(f"wrote {src.name} ({src.stat().st_size / 2**30:.2f} GiB) in {time.perf_counter() - t0:.0f} s")
            d = run_child(src, a.threads, a.weights, big=True)
            if d:
                rows.append(("llama-7b-shape Q4_K", src.stat().st_size, d))
    print(f"\n{'model':<22}{'file MB':>9}{'load s':>8}{'peak MB':>9}{'goal MB':>9}{'ok':>4}  forward")
    for name, size, d in rows:
        goal = 1.2 * size / 2**20 + 256
        fwd = (f"32 tokens {d['fwd32_s']:.2f} s = {d['tok_s']:.1f} tokens/s (peak {d['peak_mb']:.0f} MB, goal 6144)"
               if "tok_s" in d else f"16 tokens {d['fwd16_ms']:.1f} ms, 8x64 {d['fwd512_ms']:.1f} ms")
        print(f"{name:<22}{size / 2**20:>9.0f}{d['load_s']:>8.2f}{d['peak_load_mb']:>9.0f}{goal:>9.0f}"
              f"{'yes' if d['peak_load_mb'] <= goal else 'no':>4}  {fwd}")


if __name__ == "__main__":
    main()
