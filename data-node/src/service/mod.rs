//! The gRPC services clients use: `KvService` (the KV API, [`kv`]) and `NodeAdmin` (status, membership,
//! runtime policy, [`admin`]), over the shared state in [`KvServer`]; errors and their one mapping to gRPC
//! statuses are in [`error`].
//!
//! Request path: validate and tag (request id, deadline) → writes are proposed to the Raft driver and
//! answered when applied; linearizable reads run a ReadIndex round on the leader and wait until the
//! applied index reaches it; serializable reads go straight to local storage. Storage calls run on the
//! storage worker pool, through the priority channel (`runtime`), never on async worker threads; only a
//! write's hand-off to Raft (encode and submit: microseconds, never blocking) runs at once on the network
//! thread when nothing is queued ([`crate::runtime::priority_channel::PriorityMessageChannel::try_serve_inline`]).
//!
//! Errors are mapped to `tonic::Status` in exactly one place, [`KvError::into_status`].

mod admin;
pub mod disk;
pub mod error;
pub mod etcd;
mod kv;
mod lease;
mod watch;

pub use admin::AdminApi;
pub use error::KvError;
pub use kv::KvApi;
pub use lease::spawn_lease_upkeep;
pub use watch::{Retention, spawn_history_upkeep};

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use kiwi_proto::connections::{AnswerBudget, AnswerHold};
use kiwi_proto::v1::{
    Consistency, RaftCommand, RequestHeader, ResponseHeader, WriteBatchCommand, WriteOp,
    raft_command, write_op,
};
use kiwi_storage::{BackendKind, KeySpace, Limits, StorageBackend};
use prost::Message as _;
use tracing::{Instrument as _, Span};

use crate::config::NodeConfig;
use crate::raft::driver::{DriverHandle, ProposeError};
use crate::raft::snapshot::InstallGate;
use crate::raft::state_machine::ApplyOutcome;
use crate::raft::transport::Members;
use crate::runtime::priority_channel::{Class, PriorityMessageChannel, Refused};
use crate::runtime::worker_pool::{Job, WorkerPool};
use crate::telemetry;
use crate::telemetry::tracing::Sampling;

/// A closure run by the storage stage, answering its caller on a oneshot.
struct StagedJob<R> {
    f: Box<dyn FnOnce() -> Result<R, KvError> + Send>,
    tx: tokio::sync::oneshot::Sender<Result<R, KvError>>,
    timeout: Duration,
    /// The request's span when traced (else disabled), and its `queue.wait` child, open while queued.
    trace: Span,
    queued: Span,
}

impl<R: Send> Job for StagedJob<R> {
    fn run(self: Box<Self>) {
        let StagedJob {
            f,
            tx,
            trace,
            queued,
            ..
        } = *self;
        drop(queued);
        let r = storage_span(&trace).in_scope(f);
        let _ = tx.send(r);
    }

    fn expire(self: Box<Self>) {
        let _ = self.tx.send(Err(KvError::Expired(self.timeout)));
    }
}

/// The `queue.wait` child of a traced request's span, open while the request waits for the storage stage.
fn queue_span(tagged: &Tagged) -> Span {
    if tagged.trace.is_disabled() {
        Span::none()
    } else {
        tracing::debug_span!(parent: &tagged.trace, "queue.wait", priority = tagged.class.name())
    }
}

/// The `storage` child of a traced request's span (`trace`), open while the storage stage works on it.
fn storage_span(trace: &Span) -> Span {
    if trace.is_disabled() {
        Span::none()
    } else {
        tracing::debug_span!(parent: trace, "storage")
    }
}

/// How long AddNode waits for a learner to catch up before giving up (it stays a learner).
pub const CATCH_UP_TIMEOUT: Duration = Duration::from_secs(120);

/// Most operations in one BatchWrite.
pub const MAX_BATCH_OPS: usize = 10_000;
/// Most bytes (keys plus values) in one BatchWrite, unless one key plus one value at the node's limits is
/// larger: then that is the limit, so that any value the node accepts can be written.
pub const MAX_BATCH_BYTES: usize = 16 * 1024 * 1024;
/// Largest Scan limit.
pub const MAX_SCAN_LIMIT: u32 = 10_000;
/// Most key and value bytes in one Scan answer (it then ends early with `more = true`); an answer always
/// holds at least one pair, whatever its size.
pub const MAX_SCAN_BYTES: usize = 4 * 1024 * 1024;
/// Longest request timeout a header may ask for; longer ones are cut to it.
pub const MAX_TIMEOUT: Duration = Duration::from_secs(60);

/// The batch byte limit for a node with these limits.
pub fn batch_bytes_limit(limits: Limits) -> usize {
    MAX_BATCH_BYTES.max(limits.max_key_bytes + limits.max_value_bytes)
}

/// Largest request message a node with these limits decodes: a batch at its limit plus room for the
/// per-operation framing and the header.
pub fn max_request_bytes(limits: Limits) -> usize {
    batch_bytes_limit(limits) + MAX_BATCH_OPS * 16 + 1024 * 1024
}
/// How long a request may take when neither the header nor the client sets a deadline.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest request id accepted.
const MAX_REQUEST_ID: usize = 128;

/// Metadata key naming the leader's id on a FAILED_PRECONDITION "not leader" status.
pub const LEADER_ID_METADATA: &str = "kiwi-leader-id";
/// Metadata key with the milliseconds after which a shed request may be retried.
pub const RETRY_AFTER_METADATA: &str = "retry-after-ms";
/// Metadata key set to "true" on every status that guarantees the request did nothing.
pub const RETRY_SAFE_METADATA: &str = "kiwi-retry-safe";
/// Metadata key naming the leader's client address on a "not leader" status.
pub const LEADER_ADDR_METADATA: &str = "kiwi-leader-addr";

/// Shared state of the client-facing services.
pub struct KvServer {
    node_id: u64,
    driver: DriverHandle,
    storage: Arc<dyn StorageBackend>,
    /// Refuses reads that overlap a snapshot install.
    gate: Arc<InstallGate>,
    /// The configured limits: admission rules for requests (storage enforces only the shared ceilings).
    limits: Limits,
    backend: BackendKind,
    /// Client address of every member, for leader hints.
    addrs: Arc<Members>,
    cluster: Arc<AtomicU64>,
    /// The storage stage's queue.
    channel: Arc<PriorityMessageChannel<Box<dyn Job>>>,
    /// The storage stage's threads.
    pool: Arc<WorkerPool>,
    /// The node's configuration, with the runtime policy in force (changed by SetRuntimePolicy).
    config: std::sync::Mutex<NodeConfig>,
    next_request: AtomicU64,
    /// CRITICAL requests from principals without the admin role, served as HIGH.
    critical_downgrades: opentelemetry::metrics::Counter<u64>,
    /// Bytes of large answers waiting for their clients to read them (`[connections]`).
    answers: Arc<AnswerBudget>,
    /// Watch streams open (at most [`watch::MAX_WATCH_STREAMS`]).
    watch_streams: std::sync::atomic::AtomicUsize,
    /// A defragmentation is under way (one at a time).
    defragmenting: std::sync::atomic::AtomicBool,
    /// The URL of this node's etcd API, once it serves one.
    etcd_url: std::sync::OnceLock<String>,
    /// Refuses writes that add data while the disk is nearly full.
    disk: Arc<disk::DiskGuard>,
    /// The leader's lease deadlines.
    leases: crate::lease::LeaseTable,
    /// The smallest TTL a lease is granted (seconds; from the election timeout).
    min_lease_ttl: i64,
}

/// The role each gRPC method of the node needs when authentication is on (`None`: open). Reads and the
/// node status (leader discovery) need `read`; writes `write`; every other KvService or NodeAdmin call
/// `admin`. Health checks, reflection and `MemberInfo` (a member's etcd URL, public as etcd's
/// MemberList) are open; `RaftTransport` is for members, whose guard is the
/// membership check (and mutual TLS, once built), not tokens.
pub fn method_role(path: &str) -> Option<kiwi_proto::auth::Role> {
    use kiwi_proto::auth::Role;
    let (service, method) = path.trim_start_matches('/').split_once('/')?;
    match (service, method) {
        ("kiwi.v1.NodeAdmin", "MemberInfo") => None,
        ("kiwi.v1.KvService", "Get" | "Scan" | "Watch" | "LeaseTimeToLive" | "LeaseLeases")
        | ("kiwi.v1.NodeAdmin", "Status") => Some(Role::Read),
        (
            "kiwi.v1.KvService",
            "Put" | "Delete" | "BatchWrite" | "CompareAndSwap" | "DeleteRange" | "Txn"
            | "LeaseGrant" | "LeaseRevoke" | "LeaseKeepAlive",
        ) => Some(Role::Write),
        ("kiwi.v1.KvService" | "kiwi.v1.NodeAdmin", _) => Some(Role::Admin),
        _ => None,
    }
}

/// The first key a command would put (writes that add data: what the low-disk guard refuses).
fn first_put_key(command: &raft_command::Command) -> Option<&[u8]> {
    use kiwi_proto::v1::{txn_op, write_op};
    match command {
        raft_command::Command::Write(w) => w.ops.iter().find_map(|op| match &op.op {
            Some(write_op::Op::Put(p)) => Some(p.key.as_slice()),
            _ => None,
        }),
        raft_command::Command::CompareAndSwap(c) => Some(c.key.as_slice()),
        raft_command::Command::Txn(t) => {
            t.success
                .iter()
                .chain(&t.failure)
                .find_map(|op| match &op.op {
                    Some(txn_op::Op::Put(p)) => Some(p.key.as_slice()),
                    _ => None,
                })
        }
        _ => None,
    }
}

/// Whether a request may use `PRIORITY_CRITICAL`: with authentication on (an authenticated principal in
/// the request's extensions), only an admin may; with it off, anyone.
pub(crate) fn may_use_critical<T>(request: &tonic::Request<T>) -> bool {
    request
        .extensions()
        .get::<kiwi_proto::auth::Principal>()
        .is_none_or(|p| p.role == kiwi_proto::auth::Role::Admin)
}

/// What [`KvServer::new`] is built from.
pub struct KvServerParts {
    pub node_id: u64,
    pub driver: DriverHandle,
    pub storage: Arc<dyn StorageBackend>,
    pub gate: Arc<InstallGate>,
    /// Client address of every member, for leader hints.
    pub addrs: Arc<Members>,
    pub cluster: Arc<AtomicU64>,
    pub channel: Arc<PriorityMessageChannel<Box<dyn Job>>>,
    pub pool: Arc<WorkerPool>,
    pub config: NodeConfig,
    /// Where `kiwi_runtime_priority_downgrades_total` is recorded.
    pub meter: opentelemetry::metrics::Meter,
    /// The low-disk guard (`[storage] min_free_bytes`).
    pub disk: Arc<disk::DiskGuard>,
}

/// The connection a request came on (local and remote address), for the answer budget.
type Connection = (Option<std::net::SocketAddr>, Option<std::net::SocketAddr>);

fn connection_of<T>(request: &tonic::Request<T>) -> Connection {
    (request.local_addr(), request.remote_addr())
}

/// A request's tags after validation.
struct Tagged {
    request_id: String,
    timeout: Duration,
    /// When the request must be answered by.
    deadline: std::time::Instant,
    class: Class,
    /// The request's span when it is traced (sampled), parent of the stages' spans; else disabled.
    trace: Span,
}

/// Opens the span of one KV request (`name` is `kv.<Method>`), continuing the caller's W3C trace.
/// Public for the telemetry benchmark, which measures what it costs.
pub fn request_span<T>(name: &'static str, request: &tonic::Request<T>) -> Span {
    // One callsite per target: the OpenTelemetry layer only sees requests chosen for tracing, so the
    // others cost one log span, not an OpenTelemetry span each.
    macro_rules! span {
        ($target:expr) => {
            tracing::info_span!(
                target: $target,
                "kv.request",
                otel.name = name,
                otel.kind = "server",
                rpc.system = "grpc",
                rpc.method = name.trim_start_matches("kv."),
                priority = tracing::field::Empty,
                request_id = tracing::field::Empty,
                outcome = tracing::field::Empty,
                rpc.grpc.status_code = tracing::field::Empty,
                otel.status_code = tracing::field::Empty,
            )
        };
    }
    match telemetry::tracing::head_sample(request.metadata()) {
        // Nothing would read an untraced request's span unless the logs show DEBUG lines of requests
        // ("request finished"): at INFO a span would only cost its formatting on every request (a few
        // per cent of the CPU of a point read). The one line such a request may still write, an
        // unexpected failure, carries its request_id by itself (see `traced`).
        Sampling::Untraced if !tracing::enabled!(tracing::Level::DEBUG) => Span::none(),
        Sampling::Untraced => span!("kiwi_node::request"),
        Sampling::Root => span!("kiwi_node::trace"),
        Sampling::Continue(parent) => {
            let span = span!("kiwi_node::trace");
            telemetry::tracing::set_parent(&span, parent);
            span
        }
    }
}

tokio::task_local! {
    /// The request id of a request handled without a span (see [`request_span`]), set by `tag`.
    static REQUEST_ID: std::cell::RefCell<String>;
}

/// [`traced`] for an answer that may hold a share of the answer budget: the hold goes into the
/// response's extensions, where the connection layer keeps it until the client has read the answer.
pub async fn traced_held<T>(
    span: Span,
    body: impl std::future::Future<Output = Result<(T, Option<AnswerHold>), KvError>>,
) -> Result<tonic::Response<T>, tonic::Status> {
    let (metadata, (answer, hold), mut extensions) = traced(span, body).await?.into_parts();
    if let Some(hold) = hold {
        extensions.insert(hold);
    }
    Ok(tonic::Response::from_parts(metadata, answer, extensions))
}

/// Runs a handler's body inside its request span and records how it ended. Public for the telemetry
/// benchmark.
///
/// # Errors
/// The body's error, as a gRPC status.
pub async fn traced<T>(
    span: Span,
    body: impl std::future::Future<Output = Result<T, KvError>>,
) -> Result<tonic::Response<T>, tonic::Status> {
    if span.is_disabled() {
        return REQUEST_ID
            .scope(std::cell::RefCell::new(String::new()), async {
                let r = body
                    .await
                    .map(tonic::Response::new)
                    .map_err(KvError::into_status);
                if let Err(s) = &r
                    && unexpected(s.code())
                {
                    REQUEST_ID.with(|id| {
                        tracing::warn!(
                            request_id = id.borrow().as_str(),
                            code = ?s.code(),
                            message = s.message(),
                            "request failed"
                        );
                    });
                }
                r
            })
            .await;
    }
    let r = body
        .instrument(span.clone())
        .await
        .map(tonic::Response::new)
        .map_err(KvError::into_status);
    if !span.is_disabled() {
        let code = r
            .as_ref()
            .map_or_else(tonic::Status::code, |_| tonic::Code::Ok);
        span.in_scope(|| match &r {
            // Failures the node did not expect are logged; the line carries the span's request_id.
            Err(s) if unexpected(s.code()) => {
                tracing::warn!(code = ?s.code(), message = s.message(), "request failed");
            }
            _ => tracing::debug!(code = ?code, "request finished"),
        });
        span.record("rpc.grpc.status_code", code as i64);
        if code == tonic::Code::Ok {
            span.record("outcome", "ok");
        } else {
            span.record("outcome", "error");
            span.record("otel.status_code", "ERROR");
        }
    }
    r
}

/// Fills the request span's fields; without a span, keeps the request's id for `traced`'s failure line.
fn note_request(span: &Span, request_id: &str, class: Class) {
    if span.is_disabled() {
        let _ = REQUEST_ID.try_with(|id| request_id.clone_into(&mut id.borrow_mut()));
    } else {
        span.record("request_id", request_id);
        span.record("priority", class.name());
    }
}

/// Failures the node did not expect (they are logged).
fn unexpected(code: tonic::Code) -> bool {
    matches!(
        code,
        tonic::Code::Internal | tonic::Code::Unknown | tonic::Code::DataLoss
    )
}

impl KvServer {
    pub fn new(parts: KvServerParts) -> Arc<Self> {
        let KvServerParts {
            node_id,
            driver,
            storage,
            gate,
            addrs,
            cluster,
            channel,
            pool,
            config,
            meter,
            disk,
        } = parts;
        let critical_downgrades = meter
            .u64_counter("kiwi_runtime_priority_downgrades")
            .with_description(
                "CRITICAL requests from principals without the admin role, served as HIGH",
            )
            .build();
        critical_downgrades.add(0, &[]);
        let answers = AnswerBudget::new(
            config.connections.answer_buffer_per_connection.as_u64() as usize,
            config.connections.answer_buffer_total.as_u64() as usize,
        );
        {
            let answers = Arc::clone(&answers);
            meter
                .u64_observable_gauge("kiwi_runtime_answer_buffer")
                .with_unit("By")
                .with_description(
                    "Bytes of large answers (Get, Scan) waiting for their clients to read them \
                     (at most [connections] answer_buffer_total, plus the last pair of a scan)",
                )
                .with_callback(move |o| o.observe(answers.held() as u64, &[]))
                .build();
        }
        let min_lease_ttl = crate::lease::min_ttl(
            config
                .raft
                .tick_interval
                .saturating_mul(u32::try_from(config.raft.election_ticks).unwrap_or(u32::MAX)),
        );
        Arc::new(KvServer {
            node_id,
            driver,
            limits: config.storage.limits(),
            storage,
            gate,
            backend: config.storage.backend,
            addrs,
            cluster,
            channel,
            pool,
            config: std::sync::Mutex::new(config),
            next_request: AtomicU64::new(1),
            critical_downgrades,
            answers,
            watch_streams: std::sync::atomic::AtomicUsize::new(0),
            defragmenting: std::sync::atomic::AtomicBool::new(false),
            etcd_url: std::sync::OnceLock::new(),
            disk,
            leases: crate::lease::LeaseTable::default(),
            min_lease_ttl,
        })
    }

    /// A share of the answer budget for a large answer on `connection`: up to `want` bytes, at least
    /// `min`, waiting for room until the request's deadline.
    async fn hold_answer(
        &self,
        tagged: &Tagged,
        connection: Connection,
        min: usize,
        want: usize,
    ) -> Result<AnswerHold, KvError> {
        let left = tagged
            .deadline
            .saturating_duration_since(std::time::Instant::now());
        self.answers
            .hold(connection, min, want, left)
            .await
            .map_err(KvError::NoRoom)
    }

    fn tag(&self, header: Option<&RequestHeader>, may_critical: bool) -> Result<Tagged, KvError> {
        let mut request_id = header.map(|h| h.request_id.clone()).unwrap_or_default();
        if request_id.len() > MAX_REQUEST_ID {
            return Err(KvError::InvalidArgument(format!(
                "request_id is {} bytes, over the limit of {MAX_REQUEST_ID}",
                request_id.len()
            )));
        }
        if request_id.is_empty() {
            request_id = format!(
                "n{}-{}",
                self.node_id,
                self.next_request.fetch_add(1, Ordering::Relaxed)
            );
        }
        let timeout = match header.and_then(|h| h.timeout) {
            None => DEFAULT_TIMEOUT,
            Some(d) if d.seconds < 0 || d.nanos < 0 || d.nanos >= 1_000_000_000 => {
                return Err(KvError::InvalidArgument(format!(
                    "header.timeout must be a non-negative duration (seconds >= 0, nanos 0 to \
                     999999999), got {}s {}ns",
                    d.seconds, d.nanos
                )));
            }
            Some(d) if d.seconds == 0 && d.nanos == 0 => DEFAULT_TIMEOUT,
            Some(d) => Duration::new(
                u64::try_from(d.seconds)
                    .unwrap_or(u64::MAX)
                    .min(MAX_TIMEOUT.as_secs()),
                u32::try_from(d.nanos).unwrap_or(0),
            )
            .min(MAX_TIMEOUT),
        };
        let mut class = Class::from_wire(header.map_or(0, |h| h.priority));
        if class == Class::Critical && !may_critical {
            class = Class::High;
            self.critical_downgrades.add(1, &[]);
        }
        // Called inside the request span (if any).
        let span = Span::current();
        note_request(&span, &request_id, class);
        let trace = if telemetry::tracing::is_traced(&span) {
            span
        } else {
            Span::none()
        };
        Ok(Tagged {
            request_id,
            timeout,
            deadline: std::time::Instant::now() + timeout,
            class,
            trace,
        })
    }

    /// The security settings this node runs with, for `NodeAdmin.Status`.
    fn security_status(&self) -> kiwi_proto::v1::SecurityStatus {
        let config = self
            .config
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let sec = &config.security;
        kiwi_proto::v1::SecurityStatus {
            tls: sec.cert_file.is_some(),
            mutual_tls: sec.cert_file.is_some() && sec.ca_file.is_some(),
            tokens: sec.tokens_file.is_some(),
            raft_listen_addr: config
                .raft_listen_addr
                .map(|a| a.to_string())
                .unwrap_or_default(),
        }
    }

    fn header(&self, tagged: &Tagged, applied_index: u64) -> Option<ResponseHeader> {
        Some(ResponseHeader {
            node_id: self.node_id,
            applied_index,
            request_id: tagged.request_id.clone(),
            term: self.driver.status().term,
            revision: applied_index,
        })
    }

    /// Refuses a read at a revision newer than the store's (`applied`: the index the read waits for).
    fn check_not_future(&self, at: u64, applied: u64) -> Result<(), KvError> {
        let current = applied.max(self.driver.status().applied);
        if at > current {
            return Err(KvError::FutureRevision { asked: at, current });
        }
        Ok(())
    }

    fn not_leader(&self, leader: u64) -> KvError {
        if leader == 0 {
            return KvError::NoLeader;
        }
        KvError::NotLeader {
            node: self.node_id,
            leader,
            leader_addr: self.addrs.get(leader),
        }
    }

    fn map_propose(&self, e: ProposeError) -> KvError {
        match e {
            ProposeError::NotLeader { leader_id } => self.not_leader(leader_id),
            ProposeError::Overloaded => KvError::Overloaded,
            ProposeError::Stopped => KvError::Stopped,
            ProposeError::StoppedAfterSubmit => KvError::Unknown(e.to_string()),
            ProposeError::Dropped => KvError::Dropped(e),
            ProposeError::OutcomeUnknown => KvError::Unknown(e.to_string()),
            ProposeError::ConfChangePending => KvError::Precondition(e.to_string()),
            ProposeError::Refused(m) => KvError::Precondition(m),
            ProposeError::Rejected(_) => KvError::InvalidArgument(e.to_string()),
            ProposeError::Removed => KvError::Removed(self.node_id),
        }
    }

    fn check_key(&self, key: &[u8]) -> Result<(), KvError> {
        self.limits
            .check_key(KeySpace::Data, key)
            .map_err(KvError::Storage)
    }

    /// Proposes puts and deletes applied atomically (Put, Delete and BatchWrite).
    async fn propose_write(
        &self,
        tagged: &Tagged,
        ops: Vec<WriteOp>,
    ) -> Result<ApplyOutcome, KvError> {
        self.propose(
            tagged,
            raft_command::Command::Write(WriteBatchCommand { ops }),
        )
        .await
    }

    async fn propose(
        &self,
        tagged: &Tagged,
        command: raft_command::Command,
    ) -> Result<ApplyOutcome, KvError> {
        if let Some(key) = first_put_key(&command) {
            self.disk.admit(key).map_err(KvError::NoSpace)?;
        }
        let cmd = RaftCommand {
            request_id: tagged.request_id.clone(),
            command: Some(command),
        };
        // The storage stage encodes and hands the proposal to Raft (microseconds, never blocking); the
        // wait for the commit is not work, so it happens here, off the pool.
        let driver = self.driver.clone();
        let trace = tagged.trace.clone();
        let submitted = self
            .staged_brief(
                tagged,
                move || Ok(driver.submit(cmd.encode_to_vec(), trace)),
            )
            .await?;
        let rx = submitted.map_err(|e| self.map_propose(e))?;
        let left = tagged
            .deadline
            .saturating_duration_since(std::time::Instant::now());
        match tokio::time::timeout(left, rx).await {
            Ok(Ok(r)) => r.map_err(|e| self.map_propose(e)),
            Ok(Err(_)) => Err(KvError::Unknown(
                "the Raft driver stopped after the write was handed to it; its outcome is unknown"
                    .into(),
            )),
            Err(_) => Err(KvError::Timeout(tagged.timeout)),
        }
    }

    /// A ReadIndex round, then the wait until this node has applied up to its index; returns the
    /// applied index.
    async fn read_index_applied(&self) -> Result<u64, KvError> {
        let index = self
            .driver
            .read_index()
            .await
            .map_err(|e| self.map_propose(e))?;
        self.driver
            .wait_applied(index)
            .await
            .map_err(|e| self.map_propose(e))
    }

    /// Waits until local state reflects every write acknowledged before now (leader only).
    async fn linearize(&self, tagged: &Tagged) -> Result<u64, KvError> {
        let fut = self.read_index_applied();
        let span = if tagged.trace.is_disabled() {
            Span::none()
        } else {
            tracing::debug_span!(parent: &tagged.trace, "raft.read_index")
        };
        match tokio::time::timeout(tagged.timeout, fut.instrument(span)).await {
            Ok(r) => r,
            Err(_) => Err(KvError::Timeout(tagged.timeout)),
        }
    }

    async fn read_point(&self, consistency: i32, tagged: &Tagged) -> Result<u64, KvError> {
        if self.driver.status().removed {
            return Err(KvError::Removed(self.node_id));
        }
        match Consistency::try_from(consistency).unwrap_or(Consistency::Unspecified) {
            Consistency::Serializable => Ok(self.driver.status().applied),
            _ => self.linearize(tagged).await,
        }
    }

    /// [`Self::staged`] for work of microseconds that never blocks: with nothing queued it runs at once
    /// on this thread (`WorkerPool::try_serve_inline`), saving a worker's two thread wake-ups, with the
    /// same spans (no wait, then the work). A request already past its deadline takes the queue, which
    /// refuses it as expired (never run).
    async fn staged_brief<R: Send + 'static>(
        &self,
        tagged: &Tagged,
        f: impl FnOnce() -> Result<R, KvError> + Send + 'static,
    ) -> Result<R, KvError> {
        if std::time::Instant::now() < tagged.deadline && self.pool.try_serve_inline(tagged.class) {
            drop(queue_span(tagged));
            return storage_span(&tagged.trace).in_scope(f);
        }
        self.staged(tagged, f).await
    }

    /// Runs `f` in the storage stage: through the priority channel (which may refuse it at once) on a
    /// pool thread.
    async fn staged<R: Send + 'static>(
        &self,
        tagged: &Tagged,
        f: impl FnOnce() -> Result<R, KvError> + Send + 'static,
    ) -> Result<R, KvError> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let queued = queue_span(tagged);
        let job: Box<dyn Job> = Box::new(StagedJob {
            f: Box::new(f),
            tx,
            timeout: tagged.timeout,
            trace: tagged.trace.clone(),
            queued,
        });
        self.channel
            .try_send(tagged.class, tagged.deadline, job)
            .map_err(|e| match e {
                Refused::Closed => KvError::Stopped,
                e => KvError::Shed(e),
            })?;
        if matches!(tagged.class, Class::Critical | Class::High) {
            self.pool.urgent_queued();
        }
        rx.await.map_err(|_| KvError::Stopped)?
    }

    /// A read of user data in the storage stage, refused if a snapshot install overlapped it.
    async fn read_data<T: Send + 'static>(
        &self,
        tagged: &Tagged,
        f: impl FnOnce(&dyn StorageBackend) -> kiwi_storage::Result<T> + Send + 'static,
    ) -> Result<T, KvError> {
        self.staged(tagged, self.gated(f)).await
    }

    /// [`Self::read_data`] for a point read (one key): with nothing queued it is served at once on this
    /// thread, as a write's hand-off to Raft is ([`Self::staged_brief`]); it never passes a queued
    /// request, and LOW reads always queue. A point read is one engine lookup, mostly from memory: the
    /// worker's two thread wake-ups cost more than the read.
    async fn read_point_data<T: Send + 'static>(
        &self,
        tagged: &Tagged,
        f: impl FnOnce(&dyn StorageBackend) -> kiwi_storage::Result<T> + Send + 'static,
    ) -> Result<T, KvError> {
        self.staged_brief(tagged, self.gated(f)).await
    }

    /// `f` on the storage, refused if a snapshot install overlaps it.
    fn gated<T, F>(&self, f: F) -> impl FnOnce() -> Result<T, KvError> + Send + 'static + use<T, F>
    where
        F: FnOnce(&dyn StorageBackend) -> kiwi_storage::Result<T> + Send + 'static,
    {
        let storage = Arc::clone(&self.storage);
        let gate = Arc::clone(&self.gate);
        move || {
            gate.read(|| f(&*storage))
                .ok_or(KvError::Installing)?
                .map_err(KvError::Storage)
        }
    }

    fn check_ops(&self, ops: &[WriteOp]) -> Result<(), KvError> {
        if ops.is_empty() {
            return Err(KvError::InvalidArgument(
                "a batch needs at least one operation".into(),
            ));
        }
        if ops.len() > MAX_BATCH_OPS {
            return Err(KvError::InvalidArgument(format!(
                "batch has {} operations, over the limit of {MAX_BATCH_OPS}",
                ops.len()
            )));
        }
        let mut bytes = 0;
        for (i, op) in ops.iter().enumerate() {
            let checked = match &op.op {
                Some(write_op::Op::Put(p)) => {
                    bytes += p.key.len() + p.value.len();
                    self.limits
                        .check_key(KeySpace::Data, &p.key)
                        .and_then(|()| self.limits.check_value(KeySpace::Data, &p.value))
                }
                Some(write_op::Op::Delete(d)) => {
                    bytes += d.key.len();
                    self.limits.check_key(KeySpace::Data, &d.key)
                }
                None => return Err(KvError::InvalidArgument(format!("operation {i} is empty"))),
            };
            checked.map_err(|e| KvError::InvalidArgument(format!("operation {i}: {e}")))?;
        }
        let max = batch_bytes_limit(self.limits);
        if bytes > max {
            return Err(KvError::InvalidArgument(format!(
                "batch holds {bytes} bytes, over the limit of {max}"
            )));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;
    use std::sync::{Arc, Mutex};

    use super::*;

    /// Captures what a test subscriber writes.
    #[derive(Clone, Default)]
    struct Captured(Arc<Mutex<Vec<u8>>>);

    impl Write for Captured {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    fn logs_at(level: &str) -> (impl tracing::Subscriber, Captured) {
        let out = Captured::default();
        let writer = out.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_env_filter(level)
            .with_ansi(false)
            .with_writer(move || writer.clone())
            .finish();
        (subscriber, out)
    }

    #[tokio::test(flavor = "current_thread")]
    async fn at_info_an_untraced_request_has_no_span_and_its_failure_line_carries_its_id() {
        let (subscriber, out) = logs_at("info");
        let _default = tracing::subscriber::set_default(subscriber);
        let span = request_span("kv.Get", &tonic::Request::new(()));
        assert!(span.is_disabled(), "no span is built at INFO");
        let failed = traced(span, async {
            note_request(&Span::current(), "req-42", Class::Normal);
            Err::<(), _>(KvError::Storage(kiwi_storage::Error::DirectoryNotFound {
                path: "/nowhere".into(),
            }))
        })
        .await
        .expect_err("the body failed");
        assert_eq!(failed.code(), tonic::Code::Internal);
        let text = String::from_utf8(out.0.lock().unwrap().clone()).unwrap();
        assert!(
            text.contains("request failed") && text.contains("request_id=\"req-42\""),
            "the failure line names the request: {text}"
        );
    }

    #[tokio::test(flavor = "current_thread")]
    async fn with_debug_logs_an_untraced_request_has_a_span_its_lines_carry() {
        let (subscriber, out) = logs_at("info,kiwi_node=debug");
        let _default = tracing::subscriber::set_default(subscriber);
        let span = request_span("kv.Get", &tonic::Request::new(()));
        assert!(!span.is_disabled(), "DEBUG lines of requests need the span");
        traced(span, async {
            note_request(&Span::current(), "req-43", Class::High);
            Ok(())
        })
        .await
        .expect("the body succeeded");
        let text = String::from_utf8(out.0.lock().unwrap().clone()).unwrap();
        assert!(
            text.contains("request finished") && text.contains("request_id=\"req-43\""),
            "the line carries the span's request_id: {text}"
        );
    }
}
