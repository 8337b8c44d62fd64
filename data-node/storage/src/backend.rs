//! The `StorageBackend` trait and the engine-independent types around it.
//!
//! This module knows no engine: it must never depend on RocksDB or LevelDB. Engines implement the trait in
//! their own modules, and one conformance suite (`kiwi-tests`) runs against all of them.

use std::fmt;
use std::ops::Bound;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// Which engine stores the data.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BackendKind {
    /// RocksDB, through the `rocksdb` crate. The default.
    #[serde(rename = "rocksdb")]
    RocksDb,
    /// LevelDB, through the pure-Rust `rusty-leveldb` crate.
    #[serde(rename = "leveldb")]
    LevelDb,
    /// An ordered map in memory; nothing survives the process. For tests.
    Memory,
}

impl BackendKind {
    /// Every backend, in the order the docs list them.
    pub const ALL: [BackendKind; 3] = [
        BackendKind::RocksDb,
        BackendKind::LevelDb,
        BackendKind::Memory,
    ];

    /// The name used in config files and in the data directory's marker.
    pub fn as_str(self) -> &'static str {
        match self {
            BackendKind::RocksDb => "rocksdb",
            BackendKind::LevelDb => "leveldb",
            BackendKind::Memory => "memory",
        }
    }
}

impl fmt::Display for BackendKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for BackendKind {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        BackendKind::ALL
            .into_iter()
            .find(|k| k.as_str() == s)
            .ok_or_else(|| {
                format!("unknown storage backend {s:?}: expected rocksdb, leveldb or memory")
            })
    }
}

/// Separate key spaces that share one backend. Column families in RocksDB, a one-byte key prefix in the
/// other engines. A batch may span key spaces and stays atomic.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum KeySpace {
    /// Users' keys and values. The only key space the size limits apply to.
    Data,
    /// Raft's log, hard state, conf state, applied index and the node's identity.
    Raft,
    /// The state machine's kept history of changes (events by revision and their index by key), which
    /// watches from a past revision and reads at a past revision are served from.
    History,
}

impl KeySpace {
    /// Every key space.
    pub const ALL: [KeySpace; 3] = [KeySpace::Data, KeySpace::Raft, KeySpace::History];

    /// The one-byte prefix that engines without column families put before the key.
    pub fn prefix(self) -> u8 {
        match self {
            KeySpace::Data => b'd',
            KeySpace::Raft => b'r',
            KeySpace::History => b'h',
        }
    }

    /// The column family name, for engines that have them.
    pub fn column_family(self) -> &'static str {
        match self {
            KeySpace::Data => "default",
            KeySpace::Raft => "raft",
            KeySpace::History => "history",
        }
    }
}

/// Size limits for user data, checked before anything is written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Longest key, in bytes.
    pub max_key_bytes: usize,
    /// Longest value, in bytes.
    pub max_value_bytes: usize,
}

/// Default longest key: 8 KiB.
pub const DEFAULT_MAX_KEY_BYTES: usize = 8 * 1024;
/// Default longest value: 4 MiB.
pub const DEFAULT_MAX_VALUE_BYTES: usize = 4 * 1024 * 1024;

/// The largest key any node may be configured to accept (`storage.max_key_size` ceiling): 1 MiB.
pub const MAX_KEY_BYTES_CEILING: usize = 1024 * 1024;
/// The largest value any node may be configured to accept (`storage.max_value_size` ceiling): 64 MiB.
pub const MAX_VALUE_BYTES_CEILING: usize = 64 * 1024 * 1024;

impl Limits {
    /// The ceilings every node shares, whatever its configuration. A node's storage enforces only these:
    /// its configured (lower) limits are admission rules checked when a request is accepted, so that a
    /// committed entry, valid under the proposer's limits, is applied identically on every node.
    pub const CEILING: Limits = Limits {
        max_key_bytes: MAX_KEY_BYTES_CEILING,
        max_value_bytes: MAX_VALUE_BYTES_CEILING,
    };
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_key_bytes: DEFAULT_MAX_KEY_BYTES,
            max_value_bytes: DEFAULT_MAX_VALUE_BYTES,
        }
    }
}

impl Limits {
    /// Checks a key. Every key space refuses empty keys; only [`KeySpace::Data`] has a size limit.
    ///
    /// # Errors
    /// [`Error::EmptyKey`] or [`Error::KeyTooLarge`].
    pub fn check_key(&self, space: KeySpace, key: &[u8]) -> Result<()> {
        if key.is_empty() {
            return Err(Error::EmptyKey {
                max: self.max_key_bytes,
            });
        }
        if space == KeySpace::Data && key.len() > self.max_key_bytes {
            return Err(Error::KeyTooLarge {
                len: key.len(),
                max: self.max_key_bytes,
            });
        }
        Ok(())
    }

    /// Checks a value. Only [`KeySpace::Data`] has a size limit: Raft entries carry whole batches.
    ///
    /// # Errors
    /// [`Error::ValueTooLarge`].
    pub fn check_value(&self, space: KeySpace, value: &[u8]) -> Result<()> {
        if space == KeySpace::Data && value.len() > self.max_value_bytes {
            return Err(Error::ValueTooLarge {
                len: value.len(),
                max: self.max_value_bytes,
            });
        }
        Ok(())
    }

    /// Checks every operation of a batch, so that a bad one refuses the whole batch before anything is
    /// written.
    ///
    /// # Errors
    /// The first limit an operation breaks.
    pub fn check_batch(&self, batch: &WriteBatch) -> Result<()> {
        for op in &batch.ops {
            match op {
                WriteOp::Put { space, key, value } => {
                    self.check_key(*space, key)?;
                    self.check_value(*space, value)?;
                }
                WriteOp::Delete { space, key } => self.check_key(*space, key)?,
                WriteOp::DeleteRange { space, start, end } => {
                    self.check_key(*space, start)?;
                    self.check_key(*space, end)?;
                }
            }
        }
        Ok(())
    }
}

/// One change in a [`WriteBatch`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WriteOp {
    /// Sets `key` to `value`.
    Put {
        space: KeySpace,
        key: Vec<u8>,
        value: Vec<u8>,
    },
    /// Removes `key` if present.
    Delete { space: KeySpace, key: Vec<u8> },
    /// Removes every key in `[start, end)`, as of this point in the batch (an earlier put in the same
    /// batch is removed too). Nothing when `start >= end`. RocksDB writes one range tombstone, whatever
    /// the range holds; the other engines delete the keys one by one.
    DeleteRange {
        space: KeySpace,
        start: Vec<u8>,
        end: Vec<u8>,
    },
}

/// Changes applied all together or not at all, in order (the last change to a key wins).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct WriteBatch {
    /// The changes, in order.
    pub ops: Vec<WriteOp>,
}

impl WriteBatch {
    /// An empty batch.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a put.
    pub fn put(
        &mut self,
        space: KeySpace,
        key: impl Into<Vec<u8>>,
        value: impl Into<Vec<u8>>,
    ) -> &mut Self {
        self.ops.push(WriteOp::Put {
            space,
            key: key.into(),
            value: value.into(),
        });
        self
    }

    /// Adds a delete.
    pub fn delete(&mut self, space: KeySpace, key: impl Into<Vec<u8>>) -> &mut Self {
        self.ops.push(WriteOp::Delete {
            space,
            key: key.into(),
        });
        self
    }

    /// Adds a delete of every key in `[start, end)` (see [`WriteOp::DeleteRange`]).
    pub fn delete_range(
        &mut self,
        space: KeySpace,
        start: impl Into<Vec<u8>>,
        end: impl Into<Vec<u8>>,
    ) -> &mut Self {
        self.ops.push(WriteOp::DeleteRange {
            space,
            start: start.into(),
            end: end.into(),
        });
        self
    }

    /// Number of changes.
    pub fn len(&self) -> usize {
        self.ops.len()
    }

    /// Whether the batch holds no change.
    pub fn is_empty(&self) -> bool {
        self.ops.is_empty()
    }
}

/// How a write reaches the disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct WriteOptions {
    /// Wait until the batch is durable (fsync of the write-ahead log) before returning. Without it the
    /// batch survives a crash of the process but may be lost on a power cut.
    pub sync: bool,
}

impl WriteOptions {
    /// Durable writes: fsync before returning.
    pub const SYNC: WriteOptions = WriteOptions { sync: true };
    /// Buffered writes: survive a process crash, not a power cut.
    pub const BUFFERED: WriteOptions = WriteOptions { sync: false };
}

/// A key range of one key space for [`StorageBackend::scan`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScanRange {
    /// Lower bound.
    pub start: Bound<Vec<u8>>,
    /// Upper bound.
    pub end: Bound<Vec<u8>>,
}

impl ScanRange {
    /// Every key.
    pub fn all() -> Self {
        ScanRange {
            start: Bound::Unbounded,
            end: Bound::Unbounded,
        }
    }

    /// `[start, end)`; an empty `start` or `end` means unbounded on that side, as in the client API.
    pub fn half_open(start: &[u8], end: &[u8]) -> Self {
        ScanRange {
            start: if start.is_empty() {
                Bound::Unbounded
            } else {
                Bound::Included(start.to_vec())
            },
            end: if end.is_empty() {
                Bound::Unbounded
            } else {
                Bound::Excluded(end.to_vec())
            },
        }
    }

    /// The same range as `[lower, upper)`, the form engines iterate most easily. `None` means unbounded.
    /// Exact in bytewise order, because `k ++ [0x00]` is the smallest key greater than `k`.
    pub fn to_half_open(&self) -> (Option<Vec<u8>>, Option<Vec<u8>>) {
        let lower = match &self.start {
            Bound::Unbounded => None,
            Bound::Included(k) => Some(k.clone()),
            Bound::Excluded(k) => Some(successor(k)),
        };
        let upper = match &self.end {
            Bound::Unbounded => None,
            Bound::Included(k) => Some(successor(k)),
            Bound::Excluded(k) => Some(k.clone()),
        };
        (lower, upper)
    }

    /// Whether the range can hold no key at all.
    pub fn is_empty(&self) -> bool {
        match self.to_half_open() {
            (Some(l), Some(u)) => l >= u,
            _ => false,
        }
    }
}

fn successor(key: &[u8]) -> Vec<u8> {
    let mut k = Vec::with_capacity(key.len() + 1);
    k.extend_from_slice(key);
    k.push(0);
    k
}

/// A scan's request: the range, at most `limit` pairs, ascending or descending.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Scan {
    /// Which keys.
    pub range: ScanRange,
    /// At most this many pairs; at least 1.
    pub limit: usize,
    /// Largest key first.
    pub reverse: bool,
}

impl Scan {
    /// Ascending scan of `range`.
    pub fn forward(range: ScanRange, limit: usize) -> Self {
        Scan {
            range,
            limit,
            reverse: false,
        }
    }

    /// Descending scan of `range`.
    pub fn backward(range: ScanRange, limit: usize) -> Self {
        Scan {
            range,
            limit,
            reverse: true,
        }
    }

    pub(crate) fn check(&self) -> Result<()> {
        if self.limit == 0 {
            return Err(Error::ZeroScanLimit);
        }
        Ok(())
    }
}

/// A key and its value.
pub type KvPair = (Vec<u8>, Vec<u8>);

/// A consistent, point-in-time view of a whole backend, for building Raft snapshots. Writes after the view
/// was taken are invisible to it. Reading it in chunks of [`Scan::limit`] pairs keeps memory bounded by the
/// chunk size, not the data size (except for [`BackendKind::Memory`], which copies its map).
pub trait StorageSnapshot: Send {
    /// Reads one key as of the view.
    ///
    /// # Errors
    /// Engine errors.
    fn read(&self, space: KeySpace, key: &[u8]) -> Result<Option<Vec<u8>>>;

    /// Scans as of the view.
    ///
    /// # Errors
    /// [`Error::ZeroScanLimit`] and engine errors.
    fn scan(&self, space: KeySpace, scan: &Scan) -> Result<Vec<KvPair>>;
}

/// What an engine tells about itself, for metrics. `None`: the engine does not know.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct EngineStats {
    /// Estimated number of keys, all key spaces.
    pub estimated_keys: Option<u64>,
    /// Bytes of live SST files.
    pub live_sst_bytes: Option<u64>,
    /// Bytes held by memtables.
    pub memtable_bytes: Option<u64>,
    /// Bytes compaction still has to rewrite.
    pub pending_compaction_bytes: Option<u64>,
    /// 1 while writes are stopped (a write stall), else 0.
    pub write_stopped: Option<u64>,
    /// Bytes used in the block cache.
    pub block_cache_bytes: Option<u64>,
}

/// An ordered key-value store with atomic batches, the storage under Kiwi's Raft log and state machine.
///
/// Every method blocks on disk I/O: call it from storage worker threads, never from async tasks. All
/// methods take `&self`; implementations are safe to share between threads.
///
/// Writes check [`Limits`] first and touch nothing when a check fails.
pub trait StorageBackend: Send + Sync + 'static {
    /// Which engine this is.
    fn kind(&self) -> BackendKind;

    /// The limits writes are checked against.
    fn limits(&self) -> Limits;

    /// Reads one key.
    ///
    /// # Errors
    /// [`Error::EmptyKey`] and engine errors.
    fn read(&self, space: KeySpace, key: &[u8]) -> Result<Option<Vec<u8>>>;

    /// Applies a batch atomically: after a crash, either every change of the batch is there or none is.
    /// An empty batch is a no-op.
    ///
    /// # Errors
    /// A limit broken by any operation (then nothing is written) and engine errors.
    fn batch_write(&self, batch: WriteBatch, opts: WriteOptions) -> Result<()>;

    /// Returns up to `scan.limit` pairs of `space` in `scan.range`, in key order (descending when
    /// `scan.reverse`).
    ///
    /// # Errors
    /// [`Error::ZeroScanLimit`] and engine errors.
    fn scan(&self, space: KeySpace, scan: &Scan) -> Result<Vec<KvPair>>;

    /// Takes a consistent point-in-time view.
    ///
    /// # Errors
    /// Engine errors.
    fn snapshot(&self) -> Result<Box<dyn StorageSnapshot>>;

    /// Compacts every key space over its whole range, dropping deleted and overwritten data for good
    /// (what `kiwi defrag` runs). Slow and I/O-heavy; reads and writes go on meanwhile. The default
    /// (an engine with nothing to reclaim) does nothing.
    ///
    /// # Errors
    /// Engine errors.
    fn compact_all(&self) -> Result<()> {
        Ok(())
    }

    /// Makes every write that has returned durable, as a later write with sync on would (an fsync of
    /// the write-ahead log), where the engine allows it without holding up the writes made meanwhile.
    /// The default writes an empty batch with sync on.
    ///
    /// # Errors
    /// Engine errors.
    fn sync(&self) -> Result<()> {
        self.batch_write(WriteBatch::new(), WriteOptions::SYNC)
    }

    /// Engine figures for metrics. Cheap (no I/O); the default knows nothing.
    fn engine_stats(&self) -> EngineStats {
        EngineStats::default()
    }

    /// Writes one key. A one-operation [`batch_write`](Self::batch_write).
    ///
    /// # Errors
    /// As for `batch_write`.
    fn write(&self, space: KeySpace, key: &[u8], value: &[u8], opts: WriteOptions) -> Result<()> {
        let mut batch = WriteBatch::new();
        batch.put(space, key, value);
        self.batch_write(batch, opts)
    }

    /// Removes one key; removing a missing key succeeds. A one-operation [`batch_write`](Self::batch_write).
    ///
    /// # Errors
    /// As for `batch_write`.
    fn delete(&self, space: KeySpace, key: &[u8], opts: WriteOptions) -> Result<()> {
        let mut batch = WriteBatch::new();
        batch.delete(space, key);
        self.batch_write(batch, opts)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn half_open_conversion_is_exact() {
        let r = ScanRange {
            start: Bound::Excluded(b"a".to_vec()),
            end: Bound::Included(b"c".to_vec()),
        };
        assert_eq!(
            r.to_half_open(),
            (Some(b"a\0".to_vec()), Some(b"c\0".to_vec()))
        );
        assert!(ScanRange::half_open(b"b", b"a").is_empty());
        assert!(ScanRange::half_open(b"a", b"a").is_empty());
        assert!(!ScanRange::half_open(b"", b"").is_empty());
    }

    #[test]
    fn limits_apply_to_data_only() {
        let l = Limits {
            max_key_bytes: 2,
            max_value_bytes: 3,
        };
        assert!(matches!(
            l.check_key(KeySpace::Data, b"abc"),
            Err(Error::KeyTooLarge { len: 3, max: 2 })
        ));
        assert!(l.check_key(KeySpace::Raft, b"abc").is_ok());
        assert!(matches!(
            l.check_key(KeySpace::Raft, b""),
            Err(Error::EmptyKey { .. })
        ));
        assert!(matches!(
            l.check_value(KeySpace::Data, b"abcd"),
            Err(Error::ValueTooLarge { len: 4, max: 3 })
        ));
        assert!(l.check_value(KeySpace::Raft, b"abcd").is_ok());
    }

    #[test]
    fn backend_names_round_trip() {
        for k in BackendKind::ALL {
            assert_eq!(k.as_str().parse::<BackendKind>().unwrap(), k);
        }
        assert!(
            "sqlite"
                .parse::<BackendKind>()
                .unwrap_err()
                .contains("sqlite")
        );
    }
}
