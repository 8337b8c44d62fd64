//! The storage crate's error type.

use std::path::PathBuf;

use crate::backend::BackendKind;

/// What can go wrong in a storage backend. Every variant names the problem precisely enough to act on it;
/// none of them means data was partially written (batches are all-or-nothing).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Keys must hold at least one byte.
    #[error("key is empty: keys must be 1 to {max} bytes")]
    EmptyKey {
        /// The configured maximum key size.
        max: usize,
    },
    /// The key is longer than the configured maximum.
    #[error("key is {len} bytes, over the limit of {max} bytes (storage.max_key_size)")]
    KeyTooLarge { len: usize, max: usize },
    /// The value is longer than the configured maximum.
    #[error("value is {len} bytes, over the limit of {max} bytes (storage.max_value_size)")]
    ValueTooLarge { len: usize, max: usize },
    /// A scan was asked for zero results.
    #[error("scan limit must be at least 1")]
    ZeroScanLimit,
    /// The data directory does not exist and the caller asked not to create it.
    #[error("data directory {path} does not exist")]
    DirectoryNotFound { path: PathBuf },
    /// The data directory was written by a different backend.
    #[error(
        "data directory {path} holds a {found} store, but the {expected} backend was configured \
         (storage.backend); point it at another directory or change the backend"
    )]
    BackendMismatch {
        path: PathBuf,
        found: String,
        expected: BackendKind,
    },
    /// The data directory is not empty, but Kiwi did not create it.
    #[error(
        "data directory {path} is not empty and has no {marker} marker: it was not created by Kiwi; \
         refusing to use it"
    )]
    ForeignDirectory { path: PathBuf, marker: &'static str },
    /// The engine found its files damaged.
    #[error("{backend} data in {path} is corrupt: {detail}")]
    Corruption {
        backend: BackendKind,
        path: PathBuf,
        detail: String,
    },
    /// A file system operation failed (missing permissions, a file where a directory was expected, a full
    /// disk...).
    #[error("{action} {path}: {source}")]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// Any other error reported by the engine.
    #[error("{backend} error: {detail}")]
    Engine {
        backend: BackendKind,
        detail: String,
    },
    /// The backend was closed, or its engine thread stopped.
    #[error("{backend} backend is closed")]
    Closed { backend: BackendKind },
}

/// The storage crate's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;
