//! `kiwi-client`: the Rust client library for Kiwi, and (as binaries of this crate) the `kiwi` CLI with
//! its `playground` and `bench` commands.
//!
//! A [`Client`] talks to a list of endpoints. It finds the leader and caches it, follows a node's leader
//! hint in one hop, and retries what is safe to retry, with backoff (at least the node's `retry-after-ms`
//! hint when it sheds a request), until the call's deadline:
//! - reads (they change nothing) on any retryable error;
//! - writes only when the node guarantees the request did nothing (the `kiwi-retry-safe` status
//!   metadata: not the leader, no leader, dropped by Raft, overloaded) or the connection could not be
//!   opened at all.
//!
//! A write that may or may not have been applied (the connection broke, the deadline passed) is never
//! retried blindly: it fails with [`Error::UnknownOutcome`], which names the request id so the caller can
//! check and decide.
//!
//! ```no_run
//! # async fn demo() -> Result<(), kiwi_client::Error> {
//! use kiwi_client::{CallOptions, Client, ClientOptions, Priority};
//!
//! let client = Client::connect(&["127.0.0.1:7381", "127.0.0.1:7382"], ClientOptions::default())?;
//! client.put(b"greeting", b"hello", &CallOptions::default()).await?;
//! let value = client.get(b"greeting", &CallOptions::default()).await?;
//! assert_eq!(value.as_deref(), Some(&b"hello"[..]));
//!
//! // Per call: priority, deadline, request id, read consistency.
//! let urgent = CallOptions {
//!     priority: Some(Priority::Critical),
//!     timeout: Some(std::time::Duration::from_millis(200)),
//!     ..CallOptions::default()
//! };
//! client.put(b"alarm", b"on", &urgent).await?;
//! # Ok(()) }
//! ```
//!
//! Leases (`lease_grant`, `lease_keep_alive`, `put_leased`, ...) and, on them, sessions, locks and
//! elections: [`concurrency`]. A client of the control plane: [`control`]. A linearizability checker for
//! recorded histories of Kiwi operations (what `kiwi chaos` runs): [`linearizability`]. A local cluster
//! of real node processes (what `kiwi playground` runs): [`playground`].

pub mod concurrency;
pub mod control;
pub mod linearizability;
pub mod playground;

use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use kiwi_proto::v1::kv_service_client::KvServiceClient;
use kiwi_proto::v1::node_admin_client::NodeAdminClient;
use kiwi_proto::v1::{
    CompactRequest, CompareAndSwapRequest, Consistency, DeleteRangeRequest, DeleteRequest,
    GetRequest, GetRuntimePolicyRequest, LeaseGrantRequest, LeaseKeepAliveRequest,
    LeaseLeasesRequest, LeaseRevokeRequest, LeaseTimeToLiveRequest, PutRequest, RequestHeader,
    RuntimePolicy, RuntimeStatsRequest, RuntimeStatsResponse, ScanRequest, StatusRequest,
    StatusResponse, TxnRequest, WatchCreateRequest, WatchRequest, WatchResponse,
    compare_and_swap_request, watch_request,
};
pub use kiwi_proto::v1::{
    Compare, KeyEvent, KeyValue, LeaseTimeToLiveResponse, TxnOp, TxnOpResponse, TxnResponse,
    compare, key_event, txn_op, txn_op_response,
};
pub use kiwi_proto::v1::{Consistency as ReadConsistency, Priority};
use tokio::time::Instant;
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Status};

/// Metadata naming the leader's client address on a "not leader" status.
const LEADER_ADDR: &str = "kiwi-leader-addr";
/// Metadata set on statuses that guarantee the request did nothing.
const RETRY_SAFE: &str = "kiwi-retry-safe";
/// Longest pause between two attempts (a node's `retry-after-ms` may ask for longer). Short, because
/// the usual reason to retry is a leader change: a client asleep for longer than that after the election
/// adds its sleep to the failover time.
const MAX_BACKOFF: Duration = Duration::from_millis(100);

/// Largest gRPC message the client sends or accepts (tonic's default receive limit is 4 MiB).
///
/// A `Get` response carries a whole value, and a node can be configured to hold values up to the
/// `storage.max_value_size` ceiling of 64 MiB with keys up to the `storage.max_key_size` ceiling of
/// 1 MiB; with the default 4 MiB limit, reading a value near even the *default* 4 MiB maximum would fail
/// with `OUT_OF_RANGE`. 80 MiB covers the largest key plus the largest value plus protobuf and header
/// overhead, with room to spare; the node enforces its own (smaller) request limit.
const MAX_MESSAGE_BYTES: usize = 80 * 1024 * 1024;

/// What a call can fail with.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The request is invalid (over a limit, malformed); retrying will not help.
    #[error("invalid request: {0}")]
    InvalidArgument(String),
    /// A write may or may not have been applied; it was not retried. Check, then decide.
    #[error("outcome unknown for request {request_id}: {reason}")]
    UnknownOutcome { request_id: String, reason: String },
    /// The deadline passed before any node could serve the call; nothing was written.
    #[error("deadline of {timeout:?} exceeded for request {request_id}; last error: {last}")]
    DeadlineExceeded {
        request_id: String,
        timeout: Duration,
        last: String,
    },
    /// An endpoint is malformed.
    #[error("invalid endpoint {endpoint:?}: {reason}")]
    Endpoint { endpoint: String, reason: String },
    /// Any other error a node answered with.
    #[error("{}: {}", .0.code(), .0.message())]
    Rpc(Status),
    /// Every endpoint refused the connection (with [`ClientOptions::fail_fast_unreachable`]); nothing
    /// was sent.
    #[error("cannot connect to any endpoint ({endpoints}): {last}")]
    Unreachable { endpoints: String, last: String },
}

/// Settings for a [`Client`].
#[derive(Debug, Clone)]
pub struct ClientOptions {
    /// Deadline of a call when [`CallOptions::timeout`] is not set.
    pub timeout: Duration,
    /// Priority of a call when [`CallOptions::priority`] is not set.
    pub priority: Priority,
    /// gRPC channels (HTTP/2 connections) per endpoint; calls are spread over them round robin.
    pub connections_per_endpoint: usize,
    /// Time allowed to open a connection.
    pub connect_timeout: Duration,
    /// Bearer token sent with every call (`authorization: Bearer <token>`), for nodes with
    /// `[security] tokens_file`.
    pub token: Option<String>,
    /// TLS to the nodes (the CA that signed their certificates; a client certificate if wanted), for
    /// nodes with `[security] cert_file`. `None`: plain text.
    pub tls: Option<tonic::transport::ClientTlsConfig>,
    /// Give up with [`Error::Unreachable`] as soon as every endpoint in turn refused the connection,
    /// instead of retrying until the deadline (a command-line tool pointed at the wrong place; a
    /// long-lived client rides out a cluster restart by leaving it off, the default).
    pub fail_fast_unreachable: bool,
}

impl Default for ClientOptions {
    fn default() -> Self {
        ClientOptions {
            timeout: Duration::from_secs(5),
            priority: Priority::Normal,
            connections_per_endpoint: 2,
            connect_timeout: Duration::from_secs(1),
            token: None,
            tls: None,
            fail_fast_unreachable: false,
        }
    }
}

/// Per-call settings; unset fields take the client's defaults.
#[derive(Debug, Clone, Default)]
pub struct CallOptions {
    pub priority: Option<Priority>,
    pub timeout: Option<Duration>,
    /// Correlation id for logs and traces; generated when not set.
    pub request_id: Option<String>,
    /// For reads: linearizable (default) or serializable.
    pub consistency: Option<Consistency>,
    /// W3C trace context sent with the call (`traceparent`), so the node's spans join this trace.
    pub trace: Option<TraceParent>,
}

/// A W3C trace context: the `traceparent` a call carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TraceParent {
    pub trace_id: u128,
    pub parent_span_id: u64,
    /// Whether the caller records this trace: nodes sample a call exactly when it is set.
    pub sampled: bool,
}

impl TraceParent {
    /// A new trace with random ids, sampled.
    pub fn new_sampled() -> TraceParent {
        TraceParent {
            trace_id: rand::random::<u128>().max(1),
            parent_span_id: rand::random::<u64>().max(1),
            sampled: true,
        }
    }

    /// Parses a `traceparent` value (`00-<32 hex>-<16 hex>-<2 hex flags>`).
    ///
    /// # Errors
    /// What is wrong with it.
    pub fn parse(s: &str) -> Result<TraceParent, String> {
        let parts: Vec<&str> = s.trim().split('-').collect();
        let [version, trace, span, flags] = parts[..] else {
            return Err(format!("{s:?} is not version-traceid-spanid-flags"));
        };
        if version != "00" || trace.len() != 32 || span.len() != 16 || flags.len() != 2 {
            return Err(format!("{s:?} is not a version 00 traceparent"));
        }
        let hex = |h: &str| u128::from_str_radix(h, 16).map_err(|e| format!("{s:?}: {e}"));
        let (trace_id, parent_span_id, flags) = (hex(trace)?, hex(span)? as u64, hex(flags)?);
        if trace_id == 0 || parent_span_id == 0 {
            return Err(format!("{s:?}: all-zero ids are invalid"));
        }
        Ok(TraceParent {
            trace_id,
            parent_span_id,
            sampled: flags & 1 == 1,
        })
    }

    /// The trace id as 32 lowercase hex digits, as trace backends show it.
    pub fn trace_id_hex(&self) -> String {
        format!("{:032x}", self.trace_id)
    }

    /// The `traceparent` header value.
    pub fn header_value(&self) -> String {
        format!(
            "00-{:032x}-{:016x}-{:02x}",
            self.trace_id,
            self.parent_span_id,
            u8::from(self.sampled)
        )
    }
}

/// Adds the call's `traceparent` and the client's bearer token to every request.
#[derive(Clone, Default)]
pub struct TraceInterceptor {
    trace: Option<tonic::metadata::AsciiMetadataValue>,
    auth: Option<tonic::metadata::AsciiMetadataValue>,
}

impl tonic::service::Interceptor for TraceInterceptor {
    fn call(&mut self, mut request: tonic::Request<()>) -> Result<tonic::Request<()>, Status> {
        if let Some(v) = &self.trace {
            request.metadata_mut().insert("traceparent", v.clone());
        }
        if let Some(v) = &self.auth {
            request.metadata_mut().insert("authorization", v.clone());
        }
        Ok(request)
    }
}

impl TraceInterceptor {
    /// An interceptor that sends `Bearer <token>` (and no trace context).
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] when the token cannot travel in a header.
    pub fn with_token(token: Option<&str>) -> Result<TraceInterceptor, Error> {
        let auth = match token {
            Some(t) => Some(format!("Bearer {}", t.trim()).parse().map_err(|_| {
                Error::InvalidArgument(
                    "the token must be printable ASCII without spaces (it travels in a header)"
                        .into(),
                )
            })?),
            None => None,
        };
        Ok(TraceInterceptor { trace: None, auth })
    }
}

/// A `NodeAdmin` client that sends the client's token.
pub type AuthedAdminClient =
    NodeAdminClient<tonic::service::interceptor::InterceptedService<Channel, TraceInterceptor>>;

/// A `KvService` client that sends the call's trace context.
pub type TracedKvClient =
    KvServiceClient<tonic::service::interceptor::InterceptedService<Channel, TraceInterceptor>>;

/// The result of a compare-and-swap.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CasOutcome {
    pub succeeded: bool,
    /// The value before the call (`None`: the key was absent).
    pub previous: Option<Vec<u8>>,
}

/// One page of a scan.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScanPage {
    pub kvs: Vec<(Vec<u8>, Vec<u8>)>,
    /// More pairs match beyond the limit.
    pub more: bool,
}

/// Key-value pairs off the wire.
fn pairs(kvs: Vec<KeyValue>) -> Vec<(Vec<u8>, Vec<u8>)> {
    kvs.into_iter()
        .map(|KeyValue { key, value, .. }| (key, value))
        .collect()
}

/// Which keys a range call covers: `[start, end)` (an empty bound is open) or every key starting with a
/// prefix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyRange {
    Between { start: Vec<u8>, end: Vec<u8> },
    Prefix(Vec<u8>),
}

impl KeyRange {
    /// One key.
    pub fn key(key: &[u8]) -> KeyRange {
        let mut end = key.to_vec();
        end.push(0);
        KeyRange::Between {
            start: key.to_vec(),
            end,
        }
    }

    /// The range in etcd's convention (`key`, `range_end`), as watches and transactions take it.
    pub fn etcd_bounds(&self) -> (Vec<u8>, Vec<u8>) {
        match self {
            KeyRange::Between { start, end } => kiwi_proto::keys::etcd_bounds(start, end),
            KeyRange::Prefix(p) => {
                kiwi_proto::keys::etcd_bounds(p, &kiwi_proto::keys::prefix_end(p))
            }
        }
    }

    fn fields(&self) -> (Vec<u8>, Vec<u8>, Vec<u8>) {
        match self {
            KeyRange::Between { start, end } => (start.clone(), end.clone(), Vec::new()),
            KeyRange::Prefix(p) => (Vec::new(), Vec::new(), p.clone()),
        }
    }
}

/// How a [`Client::scan_range`] reads.
#[derive(Debug, Clone, Default)]
pub struct ScanOptions {
    /// At most this many pairs (1-10000; 0 means 100).
    pub limit: u32,
    /// From the largest key down.
    pub reverse: bool,
    /// Keys only (values empty).
    pub keys_only: bool,
    /// Most key and value bytes in the page (0: the node's ceiling, 4 MiB).
    pub max_bytes: u64,
    /// Read the range as it was at this revision (0: now).
    pub revision: u64,
}

/// What a [`Client::delete_range`] removed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RangeDeleted {
    pub deleted: u64,
    /// With `prev_kv`: the removed pairs (up to 4 MiB of them).
    pub prev_kvs: Vec<(Vec<u8>, Vec<u8>)>,
    /// More pairs were removed than `prev_kvs` holds.
    pub prev_kvs_truncated: bool,
}

struct Node {
    addr: String,
    channels: Vec<Channel>,
    next: AtomicUsize,
}

impl Node {
    fn channel(&self) -> Channel {
        let i = self.next.fetch_add(1, Ordering::Relaxed) % self.channels.len();
        self.channels[i].clone()
    }

    /// A `KvService` client on the next channel, with [`MAX_MESSAGE_BYTES`] limits, sending `trace`.
    fn kv(&self, trace: &TraceInterceptor) -> TracedKvClient {
        KvServiceClient::with_interceptor(self.channel(), trace.clone())
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES)
    }

    /// A `NodeAdmin` client on the next channel, with [`MAX_MESSAGE_BYTES`] limits, sending the token.
    fn admin(&self, auth: &TraceInterceptor) -> AuthedAdminClient {
        NodeAdminClient::with_interceptor(self.channel(), auth.clone())
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES)
    }
}

/// A Kiwi client; cheap to share (`Arc` it or clone the handle).
/// One watch with resumption (see [`Client::watch`]).
pub struct Watcher<'a> {
    client: &'a Client,
    create: WatchCreateRequest,
    stream: Option<(
        tokio::sync::mpsc::Sender<WatchRequest>,
        tonic::Streaming<WatchResponse>,
    )>,
    next_node: usize,
}

/// What a [`Watcher`] hands back.
#[derive(Debug, Clone, PartialEq)]
pub enum WatchUpdate {
    /// The events of one or more writes, in revision order.
    Events(Vec<KeyEvent>),
    /// The history no longer holds the revision the watch must go on from; `oldest` is the oldest kept.
    Compacted { oldest: u64 },
}

impl Watcher<'_> {
    /// The next events (or the compacted verdict, after which the watcher ends), reconnecting as
    /// needed. Waits as long as nothing changes.
    ///
    /// # Errors
    /// [`Error`] when the watch is refused (not when a node goes away).
    pub async fn next(&mut self) -> Result<WatchUpdate, Error> {
        let mut backoff = Duration::from_millis(50);
        loop {
            if self.stream.is_none() {
                match self.open().await {
                    Ok(s) => self.stream = Some(s),
                    Err(e) if e.code() == Code::OutOfRange || e.code() == Code::InvalidArgument => {
                        if e.code() == Code::OutOfRange {
                            let oldest = e
                                .message()
                                .rsplit(' ')
                                .next()
                                .and_then(|n| n.parse().ok())
                                .unwrap_or(0);
                            return Ok(WatchUpdate::Compacted { oldest });
                        }
                        return Err(Error::InvalidArgument(e.message().to_string()));
                    }
                    Err(_) => {
                        self.next_node += 1;
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(Duration::from_secs(2));
                        continue;
                    }
                }
            }
            let (_, stream) = self.stream.as_mut().expect("opened above");
            match stream.message().await {
                Ok(Some(r)) => {
                    if r.canceled {
                        self.stream = None;
                        if r.compact_revision != 0 {
                            return Ok(WatchUpdate::Compacted {
                                oldest: r.compact_revision,
                            });
                        }
                        return Err(Error::Rpc(Status::aborted(format!(
                            "the watch was canceled: {}",
                            r.cancel_reason
                        ))));
                    }
                    if let Some(last) = r.events.last().and_then(|e| e.kv.as_ref()) {
                        self.create.start_revision = last.mod_revision + 1;
                        return Ok(WatchUpdate::Events(r.events));
                    }
                }
                Ok(None) | Err(_) => {
                    self.stream = None;
                    self.next_node += 1;
                }
            }
        }
    }

    async fn open(
        &mut self,
    ) -> Result<
        (
            tokio::sync::mpsc::Sender<WatchRequest>,
            tonic::Streaming<WatchResponse>,
        ),
        Status,
    > {
        let (_, node) = self.client.pick(self.next_node);
        let trace = TraceInterceptor {
            trace: None,
            auth: self.client.auth.clone(),
        };
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        if self.create.start_revision == 0 {
            // From now: pin "now" so that a reconnect resumes from it, not from a later now.
            let status = node
                .admin(&trace)
                .status(StatusRequest {})
                .await?
                .into_inner();
            self.create.start_revision = status.applied_index + 1;
        }
        tx.send(WatchRequest {
            request_union: Some(watch_request::RequestUnion::CreateRequest(
                self.create.clone(),
            )),
        })
        .await
        .map_err(|_| Status::internal("the request stream closed"))?;
        let mut stream = node
            .kv(&trace)
            .watch(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await?
            .into_inner();
        // The created answer first.
        match stream.message().await? {
            Some(r) if r.created && !r.canceled => Ok((tx, stream)),
            Some(r) if r.compact_revision != 0 => Err(Status::out_of_range(format!(
                "required revision has been compacted; the oldest kept revision is {}",
                r.compact_revision
            ))),
            Some(r) => Err(Status::invalid_argument(r.cancel_reason)),
            None => Err(Status::unavailable(
                "the watch stream ended before it started",
            )),
        }
    }
}

pub struct Client {
    nodes: Mutex<Vec<std::sync::Arc<Node>>>,
    /// Index in `nodes` of the node believed to lead.
    leader: AtomicUsize,
    options: ClientOptions,
    next_id: AtomicUsize,
    id_prefix: String,
    /// `Bearer <token>`, when the options carry a token.
    auth: Option<tonic::metadata::AsciiMetadataValue>,
}

fn normalize(endpoint: &str) -> String {
    endpoint
        .trim()
        .trim_start_matches("http://")
        .trim_end_matches('/')
        .to_string()
}

impl Client {
    /// A client for the cluster reachable at `endpoints` ("host:port"). Connections open lazily, so this
    /// succeeds while nodes are down.
    ///
    /// # Errors
    /// [`Error::Endpoint`] for an empty list or a malformed endpoint.
    pub fn connect<S: AsRef<str>>(
        endpoints: &[S],
        options: ClientOptions,
    ) -> Result<Client, Error> {
        if endpoints.is_empty() {
            return Err(Error::Endpoint {
                endpoint: String::new(),
                reason: "no endpoints given".into(),
            });
        }
        let mut nodes = Vec::new();
        for e in endpoints {
            nodes.push(std::sync::Arc::new(Self::node(e.as_ref(), &options)?));
        }
        let auth = match &options.token {
            Some(t) => Some(format!("Bearer {}", t.trim()).parse().map_err(|_| {
                Error::InvalidArgument(
                    "the token must be printable ASCII without spaces (it travels in a header)"
                        .into(),
                )
            })?),
            None => None,
        };
        Ok(Client {
            auth,
            nodes: Mutex::new(nodes),
            leader: AtomicUsize::new(0),
            options,
            next_id: AtomicUsize::new(1),
            id_prefix: format!("c{:08x}", rand::random::<u32>()),
        })
    }

    fn node(endpoint: &str, options: &ClientOptions) -> Result<Node, Error> {
        let addr = normalize(endpoint);
        let bad = |reason: String| Error::Endpoint {
            endpoint: endpoint.to_string(),
            reason,
        };
        if !addr.contains(':') {
            return Err(bad("expected host:port".into()));
        }
        let ep = match &options.tls {
            None => {
                Endpoint::from_shared(format!("http://{addr}")).map_err(|e| bad(e.to_string()))?
            }
            Some(tls) => Endpoint::from_shared(format!("https://{addr}"))
                .and_then(|e| e.tls_config(tls.clone()))
                .map_err(|e| bad(e.to_string()))?,
        };
        let ep = ep
            .connect_timeout(options.connect_timeout)
            .tcp_nodelay(true);
        let channels = (0..options.connections_per_endpoint.max(1))
            .map(|_| ep.connect_lazy())
            .collect();
        Ok(Node {
            addr,
            channels,
            next: AtomicUsize::new(0),
        })
    }

    /// The interceptor that sends the token (and no trace context).
    fn interceptor(&self) -> TraceInterceptor {
        TraceInterceptor {
            trace: None,
            auth: self.auth.clone(),
        }
    }

    /// The endpoints this client knows (the given ones plus leaders it was redirected to).
    pub fn endpoints(&self) -> Vec<String> {
        self.lock().iter().map(|n| n.addr.clone()).collect()
    }

    /// The endpoint currently believed to lead.
    pub fn leader_hint(&self) -> String {
        let nodes = self.lock();
        nodes[self.leader.load(Ordering::Relaxed) % nodes.len()]
            .addr
            .clone()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<std::sync::Arc<Node>>> {
        self.nodes
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Index of `addr` among the nodes, adding it if new.
    fn index_of(&self, addr: &str) -> Option<usize> {
        let addr = normalize(addr);
        let mut nodes = self.lock();
        if let Some(i) = nodes.iter().position(|n| n.addr == addr) {
            return Some(i);
        }
        let node = Self::node(&addr, &self.options).ok()?;
        nodes.push(std::sync::Arc::new(node));
        Some(nodes.len() - 1)
    }

    fn pick(&self, i: usize) -> (usize, std::sync::Arc<Node>) {
        let nodes = self.lock();
        let i = i % nodes.len();
        (i, std::sync::Arc::clone(&nodes[i]))
    }

    fn node_count(&self) -> usize {
        self.lock().len()
    }

    /// Runs one call with leader redirects and retries (see the crate doc).
    async fn call<T, F, Fut>(&self, opts: &CallOptions, write: bool, mut f: F) -> Result<T, Error>
    where
        F: FnMut(TracedKvClient, RequestHeader) -> Fut,
        Fut: std::future::Future<Output = Result<T, Status>>,
    {
        let timeout = opts.timeout.unwrap_or(self.options.timeout);
        let deadline = Instant::now() + timeout;
        let request_id = opts.request_id.clone().unwrap_or_else(|| {
            format!(
                "{}-{}",
                self.id_prefix,
                self.next_id.fetch_add(1, Ordering::Relaxed)
            )
        });
        let priority = opts.priority.unwrap_or(self.options.priority);
        let trace = TraceInterceptor {
            trace: opts.trace.and_then(|t| t.header_value().parse().ok()),
            auth: self.auth.clone(),
        };
        let mut target = self.leader.load(Ordering::Relaxed);
        let mut backoff = Duration::from_millis(20);
        let mut last = String::from("no attempt");
        let mut refused_in_a_row = 0;
        loop {
            let remaining = deadline.saturating_duration_since(Instant::now());
            if remaining.is_zero() {
                return Err(Error::DeadlineExceeded {
                    request_id,
                    timeout,
                    last,
                });
            }
            let (index, node) = self.pick(target);
            let header = RequestHeader {
                priority: priority as i32,
                request_id: request_id.clone(),
                timeout: prost_types::Duration::try_from(remaining).ok(),
            };
            let attempt = f(node.kv(&trace), header);
            let status = match tokio::time::timeout(remaining, attempt).await {
                Ok(Ok(v)) => {
                    self.leader.store(index, Ordering::Relaxed);
                    return Ok(v);
                }
                Ok(Err(status)) => status,
                Err(_) if write => {
                    return Err(Error::UnknownOutcome {
                        request_id,
                        reason: format!(
                            "no answer from {} within the deadline of {timeout:?}",
                            node.addr
                        ),
                    });
                }
                Err(_) => Status::deadline_exceeded(format!(
                    "no answer from {} within the deadline",
                    node.addr
                )),
            };
            last = format!("{} from {}: {}", status.code(), node.addr, status.message());
            if connect_failed(&status) {
                refused_in_a_row += 1;
                if self.options.fail_fast_unreachable && refused_in_a_row >= self.node_count() {
                    return Err(Error::Unreachable {
                        endpoints: self.endpoints().join(","),
                        last: format!("{}: connection refused", node.addr),
                    });
                }
            } else {
                refused_in_a_row = 0;
            }
            // The node's `retry-after-ms` hint (admission control), honoured when longer than the backoff.
            let hinted = status
                .metadata()
                .get("retry-after-ms")
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse().ok())
                .map_or(Duration::ZERO, Duration::from_millis);
            match classify(&status) {
                Verdict::Fail => {
                    return Err(match status.code() {
                        Code::InvalidArgument => {
                            Error::InvalidArgument(status.message().to_string())
                        }
                        _ => Error::Rpc(status),
                    });
                }
                Verdict::Redirect(addr) => {
                    if let Some(i) = self.index_of(&addr) {
                        self.leader.store(i, Ordering::Relaxed);
                        target = i;
                        continue;
                    }
                    target = index + 1;
                }
                Verdict::Safe => {
                    target = if status.code() == Code::ResourceExhausted {
                        index
                    } else {
                        index + 1
                    }
                }
                Verdict::Unknown if write => {
                    return Err(Error::UnknownOutcome {
                        request_id,
                        reason: last,
                    });
                }
                Verdict::Unknown => target = index + 1,
            }
            if self.node_count() > 0 {
                let sleep = backoff
                    .max(hinted)
                    .min(deadline.saturating_duration_since(Instant::now()));
                tokio::time::sleep(sleep).await;
                backoff = (backoff * 2).min(MAX_BACKOFF);
            }
        }
    }

    /// Reads a key: `None` if it is absent.
    ///
    /// # Errors
    /// [`Error`].
    pub async fn get(&self, key: &[u8], opts: &CallOptions) -> Result<Option<Vec<u8>>, Error> {
        let consistency = opts.consistency.unwrap_or(Consistency::Linearizable) as i32;
        self.call(opts, false, |mut c, header| async move {
            let r = c
                .get(GetRequest {
                    revision: 0,
                    header: Some(header),
                    key: key.to_vec(),
                    consistency,
                })
                .await?
                .into_inner();
            Ok(r.found.then_some(r.value))
        })
        .await
    }

    /// Reads a key with its counters, now (`revision` 0) or as it was at a past revision: `None` if it
    /// is absent. A revision older than the kept history fails with OUT_OF_RANGE ("compacted").
    ///
    /// # Errors
    /// [`Error`].
    pub async fn get_kv(
        &self,
        key: &[u8],
        revision: u64,
        opts: &CallOptions,
    ) -> Result<Option<KeyValue>, Error> {
        let consistency = opts.consistency.unwrap_or(Consistency::Linearizable) as i32;
        self.call(opts, false, |mut c, header| async move {
            let r = c
                .get(GetRequest {
                    header: Some(header),
                    key: key.to_vec(),
                    consistency,
                    revision,
                })
                .await?
                .into_inner();
            Ok(r.found.then(|| KeyValue {
                key: key.to_vec(),
                value: r.value,
                create_revision: r.create_revision,
                mod_revision: r.mod_revision,
                version: r.version,
                lease: r.lease,
            }))
        })
        .await
    }

    /// Runs a transaction (see `kiwi.v1.TxnRequest`): the success ops if every compare holds, else the
    /// failure ops, atomically. Returns whether the compares held, each op's answer and the revision.
    ///
    /// # Errors
    /// [`Error`]; [`Error::UnknownOutcome`] when it may or may not have been applied.
    pub async fn txn(
        &self,
        compare: Vec<Compare>,
        success: Vec<TxnOp>,
        failure: Vec<TxnOp>,
        opts: &CallOptions,
    ) -> Result<TxnResponse, Error> {
        self.call(opts, true, |mut c, header| {
            let req = TxnRequest {
                header: Some(header),
                compare: compare.clone(),
                success: success.clone(),
                failure: failure.clone(),
            };
            async move { Ok(c.txn(req).await?.into_inner()) }
        })
        .await
    }

    /// Drops the kept history before `revision`.
    ///
    /// # Errors
    /// [`Error`].
    pub async fn compact(&self, revision: u64, opts: &CallOptions) -> Result<(), Error> {
        self.call(opts, true, |mut c, header| async move {
            c.compact(CompactRequest {
                header: Some(header),
                revision,
            })
            .await?;
            Ok(())
        })
        .await
    }

    /// Watches the keys of `range` from `start_revision` (0: from now), at the client's priority. The
    /// [`Watcher`] reconnects by itself when its node goes away, to any endpoint, resuming after the last
    /// revision it returned.
    pub fn watch(&self, range: &KeyRange, start_revision: u64, prev_kv: bool) -> Watcher<'_> {
        let (key, range_end) = range.etcd_bounds();
        Watcher {
            client: self,
            create: WatchCreateRequest {
                key,
                range_end,
                // The class of the node's reads of the history for this watch.
                header: Some(RequestHeader {
                    priority: self.options.priority as i32,
                    ..RequestHeader::default()
                }),
                start_revision,
                prev_kv,
                ..WatchCreateRequest::default()
            },
            stream: None,
            next_node: self.leader.load(Ordering::Relaxed),
        }
    }

    /// Writes a key. Returns the log index it was applied at.
    ///
    /// # Errors
    /// [`Error`]; [`Error::UnknownOutcome`] when it may or may not have been applied.
    pub async fn put(&self, key: &[u8], value: &[u8], opts: &CallOptions) -> Result<u64, Error> {
        self.put_leased(key, value, 0, opts).await
    }

    /// Writes a key attached to `lease` (0: none; a put without a lease detaches the key). Returns the
    /// revision it was applied at. An unknown lease fails with NOT_FOUND ("lease N not found").
    ///
    /// # Errors
    /// [`Error`]; [`Error::UnknownOutcome`] when it may or may not have been applied.
    pub async fn put_leased(
        &self,
        key: &[u8],
        value: &[u8],
        lease: u64,
        opts: &CallOptions,
    ) -> Result<u64, Error> {
        self.call(opts, true, |mut c, header| async move {
            let r = c
                .put(PutRequest {
                    prev_kv: false,
                    header: Some(header),
                    key: key.to_vec(),
                    value: value.to_vec(),
                    lease,
                })
                .await?
                .into_inner();
            Ok(r.header.map_or(0, |h| h.applied_index))
        })
        .await
    }

    /// Grants a lease of `ttl` seconds (the cluster raises it to its floor) with id `id` (0: the node
    /// picks one). Returns the id and the TTL granted.
    ///
    /// # Errors
    /// [`Error`]; FAILED_PRECONDITION when `id` is in use.
    pub async fn lease_grant(
        &self,
        ttl: i64,
        id: u64,
        opts: &CallOptions,
    ) -> Result<(u64, i64), Error> {
        self.call(opts, true, |mut c, header| async move {
            let r = c
                .lease_grant(LeaseGrantRequest {
                    header: Some(header),
                    ttl,
                    id,
                })
                .await?
                .into_inner();
            Ok((r.id, r.ttl))
        })
        .await
    }

    /// Revokes a lease, deleting its keys; returns how many it deleted.
    ///
    /// # Errors
    /// [`Error`]; NOT_FOUND when the lease does not exist.
    pub async fn lease_revoke(&self, id: u64, opts: &CallOptions) -> Result<u64, Error> {
        self.call(opts, true, |mut c, header| async move {
            Ok(c.lease_revoke(LeaseRevokeRequest {
                header: Some(header),
                id,
            })
            .await?
            .into_inner()
            .deleted)
        })
        .await
    }

    /// Refreshes a lease to its full TTL (on the leader, which the call finds); returns that TTL, or 0
    /// when the lease no longer exists. Safe to retry.
    ///
    /// # Errors
    /// [`Error`].
    pub async fn lease_keep_alive(&self, id: u64, opts: &CallOptions) -> Result<i64, Error> {
        self.call(opts, false, |mut c, _header| async move {
            let request = tokio_stream::once(LeaseKeepAliveRequest { id });
            let mut answers = c.lease_keep_alive(request).await?.into_inner();
            match answers.message().await? {
                Some(r) => Ok(r.ttl),
                None => Err(Status::unavailable("the keepalive stream ended unanswered")),
            }
        })
        .await
    }

    /// A lease's remaining and granted TTL (and its keys with `keys`).
    ///
    /// # Errors
    /// [`Error`]; NOT_FOUND when the lease does not exist.
    pub async fn lease_time_to_live(
        &self,
        id: u64,
        keys: bool,
        opts: &CallOptions,
    ) -> Result<LeaseTimeToLiveResponse, Error> {
        self.call(opts, false, |mut c, header| async move {
            Ok(c.lease_time_to_live(LeaseTimeToLiveRequest {
                header: Some(header),
                id,
                keys,
            })
            .await?
            .into_inner())
        })
        .await
    }

    /// Every lease's id.
    ///
    /// # Errors
    /// [`Error`].
    pub async fn lease_leases(&self, opts: &CallOptions) -> Result<Vec<u64>, Error> {
        self.call(opts, false, |mut c, header| async move {
            Ok(c.lease_leases(LeaseLeasesRequest {
                header: Some(header),
            })
            .await?
            .into_inner()
            .ids)
        })
        .await
    }

    /// Removes a key; returns whether it existed.
    ///
    /// # Errors
    /// As for [`put`](Self::put).
    pub async fn delete(&self, key: &[u8], opts: &CallOptions) -> Result<bool, Error> {
        self.call(opts, true, |mut c, header| async move {
            Ok(c.delete(DeleteRequest {
                header: Some(header),
                key: key.to_vec(),
            })
            .await?
            .into_inner()
            .existed)
        })
        .await
    }

    /// Scans `[start, end)` (an empty bound is open), up to `limit` pairs; with `keys_only` the values come
    /// back empty.
    ///
    /// # Errors
    /// [`Error`].
    pub async fn scan(
        &self,
        start: &[u8],
        end: &[u8],
        limit: u32,
        keys_only: bool,
        opts: &CallOptions,
    ) -> Result<ScanPage, Error> {
        let consistency = opts.consistency.unwrap_or(Consistency::Linearizable) as i32;
        self.call(opts, false, |mut c, header| async move {
            let r = c
                .scan(ScanRequest {
                    header: Some(header),
                    start_key: start.to_vec(),
                    end_key: end.to_vec(),
                    limit,
                    consistency,
                    keys_only,
                    ..ScanRequest::default()
                })
                .await?
                .into_inner();
            Ok(ScanPage {
                kvs: pairs(r.kvs),
                more: r.more,
            })
        })
        .await
    }

    /// One page of `range` with `scan` options.
    ///
    /// # Errors
    /// [`Error`].
    pub async fn scan_range(
        &self,
        range: &KeyRange,
        scan: &ScanOptions,
        opts: &CallOptions,
    ) -> Result<ScanPage, Error> {
        let (kvs, more, _) = self.scan_kvs(range, scan, opts).await?;
        Ok(ScanPage {
            kvs: pairs(kvs),
            more,
        })
    }

    /// One page of `range` with every pair's counters (`create_revision`, `mod_revision`, `version`,
    /// `lease`); returns the pairs, whether more remain, and the revision the page was read at.
    ///
    /// # Errors
    /// [`Error`].
    pub async fn scan_kvs(
        &self,
        range: &KeyRange,
        scan: &ScanOptions,
        opts: &CallOptions,
    ) -> Result<(Vec<KeyValue>, bool, u64), Error> {
        let consistency = opts.consistency.unwrap_or(Consistency::Linearizable) as i32;
        let (start_key, end_key, prefix) = range.fields();
        self.call(opts, false, |mut c, header| {
            let (start_key, end_key, prefix) = (start_key.clone(), end_key.clone(), prefix.clone());
            async move {
                let r = c
                    .scan(ScanRequest {
                        header: Some(header),
                        start_key,
                        end_key,
                        prefix,
                        limit: if scan.limit == 0 { 100 } else { scan.limit },
                        reverse: scan.reverse,
                        keys_only: scan.keys_only,
                        max_bytes: scan.max_bytes,
                        consistency,
                        revision: scan.revision,
                        ..ScanRequest::default()
                    })
                    .await?
                    .into_inner();
                let revision = r.header.map_or(0, |h| h.revision);
                Ok((r.kvs, r.more, revision))
            }
        })
        .await
    }

    /// How many keys `range` holds.
    ///
    /// # Errors
    /// [`Error`].
    pub async fn count(&self, range: &KeyRange, opts: &CallOptions) -> Result<u64, Error> {
        let consistency = opts.consistency.unwrap_or(Consistency::Linearizable) as i32;
        let (start_key, end_key, prefix) = range.fields();
        self.call(opts, false, |mut c, header| {
            let (start_key, end_key, prefix) = (start_key.clone(), end_key.clone(), prefix.clone());
            async move {
                Ok(c.scan(ScanRequest {
                    header: Some(header),
                    start_key,
                    end_key,
                    prefix,
                    limit: 1,
                    count_only: true,
                    consistency,
                    ..ScanRequest::default()
                })
                .await?
                .into_inner()
                .count)
            }
        })
        .await
    }

    /// Removes every key of `range` in one write; returns how many there were (and, with `prev_kv`, the
    /// removed pairs).
    ///
    /// # Errors
    /// As for [`put`](Self::put).
    pub async fn delete_range(
        &self,
        range: &KeyRange,
        prev_kv: bool,
        opts: &CallOptions,
    ) -> Result<RangeDeleted, Error> {
        let (start_key, end_key, prefix) = range.fields();
        self.call(opts, true, |mut c, header| {
            let (start_key, end_key, prefix) = (start_key.clone(), end_key.clone(), prefix.clone());
            async move {
                let r = c
                    .delete_range(DeleteRangeRequest {
                        header: Some(header),
                        start_key,
                        end_key,
                        prefix,
                        prev_kv,
                    })
                    .await?
                    .into_inner();
                Ok(RangeDeleted {
                    deleted: r.deleted,
                    prev_kvs: pairs(r.prev_kvs),
                    prev_kvs_truncated: r.prev_kvs_truncated,
                })
            }
        })
        .await
    }

    /// Sets `key` to `new` if its current value is `expected` (`None`: if it is absent).
    ///
    /// # Errors
    /// As for [`put`](Self::put).
    pub async fn compare_and_swap(
        &self,
        key: &[u8],
        expected: Option<&[u8]>,
        new: &[u8],
        opts: &CallOptions,
    ) -> Result<CasOutcome, Error> {
        self.call(opts, true, |mut c, header| async move {
            let r = c
                .compare_and_swap(CompareAndSwapRequest {
                    header: Some(header),
                    key: key.to_vec(),
                    expected: Some(match expected {
                        Some(v) => compare_and_swap_request::Expected::ExpectedValue(v.to_vec()),
                        None => compare_and_swap_request::Expected::ExpectAbsent(true),
                    }),
                    new: Some(compare_and_swap_request::New::NewValue(new.to_vec())),
                })
                .await?
                .into_inner();
            Ok(CasOutcome {
                succeeded: r.succeeded,
                previous: r.previous_found.then_some(r.previous_value),
            })
        })
        .await
    }

    /// Every known endpoint's runtime policy and runtime stats (pool, queues, scale events), in endpoint
    /// order.
    pub async fn runtime_all(
        &self,
    ) -> Vec<(
        String,
        Result<(RuntimePolicy, RuntimeStatsResponse), Status>,
    )> {
        let nodes: Vec<_> = self.lock().clone();
        let mut out = Vec::new();
        for n in &nodes {
            let mut admin = n.admin(&self.interceptor());
            let timeout = self.options.timeout;
            let r = tokio::time::timeout(timeout, async {
                let policy = admin
                    .get_runtime_policy(GetRuntimePolicyRequest {})
                    .await?
                    .into_inner();
                let stats = admin
                    .runtime_stats(RuntimeStatsRequest {})
                    .await?
                    .into_inner();
                Ok((policy, stats))
            })
            .await
            .unwrap_or_else(|_| Err(Status::deadline_exceeded("no answer")));
            out.push((n.addr.clone(), r));
        }
        out
    }

    /// Every known endpoint's Raft metrics (`NodeAdmin.GetRaftMetrics`), in endpoint order.
    pub async fn raft_metrics_all(
        &self,
        with_history: bool,
    ) -> Vec<(String, Result<kiwi_proto::v1::RaftMetricsResponse, Status>)> {
        let nodes: Vec<_> = self.lock().clone();
        let mut out = Vec::new();
        for n in &nodes {
            let mut admin = n.admin(&self.interceptor());
            let request = kiwi_proto::v1::RaftMetricsRequest {
                without_history: !with_history,
            };
            let r = tokio::time::timeout(self.options.timeout, admin.get_raft_metrics(request))
                .await
                .unwrap_or_else(|_| Err(Status::deadline_exceeded("no answer")))
                .map(tonic::Response::into_inner);
            out.push((n.addr.clone(), r));
        }
        out
    }

    /// Reads every known endpoint's runtime policy, changes it with `change` and sets it (the node
    /// validates it and keeps its old policy on a refusal). Returns each node's policy in force, or its error.
    pub async fn update_runtime_policy(
        &self,
        change: impl Fn(&mut RuntimePolicy),
    ) -> Vec<(String, Result<RuntimePolicy, Status>)> {
        let nodes: Vec<_> = self.lock().clone();
        let mut out = Vec::new();
        for n in &nodes {
            let mut admin = n.admin(&self.interceptor());
            let r = async {
                let mut policy = admin
                    .get_runtime_policy(GetRuntimePolicyRequest {})
                    .await?
                    .into_inner();
                change(&mut policy);
                Ok(admin.set_runtime_policy(policy).await?.into_inner())
            };
            let r = tokio::time::timeout(self.options.timeout, r)
                .await
                .unwrap_or_else(|_| Err(Status::deadline_exceeded("no answer")));
            out.push((n.addr.clone(), r));
        }
        out
    }

    /// A `NodeAdmin` client on the leader, found from the endpoints' statuses (the leader must be one of
    /// the endpoints, or named by one of them with its address among the leader's peers).
    async fn leader_admin(&self) -> Result<(u64, AuthedAdminClient), Error> {
        let statuses = self.status_all().await;
        let nodes: Vec<_> = self.lock().clone();
        let mut last = String::from("no endpoint answered");
        for ((addr, status), node) in statuses.iter().zip(&nodes) {
            match status {
                Ok(s) if s.role == kiwi_proto::v1::RaftRole::Leader as i32 => {
                    return Ok((s.node_id, node.admin(&self.interceptor())));
                }
                Ok(s) => last = format!("{addr} is node {} and knows no leader", s.node_id),
                Err(e) => last = format!("{addr}: {}", e.message()),
            }
        }
        Err(Error::Rpc(Status::unavailable(format!(
            "no endpoint is the leader (give the leader's address among --endpoints, or retry once \
             one is elected); last: {last}"
        ))))
    }

    /// Adds node `node_id` (running with `raft.join = true` at `addr`, Raft at `raft_addr` when it has
    /// its own port) as a learner, then promotes it once caught up; answers when it votes.
    ///
    /// # Errors
    /// [`Error::Rpc`] with the leader's answer (e.g. another membership change in progress).
    /// With `learner`, it stays a learner (promote it with [`promote_member`](Self::promote_member)).
    pub async fn add_member(
        &self,
        node_id: u64,
        addr: &str,
        raft_addr: &str,
        learner: bool,
    ) -> Result<kiwi_proto::v1::MembershipResponse, Error> {
        let (_, mut admin) = self.leader_admin().await?;
        Ok(admin
            .add_node(kiwi_proto::v1::AddNodeRequest {
                node_id,
                addr: addr.to_string(),
                raft_addr: raft_addr.to_string(),
                learner,
            })
            .await
            .map_err(Error::Rpc)?
            .into_inner())
    }

    /// Promotes learner `node_id` to voter once it has caught up; answers when it votes.
    ///
    /// # Errors
    /// [`Error::Rpc`] with the leader's answer.
    pub async fn promote_member(
        &self,
        node_id: u64,
    ) -> Result<kiwi_proto::v1::MembershipResponse, Error> {
        let (_, mut admin) = self.leader_admin().await?;
        Ok(admin
            .add_node(kiwi_proto::v1::AddNodeRequest {
                node_id,
                ..kiwi_proto::v1::AddNodeRequest::default()
            })
            .await
            .map_err(Error::Rpc)?
            .into_inner())
    }

    /// Removes node `node_id` (voter or learner).
    ///
    /// # Errors
    /// [`Error::Rpc`] with the leader's answer.
    pub async fn remove_member(
        &self,
        node_id: u64,
    ) -> Result<kiwi_proto::v1::MembershipResponse, Error> {
        let (_, mut admin) = self.leader_admin().await?;
        Ok(admin
            .remove_node(kiwi_proto::v1::RemoveNodeRequest { node_id })
            .await
            .map_err(Error::Rpc)?
            .into_inner())
    }

    /// Hands leadership to voter `to` (`None`: the most caught-up other voter); answers once it leads.
    /// Returns the new leader and its term.
    ///
    /// # Errors
    /// [`Error::Rpc`] with the leader's answer; [`Error::InvalidArgument`] when there is no other voter.
    pub async fn transfer_leader(&self, to: Option<u64>) -> Result<(u64, u64), Error> {
        let (leader, mut admin) = self.leader_admin().await?;
        let to = match to {
            Some(id) => id,
            None => {
                let status = admin
                    .status(StatusRequest {})
                    .await
                    .map_err(Error::Rpc)?
                    .into_inner();
                status
                    .peers
                    .iter()
                    .filter(|p| p.voter && p.node_id != leader)
                    .max_by_key(|p| (p.recently_active, p.match_index))
                    .map(|p| p.node_id)
                    .ok_or_else(|| Error::InvalidArgument("the leader is the only voter".into()))?
            }
        };
        let r = admin
            .transfer_leader(kiwi_proto::v1::TransferLeaderRequest { node_id: to })
            .await
            .map_err(Error::Rpc)?
            .into_inner();
        Ok((r.leader_id, r.term))
    }

    /// Opens a backup stream (`NodeAdmin.Backup`) on the first endpoint that answers; with `consistent`
    /// the copy holds every write acknowledged before the call, and is taken on the leader (a follower
    /// answers with the leader's address, which must be among the endpoints). Returns the endpoint that
    /// streams and the stream of the backup file's pieces.
    ///
    /// # Errors
    /// [`Error::Rpc`] with the last endpoint's answer.
    pub async fn backup(
        &self,
        consistent: bool,
    ) -> Result<(String, tonic::Streaming<kiwi_proto::v1::BackupPiece>), Error> {
        let nodes: Vec<_> = self.lock().clone();
        let mut last = Status::unavailable("no endpoint");
        let mut order: Vec<usize> = (0..nodes.len()).collect();
        let mut tried = 0;
        while tried < order.len() && tried <= nodes.len() {
            let n = &nodes[order[tried]];
            tried += 1;
            let mut admin = n.admin(&self.interceptor());
            let call = admin.backup(kiwi_proto::v1::BackupRequest { consistent });
            match tokio::time::timeout(self.options.timeout, call).await {
                Ok(Ok(stream)) => return Ok((n.addr.clone(), stream.into_inner())),
                Ok(Err(s)) => match classify(&s) {
                    Verdict::Redirect(addr) => match self.index_of(&addr) {
                        Some(i) => {
                            order.insert(tried, i);
                            last = s;
                        }
                        None => {
                            return Err(Error::Rpc(Status::failed_precondition(format!(
                                "{}; add the leader's address {addr} to the endpoints",
                                s.message()
                            ))));
                        }
                    },
                    Verdict::Safe => last = s,
                    Verdict::Fail | Verdict::Unknown => return Err(Error::Rpc(s)),
                },
                Err(_) => last = Status::deadline_exceeded(format!("{} did not answer", n.addr)),
            }
        }
        Err(Error::Rpc(last))
    }

    /// Defragments the node at endpoint `addr` (`NodeAdmin.Defragment`): answers when its storage
    /// engine has compacted its whole range. No deadline (it takes as long as the data needs).
    ///
    /// # Errors
    /// [`Error::Endpoint`] for an address that is not an endpoint; [`Error::Rpc`] with the node's answer.
    pub async fn defragment(
        &self,
        addr: &str,
    ) -> Result<kiwi_proto::v1::DefragmentResponse, Error> {
        let node = self
            .index_of(addr)
            .map(|i| self.lock()[i].clone())
            .ok_or_else(|| Error::Endpoint {
                endpoint: addr.to_string(),
                reason: "not one of the client's endpoints".into(),
            })?;
        Ok(node
            .admin(&self.interceptor())
            .defragment(kiwi_proto::v1::DefragmentRequest {})
            .await
            .map_err(Error::Rpc)?
            .into_inner())
    }

    /// Every known endpoint's `NodeAdmin.Status`, or the error it answered with, in endpoint order.
    pub async fn status_all(&self) -> Vec<(String, Result<StatusResponse, Status>)> {
        let nodes: Vec<_> = self.lock().clone();
        let mut tasks = Vec::new();
        for n in &nodes {
            let mut admin = n.admin(&self.interceptor());
            let timeout = self.options.timeout;
            tasks.push(tokio::spawn(async move {
                match tokio::time::timeout(timeout, admin.status(StatusRequest {})).await {
                    Ok(r) => r.map(tonic::Response::into_inner),
                    Err(_) => Err(Status::deadline_exceeded("no answer")),
                }
            }));
        }
        let mut out = Vec::new();
        for (n, t) in nodes.iter().zip(tasks) {
            let r = t
                .await
                .unwrap_or_else(|e| Err(Status::internal(e.to_string())));
            out.push((n.addr.clone(), r));
        }
        out
    }
}

enum Verdict {
    /// Not retryable.
    Fail,
    /// Another node leads: go there.
    Redirect(String),
    /// Nothing happened; retry.
    Safe,
    /// Might have happened.
    Unknown,
}

fn classify(status: &Status) -> Verdict {
    let md = status.metadata();
    if let Some(addr) = md
        .get(LEADER_ADDR)
        .and_then(|v| v.to_str().ok())
        .filter(|a| !a.is_empty())
    {
        return Verdict::Redirect(addr.to_string());
    }
    if md.get(RETRY_SAFE).is_some_and(|v| v == "true") || connect_failed(status) {
        return Verdict::Safe;
    }
    match status.code() {
        Code::InvalidArgument
        | Code::NotFound
        | Code::AlreadyExists
        | Code::PermissionDenied
        | Code::Unauthenticated
        | Code::Unimplemented
        | Code::OutOfRange
        | Code::Internal
        // Not marked retry-safe: a refusal that stays (a state machine limit, a full disk).
        | Code::ResourceExhausted => Verdict::Fail,
        Code::FailedPrecondition => Verdict::Fail,
        _ => Verdict::Unknown,
    }
}

/// Whether the call failed because no connection could be opened (so nothing was sent).
fn connect_failed(status: &Status) -> bool {
    let mut source: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(status);
    while let Some(e) = source {
        if let Some(io) = e.downcast_ref::<std::io::Error>()
            && matches!(
                io.kind(),
                std::io::ErrorKind::ConnectionRefused | std::io::ErrorKind::AddrNotAvailable
            )
        {
            return true;
        }
        let text = e.to_string();
        if text.contains("tcp connect error") || text.contains("Connection refused") {
            return true;
        }
        source = e.source();
    }
    status.message().contains("tcp connect error")
}

#[cfg(test)]
mod trace_tests {
    use super::TraceParent;

    #[test]
    fn traceparent_round_trips_and_rejects_garbage() {
        let t = TraceParent::new_sampled();
        let v = t.header_value();
        assert_eq!(v.len(), 55, "{v}");
        assert_eq!(TraceParent::parse(&v), Ok(t));
        assert_eq!(t.trace_id_hex().len(), 32);
        let unsampled =
            TraceParent::parse("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-00").unwrap();
        assert!(!unsampled.sampled);
        for bad in [
            "",
            "01-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
            "00-00000000000000000000000000000000-b7ad6b7169203331-01",
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b71692033-01",
            "00-zzf7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
        ] {
            assert!(TraceParent::parse(bad).is_err(), "{bad}");
        }
    }
}
