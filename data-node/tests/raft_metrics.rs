//! `NodeAdmin.GetRaftMetrics` on a real node: figures that follow the node's work, and
//! `[raft.metrics] enabled = false` honoured.

use std::time::{Duration, Instant};

use kiwi_node::{Node, NodeConfig};
use kiwi_proto::v1::kv_service_client::KvServiceClient;
use kiwi_proto::v1::node_admin_client::NodeAdminClient;
use kiwi_proto::v1::{PutRequest, RaftMetricsRequest, RaftRole};
use kiwi_storage::BackendKind;
use tonic::Code;
use tonic::transport::Channel;

async fn start(dir: &std::path::Path, enabled: bool) -> (Node, Channel) {
    let mut c = NodeConfig {
        data_dir: dir.to_path_buf(),
        listen_addr: "127.0.0.1:0".parse().unwrap(),
        ..NodeConfig::default()
    };
    c.storage.backend = BackendKind::RocksDb;
    c.raft.tick_interval = Duration::from_millis(20);
    c.raft.metrics.enabled = enabled;
    c.raft.metrics.collection_interval = Duration::from_millis(20);
    let node = Node::start(c).await.unwrap();
    let channel = Channel::from_shared(format!("http://{}", node.local_addr()))
        .unwrap()
        .connect()
        .await
        .unwrap();
    (node, channel)
}

async fn put_until_ok(ch: &Channel, key: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let r = KvServiceClient::new(ch.clone())
            .put(PutRequest {
                prev_kv: false,
                header: None,
                key: key.as_bytes().to_vec(),
                value: b"v".to_vec(),
                lease: 0,
            })
            .await;
        match r {
            Ok(_) => return,
            Err(e) => assert!(Instant::now() < deadline, "put never succeeded: {e}"),
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raft_metrics_follow_the_nodes_work() {
    let dir = tempfile::tempdir().unwrap();
    let (node, ch) = start(dir.path(), true).await;
    for i in 0..30 {
        put_until_ok(&ch, &format!("k{i}")).await;
    }
    let mut admin = NodeAdminClient::new(ch.clone());
    let deadline = Instant::now() + Duration::from_secs(30);
    let m = loop {
        let m = admin
            .get_raft_metrics(RaftMetricsRequest::default())
            .await
            .unwrap()
            .into_inner();
        if m.history.len() >= 3 && m.history.last().is_some_and(|h| h.commit_index >= 31) {
            break m;
        }
        assert!(Instant::now() < deadline, "no history: {m:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(m.role, RaftRole::Leader as i32);
    assert!(m.proposals_committed >= 30, "{m:?}");
    assert!(m.propose_to_apply.unwrap().count >= 30);
    assert!(m.log_fsync.unwrap().count >= 1);
    assert!(m.log_last_index >= m.commit_index && m.commit_index >= 31);
    assert_eq!(m.collection_interval_ms, 20);
    assert!(
        m.history
            .windows(2)
            .all(|w| w[0].at_unix_ms <= w[1].at_unix_ms)
    );
    let without = admin
        .get_raft_metrics(RaftMetricsRequest {
            without_history: true,
        })
        .await
        .unwrap()
        .into_inner();
    assert!(without.history.is_empty());
    node.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raft_metrics_off_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let (node, ch) = start(dir.path(), false).await;
    put_until_ok(&ch, "k").await;
    let e = NodeAdminClient::new(ch)
        .get_raft_metrics(RaftMetricsRequest::default())
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition);
    assert!(e.message().contains("[raft.metrics] enabled"), "{e}");
    node.shutdown().await.unwrap();
}
