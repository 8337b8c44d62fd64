#!/usr/bin/env bash
# Where one client's put goes: a 3-node playground (release, RocksDB, fsync), puts from one worker for
# DURATION, then the mean of every stage the nodes measure, from their Prometheus histograms (sum / count
# of the run), next to the client's latency:
#
#   client put           what `kiwi bench` measured (p50, and the mean from ops/s)
#   propose -> apply     on the leader: from the proposal entering Raft to its apply
#   leader log append    on the leader: one log write (entries + hard state), fsynced when needed
#   replication          on the leader: from persisting an entry to a follower acknowledging it
#   follower log append  on the followers: one log write, as above
#   Ready handling       on the leader: one whole Raft Ready turn (persist, send, apply)
#   storage write        on the leader: one storage batch write (log appends and applies)
#
# and how many log writes (and fsyncs) each node did per put. Environment: DURATION (default 10s),
# WORKERS (default 1), WORK_DIR.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/common.sh

DURATION=${DURATION:-10s}
WORKERS=${WORKERS:-1}
build_kiwi
init_work_dir kiwi-stages
trap stop_playground EXIT
start_playground stages 17591
"$KIWI" bench --workload put --workers "$WORKERS" --duration "$DURATION" --keys 20000 --value-size 256 \
    | tee "$WORK_DIR/bench.txt"
for i in 1 2 3; do
    curl -sf "http://127.0.0.1:$((17591 + 100 + i - 1))/metrics" >"$WORK_DIR/metrics-$i.txt"
done
python3 - "$WORK_DIR" <<'EOF'
import json, re, sys
work = sys.argv[1]
bench = json.loads([l for l in open(f"{work}/bench.txt") if l.startswith("{")][-1])
ops = bench["ops"]
nodes = {}
for i in (1, 2, 3):
    m = {}
    for line in open(f"{work}/metrics-{i}.txt"):
        if line.startswith("#"):
            continue
        name, _, value = line.rpartition(" ")
        m[name] = float(value)
    nodes[i] = m
leader = next(i for i, m in nodes.items() if m.get('kiwi_raft_role{role="leader"}') == 1)
followers = [i for i in nodes if i != leader]

def mean(i, base, label=""):
    s = sum(v for k, v in nodes[i].items() if k.startswith(base + "_sum" + label))
    c = sum(v for k, v in nodes[i].items() if k.startswith(base + "_count" + label))
    return (s / c * 1000, c) if c else (float("nan"), 0)

rows = [("client put, p50", bench["p50_us"] / 1000, ops, "client"),
        ("client put, mean", 1000 * bench["duration_s"] * bench["workers"] / ops, ops, "client")]
for name, base, where, label in [
    ("propose -> apply", "kiwi_raft_propose_to_apply_duration_seconds", [leader], ""),
    ("leader log append", "kiwi_raft_log_append_duration_seconds", [leader], ""),
    ("replication (persist -> ack)", "kiwi_raft_replication_latency_seconds", [leader], ""),
    ("follower log append", "kiwi_raft_log_append_duration_seconds", followers, ""),
    ("Ready handling", "kiwi_raft_ready_duration_seconds", [leader], ""),
    ("storage write", "kiwi_storage_operation_duration_seconds", [leader], '{backend="rocksdb",op="write"}'),
]:
    ms = [mean(i, base, label) for i in where]
    n = sum(c for _, c in ms)
    avg = sum(m * c for m, c in ms) / n if n else float("nan")
    rows.append((name, avg, n / len(where), f"node {leader}" if where == [leader] else "followers"))
print(f"\n{bench['workers']} worker(s), {ops} puts; leader node {leader}")
print(f"{'stage':32} {'where':10} {'mean ms':>8} {'per put':>8}")
for name, ms, n, where in rows:
    print(f"{name:32} {where:10} {ms:8.3f} {n / ops:8.2f}")
EOF
