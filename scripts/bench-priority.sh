#!/usr/bin/env bash
# Priority isolation and overhead, in one run on one local 3-node cluster (`kiwi playground`).
#
# Isolation: a light stream of HIGH keys-only scans (4 workers) alone, then next to a LOW flood of the same
# scans (64 workers), with priority on and then off (FIFO, switched at runtime with `kiwi runtime
# --set-priority`). Overhead: puts and serializable gets at a light load (4 workers), priority on vs off.
# Prints a table; the JSON lines and logs stay in WORK_DIR.
#
# Environment: DURATION (per run, default 10s), SCAN_LIMIT (default 1000), WORK_DIR (default a fresh
# directory under /var/tmp).
set -euo pipefail
cd "$(dirname "$0")/.."

DURATION=${DURATION:-10s}
SCAN_LIMIT=${SCAN_LIMIT:-1000}
TARGET_DIR=${CARGO_TARGET_DIR:-target}
KIWI=$TARGET_DIR/release/kiwi
NODE=$TARGET_DIR/release/kiwi-node
if [ ! -x "$KIWI" ] || [ ! -x "$NODE" ]; then
    cargo build --release -j2 --workspace --bins
fi
WORK_DIR=${WORK_DIR:-$(mktemp -d /var/tmp/kiwi-priority.XXXXXX)}
mkdir -p "$WORK_DIR"
RESULTS=$WORK_DIR/results.jsonl
: > "$RESULTS"

"$KIWI" playground --nodes 3 --data-dir "$WORK_DIR/kiwi" --base-port 17491 --node-bin "$NODE" \
    >"$WORK_DIR/playground.log" 2>&1 &
PG=$!
trap 'kill -INT $PG 2>/dev/null || true; wait $PG 2>/dev/null || true' EXIT
for _ in $(seq 1 120); do grep -q "is up" "$WORK_DIR/playground.log" && break; sleep 0.5; done
grep -q "is up" "$WORK_DIR/playground.log" || { echo "cluster did not come up; see $WORK_DIR" >&2; exit 1; }
export KIWI_ENDPOINTS=127.0.0.1:17491,127.0.0.1:17492,127.0.0.1:17493

bench() { # label priority workers workload [args]
    local label=$1 prio=$2 workers=$3 workload=$4
    shift 4
    "$KIWI" --priority "$prio" --consistency serializable bench --workload "$workload" --workers "$workers" \
        --connections 16 --duration "$DURATION" --scan-limit "$SCAN_LIMIT" --no-preload --quiet \
        --label "$label" --json-out "$RESULTS" "$@" >/dev/null
}

echo "preloading ..." >&2
"$KIWI" bench --workload get --workers 32 --duration 1s --quiet >/dev/null
echo "== HIGH alone" >&2
bench high-idle high 4 scan
for mode in on off; do
    "$KIWI" runtime --set-priority "$mode" >/dev/null
    echo "== priority $mode: LOW flood + HIGH stream" >&2
    bench "low-flood-$mode" low 64 scan &
    FLOOD=$!
    bench "high-under-flood-$mode" high 4 scan
    wait $FLOOD
    echo "== priority $mode: light load overhead" >&2
    bench "put-light-$mode" normal 4 put
    bench "get-light-$mode" normal 4 get
done
"$KIWI" runtime --set-priority on >/dev/null
"$KIWI" runtime >"$WORK_DIR/runtime.txt"

python3 - "$RESULTS" <<'PY'
import json, sys
r = {j["label"]: j for j in map(json.loads, open(sys.argv[1]))}
def row(label):
    j = r[label]
    errs = sum(j["errors"].values())
    print(f"{label:<24} {j['ops_per_sec']:>9.0f} {j['p50_us']/1000:>8.2f} {j['p99_us']/1000:>8.2f}   {errs:>7} {j['errors']}")
print(f"\n{'run':<24} {'ops/s':>9} {'p50 ms':>8} {'p99 ms':>8}   {'errors':>7}")
for l in ["high-idle", "high-under-flood-on", "low-flood-on", "high-under-flood-off", "low-flood-off",
          "put-light-on", "put-light-off", "get-light-on", "get-light-off"]:
    row(l)
idle = r["high-idle"]["p99_us"]
print(f"\nHIGH p99 under a LOW flood: priority on {r['high-under-flood-on']['p99_us']/idle:.2f}x idle, "
      f"priority off (FIFO) {r['high-under-flood-off']['p99_us']/idle:.2f}x idle")
for w in ["put", "get"]:
    on, off = r[f"{w}-light-on"], r[f"{w}-light-off"]
    print(f"overhead {w}: throughput on/off {on['ops_per_sec']/off['ops_per_sec']:.3f}, p99 on/off {on['p99_us']/off['p99_us']:.3f}")
PY
echo "(runtime stats after the runs: $WORK_DIR/runtime.txt)"
