//! The gRPC services: `NodeLink` (one stream per node: registration, heartbeats) and `ControlService`
//! (the operator's cluster status and event log).

use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use kiwi_proto::v1::control_message::Msg as ControlMsg;
use kiwi_proto::v1::control_service_server::ControlService;
use kiwi_proto::v1::node_link_server::NodeLink;
use kiwi_proto::v1::node_message::Msg as NodeMsg;
use kiwi_proto::v1::{
    ClusterStatusRequest, ClusterStatusResponse, ControlMessage, EventsRequest, EventsResponse,
    NodeMessage, Registered,
};
use tokio_stream::Stream;
use tonic::{Request, Response, Status, Streaming};

use crate::events::{EventLog, NewEvent};
use crate::state::{ClusterView, Refusal};

/// Most events one `Events` call returns.
pub const MAX_EVENTS_PER_CALL: u32 = 1000;

/// State shared by the services and the sweeper.
pub struct Control {
    pub view: Mutex<ClusterView>,
    pub events: EventLog,
    next_conn: AtomicU64,
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

impl Control {
    pub fn new(view: ClusterView, events: EventLog) -> Arc<Control> {
        Arc::new(Control {
            view: Mutex::new(view),
            events,
            next_conn: AtomicU64::new(1),
        })
    }

    fn view(&self) -> std::sync::MutexGuard<'_, ClusterView> {
        self.view.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Logs events durably (off the async threads).
    pub async fn log(self: &Arc<Self>, events: Vec<NewEvent>) {
        if events.is_empty() {
            return;
        }
        let this = Arc::clone(self);
        match tokio::task::spawn_blocking(move || this.events.append(events)).await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => tracing::error!(error = %e, "cannot write to the event log"),
            Err(e) => tracing::error!(error = %e, "the event log writer failed"),
        }
    }

    /// Marks down the nodes that missed their heartbeats.
    pub async fn sweep(self: &Arc<Self>) {
        let events = self.view().sweep(Instant::now());
        self.log(events).await;
    }
}

/// The `NodeLink` service.
#[derive(Clone)]
pub struct NodeLinkApi(pub Arc<Control>);

type ControlStream = Pin<Box<dyn Stream<Item = Result<ControlMessage, Status>> + Send>>;

fn refusal_status(r: &Refusal) -> Status {
    match r {
        Refusal::OtherCluster { .. } => Status::failed_precondition(r.to_string()),
        Refusal::Duplicate { .. } => Status::already_exists(r.to_string()),
        Refusal::Invalid(_) => Status::invalid_argument(r.to_string()),
    }
}

#[tonic::async_trait]
impl NodeLink for NodeLinkApi {
    type LinkStream = ControlStream;

    async fn link(
        &self,
        request: Request<Streaming<NodeMessage>>,
    ) -> Result<Response<Self::LinkStream>, Status> {
        let control = Arc::clone(&self.0);
        let conn = control.next_conn.fetch_add(1, Ordering::Relaxed);
        let peer = request
            .remote_addr()
            .map_or_else(|| "unknown".to_string(), |a| a.to_string());
        let mut inbound = request.into_inner();
        // The registration comes first, before the stream is answered.
        let reg = match inbound.message().await? {
            Some(NodeMessage {
                msg: Some(NodeMsg::Register(reg)),
            }) => reg,
            Some(_) => {
                return Err(Status::failed_precondition(
                    "the first message on a node link must be a Register",
                ));
            }
            None => {
                return Err(Status::cancelled(
                    "the node closed the link before registering",
                ));
            }
        };
        let node_id = reg.node_id;
        let registered = control
            .view()
            .register(conn, reg, Instant::now(), unix_ms());
        let (events, adopted) = match registered {
            Ok(r) => r,
            Err(refusal) => {
                tracing::warn!(%peer, node_id, reason = %refusal, "node refused");
                control
                    .log(vec![NewEvent {
                        kind: "node_refused",
                        node_id,
                        detail: format!("from {peer}: {refusal}"),
                    }])
                    .await;
                return Err(refusal_status(&refusal));
            }
        };
        let cluster_id = control.view().cluster_id();
        if adopted {
            let c = Arc::clone(&control);
            let stored = tokio::task::spawn_blocking(move || c.events.set_cluster_id(cluster_id))
                .await
                .map_err(|e| Status::internal(e.to_string()))?;
            stored
                .map_err(|e| Status::unavailable(format!("cannot record the cluster id: {e}")))?;
        }
        control.log(events).await;

        let (tx, rx) = tokio::sync::mpsc::channel(16);
        tx.send(Ok(ControlMessage {
            msg: Some(ControlMsg::Registered(Registered { cluster_id })),
        }))
        .await
        .map_err(|_| Status::cancelled("the node went away"))?;
        tokio::spawn(async move {
            loop {
                match inbound.message().await {
                    Ok(Some(NodeMessage {
                        msg: Some(NodeMsg::Heartbeat(hb)),
                    })) => {
                        let metrics = hb.metrics.unwrap_or_default();
                        let events = control.view().heartbeat(
                            conn,
                            node_id,
                            metrics,
                            Instant::now(),
                            unix_ms(),
                        );
                        control.log(events).await;
                    }
                    Ok(Some(NodeMessage {
                        msg: Some(NodeMsg::Register(_)),
                    })) => {
                        let _ = tx
                            .send(Err(Status::failed_precondition(
                                "a node link registers once; open a new link to register again",
                            )))
                            .await;
                        return;
                    }
                    Ok(Some(NodeMessage { msg: None })) => {
                        let _ = tx
                            .send(Err(Status::invalid_argument("an empty node message")))
                            .await;
                        return;
                    }
                    // The node closed the link or it broke: its heartbeats stop, and the sweeper marks it
                    // down after three missed intervals.
                    Ok(None) | Err(_) => {
                        tracing::debug!(node_id, conn, "node link closed");
                        return;
                    }
                }
            }
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }
}

/// The `ControlService` service.
#[derive(Clone)]
pub struct ControlApi(pub Arc<Control>);

#[tonic::async_trait]
impl ControlService for ControlApi {
    async fn cluster_status(
        &self,
        _request: Request<ClusterStatusRequest>,
    ) -> Result<Response<ClusterStatusResponse>, Status> {
        Ok(Response::new(self.0.view().status()))
    }

    async fn events(
        &self,
        request: Request<EventsRequest>,
    ) -> Result<Response<EventsResponse>, Status> {
        let req = request.into_inner();
        let limit = match req.limit {
            0 => 100,
            n if n > MAX_EVENTS_PER_CALL => {
                return Err(Status::invalid_argument(format!(
                    "limit must be 1 to {MAX_EVENTS_PER_CALL} (0: 100), got {n}"
                )));
            }
            n => n,
        };
        let control = Arc::clone(&self.0);
        let events =
            tokio::task::spawn_blocking(move || control.events.read(req.after_seq, limit as usize))
                .await
                .map_err(|e| Status::internal(e.to_string()))?
                .map_err(|e| Status::internal(format!("cannot read the event log: {e}")))?;
        let next_after_seq = events.last().map_or(req.after_seq, |e| e.seq);
        Ok(Response::new(EventsResponse {
            events,
            next_after_seq,
        }))
    }
}
