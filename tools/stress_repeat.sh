#!/usr/bin/env bash
# The interrupt, thread and stress tests N times in a row (default 20) with two CPU-bound busy processes
# beside them (a loaded machine); stops at the first failure. Prints the time of each round and in all.
#   bash tools/stress_repeat.sh [N] [BUSY]
set -euo pipefail
cd "$(dirname "$0")/.."
N=${1:-20}
BUSY=${2:-2}
pids=()
stop() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; }
trap stop EXIT
for _ in $(seq "$BUSY"); do
    python -c "while True: pass" &
    pids+=($!)
done
echo "stress: $BUSY busy processes (${pids[*]}); $N rounds"
t0=$SECONDS
for i in $(seq "$N"); do
    t=$SECONDS
    if ! python -m pytest -q -x -p no:cacheprovider tests/test_interrupts.py tests/test_threads.py tests/test_stress.py \
            > "/tmp/stress_round_$i.log" 2>&1; then
        echo "stress: round $i FAILED after $((SECONDS - t0))s (log: /tmp/stress_round_$i.log)"
        tail -40 "/tmp/stress_round_$i.log"
        exit 1
    fi
    echo "stress: round $i passed in $((SECONDS - t))s ($(tail -1 "/tmp/stress_round_$i.log"))"
done
echo "stress: $N rounds passed in $((SECONDS - t0))s with $BUSY busy processes"
