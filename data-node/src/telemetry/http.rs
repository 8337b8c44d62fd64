//! The node's metrics endpoint (`[telemetry] metrics_addr`): `/metrics` (every family) and
//! `/metrics/runtime`, `/metrics/raft`, `/metrics/storage`, served by the guarded listener the control
//! plane also uses ([`kiwi_proto::http`]: rate limit `metrics_rate_limit_per_sec`, bearer token
//! `metrics_token_file`, or the token of a `metrics` or `admin` principal from `security.tokens_file`).

use std::sync::Arc;

pub use kiwi_proto::http::{HttpError, bind, read_token};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use super::metrics::{Family, MetricsRegistry};

/// Config key of the token file, named in errors.
pub const TOKEN_KEY: &str = "telemetry.metrics_token_file";
/// Config key of the address, named in errors.
pub const ADDR_KEY: &str = "telemetry.metrics_addr";

impl kiwi_proto::http::Render for MetricsRegistry {
    fn render(&self, section: Option<&str>) -> Option<String> {
        match section {
            None => Some(MetricsRegistry::render(self, None)),
            Some(name) => Family::from_name(name).map(|f| MetricsRegistry::render(self, Some(f))),
        }
    }

    fn sections(&self) -> &'static [&'static str] {
        &["runtime", "raft", "storage"]
    }
}

/// Serves `registry` on `listener` until `shutdown` is cancelled.
pub fn spawn(
    listener: TcpListener,
    registry: Arc<MetricsRegistry>,
    token: Option<String>,
    principals: Option<Arc<kiwi_proto::auth::Authenticator>>,
    rate_limit_per_sec: u32,
    shutdown: CancellationToken,
) -> tokio::task::JoinHandle<std::io::Result<()>> {
    kiwi_proto::http::spawn(
        listener,
        registry,
        kiwi_proto::http::Guard {
            token,
            principals,
            rate_limit_per_sec,
            rate_limit_key: "telemetry.metrics_rate_limit_per_sec",
        },
        None,
        shutdown,
    )
}
