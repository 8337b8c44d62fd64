//! Backups of the state machine (the file format is `kiwi_proto::backup`): writing one from a
//! point-in-time view of this node, and restoring one into the empty data directory of a new cluster's
//! member.
//!
//! A backup holds what a Raft snapshot holds (the user data with each key's revisions and lease, and
//! the leases), not the history before it: like a member that caught up by snapshot, a restored cluster
//! keeps history from the backup's index on.
//!
//! **Restore** makes the data directory look like that of a member that has just installed a Raft
//! snapshot at the backup's index, in a group whose members are the ones the node's configuration
//! lists: it stages the file's pairs and runs the same install as a Raft snapshot (`snapshot::install`,
//! crash-safe: an interrupted restore is finished by the next start, or the directory wiped and the
//! restore run again). Every member of the new cluster is restored from the same file with the same
//! member list, so their logs agree at the backup's index and they elect a leader as a founded cluster
//! does. The cluster id is new (derived from the members and the file's checksum, so the members agree
//! without talking and the restored cluster is never taken for the source), as `etcdctl snapshot
//! restore` makes a new cluster.

use std::path::Path;

use kiwi_proto::backup::{self, Summary, Writer};
use kiwi_proto::v1::{BackupHeader, BackupLease, BackupMember, KeyValue};
use kiwi_storage::{KeySpace, StorageSnapshot};
use raft::eraftpb::{ConfState, SnapshotMetadata};

use crate::raft::log_store::SnapshotRegistry;
use crate::raft::{lease_state, mvcc, snapshot, state_machine};

type Result<T> = std::result::Result<T, Box<dyn std::error::Error + Send + Sync>>;

/// The header of a backup of `view` (its applied index, leases and members); the caller fills in the
/// cluster id, node id and term.
///
/// # Errors
/// Storage errors.
pub fn header(view: &(dyn StorageSnapshot + 'static)) -> kiwi_storage::Result<BackupHeader> {
    let index = view
        .read(KeySpace::Raft, state_machine::APPLIED_KEY)?
        .and_then(|v| <[u8; 8]>::try_from(v.as_slice()).ok())
        .map_or(0, u64::from_be_bytes);
    let leases = lease_state::all(view)?
        .into_iter()
        .map(|(id, r)| BackupLease { id, ttl: r.ttl })
        .collect();
    let members = state_machine::recorded_members_in(view)?
        .into_iter()
        .map(|(id, addr)| BackupMember { id, addr })
        .collect();
    let created_unix_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX));
    Ok(BackupHeader {
        index,
        compact_revision: mvcc::compacted(view)?,
        created_unix_ms,
        members,
        leases,
        ..BackupHeader::default()
    })
}

/// Writes the backup of `view` as a sequence of byte pieces (a chunk of keys each, about
/// `snapshot::CHUNK_BYTES`), handing each to `send` as it is read; stops early when `send` returns
/// false (the receiver went away). Returns the keys written.
///
/// # Errors
/// Storage errors.
pub fn write(
    view: &dyn StorageSnapshot,
    header: &BackupHeader,
    mut send: impl FnMut(Vec<u8>) -> bool,
) -> kiwi_storage::Result<u64> {
    let (mut w, start) = Writer::start(header);
    if !send(start) {
        return Ok(0);
    }
    let mut after: Option<Vec<u8>> = None;
    let mut keys = 0;
    loop {
        let chunk = snapshot::read_chunk(view, after.as_deref())?;
        let Some(last) = chunk.last() else {
            break;
        };
        after = Some(last.key.clone());
        keys += chunk.len() as u64;
        let kvs = chunk
            .into_iter()
            .map(|kv| mvcc::to_kv(kv.key, kv.value, false))
            .collect();
        if !send(w.chunk(kvs)) {
            return Ok(keys);
        }
    }
    send(w.finish());
    Ok(keys)
}

/// What [`restore`] did.
#[derive(Debug)]
pub struct Restored {
    pub summary: Summary,
    pub cluster_id: u64,
}

/// Restores the backup at `file` into the data directory `config` names (which must not hold a node's
/// data yet), as a member of a new cluster of the configured members. The file is checked whole before
/// anything is written; `progress` hears the keys installed so far.
///
/// # Errors
/// A damaged or truncated file (nothing written), a data directory in use, a configuration that does
/// not list this node among its members, storage errors.
pub fn restore(
    config: &crate::config::NodeConfig,
    file: &Path,
    mut progress: impl FnMut(&str, u64),
) -> Result<Restored> {
    let open = || {
        std::fs::File::open(file)
            .map(std::io::BufReader::new)
            .map_err(|e| format!("cannot open the backup {}: {e}", file.display()))
    };
    let summary = backup::verify(open()?, |keys| progress("checked", keys))
        .map_err(|e| format!("{}: {e}; nothing was restored", file.display()))?;
    if config.raft.join {
        return Err("a restored member founds a new cluster: set raft.join = false".into());
    }
    let members = crate::configured_members(config);
    if !members.iter().any(|(id, _)| *id == config.raft.node_id) {
        return Err(format!(
            "raft.peers does not list this node (id {}): list every member of the new cluster, \
             this one included",
            config.raft.node_id
        )
        .into());
    }
    let log_dir = crate::raft::log_store::engine_log::dir(&config.data_dir);
    for dir in [config.storage_dir(), log_dir] {
        if std::fs::read_dir(&dir).is_ok_and(|mut d| d.next().is_some()) {
            return Err(format!(
                "{} already holds a node's data: restore into an empty data directory (wipe it, or \
                 choose another data_dir)",
                dir.display()
            )
            .into());
        }
    }

    let storage = crate::open_storage(config)?;
    let mut store = crate::open_log_store(
        config,
        &storage,
        None,
        std::sync::Arc::new(SnapshotRegistry::default()),
    )?;
    let mut reader = backup::Reader::open(open()?)?;
    snapshot::clear_staging(&*storage)?;
    let mut staged = 0u64;
    while let Some(chunk) = reader.next_chunk().map_err(|e| {
        // The file changed since it was checked.
        format!(
            "{}: {e}; wipe {} and restore again",
            file.display(),
            config.data_dir.display()
        )
    })? {
        staged += chunk.kvs.len() as u64;
        let kvs = chunk.kvs.into_iter().map(stored).collect();
        snapshot::stage(&*storage, kvs)?;
        progress("staged", staged);
    }
    let header = reader.header().clone();
    let sha = reader.checksum().unwrap_or_default().to_string();
    // Term 0 would be below every vote; a backup always has one, but never write it.
    let term = header.term.max(1);
    snapshot::mark_staged(&*storage, header.index, term)?;

    let cluster_id = restored_cluster_id(&members, &sha);
    crate::identity::record_cluster_id(&*storage, cluster_id)?;
    let mut meta = SnapshotMetadata {
        index: header.index,
        term,
        ..SnapshotMetadata::default()
    };
    meta.set_conf_state(ConfState {
        voters: members.iter().map(|(id, _)| *id).collect(),
        ..ConfState::default()
    });
    let leases: Vec<(u64, i64)> = header.leases.iter().map(|l| (l.id, l.ttl)).collect();
    snapshot::install(
        &*storage,
        &mut store,
        &meta,
        &members,
        &leases,
        &snapshot::InstallGate::default(),
    )?;
    Ok(Restored {
        summary,
        cluster_id,
    })
}

/// A stored pair (the value behind its counters header) from a backup's key.
fn stored(kv: KeyValue) -> KeyValue {
    let counters = mvcc::Counters {
        create_revision: kv.create_revision,
        mod_revision: kv.mod_revision,
        version: kv.version,
        lease: kv.lease,
    };
    KeyValue {
        value: mvcc::encode_stored(counters, &kv.value),
        key: kv.key,
        ..KeyValue::default()
    }
}

/// The new cluster's id: the id founding members derive, mixed with the backup's checksum.
fn restored_cluster_id(members: &[(u64, String)], sha256_hex: &str) -> u64 {
    let mut h = crate::identity::derive_cluster_id(members);
    for b in sha256_hex.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h.max(1)
}
