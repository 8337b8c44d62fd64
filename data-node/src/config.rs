//! `kiwi-node`'s configuration: one TOML file, typed, with a default for every key.
//!
//! Unknown keys are rejected. [`NodeConfig::validate`] checks the relations between fields and names
//! every field it complains about. Precedence: defaults < file < command-line flags (the binary applies
//! the flags). `config/kiwi-node.example.toml` lists every key with its default and is loaded by a test.

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use bytesize::ByteSize;
use kiwi_storage::{BackendKind, Limits};
use serde::{Deserialize, Serialize};

/// Default gRPC address: KvService, NodeAdmin, RaftTransport, health and reflection share it.
pub const DEFAULT_LISTEN_ADDR: &str = "127.0.0.1:7380";
/// Default data directory, relative to the working directory.
pub const DEFAULT_DATA_DIR: &str = "kiwi-data";

/// Errors loading or validating a config.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The file is not valid TOML for this schema (syntax, type, or unknown key). The message names the
    /// key and the line.
    #[error("invalid config file {path}: {message}")]
    Parse { path: PathBuf, message: String },
    /// Values that parse but break a rule; one line per problem.
    #[error("invalid configuration:\n{}", .0.iter().map(|e| format!("  - {e}")).collect::<Vec<_>>().join("\n"))]
    Invalid(Vec<FieldError>),
}

/// One rule broken by one field.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldError {
    /// Dotted path of the field, as written in the TOML file.
    pub field: &'static str,
    /// What is wrong, with the values involved.
    pub message: String,
}

impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.field, self.message)
    }
}

/// The whole node configuration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct NodeConfig {
    /// Where the node keeps its data: the storage engine's files under `storage/`.
    pub data_dir: PathBuf,
    /// gRPC listen address: clients, and Raft traffic too unless `raft_listen_addr` is set.
    pub listen_addr: SocketAddr,
    /// Raft's own listen address (only `RaftTransport` is served there, and with `[security]` TLS it
    /// requires a client certificate from the cluster CA at the handshake). Unset: Raft is served on
    /// `listen_addr`. This node's `raft.peers` entry must give the same address as `raft_addr`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub raft_listen_addr: Option<SocketAddr>,
    /// Logging.
    pub log: LogConfig,
    /// Request scheduling and worker pools.
    pub runtime: RuntimeConfig,
    /// The Raft group.
    pub raft: RaftConfig,
    /// The storage backend.
    pub storage: StorageConfig,
    /// Metrics endpoints and traces.
    pub telemetry: TelemetryConfig,
    /// The link to the control plane.
    pub control: ControlLinkConfig,
    /// Authentication.
    pub security: SecurityConfig,
    /// What a client connection may hold.
    pub connections: ConnectionsConfig,
    /// The kept history behind watches and reads at a past revision.
    pub watch: WatchConfig,
    /// The etcd v3 API.
    pub etcd: EtcdConfig,
}

/// `[etcd]`: the etcd v3 API for etcd's clients and tools.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EtcdConfig {
    /// Where to serve etcd's v3 gRPC API (KV, Watch, Lease, Cluster, Maintenance, Auth.Authenticate),
    /// with the client port's TLS and tokens (a principal and its token as etcd's user and password);
    /// unset: not served.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub listen_addr: Option<SocketAddr>,
}

/// `[watch]`: the kept history of changes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct WatchConfig {
    /// Revisions of history kept behind the newest: the leader compacts older ones automatically (checked
    /// every 10 s), so reads at a revision and watches from one work this far back. 0: no bound by count.
    pub history_retention_revisions: u64,
    /// Seconds of history kept: the leader compacts writes older than this. 0: no bound by age. With
    /// both bounds the tighter one applies; with neither only `Compact` calls drop history.
    pub history_retention_sec: u64,
}

impl Default for WatchConfig {
    fn default() -> Self {
        WatchConfig {
            history_retention_revisions: 100_000,
            history_retention_sec: 0,
        }
    }
}

/// `[connections]`: what one client connection may hold on the node.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ConnectionsConfig {
    /// A connection with no call in progress for this many seconds is closed (on the client and Raft
    /// ports; an open stream counts as a call, HTTP/2 pings do not); clients reconnect on their next
    /// call. 0: never.
    pub idle_timeout_sec: u64,
    /// Bytes of large answers (Get values and Scan pages over 16 KiB) that one connection's client
    /// may leave unread; more answers on it wait (a Scan gets a smaller page) until it reads, or fail
    /// with RESOURCE_EXHAUSTED at their deadline.
    pub answer_buffer_per_connection: ByteSize,
    /// The same for all connections together: the node's memory for unread answers.
    pub answer_buffer_total: ByteSize,
}

impl Default for ConnectionsConfig {
    fn default() -> Self {
        ConnectionsConfig {
            idle_timeout_sec: 600,
            answer_buffer_per_connection: ByteSize::mib(16),
            answer_buffer_total: ByteSize::mib(256),
        }
    }
}

impl ConnectionsConfig {
    /// The idle time, `None` for never.
    pub fn idle(&self) -> Option<Duration> {
        (self.idle_timeout_sec > 0).then(|| Duration::from_secs(self.idle_timeout_sec))
    }
}

/// `[security]`, shared with the control plane.
pub use kiwi_proto::security::SecurityConfig;

impl Default for NodeConfig {
    fn default() -> Self {
        NodeConfig {
            data_dir: PathBuf::from(DEFAULT_DATA_DIR),
            listen_addr: DEFAULT_LISTEN_ADDR.parse().expect("valid default address"),
            raft_listen_addr: None,
            log: LogConfig::default(),
            runtime: RuntimeConfig::default(),
            raft: RaftConfig::default(),
            storage: StorageConfig::default(),
            telemetry: TelemetryConfig::default(),
            control: ControlLinkConfig::default(),
            security: SecurityConfig::default(),
            connections: ConnectionsConfig::default(),
            watch: WatchConfig::default(),
            etcd: EtcdConfig::default(),
        }
    }
}

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// One human-readable line per event.
    Text,
    /// One JSON object per line.
    Json,
}

/// `[log]`
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LogConfig {
    /// A `tracing` filter such as `info` or `kiwi_node=debug,info`. `RUST_LOG` overrides it.
    pub level: String,
    /// `text` or `json`.
    pub format: LogFormat,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            level: "info".into(),
            format: LogFormat::Text,
        }
    }
}

/// `[runtime]`
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RuntimeConfig {
    /// Threads of the network stage (gRPC I/O, HTTP/2, protobuf); 0 = one per CPU core. Fixed for the
    /// life of the process: see `worker_pool` for why this stage does not scale.
    pub network_threads: usize,
    /// `[runtime.scaling]`
    pub scaling: ScalingConfig,
    /// `[runtime.priority]`
    pub priority: PriorityConfig,
}

impl RuntimeConfig {
    /// The scaling and priority sections as a wire policy (values too large for the wire saturate, so
    /// that the shared rules still refuse them).
    pub fn to_policy(&self) -> kiwi_proto::v1::RuntimePolicy {
        let (s, p) = (&self.scaling, &self.priority);
        let n = |v: usize| u32::try_from(v).unwrap_or(u32::MAX);
        kiwi_proto::v1::RuntimePolicy {
            scaling: Some(kiwi_proto::v1::ScalingPolicy {
                enabled: s.enabled,
                min_storage_threads: n(s.min_storage_threads),
                max_storage_threads: n(s.max_storage_threads),
                scale_up_threshold: u32::from(s.scale_up_threshold),
                scale_down_threshold: u32::from(s.scale_down_threshold),
                scale_increment: n(s.scale_increment),
                evaluation_interval_ms: u32::try_from(s.evaluation_interval.as_millis())
                    .unwrap_or(u32::MAX),
            }),
            priority: Some(kiwi_proto::v1::PriorityPolicy {
                enabled: p.enabled,
                high_priority_weight: p.high_priority_weight,
                normal_priority_weight: p.normal_priority_weight,
                low_priority_weight: p.low_priority_weight,
            }),
        }
    }
}

/// `[runtime.scaling]`: how the storage worker pool sizes itself.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ScalingConfig {
    /// Let the pool grow and shrink; when false it stays at its minimum.
    pub enabled: bool,
    pub min_storage_threads: usize,
    pub max_storage_threads: usize,
    /// Grow a pool when its utilisation stays above this percentage (1–100).
    pub scale_up_threshold: u8,
    /// Shrink a pool when its utilisation stays below this percentage (1–100, below the up threshold).
    pub scale_down_threshold: u8,
    /// Threads added or removed per decision.
    pub scale_increment: usize,
    /// How often utilisation is evaluated, in milliseconds.
    #[serde(rename = "evaluation_interval_ms", with = "millis")]
    pub evaluation_interval: Duration,
}

impl Default for ScalingConfig {
    fn default() -> Self {
        ScalingConfig {
            enabled: true,
            min_storage_threads: 4,
            max_storage_threads: 32,
            scale_up_threshold: 80,
            scale_down_threshold: 20,
            scale_increment: 2,
            evaluation_interval: Duration::from_millis(1000),
        }
    }
}

/// `[runtime.priority]`: how requests share the workers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PriorityConfig {
    /// Serve by priority; when false all requests share one FIFO queue.
    pub enabled: bool,
    /// Share of service for HIGH requests under saturation, relative to the other weights (≥ 1).
    pub high_priority_weight: u32,
    pub normal_priority_weight: u32,
    pub low_priority_weight: u32,
}

impl Default for PriorityConfig {
    fn default() -> Self {
        PriorityConfig {
            enabled: true,
            high_priority_weight: 3,
            normal_priority_weight: 2,
            low_priority_weight: 1,
        }
    }
}

/// One member of the initial cluster.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PeerConfig {
    /// The member's Raft id (≥ 1).
    pub id: u64,
    /// Its gRPC address, "host:port".
    pub addr: String,
    /// Its Raft address, "host:port", when it serves Raft on its own port (its `raft_listen_addr`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub raft_addr: Option<String>,
}

impl PeerConfig {
    /// Parses the command-line form of `raft.peers`: `ID=ADDR[@RAFT_ADDR]` separated by commas, e.g.
    /// `1=10.0.0.1:7380,2=10.0.0.2:7380@10.0.0.2:7390`. Addresses are checked by [`NodeConfig::validate`].
    ///
    /// # Errors
    /// Which member is malformed and how.
    pub fn parse_list(s: &str) -> Result<Vec<PeerConfig>, String> {
        s.split(',')
            .map(str::trim)
            .filter(|m| !m.is_empty())
            .map(|m| {
                let (id, addrs) = m
                    .split_once('=')
                    .ok_or_else(|| format!("{m:?} is not ID=ADDR[@RAFT_ADDR]"))?;
                let id = id
                    .trim()
                    .parse::<u64>()
                    .ok()
                    .filter(|id| *id > 0)
                    .ok_or_else(|| format!("{m:?}: {id:?} is not a node id (1 or more)"))?;
                let (addr, raft_addr) = match addrs.split_once('@') {
                    Some((a, r)) => (a, Some(r.to_string())),
                    None => (addrs, None),
                };
                Ok(PeerConfig {
                    id,
                    addr: addr.to_string(),
                    raft_addr,
                })
            })
            .collect::<Result<Vec<_>, String>>()
            .and_then(|peers| {
                if peers.is_empty() {
                    Err("no members given".to_string())
                } else {
                    Ok(peers)
                }
            })
    }
}

/// `[raft]`
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RaftConfig {
    /// This node's Raft id (≥ 1). The data directory remembers it; a node started on a data directory
    /// with another id refuses to start.
    pub node_id: u64,
    /// The initial cluster, this node included. Empty means a single-node cluster of `node_id` at
    /// `listen_addr`.
    pub peers: Vec<PeerConfig>,
    /// Length of one Raft tick, in milliseconds.
    #[serde(rename = "tick_interval_ms", with = "millis")]
    pub tick_interval: Duration,
    /// Ticks without a leader's message before a follower campaigns.
    pub election_ticks: usize,
    /// Ticks between a leader's heartbeats (< `election_ticks`).
    pub heartbeat_ticks: usize,
    /// Applied entries kept in the log before it is compacted behind a snapshot.
    pub log_compaction_threshold: u64,
    /// Entries a compaction leaves in the log behind the applied index (and, on the leader, behind the
    /// slowest healthy follower), so that a follower lagging a little catches up from the log instead of
    /// needing a whole snapshot (etcd keeps 5,000).
    pub log_compaction_slack: u64,
    /// Answer linearizable reads on the leader from a lease while a quorum has recently confirmed it,
    /// instead of a ReadIndex round (a heartbeat to every follower) per batch of reads. Off by default:
    /// it trades a clock assumption for latency and CPU. Set it on every node. See README "Lease reads".
    pub lease_reads: bool,
    /// Start as a new member of a running cluster instead of founding one: the node waits, with no
    /// membership of its own, until the leader adds it (`NodeAdmin.AddNode`) and sends it a snapshot.
    /// Only read on the first start of an empty data directory. `peers` lists the running cluster.
    pub join: bool,
    /// `[raft.metrics]`
    pub metrics: RaftMetricsConfig,
    /// `[raft.fault_injection]`
    pub fault_injection: FaultInjectionConfig,
}

impl Default for RaftConfig {
    fn default() -> Self {
        RaftConfig {
            node_id: 1,
            peers: Vec::new(),
            // A 500 ms - 1 s election timeout (raft-rs randomizes it in [10, 20) ticks), heartbeats every
            // 100 ms: a leader's death is noticed and replaced within about a second.
            tick_interval: Duration::from_millis(50),
            election_ticks: 10,
            heartbeat_ticks: 2,
            log_compaction_threshold: 10_000,
            log_compaction_slack: 5_000,
            lease_reads: false,
            join: false,
            metrics: RaftMetricsConfig::default(),
            fault_injection: FaultInjectionConfig::default(),
        }
    }
}

/// `[raft.metrics]`
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RaftMetricsConfig {
    pub enabled: bool,
    /// How often Raft metrics are sampled, in milliseconds.
    #[serde(rename = "collection_interval_ms", with = "millis")]
    pub collection_interval: Duration,
    /// How long samples and events are kept, in seconds.
    #[serde(rename = "retention_period_sec", with = "seconds")]
    pub retention_period: Duration,
}

impl Default for RaftMetricsConfig {
    fn default() -> Self {
        RaftMetricsConfig {
            enabled: true,
            collection_interval: Duration::from_millis(100),
            retention_period: Duration::from_secs(3600),
        }
    }
}

/// `[raft.fault_injection]`
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FaultInjectionConfig {
    /// Accept fault injection commands (from the control plane). Only for test clusters.
    pub enabled: bool,
    /// Longest fault accepted, in seconds; the node ends every fault at its duration by itself.
    pub max_duration_sec: u64,
}

/// Default `raft.fault_injection.max_duration_sec`.
pub const DEFAULT_FAULT_MAX_DURATION_SEC: u64 = 300;

impl Default for FaultInjectionConfig {
    fn default() -> Self {
        FaultInjectionConfig {
            enabled: false,
            max_duration_sec: DEFAULT_FAULT_MAX_DURATION_SEC,
        }
    }
}

/// `[storage]`
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StorageConfig {
    /// `rocksdb`, `leveldb` or `memory` (nothing survives a restart; for tests).
    pub backend: BackendKind,
    /// Longest key accepted, e.g. `"8 KiB"` or a number of bytes.
    pub max_key_size: ByteSize,
    /// Longest value accepted, e.g. `"4 MiB"` or a number of bytes.
    pub max_value_size: ByteSize,
    /// Writes that add data are refused (RESOURCE_EXHAUSTED) while the filesystem of `data_dir` has less
    /// than this free; deletes, compaction and defragmentation go on. 0: never.
    pub min_free_bytes: ByteSize,
}

/// `[control]`: the link to `kiwi-control`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ControlLinkConfig {
    /// The control plane's gRPC address, "host:port" on loopback or "https://host:port" (required off
    /// loopback: TLS verified against `security.ca_file`); unset: no control plane.
    pub addr: Option<String>,
    /// How often the node sends its metrics snapshot.
    #[serde(rename = "heartbeat_interval_ms", with = "millis")]
    pub heartbeat_interval: Duration,
    /// File holding the token the node presents to a control plane with `[security] tokens_file` (an
    /// `admin` principal's). Unset: none.
    pub token_file: Option<PathBuf>,
}

impl Default for ControlLinkConfig {
    fn default() -> Self {
        ControlLinkConfig {
            addr: None,
            heartbeat_interval: Duration::from_millis(1000),
            token_file: None,
        }
    }
}

/// Shortest `control.heartbeat_interval_ms`.
pub const MIN_HEARTBEAT_INTERVAL: Duration = Duration::from_millis(10);
/// Longest `control.heartbeat_interval_ms`.
pub const MAX_HEARTBEAT_INTERVAL: Duration = Duration::from_secs(60);

/// `[telemetry]`: the Prometheus endpoints and OTLP traces.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TelemetryConfig {
    /// HTTP address of `/metrics`, `/metrics/runtime`, `/metrics/raft` and `/metrics/storage`; unset: no
    /// metrics endpoint. Off loopback it needs `metrics_token_file`.
    pub metrics_addr: Option<SocketAddr>,
    /// File holding the bearer token every metrics request must present (`Authorization: Bearer ...`).
    pub metrics_token_file: Option<PathBuf>,
    /// Metrics requests per second allowed from one client address (answered 429 above it).
    pub metrics_rate_limit_per_sec: u32,
    /// OTLP/gRPC collector traces are exported to, e.g. `http://127.0.0.1:4317`; unset: no traces.
    pub otlp_endpoint: Option<String>,
    /// Share of new traces sampled (0.0 to 1.0); a request carrying a `traceparent` follows its parent.
    pub trace_sample_ratio: f64,
}

/// Default `telemetry.metrics_rate_limit_per_sec`.
pub const DEFAULT_METRICS_RATE_LIMIT: u32 = 20;
/// Default `telemetry.trace_sample_ratio`.
pub const DEFAULT_TRACE_SAMPLE_RATIO: f64 = 0.01;

impl Default for TelemetryConfig {
    fn default() -> Self {
        TelemetryConfig {
            metrics_addr: None,
            metrics_token_file: None,
            metrics_rate_limit_per_sec: DEFAULT_METRICS_RATE_LIMIT,
            otlp_endpoint: None,
            trace_sample_ratio: DEFAULT_TRACE_SAMPLE_RATIO,
        }
    }
}

/// Most threads `runtime.network_threads` may ask for.
pub const MAX_NETWORK_THREADS: usize = 256;
/// Most storage threads `runtime.scaling.max_storage_threads` (and `SetRuntimePolicy`) may ask for.
pub const MAX_STORAGE_THREADS: usize = kiwi_proto::policy::MAX_STORAGE_THREADS as usize;
/// Longest `runtime.scaling.evaluation_interval_ms`.
pub const MAX_EVALUATION_INTERVAL: Duration =
    Duration::from_millis(kiwi_proto::policy::MAX_EVALUATION_INTERVAL_MS as u64);
/// Longest `raft.tick_interval_ms`.
pub const MAX_TICK_INTERVAL: Duration = Duration::from_secs(10);
/// Most `raft.election_ticks`.
pub const MAX_ELECTION_TICKS: usize = 1000;
/// Longest election timeout (`raft.tick_interval_ms` × `raft.election_ticks`).
pub const MAX_ELECTION_TIMEOUT: Duration = Duration::from_secs(120);
/// Most `raft.log_compaction_threshold` and `raft.log_compaction_slack`.
pub const MAX_COMPACTION_ENTRIES: u64 = 100_000_000;
/// Longest `raft.metrics.collection_interval_ms`.
pub const MAX_COLLECTION_INTERVAL: Duration = Duration::from_secs(60);
/// Longest `raft.metrics.retention_period_sec`.
pub const MAX_RETENTION_PERIOD: Duration = Duration::from_secs(7 * 24 * 3600);
/// Hard ceiling on `storage.max_key_size` (shared by every node: see [`Limits::CEILING`]).
pub const MAX_KEY_SIZE_CEILING: ByteSize = ByteSize::b(kiwi_storage::MAX_KEY_BYTES_CEILING as u64);
/// Hard ceiling on `storage.max_value_size` (shared by every node: see [`Limits::CEILING`]).
pub const MAX_VALUE_SIZE_CEILING: ByteSize =
    ByteSize::b(kiwi_storage::MAX_VALUE_BYTES_CEILING as u64);

/// A member's recorded address: its client address, then, when it serves Raft on its own port
/// (`raft_listen_addr`), a space and that address: "10.0.0.1:7380 10.0.0.1:7390". Addresses never hold
/// whitespace (`check_member_addr`). A record with the client address alone (all records written before
/// Raft ports existed) means Raft is served on the client port.
pub fn member_record(client: &str, raft: Option<&str>) -> String {
    match raft {
        Some(raft) if raft != client => format!("{client} {raft}"),
        _ => client.to_string(),
    }
}

/// The client address in a member record.
pub fn record_client_addr(record: &str) -> &str {
    record.split_once(' ').map_or(record, |(client, _)| client)
}

/// The address peers send Raft traffic to, from a member record.
pub fn record_raft_addr(record: &str) -> &str {
    record.split_once(' ').map_or(record, |(_, raft)| raft)
}

/// Whether `host:port` names this machine's loopback (an IP literal on loopback, or `localhost`).
fn is_loopback_host(addr: &str) -> bool {
    match addr.parse::<SocketAddr>() {
        Ok(a) => a.ip().is_loopback(),
        Err(_) => addr
            .rsplit_once(':')
            .is_some_and(|(host, _)| host.eq_ignore_ascii_case("localhost")),
    }
}

/// Checks a member address: `host:port` with a non-empty host and a port from 1 to 65535.
///
/// # Errors
/// What is wrong with it.
pub fn check_member_addr(addr: &str) -> Result<(), String> {
    let bad = |why: &str| Err(format!("{addr:?} is not \"host:port\": {why}"));
    if addr.parse::<SocketAddr>().is_ok() {
        return if addr.ends_with(":0") {
            bad("port 0 is not a port peers can dial")
        } else {
            Ok(())
        };
    }
    let Some((host, port)) = addr.rsplit_once(':') else {
        return bad("no port");
    };
    if host.is_empty() {
        return bad("empty host");
    }
    if host.contains(':') || host.chars().any(|c| c.is_whitespace() || c == '/') {
        return bad("invalid host (an IPv6 address needs brackets, e.g. [::1]:7380)");
    }
    match port.parse::<u16>() {
        Ok(p) if p > 0 => Ok(()),
        _ => bad("the port must be a number from 1 to 65535"),
    }
}

impl Default for StorageConfig {
    fn default() -> Self {
        StorageConfig {
            backend: BackendKind::RocksDb,
            max_key_size: ByteSize::b(kiwi_storage::DEFAULT_MAX_KEY_BYTES as u64),
            max_value_size: ByteSize::b(kiwi_storage::DEFAULT_MAX_VALUE_BYTES as u64),
            min_free_bytes: ByteSize::mib(256),
        }
    }
}

impl StorageConfig {
    /// The limits the backend enforces.
    pub fn limits(&self) -> Limits {
        Limits {
            max_key_bytes: self.max_key_size.as_u64() as usize,
            max_value_bytes: self.max_value_size.as_u64() as usize,
        }
    }
}

impl NodeConfig {
    /// Reads and parses a TOML file. Does not validate: call [`validate`](Self::validate) after applying
    /// overrides.
    ///
    /// # Errors
    /// [`ConfigError::Read`] or [`ConfigError::Parse`] (which names the offending key and line).
    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Self::from_toml(&text).map_err(|message| ConfigError::Parse {
            path: path.to_path_buf(),
            message,
        })
    }

    /// Parses TOML text; the error is toml's message, which names the key and the line.
    ///
    /// # Errors
    /// The parse error's message.
    pub fn from_toml(text: &str) -> Result<Self, String> {
        toml::from_str(text).map_err(|e| e.to_string().trim_end().to_string())
    }

    /// Checks what `--config-check` and the start check on the machine, beyond the file's own rules:
    /// `data_dir` is a directory this process can write in, or can be created (its nearest existing
    /// ancestor is a writable directory). Creates nothing.
    ///
    /// # Errors
    /// [`ConfigError::Invalid`] naming `data_dir` and what is wrong.
    pub fn check_data_dir(&self) -> Result<(), ConfigError> {
        let invalid = |message: String| {
            ConfigError::Invalid(vec![FieldError {
                field: "data_dir",
                message,
            }])
        };
        let dir = &self.data_dir;
        let shown = dir.display();
        let mut existing = dir.as_path();
        while !existing.exists() {
            existing = match existing.parent() {
                Some(p) if !p.as_os_str().is_empty() => p,
                _ => Path::new("."),
            };
        }
        if !existing.is_dir() {
            return Err(invalid(if existing == dir.as_path() {
                format!("{shown} exists and is not a directory")
            } else {
                format!(
                    "{shown} cannot be created: {} is not a directory",
                    existing.display()
                )
            }));
        }
        // Writable: a probe file, created and removed (permissions alone do not tell: read-only mounts,
        // /proc, ACLs).
        let probe = existing.join(format!(".kiwi-write-check-{}", std::process::id()));
        match std::fs::File::create(&probe) {
            Ok(_) => {
                let _ = std::fs::remove_file(&probe);
                Ok(())
            }
            Err(e) => Err(invalid(if existing == dir.as_path() {
                format!("{shown} is not writable: {e}")
            } else {
                format!(
                    "{shown} cannot be created: {} is not writable: {e}",
                    existing.display()
                )
            })),
        }
    }

    /// The storage directory inside `data_dir`.
    pub fn storage_dir(&self) -> PathBuf {
        self.data_dir.join("storage")
    }

    /// Checks the relations between fields.
    ///
    /// # Errors
    /// [`ConfigError::Invalid`] listing every broken rule, each naming its field.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let mut errs = Vec::new();
        let mut check = |ok: bool, field: &'static str, message: String| {
            if !ok {
                errs.push(FieldError { field, message });
            }
        };

        check(
            self.runtime.network_threads <= MAX_NETWORK_THREADS,
            "runtime.network_threads",
            format!(
                "must be at most {MAX_NETWORK_THREADS} (0 = one per CPU core), got {}",
                self.runtime.network_threads
            ),
        );
        // The scaling and priority rules are shared with SetRuntimePolicy and the control plane.
        for e in kiwi_proto::policy::check(&self.runtime.to_policy()) {
            check(false, e.field, e.message);
        }

        check(
            !self.data_dir.as_os_str().is_empty(),
            "data_dir",
            "must name a directory (it is empty)".to_string(),
        );
        let r = &self.raft;
        check(
            r.node_id >= 1,
            "raft.node_id",
            format!("must be at least 1, got {}", r.node_id),
        );
        check(
            r.tick_interval >= Duration::from_millis(1) && r.tick_interval <= MAX_TICK_INTERVAL,
            "raft.tick_interval_ms",
            format!(
                "must be from 1 to {}, got {}",
                MAX_TICK_INTERVAL.as_millis(),
                r.tick_interval.as_millis()
            ),
        );
        check(
            r.heartbeat_ticks >= 1,
            "raft.heartbeat_ticks",
            format!("must be at least 1, got {}", r.heartbeat_ticks),
        );
        check(
            r.election_ticks > r.heartbeat_ticks,
            "raft.election_ticks",
            format!(
                "must be greater than raft.heartbeat_ticks ({}), got {}",
                r.heartbeat_ticks, r.election_ticks
            ),
        );
        check(
            r.election_ticks <= MAX_ELECTION_TICKS,
            "raft.election_ticks",
            format!(
                "must be at most {MAX_ELECTION_TICKS}, got {}",
                r.election_ticks
            ),
        );
        if r.election_ticks <= MAX_ELECTION_TICKS && r.tick_interval <= MAX_TICK_INTERVAL {
            let timeout = r.tick_interval * r.election_ticks as u32;
            check(
                timeout <= MAX_ELECTION_TIMEOUT,
                "raft.election_ticks",
                format!(
                    "raft.tick_interval_ms × raft.election_ticks must be at most {} s, got {} ms",
                    MAX_ELECTION_TIMEOUT.as_secs(),
                    timeout.as_millis()
                ),
            );
        }
        check(
            (1..=MAX_COMPACTION_ENTRIES).contains(&r.log_compaction_threshold),
            "raft.log_compaction_threshold",
            format!(
                "must be from 1 to {MAX_COMPACTION_ENTRIES}, got {}",
                r.log_compaction_threshold
            ),
        );
        check(
            r.log_compaction_slack <= MAX_COMPACTION_ENTRIES,
            "raft.log_compaction_slack",
            format!(
                "must be at most {MAX_COMPACTION_ENTRIES}, got {}",
                r.log_compaction_slack
            ),
        );
        let mut ids = std::collections::HashSet::new();
        for peer in &r.peers {
            check(
                peer.id >= 1,
                "raft.peers",
                format!("peer ids must be at least 1, got {}", peer.id),
            );
            check(
                ids.insert(peer.id),
                "raft.peers",
                format!("peer id {} appears more than once", peer.id),
            );
            if let Err(e) = check_member_addr(&peer.addr) {
                check(false, "raft.peers", format!("peer {}: {e}", peer.id));
            }
            if let Some(Err(e)) = peer.raft_addr.as_deref().map(check_member_addr) {
                check(
                    false,
                    "raft.peers",
                    format!("peer {} raft_addr: {e}", peer.id),
                );
            }
            if peer.id == r.node_id {
                let own = self.raft_listen_addr.map(|a| a.to_string());
                check(
                    peer.raft_addr == own,
                    "raft_listen_addr",
                    format!(
                        "this node's raft.peers entry (id {}) has raft_addr {:?} but raft_listen_addr is \
                         {:?}: give both the same address, or neither",
                        peer.id,
                        peer.raft_addr.as_deref().unwrap_or("(unset)"),
                        own.as_deref().unwrap_or("(unset)")
                    ),
                );
            }
        }
        check(
            !r.join || !r.peers.is_empty(),
            "raft.join",
            "needs raft.peers to list the cluster to join".to_string(),
        );
        check(
            r.peers.is_empty() || ids.contains(&r.node_id),
            "raft.peers",
            format!("must include this node (raft.node_id = {})", r.node_id),
        );
        let m = &r.metrics;
        check(
            m.collection_interval >= Duration::from_millis(1)
                && m.collection_interval <= MAX_COLLECTION_INTERVAL,
            "raft.metrics.collection_interval_ms",
            format!(
                "must be from 1 to {}, got {}",
                MAX_COLLECTION_INTERVAL.as_millis(),
                m.collection_interval.as_millis()
            ),
        );
        check(
            m.retention_period >= m.collection_interval
                && m.retention_period <= MAX_RETENTION_PERIOD,
            "raft.metrics.retention_period_sec",
            format!(
                "must be from one collection interval to {} (7 days), got {}",
                MAX_RETENTION_PERIOD.as_secs(),
                m.retention_period.as_secs()
            ),
        );
        check(
            (1..=86_400).contains(&r.fault_injection.max_duration_sec),
            "raft.fault_injection.max_duration_sec",
            format!(
                "must be from 1 to 86400 (a day), got {}",
                r.fault_injection.max_duration_sec
            ),
        );
        if let Err(e) = tracing_subscriber::EnvFilter::try_new(&self.log.level) {
            check(
                false,
                "log.level",
                format!(
                    "{:?} is not a log filter such as \"info\" or \"kiwi_node=debug,info\": {e}",
                    self.log.level
                ),
            );
        }

        for (field, message) in self.security.problems(self.listen_addr) {
            check(false, field, message);
        }
        if let Some(etcd) = self.etcd.listen_addr {
            for (field, message) in self.security.problems(etcd) {
                check(false, field, message);
            }
            let taken = [
                Some(self.listen_addr),
                self.raft_listen_addr,
                self.telemetry.metrics_addr,
            ];
            check(
                !taken.contains(&Some(etcd)),
                "etcd.listen_addr",
                format!(
                    "{etcd} is already listen_addr, raft_listen_addr or telemetry.metrics_addr"
                ),
            );
        }
        let raft_addr = self.raft_listen_addr.unwrap_or(self.listen_addr);
        check(
            raft_addr.ip().is_loopback() || self.security.ca_file.is_some(),
            "security.ca_file",
            format!(
                "must be set when Raft is served off loopback ({raft_addr}): members prove who they are \
                 with a certificate from the cluster CA (mutual TLS), which tokens cannot do. Set \
                 security.cert_file, key_file and ca_file (see `kiwi playground --secure`), or keep \
                 {} on 127.0.0.1",
                if self.raft_listen_addr.is_some() {
                    "raft_listen_addr"
                } else {
                    "listen_addr"
                }
            ),
        );
        let sec = &self.security;
        check(
            self.control
                .addr
                .as_ref()
                .is_none_or(|a| !a.starts_with("https://") || sec.ca_file.is_some()),
            "control.addr",
            "an https:// control plane needs security.ca_file (and cert_file, key_file): the node \
             trusts the cluster CA and presents its certificate"
                .to_string(),
        );
        let t = &self.telemetry;
        check(
            t.metrics_addr.is_none_or(|a| a.ip().is_loopback())
                || t.metrics_token_file.is_some()
                || self.security.tokens_file.is_some(),
            "telemetry.metrics_token_file",
            format!(
                "must be set when telemetry.metrics_addr is not a loopback address ({}): metrics \
                 would be open to anyone who can reach it",
                t.metrics_addr.map(|a| a.to_string()).unwrap_or_default()
            ),
        );
        check(
            (1..=100_000).contains(&t.metrics_rate_limit_per_sec),
            "telemetry.metrics_rate_limit_per_sec",
            format!(
                "must be from 1 to 100000, got {}",
                t.metrics_rate_limit_per_sec
            ),
        );
        check(
            (0.0..=1.0).contains(&t.trace_sample_ratio),
            "telemetry.trace_sample_ratio",
            format!("must be from 0.0 to 1.0, got {}", t.trace_sample_ratio),
        );
        if let Some(e) = &t.otlp_endpoint {
            check(
                e.starts_with("http://")
                    && e.parse::<tonic::transport::Uri>()
                        .is_ok_and(|u| u.host().is_some()),
                "telemetry.otlp_endpoint",
                format!(
                    "must be an http:// URL such as http://127.0.0.1:4317 (TLS to the collector is \
                     not supported yet), got {e:?}"
                ),
            );
        }

        let c = &self.control;
        if let Some(addr) = &c.addr {
            if let Err(e) = check_member_addr(addr.strip_prefix("https://").unwrap_or(addr)) {
                check(false, "control.addr", e);
            } else {
                check(
                    addr.starts_with("https://") || is_loopback_host(addr),
                    "control.addr",
                    format!(
                        "{addr:?} is not on loopback, so it must be https://{addr}: in plain text the \
                         node would send its control token in clear and take policy and fault \
                         commands from whatever answers at that address (https:// verifies the \
                         control plane's certificate against security.ca_file)"
                    ),
                );
            }
        }
        check(
            (MIN_HEARTBEAT_INTERVAL..=MAX_HEARTBEAT_INTERVAL).contains(&c.heartbeat_interval),
            "control.heartbeat_interval_ms",
            format!(
                "must be from {} to {}, got {}",
                MIN_HEARTBEAT_INTERVAL.as_millis(),
                MAX_HEARTBEAT_INTERVAL.as_millis(),
                c.heartbeat_interval.as_millis()
            ),
        );

        let st = &self.storage;
        check(
            st.max_key_size.as_u64() >= 1 && st.max_key_size <= MAX_KEY_SIZE_CEILING,
            "storage.max_key_size",
            format!(
                "must be from 1 byte to {MAX_KEY_SIZE_CEILING}, got {}",
                st.max_key_size
            ),
        );
        check(
            st.max_value_size <= MAX_VALUE_SIZE_CEILING,
            "storage.max_value_size",
            format!(
                "must be at most {MAX_VALUE_SIZE_CEILING}, got {}",
                st.max_value_size
            ),
        );

        let c = &self.connections;
        check(
            c.answer_buffer_per_connection >= ByteSize::kib(64),
            "connections.answer_buffer_per_connection",
            format!(
                "must be at least 64 KiB, got {}",
                c.answer_buffer_per_connection
            ),
        );
        check(
            c.answer_buffer_total >= c.answer_buffer_per_connection,
            "connections.answer_buffer_total",
            format!(
                "must be at least connections.answer_buffer_per_connection ({}), got {}",
                c.answer_buffer_per_connection, c.answer_buffer_total
            ),
        );

        if errs.is_empty() {
            Ok(())
        } else {
            Err(ConfigError::Invalid(errs))
        }
    }
}

/// Durations written as whole milliseconds.
mod millis {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(d.as_millis() as u64)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        u64::deserialize(d).map(Duration::from_millis)
    }
}

/// Durations written as whole seconds.
mod seconds {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(d.as_secs())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        u64::deserialize(d).map(Duration::from_secs)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peers_parse_from_the_command_line_form() {
        let peers = PeerConfig::parse_list("1=10.0.0.1:7380, 2=h2:7380@h2:7390,").unwrap();
        assert_eq!(
            peers,
            [
                PeerConfig {
                    id: 1,
                    addr: "10.0.0.1:7380".into(),
                    raft_addr: None
                },
                PeerConfig {
                    id: 2,
                    addr: "h2:7380".into(),
                    raft_addr: Some("h2:7390".into())
                }
            ]
        );
        for (bad, why) in [
            ("", "no members"),
            ("10.0.0.1:7380", "is not ID=ADDR"),
            ("0=h:1", "is not a node id"),
            ("x=h:1", "is not a node id"),
        ] {
            let e = PeerConfig::parse_list(bad).unwrap_err();
            assert!(e.contains(why), "{bad:?}: {e}");
        }
    }

    proptest::proptest! {
        /// Any text, and any one-byte change of the example file, is accepted or refused with a
        /// message; never a panic, in parsing or in validation.
        #[test]
        fn any_config_text_is_refused_or_accepted_without_panic(text in "(?s).{0,300}") {
            if let Ok(c) = NodeConfig::from_toml(&text) {
                let _ = c.validate();
            }
        }

        #[test]
        fn mutated_example_files_never_panic(at in 0usize..4000, byte in proptest::prelude::any::<u8>()) {
            let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/kiwi-node.example.toml");
            let mut bytes = std::fs::read(path).unwrap();
            let at = at % bytes.len();
            bytes[at] = byte;
            let text = String::from_utf8_lossy(&bytes);
            match NodeConfig::from_toml(&text) {
                Ok(c) => { let _ = c.validate(); }
                Err(e) => proptest::prop_assert!(!e.is_empty()),
            }
        }
    }

    fn invalid_fields(c: &NodeConfig) -> Vec<&'static str> {
        match c.validate() {
            Ok(()) => Vec::new(),
            Err(ConfigError::Invalid(errs)) => errs.iter().map(|e| e.field).collect(),
            Err(e) => panic!("unexpected error {e}"),
        }
    }

    #[test]
    fn the_data_dir_must_be_a_writable_directory_or_creatable() {
        let tmp = tempfile::tempdir().unwrap();
        let file = tmp.path().join("file");
        std::fs::write(&file, b"x").unwrap();
        let at = |dir: PathBuf| NodeConfig {
            data_dir: dir,
            ..NodeConfig::default()
        };
        assert!(at(tmp.path().to_path_buf()).check_data_dir().is_ok());
        assert!(at(tmp.path().join("a/b/c")).check_data_dir().is_ok());
        assert!(!tmp.path().join("a").exists(), "nothing is created");
        for (dir, why) in [
            (file.clone(), "is not a directory"),
            (file.join("sub"), "cannot be created"),
            (PathBuf::from("/proc/kiwi-data"), "cannot be created"),
        ] {
            let e = at(dir.clone()).check_data_dir().unwrap_err().to_string();
            assert!(
                e.contains("data_dir") && e.contains(why),
                "{}: {e}",
                dir.display()
            );
        }
        assert_eq!(invalid_fields(&at(PathBuf::new())), ["data_dir"]);
    }

    #[test]
    fn a_control_plane_off_loopback_needs_https() {
        let c = |addr: &str| {
            NodeConfig::from_toml(&format!(
                "[control]\naddr = \"{addr}\"\n[security]\ncert_file = \"c\"\nkey_file = \"k\"\n\
                 ca_file = \"a\"\n"
            ))
            .unwrap()
        };
        for ok in [
            "127.0.0.1:7400",
            "localhost:7400",
            "[::1]:7400",
            "https://10.0.0.5:7400",
            "https://ctl.example:7400",
        ] {
            assert!(invalid_fields(&c(ok)).is_empty(), "{ok}");
        }
        for plain in ["10.0.0.5:7400", "ctl.example:7400"] {
            let fields = invalid_fields(&c(plain));
            assert_eq!(fields, ["control.addr"], "{plain}");
            let e = c(plain).validate().unwrap_err().to_string();
            assert!(e.contains(&format!("https://{plain}")), "{e}");
        }
    }

    #[test]
    fn telemetry_settings_are_checked() {
        let c = |toml: &str| NodeConfig::from_toml(&format!("[telemetry]\n{toml}")).unwrap();
        assert_eq!(
            invalid_fields(&c("metrics_addr = \"0.0.0.0:9380\"")),
            ["telemetry.metrics_token_file"]
        );
        assert!(invalid_fields(&c("metrics_addr = \"127.0.0.1:9380\"")).is_empty());
        assert!(
            invalid_fields(&c(
                "metrics_addr = \"0.0.0.0:9380\"\nmetrics_token_file = \"/t\""
            ))
            .is_empty()
        );
        assert_eq!(
            invalid_fields(&c("metrics_rate_limit_per_sec = 0")),
            ["telemetry.metrics_rate_limit_per_sec"]
        );
        assert_eq!(
            invalid_fields(&c("trace_sample_ratio = 1.5")),
            ["telemetry.trace_sample_ratio"]
        );
        for bad in ["127.0.0.1:4317", "https://collector:4317", "http://"] {
            assert_eq!(
                invalid_fields(&c(&format!("otlp_endpoint = {bad:?}"))),
                ["telemetry.otlp_endpoint"],
                "{bad}"
            );
        }
        assert!(invalid_fields(&c("otlp_endpoint = \"http://127.0.0.1:4317\"")).is_empty());
    }

    #[test]
    fn defaults_are_valid() {
        NodeConfig::default().validate().unwrap();
    }

    #[test]
    fn runtime_defaults_are_the_shared_default_policy() {
        assert_eq!(
            RuntimeConfig::default().to_policy(),
            kiwi_proto::policy::default_policy()
        );
    }

    #[test]
    fn empty_file_means_defaults() {
        assert_eq!(NodeConfig::from_toml("").unwrap(), NodeConfig::default());
    }

    #[test]
    fn unknown_keys_are_rejected_by_name() {
        let err = NodeConfig::from_toml("[runtime.scaling]\nmax_thread = 4\n").unwrap_err();
        assert!(err.contains("max_thread"), "{err}");
        let err = NodeConfig::from_toml("[storage]\nbakend = \"rocksdb\"\n").unwrap_err();
        assert!(err.contains("bakend"), "{err}");
        let err = NodeConfig::from_toml("[nonsense]\n").unwrap_err();
        assert!(err.contains("nonsense"), "{err}");
    }

    #[test]
    fn bad_values_are_rejected_by_name() {
        let err = NodeConfig::from_toml("[storage]\nbackend = \"sqlite\"\n").unwrap_err();
        assert!(err.contains("sqlite"), "{err}");
        let err = NodeConfig::from_toml("listen_addr = \"nowhere\"\n").unwrap_err();
        assert!(err.contains("listen_addr"), "{err}");
    }

    #[test]
    fn sizes_and_durations_are_typed() {
        let c = NodeConfig::from_toml(
            "[storage]\nmax_key_size = \"1 KiB\"\nmax_value_size = 1000\n[runtime.scaling]\nevaluation_interval_ms = 250\n",
        )
        .unwrap();
        assert_eq!(c.storage.limits().max_key_bytes, 1024);
        assert_eq!(c.storage.limits().max_value_bytes, 1000);
        assert_eq!(
            c.runtime.scaling.evaluation_interval,
            Duration::from_millis(250)
        );
    }

    #[test]
    fn thread_bounds_must_be_ordered() {
        let mut c = NodeConfig::default();
        c.runtime.scaling.min_storage_threads = 40;
        assert_eq!(invalid_fields(&c), ["runtime.scaling.min_storage_threads"]);
        let mut c = NodeConfig::default();
        c.runtime.network_threads = 5000;
        assert_eq!(invalid_fields(&c), ["runtime.network_threads"]);
    }

    #[test]
    fn thresholds_are_percentages_and_ordered() {
        let mut c = NodeConfig::default();
        c.runtime.scaling.scale_up_threshold = 101;
        assert_eq!(invalid_fields(&c), ["runtime.scaling.scale_up_threshold"]);
        let mut c = NodeConfig::default();
        c.runtime.scaling.scale_down_threshold = 80;
        let err = c.validate().unwrap_err().to_string();
        assert!(
            err.contains("runtime.scaling.scale_down_threshold: must be below runtime.scaling.scale_up_threshold (80), got 80"),
            "{err}"
        );
        let mut c = NodeConfig::default();
        c.runtime.scaling.scale_down_threshold = 0;
        assert_eq!(invalid_fields(&c), ["runtime.scaling.scale_down_threshold"]);
    }

    #[test]
    fn weights_must_be_positive() {
        let mut c = NodeConfig::default();
        c.runtime.priority.low_priority_weight = 0;
        assert_eq!(invalid_fields(&c), ["runtime.priority.low_priority_weight"]);
    }

    #[test]
    fn raft_rules() {
        let mut c = NodeConfig::default();
        c.raft.election_ticks = 2;
        assert_eq!(invalid_fields(&c), ["raft.election_ticks"]);
        let mut c = NodeConfig::default();
        c.raft.node_id = 0;
        assert_eq!(invalid_fields(&c), ["raft.node_id"]);
        let mut c = NodeConfig::default();
        c.raft.peers = vec![
            PeerConfig {
                id: 2,
                addr: "127.0.0.1:1".into(),
                raft_addr: None,
            },
            PeerConfig {
                id: 2,
                addr: "127.0.0.1:2".into(),
                raft_addr: None,
            },
        ];
        assert_eq!(invalid_fields(&c), ["raft.peers", "raft.peers"]);
    }

    #[test]
    fn the_etcd_port_is_its_own_and_follows_the_client_port_rules() {
        let mut c = NodeConfig::from_toml("[etcd]\nlisten_addr = \"127.0.0.1:2379\"\n").unwrap();
        assert!(invalid_fields(&c).is_empty());
        assert_eq!(c.etcd.listen_addr, Some("127.0.0.1:2379".parse().unwrap()));
        c.etcd.listen_addr = Some(c.listen_addr);
        assert_eq!(invalid_fields(&c), ["etcd.listen_addr"]);
        // Off loopback it needs TLS and tokens, as the client port does.
        c.etcd.listen_addr = Some("10.1.2.3:2379".parse().unwrap());
        assert!(!invalid_fields(&c).is_empty());
        c.etcd.listen_addr = Some("127.0.0.1:2379".parse().unwrap());
        c.security.tokens_file = Some("/nonexistent/tokens.toml".into());
        assert!(!invalid_fields(&c).contains(&"etcd.listen_addr"));
        let e = NodeConfig::from_toml("[etcd]\nlisten = \"127.0.0.1:2379\"\n").unwrap_err();
        assert!(e.contains("listen"), "{e}");
    }

    #[test]
    fn a_raft_port_is_given_in_both_places_and_off_loopback_needs_member_certificates() {
        let peers = |raft: Option<&str>| {
            vec![PeerConfig {
                id: 1,
                addr: "127.0.0.1:7380".into(),
                raft_addr: raft.map(Into::into),
            }]
        };
        let mut c = NodeConfig::default();
        c.raft.peers = peers(Some("127.0.0.1:7390"));
        assert_eq!(invalid_fields(&c), ["raft_listen_addr"]);
        c.raft_listen_addr = Some("127.0.0.1:7390".parse().unwrap());
        assert!(invalid_fields(&c).is_empty());
        c.raft.peers = peers(None);
        assert_eq!(invalid_fields(&c), ["raft_listen_addr"]);
        c.raft.peers = peers(Some("a b:1"));
        assert_eq!(invalid_fields(&c), ["raft.peers", "raft_listen_addr"]);

        let mut c = NodeConfig {
            raft_listen_addr: Some("0.0.0.0:7390".parse().unwrap()),
            ..NodeConfig::default()
        };
        assert_eq!(invalid_fields(&c), ["security.ca_file"]);
        c.security.cert_file = Some("c".into());
        c.security.key_file = Some("k".into());
        c.security.ca_file = Some("a".into());
        assert!(invalid_fields(&c).is_empty());
    }

    #[test]
    fn a_member_record_holds_the_client_and_the_raft_address() {
        let both = member_record("h:1", Some("h:2"));
        assert_eq!(both, "h:1 h:2");
        assert_eq!(
            (record_client_addr(&both), record_raft_addr(&both)),
            ("h:1", "h:2")
        );
        for one in [
            member_record("h:1", None),
            member_record("h:1", Some("h:1")),
        ] {
            assert_eq!(one, "h:1");
            assert_eq!(
                (record_client_addr(&one), record_raft_addr(&one)),
                ("h:1", "h:1")
            );
        }
    }

    #[test]
    fn storage_limits_are_bounded() {
        let mut c = NodeConfig::default();
        c.storage.max_key_size = ByteSize::b(0);
        c.storage.max_value_size = ByteSize::gib(1);
        assert_eq!(
            invalid_fields(&c),
            ["storage.max_key_size", "storage.max_value_size"]
        );
    }

    #[test]
    fn every_number_has_a_ceiling() {
        let mut c = NodeConfig::default();
        c.runtime.scaling.min_storage_threads = u32::MAX as usize;
        c.runtime.scaling.max_storage_threads = u32::MAX as usize;
        assert_eq!(invalid_fields(&c), ["runtime.scaling.max_storage_threads"]);
        let mut c = NodeConfig::default();
        c.raft.tick_interval = Duration::from_millis(u64::MAX);
        assert_eq!(invalid_fields(&c), ["raft.tick_interval_ms"]);
        let mut c = NodeConfig::default();
        c.runtime.scaling.evaluation_interval = Duration::from_millis(u64::from(u32::MAX));
        assert_eq!(
            invalid_fields(&c),
            ["runtime.scaling.evaluation_interval_ms"]
        );
        let mut c = NodeConfig::default();
        c.raft.election_ticks = 100_000;
        assert!(invalid_fields(&c).contains(&"raft.election_ticks"));
        let mut c = NodeConfig::default();
        c.raft.tick_interval = Duration::from_secs(10);
        c.raft.election_ticks = 100;
        let err = c.validate().unwrap_err().to_string();
        assert!(
            err.contains("raft.election_ticks") && err.contains("120 s"),
            "{err}"
        );
        let mut c = NodeConfig::default();
        c.raft.log_compaction_slack = u64::MAX;
        c.runtime.scaling.scale_increment = 1000;
        c.runtime.priority.high_priority_weight = u32::MAX;
        assert_eq!(
            invalid_fields(&c),
            [
                "runtime.scaling.scale_increment",
                "runtime.priority.high_priority_weight",
                "raft.log_compaction_slack"
            ]
        );
    }

    #[test]
    fn log_level_is_checked_with_the_rest() {
        let mut c = NodeConfig::default();
        c.log.level = "kiwi_node=loud".into();
        assert_eq!(invalid_fields(&c), ["log.level"]);
        c.log.level = "kiwi_node=debug,info".into();
        assert_eq!(invalid_fields(&c), Vec::<&str>::new());
    }

    #[test]
    fn member_addresses_are_host_and_port() {
        for ok in [
            "127.0.0.1:7380",
            "node-1.example:7380",
            "[::1]:7380",
            "localhost:1",
        ] {
            assert_eq!(check_member_addr(ok), Ok(()), "{ok}");
        }
        for bad in [
            ":",
            "",
            "host",
            ":7380",
            "host:",
            "host:0",
            "host:99999",
            "a b:1",
            "::1:80",
        ] {
            assert!(check_member_addr(bad).is_err(), "{bad:?} accepted");
        }
        let mut c = NodeConfig::default();
        c.raft.peers = vec![PeerConfig {
            id: 1,
            addr: ":".into(),
            raft_addr: None,
        }];
        assert_eq!(invalid_fields(&c), ["raft.peers"]);
    }

    #[test]
    fn every_problem_is_reported() {
        let mut c = NodeConfig::default();
        c.runtime.priority.high_priority_weight = 0;
        c.raft.heartbeat_ticks = 0;
        assert_eq!(
            invalid_fields(&c),
            [
                "runtime.priority.high_priority_weight",
                "raft.heartbeat_ticks"
            ]
        );
    }
}
