//! `RaftTransport` over gRPC: Raft messages between nodes, as raft-rs-encoded bytes, batched on one
//! long-lived stream per peer.
//!
//! Sending never blocks the driver: each peer has a bounded queue; when it is full the message is dropped
//! and the peer reported unreachable (Raft retries). A per-peer task connects, streams batches, and
//! reconnects with backoff when the stream breaks.

use std::collections::HashMap;
use std::time::Duration;

use kiwi_proto::v1::raft_transport_client::RaftTransportClient;
use kiwi_proto::v1::raft_transport_server::RaftTransport;
use kiwi_proto::v1::{RaftMessageBatch, SendMessagesResponse, SendSnapshotResponse, SnapshotChunk};
use protobuf::Message as _;
use raft::eraftpb::Message;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status, Streaming};

use crate::driver::{DriverHandle, MessageSink};

/// Messages queued per peer before new ones are dropped.
const PEER_QUEUE: usize = 4096;
/// Messages per batch on the wire.
const MAX_BATCH: usize = 256;
/// Largest gRPC message between nodes.
pub const MAX_RAFT_MESSAGE_BYTES: usize = 256 * 1024 * 1024;

/// The sending side: one queue and one task per peer.
pub struct Peers {
    queues: HashMap<u64, mpsc::Sender<Message>>,
}

impl Peers {
    /// Starts a sender task for every peer but `self_id`. The tasks stop when `shutdown` is cancelled.
    /// Peers that cannot be reached are reported on `unreachable` (the node forwards them to the driver,
    /// which is created after this sink).
    pub fn start(
        self_id: u64,
        peers: &[(u64, String)],
        shutdown: &CancellationToken,
        unreachable: mpsc::UnboundedSender<u64>,
    ) -> Self {
        let mut queues = HashMap::new();
        for (id, addr) in peers {
            if *id == self_id {
                continue;
            }
            let (tx, rx) = mpsc::channel(PEER_QUEUE);
            queues.insert(*id, tx);
            tokio::spawn(peer_task(
                self_id,
                *id,
                addr.clone(),
                rx,
                shutdown.clone(),
                unreachable.clone(),
            ));
        }
        Peers { queues }
    }
}

impl MessageSink for Peers {
    fn send(&self, msgs: Vec<Message>) -> Vec<u64> {
        let mut full = Vec::new();
        for m in msgs {
            let to = m.to;
            match self.queues.get(&to) {
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
}

async fn peer_task(
    self_id: u64,
    peer: u64,
    addr: String,
    mut rx: mpsc::Receiver<Message>,
    shutdown: CancellationToken,
    unreachable: mpsc::UnboundedSender<u64>,
) {
    let mut backoff = Duration::from_millis(50);
    'connect: loop {
        let endpoint = match tonic::transport::Endpoint::from_shared(format!("http://{addr}")) {
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
                let _ = unreachable.send(peer);
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
        let call = tokio::spawn(async move { client.send_messages(ReceiverStream::new(stream_rx)).await });
        loop {
            let first = tokio::select! {
                _ = shutdown.cancelled() => { call.abort(); return; }
                m = rx.recv() => match m { Some(m) => m, None => { call.abort(); return; } },
            };
            let mut messages = Vec::with_capacity(8);
            for m in std::iter::once(first).chain(std::iter::from_fn(|| rx.try_recv().ok()).take(MAX_BATCH - 1)) {
                match m.write_to_bytes() {
                    Ok(b) => messages.push(b),
                    Err(e) => tracing::error!(error = %e, "cannot encode a Raft message"),
                }
            }
            let batch = RaftMessageBatch {
                cluster_id: 0,
                from_node: self_id,
                to_node: peer,
                messages,
            };
            if stream_tx.send(batch).await.is_err() || call.is_finished() {
                tracing::debug!(peer, "stream to peer broke; reconnecting");
                let _ = unreachable.send(peer);
                call.abort();
                continue 'connect;
            }
        }
    }
}

/// The receiving side: hands every message to the local driver.
pub struct RaftService {
    node_id: u64,
    driver: DriverHandle,
}

impl RaftService {
    pub fn new(node_id: u64, driver: DriverHandle) -> Self {
        RaftService { node_id, driver }
    }
}

#[tonic::async_trait]
impl RaftTransport for RaftService {
    async fn send_messages(
        &self,
        request: Request<Streaming<RaftMessageBatch>>,
    ) -> Result<Response<SendMessagesResponse>, Status> {
        let mut stream = request.into_inner();
        while let Some(batch) = stream.message().await? {
            if batch.to_node != self.node_id {
                return Err(Status::failed_precondition(format!(
                    "Raft messages for node {} sent to node {}: check raft.peers",
                    batch.to_node, self.node_id
                )));
            }
            for bytes in batch.messages {
                match Message::parse_from_bytes(&bytes) {
                    Ok(m) => self.driver.step(m),
                    Err(e) => tracing::warn!(from = batch.from_node, error = %e, "undecodable Raft message dropped"),
                }
            }
        }
        Ok(Response::new(SendMessagesResponse {}))
    }

    async fn send_snapshot(
        &self,
        _request: Request<Streaming<SnapshotChunk>>,
    ) -> Result<Response<SendSnapshotResponse>, Status> {
        Err(Status::unimplemented("this version never compacts its log, so it sends no snapshots"))
    }
}
