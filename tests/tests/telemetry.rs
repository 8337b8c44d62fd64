//! Telemetry on real nodes: the metrics endpoints' token and rate limit, a node refusing an open endpoint,
//! and a real Prometheus server (Debian's `prometheus`, installed by `make deps`) scraping three nodes'
//! `/metrics/{runtime,raft,storage}` with the bearer token, queried through its HTTP API. The same test
//! checks that every metric the Grafana dashboards in `dashboards/` name is exported by a live node, and
//! that Prometheus accepts every dashboard expression.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use kiwi_proto::v1::{
    BatchWriteRequest, Consistency, GetRequest, Priority, RequestHeader, ScanRequest, WriteOp,
    write_op,
};
use kiwi_tests::cluster::{Cluster, ClusterOptions, header, node_binary};
use kiwi_tests::http;
use kiwi_tests::prometheus::{Job, Prometheus};
use tonic::Code;

const TOKEN: &str = "kiwi-test-token-0123456789";

fn token_file(dir: &Path) -> PathBuf {
    let p = dir.join("metrics.token");
    std::fs::write(&p, format!("{TOKEN}\n")).unwrap();
    p
}

use kiwi_tests::ports::free_addr;

/// Names of the metrics in a Prometheus text exposition.
fn metric_names(text: &str) -> BTreeSet<String> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .filter_map(|l| l.split(['{', ' ']).next())
        .map(str::to_owned)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_endpoints_need_the_token_and_are_rate_limited() {
    let secrets = tempfile::tempdir().unwrap();
    let token = token_file(secrets.path());
    let cluster = Cluster::start(ClusterOptions {
        nodes: 1,
        telemetry_extra: format!(
            "metrics_token_file = {token:?}\nmetrics_rate_limit_per_sec = 40\n"
        ),
        ..ClusterOptions::default()
    })
    .await;
    cluster.must_put(b"k", b"v").await;
    let addr = cluster.metrics_addr(1);

    for (token, what) in [(None, "no token"), (Some("wrong-token"), "a wrong token")] {
        let a = http::get(addr, "/metrics", token).await;
        assert_eq!(a.status, 401, "{what}: {a:?}");
        assert_eq!(
            a.header("www-authenticate"),
            Some("Bearer"),
            "{what}: {a:?}"
        );
        assert!(
            !a.body.contains(TOKEN),
            "the answer must not carry the token"
        );
        assert!(
            !a.body.contains("kiwi_"),
            "{what}: no metrics without the token"
        );
    }
    let log = cluster.log_tail(1, 400);
    assert!(!log.contains(TOKEN), "the token must never be logged");

    let all = http::get(addr, "/metrics", Some(TOKEN)).await;
    assert_eq!(all.status, 200, "{all:?}");
    assert!(
        all.header("content-type")
            .is_some_and(|t| t.starts_with("text/plain; version=0.0.4")),
        "{all:?}"
    );
    let families = [
        ("runtime", "kiwi_runtime_storage_threads"),
        ("raft", "kiwi_raft_commit_index"),
        ("storage", "kiwi_storage_operation_duration_seconds_count"),
    ];
    let names = metric_names(&all.body);
    for (family, metric) in families {
        assert!(
            names.contains(metric),
            "/metrics lacks {metric}:\n{}",
            all.body
        );
        let one = http::get(addr, &format!("/metrics/{family}"), Some(TOKEN)).await;
        assert_eq!(one.status, 200, "{one:?}");
        let own = metric_names(&one.body);
        assert!(own.contains(metric), "/metrics/{family} lacks {metric}");
        // Each family endpoint carries only its own metrics (the fault injector's are Raft traffic's).
        for n in &own {
            assert!(
                n.starts_with(&format!("kiwi_{family}_"))
                    || (family == "raft" && n.starts_with("kiwi_fault_")),
                "/metrics/{family} has {n}"
            );
        }
    }
    // The write above went through the whole path: it is counted.
    let raft = http::get(addr, "/metrics/raft", Some(TOKEN)).await.body;
    assert!(
        raft.lines().any(
            |l| l.starts_with("kiwi_raft_proposals_total{outcome=\"committed\"}")
                && !l.ends_with(" 0")
        ),
        "{raft}"
    );
    assert_eq!(
        http::get(addr, "/metrics/nope", Some(TOKEN)).await.status,
        404
    );

    // A burst well over 40 per second from one client: answered 429 with Retry-After.
    let mut limited = None;
    for _ in 0..200 {
        let a = http::get(addr, "/metrics/runtime", Some(TOKEN)).await;
        if a.status == 429 {
            limited = Some(a);
            break;
        }
        assert_eq!(a.status, 200, "{a:?}");
    }
    let limited = limited.expect("200 requests at once were never limited");
    let retry: u64 = limited
        .header("retry-after")
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("429 without a numeric Retry-After: {limited:?}"));
    assert!((1..=2).contains(&retry), "Retry-After {retry}");
    // The limit is on metrics only: the KV API is not affected.
    cluster.must_put(b"k2", b"v").await;
}

/// Runs `kiwi-node` with `config` and returns its exit status and stderr (it must exit by itself).
fn run_node(dir: &Path, config: &str) -> (std::process::ExitStatus, String) {
    let path = dir.join("kiwi-node.toml");
    std::fs::write(&path, config).unwrap();
    let out = Command::new(node_binary())
        .arg("--config")
        .arg(&path)
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    (
        out.status,
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn a_node_refuses_an_open_metrics_endpoint_without_a_token() {
    let dir = tempfile::tempdir().unwrap();
    let base = format!(
        "data_dir = {:?}\nlisten_addr = \"{}\"\n[raft]\nnode_id = 1\n[storage]\nbackend = \"memory\"\n",
        dir.path().join("data"),
        free_addr()
    );
    let (status, err) = run_node(
        dir.path(),
        &format!("{base}[telemetry]\nmetrics_addr = \"0.0.0.0:0\"\n"),
    );
    assert!(!status.success(), "started with an open metrics endpoint");
    assert!(
        err.contains("telemetry.metrics_token_file") && err.contains("0.0.0.0:0"),
        "{err}"
    );

    let missing = dir.path().join("no-such.token");
    let (status, err) = run_node(
        dir.path(),
        &format!(
            "{base}[telemetry]\nmetrics_addr = \"0.0.0.0:0\"\nmetrics_token_file = {missing:?}\n"
        ),
    );
    assert!(!status.success(), "started with an unreadable token file");
    assert!(
        err.contains("telemetry.metrics_token_file") && err.contains("no-such.token"),
        "{err}"
    );

    std::fs::write(dir.path().join("empty.token"), "\n").unwrap();
    let (status, err) = run_node(
        dir.path(),
        &format!(
            "{base}[telemetry]\nmetrics_addr = \"127.0.0.1:0\"\nmetrics_token_file = {:?}\n",
            dir.path().join("empty.token")
        ),
    );
    assert!(!status.success(), "started with an empty token");
    assert!(err.contains("empty"), "{err}");
}

/// Every PromQL expression in the dashboards, with the file it is in.
fn dashboard_exprs() -> Vec<(String, String)> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../dashboards");
    let mut out = Vec::new();
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "json"))
        .collect();
    files.sort();
    assert_eq!(files.len(), 3, "three dashboards: {files:?}");
    for f in files {
        let v: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&f).unwrap()).unwrap();
        let name = f.file_name().unwrap().to_string_lossy().into_owned();
        let panels = v["panels"].as_array().cloned().unwrap_or_default();
        assert!(!panels.is_empty(), "{name} has no panels");
        for p in panels {
            for t in p["targets"].as_array().cloned().unwrap_or_default() {
                let expr = t["expr"].as_str().expect("every target has an expr");
                out.push((name.clone(), expr.to_owned()));
            }
        }
    }
    out
}

/// The `kiwi_*` metric names an expression uses.
fn names_in(expr: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let mut rest = expr;
    while let Some(i) = rest.find("kiwi_") {
        let tail = &rest[i..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(tail.len());
        names.insert(tail[..end].to_owned());
        rest = &tail[end..];
    }
    names
}

/// 5,000 keys of 200 bytes, so a scan is real storage work.
async fn preload(cluster: &Cluster, leader: u64) {
    let mut kv = cluster.kv(leader);
    for chunk in 0..5 {
        let ops = (0..1000)
            .map(|i| WriteOp {
                op: Some(write_op::Op::Put(write_op::Put {
                    key: format!("pre{:06}", chunk * 1000 + i).into_bytes(),
                    value: vec![b'v'; 200],
                    lease: 0,
                })),
            })
            .collect();
        kv.batch_write(BatchWriteRequest {
            header: Some(header()),
            ops,
        })
        .await
        .unwrap();
    }
}

/// Floods node `id` with LOW scans (short deadline) for `for_how_long`; returns how many were shed.
async fn low_flood(cluster: &Cluster, id: u64, for_how_long: Duration) -> u64 {
    let stop = Arc::new(AtomicBool::new(false));
    let shed = Arc::new(AtomicU64::new(0));
    let tasks: Vec<_> = (0..24)
        .map(|_| {
            let mut kv = cluster.kv(id);
            let (stop, shed) = (Arc::clone(&stop), Arc::clone(&shed));
            tokio::spawn(async move {
                while !stop.load(Ordering::Relaxed) {
                    let req = ScanRequest {
                        header: Some(RequestHeader {
                            priority: Priority::Low as i32,
                            timeout: prost_types::Duration::try_from(Duration::from_millis(100))
                                .ok(),
                            ..RequestHeader::default()
                        }),
                        limit: 5000,
                        consistency: Consistency::Serializable as i32,
                        keys_only: true,
                        ..ScanRequest::default()
                    };
                    match kv.scan(req).await {
                        Err(e) if e.code() == Code::ResourceExhausted => {
                            shed.fetch_add(1, Ordering::Relaxed);
                        }
                        _ => {}
                    }
                }
            })
        })
        .collect();
    tokio::time::sleep(for_how_long).await;
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        t.await.unwrap();
    }
    shed.load(Ordering::Relaxed)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prometheus_scrapes_three_nodes_and_every_dashboard_metric_is_exported() {
    let secrets = tempfile::tempdir().unwrap();
    let token = token_file(secrets.path());
    let cluster = Cluster::start(ClusterOptions {
        telemetry_extra: format!("metrics_token_file = {token:?}\n"),
        // One fixed storage thread per node, so a LOW flood saturates it.
        extra_config: "\n[runtime.scaling]\nenabled = false\nmin_storage_threads = 1\n\
                       max_storage_threads = 1\n"
            .into(),
        ..ClusterOptions::default()
    })
    .await;
    let targets: Vec<SocketAddr> = cluster
        .ids()
        .iter()
        .map(|&id| cluster.metrics_addr(id))
        .collect();
    let jobs: Vec<Job> = ["runtime", "raft", "storage"]
        .into_iter()
        .map(|family| Job {
            name: format!("kiwi-{family}"),
            path: format!("/metrics/{family}"),
            targets: targets.clone(),
        })
        .collect();
    let prom = Prometheus::start(&jobs, &token);

    // Every target (3 nodes x 3 families) is scraped successfully, with the token.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let v = prom.api("targets").await;
        let active = v
            .as_ref()
            .and_then(|v| v["data"]["activeTargets"].as_array().cloned())
            .unwrap_or_default();
        let up = active.iter().filter(|t| t["health"] == "up").count();
        if up == 9 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "targets not all up within 60 s: {active:?}\nprometheus log:\n{}",
            prom.log()
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }

    let leader = cluster.wait_leader().await;
    preload(&cluster, leader).await;
    let load = cluster.start_load(4, "prom");
    load.wait_more(200).await;
    // Linearizable reads, so ReadIndex latency has samples too.
    let mut kv = cluster.kv(leader);
    for i in 0..50 {
        kv.get(GetRequest {
            revision: 0,
            header: Some(header()),
            key: format!("pre{i:06}").into_bytes(),
            consistency: Consistency::Linearizable as i32,
        })
        .await
        .unwrap();
    }

    prom.wait_for(
        "commit index advancing on all three nodes",
        "count(delta(kiwi_raft_commit_index[10s]) > 0)",
        |r| r.first().is_some_and(|(_, v)| *v == 3.0),
    )
    .await;
    prom.wait_for(
        "entries applied on all three nodes",
        "count(rate(kiwi_raft_entries_applied_total[10s]) > 0)",
        |r| r.first().is_some_and(|(_, v)| *v == 3.0),
    )
    .await;
    let leader_instance = cluster.metrics_addr(leader).to_string();
    let followers: BTreeSet<String> = cluster
        .ids()
        .into_iter()
        .filter(|&id| id != leader)
        .map(|id| id.to_string())
        .collect();
    prom.wait_for(
        "a replication latency series for each follower on the leader",
        &format!(
            "kiwi_raft_replication_latency_seconds_count{{instance=\"{leader_instance}\"}} > 0"
        ),
        |r| {
            r.iter()
                .filter_map(|(l, _)| l.get("peer").cloned())
                .collect::<BTreeSet<_>>()
                == followers
        },
    )
    .await;
    prom.wait_for(
        "the leader is the only node in the leader role",
        "sum(kiwi_raft_role{role=\"leader\"})",
        |r| r.first().is_some_and(|(_, v)| *v == 1.0),
    )
    .await;
    let writes = load.finish().await;
    assert!(!writes.is_empty());

    // A LOW flood on one follower: its shed count by priority reaches Prometheus.
    let flooded = followers.iter().next().unwrap();
    let flooded: u64 = flooded.parse().unwrap();
    let shed = low_flood(&cluster, flooded, Duration::from_secs(3)).await;
    assert!(shed > 0, "the LOW flood was never shed");
    let flooded_instance = cluster.metrics_addr(flooded).to_string();
    prom.wait_for(
        "LOW requests shed on the flooded node, as many as the clients saw",
        &format!("sum by (priority) (kiwi_runtime_requests_shed_total{{instance=\"{flooded_instance}\"}})"),
        |r| {
            let of = |p: &str| {
                r.iter()
                    .find(|(l, _)| l.get("priority").is_some_and(|x| x == p))
                    .map(|(_, v)| *v)
            };
            of("low").is_some_and(|v| v >= shed as f64) && of("high") == Some(0.0)
        },
    )
    .await;

    // Dashboards: every metric a panel names is exported by the live nodes, and Prometheus accepts every
    // expression.
    let mut exported = BTreeSet::new();
    for &a in &targets {
        let m = http::get(a, "/metrics", Some(TOKEN)).await;
        assert_eq!(m.status, 200);
        exported.extend(metric_names(&m.body));
    }
    let exprs = dashboard_exprs();
    assert!(
        exprs.len() >= 30,
        "only {} dashboard expressions",
        exprs.len()
    );
    let mut missing = Vec::new();
    for (file, expr) in &exprs {
        for name in names_in(expr) {
            if !exported.contains(&name) {
                missing.push(format!("{file}: {name} (in `{expr}`)"));
            }
        }
        let concrete = expr.replace("$instance", ".*");
        if let Err(e) = prom.query(&concrete).await {
            missing.push(format!("{file}: Prometheus refused `{concrete}`: {e}"));
        }
    }
    assert!(
        missing.is_empty(),
        "dashboard metrics not exported by a live node:\n{}",
        missing.join("\n")
    );
}
