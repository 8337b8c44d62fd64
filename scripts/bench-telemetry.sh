#!/usr/bin/env bash
# Telemetry overhead, in one run, on one local 3-node cluster (`kiwi playground`) restarted on the same data
# for every run, alternately
#   - "on":  metrics endpoints on (scraped every second, as Prometheus would) and traces on at the default
#            sampling (telemetry.trace_sample_ratio 0.01) to an OTLP endpoint,
#   - "off": no metrics endpoint, no traces,
# so the two modes differ in nothing but telemetry (two clusters side by side differ by their data and
# leader placement by more than the budget). ROUNDS rounds, the order alternating per round: puts and
# linearizable gets at 64 workers. Prints every run (with the nodes' CPU time per operation, read from
# /proc: steadier than throughput on a shared machine), then the medians and the on/off ratios.
#
# The OTLP endpoint is a closed loopback port: spans are created, sampled, batched and their export is
# attempted (and fails at once), so this measures the node's side of tracing, not a collector's.
#
# Environment: DURATION (per run, default 10s), ROUNDS (default 3), TRACE_RATIO (the "on" sampling,
# default 0.01), TRACING (1: "on" exports traces, the default; 0: metrics only), SCRAPE (1: scrape the
# "on" cluster every second, the default; 0: do not), WORK_DIR (default a fresh directory under /var/tmp).
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/common.sh

DURATION=${DURATION:-10s}
ROUNDS=${ROUNDS:-3}
build_kiwi
init_work_dir kiwi-telemetry

PORT=17691
PG=""
SCRAPER=""
stop() {
    [ -n "$SCRAPER" ] && kill "$SCRAPER" 2>/dev/null || true
    SCRAPER=""
    [ -n "$PG" ] && { kill -INT "$PG" 2>/dev/null || true; wait "$PG" 2>/dev/null || true; }
    PG=""
}
trap stop EXIT

start() { # mode
    local flags=(--no-metrics)
    if [ "$1" = on ]; then
        flags=()
        [ "${TRACING:-1}" = 1 ] && flags=(--otlp-endpoint http://127.0.0.1:17999 --trace-sample-ratio "${TRACE_RATIO:-0.01}")
    fi
    : >"$WORK_DIR/cluster.log"
    "$KIWI" playground --nodes 3 --data-dir "$WORK_DIR/cluster" --base-port "$PORT" --node-bin "$NODE" \
        --no-control "${flags[@]}" >>"$WORK_DIR/cluster.log" 2>&1 &
    PG=$!
    for _ in $(seq 1 120); do grep -q "is up" "$WORK_DIR/cluster.log" && break; sleep 0.5; done
    grep -q "is up" "$WORK_DIR/cluster.log" || { echo "cluster did not come up; see $WORK_DIR" >&2; exit 1; }
    if [ "$1" = on ] && [ "${SCRAPE:-1}" = 1 ]; then
        # Scrape the three nodes every second, all families, while the cluster runs.
        (while :; do
            for p in $((PORT + 100)) $((PORT + 101)) $((PORT + 102)); do
                curl -s -o /dev/null "http://127.0.0.1:$p/metrics" || true
            done
            sleep 1
        done) &
        SCRAPER=$!
    fi
}
ENDPOINTS="127.0.0.1:$PORT,127.0.0.1:$((PORT + 1)),127.0.0.1:$((PORT + 2))"

start off
echo "preloading ..." >&2
"$KIWI" --endpoints "$ENDPOINTS" bench --workload get --workers 32 --duration 1s --quiet >/dev/null
stop

# CPU time (clock ticks, user + system) used so far by the cluster's kiwi-node processes.
node_ticks() {
    local total=0 p
    for p in $(pgrep -f "kiwi-node --config $WORK_DIR/cluster/"); do
        set -- $(cut -d' ' -f14,15 "/proc/$p/stat")
        total=$((total + $1 + $2))
    done
    echo "$total"
}
bench() { # mode workload round
    echo "== $2, telemetry $1, round $3" >&2
    local before
    before=$(node_ticks)
    "$KIWI" --endpoints "$ENDPOINTS" bench --workload "$2" --workers 64 --connections 16 \
        --duration "$DURATION" --no-preload --quiet --label "$2-$1-$3" --json-out "$RESULTS" >/dev/null
    echo "$2-$1-$3 $(( $(node_ticks) - before ))" >>"$WORK_DIR/cpu.txt"
}
for round in $(seq 1 "$ROUNDS"); do
    # Alternate which mode goes first.
    if [ $((round % 2)) = 1 ]; then order="on off"; else order="off on"; fi
    for m in $order; do
        start "$m"
        for w in put get; do bench "$m" "$w" "$round"; done
        stop
    done
done

python3 - "$RESULTS" "$ROUNDS" "$WORK_DIR/cpu.txt" "$(getconf CLK_TCK)" <<'PY'
import json, statistics, sys
r = {j["label"]: j for j in map(json.loads, open(sys.argv[1]))}
rounds = range(1, int(sys.argv[2]) + 1)
hz = int(sys.argv[4])
for line in open(sys.argv[3]):
    label, ticks = line.split()
    j = r[label]
    # Node CPU per operation, all three nodes: steadier than throughput on a shared machine.
    j["cpu_us_per_op"] = int(ticks) / hz * 1e6 / max(1, j["ops"])
print(f"\n{'run':<14} {'ops/s':>9} {'p50 ms':>8} {'p99 ms':>8} {'node CPU us/op':>15}   errors")
for w in ["put", "get"]:
    for i in rounds:
        for m in ["on", "off"]:
            j = r[f"{w}-{m}-{i}"]
            print(f"{w}-{m}-{i:<8} {j['ops_per_sec']:>9.0f} {j['p50_us']/1000:>8.2f} {j['p99_us']/1000:>8.2f} "
                  f"{j['cpu_us_per_op']:>15.1f}   {sum(j['errors'].values())}")
print()
for w, what in [("put", "put"), ("get", "linearizable get")]:
    med = lambda m, f: statistics.median(r[f"{w}-{m}-{i}"][f] for i in rounds)
    print(f"{what:<17} median ops/s on {med('on', 'ops_per_sec'):.0f} off {med('off', 'ops_per_sec'):.0f} "
          f"(on/off {med('on', 'ops_per_sec')/med('off', 'ops_per_sec'):.3f}); median p99 on {med('on', 'p99_us')/1000:.2f} ms "
          f"off {med('off', 'p99_us')/1000:.2f} ms (on/off {med('on', 'p99_us')/med('off', 'p99_us'):.3f}); "
          f"median node CPU/op on {med('on', 'cpu_us_per_op'):.1f} us off {med('off', 'cpu_us_per_op'):.1f} us "
          f"(on/off {med('on', 'cpu_us_per_op')/med('off', 'cpu_us_per_op'):.3f})")
PY
