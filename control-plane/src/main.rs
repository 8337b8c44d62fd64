//! `kiwi-control`: parses flags, loads and validates the config, and runs the control plane until SIGINT
//! or SIGTERM.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;
use clap::Parser;
use kiwi_control::ControlConfig;

/// Kiwi control plane: every node of a cluster streams its registration and metrics here; operators read
/// the live cluster view and the event log (`kiwi control status|events`).
///
/// Settings come from built-in defaults, then the config file (--config), then the flags below.
/// Exit status: 0 on a clean shutdown or a valid --config-check, 1 on any error.
#[derive(Debug, Parser)]
#[command(name = "kiwi-control", version)]
struct Cli {
    /// TOML config file; see control-plane/config/kiwi-control.example.toml for every key.
    #[arg(long, short, env = "KIWI_CONTROL_CONFIG", value_name = "FILE")]
    config: Option<PathBuf>,
    /// Validate the configuration (file plus flags), print the result and exit.
    #[arg(long)]
    config_check: bool,
    /// Print the effective configuration as TOML and exit.
    #[arg(long)]
    print_config: bool,
    /// Overrides `listen_addr`, e.g. 127.0.0.1:7390.
    #[arg(long, value_name = "ADDR")]
    listen_addr: Option<SocketAddr>,
    /// Overrides `data_dir`.
    #[arg(long, value_name = "DIR")]
    data_dir: Option<PathBuf>,
    /// Overrides `metrics.addr`: serve /metrics (every node's figures, labelled by node) there.
    #[arg(long, value_name = "ADDR")]
    metrics_addr: Option<SocketAddr>,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match real_main(&cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("kiwi-control: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn real_main(cli: &Cli) -> anyhow::Result<()> {
    let mut config = match &cli.config {
        Some(p) => ControlConfig::from_file(p)?,
        None => ControlConfig::default(),
    };
    if let Some(a) = cli.listen_addr {
        config.listen_addr = a;
    }
    if let Some(d) = &cli.data_dir {
        config.data_dir = d.clone();
    }
    if let Some(a) = cli.metrics_addr {
        config.metrics.addr = Some(a);
    }
    config.validate()?;
    if cli.config_check {
        println!("configuration is valid");
        return Ok(());
    }
    if cli.print_config {
        print!(
            "{}",
            toml::to_string(&config).context("cannot render the configuration")?
        );
        return Ok(());
    }
    let filter = match std::env::var("RUST_LOG") {
        Ok(f) if !f.is_empty() => f,
        _ => config.log.level.clone(),
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_new(&filter).context("invalid log filter")?,
        )
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr)
        .init();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .thread_name("kiwi-control")
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(kiwi_control::run(config, shutdown_signal()))?;
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
