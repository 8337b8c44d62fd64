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
//! `--rate R` paces the workers to R operations per second in all (request n is due at n / R s, and its
//! latency counts from then); the workers are then the most requests in flight.
//!
//! `--ramp 1:5s,64:20s,1:60s` replaces the fixed worker count with phases (a load ramp or burst): the
//! workers above the current phase's count wait. A timeline is printed each second (active workers, ops/s
//! and, against Kiwi, every node's storage pool size), then the storage pools' scale events during the run
//! and ops/s per phase; the JSON line gains `phases`, `timeline` and `scale_events`.
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

use kiwi_proto::etcd::etcdserverpb as etcd;

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
    /// Watch replays (Kiwi only): a watch over every key from a random revision of the kept history,
    /// read until `--scan-limit` events have arrived, then dropped: the node reads its history at the
    /// client's priority, as a reconnecting or late watcher makes it do.
    Replay,
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
    /// A load ramp instead of --workers/--duration: comma-separated WORKERS:DURATION phases, e.g.
    /// 1:5s,64:20s,1:60s for a burst from 1 to 64 workers and back.
    #[arg(long, value_parser = parse_ramp, conflicts_with_all = ["workers", "duration"])]
    ramp: Option<Ramp>,
    /// Send at a fixed rate (operations per second, all workers together) instead of as fast as the
    /// answers come: request N is due at N / rate seconds and its latency is counted from then, so a
    /// stall that delays later requests is counted against them too (no coordinated omission). The
    /// workers are the most requests in flight. At a fixed rate the node CPU per operation compares
    /// two configurations at the same load, which throughput at saturation cannot.
    #[arg(long, conflicts_with = "ramp")]
    rate: Option<f64>,
    /// With --workload put against Kiwi: this many watches on the first endpoint (shared over
    /// --connections streams) for the run, each on its own slice of the key space (together they cover
    /// it once, so every put is delivered to one watcher). Each put's value carries its send time, and
    /// the delivery latency of every event (put sent to event received) is reported with the count
    /// delivered against the count expected (one per put).
    #[arg(long, default_value_t = 0)]
    watchers: usize,
    /// Against Kiwi: this many leases (each with a key attached) kept alive 4 times a second during the
    /// run, on their own connection, at the client's priority; reports the keepalives' latency and the
    /// leases lost (a keepalive that found its lease gone, or its key missing at the end).
    #[arg(long, default_value_t = 0)]
    leases: usize,
    /// TTL of the --leases (raised to the cluster's floor).
    #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
    lease_ttl: Duration,
}

/// Load phases: (workers, how long).
#[derive(Debug, Clone)]
pub struct Ramp(Vec<(usize, Duration)>);

fn parse_ramp(s: &str) -> Result<Ramp, String> {
    let phases = s
        .split(',')
        .map(|p| {
            let (w, d) = p
                .split_once(':')
                .ok_or_else(|| format!("phase {p:?} is not WORKERS:DURATION (e.g. 64:20s)"))?;
            let w: usize = w
                .trim()
                .parse()
                .map_err(|e| format!("phase {p:?}: {w:?} is not a worker count: {e}"))?;
            let d = humantime::parse_duration(d.trim())
                .map_err(|e| format!("phase {p:?}: {d:?} is not a duration: {e}"))?;
            if w == 0 || d.is_zero() {
                return Err(format!(
                    "phase {p:?}: needs at least one worker and a non-zero duration"
                ));
            }
            Ok((w, d))
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Ramp(phases))
}

impl Ramp {
    /// Workers wanted `at` into the run (0 once it is over).
    fn workers_at(&self, at: Duration) -> usize {
        self.phase_at(at).map_or(0, |i| self.0[i].0)
    }

    fn total(&self) -> Duration {
        self.0.iter().map(|p| p.1).sum()
    }

    /// The phase running `at` into the run.
    fn phase_at(&self, at: Duration) -> Option<usize> {
        let mut end = Duration::ZERO;
        self.0.iter().position(|&(_, d)| {
            end += d;
            at < end
        })
    }

    fn max_workers(&self) -> usize {
        self.0.iter().map(|p| p.0).max().unwrap_or(1)
    }
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

    /// Replays `events` events of the history from revision `from` through a watch on every key.
    async fn replay(&self, from: u64, events: u32) -> Result<(), String> {
        let Driver::Kiwi(c, opts) = self else {
            return Err("unsupported".into());
        };
        let all = kiwi_client::KeyRange::Between {
            start: Vec::new(),
            end: Vec::new(),
        };
        let mut watch = c.watch(&all, from, false);
        let deadline = opts.timeout.unwrap_or(Duration::from_secs(10));
        let read = async {
            let mut got = 0;
            while got < events as usize {
                match watch.next().await {
                    Ok(kiwi_client::WatchUpdate::Events(e)) => got += e.len(),
                    Ok(kiwi_client::WatchUpdate::Compacted { .. }) => {
                        return Err("compacted".to_string());
                    }
                    Err(e) => return Err(kind(&e)),
                }
            }
            Ok(())
        };
        tokio::time::timeout(deadline, read)
            .await
            .unwrap_or_else(|_| Err("deadline_exceeded".into()))
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
        Error::Unreachable { .. } => "unreachable".into(),
        Error::Rpc(s) => format!("{:?}", s.code()),
    }
}

/// Opens `n` watches on `endpoint` over `streams` streams, watch i on the i-th of `n` slices of the
/// `keys` bench keys (the last slice open-ended); each task records the delivery latency of every event
/// it receives (its value's send time, against `origin`) until `end` is notified and a moment more has
/// passed.
async fn start_watchers(
    endpoint: &str,
    n: usize,
    streams: usize,
    keys: u64,
    origin: Instant,
    end: &Arc<tokio::sync::Notify>,
) -> anyhow::Result<Vec<tokio::task::JoinHandle<Histogram<u64>>>> {
    use kiwi_proto::v1::kv_service_client::KvServiceClient;
    use kiwi_proto::v1::{RequestHeader, WatchCreateRequest, WatchRequest, watch_request};
    let streams = streams.clamp(1, n);
    let channel =
        Endpoint::from_shared(format!("http://{}", endpoint.trim_start_matches("http://")))
            .with_context(|| format!("invalid endpoint {endpoint}"))?
            .tcp_nodelay(true)
            .connect()
            .await
            .with_context(|| format!("cannot connect to {endpoint} for the watchers"))?;
    let mut tasks = Vec::new();
    let slice = |i: usize| (i as u64 * keys / n as u64).min(keys);
    let mut next = 0;
    for s in 0..streams {
        let count = n / streams + usize::from(s < n % streams);
        let (tx, rx) = tokio::sync::mpsc::channel(count.max(1));
        for _ in 0..count {
            let (from, to) = (slice(next), slice(next + 1));
            next += 1;
            tx.send(WatchRequest {
                request_union: Some(watch_request::RequestUnion::CreateRequest(
                    WatchCreateRequest {
                        key: if next == 1 {
                            b"bench-".to_vec()
                        } else {
                            key(from)
                        },
                        range_end: if next == n {
                            b"bench.".to_vec()
                        } else {
                            key(to)
                        },
                        header: Some(RequestHeader::default()),
                        ..WatchCreateRequest::default()
                    },
                )),
            })
            .await
            .expect("the receiver is alive");
        }
        let mut answers = KvServiceClient::new(channel.clone())
            .max_decoding_message_size(64 << 20)
            .watch(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await
            .context("the node refused a watch stream")?
            .into_inner();
        // Every watch is created before the load starts.
        let mut created = 0;
        while created < count {
            match answers.message().await? {
                Some(a) if a.created && !a.canceled => created += 1,
                Some(a) if a.canceled => anyhow::bail!("a watch was refused: {}", a.cancel_reason),
                Some(_) => {}
                None => anyhow::bail!("the watch stream ended before its watches were created"),
            }
        }
        let end = Arc::clone(end);
        tasks.push(tokio::spawn(async move {
            let _requests = tx;
            let mut hist =
                Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("histogram bounds");
            let ended = end.notified();
            tokio::pin!(ended);
            let mut deadline = None;
            loop {
                let next = match deadline {
                    None => tokio::select! {
                        m = answers.message() => m,
                        () = &mut ended => {
                            // Events of the last puts are still on their way.
                            deadline = Some(tokio::time::Instant::now() + Duration::from_secs(3));
                            continue;
                        }
                    },
                    Some(d) => match tokio::time::timeout_at(d, answers.message()).await {
                        Ok(m) => m,
                        Err(_) => break,
                    },
                };
                let Ok(Some(answer)) = next else { break };
                let now = u64::try_from(origin.elapsed().as_micros()).unwrap_or(u64::MAX);
                for e in &answer.events {
                    let Some(sent) =
                        e.kv.as_ref()
                            .and_then(|kv| kv.value.first_chunk::<8>())
                            .map(|b| u64::from_be_bytes(*b))
                    else {
                        continue;
                    };
                    hist.saturating_record(now.saturating_sub(sent).max(1));
                }
            }
            hist
        }));
    }
    Ok(tasks)
}

/// Lease keepers: the client, each lease's id and key, and each keeper's task (latencies in us, and
/// whether its lease was found gone).
struct LeaseKeepers {
    client: Arc<Client>,
    leases: Vec<(u64, Vec<u8>)>,
    tasks: Vec<tokio::task::JoinHandle<(Histogram<u64>, bool)>>,
}

/// Grants `n` leases of `ttl`, attaches a key to each and keeps each alive every 250 ms until `end`.
async fn start_lease_keepers(
    endpoints: &[String],
    (conn, priority): (&crate::Conn, Priority),
    n: usize,
    ttl: Duration,
    end: &Arc<tokio::sync::Notify>,
) -> anyhow::Result<LeaseKeepers> {
    let client = Arc::new(Client::connect(
        endpoints,
        ClientOptions {
            priority,
            token: conn.token.clone(),
            tls: conn.tls.clone(),
            ..ClientOptions::default()
        },
    )?);
    let o = CallOptions::default();
    let secs = i64::try_from(ttl.as_secs().max(1)).unwrap_or(i64::MAX);
    let mut leases = Vec::new();
    let mut tasks = Vec::new();
    for i in 0..n {
        let (id, _) = client.lease_grant(secs, 0, &o).await?;
        let key = format!("bench-lease/{i}").into_bytes();
        client.put_leased(&key, b"alive", id, &o).await?;
        leases.push((id, key));
        let (client, end) = (Arc::clone(&client), Arc::clone(end));
        tasks.push(tokio::spawn(async move {
            let mut hist = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("bounds");
            let mut tick = tokio::time::interval(Duration::from_millis(250));
            let ended = end.notified();
            tokio::pin!(ended);
            loop {
                tokio::select! {
                    _ = tick.tick() => {}
                    () = &mut ended => return (hist, false),
                }
                let t = Instant::now();
                if let Ok(left) = client.lease_keep_alive(id, &CallOptions::default()).await {
                    if left == 0 {
                        return (hist, true);
                    }
                    hist.saturating_record(
                        u64::try_from(t.elapsed().as_micros()).unwrap_or(u64::MAX),
                    );
                }
            }
        }));
    }
    Ok(LeaseKeepers {
        client,
        leases,
        tasks,
    })
}

/// Stops the keepers, checks every lease and key is still there, revokes them; reports (printed, and
/// as the JSON line's `leases` object).
async fn finish_lease_keepers(
    k: LeaseKeepers,
    end: &tokio::sync::Notify,
) -> anyhow::Result<serde_json::Value> {
    end.notify_waiters();
    let mut hist = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("bounds");
    let mut lost = 0;
    for t in k.tasks {
        let (h, gone) = t.await?;
        hist.add(&h).expect("same bounds");
        lost += usize::from(gone);
    }
    let o = CallOptions::default();
    for (id, key) in &k.leases {
        if k.client.get(key, &o).await?.is_none() {
            lost += 1;
        }
        let _ = k.client.lease_revoke(*id, &o).await;
    }
    let pct = |q: f64| hist.value_at_quantile(q);
    eprintln!(
        "leases: {} kept alive with {} keepalives, latency us p50 {} p99 {} max {}; lost {lost}",
        k.leases.len(),
        hist.len(),
        pct(0.5),
        pct(0.99),
        hist.max()
    );
    Ok(
        json!({"count": k.leases.len(), "keepalives": hist.len(), "p50_us": pct(0.5),
              "p99_us": pct(0.99), "max_us": hist.max(), "lost": lost}),
    )
}

/// Ends the watchers and reports their delivery: printed, and as the JSON line's `watch` object.
async fn finish_watchers(
    tasks: Vec<tokio::task::JoinHandle<Histogram<u64>>>,
    end: &tokio::sync::Notify,
    expected: u64,
) -> Option<serde_json::Value> {
    if tasks.is_empty() {
        return None;
    }
    end.notify_waiters();
    let mut hist = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("histogram bounds");
    for t in tasks {
        if let Ok(h) = t.await {
            hist.add(&h).expect("same bounds");
        }
    }
    let pct = |q: f64| hist.value_at_quantile(q);
    eprintln!(
        "watch delivery: {} events of {expected} expected; latency us (put sent to event received) p50 {} \
         p99 {} p999 {} max {}",
        hist.len(),
        pct(0.5),
        pct(0.99),
        pct(0.999),
        hist.max()
    );
    Some(json!({
        "events": hist.len(), "expected": expected, "p50_us": pct(0.5), "p99_us": pct(0.99),
        "p999_us": pct(0.999), "max_us": hist.max(),
    }))
}

fn key(i: u64) -> Vec<u8> {
    format!("bench-{i:010}").into_bytes()
}

pub async fn run(
    args: BenchArgs,
    endpoints: &[String],
    consistency: ConsistencyArg,
    priority: Priority,
    conn: &crate::Conn,
) -> anyhow::Result<()> {
    anyhow::ensure!(args.workers >= 1, "--workers must be at least 1");
    anyhow::ensure!(args.connections >= 1, "--connections must be at least 1");
    anyhow::ensure!(args.keys >= 1, "--keys must be at least 1");
    if let Some(rate) = args.rate {
        anyhow::ensure!(
            rate.is_finite() && rate > 0.0,
            "--rate must be a positive number of operations per second, got {rate}"
        );
    }
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
                    token: conn.token.clone(),
                    tls: conn.tls.clone(),
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

    anyhow::ensure!(
        args.watchers == 0 || (args.workload == Workload::Put && args.target == Target::Kiwi),
        "--watchers goes with --workload put against Kiwi"
    );
    anyhow::ensure!(
        args.watchers == 0 || args.value_size >= 8,
        "--watchers needs --value-size of at least 8 (the value carries its send time)"
    );
    let value = vec![b'x'; args.value_size];
    // The clock the values' send times and the watchers' receive times are both read from.
    let origin = Instant::now();
    let watch_end = Arc::new(tokio::sync::Notify::new());
    let watchers = if args.watchers > 0 {
        start_watchers(
            &endpoints[0],
            args.watchers,
            args.connections,
            args.keys,
            origin,
            &watch_end,
        )
        .await?
    } else {
        Vec::new()
    };
    anyhow::ensure!(
        args.workload != Workload::Replay || args.target == Target::Kiwi,
        "--workload replay is Kiwi's watch; etcd is not driven with it"
    );
    if args.workload != Workload::Put && !args.no_preload {
        preload(&driver, &args, &value).await?;
    }
    anyhow::ensure!(
        args.leases == 0 || args.target == Target::Kiwi,
        "--leases is Kiwi's"
    );
    let lease_end = Arc::new(tokio::sync::Notify::new());
    let leases = if args.leases > 0 {
        Some(
            start_lease_keepers(
                endpoints,
                (conn, priority),
                args.leases,
                args.lease_ttl,
                &lease_end,
            )
            .await?,
        )
    } else {
        None
    };
    // Replays start from random revisions of the kept history that have --scan-limit events after them
    // (about one event per revision; the default retention keeps 100,000).
    let replay_from = if args.workload == Workload::Replay {
        let Driver::Kiwi(c, _) = &driver else {
            unreachable!("checked above")
        };
        let newest = c
            .status_all()
            .await
            .into_iter()
            .filter_map(|(_, s)| s.ok().map(|s| s.applied_index))
            .max()
            .context("no node answered its status")?;
        let hi = newest.saturating_sub(2 * u64::from(args.scan_limit)).max(1);
        (hi.saturating_sub(90_000).max(1), hi)
    } else {
        (0, 0)
    };

    let ramp = args
        .ramp
        .clone()
        .unwrap_or_else(|| Ramp(vec![(args.workers, args.duration)]));
    let duration = ramp.total();
    let bar = if args.quiet {
        ProgressBar::hidden()
    } else {
        let b = ProgressBar::new(duration.as_secs().max(1));
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
    // With --rate: the next request's number; request n is due at start + n / rate.
    let slots = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let start_unix_ms = unix_ms(std::time::SystemTime::now());
    let end = start + duration;
    let (active_tx, active_rx) = tokio::sync::watch::channel(ramp.workers_at(Duration::ZERO));
    let mut tasks = Vec::new();
    for w in 0..ramp.max_workers() {
        let mut active = active_rx.clone();
        let driver = driver.clone();
        let value = value.clone();
        let done = Arc::clone(&done);
        let slots = Arc::clone(&slots);
        let (workload, keys, read_ratio, scan_limit, rate, stamp) = (
            args.workload,
            args.keys,
            args.read_ratio,
            args.scan_limit,
            args.rate,
            args.watchers > 0,
        );
        tasks.push(tokio::spawn(async move {
            let mut hist =
                Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("histogram bounds");
            let mut errors: BTreeMap<String, u64> = BTreeMap::new();
            let mut rng = rand::rngs::StdRng::from_os_rng();
            while Instant::now() < end {
                if w >= *active.borrow_and_update() {
                    // Not in this phase: wait for the next one (or the end).
                    tokio::select! {
                        changed = active.changed() => if changed.is_err() { break },
                        () = tokio::time::sleep_until(end.into()) => break,
                    }
                    continue;
                }
                let k = key(rng.random_range(0..keys));
                let read = match workload {
                    Workload::Put => false,
                    Workload::Get | Workload::Scan | Workload::Replay => true,
                    Workload::Mixed => rng.random_bool(read_ratio),
                };
                let t = match rate {
                    None => Instant::now(),
                    Some(rate) => {
                        let n = slots.fetch_add(1, Ordering::Relaxed);
                        let due = start + Duration::from_secs_f64(n as f64 / rate);
                        if due >= end {
                            break;
                        }
                        tokio::time::sleep_until(due.into()).await;
                        due
                    }
                };
                let r = if workload == Workload::Scan {
                    driver.scan(w, k, scan_limit).await
                } else if workload == Workload::Replay {
                    driver
                        .replay(rng.random_range(replay_from.0..=replay_from.1), scan_limit)
                        .await
                } else if read {
                    driver.get(w, k).await.and_then(|found| {
                        if found {
                            Ok(())
                        } else {
                            Err("not_found".to_string())
                        }
                    })
                } else {
                    let mut value = value.clone();
                    if stamp {
                        let sent = u64::try_from(t.duration_since(origin).as_micros()).unwrap_or(0);
                        value[..8].copy_from_slice(&sent.to_be_bytes());
                    }
                    driver.put(w, k, value).await
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
    let kiwi = match &driver {
        Driver::Kiwi(c, _) => Some(Arc::clone(c)),
        Driver::Etcd(..) => None,
    };
    let mut timeline = Vec::new();
    let mut phase_ops = vec![0u64; ramp.0.len()];
    let (mut last_sample, mut last_done, mut last_tick_done) = (start, 0u64, 0u64);
    // The timeline goes above the progress bar, or straight to stderr without one.
    let say = |line: String| {
        if bar.is_hidden() {
            eprintln!("{line}");
        } else {
            bar.println(line);
        }
    };
    if args.ramp.is_some() {
        say(format!(
            "{:>6} {:>8} {:>9}  storage pool threads per node",
            "t s", "workers", "ops/s"
        ));
    }
    while Instant::now() < end {
        tokio::time::sleep(Duration::from_millis(250)).await;
        let elapsed = start.elapsed();
        let workers = ramp.workers_at(elapsed);
        active_tx.send_if_modified(|a| std::mem::replace(a, workers) != workers);
        let now_done = done.load(Ordering::Relaxed);
        // Ops are counted to the phase running at each 250 ms tick.
        if let Some(phase) = ramp.phase_at(elapsed) {
            phase_ops[phase] += now_done - last_tick_done;
        }
        last_tick_done = now_done;
        let secs = elapsed.as_secs_f64();
        bar.set_position(secs as u64);
        bar.set_message(format!(
            "{workers} workers, {:.0} ops/s",
            now_done as f64 / secs
        ));
        if args.ramp.is_some() && last_sample.elapsed() >= Duration::from_secs(1) {
            let dt = last_sample.elapsed().as_secs_f64();
            let rate = (now_done - last_done) as f64 / dt;
            (last_sample, last_done) = (Instant::now(), now_done);
            let pools = match &kiwi {
                Some(c) => pool_sizes(c).await,
                None => Vec::new(),
            };
            say(format!(
                "{secs:>6.1} {workers:>8} {rate:>9.0}  {}",
                pools
                    .iter()
                    .map(|p| p.map_or("-".to_string(), |n| n.to_string()))
                    .collect::<Vec<_>>()
                    .join(" / ")
            ));
            timeline.push(json!({"t_s": secs, "workers": workers, "ops_per_sec": rate, "pool_threads": pools}));
        }
    }
    drop(active_tx);
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
    let watch = finish_watchers(watchers, &watch_end, hist.len()).await;
    let leases = match leases {
        Some(l) => Some(finish_lease_keepers(l, &lease_end).await?),
        None => None,
    };

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
        Workload::Replay => format!("replay-{}", args.scan_limit),
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
    let mut line = json!({
        "label": args.label, "target": target, "workload": workload, "workers": ramp.max_workers(),
        "connections": args.connections, "keys": args.keys, "value_size": args.value_size,
        "duration_s": elapsed, "ops": ops, "ops_per_sec": ops_per_sec, "rate": args.rate,
        "p50_us": pct(0.5), "p90_us": pct(0.9), "p99_us": pct(0.99), "p999_us": pct(0.999), "max_us": hist.max(),
        "errors": errors,
    });
    if let Some(w) = watch {
        line["watch"] = w;
    }
    if let Some(l) = leases {
        line["leases"] = l;
    }
    if let Some(r) = &args.ramp {
        let events = match &kiwi {
            Some(c) => scale_events(c, start_unix_ms).await,
            None => Vec::new(),
        };
        if !events.is_empty() {
            eprintln!("storage pool scale events (t from the start of the run):");
        }
        for e in &events {
            eprintln!(
                "  t={:>6.1}s {} {} -> {}: {}",
                e["t_s"].as_f64().unwrap_or_default(),
                e["node"].as_str().unwrap_or_default(),
                e["from"],
                e["to"],
                e["reason"].as_str().unwrap_or_default()
            );
        }
        let phases: Vec<_> = r
            .0
            .iter()
            .zip(&phase_ops)
            .map(|(&(w, d), &n)| {
                json!({"workers": w, "duration_s": d.as_secs_f64(), "ops": n, "ops_per_sec": n as f64 / d.as_secs_f64()})
            })
            .collect();
        for p in &phases {
            eprintln!(
                "phase {:>3} workers for {:>5.1} s: {:.0} ops/s",
                p["workers"],
                p["duration_s"].as_f64().unwrap_or_default(),
                p["ops_per_sec"].as_f64().unwrap_or_default()
            );
        }
        line["start_unix_ms"] = json!(start_unix_ms);
        line["phases"] = json!(phases);
        line["timeline"] = json!(timeline);
        line["scale_events"] = json!(events);
    }
    let line = line.to_string();
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

fn unix_ms(t: std::time::SystemTime) -> u64 {
    t.duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// Every endpoint's storage pool size (`None` where it did not answer).
async fn pool_sizes(client: &Client) -> Vec<Option<u32>> {
    client
        .runtime_all()
        .await
        .into_iter()
        .map(|(_, r)| {
            r.ok()
                .and_then(|(_, s)| s.storage_pool.map(|p| p.current_threads))
        })
        .collect()
}

/// Scale events since `since_unix_ms` on every endpoint, oldest first.
async fn scale_events(client: &Client, since_unix_ms: u64) -> Vec<serde_json::Value> {
    let mut events: Vec<(u64, serde_json::Value)> = Vec::new();
    for (addr, r) in client.runtime_all().await {
        let Ok((_, stats)) = r else { continue };
        for e in stats.storage_pool.map(|p| p.events).unwrap_or_default() {
            if e.at_unix_ms >= since_unix_ms {
                let t = (e.at_unix_ms - since_unix_ms) as f64 / 1000.0;
                events.push((
                    e.at_unix_ms,
                    json!({"t_s": t, "node": addr, "from": e.from_threads, "to": e.to_threads, "reason": e.reason}),
                ));
            }
        }
    }
    events.sort_by_key(|e| e.0);
    events.into_iter().map(|e| e.1).collect()
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
