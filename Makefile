# The README's commands. Each first installs what the build and tests need when it is missing:
# libclang-dev (bindgen for RocksDB), a C++ compiler, procps and prometheus (the metrics test scrapes real
# nodes with a real Prometheus server). Everything else comes from crates.io.

SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
CARGO ?= cargo
JOBS ?= 2

TARGET_DIR := $(or $(CARGO_TARGET_DIR),target)
# Flags for `kiwi playground` in `make run`; fixed ports so the README commands work as written.
ARGS ?= --base-port 7381

.PHONY: run node test deps bench-storage bench-snapshot bench-vs-etcd bench-vs-etcd-large bench-failover bench-stages bench-ab bench-priority bench-scaling bench-channel bench-telemetry bench-control bench-security bench-watch bench-etcd-api bench-backup chaos

## Build (release) and start a local 3-node cluster with `kiwi playground` (Ctrl-C stops it).
## Other flags: make run ARGS="--nodes 5 --backend leveldb" (free ports unless --base-port is given)
run: deps
	$(CARGO) build --release -j$(JOBS) --workspace --bins
	$(TARGET_DIR)/release/kiwi playground $(ARGS)

## Build and start one kiwi-node with the example configuration (Ctrl-C stops it).
node: deps
	$(CARGO) build --release -j$(JOBS) --workspace --bins
	$(TARGET_DIR)/release/kiwi-node --config data-node/config/kiwi-node.example.toml

## Run the whole test suite.
test: deps
	$(CARGO) test --workspace -j$(JOBS)

## Print the storage benchmark table (release build, a few minutes).
bench-storage: deps
	$(CARGO) bench -j$(JOBS) --workspace --bench storage

## Stream a 300 MiB snapshot between two RocksDB stores; print time and peak memory.
bench-snapshot: deps
	$(CARGO) bench -j$(JOBS) --workspace --bench snapshot

## Kiwi vs etcd (3 nodes each, fsync on) with the same load generator; prints a side-by-side table.
bench-vs-etcd: deps
	$(CARGO) build --release -j$(JOBS) --workspace --bins
	scripts/bench-vs-etcd.sh

## Where one client's put spends its time: the mean of every stage the nodes measure, fsyncs per put.
bench-stages: deps
	$(CARGO) build --release -j$(JOBS) --workspace --bins
	scripts/bench-stages.sh

## A/B of two kiwi-node binaries (A=... B=...), alternating restarts: puts and gets at 1, 16, 64 workers.
bench-ab: deps
	$(CARGO) build --release -j$(JOBS) --workspace --bins
	scripts/bench-ab.sh

## Failover: SIGKILL the leader under load, time to the first acknowledged write after it; 10 rounds each
## with 50 ms (default) and 100 ms Raft ticks, medians side by side (a few minutes).
bench-failover: deps
	$(CARGO) build --release -j$(JOBS) --workspace --bins
	$(CARGO) bench -j$(JOBS) --workspace --bench failover

## The larger-data row: 1,000,000 keys of 1 KiB in each system, 90 % get / 10 % put at 64 workers, RSS and
## disk per node at the end (several minutes, most of it preloading).
bench-vs-etcd-large: deps
	$(CARGO) build --release -j$(JOBS) --workspace --bins
	LARGE=1 scripts/bench-vs-etcd.sh

## The cost of watches: puts at a fixed rate with 0 and 1,000 watchers; delivery latency and node CPU per put.
bench-watch: deps
	$(CARGO) build --release -j$(JOBS) --workspace --bins
	scripts/bench-watch.sh

## A 1 GiB backup (kiwi snapshot save) in bounded memory: file size, time, CLI and node RSS.
bench-backup: deps
	$(CARGO) build --release -j$(JOBS) --workspace --bins
	scripts/bench-backup.sh

## The etcd v3 front end's cost: put and linearizable get through Kiwi's API vs the etcd API (leader, all).
bench-etcd-api: deps
	$(CARGO) build --release -j$(JOBS) --workspace --bins
	scripts/bench-etcd-api.sh

## Priority isolation (HIGH next to a LOW flood: priority on, FIFO, no OS priority) and overhead; one table.
bench-priority: deps
	$(CARGO) build --release -j$(JOBS) --workspace --bins
	scripts/bench-priority.sh

## The storage pool under a burst of 1 -> 64 -> 1 workers: time to grow, throughput against a pool fixed at
## its maximum, time back at the minimum, and the scale-event timeline.
bench-scaling: deps
	$(CARGO) build --release -j$(JOBS) --workspace --bins
	scripts/bench-scaling.sh

## Priority channel overhead per request, priority on vs off: ns per request, then (with valgrind)
## instructions per request, which do not depend on how busy the machine is.
bench-channel: deps
	$(CARGO) bench -j$(JOBS) --workspace --bench channel
	@if command -v valgrind >/dev/null; then \
		bin=$$(ls -t $(TARGET_DIR)/release/deps/channel-* | grep -v '\.d$$' | head -1); \
		for m in on off; do \
			n=$$(KIWI_BENCH_MODE=$$m KIWI_BENCH_REQUESTS=200000 valgrind --tool=callgrind --callgrind-out-file=/dev/null $$bin 2>&1 | sed -n 's/.*Collected : //p'); \
			echo "priority $$m: $$((n / 400000)) instructions per request (callgrind, whole process / 400,000 requests)"; \
		done; \
	fi

## Telemetry cost: ns per recorded event (exported vs metrics off), then two 3-node clusters side by side,
## telemetry on and off, taking the load in turn (swapped halfway): puts and linearizable gets at 64
## workers and at a fixed rate (node CPU per operation); paired on/off ratios. AA=1: both off.
bench-telemetry: deps
	$(CARGO) bench -j$(JOBS) --workspace --bench telemetry
	$(CARGO) build --release -j$(JOBS) --workspace --bins
	scripts/bench-telemetry.sh

## The control plane: policy push latency (100 pushes to 3 nodes), put throughput with vs without it, a put
## run with kiwi-control SIGKILLed halfway, and one kiwi-control fed by 200 simulated nodes.
bench-control: deps
	$(CARGO) build --release -j$(JOBS) --workspace --bins
	scripts/bench-control.sh

## The cost of security: puts and linearizable gets at 64 workers, TLS + mutual TLS + tokens vs plain text,
## on one playground restarted on the same data alternately.
bench-security: deps
	$(CARGO) build --release -j$(JOBS) --workspace --bins
	scripts/bench-security.sh

## The chaos soak: PLANS (200) random fault plans of DURATION (20s) on a local playground, each checked for
## linearizability; prints the totals and the longest unavailability per fault type.
chaos: deps
	$(CARGO) build --release -j$(JOBS) --workspace --bins
	scripts/chaos.sh

## Install the system packages the build and tests need, if missing.
## (procps: pgrep/kill, used by the process tests; prometheus: the server the metrics test runs; etcd-client:
## etcdctl, the etcd tool the etcd API tests drive; systemd: systemd-analyze, which checks the units in
## docs/deploy/systemd; chromium and chromium-driver: the headless browser the console test drives.)
deps:
	@dpkg -s libclang-dev >/dev/null 2>&1 && command -v c++ >/dev/null 2>&1 && command -v pgrep >/dev/null 2>&1 \
		&& command -v prometheus >/dev/null 2>&1 && command -v etcdctl >/dev/null 2>&1 \
		&& command -v systemd-analyze >/dev/null 2>&1 && command -v chromium >/dev/null 2>&1 \
		&& command -v chromedriver >/dev/null 2>&1 || \
		{ $(SUDO) apt-get update && $(SUDO) apt-get install -y --no-install-recommends libclang-dev g++ procps prometheus etcd-client systemd chromium chromium-driver; }
