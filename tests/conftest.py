import os
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures" / "models"
SHARED = Path(os.environ.get("FACTRACE_SHARED", ROOT.parent / "shared"))
SHARED_DATA = SHARED / "data"
MODEL_FIXTURES = sorted(p.name for p in FIXTURES.iterdir() if (p / "expected.npz").exists()) if FIXTURES.exists() else []


def _fixture_config(name):
    import json

    from factrace.io.config import from_hf_config

    return from_hf_config(json.loads((FIXTURES / name / "config.json").read_text()))


_CONFIGS = {n: _fixture_config(n) for n in MODEL_FIXTURES}
# the first fixture of every architecture of the table (for suites too costly to run on every fixture)
ARCH_FIXTURES = sorted({_CONFIGS[n].arch: n for n in reversed(MODEL_FIXTURES)}.values())
# fixtures with parallel-residual blocks (GPT-NeoX with use_parallel_residual, GPT-J)
PARALLEL_FIXTURES = [n for n in MODEL_FIXTURES if _CONFIGS[n].parallel]


@pytest.fixture(scope="session")
def shared_data():
    if not SHARED_DATA.exists():
        pytest.skip(f"shared data not found at {SHARED_DATA}")
    return SHARED_DATA


_models = {}


def fixture_model(name):
    import factrace

    if name not in _models:
        _models[name] = factrace.load(FIXTURES / name)
    return _models[name]


def expected(name):
    return dict(np.load(FIXTURES / name / "expected.npz"))


def join_or_dump(threads, timeout, what="a worker thread"):
    """Join ``threads`` within ``timeout`` s in all; if one is still alive, write every thread's Python
    stack to stderr (faulthandler; pytest shows it with the failure) and fail saying which hung."""
    import faulthandler
    import sys
    import time

    deadline = time.monotonic() + timeout
    for t in threads:
        t.join(max(0.0, deadline - time.monotonic()))
    alive = [t.name for t in threads if t.is_alive()]
    if alive:
        print(f"\n{what} hung ({', '.join(alive)} alive after {timeout:.0f} s); stacks:", file=sys.stderr, flush=True)
        faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
        pytest.fail(f"{what} hung: {', '.join(alive)} still alive after {timeout:.0f} s (stacks on stderr)")
