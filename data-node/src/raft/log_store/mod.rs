//! Raft's persistent state for raft-rs (its `Storage`): the log, the hard state, the membership and the
//! truncation point.
//!
//! - [`engine_log`]: the log of a node on disk, in files of its own (`<data_dir>/raft-log/`, TiKV's
//!   `raft-engine`; why, and measured, in its doc).
//! - [`backend_log`]: the log as keys of the data backend: the in-memory backend's, and the layout of
//!   data directories from before `raft-log/` (moved there at the first start, see
//!   [`engine_log::upgrade`]).
//!
//! Both hold the entries, the hard state (term, vote, commit) and the point their compaction reached
//! behind [`EntryLog`]. What describes the applied state lives in the data backend, written in the batch
//! of the data it describes (all in `KeySpace::Raft`):
//! - `state/conf`: the `ConfState` (voters, learners).
//! - `state/truncated`: index and term (u64 BE each) of the bootstrap or of the last installed snapshot,
//!   then a layout byte ([`LAYOUT`]).
//!
//! The truncation point is the later of that record and the log's own; the log holds
//! `truncated + 1 ..= last`.
//!
//! [`LogStore::persist`] writes a Ready's entries and hard state in **one** durable batch.
//! [`LogStore::compact`] drops entries only up to what the data backend is known to hold durably: applies
//! are written without fsync, and a thread of this store ([`LogStore::make_durable`]) fsyncs the backend
//! when the driver is about to compact, off the Raft thread. An installed snapshot is written to the data
//! backend first (fsynced), then the log is reset; a crash between the two leaves a log that reaches below
//! the truncation point, which [`LogStore::open`] finishes: a log that holds the truncation point's entry
//! with its term is compacted to it, one that does not is reset, as raft-rs discards a log that does not
//! match a snapshot it installs. A follower that needs compacted entries gets a snapshot:
//! [`Storage::snapshot`] pins a point-in-time view of the backend in the [`SnapshotRegistry`], which the
//! transport streams to the follower in chunks (see `snapshot.rs`).
//!
//! A new group is bootstrapped with its log truncated at index 1, term 1 (an empty state every founding
//! member shares), so a node added later always starts from a snapshot that carries the membership.

pub mod backend_log;
pub mod engine_log;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use kiwi_storage::{KeySpace, StorageBackend, StorageSnapshot, WriteBatch, WriteOptions};
use protobuf::Message as _;
use raft::eraftpb::{ConfState, Entry, HardState, Snapshot, SnapshotMetadata};
use raft::{GetEntriesContext, RaftState, Storage, StorageError};

const CONF_STATE_KEY: &[u8] = b"state/conf";
const TRUNCATED_KEY: &[u8] = b"state/truncated";
/// The last byte of the truncation record: the log is not in the data backend's `log/` keys but behind
/// [`EntryLog`]. A record of 16 bytes is the earlier layout (the log in the data backend); an earlier
/// version refuses a record of 17 as damaged, so it never starts on a directory it would misread.
pub const LAYOUT: u8 = 2;
/// Index and term a new group's log starts truncated at.
pub const BOOTSTRAP_INDEX: u64 = 1;
/// Snapshots pinned at once; the oldest is released first.
const MAX_PINNED_SNAPSHOTS: usize = 4;

fn store_err(e: impl std::error::Error + Send + Sync + 'static) -> raft::Error {
    raft::Error::Store(StorageError::Other(Box::new(e)))
}

fn damaged(what: String) -> raft::Error {
    store_err(std::io::Error::new(std::io::ErrorKind::InvalidData, what))
}

/// Where the entries and the hard state are kept. Indexes are the caller's to check: the
/// [`LogStore`] knows the truncation point and asks only for what lies above it.
pub trait EntryLog: Send {
    /// The stored hard state (the default when none was written).
    fn hard_state(&self) -> raft::Result<HardState>;
    /// The first and last index held, `None` when empty.
    fn bounds(&self) -> raft::Result<Option<(u64, u64)>>;
    /// The term of the entry at `index`, `None` when it is not held.
    fn term(&self, index: u64) -> raft::Result<Option<u64>>;
    /// Entries `low..high`: at least one, then only while their encoded size fits `max_size`.
    fn entries(&self, low: u64, high: u64, max_size: u64) -> raft::Result<Vec<Entry>>;
    /// Writes `entries`, dropping every held entry after the last of them (`stored_last` is the last
    /// held before), with `hard_state` in the same batch; fsynced when `sync`.
    fn append(
        &mut self,
        entries: &[Entry],
        stored_last: u64,
        hard_state: Option<&HardState>,
        sync: bool,
    ) -> raft::Result<()>;
    /// Drops the entries up to and including `index`, whose term is `term`, and records that point as
    /// the log's own truncation point in the same batch (not fsynced: a crash that loses both keeps the
    /// entries). The caller has made the applied state up to `index` durable first.
    fn compact(&mut self, index: u64, term: u64) -> raft::Result<()>;
    /// The truncation point the last [`compact`](Self::compact) recorded, `None` since a reset.
    fn truncated(&self) -> raft::Result<Option<(u64, u64)>>;
    /// Drops every entry and the truncation point and stores `hard_state`, fsynced.
    fn reset(&mut self, hard_state: &HardState) -> raft::Result<()>;
}

/// Point-in-time views of the state machine that Raft has promised to followers, by snapshot id (the
/// id travels as the raft-rs snapshot's `data`). The transport takes a view out when it streams it.
#[derive(Default)]
pub struct SnapshotRegistry {
    inner: Mutex<BTreeMap<u64, Box<dyn StorageSnapshot>>>,
    next_id: std::sync::atomic::AtomicU64,
}

impl SnapshotRegistry {
    fn pin(&self, view: Box<dyn StorageSnapshot>) -> u64 {
        let id = self
            .next_id
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
            + 1;
        let mut map = self
            .inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        map.insert(id, view);
        while map.len() > MAX_PINNED_SNAPSHOTS {
            map.pop_first();
        }
        id
    }

    /// Takes the view for snapshot `id`, if it is still pinned.
    pub fn take(&self, id: u64) -> Option<Box<dyn StorageSnapshot>> {
        self.inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .remove(&id)
    }
}

/// What a raft-rs snapshot's `data` carries: the id of the pinned view the transport streams, and the
/// address of every member as of the snapshot (the id -> address map is replicated state: a node that
/// catches up by snapshot must be able to reach members added while it was behind).
///
/// Encoding: the view id (u64 BE), then per member its id (u64 BE), the address length (u32 BE) and the
/// address (UTF-8).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SnapshotData {
    pub view_id: u64,
    pub members: Vec<(u64, String)>,
    /// Every lease of the state machine at the snapshot: (id, granted TTL). The keys attached to each are
    /// in the data (each value's header names its lease).
    pub leases: Vec<(u64, i64)>,
}

impl SnapshotData {
    /// Encodes for `Snapshot::data`: the view id, the member count (4 bytes) and each member (id, address
    /// length in 4 bytes, address), then the leases (id, TTL; 16 bytes each) to the end.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = self.view_id.to_be_bytes().to_vec();
        out.extend_from_slice(&(self.members.len() as u32).to_be_bytes());
        for (id, addr) in &self.members {
            out.extend_from_slice(&id.to_be_bytes());
            out.extend_from_slice(&(addr.len() as u32).to_be_bytes());
            out.extend_from_slice(addr.as_bytes());
        }
        out.extend(crate::raft::lease_state::encode_list(&self.leases));
        out
    }

    /// Decodes `Snapshot::data`; `None` when it is not in this format.
    pub fn decode(data: &[u8]) -> Option<SnapshotData> {
        let (id, rest) = data.split_first_chunk::<8>()?;
        let (count, mut rest) = rest.split_first_chunk::<4>()?;
        let mut members = Vec::new();
        for _ in 0..u32::from_be_bytes(*count) {
            let (id, r) = rest.split_first_chunk::<8>()?;
            let (len, r) = r.split_first_chunk::<4>()?;
            let len = u32::from_be_bytes(*len) as usize;
            if r.len() < len {
                return None;
            }
            let addr = String::from_utf8(r[..len].to_vec()).ok()?;
            members.push((u64::from_be_bytes(*id), addr));
            rest = &r[len..];
        }
        Some(SnapshotData {
            view_id: u64::from_be_bytes(*id),
            members,
            leases: crate::raft::lease_state::decode_list(rest)?,
        })
    }
}

/// The pinned view id carried in a raft-rs snapshot's `data`.
pub fn snapshot_id(snap: &Snapshot) -> Option<u64> {
    SnapshotData::decode(&snap.data).map(|d| d.view_id)
}

/// The persistent half of raft-rs's state, owned by the Raft driver (inside its `RawNode`).
pub struct LogStore {
    backend: Arc<dyn StorageBackend>,
    log: Box<dyn EntryLog>,
    hard_state: HardState,
    conf_state: ConfState,
    truncated_index: u64,
    truncated_term: u64,
    last_index: u64,
    last_term: u64,
    snapshots: Arc<SnapshotRegistry>,
    durable: DataSync,
}

/// Makes the data backend's applied state durable off the Raft thread, so that the log may drop the
/// entries it covers: a thread that calls [`StorageBackend::sync`] (on RocksDB its `SyncWAL`, which
/// does not hold up the applies made meanwhile) and publishes the applied index it covers. Between two compactions the backend's log collects every buffered apply (megabytes at high
/// write rates); fsyncing that on the Raft thread stalled every client's put for tens of milliseconds.
struct DataSync {
    durable: Arc<std::sync::atomic::AtomicU64>,
    requested: u64,
    wake: Option<std::sync::mpsc::SyncSender<u64>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl DataSync {
    fn start(backend: Arc<dyn StorageBackend>, durable_from: u64) -> raft::Result<Self> {
        let durable = Arc::new(std::sync::atomic::AtomicU64::new(durable_from));
        let (wake, requests) = std::sync::mpsc::sync_channel::<u64>(1);
        let published = Arc::clone(&durable);
        let thread = std::thread::Builder::new()
            .name("raft-data-sync".into())
            .spawn(move || {
                while let Ok(applied) = requests.recv() {
                    match backend.sync() {
                        Ok(()) => {
                            published.fetch_max(applied, std::sync::atomic::Ordering::Release);
                        }
                        Err(e) => tracing::warn!(
                            error = %e,
                            "cannot make the applied state durable: the Raft log is not compacted"
                        ),
                    }
                }
            })
            .map_err(store_err)?;
        Ok(DataSync {
            durable,
            requested: durable_from,
            wake: Some(wake),
            thread: Some(thread),
        })
    }

    fn durable(&self) -> u64 {
        self.durable.load(std::sync::atomic::Ordering::Acquire)
    }

    /// Asks for everything written so far, up to applied index `applied`, to be made durable; at most
    /// one request waits.
    fn request(&mut self, applied: u64) {
        if applied <= self.requested.max(self.durable()) {
            return;
        }
        if let Some(wake) = &self.wake
            && wake.try_send(applied).is_ok()
        {
            self.requested = applied;
        }
    }
}

impl Drop for DataSync {
    fn drop(&mut self) {
        drop(self.wake.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A log position, index and term (u64 BE each).
fn encode_point(index: u64, term: u64) -> Vec<u8> {
    let mut v = index.to_be_bytes().to_vec();
    v.extend_from_slice(&term.to_be_bytes());
    v
}

fn decode_point(b: &[u8]) -> raft::Result<(u64, u64)> {
    match <[u8; 16]>::try_from(b) {
        Ok(b) => Ok((
            u64::from_be_bytes(b[..8].try_into().expect("8 bytes")),
            u64::from_be_bytes(b[8..].try_into().expect("8 bytes")),
        )),
        Err(_) => Err(damaged(format!(
            "damaged Raft log truncation record ({} bytes, expected 16)",
            b.len()
        ))),
    }
}

fn encode_truncated(index: u64, term: u64) -> Vec<u8> {
    let mut v = index.to_be_bytes().to_vec();
    v.extend_from_slice(&term.to_be_bytes());
    v.push(LAYOUT);
    v
}

/// The truncation point recorded in `backend` and whether it is of the earlier layout (16 bytes).
fn read_truncated(backend: &dyn StorageBackend) -> raft::Result<Option<(u64, u64, bool)>> {
    match backend
        .read(KeySpace::Raft, TRUNCATED_KEY)
        .map_err(store_err)?
    {
        Some(b) if b.len() == 16 || (b.len() == 17 && b[16] == LAYOUT) => Ok(Some((
            u64::from_be_bytes(b[..8].try_into().expect("8 bytes")),
            u64::from_be_bytes(b[8..16].try_into().expect("8 bytes")),
            b.len() == 16,
        ))),
        Some(b) => Err(damaged(format!(
            "damaged Raft truncation record ({} bytes{}; this version reads 16 or 17 ending in {LAYOUT}): \
             written by a newer version of kiwi-node?",
            b.len(),
            b.get(16).map_or(String::new(), |l| format!(", layout {l}"))
        ))),
        None => Ok(None),
    }
}

impl LogStore {
    /// A store whose log is kept in `backend` itself ([`backend_log::BackendLog`]), as the in-memory
    /// backend's is.
    ///
    /// # Errors
    /// As [`open`](Self::open).
    pub fn in_backend(
        backend: Arc<dyn StorageBackend>,
        snapshots: Arc<SnapshotRegistry>,
    ) -> raft::Result<Self> {
        let log = Box::new(backend_log::BackendLog::new(Arc::clone(&backend)));
        Self::open(backend, log, snapshots)
    }

    /// Loads the membership and truncation point from `backend` and the hard state and last entry from
    /// `log`, and finishes a compaction or snapshot install a crash interrupted (see the module doc).
    ///
    /// # Errors
    /// Storage errors, undecodable records, and a log that starts above the truncation point (entries
    /// missing: damaged).
    pub fn open(
        backend: Arc<dyn StorageBackend>,
        mut log: Box<dyn EntryLog>,
        snapshots: Arc<SnapshotRegistry>,
    ) -> raft::Result<Self> {
        let conf_state = match backend
            .read(KeySpace::Raft, CONF_STATE_KEY)
            .map_err(store_err)?
        {
            Some(b) => ConfState::parse_from_bytes(&b)
                .map_err(|e| damaged(format!("damaged Raft conf state: {e}")))?,
            None => ConfState::default(),
        };
        // The later of the backend's (bootstrap, snapshot installs) and the log's own (compactions).
        let (truncated_index, truncated_term) = read_truncated(&*backend)?
            .map(|(i, t, _)| (i, t))
            .into_iter()
            .chain(log.truncated()?)
            .max()
            .unwrap_or((0, 0));
        let mut hard_state = log.hard_state()?;
        let (last_index, last_term) = match log.bounds()? {
            None => (truncated_index, truncated_term),
            Some((_, last)) if last < truncated_index => {
                tracing::warn!(
                    truncated_index,
                    last,
                    "the Raft log ends below the installed snapshot: dropping it (an install was \
                     interrupted)"
                );
                log.reset(&hard_state)?;
                (truncated_index, truncated_term)
            }
            Some((first, _)) if first > truncated_index + 1 => {
                return Err(damaged(format!(
                    "the Raft log starts at index {first} but this node's state ends at \
                     {truncated_index}: entries are missing"
                )));
            }
            Some((first, last)) => {
                if first <= truncated_index && log.term(truncated_index)? != Some(truncated_term) {
                    tracing::warn!(
                        truncated_index,
                        "the Raft log does not match the installed snapshot: dropping it (an \
                         install was interrupted)"
                    );
                    log.reset(&hard_state)?;
                    (truncated_index, truncated_term)
                } else {
                    if first <= truncated_index {
                        log.compact(truncated_index, truncated_term)?;
                    }
                    let term = log.term(last)?.ok_or_else(|| {
                        damaged(format!("the Raft log lost its last entry {last}"))
                    })?;
                    (last, term)
                }
            }
        };
        // Compaction and installs move the truncation point without writing the hard state; the commit
        // index is at least that point (raft-rs refuses to start from one below the log's first index).
        // The same holds for the term: an install raises it to the snapshot's (a term below a log entry's
        // would let this node lead with entries of a later term under its own).
        hard_state.commit = hard_state.commit.max(truncated_index);
        hard_state.term = hard_state.term.max(truncated_term);
        let backend_for_sync = Arc::clone(&backend);
        Ok(LogStore {
            backend,
            log,
            hard_state,
            conf_state,
            truncated_index,
            truncated_term,
            last_index,
            last_term,
            snapshots,
            // What was read at open may be only in the page cache (the process was killed): durable is
            // what the truncation point proves.
            durable: DataSync::start(backend_for_sync, truncated_index)?,
        })
    }

    /// Whether `backend` records a truncation point written when the log was kept in the backend itself
    /// (the layout [`engine_log::upgrade`] moves).
    ///
    /// # Errors
    /// Storage errors and an undecodable record.
    pub fn earlier_layout(backend: &dyn StorageBackend) -> raft::Result<bool> {
        Ok(read_truncated(backend)?.is_some_and(|(_, _, old)| old)
            || backend_log::BackendLog::holds_any(backend)?)
    }

    /// Rewrites the truncation record in this version's layout (after [`engine_log::upgrade`]).
    ///
    /// # Errors
    /// Storage errors.
    pub fn record_layout(backend: &dyn StorageBackend) -> raft::Result<()> {
        if let Some((index, term, true)) = read_truncated(backend)? {
            let mut batch = WriteBatch::new();
            batch.put(KeySpace::Raft, TRUNCATED_KEY, encode_truncated(index, term));
            backend
                .batch_write(batch, WriteOptions::SYNC)
                .map_err(store_err)?;
        }
        Ok(())
    }

    /// Whether the group's membership has been set (by [`bootstrap`](Self::bootstrap) or from the log).
    pub fn is_initialized(&self) -> bool {
        self.conf_state != ConfState::default()
    }

    /// Sets the initial membership of a new group. Every founding member bootstraps with the same voters
    /// and the same empty state, truncated at [`BOOTSTRAP_INDEX`] (applied and committed there), so their
    /// logs start identical.
    ///
    /// # Errors
    /// Storage errors.
    pub fn bootstrap(&mut self, voters: Vec<u64>) -> raft::Result<()> {
        let cs = ConfState {
            voters,
            ..ConfState::default()
        };
        let hs = HardState {
            term: BOOTSTRAP_INDEX,
            commit: BOOTSTRAP_INDEX,
            ..HardState::default()
        };
        let mut batch = WriteBatch::new();
        batch.put(
            KeySpace::Raft,
            CONF_STATE_KEY,
            cs.write_to_bytes().map_err(store_err)?,
        );
        batch.put(
            KeySpace::Raft,
            TRUNCATED_KEY,
            encode_truncated(BOOTSTRAP_INDEX, BOOTSTRAP_INDEX),
        );
        batch.put(
            KeySpace::Raft,
            crate::raft::state_machine::APPLIED_KEY,
            BOOTSTRAP_INDEX.to_be_bytes(),
        );
        self.backend
            .batch_write(batch, WriteOptions::SYNC)
            .map_err(store_err)?;
        self.log.reset(&hs)?;
        self.conf_state = cs;
        self.hard_state = hs;
        self.truncated_index = BOOTSTRAP_INDEX;
        self.truncated_term = BOOTSTRAP_INDEX;
        self.last_index = BOOTSTRAP_INDEX;
        self.last_term = BOOTSTRAP_INDEX;
        self.durable
            .durable
            .fetch_max(BOOTSTRAP_INDEX, std::sync::atomic::Ordering::Release);
        Ok(())
    }

    /// Index of the last entry compacted away (or covered by a snapshot).
    pub fn truncated_index(&self) -> u64 {
        self.truncated_index
    }

    /// The applied index up to which the data backend is known durable (see
    /// [`make_durable`](Self::make_durable)); [`compact`](Self::compact) goes no further.
    pub fn durable_applied(&self) -> u64 {
        self.durable.durable()
    }

    /// Asks, without waiting, for every write made so far to the data backend (the applies up to
    /// `applied` among them) to be made durable; [`durable_applied`](Self::durable_applied) reaches
    /// `applied` once it is.
    pub fn make_durable(&mut self, applied: u64) {
        self.durable.request(applied);
    }

    /// Removes entries up to and including `index` (which must be applied), no further than
    /// [`durable_applied`](Self::durable_applied): the applied state they produced must survive a power
    /// cut before this node lets go of them. The log records the new truncation point with the removal.
    /// Returns the index compacted to.
    ///
    /// # Errors
    /// Storage errors.
    pub fn compact(&mut self, index: u64) -> raft::Result<u64> {
        let index = index.min(self.last_index).min(self.durable_applied());
        if index <= self.truncated_index {
            return Ok(self.truncated_index);
        }
        let term = self.term(index)?;
        self.log.compact(index, term)?;
        self.truncated_index = index;
        self.truncated_term = term;
        self.hard_state.commit = self.hard_state.commit.max(index);
        Ok(index)
    }

    /// Makes the data backend durable up to `applied` on this thread (tests that compact right after
    /// writing).
    ///
    /// # Errors
    /// Storage errors.
    #[cfg(test)]
    pub fn make_durable_now(&mut self, applied: u64) -> raft::Result<()> {
        self.backend.sync().map_err(store_err)?;
        self.durable
            .durable
            .fetch_max(applied, std::sync::atomic::Ordering::Release);
        Ok(())
    }

    /// Records a commit index Raft advanced without a new hard state (a light Ready: with a single
    /// voter every commit advances there). It is written with the next persisted hard state; a stored
    /// commit index that lags is safe (see [`open`](Self::open) for one behind the log start).
    pub fn set_commit(&mut self, commit: u64) {
        self.hard_state.commit = self.hard_state.commit.max(commit);
    }

    /// Adds to `batch` what installing a snapshot at `meta` changes in the data backend: truncation
    /// moves to the snapshot and the membership becomes the snapshot's. Call
    /// [`snapshot_installed`](Self::snapshot_installed) once the batch is durable.
    ///
    /// # Errors
    /// Encoding errors.
    pub fn snapshot_batch(
        &self,
        meta: &SnapshotMetadata,
        batch: &mut WriteBatch,
    ) -> raft::Result<()> {
        batch.put(
            KeySpace::Raft,
            TRUNCATED_KEY,
            encode_truncated(meta.index, meta.term),
        );
        batch.put(
            KeySpace::Raft,
            CONF_STATE_KEY,
            meta.get_conf_state().write_to_bytes().map_err(store_err)?,
        );
        Ok(())
    }

    fn hard_state_after(&self, meta: &SnapshotMetadata) -> HardState {
        let mut hs = self.hard_state.clone();
        hs.commit = hs.commit.max(meta.index);
        hs.term = hs.term.max(meta.term);
        hs
    }

    /// After [`snapshot_batch`](Self::snapshot_batch) is durable: drops the whole log (its hard state's
    /// commit at the snapshot) and updates the in-memory state.
    ///
    /// # Errors
    /// Storage errors; the caller must stop (the next open finishes the reset).
    pub fn snapshot_installed(&mut self, meta: &SnapshotMetadata) -> raft::Result<()> {
        let hs = self.hard_state_after(meta);
        self.log.reset(&hs)?;
        self.durable
            .durable
            .fetch_max(meta.index, std::sync::atomic::Ordering::Release);
        self.hard_state = hs;
        self.conf_state = meta.get_conf_state().clone();
        self.truncated_index = meta.index;
        self.truncated_term = meta.term;
        self.last_index = meta.index;
        self.last_term = meta.term;
        Ok(())
    }

    /// Writes new log entries (replacing any conflicting suffix) and the hard state in one batch, fsynced
    /// when [`must_sync`] says so. Returns whether it was fsynced.
    ///
    /// # Errors
    /// Storage errors; the caller must then stop (fail-stop), never advance.
    pub fn persist(
        &mut self,
        entries: &[Entry],
        hard_state: Option<&HardState>,
    ) -> raft::Result<bool> {
        if entries.is_empty() && hard_state.is_none() {
            return Ok(false);
        }
        let sync = must_sync(entries, hard_state, &self.hard_state);
        let hs = hard_state.map(|hs| {
            let mut hs = hs.clone();
            hs.commit = hs.commit.max(self.hard_state.commit);
            hs
        });
        self.log
            .append(entries, self.last_index, hs.as_ref(), sync)?;
        if let Some(last) = entries.last() {
            self.last_index = last.index;
            self.last_term = last.term;
        }
        if let Some(hs) = hs {
            self.hard_state = hs;
        }
        Ok(sync)
    }

    /// Adds a new membership to `batch` (written by the caller with the records that go with it); call
    /// [`conf_state_written`](Self::conf_state_written) once the batch is durable.
    ///
    /// # Errors
    /// Encoding errors.
    pub fn conf_state_batch(cs: &ConfState, batch: &mut WriteBatch) -> raft::Result<()> {
        batch.put(
            KeySpace::Raft,
            CONF_STATE_KEY,
            cs.write_to_bytes().map_err(store_err)?,
        );
        Ok(())
    }

    /// Updates the in-memory membership after [`conf_state_batch`](Self::conf_state_batch) is durable.
    pub fn conf_state_written(&mut self, cs: ConfState) {
        self.conf_state = cs;
    }

    /// The current membership.
    pub fn conf_state(&self) -> &ConfState {
        &self.conf_state
    }
}

impl Storage for LogStore {
    fn initial_state(&self) -> raft::Result<RaftState> {
        Ok(RaftState::new(
            self.hard_state.clone(),
            self.conf_state.clone(),
        ))
    }

    fn entries(
        &self,
        low: u64,
        high: u64,
        max_size: impl Into<Option<u64>>,
        _context: GetEntriesContext,
    ) -> raft::Result<Vec<Entry>> {
        if low <= self.truncated_index {
            return Err(raft::Error::Store(StorageError::Compacted));
        }
        if high > self.last_index + 1 || low > high {
            return Err(raft::Error::Store(StorageError::Unavailable));
        }
        if low == high {
            return Ok(Vec::new());
        }
        self.log
            .entries(low, high, max_size.into().unwrap_or(u64::MAX))
    }

    fn term(&self, idx: u64) -> raft::Result<u64> {
        if idx == self.truncated_index {
            return Ok(self.truncated_term);
        }
        if idx < self.truncated_index {
            return Err(raft::Error::Store(StorageError::Compacted));
        }
        if idx == self.last_index {
            return Ok(self.last_term);
        }
        if idx > self.last_index {
            return Err(raft::Error::Store(StorageError::Unavailable));
        }
        self.log
            .term(idx)?
            .ok_or(raft::Error::Store(StorageError::Unavailable))
    }

    fn first_index(&self) -> raft::Result<u64> {
        Ok(self.truncated_index + 1)
    }

    fn last_index(&self) -> raft::Result<u64> {
        Ok(self.last_index)
    }

    /// Pins a view of the state machine as applied right now and describes it. Called on the driver
    /// thread, which is also the only thread that applies, so the view, the applied index read here and the
    /// membership all describe the same point of the log.
    fn snapshot(&self, _request_index: u64, _to: u64) -> raft::Result<Snapshot> {
        let view = self.backend.snapshot().map_err(store_err)?;
        let applied = view
            .read(KeySpace::Raft, crate::raft::state_machine::APPLIED_KEY)
            .map_err(store_err)?
            .and_then(|v| <[u8; 8]>::try_from(v.as_slice()).ok())
            .map_or(0, u64::from_be_bytes);
        if applied < self.truncated_index {
            return Err(raft::Error::Store(
                StorageError::SnapshotTemporarilyUnavailable,
            ));
        }
        let term = self.term(applied)?;
        let members = crate::raft::state_machine::recorded_members_in(&*view).map_err(store_err)?;
        let leases = crate::raft::lease_state::all(&*view)
            .map_err(store_err)?
            .into_iter()
            .map(|(id, r)| (id, r.ttl))
            .collect();
        let view_id = self.snapshots.pin(view);
        let mut snap = Snapshot {
            data: SnapshotData {
                view_id,
                members,
                leases,
            }
            .encode()
            .into(),
            ..Snapshot::default()
        };
        let meta = snap.mut_metadata();
        meta.index = applied;
        meta.term = term;
        meta.set_conf_state(self.conf_state.clone());
        Ok(snap)
    }
}

/// Whether a log write must be fsynced before its messages go out (etcd's `MustSync`): new entries
/// must be durable before they are acknowledged, and a term or vote before it is acted on (one vote per
/// term). A hard state whose only change is the commit index need not be: a commit index lost in a crash
/// is learned again from the leader, and the write reaches the disk with the next fsync (the write-ahead
/// log is replayed in order, so nothing written after it survives without it).
pub fn must_sync(entries: &[Entry], new: Option<&HardState>, stored: &HardState) -> bool {
    !entries.is_empty() || new.is_some_and(|hs| hs.term != stored.term || hs.vote != stored.vote)
}

#[cfg(test)]
mod tests {
    use kiwi_storage::{Limits, MemoryBackend, Scan, StorageSnapshot};

    use super::*;

    pub(super) fn entry(index: u64, term: u64) -> Entry {
        Entry {
            index,
            term,
            data: format!("{index}@{term}").into_bytes().into(),
            ..Entry::default()
        }
    }

    #[test]
    fn only_entries_terms_and_votes_are_fsynced() {
        let stored = HardState {
            term: 3,
            vote: 2,
            commit: 10,
            ..HardState::default()
        };
        let commit_only = HardState {
            commit: 11,
            ..stored.clone()
        };
        let new_term = HardState {
            term: 4,
            ..stored.clone()
        };
        let new_vote = HardState {
            vote: 1,
            ..stored.clone()
        };
        let entry = Entry {
            index: 11,
            term: 3,
            ..Entry::default()
        };
        assert!(!must_sync(&[], Some(&commit_only), &stored));
        assert!(!must_sync(&[], None, &stored));
        assert!(must_sync(&[], Some(&new_term), &stored));
        assert!(must_sync(&[], Some(&new_vote), &stored));
        assert!(must_sync(std::slice::from_ref(&entry), None, &stored));
        assert!(must_sync(
            std::slice::from_ref(&entry),
            Some(&commit_only),
            &stored
        ));
    }

    #[test]
    fn persists_reloads_and_truncates_conflicts() {
        let backend: Arc<dyn StorageBackend> = Arc::new(MemoryBackend::new(Limits::default()));
        let mut s = LogStore::in_backend(backend.clone(), Arc::default()).unwrap();
        assert!(!s.is_initialized());
        s.bootstrap(vec![1, 2, 3]).unwrap();
        assert_eq!(s.first_index().unwrap(), 2);
        assert_eq!(s.last_index().unwrap(), 1);
        let hs = HardState {
            term: 2,
            commit: 2,
            ..HardState::default()
        };
        s.persist(&[entry(2, 1), entry(3, 1), entry(4, 2)], Some(&hs))
            .unwrap();
        // A new leader overwrites index 3 onwards.
        s.persist(&[entry(3, 3)], None).unwrap();

        let s = LogStore::in_backend(backend, Arc::default()).unwrap();
        assert!(s.is_initialized());
        assert_eq!(s.conf_state().voters, vec![1, 2, 3]);
        assert_eq!(s.initial_state().unwrap().hard_state.term, 2);
        assert_eq!(s.first_index().unwrap(), 2);
        assert_eq!(s.last_index().unwrap(), 3);
        assert_eq!(s.term(3).unwrap(), 3);
        assert_eq!(s.term(2).unwrap(), 1);
        assert_eq!(s.term(1).unwrap(), 1, "the bootstrap truncation point");
        assert!(s.term(4).is_err());
        let got = s
            .entries(2, 4, None, GetEntriesContext::empty(false))
            .unwrap();
        assert_eq!(got, vec![entry(2, 1), entry(3, 3)]);
        let limited = s
            .entries(2, 4, Some(1), GetEntriesContext::empty(false))
            .unwrap();
        assert_eq!(limited.len(), 1, "max_size still returns one entry");
        assert!(
            s.entries(2, 5, None, GetEntriesContext::empty(false))
                .is_err()
        );
    }

    /// A memory backend that counts the pairs its scans return.
    struct CountingBackend {
        inner: MemoryBackend,
        scanned: std::sync::atomic::AtomicUsize,
    }

    impl StorageBackend for CountingBackend {
        fn kind(&self) -> kiwi_storage::BackendKind {
            self.inner.kind()
        }
        fn limits(&self) -> Limits {
            self.inner.limits()
        }
        fn read(&self, space: KeySpace, key: &[u8]) -> kiwi_storage::Result<Option<Vec<u8>>> {
            self.inner.read(space, key)
        }
        fn batch_write(&self, batch: WriteBatch, opts: WriteOptions) -> kiwi_storage::Result<()> {
            self.inner.batch_write(batch, opts)
        }
        fn scan(
            &self,
            space: KeySpace,
            scan: &Scan,
        ) -> kiwi_storage::Result<Vec<kiwi_storage::KvPair>> {
            let out = self.inner.scan(space, scan)?;
            self.scanned
                .fetch_add(out.len(), std::sync::atomic::Ordering::SeqCst);
            Ok(out)
        }
        fn snapshot(&self) -> kiwi_storage::Result<Box<dyn StorageSnapshot>> {
            self.inner.snapshot()
        }
    }

    #[test]
    fn entries_stop_reading_at_the_size_limit() {
        let counting = Arc::new(CountingBackend {
            inner: MemoryBackend::new(Limits::default()),
            scanned: Default::default(),
        });
        let backend: Arc<dyn StorageBackend> = counting.clone();
        let mut s = LogStore::in_backend(backend, Arc::default()).unwrap();
        s.bootstrap(vec![1]).unwrap();
        let big: Vec<Entry> = (2..=5001)
            .map(|i| Entry {
                index: i,
                term: 1,
                data: vec![7; 1024].into(),
                ..Entry::default()
            })
            .collect();
        s.persist(&big, None).unwrap();
        counting
            .scanned
            .store(0, std::sync::atomic::Ordering::SeqCst);
        let got = s
            .entries(2, 5002, Some(10 * 1024), GetEntriesContext::empty(false))
            .unwrap();
        assert!((8..=10).contains(&got.len()), "{} entries", got.len());
        assert!(
            counting.scanned.load(std::sync::atomic::Ordering::SeqCst)
                <= 2 * backend_log::ENTRIES_PAGE as usize,
            "read only what fits, not the whole range of 5000"
        );
        let all = s
            .entries(2, 5002, None, GetEntriesContext::empty(false))
            .unwrap();
        assert_eq!(all.len(), 5000);
        assert_eq!(all.last().unwrap().index, 5001);
    }

    #[test]
    fn compaction_raises_the_stored_commit_index() {
        let backend: Arc<dyn StorageBackend> = Arc::new(MemoryBackend::new(Limits::default()));
        let mut s = LogStore::in_backend(backend.clone(), Arc::default()).unwrap();
        s.bootstrap(vec![1]).unwrap();
        let entries: Vec<_> = (2..=10).map(|i| entry(i, 2)).collect();
        // A single voter's commits advance in light Readies: the persisted hard state keeps commit 1.
        s.persist(&entries, None).unwrap();
        s.set_commit(10);
        s.make_durable_now(10).unwrap();
        assert_eq!(s.compact(8).unwrap(), 8);
        let s2 = LogStore::in_backend(backend, Arc::default()).unwrap();
        let hs = s2.initial_state().unwrap().hard_state;
        assert!(
            hs.commit >= 8,
            "commit {} behind the log start 9",
            hs.commit
        );
    }

    #[test]
    fn snapshot_data_round_trips() {
        let d = SnapshotData {
            view_id: 42,
            members: vec![(1, "127.0.0.1:7380".into()), (4, "host-4:1".into())],
            leases: vec![(9, 60), (1 << 62, 5)],
        };
        assert_eq!(SnapshotData::decode(&d.encode()).as_ref(), Some(&d));
        let mut bare = 7u64.to_be_bytes().to_vec();
        bare.extend_from_slice(&0u32.to_be_bytes());
        assert_eq!(
            SnapshotData::decode(&bare),
            Some(SnapshotData {
                view_id: 7,
                members: vec![],
                leases: vec![],
            })
        );
        assert_eq!(SnapshotData::decode(&[1, 2, 3]), None);
        let mut truncated = d.encode();
        truncated.pop();
        assert_eq!(SnapshotData::decode(&truncated), None);
    }

    #[test]
    fn compaction_and_snapshots_move_the_first_index() {
        let backend: Arc<dyn StorageBackend> = Arc::new(MemoryBackend::new(Limits::default()));
        let registry = Arc::new(SnapshotRegistry::default());
        let mut s = LogStore::in_backend(backend.clone(), registry.clone()).unwrap();
        s.bootstrap(vec![1]).unwrap();
        let entries: Vec<_> = (2..=10).map(|i| entry(i, 2)).collect();
        s.persist(&entries, None).unwrap();
        crate::raft::state_machine::mark_applied(&*backend, 8).unwrap();
        assert_eq!(s.compact(8).unwrap(), 1, "nothing is known durable yet");
        s.make_durable_now(8).unwrap();
        assert_eq!(s.compact(8).unwrap(), 8);
        assert_eq!(
            backend_log::BackendLog::new(backend.clone())
                .bounds()
                .unwrap(),
            Some((9, 10)),
            "compaction removes the entries up to 8 and keeps the rest"
        );
        let s2 = LogStore::in_backend(backend.clone(), Arc::default()).unwrap();
        for st in [&s, &s2] {
            assert_eq!(st.first_index().unwrap(), 9);
            assert_eq!(st.last_index().unwrap(), 10);
            assert_eq!(st.term(8).unwrap(), 2);
            assert_eq!(st.term(7), Err(raft::Error::Store(StorageError::Compacted)));
            assert_eq!(
                st.entries(8, 10, None, GetEntriesContext::empty(false)),
                Err(raft::Error::Store(StorageError::Compacted))
            );
        }

        // A snapshot describes the applied state and pins a view of it.
        let snap = Storage::snapshot(&s, 0, 2).unwrap();
        assert_eq!(snap.get_metadata().index, 8);
        assert_eq!(snap.get_metadata().term, 2);
        assert_eq!(snap.get_metadata().get_conf_state().voters, vec![1]);
        let id = snapshot_id(&snap).unwrap();
        assert!(registry.take(id).is_some());
        assert!(registry.take(id).is_none(), "a view is streamed once");

        // Installing a snapshot replaces the whole log.
        let mut meta = SnapshotMetadata {
            index: 20,
            term: 4,
            ..SnapshotMetadata::default()
        };
        meta.mut_conf_state().voters = vec![1, 2];
        let mut batch = WriteBatch::new();
        s.snapshot_batch(&meta, &mut batch).unwrap();
        backend.batch_write(batch, WriteOptions::SYNC).unwrap();
        s.snapshot_installed(&meta).unwrap();
        let s2 = LogStore::in_backend(backend, Arc::default()).unwrap();
        for st in [&s, &s2] {
            assert_eq!(st.first_index().unwrap(), 21);
            assert_eq!(st.last_index().unwrap(), 20);
            assert_eq!(st.term(20).unwrap(), 4);
            assert_eq!(st.conf_state().voters, vec![1, 2]);
            assert_eq!(st.initial_state().unwrap().hard_state.commit, 20);
        }
    }

    /// Runs `check` on a store whose log is made by `log` (called again for each reopen, after the
    /// previous store is dropped).
    fn on_both_logs(check: impl Fn(&Arc<dyn StorageBackend>, &dyn Fn() -> Box<dyn EntryLog>)) {
        let backend: Arc<dyn StorageBackend> = Arc::new(MemoryBackend::new(Limits::default()));
        let in_backend = Arc::clone(&backend);
        check(&backend, &move || {
            Box::new(backend_log::BackendLog::new(Arc::clone(&in_backend)))
        });
        let backend: Arc<dyn StorageBackend> = Arc::new(MemoryBackend::new(Limits::default()));
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().to_path_buf();
        check(&backend, &move || {
            Box::new(engine_log::EngineLog::open(&path, None).unwrap())
        });
    }

    fn store_with_log(backend: &Arc<dyn StorageBackend>, log: Box<dyn EntryLog>) -> LogStore {
        LogStore::open(Arc::clone(backend), log, Arc::default()).unwrap()
    }

    #[test]
    fn an_install_interrupted_before_the_log_was_reset_is_finished_at_open() {
        on_both_logs(|backend, log| {
            // A snapshot past the log's end, and one inside it whose term does not match.
            for (index, term) in [(20, 4), (8, 3)] {
                let mut s = store_with_log(backend, log());
                s.bootstrap(vec![1]).unwrap();
                let entries: Vec<_> = (2..=10).map(|i| entry(i, 2)).collect();
                s.persist(
                    &entries,
                    Some(&HardState {
                        term: 2,
                        commit: 5,
                        ..HardState::default()
                    }),
                )
                .unwrap();
                let meta = SnapshotMetadata {
                    index,
                    term,
                    ..SnapshotMetadata::default()
                };
                let mut batch = WriteBatch::new();
                s.snapshot_batch(&meta, &mut batch).unwrap();
                backend.batch_write(batch, WriteOptions::SYNC).unwrap();
                drop(s); // the crash, before `snapshot_installed`

                let s = store_with_log(backend, log());
                assert_eq!(s.first_index().unwrap(), index + 1);
                assert_eq!(s.last_index().unwrap(), index, "the old log is gone");
                assert_eq!(s.term(index).unwrap(), term);
                assert_eq!(s.initial_state().unwrap().hard_state.commit, index);
                assert_eq!(s.initial_state().unwrap().hard_state.term, term.max(2));
                drop(s);
                let log = log();
                assert_eq!(log.bounds().unwrap(), None);
            }
        });
    }

    #[test]
    fn a_log_that_reaches_below_the_truncation_point_is_cut_at_open() {
        on_both_logs(|backend, log| {
            let mut s = store_with_log(backend, log());
            s.bootstrap(vec![1]).unwrap();
            let entries: Vec<_> = (2..=10).map(|i| entry(i, 2)).collect();
            s.persist(&entries, None).unwrap();
            // A truncation point in the backend the log has not caught up with.
            let mut batch = WriteBatch::new();
            batch.put(KeySpace::Raft, TRUNCATED_KEY, encode_truncated(8, 2));
            backend.batch_write(batch, WriteOptions::SYNC).unwrap();
            drop(s);

            let s = store_with_log(backend, log());
            assert_eq!(s.first_index().unwrap(), 9);
            assert_eq!(s.last_index().unwrap(), 10);
            assert_eq!(
                s.entries(9, 11, None, GetEntriesContext::empty(false))
                    .unwrap(),
                entries[7..].to_vec()
            );
            assert_eq!(s.initial_state().unwrap().hard_state.commit, 8);
            drop(s);
            assert_eq!(log().bounds().unwrap(), Some((9, 10)));
        });
    }

    #[test]
    fn a_log_that_starts_above_the_truncation_point_is_refused() {
        let backend: Arc<dyn StorageBackend> = Arc::new(MemoryBackend::new(Limits::default()));
        let mut log = backend_log::BackendLog::new(Arc::clone(&backend));
        let mut s = LogStore::in_backend(Arc::clone(&backend), Arc::default()).unwrap();
        s.bootstrap(vec![1]).unwrap();
        log.append(&[entry(5, 1)], 1, None, true).unwrap();
        let err = LogStore::in_backend(backend, Arc::default()).err().unwrap();
        assert!(err.to_string().contains("entries are missing"), "{err}");
    }

    #[test]
    fn the_truncation_record_tells_the_layout() {
        let backend: Arc<dyn StorageBackend> = Arc::new(MemoryBackend::new(Limits::default()));
        assert!(!LogStore::earlier_layout(&*backend).unwrap());
        let mut batch = WriteBatch::new();
        batch.put(KeySpace::Raft, TRUNCATED_KEY, encode_pair_for_test(7, 3));
        backend.batch_write(batch, WriteOptions::SYNC).unwrap();
        assert!(LogStore::earlier_layout(&*backend).unwrap());
        LogStore::record_layout(&*backend).unwrap();
        assert!(!LogStore::earlier_layout(&*backend).unwrap());
        assert_eq!(read_truncated(&*backend).unwrap(), Some((7, 3, false)));
        let mut batch = WriteBatch::new();
        let mut newer = encode_truncated(7, 3);
        newer[16] = LAYOUT + 1;
        batch.put(KeySpace::Raft, TRUNCATED_KEY, newer);
        backend.batch_write(batch, WriteOptions::SYNC).unwrap();
        let err = LogStore::in_backend(backend, Arc::default()).err().unwrap();
        assert!(err.to_string().contains("newer version"), "{err}");
    }

    fn encode_pair_for_test(index: u64, term: u64) -> Vec<u8> {
        let mut v = index.to_be_bytes().to_vec();
        v.extend_from_slice(&term.to_be_bytes());
        v
    }

    /// The data backend's writes and the log's compactions, in the order they happen.
    type Events = Arc<Mutex<Vec<String>>>;

    struct OrderedBackend {
        inner: MemoryBackend,
        events: Events,
    }

    impl StorageBackend for OrderedBackend {
        fn kind(&self) -> kiwi_storage::BackendKind {
            self.inner.kind()
        }
        fn limits(&self) -> Limits {
            self.inner.limits()
        }
        fn read(&self, space: KeySpace, key: &[u8]) -> kiwi_storage::Result<Option<Vec<u8>>> {
            self.inner.read(space, key)
        }
        fn batch_write(&self, batch: WriteBatch, opts: WriteOptions) -> kiwi_storage::Result<()> {
            self.events
                .lock()
                .unwrap()
                .push(format!("backend write, sync {}", opts.sync));
            self.inner.batch_write(batch, opts)
        }
        fn scan(
            &self,
            space: KeySpace,
            scan: &Scan,
        ) -> kiwi_storage::Result<Vec<kiwi_storage::KvPair>> {
            self.inner.scan(space, scan)
        }
        fn snapshot(&self) -> kiwi_storage::Result<Box<dyn StorageSnapshot>> {
            self.inner.snapshot()
        }
    }

    struct OrderedLog {
        inner: engine_log::EngineLog,
        events: Events,
    }

    impl EntryLog for OrderedLog {
        fn hard_state(&self) -> raft::Result<HardState> {
            self.inner.hard_state()
        }
        fn bounds(&self) -> raft::Result<Option<(u64, u64)>> {
            self.inner.bounds()
        }
        fn term(&self, index: u64) -> raft::Result<Option<u64>> {
            self.inner.term(index)
        }
        fn entries(&self, low: u64, high: u64, max_size: u64) -> raft::Result<Vec<Entry>> {
            self.inner.entries(low, high, max_size)
        }
        fn append(
            &mut self,
            entries: &[Entry],
            stored_last: u64,
            hard_state: Option<&HardState>,
            sync: bool,
        ) -> raft::Result<()> {
            self.inner.append(entries, stored_last, hard_state, sync)
        }
        fn compact(&mut self, index: u64, term: u64) -> raft::Result<()> {
            self.events
                .lock()
                .unwrap()
                .push(format!("log compact to {index}"));
            self.inner.compact(index, term)
        }
        fn truncated(&self) -> raft::Result<Option<(u64, u64)>> {
            self.inner.truncated()
        }
        fn reset(&mut self, hard_state: &HardState) -> raft::Result<()> {
            self.events.lock().unwrap().push("log reset".into());
            self.inner.reset(hard_state)
        }
    }

    #[test]
    fn the_applied_state_is_durable_before_the_log_lets_go_of_entries() {
        let events = Events::default();
        let backend: Arc<dyn StorageBackend> = Arc::new(OrderedBackend {
            inner: MemoryBackend::new(Limits::default()),
            events: Arc::clone(&events),
        });
        let dir = tempfile::tempdir().unwrap();
        let log = OrderedLog {
            inner: engine_log::EngineLog::open(dir.path(), None).unwrap(),
            events: Arc::clone(&events),
        };
        let mut s = LogStore::open(Arc::clone(&backend), Box::new(log), Arc::default()).unwrap();
        s.bootstrap(vec![1]).unwrap();
        let entries: Vec<_> = (2..=10).map(|i| entry(i, 2)).collect();
        s.persist(&entries, None).unwrap();
        // An apply, buffered as the state machine writes them.
        let mut apply = WriteBatch::new();
        apply.put(KeySpace::Data, b"k".to_vec(), b"v".to_vec());
        backend.batch_write(apply, WriteOptions::BUFFERED).unwrap();
        events.lock().unwrap().clear();
        assert_eq!(
            s.compact(8).unwrap(),
            1,
            "not before the applies are durable"
        );
        assert!(events.lock().unwrap().is_empty());
        s.make_durable(10);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while s.durable_applied() < 10 {
            assert!(std::time::Instant::now() < deadline, "never made durable");
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        assert_eq!(s.compact(8).unwrap(), 8);
        let mut meta = SnapshotMetadata {
            index: 20,
            term: 3,
            ..SnapshotMetadata::default()
        };
        meta.mut_conf_state().voters = vec![1];
        let mut batch = WriteBatch::new();
        s.snapshot_batch(&meta, &mut batch).unwrap();
        backend.batch_write(batch, WriteOptions::SYNC).unwrap();
        s.snapshot_installed(&meta).unwrap();
        assert_eq!(
            *events.lock().unwrap(),
            [
                "backend write, sync true",
                "log compact to 8",
                "backend write, sync true",
                "log reset"
            ],
            "the sync thread's fsync, then the compaction; the install's batch, then the reset"
        );
    }
}
