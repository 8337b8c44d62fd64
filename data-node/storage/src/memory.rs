//! `MemoryBackend`: an ordered map in memory, for tests. Nothing survives the process.

use std::collections::BTreeMap;
use std::ops::Bound;
use std::sync::{Arc, RwLock};

use crate::backend::{
    BackendKind, EngineStats, KeySpace, KvPair, Limits, Scan, StorageBackend, StorageSnapshot,
    WriteBatch, WriteOp, WriteOptions,
};
use crate::error::Result;

type Map = BTreeMap<Vec<u8>, Vec<u8>>;

/// One map per key space, behind one lock so that a batch spanning key spaces stays atomic.
#[derive(Debug, Clone, Default)]
struct Maps([Map; 3]);

impl Maps {
    fn space(&self, space: KeySpace) -> &Map {
        &self.0[space as usize]
    }

    fn space_mut(&mut self, space: KeySpace) -> &mut Map {
        &mut self.0[space as usize]
    }

    fn scan(&self, space: KeySpace, scan: &Scan) -> Result<Vec<KvPair>> {
        scan.check()?;
        if scan.range.is_empty() {
            return Ok(Vec::new());
        }
        let (lower, upper) = scan.range.to_half_open();
        let bounds = (
            lower.map_or(Bound::Unbounded, Bound::Included),
            upper.map_or(Bound::Unbounded, Bound::Excluded),
        );
        let range = self.space(space).range::<Vec<u8>, _>(bounds);
        let clone = |(k, v): (&Vec<u8>, &Vec<u8>)| (k.clone(), v.clone());
        Ok(if scan.reverse {
            range.rev().take(scan.limit).map(clone).collect()
        } else {
            range.take(scan.limit).map(clone).collect()
        })
    }
}

/// The in-memory backend.
#[derive(Debug, Default)]
pub struct MemoryBackend {
    maps: RwLock<Maps>,
    limits: Limits,
}

impl MemoryBackend {
    /// An empty store with the given limits.
    pub fn new(limits: Limits) -> Self {
        MemoryBackend {
            maps: RwLock::default(),
            limits,
        }
    }

    fn maps(&self) -> std::sync::RwLockReadGuard<'_, Maps> {
        // A writer that panicked left the map as it was before or after one whole batch: batches are
        // applied without panicking paths once validated, so a poisoned lock still guards valid data.
        self.maps.read().unwrap_or_else(|e| e.into_inner())
    }
}

impl StorageBackend for MemoryBackend {
    fn kind(&self) -> BackendKind {
        BackendKind::Memory
    }

    fn engine_stats(&self) -> EngineStats {
        let maps = self.maps();
        EngineStats {
            estimated_keys: Some(maps.0.iter().map(|m| m.len() as u64).sum()),
            ..EngineStats::default()
        }
    }

    fn limits(&self) -> Limits {
        self.limits
    }

    fn read(&self, space: KeySpace, key: &[u8]) -> Result<Option<Vec<u8>>> {
        self.limits.check_key(space, key)?;
        Ok(self.maps().space(space).get(key).cloned())
    }

    fn batch_write(&self, batch: WriteBatch, _opts: WriteOptions) -> Result<()> {
        self.limits.check_batch(&batch)?;
        let mut maps = self.maps.write().unwrap_or_else(|e| e.into_inner());
        for op in batch.ops {
            match op {
                WriteOp::Put { space, key, value } => {
                    maps.space_mut(space).insert(key, value);
                }
                WriteOp::Delete { space, key } => {
                    maps.space_mut(space).remove(&key);
                }
                WriteOp::DeleteRange { space, start, end } if start < end => {
                    let map = maps.space_mut(space);
                    let doomed: Vec<Vec<u8>> =
                        map.range(start..end).map(|(k, _)| k.clone()).collect();
                    for k in doomed {
                        map.remove(&k);
                    }
                }
                WriteOp::DeleteRange { .. } => {}
            }
        }
        Ok(())
    }

    fn scan(&self, space: KeySpace, scan: &Scan) -> Result<Vec<KvPair>> {
        self.maps().scan(space, scan)
    }

    fn snapshot(&self) -> Result<Box<dyn StorageSnapshot>> {
        Ok(Box::new(MemorySnapshot(Arc::new(self.maps().clone()))))
    }
}

/// A copy of the maps taken at snapshot time.
struct MemorySnapshot(Arc<Maps>);

impl StorageSnapshot for MemorySnapshot {
    fn read(&self, space: KeySpace, key: &[u8]) -> Result<Option<Vec<u8>>> {
        Ok(self.0.space(space).get(key).cloned())
    }

    fn scan(&self, space: KeySpace, scan: &Scan) -> Result<Vec<KvPair>> {
        self.0.scan(space, scan)
    }
}
