//! The `NodeAdmin` handlers: status, membership changes, leadership transfer, runtime policy and stats,
//! backups.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use kiwi_proto::v1::node_admin_server::NodeAdmin;
use kiwi_proto::v1::{
    AddNodeRequest, BackupPiece, BackupRequest, DefragmentRequest, DefragmentResponse,
    GetRuntimePolicyRequest, MembershipResponse, PoolStats, PriorityClassStats, RemoveNodeRequest,
    RuntimePolicy, RuntimeStatsRequest, RuntimeStatsResponse, ScaleEvent, StatusRequest,
    StatusResponse, TransferLeaderRequest, TransferLeaderResponse,
};
use raft::eraftpb::{ConfChangeSingle, ConfChangeType, ConfChangeV2};
use tonic::{Request, Response, Status};

use kiwi_proto::v1::{
    FollowerMetrics, LatencySummary, RaftMetricsRequest, RaftMetricsResponse, RaftMetricsSample,
};

use super::*;
use crate::raft::driver::Role;
use crate::raft::driver::wire_role;
use crate::raft::state_machine::ApplyOutcome;
use crate::runtime::priority_channel::{ChannelPolicy, Class};

/// The `NodeAdmin` implementation.
#[derive(Clone)]
pub struct AdminApi(pub Arc<KvServer>);

fn latency(l: &crate::telemetry::raft_metrics::Latency) -> Option<LatencySummary> {
    Some(LatencySummary {
        count: l.count,
        p50_us: l.p50_us,
        p99_us: l.p99_us,
        max_us: l.max_us,
        mean_us: l.mean_us,
    })
}

fn follower_metrics(f: &crate::telemetry::raft_metrics::Follower) -> FollowerMetrics {
    FollowerMetrics {
        node_id: f.id,
        match_index: f.match_index,
        lag: f.lag,
        recently_active: f.recently_active,
        voter: f.voter,
        replication_latency_avg_us: f.replication_avg_us,
        replication_latency: latency(&f.replication),
        snapshots_sent: f.snapshots_sent,
        snapshots_failed: f.snapshots_failed,
        snapshot_duration: latency(&f.snapshot_duration),
    }
}

#[tonic::async_trait]
impl NodeAdmin for AdminApi {
    async fn get_raft_metrics(
        &self,
        request: Request<RaftMetricsRequest>,
    ) -> Result<Response<RaftMetricsResponse>, Status> {
        let s = &self.0;
        let with_history = !request.into_inner().without_history;
        let report = s
            .driver
            .raft_metrics(with_history)
            .await
            .map_err(|e| s.map_propose(e).into_status())?
            .ok_or_else(|| {
                Status::failed_precondition(
                    "Raft metrics are off on this node: set [raft.metrics] enabled = true",
                )
            })?;
        let (st, m) = (report.status, report.metrics);
        let config = s
            .config
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .raft
            .metrics
            .clone();
        let ms = |d: std::time::Duration| u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
        let unix_ms =
            |t: std::time::SystemTime| t.duration_since(std::time::UNIX_EPOCH).map_or(0, &ms);
        Ok(Response::new(RaftMetricsResponse {
            node_id: s.node_id,
            role: wire_role(st.role) as i32,
            term: st.term,
            leader_id: st.leader_id,
            commit_index: st.commit,
            applied_index: st.applied,
            log_first_index: st.first_index,
            log_last_index: report.last_index,
            elections: m.elections,
            leader_changes: m.leader_changes,
            last_election_ms: m.last_election.map_or(0, ms),
            commit_rate: m.commit_rate,
            apply_rate: m.apply_rate,
            proposals_committed: m.proposals_committed,
            proposals_dropped: m.proposals_dropped,
            proposals_rejected: m.proposals_rejected,
            propose_to_apply: latency(&m.propose_to_apply),
            read_index: latency(&m.read_index),
            ready_handling: latency(&m.ready_handling),
            log_fsync: latency(&m.log_fsync),
            log_fsync_entries: m.log_fsync_entries,
            followers: m.followers.iter().map(follower_metrics).collect(),
            history: m
                .history
                .iter()
                .map(|h| RaftMetricsSample {
                    at_unix_ms: unix_ms(h.at),
                    term: h.term,
                    role: h.role as i32,
                    commit_index: h.commit,
                    applied_index: h.applied,
                    max_follower_lag: h.max_follower_lag,
                })
                .collect(),
            collection_interval_ms: u32::try_from(config.collection_interval.as_millis())
                .unwrap_or(u32::MAX),
            retention_period_sec: u32::try_from(config.retention_period.as_secs())
                .unwrap_or(u32::MAX),
        }))
    }

    async fn status(
        &self,
        _request: Request<StatusRequest>,
    ) -> Result<Response<StatusResponse>, Status> {
        let s = &self.0;
        let d = s
            .driver
            .detailed_status()
            .await
            .map_err(|e| s.map_propose(e).into_status())?;
        let role = wire_role(d.status.role);
        Ok(Response::new(StatusResponse {
            node_id: s.node_id,
            cluster_id: s.cluster.load(Ordering::Relaxed),
            role: role as i32,
            term: d.status.term,
            leader_id: d.status.leader_id,
            commit_index: d.status.commit,
            applied_index: d.status.applied,
            peers: d
                .peers
                .into_iter()
                .map(|p| kiwi_proto::v1::PeerProgress {
                    node_id: p.id,
                    addr: s.addrs.get(p.id).unwrap_or_default(),
                    match_index: p.match_index,
                    recently_active: p.recently_active,
                    voter: p.voter,
                })
                .collect(),
            storage_backend: s.backend.as_str().to_string(),
            log_first_index: d.status.first_index,
            voters: d.voters,
            learners: d.learners,
            rejected_entries: d.status.rejected_entries,
            removed: d.status.removed,
            security: Some(s.security_status()),
            transferring_to: d.status.transferring_to,
            data_dir_bytes: s.data_dir_bytes().await,
        }))
    }

    async fn add_node(
        &self,
        request: Request<AddNodeRequest>,
    ) -> Result<Response<MembershipResponse>, Status> {
        let s = &self.0;
        let req = request.into_inner();
        let run = async {
            if req.node_id == 0 {
                return Err(KvError::InvalidArgument(
                    "node_id must be at least 1".into(),
                ));
            }
            // A promotion of a learner may leave the addresses out: the recorded ones stay.
            let record = if req.addr.is_empty() && req.raft_addr.is_empty() && !req.learner {
                String::new()
            } else {
                crate::config::check_member_addr(&req.addr)
                    .map_err(|e| KvError::InvalidArgument(format!("addr: {e}")))?;
                if !req.raft_addr.is_empty() {
                    crate::config::check_member_addr(&req.raft_addr)
                        .map_err(|e| KvError::InvalidArgument(format!("raft_addr: {e}")))?;
                }
                crate::config::member_record(
                    &req.addr,
                    Some(req.raft_addr.as_str()).filter(|a| !a.is_empty()),
                )
            };
            let d = s
                .driver
                .detailed_status()
                .await
                .map_err(|e| s.map_propose(e))?;
            if d.status.role != Role::Leader {
                return Err(s.not_leader(d.status.leader_id));
            }
            if d.voters.contains(&req.node_id) {
                return Err(KvError::Precondition(format!(
                    "node {} is already a voter",
                    req.node_id
                )));
            }
            if d.learners.contains(&req.node_id) {
                if req.learner {
                    return Err(KvError::Precondition(format!(
                        "node {} is already a learner (promote it with learner = false)",
                        req.node_id
                    )));
                }
            } else {
                if record.is_empty() {
                    return Err(KvError::InvalidArgument(format!(
                        "addr: node {} is not a member yet: give its address",
                        req.node_id
                    )));
                }
                let out = s
                    .membership_change(ConfChangeType::AddLearnerNode, req.node_id, &record)
                    .await?;
                if req.learner {
                    tracing::info!(node_id = req.node_id, addr = %req.addr, "added a learner");
                    return s.membership(out.index).await;
                }
                tracing::info!(node_id = req.node_id, addr = %req.addr, "added a learner; waiting for it to catch up");
            }
            let target = s.driver.status().commit;
            s.wait_caught_up(req.node_id, target).await?;
            let out = s
                .membership_change(ConfChangeType::AddNode, req.node_id, &record)
                .await?;
            tracing::info!(node_id = req.node_id, "promoted the learner to voter");
            s.membership(out.index).await
        };
        run.await.map(Response::new).map_err(KvError::into_status)
    }

    async fn remove_node(
        &self,
        request: Request<RemoveNodeRequest>,
    ) -> Result<Response<MembershipResponse>, Status> {
        let s = &self.0;
        let req = request.into_inner();
        let run = async {
            let d = s
                .driver
                .detailed_status()
                .await
                .map_err(|e| s.map_propose(e))?;
            if d.status.role != Role::Leader {
                return Err(s.not_leader(d.status.leader_id));
            }
            if !d.voters.contains(&req.node_id) && !d.learners.contains(&req.node_id) {
                return Err(KvError::Precondition(format!(
                    "node {} is not a member",
                    req.node_id
                )));
            }
            if req.node_id == s.node_id {
                // Removing the leader itself: hand leadership to the most up-to-date other voter
                // first, then send the caller there (raft-rs keeps a removed leader leading).
                let to = d
                    .peers
                    .iter()
                    .filter(|p| p.voter && p.id != s.node_id)
                    .max_by_key(|p| (p.recently_active, p.match_index))
                    .map(|p| p.id)
                    .ok_or_else(|| {
                        KvError::Precondition(format!(
                            "node {} is the only voter and cannot be removed",
                            s.node_id
                        ))
                    })?;
                tracing::info!(
                    to,
                    "RemoveNode of the leader: transferring leadership first"
                );
                let leader = s.transfer_and_wait(to).await?;
                return Err(s.not_leader(leader.leader_id));
            }
            let out = s
                .membership_change(ConfChangeType::RemoveNode, req.node_id, "")
                .await?;
            s.membership(out.index).await
        };
        run.await.map(Response::new).map_err(KvError::into_status)
    }

    async fn get_runtime_policy(
        &self,
        _request: Request<GetRuntimePolicyRequest>,
    ) -> Result<Response<RuntimePolicy>, Status> {
        Ok(Response::new(self.0.runtime_policy()))
    }

    async fn set_runtime_policy(
        &self,
        request: Request<RuntimePolicy>,
    ) -> Result<Response<RuntimePolicy>, Status> {
        self.0
            .set_runtime_policy(request.into_inner())
            .map(Response::new)
            .map_err(KvError::into_status)
    }

    async fn runtime_stats(
        &self,
        _request: Request<RuntimeStatsRequest>,
    ) -> Result<Response<RuntimeStatsResponse>, Status> {
        Ok(Response::new(self.0.runtime_stats()))
    }

    async fn transfer_leader(
        &self,
        request: Request<TransferLeaderRequest>,
    ) -> Result<Response<TransferLeaderResponse>, Status> {
        let s = &self.0;
        let to = request.into_inner().node_id;
        let run = async {
            let d = s
                .driver
                .detailed_status()
                .await
                .map_err(|e| s.map_propose(e))?;
            if d.status.role != Role::Leader {
                return Err(s.not_leader(d.status.leader_id));
            }
            if !d.voters.contains(&to) {
                return Err(KvError::InvalidArgument(format!(
                    "node {to} is not a voter"
                )));
            }
            let st = s.transfer_and_wait(to).await?;
            Ok(TransferLeaderResponse {
                leader_id: st.leader_id,
                term: st.term,
            })
        };
        run.await.map(Response::new).map_err(KvError::into_status)
    }

    async fn member_info(
        &self,
        _request: Request<kiwi_proto::v1::MemberInfoRequest>,
    ) -> Result<Response<kiwi_proto::v1::MemberInfoResponse>, Status> {
        Ok(Response::new(kiwi_proto::v1::MemberInfoResponse {
            etcd_url: self.0.etcd_url.get().cloned().unwrap_or_default(),
        }))
    }

    async fn defragment(
        &self,
        _request: Request<DefragmentRequest>,
    ) -> Result<Response<DefragmentResponse>, Status> {
        self.0.defragment().await.map(Response::new)
    }

    type BackupStream = tokio_stream::wrappers::ReceiverStream<Result<BackupPiece, Status>>;

    async fn backup(
        &self,
        request: Request<BackupRequest>,
    ) -> Result<Response<Self::BackupStream>, Status> {
        let rx = self
            .0
            .backup(request.into_inner().consistent, |data| BackupPiece { data })
            .await
            .map_err(KvError::into_status)?;
        Ok(Response::new(tokio_stream::wrappers::ReceiverStream::new(
            rx,
        )))
    }
}

/// Pieces of a backup in flight to its client: the reader waits while they are unread, so a backup
/// holds about this many chunks in memory whatever its size.
const BACKUP_PIECES_IN_FLIGHT: usize = 2;

impl KvServer {
    /// The storage directory.
    fn storage_dir(&self) -> std::path::PathBuf {
        self.config
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .storage_dir()
    }

    /// Bytes of the files in the storage directory (read on a blocking thread).
    pub(crate) async fn data_dir_bytes(&self) -> u64 {
        let dir = self.storage_dir();
        tokio::task::spawn_blocking(move || crate::telemetry::storage_metrics::dir_size(&dir))
            .await
            .unwrap_or(0)
    }

    /// Compacts the storage engine's whole range (see `NodeAdmin.Defragment`).
    pub(crate) async fn defragment(&self) -> Result<DefragmentResponse, Status> {
        if self.defragmenting.swap(true, Ordering::SeqCst) {
            return Err(Status::failed_precondition(
                "a defragmentation is already running on this node",
            ));
        }
        let storage = Arc::clone(&self.storage);
        let dir = self.storage_dir();
        let ran = tokio::task::spawn_blocking(move || {
            let size = crate::telemetry::storage_metrics::dir_size;
            let before = size(&dir);
            let started = std::time::Instant::now();
            let r = storage.compact_all();
            (before, r, started.elapsed(), size(&dir))
        })
        .await;
        self.defragmenting.store(false, Ordering::SeqCst);
        let (before, r, took, after) =
            ran.map_err(|e| Status::internal(format!("the defragmentation stopped: {e}")))?;
        if let Err(e) = r {
            return Err(match self.backend {
                BackendKind::LevelDb => Status::failed_precondition(e.to_string()),
                _ => Status::internal(format!("defragmentation failed: {e}")),
            });
        }
        tracing::info!(
            bytes_before = before,
            bytes_after = after,
            took_ms = took.as_millis() as u64,
            "defragmented the storage engine"
        );
        Ok(DefragmentResponse {
            bytes_before: before,
            bytes_after: after,
            took_ms: u64::try_from(took.as_millis()).unwrap_or(u64::MAX),
        })
    }

    /// Streams a backup of this node's state (see `NodeAdmin.Backup`), each piece wrapped by `piece`;
    /// after a ReadIndex round when `consistent`.
    pub(crate) async fn backup<T: Send + 'static>(
        &self,
        consistent: bool,
        piece: impl Fn(Vec<u8>) -> T + Send + 'static,
    ) -> Result<tokio::sync::mpsc::Receiver<Result<T, Status>>, KvError> {
        if consistent {
            self.read_index_applied().await?;
        }
        let view = self
            .gate
            .read(|| self.storage.snapshot())
            .ok_or(KvError::Installing)?
            .map_err(KvError::Storage)?;
        let mut header = crate::raft::backup::header(&*view).map_err(KvError::Storage)?;
        header.cluster_id = self.cluster.load(Ordering::Relaxed);
        header.node_id = self.node_id;
        header.term = self.driver.status().term;
        let (tx, rx) = tokio::sync::mpsc::channel(BACKUP_PIECES_IN_FLIGHT);
        tokio::task::spawn_blocking(move || {
            let index = header.index;
            let written = crate::raft::backup::write(&*view, &header, |bytes| {
                tx.blocking_send(Ok(piece(bytes))).is_ok()
            });
            match written {
                Ok(keys) => tracing::info!(index, keys, "streamed a backup"),
                Err(e) => {
                    tracing::warn!(error = %e, "a backup failed");
                    let _ = tx.blocking_send(Err(Status::internal(format!(
                        "the backup failed reading storage: {e}"
                    ))));
                }
            }
        });
        Ok(rx)
    }
}

impl KvServer {
    /// Asks Raft to hand leadership to `to` and waits until it has.
    async fn transfer_and_wait(&self, to: u64) -> Result<crate::raft::driver::RaftStatus, KvError> {
        self.driver
            .transfer_leader(to)
            .map_err(|e| self.map_propose(e))?;
        let mut watch = self.driver.watch();
        let wait = watch.wait_for(|st| st.leader_id == to);
        match tokio::time::timeout(DEFAULT_TIMEOUT, wait).await {
            Ok(Ok(st)) => Ok(*st),
            Ok(Err(_)) => Err(KvError::Stopped),
            Err(_) => Err(KvError::Timeout(DEFAULT_TIMEOUT)),
        }
    }

    async fn membership_change(
        &self,
        change_type: ConfChangeType,
        node_id: u64,
        record: &str,
    ) -> Result<ApplyOutcome, KvError> {
        let mut single = ConfChangeSingle::default();
        single.set_change_type(change_type);
        single.node_id = node_id;
        let mut cc = ConfChangeV2::default();
        cc.set_changes(vec![single].into());
        cc.context = record.as_bytes().to_vec().into();
        let fut = self.driver.change_membership(cc);
        match tokio::time::timeout(DEFAULT_TIMEOUT, fut).await {
            Ok(r) => r.map_err(|e| self.map_propose(e)),
            Err(_) => Err(KvError::Timeout(DEFAULT_TIMEOUT)),
        }
    }

    async fn membership(&self, index: u64) -> Result<MembershipResponse, KvError> {
        let d = self
            .driver
            .detailed_status()
            .await
            .map_err(|e| self.map_propose(e))?;
        Ok(MembershipResponse {
            voters: d.voters,
            learners: d.learners,
            index,
        })
    }

    /// Waits until the leader sees `node_id`'s log at `target` or beyond.
    async fn wait_caught_up(&self, node_id: u64, target: u64) -> Result<(), KvError> {
        let deadline = tokio::time::Instant::now() + CATCH_UP_TIMEOUT;
        loop {
            let d = self
                .driver
                .detailed_status()
                .await
                .map_err(|e| self.map_propose(e))?;
            if d.status.role != Role::Leader {
                return Err(self.not_leader(d.status.leader_id));
            }
            let matched = d
                .peers
                .iter()
                .find(|p| p.id == node_id)
                .map_or(0, |p| p.match_index);
            if matched >= target {
                return Ok(());
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(KvError::Precondition(format!(
                    "node {node_id} is still a learner: its log reached {matched} of {target} within \
                     {CATCH_UP_TIMEOUT:?}; check that it runs with raft.join = true and can reach the leader, \
                     then call AddNode again to promote it"
                )));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl KvServer {
    pub(crate) fn runtime_policy(&self) -> RuntimePolicy {
        self.config
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .runtime
            .to_policy()
    }

    /// Validates `policy` like the config file (unset parts stay as they are) and puts it in force.
    pub(crate) fn set_runtime_policy(
        &self,
        policy: RuntimePolicy,
    ) -> Result<RuntimePolicy, KvError> {
        let mut config = self
            .config
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut next = config.clone();
        let pct = |v: u32, field: &str| {
            u8::try_from(v)
                .map_err(|_| KvError::InvalidArgument(format!("{field}: must be 1-100, got {v}")))
        };
        if let Some(s) = policy.scaling {
            let sc = &mut next.runtime.scaling;
            sc.enabled = s.enabled;
            sc.min_storage_threads = s.min_storage_threads as usize;
            sc.max_storage_threads = s.max_storage_threads as usize;
            sc.scale_up_threshold =
                pct(s.scale_up_threshold, "runtime.scaling.scale_up_threshold")?;
            sc.scale_down_threshold = pct(
                s.scale_down_threshold,
                "runtime.scaling.scale_down_threshold",
            )?;
            sc.scale_increment = s.scale_increment as usize;
            sc.evaluation_interval = Duration::from_millis(u64::from(s.evaluation_interval_ms));
        }
        if let Some(p) = policy.priority {
            let pr = &mut next.runtime.priority;
            pr.enabled = p.enabled;
            pr.high_priority_weight = p.high_priority_weight;
            pr.normal_priority_weight = p.normal_priority_weight;
            pr.low_priority_weight = p.low_priority_weight;
        }
        next.validate().map_err(|e| {
            KvError::InvalidArgument(format!("policy refused, the old one stays: {e}"))
        })?;
        self.pool.set_policy((&next.runtime.scaling).into());
        self.channel.set_policy(ChannelPolicy::from_config(
            &next.runtime.priority,
            crate::QUEUE_CAPACITY,
        ));
        tracing::info!(policy = ?next.runtime, "runtime policy changed");
        *config = next;
        Ok(config.runtime.to_policy())
    }

    /// The metrics snapshot a heartbeat to the control plane carries.
    /// Waits for the driver's report at most `wait`: a stalled driver makes the snapshot stale, never
    /// late (see `NodeMetrics.raft_stale`).
    pub(crate) async fn heartbeat_metrics(
        &self,
        wait: std::time::Duration,
    ) -> kiwi_proto::v1::NodeMetrics {
        let st = self.driver.status();
        let (report, raft_stale) =
            match tokio::time::timeout(wait, self.driver.raft_metrics(false)).await {
                Ok(r) => (r.ok().flatten(), false),
                Err(_) => (None, true),
            };
        let runtime = self.runtime_stats();
        let data_dir_bytes = self.data_dir_bytes().await;
        kiwi_proto::v1::NodeMetrics {
            role: wire_role(st.role) as i32,
            term: st.term,
            leader_id: st.leader_id,
            commit_index: st.commit,
            applied_index: st.applied,
            first_index: st.first_index,
            last_index: report.as_ref().map_or(0, |r| r.last_index),
            followers: report
                .as_ref()
                .map(|r| r.metrics.followers.iter().map(follower_metrics).collect())
                .unwrap_or_default(),
            commit_rate: report.as_ref().map_or(0.0, |r| r.metrics.commit_rate),
            apply_rate: report.as_ref().map_or(0.0, |r| r.metrics.apply_rate),
            storage_pool: runtime.storage_pool,
            classes: runtime.classes,
            data_dir_bytes,
            rejected_entries: st.rejected_entries,
            // Filled in by the control link, which owns the policy version.
            policy_version: 0,
            policy_epoch: 0,
            raft_stale,
        }
    }

    /// What a node registers with at the control plane.
    pub(crate) fn registration(
        &self,
        heartbeat_interval: std::time::Duration,
        started_at_unix_ms: u64,
    ) -> kiwi_proto::v1::Register {
        let faults = self
            .config
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .raft
            .fault_injection
            .clone();
        kiwi_proto::v1::Register {
            node_id: self.node_id,
            cluster_id: self.cluster.load(std::sync::atomic::Ordering::SeqCst),
            client_addr: self.addrs.get(self.node_id).unwrap_or_default(),
            backend: self.backend.to_string(),
            version: env!("CARGO_PKG_VERSION").to_string(),
            started_at_unix_ms,
            heartbeat_interval_ms: u64::try_from(heartbeat_interval.as_millis())
                .unwrap_or(u64::MAX),
            fault_injection_enabled: faults.enabled,
            fault_max_duration_ms: faults.max_duration_sec.saturating_mul(1000),
        }
    }

    fn runtime_stats(&self) -> RuntimeStatsResponse {
        let m = self.pool.metrics();
        let n = |v: usize| u32::try_from(v).unwrap_or(u32::MAX);
        let stats = self.channel.stats();
        RuntimeStatsResponse {
            storage_pool: Some(PoolStats {
                current_threads: n(m.current),
                target_threads: n(m.target),
                utilisation_percent: m.utilisation,
                queue_len: n(m.queue_len),
                events: m
                    .events
                    .into_iter()
                    .map(|e| ScaleEvent {
                        at_unix_ms: e
                            .at
                            .duration_since(std::time::UNIX_EPOCH)
                            .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX)),
                        from_threads: n(e.from),
                        to_threads: n(e.to),
                        reason: e.reason,
                    })
                    .collect(),
            }),
            classes: Class::ALL
                .iter()
                .zip(stats.classes)
                .map(|(c, st)| PriorityClassStats {
                    class: c.name().to_string(),
                    enqueued: st.enqueued,
                    served: st.served,
                    shed: st.shed,
                    expired: st.expired,
                    depth: n(st.depth),
                    wait_histogram: st.wait_buckets.to_vec(),
                })
                .collect(),
            network_threads: n(tokio::runtime::Handle::current().metrics().num_workers()),
            low_runs_at_lower_os_priority: self.pool.os_priority(),
        }
    }
}
