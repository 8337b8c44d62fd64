//! Priority channel overhead: the CPU cost per request of the `PriorityMessageChannel` hand-off (admission,
//! enqueue, scheduling pick, dequeue, service-time record) with priority on vs off, in one run.
//!
//! End-to-end throughput on a shared 2-core machine varies by more than the 5 % budget between identical
//! runs (see `scripts/bench-priority.sh`); this measures the part priority changes, per request, on one
//! thread: ns per request (median of alternating rounds) and, under `valgrind --tool=callgrind`, an
//! instruction count that does not depend on the machine's load. Two traffic mixes: NORMAL only (the
//! light-load overhead case) and all four classes.
//!
//! Run: `make bench-channel`, or `cargo bench -p kiwi-node --bench channel`. `KIWI_BENCH_REQUESTS` (default
//! 2,000,000 per round) and `KIWI_BENCH_ROUNDS` (default 5) tune it; `KIWI_BENCH_MODE=on|off` runs one mode
//! only, for instruction counts: `make bench-channel` also prints instructions per request from callgrind
//! when valgrind is installed.

use std::time::{Duration, Instant};

use kiwi_node::runtime::priority_channel::{
    ChannelPolicy, Class, LOW_PER_WORKER, PriorityMessageChannel, SystemClock, Taken,
};

fn env(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.replace('_', "").parse().ok())
        .unwrap_or(default)
}

/// Pushes `n` requests through with up to `depth` queued, as a storage stage of 4 workers would take them;
/// returns ns per request.
fn round(enabled: bool, mixed: bool, n: usize, depth: usize) -> f64 {
    let ch = PriorityMessageChannel::new(
        ChannelPolicy {
            enabled,
            weights: [3, 2, 1],
            queue_capacity: 4096,
            low_per_worker: Some(LOW_PER_WORKER),
        },
        4,
        Box::new(SystemClock),
    );
    let deadline = Instant::now() + Duration::from_secs(3600);
    let classes = [Class::Normal, Class::High, Class::Low, Class::Critical];
    let took = Duration::from_micros(200);
    let start = Instant::now();
    let mut queued = 0usize;
    for i in 0..n {
        let class = if mixed { classes[i % 4] } else { Class::Normal };
        if ch.try_send(class, deadline, i).is_ok() {
            queued += 1;
        }
        while queued >= depth || (i + 1 == n && queued > 0) {
            match ch.try_recv() {
                Some(Taken::Run(_, c, _)) => ch.record_service(c, took),
                Some(Taken::Expired(_)) => {}
                None => break,
            }
            queued -= 1;
        }
    }
    start.elapsed().as_nanos() as f64 / n as f64
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    let n = env("KIWI_BENCH_REQUESTS", 2_000_000);
    let rounds = env("KIWI_BENCH_ROUNDS", 5);
    if let Ok(mode) = std::env::var("KIWI_BENCH_MODE") {
        // One mode, one round per mix: for an instruction count of the whole process.
        let enabled = mode == "on";
        round(enabled, false, n, 4);
        round(enabled, true, n, 4);
        println!("priority {mode}: {} requests", 2 * n);
        return;
    }
    println!(
        "priority channel hand-off, {n} requests per round, {rounds} alternating rounds, 4 queued"
    );
    println!(
        "{:<14} {:>14} {:>14} {:>8}",
        "traffic", "on ns/req", "off ns/req", "on/off"
    );
    for (label, mixed) in [("normal only", false), ("all classes", true)] {
        let (mut on, mut off) = (Vec::new(), Vec::new());
        for _ in 0..rounds {
            on.push(round(true, mixed, n, 4));
            off.push(round(false, mixed, n, 4));
        }
        let (on, off) = (median(on), median(off));
        println!("{label:<14} {on:>14.1} {off:>14.1} {:>8.3}", on / off);
    }
}
