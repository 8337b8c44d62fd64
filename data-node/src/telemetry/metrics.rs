//! OpenTelemetry meters, one per metric family, each exported to its own Prometheus registry so that
//! `/metrics/runtime`, `/metrics/raft` and `/metrics/storage` can be scraped apart (`/metrics` renders all
//! three).
//!
//! Layers create their instruments from the [`Meters`] they are given and record into them; they never see
//! Prometheus. With metrics off ([`Meters::noop`]) the same instruments are no-ops.
//!
//! Naming: every instrument is named `kiwi_<family>_<what>`; the exporter appends the unit (`s` →
//! `_seconds`, `By` → `_bytes`) and `_total` to counters, as Prometheus conventions ask.

use opentelemetry::metrics::{Meter, MeterProvider as _};
use opentelemetry_sdk::metrics::SdkMeterProvider;
use prometheus::{Encoder as _, TextEncoder};

/// The three families of metrics, each on its own endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Family {
    /// Worker pools, the priority channel, the scaler.
    Runtime,
    /// The `RaftMetricsCollector`.
    Raft,
    /// Storage operations and engine facts.
    Storage,
}

impl Family {
    /// All families, in `/metrics` order.
    pub const ALL: [Family; 3] = [Family::Runtime, Family::Raft, Family::Storage];

    /// The endpoint suffix: `/metrics/<name>`.
    pub fn name(self) -> &'static str {
        match self {
            Family::Runtime => "runtime",
            Family::Raft => "raft",
            Family::Storage => "storage",
        }
    }

    /// Parses an endpoint suffix.
    pub fn from_name(name: &str) -> Option<Family> {
        Family::ALL.into_iter().find(|f| f.name() == name)
    }
}

/// A meter per family.
#[derive(Clone)]
pub struct Meters {
    pub runtime: Meter,
    pub raft: Meter,
    pub storage: Meter,
}

impl Meters {
    /// Meters whose instruments record nothing: metrics are off.
    pub fn noop() -> Meters {
        // The global provider is never set in Kiwi, so it is OpenTelemetry's no-op provider.
        let meter = opentelemetry::global::meter("kiwi");
        Meters {
            runtime: meter.clone(),
            raft: meter.clone(),
            storage: meter,
        }
    }
}

/// Could not build an exporter.
#[derive(Debug, thiserror::Error)]
#[error("cannot build the Prometheus exporter: {0}")]
pub struct ExporterError(String);

struct Exported {
    family: Family,
    registry: prometheus::Registry,
    provider: SdkMeterProvider,
}

/// The three exporters. Rendering runs the observable instruments' callbacks: call it off async threads.
pub struct MetricsRegistry {
    exported: Vec<Exported>,
}

impl MetricsRegistry {
    /// Builds one Prometheus registry and meter provider per family.
    ///
    /// # Errors
    /// The exporter refused to build.
    pub fn new() -> Result<MetricsRegistry, ExporterError> {
        let exported = Family::ALL
            .into_iter()
            .map(|family| {
                let registry = prometheus::Registry::new();
                let exporter = opentelemetry_prometheus::exporter()
                    .with_registry(registry.clone())
                    .without_target_info()
                    .scope_info_enabled(false)
                    .build()
                    .map_err(|e| ExporterError(e.to_string()))?;
                let provider = SdkMeterProvider::builder().with_reader(exporter).build();
                Ok(Exported {
                    family,
                    registry,
                    provider,
                })
            })
            .collect::<Result<_, ExporterError>>()?;
        Ok(MetricsRegistry { exported })
    }

    fn meter(&self, family: Family) -> Meter {
        self.exported
            .iter()
            .find(|e| e.family == family)
            .map(|e| e.provider.meter("kiwi"))
            .expect("every family has an exporter")
    }

    /// The meters layers record into.
    pub fn meters(&self) -> Meters {
        Meters {
            runtime: self.meter(Family::Runtime),
            raft: self.meter(Family::Raft),
            storage: self.meter(Family::Storage),
        }
    }

    /// Renders one family (or, with `None`, all of them) in the Prometheus text format.
    pub fn render(&self, family: Option<Family>) -> String {
        let mut families = Vec::new();
        for e in &self.exported {
            if family.is_none_or(|f| f == e.family) {
                families.extend(e.registry.gather());
            }
        }
        let mut out = Vec::new();
        // Encoding into a Vec cannot fail on I/O; a family the encoder refuses is left out.
        if let Err(err) = TextEncoder::new().encode(&families, &mut out) {
            tracing::warn!(%err, "a metric family could not be rendered");
        }
        String::from_utf8(out).unwrap_or_default()
    }
}

impl Drop for MetricsRegistry {
    fn drop(&mut self) {
        for e in &self.exported {
            let _ = e.provider.shutdown();
        }
    }
}

/// Bucket bounds, in seconds, for latencies from 50 µs to 10 s.
pub const LATENCY_BUCKETS: &[f64] = &[
    0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
    1.0, 2.5, 5.0, 10.0,
];

#[cfg(test)]
mod tests {
    use super::*;
    use opentelemetry::KeyValue;

    #[test]
    fn families_render_apart_with_prometheus_names() {
        let registry = MetricsRegistry::new().unwrap();
        let meters = registry.meters();
        let c = meters.raft.u64_counter("kiwi_raft_elections").build();
        c.add(2, &[]);
        let h = meters
            .runtime
            .f64_histogram("kiwi_runtime_queue_wait")
            .with_unit("s")
            .with_boundaries(LATENCY_BUCKETS.to_vec())
            .build();
        h.record(0.003, &[KeyValue::new("priority", "high")]);
        let raft = registry.render(Some(Family::Raft));
        assert!(raft.contains("kiwi_raft_elections_total 2"), "{raft}");
        assert!(!raft.contains("queue_wait"), "{raft}");
        let all = registry.render(None);
        assert!(
            all.contains(
                "kiwi_runtime_queue_wait_seconds_bucket{priority=\"high\",le=\"0.005\"} 1"
            ),
            "{all}"
        );
        assert!(!all.contains("otel_scope"), "{all}");
    }

    #[test]
    fn noop_meters_record_nothing() {
        let c = Meters::noop()
            .raft
            .u64_counter("kiwi_raft_elections")
            .build();
        c.add(1, &[]);
    }
}
