//! `kiwi bench`: a closed-loop load generator.
//!
//! W workers share at most C gRPC connections; each worker issues one request, waits for the answer and
//! issues the next, for D seconds, on uniformly random keys of a key space of K keys, with values of V
//! bytes. Workloads: `put`, `get` (linearizable or serializable, per `--consistency`) and `mixed` (gets with
//! probability `--read-ratio`, puts otherwise). Reads find every key: the key space is preloaded first.
//!
//! `--target etcd` drives etcd's v3 KV API (`Put`, `Range` with `serializable` true or false) with exactly
//! the same workload and the same measurement, so both systems are measured by one load generator.
//! Against Kiwi requests go to the leader (the client follows the leader hint); against etcd they are
//! spread over the endpoints, as etcd clients do (members forward proposals to their leader).
//!
//! Output: a progress bar on stderr while running, then ops/s, latency percentiles (HdrHistogram, in
//! microseconds) and errors by kind, and the same as one JSON line on stdout (`--json-out FILE` appends it).

use std::collections::BTreeMap;
use std::io::Write;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::{Args, ValueEnum};
use hdrhistogram::Histogram;
use indicatif::{ProgressBar, ProgressStyle};
use kiwi_client::{CallOptions, Client, ClientOptions, Error, Priority};
use rand::{Rng, SeedableRng};
use serde_json::json;
use tonic::transport::{Channel, Endpoint};

use crate::ConsistencyArg;

mod etcd {
    #![allow(clippy::all, clippy::pedantic)]
    tonic::include_proto!("etcdserverpb");
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Target {
    Kiwi,
    Etcd,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Workload {
    Put,
    Get,
    Mixed,
    /// Keys-only scans of `--scan-limit` keys from a random start: storage-heavy reads.
    Scan,
}

#[derive(Debug, Args)]
pub struct BenchArgs {
    /// What to measure.
    #[arg(long, value_enum, default_value_t = Workload::Put)]
    workload: Workload,
    /// The system under test (same workload either way).
    #[arg(long, value_enum, default_value_t = Target::Kiwi)]
    target: Target,
    /// Concurrent closed-loop workers (W).
    #[arg(long, default_value_t = 64)]
    workers: usize,
    /// Most gRPC connections the workers share (C).
    #[arg(long, default_value_t = 16)]
    connections: usize,
    /// Key space size (K).
    #[arg(long, default_value_t = 20_000)]
    keys: u64,
    /// Value size in bytes (V).
    #[arg(long, default_value_t = 256)]
    value_size: usize,
    /// How long to measure (D), e.g. 15s.
    #[arg(long, default_value = "15s", value_parser = humantime::parse_duration)]
    duration: Duration,
    /// For --workload scan: keys per scan.
    #[arg(long, default_value_t = 1000)]
    scan_limit: u32,
    /// For --workload mixed: fraction of operations that are reads.
    #[arg(long, default_value_t = 0.5)]
    read_ratio: f64,
    /// Skip preloading the key space (it is only needed once per cluster for get and mixed).
    #[arg(long)]
    no_preload: bool,
    /// Append the result's JSON line to this file.
    #[arg(long)]
    json_out: Option<std::path::PathBuf>,
    /// A label copied into the JSON line (e.g. the scenario name).
    #[arg(long, default_value = "")]
    label: String,
    /// No progress bar.
    #[arg(long)]
    quiet: bool,
}

/// One system's operations, behind one interface.
#[derive(Clone)]
enum Driver {
    Kiwi(Arc<Client>, CallOptions),
    Etcd(Vec<etcd::kv_client::KvClient<Channel>>, bool),
}

impl Driver {
    async fn put(&self, worker: usize, key: Vec<u8>, value: Vec<u8>) -> Result<(), String> {
        match self {
            Driver::Kiwi(c, opts) => c
                .put(&key, &value, opts)
                .await
                .map(|_| ())
                .map_err(|e| kind(&e)),
            Driver::Etcd(clients, _) => {
                let mut c = clients[worker % clients.len()].clone();
                c.put(etcd::PutRequest {
                    key,
                    value,
                    ..etcd::PutRequest::default()
                })
                .await
                .map(|_| ())
                .map_err(|s| format!("{:?}", s.code()))
            }
        }
    }

    async fn scan(&self, worker: usize, start: Vec<u8>, limit: u32) -> Result<(), String> {
        match self {
            Driver::Kiwi(c, opts) => c
                .scan(&start, b"", limit, true, opts)
                .await
                .map(|_| ())
                .map_err(|e| kind(&e)),
            Driver::Etcd(clients, serializable) => {
                let mut c = clients[worker % clients.len()].clone();
                c.range(etcd::RangeRequest {
                    key: start,
                    range_end: vec![0],
                    limit: i64::from(limit),
                    serializable: *serializable,
                    keys_only: true,
                    ..etcd::RangeRequest::default()
                })
                .await
                .map(|_| ())
                .map_err(|s| format!("{:?}", s.code()))
            }
        }
    }

    async fn get(&self, worker: usize, key: Vec<u8>) -> Result<bool, String> {
        match self {
            Driver::Kiwi(c, opts) => c
                .get(&key, opts)
                .await
                .map(|v| v.is_some())
                .map_err(|e| kind(&e)),
            Driver::Etcd(clients, serializable) => {
                let mut c = clients[worker % clients.len()].clone();
                c.range(etcd::RangeRequest {
                    key,
                    serializable: *serializable,
                    ..etcd::RangeRequest::default()
                })
                .await
                .map(|r| !r.into_inner().kvs.is_empty())
                .map_err(|s| format!("{:?}", s.code()))
            }
        }
    }
}

fn kind(e: &Error) -> String {
    match e {
        Error::InvalidArgument(_) => "invalid_argument".into(),
        Error::UnknownOutcome { .. } => "unknown_outcome".into(),
        Error::DeadlineExceeded { .. } => "deadline_exceeded".into(),
        Error::Endpoint { .. } => "endpoint".into(),
        Error::Rpc(s) => format!("{:?}", s.code()),
    }
}

fn key(i: u64) -> Vec<u8> {
    format!("bench-{i:010}").into_bytes()
}

pub async fn run(
    args: BenchArgs,
    endpoints: &[String],
    consistency: ConsistencyArg,
    priority: Priority,
) -> anyhow::Result<()> {
    anyhow::ensure!(args.workers >= 1, "--workers must be at least 1");
    anyhow::ensure!(args.connections >= 1, "--connections must be at least 1");
    anyhow::ensure!(args.keys >= 1, "--keys must be at least 1");
    anyhow::ensure!(
        (0.0..=1.0).contains(&args.read_ratio),
        "--read-ratio must be between 0 and 1"
    );
    let driver = match args.target {
        Target::Kiwi => {
            let per_endpoint = args.connections.div_ceil(endpoints.len()).max(1);
            let client = Client::connect(
                endpoints,
                ClientOptions {
                    priority,
                    connections_per_endpoint: per_endpoint,
                    ..ClientOptions::default()
                },
            )?;
            let opts = CallOptions {
                consistency: Some(consistency.into()),
                ..CallOptions::default()
            };
            Driver::Kiwi(Arc::new(client), opts)
        }
        Target::Etcd => {
            let mut clients = Vec::new();
            for i in 0..args.connections {
                let ep = &endpoints[i % endpoints.len()];
                let channel =
                    Endpoint::from_shared(format!("http://{}", ep.trim_start_matches("http://")))
                        .with_context(|| format!("invalid endpoint {ep}"))?
                        .tcp_nodelay(true)
                        .connect_timeout(Duration::from_secs(2))
                        .connect_lazy();
                clients.push(etcd::kv_client::KvClient::new(channel));
            }
            Driver::Etcd(clients, consistency == ConsistencyArg::Serializable)
        }
    };

    let value = vec![b'x'; args.value_size];
    if args.workload != Workload::Put && !args.no_preload {
        preload(&driver, &args, &value).await?;
    }

    let bar = if args.quiet {
        ProgressBar::hidden()
    } else {
        let b = ProgressBar::new(args.duration.as_secs().max(1));
        b.set_style(
            ProgressStyle::with_template(
                "{spinner} {elapsed_precise} [{bar:30}] {pos}/{len} s  {msg}",
            )
            .expect("valid template")
            .progress_chars("=> "),
        );
        b
    };
    let done = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let end = start + args.duration;
    let mut tasks = Vec::new();
    for w in 0..args.workers {
        let driver = driver.clone();
        let value = value.clone();
        let done = Arc::clone(&done);
        let (workload, keys, read_ratio, scan_limit) =
            (args.workload, args.keys, args.read_ratio, args.scan_limit);
        tasks.push(tokio::spawn(async move {
            let mut hist =
                Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("histogram bounds");
            let mut errors: BTreeMap<String, u64> = BTreeMap::new();
            let mut rng = rand::rngs::StdRng::from_os_rng();
            while Instant::now() < end {
                let k = key(rng.random_range(0..keys));
                let read = match workload {
                    Workload::Put => false,
                    Workload::Get | Workload::Scan => true,
                    Workload::Mixed => rng.random_bool(read_ratio),
                };
                let t = Instant::now();
                let r = if workload == Workload::Scan {
                    driver.scan(w, k, scan_limit).await
                } else if read {
                    driver.get(w, k).await.and_then(|found| {
                        if found {
                            Ok(())
                        } else {
                            Err("not_found".to_string())
                        }
                    })
                } else {
                    driver.put(w, k, value.clone()).await
                };
                match r {
                    Ok(()) => {
                        let us = u64::try_from(t.elapsed().as_micros())
                            .unwrap_or(u64::MAX)
                            .max(1);
                        hist.saturating_record(us);
                        done.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(kind) => *errors.entry(kind).or_default() += 1,
                }
            }
            (hist, errors)
        }));
    }
    while Instant::now() < end {
        tokio::time::sleep(Duration::from_millis(250)).await;
        let secs = start.elapsed().as_secs_f64();
        bar.set_position(secs as u64);
        bar.set_message(format!(
            "{:.0} ops/s",
            done.load(Ordering::Relaxed) as f64 / secs
        ));
    }
    let mut hist = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("histogram bounds");
    let mut errors: BTreeMap<String, u64> = BTreeMap::new();
    for t in tasks {
        let (h, e) = t.await?;
        hist.add(&h).expect("same bounds");
        for (k, v) in e {
            *errors.entry(k).or_default() += v;
        }
    }
    let elapsed = start.elapsed().as_secs_f64();
    bar.finish_and_clear();

    let ops = hist.len();
    let ops_per_sec = ops as f64 / elapsed;
    let target = match args.target {
        Target::Kiwi => "kiwi",
        Target::Etcd => "etcd",
    };
    let workload = match args.workload {
        Workload::Put => "put".to_string(),
        Workload::Get => format!(
            "get-{}",
            if consistency == ConsistencyArg::Serializable {
                "serializable"
            } else {
                "linearizable"
            }
        ),
        Workload::Mixed => format!("mixed-{:.2}", args.read_ratio),
        Workload::Scan => format!("scan-{}", args.scan_limit),
    };
    let pct = |q: f64| hist.value_at_quantile(q);
    eprintln!(
        "{target} {workload}: {ops} ops in {elapsed:.1} s = {ops_per_sec:.0} ops/s; latency us p50 {} p90 {} p99 {} \
         p999 {} max {}; errors {}",
        pct(0.5),
        pct(0.9),
        pct(0.99),
        pct(0.999),
        hist.max(),
        if errors.is_empty() {
            "none".to_string()
        } else {
            format!("{errors:?}")
        }
    );
    let line = json!({
        "label": args.label, "target": target, "workload": workload, "workers": args.workers,
        "connections": args.connections, "keys": args.keys, "value_size": args.value_size,
        "duration_s": elapsed, "ops": ops, "ops_per_sec": ops_per_sec,
        "p50_us": pct(0.5), "p90_us": pct(0.9), "p99_us": pct(0.99), "p999_us": pct(0.999), "max_us": hist.max(),
        "errors": errors,
    })
    .to_string();
    println!("{line}");
    if let Some(path) = &args.json_out {
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .with_context(|| format!("cannot open {}", path.display()))?;
        writeln!(f, "{line}")?;
    }
    Ok(())
}

async fn preload(driver: &Driver, args: &BenchArgs, value: &[u8]) -> anyhow::Result<()> {
    let bar = if args.quiet {
        ProgressBar::hidden()
    } else {
        let b = ProgressBar::new(args.keys);
        b.set_style(
            ProgressStyle::with_template("preloading {pos}/{len} keys [{bar:30}] {eta}")
                .expect("valid template")
                .progress_chars("=> "),
        );
        b
    };
    let next = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for w in 0..args.workers.min(64) {
        let driver = driver.clone();
        let next = Arc::clone(&next);
        let value = value.to_vec();
        let keys = args.keys;
        let bar = bar.clone();
        tasks.push(tokio::spawn(async move {
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= keys {
                    return Ok::<(), String>(());
                }
                let mut tries = 0;
                loop {
                    match driver.put(w, key(i), value.clone()).await {
                        Ok(()) => break,
                        Err(e) if tries < 5 => {
                            tries += 1;
                            let _ = e;
                        }
                        Err(e) => return Err(format!("preloading key {i} failed: {e}")),
                    }
                }
                bar.inc(1);
            }
        }));
    }
    for t in tasks {
        t.await?.map_err(anyhow::Error::msg)?;
    }
    bar.finish_and_clear();
    Ok(())
}
