//! The lease calls (`KvService.Lease*`) and the leader's expiry sweep.
//!
//! Grants and revocations are proposals (a revocation at HIGH at least, whatever the client's priority).
//! Keepalives, TimeToLive and the sweep go to the Raft driver directly, never through the storage
//! stage's queue, so no flood of LOW requests can delay them; they are answered only by a leader that
//! has confirmed its leadership with a ReadIndex round (a deposed leader that does not know it yet
//! cannot refresh a lease the new leader is timing). See `crate::lease` for the clock's rules.

use std::time::Instant;

use kiwi_proto::v1::{
    LeaseGrantCommand, LeaseGrantRequest, LeaseGrantResponse, LeaseKeepAliveRequest,
    LeaseKeepAliveResponse, LeaseLeasesRequest, LeaseLeasesResponse, LeaseRevokeCommand,
    LeaseRevokeRequest, LeaseRevokeResponse, LeaseTimeToLiveRequest, LeaseTimeToLiveResponse,
};
use prost::Message as _;
use rand::Rng as _;
use tokio::sync::mpsc;
use tonic::Status;

use super::*;
use crate::lease::REVOKES_PER_SWEEP;
use crate::raft::driver::Role;
use crate::raft::lease_state;
use crate::raft::state_machine::Refusal;

/// How often the leader looks for expired leases.
const SWEEP_INTERVAL: Duration = Duration::from_millis(250);
/// Most key bytes a TimeToLive answer lists (the rest are left out).
const MAX_LISTED_KEY_BYTES: usize = 4 << 20;
/// How long a keepalive or TimeToLive waits for the leadership check.
const CONFIRM_TIMEOUT: Duration = Duration::from_secs(5);
/// Keepalive answers queued for a client that reads slowly.
const QUEUED_KEEPALIVES: usize = 16;

impl KvServer {
    /// The class of lease upkeep a client asks for: at least HIGH.
    fn lease_class(tagged: &mut Tagged) {
        if matches!(tagged.class, Class::Normal | Class::Low) {
            tagged.class = Class::High;
        }
    }

    /// Confirms that this node leads (a ReadIndex round answered by a quorum, and this node's state
    /// applied up to it); returns the term.
    async fn confirm_leader(&self) -> Result<u64, KvError> {
        let before = self.driver.status();
        if before.role != Role::Leader {
            return Err(self.not_leader(before.leader_id));
        }
        tokio::time::timeout(CONFIRM_TIMEOUT, self.read_index_applied())
            .await
            .map_err(|_| KvError::Timeout(CONFIRM_TIMEOUT))??;
        let after = self.driver.status();
        if after.role != Role::Leader || after.term != before.term {
            return Err(self.not_leader(after.leader_id));
        }
        Ok(before.term)
    }

    pub(super) async fn lease_grant(
        &self,
        req: LeaseGrantRequest,
        may_critical: bool,
    ) -> Result<LeaseGrantResponse, KvError> {
        let tagged = self.tag(req.header.as_ref(), may_critical)?;
        if req.ttl <= 0 || req.ttl > lease_state::MAX_TTL_SECS {
            return Err(KvError::InvalidArgument(format!(
                "ttl must be 1 to {} seconds, got {}",
                lease_state::MAX_TTL_SECS,
                req.ttl
            )));
        }
        if req.id > lease_state::MAX_LEASE_ID {
            return Err(KvError::InvalidArgument(format!(
                "lease id {} is over the largest, {}",
                req.id,
                lease_state::MAX_LEASE_ID
            )));
        }
        let ttl = req.ttl.max(self.min_lease_ttl);
        // An id of the node's choosing: random, so that two nodes never pick the same; picked again on
        // the (unlikely) collision.
        for _ in 0..3 {
            let id = if req.id == 0 {
                rand::rng().random_range(1..=lease_state::MAX_LEASE_ID)
            } else {
                req.id
            };
            let out = self
                .propose(
                    &tagged,
                    raft_command::Command::LeaseGrant(LeaseGrantCommand { id, ttl }),
                )
                .await?;
            match out.refused {
                None => {
                    return Ok(LeaseGrantResponse {
                        header: self.header(&tagged, out.index),
                        id,
                        ttl,
                    });
                }
                Some(Refusal::LeaseExists(_)) if req.id == 0 => {}
                Some(r) => return Err(KvError::Refused(r)),
            }
        }
        Err(KvError::Unknown(
            "three randomly picked lease ids were all in use".into(),
        ))
    }

    pub(super) async fn lease_revoke(
        &self,
        req: LeaseRevokeRequest,
        may_critical: bool,
    ) -> Result<LeaseRevokeResponse, KvError> {
        let mut tagged = self.tag(req.header.as_ref(), may_critical)?;
        Self::lease_class(&mut tagged);
        if req.id == 0 {
            return Err(KvError::InvalidArgument("lease id 0 is no lease".into()));
        }
        let out = self
            .propose(
                &tagged,
                raft_command::Command::LeaseRevoke(LeaseRevokeCommand { id: req.id }),
            )
            .await?;
        if let Some(r) = out.refused {
            return Err(KvError::Refused(r));
        }
        Ok(LeaseRevokeResponse {
            header: self.header(&tagged, out.index),
            deleted: out.deleted,
        })
    }

    /// Answers one keepalive: the lease's full TTL again, or 0 when it does not exist.
    pub(super) async fn keep_alive(&self, id: u64) -> Result<LeaseKeepAliveResponse, KvError> {
        let term = self.confirm_leader().await?;
        let record = lease_state::read(&*self.storage, id).map_err(KvError::Storage)?;
        let ttl = match record {
            Some(r) => {
                self.leases.renew(term, Instant::now(), id, r.ttl);
                r.ttl
            }
            None => 0,
        };
        let applied = self.driver.status().applied;
        Ok(LeaseKeepAliveResponse {
            header: Some(ResponseHeader {
                node_id: self.node_id,
                applied_index: applied,
                term,
                revision: applied,
                ..ResponseHeader::default()
            }),
            id,
            ttl,
        })
    }

    pub(super) async fn lease_time_to_live(
        &self,
        req: LeaseTimeToLiveRequest,
        may_critical: bool,
    ) -> Result<LeaseTimeToLiveResponse, KvError> {
        let tagged = self.tag(req.header.as_ref(), may_critical)?;
        let term = self.confirm_leader().await?;
        let Some(record) = lease_state::read(&*self.storage, req.id).map_err(KvError::Storage)?
        else {
            return Err(KvError::Refused(Refusal::LeaseNotFound(req.id)));
        };
        let left = self
            .leases
            .remaining(term, Instant::now(), req.id, record.ttl);
        let mut keys = Vec::new();
        if req.keys {
            let id = req.id;
            let all = self
                .read_data(&tagged, move |st| {
                    lease_state::keys(st, id, lease_state::MAX_KEYS_PER_LEASE as usize)
                })
                .await?;
            let mut bytes = 0;
            for k in all {
                bytes += k.len();
                if bytes > MAX_LISTED_KEY_BYTES {
                    break;
                }
                keys.push(k);
            }
        }
        Ok(LeaseTimeToLiveResponse {
            header: self.header(&tagged, self.driver.status().applied),
            id: req.id,
            // Whole seconds left, rounded up (a lease with any time left is not at 0).
            ttl: i64::try_from(left.as_millis().div_ceil(1000)).unwrap_or(i64::MAX),
            granted_ttl: record.ttl,
            keys,
        })
    }

    pub(super) async fn lease_leases(
        &self,
        req: LeaseLeasesRequest,
        may_critical: bool,
    ) -> Result<LeaseLeasesResponse, KvError> {
        let tagged = self.tag(req.header.as_ref(), may_critical)?;
        let applied = self.linearize(&tagged).await?;
        let leases = self.read_data(&tagged, lease_state::all).await?;
        Ok(LeaseLeasesResponse {
            header: self.header(&tagged, applied),
            ids: leases.into_iter().map(|(id, _)| id).collect(),
        })
    }
}

/// Serves one LeaseKeepAlive stream: each request is answered in order; the stream ends with a
/// "not the leader" status (with the leader hint) when this node does not lead, so the client goes to the
/// leader.
pub(super) fn serve_keep_alive(
    server: Arc<KvServer>,
    mut requests: tonic::Streaming<LeaseKeepAliveRequest>,
) -> mpsc::Receiver<Result<LeaseKeepAliveResponse, Status>> {
    let (tx, rx) = mpsc::channel(QUEUED_KEEPALIVES);
    tokio::spawn(async move {
        loop {
            let request = tokio::select! {
                r = requests.message() => r,
                () = tx.closed() => return,
            };
            let id = match request {
                Ok(Some(r)) => r.id,
                Ok(None) | Err(_) => return,
            };
            let answer = server.keep_alive(id).await.map_err(KvError::into_status);
            let end = answer.is_err();
            if tx.send(answer).await.is_err() || end {
                return;
            }
        }
    });
    rx
}

/// Starts the leader's sweep: every [`SWEEP_INTERVAL`], on the leader, every lease whose deadline
/// passed is revoked by a proposal.
pub fn spawn_lease_upkeep(server: &Arc<KvServer>) {
    // Weak: the sweep ends with the node (and holds neither it nor its storage open).
    let weak = Arc::downgrade(server);
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(SWEEP_INTERVAL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let Some(server) = weak.upgrade() else { return };
            let st = server.driver.status();
            let term = (st.role == Role::Leader && !st.removed).then_some(st.term);
            let leases = if term.is_some() {
                let storage = Arc::clone(&server.storage);
                match tokio::task::spawn_blocking(move || lease_state::all(&*storage)).await {
                    Ok(Ok(all)) => all
                        .into_iter()
                        .map(|(id, r)| (id, r.ttl))
                        .collect::<Vec<_>>(),
                    Ok(Err(e)) => {
                        tracing::warn!(error = %e, "cannot read the leases; sweep skipped");
                        continue;
                    }
                    Err(_) => return,
                }
            } else {
                Vec::new()
            };
            let expired = server.leases.sweep(term, Instant::now(), &leases);
            if expired.len() == REVOKES_PER_SWEEP {
                tracing::info!(
                    "{REVOKES_PER_SWEEP} leases expired in one sweep; the rest follow in the next"
                );
            }
            for id in expired {
                tracing::info!(lease = id, "lease expired; proposing its revocation");
                let cmd = RaftCommand {
                    request_id: format!("n{}-lease-expiry-{id}", server.node_id),
                    command: Some(raft_command::Command::LeaseRevoke(LeaseRevokeCommand {
                        id,
                    })),
                };
                let driver = server.driver.clone();
                tokio::spawn(async move {
                    // A failure is retried by a later sweep (`lease::REVOKE_RETRY`).
                    if let Err(e) = driver.propose(cmd.encode_to_vec()).await {
                        tracing::debug!(lease = id, error = %e, "lease revocation not applied");
                    }
                });
            }
        }
    });
}
