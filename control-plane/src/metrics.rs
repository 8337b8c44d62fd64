//! The control plane's `/metrics` (`[metrics] addr`): the figures of every node's latest heartbeat,
//! each with a `node` label, plus the derived cluster facts, so one Prometheus target covers the
//! cluster. Served by the same guarded listener as the node's endpoints ([`kiwi_proto::http`]).
//!
//! Names mirror the node's own (`kiwi_raft_term` there is `kiwi_node_raft_term{node="2"}` here); the
//! values are as of each node's last heartbeat, so they trail the node's endpoint by up to one heartbeat
//! interval. A node that is down keeps its last figures and reports `kiwi_node_up 0`.

use std::sync::Arc;

use kiwi_proto::v1::ClusterStatusResponse;
use prometheus::{Encoder as _, GaugeVec, IntGauge, IntGaugeVec, Opts, Registry, TextEncoder};

use crate::service::Control;

/// Renders the live view of a [`Control`].
pub struct ControlMetrics(pub Arc<Control>);

impl kiwi_proto::http::Render for ControlMetrics {
    fn render(&self, section: Option<&str>) -> Option<String> {
        match section {
            None => Some(render(&self.0.status())),
            Some(_) => None,
        }
    }

    fn sections(&self) -> &'static [&'static str] {
        &[]
    }
}

/// Gauges are rebuilt per scrape: the set of nodes and followers changes with the cluster.
struct Gauges {
    registry: Registry,
}

impl Gauges {
    fn int(&self, name: &str, help: &str, labels: &[&str]) -> IntGaugeVec {
        let g = IntGaugeVec::new(Opts::new(name, help), labels).expect("valid metric name");
        self.registry
            .register(Box::new(g.clone()))
            .expect("metric registered once");
        g
    }

    fn float(&self, name: &str, help: &str, labels: &[&str]) -> GaugeVec {
        let g = GaugeVec::new(Opts::new(name, help), labels).expect("valid metric name");
        self.registry
            .register(Box::new(g.clone()))
            .expect("metric registered once");
        g
    }

    fn single(&self, name: &str, help: &str) -> IntGauge {
        let g = IntGauge::new(name, help).expect("valid metric name");
        self.registry
            .register(Box::new(g.clone()))
            .expect("metric registered once");
        g
    }
}

fn int(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

/// The Prometheus text of a cluster status.
pub fn render(status: &ClusterStatusResponse) -> String {
    let g = Gauges {
        registry: Registry::new(),
    };
    let node = &["node"];
    let up = g.int(
        "kiwi_node_up",
        "1 while the node's heartbeats arrive, 0 once three are missed",
        node,
    );
    let last_seen = g.int(
        "kiwi_node_last_heartbeat_unix_ms",
        "When the node's last heartbeat arrived (Unix time, ms)",
        node,
    );
    let role = g.int(
        "kiwi_node_raft_role",
        "Raft role: 1 follower, 2 candidate, 3 leader, 4 pre-candidate (as in admin.proto)",
        node,
    );
    let term = g.int("kiwi_node_raft_term", "Current Raft term", node);
    let leader = g.int(
        "kiwi_node_raft_leader_id",
        "The leader the node knows (0: none)",
        node,
    );
    let commit = g.int(
        "kiwi_node_raft_commit_index",
        "Highest log index known committed",
        node,
    );
    let applied = g.int(
        "kiwi_node_raft_applied_index",
        "Highest log index applied",
        node,
    );
    let first = g.int(
        "kiwi_node_raft_log_first_index",
        "First index in the Raft log",
        node,
    );
    let last = g.int(
        "kiwi_node_raft_log_last_index",
        "Last index in the Raft log",
        node,
    );
    let commit_rate = g.float(
        "kiwi_node_raft_commit_rate",
        "Entries committed per second over the node's last 10 s",
        node,
    );
    let apply_rate = g.float(
        "kiwi_node_raft_apply_rate",
        "Entries applied per second over the node's last 10 s",
        node,
    );
    let rejected = g.int(
        "kiwi_node_raft_rejected_entries",
        "Committed entries applied as no-ops because they were invalid",
        node,
    );
    let follower = &["node", "follower"];
    let lag = g.int(
        "kiwi_node_raft_follower_lag",
        "On the leader: entries the follower is behind the leader's last index",
        follower,
    );
    let matched = g.int(
        "kiwi_node_raft_follower_match_index",
        "On the leader: highest index known replicated on the follower",
        follower,
    );
    let repl_avg = g.float(
        "kiwi_node_raft_replication_latency_avg_seconds",
        "On the leader: moving average from persisting an entry to the follower acknowledging it",
        follower,
    );
    let repl_p99 = g.float(
        "kiwi_node_raft_replication_latency_p99_seconds",
        "On the leader: p99 of the replication latency since it became leader",
        follower,
    );
    let threads = g.int(
        "kiwi_node_storage_pool_threads",
        "Storage pool threads now",
        node,
    );
    let target = g.int(
        "kiwi_node_storage_pool_target_threads",
        "Storage pool target size",
        node,
    );
    let util = g.float(
        "kiwi_node_storage_pool_utilisation_percent",
        "Storage pool busy time over capacity in the last evaluation interval",
        node,
    );
    let class = &["node", "priority"];
    let depth = g.int(
        "kiwi_node_queue_depth",
        "Requests queued, per priority class",
        class,
    );
    let shed = g.int(
        "kiwi_node_requests_shed",
        "Requests refused by admission control since the node started, per priority class",
        class,
    );
    let expired = g.int(
        "kiwi_node_requests_expired",
        "Requests whose deadline passed in the queue since the node started, per priority class",
        class,
    );
    let served = g.int(
        "kiwi_node_requests_served",
        "Requests served since the node started, per priority class",
        class,
    );
    let disk = g.int(
        "kiwi_node_data_dir_bytes",
        "Size of the storage engine's files",
        node,
    );
    let policy = g.int(
        "kiwi_node_policy_version",
        "Version of the control plane's policy the node acknowledged last",
        node,
    );
    let us = |v: u64| v as f64 / 1e6;
    for n in &status.nodes {
        let id = n.node_id.to_string();
        let l = [id.as_str()];
        up.with_label_values(&l).set(i64::from(n.up));
        last_seen
            .with_label_values(&l)
            .set(int(n.last_seen_unix_ms));
        policy.with_label_values(&l).set(int(n.policy_version));
        let Some(m) = &n.metrics else { continue };
        role.with_label_values(&l).set(i64::from(m.role));
        term.with_label_values(&l).set(int(m.term));
        leader.with_label_values(&l).set(int(m.leader_id));
        commit.with_label_values(&l).set(int(m.commit_index));
        applied.with_label_values(&l).set(int(m.applied_index));
        first.with_label_values(&l).set(int(m.first_index));
        last.with_label_values(&l).set(int(m.last_index));
        commit_rate.with_label_values(&l).set(m.commit_rate);
        apply_rate.with_label_values(&l).set(m.apply_rate);
        rejected.with_label_values(&l).set(int(m.rejected_entries));
        disk.with_label_values(&l).set(int(m.data_dir_bytes));
        for f in &m.followers {
            let fid = f.node_id.to_string();
            let fl = [id.as_str(), fid.as_str()];
            lag.with_label_values(&fl).set(int(f.lag));
            matched.with_label_values(&fl).set(int(f.match_index));
            repl_avg
                .with_label_values(&fl)
                .set(us(f.replication_latency_avg_us));
            if let Some(r) = f.replication_latency {
                repl_p99.with_label_values(&fl).set(us(r.p99_us));
            }
        }
        if let Some(p) = &m.storage_pool {
            threads
                .with_label_values(&l)
                .set(i64::from(p.current_threads));
            target
                .with_label_values(&l)
                .set(i64::from(p.target_threads));
            util.with_label_values(&l).set(p.utilisation_percent);
        }
        for c in &m.classes {
            let cl = [id.as_str(), c.class.as_str()];
            depth.with_label_values(&cl).set(i64::from(c.depth));
            shed.with_label_values(&cl).set(int(c.shed));
            expired.with_label_values(&cl).set(int(c.expired));
            served.with_label_values(&cl).set(int(c.served));
        }
    }
    g.single(
        "kiwi_cluster_leader_id",
        "The cluster's leader (0: none known)",
    )
    .set(int(status.leader_id));
    g.single(
        "kiwi_cluster_leader_changes",
        "Leader changes the control plane saw since it started",
    )
    .set(int(status.leader_changes));
    g.single("kiwi_cluster_nodes", "Nodes that ever registered")
        .set(i64::try_from(status.nodes.len()).unwrap_or(i64::MAX));
    g.single("kiwi_cluster_nodes_up", "Nodes whose heartbeats arrive")
        .set(i64::try_from(status.nodes.iter().filter(|n| n.up).count()).unwrap_or(i64::MAX));
    g.single(
        "kiwi_cluster_slowest_follower",
        "The follower with the highest replication latency on the leader (0: none)",
    )
    .set(int(status.slowest_follower));
    let mut text = Vec::new();
    TextEncoder::new()
        .encode(&g.registry.gather(), &mut text)
        .expect("the text encoder writes to memory");
    String::from_utf8(text).expect("the text format is UTF-8")
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiwi_proto::v1::{FollowerMetrics, NodeMetrics, NodeView, PriorityClassStats, RaftRole};

    #[test]
    fn every_node_figure_carries_its_node_label() {
        let leader = NodeView {
            node_id: 1,
            up: true,
            metrics: Some(NodeMetrics {
                role: RaftRole::Leader as i32,
                term: 7,
                commit_index: 42,
                followers: vec![FollowerMetrics {
                    node_id: 2,
                    lag: 3,
                    replication_latency_avg_us: 1500,
                    ..FollowerMetrics::default()
                }],
                classes: vec![PriorityClassStats {
                    class: "low".into(),
                    shed: 9,
                    ..PriorityClassStats::default()
                }],
                ..NodeMetrics::default()
            }),
            ..NodeView::default()
        };
        let down = NodeView {
            node_id: 2,
            up: false,
            ..NodeView::default()
        };
        let text = render(&ClusterStatusResponse {
            leader_id: 1,
            nodes: vec![leader, down],
            ..ClusterStatusResponse::default()
        });
        for line in [
            "kiwi_node_up{node=\"1\"} 1",
            "kiwi_node_up{node=\"2\"} 0",
            "kiwi_node_raft_term{node=\"1\"} 7",
            "kiwi_node_raft_commit_index{node=\"1\"} 42",
            "kiwi_node_raft_follower_lag{follower=\"2\",node=\"1\"} 3",
            "kiwi_node_raft_replication_latency_avg_seconds{follower=\"2\",node=\"1\"} 0.0015",
            "kiwi_node_requests_shed{node=\"1\",priority=\"low\"} 9",
            "kiwi_cluster_leader_id 1",
            "kiwi_cluster_nodes_up 1",
        ] {
            assert!(text.lines().any(|l| l == line), "{line} in\n{text}");
        }
    }
}
