//! `KvService.Watch`: streams of watches over the change feed and the kept history.
//!
//! One task serves one stream and every watch on it. Each watch has the next revision it owes its
//! client (`next`). The task follows the driver's change feed (`state_machine::Published`: every run of
//! applied entries, in order, once in storage): a watch that has been sent everything before a run is
//! *synced* and takes the run's events straight from the feed; any other watch (one that starts in the
//! past, or missed runs because the stream's client read slowly and the feed moved on, or a run too large
//! for the feed) is *catching up*: it reads the kept history from `next` in pages (through the storage
//! stage, like any read) until it reaches the feed again. So:
//! - events go out in revision order, each once, none skipped: `next` only grows, and every run is
//!   either taken from the feed by a watch that had everything before it, or read from the history,
//!   which holds every change once it is in storage;
//! - nothing is sent before it is applied, hence committed;
//! - the events of one write go out in one answer (with as many other whole writes as fit in
//!   [`ANSWER_BYTES`]);
//! - memory is bounded: every answer queued for the client holds its size of the connection's share of
//!   the node's answer budget (`[connections] answer_buffer_*`, the budget large Get and Scan answers
//!   take too) until the client takes it; when there is no room the task waits, the feed moves on
//!   without it and its watches catch up from storage later. Beyond that: one history page;
//! - a watch whose `next` falls below the kept history (asked for, or compacted while it caught up) is
//!   canceled with `compact_revision` set to the oldest revision kept, never silently skipped ahead.
//!
//! Followers serve watches from their own applied state: late, never wrong.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use kiwi_proto::v1::{
    KeyEvent, WatchCreateRequest, WatchRequest, WatchResponse, key_event::EventType,
    watch_create_request::FilterType, watch_request,
};
use prost::Message as _;
use tokio::sync::{broadcast, mpsc};
use tokio_stream::StreamExt as _;
use tonic::Status;

use super::*;
use crate::raft::mvcc;
use crate::raft::state_machine::{Change, Published, etcd_range};

/// Most watches on one stream.
pub const MAX_WATCHES_PER_STREAM: usize = 1_000;
/// Most watch streams one node serves at once.
pub const MAX_WATCH_STREAMS: usize = 10_000;
/// Answers queued for a stream's client (their bytes are bounded by the answer budget).
const QUEUED_ANSWERS: usize = 16;
/// How long an answer waits for room in the answer budget before it looks again (the stream ends
/// meanwhile when its client goes).
const ROOM_WAIT: Duration = Duration::from_secs(60);

/// An answer with its share of the answer budget, given back once the client has taken it.
pub(super) type Queued = (
    Result<WatchResponse, Status>,
    kiwi_proto::connections::AnswerHold,
);
/// Most bytes of events in one answer, unless one write alone is larger: writes are never split, and
/// an answer carries as many whole writes as fit (etcd batches likewise).
const ANSWER_BYTES: usize = 128 * 1024;
/// Key and value bytes of events one history page reads (at least one whole write).
const PAGE_BYTES: usize = 1024 * 1024;
/// Events one history page reads (at least one whole write).
const PAGE_EVENTS: usize = 1_000;
/// How often a watch with `progress_notify` hears the revision when nothing changed.
pub const PROGRESS_INTERVAL: Duration = Duration::from_secs(10);

/// One watch of a stream.
#[derive(Clone)]
struct Watch {
    id: i64,
    start: Vec<u8>,
    /// Exclusive; empty: no bound.
    end: Vec<u8>,
    prev_kv: bool,
    no_put: bool,
    no_delete: bool,
    progress_notify: bool,
    /// The next revision this watch owes its client.
    next: u64,
    /// The priority class of its reads of the history (from its create request's header).
    class: Class,
}

impl Watch {
    fn matches(&self, e: &KeyEvent) -> bool {
        let Some(kv) = &e.kv else { return false };
        let put = e.r#type == EventType::Put as i32;
        if (put && self.no_put) || (!put && self.no_delete) {
            return false;
        }
        kv.key >= self.start && (self.end.is_empty() || kv.key < self.end)
    }

    /// The events of `changes` this watch sends, from `next` on.
    fn select(&self, changes: &[Change]) -> Vec<KeyEvent> {
        changes
            .iter()
            .filter(|c| c.revision >= self.next)
            .flat_map(|c| &c.events)
            .filter(|e| self.matches(e))
            .map(|e| {
                let mut e = e.clone();
                if !self.prev_kv {
                    e.prev_kv = None;
                }
                e
            })
            .collect()
    }
}

/// A stream's task state.
struct Stream {
    server: Arc<KvServer>,
    tagged: Tagged,
    out: mpsc::Sender<Queued>,
    /// The connection the stream came on, whose share of the answer budget its answers take.
    connection: Connection,
    watches: HashMap<i64, Watch>,
    next_id: i64,
    /// Whether the caller may use PRIORITY_CRITICAL (see `may_use_critical`).
    may_critical: bool,
    /// The last index the feed (or the applied index at the start) said is applied.
    applied: u64,
    /// A progress request is waiting for every watch to catch up.
    progress_asked: bool,
}

/// The requests of a watch stream: a gRPC stream of Kiwi's own, or the etcd front end's translation.
pub(super) trait RequestStream:
    tokio_stream::Stream<Item = Result<WatchRequest, Status>> + Send + Unpin + 'static
{
}

impl<T> RequestStream for T where
    T: tokio_stream::Stream<Item = Result<WatchRequest, Status>> + Send + Unpin + 'static
{
}

/// Releases a stream's place in the node's count.
struct StreamSlot(Arc<KvServer>);

impl Drop for StreamSlot {
    fn drop(&mut self) {
        self.0.watch_streams.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Starts serving one Watch stream; returns the stream of answers.
pub(super) fn serve(
    server: Arc<KvServer>,
    tagged: Tagged,
    connection: Connection,
    may_critical: bool,
    requests: impl RequestStream,
) -> Result<mpsc::Receiver<Queued>, KvError> {
    if server.watch_streams.fetch_add(1, Ordering::SeqCst) >= MAX_WATCH_STREAMS {
        server.watch_streams.fetch_sub(1, Ordering::SeqCst);
        return Err(KvError::TooMany(format!(
            "this node serves {MAX_WATCH_STREAMS} watch streams already; retry later or on another node"
        )));
    }
    let slot = StreamSlot(Arc::clone(&server));
    // Subscribe before reading the applied index: no run after it is missed.
    let feed = server.driver.subscribe_changes();
    let applied = server.driver.status().applied;
    let (out, rx) = mpsc::channel(QUEUED_ANSWERS);
    let stream = Stream {
        server,
        tagged,
        out,
        connection,
        watches: HashMap::new(),
        next_id: 1,
        may_critical,
        applied,
        progress_asked: false,
    };
    tokio::spawn(async move {
        let _slot = slot;
        stream.run(requests, feed).await;
    });
    Ok(rx)
}

impl Stream {
    async fn run(
        mut self,
        mut requests: impl RequestStream,
        mut feed: broadcast::Receiver<Arc<Published>>,
    ) {
        let mut progress = tokio::time::interval(PROGRESS_INTERVAL);
        progress.tick().await;
        let mut feed_open = true;
        loop {
            // Catch up every watch that is behind before taking more from the feed.
            if let Err(()) = self.catch_up().await {
                return;
            }
            tokio::select! {
                request = requests.next() => match request.transpose() {
                    Ok(Some(r)) => {
                        if self.handle(r).await.is_err() {
                            return;
                        }
                    }
                    // The client closed its side or the connection broke.
                    Ok(None) | Err(_) => return,
                },
                published = feed.recv(), if feed_open => match published {
                    Ok(p) => {
                        if self.take(&p).await.is_err() {
                            return;
                        }
                    }
                    // Runs were dropped before this stream read them: every watch catches up from
                    // the history (it holds them), up to the newest applied index.
                    Err(broadcast::error::RecvError::Lagged(_)) => {
                        self.applied = self.applied.max(self.server.driver.status().applied);
                    }
                    Err(broadcast::error::RecvError::Closed) => feed_open = false,
                },
                _ = progress.tick() => {
                    if self.notify_progress().await.is_err() {
                        return;
                    }
                }
                () = self.out.closed() => return,
            }
        }
    }

    async fn send(&self, answer: WatchResponse) -> Result<(), ()> {
        let size = answer.encoded_len().max(1);
        let hold = loop {
            tokio::select! {
                hold = self.server.answers.hold(self.connection, size, size, ROOM_WAIT) => {
                    if let Ok(hold) = hold {
                        break hold;
                    }
                }
                () = self.out.closed() => return Err(()),
            }
        };
        self.out.send((Ok(answer), hold)).await.map_err(|_| ())
    }

    fn header(&self, revision: u64) -> Option<kiwi_proto::v1::ResponseHeader> {
        self.server.header(&self.tagged, revision)
    }

    async fn handle(&mut self, request: WatchRequest) -> Result<(), ()> {
        match request.request_union {
            Some(watch_request::RequestUnion::CreateRequest(c)) => self.create(c).await,
            Some(watch_request::RequestUnion::CancelRequest(c)) => {
                let found = self.watches.remove(&c.watch_id).is_some();
                self.send(WatchResponse {
                    header: self.header(self.applied),
                    watch_id: c.watch_id,
                    canceled: true,
                    cancel_reason: if found {
                        String::new()
                    } else {
                        format!("no watch {} on this stream", c.watch_id)
                    },
                    ..WatchResponse::default()
                })
                .await
            }
            Some(watch_request::RequestUnion::ProgressRequest(_)) => {
                self.progress_asked = true;
                Ok(())
            }
            None => Ok(()),
        }
    }

    async fn create(&mut self, c: WatchCreateRequest) -> Result<(), ()> {
        let refuse = |id: i64, why: String| WatchResponse {
            watch_id: id,
            created: true,
            canceled: true,
            cancel_reason: why,
            ..WatchResponse::default()
        };
        if self.watches.len() >= MAX_WATCHES_PER_STREAM {
            let answer = refuse(
                -1,
                format!("a stream holds at most {MAX_WATCHES_PER_STREAM} watches"),
            );
            return self.send(answer).await;
        }
        let class = match self.server.tag(c.header.as_ref(), self.may_critical) {
            Ok(t) => t.class,
            Err(e) => return self.send(refuse(-1, e.to_string())).await,
        };
        if c.key.is_empty() {
            return self
                .send(refuse(-1, "the watch's key is empty".into()))
                .await;
        }
        let id = if c.watch_id > 0 {
            c.watch_id
        } else {
            while self.watches.contains_key(&self.next_id) {
                self.next_id += 1;
            }
            self.next_id
        };
        if self.watches.contains_key(&id) {
            return self
                .send(refuse(
                    id,
                    format!("watch id {id} is in use on this stream"),
                ))
                .await;
        }
        let (start, end) = etcd_range(&c.key, &c.range_end);
        let current = self.applied.max(self.server.driver.status().applied);
        let next = if c.start_revision == 0 {
            current + 1
        } else {
            c.start_revision
        };
        let watch = Watch {
            id,
            start,
            end,
            prev_kv: c.prev_kv,
            no_put: c.filters.contains(&(FilterType::Noput as i32)),
            no_delete: c.filters.contains(&(FilterType::Nodelete as i32)),
            progress_notify: c.progress_notify,
            next,
            class,
        };
        self.send(WatchResponse {
            header: self.header(current),
            watch_id: id,
            created: true,
            ..WatchResponse::default()
        })
        .await?;
        self.watches.insert(id, watch);
        Ok(())
    }

    /// Takes a run from the feed: watches that had everything before it send its events.
    async fn take(&mut self, p: &Published) -> Result<(), ()> {
        let mut answers = Vec::new();
        if let Some(changes) = &p.changes {
            for w in self.watches.values_mut() {
                // Behind (owes revisions before the run) or already past it: not from the feed.
                if w.next < p.from || w.next > p.to {
                    continue;
                }
                let events = w.select(changes);
                w.next = p.to + 1;
                if !events.is_empty() {
                    answers.push((w.id, events));
                }
            }
        }
        self.applied = self.applied.max(p.to);
        for (id, events) in answers {
            self.send_events(id, events).await?;
        }
        Ok(())
    }

    /// Sends `events` (whole writes, in order) in answers of whole writes, each up to [`ANSWER_BYTES`]
    /// (one write larger than that goes alone).
    async fn send_events(&self, id: i64, events: Vec<KeyEvent>) -> Result<(), ()> {
        let rev = |e: &KeyEvent| e.kv.as_ref().map_or(0, |kv| kv.mod_revision);
        let mut batch: Vec<KeyEvent> = Vec::new();
        // Bytes of the batch up to its last whole write, and where that write starts.
        let (mut whole, mut bytes, mut write_start) = (0usize, 0usize, 0usize);
        for e in events {
            if batch.last().is_some_and(|l| rev(l) != rev(&e)) {
                whole = bytes;
                write_start = batch.len();
            }
            bytes += e.encoded_len() + 4;
            batch.push(e);
            if bytes > ANSWER_BYTES && whole > 0 {
                // Send the whole writes before the current one; it starts the next answer.
                let rest = batch.split_off(write_start);
                self.send_batch(id, std::mem::replace(&mut batch, rest))
                    .await?;
                bytes -= whole;
                (whole, write_start) = (0, 0);
            }
        }
        self.send_batch(id, batch).await
    }

    async fn send_batch(&self, id: i64, events: Vec<KeyEvent>) -> Result<(), ()> {
        let Some(last) = events.last() else {
            return Ok(());
        };
        let revision = last.kv.as_ref().map_or(0, |kv| kv.mod_revision);
        self.send(WatchResponse {
            header: self.header(revision),
            watch_id: id,
            events,
            ..WatchResponse::default()
        })
        .await
    }

    /// Reads the history for every watch that owes revisions up to the applied index, page by page,
    /// until each is level with the feed.
    async fn catch_up(&mut self) -> Result<(), ()> {
        while let Some((id, from, class)) = self
            .watches
            .values()
            .filter(|w| w.next <= self.applied)
            .map(|w| (w.id, w.next, w.class))
            .min_by_key(|&(_, next, _)| next)
        {
            // Each read has its own deadline: the stream lives longer than any request.
            let tagged = Tagged {
                request_id: self.tagged.request_id.clone(),
                timeout: DEFAULT_TIMEOUT,
                deadline: std::time::Instant::now() + DEFAULT_TIMEOUT,
                class,
                trace: Span::none(),
            };
            // Every watch at `from` moves together. The page is read, and the events each of them
            // sends selected, in the storage stage at the watch's class, off the network threads.
            let movers: Vec<Watch> = self
                .watches
                .values()
                .filter(|w| w.next == from)
                .cloned()
                .collect();
            let applied = self.applied;
            let read = self
                .server
                .read_data(&tagged, move |st| {
                    let view = st.snapshot()?;
                    let oldest = mvcc::compacted(&*view)?;
                    if from < oldest {
                        return Ok(Err(oldest));
                    }
                    let stored = view
                        .read(KeySpace::Raft, crate::raft::state_machine::APPLIED_KEY)?
                        .and_then(|v| <[u8; 8]>::try_from(v.as_slice()).ok())
                        .map_or(0, u64::from_be_bytes);
                    let page = mvcc::events_from(&*view, from, PAGE_BYTES, PAGE_EVENTS)?;
                    // Changes up to `upto` are in this page (whole writes); none after the applied
                    // index.
                    let applied = applied.min(stored);
                    let upto = match page.last() {
                        Some((r, _)) => (*r).min(applied),
                        None => applied,
                    };
                    if upto < from {
                        return Ok(Ok(None));
                    }
                    let mut changes: Vec<Change> = Vec::new();
                    for (rev, event) in page {
                        if rev > upto {
                            break;
                        }
                        match changes.last_mut() {
                            Some(c) if c.revision == rev => c.events.push(event),
                            _ => changes.push(Change {
                                revision: rev,
                                events: vec![event],
                            }),
                        }
                    }
                    let selected: Vec<(i64, Vec<KeyEvent>)> =
                        movers.iter().map(|w| (w.id, w.select(&changes))).collect();
                    Ok(Ok(Some((upto, selected))))
                })
                .await;
            let (upto, selected) = match read {
                Ok(Ok(Some(page))) => page,
                Ok(Ok(None)) => {
                    // Storage is not yet where the feed is (it never lags for long): look again.
                    tokio::time::sleep(Duration::from_millis(5)).await;
                    continue;
                }
                Ok(Err(oldest)) => {
                    self.watches.remove(&id);
                    return self
                        .send(WatchResponse {
                            header: self.header(self.applied),
                            watch_id: id,
                            canceled: true,
                            compact_revision: oldest,
                            cancel_reason: format!(
                                "required revision has been compacted: revision {from} is older \
                                 than the oldest kept revision {oldest}"
                            ),
                            ..WatchResponse::default()
                        })
                        .await;
                }
                Err(e) => {
                    // Shed or expired under load: try again shortly, the watch keeps its place.
                    tracing::debug!(error = %e, "watch history read failed; retrying");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            for (wid, events) in selected {
                // Still there and still at `from` (a cancel cannot come in between: this task
                // handles requests too, but not during this loop).
                let Some(w) = self.watches.get_mut(&wid) else {
                    continue;
                };
                w.next = upto + 1;
                self.send_events(wid, events).await?;
            }
        }
        if self.progress_asked {
            self.progress_asked = false;
            self.send(WatchResponse {
                header: self.header(self.applied),
                watch_id: -1,
                ..WatchResponse::default()
            })
            .await?;
        }
        Ok(())
    }

    /// Tells each synced watch with `progress_notify` the applied index.
    async fn notify_progress(&mut self) -> Result<(), ()> {
        let ids: Vec<i64> = self
            .watches
            .values()
            .filter(|w| w.progress_notify && w.next > self.applied)
            .map(|w| w.id)
            .collect();
        for id in ids {
            self.send(WatchResponse {
                header: self.header(self.applied),
                watch_id: id,
                ..WatchResponse::default()
            })
            .await?;
        }
        Ok(())
    }
}

/// How much history the leader keeps: the tighter of two bounds (each off when 0 / `None`).
#[derive(Debug, Clone, Copy)]
pub struct Retention {
    /// Revisions behind the applied index.
    pub revisions: u64,
    /// Age of the writes.
    pub time: Option<Duration>,
}

/// Starts the history's upkeep: on the leader, a compaction to the tighter of the retention bounds
/// (`revisions` behind the applied index, when that moves the oldest kept revision by at least a tenth of
/// them; the revision applied `time` ago, known from a sample of the applied index taken at every check),
/// checked every 10 s (a quarter of `time` when that is shorter); on every node, the removal of the `k`
/// index entries a compaction left behind (`mvcc::prune_index`), in pages, off the write path. Ends with
/// the server.
pub fn spawn_history_upkeep(server: &Arc<KvServer>, retention: Retention) {
    const PRUNE_PAGE: usize = 1_000;
    let every = retention.time.map_or(Duration::from_secs(10), |t| {
        (t / 4).clamp(Duration::from_millis(100), Duration::from_secs(10))
    });
    let weak = Arc::downgrade(server);
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(every);
        let mut pruned_for = 0u64;
        // (when, applied index then), oldest first: the front is the newest sample older than `time`.
        let mut samples: std::collections::VecDeque<(std::time::Instant, u64)> = Default::default();
        loop {
            tick.tick().await;
            let Some(s) = weak.upgrade() else { return };
            let storage = Arc::clone(&s.storage);
            let Ok(Ok(oldest)) =
                tokio::task::spawn_blocking(move || mvcc::compacted(&*storage)).await
            else {
                continue;
            };
            let status = s.driver.status();
            let now = std::time::Instant::now();
            samples.push_back((now, status.applied));
            let mut target = 0;
            if let Some(t) = retention.time {
                while samples.len() > 1 && samples[1].0 + t <= now {
                    samples.pop_front();
                }
                if let Some(&(when, applied)) = samples.front()
                    && when + t <= now
                {
                    // Every write up to `applied` is older than `time`.
                    target = applied + 1;
                }
            }
            let by_count = status.applied.saturating_sub(retention.revisions);
            if retention.revisions > 0
                && by_count > oldest
                && by_count - oldest >= (retention.revisions / 10).max(1)
            {
                target = target.max(by_count);
            }
            if status.leader_id == s.node_id && target > oldest {
                let header = kiwi_proto::v1::RequestHeader {
                    priority: kiwi_proto::v1::Priority::Low as i32,
                    ..Default::default()
                };
                if let Ok(tagged) = s.tag(Some(&header), false) {
                    let command = kiwi_proto::v1::raft_command::Command::Compact(
                        kiwi_proto::v1::CompactCommand { revision: target },
                    );
                    match s.propose(&tagged, command).await {
                        Ok(_) => tracing::info!(revision = target, "history compacted"),
                        Err(e) => tracing::debug!(error = %e, "history compaction not proposed"),
                    }
                }
            }
            if oldest > pruned_for {
                let mut cursor = None;
                loop {
                    let storage = Arc::clone(&s.storage);
                    let after = cursor.take();
                    match tokio::task::spawn_blocking(move || {
                        mvcc::prune_index(&*storage, after, PRUNE_PAGE)
                    })
                    .await
                    {
                        Ok(Ok(Some(next))) => cursor = Some(next),
                        Ok(Ok(None)) => {
                            pruned_for = oldest;
                            break;
                        }
                        _ => break,
                    }
                }
            }
        }
    });
}
