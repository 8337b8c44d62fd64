#!/usr/bin/env bash
# Kiwi vs etcd on this machine, in one run, measured by the same load generator (`kiwi bench`).
#
# Starts a 3-member etcd cluster (Debian's etcd-server package; installed if missing) and a 3-node Kiwi
# cluster (`kiwi playground`, RocksDB), both on loopback with fsync on (both systems' defaults), runs the
# same workloads back to back - put, then linearizable get, at 1, 16 and 64 workers - prints a side-by-side
# table with the ratio Kiwi/etcd, and stops everything it started, by PID.
#
# Environment: DURATION (per run, default 10s), WORKERS (default "1 16 64"), KEYS (default 20000),
# WORK_DIR (default a fresh directory under /var/tmp; data and logs are kept there).
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/common.sh

DURATION=${DURATION:-10s}
WORKERS=${WORKERS:-"1 16 64"}
KEYS=${KEYS:-20000}
SUDO=$([ "$(id -u)" = 0 ] || echo sudo)

if ! command -v etcd >/dev/null; then
    echo "installing etcd-server ..." >&2
    $SUDO apt-get update -qq && $SUDO apt-get install -y -qq --no-install-recommends etcd-server curl python3
fi
# Debian may start an etcd service on install; it would compete for the CPU.
if command -v systemctl >/dev/null && systemctl is-active --quiet etcd 2>/dev/null; then
    $SUDO systemctl stop etcd || true
fi
build_kiwi
init_work_dir kiwi-vs-etcd
PIDS=()
cleanup() {
    for pid in "${PIDS[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
    for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
    echo "stopped everything this script started; data and logs in $WORK_DIR" >&2
}
trap cleanup EXIT

CLUSTER=e1=http://127.0.0.1:23801,e2=http://127.0.0.1:23802,e3=http://127.0.0.1:23803
for i in 1 2 3; do
    etcd --name "e$i" --data-dir "$WORK_DIR/etcd-$i" \
        --listen-client-urls "http://127.0.0.1:2379$i" --advertise-client-urls "http://127.0.0.1:2379$i" \
        --listen-peer-urls "http://127.0.0.1:2380$i" --initial-advertise-peer-urls "http://127.0.0.1:2380$i" \
        --initial-cluster "$CLUSTER" --initial-cluster-state new --initial-cluster-token kiwi-bench \
        >"$WORK_DIR/etcd-$i.log" 2>&1 &
    PIDS+=($!)
done
"$KIWI" playground --nodes 3 --data-dir "$WORK_DIR/kiwi" --base-port 17391 --node-bin "$NODE" \
    >"$WORK_DIR/playground.log" 2>&1 &
PIDS+=($!)

ETCD=127.0.0.1:23791,127.0.0.1:23792,127.0.0.1:23793
KIWI_EPS=127.0.0.1:17391,127.0.0.1:17392,127.0.0.1:17393
echo "waiting for both clusters ..." >&2
for _ in $(seq 1 120); do
    up=0
    grep -q "is up" "$WORK_DIR/playground.log" && up=$((up + 1))
    curl -sf http://127.0.0.1:23791/health | grep -q true && up=$((up + 1))
    [ "$up" = 2 ] && break
    sleep 0.5
done
[ "$up" = 2 ] || { echo "clusters did not come up; see $WORK_DIR" >&2; exit 1; }

run() { # target workload workers [extra args]
    local target=$1 workload=$2 workers=$3
    shift 3
    local eps=$KIWI_EPS
    [ "$target" = etcd ] && eps=$ETCD
    echo "== $target $workload, $workers workers, $DURATION" >&2
    "$KIWI" --endpoints "$eps" bench --target "$target" --workload "$workload" --workers "$workers" \
        --keys "$KEYS" --duration "$DURATION" --label "$workload-w$workers" --json-out "$RESULTS" "$@" \
        >/dev/null
}

for w in $WORKERS; do
    run kiwi put "$w"
    run etcd put "$w"
done
preload=()
for w in $WORKERS; do
    run kiwi get "$w" --consistency linearizable "${preload[@]}"
    run etcd get "$w" --consistency linearizable "${preload[@]}"
    preload=(--no-preload)
done

python3 - "$RESULTS" <<'PY'
import json, sys
rows = {}
for line in open(sys.argv[1]):
    r = json.loads(line)
    rows.setdefault(r["label"], {})[r["target"]] = r
print()
print(f"{'workload':<12} {'kiwi ops/s':>11} {'etcd ops/s':>11} {'ratio':>6}   {'kiwi p99 ms':>11} {'etcd p99 ms':>11}   errors (kiwi / etcd)")
for label, t in rows.items():
    k, e = t.get("kiwi"), t.get("etcd")
    if not k or not e:
        continue
    ratio = k["ops_per_sec"] / e["ops_per_sec"] if e["ops_per_sec"] else float("inf")
    print(f"{label:<12} {k['ops_per_sec']:>11.0f} {e['ops_per_sec']:>11.0f} {ratio:>6.2f}   "
          f"{k['p99_us']/1000:>11.2f} {e['p99_us']/1000:>11.2f}   {sum(k['errors'].values())} / {sum(e['errors'].values())}")
PY
