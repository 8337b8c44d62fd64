//! The Raft log in files of its own: TiKV's `raft-engine` in `<data_dir>/raft-log/`, the log of every
//! node whose data lives on disk (RocksDB or LevelDB; the log does not depend on which).
//!
//! # Why a log of its own, and why `raft-engine`
//!
//! In the data engine the log was a key-value workload it is not: every entry went through RocksDB's
//! memtable and WAL (11 % of node CPU on puts), was written twice (WAL, then flush), and was dropped by
//! range tombstones that compaction then had to rewrite. A log is appended at its end, read back only by
//! lagging followers, and dropped from its front; `raft-engine` is built for exactly that (an append-only
//! queue of files, an in-memory index of where each entry is, files dropped whole once compacted) and
//! speaks raft-rs 0.7's protobuf types, so it sits behind [`EntryLog`] with no translation.
//!
//! Measured on this machine before choosing (a probe writing 4 KiB records each followed by
//! `fdatasync`, 2,000 records, two runs): appending to a growing file took 205 / 192 µs at p50, writing over
//! space already allocated 105 / 143 µs: a growing file makes every fsync also journal the file's new
//! size. So the engine **recycles** log files (a purged file is renamed and written over, records carry
//! the file's generation so a recycled file's stale tail is never read as new) and **prefills** the
//! first files when the directory is created, so that from the first put no fsync touches metadata.
//! A segmented log of Kiwi's own would do the same with more code to get right; `raft-engine` has run
//! under TiKV for years.
//!
//! Settings (all fixed here; none is a knob users need): files of [`FILE_SIZE`], purged once the log's
//! files exceed [`PURGE_THRESHOLD`] (the Raft driver compacts the log every few thousand entries, so the
//! live log is a fraction of it), no compression (entries are small and compression costs the Raft thread
//! CPU on every append), recovery tolerant of a torn tail only (a record cut by a crash is dropped; damage
//! anywhere else refuses the start).
//!
//! # What the log holds, and what it does not
//!
//! The entries and the hard state (term, vote, commit), written together in one batch per Ready. The
//! membership, the applied index and the truncation point live in the data engine, written with the data
//! they describe; [`LogStore`](super::LogStore) reconciles the two at start (see its doc). A failed fsync
//! panics inside `raft-engine` (its write group cannot report it to every writer): the node stops, as etcd
//! does, rather than acknowledge a write it cannot prove durable.
//!
//! Purging runs on a thread of its own, woken by each compaction, so that rewriting or deleting files
//! never stalls the Raft thread.

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::mpsc::{SyncSender, TrySendError};
use std::thread::JoinHandle;

use raft::eraftpb::{Entry, HardState};
use raft_engine::{Command, Config, Engine, LogBatch, MessageExt, ReadableSize, RecoveryMode};

use super::backend_log::BackendLog;
use super::{EntryLog, damaged, store_err};
use crate::fault::FaultInjector;

/// The directory under the node's data directory that holds the log.
pub const DIR: &str = "raft-log";
/// Size of one log file.
pub const FILE_SIZE: ReadableSize = ReadableSize::mb(8);
/// The log's files are purged (compacted entries dropped, files recycled) beyond this size.
pub const PURGE_THRESHOLD: ReadableSize = ReadableSize::mb(32);
/// The one Raft group in the engine.
const GROUP: u64 = 1;
const HARD_STATE_KEY: &[u8] = b"hard_state";
const TRUNCATED_KEY: &[u8] = b"truncated";
/// Entries read at a time when the term index is rebuilt at open.
const OPEN_PAGE: u64 = 1024;

struct Entries;

impl MessageExt for Entries {
    type Entry = Entry;

    fn index(e: &Entry) -> u64 {
        e.index
    }
}

fn engine_err(e: raft_engine::Error) -> raft::Error {
    store_err(e)
}

/// The log's directory under `data_dir`.
pub fn dir(data_dir: &Path) -> PathBuf {
    data_dir.join(DIR)
}

/// The Raft log in `raft-engine`.
pub struct EngineLog {
    engine: Arc<Engine>,
    /// Runs of equal terms, `(first index of the run, term)`, ascending: `term` without a file read.
    terms: VecDeque<(u64, u64)>,
    stall: Option<Arc<FaultInjector>>,
    purge: Option<SyncSender<()>>,
    purger: Option<JoinHandle<()>>,
}

impl EngineLog {
    /// Opens (or creates, prefilling its first files) the log in `dir`. With `stall`, every write waits
    /// out an injected disk stall first, as the data engine's writes do.
    ///
    /// # Errors
    /// I/O errors and a log damaged anywhere but at its tail.
    pub fn open(dir: &Path, stall: Option<Arc<FaultInjector>>) -> raft::Result<Self> {
        let cfg = Config {
            dir: dir.to_string_lossy().into_owned(),
            recovery_mode: RecoveryMode::TolerateTailCorruption,
            recovery_threads: 1,
            batch_compression_threshold: ReadableSize(0),
            target_file_size: FILE_SIZE,
            purge_threshold: PURGE_THRESHOLD,
            enable_log_recycle: true,
            prefill_for_recycle: true,
            prefill_limit: Some(PURGE_THRESHOLD),
            ..Config::default()
        };
        let engine = Arc::new(Engine::open(cfg).map_err(|e| {
            damaged(format!(
                "cannot open the Raft log in {}: {e}",
                dir.display()
            ))
        })?);
        let (purge, wake) = std::sync::mpsc::sync_channel::<()>(1);
        let purging = Arc::clone(&engine);
        let purger = std::thread::Builder::new()
            .name("raft-log-purge".into())
            .spawn(move || {
                while wake.recv().is_ok() {
                    if let Err(e) = purging.purge_expired_files() {
                        tracing::warn!(error = %e, "purging the Raft log's files failed");
                    }
                }
            })
            .map_err(store_err)?;
        let mut log = EngineLog {
            engine,
            terms: VecDeque::new(),
            stall,
            purge: Some(purge),
            purger: Some(purger),
        };
        if let Some((first, last)) = log.bounds()? {
            let mut next = first;
            while next <= last {
                let page = log.entries(next, (next + OPEN_PAGE).min(last + 1), u64::MAX)?;
                if page.is_empty() {
                    return Err(damaged(format!(
                        "the Raft log in {} lost entry {next}",
                        dir.display()
                    )));
                }
                next += page.len() as u64;
                log.note_terms(&page);
            }
        }
        Ok(log)
    }

    fn note_terms(&mut self, entries: &[Entry]) {
        let Some(first) = entries.first() else {
            return;
        };
        while self.terms.back().is_some_and(|r| r.0 >= first.index) {
            self.terms.pop_back();
        }
        for e in entries {
            if self.terms.back().is_none_or(|r| r.1 != e.term) {
                self.terms.push_back((e.index, e.term));
            }
        }
    }

    fn write(&self, batch: &mut LogBatch, sync: bool) -> raft::Result<()> {
        if let Some(faults) = &self.stall {
            let d = faults.disk_stall();
            if !d.is_zero() {
                faults.stall_blocking(d);
            }
        }
        self.engine.write(batch, sync).map_err(engine_err)?;
        Ok(())
    }

    /// Bytes the log's files take on disk.
    pub fn used_bytes(&self) -> usize {
        self.engine.get_used_size()
    }
}

impl Drop for EngineLog {
    fn drop(&mut self) {
        // The purger holds the engine (and with it the directory's lock) until it sees the channel close.
        drop(self.purge.take());
        if let Some(t) = self.purger.take() {
            let _ = t.join();
        }
    }
}

impl EntryLog for EngineLog {
    fn hard_state(&self) -> raft::Result<HardState> {
        Ok(self
            .engine
            .get_message::<HardState>(GROUP, HARD_STATE_KEY)
            .map_err(|e| damaged(format!("damaged Raft hard state: {e}")))?
            .unwrap_or_default())
    }

    fn bounds(&self) -> raft::Result<Option<(u64, u64)>> {
        Ok(self
            .engine
            .first_index(GROUP)
            .zip(self.engine.last_index(GROUP)))
    }

    fn term(&self, index: u64) -> raft::Result<Option<u64>> {
        let Some((first, last)) = self.bounds()? else {
            return Ok(None);
        };
        if index < first || index > last {
            return Ok(None);
        }
        let run = self.terms.partition_point(|r| r.0 <= index);
        Ok(run.checked_sub(1).map(|r| self.terms[r].1))
    }

    fn entries(&self, low: u64, high: u64, max_size: u64) -> raft::Result<Vec<Entry>> {
        let mut out = Vec::new();
        let max = usize::try_from(max_size).unwrap_or(usize::MAX);
        match self
            .engine
            .fetch_entries_to::<Entries>(GROUP, low, high, Some(max), &mut out)
        {
            Ok(_) => Ok(out),
            Err(raft_engine::Error::EntryCompacted) => {
                Err(raft::Error::Store(raft::StorageError::Compacted))
            }
            Err(raft_engine::Error::EntryNotFound) => {
                Err(raft::Error::Store(raft::StorageError::Unavailable))
            }
            Err(e) => Err(engine_err(e)),
        }
    }

    fn append(
        &mut self,
        entries: &[Entry],
        stored_last: u64,
        hard_state: Option<&HardState>,
        sync: bool,
    ) -> raft::Result<()> {
        // raft-engine panics on a hole or on overwriting compacted entries: refuse them here instead.
        if let (Some(e), Some((first, last))) = (entries.first(), self.bounds()?)
            && (e.index > last + 1 || e.index < first)
        {
            return Err(damaged(format!(
                "an append at index {} does not join the Raft log ({first}..={last}, {stored_last} \
                 known to the store)",
                e.index
            )));
        }
        let mut batch = LogBatch::default();
        batch
            .add_entries::<Entries>(GROUP, entries)
            .map_err(engine_err)?;
        if let Some(hs) = hard_state {
            batch
                .put_message(GROUP, HARD_STATE_KEY.to_vec(), hs)
                .map_err(engine_err)?;
        }
        self.write(&mut batch, sync)?;
        self.note_terms(entries);
        Ok(())
    }

    fn compact(&mut self, index: u64, term: u64) -> raft::Result<()> {
        let mut batch = LogBatch::default();
        batch.add_command(GROUP, Command::Compact { index: index + 1 });
        batch
            .put(
                GROUP,
                TRUNCATED_KEY.to_vec(),
                super::encode_point(index, term),
            )
            .map_err(engine_err)?;
        self.write(&mut batch, false)?;
        while self.terms.get(1).is_some_and(|r| r.0 <= index + 1) {
            self.terms.pop_front();
        }
        if let Some(purge) = &self.purge
            && let Err(TrySendError::Disconnected(())) = purge.try_send(())
        {
            tracing::warn!("the Raft log's purge thread has stopped");
        }
        Ok(())
    }

    fn truncated(&self) -> raft::Result<Option<(u64, u64)>> {
        self.engine
            .get(GROUP, TRUNCATED_KEY)
            .map(|b| super::decode_point(&b))
            .transpose()
    }

    /// `Clean` drops the group's entries and keys (the truncation point among them).
    fn reset(&mut self, hard_state: &HardState) -> raft::Result<()> {
        let mut batch = LogBatch::default();
        batch.add_command(GROUP, Command::Clean);
        batch
            .put_message(GROUP, HARD_STATE_KEY.to_vec(), hard_state)
            .map_err(engine_err)?;
        self.write(&mut batch, true)?;
        self.terms.clear();
        Ok(())
    }
}

/// Moves a log kept in the data engine by an earlier version (see [`backend_log`](super::backend_log))
/// into `to`: the hard state and every entry, fsynced; then the truncation record is rewritten in this
/// version's layout; then the old copy is removed from the data engine. A crash before the last step
/// leaves the old copy, which the next start moves again (the new log is reset first); the old copy is
/// removed only once the new one is durable. Returns the number of entries moved.
///
/// # Errors
/// Storage errors.
pub fn upgrade(from: &BackendLog, to: &mut EngineLog) -> raft::Result<u64> {
    let hs = from.hard_state()?;
    to.reset(&hs)?;
    let mut moved = 0;
    if let Some((first, last)) = from.bounds()? {
        let mut next = first;
        while next <= last {
            let page = from.entries(next, (next + OPEN_PAGE).min(last + 1), u64::MAX)?;
            if page.is_empty() {
                return Err(damaged(format!(
                    "the Raft log in the data engine lost entry {next}"
                )));
            }
            next += page.len() as u64;
            moved += page.len() as u64;
            to.append(&page, next - 1, None, next > last)?;
        }
    }
    super::LogStore::record_layout(from.backend())?;
    from.remove_all()?;
    Ok(moved)
}

#[cfg(test)]
mod tests {
    use super::super::tests::entry;
    use super::*;

    fn hs(term: u64, commit: u64) -> HardState {
        HardState {
            term,
            vote: 1,
            commit,
            ..HardState::default()
        }
    }

    #[test]
    fn appends_overwrites_a_conflicting_suffix_and_reopens() {
        let dir = tempfile::tempdir().unwrap();
        {
            let mut log = EngineLog::open(dir.path(), None).unwrap();
            assert_eq!(log.bounds().unwrap(), None);
            assert_eq!(log.hard_state().unwrap(), HardState::default());
            let first: Vec<_> = (2..=6).map(|i| entry(i, 1 + i / 4)).collect();
            log.append(&first, 1, Some(&hs(2, 3)), true).unwrap();
            // A new leader overwrites index 4 onwards.
            log.append(&[entry(4, 5)], 6, None, true).unwrap();
            assert_eq!(log.bounds().unwrap(), Some((2, 4)));
            assert_eq!(log.term(3).unwrap(), Some(1));
            assert_eq!(log.term(4).unwrap(), Some(5));
            assert_eq!(log.term(5).unwrap(), None);
        }
        let log = EngineLog::open(dir.path(), None).unwrap();
        assert_eq!(log.bounds().unwrap(), Some((2, 4)));
        assert_eq!(log.hard_state().unwrap(), hs(2, 3));
        assert_eq!(
            log.entries(2, 5, u64::MAX).unwrap(),
            vec![entry(2, 1), entry(3, 1), entry(4, 5)]
        );
        assert_eq!(log.term(2).unwrap(), Some(1), "terms rebuilt at open");
        assert_eq!(log.term(4).unwrap(), Some(5));
        assert_eq!(log.entries(2, 5, 1).unwrap().len(), 1, "at least one entry");
        assert!(log.entries(2, 6, u64::MAX).is_err());
    }

    #[test]
    fn compaction_and_reset_survive_a_reopen_and_holes_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        {
            let mut log = EngineLog::open(dir.path(), None).unwrap();
            let entries: Vec<_> = (2..=100).map(|i| entry(i, 1 + i / 10)).collect();
            log.append(&entries, 1, None, true).unwrap();
            log.compact(50, 6).unwrap();
            assert_eq!(log.truncated().unwrap(), Some((50, 6)));
            assert_eq!(log.bounds().unwrap(), Some((51, 100)));
            assert_eq!(log.term(50).unwrap(), None);
            assert_eq!(log.term(51).unwrap(), Some(6));
            assert_eq!(
                log.entries(40, 60, u64::MAX),
                Err(raft::Error::Store(raft::StorageError::Compacted))
            );
            assert!(log.append(&[entry(102, 9)], 100, None, true).is_err());
            assert!(log.append(&[entry(30, 9)], 100, None, true).is_err());
        }
        {
            let mut log = EngineLog::open(dir.path(), None).unwrap();
            assert_eq!(log.bounds().unwrap(), Some((51, 100)));
            assert_eq!(log.term(99).unwrap(), Some(10));
            assert_eq!(
                log.truncated().unwrap(),
                Some((50, 6)),
                "kept across a reopen"
            );
            log.reset(&hs(12, 500)).unwrap();
            assert_eq!(log.bounds().unwrap(), None);
            assert_eq!(log.truncated().unwrap(), None);
            // After a snapshot at 500 the log starts anywhere.
            log.append(&[entry(501, 12)], 500, None, true).unwrap();
        }
        let log = EngineLog::open(dir.path(), None).unwrap();
        assert_eq!(log.bounds().unwrap(), Some((501, 501)));
        assert_eq!(log.hard_state().unwrap(), hs(12, 500));
    }

    fn newest_file(dir: &Path) -> PathBuf {
        std::fs::read_dir(dir)
            .unwrap()
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|x| x == "raftlog"))
            .max()
            .unwrap()
    }

    #[test]
    fn a_torn_tail_drops_only_the_record_it_cuts() {
        let dir = tempfile::tempdir().unwrap();
        let (before, after) = {
            let mut log = EngineLog::open(dir.path(), None).unwrap();
            log.append(&[entry(2, 1), entry(3, 1)], 1, Some(&hs(1, 2)), true)
                .unwrap();
            let before = std::fs::read(newest_file(dir.path())).unwrap();
            log.append(&[entry(4, 1)], 3, Some(&hs(1, 3)), true)
                .unwrap();
            (before, std::fs::read(newest_file(dir.path())).unwrap())
        };
        // Where the second record lies: the bytes the second write changed (the file may be longer,
        // allocated ahead).
        let start = (0..after.len())
            .find(|&i| before.get(i) != Some(&after[i]))
            .expect("the second write changed the file");
        let end = (0..after.len())
            .rev()
            .find(|&i| before.get(i) != Some(&after[i]))
            .unwrap();
        assert!(end > start + 8, "the record spans {start}..={end}");
        // A crash cut the second record short.
        std::fs::OpenOptions::new()
            .write(true)
            .open(newest_file(dir.path()))
            .unwrap()
            .set_len(((start + end) / 2) as u64)
            .unwrap();
        let mut log = EngineLog::open(dir.path(), None).unwrap();
        assert_eq!(log.bounds().unwrap(), Some((2, 3)));
        assert_eq!(log.hard_state().unwrap(), hs(1, 2));
        log.append(&[entry(4, 2)], 3, None, true).unwrap();
        drop(log);
        let log = EngineLog::open(dir.path(), None).unwrap();
        assert_eq!(
            log.entries(2, 5, u64::MAX).unwrap().last(),
            Some(&entry(4, 2))
        );
    }

    #[test]
    fn recycled_files_stale_records_are_never_read_back() {
        let dir = tempfile::tempdir().unwrap();
        let big = |i: u64| Entry {
            index: i,
            term: 3,
            data: vec![(i % 251) as u8; 64 * 1024].into(),
            ..Entry::default()
        };
        let mut last = 1;
        {
            let mut log = EngineLog::open(dir.path(), None).unwrap();
            // Three times the purge threshold, compacted as it goes: files are purged and recycled.
            let per_batch = 16;
            let batches = 3 * PURGE_THRESHOLD.0 / (per_batch * 64 * 1024);
            for _ in 0..batches {
                let entries: Vec<_> = (last + 1..=last + per_batch).map(big).collect();
                log.append(&entries, last, None, false).unwrap();
                last += per_batch;
                log.compact(last - 8, 3).unwrap();
                log.engine.purge_expired_files().unwrap();
            }
            log.append(&[entry(last + 1, 4)], last, Some(&hs(4, last)), true)
                .unwrap();
            last += 1;
            let on_disk = crate::telemetry::storage_metrics::dir_size(dir.path());
            assert!(
                on_disk < 3 * PURGE_THRESHOLD.0,
                "files were purged: {on_disk} bytes on disk"
            );
        }
        let log = EngineLog::open(dir.path(), None).unwrap();
        assert_eq!(log.bounds().unwrap(), Some((last - 8, last)));
        let got = log.entries(last - 8, last + 1, u64::MAX).unwrap();
        assert_eq!(got.len(), 9);
        for e in &got[..8] {
            assert_eq!(e, &big(e.index));
        }
        assert_eq!(got[8], entry(last, 4));
        assert_eq!(log.term(last - 1).unwrap(), Some(3));
    }

    #[test]
    fn a_log_in_the_data_engine_is_moved_once() {
        use kiwi_storage::{Limits, MemoryBackend, StorageBackend};
        let backend: Arc<dyn StorageBackend> = Arc::new(MemoryBackend::new(Limits::default()));
        let mut old = BackendLog::new(Arc::clone(&backend));
        let entries: Vec<_> = (5..=2100).map(|i| entry(i, 2)).collect();
        old.append(&entries, 0, Some(&hs(2, 2000)), true).unwrap();
        assert!(BackendLog::holds_any(&*backend).unwrap());
        let dir = tempfile::tempdir().unwrap();
        {
            let mut log = EngineLog::open(dir.path(), None).unwrap();
            // A crash after an earlier partial move left some entries behind.
            log.append(&[entry(5, 2)], 0, None, true).unwrap();
            assert_eq!(upgrade(&old, &mut log).unwrap(), 2096);
        }
        assert!(!BackendLog::holds_any(&*backend).unwrap());
        assert!(!super::super::LogStore::earlier_layout(&*backend).unwrap());
        let log = EngineLog::open(dir.path(), None).unwrap();
        assert_eq!(log.bounds().unwrap(), Some((5, 2100)));
        assert_eq!(log.hard_state().unwrap(), hs(2, 2000));
        assert_eq!(log.entries(5, 2101, u64::MAX).unwrap(), entries);
    }
}
