//! etcd's `Watch` service: one Kiwi watch stream per etcd stream (same watches, same guarantees: events in
//! revision order, each once, whole revisions per answer), requests and answers translated.

use std::sync::Arc;

use kiwi_proto::etcd::etcdserverpb::{
    WatchRequest, WatchResponse, watch_request, watch_server::Watch,
};
use kiwi_proto::etcd::mvccpb;
use kiwi_proto::v1 as kiwi;
use tokio_stream::StreamExt as _;
use tonic::{Request, Response, Status, Streaming};

use super::{Etcd, int, to_etcd_kv, uint};

/// The `Watch` service.
#[derive(Clone)]
pub struct EtcdWatch(pub Etcd);

fn to_kiwi(r: WatchRequest) -> kiwi::WatchRequest {
    use kiwi::watch_request::RequestUnion as K;
    let request_union = r.request_union.map(|u| match u {
        watch_request::RequestUnion::CreateRequest(c) => {
            K::CreateRequest(kiwi::WatchCreateRequest {
                key: c.key,
                range_end: c.range_end,
                start_revision: uint(c.start_revision),
                progress_notify: c.progress_notify,
                filters: c.filters,
                prev_kv: c.prev_kv,
                watch_id: c.watch_id,
                ..kiwi::WatchCreateRequest::default()
            })
        }
        watch_request::RequestUnion::CancelRequest(c) => {
            K::CancelRequest(kiwi::WatchCancelRequest {
                watch_id: c.watch_id,
            })
        }
        watch_request::RequestUnion::ProgressRequest(_) => {
            K::ProgressRequest(kiwi::WatchProgressRequest {})
        }
    });
    kiwi::WatchRequest { request_union }
}

fn to_event(e: kiwi::KeyEvent) -> mvccpb::Event {
    mvccpb::Event {
        r#type: e.r#type,
        kv: e.kv.map(to_etcd_kv),
        prev_kv: e.prev_kv.map(to_etcd_kv),
    }
}

#[tonic::async_trait]
impl Watch for EtcdWatch {
    type WatchStream = std::pin::Pin<
        Box<dyn tokio_stream::Stream<Item = Result<WatchResponse, Status>> + Send + 'static>,
    >;

    async fn watch(
        &self,
        request: Request<Streaming<WatchRequest>>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        let server = Arc::clone(&self.0.server);
        let tagged = server
            .tag(None, false)
            .map_err(super::super::KvError::into_status)?;
        let connection = super::super::connection_of(&request);
        let requests = request.into_inner().map(|r| r.map(to_kiwi));
        let rx = super::super::watch::serve(server, tagged, connection, false, requests)
            .map_err(super::super::KvError::into_status)?;
        let etcd = self.0.clone();
        let answers =
            tokio_stream::wrappers::ReceiverStream::new(rx).map(move |(answer, _hold)| {
                answer.map(|a| WatchResponse {
                    header: etcd.header(a.header.map_or(0, |h| h.revision)),
                    watch_id: a.watch_id,
                    created: a.created,
                    canceled: a.canceled,
                    compact_revision: int(a.compact_revision),
                    cancel_reason: a.cancel_reason,
                    fragment: false,
                    events: a.events.into_iter().map(to_event).collect(),
                })
            });
        Ok(Response::new(Box::pin(answers)))
    }
}
