#!/usr/bin/env bash
# The README's commands on a fresh machine: a new venv, a copy of the checkout's files (what a clean clone
# has), the README's main-job command exactly as written there (read from README.md, so the two cannot
# drift), then `factrace report --n 1` and `python benchmarks/load.py` with only what that install line
# installs. No torch, no test extras: a dependency the README's install does not bring fails here.
#   bash tools/fresh_venv_check.sh            (CI: .ci/run)
# Env: FRESH_DIR (default: a new temporary folder, removed at the end), FACTRACE_DATA_DIR (default
# ../shared/data: the dataset without network).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
DIR=${FRESH_DIR:-$(mktemp -d -t factrace-fresh.XXXXXX)}
[ -n "${FRESH_DIR:-}" ] || trap 'rm -rf "$DIR"' EXIT
export FACTRACE_DATA_DIR=${FACTRACE_DATA_DIR:-$ROOT/../shared/data}
export FACTRACE_CACHE=$DIR/cache MPLBACKEND=Agg
t0=$SECONDS
step() { echo "fresh-venv: $1 after $((SECONDS - t0))s"; }

# the main job's command: the first ```bash block of README.md's "## Two commands" section
MAIN_JOB=$(python - <<'EOF'
import re
text = open("README.md", encoding="utf-8").read()
section = text.split("## Two commands", 1)[1]
print(re.search(r"```bash\n(.*?)```", section, re.S).group(1).strip())
EOF
)
case "$MAIN_JOB" in *'pip install ".[analysis]"'*"factrace trace"*) ;; *)
    echo "fresh-venv: README's main job is not the expected install + trace command:"; echo "$MAIN_JOB"; exit 1;; esac

# a clean clone's files (tracked + new, not ignored): no in-place build, no build/ folder
mkdir -p "$DIR/src"
git ls-files -z --cached --others --exclude-standard | tar --null -T - -cf - | tar -xf - -C "$DIR/src"
python -m venv "$DIR/venv"
# shellcheck disable=SC1091
. "$DIR/venv/bin/activate"
cd "$DIR/src"
step "venv and checkout copy ready"

echo "fresh-venv: $ $MAIN_JOB"
bash -euo pipefail -c "$MAIN_JOB"
test -s out/trace.csv && test -s out/trace_hidden.png && test -s out/trace_mlp.png && test -s out/trace_attn.png
step "README main job done"

python -I - <<'EOF'   # -I: not the copy's source tree in the current directory
import importlib.util, sys
for name in ("torch", "transformers", "pytest"):
    if importlib.util.find_spec(name):
        sys.exit(f"fresh-venv: {name} is installed in the fresh venv; the check would not be fresh")
import factrace, pathlib
assert "site-packages" in factrace.__file__, factrace.__file__
print("fresh-venv: factrace", factrace.__version__, "from", pathlib.Path(factrace.__file__).parent, "BLAS", factrace.BLAS)
EOF

# the README's report command, with one fact (the extras the README installs: [analysis] only)
factrace report --model smollm2 --dataset known_1000 --n 1 --out report/ --no-progress
test -s report/report.md && test -s report/report.html && ls report/data/*/*.parquet >/dev/null
step "factrace report --n 1 done"

# a benchmark against the installed package (this copy is not built in place); needs no torch
python benchmarks/load.py --models smollm2 --no-7b | tee load.txt
grep -q "the installed package" load.txt && grep -q "^smollm2" load.txt
step "benchmarks/load.py done"
echo "fresh-venv: all README commands worked after $((SECONDS - t0))s"
