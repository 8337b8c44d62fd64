//! The Raft log and Raft's persistent state, kept in the node's [`StorageBackend`] under
//! [`KeySpace::Raft`], beside the state machine's data.
//!
//! Keys (all in `KeySpace::Raft`):
//! - `log/<index: u64 BE>`: one `eraftpb::Entry`, encoded by raft-rs.
//! - `state/hard`: the `HardState` (term, vote, commit).
//! - `state/conf`: the `ConfState` (voters, learners).
//!
//! [`LogStore::persist`] writes a Ready's entries and hard state in **one** durable batch. The log is not
//! compacted yet, so the first index is always 1 and no snapshot is ever needed.

use std::sync::Arc;

use kiwi_storage::{KeySpace, Scan, ScanRange, StorageBackend, WriteBatch, WriteOptions};
use protobuf::Message as _;
use raft::eraftpb::{ConfState, Entry, HardState, Snapshot};
use raft::{GetEntriesContext, RaftState, Storage, StorageError};

const LOG_PREFIX: &[u8] = b"log/";
const HARD_STATE_KEY: &[u8] = b"state/hard";
const CONF_STATE_KEY: &[u8] = b"state/conf";

fn log_key(index: u64) -> Vec<u8> {
    let mut k = Vec::with_capacity(LOG_PREFIX.len() + 8);
    k.extend_from_slice(LOG_PREFIX);
    k.extend_from_slice(&index.to_be_bytes());
    k
}

fn store_err(e: impl std::error::Error + Send + Sync + 'static) -> raft::Error {
    raft::Error::Store(StorageError::Other(Box::new(e)))
}

/// The persistent half of raft-rs's state, owned by the Raft driver (inside its `RawNode`).
pub struct LogStore {
    backend: Arc<dyn StorageBackend>,
    hard_state: HardState,
    conf_state: ConfState,
    last_index: u64,
    last_term: u64,
}

impl LogStore {
    /// Loads the hard state, conf state and last log position from `backend`.
    ///
    /// # Errors
    /// Storage errors and undecodable records.
    pub fn open(backend: Arc<dyn StorageBackend>) -> raft::Result<Self> {
        let decode_err = |what: &str, e: protobuf::ProtobufError| {
            store_err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("damaged Raft {what}: {e}"),
            ))
        };
        let hard_state = match backend.read(KeySpace::Raft, HARD_STATE_KEY).map_err(store_err)? {
            Some(b) => HardState::parse_from_bytes(&b).map_err(|e| decode_err("hard state", e))?,
            None => HardState::default(),
        };
        let conf_state = match backend.read(KeySpace::Raft, CONF_STATE_KEY).map_err(store_err)? {
            Some(b) => ConfState::parse_from_bytes(&b).map_err(|e| decode_err("conf state", e))?,
            None => ConfState::default(),
        };
        let last = backend
            .scan(
                KeySpace::Raft,
                &Scan::backward(ScanRange::half_open(LOG_PREFIX, b"log0"), 1),
            )
            .map_err(store_err)?;
        let (last_index, last_term) = match last.first() {
            Some((_, v)) => {
                let e = Entry::parse_from_bytes(v).map_err(|e| decode_err("log entry", e))?;
                (e.index, e.term)
            }
            None => (0, 0),
        };
        Ok(LogStore {
            backend,
            hard_state,
            conf_state,
            last_index,
            last_term,
        })
    }

    /// Whether the group's membership has been set (by [`bootstrap`](Self::bootstrap) or from the log).
    pub fn is_initialized(&self) -> bool {
        self.conf_state != ConfState::default()
    }

    /// Sets the initial membership of a new group. Every founding member bootstraps with the same voters,
    /// so their logs start identical (empty, at term 1).
    ///
    /// # Errors
    /// Storage errors.
    pub fn bootstrap(&mut self, voters: Vec<u64>) -> raft::Result<()> {
        let mut cs = ConfState::default();
        cs.voters = voters;
        let mut hs = HardState::default();
        hs.term = 1;
        let mut batch = WriteBatch::new();
        batch.put(KeySpace::Raft, CONF_STATE_KEY, cs.write_to_bytes().map_err(store_err)?);
        batch.put(KeySpace::Raft, HARD_STATE_KEY, hs.write_to_bytes().map_err(store_err)?);
        self.backend
            .batch_write(batch, WriteOptions::SYNC)
            .map_err(store_err)?;
        self.conf_state = cs;
        self.hard_state = hs;
        Ok(())
    }

    /// Durably writes new log entries (replacing any conflicting suffix) and the hard state, in one fsynced
    /// batch.
    ///
    /// # Errors
    /// Storage errors; the caller must then stop (fail-stop), never advance.
    pub fn persist(&mut self, entries: &[Entry], hard_state: Option<&HardState>) -> raft::Result<()> {
        if entries.is_empty() && hard_state.is_none() {
            return Ok(());
        }
        let mut batch = WriteBatch::new();
        for e in entries {
            batch.put(KeySpace::Raft, log_key(e.index), e.write_to_bytes().map_err(store_err)?);
        }
        if let Some(last) = entries.last() {
            for stale in last.index + 1..=self.last_index {
                batch.delete(KeySpace::Raft, log_key(stale));
            }
        }
        if let Some(hs) = hard_state {
            batch.put(KeySpace::Raft, HARD_STATE_KEY, hs.write_to_bytes().map_err(store_err)?);
        }
        self.backend
            .batch_write(batch, WriteOptions::SYNC)
            .map_err(store_err)?;
        if let Some(last) = entries.last() {
            self.last_index = last.index;
            self.last_term = last.term;
        }
        if let Some(hs) = hard_state {
            self.hard_state = hs.clone();
        }
        Ok(())
    }

    /// Durably records a new membership.
    ///
    /// # Errors
    /// Storage errors.
    pub fn set_conf_state(&mut self, cs: ConfState) -> raft::Result<()> {
        self.backend
            .write(
                KeySpace::Raft,
                CONF_STATE_KEY,
                &cs.write_to_bytes().map_err(store_err)?,
                WriteOptions::SYNC,
            )
            .map_err(store_err)?;
        self.conf_state = cs;
        Ok(())
    }

    /// The current membership.
    pub fn conf_state(&self) -> &ConfState {
        &self.conf_state
    }
}

impl Storage for LogStore {
    fn initial_state(&self) -> raft::Result<RaftState> {
        Ok(RaftState::new(self.hard_state.clone(), self.conf_state.clone()))
    }

    fn entries(
        &self,
        low: u64,
        high: u64,
        max_size: impl Into<Option<u64>>,
        _context: GetEntriesContext,
    ) -> raft::Result<Vec<Entry>> {
        if low < 1 {
            return Err(raft::Error::Store(StorageError::Compacted));
        }
        if high > self.last_index + 1 || low > high {
            return Err(raft::Error::Store(StorageError::Unavailable));
        }
        if low == high {
            return Ok(Vec::new());
        }
        let pairs = self
            .backend
            .scan(
                KeySpace::Raft,
                &Scan::forward(
                    ScanRange::half_open(&log_key(low), &log_key(high)),
                    (high - low) as usize,
                ),
            )
            .map_err(store_err)?;
        let mut entries = Vec::with_capacity(pairs.len());
        for (i, (_, v)) in pairs.iter().enumerate() {
            let e = Entry::parse_from_bytes(v).map_err(store_err)?;
            if e.index != low + i as u64 {
                return Err(raft::Error::Store(StorageError::Unavailable));
            }
            entries.push(e);
        }
        if entries.len() as u64 != high - low {
            return Err(raft::Error::Store(StorageError::Unavailable));
        }
        raft::util::limit_size(&mut entries, max_size.into());
        Ok(entries)
    }

    fn term(&self, idx: u64) -> raft::Result<u64> {
        if idx == 0 {
            return Ok(0);
        }
        if idx == self.last_index {
            return Ok(self.last_term);
        }
        if idx > self.last_index {
            return Err(raft::Error::Store(StorageError::Unavailable));
        }
        match self.backend.read(KeySpace::Raft, &log_key(idx)).map_err(store_err)? {
            Some(v) => Ok(Entry::parse_from_bytes(&v).map_err(store_err)?.term),
            None => Err(raft::Error::Store(StorageError::Unavailable)),
        }
    }

    fn first_index(&self) -> raft::Result<u64> {
        Ok(1)
    }

    fn last_index(&self) -> raft::Result<u64> {
        Ok(self.last_index)
    }

    fn snapshot(&self, _request_index: u64, _to: u64) -> raft::Result<Snapshot> {
        // The log is never compacted, so raft-rs never needs one.
        Err(raft::Error::Store(StorageError::SnapshotTemporarilyUnavailable))
    }
}

#[cfg(test)]
mod tests {
    use kiwi_storage::{Limits, MemoryBackend};

    use super::*;

    fn entry(index: u64, term: u64) -> Entry {
        let mut e = Entry::default();
        e.index = index;
        e.term = term;
        e.data = format!("{index}@{term}").into_bytes().into();
        e
    }

    #[test]
    fn persists_reloads_and_truncates_conflicts() {
        let backend: Arc<dyn StorageBackend> = Arc::new(MemoryBackend::new(Limits::default()));
        let mut s = LogStore::open(backend.clone()).unwrap();
        assert!(!s.is_initialized());
        s.bootstrap(vec![1, 2, 3]).unwrap();
        let mut hs = HardState::default();
        hs.term = 2;
        hs.commit = 1;
        s.persist(&[entry(1, 1), entry(2, 1), entry(3, 2)], Some(&hs)).unwrap();
        // A new leader overwrites index 2 onwards.
        s.persist(&[entry(2, 3)], None).unwrap();

        let s = LogStore::open(backend).unwrap();
        assert!(s.is_initialized());
        assert_eq!(s.conf_state().voters, vec![1, 2, 3]);
        assert_eq!(s.initial_state().unwrap().hard_state.term, 2);
        assert_eq!(s.last_index().unwrap(), 2);
        assert_eq!(s.term(2).unwrap(), 3);
        assert_eq!(s.term(1).unwrap(), 1);
        assert_eq!(s.term(0).unwrap(), 0);
        assert!(s.term(3).is_err());
        let got = s.entries(1, 3, None, GetEntriesContext::empty(false)).unwrap();
        assert_eq!(got, vec![entry(1, 1), entry(2, 3)]);
        let limited = s.entries(1, 3, Some(1), GetEntriesContext::empty(false)).unwrap();
        assert_eq!(limited.len(), 1, "max_size still returns one entry");
        assert!(s.entries(1, 4, None, GetEntriesContext::empty(false)).is_err());
    }
}
