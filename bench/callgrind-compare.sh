#!/usr/bin/env bash
# Instructions per line and per connection of two xps binaries, counted by
# callgrind (instruction counts do not depend on the machine's load, so a
# difference of 1 % can be seen on a shared VM). For a change to the line
# path: build the old and the new binary, then
#
#   bench/callgrind-compare.sh OLD_XPS NEW_XPS [OUTDIR]    # default /tmp/cg-compare
#   REPS=5 SECS=4 MODES="lines churn" EXTRA="--metrics 127.0.0.1:0" bench/callgrind-compare.sh A B
#
# Each binary runs `--listen 127.0.0.1:0 $EXTRA` under callgrind, REPS times
# per load (default 3, the order alternating), for SECS seconds of load
# (default 4): lines C=64 P=16 size 64, churn C=16 size 64, from the release
# xps-bench, and once with no load. Then
#     Ir per op = (Ir(run) - Ir(idle)) / ops
# and the ratio of the medians, new over old. Only loopback is targeted; only
# the servers started here are stopped, by PID. Needs valgrind and
# `cargo build --release -p xps-bench`.
set -euo pipefail
cd "$(dirname "$0")/.."
OLD=$1 NEW=$2
OUT=${3:-/tmp/cg-compare}
REPS=${REPS:-3}
SECS=${SECS:-4}
MODES=${MODES:-lines churn}
read -r -a EXTRA <<<"${EXTRA:-}"
BENCH=target/release/xps-bench
mkdir -p "$OUT"
command -v valgrind >/dev/null || { echo "callgrind-compare.sh: valgrind is required" >&2; exit 1; }
[ -x "$BENCH" ] || { echo "callgrind-compare.sh: build $BENCH first" >&2; exit 1; }

. bench/callgrind-run.sh

# run NAME BINARY MODE SECONDS REP: appends "name mode rep Ir ops" to runs.txt.
run() {
    local result
    result=$(cg_run "$1.$3.$5" "$2" "$3" "$4" "${EXTRA[@]}")
    echo "$1 $3 $5 $result" | tee -a "$OUT/runs.txt" >&2
}

: >"$OUT/runs.txt"
run old "$OLD" idle 2 0
run new "$NEW" idle 2 0
for mode in $MODES; do
    for rep in $(seq 1 "$REPS"); do
        if [ $((rep % 2)) -eq 1 ]; then order="old new"; else order="new old"; fi
        for v in $order; do
            if [ "$v" = old ]; then run old "$OLD" "$mode" "$SECS" "$rep"; else run new "$NEW" "$mode" "$SECS" "$rep"; fi
        done
    done
done

python3 bench/callgrind-table.py "$OUT/runs.txt" old new
