//! Revisions and the kept history: how the state machine stores each key's counters and every change,
//! and how reads and watches at a past revision are served from them.
//!
//! **The revision is the Raft log index** of the entry that made a write. It is the same on every
//! replica by construction, needs no counter of its own (nothing extra to persist, to carry in snapshots or
//! to get wrong after a crash: the applied index already is persisted atomically with the data) and
//! orders writes exactly as the log does. Unlike etcd's counter it has gaps: entries that change no key
//! (a failed compare, a membership change, a new leader's empty entry, a refused command) use an index
//! too. Clients may rely on what etcd's users rely on in practice (unique per write, increasing, one
//! revision for all keys of one write, resuming a watch at `last + 1`), not on `revision + 1` being the
//! next write. The store's revision (`ResponseHeader.revision`) is the applied index.
//!
//! **Layout.** The latest state stays where it was, one pair per key in [`KeySpace::Data`], so a read of
//! the latest value costs one point read as before; the value is stored behind a fixed header of
//! [`HEADER`] bytes: `create_revision`, `mod_revision`, `version`, `lease` (u64 big-endian each).
//! [`KeySpace::History`] holds, written in the same batch as the data:
//! - `e` + revision (u64 BE) + position in the write (u32 BE) → the change as an [`KeyEvent`] with the
//!   key's previous value (`prev_kv`). Scanned in order for watches; the events of one write are adjacent.
//! - `k` + the key (escaped so that keys order as before: `0x00` → `0x00 0xFF`, then `0x00 0x01`) +
//!   revision (u64 BE) → the position: every revision that changed the key, oldest first.
//!
//! A read at revision `R` finds, for each key, the first change after `R` through the `k` index: that
//! event's `prev_kv` is the key at `R` (absent if unset). A key with no change after `R` is as it is now.
//! So a read at `R` needs only the events after `R`, and **compaction** to `C` (keep revisions `>= C`)
//! deletes the events before `C` with one range delete, off any lookup path: `k` entries before `C` are
//! never reached by a lookup (they are all below `R + 1`) and are removed later in pages
//! ([`prune_index`]), off the write path. The oldest kept revision is [`COMPACTED_KEY`]; a node that
//! installed a snapshot at index `S` keeps no history before it, so its oldest kept revision is `S + 1`.

use std::ops::Bound;

use kiwi_proto::v1::{KeyEvent, KeyValue, key_event::EventType};
use kiwi_storage::{KeySpace, Scan, ScanRange, StorageBackend, StorageSnapshot, WriteBatch};
use prost::Message as _;

/// Bytes of the header before each stored value.
pub const HEADER: usize = 32;

/// The limits the node's storage enforces: the ceilings every node shares
/// ([`kiwi_storage::Limits::CEILING`]), with room in values for the header.
pub const STORED_CEILING: kiwi_storage::Limits = kiwi_storage::Limits {
    max_key_bytes: kiwi_storage::Limits::CEILING.max_key_bytes,
    max_value_bytes: kiwi_storage::Limits::CEILING.max_value_bytes + HEADER,
};

/// Key, in [`KeySpace::Raft`], of the oldest revision the history keeps (u64 BE; absent: 1).
pub const COMPACTED_KEY: &[u8] = b"state/compacted";

const EVENT_TAG: u8 = b'e';
const INDEX_TAG: u8 = b'k';

/// A key's counters (see `kiwi.v1.KeyValue`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counters {
    pub create_revision: u64,
    pub mod_revision: u64,
    pub version: u64,
    pub lease: u64,
}

/// A value as stored in [`KeySpace::Data`]: the header, then the value.
pub fn encode_stored(c: Counters, value: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER + value.len());
    for n in [c.create_revision, c.mod_revision, c.version, c.lease] {
        out.extend_from_slice(&n.to_be_bytes());
    }
    out.extend_from_slice(value);
    out
}

/// Splits a stored value into its counters and the value. A value shorter than the header (never
/// written by this version) reads as counters 0 and the whole value.
pub fn decode_stored(stored: &[u8]) -> (Counters, &[u8]) {
    let Some((head, value)) = stored.split_first_chunk::<HEADER>() else {
        return (Counters::default(), stored);
    };
    let n = |i: usize| u64::from_be_bytes(head[i * 8..i * 8 + 8].try_into().expect("8 bytes"));
    (
        Counters {
            create_revision: n(0),
            mod_revision: n(1),
            version: n(2),
            lease: n(3),
        },
        value,
    )
}

/// The key-value of a stored pair (value left empty with `keys_only`). Takes the stored bytes so that
/// the value is not copied: the header is cut off in place.
pub fn to_kv(key: Vec<u8>, mut stored: Vec<u8>, keys_only: bool) -> KeyValue {
    let (c, _) = decode_stored(&stored);
    if keys_only {
        stored.clear();
    } else {
        stored.drain(..HEADER.min(stored.len()));
    }
    KeyValue {
        key,
        value: stored,
        create_revision: c.create_revision,
        mod_revision: c.mod_revision,
        version: c.version,
        lease: c.lease,
    }
}

/// Key of the event at `revision`, position `pos`.
pub fn event_key(revision: u64, pos: u32) -> Vec<u8> {
    let mut k = Vec::with_capacity(13);
    k.push(EVENT_TAG);
    k.extend_from_slice(&revision.to_be_bytes());
    k.extend_from_slice(&pos.to_be_bytes());
    k
}

fn event_revision(key: &[u8]) -> Option<u64> {
    let rest = key.strip_prefix(&[EVENT_TAG])?;
    Some(u64::from_be_bytes(*rest.first_chunk::<8>()?))
}

/// The escaped form of a user key in the `k` index (order-preserving, self-delimiting).
fn escaped(key: &[u8], terminated: bool) -> Vec<u8> {
    let mut out = Vec::with_capacity(key.len() + 11);
    out.push(INDEX_TAG);
    for &b in key {
        out.push(b);
        if b == 0 {
            out.push(0xFF);
        }
    }
    if terminated {
        out.extend_from_slice(&[0, 1]);
    }
    out
}

/// Key of the `k` index entry of `key` changed at `revision`.
pub fn index_key(key: &[u8], revision: u64) -> Vec<u8> {
    let mut k = escaped(key, true);
    k.extend_from_slice(&revision.to_be_bytes());
    k
}

/// Splits a `k` index key into the user key and the revision.
fn split_index_key(k: &[u8]) -> Option<(Vec<u8>, u64)> {
    let rest = k.strip_prefix(&[INDEX_TAG])?;
    let (body, rev) = rest.split_last_chunk::<8>()?;
    let body = body.strip_suffix(&[0, 1])?;
    let mut key = Vec::with_capacity(body.len());
    let mut it = body.iter();
    while let Some(&b) = it.next() {
        key.push(b);
        if b == 0 {
            it.next();
        }
    }
    Some((key, u64::from_be_bytes(*rev)))
}

/// Adds one change to the history: its index entry to `index` and the event to `events`.
///
/// The two go to separate batches that the caller writes together, the events after the index entries:
/// events come in revision order, so one after the other they are inserted next to the last one
/// (RocksDB's memtable remembers where it inserted last), while an index entry goes anywhere. Interleaved,
/// every event insert searched the whole memtable.
pub fn record(
    index: &mut WriteBatch,
    events: &mut WriteBatch,
    revision: u64,
    pos: u32,
    event: &KeyEvent,
) {
    let key = event.kv.as_ref().map(|kv| kv.key.as_slice()).unwrap_or(&[]);
    index.put(
        KeySpace::History,
        index_key(key, revision),
        pos.to_be_bytes().to_vec(),
    );
    events.put(
        KeySpace::History,
        event_key(revision, pos),
        event.encode_to_vec(),
    );
}

/// A PUT event.
pub fn put_event(kv: KeyValue, prev: Option<KeyValue>) -> KeyEvent {
    KeyEvent {
        r#type: EventType::Put as i32,
        kv: Some(kv),
        prev_kv: prev,
    }
}

/// A DELETE event of `prev` (the key as it was) at `revision`.
pub fn delete_event(prev: KeyValue, revision: u64) -> KeyEvent {
    KeyEvent {
        r#type: EventType::Delete as i32,
        kv: Some(KeyValue {
            key: prev.key.clone(),
            mod_revision: revision,
            ..KeyValue::default()
        }),
        prev_kv: Some(prev),
    }
}

/// The oldest revision the history keeps.
///
/// # Errors
/// Storage errors.
pub fn compacted<R: Reader + ?Sized>(view: &R) -> kiwi_storage::Result<u64> {
    Ok(view
        .read(KeySpace::Raft, COMPACTED_KEY)?
        .and_then(|v| <[u8; 8]>::try_from(v.as_slice()).ok())
        .map_or(1, u64::from_be_bytes))
}

/// Adds compaction to `revision` to `batch`: the oldest kept revision and the removal of older events.
pub fn compact_batch(batch: &mut WriteBatch, revision: u64) {
    batch.delete_range(KeySpace::History, event_key(0, 0), event_key(revision, 0));
    batch.put(KeySpace::Raft, COMPACTED_KEY, revision.to_be_bytes());
}

/// Adds, for a snapshot installed at `index`, an empty history starting after it.
pub fn reset_batch(batch: &mut WriteBatch, index: u64) {
    batch.put(KeySpace::Raft, COMPACTED_KEY, (index + 1).to_be_bytes());
}

/// Reads the store or a point-in-time view of it.
pub trait Reader {
    fn read(&self, space: KeySpace, key: &[u8]) -> kiwi_storage::Result<Option<Vec<u8>>>;
    fn scan(&self, space: KeySpace, scan: &Scan)
    -> kiwi_storage::Result<Vec<kiwi_storage::KvPair>>;
}

impl Reader for dyn StorageBackend {
    fn read(&self, space: KeySpace, key: &[u8]) -> kiwi_storage::Result<Option<Vec<u8>>> {
        StorageBackend::read(self, space, key)
    }
    fn scan(
        &self,
        space: KeySpace,
        scan: &Scan,
    ) -> kiwi_storage::Result<Vec<kiwi_storage::KvPair>> {
        StorageBackend::scan(self, space, scan)
    }
}

impl Reader for dyn StorageSnapshot {
    fn read(&self, space: KeySpace, key: &[u8]) -> kiwi_storage::Result<Option<Vec<u8>>> {
        StorageSnapshot::read(self, space, key)
    }
    fn scan(
        &self,
        space: KeySpace,
        scan: &Scan,
    ) -> kiwi_storage::Result<Vec<kiwi_storage::KvPair>> {
        StorageSnapshot::scan(self, space, scan)
    }
}

/// Events of the kept history from revision `from` on, whole writes only, until about `max_bytes` or
/// `max_events` (at least one whole write, however large). Returns them with their revisions, oldest
/// first.
///
/// # Errors
/// Storage errors, or an event that does not decode.
pub fn events_from<R: Reader + ?Sized>(
    view: &R,
    from: u64,
    max_bytes: usize,
    max_events: usize,
) -> kiwi_storage::Result<Vec<(u64, KeyEvent)>> {
    let mut out: Vec<(u64, KeyEvent)> = Vec::new();
    let mut bytes = 0;
    let mut start = Bound::Included(event_key(from, 0));
    loop {
        let scan = Scan::forward(
            ScanRange {
                start: start.clone(),
                end: Bound::Excluded(vec![EVENT_TAG + 1]),
            },
            max_events.max(1),
        );
        let pairs = view.scan(KeySpace::History, &scan)?;
        let full = pairs.len() == max_events.max(1);
        for (k, v) in pairs {
            let Some(rev) = event_revision(&k) else {
                return Ok(out);
            };
            // Stop at a write boundary once over budget.
            if out.last().is_some_and(|(r, _)| *r != rev)
                && (bytes >= max_bytes || out.len() >= max_events)
            {
                return Ok(out);
            }
            bytes += k.len() + v.len();
            let event = KeyEvent::decode(v.as_slice()).map_err(|e| kiwi_storage::Error::Io {
                action: "decode a history event",
                path: std::path::PathBuf::from(format!("history/revision {rev}")),
                source: std::io::Error::new(std::io::ErrorKind::InvalidData, e),
            })?;
            start = Bound::Excluded(k);
            out.push((rev, event));
        }
        if !full {
            return Ok(out);
        }
    }
}

/// The first change of `key` after revision `at`, if the history has one: the key as it was at `at`
/// (its `prev_kv`; `None` inside when it did not exist).
fn change_after<R: Reader + ?Sized>(
    view: &R,
    key: &[u8],
    at: u64,
) -> kiwi_storage::Result<Option<Option<KeyValue>>> {
    let start = index_key(key, at.saturating_add(1));
    let end = index_key(key, u64::MAX);
    let scan = Scan::forward(
        ScanRange {
            start: Bound::Included(start),
            end: Bound::Included(end),
        },
        1,
    );
    let Some((k, pos)) = view.scan(KeySpace::History, &scan)?.into_iter().next() else {
        return Ok(None);
    };
    let (_, rev) = split_index_key(&k).expect("an index key");
    let pos = u32::from_be_bytes(pos.as_slice().try_into().unwrap_or_default());
    let event = view
        .read(KeySpace::History, &event_key(rev, pos))?
        .and_then(|v| KeyEvent::decode(v.as_slice()).ok());
    Ok(Some(event.and_then(|e| e.prev_kv)))
}

/// `key` as it was at revision `at` (which the caller checked is kept).
///
/// # Errors
/// Storage errors.
pub fn read_at<R: Reader + ?Sized>(
    view: &R,
    key: &[u8],
    at: u64,
) -> kiwi_storage::Result<Option<KeyValue>> {
    if let Some(then) = change_after(view, key, at)? {
        return Ok(then);
    }
    Ok(view
        .read(KeySpace::Data, key)?
        .map(|stored| to_kv(key.to_vec(), stored, false)))
}

/// Up to `limit` pairs of `[start, end)` (an empty `end`: no bound) as they were at revision `at`, in
/// key order (descending with `reverse`), and whether more remain: the keys of the data now merged with
/// the keys changed after `at`, each read as it was at `at`.
///
/// # Errors
/// Storage errors.
pub fn scan_at<R: Reader + ?Sized>(
    view: &R,
    range: &ScanRange,
    at: u64,
    limit: usize,
    reverse: bool,
) -> kiwi_storage::Result<(Vec<KeyValue>, bool)> {
    const PAGE: usize = 256;
    let mut out = Vec::new();
    let mut data_range = range.clone();
    let mut index_range = index_range_of(range);
    let mut data: std::collections::VecDeque<(Vec<u8>, Vec<u8>)> = Default::default();
    let mut changed: std::collections::VecDeque<Vec<u8>> = Default::default();
    let (mut data_done, mut index_done) = (false, false);
    loop {
        if data.is_empty() && !data_done {
            let page = view.scan(
                KeySpace::Data,
                &Scan {
                    range: data_range.clone(),
                    limit: PAGE,
                    reverse,
                },
            )?;
            data_done = page.len() < PAGE;
            if let Some((k, _)) = page.last() {
                let bound = Bound::Excluded(k.clone());
                if reverse {
                    data_range.end = bound;
                } else {
                    data_range.start = bound;
                }
            }
            data.extend(page);
        }
        if changed.is_empty() && !index_done {
            let page = view.scan(
                KeySpace::History,
                &Scan {
                    range: index_range.clone(),
                    limit: PAGE,
                    reverse,
                },
            )?;
            index_done = page.len() < PAGE;
            if let Some((k, _)) = page.last() {
                let bound = Bound::Excluded(k.clone());
                if reverse {
                    index_range.end = bound;
                } else {
                    index_range.start = bound;
                }
            }
            for (k, _) in page {
                if let Some((key, rev)) = split_index_key(&k)
                    && rev > at
                    && changed.back() != Some(&key)
                {
                    changed.push_back(key);
                }
            }
        }
        let next_key = match (data.front(), changed.front()) {
            (None, None) if data_done && index_done => return Ok((out, false)),
            (None, None) => continue,
            (Some((d, _)), None) if index_done => d.clone(),
            (None, Some(c)) if data_done => c.clone(),
            (Some(_), None) | (None, Some(_)) => continue,
            (Some((d, _)), Some(c)) => {
                if (d < c) != reverse {
                    d.clone()
                } else {
                    c.clone()
                }
            }
        };
        if data.front().is_some_and(|(d, _)| *d == next_key) {
            data.pop_front();
        }
        if changed.front().is_some_and(|c| *c == next_key) {
            changed.pop_front();
        }
        if let Some(kv) = read_at(view, &next_key, at)? {
            if out.len() == limit {
                return Ok((out, true));
            }
            out.push(kv);
        }
    }
}

/// The `k` index range holding the entries of the keys of `range`.
fn index_range_of(range: &ScanRange) -> ScanRange {
    let conv = |b: &Bound<Vec<u8>>, upper: bool| match b {
        Bound::Included(k) => {
            if upper {
                Bound::Included(index_key(k, u64::MAX))
            } else {
                Bound::Included(escaped(k, true))
            }
        }
        Bound::Excluded(k) => {
            if upper {
                Bound::Excluded(escaped(k, true))
            } else {
                Bound::Excluded(index_key(k, u64::MAX))
            }
        }
        Bound::Unbounded => {
            if upper {
                Bound::Excluded(vec![INDEX_TAG + 1])
            } else {
                Bound::Included(vec![INDEX_TAG])
            }
        }
    };
    ScanRange {
        start: conv(&range.start, false),
        end: conv(&range.end, true),
    }
}

/// Removes up to `budget` `k` index entries older than the oldest kept revision, continuing after
/// `after` (the last index key a previous call looked at). Returns the key to continue after, or `None`
/// when the whole index was gone through.
///
/// # Errors
/// Storage errors.
pub fn prune_index(
    backend: &dyn StorageBackend,
    after: Option<Vec<u8>>,
    budget: usize,
) -> kiwi_storage::Result<Option<Vec<u8>>> {
    let oldest = compacted(backend)?;
    let scan = Scan::forward(
        ScanRange {
            start: after.map_or(Bound::Included(vec![INDEX_TAG]), Bound::Excluded),
            end: Bound::Excluded(vec![INDEX_TAG + 1]),
        },
        budget,
    );
    let page = backend.scan(KeySpace::History, &scan)?;
    let mut batch = WriteBatch::new();
    for (k, _) in &page {
        if split_index_key(k).is_some_and(|(_, rev)| rev < oldest) {
            batch.delete(KeySpace::History, k.clone());
        }
    }
    if !batch.is_empty() {
        backend.batch_write(batch, kiwi_storage::WriteOptions::BUFFERED)?;
    }
    Ok((page.len() == budget)
        .then(|| page.last().map(|(k, _)| k.clone()))
        .flatten())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stored_values_keep_their_counters() {
        let c = Counters {
            create_revision: 3,
            mod_revision: 9,
            version: 4,
            lease: 7,
        };
        let s = encode_stored(c, b"value");
        assert_eq!(decode_stored(&s), (c, &b"value"[..]));
        assert_eq!(decode_stored(&encode_stored(c, b"")).1, b"");
    }

    #[test]
    fn index_keys_order_as_their_keys_and_split_back() {
        let keys: [&[u8]; 6] = [b"a", b"a\0", b"a\0\0", b"a\x01", b"ab", b"b"];
        for w in keys.windows(2) {
            assert!(
                index_key(w[0], u64::MAX) < index_key(w[1], 0),
                "{:?} before {:?}",
                w[0],
                w[1]
            );
        }
        for k in keys {
            assert_eq!(split_index_key(&index_key(k, 42)), Some((k.to_vec(), 42)));
        }
        assert!(index_key(b"a", 1) < index_key(b"a", 2));
    }
}
