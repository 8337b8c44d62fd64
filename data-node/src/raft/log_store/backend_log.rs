//! The Raft log kept in the node's [`StorageBackend`] under [`KeySpace::Raft`], beside the state
//! machine's data: the log of the in-memory backend (which has no directory for a log of its own), and the
//! layout of data directories written before the log had its own files (read once by
//! [`engine_log::upgrade`](super::engine_log::upgrade), which moves it).
//!
//! Keys (all in `KeySpace::Raft`):
//! - `log/<index: u64 BE>`: one `eraftpb::Entry`, encoded by raft-rs.
//! - `state/hard`: the `HardState` (term, vote, commit).
//! - `state/log_truncated`: the log's own truncation point (index and term, u64 BE each).

use std::sync::Arc;

use kiwi_storage::{KeySpace, Scan, ScanRange, StorageBackend, WriteBatch, WriteOptions};
use protobuf::Message as _;
use raft::eraftpb::{Entry, HardState};

use super::{EntryLog, damaged, store_err};

const LOG_PREFIX: &[u8] = b"log/";
const LOG_END: &[u8] = b"log0";
pub(super) const HARD_STATE_KEY: &[u8] = b"state/hard";
const TRUNCATED_KEY: &[u8] = b"state/log_truncated";
/// Log entries read per storage scan when raft-rs asks for a range.
pub(super) const ENTRIES_PAGE: u64 = 64;

fn log_key(index: u64) -> Vec<u8> {
    let mut k = Vec::with_capacity(LOG_PREFIX.len() + 8);
    k.extend_from_slice(LOG_PREFIX);
    k.extend_from_slice(&index.to_be_bytes());
    k
}

fn parse_entry(bytes: &[u8]) -> raft::Result<Entry> {
    Entry::parse_from_bytes(bytes).map_err(|e| damaged(format!("damaged Raft log entry: {e}")))
}

/// The log's entries and hard state as keys of the data backend.
pub struct BackendLog {
    backend: Arc<dyn StorageBackend>,
}

impl BackendLog {
    /// The log stored in `backend`.
    pub fn new(backend: Arc<dyn StorageBackend>) -> Self {
        BackendLog { backend }
    }

    /// The backend the log is kept in.
    pub fn backend(&self) -> &dyn StorageBackend {
        &*self.backend
    }

    /// Whether `backend` holds a log or hard state of this layout.
    ///
    /// # Errors
    /// Storage errors.
    pub fn holds_any(backend: &dyn StorageBackend) -> raft::Result<bool> {
        if backend
            .read(KeySpace::Raft, HARD_STATE_KEY)
            .map_err(store_err)?
            .is_some()
        {
            return Ok(true);
        }
        let any = backend
            .scan(
                KeySpace::Raft,
                &Scan::forward(ScanRange::half_open(LOG_PREFIX, LOG_END), 1),
            )
            .map_err(store_err)?;
        Ok(!any.is_empty())
    }

    fn edge(&self, backward: bool) -> raft::Result<Option<Entry>> {
        let range = ScanRange::half_open(LOG_PREFIX, LOG_END);
        let scan = if backward {
            Scan::backward(range, 1)
        } else {
            Scan::forward(range, 1)
        };
        let pairs = self
            .backend
            .scan(KeySpace::Raft, &scan)
            .map_err(store_err)?;
        pairs.first().map(|(_, v)| parse_entry(v)).transpose()
    }

    /// Removes every entry and the hard state, in one durable batch (after the upgrade has copied them).
    ///
    /// # Errors
    /// Storage errors.
    pub fn remove_all(&self) -> raft::Result<()> {
        let mut batch = WriteBatch::new();
        batch.delete_range(KeySpace::Raft, LOG_PREFIX.to_vec(), LOG_END.to_vec());
        batch.delete(KeySpace::Raft, HARD_STATE_KEY);
        batch.delete(KeySpace::Raft, TRUNCATED_KEY);
        self.backend
            .batch_write(batch, WriteOptions::SYNC)
            .map_err(store_err)
    }
}

impl EntryLog for BackendLog {
    fn hard_state(&self) -> raft::Result<HardState> {
        match self
            .backend
            .read(KeySpace::Raft, HARD_STATE_KEY)
            .map_err(store_err)?
        {
            Some(b) => HardState::parse_from_bytes(&b)
                .map_err(|e| damaged(format!("damaged Raft hard state: {e}"))),
            None => Ok(HardState::default()),
        }
    }

    fn bounds(&self) -> raft::Result<Option<(u64, u64)>> {
        Ok(match (self.edge(false)?, self.edge(true)?) {
            (Some(first), Some(last)) => Some((first.index, last.index)),
            _ => None,
        })
    }

    fn term(&self, index: u64) -> raft::Result<Option<u64>> {
        self.backend
            .read(KeySpace::Raft, &log_key(index))
            .map_err(store_err)?
            .map(|v| parse_entry(&v).map(|e| e.term))
            .transpose()
    }

    fn entries(&self, low: u64, high: u64, max_size: u64) -> raft::Result<Vec<Entry>> {
        // Read page by page and stop once `max_size` is reached (raft-rs asks for whole ranges, then keeps
        // only what fits a message): a follower far behind must not make the driver read its whole lag.
        let mut entries = Vec::new();
        let mut size = 0u64;
        let mut next = low;
        while next < high {
            let page = (high - next).min(ENTRIES_PAGE);
            let pairs = self
                .backend
                .scan(
                    KeySpace::Raft,
                    &Scan::forward(
                        ScanRange::half_open(&log_key(next), &log_key(high)),
                        page as usize,
                    ),
                )
                .map_err(store_err)?;
            if pairs.len() as u64 != page {
                return Err(raft::Error::Store(raft::StorageError::Unavailable));
            }
            for (_, v) in &pairs {
                let e = parse_entry(v)?;
                if e.index != next {
                    return Err(raft::Error::Store(raft::StorageError::Unavailable));
                }
                size += u64::from(protobuf::Message::compute_size(&e));
                // raft-rs's rule: always at least one entry, then only while the total fits.
                if !entries.is_empty() && size > max_size {
                    return Ok(entries);
                }
                entries.push(e);
                next += 1;
            }
        }
        Ok(entries)
    }

    fn append(
        &mut self,
        entries: &[Entry],
        stored_last: u64,
        hard_state: Option<&HardState>,
        sync: bool,
    ) -> raft::Result<()> {
        let mut batch = WriteBatch::new();
        for e in entries {
            batch.put(
                KeySpace::Raft,
                log_key(e.index),
                e.write_to_bytes().map_err(store_err)?,
            );
        }
        if let Some(last) = entries.last()
            && last.index < stored_last
        {
            batch.delete_range(KeySpace::Raft, log_key(last.index + 1), LOG_END.to_vec());
        }
        if let Some(hs) = hard_state {
            batch.put(
                KeySpace::Raft,
                HARD_STATE_KEY,
                hs.write_to_bytes().map_err(store_err)?,
            );
        }
        let options = if sync {
            WriteOptions::SYNC
        } else {
            WriteOptions::BUFFERED
        };
        self.backend.batch_write(batch, options).map_err(store_err)
    }

    /// One range delete: on RocksDB a single tombstone, so a compaction costs the Raft thread the same
    /// whatever the threshold (10,000 single deletes stalled it 10 to 25 ms).
    fn compact(&mut self, index: u64, term: u64) -> raft::Result<()> {
        let mut batch = WriteBatch::new();
        batch.delete_range(KeySpace::Raft, LOG_PREFIX.to_vec(), log_key(index + 1));
        batch.put(
            KeySpace::Raft,
            TRUNCATED_KEY,
            super::encode_point(index, term),
        );
        self.backend
            .batch_write(batch, WriteOptions::BUFFERED)
            .map_err(store_err)
    }

    fn truncated(&self) -> raft::Result<Option<(u64, u64)>> {
        self.backend
            .read(KeySpace::Raft, TRUNCATED_KEY)
            .map_err(store_err)?
            .map(|b| super::decode_point(&b))
            .transpose()
    }

    fn reset(&mut self, hard_state: &HardState) -> raft::Result<()> {
        let mut batch = WriteBatch::new();
        batch.delete_range(KeySpace::Raft, LOG_PREFIX.to_vec(), LOG_END.to_vec());
        batch.delete(KeySpace::Raft, TRUNCATED_KEY);
        batch.put(
            KeySpace::Raft,
            HARD_STATE_KEY,
            hard_state.write_to_bytes().map_err(store_err)?,
        );
        self.backend
            .batch_write(batch, WriteOptions::SYNC)
            .map_err(store_err)
    }
}
