//! Applying committed entries: writes through the state machine, membership changes, answers to
//! proposers (by index and term), the changes fed to watchers, and where the log may be compacted to.

use super::*;

impl Driver {
    /// Where the log may be compacted up to: `compaction_slack` entries behind the applied index and, on
    /// the leader, behind the slowest healthy follower (recently active and within a threshold of the
    /// applied index: one that far behind needs a snapshot anyway, and must not keep the log growing).
    pub(super) fn compaction_target(&self) -> u64 {
        let mut target = self.applied.saturating_sub(self.compaction_slack);
        let raft = &self.raw.raft;
        if raft.state == StateRole::Leader {
            let horizon = self
                .applied
                .saturating_sub(self.compaction_slack + self.compaction_threshold);
            for (id, pr) in raft.prs().iter() {
                if *id != raft.id && pr.recent_active && pr.matched >= horizon {
                    target = target.min(pr.matched.saturating_sub(self.compaction_slack));
                }
            }
        }
        target
    }

    /// Applies a membership change: Raft's configuration, then, in one durable batch with the applied
    /// index and whatever `applier` still holds, the conf state and the address of an added node (the
    /// change's context). A change raft-rs refuses is applied as a no-op (`Err` carries why).
    pub(super) fn apply_conf_change(
        &mut self,
        applier: &mut state_machine::Applier<'_>,
        cc: &ConfChangeV2,
        index: u64,
    ) -> Result<Result<ApplyOutcome, String>, Box<dyn std::error::Error + Send + Sync>> {
        // What a quorum is changes: rounds confirmed before give no lease.
        if let Some(lease) = &mut self.lease {
            lease.revoke(Instant::now());
        }
        let cs = match self.raw.apply_conf_change(cc) {
            Ok(cs) => cs,
            Err(e) => {
                applier.skip(index);
                return Ok(Err(format!("Raft refused the membership change: {e}")));
            }
        };
        let mut batch = kiwi_storage::WriteBatch::new();
        LogStore::conf_state_batch(&cs, &mut batch)?;
        let addr = std::str::from_utf8(&cc.context)
            .ok()
            .filter(|a| !a.is_empty());
        let mut added = Vec::new();
        let mut removed_ids = self.removed_ids.borrow().clone();
        for change in cc.get_changes() {
            let id = change.node_id;
            match change.get_change_type() {
                ConfChangeType::AddNode | ConfChangeType::AddLearnerNode => {
                    state_machine::clear_removed(&mut batch, id);
                    removed_ids.retain(|r| *r != id);
                    if let Some(addr) = addr {
                        state_machine::record_member(&mut batch, id, addr);
                        added.push((id, addr.to_string()));
                    }
                }
                ConfChangeType::RemoveNode => {
                    state_machine::record_removed(&mut batch, id);
                    if let Err(at) = removed_ids.binary_search(&id) {
                        removed_ids.insert(at, id);
                    }
                }
            }
        }
        applier.commit_with(index, batch)?;
        self.raw.mut_store().conf_state_written(cs.clone());
        self.removed_ids.send_replace(removed_ids);
        for (id, addr) in added {
            self.sink.add_peer(id, addr);
        }
        let was_removed = self.removed;
        self.refresh_membership();
        if self.removed && !was_removed {
            tracing::warn!(
                index,
                "this node was removed from the cluster: it no longer serves requests"
            );
            if self.raw.raft.state == StateRole::Leader {
                // Leadership moved to this node after another proposed its removal: raft-rs would keep
                // it leading a group it is not in. Hand over to the most up-to-date voter.
                let me = self.raw.raft.id;
                let to = self
                    .raw
                    .raft
                    .prs()
                    .iter()
                    .filter(|(id, _)| **id != me && cs.voters.contains(id))
                    .max_by_key(|(_, pr)| pr.matched)
                    .map(|(id, _)| *id);
                if let Some(to) = to {
                    tracing::warn!(to, "removed while leading: transferring leadership");
                    self.transfer_leader(to);
                }
            }
        }
        tracing::info!(index, voters = ?cs.voters, learners = ?cs.learners, "membership changed");
        Ok(Ok(ApplyOutcome {
            index,
            ..ApplyOutcome::default()
        }))
    }

    /// Counts and logs a committed entry applied as a no-op.
    pub(super) fn reject(&mut self, index: u64, why: &str) {
        self.rejected_entries += 1;
        tracing::warn!(
            index,
            reason = why,
            total = self.rejected_entries,
            "committed entry is invalid: applied as a no-op"
        );
    }

    /// Tells watchers that entries up to `to` are applied, with their changes when known.
    pub(super) fn publish_changes(&mut self, to: u64, changes: Option<Vec<state_machine::Change>>) {
        if to <= self.published {
            return;
        }
        let published = state_machine::Published {
            from: self.published + 1,
            to,
            changes,
        };
        self.published = to;
        // No watcher listening is not an error.
        let _ = self.feed.send(Arc::new(published));
    }

    /// Applies committed entries: data writes of the whole run go in as few batches as possible (see
    /// [`state_machine::Applier`]), and proposers are answered only once their write is in storage.
    pub(super) fn apply(&mut self, entries: Vec<Entry>) -> DriverResult {
        if entries.is_empty() {
            return Ok(());
        }
        if let Some(lease) = &self.lease {
            // Before any proposer is answered: a read from the lease then sees every acknowledged write.
            lease.committed(self.raw.raft.raft_log.committed);
        }
        let backend = Arc::clone(&self.backend);
        let mut applier = state_machine::Applier::new(&*backend);
        let mut answers = Vec::new();
        // `raft.apply` spans of traced proposals, closed once their writes are flushed.
        let mut applying = Vec::new();
        for entry in entries {
            let (index, term) = (entry.index, entry.term);
            if let Some(p) = self.proposals.get_mut(&index)
                && !p.trace.is_disabled()
            {
                // Committed: replication ends here, applying starts.
                p.replicate = tracing::Span::none();
                applying
                    .push(tracing::debug_span!(parent: &p.trace, "raft.apply", raft.index = index));
            }
            let outcome: Option<Result<ApplyOutcome, String>> = if index <= self.applied_on_disk {
                // Already in the data before this process started.
                None
            } else {
                match entry.get_entry_type() {
                    EntryType::EntryNormal if entry.data.is_empty() => {
                        applier.skip(index);
                        None
                    }
                    EntryType::EntryNormal => {
                        let cmd = RaftCommand::decode(entry.data.as_ref())
                            .map_err(|e| format!("the command does not decode: {e}"))
                            .and_then(|cmd| state_machine::validate(&cmd).map(|()| cmd));
                        match cmd {
                            Ok(cmd) => Some(Ok(applier.apply(index, &cmd)?)),
                            Err(why) => {
                                applier.skip(index);
                                Some(Err(why))
                            }
                        }
                    }
                    EntryType::EntryConfChange => {
                        // Kiwi proposes only V2 changes; a V1 entry is read as the equivalent V2.
                        match ConfChange::parse_from_bytes(&entry.data) {
                            Ok(v1) => {
                                let mut single = ConfChangeSingle::default();
                                single.set_change_type(v1.get_change_type());
                                single.node_id = v1.node_id;
                                let mut cc = ConfChangeV2::default();
                                cc.set_changes(vec![single].into());
                                cc.context = v1.context;
                                Some(self.apply_conf_change(&mut applier, &cc, index)?)
                            }
                            Err(e) => {
                                applier.skip(index);
                                Some(Err(format!("the membership change does not decode: {e}")))
                            }
                        }
                    }
                    EntryType::EntryConfChangeV2 => {
                        match ConfChangeV2::parse_from_bytes(&entry.data) {
                            Ok(cc) => Some(self.apply_conf_change(&mut applier, &cc, index)?),
                            Err(e) => {
                                applier.skip(index);
                                Some(Err(format!("the membership change does not decode: {e}")))
                            }
                        }
                    }
                }
            };
            if let Some(Err(why)) = &outcome {
                self.reject(index, why);
            }
            // Proposals at lower indexes can no longer be answered by their own entry.
            while let Some((&i, _)) = self.proposals.first_key_value() {
                if i >= index {
                    break;
                }
                let (_, p) = self.proposals.pop_first().expect("non-empty");
                self.metrics.proposal_answered(None, p.at.elapsed());
                answers.push((p.reply, Err(ProposeError::Dropped)));
            }
            if let Some(p) = self.proposals.remove(&index) {
                let result = match outcome {
                    Some(Ok(o)) if p.term == term => Ok(o),
                    Some(Err(why)) if p.term == term => Err(ProposeError::Rejected(why)),
                    _ => Err(ProposeError::Dropped),
                };
                let answered = match &result {
                    Ok(_) => Some(true),
                    Err(ProposeError::Rejected(_)) => Some(false),
                    Err(_) => None,
                };
                self.metrics.proposal_answered(answered, p.at.elapsed());
                answers.push((p.reply, result));
            }
            self.applied = index;
        }
        applier.flush()?;
        let changes = applier.take_changes();
        let changes = (state_machine::change_bytes(&changes) <= state_machine::FEED_MAX_BYTES)
            .then_some(changes);
        self.publish_changes(self.applied, changes);
        drop(applying);
        for (reply, result) in answers {
            let _ = reply.send(result);
        }
        Ok(())
    }
}
