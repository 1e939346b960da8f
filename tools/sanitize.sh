#!/usr/bin/env bash
# Build the C extensions with AddressSanitizer + UndefinedBehaviorSanitizer and run the test suite
# against that build (`make sanitize`).
#
#   tools/sanitize.sh [extra pytest args]      e.g. tools/sanitize.sh tests/test_gguf_malformed.py
#
# The sanitized build is made in a scratch copy of the work tree (SANITIZE_DIR, default a temp dir), never
# in place, so the normal build in factrace/*.so is left untouched whatever happens; the copy is removed
# on exit (trap), also on failure or Ctrl-C. Tests that need torch (-m "not oracle": torch and ASan do not
# mix) and the real-model tests (-m "not realmodel": too slow under ASan) are excluded.
# ASan must be preloaded for a Python extension; CPython leaks by design, so leak detection is off here
# (tools/leakcheck.py checks leaks). Needs gcc (or CC=clang) with libasan/libubsan (Debian: gcc).
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
CC="${CC:-gcc}"
WORK="${SANITIZE_DIR:-$(mktemp -d -t factrace-asan-XXXXXX)}"
cleanup() { [ -z "${SANITIZE_KEEP:-}" ] && rm -rf "$WORK"; }
trap cleanup EXIT INT TERM

echo "sanitize: copying the work tree to $WORK"
mkdir -p "$WORK"
(cd "$ROOT" && git ls-files -co --exclude-standard -z | grep -zv '\.so$' | xargs -0 cp --parents -t "$WORK")
cd "$WORK"
echo "sanitize: building with FACTRACE_SANITIZE=address,undefined ($CC)"
CC="$CC" FACTRACE_SANITIZE=address,undefined FACTRACE_DEBUG=1 python setup.py -q build_ext --inplace \
    >build.log 2>&1 || { tail -30 build.log; exit 2; }

if [ "$CC" = clang ]; then
    ASAN_LIB="$(clang -print-file-name=libclang_rt.asan-x86_64.so)"
else
    ASAN_LIB="$($CC -print-file-name=libasan.so)"
fi
[ -f "$ASAN_LIB" ] || { echo "sanitize: libasan not found ($ASAN_LIB)"; exit 2; }
echo "sanitize: LD_PRELOAD=$ASAN_LIB"

# libstdc++ too: without it ASan's __cxa_throw interceptor fails in C++ extensions (matplotlib's ft2font)
STDCXX="$($CC -print-file-name=libstdc++.so.6)"
export LD_PRELOAD="$ASAN_LIB${STDCXX:+ $STDCXX}"
export ASAN_OPTIONS="detect_leaks=0:abort_on_error=1:strict_string_checks=1:detect_stack_use_after_return=0:${ASAN_OPTIONS:-}"
export UBSAN_OPTIONS="halt_on_error=1:print_stacktrace=1:${UBSAN_OPTIONS:-}"
# torch and ASan do not mix: a stub makes `import torch` fail, so tests that need it skip
mkdir -p "$WORK/.nosan/torch"
echo 'raise ModuleNotFoundError("torch is disabled in the ASan run (tools/sanitize.sh)")' > "$WORK/.nosan/torch/__init__.py"
export PYTHONPATH="$WORK:$WORK/.nosan${PYTHONPATH:+:$PYTHONPATH}"
export FACTRACE_SHARED="${FACTRACE_SHARED:-$ROOT/../shared}"
export OPENBLAS_NUM_THREADS="${OPENBLAS_NUM_THREADS:-1}"
# the copy's factrace must be the one imported, and it must be the sanitized build
python - <<'PY'
import factrace, factrace._core as c, os, sys
assert factrace.__file__.startswith(os.environ["PYTHONPATH"].split(":")[0]), factrace.__file__
print("sanitize: testing", os.path.dirname(factrace.__file__))
PY
set +e
python -m pytest -q -rfE -p no:cacheprovider -m "not oracle and not realmodel" "${@:-tests}"
rc=$?
set -e
[ $rc -eq 5 ] && rc=0   # no test selected
echo "sanitize: pytest exit code $rc"
exit $rc
