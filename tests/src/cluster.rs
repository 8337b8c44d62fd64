//! A cluster of real `kiwi-node` processes on loopback ports, for the replication scenarios.
//!
//! Each node gets its own data directory and a TOML config written by the harness, and runs as a child
//! process whose stderr goes to `<dir>/node-<id>.log` (appended across restarts). A node can be stopped
//! gracefully (SIGTERM), killed (SIGKILL) and restarted on the same directory and port. When a test panics
//! the harness prints the tail of every node's log, so a failure explains itself.
//!
//! The binary is `KIWI_NODE_BIN` if set, else `kiwi-node` next to the test executable's directory
//! (`target/<profile>/kiwi-node`, which `cargo test --workspace` builds).

use std::collections::BTreeMap;
use std::fs::OpenOptions;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use kiwi_proto::v1::kv_service_client::KvServiceClient;

use crate::ports::free_addr;
use kiwi_proto::v1::node_admin_client::NodeAdminClient;
use kiwi_proto::v1::{
    Consistency, GetRequest, PutRequest, RaftRole, RequestHeader, ScanRequest, StatusRequest,
    StatusResponse,
};
use tonic::transport::Channel;
use tonic::{Code, Status};

/// How long helpers wait for a condition before failing the test.
pub const DEADLINE: Duration = Duration::from_secs(30);

/// Options for [`Cluster::start`].
#[derive(Debug, Clone)]
pub struct ClusterOptions {
    pub nodes: u64,
    /// `storage.backend`: "rocksdb", "leveldb" or "memory".
    pub backend: String,
    /// `raft.log_compaction_threshold`.
    pub compaction_threshold: u64,
    /// `raft.log_compaction_slack` (0 here, unlike the node's default, so that small thresholds give
    /// snapshots quickly).
    pub compaction_slack: u64,
    pub tick_interval_ms: u64,
    /// Extra lines for every node's `[raft]` table (e.g. `lease_reads = true`).
    pub raft_extra: String,
    /// Extra TOML appended to every node's config (e.g. a `[runtime.scaling]` table).
    pub extra_config: String,
    /// Logs as JSON lines (`log.format = "json"`) instead of text.
    pub log_json: bool,
    /// Extra lines for every node's `[telemetry]` table (each node always gets a loopback
    /// `metrics_addr`; see [`Cluster::metrics_addr`]).
    pub telemetry_extra: String,
    /// Every node serves Raft on its own port (`raft_listen_addr`, and `raft_addr` in `raft.peers`).
    pub raft_ports: bool,
    /// Serve etcd's v3 API on a port of each node's own (`[etcd] listen_addr`).
    pub etcd_ports: bool,
}

impl Default for ClusterOptions {
    fn default() -> Self {
        ClusterOptions {
            nodes: 3,
            backend: "rocksdb".into(),
            compaction_threshold: 100_000,
            compaction_slack: 0,
            tick_interval_ms: 50,
            raft_extra: String::new(),
            extra_config: String::new(),
            telemetry_extra: String::new(),
            log_json: false,
            raft_ports: false,
            etcd_ports: false,
        }
    }
}

struct NodeProc {
    addr: SocketAddr,
    /// `telemetry.metrics_addr`.
    metrics_addr: SocketAddr,
    /// `raft_listen_addr`, with [`ClusterOptions::raft_ports`].
    raft_addr: Option<SocketAddr>,
    /// `[etcd] listen_addr`, with [`ClusterOptions::etcd_ports`].
    etcd_addr: Option<SocketAddr>,
    dir: PathBuf,
    child: Option<Child>,
    /// Started with `raft.join = true` (not a founding member).
    join: bool,
    /// Extra lines for this node's `[storage]` table (e.g. a lower `max_value_size`).
    storage_extra: String,
}

/// A running test cluster. Dropping it kills every node.
///
/// Clusters in one test binary run one at a time (a process-wide lock is held for the cluster's life): on
/// a 2-core machine several fsync-heavy clusters at once would starve each other's heartbeats.
pub struct Cluster {
    pub opts: ClusterOptions,
    root: tempfile::TempDir,
    nodes: BTreeMap<u64, NodeProc>,
    _serial: MutexGuard<'static, ()>,
}

static SERIAL: Mutex<()> = Mutex::new(());

/// Holds the process-wide lock clusters hold for their life, for a test that starts its own cluster of
/// processes another way (e.g. `kiwi playground`): it then never competes with a [`Cluster`] of the same
/// test binary for the machine's cores.
pub fn serial() -> MutexGuard<'static, ()> {
    SERIAL
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// The `kiwi-node` binary the harness runs.
///
/// # Panics
/// If it cannot be found.
pub fn node_binary() -> PathBuf {
    if let Some(p) = std::env::var_os("KIWI_NODE_BIN") {
        return PathBuf::from(p);
    }
    let exe = std::env::current_exe().expect("current_exe");
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("test binary lives in target/<profile>/deps");
    let bin = profile_dir.join("kiwi-node");
    assert!(
        bin.exists(),
        "{} not found: build it first (cargo build --workspace) or set KIWI_NODE_BIN",
        bin.display()
    );
    bin
}

impl Cluster {
    /// Starts `opts.nodes` nodes that form one cluster, and waits until they elect a leader.
    pub async fn start(opts: ClusterOptions) -> Cluster {
        let mut cluster = Cluster::prepare(opts);
        cluster.start_prepared().await;
        cluster
    }

    /// A cluster of `opts.nodes` nodes with their directories and config files written (see
    /// [`Cluster::config_path`]) but no node started: for a test that prepares the data directories
    /// first (a restore), then calls [`Cluster::start_prepared`].
    pub fn prepare(opts: ClusterOptions) -> Cluster {
        let serial = SERIAL
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let root = tempfile::tempdir().expect("tempdir");
        let mut nodes = BTreeMap::new();
        for id in 1..=opts.nodes {
            let dir = root.path().join(format!("node-{id}"));
            std::fs::create_dir_all(&dir).expect("create node dir");
            nodes.insert(
                id,
                NodeProc {
                    addr: free_addr(),
                    metrics_addr: free_addr(),
                    raft_addr: opts.raft_ports.then(free_addr),
                    etcd_addr: opts.etcd_ports.then(free_addr),
                    dir,
                    child: None,
                    join: false,
                    storage_extra: String::new(),
                },
            );
        }
        let cluster = Cluster {
            opts,
            root,
            nodes,
            _serial: serial,
        };
        for id in cluster.ids() {
            cluster.write_config(id);
        }
        cluster
    }

    /// Starts every node of a [`Cluster::prepare`]d cluster and waits until they elect a leader.
    pub async fn start_prepared(&mut self) {
        for id in self.ids() {
            self.spawn(id);
        }
        self.wait_leader().await;
    }

    /// A node's config file (written by [`Cluster::prepare`], rewritten at each start).
    pub fn config_path(&self, id: u64) -> PathBuf {
        self.nodes[&id].dir.join("kiwi-node.toml")
    }

    fn write_config(&self, id: u64) -> PathBuf {
        let path = self.config_path(id);
        std::fs::write(&path, self.config_text(id)).expect("write node config");
        path
    }

    /// Ids of every node the harness knows (running or not).
    pub fn ids(&self) -> Vec<u64> {
        self.nodes.keys().copied().collect()
    }

    /// Ids of the nodes currently running.
    pub fn running(&self) -> Vec<u64> {
        self.nodes
            .iter()
            .filter(|(_, n)| n.child.is_some())
            .map(|(id, _)| *id)
            .collect()
    }

    /// Every node's gRPC address as `host:port`, in id order: a client's endpoint list.
    pub fn endpoints(&self) -> Vec<String> {
        self.nodes.values().map(|n| n.addr.to_string()).collect()
    }

    /// A node's gRPC address.
    pub fn addr(&self, id: u64) -> SocketAddr {
        self.nodes[&id].addr
    }

    /// A node's own Raft port (`raft_listen_addr`), with [`ClusterOptions::raft_ports`].
    pub fn raft_addr(&self, id: u64) -> Option<SocketAddr> {
        self.nodes[&id].raft_addr
    }

    /// A node's etcd v3 API (`[etcd] listen_addr`), with [`ClusterOptions::etcd_ports`].
    pub fn etcd_addr(&self, id: u64) -> Option<SocketAddr> {
        self.nodes[&id].etcd_addr
    }

    /// A node's metrics endpoint (`telemetry.metrics_addr`).
    pub fn metrics_addr(&self, id: u64) -> SocketAddr {
        self.nodes[&id].metrics_addr
    }

    /// The harness's root directory.
    pub fn root(&self) -> &Path {
        self.root.path()
    }

    fn config_text(&self, id: u64) -> String {
        let node = &self.nodes[&id];
        let mut s = format!(
            "data_dir = {:?}\nlisten_addr = \"{}\"\n{}\n[log]\nlevel = \"info,kiwi_node=debug\"\nformat = \"{}\"\n\n[raft]\nnode_id = {id}\n\
             tick_interval_ms = {}\nelection_ticks = 10\nheartbeat_ticks = 2\nlog_compaction_threshold = {}\n\
             log_compaction_slack = {}\njoin = {}\n{}\n",
            node.dir.join("data").display().to_string(),
            node.addr,
            node.raft_addr
                .map(|a| format!("raft_listen_addr = \"{a}\"\n"))
                .unwrap_or_default(),
            if self.opts.log_json { "json" } else { "text" },
            self.opts.tick_interval_ms,
            self.opts.compaction_threshold,
            self.opts.compaction_slack,
            node.join,
            self.opts.raft_extra,
        );
        // The founding members, as every founder's config lists them (the cluster id derives from them);
        // a joining node lists them and itself.
        for (pid, p) in &self.nodes {
            if !p.join || *pid == id {
                s.push_str(&format!(
                    "\n[[raft.peers]]\nid = {pid}\naddr = \"{}\"\n",
                    p.addr
                ));
                if let Some(raft) = p.raft_addr {
                    s.push_str(&format!("raft_addr = \"{raft}\"\n"));
                }
            }
        }
        s.push_str(&format!(
            "\n[storage]\nbackend = \"{}\"\n{}",
            self.opts.backend, node.storage_extra
        ));
        s.push_str(&format!(
            "\n[telemetry]\nmetrics_addr = \"{}\"\n{}\n",
            node.metrics_addr, self.opts.telemetry_extra
        ));
        s.push_str(&self.opts.extra_config);
        if let Some(etcd) = node.etcd_addr {
            s.push_str(&format!("\n[etcd]\nlisten_addr = \"{etcd}\"\n"));
        }
        s
    }

    fn spawn(&mut self, id: u64) {
        assert!(
            self.nodes[&id].child.is_none(),
            "node {id} is already running"
        );
        let config_path = self.write_config(id);
        let node = self.nodes.get_mut(&id).expect("known node");
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(node.dir.join(format!("node-{id}.log")))
            .expect("open node log");
        let child = Command::new(node_binary())
            .arg("--config")
            .arg(&config_path)
            .env_remove("RUST_LOG")
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("dup log"))
            .stderr(log)
            .spawn()
            .expect("spawn kiwi-node");
        node.child = Some(child);
    }

    /// Adds a node that is not part of the initial cluster: it starts with `raft.join = true` and an empty
    /// data directory, and waits to be added with `NodeAdmin.AddNode`. Returns its id.
    pub fn spawn_joining_node(&mut self) -> u64 {
        let id = self.nodes.keys().max().copied().unwrap_or(0) + 1;
        let dir = self.root.path().join(format!("node-{id}"));
        std::fs::create_dir_all(&dir).expect("create node dir");
        self.nodes.insert(
            id,
            NodeProc {
                addr: free_addr(),
                metrics_addr: free_addr(),
                raft_addr: self.opts.raft_ports.then(free_addr),
                etcd_addr: self.opts.etcd_ports.then(free_addr),
                dir,
                child: None,
                join: true,
                storage_extra: String::new(),
            },
        );
        self.spawn(id);
        id
    }

    /// Sets extra lines for node `id`'s `[storage]` table, used from its next (re)start.
    pub fn set_storage_extra(&mut self, id: u64, lines: &str) {
        self.nodes.get_mut(&id).expect("known node").storage_extra = lines.to_string();
    }

    /// A running node's process id.
    pub fn pid(&self, id: u64) -> u32 {
        self.nodes[&id]
            .child
            .as_ref()
            .expect("node is running")
            .id()
    }

    /// A node's data directory (as its config names it).
    pub fn data_dir(&self, id: u64) -> PathBuf {
        self.nodes[&id].dir.join("data")
    }

    /// Waits until a node's process exits by itself and returns its exit status.
    ///
    /// # Panics
    /// If it is still running after [`DEADLINE`].
    pub async fn wait_exit(&mut self, id: u64) -> std::process::ExitStatus {
        let deadline = Instant::now() + DEADLINE;
        loop {
            let node = self.nodes.get_mut(&id).expect("known node");
            let child = node.child.as_mut().expect("node was started");
            if let Some(status) = child.try_wait().expect("wait") {
                node.child = None;
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "node {id} still runs {DEADLINE:?} later"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Kills a node with SIGKILL and reaps it.
    pub fn kill(&mut self, id: u64) {
        if let Some(mut child) = self.nodes.get_mut(&id).and_then(|n| n.child.take()) {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Stops a node with SIGTERM and waits for it to exit; returns its exit status.
    pub fn stop(&mut self, id: u64) -> std::process::ExitStatus {
        let mut child = self
            .nodes
            .get_mut(&id)
            .and_then(|n| n.child.take())
            .expect("node is running");
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(child.id().to_string())
            .status();
        let deadline = Instant::now() + DEADLINE;
        loop {
            if let Some(status) = child.try_wait().expect("wait") {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "node {id} did not exit within {DEADLINE:?} of SIGTERM"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Freezes a node with SIGSTOP: it keeps its sockets but answers nothing, like a partitioned node.
    pub fn pause(&self, id: u64) {
        self.signal(id, "-STOP");
    }

    /// Resumes a node frozen by [`pause`](Self::pause).
    pub fn resume(&self, id: u64) {
        self.signal(id, "-CONT");
    }

    fn signal(&self, id: u64, sig: &str) {
        let pid = self.nodes[&id]
            .child
            .as_ref()
            .expect("node is running")
            .id();
        let ok = Command::new("kill")
            .arg(sig)
            .arg(pid.to_string())
            .status()
            .expect("run kill");
        assert!(ok.success(), "kill {sig} {pid} failed");
    }

    /// Starts a stopped or killed node again on the same data directory and port.
    pub fn restart(&mut self, id: u64) {
        self.spawn(id);
    }

    /// Restarts every node whose process exited on its own (an injected crash, say); returns their ids.
    /// A node stopped through [`Cluster::kill`] or [`Cluster::stop`] is not restarted.
    pub fn restart_exited(&mut self) -> Vec<u64> {
        let exited: Vec<u64> = self
            .nodes
            .iter_mut()
            .filter_map(|(id, n)| {
                let child = n.child.as_mut()?;
                matches!(child.try_wait(), Ok(Some(_))).then_some(*id)
            })
            .collect();
        for &id in &exited {
            if let Some(n) = self.nodes.get_mut(&id) {
                n.child = None;
            }
            self.spawn(id);
        }
        exited
    }

    /// A KV client for one node (connects lazily, so a node that is down fails calls, not this).
    pub fn kv(&self, id: u64) -> KvServiceClient<Channel> {
        KvServiceClient::new(self.channel(id))
    }

    /// Cloneable clients for every node, for load tasks.
    pub fn clients(&self) -> Clients {
        Clients {
            nodes: self.nodes.keys().map(|id| (*id, self.kv(*id))).collect(),
        }
    }

    /// Starts `workers` tasks that each put fresh keys `<prefix>-<worker>-<n>` (value = key) through the
    /// leader, following redirects and retrying, until [`Load::finish`]. Only acknowledged puts are
    /// recorded.
    pub fn start_load(&self, workers: usize, prefix: &str) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let count = Arc::new(AtomicU64::new(0));
        let clients = self.clients();
        let tasks = (0..workers)
            .map(|w| {
                let clients = clients.clone();
                let stop = Arc::clone(&stop);
                let count = Arc::clone(&count);
                let prefix = format!("{prefix}-{w}-");
                tokio::spawn(async move {
                    let mut acked = Vec::new();
                    let mut target = clients.first();
                    let mut n = 0u64;
                    while !stop.load(Ordering::Relaxed) {
                        let key = format!("{prefix}{n:08}");
                        let req = PutRequest {
                            prev_kv: false,
                            header: Some(header()),
                            key: key.clone().into_bytes(),
                            value: key.clone().into_bytes(),
                            lease: 0,
                        };
                        let sent = Instant::now();
                        match clients.get(target).put(req).await {
                            Ok(_) => {
                                acked.push((key, sent, Instant::now()));
                                count.fetch_add(1, Ordering::Relaxed);
                                n += 1;
                            }
                            Err(e) => {
                                // Unknown outcome or not the leader: move on to a fresh key either way,
                                // so only acknowledged keys are asserted on.
                                n += 1;
                                target = leader_hint(&e)
                                    .filter(|l| clients.nodes.contains_key(l))
                                    .unwrap_or_else(|| clients.next(target));
                                tokio::time::sleep(Duration::from_millis(10)).await;
                            }
                        }
                    }
                    acked
                })
            })
            .collect();
        Load { stop, count, tasks }
    }

    /// An admin client for one node.
    pub fn admin(&self, id: u64) -> NodeAdminClient<Channel> {
        NodeAdminClient::new(self.channel(id))
    }

    fn channel(&self, id: u64) -> Channel {
        Channel::from_shared(format!("http://{}", self.addr(id)))
            .expect("uri")
            .connect_timeout(Duration::from_secs(1))
            .timeout(Duration::from_secs(10))
            .connect_lazy()
    }

    /// One node's status, or the error it answered with.
    pub async fn status(&self, id: u64) -> Result<StatusResponse, Status> {
        self.admin(id)
            .status(StatusRequest {})
            .await
            .map(tonic::Response::into_inner)
    }

    /// Waits until a running node is leader and a majority of the running nodes agree; returns its id.
    ///
    /// # Panics
    /// After [`DEADLINE`].
    pub async fn wait_leader(&self) -> u64 {
        let deadline = Instant::now() + DEADLINE;
        loop {
            if let Some(id) = self.current_leader().await {
                return id;
            }
            assert!(Instant::now() < deadline, "no leader within {DEADLINE:?}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The leader a majority of all members currently report, if any.
    pub async fn current_leader(&self) -> Option<u64> {
        let mut votes: BTreeMap<u64, usize> = BTreeMap::new();
        let mut leaders = Vec::new();
        for id in self.running() {
            if let Ok(s) = self.status(id).await {
                if s.leader_id != 0 {
                    *votes.entry(s.leader_id).or_default() += 1;
                }
                if s.role == RaftRole::Leader as i32 {
                    leaders.push(id);
                }
            }
        }
        let majority = self.nodes.len() / 2 + 1;
        leaders
            .into_iter()
            .find(|l| votes.get(l).copied().unwrap_or(0) >= majority)
    }

    /// Puts through whichever node leads, following redirects and retrying retryable errors until
    /// [`DEADLINE`]. Returns the log index the write was applied at.
    ///
    /// # Panics
    /// If the write fails for good or the deadline passes.
    pub async fn must_put(&self, key: &[u8], value: &[u8]) -> u64 {
        let deadline = Instant::now() + DEADLINE;
        let mut target = self.current_leader().await.unwrap_or(1);
        loop {
            let req = PutRequest {
                prev_kv: false,
                header: Some(header()),
                key: key.to_vec(),
                value: value.to_vec(),
                lease: 0,
            };
            match self.kv(target).put(req).await {
                Ok(r) => return r.into_inner().header.map_or(0, |h| h.applied_index),
                Err(e) => {
                    assert!(
                        is_retryable(&e),
                        "put {:?} on node {target} failed: {e}",
                        String::from_utf8_lossy(key)
                    );
                    assert!(
                        Instant::now() < deadline,
                        "put not acknowledged within {DEADLINE:?}: {e}"
                    );
                    target = leader_hint(&e)
                        .filter(|l| self.nodes.contains_key(l))
                        .unwrap_or_else(|| next_node(&self.running(), target));
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
        }
    }

    /// Reads a key from one node's local state (serializable), waiting until that node has applied at
    /// least `min_applied` first.
    pub async fn must_get_local(&self, id: u64, key: &[u8], min_applied: u64) -> Option<Vec<u8>> {
        self.wait_applied(id, min_applied).await;
        let r = self
            .kv(id)
            .get(GetRequest {
                revision: 0,
                header: Some(header()),
                key: key.to_vec(),
                consistency: Consistency::Serializable as i32,
            })
            .await
            .unwrap_or_else(|e| panic!("serializable get on node {id} failed: {e}"))
            .into_inner();
        r.found.then_some(r.value)
    }

    /// Every pair in node `id`'s local state (serializable scans, page by page), once it has applied
    /// `min_applied`.
    pub async fn local_data(&self, id: u64, min_applied: u64) -> BTreeMap<Vec<u8>, Vec<u8>> {
        self.wait_applied(id, min_applied).await;
        let mut out = BTreeMap::new();
        let mut start = Vec::new();
        loop {
            let r = self
                .kv(id)
                .scan(ScanRequest {
                    header: Some(header()),
                    start_key: start.clone(),
                    end_key: Vec::new(),
                    limit: 10_000,
                    consistency: Consistency::Serializable as i32,
                    ..ScanRequest::default()
                })
                .await
                .unwrap_or_else(|e| panic!("scan on node {id} failed: {e}"))
                .into_inner();
            if let Some(last) = r.kvs.last() {
                start = last.key.clone();
                start.push(0);
            }
            out.extend(r.kvs.into_iter().map(|kv| (kv.key, kv.value)));
            if !r.more {
                return out;
            }
        }
    }

    /// Waits until node `id` has applied `index`.
    ///
    /// # Panics
    /// After [`DEADLINE`].
    pub async fn wait_applied(&self, id: u64, index: u64) {
        let deadline = Instant::now() + DEADLINE;
        loop {
            match self.status(id).await {
                Ok(s) if s.applied_index >= index => return,
                Ok(s) => assert!(
                    Instant::now() < deadline,
                    "node {id} applied {} < {index} after {DEADLINE:?}",
                    s.applied_index
                ),
                Err(e) => assert!(Instant::now() < deadline, "node {id} status failed: {e}"),
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The tail of a node's log, for failure messages.
    pub fn log_tail(&self, id: u64, lines: usize) -> String {
        let path = self.nodes[&id].dir.join(format!("node-{id}.log"));
        let text = std::fs::read_to_string(path).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }
}

/// Clients for every node of a cluster.
#[derive(Clone)]
pub struct Clients {
    nodes: BTreeMap<u64, KvServiceClient<Channel>>,
}

impl Clients {
    /// The client for node `id`.
    pub fn get(&self, id: u64) -> KvServiceClient<Channel> {
        self.nodes[&id].clone()
    }

    fn first(&self) -> u64 {
        self.nodes.keys().next().copied().unwrap_or(1)
    }

    fn next(&self, current: u64) -> u64 {
        let ids: Vec<u64> = self.nodes.keys().copied().collect();
        next_node(&ids, current)
    }
}

/// A running write load (see [`Cluster::start_load`]).
pub struct Load {
    stop: Arc<AtomicBool>,
    count: Arc<AtomicU64>,
    tasks: Vec<tokio::task::JoinHandle<Vec<(String, Instant, Instant)>>>,
}

impl Load {
    /// Puts acknowledged so far.
    pub fn acked(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }

    /// Waits until `n` more puts than now are acknowledged.
    ///
    /// # Panics
    /// After [`DEADLINE`].
    pub async fn wait_more(&self, n: u64) {
        let target = self.acked() + n;
        let deadline = Instant::now() + DEADLINE;
        while self.acked() < target {
            assert!(
                Instant::now() < deadline,
                "only {} of {target} puts acknowledged within {DEADLINE:?}",
                self.acked()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Stops the writers and returns every acknowledged key with the time its (successful) attempt was sent
    /// and the time it was acknowledged.
    pub async fn finish(self) -> Vec<(String, Instant, Instant)> {
        self.stop.store(true, Ordering::Relaxed);
        let mut all = Vec::new();
        for t in self.tasks {
            all.extend(t.await.expect("load task"));
        }
        all
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let ids = self.ids();
        for id in &ids {
            self.kill(*id);
        }
        if std::thread::panicking() {
            for id in ids {
                eprintln!(
                    "----- node {id} log (tail) -----\n{}",
                    self.log_tail(id, 60)
                );
            }
        }
    }
}

/// A request header with a short deadline.
pub fn header() -> RequestHeader {
    RequestHeader {
        timeout: Some(prost_types::Duration {
            seconds: 5,
            nanos: 0,
        }),
        ..RequestHeader::default()
    }
}

/// Whether a failed call may be retried (possibly on another node).
pub fn is_retryable(e: &Status) -> bool {
    matches!(
        e.code(),
        Code::Unavailable
            | Code::FailedPrecondition
            | Code::DeadlineExceeded
            | Code::ResourceExhausted
            | Code::Unknown
    )
}

/// The leader id a "not leader" status names.
pub fn leader_hint(e: &Status) -> Option<u64> {
    e.metadata()
        .get("kiwi-leader-id")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
        .filter(|id| *id != 0)
}

/// The running node after `current`, wrapping around.
pub fn next_node(running: &[u64], current: u64) -> u64 {
    running
        .iter()
        .copied()
        .find(|id| *id > current)
        .or_else(|| running.first().copied())
        .unwrap_or(current)
}

/// A TLS channel to `addr` trusting `ca` (PEM), presenting `identity` (certificate and key, PEM) if given.
///
/// The connection and every call have a 10 s deadline: a handshake the node refuses after the client took
/// it as done (TLS 1.3 checks the client's certificate last) once left a call waiting on a closed
/// connection until CI's timeout; past the deadline it ends as Cancelled.
///
/// # Errors
/// The connection's.
pub async fn tls_channel(
    addr: impl std::fmt::Display,
    ca: &str,
    identity: Option<&(String, String)>,
) -> Result<tonic::transport::Channel, tonic::transport::Error> {
    let mut tls = tonic::transport::ClientTlsConfig::new()
        .ca_certificate(tonic::transport::Certificate::from_pem(ca));
    if let Some((cert, key)) = identity {
        tls = tls.identity(tonic::transport::Identity::from_pem(cert, key));
    }
    tonic::transport::Channel::from_shared(format!("https://{addr}"))
        .expect("an address makes a URI")
        .tls_config(tls)?
        .connect_timeout(Duration::from_secs(10))
        .timeout(Duration::from_secs(10))
        .connect()
        .await
}
