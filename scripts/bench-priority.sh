#!/usr/bin/env bash
# Priority isolation and overhead, in one run on local 3-node clusters (`kiwi playground`).
#
# Isolation: a light stream of HIGH keys-only scans (4 workers) alone, then next to a LOW flood of the same
# scans (64 workers, about twice what the node serves), and next to a LOW flood of watch replays (64
# workers, each a watch on every key from a random past revision read for SCAN_LIMIT events: the node reads
# its history at the watch's class), with
#   - priority on (the default: weighted queue, LOW at a lower OS priority in the storage pool),
#   - priority off (one FIFO, switched at runtime with `kiwi runtime --set-priority off`),
#   - priority on but without the OS priority (a second cluster started without CAP_SYS_NICE, so its
#     storage threads cannot go back from nice 10 to 0 and run every class alike).
# Leases: 4 leases with a 2 s TTL kept alive 4 times a second by a LOW client during each flood: keepalive
# latency and leases lost (keepalives skip the storage queue, whatever the client's priority).
# Overhead: puts and serializable gets at a light load (4 workers), priority on vs off, three alternating
# rounds each; the medians are compared.
#
# Placement: on this kind of machine everything shares two cores, and the load generators' own CPU use
# would dominate what is measured. With 2+ CPUs the nodes are pinned to the last CPU and the load generators
# to the others, and the LOW flood generator runs at nice 19 (as if the clients were on other machines).
# Prints a table; the JSON lines and logs stay in WORK_DIR.
#
# Environment: DURATION (per run, default 10s), SCAN_LIMIT (default 1000), WORK_DIR (default a fresh
# directory under /var/tmp).
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/common.sh

DURATION=${DURATION:-10s}
SCAN_LIMIT=${SCAN_LIMIT:-1000}
build_kiwi
init_work_dir kiwi-priority

CPUS=$(nproc)
NODE_CPU=()
CLIENT_CPU=()
if [ "$CPUS" -ge 2 ]; then
    NODE_CPU=(taskset -c $((CPUS - 1)))
    CLIENT_CPU=(taskset -c "0-$((CPUS - 2))")
fi

start_cluster() { # name [prefix command...]
    local name=$1
    shift
    start_playground "$name" 17491 "$@" "${NODE_CPU[@]}"
    echo "preloading ..." >&2
    "$KIWI" bench --workload get --workers 32 --duration 1s --quiet >/dev/null
}
trap stop_playground EXIT

bench() { # label priority workers workload [args]
    local label=$1 prio=$2 workers=$3 workload=$4
    shift 4
    "${CLIENT_CPU[@]}" "$KIWI" --priority "$prio" --consistency serializable bench --workload "$workload" \
        --workers "$workers" --connections 16 --duration "$DURATION" --scan-limit "$SCAN_LIMIT" --no-preload \
        --quiet --label "$label" --json-out "$RESULTS" "$@" >/dev/null
}
flood_with_high() { # suffix [flood workload: scan (default) or replay]
    echo "== LOW ${2:-scan} flood + HIGH stream ($1)" >&2
    nice -n 19 "${CLIENT_CPU[@]}" "$KIWI" --priority low --consistency serializable bench --workload "${2:-scan}" \
        --workers 64 --connections 16 --duration "$DURATION" --scan-limit "$SCAN_LIMIT" --no-preload --quiet \
        --label "low-flood-$1" --json-out "$RESULTS" >/dev/null &
    local flood=$!
    # Leases kept alive 4 times a second by a LOW client of their own, next to the flood.
    "${CLIENT_CPU[@]}" "$KIWI" --priority low bench --workload get --workers 1 --rate 10 --duration "$DURATION" \
        --no-preload --quiet --leases 4 --label "keepalives-under-flood-$1" --json-out "$RESULTS" >/dev/null &
    local keepers=$!
    bench "high-under-flood-$1" high 4 scan
    wait $flood
    wait $keepers
}

start_cluster kiwi
echo "== HIGH alone" >&2
bench high-idle high 4 scan
flood_with_high on
flood_with_high watch-on replay
"$KIWI" runtime --set-priority off >/dev/null
flood_with_high off
flood_with_high watch-off replay
for round in 1 2 3; do
    for mode in on off; do
        "$KIWI" runtime --set-priority "$mode" >/dev/null
        echo "== light load overhead, priority $mode, round $round" >&2
        bench "put-light-$mode-$round" normal 4 put
        bench "get-light-$mode-$round" normal 4 get
    done
done
"$KIWI" runtime --set-priority on >/dev/null
"$KIWI" runtime >"$WORK_DIR/runtime.txt"
stop_playground

if command -v setpriv >/dev/null && [ "$(id -u)" = 0 ]; then
    start_cluster no-os-priority setpriv --inh-caps=-sys_nice --bounding-set=-sys_nice
    "$KIWI" runtime | grep -q "LOW at the same OS priority" || { echo "the cluster still has CAP_SYS_NICE" >&2; exit 1; }
    flood_with_high queue-only
    stop_playground
fi

python3 - "$RESULTS" <<'PY'
import json, statistics, sys
r = {j["label"]: j for j in map(json.loads, open(sys.argv[1]))}
def row(label):
    j = r[label]
    errs = sum(j["errors"].values())
    print(f"{label:<28} {j['ops_per_sec']:>9.0f} {j['p50_us']/1000:>8.2f} {j['p99_us']/1000:>8.2f}   {errs:>7} {j['errors']}")
print(f"\n{'run':<28} {'ops/s':>9} {'p50 ms':>8} {'p99 ms':>8}   {'errors':>7}")
labels = ["high-idle", "high-under-flood-on", "low-flood-on", "high-under-flood-off", "low-flood-off",
          "high-under-flood-queue-only", "low-flood-queue-only",
          "high-under-flood-watch-on", "low-flood-watch-on", "high-under-flood-watch-off", "low-flood-watch-off"]
labels += [f"{w}-light-{m}-{i}" for w in ["put", "get"] for i in (1, 2, 3) for m in ("on", "off")]
for l in labels:
    if l in r:
        row(l)
idle = r["high-idle"]
print("\nHIGH under a LOW flood, against HIGH alone:")
for mode, what in [("on", "priority on"), ("off", "priority off (FIFO)"), ("queue-only", "queue priority only, no OS priority"),
                   ("watch-on", "LOW watch replays, priority on"), ("watch-off", "LOW watch replays, priority off")]:
    k = f"high-under-flood-{mode}"
    if k in r:
        j = r[k]
        print(f"  {what:<38} p50 {j['p50_us']/idle['p50_us']:5.2f}x  p99 {j['p99_us']/idle['p99_us']:5.2f}x  "
              f"throughput {j['ops_per_sec']/idle['ops_per_sec']:.2f}x")
print("\nLeases kept alive (4 leases, TTL 2 s, 4 keepalives/s each, a LOW client) during each flood:")
for k in sorted(x for x in r if x.startswith("keepalives-under-flood-")):
    l = r[k]["leases"]
    print(f"  {k[len('keepalives-under-flood-'):]:<12} {l['keepalives']:>5} keepalives, p50 {l['p50_us']/1000:6.2f} ms, "
          f"p99 {l['p99_us']/1000:6.2f} ms, max {l['max_us']/1000:6.2f} ms, leases lost {l['lost']}")
for w in ["put", "get"]:
    med = lambda m, f: statistics.median(r[f"{w}-light-{m}-{i}"][f] for i in (1, 2, 3))
    print(f"overhead {w} (median of 3): throughput on/off {med('on', 'ops_per_sec')/med('off', 'ops_per_sec'):.3f}, "
          f"p99 on/off {med('on', 'p99_us')/med('off', 'p99_us'):.3f}")
PY
echo "(runtime stats after the runs: $WORK_DIR/runtime.txt)"
