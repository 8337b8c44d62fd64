//! Kiwi's storage layer: the [`StorageBackend`] trait and its three engines.
//!
//! Modules, and who may depend on whom:
//! - [`backend`]: the trait and the engine-independent types (key spaces, batches, scans, limits). Depends
//!   on no engine, and must not.
//! - [`error`]: the crate's [`Error`] and [`Result`].
//! - `dir`: the data directory and its backend marker file.
//! - [`memory`], [`rocksdb_backend`], [`leveldb_backend`]: the engines, each depending only on `backend`
//!   and `error`.
//!
//! [`open`] picks the engine from [`OpenOptions::kind`]; callers then hold an `Arc<dyn StorageBackend>` and
//! never name an engine. The conformance suite that every engine must pass lives in the `kiwi-tests` crate.

pub mod backend;
mod dir;
pub mod error;
pub mod leveldb_backend;
pub mod memory;
pub mod rocksdb_backend;

use std::path::PathBuf;
use std::sync::Arc;

pub use backend::{
    BackendKind, DEFAULT_MAX_KEY_BYTES, DEFAULT_MAX_VALUE_BYTES, EngineStats, KeySpace, KvPair,
    Limits, MAX_KEY_BYTES_CEILING, MAX_VALUE_BYTES_CEILING, Scan, ScanRange, StorageBackend,
    StorageSnapshot, WriteBatch, WriteOp, WriteOptions,
};
pub use dir::MARKER_FILE;
pub use error::{Error, Result};
pub use leveldb_backend::LevelDBBackend;
pub use memory::MemoryBackend;
pub use rocksdb_backend::RocksDBBackend;

/// How to open a backend.
#[derive(Debug, Clone)]
pub struct OpenOptions {
    /// Which engine.
    pub kind: BackendKind,
    /// The data directory. Ignored by [`BackendKind::Memory`].
    pub path: PathBuf,
    /// Size limits for user data.
    pub limits: Limits,
    /// Create `path` (and its parents) when missing, instead of failing.
    pub create_if_missing: bool,
}

impl OpenOptions {
    /// Options for `kind` at `path` with default limits, creating the directory when missing.
    pub fn new(kind: BackendKind, path: impl Into<PathBuf>) -> Self {
        OpenOptions {
            kind,
            path: path.into(),
            limits: Limits::default(),
            create_if_missing: true,
        }
    }
}

/// Opens the configured backend.
///
/// # Errors
/// Data directory problems ([`Error::DirectoryNotFound`], [`Error::BackendMismatch`],
/// [`Error::ForeignDirectory`], [`Error::Io`]) and engine errors such as [`Error::Corruption`].
pub fn open(opts: &OpenOptions) -> Result<Arc<dyn StorageBackend>> {
    Ok(match opts.kind {
        BackendKind::Memory => Arc::new(MemoryBackend::new(opts.limits)),
        BackendKind::RocksDb => {
            let dir = dir::prepare(&opts.path, opts.kind, opts.create_if_missing)?;
            Arc::new(RocksDBBackend::open(&dir, opts.limits)?)
        }
        BackendKind::LevelDb => {
            let dir = dir::prepare(&opts.path, opts.kind, opts.create_if_missing)?;
            Arc::new(LevelDBBackend::open(&dir, opts.limits)?)
        }
    })
}
