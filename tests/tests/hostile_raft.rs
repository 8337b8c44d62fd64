//! Forged and malformed Raft traffic sent straight to the Raft port of a running cluster: each message
//! here stopped every node (or replaced its data) before the transport and driver checked their input
//! (`data-node/src/raft/guard.rs`). The cluster must keep every acknowledged write, keep serving, come
//! back after a restart, and count what it refused.

use std::time::{Duration, Instant};

use kiwi_proto::v1::raft_transport_client::RaftTransportClient;
use kiwi_proto::v1::{Consistency, GetRequest, KeyValue, RaftMessageBatch, SnapshotChunk};
use kiwi_tests::cluster::{Cluster, ClusterOptions, DEADLINE, header};
use protobuf::Message as _;
use raft::eraftpb::{Entry, Message, MessageType};
use tonic::Code;

fn message(kind: MessageType, from: u64, to: u64, term: u64) -> Message {
    let mut m = Message::default();
    m.set_msg_type(kind);
    m.from = from;
    m.to = to;
    m.term = term;
    m
}

/// Sends one batch on a fresh stream and returns how the receiver ended it.
async fn send(cluster: &Cluster, to: u64, cluster_id: u64, from: u64, msgs: &[Message]) -> Code {
    let mut client = RaftTransportClient::connect(format!("http://{}", cluster.addr(to)))
        .await
        .unwrap();
    let batch = RaftMessageBatch {
        cluster_id,
        from_node: from,
        to_node: to,
        messages: msgs.iter().map(|m| m.write_to_bytes().unwrap()).collect(),
        lease: None,
    };
    match client.send_messages(tokio_stream::iter([batch])).await {
        Ok(_) => Code::Ok,
        Err(e) => e.code(),
    }
}

/// A snapshot stream that would replace node `to`'s data with `key = forged`.
async fn forge_snapshot(cluster: &Cluster, to: u64, cluster_id: u64, from: u64, term: u64) -> Code {
    let mut client = RaftTransportClient::connect(format!("http://{}", cluster.addr(to)))
        .await
        .unwrap();
    let mut msg = message(MessageType::MsgSnapshot, from, to, term);
    let meta = msg.mut_snapshot().mut_metadata();
    meta.index = 1_000_000;
    meta.term = term + 1;
    meta.mut_conf_state().voters = vec![from];
    let chunk = SnapshotChunk {
        cluster_id,
        from_node: from,
        to_node: to,
        message: msg.write_to_bytes().unwrap(),
        kvs: vec![KeyValue {
            key: b"victim".to_vec(),
            value: b"forged".to_vec(),
            ..KeyValue::default()
        }],
        last: true,
    };
    match client.send_snapshot(tokio_stream::iter([chunk])).await {
        Ok(_) => Code::Ok,
        Err(e) => e.code(),
    }
}

async fn linearizable_get(cluster: &Cluster, key: &[u8]) -> Option<Vec<u8>> {
    let deadline = Instant::now() + DEADLINE;
    loop {
        let leader = cluster.wait_leader().await;
        let r = cluster
            .kv(leader)
            .get(GetRequest {
                revision: 0,
                header: Some(header()),
                key: key.to_vec(),
                consistency: Consistency::Linearizable as i32,
            })
            .await;
        match r {
            Ok(r) => {
                let r = r.into_inner();
                return r.found.then_some(r.value);
            }
            Err(e) => assert!(Instant::now() < deadline, "linearizable get failed: {e}"),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// `kiwi_raft_messages_refused_total` on node `id`, summed over reasons.
async fn refused(cluster: &Cluster, id: u64) -> f64 {
    let answer = kiwi_tests::http::get(cluster.metrics_addr(id), "/metrics/raft", None).await;
    answer
        .body
        .lines()
        .filter(|l| l.starts_with("kiwi_raft_messages_refused_total{"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_raft_messages_are_refused_and_the_cluster_keeps_its_data() {
    let mut cluster = Cluster::start(ClusterOptions::default()).await;
    let applied = cluster.must_put(b"victim", b"original").await;
    let leader = cluster.wait_leader().await;
    let status = cluster.status(leader).await.unwrap();
    let (cluster_id, term) = (status.cluster_id, status.term);
    let follower = cluster.ids().into_iter().find(|&id| id != leader).unwrap();
    for id in cluster.ids() {
        assert_eq!(
            refused(&cluster, id).await,
            0.0,
            "node {id} refused nothing yet"
        );
    }

    // A stranger: refused at the stream, whatever its cluster id claims.
    for claimed in [0, cluster_id, cluster_id ^ 1] {
        let hb = message(MessageType::MsgHeartbeat, 99, leader, u64::MAX);
        let code = send(&cluster, leader, claimed, 99, &[hb]).await;
        assert_ne!(
            code,
            Code::Ok,
            "a non-member's stream is refused (cluster {claimed:x})"
        );
    }
    assert_eq!(
        forge_snapshot(&cluster, follower, 0, 99, term).await,
        Code::PermissionDenied,
        "a non-member's snapshot is refused before anything is staged"
    );

    // Messages that claim to come from a member (mutual TLS is what stops a stranger from claiming a
    // member's id; without it, each of these must still be refused before raft-rs sees it).
    let mut poison = Vec::new();
    poison.push(message(
        MessageType::MsgHeartbeat,
        follower,
        leader,
        u64::MAX,
    ));
    let mut hb = message(MessageType::MsgHeartbeat, follower, leader, term);
    hb.commit = 1_000_000_000_000;
    poison.push(hb);
    poison.push(message(MessageType::MsgPropose, follower, leader, 0));
    poison.push(message(MessageType::MsgHup, follower, leader, 0));
    let mut resp = message(MessageType::MsgAppendResponse, follower, leader, term);
    resp.index = 1_000_000_000_000;
    poison.push(resp);
    let mut gap = message(MessageType::MsgAppend, follower, leader, term);
    gap.set_entries(
        vec![Entry {
            index: 1,
            term: 1,
            ..Entry::default()
        }]
        .into(),
    );
    poison.push(gap);
    for target in cluster.ids() {
        let from = if target == follower { leader } else { follower };
        let msgs: Vec<Message> = poison
            .iter()
            .map(|m| {
                let mut m = m.clone();
                m.from = from;
                m.to = target;
                m
            })
            .collect();
        // The stream itself is a member's; its messages are dropped one by one.
        send(&cluster, target, cluster_id, from, &msgs).await;
        // A message naming another sender than its batch.
        let spoof = message(MessageType::MsgTimeoutNow, 77, target, term);
        send(&cluster, target, cluster_id, from, &[spoof]).await;
    }
    assert_eq!(
        forge_snapshot(&cluster, follower, cluster_id, leader, u64::MAX - 1).await,
        Code::InvalidArgument,
        "a snapshot with an impossible term is refused"
    );

    // Every node is still up, at a sane term, and counted what it refused.
    for id in cluster.ids() {
        let s = cluster.status(id).await.expect("node still serves");
        assert!(
            s.term < 1 << 20,
            "node {id}'s term was not pushed up: {s:?}"
        );
        assert!(
            refused(&cluster, id).await >= 6.0,
            "node {id} counts its refusals"
        );
    }
    assert_eq!(
        linearizable_get(&cluster, b"victim").await.as_deref(),
        Some(&b"original"[..]),
        "no forged write or snapshot reached the data"
    );
    let after = cluster.must_put(b"after", b"1").await;
    assert!(after > applied);

    // Nothing poisonous was persisted: every node restarts and the cluster serves as before.
    for id in cluster.ids() {
        cluster.kill(id);
    }
    for id in cluster.ids() {
        cluster.restart(id);
    }
    cluster.wait_leader().await;
    for id in cluster.ids() {
        assert_eq!(
            cluster
                .must_get_local(id, b"victim", after)
                .await
                .as_deref(),
            Some(&b"original"[..]),
            "node {id} after restart"
        );
    }
    cluster.must_put(b"after-restart", b"1").await;
}
