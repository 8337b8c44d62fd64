//! The replicated state machine: applies committed [`RaftCommand`]s to user data in
//! [`KeySpace::Data`], writing the applied index in the same atomic batch.
//!
//! Applying is deterministic given the data and the command, so after a crash the node re-applies from
//! the recorded applied index and reaches the same state. Apply batches are buffered (not fsynced): the
//! log they come from is already durable.

use std::collections::BTreeMap;
use std::ops::Bound;

use kiwi_proto::v1::{
    Compare, CompareAndSwapRequest, KeyEvent, KeyValue, RaftCommand, TxnOpResponse, TxnRequest,
    compare, compare_and_swap_request, raft_command, txn_op, txn_op_response, write_op,
};
use kiwi_storage::{KeySpace, Limits, Scan, ScanRange, StorageBackend, WriteBatch, WriteOptions};

use crate::raft::{lease_state, mvcc};

/// Most key and value bytes a DeleteRange returns as its removed pairs (`prev_kv`); the rest are removed
/// all the same and the answer says it was cut.
pub const MAX_PREV_KV_BYTES: usize = 4 * 1024 * 1024;

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
        Some(raft_command::Command::Txn(t)) => validate_txn(t, Limits::CEILING),
        Some(raft_command::Command::Compact(c)) => {
            if c.revision == 0 {
                return Err("the compaction revision is 0".into());
            }
            Ok(())
        }
        Some(raft_command::Command::LeaseGrant(g)) => {
            if g.id == 0 || g.id > lease_state::MAX_LEASE_ID {
                return Err(format!(
                    "lease id {} is outside 1 to {}",
                    g.id,
                    lease_state::MAX_LEASE_ID
                ));
            }
            if g.ttl <= 0 || g.ttl > lease_state::MAX_TTL_SECS {
                return Err(format!(
                    "a lease's TTL must be 1 to {} seconds, got {}",
                    lease_state::MAX_TTL_SECS,
                    g.ttl
                ));
            }
            Ok(())
        }
        Some(raft_command::Command::LeaseRevoke(r)) => {
            if r.id == 0 {
                return Err("lease id 0 is no lease".into());
            }
            Ok(())
        }
    }
}

/// Checks a transaction against `limits` and the transaction limits: the count of compares and ops, keys
/// and values, and that no key is written twice in one branch.
///
/// # Errors
/// What is wrong, naming the compare or op.
pub fn validate_txn(t: &TxnRequest, limits: Limits) -> Result<(), String> {
    let key = |k: &[u8], what: &dyn Fn() -> String| -> Result<(), String> {
        limits
            .check_key(KeySpace::Data, k)
            .map_err(|e| format!("{}: {e}", what()))
    };
    if t.compare.len() > MAX_TXN_OPS {
        return Err(format!(
            "the transaction has {} compares, over the limit of {MAX_TXN_OPS}",
            t.compare.len()
        ));
    }
    for (i, c) in t.compare.iter().enumerate() {
        key(&c.key, &|| format!("compare {i}'s key"))?;
        if let Some(compare::TargetUnion::Value(v)) = &c.target_union {
            limits
                .check_value(KeySpace::Data, v)
                .map_err(|e| format!("compare {i}'s value: {e}"))?;
        }
    }
    for (name, ops) in [("success", &t.success), ("failure", &t.failure)] {
        if ops.len() > MAX_TXN_OPS {
            return Err(format!(
                "the {name} branch has {} ops, over the limit of {MAX_TXN_OPS}",
                ops.len()
            ));
        }
        let mut puts: Vec<&[u8]> = Vec::new();
        let mut deletes: Vec<(Vec<u8>, Vec<u8>)> = Vec::new();
        for (i, op) in ops.iter().enumerate() {
            let what = || format!("{name} op {i}'s key");
            match &op.op {
                Some(txn_op::Op::Range(r)) => key(&r.key, &what)?,
                Some(txn_op::Op::Put(p)) => {
                    key(&p.key, &what)?;
                    limits
                        .check_value(KeySpace::Data, &p.value)
                        .map_err(|e| format!("{name} op {i}'s value: {e}"))?;
                    puts.push(&p.key);
                }
                Some(txn_op::Op::DeleteRange(d)) => {
                    key(&d.key, &what)?;
                    deletes.push(etcd_range(&d.key, &d.range_end));
                }
                None => return Err(format!("{name} op {i} is empty")),
            }
        }
        let mut sorted = puts.clone();
        sorted.sort_unstable();
        let twice = sorted.windows(2).any(|w| w[0] == w[1])
            || puts.iter().any(|k| {
                deletes
                    .iter()
                    .any(|(s, e)| k >= &s.as_slice() && (e.is_empty() || k < &e.as_slice()))
            });
        if twice {
            return Err(DUPLICATE_KEY.into());
        }
    }
    Ok(())
}

/// etcd's answer to a transaction writing a key twice in one branch.
pub const DUPLICATE_KEY: &str = "duplicate key given in txn request";

/// What applying one command did, for the proposer's reply.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ApplyOutcome {
    /// The log index the command was applied at: its revision.
    pub index: u64,
    /// For a single delete: whether the key existed.
    pub existed: bool,
    /// For a compare-and-swap: whether it swapped.
    pub swapped: bool,
    /// For a compare-and-swap: the value before.
    pub previous: Option<Vec<u8>>,
    /// For a single put: the key before it.
    pub prev_kv: Option<KeyValue>,
    /// For a range delete: how many keys it removed.
    pub deleted: u64,
    /// For a range delete with `prev_kv`: the removed pairs (at most [`MAX_PREV_KV_BYTES`]).
    pub prev_kvs: Vec<KeyValue>,
    /// For a range delete with `prev_kv`: more pairs were removed than `prev_kvs` holds.
    pub prev_kvs_truncated: bool,
    /// For a transaction: whether its compares held, and each op's answer.
    pub txn: Option<(bool, Vec<TxnOpResponse>)>,
    /// Why the command changed nothing though it was valid (a range delete over its limits, a lease
    /// that does not exist).
    pub refused: Option<Refusal>,
}

/// Why a valid command changed nothing.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("{0}")]
    Invalid(String),
    #[error("lease {0} not found")]
    LeaseNotFound(u64),
    #[error("lease {0} already exists")]
    LeaseExists(u64),
    #[error("{0}")]
    TooMany(String),
}

/// The changes one write made, in order, as watches see them.
#[derive(Debug, Clone, PartialEq)]
pub struct Change {
    pub revision: u64,
    pub events: Vec<KeyEvent>,
}

/// What the driver publishes after each run of applied entries (once it is in storage): the run's
/// entries `from..=to` and their changes. `changes` is `None` when the run's changes are too large to
/// hand around ([`FEED_MAX_BYTES`]) or unknown (a snapshot install): watchers read them from the kept
/// history instead.
#[derive(Debug)]
pub struct Published {
    pub from: u64,
    pub to: u64,
    pub changes: Option<Vec<Change>>,
}

/// Runs the change feed keeps for watchers that have not read them yet (older ones are dropped and
/// such a watcher reads the history instead).
pub const FEED_RUNS: usize = 128;
/// Largest run the feed carries (key and value bytes of its events); larger ones are marked only.
pub const FEED_MAX_BYTES: usize = 256 * 1024;

/// The change feed's sender.
pub type ChangeFeed = tokio::sync::broadcast::Sender<std::sync::Arc<Published>>;

/// Key and value bytes of some changes' events.
pub fn change_bytes(changes: &[Change]) -> usize {
    let kv = |kv: &Option<KeyValue>| kv.as_ref().map_or(0, |kv| kv.key.len() + kv.value.len());
    changes
        .iter()
        .flat_map(|c| &c.events)
        .map(|e| kv(&e.kv) + kv(&e.prev_kv))
        .sum()
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

/// Most keys one range delete (alone or in a transaction) removes: one over is refused as a whole,
/// before anything is removed, so that one write's history and answer stay bounded in memory.
pub const MAX_DELETE_KEYS: u64 = 100_000;
/// Most key and value bytes one range delete removes (refused as a whole above).
pub const MAX_DELETE_BYTES: usize = 64 * 1024 * 1024;
/// Most key and value bytes the range reads of one transaction return (each ends early with `more`).
pub const MAX_TXN_READ_BYTES: usize = 4 * 1024 * 1024;
/// Most pairs one range read of a transaction returns.
pub const MAX_TXN_READ_KEYS: usize = 10_000;
/// Most compares, and ops in each branch, of a transaction (etcd's default `--max-txn-ops`).
pub const MAX_TXN_OPS: usize = 128;

/// Applies a run of committed entries with as few storage writes as possible: the writes of the whole
/// run accumulate in one batch, and the applier remembers the keys it wrote ([`Self::current`] sees
/// them), so a command that reads state (a key's counters, a compare, a range) reads exactly the state
/// before it. [`flush`](Self::flush) writes the batch with the last applied index; until then nothing is
/// visible.
pub struct Applier<'a> {
    backend: &'a dyn StorageBackend,
    batch: WriteBatch,
    last: Option<u64>,
    /// The keys the pending batch writes: the position of their last put in the batch (`None`:
    /// deleted), so that their values are read from the batch, not copied.
    pending: BTreeMap<Vec<u8>, Option<usize>>,
    /// The changes of the writes applied, for watches ([`Self::take_changes`]).
    changes: Vec<Change>,
    /// Lease state the pending batch writes (see [`LeaseOverlay`]).
    leases: LeaseOverlay,
    /// The history's events and compactions of the run, in revision order, written after `batch` in
    /// the same atomic write (see [`mvcc::record`]).
    events: WriteBatch,
}

/// Lease records, attachments and the lease count as the pending batch changes them, so that commands
/// of the same run see them before the flush.
#[derive(Default)]
struct LeaseOverlay {
    /// `None`: removed.
    records: BTreeMap<u64, Option<lease_state::Record>>,
    /// (lease, key) → attached.
    index: BTreeMap<(u64, Vec<u8>), bool>,
    count: Option<u64>,
}

impl<'a> Applier<'a> {
    pub fn new(backend: &'a dyn StorageBackend) -> Self {
        Applier {
            backend,
            batch: WriteBatch::new(),
            last: None,
            pending: BTreeMap::new(),
            changes: Vec::new(),
            leases: LeaseOverlay::default(),
            events: WriteBatch::new(),
        }
    }

    /// Records `index` as applied without changing data (empty and invalid entries).
    pub fn skip(&mut self, index: u64) {
        self.last = Some(index);
    }

    /// The changes of the writes applied so far (once flushed, they are in storage).
    pub fn take_changes(&mut self) -> Vec<Change> {
        std::mem::take(&mut self.changes)
    }

    /// Writes what is pending, then `extra` (a membership change's records) with `index` as applied, in
    /// one durable batch.
    ///
    /// # Errors
    /// Storage errors.
    pub fn commit_with(&mut self, index: u64, mut extra: WriteBatch) -> kiwi_storage::Result<()> {
        let pending = std::mem::take(&mut self.batch);
        self.pending.clear();
        self.leases = LeaseOverlay::default();
        self.last = None;
        let mut batch = pending;
        batch.ops.append(&mut self.events.ops);
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
        self.pending.clear();
        self.leases = LeaseOverlay::default();
        batch.ops.append(&mut self.events.ops);
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
        let mut w = Writes::new(index);
        match &cmd.command {
            Some(raft_command::Command::Write(b)) => {
                // A key written twice in one batch: the last operation wins, and only its change is
                // recorded (the batch is one write; its intermediate states never existed).
                // (A single put or delete, the common case, needs no look.)
                let mut ops: Vec<&write_op::Op> = Vec::with_capacity(b.ops.len());
                if let [op] = b.ops.as_slice() {
                    ops.extend(op.op.as_ref());
                } else {
                    let mut seen = std::collections::HashSet::new();
                    for op in b.ops.iter().rev().filter_map(|o| o.op.as_ref()) {
                        let key = match op {
                            write_op::Op::Put(p) => &p.key,
                            write_op::Op::Delete(d) => &d.key,
                        };
                        if seen.insert(key.as_slice()) {
                            ops.push(op);
                        }
                    }
                    ops.reverse();
                }
                let leases = ops.iter().filter_map(|op| match op {
                    write_op::Op::Put(p) => Some(p.lease),
                    write_op::Op::Delete(_) => None,
                });
                if let Some(r) = self.check_leases(leases)? {
                    out.refused = Some(r);
                    self.last = Some(index);
                    return Ok(out);
                }
                for op in ops {
                    match op {
                        write_op::Op::Put(p) => {
                            out.prev_kv = self.put(&mut w, &p.key, &p.value, p.lease)?;
                        }
                        write_op::Op::Delete(d) => {
                            out.existed = self.delete(&mut w, &d.key)?.is_some();
                        }
                    }
                }
            }
            Some(raft_command::Command::CompareAndSwap(cas)) => {
                let current = self.current(&cas.key)?;
                out.swapped = cas_holds(cas, current.as_ref().map(|kv| kv.value.as_slice()));
                if out.swapped {
                    match &cas.new {
                        Some(compare_and_swap_request::New::NewValue(v)) => {
                            self.put(&mut w, &cas.key, v, 0)?;
                        }
                        Some(compare_and_swap_request::New::Delete(true)) => {
                            self.delete(&mut w, &cas.key)?;
                        }
                        _ => {}
                    }
                }
                out.previous = current.map(|kv| kv.value);
            }
            Some(raft_command::Command::DeleteRange(d)) => {
                match self.delete_range(&mut w, &d.start_key, &d.end_key, d.prev_kv)? {
                    Ok(r) => {
                        out.deleted = r.deleted;
                        out.prev_kvs = r.prev_kvs;
                        out.prev_kvs_truncated = r.truncated;
                    }
                    Err(why) => out.refused = Some(Refusal::Invalid(why)),
                }
            }
            Some(raft_command::Command::Txn(t)) => match self.txn(&mut w, t)? {
                Ok(r) => out.txn = Some(r),
                Err(why) => {
                    // Nothing of the branch is kept: undo its writes.
                    self.discard(&w);
                    w = Writes::new(index);
                    out.refused = Some(why);
                }
            },
            Some(raft_command::Command::Compact(c)) => {
                let oldest = mvcc::compacted(self.backend)?;
                if c.revision > oldest && c.revision <= index {
                    // With the events: it removes those before it, of earlier commands of the run too.
                    mvcc::compact_batch(&mut self.events, c.revision);
                }
            }
            Some(raft_command::Command::LeaseGrant(g)) => {
                let count = self.lease_count()?;
                if self.lease(g.id)?.is_some() {
                    out.refused = Some(Refusal::LeaseExists(g.id));
                } else if count >= lease_state::MAX_LEASES {
                    out.refused = Some(Refusal::TooMany(format!(
                        "the cluster holds {count} leases, the limit: revoke some first"
                    )));
                } else {
                    self.set_lease(
                        g.id,
                        Some(lease_state::Record {
                            ttl: g.ttl,
                            keys: 0,
                        }),
                    );
                    self.set_lease_count(count + 1);
                }
            }
            Some(raft_command::Command::LeaseRevoke(r)) => {
                if self.lease(r.id)?.is_some() {
                    for key in self.lease_keys(r.id)? {
                        if self.delete(&mut w, &key)?.is_some() {
                            out.deleted += 1;
                        }
                    }
                    self.set_lease(r.id, None);
                    let count = self.lease_count()?;
                    self.set_lease_count(count.saturating_sub(1));
                } else {
                    out.refused = Some(Refusal::LeaseNotFound(r.id));
                }
            }
            None => {}
        }
        if !w.events.is_empty() {
            for (pos, event) in w.events.iter().enumerate() {
                mvcc::record(&mut self.batch, &mut self.events, index, pos as u32, event);
            }
            self.changes.push(Change {
                revision: index,
                events: w.events,
            });
        }
        self.last = Some(index);
        Ok(out)
    }

    /// The stored bytes of the pending put at `pos` in the batch.
    fn pending_value(&self, pos: usize) -> &[u8] {
        match &self.batch.ops[pos] {
            kiwi_storage::WriteOp::Put { value, .. } => value,
            _ => unreachable!("pending positions are puts"),
        }
    }

    /// A pending key as a key-value (`None`: deleted).
    fn pending_kv(&self, key: &[u8], pos: Option<usize>) -> Option<KeyValue> {
        pos.map(|p| mvcc::to_kv(key.to_vec(), self.pending_value(p).to_vec(), false))
    }

    /// The key as the state before the command being applied holds it (pending writes included).
    fn current(&self, key: &[u8]) -> kiwi_storage::Result<Option<KeyValue>> {
        if let Some(&pos) = self.pending.get(key) {
            return Ok(self.pending_kv(key, pos));
        }
        Ok(self
            .backend
            .read(KeySpace::Data, key)?
            .map(|s| mvcc::to_kv(key.to_vec(), s, false)))
    }

    /// Visits the keys of `[start, end)` (an empty `end`: no bound) in order, pending writes included,
    /// until `f` returns false.
    fn visit(
        &self,
        start: &[u8],
        end: &[u8],
        mut f: impl FnMut(KeyValue) -> bool,
    ) -> kiwi_storage::Result<()> {
        const PAGE: usize = 256;
        let upper = |k: &[u8]| end.is_empty() || k < end;
        let mut overlay = self
            .pending
            .range::<[u8], _>((Bound::Included(start), Bound::Unbounded))
            .take_while(|(k, _)| upper(k))
            .peekable();
        let mut range = ScanRange::half_open(start, end);
        loop {
            let page = self
                .backend
                .scan(KeySpace::Data, &Scan::forward(range.clone(), PAGE))?;
            let full = page.len() == PAGE;
            for (key, stored) in page {
                // Pending keys up to this one come first; a pending key replaces the stored one.
                while let Some((k, &pos)) = overlay.next_if(|(k, _)| k.as_slice() <= key.as_slice())
                {
                    if let Some(kv) = self.pending_kv(k, pos)
                        && !f(kv)
                    {
                        return Ok(());
                    }
                }
                if self.pending.contains_key(&key) {
                    range.start = Bound::Excluded(key);
                    continue;
                }
                if !f(mvcc::to_kv(key.clone(), stored, false)) {
                    return Ok(());
                }
                range.start = Bound::Excluded(key);
            }
            if !full {
                break;
            }
        }
        for (k, &pos) in overlay {
            if let Some(kv) = self.pending_kv(k, pos)
                && !f(kv)
            {
                return Ok(());
            }
        }
        Ok(())
    }

    /// Puts `key` at the write's revision; returns the key before.
    fn put(
        &mut self,
        w: &mut Writes,
        key: &[u8],
        value: &[u8],
        lease: u64,
    ) -> kiwi_storage::Result<Option<KeyValue>> {
        let prev = self.current(key)?;
        let counters = mvcc::Counters {
            create_revision: prev.as_ref().map_or(w.revision, |p| p.create_revision),
            mod_revision: w.revision,
            version: prev.as_ref().map_or(1, |p| p.version + 1),
            lease,
        };
        let old_lease = prev.as_ref().map_or(0, |p| p.lease);
        if old_lease != lease {
            self.detach(old_lease, key)?;
            self.attach(lease, key)?;
        }
        self.pending
            .insert(key.to_vec(), Some(self.batch.ops.len()));
        self.batch.put(
            KeySpace::Data,
            key.to_vec(),
            mvcc::encode_stored(counters, value),
        );
        w.touched.push(key.to_vec());
        let kv = KeyValue {
            key: key.to_vec(),
            value: value.to_vec(),
            create_revision: counters.create_revision,
            mod_revision: counters.mod_revision,
            version: counters.version,
            lease,
        };
        w.events.push(mvcc::put_event(kv, prev.clone()));
        Ok(prev)
    }

    /// Deletes `key` at the write's revision (nothing, and no event, when it is missing); returns the
    /// key before.
    fn delete(&mut self, w: &mut Writes, key: &[u8]) -> kiwi_storage::Result<Option<KeyValue>> {
        let Some(prev) = self.current(key)? else {
            return Ok(None);
        };
        self.detach(prev.lease, key)?;
        self.batch.delete(KeySpace::Data, key.to_vec());
        self.pending.insert(key.to_vec(), None);
        w.touched.push(key.to_vec());
        w.events.push(mvcc::delete_event(prev.clone(), w.revision));
        Ok(Some(prev))
    }

    /// Removes the keys of `[start, end)`; refused as a whole (`Err`) over [`MAX_DELETE_KEYS`] or
    /// [`MAX_DELETE_BYTES`].
    fn delete_range(
        &mut self,
        w: &mut Writes,
        start: &[u8],
        end: &[u8],
        prev_kv: bool,
    ) -> kiwi_storage::Result<Result<RangeDeleted, String>> {
        let mut keys = Vec::new();
        let mut bytes = 0usize;
        let mut over = false;
        self.visit(start, end, |kv| {
            bytes += kv.key.len() + kv.value.len();
            keys.push(kv.key);
            over = keys.len() as u64 > MAX_DELETE_KEYS || bytes > MAX_DELETE_BYTES;
            !over
        })?;
        if over {
            return Ok(Err(format!(
                "the range holds more than {MAX_DELETE_KEYS} keys or {} MiB: delete it in parts",
                MAX_DELETE_BYTES >> 20
            )));
        }
        let mut r = RangeDeleted::default();
        let mut kept = 0;
        for key in keys {
            let Some(prev) = self.delete(w, &key)? else {
                continue;
            };
            r.deleted += 1;
            if prev_kv && !r.truncated {
                let size = prev.key.len() + prev.value.len();
                if kept + size > MAX_PREV_KV_BYTES {
                    r.truncated = true;
                } else {
                    kept += size;
                    r.prev_kvs.push(prev);
                }
            }
        }
        Ok(Ok(r))
    }

    /// Drops the writes of `w` from the pending batch (a transaction refused part way).
    fn discard(&mut self, w: &Writes) {
        let touched: std::collections::HashSet<&[u8]> =
            w.touched.iter().map(Vec::as_slice).collect();
        self.batch.ops.truncate(w.batch_len);
        for key in touched {
            self.pending.remove(key);
        }
        // Restore what earlier commands of the run wrote to those keys, and their lease changes.
        self.leases = LeaseOverlay::default();
        for op in &self.batch.ops {
            self.leases.replay(op);
        }
        for (pos, op) in self.batch.ops.iter().enumerate() {
            match op {
                kiwi_storage::WriteOp::Put {
                    space: KeySpace::Data,
                    key,
                    ..
                } if w.touched.contains(key) => {
                    self.pending.insert(key.clone(), Some(pos));
                }
                kiwi_storage::WriteOp::Delete {
                    space: KeySpace::Data,
                    key,
                } if w.touched.contains(key) => {
                    self.pending.insert(key.clone(), None);
                }
                _ => {}
            }
        }
    }

    /// Evaluates a transaction's compares and applies the ops of the branch they choose.
    fn txn(
        &mut self,
        w: &mut Writes,
        t: &TxnRequest,
    ) -> kiwi_storage::Result<Result<(bool, Vec<TxnOpResponse>), Refusal>> {
        w.batch_len = self.batch.ops.len();
        let mut succeeded = true;
        for c in &t.compare {
            if !self.compare_holds(c)? {
                succeeded = false;
                break;
            }
        }
        let ops = if succeeded { &t.success } else { &t.failure };
        let leases = ops.iter().filter_map(|op| match &op.op {
            Some(txn_op::Op::Put(p)) => Some(p.lease),
            _ => None,
        });
        if let Some(r) = self.check_leases(leases)? {
            return Ok(Err(r));
        }
        let mut answers = Vec::with_capacity(ops.len());
        let mut read_bytes = 0usize;
        for op in ops {
            let answer = match &op.op {
                Some(txn_op::Op::Range(r)) => {
                    let (start, end) = etcd_range(&r.key, &r.range_end);
                    let limit = if r.limit == 0 {
                        MAX_TXN_READ_KEYS
                    } else {
                        (r.limit as usize).min(MAX_TXN_READ_KEYS)
                    };
                    let mut res = txn_op_response::Range::default();
                    self.visit(&start, &end, |mut kv| {
                        res.count += 1;
                        if r.count_only {
                            return true;
                        }
                        if r.keys_only {
                            kv.value = Vec::new();
                        }
                        let size = kv.key.len() + kv.value.len();
                        if res.kvs.len() >= limit || read_bytes + size > MAX_TXN_READ_BYTES {
                            res.more = true;
                        } else {
                            read_bytes += size;
                            res.kvs.push(kv);
                        }
                        true
                    })?;
                    txn_op_response::Response::Range(res)
                }
                Some(txn_op::Op::Put(p)) => {
                    let prev = self.put(w, &p.key, &p.value, p.lease)?;
                    txn_op_response::Response::Put(txn_op_response::Put {
                        prev_kv: prev.filter(|_| p.prev_kv),
                    })
                }
                Some(txn_op::Op::DeleteRange(d)) => {
                    let (start, end) = etcd_range(&d.key, &d.range_end);
                    match self.delete_range(w, &start, &end, d.prev_kv)? {
                        Ok(r) => {
                            txn_op_response::Response::DeleteRange(txn_op_response::DeleteRange {
                                deleted: r.deleted,
                                prev_kvs: r.prev_kvs,
                            })
                        }
                        Err(why) => return Ok(Err(Refusal::Invalid(why))),
                    }
                }
                None => continue,
            };
            answers.push(TxnOpResponse {
                response: Some(answer),
            });
        }
        Ok(Ok((succeeded, answers)))
    }

    /// A lease as the state before the command holds it.
    fn lease(&self, id: u64) -> kiwi_storage::Result<Option<lease_state::Record>> {
        match self.leases.records.get(&id) {
            Some(r) => Ok(*r),
            None => lease_state::read(self.backend, id),
        }
    }

    fn set_lease(&mut self, id: u64, record: Option<lease_state::Record>) {
        match record {
            Some(r) => self.batch.put(
                KeySpace::Raft,
                lease_state::record_key(id),
                lease_state::encode(r),
            ),
            None => self
                .batch
                .delete(KeySpace::Raft, lease_state::record_key(id)),
        };
        self.leases.records.insert(id, record);
    }

    fn lease_count(&self) -> kiwi_storage::Result<u64> {
        match self.leases.count {
            Some(n) => Ok(n),
            None => lease_state::count(self.backend),
        }
    }

    fn set_lease_count(&mut self, n: u64) {
        lease_state::put_count(&mut self.batch, n);
        self.leases.count = Some(n);
    }

    /// Refuses a write whose puts name a lease that does not exist, or would attach more keys to one
    /// than [`lease_state::MAX_KEYS_PER_LEASE`] (counting every put as a new key).
    fn check_leases(
        &self,
        leases: impl Iterator<Item = u64>,
    ) -> kiwi_storage::Result<Option<Refusal>> {
        let mut puts: BTreeMap<u64, u64> = BTreeMap::new();
        for id in leases.filter(|&id| id != 0) {
            *puts.entry(id).or_default() += 1;
        }
        for (id, n) in puts {
            let Some(r) = self.lease(id)? else {
                return Ok(Some(Refusal::LeaseNotFound(id)));
            };
            if r.keys + n > lease_state::MAX_KEYS_PER_LEASE {
                return Ok(Some(Refusal::TooMany(format!(
                    "lease {id} holds {} keys; {n} more would pass the limit of {}",
                    r.keys,
                    lease_state::MAX_KEYS_PER_LEASE
                ))));
            }
        }
        Ok(None)
    }

    /// Attaches `key` to lease `id` (0: none; a lease that is gone: nothing).
    fn attach(&mut self, id: u64, key: &[u8]) -> kiwi_storage::Result<()> {
        if id == 0 {
            return Ok(());
        }
        let Some(mut r) = self.lease(id)? else {
            return Ok(());
        };
        r.keys += 1;
        self.set_lease(id, Some(r));
        self.batch
            .put(KeySpace::Raft, lease_state::index_key(id, key), Vec::new());
        self.leases.index.insert((id, key.to_vec()), true);
        Ok(())
    }

    /// Detaches `key` from lease `id` (0: none).
    fn detach(&mut self, id: u64, key: &[u8]) -> kiwi_storage::Result<()> {
        if id == 0 {
            return Ok(());
        }
        if let Some(mut r) = self.lease(id)? {
            r.keys = r.keys.saturating_sub(1);
            self.set_lease(id, Some(r));
        }
        self.batch
            .delete(KeySpace::Raft, lease_state::index_key(id, key));
        self.leases.index.insert((id, key.to_vec()), false);
        Ok(())
    }

    /// The keys attached to lease `id`, pending changes included, in key order.
    fn lease_keys(&self, id: u64) -> kiwi_storage::Result<Vec<Vec<u8>>> {
        let mut keys: std::collections::BTreeSet<Vec<u8>> = lease_state::keys(
            self.backend,
            id,
            lease_state::MAX_KEYS_PER_LEASE as usize + 1,
        )?
        .into_iter()
        .collect();
        for ((_, key), &attached) in self
            .leases
            .index
            .range((id, Vec::new())..)
            .take_while(|((l, _), _)| *l == id)
        {
            if attached {
                keys.insert(key.clone());
            } else {
                keys.remove(key);
            }
        }
        Ok(keys.into_iter().collect())
    }

    /// Whether `c` holds for its key (or every key of its range; against a missing key's zero counters
    /// when there is none, where a VALUE compare fails).
    fn compare_holds(&self, c: &Compare) -> kiwi_storage::Result<bool> {
        let mut kvs = Vec::new();
        if c.range_end.is_empty() {
            kvs.extend(self.current(&c.key)?);
        } else {
            let (start, end) = etcd_range(&c.key, &c.range_end);
            let mut holds = true;
            let mut any = false;
            self.visit(&start, &end, |kv| {
                any = true;
                holds = compare_kv(c, Some(&kv));
                holds
            })?;
            return Ok(if any { holds } else { compare_kv(c, None) });
        }
        Ok(compare_kv(c, kvs.first()))
    }
}

impl LeaseOverlay {
    /// Takes in one op of the pending batch (to rebuild the overlay after a refused transaction).
    fn replay(&mut self, op: &kiwi_storage::WriteOp) {
        let (space, key, value) = match op {
            kiwi_storage::WriteOp::Put { space, key, value } => (space, key, Some(value)),
            kiwi_storage::WriteOp::Delete { space, key } => (space, key, None),
            _ => return,
        };
        if *space != KeySpace::Raft {
            return;
        }
        if let Some(id) = key
            .strip_prefix(lease_state::RECORD_PREFIX)
            .and_then(|b| <[u8; 8]>::try_from(b).ok())
        {
            let id = u64::from_be_bytes(id);
            self.records
                .insert(id, value.and_then(|v| lease_state::decode(v)));
        } else if let Some(rest) = key.strip_prefix(lease_state::INDEX_PREFIX)
            && let Some((id, k)) = rest.split_first_chunk::<8>()
        {
            self.index
                .insert((u64::from_be_bytes(*id), k.to_vec()), value.is_some());
        } else if key.as_slice() == lease_state::COUNT_KEY {
            self.count = value
                .and_then(|v| <[u8; 8]>::try_from(v.as_slice()).ok())
                .map(u64::from_be_bytes);
        }
    }
}

/// The writes of the command being applied.
struct Writes {
    revision: u64,
    events: Vec<KeyEvent>,
    touched: Vec<Vec<u8>>,
    /// Length of the pending batch before the command (to undo a refused transaction).
    batch_len: usize,
}

impl Writes {
    fn new(revision: u64) -> Self {
        Writes {
            revision,
            events: Vec::new(),
            touched: Vec::new(),
            batch_len: 0,
        }
    }
}

#[derive(Default)]
struct RangeDeleted {
    deleted: u64,
    prev_kvs: Vec<KeyValue>,
    truncated: bool,
}

/// `[start, end)` of an etcd-style range: an empty `range_end` is the key alone, `"\0"` no bound.
pub fn etcd_range(key: &[u8], range_end: &[u8]) -> (Vec<u8>, Vec<u8>) {
    match range_end {
        [] => {
            let mut end = key.to_vec();
            end.push(0);
            (key.to_vec(), end)
        }
        [0] => (key.to_vec(), Vec::new()),
        end => (key.to_vec(), end.to_vec()),
    }
}

/// Whether the key (`None`: missing) satisfies the compare.
pub fn compare_kv(c: &Compare, kv: Option<&KeyValue>) -> bool {
    use compare::{CompareResult, CompareTarget, TargetUnion};
    let result = CompareResult::try_from(c.result).unwrap_or(CompareResult::Equal);
    let ord = match (
        CompareTarget::try_from(c.target).unwrap_or(CompareTarget::Version),
        &c.target_union,
    ) {
        (CompareTarget::Value, Some(TargetUnion::Value(v))) => match kv {
            Some(kv) => kv.value.as_slice().cmp(v.as_slice()),
            None => return false,
        },
        (CompareTarget::Value, _) => return false,
        (target, given) => {
            let given = match given {
                Some(
                    TargetUnion::Version(n)
                    | TargetUnion::CreateRevision(n)
                    | TargetUnion::ModRevision(n)
                    | TargetUnion::Lease(n),
                ) => *n,
                _ => 0,
            };
            let have = kv.map_or(0, |kv| match target {
                CompareTarget::Version => kv.version,
                CompareTarget::Create => kv.create_revision,
                CompareTarget::Mod => kv.mod_revision,
                CompareTarget::Lease => kv.lease,
                CompareTarget::Value => unreachable!("matched above"),
            });
            have.cmp(&given)
        }
    };
    match result {
        CompareResult::Equal => ord.is_eq(),
        CompareResult::NotEqual => ord.is_ne(),
        CompareResult::Greater => ord.is_gt(),
        CompareResult::Less => ord.is_lt(),
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
                        lease: 0,
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
        assert_eq!(value(&s, b"k").as_deref(), Some(&b"2"[..]));
        assert_eq!(applied_index(&s).unwrap(), 5);
    }

    fn delete_range(start: &[u8], end: &[u8], prev_kv: bool) -> RaftCommand {
        RaftCommand {
            request_id: String::new(),
            command: Some(raft_command::Command::DeleteRange(
                kiwi_proto::v1::DeleteRangeCommand {
                    start_key: start.to_vec(),
                    end_key: end.to_vec(),
                    prev_kv,
                },
            )),
        }
    }

    /// The value stored under `key`, without its counters.
    fn value(s: &dyn StorageBackend, key: &[u8]) -> Option<Vec<u8>> {
        s.read(KeySpace::Data, key)
            .unwrap()
            .map(|v| mvcc::decode_stored(&v).1.to_vec())
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
        let n = 2 * 1024 + 500;
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
        assert_eq!(value(&s, b"k").as_deref(), Some(&b"3"[..]));
        assert_eq!(value(&s, b"other").as_deref(), Some(&b"x"[..]));
        assert_eq!(applied_index(&s).unwrap(), 5);
    }

    fn get(s: &dyn StorageBackend, key: &[u8]) -> Option<KeyValue> {
        s.read(KeySpace::Data, key)
            .unwrap()
            .map(|v| mvcc::to_kv(key.to_vec(), v, false))
    }

    fn counters(kv: &KeyValue) -> (u64, u64, u64) {
        (kv.create_revision, kv.mod_revision, kv.version)
    }

    #[test]
    fn every_write_is_one_revision_and_keys_count_their_versions() {
        let s = MemoryBackend::new(Limits::default());
        let mut a = Applier::new(&s);
        a.apply(3, &put(b"k", b"1")).unwrap();
        a.apply(5, &put(b"k", b"2")).unwrap();
        a.flush().unwrap();
        assert_eq!(counters(&get(&s, b"k").unwrap()), (3, 5, 2));
        // A batch writing a key twice is one change of it, at one revision.
        let batch = RaftCommand {
            request_id: String::new(),
            command: Some(raft_command::Command::Write(WriteBatchCommand {
                ops: vec![
                    WriteOp {
                        op: Some(write_op::Op::Put(write_op::Put {
                            key: b"k".to_vec(),
                            value: b"x".to_vec(),
                            lease: 0,
                        })),
                    },
                    WriteOp {
                        op: Some(write_op::Op::Put(write_op::Put {
                            key: b"k".to_vec(),
                            value: b"3".to_vec(),
                            lease: 0,
                        })),
                    },
                    WriteOp {
                        op: Some(write_op::Op::Put(write_op::Put {
                            key: b"j".to_vec(),
                            value: b"j".to_vec(),
                            lease: 0,
                        })),
                    },
                ],
            })),
        };
        a.apply(6, &batch).unwrap();
        let changes = a.take_changes();
        assert_eq!(changes.len(), 3);
        assert_eq!(changes[2].revision, 6);
        assert_eq!(changes[2].events.len(), 2, "one event per key of the write");
        let e = &changes[2].events[0];
        assert_eq!(e.kv.as_ref().unwrap().value, b"3");
        assert_eq!(
            e.prev_kv.as_ref().unwrap().value,
            b"2",
            "the value before the write"
        );
        // Deleting resets the version; the next put creates the key again.
        a.apply(7, &delete_range(b"k", b"k\0", false)).unwrap();
        a.apply(9, &put(b"k", b"4")).unwrap();
        // A failed CAS writes nothing and records no change.
        assert!(!a.apply(10, &cas(b"k", Some(b"no"), b"5")).unwrap().swapped);
        a.flush().unwrap();
        assert_eq!(counters(&get(&s, b"k").unwrap()), (9, 9, 1));
        assert_eq!(
            a.take_changes()
                .iter()
                .map(|c| c.revision)
                .collect::<Vec<_>>(),
            [7, 9]
        );
        // The history answers for every revision since the first write.
        let at = |r: u64| mvcc::read_at(&s as &dyn StorageBackend, b"k", r).unwrap();
        assert_eq!(at(2), None);
        assert_eq!(at(3).unwrap().value, b"1");
        assert_eq!(at(4).unwrap().value, b"1");
        assert_eq!(counters(&at(6).unwrap()), (3, 6, 3));
        assert_eq!(at(8), None, "deleted at 7");
        assert_eq!(at(10).unwrap().value, b"4");
        let (kvs, more) = mvcc::scan_at(
            &s as &dyn StorageBackend,
            &ScanRange::half_open(b"a", b"z"),
            6,
            10,
            false,
        )
        .unwrap();
        assert!(!more);
        assert_eq!(
            kvs.iter()
                .map(|kv| (kv.key.as_slice(), kv.value.as_slice()))
                .collect::<Vec<_>>(),
            [(&b"j"[..], &b"j"[..]), (b"k", b"3")]
        );
        let events = mvcc::events_from(&s as &dyn StorageBackend, 6, 1 << 20, 100).unwrap();
        assert_eq!(
            events.iter().map(|(r, _)| *r).collect::<Vec<_>>(),
            [6, 6, 7, 9]
        );
    }

    #[test]
    fn compaction_drops_history_before_the_revision_only() {
        let s = MemoryBackend::new(Limits::default());
        let mut a = Applier::new(&s);
        for i in 1..=10u64 {
            a.apply(i, &put(b"k", format!("{i}").as_bytes())).unwrap();
        }
        let compact = RaftCommand {
            request_id: String::new(),
            command: Some(raft_command::Command::Compact(
                kiwi_proto::v1::CompactCommand { revision: 6 },
            )),
        };
        a.apply(11, &compact).unwrap();
        a.flush().unwrap();
        let b = &s as &dyn StorageBackend;
        assert_eq!(mvcc::compacted(b).unwrap(), 6);
        assert_eq!(mvcc::read_at(b, b"k", 6).unwrap().unwrap().value, b"6");
        let events = mvcc::events_from(b, 1, 1 << 20, 100).unwrap();
        assert_eq!(events.first().map(|(r, _)| *r), Some(6));
        // The index entries before 6 go in the background pass, and reads stay right.
        let mut cursor = None;
        loop {
            cursor = mvcc::prune_index(&s, cursor, 2).unwrap();
            if cursor.is_none() {
                break;
            }
        }
        let left = s
            .scan(KeySpace::History, &Scan::forward(ScanRange::all(), 100))
            .unwrap()
            .into_iter()
            .filter(|(k, _)| k[0] == b'k')
            .count();
        assert_eq!(left, 5, "the index entries of revisions 6 to 10");
        assert_eq!(mvcc::read_at(b, b"k", 7).unwrap().unwrap().value, b"7");
    }

    fn txn(compare: Vec<Compare>, success: Vec<kiwi_proto::v1::TxnOp>) -> RaftCommand {
        RaftCommand {
            request_id: String::new(),
            command: Some(raft_command::Command::Txn(TxnRequest {
                header: None,
                compare,
                success,
                failure: vec![range_op(b"a", b"\0")],
            })),
        }
    }

    fn range_op(key: &[u8], end: &[u8]) -> kiwi_proto::v1::TxnOp {
        kiwi_proto::v1::TxnOp {
            op: Some(txn_op::Op::Range(txn_op::Range {
                key: key.to_vec(),
                range_end: end.to_vec(),
                ..txn_op::Range::default()
            })),
        }
    }

    fn put_op(key: &[u8], value: &[u8]) -> kiwi_proto::v1::TxnOp {
        kiwi_proto::v1::TxnOp {
            op: Some(txn_op::Op::Put(txn_op::Put {
                key: key.to_vec(),
                value: value.to_vec(),
                prev_kv: true,
                lease: 0,
            })),
        }
    }

    fn cmp(key: &[u8], result: compare::CompareResult, target: compare::TargetUnion) -> Compare {
        let t = match target {
            compare::TargetUnion::Version(_) => compare::CompareTarget::Version,
            compare::TargetUnion::CreateRevision(_) => compare::CompareTarget::Create,
            compare::TargetUnion::ModRevision(_) => compare::CompareTarget::Mod,
            compare::TargetUnion::Value(_) => compare::CompareTarget::Value,
            compare::TargetUnion::Lease(_) => compare::CompareTarget::Lease,
        };
        Compare {
            result: result as i32,
            target: t as i32,
            key: key.to_vec(),
            target_union: Some(target),
            range_end: Vec::new(),
        }
    }

    fn lease_cmd(c: raft_command::Command) -> RaftCommand {
        RaftCommand {
            request_id: String::new(),
            command: Some(c),
        }
    }

    fn grant(id: u64, ttl: i64) -> RaftCommand {
        lease_cmd(raft_command::Command::LeaseGrant(
            kiwi_proto::v1::LeaseGrantCommand { id, ttl },
        ))
    }

    fn revoke(id: u64) -> RaftCommand {
        lease_cmd(raft_command::Command::LeaseRevoke(
            kiwi_proto::v1::LeaseRevokeCommand { id },
        ))
    }

    fn put_leased(k: &[u8], v: &[u8], lease: u64) -> RaftCommand {
        RaftCommand {
            request_id: String::new(),
            command: Some(raft_command::Command::Write(WriteBatchCommand {
                ops: vec![WriteOp {
                    op: Some(write_op::Op::Put(write_op::Put {
                        key: k.to_vec(),
                        value: v.to_vec(),
                        lease,
                    })),
                }],
            })),
        }
    }

    fn del(k: &[u8]) -> RaftCommand {
        RaftCommand {
            request_id: String::new(),
            command: Some(raft_command::Command::Write(WriteBatchCommand {
                ops: vec![WriteOp {
                    op: Some(write_op::Op::Delete(write_op::Delete { key: k.to_vec() })),
                }],
            })),
        }
    }

    fn attached(s: &dyn StorageBackend, id: u64) -> Vec<Vec<u8>> {
        lease_state::keys(s, id, 1000).unwrap()
    }

    #[test]
    fn leases_attach_detach_and_revoke_their_keys_in_one_write() {
        let s = MemoryBackend::new(Limits::default());
        assert_eq!(apply(&s, 1, &grant(7, 10)).unwrap().refused, None);
        assert_eq!(
            apply(&s, 2, &grant(7, 10)).unwrap().refused,
            Some(Refusal::LeaseExists(7))
        );
        // An unknown lease is refused and writes nothing.
        assert_eq!(
            apply(&s, 3, &put_leased(b"a", b"1", 8)).unwrap().refused,
            Some(Refusal::LeaseNotFound(8))
        );
        assert_eq!(value(&s, b"a"), None);
        apply(&s, 4, &put_leased(b"a", b"1", 7)).unwrap();
        apply(&s, 5, &put_leased(b"b", b"1", 7)).unwrap();
        apply(&s, 6, &put_leased(b"c", b"1", 7)).unwrap();
        assert_eq!(get(&s, b"a").unwrap().lease, 7);
        assert_eq!(
            attached(&s, 7),
            vec![b"a".to_vec(), b"b".to_vec(), b"c".to_vec()]
        );
        // A put without the lease detaches; a delete detaches.
        apply(&s, 7, &put(b"b", b"2")).unwrap();
        apply(&s, 8, &del(b"c")).unwrap();
        assert_eq!(get(&s, b"b").unwrap().lease, 0);
        assert_eq!(attached(&s, 7), vec![b"a".to_vec()]);
        assert_eq!(
            lease_state::read(&s as &dyn StorageBackend, 7)
                .unwrap()
                .unwrap()
                .keys,
            1
        );
        assert_eq!(lease_state::count(&s as &dyn StorageBackend).unwrap(), 1);
        // The revocation deletes what is attached, at one revision, with events.
        let mut a = Applier::new(&s);
        let out = a.apply(9, &revoke(7)).unwrap();
        assert_eq!(out.deleted, 1);
        let changes = a.take_changes();
        a.flush().unwrap();
        assert_eq!(changes.len(), 1);
        assert_eq!(changes[0].revision, 9);
        assert_eq!(changes[0].events.len(), 1);
        assert_eq!(value(&s, b"a"), None);
        assert_eq!(value(&s, b"b").as_deref(), Some(&b"2"[..]));
        assert_eq!(
            lease_state::read(&s as &dyn StorageBackend, 7).unwrap(),
            None
        );
        assert_eq!(lease_state::count(&s as &dyn StorageBackend).unwrap(), 0);
        assert!(attached(&s, 7).is_empty());
        assert_eq!(
            apply(&s, 10, &revoke(7)).unwrap().refused,
            Some(Refusal::LeaseNotFound(7))
        );
    }

    #[test]
    fn a_run_sees_its_own_lease_changes_and_a_refused_txn_undoes_them() {
        let s = MemoryBackend::new(Limits::default());
        let mut a = Applier::new(&s);
        // Grant, attach and revoke in one run, before any flush.
        a.apply(1, &grant(1, 5)).unwrap();
        a.apply(2, &put_leased(b"k", b"v", 1)).unwrap();
        a.apply(3, &grant(2, 5)).unwrap();
        a.apply(4, &put_leased(b"k", b"w", 2)).unwrap();
        assert_eq!(
            a.apply(5, &revoke(1)).unwrap().deleted,
            0,
            "k moved to lease 2"
        );
        // A transaction that attaches a key to lease 2 and is then refused (a range delete over a bound
        // it cannot reach here, so use a missing lease instead: refused before anything runs).
        let t = TxnRequest {
            success: vec![kiwi_proto::v1::TxnOp {
                op: Some(txn_op::Op::Put(txn_op::Put {
                    key: b"x".to_vec(),
                    value: b"1".to_vec(),
                    prev_kv: false,
                    lease: 9,
                })),
            }],
            ..TxnRequest::default()
        };
        let out = a
            .apply(6, &lease_cmd(raft_command::Command::Txn(t)))
            .unwrap();
        assert_eq!(out.refused, Some(Refusal::LeaseNotFound(9)));
        assert_eq!(a.apply(7, &revoke(2)).unwrap().deleted, 1);
        a.flush().unwrap();
        assert_eq!(value(&s, b"k"), None);
        assert_eq!(value(&s, b"x"), None);
        assert_eq!(lease_state::count(&s as &dyn StorageBackend).unwrap(), 0);
        assert!(
            lease_state::all(&s as &dyn StorageBackend)
                .unwrap()
                .is_empty()
        );
    }

    #[test]
    fn lease_limits_are_refused_with_their_numbers() {
        let s = MemoryBackend::new(Limits::default());
        let mut a = Applier::new(&s);
        for i in 1..=lease_state::MAX_LEASES {
            assert_eq!(a.apply(i, &grant(i, 5)).unwrap().refused, None);
        }
        let out = a
            .apply(lease_state::MAX_LEASES + 1, &grant(u64::MAX >> 2, 5))
            .unwrap();
        assert!(
            matches!(&out.refused, Some(Refusal::TooMany(m)) if m.contains("10000 leases")),
            "{out:?}"
        );
        a.flush().unwrap();
        assert_eq!(
            lease_state::count(&s as &dyn StorageBackend).unwrap(),
            lease_state::MAX_LEASES
        );
        assert!(validate(&grant(0, 5)).is_err());
        assert!(validate(&grant(1, 0)).is_err());
        assert!(validate(&grant(u64::MAX, 5)).is_err());
    }

    #[test]
    fn a_transaction_runs_the_branch_its_compares_choose_at_one_revision() {
        use compare::{CompareResult as R, TargetUnion as T};
        let s = MemoryBackend::new(Limits::default());
        let mut a = Applier::new(&s);
        a.apply(1, &put(b"a", b"1")).unwrap();
        a.apply(2, &put(b"b", b"2")).unwrap();
        assert_eq!(a.take_changes().len(), 2);
        // Each operator and target; a missing key has version 0 and no value.
        for (c, holds) in [
            (cmp(b"a", R::Equal, T::Value(b"1".to_vec())), true),
            (cmp(b"a", R::NotEqual, T::Value(b"1".to_vec())), false),
            (cmp(b"a", R::Greater, T::Value(b"0".to_vec())), true),
            (cmp(b"a", R::Less, T::Value(b"0".to_vec())), false),
            (cmp(b"a", R::Equal, T::ModRevision(1)), true),
            (cmp(b"b", R::Greater, T::CreateRevision(1)), true),
            (cmp(b"a", R::Equal, T::Version(1)), true),
            (cmp(b"a", R::Equal, T::Lease(0)), true),
            (cmp(b"zz", R::Equal, T::Version(0)), true),
            (cmp(b"zz", R::Equal, T::Value(Vec::new())), false),
            (cmp(b"zz", R::NotEqual, T::Value(b"x".to_vec())), false),
        ] {
            let out = a.apply(3, &txn(vec![c.clone()], vec![])).unwrap();
            assert_eq!(out.txn.unwrap().0, holds, "{c:?}");
        }
        // A range compare holds when it holds for every key of the range.
        let mut all = cmp(b"a", R::Less, T::ModRevision(3));
        all.range_end = b"c".to_vec();
        assert!(
            a.apply(4, &txn(vec![all.clone()], vec![]))
                .unwrap()
                .txn
                .unwrap()
                .0
        );
        all.target_union = Some(T::ModRevision(2));
        assert!(!a.apply(5, &txn(vec![all], vec![])).unwrap().txn.unwrap().0);
        // Success: both puts at revision 6, and the range after them sees them.
        let out = a
            .apply(
                6,
                &txn(
                    vec![cmp(b"a", R::Equal, T::Value(b"1".to_vec()))],
                    vec![
                        put_op(b"a", b"10"),
                        put_op(b"c", b"30"),
                        range_op(b"a", b"\0"),
                    ],
                ),
            )
            .unwrap();
        let (ok, answers) = out.txn.unwrap();
        assert!(ok);
        let Some(txn_op_response::Response::Put(p)) = &answers[0].response else {
            panic!("a put answer")
        };
        assert_eq!(p.prev_kv.as_ref().unwrap().value, b"1");
        let Some(txn_op_response::Response::Range(r)) = &answers[2].response else {
            panic!("a range answer")
        };
        assert_eq!(r.count, 3);
        assert_eq!(
            r.kvs
                .iter()
                .map(|kv| (kv.value.as_slice(), kv.mod_revision))
                .collect::<Vec<_>>(),
            [(&b"10"[..], 6), (b"2", 2), (b"30", 6)]
        );
        let changes = a.take_changes();
        assert_eq!(changes.len(), 1, "one write");
        assert_eq!(changes[0].events.len(), 2);
        // Failure branch runs when a compare fails; a read-only branch changes nothing.
        let out = a
            .apply(
                7,
                &txn(
                    vec![cmp(b"a", R::Equal, T::Value(b"1".to_vec()))],
                    vec![put_op(b"x", b"")],
                ),
            )
            .unwrap();
        assert!(!out.txn.unwrap().0);
        assert!(a.take_changes().is_empty());
        a.flush().unwrap();
        assert_eq!(value(&s, b"x"), None);
        // A key written twice in one branch is refused, as etcd refuses it.
        let twice = txn(vec![], vec![put_op(b"k", b"1"), put_op(b"k", b"2")]);
        assert_eq!(validate(&twice), Err(DUPLICATE_KEY.into()));
        let inside = txn(
            vec![],
            vec![
                put_op(b"k2", b"1"),
                kiwi_proto::v1::TxnOp {
                    op: Some(txn_op::Op::DeleteRange(txn_op::DeleteRange {
                        key: b"k".to_vec(),
                        range_end: b"l".to_vec(),
                        prev_kv: false,
                    })),
                },
            ],
        );
        assert_eq!(validate(&inside), Err(DUPLICATE_KEY.into()));
        let many = txn(
            vec![],
            (0..129)
                .map(|i| put_op(format!("k{i}").as_bytes(), b""))
                .collect(),
        );
        assert!(
            validate(&many)
                .unwrap_err()
                .contains("over the limit of 128")
        );
    }

    /// One write of the property test: puts and deletes of keys 0..6 as a batch, or a range delete.
    #[derive(Debug, Clone)]
    enum Step {
        Batch(Vec<(u8, Option<u8>)>),
        Range(u8, u8),
        Compact,
    }

    fn step() -> impl proptest::strategy::Strategy<Value = Step> {
        use proptest::prelude::*;
        prop_oneof![
            6 => proptest::collection::vec((0u8..6, proptest::option::of(0u8..4)), 1..4).prop_map(Step::Batch),
            1 => (0u8..6, 0u8..7).prop_map(|(a, b)| Step::Range(a, b)),
            1 => Just(Step::Compact),
        ]
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(64))]

        /// Against a model that keeps the whole keyspace after every revision: every key's counters,
        /// every read at a kept revision (point and range), the changes recorded per write, and the
        /// events read back from the history.
        #[test]
        fn revisions_and_history_match_a_model(steps in proptest::collection::vec(step(), 1..40)) {
            use std::collections::BTreeMap as Map;
            let s = MemoryBackend::new(Limits::default());
            let mut a = Applier::new(&s);
            let key = |k: u8| format!("k{k}").into_bytes();
            // The model: the keyspace (value, create, mod, version) after each index.
            let mut now: Map<Vec<u8>, (Vec<u8>, u64, u64, u64)> = Map::new();
            let mut states = vec![(0u64, now.clone())];
            let mut oldest = 1u64;
            let mut all_changes = Vec::new();
            for (i, st) in steps.iter().enumerate() {
                let index = 2 * i as u64 + 1; // gaps, as Raft indexes have
                match st {
                    Step::Batch(ops) => {
                        let cmd = RaftCommand {
                            request_id: String::new(),
                            command: Some(raft_command::Command::Write(WriteBatchCommand {
                                ops: ops.iter().map(|(k, v)| WriteOp {
                                    op: Some(match v {
                                        Some(v) => write_op::Op::Put(write_op::Put { key: key(*k), value: vec![*v], lease: 0 }),
                                        None => write_op::Op::Delete(write_op::Delete { key: key(*k) }),
                                    }),
                                }).collect(),
                            })),
                        };
                        a.apply(index, &cmd).unwrap();
                        // Last op per key wins.
                        let mut last: Map<u8, Option<u8>> = Map::new();
                        for (k, v) in ops {
                            last.insert(*k, *v);
                        }
                        for (k, v) in last {
                            match v {
                                Some(v) => {
                                    let prev = now.get(&key(k)).cloned();
                                    let (create, version) = prev.map_or((index, 1), |p| (p.1, p.3 + 1));
                                    now.insert(key(k), (vec![v], create, index, version));
                                }
                                None => {
                                    now.remove(&key(k));
                                }
                            }
                        }
                    }
                    Step::Range(x, y) => {
                        let (lo, hi) = (key(*x.min(y)), key(*x.max(y)));
                        a.apply(index, &delete_range(&lo, &hi, false)).unwrap();
                        now.retain(|k, _| !(k >= &lo && k < &hi));
                    }
                    Step::Compact => {
                        let to = states[states.len() / 2].0.max(1);
                        let cmd = RaftCommand {
                            request_id: String::new(),
                            command: Some(raft_command::Command::Compact(kiwi_proto::v1::CompactCommand { revision: to })),
                        };
                        a.apply(index, &cmd).unwrap();
                        oldest = oldest.max(to);
                    }
                }
                all_changes.extend(a.take_changes());
                states.push((index, now.clone()));
                if i % 3 == 0 {
                    a.flush().unwrap();
                }
            }
            a.flush().unwrap();
            let b = &s as &dyn StorageBackend;
            proptest::prop_assert_eq!(mvcc::compacted(b).unwrap(), oldest);
            // Revisions of the recorded changes only grow, and each change is one write.
            proptest::prop_assert!(all_changes.windows(2).all(|w| w[0].revision < w[1].revision));
            let history = mvcc::events_from(b, oldest, usize::MAX, usize::MAX).unwrap();
            let recorded: Vec<_> = all_changes
                .iter()
                .filter(|c| c.revision >= oldest)
                .flat_map(|c| c.events.iter().map(move |e| (c.revision, e.clone())))
                .collect();
            proptest::prop_assert_eq!(history, recorded, "the history holds exactly the changes");
            for (at, state) in &states {
                if *at < oldest.saturating_sub(1).max(1) {
                    continue;
                }
                let model: Vec<_> = state
                    .iter()
                    .map(|(k, (v, c, m, ver))| (k.clone(), v.clone(), *c, *m, *ver))
                    .collect();
                let (kvs, more) = mvcc::scan_at(b, &ScanRange::all(), *at, 100, false).unwrap();
                proptest::prop_assert!(!more);
                let got: Vec<_> = kvs
                    .into_iter()
                    .map(|kv| (kv.key, kv.value, kv.create_revision, kv.mod_revision, kv.version))
                    .collect();
                proptest::prop_assert_eq!(&got, &model, "scan at {}", at);
                for k in 0..6u8 {
                    let one = mvcc::read_at(b, &key(k), *at).unwrap().map(|kv| kv.value);
                    proptest::prop_assert_eq!(one, state.get(&key(k)).map(|v| v.0.clone()), "key {} at {}", k, at);
                }
            }
        }
    }
}
