//! `kiwi-node`: parses flags, loads and validates the config, and runs the node until SIGINT or SIGTERM.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::Parser;
use kiwi_node::config::{LogFormat, NodeConfig, PeerConfig};
use kiwi_storage::BackendKind;

/// mimalloc instead of the C library's allocator: requests and answers are many small allocations
/// made on one thread and freed on another, where glibc's malloc spent ~9 % of the Raft thread and ~5 %
/// of the network threads (make bench-ab in the README's issue-28 section).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

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

    /// Restore a backup (`kiwi snapshot save`) into this node's empty data directory, as a member of a
    /// new cluster of the members `raft.peers` lists, then exit; start the node as usual afterwards.
    /// Restore every member from the same file with the same `raft.peers`. The file is checked whole
    /// first: a damaged or truncated one is refused and nothing is written.
    #[arg(long, value_name = "BACKUP")]
    restore: Option<PathBuf>,

    /// Overrides `data_dir`.
    #[arg(long, value_name = "DIR")]
    data_dir: Option<PathBuf>,

    /// Overrides `listen_addr` (gRPC), e.g. 127.0.0.1:7380.
    #[arg(long, value_name = "ADDR")]
    listen_addr: Option<SocketAddr>,

    /// Overrides `raft.node_id`.
    #[arg(long, value_name = "ID")]
    node_id: Option<u64>,

    /// Overrides `raft.peers`: every member as ID=ADDR[@RAFT_ADDR], separated by commas, e.g.
    /// 1=10.0.0.1:7380,2=10.0.0.2:7380,3=10.0.0.3:7380 (ADDR is the member's gRPC address, RAFT_ADDR
    /// its raft_listen_addr when it has one).
    #[arg(long, value_name = "MEMBERS")]
    peers: Option<String>,

    /// Overrides `storage.backend`: rocksdb, leveldb or memory.
    #[arg(long, value_name = "BACKEND")]
    backend: Option<BackendKind>,

    /// Overrides `log.format`: text (one readable line per event) or json (one JSON object per line,
    /// with the request's span fields such as request_id).
    #[arg(long, value_name = "FORMAT", value_parser = parse_log_format)]
    log_format: Option<LogFormat>,

    /// Overrides `telemetry.otlp_endpoint`: export traces to this OTLP/gRPC collector, e.g.
    /// http://127.0.0.1:4317.
    #[arg(long, value_name = "URL")]
    otlp_endpoint: Option<String>,
}

fn parse_log_format(s: &str) -> Result<LogFormat, String> {
    match s {
        "text" => Ok(LogFormat::Text),
        "json" => Ok(LogFormat::Json),
        _ => Err(format!("{s:?} is not a log format: use text or json")),
    }
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
        if let Some(p) = &self.peers {
            config.raft.peers =
                PeerConfig::parse_list(p).map_err(|e| anyhow::anyhow!("--peers: {e}"))?;
        }
        if let Some(b) = self.backend {
            config.storage.backend = b;
        }
        if let Some(f) = self.log_format {
            config.log.format = f;
        }
        if let Some(e) = &self.otlp_endpoint {
            config.telemetry.otlp_endpoint = Some(e.clone());
        }
        config.validate()?;
        Ok(config)
    }
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
        kiwi_node::check_environment(&config)?;
        match &cli.config {
            Some(path) => println!("{}: configuration is valid", path.display()),
            None => println!("default configuration is valid"),
        }
        return Ok(());
    }
    if let Some(file) = &cli.restore {
        return restore(&config, file);
    }
    if cli.print_config {
        print!(
            "{}",
            toml::to_string(&config).context("cannot render the configuration")?
        );
        return Ok(());
    }
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    if config.runtime.network_threads > 0 {
        builder.worker_threads(config.runtime.network_threads);
    }
    let runtime = builder
        .thread_name("kiwi-network")
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    // Inside the runtime: the OTLP exporter's channel lives there.
    let tracing = {
        let _entered = runtime.enter();
        kiwi_node::telemetry::tracing::init(&config.log, &config.telemetry)?
    };
    let result = runtime.block_on(kiwi_node::run(config, shutdown_signal()));
    // Flush the last spans while the runtime still drives the exporter's connection.
    runtime.block_on(async {
        let _ = tokio::task::spawn_blocking(move || tracing.shutdown()).await;
    });
    result?;
    Ok(())
}

fn restore(config: &NodeConfig, file: &std::path::Path) -> anyhow::Result<()> {
    let mut last = std::time::Instant::now();
    let restored = kiwi_node::raft::backup::restore(config, file, |step, keys| {
        if last.elapsed() >= std::time::Duration::from_secs(1) {
            eprintln!("{step} {keys} keys ...");
            last = std::time::Instant::now();
        }
    })
    .map_err(|e| anyhow::anyhow!("{e}"))?;
    let s = &restored.summary;
    println!(
        "restored {} keys ({} bytes of keys and values) at revision {} into {} as node {} of a new \
         cluster {:016x} (members: {}); backup sha256 {}",
        s.keys,
        s.bytes,
        s.header.index,
        config.data_dir.display(),
        config.raft.node_id,
        restored.cluster_id,
        kiwi_node::configured_members(config)
            .iter()
            .map(|(id, addr)| format!("{id}={addr}"))
            .collect::<Vec<_>>()
            .join(", "),
        s.sha256
    );
    Ok(())
}
