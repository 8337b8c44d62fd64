//! The node's identity, recorded in its data directory the first time it starts.
//!
//! A node started on a data directory written by another node would replay that node's Raft log under
//! the wrong id and corrupt the group, so [`check_node_id`] refuses it.

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
}
