//! `kiwi-control`, Kiwi's control plane, as a library: the binary in `main.rs` only parses flags, loads
//! the config and calls [`run`]; tests start it through [`ControlPlane::start`].
//!
//! Every node opens one long-lived stream to it (`NodeLink.Link`): a registration, then a heartbeat
//! with a metrics snapshot every interval. The control plane never dials a node; nodes serve clients the
//! same whether it is up or not.
//!
//! Modules (arrows point down):
//!
//! ```text
//! lib.rs (wiring, gRPC server, the sweeper that marks silent nodes down, the /metrics listener)
//!   ├─ metrics   /metrics: every node's figures with a `node` label (kiwi_proto::http serves it)
//!   ├─ console   /ui beside /metrics: the web console (its page and JSON on ControlService's calls)
//!   └─ service   NodeLink and ControlService
//!        ├─ state    the live cluster view and each node's history (pure bookkeeping, injected clock)
//!        ├─ faults   fault schedules and each node's state of them (pure bookkeeping)
//!        └─ events   the persisted event log (kiwi-storage, RocksDB)
//! config: read by main and lib
//! ```

pub mod config;
pub mod console;
pub mod events;
pub mod faults;
pub mod metrics;
pub mod service;
pub mod state;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use kiwi_proto::v1::control_service_server::ControlServiceServer;
use kiwi_proto::v1::node_link_server::NodeLinkServer;
use kiwi_storage::{BackendKind, OpenOptions};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tonic::transport::server::TcpIncoming;

pub use config::ControlConfig;

use crate::events::EventLog;
use crate::service::{Control, ControlApi, NodeLinkApi};
use crate::state::ClusterView;

/// The role each gRPC method needs when authentication is on: `admin` for the operator's and the
/// nodes' services (both change what every node runs); health and reflection are open.
pub fn method_role(path: &str) -> Option<kiwi_proto::auth::Role> {
    let service = path.trim_start_matches('/').split('/').next()?;
    matches!(service, "kiwi.v1.ControlService" | "kiwi.v1.NodeLink")
        .then_some(kiwi_proto::auth::Role::Admin)
}

/// How often silent nodes are looked for.
pub const SWEEP_INTERVAL: Duration = Duration::from_millis(50);

/// What can stop the control plane.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Config(#[from] config::ConfigError),
    #[error("the control plane's store in {path}: {source}")]
    Storage {
        path: std::path::PathBuf,
        #[source]
        source: kiwi_storage::Error,
    },
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("gRPC server failed: {0}")]
    Serve(#[from] tonic::transport::Error),
    #[error("cannot build gRPC reflection: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
    #[error("internal task failed: {0}")]
    Task(#[from] tokio::task::JoinError),
    #[error(transparent)]
    MetricsHttp(#[from] kiwi_proto::http::HttpError),
    #[error(transparent)]
    Tokens(#[from] kiwi_proto::auth::TokensError),
    #[error(transparent)]
    Tls(#[from] kiwi_proto::tls::TlsError),
}

/// A running control plane.
pub struct ControlPlane {
    addr: SocketAddr,
    metrics_addr: Option<SocketAddr>,
    shutdown: CancellationToken,
    server: JoinHandle<Result<(), tonic::transport::Error>>,
}

impl ControlPlane {
    /// Opens the store, binds the port and starts serving.
    ///
    /// # Errors
    /// [`Error`].
    pub async fn start(config: ControlConfig) -> Result<ControlPlane, Error> {
        config.validate()?;
        let auth = config.security.authenticator()?;
        let server_tls = config.security.server_tls()?;
        // The metrics listener first: a bad token file or a taken port is refused before anything opens.
        let metrics_http = match config.metrics.addr {
            Some(addr) => {
                let token = match &config.metrics.token_file {
                    Some(path) => Some(kiwi_proto::http::read_token(path, "metrics.token_file")?),
                    None => None,
                };
                Some((kiwi_proto::http::bind(addr, "metrics.addr").await?, token))
            }
            None => None,
        };
        let path = config.data_dir.clone();
        let keep_events = config.retention.events;
        let events = tokio::task::spawn_blocking(move || {
            let storage = kiwi_storage::open(&OpenOptions {
                kind: BackendKind::RocksDb,
                path: path.clone(),
                limits: kiwi_storage::Limits::default(),
                create_if_missing: true,
            })
            .map_err(|source| Error::Storage {
                path: path.clone(),
                source,
            })?;
            EventLog::open(storage, keep_events).map_err(|source| Error::Storage { path, source })
        })
        .await??;
        let stored = |source| Error::Storage {
            path: config.data_dir.clone(),
            source,
        };
        let cluster_id = events.cluster_id().map_err(stored)?;
        let mut policy = events.policy().map_err(stored)?;
        if policy.epoch == 0 {
            // A new store (or one from before epochs): versions start a new epoch, so that nodes holding
            // versions of a lost store do not take these for old ones.
            policy.epoch = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(1, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
                .max(1);
            events.set_policy(&policy).map_err(stored)?;
        }
        let faults = faults::FaultTable::load(
            events.faults().map_err(stored)?,
            config.retention.finished_faults,
        );
        let control = Control::new(
            ClusterView::new(cluster_id, config.metrics.retention())
                .forgetting_after(config.retention.departed_node()),
            events,
            policy,
            faults,
        );

        let listener = tokio::net::TcpListener::bind(config.listen_addr)
            .await
            .map_err(|source| Error::Bind {
                addr: config.listen_addr,
                source,
            })?;
        let addr = listener.local_addr().map_err(|source| Error::Bind {
            addr: config.listen_addr,
            source,
        })?;
        let shutdown = CancellationToken::new();
        {
            let control = Arc::clone(&control);
            let shutdown = shutdown.clone();
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(SWEEP_INTERVAL);
                loop {
                    tokio::select! {
                        _ = tick.tick() => control.sweep().await,
                        () = shutdown.cancelled() => return,
                    }
                }
            });
        }
        let metrics_addr = match metrics_http {
            Some((listener, token)) => {
                let bound =
                    listener
                        .local_addr()
                        .map_err(|source| kiwi_proto::http::HttpError::Bind {
                            key: "metrics.addr",
                            addr: config.metrics.addr.unwrap_or(addr),
                            source,
                        })?;
                kiwi_proto::http::spawn(
                    listener,
                    Arc::new(metrics::ControlMetrics(Arc::clone(&control))),
                    kiwi_proto::http::Guard {
                        token,
                        principals: auth.clone(),
                        rate_limit_per_sec: config.metrics.rate_limit_per_sec,
                        rate_limit_key: "metrics.rate_limit_per_sec",
                    },
                    Some(console::router(
                        service::ControlApi(Arc::clone(&control)),
                        auth.clone(),
                    )),
                    shutdown.clone(),
                );
                tracing::info!(metrics_addr = %bound, "cluster metrics served on /metrics, the console on /ui");
                Some(bound)
            }
            None => None,
        };
        let (health, health_service) = tonic_health::server::health_reporter();
        health
            .set_service_status("", tonic_health::ServingStatus::Serving)
            .await;
        let reflection = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(kiwi_proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .build_v1()?;
        kiwi_proto::security::reload_on_sighup(
            kiwi_proto::security::Reloadable {
                servers: server_tls.iter().cloned().collect(),
                peers: None,
                tokens: auth.clone(),
            },
            shutdown.clone().cancelled_owned(),
        );
        let conns =
            kiwi_proto::connections::Connections::new(kiwi_proto::connections::ConnectionLimits {
                idle: config.connections.idle(),
                ..Default::default()
            });
        let router = kiwi_proto::limits::server()
            .layer(conns.layer())
            .layer(tower::util::option_layer(
                auth.map(|a| kiwi_proto::auth::AuthLayer::new(a, method_role)),
            ))
            .add_service(health_service)
            .add_service(reflection)
            .add_service(NodeLinkServer::new(NodeLinkApi(Arc::clone(&control))))
            .add_service(ControlServiceServer::new(ControlApi(control)));
        let incoming = TcpIncoming::from(listener)
            .with_nodelay(Some(true))
            .with_keepalive(Some(kiwi_proto::limits::TCP_KEEPALIVE));
        let done = shutdown.clone().cancelled_owned();
        let server = match &server_tls {
            Some(tls) => tokio::spawn(
                router.serve_with_incoming_shutdown(tls.accept(&conns, incoming), done),
            ),
            None => tokio::spawn(
                router.serve_with_incoming_shutdown(conns.accept_plain(incoming), done),
            ),
        };
        tracing::info!(%addr, data_dir = %config.data_dir.display(), "kiwi-control serving");
        Ok(ControlPlane {
            addr,
            metrics_addr,
            shutdown,
            server,
        })
    }

    /// The bound gRPC address.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// The bound `/metrics` address, when `[metrics] addr` is set.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics_addr
    }

    /// Stops serving (node links are closed; nodes reconnect to the next control plane by themselves).
    ///
    /// # Errors
    /// The server's own error.
    pub async fn shutdown(self) -> Result<(), Error> {
        self.shutdown.cancel();
        match tokio::time::timeout(Duration::from_secs(5), self.server).await {
            Ok(r) => r??,
            Err(_) => tracing::warn!("node links still open after 5 s; closing them"),
        }
        Ok(())
    }
}

/// Runs the control plane until `shutdown` resolves.
///
/// # Errors
/// [`Error`].
pub async fn run(config: ControlConfig, shutdown: impl Future<Output = ()>) -> Result<(), Error> {
    let cp = ControlPlane::start(config).await?;
    shutdown.await;
    cp.shutdown().await
}
