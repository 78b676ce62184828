#!/usr/bin/env bash
# Soak test of the release xps server on loopback, bounded in time.
#
#   scripts/soak.sh [soak|idle|all]
#
# soak (default): starts target/release/xps on two free ports of 127.0.0.1
#   and runs examples/soak_client.rs against it for SOAK_SECS
#   (default 300) seconds: SOAK_IDLE (5000) idle connections, pipelined
#   clients verifying every reply, flooders that send without reading (up to
#   SOAK_FLOOD_BYTES, 100 MB, each), clients that reset mid-stream (SO_LINGER
#   0) and connect/line/close churn (SOAK_CHURN_RATE, 200/s). Every
#   SOAK_INTERVAL (5) seconds it prints elapsed time, server RSS, server CPU %
#   over the interval, the server's open fds and the client's error count; at
#   the end a summary. Then SIGTERM must stop the server with status 0.
#   Exits non-zero if the server died, a reply was wrong, the load client saw
#   errors (more than SOAK_MAX_ERRORS, default 0) or the shutdown failed.
#
# idle: on a fresh server (--max-connections 20000, default idle timeout), opens SOAK_IDLE_N
#   (10000) idle connections and reports RSS per idle connection and server
#   CPU % over 10 s at rest; then the same with "warm" connections that each
#   sent one line first.
#
# all: soak, then idle.
#
# Only processes this script started are signalled, by PID. Needs a
# RLIMIT_NOFILE hard limit above SOAK_IDLE_N + 100 (the server and the client
# raise their soft limits themselves where they can).
set -euo pipefail

MODE=${1:-soak}
SOAK_SECS=${SOAK_SECS:-300}
SOAK_IDLE=${SOAK_IDLE:-5000}
SOAK_IDLE_N=${SOAK_IDLE_N:-10000}
SOAK_INTERVAL=${SOAK_INTERVAL:-5}
SOAK_FLOOD_BYTES=${SOAK_FLOOD_BYTES:-100000000}
SOAK_CHURN_RATE=${SOAK_CHURN_RATE:-200}
SOAK_PIPELINERS=${SOAK_PIPELINERS:-4}
SOAK_FLOODERS=${SOAK_FLOODERS:-3}
SOAK_RESETTERS=${SOAK_RESETTERS:-2}
SOAK_CHURNERS=${SOAK_CHURNERS:-2}
SOAK_MAX_ERRORS=${SOAK_MAX_ERRORS:-0}
# 0 = never: the idle connections must last the whole soak (the client counts
# a connection the server closes as an error).
SOAK_IDLE_TIMEOUT=${SOAK_IDLE_TIMEOUT:-0}
# Extra server options for both modes, e.g. SOAK_SERVER_ARGS="--workers 2".
SOAK_SERVER_ARGS=${SOAK_SERVER_ARGS:-}

case "$MODE" in soak | idle | all) ;; *)
    echo "usage: $0 [soak|idle|all]" >&2
    exit 2
    ;;
esac

ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
WORK=$(mktemp -d "${TMPDIR:-/tmp}/xps-soak.XXXXXX")
SERVER=target/release/xps
CLIENT=target/release/examples/soak_client
TCK=$(getconf CLK_TCK)
SERVER_PID=
CLIENT_PID=

cleanup() {
    # Only our own children, by PID.
    if [[ -n "$CLIENT_PID" ]] && kill -0 "$CLIENT_PID" 2>/dev/null; then kill "$CLIENT_PID" 2>/dev/null || true; fi
    if [[ -n "$SERVER_PID" ]] && kill -0 "$SERVER_PID" 2>/dev/null; then kill -KILL "$SERVER_PID" 2>/dev/null || true; fi
}
trap cleanup EXIT

echo "== building (release)"
cargo build --release --quiet --bin xps --example soak_client

# --- /proc readers -------------------------------------------------------
rss_kb() { awk '/^VmRSS:/ { print $2 }' "/proc/$1/status" 2>/dev/null || echo 0; }
hwm_kb() { awk '/^VmHWM:/ { print $2 }' "/proc/$1/status" 2>/dev/null || echo 0; }
# utime + stime in clock ticks (fields 14 and 15; the comm field "(xps)" has no spaces).
cpu_ticks() { awk '{ print $14 + $15 }' "/proc/$1/stat" 2>/dev/null || echo 0; }
# CPU time of all threads in ns (schedstat), for finer resolution than ticks.
cpu_ns() { cat /proc/"$1"/task/*/schedstat 2>/dev/null | awk '{ s += $1 } END { print s + 0 }'; }
fd_count() { ls "/proc/$1/fd" 2>/dev/null | wc -l; }
now_ns() { date +%s%N; }
stat_of() { # stat_of KEY FILE -> value from the client's key=value line
    local v
    v=$(tr ' ' '\n' 2>/dev/null <"$2" | awk -F= -v k="$1" '$1 == k { print $2 }')
    echo "${v:-0}"
}

# Two free TCP ports on 127.0.0.1. (Two `--listen 127.0.0.1:0` would not do:
# the server drops the second as a duplicate of the first.)
free_ports() {
    python3 -c '
import socket
socks = [socket.socket() for _ in range(2)]
for s in socks:
    s.bind(("127.0.0.1", 0))
print(",".join(str(s.getsockname()[1]) for s in socks))
'
}

# start_server LOGFILE ARGS... : sets SERVER_PID and PORTS (comma-separated).
start_server() {
    local log=$1
    shift
    local try i
    for try in 1 2 3; do
        PORTS=$(free_ports)
        # shellcheck disable=SC2086 # SOAK_SERVER_ARGS is split on purpose
        "$SERVER" --listen "127.0.0.1:${PORTS%,*}" --listen "127.0.0.1:${PORTS#*,}" "$@" $SOAK_SERVER_ARGS 2>"$log" &
        SERVER_PID=$!
        for i in $(seq 100); do
            if [[ $(grep -c "Server listening on port" "$log") -ge 2 ]]; then
                echo "server pid $SERVER_PID on 127.0.0.1 ports $PORTS"
                return 0
            fi
            kill -0 "$SERVER_PID" 2>/dev/null || break
            sleep 0.1
        done
        # A port taken between the probe and the bind: try other ports.
        kill -0 "$SERVER_PID" 2>/dev/null && kill -KILL "$SERVER_PID" 2>/dev/null
        wait "$SERVER_PID" 2>/dev/null || true
        SERVER_PID=
    done
    echo "server did not start:" >&2
    cat "$log" >&2
    exit 1
}

# stop_server: SIGTERM, then wait up to 10 s; sets STOP_STATUS.
stop_server() {
    STOP_STATUS=dead
    if ! kill -0 "$SERVER_PID" 2>/dev/null; then
        wait "$SERVER_PID" 2>/dev/null || true
        SERVER_PID=
        return
    fi
    kill -TERM "$SERVER_PID"
    local t0
    t0=$(date +%s)
    while kill -0 "$SERVER_PID" 2>/dev/null && (($(date +%s) - t0 < 10)); do sleep 0.1; done
    if kill -0 "$SERVER_PID" 2>/dev/null; then
        STOP_STATUS="hung (killed)"
        kill -KILL "$SERVER_PID" 2>/dev/null || true
    fi
    set +e
    wait "$SERVER_PID"
    local rc=$?
    set -e
    [[ "$STOP_STATUS" == dead ]] && STOP_STATUS="exit $rc in $(($(date +%s) - t0)) s"
    SERVER_PID=
}

# --- soak ------------------------------------------------------------------
run_soak() {
    echo "== soak: ${SOAK_SECS}s, ${SOAK_IDLE} idle, ${SOAK_PIPELINERS} pipeliners, ${SOAK_FLOODERS} flooders" \
        "(<= ${SOAK_FLOOD_BYTES} B each), ${SOAK_RESETTERS} resetters, ${SOAK_CHURNERS} churners at ${SOAK_CHURN_RATE}/s"
    start_server "$WORK/server.log" --idle-timeout "$SOAK_IDLE_TIMEOUT"
    local pid=$SERVER_PID
    local fds_start
    fds_start=$(fd_count "$pid")
    echo "server: $("$SERVER" --version) ${SOAK_SERVER_ARGS:+($SOAK_SERVER_ARGS) }at $(git rev-parse --short HEAD 2>/dev/null || cat .sha 2>/dev/null || echo '?')"
    local stats=$WORK/stats
    "$CLIENT" --mode soak --ports "$PORTS" --secs "$SOAK_SECS" --stats "$stats" \
        --idle "$SOAK_IDLE" --pipeliners "$SOAK_PIPELINERS" --flooders "$SOAK_FLOODERS" \
        --flood-bytes "$SOAK_FLOOD_BYTES" --resetters "$SOAK_RESETTERS" \
        --churners "$SOAK_CHURNERS" --churn-rate "$SOAK_CHURN_RATE" \
        >"$WORK/client.out" 2>"$WORK/client.err" &
    CLIENT_PID=$!

    local t_start t_prev c_prev t c rss cpu fds errs elapsed
    local max_rss=0 cpu_sum=0 samples=0 server_died=0
    t_start=$(now_ns)
    t_prev=$t_start
    c_prev=$(cpu_ticks "$pid")
    printf '%8s %10s %7s %7s %7s %9s %10s %9s\n' elapsed_s rss_kB cpu_% fds errors lines flood_MB churn
    # Bounded: the client stops itself after SOAK_SECS (+ at most ~70 s of drain).
    local hard=$((SOAK_SECS + 120))
    while kill -0 "$CLIENT_PID" 2>/dev/null; do
        sleep "$SOAK_INTERVAL"
        t=$(now_ns)
        elapsed=$(((t - t_start) / 1000000000))
        if ! kill -0 "$pid" 2>/dev/null; then
            echo "!! server pid $pid is gone at ${elapsed}s"
            server_died=1
            break
        fi
        c=$(cpu_ticks "$pid")
        rss=$(rss_kb "$pid")
        fds=$(fd_count "$pid")
        cpu=$(awk -v dc=$((c - c_prev)) -v dt=$((t - t_prev)) -v hz="$TCK" 'BEGIN { printf "%.1f", dc / hz / (dt / 1e9) * 100 }')
        errs=$(stat_of errors "$stats")
        printf '%8d %10d %7s %7d %7d %9d %10d %9d\n' "$elapsed" "$rss" "$cpu" "$fds" "$errs" \
            "$(stat_of pipe_lines "$stats")" "$(($(stat_of flood_sent "$stats") / 1000000))" \
            "$(stat_of churn_ok "$stats")"
        ((rss > max_rss)) && max_rss=$rss
        cpu_sum=$(awk -v a="$cpu_sum" -v b="$cpu" 'BEGIN { print a + b }')
        samples=$((samples + 1))
        t_prev=$t
        c_prev=$c
        if ((elapsed > hard)); then
            echo "!! load client still running after ${elapsed}s: stopping it"
            kill "$CLIENT_PID" 2>/dev/null || true
        fi
    done
    set +e
    wait "$CLIENT_PID"
    local client_rc=$?
    set -e
    CLIENT_PID=
    local hwm total_ticks
    hwm=$(hwm_kb "$pid")
    total_ticks=$(cpu_ticks "$pid")
    kill -0 "$pid" 2>/dev/null || server_died=1
    local final_fds
    sleep 1 # let the server see the client's last closes
    final_fds=$(fd_count "$pid")
    stop_server

    local errs mism
    errs=$(stat_of errors "$stats")
    mism=$(stat_of mismatches "$stats")
    echo
    echo "== soak summary"
    echo "server:         $([[ $server_died == 0 ]] && echo alive || echo DIED), shutdown on SIGTERM: $STOP_STATUS"
    echo "max RSS:        ${max_rss} kB sampled, ${hwm} kB VmHWM (peak)"
    echo "mean CPU:       $(awk -v s="$cpu_sum" -v n="$samples" 'BEGIN { printf "%.1f", n ? s / n : 0 }') % over $samples samples;" \
        "total $(awk -v t="$total_ticks" -v hz="$TCK" 'BEGIN { printf "%.1f", t / hz }') s CPU"
    echo "server fds:     $final_fds after the client exited, $fds_start at start"
    echo "client:         exit $client_rc; $(cat "$WORK/client.out" 2>/dev/null)"
    echo "errors:         $errs (wrong replies: $mism)"
    if [[ -s "$WORK/client.err" ]]; then
        echo "client stderr (first 20 lines):"
        head -20 "$WORK/client.err" | sed 's/^/  /'
    fi
    if grep -q "panicked\|\[ERROR\]" "$WORK/server.log"; then
        echo "server log errors:"
        grep "panicked\|\[ERROR\]" "$WORK/server.log" | head -10 | sed 's/^/  /'
    fi
    echo "server warnings: $(grep -c '\[WARNING\]\|\[WARN\]' "$WORK/server.log" || true) (log: $WORK/server.log)"
    local fail=0
    [[ $server_died == 0 ]] || { echo "FAIL: the server died"; fail=1; }
    [[ $mism == 0 ]] || { echo "FAIL: $mism wrong replies"; fail=1; }
    ((errs <= SOAK_MAX_ERRORS)) || { echo "FAIL: $errs client errors (SOAK_MAX_ERRORS=$SOAK_MAX_ERRORS)"; fail=1; }
    [[ "$STOP_STATUS" == "exit 0"* ]] || { echo "FAIL: shutdown: $STOP_STATUS"; fail=1; }
    [[ $fail == 0 ]] && echo "PASS"
    return $fail
}

# --- idle cost ---------------------------------------------------------------
# measure_idle LABEL [--warm]
measure_idle() {
    local label=$1
    shift
    # Default --idle-timeout (300 s), so the idle timers are part of the cost;
    # the connections are held for less than that.
    start_server "$WORK/idle-server.log" --max-connections 20000
    local pid=$SERVER_PID
    sleep 1
    local rss0 fds0
    rss0=$(rss_kb "$pid")
    fds0=$(fd_count "$pid")
    local stats=$WORK/idle-stats
    rm -f "$stats"
    "$CLIENT" --mode idle --ports "$PORTS" --idle "$SOAK_IDLE_N" --secs 120 --stats "$stats" "$@" \
        >"$WORK/idle-client.out" 2>"$WORK/idle-client.err" &
    CLIENT_PID=$!
    local t0
    t0=$(date +%s)
    until [[ $(stat_of ready "$stats") == 1 ]]; do
        (($(date +%s) - t0 < 100)) || { echo "idle client not ready after 100 s" >&2; return 1; }
        kill -0 "$CLIENT_PID" 2>/dev/null || { echo "idle client died" >&2; cat "$WORK/idle-client.err" >&2; return 1; }
        sleep 0.5
    done
    local opened
    opened=$(stat_of idle_open "$stats")
    # Wait until the server has accepted them all, then let it settle.
    until (($(fd_count "$pid") >= fds0 + opened)) || (($(date +%s) - t0 > 110)); do sleep 0.2; done
    sleep 2
    local rss1 fds1 c0 c1 n0 n1
    rss1=$(rss_kb "$pid")
    fds1=$(fd_count "$pid")
    local s0 s1
    c0=$(cpu_ticks "$pid")
    s0=$(cpu_ns "$pid")
    n0=$(now_ns)
    sleep 10
    c1=$(cpu_ticks "$pid")
    s1=$(cpu_ns "$pid")
    n1=$(now_ns)
    local rss2
    rss2=$(rss_kb "$pid")
    kill "$CLIENT_PID" 2>/dev/null || true
    wait "$CLIENT_PID" 2>/dev/null || true
    CLIENT_PID=
    stop_server
    echo "-- $label: $opened idle connections (server fds $fds0 -> $fds1)"
    echo "   RSS before:        $rss0 kB"
    echo "   RSS with idle:     $rss1 kB (after 10 s more: $rss2 kB)"
    echo "   per connection:    $(awk -v a="$rss0" -v b="$rss1" -v n="$opened" 'BEGIN { printf "%.0f", (b - a) * 1024 / n }') bytes"
    echo "   CPU at rest, 10 s: $(awk -v dc=$((c1 - c0)) -v dt=$((n1 - n0)) -v hz="$TCK" 'BEGIN { printf "%.2f", dc / hz / (dt / 1e9) * 100 }') %" \
        "($((c1 - c0)) ticks of 1/${TCK} s; schedstat: $(awk -v d=$((s1 - s0)) 'BEGIN { printf "%.3f", d / 1e6 }') ms of CPU)"
    echo "   client errors:     $(stat_of errors "$stats"); shutdown: $STOP_STATUS"
}

run_idle() {
    echo "== idle cost: ${SOAK_IDLE_N} connections"
    measure_idle "cold (connected, never sent)"
    measure_idle "warm (each sent one line and read the reply first)" --warm
}

status=0
if [[ "$MODE" == soak || "$MODE" == all ]]; then run_soak || status=1; fi
if [[ "$MODE" == idle || "$MODE" == all ]]; then run_idle || status=1; fi
echo "(work files in $WORK)"
exit $status
