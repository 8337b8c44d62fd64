//! What the driver tells others: the public status on the `watch` channel, the detailed status, the
//! membership it derives (removed or not, the voters' settings agreeing), and the metrics it samples.

use super::*;

impl Driver {
    pub(super) fn detailed_status(&self) -> DetailedStatus {
        let raft = &self.raw.raft;
        let mut peers = Vec::new();
        if raft.state == StateRole::Leader {
            let conf = raft.prs().conf();
            for (id, pr) in raft.prs().iter() {
                peers.push(PeerProgress {
                    id: *id,
                    match_index: pr.matched,
                    recently_active: pr.recent_active,
                    voter: conf.voters().contains(*id),
                });
            }
            peers.sort_by_key(|p| p.id);
        }
        let cs = raft.prs().conf().to_conf_state();
        DetailedStatus {
            status: self.public_status(),
            peers,
            voters: cs.voters,
            learners: cs.learners,
        }
    }

    pub(super) fn public_status(&self) -> RaftStatus {
        let raft = &self.raw.raft;
        RaftStatus {
            role: raft.state.into(),
            term: raft.term,
            leader_id: raft.leader_id,
            commit: raft.raft_log.committed,
            applied: self.applied,
            first_index: self.raw.store().truncated_index() + 1,
            removed: self.is_removed(),
            rejected_entries: self.rejected_entries,
            transferring_to: raft.lead_transferee.unwrap_or(0),
        }
    }

    /// Whether this node no longer belongs to the cluster: its own log says so, or a majority of the
    /// other voters refused its messages as a non-member since it last heard from a leader.
    pub(super) fn is_removed(&self) -> bool {
        if self.removed {
            return true;
        }
        let me = self.raw.raft.id;
        let voters = self.raw.raft.prs().conf().voters().ids();
        let others = voters.iter().filter(|id| *id != me).count();
        let refusing = voters
            .iter()
            .filter(|id| self.refused_by.contains(id))
            .count();
        others > 0 && refusing * 2 > others
    }

    /// Recomputes [`Driver::removed`] and publishes the membership after it changed.
    /// Whether every voter but this node reported this node's lease settings; logs a change.
    pub(super) fn check_settings(&mut self) {
        if self.lease.is_none() {
            return;
        }
        let me = self.raw.raft.id;
        let differ: Vec<u64> = self
            .raw
            .raft
            .prs()
            .conf()
            .voters()
            .ids()
            .iter()
            .filter(|id| *id != me && self.peer_settings.get(id) != Some(&self.settings))
            .collect();
        let agree = differ.is_empty();
        if agree != self.settings_agree {
            if agree {
                tracing::info!("every voter runs this node's lease settings: lease reads possible");
            } else {
                tracing::warn!(
                    voters = ?differ,
                    mine = ?self.settings,
                    theirs = ?differ.iter().map(|id| self.peer_settings.get(id)).collect::<Vec<_>>(),
                    "voters run other lease settings (raft.tick_interval_ms, election_ticks, \
                     lease_reads) or have not reported them yet: reads take ReadIndex rounds"
                );
            }
        }
        self.settings_agree = agree;
    }

    pub(super) fn refresh_membership(&mut self) {
        self.check_settings();
        self.removed = self.compute_removed();
        let cs = self.raw.raft.prs().conf().to_conf_state();
        let mut ids: Vec<u64> =
            [cs.voters, cs.learners, cs.voters_outgoing, cs.learners_next].concat();
        ids.sort_unstable();
        ids.dedup();
        self.members.send_replace(ids);
    }

    /// Whether the current membership leaves this node out (a node that has not joined yet has no
    /// membership at all, and is not removed).
    pub(super) fn compute_removed(&self) -> bool {
        let cs = self.raw.raft.prs().conf().to_conf_state();
        let me = self.raw.raft.id;
        !cs.voters.is_empty()
            && ![
                &cs.voters,
                &cs.learners,
                &cs.voters_outgoing,
                &cs.learners_next,
            ]
            .iter()
            .any(|ids| ids.contains(&me))
    }

    pub(super) fn publish(&mut self) {
        let now = self.public_status();
        self.observe(&now);
        if now.role != Role::Leader && !self.reads.is_empty() {
            let leader_id = now.leader_id;
            for reply in self.reads.drain().flat_map(|(_, r)| r.replies) {
                let _ = reply.send(Err(ProposeError::NotLeader { leader_id }));
            }
        }
        let before = *self.status.borrow();
        if (before.role, before.leader_id, before.term) != (now.role, now.leader_id, now.term) {
            tracing::info!(role = ?now.role, term = now.term, leader = now.leader_id, "Raft state changed");
        }
        self.status.send_if_modified(|s| {
            let changed = *s != now;
            *s = now;
            changed
        });
    }

    /// Records what the metrics learn from the current state: campaigns, leaders, followers' progress,
    /// and a history sample when one is due.
    pub(super) fn observe(&mut self, now: &RaftStatus) {
        if !self.metrics.enabled() {
            return;
        }
        let at = Instant::now();
        let before = *self.status.borrow();
        // A campaign is a new term in which this node voted for itself (a single voter may campaign and
        // win within one turn, so the candidate role itself may never be seen here).
        if now.term > before.term && self.raw.raft.vote == self.raw.raft.id {
            self.metrics.campaign_started(at);
        }
        self.metrics.leader_seen(now.leader_id, at);
        let raft = &self.raw.raft;
        let mut max_lag = 0;
        if raft.state == StateRole::Leader {
            let last = raft.raft_log.last_index();
            for (id, pr) in raft.prs().iter() {
                if *id != raft.id {
                    self.metrics.follower_matched(*id, pr.matched, at);
                    max_lag = max_lag.max(last.saturating_sub(pr.matched));
                }
            }
        }
        let role = wire_role(now.role);
        let raft = &self.raw.raft;
        self.metrics.maybe_sample(at, || {
            let last_index = raft.raft_log.last_index();
            let mut followers = Vec::new();
            if raft.state == StateRole::Leader {
                for (id, pr) in raft.prs().iter() {
                    if *id != raft.id {
                        followers.push((
                            *id,
                            pr.matched,
                            last_index.saturating_sub(pr.matched),
                            pr.recent_active,
                        ));
                    }
                }
            }
            let sample = Sample {
                at: std::time::SystemTime::now(),
                term: now.term,
                role,
                commit: now.commit,
                applied: now.applied,
                max_follower_lag: max_lag,
            };
            let progress = Progress {
                leader: now.leader_id,
                first_index: raft.raft_log.first_index(),
                last_index,
                followers,
            };
            (sample, progress)
        });
    }

    pub(super) fn metrics_report(&self, with_history: bool) -> Option<MetricsReport> {
        if !self.metrics.enabled() {
            return None;
        }
        let raft = &self.raw.raft;
        let last_index = raft.raft_log.last_index();
        let mut followers = Vec::new();
        if raft.state == StateRole::Leader {
            let conf = raft.prs().conf();
            for (id, pr) in raft.prs().iter() {
                if *id != raft.id {
                    followers.push((
                        *id,
                        pr.matched,
                        last_index.saturating_sub(pr.matched),
                        pr.recent_active,
                        conf.voters().contains(*id),
                    ));
                }
            }
            followers.sort_unstable_by_key(|f| f.0);
        }
        Some(MetricsReport {
            status: self.public_status(),
            last_index,
            metrics: self.metrics.metrics(&followers, with_history),
        })
    }
}
