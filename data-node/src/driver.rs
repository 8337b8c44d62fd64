//! The Raft driver: the one owner of `raft::RawNode`.
//!
//! It runs on its own OS thread (every storage call it makes blocks). Everything else talks to it through
//! a bounded channel ([`DriverHandle`]) and gets answers on oneshots; its public state (role, term,
//! leader, commit and applied index) is published on a `watch` channel.
//!
//! # The Ready contract
//!
//! Each turn of the loop collects every proposal and peer message that arrived while the previous Ready
//! was handled (group commit), starts one ReadIndex round for all the linearizable reads among them, ticks
//! when due, then handles one Ready in this order:
//!
//! 1. Send `messages()` at once (a leader may replicate before its own append is durable).
//! 2. Apply `committed_entries()` (these were persisted by earlier Readies), writing the applied index in
//!    the same batch as the data, and answer their proposers, matched by log index **and** term: an entry
//!    with another term at a proposal's index means the proposal was overwritten and will never commit.
//! 3. Persist `entries()` and the hard state in one fsynced batch.
//! 4. Only then send `persisted_messages()` (votes and append responses promise durable state).
//! 5. `advance()`, then send the light Ready's messages and apply its committed entries as in 2.
//! 6. Answer ReadIndex requests from `read_states()`; callers wait until the applied index reaches the
//!    read index before reading.
//!
//! Before step 2, a Ready that carries a snapshot (this node fell behind the leader's compacted log)
//! installs it from the staging area the transport filled (`snapshot::install`). After applying, once
//! more than `compaction_threshold` entries are applied past the last compaction, the log is compacted up
//! to the applied index (one fsynced batch, which also makes the buffered applies durable).
//!
//! A storage error at any step stops the driver (fail-stop) with an error log line; it never advances
//! past state it could not persist. The node then shuts down.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender, TrySendError, sync_channel};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use kiwi_proto::v1::RaftCommand;
use kiwi_storage::StorageBackend;
use prost::Message as _;
use protobuf::Message as _;
use raft::eraftpb::{
    ConfChange, ConfChangeSingle, ConfChangeType, ConfChangeV2, Entry, EntryType, Message,
};
use raft::{RawNode, SnapshotStatus, StateRole};
use tokio::sync::{oneshot, watch};
use tokio_util::sync::CancellationToken;

use crate::log_store::LogStore;
use crate::snapshot;
use crate::state_machine::{self, ApplyOutcome};
use crate::transport::PeerEvent;

/// Capacity of the driver's inbox.
const INBOX: usize = 16 * 1024;

/// Why a proposal or read was not served.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProposeError {
    /// This node is not the leader; `leader_id` is 0 when no leader is known.
    #[error("not the leader (leader: {leader_id})")]
    NotLeader { leader_id: u64 },
    /// The proposal will never commit (leadership changed and its entry was replaced, or Raft dropped it).
    /// Nothing was written: retrying is safe.
    #[error("proposal dropped by Raft before it committed; nothing was written")]
    Dropped,
    /// The proposal's entry was superseded by a snapshot: it may or may not have been applied.
    #[error(
        "the proposal's outcome is unknown: this node installed a snapshot covering its log position"
    )]
    OutcomeUnknown,
    /// The driver's inbox is full.
    #[error("Raft driver overloaded")]
    Overloaded,
    /// The driver has stopped (shutdown or a storage error).
    #[error("Raft driver stopped")]
    Stopped,
    /// A membership change is already in progress (Raft allows one at a time).
    #[error("another membership change is in progress; retry when it completes")]
    ConfChangePending,
    /// Raft refused the request.
    #[error("{0}")]
    Refused(String),
}

/// The driver's public state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct RaftStatus {
    pub role: Role,
    pub term: u64,
    pub leader_id: u64,
    pub commit: u64,
    pub applied: u64,
    /// First index still in the log.
    pub first_index: u64,
}

/// A node's Raft role.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Role {
    #[default]
    Follower,
    Candidate,
    PreCandidate,
    Leader,
}

impl From<StateRole> for Role {
    fn from(r: StateRole) -> Self {
        match r {
            StateRole::Follower => Role::Follower,
            StateRole::Candidate => Role::Candidate,
            StateRole::PreCandidate => Role::PreCandidate,
            StateRole::Leader => Role::Leader,
        }
    }
}

/// One peer's replication progress, as the leader sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerProgress {
    pub id: u64,
    pub match_index: u64,
    pub recently_active: bool,
    pub voter: bool,
}

/// Status with per-peer progress (filled on the leader only).
#[derive(Debug, Clone)]
pub struct DetailedStatus {
    pub status: RaftStatus,
    pub peers: Vec<PeerProgress>,
    pub voters: Vec<u64>,
    pub learners: Vec<u64>,
}

/// Where the driver sends messages for other nodes. Must never block.
pub trait MessageSink: Send + Sync + 'static {
    /// Queues `msgs` for their destinations; returns the ids of peers whose queue was full (the driver
    /// reports them unreachable).
    fn send(&self, msgs: Vec<Message>) -> Vec<u64>;

    /// Starts sending to a member added by a membership change, at its client address.
    fn add_peer(&self, id: u64, addr: String);
}

enum Inbox {
    Propose {
        data: Vec<u8>,
        reply: oneshot::Sender<Result<ApplyOutcome, ProposeError>>,
    },
    ReadIndex {
        reply: oneshot::Sender<Result<u64, ProposeError>>,
    },
    ConfChange {
        cc: ConfChangeV2,
        reply: oneshot::Sender<Result<ApplyOutcome, ProposeError>>,
    },
    TransferLeader {
        to: u64,
    },
    InstallSnapshot {
        msg: Message,
        reply: oneshot::Sender<Result<(), ProposeError>>,
    },
    Step(Message),
    Peer(PeerEvent),
    Status {
        reply: oneshot::Sender<DetailedStatus>,
    },
}

/// How the driver is set up.
#[derive(Debug, Clone)]
pub struct DriverConfig {
    pub node_id: u64,
    pub tick_interval: Duration,
    pub election_ticks: usize,
    pub heartbeat_ticks: usize,
    /// Applied entries past the last compaction that trigger the next one.
    pub compaction_threshold: u64,
}

/// The cloneable handle every other component uses.
#[derive(Clone)]
pub struct DriverHandle {
    tx: SyncSender<Inbox>,
    status: watch::Receiver<RaftStatus>,
}

impl DriverHandle {
    fn send(&self, msg: Inbox) -> Result<(), ProposeError> {
        self.tx.try_send(msg).map_err(|e| match e {
            TrySendError::Full(_) => ProposeError::Overloaded,
            TrySendError::Disconnected(_) => ProposeError::Stopped,
        })
    }

    /// Proposes an encoded [`RaftCommand`] and waits until it is applied.
    ///
    /// # Errors
    /// [`ProposeError`]; dropping the future leaves the outcome unknown.
    pub async fn propose(&self, data: Vec<u8>) -> Result<ApplyOutcome, ProposeError> {
        let (reply, rx) = oneshot::channel();
        self.send(Inbox::Propose { data, reply })?;
        rx.await.map_err(|_| ProposeError::Stopped)?
    }

    /// Hands an encoded [`RaftCommand`] to Raft without waiting; the receiver answers once it is applied
    /// (or can no longer be).
    ///
    /// # Errors
    /// [`ProposeError::Overloaded`] or [`ProposeError::Stopped`] when the driver cannot take it.
    pub fn submit(
        &self,
        data: Vec<u8>,
    ) -> Result<oneshot::Receiver<Result<ApplyOutcome, ProposeError>>, ProposeError> {
        let (reply, rx) = oneshot::channel();
        self.send(Inbox::Propose { data, reply })?;
        Ok(rx)
    }

    /// Runs a ReadIndex round and returns the index a linearizable read must wait for.
    ///
    /// # Errors
    /// [`ProposeError`].
    pub async fn read_index(&self) -> Result<u64, ProposeError> {
        let (reply, rx) = oneshot::channel();
        self.send(Inbox::ReadIndex { reply })?;
        rx.await.map_err(|_| ProposeError::Stopped)?
    }

    /// Waits until the applied index reaches `index`.
    ///
    /// # Errors
    /// [`ProposeError::Stopped`] if the driver stops first.
    pub async fn wait_applied(&self, index: u64) -> Result<u64, ProposeError> {
        let mut rx = self.status.clone();
        let s = rx
            .wait_for(|s| s.applied >= index)
            .await
            .map_err(|_| ProposeError::Stopped)?;
        Ok(s.applied)
    }

    /// Hands a peer's message to Raft. Dropped when the inbox is full: Raft tolerates message loss.
    pub fn step(&self, msg: Message) {
        let _ = self.send(Inbox::Step(msg));
    }

    /// Passes on what the transport observed (unreachable peers, snapshot outcomes).
    pub fn peer_event(&self, event: PeerEvent) {
        let _ = self.send(Inbox::Peer(event));
    }

    /// Proposes a membership change and waits until it is applied. The change's context carries the
    /// address of an added node.
    ///
    /// # Errors
    /// [`ProposeError`].
    pub async fn change_membership(&self, cc: ConfChangeV2) -> Result<ApplyOutcome, ProposeError> {
        let (reply, rx) = oneshot::channel();
        self.send(Inbox::ConfChange { cc, reply })?;
        rx.await.map_err(|_| ProposeError::Stopped)?
    }

    /// Asks the leader to hand leadership to `to` (Raft's leader transfer; watch the status for the
    /// outcome).
    ///
    /// # Errors
    /// [`ProposeError`] when the driver cannot take the request.
    pub fn transfer_leader(&self, to: u64) -> Result<(), ProposeError> {
        self.send(Inbox::TransferLeader { to })
    }

    /// Hands a fully staged snapshot's message to Raft and waits until the driver handled it (installed
    /// it, or Raft ignored it as stale).
    ///
    /// # Errors
    /// [`ProposeError`].
    pub async fn install_snapshot(&self, msg: Message) -> Result<(), ProposeError> {
        let (reply, rx) = oneshot::channel();
        self.send(Inbox::InstallSnapshot { msg, reply })?;
        rx.await.map_err(|_| ProposeError::Stopped)?
    }

    /// A receiver of every published status change.
    pub fn watch(&self) -> watch::Receiver<RaftStatus> {
        self.status.clone()
    }

    /// The latest published state.
    pub fn status(&self) -> RaftStatus {
        *self.status.borrow()
    }

    /// State with per-peer progress.
    ///
    /// # Errors
    /// [`ProposeError`] when the driver is stopped or overloaded.
    pub async fn detailed_status(&self) -> Result<DetailedStatus, ProposeError> {
        let (reply, rx) = oneshot::channel();
        self.send(Inbox::Status { reply })?;
        rx.await.map_err(|_| ProposeError::Stopped)
    }
}

struct Pending {
    term: u64,
    reply: oneshot::Sender<Result<ApplyOutcome, ProposeError>>,
}

struct Driver {
    raw: RawNode<LogStore>,
    backend: Arc<dyn StorageBackend>,
    sink: Arc<dyn MessageSink>,
    /// Index persisted as applied when the node started: entries up to it are already in the data.
    applied_on_disk: u64,
    proposals: BTreeMap<u64, Pending>,
    /// ReadIndex rounds in flight, by context id, each with the reads it serves.
    reads: HashMap<u64, Vec<oneshot::Sender<Result<u64, ProposeError>>>>,
    /// Reads that arrived in this turn; they share the next round.
    read_batch: Vec<oneshot::Sender<Result<u64, ProposeError>>>,
    next_read: u64,
    status: watch::Sender<RaftStatus>,
    applied: u64,
    compaction_threshold: u64,
    /// Snapshot installs to answer after the current Ready.
    installs: Vec<oneshot::Sender<Result<(), ProposeError>>>,
}

/// Starts the driver thread.
///
/// # Errors
/// raft-rs refusing the configuration or the stored state.
pub fn spawn(
    config: &DriverConfig,
    store: LogStore,
    backend: Arc<dyn StorageBackend>,
    sink: Arc<dyn MessageSink>,
    stop: CancellationToken,
    fatal: CancellationToken,
) -> Result<(DriverHandle, JoinHandle<()>), raft::Error> {
    let applied_on_disk = state_machine::applied_index(&*backend)
        .map_err(|e| raft::Error::Store(raft::StorageError::Other(Box::new(e))))?;
    let commit = raft::Storage::initial_state(&store)?.hard_state.commit;
    let cfg = raft::Config {
        id: config.node_id,
        election_tick: config.election_ticks,
        heartbeat_tick: config.heartbeat_ticks,
        applied: applied_on_disk.min(commit),
        check_quorum: true,
        pre_vote: true,
        max_size_per_msg: 1024 * 1024,
        max_inflight_msgs: 256,
        ..raft::Config::default()
    };
    cfg.validate()?;
    let logger = slog::Logger::root(slog::Discard, slog::o!());
    let raw = RawNode::new(&cfg, store, &logger)?;
    let (tx, rx) = sync_channel(INBOX);
    let initial = RaftStatus {
        applied: cfg.applied,
        ..RaftStatus::default()
    };
    let (status_tx, status_rx) = watch::channel(initial);
    let mut driver = Driver {
        raw,
        backend,
        sink,
        applied_on_disk,
        proposals: BTreeMap::new(),
        reads: HashMap::new(),
        read_batch: Vec::new(),
        next_read: 1,
        status: status_tx,
        applied: cfg.applied,
        compaction_threshold: config.compaction_threshold,
        installs: Vec::new(),
    };
    let tick = config.tick_interval;
    let thread = std::thread::Builder::new()
        .name("kiwi-raft".into())
        .spawn(move || {
            if let Err(e) = driver.run(rx, tick, &stop) {
                tracing::error!(error = %e, "storage error in the Raft driver: stopping the node (fail-stop)");
                fatal.cancel();
            }
        })
        .map_err(|e| raft::Error::Store(raft::StorageError::Other(Box::new(e))))?;
    Ok((
        DriverHandle {
            tx,
            status: status_rx,
        },
        thread,
    ))
}

type DriverResult = Result<(), Box<dyn std::error::Error + Send + Sync>>;

impl Driver {
    fn run(
        &mut self,
        rx: Receiver<Inbox>,
        tick: Duration,
        stop: &CancellationToken,
    ) -> DriverResult {
        let mut next_tick = Instant::now() + tick;
        while !stop.is_cancelled() {
            let wait = next_tick.saturating_duration_since(Instant::now());
            match rx.recv_timeout(wait) {
                Ok(msg) => {
                    self.handle(msg);
                    // Group commit: everything already queued joins this Ready.
                    while let Ok(msg) = rx.try_recv() {
                        self.handle(msg);
                    }
                }
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => return Ok(()),
            }
            if !self.read_batch.is_empty() {
                let id = self.next_read;
                self.next_read += 1;
                self.reads.insert(id, std::mem::take(&mut self.read_batch));
                self.raw.read_index(id.to_be_bytes().to_vec());
            }
            if Instant::now() >= next_tick {
                self.raw.tick();
                next_tick += tick;
                if next_tick < Instant::now() {
                    next_tick = Instant::now() + tick;
                }
            }
            self.on_ready()?;
            for reply in self.installs.drain(..) {
                let _ = reply.send(Ok(()));
            }
        }
        Ok(())
    }

    /// Hands `reply` back if this node leads; otherwise answers it with the leader hint.
    fn leader_only<T>(
        &self,
        reply: oneshot::Sender<Result<T, ProposeError>>,
    ) -> Option<oneshot::Sender<Result<T, ProposeError>>> {
        if self.raw.raft.state == StateRole::Leader {
            return Some(reply);
        }
        let _ = reply.send(Err(ProposeError::NotLeader {
            leader_id: self.raw.raft.leader_id,
        }));
        None
    }

    /// Matches a just-proposed entry to its caller by (index, term); a proposal Raft did not append is
    /// answered as dropped at once.
    fn track(&mut self, before: u64, reply: oneshot::Sender<Result<ApplyOutcome, ProposeError>>) {
        let index = self.raw.raft.raft_log.last_index();
        if index == before {
            let _ = reply.send(Err(ProposeError::Dropped));
            return;
        }
        self.proposals.insert(
            index,
            Pending {
                term: self.raw.raft.term,
                reply,
            },
        );
    }

    fn handle(&mut self, msg: Inbox) {
        match msg {
            Inbox::Propose { data, reply } => {
                let Some(reply) = self.leader_only(reply) else {
                    return;
                };
                let before = self.raw.raft.raft_log.last_index();
                if self.raw.propose(Vec::new(), data).is_err() {
                    let _ = reply.send(Err(ProposeError::Dropped));
                    return;
                }
                self.track(before, reply);
            }
            Inbox::ReadIndex { reply } => {
                let Some(reply) = self.leader_only(reply) else {
                    return;
                };
                // Batched: one ReadIndex round serves every read that arrived in this turn.
                self.read_batch.push(reply);
            }
            Inbox::ConfChange { cc, reply } => {
                let Some(reply) = self.leader_only(reply) else {
                    return;
                };
                if self.raw.raft.has_pending_conf() {
                    let _ = reply.send(Err(ProposeError::ConfChangePending));
                    return;
                }
                let before = self.raw.raft.raft_log.last_index();
                if let Err(e) = self.raw.propose_conf_change(Vec::new(), cc) {
                    let _ = reply.send(Err(ProposeError::Refused(e.to_string())));
                    return;
                }
                self.track(before, reply);
            }
            Inbox::TransferLeader { to } => self.raw.transfer_leader(to),
            Inbox::InstallSnapshot { msg, reply } => {
                let _ = self.raw.step(msg);
                self.installs.push(reply);
            }
            Inbox::Step(m) => {
                let _ = self.raw.step(m);
            }
            Inbox::Peer(PeerEvent::Unreachable(peer)) => self.raw.report_unreachable(peer),
            Inbox::Peer(PeerEvent::Snapshot { to, ok }) => self.raw.report_snapshot(
                to,
                if ok {
                    SnapshotStatus::Finish
                } else {
                    SnapshotStatus::Failure
                },
            ),
            Inbox::Status { reply } => {
                let _ = reply.send(self.detailed_status());
            }
        }
    }

    fn detailed_status(&self) -> DetailedStatus {
        let raft = &self.raw.raft;
        let mut peers = Vec::new();
        if raft.state == StateRole::Leader {
            let conf = raft.prs().conf();
            for (id, pr) in raft.prs().iter() {
                peers.push(PeerProgress {
                    id: *id,
                    match_index: pr.matched,
                    recently_active: pr.recent_active,
                    voter: conf.voters().contains(*id),
                });
            }
            peers.sort_by_key(|p| p.id);
        }
        let cs = raft.prs().conf().to_conf_state();
        DetailedStatus {
            status: self.public_status(),
            peers,
            voters: cs.voters,
            learners: cs.learners,
        }
    }

    fn public_status(&self) -> RaftStatus {
        let raft = &self.raw.raft;
        RaftStatus {
            role: raft.state.into(),
            term: raft.term,
            leader_id: raft.leader_id,
            commit: raft.raft_log.committed,
            applied: self.applied,
            first_index: self.raw.store().truncated_index() + 1,
        }
    }

    fn publish(&mut self) {
        let now = self.public_status();
        if now.role != Role::Leader && !self.reads.is_empty() {
            let leader_id = now.leader_id;
            for reply in self.reads.drain().flat_map(|(_, r)| r) {
                let _ = reply.send(Err(ProposeError::NotLeader { leader_id }));
            }
        }
        let before = *self.status.borrow();
        if (before.role, before.leader_id, before.term) != (now.role, now.leader_id, now.term) {
            tracing::info!(role = ?now.role, term = now.term, leader = now.leader_id, "Raft state changed");
        }
        self.status.send_if_modified(|s| {
            let changed = *s != now;
            *s = now;
            changed
        });
    }

    fn send(&mut self, msgs: Vec<Message>) {
        if msgs.is_empty() {
            return;
        }
        for peer in self.sink.send(msgs) {
            self.raw.report_unreachable(peer);
        }
    }

    fn on_ready(&mut self) -> DriverResult {
        if !self.raw.has_ready() {
            self.publish();
            return Ok(());
        }
        let mut rd = self.raw.ready();
        // 1.
        self.send(rd.take_messages());
        if !rd.snapshot().is_empty() {
            let meta = rd.snapshot().get_metadata().clone();
            snapshot::install(&*self.backend, self.raw.mut_store(), &meta)?;
            self.applied = meta.index;
            self.applied_on_disk = self.applied_on_disk.max(meta.index);
            // A deposed leader's pending proposals may or may not be inside the snapshot.
            for (_, p) in self.proposals.split_off(&0) {
                let _ = p.reply.send(Err(ProposeError::OutcomeUnknown));
            }
        }
        // 2.
        self.apply(rd.take_committed_entries())?;
        // 3.
        let entries = rd.take_entries();
        self.raw.mut_store().persist(&entries, rd.hs())?;
        // 4.
        self.send(rd.take_persisted_messages());
        // 6.
        for rs in rd.take_read_states() {
            let id = <[u8; 8]>::try_from(rs.request_ctx.as_slice()).map(u64::from_be_bytes);
            for reply in id
                .ok()
                .and_then(|id| self.reads.remove(&id))
                .unwrap_or_default()
            {
                let _ = reply.send(Ok(rs.index));
            }
        }
        // 5.
        let mut light = self.raw.advance(rd);
        self.send(light.take_messages());
        self.apply(light.take_committed_entries())?;
        self.raw.advance_apply();
        if self.applied > self.raw.store().truncated_index() + self.compaction_threshold {
            let applied = self.applied;
            self.raw.mut_store().compact(applied)?;
            tracing::debug!(up_to = applied, "compacted the Raft log");
        }
        self.publish();
        Ok(())
    }

    /// Applies a membership change: Raft's configuration, the durable conf state, and the address of an
    /// added node (the change's context) for the transport.
    fn apply_conf_change(
        &mut self,
        cc: ConfChangeV2,
        index: u64,
    ) -> Result<Option<ApplyOutcome>, Box<dyn std::error::Error + Send + Sync>> {
        let cs = self.raw.apply_conf_change(&cc)?;
        self.raw.mut_store().set_conf_state(cs.clone())?;
        if let Ok(addr) = std::str::from_utf8(&cc.context)
            && !addr.is_empty()
        {
            for change in cc.get_changes() {
                if matches!(
                    change.get_change_type(),
                    ConfChangeType::AddNode | ConfChangeType::AddLearnerNode
                ) {
                    self.sink.add_peer(change.node_id, addr.to_string());
                    state_machine::record_member(&*self.backend, change.node_id, addr)?;
                }
            }
        }
        state_machine::mark_applied(&*self.backend, index)?;
        tracing::info!(index, voters = ?cs.voters, learners = ?cs.learners, "membership changed");
        Ok(Some(ApplyOutcome {
            index,
            ..ApplyOutcome::default()
        }))
    }

    /// Applies committed entries: data writes of the whole run go in as few batches as possible (see
    /// [`state_machine::Applier`]), and proposers are answered only once their write is in storage.
    fn apply(&mut self, entries: Vec<Entry>) -> DriverResult {
        if entries.is_empty() {
            return Ok(());
        }
        let backend = Arc::clone(&self.backend);
        let mut applier = state_machine::Applier::new(&*backend);
        let mut answers = Vec::new();
        for entry in entries {
            let (index, term) = (entry.index, entry.term);
            let outcome = if index <= self.applied_on_disk {
                // Already in the data before this process started.
                None
            } else {
                match entry.get_entry_type() {
                    EntryType::EntryNormal if entry.data.is_empty() => {
                        applier.skip(index);
                        None
                    }
                    EntryType::EntryNormal => {
                        let cmd = RaftCommand::decode(entry.data.as_ref())?;
                        Some(applier.apply(index, &cmd)?)
                    }
                    EntryType::EntryConfChange => {
                        applier.flush()?;
                        // Kiwi proposes only V2 changes; a V1 entry is read as the equivalent V2.
                        let v1 = ConfChange::parse_from_bytes(&entry.data)?;
                        let mut single = ConfChangeSingle::default();
                        single.set_change_type(v1.get_change_type());
                        single.node_id = v1.node_id;
                        let mut cc = ConfChangeV2::default();
                        cc.set_changes(vec![single].into());
                        cc.context = v1.context;
                        self.apply_conf_change(cc, index)?
                    }
                    EntryType::EntryConfChangeV2 => {
                        applier.flush()?;
                        let cc = ConfChangeV2::parse_from_bytes(&entry.data)?;
                        self.apply_conf_change(cc, index)?
                    }
                }
            };
            // Proposals at lower indexes can no longer be answered by their own entry.
            while let Some((&i, _)) = self.proposals.first_key_value() {
                if i >= index {
                    break;
                }
                let (_, p) = self.proposals.pop_first().expect("non-empty");
                answers.push((p.reply, Err(ProposeError::Dropped)));
            }
            if let Some(p) = self.proposals.remove(&index) {
                let result = match outcome {
                    Some(o) if p.term == term => Ok(o),
                    _ => Err(ProposeError::Dropped),
                };
                answers.push((p.reply, result));
            }
            self.applied = index;
        }
        applier.flush()?;
        for (reply, result) in answers {
            let _ = reply.send(result);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicBool, Ordering};

    use kiwi_proto::v1::{WriteBatchCommand, WriteOp, raft_command, write_op};
    use kiwi_storage::{
        BackendKind, KeySpace, KvPair, Limits, MemoryBackend, Scan, StorageSnapshot, WriteBatch,
        WriteOptions,
    };

    use super::*;

    /// A memory backend whose writes start failing on demand (a dying disk).
    struct FailingBackend {
        inner: MemoryBackend,
        fail: AtomicBool,
    }

    impl StorageBackend for FailingBackend {
        fn kind(&self) -> BackendKind {
            BackendKind::Memory
        }
        fn limits(&self) -> Limits {
            self.inner.limits()
        }
        fn read(&self, space: KeySpace, key: &[u8]) -> kiwi_storage::Result<Option<Vec<u8>>> {
            self.inner.read(space, key)
        }
        fn batch_write(&self, batch: WriteBatch, opts: WriteOptions) -> kiwi_storage::Result<()> {
            if self.fail.load(Ordering::SeqCst) {
                return Err(kiwi_storage::Error::Engine {
                    backend: BackendKind::Memory,
                    detail: "injected I/O error".into(),
                });
            }
            self.inner.batch_write(batch, opts)
        }
        fn scan(&self, space: KeySpace, scan: &Scan) -> kiwi_storage::Result<Vec<KvPair>> {
            self.inner.scan(space, scan)
        }
        fn snapshot(&self) -> kiwi_storage::Result<Box<dyn StorageSnapshot>> {
            self.inner.snapshot()
        }
    }

    struct NoPeers;
    impl MessageSink for NoPeers {
        fn send(&self, _msgs: Vec<Message>) -> Vec<u64> {
            Vec::new()
        }
        fn add_peer(&self, _id: u64, _addr: String) {}
    }

    fn put(key: &str) -> Vec<u8> {
        RaftCommand {
            request_id: String::new(),
            command: Some(raft_command::Command::Write(WriteBatchCommand {
                ops: vec![WriteOp {
                    op: Some(write_op::Op::Put(write_op::Put {
                        key: key.as_bytes().to_vec(),
                        value: b"v".to_vec(),
                    })),
                }],
            })),
        }
        .encode_to_vec()
    }

    #[tokio::test]
    async fn a_storage_error_stops_the_driver_without_acknowledging() {
        let backend = Arc::new(FailingBackend {
            inner: MemoryBackend::new(Limits::default()),
            fail: AtomicBool::new(false),
        });
        let dyn_backend: Arc<dyn StorageBackend> = backend.clone();
        let mut store = LogStore::open(Arc::clone(&dyn_backend), Arc::default()).unwrap();
        store.bootstrap(vec![1]).unwrap();
        let config = DriverConfig {
            node_id: 1,
            tick_interval: Duration::from_millis(5),
            election_ticks: 10,
            heartbeat_ticks: 2,
            compaction_threshold: 1000,
        };
        let (stop, fatal) = (CancellationToken::new(), CancellationToken::new());
        let (handle, thread) = spawn(
            &config,
            store,
            Arc::clone(&dyn_backend),
            Arc::new(NoPeers),
            stop.clone(),
            fatal.clone(),
        )
        .unwrap();
        let mut watch = handle.watch();
        tokio::time::timeout(
            Duration::from_secs(10),
            watch.wait_for(|s| s.role == Role::Leader),
        )
        .await
        .expect("single node elects itself")
        .unwrap();
        let ok = handle.propose(put("a")).await.unwrap();
        let applied_before = state_machine::applied_index(&*dyn_backend).unwrap();
        assert_eq!(applied_before, ok.index);

        backend.fail.store(true, Ordering::SeqCst);
        let res = tokio::time::timeout(Duration::from_secs(10), handle.propose(put("b")))
            .await
            .expect("the caller is answered, not left waiting");
        assert_eq!(res, Err(ProposeError::Stopped));
        tokio::time::timeout(Duration::from_secs(10), fatal.cancelled())
            .await
            .expect("the driver reports the failure");
        thread.join().unwrap();
        backend.fail.store(false, Ordering::SeqCst);
        assert_eq!(
            state_machine::applied_index(&*dyn_backend).unwrap(),
            applied_before
        );
        assert_eq!(
            backend.read(KeySpace::Data, b"b").unwrap(),
            None,
            "nothing past the failure"
        );
        assert_eq!(handle.propose(put("c")).await, Err(ProposeError::Stopped));
    }
}
