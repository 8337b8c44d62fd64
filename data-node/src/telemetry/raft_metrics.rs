//! `RaftMetricsCollector`: fine-grained Raft figures, recorded by the Raft driver as things happen.
//!
//! The collector is owned by the driver thread (plain fields, no locks); readers ask the driver for a
//! [`RaftMetrics`] snapshot through its handle. Recording is cheap: counters, and `hdrhistogram`
//! histograms whose buckets are allocated once (3 significant digits, 1 µs to 1 h), so recording never
//! allocates. Per follower, the leader keeps a moving average and a histogram of the replication latency:
//! the time from the leader persisting an entry to the follower acknowledging its index. The persist times
//! are kept for the last [`PERSISTED_KEPT`] fsynced appends.
//!
//! History: every `collection_interval` one [`Sample`] is kept, for `retention_period`. Memory is bounded
//! by `retention_period / collection_interval` samples of 48 bytes, at most
//! [`MAX_SAMPLES`] (the config ceilings allow 7 days at 1 s, or 1 h at 100 ms: 36,000 samples, 1.7 MB).

use std::collections::{BTreeMap, VecDeque};
use std::time::{Duration, Instant, SystemTime};

use hdrhistogram::Histogram;

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
}

impl RaftMetricsCollector {
    pub fn new(settings: MetricsSettings) -> Self {
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
        }
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
            }
            self.last_known_leader = leader;
            if let Some(started) = self.election_started.take() {
                self.last_election = Some(now.duration_since(started));
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
        }
    }

    /// An fsynced log append of `entries` entries up to `last_index` took `took`.
    pub fn log_appended(&mut self, entries: usize, last_index: u64, took: Duration, now: Instant) {
        if !self.enabled() {
            return;
        }
        let _ = self.log_fsync.record(micros(took));
        self.log_fsync_entries += entries as u64;
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
        let us = micros(now.saturating_duration_since(at));
        let _ = f.latency.record(us);
        f.avg_us = if f.avg_us == 0 {
            us
        } else {
            (f.avg_us * 7 + us) / 8
        };
    }

    /// A snapshot stream to follower `id` ended after `took`.
    pub fn snapshot_sent(&mut self, id: u64, ok: bool, took: Duration) {
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
        match outcome {
            Some(true) => {
                self.proposals_committed += 1;
                let _ = self.propose_to_apply.record(micros(took));
            }
            Some(false) => self.proposals_rejected += 1,
            None => self.proposals_dropped += 1,
        }
    }

    /// A ReadIndex round was answered `took` after it started.
    pub fn read_answered(&mut self, took: Duration) {
        if self.enabled() {
            let _ = self.read_index.record(micros(took));
        }
    }

    /// Keeps one history sample per collection interval; `sample` is only called when one is due.
    pub fn maybe_sample(&mut self, now: Instant, sample: impl FnOnce() -> Sample) {
        if !self.enabled() || now < self.next_sample {
            return;
        }
        self.next_sample = now + self.settings.collection_interval;
        if self.history.len() >= self.max_samples() {
            self.history.pop_front();
        }
        self.history.push_back(sample());
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
        let mut c = RaftMetricsCollector::new(settings(100, 1000));
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
        let mut c = RaftMetricsCollector::new(settings(10, 100));
        let t0 = Instant::now();
        let start = SystemTime::now();
        for i in 0..1000u64 {
            let at = start + Duration::from_millis(10 * i);
            c.maybe_sample(t0 + Duration::from_millis(10 * i), || sample(i * 5, at));
        }
        let m = c.metrics(&[], true);
        assert_eq!(m.history.len(), 10, "100 ms of 10 ms samples");
        assert_eq!(m.history.last().unwrap().commit, 999 * 5);
        assert!((m.commit_rate - 500.0).abs() < 1.0, "{}", m.commit_rate);
    }

    #[test]
    fn elections_and_leader_changes_are_counted() {
        let mut c = RaftMetricsCollector::new(settings(100, 1000));
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
        let mut c = RaftMetricsCollector::new(MetricsSettings {
            enabled: false,
            ..settings(100, 1000)
        });
        let t0 = Instant::now();
        c.campaign_started(t0);
        c.proposal_answered(Some(true), Duration::from_millis(1));
        c.maybe_sample(t0, || sample(1, SystemTime::now()));
        assert_eq!(c.metrics(&[], true), RaftMetrics::default());
    }
}
