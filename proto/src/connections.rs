//! The connections a gRPC server holds, and what it lets a client hold through them (feature `auth`).
//!
//! - At accept ([`Connections::accept_plain`], [`crate::security::ServerTls::accept`]): caps on
//!   connections waiting for their first step and on open ones, in all and per source address, a
//!   reserve of open connections for members (a Raft port with mutual TLS), a deadline on the first
//!   step, and a pause after a failed accept.
//! - While open: a connection with no call in progress for [`ConnectionLimits::idle`] is closed
//!   (HTTP/2 pings and their answers do not count as use; a stream in progress, such as a watch, does).
//!   The [`Connections::layer`] on the server counts each connection's calls.
//! - Answers: an [`AnswerBudget`] bounds the bytes of answers that wait for their client to read them,
//!   per connection and in all. A handler takes an [`AnswerHold`] for a large answer before building it
//!   and puts it in the response's extensions; the layer cuts the answer into [`CHUNK`]s, which hyper
//!   takes one by one as the client's flow-control window opens, and keeps the hold until the last one
//!   is taken. A client that never reads holds at most its share; other clients' answers wait for room
//!   (or fail with `RESOURCE_EXHAUSTED` at their wait's end) and memory stays bounded.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll, ready};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body::{Frame, SizeHint};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_stream::StreamExt as _;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::server::{Connected, TcpConnectInfo, TcpIncoming, TlsConnectInfo};

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
/// Of which, on a listener that identifies members (mutual TLS with member certificates), only members
/// may take the last ones: a flood of other certified callers leaves room for restarted peers.
pub const MEMBER_RESERVE: usize = 64;
/// Longest a new connection may take to finish its TLS handshake (or, in plain text, to send its first
/// bytes) before it is closed: a slow or silent client holds nothing longer.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest pause after a failed accept (EMFILE, ENFILE, ENOBUFS): the pauses double from 5 ms, so a
/// listener out of file descriptors does not spin.
const MAX_ACCEPT_BACKOFF: Duration = Duration::from_secs(1);
/// The largest piece of an answer handed to HTTP/2 at once: hyper asks for the next piece only when the
/// client's window has room, so an unread stream keeps at most about two pieces outside its hold.
pub const CHUNK: usize = 16 * 1024;

/// How many connections a listener takes, in all and per source address (see the constants above), and
/// how long one may stay without a call.
#[derive(Debug, Clone, Copy)]
pub struct ConnectionLimits {
    pub handshakes: usize,
    pub handshakes_per_source: usize,
    pub connections: usize,
    pub connections_per_source: usize,
    /// Open connections only members may take (see [`MEMBER_RESERVE`]); ignored where callers are
    /// not identified.
    pub member_reserve: usize,
    /// A connection with no call in progress for this long is closed; `None`: never.
    pub idle: Option<Duration>,
}

impl Default for ConnectionLimits {
    fn default() -> Self {
        ConnectionLimits {
            handshakes: MAX_HANDSHAKES,
            handshakes_per_source: MAX_HANDSHAKES_PER_SOURCE,
            connections: MAX_CONNECTIONS,
            connections_per_source: MAX_CONNECTIONS_PER_SOURCE,
            member_reserve: MEMBER_RESERVE,
            idle: None,
        }
    }
}

#[derive(Default)]
struct Counts {
    pending: usize,
    open: usize,
}

#[derive(Default)]
struct Held {
    total: Counts,
    /// Established connections not known to be members'.
    guests: usize,
    by_source: HashMap<IpAddr, Counts>,
}

/// One listener's connections: what they hold, and each one's calls (for the idle close).
pub struct Connections {
    limits: ConnectionLimits,
    held: Mutex<Held>,
    calls: Mutex<HashMap<SocketAddr, Arc<Calls>>>,
}

/// A connection's calls in progress, and since when it has had none.
struct Calls {
    now: AtomicUsize,
    /// Milliseconds from `born` to the moment the last call ended.
    idle_since_ms: AtomicU64,
    born: Instant,
}

impl Calls {
    fn idle_since(&self) -> Instant {
        self.born + Duration::from_millis(self.idle_since_ms.load(Ordering::Acquire))
    }
}

/// A call in progress on a connection: counted until dropped (with the answer's body).
struct CallGuard(Arc<Calls>);

impl Drop for CallGuard {
    fn drop(&mut self) {
        let ms = u64::try_from(self.0.born.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.0.idle_since_ms.store(ms, Ordering::Release);
        self.0.now.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A connection's place in its listener's [`Connections`]: waiting for its first step until
/// `handshaken`, open until dropped.
struct Slot {
    owner: Arc<Connections>,
    source: IpAddr,
    peer: SocketAddr,
    pending: bool,
    guest: bool,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Connections {
    /// A listener's bookkeeping with these limits.
    pub fn new(limits: ConnectionLimits) -> Arc<Connections> {
        Arc::new(Connections {
            limits,
            held: Mutex::default(),
            calls: Mutex::default(),
        })
    }

    /// The layer that counts each connection's calls and meters large answers: on the server that
    /// serves this listener's connections, outermost.
    pub fn layer(self: &Arc<Self>) -> ConnectionLayer {
        ConnectionLayer(Arc::clone(self))
    }

    /// A slot for a new connection from `peer`, or why there is none.
    fn admit(self: &Arc<Self>, peer: SocketAddr) -> Result<Slot, &'static str> {
        let l = self.limits;
        let source = peer.ip();
        let mut guard = lock(&self.held);
        let held = &mut *guard;
        let mine = held.by_source.entry(source).or_default();
        let refusal = if held.total.open >= l.connections {
            Some("too many connections")
        } else if mine.open >= l.connections_per_source {
            Some("too many connections from one address")
        } else if held.total.pending >= l.handshakes {
            Some("too many connections waiting for their first step")
        } else if mine.pending >= l.handshakes_per_source {
            Some("too many connections from one address waiting for their first step")
        } else {
            None
        };
        if let Some(why) = refusal {
            if mine.open == 0 {
                held.by_source.remove(&source);
            }
            return Err(why);
        }
        mine.open += 1;
        mine.pending += 1;
        held.total.open += 1;
        held.total.pending += 1;
        Ok(Slot {
            owner: Arc::clone(self),
            source,
            peer,
            pending: true,
            guest: false,
        })
    }
}

impl Slot {
    /// The connection finished its first step: it no longer counts as waiting. A caller not known to
    /// be a member (`member` false where members are identified) may not take the member reserve.
    fn handshaken(&mut self, member: Option<bool>) -> Result<(), &'static str> {
        if !std::mem::take(&mut self.pending) {
            return Ok(());
        }
        let l = self.owner.limits;
        let mut guard = lock(&self.owner.held);
        let held = &mut *guard;
        held.total.pending -= 1;
        if let Some(c) = held.by_source.get_mut(&self.source) {
            c.pending -= 1;
        }
        if member == Some(false) {
            if held.guests + l.member_reserve >= l.connections {
                return Err("the remaining connections are kept for members");
            }
            held.guests += 1;
            self.guest = true;
        }
        Ok(())
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        // Counted as waiting still, when the first step never finished.
        if std::mem::take(&mut self.pending) {
            let mut held = lock(&self.owner.held);
            held.total.pending -= 1;
            if let Some(c) = held.by_source.get_mut(&self.source) {
                c.pending -= 1;
            }
        }
        lock(&self.owner.calls).remove(&self.peer);
        let mut guard = lock(&self.owner.held);
        let held = &mut *guard;
        held.total.open -= 1;
        if self.guest {
            held.guests -= 1;
        }
        if let Some(c) = held.by_source.get_mut(&self.source) {
            c.open -= 1;
            if c.open == 0 {
                held.by_source.remove(&self.source);
            }
        }
    }
}

/// A served connection, counted in its listener's limits until it closes, and closed once it has had
/// no call for the listener's idle time.
pub struct Counted<IO> {
    io: IO,
    slot: Slot,
    idle: Option<Idle>,
}

struct Idle {
    calls: Arc<Calls>,
    after: Duration,
    timer: Pin<Box<tokio::time::Sleep>>,
}

impl<IO> Counted<IO> {
    /// The wrapped connection.
    pub fn get_ref(&self) -> &IO {
        &self.io
    }
}

impl<IO: AsyncRead + Unpin> AsyncRead for Counted<IO> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = &mut *self;
        if let Poll::Ready(r) = Pin::new(&mut this.io).poll_read(cx, buf) {
            return Poll::Ready(r);
        }
        // Nothing to read: hyper waits here, so the idle timer is checked here too. The timer is moved
        // only when it fires (a busy connection moves it once per idle time, not once per read).
        if let Some(idle) = &mut this.idle {
            loop {
                if !idle.timer.is_elapsed() && idle.timer.as_mut().poll(cx).is_pending() {
                    break;
                }
                let now = Instant::now();
                let deadline = if idle.calls.now.load(Ordering::Acquire) == 0 {
                    idle.calls.idle_since() + idle.after
                } else {
                    now + idle.after
                };
                if deadline <= now {
                    tracing::debug!(peer = %this.slot.peer, "no call for {:?}; connection closed", idle.after);
                    // The end of the stream: hyper closes the connection.
                    return Poll::Ready(Ok(()));
                }
                idle.timer.as_mut().reset(deadline.into());
            }
        }
        Poll::Pending
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

impl Connections {
    /// The plain-text connections of `tcp`, each passed on once its first bytes arrive (see
    /// [`accept_each`](Self::accept_each)): a client that connects and stays silent is closed after
    /// [`HANDSHAKE_TIMEOUT`].
    pub fn accept_plain(
        self: &Arc<Self>,
        tcp: TcpIncoming,
    ) -> ReceiverStream<std::io::Result<Counted<TcpStream>>> {
        self.accept_each(tcp, "first bytes", |stream| async move {
            // `readable` may wake without data; a peek waits for a byte (or the end of the stream).
            if stream.peek(&mut [0u8; 1]).await? == 0 {
                return Err(std::io::ErrorKind::UnexpectedEof.into());
            }
            // Plain text names no one: the member reserve does not apply.
            Ok((stream, None))
        })
    }

    /// Accepts `tcp`'s connections and prepares each on its own task (a slow one delays no other):
    /// within the limits (more are closed at once: in all, and per source address, so that one
    /// address cannot take every slot) and each within [`HANDSHAKE_TIMEOUT`] (else closed), so a slow
    /// or silent client holds no accept slot and no server task. `prepare` says, where it can tell,
    /// whether the caller is a member. A failed accept (out of file descriptors) pauses the loop,
    /// doubling up to [`MAX_ACCEPT_BACKOFF`].
    pub(crate) fn accept_each<IO, F, Fut>(
        self: &Arc<Self>,
        mut tcp: TcpIncoming,
        what: &'static str,
        prepare: F,
    ) -> ReceiverStream<std::io::Result<Counted<IO>>>
    where
        IO: Send + 'static,
        F: Fn(TcpStream) -> Fut + Send + 'static,
        Fut: std::future::Future<Output = std::io::Result<(IO, Option<bool>)>> + Send + 'static,
    {
        let (tx, rx) = tokio::sync::mpsc::channel(64);
        let this = Arc::clone(self);
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
                let mut slot = match this.admit(peer) {
                    Ok(slot) => slot,
                    Err(why) => {
                        tracing::warn!(%peer, what, "{why}; connection closed");
                        continue;
                    }
                };
                let prepared = prepare(stream);
                let tx = tx.clone();
                let this = Arc::clone(&this);
                tokio::spawn(async move {
                    match tokio::time::timeout(HANDSHAKE_TIMEOUT, prepared).await {
                        Ok(Ok((io, member))) => {
                            if let Err(why) = slot.handshaken(member) {
                                tracing::warn!(%peer, what, "{why}; connection closed");
                                return;
                            }
                            let idle = this.limits.idle.map(|after| {
                                let calls = Arc::new(Calls {
                                    now: AtomicUsize::new(0),
                                    idle_since_ms: AtomicU64::new(0),
                                    born: Instant::now(),
                                });
                                lock(&this.calls).insert(peer, Arc::clone(&calls));
                                Idle {
                                    calls,
                                    after,
                                    timer: Box::pin(tokio::time::sleep(after)),
                                }
                            });
                            let _ = tx.send(Ok(Counted { io, slot, idle })).await;
                        }
                        Ok(Err(e)) => {
                            tracing::debug!(%peer, what, error = %e, "connection refused")
                        }
                        Err(_) => tracing::debug!(%peer, what, "timed out; connection closed"),
                    }
                });
            }
        });
        ReceiverStream::new(rx)
    }

    /// The calls of the connection a request came on, when it is counted.
    fn calls_of<B>(&self, req: &http::Request<B>) -> Option<Arc<Calls>> {
        let ext = req.extensions();
        let peer = ext
            .get::<TcpConnectInfo>()
            .and_then(TcpConnectInfo::remote_addr)
            .or_else(|| {
                ext.get::<TlsConnectInfo<TcpConnectInfo>>()
                    .and_then(|t| t.get_ref().remote_addr())
            })?;
        lock(&self.calls).get(&peer).cloned()
    }
}

/// See [`Connections::layer`].
#[derive(Clone)]
pub struct ConnectionLayer(Arc<Connections>);

impl<S> tower::Layer<S> for ConnectionLayer {
    type Service = ConnectionService<S>;

    fn layer(&self, inner: S) -> ConnectionService<S> {
        ConnectionService {
            inner,
            connections: Arc::clone(&self.0),
        }
    }
}

/// See [`Connections::layer`].
#[derive(Clone)]
pub struct ConnectionService<S> {
    inner: S,
    connections: Arc<Connections>,
}

type BoxFuture<T> = Pin<Box<dyn std::future::Future<Output = T> + Send>>;

impl<S, B> tower::Service<http::Request<B>> for ConnectionService<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<tonic::body::Body>>,
    S::Future: Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = S::Error;
    type Future = BoxFuture<Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let call = self.connections.calls_of(&req).map(|calls| {
            calls.now.fetch_add(1, Ordering::AcqRel);
            CallGuard(calls)
        });
        let answer = self.inner.call(req);
        Box::pin(async move {
            let mut res = answer.await?;
            let hold = res.extensions_mut().remove::<AnswerHold>();
            if call.is_none() && hold.is_none() {
                return Ok(res);
            }
            Ok(res.map(|inner| {
                tonic::body::Body::new(Metered {
                    inner,
                    rest: None,
                    _call: call,
                    hold,
                })
            }))
        })
    }
}

/// An answer's body: cut into [`CHUNK`]s, holding its connection's call and its [`AnswerHold`] until
/// the last piece is taken.
struct Metered {
    inner: tonic::body::Body,
    rest: Option<Bytes>,
    _call: Option<CallGuard>,
    hold: Option<AnswerHold>,
}

impl http_body::Body for Metered {
    type Data = Bytes;
    type Error = tonic::Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, tonic::Status>>> {
        let this = &mut *self;
        if let Some(rest) = &mut this.rest {
            let piece = rest.split_to(rest.len().min(CHUNK));
            if rest.is_empty() {
                this.rest = None;
            }
            return Poll::Ready(Some(Ok(Frame::data(piece))));
        }
        let frame = ready!(Pin::new(&mut this.inner).poll_frame(cx));
        match frame {
            Some(Ok(frame)) => match frame.into_data() {
                Ok(mut data) => {
                    if data.len() > CHUNK {
                        let piece = data.split_to(CHUNK);
                        this.rest = Some(data);
                        return Poll::Ready(Some(Ok(Frame::data(piece))));
                    }
                    Poll::Ready(Some(Ok(Frame::data(data))))
                }
                Err(other) => {
                    // Trailers: every byte of the answer has been taken.
                    this.hold = None;
                    Poll::Ready(Some(Ok(other)))
                }
            },
            None => {
                this.hold = None;
                Poll::Ready(None)
            }
            Some(Err(e)) => Poll::Ready(Some(Err(e))),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.rest.is_none() && self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        match &self.rest {
            None => self.inner.size_hint(),
            Some(rest) => {
                let inner = self.inner.size_hint();
                let mut hint = SizeHint::new();
                hint.set_lower(inner.lower() + rest.len() as u64);
                if let Some(upper) = inner.upper() {
                    hint.set_upper(upper + rest.len() as u64);
                }
                hint
            }
        }
    }
}

/// Bytes of answers waiting for their clients to read them: at most `per_connection` for one
/// connection and `total` for all (each answer of at least [`CHUNK`] bytes takes an [`AnswerHold`]).
pub struct AnswerBudget {
    per_connection: usize,
    total: usize,
    used: Mutex<Used>,
    freed: tokio::sync::Notify,
}

#[derive(Default)]
struct Used {
    total: usize,
    by_connection: HashMap<(Option<SocketAddr>, Option<SocketAddr>), usize>,
}

/// Why an answer found no room before its wait ended.
#[derive(Debug, thiserror::Error)]
#[error(
    "answers not yet read by their clients hold {held} bytes of this connection's budget of \
     {per_connection} and {held_total} bytes of the node's {total}: read the answers already asked \
     for (or ask for smaller ones) before asking for more"
)]
pub struct NoRoom {
    pub held: usize,
    pub per_connection: usize,
    pub held_total: usize,
    pub total: usize,
}

/// A share of an [`AnswerBudget`], given back when dropped. Put in a `tonic::Response`'s extensions,
/// it stays held until the client has taken the answer (see [`Connections::layer`]).
#[derive(Clone)]
pub struct AnswerHold(Arc<HoldInner>);

struct HoldInner {
    budget: Arc<AnswerBudget>,
    connection: (Option<SocketAddr>, Option<SocketAddr>),
    bytes: AtomicUsize,
}

impl Drop for HoldInner {
    fn drop(&mut self) {
        self.budget
            .give_back(self.connection, *self.bytes.get_mut());
    }
}

impl AnswerBudget {
    /// A budget of `per_connection` bytes per connection and `total` in all (`per_connection` at
    /// most `total`, both at least [`CHUNK`]).
    pub fn new(per_connection: usize, total: usize) -> Arc<AnswerBudget> {
        let total = total.max(CHUNK);
        Arc::new(AnswerBudget {
            per_connection: per_connection.clamp(CHUNK, total),
            total,
            used: Mutex::default(),
            freed: tokio::sync::Notify::new(),
        })
    }

    /// Bytes held now, in all.
    pub fn held(&self) -> usize {
        lock(&self.used).total
    }

    /// Up to `want` bytes (at least `min`, at most the per-connection budget) for an answer on the
    /// connection `(local, remote)`, waiting at most `wait` for room.
    ///
    /// # Errors
    /// [`NoRoom`] when the wait ends first.
    pub async fn hold(
        self: &Arc<Self>,
        connection: (Option<SocketAddr>, Option<SocketAddr>),
        min: usize,
        want: usize,
        wait: Duration,
    ) -> Result<AnswerHold, NoRoom> {
        let min = min.min(self.per_connection);
        let want = want.clamp(min, self.per_connection);
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let freed = self.freed.notified();
            tokio::pin!(freed);
            freed.as_mut().enable();
            match self.try_take(connection, min, want) {
                Ok(bytes) => return Ok(self.held_as(connection, bytes)),
                Err(no_room) => {
                    if tokio::time::timeout_at(deadline, freed).await.is_err() {
                        return Err(no_room);
                    }
                }
            }
        }
    }

    /// Exactly `bytes` for an answer on `connection` when there is room now.
    pub fn try_hold(
        self: &Arc<Self>,
        connection: (Option<SocketAddr>, Option<SocketAddr>),
        bytes: usize,
    ) -> Option<AnswerHold> {
        let bytes = bytes.min(self.per_connection);
        self.try_take(connection, bytes, bytes)
            .ok()
            .map(|bytes| self.held_as(connection, bytes))
    }

    fn held_as(
        self: &Arc<Self>,
        connection: (Option<SocketAddr>, Option<SocketAddr>),
        bytes: usize,
    ) -> AnswerHold {
        AnswerHold(Arc::new(HoldInner {
            budget: Arc::clone(self),
            connection,
            bytes: AtomicUsize::new(bytes),
        }))
    }

    fn try_take(
        &self,
        connection: (Option<SocketAddr>, Option<SocketAddr>),
        min: usize,
        want: usize,
    ) -> Result<usize, NoRoom> {
        let mut used = lock(&self.used);
        let mine = used.by_connection.get(&connection).copied().unwrap_or(0);
        let room = (self.per_connection - mine.min(self.per_connection))
            .min(self.total - used.total.min(self.total));
        if room < min {
            return Err(NoRoom {
                held: mine,
                per_connection: self.per_connection,
                held_total: used.total,
                total: self.total,
            });
        }
        let bytes = want.min(room);
        used.total += bytes;
        *used.by_connection.entry(connection).or_default() += bytes;
        Ok(bytes)
    }

    fn give_back(&self, connection: (Option<SocketAddr>, Option<SocketAddr>), bytes: usize) {
        {
            let mut used = lock(&self.used);
            used.total -= bytes;
            if let Some(mine) = used.by_connection.get_mut(&connection) {
                *mine -= bytes;
                if *mine == 0 {
                    used.by_connection.remove(&connection);
                }
            }
        }
        self.freed.notify_waiters();
    }
}

impl AnswerHold {
    /// Bytes held.
    pub fn bytes(&self) -> usize {
        self.0.bytes.load(Ordering::Acquire)
    }

    /// Holds `bytes` from now on: the answer's real size once built (more than taken when its
    /// smallest piece was larger; that much over the budget is allowed, it is already in memory).
    pub fn resize(&self, bytes: usize) {
        let before = self.0.bytes.swap(bytes, Ordering::AcqRel);
        let budget = &self.0.budget;
        if bytes < before {
            budget.give_back(self.0.connection, before - bytes);
        } else if bytes > before {
            let mut used = lock(&budget.used);
            used.total += bytes - before;
            *used.by_connection.entry(self.0.connection).or_default() += bytes - before;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> ConnectionLimits {
        ConnectionLimits {
            handshakes: 8,
            handshakes_per_source: 4,
            connections: 100,
            connections_per_source: 50,
            member_reserve: 2,
            idle: None,
        }
    }

    #[tokio::test]
    async fn silent_connections_from_one_address_leave_slots_for_the_others() {
        use tokio::io::AsyncWriteExt as _;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let mut accepted = Connections::new(limits()).accept_plain(TcpIncoming::from(listener));
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
        let held = lock(&got.slot.owner.held);
        assert_eq!(
            held.total.open,
            1 + 4,
            "the peer and the silent share of 4; the rest closed"
        );
    }

    #[tokio::test]
    async fn a_connection_without_calls_is_closed_after_its_idle_time() {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let conns = Connections::new(ConnectionLimits {
            idle: Some(Duration::from_millis(200)),
            ..limits()
        });
        let mut accepted = conns.accept_plain(TcpIncoming::from(listener));
        async fn open(
            addr: SocketAddr,
            accepted: &mut ReceiverStream<std::io::Result<Counted<TcpStream>>>,
            n: u8,
        ) -> (TcpStream, Counted<TcpStream>) {
            let mut client = TcpStream::connect(addr).await.unwrap();
            client.write_all(&[n]).await.unwrap();
            let mut served = accepted.next().await.unwrap().unwrap();
            let mut first = [0u8; 1];
            served.read_exact(&mut first).await.unwrap();
            (client, served)
        }
        // A connection with a call in progress stays open past its idle time...
        let (_busy_client, mut busy) = open(addr, &mut accepted, 1).await;
        let calls = Arc::clone(&busy.idle.as_ref().unwrap().calls);
        calls.now.fetch_add(1, Ordering::AcqRel);
        let call = CallGuard(calls);
        let started = Instant::now();
        // ...while one without calls reads the end of its stream (and hyper would close it).
        let (_idle_client, mut idle) = open(addr, &mut accepted, 2).await;
        let n = tokio::time::timeout(Duration::from_secs(5), idle.read(&mut [0u8; 8]))
            .await
            .expect("an idle connection is closed")
            .unwrap();
        assert_eq!(n, 0, "the end of the stream");
        assert!(started.elapsed() >= Duration::from_millis(200));
        let still =
            tokio::time::timeout(Duration::from_millis(400), busy.read(&mut [0u8; 8])).await;
        assert!(
            still.is_err(),
            "a connection with a call in progress stays open: {still:?}"
        );
        // Its idle time starts when its last call ends.
        let ended = Instant::now();
        drop(call);
        let n = tokio::time::timeout(Duration::from_secs(5), busy.read(&mut [0u8; 8]))
            .await
            .expect("closed once idle")
            .unwrap();
        assert_eq!(n, 0);
        assert!(ended.elapsed() >= Duration::from_millis(190));
        drop((busy, idle));
        assert!(
            lock(&conns.calls).is_empty(),
            "closed connections leave no calls behind"
        );
    }

    #[test]
    fn the_member_reserve_is_kept_for_members() {
        let conns = Connections::new(ConnectionLimits {
            connections: 4,
            ..limits()
        });
        let peer = |port| SocketAddr::from(([127, 0, 0, 1], port));
        let mut guests = Vec::new();
        for port in 1..=2 {
            let mut slot = conns.admit(peer(port)).unwrap();
            slot.handshaken(Some(false)).unwrap();
            guests.push(slot);
        }
        // Without the reserve the third guest took a slot, and the fourth connection (a member's)
        // was the last one.
        let mut third = conns.admit(peer(3)).unwrap();
        assert_eq!(
            third.handshaken(Some(false)),
            Err("the remaining connections are kept for members")
        );
        drop(third);
        let mut member = conns.admit(peer(4)).unwrap();
        member.handshaken(Some(true)).unwrap();
        let mut unnamed = conns.admit(peer(5)).unwrap();
        unnamed.handshaken(None).unwrap();
        assert!(conns.admit(peer(6)).is_err(), "four open: the cap");
        drop(guests);
        drop(member);
        drop(unnamed);
        let held = lock(&conns.held);
        assert_eq!(
            (held.total.open, held.total.pending, held.guests),
            (0, 0, 0)
        );
        assert!(held.by_source.is_empty());
    }

    #[tokio::test]
    async fn an_answer_budget_makes_answers_wait_for_room() {
        let budget = AnswerBudget::new(64 * 1024, 96 * 1024);
        let a = (None, Some(SocketAddr::from(([127, 0, 0, 1], 1))));
        let b = (None, Some(SocketAddr::from(([127, 0, 0, 1], 2))));
        let wait = Duration::from_millis(50);
        let first = budget.hold(a, CHUNK, 48 * 1024, wait).await.unwrap();
        assert_eq!(first.bytes(), 48 * 1024);
        // The connection has 16 KiB left: a smaller answer than asked for.
        let second = budget.hold(a, CHUNK, 48 * 1024, wait).await.unwrap();
        assert_eq!(second.bytes(), 16 * 1024);
        let e = budget
            .hold(a, CHUNK, CHUNK, wait)
            .await
            .err()
            .expect("no room");
        assert_eq!((e.held, e.per_connection), (64 * 1024, 64 * 1024));
        // Another connection has room, up to the total.
        let third = budget.hold(b, CHUNK, 64 * 1024, wait).await.unwrap();
        assert_eq!(third.bytes(), 32 * 1024);
        assert!(budget.hold(b, CHUNK, CHUNK, wait).await.is_err());
        // A waiter gets room when a hold is given back.
        let waiter = {
            let budget = Arc::clone(&budget);
            tokio::spawn(async move { budget.hold(b, CHUNK, CHUNK, Duration::from_secs(30)).await })
        };
        tokio::task::yield_now().await;
        second.resize(0);
        let got = tokio::time::timeout(Duration::from_secs(5), waiter)
            .await
            .expect("woken by the give-back")
            .unwrap()
            .unwrap();
        assert_eq!(got.bytes(), CHUNK);
        drop((first, second, third, got));
        assert_eq!(budget.held(), 0);
    }
}
