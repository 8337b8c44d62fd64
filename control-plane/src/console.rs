//! The web console, served beside `/metrics` on `[metrics] addr`: `/ui` is one page (HTML, CSS and
//! JavaScript in the binary: no external asset, so it works on an air-gapped machine) that polls the
//! JSON endpoints below once a second and draws the cluster, per-node charts of the recorded history, the
//! live event log, the faults and the policy.
//!
//! - `GET /ui/api/status`: every node (up or down, role, term, indexes, lag, pool threads, queue depths,
//!   shed counts, policy version acknowledged), the leader, the policy version in force.
//! - `GET /ui/api/history?node=ID`: the node's retained samples (commit rate, replication lag, queue
//!   depth, pool threads).
//! - `GET /ui/api/events?after=SEQ`: the event log after a sequence number.
//! - `GET /ui/api/faults`, `POST /ui/api/faults` (schedule one), `POST /ui/api/faults/{id}/cancel`.
//! - `GET /ui/api/policy`, `POST /ui/api/policy` (the cluster-wide runtime policy).
//!
//! Every endpoint is a translation onto the `ControlService` calls the CLI uses, so the console shows and
//! changes exactly what `kiwi control` does. Access follows the control plane's other endpoints: without a
//! tokens file everything is open (allowed only on loopback); with one, every call needs a bearer token:
//! any role reads (`metrics`, `read`, `write`, `admin`), only `admin` changes. The page asks for the token
//! once, on the first 401, and keeps it for the tab (`sessionStorage`).

use std::sync::Arc;

use axum::Json;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use kiwi_proto::auth::{Authenticator, Role};
use kiwi_proto::v1::control_service_server::ControlService;
use kiwi_proto::v1::{
    CancelFaultRequest, ClusterStatusRequest, EventsRequest, FaultSchedule, FaultSpec,
    GetPolicyRequest, HistoryRequest, ListFaultsRequest, PriorityPolicy, RaftRole, RuntimePolicy,
    ScalingPolicy, ScheduleFaultRequest, SetPolicyRequest, fault_spec,
};
use serde::Deserialize;
use serde_json::{Value, json};
use tonic::Request;

use crate::service::ControlApi;

const PAGE: &str = include_str!("console.html");

#[derive(Clone)]
struct Console {
    api: ControlApi,
    auth: Option<Arc<Authenticator>>,
}

/// The console's routes, for the control plane's HTTP server.
pub fn router(api: ControlApi, auth: Option<Arc<Authenticator>>) -> axum::Router {
    axum::Router::new()
        .route("/ui", get(page))
        .route("/ui/", get(page))
        .route("/ui/api/status", get(status))
        .route("/ui/api/history", get(history))
        .route("/ui/api/events", get(events))
        .route("/ui/api/faults", get(faults).post(schedule))
        .route("/ui/api/faults/{id}/cancel", post(cancel))
        .route("/ui/api/policy", get(policy).post(set_policy))
        .with_state(Console { api, auth })
}

async fn page() -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (header::CACHE_CONTROL, "no-store"),
        ],
        PAGE,
    )
        .into_response()
}

/// An error answer: a JSON object with the message, which the page shows.
fn fail(code: StatusCode, message: impl Into<String>) -> Response {
    (code, Json(json!({ "error": message.into() }))).into_response()
}

fn from_status(s: &tonic::Status) -> Response {
    let code = match s.code() {
        tonic::Code::InvalidArgument | tonic::Code::OutOfRange => StatusCode::BAD_REQUEST,
        tonic::Code::NotFound => StatusCode::NOT_FOUND,
        tonic::Code::FailedPrecondition => StatusCode::CONFLICT,
        tonic::Code::Unauthenticated => StatusCode::UNAUTHORIZED,
        tonic::Code::PermissionDenied => StatusCode::FORBIDDEN,
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    };
    fail(code, s.message())
}

impl Console {
    /// The answer refusing a call needing `needed` (reads: any role; changes: admin), if it is refused.
    fn refusal(&self, headers: &HeaderMap, needed: Role, what: &str) -> Option<Response> {
        let auth = self.auth.as_ref()?;
        let header = headers
            .get(header::AUTHORIZATION)
            .map(axum::http::HeaderValue::as_bytes);
        let Ok(p) = auth.authenticate(header) else {
            return Some(
                (
                    StatusCode::UNAUTHORIZED,
                    [(header::WWW_AUTHENTICATE, "Bearer")],
                    Json(json!({"error": "a token is required: enter one of the control plane's tokens"})),
                )
                    .into_response(),
            );
        };
        let allowed = match needed {
            Role::Admin => p.role == Role::Admin,
            _ => true,
        };
        (!allowed).then(|| {
            fail(
                StatusCode::FORBIDDEN,
                format!(
                    "{what} needs the admin role; principal {} has {}",
                    p.name,
                    p.role.name()
                ),
            )
        })
    }
}

async fn status(State(c): State<Console>, headers: HeaderMap) -> Response {
    if let Some(r) = c.refusal(&headers, Role::Read, "status") {
        return r;
    }
    let s = match c
        .api
        .cluster_status(Request::new(ClusterStatusRequest {}))
        .await
    {
        Ok(r) => r.into_inner(),
        Err(e) => return from_status(&e),
    };
    let policy = c
        .api
        .get_policy(Request::new(GetPolicyRequest {}))
        .await
        .map(|p| p.into_inner().version)
        .unwrap_or(0);
    let leader_commit = s
        .nodes
        .iter()
        .find(|n| n.node_id == s.leader_id)
        .and_then(|n| n.metrics.as_ref())
        .map_or(0, |m| m.commit_index);
    let nodes: Vec<Value> = s
        .nodes
        .iter()
        .map(|n| {
            let m = n.metrics.clone().unwrap_or_default();
            let pool = m.storage_pool.clone().unwrap_or_default();
            let classes: Vec<Value> = m
                .classes
                .iter()
                .map(|k| json!({"class": k.class, "depth": k.depth, "shed": k.shed, "expired": k.expired}))
                .collect();
            json!({
                "id": n.node_id, "addr": n.client_addr, "up": n.up, "backend": n.backend,
                "role": if n.up { RaftRole::label(m.role) } else { "down" },
                "term": m.term, "commit": m.commit_index, "applied": m.applied_index,
                "lag": leader_commit.saturating_sub(m.applied_index),
                "threads": pool.current_threads, "queue": pool.queue_len,
                "utilisation": pool.utilisation_percent, "classes": classes,
                "shed": m.classes.iter().map(|k| k.shed).sum::<u64>(),
                "policy_version": n.policy_version, "policy_error": n.policy_error,
                "data_bytes": m.data_dir_bytes, "last_seen_unix_ms": n.last_seen_unix_ms,
            })
        })
        .collect();
    Json(json!({
        "cluster_id": format!("{:016x}", s.cluster_id), "leader": s.leader_id,
        "leader_changes": s.leader_changes, "commit_rate": s.commit_rate,
        "policy_version": policy, "nodes": nodes,
    }))
    .into_response()
}

#[derive(Deserialize)]
struct NodeQuery {
    node: u64,
}

async fn history(
    State(c): State<Console>,
    headers: HeaderMap,
    Query(q): Query<NodeQuery>,
) -> Response {
    if let Some(r) = c.refusal(&headers, Role::Read, "history") {
        return r;
    }
    let h = match c
        .api
        .history(Request::new(HistoryRequest {
            node_id: q.node,
            since_unix_ms: 0,
        }))
        .await
    {
        Ok(r) => r.into_inner(),
        Err(e) => return from_status(&e),
    };
    let samples: Vec<Value> = h
        .nodes
        .into_iter()
        .filter(|n| n.node_id == q.node)
        .flat_map(|n| n.samples)
        .map(|s| {
            json!({
                "t": s.at_unix_ms, "commit_rate": s.commit_rate, "lag": s.max_follower_lag,
                "replication_us": s.max_replication_latency_avg_us, "queue": s.queue_depth,
                "threads": s.pool_threads, "shed": s.shed,
            })
        })
        .collect();
    Json(json!({ "node": q.node, "samples": samples })).into_response()
}

#[derive(Deserialize)]
struct AfterQuery {
    #[serde(default)]
    after: u64,
}

async fn events(
    State(c): State<Console>,
    headers: HeaderMap,
    Query(q): Query<AfterQuery>,
) -> Response {
    if let Some(r) = c.refusal(&headers, Role::Read, "events") {
        return r;
    }
    match c
        .api
        .events(Request::new(EventsRequest {
            after_seq: q.after,
            limit: 200,
        }))
        .await
    {
        Ok(r) => {
            let r = r.into_inner();
            let events: Vec<Value> = r
                .events
                .iter()
                .map(|e| json!({"seq": e.seq, "t": e.at_unix_ms, "kind": e.kind, "node": e.node_id, "detail": e.detail}))
                .collect();
            Json(json!({"events": events, "next": r.next_after_seq})).into_response()
        }
        Err(e) => from_status(&e),
    }
}

fn fault_kind(spec: Option<&FaultSpec>) -> String {
    match spec.and_then(|s| s.kind.as_ref()) {
        Some(fault_spec::Kind::Delay(d)) => format!("delay {} ms", d.delay_ms),
        Some(fault_spec::Kind::Partition(p)) => format!("partition {:?}", p.isolated_nodes),
        Some(fault_spec::Kind::Loss(l)) => format!("loss {:.0} %", l.drop_rate * 100.0),
        Some(fault_spec::Kind::Crash(_)) => "crash".into(),
        Some(fault_spec::Kind::DiskStall(d)) => format!("disk stall {} ms", d.delay_ms),
        None => "unknown".into(),
    }
}

fn fault_json(f: &FaultSchedule) -> Value {
    json!({
        "id": f.id, "fault": fault_kind(f.spec.as_ref()), "targets": f.targets,
        "start_unix_ms": f.start_at_unix_ms, "duration_ms": f.duration_ms, "state": f.state,
        "nodes": f.nodes.iter().map(|n| json!({"node": n.node_id, "state": n.state, "detail": n.detail})).collect::<Vec<_>>(),
    })
}

async fn faults(State(c): State<Console>, headers: HeaderMap) -> Response {
    if let Some(r) = c.refusal(&headers, Role::Read, "faults") {
        return r;
    }
    match c.api.list_faults(Request::new(ListFaultsRequest {})).await {
        Ok(r) => Json(json!({
            "faults": r.into_inner().faults.iter().map(fault_json).collect::<Vec<_>>()
        }))
        .into_response(),
        Err(e) => from_status(&e),
    }
}

/// A fault to schedule, as the page's form sends it.
#[derive(Deserialize)]
struct NewFault {
    /// `delay`, `partition`, `loss`, `crash` or `disk_stall`.
    kind: String,
    /// The node it applies to.
    node: u64,
    duration_ms: u64,
    /// Milliseconds of delay (delay, disk_stall) or percent dropped (loss).
    #[serde(default)]
    amount: f64,
}

async fn schedule(
    State(c): State<Console>,
    headers: HeaderMap,
    Json(f): Json<NewFault>,
) -> Response {
    if let Some(r) = c.refusal(&headers, Role::Admin, "scheduling a fault") {
        return r;
    }
    let amount = f.amount.max(0.0);
    let kind = match f.kind.as_str() {
        "delay" => fault_spec::Kind::Delay(kiwi_proto::v1::NetworkDelay {
            delay_ms: amount as u64,
            jitter_ms: 0,
        }),
        "partition" => fault_spec::Kind::Partition(kiwi_proto::v1::NetworkPartition {
            isolated_nodes: vec![f.node],
        }),
        "loss" => fault_spec::Kind::Loss(kiwi_proto::v1::MessageLoss {
            drop_rate: (amount / 100.0).min(1.0),
        }),
        "crash" => fault_spec::Kind::Crash(kiwi_proto::v1::NodeCrash {}),
        "disk_stall" => fault_spec::Kind::DiskStall(kiwi_proto::v1::DiskStall {
            delay_ms: amount as u64,
        }),
        other => {
            return fail(
                StatusCode::BAD_REQUEST,
                format!(
                    "unknown fault kind {other:?}: delay, partition, loss, crash or disk_stall"
                ),
            );
        }
    };
    let req = ScheduleFaultRequest {
        spec: Some(FaultSpec {
            kind: Some(kind),
            peers: Vec::new(),
        }),
        targets: vec![f.node],
        start_after_ms: 0,
        duration_ms: f.duration_ms,
    };
    match c.api.schedule_fault(Request::new(req)).await {
        Ok(r) => Json(fault_json(&r.into_inner())).into_response(),
        Err(e) => from_status(&e),
    }
}

async fn cancel(State(c): State<Console>, headers: HeaderMap, Path(id): Path<u64>) -> Response {
    if let Some(r) = c.refusal(&headers, Role::Admin, "cancelling a fault") {
        return r;
    }
    match c
        .api
        .cancel_fault(Request::new(CancelFaultRequest { id }))
        .await
    {
        Ok(r) => Json(fault_json(&r.into_inner())).into_response(),
        Err(e) => from_status(&e),
    }
}

fn policy_json(p: &RuntimePolicy) -> Value {
    let s = p.scaling.unwrap_or_default();
    let q = p.priority.unwrap_or_default();
    json!({
        "scaling": {"enabled": s.enabled, "min_threads": s.min_storage_threads, "max_threads": s.max_storage_threads},
        "priority": {"enabled": q.enabled, "weights": [q.high_priority_weight, q.normal_priority_weight, q.low_priority_weight]},
    })
}

async fn policy(State(c): State<Console>, headers: HeaderMap) -> Response {
    if let Some(r) = c.refusal(&headers, Role::Read, "policy") {
        return r;
    }
    match c.api.get_policy(Request::new(GetPolicyRequest {})).await {
        Ok(r) => {
            let p = r.into_inner();
            // Before any policy is set, the nodes run the defaults (or their config files' policy).
            let shown = p.policy.unwrap_or_else(kiwi_proto::policy::default_policy);
            Json(json!({
                "version": p.version,
                "set": p.policy.is_some(),
                "policy": policy_json(&shown),
                "overrides": p.overrides.len(),
            }))
            .into_response()
        }
        Err(e) => from_status(&e),
    }
}

/// The policy form: what the page lets change (the rest stays as it is).
#[derive(Deserialize)]
struct PolicyForm {
    priority: bool,
    scaling: bool,
    min_threads: u32,
    max_threads: u32,
    weights: [u32; 3],
}

async fn set_policy(
    State(c): State<Console>,
    headers: HeaderMap,
    Json(f): Json<PolicyForm>,
) -> Response {
    if let Some(r) = c.refusal(&headers, Role::Admin, "setting the policy") {
        return r;
    }
    let current = match c.api.get_policy(Request::new(GetPolicyRequest {})).await {
        Ok(r) => r
            .into_inner()
            .policy
            .unwrap_or_else(kiwi_proto::policy::default_policy),
        Err(e) => return from_status(&e),
    };
    let mut policy = current;
    let scaling = policy.scaling.get_or_insert_with(ScalingPolicy::default);
    scaling.enabled = f.scaling;
    scaling.min_storage_threads = f.min_threads;
    scaling.max_storage_threads = f.max_threads;
    let priority = policy.priority.get_or_insert_with(PriorityPolicy::default);
    priority.enabled = f.priority;
    priority.high_priority_weight = f.weights[0];
    priority.normal_priority_weight = f.weights[1];
    priority.low_priority_weight = f.weights[2];
    match c
        .api
        .set_policy(Request::new(SetPolicyRequest {
            policy: Some(policy),
            node_id: 0,
            clear_override: false,
        }))
        .await
    {
        Ok(r) => {
            let p = r.into_inner();
            Json(json!({"version": p.version, "policy": p.policy.as_ref().map(policy_json)}))
                .into_response()
        }
        Err(e) => from_status(&e),
    }
}
