//! What the node tells about itself. Used by the layers it observes through small recording calls and
//! OpenTelemetry instruments; it depends on none of them.
//!
//! - [`raft_metrics`]: the `RaftMetricsCollector`, fed by the Raft driver, read through
//!   `NodeAdmin.GetRaftMetrics` (and `kiwi metrics`) and exported as the `raft` metric family.
//! - [`metrics`]: one OpenTelemetry meter per family (runtime, Raft, storage), each exported to its own
//!   Prometheus registry.
//! - [`http`]: the `[telemetry] metrics_addr` listener (`/metrics`, `/metrics/{runtime,raft,storage}`),
//!   with bearer-token authentication and a per-client rate limit.
//! - [`storage_metrics`]: the storage family: a timing wrapper around the backend and the engine's gauges.
//! - [`tracing`]: the process's log and trace subscriber (OTLP export, W3C `traceparent` continuation).

pub mod http;
pub mod metrics;
pub mod raft_metrics;
pub mod storage_metrics;
pub mod tracing;
