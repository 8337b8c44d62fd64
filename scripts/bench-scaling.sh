#!/usr/bin/env bash
# Storage pool scaling under a burst, in one run on one local 3-node cluster (`kiwi playground`).
#
# After a 10 s warm-up at 64 workers (a cold node is slower, whatever its pool), the same load ramp twice:
# keys-only scans of SCAN_LIMIT keys (serializable, so the storage work is on the node the client talks
# to), 1 worker for 5 s, a burst of 64 workers for BURST, then 1 worker for 60 s.
#   1. the pool fixed at its maximum (scaling off, 32-32), the baseline the burst's throughput is compared
#      to (its last phase is cut to 5 s: nothing to wait for);
#   2. scaling on (the default policy: 4-32 threads, evaluated every second), from the minimum.
# Prints each run's per-second timeline (active workers, ops/s, each node's pool size) and scale events, then
# the verdicts: how long after the burst began the pool reached its peak size (in evaluation intervals),
# burst throughput against the fixed pool, and how long after the burst it was back at its minimum.
#
# Environment: BURST (default 20s), SCAN_LIMIT (default 1000), WORK_DIR (default a fresh directory under
# /var/tmp).
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/common.sh

BURST=${BURST:-20s}
SCAN_LIMIT=${SCAN_LIMIT:-1000}
build_kiwi
init_work_dir kiwi-scaling
trap stop_playground EXIT
start_playground kiwi 17591

echo "preloading ..." >&2
"$KIWI" bench --workload get --workers 32 --duration 1s --quiet >/dev/null
"$KIWI" runtime --json >"$WORK_DIR/policy.json"

ramp() { # label ramp
    echo "== $1: ramp $2" >&2
    "$KIWI" --consistency serializable bench --workload scan --scan-limit "$SCAN_LIMIT" --connections 16 \
        --ramp "$2" --no-preload --quiet --label "$1" --json-out "$RESULTS" >/dev/null
}

MIN=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["nodes"][0]["scaling"]["min_storage_threads"])' "$WORK_DIR/policy.json")
echo "== warm-up: 64 workers for 10 s" >&2
"$KIWI" --consistency serializable bench --workload scan --scan-limit "$SCAN_LIMIT" --connections 16 \
    --workers 64 --duration 10s --no-preload --quiet >/dev/null
"$KIWI" runtime --set-scaling off --set-storage-threads 32-32 >/dev/null
ramp fixed-max "1:5s,64:$BURST,1:5s"
# Back to the minimum at once (bounds MIN-MIN), then the default policy.
"$KIWI" runtime --set-storage-threads "$MIN-$MIN" >/dev/null
at_min() {
    "$KIWI" runtime --json | python3 -c 'import json,sys; m=int(sys.argv[1]); sys.exit(0 if all(n["pool"]["current"] == m for n in json.load(sys.stdin)["nodes"]) else 1)' "$MIN"
}
for _ in $(seq 1 40); do at_min && break; sleep 0.25; done
at_min || { echo "the pools did not come back to $MIN threads" >&2; exit 1; }
"$KIWI" runtime --set-scaling on --set-storage-threads "$MIN-32" >/dev/null
ramp scaling "1:5s,64:$BURST,1:60s"

python3 - "$RESULTS" "$WORK_DIR/policy.json" <<'PY'
import json, sys
runs = {j["label"]: j for j in map(json.loads, open(sys.argv[1]))}
policy = json.load(open(sys.argv[2]))["nodes"][0]["scaling"]
interval = policy["evaluation_interval_ms"] / 1000
lo = policy["min_storage_threads"]
s, f = runs["scaling"], runs["fixed-max"]
burst_start = s["phases"][0]["duration_s"]
burst_end = burst_start + s["phases"][1]["duration_s"]
# The node doing the work is the one whose pool moved.
events = s["scale_events"]
nodes = sorted({e["node"] for e in events})
print(f"\npolicy: {lo}-{policy['max_storage_threads']} threads, up > {policy['scale_up_threshold']}%, "
      f"down < {policy['scale_down_threshold']}%, +/-{policy['scale_increment']}, every {interval:.1f} s")
for node in nodes or ["(no scale events)"]:
    ev = [e for e in events if e["node"] == node]
    during = [e for e in ev if burst_start <= e["t_s"] <= burst_end]
    peak = max([lo] + [e["to"] for e in during])
    reached = next((e["t_s"] for e in during if e["to"] == peak), None)
    back = next((e["t_s"] for e in ev if e["t_s"] > burst_end and e["to"] == lo), None)
    print(f"{node}:")
    if during:
        first = during[0]
        print(f"  first growth ({first['from']} -> {first['to']}) {first['t_s'] - burst_start:.1f} s after the burst "
              f"began ({(first['t_s'] - burst_start) / interval:.1f} evaluation intervals)")
    if reached is not None:
        print(f"  peak {peak} threads reached {reached - burst_start:.1f} s after the burst began "
              f"({(reached - burst_start) / interval:.1f} evaluation intervals)")
    else:
        print(f"  the pool did not grow during the burst")
    if back is not None:
        print(f"  back at {lo} threads {back - burst_end:.1f} s after the burst ended")
    elif peak > lo:
        print(f"  NOT back at {lo} threads within {s['phases'][2]['duration_s']:.0f} s after the burst")
b_s, b_f = s["phases"][1]["ops_per_sec"], f["phases"][1]["ops_per_sec"]
q_s, q_f = s["phases"][0]["ops_per_sec"], f["phases"][0]["ops_per_sec"]
print(f"(1-worker phase before the burst, where the pool size does not matter: scaling run {q_s:.0f}, "
      f"fixed run {q_f:.0f} ops/s = {q_s / q_f:.2f}: the noise between the two runs)")
print(f"burst throughput: scaling {b_s:.0f} ops/s, fixed at max {b_f:.0f} ops/s = {b_s / b_f:.2f} of the fixed pool")
print(f"errors: scaling {s['errors']}, fixed {f['errors']}")
PY
