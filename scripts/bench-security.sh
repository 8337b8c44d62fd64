#!/usr/bin/env bash
# The cost of security, in one run: one local 3-node playground restarted on the same data alternately
#   - "secure": `--secure` (TLS on every port, mutual TLS between members, bearer tokens checked on every
#     call),
#   - "plain":  plain text, no tokens,
# ROUNDS rounds (default 2), the order alternating per round: puts and linearizable gets at 64 workers for
# DURATION (default 10s). Prints every run, then the medians and the secure/plain ratios.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/common.sh

DURATION=${DURATION:-10s}
ROUNDS=${ROUNDS:-2}
build_kiwi
init_work_dir kiwi-security

PORT=17991
PG=""
stop() { [ -n "$PG" ] && { kill -INT "$PG" 2>/dev/null || true; wait "$PG" 2>/dev/null || true; }; PG=""; }
trap stop EXIT
ENDPOINTS="127.0.0.1:$PORT,127.0.0.1:$((PORT + 1)),127.0.0.1:$((PORT + 2))"
start() { # mode
    local flags=()
    [ "$1" = secure ] && flags=(--secure)
    : >"$WORK_DIR/cluster.log"
    "$KIWI" playground --nodes 3 --data-dir "$WORK_DIR/cluster" --base-port "$PORT" --node-bin "$NODE" \
        --no-control --no-metrics "${flags[@]}" >>"$WORK_DIR/cluster.log" 2>&1 &
    PG=$!
    for _ in $(seq 1 120); do grep -q "is up" "$WORK_DIR/cluster.log" && break; sleep 0.5; done
    grep -q "is up" "$WORK_DIR/cluster.log" || { echo "cluster did not come up; see $WORK_DIR" >&2; exit 1; }
    AUTH=()
    if [ "$1" = secure ]; then
        AUTH=(--ca-cert "$WORK_DIR/cluster/secrets/ca.crt" --token-file "$WORK_DIR/cluster/secrets/admin.token")
    fi
}

start plain
echo "preloading ..." >&2
"$KIWI" --endpoints "$ENDPOINTS" bench --workload get --workers 32 --duration 1s --quiet >/dev/null
stop

for round in $(seq 1 "$ROUNDS"); do
    if [ $((round % 2)) = 1 ]; then order="secure plain"; else order="plain secure"; fi
    for m in $order; do
        start "$m"
        for w in put get; do
            echo "== $w, $m, round $round" >&2
            "$KIWI" --endpoints "$ENDPOINTS" "${AUTH[@]}" bench --workload "$w" --workers 64 --connections 16 \
                --duration "$DURATION" --no-preload --quiet --label "$w-$m-$round" --json-out "$RESULTS" >/dev/null
        done
        stop
    done
done

python3 - "$RESULTS" "$ROUNDS" <<'PY'
import json, statistics, sys
r = {j["label"]: j for j in map(json.loads, open(sys.argv[1]))}
rounds = range(1, int(sys.argv[2]) + 1)
print(f"\n{'run':<16} {'ops/s':>9} {'p50 ms':>8} {'p99 ms':>8}   errors")
for w in ["put", "get"]:
    for i in rounds:
        for m in ["secure", "plain"]:
            j = r[f"{w}-{m}-{i}"]
            print(f"{w}-{m}-{i:<8} {j['ops_per_sec']:>9.0f} {j['p50_us']/1000:>8.2f} {j['p99_us']/1000:>8.2f}   {sum(j['errors'].values())}")
print()
for w, what in [("put", "put"), ("get", "linearizable get")]:
    med = lambda m, f: statistics.median(r[f"{w}-{m}-{i}"][f] for i in rounds)
    print(f"{what:<17} median ops/s secure {med('secure', 'ops_per_sec'):.0f} plain {med('plain', 'ops_per_sec'):.0f} "
          f"(secure/plain {med('secure', 'ops_per_sec')/med('plain', 'ops_per_sec'):.3f}); median p99 secure "
          f"{med('secure', 'p99_us')/1000:.2f} ms plain {med('plain', 'p99_us')/1000:.2f} ms "
          f"(secure/plain {med('secure', 'p99_us')/med('plain', 'p99_us'):.3f})")
PY
