//! The control plane with real processes on loopback: three `kiwi-node`s linked to one `kiwi-control`.
//! Status shows every node up and one leader; a SIGKILLed node is marked down after three missed
//! heartbeats and the event log says so; a killed leader's successor appears as a leader change; a
//! SIGKILLed control plane restarts with its events and the nodes re-register by themselves; bad node
//! links are refused with a status naming why.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use kiwi_proto::v1::node_link_client::NodeLinkClient;
use kiwi_proto::v1::node_message::Msg;
use kiwi_proto::v1::{Heartbeat, HistoryRequest, NodeMessage, RaftRole, Register};
use kiwi_tests::cluster::{Cluster, ClusterOptions};
use kiwi_tests::http;
use kiwi_tests::prometheus::{Job, Prometheus};
use tonic::Code;

use kiwi_tests::control::{ControlProc, HEARTBEAT_MS, free_addr, up};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_control_plane_tracks_nodes_leaders_and_survives_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let addr = free_addr();
    let mut control = ControlProc::start(addr, &dir.path().join("control"));
    let mut cluster = Cluster::start(ClusterOptions {
        extra_config: format!(
            "\n[control]\naddr = \"{addr}\"\nheartbeat_interval_ms = {HEARTBEAT_MS}\n"
        ),
        ..ClusterOptions::default()
    })
    .await;
    let leader = cluster.wait_leader().await;
    let s = control
        .wait_status("three nodes up, the leader known", |s| {
            up(s) == [1, 2, 3] && s.leader_id == leader
        })
        .await;
    let leader_view = s.nodes.iter().find(|n| n.node_id == leader).unwrap();
    let m = leader_view.metrics.clone().unwrap();
    assert_eq!(m.role, RaftRole::Leader as i32);
    assert!(m.storage_pool.is_some() && m.classes.len() == 4, "{m:?}");
    control
        .wait_status("the leader reports both followers", |s| {
            s.nodes.iter().any(|n| {
                n.node_id == leader && n.metrics.as_ref().is_some_and(|m| m.followers.len() == 2)
            })
        })
        .await;

    // A follower is SIGKILLed: down after three missed heartbeats, and an event says so.
    let follower = (1..=3).find(|&id| id != leader).unwrap();
    cluster.kill(follower);
    control
        .wait_status("the killed follower marked down", |s| {
            !up(s).contains(&follower)
        })
        .await;
    let events = control.events().await;
    assert!(
        events
            .iter()
            .any(|e| e.kind == "node_down" && e.node_id == follower),
        "{events:#?}"
    );
    cluster.restart(follower);
    control
        .wait_status("the restarted follower up again", |s| up(s).len() == 3)
        .await;

    // The leader is SIGKILLed: another takes over, and the change is an event.
    cluster.kill(leader);
    let s = control
        .wait_status("a new leader", |s| {
            s.leader_id != 0 && s.leader_id != leader
        })
        .await;
    let new_leader = s.leader_id;
    let events = control.events().await;
    assert!(
        events.iter().any(|e| e.kind == "leader_changed"
            && e.node_id == new_leader
            && e.detail.contains(&format!("from node {leader}"))),
        "{events:#?}"
    );
    assert!(s.leader_changes >= 1);

    // The control plane is SIGKILLed and restarted on its data: the events are all there and the nodes
    // re-register by themselves.
    let before = control.events().await;
    control.kill();
    let control = ControlProc::start(addr, &dir.path().join("control"));
    let after = control.events().await;
    assert!(
        after.len() >= before.len(),
        "events lost: {before:#?} -> {after:#?}"
    );
    assert_eq!(
        &after[..before.len()],
        &before[..],
        "events changed across the restart"
    );
    let s = control
        .wait_status("the running nodes re-registered and heartbeating", |s| {
            up(s).len() == 2 && s.leader_id != 0
        })
        .await;
    assert_eq!(s.leader_id, new_leader);
    assert!(!up(&s).contains(&leader));
}

async fn link(
    addr: SocketAddr,
    first: Msg,
) -> Result<tonic::Streaming<kiwi_proto::v1::ControlMessage>, tonic::Status> {
    let mut client = NodeLinkClient::connect(format!("http://{addr}"))
        .await
        .unwrap();
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tx.send(NodeMessage { msg: Some(first) }).await.unwrap();
    // Keep the sender alive with the stream.
    std::mem::forget(tx);
    client
        .link(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .map(tonic::Response::into_inner)
}

fn register(node_id: u64, cluster_id: u64, client_addr: &str) -> Msg {
    Msg::Register(Register {
        node_id,
        cluster_id,
        client_addr: client_addr.into(),
        backend: "memory".into(),
        version: "test".into(),
        started_at_unix_ms: 0,
        heartbeat_interval_ms: 60_000,
        ..Register::default()
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_node_links_are_refused_and_the_view_stays_right() {
    let dir = tempfile::tempdir().unwrap();
    let control = ControlProc::start(free_addr(), &dir.path().join("control"));
    control.client().await;
    let addr = control.addr;

    let e = link(addr, Msg::Heartbeat(Heartbeat::default()))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    assert!(e.message().contains("Register"), "{e:?}");

    let mut first = link(addr, register(1, 42, "10.0.0.1:7380")).await.unwrap();
    assert!(first.message().await.unwrap().is_some(), "Registered");

    let e = link(addr, register(2, 43, "10.0.0.2:7380"))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    assert!(e.message().contains("cluster"), "{e:?}");

    let e = link(addr, register(1, 42, "10.0.0.9:7380"))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::AlreadyExists, "{e:?}");
    assert!(e.message().contains("10.0.0.1:7380"), "{e:?}");

    let e = link(addr, register(0, 42, "10.0.0.3:7380"))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");

    let s = control.status().await;
    assert_eq!(s.cluster_id, 42);
    assert_eq!(s.nodes.len(), 1, "{s:#?}");
    assert_eq!(s.nodes[0].client_addr, "10.0.0.1:7380");
    let refused = control
        .events()
        .await
        .into_iter()
        .filter(|e| e.kind == "node_refused")
        .count();
    assert_eq!(refused, 3);
}

async fn runtime_policy(cluster: &Cluster, id: u64) -> kiwi_proto::v1::RuntimePolicy {
    cluster
        .admin(id)
        .get_runtime_policy(kiwi_proto::v1::GetRuntimePolicyRequest {})
        .await
        .unwrap()
        .into_inner()
}

fn storage_threads(p: &kiwi_proto::v1::RuntimePolicy) -> (u32, u32) {
    let s = p.scaling.unwrap();
    (s.min_storage_threads, s.max_storage_threads)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn policy_reaches_every_node_is_acknowledged_and_survives_restarts() {
    use kiwi_proto::v1::SetPolicyRequest;
    let dir = tempfile::tempdir().unwrap();
    let addr = free_addr();
    let mut control = ControlProc::start(addr, &dir.path().join("control"));
    let mut cluster = Cluster::start(ClusterOptions {
        extra_config: format!(
            "\n[control]\naddr = \"{addr}\"\nheartbeat_interval_ms = {HEARTBEAT_MS}\n"
        ),
        ..ClusterOptions::default()
    })
    .await;
    control
        .wait_status("three nodes up", |s| up(s).len() == 3)
        .await;

    // A bad policy is refused, naming the rule, and nothing is pushed.
    let mut bad = kiwi_proto::policy::default_policy();
    bad.scaling.as_mut().unwrap().min_storage_threads = 40;
    let e = control
        .client()
        .await
        .set_policy(SetPolicyRequest {
            policy: Some(bad),
            ..SetPolicyRequest::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(
        e.message().contains("runtime.scaling.min_storage_threads"),
        "{e:?}"
    );
    let p = control
        .client()
        .await
        .get_policy(kiwi_proto::v1::GetPolicyRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(p.version, 0, "a refused policy changes nothing");

    // A cluster-wide policy reaches every node and each acknowledges its version.
    let mut good = kiwi_proto::policy::default_policy();
    good.scaling.as_mut().unwrap().min_storage_threads = 2;
    good.scaling.as_mut().unwrap().max_storage_threads = 6;
    let set = control
        .client()
        .await
        .set_policy(SetPolicyRequest {
            policy: Some(good),
            ..SetPolicyRequest::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(set.version, 1);
    control
        .wait_status("every node acknowledged version 1", |s| {
            s.nodes.iter().all(|n| n.policy_version == 1)
        })
        .await;
    for id in cluster.ids() {
        assert_eq!(
            storage_threads(&runtime_policy(&cluster, id).await),
            (2, 6),
            "node {id}"
        );
    }

    // A per-node override applies to that node only.
    let mut one = kiwi_proto::policy::default_policy();
    one.scaling.as_mut().unwrap().min_storage_threads = 3;
    one.scaling.as_mut().unwrap().max_storage_threads = 5;
    control
        .client()
        .await
        .set_policy(SetPolicyRequest {
            policy: Some(one),
            node_id: 2,
            clear_override: false,
        })
        .await
        .unwrap();
    control
        .wait_status("every node acknowledged version 2", |s| {
            s.nodes.iter().all(|n| n.policy_version == 2)
        })
        .await;
    assert_eq!(storage_threads(&runtime_policy(&cluster, 2).await), (3, 5));
    assert_eq!(storage_threads(&runtime_policy(&cluster, 1).await), (2, 6));
    assert_eq!(storage_threads(&runtime_policy(&cluster, 3).await), (2, 6));
    let events = control.events().await;
    for kind in ["policy_set", "policy_applied"] {
        assert!(
            events.iter().any(|e| e.kind == kind),
            "no {kind}: {events:#?}"
        );
    }

    // The control plane is down; a node restarted meanwhile comes back with the policy it had applied.
    control.kill();
    cluster.stop(2);
    cluster.restart(2);
    cluster.wait_leader().await;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(r) = cluster
            .admin(2)
            .get_runtime_policy(kiwi_proto::v1::GetRuntimePolicyRequest {})
            .await
        {
            assert_eq!(
                storage_threads(&r.into_inner()),
                (3, 5),
                "the persisted override"
            );
            break;
        }
        assert!(Instant::now() < deadline, "node 2 did not come back");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The restarted control plane still has the policy; the nodes report their version again.
    let control = ControlProc::start(addr, &dir.path().join("control"));
    let p = control
        .client()
        .await
        .get_policy(kiwi_proto::v1::GetPolicyRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!((p.version, p.overrides.len()), (2, 1));
    control
        .wait_status("the nodes re-registered at version 2", |s| {
            up(s).len() == 3 && s.nodes.iter().all(|n| n.policy_version == 2)
        })
        .await;

    // The control plane loses its store: its versions start again at 1, in a new epoch. Before epochs the
    // nodes refused 1 as older than the 2 they ran (and would have acknowledged a new version 2 without
    // applying it).
    let mut control = control;
    control.kill();
    let control = ControlProc::start(addr, &dir.path().join("control-new"));
    control
        .wait_status("the nodes registered with the new store", |s| {
            up(s).len() == 3
        })
        .await;
    let mut three = kiwi_proto::policy::default_policy();
    three.scaling.as_mut().unwrap().min_storage_threads = 1;
    three.scaling.as_mut().unwrap().max_storage_threads = 7;
    let set = control
        .client()
        .await
        .set_policy(SetPolicyRequest {
            policy: Some(three),
            node_id: 3,
            clear_override: false,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(set.version, 1);
    control
        .wait_status("every node applied version 1 of the new epoch", |s| {
            s.nodes
                .iter()
                .all(|n| n.policy_version == 1 && n.policy_error.is_empty())
        })
        .await;
    let base = storage_threads(&kiwi_proto::policy::default_policy());
    assert_eq!(storage_threads(&runtime_policy(&cluster, 3).await), (1, 7));
    for id in [1, 2] {
        assert_eq!(
            storage_threads(&runtime_policy(&cluster, id).await),
            base,
            "node {id}: no policy of the new store concerns it: its configuration file's"
        );
    }
    // Clearing the only override, with no cluster-wide policy, returns node 3 to its own policy too.
    control
        .client()
        .await
        .set_policy(SetPolicyRequest {
            policy: None,
            node_id: 3,
            clear_override: true,
        })
        .await
        .unwrap();
    control
        .wait_status("every node acknowledged version 2", |s| {
            s.nodes.iter().all(|n| n.policy_version == 2)
        })
        .await;
    assert_eq!(storage_threads(&runtime_policy(&cluster, 3).await), base);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_prometheus_target_covers_the_cluster_and_history_is_kept() {
    let dir = tempfile::tempdir().unwrap();
    let token = dir.path().join("control.token");
    std::fs::write(&token, "control-token-42\n").unwrap();
    let metrics_addr = free_addr();
    let config = dir.path().join("control.toml");
    std::fs::write(
        &config,
        format!(
            "[metrics]\naddr = \"{metrics_addr}\"\ntoken_file = {token:?}\nretention_sec = 60\n"
        ),
    )
    .unwrap();
    let addr = free_addr();
    let control = ControlProc::start_with(
        addr,
        &dir.path().join("control"),
        &["--config".into(), config.display().to_string()],
    );
    let cluster = Cluster::start(ClusterOptions {
        extra_config: format!(
            "\n[control]\naddr = \"{addr}\"\nheartbeat_interval_ms = {HEARTBEAT_MS}\n"
        ),
        ..ClusterOptions::default()
    })
    .await;
    let leader = cluster.wait_leader().await;
    control
        .wait_status("three nodes up, the leader known", |s| {
            up(s) == [1, 2, 3] && s.leader_id == leader
        })
        .await;
    cluster.must_put(b"k", b"v").await;

    // The same guard as the node's endpoints.
    let open = http::get(metrics_addr, "/metrics", None).await;
    assert_eq!(open.status, 401, "{open:?}");
    let wrong = http::get(metrics_addr, "/metrics", Some("nope")).await;
    assert_eq!(wrong.status, 401);
    let page = http::get(metrics_addr, "/metrics", Some("control-token-42")).await;
    assert_eq!(page.status, 200, "{page:?}");
    for id in 1..=3 {
        let line = format!("kiwi_node_up{{node=\"{id}\"}} 1");
        assert!(
            page.body.lines().any(|l| l == line),
            "{line} in\n{}",
            page.body
        );
    }
    assert_eq!(
        http::get(metrics_addr, "/metrics/raft", Some("control-token-42"))
            .await
            .status,
        404
    );

    // A real Prometheus scraping only the control plane sees every node.
    let prom = Prometheus::start(
        &[Job {
            name: "kiwi-control".into(),
            path: "/metrics".into(),
            targets: vec![metrics_addr],
        }],
        &token,
    );
    prom.wait_for("three nodes up", "sum(kiwi_node_up)", |r| {
        r.first().is_some_and(|(_, v)| *v == 3.0)
    })
    .await;
    prom.wait_for(
        "a commit index per node",
        "count(kiwi_node_raft_commit_index > 0)",
        |r| r.first().is_some_and(|(_, v)| *v == 3.0),
    )
    .await;
    prom.wait_for(
        "the leader's lag series for both followers",
        &format!("count(kiwi_node_raft_follower_lag{{node=\"{leader}\"}})"),
        |r| r.first().is_some_and(|(_, v)| *v == 2.0),
    )
    .await;
    prom.wait_for(
        "the leader, as the control plane sees it",
        "kiwi_cluster_leader_id",
        |r| r.first().is_some_and(|(_, v)| *v == leader as f64),
    )
    .await;

    // The history: one sample per heartbeat, oldest first, for every node.
    let history = control
        .client()
        .await
        .history(HistoryRequest {
            node_id: leader,
            since_unix_ms: 0,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(history.nodes.len(), 1);
    let samples = &history.nodes[0].samples;
    assert!(samples.len() >= 5, "{samples:?}");
    assert!(
        samples
            .windows(2)
            .all(|w| w[0].at_unix_ms <= w[1].at_unix_ms)
    );
    assert_eq!(samples.last().unwrap().role, RaftRole::Leader as i32);
    assert!(samples.last().unwrap().commit_index > 0);
    let e = control
        .client()
        .await
        .history(HistoryRequest {
            node_id: 99,
            since_unix_ms: 0,
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound, "{e:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_tokens_only_admins_and_nodes_holding_an_admin_token_get_in() {
    use kiwi_proto::auth::token_hash;
    use kiwi_proto::v1::ClusterStatusRequest;
    use kiwi_proto::v1::control_service_client::ControlServiceClient;

    let dir = tempfile::tempdir().unwrap();
    let tokens = dir.path().join("tokens.toml");
    std::fs::write(
        &tokens,
        format!(
            "[[token]]\nsha256 = \"{}\"\nprincipal = \"ops\"\nrole = \"admin\"\n\n\
             [[token]]\nsha256 = \"{}\"\nprincipal = \"viewer\"\nrole = \"read\"\n",
            token_hash("ops-token"),
            token_hash("view-token")
        ),
    )
    .unwrap();
    let config = dir.path().join("control.toml");
    let http_addr = free_addr();
    std::fs::write(
        &config,
        format!("[security]\ntokens_file = {tokens:?}\n\n[metrics]\naddr = \"{http_addr}\"\n"),
    )
    .unwrap();
    let node_token = dir.path().join("node.token");
    std::fs::write(&node_token, "ops-token\n").unwrap();
    let addr = free_addr();
    let _control = ControlProc::start_with(
        addr,
        &dir.path().join("control"),
        &["--config".into(), config.display().to_string()],
    );
    let cluster = Cluster::start(ClusterOptions {
        extra_config: format!(
            "\n[control]\naddr = \"{addr}\"\nheartbeat_interval_ms = {HEARTBEAT_MS}\ntoken_file = {node_token:?}\n"
        ),
        ..ClusterOptions::default()
    })
    .await;
    cluster.wait_leader().await;
    let status = |token: Option<&'static str>| async move {
        let mut c = ControlServiceClient::connect(format!("http://{addr}"))
            .await
            .unwrap();
        let mut r = tonic::Request::new(ClusterStatusRequest {});
        if let Some(t) = token {
            r.metadata_mut()
                .insert("authorization", format!("Bearer {t}").parse().unwrap());
        }
        c.cluster_status(r).await.map(tonic::Response::into_inner)
    };
    // The nodes present their admin token and link.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let s = status(Some("ops-token")).await.unwrap();
        if up(&s) == [1, 2, 3] {
            break;
        }
        assert!(Instant::now() < deadline, "nodes never linked: {s:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let e = status(None).await.unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated, "{e:?}");
    let e = status(Some("view-token")).await.unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    assert!(e.message().contains("admin"), "{e:?}");
    // A node link without a token is refused before it registers.
    let e = link(addr, register(9, 1, "10.0.0.9:7380"))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated, "{e:?}");
    let s = status(Some("ops-token")).await.unwrap();
    assert_eq!(
        s.nodes.len(),
        3,
        "nothing registered without a token: {s:?}"
    );

    // The console: its page loads without a token (it asks for one); its data needs one; a read token
    // sees, only an admin one changes.
    let page = http::get(http_addr, "/ui", None).await;
    assert_eq!(page.status, 200);
    assert!(page.body.contains("Kiwi console"), "{}", page.body);
    let open = http::get(http_addr, "/ui/api/status", None).await;
    assert_eq!(open.status, 401, "{open:?}");
    let seen = http::get(http_addr, "/ui/api/status", Some("view-token")).await;
    assert_eq!(seen.status, 200, "{seen:?}");
    assert!(seen.body.contains("\"nodes\""), "{}", seen.body);
    let form =
        r#"{"priority":false,"scaling":true,"min_threads":2,"max_threads":8,"weights":[4,2,1]}"#;
    let denied = http::post(http_addr, "/ui/api/policy", Some("view-token"), form).await;
    assert_eq!(denied.status, 403, "{denied:?}");
    assert!(denied.body.contains("admin"), "{}", denied.body);
    let set = http::post(http_addr, "/ui/api/policy", Some("ops-token"), form).await;
    assert_eq!(set.status, 200, "{set:?}");
    assert!(set.body.contains("\"version\":1"), "{}", set.body);
    let bad = http::post(
        http_addr,
        "/ui/api/faults",
        Some("ops-token"),
        r#"{"kind":"meteor","node":1,"duration_ms":1000}"#,
    )
    .await;
    assert_eq!(bad.status, 400, "{bad:?}");
    assert!(bad.body.contains("unknown fault kind"), "{}", bad.body);
}
