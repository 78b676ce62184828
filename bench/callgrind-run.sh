# Shared by bench/callgrind-observe.sh and bench/callgrind-compare.sh (source
# it; it runs nothing by itself). Needs OUT, BENCH and valgrind.
#
# cg_run TAG BINARY MODE SECONDS [SERVER ARGS...]: starts BINARY --listen
# 127.0.0.1:0 SERVER ARGS under callgrind, drives it with MODE (lines C=64
# P=16 size 64, churn C=16 size 64, or idle: no load) for SECONDS, stops it
# by its PID, and prints "Ir ops" (ops = the lines or connections the load
# generator counted; 1 for idle). Only loopback is targeted.
#
# Two knobs for bench/callgrind-page.sh: CG_WORKERS=1 counts each thread
# apart (--separate-threads=yes) and prints a third figure, the Ir of the
# worker threads alone (those that ran EventLoop::run); CG_POLL=1 runs
# bench/status-poller.py against the server's metrics address during the
# load (the status page's requests, once a second).
# cg_defaults SCRIPT: the knobs of a callgrind script (REPS, SECS, MODES)
# with their defaults, XPS and BENCH, OUT created; valgrind required.
cg_defaults() {
    REPS=${REPS:-3}
    SECS=${SECS:-4}
    MODES=${MODES:-lines churn}
    XPS=target/release/xps
    BENCH=target/release/xps-bench
    mkdir -p "$OUT"
    command -v valgrind >/dev/null || { echo "$1: valgrind is required" >&2; exit 1; }
}

cg_run() {
    local tag=$1 bin=$2 mode=$3 secs=$4
    shift 4
    rm -f "$OUT/cg.$tag.out" "$OUT/cg.$tag.out"-*
    local threads=()
    [ -n "${CG_WORKERS:-}" ] && threads=(--separate-threads=yes)
    valgrind --tool=callgrind --callgrind-out-file="$OUT/cg.$tag.out" "${threads[@]}" \
        --log-file="$OUT/vg.$tag.log" \
        "$bin" --listen 127.0.0.1:0 "$@" 2>"$OUT/err.$tag.log" &
    local pid=$! port=""
    for _ in $(seq 1 300); do
        port=$(sed -n 's/.*listening on port \([0-9]*\).*/\1/p' "$OUT/err.$tag.log" 2>/dev/null | head -n1 || true)
        [ -n "$port" ] && break
        sleep 0.1
    done
    [ -n "$port" ] || { kill -TERM "$pid"; echo "no port for $tag" >&2; exit 1; }
    local args=(--conns 16 --size 64) key=connections ops=1
    [ "$mode" = lines ] && { args=(--conns 64 --pipeline 16 --size 64); key=lines; }
    local poller=""
    if [ -n "${CG_POLL:-}" ]; then
        local mport
        mport=$(sed -n 's/.*metrics on http:\/\/127\.0\.0\.1:\([0-9]*\).*/\1/p' "$OUT/err.$tag.log" | head -n1)
        python3 bench/status-poller.py "$mport" "$secs" >"$OUT/poll.$tag.log" 2>&1 &
        poller=$!
    fi
    if [ "$mode" = idle ]; then
        sleep "$secs"
    else
        "$BENCH" "$mode" --addr "127.0.0.1:$port" "${args[@]}" --duration "$secs" --warmup 0 \
            >"$OUT/bench.$tag.json"
        ops=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))[sys.argv[2]])' \
            "$OUT/bench.$tag.json" "$key")
    fi
    [ -n "$poller" ] && { wait "$poller" || true; }
    kill -TERM "$pid"
    wait "$pid" || true
    local ir
    if [ -n "${CG_WORKERS:-}" ]; then
        local f t all=0 workers=0
        for f in "$OUT/cg.$tag.out"-*; do
            t=$(sed -n 's/^totals: *\([0-9]*\).*/\1/p' "$f" | tail -n1)
            [ -n "$t" ] || t=$(sed -n 's/^summary: *\([0-9]*\).*/\1/p' "$f" | tail -n1)
            all=$((all + ${t:-0}))
            grep -q 'event_loop::EventLoop::run' "$f" && workers=$((workers + ${t:-0}))
        done
        echo "$all $ops $workers"
        return
    fi
    ir=$(sed -n 's/^totals: *\([0-9]*\).*/\1/p' "$OUT/cg.$tag.out" | tail -n1)
    [ -n "$ir" ] || ir=$(sed -n 's/^summary: *\([0-9]*\).*/\1/p' "$OUT/cg.$tag.out" | tail -n1)
    echo "$ir $ops"
}
