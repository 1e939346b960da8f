import os
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures" / "models"
SHARED = Path(os.environ.get("FACTRACE_SHARED", ROOT.parent / "shared"))
SHARED_DATA = SHARED / "data"
MODEL_FIXTURES = sorted(p.name for p in FIXTURES.iterdir() if (p / "expected.npz").exists()) if FIXTURES.exists() else []


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
