//! `[security]`, the same table in the node's and the control plane's config (feature `auth`): its keys,
//! the rules between them, and what they build (the authenticator, the server's TLS, the TLS to peers).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use tonic::transport::{ClientTlsConfig, Server};

use crate::auth::{Authenticator, TokensError};
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

    /// `builder` serving TLS when `cert_file` and `key_file` are set (asking callers for a certificate
    /// from `ca_file` when set); returns whether it does.
    ///
    /// # Errors
    /// [`TlsError`] naming the key and the file.
    pub fn serve_tls(&self, builder: Server) -> Result<(Server, bool), TlsError> {
        self.serve(builder, false)
    }

    /// Like [`serve_tls`](Self::serve_tls) for a port only members speak to (a node's
    /// `raft_listen_addr`): with `ca_file` set, a caller without a certificate from that CA fails the
    /// TLS handshake.
    ///
    /// # Errors
    /// [`TlsError`] naming the key and the file.
    pub fn serve_members_tls(&self, builder: Server) -> Result<(Server, bool), TlsError> {
        self.serve(builder, true)
    }

    fn serve(&self, builder: Server, members_only: bool) -> Result<(Server, bool), TlsError> {
        let (Some(cert), Some(key)) = (&self.cert_file, &self.key_file) else {
            return Ok((builder, false));
        };
        let tls = crate::tls::server_config(
            "security",
            cert,
            key,
            self.ca_file.as_deref(),
            members_only,
        )?;
        let builder = builder.tls_config(tls).map_err(|e| {
            TlsError(format!(
                "security.cert_file / security.key_file: {e} (is the key the certificate's?)"
            ))
        })?;
        Ok((builder, true))
    }

    /// TLS to peers (trusting `ca_file`, presenting `cert_file`), when all three files are set.
    ///
    /// # Errors
    /// [`TlsError`] naming the key and the file.
    pub fn peer_tls(&self) -> Result<Option<ClientTlsConfig>, TlsError> {
        let (Some(ca), Some(cert), Some(key)) = (&self.ca_file, &self.cert_file, &self.key_file)
        else {
            return Ok(None);
        };
        crate::tls::client_config(
            ca,
            "security.ca_file",
            Some((cert, "security.cert_file", key, "security.key_file")),
        )
        .map(Some)
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
