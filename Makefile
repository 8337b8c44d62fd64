# The two commands of the README. Both first install what the build needs when it is missing:
# libclang-dev (bindgen for RocksDB) and a C++ compiler. Everything else comes from crates.io.

SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
CARGO ?= cargo
JOBS ?= 2

.PHONY: run test deps bench-storage bench-snapshot

## Build and start one kiwi-node with the default configuration (Ctrl-C stops it).
run: deps
	$(CARGO) run --release -j$(JOBS) -p kiwi-node -- --config data-node/config/kiwi-node.example.toml

## Run the whole test suite.
test: deps
	$(CARGO) test --workspace -j$(JOBS)

## Print the storage benchmark table (release build, a few minutes).
bench-storage: deps
	$(CARGO) bench -j$(JOBS) -p kiwi-storage --bench storage

## Stream a 300 MiB snapshot between two RocksDB stores; print time and peak memory.
bench-snapshot: deps
	$(CARGO) bench -j$(JOBS) --workspace --bench snapshot

## Install the system packages the build needs, if missing.
deps:
	@dpkg -s libclang-dev >/dev/null 2>&1 && command -v c++ >/dev/null 2>&1 || \
		{ $(SUDO) apt-get update && $(SUDO) apt-get install -y --no-install-recommends libclang-dev g++; }
