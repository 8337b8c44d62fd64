//! The process-wide subscriber `telemetry::tracing::init` installs (its own test binary: it is global):
//! only traced requests' spans reach OpenTelemetry; untraced requests' spans are seen by the logs only.

use kiwi_node::config::{LogConfig, TelemetryConfig};
use kiwi_node::telemetry::tracing::{TRACED_TARGET, UNTRACED_TARGET, init};
use opentelemetry::trace::TraceContextExt as _;
use tracing_opentelemetry::OpenTelemetrySpanExt as _;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_traced_spans_reach_opentelemetry() {
    let telemetry = TelemetryConfig {
        // Nothing listens there: spans are batched and their export fails, which is fine here.
        otlp_endpoint: Some("http://127.0.0.1:9".into()),
        ..TelemetryConfig::default()
    };
    let guard = init(&LogConfig::default(), &telemetry).unwrap();
    let valid = |s: &tracing::Span| s.context().span().span_context().is_valid();

    let untraced = tracing::info_span!(target: UNTRACED_TARGET, "kv.request", request_id = "a");
    assert!(!untraced.is_disabled(), "the logs see every request span");
    assert!(
        !valid(&untraced),
        "an untraced request reached OpenTelemetry"
    );
    let traced = tracing::info_span!(target: TRACED_TARGET, "kv.request", request_id = "b");
    assert!(
        valid(&traced),
        "a traced request did not reach OpenTelemetry"
    );
    let child = tracing::debug_span!(target: "kiwi_node::service", parent: &traced, "queue.wait");
    assert!(
        !child.is_disabled(),
        "children of a traced request are exported at DEBUG"
    );
    assert_eq!(
        child.context().span().span_context().trace_id(),
        traced.context().span().span_context().trace_id()
    );
    drop((untraced, traced, child));
    tokio::task::spawn_blocking(move || guard.shutdown())
        .await
        .unwrap();
}
