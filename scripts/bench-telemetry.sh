#!/usr/bin/env bash
# Telemetry overhead, in one run: two local 3-node clusters (`kiwi playground`) run side by side, one with
# telemetry on, one off, and take the load in turn (the idle one costs a few heartbeats), so that the two
# modes see the same machine within seconds of each other, many times over:
#   - "on":  metrics endpoints on (scraped every second, as Prometheus would) and traces on at the default
#            sampling (telemetry.trace_sample_ratio 0.01) to an OTLP endpoint,
#   - "off": no metrics endpoint, no traces (the scraper still runs and finds the port closed, so the
#            load generator's side of the machine is the same).
# Halfway the clusters are restarted with the modes swapped (cross-over), so a difference between the
# two clusters themselves (data layout, which node leads) counts for "on" half the time and for "off"
# the other half.
#
# Each turn, ROUNDS times per half, the order alternating:
#   - puts and linearizable gets at 64 closed-loop workers (saturation: throughput and p99), and
#   - puts and linearizable gets at a fixed rate (`kiwi bench --rate`, about half of saturation): the
#     nodes' CPU time per operation (all three nodes, from /proc) at the same load in both modes. At
#     saturation CPU per operation moves with throughput (batching), so this is the steady figure.
# Prints every run, then per figure the median of the paired on/off ratios and their range.
#
# The OTLP endpoint is a live receiver by default (`kiwi-otlp-sink`, which accepts every batch and counts
# it), as with a real collector; with OTLP=closed it is a closed loopback port, so every export fails at
# once. Either way this measures the node's side of tracing. At the end it prints the spans the receiver
# got and the CPU it used (it shares the machine with the clusters under test).
#
# Environment: DURATION (per run, default 3s), ROUNDS (per half, default 8), PUT_RATE and GET_RATE (ops/s
# of the fixed-rate runs, default 4000 and 6000), WORKLOADS (default "put get"), TRACE_RATIO (the "on"
# sampling, default 0.01), TRACING (1: "on" exports traces, the default; 0: metrics only), SCRAPE (1:
# scrape every second, the default; 0: do not), OTLP (sink, the default, or closed: see above), AA (1: an
# A/A check, both clusters run with telemetry off, to show the method's own bias and spread), WORK_DIR
# (default a fresh directory under /var/tmp).
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/common.sh

DURATION=${DURATION:-3s}
ROUNDS=${ROUNDS:-8}
PUT_RATE=${PUT_RATE:-4000}
GET_RATE=${GET_RATE:-6000}
WORKLOADS=${WORKLOADS:-put get}
build_kiwi
init_work_dir kiwi-telemetry

# Cluster a on 17691.., b on 18691.. (each node's metrics port is its client port + 100).
declare -A BASE=([a]=17691 [b]=18691) PGS=([a]="" [b]="")
SCRAPER=""
stop() {
    [ -n "$SCRAPER" ] && kill "$SCRAPER" 2>/dev/null || true
    SCRAPER=""
    local c
    for c in a b; do
        [ -n "${PGS[$c]}" ] && { kill -INT "${PGS[$c]}" 2>/dev/null || true; wait "${PGS[$c]}" 2>/dev/null || true; }
        PGS[$c]=""
    done
}
SINK=""
trap 'stop; [ -n "$SINK" ] && kill "$SINK" 2>/dev/null || true' EXIT
if [ "${OTLP:-sink}" = sink ]; then
    "$TARGET_DIR/release/kiwi-otlp-sink" 127.0.0.1:17999 2>"$WORK_DIR/sink.log" &
    SINK=$!
fi

start() { # cluster mode
    local flags=(--no-metrics) port=${BASE[$1]}
    if [ "$2" = on ] && [ "${AA:-0}" != 1 ]; then
        flags=()
        [ "${TRACING:-1}" = 1 ] && flags=(--otlp-endpoint http://127.0.0.1:17999 --trace-sample-ratio "${TRACE_RATIO:-0.01}")
    fi
    "$KIWI" playground --nodes 3 --data-dir "$WORK_DIR/$1" --base-port "$port" --node-bin "$NODE" \
        --no-control "${flags[@]}" >"$WORK_DIR/$1.log" 2>&1 &
    PGS[$1]=$!
    for _ in $(seq 1 120); do grep -q "is up" "$WORK_DIR/$1.log" && break; sleep 0.5; done
    grep -q "is up" "$WORK_DIR/$1.log" || { echo "cluster $1 did not come up; see $WORK_DIR" >&2; exit 1; }
}
endpoints() { # cluster
    local p=${BASE[$1]}
    echo "127.0.0.1:$p,127.0.0.1:$((p + 1)),127.0.0.1:$((p + 2))"
}
scrape() {
    [ "${SCRAPE:-1}" = 1 ] || return 0
    # Every second, every node's /metrics on both clusters (the "off" one refuses the connection).
    (while :; do
        for b in "${BASE[@]}"; do
            for p in $((b + 100)) $((b + 101)) $((b + 102)); do
                curl -s -o /dev/null "http://127.0.0.1:$p/metrics" || true
            done
        done
        sleep 1
    done) &
    SCRAPER=$!
}

# CPU time (clock ticks, user + system) used so far by a cluster's kiwi-node processes.
node_ticks() { # cluster
    local total=0 p
    for p in $(pgrep -f "kiwi-node --config $WORK_DIR/$1/"); do
        set -- $(cut -d' ' -f14,15 "/proc/$p/stat")
        total=$((total + $1 + $2))
    done
    echo "$total"
}
bench() { # cluster mode workload run [rate]
    local label="$3-$2-$4" extra=()
    if [ -n "${5:-}" ]; then
        label="$3@rate-$2-$4"
        extra=(--rate "$5")
    fi
    echo "== $label (cluster $1)" >&2
    local before
    before=$(node_ticks "$1")
    "$KIWI" --endpoints "$(endpoints "$1")" bench --workload "$3" --workers 64 --connections 16 \
        --duration "$DURATION" --no-preload --quiet --label "$label" --json-out "$RESULTS" "${extra[@]}" >/dev/null
    echo "$label $(( $(node_ticks "$1") - before ))" >>"$WORK_DIR/cpu.txt"
}

echo "preloading ..." >&2
for c in a b; do
    start "$c" off
    "$KIWI" --endpoints "$(endpoints "$c")" bench --workload get --workers 32 --duration 1s --quiet >/dev/null
done
stop

run=0
for half in 1 2; do
    # The first half: a on, b off; the second: swapped.
    if [ "$half" = 1 ]; then declare -A MODE=([on]=a [off]=b); else declare -A MODE=([on]=b [off]=a); fi
    start "${MODE[on]}" on
    start "${MODE[off]}" off
    scrape
    for round in $(seq 1 "$ROUNDS"); do
        run=$((run + 1))
        if [ $((round % 2)) = 1 ]; then order="on off"; else order="off on"; fi
        for w in $WORKLOADS; do
            for m in $order; do bench "${MODE[$m]}" "$m" "$w" "$run"; done
        done
        for w in $WORKLOADS; do
            rate=$PUT_RATE
            [ "$w" = get ] && rate=$GET_RATE
            for m in $order; do bench "${MODE[$m]}" "$m" "$w" "$run" "$rate"; done
        done
    done
    stop
done
# What the receiver cost the machine (it shares the cores with the clusters under test).
if [ -n "$SINK" ]; then
    set -- $(cut -d' ' -f14,15 "/proc/$SINK/stat")
    echo "the OTLP receiver: $(tail -n 1 "$WORK_DIR/sink.log" 2>/dev/null || echo "no spans"), $(( ($1 + $2) * 1000 / $(getconf CLK_TCK) )) ms of CPU in all" >&2
fi

python3 - "$RESULTS" "$run" "$WORK_DIR/cpu.txt" "$(getconf CLK_TCK)" "$WORKLOADS" <<'PY'
import json, statistics, sys
r = {j["label"]: j for j in map(json.loads, open(sys.argv[1]))}
workloads = sys.argv[5].split()
rounds = range(1, int(sys.argv[2]) + 1)
hz = int(sys.argv[4])
for line in open(sys.argv[3]):
    label, ticks = line.split()
    j = r[label]
    # Node CPU, all three nodes: in all, and per operation.
    j["cpu_us"] = int(ticks) / hz * 1e6
    j["cpu_us_per_op"] = j["cpu_us"] / max(1, j["ops"])
print(f"\n{'run':<18} {'ops/s':>9} {'p50 ms':>8} {'p99 ms':>8} {'node CPU us/op':>15}   errors")
for w in workloads + [w + "@rate" for w in workloads]:
    for i in rounds:
        for m in ["on", "off"]:
            j = r[f"{w}-{m}-{i}"]
            print(f"{w}-{m}-{i:<{14 - len(w)}} {j['ops_per_sec']:>9.0f} {j['p50_us']/1000:>8.2f} {j['p99_us']/1000:>8.2f} "
                  f"{j['cpu_us_per_op']:>15.1f}   {sum(j['errors'].values())}")
print(f"\non/off: the median of the {len(rounds)} paired ratios [lowest, highest]")
def ratio(w, f):
    rs = [r[f"{w}-on-{i}"][f] / r[f"{w}-off-{i}"][f] for i in rounds]
    out = f"{statistics.median(rs):.3f} [{min(rs):.3f}, {max(rs):.3f}]"
    if f in ("ops_per_sec", "cpu_us_per_op"):
        # Pooled over every pair: all operations (and all node CPU) on, over all off.
        total = lambda m, k: sum(r[f"{w}-{m}-{i}"][k] for i in rounds)
        pooled = total("on", "ops") / total("off", "ops")
        if f == "cpu_us_per_op":
            pooled = total("on", "cpu_us") / total("off", "cpu_us") / pooled
        out += f" pooled {pooled:.3f}"
    return out
for w, what in [("put", "put, 64 workers"), ("get", "linearizable get, 64 workers")]:
    if w not in workloads:
        continue
    print(f"  {what:<38} throughput {ratio(w, 'ops_per_sec')}   p99 {ratio(w, 'p99_us')}")
for w, what in [("put@rate", "put"), ("get@rate", "linearizable get")]:
    if w.removesuffix("@rate") not in workloads:
        continue
    ops = statistics.median(r[f"{w}-off-{i}"]["ops_per_sec"] for i in rounds)
    print(f"  {what + f' at {ops:.0f} ops/s':<38} node CPU per op {ratio(w, 'cpu_us_per_op')}   p99 {ratio(w, 'p99_us')}")
PY
