//! Storage metrics: [`InstrumentedBackend`] times every call into the storage engine and counts its
//! bytes (applies, client reads and scans alike; the Raft log only with the in-memory backend, whose log
//! is kept in it), and [`register_engine_gauges`] reports
//! what the engine tells about itself plus the data directory's size on disk.
//!
//! Exported (family `storage`):
//! - `kiwi_storage_operation_duration_seconds{op,backend}` histogram; `op` is `read`, `write` (a batch),
//!   `scan`, `snapshot` (taking a point-in-time view) or `sync` (making earlier writes durable);
//! - `kiwi_storage_operation_bytes_total{op,backend}`: keys plus values read or written;
//! - `kiwi_storage_operation_errors_total{op,backend}`;
//! - `kiwi_storage_engine_*{backend}` gauges (only those the engine knows) and
//!   `kiwi_storage_data_dir_bytes{backend}`;
//! - `kiwi_storage_raft_log_dir_bytes`: the Raft log's own files (`raft-log/`; not with the in-memory
//!   backend, whose log is in the backend).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use kiwi_storage::{
    BackendKind, EngineStats, KeySpace, KvPair, Limits, Scan, StorageBackend, StorageSnapshot,
    WriteBatch, WriteOp, WriteOptions,
};
use opentelemetry::KeyValue;
use opentelemetry::metrics::{Counter, Histogram, Meter};

use super::metrics::LATENCY_BUCKETS;

#[derive(Clone, Copy)]
enum Op {
    Read,
    Write,
    Scan,
    Snapshot,
    Sync,
}

impl Op {
    const ALL: [Op; 5] = [Op::Read, Op::Write, Op::Scan, Op::Snapshot, Op::Sync];

    fn name(self) -> &'static str {
        match self {
            Op::Read => "read",
            Op::Write => "write",
            Op::Scan => "scan",
            Op::Snapshot => "snapshot",
            Op::Sync => "sync",
        }
    }
}

struct Instruments {
    duration: Histogram<f64>,
    bytes: Counter<u64>,
    errors: Counter<u64>,
    /// Attributes per [`Op`], built once.
    attrs: [[KeyValue; 2]; 5],
}

impl Instruments {
    fn new(meter: &Meter, backend: BackendKind) -> Instruments {
        let instruments = Instruments {
            duration: meter
                .f64_histogram("kiwi_storage_operation_duration")
                .with_unit("s")
                .with_description("Time of one call into the storage engine")
                .with_boundaries(LATENCY_BUCKETS.to_vec())
                .build(),
            bytes: meter
                .u64_counter("kiwi_storage_operation")
                .with_unit("By")
                .with_description("Key and value bytes read or written by storage calls")
                .build(),
            errors: meter
                .u64_counter("kiwi_storage_operation_errors")
                .with_description("Storage calls that failed")
                .build(),
            attrs: Op::ALL.map(|op| {
                [
                    KeyValue::new("op", op.name()),
                    KeyValue::new("backend", backend.as_str()),
                ]
            }),
        };
        // Counters start at zero, so their series exist before the first event.
        for attrs in &instruments.attrs {
            instruments.bytes.add(0, attrs);
            instruments.errors.add(0, attrs);
        }
        instruments
    }

    fn record<T>(
        &self,
        op: Op,
        started: Instant,
        r: &kiwi_storage::Result<T>,
        bytes: impl FnOnce(&T) -> usize,
    ) {
        let attrs = &self.attrs[op as usize];
        self.duration.record(started.elapsed().as_secs_f64(), attrs);
        match r {
            Ok(v) => {
                let n = bytes(v);
                if n > 0 {
                    self.bytes.add(n as u64, attrs);
                }
            }
            Err(_) => self.errors.add(1, attrs),
        }
    }
}

fn pairs_bytes(pairs: &[KvPair]) -> usize {
    pairs.iter().map(|(k, v)| k.len() + v.len()).sum()
}

fn batch_bytes(batch: &WriteBatch) -> usize {
    batch
        .ops
        .iter()
        .map(|op| match op {
            WriteOp::Put { key, value, .. } => key.len() + value.len(),
            WriteOp::Delete { key, .. } => key.len(),
            WriteOp::DeleteRange { start, end, .. } => start.len() + end.len(),
        })
        .sum()
}

/// A backend that records metrics about every call and forwards it.
pub struct InstrumentedBackend {
    inner: Arc<dyn StorageBackend>,
    instruments: Arc<Instruments>,
}

impl InstrumentedBackend {
    /// Wraps `inner`, recording into `meter`.
    pub fn wrap(inner: Arc<dyn StorageBackend>, meter: &Meter) -> Arc<dyn StorageBackend> {
        let instruments = Arc::new(Instruments::new(meter, inner.kind()));
        Arc::new(InstrumentedBackend { inner, instruments })
    }
}

impl StorageBackend for InstrumentedBackend {
    fn kind(&self) -> BackendKind {
        self.inner.kind()
    }

    fn limits(&self) -> Limits {
        self.inner.limits()
    }

    fn read(&self, space: KeySpace, key: &[u8]) -> kiwi_storage::Result<Option<Vec<u8>>> {
        let started = Instant::now();
        let r = self.inner.read(space, key);
        self.instruments.record(Op::Read, started, &r, |v| {
            key.len() + v.as_ref().map_or(0, Vec::len)
        });
        r
    }

    fn batch_write(&self, batch: WriteBatch, opts: WriteOptions) -> kiwi_storage::Result<()> {
        let bytes = batch_bytes(&batch);
        let started = Instant::now();
        let r = self.inner.batch_write(batch, opts);
        self.instruments.record(Op::Write, started, &r, |()| bytes);
        r
    }

    fn scan(&self, space: KeySpace, scan: &Scan) -> kiwi_storage::Result<Vec<KvPair>> {
        let started = Instant::now();
        let r = self.inner.scan(space, scan);
        self.instruments
            .record(Op::Scan, started, &r, |p| pairs_bytes(p));
        r
    }

    fn snapshot(&self) -> kiwi_storage::Result<Box<dyn StorageSnapshot>> {
        let started = Instant::now();
        let r = self.inner.snapshot();
        self.instruments.record(Op::Snapshot, started, &r, |_| 0);
        let view = r?;
        Ok(Box::new(InstrumentedSnapshot {
            inner: view,
            instruments: Arc::clone(&self.instruments),
        }))
    }

    fn engine_stats(&self) -> EngineStats {
        self.inner.engine_stats()
    }

    fn compact_all(&self) -> kiwi_storage::Result<()> {
        self.inner.compact_all()
    }

    fn sync(&self) -> kiwi_storage::Result<()> {
        let started = Instant::now();
        let r = self.inner.sync();
        self.instruments.record(Op::Sync, started, &r, |()| 0);
        r
    }

    fn write(
        &self,
        space: KeySpace,
        key: &[u8],
        value: &[u8],
        opts: WriteOptions,
    ) -> kiwi_storage::Result<()> {
        let started = Instant::now();
        let r = self.inner.write(space, key, value, opts);
        self.instruments
            .record(Op::Write, started, &r, |()| key.len() + value.len());
        r
    }

    fn delete(&self, space: KeySpace, key: &[u8], opts: WriteOptions) -> kiwi_storage::Result<()> {
        let started = Instant::now();
        let r = self.inner.delete(space, key, opts);
        self.instruments
            .record(Op::Write, started, &r, |()| key.len());
        r
    }
}

struct InstrumentedSnapshot {
    inner: Box<dyn StorageSnapshot>,
    instruments: Arc<Instruments>,
}

impl StorageSnapshot for InstrumentedSnapshot {
    fn read(&self, space: KeySpace, key: &[u8]) -> kiwi_storage::Result<Option<Vec<u8>>> {
        let started = Instant::now();
        let r = self.inner.read(space, key);
        self.instruments.record(Op::Read, started, &r, |v| {
            key.len() + v.as_ref().map_or(0, Vec::len)
        });
        r
    }

    fn scan(&self, space: KeySpace, scan: &Scan) -> kiwi_storage::Result<Vec<KvPair>> {
        let started = Instant::now();
        let r = self.inner.scan(space, scan);
        self.instruments
            .record(Op::Scan, started, &r, |p| pairs_bytes(p));
        r
    }
}

/// Bytes of the files under `dir` (0 for what cannot be read: files come and go during compactions).
pub fn dir_size(dir: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .flatten()
        .map(|e| match e.file_type() {
            Ok(t) if t.is_dir() => dir_size(&e.path()),
            Ok(_) => e.metadata().map_or(0, |m| m.len()),
            Err(_) => 0,
        })
        .sum()
}

/// Registers the engine's own figures, the data directory's size and that of the Raft log's directory
/// (`log_dir`, when the log has one), read at each scrape.
pub fn register_engine_gauges(
    meter: &Meter,
    storage: Arc<dyn StorageBackend>,
    data_dir: PathBuf,
    log_dir: Option<PathBuf>,
) {
    let backend = [KeyValue::new("backend", storage.kind().as_str())];
    type Pick = fn(&EngineStats) -> Option<u64>;
    let engine: [(&str, &str, &str, Pick); 6] = [
        (
            "kiwi_storage_engine_estimated_keys",
            "",
            "Keys the engine estimates it holds",
            |s| s.estimated_keys,
        ),
        (
            "kiwi_storage_engine_live_sst",
            "By",
            "Bytes of live SST files",
            |s| s.live_sst_bytes,
        ),
        (
            "kiwi_storage_engine_memtable",
            "By",
            "Bytes held by memtables",
            |s| s.memtable_bytes,
        ),
        (
            "kiwi_storage_engine_pending_compaction",
            "By",
            "Bytes compaction still has to rewrite",
            |s| s.pending_compaction_bytes,
        ),
        (
            "kiwi_storage_engine_write_stopped",
            "",
            "1 while the engine stops writes (a write stall)",
            |s| s.write_stopped,
        ),
        (
            "kiwi_storage_engine_block_cache",
            "By",
            "Bytes used in the block cache",
            |s| s.block_cache_bytes,
        ),
    ];
    for (name, unit, description, pick) in engine {
        // Only what this engine can tell: a gauge that is always absent would only mislead.
        if pick(&storage.engine_stats()).is_none() {
            continue;
        }
        let storage = Arc::clone(&storage);
        let attrs = backend.clone();
        meter
            .u64_observable_gauge(name)
            .with_unit(unit)
            .with_description(description)
            .with_callback(move |o| {
                if let Some(v) = pick(&storage.engine_stats()) {
                    o.observe(v, &attrs);
                }
            })
            .build();
    }
    meter
        .u64_observable_gauge("kiwi_storage_data_dir")
        .with_unit("By")
        .with_description("Size on disk of the storage engine's files")
        .with_callback(move |o| o.observe(dir_size(&data_dir), &backend))
        .build();
    if let Some(dir) = log_dir {
        meter
            .u64_observable_gauge("kiwi_storage_raft_log_dir")
            .with_unit("By")
            .with_description("Size on disk of the Raft log's files")
            .with_callback(move |o| o.observe(dir_size(&dir), &[]))
            .build();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::telemetry::metrics::{Family, MetricsRegistry};
    use kiwi_storage::{MemoryBackend, ScanRange};

    #[test]
    fn every_call_is_timed_and_counted() {
        let registry = MetricsRegistry::new().unwrap();
        let meters = registry.meters();
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("f"), [0u8; 100]).unwrap();
        let inner: Arc<dyn StorageBackend> = Arc::new(MemoryBackend::new(Limits::default()));
        let st = InstrumentedBackend::wrap(Arc::clone(&inner), &meters.storage);
        let log_dir = tempfile::tempdir().unwrap();
        std::fs::write(log_dir.path().join("0001.raftlog"), [0u8; 70]).unwrap();
        register_engine_gauges(
            &meters.storage,
            st.clone(),
            dir.path().to_path_buf(),
            Some(log_dir.path().to_path_buf()),
        );
        st.write(KeySpace::Data, b"k", b"vv", WriteOptions::default())
            .unwrap();
        assert_eq!(
            st.read(KeySpace::Data, b"k").unwrap().as_deref(),
            Some(&b"vv"[..])
        );
        let view = st.snapshot().unwrap();
        let pairs = view
            .scan(KeySpace::Data, &Scan::forward(ScanRange::all(), 10))
            .unwrap();
        assert_eq!(pairs.len(), 1);
        assert!(st.read(KeySpace::Data, b"").is_err());
        let out = registry.render(Some(Family::Storage));
        for want in [
            "kiwi_storage_operation_duration_seconds_count{backend=\"memory\",op=\"write\"} 1",
            "kiwi_storage_operation_duration_seconds_count{backend=\"memory\",op=\"read\"} 2",
            "kiwi_storage_operation_duration_seconds_count{backend=\"memory\",op=\"snapshot\"} 1",
            "kiwi_storage_operation_bytes_total{backend=\"memory\",op=\"write\"} 3",
            "kiwi_storage_operation_bytes_total{backend=\"memory\",op=\"read\"} 3",
            "kiwi_storage_operation_bytes_total{backend=\"memory\",op=\"scan\"} 3",
            "kiwi_storage_operation_errors_total{backend=\"memory\",op=\"read\"} 1",
            "kiwi_storage_engine_estimated_keys{backend=\"memory\"} 1",
            "kiwi_storage_data_dir_bytes{backend=\"memory\"} 100",
            "kiwi_storage_raft_log_dir_bytes 70",
        ] {
            assert!(out.contains(want), "missing {want} in\n{out}");
        }
        assert!(!out.contains("live_sst"), "{out}");
    }
}
