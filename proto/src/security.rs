//! `[security]`, the same table in the node's and the control plane's config (feature `auth`): its keys,
//! the rules between them, and what they build (the authenticator, the server's TLS, the TLS to peers).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, RwLock};

use rustls::server::WebPkiClientVerifier;
use serde::{Deserialize, Serialize};
use tokio::net::TcpStream;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::ClientTlsConfig;
use tonic::transport::server::TcpIncoming;

use crate::auth::{Authenticator, TokensError};
use crate::connections::{Connections, Counted};
use crate::tls::TlsError;

/// `[security]`
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SecurityConfig {
    /// Tokens file (TOML: `[[token]]` entries with `sha256`, `principal`, `role`; `kiwi token new`):
    /// every call then needs `authorization: Bearer <token>` with a role that allows it. Unset: no
    /// authentication, which is allowed only with `listen_addr` on loopback.
    pub tokens_file: Option<PathBuf>,
    /// PEM certificate and private key: the gRPC port serves TLS (clients need the CA, `kiwi
    /// --ca-cert`). Both or neither.
    pub cert_file: Option<PathBuf>,
    pub key_file: Option<PathBuf>,
    /// PEM CA: callers may present a certificate it signed (on a node, members must: mutual TLS for
    /// Raft), and a node connects to its peers trusting it and presenting `cert_file`. Needs `cert_file`
    /// and `key_file`.
    pub ca_file: Option<PathBuf>,
}

impl SecurityConfig {
    /// What is wrong with the table for a server listening on `listen_addr`: (key, why).
    pub fn problems(&self, listen_addr: SocketAddr) -> Vec<(&'static str, String)> {
        let mut out = Vec::new();
        if !listen_addr.ip().is_loopback() && self.tokens_file.is_none() {
            out.push((
                "security.tokens_file",
                format!(
                    "must be set when listen_addr is not a loopback address ({listen_addr}): without it \
                     anyone who can reach the port may call everything. Keep listen_addr on 127.0.0.1, \
                     or set security.tokens_file (see `kiwi token new`)"
                ),
            ));
        }
        if self.cert_file.is_some() != self.key_file.is_some() {
            out.push((
                if self.cert_file.is_some() {
                    "security.key_file"
                } else {
                    "security.cert_file"
                },
                "security.cert_file and security.key_file go together".into(),
            ));
        }
        if self.ca_file.is_some() && self.cert_file.is_none() {
            out.push((
                "security.ca_file",
                "needs security.cert_file and security.key_file (peers present them for mutual TLS)"
                    .into(),
            ));
        }
        out
    }

    /// The tokens file's authenticator, when one is set.
    ///
    /// # Errors
    /// [`TokensError`] naming `security.tokens_file`.
    pub fn authenticator(&self) -> Result<Option<Arc<Authenticator>>, TokensError> {
        self.tokens_file
            .as_deref()
            .map(|p| Authenticator::from_file(p, "security.tokens_file").map(Arc::new))
            .transpose()
    }

    /// The server's TLS when `cert_file` and `key_file` are set (asking callers for a certificate from
    /// `ca_file` when set, without requiring one: clients need only the CA).
    ///
    /// # Errors
    /// [`TlsError`] naming the key and the file.
    pub fn server_tls(&self) -> Result<Option<Arc<ServerTls>>, TlsError> {
        self.server_tls_for(false)
    }

    /// Like [`server_tls`](Self::server_tls) for a port only members speak to (a node's
    /// `raft_listen_addr`): with `ca_file` set, a caller without a certificate from that CA fails the
    /// TLS handshake.
    ///
    /// # Errors
    /// [`TlsError`] naming the key and the file.
    pub fn members_tls(&self) -> Result<Option<Arc<ServerTls>>, TlsError> {
        self.server_tls_for(true)
    }

    fn server_tls_for(&self, members_only: bool) -> Result<Option<Arc<ServerTls>>, TlsError> {
        if self.cert_file.is_none() || self.key_file.is_none() {
            return Ok(None);
        }
        let config = ServerTls::build(self, members_only)?;
        Ok(Some(Arc::new(ServerTls {
            files: self.clone(),
            members_only,
            current: RwLock::new(Arc::new(config)),
        })))
    }

    /// TLS to peers (trusting `ca_file`, presenting `cert_file`), when all three files are set.
    ///
    /// # Errors
    /// [`TlsError`] naming the key and the file.
    pub fn peer_tls(&self) -> Result<Option<Arc<PeerTls>>, TlsError> {
        if self.ca_file.is_none() || self.cert_file.is_none() || self.key_file.is_none() {
            return Ok(None);
        }
        let config = PeerTls::build(self)?;
        Ok(Some(Arc::new(PeerTls {
            files: self.clone(),
            current: RwLock::new(config),
        })))
    }
}

/// A server's TLS, read from `[security]` and replaceable while serving ([`reload`](Self::reload), on
/// SIGHUP): connections accepted afterwards get the new certificate and CA, open ones keep theirs, so
/// a certificate rotates with no downtime. A reload that fails its checks keeps the old configuration.
pub struct ServerTls {
    files: SecurityConfig,
    members_only: bool,
    current: RwLock<Arc<rustls::ServerConfig>>,
}

impl ServerTls {
    fn build(files: &SecurityConfig, members_only: bool) -> Result<rustls::ServerConfig, TlsError> {
        let (Some(cert), Some(key)) = (&files.cert_file, &files.key_file) else {
            return Err(TlsError(
                "security.cert_file and security.key_file are needed to serve TLS".into(),
            ));
        };
        let pair = crate::tls::read_key_pair(cert, "security.cert_file", key, "security.key_file")?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = rustls::ServerConfig::builder_with_provider(Arc::clone(&provider))
            .with_safe_default_protocol_versions()
            .map_err(|e| TlsError(format!("TLS: {e}")))?;
        let builder = match &files.ca_file {
            Some(ca) => {
                let roots = crate::tls::read_roots(ca, "security.ca_file")?;
                let verifier =
                    WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider);
                let verifier = if members_only {
                    verifier
                } else {
                    verifier.allow_unauthenticated()
                };
                builder.with_client_cert_verifier(verifier.build().map_err(|e| {
                    TlsError(format!(
                        "security.ca_file {}: cannot verify clients with it: {e}",
                        ca.display()
                    ))
                })?)
            }
            None => builder.with_no_client_auth(),
        };
        let mut config = builder
            .with_single_cert(pair.chain, pair.key)
            .map_err(|e| {
                TlsError(format!(
                    "security.cert_file {} / security.key_file {}: {e}",
                    cert.display(),
                    key.display()
                ))
            })?;
        config.alpn_protocols = vec![b"h2".to_vec()];
        Ok(config)
    }

    /// Reads the files again; on success new connections use them.
    ///
    /// # Errors
    /// [`TlsError`] naming the key and the file; the configuration in force is kept.
    pub fn reload(&self) -> Result<(), TlsError> {
        let config = Self::build(&self.files, self.members_only)?;
        *self
            .current
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Arc::new(config);
        Ok(())
    }

    /// The TLS connections of `tcp`, within `connections`' limits (see
    /// [`Connections::accept_each`]). On a members-only port a caller is a member when its certificate
    /// names one (`kiwi://node/<id>`): only members take the member reserve. Stops accepting when the
    /// returned stream is dropped.
    pub fn accept(
        self: &Arc<Self>,
        connections: &Arc<Connections>,
        tcp: TcpIncoming,
    ) -> ReceiverStream<std::io::Result<Counted<TlsStream<TcpStream>>>> {
        let this = Arc::clone(self);
        connections.accept_each(tcp, "TLS handshake", move |stream| {
            let acceptor = TlsAcceptor::from(Arc::clone(
                &this
                    .current
                    .read()
                    .unwrap_or_else(std::sync::PoisonError::into_inner),
            ));
            let members_only = this.members_only;
            async move {
                let tls = acceptor.accept(stream).await?;
                let member = members_only.then(|| {
                    tls.get_ref()
                        .1
                        .peer_certificates()
                        .and_then(|c| c.first())
                        .is_some_and(|leaf| matches!(crate::tls::member_id(leaf), Ok(Some(_))))
                });
                Ok((tls, member))
            }
        })
    }
}

/// What SIGHUP reads again.
#[derive(Default)]
pub struct Reloadable {
    /// Every TLS listener.
    pub servers: Vec<Arc<ServerTls>>,
    /// The TLS to peers.
    pub peers: Option<Arc<PeerTls>>,
    /// The tokens file.
    pub tokens: Option<Arc<Authenticator>>,
}

/// On SIGHUP (until `stop`), reads `[security]`'s files again: certificate, key and CA for every TLS
/// listener and for the peers (new connections use them, open ones keep theirs: no downtime), and the
/// tokens file (a revoked token is refused from the next call). Each part that fails its checks is
/// logged, naming the key and the file, and keeps what is in force. Must be called inside a tokio
/// runtime; does nothing when there is nothing to reload.
pub fn reload_on_sighup(
    what: Reloadable,
    stop: impl std::future::Future<Output = ()> + Send + 'static,
) {
    if what.servers.is_empty() && what.peers.is_none() && what.tokens.is_none() {
        return;
    }
    use tokio::signal::unix::{SignalKind, signal};
    let mut hangup = match signal(SignalKind::hangup()) {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(error = %e, "cannot watch SIGHUP: certificates reload only by a restart");
            return;
        }
    };
    tokio::spawn(async move {
        tokio::pin!(stop);
        loop {
            tokio::select! {
                r = hangup.recv() => if r.is_none() { return },
                () = &mut stop => return,
            }
            if !what.servers.is_empty() || what.peers.is_some() {
                let outcome = what
                    .servers
                    .iter()
                    .map(|s| s.reload())
                    .chain(what.peers.iter().map(|p| p.reload()))
                    .collect::<Result<Vec<()>, _>>();
                match outcome {
                    Ok(_) => tracing::info!(
                        "SIGHUP: TLS certificates reloaded; new connections use them"
                    ),
                    Err(e) => tracing::error!(
                        error = %e,
                        "SIGHUP: TLS reload refused; the certificates in force are kept"
                    ),
                }
            }
            if let Some(tokens) = &what.tokens {
                match tokens.reload() {
                    Ok(()) => tracing::info!("SIGHUP: tokens file reloaded"),
                    Err(e) => tracing::error!(
                        error = %e,
                        "SIGHUP: tokens reload refused; the tokens in force are kept"
                    ),
                }
            }
        }
    });
}

/// The TLS a node uses to reach its peers (the cluster CA, its own certificate), replaceable like
/// [`ServerTls`]: connections made after a reload present the new certificate.
pub struct PeerTls {
    files: SecurityConfig,
    current: RwLock<ClientTlsConfig>,
}

impl PeerTls {
    fn build(files: &SecurityConfig) -> Result<ClientTlsConfig, TlsError> {
        let (Some(ca), Some(cert), Some(key)) = (&files.ca_file, &files.cert_file, &files.key_file)
        else {
            return Err(TlsError(
                "security.ca_file, cert_file and key_file are needed for TLS to peers".into(),
            ));
        };
        crate::tls::client_config(
            ca,
            "security.ca_file",
            Some((cert, "security.cert_file", key, "security.key_file")),
        )
    }

    /// The configuration for a new connection.
    pub fn get(&self) -> ClientTlsConfig {
        self.current
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Reads the files again; on success new connections use them.
    ///
    /// # Errors
    /// [`TlsError`] naming the key and the file; the configuration in force is kept.
    pub fn reload(&self) -> Result<(), TlsError> {
        let config = Self::build(&self.files)?;
        *self
            .current
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = config;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_rules_between_the_keys_are_named() {
        let loopback: SocketAddr = "127.0.0.1:1".parse().unwrap();
        let open: SocketAddr = "0.0.0.0:1".parse().unwrap();
        assert!(SecurityConfig::default().problems(loopback).is_empty());
        let keys = |c: &SecurityConfig, a| {
            c.problems(a)
                .into_iter()
                .map(|(k, _)| k)
                .collect::<Vec<_>>()
        };
        assert_eq!(
            keys(&SecurityConfig::default(), open),
            ["security.tokens_file"]
        );
        let half = SecurityConfig {
            cert_file: Some("c".into()),
            ca_file: Some("a".into()),
            ..SecurityConfig::default()
        };
        assert_eq!(keys(&half, loopback), ["security.key_file"]);
        let ca_only = SecurityConfig {
            ca_file: Some("a".into()),
            ..SecurityConfig::default()
        };
        assert_eq!(keys(&ca_only, loopback), ["security.ca_file"]);
    }
}
