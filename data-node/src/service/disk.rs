//! The low-disk guard (`[storage] min_free_bytes`): while the filesystem of the data directory has less
//! than that free, writes that add data are refused before they are proposed, with RESOURCE_EXHAUSTED
//! naming the key and the space left, so that the disk never fills under the node (a full disk would stop
//! the Raft log and the engine mid-write). Deletes, range deletes, compaction and defragmentation go on:
//! they are how space is made again.
//!
//! Unlike etcd's NOSPACE alarm (a replicated state that stops every member's writes until an operator
//! disarms it), each node judges its own disk, once a second, and lifts the refusal by itself when space
//! is back; the leader's judgement decides for the writes it is asked to propose.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio_util::sync::CancellationToken;

/// How often the free space is read.
const CHECK_EVERY: Duration = Duration::from_secs(1);

/// The free space of the data directory's filesystem, as last read, against the threshold.
#[derive(Debug)]
pub struct DiskGuard {
    dir: PathBuf,
    min_free: u64,
    /// Bytes free when last read (`u64::MAX` until the first reading, or when it cannot be read).
    free: AtomicU64,
}

impl DiskGuard {
    /// A guard for `dir` (the storage directory) refusing below `min_free` bytes (0: never).
    pub fn new(dir: PathBuf, min_free: u64) -> Arc<DiskGuard> {
        let guard = Arc::new(DiskGuard {
            dir,
            min_free,
            free: AtomicU64::new(u64::MAX),
        });
        guard.check();
        guard
    }

    /// Reads the free space every second until `stop`.
    pub fn spawn(self: &Arc<Self>, stop: CancellationToken) {
        if self.min_free == 0 {
            return;
        }
        let guard = Arc::clone(self);
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    () = stop.cancelled() => return,
                    () = tokio::time::sleep(CHECK_EVERY) => {}
                }
                let g = Arc::clone(&guard);
                let _ = tokio::task::spawn_blocking(move || g.check()).await;
            }
        });
    }

    /// Reads the free space now; logs when the refusal starts or ends.
    fn check(&self) {
        let free = free_bytes(&self.dir).unwrap_or(u64::MAX);
        let before = self.free.swap(free, Ordering::Relaxed);
        let (was, is) = (before < self.min_free, free < self.min_free);
        if is && !was {
            tracing::warn!(
                free_bytes = free,
                min_free_bytes = self.min_free,
                dir = %self.dir.display(),
                "the disk is nearly full: refusing writes that add data until space is freed"
            );
        } else if was && !is {
            tracing::info!(
                free_bytes = free,
                "disk space is back: writes accepted again"
            );
        }
    }

    /// Refuses a write of `key` while the disk is low: the message says why and what still works.
    ///
    /// # Errors
    /// The refusal, for RESOURCE_EXHAUSTED.
    pub fn admit(&self, key: &[u8]) -> Result<(), String> {
        let free = self.free.load(Ordering::Relaxed);
        if self.min_free == 0 || free >= self.min_free {
            return Ok(());
        }
        Err(format!(
            "refusing the write of key {:?}: the disk of this node's data directory ({}) has {} free, \
             below [storage] min_free_bytes = {}; free space (delete keys, `kiwi compact` the history, \
             `kiwi defrag`) or give the disk more room",
            String::from_utf8_lossy(&key[..key.len().min(64)]),
            self.dir.display(),
            bytesize::ByteSize(free),
            bytesize::ByteSize(self.min_free)
        ))
    }
}

/// Bytes available to unprivileged writers on the filesystem holding `dir` (its nearest existing
/// ancestor).
fn free_bytes(dir: &Path) -> Option<u64> {
    let dir = dir.ancestors().find(|d| d.exists())?;
    let c = std::ffi::CString::new(dir.as_os_str().as_encoded_bytes()).ok()?;
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: `c` is a NUL-terminated path and `st` a valid statvfs to fill.
    if unsafe { libc::statvfs(c.as_ptr(), &raw mut st) } != 0 {
        return None;
    }
    Some(st.f_bavail.saturating_mul(st.f_frsize))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_are_refused_below_the_threshold_and_admitted_above() {
        let dir = tempfile::tempdir().unwrap();
        let free = free_bytes(dir.path()).unwrap();
        assert!(free > 0);
        let roomy = DiskGuard::new(dir.path().join("storage"), 1);
        roomy.admit(b"k").unwrap();
        let never = DiskGuard::new(dir.path().to_path_buf(), 0);
        never.admit(b"k").unwrap();
        let tight = DiskGuard::new(dir.path().to_path_buf(), u64::MAX - 1);
        let e = tight.admit(b"user/42").unwrap_err();
        assert!(e.contains("user/42") && e.contains("min_free_bytes"), "{e}");
    }
}
