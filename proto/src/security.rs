//! `[security]`, the same table in the node's and the control plane's config (feature `auth`): its keys,
//! the rules between them, and what they build (the authenticator, the server's TLS, the TLS to peers).

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::{Arc, RwLock};
use std::task::{Context, Poll};
use std::time::Duration;

use rustls::server::WebPkiClientVerifier;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;
use tokio_stream::StreamExt as _;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::ClientTlsConfig;
use tonic::transport::server::{Connected, TcpIncoming};

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

/// Connections waiting for their TLS handshake (or, in plain text, their first bytes) at once on one
/// listener; connections beyond are closed at once.
pub const MAX_HANDSHAKES: usize = 1024;
/// Of which one source address may hold: a client that opens silent connections from one address fills
/// only its own share, and a restarted peer (from another address) still gets a slot.
pub const MAX_HANDSHAKES_PER_SOURCE: usize = 64;
/// Connections open at once on one listener (waiting or established); more are closed at once.
pub const MAX_CONNECTIONS: usize = 8192;
/// Of which one source address may hold.
pub const MAX_CONNECTIONS_PER_SOURCE: usize = 2048;
/// Longest a new connection may take to finish its TLS handshake (or, in plain text, to send its first
/// bytes) before it is closed: a slow or silent client holds nothing longer.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest pause after a failed accept (EMFILE, ENFILE, ENOBUFS): the pauses double from 5 ms, so a
/// listener out of file descriptors does not spin.
const MAX_ACCEPT_BACKOFF: Duration = Duration::from_secs(1);

/// How many connections a listener takes, in all and per source address (see the constants above).
#[derive(Debug, Clone, Copy)]
pub struct ConnectionLimits {
    pub handshakes: usize,
    pub handshakes_per_source: usize,
    pub connections: usize,
    pub connections_per_source: usize,
}

impl Default for ConnectionLimits {
    fn default() -> Self {
        ConnectionLimits {
            handshakes: MAX_HANDSHAKES,
            handshakes_per_source: MAX_HANDSHAKES_PER_SOURCE,
            connections: MAX_CONNECTIONS,
            connections_per_source: MAX_CONNECTIONS_PER_SOURCE,
        }
    }
}

#[derive(Default)]
struct Counts {
    pending: usize,
    open: usize,
}

/// The connections a listener holds: totals and per source address.
struct Gate {
    limits: ConnectionLimits,
    counts: std::sync::Mutex<(Counts, HashMap<IpAddr, Counts>)>,
}

/// A connection's place in its listener's [`Gate`]: waiting for its first step until `handshaken`,
/// open until dropped.
struct Slot {
    gate: Arc<Gate>,
    source: IpAddr,
    pending: bool,
}

impl Gate {
    fn counts(&self) -> std::sync::MutexGuard<'_, (Counts, HashMap<IpAddr, Counts>)> {
        self.counts
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// A slot for a new connection from `source`, or why there is none.
    fn admit(self: &Arc<Self>, source: IpAddr) -> Result<Slot, &'static str> {
        let l = self.limits;
        let mut guard = self.counts();
        let (total, by_source) = &mut *guard;
        let mine = by_source.entry(source).or_default();
        let refusal = if total.open >= l.connections {
            Some("too many connections")
        } else if mine.open >= l.connections_per_source {
            Some("too many connections from one address")
        } else if total.pending >= l.handshakes {
            Some("too many connections waiting for their first step")
        } else if mine.pending >= l.handshakes_per_source {
            Some("too many connections from one address waiting for their first step")
        } else {
            None
        };
        if let Some(why) = refusal {
            if mine.open == 0 {
                by_source.remove(&source);
            }
            return Err(why);
        }
        mine.open += 1;
        mine.pending += 1;
        total.open += 1;
        total.pending += 1;
        Ok(Slot {
            gate: Arc::clone(self),
            source,
            pending: true,
        })
    }
}

impl Slot {
    /// The connection finished its first step: it no longer counts as waiting.
    fn handshaken(&mut self) {
        if std::mem::take(&mut self.pending) {
            let mut guard = self.gate.counts();
            let (total, by_source) = &mut *guard;
            total.pending -= 1;
            if let Some(c) = by_source.get_mut(&self.source) {
                c.pending -= 1;
            }
        }
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.handshaken();
        let mut guard = self.gate.counts();
        let (total, by_source) = &mut *guard;
        total.open -= 1;
        if let Some(c) = by_source.get_mut(&self.source) {
            c.open -= 1;
            if c.open == 0 {
                by_source.remove(&self.source);
            }
        }
    }
}

/// A served connection, counted in its listener's limits until it closes.
pub struct Counted<IO> {
    io: IO,
    _slot: Slot,
}

impl<IO: AsyncRead + Unpin> AsyncRead for Counted<IO> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for Counted<IO> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
}

impl<IO: Connected> Connected for Counted<IO> {
    type ConnectInfo = IO::ConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.io.connect_info()
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

    /// The TLS connections of `tcp` (see [`accept_each`]). Stops accepting when the returned stream is
    /// dropped.
    pub fn accept(
        self: &Arc<Self>,
        tcp: TcpIncoming,
    ) -> ReceiverStream<std::io::Result<Counted<TlsStream<TcpStream>>>> {
        let this = Arc::clone(self);
        accept_each(
            tcp,
            ConnectionLimits::default(),
            "TLS handshake",
            move |stream| {
                let acceptor = TlsAcceptor::from(Arc::clone(
                    &this
                        .current
                        .read()
                        .unwrap_or_else(std::sync::PoisonError::into_inner),
                ));
                async move { acceptor.accept(stream).await }
            },
        )
    }
}

/// The plain-text connections of `tcp`, each passed on once its first bytes arrive (see
/// [`accept_each`]): a client that connects and stays silent is closed after [`HANDSHAKE_TIMEOUT`].
pub fn accept_plain(tcp: TcpIncoming) -> ReceiverStream<std::io::Result<Counted<TcpStream>>> {
    accept_plain_with(tcp, ConnectionLimits::default())
}

/// [`accept_plain`] with other limits.
pub fn accept_plain_with(
    tcp: TcpIncoming,
    limits: ConnectionLimits,
) -> ReceiverStream<std::io::Result<Counted<TcpStream>>> {
    accept_each(tcp, limits, "first bytes", |stream| async move {
        // `readable` may wake without data; a peek waits for a byte (or the end of the stream).
        if stream.peek(&mut [0u8; 1]).await? == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        Ok(stream)
    })
}

/// Accepts `tcp`'s connections and prepares each on its own task (a slow one delays no other): within
/// `limits` (more are closed at once: in all, and per source address, so that one address cannot take
/// every slot) and each within [`HANDSHAKE_TIMEOUT`] (else closed), so a slow or silent client holds no
/// accept slot and no server task. A failed accept (out of file descriptors) pauses the loop, doubling
/// up to [`MAX_ACCEPT_BACKOFF`].
fn accept_each<IO, F, Fut>(
    mut tcp: TcpIncoming,
    limits: ConnectionLimits,
    what: &'static str,
    prepare: F,
) -> ReceiverStream<std::io::Result<Counted<IO>>>
where
    IO: Send + 'static,
    F: Fn(TcpStream) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = std::io::Result<IO>> + Send + 'static,
{
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    let gate = Arc::new(Gate {
        limits,
        counts: std::sync::Mutex::default(),
    });
    tokio::spawn(async move {
        let mut backoff = Duration::ZERO;
        loop {
            let next = tokio::select! {
                next = tcp.next() => next,
                () = tx.closed() => return,
            };
            let stream = match next {
                Some(Ok(stream)) => {
                    backoff = Duration::ZERO;
                    stream
                }
                Some(Err(e)) => {
                    if backoff.is_zero() {
                        tracing::warn!(error = %e, "accept failed; pausing the listener (doubling up to 1 s while it fails)");
                    }
                    backoff = (backoff * 2).clamp(Duration::from_millis(5), MAX_ACCEPT_BACKOFF);
                    tokio::select! {
                        () = tokio::time::sleep(backoff) => {}
                        () = tx.closed() => return,
                    }
                    continue;
                }
                None => return,
            };
            let Ok(peer) = stream.peer_addr() else {
                continue;
            };
            let mut slot = match gate.admit(peer.ip()) {
                Ok(slot) => slot,
                Err(why) => {
                    tracing::warn!(%peer, what, "{why}; connection closed");
                    continue;
                }
            };
            let prepared = prepare(stream);
            let tx = tx.clone();
            tokio::spawn(async move {
                match tokio::time::timeout(HANDSHAKE_TIMEOUT, prepared).await {
                    Ok(Ok(io)) => {
                        slot.handshaken();
                        let _ = tx.send(Ok(Counted { io, _slot: slot })).await;
                    }
                    Ok(Err(e)) => tracing::debug!(%peer, what, error = %e, "connection refused"),
                    Err(_) => tracing::debug!(%peer, what, "timed out; connection closed"),
                }
            });
        }
    });
    ReceiverStream::new(rx)
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

    #[tokio::test]
    async fn silent_connections_from_one_address_leave_slots_for_the_others() {
        use tokio::io::AsyncWriteExt as _;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let limits = ConnectionLimits {
            handshakes: 8,
            handshakes_per_source: 4,
            connections: 100,
            connections_per_source: 50,
        };
        let mut accepted = accept_plain_with(TcpIncoming::from(listener), limits);
        // Twenty silent connections from one address: without a share per address they took all 8
        // slots, and the restarted peer below was closed at once.
        let mut silent = Vec::new();
        for _ in 0..20 {
            let socket = tokio::net::TcpSocket::new_v4().unwrap();
            socket.bind("127.0.0.2:0".parse().unwrap()).unwrap();
            silent.push(socket.connect(addr).await.unwrap());
        }
        let mut peer = TcpStream::connect(addr).await.unwrap();
        peer.write_all(b"x").await.unwrap();
        let got = tokio::time::timeout(Duration::from_secs(5), accepted.next())
            .await
            .expect("the peer from another address got a slot")
            .unwrap()
            .unwrap();
        assert_eq!(
            got.io.peer_addr().unwrap(),
            peer.local_addr().unwrap(),
            "the peer that spoke, not a silent one"
        );
        let counts = got._slot.gate.counts();
        assert_eq!(
            counts.0.open,
            1 + 4,
            "the peer and the silent share of 4; the rest closed"
        );
    }
}
