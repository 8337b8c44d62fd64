//! Tokens and roles on a real `kiwi-node` process (`[security] tokens_file`): every RPC group allowed to
//! the roles that may call it and refused to the others (`UNAUTHENTICATED` without a valid token,
//! `PERMISSION_DENIED` naming the role needed, nothing written), CRITICAL served as HIGH for non-admins
//! (and counted), the metrics endpoint open to the `metrics` role, health checks open; a node listening
//! off loopback without a tokens file, or with a broken one, refuses to start naming the key.

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use kiwi_proto::auth::token_hash;
use kiwi_proto::v1::kv_service_client::KvServiceClient;
use kiwi_proto::v1::node_admin_client::NodeAdminClient;
use kiwi_proto::v1::{
    GetRequest, GetRuntimePolicyRequest, Priority, PutRequest, RequestHeader, StatusRequest,
    TransferLeaderRequest,
};
use kiwi_tests::cluster::node_binary;
use kiwi_tests::http;
use tonic::Code;
use tonic::transport::Channel;

const ROLES: [(&str, &str); 4] = [
    ("reader", "read"),
    ("writer", "write"),
    ("operator", "admin"),
    ("scraper", "metrics"),
];

fn token(principal: &str) -> String {
    format!("tok-{principal}-0123456789")
}

use kiwi_tests::ports::free_addr;

struct Node(Child);

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn tokens_file(dir: &Path) -> std::path::PathBuf {
    let mut text = String::new();
    for (principal, role) in ROLES {
        text += &format!(
            "[[token]]\nsha256 = \"{}\"\nprincipal = \"{principal}\"\nrole = \"{role}\"\n\n",
            token_hash(&token(principal))
        );
    }
    let p = dir.join("tokens.toml");
    std::fs::write(&p, text).unwrap();
    p
}

/// Runs a node with `config` to its exit; returns its status and output.
fn run_to_exit(dir: &Path, config: &str) -> (std::process::ExitStatus, String) {
    let path = dir.join("bad.toml");
    std::fs::write(&path, config).unwrap();
    let out = Command::new(node_binary())
        .arg("--config")
        .arg(&path)
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    (out.status, text)
}

fn request<T>(msg: T, principal: Option<&str>) -> tonic::Request<T> {
    let mut r = tonic::Request::new(msg);
    if let Some(p) = principal {
        r.metadata_mut().insert(
            "authorization",
            format!("Bearer {}", token(p)).parse().unwrap(),
        );
    }
    r
}

fn header(priority: Priority) -> Option<RequestHeader> {
    Some(RequestHeader {
        priority: priority as i32,
        ..RequestHeader::default()
    })
}

fn put(key: &str, principal: Option<&str>, priority: Priority) -> tonic::Request<PutRequest> {
    request(
        PutRequest {
            header: header(priority),
            key: key.as_bytes().to_vec(),
            value: b"v".to_vec(),
        },
        principal,
    )
}

fn get(key: &str, principal: Option<&str>) -> tonic::Request<GetRequest> {
    request(
        GetRequest {
            header: header(Priority::Normal),
            key: key.as_bytes().to_vec(),
            consistency: 0,
        },
        principal,
    )
}

async fn downgrades(metrics: SocketAddr) -> f64 {
    let page = http::get(metrics, "/metrics/runtime", Some(&token("scraper"))).await;
    page.body
        .lines()
        .find(|l| l.starts_with("kiwi_runtime_priority_downgrades_total"))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
        .unwrap_or_else(|| panic!("no downgrade counter in\n{}", page.body))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_and_roles_guard_every_rpc_group() {
    let dir = tempfile::tempdir().unwrap();
    let tokens = tokens_file(dir.path());
    let (addr, metrics) = (free_addr(), free_addr());
    let config = dir.path().join("node.toml");
    std::fs::write(
        &config,
        format!(
            "data_dir = {:?}\nlisten_addr = \"{addr}\"\n[raft]\nnode_id = 1\n[security]\ntokens_file = {tokens:?}\n\
             [telemetry]\nmetrics_addr = \"{metrics}\"\n",
            dir.path().join("data")
        ),
    )
    .unwrap();
    let log = std::fs::File::create(dir.path().join("node.log")).unwrap();
    let _node = Node(
        Command::new(node_binary())
            .arg("--config")
            .arg(&config)
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .stdin(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let channel = Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect_lazy();
    let mut kv = KvServiceClient::new(channel.clone());
    let mut admin = NodeAdminClient::new(channel.clone());
    // Ready once it leads (a single voter elects itself).
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(s) = admin
            .status(request(StatusRequest {}, Some("reader")))
            .await
            && s.get_ref().leader_id == 1
        {
            break;
        }
        assert!(Instant::now() < deadline, "the node never came up");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // Health checks are open.
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel.clone());
    health
        .check(tonic_health::pb::HealthCheckRequest::default())
        .await
        .expect("health needs no token");

    // No token, a wrong token: UNAUTHENTICATED, and nothing is written.
    let e = kv.put(put("k", None, Priority::Normal)).await.unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated, "{e:?}");
    let mut forged = put("k", None, Priority::Normal);
    forged
        .metadata_mut()
        .insert("authorization", "Bearer not-a-token".parse().unwrap());
    let e = kv.put(forged).await.unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated);
    assert!(
        !e.message().contains("not-a-token"),
        "the token is never echoed: {e:?}"
    );
    assert!(
        !kv.get(get("k", Some("reader")))
            .await
            .unwrap()
            .get_ref()
            .found,
        "nothing written"
    );

    // read: reads and status; no writes, no administration.
    let e = kv
        .put(put("k", Some("reader"), Priority::Normal))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
    assert!(
        e.message().contains("write") && e.message().contains("reader"),
        "{e:?}"
    );
    // write: writes too; no administration.
    kv.put(put("k", Some("writer"), Priority::Normal))
        .await
        .unwrap();
    assert!(
        kv.get(get("k", Some("writer")))
            .await
            .unwrap()
            .get_ref()
            .found
    );
    for principal in ["reader", "writer", "scraper"] {
        let e = admin
            .transfer_leader(request(
                TransferLeaderRequest { node_id: 1 },
                Some(principal),
            ))
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::PermissionDenied, "{principal}: {e:?}");
        assert!(e.message().contains("admin"), "{e:?}");
        let e = admin
            .get_runtime_policy(request(GetRuntimePolicyRequest {}, Some(principal)))
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::PermissionDenied);
    }
    // admin: everything.
    let policy = admin
        .get_runtime_policy(request(GetRuntimePolicyRequest {}, Some("operator")))
        .await
        .unwrap()
        .into_inner();
    admin
        .set_runtime_policy(request(policy, Some("operator")))
        .await
        .unwrap();
    kv.put(put("k2", Some("operator"), Priority::Normal))
        .await
        .unwrap();
    // metrics: the endpoint, nothing else.
    let e = kv.get(get("k", Some("scraper"))).await.unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
    assert_eq!(http::get(metrics, "/metrics", None).await.status, 401);
    assert_eq!(
        http::get(metrics, "/metrics", Some(&token("reader")))
            .await
            .status,
        401,
        "a read principal may not scrape"
    );
    assert_eq!(
        http::get(metrics, "/metrics", Some(&token("scraper")))
            .await
            .status,
        200
    );

    // Headers over the per-connection limit are refused, and the node serves on.
    let mut big = get("k", Some("reader"));
    big.metadata_mut()
        .insert("x-padding", "a".repeat(32 * 1024).parse().unwrap());
    assert!(kv.get(big).await.is_err(), "32 KiB of headers refused");
    let deadline = Instant::now() + Duration::from_secs(10);
    while kv.get(get("k", Some("reader"))).await.is_err() {
        assert!(
            Instant::now() < deadline,
            "the node serves after refusing big headers"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // CRITICAL is an admin's: a writer's is served as HIGH, and counted.
    assert_eq!(downgrades(metrics).await, 0.0);
    kv.put(put("c1", Some("writer"), Priority::Critical))
        .await
        .unwrap();
    assert_eq!(downgrades(metrics).await, 1.0);
    kv.put(put("c2", Some("operator"), Priority::Critical))
        .await
        .unwrap();
    assert_eq!(
        downgrades(metrics).await,
        1.0,
        "an admin's CRITICAL is honoured"
    );
}

#[test]
fn a_node_off_loopback_without_tokens_or_with_a_broken_tokens_file_refuses_to_start() {
    let dir = tempfile::tempdir().unwrap();
    let base = format!(
        "data_dir = {:?}\n[raft]\nnode_id = 1\n",
        dir.path().join("data")
    );
    let (status, out) = run_to_exit(dir.path(), &format!("listen_addr = \"0.0.0.0:0\"\n{base}"));
    assert!(!status.success());
    assert!(
        out.contains("security.tokens_file") && out.contains("127.0.0.1"),
        "{out}"
    );
    // Tokens alone are not enough off loopback: Raft needs member certificates (mutual TLS).
    let tokens = tokens_file(dir.path());
    let (status, out) = run_to_exit(
        dir.path(),
        &format!("listen_addr = \"0.0.0.0:0\"\n{base}[security]\ntokens_file = {tokens:?}\n"),
    );
    assert!(!status.success());
    assert!(
        out.contains("security.ca_file") && out.contains("mutual TLS"),
        "{out}"
    );

    let broken = dir.path().join("broken.toml");
    std::fs::write(
        &broken,
        "[[token]]\nsha256 = \"xyz\"\nprincipal = \"a\"\nrole = \"read\"\n",
    )
    .unwrap();
    let (status, out) = run_to_exit(
        dir.path(),
        &format!("listen_addr = \"127.0.0.1:0\"\n{base}[security]\ntokens_file = {broken:?}\n"),
    );
    assert!(!status.success());
    assert!(
        out.contains("security.tokens_file") && out.contains("64 hex"),
        "{out}"
    );
    assert!(
        !dir.path().join("data").join("storage").exists(),
        "nothing was opened"
    );
}
