//! What a node accepts and what it refuses, at the edges: hostile headers, oversized fields, malformed
//! addresses, answers bounded in bytes, values at a raised limit, and a property test of arbitrary KV
//! requests. One in-process single-node cluster per test, over real gRPC on loopback.

use std::time::{Duration, Instant};

use kiwi_node::{Node, NodeConfig};
use kiwi_proto::v1::kv_service_client::KvServiceClient;
use kiwi_proto::v1::node_admin_client::NodeAdminClient;
use kiwi_proto::v1::{
    AddNodeRequest, CompareAndSwapRequest, GetRequest, PutRequest, RequestHeader, ScanRequest,
    compare_and_swap_request,
};
use kiwi_storage::BackendKind;
use tonic::Code;
use tonic::transport::Channel;

/// Client-side message limit for these tests: above any value a node can be configured to hold.
const CLIENT_LIMIT: usize = 128 * 1024 * 1024;

async fn start(dir: &std::path::Path, tweak: impl FnOnce(&mut NodeConfig)) -> (Node, Channel) {
    let mut c = NodeConfig {
        data_dir: dir.to_path_buf(),
        listen_addr: "127.0.0.1:0".parse().unwrap(),
        ..NodeConfig::default()
    };
    c.storage.backend = BackendKind::RocksDb;
    c.raft.tick_interval = Duration::from_millis(20);
    tweak(&mut c);
    let node = Node::start(c).await.unwrap();
    let channel = Channel::from_shared(format!("http://{}", node.local_addr()))
        .unwrap()
        .connect()
        .await
        .unwrap();
    // Wait until the node leads (a put goes through).
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match kv(&channel).put(put(b"ready", b"1")).await {
            Ok(_) => break,
            Err(e) => assert!(Instant::now() < deadline, "node never led: {e}"),
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    (node, channel)
}

fn kv(channel: &Channel) -> KvServiceClient<Channel> {
    KvServiceClient::new(channel.clone())
        .max_decoding_message_size(CLIENT_LIMIT)
        .max_encoding_message_size(CLIENT_LIMIT)
}

fn put(key: &[u8], value: &[u8]) -> PutRequest {
    PutRequest {
        prev_kv: false,
        header: None,
        key: key.to_vec(),
        value: value.to_vec(),
        lease: 0,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn out_of_range_timeouts_are_invalid_argument_not_a_panic() {
    let dir = tempfile::tempdir().unwrap();
    let (node, ch) = start(dir.path(), |_| {}).await;
    for (seconds, nanos) in [
        (i64::MIN, 0),
        (-1, 0),
        (0, -1),
        (1, 1_000_000_000),
        (i64::MIN, i32::MIN),
    ] {
        let mut req = put(b"k", b"v");
        req.header = Some(RequestHeader {
            timeout: Some(prost_types::Duration { seconds, nanos }),
            ..RequestHeader::default()
        });
        let e = kv(&ch).put(req).await.unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{seconds}s {nanos}ns: {e}");
        assert!(e.message().contains("header.timeout"), "{e}");
    }
    // A huge timeout is cut to the maximum, not refused.
    let mut req = put(b"k", b"v");
    req.header = Some(RequestHeader {
        timeout: Some(prost_types::Duration {
            seconds: i64::MAX,
            nanos: 999_999_999,
        }),
        ..RequestHeader::default()
    });
    kv(&ch).put(req).await.unwrap();
    node.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_field_that_carries_bytes_has_a_limit() {
    let dir = tempfile::tempdir().unwrap();
    let (node, ch) = start(dir.path(), |_| {}).await;
    let e = kv(&ch)
        .compare_and_swap(CompareAndSwapRequest {
            header: None,
            key: b"k".to_vec(),
            expected: Some(compare_and_swap_request::Expected::ExpectedValue(vec![
                0;
                12 * 1024 * 1024
            ])),
            new: Some(compare_and_swap_request::New::NewValue(b"v".to_vec())),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e}");
    assert!(e.message().contains("expected_value"), "{e}");
    let e = kv(&ch)
        .put(PutRequest {
            header: Some(RequestHeader {
                request_id: "r".repeat(10_000),
                ..RequestHeader::default()
            }),
            key: b"k".to_vec(),
            value: b"v".to_vec(),
            prev_kv: false,
            lease: 0,
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e}");
    node.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn add_node_refuses_malformed_addresses() {
    let dir = tempfile::tempdir().unwrap();
    let (node, ch) = start(dir.path(), |_| {}).await;
    let mut admin = NodeAdminClient::new(ch.clone());
    for addr in [":", "", "host", "host:0", ":7380", "host:70000"] {
        let e = admin
            .add_node(AddNodeRequest {
                node_id: 2,
                addr: addr.into(),
                raft_addr: String::new(),
                ..AddNodeRequest::default()
            })
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{addr:?}: {e}");
        assert!(e.message().contains("addr"), "{e}");
    }
    for raft_addr in ["host", "a b:1", "host:0"] {
        let e = admin
            .add_node(AddNodeRequest {
                node_id: 2,
                addr: "127.0.0.1:7380".into(),
                raft_addr: raft_addr.into(),
                ..AddNodeRequest::default()
            })
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{raft_addr:?}: {e}");
        assert!(e.message().contains("raft_addr"), "{e}");
    }
    let s = admin
        .status(kiwi_proto::v1::StatusRequest {})
        .await
        .unwrap()
        .into_inner();
    assert!(
        s.learners.is_empty() && s.voters == [1],
        "nothing was added: {s:?}"
    );
    node.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scan_answers_are_bounded_in_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let (node, ch) = start(dir.path(), |_| {}).await;
    let value = vec![b'v'; 1536 * 1024];
    for i in 0..6 {
        kv(&ch)
            .put(put(format!("big{i}").as_bytes(), &value))
            .await
            .unwrap();
    }
    let mut start = b"big".to_vec();
    let mut pages = Vec::new();
    loop {
        let r = kv(&ch)
            .scan(ScanRequest {
                start_key: start.clone(),
                end_key: b"big9".to_vec(),
                limit: 100,
                ..ScanRequest::default()
            })
            .await
            .unwrap()
            .into_inner();
        let bytes: usize = r.kvs.iter().map(|kv| kv.key.len() + kv.value.len()).sum();
        assert!(
            bytes <= kiwi_node::service::MAX_SCAN_BYTES,
            "an answer of {bytes} bytes"
        );
        pages.push(r.kvs.len());
        let Some(last) = r.kvs.last() else { break };
        start = last.key.clone();
        start.push(0);
        if !r.more {
            break;
        }
    }
    assert_eq!(pages.iter().sum::<usize>(), 6, "pages {pages:?}");
    assert!(pages.len() >= 3, "split by bytes: {pages:?}");
    node.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_value_at_a_raised_limit_round_trips() {
    let dir = tempfile::tempdir().unwrap();
    let (node, ch) = start(dir.path(), |c| {
        c.storage.max_value_size = bytesize::ByteSize::mib(32);
    })
    .await;
    // Over the 16 MiB batch cap and tonic's default 4 MiB message limit.
    let value: Vec<u8> = (0..24 * 1024 * 1024).map(|i| (i % 251) as u8).collect();
    kv(&ch).put(put(b"huge", &value)).await.unwrap();
    let r = kv(&ch)
        .get(GetRequest {
            revision: 0,
            header: None,
            key: b"huge".to_vec(),
            consistency: 0,
        })
        .await
        .unwrap()
        .into_inner();
    assert!(r.found);
    assert!(r.value == value, "the value came back intact");
    let e = kv(&ch)
        .put(put(b"too-big", &vec![0; 32 * 1024 * 1024 + 1]))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e}");
    assert!(e.message().contains("33554432"), "names the limit: {e}");
    node.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runtime_policy_has_the_config_ceilings() {
    let dir = tempfile::tempdir().unwrap();
    let (node, ch) = start(dir.path(), |_| {}).await;
    let mut admin = NodeAdminClient::new(ch.clone());
    let before = admin
        .get_runtime_policy(kiwi_proto::v1::GetRuntimePolicyRequest {})
        .await
        .unwrap()
        .into_inner();
    for (field, tweak) in [
        (
            "runtime.scaling.max_storage_threads",
            Box::new(|s: &mut kiwi_proto::v1::ScalingPolicy| {
                s.min_storage_threads = 1500;
                s.max_storage_threads = 1500;
            }) as Box<dyn Fn(&mut kiwi_proto::v1::ScalingPolicy)>,
        ),
        (
            "runtime.scaling.evaluation_interval_ms",
            Box::new(|s: &mut kiwi_proto::v1::ScalingPolicy| s.evaluation_interval_ms = u32::MAX),
        ),
    ] {
        let mut policy = before;
        tweak(policy.scaling.as_mut().unwrap());
        let e = admin.set_runtime_policy(policy).await.unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{e}");
        assert!(e.message().contains(field), "{e}");
    }
    let after = admin
        .get_runtime_policy(kiwi_proto::v1::GetRuntimePolicyRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(after, before, "the old policy stays");
    let stats = admin
        .runtime_stats(kiwi_proto::v1::RuntimeStatsRequest {})
        .await
        .unwrap()
        .into_inner();
    assert!(stats.storage_pool.unwrap().current_threads <= 32);
    node.shutdown().await.unwrap();
}

/// One arbitrary KV request: keys and values around the node's (lowered) limits, arbitrary headers
/// (priorities, request ids, timeouts), empty and oversized batches.
#[derive(Debug, Clone)]
enum AnyRequest {
    Put(PutRequest),
    Delete(kiwi_proto::v1::DeleteRequest),
    Batch(kiwi_proto::v1::BatchWriteRequest),
    Cas(CompareAndSwapRequest),
    Get(GetRequest),
    Scan(ScanRequest),
}

impl AnyRequest {
    /// The keys a write would change and the values it would give them.
    fn writes(&self) -> Vec<Vec<u8>> {
        use kiwi_proto::v1::write_op::Op;
        match self {
            AnyRequest::Put(r) => vec![r.key.clone()],
            AnyRequest::Delete(r) => vec![r.key.clone()],
            AnyRequest::Cas(r) => vec![r.key.clone()],
            AnyRequest::Batch(r) => r
                .ops
                .iter()
                .filter_map(|o| match &o.op {
                    Some(Op::Put(p)) => Some(p.key.clone()),
                    Some(Op::Delete(d)) => Some(d.key.clone()),
                    None => None,
                })
                .collect(),
            AnyRequest::Get(_) | AnyRequest::Scan(_) => Vec::new(),
        }
    }
}

fn any_request() -> impl proptest::strategy::Strategy<Value = AnyRequest> {
    use kiwi_proto::v1::{BatchWriteRequest, DeleteRequest, WriteOp, write_op};
    use proptest::prelude::*;
    // Few distinct short keys (so requests hit each other's keys), and keys around the 64-byte limit.
    let key = prop_oneof![
        proptest::collection::vec(b'a'..=b'c', 0..3),
        proptest::collection::vec(any::<u8>(), 60..70),
    ];
    let value = prop_oneof![
        proptest::collection::vec(any::<u8>(), 0..8),
        proptest::collection::vec(any::<u8>(), 250..262),
    ];
    let header = proptest::option::of(
        (
            any::<i32>(),
            prop_oneof![Just(String::new()), "[ -~]{0,40}", "\\PC{120,140}"],
            proptest::option::of((any::<i64>(), any::<i32>())),
        )
            .prop_map(|(priority, request_id, timeout)| RequestHeader {
                priority,
                request_id,
                timeout: timeout.map(|(seconds, nanos)| prost_types::Duration { seconds, nanos }),
            }),
    );
    let op = (key.clone(), proptest::option::of(value.clone())).prop_map(|(key, value)| WriteOp {
        op: Some(match value {
            Some(value) => write_op::Op::Put(write_op::Put {
                key,
                value,
                lease: 0,
            }),
            None => write_op::Op::Delete(write_op::Delete { key }),
        }),
    });
    prop_oneof![
        (header.clone(), key.clone(), value.clone()).prop_map(|(header, key, value)| {
            AnyRequest::Put(PutRequest {
                header,
                key,
                value,
                prev_kv: false,
                lease: 0,
            })
        }),
        (header.clone(), key.clone())
            .prop_map(|(header, key)| AnyRequest::Delete(DeleteRequest { header, key })),
        (header.clone(), proptest::collection::vec(op, 0..5))
            .prop_map(|(header, ops)| AnyRequest::Batch(BatchWriteRequest { header, ops })),
        (
            header.clone(),
            key.clone(),
            proptest::option::of(value.clone()),
            value.clone()
        )
            .prop_map(|(header, key, expected, new)| AnyRequest::Cas(
                CompareAndSwapRequest {
                    header,
                    key,
                    expected: Some(match expected {
                        Some(v) => compare_and_swap_request::Expected::ExpectedValue(v),
                        None => compare_and_swap_request::Expected::ExpectAbsent(true),
                    }),
                    new: Some(compare_and_swap_request::New::NewValue(new)),
                }
            )),
        (header.clone(), key.clone(), any::<i32>()).prop_map(|(header, key, consistency)| {
            AnyRequest::Get(GetRequest {
                revision: 0,
                header,
                key,
                consistency,
            })
        }),
        (
            header,
            key.clone(),
            key,
            any::<u32>(),
            any::<bool>(),
            any::<i32>()
        )
            .prop_map(
                |(header, start_key, end_key, limit, reverse, consistency)| {
                    AnyRequest::Scan(ScanRequest {
                        header,
                        start_key,
                        end_key,
                        limit,
                        reverse,
                        consistency,
                        keys_only: false,
                        ..ScanRequest::default()
                    })
                }
            ),
    ]
}

/// Every key's value (`None`: absent), read linearizably; keys the node refuses to read are skipped.
async fn values(kv: &mut KvServiceClient<Channel>, keys: &[Vec<u8>]) -> Vec<Option<Vec<u8>>> {
    let mut out = Vec::new();
    for key in keys {
        let r = kv
            .get(GetRequest {
                revision: 0,
                header: None,
                key: key.clone(),
                consistency: 0,
            })
            .await;
        out.push(r.ok().and_then(|r| {
            let r = r.into_inner();
            r.found.then_some(r.value)
        }));
    }
    out
}

/// Arbitrary requests are answered or refused with a status that names the problem, never crash the
/// node, and a refused write changes nothing.
#[test]
fn arbitrary_kv_requests_are_served_or_refused_and_a_refusal_writes_nothing() {
    use proptest::test_runner::{Config, TestCaseError, TestRunner};
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (node, channel) = rt.block_on(start(dir.path(), |c| {
        c.storage.max_key_size = bytesize::ByteSize::b(64);
        c.storage.max_value_size = bytesize::ByteSize::b(256);
    }));
    let mut runner = TestRunner::new(Config {
        cases: 300,
        failure_persistence: None,
        ..Config::default()
    });
    runner
        .run(&any_request(), |request| {
            rt.block_on(async {
                let mut kv = kv(&channel);
                let keys = request.writes();
                let before = values(&mut kv, &keys).await;
                let outcome = match request.clone() {
                    AnyRequest::Put(r) => kv.put(r).await.map(|_| ()),
                    AnyRequest::Delete(r) => kv.delete(r).await.map(|_| ()),
                    AnyRequest::Batch(r) => kv.batch_write(r).await.map(|_| ()),
                    AnyRequest::Cas(r) => kv.compare_and_swap(r).await.map(|_| ()),
                    AnyRequest::Get(r) => kv.get(r).await.map(|_| ()),
                    AnyRequest::Scan(r) => kv.scan(r).await.map(|_| ()),
                };
                let Err(status) = outcome else {
                    return Ok(());
                };
                let refusal = matches!(
                    status.code(),
                    Code::InvalidArgument | Code::FailedPrecondition | Code::OutOfRange
                );
                // A deadline from the header may pass before the answer (writes may then have
                // happened); anything else is a bug.
                if !refusal && status.code() != Code::DeadlineExceeded {
                    return Err(TestCaseError::fail(format!(
                        "{request:?}: unexpected {status:?}"
                    )));
                }
                if refusal && status.message().is_empty() {
                    return Err(TestCaseError::fail(format!(
                        "{request:?}: a refusal names nothing"
                    )));
                }
                if refusal && values(&mut kv, &keys).await != before {
                    return Err(TestCaseError::fail(format!(
                        "{request:?} was refused ({status:?}) but changed data"
                    )));
                }
                Ok(())
            })
        })
        .unwrap();
    // Still serving.
    rt.block_on(async {
        kv(&channel)
            .put(put(b"after", b"1"))
            .await
            .expect("the node still serves");
        node.shutdown().await.unwrap();
    });
}

/// A client that connects and sends nothing is closed once the first-bytes timeout passes; one that
/// speaks is served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_connection_is_closed() {
    use tokio::io::AsyncReadExt as _;
    let dir = tempfile::tempdir().unwrap();
    let (node, channel) = start(dir.path(), |_| {}).await;
    let mut silent = tokio::net::TcpStream::connect(node.local_addr())
        .await
        .unwrap();
    let started = Instant::now();
    let mut buf = [0u8; 64];
    let read = tokio::time::timeout(
        kiwi_proto::connections::HANDSHAKE_TIMEOUT + Duration::from_secs(20),
        silent.read(&mut buf),
    )
    .await
    .expect("the silent connection was never closed");
    assert!(
        matches!(read, Ok(0) | Err(_)),
        "closed without an answer: {read:?}"
    );
    assert!(
        started.elapsed() >= kiwi_proto::connections::HANDSHAKE_TIMEOUT - Duration::from_secs(1),
        "not closed before the timeout"
    );
    kv(&channel)
        .put(put(b"still", b"served"))
        .await
        .expect("a client that speaks is served");
    node.shutdown().await.unwrap();
}
