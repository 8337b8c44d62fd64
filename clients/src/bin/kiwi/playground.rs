//! `kiwi playground`: a local cluster of real `kiwi-node` processes, like `tiup playground`.
//!
//! It picks free loopback ports (or `--base-port`), writes one config per node under the data directory,
//! starts the nodes with their logs in `<data-dir>/node-<id>/node.log`, waits until they elect a leader,
//! prints the endpoints and example commands, and stays in the foreground. It also starts a `kiwi-control`
//! and links every node to it (unless `--no-control`). SIGINT or SIGTERM stops every process with SIGTERM
//! (SIGKILL after 10 s), and the playground exits once all are gone. If a node dies on its own (try
//! SIGKILLing the leader to watch another take over), the playground says so with its log tail and keeps
//! the others running; `--restart-crashed` starts it again, and `kiwi playground restart N` (from another
//! terminal) restarts node N by hand, whether it died or still runs.
//!
//! `restart` talks to the running playground through its data directory: it drops a request file in
//! `<data-dir>/requests/`, the playground (which looks every half second) restarts the node and writes
//! the outcome next to it, and `restart` prints that outcome.
//!
//! The processes are run by [`kiwi_client::playground`]; this file parses the flags and prints.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Subcommand};
use kiwi_client::playground::{Playground, Spec, sibling_binary};
use tokio::signal::unix::{SignalKind, signal};

#[derive(Debug, Args)]
#[command(args_conflicts_with_subcommands = true)]
pub struct PlaygroundArgs {
    #[command(subcommand)]
    command: Option<PlaygroundCommand>,
    #[command(flatten)]
    start: StartArgs,
}

#[derive(Debug, Subcommand)]
enum PlaygroundCommand {
    /// Restart node N of a running playground (stopped with SIGTERM first if it runs), e.g. after
    /// SIGKILLing it to watch a failover. Run it from another terminal.
    Restart {
        /// The node id.
        node: u64,
        /// The running playground's data directory (it prints the export).
        #[arg(long, env = "KIWI_PLAYGROUND_DIR")]
        data_dir: PathBuf,
    },
}

#[derive(Debug, Args)]
struct StartArgs {
    /// Number of nodes.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u64).range(1..=9))]
    nodes: u64,
    /// Storage backend of every node.
    #[arg(long, default_value = "rocksdb", value_parser = ["rocksdb", "leveldb", "memory"])]
    backend: String,
    /// Where the nodes keep their data (default: a fresh directory under the system temp dir). An existing
    /// playground directory restarts that cluster with its data.
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// First port; node N listens on base-port + N - 1, and serves Prometheus metrics on
    /// base-port + 100 + N - 1; the control plane listens on base-port + 200 and serves the whole
    /// cluster's metrics on base-port + 201 (default: free ports chosen by the OS).
    #[arg(long)]
    base_port: Option<u16>,
    /// No metrics endpoints (telemetry.metrics_addr unset), e.g. to measure their cost.
    #[arg(long)]
    no_metrics: bool,
    /// Leader-lease reads (raft.lease_reads = true on every node): linearizable reads without a
    /// heartbeat round while the lease holds; see the README's "Lease reads" for the clock assumption.
    #[arg(long)]
    lease_reads: bool,
    /// Export every node's traces to this OTLP/gRPC collector (e.g. http://127.0.0.1:4317), sampling
    /// --trace-sample-ratio of requests (and every `kiwi --trace` command).
    #[arg(long, value_name = "URL")]
    otlp_endpoint: Option<String>,
    /// Share of requests traced when --otlp-endpoint is set (0.0 to 1.0).
    #[arg(long, default_value_t = 0.01)]
    trace_sample_ratio: f64,
    /// The kiwi-node binary (default: next to this kiwi binary, else on PATH).
    #[arg(long, env = "KIWI_NODE_BIN")]
    node_bin: Option<PathBuf>,
    /// The kiwi-control binary (default: next to this kiwi binary, else on PATH).
    #[arg(long, env = "KIWI_CONTROL_BIN")]
    control_bin: Option<PathBuf>,
    /// Do not start a control plane (kiwi-control listens on base-port + 200, or a free port).
    #[arg(long)]
    no_control: bool,
    /// Start a node again when it dies on its own (SIGKILL, crash), instead of only reporting it.
    #[arg(long)]
    restart_crashed: bool,
    /// Let the control plane inject faults into the nodes (`[raft.fault_injection] enabled = true`):
    /// `kiwi control fault ...`, `kiwi chaos`. Pair with --restart-crashed for crash faults.
    #[arg(long)]
    fault_injection: bool,
    /// Generate a CA, a certificate for each node (naming it: `kiwi://node/<id>`) and one for the control
    /// plane, and an admin token (under `<data-dir>/secrets/`), and start everything with TLS, mutual TLS between members and tokens;
    /// each node serves Raft on its own port (base-port + 300 + N - 1, or a free one), where the TLS
    /// handshake needs a member certificate. Prints the exports that the `kiwi` commands need.
    #[arg(long)]
    secure: bool,
}

pub async fn run(args: PlaygroundArgs) -> anyhow::Result<()> {
    match args.command {
        Some(PlaygroundCommand::Restart { node, data_dir }) => {
            println!(
                "{}",
                kiwi_client::playground::request_restart(node, &data_dir).await?
            );
            Ok(())
        }
        None => start(args.start).await,
    }
}

async fn start(args: StartArgs) -> anyhow::Result<()> {
    let restart_crashed = args.restart_crashed;
    let spec = Spec {
        nodes: args.nodes,
        backend: args.backend,
        data_dir: args.data_dir,
        base_port: args.base_port,
        metrics: !args.no_metrics,
        lease_reads: args.lease_reads,
        otlp_endpoint: args.otlp_endpoint,
        trace_sample_ratio: args.trace_sample_ratio,
        node_bin: sibling_binary(args.node_bin, "kiwi-node"),
        control_bin: (!args.no_control).then(|| sibling_binary(args.control_bin, "kiwi-control")),
        fault_injection: args.fault_injection,
        secure: args.secure,
    };
    let backend = spec.backend.clone();
    let mut pg = Playground::start(spec)?;
    eprintln!(
        "starting {} kiwi-node processes ({backend}) in {} ...",
        pg.nodes().len(),
        pg.data_dir().display()
    );
    let result = match pg.wait_leader(Duration::from_secs(60)).await {
        Ok(leader) => {
            print_banner(&pg, &backend, leader);
            serve(&mut pg, restart_crashed).await
        }
        Err(e) => Err(e),
    };
    eprintln!("stopping every node ...");
    for said in pg.stop().await {
        eprintln!("{said}");
    }
    eprintln!("all stopped");
    result
}

fn print_banner(pg: &Playground, backend: &str, leader: u64) {
    let list = pg
        .nodes()
        .iter()
        .map(|p| p.addr.as_str())
        .collect::<Vec<_>>()
        .join(",");
    println!(
        "Kiwi playground is up: {} nodes ({backend}), leader is node {leader}",
        pg.nodes().len()
    );
    for p in pg.nodes() {
        match &p.metrics_addr {
            Some(m) => println!(
                "  node {}  {}  metrics: http://{m}/metrics  log: {}",
                p.id,
                p.addr,
                p.log.display()
            ),
            None => println!("  node {}  {}  log: {}", p.id, p.addr, p.log.display()),
        }
    }
    if let Some(c) = pg.control() {
        match &c.metrics_addr {
            Some(m) => println!(
                "  control plane  {}  metrics (every node): http://{m}/metrics  log: {}",
                c.addr,
                c.log.display()
            ),
            None => println!("  control plane  {}  log: {}", c.addr, c.log.display()),
        }
    }
    println!("data dir: {}", pg.data_dir().display());
    println!();
    println!("Try, in another terminal:");
    println!("  export KIWI_ENDPOINTS={list}");
    if let Some(c) = pg.control() {
        println!("  export KIWI_CONTROL={}", c.addr);
    }
    println!("  export KIWI_PLAYGROUND_DIR={}", pg.data_dir().display());
    let etcd: Vec<&str> = pg.nodes().iter().map(|p| p.etcd_addr.as_str()).collect();
    println!(
        "  export ETCDCTL_API=3 ETCDCTL_ENDPOINTS={}",
        etcd.join(",")
    );
    if let Some(s) = pg.secrets() {
        println!("  export KIWI_CA_CERT={}", s.ca.display());
        println!("  export KIWI_TOKEN_FILE={}", s.token_file.display());
        println!("  export KIWI_CONTROL_TOKEN={}", s.token);
        println!(
            "  export ETCDCTL_CACERT={} ETCDCTL_USER=playground:{}",
            s.ca.display(),
            s.token
        );
    }
    println!("  kiwi put hello world");
    println!("  kiwi get hello");
    println!("  kiwi status");
    if pg.control().is_some() {
        println!("  kiwi control watch");
    }
    println!("  kiwi playground restart 1    # after killing node 1, or to bounce it");
    println!();
    println!("Ctrl-C stops every node.");
}

/// Until SIGINT or SIGTERM: reports (and with --restart-crashed restarts) nodes that die, and serves
/// `kiwi playground restart` requests, every half second.
async fn serve(pg: &mut Playground, restart_crashed: bool) -> anyhow::Result<()> {
    let mut sigint = signal(SignalKind::interrupt())?;
    let mut sigterm = signal(SignalKind::terminate())?;
    loop {
        tokio::select! {
            _ = sigint.recv() => return Ok(()),
            _ = sigterm.recv() => return Ok(()),
            () = tokio::time::sleep(Duration::from_millis(500)) => {
                for said in pg.reap(restart_crashed)? {
                    eprintln!("{said}");
                }
                for said in pg.serve_requests().await {
                    eprintln!("{said}");
                }
            }
        }
    }
}
