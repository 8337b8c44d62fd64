//! The `FaultInjector`: faults the control plane starts on this node (`[raft.fault_injection]`), for test
//! clusters only.
//!
//! Fault types (`FaultSpec` in `control.proto`):
//! - network delay: outgoing Raft batches to the named peers (default all) wait `delay` plus a uniform
//!   `0..jitter` (hook in the transport's per-peer sender); with several delays active the longest
//!   applies, never longer than the time its fault has left;
//! - network partition: Raft traffic between this node's side and the other is dropped, both ways, and
//!   snapshots between the sides fail (hooks where messages are queued for sending and where they are
//!   received); every node gets the same description and works out its own side;
//! - message loss: every outgoing and incoming Raft message with the named peers is dropped with the given
//!   probability;
//! - node crash: the process aborts at once, as from a power cut (nothing flushed that was not synced);
//! - disk stall: every storage write and fsync takes `delay` longer ([`StallingBackend`], wrapped around
//!   the engine only when fault injection is enabled, inside the storage metrics so fsync times show it),
//!   at most the time the fault has left.
//!
//! A delayed batch or a stalled write wakes as soon as any fault ends (cancelled or expired): no wait
//! outlives the fault that caused it.
//!
//! With no fault active, each hook costs one atomic load (`benches/fault.rs` measures it). Every fault has
//! an id and a duration that this node enforces itself: the hooks ignore a fault past its end, and a task
//! removes it and reports `expired` at its end, whether or not the control plane is still there.
//! With `enabled = false` every command is refused (reported as `refused`, naming the key, and logged).
//!
//! Events (`started`, `expired`, `cancelled`, `refused`, with the messages delayed and dropped) go to the
//! control link, which forwards them on its stream (queued while it is down), and to the
//! `kiwi_fault_*` metrics.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use kiwi_proto::v1::fault_command::Cmd;
use kiwi_proto::v1::fault_spec::Kind;
use kiwi_proto::v1::{FaultCommand, FaultEvent, FaultSpec, StartFault};
use opentelemetry::KeyValue;
use opentelemetry::metrics::{Counter, Meter};
use rand::Rng as _;
use tokio::sync::{Notify, mpsc};
use tokio_util::sync::CancellationToken;

mod stall;

pub use stall::StallingBackend;

/// Most faults active at once.
pub const MAX_ACTIVE: usize = 64;

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// What a fault does, checked and in this node's terms.
#[derive(Debug, Clone, PartialEq)]
enum Effect {
    Delay {
        delay: Duration,
        jitter: Duration,
    },
    /// A partition: this node's side is `isolated` if it is `inside` it, else everyone else.
    Cut {
        isolated: Vec<u64>,
        inside: bool,
    },
    Loss {
        rate: f64,
    },
    Stall {
        delay: Duration,
    },
}

struct Active {
    id: u64,
    effect: Effect,
    /// Peers it applies to (empty: all). For a partition, the other side.
    peers: Vec<u64>,
    until: Instant,
    delayed: AtomicU64,
    dropped: AtomicU64,
}

impl Active {
    fn applies_to(&self, peer: u64, now: Instant) -> bool {
        now < self.until && (self.peers.is_empty() || self.peers.contains(&peer))
    }

    fn event(&self, kind: &str, detail: String) -> FaultEvent {
        FaultEvent {
            fault_id: self.id,
            kind: kind.into(),
            detail,
            at_unix_ms: unix_ms(),
            messages_delayed: self.delayed.load(Ordering::Relaxed),
            messages_dropped: self.dropped.load(Ordering::Relaxed),
        }
    }
}

struct Instruments {
    events: Counter<u64>,
    dropped: Counter<u64>,
    delayed: Counter<u64>,
}

/// The node's fault injector. See the module doc.
pub struct FaultInjector {
    node_id: u64,
    enabled: bool,
    max_duration: Duration,
    /// Whether any fault is active: the only thing the hooks read when none is.
    any: AtomicBool,
    active: Mutex<Vec<Arc<Active>>>,
    /// Wakes the expiry task when a fault starts.
    changed: Notify,
    /// Counts the faults that ended; waiters in [`sleep`](Self::sleep) and
    /// [`stall_blocking`](Self::stall_blocking) wake when it moves.
    ended: Mutex<u64>,
    ended_blocking: Condvar,
    ended_async: Notify,
    events: mpsc::UnboundedSender<FaultEvent>,
    metrics: Instruments,
}

/// What to do with one outgoing or incoming message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Pass,
    Drop,
}

impl FaultInjector {
    /// An injector for node `node_id` and the receiver of its events (for the control link). The
    /// `kiwi_fault_*` instruments are created on `meter`.
    pub fn new(
        node_id: u64,
        enabled: bool,
        max_duration: Duration,
        meter: &Meter,
    ) -> (Arc<FaultInjector>, mpsc::UnboundedReceiver<FaultEvent>) {
        let (tx, rx) = mpsc::unbounded_channel();
        let metrics = Instruments {
            events: meter
                .u64_counter("kiwi_fault_events")
                .with_description(
                    "Fault events on this node, by kind (started, expired, cancelled, refused)",
                )
                .build(),
            dropped: meter
                .u64_counter("kiwi_fault_messages_dropped")
                .with_description("Raft messages dropped by an injected partition or message loss")
                .build(),
            delayed: meter
                .u64_counter("kiwi_fault_messages_delayed")
                .with_description("Raft message batches held back by an injected network delay")
                .build(),
        };
        for kind in ["started", "expired", "cancelled", "refused"] {
            metrics.events.add(0, &[KeyValue::new("kind", kind)]);
        }
        metrics.dropped.add(0, &[]);
        metrics.delayed.add(0, &[]);
        let injector = Arc::new(FaultInjector {
            node_id,
            enabled,
            max_duration,
            any: AtomicBool::new(false),
            active: Mutex::new(Vec::new()),
            changed: Notify::new(),
            ended: Mutex::new(0),
            ended_blocking: Condvar::new(),
            ended_async: Notify::new(),
            events: tx,
            metrics,
        });
        let weak = Arc::downgrade(&injector);
        meter
            .u64_observable_gauge("kiwi_fault_active")
            .with_description("Faults active on this node, by type")
            .with_callback(move |g| {
                let Some(me) = weak.upgrade() else { return };
                let mut counts = [0u64; 4];
                let now = Instant::now();
                for a in me.lock().iter().filter(|a| now < a.until) {
                    counts[match a.effect {
                        Effect::Delay { .. } => 0,
                        Effect::Cut { .. } => 1,
                        Effect::Loss { .. } => 2,
                        Effect::Stall { .. } => 3,
                    }] += 1;
                }
                for (kind, n) in ["delay", "partition", "loss", "disk_stall"]
                    .into_iter()
                    .zip(counts)
                {
                    g.observe(n, &[KeyValue::new("type", kind)]);
                }
            })
            .build();
        (injector, rx)
    }

    /// Whether `[raft.fault_injection] enabled` is on.
    pub fn enabled(&self) -> bool {
        self.enabled
    }

    /// `[raft.fault_injection] max_duration_sec`.
    pub fn max_duration(&self) -> Duration {
        self.max_duration
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Arc<Active>>> {
        self.active
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn emit(&self, event: FaultEvent) {
        self.metrics
            .events
            .add(1, &[KeyValue::new("kind", event.kind.clone())]);
        let _ = self.events.send(event);
    }

    fn refuse(&self, fault_id: u64, why: String) {
        tracing::warn!(fault_id, "fault refused: {why}");
        self.emit(FaultEvent {
            fault_id,
            kind: "refused".into(),
            detail: why,
            at_unix_ms: unix_ms(),
            ..FaultEvent::default()
        });
    }

    /// Runs a command from the control plane.
    pub fn command(&self, command: FaultCommand) {
        match command.cmd {
            Some(Cmd::Start(start)) => self.start(start),
            Some(Cmd::CancelId(id)) => self.cancel(id),
            None => {}
        }
    }

    /// Checks a fault and turns it into this node's effect (`None`: it does not concern this node, e.g.
    /// a partition that leaves it with every peer on its side; a crash returns `None` too, and aborts).
    fn effect(&self, spec: &FaultSpec) -> Result<Option<Effect>, String> {
        let ms = Duration::from_millis;
        match &spec.kind {
            None => Err("the fault spec names no fault type".into()),
            Some(Kind::Delay(d)) => {
                if d.delay_ms == 0 && d.jitter_ms == 0 {
                    return Err("a network delay needs delay_ms or jitter_ms".into());
                }
                if d.delay_ms > 60_000 || d.jitter_ms > 60_000 {
                    return Err("delay_ms and jitter_ms must be at most 60000".into());
                }
                Ok(Some(Effect::Delay {
                    delay: ms(d.delay_ms),
                    jitter: ms(d.jitter_ms),
                }))
            }
            Some(Kind::Partition(p)) => {
                if p.isolated_nodes.is_empty() {
                    return Err("a partition needs isolated_nodes".into());
                }
                // Every node gets the same description and works out its side.
                Ok(Some(Effect::Cut {
                    isolated: p.isolated_nodes.clone(),
                    inside: p.isolated_nodes.contains(&self.node_id),
                }))
            }
            Some(Kind::Loss(l)) => {
                if !(l.drop_rate > 0.0 && l.drop_rate <= 1.0) {
                    return Err(format!(
                        "drop_rate must be above 0 and at most 1, got {}",
                        l.drop_rate
                    ));
                }
                Ok(Some(Effect::Loss { rate: l.drop_rate }))
            }
            Some(Kind::Crash(_)) => Ok(None),
            Some(Kind::DiskStall(d)) => {
                if d.delay_ms == 0 || d.delay_ms > 60_000 {
                    return Err(format!(
                        "a disk stall's delay_ms must be 1 to 60000, got {}",
                        d.delay_ms
                    ));
                }
                Ok(Some(Effect::Stall {
                    delay: ms(d.delay_ms),
                }))
            }
        }
    }

    fn start(&self, start: StartFault) {
        let id = start.fault_id;
        if !self.enabled {
            self.refuse(
                id,
                format!(
                    "FAILED_PRECONDITION: fault injection is disabled on node {}; set \
                     raft.fault_injection.enabled = true (test clusters only)",
                    self.node_id
                ),
            );
            return;
        }
        let duration = Duration::from_millis(start.duration_ms);
        if duration.is_zero() || duration > self.max_duration {
            self.refuse(
                id,
                format!(
                    "INVALID_ARGUMENT: duration {} ms is not within 1 ms and \
                     raft.fault_injection.max_duration_sec ({} s)",
                    start.duration_ms,
                    self.max_duration.as_secs()
                ),
            );
            return;
        }
        let spec = start.spec.unwrap_or_default();
        let effect = match self.effect(&spec) {
            Ok(e) => e,
            Err(why) => return self.refuse(id, format!("INVALID_ARGUMENT: {why}")),
        };
        let Some(effect) = effect else {
            // A crash: as from a power cut. Nothing is flushed; what was acknowledged was fsynced.
            tracing::error!(
                fault_id = id,
                "injected crash: aborting the process now (raft.fault_injection)"
            );
            std::process::abort();
        };
        let mut active = self.lock();
        if active.iter().any(|a| a.id == id) {
            return; // Sent again (the control plane restarted, or the link reconnected).
        }
        if active.len() >= MAX_ACTIVE {
            drop(active);
            return self.refuse(
                id,
                format!("RESOURCE_EXHAUSTED: {MAX_ACTIVE} faults already active on this node"),
            );
        }
        let fault = Arc::new(Active {
            id,
            effect,
            peers: spec.peers.clone(),
            until: Instant::now() + duration,
            delayed: AtomicU64::new(0),
            dropped: AtomicU64::new(0),
        });
        let event = fault.event(
            "started",
            format!(
                "{:?} for {} ms on node {}",
                fault.effect, start.duration_ms, self.node_id
            ),
        );
        active.push(fault);
        self.any.store(true, Ordering::Release);
        drop(active);
        tracing::warn!(fault_id = id, "fault started: {}", event.detail);
        self.emit(event);
        self.changed.notify_one();
    }

    fn cancel(&self, id: u64) {
        let removed = {
            let mut active = self.lock();
            let at = active.iter().position(|a| a.id == id);
            let removed = at.map(|i| active.remove(i));
            self.any.store(!active.is_empty(), Ordering::Release);
            removed
        };
        if let Some(a) = removed {
            self.wake_waiters();
            tracing::warn!(fault_id = id, "fault cancelled");
            self.emit(a.event("cancelled", format!("cancelled on node {}", self.node_id)));
        }
    }

    /// A fault ended: every delayed batch and stalled write stops waiting.
    fn wake_waiters(&self) {
        *self
            .ended
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) += 1;
        self.ended_blocking.notify_all();
        self.ended_async.notify_waiters();
    }

    /// Waits `d` (a network delay), or less if a fault ends meanwhile.
    pub async fn sleep(&self, d: Duration) {
        let ended = self.ended_async.notified();
        tokio::select! {
            () = tokio::time::sleep(d) => {}
            () = ended => {}
        }
    }

    /// Blocks the calling thread for `d` (a disk stall), or less if a fault ends meanwhile.
    pub fn stall_blocking(&self, d: Duration) {
        let deadline = Instant::now() + d;
        let mut ended = self
            .ended
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let at_start = *ended;
        while *ended == at_start {
            let now = Instant::now();
            if now >= deadline {
                return;
            }
            ended = self
                .ended_blocking
                .wait_timeout(ended, deadline - now)
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .0;
        }
    }

    /// Removes the faults past their end and reports them; returns when the next one ends.
    fn expire(&self, now: Instant) -> Option<Instant> {
        let mut ended = Vec::new();
        let next = {
            let mut active = self.lock();
            active.retain(|a| {
                let keep = now < a.until;
                if !keep {
                    ended.push(Arc::clone(a));
                }
                keep
            });
            self.any.store(!active.is_empty(), Ordering::Release);
            active.iter().map(|a| a.until).min()
        };
        if !ended.is_empty() {
            self.wake_waiters();
        }
        for a in ended {
            tracing::warn!(fault_id = a.id, "fault expired");
            self.emit(a.event(
                "expired",
                format!("ended at its duration on node {}", self.node_id),
            ));
        }
        next
    }

    /// The task that ends faults at their duration. Runs until `stop`.
    pub fn spawn_expiry(self: &Arc<Self>, stop: CancellationToken) -> tokio::task::JoinHandle<()> {
        let me = Arc::clone(self);
        tokio::spawn(async move {
            loop {
                let next = me.expire(Instant::now());
                let wait = next.map_or(Duration::from_secs(3600), |t| {
                    t.saturating_duration_since(Instant::now())
                });
                tokio::select! {
                    () = tokio::time::sleep(wait) => {}
                    () = me.changed.notified() => {}
                    () = stop.cancelled() => return,
                }
            }
        })
    }

    /// The verdict on one Raft message to or from `peer` (partition and loss).
    #[inline]
    pub fn message(&self, peer: u64) -> Verdict {
        if !self.any.load(Ordering::Acquire) {
            return Verdict::Pass;
        }
        self.message_slow(peer)
    }

    fn is_cut(a: &Active, peer: u64, now: Instant) -> bool {
        match &a.effect {
            Effect::Cut { isolated, inside } if now < a.until => {
                isolated.contains(&peer) != *inside
            }
            _ => false,
        }
    }

    fn message_slow(&self, peer: u64) -> Verdict {
        let now = Instant::now();
        let active = self.lock();
        for a in active.iter() {
            let drop = match &a.effect {
                Effect::Cut { .. } => Self::is_cut(a, peer, now),
                Effect::Loss { rate } => a.applies_to(peer, now) && rand::rng().random_bool(*rate),
                _ => false,
            };
            if drop {
                a.dropped.fetch_add(1, Ordering::Relaxed);
                self.metrics.dropped.add(1, &[]);
                return Verdict::Drop;
            }
        }
        Verdict::Pass
    }

    /// Whether a partition separates this node from `peer` (snapshots between the sides fail).
    pub fn partitioned_from(&self, peer: u64) -> bool {
        if !self.any.load(Ordering::Acquire) {
            return false;
        }
        let now = Instant::now();
        self.lock().iter().any(|a| Self::is_cut(a, peer, now))
    }

    /// How long the next batch to `peer` waits (network delay): the longest of the active delays, each
    /// at most the time its fault has left.
    #[inline]
    pub fn delay(&self, peer: u64) -> Duration {
        if !self.any.load(Ordering::Acquire) {
            return Duration::ZERO;
        }
        let now = Instant::now();
        let active = self.lock();
        let mut longest = Duration::ZERO;
        for a in active.iter() {
            if let Effect::Delay { delay, jitter } = &a.effect
                && a.applies_to(peer, now)
            {
                let extra = if jitter.is_zero() {
                    Duration::ZERO
                } else {
                    jitter.mul_f64(rand::rng().random::<f64>())
                };
                longest = longest.max((*delay + extra).min(a.until - now));
                a.delayed.fetch_add(1, Ordering::Relaxed);
                self.metrics.delayed.add(1, &[]);
            }
        }
        longest
    }

    /// How much longer a storage write or fsync takes (disk stall): the longest active stall, at most
    /// the time its fault has left.
    #[inline]
    pub fn disk_stall(&self) -> Duration {
        if !self.any.load(Ordering::Acquire) {
            return Duration::ZERO;
        }
        let now = Instant::now();
        self.lock()
            .iter()
            .filter(|a| now < a.until)
            .filter_map(|a| match a.effect {
                Effect::Stall { delay } => Some(delay.min(a.until - now)),
                _ => None,
            })
            .max()
            .unwrap_or(Duration::ZERO)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiwi_proto::v1::{MessageLoss, NetworkDelay, NetworkPartition};

    fn injector(
        node: u64,
        enabled: bool,
    ) -> (Arc<FaultInjector>, mpsc::UnboundedReceiver<FaultEvent>) {
        FaultInjector::new(
            node,
            enabled,
            Duration::from_secs(60),
            &opentelemetry::global::meter("test"),
        )
    }

    fn start(id: u64, kind: Kind, peers: Vec<u64>, ms: u64) -> FaultCommand {
        FaultCommand {
            cmd: Some(Cmd::Start(StartFault {
                fault_id: id,
                spec: Some(FaultSpec {
                    kind: Some(kind),
                    peers,
                }),
                duration_ms: ms,
            })),
        }
    }

    fn partition(isolated: Vec<u64>) -> Kind {
        Kind::Partition(NetworkPartition {
            isolated_nodes: isolated,
        })
    }

    #[test]
    fn disabled_injection_refuses_naming_the_key() {
        let (f, mut rx) = injector(1, false);
        f.command(start(7, partition(vec![2]), vec![], 1000));
        let e = rx.try_recv().unwrap();
        assert_eq!((e.fault_id, e.kind.as_str()), (7, "refused"));
        assert!(e.detail.contains("raft.fault_injection.enabled"), "{e:?}");
        assert_eq!(f.message(2), Verdict::Pass);
    }

    #[test]
    fn each_node_works_out_its_side_of_a_partition() {
        let cases = [
            (1, vec![1], vec![(2, true), (3, true)]),
            (2, vec![1], vec![(1, true), (3, false)]),
            (1, vec![1, 2], vec![(2, false), (3, true)]),
            (3, vec![1, 2], vec![(1, true), (2, true)]),
        ];
        for (node, isolated, expect) in cases {
            let (f, _rx) = injector(node, true);
            f.command(start(1, partition(isolated.clone()), vec![], 10_000));
            for (peer, cut) in expect {
                assert_eq!(
                    f.message(peer) == Verdict::Drop,
                    cut,
                    "node {node}, isolated {isolated:?}, peer {peer}"
                );
                assert_eq!(f.partitioned_from(peer), cut);
            }
        }
    }

    #[test]
    fn a_fault_never_outlives_its_duration_and_is_reported() {
        let (f, mut rx) = injector(1, true);
        f.command(start(
            3,
            Kind::Loss(MessageLoss { drop_rate: 1.0 }),
            vec![],
            50,
        ));
        assert_eq!(rx.try_recv().unwrap().kind, "started");
        assert_eq!(f.message(2), Verdict::Drop);
        std::thread::sleep(Duration::from_millis(60));
        // Past its end, before the expiry task ran: no effect already.
        assert_eq!(f.message(2), Verdict::Pass);
        assert!(f.expire(Instant::now()).is_none());
        let e = rx.try_recv().unwrap();
        assert_eq!((e.kind.as_str(), e.messages_dropped), ("expired", 1));
        assert!(
            !f.any.load(Ordering::Acquire),
            "back to the one-load fast path"
        );
    }

    #[test]
    fn delays_apply_to_their_peers_and_bad_commands_are_refused() {
        let (f, mut rx) = injector(1, true);
        let delay = Kind::Delay(NetworkDelay {
            delay_ms: 100,
            jitter_ms: 0,
        });
        f.command(start(1, delay.clone(), vec![3], 10_000));
        f.command(start(1, delay, vec![3], 10_000)); // sent again: ignored
        assert_eq!(f.delay(2), Duration::ZERO);
        assert_eq!(f.delay(3), Duration::from_millis(100));
        f.command(start(
            2,
            Kind::Loss(MessageLoss { drop_rate: 2.0 }),
            vec![],
            1000,
        ));
        f.command(start(4, partition(vec![2]), vec![], 61_000));
        let kinds: Vec<String> = std::iter::from_fn(|| rx.try_recv().ok())
            .map(|e| e.kind)
            .collect();
        assert_eq!(kinds, ["started", "refused", "refused"]);
        f.command(FaultCommand {
            cmd: Some(Cmd::CancelId(1)),
        });
        assert_eq!(rx.try_recv().unwrap().kind, "cancelled");
        assert_eq!(f.delay(3), Duration::ZERO);
    }

    fn delay(ms: u64) -> Kind {
        Kind::Delay(NetworkDelay {
            delay_ms: ms,
            jitter_ms: 0,
        })
    }

    #[test]
    fn delays_take_the_longest_and_end_with_their_fault() {
        let (f, _rx) = injector(1, true);
        // Two 60 s delays of faults lasting 1 s: summed they held a batch for 120 s.
        f.command(start(1, delay(60_000), vec![], 1000));
        f.command(start(2, delay(60_000), vec![], 1000));
        let d = f.delay(2);
        assert!(
            d <= Duration::from_secs(1) && d > Duration::from_millis(500),
            "capped at the time left: {d:?}"
        );
        f.command(start(
            3,
            Kind::DiskStall(kiwi_proto::v1::DiskStall { delay_ms: 60_000 }),
            vec![],
            1000,
        ));
        assert!(f.disk_stall() <= Duration::from_secs(1));
    }

    #[test]
    fn a_cancel_wakes_stalled_writes_and_delayed_batches() {
        let (f, _rx) = injector(1, true);
        f.command(start(
            1,
            Kind::DiskStall(kiwi_proto::v1::DiskStall { delay_ms: 60_000 }),
            vec![],
            60_000,
        ));
        f.command(start(2, delay(60_000), vec![], 60_000));
        let stalled = {
            let f = Arc::clone(&f);
            std::thread::spawn(move || {
                let t = Instant::now();
                f.stall_blocking(f.disk_stall());
                t.elapsed()
            })
        };
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let delayed = {
            let f = Arc::clone(&f);
            rt.spawn(async move {
                let t = Instant::now();
                f.sleep(f.delay(2)).await;
                t.elapsed()
            })
        };
        // Cancel once both wait (the waits are 60 s; a cancel must end them).
        std::thread::sleep(Duration::from_millis(200));
        f.command(FaultCommand {
            cmd: Some(Cmd::CancelId(1)),
        });
        f.command(FaultCommand {
            cmd: Some(Cmd::CancelId(2)),
        });
        let stalled = stalled.join().unwrap();
        let delayed = rt.block_on(delayed).unwrap();
        assert!(
            stalled < Duration::from_secs(30),
            "the stall ended with its fault: {stalled:?}"
        );
        assert!(
            delayed < Duration::from_secs(30),
            "the delay ended with its fault: {delayed:?}"
        );
    }
}
