#!/usr/bin/env bash
# Builds xps, the load generator and the two peers, then runs every benchmark
# case on fresh server processes and writes bench/results/{results.json,
# RESULTS.md,chart.svg}. Needs only Rust, gcc, python3 and taskset.
#
#   bench/compare.sh            # full run (~6 minutes)
#   QUICK=1 bench/compare.sh    # short smoke run (~1 minute), same outputs
#
# Knobs (environment): ROUNDS, DURATION, WARMUP, IDLE_CONNS, IDLE_HOLD,
# OUT (results directory), CASES (comma list of case names to run),
# NICE (e.g. -10: run servers and load generator at higher priority, for a
# shared machine; needs root).
#
#   OBSERVE=1 CASES=lines-c64-p16,churn-c16 OUT=/tmp/bench-observe bench/compare.sh
#
# OBSERVE=1 runs, instead of the peer matrix, plain xps against
# "xps-observed" (xps --metrics 127.0.0.1:0 --access-log FILE, a fresh file
# per process) on lines-c64-p16 and churn-c16 (CASES narrows them), same
# pinning and alternation; RESULTS.md gets an "Observability" section. Give
# OUT so the committed bench/results/ stays as it is. For instruction counts
# of the same comparison see bench/callgrind-observe.sh.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v taskset >/dev/null 2>&1; then
    echo "compare.sh: taskset not found; installing util-linux" >&2
    if command -v apt-get >/dev/null 2>&1; then
        apt-get install -y util-linux >/dev/null || { apt-get update >/dev/null && apt-get install -y util-linux >/dev/null; }
    fi
    command -v taskset >/dev/null 2>&1 || { echo "compare.sh: taskset (util-linux) is required" >&2; exit 1; }
fi
for tool in cargo gcc python3; do
    command -v "$tool" >/dev/null 2>&1 || { echo "compare.sh: $tool is required" >&2; exit 1; }
done

echo "== build (release)" >&2
cargo build --release -p xps -p xps-bench -p tokio-peer >&2
mkdir -p target/release
gcc -O2 -Wall -Wextra -o target/release/c-echo bench/c-echo/echo.c

# idle needs 10000 connections on each side: use the hard limit.
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true

exec python3 bench/compare.py "$@"
