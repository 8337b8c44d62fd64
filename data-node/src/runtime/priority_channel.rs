//! `PriorityMessageChannel`: the queue between the network stage (gRPC handlers) and the storage stage
//! (worker threads) for every client request.
//!
//! Four classes, from the request header. CRITICAL is always served first. HIGH, NORMAL and LOW share the
//! workers by weight with stride scheduling: each class has a "pass"; the non-empty class with the
//! smallest pass is served and its pass grows by `STRIDE / weight`, so under saturation each class gets its
//! weight's share and a class with work is always served within a bounded number of turns (no
//! starvation). A class that was idle re-enters at the current virtual time (the pass last served), so
//! idleness earns no burst. With priority disabled the channel is one FIFO (arrival order across classes).
//!
//! Admission control (the priority-based circuit breaker): a request is refused at once, having done
//! nothing, when its class queue is full, or when its estimated wait exceeds a share of its own remaining
//! deadline: LOW ¼, NORMAL ½, HIGH all of it, so LOW is shed first, then NORMAL, then HIGH. With priority
//! on, LOW's queue is also bounded by the pool: at most [`LOW_PER_WORKER`] LOW requests per worker in the
//! node (queued and running), the rest refused at once (LOW is the class that waits outside). CRITICAL is
//! never shed. The estimate is an upper bound of what stride scheduling guarantees: everything CRITICAL
//! queued, plus the requests of the class queued ahead, served at the class's guaranteed share of the
//! workers (its weight over the sum of all three weights, whatever is queued now: a class idle at
//! admission may flood later), each taking that class's recent service time (tracked per class: LOW runs
//! at a lower OS priority and takes longer on a busy machine), and at least as long as the class's oldest
//! queued request has already waited. The refusal carries a retry-after hint. A
//! request whose deadline passes while queued is handed back as expired and never runs.
//!
//! Raft's own traffic never enters this channel: it goes straight from the transport to the Raft driver.
//!
//! The clock is injected ([`Clock`]) so unit tests are deterministic.

use std::collections::VecDeque;
use std::sync::{Condvar, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use kiwi_proto::v1::Priority;

/// Request classes, most urgent first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Class {
    Critical = 0,
    High = 1,
    Normal = 2,
    Low = 3,
}

impl Class {
    pub const ALL: [Class; 4] = [Class::Critical, Class::High, Class::Normal, Class::Low];

    /// The class of a wire priority (unknown and unset values are NORMAL).
    pub fn from_wire(p: i32) -> Class {
        match Priority::from_wire(p) {
            Priority::Critical => Class::Critical,
            Priority::High => Class::High,
            Priority::Low => Class::Low,
            _ => Class::Normal,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Class::Critical => "critical",
            Class::High => "high",
            Class::Normal => "normal",
            Class::Low => "low",
        }
    }

    /// Share of a request's remaining deadline its estimated queue wait may use before it is shed.
    fn wait_share(self) -> Option<f64> {
        match self {
            Class::Critical => None,
            Class::High => Some(1.0),
            Class::Normal => Some(0.5),
            Class::Low => Some(0.25),
        }
    }
}

/// Source of the current time.
pub trait Clock: Send + Sync + 'static {
    fn now(&self) -> Instant;
}

/// The real clock.
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> Instant {
        Instant::now()
    }
}

/// How the channel schedules.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChannelPolicy {
    /// false: one FIFO for every class, no shedding by class.
    pub enabled: bool,
    /// Weights of HIGH, NORMAL, LOW (each ≥ 1).
    pub weights: [u32; 3],
    /// Requests queued per class before new ones of that class are refused.
    pub queue_capacity: usize,
    /// With priority on, LOW requests in the node (queued and running) are limited to this many per
    /// worker; more are refused at once. `None`: only `queue_capacity`.
    pub low_per_worker: Option<usize>,
}

/// LOW requests allowed in the node per storage worker (queued and running), with priority on: the
/// threads LOW may use stay busy, and no more LOW work waits. Measured (`scripts/bench-priority.sh`):
/// HIGH's tail latency under a LOW flood grows with the number of LOW requests in flight (their network
/// work competes with HIGH's on the network threads), not with LOW's throughput, which one per thread
/// already reaches; with 2 per thread HIGH p99 was 2.7x its idle p99, with 1 about 1.5-1.9x.
pub const LOW_PER_WORKER: usize = 1;

impl ChannelPolicy {
    /// The policy `[runtime.priority]` describes, with `queue_capacity` per class.
    pub fn from_config(c: &crate::config::PriorityConfig, queue_capacity: usize) -> Self {
        ChannelPolicy {
            enabled: c.enabled,
            weights: [
                c.high_priority_weight,
                c.normal_priority_weight,
                c.low_priority_weight,
            ],
            queue_capacity,
            low_per_worker: Some(LOW_PER_WORKER),
        }
    }
}

/// Why a request was refused at admission; it did nothing.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    #[error("{class} queue is full (at most {capacity} may wait now); retry after {retry_after:?}", class = .class.name())]
    QueueFull {
        class: Class,
        capacity: usize,
        retry_after: Duration,
    },
    #[error(
        "overloaded: estimated queue wait {estimated:?} exceeds the {class} budget of {budget:?} for this \
         request's deadline; retry after {retry_after:?}", class = .class.name()
    )]
    Overloaded {
        class: Class,
        estimated: Duration,
        budget: Duration,
        retry_after: Duration,
    },
    #[error("the node is shutting down")]
    Closed,
}

impl Refused {
    /// When to retry.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            Refused::QueueFull { retry_after, .. } | Refused::Overloaded { retry_after, .. } => {
                Some(*retry_after)
            }
            Refused::Closed => None,
        }
    }
}

/// What a worker takes from the channel.
#[derive(Debug)]
pub enum Taken<T> {
    /// Run it. The class is the one it was scheduled as: its own with priority on, NORMAL for every
    /// request when priority is off (one FIFO).
    Run(T, Class, Dequeued),
    /// Its deadline passed while it waited: answer DEADLINE_EXCEEDED without running it.
    Expired(T),
}

/// How a request left the queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Dequeued {
    /// Its own priority class (whatever it was scheduled as).
    pub class: Class,
    /// How long it waited in the queue.
    pub waited: Duration,
}

/// Per-class counters.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ClassStats {
    pub enqueued: u64,
    pub served: u64,
    pub shed: u64,
    pub expired: u64,
    pub depth: usize,
    /// Queue-wait histogram: counts of waits under 1 ms, 10 ms, 100 ms, 1 s, and longer.
    pub wait_buckets: [u64; 5],
}

/// `PriorityChannelStats`: a snapshot of every class's counters, CRITICAL first.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PriorityChannelStats {
    pub classes: [ClassStats; 4],
}

struct Item<T> {
    job: T,
    enqueued: Instant,
    deadline: Instant,
    seq: u64,
}

struct State<T> {
    queues: [VecDeque<Item<T>>; 4],
    /// Stride-scheduling pass of HIGH, NORMAL, LOW.
    pass: [u64; 3],
    /// Pass of the last class served: where a class that was idle re-enters.
    vtime: u64,
    seq: u64,
    stats: [ClassStats; 4],
    /// Recent service time per class (EWMA), nanoseconds.
    service_ns: [f64; 4],
    service_samples: [u64; 4],
    /// LOW requests taken to run and not yet reported finished.
    running_low: usize,
    policy: ChannelPolicy,
    workers: usize,
    closed: bool,
    /// Integral of the queue length over time (requests × ns) since `area_since`, up to `area_at`.
    queued_area: f64,
    area_since: Instant,
    area_at: Instant,
}

impl<T> State<T> {
    fn queued(&self) -> usize {
        self.queues.iter().map(VecDeque::len).sum()
    }

    /// Adds the time since the last change at the current queue length to the integral.
    fn account(&mut self, now: Instant) {
        let dt = now.saturating_duration_since(self.area_at).as_nanos() as f64;
        self.queued_area += self.queued() as f64 * dt;
        self.area_at = self.area_at.max(now);
    }
}

const STRIDE: u64 = 1 << 20;

/// The channel. Cheap to share behind an `Arc`.
pub struct PriorityMessageChannel<T> {
    state: Mutex<State<T>>,
    ready: Condvar,
    clock: Box<dyn Clock>,
}

fn wait_bucket(d: Duration) -> usize {
    match d.as_micros() {
        0..1_000 => 0,
        1_000..10_000 => 1,
        10_000..100_000 => 2,
        100_000..1_000_000 => 3,
        _ => 4,
    }
}

impl<T> PriorityMessageChannel<T> {
    pub fn new(policy: ChannelPolicy, workers: usize, clock: Box<dyn Clock>) -> Self {
        let now = clock.now();
        PriorityMessageChannel {
            state: Mutex::new(State {
                queues: Default::default(),
                pass: [0; 3],
                vtime: 0,
                seq: 0,
                stats: Default::default(),
                service_ns: [100_000.0; 4],
                service_samples: [0; 4],
                running_low: 0,
                policy,
                workers: workers.max(1),
                closed: false,
                queued_area: 0.0,
                area_since: now,
                area_at: now,
            }),
            ready: Condvar::new(),
            clock,
        }
    }

    fn lock(&self) -> MutexGuard<'_, State<T>> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Replaces the scheduling policy (queued requests stay queued).
    pub fn set_policy(&self, policy: ChannelPolicy) {
        self.lock().policy = policy;
    }

    /// Tells admission control how many workers drain the channel.
    pub fn set_workers(&self, workers: usize) {
        self.lock().workers = workers.max(1);
    }

    /// Queues `job` of `class`, to run before `deadline`, or refuses it.
    ///
    /// # Errors
    /// [`Refused`]; the job is dropped and did nothing.
    pub fn try_send(&self, class: Class, deadline: Instant, job: T) -> Result<(), Refused> {
        let now = self.clock.now();
        let mut s = self.lock();
        if s.closed {
            return Err(Refused::Closed);
        }
        let c = class as usize;
        let share = if c == 0 || !s.policy.enabled {
            1.0
        } else {
            f64::from(s.policy.weights[c - 1])
                / s.policy.weights.iter().map(|&w| f64::from(w)).sum::<f64>()
        };
        let critical_ns = if c == 0 {
            0.0
        } else {
            s.queues[0].len() as f64 * s.service_ns[0]
        };
        let ahead_ns = critical_ns + s.queues[c].len() as f64 * s.service_ns[c] / share;
        // The oldest request of the class has waited this long and has not started: a new one waits at
        // least as long as the queue takes to move (the model alone trusts service times learnt before).
        let head_age = s.queues[c].front().map_or(Duration::ZERO, |i| {
            now.saturating_duration_since(i.enqueued)
        });
        let estimated = Duration::from_nanos((ahead_ns / s.workers as f64) as u64).max(head_age);
        let retry_after =
            Duration::from_nanos(((ahead_ns + s.service_ns[c]) / s.workers as f64) as u64)
                .max(Duration::from_millis(1));
        let capacity = match (class, s.policy.low_per_worker) {
            (Class::Low, Some(per)) if s.policy.enabled => (per * s.workers)
                .saturating_sub(s.running_low)
                .min(s.policy.queue_capacity),
            _ => s.policy.queue_capacity,
        };
        // Every class is bounded, CRITICAL included: it is never shed by the admission estimate, but an
        // unbounded queue would let one client exhaust the node's memory.
        if s.queues[c].len() >= capacity {
            s.stats[c].shed += 1;
            return Err(Refused::QueueFull {
                class,
                capacity,
                retry_after,
            });
        }
        if s.policy.enabled
            && let Some(share) = class.wait_share()
        {
            let budget = deadline.saturating_duration_since(now).mul_f64(share);
            if estimated > budget {
                s.stats[c].shed += 1;
                return Err(Refused::Overloaded {
                    class,
                    estimated,
                    budget,
                    retry_after,
                });
            }
        }
        if s.queues[c].is_empty() && c > 0 {
            // Re-enter at the current virtual time: an idle class earns no burst.
            s.pass[c - 1] = s.pass[c - 1].max(s.vtime);
        }
        s.seq += 1;
        let seq = s.seq;
        s.account(now);
        s.queues[c].push_back(Item {
            job,
            enqueued: now,
            deadline,
            seq,
        });
        s.stats[c].enqueued += 1;
        drop(s);
        self.ready.notify_one();
        Ok(())
    }

    /// Admits a request its caller will serve at once, on its own thread, when nothing is queued: no
    /// request is waiting, so serving it now passes nobody, and the hand-off to a worker and back (two
    /// thread wake-ups) is saved. Only for work of a few microseconds that never blocks (a write's
    /// hand-off to Raft). LOW requests always queue, so a LOW flood stays under its worker limit and its
    /// admission estimate. Counted as enqueued and served with no wait. `false`: queue it with
    /// [`Self::try_send`].
    pub fn try_serve_inline(&self, class: Class) -> bool {
        if class == Class::Low {
            return false;
        }
        let mut s = self.lock();
        if s.closed || s.queued() > 0 {
            return false;
        }
        let st = &mut s.stats[class as usize];
        st.enqueued += 1;
        st.served += 1;
        st.wait_buckets[0] += 1;
        true
    }

    fn pick(s: &mut State<T>, allow_low: bool) -> Option<usize> {
        if !s.policy.enabled {
            return (0..4)
                .filter(|&c| !s.queues[c].is_empty())
                .min_by_key(|&c| s.queues[c].front().map_or(u64::MAX, |i| i.seq));
        }
        if !s.queues[0].is_empty() {
            return Some(0);
        }
        let c = (1..4)
            .filter(|&c| !s.queues[c].is_empty() && (allow_low || c != Class::Low as usize))
            .min_by_key(|&c| (s.pass[c - 1], c))?;
        s.vtime = s.pass[c - 1];
        s.pass[c - 1] += STRIDE / u64::from(s.policy.weights[c - 1].max(1));
        Some(c)
    }

    /// Takes the next request without blocking.
    pub fn try_recv(&self) -> Option<Taken<T>> {
        let now = self.clock.now();
        let mut s = self.lock();
        Self::take(&mut s, now, true)
    }

    fn take(s: &mut State<T>, now: Instant, allow_low: bool) -> Option<Taken<T>> {
        let c = Self::pick(s, allow_low)?;
        s.account(now);
        let item = s.queues[c].pop_front().expect("picked a non-empty queue");
        let waited = now.saturating_duration_since(item.enqueued);
        s.stats[c].wait_buckets[wait_bucket(waited)] += 1;
        if now >= item.deadline {
            s.stats[c].expired += 1;
            return Some(Taken::Expired(item.job));
        }
        s.stats[c].served += 1;
        let scheduled_as = if s.policy.enabled {
            Class::ALL[c]
        } else {
            Class::Normal
        };
        if scheduled_as == Class::Low {
            s.running_low += 1;
        }
        Some(Taken::Run(
            item.job,
            scheduled_as,
            Dequeued {
                class: Class::ALL[c],
                waited,
            },
        ))
    }

    /// Takes the next request, waiting up to `timeout` for one. `None` on timeout or once closed and empty.
    pub fn recv_timeout(&self, timeout: Duration) -> Option<Taken<T>> {
        self.recv_timeout_limiting_low(timeout, usize::MAX)
    }

    /// [`Self::recv_timeout`], but with priority on a LOW request is only taken while fewer than
    /// `low_limit` taken LOW requests are still running (their end is reported by
    /// [`Self::record_service`], which wakes a worker held back).
    pub fn recv_timeout_limiting_low(
        &self,
        timeout: Duration,
        low_limit: usize,
    ) -> Option<Taken<T>> {
        let mut s = self.lock();
        let until = Instant::now() + timeout;
        loop {
            let now = self.clock.now();
            let allow_low = s.running_low < low_limit;
            if let Some(t) = Self::take(&mut s, now, allow_low) {
                return Some(t);
            }
            if s.closed {
                return None;
            }
            let left = until.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return None;
            }
            s = self
                .ready
                .wait_timeout(s, left)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
    }

    /// CRITICAL and HIGH requests queued.
    pub fn urgent_len(&self) -> usize {
        let s = self.lock();
        s.queues[Class::Critical as usize].len() + s.queues[Class::High as usize].len()
    }

    /// LOW requests taken and not yet reported finished.
    pub fn running_low(&self) -> usize {
        self.lock().running_low
    }

    /// The mean number of requests queued since the previous call (time-weighted), for the scaler: an
    /// instant sample of a bursty queue says little.
    pub fn mean_queue_len(&self) -> f64 {
        let now = self.clock.now();
        let mut s = self.lock();
        s.account(now);
        let span = now.saturating_duration_since(s.area_since).as_nanos() as f64;
        let mean = if span > 0.0 {
            s.queued_area / span
        } else {
            s.queued() as f64
        };
        s.queued_area = 0.0;
        s.area_since = now;
        mean
    }

    /// Feeds the run time of a job taken as `class` into that class's service-time estimate.
    pub fn record_service(&self, class: Class, took: Duration) {
        let mut s = self.lock();
        let c = class as usize;
        let took = took.as_nanos() as f64;
        // The first sample replaces the starting guess outright.
        s.service_ns[c] = if s.service_samples[c] == 0 {
            took
        } else {
            0.9 * s.service_ns[c] + 0.1 * took
        };
        s.service_samples[c] += 1;
        if class == Class::Low {
            s.running_low = s.running_low.saturating_sub(1);
            if !s.queues[c].is_empty() {
                // A worker held back from LOW work may take some now.
                self.ready.notify_one();
            }
        }
    }

    /// Refuses new requests; queued ones can still be taken.
    pub fn close(&self) {
        self.lock().closed = true;
        self.ready.notify_all();
    }

    /// Requests queued in total.
    pub fn len(&self) -> usize {
        self.lock().queues.iter().map(VecDeque::len).sum()
    }

    /// Whether nothing is queued.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Counters and depths per class.
    pub fn stats(&self) -> PriorityChannelStats {
        let s = self.lock();
        let mut stats = PriorityChannelStats {
            classes: s.stats.clone(),
        };
        for c in 0..4 {
            stats.classes[c].depth = s.queues[c].len();
        }
        stats
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU64, Ordering};

    use super::*;

    /// A clock that only moves when told to.
    #[derive(Clone)]
    struct TestClock {
        base: Instant,
        offset_ns: Arc<AtomicU64>,
    }

    impl TestClock {
        fn new() -> Self {
            TestClock {
                base: Instant::now(),
                offset_ns: Arc::default(),
            }
        }
        fn advance(&self, d: Duration) {
            self.offset_ns
                .fetch_add(d.as_nanos() as u64, Ordering::SeqCst);
        }
    }

    impl Clock for TestClock {
        fn now(&self) -> Instant {
            self.base + Duration::from_nanos(self.offset_ns.load(Ordering::SeqCst))
        }
    }

    fn channel(enabled: bool) -> (PriorityMessageChannel<(Class, u64)>, TestClock) {
        let clock = TestClock::new();
        let ch = PriorityMessageChannel::new(
            ChannelPolicy {
                enabled,
                weights: [3, 2, 1],
                queue_capacity: 100_000,
                low_per_worker: None,
            },
            4,
            Box::new(clock.clone()),
        );
        (ch, clock)
    }

    fn far(clock: &TestClock) -> Instant {
        clock.now() + Duration::from_secs(3600)
    }

    fn run(t: Option<Taken<(Class, u64)>>) -> (Class, u64) {
        match t {
            Some(Taken::Run(j, _, _)) => j,
            other => panic!("expected a runnable job, got {other:?}"),
        }
    }

    #[test]
    fn saturated_classes_get_their_weights_share_and_critical_goes_first() {
        let (ch, clock) = channel(true);
        for i in 0..6000 {
            for c in [Class::High, Class::Normal, Class::Low] {
                ch.try_send(c, far(&clock), (c, i)).unwrap();
            }
        }
        ch.try_send(Class::Critical, far(&clock), (Class::Critical, 0))
            .unwrap();
        assert_eq!(
            run(ch.try_recv()).0,
            Class::Critical,
            "CRITICAL first, always"
        );
        let mut served = [0u32; 4];
        for _ in 0..6000 {
            served[run(ch.try_recv()).0 as usize] += 1;
        }
        // 3 : 2 : 1 of 6000, within 1%.
        for (c, want) in [(1, 3000), (2, 2000), (3, 1000)] {
            let got = served[c];
            assert!(
                (got as i32 - want).abs() <= want / 100,
                "class {c}: {got} vs {want}"
            );
        }
    }

    #[test]
    fn low_is_never_starved_by_a_flood_of_high() {
        let (ch, clock) = channel(true);
        ch.try_send(Class::Low, far(&clock), (Class::Low, 0))
            .unwrap();
        for i in 0..1000 {
            ch.try_send(Class::High, far(&clock), (Class::High, i))
                .unwrap();
        }
        let position = (1..=10).find(|_| run(ch.try_recv()).0 == Class::Low);
        assert!(position.is_some(), "LOW served within its weight's turns");
    }

    #[test]
    fn an_idle_class_earns_no_burst() {
        let (ch, clock) = channel(true);
        for i in 0..300 {
            ch.try_send(Class::High, far(&clock), (Class::High, i))
                .unwrap();
        }
        for _ in 0..300 {
            run(ch.try_recv());
        }
        // LOW arrives after HIGH ran alone for a while: it gets its share, not everything.
        for i in 0..100 {
            ch.try_send(Class::Low, far(&clock), (Class::Low, i))
                .unwrap();
            ch.try_send(Class::High, far(&clock), (Class::High, 1000 + i))
                .unwrap();
        }
        let lows = (0..40)
            .filter(|_| run(ch.try_recv()).0 == Class::Low)
            .count();
        assert!(
            (8..=12).contains(&lows),
            "LOW got {lows} of 40 (weight 1 of 4)"
        );
    }

    #[test]
    fn disabled_priority_is_one_fifo() {
        let (ch, clock) = channel(false);
        let order = [
            Class::Low,
            Class::High,
            Class::Normal,
            Class::Low,
            Class::Critical,
        ];
        for (i, c) in order.iter().enumerate() {
            ch.try_send(*c, far(&clock), (*c, i as u64)).unwrap();
        }
        let got: Vec<u64> = (0..5).map(|_| run(ch.try_recv()).1).collect();
        assert_eq!(got, vec![0, 1, 2, 3, 4]);
    }

    #[test]
    fn mean_queue_length_is_weighted_by_time() {
        let (ch, clock) = channel(true);
        let _ = ch.mean_queue_len();
        // 10 queued for 1 s, then 0 for 1 s: a mean of 5.
        for i in 0..10 {
            ch.try_send(Class::Normal, far(&clock), (Class::Normal, i))
                .unwrap();
        }
        clock.advance(Duration::from_secs(1));
        while ch.try_recv().is_some() {}
        clock.advance(Duration::from_secs(1));
        let mean = ch.mean_queue_len();
        assert!((mean - 5.0).abs() < 1e-6, "{mean}");
        // The next call covers only what happened since.
        clock.advance(Duration::from_secs(1));
        assert_eq!(ch.mean_queue_len(), 0.0);
    }

    #[test]
    fn a_queue_that_does_not_move_sheds_even_with_fast_service_times_learnt() {
        let (ch, clock) = channel(true);
        for c in Class::ALL {
            ch.record_service(c, Duration::from_micros(10));
        }
        ch.try_send(Class::Low, far(&clock), (Class::Low, 0))
            .unwrap();
        // Nothing is taken for 300 ms: a new LOW request with 1 s left (budget 250 ms) is refused.
        clock.advance(Duration::from_millis(300));
        let deadline = clock.now() + Duration::from_secs(1);
        assert!(matches!(
            ch.try_send(Class::Low, deadline, (Class::Low, 1)),
            Err(Refused::Overloaded { .. })
        ));
        // HIGH (budget: all of its deadline) still gets in.
        assert!(ch.try_send(Class::High, deadline, (Class::High, 2)).is_ok());
    }

    #[test]
    fn low_can_be_held_back_while_other_classes_are_served() {
        let (ch, clock) = channel(true);
        ch.try_send(Class::Low, far(&clock), (Class::Low, 0))
            .unwrap();
        ch.try_send(Class::Low, far(&clock), (Class::Low, 1))
            .unwrap();
        // One LOW may run at a time: the first is taken, the second waits until it ends.
        let limited = || ch.recv_timeout_limiting_low(Duration::from_millis(1), 1);
        assert!(matches!(limited(), Some(Taken::Run((Class::Low, 0), _, _))));
        assert!(limited().is_none());
        assert_eq!(ch.running_low(), 1);
        // Other classes are served meanwhile.
        ch.try_send(Class::Normal, far(&clock), (Class::Normal, 2))
            .unwrap();
        assert!(matches!(
            limited(),
            Some(Taken::Run((Class::Normal, 2), _, _))
        ));
        ch.record_service(Class::Low, Duration::from_millis(1));
        assert!(matches!(limited(), Some(Taken::Run((Class::Low, 1), _, _))));
    }

    #[test]
    fn low_in_the_node_is_bounded_by_the_workers() {
        let clock = TestClock::new();
        let ch = PriorityMessageChannel::new(
            ChannelPolicy {
                enabled: true,
                weights: [3, 2, 1],
                queue_capacity: 100,
                low_per_worker: Some(1),
            },
            4,
            Box::new(clock.clone()),
        );
        for i in 0..4 {
            ch.try_send(Class::Low, far(&clock), (Class::Low, i))
                .unwrap();
        }
        assert!(matches!(
            ch.try_send(Class::Low, far(&clock), (Class::Low, 4)),
            Err(Refused::QueueFull { capacity: 4, .. })
        ));
        // Taken but still running counts too.
        assert!(matches!(ch.try_recv(), Some(Taken::Run(_, Class::Low, _))));
        assert!(
            ch.try_send(Class::Low, far(&clock), (Class::Low, 5))
                .is_err()
        );
        ch.record_service(Class::Low, Duration::from_millis(1));
        assert!(
            ch.try_send(Class::Low, far(&clock), (Class::Low, 6))
                .is_ok()
        );
        // Other classes are not bounded by it, and with priority off neither is LOW.
        for i in 0..20 {
            ch.try_send(Class::Normal, far(&clock), (Class::Normal, i))
                .unwrap();
        }
        ch.set_policy(ChannelPolicy {
            enabled: false,
            weights: [3, 2, 1],
            queue_capacity: 100,
            low_per_worker: Some(1),
        });
        assert!(
            ch.try_send(Class::Low, far(&clock), (Class::Low, 7))
                .is_ok()
        );
    }

    #[test]
    fn overload_sheds_low_then_normal_then_high_never_critical() {
        let (ch, clock) = channel(true);
        // Service time 10 ms per job, 4 workers.
        for _ in 0..100 {
            for c in Class::ALL {
                ch.record_service(c, Duration::from_millis(10));
            }
        }
        let deadline = clock.now() + Duration::from_millis(1000);
        let mut shed_at = std::collections::BTreeMap::new();
        for i in 0..2000u64 {
            for c in [Class::Low, Class::Normal, Class::High, Class::Critical] {
                if shed_at.contains_key(&c) {
                    continue;
                }
                match ch.try_send(c, deadline, (c, i)) {
                    Ok(()) => {}
                    Err(Refused::Overloaded { retry_after, .. }) => {
                        assert!(retry_after > Duration::ZERO);
                        shed_at.insert(c, ch.len());
                    }
                    Err(e) => panic!("{e}"),
                }
            }
        }
        let low = shed_at[&Class::Low];
        let normal = shed_at[&Class::Normal];
        let high = shed_at[&Class::High];
        assert!(
            low < normal && normal < high,
            "shed order LOW {low} < NORMAL {normal} < HIGH {high}"
        );
        assert!(
            !shed_at.contains_key(&Class::Critical),
            "CRITICAL is never shed"
        );
        assert_eq!(ch.stats().classes[Class::Low as usize].shed, 1);
    }

    #[test]
    fn critical_is_bounded_too() {
        let clock = TestClock::new();
        let ch = PriorityMessageChannel::new(
            ChannelPolicy {
                enabled: true,
                weights: [3, 2, 1],
                queue_capacity: 3,
                low_per_worker: None,
            },
            1,
            Box::new(clock.clone()),
        );
        for i in 0..3 {
            ch.try_send(Class::Critical, far(&clock), (Class::Critical, i))
                .unwrap();
        }
        assert!(matches!(
            ch.try_send(Class::Critical, far(&clock), (Class::Critical, 3)),
            Err(Refused::QueueFull {
                class: Class::Critical,
                capacity: 3,
                ..
            })
        ));
    }

    #[test]
    fn full_queue_refuses_and_expired_requests_never_run() {
        let clock = TestClock::new();
        let ch = PriorityMessageChannel::new(
            ChannelPolicy {
                enabled: true,
                weights: [3, 2, 1],
                queue_capacity: 2,
                low_per_worker: None,
            },
            1,
            Box::new(clock.clone()),
        );
        let soon = clock.now() + Duration::from_millis(50);
        ch.try_send(Class::Normal, soon, (Class::Normal, 1))
            .unwrap();
        ch.try_send(Class::Normal, far(&clock), (Class::Normal, 2))
            .unwrap();
        assert!(matches!(
            ch.try_send(Class::Normal, far(&clock), (Class::Normal, 3)),
            Err(Refused::QueueFull { capacity: 2, .. })
        ));
        clock.advance(Duration::from_millis(60));
        assert!(matches!(ch.try_recv(), Some(Taken::Expired((_, 1)))));
        assert_eq!(run(ch.try_recv()).1, 2);
        let st = ch.stats().classes[Class::Normal as usize].clone();
        assert_eq!(
            (st.enqueued, st.served, st.shed, st.expired, st.depth),
            (2, 1, 1, 1, 0)
        );
        assert_eq!(
            st.wait_buckets[2], 2,
            "both waited 60 ms (10-100 ms bucket)"
        );
    }

    #[test]
    fn a_request_is_served_inline_only_when_nobody_waits_and_never_a_low_one() {
        let (ch, clock) = channel(true);
        assert!(ch.try_serve_inline(Class::Normal), "nothing queued");
        assert!(ch.try_serve_inline(Class::Critical));
        assert!(!ch.try_serve_inline(Class::Low), "LOW always queues");
        ch.try_send(Class::Low, far(&clock), (Class::Low, 1))
            .unwrap();
        for c in [Class::Critical, Class::High, Class::Normal] {
            assert!(!ch.try_serve_inline(c), "{c:?} would pass a queued request");
        }
        run(ch.try_recv());
        assert!(ch.try_serve_inline(Class::High), "the queue drained");
        let normal = ch.stats().classes[Class::Normal as usize].clone();
        assert_eq!(
            (normal.enqueued, normal.served, normal.wait_buckets[0]),
            (1, 1, 1),
            "served inline counts as enqueued and served with no wait"
        );
        ch.close();
        assert!(!ch.try_serve_inline(Class::Normal), "closed");
    }
}
