# Shared by bench/callgrind-observe.sh and bench/callgrind-compare.sh (source
# it; it runs nothing by itself). Needs OUT, BENCH and valgrind.
#
# cg_run TAG BINARY MODE SECONDS [SERVER ARGS...]: starts BINARY --listen
# 127.0.0.1:0 SERVER ARGS under callgrind, drives it with MODE (lines C=64
# P=16 size 64, churn C=16 size 64, or idle: no load) for SECONDS, stops it
# by its PID, and prints "Ir ops" (ops = the lines or connections the load
# generator counted; 1 for idle). Only loopback is targeted.
cg_run() {
    local tag=$1 bin=$2 mode=$3 secs=$4
    shift 4
    rm -f "$OUT/cg.$tag.out"
    valgrind --tool=callgrind --callgrind-out-file="$OUT/cg.$tag.out" \
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
    if [ "$mode" = idle ]; then
        sleep "$secs"
    else
        "$BENCH" "$mode" --addr "127.0.0.1:$port" "${args[@]}" --duration "$secs" --warmup 0 \
            >"$OUT/bench.$tag.json"
        ops=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))[sys.argv[2]])' \
            "$OUT/bench.$tag.json" "$key")
    fi
    kill -TERM "$pid"
    wait "$pid" || true
    local ir
    ir=$(sed -n 's/^totals: *\([0-9]*\).*/\1/p' "$OUT/cg.$tag.out" | tail -n1)
    [ -n "$ir" ] || ir=$(sed -n 's/^summary: *\([0-9]*\).*/\1/p' "$OUT/cg.$tag.out" | tail -n1)
    echo "$ir $ops"
}
