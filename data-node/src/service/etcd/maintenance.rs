//! etcd's `Cluster.MemberList` and `Maintenance.Status` from the node's Raft status and member records.

use kiwi_proto::etcd::etcdserverpb::{
    Member, MemberListRequest, MemberListResponse, StatusRequest, StatusResponse,
    cluster_server::Cluster, maintenance_server::Maintenance,
};
use tonic::{Request, Response, Status};

use super::{ETCD_VERSION, Etcd, to_etcd};

/// The `Cluster` service (MemberList).
#[derive(Clone)]
pub struct EtcdCluster(pub Etcd);

/// The `Maintenance` service (Status).
#[derive(Clone)]
pub struct EtcdMaintenance(pub Etcd);

#[tonic::async_trait]
impl Cluster for EtcdCluster {
    async fn member_list(
        &self,
        _r: Request<MemberListRequest>,
    ) -> Result<Response<MemberListResponse>, Status> {
        let etcd = &self.0;
        let s = &etcd.server;
        let d = s
            .driver
            .detailed_status()
            .await
            .map_err(|e| to_etcd(s.map_propose(e).into_status()))?;
        let member = |id: u64, learner: bool| Member {
            id,
            name: format!("node-{id}"),
            peer_ur_ls: s
                .addrs
                .raft_addr(id)
                .map(|a| vec![format!("http://{a}")])
                .unwrap_or_default(),
            // Only this member's etcd address is known here; the others' are in their own answers.
            client_ur_ls: if id == s.node_id {
                vec![etcd.url.clone()]
            } else {
                Vec::new()
            },
            is_learner: learner,
        };
        let members = d
            .voters
            .iter()
            .map(|&id| member(id, false))
            .chain(d.learners.iter().map(|&id| member(id, true)))
            .collect();
        Ok(Response::new(MemberListResponse {
            header: etcd.header(d.status.applied),
            members,
        }))
    }
}

#[tonic::async_trait]
impl Maintenance for EtcdMaintenance {
    async fn status(&self, _r: Request<StatusRequest>) -> Result<Response<StatusResponse>, Status> {
        let etcd = &self.0;
        let s = &etcd.server;
        let d = s
            .driver
            .detailed_status()
            .await
            .map_err(|e| to_etcd(s.map_propose(e).into_status()))?;
        let dir = s
            .config
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .storage_dir();
        let size =
            tokio::task::spawn_blocking(move || crate::telemetry::storage_metrics::dir_size(&dir))
                .await
                .unwrap_or(0);
        let size = i64::try_from(size).unwrap_or(i64::MAX);
        Ok(Response::new(StatusResponse {
            header: etcd.header(d.status.applied),
            version: ETCD_VERSION.to_string(),
            db_size: size,
            leader: d.status.leader_id,
            raft_index: d.status.commit,
            raft_term: d.status.term,
            raft_applied_index: d.status.applied,
            errors: Vec::new(),
            db_size_in_use: size,
            is_learner: d.learners.contains(&s.node_id),
        }))
    }
}
