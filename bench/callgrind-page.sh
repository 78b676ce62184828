#!/usr/bin/env bash
# What an open status page costs the line path: xps --metrics under load,
# with and without bench/status-poller.py asking for /api and
# /api/connections once a second (as the page does), counted by callgrind.
#
#   bench/callgrind-page.sh [OUTDIR]          # default /tmp/cg-page
#   REPS=5 SECS=4 MODES="lines churn" bench/callgrind-page.sh
#
# Threads are counted apart: "workers" is the Ir of the worker threads (the
# line path: reading, reversing, writing, and the snapshots the page asks
# for), "all" adds the metrics address's thread (the HTTP server, /api, the
# JSON). Ir per op = (Ir(run) - Ir(idle)) / ops, as in callgrind-compare.sh;
# the polled variant's idle run polls too. Under callgrind the server runs
# some 50 times slower while the poller keeps wall-clock time, so the
# HTTP thread's share per line is magnified that much. Only loopback is
# targeted; only the servers started here are stopped, by PID. Needs
# valgrind and a release build (cargo build --release -p xps -p xps-bench).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-/tmp/cg-page}
. bench/callgrind-run.sh
cg_defaults callgrind-page.sh
export CG_WORKERS=1

# run VARIANT MODE SECONDS REP: appends "variant mode rep Ir ops Ir_workers".
run() {
    local result
    if [ "$1" = polled ]; then
        result=$(CG_POLL=1 cg_run "$1.$2.$4" "$XPS" "$2" "$3" --metrics 127.0.0.1:0)
    else
        result=$(cg_run "$1.$2.$4" "$XPS" "$2" "$3" --metrics 127.0.0.1:0)
    fi
    echo "$1 $2 $4 $result" | tee -a "$OUT/runs.txt" >&2
}

: >"$OUT/runs.txt"
for v in metrics polled; do run "$v" idle "$SECS" 0; done
for mode in $MODES; do
    for rep in $(seq 1 "$REPS"); do
        if [ $((rep % 2)) = 1 ]; then order="metrics polled"; else order="polled metrics"; fi
        for v in $order; do run "$v" "$mode" "$SECS" "$rep"; done
    done
done

python3 - "$OUT/runs.txt" <<'PY'
import statistics
import sys
rows = [l.split() for l in open(sys.argv[1]) if l.strip()]
idle = {v: (int(a), int(w)) for v, m, _, a, _, w in rows if m == "idle"}
per = {}
for v, m, _, a, ops, w in rows:
    if m != "idle":
        per.setdefault((m, v, "workers"), []).append((int(w) - idle[v][1]) / int(ops))
        per.setdefault((m, v, "all"), []).append((int(a) - idle[v][0]) / int(ops))
print("| load | threads | variant | Ir per op, each run | median |")
print("|---|---|---|---|---:|")
modes = [m for m in ("lines", "churn") if (m, "metrics", "all") in per]
for m in modes:
    for t in ("workers", "all"):
        for v in ("metrics", "polled"):
            vals = per[(m, v, t)]
            print("| %s | %s | %s | %s | %.1f per %s |" % (m, t, v, ", ".join("%.1f" % x for x in vals),
                  statistics.median(vals), "line" if m == "lines" else "connection"))
for m in modes:
    for t in ("workers", "all"):
        p, q = statistics.median(per[(m, "metrics", t)]), statistics.median(per[(m, "polled", t)])
        print("%s, %s: polled / not polled = %.4f (%+.2f %%, %+.1f Ir per op)" % (m, t, q / p, 100 * (q / p - 1), q - p))
print("idle runs (start-up, SECS s, shutdown) Ir, all threads and workers: %s" % idle)
PY
