//! Reads, leases and leadership transfers: the ReadIndex rounds (one in flight, later reads join the
//! next), the lease a confirmed round gives and what the driver publishes of it for
//! [`DriverHandle::read_index`](super::DriverHandle::read_index), and a transfer's start and end.

use super::*;

impl Driver {
    /// Publishes the lease for reads answered without the driver (see [`lease::Published`]).
    pub(super) fn publish_lease(&self) {
        let Some(lease) = &self.lease else {
            return;
        };
        let raft = &self.raw.raft;
        let holds = raft.state == StateRole::Leader
            && raft.lead_transferee.is_none()
            && self.settings_agree
            && !self.is_removed()
            && raft.commit_to_current_term();
        lease.publish(holds, raft.term);
    }

    /// Hands leadership to `to` (raft-rs ignores it when `to` cannot take it). The target may be elected
    /// at once: no lease from here on, and none after the transfer ends until the target has seen a later
    /// message (see `transfer_ended`).
    pub(super) fn transfer_leader(&mut self, to: u64) {
        if let Some(lease) = &mut self.lease {
            lease.revoke(Instant::now());
        }
        self.transfer = Some((to, self.raw.raft.term));
        self.raw.transfer_leader(to);
    }

    /// Notices a transfer that ended with this node still leading in the same term (it gave up, or raft-rs
    /// ignored it): a `MsgTimeoutNow` sent to the target stays valid in this term, so the lease is fenced
    /// until the target answers a round started from now on (see [`lease`](crate::raft::lease)).
    pub(super) fn transfer_ended(&mut self, now: Instant) {
        let Some((to, term)) = self.transfer else {
            return;
        };
        let raft = &self.raw.raft;
        if raft.lead_transferee == Some(to) {
            return;
        }
        self.transfer = None;
        if let Some(lease) = &mut self.lease
            && raft.state == StateRole::Leader
            && raft.term == term
            && to != raft.id
            && raft.prs().conf().voters().contains(to)
        {
            tracing::info!(
                to,
                "leadership transfer ended without a change of leader: no lease until node {to} \
                 answers a later round"
            );
            lease.fence(
                Fence {
                    peer: to,
                    term,
                    first_round: self.next_read,
                },
                now,
            );
        }
    }

    /// Starts one ReadIndex round for the reads that arrived in this turn, once this leader has committed
    /// an entry of its own term (raft-rs drops a read request before that); restarts rounds that got no
    /// answer within `read_retry`, forgetting callers that gave up.
    pub(super) fn start_reads(&mut self) {
        let now = Instant::now();
        self.transfer_ended(now);
        if let Some(lease) = &mut self.lease
            && self.raw.raft.lead_transferee.is_some()
        {
            // A round started now (at the floor) gives no lease either: the transfer's target may be
            // elected by followers that answer it.
            lease.revoke(now);
        }
        let stale: Vec<u64> = self
            .reads
            .iter()
            .filter(|(_, r)| now.duration_since(r.started) >= self.read_retry)
            .map(|(id, _)| *id)
            .collect();
        for id in stale {
            if let Some(round) = self.reads.remove(&id) {
                self.read_batch
                    .extend(round.replies.into_iter().filter(|r| !r.is_closed()));
            }
        }
        // With a lease in use, one round renews it before it runs out, so that reads keep being answered
        // without one.
        let renew = self.read_batch.is_empty()
            && self.reads.is_empty()
            && self.raw.raft.state == StateRole::Leader
            && self.lease.as_ref().is_some_and(|l| l.wants_renewal(now));
        if self.read_batch.is_empty() && !renew {
            return;
        }
        if self.raw.raft.state != StateRole::Leader {
            let leader_id = self.raw.raft.leader_id;
            for reply in self.read_batch.drain(..) {
                let _ = reply.send(Err(ProposeError::NotLeader { leader_id }));
            }
            return;
        }
        if !self.raw.raft.commit_to_current_term() {
            // Held until the leader's first entry of its term commits (it was proposed on election).
            self.read_batch.retain(|r| !r.is_closed());
            return;
        }
        if !self.reads.is_empty() {
            // One round in flight at a time (etcd's linearizable read loop): reads arriving meanwhile
            // join the next round, started as soon as this one is answered (see `run`).
            return;
        }
        let id = self.next_read;
        self.next_read += 1;
        self.reads.insert(
            id,
            ReadRound {
                started: now,
                term: self.raw.raft.term,
                replies: std::mem::take(&mut self.read_batch),
            },
        );
        if let Some(lease) = &mut self.lease {
            lease.round_started();
        }
        self.raw.read_index(id.to_be_bytes().to_vec());
    }

    /// The commit index a linearizable read may use at once, when this leader's lease holds (see
    /// [`lease`](crate::raft::lease)): it leads, has committed an entry of its term, is not handing
    /// leadership over, and a quorum confirmed it recently enough.
    pub(super) fn lease_read(&mut self) -> Option<u64> {
        let raft = &self.raw.raft;
        let lease = self.lease.as_mut()?;
        if raft.state != StateRole::Leader
            || raft.lead_transferee.is_some()
            || !self.settings_agree
            || !raft.commit_to_current_term()
        {
            return None;
        }
        lease
            .serve(raft.term, Instant::now())
            .then_some(raft.raft_log.committed)
    }
}
