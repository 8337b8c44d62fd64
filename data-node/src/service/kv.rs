//! The `KvService` handlers: validate and tag, then propose (writes) or read through the storage stage.

use std::sync::Arc;

use kiwi_proto::connections::CHUNK;
use kiwi_proto::encoded::Encoded;
use kiwi_proto::v1::kv_service_server::KvService;
use kiwi_proto::v1::{
    BatchWriteRequest, BatchWriteResponse, CompactCommand, CompactRequest, CompactResponse,
    CompareAndSwapRequest, CompareAndSwapResponse, DeleteRangeCommand, DeleteRangeRequest,
    DeleteRangeResponse, DeleteRequest, DeleteResponse, GetRequest, GetResponse, KeyValue,
    LeaseGrantRequest, LeaseGrantResponse, LeaseLeasesRequest, LeaseLeasesResponse,
    LeaseRevokeRequest, LeaseRevokeResponse, LeaseTimeToLiveRequest, LeaseTimeToLiveResponse,
    PutRequest, PutResponse, ScanRequest, ScanResponse, TxnRequest, TxnResponse, WatchRequest,
    WatchResponse, WriteOp, compare_and_swap_request, raft_command, write_op,
};
use kiwi_storage::{KeySpace, Scan, ScanRange, StorageBackend};
use prost::Message as _;
use tonic::{Request, Response, Status};

use super::*;
use crate::raft::{mvcc, state_machine};
use kiwi_proto::keys::prefix_end;

/// Pairs read by the first page of a Scan, before the pair sizes are known.
const FIRST_SCAN_PAGE: usize = 16;

/// Reads up to `limit` pairs of `range` and at most `max_bytes` (at least one pair), page by page
/// so that memory follows the answer's size, not `limit` times the largest value. Pages after the first
/// read one point-in-time view, so the answer is one state of the data. Returns the pairs and whether
/// more remain.
fn scan_bounded(
    st: &dyn StorageBackend,
    mut range: ScanRange,
    limit: usize,
    reverse: bool,
    keys_only: bool,
    max_bytes: usize,
) -> kiwi_storage::Result<(Vec<KeyValue>, bool)> {
    // One page is enough for small limits; otherwise every page reads the same view.
    let view = if limit + 1 > FIRST_SCAN_PAGE {
        Some(st.snapshot()?)
    } else {
        None
    };
    let mut kvs: Vec<KeyValue> = Vec::new();
    let mut bytes = 0;
    let mut page = FIRST_SCAN_PAGE;
    loop {
        // One more than the answer needs, to learn whether more remain.
        let want = (limit + 1 - kvs.len()).min(page);
        let scan = Scan {
            range: range.clone(),
            limit: want,
            reverse,
        };
        let pairs = match &view {
            Some(v) => v.scan(KeySpace::Data, &scan)?,
            None => st.scan(KeySpace::Data, &scan)?,
        };
        let got = pairs.len();
        for (key, stored) in pairs {
            let kv = mvcc::to_kv(key, stored, keys_only);
            let size = kv.key.len() + kv.value.len();
            if kvs.len() == limit || (!kvs.is_empty() && bytes + size > max_bytes) {
                return Ok((kvs, true));
            }
            bytes += size;
            let bound = std::ops::Bound::Excluded(kv.key.clone());
            if reverse {
                range.end = bound;
            } else {
                range.start = bound;
            }
            kvs.push(kv);
        }
        if got < want {
            return Ok((kvs, false));
        }
        let avg = (bytes / kvs.len().max(1)).max(1);
        page = (max_bytes.saturating_sub(bytes) / avg).clamp(1, 1024);
    }
}

/// A request's range: `prefix`, or `[start, end)`; never both.
fn request_range(
    start: Vec<u8>,
    end: Vec<u8>,
    prefix: &[u8],
) -> Result<(Vec<u8>, Vec<u8>), KvError> {
    if prefix.is_empty() {
        return Ok((start, end));
    }
    if !start.is_empty() || !end.is_empty() {
        return Err(KvError::InvalidArgument(
            "set either prefix or start_key/end_key, not both".into(),
        ));
    }
    Ok((prefix.to_vec(), prefix_end(prefix)))
}

/// Counts the keys of `range` (every one; pages read from one point-in-time view).
fn count_range(st: &dyn StorageBackend, mut range: ScanRange) -> kiwi_storage::Result<u64> {
    const PAGE: usize = 4096;
    let view = st.snapshot()?;
    let mut count = 0u64;
    loop {
        let pairs = view.scan(
            KeySpace::Data,
            &Scan {
                range: range.clone(),
                limit: PAGE,
                reverse: false,
            },
        )?;
        count += pairs.len() as u64;
        match pairs.last() {
            Some((key, _)) if pairs.len() == PAGE => {
                range.start = std::ops::Bound::Excluded(key.clone());
            }
            _ => return Ok(count),
        }
    }
}

/// Counts the keys of `range` as they were at revision `at` (pages read from `view`).
fn count_at<R: mvcc::Reader + ?Sized>(
    view: &R,
    mut range: ScanRange,
    at: u64,
) -> kiwi_storage::Result<u64> {
    const PAGE: usize = 1024;
    let mut count = 0u64;
    loop {
        let (kvs, more) = mvcc::scan_at(view, &range, at, PAGE, false)?;
        count += kvs.len() as u64;
        match kvs.last() {
            Some(kv) if more => range.start = std::ops::Bound::Excluded(kv.key.clone()),
            _ => return Ok(count),
        }
    }
}

/// The `KvService` implementation.
#[derive(Clone)]
pub struct KvApi(pub Arc<KvServer>);

impl KvApi {
    /// A Scan's answer as the etcd layer uses it: the message itself.
    pub(crate) async fn scan_message(
        &self,
        request: Request<ScanRequest>,
    ) -> Result<Response<ScanResponse>, Status> {
        let (metadata, answer, extensions) = self.scan_answer(request, false).await?.into_parts();
        let answer = answer
            .into_message()
            .map_err(|e| Status::internal(format!("scan answer: {e}")))?;
        Ok(Response::from_parts(metadata, answer, extensions))
    }

    /// Scan. With `encode`, the pairs are encoded in the storage stage, at the request's class and OS
    /// priority, and freed there (see [`Encoded`]): the network thread only copies bytes.
    async fn scan_answer(
        &self,
        request: Request<ScanRequest>,
        encode: bool,
    ) -> Result<Response<Encoded<ScanResponse>>, Status> {
        let s = &self.0;
        let span = request_span("kv.Scan", &request);
        let may_critical = super::may_use_critical(&request);
        let connection = connection_of(&request);
        let req = request.into_inner();
        // The pairs and `more` of an answer, encoded or not; the header is added on the way out.
        let bulk = move |kvs: Vec<KeyValue>, more: bool| {
            let bulk = ScanResponse {
                kvs,
                more,
                ..ScanResponse::default()
            };
            if encode {
                Encoded::with_fields(ScanResponse::default(), bulk.encode_to_vec())
            } else {
                Encoded::new(bulk)
            }
        };
        let run = async {
            let tagged = s.tag(req.header.as_ref(), may_critical)?;
            if req.limit == 0 || req.limit > MAX_SCAN_LIMIT {
                return Err(KvError::InvalidArgument(format!(
                    "scan limit must be 1 to {MAX_SCAN_LIMIT}, got {}",
                    req.limit
                )));
            }
            let (start, end) = request_range(req.start_key, req.end_key, &req.prefix)?;
            let applied = s.read_point(req.consistency, &tagged).await?;
            let range = ScanRange::half_open(&start, &end);
            let at = req.revision;
            s.check_not_future(at, applied)?;
            if at != 0 {
                // A read at a past revision: from the kept history, in pages of at most `limit`.
                let (limit, reverse, keys_only, count_only) = (
                    req.limit as usize,
                    req.reverse,
                    req.keys_only,
                    req.count_only,
                );
                let mut answer = s
                    .read_data(&tagged, move |st| {
                        let view = st.snapshot()?;
                        let oldest = mvcc::compacted(&*view)?;
                        if at < oldest {
                            return Ok(Err(KvError::Compacted { asked: at, oldest }));
                        }
                        if count_only {
                            return Ok(Ok(Encoded::new(ScanResponse {
                                count: count_at(&*view, range, at)?,
                                ..ScanResponse::default()
                            })));
                        }
                        let (mut kvs, more) = mvcc::scan_at(&*view, &range, at, limit, reverse)?;
                        if keys_only {
                            kvs.iter_mut().for_each(|kv| kv.value = Vec::new());
                        }
                        Ok(Ok(bulk(kvs, more)))
                    })
                    .await??;
                answer.message_mut().header = s.header(&tagged, applied);
                return Ok((answer, None));
            }
            if req.count_only {
                let count = s
                    .read_data(&tagged, move |st| count_range(st, range))
                    .await?;
                let answer = ScanResponse {
                    header: s.header(&tagged, applied),
                    count,
                    ..ScanResponse::default()
                };
                return Ok((Encoded::new(answer), None));
            }
            let (limit, keys_only, reverse) = (req.limit as usize, req.keys_only, req.reverse);
            let want = match usize::try_from(req.max_bytes) {
                Ok(0) | Err(_) => MAX_SCAN_BYTES,
                Ok(n) => n.min(MAX_SCAN_BYTES),
            };
            // The answer's bytes come from the answer budget: a smaller page (`more = true`) when
            // little is free, a wait when less than a piece is.
            let hold = s
                .hold_answer(&tagged, connection, CHUNK.min(want), want)
                .await?;
            let max_bytes = hold.bytes();
            // The answer is built (and encoded) in the storage stage too, at the request's OS
            // priority, not on a network thread.
            let (mut answer, newest) = s
                .read_data(&tagged, move |st| {
                    let (kvs, more) =
                        scan_bounded(st, range, limit, reverse, keys_only, max_bytes)?;
                    let newest = kvs.iter().map(|kv| kv.mod_revision).max().unwrap_or(0);
                    Ok((bulk(kvs, more), newest))
                })
                .await?;
            answer.message_mut().header = s.header(&tagged, newest.max(applied));
            hold.resize(answer.encoded_len());
            Ok((answer, Some(hold)))
        };
        traced_held(span, run).await
    }
}

#[tonic::async_trait]
impl KvService for KvApi {
    async fn get(&self, request: Request<GetRequest>) -> Result<Response<GetResponse>, Status> {
        let s = &self.0;
        let span = request_span("kv.Get", &request);
        let may_critical = super::may_use_critical(&request);
        let connection = connection_of(&request);
        let req = request.into_inner();
        let run = async {
            let tagged = s.tag(req.header.as_ref(), may_critical)?;
            s.check_key(&req.key)?;
            let applied = s.read_point(req.consistency, &tagged).await?;
            let at = req.revision;
            s.check_not_future(at, applied)?;
            let read = |key: Vec<u8>| {
                s.read_point_data(&tagged, move |st| {
                    if at == 0 {
                        return Ok(Ok(st
                            .read(KeySpace::Data, &key)?
                            .map(|stored| mvcc::to_kv(key, stored, false))));
                    }
                    let view = st.snapshot()?;
                    let oldest = mvcc::compacted(&*view)?;
                    if at < oldest {
                        return Ok(Err(KvError::Compacted { asked: at, oldest }));
                    }
                    Ok(Ok(mvcc::read_at(&*view, &key, at)?))
                })
            };
            let mut kv = read(req.key.clone()).await??;
            let mut hold = None;
            // A large value waits, unread, for room in the answer budget; read again once there is
            // some (a later state of the key: still a read between the request and its answer).
            let size = kv.as_ref().map_or(0, |kv| kv.value.len());
            if size > CHUNK {
                hold = s.answers.try_hold(connection, size);
                if hold.is_none() {
                    drop(kv);
                    let h = s.hold_answer(&tagged, connection, size, size).await?;
                    kv = read(req.key).await??;
                    h.resize(kv.as_ref().map_or(0, |kv| kv.value.len()));
                    hold = Some(h);
                }
            }
            let revision = applied.max(kv.as_ref().map_or(0, |kv| kv.mod_revision));
            let found = kv.is_some();
            let kv = kv.unwrap_or_default();
            let answer = GetResponse {
                header: s.header(&tagged, revision),
                found,
                value: kv.value,
                create_revision: kv.create_revision,
                mod_revision: kv.mod_revision,
                version: kv.version,
                lease: kv.lease,
            };
            Ok((answer, hold))
        };
        traced_held(span, run).await
    }

    async fn put(&self, request: Request<PutRequest>) -> Result<Response<PutResponse>, Status> {
        let s = &self.0;
        let span = request_span("kv.Put", &request);
        let may_critical = super::may_use_critical(&request);
        let req = request.into_inner();
        let run = async {
            let tagged = s.tag(req.header.as_ref(), may_critical)?;
            let ops = vec![WriteOp {
                op: Some(write_op::Op::Put(write_op::Put {
                    key: req.key,
                    value: req.value,
                    lease: req.lease,
                })),
            }];
            let want_prev = req.prev_kv;
            s.check_ops(&ops).map_err(|e| match e {
                KvError::InvalidArgument(m) => {
                    KvError::InvalidArgument(m.replace("operation 0: ", ""))
                }
                e => e,
            })?;
            let out = s.propose_write(&tagged, ops).await?;
            if let Some(r) = out.refused {
                return Err(KvError::Refused(r));
            }
            Ok(PutResponse {
                header: s.header(&tagged, out.index),
                prev_kv: out.prev_kv.filter(|_| want_prev),
            })
        };
        traced(span, run).await
    }

    async fn delete(
        &self,
        request: Request<DeleteRequest>,
    ) -> Result<Response<DeleteResponse>, Status> {
        let s = &self.0;
        let span = request_span("kv.Delete", &request);
        let may_critical = super::may_use_critical(&request);
        let req = request.into_inner();
        let run = async {
            let tagged = s.tag(req.header.as_ref(), may_critical)?;
            s.check_key(&req.key)?;
            let ops = vec![WriteOp {
                op: Some(write_op::Op::Delete(write_op::Delete { key: req.key })),
            }];
            let out = s.propose_write(&tagged, ops).await?;
            Ok(DeleteResponse {
                header: s.header(&tagged, out.index),
                existed: out.existed,
            })
        };
        traced(span, run).await
    }

    async fn batch_write(
        &self,
        request: Request<BatchWriteRequest>,
    ) -> Result<Response<BatchWriteResponse>, Status> {
        let s = &self.0;
        let span = request_span("kv.BatchWrite", &request);
        let may_critical = super::may_use_critical(&request);
        let req = request.into_inner();
        let run = async {
            let tagged = s.tag(req.header.as_ref(), may_critical)?;
            s.check_ops(&req.ops)?;
            let out = s.propose_write(&tagged, req.ops).await?;
            Ok(BatchWriteResponse {
                header: s.header(&tagged, out.index),
            })
        };
        traced(span, run).await
    }

    async fn scan(
        &self,
        request: Request<ScanRequest>,
    ) -> Result<Response<Encoded<ScanResponse>>, Status> {
        self.scan_answer(request, true).await
    }

    async fn compare_and_swap(
        &self,
        request: Request<CompareAndSwapRequest>,
    ) -> Result<Response<CompareAndSwapResponse>, Status> {
        let s = &self.0;
        let span = request_span("kv.CompareAndSwap", &request);
        let may_critical = super::may_use_critical(&request);
        let mut req = request.into_inner();
        let run = async {
            let tagged = s.tag(req.header.as_ref(), may_critical)?;
            s.check_key(&req.key)?;
            match &req.expected {
                Some(compare_and_swap_request::Expected::ExpectedValue(v)) => s
                    .limits
                    .check_value(KeySpace::Data, v)
                    .map_err(|e| KvError::InvalidArgument(format!("expected_value: {e}")))?,
                Some(compare_and_swap_request::Expected::ExpectAbsent(true)) => {}
                _ => {
                    return Err(KvError::InvalidArgument(
                        "set exactly one of expected_value or expect_absent = true".into(),
                    ));
                }
            }
            match &req.new {
                Some(compare_and_swap_request::New::NewValue(v)) => s
                    .limits
                    .check_value(KeySpace::Data, v)
                    .map_err(KvError::Storage)?,
                Some(compare_and_swap_request::New::Delete(true)) => {}
                _ => {
                    return Err(KvError::InvalidArgument(
                        "set exactly one of new_value or delete = true".into(),
                    ));
                }
            }
            req.header = None;
            let out = s
                .propose(&tagged, raft_command::Command::CompareAndSwap(req))
                .await?;
            Ok(CompareAndSwapResponse {
                header: s.header(&tagged, out.index),
                succeeded: out.swapped,
                previous_found: out.previous.is_some(),
                previous_value: out.previous.unwrap_or_default(),
            })
        };
        traced(span, run).await
    }

    async fn delete_range(
        &self,
        request: Request<DeleteRangeRequest>,
    ) -> Result<Response<DeleteRangeResponse>, Status> {
        let s = &self.0;
        let span = request_span("kv.DeleteRange", &request);
        let may_critical = super::may_use_critical(&request);
        let req = request.into_inner();
        let run = async {
            let tagged = s.tag(req.header.as_ref(), may_critical)?;
            let (start_key, end_key) = request_range(req.start_key, req.end_key, &req.prefix)?;
            if start_key.is_empty() && end_key.is_empty() {
                return Err(KvError::InvalidArgument(
                    "set start_key, end_key or prefix (to delete every key, start_key = \"\\0\")"
                        .into(),
                ));
            }
            for (bound, what) in [(&start_key, "start_key"), (&end_key, "end_key")] {
                if !bound.is_empty() {
                    s.check_key(bound)
                        .map_err(|e| KvError::InvalidArgument(format!("{what}: {e}")))?;
                }
            }
            let out = s
                .propose(
                    &tagged,
                    raft_command::Command::DeleteRange(DeleteRangeCommand {
                        start_key,
                        end_key,
                        prev_kv: req.prev_kv,
                    }),
                )
                .await?;
            if let Some(r) = out.refused {
                return Err(KvError::Refused(r));
            }
            Ok(DeleteRangeResponse {
                header: s.header(&tagged, out.index),
                deleted: out.deleted,
                prev_kvs: out.prev_kvs,
                prev_kvs_truncated: out.prev_kvs_truncated,
            })
        };
        traced(span, run).await
    }

    async fn txn(&self, request: Request<TxnRequest>) -> Result<Response<TxnResponse>, Status> {
        let s = &self.0;
        let span = request_span("kv.Txn", &request);
        let may_critical = super::may_use_critical(&request);
        let mut req = request.into_inner();
        let run = async {
            let tagged = s.tag(req.header.as_ref(), may_critical)?;
            state_machine::validate_txn(&req, s.limits).map_err(KvError::InvalidArgument)?;
            let bytes = req.encoded_len();
            let max = batch_bytes_limit(s.limits);
            if bytes > max {
                return Err(KvError::InvalidArgument(format!(
                    "the transaction is {bytes} bytes, over the limit of {max}"
                )));
            }
            req.header = None;
            let out = s.propose(&tagged, raft_command::Command::Txn(req)).await?;
            if let Some(r) = out.refused {
                return Err(KvError::Refused(r));
            }
            let (succeeded, responses) = out.txn.unwrap_or_default();
            Ok(TxnResponse {
                header: s.header(&tagged, out.index),
                succeeded,
                responses,
            })
        };
        traced(span, run).await
    }

    type WatchStream =
        std::pin::Pin<Box<dyn tokio_stream::Stream<Item = Result<WatchResponse, Status>> + Send>>;

    async fn watch(
        &self,
        request: Request<tonic::Streaming<WatchRequest>>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        use tokio_stream::StreamExt as _;
        let s = Arc::clone(&self.0);
        let tagged = s.tag(None, false).map_err(KvError::into_status)?;
        let connection = connection_of(&request);
        let may_critical = super::may_use_critical(&request);
        let rx = super::watch::serve(s, tagged, connection, may_critical, request.into_inner())
            .map_err(KvError::into_status)?;
        // An answer's share of the answer budget is given back as tonic takes it to send.
        let answers = tokio_stream::wrappers::ReceiverStream::new(rx).map(|(answer, _hold)| answer);
        Ok(Response::new(Box::pin(answers)))
    }

    async fn lease_grant(
        &self,
        request: Request<LeaseGrantRequest>,
    ) -> Result<Response<LeaseGrantResponse>, Status> {
        let s = &self.0;
        let span = request_span("kv.LeaseGrant", &request);
        let may_critical = super::may_use_critical(&request);
        traced(span, s.lease_grant(request.into_inner(), may_critical)).await
    }

    async fn lease_revoke(
        &self,
        request: Request<LeaseRevokeRequest>,
    ) -> Result<Response<LeaseRevokeResponse>, Status> {
        let s = &self.0;
        let span = request_span("kv.LeaseRevoke", &request);
        let may_critical = super::may_use_critical(&request);
        traced(span, s.lease_revoke(request.into_inner(), may_critical)).await
    }

    type LeaseKeepAliveStream = tokio_stream::wrappers::ReceiverStream<
        Result<kiwi_proto::v1::LeaseKeepAliveResponse, Status>,
    >;

    async fn lease_keep_alive(
        &self,
        request: Request<tonic::Streaming<kiwi_proto::v1::LeaseKeepAliveRequest>>,
    ) -> Result<Response<Self::LeaseKeepAliveStream>, Status> {
        let rx = super::lease::serve_keep_alive(Arc::clone(&self.0), request.into_inner());
        Ok(Response::new(tokio_stream::wrappers::ReceiverStream::new(
            rx,
        )))
    }

    async fn lease_time_to_live(
        &self,
        request: Request<LeaseTimeToLiveRequest>,
    ) -> Result<Response<LeaseTimeToLiveResponse>, Status> {
        let s = &self.0;
        let span = request_span("kv.LeaseTimeToLive", &request);
        let may_critical = super::may_use_critical(&request);
        traced(
            span,
            s.lease_time_to_live(request.into_inner(), may_critical),
        )
        .await
    }

    async fn lease_leases(
        &self,
        request: Request<LeaseLeasesRequest>,
    ) -> Result<Response<LeaseLeasesResponse>, Status> {
        let s = &self.0;
        let span = request_span("kv.LeaseLeases", &request);
        let may_critical = super::may_use_critical(&request);
        traced(span, s.lease_leases(request.into_inner(), may_critical)).await
    }

    async fn compact(
        &self,
        request: Request<CompactRequest>,
    ) -> Result<Response<CompactResponse>, Status> {
        let s = &self.0;
        let span = request_span("kv.Compact", &request);
        let may_critical = super::may_use_critical(&request);
        let req = request.into_inner();
        let run = async {
            let tagged = s.tag(req.header.as_ref(), may_critical)?;
            let at = req.revision;
            if at == 0 {
                return Err(KvError::InvalidArgument(
                    "the revision to compact to is 0".into(),
                ));
            }
            s.check_not_future(at, 0)?;
            let oldest = s.read_data(&tagged, mvcc::compacted).await?;
            if at < oldest {
                return Err(KvError::Compacted { asked: at, oldest });
            }
            let out = s
                .propose(
                    &tagged,
                    raft_command::Command::Compact(CompactCommand { revision: at }),
                )
                .await?;
            Ok(CompactResponse {
                header: s.header(&tagged, out.index),
            })
        };
        traced(span, run).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_request_range_is_a_prefix_or_bounds() {
        assert!(request_range(b"a".to_vec(), Vec::new(), b"p").is_err());
        assert_eq!(
            request_range(Vec::new(), Vec::new(), b"p").unwrap(),
            (b"p".to_vec(), b"q".to_vec())
        );
    }
}
