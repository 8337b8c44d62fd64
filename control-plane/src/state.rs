//! The live cluster view, built from the nodes' registrations and heartbeats. Pure bookkeeping (no I/O,
//! an injected clock): each change returns the events it causes, which the caller logs.
//!
//! A node is up while its heartbeats arrive, and down once three of its heartbeat intervals pass without
//! one. The cluster's leader is the node reporting the leader role in the highest term.

use std::collections::{BTreeMap, VecDeque};
use std::time::{Duration, Instant};

use kiwi_proto::v1::{
    ClusterStatusResponse, HistorySample, NodeHistory, NodeMetrics, NodeView, RaftRole, Register,
};

use crate::events::NewEvent;

/// Heartbeat intervals missed before a node is marked down.
pub const MISSED_HEARTBEATS: u32 = 3;

/// Most history samples kept per node, whatever the retention and heartbeat interval.
pub const MAX_HISTORY_SAMPLES: usize = 3600;

/// Why a node is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error(
        "node {node_id} belongs to cluster {got:016x}, but this control plane serves cluster {serving:016x}"
    )]
    OtherCluster {
        node_id: u64,
        got: u64,
        serving: u64,
    },
    #[error(
        "node {node_id} is already connected from {connected}; a second node with this id at {from} is refused"
    )]
    Duplicate {
        node_id: u64,
        connected: String,
        from: String,
    },
    #[error("invalid registration: {0}")]
    Invalid(String),
}

struct Entry {
    reg: Register,
    /// The connection currently speaking for this node.
    conn: u64,
    up: bool,
    last_seen: Instant,
    last_seen_unix_ms: u64,
    metrics: Option<NodeMetrics>,
    /// One sample per heartbeat, oldest first, for the retention period.
    history: VecDeque<HistorySample>,
    /// The policy version the node acknowledged last, and its refusal of a newer one.
    policy_version: u64,
    policy_error: String,
}

impl Entry {
    fn interval(&self) -> Duration {
        Duration::from_millis(self.reg.heartbeat_interval_ms.max(1))
    }
}

/// The view. Owned behind one lock by the service.
#[derive(Default)]
pub struct ClusterView {
    cluster_id: u64,
    nodes: BTreeMap<u64, Entry>,
    leader: u64,
    leader_term: u64,
    leader_changes: u64,
    /// How long history samples are kept.
    retention: Duration,
    /// A node down this long is forgotten (`retention.departed_node_sec`); never when `None`.
    forget_after: Option<Duration>,
}

/// The figures of one heartbeat that the history keeps.
fn sample(m: &NodeMetrics, at_unix_ms: u64) -> HistorySample {
    let pool = m.storage_pool.clone().unwrap_or_default();
    HistorySample {
        at_unix_ms,
        role: m.role,
        term: m.term,
        commit_index: m.commit_index,
        applied_index: m.applied_index,
        commit_rate: m.commit_rate,
        apply_rate: m.apply_rate,
        pool_threads: pool.current_threads,
        utilisation_percent: pool.utilisation_percent,
        queue_depth: m.classes.iter().map(|c| c.depth).sum(),
        shed: m.classes.iter().map(|c| c.shed).sum(),
        expired: m.classes.iter().map(|c| c.expired).sum(),
        max_follower_lag: m.followers.iter().map(|f| f.lag).max().unwrap_or(0),
        max_replication_latency_avg_us: m
            .followers
            .iter()
            .map(|f| f.replication_latency_avg_us)
            .max()
            .unwrap_or(0),
    }
}

impl ClusterView {
    /// A view for `cluster_id` (0: adopt the first registering node's) that keeps every node's metrics
    /// history for `retention`.
    pub fn new(cluster_id: u64, retention: Duration) -> ClusterView {
        ClusterView {
            cluster_id,
            retention,
            ..ClusterView::default()
        }
    }

    /// Forgets nodes that have been down for `after` (see [`sweep`](Self::sweep)).
    pub fn forgetting_after(self, after: Duration) -> ClusterView {
        ClusterView {
            forget_after: Some(after),
            ..self
        }
    }

    /// Every registered node's fault injection settings (for scheduling faults).
    pub fn fault_targets(&self) -> Vec<crate::faults::Target> {
        self.nodes
            .iter()
            .map(|(id, e)| crate::faults::Target {
                node_id: *id,
                fault_injection_enabled: e.reg.fault_injection_enabled,
                max_duration_ms: e.reg.fault_max_duration_ms,
            })
            .collect()
    }

    /// The kept history of `node_id` (0: every node), samples after `since_unix_ms`.
    pub fn history(&self, node_id: u64, since_unix_ms: u64) -> Vec<NodeHistory> {
        self.nodes
            .iter()
            .filter(|(id, _)| node_id == 0 || **id == node_id)
            .map(|(id, e)| NodeHistory {
                node_id: *id,
                samples: e
                    .history
                    .iter()
                    .filter(|s| s.at_unix_ms > since_unix_ms)
                    .cloned()
                    .collect(),
            })
            .collect()
    }

    /// The cluster served (0 until a node registered).
    pub fn cluster_id(&self) -> u64 {
        self.cluster_id
    }

    /// Registers (or re-registers) a node on connection `conn`. Returns the events, and whether the
    /// cluster id was adopted from this node (the caller persists it).
    ///
    /// # Errors
    /// [`Refusal`]: another cluster, the id already connected from another address, a malformed record.
    pub fn register(
        &mut self,
        conn: u64,
        reg: Register,
        now: Instant,
        now_unix_ms: u64,
    ) -> Result<(Vec<NewEvent>, bool), Refusal> {
        if reg.node_id == 0 {
            return Err(Refusal::Invalid("node_id must be at least 1".into()));
        }
        if reg.cluster_id == 0 {
            return Err(Refusal::Invalid("cluster_id must not be 0".into()));
        }
        if reg.heartbeat_interval_ms == 0 || reg.heartbeat_interval_ms > 60_000 {
            return Err(Refusal::Invalid(format!(
                "heartbeat_interval_ms must be 1 to 60000, got {}",
                reg.heartbeat_interval_ms
            )));
        }
        let adopted = self.cluster_id == 0;
        if !adopted && reg.cluster_id != self.cluster_id {
            return Err(Refusal::OtherCluster {
                node_id: reg.node_id,
                got: reg.cluster_id,
                serving: self.cluster_id,
            });
        }
        if let Some(old) = self.nodes.get(&reg.node_id)
            && old.up
            && old.conn != conn
            && old.reg.client_addr != reg.client_addr
        {
            return Err(Refusal::Duplicate {
                node_id: reg.node_id,
                connected: old.reg.client_addr.clone(),
                from: reg.client_addr,
            });
        }
        self.cluster_id = reg.cluster_id;
        let mut events = vec![NewEvent {
            kind: "node_registered",
            node_id: reg.node_id,
            detail: format!(
                "node {} at {} ({} backend, version {})",
                reg.node_id, reg.client_addr, reg.backend, reg.version
            ),
        }];
        let was_up = self.nodes.get(&reg.node_id).is_some_and(|e| e.up);
        if !was_up {
            events.push(NewEvent {
                kind: "node_up",
                node_id: reg.node_id,
                detail: format!("node {} is up", reg.node_id),
            });
        }
        let old = self.nodes.remove(&reg.node_id);
        let (metrics, history, policy_version, policy_error) = old
            .map_or((None, VecDeque::new(), 0, String::new()), |e| {
                (e.metrics, e.history, e.policy_version, e.policy_error)
            });
        self.nodes.insert(
            reg.node_id,
            Entry {
                reg,
                conn,
                up: true,
                last_seen: now,
                last_seen_unix_ms: now_unix_ms,
                metrics,
                history,
                policy_version,
                policy_error,
            },
        );
        Ok((events, adopted))
    }

    /// A heartbeat from `node_id` on connection `conn`. A heartbeat from a connection that no longer
    /// speaks for the node (it re-registered elsewhere) is ignored.
    pub fn heartbeat(
        &mut self,
        conn: u64,
        node_id: u64,
        metrics: NodeMetrics,
        now: Instant,
        now_unix_ms: u64,
    ) -> Vec<NewEvent> {
        let mut events = Vec::new();
        let Some(e) = self.nodes.get_mut(&node_id) else {
            return events;
        };
        if e.conn != conn {
            return events;
        }
        if !e.up {
            e.up = true;
            events.push(NewEvent {
                kind: "node_up",
                node_id,
                detail: format!("node {node_id} is up again"),
            });
        }
        e.last_seen = now;
        e.last_seen_unix_ms = now_unix_ms;
        let (role, term) = (metrics.role, metrics.term);
        // What the node runs now (versions of another epoch can be higher than this store's).
        e.policy_version = metrics.policy_version;
        let cutoff = now_unix_ms
            .saturating_sub(u64::try_from(self.retention.as_millis()).unwrap_or(u64::MAX));
        while e
            .history
            .front()
            .is_some_and(|s| s.at_unix_ms <= cutoff || e.history.len() >= MAX_HISTORY_SAMPLES)
        {
            e.history.pop_front();
        }
        e.history.push_back(sample(&metrics, now_unix_ms));
        e.metrics = Some(metrics);
        if role == RaftRole::Leader as i32
            && (term > self.leader_term || (term == self.leader_term && self.leader == 0))
        {
            if self.leader != node_id {
                if self.leader != 0 {
                    self.leader_changes += 1;
                }
                events.push(NewEvent {
                    kind: "leader_changed",
                    node_id,
                    detail: if self.leader == 0 {
                        format!("node {node_id} leads (term {term})")
                    } else {
                        format!(
                            "leader changed from node {} to node {node_id} (term {term})",
                            self.leader
                        )
                    },
                });
            }
            self.leader = node_id;
            self.leader_term = term;
        }
        events
    }

    /// A node's answer to a pushed policy.
    pub fn policy_ack(
        &mut self,
        conn: u64,
        node_id: u64,
        version: u64,
        applied: bool,
        error: String,
    ) -> Vec<NewEvent> {
        let Some(e) = self.nodes.get_mut(&node_id).filter(|e| e.conn == conn) else {
            return Vec::new();
        };
        if applied {
            e.policy_version = version;
            e.policy_error.clear();
            vec![NewEvent {
                kind: "policy_applied",
                node_id,
                detail: format!("node {node_id} applied policy version {version}"),
            }]
        } else {
            let detail = format!("node {node_id} refused policy version {version}: {error}");
            e.policy_error = error;
            vec![NewEvent {
                kind: "policy_refused",
                node_id,
                detail,
            }]
        }
    }

    /// Marks down every node that missed [`MISSED_HEARTBEATS`] intervals.
    pub fn sweep(&mut self, now: Instant) -> Vec<NewEvent> {
        let mut events = Vec::new();
        for (id, e) in &mut self.nodes {
            if e.up && now.saturating_duration_since(e.last_seen) > e.interval() * MISSED_HEARTBEATS
            {
                e.up = false;
                events.push(NewEvent {
                    kind: "node_down",
                    node_id: *id,
                    detail: format!(
                        "node {id} missed {MISSED_HEARTBEATS} heartbeats ({} ms apart)",
                        e.reg.heartbeat_interval_ms
                    ),
                });
            }
        }
        if let Some(after) = self.forget_after {
            self.nodes.retain(|id, e| {
                let keep = e.up || now.saturating_duration_since(e.last_seen) < after;
                if !keep {
                    events.push(NewEvent {
                        kind: "node_forgotten",
                        node_id: *id,
                        detail: format!(
                            "node {id} was down for {} s (retention.departed_node_sec): forgotten \
                             with its history; it registers again if it comes back",
                            after.as_secs()
                        ),
                    });
                }
                keep
            });
        }
        events
    }

    /// The operator's view.
    pub fn status(&self) -> ClusterStatusResponse {
        let up = |e: &&Entry| e.up;
        let leader = self
            .nodes
            .get(&self.leader)
            .filter(|e| e.up)
            .map_or(0, |_| self.leader);
        let slowest_follower = self
            .nodes
            .get(&leader)
            .and_then(|e| e.metrics.as_ref())
            .and_then(|m| {
                m.followers
                    .iter()
                    .max_by_key(|f| f.replication_latency_avg_us)
                    .map(|f| f.node_id)
            })
            .unwrap_or(0);
        let metrics = || {
            self.nodes
                .values()
                .filter(up)
                .filter_map(|e| e.metrics.as_ref())
        };
        ClusterStatusResponse {
            cluster_id: self.cluster_id,
            leader_id: leader,
            leader_changes: self.leader_changes,
            nodes: self
                .nodes
                .iter()
                .map(|(id, e)| NodeView {
                    node_id: *id,
                    client_addr: e.reg.client_addr.clone(),
                    backend: e.reg.backend.clone(),
                    version: e.reg.version.clone(),
                    up: e.up,
                    last_seen_unix_ms: e.last_seen_unix_ms,
                    heartbeat_interval_ms: e.reg.heartbeat_interval_ms,
                    metrics: e.metrics.clone(),
                    policy_version: e.policy_version,
                    policy_error: e.policy_error.clone(),
                })
                .collect(),
            slowest_follower,
            commit_rate: metrics().map(|m| m.commit_rate).sum(),
            apply_rate: metrics().map(|m| m.apply_rate).sum(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reg(id: u64, addr: &str) -> Register {
        Register {
            node_id: id,
            cluster_id: 9,
            client_addr: addr.into(),
            backend: "memory".into(),
            version: "0".into(),
            started_at_unix_ms: 0,
            heartbeat_interval_ms: 100,
            ..Register::default()
        }
    }

    fn leader(term: u64) -> NodeMetrics {
        NodeMetrics {
            role: RaftRole::Leader as i32,
            term,
            ..NodeMetrics::default()
        }
    }

    fn kinds(events: &[NewEvent]) -> Vec<&str> {
        events.iter().map(|e| e.kind).collect()
    }

    #[test]
    fn a_node_down_past_the_retention_is_forgotten() {
        let t0 = Instant::now();
        let mut v =
            ClusterView::new(0, Duration::from_secs(60)).forgetting_after(Duration::from_secs(10));
        v.register(1, reg(1, "a:1"), t0, 0).unwrap();
        v.register(2, reg(2, "b:1"), t0, 0).unwrap();
        assert_eq!(
            kinds(&v.sweep(t0 + Duration::from_secs(1))),
            ["node_down", "node_down"]
        );
        v.heartbeat(2, 2, leader(2), t0 + Duration::from_millis(9_900), 0);
        assert!(v.sweep(t0 + Duration::from_millis(9_999)).is_empty());
        assert_eq!(
            kinds(&v.sweep(t0 + Duration::from_secs(10))),
            ["node_forgotten"]
        );
        let ids: Vec<u64> = v.status().nodes.iter().map(|n| n.node_id).collect();
        assert_eq!(ids, [2], "node 2 came back and stays");
    }

    #[test]
    fn nodes_go_down_after_three_missed_heartbeats_and_leader_changes_are_events() {
        let t0 = Instant::now();
        let mut v = ClusterView::new(0, Duration::from_secs(60));
        let (ev, adopted) = v.register(1, reg(1, "a:1"), t0, 0).unwrap();
        assert!(adopted);
        assert_eq!(kinds(&ev), ["node_registered", "node_up"]);
        v.register(2, reg(2, "b:1"), t0, 0).unwrap();
        assert_eq!(
            kinds(&v.heartbeat(1, 1, leader(2), t0, 0)),
            ["leader_changed"]
        );
        assert!(v.heartbeat(1, 1, leader(2), t0, 0).is_empty());
        assert_eq!(v.status().leader_id, 1);
        // 300 ms without node 1's heartbeats is not yet three missed intervals; 301 ms is.
        v.heartbeat(
            2,
            2,
            NodeMetrics::default(),
            t0 + Duration::from_millis(250),
            0,
        );
        assert!(v.sweep(t0 + Duration::from_millis(300)).is_empty());
        assert_eq!(
            kinds(&v.sweep(t0 + Duration::from_millis(301))),
            ["node_down"]
        );
        assert_eq!(v.status().leader_id, 0, "a down leader is not reported");
        let ev = v.heartbeat(2, 2, leader(3), t0 + Duration::from_millis(400), 0);
        assert_eq!(kinds(&ev), ["leader_changed"]);
        assert!(ev[0].detail.contains("from node 1 to node 2"), "{ev:?}");
        let s = v.status();
        assert_eq!((s.leader_id, s.leader_changes), (2, 1));
        assert_eq!(s.nodes.iter().filter(|n| n.up).count(), 1);
        // A stale leader report (lower term) changes nothing.
        let (ev, _) = v
            .register(3, reg(1, "a:1"), t0 + Duration::from_millis(500), 0)
            .unwrap();
        assert_eq!(kinds(&ev), ["node_registered", "node_up"]);
        let t1 = t0 + Duration::from_millis(510);
        assert!(v.heartbeat(3, 1, leader(2), t1, 0).is_empty());
        assert_eq!(v.status().leader_id, 2);
    }

    proptest::proptest! {
        /// Any registration and heartbeat a node (or anyone) sends is taken or refused without a panic;
        /// a refused registration leaves the view as it was.
        #[test]
        fn any_node_message_is_taken_or_refused_without_panic(
            node_id in proptest::prelude::any::<u64>(),
            cluster_id in proptest::prelude::any::<u64>(),
            interval in proptest::prelude::any::<u64>(),
            addr in ".{0,40}",
            role in proptest::prelude::any::<i32>(),
            term in proptest::prelude::any::<u64>(),
            lags in proptest::collection::vec(proptest::prelude::any::<u64>(), 0..4),
        ) {
            let t0 = Instant::now();
            let mut v = ClusterView::new(0, Duration::from_secs(60));
            v.register(1, reg(1, "a:1"), t0, 0).unwrap();
            let before = v.status();
            let r = Register {
                node_id,
                cluster_id,
                client_addr: addr,
                heartbeat_interval_ms: interval,
                ..Register::default()
            };
            if v.register(2, r, t0, 0).is_err() {
                proptest::prop_assert_eq!(v.status(), before);
            }
            let m = NodeMetrics {
                role,
                term,
                followers: lags
                    .iter()
                    .map(|&lag| kiwi_proto::v1::FollowerMetrics {
                        lag,
                        replication_latency_avg_us: lag,
                        ..Default::default()
                    })
                    .collect(),
                ..NodeMetrics::default()
            };
            v.heartbeat(2, node_id, m.clone(), t0, u64::MAX);
            v.heartbeat(1, 1, m, t0, 1);
            let _ = v.status();
            let _ = v.history(0, 0);
            let _ = crate::metrics::render(&v.status());
        }
    }

    #[test]
    fn history_keeps_one_sample_per_heartbeat_for_the_retention_period() {
        let t0 = Instant::now();
        let mut v = ClusterView::new(0, Duration::from_secs(10));
        v.register(1, reg(1, "a:1"), t0, 0).unwrap();
        v.register(2, reg(2, "b:1"), t0, 0).unwrap();
        for s in 1..=30u64 {
            let m = NodeMetrics {
                commit_index: s,
                ..leader(2)
            };
            v.heartbeat(1, 1, m, t0, s * 1000);
        }
        let h = v.history(1, 0);
        assert_eq!(h.len(), 1);
        let commits: Vec<u64> = h[0].samples.iter().map(|s| s.commit_index).collect();
        assert_eq!(
            commits,
            (21..=30).collect::<Vec<_>>(),
            "10 s kept at 1 s apart"
        );
        assert_eq!(v.history(1, 25_000)[0].samples.len(), 5);
        assert_eq!(
            v.history(0, 0).len(),
            2,
            "every node, node 2 without samples"
        );
        assert!(v.history(0, 0)[1].samples.is_empty());
        // A node that registers again keeps its history.
        v.register(3, reg(1, "a:1"), t0, 31_000).unwrap();
        assert_eq!(v.history(1, 0)[0].samples.len(), 10);
    }

    #[test]
    fn other_clusters_duplicates_and_malformed_registrations_are_refused() {
        let t0 = Instant::now();
        let mut v = ClusterView::new(0, Duration::from_secs(60));
        v.register(1, reg(1, "a:1"), t0, 0).unwrap();
        let other = Register {
            cluster_id: 10,
            ..reg(2, "b:1")
        };
        assert!(matches!(
            v.register(2, other, t0, 0),
            Err(Refusal::OtherCluster { .. })
        ));
        assert!(matches!(
            v.register(3, reg(1, "c:1"), t0, 0),
            Err(Refusal::Duplicate { .. })
        ));
        assert!(matches!(
            v.register(4, reg(0, "d:1"), t0, 0),
            Err(Refusal::Invalid(_))
        ));
        // Heartbeats from a connection that does not speak for the node are ignored.
        assert!(v.heartbeat(3, 1, leader(5), t0, 0).is_empty());
        assert_eq!(v.status().leader_id, 0);
        assert_eq!(v.status().nodes.len(), 1);
    }
}
