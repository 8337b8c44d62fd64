//! The Raft driver: the one owner of `raft::RawNode`.
//!
//! It runs on its own OS thread (every storage call it makes blocks). Everything else talks to it through
//! a bounded channel ([`DriverHandle`]) and gets answers on oneshots; its public state (role, term,
//! leader, commit and applied index) is published on a `watch` channel.
//!
//! # The Ready contract
//!
//! Each turn of the loop collects every proposal and peer message that arrived while the previous Ready
//! was handled (group commit), starts one ReadIndex round for all the linearizable reads waiting unless
//! one is in flight, ticks when due, then handles one Ready in this order:
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
//! installs it from the staging area the transport filled (`snapshot::install`), with the member
//! addresses it carries. After step 5, the light Ready's commit index (with a single voter every commit
//! advances there) is recorded for the next hard state written. Once the compaction point (the applied
//! index less `compaction_slack`, and on the leader no further than the slowest healthy follower's match
//! less the slack) is more than `compaction_threshold` entries past the last compaction, the log is
//! compacted up to it, as far as the applies are durable: the store fsyncs the data engine on a thread of
//! its own when asked, and the compaction follows in a later turn (see `log_store`).
//!
//! # Applying is total
//! Applying a committed entry never fails because of what the entry says: an entry that does not
//! decode, or that breaks a rule every node shares (`state_machine::validate`), is applied as a no-op
//! (the applied index moves past it), its proposer is answered [`ProposeError::Rejected`], and it is
//! counted and logged. Every node decides the same for the same entry. A membership change raft-rs
//! refuses is handled the same way.
//!
//! # Reads
//! One ReadIndex round is in flight at a time, as in etcd's linearizable read loop: the reads that arrive
//! while it runs share the next round, started in the turn that answers it. A new leader holds them until it
//! has committed an entry of its own term (raft-rs drops read requests before that); a round that gets no
//! answer within an election timeout is started again, and its callers that gave up are forgotten.
//!
//! With `raft.lease_reads`, a confirmed round also gives the leader a lease
//! ([`lease`](crate::raft::lease)): while it holds, a read is answered with the commit index at once,
//! without a round, and without the driver: it publishes the lease and the commit index
//! ([`lease::Published`]) and [`DriverHandle::read_index`] answers from them on the caller's thread. A round is started only to renew a lease that reads use, once less than half of it
//! is left. A transfer in progress or a membership change ends the lease; a node just started ignores
//! vote requests for an election timeout.
//!
//! # Files
//! - `mod.rs`: the handle, the loop, the inbox and the Ready (steps above).
//! - `apply.rs`: applying committed entries and membership changes, answering proposers, compaction.
//! - `reads.rs`: ReadIndex rounds, the lease and what is published of it, leadership transfers.
//! - `status.rs`: the published and detailed status, derived membership, metrics samples.
//! - `tests.rs`.
//!
//! # Failure
//! A storage error at any step stops the driver (fail-stop) with an error log line; it never advances
//! past state it could not persist. A panic on the driver thread (raft-rs asserts on impossible state)
//! does the same: the node then shuts down rather than serving as a zombie.

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
    MessageType,
};
use raft::{RawNode, SnapshotStatus, StateRole};
use tokio::sync::{oneshot, watch};
use tokio_util::sync::CancellationToken;

use crate::raft::guard;
use crate::raft::lease::{self, Fence, Lease, Settings};
use crate::raft::log_store::{LogStore, SnapshotData};
use crate::raft::snapshot::{self, InstallGate};
use crate::raft::state_machine::{self, ApplyOutcome};
use crate::telemetry::raft_metrics::{
    MetricsSettings, Progress, RaftExport, RaftMetrics, RaftMetricsCollector, Sample,
};

mod apply;
mod reads;
mod status;
#[cfg(test)]
mod tests;

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
    /// The driver has stopped (shutdown or a storage error) before it took the request: nothing happened.
    #[error("Raft driver stopped")]
    Stopped,
    /// The driver stopped after it took the request: it may or may not have been committed.
    #[error("the Raft driver stopped after it took the request; its outcome is unknown")]
    StoppedAfterSubmit,
    /// A membership change is already in progress (Raft allows one at a time).
    #[error("another membership change is in progress; retry when it completes")]
    ConfChangePending,
    /// Raft refused the request.
    #[error("{0}")]
    Refused(String),
    /// The command was committed but breaks a rule every node applies (it was applied as a no-op, on
    /// every node): nothing was written, and retrying the same command fails the same way.
    #[error("the command was committed but not applied: {0}")]
    Rejected(String),
    /// This node has been removed from the cluster.
    #[error("this node was removed from the cluster and no longer serves")]
    Removed,
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
    /// This node is no longer a member (a membership change removed it).
    pub removed: bool,
    /// Committed entries applied as no-ops because they were invalid (since the process started).
    pub rejected_entries: u64,
    /// On a leader, the target of the leadership transfer in progress (0: none).
    pub transferring_to: u64,
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

/// What the transport tells the driver.
#[derive(Debug, Clone, Copy)]
pub enum PeerEvent {
    /// Sending to the peer failed.
    Unreachable(u64),
    /// A snapshot stream to the peer finished (`ok`) or failed, after `took`.
    Snapshot { to: u64, ok: bool, took: Duration },
    /// The peer refused this node's messages: it applied a membership change that removed this node.
    NotMember(u64),
    /// The peer's lease settings, as its messages report them (see [`Settings`]).
    LeaseSettings { peer: u64, settings: Settings },
}

/// The wire form of a role.
pub fn wire_role(role: Role) -> kiwi_proto::v1::RaftRole {
    match role {
        Role::Follower => kiwi_proto::v1::RaftRole::Follower,
        Role::Candidate => kiwi_proto::v1::RaftRole::Candidate,
        Role::PreCandidate => kiwi_proto::v1::RaftRole::PreCandidate,
        Role::Leader => kiwi_proto::v1::RaftRole::Leader,
    }
}

/// Where the driver sends messages for other nodes. Must never block.
pub trait MessageSink: Send + Sync + 'static {
    /// Queues `msgs` for their destinations; returns the ids of peers whose queue was full (the driver
    /// reports them unreachable).
    fn send(&self, msgs: Vec<Message>) -> Vec<u64>;

    /// Starts sending to a member added by a membership change, given its member record
    /// (`transport::member_record`: client address, and Raft address when it has its own).
    fn add_peer(&self, id: u64, record: String);
}

enum Inbox {
    Propose {
        data: Vec<u8>,
        reply: oneshot::Sender<Result<ApplyOutcome, ProposeError>>,
        /// The request's span when it is traced (else disabled): parent of `raft.replicate` and
        /// `raft.apply`.
        trace: tracing::Span,
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
        reply: InstallReply,
        /// The staging area's lock, released when the install is done.
        staging: Box<dyn Send>,
    },
    Step(Message),
    Peer(PeerEvent),
    Status {
        reply: oneshot::Sender<DetailedStatus>,
    },
    Metrics {
        with_history: bool,
        reply: oneshot::Sender<Option<MetricsReport>>,
    },
}

/// Where a snapshot install's outcome goes.
type InstallReply = oneshot::Sender<Result<(), ProposeError>>;

/// How the driver is set up.
#[derive(Debug, Clone)]
pub struct DriverConfig {
    pub node_id: u64,
    pub tick_interval: Duration,
    pub election_ticks: usize,
    pub heartbeat_ticks: usize,
    /// Applied entries past the last compaction that trigger the next one.
    pub compaction_threshold: u64,
    /// Entries a compaction keeps behind the applied index and the slowest healthy follower.
    pub compaction_slack: u64,
    /// `raft.lease_reads`: answer linearizable reads from a leader lease when it holds (see
    /// [`lease`](crate::raft::lease)).
    pub lease_reads: bool,
    /// `[raft.metrics]`.
    pub metrics: MetricsSettings,
    /// Where the metrics are exported (the `raft` family).
    pub metrics_export: RaftExport,
}

impl DriverConfig {
    /// The settings a lease depends on, which this node reports to its peers (see [`Settings`]).
    pub fn lease_settings(&self) -> Settings {
        Settings {
            tick: self.tick_interval,
            election_ticks: self.election_ticks,
            lease_reads: self.lease_reads,
        }
    }
}

/// A node's Raft metrics with the state they describe.
#[derive(Debug, Clone)]
pub struct MetricsReport {
    pub status: RaftStatus,
    pub last_index: u64,
    pub metrics: RaftMetrics,
}

/// The cloneable handle every other component uses.
#[derive(Clone)]
pub struct DriverHandle {
    tx: SyncSender<Inbox>,
    /// Transport events: unbounded (one per peer event, never many), so none is lost to a full inbox.
    events: std::sync::mpsc::Sender<PeerEvent>,
    status: watch::Receiver<RaftStatus>,
    /// Ids this cluster removed (see `state_machine::record_removed`), sorted.
    removed_ids: watch::Receiver<Vec<u64>>,
    /// The change feed (see [`state_machine::Published`]).
    feed: state_machine::ChangeFeed,
    /// Every id in the current membership (voters and learners, incoming and outgoing), sorted; empty
    /// on a node that has not joined yet.
    members: watch::Receiver<Vec<u64>>,
    export: RaftExport,
    /// The leader lease as the driver publishes it, with `raft.lease_reads`.
    lease: Option<Arc<lease::Published>>,
}

impl DriverHandle {
    /// Subscribes to the change feed: every run of applied entries from now on, in order (a receiver
    /// that falls [`state_machine::FEED_RUNS`] runs behind is told it lagged).
    pub fn subscribe_changes(
        &self,
    ) -> tokio::sync::broadcast::Receiver<Arc<state_machine::Published>> {
        self.feed.subscribe()
    }

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
        self.send(Inbox::Propose {
            data,
            reply,
            trace: tracing::Span::none(),
        })?;
        rx.await.map_err(|_| ProposeError::StoppedAfterSubmit)?
    }

    /// Hands an encoded [`RaftCommand`] to Raft without waiting; the receiver answers once it is applied
    /// (or can no longer be). `trace` is the request's span when it is traced (else `Span::none()`).
    ///
    /// # Errors
    /// [`ProposeError::Overloaded`] or [`ProposeError::Stopped`] when the driver cannot take it.
    pub fn submit(
        &self,
        data: Vec<u8>,
        trace: tracing::Span,
    ) -> Result<oneshot::Receiver<Result<ApplyOutcome, ProposeError>>, ProposeError> {
        let (reply, rx) = oneshot::channel();
        self.send(Inbox::Propose { data, reply, trace })?;
        Ok(rx)
    }

    /// Runs a ReadIndex round and returns the index a linearizable read must wait for.
    ///
    /// # Errors
    /// [`ProposeError`].
    pub async fn read_index(&self) -> Result<u64, ProposeError> {
        // With a lease published, on this thread: no message to the driver and back.
        if let Some(index) = self.lease.as_ref().and_then(|l| l.serve(Instant::now())) {
            return Ok(index);
        }
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

    /// Passes on what the transport observed (unreachable peers, snapshot outcomes). Never dropped: a
    /// lost "snapshot failed" would leave that follower waiting for a snapshot that never comes.
    pub fn peer_event(&self, event: PeerEvent) {
        let _ = self.events.send(event);
    }

    /// Proposes a membership change and waits until it is applied. The change's context carries the
    /// address of an added node.
    ///
    /// # Errors
    /// [`ProposeError`].
    pub async fn change_membership(&self, cc: ConfChangeV2) -> Result<ApplyOutcome, ProposeError> {
        let (reply, rx) = oneshot::channel();
        self.send(Inbox::ConfChange { cc, reply })?;
        rx.await.map_err(|_| ProposeError::StoppedAfterSubmit)?
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
    /// `staging` (the staging area's lock) is held until then, whether or not the caller still waits.
    pub async fn install_snapshot(
        &self,
        msg: Message,
        staging: Box<dyn Send>,
    ) -> Result<(), ProposeError> {
        let (reply, rx) = oneshot::channel();
        self.send(Inbox::InstallSnapshot {
            msg,
            reply,
            staging,
        })?;
        rx.await.map_err(|_| ProposeError::Stopped)?
    }

    /// Whether a membership change this node applied removed `id` (and none added it back). A node
    /// whose log is behind may not know of a removal yet: it then answers `false`.
    pub fn was_removed(&self, id: u64) -> bool {
        self.removed_ids.borrow().binary_search(&id).is_ok()
    }

    /// Whether `id` is in the membership this node knows. A node that has not joined yet knows none and
    /// answers `true`: its first snapshot tells it who the members are.
    pub fn is_member(&self, id: u64) -> bool {
        let members = self.members.borrow();
        members.is_empty() || members.binary_search(&id).is_ok()
    }

    /// Counts a peer message or stream the transport refused.
    pub fn count_refused(&self, refusal: guard::Refusal) {
        self.export.message_refused(refusal.label());
    }

    /// The Raft metrics (`None` when `[raft.metrics] enabled = false`).
    ///
    /// # Errors
    /// [`ProposeError`] when the driver is stopped or overloaded.
    pub async fn raft_metrics(
        &self,
        with_history: bool,
    ) -> Result<Option<MetricsReport>, ProposeError> {
        let (reply, rx) = oneshot::channel();
        self.send(Inbox::Metrics {
            with_history,
            reply,
        })?;
        rx.await.map_err(|_| ProposeError::Stopped)
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
    /// When it was proposed (for the propose-to-apply latency).
    at: Instant,
    reply: oneshot::Sender<Result<ApplyOutcome, ProposeError>>,
    /// The request's span (disabled unless traced), and its `raft.replicate` child, open until commit.
    trace: tracing::Span,
    replicate: tracing::Span,
}

/// One ReadIndex round in flight.
struct ReadRound {
    started: Instant,
    /// The leader's term when it started (a confirmed round of this term renews the lease).
    term: u64,
    replies: Vec<oneshot::Sender<Result<u64, ProposeError>>>,
}

struct Driver {
    raw: RawNode<LogStore>,
    backend: Arc<dyn StorageBackend>,
    sink: Arc<dyn MessageSink>,
    /// Index persisted as applied when the node started: entries up to it are already in the data.
    applied_on_disk: u64,
    proposals: BTreeMap<u64, Pending>,
    /// ReadIndex rounds in flight, by context id, each with the reads it serves.
    reads: HashMap<u64, ReadRound>,
    /// How long a ReadIndex round may go unanswered before it is started again.
    read_retry: Duration,
    /// Reads that arrived since the last round started; they share the next round.
    read_batch: Vec<oneshot::Sender<Result<u64, ProposeError>>>,
    next_read: u64,
    status: watch::Sender<RaftStatus>,
    applied: u64,
    compaction_threshold: u64,
    compaction_slack: u64,
    /// Snapshot installs to answer after the current Ready, with the staging lock each holds.
    installs: Vec<(InstallReply, Box<dyn Send>)>,
    /// This node is not in the current membership (as its own log says).
    removed: bool,
    /// Peers that refused this node's messages as a non-member since it last heard from a leader: a
    /// removed node often never receives the entry that removed it (the leader stops sending to it).
    refused_by: std::collections::BTreeSet<u64>,
    /// Ids removed by membership changes this node applied, sorted.
    removed_ids: watch::Sender<Vec<u64>>,
    /// The current membership, for the transport (see [`DriverHandle::is_member`]).
    members: watch::Sender<Vec<u64>>,
    /// When a refused peer message was last logged (refusals are counted always, logged once a second).
    refusal_logged: Option<Instant>,
    /// Tells the storage stage when user data is being replaced by a snapshot.
    gate: Arc<InstallGate>,
    /// Committed entries applied as no-ops because they were invalid.
    rejected_entries: u64,
    /// The leader lease, with `raft.lease_reads`.
    lease: Option<Lease>,
    /// The leadership transfer asked for last (target, term), until it ends.
    transfer: Option<(u64, u64)>,
    /// This node's lease settings, and those its peers reported.
    settings: Settings,
    peer_settings: HashMap<u64, Settings>,
    /// Whether every voter reported this node's settings (a lease is taken only then).
    settings_agree: bool,
    metrics: RaftMetricsCollector,
    /// The change feed watchers subscribe to, and the last index published on it.
    feed: state_machine::ChangeFeed,
    published: u64,
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
    gate: Arc<InstallGate>,
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
        // Appends to one follower produced in one turn go as one message.
        batch_append: true,
        // A commit that moves is not sent to followers on its own: the next append or heartbeat
        // carries it. Only the leader answers linearizable reads and writes, so their latency does not
        // change; followers apply (and answer serializable reads) up to one heartbeat later when writes
        // stop, and save a message, a hard-state write and a wake-up per commit while they go on.
        skip_bcast_commit: true,
        ..raft::Config::default()
    };
    cfg.validate()?;
    let logger = slog::Logger::root(slog::Discard, slog::o!());
    let raw = RawNode::new(&cfg, store, &logger)?;
    let (tx, rx) = sync_channel(INBOX);
    let (events_tx, events_rx) = std::sync::mpsc::channel();
    let initial = RaftStatus {
        applied: cfg.applied,
        ..RaftStatus::default()
    };
    let (status_tx, status_rx) = watch::channel(initial);
    let mut removed_ids = state_machine::removed_members(&*backend)
        .map_err(|e| raft::Error::Store(raft::StorageError::Other(Box::new(e))))?;
    removed_ids.sort_unstable();
    let (removed_tx, removed_rx) = watch::channel(removed_ids);
    let (members_tx, members_rx) = watch::channel(Vec::new());
    let (feed, _) = tokio::sync::broadcast::channel(state_machine::FEED_RUNS);
    config
        .metrics_export
        .register_refusal_reasons(guard::Refusal::ALL.map(guard::Refusal::label));
    let mut driver = Driver {
        raw,
        backend,
        sink,
        applied_on_disk,
        proposals: BTreeMap::new(),
        reads: HashMap::new(),
        read_retry: config.tick_interval * config.election_ticks as u32,
        read_batch: Vec::new(),
        next_read: 1,
        status: status_tx,
        applied: cfg.applied,
        compaction_threshold: config.compaction_threshold,
        compaction_slack: config.compaction_slack,
        installs: Vec::new(),
        removed: false,
        refused_by: std::collections::BTreeSet::new(),
        removed_ids: removed_tx,
        members: members_tx,
        refusal_logged: None,
        gate,
        rejected_entries: 0,
        lease: config
            .lease_reads
            .then(|| Lease::new(config.tick_interval, config.election_ticks, Instant::now())),
        transfer: None,
        settings: config.lease_settings(),
        peer_settings: HashMap::new(),
        settings_agree: false,
        metrics: RaftMetricsCollector::new(config.metrics, config.metrics_export.clone()),
        feed: feed.clone(),
        published: cfg.applied,
    };
    driver.refresh_membership();
    let lease = driver.lease.as_ref().map(Lease::published);
    let tick = config.tick_interval;
    let thread = std::thread::Builder::new()
        .name("kiwi-raft".into())
        .spawn(move || {
            let run = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                driver.run(rx, &events_rx, tick, &stop)
            }));
            match run {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    tracing::error!(error = %e, "storage error in the Raft driver: stopping the node (fail-stop)");
                    fatal.cancel();
                }
                Err(panic) => {
                    let what = panic
                        .downcast_ref::<String>()
                        .map(String::as_str)
                        .or_else(|| panic.downcast_ref::<&str>().copied())
                        .unwrap_or("(no message)");
                    tracing::error!(panic = what, "the Raft driver panicked: stopping the node (fail-stop)");
                    fatal.cancel();
                }
            }
        })
        .map_err(|e| raft::Error::Store(raft::StorageError::Other(Box::new(e))))?;
    Ok((
        DriverHandle {
            tx,
            events: events_tx,
            status: status_rx,
            removed_ids: removed_rx,
            members: members_rx,
            export: config.metrics_export.clone(),
            feed,
            lease,
        },
        thread,
    ))
}

type DriverResult = Result<(), Box<dyn std::error::Error + Send + Sync>>;

impl Driver {
    fn run(
        &mut self,
        rx: Receiver<Inbox>,
        events: &Receiver<PeerEvent>,
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
            while let Ok(event) = events.try_recv() {
                self.handle(Inbox::Peer(event));
            }
            self.start_reads();
            if Instant::now() >= next_tick {
                self.raw.tick();
                next_tick += tick;
                if next_tick < Instant::now() {
                    next_tick = Instant::now() + tick;
                }
            }
            self.on_ready()?;
            if !self.read_batch.is_empty()
                && self.reads.is_empty()
                && self.raw.raft.state == StateRole::Leader
                && self.raw.raft.commit_to_current_term()
            {
                // Reads held for this leader's first commit, which this Ready made, or for the round
                // this Ready answered: start them now rather than at the next message or tick.
                self.start_reads();
                self.on_ready()?;
            }
            // The staging lock goes after the Ready that installed the snapshot (or after Raft
            // ignored it as stale).
            for (reply, _staging) in self.installs.drain(..) {
                let _ = reply.send(Ok(()));
            }
            self.publish_lease();
        }
        Ok(())
    }

    /// Hands `reply` back if this node leads; otherwise answers it with the leader hint.
    fn leader_only<T>(
        &self,
        reply: oneshot::Sender<Result<T, ProposeError>>,
    ) -> Option<oneshot::Sender<Result<T, ProposeError>>> {
        if self.is_removed() {
            let _ = reply.send(Err(ProposeError::Removed));
            return None;
        }
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
    fn track(
        &mut self,
        before: u64,
        reply: oneshot::Sender<Result<ApplyOutcome, ProposeError>>,
        trace: tracing::Span,
    ) {
        let index = self.raw.raft.raft_log.last_index();
        if index == before {
            let _ = reply.send(Err(ProposeError::Dropped));
            return;
        }
        let replicate = if trace.is_disabled() {
            tracing::Span::none()
        } else {
            tracing::debug_span!(parent: &trace, "raft.replicate", raft.index = index)
        };
        let replaced = self.proposals.insert(
            index,
            Pending {
                term: self.raw.raft.term,
                at: Instant::now(),
                reply,
                trace,
                replicate,
            },
        );
        if let Some(old) = replaced {
            // An earlier proposal at this index was overwritten by a later leader's log: it never commits.
            self.metrics.proposal_answered(None, old.at.elapsed());
            let _ = old.reply.send(Err(ProposeError::Dropped));
        }
    }

    fn handle(&mut self, msg: Inbox) {
        match msg {
            Inbox::Propose { data, reply, trace } => {
                let Some(reply) = self.leader_only(reply) else {
                    return;
                };
                let before = self.raw.raft.raft_log.last_index();
                if self.raw.propose(Vec::new(), data).is_err() {
                    let _ = reply.send(Err(ProposeError::Dropped));
                    return;
                }
                self.track(before, reply, trace);
            }
            Inbox::ReadIndex { reply } => {
                let Some(reply) = self.leader_only(reply) else {
                    return;
                };
                if let Some(index) = self.lease_read() {
                    let _ = reply.send(Ok(index));
                    return;
                }
                // Batched: one ReadIndex round serves every read that arrived while the last ran.
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
                let me = self.raw.raft.id;
                if cc
                    .get_changes()
                    .iter()
                    .any(|c| c.node_id == me && c.get_change_type() == ConfChangeType::RemoveNode)
                {
                    // raft-rs 0.7 keeps a removed leader leading; its heartbeats would stop the others
                    // from electing and every write would fail.
                    let _ = reply.send(Err(ProposeError::Refused(format!(
                        "node {me} is the leader and cannot remove itself: transfer leadership first"
                    ))));
                    return;
                }
                let before = self.raw.raft.raft_log.last_index();
                if let Err(e) = self.raw.propose_conf_change(Vec::new(), cc) {
                    let _ = reply.send(Err(ProposeError::Refused(e.to_string())));
                    return;
                }
                self.track(before, reply, tracing::Span::none());
            }
            Inbox::TransferLeader { to } => self.transfer_leader(to),
            Inbox::InstallSnapshot {
                msg,
                reply,
                staging,
            } => {
                let _ = self.raw.step(msg);
                self.installs.push((reply, staging));
            }
            Inbox::Step(m) => {
                let local = guard::LocalView {
                    term: self.raw.raft.term,
                    last_index: self.raw.raft.raft_log.last_index(),
                };
                if let Err(refusal) = guard::check_message(&m, local) {
                    self.metrics.export().message_refused(refusal.label());
                    let now = Instant::now();
                    if self
                        .refusal_logged
                        .is_none_or(|t| now.duration_since(t) >= Duration::from_secs(1))
                    {
                        self.refusal_logged = Some(now);
                        tracing::warn!(
                            from = m.from,
                            kind = ?m.get_msg_type(),
                            term = m.term,
                            reason = refusal.label(),
                            "refused a Raft message that is not safe to step (counted in \
                             kiwi_raft_messages_refused_total; logged at most once a second)"
                        );
                    }
                    return;
                }
                if let Some(lease) = &mut self.lease
                    && m.get_msg_type() == MessageType::MsgHeartbeatResponse
                    && let Ok(round) = <[u8; 8]>::try_from(m.context.as_ref())
                {
                    // A ReadIndex round's heartbeat answered: it may lift a fence (see `transfer_ended`).
                    lease.acknowledged(m.from, m.term, u64::from_be_bytes(round));
                }
                if matches!(
                    m.get_msg_type(),
                    MessageType::MsgRequestVote | MessageType::MsgRequestPreVote
                ) && self
                    .lease
                    .as_ref()
                    .is_some_and(|l| !l.votes_allowed(Instant::now()))
                {
                    // Just started: this node no longer knows when it last heard from a leader whose
                    // lease it may have confirmed (see `lease`). The candidate tries again.
                    return;
                }
                if !self.refused_by.is_empty()
                    && matches!(
                        m.get_msg_type(),
                        MessageType::MsgAppend | MessageType::MsgHeartbeat
                    )
                    && m.term >= self.raw.raft.term
                {
                    // A leader still talks to this node: it is a member.
                    self.refused_by.clear();
                }
                let _ = self.raw.step(m);
            }
            Inbox::Peer(PeerEvent::NotMember(peer)) => {
                let was = self.is_removed();
                self.refused_by.insert(peer);
                if self.is_removed() && !was {
                    tracing::warn!(
                        refused_by = ?self.refused_by,
                        "a majority of the other members refuse this node's messages: it was removed \
                         from the cluster and no longer serves requests"
                    );
                }
            }
            Inbox::Peer(PeerEvent::Unreachable(peer)) => self.raw.report_unreachable(peer),
            Inbox::Peer(PeerEvent::LeaseSettings { peer, settings }) => {
                self.peer_settings.insert(peer, settings);
                self.check_settings();
            }
            Inbox::Peer(PeerEvent::Snapshot { to, ok, took }) => {
                self.metrics.snapshot_sent(to, ok, took);
                self.raw.report_snapshot(
                    to,
                    if ok {
                        SnapshotStatus::Finish
                    } else {
                        SnapshotStatus::Failure
                    },
                );
            }
            Inbox::Status { reply } => {
                let _ = reply.send(self.detailed_status());
            }
            Inbox::Metrics {
                with_history,
                reply,
            } => {
                let _ = reply.send(self.metrics_report(with_history));
            }
        }
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
        let started = Instant::now();
        self.handle_ready()?;
        self.metrics.ready_handled(started.elapsed());
        Ok(())
    }

    fn handle_ready(&mut self) -> DriverResult {
        // Before this Ready's messages leave (a `MsgTimeoutNow` among them ends the lease).
        self.publish_lease();
        let mut rd = self.raw.ready();
        // 1.
        self.send(rd.take_messages());
        if !rd.snapshot().is_empty() {
            let meta = rd.snapshot().get_metadata().clone();
            let (members, leases) = SnapshotData::decode(&rd.snapshot().data)
                .map(|d| (d.members, d.leases))
                .unwrap_or_default();
            snapshot::install(
                &*self.backend,
                self.raw.mut_store(),
                &meta,
                &members,
                &leases,
                &self.gate,
            )?;
            for (id, addr) in members {
                self.sink.add_peer(id, addr);
            }
            self.refresh_membership();
            self.applied = meta.index;
            self.publish_changes(meta.index, None);
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
        if !entries.is_empty() || rd.hs().is_some() {
            let started = Instant::now();
            // Only fsynced writes are measured as log appends (their time and entries per fsync).
            if self.raw.mut_store().persist(&entries, rd.hs())? {
                let last = entries.last().map_or(0, |e| e.index);
                self.metrics
                    .log_appended(entries.len(), last, started.elapsed(), Instant::now());
            }
        }
        // 4.
        self.send(rd.take_persisted_messages());
        // 6.
        for rs in rd.take_read_states() {
            let id = <[u8; 8]>::try_from(rs.request_ctx.as_slice()).map(u64::from_be_bytes);
            let round = id.ok().and_then(|id| self.reads.remove(&id));
            if let Some(r) = &round {
                self.metrics.read_answered(r.started.elapsed());
                if let Some(lease) = &mut self.lease
                    && r.term == self.raw.raft.term
                    && self.raw.raft.state == StateRole::Leader
                {
                    lease.confirmed(r.started, r.term);
                }
            }
            for reply in round.map(|r| r.replies).unwrap_or_default() {
                let _ = reply.send(Ok(rs.index));
            }
        }
        // 5.
        let mut light = self.raw.advance(rd);
        if let Some(commit) = light.commit_index() {
            self.raw.mut_store().set_commit(commit);
        }
        self.send(light.take_messages());
        self.apply(light.take_committed_entries())?;
        self.raw.advance_apply();
        let target = self.compaction_target();
        if target > self.raw.store().truncated_index() + self.compaction_threshold {
            // Only as far as the applies are durable; the fsync that makes them so runs on the store's
            // own thread, and the compaction follows in a later turn.
            let applied = self.applied;
            let store = self.raw.mut_store();
            if store.durable_applied() < target {
                store.make_durable(applied);
            }
            if store.durable_applied() > store.truncated_index() + self.compaction_threshold {
                let to = store.compact(target)?;
                tracing::debug!(up_to = to, "compacted the Raft log");
            }
        }
        self.publish();
        Ok(())
    }
}

/// A sink that sends nothing: a driver alone, for tests of this module and the transport's.
#[cfg(test)]
pub(crate) struct NoPeers;

#[cfg(test)]
impl MessageSink for NoPeers {
    fn send(&self, _msgs: Vec<Message>) -> Vec<u64> {
        Vec::new()
    }
    fn add_peer(&self, _id: u64, _addr: String) {}
}
