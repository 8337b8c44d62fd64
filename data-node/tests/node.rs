//! A real `kiwi-node`: gRPC health and reflection on loopback, the data directory's node id, and a
//! graceful stop on SIGTERM.

use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use kiwi_node::{Node, NodeConfig};
use kiwi_storage::BackendKind;
use tonic::transport::Channel;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_reflection::pb::v1::ServerReflectionRequest;
use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;

fn config(dir: &std::path::Path, backend: BackendKind) -> NodeConfig {
    let mut c = NodeConfig {
        data_dir: dir.to_path_buf(),
        listen_addr: "127.0.0.1:0".parse().unwrap(),
        ..NodeConfig::default()
    };
    c.storage.backend = backend;
    c
}

async fn channel(addr: SocketAddr) -> Channel {
    Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap()
}

async fn health(addr: SocketAddr) -> Result<i32, String> {
    let ch = Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .map_err(|e| e.to_string())?;
    let resp = HealthClient::new(ch)
        .check(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .map_err(|e| e.to_string())?;
    Ok(resp.into_inner().status)
}

#[tokio::test]
async fn serves_health_and_reflection_on_every_backend() {
    for backend in BackendKind::ALL {
        let dir = tempfile::tempdir().unwrap();
        let node = Node::start(config(dir.path(), backend)).await.unwrap();
        let addr = node.local_addr();
        assert_eq!(
            health(addr).await.unwrap(),
            ServingStatus::Serving as i32,
            "{backend}"
        );

        let mut reflection = ServerReflectionClient::new(channel(addr).await);
        let req = ServerReflectionRequest {
            host: String::new(),
            message_request: Some(MessageRequest::ListServices(String::new())),
        };
        let mut stream = reflection
            .server_reflection_info(tokio_stream::iter(vec![req]))
            .await
            .unwrap()
            .into_inner();
        let resp = stream.message().await.unwrap().unwrap();
        let Some(MessageResponse::ListServicesResponse(list)) = resp.message_response else {
            panic!("unexpected reflection answer {resp:?}");
        };
        let names: Vec<_> = list.service.into_iter().map(|s| s.name).collect();
        for s in [
            "kiwi.v1.KvService",
            "kiwi.v1.NodeAdmin",
            "grpc.health.v1.Health",
        ] {
            assert!(names.iter().any(|n| n == s), "{s} not in {names:?}");
        }
        node.shutdown().await.unwrap();
    }
}

#[tokio::test]
async fn refuses_a_data_dir_of_another_node() {
    let dir = tempfile::tempdir().unwrap();
    let node = Node::start(config(dir.path(), BackendKind::RocksDb))
        .await
        .unwrap();
    node.shutdown().await.unwrap();

    // The same node id restarts fine.
    let node = Node::start(config(dir.path(), BackendKind::RocksDb))
        .await
        .unwrap();
    node.shutdown().await.unwrap();

    let out = Command::new(env!("CARGO_BIN_EXE_kiwi-node"))
        .arg("--data-dir")
        .arg(dir.path())
        .args(["--listen-addr", "127.0.0.1:0", "--node-id", "2"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("belongs to node 1, but raft.node_id is 2"),
        "stderr: {stderr}"
    );
}

#[tokio::test]
async fn refuses_a_data_dir_of_another_cluster() {
    // Node 2 founds a one-node cluster of its own in this directory...
    let dir = tempfile::tempdir().unwrap();
    let mut lone = config(dir.path(), BackendKind::RocksDb);
    lone.raft.node_id = 2;
    let node = Node::start(lone.clone()).await.unwrap();
    node.shutdown().await.unwrap();
    // ... then is started as member 2 of a three-node cluster on it: refused, naming both clusters.
    let mut member = lone;
    member.raft.peers = (1..=3)
        .map(|id| kiwi_node::config::PeerConfig {
            id,
            addr: format!("127.0.0.1:{}", 17_380 + id),
            raft_addr: None,
        })
        .collect();
    let err = Node::start(member)
        .await
        .err()
        .expect("a data directory of another cluster must be refused");
    assert!(
        matches!(err, kiwi_node::Error::ClusterMismatch { stored, configured, .. } if stored != configured),
        "{err}"
    );
    let msg = err.to_string();
    assert!(
        msg.contains("belongs to cluster") && msg.contains("2=127.0.0.1:17382"),
        "{msg}"
    );
}

#[tokio::test]
async fn accepts_raft_peers_respelled_or_updated_to_the_same_members() {
    let dir = tempfile::tempdir().unwrap();
    let lone = config(dir.path(), BackendKind::RocksDb);
    let node = Node::start(lone.clone()).await.unwrap();
    node.shutdown().await.unwrap();
    // The same member, now listed explicitly at another spelling of its address: another derived
    // cluster id, but the same membership, so the restart is accepted.
    let mut listed = lone;
    listed.raft.peers = vec![kiwi_node::config::PeerConfig {
        id: 1,
        addr: "localhost:17391".into(),
        raft_addr: None,
    }];
    let node = Node::start(listed).await.unwrap();
    node.shutdown().await.unwrap();
}

#[tokio::test]
async fn refuses_a_data_dir_of_another_backend() {
    let dir = tempfile::tempdir().unwrap();
    let node = Node::start(config(dir.path(), BackendKind::RocksDb))
        .await
        .unwrap();
    node.shutdown().await.unwrap();
    let err = Node::start(config(dir.path(), BackendKind::LevelDb))
        .await
        .err()
        .expect("a LevelDB node must not open a RocksDB directory");
    let msg = err.to_string();
    assert!(
        msg.contains("holds a rocksdb store, but the leveldb backend was configured"),
        "{msg}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stops_cleanly_on_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let addr = kiwi_proto::net::free_loopback_addr().unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_kiwi-node"))
        .arg("--data-dir")
        .arg(dir.path())
        .arg("--listen-addr")
        .arg(addr.to_string())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();

    let deadline = Instant::now() + Duration::from_secs(30);
    let mut last;
    loop {
        match health(addr).await {
            Ok(s) if s == ServingStatus::Serving as i32 => break,
            Ok(s) => last = format!("status {s}"),
            Err(e) => last = e,
        }
        if let Some(status) = child.try_wait().unwrap() {
            panic!("kiwi-node exited early with {status}");
        }
        assert!(
            Instant::now() < deadline,
            "kiwi-node not serving after 30 s: {last}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // An idle client connection must not keep the node from stopping.
    let mut idle = HealthClient::new(channel(addr).await);
    idle.check(HealthCheckRequest {
        service: String::new(),
    })
    .await
    .unwrap();

    let kill = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(kill.success());
    let out = tokio::task::spawn_blocking(move || child.wait_with_output())
        .await
        .unwrap()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "exit {:?}, stderr: {stderr}",
        out.status
    );
    assert!(stderr.contains("SIGTERM received"), "{stderr}");
    assert!(stderr.contains("kiwi-node stopped"), "{stderr}");
    drop(idle);
}
