//! A client of the control plane (`kiwi-control`'s `ControlService`), shared by the `kiwi control`,
//! `kiwi chaos` and control-plane benchmark commands and open to other programs.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use kiwi_proto::v1::control_service_client::ControlServiceClient;
use tonic::Status;

use crate::{Error, TraceInterceptor};

/// Default control plane address (kiwi-control's default `listen_addr`).
pub const DEFAULT_CONTROL: &str = "127.0.0.1:7390";

/// A `ControlService` client that sends the control plane's token.
pub type ControlClient = ControlServiceClient<
    tonic::service::interceptor::InterceptedService<tonic::transport::Channel, TraceInterceptor>,
>;

/// Where the control plane is and how to reach it.
#[derive(Clone)]
pub struct ControlTarget {
    /// `host:port`, with or without `http://` / `https://`.
    pub addr: String,
    /// Its token (an admin principal's, when it has a tokens file).
    pub token: Option<String>,
    /// TLS: the CA that signed its certificate (`https://`).
    pub tls: Option<tonic::transport::ClientTlsConfig>,
}

/// Connects to the control plane at `target` (2 s to connect, 5 s per call).
///
/// # Errors
/// [`Error::Endpoint`] for a malformed address or TLS setting; [`Error::Rpc`] (UNAVAILABLE) when it
/// cannot be reached.
pub async fn connect(target: &ControlTarget) -> Result<ControlClient, Error> {
    let addr = target
        .addr
        .trim_start_matches("http://")
        .trim_start_matches("https://");
    let bad = |reason: String| Error::Endpoint {
        endpoint: addr.to_string(),
        reason,
    };
    let endpoint = match &target.tls {
        None => tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
            .map_err(|e| bad(e.to_string()))?,
        Some(tls) => tonic::transport::Endpoint::from_shared(format!("https://{addr}"))
            .map_err(|e| bad(e.to_string()))?
            .tls_config(tls.clone())
            .map_err(|e| bad(e.to_string()))?,
    };
    let endpoint = endpoint
        .connect_timeout(Duration::from_secs(2))
        .timeout(Duration::from_secs(5));
    let channel = endpoint.connect().await.map_err(|e| {
        Error::Rpc(Status::unavailable(format!(
            "cannot reach the control plane at {addr}: {e}"
        )))
    })?;
    Ok(ControlServiceClient::with_interceptor(
        channel,
        TraceInterceptor::with_token(target.token.as_deref())?,
    ))
}

/// Milliseconds since the Unix epoch (the control plane's timestamps).
pub fn now_unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}
