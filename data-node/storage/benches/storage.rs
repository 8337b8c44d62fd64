//! Storage benchmark: put / get / batch-of-100 throughput per backend, with sync on and off, over a key
//! space of at least one million keys with 256-byte values. Prints one table; no test checks its figures.
//!
//! Run: `cargo bench -p kiwi-storage --bench storage` (release build). Options, as environment variables:
//! `KIWI_BENCH_KEYS` (key space, default 1,000,000), `KIWI_BENCH_SECS` (seconds per measurement, default
//! 3), `KIWI_BENCH_BACKENDS` (comma-separated, default `rocksdb,leveldb,memory`), `KIWI_BENCH_DIR` (where the
//! stores go, default a temporary directory).
//!
//! Each backend is preloaded with every key of the key space (buffered batches of 1,000), then each
//! operation runs single-threaded for the configured time on uniformly random keys.

use std::time::{Duration, Instant};

use kiwi_storage::{BackendKind, KeySpace, OpenOptions, StorageBackend, WriteBatch, WriteOptions};
use rand::{Rng, SeedableRng, rngs::StdRng};

const VALUE_SIZE: usize = 256;

fn env<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn key(i: u64) -> [u8; 16] {
    let mut k = *b"key-000000000000";
    k[4..].copy_from_slice(format!("{i:012}").as_bytes());
    k
}

struct Row {
    op: &'static str,
    sync: bool,
    ops: u64,
    elapsed: Duration,
    lat: hdrhistogram::Histogram<u64>,
}

fn measure(op: &'static str, sync: bool, secs: f64, mut f: impl FnMut() -> u64) -> Row {
    let mut lat = hdrhistogram::Histogram::new(3).unwrap();
    let start = Instant::now();
    let deadline = start + Duration::from_secs_f64(secs);
    let mut ops = 0;
    while Instant::now() < deadline {
        let t = Instant::now();
        ops += f();
        lat.record(t.elapsed().as_nanos() as u64).unwrap();
    }
    Row {
        op,
        sync,
        ops,
        elapsed: start.elapsed(),
        lat,
    }
}

fn bench(kind: BackendKind, keys: u64, secs: f64, root: &std::path::Path) -> Vec<Row> {
    let store = kiwi_storage::open(&OpenOptions::new(kind, root.join(kind.as_str()))).unwrap();
    let value = vec![0x5A; VALUE_SIZE];
    let load_start = Instant::now();
    let mut i = 0;
    while i < keys {
        let mut b = WriteBatch::new();
        for j in i..(i + 1000).min(keys) {
            b.put(KeySpace::Data, key(j), value.clone());
        }
        store.batch_write(b, WriteOptions::BUFFERED).unwrap();
        i += 1000;
        if i % 200_000 == 0 {
            eprint!("\r{kind}: preloaded {i}/{keys} keys");
        }
    }
    eprintln!(
        "\r{kind}: preloaded {keys} keys in {:.1} s",
        load_start.elapsed().as_secs_f64()
    );

    let mut rng = StdRng::seed_from_u64(7);
    let mut rows = Vec::new();
    for sync in [false, true] {
        let opts = WriteOptions { sync };
        let s: &dyn StorageBackend = &*store;
        rows.push(measure("put", sync, secs, || {
            s.write(
                KeySpace::Data,
                &key(rng.random_range(0..keys)),
                &value,
                opts,
            )
            .unwrap();
            1
        }));
        rows.push(measure("batch-100", sync, secs, || {
            let mut b = WriteBatch::new();
            for _ in 0..100 {
                b.put(
                    KeySpace::Data,
                    key(rng.random_range(0..keys)),
                    value.clone(),
                );
            }
            s.batch_write(b, opts).unwrap();
            100
        }));
    }
    let s: &dyn StorageBackend = &*store;
    let mut found = 0u64;
    let mut row = measure("get", false, secs, || {
        found += u64::from(
            s.read(KeySpace::Data, &key(rng.random_range(0..keys)))
                .unwrap()
                .is_some(),
        );
        1
    });
    assert_eq!(found, row.ops, "{kind}: a preloaded key was missing");
    row.sync = false;
    rows.push(row);
    rows
}

fn main() {
    let keys: u64 = env("KIWI_BENCH_KEYS", 1_000_000);
    let secs: f64 = env("KIWI_BENCH_SECS", 3.0);
    let backends: String = env("KIWI_BENCH_BACKENDS", "rocksdb,leveldb,memory".to_string());
    let tmp = tempfile::tempdir().unwrap();
    let root = std::env::var("KIWI_BENCH_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|_| tmp.path().to_path_buf());
    println!(
        "storage benchmark: {keys} keys, {VALUE_SIZE}-byte values, {secs} s per measurement, 1 thread"
    );
    println!(
        "{:<9} {:<10} {:<5} {:>12} {:>10} {:>10} {:>10}",
        "backend", "op", "sync", "keys/s", "p50 µs", "p99 µs", "max µs"
    );
    for name in backends.split(',') {
        let kind: BackendKind = name.trim().parse().unwrap();
        for r in bench(kind, keys, secs, &root) {
            println!(
                "{:<9} {:<10} {:<5} {:>12.0} {:>10.1} {:>10.1} {:>10.1}",
                kind.as_str(),
                r.op,
                if r.op == "get" {
                    "-"
                } else if r.sync {
                    "on"
                } else {
                    "off"
                },
                r.ops as f64 / r.elapsed.as_secs_f64(),
                r.lat.value_at_quantile(0.5) as f64 / 1000.0,
                r.lat.value_at_quantile(0.99) as f64 / 1000.0,
                r.lat.max() as f64 / 1000.0,
            );
        }
    }
}
