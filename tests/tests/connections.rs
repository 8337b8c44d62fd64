//! What a client's connections may hold on a node (`[connections]`), seen from raw HTTP/2 clients that
//! misbehave as no gRPC library does: answers asked for and never read are bounded per connection and in
//! all (a real `kiwi-node` process, its own metric and its RSS), and a connection with no call in progress
//! is closed after the idle time while one with a call stays open.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;
use kiwi_proto::v1::{GetRequest, RequestHeader, ScanRequest};
use kiwi_tests::cluster::{Cluster, ClusterOptions, DEADLINE};
use tonic::Code;

const PER_CONNECTION: usize = 256 * 1024;
const TOTAL: usize = 512 * 1024;
const VALUE: usize = 32 * 1024;

fn options(idle_sec: u64) -> ClusterOptions {
    ClusterOptions {
        nodes: 1,
        extra_config: format!(
            "\n[connections]\nidle_timeout_sec = {idle_sec}\nanswer_buffer_per_connection = {PER_CONNECTION}\n\
             answer_buffer_total = {TOTAL}\n"
        ),
        ..ClusterOptions::default()
    }
}

/// An HTTP/2 connection to `addr` (h2's default windows: 64 KiB per stream and per connection, opened
/// only when the application reads, which these clients never do).
async fn raw_connection(
    addr: SocketAddr,
) -> (h2::client::SendRequest<Bytes>, tokio::task::JoinHandle<()>) {
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (client, connection) = h2::client::handshake(tcp).await.unwrap();
    let driver = tokio::spawn(async move {
        let _ = connection.await;
    });
    (client, driver)
}

fn grpc_request(addr: SocketAddr, method: &str, timeout_ms: u64) -> http::Request<()> {
    http::Request::builder()
        .method("POST")
        .uri(format!("http://{addr}/kiwi.v1.KvService/{method}"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .header("grpc-timeout", format!("{timeout_ms}m"))
        .body(())
        .unwrap()
}

fn framed(message: &impl prost::Message) -> Bytes {
    let body = message.encode_to_vec();
    let mut out = Vec::with_capacity(5 + body.len());
    out.push(0);
    out.extend_from_slice(&u32::try_from(body.len()).unwrap().to_be_bytes());
    out.extend_from_slice(&body);
    out.into()
}

/// What a node answered in its headers: an answer on its way (unread here), or a gRPC status.
#[derive(Debug)]
enum Headers {
    Answer(h2::RecvStream),
    Status(i32, String),
}

async fn scan_unread(client: &mut h2::client::SendRequest<Bytes>, addr: SocketAddr) -> Headers {
    // The node's own deadline (a grpc-timeout would end the call with DEADLINE_EXCEEDED first).
    let scan = ScanRequest {
        header: Some(RequestHeader {
            timeout: Some(prost_types::Duration {
                seconds: 0,
                nanos: 700_000_000,
            }),
            ..RequestHeader::default()
        }),
        limit: 1_000,
        ..ScanRequest::default()
    };
    let mut ready = client.clone().ready().await.unwrap();
    let (response, mut body) = ready
        .send_request(grpc_request(addr, "Scan", 60_000), false)
        .unwrap();
    body.send_data(framed(&scan), true).unwrap();
    let response = tokio::time::timeout(DEADLINE, response)
        .await
        .expect("headers within the deadline")
        .unwrap();
    match response.headers().get("grpc-status") {
        Some(code) => Headers::Status(
            code.to_str().unwrap().parse().unwrap(),
            response
                .headers()
                .get("grpc-message")
                .map(|m| m.to_str().unwrap().to_string())
                .unwrap_or_default(),
        ),
        None => Headers::Answer(response.into_body()),
    }
}

/// `kiwi_runtime_answer_buffer_bytes` from the node's metrics endpoint.
async fn held(cluster: &Cluster) -> u64 {
    let answer = kiwi_tests::http::get(cluster.metrics_addr(1), "/metrics", None).await;
    answer
        .body
        .lines()
        .find(|l| l.starts_with("kiwi_runtime_answer_buffer_bytes"))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
        .unwrap_or_else(|| panic!("no kiwi_runtime_answer_buffer_bytes in\n{}", answer.body))
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap()
}

/// Three connections ask for 12 scans of 1 MiB each and read none: each connection gets answers up to
/// its share (the later ones wait, then fail with RESOURCE_EXHAUSTED naming the budget), the node holds
/// at most its total (plus the last pair of each answer), a small read on another connection is
/// served all along, and everything held is given back when the connections close.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answers_nobody_reads_hold_at_most_their_budget() {
    let cluster = Cluster::start(options(0)).await;
    let leader = cluster.wait_leader().await;
    for i in 0..32u32 {
        cluster
            .must_put(format!("k{i:02}").as_bytes(), &vec![b'v'; VALUE])
            .await;
    }
    cluster.must_put(b"small", b"1").await;
    let pid = cluster.pid(leader);
    let rss_before = rss_kib(pid);
    let addr = cluster.addr(leader);
    let mut connections = Vec::new();
    let mut unread = Vec::new();
    let mut refused = Vec::new();
    for _ in 0..3 {
        let (mut client, driver) = raw_connection(addr).await;
        let mut answers = 0;
        let mut exhausted = 0;
        let asks: Vec<_> = (0..12)
            .map(|_| {
                let mut client = client.clone();
                async move { scan_unread(&mut client, addr).await }
            })
            .collect();
        for headers in futures_join(asks).await {
            match headers {
                Headers::Answer(body) => {
                    answers += 1;
                    unread.push(body);
                }
                Headers::Status(code, message) => {
                    assert_eq!(code, Code::ResourceExhausted as i32, "{message}");
                    assert!(message.contains("budget"), "{message}");
                    exhausted += 1;
                    refused.push(message);
                }
            }
        }
        // Without the budget all 12 were answered on every connection (12 MiB held for nobody).
        assert!(exhausted >= 9, "{answers} answered, {exhausted} refused");
        client = client.ready().await.unwrap();
        connections.push((client, driver));
    }
    let during = held(&cluster).await;
    let rss_during = rss_kib(pid);
    // Over the total by at most one pair per answer (a page always holds one).
    let slack = unread.len() as u64 * (VALUE as u64 + 64);
    assert!(
        during <= TOTAL as u64 + slack,
        "{during} bytes held, budget {TOTAL} + {slack}"
    );
    assert!(during > 0);
    // A small read from a well-behaved client is served while the budget is held; a large one
    // waits for room.
    let mut kv = cluster.kv(leader);
    let got = kv
        .get(GetRequest {
            key: b"small".to_vec(),
            ..GetRequest::default()
        })
        .await
        .expect("a read whose answer needs no budget is served");
    assert_eq!(got.into_inner().value, b"1");
    let large = kv
        .get(GetRequest {
            header: Some(RequestHeader {
                timeout: Some(prost_types::Duration {
                    seconds: 0,
                    nanos: 300_000_000,
                }),
                ..RequestHeader::default()
            }),
            key: b"k00".to_vec(),
            ..GetRequest::default()
        })
        .await
        .expect_err("no room for a 32 KiB answer");
    assert_eq!(large.code(), Code::ResourceExhausted, "{large}");
    // Closing the connections gives everything back; a scan is then answered (one share's page).
    drop(unread);
    for (client, driver) in connections {
        drop(client);
        driver.abort();
    }
    let deadline = Instant::now() + DEADLINE;
    while held(&cluster).await != 0 {
        assert!(Instant::now() < deadline, "the budget was never given back");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let page = kv
        .scan(ScanRequest {
            limit: 1_000,
            ..ScanRequest::default()
        })
        .await
        .expect("served once the budget is free")
        .into_inner();
    assert!(
        page.more,
        "a page of one connection's share, not the whole range"
    );
    assert!(!page.kvs.is_empty());
    println!(
        "leader RSS: {rss_before} KiB before, {rss_during} KiB with {} answers unread ({during} bytes \
         held, {} refused), {} KiB after; refusal: {}",
        12 * 3 - refused.len(),
        refused.len(),
        rss_kib(pid),
        refused[0]
    );
}

/// Runs every future at once and returns their outputs in order.
async fn futures_join<F: std::future::Future + Send + 'static>(fs: Vec<F>) -> Vec<F::Output>
where
    F::Output: Send + 'static,
{
    let handles: Vec<_> = fs.into_iter().map(tokio::spawn).collect();
    let mut out = Vec::new();
    for h in handles {
        out.push(h.await.unwrap());
    }
    out
}

/// With `idle_timeout_sec = 2`: a connection with no call is closed after about 2 s; one with a call in
/// progress (a request whose body never ends) stays open, and is closed 2 s after the call ends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_without_calls_is_closed_and_one_with_a_call_is_not() {
    let cluster = Cluster::start(options(2)).await;
    let leader = cluster.wait_leader().await;
    let addr = cluster.addr(leader);
    let started = Instant::now();
    let (idle_client, idle) = raw_connection(addr).await;
    let (busy_client, busy) = raw_connection(addr).await;
    let mut ready = busy_client.clone().ready().await.unwrap();
    let (_response, call) = ready
        .send_request(grpc_request(addr, "Get", 60_000), false)
        .unwrap();
    tokio::time::timeout(DEADLINE, idle)
        .await
        .expect("the idle connection was closed")
        .unwrap();
    let closed_after = started.elapsed();
    assert!(
        closed_after >= Duration::from_millis(1_900),
        "closed after {closed_after:?}, before its idle time"
    );
    // The busy one is still open well past its idle time.
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    assert!(
        !busy.is_finished(),
        "a connection with a call in progress was closed"
    );
    // Ending the call (the client resets it) starts its idle time.
    let ended = Instant::now();
    drop(call);
    drop(_response);
    tokio::time::timeout(DEADLINE, busy)
        .await
        .expect("closed once idle")
        .unwrap();
    assert!(ended.elapsed() >= Duration::from_millis(1_900));
    drop((idle_client, busy_client));
    // The node still serves new connections.
    let mut kv = cluster.kv(leader);
    kv.get(GetRequest {
        key: b"x".to_vec(),
        ..GetRequest::default()
    })
    .await
    .expect("served");
}

/// Sixteen watch streams whose client never reads, each on its own connection and watching every key
/// with previous values, while 100 writes of 512 KiB go in: the writes all succeed, a watcher that reads
/// gets every event in order, and the node's memory grows by far less than the 1.6 GiB the stuck streams
/// would hold if their answers queued without bound: their queued answers hold each connection's share
/// of the answer budget (1 MiB here) and wait; the rest stays in the history, on disk. Measured on this
/// machine: 402 MiB of growth with no stuck stream (memtables of the log, data and history), 716 MiB when
/// each stream could queue 16 answers whatever their size.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_streams_nobody_reads_hold_bounded_memory() {
    use kiwi_proto::v1::kv_service_client::KvServiceClient;
    use kiwi_proto::v1::{PutRequest, WatchCreateRequest, WatchRequest, watch_request};
    const STUCK: usize = 16;
    const WRITES: usize = 100;
    const SIZE: usize = 512 * 1024;
    let cluster = Cluster::start(ClusterOptions {
        nodes: 1,
        extra_config: "\n[connections]\nanswer_buffer_per_connection = \"1 MiB\"\n\
                       answer_buffer_total = \"64 MiB\"\n"
            .into(),
        ..ClusterOptions::default()
    })
    .await;
    let addr = cluster.addr(1);
    let create = |key: &[u8], range_end: &[u8]| WatchRequest {
        request_union: Some(watch_request::RequestUnion::CreateRequest(
            WatchCreateRequest {
                key: key.to_vec(),
                range_end: range_end.to_vec(),
                prev_kv: true,
                ..WatchCreateRequest::default()
            },
        )),
    };
    let mut stuck = Vec::new();
    for _ in 0..STUCK {
        let (client, driver) = raw_connection(addr).await;
        let mut ready = client.ready().await.unwrap();
        let (response, mut body) = ready
            .send_request(grpc_request(addr, "Watch", 600_000), false)
            .unwrap();
        body.send_data(framed(&create(b"\0", b"\0")), false)
            .unwrap();
        // Headers come back; the answers are never read.
        let response = tokio::time::timeout(DEADLINE, response)
            .await
            .expect("the stream opens")
            .unwrap();
        stuck.push((ready, body, response, driver));
    }
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut kv = KvServiceClient::new(channel)
        .max_decoding_message_size(16 << 20)
        .max_encoding_message_size(16 << 20);
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    tx.send(create(b"big/", b"big0")).await.unwrap();
    let mut live = kv
        .clone()
        .watch(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    assert!(live.message().await.unwrap().unwrap().created);

    let before = rss_kib(cluster.pid(1));
    let mut revisions = Vec::new();
    for i in 0..WRITES {
        let answer = kv
            .put(PutRequest {
                key: format!("big/{}", i % 4).into_bytes(),
                value: vec![i as u8; SIZE],
                ..PutRequest::default()
            })
            .await
            .expect("writes go on while watchers are stuck")
            .into_inner();
        revisions.push(answer.header.unwrap().revision);
    }
    let mut seen = Vec::new();
    while seen.len() < WRITES {
        let answer = tokio::time::timeout(DEADLINE, live.message())
            .await
            .expect("the reading watcher keeps up")
            .unwrap()
            .unwrap();
        seen.extend(
            answer
                .events
                .iter()
                .map(|e| e.kv.as_ref().unwrap().mod_revision),
        );
    }
    assert_eq!(seen, revisions, "every event, in order, once");
    let grown_mib = rss_kib(cluster.pid(1)).saturating_sub(before) / 1024;
    assert!(
        grown_mib < 600,
        "the node grew by {grown_mib} MiB with {STUCK} stuck watch streams"
    );
    drop(tx);
    drop(stuck);
}
