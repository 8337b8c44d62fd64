//! The node's identity, recorded in its data directory the first time it starts.
//!
//! A node started on a data directory written by another node would replay that node's Raft log under
//! the wrong id and corrupt the group, so [`check_node_id`] refuses it.
//!
//! The directory also remembers the cluster it belongs to ([`cluster_id`]): founding members derive it
//! from the initial membership (so they agree without talking), a joining node adopts its cluster's id
//! from the first snapshot it receives. Nodes refuse Raft traffic from another cluster.

use std::path::Path;

use kiwi_storage::{KeySpace, StorageBackend, WriteOptions};

use crate::{Error, Result};

/// Key, in [`KeySpace::Raft`], of the node id (8 bytes, big-endian).
pub const NODE_ID_KEY: &[u8] = b"identity/node_id";

/// Records `node_id` in a fresh store (durably), or checks that the store's recorded id is `node_id`.
///
/// # Errors
/// [`Error::NodeIdMismatch`], [`Error::IdentityCorrupt`] and storage errors.
pub fn check_node_id(storage: &dyn StorageBackend, node_id: u64, data_dir: &Path) -> Result<()> {
    match storage.read(KeySpace::Raft, NODE_ID_KEY)? {
        Some(bytes) => {
            let stored: [u8; 8] =
                bytes
                    .as_slice()
                    .try_into()
                    .map_err(|_| Error::IdentityCorrupt {
                        data_dir: data_dir.to_path_buf(),
                        len: bytes.len(),
                    })?;
            let stored = u64::from_be_bytes(stored);
            if stored != node_id {
                return Err(Error::NodeIdMismatch {
                    data_dir: data_dir.to_path_buf(),
                    stored,
                    configured: node_id,
                });
            }
            Ok(())
        }
        None => {
            storage.write(
                KeySpace::Raft,
                NODE_ID_KEY,
                &node_id.to_be_bytes(),
                WriteOptions::SYNC,
            )?;
            Ok(())
        }
    }
}

/// Key, in [`KeySpace::Raft`], of the cluster id (8 bytes, big-endian).
pub const CLUSTER_ID_KEY: &[u8] = b"identity/cluster_id";

/// The recorded cluster id, 0 if none yet (a joining node before its first snapshot).
///
/// # Errors
/// Storage errors; a damaged record (not 8 bytes, or 0), which must not pass for "not joined yet".
pub fn cluster_id(storage: &dyn StorageBackend) -> kiwi_storage::Result<u64> {
    match storage.read(KeySpace::Raft, CLUSTER_ID_KEY)? {
        None => Ok(0),
        Some(b) => <[u8; 8]>::try_from(b.as_slice())
            .ok()
            .map(u64::from_be_bytes)
            .filter(|id| *id != 0)
            .ok_or_else(|| kiwi_storage::Error::Engine {
                backend: storage.kind(),
                detail: format!(
                    "the data directory's cluster id record is damaged ({} bytes, expected a \
                     non-zero 8-byte id): restore the directory from a backup or wipe it and re-add \
                     the node",
                    b.len()
                ),
            }),
    }
}

/// Durably records the cluster id.
///
/// # Errors
/// Storage errors.
pub fn record_cluster_id(storage: &dyn StorageBackend, id: u64) -> kiwi_storage::Result<()> {
    storage.write(
        KeySpace::Raft,
        CLUSTER_ID_KEY,
        &id.to_be_bytes(),
        WriteOptions::SYNC,
    )
}

/// The cluster id founding members derive from the initial membership: FNV-1a over the sorted
/// `id=addr` pairs of member ids and client addresses (a Raft port given later does not change it),
/// never 0.
pub fn derive_cluster_id(members: &[(u64, String)]) -> u64 {
    let mut sorted: Vec<_> = members
        .iter()
        .map(|(id, record)| format!("{id}={};", crate::config::record_client_addr(record)))
        .collect();
    sorted.sort();
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in sorted.concat().bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h.max(1)
}

#[cfg(test)]
mod tests {
    use kiwi_storage::{Limits, MemoryBackend};

    use super::*;

    #[test]
    fn first_start_records_then_checks() {
        let s = MemoryBackend::new(Limits::default());
        check_node_id(&s, 3, Path::new("d")).unwrap();
        check_node_id(&s, 3, Path::new("d")).unwrap();
        let err = check_node_id(&s, 4, Path::new("d")).unwrap_err();
        assert!(
            matches!(
                err,
                Error::NodeIdMismatch {
                    stored: 3,
                    configured: 4,
                    ..
                }
            ),
            "{err}"
        );
    }

    proptest::proptest! {
        /// Whatever bytes the identity records hold, reading them never panics, accepts only a
        /// well-formed record, and a refused check writes nothing.
        #[test]
        fn any_identity_record_is_checked_without_panic(
            bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..20),
            node_id in 1u64..5,
        ) {
            let s = MemoryBackend::new(Limits::default());
            s.write(KeySpace::Raft, NODE_ID_KEY, &bytes, WriteOptions::SYNC).unwrap();
            s.write(KeySpace::Raft, CLUSTER_ID_KEY, &bytes, WriteOptions::SYNC).unwrap();
            let well_formed = bytes.len() == 8;
            match check_node_id(&s, node_id, Path::new("d")) {
                Ok(()) => proptest::prop_assert_eq!(&bytes[..], &node_id.to_be_bytes()[..]),
                Err(_) => {
                    let kept = s.read(KeySpace::Raft, NODE_ID_KEY).unwrap();
                    proptest::prop_assert_eq!(kept.as_deref(), Some(&bytes[..]));
                }
            }
            match cluster_id(&s) {
                Ok(id) => proptest::prop_assert!(well_formed && id != 0),
                Err(_) => proptest::prop_assert!(!well_formed || bytes == [0; 8]),
            }
        }
    }

    #[test]
    fn damaged_record_is_reported() {
        let s = MemoryBackend::new(Limits::default());
        s.write(KeySpace::Raft, NODE_ID_KEY, b"xyz", WriteOptions::SYNC)
            .unwrap();
        let err = check_node_id(&s, 1, Path::new("d")).unwrap_err();
        assert!(
            matches!(err, Error::IdentityCorrupt { len: 3, .. }),
            "{err}"
        );
    }

    #[test]
    fn cluster_id_is_derived_from_membership_and_recorded() {
        let a = derive_cluster_id(&[(1, "h:1".into()), (2, "h:2".into())]);
        let b = derive_cluster_id(&[(2, "h:2".into()), (1, "h:1".into())]);
        assert_eq!(a, b, "order does not matter");
        assert_ne!(
            a,
            derive_cluster_id(&[(1, "h:1".into()), (3, "h:3".into())])
        );
        let s = MemoryBackend::new(Limits::default());
        assert_eq!(cluster_id(&s).unwrap(), 0);
        record_cluster_id(&s, a).unwrap();
        assert_eq!(cluster_id(&s).unwrap(), a);
    }
}
