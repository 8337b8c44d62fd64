//! The client honours a node's `retry-after-ms` hint (unit test against a stand-in `KvService`: the
//! shedding itself is tested on real nodes in `tests/tests/runtime.rs`).

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use kiwi_client::{CallOptions, Client, ClientOptions};
use kiwi_proto::v1::kv_service_server::{KvService, KvServiceServer};
use kiwi_proto::v1::{
    BatchWriteRequest, BatchWriteResponse, CompareAndSwapRequest, CompareAndSwapResponse,
    DeleteRequest, DeleteResponse, GetRequest, GetResponse, PutRequest, PutResponse, ScanRequest,
    ScanResponse,
};
use tonic::{Request, Response, Status};

/// Sheds the first Get with RESOURCE_EXHAUSTED and a retry-after hint, answers the next.
#[derive(Default)]
struct Shedding {
    gets: Arc<AtomicU32>,
}

const HINT_MS: u64 = 400;

#[tonic::async_trait]
impl KvService for Shedding {
    async fn get(&self, _: Request<GetRequest>) -> Result<Response<GetResponse>, Status> {
        if self.gets.fetch_add(1, Ordering::SeqCst) == 0 {
            let mut s = Status::resource_exhausted("overloaded");
            s.metadata_mut()
                .insert("retry-after-ms", HINT_MS.to_string().parse().unwrap());
            s.metadata_mut()
                .insert("kiwi-retry-safe", "true".parse().unwrap());
            return Err(s);
        }
        Ok(Response::new(GetResponse::default()))
    }
    async fn put(&self, _: Request<PutRequest>) -> Result<Response<PutResponse>, Status> {
        Err(Status::unimplemented("stand-in"))
    }
    async fn delete(&self, _: Request<DeleteRequest>) -> Result<Response<DeleteResponse>, Status> {
        Err(Status::unimplemented("stand-in"))
    }
    async fn batch_write(
        &self,
        _: Request<BatchWriteRequest>,
    ) -> Result<Response<BatchWriteResponse>, Status> {
        Err(Status::unimplemented("stand-in"))
    }
    async fn scan(
        &self,
        _: Request<ScanRequest>,
    ) -> Result<Response<kiwi_proto::encoded::Encoded<ScanResponse>>, Status> {
        Err(Status::unimplemented("stand-in"))
    }
    async fn compare_and_swap(
        &self,
        _: Request<CompareAndSwapRequest>,
    ) -> Result<Response<CompareAndSwapResponse>, Status> {
        Err(Status::unimplemented("stand-in"))
    }
    async fn delete_range(
        &self,
        _: Request<kiwi_proto::v1::DeleteRangeRequest>,
    ) -> Result<Response<kiwi_proto::v1::DeleteRangeResponse>, Status> {
        Err(Status::unimplemented("stand-in"))
    }
    async fn txn(
        &self,
        _: Request<kiwi_proto::v1::TxnRequest>,
    ) -> Result<Response<kiwi_proto::v1::TxnResponse>, Status> {
        Err(Status::unimplemented("stand-in"))
    }
    type WatchStream = tokio_stream::Empty<Result<kiwi_proto::v1::WatchResponse, Status>>;
    async fn watch(
        &self,
        _: Request<tonic::Streaming<kiwi_proto::v1::WatchRequest>>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        Err(Status::unimplemented("stand-in"))
    }
    async fn compact(
        &self,
        _: Request<kiwi_proto::v1::CompactRequest>,
    ) -> Result<Response<kiwi_proto::v1::CompactResponse>, Status> {
        Err(Status::unimplemented("stand-in"))
    }
    async fn lease_grant(
        &self,
        _: Request<kiwi_proto::v1::LeaseGrantRequest>,
    ) -> Result<Response<kiwi_proto::v1::LeaseGrantResponse>, Status> {
        Err(Status::unimplemented("stand-in"))
    }
    async fn lease_revoke(
        &self,
        _: Request<kiwi_proto::v1::LeaseRevokeRequest>,
    ) -> Result<Response<kiwi_proto::v1::LeaseRevokeResponse>, Status> {
        Err(Status::unimplemented("stand-in"))
    }
    async fn lease_time_to_live(
        &self,
        _: Request<kiwi_proto::v1::LeaseTimeToLiveRequest>,
    ) -> Result<Response<kiwi_proto::v1::LeaseTimeToLiveResponse>, Status> {
        Err(Status::unimplemented("stand-in"))
    }
    async fn lease_leases(
        &self,
        _: Request<kiwi_proto::v1::LeaseLeasesRequest>,
    ) -> Result<Response<kiwi_proto::v1::LeaseLeasesResponse>, Status> {
        Err(Status::unimplemented("stand-in"))
    }
    type LeaseKeepAliveStream =
        tokio_stream::Empty<Result<kiwi_proto::v1::LeaseKeepAliveResponse, Status>>;
    async fn lease_keep_alive(
        &self,
        _: Request<tonic::Streaming<kiwi_proto::v1::LeaseKeepAliveRequest>>,
    ) -> Result<Response<Self::LeaseKeepAliveStream>, Status> {
        Err(Status::unimplemented("stand-in"))
    }
}

#[tokio::test]
async fn a_shed_read_is_retried_after_the_hinted_delay() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let service = Shedding::default();
    let gets = Arc::clone(&service.gets);
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(KvServiceServer::new(service))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    let client = Client::connect(&[addr.to_string()], ClientOptions::default()).unwrap();
    let t = Instant::now();
    let got = client
        .get(b"k", &CallOptions::default())
        .await
        .expect("answered on the retry");
    assert_eq!(got, None);
    assert_eq!(gets.load(Ordering::SeqCst), 2, "shed once, then served");
    assert!(
        t.elapsed() >= Duration::from_millis(HINT_MS),
        "retried after {:?}, before the {HINT_MS} ms hint",
        t.elapsed()
    );
}
