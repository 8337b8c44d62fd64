//! The leader lease behind `raft.lease_reads`: linearizable reads answered from the leader's commit index
//! without a ReadIndex round while no other node can have become leader.
//!
//! # Why a confirmed round gives a lease
//! A ReadIndex round started at `s` (leader's clock) completes once a quorum has answered a heartbeat sent
//! after `s`. Each of those followers reset its election timer when the heartbeat arrived, after `s`.
//! raft-rs (with `check_quorum`, which the driver sets) makes a follower ignore vote requests until
//! `election_ticks` ticks have passed since it last heard from the leader, and never campaign before
//! that. The driver's tick loop never runs two ticks less than a tick apart except once after a late
//! tick, so those ticks take at least `(election_ticks - 2) × tick_interval` of the follower's time. A
//! quorum that will not vote for anyone else until then means no other leader until then: the leader
//! may answer reads from its own commit index until `s + (election_ticks - 2) × tick_interval`, less a
//! margin for clock rates.
//!
//! # Assumptions (written down, as the lease depends on them)
//! - Every node's monotonic clock runs at a rate within [`CLOCK_RATE_MARGIN`] of the leader's. A process
//!   paused by SIGSTOP, a long GC-like stall or a blocked disk is fine: the monotonic clock keeps running,
//!   so the leader finds its lease expired when it resumes and falls back to a ReadIndex round (tested
//!   with SIGSTOP in `tests/tests/core_safety.rs`). A whole machine suspended or live-migrated is not:
//!   Linux's monotonic clock stops while the machine sleeps. Do not turn lease reads on where that
//!   happens.
//! - A leadership transfer lets the target campaign at once, whatever the followers' timers say
//!   (raft-rs's forced election): while one is in progress, and for rounds started before it ended, there
//!   is no lease. A membership change changes what a quorum is: rounds started before it give none.
//! - A transfer that gave up does not take back the `MsgTimeoutNow` already sent: raft-rs acts on it
//!   whenever it arrives, in the same term. After a transfer ends with this node still leading, the
//!   lease is fenced ([`Lease::fence`]) until the old target has answered a heartbeat of a ReadIndex round
//!   started after the end: Raft messages between two nodes travel in order on one stream, so by then
//!   the target has handled the `MsgTimeoutNow` (and either campaigned, which ends this term, or could
//!   not). An election timeout alone would not do: a paused target can hold the message for longer. A
//!   fence whose target never answers (removed, or down for good) lasts until the term ends: reads take
//!   ReadIndex rounds meanwhile, which is slower, never unsafe.
//! - Every voter runs the same tick, election ticks and `lease_reads` ([`Settings`]): a rolling change of
//!   either makes the leader answer with ReadIndex rounds until all voters agree again.
//! - A node that restarts has forgotten when it last heard from the leader and would vote at once; with
//!   lease reads on, a node ignores vote requests for its first `election_ticks` ticks (see
//!   [`Lease::votes_allowed`]), which costs a restarted cluster at most one extra election timeout.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// How much slower than the leader's clock a follower's may run: the lease is this fraction shorter than
/// the followers' guaranteed silence.
pub const CLOCK_RATE_MARGIN: f64 = 0.1;

/// What a lease's safety depends on in each node's configuration. A leader computes its lease from its
/// own tick and election ticks, while the silence it relies on comes from each follower's, and only a
/// node with lease reads on holds off votes after a restart: the leader takes no lease unless every voter
/// reports the same settings (they travel on every Raft message batch).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Settings {
    pub tick: Duration,
    pub election_ticks: usize,
    pub lease_reads: bool,
}

/// The lease as the driver publishes it, for reads answered on the thread that holds them, without a
/// message to the driver and back ([`Published::serve`]).
///
/// The driver publishes the commit index before it answers any proposer from the entries up to it, so a
/// client that was told its write succeeded and then reads is answered at an index that includes the
/// write. It publishes an extended lease only at the start of a Ready (before any message of that Ready
/// leaves: a `MsgTimeoutNow` cannot leave while the lease still shows valid) and at the end of a turn;
/// it withdraws the lease at the instant it revokes or fences it.
#[derive(Debug)]
pub struct Published {
    epoch: Instant,
    /// Reads may be answered until this many nanoseconds after `epoch`; 0: no lease.
    until: AtomicU64,
    /// The leader's commit index, for reads answered from the lease.
    commit: AtomicU64,
    /// A read was answered from the lease since the last renewal round started.
    used: AtomicBool,
}

impl Published {
    fn new(epoch: Instant) -> Self {
        Published {
            epoch,
            until: AtomicU64::new(0),
            commit: AtomicU64::new(0),
            used: AtomicBool::new(false),
        }
    }

    fn nanos(&self, at: Instant) -> u64 {
        // +1: 0 means no lease.
        u64::try_from(at.saturating_duration_since(self.epoch).as_nanos()).unwrap_or(u64::MAX - 1)
            + 1
    }

    /// The commit index a linearizable read arriving at `now` may be answered at, while the published
    /// lease holds; marks the lease used.
    pub fn serve(&self, now: Instant) -> Option<u64> {
        let until = self.until.load(Ordering::SeqCst);
        if until == 0 || self.nanos(now) >= until {
            return None;
        }
        if !self.used.load(Ordering::Relaxed) {
            self.used.store(true, Ordering::Relaxed);
        }
        Some(self.commit.load(Ordering::SeqCst))
    }

    /// Called by the driver before it answers proposers of entries up to `commit`.
    fn commit(&self, commit: u64) {
        self.commit.fetch_max(commit, Ordering::SeqCst);
    }

    fn set_until(&self, until: Option<Instant>) {
        self.until
            .store(until.map_or(0, |u| self.nanos(u)), Ordering::SeqCst);
    }
}

/// A leader's lease, kept by the Raft driver.
#[derive(Debug)]
pub struct Lease {
    /// How long a confirmed round keeps other nodes from electing a leader, margin deducted.
    duration: Duration,
    /// Reads may be answered without a round until then (in `term`).
    until: Option<Instant>,
    term: u64,
    /// Rounds started at or before this give no lease (a transfer or membership change since, or a
    /// transfer in progress when they started).
    floor: Instant,
    /// A read was answered from the lease since the last renewal round started.
    used: bool,
    /// Vote requests are ignored until then (see the module doc).
    votes_from: Instant,
    /// A transfer to this peer ended in this term with this node still leading: no lease until the
    /// peer answers the heartbeat of a ReadIndex round numbered at least this (see the module doc).
    fence: Option<Fence>,
    /// What reads see without the driver.
    published: Arc<Published>,
}

/// See [`Lease::fence`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fence {
    pub peer: u64,
    pub term: u64,
    /// The first ReadIndex round started after the transfer ended.
    pub first_round: u64,
}

impl Lease {
    /// The lease of a node started at `now` with these Raft timings.
    pub fn new(tick: Duration, election_ticks: usize, now: Instant) -> Self {
        let silent = tick * u32::try_from(election_ticks.saturating_sub(2)).unwrap_or(u32::MAX);
        Lease {
            duration: silent.mul_f64(1.0 - CLOCK_RATE_MARGIN),
            until: None,
            term: 0,
            floor: now,
            used: false,
            votes_from: now + tick * u32::try_from(election_ticks).unwrap_or(u32::MAX),
            fence: None,
            published: Arc::new(Published::new(now)),
        }
    }

    /// Publishes the commit index (see [`Published`]); call it before answering proposers up to it.
    pub fn committed(&self, commit: u64) {
        self.published.commit(commit);
    }

    /// What reads see of this lease without the driver.
    pub fn published(&self) -> Arc<Published> {
        Arc::clone(&self.published)
    }

    /// Publishes the lease for reads in `term` (see [`Published`]): its end when `holds` (the caller
    /// checked that this node leads in `term`, has committed an entry of its term and is not handing
    /// leadership over), else none.
    pub fn publish(&self, holds: bool, term: u64) {
        let until = self.until.filter(|_| holds && self.term == term);
        self.published.set_until(until);
    }

    /// How long a confirmed round's lease lasts.
    pub fn duration(&self) -> Duration {
        self.duration
    }

    /// A ReadIndex round started at `started` in `term` was confirmed by a quorum while this node leads
    /// in `term`: the lease runs until `started + duration`, unless a transfer or membership change came
    /// after the round started (or a transfer was in progress when it started: the driver revokes the
    /// lease at the instant it starts each round then).
    pub fn confirmed(&mut self, started: Instant, term: u64) {
        if self.fence.is_some_and(|f| f.term != term) {
            // A new term: the old target's MsgTimeoutNow (of an older term) is ignored if it arrives.
            self.fence = None;
        }
        if started <= self.floor || self.fence.is_some() {
            return;
        }
        let until = started + self.duration;
        if self.term != term {
            self.term = term;
            self.until = Some(until);
        } else {
            self.until = Some(self.until.map_or(until, |u| u.max(until)));
        }
    }

    /// Whether a read arriving at `now` may be answered from the commit index of a leader in `term` that
    /// has committed an entry of its term and is not transferring leadership (the caller checks those).
    /// Marks the lease used, so that it is renewed before it runs out.
    pub fn serve(&mut self, term: u64, now: Instant) -> bool {
        let valid = self.term == term && self.until.is_some_and(|u| now < u);
        self.used |= valid;
        valid
    }

    /// Ends the lease and refuses it to rounds started at or before `now` (a transfer is in progress or
    /// the membership changed). No round is started to renew it: the next read's round takes a new one.
    pub fn revoke(&mut self, now: Instant) {
        self.until = None;
        self.published.set_until(None);
        self.used = false;
        self.floor = self.floor.max(now);
    }

    /// A transfer to `fence.peer` ended in `fence.term` with this node still leading: ends the lease, and
    /// no round gives one until [`acknowledged`](Self::acknowledged) lifts the fence.
    pub fn fence(&mut self, fence: Fence, now: Instant) {
        self.revoke(now);
        self.fence = Some(fence);
    }

    /// `peer` answered, in `term`, the heartbeat of ReadIndex round `round`: lifts a fence that waited for
    /// it (rounds confirmed afterwards give a lease again).
    pub fn acknowledged(&mut self, peer: u64, term: u64, round: u64) {
        if self
            .fence
            .is_some_and(|f| f.peer == peer && f.term == term && round >= f.first_round)
        {
            self.fence = None;
        }
    }

    /// The fence in force, if any.
    pub fn fenced(&self) -> Option<Fence> {
        self.fence
    }

    /// Whether to start a round only to renew the lease: reads were answered from it and less than half
    /// of it is left (the caller starts one only when no round is in flight).
    pub fn wants_renewal(&self, now: Instant) -> bool {
        (self.used || self.published.used.load(Ordering::Relaxed))
            && self
                .until
                .is_none_or(|u| u.saturating_duration_since(now) < self.duration / 2)
    }

    /// A round started: the reads answered so far are covered by it.
    pub fn round_started(&mut self) {
        self.used = false;
        self.published.used.store(false, Ordering::Relaxed);
    }

    /// Whether this node may answer vote requests at `now`.
    pub fn votes_allowed(&self, now: Instant) -> bool {
        now >= self.votes_from
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_published_lease_follows_the_drivers_and_is_withdrawn_at_once() {
        let t0 = Instant::now();
        let mut l = Lease::new(TICK, 10, t0);
        let p = l.published();
        l.committed(7);
        l.publish(true, 3);
        assert_eq!(p.serve(t0), None, "no lease before a round");
        l.confirmed(t0 + TICK, 3);
        assert_eq!(p.serve(t0 + TICK), None, "not published yet");
        l.publish(true, 3);
        assert_eq!(p.serve(t0 + TICK), Some(7));
        l.committed(9);
        assert_eq!(p.serve(t0 + TICK), Some(9), "the newest commit index");
        assert_eq!(
            p.serve(t0 + TICK + Duration::from_millis(360)),
            None,
            "expired"
        );
        l.publish(true, 4);
        assert_eq!(p.serve(t0 + TICK), None, "a lease of another term");
        l.publish(true, 3);
        l.publish(false, 3);
        assert_eq!(p.serve(t0 + TICK), None, "the driver says it does not hold");
        l.publish(true, 3);
        assert!(
            l.wants_renewal(t0 + TICK + Duration::from_millis(200)),
            "used"
        );
        l.round_started();
        assert!(
            !l.wants_renewal(t0 + TICK + Duration::from_millis(200)),
            "unused since the round"
        );
        l.revoke(t0 + TICK);
        assert_eq!(p.serve(t0 + TICK), None, "revoked: withdrawn at once");
    }

    const TICK: Duration = Duration::from_millis(50);

    #[test]
    fn a_confirmed_round_gives_a_lease_shorter_than_the_followers_silence() {
        let t0 = Instant::now();
        let mut l = Lease::new(TICK, 10, t0);
        assert_eq!(
            l.duration(),
            Duration::from_millis(360),
            "8 ticks less 10 %"
        );
        assert!(!l.serve(3, t0), "no lease before a round");
        l.confirmed(t0 + TICK, 3);
        assert!(l.serve(3, t0 + TICK));
        assert!(l.serve(3, t0 + TICK + Duration::from_millis(359)));
        assert!(
            !l.serve(3, t0 + TICK + Duration::from_millis(360)),
            "expired"
        );
        assert!(!l.serve(4, t0 + TICK), "another term");
        // An older round confirmed late does not shorten it.
        l.confirmed(t0, 3);
        assert!(l.serve(3, t0 + TICK + Duration::from_millis(359)));
        // A round of a new term replaces it.
        l.confirmed(t0 + 2 * TICK, 4);
        assert!(l.serve(4, t0 + 2 * TICK));
        assert!(!l.serve(3, t0 + 2 * TICK));
    }

    #[test]
    fn a_transfer_or_membership_change_revokes_it_and_older_rounds_cannot_renew_it() {
        let t0 = Instant::now();
        let mut l = Lease::new(TICK, 10, t0);
        l.confirmed(t0 + TICK, 1);
        assert!(l.serve(1, t0 + TICK));
        l.revoke(t0 + 2 * TICK);
        assert!(!l.serve(1, t0 + 2 * TICK));
        assert!(
            !l.wants_renewal(t0 + 2 * TICK),
            "a revoked lease is not renewed"
        );
        l.confirmed(t0 + TICK, 1);
        assert!(
            !l.serve(1, t0 + 2 * TICK),
            "a round from before the revocation"
        );
        l.confirmed(t0 + 2 * TICK, 1);
        assert!(
            !l.serve(1, t0 + 2 * TICK),
            "a round started at the revocation (during a transfer)"
        );
        l.confirmed(t0 + 3 * TICK, 1);
        assert!(l.serve(1, t0 + 3 * TICK));
    }

    #[test]
    fn it_is_renewed_only_while_used_and_past_half() {
        let t0 = Instant::now();
        let mut l = Lease::new(TICK, 10, t0);
        assert!(!l.wants_renewal(t0), "unused");
        let t1 = t0 + Duration::from_millis(1);
        l.confirmed(t1, 1);
        assert!(l.serve(1, t1));
        assert!(!l.wants_renewal(t0 + Duration::from_millis(100)));
        assert!(l.wants_renewal(t0 + Duration::from_millis(200)));
        l.round_started();
        assert!(!l.wants_renewal(t0 + Duration::from_millis(200)));
    }

    #[test]
    fn a_started_node_ignores_votes_for_an_election_timeout() {
        let t0 = Instant::now();
        let l = Lease::new(TICK, 10, t0);
        assert!(!l.votes_allowed(t0 + Duration::from_millis(499)));
        assert!(l.votes_allowed(t0 + Duration::from_millis(500)));
    }

    #[test]
    fn too_few_election_ticks_give_no_lease() {
        let t0 = Instant::now();
        let mut l = Lease::new(TICK, 2, t0);
        l.confirmed(t0 + TICK, 1);
        assert!(!l.serve(1, t0 + TICK));
    }

    #[test]
    fn an_ended_transfer_fences_the_lease_until_its_target_answers_a_later_round() {
        let t0 = Instant::now();
        let mut l = Lease::new(TICK, 10, t0);
        l.confirmed(t0 + TICK, 1);
        assert!(l.serve(1, t0 + TICK));
        let fence = Fence {
            peer: 2,
            term: 1,
            first_round: 10,
        };
        l.fence(fence, t0 + 2 * TICK);
        assert!(!l.serve(1, t0 + 2 * TICK), "fenced: the lease ends");
        l.confirmed(t0 + 3 * TICK, 1);
        assert!(!l.serve(1, t0 + 3 * TICK), "rounds give none while fenced");
        l.acknowledged(3, 1, 10);
        l.acknowledged(2, 1, 9);
        l.acknowledged(2, 2, 10);
        assert_eq!(
            l.fenced(),
            Some(fence),
            "another peer, an earlier round or another term"
        );
        l.acknowledged(2, 1, 11);
        assert_eq!(l.fenced(), None);
        l.confirmed(t0 + 4 * TICK, 1);
        assert!(
            l.serve(1, t0 + 4 * TICK),
            "a round after the answer gives one"
        );
        l.fence(fence, t0 + 5 * TICK);
        l.confirmed(t0 + 6 * TICK, 2);
        assert!(l.serve(2, t0 + 6 * TICK), "a new term lifts it");
    }
}
