//! The disk-stall hook: a storage backend that makes every write (and so every fsync) wait while a disk
//! stall fault is active. Wrapped around the engine only when fault injection is enabled; with no fault
//! active a write costs one atomic load more.

use std::sync::Arc;

use kiwi_storage::{
    BackendKind, EngineStats, KeySpace, KvPair, Limits, Scan, StorageBackend, StorageSnapshot,
    WriteBatch, WriteOptions,
};

use super::FaultInjector;

/// Forwards every call to `inner`, writes after the injected stall.
pub struct StallingBackend {
    inner: Arc<dyn StorageBackend>,
    faults: Arc<FaultInjector>,
}

impl StallingBackend {
    /// Wraps `inner`.
    pub fn wrap(
        inner: Arc<dyn StorageBackend>,
        faults: Arc<FaultInjector>,
    ) -> Arc<dyn StorageBackend> {
        Arc::new(StallingBackend { inner, faults })
    }

    fn stall(&self) {
        let d = self.faults.disk_stall();
        if !d.is_zero() {
            self.faults.stall_blocking(d);
        }
    }
}

impl StorageBackend for StallingBackend {
    fn kind(&self) -> BackendKind {
        self.inner.kind()
    }

    fn limits(&self) -> Limits {
        self.inner.limits()
    }

    fn read(&self, space: KeySpace, key: &[u8]) -> kiwi_storage::Result<Option<Vec<u8>>> {
        self.inner.read(space, key)
    }

    fn batch_write(&self, batch: WriteBatch, opts: WriteOptions) -> kiwi_storage::Result<()> {
        self.stall();
        self.inner.batch_write(batch, opts)
    }

    fn sync(&self) -> kiwi_storage::Result<()> {
        self.stall();
        self.inner.sync()
    }

    fn scan(&self, space: KeySpace, scan: &Scan) -> kiwi_storage::Result<Vec<KvPair>> {
        self.inner.scan(space, scan)
    }

    fn snapshot(&self) -> kiwi_storage::Result<Box<dyn StorageSnapshot>> {
        self.inner.snapshot()
    }

    fn engine_stats(&self) -> EngineStats {
        self.inner.engine_stats()
    }

    fn compact_all(&self) -> kiwi_storage::Result<()> {
        self.inner.compact_all()
    }

    fn write(
        &self,
        space: KeySpace,
        key: &[u8],
        value: &[u8],
        opts: WriteOptions,
    ) -> kiwi_storage::Result<()> {
        self.stall();
        self.inner.write(space, key, value, opts)
    }

    fn delete(&self, space: KeySpace, key: &[u8], opts: WriteOptions) -> kiwi_storage::Result<()> {
        self.stall();
        self.inner.delete(space, key, opts)
    }
}
