//! etcd's `Cluster.MemberList` and `Maintenance` (Alarm, Status, Hash, HashKV, MoveLeader, Defragment,
//! Snapshot) from the node's Raft status, member records and data.

use kiwi_proto::etcd::etcdserverpb::{
    AlarmRequest, AlarmResponse, DefragmentRequest, DefragmentResponse, HashKvRequest,
    HashKvResponse, HashRequest, HashResponse, Member, MemberAddRequest, MemberAddResponse,
    MemberListRequest, MemberListResponse, MemberPromoteRequest, MemberPromoteResponse,
    MemberRemoveRequest, MemberRemoveResponse, MoveLeaderRequest, MoveLeaderResponse,
    SnapshotRequest, SnapshotResponse, StatusRequest, StatusResponse, alarm_request::AlarmAction,
    cluster_server::Cluster, maintenance_server::Maintenance,
};
use kiwi_proto::v1 as kiwi;
use tonic::{Request, Response, Status};

use super::{ETCD_VERSION, Etcd, admin_via_leader, int, to_etcd, uint};
use crate::raft::driver::Role;

/// The `Cluster` service (MemberList, MemberAdd, MemberPromote, MemberRemove).
#[derive(Clone)]
pub struct EtcdCluster(pub Etcd);

/// The `Maintenance` service (Alarm, Status, Hash, HashKV, MoveLeader, Defragment, Snapshot).
#[derive(Clone)]
pub struct EtcdMaintenance(pub Etcd);

#[tonic::async_trait]
impl Cluster for EtcdCluster {
    async fn member_add(
        &self,
        r: Request<MemberAddRequest>,
    ) -> Result<Response<MemberAddResponse>, Status> {
        let etcd = &self.0;
        let r = r.into_inner();
        if !r.is_learner {
            return Err(Status::failed_precondition(
                "etcdserver: Kiwi adds a member as a learner, then promotes it once it has caught \
                 up: add it with --learner, start it (raft.join = true, raft.node_id = the new \
                 member's id), then run `etcdctl member promote ID`",
            ));
        }
        let Some(url) = r.peer_ur_ls.first() else {
            return Err(Status::invalid_argument(
                "etcdserver: give the new member's URL (--peer-urls http://host:port)",
            ));
        };
        let addr = url
            .trim_start_matches("http://")
            .trim_start_matches("https://")
            .trim_end_matches('/')
            .to_string();
        let d = etcd
            .server
            .driver
            .detailed_status()
            .await
            .map_err(|e| to_etcd(etcd.server.map_propose(e).into_status()))?;
        let id = d
            .voters
            .iter()
            .chain(&d.learners)
            .copied()
            .chain(etcd.server.addrs.all().into_iter().map(|(id, _)| id))
            .max()
            .unwrap_or(0)
            + 1;
        admin_via_leader!(
            etcd,
            add_node,
            kiwi::AddNodeRequest {
                node_id: id,
                addr: addr.clone(),
                raft_addr: String::new(),
                learner: true,
            }
        )
        .map_err(to_etcd)?;
        let list = self.list().await?;
        let member = list
            .members
            .iter()
            .find(|m| m.id == id)
            .cloned()
            .unwrap_or_else(|| Member {
                id,
                name: format!("node-{id}"),
                peer_ur_ls: vec![format!("http://{addr}")],
                client_ur_ls: Vec::new(),
                is_learner: true,
            });
        Ok(Response::new(MemberAddResponse {
            header: list.header,
            member: Some(member),
            members: list.members,
        }))
    }

    async fn member_promote(
        &self,
        r: Request<MemberPromoteRequest>,
    ) -> Result<Response<MemberPromoteResponse>, Status> {
        let etcd = &self.0;
        admin_via_leader!(
            etcd,
            add_node,
            kiwi::AddNodeRequest {
                node_id: r.into_inner().id,
                learner: false,
                ..kiwi::AddNodeRequest::default()
            }
        )
        .map_err(to_etcd)?;
        let list = self.list().await?;
        Ok(Response::new(MemberPromoteResponse {
            header: list.header,
            members: list.members,
        }))
    }

    async fn member_remove(
        &self,
        r: Request<MemberRemoveRequest>,
    ) -> Result<Response<MemberRemoveResponse>, Status> {
        let etcd = &self.0;
        admin_via_leader!(
            etcd,
            remove_node,
            kiwi::RemoveNodeRequest {
                node_id: r.into_inner().id,
            }
        )
        .map_err(to_etcd)?;
        let list = self.list().await?;
        Ok(Response::new(MemberRemoveResponse {
            header: list.header,
            members: list.members,
        }))
    }

    async fn member_list(
        &self,
        _r: Request<MemberListRequest>,
    ) -> Result<Response<MemberListResponse>, Status> {
        self.list().await.map(Response::new)
    }
}

/// How long a member's status is awaited for its etcd URL.
const URL_ASK_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(1);

impl EtcdCluster {
    /// Every member with its peer URL (its Raft address) and client URL (its etcd API, as it tells
    /// in `NodeAdmin.MemberInfo`: asked each time, the last answer kept for a member that does not
    /// answer).
    async fn list(&self) -> Result<MemberListResponse, Status> {
        let etcd = &self.0;
        let s = &etcd.server;
        let d = s
            .driver
            .detailed_status()
            .await
            .map_err(|e| to_etcd(s.map_propose(e).into_status()))?;
        let ids: Vec<(u64, bool)> = d
            .voters
            .iter()
            .map(|&id| (id, false))
            .chain(d.learners.iter().map(|&id| (id, true)))
            .collect();
        let mut asks = tokio::task::JoinSet::new();
        for ask in ids
            .iter()
            .filter(|(id, _)| *id != s.node_id)
            .filter_map(|&(id, _)| Some((id, s.addrs.get(id)?)))
            .map(|(id, addr)| {
                let admin = etcd.forward.admin(&addr);
                async move {
                    let mut admin = admin.ok()?;
                    let info = tokio::time::timeout(
                        URL_ASK_TIMEOUT,
                        admin.member_info(kiwi::MemberInfoRequest {}),
                    )
                    .await
                    .ok()?
                    .ok()?
                    .into_inner();
                    Some((id, info.etcd_url))
                }
            })
        {
            asks.spawn(ask);
        }
        let answers = asks.join_all().await;
        let urls = {
            let mut urls = etcd
                .urls
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            for (id, url) in answers.into_iter().flatten() {
                urls.insert(id, url);
            }
            urls.insert(s.node_id, etcd.url.clone());
            urls.clone()
        };
        let members = ids
            .into_iter()
            .map(|(id, learner)| Member {
                id,
                name: format!("node-{id}"),
                peer_ur_ls: s
                    .addrs
                    .raft_addr(id)
                    .map(|a| vec![format!("http://{a}")])
                    .unwrap_or_default(),
                // `host:port`, without the scheme: etcdctl's `--cluster` commands dial a member's
                // client URLs as given and send them as the HTTP/2 `:authority`, which must be a bare
                // `host:port` here (the HTTP/2 library refuses `http://...` there; etcd's accepts
                // it). TLS is the client's choice either way (its CA flags), as with etcd.
                client_ur_ls: urls
                    .get(&id)
                    .map(|u| u.split_once("://").map_or(u.as_str(), |(_, a)| a))
                    .filter(|u| !u.is_empty())
                    .map(|u| vec![u.to_string()])
                    .unwrap_or_default(),
                is_learner: learner,
            })
            .collect();
        Ok(MemberListResponse {
            header: etcd.header(d.status.applied),
            members,
        })
    }
}

impl Etcd {
    /// CRC-32 of this member's keys at `revision` (0: its applied index), in key order; and the
    /// revision hashed.
    async fn hash_kv(&self, revision: u64) -> Result<(u32, u64), Status> {
        let at = if revision == 0 {
            self.server.driver.status().applied
        } else {
            revision
        };
        let mut hasher = crc32fast::Hasher::new();
        let mut start = vec![0u8];
        loop {
            let page = self
                .kv
                .scan_message(Request::new(kiwi::ScanRequest {
                    start_key: start.clone(),
                    limit: crate::service::MAX_SCAN_LIMIT,
                    consistency: kiwi::Consistency::Serializable as i32,
                    revision: at,
                    ..kiwi::ScanRequest::default()
                }))
                .await?
                .into_inner();
            for kv in &page.kvs {
                for n in [kv.key.len() as u64, kv.value.len() as u64] {
                    hasher.update(&n.to_be_bytes());
                }
                hasher.update(&kv.key);
                hasher.update(&kv.value);
                for n in [kv.create_revision, kv.mod_revision, kv.version, kv.lease] {
                    hasher.update(&n.to_be_bytes());
                }
            }
            match page.kvs.last() {
                Some(last) if page.more => {
                    start = last.key.clone();
                    start.push(0);
                }
                _ => return Ok((hasher.finalize(), at)),
            }
        }
    }
}

#[tonic::async_trait]
impl Maintenance for EtcdMaintenance {
    async fn defragment(
        &self,
        _r: Request<DefragmentRequest>,
    ) -> Result<Response<DefragmentResponse>, Status> {
        let etcd = &self.0;
        etcd.server.defragment().await.map_err(to_etcd)?;
        Ok(Response::new(DefragmentResponse {
            header: etcd.header(etcd.server.driver.status().applied),
        }))
    }

    async fn hash(&self, _r: Request<HashRequest>) -> Result<Response<HashResponse>, Status> {
        let etcd = &self.0;
        let (hash, at) = etcd.hash_kv(0).await.map_err(to_etcd)?;
        Ok(Response::new(HashResponse {
            header: etcd.header(at),
            hash,
        }))
    }

    type SnapshotStream = tokio_stream::wrappers::ReceiverStream<Result<SnapshotResponse, Status>>;

    async fn snapshot(
        &self,
        _r: Request<SnapshotRequest>,
    ) -> Result<Response<Self::SnapshotStream>, Status> {
        let etcd = self.0.clone();
        let mut pieces = etcd
            .server
            .backup(false, |blob| blob)
            .await
            .map_err(|e| to_etcd(e.into_status()))?;
        let header = etcd.header(etcd.server.driver.status().applied);
        // One piece of look-ahead, so that the last one can say that nothing remains.
        let (tx, rx) = tokio::sync::mpsc::channel(1);
        tokio::spawn(async move {
            let mut held: Option<Vec<u8>> = None;
            while let Some(piece) = pieces.recv().await {
                let blob = match piece {
                    Ok(b) => b,
                    Err(s) => {
                        let _ = tx.send(Err(to_etcd(s))).await;
                        return;
                    }
                };
                if let Some(prev) = held.replace(blob) {
                    let answer = SnapshotResponse {
                        header,
                        remaining_bytes: 1,
                        blob: prev,
                    };
                    if tx.send(Ok(answer)).await.is_err() {
                        return;
                    }
                }
            }
            if let Some(last) = held {
                let answer = SnapshotResponse {
                    header,
                    remaining_bytes: 0,
                    blob: last,
                };
                let _ = tx.send(Ok(answer)).await;
            }
        });
        let stream = tokio_stream::wrappers::ReceiverStream::new(rx);
        Ok(Response::new(stream))
    }

    async fn alarm(&self, r: Request<AlarmRequest>) -> Result<Response<AlarmResponse>, Status> {
        let etcd = &self.0;
        if r.into_inner().action != AlarmAction::Get as i32 {
            return Err(Status::invalid_argument(
                "etcdserver: Kiwi raises no alarms: there is none to activate or deactivate",
            ));
        }
        Ok(Response::new(AlarmResponse {
            header: etcd.header(etcd.server.driver.status().applied),
            alarms: Vec::new(),
        }))
    }

    async fn hash_kv(&self, r: Request<HashKvRequest>) -> Result<Response<HashKvResponse>, Status> {
        let etcd = &self.0;
        let (hash, at) = etcd
            .hash_kv(uint(r.into_inner().revision))
            .await
            .map_err(to_etcd)?;
        let compacted = crate::raft::mvcc::compacted(&*etcd.server.storage)
            .map_err(|e| Status::internal(format!("etcdserver: {e}")))?;
        Ok(Response::new(HashKvResponse {
            header: etcd.header(at),
            hash,
            compact_revision: int(compacted),
            hash_revision: int(at),
        }))
    }

    async fn move_leader(
        &self,
        r: Request<MoveLeaderRequest>,
    ) -> Result<Response<MoveLeaderResponse>, Status> {
        let etcd = &self.0;
        let st = etcd.server.driver.status();
        if st.role != Role::Leader {
            return Err(Status::failed_precondition("etcdserver: not leader"));
        }
        kiwi_proto::v1::node_admin_server::NodeAdmin::transfer_leader(
            &crate::service::AdminApi(std::sync::Arc::clone(&etcd.server)),
            Request::new(kiwi::TransferLeaderRequest {
                node_id: r.into_inner().target_id,
            }),
        )
        .await
        .map_err(to_etcd)?;
        Ok(Response::new(MoveLeaderResponse {
            header: etcd.header(etcd.server.driver.status().applied),
        }))
    }

    async fn status(&self, _r: Request<StatusRequest>) -> Result<Response<StatusResponse>, Status> {
        let etcd = &self.0;
        let s = &etcd.server;
        let d = s
            .driver
            .detailed_status()
            .await
            .map_err(|e| to_etcd(s.map_propose(e).into_status()))?;
        let size = int(s.data_dir_bytes().await);
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
