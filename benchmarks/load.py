"""Load time, peak memory and forward time of the real models that installed packages ship (issue 3).

Each model is measured in a fresh subprocess: wall time of ``factrace.load``, peak resident memory
(ru_maxrss) against the size of its float32 weights (the goal: peak near 1x the float32 weights, not a
multiple), and the forward time of one 16-token prompt and of a 512-token batch (8 x 64).

    python benchmarks/load.py [--threads N] [--models smollm2 gemma3-270m qwen2.5-coder-0.5b]
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import common  # noqa: E402,F401  (it picks and prints the factrace)

CHILD = r"""
import json, resource, sys, time
import numpy as np
import factrace
factrace.set_num_threads(int(sys.argv[2]))
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t0 = time.perf_counter(); m = factrace.load(sys.argv[1]); t_load = time.perf_counter() - t0
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
seen, f32 = set(), 0
for a in m.weights.values():
    if id(a) not in seen:
        seen.add(id(a)); f32 += a.nbytes
rng = np.random.default_rng(0)
ids16 = rng.integers(0, m.config.vocab_size, 16)
batch = [rng.integers(0, m.config.vocab_size, 64) for _ in range(8)]
def best(fn, n=3):
    fn(); ts = []
    for _ in range(n):
        t = time.perf_counter(); fn(); ts.append(time.perf_counter() - t)
    return min(ts)
out = dict(model=sys.argv[1], load_s=t_load, peak_mb=(peak - base) / 1024, f32_mb=f32 / 2**20,
           fwd16_ms=1000 * best(lambda: m.run(ids16)), fwd512_ms=1000 * best(lambda: m.run(batch), 2))
print(json.dumps(out))
"""


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--models", nargs="*", default=["smollm2", "gemma3-270m", "qwen2.5-coder-0.5b"])
    a = ap.parse_args()
    from factrace.io import packaged

    rows = []
    for name in a.models:
        if not packaged.is_installed(name):
            print(f"{name}: not installed, skipped")
            continue
        packaged.resolve(name)  # assemble split files once, outside the measurement
        env = common.child_env()
        r = subprocess.run([sys.executable, "-c", CHILD, name, str(a.threads)], capture_output=True, text=True,
                           env=env)
        if r.returncode:
            print(r.stderr[-2000:])
            continue
        d = json.loads(r.stdout.strip().splitlines()[-1])
        rows.append(d)
    print(f"{'model':<22}{'load s':>8}{'peak MB':>9}{'f32 MB':>8}{'peak/f32':>9}{'fwd 16 ms':>11}{'fwd 8x64 ms':>13}")
    for d in rows:
        print(f"{d['model']:<22}{d['load_s']:>8.2f}{d['peak_mb']:>9.0f}{d['f32_mb']:>8.0f}{d['peak_mb'] / d['f32_mb']:>9.2f}"
              f"{d['fwd16_ms']:>11.1f}{d['fwd512_ms']:>13.1f}")


if __name__ == "__main__":
    main()
