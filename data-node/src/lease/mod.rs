//! The leader's clock for clients' leases.
//!
//! Lease records (id, granted TTL, attached keys) are replicated state (`raft::lease_state`). *When* a
//! lease expires is not: only the leader decides it, by its own monotonic clock, and acts on it by
//! proposing the lease's revocation through Raft, so every replica deletes the keys at the same revision
//! and no replica ever deletes a key by reading its own clock.
//!
//! The rules, as etcd's lessor has them:
//! - A leader gives every lease a full TTL from when it starts leading (its first sweep in the term), so
//!   a lease kept alive until the old leader died survives the election, and a restart of the whole
//!   cluster likewise.
//! - A keepalive, answered only by a leader that has confirmed its leadership, refreshes the lease to its
//!   full TTL from now.
//! - A lease whose deadline passed is revoked by a proposal; if it is still there a while later (the
//!   proposal was lost in a leader change) it is proposed again.
//! - A TTL is never below a floor of one and a half election timeouts (at least 1 s), so a lease cannot
//!   run out while the cluster elects a leader.
//!
//! [`LeaseTable`] is the clock's state, with `now` passed in (unit-tested without sleeping); the service
//! layer runs the sweep and answers keepalives.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// How long after proposing a revocation the leader proposes it again if the lease is still there.
pub const REVOKE_RETRY: Duration = Duration::from_secs(2);
/// Most revocations one sweep proposes (the rest wait for the next sweep).
pub const REVOKES_PER_SWEEP: usize = 256;

/// The smallest TTL (seconds) a lease is granted: one and a half election timeouts, rounded up, and at
/// least 1 s (etcd's rule).
pub fn min_ttl(election_timeout: Duration) -> i64 {
    let ms = election_timeout.as_millis().saturating_mul(3) / 2;
    i64::try_from(ms.div_ceil(1000)).unwrap_or(i64::MAX).max(1)
}

fn ttl_duration(ttl: i64) -> Duration {
    Duration::from_secs(u64::try_from(ttl).unwrap_or(0))
}

/// The leader's deadlines.
#[derive(Debug, Default)]
pub struct LeaseTable {
    inner: Mutex<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    /// The term this node leads in (`None`: it does not lead; no deadlines).
    term: Option<u64>,
    deadlines: HashMap<u64, Instant>,
    /// Revocations proposed, and when.
    revoking: HashMap<u64, Instant>,
}

impl Inner {
    /// Starts a new term's deadlines (or none) when the leadership changed.
    fn lead(&mut self, term: Option<u64>) {
        if self.term != term {
            self.term = term;
            self.deadlines.clear();
            self.revoking.clear();
        }
    }
}

impl LeaseTable {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// One sweep: `term` is the term this node leads in (`None`: it does not lead), `leases` every lease
    /// the applied state holds (id, granted TTL). A lease not seen before in this term gets a full TTL
    /// from `now`. Returns the leases to revoke (expired and not proposed recently), at most
    /// [`REVOKES_PER_SWEEP`].
    pub fn sweep(&self, term: Option<u64>, now: Instant, leases: &[(u64, i64)]) -> Vec<u64> {
        let mut inner = self.lock();
        inner.lead(term);
        if term.is_none() {
            return Vec::new();
        }
        let live: std::collections::HashSet<u64> = leases.iter().map(|(id, _)| *id).collect();
        inner.deadlines.retain(|id, _| live.contains(id));
        inner.revoking.retain(|id, _| live.contains(id));
        for &(id, ttl) in leases {
            inner
                .deadlines
                .entry(id)
                .or_insert_with(|| now + ttl_duration(ttl));
        }
        let mut expired: Vec<(Instant, u64)> = inner
            .deadlines
            .iter()
            .filter(|(_, d)| **d <= now)
            .map(|(id, d)| (*d, *id))
            .filter(|(_, id)| {
                inner
                    .revoking
                    .get(id)
                    .is_none_or(|at| now.duration_since(*at) >= REVOKE_RETRY)
            })
            .collect();
        // The longest expired first.
        expired.sort_unstable();
        expired.truncate(REVOKES_PER_SWEEP);
        for (_, id) in &expired {
            inner.revoking.insert(*id, now);
        }
        expired.into_iter().map(|(_, id)| id).collect()
    }

    /// Refreshes lease `id` (granted `ttl` seconds) to a full TTL from `now`, by the leader of `term`.
    pub fn renew(&self, term: u64, now: Instant, id: u64, ttl: i64) {
        let mut inner = self.lock();
        inner.lead(Some(term));
        inner.deadlines.insert(id, now + ttl_duration(ttl));
        inner.revoking.remove(&id);
    }

    /// What is left of lease `id` (granted `ttl` seconds) by the clock of the leader of `term`: a full TTL
    /// when it has no deadline yet.
    pub fn remaining(&self, term: u64, now: Instant, id: u64, ttl: i64) -> Duration {
        let mut inner = self.lock();
        inner.lead(Some(term));
        match inner.deadlines.get(&id) {
            Some(d) => d.saturating_duration_since(now),
            None => ttl_duration(ttl),
        }
    }

    /// Leases with a deadline (on the leader).
    pub fn tracked(&self) -> usize {
        self.lock().deadlines.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: Duration = Duration::from_secs(1);

    #[test]
    fn the_ttl_floor_is_one_and_a_half_election_timeouts() {
        assert_eq!(min_ttl(Duration::from_millis(500)), 1);
        assert_eq!(min_ttl(Duration::from_millis(1000)), 2);
        assert_eq!(min_ttl(Duration::from_millis(2000)), 3);
        assert_eq!(min_ttl(Duration::ZERO), 1);
    }

    #[test]
    fn leases_expire_in_deadline_order_only_on_the_leader() {
        let t = LeaseTable::default();
        let t0 = Instant::now();
        let leases = [(1, 5), (2, 3), (3, 10)];
        // A follower tracks nothing.
        assert!(t.sweep(None, t0, &leases).is_empty());
        assert_eq!(t.tracked(), 0);
        // The leader gives each a full TTL from its first sweep.
        assert!(t.sweep(Some(4), t0, &leases).is_empty());
        assert!(t.sweep(Some(4), t0 + 2 * S, &leases).is_empty());
        assert_eq!(t.sweep(Some(4), t0 + 3 * S, &leases), vec![2]);
        // Proposed once; not again before the retry interval.
        assert!(t.sweep(Some(4), t0 + 3 * S, &leases).is_empty());
        // Both overdue: the longest expired first, then the retry of 2 comes with it.
        let due = t.sweep(Some(4), t0 + 11 * S, &leases);
        assert_eq!(due, vec![2, 1, 3]);
        // Revoked leases leave the applied state: forgotten.
        assert!(t.sweep(Some(4), t0 + 20 * S, &[]).is_empty());
        assert_eq!(t.tracked(), 0);
    }

    #[test]
    fn a_keepalive_refreshes_to_a_full_ttl() {
        let t = LeaseTable::default();
        let t0 = Instant::now();
        let leases = [(7, 4)];
        t.sweep(Some(2), t0, &leases);
        t.renew(2, t0 + 3 * S, 7, 4);
        assert_eq!(t.remaining(2, t0 + 3 * S, 7, 4), 4 * S);
        assert!(t.sweep(Some(2), t0 + 5 * S, &leases).is_empty());
        assert_eq!(t.sweep(Some(2), t0 + 7 * S, &leases), vec![7]);
        // A keepalive after the revocation was proposed takes it back (if the lease is still there).
        t.renew(2, t0 + 7 * S, 7, 4);
        assert!(t.sweep(Some(2), t0 + 10 * S, &leases).is_empty());
    }

    #[test]
    fn a_new_leader_restarts_every_ttl() {
        let t = LeaseTable::default();
        let t0 = Instant::now();
        let leases = [(1, 5)];
        t.sweep(Some(1), t0, &leases);
        // Lost leadership at 4 s; leads again (a new term) at 9 s: the lease has 5 s from then.
        assert!(t.sweep(None, t0 + 4 * S, &leases).is_empty());
        assert!(t.sweep(Some(3), t0 + 9 * S, &leases).is_empty());
        assert!(t.sweep(Some(3), t0 + 13 * S, &leases).is_empty());
        assert_eq!(t.remaining(3, t0 + 13 * S, 1, 5), S);
        assert_eq!(t.sweep(Some(3), t0 + 14 * S, &leases), vec![1]);
    }
}
