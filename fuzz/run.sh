#!/usr/bin/env bash
# Run every fuzz target for a fixed time:  fuzz/run.sh [SECONDS_PER_TARGET]   (default 30; `make fuzz`)
#
# Python targets (atheris, coverage of factrace's Python parsers): safetensors, st_index, config, gguf,
# gguf_tokenizer. C targets (libFuzzer + ASan + UBSan on csrc/gguf.c + csrc/quant.c, built with clang):
# c_gguf, c_dequant. The seed corpus is rebuilt from valid tiny files (fuzz/make_corpus.py) into the work
# directory (FUZZ_WORK, default build/fuzz); the corpus grows there between runs.
# Prints the number of executions of every target; exits non-zero if any target crashed (the crashing
# input is left in $FUZZ_WORK/crashes/<target>/: copy it to tests/fuzz_crashes/ and add a regression
# test in tests/test_fuzz_regressions.py). Needs: pip install atheris; apt-get install -y clang.
set -uo pipefail
cd "$(dirname "$0")/.."
SECS="${1:-30}"
WORK="${FUZZ_WORK:-build/fuzz}"
export FACTRACE_MAX_BYTES="${FACTRACE_MAX_BYTES:-67108864}"   # keep one input cheap
TARGETS="${FUZZ_TARGETS:-safetensors st_index config gguf gguf_tokenizer c_gguf c_dequant}"
mkdir -p "$WORK/bin"
python fuzz/make_corpus.py "$WORK/corpus" >/dev/null || { echo "fuzz: cannot build the seed corpus"; exit 2; }

CC="${FUZZ_CC:-clang}"
CFLAGS="-g -O1 -fsanitize=fuzzer,address,undefined -fno-sanitize-recover=undefined -Icsrc"
build_c() {  # target -> binary
    local src="fuzz/c/fuzz_${1#c_}.c" bin="$WORK/bin/$1"
    local libs="csrc/quant.c"
    [ "$1" = c_gguf ] && libs="csrc/gguf.c csrc/quant.c"
    $CC $CFLAGS "$src" $libs -o "$bin" || return 1
}

status=0
summary=()
for t in $TARGETS; do
    corpus="$WORK/corpus/$t"
    crashes="$WORK/crashes/$t"
    log="$WORK/$t.log"
    mkdir -p "$corpus" "$crashes"
    common=(-max_total_time="$SECS" -timeout=20 -rss_limit_mb=4096 -max_len=262144
            -artifact_prefix="$crashes/" -print_final_stats=1)
    if [[ $t == c_* ]]; then
        if ! command -v "$CC" >/dev/null || ! build_c "$t" 2>"$log"; then
            echo "fuzz: $t: cannot build with $CC (apt-get install -y clang); see $log"; status=1
            summary+=("$t: BUILD FAILED"); continue
        fi
        cmd=("$WORK/bin/$t" "${common[@]}" "$corpus")
        env=(ASAN_OPTIONS=detect_leaks=1:allocator_may_return_null=1 UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1)
    else
        if ! python -c "import atheris" 2>/dev/null; then
            echo "fuzz: $t: atheris is not installed (pip install atheris)"; status=1
            summary+=("$t: NO ATHERIS"); continue
        fi
        cmd=(python "fuzz/fuzz_$t.py" "${common[@]}" "$corpus")
        env=()
    fi
    echo "== fuzz $t for ${SECS}s"
    env "${env[@]}" "${cmd[@]}" >"$log" 2>&1
    rc=$?
    execs=$(grep -oE 'stat::number_of_executed_units: *[0-9]+' "$log" | grep -oE '[0-9]+$' | tail -1)
    [ -z "$execs" ] && execs=$(grep -oE 'Done [0-9]+ runs' "$log" | grep -oE '[0-9]+' | tail -1)
    [ -z "$execs" ] && execs=$(grep -oE '^#[0-9]+' "$log" | tr -d '#' | tail -1)
    cov=$(grep -oE 'cov: [0-9]+' "$log" | tail -1)
    if [ $rc -ne 0 ]; then
        status=1
        echo "fuzz: $t CRASHED (rc=$rc) after ${execs:-?} executions; log $log; inputs:"
        ls "$crashes"
        grep -E 'ERROR|Error|Uncaught|Traceback|SUMMARY' "$log" | head -5
        summary+=("$t: CRASH after ${execs:-?} executions")
    else
        summary+=("$t: ${execs:-?} executions, ${cov:-cov: ?}, ok")
    fi
done
echo "== fuzz summary (${SECS}s per target)"
printf '%s\n' "${summary[@]}"
exit $status
