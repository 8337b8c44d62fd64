//! `RocksDBBackend`: RocksDB through the `rocksdb` crate. Each [`KeySpace`] is a column family; a batch
//! spanning them is one atomic RocksDB write.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rocksdb::{
    ColumnFamily, DB, DBRawIteratorWithThreadMode, ErrorKind, Options, ReadOptions,
    SnapshotWithThreadMode,
};

use crate::backend::{
    BackendKind, EngineStats, KeySpace, KvPair, Limits, Scan, StorageBackend, StorageSnapshot,
    WriteBatch, WriteOp, WriteOptions,
};
use crate::error::{Error, Result};

/// The RocksDB backend.
pub struct RocksDBBackend {
    db: Arc<DB>,
    path: PathBuf,
    limits: Limits,
}

impl std::fmt::Debug for RocksDBBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RocksDBBackend")
            .field("path", &self.path)
            .finish()
    }
}

fn map_err(path: &Path) -> impl Fn(rocksdb::Error) -> Error + '_ {
    move |e| match e.kind() {
        ErrorKind::Corruption => Error::Corruption {
            backend: BackendKind::RocksDb,
            path: path.to_path_buf(),
            detail: e.into_string(),
        },
        _ => Error::Engine {
            backend: BackendKind::RocksDb,
            detail: e.into_string(),
        },
    }
}

impl RocksDBBackend {
    /// Opens (or creates) the RocksDB store in `engine_dir`, which the caller has prepared.
    ///
    /// # Errors
    /// [`Error::Corruption`] when RocksDB finds its files damaged; [`Error::Engine`] otherwise.
    pub(crate) fn open(engine_dir: &Path, limits: Limits) -> Result<Self> {
        let mut opts = Options::default();
        opts.create_if_missing(true);
        opts.create_missing_column_families(true);
        opts.set_paranoid_checks(true);
        opts.increase_parallelism(2);
        // Applies are written without fsync and made durable in one `sync` before the Raft log is
        // compacted; asking the OS to write the WAL back every 512 KiB keeps that fsync, and the disk
        // queue the Raft log's fsyncs share, from a burst of megabytes (make bench-ab, put rows: +7 to
        // +11 % puts/s, 64-worker p99 14.7 -> 11.1 ms).
        opts.set_wal_bytes_per_sync(512 * 1024);
        let cfs = KeySpace::ALL.map(KeySpace::column_family);
        let db = DB::open_cf(&opts, engine_dir, cfs).map_err(map_err(engine_dir))?;
        Ok(RocksDBBackend {
            db: Arc::new(db),
            path: engine_dir.to_path_buf(),
            limits,
        })
    }

    fn cf(&self, space: KeySpace) -> &ColumnFamily {
        cf(&self.db, space)
    }
}

fn cf(db: &DB, space: KeySpace) -> &ColumnFamily {
    db.cf_handle(space.column_family())
        .expect("every key space's column family is created at open")
}

/// Read options bounding an iterator to the scan's range. `None` when the range is empty.
fn bounded_read_options(scan: &Scan) -> Option<ReadOptions> {
    if scan.range.is_empty() {
        return None;
    }
    let mut ro = ReadOptions::default();
    let (lower, upper) = scan.range.to_half_open();
    if let Some(lower) = lower {
        ro.set_iterate_lower_bound(lower);
    }
    if let Some(upper) = upper {
        ro.set_iterate_upper_bound(upper);
    }
    Some(ro)
}

/// Collects up to `scan.limit` pairs from an iterator already bounded to the range.
fn collect(
    mut it: DBRawIteratorWithThreadMode<'_, DB>,
    scan: &Scan,
    path: &Path,
) -> Result<Vec<KvPair>> {
    let mut out = Vec::with_capacity(scan.limit.min(1024));
    if scan.reverse {
        it.seek_to_last();
    } else {
        it.seek_to_first();
    }
    while out.len() < scan.limit {
        let Some((k, v)) = it.item() else { break };
        out.push((k.to_vec(), v.to_vec()));
        if scan.reverse {
            it.prev();
        } else {
            it.next();
        }
    }
    it.status().map_err(map_err(path))?;
    Ok(out)
}

impl StorageBackend for RocksDBBackend {
    fn kind(&self) -> BackendKind {
        BackendKind::RocksDb
    }

    fn engine_stats(&self) -> EngineStats {
        // Summed over the column families (one per key space); a property RocksDB cannot give is unknown.
        let sum = |name: &str| -> Option<u64> {
            KeySpace::ALL.iter().try_fold(0u64, |acc, &space| {
                let v = self.db.property_int_value_cf(self.cf(space), name).ok()??;
                Some(acc.saturating_add(v))
            })
        };
        let any = |name: &str| -> Option<u64> {
            KeySpace::ALL
                .iter()
                .filter_map(|&space| self.db.property_int_value_cf(self.cf(space), name).ok()?)
                .max()
        };
        EngineStats {
            estimated_keys: sum("rocksdb.estimate-num-keys"),
            live_sst_bytes: sum("rocksdb.live-sst-files-size"),
            memtable_bytes: sum("rocksdb.cur-size-all-mem-tables"),
            pending_compaction_bytes: sum("rocksdb.estimate-pending-compaction-bytes"),
            write_stopped: any("rocksdb.is-write-stopped"),
            // Column families share the default block cache: its usage is the same through each.
            block_cache_bytes: any("rocksdb.block-cache-usage"),
        }
    }

    fn limits(&self) -> Limits {
        self.limits
    }

    fn compact_all(&self) -> Result<()> {
        let mut opts = rocksdb::CompactOptions::default();
        // Rewrite the bottom level too, so that range tombstones and the data they cover are gone.
        opts.set_bottommost_level_compaction(rocksdb::BottommostLevelCompaction::Force);
        for space in KeySpace::ALL {
            self.db
                .compact_range_cf_opt(self.cf(space), None::<&[u8]>, None::<&[u8]>, &opts);
        }
        Ok(())
    }

    fn read(&self, space: KeySpace, key: &[u8]) -> Result<Option<Vec<u8>>> {
        self.limits.check_key(space, key)?;
        self.db
            .get_cf(self.cf(space), key)
            .map_err(map_err(&self.path))
    }

    fn batch_write(&self, batch: WriteBatch, opts: WriteOptions) -> Result<()> {
        self.limits.check_batch(&batch)?;
        if batch.is_empty() {
            return Ok(());
        }
        let mut wb = rocksdb::WriteBatch::default();
        for op in &batch.ops {
            match op {
                WriteOp::Put { space, key, value } => wb.put_cf(self.cf(*space), key, value),
                WriteOp::Delete { space, key } => wb.delete_cf(self.cf(*space), key),
                // RocksDB refuses a range whose end comes before its start; it means nothing here.
                WriteOp::DeleteRange { space, start, end } if start < end => {
                    wb.delete_range_cf(self.cf(*space), start, end);
                }
                WriteOp::DeleteRange { .. } => {}
            }
        }
        let mut wo = rocksdb::WriteOptions::default();
        wo.set_sync(opts.sync);
        self.db.write_opt(wb, &wo).map_err(map_err(&self.path))
    }

    /// RocksDB's `SyncWAL`: the log files are fsynced outside the write queue, so writes go on meanwhile
    /// (a write with sync on would hold every writer behind it for the fsync).
    fn sync(&self) -> Result<()> {
        self.db.flush_wal(true).map_err(map_err(&self.path))
    }

    fn scan(&self, space: KeySpace, scan: &Scan) -> Result<Vec<KvPair>> {
        scan.check()?;
        let Some(ro) = bounded_read_options(scan) else {
            return Ok(Vec::new());
        };
        collect(
            self.db.raw_iterator_cf_opt(self.cf(space), ro),
            scan,
            &self.path,
        )
    }

    fn snapshot(&self) -> Result<Box<dyn StorageSnapshot>> {
        let snap = self.db.snapshot();
        // SAFETY: the snapshot borrows the `DB` inside `self.db`. `RocksSnapshot` keeps a clone of that
        // `Arc`, so the `DB` lives at least as long as the snapshot, and its fields are declared so that the
        // snapshot is dropped (released) before the `Arc`. The `'static` lifetime never escapes the struct.
        let snap: SnapshotWithThreadMode<'static, DB> = unsafe { std::mem::transmute(snap) };
        Ok(Box::new(RocksSnapshot {
            snap,
            db: Arc::clone(&self.db),
            path: self.path.clone(),
        }))
    }
}

/// A RocksDB snapshot that owns a handle on its database.
struct RocksSnapshot {
    // Dropped first: releases the snapshot while the database is still open.
    snap: SnapshotWithThreadMode<'static, DB>,
    db: Arc<DB>,
    path: PathBuf,
}

impl StorageSnapshot for RocksSnapshot {
    fn read(&self, space: KeySpace, key: &[u8]) -> Result<Option<Vec<u8>>> {
        self.snap
            .get_cf(cf(&self.db, space), key)
            .map_err(map_err(&self.path))
    }

    fn scan(&self, space: KeySpace, scan: &Scan) -> Result<Vec<KvPair>> {
        scan.check()?;
        let Some(ro) = bounded_read_options(scan) else {
            return Ok(Vec::new());
        };
        collect(
            self.snap.raw_iterator_cf_opt(cf(&self.db, space), ro),
            scan,
            &self.path,
        )
    }
}
