//! The lockers of `kiwi chaos`: mutual exclusion with a lease-backed [`Mutex`] through the faults.
//!
//! Each locker loops: take the lock `P~lockers/lock` (a [`Session`] with a 2 s TTL), read the counter `P~lockers/counter`,
//! write the counter + 1 in a transaction fenced by the lock (it writes only if the locker's lock key
//! still has the `create_revision` it got the lock with), unlock. Now and then a locker abandons its
//! session while it holds the lock, as a crashed holder would: the lock must pass on once the lease
//! expires. Every write carries a unique value, so a read names the section that wrote it.
//!
//! The check ([`check`]): no two sections that completed read the same counter value (two holders at
//! once would: a lost update), each wrote what it read + 1, and the final counter is the initial one plus
//! the completed sections (plus at most the sections whose write had an unknown outcome).

use std::sync::{Arc, Mutex as StdMutex};
use std::time::{Duration, Instant};

use kiwi_client::concurrency::{Mutex, Session};
use kiwi_client::{CallOptions, Client, Compare, Error, TxnOp, compare, txn_op};
use rand::{Rng, SeedableRng};

/// TTL of each locker's session.
const TTL_SECS: i64 = 2;

/// One critical section whose write was applied (or may have been).
#[derive(Debug, Clone, serde::Serialize)]
pub struct Section {
    pub locker: usize,
    /// The counter it read, and wrote (read + 1).
    pub read: u64,
    /// The revision of its write (0: outcome unknown).
    pub revision: u64,
}

/// The counter's key: beside the run's prefix, not under it (the watchers follow that one).
pub fn counter_key(prefix: &str) -> String {
    format!("{prefix}~lockers/counter")
}

/// The counter a value carries (`N@WRITER`).
pub fn counter(value: Option<&[u8]>) -> u64 {
    value
        .and_then(|v| std::str::from_utf8(v).ok())
        .and_then(|v| v.split('@').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

/// What the lockers did.
#[derive(Default)]
pub struct Record {
    pub sections: StdMutex<Vec<Section>>,
    /// Sessions abandoned while holding the lock.
    pub abandoned: StdMutex<u64>,
}

/// One locker, until `until`.
pub async fn locker_loop(
    client: Arc<Client>,
    id: usize,
    prefix: String,
    until: Instant,
    record: Arc<Record>,
    seed: u64,
) {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed.wrapping_mul(97).wrapping_add(id as u64));
    let counter_key = counter_key(&prefix);
    let lock = format!("{prefix}~lockers/lock");
    let opts = CallOptions {
        timeout: Some(Duration::from_secs(2)),
        ..CallOptions::default()
    };
    let mut seq = 0u64;
    while Instant::now() < until {
        let Ok(session) = Session::new(Arc::clone(&client), TTL_SECS).await else {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        let mut abandoned = false;
        while Instant::now() < until && session.is_lost().is_none() {
            let mut mutex = Mutex::new(&session, &lock);
            let left = until.saturating_duration_since(Instant::now());
            match tokio::time::timeout(left, mutex.lock()).await {
                Ok(Ok(())) => {}
                _ => break,
            }
            let read = match client.get(counter_key.as_bytes(), &opts).await {
                Ok(v) => counter(v.as_deref()),
                Err(_) => {
                    let _ = mutex.unlock().await;
                    continue;
                }
            };
            seq += 1;
            let value = format!("{}@l{id}-{seq}", read + 1);
            let fence = Compare {
                result: compare::CompareResult::Equal as i32,
                target: compare::CompareTarget::Create as i32,
                key: mutex.key().as_bytes().to_vec(),
                target_union: Some(compare::TargetUnion::CreateRevision(mutex.revision())),
                range_end: Vec::new(),
            };
            let put = TxnOp {
                op: Some(txn_op::Op::Put(txn_op::Put {
                    key: counter_key.as_bytes().to_vec(),
                    value: value.clone().into_bytes(),
                    prev_kv: false,
                    lease: 0,
                })),
            };
            match client.txn(vec![fence], vec![put], Vec::new(), &opts).await {
                Ok(t) if t.succeeded => record
                    .sections
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .push(Section {
                        locker: id,
                        read,
                        revision: t.header.map_or(0, |h| h.revision),
                    }),
                // The lock was lost before the write (the fence held it off): nothing written.
                Ok(_) | Err(Error::InvalidArgument(_)) => {}
                Err(_) => record
                    .sections
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .push(Section {
                        locker: id,
                        read,
                        revision: 0,
                    }),
            }
            if rng.random_range(0..8) == 0 {
                // A crash while holding the lock: no unlock, no revocation.
                abandoned = true;
                break;
            }
            let _ = mutex.unlock().await;
        }
        if abandoned {
            *record
                .abandoned
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner) += 1;
            session.abandon();
        } else {
            let _ = session.close().await;
        }
    }
}

/// Checks the sections against the counter's initial and final values.
pub fn check(sections: &[Section], initial: u64, last: u64) -> Result<(), String> {
    let mut done: Vec<&Section> = sections.iter().filter(|s| s.revision != 0).collect();
    let unknown = sections.len() - done.len();
    done.sort_by_key(|s| s.revision);
    let mut reads = std::collections::HashSet::new();
    for s in &done {
        if !reads.insert(s.read) {
            return Err(format!(
                "two completed critical sections read the counter at {}: they overlapped ({:?})",
                s.read,
                done.iter().filter(|o| o.read == s.read).collect::<Vec<_>>()
            ));
        }
    }
    if let Some(w) = done.windows(2).find(|w| w[1].read <= w[0].read) {
        return Err(format!(
            "critical sections out of order: {:?} then {:?}",
            w[0], w[1]
        ));
    }
    let grew = last.saturating_sub(initial);
    let completed = done.len() as u64;
    if last < initial || grew < completed || grew > completed + unknown as u64 {
        return Err(format!(
            "the counter went from {initial} to {last}, but {completed} critical sections completed \
             (and {unknown} had an unknown outcome)"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(read: u64, revision: u64) -> Section {
        Section {
            locker: 0,
            read,
            revision,
        }
    }

    #[test]
    fn overlapping_sections_and_lost_increments_are_caught() {
        assert_eq!(check(&[s(0, 5), s(1, 9), s(2, 12)], 0, 3), Ok(()));
        // An unknown write that took effect (or not).
        assert_eq!(check(&[s(0, 5), s(1, 0), s(2, 12)], 0, 3), Ok(()));
        assert_eq!(check(&[s(0, 5), s(1, 0)], 0, 1), Ok(()));
        assert!(
            check(&[s(0, 5), s(0, 9)], 0, 1)
                .unwrap_err()
                .contains("overlapped")
        );
        assert!(
            check(&[s(0, 5), s(1, 9)], 0, 1)
                .unwrap_err()
                .contains("went from")
        );
        assert!(
            check(&[s(1, 5), s(0, 9)], 0, 2)
                .unwrap_err()
                .contains("out of order")
        );
        assert_eq!(counter(Some(b"41@l0-3")), 41);
        assert_eq!(counter(None), 0);
    }
}
