//! A node's gRPC servers facing requests a well-behaved client never sends: bodies that are not
//! protobuf at all, protobuf cut short, messages over the size limit. The API promises
//! `INVALID_ARGUMENT` for a malformed request; tonic's default codec would say `INTERNAL`, which tells the
//! caller the node is broken when the caller is (see `kiwi_proto::codec`).

use std::net::SocketAddr;

use kiwi_node::{Node, NodeConfig};
use kiwi_proto::v1::{PriorityPolicy, PutRequest, RequestHeader, RuntimePolicy, ScalingPolicy};
use kiwi_storage::BackendKind;
use prost::Message;
use prost::bytes::{Buf, BufMut};
use tonic::codec::{BufferSettings, Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::codegen::http::uri::PathAndQuery;
use tonic::transport::Channel;
use tonic::{Code, Request, Status};

const PUT: &str = "/kiwi.v1.KvService/Put";
const SET_RUNTIME_POLICY: &str = "/kiwi.v1.NodeAdmin/SetRuntimePolicy";
const SEND_RAFT_MESSAGES: &str = "/kiwi.v1.RaftTransport/SendMessages";

/// Sends and receives message bodies as raw bytes, so a test can put anything in a gRPC frame.
#[derive(Debug, Clone, Copy, Default)]
struct RawCodec;

impl Codec for RawCodec {
    type Encode = Vec<u8>;
    type Decode = Vec<u8>;
    type Encoder = RawCodec;
    type Decoder = RawCodec;

    fn encoder(&mut self) -> RawCodec {
        RawCodec
    }

    fn decoder(&mut self) -> RawCodec {
        RawCodec
    }
}

impl Encoder for RawCodec {
    type Item = Vec<u8>;
    type Error = Status;

    fn encode(&mut self, item: Vec<u8>, buf: &mut EncodeBuf<'_>) -> Result<(), Status> {
        buf.put_slice(&item);
        Ok(())
    }

    fn buffer_settings(&self) -> BufferSettings {
        BufferSettings::default()
    }
}

impl Decoder for RawCodec {
    type Item = Vec<u8>;
    type Error = Status;

    fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<Vec<u8>>, Status> {
        Ok(Some(buf.copy_to_bytes(buf.remaining()).to_vec()))
    }

    fn buffer_settings(&self) -> BufferSettings {
        BufferSettings::default()
    }
}

async fn start_node() -> (Node, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let mut config = NodeConfig {
        data_dir: dir.path().to_path_buf(),
        listen_addr: "127.0.0.1:0".parse().unwrap(),
        ..NodeConfig::default()
    };
    config.storage.backend = BackendKind::Memory;
    (Node::start(config).await.unwrap(), dir)
}

async fn grpc(addr: SocketAddr) -> tonic::client::Grpc<Channel> {
    let channel = Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    tonic::client::Grpc::new(channel)
}

/// The status a unary call of `path` with `body` as its request message is answered with.
async fn unary(addr: SocketAddr, path: &'static str, body: Vec<u8>) -> Status {
    let mut grpc = grpc(addr).await;
    grpc.ready().await.unwrap();
    match grpc
        .unary(
            Request::new(body),
            PathAndQuery::from_static(path),
            RawCodec,
        )
        .await
    {
        Ok(r) => panic!("{path} accepted a hostile request: {:?}", r.into_inner()),
        Err(status) => status,
    }
}

/// The status a client-streaming call of `path` with one request message `body` is answered with.
async fn client_streaming(addr: SocketAddr, path: &'static str, body: Vec<u8>) -> Status {
    let mut grpc = grpc(addr).await;
    grpc.ready().await.unwrap();
    let stream = tokio_stream::iter(vec![body]);
    match grpc
        .client_streaming(
            Request::new(stream),
            PathAndQuery::from_static(path),
            RawCodec,
        )
        .await
    {
        Ok(r) => panic!("{path} accepted a hostile request: {:?}", r.into_inner()),
        Err(status) => status,
    }
}

/// `message`'s encoding without its last `cut` bytes, checked to be undecodable as an `M`.
fn truncated<M: Message + Default>(message: &M, cut: usize) -> Vec<u8> {
    let mut bytes = message.encode_to_vec();
    bytes.truncate(bytes.len() - cut);
    undecodable::<M>(bytes)
}

/// `bytes`, checked to be undecodable as an `M` (so a test cannot pass on a payload prost accepts).
fn undecodable<M: Message + Default>(bytes: Vec<u8>) -> Vec<u8> {
    assert!(
        M::decode(&bytes[..]).is_err(),
        "{bytes:?} decodes as a {}",
        std::any::type_name::<M>()
    );
    bytes
}

fn assert_undecodable_request(what: &str, status: &Status) {
    assert_eq!(
        status.code(),
        Code::InvalidArgument,
        "{what}: {status:?} (INTERNAL here means the server decodes with tonic's default codec)"
    );
    assert!(
        status.message().contains("could not decode"),
        "{what}: the message should say the request could not be decoded: {status:?}"
    );
    assert!(
        status
            .message()
            .contains("failed to decode Protobuf message"),
        "{what}: the message should say why: {status:?}"
    );
}

#[tokio::test]
async fn undecodable_requests_are_invalid_argument_not_internal() {
    let (node, _dir) = start_node().await;
    let addr = node.local_addr();

    let put = PutRequest {
        header: Some(RequestHeader {
            request_id: "hostile-1".into(),
            ..RequestHeader::default()
        }),
        key: b"key".to_vec(),
        value: vec![b'v'; 1000],
        prev_kv: false,
        lease: 0,
    };
    let policy = RuntimePolicy {
        scaling: Some(ScalingPolicy {
            enabled: true,
            min_storage_threads: 2,
            max_storage_threads: 8,
            ..ScalingPolicy::default()
        }),
        priority: Some(PriorityPolicy {
            enabled: true,
            high_priority_weight: 70,
            normal_priority_weight: 20,
            low_priority_weight: 10,
        }),
    };
    let garbage = || undecodable::<PutRequest>(vec![0xff; 16]);
    let text = || undecodable::<PutRequest>(b"this is not protobuf".to_vec());

    let cases: Vec<(&str, &'static str, Vec<u8>)> = vec![
        ("Put, garbage (invalid varint)", PUT, garbage()),
        ("Put, text", PUT, text()),
        ("Put, truncated inside the value", PUT, truncated(&put, 100)),
        ("Put, truncated by one byte", PUT, truncated(&put, 1)),
        (
            "SetRuntimePolicy, garbage",
            SET_RUNTIME_POLICY,
            undecodable::<RuntimePolicy>(vec![0xff; 16]),
        ),
        (
            "SetRuntimePolicy, truncated",
            SET_RUNTIME_POLICY,
            truncated(&policy, 2),
        ),
    ];
    for (what, path, body) in cases {
        let status = unary(addr, path, body).await;
        assert_undecodable_request(what, &status);
    }

    // A streamed request message goes through the same codec.
    let status = client_streaming(addr, SEND_RAFT_MESSAGES, vec![0xff; 16]).await;
    assert_undecodable_request("SendMessages, garbage", &status);

    node.shutdown().await.unwrap();
}

/// tonic refuses a message over the service's `max_decoding_message_size` before decoding it; the
/// status must stay a client error that names the limit, not `INTERNAL`.
#[tokio::test]
async fn an_over_limit_request_is_refused_naming_the_limit() {
    let (node, _dir) = start_node().await;
    let status = unary(node.local_addr(), PUT, vec![0; 32 * 1024 * 1024]).await;
    assert!(
        matches!(status.code(), Code::OutOfRange | Code::ResourceExhausted),
        "{status:?}"
    );
    assert!(
        status
            .message()
            .contains("found 33554432 bytes, the limit is"),
        "{status:?}"
    );
    node.shutdown().await.unwrap();
}
