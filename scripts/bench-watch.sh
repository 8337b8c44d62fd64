#!/usr/bin/env bash
# The cost of watches: a 3-node playground takes puts at a fixed rate (RATE, default 5000/s, 64 workers
# at most in flight) with no watcher and with WATCHERS (default 1000) watches on one node, each on its own
# slice of the 20,000-key space (every put is delivered once), ROUNDS times each (default 2), alternating. Per row: puts/s and put p99, watch events
# delivered against expected, delivery latency (put sent to event received) p50/p99/p999, and the three
# nodes' CPU time per put (from /proc), so the watchers' cost is read at the same load.
#
#   make bench-watch            (or: RATE=2000 WATCHERS=100 scripts/bench-watch.sh)
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/common.sh

ROUNDS=${ROUNDS:-2}
RATE=${RATE:-5000}
WATCHERS=${WATCHERS:-1000}
DURATION=${DURATION:-10s}
build_kiwi
init_work_dir kiwi-bench-watch
trap stop_playground EXIT
echo "results in $WORK_DIR" >&2

for round in $(seq 1 "$ROUNDS"); do
    if [ $((round % 2)) = 1 ]; then order="0 $WATCHERS"; else order="$WATCHERS 0"; fi
    for w in $order; do
        echo "== round $round: $w watchers" >&2
        start_playground cluster 19691
        before=$(node_cpu_ticks cluster)
        "$KIWI" bench --workload put --rate "$RATE" --workers 64 --connections 16 --duration "$DURATION" \
            --watchers "$w" --no-preload --quiet --label "w$w-$round" --json-out "$RESULTS" >/dev/null
        echo "w$w-$round $(( $(node_cpu_ticks cluster) - before ))" >>"$WORK_DIR/cpu.txt"
        stop_playground
        rm -rf "$WORK_DIR/cluster"
    done
done

python3 - "$RESULTS" "$WORK_DIR/cpu.txt" "$(getconf CLK_TCK)" <<'PY'
import json, sys
rows = {j["label"]: j for j in map(json.loads, open(sys.argv[1]))}
for line in open(sys.argv[2]):
    label, ticks = line.split()
    rows[label]["cpu_us_per_put"] = int(ticks) / int(sys.argv[3]) * 1e6 / max(1, rows[label]["ops"])
print(f"\n{'run':<10} {'puts/s':>8} {'put p99 ms':>10} {'events':>10} {'expected':>10} "
      f"{'watch p50 ms':>12} {'p99 ms':>8} {'p999 ms':>8} {'node CPU us/put':>16}")
for label, j in sorted(rows.items()):
    w = j.get("watch") or {}
    ms = lambda k: f"{w[k] / 1000:.2f}" if k in w else "-"
    print(f"{label:<10} {j['ops_per_sec']:>8.0f} {j['p99_us'] / 1000:>10.2f} {w.get('events', '-'):>10} "
          f"{w.get('expected', '-'):>10} {ms('p50_us'):>12} {ms('p99_us'):>8} {ms('p999_us'):>8} "
          f"{j['cpu_us_per_put']:>16.1f}")
PY
