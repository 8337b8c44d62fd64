//! The replicated state machine: applies committed [`RaftCommand`]s to user data in
//! [`KeySpace::Data`], writing the applied index in the same atomic batch.
//!
//! Applying is deterministic given the data and the command, so after a crash the node re-applies from
//! the recorded applied index and reaches the same state. Apply batches are buffered (not fsynced): the
//! log they come from is already durable.

use kiwi_proto::v1::{
    CompareAndSwapRequest, DeleteRangeCommand, KeyValue, RaftCommand, compare_and_swap_request,
    raft_command, write_op,
};
use kiwi_storage::{KeySpace, Limits, Scan, ScanRange, StorageBackend, WriteBatch, WriteOptions};

/// Most key and value bytes a DeleteRange returns as its removed pairs (`prev_kv`); the rest are removed
/// all the same and the answer says it was cut.
pub const MAX_PREV_KV_BYTES: usize = 4 * 1024 * 1024;

/// Most keys a DeleteRange reads at once while it counts what it removes; pages are smaller when values
/// are large (about [`DELETE_RANGE_PAGE_BYTES`] a page), so one page of 4 MiB values is not read at once.
const DELETE_RANGE_PAGE: usize = 1024;
/// Key and value bytes a DeleteRange aims to read per page.
const DELETE_RANGE_PAGE_BYTES: usize = 4 * 1024 * 1024;

/// Key, in [`KeySpace::Raft`], of the last applied index (u64 BE).
pub const APPLIED_KEY: &[u8] = b"state/applied";

/// Prefix, in [`KeySpace::Raft`], of the client addresses of members added by membership changes
/// (`member/<id: u64 BE>` → "host:port").
const MEMBER_PREFIX: &[u8] = b"member/";

fn member_key(id: u64) -> Vec<u8> {
    let mut key = MEMBER_PREFIX.to_vec();
    key.extend_from_slice(&id.to_be_bytes());
    key
}

/// Adds the address of member `id` to `batch`.
pub fn record_member(batch: &mut WriteBatch, id: u64, addr: &str) {
    batch.put(KeySpace::Raft, member_key(id), addr.as_bytes().to_vec());
}

/// Prefix, in [`KeySpace::Raft`], of the ids a membership change removed (`removed/<id: u64 BE>`), until
/// the same id is added again. Peers refuse Raft traffic from these ids, which tells a removed node that
/// missed the entry removing it.
const REMOVED_PREFIX: &[u8] = b"removed/";

fn removed_key(id: u64) -> Vec<u8> {
    let mut key = REMOVED_PREFIX.to_vec();
    key.extend_from_slice(&id.to_be_bytes());
    key
}

/// Adds a tombstone for removed member `id` to `batch`.
pub fn record_removed(batch: &mut WriteBatch, id: u64) {
    batch.put(KeySpace::Raft, removed_key(id), Vec::new());
}

/// Adds the removal of `id`'s tombstone (it is added again) to `batch`.
pub fn clear_removed(batch: &mut WriteBatch, id: u64) {
    batch.delete(KeySpace::Raft, removed_key(id));
}

/// The ids a membership change removed (and that were not added again).
///
/// # Errors
/// Storage errors.
pub fn removed_members(backend: &dyn StorageBackend) -> kiwi_storage::Result<Vec<u64>> {
    let scan = kiwi_storage::Scan::forward(
        kiwi_storage::ScanRange::half_open(REMOVED_PREFIX, b"removed0"),
        100_000,
    );
    Ok(backend
        .scan(KeySpace::Raft, &scan)?
        .into_iter()
        .filter_map(|(k, _)| {
            <[u8; 8]>::try_from(&k[REMOVED_PREFIX.len()..])
                .ok()
                .map(u64::from_be_bytes)
        })
        .collect())
}

/// Records the addresses of members the store does not know yet (the founding members from the
/// configuration), durably. Recorded addresses win over configured ones: they came through the log.
///
/// # Errors
/// Storage errors.
pub fn record_missing_members(
    backend: &dyn StorageBackend,
    members: &[(u64, String)],
) -> kiwi_storage::Result<()> {
    let known = recorded_members(backend)?;
    let mut batch = WriteBatch::new();
    for (id, addr) in members {
        if !known.iter().any(|(k, _)| k == id) {
            record_member(&mut batch, *id, addr);
        }
    }
    backend.batch_write(batch, WriteOptions::SYNC)
}

/// Every recorded member address.
///
/// # Errors
/// Storage errors.
pub fn recorded_members(backend: &dyn StorageBackend) -> kiwi_storage::Result<Vec<(u64, String)>> {
    members_in(backend.scan(KeySpace::Raft, &members_scan())?)
}

/// Every member address recorded in a point-in-time view (for snapshots).
///
/// # Errors
/// Storage errors.
pub fn recorded_members_in(
    view: &dyn kiwi_storage::StorageSnapshot,
) -> kiwi_storage::Result<Vec<(u64, String)>> {
    members_in(view.scan(KeySpace::Raft, &members_scan())?)
}

fn members_scan() -> kiwi_storage::Scan {
    kiwi_storage::Scan::forward(
        kiwi_storage::ScanRange::half_open(MEMBER_PREFIX, b"member0"),
        10_000,
    )
}

fn members_in(pairs: Vec<kiwi_storage::KvPair>) -> kiwi_storage::Result<Vec<(u64, String)>> {
    Ok(pairs
        .into_iter()
        .filter_map(|(k, v)| {
            let id = <[u8; 8]>::try_from(&k[MEMBER_PREFIX.len()..])
                .ok()
                .map(u64::from_be_bytes)?;
            Some((id, String::from_utf8(v).ok()?))
        })
        .collect())
}

/// Checks a committed command against rules every node shares (the storage ceilings, never this
/// node's configured limits), so that every node decides the same for the same entry. A command that
/// breaks one is applied as a no-op and its proposer is told why.
///
/// # Errors
/// Why the command cannot be applied.
pub fn validate(cmd: &RaftCommand) -> Result<(), String> {
    let key = |k: &[u8], what: &str| -> Result<(), String> {
        if k.is_empty() {
            return Err(format!("{what} is empty"));
        }
        if k.len() > Limits::CEILING.max_key_bytes {
            return Err(format!(
                "{what} is {} bytes, over the ceiling of {}",
                k.len(),
                Limits::CEILING.max_key_bytes
            ));
        }
        Ok(())
    };
    let value = |v: &[u8], what: &str| -> Result<(), String> {
        if v.len() > Limits::CEILING.max_value_bytes {
            return Err(format!(
                "{what} is {} bytes, over the ceiling of {}",
                v.len(),
                Limits::CEILING.max_value_bytes
            ));
        }
        Ok(())
    };
    match &cmd.command {
        None => Err("the command is empty".into()),
        Some(raft_command::Command::Write(w)) => {
            if w.ops.is_empty() {
                return Err("the write has no operations".into());
            }
            for (i, op) in w.ops.iter().enumerate() {
                match &op.op {
                    Some(write_op::Op::Put(p)) => {
                        key(&p.key, &format!("operation {i}'s key"))?;
                        value(&p.value, &format!("operation {i}'s value"))?;
                    }
                    Some(write_op::Op::Delete(d)) => key(&d.key, &format!("operation {i}'s key"))?,
                    None => return Err(format!("operation {i} is empty")),
                }
            }
            Ok(())
        }
        Some(raft_command::Command::CompareAndSwap(cas)) => {
            key(&cas.key, "the key")?;
            match &cas.expected {
                Some(compare_and_swap_request::Expected::ExpectedValue(v)) => {
                    value(v, "expected_value")?;
                }
                Some(compare_and_swap_request::Expected::ExpectAbsent(true)) => {}
                _ => return Err("neither expected_value nor expect_absent is set".into()),
            }
            match &cas.new {
                Some(compare_and_swap_request::New::NewValue(v)) => value(v, "new_value"),
                Some(compare_and_swap_request::New::Delete(true)) => Ok(()),
                _ => Err("neither new_value nor delete is set".into()),
            }
        }
        Some(raft_command::Command::DeleteRange(d)) => {
            if d.start_key.is_empty() && d.end_key.is_empty() {
                return Err("the range is empty: set start_key or end_key".into());
            }
            if !d.start_key.is_empty() {
                key(&d.start_key, "start_key")?;
            }
            if !d.end_key.is_empty() {
                key(&d.end_key, "end_key")?;
            }
            Ok(())
        }
    }
}

/// What applying one command did, for the proposer's reply.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ApplyOutcome {
    /// The log index the command was applied at.
    pub index: u64,
    /// For a single delete: whether the key existed.
    pub existed: bool,
    /// For a compare-and-swap: whether it swapped.
    pub swapped: bool,
    /// For a compare-and-swap: the value before.
    pub previous: Option<Vec<u8>>,
    /// For a range delete: how many keys it removed.
    pub deleted: u64,
    /// For a range delete with `prev_kv`: the removed pairs (at most [`MAX_PREV_KV_BYTES`]).
    pub prev_kvs: Vec<KeyValue>,
    /// For a range delete with `prev_kv`: more pairs were removed than `prev_kvs` holds.
    pub prev_kvs_truncated: bool,
}

/// Reads the applied index (0 for a new store).
///
/// # Errors
/// Storage errors.
pub fn applied_index(backend: &dyn StorageBackend) -> kiwi_storage::Result<u64> {
    Ok(backend
        .read(KeySpace::Raft, APPLIED_KEY)?
        .and_then(|v| <[u8; 8]>::try_from(v.as_slice()).ok())
        .map_or(0, u64::from_be_bytes))
}

/// Records `index` as applied without changing data.
///
/// # Errors
/// Storage errors.
#[cfg(test)]
pub fn mark_applied(backend: &dyn StorageBackend, index: u64) -> kiwi_storage::Result<()> {
    backend.write(
        KeySpace::Raft,
        APPLIED_KEY,
        &index.to_be_bytes(),
        WriteOptions::BUFFERED,
    )
}

/// Applies a run of committed entries with as few storage writes as possible: blind writes accumulate in
/// one batch; a command that must read the current state (a compare-and-swap, a single delete reporting
/// whether the key existed) first flushes what is pending, so it reads exactly the state before it.
/// [`flush`](Self::flush) writes the batch with the last applied index; until then nothing is visible.
pub struct Applier<'a> {
    backend: &'a dyn StorageBackend,
    batch: WriteBatch,
    last: Option<u64>,
}

impl<'a> Applier<'a> {
    pub fn new(backend: &'a dyn StorageBackend) -> Self {
        Applier {
            backend,
            batch: WriteBatch::new(),
            last: None,
        }
    }

    /// Records `index` as applied without changing data (empty and invalid entries).
    pub fn skip(&mut self, index: u64) {
        self.last = Some(index);
    }

    /// Writes what is pending, then `extra` (a membership change's records) with `index` as applied, in
    /// one durable batch.
    ///
    /// # Errors
    /// Storage errors.
    pub fn commit_with(&mut self, index: u64, mut extra: WriteBatch) -> kiwi_storage::Result<()> {
        let pending = std::mem::take(&mut self.batch);
        self.last = None;
        let mut batch = pending;
        batch.ops.append(&mut extra.ops);
        batch.put(KeySpace::Raft, APPLIED_KEY, index.to_be_bytes());
        self.backend.batch_write(batch, WriteOptions::SYNC)
    }

    /// Writes everything pending, with the applied index, in one atomic batch.
    ///
    /// # Errors
    /// Storage errors.
    pub fn flush(&mut self) -> kiwi_storage::Result<()> {
        let Some(index) = self.last.take() else {
            return Ok(());
        };
        let mut batch = std::mem::take(&mut self.batch);
        batch.put(KeySpace::Raft, APPLIED_KEY, index.to_be_bytes());
        self.backend.batch_write(batch, WriteOptions::BUFFERED)
    }

    /// Applies `cmd` at `index`.
    ///
    /// # Errors
    /// Storage errors (the caller stops the node).
    pub fn apply(&mut self, index: u64, cmd: &RaftCommand) -> kiwi_storage::Result<ApplyOutcome> {
        let mut out = ApplyOutcome {
            index,
            ..ApplyOutcome::default()
        };
        match &cmd.command {
            Some(raft_command::Command::Write(w)) => {
                if let [op] = w.ops.as_slice()
                    && let Some(write_op::Op::Delete(d)) = &op.op
                {
                    self.flush()?;
                    out.existed = self.backend.read(KeySpace::Data, &d.key)?.is_some();
                }
                for op in &w.ops {
                    match &op.op {
                        Some(write_op::Op::Put(p)) => {
                            self.batch
                                .put(KeySpace::Data, p.key.clone(), p.value.clone());
                        }
                        Some(write_op::Op::Delete(d)) => {
                            self.batch.delete(KeySpace::Data, d.key.clone());
                        }
                        None => {}
                    }
                }
            }
            Some(raft_command::Command::CompareAndSwap(cas)) => {
                self.flush()?;
                let current = self.backend.read(KeySpace::Data, &cas.key)?;
                out.swapped = cas_holds(cas, current.as_deref());
                if out.swapped {
                    match &cas.new {
                        Some(compare_and_swap_request::New::NewValue(v)) => {
                            self.batch.put(KeySpace::Data, cas.key.clone(), v.clone());
                        }
                        Some(compare_and_swap_request::New::Delete(true)) => {
                            self.batch.delete(KeySpace::Data, cas.key.clone());
                        }
                        _ => {}
                    }
                }
                out.previous = current;
            }
            Some(raft_command::Command::DeleteRange(d)) => {
                self.flush()?;
                self.delete_range(d, &mut out)?;
            }
            None => {}
        }
        self.last = Some(index);
        Ok(out)
    }

    /// Removes `[start_key, end_key)` with one range delete, counting (and with `prev_kv` keeping) the
    /// pairs it held: reads page by page, so memory does not follow the range's size.
    fn delete_range(
        &mut self,
        d: &DeleteRangeCommand,
        out: &mut ApplyOutcome,
    ) -> kiwi_storage::Result<()> {
        let mut range = ScanRange::half_open(&d.start_key, &d.end_key);
        let mut first = None;
        let mut last = None;
        let mut bytes = 0;
        let mut page = 16;
        loop {
            let pairs = self.backend.scan(
                KeySpace::Data,
                &Scan {
                    range: range.clone(),
                    limit: page,
                    reverse: false,
                },
            )?;
            let got = pairs.len();
            let read: usize = pairs.iter().map(|(k, v)| k.len() + v.len()).sum();
            for (key, value) in pairs {
                out.deleted += 1;
                if d.prev_kv && !out.prev_kvs_truncated {
                    if bytes + key.len() + value.len() > MAX_PREV_KV_BYTES {
                        out.prev_kvs_truncated = true;
                    } else {
                        bytes += key.len() + value.len();
                        out.prev_kvs.push(KeyValue {
                            key: key.clone(),
                            value,
                        });
                    }
                }
                if first.is_none() {
                    first = Some(key.clone());
                }
                last = Some(key);
            }
            match (&last, got == page) {
                (Some(k), true) => range.start = std::ops::Bound::Excluded(k.clone()),
                _ => break,
            }
            let avg = (read / got.max(1)).max(1);
            page = (DELETE_RANGE_PAGE_BYTES / avg).clamp(1, DELETE_RANGE_PAGE);
        }
        let (Some(first), Some(last)) = (first, last) else {
            return Ok(());
        };
        // Both bounds are keys the store holds (or the request's own end), so they pass the batch's
        // key checks; nothing is written between the reads above and this batch (applies run one at a
        // time).
        if d.end_key.is_empty() {
            self.batch.delete_range(KeySpace::Data, first, last.clone());
            self.batch.delete(KeySpace::Data, last);
        } else {
            self.batch
                .delete_range(KeySpace::Data, first, d.end_key.clone());
        }
        Ok(())
    }
}

fn cas_holds(cas: &CompareAndSwapRequest, current: Option<&[u8]>) -> bool {
    match &cas.expected {
        Some(compare_and_swap_request::Expected::ExpectedValue(v)) => current == Some(v.as_slice()),
        Some(compare_and_swap_request::Expected::ExpectAbsent(true)) => current.is_none(),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use kiwi_proto::v1::{WriteBatchCommand, WriteOp};
    use kiwi_storage::{Limits, MemoryBackend};

    use super::*;

    /// One command in its own batch.
    fn apply(
        backend: &dyn StorageBackend,
        index: u64,
        cmd: &RaftCommand,
    ) -> kiwi_storage::Result<ApplyOutcome> {
        let mut applier = Applier::new(backend);
        let out = applier.apply(index, cmd)?;
        applier.flush()?;
        Ok(out)
    }

    fn put(k: &[u8], v: &[u8]) -> RaftCommand {
        RaftCommand {
            request_id: String::new(),
            command: Some(raft_command::Command::Write(WriteBatchCommand {
                ops: vec![WriteOp {
                    op: Some(write_op::Op::Put(write_op::Put {
                        key: k.to_vec(),
                        value: v.to_vec(),
                    })),
                }],
            })),
        }
    }

    fn cas(k: &[u8], expected: Option<&[u8]>, new: &[u8]) -> RaftCommand {
        RaftCommand {
            request_id: String::new(),
            command: Some(raft_command::Command::CompareAndSwap(
                CompareAndSwapRequest {
                    header: None,
                    key: k.to_vec(),
                    expected: Some(match expected {
                        Some(v) => compare_and_swap_request::Expected::ExpectedValue(v.to_vec()),
                        None => compare_and_swap_request::Expected::ExpectAbsent(true),
                    }),
                    new: Some(compare_and_swap_request::New::NewValue(new.to_vec())),
                },
            )),
        }
    }

    #[test]
    fn applies_writes_and_cas_with_the_applied_index() {
        let s = MemoryBackend::new(Limits::default());
        assert_eq!(applied_index(&s).unwrap(), 0);
        apply(&s, 1, &put(b"k", b"1")).unwrap();
        assert_eq!(applied_index(&s).unwrap(), 1);
        let out = apply(&s, 2, &cas(b"k", Some(b"0"), b"2")).unwrap();
        assert!(!out.swapped);
        assert_eq!(out.previous.as_deref(), Some(&b"1"[..]));
        let out = apply(&s, 3, &cas(b"k", Some(b"1"), b"2")).unwrap();
        assert!(out.swapped);
        assert!(!apply(&s, 4, &cas(b"k", None, b"3")).unwrap().swapped);
        assert!(apply(&s, 5, &cas(b"new", None, b"x")).unwrap().swapped);
        assert_eq!(
            s.read(KeySpace::Data, b"k").unwrap().as_deref(),
            Some(&b"2"[..])
        );
        assert_eq!(applied_index(&s).unwrap(), 5);
    }

    fn delete_range(start: &[u8], end: &[u8], prev_kv: bool) -> RaftCommand {
        RaftCommand {
            request_id: String::new(),
            command: Some(raft_command::Command::DeleteRange(DeleteRangeCommand {
                start_key: start.to_vec(),
                end_key: end.to_vec(),
                prev_kv,
            })),
        }
    }

    fn keys(s: &dyn StorageBackend) -> Vec<Vec<u8>> {
        s.scan(
            KeySpace::Data,
            &Scan::forward(ScanRange::half_open(b"", b""), 100_000),
        )
        .unwrap()
        .into_iter()
        .map(|(k, _)| k)
        .collect()
    }

    #[test]
    fn a_range_delete_counts_what_it_removes_in_one_write() {
        let s = MemoryBackend::new(Limits::default());
        let mut a = Applier::new(&s);
        for (i, k) in [&b"a"[..], b"b", b"c", b"d", b"x"].iter().enumerate() {
            a.apply(i as u64 + 1, &put(k, b"v")).unwrap();
        }
        // A pending write of the same run is seen by the range delete.
        a.apply(6, &put(b"b2", b"w")).unwrap();
        let out = a.apply(7, &delete_range(b"b", b"d", true)).unwrap();
        assert_eq!(out.deleted, 3);
        assert_eq!(
            out.prev_kvs
                .iter()
                .map(|kv| (kv.key.as_slice(), kv.value.as_slice()))
                .collect::<Vec<_>>(),
            [(&b"b"[..], &b"v"[..]), (b"b2", b"w"), (b"c", b"v")]
        );
        assert!(!out.prev_kvs_truncated);
        // No end: to the last key.
        let out = a.apply(8, &delete_range(b"c", b"", false)).unwrap();
        assert_eq!((out.deleted, out.prev_kvs.len()), (2, 0));
        let out = a.apply(9, &delete_range(b"m", b"p", false)).unwrap();
        assert_eq!(out.deleted, 0);
        a.flush().unwrap();
        assert_eq!(keys(&s), [b"a".to_vec()]);
        assert_eq!(applied_index(&s).unwrap(), 9);
        assert!(validate(&delete_range(b"", b"", false)).is_err());
    }

    #[test]
    fn a_large_range_delete_pages_and_cuts_its_removed_pairs() {
        let s = MemoryBackend::new(Limits::default());
        let mut a = Applier::new(&s);
        let n = 2 * DELETE_RANGE_PAGE + 500;
        for i in 0..n {
            a.apply(
                i as u64 + 1,
                &put(format!("k{i:05}").as_bytes(), &[7u8; 2048]),
            )
            .unwrap();
        }
        a.apply(n as u64 + 1, &put(b"z", b"kept")).unwrap();
        let out = a
            .apply(n as u64 + 2, &delete_range(b"\0", b"z", true))
            .unwrap();
        assert_eq!(out.deleted, n as u64, "every page counted");
        assert!(out.prev_kvs_truncated, "more than 4 MiB removed");
        let bytes: usize = out
            .prev_kvs
            .iter()
            .map(|kv| kv.key.len() + kv.value.len())
            .sum();
        assert!(bytes <= MAX_PREV_KV_BYTES && bytes > MAX_PREV_KV_BYTES - 4096);
        a.flush().unwrap();
        assert_eq!(keys(&s), [b"z".to_vec()]);
    }

    #[test]
    fn a_batched_run_sees_its_own_writes_before_a_cas() {
        let s = MemoryBackend::new(Limits::default());
        let mut a = Applier::new(&s);
        a.apply(1, &put(b"k", b"1")).unwrap();
        a.apply(2, &put(b"k", b"2")).unwrap();
        assert_eq!(
            applied_index(&s).unwrap(),
            0,
            "nothing visible before a flush"
        );
        let out = a.apply(3, &cas(b"k", Some(b"2"), b"3")).unwrap();
        assert!(out.swapped, "the CAS saw index 2's write");
        a.apply(4, &put(b"other", b"x")).unwrap();
        a.skip(5);
        a.flush().unwrap();
        assert_eq!(
            s.read(KeySpace::Data, b"k").unwrap().as_deref(),
            Some(&b"3"[..])
        );
        assert_eq!(
            s.read(KeySpace::Data, b"other").unwrap().as_deref(),
            Some(&b"x"[..])
        );
        assert_eq!(applied_index(&s).unwrap(), 5);
    }
}
