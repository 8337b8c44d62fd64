# Shared by the benchmark scripts (sourced from the repository root, after `set -euo pipefail`): the release
# binaries, a work directory for results and logs, and a local 3-node `kiwi playground`.

TARGET_DIR=${CARGO_TARGET_DIR:-target}
KIWI=$TARGET_DIR/release/kiwi
NODE=$TARGET_DIR/release/kiwi-node

# Builds the release binaries if they are missing.
build_kiwi() {
    if [ ! -x "$KIWI" ] || [ ! -x "$NODE" ]; then
        echo "building Kiwi (release) ..." >&2
        cargo build --release -j2 --workspace --bins
    fi
}

# Sets WORK_DIR (kept if given, else a fresh directory /var/tmp/PREFIX.*) and an empty RESULTS file in it.
init_work_dir() { # prefix
    WORK_DIR=${WORK_DIR:-$(mktemp -d "/var/tmp/$1.XXXXXX")}
    mkdir -p "$WORK_DIR"
    RESULTS=$WORK_DIR/results.jsonl
    : > "$RESULTS"
}

# Starts a 3-node playground on BASE_PORT.. (data and log under WORK_DIR/NAME), optionally under a prefix
# command (taskset, setpriv ...), waits until it is up, and exports KIWI_ENDPOINTS. PG is its PID.
# PLAYGROUND_FLAGS (e.g. --lease-reads) are passed on to `kiwi playground`.
PG=""
start_playground() { # name base-port [prefix command...]
    local name=$1 port=$2
    shift 2
    "$@" "$KIWI" playground --nodes 3 --data-dir "$WORK_DIR/$name" --base-port "$port" --node-bin "$NODE" --no-control ${PLAYGROUND_FLAGS:-} \
        >"$WORK_DIR/$name.log" 2>&1 &
    PG=$!
    for _ in $(seq 1 120); do grep -q "is up" "$WORK_DIR/$name.log" && break; sleep 0.5; done
    grep -q "is up" "$WORK_DIR/$name.log" || { echo "cluster did not come up; see $WORK_DIR" >&2; exit 1; }
    export KIWI_ENDPOINTS=127.0.0.1:$port,127.0.0.1:$((port + 1)),127.0.0.1:$((port + 2))
}

# Stops the playground (SIGINT: it stops its nodes) and waits for it.
stop_playground() {
    [ -n "$PG" ] || return 0
    kill -INT "$PG" 2>/dev/null || true
    wait "$PG" 2>/dev/null || true
    PG=""
}

# CPU time (clock ticks, user + system) used so far by the kiwi-node processes of the playground NAME.
node_cpu_ticks() { # name
    local total=0 p
    for p in $(pgrep -f "kiwi-node --config $WORK_DIR/$1/"); do
        set -- $(cut -d' ' -f14,15 "/proc/$p/stat")
        total=$((total + $1 + $2))
    done
    echo "$total"
}
