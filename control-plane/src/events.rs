//! The event log: one ordered, persisted record of what happened (nodes registered, up, down, refused;
//! leader changes). Events live in the control plane's store under `e` + the sequence number (big endian,
//! so key order is event order), written with fsync before anyone can read them; sequence numbers never
//! repeat, also across restarts. The cluster's identity is kept beside them.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::{SystemTime, UNIX_EPOCH};

use kiwi_proto::v1::{ClusterPolicy, Event, FaultSchedule};
use kiwi_storage::{KeySpace, Scan, ScanRange, StorageBackend, WriteBatch, WriteOptions};
use prost::Message as _;

const EVENT_PREFIX: u8 = b'e';
const CLUSTER_ID_KEY: &[u8] = b"m/cluster_id";
const POLICY_KEY: &[u8] = b"m/policy";
const FAULT_PREFIX: &[u8] = b"f/";

fn event_key(seq: u64) -> Vec<u8> {
    let mut k = vec![EVENT_PREFIX];
    k.extend_from_slice(&seq.to_be_bytes());
    k
}

/// An event about to be logged.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewEvent {
    pub kind: &'static str,
    pub node_id: u64,
    pub detail: String,
}

/// The persisted event log.
pub struct EventLog {
    storage: Arc<dyn StorageBackend>,
    /// The last sequence number used, and the first still kept; held while appending, so the log order
    /// is the sequence order.
    last: Mutex<(u64, u64)>,
    /// Events kept (`retention.events`): older ones are deleted by the append that passes the bound by
    /// [`PRUNE_EVERY`] more.
    keep: u64,
    /// The last sequence number, for followers of the log.
    notify: tokio::sync::watch::Sender<u64>,
}

/// How many events past `retention.events` accumulate before one range delete removes them.
const PRUNE_EVERY: u64 = 1024;

impl EventLog {
    /// Opens the log in `storage`, continuing after its last event.
    ///
    /// # Errors
    /// Storage errors; an event that does not decode.
    pub fn open(storage: Arc<dyn StorageBackend>, keep: u64) -> kiwi_storage::Result<EventLog> {
        let events = ScanRange::half_open(&[EVENT_PREFIX], &[EVENT_PREFIX + 1]);
        let seq_of = |pairs: Vec<(Vec<u8>, Vec<u8>)>| {
            pairs
                .first()
                .and_then(|(k, _)| Some(u64::from_be_bytes(k.get(1..9)?.try_into().ok()?)))
        };
        let last =
            seq_of(storage.scan(KeySpace::Data, &Scan::backward(events.clone(), 1))?).unwrap_or(0);
        let first =
            seq_of(storage.scan(KeySpace::Data, &Scan::forward(events, 1))?).unwrap_or(last + 1);
        Ok(EventLog {
            storage,
            last: Mutex::new((last, first)),
            keep: keep.max(1),
            notify: tokio::sync::watch::channel(last).0,
        })
    }

    /// Appends events durably and returns them with their sequence numbers. Blocks on the fsync: call it
    /// off the async threads.
    ///
    /// # Errors
    /// Storage errors (nothing is appended then).
    pub fn append(&self, events: Vec<NewEvent>) -> kiwi_storage::Result<Vec<Event>> {
        if events.is_empty() {
            return Ok(Vec::new());
        }
        let mut guard = self.last.lock().unwrap_or_else(PoisonError::into_inner);
        let (last, first) = &mut *guard;
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
        let mut batch = WriteBatch::new();
        let mut out = Vec::with_capacity(events.len());
        for (i, e) in events.into_iter().enumerate() {
            let event = Event {
                seq: *last + 1 + i as u64,
                at_unix_ms: now,
                kind: e.kind.to_string(),
                node_id: e.node_id,
                detail: e.detail,
            };
            batch.put(KeySpace::Data, event_key(event.seq), event.encode_to_vec());
            out.push(event);
        }
        // The oldest events beyond `keep`, in one range delete every PRUNE_EVERY events.
        let new_last = *last + out.len() as u64;
        let keep_from = new_last.saturating_sub(self.keep) + 1;
        let prune = keep_from >= *first + PRUNE_EVERY.min(self.keep);
        if prune {
            batch.delete_range(KeySpace::Data, event_key(*first), event_key(keep_from));
        }
        self.storage
            .batch_write(batch, WriteOptions { sync: true })?;
        *last = new_last;
        if prune {
            *first = keep_from;
        }
        self.notify.send_replace(new_last);
        for e in &out {
            tracing::info!(seq = e.seq, kind = %e.kind, node_id = e.node_id, detail = %e.detail, "event");
        }
        Ok(out)
    }

    /// Up to `limit` events after `after_seq`, in order.
    ///
    /// # Errors
    /// Storage errors; an event that does not decode.
    pub fn read(&self, after_seq: u64, limit: usize) -> kiwi_storage::Result<Vec<Event>> {
        let start = event_key(after_seq.saturating_add(1));
        let scan = Scan::forward(ScanRange::half_open(&start, &[EVENT_PREFIX + 1]), limit);
        self.storage
            .scan(KeySpace::Data, &scan)?
            .into_iter()
            .map(|(_, v)| {
                Event::decode(v.as_slice()).map_err(|e| kiwi_storage::Error::Engine {
                    backend: self.storage.kind(),
                    detail: format!("an event record does not decode: {e}"),
                })
            })
            .collect()
    }

    /// Follows the last sequence number.
    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<u64> {
        self.notify.subscribe()
    }

    /// The cluster id this control plane serves (0: none yet).
    ///
    /// # Errors
    /// Storage errors.
    pub fn cluster_id(&self) -> kiwi_storage::Result<u64> {
        Ok(self
            .storage
            .read(KeySpace::Data, CLUSTER_ID_KEY)?
            .and_then(|v| Some(u64::from_be_bytes(v.as_slice().try_into().ok()?)))
            .unwrap_or(0))
    }

    /// The policy last set (version 0 when none was).
    ///
    /// # Errors
    /// Storage errors; a record that does not decode.
    pub fn policy(&self) -> kiwi_storage::Result<ClusterPolicy> {
        match self.storage.read(KeySpace::Data, POLICY_KEY)? {
            None => Ok(ClusterPolicy::default()),
            Some(v) => {
                ClusterPolicy::decode(v.as_slice()).map_err(|e| kiwi_storage::Error::Engine {
                    backend: self.storage.kind(),
                    detail: format!("the policy record does not decode: {e}"),
                })
            }
        }
    }

    /// Records the policy (durably).
    ///
    /// # Errors
    /// Storage errors.
    pub fn set_policy(&self, policy: &ClusterPolicy) -> kiwi_storage::Result<()> {
        self.storage.write(
            KeySpace::Data,
            POLICY_KEY,
            &policy.encode_to_vec(),
            WriteOptions { sync: true },
        )
    }

    /// Records a fault schedule (durably), replacing its earlier record.
    ///
    /// # Errors
    /// Storage errors.
    pub fn put_fault(&self, fault: &FaultSchedule) -> kiwi_storage::Result<()> {
        let mut key = FAULT_PREFIX.to_vec();
        key.extend_from_slice(&fault.id.to_be_bytes());
        self.storage.write(
            KeySpace::Data,
            &key,
            &fault.encode_to_vec(),
            WriteOptions { sync: true },
        )
    }

    /// Deletes the records of fault schedules (durably).
    ///
    /// # Errors
    /// Storage errors.
    pub fn delete_faults(&self, ids: &[u64]) -> kiwi_storage::Result<()> {
        if ids.is_empty() {
            return Ok(());
        }
        let mut batch = WriteBatch::new();
        for id in ids {
            let mut key = FAULT_PREFIX.to_vec();
            key.extend_from_slice(&id.to_be_bytes());
            batch.delete(KeySpace::Data, key);
        }
        self.storage.batch_write(batch, WriteOptions { sync: true })
    }

    /// Every fault schedule recorded, by id.
    ///
    /// # Errors
    /// Storage errors; a record that does not decode.
    pub fn faults(&self) -> kiwi_storage::Result<Vec<FaultSchedule>> {
        let scan = Scan::forward(ScanRange::half_open(FAULT_PREFIX, b"f0"), usize::MAX);
        self.storage
            .scan(KeySpace::Data, &scan)?
            .into_iter()
            .map(|(_, v)| {
                FaultSchedule::decode(v.as_slice()).map_err(|e| kiwi_storage::Error::Engine {
                    backend: self.storage.kind(),
                    detail: format!("a fault schedule record does not decode: {e}"),
                })
            })
            .collect()
    }

    /// Records the cluster id (durably).
    ///
    /// # Errors
    /// Storage errors.
    pub fn set_cluster_id(&self, id: u64) -> kiwi_storage::Result<()> {
        self.storage.write(
            KeySpace::Data,
            CLUSTER_ID_KEY,
            &id.to_be_bytes(),
            WriteOptions { sync: true },
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiwi_storage::{Limits, MemoryBackend};

    fn ev(kind: &'static str, node_id: u64) -> NewEvent {
        NewEvent {
            kind,
            node_id,
            detail: String::new(),
        }
    }

    #[test]
    fn the_oldest_events_beyond_the_retention_are_deleted() {
        let st: Arc<dyn StorageBackend> = Arc::new(MemoryBackend::new(Limits::default()));
        let log = EventLog::open(Arc::clone(&st), 100).unwrap();
        for _ in 0..1000 {
            log.append(vec![ev("node_up", 1)]).unwrap();
        }
        let kept = log.read(0, 10_000).unwrap();
        assert!(
            (100..=200).contains(&kept.len()),
            "between the retention and one prune step more: {}",
            kept.len()
        );
        assert_eq!(kept.last().unwrap().seq, 1000, "the newest are kept");
        let log = EventLog::open(st, 100).unwrap();
        assert_eq!(log.append(vec![ev("node_up", 1)]).unwrap()[0].seq, 1001);
        assert!(log.read(0, 10_000).unwrap().len() <= 201);
    }

    #[test]
    fn events_are_ordered_and_numbering_continues_after_reopening() {
        let st: Arc<dyn StorageBackend> = Arc::new(MemoryBackend::new(Limits::default()));
        let log = EventLog::open(Arc::clone(&st), 1000).unwrap();
        let a = log
            .append(vec![ev("node_up", 1), ev("node_up", 2)])
            .unwrap();
        assert_eq!(a.iter().map(|e| e.seq).collect::<Vec<_>>(), [1, 2]);
        log.set_cluster_id(77).unwrap();
        let log = EventLog::open(st, 1000).unwrap();
        assert_eq!(log.cluster_id().unwrap(), 77);
        let b = log.append(vec![ev("node_down", 2)]).unwrap();
        assert_eq!(b[0].seq, 3);
        let all = log.read(0, 100).unwrap();
        assert_eq!(all.iter().map(|e| e.seq).collect::<Vec<_>>(), [1, 2, 3]);
        assert_eq!(log.read(2, 100).unwrap()[0].kind, "node_down");
        assert_eq!(log.read(1, 1).unwrap().len(), 1);
    }
}
