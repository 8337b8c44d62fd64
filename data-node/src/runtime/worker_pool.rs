//! The storage stage: a pool of OS threads that takes client requests from the
//! [`PriorityMessageChannel`](crate::runtime::priority_channel::PriorityMessageChannel) and runs them (storage reads,
//! validation and encoding of writes, handing proposals to Raft), sized by a [`ThreadPoolScaler`].
//!
//! The pool's thread count really changes: growing spawns threads, shrinking lowers the target and the
//! threads above it exit after finishing their current request. Every `evaluation_interval` the scaler
//! reads utilisation (time spent running requests ÷ threads × interval) and the queue length averaged
//! over the interval (time-weighted; an instant sample of a bursty queue says little); above
//! `scale_up_threshold` percent, or with more requests waiting on average than there are threads, it wants
//! to grow by `scale_increment`; below `scale_down_threshold` with less than one request waiting on
//! average it wants to shrink. Hysteresis: a
//! decision must hold for two consecutive intervals, and after a change the scaler waits two intervals
//! before the next, so a steady load at a threshold does not make it oscillate.
//!
//! Priority does not stop at the queue: once more threads are runnable than there are cores, the kernel
//! shares the CPU between them equally, so a HIGH request taken first would still share the CPU with
//! every LOW scan already running. A worker therefore runs each LOW request at OS nice [`LOW_NICE`] (a
//! tenth of a normal thread's CPU weight when they compete, nothing lost when the CPU is otherwise idle)
//! and every other class at nice 0. Going back from 10 to 0 needs `CAP_SYS_NICE` (or `RLIMIT_NICE`); the
//! pool checks this at start and, where it is not allowed, runs every class at the process's priority and
//! says so in the log.
//!
//! Two more rules keep a LOW flood from holding the threads themselves: with two threads or more, one is
//! always kept free of LOW work (LOW requests wait in the queue rather than take the last thread), so a
//! HIGH or CRITICAL request finds a thread at once; in a pool of one thread, a HIGH or CRITICAL request
//! that has to wait lifts the LOW request running on it back to nice 0 (priority inheritance), so it is
//! not stuck behind a thread the CPU serves last. Lifting in larger pools was measured and dropped: with
//! HIGH requests arriving every few milliseconds it put the whole flood back at nice 0.
//!
//! The network stage (gRPC I/O, HTTP/2 and protobuf, threads named `kiwi-network`) is tokio's runtime with
//! `runtime.network_threads` threads, fixed at start, and deliberately not scaled. Tokio cannot resize a
//! running runtime; instead the stage was designed so it does no request work of its own: handlers parse,
//! enqueue and await, while every storage call, every write's encoding and hand-off to Raft, and the
//! encoding of a scan's answer ([`Encoded`](kiwi_proto::encoded::Encoded)) run in this pool, which is
//! what scales. What is left in the network stage is CPU-bound, so more threads than cores
//! would not add capacity there, only contention (with LOW scans flooding a node pinned to one core, the
//! CPU time-sharing between runnable threads was what delayed HIGH requests, see `LOW_NICE` above).

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant, SystemTime};

use opentelemetry::KeyValue;
use opentelemetry::metrics::{Counter, Histogram, Meter};

use crate::runtime::priority_channel::{Class, PriorityMessageChannel, Taken};
use crate::telemetry::metrics::LATENCY_BUCKETS;

/// The OS nice value LOW requests run at (CFS weight 110 against 1024 at nice 0).
pub const LOW_NICE: i32 = 10;

/// The calling thread's kernel id.
#[cfg(target_os = "linux")]
fn current_tid() -> i64 {
    // SAFETY: a plain syscall without arguments.
    unsafe { libc::syscall(libc::SYS_gettid) }
}

#[cfg(not(target_os = "linux"))]
fn current_tid() -> i64 {
    0
}

/// Sets a thread's nice value (Linux: nice is per thread).
#[cfg(target_os = "linux")]
fn set_nice_of(tid: i64, nice: i32) -> std::io::Result<()> {
    let tid = libc::id_t::try_from(tid).map_err(std::io::Error::other)?;
    // SAFETY: a plain syscall; no memory is passed.
    let rc = unsafe { libc::setpriority(libc::PRIO_PROCESS, tid, nice) };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

#[cfg(not(target_os = "linux"))]
fn set_nice_of(_tid: i64, _nice: i32) -> std::io::Result<()> {
    Err(std::io::Error::from(std::io::ErrorKind::Unsupported))
}

fn set_thread_nice(nice: i32) -> std::io::Result<()> {
    set_nice_of(current_tid(), nice)
}

/// The calling thread's nice value.
#[cfg(target_os = "linux")]
fn thread_nice() -> i32 {
    // SAFETY: plain syscalls on the calling thread.
    unsafe {
        let tid = libc::syscall(libc::SYS_gettid) as libc::id_t;
        libc::getpriority(libc::PRIO_PROCESS, tid)
    }
}

#[cfg(not(target_os = "linux"))]
fn thread_nice() -> i32 {
    0
}

/// Whether a thread may lower its priority for a LOW request and raise it back afterwards (checked on a
/// short-lived thread of its own).
fn os_priority_allowed(base: i32) -> bool {
    std::thread::spawn(move || {
        set_thread_nice(low_nice(base)).is_ok() && set_thread_nice(base).is_ok()
    })
    .join()
    .unwrap_or(false)
}

/// The nice value LOW requests run at, for threads whose normal nice value is `base`.
fn low_nice(base: i32) -> i32 {
    (base + LOW_NICE).min(19)
}

/// One request's work, run by a pool thread (or answered as expired without running).
pub trait Job: Send {
    fn run(self: Box<Self>);
    fn expire(self: Box<Self>);
}

/// What the scaler is told to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScalingPolicy {
    pub enabled: bool,
    pub min_threads: usize,
    pub max_threads: usize,
    pub scale_up_threshold: u8,
    pub scale_down_threshold: u8,
    pub scale_increment: usize,
    pub evaluation_interval: Duration,
}

impl From<&crate::config::ScalingConfig> for ScalingPolicy {
    fn from(c: &crate::config::ScalingConfig) -> Self {
        ScalingPolicy {
            enabled: c.enabled,
            min_threads: c.min_storage_threads,
            max_threads: c.max_storage_threads,
            scale_up_threshold: c.scale_up_threshold,
            scale_down_threshold: c.scale_down_threshold,
            scale_increment: c.scale_increment,
            evaluation_interval: c.evaluation_interval,
        }
    }
}

/// One change of the pool size.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScaleEvent {
    pub at: SystemTime,
    pub from: usize,
    pub to: usize,
    pub reason: String,
    /// Mean queue wait of the requests taken in the evaluation interval before the change.
    pub wait_before: Duration,
    /// The same over the interval after it; `None` until that interval has ended.
    pub wait_after: Option<Duration>,
}

/// The pool's OpenTelemetry instruments (the `runtime` metric family), attributes built once.
struct PoolInstruments {
    queue_wait: Histogram<f64>,
    processing: Histogram<f64>,
    scale_events: Counter<u64>,
    /// `priority` attribute per class, CRITICAL first.
    class: [[KeyValue; 1]; 4],
    /// `direction` attribute: up, down.
    direction: [[KeyValue; 1]; 2],
}

impl PoolInstruments {
    fn new(meter: &Meter) -> PoolInstruments {
        PoolInstruments {
            queue_wait: meter
                .f64_histogram("kiwi_runtime_queue_wait")
                .with_unit("s")
                .with_description("Time a request waited in the priority channel, per priority")
                .with_boundaries(LATENCY_BUCKETS.to_vec())
                .build(),
            processing: meter
                .f64_histogram("kiwi_runtime_processing")
                .with_unit("s")
                .with_description("Time a storage worker spent on a request, per priority")
                .with_boundaries(LATENCY_BUCKETS.to_vec())
                .build(),
            scale_events: meter
                .u64_counter("kiwi_runtime_scale_events")
                .with_description("Storage pool resizes, by direction (up, down)")
                .build(),
            class: Class::ALL.map(|c| [KeyValue::new("priority", c.name())]),
            direction: ["up", "down"].map(|d| [KeyValue::new("direction", d)]),
        }
    }
}

/// Registers the pool's and the channel's gauges and counters, read at each scrape.
fn register_gauges(meter: &Meter, shared: &Arc<Shared>) {
    // Counters start at zero, so their series exist before the first event.
    for attrs in &shared.instruments.direction {
        shared.instruments.scale_events.add(0, attrs);
    }
    let s = Arc::clone(shared);
    meter
        .u64_observable_gauge("kiwi_runtime_storage_threads")
        .with_description("Storage worker threads running")
        .with_callback(move |o| o.observe(s.live.load(Ordering::Relaxed) as u64, &[]))
        .build();
    let s = Arc::clone(shared);
    meter
        .u64_observable_gauge("kiwi_runtime_storage_threads_target")
        .with_description("Storage worker threads the scaler wants")
        .with_callback(move |o| o.observe(s.target.load(Ordering::Relaxed) as u64, &[]))
        .build();
    let s = Arc::clone(shared);
    meter
        .f64_observable_gauge("kiwi_runtime_storage_utilisation")
        .with_unit("1")
        .with_description(
            "Share of the storage threads' time spent running requests, last interval",
        )
        .with_callback(move |o| {
            let pct = *s.utilisation.lock().unwrap_or_else(PoisonError::into_inner);
            o.observe(pct / 100.0, &[]);
        })
        .build();
    let class_attrs = || Class::ALL.map(|c| [KeyValue::new("priority", c.name())]);
    let s = Arc::clone(shared);
    let attrs = class_attrs();
    meter
        .u64_observable_gauge("kiwi_runtime_queue_depth")
        .with_description("Requests waiting in the priority channel, per priority")
        .with_callback(move |o| {
            let stats = s.channel.stats();
            for (c, attrs) in stats.classes.iter().zip(&attrs) {
                o.observe(c.depth as u64, attrs);
            }
        })
        .build();
    type Pick = fn(&crate::runtime::priority_channel::ClassStats) -> u64;
    let counters: [(&str, &str, Pick); 4] = [
        (
            "kiwi_runtime_requests_enqueued",
            "Requests admitted to the priority channel",
            |c| c.enqueued,
        ),
        (
            "kiwi_runtime_requests_served",
            "Requests taken by a storage worker",
            |c| c.served,
        ),
        (
            "kiwi_runtime_requests_shed",
            "Requests refused by admission control (RESOURCE_EXHAUSTED)",
            |c| c.shed,
        ),
        (
            "kiwi_runtime_requests_expired",
            "Requests whose deadline passed while they waited",
            |c| c.expired,
        ),
    ];
    for (name, description, pick) in counters {
        let s = Arc::clone(shared);
        let attrs = class_attrs();
        meter
            .u64_observable_counter(name)
            .with_description(description)
            .with_callback(move |o| {
                let stats = s.channel.stats();
                for (c, attrs) in stats.classes.iter().zip(&attrs) {
                    o.observe(pick(c), attrs);
                }
            })
            .build();
    }
    type Wait = fn(&ScaleEvent) -> Option<Duration>;
    let waits: [(&str, &str, Wait); 2] = [
        (
            "kiwi_runtime_scale_wait_before",
            "Mean queue wait over the interval before the last pool resize",
            |e| Some(e.wait_before),
        ),
        (
            "kiwi_runtime_scale_wait_after",
            "Mean queue wait over the interval after the last pool resize",
            |e| e.wait_after,
        ),
    ];
    for (name, description, pick) in waits {
        let s = Arc::clone(shared);
        meter
            .f64_observable_gauge(name)
            .with_unit("s")
            .with_description(description)
            .with_callback(move |o| {
                let events = s.events.lock().unwrap_or_else(PoisonError::into_inner);
                if let Some(w) = events.back().and_then(pick) {
                    o.observe(w.as_secs_f64(), &[]);
                }
            })
            .build();
    }
}

/// `ScalingMetrics`: the pool as the scaler sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct ScalingMetrics {
    pub current: usize,
    pub target: usize,
    /// Utilisation over the last interval, percent.
    pub utilisation: f64,
    pub queue_len: usize,
    /// The most recent scale events, oldest first.
    pub events: Vec<ScaleEvent>,
}

/// Scale events kept.
const EVENTS_KEPT: usize = 32;

/// The pure decision logic of the scaler (no threads, no clock), so it can be tested step by step.
#[derive(Debug)]
pub struct ThreadPoolScaler {
    policy: ScalingPolicy,
    /// Direction wanted at the previous evaluation (+1 grow, -1 shrink, 0 hold).
    pending: i8,
    /// Evaluations left before another change is allowed.
    cooldown: u32,
}

impl ThreadPoolScaler {
    pub fn new(policy: ScalingPolicy) -> Self {
        ThreadPoolScaler {
            policy,
            pending: 0,
            cooldown: 0,
        }
    }

    pub fn policy(&self) -> &ScalingPolicy {
        &self.policy
    }

    pub fn set_policy(&mut self, policy: ScalingPolicy) {
        self.policy = policy;
        self.pending = 0;
    }

    /// One evaluation: returns the new target size and the reason, or `None` to hold.
    pub fn evaluate(
        &mut self,
        current: usize,
        utilisation_pct: f64,
        mean_queue: f64,
    ) -> Option<(usize, String)> {
        let p = &self.policy;
        let clamped = current.clamp(p.min_threads, p.max_threads);
        if !p.enabled {
            return (clamped != current)
                .then(|| (clamped, "scaling disabled: back within bounds".into()));
        }
        if clamped != current {
            return Some((clamped, "outside the configured bounds".into()));
        }
        if self.cooldown > 0 {
            self.cooldown -= 1;
            return None;
        }
        let want: i8 =
            if utilisation_pct > f64::from(p.scale_up_threshold) || mean_queue > current as f64 {
                if current < p.max_threads { 1 } else { 0 }
            } else if utilisation_pct < f64::from(p.scale_down_threshold) && mean_queue < 1.0 {
                if current > p.min_threads { -1 } else { 0 }
            } else {
                0
            };
        let confirmed = want != 0 && want == self.pending;
        self.pending = want;
        if !confirmed {
            return None;
        }
        self.pending = 0;
        self.cooldown = 2;
        let (to, reason) = if want > 0 {
            (
                (current + p.scale_increment).min(p.max_threads),
                format!(
                    "utilisation {utilisation_pct:.0}% > {}% or {mean_queue:.1} queued on average",
                    p.scale_up_threshold
                ),
            )
        } else {
            (
                current.saturating_sub(p.scale_increment).max(p.min_threads),
                format!(
                    "utilisation {utilisation_pct:.0}% < {}% and {mean_queue:.1} queued on average",
                    p.scale_down_threshold
                ),
            )
        };
        Some((to, reason))
    }
}

struct Shared {
    channel: Arc<PriorityMessageChannel<Box<dyn Job>>>,
    target: AtomicUsize,
    live: AtomicUsize,
    busy_ns: AtomicU64,
    stop: AtomicBool,
    scaler: Mutex<ThreadPoolScaler>,
    events: Mutex<VecDeque<ScaleEvent>>,
    utilisation: Mutex<f64>,
    /// Queue wait of every request taken, summed (ns), and how many: per-interval means for scale events.
    waited_ns: AtomicU64,
    waited_count: AtomicU64,
    instruments: PoolInstruments,
    /// LOW requests run at [`LOW_NICE`].
    os_priority: bool,
    /// Threads running a LOW request at [`LOW_NICE`] right now (kernel thread ids).
    low_running: Mutex<Vec<i64>>,
    /// The nice value the pool was started with: what every class but LOW runs at.
    base_nice: i32,
}

/// The storage worker pool and its scaler thread.
pub struct WorkerPool {
    shared: Arc<Shared>,
}

impl WorkerPool {
    /// Starts `policy.min_threads` workers and the scaler; records the `runtime` metrics into `meter`.
    pub fn start(
        channel: Arc<PriorityMessageChannel<Box<dyn Job>>>,
        policy: ScalingPolicy,
        meter: &Meter,
    ) -> Arc<WorkerPool> {
        let start = policy.min_threads.max(1);
        let base_nice = thread_nice();
        let shared = Arc::new(Shared {
            channel,
            target: AtomicUsize::new(start),
            live: AtomicUsize::new(0),
            busy_ns: AtomicU64::new(0),
            stop: AtomicBool::new(false),
            scaler: Mutex::new(ThreadPoolScaler::new(policy)),
            events: Mutex::new(VecDeque::new()),
            utilisation: Mutex::new(0.0),
            waited_ns: AtomicU64::new(0),
            waited_count: AtomicU64::new(0),
            instruments: PoolInstruments::new(meter),
            os_priority: os_priority_allowed(base_nice),
            low_running: Mutex::new(Vec::new()),
            base_nice,
        });
        if shared.os_priority {
            tracing::info!(nice = LOW_NICE, "LOW requests run at a lower OS priority");
        } else {
            tracing::warn!(
                "cannot raise a thread's priority back after a LOW request (needs CAP_SYS_NICE or \
                 RLIMIT_NICE): every class runs at the same OS priority"
            );
        }
        register_gauges(meter, &shared);
        shared.channel.set_workers(start);
        for _ in 0..start {
            spawn_worker(&shared);
        }
        let s = Arc::clone(&shared);
        std::thread::Builder::new()
            .name("kiwi-scaler".into())
            .spawn(move || scaler_loop(&s))
            .expect("spawn the scaler thread");
        Arc::new(WorkerPool { shared })
    }

    /// The current scaling policy.
    pub fn policy(&self) -> ScalingPolicy {
        self.shared
            .scaler
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .policy()
            .clone()
    }

    /// Replaces the scaling policy (already validated); the next evaluation applies it.
    pub fn set_policy(&self, policy: ScalingPolicy) {
        self.shared
            .scaler
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .set_policy(policy);
    }

    /// Current size, target, utilisation and recent scale events.
    pub fn metrics(&self) -> ScalingMetrics {
        ScalingMetrics {
            current: self.shared.live.load(Ordering::SeqCst),
            target: self.shared.target.load(Ordering::SeqCst),
            utilisation: *self
                .shared
                .utilisation
                .lock()
                .unwrap_or_else(PoisonError::into_inner),
            queue_len: self.shared.channel.len(),
            events: self
                .shared
                .events
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .iter()
                .cloned()
                .collect(),
        }
    }

    /// [`PriorityMessageChannel::try_serve_inline`], recording the request's wait (none) as a worker
    /// records a queued one's. Its processing is not the pool's and is not recorded.
    pub fn try_serve_inline(&self, class: Class) -> bool {
        let s = &self.shared;
        if !s.channel.try_serve_inline(class) {
            return false;
        }
        s.instruments
            .queue_wait
            .record(0.0, &s.instruments.class[class as usize]);
        s.waited_count.fetch_add(1, Ordering::Relaxed);
        true
    }

    /// Whether LOW requests run at [`LOW_NICE`].
    pub fn os_priority(&self) -> bool {
        self.shared.os_priority
    }

    /// Priority inheritance, called after a HIGH or CRITICAL request was queued: if it is still waiting
    /// and every thread is running a LOW request at [`LOW_NICE`] (only possible in a pool of one thread:
    /// larger pools keep one thread free of LOW work), those go back to nice 0, so the thread it waits for
    /// is not the one the CPU serves last.
    pub fn urgent_queued(&self) {
        // Only in a pool of one (checked first: this runs for every HIGH request). Larger pools keep a
        // thread free of LOW work for the request, and lifting would hand the CPU back to a LOW flood.
        let live = self.shared.live.load(Ordering::SeqCst);
        if !self.shared.os_priority
            || live > 1
            || self.shared.channel.is_empty()
            || self.shared.channel.running_low() < live
        {
            return;
        }
        let mut running = self
            .shared
            .low_running
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        // A thread that could not be lifted stays listed, so it still knows it runs at LOW's priority.
        running.retain(|&tid| match set_nice_of(tid, self.shared.base_nice) {
            Ok(()) => false,
            Err(e) => {
                tracing::warn!(error = %e, tid, "cannot lift a worker's OS priority");
                true
            }
        });
    }

    /// Stops every thread once the queue is drained.
    pub fn stop(&self) {
        self.shared.channel.close();
        self.shared.stop.store(true, Ordering::SeqCst);
    }
}

fn spawn_worker(shared: &Arc<Shared>) {
    shared.live.fetch_add(1, Ordering::SeqCst);
    let s = Arc::clone(shared);
    let spawned = std::thread::Builder::new()
        .name("kiwi-storage".into())
        .spawn(move || worker_loop(&s));
    if let Err(e) = spawned {
        shared.live.fetch_sub(1, Ordering::SeqCst);
        tracing::error!(error = %e, "cannot spawn a storage worker thread");
    }
}

fn worker_loop(s: &Shared) {
    let tid = current_tid();
    let (base, low) = (s.base_nice, low_nice(s.base_nice));
    let mut nice = thread_nice();
    let set_nice = |nice: &mut i32, want: i32| {
        if *nice != want {
            match set_nice_of(tid, want) {
                Ok(()) => *nice = want,
                Err(e) => tracing::warn!(error = %e, want, "cannot set a worker's OS priority"),
            }
        }
    };
    loop {
        // Threads above the target leave (after their last request).
        let live = s.live.load(Ordering::SeqCst);
        if live > s.target.load(Ordering::SeqCst)
            && s.live
                .compare_exchange(live, live - 1, Ordering::SeqCst, Ordering::SeqCst)
                .is_ok()
        {
            return;
        }
        // With two threads or more, one is always kept free of LOW work, so a HIGH or CRITICAL request
        // arriving during a LOW flood finds a thread instead of waiting behind LOW requests.
        let live = s.live.load(Ordering::SeqCst);
        let low_limit = if live <= 1 { usize::MAX } else { live - 1 };
        match s
            .channel
            .recv_timeout_limiting_low(Duration::from_millis(100), low_limit)
        {
            Some(Taken::Run(job, class, dequeued)) => {
                let attrs = &s.instruments.class[dequeued.class as usize];
                s.instruments
                    .queue_wait
                    .record(dequeued.waited.as_secs_f64(), attrs);
                s.waited_ns.fetch_add(
                    u64::try_from(dequeued.waited.as_nanos()).unwrap_or(u64::MAX),
                    Ordering::Relaxed,
                );
                s.waited_count.fetch_add(1, Ordering::Relaxed);
                let mut low_registered = false;
                if s.os_priority && class == Class::Low {
                    // Under the lock, so `urgent_queued` lifts either before (and this sees the waiting
                    // request) or after (and the job is registered). In a pool of one, a LOW request taken
                    // while a HIGH or CRITICAL one waits runs at the normal priority.
                    let mut running = s.low_running.lock().unwrap_or_else(PoisonError::into_inner);
                    let urgent_waiting =
                        s.live.load(Ordering::SeqCst) <= 1 && s.channel.urgent_len() > 0;
                    if urgent_waiting {
                        set_nice(&mut nice, base);
                    } else {
                        set_nice(&mut nice, low);
                        if nice == low {
                            running.push(tid);
                            low_registered = true;
                        }
                    }
                } else {
                    set_nice(&mut nice, base);
                }
                let t = Instant::now();
                // A panicking request must not take the thread (and its place in the counts) with it.
                if std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| job.run())).is_err() {
                    tracing::error!(
                        class = class.name(),
                        "a request panicked in the storage stage"
                    );
                }
                let took = t.elapsed();
                if low_registered {
                    let mut running = s.low_running.lock().unwrap_or_else(PoisonError::into_inner);
                    match running.iter().position(|&t| t == tid) {
                        Some(i) => {
                            running.swap_remove(i);
                        }
                        // Lifted while it ran.
                        None => nice = base,
                    }
                    drop(running);
                    // Wait for the next request at the normal priority: a HIGH one arriving at an idle
                    // pool should not wake a nice thread.
                    if s.channel.is_empty() {
                        set_nice(&mut nice, base);
                    }
                }
                s.busy_ns.fetch_add(
                    u64::try_from(took.as_nanos()).unwrap_or(u64::MAX),
                    Ordering::Relaxed,
                );
                s.channel.record_service(class, took);
                s.instruments.processing.record(took.as_secs_f64(), attrs);
            }
            Some(Taken::Expired(job)) => job.expire(),
            None if s.stop.load(Ordering::SeqCst) && s.channel.is_empty() => {
                s.live.fetch_sub(1, Ordering::SeqCst);
                return;
            }
            None => {}
        }
    }
}

/// Longest sleep of the scaler between checks of its policy and of the stop flag.
const SCALER_SLICE: Duration = Duration::from_millis(50);

fn scaler_loop(s: &Arc<Shared>) {
    let mut last = Instant::now();
    let mut last_busy = s.busy_ns.load(Ordering::Relaxed);
    let mut last_waited = (0u64, 0u64);
    while !s.stop.load(Ordering::SeqCst) {
        // Sleep in short slices, re-reading the interval: a new policy (or a stop) takes effect within
        // one slice, not after a long interval set earlier has run out.
        loop {
            let interval = s
                .scaler
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .policy()
                .evaluation_interval;
            let left = interval.saturating_sub(last.elapsed());
            if left.is_zero() || s.stop.load(Ordering::SeqCst) {
                break;
            }
            std::thread::sleep(left.min(SCALER_SLICE));
        }
        if s.stop.load(Ordering::SeqCst) {
            return;
        }
        let now = Instant::now();
        let busy = s.busy_ns.load(Ordering::Relaxed);
        let live = s.live.load(Ordering::SeqCst).max(1);
        let capacity = now.duration_since(last).as_nanos() as f64 * live as f64;
        let util = if capacity > 0.0 {
            (busy - last_busy) as f64 / capacity * 100.0
        } else {
            0.0
        };
        (last, last_busy) = (now, busy);
        *s.utilisation.lock().unwrap_or_else(PoisonError::into_inner) = util;
        let waited = (
            s.waited_ns.load(Ordering::Relaxed),
            s.waited_count.load(Ordering::Relaxed),
        );
        let mean_wait = Duration::from_nanos(
            (waited.0 - last_waited.0)
                .checked_div(waited.1 - last_waited.1)
                .unwrap_or(0),
        );
        last_waited = waited;
        {
            // The interval after the last resize has ended: its mean wait is that resize's effect.
            let mut events = s.events.lock().unwrap_or_else(PoisonError::into_inner);
            if let Some(e) = events.back_mut()
                && e.wait_after.is_none()
            {
                e.wait_after = Some(mean_wait);
            }
        }
        let target = s.target.load(Ordering::SeqCst);
        let decision = s
            .scaler
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .evaluate(target, util, s.channel.mean_queue_len());
        if let Some((to, reason)) = decision {
            tracing::info!(from = target, to, %reason, "storage pool resized");
            s.target.store(to, Ordering::SeqCst);
            s.channel.set_workers(to);
            for _ in s.live.load(Ordering::SeqCst)..to {
                spawn_worker(s);
            }
            let mut events = s.events.lock().unwrap_or_else(PoisonError::into_inner);
            s.instruments
                .scale_events
                .add(1, &s.instruments.direction[usize::from(to < target)]);
            events.push_back(ScaleEvent {
                at: SystemTime::now(),
                from: target,
                to,
                reason,
                wait_before: mean_wait,
                wait_after: None,
            });
            while events.len() > EVENTS_KEPT {
                events.pop_front();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::runtime::priority_channel::{ChannelPolicy, SystemClock};

    fn policy() -> ScalingPolicy {
        ScalingPolicy {
            enabled: true,
            min_threads: 2,
            max_threads: 8,
            scale_up_threshold: 80,
            scale_down_threshold: 20,
            scale_increment: 2,
            evaluation_interval: Duration::from_millis(100),
        }
    }

    #[test]
    fn grows_on_sustained_load_and_respects_max() {
        let mut s = ThreadPoolScaler::new(policy());
        let mut size = 2;
        let mut steps = Vec::new();
        for _ in 0..20 {
            if let Some((to, _)) = s.evaluate(size, 95.0, 50.0) {
                size = to;
                steps.push(to);
            }
        }
        assert_eq!(steps, vec![4, 6, 8], "grows by the increment up to max");
        // One busy interval alone is not enough.
        let mut s = ThreadPoolScaler::new(policy());
        assert_eq!(s.evaluate(2, 95.0, 0.0), None);
        assert_eq!(s.evaluate(2, 50.0, 0.0), None);
        assert_eq!(s.evaluate(2, 95.0, 0.0), None);
    }

    #[test]
    fn shrinks_on_idle_and_respects_min() {
        let mut s = ThreadPoolScaler::new(policy());
        let mut size = 8;
        for _ in 0..30 {
            if let Some((to, _)) = s.evaluate(size, 1.0, 0.0) {
                size = to;
            }
        }
        assert_eq!(size, 2);
    }

    #[test]
    fn a_steady_load_at_the_threshold_does_not_oscillate() {
        let mut s = ThreadPoolScaler::new(policy());
        let mut changes = 0;
        for i in 0..100 {
            // Utilisation wobbling around the up threshold, queue empty.
            let util = if i % 2 == 0 { 81.0 } else { 79.0 };
            if s.evaluate(4, util, 0.0).is_some() {
                changes += 1;
            }
        }
        assert_eq!(changes, 0);
    }

    /// A priority channel (priority on, weights 3/2/1) drained by a pool fixed at `threads`.
    fn fixed_pool(
        threads: usize,
        low_per_worker: Option<usize>,
    ) -> (Arc<PriorityMessageChannel<Box<dyn Job>>>, Arc<WorkerPool>) {
        let channel = Arc::new(PriorityMessageChannel::new(
            ChannelPolicy {
                enabled: true,
                weights: [3, 2, 1],
                queue_capacity: 16,
                low_per_worker,
            },
            threads,
            Box::new(SystemClock),
        ));
        let pool = WorkerPool::start(
            Arc::clone(&channel),
            ScalingPolicy {
                enabled: false,
                min_threads: threads,
                max_threads: threads,
                ..policy()
            },
            &opentelemetry::global::meter("test"),
        );
        (channel, pool)
    }

    #[test]
    fn a_new_policy_replaces_a_long_evaluation_interval_at_once() {
        let channel = Arc::new(PriorityMessageChannel::new(
            ChannelPolicy {
                enabled: true,
                weights: [3, 2, 1],
                queue_capacity: 16,
                low_per_worker: None,
            },
            1,
            Box::new(SystemClock),
        ));
        let pool = WorkerPool::start(
            Arc::clone(&channel),
            ScalingPolicy {
                min_threads: 1,
                max_threads: 4,
                evaluation_interval: Duration::from_secs(3600),
                ..policy()
            },
            &opentelemetry::global::meter("test"),
        );
        // The defaults come back (minimum 3): the pool reaches them without waiting out the hour.
        pool.set_policy(ScalingPolicy {
            min_threads: 3,
            max_threads: 4,
            ..policy()
        });
        let deadline = Instant::now() + Duration::from_secs(20);
        while pool.metrics().target < 3 {
            assert!(
                Instant::now() < deadline,
                "the pool still runs the old interval: {:?}",
                pool.metrics().target
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        pool.stop();
    }

    /// A job that reports the nice value of the thread that runs it.
    struct ReportNice(std::sync::mpsc::Sender<i32>);

    impl Job for ReportNice {
        fn run(self: Box<Self>) {
            self.0.send(thread_nice()).expect("test receiver alive");
        }
        fn expire(self: Box<Self>) {
            panic!("nothing expires in this test");
        }
    }

    #[test]
    fn low_requests_run_at_a_lower_os_priority_and_others_do_not() {
        let (channel, pool) = fixed_pool(1, None);
        let allowed = os_priority_allowed(thread_nice());
        let (tx, rx) = std::sync::mpsc::channel();
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut seen = Vec::new();
        for class in [
            Class::Low,
            Class::High,
            Class::Low,
            Class::Normal,
            Class::Critical,
        ] {
            let job: Box<dyn Job> = Box::new(ReportNice(tx.clone()));
            assert!(channel.try_send(class, deadline, job).is_ok());
            seen.push(
                rx.recv_timeout(Duration::from_secs(10))
                    .expect("the job ran"),
            );
        }
        let low = if allowed { LOW_NICE } else { 0 };
        assert_eq!(seen, [low, 0, low, 0, 0], "OS priority allowed: {allowed}");
        // With priority off every request is one FIFO and runs at the normal priority.
        channel.set_policy(ChannelPolicy {
            enabled: false,
            weights: [3, 2, 1],
            queue_capacity: 16,
            low_per_worker: None,
        });
        let job: Box<dyn Job> = Box::new(ReportNice(tx));
        assert!(channel.try_send(Class::Low, deadline, job).is_ok());
        assert_eq!(rx.recv_timeout(Duration::from_secs(10)), Ok(0));
        pool.stop();
    }

    /// A LOW job that reports its thread's nice value, waits for a signal, and reports it again.
    struct SlowLow {
        report: std::sync::mpsc::Sender<i32>,
        go: std::sync::mpsc::Receiver<()>,
    }

    impl Job for SlowLow {
        fn run(self: Box<Self>) {
            self.report
                .send(thread_nice())
                .expect("test receiver alive");
            self.go.recv().expect("test sender alive");
            self.report
                .send(thread_nice())
                .expect("test receiver alive");
        }
        fn expire(self: Box<Self>) {
            panic!("nothing expires in this test");
        }
    }

    #[test]
    fn a_waiting_high_request_lifts_the_low_request_its_thread_runs() {
        let (channel, pool) = fixed_pool(1, None);
        let allowed = os_priority_allowed(thread_nice());
        let deadline = Instant::now() + Duration::from_secs(30);
        let (report, reports) = std::sync::mpsc::channel();
        let (go, go_rx) = std::sync::mpsc::channel();
        let low: Box<dyn Job> = Box::new(SlowLow {
            report: report.clone(),
            go: go_rx,
        });
        assert!(channel.try_send(Class::Low, deadline, low).is_ok());
        let first = reports.recv_timeout(Duration::from_secs(10)).unwrap();
        assert_eq!(first, if allowed { LOW_NICE } else { 0 });
        // A HIGH request queues behind the only thread, busy with the LOW one.
        let high: Box<dyn Job> = Box::new(ReportNice(report));
        assert!(channel.try_send(Class::High, deadline, high).is_ok());
        pool.urgent_queued();
        go.send(()).unwrap();
        let second = reports.recv_timeout(Duration::from_secs(10)).unwrap();
        assert_eq!(second, 0, "the LOW request finishes at the normal priority");
        assert_eq!(
            reports.recv_timeout(Duration::from_secs(10)),
            Ok(0),
            "then HIGH runs"
        );
        pool.stop();
    }

    #[test]
    fn one_thread_is_kept_free_of_low_work_for_other_classes() {
        let (channel, pool) = fixed_pool(2, None);
        let deadline = Instant::now() + Duration::from_secs(30);
        let wait = Duration::from_secs(10);
        let (ra_tx, ra) = std::sync::mpsc::channel();
        let (go_a, go_a_rx) = std::sync::mpsc::channel();
        let (rb_tx, rb) = std::sync::mpsc::channel();
        let (go_b, go_b_rx) = std::sync::mpsc::channel();
        let (rh_tx, rh) = std::sync::mpsc::channel();
        let low_a: Box<dyn Job> = Box::new(SlowLow {
            report: ra_tx,
            go: go_a_rx,
        });
        assert!(channel.try_send(Class::Low, deadline, low_a).is_ok());
        ra.recv_timeout(wait).expect("the first LOW request starts");
        let low_b: Box<dyn Job> = Box::new(SlowLow {
            report: rb_tx,
            go: go_b_rx,
        });
        assert!(channel.try_send(Class::Low, deadline, low_b).is_ok());
        let high: Box<dyn Job> = Box::new(ReportNice(rh_tx));
        assert!(channel.try_send(Class::High, deadline, high).is_ok());
        rh.recv_timeout(wait)
            .expect("HIGH runs on the thread kept free");
        assert!(
            rb.try_recv().is_err(),
            "the second LOW request waits while the first runs"
        );
        go_a.send(()).unwrap();
        ra.recv_timeout(wait).unwrap();
        rb.recv_timeout(wait)
            .expect("the second LOW request starts once the first ended");
        go_b.send(()).unwrap();
        rb.recv_timeout(wait).unwrap();
        pool.stop();
    }

    struct Panics;

    impl Job for Panics {
        fn run(self: Box<Self>) {
            panic!("a request that panics (expected in this test)");
        }
        fn expire(self: Box<Self>) {}
    }

    #[test]
    fn a_panicking_request_does_not_take_the_thread_or_the_low_count_with_it() {
        let (channel, pool) = fixed_pool(1, Some(1));
        let deadline = Instant::now() + Duration::from_secs(30);
        let boom: Box<dyn Job> = Box::new(Panics);
        assert!(channel.try_send(Class::Low, deadline, boom).is_ok());
        // The next LOW request is admitted once the panicked one no longer counts as running, and the
        // same thread serves it.
        let (tx, rx) = std::sync::mpsc::channel();
        let until = Instant::now() + Duration::from_secs(10);
        loop {
            let job: Box<dyn Job> = Box::new(ReportNice(tx.clone()));
            match channel.try_send(Class::Low, deadline, job) {
                Ok(()) => break,
                Err(e) => {
                    assert!(Instant::now() < until, "the LOW bound never came back: {e}");
                    std::thread::sleep(Duration::from_millis(5));
                }
            }
        }
        assert!(rx.recv_timeout(Duration::from_secs(10)).is_ok());
        assert_eq!(pool.metrics().current, 1, "the thread survived");
        // The job reported before it returned: its LOW count is released just after.
        while channel.running_low() != 0 {
            assert!(Instant::now() < until, "the LOW count stays taken");
            std::thread::sleep(Duration::from_millis(1));
        }
        pool.stop();
    }

    #[test]
    fn disabled_scaling_holds_the_size_within_bounds() {
        let mut s = ThreadPoolScaler::new(ScalingPolicy {
            enabled: false,
            ..policy()
        });
        assert_eq!(s.evaluate(4, 100.0, 100.0), None);
        assert_eq!(s.evaluate(1, 100.0, 100.0).map(|d| d.0), Some(2));
    }
}
