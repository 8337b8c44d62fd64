//! Logs and traces: one `tracing` subscriber with two layers, each with its own filter.
//!
//! - Logs (`[log] level`, `format`; `RUST_LOG` overrides the level): text or JSON lines on stderr. Every
//!   line written inside a request carries the request span's fields, the `request_id` among them.
//! - Traces (`[telemetry] otlp_endpoint`, off when unset): spans exported over OTLP/gRPC by a batch
//!   processor on its own thread (bounded queue: a slow or dead collector drops spans, it never stalls
//!   requests). Sampling is parent-based: a request carrying a W3C `traceparent` follows its caller's
//!   decision, others are sampled at `trace_sample_ratio`.
//!
//! Span layout of one KV request (names are stable; attributes in brackets):
//! `kv.<Method>` [rpc.method, priority, request_id, outcome, rpc.grpc.status_code] at INFO, with DEBUG
//! children `queue.wait`, `storage` (the work on a storage thread), `raft.read_index`, `raft.replicate`
//! (propose to commit) and `raft.apply` (apply and write). Children are created only for sampled
//! requests ([`sampled`]), so unsampled requests cost one span.

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

/// Installs the process's subscriber. With an OTLP endpoint it must run inside a Tokio runtime (the
/// exporter's gRPC channel lives there).
///
/// # Errors
/// [`TracingError`].
pub fn init(log: &LogConfig, telemetry: &TelemetryConfig) -> Result<TracingGuard, TracingError> {
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
            let resource = opentelemetry_sdk::Resource::builder()
                .with_service_name(SERVICE_NAME)
                .build();
            Some(
                SdkTracerProvider::builder()
                    .with_batch_exporter(exporter)
                    .with_sampler(Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(
                        telemetry.trace_sample_ratio,
                    ))))
                    .with_resource(resource)
                    .build(),
            )
        }
        None => None,
    };
    // Traces get Kiwi's own spans down to DEBUG (the request's children) and nothing else: events stay in
    // the logs.
    let traces = provider.as_ref().map(|p| {
        tracing_opentelemetry::layer()
            .with_tracer(p.tracer(SERVICE_NAME))
            .with_filter(tracing_subscriber::filter::filter_fn(|meta| {
                meta.is_span()
                    && meta.target().starts_with("kiwi_node")
                    && *meta.level() <= Level::DEBUG
            }))
    });
    tracing_subscriber::registry()
        .with(logs)
        .with(traces)
        .try_init()
        .map_err(|e| TracingError::AlreadyInstalled(e.to_string()))?;
    Ok(TracingGuard { provider })
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

/// Makes `span` continue the trace of a W3C `traceparent` in `metadata`, if there is a valid one. Call it
/// before the span is first entered.
pub fn continue_trace(span: &Span, metadata: &tonic::metadata::MetadataMap) {
    if span.is_disabled() || metadata.get("traceparent").is_none() {
        return;
    }
    let parent = TraceContextPropagator::new().extract(&MetadataExtractor(metadata));
    if parent.span().span_context().is_valid() {
        // Refused only when no OpenTelemetry layer is installed: then there is nothing to continue.
        let _ = span.set_parent(parent);
    }
}

/// Whether `span` is exported (an OpenTelemetry layer is installed and the trace is sampled).
pub fn sampled(span: &Span) -> bool {
    !span.is_disabled() && span.context().span().span_context().is_sampled()
}

/// The trace id of `span` (32 hex digits), when it is sampled.
pub fn trace_id(span: &Span) -> Option<String> {
    let cx = span.context();
    let sc = cx.span().span_context().clone();
    sc.is_sampled().then(|| sc.trace_id().to_string())
}
