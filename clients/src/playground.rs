//! A local cluster of real `kiwi-node` processes and a `kiwi-control`, like `tiup playground`: what
//! `kiwi playground` runs, and what any program or test can start the same way.
//!
//! [`Playground::start`] picks free loopback ports (or ports from a base), writes one config per node
//! under the data directory (`<data-dir>/node-<id>/kiwi-node.toml`), with `--secure` a CA, member
//! certificates and an admin token (`<data-dir>/secrets/`), and starts the processes with their logs in
//! `<data-dir>/node-<id>/node.log` and `<data-dir>/control.log`. [`Playground::wait_leader`] waits for
//! the election. The owner then calls [`Playground::reap`] and [`Playground::serve_requests`] now and
//! then: a node that died on its own is reported (and restarted when asked), and restart requests
//! dropped by [`request_restart`] (another process: `kiwi playground restart N`) are carried out.
//! [`Playground::stop`] ends every process (SIGTERM, SIGKILL after 10 s).
//!
//! The request protocol goes through the data directory: a request file `requests/restart-<id>`, the
//! outcome written next to it as `restart-<id>.done` (`error: ...` when it failed).

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use kiwi_proto::v1::RaftRole;
use tokio::process::{Child, Command};

use crate::{Client, ClientOptions};

/// What to start.
#[derive(Debug, Clone)]
pub struct Spec {
    /// Number of nodes (1 to 9).
    pub nodes: u64,
    /// `storage.backend` of every node: rocksdb, leveldb or memory.
    pub backend: String,
    /// Where the processes keep their data (default: a fresh directory under the system temp dir). An
    /// existing playground directory restarts that cluster with its data.
    pub data_dir: Option<PathBuf>,
    /// Node N listens on base + N - 1, its metrics on base + 100 + N - 1, its Raft port (secure) on
    /// base + 300 + N - 1, its etcd API on base + 400 + N - 1; the control plane on base + 200, its
    /// metrics on base + 201. `None`: free ports chosen by the OS.
    pub base_port: Option<u16>,
    /// Prometheus endpoints on every node and on the control plane.
    pub metrics: bool,
    /// `raft.lease_reads` on every node.
    pub lease_reads: bool,
    /// Export traces to this OTLP/gRPC collector, sampling `trace_sample_ratio` of requests.
    pub otlp_endpoint: Option<String>,
    pub trace_sample_ratio: f64,
    /// The kiwi-node binary.
    pub node_bin: PathBuf,
    /// The kiwi-control binary; `None` starts no control plane.
    pub control_bin: Option<PathBuf>,
    /// `[raft.fault_injection] enabled` on every node.
    pub fault_injection: bool,
    /// TLS everywhere, mutual TLS between members (each serving Raft on its own port), tokens.
    pub secure: bool,
}

/// `arg`, else the binary `name` next to the running one, else `name` on PATH.
pub fn sibling_binary(arg: Option<PathBuf>, name: &str) -> PathBuf {
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

/// One node of a playground.
pub struct Node {
    pub id: u64,
    /// Its gRPC address.
    pub addr: String,
    /// Its Prometheus endpoint (`telemetry.metrics_addr`), unless metrics are off.
    pub metrics_addr: Option<String>,
    /// Its etcd v3 API (`[etcd] listen_addr`).
    pub etcd_addr: String,
    pub log: PathBuf,
    config: PathBuf,
    /// `None` once it died (and was not restarted).
    child: Option<Child>,
}

/// The playground's control plane.
pub struct Control {
    pub addr: String,
    /// Its `/metrics` (every node's figures), unless metrics are off.
    pub metrics_addr: Option<String>,
    pub log: PathBuf,
    child: Child,
}

/// What a secure playground generated (under `<data-dir>/secrets/`).
pub struct Secrets {
    /// The CA that signed every certificate.
    pub ca: PathBuf,
    /// The control plane's certificate and key (server and client use; names no member).
    cert: PathBuf,
    key: PathBuf,
    /// Member `id`'s certificate and key: `<dir>/node-<id>.crt`, `.key` (see [`Secrets::member`]).
    dir: PathBuf,
    /// The tokens file every process reads.
    tokens: PathBuf,
    /// The admin token, and the file that holds it.
    pub token_file: PathBuf,
    pub token: String,
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

/// Where restart requests are dropped.
fn requests_dir(data_dir: &Path) -> PathBuf {
    data_dir.join("requests")
}

/// Asks the playground running in `data_dir` to restart node `node` (stopped with SIGTERM first if it
/// runs) and returns what it did.
///
/// # Errors
/// `data_dir` is not a running playground's, it did not answer within 30 s, or the restart failed.
pub async fn request_restart(node: u64, data_dir: &Path) -> anyhow::Result<String> {
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
            return Ok(text.to_string());
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

fn spawn_logged(command: &mut Command, log: &Path) -> std::io::Result<Child> {
    let file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)?;
    command
        .stdin(Stdio::null())
        .stdout(file.try_clone()?)
        .stderr(file)
        .kill_on_drop(true)
        .spawn()
}

fn spawn_node(bin: &Path, config: &Path, log: &Path) -> anyhow::Result<Child> {
    spawn_logged(Command::new(bin).arg("--config").arg(config), log).with_context(|| {
        format!(
            "cannot start {} (set --node-bin or KIWI_NODE_BIN)",
            bin.display()
        )
    })
}

/// The last `lines` lines of a log file.
pub fn log_tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// Asks `child` to stop gracefully (SIGTERM).
fn sigterm(child: &Child) {
    if let Some(pid) = child.id().and_then(|p| i32::try_from(p).ok()) {
        // SAFETY: kill(2) on a child this process spawned and has not reaped.
        unsafe { libc::kill(pid, libc::SIGTERM) };
    }
}

/// Waits up to 10 s for `child` to exit, then kills it. Returns whether it exited by itself.
async fn wait_or_kill(child: &mut Child) -> bool {
    if tokio::time::timeout(Duration::from_secs(10), child.wait())
        .await
        .is_ok()
    {
        return true;
    }
    let _ = child.kill().await;
    false
}

/// A `port` plus `offset`, or an error naming what did not fit.
fn port_plus(base: u16, offset: u64, what: &str) -> anyhow::Result<u16> {
    u16::try_from(offset)
        .ok()
        .and_then(|o| base.checked_add(o))
        .with_context(|| format!("--base-port too high for {what}"))
}

/// A running playground.
pub struct Playground {
    data_dir: PathBuf,
    spec: Spec,
    nodes: Vec<Node>,
    control: Option<Control>,
    secrets: Option<Secrets>,
}

impl Playground {
    /// Writes every config (and, secure, the secrets) and starts the processes; does not wait for them.
    ///
    /// # Errors
    /// A directory or file cannot be written, ports do not fit, a binary cannot be started.
    pub fn start(spec: Spec) -> anyhow::Result<Playground> {
        let data_dir = match &spec.data_dir {
            Some(d) => d.clone(),
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
        let secrets = if spec.secure {
            Some(secrets(&data_dir, spec.nodes)?)
        } else {
            None
        };
        let mut pg = Playground {
            data_dir,
            spec,
            nodes: Vec::new(),
            control: None,
            secrets,
        };
        pg.control = pg.start_control()?;
        pg.start_nodes()?;
        Ok(pg)
    }

    fn port(&self, offset: u64, what: &str) -> anyhow::Result<u16> {
        match self.spec.base_port {
            Some(b) => port_plus(b, offset, what),
            None => free_port(),
        }
    }

    fn start_control(&self) -> anyhow::Result<Option<Control>> {
        let Some(bin) = &self.spec.control_bin else {
            return Ok(None);
        };
        let addr = format!(
            "127.0.0.1:{}",
            self.port(200, "the control plane's port (base-port + 200)")?
        );
        let metrics_addr = if self.spec.metrics {
            Some(format!(
                "127.0.0.1:{}",
                self.port(201, "the control plane's metrics port (base-port + 201)")?
            ))
        } else {
            None
        };
        let log = self.data_dir.join("control.log");
        let mut command = Command::new(bin);
        command
            .arg("--listen-addr")
            .arg(&addr)
            .arg("--data-dir")
            .arg(self.data_dir.join("control"));
        if let Some(m) = &metrics_addr {
            command.arg("--metrics-addr").arg(m);
        }
        if let Some(s) = &self.secrets {
            let config = self.data_dir.join("control.toml");
            std::fs::write(
                &config,
                format!(
                    "[security]\ntokens_file = {:?}\ncert_file = {:?}\nkey_file = {:?}\nca_file = {:?}\n",
                    s.tokens, s.cert, s.key, s.ca
                ),
            )?;
            command.arg("--config").arg(config);
        }
        let child = spawn_logged(&mut command, &log).with_context(|| {
            format!(
                "cannot start {} (set --control-bin or KIWI_CONTROL_BIN, or --no-control)",
                bin.display()
            )
        })?;
        Ok(Some(Control {
            addr,
            metrics_addr,
            log,
            child,
        }))
    }

    fn start_nodes(&mut self) -> anyhow::Result<()> {
        struct Ports {
            addr: String,
            metrics: String,
            etcd: String,
            raft: Option<String>,
        }
        let mut ports = Vec::new();
        for id in 1..=self.spec.nodes {
            let n = id - 1;
            let at = |offset: u64, what: &str| -> anyhow::Result<String> {
                Ok(format!("127.0.0.1:{}", self.port(offset + n, what)?))
            };
            ports.push(Ports {
                addr: at(0, "this many nodes")?,
                metrics: at(100, "the metrics ports (base-port + 100 + N - 1)")?,
                etcd: at(400, "the etcd ports (base-port + 400 + N - 1)")?,
                // Secure: Raft on its own port, where the handshake needs a member certificate.
                raft: if self.spec.secure {
                    Some(at(300, "the Raft ports (base-port + 300 + N - 1)")?)
                } else {
                    None
                },
            });
        }
        let spec = &self.spec;
        for (id, p) in (1..).zip(&ports) {
            let dir = self.data_dir.join(format!("node-{id}"));
            std::fs::create_dir_all(&dir)?;
            let mut config = format!(
                "data_dir = {:?}\nlisten_addr = \"{}\"\n",
                dir.join("data").display().to_string(),
                p.addr
            );
            if let Some(r) = &p.raft {
                config.push_str(&format!("raft_listen_addr = \"{r}\"\n"));
            }
            config.push_str(&format!("\n[etcd]\nlisten_addr = \"{}\"\n", p.etcd));
            config.push_str(&format!("\n[raft]\nnode_id = {id}\n"));
            if spec.lease_reads {
                config.push_str("lease_reads = true\n");
            }
            for (pid, peer) in (1..).zip(&ports) {
                config.push_str(&format!(
                    "\n[[raft.peers]]\nid = {pid}\naddr = \"{}\"\n",
                    peer.addr
                ));
                if let Some(r) = &peer.raft {
                    config.push_str(&format!("raft_addr = \"{r}\"\n"));
                }
            }
            if spec.fault_injection {
                config.push_str("\n[raft.fault_injection]\nenabled = true\n");
            }
            config.push_str(&format!("\n[storage]\nbackend = \"{}\"\n", spec.backend));
            config.push_str("\n[telemetry]\n");
            if spec.metrics {
                config.push_str(&format!("metrics_addr = \"{}\"\n", p.metrics));
            }
            if let Some(endpoint) = &spec.otlp_endpoint {
                config.push_str(&format!(
                    "otlp_endpoint = {endpoint:?}\ntrace_sample_ratio = {:?}\n",
                    spec.trace_sample_ratio
                ));
            }
            if let Some(s) = &self.secrets {
                let (cert, key) = s.member(id);
                config.push_str(&format!(
                    "\n[security]\ntokens_file = {:?}\ncert_file = {:?}\nkey_file = {:?}\nca_file = {:?}\n",
                    s.tokens, cert, key, s.ca
                ));
            }
            if let Some(c) = &self.control {
                match &self.secrets {
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
            let child = spawn_node(&spec.node_bin, &config_path, &log)?;
            self.nodes.push(Node {
                id,
                addr: p.addr.clone(),
                metrics_addr: spec.metrics.then(|| p.metrics.clone()),
                etcd_addr: p.etcd.clone(),
                log,
                config: config_path,
                child: Some(child),
            });
        }
        Ok(())
    }

    /// The data directory (canonical).
    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    pub fn nodes(&self) -> &[Node] {
        &self.nodes
    }

    pub fn control(&self) -> Option<&Control> {
        self.control.as_ref()
    }

    /// What `secure` generated.
    pub fn secrets(&self) -> Option<&Secrets> {
        self.secrets.as_ref()
    }

    /// A client of every node, with the CA and the admin token when secure.
    ///
    /// # Errors
    /// The CA cannot be read.
    pub fn client(&self, timeout: Duration) -> anyhow::Result<Client> {
        let endpoints: Vec<String> = self.nodes.iter().map(|p| p.addr.clone()).collect();
        Ok(Client::connect(
            &endpoints,
            ClientOptions {
                timeout,
                token: self.secrets.as_ref().map(|s| s.token.clone()),
                tls: match &self.secrets {
                    Some(s) => Some(kiwi_proto::tls::client_config(&s.ca, "ca", None)?),
                    None => None,
                },
                ..ClientOptions::default()
            },
        )?)
    }

    /// Waits until a node says it leads and returns its id.
    ///
    /// # Errors
    /// A node exited (with its log's tail), or no leader within `timeout`.
    pub async fn wait_leader(&mut self, timeout: Duration) -> anyhow::Result<u64> {
        let client = self.client(Duration::from_secs(1))?;
        let deadline = Instant::now() + timeout;
        loop {
            self.check_alive()?;
            if let Some(s) = client
                .status_all()
                .await
                .iter()
                .filter_map(|(_, r)| r.as_ref().ok())
                .find(|s| s.role == RaftRole::Leader as i32)
            {
                return Ok(s.node_id);
            }
            if Instant::now() > deadline {
                bail!(
                    "no leader elected within {}; node logs are in {}",
                    humantime::format_duration(timeout),
                    self.data_dir.display()
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Before the cluster is up: any node exiting is an error.
    fn check_alive(&mut self) -> anyhow::Result<()> {
        for p in &mut self.nodes {
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

    /// Once the cluster is up: every node that died on its own since the last call, reported with its
    /// log's tail, and started again when `restart` (the others keep running).
    ///
    /// # Errors
    /// A process's state cannot be read, or a node cannot be started again.
    pub fn reap(&mut self, restart: bool) -> anyhow::Result<Vec<String>> {
        let mut said = Vec::new();
        for p in &mut self.nodes {
            let Some(child) = p.child.as_mut() else {
                continue;
            };
            let Some(status) = child.try_wait()? else {
                continue;
            };
            said.push(format!(
                "node {} exited on its own ({status}); the other nodes keep running. Last lines of {}:\n{}",
                p.id,
                p.log.display(),
                log_tail(&p.log, 15)
            ));
            p.child = None;
            if restart {
                p.child = Some(spawn_node(&self.spec.node_bin, &p.config, &p.log)?);
                said.push(format!("node {} restarted (--restart-crashed)", p.id));
            } else {
                said.push(format!(
                    "(restart it with `kiwi playground restart {}`, or start the playground with \
                     --restart-crashed to restart crashed nodes automatically)",
                    p.id
                ));
            }
        }
        Ok(said)
    }

    /// Carries out the restart requests waiting in the data directory; returns each outcome.
    pub async fn serve_requests(&mut self) -> Vec<String> {
        let dir = requests_dir(&self.data_dir);
        let Ok(entries) = std::fs::read_dir(&dir) else {
            return Vec::new();
        };
        let mut said = Vec::new();
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
                Ok(id) => self
                    .restart(id)
                    .await
                    .unwrap_or_else(|e| format!("error: node {id} not restarted: {e:#}")),
                Err(_) => format!("error: {id:?} is not a node id"),
            };
            let _ = std::fs::write(dir.join(format!("{name}.done")), format!("{answer}\n"));
            said.push(answer.trim_start_matches("error: ").to_string());
        }
        said
    }

    /// Stops node `id` if it runs (SIGTERM, SIGKILL after 10 s) and starts it again.
    ///
    /// # Errors
    /// No such node, or it cannot be started.
    pub async fn restart(&mut self, id: u64) -> anyhow::Result<String> {
        let count = self.nodes.len();
        let Some(p) = self.nodes.iter_mut().find(|p| p.id == id) else {
            bail!("this playground has nodes 1 to {count}, not {id}");
        };
        let was = if let Some(mut child) = p.child.take() {
            sigterm(&child);
            wait_or_kill(&mut child).await;
            "stopped and started again"
        } else {
            "was not running; started again"
        };
        let child = spawn_node(&self.spec.node_bin, &p.config, &p.log)?;
        let pid = child.id().unwrap_or(0);
        p.child = Some(child);
        Ok(format!("node {} {was} (pid {pid})", p.id))
    }

    /// Stops every node (SIGTERM to all, then SIGKILL to any still running 10 s later), then the control
    /// plane; returns what did not stop by itself.
    pub async fn stop(mut self) -> Vec<String> {
        let _ = std::fs::remove_dir_all(requests_dir(&self.data_dir));
        let mut said = Vec::new();
        // All at once, so that they stop in parallel.
        for child in self.nodes.iter().filter_map(|p| p.child.as_ref()) {
            sigterm(child);
        }
        for p in &mut self.nodes {
            if let Some(child) = p.child.as_mut()
                && !wait_or_kill(child).await
            {
                said.push(format!(
                    "node {} did not stop within 10 s of SIGTERM; killed",
                    p.id
                ));
            }
        }
        if let Some(c) = self.control.as_mut() {
            sigterm(&c.child);
            if !wait_or_kill(&mut c.child).await {
                said.push("the control plane did not stop within 10 s of SIGTERM; killed".into());
            }
        }
        said
    }
}
