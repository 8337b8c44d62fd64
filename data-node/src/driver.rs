//! The Raft driver: the one owner of `raft::RawNode`.
//!
//! It runs on its own OS thread (every storage call it makes blocks). Everything else talks to it through
//! a bounded channel ([`DriverHandle`]) and gets answers on oneshots; its public state (role, term,
//! leader, commit and applied index) is published on a `watch` channel.
//!
//! # The Ready contract
//!
//! Each turn of the loop collects every proposal and peer message that arrived while the previous Ready
//! was handled (group commit), ticks when due, then handles one Ready in this order:
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
use raft::eraftpb::{ConfChange, ConfChangeV2, Entry, EntryType, Message};
use raft::{RawNode, StateRole};
use tokio::sync::{oneshot, watch};
use tokio_util::sync::CancellationToken;

use crate::log_store::LogStore;
use crate::state_machine::{self, ApplyOutcome};

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
    /// The driver's inbox is full.
    #[error("Raft driver overloaded")]
    Overloaded,
    /// The driver has stopped (shutdown or a storage error).
    #[error("Raft driver stopped")]
    Stopped,
}

/// The driver's public state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct RaftStatus {
    pub role: Role,
    pub term: u64,
    pub leader_id: u64,
    pub commit: u64,
    pub applied: u64,
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
}

/// Where the driver sends messages for other nodes. Must never block.
pub trait MessageSink: Send + Sync + 'static {
    /// Queues `msgs` for their destinations; returns the ids of peers whose queue was full (the driver
    /// reports them unreachable).
    fn send(&self, msgs: Vec<Message>) -> Vec<u64>;
}

enum Inbox {
    Propose {
        data: Vec<u8>,
        reply: oneshot::Sender<Result<ApplyOutcome, ProposeError>>,
    },
    ReadIndex {
        reply: oneshot::Sender<Result<u64, ProposeError>>,
    },
    Step(Message),
    Unreachable(u64),
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

    /// Tells Raft that sending to `peer` failed.
    pub fn report_unreachable(&self, peer: u64) {
        let _ = self.send(Inbox::Unreachable(peer));
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
    reads: HashMap<u64, oneshot::Sender<Result<u64, ProposeError>>>,
    next_read: u64,
    status: watch::Sender<RaftStatus>,
    applied: u64,
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
        next_read: 1,
        status: status_tx,
        applied: cfg.applied,
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
    fn run(&mut self, rx: Receiver<Inbox>, tick: Duration, stop: &CancellationToken) -> DriverResult {
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
            if Instant::now() >= next_tick {
                self.raw.tick();
                next_tick += tick;
                if next_tick < Instant::now() {
                    next_tick = Instant::now() + tick;
                }
            }
            self.on_ready()?;
        }
        Ok(())
    }

    fn handle(&mut self, msg: Inbox) {
        match msg {
            Inbox::Propose { data, reply } => {
                if self.raw.raft.state != StateRole::Leader {
                    let _ = reply.send(Err(ProposeError::NotLeader {
                        leader_id: self.raw.raft.leader_id,
                    }));
                    return;
                }
                let before = self.raw.raft.raft_log.last_index();
                if self.raw.propose(Vec::new(), data).is_err() {
                    let _ = reply.send(Err(ProposeError::Dropped));
                    return;
                }
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
            Inbox::ReadIndex { reply } => {
                if self.raw.raft.state != StateRole::Leader {
                    let _ = reply.send(Err(ProposeError::NotLeader {
                        leader_id: self.raw.raft.leader_id,
                    }));
                    return;
                }
                let id = self.next_read;
                self.next_read += 1;
                self.reads.insert(id, reply);
                self.raw.read_index(id.to_be_bytes().to_vec());
            }
            Inbox::Step(m) => {
                let _ = self.raw.step(m);
            }
            Inbox::Unreachable(peer) => self.raw.report_unreachable(peer),
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
        DetailedStatus {
            status: self.public_status(),
            peers,
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
        }
    }

    fn publish(&mut self) {
        let now = self.public_status();
        if now.role != Role::Leader && !self.reads.is_empty() {
            let leader_id = now.leader_id;
            for (_, reply) in self.reads.drain() {
                let _ = reply.send(Err(ProposeError::NotLeader { leader_id }));
            }
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
            return Err("received a Raft snapshot, which this version cannot install".into());
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
            if let Some(reply) = id.ok().and_then(|id| self.reads.remove(&id)) {
                let _ = reply.send(Ok(rs.index));
            }
        }
        // 5.
        let mut light = self.raw.advance(rd);
        self.send(light.take_messages());
        self.apply(light.take_committed_entries())?;
        self.raw.advance_apply();
        self.publish();
        Ok(())
    }

    fn apply(&mut self, entries: Vec<Entry>) -> DriverResult {
        for entry in entries {
            let (index, term) = (entry.index, entry.term);
            let outcome = if index <= self.applied_on_disk {
                // Already in the data before this process started.
                None
            } else {
                match entry.get_entry_type() {
                    EntryType::EntryNormal if entry.data.is_empty() => {
                        state_machine::mark_applied(&*self.backend, index)?;
                        None
                    }
                    EntryType::EntryNormal => {
                        let cmd = RaftCommand::decode(entry.data.as_ref())?;
                        Some(state_machine::apply(&*self.backend, index, &cmd)?)
                    }
                    EntryType::EntryConfChange => {
                        let cc = ConfChange::parse_from_bytes(&entry.data)?;
                        let cs = self.raw.apply_conf_change(&cc)?;
                        self.raw.mut_store().set_conf_state(cs)?;
                        state_machine::mark_applied(&*self.backend, index)?;
                        None
                    }
                    EntryType::EntryConfChangeV2 => {
                        let cc = ConfChangeV2::parse_from_bytes(&entry.data)?;
                        let cs = self.raw.apply_conf_change(&cc)?;
                        self.raw.mut_store().set_conf_state(cs)?;
                        state_machine::mark_applied(&*self.backend, index)?;
                        None
                    }
                }
            };
            self.applied = index;
            // Proposals at lower indexes can no longer be answered by their own entry.
            while let Some((&i, _)) = self.proposals.first_key_value() {
                if i >= index {
                    break;
                }
                let (_, p) = self.proposals.pop_first().expect("non-empty");
                let _ = p.reply.send(Err(ProposeError::Dropped));
            }
            if let Some(p) = self.proposals.remove(&index) {
                let result = match outcome {
                    Some(o) if p.term == term => Ok(o),
                    _ => Err(ProposeError::Dropped),
                };
                let _ = p.reply.send(result);
            }
        }
        Ok(())
    }
}
