//! `kiwi-node`, Kiwi's data node, as a library: the binary in `main.rs` only parses flags, loads the
//! config and calls [`run`]; tests start nodes through [`Node::start`].
//!
//! Modules, and who may depend on whom:
//! - [`config`]: the typed TOML configuration and its validation. Depends on nothing else here.
//! - [`identity`]: the node id stored in the data directory. Depends on `kiwi-storage`.
//! - this file: opens storage, checks identity, serves gRPC (health and reflection so far; the KV API and
//!   Raft transport arrive with the replication work).
//!
//! Storage is reached only through `kiwi_storage::StorageBackend`; no module names an engine.

pub mod config;
pub mod identity;

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use kiwi_storage::{OpenOptions, StorageBackend};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tonic::transport::Server;
use tonic::transport::server::TcpIncoming;
use tonic_health::ServingStatus;

pub use config::NodeConfig;

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
    /// A background task panicked.
    #[error("internal task failed: {0}")]
    Task(#[from] tokio::task::JoinError),
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
}

impl Node {
    /// Validates `config`, opens storage, checks the data directory's node id and starts serving gRPC.
    /// Returns once the port is bound.
    ///
    /// # Errors
    /// Invalid config, storage errors, [`Error::NodeIdMismatch`], [`Error::Bind`].
    pub async fn start(config: NodeConfig) -> Result<Node> {
        config.validate()?;
        let storage = {
            let config = config.clone();
            tokio::task::spawn_blocking(move || open_storage(&config)).await??
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

        let (health, health_service) = tonic_health::server::health_reporter();
        health.set_service_status("", ServingStatus::Serving).await;
        let reflection = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(kiwi_proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .build_v1()?;

        let shutdown = CancellationToken::new();
        let server = Server::builder()
            .add_service(health_service)
            .add_service(reflection)
            .serve_with_incoming_shutdown(
                TcpIncoming::from(listener),
                shutdown.clone().cancelled_owned(),
            );
        let server = tokio::spawn(server);
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
        })
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
        tracing::info!(addr = %self.addr, "kiwi-node stopped");
        Ok(())
    }
}

/// Opens the configured backend in `<data_dir>/storage` and checks the node id recorded there.
///
/// # Errors
/// Storage errors and [`Error::NodeIdMismatch`].
pub fn open_storage(config: &NodeConfig) -> Result<Arc<dyn StorageBackend>> {
    let storage = kiwi_storage::open(&OpenOptions {
        kind: config.storage.backend,
        path: config.storage_dir(),
        limits: config.storage.limits(),
        create_if_missing: true,
    })?;
    identity::check_node_id(storage.as_ref(), config.raft.node_id, &config.data_dir)?;
    Ok(storage)
}

/// Runs a node until `shutdown` resolves, then stops it gracefully.
///
/// # Errors
/// Anything [`Node::start`] or [`Node::shutdown`] returns.
pub async fn run(config: NodeConfig, shutdown: impl Future<Output = ()>) -> Result<()> {
    let node = Node::start(config).await?;
    shutdown.await;
    node.shutdown().await
}
