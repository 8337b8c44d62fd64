//! The metrics HTTP listener (`[telemetry] metrics_addr`): `/metrics` (every family) and
//! `/metrics/runtime`, `/metrics/raft`, `/metrics/storage`, in the Prometheus text format.
//!
//! Every request passes two checks, in this order:
//! 1. a per-client rate limit (`metrics_rate_limit_per_sec`, keyed by the client's IP address): over it,
//!    `429 Too Many Requests` with `Retry-After` (whole seconds, at least 1);
//! 2. when `metrics_token_file` is set, `Authorization: Bearer <token>`, compared in constant time:
//!    otherwise `401 Unauthorized` with `WWW-Authenticate: Bearer`. Neither the answer nor the log says
//!    anything about the token.
//!
//! Rendering runs the observable instruments' callbacks on a blocking thread, never on the async threads
//! that serve KV requests.

use std::net::{IpAddr, SocketAddr};
use std::num::NonZeroU32;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::{ConnectInfo, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use governor::clock::Clock as _;
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use subtle::ConstantTimeEq as _;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use super::metrics::{Family, MetricsRegistry};

/// Longest token file read.
const MAX_TOKEN_BYTES: u64 = 4096;
/// How often clients not seen lately are dropped from the rate limiter.
const LIMITER_SWEEP: Duration = Duration::from_secs(60);

/// The metrics endpoint could not start.
#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    /// The token file could not be read or holds no token.
    #[error("telemetry.metrics_token_file {path}: {why}")]
    Token { path: PathBuf, why: String },
    /// The address could not be bound.
    #[error("cannot listen on telemetry.metrics_addr {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

/// Reads a bearer token: the file's content without surrounding whitespace.
///
/// # Errors
/// [`HttpError::Token`] when the file is unreadable, too large, empty, or holds characters a header
/// value cannot carry.
pub fn read_token(path: &Path) -> Result<String, HttpError> {
    let err = |why: String| HttpError::Token {
        path: path.to_path_buf(),
        why,
    };
    let len = std::fs::metadata(path)
        .map_err(|e| err(e.to_string()))?
        .len();
    if len > MAX_TOKEN_BYTES {
        return Err(err(format!(
            "is {len} bytes; a token file holds at most {MAX_TOKEN_BYTES}"
        )));
    }
    let text = std::fs::read_to_string(path).map_err(|e| err(e.to_string()))?;
    let token = text.trim();
    if token.is_empty() {
        return Err(err("is empty; it must hold the bearer token".into()));
    }
    if !token.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(err(
            "the token must be printable ASCII without spaces (it travels in an HTTP header)"
                .into(),
        ));
    }
    Ok(token.to_owned())
}

/// What the listener serves, and how it guards it.
pub struct MetricsHttp {
    pub registry: Arc<MetricsRegistry>,
    /// `None`: no token required (only allowed on loopback, which config validation enforces).
    pub token: Option<String>,
    pub rate_limit_per_sec: u32,
}

struct HttpState {
    registry: Arc<MetricsRegistry>,
    token: Option<Vec<u8>>,
    limiter: DefaultKeyedRateLimiter<IpAddr>,
}

/// Binds `addr`.
///
/// # Errors
/// [`HttpError::Bind`].
pub async fn bind(addr: SocketAddr) -> Result<TcpListener, HttpError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| HttpError::Bind { addr, source })
}

/// Serves metrics on `listener` until `shutdown` is cancelled.
pub fn spawn(
    listener: TcpListener,
    http: MetricsHttp,
    shutdown: CancellationToken,
) -> tokio::task::JoinHandle<std::io::Result<()>> {
    let per_sec = NonZeroU32::new(http.rate_limit_per_sec).unwrap_or(NonZeroU32::MIN);
    let state = Arc::new(HttpState {
        registry: http.registry,
        token: http.token.map(String::into_bytes),
        limiter: RateLimiter::keyed(Quota::per_second(per_sec)),
    });
    {
        let state = Arc::clone(&state);
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            let mut sweep = tokio::time::interval(LIMITER_SWEEP);
            loop {
                tokio::select! {
                    _ = sweep.tick() => state.limiter.retain_recent(),
                    () = shutdown.cancelled() => return,
                }
            }
        });
    }
    let app = Router::new()
        .route("/metrics", axum::routing::get(metrics))
        .route("/metrics/{family}", axum::routing::get(metrics))
        .fallback(not_found)
        .with_state(state);
    tokio::spawn(async move {
        axum::serve(
            listener,
            app.into_make_service_with_connect_info::<SocketAddr>(),
        )
        .with_graceful_shutdown(shutdown.cancelled_owned())
        .await
    })
}

async fn not_found(uri: Uri) -> Response {
    (
        StatusCode::NOT_FOUND,
        format!(
            "no endpoint {}; try /metrics, /metrics/runtime, /metrics/raft or /metrics/storage\n",
            uri.path()
        ),
    )
        .into_response()
}

/// Whether `headers` carry `Authorization: Bearer <token>`.
fn authorized(headers: &HeaderMap, token: &[u8]) -> bool {
    let Some(value) = headers.get(header::AUTHORIZATION) else {
        return false;
    };
    let value = value.as_bytes();
    let scheme = b"Bearer ";
    if value.len() < scheme.len() || !value[..scheme.len()].eq_ignore_ascii_case(scheme) {
        return false;
    }
    // Constant time over the presented bytes; only the length of the token can leak.
    bool::from(value[scheme.len()..].ct_eq(token))
}

async fn metrics(
    State(state): State<Arc<HttpState>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    uri: Uri,
    headers: HeaderMap,
) -> Response {
    if let Err(not_until) = state.limiter.check_key(&peer.ip()) {
        let wait = not_until.wait_time_from(state.limiter.clock().now());
        let secs = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
        return (
            StatusCode::TOO_MANY_REQUESTS,
            [(header::RETRY_AFTER, HeaderValue::from(secs.max(1)))],
            "rate limit exceeded (telemetry.metrics_rate_limit_per_sec)\n",
        )
            .into_response();
    }
    if let Some(token) = &state.token
        && !authorized(&headers, token)
    {
        tracing::debug!(%peer, path = uri.path(), "metrics request refused: missing or wrong bearer token");
        return (
            StatusCode::UNAUTHORIZED,
            [(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"))],
            "a bearer token is required (Authorization: Bearer <token>)\n",
        )
            .into_response();
    }
    let family = match uri.path().strip_prefix("/metrics/") {
        None => None,
        Some(name) => match Family::from_name(name) {
            Some(f) => Some(f),
            None => return not_found(uri).await,
        },
    };
    let registry = Arc::clone(&state.registry);
    match tokio::task::spawn_blocking(move || registry.render(family)).await {
        Ok(body) => (
            [(
                header::CONTENT_TYPE,
                HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
            )],
            body,
        )
            .into_response(),
        Err(e) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("rendering failed: {e}\n"),
        )
            .into_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(auth: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(header::AUTHORIZATION, HeaderValue::from_str(auth).unwrap());
        h
    }

    #[test]
    fn bearer_token_must_match_exactly() {
        let token = b"s3cret";
        assert!(authorized(&headers("Bearer s3cret"), token));
        assert!(authorized(&headers("bearer s3cret"), token));
        assert!(!authorized(&headers("Bearer s3cre"), token));
        assert!(!authorized(&headers("Bearer s3cret2"), token));
        assert!(!authorized(&headers("Basic s3cret"), token));
        assert!(!authorized(&headers("Bearer"), token));
        assert!(!authorized(&HeaderMap::new(), token));
    }

    #[test]
    fn token_files_are_checked() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("t");
        std::fs::write(&p, "  abc123\n").unwrap();
        assert_eq!(read_token(&p).unwrap(), "abc123");
        std::fs::write(&p, "\n").unwrap();
        assert!(read_token(&p).unwrap_err().to_string().contains("empty"));
        std::fs::write(&p, "a b").unwrap();
        assert!(read_token(&p).is_err());
        let missing = read_token(&dir.path().join("none"))
            .unwrap_err()
            .to_string();
        assert!(missing.contains("metrics_token_file"), "{missing}");
    }
}
