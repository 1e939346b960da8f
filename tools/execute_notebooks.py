"""Execute the notebooks (nbclient) and write them, with their outputs, to a folder.

    python tools/execute_notebooks.py OUT_DIR [NOTEBOOK ...]      (default: every notebooks/*.ipynb)

The kernel imports this checkout's factrace (PYTHONPATH). Used by tools/build_docs.sh when the test
suite did not leave executed copies (tests/test_notebooks.py writes them to $FACTRACE_EXECUTED_NOTEBOOKS).
"""
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def execute(path: Path, out_dir: Path, timeout: int = 600) -> Path:
    import nbclient
    import nbformat

    nb = nbformat.read(path, as_version=4)
    nbclient.NotebookClient(nb, timeout=timeout, kernel_name="python3",
                            resources={"metadata": {"path": str(path.parent)}}).execute()
    out = out_dir / path.name
    out_dir.mkdir(parents=True, exist_ok=True)
    nbformat.write(nb, out)
    return out


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if not argv:
        sys.exit(__doc__)
    out_dir = Path(argv[0])
    paths = [Path(p) for p in argv[1:]] or sorted((ROOT / "notebooks").glob("*.ipynb"))
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    for p in paths:
        t0 = time.perf_counter()
        execute(p, out_dir)
        print(f"executed {p.name} in {time.perf_counter() - t0:.0f}s")


if __name__ == "__main__":
    main()
