#!/usr/bin/env bash
# SIGUSR2 upgrade under load (SPEC §7; docs/performance.md, "Binary upgrade"):
# for each case, ROUNDS times, a fresh xps (a copy of the binary in a temp
# dir, --pid-file, --max-connections 20000 so the load's own connections are
# not capped) gets `xps-bench upgrade`, which sends SIGUSR2 and times it.
# One JSON line per round on stdout.
#
#   bench/upgrade.sh                  # idle-10000 and busy-1000, 5 rounds each
#   ROUNDS=1 CASES=idle bench/upgrade.sh
#
# Only loopback; only the processes this script started are stopped, by pid
# (the new xps of each round by the pid its pid file names).
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS=${ROUNDS:-5}
CASES=${CASES:-idle,busy}
WORKERS=${WORKERS:-1}
cargo build --release -q -p xps -p xps-bench
ulimit -n "$(ulimit -Hn)"
for case in ${CASES//,/ }; do
  case $case in
    idle) load=(--conns 10000 --busy 0) ;;
    busy) load=(--conns 0 --busy 1000) ;;
    *) echo "unknown case $case" >&2; exit 2 ;;
  esac
  for round in $(seq "$ROUNDS"); do
    dir=$(mktemp -d)
    cp target/release/xps "$dir/xps"
    "$dir/xps" --listen 127.0.0.1:0 --workers "$WORKERS" --max-connections 20000 \
      --pid-file "$dir/xps.pid" 2>"$dir/log" &
    first=$!
    for _ in $(seq 100); do grep -q "Server listening" "$dir/log" && break; sleep 0.05; done
    port=$(grep -o "port [0-9]*" "$dir/log" | head -1 | cut -d' ' -f2)
    if ! target/release/xps-bench upgrade --addr "127.0.0.1:$port" "${load[@]}" \
      --pid-file "$dir/xps.pid" --warmup 1 --duration 1 --timeout 30; then
      echo "round $round of $case failed" >&2
      kill "$first" 2>/dev/null || true
    fi
    wait "$first" || true
    new=$(cat "$dir/xps.pid" 2>/dev/null || true)
    if [ -n "$new" ] && [ "$new" != "$first" ]; then
      kill "$new" 2>/dev/null || true
      for _ in $(seq 100); do kill -0 "$new" 2>/dev/null || break; sleep 0.05; done
    fi
    rm -rf "$dir"
  done
done
