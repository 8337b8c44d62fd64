//! Tokens and roles on a real `kiwi-node` process (`[security] tokens_file`): every RPC group allowed to
//! the roles that may call it and refused to the others (`UNAUTHENTICATED` without a valid token,
//! `PERMISSION_DENIED` naming the role needed, nothing written), CRITICAL served as HIGH for non-admins
//! (and counted), the metrics endpoint open to the `metrics` role, health checks open; a node listening
//! off loopback without a tokens file, or with a broken one, refuses to start naming the key; TLS
//! certificates rotated with SIGHUP while connections stay open; a client certificate listed in the
//! tokens file standing for a token.

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
use kiwi_tests::cluster::{node_binary, tls_channel};
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

impl Node {
    /// Starts `kiwi-node` with `config` (written to `dir/node.toml`), its output in `dir/node.log`.
    fn spawn(dir: &Path, config: &str) -> Node {
        let path = dir.join("node.toml");
        std::fs::write(&path, config).unwrap();
        let log = std::fs::File::create(Self::log_path(dir)).unwrap();
        Node(
            Command::new(node_binary())
                .arg("--config")
                .arg(&path)
                .stdout(log.try_clone().unwrap())
                .stderr(log)
                .stdin(Stdio::null())
                .spawn()
                .unwrap(),
        )
    }

    fn log_path(dir: &Path) -> std::path::PathBuf {
        dir.join("node.log")
    }

    /// Sends SIGHUP (reload `[security]`'s files).
    fn hangup(&self) {
        let status = Command::new("kill")
            .args(["-HUP", &self.0.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
    }
}

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
            prev_kv: false,
            header: header(priority),
            key: key.as_bytes().to_vec(),
            value: b"v".to_vec(),
            lease: 0,
        },
        principal,
    )
}

fn get(key: &str, principal: Option<&str>) -> tonic::Request<GetRequest> {
    request(
        GetRequest {
            revision: 0,
            header: header(Priority::Normal),
            key: key.as_bytes().to_vec(),
            consistency: 0,
        },
        principal,
    )
}

/// A serializable get: answered by any node from what it applied.
fn local_get(key: &str) -> tonic::Request<GetRequest> {
    let mut r = get(key, None);
    r.get_mut().consistency = kiwi_proto::v1::Consistency::Serializable as i32;
    r
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
    let node = Node::spawn(
        dir.path(),
        &format!(
            "data_dir = {:?}\nlisten_addr = \"{addr}\"\n[raft]\nnode_id = 1\n[security]\ntokens_file = {tokens:?}\n\
             [telemetry]\nmetrics_addr = \"{metrics}\"\n",
            dir.path().join("data")
        ),
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
    // The newer calls by the same rules: a watch is a read, a transaction a write, compaction admin.
    let watch = || kiwi_proto::v1::WatchRequest {
        request_union: Some(kiwi_proto::v1::watch_request::RequestUnion::CreateRequest(
            kiwi_proto::v1::WatchCreateRequest {
                key: b"k".to_vec(),
                ..Default::default()
            },
        )),
    };
    let mut stream = kv
        .watch(request(tokio_stream::iter(vec![watch()]), Some("reader")))
        .await
        .expect("a reader may watch")
        .into_inner();
    assert!(stream.message().await.unwrap().unwrap().created);
    let e = kv
        .watch(request(tokio_stream::iter(vec![watch()]), Some("scraper")))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    let e = kv
        .txn(request(
            kiwi_proto::v1::TxnRequest::default(),
            Some("reader"),
        ))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    // Leases: granting, revoking and keeping alive are writes; looking at them reads.
    let e = kv
        .lease_grant(request(
            kiwi_proto::v1::LeaseGrantRequest {
                header: None,
                ttl: 10,
                id: 0,
            },
            Some("reader"),
        ))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    let granted = kv
        .lease_grant(request(
            kiwi_proto::v1::LeaseGrantRequest {
                header: None,
                ttl: 10,
                id: 0,
            },
            Some("writer"),
        ))
        .await
        .expect("a writer may grant a lease")
        .into_inner();
    let leases = kv
        .lease_leases(request(
            kiwi_proto::v1::LeaseLeasesRequest { header: None },
            Some("reader"),
        ))
        .await
        .expect("a reader may list leases")
        .into_inner();
    assert!(leases.ids.contains(&granted.id));
    let e = kv
        .lease_revoke(request(
            kiwi_proto::v1::LeaseRevokeRequest {
                header: None,
                id: granted.id,
            },
            Some("reader"),
        ))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    for principal in ["reader", "writer"] {
        let e = kv
            .compact(request(
                kiwi_proto::v1::CompactRequest {
                    header: None,
                    revision: 1,
                },
                Some(principal),
            ))
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::PermissionDenied, "{principal}: {e:?}");
    }
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

    // Revoking a token: the file without it, SIGHUP; the others keep working.
    let kept: String = std::fs::read_to_string(&tokens)
        .unwrap()
        .split("\n\n")
        .filter(|entry| !entry.contains("principal = \"reader\""))
        .collect::<Vec<_>>()
        .join("\n\n");
    std::fs::write(&tokens, kept).unwrap();
    node.hangup();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match kv.get(get("k", Some("reader"))).await {
            Err(e) if e.code() == Code::Unauthenticated => break,
            other => assert!(
                Instant::now() < deadline,
                "the revoked token still works: {other:?}"
            ),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    kv.get(get("k", Some("writer")))
        .await
        .expect("a token still listed keeps working");
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

/// A CA and a server certificate it signed for localhost / 127.0.0.1, as PEM: (ca, cert, key).
fn issue(name: &str) -> (String, String, String) {
    let (ca, (cert, key), _) = pki(name, &[]);
    (ca, cert, key)
}

/// A put over a new TLS connection trusting only `ca`.
async fn put_trusting(addr: SocketAddr, ca: &str) -> Result<(), String> {
    let channel = tls_channel(addr, ca, None)
        .await
        .map_err(|e| format!("{e:?}"))?;
    KvServiceClient::new(channel)
        .put(put("rotated", None, Priority::Normal))
        .await
        .map(|_| ())
        .map_err(|e| e.to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificates_rotate_on_sighup_under_load_with_no_failed_request() {
    let dir = tempfile::tempdir().unwrap();
    let (old_ca, old_cert, old_key) = issue("old");
    let (new_ca, new_cert, new_key) = issue("new");
    let (cert_file, key_file) = (dir.path().join("node.crt"), dir.path().join("node.key"));
    std::fs::write(&cert_file, &old_cert).unwrap();
    std::fs::write(&key_file, &old_key).unwrap();
    let addr = free_addr();
    let node = Node::spawn(
        dir.path(),
        &format!(
            "data_dir = {:?}\nlisten_addr = \"{addr}\"\n[raft]\nnode_id = 1\n[security]\n\
             cert_file = {cert_file:?}\nkey_file = {key_file:?}\n",
            dir.path().join("data")
        ),
    );
    let log_text = || std::fs::read_to_string(Node::log_path(dir.path())).unwrap_or_default();

    // A connection opened with the old certificate, kept across the rotation.
    let deadline = Instant::now() + Duration::from_secs(30);
    let open = loop {
        if let Ok(channel) = tls_channel(addr, &old_ca, None).await {
            let mut kv = KvServiceClient::new(channel);
            if kv.put(put("before", None, Priority::Normal)).await.is_ok() {
                break kv;
            }
        }
        assert!(
            Instant::now() < deadline,
            "node never served TLS: {}",
            log_text()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(
        put_trusting(addr, &new_ca).await.is_err(),
        "the new CA cannot verify the old certificate"
    );

    // Load through the rotation: writers on the open connection, and writers that open a new
    // connection for every put while trusting both CAs (a client during a CA rollover).
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let both = format!("{old_ca}{new_ca}");
    let writers: Vec<_> = (0..4)
        .map(|w| {
            let (stop, both, mut open) = (stop.clone(), both.clone(), open.clone());
            tokio::spawn(async move {
                let (mut ok, mut failed) = (0u64, Vec::new());
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let r = if w % 2 == 0 {
                        open.put(put("load", None, Priority::Normal))
                            .await
                            .map(|_| ())
                            .map_err(|e| e.to_string())
                    } else {
                        put_trusting(addr, &both).await
                    };
                    match r {
                        Ok(()) => ok += 1,
                        Err(e) => failed.push(e),
                    }
                }
                (ok, failed)
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(300)).await;

    // Rotate: new files, SIGHUP.
    std::fs::write(&cert_file, &new_cert).unwrap();
    std::fs::write(&key_file, &new_key).unwrap();
    node.hangup();
    let deadline = Instant::now() + Duration::from_secs(30);
    while let Err(e) = put_trusting(addr, &new_ca).await {
        assert!(
            Instant::now() < deadline,
            "new connections never got the new certificate: {e}\n{}",
            log_text()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        put_trusting(addr, &old_ca).await.is_err(),
        "new connections no longer present the old certificate"
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for w in writers {
        let (ok, failed) = w.await.unwrap();
        assert!(ok > 0, "a writer never wrote");
        assert!(
            failed.is_empty(),
            "requests failed during the rotation: {failed:?}"
        );
    }
    let mut open = open;
    open.put(put("after", None, Priority::Normal))
        .await
        .expect("the connection opened before the rotation still works");

    // A broken certificate is refused on reload and the one in force is kept.
    std::fs::write(&cert_file, "not a certificate").unwrap();
    node.hangup();
    let deadline = Instant::now() + Duration::from_secs(30);
    while !log_text().contains("TLS reload refused") {
        assert!(
            Instant::now() < deadline,
            "the broken reload was not reported: {}",
            log_text()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        log_text().contains("security.cert_file"),
        "the refusal names the key: {}",
        log_text()
    );
    put_trusting(addr, &new_ca)
        .await
        .expect("still serving the new certificate");
}

/// A CA, a server certificate for localhost / 127.0.0.1 (member 1's: it names `kiwi://node/1`), and a
/// client certificate for each common name, all signed by the CA, as PEM: (ca, (cert, key), [(cert, key)]).
type Pki = (String, (String, String), Vec<(String, String)>);

fn pki(name: &str, clients: &[&str]) -> Pki {
    let (ca, mut members, clients) = member_pki(name, 1, clients);
    (ca, members.remove(0), clients)
}

/// A CA, a certificate for each of members `1..=members` (localhost, 127.0.0.1, and the URI
/// `kiwi://node/<id>` that binds it to its node), and a client certificate (no URI) for each common
/// name, all signed by the CA, as PEM: (ca, [(cert, key)] of members, [(cert, key)] of clients).
/// A certificate and its key, as PEM.
type Pem = (String, String);

fn member_pki(name: &str, members: u64, clients: &[&str]) -> (String, Vec<Pem>, Vec<Pem>) {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair, SanType};
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(DnType::CommonName, format!("{name} CA"));
    let ca_key = KeyPair::generate().unwrap();
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let sign = |sans: Vec<String>, uri: Option<String>, cn: &str| {
        let mut params = CertificateParams::new(sans).unwrap();
        if let Some(uri) = uri {
            params
                .subject_alt_names
                .push(SanType::URI(uri.try_into().unwrap()));
        }
        params.distinguished_name.push(DnType::CommonName, cn);
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &ca, &ca_key).unwrap();
        (cert.pem(), key.serialize_pem())
    };
    let members = (1..=members)
        .map(|id| {
            sign(
                vec!["localhost".into(), "127.0.0.1".into()],
                Some(kiwi_proto::tls::member_uri(id)),
                &format!("node {id}"),
            )
        })
        .collect();
    let clients = clients
        .iter()
        .map(|cn| sign(Vec::new(), None, cn))
        .collect();
    (ca.pem(), members, clients)
}

/// A TLS channel trusting `ca` and presenting `identity`.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_listed_client_certificate_stands_for_a_token() {
    let dir = tempfile::tempdir().unwrap();
    let (ca, (cert, key), clients) = pki("cluster", &["loader", "stranger"]);
    let (_, _, foreign) = pki("other", &["loader"]);
    let file = |name: &str, text: &str| {
        let p = dir.path().join(name);
        std::fs::write(&p, text).unwrap();
        p
    };
    let (ca_file, cert_file, key_file) = (
        file("ca.crt", &ca),
        file("node.crt", &cert),
        file("node.key", &key),
    );
    let tokens = file(
        "tokens.toml",
        &format!(
            "[[token]]\nsha256 = \"{}\"\nprincipal = \"operator\"\nrole = \"admin\"\n\n\
             [[certificate]]\ncommon_name = \"loader\"\nprincipal = \"batch\"\nrole = \"write\"\n",
            token_hash(&token("operator"))
        ),
    );
    let addr = free_addr();
    let _node = Node::spawn(
        dir.path(),
        &format!(
            "data_dir = {:?}\nlisten_addr = \"{addr}\"\n[raft]\nnode_id = 1\n[security]\n\
             tokens_file = {tokens:?}\ncert_file = {cert_file:?}\nkey_file = {key_file:?}\nca_file = {ca_file:?}\n",
            dir.path().join("data")
        ),
    );
    // The loader's certificate writes, once the node leads.
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut loader = loop {
        if let Ok(channel) = tls_channel(addr, &ca, Some(&clients[0])).await {
            let mut kv = KvServiceClient::new(channel);
            if kv.put(put("by-cert", None, Priority::Normal)).await.is_ok() {
                break kv;
            }
        }
        assert!(
            Instant::now() < deadline,
            "the loader's certificate never wrote: {}",
            std::fs::read_to_string(Node::log_path(dir.path())).unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(
        loader
            .get(get("by-cert", None))
            .await
            .unwrap()
            .get_ref()
            .found
    );
    // Its role is write: administration is refused, naming the role.
    let channel = tls_channel(addr, &ca, Some(&clients[0])).await.unwrap();
    let e = NodeAdminClient::new(channel)
        .get_runtime_policy(request(GetRuntimePolicyRequest {}, None))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    assert!(e.message().contains("admin"), "{e:?}");
    // A certificate from the CA but not listed, or no certificate: a token is needed.
    for identity in [Some(&clients[1]), None] {
        let channel = tls_channel(addr, &ca, identity).await.unwrap();
        let e = KvServiceClient::new(channel)
            .put(put("refused", None, Priority::Normal))
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::Unauthenticated, "{e:?}");
    }
    // The listed name in a certificate from another CA is refused at the handshake.
    let forged = match tls_channel(addr, &ca, Some(&foreign[0])).await {
        Ok(channel) => KvServiceClient::new(channel)
            .put(put("forged", None, Priority::Normal))
            .await
            .map(|_| ()),
        Err(e) => Err(tonic::Status::unavailable(e.to_string())),
    };
    assert!(forged.is_err(), "a foreign certificate must not write");
    // Raft is served on the client port here (no raft_listen_addr): a client certificate from the
    // cluster CA cannot speak it.
    let code = forge_append(addr, &ca, &clients[0], (0, 2, 1), (1, 1)).await;
    assert_eq!(code, Code::PermissionDenied);
    let log = std::fs::read_to_string(Node::log_path(dir.path())).unwrap_or_default();
    assert!(
        log.contains("names no member"),
        "refused for its certificate: {log}"
    );
    assert!(
        !loader
            .get(get("forged", None))
            .await
            .unwrap()
            .get_ref()
            .found
    );
}

/// A forged append on a stream claiming to come from `from`: an entry at `index` in `term` that would
/// write `victim = forged`, committed at once. Sent to `addr` over TLS with `identity`; returns how the
/// receiver ended the stream.
async fn forge_append(
    addr: SocketAddr,
    ca: &str,
    identity: &(String, String),
    (cluster_id, from, to): (u64, u64, u64),
    (term, index): (u64, u64),
) -> Code {
    use kiwi_proto::v1::{
        RaftCommand, RaftMessageBatch, WriteBatchCommand, WriteOp, raft_command, write_op,
    };
    use prost::Message as _;
    use protobuf::Message as _;
    let command = RaftCommand {
        request_id: "forged".into(),
        command: Some(raft_command::Command::Write(WriteBatchCommand {
            ops: vec![WriteOp {
                op: Some(write_op::Op::Put(write_op::Put {
                    key: b"victim".to_vec(),
                    value: b"forged".to_vec(),
                    lease: 0,
                })),
            }],
        })),
    };
    let entry = raft::eraftpb::Entry {
        term,
        index,
        data: command.encode_to_vec().into(),
        ..Default::default()
    };
    let mut m = raft::eraftpb::Message::default();
    m.set_msg_type(raft::eraftpb::MessageType::MsgAppend);
    (m.from, m.to, m.term) = (from, to, term);
    (m.log_term, m.index, m.commit) = (term, index - 1, index);
    m.entries = vec![entry].into();
    let channel = match tls_channel(addr, ca, Some(identity)).await {
        Ok(c) => c,
        Err(_) => return Code::Unavailable,
    };
    let batch = RaftMessageBatch {
        cluster_id,
        from_node: from,
        to_node: to,
        messages: vec![m.write_to_bytes().unwrap()],
        lease: None,
    };
    match kiwi_proto::v1::raft_transport_client::RaftTransportClient::new(channel)
        .send_messages(tokio_stream::iter([batch]))
        .await
    {
        Ok(_) => Code::Ok,
        Err(e) => e.code(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_a_members_own_certificate_speaks_raft_for_it() {
    let dir = tempfile::tempdir().unwrap();
    let (ca, members, clients) = member_pki("cluster", 3, &["reader"]);
    let ca_file = dir.path().join("ca.crt");
    std::fs::write(&ca_file, &ca).unwrap();
    let addrs: Vec<(SocketAddr, SocketAddr)> = (0..3).map(|_| (free_addr(), free_addr())).collect();
    let peers: String = addrs
        .iter()
        .enumerate()
        .map(|(i, (a, r))| {
            format!(
                "[[raft.peers]]\nid = {}\naddr = \"{a}\"\nraft_addr = \"{r}\"\n",
                i + 1
            )
        })
        .collect();
    let mut nodes = Vec::new();
    for (i, (addr, raft)) in addrs.iter().enumerate() {
        let id = i as u64 + 1;
        let d = dir.path().join(format!("n{id}"));
        std::fs::create_dir_all(&d).unwrap();
        let (cert, key) = (d.join("node.crt"), d.join("node.key"));
        std::fs::write(&cert, &members[i].0).unwrap();
        std::fs::write(&key, &members[i].1).unwrap();
        nodes.push(Node::spawn(
            &d,
            &format!(
                "data_dir = {:?}\nlisten_addr = \"{addr}\"\nraft_listen_addr = \"{raft}\"\n\
                 [raft]\nnode_id = {id}\n{peers}\n[security]\ncert_file = {cert:?}\n\
                 key_file = {key:?}\nca_file = {ca_file:?}\n",
                d.join("data")
            ),
        ));
    }
    let logs = || {
        (1..=3)
            .map(|id| {
                std::fs::read_to_string(Node::log_path(&dir.path().join(format!("n{id}"))))
                    .unwrap_or_default()
            })
            .collect::<Vec<_>>()
            .join("\n")
    };
    // The members elect a leader over their Raft ports (mutual TLS with their own certificates) and
    // replicate a write.
    let deadline = Instant::now() + Duration::from_secs(60);
    let (leader, status) = 'found: loop {
        for (i, (addr, _)) in addrs.iter().enumerate() {
            if let Ok(channel) = tls_channel(*addr, &ca, None).await {
                let mut kv = KvServiceClient::new(channel.clone());
                if kv.put(put("victim", None, Priority::Normal)).await.is_ok() {
                    let status = NodeAdminClient::new(channel)
                        .status(StatusRequest {})
                        .await
                        .unwrap()
                        .into_inner();
                    break 'found (i as u64 + 1, status);
                }
            }
        }
        assert!(
            Instant::now() < deadline,
            "no write was acknowledged: {}",
            logs()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let follower = (1..=3).find(|id| *id != leader).unwrap();
    let other = (1..=3).find(|id| *id != leader && *id != follower).unwrap();
    let raft_addr = addrs[follower as usize - 1].1;
    let envelope = (status.cluster_id, leader, follower);
    let next = (status.term, status.commit_index + 1);
    // A client certificate from the cluster CA, on the Raft port: not a member.
    let code = forge_append(raft_addr, &ca, &clients[0], envelope, next).await;
    assert_eq!(code, Code::PermissionDenied, "a client certificate");
    // Another member's certificate claiming the leader's id.
    let code = forge_append(raft_addr, &ca, &members[other as usize - 1], envelope, next).await;
    assert_eq!(code, Code::PermissionDenied, "node {other}'s certificate");
    // The real writes go on, and the forged one is nowhere: a later write is applied on the follower
    // after the forged entry would have been, and the value is still the real one.
    let channel = tls_channel(addrs[leader as usize - 1].0, &ca, None)
        .await
        .unwrap();
    let mut kv = KvServiceClient::new(channel);
    kv.put(put("after", None, Priority::Normal)).await.unwrap();
    let follower_kv = KvServiceClient::new(
        tls_channel(addrs[follower as usize - 1].0, &ca, None)
            .await
            .unwrap(),
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let mut f = follower_kv.clone();
        if f.get(local_get("after"))
            .await
            .is_ok_and(|r| r.get_ref().found)
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the follower never applied the later write"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut f = follower_kv.clone();
    let victim = f.get(local_get("victim")).await.unwrap().into_inner();
    assert_eq!(victim.value, b"v", "the forged append wrote nothing");
    let health = StatusRequest {};
    let mut admin = NodeAdminClient::new(
        tls_channel(addrs[follower as usize - 1].0, &ca, None)
            .await
            .unwrap(),
    );
    assert!(
        admin.status(health).await.is_ok(),
        "the follower still serves: {}",
        logs()
    );
    assert!(
        logs().contains("names no member") && logs().contains("a member may speak only for itself"),
        "each refusal is logged with its reason"
    );
    drop(nodes);
}
