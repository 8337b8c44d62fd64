//! The gRPC services: `NodeLink` (one stream per node: registration, heartbeats) and `ControlService`
//! (the operator's cluster status and event log).

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use kiwi_proto::v1::control_message::Msg as ControlMsg;
use kiwi_proto::v1::control_service_server::ControlService;
use kiwi_proto::v1::fault_command::Cmd as FaultCmd;
use kiwi_proto::v1::node_link_server::NodeLink;
use kiwi_proto::v1::node_message::Msg as NodeMsg;
use kiwi_proto::v1::{
    CancelFaultRequest, ClusterPolicy, ClusterStatusRequest, ClusterStatusResponse, ControlMessage,
    EventsRequest, EventsResponse, FaultCommand, FaultEvent, FaultSchedule, GetPolicyRequest,
    HistoryRequest, HistoryResponse, ListFaultsRequest, ListFaultsResponse, NodeMessage,
    PolicyOverride, PolicyUpdate, Registered, RuntimePolicy, ScheduleFaultRequest,
    SetPolicyRequest,
};
use tokio_stream::Stream;
use tonic::{Request, Response, Status, Streaming};

use crate::events::{EventLog, NewEvent};
use crate::faults::{self, FaultTable};
use crate::state::{ClusterView, Refusal};

/// Most events one `Events` call returns.
pub const MAX_EVENTS_PER_CALL: u32 = 1000;

type Outbox = tokio::sync::mpsc::Sender<Result<ControlMessage, Status>>;

/// State shared by the services and the sweeper.
pub struct Control {
    pub view: Mutex<ClusterView>,
    pub events: EventLog,
    next_conn: AtomicU64,
    /// The open link of every registered node: (connection, its outbound stream).
    links: Mutex<HashMap<u64, (u64, Outbox)>>,
    /// The policy last set; changed only under this lock, persisted before it is pushed.
    policy: tokio::sync::Mutex<ClusterPolicy>,
    /// Fault schedules; changed only under this lock, persisted before commands are sent.
    faults: tokio::sync::Mutex<FaultTable>,
}

/// The policy `node_id` should run: its override, else the cluster-wide policy.
fn effective(policy: &ClusterPolicy, node_id: u64) -> Option<RuntimePolicy> {
    policy
        .overrides
        .iter()
        .find(|o| o.node_id == node_id)
        .and_then(|o| o.policy)
        .or(policy.policy)
}

/// Shortest time between two pushes of the latest policy to a node whose heartbeats say it runs an
/// older one.
const REPUSH_EVERY: Duration = Duration::from_secs(2);

fn update(policy: &ClusterPolicy, node_id: u64) -> Option<ControlMessage> {
    // Once any policy was set, every node is told what applies to it, and "nothing" (no cluster-wide
    // policy, no override) too: it then returns to its configuration file's policy.
    (policy.version > 0).then(|| ControlMessage {
        msg: Some(ControlMsg::Policy(PolicyUpdate {
            version: policy.version,
            policy: effective(policy, node_id),
            epoch: policy.epoch,
        })),
    })
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

impl Control {
    pub fn new(
        view: ClusterView,
        events: EventLog,
        policy: ClusterPolicy,
        faults: FaultTable,
    ) -> Arc<Control> {
        Arc::new(Control {
            view: Mutex::new(view),
            events,
            next_conn: AtomicU64::new(1),
            links: Mutex::new(HashMap::new()),
            policy: tokio::sync::Mutex::new(policy),
            faults: tokio::sync::Mutex::new(faults),
        })
    }

    /// Persists changed fault schedules and deletes the records of the pruned ones (off the async
    /// threads).
    async fn persist_faults(self: &Arc<Self>, changed: Vec<FaultSchedule>) -> Result<(), Status> {
        self.persist_and_prune(changed, Vec::new()).await
    }

    async fn persist_and_prune(
        self: &Arc<Self>,
        changed: Vec<FaultSchedule>,
        pruned: Vec<u64>,
    ) -> Result<(), Status> {
        if changed.is_empty() && pruned.is_empty() {
            return Ok(());
        }
        let this = Arc::clone(self);
        tokio::task::spawn_blocking(move || {
            changed
                .iter()
                .try_for_each(|f| this.events.put_fault(f))
                .and_then(|()| this.events.delete_faults(&pruned))
        })
        .await
        .map_err(|e| Status::internal(e.to_string()))?
        .map_err(|e| Status::unavailable(format!("cannot persist the fault schedule: {e}")))
    }

    /// Sends a cancel to `node_id`'s link, waiting for room rather than dropping it (a fault that was
    /// not cancelled would run to its end). A node whose link is closed gets it again when it registers
    /// ([`FaultTable::cancels_for`]).
    async fn send_cancel(&self, node_id: u64, id: u64) {
        let tx = self.links().get(&node_id).map(|(_, tx)| tx.clone());
        if let Some(tx) = tx {
            let _ = tx
                .send(Ok(ControlMessage {
                    msg: Some(ControlMsg::Fault(FaultCommand {
                        cmd: Some(FaultCmd::CancelId(id)),
                    })),
                }))
                .await;
        }
    }

    fn send_fault(&self, node_id: u64, cmd: FaultCmd) -> bool {
        let tx = self.links().get(&node_id).map(|(_, tx)| tx.clone());
        tx.is_some_and(|tx| {
            tx.try_send(Ok(ControlMessage {
                msg: Some(ControlMsg::Fault(FaultCommand { cmd: Some(cmd) })),
            }))
            .is_ok()
        })
    }

    /// Schedules a fault (checked against the registered nodes, persisted, logged).
    ///
    /// # Errors
    /// See `ControlService.ScheduleFault`.
    pub async fn schedule_fault(
        self: &Arc<Self>,
        req: ScheduleFaultRequest,
    ) -> Result<FaultSchedule, Status> {
        let targets = self.view().fault_targets();
        let mut table = self.faults.lock().await;
        let f = table.schedule(req, unix_ms(), &targets)?;
        if let Err(e) = self.persist_faults(vec![f.clone()]).await {
            table.forget(f.id);
            return Err(e);
        }
        drop(table);
        self.log(vec![NewEvent {
            kind: "fault_scheduled",
            node_id: 0,
            detail: faults::describe(&f),
        }])
        .await;
        // Start it at once if it is due now.
        self.run_faults().await;
        let table = self.faults.lock().await;
        Ok(table.list().into_iter().find(|x| x.id == f.id).unwrap_or(f))
    }

    /// Cancels a fault and tells its nodes.
    ///
    /// # Errors
    /// `NOT_FOUND`, `FAILED_PRECONDITION` (already over), `UNAVAILABLE` (cannot persist).
    pub async fn cancel_fault(self: &Arc<Self>, id: u64) -> Result<FaultSchedule, Status> {
        let mut table = self.faults.lock().await;
        let (f, tell) = table.cancel(id)?;
        let pruned = table.prune();
        self.persist_and_prune(vec![f.clone()], pruned).await?;
        drop(table);
        for node in tell {
            self.send_cancel(node, id).await;
        }
        self.log(vec![NewEvent {
            kind: "fault_cancelled",
            node_id: 0,
            detail: format!("fault {id} cancelled by an operator"),
        }])
        .await;
        Ok(f)
    }

    /// Every fault schedule.
    pub async fn list_faults(&self) -> Vec<FaultSchedule> {
        self.faults.lock().await.list()
    }

    /// Starts the faults that are due and marks the finished ones done.
    pub async fn run_faults(self: &Arc<Self>) {
        let mut table = self.faults.lock().await;
        // Called every sweep: the links are looked at only when a fault starts.
        let (changed, commands) = table.tick(unix_ms(), |id| self.links().contains_key(&id));
        if changed.is_empty() {
            return;
        }
        let pruned = table.prune();
        let persisted = self.persist_and_prune(changed.clone(), pruned).await;
        drop(table);
        let mut events = Vec::new();
        // A start whose schedule is not persisted is not sent: a control plane restarted on the old
        // record would send it again (a crash twice).
        let commands = match persisted {
            Ok(()) => commands,
            Err(e) => {
                tracing::error!(error = %e, "cannot persist fault schedules: their starts are not sent");
                for (node_id, start) in &commands {
                    events.push(NewEvent {
                        kind: "fault_not_sent",
                        node_id: *node_id,
                        detail: format!(
                            "fault {}: its schedule could not be persisted ({e}), so it was not sent",
                            start.fault_id
                        ),
                    });
                }
                Vec::new()
            }
        };
        for (node_id, start) in commands {
            let id = start.fault_id;
            if !self.send_fault(node_id, FaultCmd::Start(start)) {
                events.push(NewEvent {
                    kind: "fault_unreachable",
                    node_id,
                    detail: format!("fault {id}: node {node_id}'s link is full or closed"),
                });
            }
        }
        for f in changed {
            events.push(NewEvent {
                kind: if f.state == "active" {
                    "fault_active"
                } else {
                    "fault_done"
                },
                node_id: 0,
                detail: faults::describe(&f),
            });
        }
        self.log(events).await;
    }

    /// What a node reported about a fault.
    async fn fault_event(self: &Arc<Self>, node_id: u64, e: FaultEvent) {
        let mut table = self.faults.lock().await;
        let changed = table.node_event(node_id, &e);
        let kind = table.kind_of(e.fault_id);
        if let Some(f) = changed
            && let Err(err) = self.persist_faults(vec![f]).await
        {
            tracing::error!(error = %err, "cannot persist a fault schedule");
        }
        drop(table);
        let event_kind = match e.kind.as_str() {
            "started" => "fault_started",
            "expired" => "fault_expired",
            "cancelled" => "fault_ended",
            _ => "fault_refused",
        };
        self.log(vec![NewEvent {
            kind: event_kind,
            node_id,
            detail: format!(
                "fault {} ({kind}) {} on node {node_id}: {} ({} messages delayed, {} dropped)",
                e.fault_id, e.kind, e.detail, e.messages_delayed, e.messages_dropped
            ),
        }])
        .await;
    }

    /// The operator's view of the cluster now.
    pub fn status(&self) -> ClusterStatusResponse {
        self.view().status()
    }

    fn links(&self) -> std::sync::MutexGuard<'_, HashMap<u64, (u64, Outbox)>> {
        self.links.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Sets a policy (validated, persisted, logged) and pushes it to the nodes it concerns at once.
    ///
    /// # Errors
    /// `INVALID_ARGUMENT` naming the broken rule; `UNAVAILABLE` when it cannot be persisted.
    pub async fn set_policy(
        self: &Arc<Self>,
        req: SetPolicyRequest,
    ) -> Result<ClusterPolicy, Status> {
        if !req.clear_override {
            let policy = req
                .policy
                .as_ref()
                .ok_or_else(|| Status::invalid_argument("policy is required"))?;
            let broken = kiwi_proto::policy::check(policy);
            if !broken.is_empty() {
                return Err(Status::invalid_argument(format!(
                    "policy refused, nothing was pushed: {}",
                    broken
                        .iter()
                        .map(ToString::to_string)
                        .collect::<Vec<_>>()
                        .join("; ")
                )));
            }
        } else if req.node_id == 0 {
            return Err(Status::invalid_argument(
                "clear_override needs the node_id whose override to remove",
            ));
        }
        let mut current = self.policy.lock().await;
        let mut next = current.clone();
        next.version += 1;
        let what = match (req.node_id, req.clear_override) {
            (0, _) => {
                next.policy = req.policy;
                "cluster-wide policy".to_string()
            }
            (n, true) => {
                next.overrides.retain(|o| o.node_id != n);
                format!("override of node {n} removed")
            }
            (n, false) => {
                next.overrides.retain(|o| o.node_id != n);
                next.overrides.push(PolicyOverride {
                    node_id: n,
                    policy: req.policy,
                });
                next.overrides.sort_by_key(|o| o.node_id);
                format!("override for node {n}")
            }
        };
        let this = Arc::clone(self);
        let record = next.clone();
        tokio::task::spawn_blocking(move || this.events.set_policy(&record))
            .await
            .map_err(|e| Status::internal(e.to_string()))?
            .map_err(|e| Status::unavailable(format!("cannot persist the policy: {e}")))?;
        *current = next.clone();
        self.log(vec![NewEvent {
            kind: "policy_set",
            node_id: req.node_id,
            detail: format!("version {}: {what}", next.version),
        }])
        .await;
        // Pushed to every connected node (each gets its effective policy with the new version).
        let links: Vec<(u64, Outbox)> = self
            .links()
            .iter()
            .map(|(id, (_, tx))| (*id, tx.clone()))
            .collect();
        drop(current);
        for (node_id, tx) in links {
            if let Some(msg) = update(&next, node_id) {
                let _ = tx.try_send(Ok(msg));
            }
        }
        Ok(next)
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

    /// Marks down the nodes that missed their heartbeats, and runs the fault schedules.
    pub async fn sweep(self: &Arc<Self>) {
        let events = self.view().sweep(Instant::now());
        self.log(events).await;
        self.run_faults().await;
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
        {
            // Registered under the policy lock, so a policy set meanwhile reaches this link either
            // through the push or through this first update.
            let policy = control.policy.lock().await;
            control.links().insert(node_id, (conn, tx.clone()));
            if let Some(msg) = update(&policy, node_id) {
                let _ = tx.try_send(Ok(msg));
            }
        }
        // The faults active for this node, with the time left (it may have restarted meanwhile).
        let (resend, cancels) = {
            let mut faults = control.faults.lock().await;
            let now = unix_ms();
            (
                faults.resend_for(node_id, now),
                faults.cancels_for(node_id, now),
            )
        };
        for start in resend {
            control.send_fault(node_id, FaultCmd::Start(start));
        }
        // Cancels it may have missed while its link was down (a node ignores one it does not run).
        for id in cancels {
            control.send_cancel(node_id, id).await;
        }
        tokio::spawn(async move {
            // The policy version this node refused last (not pushed again), and when the latest policy
            // was last pushed again to it.
            let mut refused = (0, 0);
            let mut repushed: Option<Instant> = None;
            loop {
                match inbound.message().await {
                    Ok(Some(NodeMessage {
                        msg: Some(NodeMsg::Heartbeat(hb)),
                    })) => {
                        let metrics = hb.metrics.unwrap_or_default();
                        let runs = (metrics.policy_epoch, metrics.policy_version);
                        // A node behind the latest policy (its push was lost, or it restarted on an old
                        // file) gets it again, at most every REPUSH_EVERY.
                        if repushed.is_none_or(|t| t.elapsed() >= REPUSH_EVERY) {
                            let policy = control.policy.lock().await;
                            let latest = (policy.epoch, policy.version);
                            if policy.version > 0
                                && runs != latest
                                && refused != latest
                                && let Some(msg) = update(&policy, node_id)
                            {
                                tracing::info!(
                                    node_id,
                                    ?runs,
                                    ?latest,
                                    "node runs an older policy: pushing the latest again"
                                );
                                let _ = tx.try_send(Ok(msg));
                                repushed = Some(Instant::now());
                            }
                        }
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
                        msg: Some(NodeMsg::PolicyAck(ack)),
                    })) => {
                        if !ack.applied {
                            refused = (control.policy.lock().await.epoch, ack.version);
                        }
                        let events = control.view().policy_ack(
                            conn,
                            node_id,
                            ack.version,
                            ack.applied,
                            ack.error,
                        );
                        control.log(events).await;
                    }
                    Ok(Some(NodeMessage {
                        msg: Some(NodeMsg::FaultEvent(e)),
                    })) => control.fault_event(node_id, e).await,
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
                        let mut links = control.links();
                        if links.get(&node_id).is_some_and(|(c, _)| *c == conn) {
                            links.remove(&node_id);
                        }
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
        Ok(Response::new(self.0.status()))
    }

    async fn history(
        &self,
        request: Request<HistoryRequest>,
    ) -> Result<Response<HistoryResponse>, Status> {
        let req = request.into_inner();
        let nodes = self.0.view().history(req.node_id, req.since_unix_ms);
        if req.node_id != 0 && nodes.is_empty() {
            return Err(Status::not_found(format!(
                "node {} never registered with this control plane",
                req.node_id
            )));
        }
        Ok(Response::new(HistoryResponse { nodes }))
    }

    async fn schedule_fault(
        &self,
        request: Request<ScheduleFaultRequest>,
    ) -> Result<Response<FaultSchedule>, Status> {
        self.0
            .schedule_fault(request.into_inner())
            .await
            .map(Response::new)
    }

    async fn list_faults(
        &self,
        _request: Request<ListFaultsRequest>,
    ) -> Result<Response<ListFaultsResponse>, Status> {
        Ok(Response::new(ListFaultsResponse {
            faults: self.0.list_faults().await,
        }))
    }

    async fn cancel_fault(
        &self,
        request: Request<CancelFaultRequest>,
    ) -> Result<Response<FaultSchedule>, Status> {
        self.0
            .cancel_fault(request.into_inner().id)
            .await
            .map(Response::new)
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

    async fn get_policy(
        &self,
        _request: Request<GetPolicyRequest>,
    ) -> Result<Response<ClusterPolicy>, Status> {
        Ok(Response::new(self.0.policy.lock().await.clone()))
    }

    async fn set_policy(
        &self,
        request: Request<SetPolicyRequest>,
    ) -> Result<Response<ClusterPolicy>, Status> {
        self.0
            .set_policy(request.into_inner())
            .await
            .map(Response::new)
    }
}
