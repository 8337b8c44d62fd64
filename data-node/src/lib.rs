//! `kiwi-node`, Kiwi's data node, as a library: the binary in `main.rs` only parses flags, loads the
//! config and calls [`run`]; tests start nodes through [`Node::start`].
//!
//! Modules, one folder per layer; arrows point down (a module uses only those below it, never the other
//! way round):
//!
//! ```text
//! lib.rs (wiring, gRPC server)
//!   ├─ control/   the link to kiwi-control (uses service's metrics snapshot, hands fault commands to fault/)
//!   └─ service/   KvService and NodeAdmin handlers
//!        ├─ lease/    the leader's lease deadlines (pure clock logic)
//!        ├─ runtime/  priority channel → storage worker pool + ThreadPoolScaler
//!        └─ raft/     transport → driver → log_store, state_machine, snapshot
//!              └─ kiwi-storage (StorageBackend)
//! config, identity: read by all; telemetry: recorded into by raft/ and fault/; fault/: consulted by
//! raft/'s transport and wrapped around the storage engine; these depend on nothing here
//! ```
//!
//! - [`config`]: the typed TOML configuration and its validation.
//! - [`identity`]: the node and cluster ids stored in the data directory.
//! - [`raft`]: the replicated core: the Raft driver (sole owner of `RawNode`), the Raft log in the
//!   backend, the state machine, snapshots, and the `RaftTransport` between nodes. The transport uses the
//!   driver's handle and the types it owns (`MessageSink`, `PeerEvent`); the driver knows no transport.
//! - [`lease`]: the leader's clock for clients' leases (deadlines, the TTL floor); expiry is a proposal
//!   the service layer makes.
//! - [`runtime`]: the priority channel between the gRPC handlers and the storage stage, and the storage
//!   worker pool with its `ThreadPoolScaler`.
//! - [`service`]: the `KvService` and `NodeAdmin` gRPC services; storage work goes through the priority
//!   channel to the worker pool, Raft work through the driver's handle.
//! - [`telemetry`]: the `RaftMetricsCollector` the driver records into, the Prometheus exporters and
//!   their HTTP listener, storage metrics, logs and traces; depends on no layer here.
//! - [`fault`]: the `FaultInjector` (network delay, partition, message loss, crash, disk stall) for test
//!   clusters (`[raft.fault_injection]`), driven by the control plane.
//! - [`control`]: the link to the control plane (`[control] addr`): registration and heartbeats carrying
//!   the metrics snapshot the service layer builds.
//! - this file: wires them together and serves gRPC (plus health and reflection).
//!
//! Storage is reached only through `kiwi_storage::StorageBackend`; no module names an engine.

pub mod config;
pub mod control;
pub mod fault;
pub mod identity;
pub mod lease;
pub mod raft;
pub mod runtime;
pub mod service;
pub mod telemetry;

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use kiwi_proto::v1::kv_service_server::KvServiceServer;
use kiwi_proto::v1::node_admin_server::NodeAdminServer;
use kiwi_proto::v1::raft_transport_server::RaftTransportServer;
use kiwi_storage::{OpenOptions, StorageBackend};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tonic::transport::server::TcpIncoming;
use tonic_health::ServingStatus;

pub use config::NodeConfig;

use crate::raft::driver::DriverConfig;
use crate::raft::log_store::{LogStore, SnapshotRegistry};
use crate::raft::{driver, log_store, snapshot, state_machine, transport};
use crate::runtime::priority_channel::{ChannelPolicy, PriorityMessageChannel, SystemClock};
use crate::runtime::worker_pool::WorkerPool;
use crate::service::{AdminApi, KvApi, KvServer, KvServerParts};
use crate::telemetry::metrics::{Meters, MetricsRegistry};
use crate::telemetry::storage_metrics::{InstrumentedBackend, register_engine_gauges};

/// Requests queued per priority class before the class is refused.
pub const QUEUE_CAPACITY: usize = 4096;
use crate::raft::transport::{Members, Peers, RaftService};

/// What can stop a node from starting or running.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The configuration is invalid.
    #[error(transparent)]
    Config(#[from] config::ConfigError),
    /// The storage backend failed to open or to answer.
    #[error(transparent)]
    Storage(#[from] kiwi_storage::Error),
    /// The data directory belongs to another node.
    #[error(
        "data directory {data_dir} belongs to node {stored}, but raft.node_id is {configured}: start it with \
         raft.node_id = {stored}, or give node {configured} its own data directory"
    )]
    NodeIdMismatch {
        data_dir: PathBuf,
        stored: u64,
        configured: u64,
    },
    /// The data directory belongs to another cluster than the configured one.
    #[error(
        "data directory {data_dir} belongs to cluster {stored:016x}, but raft.peers describe cluster \
         {configured:016x} ({members}): this directory was created by another cluster (or with other \
         raft.peers); give this node an empty data directory and add it with AddNode and raft.join = true, \
         or start it with the raft.peers its cluster was founded with"
    )]
    ClusterMismatch {
        data_dir: PathBuf,
        stored: u64,
        configured: u64,
        members: String,
    },
    /// The data directory is empty but the cluster has already replicated to this node: its data was lost.
    #[error(
        "data directory {data_dir} is empty, but node {leader} leads this node's cluster and has already \
         replicated up to index {match_index} to node {node_id}: this node's data was lost, and founding \
         the cluster again would vote again in terms it already voted in. Remove node {node_id} \
         (NodeAdmin.RemoveNode on the leader), then start it on an empty data directory with \
         raft.join = true and add it back with AddNode"
    )]
    AlreadyBootstrapped {
        data_dir: PathBuf,
        node_id: u64,
        leader: u64,
        match_index: u64,
    },
    /// The data directory's identity record is unreadable.
    #[error("data directory {data_dir} has a damaged node id record ({len} bytes, expected 8)")]
    IdentityCorrupt { data_dir: PathBuf, len: usize },
    /// The gRPC port could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    /// The gRPC server failed.
    #[error("gRPC server failed: {0}")]
    Serve(#[from] tonic::transport::Error),
    /// Building server reflection failed.
    #[error("cannot build gRPC reflection: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
    /// raft-rs refused the configuration or the stored Raft state.
    #[error("Raft: {0}")]
    Raft(#[from] ::raft::Error),
    /// The Raft driver stopped on a storage error.
    #[error(
        "the Raft driver stopped after a storage error (see the log); the node stopped to protect its data"
    )]
    Fatal,
    /// A background task panicked.
    #[error("internal task failed: {0}")]
    Task(#[from] tokio::task::JoinError),
    /// The metrics endpoint could not start.
    #[error(transparent)]
    MetricsHttp(#[from] telemetry::http::HttpError),
    /// The tokens file (`security.tokens_file`) is unusable.
    #[error(transparent)]
    Tokens(#[from] kiwi_proto::auth::TokensError),
    /// A TLS file (`security.cert_file`, `key_file`, `ca_file`) is unusable.
    #[error(transparent)]
    Tls(#[from] kiwi_proto::tls::TlsError),
    /// The policy the control plane pushed earlier, persisted in the data directory, is unusable.
    #[error(
        "the control plane's policy persisted in the data directory cannot be applied: {0} (remove the \
         file to start with the config file's policy)"
    )]
    PersistedPolicy(String),
    /// The metrics exporter could not be built.
    #[error(transparent)]
    Metrics(#[from] telemetry::metrics::ExporterError),
}

/// The node crate's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// How long a graceful shutdown waits for in-flight calls and open connections.
pub const SHUTDOWN_GRACE: std::time::Duration = std::time::Duration::from_secs(5);

/// A running node. Dropping it does not stop it: call [`Node::shutdown`].
pub struct Node {
    addr: SocketAddr,
    storage: Arc<dyn StorageBackend>,
    shutdown: CancellationToken,
    server: JoinHandle<Result<(), tonic::transport::Error>>,
    /// Stops the peer senders and the driver, after the server.
    stop: CancellationToken,
    fatal: CancellationToken,
    driver: Option<std::thread::JoinHandle<()>>,
    pool: Arc<WorkerPool>,
    /// The metrics endpoint's address and task, when `telemetry.metrics_addr` is set.
    metrics: Option<(SocketAddr, JoinHandle<std::io::Result<()>>)>,
}

impl Node {
    /// Validates `config`, opens storage, checks the data directory's node id and starts serving gRPC.
    /// Returns once the port is bound.
    ///
    /// # Errors
    /// Invalid config, storage errors, [`Error::NodeIdMismatch`], [`Error::Bind`].
    pub async fn start(config: NodeConfig) -> Result<Node> {
        config.validate()?;
        config.check_data_dir()?;
        // Security files first, like the metrics below: a bad one is refused before anything is opened.
        let Security {
            auth,
            server_tls,
            raft_tls,
            peer_tls,
        } = Security::load(&config)?;
        let tls = server_tls.is_some();
        tracing::info!(
            tokens = auth.is_some(),
            tls,
            mtls = peer_tls.is_some(),
            "security: bearer tokens {}, TLS {}, mutual TLS between members {}",
            if auth.is_some() { "on" } else { "off" },
            if tls { "on" } else { "off" },
            if peer_tls.is_some() { "on" } else { "off" }
        );
        // Metrics first: a bad token file or a taken port is refused before anything is opened.
        let metrics_http = match config.telemetry.metrics_addr {
            Some(addr) => {
                let token = match &config.telemetry.metrics_token_file {
                    Some(path) => Some(telemetry::http::read_token(
                        path,
                        telemetry::http::TOKEN_KEY,
                    )?),
                    None => None,
                };
                let listener = telemetry::http::bind(addr, telemetry::http::ADDR_KEY).await?;
                Some((listener, token, Arc::new(MetricsRegistry::new()?)))
            }
            None => None,
        };
        let meters = metrics_http
            .as_ref()
            .map_or_else(Meters::noop, |(_, _, registry)| registry.meters());
        let snapshots = Arc::new(SnapshotRegistry::default());
        let configured = configured_members(&config);
        let (faults, fault_events) = fault::FaultInjector::new(
            config.raft.node_id,
            config.raft.fault_injection.enabled,
            std::time::Duration::from_secs(config.raft.fault_injection.max_duration_sec),
            &meters.raft,
        );
        let (storage, mut log_store, recorded, stored_cluster_id) = {
            let config = config.clone();
            let snapshots = Arc::clone(&snapshots);
            let configured = configured.clone();
            let meter = meters.storage.clone();
            let faults = Arc::clone(&faults);
            tokio::task::spawn_blocking(move || -> Result<_> {
                let mut storage = open_storage(&config)?;
                if faults.enabled() {
                    // Inside the metrics, so an injected disk stall shows in the fsync times.
                    storage = fault::StallingBackend::wrap(storage, Arc::clone(&faults));
                }
                let storage = InstrumentedBackend::wrap(storage, &meter);
                let log_dir = (config.storage.backend != kiwi_storage::BackendKind::Memory)
                    .then(|| log_store::engine_log::dir(&config.data_dir));
                register_engine_gauges(&meter, Arc::clone(&storage), config.storage_dir(), log_dir);
                let cluster_id = identity::cluster_id(&*storage)?;
                let stall = faults.enabled().then(|| Arc::clone(&faults));
                let mut log_store = open_log_store(&config, &storage, stall, snapshots)?;
                check_cluster_id(&config, &configured, cluster_id, log_store.conf_state())?;
                snapshot::resume_install(&*storage, &mut log_store).map_err(|e| {
                    Error::Raft(::raft::Error::Store(::raft::StorageError::Other(e)))
                })?;
                let recorded = state_machine::recorded_members(&*storage)?;
                Ok((storage, log_store, recorded, cluster_id))
            })
            .await??
        };

        let listener = TcpListener::bind(config.listen_addr)
            .await
            .map_err(|source| Error::Bind {
                addr: config.listen_addr,
                source,
            })?;
        let addr = listener.local_addr().map_err(|source| Error::Bind {
            addr: config.listen_addr,
            source,
        })?;

        // etcd's v3 API, when configured.
        let etcd_listener = match config.etcd.listen_addr {
            Some(etcd_addr) => {
                let listener =
                    TcpListener::bind(etcd_addr)
                        .await
                        .map_err(|source| Error::Bind {
                            addr: etcd_addr,
                            source,
                        })?;
                let bound = listener.local_addr().map_err(|source| Error::Bind {
                    addr: etcd_addr,
                    source,
                })?;
                Some((listener, bound))
            }
            None => None,
        };
        // Raft's own port, when configured: members only (see `serve_members_tls`).
        let raft_listener = match config.raft_listen_addr {
            Some(raft_addr) => {
                let listener =
                    TcpListener::bind(raft_addr)
                        .await
                        .map_err(|source| Error::Bind {
                            addr: raft_addr,
                            source,
                        })?;
                let bound = listener.local_addr().map_err(|source| Error::Bind {
                    addr: raft_addr,
                    source,
                })?;
                Some((listener, bound))
            }
            None => None,
        };

        let node_id = config.raft.node_id;
        // A single node without peers is reached at the address it bound (the configured port may be 0).
        let members: Vec<(u64, String)> = if config.raft.peers.is_empty() {
            let raft = raft_listener.as_ref().map(|(_, a)| a.to_string());
            vec![(
                node_id,
                config::member_record(&addr.to_string(), raft.as_deref()),
            )]
        } else {
            configured.clone()
        };
        let mut cluster_id = stored_cluster_id;
        if !log_store.is_initialized() && !config.raft.join {
            let voters = members.iter().map(|(id, _)| *id).collect();
            cluster_id = identity::derive_cluster_id(&configured);
            check_not_founded_before(&config, cluster_id).await?;
            let storage = Arc::clone(&storage);
            log_store = tokio::task::spawn_blocking(move || -> Result<_> {
                identity::record_cluster_id(&*storage, cluster_id)?;
                log_store.bootstrap(voters)?;
                Ok(log_store)
            })
            .await??;
        }
        if log_store.is_initialized() && !config.raft.peers.is_empty() {
            // Founding members' addresses are recorded like added ones, so that snapshots carry them.
            let storage = Arc::clone(&storage);
            let founders = configured.clone();
            tokio::task::spawn_blocking(move || {
                state_machine::record_missing_members(&*storage, &founders)
            })
            .await??;
        }
        let cluster = Arc::new(std::sync::atomic::AtomicU64::new(cluster_id));

        let stop = CancellationToken::new();
        let fatal = CancellationToken::new();
        // Members added at runtime (recorded when their change was applied) join the configured ones.
        // A recorded founder keeps its record unless the configuration gives the same client address
        // with a Raft port added (or changed): that is how a running cluster moves to Raft ports.
        let recorded: Vec<(u64, String)> = recorded
            .into_iter()
            .map(
                |(id, record)| match members.iter().find(|(m, _)| *m == id) {
                    Some((_, conf))
                        if config::record_client_addr(conf)
                            == config::record_client_addr(&record) =>
                    {
                        (id, conf.clone())
                    }
                    _ => (id, record),
                },
            )
            .collect();
        let members = Arc::new(Members::new(members.into_iter().chain(recorded)));
        let driver_config = DriverConfig {
            node_id,
            tick_interval: config.raft.tick_interval,
            election_ticks: config.raft.election_ticks,
            heartbeat_ticks: config.raft.heartbeat_ticks,
            compaction_threshold: config.raft.log_compaction_threshold,
            compaction_slack: config.raft.log_compaction_slack,
            lease_reads: config.raft.lease_reads,
            metrics: telemetry::raft_metrics::MetricsSettings {
                enabled: config.raft.metrics.enabled,
                collection_interval: config.raft.metrics.collection_interval,
                retention_period: config.raft.metrics.retention_period,
            },
            metrics_export: telemetry::raft_metrics::RaftExport::new(&meters.raft),
        };
        let (events_tx, mut events_rx) = tokio::sync::mpsc::unbounded_channel();
        let peers = Arc::new(Peers::start(
            node_id,
            Arc::clone(&cluster),
            Arc::clone(&members),
            Arc::clone(&snapshots),
            &stop,
            events_tx,
            transport::PeerLink {
                faults: Arc::clone(&faults),
                tls: peer_tls.clone(),
                lease: driver_config.lease_settings(),
            },
        ));
        faults.spawn_expiry(stop.clone());
        let gate = Arc::new(snapshot::InstallGate::default());
        let (driver, driver_thread) = driver::spawn(
            &driver_config,
            log_store,
            Arc::clone(&storage),
            peers,
            Arc::clone(&gate),
            stop.clone(),
            fatal.clone(),
        )?;
        {
            let driver = driver.clone();
            tokio::spawn(async move {
                while let Some(event) = events_rx.recv().await {
                    driver.peer_event(event);
                }
            });
        }
        let channel = Arc::new(PriorityMessageChannel::new(
            ChannelPolicy::from_config(&config.runtime.priority, QUEUE_CAPACITY),
            config.runtime.scaling.min_storage_threads,
            Box::new(SystemClock),
        ));
        let pool = WorkerPool::start(
            Arc::clone(&channel),
            (&config.runtime.scaling).into(),
            &meters.runtime,
        );
        let network_threads = match config.runtime.network_threads {
            0 => std::thread::available_parallelism().map_or(1, usize::from),
            n => n,
        } as u64;
        meters
            .runtime
            .u64_observable_gauge("kiwi_runtime_network_threads")
            .with_description("Threads of the network stage (gRPC I/O), fixed at start")
            .with_callback(move |o| o.observe(network_threads, &[]))
            .build();
        let disk = service::disk::DiskGuard::new(
            config.storage_dir(),
            config.storage.min_free_bytes.as_u64(),
        );
        disk.spawn(stop.clone());
        let kv = KvServer::new(KvServerParts {
            node_id,
            driver: driver.clone(),
            storage: Arc::clone(&storage),
            gate,
            addrs: members,
            cluster: Arc::clone(&cluster),
            channel,
            pool: Arc::clone(&pool),
            config: config.clone(),
            meter: meters.runtime.clone(),
            disk: Arc::clone(&disk),
        });
        service::spawn_lease_upkeep(&kv);
        service::spawn_history_upkeep(
            &kv,
            service::Retention {
                revisions: config.watch.history_retention_revisions,
                time: (config.watch.history_retention_sec > 0)
                    .then(|| std::time::Duration::from_secs(config.watch.history_retention_sec)),
            },
        );
        // The control plane's last policy, persisted by this node, before anything is served.
        let policy = {
            let kv = Arc::clone(&kv);
            let data_dir = config.data_dir.clone();
            tokio::task::spawn_blocking(move || control::restore_policy(&kv, &data_dir))
                .await?
                .map_err(Error::PersistedPolicy)?
        };
        let max_message = service::max_request_bytes(config.storage.limits());

        let (health, health_service) = tonic_health::server::health_reporter();
        health.set_service_status("", ServingStatus::Serving).await;
        {
            // Out of health at once when the node fails (storage error or a panic in the driver) or is
            // removed from the cluster: load balancers and clients stop sending to it.
            let fatal = fatal.clone();
            let mut status = driver.watch();
            let stop = stop.clone();
            tokio::spawn(async move {
                let mut removed = false;
                loop {
                    tokio::select! {
                        () = fatal.cancelled() => {
                            tracing::warn!("node failed: health set to NOT_SERVING");
                            health.set_service_status("", ServingStatus::NotServing).await;
                            return;
                        }
                        r = status.changed() => if r.is_err() { return },
                        () = stop.cancelled() => return,
                    }
                    let now = status.borrow_and_update().removed;
                    if now != removed {
                        removed = now;
                        let serving = if removed {
                            tracing::warn!("removed from the cluster: health set to NOT_SERVING");
                            ServingStatus::NotServing
                        } else {
                            ServingStatus::Serving
                        };
                        health.set_service_status("", serving).await;
                    }
                }
            });
        }
        let reflection = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(kiwi_proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .build_v1()?;

        let shutdown = CancellationToken::new();
        let limits = kiwi_proto::connections::ConnectionLimits {
            idle: config.connections.idle(),
            ..Default::default()
        };
        let client_conns = kiwi_proto::connections::Connections::new(limits);
        let server = kiwi_proto::limits::server()
            .layer(client_conns.layer())
            .layer(tower::util::option_layer(auth.clone().map(|a| {
                kiwi_proto::auth::AuthLayer::new(a, service::method_role)
            })))
            .add_service(health_service)
            .add_service(reflection)
            .add_service(
                KvServiceServer::new(KvApi(Arc::clone(&kv)))
                    .max_decoding_message_size(max_message)
                    .max_encoding_message_size(max_message),
            )
            .add_service(NodeAdminServer::new(AdminApi(Arc::clone(&kv))));
        let raft_service = RaftTransportServer::new(RaftService::new(
            node_id,
            Arc::clone(&cluster),
            driver,
            Arc::clone(&storage),
            shutdown.clone(),
            Arc::clone(&faults),
            peer_tls.is_some(),
        ))
        .max_decoding_message_size(transport::MAX_RAFT_MESSAGE_BYTES);
        let incoming = |listener| {
            TcpIncoming::from(listener)
                .with_nodelay(Some(true))
                .with_keepalive(Some(kiwi_proto::limits::TCP_KEEPALIVE))
        };
        // Raft on its own port when one is configured, else next to the client services.
        let (server, raft_server) = match raft_listener {
            Some((raft_listener, _)) => {
                let raft_conns = kiwi_proto::connections::Connections::new(limits);
                let router = kiwi_proto::limits::server()
                    .layer(raft_conns.layer())
                    .add_service(raft_service);
                let done = shutdown.clone().cancelled_owned();
                let raft_server: ServeFuture = match &raft_tls {
                    Some(t) => Box::pin(router.serve_with_incoming_shutdown(
                        t.accept(&raft_conns, incoming(raft_listener)),
                        done,
                    )),
                    None => Box::pin(router.serve_with_incoming_shutdown(
                        raft_conns.accept_plain(incoming(raft_listener)),
                        done,
                    )),
                };
                (server, Some(raft_server))
            }
            None => (server.add_service(raft_service), None),
        };
        let done = shutdown.clone().cancelled_owned();
        let server: ServeFuture =
            match &server_tls {
                Some(t) => Box::pin(server.serve_with_incoming_shutdown(
                    t.accept(&client_conns, incoming(listener)),
                    done,
                )),
                None => Box::pin(server.serve_with_incoming_shutdown(
                    client_conns.accept_plain(incoming(listener)),
                    done,
                )),
            };
        let etcd_server: Option<ServeFuture> = etcd_listener.map(|(listener, bound)| {
            let scheme = if server_tls.is_some() {
                "https"
            } else {
                "http"
            };
            let etcd = service::etcd::Etcd::new(
                &kv,
                format!("{scheme}://{bound}"),
                server_tls
                    .is_some()
                    .then(|| peer_tls.as_ref().map(|t| t.get()))
                    .flatten(),
                auth.clone(),
            );
            let conns = kiwi_proto::connections::Connections::new(limits);
            use kiwi_proto::etcd::etcdserverpb::{
                auth_server::AuthServer, cluster_server::ClusterServer,
                kv_server::KvServer as EtcdKvServer, lease_server::LeaseServer,
                maintenance_server::MaintenanceServer, watch_server::WatchServer,
            };
            let router = kiwi_proto::limits::server()
                .layer(conns.layer())
                .layer(tower::util::option_layer(auth.clone().map(|a| {
                    kiwi_proto::auth::AuthLayer::new(a, service::etcd::method_role)
                        .accepting_token_header()
                })))
                .layer(service::etcd::CallerTokenLayer)
                .add_service(AuthServer::new(service::etcd::EtcdAuth(etcd.clone())))
                .add_service(
                    EtcdKvServer::new(service::etcd::EtcdKv(etcd.clone()))
                        .max_decoding_message_size(max_message)
                        .max_encoding_message_size(max_message),
                )
                .add_service(WatchServer::new(service::etcd::EtcdWatch(etcd.clone())))
                .add_service(LeaseServer::new(service::etcd::EtcdLease(etcd.clone())))
                .add_service(ClusterServer::new(service::etcd::EtcdCluster(etcd.clone())))
                .add_service(MaintenanceServer::new(service::etcd::EtcdMaintenance(etcd)));
            tracing::info!(etcd_addr = %bound, "etcd v3 API served");
            let done = shutdown.clone().cancelled_owned();
            let serve: ServeFuture = match &server_tls {
                Some(t) => Box::pin(
                    router.serve_with_incoming_shutdown(t.accept(&conns, incoming(listener)), done),
                ),
                None => Box::pin(
                    router
                        .serve_with_incoming_shutdown(conns.accept_plain(incoming(listener)), done),
                ),
            };
            serve
        });
        let server = tokio::spawn(async move {
            let etcd = async move {
                match etcd_server {
                    Some(s) => s.await,
                    None => Ok(()),
                }
            };
            match raft_server {
                Some(raft_server) => tokio::try_join!(server, raft_server, etcd).map(|_| ()),
                None => tokio::try_join!(server, etcd).map(|_| ()),
            }
        });
        kiwi_proto::security::reload_on_sighup(
            kiwi_proto::security::Reloadable {
                servers: [server_tls, raft_tls].into_iter().flatten().collect(),
                peers: peer_tls.clone(),
                tokens: auth.clone(),
            },
            stop.clone().cancelled_owned(),
        );
        if let Some(control_addr) = &config.control.addr {
            let token = match &config.control.token_file {
                Some(path) => Some(telemetry::http::read_token(path, "control.token_file")?),
                None => None,
            };
            control::spawn(
                kv,
                policy,
                control::Faults {
                    injector: Arc::clone(&faults),
                    events: fault_events,
                },
                control::Target {
                    addr: control_addr.clone(),
                    token,
                    tls: control_addr
                        .starts_with("https://")
                        .then(|| peer_tls.as_ref().map(|t| t.get()))
                        .flatten(),
                },
                config.control.heartbeat_interval,
                stop.clone(),
            );
        }
        let metrics = match metrics_http {
            Some((listener, token, registry)) => {
                let metrics_addr =
                    listener
                        .local_addr()
                        .map_err(|source| telemetry::http::HttpError::Bind {
                            key: telemetry::http::ADDR_KEY,
                            addr: config.telemetry.metrics_addr.unwrap_or(addr),
                            source,
                        })?;
                let task = telemetry::http::spawn(
                    listener,
                    registry,
                    token,
                    auth.clone(),
                    config.telemetry.metrics_rate_limit_per_sec,
                    stop.clone(),
                );
                tracing::info!(%metrics_addr, "metrics served on /metrics");
                Some((metrics_addr, task))
            }
            None => None,
        };
        tracing::info!(
            node_id = config.raft.node_id,
            %addr,
            backend = %config.storage.backend,
            data_dir = %config.data_dir.display(),
            "kiwi-node serving"
        );
        Ok(Node {
            addr,
            storage,
            shutdown,
            server,
            stop,
            fatal,
            driver: Some(driver_thread),
            pool,
            metrics,
        })
    }

    /// The address of the metrics endpoint, when `telemetry.metrics_addr` is set.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics.as_ref().map(|(a, _)| *a)
    }

    /// The address the gRPC server is bound to (useful with port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// The node's storage backend.
    pub fn storage(&self) -> &Arc<dyn StorageBackend> {
        &self.storage
    }

    /// Stops accepting connections, lets in-flight calls finish (for at most [`SHUTDOWN_GRACE`]: a client
    /// that never closes its connection must not hold the node up), and waits for the server to stop.
    ///
    /// # Errors
    /// The server's own error, if it failed before the shutdown.
    pub async fn shutdown(mut self) -> Result<()> {
        self.shutdown.cancel();
        match tokio::time::timeout(SHUTDOWN_GRACE, &mut self.server).await {
            Ok(res) => res??,
            Err(_) => {
                tracing::warn!(grace = ?SHUTDOWN_GRACE, "connections still open after the grace period; closing them");
                self.server.abort();
            }
        }
        self.pool.stop();
        self.stop.cancel();
        if let Some((_, task)) = self.metrics.take()
            && tokio::time::timeout(SHUTDOWN_GRACE, task).await.is_err()
        {
            tracing::warn!("the metrics endpoint did not stop within the grace period");
        }
        if let Some(driver) = self.driver.take() {
            tokio::task::spawn_blocking(move || driver.join())
                .await?
                .ok();
        }
        tracing::info!(addr = %self.addr, "kiwi-node stopped");
        if self.fatal.is_cancelled() {
            return Err(Error::Fatal);
        }
        Ok(())
    }

    /// Resolves if the node stops by itself (fail-stop after a storage error).
    pub fn failed(&self) -> tokio_util::sync::WaitForCancellationFutureOwned {
        self.fatal.clone().cancelled_owned()
    }
}

/// What `[security]` builds, read and checked from its files.
struct Security {
    auth: Option<Arc<kiwi_proto::auth::Authenticator>>,
    server_tls: Option<Arc<kiwi_proto::security::ServerTls>>,
    raft_tls: Option<Arc<kiwi_proto::security::ServerTls>>,
    peer_tls: Option<Arc<kiwi_proto::security::PeerTls>>,
}

impl Security {
    fn load(config: &NodeConfig) -> Result<Security> {
        let auth = config.security.authenticator()?;
        let server_tls = config.security.server_tls()?;
        let raft_tls = match config.raft_listen_addr {
            Some(_) => config.security.members_tls()?,
            None => None,
        };
        let peer_tls = config.security.peer_tls()?;
        if let (Some(_), Some(cert)) = (&peer_tls, &config.security.cert_file) {
            // Peers believe this node's messages only when its certificate names it.
            kiwi_proto::tls::check_member_certificate(
                cert,
                "security.cert_file",
                config.raft.node_id,
            )?;
        }
        Ok(Security {
            auth,
            server_tls,
            raft_tls,
            peer_tls,
        })
    }
}

/// What `--config-check` checks beyond [`NodeConfig::validate`], as the start does before it opens
/// anything: the data directory can be created and written, and the security files (tokens,
/// certificates, keys, CA, this member's certificate) are usable. Creates nothing.
///
/// # Errors
/// The first problem, naming the key.
pub fn check_environment(config: &NodeConfig) -> Result<()> {
    config.check_data_dir()?;
    Security::load(config).map(|_| ())
}

/// Opens the configured backend in `<data_dir>/storage` and checks the node id recorded there.
///
/// # Errors
/// Storage errors and [`Error::NodeIdMismatch`].
///
/// The backend enforces only the ceilings every node shares ([`raft::mvcc::STORED_CEILING`]: the values'
/// header included): the configured `storage.max_*_size` limits are admission rules, checked when a request is accepted, so that
/// a node with lower limits (during a rolling config change) still applies every committed entry.
pub fn open_storage(config: &NodeConfig) -> Result<Arc<dyn StorageBackend>> {
    let storage = kiwi_storage::open(&OpenOptions {
        kind: config.storage.backend,
        path: config.storage_dir(),
        limits: raft::mvcc::STORED_CEILING,
        create_if_missing: true,
    })?;
    identity::check_node_id(storage.as_ref(), config.raft.node_id, &config.data_dir)?;
    Ok(storage)
}

/// Opens the node's Raft log: in `<data_dir>/raft-log/` (see [`log_store::engine_log`]), moving there a
/// log an earlier version kept in the data backend; in the backend itself for the in-memory backend.
/// With `stall`, the log's writes wait out injected disk stalls as the backend's do.
///
/// # Errors
/// Storage errors and a damaged log.
pub fn open_log_store(
    config: &NodeConfig,
    storage: &Arc<dyn StorageBackend>,
    stall: Option<Arc<fault::FaultInjector>>,
    snapshots: Arc<SnapshotRegistry>,
) -> Result<LogStore> {
    use crate::raft::log_store::{backend_log::BackendLog, engine_log};
    if config.storage.backend == kiwi_storage::BackendKind::Memory {
        return Ok(LogStore::in_backend(Arc::clone(storage), snapshots)?);
    }
    let dir = engine_log::dir(&config.data_dir);
    let mut log = engine_log::EngineLog::open(&dir, stall)?;
    if LogStore::earlier_layout(&**storage)? {
        let moved = engine_log::upgrade(&BackendLog::new(Arc::clone(storage)), &mut log)?;
        tracing::info!(
            entries = moved,
            dir = %dir.display(),
            "moved the Raft log out of the data engine into files of its own"
        );
    }
    Ok(LogStore::open(
        Arc::clone(storage),
        Box::new(log),
        snapshots,
    )?)
}

/// A gRPC server's future, boxed: plain or TLS connections give different types.
type ServeFuture = std::pin::Pin<
    Box<dyn Future<Output = std::result::Result<(), tonic::transport::Error>> + Send>,
>;

/// The initial membership the configuration describes: `raft.peers`, or this node alone at
/// `listen_addr`. The cluster id of a founded cluster is derived from it.
pub fn configured_members(config: &NodeConfig) -> Vec<(u64, String)> {
    if config.raft.peers.is_empty() {
        let raft = config.raft_listen_addr.map(|a| a.to_string());
        vec![(
            config.raft.node_id,
            config::member_record(&config.listen_addr.to_string(), raft.as_deref()),
        )]
    } else {
        config
            .raft
            .peers
            .iter()
            .map(|p| (p.id, config::member_record(&p.addr, p.raft_addr.as_deref())))
            .collect()
    }
}

/// Refuses a data directory that belongs to another cluster than the one the configuration founds (a
/// silent split brain otherwise: the node would lead its own group at a member's address). A joining node
/// (`raft.join`) adopts its cluster's id from its first snapshot, so only founding members are checked.
///
/// The directory is refused when its cluster id is not the one `raft.peers` derive **and** its membership
/// (voters and learners) is not the set of ids `raft.peers` lists: so `raft.peers` may be updated to the
/// current membership after membership changes, or a member's address respelled, without refusing the
/// restart; a directory whose group has other members is always refused.
///
/// # Errors
/// [`Error::ClusterMismatch`].
pub fn check_cluster_id(
    config: &NodeConfig,
    configured: &[(u64, String)],
    stored: u64,
    membership: &::raft::eraftpb::ConfState,
) -> Result<()> {
    if stored == 0 || config.raft.join {
        return Ok(());
    }
    let expected = identity::derive_cluster_id(configured);
    let mut members: Vec<u64> = membership
        .voters
        .iter()
        .chain(&membership.learners)
        .copied()
        .collect();
    members.sort_unstable();
    members.dedup();
    let mut listed: Vec<u64> = configured.iter().map(|(id, _)| *id).collect();
    listed.sort_unstable();
    if stored != expected && members != listed {
        return Err(Error::ClusterMismatch {
            data_dir: config.data_dir.clone(),
            stored,
            configured: expected,
            members: configured
                .iter()
                .map(|(id, addr)| format!("{id}={addr}"))
                .collect::<Vec<_>>()
                .join(", "),
        });
    }
    Ok(())
}

/// Before founding a cluster on an empty data directory, asks the other configured members whether their
/// leader has already replicated to this node (the etcd "member already bootstrapped" check): if so this
/// node's data directory was wiped, and founding again would lose its vote. Members that do not answer
/// within a second are skipped (a new cluster's members start in any order).
///
/// # Errors
/// [`Error::AlreadyBootstrapped`].
async fn check_not_founded_before(config: &NodeConfig, cluster_id: u64) -> Result<()> {
    use kiwi_proto::v1::node_admin_client::NodeAdminClient;
    use kiwi_proto::v1::{RaftRole, StatusRequest};
    let node_id = config.raft.node_id;
    for peer in config.raft.peers.iter().filter(|p| p.id != node_id) {
        let Ok(endpoint) = tonic::transport::Endpoint::from_shared(format!("http://{}", peer.addr))
        else {
            continue;
        };
        let probe = async {
            let channel = endpoint
                .connect_timeout(std::time::Duration::from_secs(1))
                .connect()
                .await
                .ok()?;
            NodeAdminClient::new(channel)
                .status(StatusRequest {})
                .await
                .ok()
                .map(tonic::Response::into_inner)
        };
        let Ok(Some(status)) = tokio::time::timeout(std::time::Duration::from_secs(2), probe).await
        else {
            continue;
        };
        if status.cluster_id != cluster_id || status.role != RaftRole::Leader as i32 {
            continue;
        }
        if let Some(p) = status
            .peers
            .iter()
            .find(|p| p.node_id == node_id && p.match_index > log_store::BOOTSTRAP_INDEX)
        {
            return Err(Error::AlreadyBootstrapped {
                data_dir: config.data_dir.clone(),
                node_id,
                leader: peer.id,
                match_index: p.match_index,
            });
        }
    }
    Ok(())
}

/// Runs a node until `shutdown` resolves, then stops it gracefully.
///
/// # Errors
/// Anything [`Node::start`] or [`Node::shutdown`] returns.
pub async fn run(config: NodeConfig, shutdown: impl Future<Output = ()>) -> Result<()> {
    let node = Node::start(config).await?;
    tokio::select! {
        () = shutdown => {}
        () = node.failed() => {}
    }
    node.shutdown().await
}

#[cfg(test)]
mod tests {
    use ::raft::Storage as _;
    use ::raft::eraftpb::{Entry, HardState};
    use kiwi_storage::{BackendKind, KeySpace, WriteBatch, WriteOptions};

    use super::*;
    use crate::raft::log_store::backend_log::BackendLog;

    #[test]
    fn a_data_dir_with_the_log_in_the_data_engine_is_moved_to_raft_log() {
        for backend in [BackendKind::RocksDb, BackendKind::LevelDb] {
            let dir = tempfile::tempdir().unwrap();
            let mut config = NodeConfig {
                data_dir: dir.path().to_path_buf(),
                ..NodeConfig::default()
            };
            config.storage.backend = backend;
            config.raft.node_id = 1;
            let entries: Vec<Entry> = (2..=300)
                .map(|i| Entry {
                    index: i,
                    term: 2,
                    data: vec![i as u8; 100].into(),
                    ..Entry::default()
                })
                .collect();
            let hs = HardState {
                term: 2,
                vote: 1,
                commit: 250,
                ..HardState::default()
            };
            {
                // The layout an earlier version wrote: the log in the data engine, a 16-byte truncation
                // record.
                let storage = open_storage(&config).unwrap();
                let mut store = LogStore::in_backend(Arc::clone(&storage), Arc::default()).unwrap();
                store.bootstrap(vec![1]).unwrap();
                store.persist(&entries, Some(&hs)).unwrap();
                let mut old = WriteBatch::new();
                let mut record = 1u64.to_be_bytes().to_vec();
                record.extend_from_slice(&1u64.to_be_bytes());
                old.put(KeySpace::Raft, b"state/truncated".to_vec(), record);
                storage.batch_write(old, WriteOptions::SYNC).unwrap();
            }
            for _start in 0..2 {
                let storage = open_storage(&config).unwrap();
                let store = open_log_store(&config, &storage, None, Arc::default()).unwrap();
                assert_eq!(store.first_index().unwrap(), 2, "{backend:?}");
                assert_eq!(store.last_index().unwrap(), 300);
                assert_eq!(store.initial_state().unwrap().hard_state, hs);
                assert_eq!(
                    store
                        .entries(2, 301, None, ::raft::GetEntriesContext::empty(false))
                        .unwrap(),
                    entries
                );
                assert_eq!(store.conf_state().voters, vec![1]);
                assert!(!BackendLog::holds_any(&*storage).unwrap());
                assert!(!LogStore::earlier_layout(&*storage).unwrap());
                assert!(log_store::engine_log::dir(dir.path()).is_dir());
            }
        }
    }
}
