"""Results show themselves in Jupyter: every result class has ``_repr_html_`` (the shared
``factrace.methods._common.result_html``): an HTML string with a table or an embedded PNG figure; the
method modules import neither pandas nor matplotlib when they are imported."""
import dataclasses
import os
import subprocess
import sys

import pytest

import factrace
from factrace.methods._common import result_html

from conftest import ROOT, fixture_model

PROMPT, SUBJECT = "The Eiffel Tower is located in the city of", "The Eiffel Tower"
RECORDS = [{"prompt": PROMPT, "subject": SUBJECT, "attribute": " Paris"},
           {"prompt": "The Colosseum is in the country of", "subject": "The Colosseum", "attribute": " Italy"}]
PNG = 'src="data:image/png;base64,'

MODULES = ["factrace.methods.tracing", "factrace.methods.severing", "factrace.methods.knockout",
           "factrace.methods.dla", "factrace.methods.lens", "factrace.methods.attention_knockout",
           "factrace.study.dataset_trace"]


def test_modules_do_not_import_pandas_or_matplotlib():
    code = ("import sys\n" + "".join(f"import {m}\n" for m in MODULES)
            + "bad = [m for m in ('pandas', 'matplotlib') if m in sys.modules]\nprint(bad)\nsys.exit(bool(bad))\n")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                       env=dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))),
                       timeout=120)  # the caller's environment: under tools/sanitize.sh it carries LD_PRELOAD
    assert p.returncode == 0, p.stdout + p.stderr


@pytest.fixture(scope="module")
def results():
    m = fixture_model("gpt2")
    kw = dict(samples=2, noise=0.1)
    return {
        "TraceResult": factrace.trace(m, PROMPT, SUBJECT, kind="mlp", window=3, **kw),
        "SeverResult": factrace.sever(m, PROMPT, SUBJECT, frozen="mlp", **kw),
        "KnockoutResult": factrace.knockout(m, PROMPT, SUBJECT, kind="attn", window=1, topk=20),
        "DLAResult": factrace.dla(m, PROMPT, subject=SUBJECT),
        "DatasetDLA": factrace.dla_dataset(m, RECORDS),
        "LensResult": factrace.logit_lens(m, PROMPT),
        "AttentionKnockoutResult": factrace.attention_knockout(m, PROMPT, subject=SUBJECT, window=1),
        "DatasetKnockout": factrace.attention_knockout_dataset(m, RECORDS, window=1),
        "DatasetTrace": factrace.trace_dataset(m, RECORDS, known_only=False, window=3, progress=False, **kw),
    }


FIGURES = {"TraceResult", "DLAResult", "DatasetDLA", "LensResult", "AttentionKnockoutResult", "DatasetKnockout",
           "DatasetTrace"}


@pytest.mark.parametrize("name", ["TraceResult", "SeverResult", "KnockoutResult", "DLAResult", "DatasetDLA",
                                  "LensResult", "AttentionKnockoutResult", "DatasetKnockout", "DatasetTrace"])
def test_result_renders(results, name):
    r = results[name]
    assert type(r).__name__ == name
    h = r._repr_html_()
    assert isinstance(h, str) and h.startswith("<div>") and "<table" in h
    assert "figure unavailable" not in h, h[:2000]
    if name in FIGURES:
        assert PNG in h
    for f in dataclasses.fields(r):  # every field is listed
        assert f">{f.name}<" in h


def test_without_matplotlib_a_table_and_a_note(results, monkeypatch):
    for mod in [k for k in sys.modules if k == "matplotlib" or k.startswith("matplotlib.")]:
        monkeypatch.setitem(sys.modules, mod, None)
    h = results["TraceResult"]._repr_html_()
    assert "<table" in h and PNG not in h
    assert "figure unavailable" in h and "pip install matplotlib" in h


def test_a_new_result_class_gets_it_for_free():
    import numpy as np

    @dataclasses.dataclass
    class PatchingResult:
        effect: np.ndarray
        label: str

        _repr_html_ = result_html

    h = PatchingResult(np.arange(6.0).reshape(2, 3), "x <y>")._repr_html_()
    assert "<b>PatchingResult</b>" in h and "array (2, 3) float64" in h and "&#x27;x &lt;y&gt;&#x27;" in h
