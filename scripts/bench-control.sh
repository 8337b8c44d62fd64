#!/usr/bin/env bash
# The control plane's figures, in one run:
#   1. push latency: a 3-node playground with its control plane; `kiwi control bench push` sets the policy
#      REPS times (default 100) and times each from SetPolicy returning to the last node's acknowledgement;
#   2. its cost on the data path: the same playground restarted on the same data with the control plane
#      (every node heartbeating at 1 s) and without it (--no-control), alternately, ROUNDS rounds (default
#      7: single rounds vary by about 5 %) of puts at 64 workers for DURATION (default 10s); throughput, p99 and the nodes' CPU per op;
#   3. the control plane dying mid-run: a 20 s put run with a per-second timeline, kiwi-control SIGKILLed at
#      10 s; ops/s over the seconds before and after;
#   4. its scale: a standalone kiwi-control fed by FLEET simulated nodes (default 200) heartbeating at 1 s
#      for FLEET_DURATION (default 30s): its CPU and memory, and the ClusterStatus latency meanwhile.
# Results and logs stay in WORK_DIR (default a fresh directory under /var/tmp).
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/common.sh

DURATION=${DURATION:-10s}
ROUNDS=${ROUNDS:-7}
REPS=${REPS:-100}
FLEET=${FLEET:-200}
FLEET_DURATION=${FLEET_DURATION:-30s}
CONTROL=$TARGET_DIR/release/kiwi-control
build_kiwi
[ -x "$CONTROL" ] || cargo build --release -j2 --workspace --bins
init_work_dir kiwi-control-bench

PORT=17791
CONTROL_ADDR=127.0.0.1:$((PORT + 200))
ENDPOINTS="127.0.0.1:$PORT,127.0.0.1:$((PORT + 1)),127.0.0.1:$((PORT + 2))"
PG=""
FLEET_CP=""
stop() {
    [ -n "$PG" ] && { kill -INT "$PG" 2>/dev/null || true; wait "$PG" 2>/dev/null || true; }
    PG=""
    [ -n "$FLEET_CP" ] && { kill "$FLEET_CP" 2>/dev/null || true; wait "$FLEET_CP" 2>/dev/null || true; }
    FLEET_CP=""
}
trap stop EXIT

start() { # with|without
    local flags=()
    [ "$1" = without ] && flags=(--no-control)
    : >"$WORK_DIR/cluster.log"
    "$KIWI" playground --nodes 3 --data-dir "$WORK_DIR/cluster" --base-port "$PORT" --node-bin "$NODE" \
        --control-bin "$CONTROL" --no-metrics "${flags[@]}" >>"$WORK_DIR/cluster.log" 2>&1 &
    PG=$!
    for _ in $(seq 1 120); do grep -q "is up" "$WORK_DIR/cluster.log" && break; sleep 0.5; done
    grep -q "is up" "$WORK_DIR/cluster.log" || { echo "cluster did not come up; see $WORK_DIR" >&2; exit 1; }
    if [ "$1" = with ]; then
        # Every node linked before measuring.
        for _ in $(seq 1 100); do
            "$KIWI" control --control "$CONTROL_ADDR" status --json 2>/dev/null \
                | python3 -c 'import json,sys; v=json.load(sys.stdin); sys.exit(0 if sum(n["up"] for n in v["nodes"])==3 else 1)' \
                && break
            sleep 0.2
        done
    fi
}

node_ticks() {
    local total=0 p
    for p in $(pgrep -f "kiwi-node --config $WORK_DIR/cluster/"); do
        set -- $(cut -d' ' -f14,15 "/proc/$p/stat")
        total=$((total + $1 + $2))
    done
    echo "$total"
}

echo "== 1. push latency ($REPS repetitions)" >&2
start with
"$KIWI" --endpoints "$ENDPOINTS" bench --workload get --workers 32 --duration 1s --quiet >/dev/null
"$KIWI" control --control "$CONTROL_ADDR" bench push --repetitions "$REPS" | tee -a "$WORK_DIR/push.txt"
stop

echo "== 2. put throughput with and without the control plane ($ROUNDS rounds)" >&2
for round in $(seq 1 "$ROUNDS"); do
    if [ $((round % 2)) = 1 ]; then order="with without"; else order="without with"; fi
    for m in $order; do
        start "$m"
        before=$(node_ticks)
        "$KIWI" --endpoints "$ENDPOINTS" bench --workload put --workers 64 --connections 16 \
            --duration "$DURATION" --no-preload --quiet --label "put-$m-$round" --json-out "$RESULTS" >/dev/null
        echo "put-$m-$round $(( $(node_ticks) - before ))" >>"$WORK_DIR/cpu.txt"
        stop
    done
done

echo "== 3. kiwi-control SIGKILLed 10 s into a 20 s put run" >&2
start with
"$KIWI" --endpoints "$ENDPOINTS" bench --workload put --ramp 64:20s --connections 16 --no-preload --quiet \
    --label dip --json-out "$RESULTS" >/dev/null 2>"$WORK_DIR/dip.log" &
BENCH=$!
sleep 10
pkill -9 -f "kiwi-control --listen-addr $CONTROL_ADDR" || { echo "kiwi-control not found" >&2; exit 1; }
wait "$BENCH"
stop

echo "== 4. one kiwi-control, $FLEET simulated nodes at 1 s, $FLEET_DURATION" >&2
rm -rf "$WORK_DIR/fleet-control"
"$CONTROL" --listen-addr 127.0.0.1:$((PORT + 300)) --data-dir "$WORK_DIR/fleet-control" \
    >"$WORK_DIR/fleet-control.log" 2>&1 &
FLEET_CP=$!
sleep 1
"$KIWI" control --control 127.0.0.1:$((PORT + 300)) bench fleet --nodes "$FLEET" --interval 1s \
    --duration "$FLEET_DURATION" --control-pid "$FLEET_CP" | tee -a "$WORK_DIR/fleet.txt"
stop

python3 - "$RESULTS" "$ROUNDS" "$WORK_DIR/cpu.txt" "$(getconf CLK_TCK)" <<'PY'
import json, statistics, sys
r = {j["label"]: j for j in map(json.loads, open(sys.argv[1]))}
rounds = range(1, int(sys.argv[2]) + 1)
hz = int(sys.argv[4])
for line in open(sys.argv[3]):
    label, ticks = line.split()
    r[label]["cpu_us_per_op"] = int(ticks) / hz * 1e6 / max(1, r[label]["ops"])
print(f"\n{'run':<16} {'ops/s':>9} {'p99 ms':>8} {'node CPU us/op':>15}   errors")
for i in rounds:
    for m in ["with", "without"]:
        j = r[f"put-{m}-{i}"]
        print(f"put-{m}-{i:<8} {j['ops_per_sec']:>9.0f} {j['p99_us']/1000:>8.2f} {j['cpu_us_per_op']:>15.1f}   "
              f"{sum(j['errors'].values())}")
med = lambda m, f: statistics.median(r[f"put-{m}-{i}"][f] for i in rounds)
print(f"\nput, control plane attached vs not: median ops/s {med('with', 'ops_per_sec'):.0f} vs "
      f"{med('without', 'ops_per_sec'):.0f} (ratio {med('with', 'ops_per_sec')/med('without', 'ops_per_sec'):.3f}); "
      f"p99 ratio {med('with', 'p99_us')/med('without', 'p99_us'):.3f}; node CPU/op ratio "
      f"{med('with', 'cpu_us_per_op')/med('without', 'cpu_us_per_op'):.3f}")
d = r["dip"]
tl = d.get("timeline", [])
before = [t["ops_per_sec"] for t in tl if 2 <= t["t_s"] <= 10]
after = [t["ops_per_sec"] for t in tl if 11 <= t["t_s"] <= 19]
print(f"\nkiwi-control killed at 10 s: ops/s per second {[round(t['ops_per_sec']) for t in tl]}")
if before and after:
    print(f"mean ops/s seconds 2-10 {statistics.mean(before):.0f}, seconds 11-19 {statistics.mean(after):.0f} "
          f"(after/before {statistics.mean(after)/statistics.mean(before):.3f}); lowest second after the kill "
          f"{min(after):.0f}; errors {sum(d['errors'].values())}")
PY
