//! Failover time: a 3-node RocksDB cluster under a steady write load from the client library (8 workers),
//! its leader SIGKILLed; the figure is the time from the SIGKILL to the first acknowledgement of a put sent
//! after it (so it includes leader detection, the election, and the client finding the new leader). Ten
//! rounds per Raft tick length, the killed node restarted and caught up between rounds; prints every
//! round and the median side by side for the default tick (50 ms) and the previous default (100 ms), both
//! with 10 election ticks and 2 heartbeat ticks.
//!
//! `make bench-failover` (release nodes). ROUNDS overrides the number of rounds.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kiwi_client::{CallOptions, Client, ClientOptions};
use kiwi_tests::cluster::{Cluster, ClusterOptions};

const WORKERS: usize = 8;

/// One round: returns the failover time.
async fn round(cluster: &mut Cluster, round: usize) -> Duration {
    let leader = cluster.wait_leader().await;
    let endpoints: Vec<String> = cluster
        .ids()
        .iter()
        .map(|&id| cluster.addr(id).to_string())
        .collect();
    let client = Arc::new(Client::connect(&endpoints, ClientOptions::default()).expect("client"));
    let stop = Arc::new(AtomicBool::new(false));
    let acked = Arc::new(AtomicU64::new(0));
    let killed_at: Arc<Mutex<Option<Instant>>> = Arc::default();
    let first_after: Arc<Mutex<Option<Instant>>> = Arc::default();
    let workers: Vec<_> = (0..WORKERS)
        .map(|w| {
            let (client, stop, acked) = (client.clone(), Arc::clone(&stop), Arc::clone(&acked));
            let (killed_at, first_after) = (Arc::clone(&killed_at), Arc::clone(&first_after));
            tokio::spawn(async move {
                let value = vec![b'v'; 256];
                let mut n = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    let key = format!("failover-{round}-{w}-{n}");
                    n += 1;
                    let sent = Instant::now();
                    if client
                        .put(key.as_bytes(), &value, &CallOptions::default())
                        .await
                        .is_ok()
                    {
                        acked.fetch_add(1, Ordering::Relaxed);
                        let now = Instant::now();
                        let kill = *killed_at.lock().unwrap();
                        if kill.is_some_and(|k| sent > k) {
                            let mut first = first_after.lock().unwrap();
                            if first.is_none_or(|f| now < f) {
                                *first = Some(now);
                            }
                        }
                    }
                }
            })
        })
        .collect();
    // Steady state first: some writes acknowledged.
    let deadline = Instant::now() + Duration::from_secs(30);
    while acked.load(Ordering::Relaxed) < 500 {
        assert!(Instant::now() < deadline, "no steady write load");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    *killed_at.lock().unwrap() = Some(Instant::now());
    cluster.kill(leader);
    let kill = killed_at.lock().unwrap().expect("set");
    let deadline = kill + Duration::from_secs(30);
    let failover = loop {
        if let Some(first) = *first_after.lock().unwrap() {
            break first - kill;
        }
        assert!(
            Instant::now() < deadline,
            "no write acknowledged 30 s after the kill"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    stop.store(true, Ordering::Relaxed);
    for w in workers {
        w.await.expect("worker");
    }
    // Back to three nodes, the restarted one caught up, before the next round.
    cluster.restart(leader);
    let new = cluster.wait_leader().await;
    let commit = cluster.status(new).await.expect("status").commit_index;
    cluster.wait_applied(leader, commit).await;
    failover
}

async fn series(tick_ms: u64, rounds: usize) -> Vec<Duration> {
    let mut cluster = Cluster::start(ClusterOptions {
        tick_interval_ms: tick_ms,
        ..ClusterOptions::default()
    })
    .await;
    let mut out = Vec::new();
    for r in 0..rounds {
        let f = round(&mut cluster, r).await;
        eprintln!(
            "tick {tick_ms} ms, round {}: {:.0} ms",
            r + 1,
            f.as_secs_f64() * 1000.0
        );
        out.push(f);
    }
    out
}

fn median(v: &[Duration]) -> Duration {
    let mut s = v.to_vec();
    s.sort();
    s[s.len() / 2]
}

fn main() {
    let rounds = std::env::var("ROUNDS")
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(10);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let results: Vec<(u64, Vec<Duration>)> = rt.block_on(async {
        let mut out = Vec::new();
        for tick in [50, 100] {
            out.push((tick, series(tick, rounds).await));
        }
        out
    });
    println!();
    println!(
        "failover: SIGKILL of the leader under 8 writers -> first acknowledged put sent after it"
    );
    println!(
        "{:<16} {:>9} {:>9} {:>9}   rounds (ms)",
        "raft tick", "median", "min", "max"
    );
    for (tick, v) in results {
        let ms = |d: Duration| d.as_secs_f64() * 1000.0;
        let all: Vec<String> = v.iter().map(|d| format!("{:.0}", ms(*d))).collect();
        println!(
            "{:<16} {:>7.0}ms {:>7.0}ms {:>7.0}ms   {}",
            format!("{tick} ms x 10"),
            ms(median(&v)),
            ms(*v.iter().min().expect("rounds")),
            ms(*v.iter().max().expect("rounds")),
            all.join(" ")
        );
    }
}
