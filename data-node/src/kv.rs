//! The gRPC services clients use: `KvService` (the KV API) and `NodeAdmin` (status).
//!
//! Request path: validate and tag (request id, deadline) → writes are proposed to the Raft driver and
//! answered when applied; linearizable reads run a ReadIndex round on the leader and wait until the
//! applied index reaches it; serializable reads go straight to local storage. Storage calls run on
//! tokio's blocking pool, never on async worker threads.
//!
//! Errors are mapped to `tonic::Status` in exactly one place, [`KvError::into_status`].

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use kiwi_proto::v1::kv_service_server::KvService;
use kiwi_proto::v1::node_admin_server::NodeAdmin;
use kiwi_proto::v1::{
    AddNodeRequest, BatchWriteRequest, BatchWriteResponse, CompareAndSwapRequest,
    CompareAndSwapResponse, Consistency, DeleteRequest, DeleteResponse, GetRequest, GetResponse,
    GetRuntimePolicyRequest, KeyValue, MembershipResponse, NotLeader, PoolStats,
    PriorityClassStats, PriorityPolicy, PutRequest, PutResponse, RaftCommand, RaftRole,
    RemoveNodeRequest, RequestHeader, ResponseHeader, RuntimePolicy, RuntimeStatsRequest,
    RuntimeStatsResponse, ScaleEvent, ScalingPolicy, ScanRequest, ScanResponse, StatusRequest,
    StatusResponse, TransferLeaderRequest, TransferLeaderResponse, WriteBatchCommand, WriteOp,
    compare_and_swap_request, raft_command, write_op,
};
use kiwi_storage::{BackendKind, KeySpace, Limits, Scan, ScanRange, StorageBackend};
use prost::Message as _;
use raft::eraftpb::{ConfChangeSingle, ConfChangeType, ConfChangeV2};
use tonic::{Request, Response, Status};

use crate::config::{NodeConfig, RuntimeConfig};
use crate::driver::{DriverHandle, ProposeError, Role};
use crate::priority_channel::{ChannelPolicy, Class, PriorityMessageChannel, Refused};
use crate::snapshot::InstallGate;
use crate::state_machine::ApplyOutcome;
use crate::transport::Members;
use crate::worker_pool::{Job, WorkerPool};

/// A closure run by the storage stage, answering its caller on a oneshot.
struct StagedJob<R> {
    f: Box<dyn FnOnce() -> Result<R, KvError> + Send>,
    tx: tokio::sync::oneshot::Sender<Result<R, KvError>>,
    timeout: Duration,
}

impl<R: Send> Job for StagedJob<R> {
    fn run(self: Box<Self>) {
        let r = (self.f)();
        let _ = self.tx.send(r);
    }

    fn expire(self: Box<Self>) {
        let _ = self.tx.send(Err(KvError::Expired(self.timeout)));
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

/// What a KV request can fail with.
#[derive(Debug, thiserror::Error)]
pub enum KvError {
    #[error("{0}")]
    InvalidArgument(String),
    #[error("node {node} is not the leader")]
    NotLeader {
        node: u64,
        leader: u64,
        leader_addr: Option<String>,
    },
    #[error("no leader is known yet; retry shortly")]
    NoLeader,
    #[error("{0}")]
    Dropped(ProposeError),
    #[error("node is overloaded; retry shortly")]
    Overloaded,
    /// The request never reached Raft (or was a read): nothing was written.
    #[error("node is shutting down or stopped")]
    Stopped,
    /// A snapshot install replaced the data while the read ran; nothing was read.
    #[error("this node is installing a Raft snapshot; retry the read (or read from the leader)")]
    Installing,
    /// This node is no longer a member of the cluster.
    #[error("node {0} was removed from the cluster and no longer serves requests")]
    Removed(u64),
    #[error("deadline exceeded after {0:?}; a write's outcome is unknown")]
    Timeout(Duration),
    #[error("storage error: {0}")]
    Storage(kiwi_storage::Error),
    #[error("{0}")]
    Precondition(String),
    #[error("{0}")]
    Unknown(String),
    /// Refused by admission control; did nothing.
    #[error("{0}")]
    Shed(Refused),
    /// The deadline passed while the request waited in the queue; it never ran.
    #[error("deadline of {0:?} exceeded while queued; the request never ran")]
    Expired(Duration),
}

impl KvError {
    /// The one mapping to gRPC statuses; keeps leader hints (metadata and `NotLeader` details) and
    /// retryability (the code).
    pub fn into_status(self) -> Status {
        let retry_safe = matches!(
            self,
            KvError::NotLeader { .. }
                | KvError::NoLeader
                | KvError::Dropped(_)
                | KvError::Overloaded
                | KvError::Shed(_)
                | KvError::Expired(_)
                | KvError::Stopped
                | KvError::Installing
                | KvError::Removed(_)
        );
        let retry_after = match &self {
            KvError::Shed(r) => r.retry_after(),
            _ => None,
        };
        let mut status = self.status();
        if retry_safe {
            status.metadata_mut().insert(
                RETRY_SAFE_METADATA,
                tonic::metadata::MetadataValue::from_static("true"),
            );
        }
        if let Some(after) = retry_after
            && let Ok(v) = after.as_millis().max(1).to_string().parse()
        {
            status.metadata_mut().insert(RETRY_AFTER_METADATA, v);
        }
        status
    }

    fn status(self) -> Status {
        let msg = self.to_string();
        match self {
            KvError::InvalidArgument(_) => Status::invalid_argument(msg),
            KvError::NotLeader {
                leader,
                leader_addr,
                ..
            } => {
                let hint = NotLeader {
                    leader_id: leader,
                    leader_addr: leader_addr.clone().unwrap_or_default(),
                };
                let text = match &leader_addr {
                    Some(a) => format!("{msg}; the leader is node {leader} at {a}"),
                    None => msg,
                };
                let mut status = Status::with_details(
                    tonic::Code::FailedPrecondition,
                    text,
                    hint.encode_to_vec().into(),
                );
                let md = status.metadata_mut();
                if let Ok(v) = leader.to_string().parse() {
                    md.insert(LEADER_ID_METADATA, v);
                }
                if let Some(Ok(v)) = leader_addr.map(|a| a.parse()) {
                    md.insert(LEADER_ADDR_METADATA, v);
                }
                status
            }
            KvError::NoLeader
            | KvError::Dropped(_)
            | KvError::Stopped
            | KvError::Unknown(_)
            | KvError::Installing => Status::unavailable(msg),
            KvError::Removed(_) => Status::failed_precondition(msg),
            KvError::Overloaded | KvError::Shed(_) => Status::resource_exhausted(msg),
            KvError::Expired(_) => Status::deadline_exceeded(msg),
            KvError::Precondition(_) => Status::failed_precondition(msg),
            KvError::Timeout(_) => Status::deadline_exceeded(msg),
            KvError::Storage(e) => match e {
                kiwi_storage::Error::EmptyKey { .. }
                | kiwi_storage::Error::KeyTooLarge { .. }
                | kiwi_storage::Error::ValueTooLarge { .. }
                | kiwi_storage::Error::ZeroScanLimit => Status::invalid_argument(e.to_string()),
                _ => Status::internal(format!("storage error: {e}")),
            },
        }
    }
}

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
}

/// A request's tags after validation.
struct Tagged {
    request_id: String,
    timeout: Duration,
    /// When the request must be answered by.
    deadline: std::time::Instant,
    class: Class,
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
        } = parts;
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
        })
    }

    fn tag(&self, header: Option<&RequestHeader>) -> Result<Tagged, KvError> {
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
        Ok(Tagged {
            request_id,
            timeout,
            deadline: std::time::Instant::now() + timeout,
            class: Class::from_wire(header.map_or(0, |h| h.priority)),
        })
    }

    fn header(&self, tagged: &Tagged, applied_index: u64) -> Option<ResponseHeader> {
        Some(ResponseHeader {
            node_id: self.node_id,
            applied_index,
            request_id: tagged.request_id.clone(),
            term: self.driver.status().term,
        })
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
        let cmd = RaftCommand {
            request_id: tagged.request_id.clone(),
            command: Some(command),
        };
        // The storage stage encodes and hands the proposal to Raft; the wait for the commit is not work,
        // so it happens here, off the pool.
        let driver = self.driver.clone();
        let submitted = self
            .staged(tagged, move || Ok(driver.submit(cmd.encode_to_vec())))
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

    /// Waits until local state reflects every write acknowledged before now (leader only).
    async fn linearize(&self, tagged: &Tagged) -> Result<u64, KvError> {
        let fut = async {
            let index = self
                .driver
                .read_index()
                .await
                .map_err(|e| self.map_propose(e))?;
            self.driver
                .wait_applied(index)
                .await
                .map_err(|e| self.map_propose(e))
        };
        match tokio::time::timeout(tagged.timeout, fut).await {
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

    /// Runs `f` in the storage stage: through the priority channel (which may refuse it at once) on a
    /// pool thread.
    async fn staged<R: Send + 'static>(
        &self,
        tagged: &Tagged,
        f: impl FnOnce() -> Result<R, KvError> + Send + 'static,
    ) -> Result<R, KvError> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let job: Box<dyn Job> = Box::new(StagedJob {
            f: Box::new(f),
            tx,
            timeout: tagged.timeout,
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
        let storage = Arc::clone(&self.storage);
        let gate = Arc::clone(&self.gate);
        self.staged(tagged, move || {
            gate.read(|| f(&*storage))
                .ok_or(KvError::Installing)?
                .map_err(KvError::Storage)
        })
        .await
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

/// Pairs read by the first page of a Scan, before the pair sizes are known.
const FIRST_SCAN_PAGE: usize = 16;

/// Reads up to `limit` pairs of `range` and at most [`MAX_SCAN_BYTES`] (at least one pair), page by page
/// so that memory follows the answer's size, not `limit` times the largest value. Pages after the first
/// read one point-in-time view, so the answer is one state of the data. Returns the pairs and whether
/// more remain.
fn scan_bounded(
    st: &dyn StorageBackend,
    mut range: ScanRange,
    limit: usize,
    reverse: bool,
    keys_only: bool,
) -> kiwi_storage::Result<(Vec<KeyValue>, bool)> {
    // One page is enough for small limits; otherwise every page reads the same view.
    let view = if limit + 1 > FIRST_SCAN_PAGE {
        Some(st.snapshot()?)
    } else {
        None
    };
    let mut kvs: Vec<KeyValue> = Vec::new();
    let mut bytes = 0;
    let mut page = FIRST_SCAN_PAGE;
    loop {
        // One more than the answer needs, to learn whether more remain.
        let want = (limit + 1 - kvs.len()).min(page);
        let scan = Scan {
            range: range.clone(),
            limit: want,
            reverse,
        };
        let pairs = match &view {
            Some(v) => v.scan(KeySpace::Data, &scan)?,
            None => st.scan(KeySpace::Data, &scan)?,
        };
        let got = pairs.len();
        for (key, value) in pairs {
            let value = if keys_only { Vec::new() } else { value };
            let size = key.len() + value.len();
            if kvs.len() == limit || (!kvs.is_empty() && bytes + size > MAX_SCAN_BYTES) {
                return Ok((kvs, true));
            }
            bytes += size;
            let bound = std::ops::Bound::Excluded(key.clone());
            if reverse {
                range.end = bound;
            } else {
                range.start = bound;
            }
            kvs.push(KeyValue { key, value });
        }
        if got < want {
            return Ok((kvs, false));
        }
        let avg = (bytes / kvs.len().max(1)).max(1);
        page = (MAX_SCAN_BYTES.saturating_sub(bytes) / avg).clamp(1, 1024);
    }
}

/// The `KvService` implementation.
#[derive(Clone)]
pub struct KvApi(pub Arc<KvServer>);

#[tonic::async_trait]
impl KvService for KvApi {
    async fn get(&self, request: Request<GetRequest>) -> Result<Response<GetResponse>, Status> {
        let s = &self.0;
        let req = request.into_inner();
        let run = async {
            let tagged = s.tag(req.header.as_ref())?;
            s.check_key(&req.key)?;
            let applied = s.read_point(req.consistency, &tagged).await?;
            let key = req.key;
            let value = s
                .read_data(&tagged, move |st| st.read(KeySpace::Data, &key))
                .await?;
            Ok(GetResponse {
                header: s.header(&tagged, applied),
                found: value.is_some(),
                value: value.unwrap_or_default(),
            })
        };
        run.await.map(Response::new).map_err(KvError::into_status)
    }

    async fn put(&self, request: Request<PutRequest>) -> Result<Response<PutResponse>, Status> {
        let s = &self.0;
        let req = request.into_inner();
        let run = async {
            let tagged = s.tag(req.header.as_ref())?;
            let ops = vec![WriteOp {
                op: Some(write_op::Op::Put(write_op::Put {
                    key: req.key,
                    value: req.value,
                })),
            }];
            s.check_ops(&ops).map_err(|e| match e {
                KvError::InvalidArgument(m) => {
                    KvError::InvalidArgument(m.replace("operation 0: ", ""))
                }
                e => e,
            })?;
            let out = s.propose_write(&tagged, ops).await?;
            Ok(PutResponse {
                header: s.header(&tagged, out.index),
            })
        };
        run.await.map(Response::new).map_err(KvError::into_status)
    }

    async fn delete(
        &self,
        request: Request<DeleteRequest>,
    ) -> Result<Response<DeleteResponse>, Status> {
        let s = &self.0;
        let req = request.into_inner();
        let run = async {
            let tagged = s.tag(req.header.as_ref())?;
            s.check_key(&req.key)?;
            let ops = vec![WriteOp {
                op: Some(write_op::Op::Delete(write_op::Delete { key: req.key })),
            }];
            let out = s.propose_write(&tagged, ops).await?;
            Ok(DeleteResponse {
                header: s.header(&tagged, out.index),
                existed: out.existed,
            })
        };
        run.await.map(Response::new).map_err(KvError::into_status)
    }

    async fn batch_write(
        &self,
        request: Request<BatchWriteRequest>,
    ) -> Result<Response<BatchWriteResponse>, Status> {
        let s = &self.0;
        let req = request.into_inner();
        let run = async {
            let tagged = s.tag(req.header.as_ref())?;
            s.check_ops(&req.ops)?;
            let out = s.propose_write(&tagged, req.ops).await?;
            Ok(BatchWriteResponse {
                header: s.header(&tagged, out.index),
            })
        };
        run.await.map(Response::new).map_err(KvError::into_status)
    }

    async fn scan(&self, request: Request<ScanRequest>) -> Result<Response<ScanResponse>, Status> {
        let s = &self.0;
        let req = request.into_inner();
        let run = async {
            let tagged = s.tag(req.header.as_ref())?;
            if req.limit == 0 || req.limit > MAX_SCAN_LIMIT {
                return Err(KvError::InvalidArgument(format!(
                    "scan limit must be 1 to {MAX_SCAN_LIMIT}, got {}",
                    req.limit
                )));
            }
            let applied = s.read_point(req.consistency, &tagged).await?;
            let range = ScanRange::half_open(&req.start_key, &req.end_key);
            let (limit, keys_only, reverse) = (req.limit as usize, req.keys_only, req.reverse);
            // The answer is built in the storage stage too (at the request's OS priority), not on a
            // network thread.
            let (kvs, more) = s
                .read_data(&tagged, move |st| {
                    scan_bounded(st, range, limit, reverse, keys_only)
                })
                .await?;
            Ok(ScanResponse {
                header: s.header(&tagged, applied),
                kvs,
                more,
            })
        };
        run.await.map(Response::new).map_err(KvError::into_status)
    }

    async fn compare_and_swap(
        &self,
        request: Request<CompareAndSwapRequest>,
    ) -> Result<Response<CompareAndSwapResponse>, Status> {
        let s = &self.0;
        let mut req = request.into_inner();
        let run = async {
            let tagged = s.tag(req.header.as_ref())?;
            s.check_key(&req.key)?;
            match &req.expected {
                Some(compare_and_swap_request::Expected::ExpectedValue(v)) => s
                    .limits
                    .check_value(KeySpace::Data, v)
                    .map_err(|e| KvError::InvalidArgument(format!("expected_value: {e}")))?,
                Some(compare_and_swap_request::Expected::ExpectAbsent(true)) => {}
                _ => {
                    return Err(KvError::InvalidArgument(
                        "set exactly one of expected_value or expect_absent = true".into(),
                    ));
                }
            }
            match &req.new {
                Some(compare_and_swap_request::New::NewValue(v)) => s
                    .limits
                    .check_value(KeySpace::Data, v)
                    .map_err(KvError::Storage)?,
                Some(compare_and_swap_request::New::Delete(true)) => {}
                _ => {
                    return Err(KvError::InvalidArgument(
                        "set exactly one of new_value or delete = true".into(),
                    ));
                }
            }
            req.header = None;
            let out = s
                .propose(&tagged, raft_command::Command::CompareAndSwap(req))
                .await?;
            Ok(CompareAndSwapResponse {
                header: s.header(&tagged, out.index),
                succeeded: out.swapped,
                previous_found: out.previous.is_some(),
                previous_value: out.previous.unwrap_or_default(),
            })
        };
        run.await.map(Response::new).map_err(KvError::into_status)
    }
}

/// The `NodeAdmin` implementation.
#[derive(Clone)]
pub struct AdminApi(pub Arc<KvServer>);

#[tonic::async_trait]
impl NodeAdmin for AdminApi {
    async fn status(
        &self,
        _request: Request<StatusRequest>,
    ) -> Result<Response<StatusResponse>, Status> {
        let s = &self.0;
        let d = s
            .driver
            .detailed_status()
            .await
            .map_err(|e| s.map_propose(e).into_status())?;
        let role = match d.status.role {
            Role::Follower => RaftRole::Follower,
            Role::Candidate => RaftRole::Candidate,
            Role::PreCandidate => RaftRole::PreCandidate,
            Role::Leader => RaftRole::Leader,
        };
        Ok(Response::new(StatusResponse {
            node_id: s.node_id,
            cluster_id: s.cluster.load(Ordering::Relaxed),
            role: role as i32,
            term: d.status.term,
            leader_id: d.status.leader_id,
            commit_index: d.status.commit,
            applied_index: d.status.applied,
            peers: d
                .peers
                .into_iter()
                .map(|p| kiwi_proto::v1::PeerProgress {
                    node_id: p.id,
                    addr: s.addrs.get(p.id).unwrap_or_default(),
                    match_index: p.match_index,
                    recently_active: p.recently_active,
                    voter: p.voter,
                })
                .collect(),
            storage_backend: s.backend.as_str().to_string(),
            log_first_index: d.status.first_index,
            voters: d.voters,
            learners: d.learners,
            rejected_entries: d.status.rejected_entries,
            removed: d.status.removed,
        }))
    }

    async fn add_node(
        &self,
        request: Request<AddNodeRequest>,
    ) -> Result<Response<MembershipResponse>, Status> {
        let s = &self.0;
        let req = request.into_inner();
        let run = async {
            if req.node_id == 0 {
                return Err(KvError::InvalidArgument(
                    "node_id must be at least 1".into(),
                ));
            }
            crate::config::check_member_addr(&req.addr)
                .map_err(|e| KvError::InvalidArgument(format!("addr: {e}")))?;
            let d = s
                .driver
                .detailed_status()
                .await
                .map_err(|e| s.map_propose(e))?;
            if d.status.role != Role::Leader {
                return Err(s.not_leader(d.status.leader_id));
            }
            if d.voters.contains(&req.node_id) {
                return Err(KvError::Precondition(format!(
                    "node {} is already a voter",
                    req.node_id
                )));
            }
            if !d.learners.contains(&req.node_id) {
                s.membership_change(ConfChangeType::AddLearnerNode, req.node_id, &req.addr)
                    .await?;
                tracing::info!(node_id = req.node_id, addr = %req.addr, "added a learner; waiting for it to catch up");
            }
            let target = s.driver.status().commit;
            s.wait_caught_up(req.node_id, target).await?;
            let out = s
                .membership_change(ConfChangeType::AddNode, req.node_id, &req.addr)
                .await?;
            tracing::info!(node_id = req.node_id, "promoted the learner to voter");
            s.membership(out.index).await
        };
        run.await.map(Response::new).map_err(KvError::into_status)
    }

    async fn remove_node(
        &self,
        request: Request<RemoveNodeRequest>,
    ) -> Result<Response<MembershipResponse>, Status> {
        let s = &self.0;
        let req = request.into_inner();
        let run = async {
            let d = s
                .driver
                .detailed_status()
                .await
                .map_err(|e| s.map_propose(e))?;
            if d.status.role != Role::Leader {
                return Err(s.not_leader(d.status.leader_id));
            }
            if !d.voters.contains(&req.node_id) && !d.learners.contains(&req.node_id) {
                return Err(KvError::Precondition(format!(
                    "node {} is not a member",
                    req.node_id
                )));
            }
            if req.node_id == s.node_id {
                // Removing the leader itself: hand leadership to the most up-to-date other voter
                // first, then send the caller there (raft-rs keeps a removed leader leading).
                let to = d
                    .peers
                    .iter()
                    .filter(|p| p.voter && p.id != s.node_id)
                    .max_by_key(|p| (p.recently_active, p.match_index))
                    .map(|p| p.id)
                    .ok_or_else(|| {
                        KvError::Precondition(format!(
                            "node {} is the only voter and cannot be removed",
                            s.node_id
                        ))
                    })?;
                tracing::info!(
                    to,
                    "RemoveNode of the leader: transferring leadership first"
                );
                let leader = s.transfer_and_wait(to).await?;
                return Err(s.not_leader(leader.leader_id));
            }
            let out = s
                .membership_change(ConfChangeType::RemoveNode, req.node_id, "")
                .await?;
            s.membership(out.index).await
        };
        run.await.map(Response::new).map_err(KvError::into_status)
    }

    async fn get_runtime_policy(
        &self,
        _request: Request<GetRuntimePolicyRequest>,
    ) -> Result<Response<RuntimePolicy>, Status> {
        Ok(Response::new(self.0.runtime_policy()))
    }

    async fn set_runtime_policy(
        &self,
        request: Request<RuntimePolicy>,
    ) -> Result<Response<RuntimePolicy>, Status> {
        self.0
            .set_runtime_policy(request.into_inner())
            .map(Response::new)
            .map_err(KvError::into_status)
    }

    async fn runtime_stats(
        &self,
        _request: Request<RuntimeStatsRequest>,
    ) -> Result<Response<RuntimeStatsResponse>, Status> {
        Ok(Response::new(self.0.runtime_stats()))
    }

    async fn transfer_leader(
        &self,
        request: Request<TransferLeaderRequest>,
    ) -> Result<Response<TransferLeaderResponse>, Status> {
        let s = &self.0;
        let to = request.into_inner().node_id;
        let run = async {
            let d = s
                .driver
                .detailed_status()
                .await
                .map_err(|e| s.map_propose(e))?;
            if d.status.role != Role::Leader {
                return Err(s.not_leader(d.status.leader_id));
            }
            if !d.voters.contains(&to) {
                return Err(KvError::InvalidArgument(format!(
                    "node {to} is not a voter"
                )));
            }
            let st = s.transfer_and_wait(to).await?;
            Ok(TransferLeaderResponse {
                leader_id: st.leader_id,
                term: st.term,
            })
        };
        run.await.map(Response::new).map_err(KvError::into_status)
    }
}

impl KvServer {
    /// Asks Raft to hand leadership to `to` and waits until it has.
    async fn transfer_and_wait(&self, to: u64) -> Result<crate::driver::RaftStatus, KvError> {
        self.driver
            .transfer_leader(to)
            .map_err(|e| self.map_propose(e))?;
        let mut watch = self.driver.watch();
        let wait = watch.wait_for(|st| st.leader_id == to);
        match tokio::time::timeout(DEFAULT_TIMEOUT, wait).await {
            Ok(Ok(st)) => Ok(*st),
            Ok(Err(_)) => Err(KvError::Stopped),
            Err(_) => Err(KvError::Timeout(DEFAULT_TIMEOUT)),
        }
    }

    async fn membership_change(
        &self,
        change_type: ConfChangeType,
        node_id: u64,
        addr: &str,
    ) -> Result<ApplyOutcome, KvError> {
        let mut single = ConfChangeSingle::default();
        single.set_change_type(change_type);
        single.node_id = node_id;
        let mut cc = ConfChangeV2::default();
        cc.set_changes(vec![single].into());
        cc.context = addr.as_bytes().to_vec().into();
        let fut = self.driver.change_membership(cc);
        match tokio::time::timeout(DEFAULT_TIMEOUT, fut).await {
            Ok(r) => r.map_err(|e| self.map_propose(e)),
            Err(_) => Err(KvError::Timeout(DEFAULT_TIMEOUT)),
        }
    }

    async fn membership(&self, index: u64) -> Result<MembershipResponse, KvError> {
        let d = self
            .driver
            .detailed_status()
            .await
            .map_err(|e| self.map_propose(e))?;
        Ok(MembershipResponse {
            voters: d.voters,
            learners: d.learners,
            index,
        })
    }

    /// Waits until the leader sees `node_id`'s log at `target` or beyond.
    async fn wait_caught_up(&self, node_id: u64, target: u64) -> Result<(), KvError> {
        let deadline = tokio::time::Instant::now() + CATCH_UP_TIMEOUT;
        loop {
            let d = self
                .driver
                .detailed_status()
                .await
                .map_err(|e| self.map_propose(e))?;
            if d.status.role != Role::Leader {
                return Err(self.not_leader(d.status.leader_id));
            }
            let matched = d
                .peers
                .iter()
                .find(|p| p.id == node_id)
                .map_or(0, |p| p.match_index);
            if matched >= target {
                return Ok(());
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(KvError::Precondition(format!(
                    "node {node_id} is still a learner: its log reached {matched} of {target} within \
                     {CATCH_UP_TIMEOUT:?}; check that it runs with raft.join = true and can reach the leader, \
                     then call AddNode again to promote it"
                )));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

fn policy_of(rt: &RuntimeConfig) -> RuntimePolicy {
    let (s, p) = (&rt.scaling, &rt.priority);
    let n = |v: usize| u32::try_from(v).unwrap_or(u32::MAX);
    RuntimePolicy {
        scaling: Some(ScalingPolicy {
            enabled: s.enabled,
            min_storage_threads: n(s.min_storage_threads),
            max_storage_threads: n(s.max_storage_threads),
            scale_up_threshold: u32::from(s.scale_up_threshold),
            scale_down_threshold: u32::from(s.scale_down_threshold),
            scale_increment: n(s.scale_increment),
            evaluation_interval_ms: u32::try_from(s.evaluation_interval.as_millis())
                .unwrap_or(u32::MAX),
        }),
        priority: Some(PriorityPolicy {
            enabled: p.enabled,
            high_priority_weight: p.high_priority_weight,
            normal_priority_weight: p.normal_priority_weight,
            low_priority_weight: p.low_priority_weight,
        }),
    }
}

impl KvServer {
    fn runtime_policy(&self) -> RuntimePolicy {
        policy_of(
            &self
                .config
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .runtime,
        )
    }

    /// Validates `policy` like the config file (unset parts stay as they are) and puts it in force.
    fn set_runtime_policy(&self, policy: RuntimePolicy) -> Result<RuntimePolicy, KvError> {
        let mut config = self
            .config
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut next = config.clone();
        let pct = |v: u32, field: &str| {
            u8::try_from(v)
                .map_err(|_| KvError::InvalidArgument(format!("{field}: must be 1-100, got {v}")))
        };
        if let Some(s) = policy.scaling {
            let sc = &mut next.runtime.scaling;
            sc.enabled = s.enabled;
            sc.min_storage_threads = s.min_storage_threads as usize;
            sc.max_storage_threads = s.max_storage_threads as usize;
            sc.scale_up_threshold =
                pct(s.scale_up_threshold, "runtime.scaling.scale_up_threshold")?;
            sc.scale_down_threshold = pct(
                s.scale_down_threshold,
                "runtime.scaling.scale_down_threshold",
            )?;
            sc.scale_increment = s.scale_increment as usize;
            sc.evaluation_interval = Duration::from_millis(u64::from(s.evaluation_interval_ms));
        }
        if let Some(p) = policy.priority {
            let pr = &mut next.runtime.priority;
            pr.enabled = p.enabled;
            pr.high_priority_weight = p.high_priority_weight;
            pr.normal_priority_weight = p.normal_priority_weight;
            pr.low_priority_weight = p.low_priority_weight;
        }
        next.validate().map_err(|e| {
            KvError::InvalidArgument(format!("policy refused, the old one stays: {e}"))
        })?;
        self.pool.set_policy((&next.runtime.scaling).into());
        self.channel.set_policy(ChannelPolicy::from_config(
            &next.runtime.priority,
            crate::QUEUE_CAPACITY,
        ));
        tracing::info!(policy = ?next.runtime, "runtime policy changed");
        *config = next;
        Ok(policy_of(&config.runtime))
    }

    fn runtime_stats(&self) -> RuntimeStatsResponse {
        let m = self.pool.metrics();
        let n = |v: usize| u32::try_from(v).unwrap_or(u32::MAX);
        let stats = self.channel.stats();
        RuntimeStatsResponse {
            storage_pool: Some(PoolStats {
                current_threads: n(m.current),
                target_threads: n(m.target),
                utilisation_percent: m.utilisation,
                queue_len: n(m.queue_len),
                events: m
                    .events
                    .into_iter()
                    .map(|e| ScaleEvent {
                        at_unix_ms: e
                            .at
                            .duration_since(std::time::UNIX_EPOCH)
                            .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX)),
                        from_threads: n(e.from),
                        to_threads: n(e.to),
                        reason: e.reason,
                    })
                    .collect(),
            }),
            classes: Class::ALL
                .iter()
                .zip(stats.classes)
                .map(|(c, st)| PriorityClassStats {
                    class: c.name().to_string(),
                    enqueued: st.enqueued,
                    served: st.served,
                    shed: st.shed,
                    expired: st.expired,
                    depth: n(st.depth),
                    wait_histogram: st.wait_buckets.to_vec(),
                })
                .collect(),
            network_threads: n(tokio::runtime::Handle::current().metrics().num_workers()),
            low_runs_at_lower_os_priority: self.pool.os_priority(),
        }
    }
}
