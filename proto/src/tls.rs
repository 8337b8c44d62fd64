//! TLS settings from PEM files, shared by the node, the control plane and the clients, with errors that
//! name the config key and the file.
//!
//! A server with a certificate and key serves TLS; with a CA as well, it asks every client for a
//! certificate from that CA (optional at the handshake, so that plain clients with only the CA can
//! connect; the Raft service then refuses a caller that presented none: mutual TLS for members only).

use std::path::Path;

use tonic::transport::{Certificate, ClientTlsConfig, Identity, ServerTlsConfig};

/// A TLS file could not be used.
#[derive(Debug)]
pub struct TlsError(pub String);

impl std::fmt::Display for TlsError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for TlsError {}

/// Reads a PEM file; `key` names the config key in errors.
///
/// # Errors
/// The file is missing, unreadable, or holds no PEM block of `what` (e.g. "CERTIFICATE").
pub fn read_pem(path: &Path, key: &str, what: &str) -> Result<Vec<u8>, TlsError> {
    let bytes =
        std::fs::read(path).map_err(|e| TlsError(format!("{key} {}: {e}", path.display())))?;
    let text = String::from_utf8_lossy(&bytes);
    if !text.contains("-----BEGIN") || !text.contains(what) {
        return Err(TlsError(format!(
            "{key} {}: no PEM {what} in it (expected a -----BEGIN ...{what}----- block)",
            path.display()
        )));
    }
    Ok(bytes)
}

/// The server side: `cert`+`key` (and `ca` to ask clients for certificates). `prefix` is the config
/// table, e.g. `security`.
///
/// # Errors
/// [`TlsError`] naming the key and the file.
pub fn server_config(
    prefix: &str,
    cert: &Path,
    key: &Path,
    ca: Option<&Path>,
) -> Result<ServerTlsConfig, TlsError> {
    let identity = Identity::from_pem(
        read_pem(cert, &format!("{prefix}.cert_file"), "CERTIFICATE")?,
        read_pem(key, &format!("{prefix}.key_file"), "PRIVATE KEY")?,
    );
    let mut config = ServerTlsConfig::new().identity(identity);
    if let Some(ca) = ca {
        config = config
            .client_ca_root(Certificate::from_pem(read_pem(
                ca,
                &format!("{prefix}.ca_file"),
                "CERTIFICATE",
            )?))
            .client_auth_optional(true);
    }
    Ok(config)
}

/// The client side: trust `ca`; present `identity` (certificate, key) when given.
///
/// # Errors
/// [`TlsError`] naming the key (`ca_key`, `cert_key`, `key_key`) and the file.
pub fn client_config(
    ca: &Path,
    ca_key: &str,
    identity: Option<(&Path, &str, &Path, &str)>,
) -> Result<ClientTlsConfig, TlsError> {
    let mut config = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(read_pem(
        ca,
        ca_key,
        "CERTIFICATE",
    )?));
    if let Some((cert, cert_key, key, key_key)) = identity {
        config = config.identity(Identity::from_pem(
            read_pem(cert, cert_key, "CERTIFICATE")?,
            read_pem(key, key_key, "PRIVATE KEY")?,
        ));
    }
    Ok(config)
}
