//! `kiwi control ...`: the control plane's live cluster view and event log.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use clap::{Args, Subcommand};
use kiwi_proto::v1::control_service_client::ControlServiceClient;
use kiwi_proto::v1::{ClusterStatusRequest, Event, EventsRequest};
use serde_json::json;

use crate::{Outcome, role_name};

/// Default control plane address (kiwi-control's default `listen_addr`).
pub const DEFAULT_CONTROL: &str = "127.0.0.1:7390";

#[derive(Debug, Args)]
pub struct ControlArgs {
    /// The control plane's address (host:port).
    #[arg(long, env = "KIWI_CONTROL", default_value = DEFAULT_CONTROL)]
    control: String,
    #[command(subcommand)]
    command: ControlCommand,
}

#[derive(Debug, Subcommand)]
enum ControlCommand {
    /// Every node as the control plane sees it: up or down, role, term, commit/applied index, lag and
    /// replication latency (on the leader), storage pool, shed requests, last heartbeat.
    Status,
    /// The event log (nodes registered, up, down, refused; leader changes), oldest first.
    Events {
        /// Only events after this sequence number.
        #[arg(long, default_value_t = 0)]
        after: u64,
        /// Keep printing new events as they happen (Ctrl-C stops).
        #[arg(long)]
        follow: bool,
    },
}

async fn client(addr: &str) -> anyhow::Result<ControlServiceClient<tonic::transport::Channel>> {
    let endpoint = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))?
        .connect_timeout(Duration::from_secs(2))
        .timeout(Duration::from_secs(5));
    let channel = endpoint.connect().await.map_err(|e| {
        anyhow::anyhow!("cannot reach the control plane at {addr} (--control or KIWI_CONTROL): {e}")
    })?;
    Ok(ControlServiceClient::new(channel))
}

fn ago(unix_ms: u64) -> String {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
    if unix_ms == 0 {
        return "never".into();
    }
    format!("{:.1}s ago", now.saturating_sub(unix_ms) as f64 / 1000.0)
}

pub async fn run(args: ControlArgs, json: bool) -> anyhow::Result<Outcome> {
    let mut c = client(&args.control).await?;
    match args.command {
        ControlCommand::Status => {
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
                               "last_seen_unix_ms": n.last_seen_unix_ms, "role": role_name(m.role),
                               "term": m.term, "commit_index": m.commit_index, "applied_index": m.applied_index,
                               "backend": n.backend, "version": n.version,
                               "followers": m.followers.iter().map(|f| json!({"id": f.node_id, "lag": f.lag,
                                   "match_index": f.match_index,
                                   "replication_latency_p99_us": f.replication_latency.as_ref().map_or(0, |l| l.p99_us)}))
                                   .collect::<Vec<_>>(),
                               "storage_threads": m.storage_pool.as_ref().map_or(0, |p| p.current_threads),
                               "shed": m.classes.iter().map(|c| c.shed).sum::<u64>()})
                    })
                    .collect();
                println!(
                    "{}",
                    json!({"cluster_id": format!("{:016x}", s.cluster_id), "leader": s.leader_id,
                           "leader_changes": s.leader_changes, "slowest_follower": s.slowest_follower,
                           "commit_rate": s.commit_rate, "apply_rate": s.apply_rate, "nodes": nodes})
                );
                return Ok(Outcome::Ok);
            }
            if s.nodes.is_empty() {
                println!(
                    "no node has registered with the control plane at {}",
                    args.control
                );
                return Ok(Outcome::Ok);
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
                "{:<5} {:<22} {:<5} {:<10} {:>5} {:>9} {:>9} {:>7} {:>6} {:<12}",
                "node",
                "address",
                "up",
                "role",
                "term",
                "commit",
                "applied",
                "threads",
                "shed",
                "last seen"
            );
            for n in &s.nodes {
                let m = n.metrics.clone().unwrap_or_default();
                println!(
                    "{:<5} {:<22} {:<5} {:<10} {:>5} {:>9} {:>9} {:>7} {:>6} {:<12}",
                    n.node_id,
                    n.client_addr,
                    if n.up { "up" } else { "DOWN" },
                    role_name(m.role),
                    m.term,
                    m.commit_index,
                    m.applied_index,
                    m.storage_pool.as_ref().map_or(0, |p| p.current_threads),
                    m.classes.iter().map(|c| c.shed).sum::<u64>(),
                    ago(n.last_seen_unix_ms)
                );
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
