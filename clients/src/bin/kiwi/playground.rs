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

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::{Args, Subcommand};
use kiwi_client::{Client, ClientOptions};
use kiwi_proto::v1::RaftRole;
use tokio::process::{Child, Command};
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

/// `arg`, else the binary `name` next to this one, else `name` on PATH.
pub(crate) fn sibling_binary(arg: Option<PathBuf>, name: &str) -> PathBuf {
    if let Some(p) = arg {
        return p;
    }
    if let Ok(exe) = std::env::current_exe()
        && let Some(dir) = exe.parent()
    {
        let sibling = dir.join(name);
        if sibling.exists() {
            return sibling;
        }
    }
    PathBuf::from(name)
}

/// A free port outside the kernel's ephemeral range, so that a crashed node can restart on it (an outgoing
/// connection may take an ephemeral port as its source port while the node is down).
fn free_port() -> anyhow::Result<u16> {
    let addr = kiwi_proto::net::free_loopback_addr().context("cannot find a free port")?;
    Ok(addr.port())
}

struct Proc {
    id: u64,
    addr: String,
    /// Its Prometheus endpoint (`telemetry.metrics_addr`), unless `--no-metrics`.
    metrics_addr: Option<String>,
    /// Its etcd v3 API (`[etcd] listen_addr`).
    etcd_addr: Option<String>,
    log: PathBuf,
    config: PathBuf,
    /// `None` once it died (and was not restarted).
    child: Option<Child>,
}

struct ControlProc {
    addr: String,
    /// Its `/metrics` (every node's figures), unless `--no-metrics`.
    metrics_addr: Option<String>,
    log: PathBuf,
    child: Child,
}

/// What `--secure` generated.
struct Secrets {
    ca: PathBuf,
    /// The control plane's certificate and key (server and client use; names no member).
    cert: PathBuf,
    key: PathBuf,
    /// Member `id`'s certificate and key: `<dir>/node-<id>.crt`, `.key` (see [`Secrets::member`]).
    dir: PathBuf,
    tokens: PathBuf,
    token_file: PathBuf,
    token: String,
}

impl Secrets {
    /// Member `id`'s certificate and key, which name it (`kiwi://node/<id>`): peers believe its Raft
    /// messages only for that id.
    fn member(&self, id: u64) -> (PathBuf, PathBuf) {
        (
            self.dir.join(format!("node-{id}.crt")),
            self.dir.join(format!("node-{id}.key")),
        )
    }
}

fn write_private(path: &Path, text: &str) -> anyhow::Result<()> {
    use std::os::unix::fs::OpenOptionsExt as _;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("cannot write {}", path.display()))?;
    std::io::Write::write_all(&mut f, text.as_bytes())?;
    Ok(())
}

/// A CA, a certificate for the control plane, one for each of members `1..=nodes` (each naming its node
/// with the URI `kiwi://node/<id>`; localhost, 127.0.0.1; server and client use), all signed by the CA,
/// and an admin token, in `<data_dir>/secrets/`. Kept across runs of the same directory; a member
/// certificate missing (more nodes than last time) is issued by the kept CA.
fn secrets(data_dir: &Path, nodes: u64) -> anyhow::Result<Secrets> {
    use rcgen::{
        BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
        KeyUsagePurpose, SanType,
    };
    let dir = data_dir.join("secrets");
    let mut s = Secrets {
        ca: dir.join("ca.crt"),
        cert: dir.join("control.crt"),
        key: dir.join("control.key"),
        dir: dir.clone(),
        tokens: dir.join("tokens.toml"),
        token_file: dir.join("admin.token"),
        token: String::new(),
    };
    let ca_key_file = dir.join("ca.key");
    let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "kiwi playground CA");
    ca_params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let kept = match (
        std::fs::read_to_string(&s.token_file),
        std::fs::read_to_string(&ca_key_file),
    ) {
        (Ok(token), Ok(ca_key)) => Some((token.trim().to_string(), KeyPair::from_pem(&ca_key)?)),
        _ => None,
    };
    let fresh = kept.is_none();
    let ca_key = match kept {
        Some((token, ca_key)) => {
            s.token = token;
            ca_key
        }
        None => {
            std::fs::create_dir_all(&dir)?;
            KeyPair::generate()?
        }
    };
    // The same key and name give a CA certificate that verifies what the kept CA signed.
    let ca = ca_params.self_signed(&ca_key)?;
    let issue = |path: (PathBuf, PathBuf), cn: &str, uri: Option<String>| -> anyhow::Result<()> {
        let mut params =
            CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()])?;
        if let Some(uri) = uri {
            params.subject_alt_names.push(SanType::URI(uri.try_into()?));
        }
        params.distinguished_name.push(DnType::CommonName, cn);
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let key = KeyPair::generate()?;
        let cert = params.signed_by(&key, &ca, &ca_key)?;
        std::fs::write(&path.0, cert.pem())?;
        write_private(&path.1, &key.serialize_pem())
    };
    if fresh {
        std::fs::write(&s.ca, ca.pem())?;
        write_private(&ca_key_file, &ca_key.serialize_pem())?;
        issue(
            (s.cert.clone(), s.key.clone()),
            "kiwi playground control plane",
            None,
        )?;
        let bytes: [u8; 24] = rand::random();
        s.token = bytes.iter().map(|b| format!("{b:02x}")).collect();
        write_private(
            &s.tokens,
            &format!(
                "[[token]]\nsha256 = \"{}\"\nprincipal = \"playground\"\nrole = \"admin\"\n",
                kiwi_proto::auth::token_hash(&s.token)
            ),
        )?;
        write_private(&s.token_file, &format!("{}\n", s.token))?;
    }
    for id in 1..=nodes {
        let member = s.member(id);
        if fresh || !member.0.exists() || !member.1.exists() {
            issue(
                member,
                &format!("kiwi playground node {id}"),
                Some(kiwi_proto::tls::member_uri(id)),
            )?;
        }
    }
    Ok(s)
}

/// Where `restart` drops its requests.
fn requests_dir(data_dir: &Path) -> PathBuf {
    data_dir.join("requests")
}

/// `kiwi playground restart N`: asks the playground in `data_dir` and prints what it did.
async fn request_restart(node: u64, data_dir: &Path) -> anyhow::Result<()> {
    let dir = requests_dir(data_dir);
    if !dir.is_dir() {
        bail!(
            "{} is not a running playground's data directory (no requests/ in it); pass the directory \
             the playground printed (--data-dir or KIWI_PLAYGROUND_DIR)",
            data_dir.display()
        );
    }
    let request = dir.join(format!("restart-{node}"));
    let answer = dir.join(format!("restart-{node}.done"));
    let _ = std::fs::remove_file(&answer);
    std::fs::write(&request, b"").with_context(|| format!("cannot write {}", request.display()))?;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(text) = std::fs::read_to_string(&answer) {
            let _ = std::fs::remove_file(&answer);
            let text = text.trim();
            if let Some(err) = text.strip_prefix("error: ") {
                bail!("{err}");
            }
            println!("{text}");
            return Ok(());
        }
        if Instant::now() > deadline {
            let _ = std::fs::remove_file(&request);
            bail!(
                "the playground in {} did not answer within 30 s: is it still running?",
                data_dir.display()
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn spawn_node(bin: &Path, config: &Path, log: &Path) -> anyhow::Result<Child> {
    let file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)?;
    Command::new(bin)
        .arg("--config")
        .arg(config)
        .stdin(Stdio::null())
        .stdout(file.try_clone()?)
        .stderr(file)
        .kill_on_drop(true)
        .spawn()
        .with_context(|| {
            format!(
                "cannot start {} (set --node-bin or KIWI_NODE_BIN)",
                bin.display()
            )
        })
}

fn log_tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

pub async fn run(args: PlaygroundArgs) -> anyhow::Result<()> {
    match args.command {
        Some(PlaygroundCommand::Restart { node, data_dir }) => {
            request_restart(node, &data_dir).await
        }
        None => start(args.start).await,
    }
}

async fn start(args: StartArgs) -> anyhow::Result<()> {
    let data_dir = match args.data_dir {
        Some(d) => d,
        None => {
            let stamp = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs());
            std::env::temp_dir().join(format!("kiwi-playground-{stamp}-{}", std::process::id()))
        }
    };
    std::fs::create_dir_all(&data_dir)
        .with_context(|| format!("cannot create {}", data_dir.display()))?;
    let data_dir = data_dir.canonicalize()?;
    let requests = requests_dir(&data_dir);
    // Requests left from an earlier run of this directory are stale.
    let _ = std::fs::remove_dir_all(&requests);
    std::fs::create_dir_all(&requests)?;
    let bin = sibling_binary(args.node_bin, "kiwi-node");
    let secrets = if args.secure {
        Some(secrets(&data_dir, args.nodes)?)
    } else {
        None
    };
    let control = if args.no_control {
        None
    } else {
        let port = match args.base_port {
            Some(b) => b
                .checked_add(200)
                .context("--base-port too high for the control plane's port (base-port + 200)")?,
            None => free_port()?,
        };
        let addr = format!("127.0.0.1:{port}");
        let metrics_addr = if args.no_metrics {
            None
        } else {
            let port = match args.base_port {
                Some(b) => b.checked_add(201).context(
                    "--base-port too high for the control plane's metrics port (base-port + 201)",
                )?,
                None => free_port()?,
            };
            Some(format!("127.0.0.1:{port}"))
        };
        let bin = sibling_binary(args.control_bin, "kiwi-control");
        let log = data_dir.join("control.log");
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)?;
        let mut command = Command::new(&bin);
        command
            .arg("--listen-addr")
            .arg(&addr)
            .arg("--data-dir")
            .arg(data_dir.join("control"));
        if let Some(m) = &metrics_addr {
            command.arg("--metrics-addr").arg(m);
        }
        if let Some(s) = &secrets {
            let config = data_dir.join("control.toml");
            std::fs::write(
                &config,
                format!(
                    "[security]\ntokens_file = {:?}\ncert_file = {:?}\nkey_file = {:?}\nca_file = {:?}\n",
                    s.tokens, s.cert, s.key, s.ca
                ),
            )?;
            command.arg("--config").arg(config);
        }
        let child = command
            .stdin(Stdio::null())
            .stdout(file.try_clone()?)
            .stderr(file)
            .kill_on_drop(true)
            .spawn()
            .with_context(|| {
                format!(
                    "cannot start {} (set --control-bin or KIWI_CONTROL_BIN, or --no-control)",
                    bin.display()
                )
            })?;
        Some(ControlProc {
            addr,
            metrics_addr,
            log,
            child,
        })
    };

    let mut addrs = Vec::new();
    let mut metrics = Vec::new();
    let mut raft_addrs = Vec::new();
    let mut etcd_addrs = Vec::new();
    for id in 1..=args.nodes {
        let (port, metrics_port) = match args.base_port {
            Some(b) => {
                let port = b
                    .checked_add(u16::try_from(id - 1)?)
                    .context("--base-port too high for this many nodes")?;
                let metrics_port = port.checked_add(100).context(
                    "--base-port too high for the metrics ports (base-port + 100 + N - 1)",
                )?;
                (port, metrics_port)
            }
            None => (free_port()?, free_port()?),
        };
        addrs.push((id, format!("127.0.0.1:{port}")));
        metrics.push(format!("127.0.0.1:{metrics_port}"));
        let etcd_port = match args.base_port {
            Some(_) => port
                .checked_add(400)
                .context("--base-port too high for the etcd ports (base-port + 400 + N - 1)")?,
            None => free_port()?,
        };
        etcd_addrs.push(format!("127.0.0.1:{etcd_port}"));
        // Secure: Raft on its own port, where the handshake needs a member certificate.
        if args.secure {
            let raft_port = match args.base_port {
                Some(_) => port
                    .checked_add(300)
                    .context("--base-port too high for the Raft ports (base-port + 300 + N - 1)")?,
                None => free_port()?,
            };
            raft_addrs.push(format!("127.0.0.1:{raft_port}"));
        }
    }
    let mut procs = Vec::new();
    for ((id, addr), metrics_addr) in addrs.iter().zip(&metrics) {
        let dir = data_dir.join(format!("node-{id}"));
        std::fs::create_dir_all(&dir)?;
        let mut config = format!(
            "data_dir = {:?}\nlisten_addr = \"{addr}\"\n",
            dir.join("data").display().to_string()
        );
        let raft_addr = |id: u64| raft_addrs.get(usize::try_from(id - 1).ok()?);
        if let Some(r) = raft_addr(*id) {
            config.push_str(&format!("raft_listen_addr = \"{r}\"\n"));
        }
        let etcd_addr = etcd_addrs.get(usize::try_from(id - 1)?).cloned();
        if let Some(e) = &etcd_addr {
            config.push_str(&format!("\n[etcd]\nlisten_addr = \"{e}\"\n"));
        }
        config.push_str(&format!("\n[raft]\nnode_id = {id}\n"));
        if args.lease_reads {
            config.push_str("lease_reads = true\n");
        }
        for (pid, paddr) in &addrs {
            config.push_str(&format!(
                "\n[[raft.peers]]\nid = {pid}\naddr = \"{paddr}\"\n"
            ));
            if let Some(r) = raft_addr(*pid) {
                config.push_str(&format!("raft_addr = \"{r}\"\n"));
            }
        }
        if args.fault_injection {
            config.push_str("\n[raft.fault_injection]\nenabled = true\n");
        }
        config.push_str(&format!("\n[storage]\nbackend = \"{}\"\n", args.backend));
        config.push_str("\n[telemetry]\n");
        if !args.no_metrics {
            config.push_str(&format!("metrics_addr = \"{metrics_addr}\"\n"));
        }
        if let Some(endpoint) = &args.otlp_endpoint {
            config.push_str(&format!(
                "otlp_endpoint = {endpoint:?}\ntrace_sample_ratio = {:?}\n",
                args.trace_sample_ratio
            ));
        }
        if let Some(s) = &secrets {
            let (cert, key) = s.member(*id);
            config.push_str(&format!(
                "\n[security]\ntokens_file = {:?}\ncert_file = {:?}\nkey_file = {:?}\nca_file = {:?}\n",
                s.tokens, cert, key, s.ca
            ));
        }
        if let Some(c) = &control {
            match &secrets {
                Some(s) => config.push_str(&format!(
                    "\n[control]\naddr = \"https://{}\"\ntoken_file = {:?}\n",
                    c.addr, s.token_file
                )),
                None => config.push_str(&format!("\n[control]\naddr = \"{}\"\n", c.addr)),
            }
        }
        let config_path = dir.join("kiwi-node.toml");
        std::fs::write(&config_path, config)?;
        let log = dir.join("node.log");
        let child = spawn_node(&bin, &config_path, &log)?;
        procs.push(Proc {
            id: *id,
            addr: addr.clone(),
            metrics_addr: (!args.no_metrics).then(|| metrics_addr.clone()),
            etcd_addr,
            log,
            config: config_path,
            child: Some(child),
        });
    }

    let mut control = control;
    let result = serve(
        &mut procs,
        &data_dir,
        &args.backend,
        control.as_ref(),
        &bin,
        args.restart_crashed,
        secrets.as_ref(),
    )
    .await;
    let _ = std::fs::remove_dir_all(&requests);
    stop_all(&mut procs).await;
    if let Some(c) = control.as_mut() {
        sigterm(&c.child);
        if tokio::time::timeout(Duration::from_secs(10), c.child.wait())
            .await
            .is_err()
        {
            let _ = c.child.kill().await;
        }
        eprintln!("control plane stopped");
    }
    result
}

async fn serve(
    procs: &mut [Proc],
    data_dir: &Path,
    backend: &str,
    control: Option<&ControlProc>,
    bin: &Path,
    restart_crashed: bool,
    secrets: Option<&Secrets>,
) -> anyhow::Result<()> {
    let endpoints: Vec<String> = procs.iter().map(|p| p.addr.clone()).collect();
    let client = Client::connect(
        &endpoints,
        ClientOptions {
            timeout: Duration::from_secs(1),
            token: secrets.map(|s| s.token.clone()),
            tls: match secrets {
                Some(s) => Some(kiwi_proto::tls::client_config(&s.ca, "ca", None)?),
                None => None,
            },
            ..ClientOptions::default()
        },
    )?;
    eprintln!(
        "starting {} kiwi-node processes ({backend}) in {} ...",
        procs.len(),
        data_dir.display()
    );
    let deadline = Instant::now() + Duration::from_secs(60);
    let leader = loop {
        check_alive(procs)?;
        let statuses = client.status_all().await;
        if let Some(s) = statuses
            .iter()
            .filter_map(|(_, r)| r.as_ref().ok())
            .find(|s| s.role == RaftRole::Leader as i32)
        {
            break s.node_id;
        }
        if Instant::now() > deadline {
            bail!(
                "no leader elected within 60 s; node logs are in {}",
                data_dir.display()
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };

    let list = endpoints.join(",");
    println!(
        "Kiwi playground is up: {} nodes ({backend}), leader is node {leader}",
        procs.len()
    );
    for p in procs.iter() {
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
    if let Some(c) = control {
        match &c.metrics_addr {
            Some(m) => println!(
                "  control plane  {}  metrics (every node): http://{m}/metrics  log: {}",
                c.addr,
                c.log.display()
            ),
            None => println!("  control plane  {}  log: {}", c.addr, c.log.display()),
        }
    }
    println!("data dir: {}", data_dir.display());
    println!();
    println!("Try, in another terminal:");
    println!("  export KIWI_ENDPOINTS={list}");
    if let Some(c) = control {
        println!("  export KIWI_CONTROL={}", c.addr);
    }
    println!("  export KIWI_PLAYGROUND_DIR={}", data_dir.display());
    let etcd: Vec<&str> = procs
        .iter()
        .filter_map(|p| p.etcd_addr.as_deref())
        .collect();
    if !etcd.is_empty() {
        println!(
            "  export ETCDCTL_API=3 ETCDCTL_ENDPOINTS={}",
            etcd.join(",")
        );
    }
    if let Some(s) = secrets {
        println!("  export KIWI_CA_CERT={}", s.ca.display());
        println!("  export KIWI_TOKEN_FILE={}", s.token_file.display());
        println!("  export KIWI_CONTROL_TOKEN={}", s.token);
        if !etcd.is_empty() {
            println!(
                "  export ETCDCTL_CACERT={} ETCDCTL_USER=playground:{}",
                s.ca.display(),
                s.token
            );
        }
    }
    println!("  kiwi put hello world");
    println!("  kiwi get hello");
    println!("  kiwi status");
    if control.is_some() {
        println!("  kiwi control watch");
    }
    println!("  kiwi playground restart 1    # after killing node 1, or to bounce it");
    println!();
    println!("Ctrl-C stops every node.");

    let mut sigint = signal(SignalKind::interrupt())?;
    let mut sigterm = signal(SignalKind::terminate())?;
    loop {
        tokio::select! {
            _ = sigint.recv() => break,
            _ = sigterm.recv() => break,
            () = tokio::time::sleep(Duration::from_millis(500)) => {
                watch(procs, restart_crashed.then_some(bin))?;
                handle_requests(procs, data_dir, bin).await;
            }
        }
    }
    eprintln!("stopping every node ...");
    Ok(())
}

/// Before the cluster is up: any node exiting is an error.
fn check_alive(procs: &mut [Proc]) -> anyhow::Result<()> {
    for p in procs.iter_mut() {
        if let Some(child) = p.child.as_mut()
            && let Some(status) = child.try_wait()?
        {
            bail!(
                "node {} exited on its own ({status}); last lines of {}:\n{}",
                p.id,
                p.log.display(),
                log_tail(&p.log, 15)
            );
        }
    }
    Ok(())
}

/// Once the cluster is up: a node that dies is reported (and restarted with `--restart-crashed`); the
/// others keep running.
fn watch(procs: &mut [Proc], restart_with: Option<&Path>) -> anyhow::Result<()> {
    for p in procs.iter_mut() {
        let Some(child) = p.child.as_mut() else {
            continue;
        };
        let Some(status) = child.try_wait()? else {
            continue;
        };
        eprintln!(
            "node {} exited on its own ({status}); the other nodes keep running. Last lines of {}:\n{}",
            p.id,
            p.log.display(),
            log_tail(&p.log, 15)
        );
        p.child = None;
        if let Some(bin) = restart_with {
            p.child = Some(spawn_node(bin, &p.config, &p.log)?);
            eprintln!("node {} restarted (--restart-crashed)", p.id);
        } else {
            eprintln!(
                "(restart it with `kiwi playground restart {}`, or start the playground with \
                 --restart-crashed to restart crashed nodes automatically)",
                p.id
            );
        }
    }
    Ok(())
}

/// Serves the `restart` requests waiting in the data directory.
async fn handle_requests(procs: &mut [Proc], data_dir: &Path, bin: &Path) {
    let dir = requests_dir(data_dir);
    let Ok(entries) = std::fs::read_dir(&dir) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(id) = name.strip_prefix("restart-") else {
            continue;
        };
        if id.ends_with(".done") {
            continue;
        }
        let _ = std::fs::remove_file(entry.path());
        let answer = match id.parse::<u64>() {
            Ok(id) => match procs.iter_mut().find(|p| p.id == id) {
                Some(p) => restart(p, bin)
                    .await
                    .unwrap_or_else(|e| format!("error: node {id} not restarted: {e:#}")),
                None => format!(
                    "error: this playground has nodes 1 to {}, not {id}",
                    procs.len()
                ),
            },
            Err(_) => format!("error: {id:?} is not a node id"),
        };
        eprintln!("{}", answer.trim_start_matches("error: "));
        let _ = std::fs::write(dir.join(format!("{name}.done")), format!("{answer}\n"));
    }
}

/// Stops node `p` if it runs (SIGTERM, SIGKILL after 10 s) and starts it again.
async fn restart(p: &mut Proc, bin: &Path) -> anyhow::Result<String> {
    let was = if let Some(mut child) = p.child.take() {
        sigterm(&child);
        if tokio::time::timeout(Duration::from_secs(10), child.wait())
            .await
            .is_err()
        {
            let _ = child.kill().await;
        }
        "stopped and started again"
    } else {
        "was not running; started again"
    };
    let child = spawn_node(bin, &p.config, &p.log)?;
    let pid = child.id().unwrap_or(0);
    p.child = Some(child);
    Ok(format!("node {} {was} (pid {pid})", p.id))
}

/// Asks `child` to stop gracefully (SIGTERM).
fn sigterm(child: &Child) {
    if let Some(pid) = child.id() {
        let _ = std::process::Command::new("kill")
            .arg("-TERM")
            .arg(pid.to_string())
            .status();
    }
}

async fn stop_all(procs: &mut [Proc]) {
    for child in procs.iter().filter_map(|p| p.child.as_ref()) {
        sigterm(child);
    }
    for p in procs.iter_mut() {
        let Some(child) = p.child.as_mut() else {
            continue;
        };
        match tokio::time::timeout(Duration::from_secs(10), child.wait()).await {
            Ok(_) => {}
            Err(_) => {
                eprintln!(
                    "node {} did not stop within 10 s of SIGTERM; killing it",
                    p.id
                );
                let _ = child.kill().await;
            }
        }
    }
    eprintln!("all nodes stopped");
}
