//! `kiwi-node`: parses flags, loads and validates the config, and runs the node until SIGINT or SIGTERM.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::Parser;
use kiwi_node::config::{LogFormat, NodeConfig};
use kiwi_storage::BackendKind;
use tracing_subscriber::EnvFilter;

/// Kiwi data node: one replica of a Kiwi cluster, serving the KV API over gRPC.
///
/// Settings come from built-in defaults, then the config file (--config), then the flags below.
/// Exit status: 0 on a clean shutdown or a valid --config-check, 1 on any error.
#[derive(Debug, Parser)]
#[command(name = "kiwi-node", version)]
struct Cli {
    /// TOML config file; see data-node/config/kiwi-node.example.toml for every key and its default.
    #[arg(long, short, env = "KIWI_NODE_CONFIG", value_name = "FILE")]
    config: Option<PathBuf>,

    /// Validate the configuration (file plus flags), print the result and exit.
    #[arg(long)]
    config_check: bool,

    /// Print the effective configuration as TOML and exit.
    #[arg(long)]
    print_config: bool,

    /// Overrides `data_dir`.
    #[arg(long, value_name = "DIR")]
    data_dir: Option<PathBuf>,

    /// Overrides `listen_addr` (gRPC), e.g. 127.0.0.1:7380.
    #[arg(long, value_name = "ADDR")]
    listen_addr: Option<SocketAddr>,

    /// Overrides `raft.node_id`.
    #[arg(long, value_name = "ID")]
    node_id: Option<u64>,

    /// Overrides `storage.backend`: rocksdb, leveldb or memory.
    #[arg(long, value_name = "BACKEND")]
    backend: Option<BackendKind>,
}

impl Cli {
    fn load_config(&self) -> anyhow::Result<NodeConfig> {
        let mut config = match &self.config {
            Some(path) => NodeConfig::from_file(path)?,
            None => NodeConfig::default(),
        };
        if let Some(d) = &self.data_dir {
            config.data_dir = d.clone();
        }
        if let Some(a) = self.listen_addr {
            config.listen_addr = a;
        }
        if let Some(id) = self.node_id {
            config.raft.node_id = id;
        }
        if let Some(b) = self.backend {
            config.storage.backend = b;
        }
        config.validate()?;
        Ok(config)
    }
}

fn init_logging(config: &NodeConfig) -> anyhow::Result<()> {
    let filter = match std::env::var("RUST_LOG") {
        Ok(f) if !f.is_empty() => EnvFilter::try_new(&f).context("invalid RUST_LOG")?,
        _ => EnvFilter::try_new(&config.log.level).context("invalid log.level")?,
    };
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        // Colours only on a terminal: logs redirected to a file (the playground, the test harness) stay
        // plain text.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    match config.log.format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
    Ok(())
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("install SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT received, shutting down"),
        _ = term.recv() => tracing::info!("SIGTERM received, shutting down"),
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match real_main(&cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("kiwi-node: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn real_main(cli: &Cli) -> anyhow::Result<()> {
    let config = cli.load_config()?;
    if cli.config_check {
        match &cli.config {
            Some(path) => println!("{}: configuration is valid", path.display()),
            None => println!("default configuration is valid"),
        }
        return Ok(());
    }
    if cli.print_config {
        print!(
            "{}",
            toml::to_string(&config).context("cannot render the configuration")?
        );
        return Ok(());
    }
    init_logging(&config)?;
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    if config.runtime.network_threads > 0 {
        builder.worker_threads(config.runtime.network_threads);
    }
    let runtime = builder
        .thread_name("kiwi-network")
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(kiwi_node::run(config, shutdown_signal()))?;
    Ok(())
}
