#!/usr/bin/env bash
# Instructions per line and per connection of xps with --metrics and
# --access-log on against off, counted by callgrind (instruction counts do not
# depend on the machine's load, so a few percent can be seen on a shared VM).
#
#   bench/callgrind-observe.sh [OUTDIR]      # default /tmp/cg-observe
#   MODES=churn REPS=5 SECS=4 bench/callgrind-observe.sh
#
# Variants: plain; metrics = --metrics 127.0.0.1:0 (to tell the two costs
# apart); observed = --metrics 127.0.0.1:0 --access-log FILE. Loads: lines
# C=64 P=16 N=64, churn C=16 N=64. Each variant runs REPS times (default 3)
# per load under callgrind, for SECS seconds of load (default 4, no warm-up),
# the order rotating, and
#     Ir per op = (Ir(run) - Ir(idle)) / ops
# with ops = the lines or connections the load generator reports and Ir(idle)
# a run of the same variant with no load (start-up and shutdown, about 0.6 M).
# Lines still in flight when the load generator stops (at most C*P = 1024, of
# millions) are served but not counted. Ir counts every thread of the server
# (worker, metrics listener, access-log writer); kernel work is not counted.
# Each run leaves OUTDIR/cg.VARIANT.MODE.REP.out for callgrind_annotate.
# Only loopback is targeted; only the servers started here are stopped, by PID.
# Needs valgrind (apt-get install valgrind) and a release build
# (cargo build --release -p xps -p xps-bench).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-/tmp/cg-observe}
. bench/callgrind-run.sh
cg_defaults callgrind-observe.sh

# run VARIANT MODE SECONDS REP: one server under callgrind, one load (or, for
# MODE idle, none); appends "variant mode rep Ir ops" to $OUT/runs.txt.
run() {
    local variant=$1 mode=$2 secs=$3 tag="$1.$2.$4"
    local extra=()
    case $variant in
    observed)
        rm -f "$OUT/access.$tag.log"
        extra=(--metrics 127.0.0.1:0 --access-log "$OUT/access.$tag.log") ;;
    metrics) extra=(--metrics 127.0.0.1:0) ;;
    esac
    local result
    result=$(cg_run "$tag" "$XPS" "$mode" "$secs" "${extra[@]}")
    echo "$variant $mode $4 $result" | tee -a "$OUT/runs.txt" >&2
}

: >"$OUT/runs.txt"
for v in plain metrics observed; do run "$v" idle 2 0; done
for mode in $MODES; do
    for rep in $(seq 1 "$REPS"); do
        # Rotate the order so that drift affects every variant alike.
        case $((rep % 3)) in
        1) order="plain metrics observed" ;;
        2) order="metrics observed plain" ;;
        *) order="observed plain metrics" ;;
        esac
        for v in $order; do run "$v" "$mode" "$SECS" "$rep"; done
    done
done

python3 bench/callgrind-table.py "$OUT/runs.txt" plain metrics observed
