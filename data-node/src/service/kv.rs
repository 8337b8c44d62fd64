//! The `KvService` handlers: validate and tag, then propose (writes) or read through the storage stage.

use std::sync::Arc;

use kiwi_proto::connections::CHUNK;
use kiwi_proto::v1::kv_service_server::KvService;
use kiwi_proto::v1::{
    BatchWriteRequest, BatchWriteResponse, CompareAndSwapRequest, CompareAndSwapResponse,
    DeleteRangeCommand, DeleteRangeRequest, DeleteRangeResponse, DeleteRequest, DeleteResponse,
    GetRequest, GetResponse, KeyValue, PutRequest, PutResponse, ScanRequest, ScanResponse, WriteOp,
    compare_and_swap_request, raft_command, write_op,
};
use kiwi_storage::{KeySpace, Scan, ScanRange, StorageBackend};
use prost::Message as _;
use tonic::{Request, Response, Status};

use super::*;

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
        for (key, value) in pairs {
            let value = if keys_only { Vec::new() } else { value };
            let size = key.len() + value.len();
            if kvs.len() == limit || (!kvs.is_empty() && bytes + size > max_bytes) {
                return Ok((kvs, true));
            }
            bytes += size;
            let bound = std::ops::Bound::Excluded(key.clone());
            if reverse {
                range.end = bound;
            } else {
                range.start = bound;
            }
            kvs.push(KeyValue { key, value });
        }
        if got < want {
            return Ok((kvs, false));
        }
        let avg = (bytes / kvs.len().max(1)).max(1);
        page = (max_bytes.saturating_sub(bytes) / avg).clamp(1, 1024);
    }
}

/// The first key past every key starting with `prefix` (empty: no such key, the range is open).
fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    Vec::new()
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

/// The `KvService` implementation.
#[derive(Clone)]
pub struct KvApi(pub Arc<KvServer>);

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
            let read = |key: Vec<u8>| s.read_data(&tagged, move |st| st.read(KeySpace::Data, &key));
            let mut value = read(req.key.clone()).await?;
            let mut hold = None;
            // A large value waits, unread, for room in the answer budget; read again once there is
            // some (a later state of the key: still a read between the request and its answer).
            let size = value.as_ref().map_or(0, Vec::len);
            if size > CHUNK {
                hold = s.answers.try_hold(connection, size);
                if hold.is_none() {
                    drop(value);
                    let h = s.hold_answer(&tagged, connection, size, size).await?;
                    value = read(req.key).await?;
                    h.resize(value.as_ref().map_or(0, Vec::len));
                    hold = Some(h);
                }
            }
            let answer = GetResponse {
                header: s.header(&tagged, applied),
                found: value.is_some(),
                value: value.unwrap_or_default(),
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
                })),
            }];
            s.check_ops(&ops).map_err(|e| match e {
                KvError::InvalidArgument(m) => {
                    KvError::InvalidArgument(m.replace("operation 0: ", ""))
                }
                e => e,
            })?;
            let out = s.propose_write(&tagged, ops).await?;
            Ok(PutResponse {
                header: s.header(&tagged, out.index),
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

    async fn scan(&self, request: Request<ScanRequest>) -> Result<Response<ScanResponse>, Status> {
        let s = &self.0;
        let span = request_span("kv.Scan", &request);
        let may_critical = super::may_use_critical(&request);
        let connection = connection_of(&request);
        let req = request.into_inner();
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
            if req.count_only {
                let count = s
                    .read_data(&tagged, move |st| count_range(st, range))
                    .await?;
                let answer = ScanResponse {
                    header: s.header(&tagged, applied),
                    count,
                    ..ScanResponse::default()
                };
                return Ok((answer, None));
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
            // The answer is built in the storage stage too (at the request's OS priority), not on a
            // network thread.
            let (kvs, more) = s
                .read_data(&tagged, move |st| {
                    scan_bounded(st, range, limit, reverse, keys_only, max_bytes)
                })
                .await?;
            let answer = ScanResponse {
                header: s.header(&tagged, applied),
                kvs,
                more,
                count: 0,
            };
            hold.resize(answer.encoded_len());
            Ok((answer, Some(hold)))
        };
        traced_held(span, run).await
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
            Ok(DeleteRangeResponse {
                header: s.header(&tagged, out.index),
                deleted: out.deleted,
                prev_kvs: out.prev_kvs,
                prev_kvs_truncated: out.prev_kvs_truncated,
            })
        };
        traced(span, run).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_prefix_ends_at_its_last_byte_plus_one() {
        assert_eq!(prefix_end(b"app/"), b"app0");
        assert_eq!(prefix_end(b"a\xff"), b"b");
        assert_eq!(prefix_end(b"\xff\xff"), b"", "no end: the range is open");
        assert!(request_range(b"a".to_vec(), Vec::new(), b"p").is_err());
        assert_eq!(
            request_range(Vec::new(), Vec::new(), b"p").unwrap(),
            (b"p".to_vec(), b"q".to_vec())
        );
    }
}
