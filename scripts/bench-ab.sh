#!/usr/bin/env bash
# A/B of two kiwi-node binaries, in one run: a 3-node `kiwi playground` is started with binary A, loaded,
# stopped, then the same with binary B, and so on for ROUNDS rounds, the order alternating (A B, B A, ...)
# so that warm-up and drift favour neither. Each round runs every workload at every worker count on a fresh
# data directory. Prints every run, then per row the two binaries' throughput over all rounds, the ratio
# B/A, the median p50 and p99, the three nodes' CPU per operation (user + system, microseconds; what is
# left of the machine is the load generator's, so a row can be CPU-bound) and the p999 of every round.
#
# Use it to measure one change: build before and after, copy each kiwi-node aside, and compare them.
# Run one binary against itself first (A=B) to see this machine's noise: on the 2-core development box,
# means of 3 rounds of the same binary differed by up to 10 %.
#
#   A=/var/tmp/kiwi-node-before B=/var/tmp/kiwi-node-after scripts/bench-ab.sh
#
# Environment: A and B (the two kiwi-node binaries, required), ROUNDS (default 4), DURATION (per run,
# default 4s), WORKLOADS (default "put get"), WORKERS (default "1 16 64"), WORK_DIR (default a fresh
# directory under /var/tmp), PLAYGROUND_FLAGS (passed to `kiwi playground`, e.g. --lease-reads). The load
# generator is this build's release `kiwi`.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/common.sh

: "${A:?set A to the first kiwi-node binary}"
: "${B:?set B to the second kiwi-node binary}"
for bin in "$A" "$B"; do
    [ -x "$bin" ] || { echo "$bin: not an executable kiwi-node" >&2; exit 2; }
done
ROUNDS=${ROUNDS:-4}
DURATION=${DURATION:-4s}
WORKLOADS=${WORKLOADS:-put get}
WORKERS=${WORKERS:-1 16 64}
build_kiwi
init_work_dir kiwi-ab
trap stop_playground EXIT

declare -A BIN=([a]="$A" [b]="$B")
for round in $(seq 1 "$ROUNDS"); do
    if [ $((round % 2)) = 1 ]; then order="a b"; else order="b a"; fi
    for m in $order; do
        echo "== round $round of $ROUNDS: $m (${BIN[$m]})" >&2
        rm -rf "${WORK_DIR:?}/cluster"
        NODE=${BIN[$m]} start_playground cluster 19591
        preloaded=""
        for w in $WORKLOADS; do
            if [ "$w" != put ] && [ -z "$preloaded" ]; then
                # The key space, once per cluster, outside the measured runs (their CPU is per operation).
                "$KIWI" bench --workload get --workers 16 --connections 16 --duration 1s --quiet >/dev/null
                preloaded=1
            fi
            for n in $WORKERS; do
                before=$(node_cpu_ticks cluster)
                "$KIWI" bench --workload "$w" --workers "$n" --connections 16 --duration "$DURATION" --quiet \
                    --no-preload --label "$m-$w-$n-$round" --json-out "$RESULTS" >/dev/null
                echo "{\"label\": \"$m-$w-$n-$round\", \"ticks\": $(($(node_cpu_ticks cluster) - before))}" >>"$WORK_DIR/cpu.jsonl"
            done
        done
        stop_playground
    done
done

python3 - "$RESULTS" "$ROUNDS" "$WORKLOADS" "$WORKERS" "$WORK_DIR/cpu.jsonl" "$(getconf CLK_TCK)" <<'PY'
import json, statistics, sys
r = {j["label"]: j for j in map(json.loads, open(sys.argv[1]))}
ticks = {j["label"]: j["ticks"] for j in map(json.loads, open(sys.argv[5]))}
hz = int(sys.argv[6])
rounds = range(1, int(sys.argv[2]) + 1)
print(f"\n{'row':<10} {'A ops/s':>9} {'B ops/s':>9} {'B/A':>6} {'p50 A':>7} {'p50 B':>7} {'p99 A':>7} {'p99 B':>7} "
      f"{'cpu A':>6} {'cpu B':>6} {'B/A':>6}   p999 per round A | B (ms)")
for w in sys.argv[3].split():
    for n in sys.argv[4].split():
        runs = {m: [r[f"{m}-{w}-{n}-{i}"] for i in rounds] for m in "ab"}
        # Throughput over all rounds: every operation over every second.
        ops = {m: sum(j["ops"] for j in runs[m]) / sum(j["ops"] / j["ops_per_sec"] for j in runs[m]) for m in "ab"}
        med = lambda m, f: statistics.median(j[f] for j in runs[m]) / 1000
        tail = lambda m: " ".join(f"{j['p999_us'] / 1000:.1f}" for j in runs[m])
        # The three nodes' CPU (user + system) per operation over all rounds, in microseconds.
        cpu = {m: 1e6 * sum(ticks[f"{m}-{w}-{n}-{i}"] for i in rounds) / hz / sum(j["ops"] for j in runs[m]) for m in "ab"}
        print(f"{w}-{n:<{9 - len(w)}} {ops['a']:>9.0f} {ops['b']:>9.0f} {ops['b'] / ops['a']:>6.3f} "
              f"{med('a', 'p50_us'):>7.2f} {med('b', 'p50_us'):>7.2f} {med('a', 'p99_us'):>7.2f} {med('b', 'p99_us'):>7.2f} "
              f"{cpu['a']:>6.0f} {cpu['b']:>6.0f} {cpu['b'] / cpu['a']:>6.3f}   "
              f"{tail('a')} | {tail('b')}")
PY
