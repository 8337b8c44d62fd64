#!/usr/bin/env bash
# Kiwi vs etcd on this machine, in one run, measured by the same load generator (`kiwi bench`).
#
# Starts a 3-member etcd cluster (Debian's etcd-server package; installed if missing) and a 3-node Kiwi
# cluster (`kiwi playground --no-control`, RocksDB), both on loopback with fsync on (both systems' defaults),
# and runs the same workloads back to back: put, then linearizable get, at 1, 16 and 64 workers. etcd is
# driven twice: at its leader only (the headline, as etcd's own benchmark does with --target-leader; Kiwi's
# client also sends to the leader) and at all three members (followers forward to the leader). Kiwi is
# driven twice too: through its own API, and through its etcd v3 API on its leader with the same etcd driver
# that drives etcd ("kiwi-etcd": one client library for both systems, the fairest comparison). For every
# row it prints ops/s, p50 and p99, and the CPU the three server processes of each system used per 1,000
# operations (utime + stime from /proc), then stops everything it started, by PID.
#
# Then Kiwi is restarted on the same data with leader-lease reads (`kiwi playground --lease-reads`, off by
# default; see the README's "Lease reads") and the linearizable gets are run again ("get-lease" rows, compared
# with etcd's get rows of the same run). LEASE_READS=0 skips them.
#
# LARGE=1 (make bench-vs-etcd-large) runs the larger-data row instead: KEYS (default 1,000,000) keys of
# VALUE_SIZE (default 1024) bytes preloaded into each system, then a 90 % get / 10 % put mix at 64 workers,
# and each server's RSS and data directory size at the end. etcd gets an 8 GiB quota.
#
# Environment: DURATION (per run, default 10s), WORKERS (default "1 16 64"), KEYS (default 20000),
# VALUE_SIZE (default 256), LARGE, LEASE_READS, WORK_DIR (default a fresh directory under /var/tmp; data and logs are
# kept there).
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/common.sh

DURATION=${DURATION:-10s}
WORKERS=${WORKERS:-"1 16 64"}
LARGE=${LARGE:-}
LEASE_READS=${LEASE_READS:-1}
if [ -n "$LARGE" ]; then
    KEYS=${KEYS:-1000000}
    VALUE_SIZE=${VALUE_SIZE:-1024}
else
    KEYS=${KEYS:-20000}
    VALUE_SIZE=${VALUE_SIZE:-256}
fi
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
CPU=$WORK_DIR/cpu.jsonl
: > "$CPU"
PIDS=()
ETCD_PIDS=()
cleanup() {
    for pid in "${PIDS[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
    for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
    echo "stopped everything this script started; data and logs in $WORK_DIR" >&2
}
trap cleanup EXIT

CLUSTER=e1=http://127.0.0.1:23801,e2=http://127.0.0.1:23802,e3=http://127.0.0.1:23803
for i in 1 2 3; do
    etcd --name "e$i" --data-dir "$WORK_DIR/etcd-$i" --quota-backend-bytes $((8 << 30)) \
        --listen-client-urls "http://127.0.0.1:2379$i" --advertise-client-urls "http://127.0.0.1:2379$i" \
        --listen-peer-urls "http://127.0.0.1:2380$i" --initial-advertise-peer-urls "http://127.0.0.1:2380$i" \
        --initial-cluster "$CLUSTER" --initial-cluster-state new --initial-cluster-token kiwi-bench \
        >"$WORK_DIR/etcd-$i.log" 2>&1 &
    PIDS+=($!)
    ETCD_PIDS+=($!)
done
# Starts the Kiwi playground (extra playground flags as arguments), logging to $PG_LOG.
start_kiwi() {
    PG_LOG=$WORK_DIR/playground${1:+-${1#--}}.log
    "$KIWI" playground --nodes 3 --no-control --data-dir "$WORK_DIR/kiwi" --base-port 17391 --node-bin "$NODE" \
        "$@" >"$PG_LOG" 2>&1 &
    PG_PID=$!
    PIDS+=($PG_PID)
}
# Waits for the playground's nodes and sets KIWI_PIDS.
wait_kiwi() {
    for _ in $(seq 1 120); do grep -q "is up" "$PG_LOG" && break; sleep 0.5; done
    grep -q "is up" "$PG_LOG" || { echo "Kiwi did not come up; see $PG_LOG" >&2; exit 1; }
    mapfile -t KIWI_PIDS < <(pgrep -P "$PG_PID" -f kiwi-node)
    [ "${#KIWI_PIDS[@]}" = 3 ] || { echo "expected 3 kiwi-node processes, found ${#KIWI_PIDS[@]}" >&2; exit 1; }
}
start_kiwi

ETCD=127.0.0.1:23791,127.0.0.1:23792,127.0.0.1:23793
KIWI_EPS=127.0.0.1:17391,127.0.0.1:17392,127.0.0.1:17393
echo "waiting for both clusters ..." >&2
for _ in $(seq 1 120); do
    up=0
    grep -q "is up" "$PG_LOG" && up=$((up + 1))
    curl -sf http://127.0.0.1:23791/health | grep -q true && up=$((up + 1))
    [ "$up" = 2 ] && break
    sleep 0.5
done
[ "$up" = 2 ] || { echo "clusters did not come up; see $WORK_DIR" >&2; exit 1; }
wait_kiwi

# The client URL of etcd's current leader (from each member's maintenance status).
etcd_leader() {
    local ep
    for ep in ${ETCD//,/ }; do
        if curl -sf -X POST "http://$ep/v3/maintenance/status" -d '{}' | python3 -c '
import json, sys
s = json.load(sys.stdin)
sys.exit(0 if s["header"]["member_id"] == s["leader"] else 1)'; then
            echo "$ep"
            return
        fi
    done
    echo "cannot find etcd's leader" >&2
    exit 1
}

# CPU seconds (user + system) the given processes have used so far.
cpu_seconds() { # pid...
    python3 - "$@" <<'PY'
import os, sys
tick = os.sysconf("SC_CLK_TCK")
total = 0
for pid in sys.argv[1:]:
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    total += int(fields[11]) + int(fields[12])
print(total / tick)
PY
}

# Kiwi's etcd API (its etcd v3 port) on Kiwi's current leader.
kiwi_etcd_leader() {
    local id
    id=$("$KIWI" --endpoints "$KIWI_EPS" status --json | python3 -c 'import json, sys; print(json.load(sys.stdin)["leader"])')
    echo "127.0.0.1:$((17391 + 400 + id - 1))"
}

run() { # target(kiwi|kiwi-etcd|etcd|etcd-all) workload workers [extra args]
    local target=$1 workload=$2 workers=$3 eps label pids driver=etcd
    shift 3
    label=$workload-w$workers
    if [ "$workload" = get-lease ]; then workload=get; fi
    case $target in
        kiwi) eps=$KIWI_EPS pids=("${KIWI_PIDS[@]}") driver=kiwi ;;
        kiwi-etcd) eps=$(kiwi_etcd_leader) pids=("${KIWI_PIDS[@]}") ;;
        etcd) eps=$(etcd_leader) pids=("${ETCD_PIDS[@]}") ;;
        etcd-all) eps=$ETCD pids=("${ETCD_PIDS[@]}") ;;
    esac
    echo "== $target $workload, $workers workers, $DURATION ($eps)" >&2
    local before after
    before=$(cpu_seconds "${pids[@]}")
    "$KIWI" --endpoints "$eps" bench --target "$driver" --workload "$workload" --workers "$workers" \
        --keys "$KEYS" --value-size "$VALUE_SIZE" --duration "$DURATION" --label "$label@$target" \
        --json-out "$RESULTS" --quiet "$@" >/dev/null
    after=$(cpu_seconds "${pids[@]}")
    echo "{\"label\": \"$label@$target\", \"cpu_s\": $(python3 -c "print($after - $before)")}" >>"$CPU"
}

# RSS (MiB) of each process and size (MiB) of each data directory, one line per system.
footprint() { # name dir-glob pid...
    local name=$1 glob=$2
    shift 2
    local rss disk
    rss=$(for pid in "$@"; do awk '/VmRSS/ {printf "%.0f ", $2 / 1024}' "/proc/$pid/status"; done)
    disk=$(for d in $glob; do if [ -d "$d" ]; then du -sm "$d" | awk '{printf "%s ", $1}'; fi; done)
    echo "$name: RSS MiB per node: $rss; data MiB per node: $disk"
}

# Loads KEYS keys of VALUE_SIZE bytes into each system (a get bench preloads them), outside any row's
# CPU figures.
preload() {
    echo "loading $KEYS keys of $VALUE_SIZE bytes into each system ..." >&2
    "$KIWI" --endpoints "$KIWI_EPS" bench --target kiwi --workload get --workers 64 --keys "$KEYS" \
        --value-size "$VALUE_SIZE" --duration 1s >/dev/null
    "$KIWI" --endpoints "$(etcd_leader)" bench --target etcd --workload get --workers 64 --keys "$KEYS" \
        --value-size "$VALUE_SIZE" --duration 1s >/dev/null
}

if [ -n "$LARGE" ]; then
    preload
    run kiwi mixed 64 --read-ratio 0.9 --no-preload
    run etcd mixed 64 --read-ratio 0.9 --no-preload
else
    for w in $WORKERS; do
        run kiwi put "$w"
        run kiwi-etcd put "$w"
        run etcd put "$w"
        run etcd-all put "$w"
    done
    preload
    for w in $WORKERS; do
        run kiwi get "$w" --consistency linearizable --no-preload
        run kiwi-etcd get "$w" --consistency linearizable --no-preload
        run etcd get "$w" --consistency linearizable --no-preload
        run etcd-all get "$w" --consistency linearizable --no-preload
    done
    if [ "$LEASE_READS" != 0 ]; then
        echo "restarting Kiwi with --lease-reads ..." >&2
        kill -INT "$PG_PID"
        wait "$PG_PID" 2>/dev/null || true
        start_kiwi --lease-reads
        wait_kiwi
        for w in $WORKERS; do
            run kiwi get-lease "$w" --consistency linearizable --no-preload
        done
    fi
fi

python3 - "$RESULTS" "$CPU" "$DURATION" "$KEYS" "$VALUE_SIZE" <<'PY'
import json, sys
rows, cpu = {}, {}
for line in open(sys.argv[2]):
    c = json.loads(line)
    cpu[c["label"]] = c["cpu_s"]
for line in open(sys.argv[1]):
    r = json.loads(line)
    workload, target = r["label"].split("@")
    r["cpu_per_kop"] = 1000 * cpu.get(r["label"], float("nan")) / max(r["ops"], 1)
    rows.setdefault(workload, {})[target] = r
print()
print(f"{sys.argv[3]} per row, {sys.argv[4]} keys, {sys.argv[5]} B values, 3 nodes each, fsync on. "
      "etcd = etcd's leader only, etcd-all = all three members; kiwi-etcd = Kiwi's etcd API on its "
      "leader, driven by the same etcd driver as etcd (the fairest comparison).")
print("CPU = CPU seconds of the three server processes per 1,000 operations.")
print()
print(f"{'workload':<12} {'system':<9} {'ops/s':>8} {'p50 ms':>7} {'p99 ms':>7} {'CPU/1k':>7} {'errors':>6}   "
      f"{'Kiwi/etcd ops':>13} {'Kiwi/etcd CPU':>13}")
for label, t in rows.items():
    # Lease-read rows compare with etcd's linearizable gets of the same run.
    e = t.get("etcd") or rows.get(label.replace("get-lease", "get"), {}).get("etcd")
    for name in ("kiwi", "kiwi-etcd", "etcd", "etcd-all"):
        r = t.get(name)
        if not r:
            continue
        ratio = cpu_ratio = ""
        if name in ("kiwi", "kiwi-etcd") and e:
            ratio = f"{r['ops_per_sec'] / e['ops_per_sec']:.2f}" if e["ops_per_sec"] else "inf"
            cpu_ratio = f"{r['cpu_per_kop'] / e['cpu_per_kop']:.2f}" if e["cpu_per_kop"] else ""
        print(f"{label:<12} {name:<9} {r['ops_per_sec']:>8.0f} {r['p50_us']/1000:>7.2f} {r['p99_us']/1000:>7.2f} "
              f"{r['cpu_per_kop']:>7.3f} {sum(r['errors'].values()):>6}   {ratio:>13} {cpu_ratio:>13}")
PY
if [ -n "$LARGE" ]; then
    echo
    footprint kiwi "$WORK_DIR/kiwi/node-*" "${KIWI_PIDS[@]}"
    footprint etcd "$WORK_DIR/etcd-*" "${ETCD_PIDS[@]}"
fi
