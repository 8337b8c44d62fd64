//! Telemetry cost per recorded event: what the request path and the Raft driver pay for metrics, with the
//! OpenTelemetry instruments exported to Prometheus (as with `telemetry.metrics_addr` set) against the
//! no-op instruments (metrics off), in one run, alternating rounds; plus the cost of rendering a scrape.
//!
//! Rows:
//! - `raft proposal`: `RaftMetricsCollector::proposal_answered` (hdrhistogram + OTel counter + histogram);
//! - `raft replication ack`: `follower_matched` with a `peer` attribute (the per-follower latency);
//! - `queue wait histogram`: one `priority`-labelled histogram record, as each storage request records;
//! - `storage read (memory)`: a read through the `InstrumentedBackend` wrapper on the memory backend;
//! - `request span`: the INFO span every KV request opens and enters once, under the node's log
//!   subscriber at `info` (no OTLP layer), against no span at all.
//! - `untraced request, OTLP layer`: what an untraced KV request pays for the OpenTelemetry layer being
//!   installed. The node's own subscriber (`telemetry::tracing::subscriber`, logs at `info`) with
//!   `telemetry.otlp_endpoint` set and sampling 0, against the same subscriber without an endpoint; the
//!   request is the service's own `request_span` + `traced` around a body that is polled
//!   [`REQUEST_POLLS`] times, as a linearizable get is (arrival, ReadIndex, storage).
//!
//! Run: `make bench-telemetry` (also runs the end-to-end comparison), or
//! `cargo bench -p kiwi-node --bench telemetry`. `KIWI_BENCH_EVENTS` (default 1,000,000 per round) and
//! `KIWI_BENCH_ROUNDS` (default 5) tune it.

use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, Instant};

use kiwi_node::config::{LogConfig, TelemetryConfig};
use kiwi_node::service::{KvError, request_span, traced};
use kiwi_node::telemetry::metrics::{LATENCY_BUCKETS, Meters, MetricsRegistry};
use kiwi_node::telemetry::raft_metrics::{MetricsSettings, RaftExport, RaftMetricsCollector};
use kiwi_node::telemetry::storage_metrics::InstrumentedBackend;
use kiwi_node::telemetry::tracing;
use kiwi_storage::{KeySpace, Limits, MemoryBackend, StorageBackend, WriteOptions};
use opentelemetry::KeyValue;

/// Polls of one linearizable get's handler: on arrival, after the ReadIndex round, after the storage read.
const REQUEST_POLLS: usize = 3;

fn env(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.replace('_', "").parse().ok())
        .unwrap_or(default)
}

fn settings() -> MetricsSettings {
    MetricsSettings {
        enabled: true,
        collection_interval: Duration::from_millis(100),
        retention_period: Duration::from_secs(3600),
    }
}

/// ns per call of `f` over `n` calls.
fn per_call(n: usize, mut f: impl FnMut(usize)) -> f64 {
    let t = Instant::now();
    for i in 0..n {
        f(i);
    }
    t.elapsed().as_nanos() as f64 / n as f64
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    let n = env("KIWI_BENCH_EVENTS", 1_000_000);
    let rounds = env("KIWI_BENCH_ROUNDS", 5);
    let registry = MetricsRegistry::new().expect("exporter");
    let exported = registry.meters();
    let noop = Meters::noop();

    let storage_exported = InstrumentedBackend::wrap(
        Arc::new(MemoryBackend::new(Limits::default())),
        &exported.storage,
    );
    let storage_plain: Arc<dyn StorageBackend> = Arc::new(MemoryBackend::new(Limits::default()));
    for st in [&storage_exported, &storage_plain] {
        st.write(KeySpace::Data, b"key", &[7u8; 256], WriteOptions::default())
            .unwrap();
    }

    type Row = (&'static str, Box<dyn FnMut(bool) -> f64>);
    let mut rows: Vec<Row> = Vec::new();
    {
        let (e, o) = (exported.clone(), noop.clone());
        let mut on = RaftMetricsCollector::new(settings(), RaftExport::new(&e.raft));
        let mut off = RaftMetricsCollector::new(settings(), RaftExport::new(&o.raft));
        rows.push((
            "raft proposal",
            Box::new(move |exp| {
                let c = if exp { &mut on } else { &mut off };
                per_call(n, |i| {
                    c.proposal_answered(Some(true), Duration::from_micros(500 + (i % 1000) as u64))
                })
            }),
        ));
    }
    {
        let (e, o) = (exported.clone(), noop.clone());
        let mut on = RaftMetricsCollector::new(settings(), RaftExport::new(&e.raft));
        let mut off = RaftMetricsCollector::new(settings(), RaftExport::new(&o.raft));
        let base = Instant::now();
        rows.push((
            "raft replication ack",
            Box::new(move |exp| {
                let c = if exp { &mut on } else { &mut off };
                let mut index = 0u64;
                per_call(n, |_| {
                    index += 1;
                    let now = base + Duration::from_nanos(index * 1000);
                    c.log_appended(1, index, Duration::from_micros(100), now);
                    c.follower_matched(2, index, now + Duration::from_micros(300));
                }) / 2.0
            }),
        ));
    }
    {
        let hist = |m: &Meters| {
            m.runtime
                .f64_histogram("kiwi_runtime_queue_wait")
                .with_unit("s")
                .with_boundaries(LATENCY_BUCKETS.to_vec())
                .build()
        };
        let (on, off) = (hist(&exported), hist(&noop));
        let attrs = [KeyValue::new("priority", "normal")];
        rows.push((
            "queue wait histogram",
            Box::new(move |exp| {
                let h = if exp { &on } else { &off };
                per_call(n, |i| h.record((i % 5000) as f64 * 1e-6, &attrs))
            }),
        ));
    }
    rows.push((
        "storage read (memory)",
        Box::new(move |exp| {
            let st = if exp {
                &storage_exported
            } else {
                &storage_plain
            };
            per_call(n, |_| {
                black_box(st.read(KeySpace::Data, b"key").unwrap());
            })
        }),
    ));
    // The node's log subscriber (text lines at `info`, here written nowhere): the span every request opens
    // is enabled by it, so its request_id reaches every log line of the request.
    let logs = ::tracing::Dispatch::new(
        tracing_subscriber::fmt()
            .with_writer(std::io::sink)
            .with_env_filter("info")
            .finish(),
    );
    rows.push((
        "request span (logs at info)",
        Box::new(move |exp| {
            if exp {
                ::tracing::dispatcher::with_default(&logs, || {
                    per_call(n, |i| {
                        let span = ::tracing::info_span!(
                            "kv.request",
                            otel.name = "kv.Put",
                            request_id = ::tracing::field::Empty
                        );
                        span.record("request_id", i);
                        black_box(span.in_scope(|| i));
                    })
                })
            } else {
                per_call(n, |i| {
                    black_box(i);
                })
            }
        }),
    ));

    // The node's subscriber with and without the OTLP layer, at sampling 0: no request is traced.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let log = LogConfig::default();
    let (plain, _plain_guard) =
        tracing::subscriber(&log, &TelemetryConfig::default()).expect("subscriber");
    let plain = ::tracing::Dispatch::new(plain);
    let with_otlp = TelemetryConfig {
        // Nothing listens there; nothing is exported at sampling 0 anyway.
        otlp_endpoint: Some("http://127.0.0.1:9".to_owned()),
        trace_sample_ratio: 0.0,
        ..TelemetryConfig::default()
    };
    let (otlp, _otlp_guard) = {
        let _rt = rt.enter();
        tracing::subscriber(&log, &with_otlp).expect("subscriber")
    };
    let otlp = ::tracing::Dispatch::new(otlp);
    rows.push((
        "untraced request, OTLP layer",
        Box::new(move |exp| {
            let dispatch = if exp { &otlp } else { &plain };
            let request = tonic::Request::new(());
            ::tracing::dispatcher::with_default(dispatch, || {
                rt.block_on(async {
                    let n = n / 10;
                    let t = Instant::now();
                    for i in 0..n {
                        let span = request_span("kv.Get", &request);
                        span.record("request_id", i);
                        let r = traced(span, async {
                            for _ in 1..REQUEST_POLLS {
                                tokio::task::yield_now().await;
                            }
                            Ok::<_, KvError>(i)
                        })
                        .await;
                        black_box(r.is_ok());
                    }
                    t.elapsed().as_nanos() as f64 / n as f64
                })
            })
        }),
    ));

    println!(
        "telemetry cost per event: median of {rounds} alternating rounds of {n} events (ns per event)\n"
    );
    println!(
        "{:<30} {:>12} {:>12} {:>12}",
        "event", "exported", "metrics off", "difference"
    );
    for (name, f) in &mut rows {
        let (mut on, mut off) = (Vec::new(), Vec::new());
        for r in 0..rounds {
            // Alternate which goes first, so warm-up and frequency drift do not favour one.
            if r % 2 == 0 {
                on.push(f(true));
                off.push(f(false));
            } else {
                off.push(f(false));
                on.push(f(true));
            }
        }
        let (on, off) = (median(on), median(off));
        println!("{name:<30} {on:>12.1} {off:>12.1} {:>12.1}", on - off);
    }
    let t = Instant::now();
    let scrapes = 200;
    let mut bytes = 0;
    for _ in 0..scrapes {
        bytes = registry.render(None).len();
    }
    println!(
        "\nrendering /metrics (the instruments above, {bytes} bytes): {:.0} µs per scrape, off the request path",
        t.elapsed().as_micros() as f64 / f64::from(scrapes)
    );
}
