//! etcd's `Lease` service on Kiwi's leases (same rules: the leader's clock, a fresh TTL per leader, the
//! TTL floor). Keepalives that reach a member which is not the leader are passed to the leader.

use kiwi_proto::etcd::etcdserverpb::{
    LeaseGrantRequest, LeaseGrantResponse, LeaseKeepAliveRequest, LeaseKeepAliveResponse,
    LeaseLeasesRequest, LeaseLeasesResponse, LeaseRevokeRequest, LeaseRevokeResponse, LeaseStatus,
    LeaseTimeToLiveRequest, LeaseTimeToLiveResponse, lease_server::Lease,
};
use kiwi_proto::v1 as kiwi;
use tokio::sync::mpsc;
use tonic::{Code, Request, Response, Status, Streaming};

use super::{Etcd, int, leader_addr, to_etcd, uint, via_leader};

/// The `Lease` service.
#[derive(Clone)]
pub struct EtcdLease(pub Etcd);

impl Etcd {
    /// One keepalive: on this node when it leads, else on the leader.
    async fn keep_alive(&self, id: i64) -> Result<LeaseKeepAliveResponse, Status> {
        let answer = match self.server.keep_alive(uint(id)).await {
            Ok(a) => a,
            Err(e) => {
                let s = e.into_status();
                let Some(addr) = leader_addr(&s) else {
                    return Err(s);
                };
                let mut c = self.forward.client(&addr)?;
                let request = tokio_stream::once(kiwi::LeaseKeepAliveRequest { id: uint(id) });
                let mut answers = c.lease_keep_alive(request).await?.into_inner();
                answers
                    .message()
                    .await?
                    .ok_or_else(|| Status::unavailable("the leader ended the keepalive stream"))?
            }
        };
        Ok(LeaseKeepAliveResponse {
            header: self.header(answer.header.map_or(0, |h| h.revision)),
            id,
            ttl: answer.ttl,
        })
    }
}

#[tonic::async_trait]
impl Lease for EtcdLease {
    async fn lease_grant(
        &self,
        r: Request<LeaseGrantRequest>,
    ) -> Result<Response<LeaseGrantResponse>, Status> {
        let r = r.into_inner();
        let etcd = &self.0;
        if r.id < 0 {
            return Err(Status::invalid_argument(
                "etcdserver: a lease id must not be negative",
            ));
        }
        let out = via_leader!(
            etcd,
            lease_grant,
            kiwi::LeaseGrantRequest {
                header: None,
                ttl: r.ttl,
                id: uint(r.id),
            }
        )
        .map_err(to_etcd)?;
        Ok(Response::new(LeaseGrantResponse {
            header: etcd.header(out.header.map_or(0, |h| h.revision)),
            id: int(out.id),
            ttl: out.ttl,
            error: String::new(),
        }))
    }

    async fn lease_revoke(
        &self,
        r: Request<LeaseRevokeRequest>,
    ) -> Result<Response<LeaseRevokeResponse>, Status> {
        let etcd = &self.0;
        let out = via_leader!(
            etcd,
            lease_revoke,
            kiwi::LeaseRevokeRequest {
                header: None,
                id: uint(r.into_inner().id),
            }
        )
        .map_err(to_etcd)?;
        Ok(Response::new(LeaseRevokeResponse {
            header: etcd.header(out.header.map_or(0, |h| h.revision)),
        }))
    }

    type LeaseKeepAliveStream =
        tokio_stream::wrappers::ReceiverStream<Result<LeaseKeepAliveResponse, Status>>;

    async fn lease_keep_alive(
        &self,
        r: Request<Streaming<LeaseKeepAliveRequest>>,
    ) -> Result<Response<Self::LeaseKeepAliveStream>, Status> {
        let mut requests = r.into_inner();
        let (tx, rx) = mpsc::channel(16);
        let etcd = self.0.clone();
        // Keepalives passed to the leader go as this stream's caller.
        let caller = super::auth::caller_token();
        tokio::spawn(super::auth::as_caller(caller, async move {
            loop {
                let request = tokio::select! {
                    r = requests.message() => r,
                    () = tx.closed() => return,
                };
                let Ok(Some(request)) = request else { return };
                let answer = etcd.keep_alive(request.id).await.map_err(to_etcd);
                let end = answer.is_err();
                if tx.send(answer).await.is_err() || end {
                    return;
                }
            }
        }));
        Ok(Response::new(tokio_stream::wrappers::ReceiverStream::new(
            rx,
        )))
    }

    async fn lease_time_to_live(
        &self,
        r: Request<LeaseTimeToLiveRequest>,
    ) -> Result<Response<LeaseTimeToLiveResponse>, Status> {
        let r = r.into_inner();
        let etcd = &self.0;
        match via_leader!(
            etcd,
            lease_time_to_live,
            kiwi::LeaseTimeToLiveRequest {
                header: None,
                id: uint(r.id),
                keys: r.keys,
            }
        ) {
            Ok(out) => Ok(Response::new(LeaseTimeToLiveResponse {
                header: etcd.header(out.header.map_or(0, |h| h.revision)),
                id: r.id,
                ttl: out.ttl,
                granted_ttl: out.granted_ttl,
                keys: out.keys,
            })),
            // etcd answers a lease that does not exist with a TTL of -1.
            Err(s) if s.code() == Code::NotFound => Ok(Response::new(LeaseTimeToLiveResponse {
                header: etcd.header(etcd.server.driver.status().applied),
                id: r.id,
                ttl: -1,
                granted_ttl: 0,
                keys: Vec::new(),
            })),
            Err(s) => Err(to_etcd(s)),
        }
    }

    async fn lease_leases(
        &self,
        _r: Request<LeaseLeasesRequest>,
    ) -> Result<Response<LeaseLeasesResponse>, Status> {
        let etcd = &self.0;
        let out = via_leader!(
            etcd,
            lease_leases,
            kiwi::LeaseLeasesRequest { header: None }
        )
        .map_err(to_etcd)?;
        Ok(Response::new(LeaseLeasesResponse {
            header: etcd.header(out.header.map_or(0, |h| h.revision)),
            leases: out
                .ids
                .into_iter()
                .map(|id| LeaseStatus { id: int(id) })
                .collect(),
        }))
    }
}
