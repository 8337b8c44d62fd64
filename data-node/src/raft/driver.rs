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
//! compacted up to it (one fsynced batch, which also makes the buffered applies durable and raises the
//! stored commit index to at least that point).
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

    /// Publishes the lease for reads answered without the driver (see [`lease::Published`]).
    fn publish_lease(&self) {
        let Some(lease) = &self.lease else {
            return;
        };
        let raft = &self.raw.raft;
        let holds = raft.state == StateRole::Leader
            && raft.lead_transferee.is_none()
            && self.settings_agree
            && !self.is_removed()
            && raft.commit_to_current_term();
        lease.publish(holds, raft.term);
    }

    /// Hands leadership to `to` (raft-rs ignores it when `to` cannot take it). The target may be elected
    /// at once: no lease from here on, and none after the transfer ends until the target has seen a later
    /// message (see `transfer_ended`).
    fn transfer_leader(&mut self, to: u64) {
        if let Some(lease) = &mut self.lease {
            lease.revoke(Instant::now());
        }
        self.transfer = Some((to, self.raw.raft.term));
        self.raw.transfer_leader(to);
    }

    /// Notices a transfer that ended with this node still leading in the same term (it gave up, or raft-rs
    /// ignored it): a `MsgTimeoutNow` sent to the target stays valid in this term, so the lease is fenced
    /// until the target answers a round started from now on (see [`lease`](crate::raft::lease)).
    fn transfer_ended(&mut self, now: Instant) {
        let Some((to, term)) = self.transfer else {
            return;
        };
        let raft = &self.raw.raft;
        if raft.lead_transferee == Some(to) {
            return;
        }
        self.transfer = None;
        if let Some(lease) = &mut self.lease
            && raft.state == StateRole::Leader
            && raft.term == term
            && to != raft.id
            && raft.prs().conf().voters().contains(to)
        {
            tracing::info!(
                to,
                "leadership transfer ended without a change of leader: no lease until node {to} \
                 answers a later round"
            );
            lease.fence(
                Fence {
                    peer: to,
                    term,
                    first_round: self.next_read,
                },
                now,
            );
        }
    }

    /// Starts one ReadIndex round for the reads that arrived in this turn, once this leader has committed
    /// an entry of its own term (raft-rs drops a read request before that); restarts rounds that got no
    /// answer within `read_retry`, forgetting callers that gave up.
    fn start_reads(&mut self) {
        let now = Instant::now();
        self.transfer_ended(now);
        if let Some(lease) = &mut self.lease
            && self.raw.raft.lead_transferee.is_some()
        {
            // A round started now (at the floor) gives no lease either: the transfer's target may be
            // elected by followers that answer it.
            lease.revoke(now);
        }
        let stale: Vec<u64> = self
            .reads
            .iter()
            .filter(|(_, r)| now.duration_since(r.started) >= self.read_retry)
            .map(|(id, _)| *id)
            .collect();
        for id in stale {
            if let Some(round) = self.reads.remove(&id) {
                self.read_batch
                    .extend(round.replies.into_iter().filter(|r| !r.is_closed()));
            }
        }
        // With a lease in use, one round renews it before it runs out, so that reads keep being answered
        // without one.
        let renew = self.read_batch.is_empty()
            && self.reads.is_empty()
            && self.raw.raft.state == StateRole::Leader
            && self.lease.as_ref().is_some_and(|l| l.wants_renewal(now));
        if self.read_batch.is_empty() && !renew {
            return;
        }
        if self.raw.raft.state != StateRole::Leader {
            let leader_id = self.raw.raft.leader_id;
            for reply in self.read_batch.drain(..) {
                let _ = reply.send(Err(ProposeError::NotLeader { leader_id }));
            }
            return;
        }
        if !self.raw.raft.commit_to_current_term() {
            // Held until the leader's first entry of its term commits (it was proposed on election).
            self.read_batch.retain(|r| !r.is_closed());
            return;
        }
        if !self.reads.is_empty() {
            // One round in flight at a time (etcd's linearizable read loop): reads arriving meanwhile
            // join the next round, started as soon as this one is answered (see `run`).
            return;
        }
        let id = self.next_read;
        self.next_read += 1;
        self.reads.insert(
            id,
            ReadRound {
                started: now,
                term: self.raw.raft.term,
                replies: std::mem::take(&mut self.read_batch),
            },
        );
        if let Some(lease) = &mut self.lease {
            lease.round_started();
        }
        self.raw.read_index(id.to_be_bytes().to_vec());
    }

    /// The commit index a linearizable read may use at once, when this leader's lease holds (see
    /// [`lease`](crate::raft::lease)): it leads, has committed an entry of its term, is not handing
    /// leadership over, and a quorum confirmed it recently enough.
    fn lease_read(&mut self) -> Option<u64> {
        let raft = &self.raw.raft;
        let lease = self.lease.as_mut()?;
        if raft.state != StateRole::Leader
            || raft.lead_transferee.is_some()
            || !self.settings_agree
            || !raft.commit_to_current_term()
        {
            return None;
        }
        lease
            .serve(raft.term, Instant::now())
            .then_some(raft.raft_log.committed)
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
            removed: self.is_removed(),
            rejected_entries: self.rejected_entries,
            transferring_to: raft.lead_transferee.unwrap_or(0),
        }
    }

    /// Whether this node no longer belongs to the cluster: its own log says so, or a majority of the
    /// other voters refused its messages as a non-member since it last heard from a leader.
    fn is_removed(&self) -> bool {
        if self.removed {
            return true;
        }
        let me = self.raw.raft.id;
        let voters = self.raw.raft.prs().conf().voters().ids();
        let others = voters.iter().filter(|id| *id != me).count();
        let refusing = voters
            .iter()
            .filter(|id| self.refused_by.contains(id))
            .count();
        others > 0 && refusing * 2 > others
    }

    /// Recomputes [`Driver::removed`] and publishes the membership after it changed.
    /// Whether every voter but this node reported this node's lease settings; logs a change.
    fn check_settings(&mut self) {
        if self.lease.is_none() {
            return;
        }
        let me = self.raw.raft.id;
        let differ: Vec<u64> = self
            .raw
            .raft
            .prs()
            .conf()
            .voters()
            .ids()
            .iter()
            .filter(|id| *id != me && self.peer_settings.get(id) != Some(&self.settings))
            .collect();
        let agree = differ.is_empty();
        if agree != self.settings_agree {
            if agree {
                tracing::info!("every voter runs this node's lease settings: lease reads possible");
            } else {
                tracing::warn!(
                    voters = ?differ,
                    mine = ?self.settings,
                    theirs = ?differ.iter().map(|id| self.peer_settings.get(id)).collect::<Vec<_>>(),
                    "voters run other lease settings (raft.tick_interval_ms, election_ticks, \
                     lease_reads) or have not reported them yet: reads take ReadIndex rounds"
                );
            }
        }
        self.settings_agree = agree;
    }

    fn refresh_membership(&mut self) {
        self.check_settings();
        self.removed = self.compute_removed();
        let cs = self.raw.raft.prs().conf().to_conf_state();
        let mut ids: Vec<u64> =
            [cs.voters, cs.learners, cs.voters_outgoing, cs.learners_next].concat();
        ids.sort_unstable();
        ids.dedup();
        self.members.send_replace(ids);
    }

    /// Whether the current membership leaves this node out (a node that has not joined yet has no
    /// membership at all, and is not removed).
    fn compute_removed(&self) -> bool {
        let cs = self.raw.raft.prs().conf().to_conf_state();
        let me = self.raw.raft.id;
        !cs.voters.is_empty()
            && ![
                &cs.voters,
                &cs.learners,
                &cs.voters_outgoing,
                &cs.learners_next,
            ]
            .iter()
            .any(|ids| ids.contains(&me))
    }

    fn publish(&mut self) {
        let now = self.public_status();
        self.observe(&now);
        if now.role != Role::Leader && !self.reads.is_empty() {
            let leader_id = now.leader_id;
            for reply in self.reads.drain().flat_map(|(_, r)| r.replies) {
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

    /// Records what the metrics learn from the current state: campaigns, leaders, followers' progress,
    /// and a history sample when one is due.
    fn observe(&mut self, now: &RaftStatus) {
        if !self.metrics.enabled() {
            return;
        }
        let at = Instant::now();
        let before = *self.status.borrow();
        // A campaign is a new term in which this node voted for itself (a single voter may campaign and
        // win within one turn, so the candidate role itself may never be seen here).
        if now.term > before.term && self.raw.raft.vote == self.raw.raft.id {
            self.metrics.campaign_started(at);
        }
        self.metrics.leader_seen(now.leader_id, at);
        let raft = &self.raw.raft;
        let mut max_lag = 0;
        if raft.state == StateRole::Leader {
            let last = raft.raft_log.last_index();
            for (id, pr) in raft.prs().iter() {
                if *id != raft.id {
                    self.metrics.follower_matched(*id, pr.matched, at);
                    max_lag = max_lag.max(last.saturating_sub(pr.matched));
                }
            }
        }
        let role = wire_role(now.role);
        let raft = &self.raw.raft;
        self.metrics.maybe_sample(at, || {
            let last_index = raft.raft_log.last_index();
            let mut followers = Vec::new();
            if raft.state == StateRole::Leader {
                for (id, pr) in raft.prs().iter() {
                    if *id != raft.id {
                        followers.push((
                            *id,
                            pr.matched,
                            last_index.saturating_sub(pr.matched),
                            pr.recent_active,
                        ));
                    }
                }
            }
            let sample = Sample {
                at: std::time::SystemTime::now(),
                term: now.term,
                role,
                commit: now.commit,
                applied: now.applied,
                max_follower_lag: max_lag,
            };
            let progress = Progress {
                leader: now.leader_id,
                first_index: raft.raft_log.first_index(),
                last_index,
                followers,
            };
            (sample, progress)
        });
    }

    fn metrics_report(&self, with_history: bool) -> Option<MetricsReport> {
        if !self.metrics.enabled() {
            return None;
        }
        let raft = &self.raw.raft;
        let last_index = raft.raft_log.last_index();
        let mut followers = Vec::new();
        if raft.state == StateRole::Leader {
            let conf = raft.prs().conf();
            for (id, pr) in raft.prs().iter() {
                if *id != raft.id {
                    followers.push((
                        *id,
                        pr.matched,
                        last_index.saturating_sub(pr.matched),
                        pr.recent_active,
                        conf.voters().contains(*id),
                    ));
                }
            }
            followers.sort_unstable_by_key(|f| f.0);
        }
        Some(MetricsReport {
            status: self.public_status(),
            last_index,
            metrics: self.metrics.metrics(&followers, with_history),
        })
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
            self.raw.mut_store().compact(target)?;
            tracing::debug!(up_to = target, "compacted the Raft log");
        }
        self.publish();
        Ok(())
    }

    /// Where the log may be compacted up to: `compaction_slack` entries behind the applied index and, on
    /// the leader, behind the slowest healthy follower (recently active and within a threshold of the
    /// applied index: one that far behind needs a snapshot anyway, and must not keep the log growing).
    fn compaction_target(&self) -> u64 {
        let mut target = self.applied.saturating_sub(self.compaction_slack);
        let raft = &self.raw.raft;
        if raft.state == StateRole::Leader {
            let horizon = self
                .applied
                .saturating_sub(self.compaction_slack + self.compaction_threshold);
            for (id, pr) in raft.prs().iter() {
                if *id != raft.id && pr.recent_active && pr.matched >= horizon {
                    target = target.min(pr.matched.saturating_sub(self.compaction_slack));
                }
            }
        }
        target
    }

    /// Applies a membership change: Raft's configuration, then, in one durable batch with the applied
    /// index and whatever `applier` still holds, the conf state and the address of an added node (the
    /// change's context). A change raft-rs refuses is applied as a no-op (`Err` carries why).
    fn apply_conf_change(
        &mut self,
        applier: &mut state_machine::Applier<'_>,
        cc: &ConfChangeV2,
        index: u64,
    ) -> Result<Result<ApplyOutcome, String>, Box<dyn std::error::Error + Send + Sync>> {
        // What a quorum is changes: rounds confirmed before give no lease.
        if let Some(lease) = &mut self.lease {
            lease.revoke(Instant::now());
        }
        let cs = match self.raw.apply_conf_change(cc) {
            Ok(cs) => cs,
            Err(e) => {
                applier.skip(index);
                return Ok(Err(format!("Raft refused the membership change: {e}")));
            }
        };
        let mut batch = kiwi_storage::WriteBatch::new();
        LogStore::conf_state_batch(&cs, &mut batch)?;
        let addr = std::str::from_utf8(&cc.context)
            .ok()
            .filter(|a| !a.is_empty());
        let mut added = Vec::new();
        let mut removed_ids = self.removed_ids.borrow().clone();
        for change in cc.get_changes() {
            let id = change.node_id;
            match change.get_change_type() {
                ConfChangeType::AddNode | ConfChangeType::AddLearnerNode => {
                    state_machine::clear_removed(&mut batch, id);
                    removed_ids.retain(|r| *r != id);
                    if let Some(addr) = addr {
                        state_machine::record_member(&mut batch, id, addr);
                        added.push((id, addr.to_string()));
                    }
                }
                ConfChangeType::RemoveNode => {
                    state_machine::record_removed(&mut batch, id);
                    if let Err(at) = removed_ids.binary_search(&id) {
                        removed_ids.insert(at, id);
                    }
                }
            }
        }
        applier.commit_with(index, batch)?;
        self.raw.mut_store().conf_state_written(cs.clone());
        self.removed_ids.send_replace(removed_ids);
        for (id, addr) in added {
            self.sink.add_peer(id, addr);
        }
        let was_removed = self.removed;
        self.refresh_membership();
        if self.removed && !was_removed {
            tracing::warn!(
                index,
                "this node was removed from the cluster: it no longer serves requests"
            );
            if self.raw.raft.state == StateRole::Leader {
                // Leadership moved to this node after another proposed its removal: raft-rs would keep
                // it leading a group it is not in. Hand over to the most up-to-date voter.
                let me = self.raw.raft.id;
                let to = self
                    .raw
                    .raft
                    .prs()
                    .iter()
                    .filter(|(id, _)| **id != me && cs.voters.contains(id))
                    .max_by_key(|(_, pr)| pr.matched)
                    .map(|(id, _)| *id);
                if let Some(to) = to {
                    tracing::warn!(to, "removed while leading: transferring leadership");
                    self.transfer_leader(to);
                }
            }
        }
        tracing::info!(index, voters = ?cs.voters, learners = ?cs.learners, "membership changed");
        Ok(Ok(ApplyOutcome {
            index,
            ..ApplyOutcome::default()
        }))
    }

    /// Counts and logs a committed entry applied as a no-op.
    fn reject(&mut self, index: u64, why: &str) {
        self.rejected_entries += 1;
        tracing::warn!(
            index,
            reason = why,
            total = self.rejected_entries,
            "committed entry is invalid: applied as a no-op"
        );
    }

    /// Tells watchers that entries up to `to` are applied, with their changes when known.
    fn publish_changes(&mut self, to: u64, changes: Option<Vec<state_machine::Change>>) {
        if to <= self.published {
            return;
        }
        let published = state_machine::Published {
            from: self.published + 1,
            to,
            changes,
        };
        self.published = to;
        // No watcher listening is not an error.
        let _ = self.feed.send(Arc::new(published));
    }

    /// Applies committed entries: data writes of the whole run go in as few batches as possible (see
    /// [`state_machine::Applier`]), and proposers are answered only once their write is in storage.
    fn apply(&mut self, entries: Vec<Entry>) -> DriverResult {
        if entries.is_empty() {
            return Ok(());
        }
        if let Some(lease) = &self.lease {
            // Before any proposer is answered: a read from the lease then sees every acknowledged write.
            lease.committed(self.raw.raft.raft_log.committed);
        }
        let backend = Arc::clone(&self.backend);
        let mut applier = state_machine::Applier::new(&*backend);
        let mut answers = Vec::new();
        // `raft.apply` spans of traced proposals, closed once their writes are flushed.
        let mut applying = Vec::new();
        for entry in entries {
            let (index, term) = (entry.index, entry.term);
            if let Some(p) = self.proposals.get_mut(&index)
                && !p.trace.is_disabled()
            {
                // Committed: replication ends here, applying starts.
                p.replicate = tracing::Span::none();
                applying
                    .push(tracing::debug_span!(parent: &p.trace, "raft.apply", raft.index = index));
            }
            let outcome: Option<Result<ApplyOutcome, String>> = if index <= self.applied_on_disk {
                // Already in the data before this process started.
                None
            } else {
                match entry.get_entry_type() {
                    EntryType::EntryNormal if entry.data.is_empty() => {
                        applier.skip(index);
                        None
                    }
                    EntryType::EntryNormal => {
                        let cmd = RaftCommand::decode(entry.data.as_ref())
                            .map_err(|e| format!("the command does not decode: {e}"))
                            .and_then(|cmd| state_machine::validate(&cmd).map(|()| cmd));
                        match cmd {
                            Ok(cmd) => Some(Ok(applier.apply(index, &cmd)?)),
                            Err(why) => {
                                applier.skip(index);
                                Some(Err(why))
                            }
                        }
                    }
                    EntryType::EntryConfChange => {
                        // Kiwi proposes only V2 changes; a V1 entry is read as the equivalent V2.
                        match ConfChange::parse_from_bytes(&entry.data) {
                            Ok(v1) => {
                                let mut single = ConfChangeSingle::default();
                                single.set_change_type(v1.get_change_type());
                                single.node_id = v1.node_id;
                                let mut cc = ConfChangeV2::default();
                                cc.set_changes(vec![single].into());
                                cc.context = v1.context;
                                Some(self.apply_conf_change(&mut applier, &cc, index)?)
                            }
                            Err(e) => {
                                applier.skip(index);
                                Some(Err(format!("the membership change does not decode: {e}")))
                            }
                        }
                    }
                    EntryType::EntryConfChangeV2 => {
                        match ConfChangeV2::parse_from_bytes(&entry.data) {
                            Ok(cc) => Some(self.apply_conf_change(&mut applier, &cc, index)?),
                            Err(e) => {
                                applier.skip(index);
                                Some(Err(format!("the membership change does not decode: {e}")))
                            }
                        }
                    }
                }
            };
            if let Some(Err(why)) = &outcome {
                self.reject(index, why);
            }
            // Proposals at lower indexes can no longer be answered by their own entry.
            while let Some((&i, _)) = self.proposals.first_key_value() {
                if i >= index {
                    break;
                }
                let (_, p) = self.proposals.pop_first().expect("non-empty");
                self.metrics.proposal_answered(None, p.at.elapsed());
                answers.push((p.reply, Err(ProposeError::Dropped)));
            }
            if let Some(p) = self.proposals.remove(&index) {
                let result = match outcome {
                    Some(Ok(o)) if p.term == term => Ok(o),
                    Some(Err(why)) if p.term == term => Err(ProposeError::Rejected(why)),
                    _ => Err(ProposeError::Dropped),
                };
                let answered = match &result {
                    Ok(_) => Some(true),
                    Err(ProposeError::Rejected(_)) => Some(false),
                    Err(_) => None,
                };
                self.metrics.proposal_answered(answered, p.at.elapsed());
                answers.push((p.reply, result));
            }
            self.applied = index;
        }
        applier.flush()?;
        let changes = applier.take_changes();
        let changes = (state_machine::change_bytes(&changes) <= state_machine::FEED_MAX_BYTES)
            .then_some(changes);
        self.publish_changes(self.applied, changes);
        drop(applying);
        for (reply, result) in answers {
            let _ = reply.send(result);
        }
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

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

    use kiwi_proto::v1::{WriteBatchCommand, WriteOp, raft_command, write_op};
    use kiwi_storage::{
        BackendKind, KeySpace, KvPair, Limits, MemoryBackend, Scan, StorageSnapshot, WriteBatch,
        WriteOptions,
    };

    use super::*;

    /// A memory backend whose writes start failing (or panicking) on demand (a dying disk).
    struct FailingBackend {
        inner: MemoryBackend,
        fail: AtomicBool,
        panic: AtomicBool,
    }

    impl FailingBackend {
        fn new() -> Arc<Self> {
            Arc::new(FailingBackend {
                inner: MemoryBackend::new(Limits::CEILING),
                fail: AtomicBool::new(false),
                panic: AtomicBool::new(false),
            })
        }
    }

    fn test_config(threshold: u64, slack: u64) -> DriverConfig {
        DriverConfig {
            node_id: 1,
            tick_interval: Duration::from_millis(5),
            election_ticks: 10,
            heartbeat_ticks: 2,
            compaction_threshold: threshold,
            compaction_slack: slack,
            lease_reads: false,
            metrics: MetricsSettings {
                enabled: true,
                collection_interval: Duration::from_millis(10),
                retention_period: Duration::from_secs(10),
            },
            metrics_export: RaftExport::noop(),
        }
    }

    /// A driver over `backend` (bootstrapped as a single voter the first time), elected leader.
    async fn start_single(
        backend: &Arc<dyn StorageBackend>,
        config: &DriverConfig,
        learners: &[u64],
    ) -> (
        DriverHandle,
        JoinHandle<()>,
        CancellationToken,
        CancellationToken,
    ) {
        let mut store = LogStore::in_backend(Arc::clone(backend), Arc::default()).unwrap();
        if !store.is_initialized() {
            store.bootstrap(vec![1]).unwrap();
            if !learners.is_empty() {
                let cs = raft::eraftpb::ConfState {
                    voters: vec![1],
                    learners: learners.to_vec(),
                    ..Default::default()
                };
                let mut batch = WriteBatch::new();
                LogStore::conf_state_batch(&cs, &mut batch).unwrap();
                backend.batch_write(batch, WriteOptions::SYNC).unwrap();
                store = LogStore::in_backend(Arc::clone(backend), Arc::default()).unwrap();
            }
        }
        let (stop, fatal) = (CancellationToken::new(), CancellationToken::new());
        let (handle, thread) = spawn(
            config,
            store,
            Arc::clone(backend),
            Arc::new(NoPeers),
            Arc::default(),
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
        (handle, thread, stop, fatal)
    }

    #[tokio::test]
    async fn single_voter_restarts_after_log_compaction() {
        // With one voter every commit advances in the light Ready; the stored commit index must still
        // never fall behind the compacted log start (raft-rs panics on restart otherwise). The same
        // with a learner beside the voter.
        for learners in [vec![], vec![2]] {
            let backend: Arc<dyn StorageBackend> = Arc::new(MemoryBackend::new(Limits::CEILING));
            let config = test_config(100, 0);
            let (handle, thread, stop, _) = start_single(&backend, &config, &learners).await;
            for i in 0..150 {
                handle.propose(put(&format!("k{i}"))).await.unwrap();
            }
            assert!(
                handle.status().first_index > 100,
                "the log was compacted: {:?}",
                handle.status()
            );
            stop.cancel();
            thread.join().unwrap();

            let store = LogStore::in_backend(Arc::clone(&backend), Arc::default()).unwrap();
            let hs = raft::Storage::initial_state(&store).unwrap().hard_state;
            assert!(
                hs.commit >= store.truncated_index(),
                "stored commit {} behind the log start {} (learners {learners:?})",
                hs.commit,
                store.truncated_index()
            );
            let (handle, thread, stop, fatal) = start_single(&backend, &config, &learners).await;
            handle.propose(put("after-restart")).await.unwrap();
            assert!(!fatal.is_cancelled());
            stop.cancel();
            thread.join().unwrap();
        }
    }

    /// An in-process network between drivers: messages go straight to their destination's handle, except
    /// those the current filter drops.
    #[derive(Default)]
    struct Net {
        handles: std::sync::Mutex<HashMap<u64, DriverHandle>>,
        drop_append_responses: AtomicBool,
        /// A node cut off from the others (0: none).
        isolated: AtomicU64,
        /// From the first `MsgTimeoutNow` to this node on, messages to it are held (in order) instead of
        /// delivered, until `release` (0: none).
        hold_from_timeout_now_to: AtomicU64,
        holding: AtomicBool,
        held: std::sync::Mutex<Vec<Message>>,
        /// Messages to this node are dropped (0: none).
        cut_to: AtomicU64,
        /// Heartbeat responses (which answer ReadIndex rounds) are dropped.
        drop_heartbeat_responses: AtomicBool,
        /// A driver that sends messages blocks in the sink while this is set (its thread stalls).
        stall_senders: AtomicBool,
    }

    impl Net {
        /// Delivers the held messages in order and stops holding.
        fn release(&self) {
            self.hold_from_timeout_now_to.store(0, Ordering::SeqCst);
            self.holding.store(false, Ordering::SeqCst);
            let held = std::mem::take(&mut *self.held.lock().unwrap());
            let handles = self.handles.lock().unwrap();
            for m in held {
                if let Some(h) = handles.get(&m.to) {
                    h.step(m);
                }
            }
        }
    }

    struct NetSink(Arc<Net>);

    impl MessageSink for NetSink {
        fn send(&self, msgs: Vec<Message>) -> Vec<u64> {
            while self.0.stall_senders.load(Ordering::SeqCst) {
                std::thread::sleep(Duration::from_millis(1));
            }
            let handles = self.0.handles.lock().unwrap();
            for m in msgs {
                if self.0.drop_append_responses.load(Ordering::SeqCst)
                    && m.get_msg_type() == MessageType::MsgAppendResponse
                {
                    continue;
                }
                let isolated = self.0.isolated.load(Ordering::SeqCst);
                if isolated != 0 && (m.to == isolated || m.from == isolated) {
                    continue;
                }
                if m.to == self.0.cut_to.load(Ordering::SeqCst) {
                    continue;
                }
                if self.0.drop_heartbeat_responses.load(Ordering::SeqCst)
                    && m.get_msg_type() == MessageType::MsgHeartbeatResponse
                {
                    continue;
                }
                if m.to == self.0.hold_from_timeout_now_to.load(Ordering::SeqCst) {
                    if m.get_msg_type() == MessageType::MsgTimeoutNow {
                        self.0.holding.store(true, Ordering::SeqCst);
                    }
                    if self.0.holding.load(Ordering::SeqCst) {
                        self.0.held.lock().unwrap().push(m);
                        continue;
                    }
                }
                if let Some(h) = handles.get(&m.to) {
                    h.step(m);
                }
            }
            Vec::new()
        }
        fn add_peer(&self, _id: u64, _addr: String) {}
    }

    /// Three drivers over `net`, with `config` (each its own id).
    fn start_three(
        net: &Arc<Net>,
        config: &DriverConfig,
    ) -> Vec<(DriverHandle, JoinHandle<()>, CancellationToken)> {
        start_three_each(net, [config.clone(), config.clone(), config.clone()])
    }

    /// Three drivers over `net`, node `i + 1` with `configs[i]`.
    fn start_three_each(
        net: &Arc<Net>,
        configs: [DriverConfig; 3],
    ) -> Vec<(DriverHandle, JoinHandle<()>, CancellationToken)> {
        let mut nodes = Vec::new();
        let mut settings = Vec::new();
        for (id, config) in (1..=3).zip(configs) {
            let backend: Arc<dyn StorageBackend> = Arc::new(MemoryBackend::new(Limits::CEILING));
            let mut store = LogStore::in_backend(Arc::clone(&backend), Arc::default()).unwrap();
            store.bootstrap(vec![1, 2, 3]).unwrap();
            let (stop, fatal) = (CancellationToken::new(), CancellationToken::new());
            let config = DriverConfig {
                node_id: id,
                ..config
            };
            let (handle, thread) = spawn(
                &config,
                store,
                backend,
                Arc::new(NetSink(Arc::clone(net))),
                Arc::default(),
                stop.clone(),
                fatal,
            )
            .unwrap();
            net.handles.lock().unwrap().insert(id, handle.clone());
            settings.push(config.lease_settings());
            nodes.push((handle, thread, stop));
        }
        // What the transport reports from each peer's batches.
        for (i, (h, ..)) in nodes.iter().enumerate() {
            for (j, s) in settings.iter().enumerate() {
                if i != j {
                    h.peer_event(PeerEvent::LeaseSettings {
                        peer: j as u64 + 1,
                        settings: *s,
                    });
                }
            }
        }
        nodes
    }

    /// Stops the drivers [`start_three`] started and waits for their threads.
    fn stop_all(nodes: Vec<(DriverHandle, JoinHandle<()>, CancellationToken)>) {
        for (_, thread, stop) in nodes {
            stop.cancel();
            thread.join().unwrap();
        }
    }

    /// The driver among `nodes` that leads, once one does.
    async fn leader_of(
        nodes: &[(DriverHandle, JoinHandle<()>, CancellationToken)],
    ) -> DriverHandle {
        tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                if let Some((h, ..)) = nodes.iter().find(|(h, ..)| h.status().role == Role::Leader)
                {
                    return h.clone();
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
        .await
        .expect("a leader")
    }

    /// A test config with lease reads on, `tick` and 40 election ticks (a lease of 38 ticks less 10 %).
    fn lease_config(tick: Duration) -> DriverConfig {
        DriverConfig {
            tick_interval: tick,
            election_ticks: 40,
            lease_reads: true,
            ..test_config(1000, 0)
        }
    }

    /// ReadIndex rounds `h` has completed.
    async fn read_rounds(h: &DriverHandle) -> u64 {
        h.raft_metrics(false)
            .await
            .unwrap()
            .unwrap()
            .metrics
            .read_index
            .count
    }

    #[tokio::test]
    async fn with_lease_reads_a_started_node_ignores_vote_requests_for_an_election_timeout() {
        for lease_reads in [false, true] {
            let net = Arc::new(Net::default());
            // 40 ticks of 50 ms: nobody campaigns, and the hold-off lasts, for the first 2 s.
            let config = DriverConfig {
                tick_interval: Duration::from_millis(50),
                election_ticks: 40,
                lease_reads,
                ..test_config(1000, 0)
            };
            let nodes = start_three(&net, &config);
            let node = &nodes[0].0;
            let mut vote = Message::default();
            vote.set_msg_type(MessageType::MsgRequestVote);
            vote.from = 2;
            vote.to = 1;
            vote.term = 5;
            node.step(vote);
            // Handled after the vote request (one inbox, in order).
            let term = node.detailed_status().await.unwrap().status.term;
            if lease_reads {
                assert!(
                    term < 5,
                    "a just-started node took the vote request's term {term}"
                );
            } else {
                assert_eq!(term, 5, "without lease reads the request is stepped");
            }
            stop_all(nodes);
        }
    }

    #[tokio::test]
    async fn with_lease_reads_a_read_under_the_lease_needs_no_turn_of_the_driver() {
        let net = Arc::new(Net::default());
        // 40 ticks of 50 ms: a 1.71 s lease, and nobody campaigns for 2 s without heartbeats.
        let config = lease_config(Duration::from_millis(50));
        let nodes = start_three(&net, &config);
        let leader = leader_of(&nodes).await;
        leader.propose(put("k")).await.unwrap();
        let index = leader.read_index().await.unwrap();
        // Every driver stalls at its next send (the leader's is at most a heartbeat away): the driver
        // answers nothing, a read under the lease still is.
        net.stall_senders.store(true, Ordering::SeqCst);
        let deadline = Instant::now() + Duration::from_secs(1);
        while tokio::time::timeout(Duration::from_millis(20), leader.detailed_status())
            .await
            .is_ok()
        {
            assert!(
                Instant::now() < deadline,
                "the leader's driver never stalled"
            );
        }
        for _ in 0..10 {
            let read = tokio::time::timeout(Duration::from_millis(100), leader.read_index())
                .await
                .expect("answered while the driver stalls")
                .unwrap();
            assert!(read >= index, "at the commit index: {read} < {index}");
        }
        net.stall_senders.store(false, Ordering::SeqCst);
        stop_all(nodes);
    }

    #[tokio::test]
    async fn with_lease_reads_a_membership_change_ends_the_lease() {
        let net = Arc::new(Net::default());
        // 25 ms ticks and 40 election ticks: an 855 ms lease, renewed after half of it, far longer than
        // the reads below take.
        let config = lease_config(Duration::from_millis(25));
        let nodes = start_three(&net, &config);
        let leader = leader_of(&nodes).await;
        leader.propose(put("k")).await.unwrap();
        leader.read_index().await.unwrap();
        let before = read_rounds(&leader).await;
        leader.read_index().await.unwrap();
        assert!(
            read_rounds(&leader).await <= before + 1,
            "served from the lease (a round may renew it)"
        );
        let mut single = ConfChangeSingle::default();
        single.set_change_type(ConfChangeType::AddLearnerNode);
        single.node_id = 4;
        let mut cc = ConfChangeV2::default();
        cc.set_changes(vec![single].into());
        cc.context = b"127.0.0.1:1".to_vec().into();
        leader.change_membership(cc).await.unwrap();
        let applied = read_rounds(&leader).await;
        leader.read_index().await.unwrap();
        assert!(
            read_rounds(&leader).await > applied,
            "a membership change ends the lease: the next read takes a round"
        );
        stop_all(nodes);
    }

    #[tokio::test]
    async fn with_lease_reads_a_transfer_in_progress_ends_the_lease() {
        let net = Arc::new(Net::default());
        // 50 ms ticks: a 360 ms lease, and a transfer that waits 500 ms before it gives up.
        let config = DriverConfig {
            tick_interval: Duration::from_millis(50),
            lease_reads: true,
            ..test_config(1000, 0)
        };
        let nodes = start_three(&net, &config);
        let leader = leader_of(&nodes).await;
        leader.propose(put("k")).await.unwrap();
        let rounds = || read_rounds(&leader);
        leader.read_index().await.unwrap();
        let before = rounds().await;
        for _ in 0..5 {
            leader.read_index().await.unwrap();
        }
        assert!(
            rounds().await <= before + 1,
            "reads under the lease need no round (one may renew it)"
        );
        // A transfer to a node that hears nothing stays in progress; its target could be elected at any
        // moment, so every read needs a round, and those rounds give no lease either.
        let leader_id = leader.status().leader_id;
        let target = (1..=3).find(|id| *id != leader_id).unwrap();
        net.isolated.store(target, Ordering::SeqCst);
        // raft-rs drops proposals while a transfer is in progress, which tells the test it still is after
        // the reads: it gives up at the leader's next election timeout, which may fall among the reads,
        // and then they are done again.
        for attempt in 1.. {
            assert!(
                attempt <= 20,
                "the transfer never stayed in progress for 5 reads"
            );
            leader.transfer_leader(target).unwrap();
            // Reads are answered from the published lease without the driver: wait until it has taken
            // the transfer (and withdrawn the lease), or the reads may come before it.
            let deadline = Instant::now() + Duration::from_secs(5);
            while leader.status().transferring_to != target {
                assert!(Instant::now() < deadline, "the transfer never started");
                tokio::task::yield_now().await;
            }
            let before = rounds().await;
            for _ in 0..5 {
                leader.read_index().await.unwrap();
            }
            let after = rounds().await;
            if matches!(leader.propose(put("t")).await, Err(ProposeError::Dropped)) {
                // (A renewal round that was in flight when the transfer started may add one.)
                assert!(
                    after >= before + 5,
                    "one round per read while the transfer is in progress: {} for 5",
                    after - before
                );
                break;
            }
        }
        stop_all(nodes);
    }

    /// raft-rs acts on a `MsgTimeoutNow` whenever it arrives in the same term, even after the leader gave
    /// the transfer up. The old target gets it late, is elected by a follower that confirmed the old
    /// leader's lease, and commits; the old leader, cut off from it, must not answer from a lease.
    #[tokio::test]
    async fn with_lease_reads_a_stale_timeout_now_after_an_aborted_transfer_gives_no_stale_read() {
        let net = Arc::new(Net::default());
        // 40 ticks of 50 ms: a 1.71 s lease. The leader gives a transfer up within one election
        // timeout, before the held target's own timer (at least one election timeout since it last
        // heard from the leader) runs out.
        let config = lease_config(Duration::from_millis(50));
        let nodes = start_three(&net, &config);
        let leader = leader_of(&nodes).await;
        let old = leader.status().leader_id;
        leader.propose(put("k")).await.unwrap();
        let target_id = (1..=3).find(|id| *id != old).unwrap();
        let target = nodes[target_id as usize - 1].0.clone();
        // Wait until the target has the whole log: raft-rs then sends MsgTimeoutNow at once, and the
        // target's late campaign can win (nothing is written below until it does).
        tokio::time::timeout(Duration::from_secs(10), async {
            while target.status().applied < leader.status().commit {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
        .await
        .expect("the target caught up");
        net.hold_from_timeout_now_to
            .store(target_id, Ordering::SeqCst);
        leader.transfer_leader(target_id).unwrap();
        let mut watch = leader.watch();
        tokio::time::timeout(
            Duration::from_secs(10),
            watch.wait_for(|s| s.transferring_to == target_id),
        )
        .await
        .expect("the transfer started")
        .unwrap();
        tokio::time::timeout(
            Duration::from_secs(10),
            watch.wait_for(|s| s.transferring_to == 0),
        )
        .await
        .expect("the transfer gave up")
        .unwrap();
        assert_eq!(leader.status().leader_id, old, "still the leader");
        assert!(
            net.held
                .lock()
                .unwrap()
                .iter()
                .any(|m| m.get_msg_type() == MessageType::MsgTimeoutNow),
            "the MsgTimeoutNow is held"
        );
        // Reads confirmed by the third node alone (the target hears nothing): without the fence they
        // give a lease.
        for _ in 0..5 {
            leader.read_index().await.unwrap();
        }
        // The held messages arrive; the target is elected with the third node and commits, and the old
        // leader hears nothing of it.
        net.cut_to.store(old, Ordering::SeqCst);
        net.release();
        let mut watch = target.watch();
        tokio::time::timeout(
            Duration::from_secs(10),
            watch.wait_for(|s| s.role == Role::Leader),
        )
        .await
        .expect("the late MsgTimeoutNow elects the target")
        .unwrap();
        let committed = target.propose(put("new")).await.unwrap().index;
        let stale = tokio::time::timeout(Duration::from_millis(500), leader.read_index()).await;
        assert!(
            !matches!(stale, Ok(Ok(index)) if index < committed),
            "the old leader answered a read at index {stale:?} after the new one committed {committed}"
        );
        stop_all(nodes);
    }

    /// A lease is computed from the leader's tick and election ticks, the silence it relies on from each
    /// follower's; a follower with a faster tick (or without lease reads, so without the hold-off after a
    /// restart) breaks the bound. With mixed settings every read takes a round.
    #[tokio::test]
    async fn with_lease_reads_voters_with_other_settings_give_no_lease() {
        let config = |tick_ms, lease_reads| DriverConfig {
            tick_interval: Duration::from_millis(tick_ms),
            lease_reads,
            ..test_config(1000, 0)
        };
        for (third, what) in [
            (config(25, true), "a faster tick"),
            (config(50, false), "lease reads off"),
            (config(50, true), "the same settings"),
        ] {
            let net = Arc::new(Net::default());
            let nodes = start_three_each(&net, [config(50, true), config(50, true), third]);
            let leader = leader_of(&nodes).await;
            leader.propose(put("k")).await.unwrap();
            leader.read_index().await.unwrap();
            let before = read_rounds(&leader).await;
            for _ in 0..5 {
                leader.read_index().await.unwrap();
            }
            let rounds = read_rounds(&leader).await - before;
            if what == "the same settings" {
                assert!(
                    rounds <= 1,
                    "{what}: reads under the lease ({rounds} rounds)"
                );
            } else {
                assert_eq!(rounds, 5, "{what}: one round per read");
            }
            stop_all(nodes);
        }
    }

    /// One ReadIndex round in flight at a time: reads that arrive while a round waits for its quorum share
    /// the next round, started as soon as that one is answered, instead of a round each.
    #[tokio::test]
    async fn reads_arriving_during_a_round_share_the_next_round() {
        let net = Arc::new(Net::default());
        // A long election timeout: the leader keeps leading while heartbeat responses are dropped.
        let config = DriverConfig {
            election_ticks: 200,
            heartbeat_ticks: 2,
            ..test_config(1000, 0)
        };
        let nodes = start_three(&net, &config);
        let leader = leader_of(&nodes).await;
        leader.propose(put("k")).await.unwrap();
        leader.read_index().await.unwrap();
        let before = read_rounds(&leader).await;
        net.drop_heartbeat_responses.store(true, Ordering::SeqCst);
        let mut reads = Vec::new();
        for _ in 0..10 {
            let h = leader.clone();
            reads.push(tokio::spawn(async move { h.read_index().await }));
            // The read is sent before the status request, which is answered after the turn that took
            // the read: each read reaches the leader in a turn of its own.
            tokio::task::yield_now().await;
            leader.detailed_status().await.unwrap();
        }
        assert!(
            reads.iter().all(|r| !r.is_finished()),
            "no round can be answered without heartbeat responses"
        );
        net.drop_heartbeat_responses.store(false, Ordering::SeqCst);
        for r in reads {
            tokio::time::timeout(Duration::from_secs(10), r)
                .await
                .expect("every read is answered")
                .unwrap()
                .unwrap();
        }
        assert_eq!(
            read_rounds(&leader).await - before,
            2,
            "the first read's round, then one for the nine that came while it ran"
        );
        stop_all(nodes);
    }

    #[tokio::test]
    async fn a_read_on_a_new_leader_waits_for_its_first_commit_instead_of_being_lost() {
        let net = Arc::new(Net::default());
        let nodes = start_three(&net, &test_config(1000, 0));
        let leader = async {
            loop {
                if let Some((h, ..)) = nodes.iter().find(|(h, ..)| h.status().role == Role::Leader)
                {
                    return h.clone();
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        };
        let old = tokio::time::timeout(Duration::from_secs(10), leader)
            .await
            .expect("a leader");
        old.propose(put("k")).await.unwrap();
        // A new leader is elected, but no append response reaches it: its first entry stays
        // uncommitted (raft-rs drops read requests until that entry commits).
        let old_id = nodes
            .iter()
            .position(|(h, ..)| h.status().role == Role::Leader)
            .unwrap() as u64
            + 1;
        let new_id = if old_id == 1 { 2 } else { 1 };
        let new = nodes[new_id as usize - 1].0.clone();
        tokio::time::timeout(Duration::from_secs(10), async {
            while old
                .detailed_status()
                .await
                .unwrap()
                .peers
                .iter()
                .any(|p| p.id == new_id && p.match_index < old.status().commit)
            {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
        .await
        .expect("the follower caught up");
        net.drop_append_responses.store(true, Ordering::SeqCst);
        old.transfer_leader(new_id).unwrap();
        let mut watch = new.watch();
        tokio::time::timeout(
            Duration::from_secs(10),
            watch.wait_for(|s| s.role == Role::Leader),
        )
        .await
        .expect("the transfer elects the new leader")
        .unwrap();
        let read = {
            let new = new.clone();
            tokio::spawn(async move { new.read_index().await })
        };
        // The status request is handled after the read: the read has reached the new leader.
        new.detailed_status().await.unwrap();
        assert!(!read.is_finished(), "nothing can commit yet");
        net.drop_append_responses.store(false, Ordering::SeqCst);
        let index = tokio::time::timeout(Duration::from_secs(10), read)
            .await
            .expect("the read is answered once the new leader commits, not lost")
            .unwrap()
            .unwrap();
        assert!(index >= old.status().commit, "read index {index}");
        stop_all(nodes);
    }

    #[tokio::test]
    async fn with_lease_reads_reads_after_a_confirmed_round_need_no_round() {
        for lease_reads in [false, true] {
            let backend: Arc<dyn StorageBackend> = Arc::new(MemoryBackend::new(Limits::CEILING));
            // 50 ms ticks: a 360 ms lease, far longer than the reads below take.
            let config = DriverConfig {
                tick_interval: Duration::from_millis(50),
                lease_reads,
                ..test_config(1000, 0)
            };
            let (handle, thread, stop, _) = start_single(&backend, &config, &[]).await;
            for i in 0..100 {
                let written = handle.propose(put(&format!("k{i}"))).await.unwrap().index;
                let read = handle.read_index().await.unwrap();
                assert!(
                    read >= written,
                    "read index {read} before the write at {written}"
                );
            }
            let m = handle.raft_metrics(false).await.unwrap().unwrap().metrics;
            if lease_reads {
                assert!(
                    (1..10).contains(&m.read_index.count),
                    "{} ReadIndex rounds for 100 reads under a lease",
                    m.read_index.count
                );
            } else {
                assert_eq!(
                    m.read_index.count, 100,
                    "one round per read without a lease"
                );
            }
            stop.cancel();
            thread.join().unwrap();
        }
    }

    #[tokio::test]
    async fn metrics_record_proposals_fsyncs_and_history() {
        let backend: Arc<dyn StorageBackend> = Arc::new(MemoryBackend::new(Limits::CEILING));
        let (handle, thread, stop, _) = start_single(&backend, &test_config(1000, 0), &[]).await;
        for i in 0..20 {
            handle.propose(put(&format!("k{i}"))).await.unwrap();
        }
        handle.read_index().await.unwrap();
        let _ = handle.propose(vec![0xff, 0x01]).await;
        // Samples are taken every 10 ms: wait (with a deadline) for a few.
        let deadline = Instant::now() + Duration::from_secs(10);
        let report = loop {
            let r = handle
                .raft_metrics(true)
                .await
                .unwrap()
                .expect("metrics on");
            if r.metrics.history.len() >= 3
                && r.metrics.history.last().is_some_and(|h| h.commit >= 22)
            {
                break r;
            }
            assert!(Instant::now() < deadline, "no history: {r:?}");
            tokio::time::sleep(Duration::from_millis(10)).await;
        };
        let m = &report.metrics;
        assert_eq!(m.proposals_committed, 20);
        assert_eq!(m.proposals_rejected, 1);
        assert_eq!(m.propose_to_apply.count, 20);
        assert_eq!(m.read_index.count, 1);
        assert!(m.log_fsync.count >= 1 && m.log_fsync_entries >= 21, "{m:?}");
        assert!(m.ready_handling.count >= 1);
        assert!(m.elections >= 1, "the node campaigned: {m:?}");
        assert!(m.followers.is_empty(), "a single voter has no followers");
        assert_eq!(report.status.role, Role::Leader);
        assert!(report.last_index >= report.status.commit);
        let last = m.history.last().unwrap();
        assert_eq!(last.role, kiwi_proto::v1::RaftRole::Leader);
        stop.cancel();
        thread.join().unwrap();
    }

    #[tokio::test]
    async fn invalid_committed_entries_are_applied_as_no_ops() {
        let backend: Arc<dyn StorageBackend> = Arc::new(MemoryBackend::new(Limits::CEILING));
        let (handle, thread, stop, fatal) =
            start_single(&backend, &test_config(1000, 0), &[]).await;
        let garbage = handle.propose(vec![0xff, 0xff, 0xff, 0x01]).await;
        assert!(
            matches!(&garbage, Err(ProposeError::Rejected(why)) if why.contains("decode")),
            "{garbage:?}"
        );
        let huge_key = "k".repeat(kiwi_storage::MAX_KEY_BYTES_CEILING + 1);
        let huge = handle.propose(put(&huge_key)).await;
        assert!(
            matches!(&huge, Err(ProposeError::Rejected(why)) if why.contains("ceiling")),
            "{huge:?}"
        );
        let empty_cmd = RaftCommand {
            request_id: "no-command".into(),
            command: None,
        }
        .encode_to_vec();
        let empty = handle.propose(empty_cmd).await;
        assert!(matches!(empty, Err(ProposeError::Rejected(_))), "{empty:?}");
        // The node goes on: the next command applies, after the rejected ones.
        let ok = handle.propose(put("fine")).await.unwrap();
        assert_eq!(state_machine::applied_index(&*backend).unwrap(), ok.index);
        assert_eq!(handle.status().rejected_entries, 3);
        let stored = backend.read(KeySpace::Data, b"fine").unwrap().unwrap();
        assert_eq!(crate::raft::mvcc::decode_stored(&stored).1, b"v");
        assert!(!fatal.is_cancelled(), "an invalid entry is never fatal");
        stop.cancel();
        thread.join().unwrap();
    }

    #[tokio::test]
    async fn compaction_keeps_the_slack_behind_the_applied_index() {
        let backend: Arc<dyn StorageBackend> = Arc::new(MemoryBackend::new(Limits::CEILING));
        let (handle, thread, stop, _) = start_single(&backend, &test_config(10, 50), &[]).await;
        for i in 0..200 {
            handle.propose(put(&format!("k{i}"))).await.unwrap();
        }
        let st = handle.status();
        assert!(st.first_index > 1, "compacted at all: {st:?}");
        assert!(
            st.applied - (st.first_index - 1) >= 50,
            "at least the slack of 50 applied entries stays in the log: {st:?}"
        );
        stop.cancel();
        thread.join().unwrap();
    }

    #[tokio::test]
    async fn a_panic_in_the_driver_stops_the_node() {
        let backend = FailingBackend::new();
        let dyn_backend: Arc<dyn StorageBackend> = backend.clone();
        let (handle, thread, _stop, fatal) =
            start_single(&dyn_backend, &test_config(1000, 0), &[]).await;
        handle.propose(put("a")).await.unwrap();
        backend.panic.store(true, Ordering::SeqCst);
        let res = tokio::time::timeout(Duration::from_secs(10), handle.propose(put("b")))
            .await
            .expect("the caller is answered, not left waiting");
        assert_eq!(res, Err(ProposeError::StoppedAfterSubmit));
        tokio::time::timeout(Duration::from_secs(10), fatal.cancelled())
            .await
            .expect("a panic on the driver thread is reported as a failure (no zombie)");
        thread.join().unwrap();
        assert_eq!(handle.propose(put("c")).await, Err(ProposeError::Stopped));
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
            assert!(
                !self.panic.load(Ordering::SeqCst),
                "injected panic in the storage engine"
            );
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

    fn put(key: &str) -> Vec<u8> {
        RaftCommand {
            request_id: String::new(),
            command: Some(raft_command::Command::Write(WriteBatchCommand {
                ops: vec![WriteOp {
                    op: Some(write_op::Op::Put(write_op::Put {
                        key: key.as_bytes().to_vec(),
                        value: b"v".to_vec(),
                        lease: 0,
                    })),
                }],
            })),
        }
        .encode_to_vec()
    }

    #[tokio::test]
    async fn a_storage_error_stops_the_driver_without_acknowledging() {
        let backend = FailingBackend::new();
        let dyn_backend: Arc<dyn StorageBackend> = backend.clone();
        let mut store = LogStore::in_backend(Arc::clone(&dyn_backend), Arc::default()).unwrap();
        store.bootstrap(vec![1]).unwrap();
        let config = DriverConfig {
            node_id: 1,
            tick_interval: Duration::from_millis(5),
            election_ticks: 10,
            heartbeat_ticks: 2,
            compaction_threshold: 1000,
            compaction_slack: 0,
            lease_reads: false,
            metrics: MetricsSettings {
                enabled: true,
                collection_interval: Duration::from_millis(10),
                retention_period: Duration::from_secs(10),
            },
            metrics_export: RaftExport::noop(),
        };
        let (stop, fatal) = (CancellationToken::new(), CancellationToken::new());
        let (handle, thread) = spawn(
            &config,
            store,
            Arc::clone(&dyn_backend),
            Arc::new(NoPeers),
            Arc::default(),
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
        assert_eq!(res, Err(ProposeError::StoppedAfterSubmit));
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
