//! Raft snapshots of the state machine: reading one in chunks from a pinned view, staging the chunks a
//! follower receives, and installing a staged snapshot atomically.
//!
//! Neither side holds the data in memory: the sender reads the pinned view [`CHUNK_KEYS`] pairs (at most
//! about [`CHUNK_BYTES`]) at a time, the receiver writes each chunk to a staging area in the Raft key space
//! (`snap/<key>`) as it arrives.
//!
//! The staging area belongs to one snapshot at a time: the receiver holds its lock from the first chunk
//! until the driver has installed (or dropped) the snapshot, and records which snapshot (index, term) it
//! holds once the last chunk is staged ([`mark_staged`]). A transfer whose stream was reset after its
//! last chunk keeps the lock in the driver's inbox, so the next one cannot clear or fill staging under it.
//!
//! Installing (on the driver thread, when Raft hands over the snapshot):
//! 0. check that staging holds exactly this snapshot, complete (else stop: installing another
//!    snapshot's pairs under this one's index would diverge silently);
//! 1. durably mark `state/installing` with the snapshot's metadata;
//! 2. clear the user data and copy the staged pairs into it, in bounded batches;
//! 3. in one fsynced batch: the applied index, the Raft log reset to the snapshot (see
//!    `LogStore::snapshot_batch`) and the removal of the mark;
//! 4. clear the staging area.
//!
//! A crash during 2 or 3 leaves the mark: the next start runs 2-4 again from the still staged pairs
//! ([`resume_install`]) before anything reads the data.
//!
//! While the node runs, the storage workers keep serving reads during steps 2-3, which see user data
//! half replaced. Every read of user data therefore goes through the [`InstallGate`]: a read that
//! overlapped an install in any way is refused (with a retry-safe status) instead of answered, so no
//! client ever sees a state that never existed.
//!
//! The snapshot also carries the members' addresses (see `log_store::SnapshotData`); they are recorded
//! in step 3, in the same batch as the applied index, so a node that caught up by snapshot can reach
//! members added while it was behind, across restarts.

use kiwi_proto::v1::KeyValue;
use kiwi_storage::{
    KeySpace, KvPair, Scan, ScanRange, StorageBackend, StorageSnapshot, WriteBatch, WriteOptions,
};
use protobuf::Message as _;
use raft::eraftpb::SnapshotMetadata;
use std::ops::Bound;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::raft::lease_state;
use crate::raft::log_store::{LogStore, SnapshotData};
use crate::raft::state_machine::{self, APPLIED_KEY};

/// Prefix of staged snapshot pairs in the Raft key space.
const STAGING_PREFIX: &[u8] = b"snap/";
/// End of the staging range (`/` + 1).
const STAGING_END: &[u8] = b"snap0";
/// Present while an install is under way: the snapshot's metadata.
const INSTALLING_KEY: &[u8] = b"state/installing";
/// Which snapshot the staging area holds, complete: its index and term (8 + 8 bytes, big-endian). Written
/// with the last chunk, removed with the staged pairs.
const STAGED_KEY: &[u8] = b"state/staged";
/// Present while an install is under way: the members' addresses the snapshot carries (see
/// `log_store::SnapshotData`, whose encoding it uses with a view id of 0).
const INSTALLING_MEMBERS_KEY: &[u8] = b"state/installing-members";

/// Whether a snapshot install is replacing the user data: an odd count means one is under way.
#[derive(Debug, Default)]
pub struct InstallGate(AtomicU64);

impl InstallGate {
    fn begin(&self) {
        self.0.fetch_add(1, Ordering::SeqCst);
    }

    fn end(&self) {
        self.0.fetch_add(1, Ordering::SeqCst);
    }

    /// Runs `read` (a read of user data) and returns its result, or `None` when a snapshot install was
    /// under way at any moment of it (its result may mix the old and the new state).
    pub fn read<T>(&self, read: impl FnOnce() -> T) -> Option<T> {
        let before = self.0.load(Ordering::SeqCst);
        if before % 2 == 1 {
            return None;
        }
        let out = read();
        (self.0.load(Ordering::SeqCst) == before).then_some(out)
    }
}
/// Pairs per chunk (and per batch when clearing or copying).
pub const CHUNK_KEYS: usize = 1024;
/// Bytes per chunk, roughly: a chunk ends after the pair that crosses it.
pub const CHUNK_BYTES: usize = 1024 * 1024;

type Result<T> = std::result::Result<T, Box<dyn std::error::Error + Send + Sync>>;

/// Reads a view's user data in chunks: each call returns the pairs after `after` (from the start when
/// `None`); an empty vector means the end.
///
/// # Errors
/// Storage errors.
pub fn read_chunk(
    view: &dyn StorageSnapshot,
    after: Option<&[u8]>,
) -> kiwi_storage::Result<Vec<KeyValue>> {
    let range = ScanRange {
        start: after.map_or(Bound::Unbounded, |k| Bound::Excluded(k.to_vec())),
        end: Bound::Unbounded,
    };
    let mut out = Vec::new();
    let mut bytes = 0;
    for (key, value) in view.scan(KeySpace::Data, &Scan::forward(range, CHUNK_KEYS))? {
        bytes += key.len() + value.len();
        out.push(KeyValue {
            key,
            value,
            ..KeyValue::default()
        });
        if bytes >= CHUNK_BYTES {
            break;
        }
    }
    Ok(out)
}

fn staging_key(key: &[u8]) -> Vec<u8> {
    let mut k = Vec::with_capacity(STAGING_PREFIX.len() + key.len());
    k.extend_from_slice(STAGING_PREFIX);
    k.extend_from_slice(key);
    k
}

/// Removes every staged pair.
///
/// # Errors
/// Storage errors.
pub fn clear_staging(backend: &dyn StorageBackend) -> kiwi_storage::Result<()> {
    backend.delete(KeySpace::Raft, STAGED_KEY, WriteOptions::BUFFERED)?;
    delete_range(
        backend,
        KeySpace::Raft,
        ScanRange::half_open(STAGING_PREFIX, STAGING_END),
    )
}

/// Checks a received chunk before it is staged: every pair must be one the data key space can hold
/// under `limits` (a non-empty key and sizes within them), because the install copies it there after
/// deleting the old data, and a pair refused then would leave the node unable to finish the install.
///
/// # Errors
/// What is wrong, naming the pair.
pub fn check_chunk(
    kvs: &[KeyValue],
    limits: kiwi_storage::Limits,
) -> std::result::Result<(), String> {
    for (i, kv) in kvs.iter().enumerate() {
        limits
            .check_key(KeySpace::Data, &kv.key)
            .and_then(|()| limits.check_value(KeySpace::Data, &kv.value))
            .map_err(|e| format!("snapshot pair {i} of the chunk cannot be installed: {e}"))?;
    }
    Ok(())
}

/// Stages one received chunk (buffered; the install's first step makes it durable).
///
/// # Errors
/// Storage errors.
pub fn stage(backend: &dyn StorageBackend, kvs: Vec<KeyValue>) -> kiwi_storage::Result<()> {
    if kvs.is_empty() {
        return Ok(());
    }
    let mut batch = WriteBatch::new();
    for kv in kvs {
        batch.put(KeySpace::Raft, staging_key(&kv.key), kv.value);
    }
    backend.batch_write(batch, WriteOptions::BUFFERED)
}

/// Records that the staging area holds every pair of the snapshot at (`index`, `term`) (after its last
/// chunk is staged; buffered, made durable by the install's first step).
///
/// # Errors
/// Storage errors.
pub fn mark_staged(
    backend: &dyn StorageBackend,
    index: u64,
    term: u64,
) -> kiwi_storage::Result<()> {
    let mut v = index.to_be_bytes().to_vec();
    v.extend_from_slice(&term.to_be_bytes());
    backend.write(KeySpace::Raft, STAGED_KEY, &v, WriteOptions::BUFFERED)
}

/// The (index, term) of the complete snapshot the staging area holds, if any.
fn staged(backend: &dyn StorageBackend) -> kiwi_storage::Result<Option<(u64, u64)>> {
    Ok(backend.read(KeySpace::Raft, STAGED_KEY)?.and_then(|v| {
        let index = u64::from_be_bytes(v.get(..8)?.try_into().ok()?);
        let term = u64::from_be_bytes(v.get(8..16)?.try_into().ok()?);
        Some((index, term))
    }))
}

/// Calls `f` with every page (up to [`CHUNK_KEYS`] pairs) of `range` in `space`, in key order. Each page is
/// read after `f` handled the previous one, so `f` may delete or write what it was given.
fn for_each_page(
    backend: &dyn StorageBackend,
    space: KeySpace,
    range: ScanRange,
    mut f: impl FnMut(Vec<KvPair>) -> kiwi_storage::Result<()>,
) -> kiwi_storage::Result<()> {
    let mut start = range.start;
    loop {
        let scan = Scan::forward(
            ScanRange {
                start: start.clone(),
                end: range.end.clone(),
            },
            CHUNK_KEYS,
        );
        let pairs = backend.scan(space, &scan)?;
        let Some((last, _)) = pairs.last() else {
            return Ok(());
        };
        start = Bound::Excluded(last.clone());
        f(pairs)?;
    }
}

fn delete_range(
    backend: &dyn StorageBackend,
    space: KeySpace,
    range: ScanRange,
) -> kiwi_storage::Result<()> {
    for_each_page(backend, space, range, |pairs| {
        let mut batch = WriteBatch::new();
        for (k, _) in pairs {
            batch.delete(space, k);
        }
        backend.batch_write(batch, WriteOptions::BUFFERED)
    })
}

/// Copies the staged pairs into the data, attaching each key to the lease its header names (one of
/// `leases`): returns the pairs copied and the keys per lease.
fn copy_staged_to_data(
    backend: &dyn StorageBackend,
    leases: &[(u64, i64)],
) -> kiwi_storage::Result<(u64, std::collections::BTreeMap<u64, u64>)> {
    let mut copied = 0;
    let mut attached: std::collections::BTreeMap<u64, u64> =
        leases.iter().map(|(id, _)| (*id, 0)).collect();
    let staged = ScanRange::half_open(STAGING_PREFIX, STAGING_END);
    for_each_page(backend, KeySpace::Raft, staged, |pairs| {
        let mut batch = WriteBatch::new();
        for (k, v) in pairs {
            let key = k[STAGING_PREFIX.len()..].to_vec();
            let lease = crate::raft::mvcc::decode_stored(&v).0.lease;
            if let Some(n) = attached.get_mut(&lease) {
                *n += 1;
                batch.put(
                    KeySpace::Raft,
                    lease_state::index_key(lease, &key),
                    Vec::new(),
                );
            }
            batch.put(KeySpace::Data, key, v);
            copied += 1;
        }
        backend.batch_write(batch, WriteOptions::BUFFERED)
    })?;
    Ok((copied, attached))
}

/// Installs the staged snapshot described by `meta`, with the member addresses and the leases it carries
/// (steps 1-4 of the module doc). Returns the number of pairs installed.
///
/// # Errors
/// Storage errors: the caller must stop; the mark makes the next start finish the install. Staging that
/// does not hold this snapshot complete: the caller must stop (nothing was changed; after a restart the
/// leader sends the snapshot again).
pub fn install(
    backend: &dyn StorageBackend,
    store: &mut LogStore,
    meta: &SnapshotMetadata,
    members: &[(u64, String)],
    leases: &[(u64, i64)],
    gate: &InstallGate,
) -> Result<u64> {
    let holds = staged(backend)?;
    if holds != Some((meta.index, meta.term)) {
        return Err(format!(
            "refusing to install the snapshot at index {} term {}: the staging area holds {}; \
             installing it would put another snapshot's data under this index",
            meta.index,
            meta.term,
            holds.map_or_else(
                || "no complete snapshot".to_string(),
                |(i, t)| format!("the snapshot at index {i} term {t}")
            )
        )
        .into());
    }
    let mut mark = WriteBatch::new();
    mark.put(KeySpace::Raft, INSTALLING_KEY, meta.write_to_bytes()?);
    let members_record = SnapshotData {
        view_id: 0,
        members: members.to_vec(),
        leases: leases.to_vec(),
    };
    mark.put(
        KeySpace::Raft,
        INSTALLING_MEMBERS_KEY,
        members_record.encode(),
    );
    backend.batch_write(mark, WriteOptions::SYNC)?;
    gate.begin();
    delete_range(backend, KeySpace::Data, ScanRange::all())?;
    // The history before the snapshot is not sent: this node keeps none before it (see `mvcc`).
    delete_range(backend, KeySpace::History, ScanRange::all())?;
    // The leases are the snapshot's; the keys attached to each are found as the data is copied.
    delete_range(backend, KeySpace::Raft, lease_state::all_range())?;
    let (pairs, attached) = copy_staged_to_data(backend, leases)?;
    let mut batch = WriteBatch::new();
    lease_state::install_records(&mut batch, leases, &attached);
    store.snapshot_batch(meta, &mut batch)?;
    for (id, addr) in members {
        state_machine::record_member(&mut batch, *id, addr);
    }
    batch.put(KeySpace::Raft, APPLIED_KEY, meta.index.to_be_bytes());
    crate::raft::mvcc::reset_batch(&mut batch, meta.index);
    batch.delete(KeySpace::Raft, INSTALLING_KEY);
    batch.delete(KeySpace::Raft, INSTALLING_MEMBERS_KEY);
    backend.batch_write(batch, WriteOptions::SYNC)?;
    store.snapshot_installed(meta)?;
    gate.end();
    clear_staging(backend)?;
    tracing::info!(
        index = meta.index,
        term = meta.term,
        pairs,
        members = members.len(),
        "installed a Raft snapshot"
    );
    Ok(pairs)
}

/// Finishes an install a crash interrupted, if any (call before the Raft driver starts). Returns the
/// snapshot index it installed.
///
/// # Errors
/// Storage errors and an undecodable mark.
pub fn resume_install(backend: &dyn StorageBackend, store: &mut LogStore) -> Result<Option<u64>> {
    let Some(bytes) = backend.read(KeySpace::Raft, INSTALLING_KEY)? else {
        return Ok(None);
    };
    let meta = SnapshotMetadata::parse_from_bytes(&bytes)?;
    let (members, leases) = backend
        .read(KeySpace::Raft, INSTALLING_MEMBERS_KEY)?
        .and_then(|b| SnapshotData::decode(&b))
        .map(|d| (d.members, d.leases))
        .unwrap_or_default();
    tracing::warn!(
        index = meta.index,
        "finishing a snapshot install interrupted by a crash"
    );
    install(
        backend,
        store,
        &meta,
        &members,
        &leases,
        &InstallGate::default(),
    )?;
    Ok(Some(meta.index))
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use kiwi_storage::{Limits, MemoryBackend};

    use super::*;

    fn fill(backend: &dyn StorageBackend, n: usize, tag: &str) {
        let mut batch = WriteBatch::new();
        for i in 0..n {
            batch.put(KeySpace::Data, format!("k{i:05}"), format!("{tag}{i}"));
        }
        backend.batch_write(batch, WriteOptions::SYNC).unwrap();
    }

    fn all_data(backend: &dyn StorageBackend) -> Vec<KvPair> {
        backend
            .scan(KeySpace::Data, &Scan::forward(ScanRange::all(), 1_000_000))
            .unwrap()
    }

    #[test]
    fn streams_stages_and_installs_a_snapshot_in_chunks() {
        let leader: Arc<dyn StorageBackend> = Arc::new(MemoryBackend::new(Limits::default()));
        fill(&*leader, 3000, "new");
        let view = leader.snapshot().unwrap();

        let follower: Arc<dyn StorageBackend> = Arc::new(MemoryBackend::new(Limits::default()));
        fill(&*follower, 5000, "old");
        let mut store = LogStore::in_backend(follower.clone(), Arc::default()).unwrap();
        store.bootstrap(vec![1, 2]).unwrap();

        clear_staging(&*follower).unwrap();
        let mut after: Option<Vec<u8>> = None;
        let mut chunks = 0;
        loop {
            let chunk = read_chunk(&*view, after.as_deref()).unwrap();
            let Some(last) = chunk.last() else { break };
            assert!(chunk.len() <= CHUNK_KEYS);
            after = Some(last.key.clone());
            stage(&*follower, chunk).unwrap();
            chunks += 1;
        }
        assert_eq!(chunks, 3);
        // The follower still serves its old data until the install.
        assert_eq!(all_data(&*follower).len(), 5000);

        let mut meta = SnapshotMetadata {
            index: 42,
            term: 3,
            ..SnapshotMetadata::default()
        };
        meta.mut_conf_state().voters = vec![1, 2];
        for (holds, what) in [(None, "incomplete"), (Some((41, 3)), "another snapshot's")] {
            if let Some((i, t)) = holds {
                mark_staged(&*follower, i, t).unwrap();
            }
            let e = install(
                &*follower,
                &mut store,
                &meta,
                &[],
                &[],
                &InstallGate::default(),
            )
            .expect_err(what)
            .to_string();
            assert!(e.contains("index 42 term 3"), "{what}: {e}");
            assert_eq!(all_data(&*follower).len(), 5000, "{what}: nothing changed");
        }
        mark_staged(&*follower, 42, 3).unwrap();
        let members = vec![
            (1, "127.0.0.1:1".to_string()),
            (2, "127.0.0.1:2".to_string()),
        ];
        assert_eq!(
            install(
                &*follower,
                &mut store,
                &meta,
                &members,
                &[],
                &InstallGate::default()
            )
            .unwrap(),
            3000
        );
        assert_eq!(
            crate::raft::state_machine::recorded_members(&*follower).unwrap(),
            members,
            "the members' addresses come with the snapshot"
        );
        assert_eq!(all_data(&*follower), all_data(&*leader));
        assert_eq!(
            crate::raft::state_machine::applied_index(&*follower).unwrap(),
            42
        );
        assert!(
            resume_install(&*follower, &mut store).unwrap().is_none(),
            "the mark is gone"
        );
        let staged = follower
            .scan(
                KeySpace::Raft,
                &Scan::forward(ScanRange::half_open(STAGING_PREFIX, STAGING_END), 10),
            )
            .unwrap();
        assert!(staged.is_empty(), "staging is cleared");
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig {
            cases: 64,
            failure_persistence: None,
            ..proptest::prelude::ProptestConfig::default()
        })]
        /// Arbitrary chunks: a chunk `check_chunk` admits always installs, and the install holds exactly
        /// the staged pairs (the last one of a key wins); a snapshot with a refused chunk is dropped
        /// before the install and the old data stays.
        #[test]
        fn admitted_chunks_always_install_exactly_and_refused_ones_change_nothing(
            chunks in proptest::collection::vec(
                proptest::collection::vec(
                    (
                        proptest::collection::vec(proptest::prelude::any::<u8>(), 0..20),
                        proptest::collection::vec(proptest::prelude::any::<u8>(), 0..40),
                    ),
                    0..6,
                ),
                1..4,
            )
        ) {
            let limits = Limits { max_key_bytes: 16, max_value_bytes: 32 };
            let backend: Arc<dyn StorageBackend> = Arc::new(MemoryBackend::new(limits));
            fill(&*backend, 10, "old");
            let old = all_data(&*backend);
            let mut store = LogStore::in_backend(backend.clone(), Arc::default()).unwrap();
            store.bootstrap(vec![1]).unwrap();
            clear_staging(&*backend).unwrap();
            let mut expected = std::collections::BTreeMap::new();
            let mut refused = false;
            for chunk in chunks {
                let kvs: Vec<KeyValue> = chunk
                    .into_iter()
                    .map(|(key, value)| KeyValue {
                        key,
                        value,
                        ..KeyValue::default()
                    })
                    .collect();
                if let Err(why) = check_chunk(&kvs, limits) {
                    proptest::prop_assert!(why.contains("snapshot pair"), "{why}");
                    refused = true;
                    break;
                }
                for kv in &kvs {
                    expected.insert(kv.key.clone(), kv.value.clone());
                }
                stage(&*backend, kvs).unwrap();
            }
            if refused {
                clear_staging(&*backend).unwrap();
                proptest::prop_assert_eq!(all_data(&*backend), old);
                return Ok(());
            }
            let mut meta = SnapshotMetadata { index: 7, term: 2, ..SnapshotMetadata::default() };
            meta.mut_conf_state().voters = vec![1];
            mark_staged(&*backend, 7, 2).unwrap();
            install(&*backend, &mut store, &meta, &[], &[], &InstallGate::default()).unwrap();
            let got: Vec<(Vec<u8>, Vec<u8>)> = all_data(&*backend).into_iter().collect();
            let want: Vec<(Vec<u8>, Vec<u8>)> = expected.into_iter().collect();
            proptest::prop_assert_eq!(got, want);
        }
    }

    #[test]
    fn an_install_carries_the_leases_and_finds_their_keys_in_the_data() {
        use crate::raft::mvcc::{Counters, encode_stored};
        let backend: Arc<dyn StorageBackend> = Arc::new(MemoryBackend::new(Limits::default()));
        // The follower had a lease of its own, which the snapshot does not hold.
        let mut old = WriteBatch::new();
        lease_state::install_records(&mut old, &[(99, 5)], &Default::default());
        old.put(
            KeySpace::Raft,
            lease_state::index_key(99, b"gone"),
            Vec::new(),
        );
        backend.batch_write(old, WriteOptions::SYNC).unwrap();
        let mut store = LogStore::in_backend(backend.clone(), Arc::default()).unwrap();
        store.bootstrap(vec![1]).unwrap();
        clear_staging(&*backend).unwrap();
        let leased = |lease| {
            encode_stored(
                Counters {
                    lease,
                    ..Counters::default()
                },
                b"v",
            )
        };
        let kv = |k: &[u8], lease| KeyValue {
            key: k.to_vec(),
            value: leased(lease),
            ..KeyValue::default()
        };
        stage(
            &*backend,
            vec![kv(b"a", 7), kv(b"b", 0), kv(b"c", 7), kv(b"d", 8)],
        )
        .unwrap();
        let mut meta = SnapshotMetadata {
            index: 9,
            term: 2,
            ..SnapshotMetadata::default()
        };
        meta.mut_conf_state().voters = vec![1];
        mark_staged(&*backend, 9, 2).unwrap();
        install(
            &*backend,
            &mut store,
            &meta,
            &[],
            &[(7, 10), (8, 20)],
            &InstallGate::default(),
        )
        .unwrap();
        let leases = lease_state::all(&*backend).unwrap();
        assert_eq!(
            leases,
            vec![
                (7, lease_state::Record { ttl: 10, keys: 2 }),
                (8, lease_state::Record { ttl: 20, keys: 1 })
            ]
        );
        assert_eq!(lease_state::count(&*backend).unwrap(), 2);
        assert_eq!(
            lease_state::keys(&*backend, 7, 10).unwrap(),
            vec![b"a".to_vec(), b"c".to_vec()]
        );
        assert!(lease_state::keys(&*backend, 99, 10).unwrap().is_empty());
    }

    #[test]
    fn a_read_overlapping_an_install_is_refused() {
        let gate = InstallGate::default();
        assert_eq!(gate.read(|| 1), Some(1), "no install: answered");
        assert_eq!(
            gate.read(|| {
                gate.begin();
                2
            }),
            None,
            "an install started during the read"
        );
        assert_eq!(gate.read(|| 3), None, "an install is under way");
        gate.end();
        assert_eq!(
            gate.read(|| {
                gate.begin();
                gate.end();
                4
            }),
            None,
            "a whole install ran during the read"
        );
        assert_eq!(gate.read(|| 5), Some(5), "after the install: answered");
    }

    #[test]
    fn an_interrupted_install_is_finished_on_restart() {
        let follower: Arc<dyn StorageBackend> = Arc::new(MemoryBackend::new(Limits::default()));
        fill(&*follower, 10, "old");
        let mut store = LogStore::in_backend(follower.clone(), Arc::default()).unwrap();
        store.bootstrap(vec![1]).unwrap();
        stage(
            &*follower,
            vec![KeyValue {
                key: b"fresh".to_vec(),
                value: b"1".to_vec(),
                ..KeyValue::default()
            }],
        )
        .unwrap();
        mark_staged(&*follower, 7, 2).unwrap();
        let mut meta = SnapshotMetadata {
            index: 7,
            term: 2,
            ..SnapshotMetadata::default()
        };
        meta.mut_conf_state().voters = vec![1];
        // Crash right after step 1.
        follower
            .write(
                KeySpace::Raft,
                INSTALLING_KEY,
                &meta.write_to_bytes().unwrap(),
                WriteOptions::SYNC,
            )
            .unwrap();
        let mut store = LogStore::in_backend(follower.clone(), Arc::default()).unwrap();
        assert_eq!(resume_install(&*follower, &mut store).unwrap(), Some(7));
        assert_eq!(
            all_data(&*follower),
            vec![(b"fresh".to_vec(), b"1".to_vec())]
        );
        assert_eq!(
            crate::raft::state_machine::applied_index(&*follower).unwrap(),
            7
        );
        assert_eq!(raft::Storage::first_index(&store).unwrap(), 8);
    }
}
