//! `kiwi control bench ...`: measurements of the control plane itself.
//!
//! - `push`: how fast a policy reaches the nodes. Each repetition sets the cluster-wide policy (the
//!   storage pool's maximum alternates, so every push changes something), then polls the cluster status
//!   without pause until every up node shows the new version as acknowledged. Prints the `SetPolicy` call
//!   time and the time from its return to the last acknowledgement (p50 / p99 / max).
//! - `fleet`: one control plane fed by many simulated nodes. Each simulated node opens its own
//!   connection and `NodeLink` stream, registers, heartbeats every `--interval` with a realistic
//!   metrics snapshot (node 1 reports itself leader with every other node as a follower), and answers
//!   policy pushes. Meanwhile the operator's `ClusterStatus` is called every 100 ms and timed. With
//!   `--control-pid`, the control plane's CPU (from `/proc/<pid>/stat`) and memory (`VmRSS`, `VmHWM`)
//!   are reported too.
//!
//! Both print a summary and one JSON line on stdout.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Subcommand;
use hdrhistogram::Histogram;
use kiwi_proto::v1::node_link_client::NodeLinkClient;
use kiwi_proto::v1::node_message::Msg;
use kiwi_proto::v1::{
    ClusterStatusRequest, FollowerMetrics, GetPolicyRequest, Heartbeat, LatencySummary,
    NodeMessage, NodeMetrics, PolicyAck, PoolStats, PriorityClassStats, RaftRole, Register,
    SetPolicyRequest, control_message,
};
use serde_json::json;
use tonic::transport::Endpoint;

#[derive(Debug, Subcommand)]
pub enum BenchCommand {
    /// Policy push latency: set the policy, wait for every up node's acknowledgement, REPETITIONS times.
    Push {
        #[arg(long, default_value_t = 100)]
        repetitions: u32,
    },
    /// Many simulated nodes heartbeating to one control plane: its CPU, memory and status latency.
    Fleet {
        /// Simulated nodes.
        #[arg(long, default_value_t = 200)]
        nodes: u64,
        /// Heartbeat interval of every simulated node.
        #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
        interval: Duration,
        /// How long to measure (after every node registered).
        #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
        duration: Duration,
        /// The control plane's process id, to read its CPU and memory from /proc.
        #[arg(long)]
        control_pid: Option<u32>,
        /// The cluster id the simulated nodes claim (the control plane must serve it or none yet).
        #[arg(long, default_value_t = 0xb0b)]
        cluster_id: u64,
    },
}

fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 60_000_000, 3).expect("valid histogram bounds")
}

fn ms(us: u64) -> f64 {
    us as f64 / 1000.0
}

fn summary(h: &Histogram<u64>) -> serde_json::Value {
    json!({"count": h.len(), "p50_ms": ms(h.value_at_quantile(0.5)), "p99_ms": ms(h.value_at_quantile(0.99)),
           "max_ms": ms(h.max())})
}

fn line(name: &str, h: &Histogram<u64>) -> String {
    format!(
        "{name}: p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms ({} samples)",
        ms(h.value_at_quantile(0.5)),
        ms(h.value_at_quantile(0.99)),
        ms(h.max()),
        h.len()
    )
}

fn record(h: &mut Histogram<u64>, d: Duration) {
    let _ = h.record(u64::try_from(d.as_micros()).unwrap_or(u64::MAX).max(1));
}

pub async fn run(
    c: &mut kiwi_client::control::ControlClient,
    addr: &str,
    token: Option<&str>,
    command: BenchCommand,
) -> anyhow::Result<()> {
    match command {
        BenchCommand::Push { repetitions } => push(c, repetitions).await,
        BenchCommand::Fleet {
            nodes,
            interval,
            duration,
            control_pid,
            cluster_id,
        } => {
            let f = FleetArgs {
                nodes,
                interval,
                duration,
                control_pid,
                cluster_id,
                token: token.map(str::to_owned),
            };
            fleet(c, addr, f).await
        }
    }
}

async fn push(c: &mut kiwi_client::control::ControlClient, repetitions: u32) -> anyhow::Result<()> {
    let status = c
        .cluster_status(ClusterStatusRequest {})
        .await?
        .into_inner();
    let up = status.nodes.iter().filter(|n| n.up).count();
    if up == 0 {
        bail!("no node is up at this control plane: start a cluster linked to it first");
    }
    let current = c.get_policy(GetPolicyRequest {}).await?.into_inner();
    let base = current
        .policy
        .unwrap_or_else(kiwi_proto::policy::default_policy);
    eprintln!("pushing {repetitions} policies to {up} nodes ...");
    let mut set_time = histogram();
    let mut ack_time = histogram();
    for i in 0..repetitions {
        let mut p = base;
        if let Some(s) = p.scaling.as_mut() {
            // Alternate the maximum so that every push changes the pool.
            s.max_storage_threads = s.min_storage_threads.max(1) + 1 + (i % 2);
        }
        let started = Instant::now();
        let set = c
            .set_policy(SetPolicyRequest {
                policy: Some(p),
                node_id: 0,
                clear_override: false,
            })
            .await?
            .into_inner();
        let returned = Instant::now();
        record(&mut set_time, returned - started);
        let deadline = returned + Duration::from_secs(10);
        loop {
            let s = c
                .cluster_status(ClusterStatusRequest {})
                .await?
                .into_inner();
            let ups: Vec<_> = s.nodes.iter().filter(|n| n.up).collect();
            if let Some(refused) = ups.iter().find(|n| !n.policy_error.is_empty()) {
                bail!(
                    "node {} refused version {}: {}",
                    refused.node_id,
                    set.version,
                    refused.policy_error
                );
            }
            if ups.len() >= up && ups.iter().all(|n| n.policy_version >= set.version) {
                break;
            }
            if Instant::now() > deadline {
                bail!(
                    "version {} not acknowledged by every node within 10 s",
                    set.version
                );
            }
        }
        record(&mut ack_time, returned.elapsed());
    }
    println!("{}", line("SetPolicy call", &set_time));
    println!(
        "{}",
        line(
            "from SetPolicy returning to the last acknowledgement",
            &ack_time
        )
    );
    println!(
        "{}",
        json!({"bench": "control_push", "nodes": up, "repetitions": repetitions,
               "set_policy": summary(&set_time), "push_to_last_ack": summary(&ack_time)})
    );
    Ok(())
}

/// A heartbeat's metrics as a node of a cluster of `nodes` would send them.
fn metrics(id: u64, nodes: u64, beat: u64) -> NodeMetrics {
    let leader = id == 1;
    let commit = 1000 + beat * 50;
    let latency = LatencySummary {
        count: beat * 50,
        p50_us: 800,
        p99_us: 2500,
        max_us: 9000,
        mean_us: 900,
    };
    NodeMetrics {
        role: if leader {
            RaftRole::Leader
        } else {
            RaftRole::Follower
        } as i32,
        term: 3,
        leader_id: 1,
        commit_index: commit,
        applied_index: commit,
        first_index: 900,
        last_index: commit,
        followers: if leader {
            (2..=nodes)
                .map(|f| FollowerMetrics {
                    node_id: f,
                    match_index: commit - f % 5,
                    lag: f % 5,
                    recently_active: true,
                    voter: true,
                    replication_latency_avg_us: 900 + f,
                    replication_latency: Some(latency),
                    ..FollowerMetrics::default()
                })
                .collect()
        } else {
            Vec::new()
        },
        commit_rate: 50.0,
        apply_rate: 50.0,
        storage_pool: Some(PoolStats {
            current_threads: 4,
            target_threads: 4,
            utilisation_percent: 35.0,
            queue_len: 2,
            events: Vec::new(),
        }),
        classes: ["critical", "high", "normal", "low"]
            .into_iter()
            .map(|class| PriorityClassStats {
                class: class.into(),
                enqueued: beat * 10,
                served: beat * 10,
                wait_histogram: vec![beat * 9, beat, 0, 0, 0],
                ..PriorityClassStats::default()
            })
            .collect(),
        data_dir_bytes: 64 << 20,
        rejected_entries: 0,
        ..NodeMetrics::default()
    }
}

/// One simulated node: registers, heartbeats every `interval` until `stop`, acknowledges policies.
/// What every simulated node shares.
#[derive(Clone)]
struct Fleet {
    addr: String,
    nodes: u64,
    cluster_id: u64,
    interval: Duration,
    registered: Arc<AtomicU64>,
    beats: Arc<AtomicU64>,
    stop: tokio_util::sync::CancellationToken,
    token: Option<String>,
}

async fn simulated_node(fleet: Fleet, id: u64) -> anyhow::Result<()> {
    let Fleet {
        addr,
        nodes,
        cluster_id,
        interval,
        registered,
        beats,
        stop,
        token,
    } = fleet;
    let channel = Endpoint::from_shared(format!("http://{addr}"))?
        .connect_timeout(Duration::from_secs(5))
        .connect()
        .await
        .with_context(|| format!("simulated node {id} cannot reach {addr}"))?;
    let mut client = NodeLinkClient::new(channel);
    let (tx, rx) = tokio::sync::mpsc::channel::<NodeMessage>(16);
    tx.send(NodeMessage {
        msg: Some(Msg::Register(Register {
            node_id: id,
            cluster_id,
            client_addr: format!("127.0.0.{}:{}", 1 + id / 60_000, 10_000 + id % 60_000),
            backend: "memory".into(),
            version: "simulated".into(),
            started_at_unix_ms: kiwi_client::control::now_unix_ms(),
            heartbeat_interval_ms: u64::try_from(interval.as_millis()).unwrap_or(1000),
            fault_injection_enabled: false,
            fault_max_duration_ms: 0,
        })),
    })
    .await?;
    let mut inbound = client
        .link({
            let mut r = tonic::Request::new(tokio_stream::wrappers::ReceiverStream::new(rx));
            if let Some(t) = &token {
                r.metadata_mut()
                    .insert("authorization", format!("Bearer {t}").parse()?);
            }
            r
        })
        .await
        .with_context(|| format!("simulated node {id} refused"))?
        .into_inner();
    let mut policy_version = 0;
    let mut tick = tokio::time::interval(interval);
    // Spread the fleet's heartbeats over the interval, as independent nodes would be.
    tokio::time::sleep(interval.mul_f64((id % 1000) as f64 / 1000.0)).await;
    let mut beat = 0u64;
    loop {
        tokio::select! {
            () = stop.cancelled() => return Ok(()),
            _ = tick.tick() => {
                beat += 1;
                let mut m = metrics(id, nodes, beat);
                m.policy_version = policy_version;
                tx.send(NodeMessage { msg: Some(Msg::Heartbeat(Heartbeat { metrics: Some(m) })) }).await?;
                beats.fetch_add(1, Ordering::Relaxed);
            }
            m = inbound.message() => match m? {
                None => bail!("the control plane closed simulated node {id}'s stream"),
                Some(m) => match m.msg {
                    Some(control_message::Msg::Registered(_)) => {
                        registered.fetch_add(1, Ordering::Relaxed);
                    }
                    Some(control_message::Msg::Policy(p)) => {
                        policy_version = p.version;
                        tx.send(NodeMessage { msg: Some(Msg::PolicyAck(PolicyAck {
                            version: p.version, applied: true, error: String::new(),
                        })) }).await?;
                    }
                    _ => {}
                },
            },
        }
    }
}

/// (CPU ticks used so far, resident KiB, peak resident KiB) of `pid`.
fn proc_usage(pid: u32) -> anyhow::Result<(u64, u64, u64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .with_context(|| format!("cannot read /proc/{pid}/stat (--control-pid)"))?;
    // Fields after the command name (which may hold spaces) start at the last ')'.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = fields
        .get(11)
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap_or(0)
        + fields
            .get(12)
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0);
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let kib = |key: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
            .unwrap_or(0)
    };
    Ok((ticks, kib("VmRSS:"), kib("VmHWM:")))
}

/// `fleet`'s settings.
struct FleetArgs {
    nodes: u64,
    interval: Duration,
    duration: Duration,
    control_pid: Option<u32>,
    cluster_id: u64,
    token: Option<String>,
}

async fn fleet(
    c: &mut kiwi_client::control::ControlClient,
    addr: &str,
    args: FleetArgs,
) -> anyhow::Result<()> {
    let FleetArgs {
        nodes,
        interval,
        duration,
        control_pid,
        cluster_id,
        token,
    } = args;
    if nodes == 0 {
        bail!("--nodes must be at least 1");
    }
    let stop = tokio_util::sync::CancellationToken::new();
    let registered = Arc::new(AtomicU64::new(0));
    let beats = Arc::new(AtomicU64::new(0));
    let mut tasks = tokio::task::JoinSet::new();
    eprintln!("starting {nodes} simulated nodes (heartbeat every {interval:?}) ...");
    let fleet = Fleet {
        addr: addr.to_string(),
        nodes,
        cluster_id,
        interval,
        registered: Arc::clone(&registered),
        beats: Arc::clone(&beats),
        stop: stop.clone(),
        token,
    };
    for id in 1..=nodes {
        tasks.spawn(simulated_node(fleet.clone(), id));
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    while registered.load(Ordering::Relaxed) < nodes {
        if let Some(Ok(Err(e))) = tasks.try_join_next() {
            stop.cancel();
            return Err(e);
        }
        if Instant::now() > deadline {
            bail!(
                "only {} of {nodes} simulated nodes registered within 60 s",
                registered.load(Ordering::Relaxed)
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    eprintln!("all {nodes} registered; measuring for {duration:?} ...");
    let before = control_pid.map(proc_usage).transpose()?;
    let beats_before = beats.load(Ordering::Relaxed);
    let started = Instant::now();
    let mut status_time = histogram();
    let mut last_up = 0;
    while started.elapsed() < duration {
        let t = Instant::now();
        let s = c
            .cluster_status(ClusterStatusRequest {})
            .await?
            .into_inner();
        record(&mut status_time, t.elapsed());
        last_up = s.nodes.iter().filter(|n| n.up).count();
        if let Some(Ok(Err(e))) = tasks.try_join_next() {
            stop.cancel();
            return Err(e);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let elapsed = started.elapsed();
    let after = control_pid.map(proc_usage).transpose()?;
    let heartbeats = beats.load(Ordering::Relaxed) - beats_before;
    stop.cancel();
    while tasks.join_next().await.is_some() {}

    println!(
        "{nodes} simulated nodes, {heartbeats} heartbeats in {:.1} s ({:.0}/s); {last_up} nodes up at the end",
        elapsed.as_secs_f64(),
        heartbeats as f64 / elapsed.as_secs_f64()
    );
    println!("{}", line("ClusterStatus", &status_time));
    let mut usage = serde_json::Value::Null;
    if let (Some((t0, _, _)), Some((t1, rss, hwm))) = (before, after) {
        // Linux reports CPU time in clock ticks of 1/100 s (USER_HZ).
        let cpu = (t1 - t0) as f64 / 100.0 / elapsed.as_secs_f64() * 100.0;
        println!(
            "kiwi-control: {cpu:.1}% of one core, resident {:.1} MiB (peak {:.1} MiB)",
            rss as f64 / 1024.0,
            hwm as f64 / 1024.0
        );
        usage = json!({"cpu_percent_of_one_core": cpu, "rss_mib": rss as f64 / 1024.0,
                       "peak_rss_mib": hwm as f64 / 1024.0});
    }
    println!(
        "{}",
        json!({"bench": "control_fleet", "nodes": nodes, "interval_ms": interval.as_millis() as u64,
               "seconds": elapsed.as_secs_f64(), "heartbeats": heartbeats, "nodes_up": last_up,
               "cluster_status": summary(&status_time), "control": usage})
    );
    if last_up as u64 != nodes {
        bail!(
            "{last_up} of {nodes} simulated nodes were up at the end: the control plane fell behind"
        );
    }
    Ok(())
}
