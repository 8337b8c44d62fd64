//! The guarded Prometheus endpoint that both the data node and the control plane serve (feature
//! `http`): `/metrics`, and `/metrics/<section>` for the sections the server's [`Render`] knows.
//!
//! Every request passes two checks, in this order:
//! 1. a per-client rate limit (keyed by the client's IP address): over it, `429 Too Many Requests` with
//!    `Retry-After` (whole seconds, at least 1);
//! 2. when a token is set, `Authorization: Bearer <token>`, compared in constant time: otherwise
//!    `401 Unauthorized` with `WWW-Authenticate: Bearer`. Neither the answer nor the log says anything
//!    about the token.
//!
//! Rendering runs on a blocking thread, never on the async threads that serve gRPC requests.

use std::net::{IpAddr, SocketAddr};
use std::num::NonZeroU32;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

pub use axum::Router;
use axum::extract::{ConnectInfo, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use governor::clock::Clock as _;
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use subtle::ConstantTimeEq as _;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// Longest token file read.
const MAX_TOKEN_BYTES: u64 = 4096;
/// How often clients not seen lately are dropped from the rate limiter.
const LIMITER_SWEEP: Duration = Duration::from_secs(60);

/// The metrics endpoint could not start. `key` is the config key at fault, e.g.
/// `telemetry.metrics_token_file`.
#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    /// The token file could not be read or holds no token.
    #[error("{key} {path}: {why}")]
    Token {
        key: &'static str,
        path: PathBuf,
        why: String,
    },
    /// The address could not be bound.
    #[error("cannot listen on {key} {addr}: {source}")]
    Bind {
        key: &'static str,
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

/// Reads a bearer token: the file's content without surrounding whitespace. `key` names the config key
/// in errors.
///
/// # Errors
/// [`HttpError::Token`] when the file is unreadable, too large, empty, or holds characters a header
/// value cannot carry.
pub fn read_token(path: &Path, key: &'static str) -> Result<String, HttpError> {
    let err = |why: String| HttpError::Token {
        key,
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

/// What a server renders, in the Prometheus text format.
pub trait Render: Send + Sync + 'static {
    /// `/metrics` (`section = None`) or `/metrics/<section>`; `None` for a section that does not exist.
    fn render(&self, section: Option<&str>) -> Option<String>;
    /// The sections, named in the answer to an unknown path.
    fn sections(&self) -> &'static [&'static str];
}

/// How the listener guards what it serves.
pub struct Guard {
    /// `None`: no token required (only allowed on loopback, which config validation enforces), unless
    /// `principals` is set.
    pub token: Option<String>,
    /// The server's tokens file, when it has one: a token of a principal with the `metrics` (or `admin`)
    /// role is accepted too, and a token is then always required.
    pub principals: Option<Arc<crate::auth::Authenticator>>,
    pub rate_limit_per_sec: u32,
    /// The rate limit's config key, named in 429 answers.
    pub rate_limit_key: &'static str,
}

struct HttpState {
    render: Arc<dyn Render>,
    token: Option<Vec<u8>>,
    principals: Option<Arc<crate::auth::Authenticator>>,
    limiter: DefaultKeyedRateLimiter<IpAddr>,
    rate_limit_key: &'static str,
}

/// Binds `addr`; `key` names the config key in errors.
///
/// # Errors
/// [`HttpError::Bind`].
pub async fn bind(addr: SocketAddr, key: &'static str) -> Result<TcpListener, HttpError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| HttpError::Bind { key, addr, source })
}

/// Serves metrics on `listener` until `shutdown` is cancelled, and the routes of `more` beside them (the
/// control plane's console).
pub fn spawn(
    listener: TcpListener,
    render: Arc<dyn Render>,
    guard: Guard,
    more: Option<Router>,
    shutdown: CancellationToken,
) -> tokio::task::JoinHandle<std::io::Result<()>> {
    let per_sec = NonZeroU32::new(guard.rate_limit_per_sec).unwrap_or(NonZeroU32::MIN);
    let state = Arc::new(HttpState {
        render,
        token: guard.token.map(String::into_bytes),
        principals: guard.principals,
        limiter: RateLimiter::keyed(Quota::per_second(per_sec)),
        rate_limit_key: guard.rate_limit_key,
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
    let mut app = Router::new()
        .route("/metrics", axum::routing::get(metrics))
        .route("/metrics/{family}", axum::routing::get(metrics))
        .fallback(fallback)
        .with_state(state);
    if let Some(more) = more {
        app = app.merge(more);
    }
    tokio::spawn(async move {
        axum::serve(
            listener,
            app.into_make_service_with_connect_info::<SocketAddr>(),
        )
        .with_graceful_shutdown(shutdown.cancelled_owned())
        .await
    })
}

fn not_found(uri: &Uri, sections: &[&str]) -> Response {
    let mut paths = vec!["/metrics".to_string()];
    paths.extend(sections.iter().map(|s| format!("/metrics/{s}")));
    (
        StatusCode::NOT_FOUND,
        format!("no endpoint {}; try {}\n", uri.path(), paths.join(", ")),
    )
        .into_response()
}

async fn fallback(State(state): State<Arc<HttpState>>, uri: Uri) -> Response {
    not_found(&uri, state.render.sections())
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
            format!("rate limit exceeded ({})\n", state.rate_limit_key),
        )
            .into_response();
    }
    let by_token = state
        .token
        .as_ref()
        .is_some_and(|token| authorized(&headers, token));
    let by_role = state.principals.as_ref().is_some_and(|a| {
        a.authorize(
            headers
                .get(header::AUTHORIZATION)
                .map(HeaderValue::as_bytes),
            crate::auth::Role::Metrics,
            "metrics",
        )
        .is_ok()
    });
    let required = state.token.is_some() || state.principals.is_some();
    if required && !by_token && !by_role {
        tracing::debug!(%peer, path = uri.path(), "metrics request refused: missing or wrong bearer token");
        return (
            StatusCode::UNAUTHORIZED,
            [(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"))],
            "a bearer token is required (Authorization: Bearer <token>)\n",
        )
            .into_response();
    }
    let section = uri.path().strip_prefix("/metrics/").map(str::to_owned);
    let render = Arc::clone(&state.render);
    match tokio::task::spawn_blocking(move || render.render(section.as_deref())).await {
        Ok(None) => not_found(&uri, state.render.sections()),
        Ok(Some(body)) => (
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
        let key = "telemetry.metrics_token_file";
        assert_eq!(read_token(&p, key).unwrap(), "abc123");
        std::fs::write(&p, "\n").unwrap();
        assert!(
            read_token(&p, key)
                .unwrap_err()
                .to_string()
                .contains("empty")
        );
        std::fs::write(&p, "a b").unwrap();
        assert!(read_token(&p, key).is_err());
        let missing = read_token(&dir.path().join("none"), key)
            .unwrap_err()
            .to_string();
        assert!(missing.contains("metrics_token_file"), "{missing}");
    }
}
