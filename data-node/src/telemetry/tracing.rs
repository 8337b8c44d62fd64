//! Logs and traces: one `tracing` subscriber with two layers, each with its own filter.
//!
//! - Logs (`[log] level`, `format`; `RUST_LOG` overrides the level): text or JSON lines on stderr. Every
//!   line written for a request carries its `request_id`: the request span's fields when logs show
//!   requests' DEBUG lines, else the failure line names it itself (an untraced request then gets no span
//!   at all: building one costs a few per cent of a point read's CPU, for lines that are not written).
//! - Traces (`[telemetry] otlp_endpoint`, off when unset): spans exported over OTLP/gRPC by a batch
//!   processor on its own thread (bounded queue: a slow or dead collector drops spans, it never stalls
//!   requests). An export that fails (collector down or unreachable) drops its batch, as the SDK would,
//!   and is logged by [`ReportingExporter`]: once at WARN when exports start failing, then at most once
//!   a minute with the number of batches and spans dropped, and once at INFO when they work again,
//!   instead of an ERROR line per batch. Sampling is decided when a request arrives ([`head_sample`]): a
//!   request carrying a W3C `traceparent` follows its caller's decision, others are sampled at
//!   `trace_sample_ratio`. Untraced requests get a span that only the logs see (target
//!   [`UNTRACED_TARGET`], and only when requests' DEBUG lines are logged), so no OpenTelemetry span is
//!   built for them; they still pass the OpenTelemetry layer's per-layer filter, about 150 ns per
//!   request (`benches/telemetry.rs`).
//!
//! Span layout of one KV request (names are stable; attributes in brackets):
//! `kv.<Method>` [rpc.method, priority, request_id, outcome, rpc.grpc.status_code] at INFO, with DEBUG
//! children `queue.wait`, `storage` (the work on a storage thread), `raft.read_index`, `raft.replicate`
//! (propose to commit) and `raft.apply` (apply and write). Children are created only for sampled
//! requests ([`is_traced`]), so untraced requests cost one log span.

use opentelemetry::propagation::{Extractor, TextMapPropagator as _};
use opentelemetry::trace::{TraceContextExt as _, TracerProvider as _};
use opentelemetry_otlp::WithExportConfig as _;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{Sampler, SdkTracerProvider};
use tracing::{Level, Span};
use tracing_opentelemetry::OpenTelemetrySpanExt as _;
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::util::SubscriberInitExt as _;
use tracing_subscriber::{EnvFilter, Layer as _};

use crate::config::{LogConfig, LogFormat, TelemetryConfig};

/// The service name traces carry.
pub const SERVICE_NAME: &str = "kiwi-node";

/// Logging or tracing could not start.
#[derive(Debug, thiserror::Error)]
pub enum TracingError {
    #[error("invalid log filter {filter:?} (from {source_name}): {reason}")]
    Filter {
        filter: String,
        source_name: &'static str,
        reason: String,
    },
    #[error("cannot build the OTLP exporter for telemetry.otlp_endpoint {endpoint}: {reason}")]
    Exporter { endpoint: String, reason: String },
    #[error("a global tracing subscriber is already installed: {0}")]
    AlreadyInstalled(String),
}

/// Keeps the trace exporter alive; [`TracingGuard::shutdown`] flushes it.
pub struct TracingGuard {
    provider: Option<SdkTracerProvider>,
}

impl TracingGuard {
    /// Flushes the spans still queued and stops the exporter. Blocks (up to the exporter's timeout):
    /// call it off the async threads, while the runtime still runs.
    pub fn shutdown(self) {
        if let Some(p) = self.provider {
            let _ = p.force_flush();
            let _ = p.shutdown();
        }
    }
}

/// Installs the process's subscriber ([`subscriber`]) as the global default. With an OTLP endpoint it
/// must run inside a Tokio runtime (the exporter's gRPC channel lives there).
///
/// # Errors
/// [`TracingError`].
pub fn init(log: &LogConfig, telemetry: &TelemetryConfig) -> Result<TracingGuard, TracingError> {
    let (subscriber, guard) = subscriber(log, telemetry)?;
    // Also installs the `log` bridge: dependencies' `log` records reach the logs.
    subscriber
        .try_init()
        .map_err(|e| TracingError::AlreadyInstalled(e.to_string()))?;
    if guard.provider.is_some() {
        let _ = SAMPLE_RATIO.set(telemetry.trace_sample_ratio);
    }
    Ok(guard)
}

/// Builds the node's subscriber without installing it (the telemetry benchmark measures it).
///
/// # Errors
/// [`TracingError`].
pub fn subscriber(
    log: &LogConfig,
    telemetry: &TelemetryConfig,
) -> Result<
    (
        impl tracing::Subscriber + Send + Sync + 'static,
        TracingGuard,
    ),
    TracingError,
> {
    let (filter, source_name) = match std::env::var("RUST_LOG") {
        Ok(f) if !f.is_empty() => (f, "RUST_LOG"),
        _ => (log.level.clone(), "log.level"),
    };
    let env_filter = EnvFilter::try_new(&filter).map_err(|e| TracingError::Filter {
        filter: filter.clone(),
        source_name,
        reason: e.to_string(),
    })?;
    // Colours only on a terminal: logs redirected to a file (the playground, the test harness) stay plain.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let fmt = tracing_subscriber::fmt::layer()
        .with_ansi(ansi)
        .with_writer(std::io::stderr);
    let logs = match log.format {
        LogFormat::Text => fmt.with_filter(env_filter).boxed(),
        LogFormat::Json => fmt.json().with_filter(env_filter).boxed(),
    };

    let provider = match &telemetry.otlp_endpoint {
        Some(endpoint) => {
            let exporter = opentelemetry_otlp::SpanExporter::builder()
                .with_tonic()
                .with_endpoint(endpoint.clone())
                .build()
                .map_err(|e| TracingError::Exporter {
                    endpoint: endpoint.clone(),
                    reason: e.to_string(),
                })?;
            let exporter = ReportingExporter::new(exporter, endpoint.clone());
            let resource = opentelemetry_sdk::Resource::builder()
                .with_service_name(SERVICE_NAME)
                .build();
            Some(
                SdkTracerProvider::builder()
                    .with_batch_exporter(exporter)
                    // The decision is made per request by `head_sample`; what reaches the SDK is kept.
                    .with_sampler(Sampler::ParentBased(Box::new(Sampler::AlwaysOn)))
                    .with_resource(resource)
                    .build(),
            )
        }
        None => None,
    };
    // Traces get Kiwi's own spans down to DEBUG (the request's children), except the spans of untraced
    // requests, and nothing else: events stay in the logs.
    let traces = provider.as_ref().map(|p| {
        tracing_opentelemetry::layer()
            .with_tracer(p.tracer(SERVICE_NAME))
            // Cheaper spans: no busy/idle timing on every poll, no thread, source location or module
            // attributes, and no OpenTelemetry context attached on every enter (Kiwi's code does not
            // read it; parents are passed explicitly).
            .with_tracked_inactivity(false)
            .with_threads(false)
            .with_location(false)
            .with_target(false)
            .with_context_activation(false)
            .with_filter(
                tracing_subscriber::filter::filter_fn(|meta| {
                    meta.is_span()
                        && meta.target().starts_with("kiwi_node")
                        && meta.target() != UNTRACED_TARGET
                        && *meta.level() <= Level::DEBUG
                })
                // Without a hint the subscriber's maximum level is TRACE, and every `trace!` callsite
                // in every crate would be looked at instead of skipped by one level comparison.
                .with_max_level_hint(Level::DEBUG),
            )
    });
    let subscriber = tracing_subscriber::registry().with(logs).with(traces);
    Ok((subscriber, TracingGuard { provider }))
}

/// How often a failing trace export is reported again.
const EXPORT_REPORT_EVERY: std::time::Duration = std::time::Duration::from_secs(60);

/// Decides which export outcomes are worth a log line: the first failure, then a summary at most every
/// [`EXPORT_REPORT_EVERY`] while failures go on, and the first success after them.
#[derive(Debug, Default)]
struct ExportFailures {
    /// When the last failure was reported; `None` while exports work.
    reported_at: Option<std::time::Instant>,
    /// Batches and spans dropped since then.
    batches: u64,
    spans: u64,
}

impl ExportFailures {
    /// A batch of `spans` could not be exported at `now`: the line to log, if one is due.
    fn failed(&mut self, now: std::time::Instant, spans: usize, error: &str) -> Option<String> {
        self.batches += 1;
        self.spans += spans as u64;
        match self.reported_at {
            Some(at) if now.duration_since(at) < EXPORT_REPORT_EVERY => None,
            first => {
                let line = if first.is_none() {
                    format!("trace export failing, spans are dropped until it works: {error}")
                } else {
                    format!(
                        "trace export still failing: {} batches ({} spans) dropped in the last {} s: \
                         {error}",
                        self.batches,
                        self.spans,
                        EXPORT_REPORT_EVERY.as_secs()
                    )
                };
                self.reported_at = Some(now);
                (self.batches, self.spans) = (0, 0);
                Some(line)
            }
        }
    }

    /// A batch was exported: the line to log if exports were failing.
    fn succeeded(&mut self) -> Option<String> {
        self.reported_at.take().map(|_| {
            let line = format!(
                "trace export works again ({} batches, {} spans dropped since the last report)",
                self.batches, self.spans
            );
            (self.batches, self.spans) = (0, 0);
            line
        })
    }
}

/// Wraps the OTLP exporter so that a failing collector is reported in a few log lines (see the module
/// doc), not an ERROR per batch. A failed batch is dropped either way: the SDK does not retry it.
#[derive(Debug)]
pub struct ReportingExporter<E> {
    inner: E,
    endpoint: String,
    failures: std::sync::Mutex<ExportFailures>,
}

impl<E> ReportingExporter<E> {
    /// Reports `inner`'s failures to export to `endpoint`.
    pub fn new(inner: E, endpoint: String) -> Self {
        ReportingExporter {
            inner,
            endpoint,
            failures: std::sync::Mutex::default(),
        }
    }
}

impl<E: opentelemetry_sdk::trace::SpanExporter> opentelemetry_sdk::trace::SpanExporter
    for ReportingExporter<E>
{
    async fn export(
        &self,
        batch: Vec<opentelemetry_sdk::trace::SpanData>,
    ) -> opentelemetry_sdk::error::OTelSdkResult {
        let spans = batch.len();
        let result = self.inner.export(batch).await;
        let mut failures = self
            .failures
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        match result {
            Ok(()) => {
                if let Some(line) = failures.succeeded() {
                    tracing::info!(endpoint = %self.endpoint, "{line}");
                }
            }
            Err(e) => {
                if let Some(line) =
                    failures.failed(std::time::Instant::now(), spans, &e.to_string())
                {
                    tracing::warn!(endpoint = %self.endpoint, key = "telemetry.otlp_endpoint", "{line}");
                }
            }
        }
        Ok(())
    }

    fn shutdown_with_timeout(
        &self,
        timeout: std::time::Duration,
    ) -> opentelemetry_sdk::error::OTelSdkResult {
        self.inner.shutdown_with_timeout(timeout)
    }

    fn force_flush(&self) -> opentelemetry_sdk::error::OTelSdkResult {
        self.inner.force_flush()
    }

    fn set_resource(&mut self, resource: &opentelemetry_sdk::Resource) {
        self.inner.set_resource(resource);
    }
}

struct MetadataExtractor<'a>(&'a tonic::metadata::MetadataMap);

impl Extractor for MetadataExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0
            .keys()
            .map(|k| match k {
                tonic::metadata::KeyRef::Ascii(k) => k.as_str(),
                tonic::metadata::KeyRef::Binary(k) => k.as_str(),
            })
            .collect()
    }
}

/// Target of the span of a request that is not traced (only logs see it).
pub const UNTRACED_TARGET: &str = "kiwi_node::request";
/// Target of the span of a traced request.
pub const TRACED_TARGET: &str = "kiwi_node::trace";

/// `trace_sample_ratio` when traces are exported; unset when they are not.
static SAMPLE_RATIO: std::sync::OnceLock<f64> = std::sync::OnceLock::new();

/// Whether a request is traced, decided when it arrives (head sampling).
pub enum Sampling {
    /// Not traced: traces are off, the caller's `traceparent` says not sampled, or the ratio said no.
    Untraced,
    /// A new trace.
    Root,
    /// Continues the caller's sampled trace.
    Continue(opentelemetry::Context),
}

/// Decides whether a request is traced: a valid W3C `traceparent` in `metadata` decides by its sampled
/// flag; otherwise a `trace_sample_ratio` share of requests is. Always [`Sampling::Untraced`] when no
/// OTLP endpoint is configured. Deciding here, before any span exists, is what keeps untraced requests
/// cheap: the OpenTelemetry layer never sees them.
pub fn head_sample(metadata: &tonic::metadata::MetadataMap) -> Sampling {
    let Some(&ratio) = SAMPLE_RATIO.get() else {
        return Sampling::Untraced;
    };
    if metadata.get("traceparent").is_some() {
        let parent = TraceContextPropagator::new().extract(&MetadataExtractor(metadata));
        let sc = parent.span().span_context().clone();
        if sc.is_valid() {
            return if sc.is_sampled() {
                Sampling::Continue(parent)
            } else {
                Sampling::Untraced
            };
        }
    }
    if ratio > 0.0 && rand::random::<f64>() < ratio {
        Sampling::Root
    } else {
        Sampling::Untraced
    }
}

/// Makes `span` continue the trace `parent`. Call it before the span is first entered.
pub fn set_parent(span: &Span, parent: opentelemetry::Context) {
    // Refused only when no OpenTelemetry layer is installed: then there is nothing to continue.
    let _ = span.set_parent(parent);
}

/// Whether `span` is a traced request's span (exported, so its stages get child spans).
pub fn is_traced(span: &Span) -> bool {
    span.metadata().is_some_and(|m| m.target() == TRACED_TARGET)
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use tracing::Subscriber as _;
    use tracing::level_filters::LevelFilter;

    use super::*;

    /// The OpenTelemetry layer wants DEBUG spans at most: with it installed (logs at `info`), `trace!`
    /// callsites everywhere must still be skipped by the level check alone.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn with_traces_on_the_subscriber_is_no_more_verbose_than_debug() {
        let log = LogConfig {
            level: "info".to_owned(),
            ..LogConfig::default()
        };
        let telemetry = TelemetryConfig {
            otlp_endpoint: Some("http://127.0.0.1:9".to_owned()),
            ..TelemetryConfig::default()
        };
        let (with_traces, guard) = subscriber(&log, &telemetry).expect("subscriber");
        let (without, _) = subscriber(&log, &TelemetryConfig::default()).expect("subscriber");
        // RUST_LOG overrides `log.level`, and with it the logs' level.
        if std::env::var_os("RUST_LOG").is_none() {
            assert_eq!(with_traces.max_level_hint(), Some(LevelFilter::DEBUG));
            assert_eq!(without.max_level_hint(), Some(LevelFilter::INFO));
        }
        tokio::task::spawn_blocking(move || guard.shutdown())
            .await
            .expect("shutdown");
    }

    #[test]
    fn a_failing_export_is_reported_once_then_once_a_minute_then_when_it_works_again() {
        let mut f = ExportFailures::default();
        let t0 = Instant::now();
        assert_eq!(f.succeeded(), None, "nothing to say while exports work");
        let first = f.failed(t0, 10, "connection refused").unwrap();
        assert!(
            first.contains("failing") && first.contains("connection refused"),
            "{first}"
        );
        // Within the minute: silent, but counted.
        for s in 1..=5 {
            assert_eq!(f.failed(t0 + Duration::from_secs(s), 7, "refused"), None);
        }
        let summary = f.failed(t0 + EXPORT_REPORT_EVERY, 3, "refused").unwrap();
        assert!(summary.contains("6 batches (38 spans)"), "{summary}");
        assert_eq!(
            f.failed(
                t0 + EXPORT_REPORT_EVERY + Duration::from_secs(1),
                4,
                "refused"
            ),
            None
        );
        let back = f.succeeded().unwrap();
        assert!(
            back.contains("works again") && back.contains("1 batches, 4 spans"),
            "{back}"
        );
        assert_eq!(f.succeeded(), None, "reported once");
        // A new outage is reported at once.
        assert!(
            f.failed(t0 + EXPORT_REPORT_EVERY + Duration::from_secs(2), 1, "x")
                .is_some()
        );
    }
}
