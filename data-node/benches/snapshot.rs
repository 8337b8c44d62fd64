//! Snapshot benchmark: streams a large state machine from one RocksDB store to another the way a Raft
//! snapshot travels (pinned view → chunks → staging → atomic install) and reports the time taken and how
//! much the process's peak memory grew while doing it. The point is the memory: it must stay flat, not
//! grow with the data.
//!
//! Run: `make bench-snapshot`, or `cargo bench -p kiwi-node --bench snapshot`. Environment:
//! `KIWI_SNAPSHOT_MB` (state size, default 300), `KIWI_BENCH_DIR` (where the stores go, default a
//! temporary directory). Peak memory is the kernel's VmHWM, reset (via /proc/self/clear_refs) after the
//! source store is filled, so the figure covers only building, sending, staging and installing.

use std::sync::Arc;
use std::time::Instant;

use kiwi_node::raft::log_store::LogStore;
use kiwi_node::raft::snapshot;
use kiwi_storage::{
    BackendKind, KeySpace, Limits, OpenOptions, StorageBackend, WriteBatch, WriteOptions,
};
use raft::eraftpb::SnapshotMetadata;

const VALUE_SIZE: usize = 1024;

fn status_kib(field: &str) -> u64 {
    let text = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    text.lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

fn open(path: std::path::PathBuf) -> Arc<dyn StorageBackend> {
    kiwi_storage::open(&OpenOptions {
        kind: BackendKind::RocksDb,
        path,
        limits: Limits::default(),
        create_if_missing: true,
    })
    .expect("open RocksDB")
}

fn main() {
    let mb: u64 = std::env::var("KIWI_SNAPSHOT_MB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(300);
    let root = match std::env::var_os("KIWI_BENCH_DIR") {
        Some(d) => tempfile::tempdir_in(d),
        None => tempfile::tempdir(),
    }
    .expect("bench dir");
    let keys = mb * 1024 * 1024 / VALUE_SIZE as u64;
    let source = open(root.path().join("leader"));
    let follower = open(root.path().join("follower"));

    let fill = Instant::now();
    let value = vec![b'v'; VALUE_SIZE];
    for start in (0..keys).step_by(1000) {
        let mut batch = WriteBatch::new();
        for i in start..(start + 1000).min(keys) {
            batch.put(KeySpace::Data, format!("key-{i:012}"), value.clone());
        }
        source
            .batch_write(batch, WriteOptions::BUFFERED)
            .expect("fill");
    }
    println!(
        "filled the source with {keys} keys x {VALUE_SIZE} B = {mb} MiB in {:.1} s",
        fill.elapsed().as_secs_f64()
    );

    let reset = std::fs::write("/proc/self/clear_refs", "5").is_ok();
    let rss_before = status_kib("VmRSS:");
    let start = Instant::now();
    let view = source.snapshot().expect("pin a view");
    let mut store = LogStore::in_backend(Arc::clone(&follower), Arc::default()).expect("log store");
    store.bootstrap(vec![1, 2]).expect("bootstrap");
    snapshot::clear_staging(&*follower).expect("clear staging");
    let mut after: Option<Vec<u8>> = None;
    let (mut chunks, mut pairs) = (0u64, 0u64);
    loop {
        let chunk = snapshot::read_chunk(&*view, after.as_deref()).expect("read chunk");
        let Some(last) = chunk.last() else { break };
        after = Some(last.key.clone());
        chunks += 1;
        pairs += chunk.len() as u64;
        snapshot::stage(&*follower, chunk).expect("stage");
    }
    let streamed = start.elapsed();
    let meta = SnapshotMetadata {
        index: 1_000_000,
        term: 2,
        ..SnapshotMetadata::default()
    };
    let installed = snapshot::install(
        &*follower,
        &mut store,
        &meta,
        &[],
        &[],
        &snapshot::InstallGate::default(),
    )
    .expect("install");
    let total = start.elapsed();
    assert_eq!(installed, keys, "every pair arrived");
    assert_eq!(pairs, keys);
    let peak = status_kib("VmHWM:");
    println!(
        "snapshot of {mb} MiB ({keys} pairs, {chunks} chunks of <= {} pairs):",
        snapshot::CHUNK_KEYS
    );
    println!(
        "  read + stage: {:.1} s, install: {:.1} s, total {:.1} s ({:.0} MiB/s)",
        streamed.as_secs_f64(),
        (total - streamed).as_secs_f64(),
        total.as_secs_f64(),
        mb as f64 / total.as_secs_f64()
    );
    println!(
        "  RSS before: {} MiB; peak during: {} MiB{}",
        rss_before / 1024,
        peak / 1024,
        if reset {
            ""
        } else {
            " (peak not reset: includes the fill)"
        }
    );
}
