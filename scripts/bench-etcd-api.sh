#!/usr/bin/env bash
# What the etcd v3 front end costs against Kiwi's own API, in one run on one local 3-node playground: the
# same load generator (`kiwi bench`) drives put and linearizable get at 1, 16 and 64 workers through Kiwi's
# API (to the leader), through the etcd API on the leader's etcd port (the translation alone), and through
# the etcd API spread over every member's etcd port as etcd clients do (followers pass writes on to the
# leader). Prints a table with each etcd row's ratio to Kiwi's; JSON lines and logs stay in WORK_DIR.
#
# Environment: DURATION (per run, default 5s), WORK_DIR (default a fresh directory under /var/tmp).
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/common.sh

DURATION=${DURATION:-5s}
build_kiwi
init_work_dir kiwi-etcd-api
PORT=17591
start_playground kiwi "$PORT"
trap stop_playground EXIT
leader=$(grep -o "leader is node [0-9]*" "$WORK_DIR/kiwi.log" | grep -o "[0-9]*$")
etcd_leader=127.0.0.1:$((PORT + 400 + leader - 1))
etcd_all=127.0.0.1:$((PORT + 400)),127.0.0.1:$((PORT + 401)),127.0.0.1:$((PORT + 402))
echo "leader: node $leader; etcd ports: $etcd_all" >&2
"$KIWI" bench --workload get --workers 32 --duration 1s --quiet >/dev/null   # preload the keys

run() { # label workload workers [args]
    local label=$1 workload=$2 workers=$3
    shift 3
    "$KIWI" bench --workload "$workload" --workers "$workers" --connections 16 --duration "$DURATION" \
        --no-preload --quiet --label "$label" --json-out "$RESULTS" "$@" >/dev/null
}
for workload in put get; do
    for w in 1 16 64; do
        echo "== $workload, $w workers" >&2
        run "kiwi-$workload-$w" "$workload" "$w"
        run "etcd-leader-$workload-$w" "$workload" "$w" --target etcd --endpoints "$etcd_leader"
        run "etcd-all-$workload-$w" "$workload" "$w" --target etcd --endpoints "$etcd_all"
    done
done

python3 - "$RESULTS" <<'PY'
import json, sys
r = {j["label"]: j for j in map(json.loads, open(sys.argv[1]))}
print(f"\n{'row':<10} {'Kiwi API':>9} {'etcd API, leader':>17} {'ratio':>6} {'etcd API, all':>14} {'ratio':>6}   p99 ms (Kiwi / leader / all)")
for wl in ["put", "get"]:
    for w in [1, 16, 64]:
        k, l, a = (r[f"{p}-{wl}-{w}"] for p in ["kiwi", "etcd-leader", "etcd-all"])
        print(f"{wl}-{w:<6} {k['ops_per_sec']:>9.0f} {l['ops_per_sec']:>17.0f} {l['ops_per_sec']/k['ops_per_sec']:>6.3f} "
              f"{a['ops_per_sec']:>14.0f} {a['ops_per_sec']/k['ops_per_sec']:>6.3f}   "
              f"{k['p99_us']/1000:.2f} / {l['p99_us']/1000:.2f} / {a['p99_us']/1000:.2f}")
PY
