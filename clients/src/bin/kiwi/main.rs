//! `kiwi`: the command-line client for Kiwi, for users and operators.
//!
//! Data commands (`put`, `get`, `del`, `scan`, `cas`) and `status` go through `kiwi-client`, so they find
//! the leader and follow redirects by themselves. `playground` starts a local cluster; `bench` measures one
//! (or an etcd cluster, with the same load).
//!
//! Modules, one per command family, each depending only on the library and on `main`'s shared helpers
//! (no module imports another, except `control` running `chaos` plans and the control-plane bench):
//! [`bench`], [`chaos`] (workload, lockers; the checker is `kiwi_client::linearizability`), [`control`]
//! and [`control_bench`] (the control plane's client is `kiwi_client::control`), [`lease`] (leases, locks,
//! elections), [`playground`], [`snapshot`] (backups), [`txn`].

mod bench;
mod chaos;
mod control;
mod control_bench;
mod lease;
mod playground;
mod snapshot;
mod txn;

use std::io::{Read, Write};
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};
use kiwi_client::{
    CallOptions, Client, ClientOptions, KeyRange, Priority, ReadConsistency, ScanOptions,
    TraceParent,
};
use kiwi_proto::v1::RaftRole;
use serde_json::json;

/// Kiwi command-line client.
///
/// Exit status: 0 success; 1 key not found or compare-and-swap failed; 2 any error (printed on one line).
#[derive(Debug, Parser)]
#[command(name = "kiwi", version, propagate_version = true)]
struct Cli {
    /// Comma-separated node addresses (host:port); any member works, the leader is found automatically.
    /// The default reaches `make run` (7381-7383) and `make node` (7380).
    #[arg(
        long,
        global = true,
        env = "KIWI_ENDPOINTS",
        value_delimiter = ',',
        default_value = "127.0.0.1:7381,127.0.0.1:7382,127.0.0.1:7383,127.0.0.1:7380"
    )]
    endpoints: Vec<String>,
    /// Request priority.
    #[arg(long, global = true, value_enum, default_value_t = PriorityArg::Normal)]
    priority: PriorityArg,
    /// Read consistency for get and scan.
    #[arg(long, global = true, value_enum, default_value_t = ConsistencyArg::Linearizable)]
    consistency: ConsistencyArg,
    /// Deadline for each command, retries included (e.g. 500ms, 5s).
    #[arg(long, global = true, default_value = "5s", value_parser = humantime::parse_duration)]
    timeout: Duration,
    /// Print machine-readable JSON instead of human output.
    #[arg(long, global = true)]
    json: bool,
    /// Trace this command: send a sampled W3C traceparent so every node it reaches records its spans
    /// (exported to the nodes' telemetry.otlp_endpoint), and print the trace id on stderr.
    #[arg(long, global = true)]
    trace: bool,
    /// Bearer token for nodes with `[security] tokens_file` (and control planes with theirs).
    #[arg(long, global = true, env = "KIWI_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// Read the bearer token from this file instead (first line).
    #[arg(long, global = true, env = "KIWI_TOKEN_FILE", conflicts_with = "token")]
    token_file: Option<std::path::PathBuf>,
    /// Connect with TLS, trusting this CA (PEM): for nodes (and a control plane) with
    /// `[security] cert_file`.
    #[arg(long, global = true, env = "KIWI_CA_CERT")]
    ca_cert: Option<std::path::PathBuf>,
    /// With --ca-cert: present this client certificate (PEM) ...
    #[arg(id = "tls_cert", long = "cert", value_name = "PEM", global = true, env = "KIWI_CERT", requires_all = ["ca_cert", "tls_key"])]
    cert: Option<std::path::PathBuf>,
    /// ... and its private key (PEM).
    #[arg(
        id = "tls_key",
        long = "key",
        value_name = "PEM",
        global = true,
        env = "KIWI_KEY",
        requires = "tls_cert"
    )]
    key: Option<std::path::PathBuf>,
    #[command(subcommand)]
    command: Command,
}

/// How the CLI reaches nodes and the control plane: its token and TLS settings.
pub(crate) struct Conn {
    pub token: Option<String>,
    pub tls: Option<tonic::transport::ClientTlsConfig>,
}

#[derive(Debug, Subcommand)]
enum TokenCommand {
    /// Print a new random token (give it to the principal) and its tokens-file entry (only the hash is
    /// stored).
    New {
        /// Who the token is for (shown in errors and logs).
        #[arg(long)]
        principal: String,
        /// read, write, admin or metrics.
        #[arg(long, value_parser = ["read", "write", "admin", "metrics"])]
        role: String,
    },
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum PriorityArg {
    Critical,
    High,
    Normal,
    Low,
}

impl From<PriorityArg> for Priority {
    fn from(p: PriorityArg) -> Self {
        match p {
            PriorityArg::Critical => Priority::Critical,
            PriorityArg::High => Priority::High,
            PriorityArg::Normal => Priority::Normal,
            PriorityArg::Low => Priority::Low,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ConsistencyArg {
    /// Reflects every write acknowledged before the read (served by the leader).
    Linearizable,
    /// The answering node's local state; may lag.
    Serializable,
}

impl From<ConsistencyArg> for ReadConsistency {
    fn from(c: ConsistencyArg) -> Self {
        match c {
            ConsistencyArg::Linearizable => ReadConsistency::Linearizable,
            ConsistencyArg::Serializable => ReadConsistency::Serializable,
        }
    }
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Write KEY = VALUE (VALUE "-" reads it from stdin).
    Put {
        key: String,
        value: String,
        /// Attach KEY to this lease (the hex id `kiwi lease grant` printed): it is deleted when the lease
        /// is revoked or expires. A put without --lease detaches the key from any lease.
        #[arg(long, value_name = "ID", value_parser = lease::parse_id)]
        lease: Option<u64>,
    },
    /// Print the value of KEY (exit 1 if absent); --json adds its revisions and version.
    Get {
        key: String,
        /// Read KEY as it was at revision R (from the kept history).
        #[arg(long, value_name = "R", default_value_t = 0)]
        rev: u64,
    },
    /// Run a transaction read from stdin, in etcdctl's form: compares, an empty line, the ops if every
    /// compare holds, an empty line, the ops otherwise. Prints SUCCESS or FAILURE and each op's answer.
    ///
    /// Compares: TARGET("KEY") OP "VALUE", TARGET one of value, version, create, mod, lease; OP one of
    /// =, !=, <, >. Ops: put KEY VALUE | get KEY [END|--prefix] | del KEY [END|--prefix]. Example:
    ///
    ///   printf 'mod("acct/a") = "42"\n\nput acct/a 90\nput acct/b 110\n\nget acct/a\n' | kiwi txn
    Txn,
    /// Drop the kept history before revision REV: reads and watches at older revisions are refused.
    Compact { rev: u64 },
    /// Delete KEY (exit 1 if it did not exist), or in one write every key of [KEY, TO) (--to) or under a
    /// prefix (--prefix), printing how many were deleted.
    Del {
        #[arg(required_unless_present = "prefix", conflicts_with = "prefix")]
        key: Option<String>,
        /// Delete [KEY, TO) in one write (TO excluded; an empty TO: up to the last key).
        #[arg(long, value_name = "TO")]
        to: Option<String>,
        /// Delete every key starting with P in one write.
        #[arg(long, value_name = "P")]
        prefix: Option<String>,
        /// With --to or --prefix: print the deleted pairs (up to 4 MiB of them).
        #[arg(long)]
        prev_kv: bool,
    },
    /// Print every change to KEY (or under --prefix) until Ctrl-C: `PUT key value rev=N` and
    /// `DELETE key rev=N` lines, in revision order. Reconnects by itself through leader changes and node
    /// loss, resuming after the last revision it printed; exits 1 if the history it needs was compacted.
    Watch {
        #[arg(required_unless_present = "prefix", conflicts_with = "prefix")]
        key: Option<String>,
        /// Every key starting with P.
        #[arg(long, value_name = "P")]
        prefix: Option<String>,
        /// Start at this revision (from the kept history); default: from now.
        #[arg(long, value_name = "R", default_value_t = 0)]
        rev: u64,
        /// Print each change's previous value too (`prev=...`).
        #[arg(long)]
        prev_kv: bool,
    },
    /// List keys in [START, END) in order (an omitted bound is open), or under a prefix.
    Scan {
        #[arg(conflicts_with = "prefix")]
        start: Option<String>,
        #[arg(conflicts_with = "prefix")]
        end: Option<String>,
        /// Every key starting with P instead of [START, END).
        #[arg(long, value_name = "P")]
        prefix: Option<String>,
        /// At most this many pairs (1-10000).
        #[arg(long, default_value_t = 100)]
        limit: u32,
        /// Print keys only.
        #[arg(long)]
        keys_only: bool,
        /// From the largest key down.
        #[arg(long)]
        reverse: bool,
        /// Print only how many keys the range holds (all of them; --limit does not apply).
        #[arg(long, conflicts_with_all = ["keys_only", "reverse"])]
        count: bool,
        /// Read the range as it was at revision R (from the kept history).
        #[arg(long, value_name = "R", default_value_t = 0, conflicts_with = "count")]
        rev: u64,
    },
    /// Set KEY to NEW only if its value is OLD (--expect OLD) or it is absent (--absent); exit 1 if not.
    Cas(CasArgs),
    /// Members, leader, term, commit/applied index and per-peer replication progress.
    Status,
    /// Each node's storage pool (threads, target, utilisation, recent scale events), priority queues and
    /// runtime policy.
    Runtime {
        /// Turn priority scheduling on or off on every endpoint (off: one FIFO), then show the result.
        #[arg(long, value_name = "on|off", value_parser = ["on", "off"])]
        set_priority: Option<String>,
        /// Turn storage pool scaling on or off on every endpoint (off: the pool stays at its minimum).
        #[arg(long, value_name = "on|off", value_parser = ["on", "off"])]
        set_scaling: Option<String>,
        /// Set the storage pool's bounds on every endpoint, e.g. 4-32 (or 32-32 for a pool fixed at 32).
        #[arg(long, value_name = "MIN-MAX", value_parser = parse_bounds)]
        set_storage_threads: Option<(u32, u32)>,
    },
    /// Each node's Raft metrics: role, term, indexes, elections, proposal outcomes, latencies (propose to
    /// apply, ReadIndex, Ready handling, log fsync), the leader's per-follower replication latency and lag,
    /// and a sparkline of the commit rate over the retained history.
    Metrics,
    /// The control plane (kiwi-control): `status` (every node's live view), `events` (the event log).
    Control(control::ControlArgs),
    /// Run a fault plan through the control plane while clients put, get and compare-and-swap on a few
    /// keys, then check the history for linearizability and print a timeline (exit status 1 when the
    /// history is not linearizable or the check could not decide).
    Chaos(chaos::ChaosArgs),
    /// Make tokens for a tokens file (`[security] tokens_file`).
    Token {
        #[command(subcommand)]
        command: TokenCommand,
    },
    /// Start a local cluster of real kiwi-node processes and keep it running until Ctrl-C.
    Playground(playground::PlaygroundArgs),
    /// Closed-loop load generator against Kiwi or etcd; prints throughput and latency percentiles.
    Bench(bench::BenchArgs),
    /// Cluster membership: list, add and remove members (through the leader).
    #[command(subcommand)]
    Member(MemberCommand),
    /// Leadership: hand it to another voter.
    #[command(subcommand)]
    Leader(LeaderCommand),
    /// Compact each node's storage engine over its whole range, one node after another (never all at
    /// once: a node defragmenting is slower), reclaiming the space of deleted and overwritten data;
    /// prints each node's data size before and after. RocksDB only (LevelDB cannot reclaim anything).
    Defrag {
        /// Only the node with this id.
        #[arg(long, value_name = "ID")]
        node: Option<u64>,
    },
    /// Backups: save the keyspace to a file, check a file, restore one into a new cluster's members.
    #[command(subcommand)]
    Snapshot(snapshot::SnapshotCommand),
    /// Leases: keys that are deleted when their lease is revoked or expires (only the leader's clock
    /// decides; a new leader gives every lease a fresh TTL).
    #[command(subcommand)]
    Lease(lease::LeaseCommand),
    /// Run COMMAND holding the lock NAME (etcd's algorithm on a lease kept alive meanwhile; waiters get
    /// it in order of arrival), release it when COMMAND exits, and exit with COMMAND's status. Example:
    ///
    ///   kiwi lock deploy -- sh -c 'echo only one at a time; sleep 5'
    Lock {
        name: String,
        /// TTL of the session's lease: how long the lock outlives a crashed holder.
        #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
        ttl: std::time::Duration,
        /// The command and its arguments (after --).
        #[arg(last = true, required = true)]
        command: Vec<String>,
    },
    /// Campaign in the election NAME, print `elected: NAME = VALUE` once leading, and lead until Ctrl-C
    /// (then resign); with --listen, print each leader's value instead, without campaigning.
    Elect {
        name: String,
        #[arg(required_unless_present = "listen")]
        value: Option<String>,
        /// Follow the election: print the value of each new leader.
        #[arg(long)]
        listen: bool,
        /// TTL of the candidate's lease: how long leadership outlives a crashed leader.
        #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
        ttl: std::time::Duration,
    },
}

#[derive(Debug, Subcommand)]
enum MemberCommand {
    /// Every member as the leader sees it: id, address, voter or learner, applied index, lag behind the
    /// leader's commit index, up or down.
    List,
    /// Add node ID, already running with `raft.join = true` and `raft.node_id = ID` at ADDR: it joins as a
    /// learner, catches up, and is promoted to voter (the command returns when it votes). Prints the
    /// config lines the new node needs.
    Add {
        id: u64,
        addr: String,
        /// Its Raft address when it serves Raft on its own port (`raft_listen_addr`).
        #[arg(long)]
        raft_addr: Option<String>,
        /// Add it as a learner only (it follows without voting); `kiwi member promote ID` later.
        #[arg(long)]
        learner: bool,
    },
    /// Promote learner ID to voter once it has caught up (the command returns when it votes).
    Promote { id: u64 },
    /// Remove node ID. Removing the leader needs --yes: leadership is first handed to the most caught-up
    /// voter.
    Remove {
        id: u64,
        /// Also when ID leads (transfer first, then remove).
        #[arg(long)]
        yes: bool,
    },
}

#[derive(Debug, Subcommand)]
enum LeaderCommand {
    /// Hand leadership to voter ID (default: the most caught-up other voter); returns once it leads.
    Transfer { id: Option<u64> },
}

#[derive(Debug, Args)]
#[group(skip)]
#[command(group(clap::ArgGroup::new("expectation").required(true).multiple(false).args(["expect", "absent"])))]
struct CasArgs {
    key: String,
    /// The value the key must have now.
    #[arg(long)]
    expect: Option<String>,
    /// The key must not exist now.
    #[arg(long)]
    absent: bool,
    /// The new value ("-" reads it from stdin).
    new: String,
}

/// A command's result: exit status 0 or 1.
enum Outcome {
    Ok,
    Miss,
    /// Exit with this status (a command `kiwi lock` ran).
    Exit(u8),
}

fn value_arg(v: &str) -> anyhow::Result<Vec<u8>> {
    if v == "-" {
        let mut buf = Vec::new();
        std::io::stdin().read_to_end(&mut buf)?;
        Ok(buf)
    } else {
        Ok(v.as_bytes().to_vec())
    }
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn main() -> ExitCode {
    // Output piped into a reader that stops early (`kiwi scan ... | head`) ends the process quietly, as
    // other Unix tools do, instead of a panic message. SIGPIPE itself stays ignored (Rust's default):
    // with its default action, a write to a connection a crashed node reset would kill the process.
    let report = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let payload = info.payload();
        let message = payload
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| payload.downcast_ref::<&str>().copied())
            .unwrap_or("");
        if message.starts_with("failed printing to stdout") && message.contains("Broken pipe") {
            std::process::exit(141);
        }
        report(info);
    }));
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::from(2);
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(Outcome::Ok) => ExitCode::SUCCESS,
        Ok(Outcome::Miss) => ExitCode::from(1),
        Ok(Outcome::Exit(code)) => ExitCode::from(code),
        Err(e) => {
            let mut msg = e.to_string();
            for cause in e.chain().skip(1) {
                msg.push_str(&format!(": {cause}"));
            }
            if msg.contains("cannot reach the control plane") {
                msg.push_str(" (give its address with --control or KIWI_CONTROL)");
            }
            if msg.contains("cannot connect to any endpoint") {
                msg.push_str(
                    " (is a cluster running there? Give its addresses with --endpoints or \
                     KIWI_ENDPOINTS, or start a local one with `make run` or `kiwi playground`)",
                );
            }
            if msg.contains("h2 protocol error") || msg.contains("InvalidContentType") {
                msg.push_str(
                    " (plain text and TLS do not match: a node with [security] cert_file needs \
                     --ca-cert or KIWI_CA_CERT, and one without must not get it)",
                );
            }
            eprintln!("error: {}", msg.replace('\n', " "));
            ExitCode::from(2)
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<Outcome> {
    let token = match (&cli.token, &cli.token_file) {
        (Some(t), _) => Some(t.trim().to_string()),
        (None, Some(path)) => Some(
            std::fs::read_to_string(path)
                .map_err(|e| anyhow::anyhow!("cannot read --token-file {}: {e}", path.display()))?
                .lines()
                .next()
                .unwrap_or_default()
                .trim()
                .to_string(),
        ),
        (None, None) => None,
    };
    if let Command::Token {
        command: TokenCommand::New { principal, role },
    } = &cli.command
    {
        let bytes: [u8; 24] = rand::random();
        let token: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
        println!("token (give it to {principal}; it is not stored anywhere): {token}");
        println!("tokens file entry:\n");
        println!(
            "[[token]]\nsha256 = \"{}\"\nprincipal = {principal:?}\nrole = \"{role}\"",
            kiwi_proto::auth::token_hash(&token)
        );
        return Ok(Outcome::Ok);
    }
    let tls = match &cli.ca_cert {
        Some(ca) => Some(kiwi_proto::tls::client_config(
            ca,
            "--ca-cert",
            match (&cli.cert, &cli.key) {
                (Some(c), Some(k)) => Some((c.as_path(), "--cert", k.as_path(), "--key")),
                _ => None,
            },
        )?),
        None => None,
    };
    let conn = Conn {
        token: token.clone(),
        tls: tls.clone(),
    };
    let options = ClientOptions {
        timeout: cli.timeout,
        priority: cli.priority.into(),
        token: token.clone(),
        tls,
        fail_fast_unreachable: true,
        ..ClientOptions::default()
    };
    let trace = cli.trace.then(TraceParent::new_sampled);
    if let Some(t) = &trace {
        eprintln!("trace id: {}", t.trace_id_hex());
    }
    let call = CallOptions {
        consistency: Some(cli.consistency.into()),
        trace,
        ..CallOptions::default()
    };
    let json = cli.json;
    let connect = || Client::connect(&cli.endpoints, options.clone());
    match cli.command {
        Command::Put { key, value, lease } => {
            let value = value_arg(&value)?;
            let index = connect()?
                .put_leased(key.as_bytes(), &value, lease.unwrap_or(0), &call)
                .await?;
            if json {
                println!("{}", json!({"ok": true, "index": index}));
            } else {
                println!("OK");
            }
            Ok(Outcome::Ok)
        }
        Command::Get { key, rev } => match connect()?.get_kv(key.as_bytes(), rev, &call).await? {
            Some(kv) => {
                if json {
                    println!(
                        "{}",
                        json!({"key": key, "found": true, "value": text(&kv.value),
                            "create_revision": kv.create_revision, "mod_revision": kv.mod_revision,
                            "version": kv.version})
                    );
                } else {
                    let mut out = std::io::stdout().lock();
                    out.write_all(&kv.value)?;
                    out.write_all(b"\n")?;
                }
                Ok(Outcome::Ok)
            }
            None => {
                if json {
                    println!("{}", json!({"key": key, "found": false}));
                } else {
                    eprintln!("key not found: {key}");
                }
                Ok(Outcome::Miss)
            }
        },
        Command::Watch {
            key,
            prefix,
            rev,
            prev_kv,
        } => {
            let client = connect()?;
            let range = match (key, prefix) {
                (_, Some(p)) => KeyRange::Prefix(p.into_bytes()),
                (Some(k), None) => KeyRange::key(k.as_bytes()),
                (None, None) => unreachable!("clap requires KEY or --prefix"),
            };
            let mut watcher = client.watch(&range, rev, prev_kv);
            loop {
                match watcher.next().await? {
                    kiwi_client::WatchUpdate::Events(events) => {
                        for e in events {
                            let kv = e.kv.unwrap_or_default();
                            let put = e.r#type == kiwi_client::key_event::EventType::Put as i32;
                            let prev = e.prev_kv.map(|p| text(&p.value));
                            if json {
                                println!(
                                    "{}",
                                    json!({"type": if put { "PUT" } else { "DELETE" },
                                        "key": text(&kv.key), "value": text(&kv.value),
                                        "revision": kv.mod_revision, "prev_value": prev})
                                );
                            } else if put {
                                let prev = prev.map(|p| format!(" prev={p}")).unwrap_or_default();
                                println!(
                                    "PUT {} {} rev={}{prev}",
                                    text(&kv.key),
                                    text(&kv.value),
                                    kv.mod_revision
                                );
                            } else {
                                let prev = prev.map(|p| format!(" prev={p}")).unwrap_or_default();
                                println!("DELETE {} rev={}{prev}", text(&kv.key), kv.mod_revision);
                            }
                        }
                    }
                    kiwi_client::WatchUpdate::Compacted { oldest } => {
                        eprintln!(
                            "the history needed was compacted: the oldest revision kept is {oldest}; \
                             watch again with --rev {oldest} or later"
                        );
                        return Ok(Outcome::Miss);
                    }
                }
            }
        }
        Command::Del {
            key,
            to,
            prefix,
            prev_kv,
        } => {
            let range = match (key, to, prefix) {
                (Some(key), None, None) if !prev_kv => {
                    let existed = connect()?.delete(key.as_bytes(), &call).await?;
                    if json {
                        println!("{}", json!({"key": key, "existed": existed}));
                    } else if existed {
                        println!("deleted");
                    } else {
                        eprintln!("key not found: {key}");
                    }
                    return Ok(if existed { Outcome::Ok } else { Outcome::Miss });
                }
                // KEY alone with --prev-kv: that key only, [KEY, KEY + "\0").
                (Some(key), None, None) => {
                    let mut end = key.clone().into_bytes();
                    end.push(0);
                    KeyRange::Between {
                        start: key.into_bytes(),
                        end,
                    }
                }
                (Some(key), Some(to), None) => KeyRange::Between {
                    start: key.into_bytes(),
                    end: to.into_bytes(),
                },
                (None, None, Some(p)) => KeyRange::Prefix(p.into_bytes()),
                _ => anyhow::bail!("give KEY (with --to TO for a range) or --prefix P, not both"),
            };
            let out = connect()?.delete_range(&range, prev_kv, &call).await?;
            if json {
                let prev: Vec<_> = out
                    .prev_kvs
                    .iter()
                    .map(|(k, v)| json!({"key": text(k), "value": text(v)}))
                    .collect();
                println!(
                    "{}",
                    json!({"deleted": out.deleted, "prev_kvs": prev, "prev_kvs_truncated": out.prev_kvs_truncated})
                );
            } else {
                for (k, v) in &out.prev_kvs {
                    println!("{}\t{}", text(k), text(v));
                }
                if out.prev_kvs_truncated {
                    eprintln!("(more pairs were deleted than shown: 4 MiB are shown at most)");
                }
                println!("deleted {}", out.deleted);
            }
            Ok(Outcome::Ok)
        }
        Command::Scan {
            start,
            end,
            prefix,
            limit,
            keys_only,
            reverse,
            count,
            rev,
        } => {
            let range = match prefix {
                Some(p) => KeyRange::Prefix(p.into_bytes()),
                None => KeyRange::Between {
                    start: start.unwrap_or_default().into_bytes(),
                    end: end.unwrap_or_default().into_bytes(),
                },
            };
            if count {
                let n = connect()?.count(&range, &call).await?;
                if json {
                    println!("{}", json!({"count": n}));
                } else {
                    println!("{n}");
                }
                return Ok(Outcome::Ok);
            }
            let scan = ScanOptions {
                limit,
                reverse,
                keys_only,
                max_bytes: 0,
                revision: rev,
            };
            let page = connect()?.scan_range(&range, &scan, &call).await?;
            if json {
                let kvs: Vec<_> = page
                    .kvs
                    .iter()
                    .map(|(k, v)| json!({"key": text(k), "value": text(v)}))
                    .collect();
                println!("{}", json!({"kvs": kvs, "more": page.more}));
            } else {
                for (k, v) in &page.kvs {
                    if keys_only {
                        println!("{}", text(k));
                    } else {
                        println!("{}\t{}", text(k), text(v));
                    }
                }
                if page.more {
                    eprintln!("(more keys follow; raise --limit or scan from after the last key)");
                }
            }
            Ok(Outcome::Ok)
        }
        Command::Cas(args) => {
            let new = value_arg(&args.new)?;
            let expected = args.expect.as_ref().map(|e| e.as_bytes());
            let out = connect()?
                .compare_and_swap(args.key.as_bytes(), expected, &new, &call)
                .await?;
            if json {
                println!(
                    "{}",
                    json!({"succeeded": out.succeeded, "previous": out.previous.as_deref().map(text)})
                );
            } else if out.succeeded {
                println!("OK");
            } else {
                match &out.previous {
                    Some(v) => eprintln!(
                        "compare-and-swap failed: the current value is {:?}",
                        text(v)
                    ),
                    None => eprintln!("compare-and-swap failed: the key is absent"),
                }
            }
            Ok(if out.succeeded {
                Outcome::Ok
            } else {
                Outcome::Miss
            })
        }
        Command::Txn => {
            let mut input = String::new();
            std::io::stdin().read_to_string(&mut input)?;
            let (compare, success, failure) = txn::parse(&input).map_err(anyhow::Error::msg)?;
            let answer = connect()?.txn(compare, success, failure, &call).await?;
            txn::print(&answer, json);
            Ok(Outcome::Ok)
        }
        Command::Compact { rev } => {
            connect()?.compact(rev, &call).await?;
            if json {
                println!("{}", json!({"ok": true, "compacted_to": rev}));
            } else {
                println!("OK: revisions before {rev} are dropped");
            }
            Ok(Outcome::Ok)
        }
        Command::Status => status(&connect()?, json).await,
        Command::Member(cmd) => member(&connect()?, cmd, json).await,
        Command::Leader(LeaderCommand::Transfer { id }) => {
            let (leader, term) = connect()?.transfer_leader(id).await?;
            if json {
                println!("{}", json!({"leader": leader, "term": term}));
            } else {
                println!("node {leader} leads (term {term})");
            }
            Ok(Outcome::Ok)
        }
        Command::Metrics => metrics(&connect()?, json).await,
        Command::Defrag { node } => defrag(&connect()?, node, json).await,
        Command::Snapshot(command) => snapshot::run(command, connect, json).await,
        Command::Lease(command) => lease::run(command, &connect()?, &call, json).await,
        Command::Lock { name, ttl, command } => lease::lock(connect()?, &name, ttl, &command).await,
        Command::Elect {
            name,
            value,
            listen,
            ttl,
        } => lease::elect(connect()?, &name, value.as_deref(), listen, ttl).await,
        Command::Runtime {
            set_priority,
            set_scaling,
            set_storage_threads,
        } => {
            let client = connect()?;
            if set_priority.is_some() || set_scaling.is_some() || set_storage_threads.is_some() {
                for (addr, r) in client
                    .update_runtime_policy(|p| {
                        if let (Some(v), Some(pr)) = (&set_priority, p.priority.as_mut()) {
                            pr.enabled = v == "on";
                        }
                        if let Some(sc) = p.scaling.as_mut() {
                            if let Some(v) = &set_scaling {
                                sc.enabled = v == "on";
                            }
                            if let Some((min, max)) = set_storage_threads {
                                sc.min_storage_threads = min;
                                sc.max_storage_threads = max;
                            }
                        }
                    })
                    .await
                {
                    if let Err(e) = r {
                        anyhow::bail!("{addr} refused the policy: {}", e.message());
                    }
                }
            }
            runtime(&client, json).await
        }
        Command::Control(args) => control::run(args, json, &conn).await,
        Command::Token { .. } => Ok(Outcome::Ok),
        Command::Chaos(args) => match chaos::run(args, &cli.endpoints, &conn).await? {
            chaos::ChaosVerdict::Linearizable => Ok(Outcome::Ok),
            chaos::ChaosVerdict::Violation | chaos::ChaosVerdict::Unknown => Ok(Outcome::Miss),
        },
        Command::Playground(args) => playground::run(args).await.map(|()| Outcome::Ok),
        Command::Bench(args) => bench::run(
            args,
            &cli.endpoints,
            cli.consistency,
            cli.priority.into(),
            &conn,
        )
        .await
        .map(|()| Outcome::Ok),
    }
}

/// `MIN-MAX` thread bounds.
pub(crate) fn parse_bounds(s: &str) -> Result<(u32, u32), String> {
    let (min, max) = s
        .split_once('-')
        .ok_or_else(|| format!("expected MIN-MAX such as 4-32, got {s:?}"))?;
    let n = |v: &str| {
        v.trim()
            .parse::<u32>()
            .map_err(|e| format!("{v:?} is not a thread count: {e}"))
    };
    Ok((n(min)?, n(max)?))
}

/// Unicode block sparkline of `values` (at most `width` points, averaged per point).
fn sparkline(values: &[f64], width: usize) -> String {
    const BARS: [char; 8] = ['▁', '▂', '▃', '▄', '▅', '▆', '▇', '█'];
    if values.is_empty() {
        return String::new();
    }
    let per = values.len().div_ceil(width.max(1));
    let points: Vec<f64> = values
        .chunks(per)
        .map(|c| c.iter().sum::<f64>() / c.len() as f64)
        .collect();
    let max = points.iter().copied().fold(0.0, f64::max);
    points
        .iter()
        .map(|v| {
            if max <= 0.0 {
                BARS[0]
            } else {
                BARS[((v / max) * 7.0).round() as usize]
            }
        })
        .collect()
}

fn latency_text(l: Option<&kiwi_proto::v1::LatencySummary>) -> String {
    match l {
        Some(l) if l.count > 0 => format!(
            "p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms ({} samples)",
            l.p50_us as f64 / 1000.0,
            l.p99_us as f64 / 1000.0,
            l.max_us as f64 / 1000.0,
            l.count
        ),
        _ => "-".into(),
    }
}

/// Fails, naming every endpoint's error, when no endpoint answered.
fn ensure_any_answered<T>(all: &[(String, Result<T, tonic::Status>)]) -> anyhow::Result<()> {
    if all.iter().any(|(_, r)| r.is_ok()) {
        return Ok(());
    }
    anyhow::bail!(
        "no endpoint answered: {}",
        all.iter()
            .filter_map(|(a, r)| r.as_ref().err().map(|e| format!("{a}: {}", e.message())))
            .collect::<Vec<_>>()
            .join("; ")
    )
}

async fn metrics(client: &Client, json: bool) -> anyhow::Result<Outcome> {
    let all = client.raft_metrics_all(true).await;
    ensure_any_answered(&all)?;
    let summary = |l: &Option<kiwi_proto::v1::LatencySummary>| {
        l.map(|l| json!({"count": l.count, "p50_us": l.p50_us, "p99_us": l.p99_us, "max_us": l.max_us, "mean_us": l.mean_us}))
    };
    if json {
        let nodes: Vec<_> = all
            .iter()
            .map(|(addr, r)| match r {
                Err(e) => json!({"addr": addr, "error": e.message()}),
                Ok(m) => json!({
                    "addr": addr, "id": m.node_id, "role": RaftRole::label(m.role), "term": m.term,
                    "leader": m.leader_id, "commit_index": m.commit_index, "applied_index": m.applied_index,
                    "log_first_index": m.log_first_index, "log_last_index": m.log_last_index,
                    "elections": m.elections, "leader_changes": m.leader_changes,
                    "last_election_ms": m.last_election_ms, "commit_rate": m.commit_rate,
                    "apply_rate": m.apply_rate, "proposals_committed": m.proposals_committed,
                    "proposals_dropped": m.proposals_dropped, "proposals_rejected": m.proposals_rejected,
                    "propose_to_apply": summary(&m.propose_to_apply), "read_index": summary(&m.read_index),
                    "ready_handling": summary(&m.ready_handling), "log_fsync": summary(&m.log_fsync),
                    "log_fsync_entries": m.log_fsync_entries,
                    "followers": m.followers.iter().map(|f| json!({
                        "id": f.node_id, "match_index": f.match_index, "lag": f.lag,
                        "recently_active": f.recently_active, "voter": f.voter,
                        "replication_latency_avg_us": f.replication_latency_avg_us,
                        "replication_latency": summary(&f.replication_latency),
                        "snapshots_sent": f.snapshots_sent, "snapshots_failed": f.snapshots_failed,
                        "snapshot_duration": summary(&f.snapshot_duration),
                    })).collect::<Vec<_>>(),
                    "history_samples": m.history.len(),
                }),
            })
            .collect();
        println!("{}", json!({ "nodes": nodes }));
        return Ok(Outcome::Ok);
    }
    for (addr, r) in &all {
        let m = match r {
            Ok(m) => m,
            Err(e) => {
                println!("{addr}: {}\n", e.message());
                continue;
            }
        };
        println!(
            "node {} ({addr}) {} term {}, leader {}; commit {} applied {} log {}..={}",
            m.node_id,
            RaftRole::label(m.role),
            m.term,
            m.leader_id,
            m.commit_index,
            m.applied_index,
            m.log_first_index,
            m.log_last_index
        );
        println!(
            "  elections {} (last {} ms), leader changes {}; commit {:.0}/s, apply {:.0}/s",
            m.elections, m.last_election_ms, m.leader_changes, m.commit_rate, m.apply_rate
        );
        println!(
            "  proposals: {} applied, {} dropped, {} rejected",
            m.proposals_committed, m.proposals_dropped, m.proposals_rejected
        );
        println!(
            "  propose->apply  {}",
            latency_text(m.propose_to_apply.as_ref())
        );
        println!("  ReadIndex       {}", latency_text(m.read_index.as_ref()));
        println!(
            "  Ready handling  {}",
            latency_text(m.ready_handling.as_ref())
        );
        let per_fsync = m
            .log_fsync
            .map_or(0.0, |l| m.log_fsync_entries as f64 / l.count.max(1) as f64);
        println!(
            "  log fsync       {} ; {per_fsync:.1} entries per fsync",
            latency_text(m.log_fsync.as_ref())
        );
        if !m.followers.is_empty() {
            println!(
                "  {:>8} {:>10} {:>8} {:>12} {:>12} {:>12}  STATE",
                "FOLLOWER", "MATCH", "LAG", "REPL AVG ms", "REPL p99 ms", "SNAPSHOTS"
            );
            for f in &m.followers {
                println!(
                    "  {:>8} {:>10} {:>8} {:>12.2} {:>12.2} {:>12}  {}{}",
                    f.node_id,
                    f.match_index,
                    f.lag,
                    f.replication_latency_avg_us as f64 / 1000.0,
                    f.replication_latency.map_or(0, |l| l.p99_us) as f64 / 1000.0,
                    format!("{} ({} failed)", f.snapshots_sent, f.snapshots_failed),
                    if f.recently_active {
                        "active"
                    } else {
                        "INACTIVE"
                    },
                    if f.voter { "" } else { " (learner)" }
                );
            }
        }
        let rates: Vec<f64> = m
            .history
            .windows(2)
            .map(|w| {
                let secs = (w[1].at_unix_ms.saturating_sub(w[0].at_unix_ms)) as f64 / 1000.0;
                if secs > 0.0 {
                    w[1].commit_index.saturating_sub(w[0].commit_index) as f64 / secs
                } else {
                    0.0
                }
            })
            .collect();
        if !rates.is_empty() {
            println!(
                "  commit/s over {} samples ({} ms apart): {}",
                m.history.len(),
                m.collection_interval_ms,
                sparkline(&rates, 60)
            );
        }
        println!();
    }
    Ok(Outcome::Ok)
}

async fn runtime(client: &Client, json: bool) -> anyhow::Result<Outcome> {
    let all = client.runtime_all().await;
    ensure_any_answered(&all)?;
    if json {
        let nodes: Vec<_> = all
            .iter()
            .map(|(addr, r)| match r {
                Ok((policy, stats)) => {
                    let pool = stats.storage_pool.clone().unwrap_or_default();
                    json!({
                        "addr": addr,
                        "pool": {"current": pool.current_threads, "target": pool.target_threads,
                                 "utilisation_percent": pool.utilisation_percent, "queue_len": pool.queue_len,
                                 "events": pool.events.iter().map(|e| json!({"at_unix_ms": e.at_unix_ms,
                                     "from": e.from_threads, "to": e.to_threads, "reason": e.reason})).collect::<Vec<_>>()},
                        "classes": stats.classes.iter().map(|c| json!({"class": c.class, "enqueued": c.enqueued,
                            "served": c.served, "shed": c.shed, "expired": c.expired, "depth": c.depth,
                            "wait_histogram": c.wait_histogram})).collect::<Vec<_>>(),
                        "network_threads": stats.network_threads,
                        "low_runs_at_lower_os_priority": stats.low_runs_at_lower_os_priority,
                        "priority_enabled": policy.priority.as_ref().is_some_and(|p| p.enabled),
                        "scaling_enabled": policy.scaling.as_ref().is_some_and(|s| s.enabled),
                        "scaling": policy.scaling.as_ref().map(|s| json!({"min_storage_threads": s.min_storage_threads,
                            "max_storage_threads": s.max_storage_threads, "scale_up_threshold": s.scale_up_threshold,
                            "scale_down_threshold": s.scale_down_threshold, "scale_increment": s.scale_increment,
                            "evaluation_interval_ms": s.evaluation_interval_ms})),
                    })
                }
                Err(e) => json!({"addr": addr, "error": e.message()}),
            })
            .collect();
        println!("{}", json!({ "nodes": nodes }));
        return Ok(Outcome::Ok);
    }
    for (addr, r) in &all {
        match r {
            Err(e) => println!("{addr}: unreachable: {}", e.message()),
            Ok((policy, stats)) => {
                let pool = stats.storage_pool.clone().unwrap_or_default();
                let sc = policy.scaling.unwrap_or_default();
                let pr = policy.priority.unwrap_or_default();
                println!(
                    "{addr}: storage pool {} threads (target {}, {}-{}, scaling {}), utilisation {:.0}%, {} queued",
                    pool.current_threads,
                    pool.target_threads,
                    sc.min_storage_threads,
                    sc.max_storage_threads,
                    if sc.enabled { "on" } else { "off" },
                    pool.utilisation_percent,
                    pool.queue_len
                );
                println!(
                    "  priority {} (weights high {} / normal {} / low {}), LOW at {} OS priority; network stage {} threads (fixed)",
                    if pr.enabled { "on" } else { "off (FIFO)" },
                    pr.high_priority_weight,
                    pr.normal_priority_weight,
                    pr.low_priority_weight,
                    if stats.low_runs_at_lower_os_priority {
                        "a lower"
                    } else {
                        "the same"
                    },
                    stats.network_threads
                );
                println!(
                    "  {:<9} {:>10} {:>10} {:>8} {:>8} {:>6}",
                    "CLASS", "ENQUEUED", "SERVED", "SHED", "EXPIRED", "DEPTH"
                );
                for c in &stats.classes {
                    println!(
                        "  {:<9} {:>10} {:>10} {:>8} {:>8} {:>6}",
                        c.class, c.enqueued, c.served, c.shed, c.expired, c.depth
                    );
                }
                for e in &pool.events {
                    let at = std::time::UNIX_EPOCH + Duration::from_millis(e.at_unix_ms);
                    println!(
                        "  {} scaled {} -> {}: {}",
                        humantime::format_rfc3339_millis(at),
                        e.from_threads,
                        e.to_threads,
                        e.reason
                    );
                }
            }
        }
    }
    Ok(Outcome::Ok)
}

async fn defrag(client: &Client, only: Option<u64>, json: bool) -> anyhow::Result<Outcome> {
    let mut targets = Vec::new();
    for (addr, r) in client.status_all().await {
        match r {
            Ok(s) if only.is_none_or(|id| id == s.node_id) => targets.push((addr, s.node_id)),
            Ok(_) => {}
            Err(e) if only.is_none() => {
                anyhow::bail!(
                    "{addr} did not answer ({}); nothing was defragmented",
                    e.message()
                )
            }
            Err(_) => {}
        }
    }
    if targets.is_empty() {
        anyhow::bail!(
            "no endpoint is node {}: give its address in --endpoints",
            only.unwrap_or_default()
        );
    }
    let mut out = Vec::new();
    for (addr, id) in targets {
        if !json {
            eprintln!("defragmenting node {id} ({addr}) ...");
        }
        let r = client.defragment(&addr).await?;
        if json {
            out.push(
                json!({"id": id, "addr": addr, "bytes_before": r.bytes_before,
                            "bytes_after": r.bytes_after, "took_ms": r.took_ms}),
            );
        } else {
            println!(
                "node {id} ({addr}): {} -> {} in {:.1} s",
                bytesize::ByteSize(r.bytes_before),
                bytesize::ByteSize(r.bytes_after),
                r.took_ms as f64 / 1000.0
            );
        }
    }
    if json {
        println!("{}", json!({ "nodes": out }));
    }
    Ok(Outcome::Ok)
}

async fn status(client: &Client, json: bool) -> anyhow::Result<Outcome> {
    let all = client.status_all().await;
    let mut members = Vec::new();
    let mut leader = 0;
    let mut progress = Vec::new();
    let mut errors = Vec::new();
    for (addr, r) in &all {
        match r {
            Ok(s) => {
                if s.role == RaftRole::Leader as i32 {
                    leader = s.node_id;
                    progress = s.peers.clone();
                } else if leader == 0 {
                    leader = s.leader_id;
                }
                members.push((addr.clone(), s.clone()));
            }
            Err(e) => errors.push((addr.clone(), e.message().to_string())),
        }
    }
    if members.is_empty() {
        anyhow::bail!(
            "no endpoint answered: {}",
            errors
                .iter()
                .map(|(a, e)| format!("{a}: {e}"))
                .collect::<Vec<_>>()
                .join("; ")
        );
    }
    if json {
        let m: Vec<_> = members
            .iter()
            .map(|(addr, s)| {
                json!({"id": s.node_id, "addr": addr, "role": RaftRole::label(s.role), "term": s.term,
                       "commit_index": s.commit_index, "applied_index": s.applied_index,
                       "log_first_index": s.log_first_index, "backend": s.storage_backend,
                       "rejected_entries": s.rejected_entries, "removed": s.removed,
                       "transferring_to": s.transferring_to, "data_dir_bytes": s.data_dir_bytes,
                       "security": s.security.as_ref().map(|x| json!({"tls": x.tls,
                           "mutual_tls": x.mutual_tls, "tokens": x.tokens,
                           "raft_listen_addr": x.raft_listen_addr}))})
            })
            .collect();
        let p: Vec<_> = progress
            .iter()
            .map(|p| {
                json!({"id": p.node_id, "addr": p.addr, "match_index": p.match_index,
                       "recently_active": p.recently_active, "voter": p.voter})
            })
            .collect();
        let e: Vec<_> = errors
            .iter()
            .map(|(a, e)| json!({"addr": a, "error": e}))
            .collect();
        println!(
            "{}",
            json!({"leader": leader, "cluster_id": format!("{:016x}", members[0].1.cluster_id),
                   "members": m, "progress": p, "unreachable": e})
        );
    } else {
        println!(
            "cluster {:016x}, leader: node {leader}",
            members[0].1.cluster_id
        );
        println!(
            "{:>4}  {:<22} {:<10} {:>6} {:>10} {:>10} {:>10} {:>10}  BACKEND",
            "ID", "ADDR", "ROLE", "TERM", "COMMIT", "APPLIED", "LOG FROM", "DATA"
        );
        for (addr, s) in &members {
            println!(
                "{:>4}  {:<22} {:<10} {:>6} {:>10} {:>10} {:>10} {:>10}  {}",
                s.node_id,
                addr,
                RaftRole::label(s.role),
                s.term,
                s.commit_index,
                s.applied_index,
                s.log_first_index,
                bytesize::ByteSize(s.data_dir_bytes).to_string(),
                s.storage_backend
            );
        }
        for (addr, e) in &errors {
            println!("   ?  {addr:<22} unreachable: {e}");
        }
        println!("security:");
        for (_, s) in &members {
            let Some(x) = &s.security else { continue };
            let on = |b: bool| if b { "on" } else { "off" };
            println!(
                "  node {:>3}  TLS {}, mutual TLS between members {}, tokens {}, Raft {}",
                s.node_id,
                on(x.tls),
                on(x.mutual_tls),
                on(x.tokens),
                if x.raft_listen_addr.is_empty() {
                    "on the client port".to_string()
                } else {
                    format!("on its own port {}", x.raft_listen_addr)
                }
            );
        }
        for (addr, s) in &members {
            if s.transferring_to != 0 {
                println!(
                    "  >  node {} ({addr}) is handing leadership to node {}",
                    s.node_id, s.transferring_to
                );
            }
            if s.removed {
                println!(
                    "  !  node {} ({addr}) was removed from the cluster and serves nothing",
                    s.node_id
                );
            }
            if s.rejected_entries > 0 {
                println!(
                    "  !  node {} ({addr}) applied {} invalid committed entries as no-ops (see its log)",
                    s.node_id, s.rejected_entries
                );
            }
        }
        if !progress.is_empty() {
            println!("replication (as the leader sees it):");
            for p in &progress {
                println!(
                    "  node {:>3} {:<22} match {:>10}  {}{}",
                    p.node_id,
                    p.addr,
                    p.match_index,
                    // The leader keeps no contact record with itself.
                    if p.node_id == leader {
                        "leader"
                    } else if p.recently_active {
                        "active"
                    } else {
                        "INACTIVE"
                    },
                    if p.voter { "" } else { " (learner)" }
                );
            }
        }
    }
    Ok(Outcome::Ok)
}

/// The membership after a change: JSON, or `what` and the voters and learners.
fn print_membership(m: &kiwi_proto::v1::MembershipResponse, what: &str, json: bool) {
    if json {
        println!(
            "{}",
            json!({"voters": m.voters, "learners": m.learners, "index": m.index})
        );
    } else {
        println!("{what}; voters {:?}, learners {:?}", m.voters, m.learners);
    }
}

/// `kiwi member ...`.
async fn member(client: &Client, cmd: MemberCommand, json: bool) -> anyhow::Result<Outcome> {
    match cmd {
        MemberCommand::List => {
            let statuses = client.status_all().await;
            let Some(leader) = statuses
                .iter()
                .filter_map(|(_, s)| s.as_ref().ok())
                .find(|s| s.role == RaftRole::Leader as i32)
            else {
                anyhow::bail!(
                    "no endpoint is the leader: give the leader's address among --endpoints, or retry once one is elected"
                );
            };
            let applied = |id: u64| {
                statuses
                    .iter()
                    .filter_map(|(_, s)| s.as_ref().ok())
                    .find(|s| s.node_id == id)
                    .map(|s| s.applied_index)
            };
            let mut rows = vec![json!({
                "id": leader.node_id,
                "addr": statuses
                    .iter()
                    .find(|(_, s)| s.as_ref().is_ok_and(|s| s.node_id == leader.node_id))
                    .map(|(a, _)| a.clone())
                    .unwrap_or_default(),
                "role": "voter",
                "leader": true,
                "applied_index": leader.applied_index,
                "lag": 0,
                "up": true,
            })];
            // The leader's progress lists the leader too: it is the first row already.
            for p in leader.peers.iter().filter(|p| p.node_id != leader.node_id) {
                rows.push(json!({
                    "id": p.node_id,
                    "addr": p.addr,
                    "role": if p.voter { "voter" } else { "learner" },
                    "leader": false,
                    "applied_index": applied(p.node_id),
                    "lag": leader.commit_index.saturating_sub(p.match_index),
                    "up": p.recently_active,
                }));
            }
            rows.sort_by_key(|r| r["id"].as_u64());
            if json {
                println!("{}", json!({"leader": leader.node_id, "members": rows}));
            } else {
                println!(
                    "{:>4}  {:<22} {:<8} {:>10} {:>6}  state",
                    "id", "addr", "role", "applied", "lag"
                );
                for r in &rows {
                    println!(
                        "{:>4}  {:<22} {:<8} {:>10} {:>6}  {}{}",
                        r["id"],
                        r["addr"].as_str().unwrap_or(""),
                        r["role"].as_str().unwrap_or(""),
                        r["applied_index"]
                            .as_u64()
                            .map_or("?".to_string(), |a| a.to_string()),
                        r["lag"],
                        if r["up"] == true { "up" } else { "down" },
                        if r["leader"] == true { ", leader" } else { "" },
                    );
                }
            }
            Ok(Outcome::Ok)
        }
        MemberCommand::Promote { id } => {
            let m = client.promote_member(id).await?;
            print_membership(&m, &format!("node {id} promoted"), json);
            Ok(Outcome::Ok)
        }
        MemberCommand::Add {
            id,
            addr,
            raft_addr,
            learner,
        } => {
            let raft = raft_addr.clone().unwrap_or_default();
            let m = client.add_member(id, &addr, &raft, learner).await?;
            let what = if learner {
                "added as a learner"
            } else {
                "added"
            };
            print_membership(&m, &format!("node {id} {what}"), json);
            if !json {
                println!("its config needs (before it starts):");
                println!("  [raft]\n  node_id = {id}\n  join = true");
                println!("  listen_addr = \"{addr}\"");
                if let Some(r) = &raft_addr {
                    println!("  raft_listen_addr = \"{r}\"");
                }
            }
            Ok(Outcome::Ok)
        }
        MemberCommand::Remove { id, yes } => {
            let leader = client
                .status_all()
                .await
                .into_iter()
                .filter_map(|(_, s)| s.ok())
                .find(|s| s.role == RaftRole::Leader as i32)
                .map(|s| s.node_id);
            if leader == Some(id) {
                if !yes {
                    anyhow::bail!(
                        "node {id} leads: run `kiwi leader transfer` first, or add --yes to hand leadership to the most caught-up voter and then remove it"
                    );
                }
                let (to, term) = client.transfer_leader(None).await?;
                eprintln!("leadership handed to node {to} (term {term})");
            }
            let m = client.remove_member(id).await?;
            print_membership(&m, &format!("node {id} removed"), json);
            Ok(Outcome::Ok)
        }
    }
}
