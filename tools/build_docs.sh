#!/usr/bin/env bash
# The documentation site: README as the home page, docs/*.md, the API reference from the docstrings
# (mkdocstrings) and the notebooks with their outputs (mkdocs-jupyter), into site/.
#   bash tools/build_docs.sh
# The MkDocs tools go into their own venv ($DOCS_VENV, default build/docs-venv; from PyPI, nothing else is
# fetched). Executed notebooks are taken from $FACTRACE_EXECUTED_NOTEBOOKS (default build/executed_notebooks;
# the test suite writes them there when the variable is set) and executed now if missing or older than
# the source notebook (needs the real models, like tests/test_notebooks.py).
set -euo pipefail
cd "$(dirname "$0")/.."
t0=$SECONDS
VENV=${DOCS_VENV:-build/docs-venv}
if [ ! -x "$VENV/bin/mkdocs" ] || ! cmp -s docs/requirements.txt "$VENV/requirements.txt"; then
    python -m venv "$VENV"
    "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check -r docs/requirements.txt
    cp docs/requirements.txt "$VENV/requirements.txt"
fi
echo "docs: tools ready after $((SECONDS - t0))s"

# the home page: the README, its links into docs/ made relative to docs/
python - <<'PY'
import re
text = open("README.md", encoding="utf-8").read()
text = re.sub(r"\]\(docs/", "](", text)
open("docs/index.md", "w", encoding="utf-8").write(text)
PY

EXEC=${FACTRACE_EXECUTED_NOTEBOOKS:-build/executed_notebooks}
todo=()
for nb in notebooks/*.ipynb; do
    out="$EXEC/$(basename "$nb")"
    if [ ! -s "$out" ] || [ "$nb" -nt "$out" ]; then todo+=("$nb"); fi
done
if [ ${#todo[@]} -gt 0 ]; then
    echo "docs: executing ${todo[*]}"
    python tools/execute_notebooks.py "$EXEC" "${todo[@]}"
fi
rm -rf docs/notebooks && mkdir -p docs/notebooks && cp "$EXEC"/*.ipynb docs/notebooks/
echo "docs: notebooks ready after $((SECONDS - t0))s"

NO_MKDOCS_2_WARNING=1 "$VENV/bin/mkdocs" build --strict --clean --site-dir site  # (griffe may print that the built .so modules cannot be imported here: harmless, the sources are read)
echo "docs: site/ built after $((SECONDS - t0))s (open site/index.html)"
