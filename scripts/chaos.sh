#!/usr/bin/env bash
# The chaos soak: a local 3-node playground with fault injection on (crashed nodes restarted), then PLANS
# random fault plans (default 200) of DURATION each (default 20s) run by `kiwi chaos --random`, each checked
# for linearizability. Prints one line per plan, then the totals: plans run, operations checked, unknown
# outcomes, violations, and the longest unavailability (whole seconds with no successful operation) per
# fault type active during it. Stops at the first violation (its history is kept in WORK_DIR).
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/common.sh

PLANS=${PLANS:-200}
DURATION=${DURATION:-20s}
CONTROL=$TARGET_DIR/release/kiwi-control
build_kiwi
[ -x "$CONTROL" ] || cargo build --release -j2 --workspace --bins
init_work_dir kiwi-chaos

PORT=17891
"$KIWI" playground --nodes 3 --data-dir "$WORK_DIR/cluster" --base-port "$PORT" --node-bin "$NODE" \
    --control-bin "$CONTROL" --no-metrics --fault-injection --restart-crashed >"$WORK_DIR/cluster.log" 2>&1 &
PG=$!
trap 'kill -INT $PG 2>/dev/null || true; wait $PG 2>/dev/null || true' EXIT
for _ in $(seq 1 120); do grep -q "is up" "$WORK_DIR/cluster.log" && break; sleep 0.5; done
grep -q "is up" "$WORK_DIR/cluster.log" || { echo "cluster did not come up; see $WORK_DIR" >&2; exit 1; }
export KIWI_ENDPOINTS=127.0.0.1:$PORT,127.0.0.1:$((PORT + 1)),127.0.0.1:$((PORT + 2))
export KIWI_CONTROL=127.0.0.1:$((PORT + 200))
sleep 2

failed=0
for seed in $(seq 1 "$PLANS"); do
    if "$KIWI" chaos --random --seed "$seed" --duration "$DURATION" --prefix "soak$seed" --quiet \
        --out "$WORK_DIR/run-$seed" >"$WORK_DIR/run-$seed.out" 2>&1; then
        echo "plan $seed: $(grep '^verdict' "$WORK_DIR/run-$seed.out" | cut -c1-160)"
    else
        echo "plan $seed FAILED; see $WORK_DIR/run-$seed.out and $WORK_DIR/run-$seed/" >&2
        cat "$WORK_DIR/run-$seed.out" >&2
        failed=1
        break
    fi
done

python3 - "$WORK_DIR" <<'PY'
import glob, json, os, sys
work = sys.argv[1]
runs = [json.load(open(p)) for p in sorted(glob.glob(os.path.join(work, "run-*/timeline.json")))]
ops = sum(r["operations"] for r in runs)
unknown = sum(r["unknown_outcomes"] for r in runs)
bad = sum(1 for r in runs if r["verdict"] != "linearizable")
worst = {}
for r in runs:
    ok = {t["t_s"]: t["ok"] for t in r["timeline"]}
    last = int(r["seconds"])
    s = 0
    while s <= last:
        if ok.get(s, 0) == 0:
            e = s
            while e + 1 <= last and ok.get(e + 1, 0) == 0:
                e += 1
            length = e - s + 1
            kinds = {f["fault"].split()[0] for f in r["faults"] if f["start_s"] <= e + 1 and f["end_s"] >= s}
            for k in kinds or {"none"}:
                worst[k] = max(worst.get(k, 0), length)
            s = e + 1
        else:
            s += 1
print(f"\n{len(runs)} plans run, {ops} operations checked, {unknown} with unknown outcome, {bad} not linearizable")
print("longest unavailability (whole seconds without a successful operation) by fault type active:")
for k in ["partition", "crash", "delay", "loss", "stall", "none"]:
    print(f"  {k:<10} {worst.get(k, 0)} s")
PY
exit $failed
