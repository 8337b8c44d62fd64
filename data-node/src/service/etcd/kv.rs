//! etcd's `KV` service on Kiwi's Get, Scan, Put, DeleteRange, Txn and Compact.

use kiwi_proto::etcd::etcdserverpb::{
    self as etcd, CompactionRequest, CompactionResponse, DeleteRangeRequest, DeleteRangeResponse,
    PutRequest, PutResponse, RangeRequest, RangeResponse, TxnRequest, TxnResponse,
    kv_server::Kv,
    range_request::{SortOrder, SortTarget},
    request_op, response_op,
};
use kiwi_proto::etcd::mvccpb;
use kiwi_proto::v1::{self as kiwi, Consistency, compare, txn_op, txn_op_response};
use tonic::{Request, Response, Status};

use super::{Etcd, int, to_etcd, to_etcd_kv, uint, via_leader};
use crate::raft::state_machine::etcd_range;
use crate::service::MAX_SCAN_LIMIT;

/// Most keys a sorted or filtered Range reads to sort and filter them (etcd reads the whole range too).
const MAX_SORTED_KEYS: usize = 100_000;

/// The `KV` service.
#[derive(Clone)]
pub struct EtcdKv(pub Etcd);

/// How a Range wants its keys: etcd's sort and revision filters (applied after reading the range).
struct Shape {
    order: SortOrder,
    target: SortTarget,
    min_mod: i64,
    max_mod: i64,
    min_create: i64,
    max_create: i64,
}

impl Shape {
    fn of(r: &RangeRequest) -> Shape {
        let target = SortTarget::try_from(r.sort_target).unwrap_or(SortTarget::Key);
        let mut order = SortOrder::try_from(r.sort_order).unwrap_or(SortOrder::None);
        // etcd: a sort target without an order sorts ascending.
        if order == SortOrder::None && target != SortTarget::Key {
            order = SortOrder::Ascend;
        }
        Shape {
            order,
            target,
            min_mod: r.min_mod_revision,
            max_mod: r.max_mod_revision,
            min_create: r.min_create_revision,
            max_create: r.max_create_revision,
        }
    }

    /// Whether the keys need more than Kiwi's key order and limit.
    fn needed(&self) -> bool {
        !(self.order == SortOrder::None
            || (self.order == SortOrder::Ascend && self.target == SortTarget::Key))
            || self.min_mod > 0
            || self.max_mod > 0
            || self.min_create > 0
            || self.max_create > 0
    }

    /// Filters, sorts and cuts to `limit` (0: none); returns whether more were left out.
    fn apply(&self, kvs: &mut Vec<mvccpb::KeyValue>, limit: i64) -> bool {
        kvs.retain(|kv| {
            (self.min_mod <= 0 || kv.mod_revision >= self.min_mod)
                && (self.max_mod <= 0 || kv.mod_revision <= self.max_mod)
                && (self.min_create <= 0 || kv.create_revision >= self.min_create)
                && (self.max_create <= 0 || kv.create_revision <= self.max_create)
        });
        if self.order != SortOrder::None {
            match self.target {
                SortTarget::Key => {}
                SortTarget::Version => kvs.sort_by_key(|kv| kv.version),
                SortTarget::Create => kvs.sort_by_key(|kv| kv.create_revision),
                SortTarget::Mod => kvs.sort_by_key(|kv| kv.mod_revision),
                SortTarget::Value => kvs.sort_by(|a, b| a.value.cmp(&b.value)),
            }
            if self.order == SortOrder::Descend {
                kvs.reverse();
            }
        }
        let limit = usize::try_from(limit).unwrap_or(0);
        if limit > 0 && kvs.len() > limit {
            kvs.truncate(limit);
            return true;
        }
        false
    }
}

fn consistency(serializable: bool) -> i32 {
    if serializable {
        Consistency::Serializable as i32
    } else {
        Consistency::Linearizable as i32
    }
}

impl Etcd {
    /// A Kiwi Scan here (a follower answers a linearizable one after a ReadIndex round), or on the
    /// leader when this node cannot answer it.
    async fn scan(&self, req: kiwi::ScanRequest) -> Result<kiwi::ScanResponse, Status> {
        via_leader!(self, scan, req, crate::service::KvApi::scan_message)
    }

    /// etcd's Range of one key: Kiwi's Get.
    async fn range_one(&self, r: RangeRequest) -> Result<RangeResponse, Status> {
        let g = via_leader!(
            self,
            get,
            kiwi::GetRequest {
                header: None,
                key: r.key.clone(),
                consistency: consistency(r.serializable),
                revision: uint(r.revision),
            }
        )?;
        let revision = g.header.as_ref().map_or(0, |h| h.revision);
        let kvs = if g.found && !r.count_only {
            vec![mvccpb::KeyValue {
                key: r.key,
                create_revision: int(g.create_revision),
                mod_revision: int(g.mod_revision),
                version: int(g.version),
                value: if r.keys_only { Vec::new() } else { g.value },
                lease: int(g.lease),
            }]
        } else {
            Vec::new()
        };
        Ok(RangeResponse {
            header: self.header(revision),
            kvs,
            more: false,
            count: i64::from(g.found),
        })
    }

    /// etcd's Range: Kiwi's Scan (pages read at one revision), then etcd's sort and filters.
    pub(super) async fn range(&self, r: RangeRequest) -> Result<RangeResponse, Status> {
        if r.range_end.is_empty() && !r.key.is_empty() && !Shape::of(&r).needed() {
            return self.range_one(r).await;
        }
        let (start, end) = etcd_range(&r.key, &r.range_end);
        let shape = Shape::of(&r);
        let whole = shape.needed();
        let mut revision = uint(r.revision);
        let mut kvs = Vec::new();
        let mut page_start = start.clone();
        let mut header_rev = 0;
        let want = if r.limit <= 0 || whole {
            usize::MAX
        } else {
            usize::try_from(r.limit).unwrap_or(usize::MAX)
        };
        let mut more;
        loop {
            let left = want.saturating_sub(kvs.len());
            let page = self
                .scan(kiwi::ScanRequest {
                    start_key: page_start.clone(),
                    end_key: end.clone(),
                    limit: u32::try_from(left.min(MAX_SCAN_LIMIT as usize)).unwrap_or(1),
                    keys_only: r.keys_only,
                    count_only: r.count_only,
                    consistency: consistency(r.serializable),
                    revision,
                    ..kiwi::ScanRequest::default()
                })
                .await?;
            let at = page.header.as_ref().map_or(0, |h| h.revision);
            if header_rev == 0 {
                header_rev = at;
                // Later pages read the same state.
                if revision == 0 {
                    revision = at;
                }
            }
            if r.count_only {
                return Ok(RangeResponse {
                    header: self.header(header_rev),
                    kvs: Vec::new(),
                    more: false,
                    count: int(page.count),
                });
            }
            more = page.more;
            if let Some(last) = page.kvs.last() {
                page_start = last.key.clone();
                page_start.push(0);
            }
            kvs.extend(page.kvs.into_iter().map(to_etcd_kv));
            if !more || kvs.len() >= want {
                break;
            }
            if kvs.len() >= MAX_SORTED_KEYS {
                return Err(Status::invalid_argument(format!(
                    "etcdserver: a sorted or filtered range reads at most {MAX_SORTED_KEYS} keys: narrow it"
                )));
            }
        }
        // The count of every key in the range, whatever the limit.
        let count = if more {
            let counted = self
                .scan(kiwi::ScanRequest {
                    start_key: start,
                    end_key: end,
                    limit: 1,
                    count_only: true,
                    consistency: consistency(r.serializable),
                    revision,
                    ..kiwi::ScanRequest::default()
                })
                .await?;
            int(counted.count)
        } else {
            kvs.len() as i64
        };
        if whole {
            more = shape.apply(&mut kvs, r.limit);
        }
        Ok(RangeResponse {
            header: self.header(header_rev),
            kvs,
            more,
            count,
        })
    }

    /// etcd's Put with `ignore_value` / `ignore_lease`: the key's current value or lease, kept by a
    /// transaction that puts only if the key is unchanged since it was read (retried a few times).
    async fn put(&self, r: PutRequest) -> Result<PutResponse, Status> {
        if !r.ignore_value && !r.ignore_lease {
            let out = via_leader!(
                self,
                put,
                kiwi::PutRequest {
                    header: None,
                    key: r.key,
                    value: r.value,
                    prev_kv: r.prev_kv,
                    lease: uint(r.lease),
                }
            )?;
            return Ok(PutResponse {
                header: self.header(out.header.map_or(0, |h| h.revision)),
                prev_kv: out.prev_kv.map(to_etcd_kv),
            });
        }
        if r.ignore_lease && r.lease != 0 {
            return Err(Status::invalid_argument("etcdserver: lease is provided"));
        }
        if r.ignore_value && !r.value.is_empty() {
            return Err(Status::invalid_argument("etcdserver: value is provided"));
        }
        for _ in 0..5 {
            let current = self
                .range(RangeRequest {
                    key: r.key.clone(),
                    ..RangeRequest::default()
                })
                .await?;
            let Some(kv) = current.kvs.into_iter().next() else {
                return Err(Status::invalid_argument("etcdserver: key not found"));
            };
            let put = txn_op::Put {
                key: r.key.clone(),
                value: if r.ignore_value {
                    kv.value.clone()
                } else {
                    r.value.clone()
                },
                prev_kv: r.prev_kv,
                lease: uint(if r.ignore_lease { kv.lease } else { r.lease }),
            };
            let unchanged = kiwi::Compare {
                result: compare::CompareResult::Equal as i32,
                target: compare::CompareTarget::Mod as i32,
                key: r.key.clone(),
                target_union: Some(compare::TargetUnion::ModRevision(uint(kv.mod_revision))),
                range_end: Vec::new(),
            };
            let out = via_leader!(
                self,
                txn,
                kiwi::TxnRequest {
                    header: None,
                    compare: vec![unchanged],
                    success: vec![kiwi::TxnOp {
                        op: Some(txn_op::Op::Put(put)),
                    }],
                    failure: Vec::new(),
                }
            )?;
            if out.succeeded {
                let prev_kv = match out.responses.into_iter().next().and_then(|o| o.response) {
                    Some(txn_op_response::Response::Put(p)) => p.prev_kv.map(to_etcd_kv),
                    _ => None,
                };
                return Ok(PutResponse {
                    header: self.header(out.header.map_or(0, |h| h.revision)),
                    prev_kv,
                });
            }
        }
        Err(Status::aborted(
            "etcdserver: the key kept changing under a put with ignore_value or ignore_lease; retry",
        ))
    }

    async fn delete_range(&self, r: DeleteRangeRequest) -> Result<DeleteRangeResponse, Status> {
        let (start, end) = etcd_range(&r.key, &r.range_end);
        let out = via_leader!(
            self,
            delete_range,
            kiwi::DeleteRangeRequest {
                header: None,
                start_key: start,
                end_key: end,
                prefix: Vec::new(),
                prev_kv: r.prev_kv,
            }
        )?;
        Ok(DeleteRangeResponse {
            header: self.header(out.header.map_or(0, |h| h.revision)),
            deleted: int(out.deleted),
            prev_kvs: out.prev_kvs.into_iter().map(to_etcd_kv).collect(),
        })
    }

    async fn txn(&self, r: TxnRequest) -> Result<TxnResponse, Status> {
        let compare = r
            .compare
            .into_iter()
            .map(|c| kiwi::Compare {
                result: c.result,
                target: c.target,
                key: c.key,
                target_union: c.target_union.map(|t| {
                    use etcd::compare::TargetUnion as E;
                    use kiwi::compare::TargetUnion as K;
                    match t {
                        E::Version(v) => K::Version(uint(v)),
                        E::CreateRevision(v) => K::CreateRevision(uint(v)),
                        E::ModRevision(v) => K::ModRevision(uint(v)),
                        E::Value(v) => K::Value(v),
                        E::Lease(v) => K::Lease(uint(v)),
                    }
                }),
                range_end: c.range_end,
            })
            .collect();
        // Ranges with a sort or filters read their whole range in the transaction and are shaped after.
        let ops = |ops: Vec<etcd::RequestOp>, shapes: &mut Vec<(Shape, i64)>| {
            ops.into_iter()
                .map(|op| {
                    let op = match op.request {
                        Some(request_op::Request::RequestRange(g)) => {
                            let shape = Shape::of(&g);
                            let whole = shape.needed();
                            let limit = if whole { 0 } else { g.limit };
                            shapes.push((shape, g.limit));
                            txn_op::Op::Range(txn_op::Range {
                                key: g.key,
                                range_end: g.range_end,
                                limit: u32::try_from(limit.max(0)).unwrap_or(u32::MAX),
                                keys_only: g.keys_only,
                                count_only: g.count_only,
                            })
                        }
                        Some(request_op::Request::RequestPut(p)) => {
                            if p.ignore_value || p.ignore_lease {
                                return Err(Status::invalid_argument(
                                    "etcdserver: ignore_value and ignore_lease are not served inside a txn by Kiwi",
                                ));
                            }
                            shapes.push((Shape::of(&RangeRequest::default()), 0));
                            txn_op::Op::Put(txn_op::Put {
                                key: p.key,
                                value: p.value,
                                prev_kv: p.prev_kv,
                                lease: uint(p.lease),
                            })
                        }
                        Some(request_op::Request::RequestDeleteRange(d)) => {
                            shapes.push((Shape::of(&RangeRequest::default()), 0));
                            txn_op::Op::DeleteRange(txn_op::DeleteRange {
                                key: d.key,
                                range_end: d.range_end,
                                prev_kv: d.prev_kv,
                            })
                        }
                        Some(request_op::Request::RequestTxn(_)) => {
                            return Err(Status::unimplemented(
                                "nested transactions are not supported by Kiwi: put the nested \
                                 transaction's operations in the outer one, or send it on its own",
                            ));
                        }
                        None => return Err(Status::invalid_argument("etcdserver: an op is empty")),
                    };
                    Ok(kiwi::TxnOp { op: Some(op) })
                })
                .collect::<Result<Vec<_>, Status>>()
        };
        let mut success_shapes = Vec::new();
        let mut failure_shapes = Vec::new();
        let success = ops(r.success, &mut success_shapes)?;
        let failure = ops(r.failure, &mut failure_shapes)?;
        let out = via_leader!(
            self,
            txn,
            kiwi::TxnRequest {
                header: None,
                compare,
                success,
                failure,
            }
        )?;
        let shapes = if out.succeeded {
            success_shapes
        } else {
            failure_shapes
        };
        let revision = out.header.map_or(0, |h| h.revision);
        let responses = out
            .responses
            .into_iter()
            .zip(shapes)
            .map(|(o, (shape, limit))| {
                let response = match o.response {
                    Some(txn_op_response::Response::Range(g)) => {
                        let mut kvs: Vec<_> = g.kvs.into_iter().map(to_etcd_kv).collect();
                        let mut more = g.more;
                        if shape.needed() {
                            more |= shape.apply(&mut kvs, limit);
                        }
                        Some(response_op::Response::ResponseRange(RangeResponse {
                            header: self.header(revision),
                            kvs,
                            more,
                            count: int(g.count),
                        }))
                    }
                    Some(txn_op_response::Response::Put(p)) => {
                        Some(response_op::Response::ResponsePut(PutResponse {
                            header: self.header(revision),
                            prev_kv: p.prev_kv.map(to_etcd_kv),
                        }))
                    }
                    Some(txn_op_response::Response::DeleteRange(d)) => Some(
                        response_op::Response::ResponseDeleteRange(DeleteRangeResponse {
                            header: self.header(revision),
                            deleted: int(d.deleted),
                            prev_kvs: d.prev_kvs.into_iter().map(to_etcd_kv).collect(),
                        }),
                    ),
                    None => None,
                };
                etcd::ResponseOp { response }
            })
            .collect();
        Ok(TxnResponse {
            header: self.header(revision),
            succeeded: out.succeeded,
            responses,
        })
    }

    async fn compact(&self, r: CompactionRequest) -> Result<CompactionResponse, Status> {
        let out = via_leader!(
            self,
            compact,
            kiwi::CompactRequest {
                header: None,
                revision: uint(r.revision),
            }
        )?;
        Ok(CompactionResponse {
            header: self.header(out.header.map_or(0, |h| h.revision)),
        })
    }
}

#[tonic::async_trait]
impl Kv for EtcdKv {
    async fn range(&self, r: Request<RangeRequest>) -> Result<Response<RangeResponse>, Status> {
        let r = r.into_inner();
        // A linearizable read on a node that cannot serve one (not the leader and no leader known, or
        // removed) fails like any Kiwi read; a follower serves it through a ReadIndex round.
        self.0.range(r).await.map(Response::new).map_err(to_etcd)
    }

    async fn put(&self, r: Request<PutRequest>) -> Result<Response<PutResponse>, Status> {
        self.0
            .put(r.into_inner())
            .await
            .map(Response::new)
            .map_err(to_etcd)
    }

    async fn delete_range(
        &self,
        r: Request<DeleteRangeRequest>,
    ) -> Result<Response<DeleteRangeResponse>, Status> {
        self.0
            .delete_range(r.into_inner())
            .await
            .map(Response::new)
            .map_err(to_etcd)
    }

    async fn txn(&self, r: Request<TxnRequest>) -> Result<Response<TxnResponse>, Status> {
        self.0
            .txn(r.into_inner())
            .await
            .map(Response::new)
            .map_err(to_etcd)
    }

    async fn compact(
        &self,
        r: Request<CompactionRequest>,
    ) -> Result<Response<CompactionResponse>, Status> {
        self.0
            .compact(r.into_inner())
            .await
            .map(Response::new)
            .map_err(to_etcd)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kv(key: &str, create: i64, m: i64) -> mvccpb::KeyValue {
        mvccpb::KeyValue {
            key: key.as_bytes().to_vec(),
            create_revision: create,
            mod_revision: m,
            ..mvccpb::KeyValue::default()
        }
    }

    #[test]
    fn sorts_and_filters_as_etcd() {
        let all = vec![kv("a", 5, 9), kv("b", 3, 3), kv("c", 7, 8)];
        // WithFirstCreate: sort by create ascending, limit 1.
        let first = RangeRequest {
            sort_target: SortTarget::Create as i32,
            sort_order: SortOrder::Ascend as i32,
            limit: 1,
            ..RangeRequest::default()
        };
        let shape = Shape::of(&first);
        assert!(shape.needed());
        let mut kvs = all.clone();
        assert!(shape.apply(&mut kvs, 1));
        assert_eq!(kvs, vec![kv("b", 3, 3)]);
        // A target with no order sorts ascending; max create revision filters.
        let last_before = RangeRequest {
            sort_target: SortTarget::Create as i32,
            sort_order: SortOrder::Descend as i32,
            max_create_revision: 6,
            ..RangeRequest::default()
        };
        let mut kvs = all.clone();
        assert!(!Shape::of(&last_before).apply(&mut kvs, 0));
        assert_eq!(kvs, vec![kv("a", 5, 9), kv("b", 3, 3)]);
        let by_mod = RangeRequest {
            sort_target: SortTarget::Mod as i32,
            ..RangeRequest::default()
        };
        let mut kvs = all.clone();
        Shape::of(&by_mod).apply(&mut kvs, 0);
        assert_eq!(kvs[0].key, b"b");
        // Key order ascending is Kiwi's own: nothing to do.
        assert!(!Shape::of(&RangeRequest::default()).needed());
    }
}
