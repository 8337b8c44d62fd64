//! `kiwi control ...`: the control plane's live cluster view and event log.

use std::time::Duration;

use clap::{Args, Subcommand};
use kiwi_proto::v1::{ClusterStatusRequest, Event, EventsRequest, HistoryRequest};
use serde_json::json;

use crate::Outcome;
use kiwi_proto::v1::RaftRole;

pub use kiwi_client::control::DEFAULT_CONTROL;
use kiwi_client::control::{ControlClient, ControlTarget, connect as client, now_unix_ms};

#[derive(Debug, Args)]
pub struct ControlArgs {
    /// The control plane's address (host:port).
    #[arg(long, env = "KIWI_CONTROL", default_value = DEFAULT_CONTROL)]
    control: String,
    /// Token of an admin principal, for a control plane with `[security] tokens_file`.
    #[arg(long, env = "KIWI_CONTROL_TOKEN", hide_env_values = true)]
    control_token: Option<String>,
    #[command(subcommand)]
    command: ControlCommand,
}

#[derive(Debug, Subcommand)]
enum ControlCommand {
    /// Every node as the control plane sees it: up or down, role, term, commit/applied index, lag and
    /// replication latency (on the leader), storage pool, shed requests, last heartbeat.
    Status,
    /// The status, refreshed in place every --interval (like `top`).
    Watch {
        /// Time between refreshes.
        #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
        interval: Duration,
        /// Stop after this many refreshes (default: until Ctrl-C).
        #[arg(long)]
        count: Option<u64>,
    },
    /// The event log (nodes registered, up, down, refused; leader changes), oldest first.
    Events {
        /// Only events after this sequence number.
        #[arg(long, default_value_t = 0)]
        after: u64,
        /// Keep printing new events as they happen (Ctrl-C stops).
        #[arg(long)]
        follow: bool,
    },
    /// Every node's recent figures as the control plane keeps them: one sample per heartbeat, for its
    /// `[metrics] retention_sec` (default 5 min). Columns: time, role, term, commit index, commits/s,
    /// pool threads and utilisation, queued requests, shed so far, the leader's worst follower lag.
    History {
        /// Only this node (default: every node).
        #[arg(long)]
        node: Option<u64>,
        /// Only the last DURATION, e.g. 30s or 5m (default: all that is kept).
        #[arg(long, value_parser = humantime::parse_duration)]
        last: Option<Duration>,
    },
    /// Fault injection on nodes with `[raft.fault_injection] enabled = true` (test clusters): schedule
    /// a network delay, partition, message loss, crash or disk stall; list schedules; cancel one. Every
    /// fault ends at its duration, enforced by the node itself.
    Fault {
        #[command(subcommand)]
        command: FaultCommand,
    },
    /// Run a fault plan (TOML; see `kiwi chaos --help`), step by step at its offsets, without a workload.
    Chaos {
        #[command(subcommand)]
        command: ChaosCommand,
    },
    /// Measure the control plane: policy push latency (`push`), or many simulated nodes heartbeating to
    /// it (`fleet`).
    Bench {
        #[command(subcommand)]
        command: crate::control_bench::BenchCommand,
    },
    /// The runtime policy the control plane pushes to every node: `get`, or `set` (applied by every
    /// connected node at once, and by the others when they connect; each node acknowledges the version).
    Policy {
        #[command(subcommand)]
        command: PolicyCommand,
    },
}

#[derive(Debug, Args)]
struct When {
    /// How long the fault lasts (the node ends it by itself), e.g. 10s.
    #[arg(long, value_parser = humantime::parse_duration)]
    duration: Duration,
    /// Start after this long (default: now), e.g. 5s.
    #[arg(long, value_parser = humantime::parse_duration)]
    after: Option<Duration>,
}

#[derive(Debug, Subcommand)]
enum ChaosCommand {
    /// Run the plan in FILE.
    Run { plan: std::path::PathBuf },
}

#[derive(Debug, Subcommand)]
enum FaultCommand {
    /// Delay every outgoing Raft batch of --nodes (to --peers, default all) by --delay plus 0..--jitter.
    Delay {
        #[arg(long, value_delimiter = ',', required = true)]
        nodes: Vec<u64>,
        #[arg(long, value_parser = humantime::parse_duration)]
        delay: Duration,
        #[arg(long, value_parser = humantime::parse_duration, default_value = "0s")]
        jitter: Duration,
        #[arg(long, value_delimiter = ',')]
        peers: Vec<u64>,
        #[command(flatten)]
        when: When,
    },
    /// Cut the --isolate nodes off from the others (Raft traffic both ways; every node works out its side).
    Partition {
        #[arg(long, value_delimiter = ',', required = true)]
        isolate: Vec<u64>,
        #[command(flatten)]
        when: When,
    },
    /// Drop each Raft message of --nodes (with --peers, default all), both ways, with probability --rate.
    Loss {
        #[arg(long, value_delimiter = ',', required = true)]
        nodes: Vec<u64>,
        /// 0 < rate <= 1, e.g. 0.3.
        #[arg(long)]
        rate: f64,
        #[arg(long, value_delimiter = ',')]
        peers: Vec<u64>,
        #[command(flatten)]
        when: When,
    },
    /// Kill --nodes at once, as a power cut would (the playground's --restart-crashed or `kiwi playground
    /// restart N` brings them back).
    Crash {
        #[arg(long, value_delimiter = ',', required = true)]
        nodes: Vec<u64>,
        /// Start after this long (default: now).
        #[arg(long, value_parser = humantime::parse_duration)]
        after: Option<Duration>,
    },
    /// Make every storage write and fsync of --nodes take --delay longer.
    Stall {
        #[arg(long, value_delimiter = ',', required = true)]
        nodes: Vec<u64>,
        #[arg(long, value_parser = humantime::parse_duration)]
        delay: Duration,
        #[command(flatten)]
        when: When,
    },
    /// Every fault scheduled, with each node's state.
    List,
    /// Cancel a pending or active fault.
    Cancel { id: u64 },
}

#[derive(Debug, Subcommand)]
enum PolicyCommand {
    /// Print the version, the cluster-wide policy and every per-node override.
    Get,
    /// Change the policy: start from the current one (the node's override with --node) or the defaults,
    /// change what the flags say, and push it.
    Set(PolicySetArgs),
}

#[derive(Debug, Args)]
struct PolicySetArgs {
    /// Set an override for this node only (0 or absent: the cluster-wide policy).
    #[arg(long, default_value_t = 0)]
    node: u64,
    /// With --node: remove that node's override (it goes back to the cluster-wide policy).
    #[arg(long, requires = "node")]
    clear: bool,
    /// Storage pool scaling: on or off.
    #[arg(long, value_parser = ["on", "off"])]
    set_scaling: Option<String>,
    /// Storage pool bounds, MIN-MAX threads (e.g. 4-32).
    #[arg(long, value_parser = crate::parse_bounds)]
    set_storage_threads: Option<(u32, u32)>,
    /// Priority scheduling: on, or off (one FIFO queue).
    #[arg(long, value_parser = ["on", "off"])]
    set_priority: Option<String>,
    /// HIGH,NORMAL,LOW weights (each 1-1000), e.g. 3,2,1.
    #[arg(long, value_delimiter = ',', num_args = 3)]
    set_weights: Option<Vec<u32>>,
}

fn ago(unix_ms: u64) -> String {
    let now = now_unix_ms();
    if unix_ms == 0 {
        return "never".into();
    }
    format!("{:.1}s ago", now.saturating_sub(unix_ms) as f64 / 1000.0)
}

pub async fn run(args: ControlArgs, json: bool, conn: &crate::Conn) -> anyhow::Result<Outcome> {
    let target = ControlTarget {
        addr: args.control.clone(),
        token: args.control_token.clone(),
        tls: conn.tls.clone(),
    };
    let mut c = client(&target).await?;
    match args.command {
        ControlCommand::Status => {
            print_status(&mut c, &args.control, json).await?;
            Ok(Outcome::Ok)
        }
        ControlCommand::Watch { interval, count } => {
            let tty = std::io::IsTerminal::is_terminal(&std::io::stdout());
            let mut shown = 0u64;
            loop {
                if tty {
                    // Clear the screen and go home, like `top`.
                    print!("\x1b[2J\x1b[H");
                }
                println!(
                    "kiwi control watch: {} every {:?} (Ctrl-C stops)\n",
                    args.control, interval
                );
                print_status(&mut c, &args.control, json).await?;
                shown += 1;
                if count.is_some_and(|n| shown >= n) {
                    return Ok(Outcome::Ok);
                }
                tokio::time::sleep(interval).await;
            }
        }
        ControlCommand::Policy { command } => policy(&mut c, command, json).await,
        ControlCommand::Fault { command } => fault(&mut c, command, json).await,
        ControlCommand::Chaos {
            command: ChaosCommand::Run { plan },
        } => {
            crate::chaos::run_plan_only(&target, &plan).await?;
            Ok(Outcome::Ok)
        }
        ControlCommand::Bench { command } => {
            crate::control_bench::run(
                &mut c,
                &args.control,
                args.control_token.as_deref(),
                command,
            )
            .await?;
            Ok(Outcome::Ok)
        }
        ControlCommand::History { node, last } => {
            let since_unix_ms = last.map_or(0, |d| {
                now_unix_ms().saturating_sub(u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
            });
            let r = c
                .history(HistoryRequest {
                    node_id: node.unwrap_or(0),
                    since_unix_ms,
                })
                .await?
                .into_inner();
            for n in &r.nodes {
                if !json {
                    println!(
                        "node {} ({} samples)\n{:>10}  {:<9} {:>5} {:>9} {:>9} {:>7} {:>6} {:>6} {:>7} {:>8}",
                        n.node_id,
                        n.samples.len(),
                        "when",
                        "role",
                        "term",
                        "commit",
                        "commit/s",
                        "threads",
                        "util%",
                        "queued",
                        "shed",
                        "max lag"
                    );
                }
                for h in &n.samples {
                    if json {
                        println!(
                            "{}",
                            json!({"node": n.node_id, "at_unix_ms": h.at_unix_ms, "role": RaftRole::label(h.role),
                                   "term": h.term, "commit_index": h.commit_index, "applied_index": h.applied_index,
                                   "commit_rate": h.commit_rate, "apply_rate": h.apply_rate,
                                   "pool_threads": h.pool_threads, "utilisation_percent": h.utilisation_percent,
                                   "queue_depth": h.queue_depth, "shed": h.shed, "expired": h.expired,
                                   "max_follower_lag": h.max_follower_lag,
                                   "max_replication_latency_avg_us": h.max_replication_latency_avg_us})
                        );
                    } else {
                        println!(
                            "{:>10}  {:<9} {:>5} {:>9} {:>9.1} {:>7} {:>6.1} {:>6} {:>7} {:>8}",
                            ago(h.at_unix_ms),
                            RaftRole::label(h.role),
                            h.term,
                            h.commit_index,
                            h.commit_rate,
                            h.pool_threads,
                            h.utilisation_percent,
                            h.queue_depth,
                            h.shed,
                            h.max_follower_lag
                        );
                    }
                }
            }
            Ok(Outcome::Ok)
        }
        ControlCommand::Events { after, follow } => {
            let mut cursor = after;
            loop {
                let r = c
                    .events(EventsRequest {
                        after_seq: cursor,
                        limit: 1000,
                    })
                    .await?
                    .into_inner();
                for e in &r.events {
                    print_event(e, json);
                }
                cursor = r.next_after_seq;
                if !follow {
                    return Ok(Outcome::Ok);
                }
                if r.events.is_empty() {
                    tokio::time::sleep(Duration::from_millis(250)).await;
                }
            }
        }
    }
}

fn print_event(e: &Event, json: bool) {
    if json {
        println!(
            "{}",
            json!({"seq": e.seq, "at_unix_ms": e.at_unix_ms, "kind": e.kind, "node": e.node_id, "detail": e.detail})
        );
    } else {
        println!(
            "{:>6}  {:<14}  node {:<3}  {}",
            e.seq, e.kind, e.node_id, e.detail
        );
    }
}

fn policy_json(p: Option<&kiwi_proto::v1::RuntimePolicy>) -> serde_json::Value {
    let Some(p) = p else {
        return serde_json::Value::Null;
    };
    let s = p.scaling.unwrap_or_default();
    let q = p.priority.unwrap_or_default();
    json!({"scaling": {"enabled": s.enabled, "min_storage_threads": s.min_storage_threads,
                       "max_storage_threads": s.max_storage_threads, "scale_up_threshold": s.scale_up_threshold,
                       "scale_down_threshold": s.scale_down_threshold, "scale_increment": s.scale_increment,
                       "evaluation_interval_ms": s.evaluation_interval_ms},
           "priority": {"enabled": q.enabled, "high_priority_weight": q.high_priority_weight,
                        "normal_priority_weight": q.normal_priority_weight,
                        "low_priority_weight": q.low_priority_weight}})
}

fn policy_text(p: Option<&kiwi_proto::v1::RuntimePolicy>) -> String {
    let Some(p) = p else {
        return "none (nodes run their config files' policy)".into();
    };
    let s = p.scaling.unwrap_or_default();
    let q = p.priority.unwrap_or_default();
    format!(
        "scaling {} {}-{} threads (up > {}%, down < {}%, +/-{}, every {} ms); priority {} weights {}/{}/{}",
        if s.enabled { "on" } else { "off" },
        s.min_storage_threads,
        s.max_storage_threads,
        s.scale_up_threshold,
        s.scale_down_threshold,
        s.scale_increment,
        s.evaluation_interval_ms,
        if q.enabled { "on" } else { "off" },
        q.high_priority_weight,
        q.normal_priority_weight,
        q.low_priority_weight
    )
}

fn print_policy(p: &kiwi_proto::v1::ClusterPolicy, json: bool) {
    if json {
        let overrides: Vec<_> = p
            .overrides
            .iter()
            .map(|o| json!({"node": o.node_id, "policy": policy_json(o.policy.as_ref())}))
            .collect();
        println!(
            "{}",
            json!({"version": p.version, "policy": policy_json(p.policy.as_ref()), "overrides": overrides})
        );
        return;
    }
    println!("version {}", p.version);
    println!("cluster: {}", policy_text(p.policy.as_ref()));
    for o in &p.overrides {
        println!("node {}: {}", o.node_id, policy_text(o.policy.as_ref()));
    }
}

async fn policy(
    c: &mut ControlClient,
    command: PolicyCommand,
    json: bool,
) -> anyhow::Result<Outcome> {
    use kiwi_proto::v1::{GetPolicyRequest, SetPolicyRequest};
    let current = c.get_policy(GetPolicyRequest {}).await?.into_inner();
    let args = match command {
        PolicyCommand::Get => {
            print_policy(&current, json);
            return Ok(Outcome::Ok);
        }
        PolicyCommand::Set(a) => a,
    };
    let base = current
        .overrides
        .iter()
        .find(|o| args.node != 0 && o.node_id == args.node)
        .and_then(|o| o.policy)
        .or(current.policy)
        .unwrap_or_else(kiwi_proto::policy::default_policy);
    let mut p = base;
    if let Some(s) = p.scaling.as_mut() {
        if let Some(v) = &args.set_scaling {
            s.enabled = v == "on";
        }
        if let Some((lo, hi)) = args.set_storage_threads {
            s.min_storage_threads = lo;
            s.max_storage_threads = hi;
        }
    }
    if let Some(q) = p.priority.as_mut() {
        if let Some(v) = &args.set_priority {
            q.enabled = v == "on";
        }
        if let Some(w) = &args.set_weights {
            (
                q.high_priority_weight,
                q.normal_priority_weight,
                q.low_priority_weight,
            ) = (w[0], w[1], w[2]);
        }
    }
    let set = c
        .set_policy(SetPolicyRequest {
            policy: Some(p),
            node_id: args.node,
            clear_override: args.clear,
        })
        .await
        .map_err(|s| anyhow::anyhow!("{}", s.message()))?
        .into_inner();
    print_policy(&set, json);
    Ok(Outcome::Ok)
}

/// Prints the cluster view once (a table, or one JSON object).
async fn print_status(c: &mut ControlClient, control: &str, json: bool) -> anyhow::Result<()> {
    let args_control = control;
    let s = c
        .cluster_status(ClusterStatusRequest {})
        .await?
        .into_inner();
    if json {
        let nodes: Vec<_> = s
                    .nodes
                    .iter()
                    .map(|n| {
                        let m = n.metrics.clone().unwrap_or_default();
                        json!({"id": n.node_id, "addr": n.client_addr, "up": n.up,
                               "last_seen_unix_ms": n.last_seen_unix_ms, "role": RaftRole::label(m.role),
                               "term": m.term, "commit_index": m.commit_index, "applied_index": m.applied_index,
                               "backend": n.backend, "version": n.version,
                               "followers": m.followers.iter().map(|f| json!({"id": f.node_id, "lag": f.lag,
                                   "match_index": f.match_index,
                                   "replication_latency_p99_us": f.replication_latency.as_ref().map_or(0, |l| l.p99_us)}))
                                   .collect::<Vec<_>>(),
                               "storage_threads": m.storage_pool.as_ref().map_or(0, |p| p.current_threads),
                               "policy_version": n.policy_version, "policy_error": n.policy_error,
                               "shed": m.classes.iter().map(|c| c.shed).sum::<u64>()})
                    })
                    .collect();
        println!(
            "{}",
            json!({"cluster_id": format!("{:016x}", s.cluster_id), "leader": s.leader_id,
                           "leader_changes": s.leader_changes, "slowest_follower": s.slowest_follower,
                           "commit_rate": s.commit_rate, "apply_rate": s.apply_rate, "nodes": nodes})
        );
        return Ok(());
    }
    if s.nodes.is_empty() {
        println!(
            "no node has registered with the control plane at {}",
            args_control
        );
        return Ok(());
    }
    println!(
        "cluster {:016x}  leader {}  leader changes {}  commit {:.0}/s  apply {:.0}/s",
        s.cluster_id,
        if s.leader_id == 0 {
            "none".to_string()
        } else {
            s.leader_id.to_string()
        },
        s.leader_changes,
        s.commit_rate,
        s.apply_rate
    );
    println!(
        "{:<5} {:<22} {:<5} {:<10} {:>5} {:>9} {:>9} {:>7} {:>6} {:>6} {:<12}",
        "node",
        "address",
        "up",
        "role",
        "term",
        "commit",
        "applied",
        "threads",
        "shed",
        "policy",
        "last seen"
    );
    for n in &s.nodes {
        let m = n.metrics.clone().unwrap_or_default();
        println!(
            "{:<5} {:<22} {:<5} {:<10} {:>5} {:>9} {:>9} {:>7} {:>6} {:>6} {:<12}",
            n.node_id,
            n.client_addr,
            if n.up { "up" } else { "DOWN" },
            RaftRole::label(m.role),
            m.term,
            m.commit_index,
            m.applied_index,
            m.storage_pool.as_ref().map_or(0, |p| p.current_threads),
            m.classes.iter().map(|c| c.shed).sum::<u64>(),
            n.policy_version,
            ago(n.last_seen_unix_ms)
        );
        if !n.policy_error.is_empty() {
            println!("      policy refused: {}", n.policy_error);
        }
    }
    if let Some(leader) = s.nodes.iter().find(|n| n.node_id == s.leader_id) {
        let m = leader.metrics.clone().unwrap_or_default();
        if !m.followers.is_empty() {
            println!("\nreplication from the leader (node {}):", leader.node_id);
            for f in &m.followers {
                println!(
                    "  node {:<3} lag {:>6} entries  latency avg {:>7} us  p99 {:>7} us",
                    f.node_id,
                    f.lag,
                    f.replication_latency_avg_us,
                    f.replication_latency.as_ref().map_or(0, |l| l.p99_us)
                );
            }
        }
    }
    Ok(())
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

fn print_fault(f: &kiwi_proto::v1::FaultSchedule, json: bool) {
    use kiwi_proto::v1::fault_spec::Kind;
    let spec = f.spec.clone().unwrap_or_default();
    let what = match &spec.kind {
        Some(Kind::Delay(d)) => format!("delay {} ms +0..{} ms", d.delay_ms, d.jitter_ms),
        Some(Kind::Partition(p)) => format!("partition isolating {:?}", p.isolated_nodes),
        Some(Kind::Loss(l)) => format!("loss {:.0}%", l.drop_rate * 100.0),
        Some(Kind::Crash(_)) => "crash".into(),
        Some(Kind::DiskStall(d)) => format!("disk stall {} ms", d.delay_ms),
        None => "?".into(),
    };
    if json {
        let nodes: Vec<_> = f
            .nodes
            .iter()
            .map(|n| json!({"node": n.node_id, "state": n.state, "detail": n.detail,
                            "messages_delayed": n.messages_delayed, "messages_dropped": n.messages_dropped}))
            .collect();
        println!(
            "{}",
            json!({"id": f.id, "fault": what, "peers": spec.peers, "targets": f.targets,
                   "start_at_unix_ms": f.start_at_unix_ms, "duration_ms": f.duration_ms,
                   "state": f.state, "nodes": nodes})
        );
        return;
    }
    println!(
        "fault {}  {}  {what}{}  for {} ms, starts {}",
        f.id,
        f.state,
        if spec.peers.is_empty() {
            String::new()
        } else {
            format!(" (peers {:?})", spec.peers)
        },
        f.duration_ms,
        ago(f.start_at_unix_ms)
    );
    for n in &f.nodes {
        println!(
            "    node {:<3} {:<11} delayed {:<6} dropped {:<6} {}",
            n.node_id, n.state, n.messages_delayed, n.messages_dropped, n.detail
        );
    }
}

async fn fault(
    c: &mut ControlClient,
    command: FaultCommand,
    json: bool,
) -> anyhow::Result<Outcome> {
    use kiwi_proto::v1::fault_spec::Kind;
    use kiwi_proto::v1::{
        CancelFaultRequest, DiskStall, FaultSpec, ListFaultsRequest, MessageLoss, NetworkDelay,
        NetworkPartition, NodeCrash, ScheduleFaultRequest,
    };
    let schedule = |kind: Kind,
                    peers: Vec<u64>,
                    targets: Vec<u64>,
                    after: Option<Duration>,
                    duration: Duration| {
        ScheduleFaultRequest {
            spec: Some(FaultSpec {
                kind: Some(kind),
                peers,
            }),
            targets,
            start_after_ms: after.map_or(0, millis),
            duration_ms: millis(duration),
        }
    };
    let req = match command {
        FaultCommand::List => {
            for f in c
                .list_faults(ListFaultsRequest {})
                .await?
                .into_inner()
                .faults
            {
                print_fault(&f, json);
            }
            return Ok(Outcome::Ok);
        }
        FaultCommand::Cancel { id } => {
            let f = c
                .cancel_fault(CancelFaultRequest { id })
                .await?
                .into_inner();
            print_fault(&f, json);
            return Ok(Outcome::Ok);
        }
        FaultCommand::Delay {
            nodes,
            delay,
            jitter,
            peers,
            when,
        } => schedule(
            Kind::Delay(NetworkDelay {
                delay_ms: millis(delay),
                jitter_ms: millis(jitter),
            }),
            peers,
            nodes,
            when.after,
            when.duration,
        ),
        FaultCommand::Partition { isolate, when } => schedule(
            Kind::Partition(NetworkPartition {
                isolated_nodes: isolate,
            }),
            Vec::new(),
            Vec::new(),
            when.after,
            when.duration,
        ),
        FaultCommand::Loss {
            nodes,
            rate,
            peers,
            when,
        } => schedule(
            Kind::Loss(MessageLoss { drop_rate: rate }),
            peers,
            nodes,
            when.after,
            when.duration,
        ),
        FaultCommand::Crash { nodes, after } => schedule(
            Kind::Crash(NodeCrash {}),
            Vec::new(),
            nodes,
            after,
            Duration::from_secs(1),
        ),
        FaultCommand::Stall { nodes, delay, when } => schedule(
            Kind::DiskStall(DiskStall {
                delay_ms: millis(delay),
            }),
            Vec::new(),
            nodes,
            when.after,
            when.duration,
        ),
    };
    let f = c.schedule_fault(req).await?.into_inner();
    print_fault(&f, json);
    Ok(Outcome::Ok)
}
