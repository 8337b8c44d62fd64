//! `RaftMetricsCollector`: fine-grained Raft figures, recorded by the Raft driver as things happen.
//!
//! The collector is owned by the driver thread (plain fields, no locks); readers ask the driver for a
//! [`RaftMetrics`] snapshot through its handle. Recording is cheap: counters, and `hdrhistogram`
//! histograms whose buckets are allocated once (3 significant digits, 1 µs to 1 h), so recording never
//! allocates. Per follower, the leader keeps a moving average and a histogram of the replication latency:
//! the time from the leader persisting an entry to the follower acknowledging its index. The persist times
//! are kept for the last [`PERSISTED_KEPT`] fsynced appends.
//!
//! Export: [`RaftExport`] holds the OpenTelemetry instruments (the `raft` metric family). Histograms and
//! counters are recorded as events happen (attributes built once; no allocation per event); the gauges
//! (term, role, indexes, followers' match and lag) are published once per `collection_interval` into a
//! small shared record that the exporter's callbacks read at scrape time, so a scrape never waits for
//! the driver.
//!
//! History: every `collection_interval` one [`Sample`] is kept, for `retention_period`. Memory is bounded
//! by `retention_period / collection_interval` samples of 48 bytes, at most
//! [`MAX_SAMPLES`] (the config ceilings allow 7 days at 1 s, or 1 h at 100 ms: 36,000 samples, 1.7 MB).

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant, SystemTime};

use hdrhistogram::Histogram;
use kiwi_proto::v1::RaftRole;
use opentelemetry::KeyValue;
use opentelemetry::metrics::{Counter, Histogram as OtelHistogram, Meter};

use super::metrics::LATENCY_BUCKETS;

/// Persisted appends remembered for replication latency.
pub const PERSISTED_KEPT: usize = 4096;
/// Most history samples kept, whatever the configuration.
pub const MAX_SAMPLES: usize = 100_000;
/// Window of the commit and apply rates.
const RATE_WINDOW: Duration = Duration::from_secs(10);

/// `[raft.metrics]` as the collector uses it.
#[derive(Debug, Clone, Copy)]
pub struct MetricsSettings {
    pub enabled: bool,
    pub collection_interval: Duration,
    pub retention_period: Duration,
}

/// A latency distribution in microseconds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Latency {
    pub count: u64,
    pub p50_us: u64,
    pub p99_us: u64,
    pub max_us: u64,
    pub mean_us: u64,
}

/// One point of history.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sample {
    pub at: SystemTime,
    pub term: u64,
    pub role: kiwi_proto::v1::RaftRole,
    pub commit: u64,
    pub applied: u64,
    pub max_follower_lag: u64,
}

/// One follower, as the leader sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct Follower {
    pub id: u64,
    pub match_index: u64,
    pub lag: u64,
    pub recently_active: bool,
    pub voter: bool,
    pub replication_avg_us: u64,
    pub replication: Latency,
    pub snapshots_sent: u64,
    pub snapshots_failed: u64,
    /// How long the snapshot streams to this follower took (successful ones).
    pub snapshot_duration: Latency,
}

/// Everything the collector knows, at one moment.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RaftMetrics {
    pub elections: u64,
    pub leader_changes: u64,
    pub last_election: Option<Duration>,
    pub commit_rate: f64,
    pub apply_rate: f64,
    pub proposals_committed: u64,
    pub proposals_dropped: u64,
    pub proposals_rejected: u64,
    pub propose_to_apply: Latency,
    pub read_index: Latency,
    pub ready_handling: Latency,
    pub log_fsync: Latency,
    pub log_fsync_entries: u64,
    pub followers: Vec<Follower>,
    pub history: Vec<Sample>,
}

/// Figures the driver publishes each collection interval for the gauges.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Progress {
    pub leader: u64,
    pub first_index: u64,
    pub last_index: u64,
    /// (id, match index, lag in entries, recently active), on the leader.
    pub followers: Vec<(u64, u64, u64, bool)>,
}

#[derive(Debug, Clone, Default)]
struct Published {
    sample: Option<Sample>,
    progress: Progress,
    commit_rate: f64,
    apply_rate: f64,
    /// Replication latency moving average per follower, microseconds.
    follower_avg_us: Vec<(u64, u64)>,
}

/// Role names for the `kiwi_raft_role{role}` state set.
const ROLES: [(RaftRole, &str); 5] = [
    (RaftRole::Follower, "follower"),
    (RaftRole::Candidate, "candidate"),
    (RaftRole::PreCandidate, "pre_candidate"),
    (RaftRole::Leader, "leader"),
    (RaftRole::Learner, "learner"),
];

/// The OpenTelemetry side of the collector: instruments recorded as events happen, and the gauges'
/// shared record. Cheap to clone.
#[derive(Clone)]
pub struct RaftExport {
    elections: Counter<u64>,
    leader_changes: Counter<u64>,
    election_duration: OtelHistogram<f64>,
    proposals: Counter<u64>,
    propose_to_apply: OtelHistogram<f64>,
    read_index: OtelHistogram<f64>,
    ready_handling: OtelHistogram<f64>,
    log_fsync: OtelHistogram<f64>,
    log_fsync_entries: OtelHistogram<u64>,
    replication: OtelHistogram<f64>,
    snapshots: Counter<u64>,
    snapshot_duration: OtelHistogram<f64>,
    entries_committed: Counter<u64>,
    entries_applied: Counter<u64>,
    messages_refused: Counter<u64>,
    outcome: [[KeyValue; 1]; 3],
    published: Arc<Mutex<Published>>,
}

fn seconds(meter: &Meter, name: &'static str, description: &'static str) -> OtelHistogram<f64> {
    meter
        .f64_histogram(name)
        .with_unit("s")
        .with_description(description)
        .with_boundaries(LATENCY_BUCKETS.to_vec())
        .build()
}

impl std::fmt::Debug for RaftExport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RaftExport").finish_non_exhaustive()
    }
}

impl RaftExport {
    /// Instruments that record nothing.
    pub fn noop() -> RaftExport {
        RaftExport::new(&opentelemetry::global::meter("kiwi"))
    }

    /// Creates the instruments and registers the gauges on `meter`.
    pub fn new(meter: &Meter) -> RaftExport {
        let counter = |name: &'static str, description: &'static str| {
            meter
                .u64_counter(name)
                .with_description(description)
                .build()
        };
        let export = RaftExport {
            elections: counter("kiwi_raft_elections", "Campaigns this node started"),
            leader_changes: counter(
                "kiwi_raft_leader_changes",
                "Times the known leader changed to another node",
            ),
            election_duration: seconds(
                meter,
                "kiwi_raft_election_duration",
                "From losing the leader (or campaigning) until a leader is known",
            ),
            proposals: counter(
                "kiwi_raft_proposals",
                "Proposals answered, by outcome: committed (applied), dropped, rejected (invalid)",
            ),
            propose_to_apply: seconds(
                meter,
                "kiwi_raft_propose_to_apply_duration",
                "From proposing an entry to applying it",
            ),
            read_index: seconds(
                meter,
                "kiwi_raft_read_index_duration",
                "One ReadIndex round",
            ),
            ready_handling: seconds(
                meter,
                "kiwi_raft_ready_duration",
                "Handling one raft-rs Ready (persist, send, apply, advance)",
            ),
            log_fsync: seconds(
                meter,
                "kiwi_raft_log_append_duration",
                "One fsynced append to the Raft log",
            ),
            log_fsync_entries: meter
                .u64_histogram("kiwi_raft_log_append_entries")
                .with_description("Entries per fsynced Raft log append (group commit)")
                .with_boundaries(vec![
                    1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 1024.0,
                ])
                .build(),
            replication: seconds(
                meter,
                "kiwi_raft_replication_latency",
                "On the leader: from persisting an entry to a follower acknowledging it, per peer",
            ),
            snapshots: counter(
                "kiwi_raft_snapshots_sent",
                "Snapshot streams to a follower, per peer and result (ok, failed)",
            ),
            snapshot_duration: seconds(
                meter,
                "kiwi_raft_snapshot_send_duration",
                "Snapshot streams to a follower that succeeded, per peer",
            ),
            entries_committed: counter(
                "kiwi_raft_entries_committed",
                "Log entries this node learned committed since it started",
            ),
            entries_applied: counter(
                "kiwi_raft_entries_applied",
                "Log entries this node applied since it started",
            ),
            messages_refused: counter(
                "kiwi_raft_messages_refused",
                "Raft messages and streams from the network refused before reaching Raft, by reason",
            ),
            outcome: ["committed", "dropped", "rejected"].map(|o| [KeyValue::new("outcome", o)]),
            published: Arc::default(),
        };
        // Counters start at zero, so their series exist (and dashboards show 0) before the first event.
        for c in [
            &export.elections,
            &export.leader_changes,
            &export.entries_committed,
            &export.entries_applied,
        ] {
            c.add(0, &[]);
        }
        for attrs in &export.outcome {
            export.proposals.add(0, attrs);
        }
        export.register_gauges(meter);
        export
    }

    /// Starts `kiwi_raft_messages_refused_total` at zero for each reason, so the series exist before
    /// the first refusal.
    pub fn register_refusal_reasons(&self, reasons: impl IntoIterator<Item = &'static str>) {
        for reason in reasons {
            self.messages_refused
                .add(0, &[KeyValue::new("reason", reason)]);
        }
    }

    /// One Raft message (or a whole stream) from the network was refused for `reason`.
    pub fn message_refused(&self, reason: &'static str) {
        self.messages_refused
            .add(1, &[KeyValue::new("reason", reason)]);
    }

    fn register_gauges(&self, meter: &Meter) {
        type Pick = fn(&Sample, &Progress) -> u64;
        let gauges: [(&str, &str, Pick); 6] = [
            ("kiwi_raft_term", "Current Raft term", |s, _| s.term),
            (
                "kiwi_raft_leader_id",
                "Id of the known leader (0: none)",
                |_, p| p.leader,
            ),
            (
                "kiwi_raft_commit_index",
                "Highest log index known committed",
                |s, _| s.commit,
            ),
            (
                "kiwi_raft_applied_index",
                "Highest log index applied",
                |s, _| s.applied,
            ),
            (
                "kiwi_raft_log_first_index",
                "First index in the Raft log",
                |_, p| p.first_index,
            ),
            (
                "kiwi_raft_log_last_index",
                "Last index in the Raft log",
                |_, p| p.last_index,
            ),
        ];
        for (name, description, pick) in gauges {
            let published = Arc::clone(&self.published);
            meter
                .u64_observable_gauge(name)
                .with_description(description)
                .with_callback(move |o| {
                    let p = published.lock().unwrap_or_else(PoisonError::into_inner);
                    if let Some(s) = &p.sample {
                        o.observe(pick(s, &p.progress), &[]);
                    }
                })
                .build();
        }
        let published = Arc::clone(&self.published);
        let roles = ROLES.map(|(role, name)| (role, [KeyValue::new("role", name)]));
        meter
            .u64_observable_gauge("kiwi_raft_role")
            .with_description("1 for this node's current Raft role, 0 for the others")
            .with_callback(move |o| {
                let p = published.lock().unwrap_or_else(PoisonError::into_inner);
                if let Some(s) = &p.sample {
                    for (role, attrs) in &roles {
                        o.observe(u64::from(s.role == *role), attrs);
                    }
                }
            })
            .build();
        type Rate = fn(&Published) -> f64;
        let rates: [(&str, &str, Rate); 2] = [
            (
                "kiwi_raft_commit_rate",
                "Entries committed per second over the last 10 s",
                |p| p.commit_rate,
            ),
            (
                "kiwi_raft_apply_rate",
                "Entries applied per second over the last 10 s",
                |p| p.apply_rate,
            ),
        ];
        for (name, description, pick) in rates {
            let published = Arc::clone(&self.published);
            meter
                .f64_observable_gauge(name)
                .with_description(description)
                .with_callback(move |o| {
                    let p = published.lock().unwrap_or_else(PoisonError::into_inner);
                    if p.sample.is_some() {
                        o.observe(pick(&p), &[]);
                    }
                })
                .build();
        }
        type Follower = fn(&(u64, u64, u64, bool)) -> u64;
        let followers: [(&str, &str, Follower); 3] = [
            (
                "kiwi_raft_follower_match_index",
                "On the leader: highest index known replicated to the peer",
                |f| f.1,
            ),
            (
                "kiwi_raft_follower_lag_entries",
                "On the leader: entries the peer is behind the leader's last index",
                |f| f.2,
            ),
            (
                "kiwi_raft_follower_recently_active",
                "On the leader: 1 if the peer answered within the last election timeout",
                |f| u64::from(f.3),
            ),
        ];
        for (name, description, pick) in followers {
            let published = Arc::clone(&self.published);
            meter
                .u64_observable_gauge(name)
                .with_description(description)
                .with_callback(move |o| {
                    let p = published.lock().unwrap_or_else(PoisonError::into_inner);
                    for f in &p.progress.followers {
                        o.observe(pick(f), &[KeyValue::new("peer", f.0 as i64)]);
                    }
                })
                .build();
        }
        let published = Arc::clone(&self.published);
        meter
            .f64_observable_gauge("kiwi_raft_follower_replication_latency_avg")
            .with_unit("s")
            .with_description("On the leader: moving average of the peer's replication latency")
            .with_callback(move |o| {
                let p = published.lock().unwrap_or_else(PoisonError::into_inner);
                for &(id, us) in &p.follower_avg_us {
                    o.observe(us as f64 / 1e6, &[KeyValue::new("peer", id as i64)]);
                }
            })
            .build();
    }
}

fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 3_600_000_000, 3).expect("valid histogram bounds")
}

fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX).max(1)
}

fn summary(h: &Histogram<u64>) -> Latency {
    if h.is_empty() {
        return Latency::default();
    }
    Latency {
        count: h.len(),
        p50_us: h.value_at_quantile(0.5),
        p99_us: h.value_at_quantile(0.99),
        max_us: h.max(),
        mean_us: h.mean() as u64,
    }
}

struct FollowerState {
    last_match: u64,
    avg_us: u64,
    latency: Histogram<u64>,
    snapshots_sent: u64,
    snapshots_failed: u64,
    snapshot_duration: Histogram<u64>,
}

/// The collector. See the module doc.
pub struct RaftMetricsCollector {
    settings: MetricsSettings,
    elections: u64,
    leader_changes: u64,
    last_leader: u64,
    /// The last leader other than "none".
    last_known_leader: u64,
    /// When this node started campaigning or lost its leader, until a leader is known.
    election_started: Option<Instant>,
    last_election: Option<Duration>,
    proposals_committed: u64,
    proposals_dropped: u64,
    proposals_rejected: u64,
    propose_to_apply: Histogram<u64>,
    read_index: Histogram<u64>,
    ready_handling: Histogram<u64>,
    log_fsync: Histogram<u64>,
    log_fsync_entries: u64,
    /// (last index, when it was fsynced) of recent appends on the leader.
    persisted: VecDeque<(u64, Instant)>,
    followers: BTreeMap<u64, FollowerState>,
    history: VecDeque<Sample>,
    next_sample: Instant,
    export: RaftExport,
}

impl RaftMetricsCollector {
    pub fn new(settings: MetricsSettings, export: RaftExport) -> Self {
        RaftMetricsCollector {
            settings,
            elections: 0,
            leader_changes: 0,
            last_leader: 0,
            last_known_leader: 0,
            // A node starts without a leader: the first election is timed from the start.
            election_started: settings.enabled.then(Instant::now),
            last_election: None,
            proposals_committed: 0,
            proposals_dropped: 0,
            proposals_rejected: 0,
            propose_to_apply: histogram(),
            read_index: histogram(),
            ready_handling: histogram(),
            log_fsync: histogram(),
            log_fsync_entries: 0,
            persisted: VecDeque::with_capacity(if settings.enabled { PERSISTED_KEPT } else { 0 }),
            followers: BTreeMap::new(),
            history: VecDeque::new(),
            next_sample: Instant::now(),
            export,
        }
    }

    /// The OpenTelemetry instruments.
    pub fn export(&self) -> &RaftExport {
        &self.export
    }

    /// Whether collection is on (`[raft.metrics] enabled`).
    pub fn enabled(&self) -> bool {
        self.settings.enabled
    }

    /// The settings in force.
    pub fn settings(&self) -> MetricsSettings {
        self.settings
    }

    fn max_samples(&self) -> usize {
        let n = self.settings.retention_period.as_nanos()
            / self.settings.collection_interval.as_nanos().max(1);
        usize::try_from(n)
            .unwrap_or(MAX_SAMPLES)
            .clamp(1, MAX_SAMPLES)
    }

    /// This node started a campaign (a new term in which it voted for itself).
    pub fn campaign_started(&mut self, now: Instant) {
        if !self.enabled() {
            return;
        }
        self.elections += 1;
        self.export.elections.add(1, &[]);
        self.election_started.get_or_insert(now);
    }

    /// The known leader is now `leader` (0: none).
    pub fn leader_seen(&mut self, leader: u64, now: Instant) {
        if !self.enabled() || leader == self.last_leader {
            return;
        }
        if leader == 0 {
            self.election_started.get_or_insert(now);
        } else {
            if self.last_known_leader != 0 && self.last_known_leader != leader {
                self.leader_changes += 1;
                self.export.leader_changes.add(1, &[]);
            }
            self.last_known_leader = leader;
            if let Some(started) = self.election_started.take() {
                let took = now.duration_since(started);
                self.last_election = Some(took);
                self.export
                    .election_duration
                    .record(took.as_secs_f64(), &[]);
            }
            // A new leadership: replication figures start over.
            self.followers.clear();
            self.persisted.clear();
        }
        self.last_leader = leader;
    }

    /// A Ready was handled in `took`.
    pub fn ready_handled(&mut self, took: Duration) {
        if self.enabled() {
            let _ = self.ready_handling.record(micros(took));
            self.export.ready_handling.record(took.as_secs_f64(), &[]);
        }
    }

    /// An fsynced log append of `entries` entries up to `last_index` took `took`.
    pub fn log_appended(&mut self, entries: usize, last_index: u64, took: Duration, now: Instant) {
        if !self.enabled() {
            return;
        }
        let _ = self.log_fsync.record(micros(took));
        self.log_fsync_entries += entries as u64;
        self.export.log_fsync.record(took.as_secs_f64(), &[]);
        self.export.log_fsync_entries.record(entries as u64, &[]);
        if entries > 0 {
            if self.persisted.len() == PERSISTED_KEPT {
                self.persisted.pop_front();
            }
            self.persisted.push_back((last_index, now));
        }
    }

    /// The leader sees follower `id` at `matched`: a newly acknowledged index records the replication
    /// latency of the newest persisted append it covers.
    pub fn follower_matched(&mut self, id: u64, matched: u64, now: Instant) {
        if !self.enabled() {
            return;
        }
        let f = self.followers.entry(id).or_insert_with(|| FollowerState {
            last_match: matched,
            avg_us: 0,
            latency: histogram(),
            snapshots_sent: 0,
            snapshots_failed: 0,
            snapshot_duration: histogram(),
        });
        if matched <= f.last_match {
            return;
        }
        f.last_match = matched;
        // The newest append whose last index the follower now has.
        let covered = self.persisted.partition_point(|(i, _)| *i <= matched);
        if covered == 0 {
            return;
        }
        let (_, at) = self.persisted[covered - 1];
        let took = now.saturating_duration_since(at);
        let us = micros(took);
        let _ = f.latency.record(us);
        self.export
            .replication
            .record(took.as_secs_f64(), &[KeyValue::new("peer", id as i64)]);
        f.avg_us = if f.avg_us == 0 {
            us
        } else {
            (f.avg_us * 7 + us) / 8
        };
    }

    /// A snapshot stream to follower `id` ended after `took`.
    pub fn snapshot_sent(&mut self, id: u64, ok: bool, took: Duration) {
        let peer = KeyValue::new("peer", id as i64);
        let result = KeyValue::new("result", if ok { "ok" } else { "failed" });
        self.export.snapshots.add(1, &[peer.clone(), result]);
        if ok {
            self.export
                .snapshot_duration
                .record(took.as_secs_f64(), &[peer]);
        }
        if let Some(f) = self.followers.get_mut(&id) {
            if ok {
                f.snapshots_sent += 1;
                let _ = f.snapshot_duration.record(micros(took));
            } else {
                f.snapshots_failed += 1;
            }
        }
    }

    /// A proposal was answered: applied (`Some(true)`), rejected as invalid (`Some(false)`) or dropped
    /// (`None`), `took` after it was proposed.
    pub fn proposal_answered(&mut self, outcome: Option<bool>, took: Duration) {
        if !self.enabled() {
            return;
        }
        let kind = match outcome {
            Some(true) => {
                self.proposals_committed += 1;
                let _ = self.propose_to_apply.record(micros(took));
                self.export.propose_to_apply.record(took.as_secs_f64(), &[]);
                0
            }
            None => {
                self.proposals_dropped += 1;
                1
            }
            Some(false) => {
                self.proposals_rejected += 1;
                2
            }
        };
        self.export.proposals.add(1, &self.export.outcome[kind]);
    }

    /// A ReadIndex round was answered `took` after it started.
    pub fn read_answered(&mut self, took: Duration) {
        if self.enabled() {
            let _ = self.read_index.record(micros(took));
            self.export.read_index.record(took.as_secs_f64(), &[]);
        }
    }

    /// Keeps one history sample per collection interval and publishes the gauges; `sample` is only
    /// called when one is due.
    pub fn maybe_sample(&mut self, now: Instant, sample: impl FnOnce() -> (Sample, Progress)) {
        if !self.enabled() || now < self.next_sample {
            return;
        }
        self.next_sample = now + self.settings.collection_interval;
        if self.history.len() >= self.max_samples() {
            self.history.pop_front();
        }
        let (sample, progress) = sample();
        let previous = self.history.back().copied();
        self.history.push_back(sample);
        if let Some(before) = previous {
            self.export
                .entries_committed
                .add(sample.commit.saturating_sub(before.commit), &[]);
            self.export
                .entries_applied
                .add(sample.applied.saturating_sub(before.applied), &[]);
        }
        let follower_avg_us = progress
            .followers
            .iter()
            .filter_map(|f| Some((f.0, self.followers.get(&f.0)?.avg_us)))
            .collect();
        let published = Published {
            sample: Some(sample),
            progress,
            commit_rate: self.rate(|s| s.commit),
            apply_rate: self.rate(|s| s.applied),
            follower_avg_us,
        };
        *self
            .export
            .published
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = published;
    }

    fn rate(&self, of: impl Fn(&Sample) -> u64) -> f64 {
        let Some(last) = self.history.back() else {
            return 0.0;
        };
        let window_start = last
            .at
            .checked_sub(RATE_WINDOW)
            .unwrap_or(SystemTime::UNIX_EPOCH);
        let first = self
            .history
            .iter()
            .find(|s| s.at >= window_start)
            .unwrap_or(last);
        let secs = last
            .at
            .duration_since(first.at)
            .unwrap_or_default()
            .as_secs_f64();
        if secs <= 0.0 {
            return 0.0;
        }
        of(last).saturating_sub(of(first)) as f64 / secs
    }

    /// A snapshot of every figure; `followers` gives (id, match, lag, recently active, voter) of the
    /// current progress (leader only).
    pub fn metrics(
        &self,
        followers: &[(u64, u64, u64, bool, bool)],
        with_history: bool,
    ) -> RaftMetrics {
        RaftMetrics {
            elections: self.elections,
            leader_changes: self.leader_changes,
            last_election: self.last_election,
            commit_rate: self.rate(|s| s.commit),
            apply_rate: self.rate(|s| s.applied),
            proposals_committed: self.proposals_committed,
            proposals_dropped: self.proposals_dropped,
            proposals_rejected: self.proposals_rejected,
            propose_to_apply: summary(&self.propose_to_apply),
            read_index: summary(&self.read_index),
            ready_handling: summary(&self.ready_handling),
            log_fsync: summary(&self.log_fsync),
            log_fsync_entries: self.log_fsync_entries,
            followers: followers
                .iter()
                .map(|&(id, match_index, lag, recently_active, voter)| {
                    let f = self.followers.get(&id);
                    Follower {
                        id,
                        match_index,
                        lag,
                        recently_active,
                        voter,
                        replication_avg_us: f.map_or(0, |f| f.avg_us),
                        replication: f.map(|f| summary(&f.latency)).unwrap_or_default(),
                        snapshots_sent: f.map_or(0, |f| f.snapshots_sent),
                        snapshots_failed: f.map_or(0, |f| f.snapshots_failed),
                        snapshot_duration: f
                            .map(|f| summary(&f.snapshot_duration))
                            .unwrap_or_default(),
                    }
                })
                .collect(),
            history: if with_history {
                self.history.iter().copied().collect()
            } else {
                Vec::new()
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiwi_proto::v1::RaftRole;

    fn settings(interval_ms: u64, retention_ms: u64) -> MetricsSettings {
        MetricsSettings {
            enabled: true,
            collection_interval: Duration::from_millis(interval_ms),
            retention_period: Duration::from_millis(retention_ms),
        }
    }

    fn sample(commit: u64, at: SystemTime) -> Sample {
        Sample {
            at,
            term: 1,
            role: RaftRole::Leader,
            commit,
            applied: commit,
            max_follower_lag: 0,
        }
    }

    #[test]
    fn replication_latency_is_measured_from_the_leaders_fsync_to_the_ack() {
        let mut c = RaftMetricsCollector::new(settings(100, 1000), RaftExport::noop());
        let t0 = Instant::now();
        c.leader_seen(1, t0);
        c.follower_matched(2, 10, t0);
        c.log_appended(5, 15, Duration::from_micros(100), t0);
        c.log_appended(
            5,
            20,
            Duration::from_micros(100),
            t0 + Duration::from_millis(1),
        );
        // Acknowledging 17 covers the append ending at 15, persisted at t0.
        c.follower_matched(2, 17, t0 + Duration::from_millis(3));
        // Acknowledging 20 covers the append persisted at t0 + 1 ms.
        c.follower_matched(2, 20, t0 + Duration::from_millis(3));
        // An old acknowledgement records nothing.
        c.follower_matched(2, 20, t0 + Duration::from_millis(9));
        let m = c.metrics(&[(2, 20, 0, true, true)], false);
        let f = &m.followers[0];
        assert_eq!(f.replication.count, 2);
        assert!((2900..=3100).contains(&f.replication.max_us), "{f:?}");
        assert!((1900..=2100).contains(&f.replication.p50_us), "{f:?}");
        assert_eq!(m.log_fsync.count, 2);
        assert_eq!(m.log_fsync_entries, 10);
    }

    #[test]
    fn history_is_bounded_by_retention_over_interval() {
        let mut c = RaftMetricsCollector::new(settings(10, 100), RaftExport::noop());
        let t0 = Instant::now();
        let start = SystemTime::now();
        for i in 0..1000u64 {
            let at = start + Duration::from_millis(10 * i);
            c.maybe_sample(t0 + Duration::from_millis(10 * i), || {
                (sample(i * 5, at), Progress::default())
            });
        }
        let m = c.metrics(&[], true);
        assert_eq!(m.history.len(), 10, "100 ms of 10 ms samples");
        assert_eq!(m.history.last().unwrap().commit, 999 * 5);
        assert!((m.commit_rate - 500.0).abs() < 1.0, "{}", m.commit_rate);
    }

    #[test]
    fn elections_and_leader_changes_are_counted() {
        let mut c = RaftMetricsCollector::new(settings(100, 1000), RaftExport::noop());
        let t0 = Instant::now();
        c.leader_seen(2, t0);
        c.leader_seen(0, t0 + Duration::from_millis(10));
        c.campaign_started(t0 + Duration::from_millis(20));
        c.leader_seen(1, t0 + Duration::from_millis(60));
        let m = c.metrics(&[], false);
        assert_eq!((m.elections, m.leader_changes), (1, 1));
        assert_eq!(m.last_election, Some(Duration::from_millis(50)));
    }

    #[test]
    fn nothing_is_recorded_when_disabled() {
        let mut c = RaftMetricsCollector::new(
            MetricsSettings {
                enabled: false,
                ..settings(100, 1000)
            },
            RaftExport::noop(),
        );
        let t0 = Instant::now();
        c.campaign_started(t0);
        c.proposal_answered(Some(true), Duration::from_millis(1));
        c.maybe_sample(t0, || (sample(1, SystemTime::now()), Progress::default()));
        assert_eq!(c.metrics(&[], true), RaftMetrics::default());
    }
}
