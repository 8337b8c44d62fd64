//! `RaftTransport` over gRPC: Raft messages between nodes, as raft-rs-encoded bytes, batched on one
//! long-lived stream per peer.
//!
//! Sending never blocks the driver: each peer has a bounded queue; when it is full the message is dropped
//! and the peer reported unreachable (Raft retries). A per-peer task connects, streams batches, and
//! reconnects with backoff when the stream breaks.
//!
//! Snapshots travel on their own `SendSnapshot` stream, one task per snapshot, so a large snapshot never
//! delays heartbeats: the task reads the pinned view chunk by chunk (see `snapshot.rs`) and reports the
//! outcome to Raft. The receiver stages chunks as they arrive and hands the snapshot message to the
//! driver only when the last one is staged.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use kiwi_proto::security::PeerTls;
use kiwi_proto::v1::raft_transport_client::RaftTransportClient;
use kiwi_proto::v1::raft_transport_server::RaftTransport;
use kiwi_proto::v1::{
    LeaseSettings, RaftMessageBatch, SendMessagesResponse, SendSnapshotResponse, SnapshotChunk,
};
use kiwi_storage::{StorageBackend, StorageSnapshot};
use protobuf::Message as _;
use raft::eraftpb::{Message, MessageType};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status, Streaming};

use crate::config::{record_client_addr, record_raft_addr};
use crate::fault::{FaultInjector, Verdict};
use crate::raft::driver::{DriverHandle, MessageSink, PeerEvent};
use crate::raft::guard::{self, Refusal};
use crate::raft::lease;
use crate::raft::log_store::{SnapshotRegistry, snapshot_id};
use crate::raft::snapshot;

/// Every member's record (see [`member_record`](crate::config::member_record)), shared by the transport, leader hints and status.
/// Updated when a membership change is applied.
#[derive(Debug, Default)]
pub struct Members(RwLock<HashMap<u64, String>>);

impl Members {
    pub fn new(initial: impl IntoIterator<Item = (u64, String)>) -> Self {
        Members(RwLock::new(initial.into_iter().collect()))
    }

    /// Member `id`'s client address.
    pub fn get(&self, id: u64) -> Option<String> {
        self.field(id, record_client_addr)
    }

    /// Where member `id` takes Raft traffic.
    pub fn raft_addr(&self, id: u64) -> Option<String> {
        self.field(id, record_raft_addr)
    }

    fn field(&self, id: u64, part: fn(&str) -> &str) -> Option<String> {
        self.0
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(&id)
            .map(|r| part(r).to_string())
    }

    pub fn insert(&self, id: u64, addr: String) {
        self.0
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(id, addr);
    }

    pub fn all(&self) -> Vec<(u64, String)> {
        let mut v: Vec<_> = self
            .0
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .iter()
            .map(|(k, v)| (*k, v.clone()))
            .collect();
        v.sort();
        v
    }
}

/// Metadata key set on the status a node answers a non-member's Raft stream with.
pub const NOT_MEMBER_METADATA: &str = "kiwi-not-member";

/// Messages queued per peer before new ones are dropped.
const PEER_QUEUE: usize = 4096;
/// Messages per batch on the wire.
const MAX_BATCH: usize = 256;
/// Bytes after which a batch of messages is sent without waiting for more.
const MAX_BATCH_BYTES: usize = 64 * 1024 * 1024;
/// Largest gRPC message between nodes.
pub const MAX_RAFT_MESSAGE_BYTES: usize = 256 * 1024 * 1024;

/// The sending side: one queue and one task per peer, plus one task per snapshot being sent.
pub struct Peers {
    self_id: u64,
    /// This node's cluster id (0 until a joining node adopts one), stamped on everything sent.
    cluster: Arc<AtomicU64>,
    queues: RwLock<HashMap<u64, mpsc::Sender<Message>>>,
    members: Arc<Members>,
    snapshots: Arc<SnapshotRegistry>,
    shutdown: CancellationToken,
    events: mpsc::UnboundedSender<PeerEvent>,
    runtime: tokio::runtime::Handle,
    faults: Arc<FaultInjector>,
    /// TLS to the peers (the cluster CA, this node's certificate), when `[security] ca_file` is set.
    tls: Option<Arc<PeerTls>>,
    lease: LeaseSettings,
}

impl Peers {
    /// Starts a sender task for every member but `self_id`. The tasks stop when `shutdown` is cancelled.
    /// Failures and snapshot outcomes are reported on `events` (the node forwards them to the driver,
    /// which is created after this sink). Must be called inside a tokio runtime.
    pub fn start(
        self_id: u64,
        cluster: Arc<AtomicU64>,
        members: Arc<Members>,
        snapshots: Arc<SnapshotRegistry>,
        shutdown: &CancellationToken,
        events: mpsc::UnboundedSender<PeerEvent>,
        link: PeerLink,
    ) -> Self {
        let PeerLink { faults, tls, lease } = link;
        let peers = Peers {
            self_id,
            cluster,
            queues: RwLock::new(HashMap::new()),
            members: Arc::clone(&members),
            snapshots,
            shutdown: shutdown.clone(),
            events,
            runtime: tokio::runtime::Handle::current(),
            faults,
            tls,
            lease: settings_to_wire(lease),
        };
        for (id, record) in members.all() {
            peers.connect(id, record_raft_addr(&record).to_string());
        }
        peers
    }

    fn connect(&self, id: u64, addr: String) {
        if id == self.self_id {
            return;
        }
        let mut queues = self
            .queues
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if queues.get(&id).is_some_and(|q| !q.is_closed()) {
            return;
        }
        let (tx, rx) = mpsc::channel(PEER_QUEUE);
        queues.insert(id, tx);
        self.runtime.spawn(peer_task(
            SenderContext {
                self_id: self.self_id,
                lease: self.lease,
                cluster: Arc::clone(&self.cluster),
                shutdown: self.shutdown.clone(),
                unreachable: self.events.clone(),
                faults: Arc::clone(&self.faults),
                tls: self.tls.clone(),
            },
            id,
            addr,
            rx,
        ));
    }

    fn send_snapshot(&self, msg: Message) {
        let to = msg.to;
        let view = snapshot_id(msg.get_snapshot()).and_then(|id| self.snapshots.take(id));
        let cut = self.faults.partitioned_from(to);
        let (Some(view), Some(addr), false) = (view, self.members.raft_addr(to), cut) else {
            tracing::warn!(
                to,
                cut,
                "snapshot for a peer with no pinned view, no address, or cut off by an injected \
                 partition; reporting failure"
            );
            let _ = self.events.send(PeerEvent::Snapshot {
                to,
                ok: false,
                took: std::time::Duration::ZERO,
            });
            return;
        };
        let events = self.events.clone();
        let self_id = self.self_id;
        let cluster = self.cluster.load(Ordering::Relaxed);
        let shutdown = self.shutdown.clone();
        let tls = self.tls.clone();
        self.runtime.spawn(async move {
            let index = msg.get_snapshot().get_metadata().index;
            tracing::info!(to, index, "sending a Raft snapshot");
            let started = std::time::Instant::now();
            let result = tokio::select! {
                _ = shutdown.cancelled() => return,
                r = stream_snapshot(self_id, cluster, to, addr, msg, view, tls) => r,
            };
            match result {
                Ok(pairs) => {
                    let took = started.elapsed();
                    tracing::info!(to, index, pairs, ?took, "snapshot sent");
                    let _ = events.send(PeerEvent::Snapshot { to, ok: true, took });
                }
                Err(e) => {
                    tracing::warn!(to, index, error = %e, "sending a snapshot failed");
                    let took = started.elapsed();
                    let _ = events.send(PeerEvent::Snapshot {
                        to,
                        ok: false,
                        took,
                    });
                    let _ = events.send(PeerEvent::Unreachable(to));
                }
            }
        });
    }
}

impl MessageSink for Peers {
    fn send(&self, msgs: Vec<Message>) -> Vec<u64> {
        let mut full = Vec::new();
        let queues = self
            .queues
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        for m in msgs {
            let to = m.to;
            if m.get_msg_type() == MessageType::MsgSnapshot {
                self.send_snapshot(m);
                continue;
            }
            if self.faults.message(to) == Verdict::Drop {
                continue;
            }
            match queues.get(&to) {
                Some(q) => {
                    if q.try_send(m).is_err() && !full.contains(&to) {
                        full.push(to);
                    }
                }
                None => tracing::warn!(to, "Raft message for an unknown peer dropped"),
            }
        }
        full
    }

    fn add_peer(&self, id: u64, record: String) {
        let raft = record_raft_addr(&record).to_string();
        self.members.insert(id, record);
        self.connect(id, raft);
    }
}

/// The endpoint of a peer: plain, or TLS with the cluster CA and this node's certificate; keepalive pings
/// close a half-open connection within seconds (see [`kiwi_proto::limits::client`]).
fn peer_endpoint(
    addr: &str,
    tls: Option<&Arc<PeerTls>>,
) -> Result<tonic::transport::Endpoint, tonic::transport::Error> {
    let endpoint = match tls {
        None => tonic::transport::Endpoint::from_shared(format!("http://{addr}"))?,
        // Read at every connection: a reloaded certificate is used from the next one on.
        Some(tls) => tonic::transport::Endpoint::from_shared(format!("https://{addr}"))?
            .tls_config(tls.get())?,
    };
    Ok(kiwi_proto::limits::client(
        endpoint,
        kiwi_proto::limits::PEER_KEEPALIVE,
    ))
}

/// Streams one snapshot: the first chunk carries the Raft message, every chunk up to [`snapshot::CHUNK_KEYS`]
/// pairs read from the pinned view on a blocking thread, two chunks in flight at most.
async fn stream_snapshot(
    self_id: u64,
    cluster_id: u64,
    to: u64,
    addr: String,
    msg: Message,
    view: Box<dyn StorageSnapshot>,
    tls: Option<Arc<PeerTls>>,
) -> Result<u64, Box<dyn std::error::Error + Send + Sync>> {
    let channel = peer_endpoint(&addr, tls.as_ref())?
        .connect_timeout(Duration::from_secs(2))
        .tcp_nodelay(true)
        .connect()
        .await?;
    let mut client =
        RaftTransportClient::new(channel).max_encoding_message_size(MAX_RAFT_MESSAGE_BYTES);
    let message = msg.write_to_bytes()?;
    let (tx, rx) = mpsc::channel::<SnapshotChunk>(2);
    let reader = tokio::task::spawn_blocking(move || -> Result<u64, String> {
        let mut after: Option<Vec<u8>> = None;
        let mut first = Some(message);
        let mut pairs = 0u64;
        loop {
            let kvs = snapshot::read_chunk(&*view, after.as_deref()).map_err(|e| e.to_string())?;
            let last = kvs.is_empty();
            if let Some(kv) = kvs.last() {
                after = Some(kv.key.clone());
            }
            pairs += kvs.len() as u64;
            let chunk = SnapshotChunk {
                cluster_id,
                from_node: self_id,
                to_node: to,
                message: first.take().unwrap_or_default(),
                kvs,
                last,
            };
            if tx.blocking_send(chunk).is_err() {
                return Err("the snapshot stream closed early".into());
            }
            if last {
                return Ok(pairs);
            }
        }
    });
    let sent = client.send_snapshot(ReceiverStream::new(rx)).await;
    let pairs = reader.await?;
    sent?;
    Ok(pairs?)
}

/// How this node reaches its peers: the fault injector's hooks and TLS.
pub struct PeerLink {
    pub faults: Arc<FaultInjector>,
    /// The cluster CA and this node's certificate, when `[security] ca_file` is set.
    pub tls: Option<Arc<PeerTls>>,
    /// This node's lease settings, reported on every batch.
    pub lease: lease::Settings,
}

/// The wire form of lease settings.
fn settings_to_wire(s: lease::Settings) -> LeaseSettings {
    LeaseSettings {
        tick_interval_us: u64::try_from(s.tick.as_micros()).unwrap_or(u64::MAX),
        election_ticks: s.election_ticks as u64,
        lease_reads: s.lease_reads,
    }
}

/// Lease settings from the wire (a sender that reports none, or absurd ones, differs from any node's).
fn settings_from_wire(s: Option<&LeaseSettings>) -> lease::Settings {
    let s = s.copied().unwrap_or_default();
    lease::Settings {
        tick: Duration::from_micros(s.tick_interval_us),
        election_ticks: usize::try_from(s.election_ticks).unwrap_or(usize::MAX),
        lease_reads: s.lease_reads,
    }
}

/// What every peer sender shares.
struct SenderContext {
    self_id: u64,
    lease: LeaseSettings,
    cluster: Arc<AtomicU64>,
    shutdown: CancellationToken,
    unreachable: mpsc::UnboundedSender<PeerEvent>,
    faults: Arc<FaultInjector>,
    tls: Option<Arc<PeerTls>>,
}

async fn peer_task(ctx: SenderContext, peer: u64, addr: String, mut rx: mpsc::Receiver<Message>) {
    let SenderContext {
        self_id,
        lease,
        cluster,
        shutdown,
        unreachable,
        faults,
        tls,
    } = ctx;
    let mut backoff = Duration::from_millis(50);
    'connect: loop {
        let endpoint = match peer_endpoint(&addr, tls.as_ref()) {
            Ok(e) => e.connect_timeout(Duration::from_secs(1)).tcp_nodelay(true),
            Err(e) => {
                tracing::error!(peer, %addr, error = %e, "invalid peer address; not sending to it");
                return;
            }
        };
        let channel = tokio::select! {
            _ = shutdown.cancelled() => return,
            c = endpoint.connect() => c,
        };
        let channel = match channel {
            Ok(c) => c,
            Err(e) => {
                tracing::debug!(peer, %addr, error = %e, "cannot reach peer");
                let _ = unreachable.send(PeerEvent::Unreachable(peer));
                // Drop what queued up meanwhile: Raft resends what matters.
                while rx.try_recv().is_ok() {}
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(Duration::from_secs(1));
                continue 'connect;
            }
        };
        backoff = Duration::from_millis(50);
        let mut client = RaftTransportClient::new(channel)
            .max_decoding_message_size(MAX_RAFT_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_RAFT_MESSAGE_BYTES);
        let (stream_tx, stream_rx) = mpsc::channel::<RaftMessageBatch>(16);
        let call =
            tokio::spawn(async move { client.send_messages(ReceiverStream::new(stream_rx)).await });
        loop {
            let first = tokio::select! {
                _ = shutdown.cancelled() => { call.abort(); return; }
                m = rx.recv() => match m { Some(m) => m, None => { call.abort(); return; } },
            };
            let mut messages = Vec::with_capacity(8);
            let mut bytes = 0;
            let mut next = Some(first);
            while let Some(m) = next.take() {
                match m.write_to_bytes() {
                    Ok(b) => {
                        bytes += b.len();
                        messages.push(b);
                    }
                    Err(e) => tracing::error!(error = %e, "cannot encode a Raft message"),
                }
                // A batch stops at MAX_BATCH messages or MAX_BATCH_BYTES: with one more message (at most
                // one entry over raft's per-message size, so under the value ceiling) it stays far below
                // the gRPC limit of MAX_RAFT_MESSAGE_BYTES.
                if messages.len() < MAX_BATCH && bytes < MAX_BATCH_BYTES {
                    next = rx.try_recv().ok();
                }
            }
            let delay = faults.delay(peer);
            if !delay.is_zero() {
                tokio::select! {
                    _ = shutdown.cancelled() => { call.abort(); return; }
                    () = faults.sleep(delay) => {}
                }
            }
            let batch = RaftMessageBatch {
                cluster_id: cluster.load(Ordering::Relaxed),
                from_node: self_id,
                to_node: peer,
                messages,
                lease: Some(lease),
            };
            if stream_tx.send(batch).await.is_err() || call.is_finished() {
                tracing::debug!(peer, "stream to peer broke; reconnecting");
                let _ = unreachable.send(PeerEvent::Unreachable(peer));
                if call.is_finished() {
                    if let Ok(Err(status)) = call.await
                        && status.metadata().get(NOT_MEMBER_METADATA).is_some()
                    {
                        tracing::warn!(
                            peer,
                            "peer says this node is not a member: {}",
                            status.message()
                        );
                        let _ = unreachable.send(PeerEvent::NotMember(peer));
                    }
                } else {
                    call.abort();
                }
                continue 'connect;
            }
        }
    }
}

/// The receiving side: hands every message to the local driver and stages incoming snapshots.
pub struct RaftService {
    node_id: u64,
    cluster: Arc<AtomicU64>,
    /// Ends the incoming streams when the node shuts down, so peers' long-lived streams do not hold up
    /// the graceful shutdown.
    shutdown: CancellationToken,
    driver: DriverHandle,
    backend: Arc<dyn StorageBackend>,
    /// One snapshot is received and installed at a time: the staging area is shared. The guard travels
    /// with the install request into the driver, so a stream reset while its snapshot waits in the
    /// driver's inbox does not let the next snapshot clear or fill staging under it.
    staging: Arc<tokio::sync::Mutex<()>>,
    faults: Arc<FaultInjector>,
    /// Mutual TLS: serve only callers that presented a member certificate from the cluster CA, each for
    /// the member it names (see [`kiwi_proto::tls::member_id`]).
    mtls: bool,
}

impl RaftService {
    pub fn new(
        node_id: u64,
        cluster: Arc<AtomicU64>,
        driver: DriverHandle,
        backend: Arc<dyn StorageBackend>,
        shutdown: CancellationToken,
        faults: Arc<FaultInjector>,
        mtls: bool,
    ) -> Self {
        RaftService {
            node_id,
            cluster,
            shutdown,
            driver,
            backend,
            staging: Arc::new(tokio::sync::Mutex::new(())),
            faults,
            mtls,
        }
    }

    /// With mutual TLS, the member the caller's certificate names (its `kiwi://node/<id>` URI subject
    /// alternative name; the TLS layer already checked that the certificate comes from the cluster CA).
    /// Refuses a caller that presented no certificate, or one that names no member (a client
    /// certificate from the same CA). Without mutual TLS, `None`: any sender is believed.
    fn certified_member<T>(&self, request: &Request<T>) -> Result<Option<u64>, Status> {
        if !self.mtls {
            return Ok(None);
        }
        let refuse = |why: String| {
            self.driver.count_refused(Refusal::Certificate);
            tracing::warn!("refused a Raft stream: {why}");
            Err(Status::permission_denied(why))
        };
        let certs = request.peer_certs();
        let Some(leaf) = certs.as_deref().and_then(|c| c.first()) else {
            return refuse(format!(
                "node {} serves Raft traffic only to members presenting a certificate from the cluster \
                 CA (mutual TLS, security.ca_file)",
                self.node_id
            ));
        };
        match kiwi_proto::tls::member_id(leaf) {
            Ok(Some(id)) => Ok(Some(id)),
            Ok(None) => refuse(format!(
                "node {} serves Raft traffic only to members: the certificate presented names no member \
                 (a member certificate carries the URI subject alternative name {}<id>; a client \
                 certificate cannot speak Raft)",
                self.node_id,
                kiwi_proto::tls::MEMBER_URI_PREFIX
            )),
            Err(e) => refuse(format!(
                "node {} cannot tell which member the certificate presented is: {e}",
                self.node_id
            )),
        }
    }

    /// Refuses a stream from a sender that is not a current member or belongs to another cluster (see
    /// [`guard`]). A node whose cluster id is still 0 has not joined yet and accepts any; a member that
    /// has not received its first snapshot yet does not know the cluster id and sends 0.
    /// With mutual TLS, `certified` is the member the caller's certificate names: the stream must claim
    /// that member and no other.
    fn check_sender(&self, theirs: u64, from: u64, certified: Option<u64>) -> Result<(), Status> {
        let refuse = |refusal: Refusal, status: Status| {
            self.driver.count_refused(refusal);
            tracing::warn!(
                from,
                reason = refusal.label(),
                "refused a Raft stream: {}",
                status.message()
            );
            Err(status)
        };
        if let Some(cert) = certified
            && cert != from
        {
            return refuse(
                Refusal::Certificate,
                Status::permission_denied(format!(
                    "Raft messages claiming to come from node {from} were sent with node {cert}'s \
                     certificate ({}{cert}): a member may speak only for itself",
                    kiwi_proto::tls::MEMBER_URI_PREFIX
                )),
            );
        }
        let mine = self.cluster.load(Ordering::Relaxed);
        if mine != 0 && theirs != 0 && theirs != mine {
            return refuse(
                Refusal::Cluster,
                Status::failed_precondition(format!(
                    "node {from} belongs to cluster {theirs:016x}, but node {} belongs to cluster \
                     {mine:016x}: check raft.peers (a data directory cannot move between clusters)",
                    self.node_id
                )),
            );
        }
        if from == 0 || from == self.node_id {
            return refuse(
                Refusal::Envelope,
                Status::invalid_argument(format!(
                    "Raft messages to node {} claim to come from node {from}",
                    self.node_id
                )),
            );
        }
        if self.driver.was_removed(from) {
            let mut status = Status::failed_precondition(format!(
                "node {from} was removed from node {}'s cluster; it is not a member any more",
                self.node_id
            ));
            status.metadata_mut().insert(
                NOT_MEMBER_METADATA,
                tonic::metadata::MetadataValue::from_static("true"),
            );
            return refuse(Refusal::NotMember, status);
        }
        if !self.driver.is_member(from) {
            return refuse(
                Refusal::NotMember,
                Status::permission_denied(format!(
                    "node {from} is not a member of node {}'s cluster: only members may send Raft \
                     messages (add it with `kiwi member add` first)",
                    self.node_id
                )),
            );
        }
        if mine != 0 && theirs == 0 {
            tracing::debug!(from, "member without a cluster id yet (joining)");
        }
        Ok(())
    }

    async fn blocking(
        &self,
        f: impl FnOnce(&dyn StorageBackend) -> kiwi_storage::Result<()> + Send + 'static,
    ) -> Result<(), Status> {
        let backend = Arc::clone(&self.backend);
        tokio::task::spawn_blocking(move || f(&*backend))
            .await
            .map_err(|e| Status::internal(format!("staging task failed: {e}")))?
            .map_err(|e| Status::internal(format!("cannot stage the snapshot: {e}")))
    }
}

#[tonic::async_trait]
impl RaftTransport for RaftService {
    async fn send_messages(
        &self,
        request: Request<Streaming<RaftMessageBatch>>,
    ) -> Result<Response<SendMessagesResponse>, Status> {
        let certified = self.certified_member(&request)?;
        let mut stream = request.into_inner();
        // The sender's lease settings as last passed to the driver (on this stream).
        let mut reported = None;
        loop {
            let batch = tokio::select! {
                () = self.shutdown.cancelled() => break,
                m = stream.message() => match m? {
                    Some(b) => b,
                    None => break,
                },
            };
            self.check_sender(batch.cluster_id, batch.from_node, certified)?;
            if batch.to_node != self.node_id {
                return Err(Status::failed_precondition(format!(
                    "Raft messages for node {} sent to node {}: check raft.peers",
                    batch.to_node, self.node_id
                )));
            }
            if reported.as_ref() != Some(&batch.lease) {
                reported = Some(batch.lease);
                self.driver.peer_event(PeerEvent::LeaseSettings {
                    peer: batch.from_node,
                    settings: settings_from_wire(batch.lease.as_ref()),
                });
            }
            for bytes in batch.messages {
                if self.faults.message(batch.from_node) == Verdict::Drop {
                    continue;
                }
                match Message::parse_from_bytes(&bytes) {
                    Ok(m) => match guard::check_envelope(&m, batch.from_node, self.node_id) {
                        // The driver checks the rest against its Raft state.
                        Ok(()) => self.driver.step(m),
                        Err(refusal) => {
                            self.driver.count_refused(refusal);
                            tracing::warn!(
                                from = batch.from_node,
                                claimed_from = m.from,
                                to = m.to,
                                "Raft message whose sender or receiver does not match its batch dropped"
                            );
                        }
                    },
                    Err(e) => {
                        self.driver.count_refused(Refusal::Envelope);
                        tracing::warn!(from = batch.from_node, error = %e, "undecodable Raft message dropped")
                    }
                }
            }
        }
        Ok(Response::new(SendMessagesResponse {}))
    }

    async fn send_snapshot(
        &self,
        request: Request<Streaming<SnapshotChunk>>,
    ) -> Result<Response<SendSnapshotResponse>, Status> {
        let certified = self.certified_member(&request)?;
        let mut stream = request.into_inner();
        let Some(first) = stream.message().await? else {
            return Err(Status::invalid_argument("empty snapshot stream"));
        };
        if first.to_node != self.node_id {
            return Err(Status::failed_precondition(format!(
                "snapshot for node {} sent to node {}: check raft.peers",
                first.to_node, self.node_id
            )));
        }
        let msg = Message::parse_from_bytes(&first.message)
            .map_err(|e| Status::invalid_argument(format!("undecodable snapshot message: {e}")))?;
        if msg.get_msg_type() != MessageType::MsgSnapshot {
            return Err(Status::invalid_argument(
                "the first snapshot chunk must carry a MsgSnapshot",
            ));
        }
        self.check_sender(first.cluster_id, first.from_node, certified)?;
        if self.faults.partitioned_from(first.from_node) {
            return Err(Status::unavailable(format!(
                "node {} is cut off from node {} by an injected partition",
                self.node_id, first.from_node
            )));
        }
        let local = guard::LocalView {
            term: self.driver.status().term,
            last_index: 0,
        };
        if let Err(refusal) = guard::check_envelope(&msg, first.from_node, self.node_id)
            .and_then(|()| guard::check_snapshot(&msg, local))
        {
            self.driver.count_refused(refusal);
            return Err(Status::invalid_argument(format!(
                "snapshot from node {} refused ({}): its message or metadata cannot come from a leader",
                first.from_node,
                refusal.label()
            )));
        }
        let staging = Arc::clone(&self.staging).lock_owned().await;
        if self.cluster.load(Ordering::Relaxed) == 0 && first.cluster_id != 0 {
            // A joining node's first snapshot tells it which cluster it joined.
            let id = first.cluster_id;
            self.blocking(move |b| crate::identity::record_cluster_id(b, id))
                .await?;
            self.cluster.store(id, Ordering::Relaxed);
            tracing::info!(cluster_id = format!("{id:016x}"), "joined cluster");
        }
        self.blocking(snapshot::clear_staging).await?;
        let mut chunk = first;
        loop {
            let last = chunk.last;
            let kvs = std::mem::take(&mut chunk.kvs);
            snapshot::check_chunk(&kvs, crate::raft::mvcc::STORED_CEILING)
                .map_err(Status::invalid_argument)?;
            self.blocking(move |b| snapshot::stage(b, kvs)).await?;
            if last {
                break;
            }
            chunk = stream.message().await?.ok_or_else(|| {
                Status::invalid_argument("snapshot stream ended before its last chunk")
            })?;
        }
        let (index, term) = {
            let meta = msg.get_snapshot().get_metadata();
            (meta.index, meta.term)
        };
        self.blocking(move |b| snapshot::mark_staged(b, index, term))
            .await?;
        self.driver
            .install_snapshot(msg, Box::new(staging))
            .await
            .map_err(|e| Status::unavailable(format!("snapshot not installed: {e}")))?;
        Ok(Response::new(SendSnapshotResponse {}))
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicUsize;
    use std::sync::{Condvar, Mutex};
    use std::time::Instant;

    use kiwi_proto::v1::raft_transport_server::RaftTransportServer;
    use kiwi_storage::{
        BackendKind, EngineStats, KeySpace, KvPair, Limits, MemoryBackend, Scan, ScanRange,
        WriteBatch, WriteOptions,
    };
    use raft::eraftpb::SnapshotMetadata;

    use super::*;
    use crate::raft::driver::{self, DriverConfig, NoPeers};
    use crate::raft::log_store::{LogStore, SnapshotData};
    use crate::raft::state_machine;
    use crate::telemetry::raft_metrics::{MetricsSettings, RaftExport};

    /// A memory backend whose synced writes wait while it is closed: a disk that stalls the Raft
    /// driver's fsyncs while the receiver's buffered staging writes go through.
    struct GatedBackend {
        inner: MemoryBackend,
        closed: Mutex<bool>,
        opened: Condvar,
        waiting: AtomicUsize,
    }

    impl GatedBackend {
        fn wait_if_closed(&self, opts: WriteOptions) {
            if opts != WriteOptions::SYNC {
                return;
            }
            let mut closed = self.closed.lock().unwrap();
            if *closed {
                self.waiting.fetch_add(1, Ordering::SeqCst);
                while *closed {
                    closed = self.opened.wait(closed).unwrap();
                }
                self.waiting.fetch_sub(1, Ordering::SeqCst);
            }
        }

        fn set_closed(&self, closed: bool) {
            *self.closed.lock().unwrap() = closed;
            self.opened.notify_all();
        }
    }

    impl StorageBackend for GatedBackend {
        fn kind(&self) -> BackendKind {
            self.inner.kind()
        }
        fn limits(&self) -> Limits {
            self.inner.limits()
        }
        fn read(&self, space: KeySpace, key: &[u8]) -> kiwi_storage::Result<Option<Vec<u8>>> {
            self.inner.read(space, key)
        }
        fn batch_write(&self, batch: WriteBatch, opts: WriteOptions) -> kiwi_storage::Result<()> {
            self.wait_if_closed(opts);
            self.inner.batch_write(batch, opts)
        }
        fn scan(&self, space: KeySpace, scan: &Scan) -> kiwi_storage::Result<Vec<KvPair>> {
            self.inner.scan(space, scan)
        }
        fn snapshot(&self) -> kiwi_storage::Result<Box<dyn StorageSnapshot>> {
            self.inner.snapshot()
        }
        fn engine_stats(&self) -> EngineStats {
            self.inner.engine_stats()
        }
        fn write(
            &self,
            space: KeySpace,
            key: &[u8],
            value: &[u8],
            opts: WriteOptions,
        ) -> kiwi_storage::Result<()> {
            self.wait_if_closed(opts);
            self.inner.write(space, key, value, opts)
        }
        fn delete(
            &self,
            space: KeySpace,
            key: &[u8],
            opts: WriteOptions,
        ) -> kiwi_storage::Result<()> {
            self.wait_if_closed(opts);
            self.inner.delete(space, key, opts)
        }
    }

    const CLUSTER: u64 = 7;

    /// Snapshot chunk(s) from leader 1 to node 2 of a snapshot at `index` (term 2).
    fn chunk(index: u64, kvs: &[(&str, &str)], last: bool) -> SnapshotChunk {
        let mut msg = Message::default();
        msg.set_msg_type(MessageType::MsgSnapshot);
        (msg.from, msg.to, msg.term) = (1, 2, 2);
        let mut meta = SnapshotMetadata {
            index,
            term: 2,
            ..SnapshotMetadata::default()
        };
        meta.mut_conf_state().voters = vec![1, 2, 3];
        msg.mut_snapshot().set_metadata(meta);
        msg.mut_snapshot().data = SnapshotData {
            view_id: index,
            members: Vec::new(),
            leases: Vec::new(),
        }
        .encode()
        .into();
        SnapshotChunk {
            cluster_id: CLUSTER,
            from_node: 1,
            to_node: 2,
            message: msg.write_to_bytes().unwrap(),
            kvs: kvs
                .iter()
                .map(|(k, v)| kiwi_proto::v1::KeyValue {
                    key: k.as_bytes().to_vec(),
                    value: v.as_bytes().to_vec(),
                    ..kiwi_proto::v1::KeyValue::default()
                })
                .collect(),
            last,
        }
    }

    fn data(backend: &dyn StorageBackend) -> Vec<(String, String)> {
        backend
            .scan(KeySpace::Data, &Scan::forward(ScanRange::all(), 100))
            .unwrap()
            .into_iter()
            .map(|(k, v)| (String::from_utf8(k).unwrap(), String::from_utf8(v).unwrap()))
            .collect()
    }

    async fn until(what: &str, mut done: impl FnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !done() {
            assert!(Instant::now() < deadline, "timed out waiting: {what}");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// S1 arrives whole and its install waits on a stalled disk; its stream is reset; S2 starts and
    /// stays open. Before the staging lock travelled with the install, S2 cleared staging and staged
    /// its first chunk, and the driver then installed S1's index over S2's partial data.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_reset_snapshot_stream_keeps_staging_until_its_install_is_done() {
        let gated = Arc::new(GatedBackend {
            inner: MemoryBackend::new(Limits::CEILING),
            closed: Mutex::new(false),
            opened: Condvar::new(),
            waiting: AtomicUsize::new(0),
        });
        let backend: Arc<dyn StorageBackend> = gated.clone();
        let mut store = LogStore::in_backend(Arc::clone(&backend), Arc::default()).unwrap();
        store.bootstrap(vec![1, 2, 3]).unwrap();
        let config = DriverConfig {
            node_id: 2,
            tick_interval: Duration::from_millis(10),
            // Node 2 never campaigns during the test.
            election_ticks: 100_000,
            heartbeat_ticks: 2,
            compaction_threshold: 1000,
            compaction_slack: 0,
            lease_reads: false,
            metrics: MetricsSettings {
                enabled: false,
                collection_interval: Duration::from_millis(100),
                retention_period: Duration::from_secs(10),
            },
            metrics_export: RaftExport::noop(),
        };
        let (stop, fatal) = (CancellationToken::new(), CancellationToken::new());
        let (handle, thread) = driver::spawn(
            &config,
            store,
            Arc::clone(&backend),
            Arc::new(NoPeers),
            Arc::default(),
            stop.clone(),
            fatal.clone(),
        )
        .unwrap();
        let meter = crate::telemetry::metrics::Meters::noop().raft;
        let (faults, _events) = FaultInjector::new(2, false, Duration::from_secs(1), &meter);
        let service = RaftService::new(
            2,
            Arc::new(AtomicU64::new(CLUSTER)),
            handle,
            Arc::clone(&backend),
            stop.clone(),
            faults,
            false,
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(RaftTransportServer::new(service))
                .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener)),
        );
        let client = || async move {
            RaftTransportClient::connect(format!("http://{addr}"))
                .await
                .unwrap()
        };

        // S1, whole; its install blocks on the disk.
        gated.set_closed(true);
        let s1 = {
            let mut c = client().await;
            tokio::spawn(async move {
                c.send_snapshot(tokio_stream::iter([chunk(100, &[("a", "s1")], true)]))
                    .await
            })
        };
        until("S1's install reaches the disk", || {
            gated.waiting.load(Ordering::SeqCst) > 0
        })
        .await;
        // Its stream is reset (the sender gave up); its install still waits in the driver.
        s1.abort();
        assert!(s1.await.unwrap_err().is_cancelled());
        // S2 starts and stays open after its first chunk.
        let (s2_tx, s2_rx) = mpsc::channel(4);
        s2_tx.send(chunk(200, &[("b", "s2")], false)).await.unwrap();
        let s2 = {
            let mut c = client().await;
            tokio::spawn(async move { c.send_snapshot(ReceiverStream::new(s2_rx)).await })
        };
        // Give S2 the time to take staging if nothing stops it (it stages its first chunk at once
        // when it can): a bounded wait for something that must not happen.
        let staged_s2 = || backend.read(KeySpace::Raft, b"snap/b").unwrap().is_some();
        let deadline = Instant::now() + Duration::from_secs(1);
        while !staged_s2() && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert!(!staged_s2(), "S2 staged while S1's install was pending");
        gated.set_closed(false);
        until("S1 installed", || {
            state_machine::applied_index(&*backend).unwrap() >= 100
        })
        .await;
        assert!(!fatal.is_cancelled(), "the node did not stop");
        let at_s1 = data(&*backend);
        assert_eq!(
            at_s1,
            [("a".to_string(), "s1".to_string())],
            "index 100 holds S1's data"
        );
        // S2 then goes through whole.
        s2_tx.send(chunk(200, &[("c", "s2")], true)).await.unwrap();
        drop(s2_tx);
        s2.await.unwrap().expect("S2 installed");
        assert_eq!(state_machine::applied_index(&*backend).unwrap(), 200);
        assert_eq!(
            data(&*backend),
            [
                ("b".to_string(), "s2".to_string()),
                ("c".to_string(), "s2".to_string())
            ]
        );
        stop.cancel();
        server.abort();
        tokio::task::spawn_blocking(move || thread.join())
            .await
            .unwrap()
            .unwrap();
    }
}
