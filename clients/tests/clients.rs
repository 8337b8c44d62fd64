//! The client library, the `kiwi` CLI, `kiwi playground` and `kiwi bench` against real clusters.

use std::io::{BufRead, BufReader};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use kiwi_client::{CallOptions, Client, ClientOptions, Error};
use kiwi_tests::cluster::{Cluster, ClusterOptions, node_binary};

fn kiwi(cluster: &Cluster, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_kiwi"))
        .args(args)
        .env("KIWI_ENDPOINTS", cluster.endpoints().join(","))
        .output()
        .expect("run kiwi")
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// Runs `kiwi` with `args`, which must succeed, and parses its stdout as one JSON value.
fn kiwi_json(cluster: &Cluster, args: &[&str]) -> serde_json::Value {
    let o = kiwi(cluster, args);
    assert!(o.status.success(), "{o:?}");
    serde_json::from_str(stdout(&o).trim()).unwrap()
}

/// A `kiwi playground --nodes 3` a test started, once it is up. Its stdout stays open for the rest of its
/// life (it prints events later).
struct Playground {
    child: std::process::Child,
    /// What it printed up to its "Ctrl-C" line.
    lines: Vec<String>,
    _stdout: std::io::Lines<BufReader<std::process::ChildStdout>>,
}

impl Playground {
    /// Starts one with its data in `data` and `flags`, and waits (at most 60 s) until it is up.
    fn start(data: &std::path::Path, flags: &[&str]) -> Self {
        let nodes: &[&str] = if flags.contains(&"--nodes") {
            &[]
        } else {
            &["--nodes", "3"]
        };
        let mut child = Command::new(env!("CARGO_BIN_EXE_kiwi"))
            .arg("playground")
            .args(nodes)
            .arg("--data-dir")
            .arg(data)
            .args(flags)
            .arg("--node-bin")
            .arg(node_binary())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let mut stdout = BufReader::new(child.stdout.take().unwrap()).lines();
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut lines = Vec::new();
        for line in stdout.by_ref() {
            let line = line.unwrap();
            let up = line.contains("Ctrl-C");
            lines.push(line);
            if up {
                break;
            }
            assert!(Instant::now() < deadline, "playground did not come up");
        }
        Playground {
            child,
            lines,
            _stdout: stdout,
        }
    }

    /// Every `export NAME=value` it printed.
    fn exports(&self) -> Vec<(String, String)> {
        self.lines
            .iter()
            .filter_map(|l| l.trim().strip_prefix("export ")?.split_once('='))
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    /// The value it printed for `export NAME=`.
    fn export(&self, name: &str) -> String {
        self.exports()
            .into_iter()
            .find_map(|(k, v)| (k == name).then_some(v))
            .unwrap_or_else(|| panic!("the playground printed no {name}: {:?}", self.lines))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_follows_the_leader_and_reports_unknown_outcomes() {
    let mut cluster = Cluster::start(ClusterOptions::default()).await;
    let leader = cluster.wait_leader().await;
    // Start from a follower: the first call is redirected in one hop.
    let follower = cluster.ids().into_iter().find(|id| *id != leader).unwrap();
    let mut eps = vec![cluster.addr(follower).to_string()];
    eps.extend(cluster.endpoints());
    let client = Client::connect(
        &eps,
        ClientOptions {
            timeout: Duration::from_secs(10),
            ..ClientOptions::default()
        },
    )
    .unwrap();
    let opts = CallOptions::default();
    client.put(b"k", b"1", &opts).await.unwrap();
    assert_eq!(client.leader_hint(), cluster.addr(leader).to_string());
    assert_eq!(client.get(b"k", &opts).await.unwrap(), Some(b"1".to_vec()));

    // Leader change: the client retries within its deadline and finds the new leader.
    cluster.kill(leader);
    // A write sent over the connection to the dying leader may or may not have landed: either it succeeds
    // (the client noticed the dead connection and retried elsewhere) or it says the outcome is unknown.
    match client.put(b"k", b"1b", &opts).await {
        Ok(_) | Err(Error::UnknownOutcome { .. }) => {}
        Err(e) => panic!("expected success or UnknownOutcome, got {e:?}"),
    }
    // A client whose first endpoint is the dead node: connection refused (nothing sent) → next node →
    // redirect once a new leader is elected, all within the call's deadline.
    let mut eps = vec![cluster.addr(leader).to_string()];
    eps.extend(
        cluster
            .endpoints()
            .into_iter()
            .filter(|e| *e != cluster.addr(leader).to_string()),
    );
    let client = Client::connect(
        &eps,
        ClientOptions {
            timeout: Duration::from_secs(10),
            ..ClientOptions::default()
        },
    )
    .unwrap();
    client
        .put(b"k", b"2", &opts)
        .await
        .expect("put after the leader died");
    let new = cluster.wait_leader().await;
    assert_eq!(client.leader_hint(), cluster.addr(new).to_string());
    assert_eq!(client.get(b"k", &opts).await.unwrap(), Some(b"2".to_vec()));

    // A frozen leader: a write's outcome is unknown (not retried), a read just times out.
    cluster.pause(new);
    let only_leader =
        Client::connect(&[cluster.addr(new).to_string()], ClientOptions::default()).unwrap();
    let short = CallOptions {
        timeout: Some(Duration::from_millis(800)),
        request_id: Some("req-unknown-1".into()),
        ..CallOptions::default()
    };
    match only_leader.put(b"k", b"3", &short).await {
        Err(Error::UnknownOutcome { request_id, .. }) => assert_eq!(request_id, "req-unknown-1"),
        other => panic!("expected UnknownOutcome, got {other:?}"),
    }
    match only_leader.get(b"k", &short).await {
        Err(Error::DeadlineExceeded { .. }) => {}
        other => panic!("expected DeadlineExceeded, got {other:?}"),
    }
    cluster.resume(new);

    // Nothing listens: the deadline expires with an error naming the cause; nothing was sent.
    let port = kiwi_tests::ports::free_addr();
    let nobody = Client::connect(&[port.to_string()], ClientOptions::default()).unwrap();
    match nobody.put(b"k", b"4", &short).await {
        Err(Error::DeadlineExceeded { last, .. }) => assert!(last.contains("connect"), "{last}"),
        other => panic!("expected DeadlineExceeded, got {other:?}"),
    }
    // Bad input is refused at once with the limit named.
    match client.put(b"", b"v", &opts).await {
        Err(Error::InvalidArgument(m)) => assert!(m.contains("empty"), "{m}"),
        other => panic!("expected InvalidArgument, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_commands_exit_codes_and_json() {
    let cluster = Cluster::start(ClusterOptions::default()).await;
    let o = kiwi(&cluster, &["put", "greeting", "hello"]);
    assert!(o.status.success(), "{o:?}");
    let o = kiwi(&cluster, &["get", "greeting"]);
    assert_eq!(o.status.code(), Some(0));
    assert_eq!(stdout(&o), "hello\n");
    let o = kiwi(&cluster, &["get", "missing"]);
    assert_eq!(o.status.code(), Some(1), "not found is exit 1");
    let o = kiwi(&cluster, &["--json", "get", "greeting"]);
    let v: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    assert_eq!(v["value"], "hello");
    assert_eq!(v["found"], true);

    let o = kiwi(&cluster, &["cas", "greeting", "--expect", "nope", "bye"]);
    assert_eq!(o.status.code(), Some(1), "failed CAS is exit 1: {o:?}");
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("hello"),
        "names the current value"
    );
    let o = kiwi(&cluster, &["cas", "greeting", "--expect", "hello", "bye"]);
    assert_eq!(o.status.code(), Some(0), "{o:?}");
    let o = kiwi(&cluster, &["cas", "fresh", "--absent", "1"]);
    assert_eq!(o.status.code(), Some(0), "{o:?}");

    // Values from stdin.
    let mut child = Command::new(env!("CARGO_BIN_EXE_kiwi"))
        .args(["put", "piped", "-"])
        .env("KIWI_ENDPOINTS", cluster.endpoints().join(","))
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    std::io::Write::write_all(&mut child.stdin.take().unwrap(), b"from stdin").unwrap();
    assert!(child.wait().unwrap().success());

    let o = kiwi(&cluster, &["--json", "scan", "--limit", "2"]);
    let v: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    assert_eq!(v["kvs"][0]["key"], "fresh");
    assert_eq!(v["kvs"][1]["key"], "greeting");
    assert_eq!(v["kvs"][1]["value"], "bye");
    assert_eq!(v["more"], true);
    let o = kiwi(&cluster, &["scan", "p", "q"]);
    assert_eq!(stdout(&o), "piped\tfrom stdin\n");

    let o = kiwi(&cluster, &["del", "fresh"]);
    assert_eq!(o.status.code(), Some(0));
    let o = kiwi(&cluster, &["del", "fresh"]);
    assert_eq!(o.status.code(), Some(1));

    // Ranges: a prefix, reverse, a count, and deletes of a range and of a prefix, one write each.
    for k in ["app/a", "app/b", "app/c", "apq", "log/1", "log/2"] {
        assert!(kiwi(&cluster, &["put", k, "v"]).status.success());
    }
    let o = kiwi(&cluster, &["scan", "--prefix", "app/", "--keys-only"]);
    assert_eq!(stdout(&o), "app/a\napp/b\napp/c\n");
    let o = kiwi(
        &cluster,
        &[
            "scan",
            "--prefix",
            "app/",
            "--reverse",
            "--keys-only",
            "--limit",
            "2",
        ],
    );
    assert_eq!(stdout(&o), "app/c\napp/b\n");
    let o = kiwi(&cluster, &["scan", "--prefix", "ap", "--count"]);
    assert_eq!(stdout(&o), "4\n");
    let o = kiwi(&cluster, &["--json", "del", "app/b", "--to", "app/z"]);
    assert_eq!(o.status.code(), Some(0), "{o:?}");
    let v: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    assert_eq!(v["deleted"], 2);
    let o = kiwi(&cluster, &["del", "--prefix", "log/", "--prev-kv"]);
    assert_eq!(stdout(&o), "log/1\tv\nlog/2\tv\ndeleted 2\n");
    let o = kiwi(&cluster, &["scan", "--prefix", "ap", "--keys-only"]);
    assert_eq!(stdout(&o), "app/a\napq\n");
    // KEY alone with --prev-kv deletes that key only, not the keys after it.
    let o = kiwi(&cluster, &["del", "app/a", "--prev-kv"]);
    assert_eq!(stdout(&o), "app/a\tv\ndeleted 1\n");
    let o = kiwi(&cluster, &["scan", "--prefix", "ap", "--keys-only"]);
    assert_eq!(stdout(&o), "apq\n");
    let o = kiwi(&cluster, &["del", "--prefix", "nothing/"]);
    assert_eq!(stdout(&o), "deleted 0\n");
    let o = kiwi(&cluster, &["del"]);
    assert_eq!(o.status.code(), Some(2), "KEY or --prefix is required");

    let o = kiwi(&cluster, &["--json", "status"]);
    assert_eq!(o.status.code(), Some(0));
    let v: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    let leader = cluster.wait_leader().await;
    assert_eq!(v["leader"], leader);
    let members = v["members"].as_array().unwrap();
    assert_eq!(members.len(), 3);
    for m in members {
        for field in [
            "id",
            "addr",
            "role",
            "term",
            "commit_index",
            "applied_index",
        ] {
            assert!(!m[field].is_null(), "{field} missing in {m}");
        }
    }
    assert_eq!(members.iter().filter(|m| m["role"] == "leader").count(), 1);

    // Errors: one line, exit 2.
    let o = Command::new(env!("CARGO_BIN_EXE_kiwi"))
        .args([
            "--endpoints",
            "127.0.0.1:1",
            "--timeout",
            "300ms",
            "get",
            "k",
        ])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2));
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(err.starts_with("error: "), "{err}");
    let o = kiwi(&cluster, &["put", "", "v"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("empty"));
}

#[test]
fn playground_with_lease_reads_answers_reads_without_a_round_each() {
    let _serial = kiwi_tests::cluster::serial();
    let dir = tempfile::tempdir().unwrap();
    let mut pg = Playground::start(&dir.path().join("pg"), &["--no-control", "--lease-reads"]);
    let endpoints = pg.export("KIWI_ENDPOINTS");
    let run = |args: &[&str]| {
        let o = Command::new(env!("CARGO_BIN_EXE_kiwi"))
            .args(args)
            .env("KIWI_ENDPOINTS", &endpoints)
            .output()
            .unwrap();
        assert!(o.status.success(), "kiwi {args:?}: {o:?}");
        o
    };
    let out = tempfile::NamedTempFile::new().unwrap();
    run(&[
        "bench",
        "--workload",
        "get",
        "--consistency",
        "linearizable",
        "--workers",
        "1",
        "--keys",
        "100",
        "--duration",
        "2s",
        "--quiet",
        "--json-out",
        out.path().to_str().unwrap(),
    ]);
    let bench: serde_json::Value =
        serde_json::from_str(std::fs::read_to_string(out.path()).unwrap().trim()).unwrap();
    let reads = bench["ops"].as_u64().unwrap();
    assert_eq!(bench["errors"], serde_json::json!({}), "{bench}");
    let metrics: serde_json::Value =
        serde_json::from_str(stdout(&run(&["metrics", "--json"])).trim()).unwrap();
    let leader = metrics["nodes"]
        .as_array()
        .unwrap_or_else(|| panic!("no nodes in {metrics}"))
        .iter()
        .find(|n| n["role"] == "leader")
        .unwrap_or_else(|| panic!("no leader in {metrics}"));
    let rounds = leader["read_index"]["count"]
        .as_u64()
        .unwrap_or_else(|| panic!("no ReadIndex count in {leader}"));
    // One round per read without a lease; with one, a round about every 180 ms to renew it.
    assert!(reads >= 100, "{reads} reads in 2 s");
    assert!(
        rounds * 10 <= reads,
        "{rounds} ReadIndex rounds for {reads} linearizable reads: the lease is not used"
    );

    Command::new("kill")
        .args(["-INT", &pg.child.id().to_string()])
        .status()
        .unwrap();
    assert!(pg.child.wait().unwrap().success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bench_reports_a_json_line_with_ops_and_no_errors() {
    let cluster = Cluster::start(ClusterOptions::default()).await;
    let out = tempfile::NamedTempFile::new().unwrap();
    let o = kiwi(
        &cluster,
        &[
            "bench",
            "--workload",
            "mixed",
            "--workers",
            "8",
            "--connections",
            "2",
            "--keys",
            "200",
            "--duration",
            "2s",
            "--quiet",
            "--json-out",
            out.path().to_str().unwrap(),
        ],
    );
    assert!(o.status.success(), "{o:?}");
    let text = std::fs::read_to_string(out.path()).unwrap();
    let v: serde_json::Value = serde_json::from_str(text.trim()).unwrap();
    assert!(v["ops"].as_u64().unwrap() > 0, "{v}");
    assert_eq!(v["errors"], serde_json::json!({}), "{v}");
    assert_eq!(v["target"], "kiwi");
    assert!(v["p99_us"].as_u64().unwrap() >= v["p50_us"].as_u64().unwrap());

    // `kiwi runtime` changes the pool's policy on every node; a bad one is refused, naming the field.
    let o = kiwi(&cluster, &["runtime", "--set-storage-threads", "8-2"]);
    assert_eq!(o.status.code(), Some(2), "{o:?}");
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("runtime.scaling.min_storage_threads"),
        "{o:?}"
    );
    let v = kiwi_json(
        &cluster,
        &[
            "--json",
            "runtime",
            "--set-scaling",
            "off",
            "--set-storage-threads",
            "2-3",
        ],
    );
    for n in v["nodes"].as_array().unwrap() {
        assert_eq!(n["scaling_enabled"], false, "{n}");
        assert_eq!(n["scaling"]["min_storage_threads"], 2, "{n}");
        assert_eq!(n["scaling"]["max_storage_threads"], 3, "{n}");
    }

    // A load ramp: per-phase throughput and a per-second timeline of every node's pool size.
    let v = kiwi_json(
        &cluster,
        &[
            "bench",
            "--workload",
            "put",
            "--ramp",
            "1:1s,6:2s",
            "--connections",
            "2",
            "--quiet",
        ],
    );
    let phases = v["phases"].as_array().unwrap();
    assert_eq!(phases.len(), 2, "{v}");
    assert_eq!(phases[1]["workers"], 6, "{v}");
    assert!(phases.iter().all(|p| p["ops"].as_u64().unwrap() > 0), "{v}");
    let timeline = v["timeline"].as_array().unwrap();
    assert!(timeline.len() >= 2, "{v}");
    assert!(
        timeline
            .iter()
            .all(|t| t["pool_threads"].as_array().unwrap().len() == 3),
        "{v}"
    );
    assert_eq!(v["errors"], serde_json::json!({}), "{v}");
    let o = kiwi(&cluster, &["bench", "--ramp", "4:1s,0:1s"]);
    assert_eq!(o.status.code(), Some(2), "{o:?}");
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("at least one worker"),
        "{o:?}"
    );

    // A fixed rate: the workers send 200 ops/s in all, not as fast as the answers come (a closed loop
    // of 4 workers does thousands per second here), and a bad rate is refused.
    let v = kiwi_json(
        &cluster,
        &[
            "bench",
            "--workload",
            "put",
            "--workers",
            "4",
            "--connections",
            "2",
            "--rate",
            "200",
            "--duration",
            "2s",
            "--quiet",
        ],
    );
    assert_eq!(v["rate"], 200.0, "{v}");
    let ops = v["ops"].as_u64().unwrap();
    assert!(
        (300..=400).contains(&ops),
        "200 ops/s for 2 s did {ops}: {v}"
    );
    assert_eq!(v["errors"], serde_json::json!({}), "{v}");
    let o = kiwi(&cluster, &["bench", "--rate", "0"]);
    assert_eq!(o.status.code(), Some(2), "{o:?}");
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("--rate must be a positive"),
        "{o:?}"
    );
}

#[test]
fn playground_serves_and_leaves_no_process_behind() {
    // A cluster of processes too: not at the same time as the other tests' clusters.
    let _serial = kiwi_tests::cluster::serial();
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("pg");
    let mut pg = Playground::start(&data, &[]);
    let endpoints = pg.export("KIWI_ENDPOINTS");
    let control = pg.export("KIWI_CONTROL");
    let cluster_metrics: std::net::SocketAddr = pg
        .lines
        .iter()
        .find_map(|l| l.split("metrics (every node): http://").nth(1))
        .and_then(|m| m.split('/').next())
        .expect("the playground printed the control plane's metrics address")
        .parse()
        .unwrap();
    let run = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_kiwi"))
            .args(args)
            .env("KIWI_ENDPOINTS", &endpoints)
            .env("KIWI_CONTROL", &control)
            .env("KIWI_PLAYGROUND_DIR", &data)
            .output()
            .unwrap()
    };
    assert!(run(&["put", "hello", "world"]).status.success());
    assert_eq!(stdout(&run(&["get", "hello"])), "world\n");

    let pgrep = |pattern: &str| {
        let o = Command::new("pgrep")
            .arg("-f")
            .arg(pattern)
            .output()
            .unwrap();
        String::from_utf8_lossy(&o.stdout).trim().to_string()
    };
    let pattern = format!("{}/node-", data.display());
    assert_eq!(
        pgrep(&pattern).lines().count(),
        3,
        "three nodes run from the data dir"
    );
    let control_pattern = format!("{}/control", data.display());
    assert_eq!(
        pgrep(&control_pattern).lines().count(),
        1,
        "a control plane runs"
    );

    // One node is SIGKILLed: the playground keeps the others (and itself) running, and the control plane
    // sees the node go down.
    let victim = pgrep(&format!("{}/node-1/", data.display()));
    Command::new("kill").args(["-9", &victim]).status().unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let o = run(&["control", "status", "--json"]);
        assert!(o.status.success(), "{o:?}");
        let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        let nodes = v["nodes"].as_array().cloned().unwrap_or_default();
        if nodes.iter().any(|n| n["id"] == 1 && n["up"] == false) {
            assert_eq!(nodes.iter().filter(|n| n["up"] == true).count(), 2, "{v}");
            break;
        }
        assert!(Instant::now() < deadline, "node 1 never shown down: {v}");
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(
        pg.child.try_wait().unwrap().is_none(),
        "the playground stopped after a node died"
    );
    // `kiwi control watch` refreshes the same view; `kiwi control policy set` pushes or names the rule.
    let w = run(&["control", "watch", "--count", "2", "--interval", "100ms"]);
    assert!(w.status.success(), "{w:?}");
    let out = stdout(&w);
    assert_eq!(out.matches("kiwi control watch").count(), 2, "{out}");
    assert!(out.contains("DOWN"), "{out}");
    let bad = run(&["control", "policy", "set", "--set-storage-threads", "40-8"]);
    assert_eq!(bad.status.code(), Some(2), "{bad:?}");
    assert!(
        String::from_utf8_lossy(&bad.stderr).contains("runtime.scaling.min_storage_threads"),
        "{bad:?}"
    );
    let good = run(&["control", "policy", "set", "--set-storage-threads", "2-8"]);
    assert!(good.status.success(), "{good:?}");
    assert!(stdout(&good).contains("version 1"), "{good:?}");
    assert!(stdout(&good).contains("2-8 threads"), "{good:?}");
    assert_eq!(
        pgrep(&pattern).lines().count(),
        2,
        "the other nodes keep running"
    );
    assert!(run(&["put", "after", "kill"]).status.success());

    // `kiwi playground restart 1` from another terminal brings the killed node back.
    let r = run(&["playground", "restart", "1"]);
    assert!(r.status.success(), "{r:?}");
    assert!(
        stdout(&r).contains("node 1 was not running; started again"),
        "{r:?}"
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let v: serde_json::Value =
            serde_json::from_slice(&run(&["control", "status", "--json"]).stdout).unwrap();
        let nodes = v["nodes"].as_array().cloned().unwrap_or_default();
        if nodes.iter().filter(|n| n["up"] == true).count() == 3 {
            break;
        }
        assert!(Instant::now() < deadline, "node 1 never back up: {v}");
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(pgrep(&pattern).lines().count(), 3, "node 1 runs again");
    let r = run(&["playground", "restart", "7"]);
    assert!(!r.status.success(), "{r:?}");
    assert!(
        String::from_utf8_lossy(&r.stderr).contains("not 7"),
        "{r:?}"
    );
    // The history keeps one sample per heartbeat for each node.
    let h = run(&[
        "control", "history", "--node", "2", "--last", "1m", "--json",
    ]);
    assert!(h.status.success(), "{h:?}");
    let samples: Vec<serde_json::Value> = stdout(&h)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert!(samples.len() >= 3, "{samples:?}");
    assert!(samples.iter().all(|s| s["node"] == 2), "{samples:?}");
    // The control plane's /metrics covers every node.
    let page = tokio::runtime::Runtime::new()
        .unwrap()
        .block_on(kiwi_tests::http::get(cluster_metrics, "/metrics", None));
    assert_eq!(page.status, 200, "{page:?}");
    assert!(
        page.body.contains("kiwi_node_up{node=\"3\"}"),
        "{}",
        page.body
    );

    Command::new("kill")
        .args(["-INT", &pg.child.id().to_string()])
        .status()
        .unwrap();
    let status = pg.child.wait().unwrap();
    assert!(status.success(), "playground exit status {status}");
    assert_eq!(pgrep(&pattern), "", "no kiwi-node left behind");
    assert_eq!(pgrep(&control_pattern), "", "no kiwi-control left behind");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_reads_back_a_value_at_the_default_limit() {
    // 4 MiB is the node's default value limit and also tonic's default message limit: a Get of such a
    // value used to fail in the client.
    let cluster = Cluster::start(ClusterOptions {
        nodes: 1,
        ..ClusterOptions::default()
    })
    .await;
    let client = Client::connect(&cluster.endpoints(), ClientOptions::default()).unwrap();
    let opts = CallOptions::default();
    let value: Vec<u8> = (0..4 * 1024 * 1024).map(|i| (i % 251) as u8).collect();
    client.put(b"big", &value, &opts).await.unwrap();
    let got = client.get(b"big", &opts).await.unwrap();
    assert!(got == Some(value), "the 4 MiB value came back intact");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_show_each_followers_replication() {
    let cluster = Cluster::start(ClusterOptions::default()).await;
    for i in 0..50 {
        cluster.must_put(format!("m{i}").as_bytes(), b"v").await;
    }
    let leader = cluster.wait_leader().await;
    let o = kiwi(&cluster, &["--json", "metrics"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let v: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    let nodes = v["nodes"].as_array().unwrap();
    assert_eq!(nodes.len(), 3, "{v}");
    let lead = nodes
        .iter()
        .find(|n| n["id"] == leader)
        .unwrap_or_else(|| panic!("leader {leader} in {v}"));
    assert_eq!(lead["role"], "leader");
    assert!(
        lead["proposals_committed"].as_u64().unwrap() >= 50,
        "{lead}"
    );
    let followers = lead["followers"].as_array().unwrap();
    assert_eq!(followers.len(), 2, "{lead}");
    for f in followers {
        assert!(
            f["replication_latency"]["count"].as_u64().unwrap_or(0) > 0,
            "replication latency measured for {f}"
        );
        assert!(f["replication_latency_avg_us"].as_u64().unwrap() > 0, "{f}");
    }
    for n in nodes.iter().filter(|n| n["id"] != leader) {
        assert_eq!(n["role"], "follower");
        assert!(n["followers"].as_array().unwrap().is_empty());
    }
    let text = stdout(&kiwi(&cluster, &["metrics"]));
    assert!(
        text.contains("FOLLOWER")
            && text.contains("REPL AVG ms")
            && text.contains("propose->apply"),
        "{text}"
    );
}

#[test]
fn secure_playground_serves_tls_mutual_tls_and_tokens() {
    let _serial = kiwi_tests::cluster::serial();
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("pg");
    let mut pg = Playground::start(&data, &["--secure", "--no-metrics"]);
    let exports = pg.exports();
    let get = |k: &str| pg.export(k);
    let run = |args: &[&str], drop: &[&str]| {
        let mut c = Command::new(env!("CARGO_BIN_EXE_kiwi"));
        for (k, v) in &exports {
            if !drop.contains(&k.as_str()) {
                c.env(k, v);
            }
        }
        c.args(args).output().unwrap()
    };
    let ok = run(&["put", "hello", "tls"], &[]);
    assert!(ok.status.success(), "{ok:?}");
    assert_eq!(stdout(&run(&["get", "hello"], &[])), "tls\n");
    let no_token = run(&["get", "hello"], &["KIWI_TOKEN_FILE"]);
    assert_eq!(no_token.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&no_token.stderr).contains("token"),
        "{no_token:?}"
    );
    let plain = run(&["get", "hello"], &["KIWI_CA_CERT"]);
    assert_eq!(
        plain.status.code(),
        Some(2),
        "plain text to a TLS node fails: {plain:?}"
    );
    assert!(
        String::from_utf8_lossy(&plain.stderr).contains("--ca-cert"),
        "{plain:?}"
    );
    // The nodes linked to the control plane over TLS with their token.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let o = run(&["control", "status", "--json"], &[]);
        let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap_or_default();
        if v["nodes"]
            .as_array()
            .is_some_and(|n| n.iter().filter(|n| n["up"] == true).count() == 3)
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "nodes never linked over TLS: {o:?}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    // The put above was replicated over the nodes' Raft ports (mutual TLS). The client port serves no
    // Raft at all, and the Raft port refuses a TLS client without a member certificate.
    let endpoints = get("KIWI_ENDPOINTS");
    let first = endpoints.split(',').next().unwrap().to_string();
    let node_config = std::fs::read_to_string(data.join("node-1").join("kiwi-node.toml")).unwrap();
    let raft_port = node_config
        .lines()
        .find_map(|l| l.strip_prefix("raft_listen_addr = "))
        .map(|a| a.trim_matches('"').to_string())
        .unwrap_or_else(|| panic!("--secure gives Raft its own port: {node_config}"));
    assert_ne!(raft_port, first);
    let ca = std::fs::read_to_string(get("KIWI_CA_CERT")).unwrap();
    let send = |addr: String, identity: Option<(String, String)>, from: u64| {
        let ca = ca.clone();
        tokio::runtime::Runtime::new()
            .unwrap()
            .block_on(async move {
                let channel = kiwi_tests::cluster::tls_channel(addr, &ca, identity.as_ref())
                    .await
                    .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
                let mut raft =
                    kiwi_proto::v1::raft_transport_client::RaftTransportClient::new(channel);
                let batch = kiwi_proto::v1::RaftMessageBatch {
                    cluster_id: 0,
                    from_node: from,
                    to_node: 1,
                    messages: vec![],
                    lease: None,
                };
                raft.send_messages(tokio_stream::iter([batch]))
                    .await
                    .map(|_| ())
            })
    };
    assert_eq!(
        send(first, None, 2).unwrap_err().code(),
        tonic::Code::Unimplemented,
        "no Raft on the client port"
    );
    // A certificate from another CA (same names as the members') is refused like none at all.
    let foreign = {
        use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair};
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca_key = KeyPair::generate().unwrap();
        let other_ca = ca_params.self_signed(&ca_key).unwrap();
        let key = KeyPair::generate().unwrap();
        let cert = CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()])
            .unwrap()
            .signed_by(&key, &other_ca, &ca_key)
            .unwrap();
        (cert.pem(), key.serialize_pem())
    };
    for (what, identity) in [
        ("no client certificate", None),
        ("a certificate from another CA", Some(foreign)),
    ] {
        let refused = send(raft_port.clone(), identity, 2).expect_err(what);
        assert!(
            matches!(
                refused.code(),
                tonic::Code::Unavailable
                    | tonic::Code::Unknown
                    | tonic::Code::Internal
                    | tonic::Code::Cancelled
            ),
            "{what}: the handshake is refused: {refused:?}"
        );
    }
    // Each member has its own certificate, which speaks Raft for that member only; the control plane's
    // certificate (from the same CA, naming no member) speaks it for nobody.
    let secrets = data.join("secrets");
    let pair = |name: &str| {
        let read =
            |ext: &str| std::fs::read_to_string(secrets.join(format!("{name}.{ext}"))).unwrap();
        (read("crt"), read("key"))
    };
    assert_ne!(
        pair("node-2").0,
        pair("node-3").0,
        "one certificate per member"
    );
    assert!(
        send(raft_port.clone(), Some(pair("node-2")), 2).is_ok(),
        "node 2 as itself"
    );
    for (what, identity) in [
        ("node 3's certificate claiming node 2", pair("node-3")),
        ("the control plane's certificate", pair("control")),
    ] {
        let refused = send(raft_port.clone(), Some(identity), 2).expect_err(what);
        assert_eq!(
            refused.code(),
            tonic::Code::PermissionDenied,
            "{what}: {refused:?}"
        );
    }
    let status = stdout(&run(&["status"], &[]));
    assert!(
        status.contains("TLS on, mutual TLS between members on, tokens on, Raft on its own port"),
        "{status}"
    );
    assert_eq!(stdout(&run(&["get", "hello"], &[])), "tls\n");
    Command::new("kill")
        .args(["-INT", &pg.child.id().to_string()])
        .status()
        .unwrap();
    assert!(pg.child.wait().unwrap().success());
}

/// `kiwi member list|add|remove` and `kiwi leader transfer` against a running cluster: the list names
/// every member and the leader, a transfer moves leadership, removing the leader needs --yes, a joining
/// node is added and votes, a removed one leaves the list, and a write afterwards is read back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_member_and_leader_commands() {
    let mut cluster = Cluster::start(ClusterOptions::default()).await;
    let leader = cluster.wait_leader().await;
    let list = kiwi_json(&cluster, &["--json", "member", "list"]);
    assert_eq!(list["leader"], leader);
    let members = list["members"].as_array().unwrap();
    assert_eq!(members.len(), 3, "{list}");
    assert!(
        members
            .iter()
            .all(|m| m["role"] == "voter" && m["up"] == true),
        "{list}"
    );

    // Leadership moves to the most caught-up other voter.
    let moved = kiwi_json(&cluster, &["--json", "leader", "transfer"]);
    let new_leader = moved["leader"].as_u64().unwrap();
    assert_ne!(new_leader, leader);
    assert_eq!(cluster.wait_leader().await, new_leader);

    // Removing the leader is refused without --yes, naming what to do.
    let o = kiwi(&cluster, &["member", "remove", &new_leader.to_string()]);
    assert_eq!(o.status.code(), Some(2), "{o:?}");
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("kiwi leader transfer"),
        "{o:?}"
    );

    // A joining node is added (and votes when the command returns).
    let joining = cluster.spawn_joining_node();
    let addr = cluster.addr(joining).to_string();
    let added = kiwi_json(
        &cluster,
        &["--json", "member", "add", &joining.to_string(), &addr],
    );
    assert!(
        added["voters"]
            .as_array()
            .unwrap()
            .iter()
            .any(|v| v == joining),
        "{added}"
    );
    // Another joins as a learner: listed as one, then promoted.
    let learner = cluster.spawn_joining_node();
    let addr = cluster.addr(learner).to_string();
    let added = kiwi_json(
        &cluster,
        &[
            "--json",
            "member",
            "add",
            &learner.to_string(),
            &addr,
            "--learner",
        ],
    );
    assert!(
        added["learners"]
            .as_array()
            .unwrap()
            .iter()
            .any(|v| v == learner),
        "{added}"
    );
    let list = kiwi_json(&cluster, &["--json", "member", "list"]);
    assert!(
        list["members"]
            .as_array()
            .unwrap()
            .iter()
            .any(|m| m["id"] == learner && m["role"] == "learner"),
        "{list}"
    );
    let promoted = kiwi_json(
        &cluster,
        &["--json", "member", "promote", &learner.to_string()],
    );
    assert!(
        promoted["voters"]
            .as_array()
            .unwrap()
            .iter()
            .any(|v| v == learner),
        "{promoted}"
    );
    // A follower is removed and leaves the list.
    let follower = cluster
        .ids()
        .into_iter()
        .find(|id| *id != new_leader && *id != joining && *id != learner)
        .unwrap();
    let removed = kiwi_json(
        &cluster,
        &["--json", "member", "remove", &follower.to_string()],
    );
    assert!(
        !removed["voters"]
            .as_array()
            .unwrap()
            .iter()
            .any(|v| v == follower),
        "{removed}"
    );
    let list = kiwi_json(&cluster, &["--json", "member", "list"]);
    let ids: Vec<u64> = list["members"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_u64().unwrap())
        .collect();
    assert!(
        ids.contains(&joining) && ids.contains(&learner) && !ids.contains(&follower),
        "{list}"
    );
    assert_eq!(ids.len(), 4);
    let o = kiwi(&cluster, &["put", "after", "membership"]);
    assert!(o.status.success(), "{o:?}");
    let o = kiwi(&cluster, &["get", "after"]);
    assert_eq!(stdout(&o), "membership\n");
}

/// Revisions, reads at a past revision, a watch that resumes across a leader crash, transactions and
/// compaction, through the client library against a real three-node cluster.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revisions_watch_txn_and_compaction() {
    use kiwi_client::{Compare, TxnOp, WatchUpdate, compare, txn_op, txn_op_response};
    let mut cluster = Cluster::start(ClusterOptions::default()).await;
    let leader = cluster.wait_leader().await;
    // The leader first, so that the watch's stream is on the node this test kills.
    let first = cluster.addr(leader).to_string();
    let mut eps = vec![first.clone()];
    eps.extend(cluster.endpoints().into_iter().filter(|e| *e != first));
    let client = Client::connect(&eps, ClientOptions::default()).unwrap();
    let o = CallOptions::default();

    let r1 = client.put(b"a", b"1", &o).await.unwrap();
    let r2 = client.put(b"a", b"2", &o).await.unwrap();
    assert!(r2 > r1);
    let kv = client.get_kv(b"a", 0, &o).await.unwrap().unwrap();
    assert_eq!(
        (kv.create_revision, kv.mod_revision, kv.version),
        (r1, r2, 2)
    );
    let then = client.get_kv(b"a", r1, &o).await.unwrap().unwrap();
    assert_eq!((then.value.as_slice(), then.version), (&b"1"[..], 1));
    assert_eq!(client.get_kv(b"a", r1 - 1, &o).await.unwrap(), None);

    // A watch on w/ from before its first write; the leader dies half way through the writes.
    let mut watcher = client.watch(&kiwi_client::KeyRange::Prefix(b"w/".to_vec()), r2, true);
    let mut expected = Vec::new();
    for i in 0..20 {
        if i == 10 {
            cluster.kill(leader);
        }
        // A write on the connection to the killed leader may end with an unknown outcome: look, and
        // write again only if it did not happen (each value is unique, so the check is exact).
        if i % 5 == 4 {
            // The key the previous write put.
            let key = format!("w/{:02}", (i - 1) % 7);
            loop {
                match client.delete(key.as_bytes(), &o).await {
                    Ok(existed) => assert!(existed),
                    Err(Error::UnknownOutcome { .. }) => {
                        if client
                            .get_kv(key.as_bytes(), 0, &o)
                            .await
                            .unwrap()
                            .is_some()
                        {
                            continue;
                        }
                    }
                    Err(e) => panic!("{e}"),
                }
                break;
            }
            expected.push((format!("DELETE {key}"), 0));
        } else {
            let key = format!("w/{:02}", i % 7);
            let value = format!("{i}");
            let rev = loop {
                match client.put(key.as_bytes(), value.as_bytes(), &o).await {
                    Ok(rev) => break rev,
                    Err(Error::UnknownOutcome { .. }) => {
                        if let Some(kv) = client.get_kv(key.as_bytes(), 0, &o).await.unwrap()
                            && kv.value == value.as_bytes()
                        {
                            break kv.mod_revision;
                        }
                    }
                    Err(e) => panic!("{e}"),
                }
            };
            expected.push((format!("PUT {key}"), rev));
        }
    }
    let mut got = Vec::new();
    while got.len() < expected.len() {
        let update = tokio::time::timeout(Duration::from_secs(30), watcher.next())
            .await
            .expect("the watch goes on after the leader crash")
            .unwrap();
        let WatchUpdate::Events(events) = update else {
            panic!("not compacted: {update:?}")
        };
        for e in events {
            let kv = e.kv.unwrap();
            let kind = if e.r#type == kiwi_client::key_event::EventType::Delete as i32 {
                "DELETE"
            } else {
                "PUT"
            };
            got.push((
                format!("{kind} {}", String::from_utf8_lossy(&kv.key)),
                kv.mod_revision,
            ));
        }
    }
    // In order, each once, none missing: the same kinds and keys, and every PUT at its revision.
    assert_eq!(
        got.iter().map(|(e, _)| e.clone()).collect::<Vec<_>>(),
        expected.iter().map(|(e, _)| e.clone()).collect::<Vec<_>>()
    );
    for ((_, want), (_, have)) in expected.iter().zip(&got) {
        if *want != 0 {
            assert_eq!(want, have);
        }
    }
    assert!(
        got.windows(2).all(|w| w[0].1 < w[1].1),
        "revisions increase: {got:?}"
    );

    // A transaction on a's mod revision: the first succeeds, the same one again fails and reads.
    let cas = || Compare {
        result: compare::CompareResult::Equal as i32,
        target: compare::CompareTarget::Mod as i32,
        key: b"a".to_vec(),
        target_union: Some(compare::TargetUnion::ModRevision(r2)),
        range_end: Vec::new(),
    };
    let put = |k: &[u8], v: &[u8]| TxnOp {
        op: Some(txn_op::Op::Put(txn_op::Put {
            key: k.to_vec(),
            value: v.to_vec(),
            prev_kv: false,
            lease: 0,
        })),
    };
    let read = TxnOp {
        op: Some(txn_op::Op::Range(txn_op::Range {
            key: b"a".to_vec(),
            ..txn_op::Range::default()
        })),
    };
    let ok = client
        .txn(
            vec![cas()],
            vec![put(b"a", b"3"), put(b"b", b"3")],
            vec![read.clone()],
            &o,
        )
        .await
        .unwrap();
    assert!(ok.succeeded);
    let rev = ok.header.unwrap().revision;
    let a = client.get_kv(b"a", 0, &o).await.unwrap().unwrap();
    let b = client.get_kv(b"b", 0, &o).await.unwrap().unwrap();
    assert_eq!((a.mod_revision, b.mod_revision), (rev, rev), "one revision");
    let again = client
        .txn(vec![cas()], vec![put(b"a", b"4")], vec![read], &o)
        .await
        .unwrap();
    assert!(!again.succeeded);
    let Some(txn_op_response::Response::Range(r)) = &again.responses[0].response else {
        panic!("the failure branch's read")
    };
    assert_eq!(r.kvs[0].value, b"3");
    let dup = client
        .txn(vec![], vec![put(b"k", b"1"), put(b"k", b"2")], vec![], &o)
        .await;
    assert!(
        matches!(&dup, Err(Error::InvalidArgument(m)) if m.contains("duplicate key")),
        "{dup:?}"
    );

    // Compaction: older revisions are refused with the compacted answer, never the current value.
    client.compact(r2, &o).await.unwrap();
    let old = client.get_kv(b"a", r1, &o).await;
    assert!(
        matches!(&old, Err(Error::Rpc(s)) if s.code() == tonic::Code::OutOfRange && s.message().contains("compacted")),
        "{old:?}"
    );
    assert_eq!(
        client.get_kv(b"a", r2, &o).await.unwrap().unwrap().value,
        b"2"
    );
    let mut late = client.watch(&kiwi_client::KeyRange::key(b"a"), r1, false);
    let update = tokio::time::timeout(Duration::from_secs(30), late.next())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(update, WatchUpdate::Compacted { oldest: r2 });
}

/// `kiwi watch --prefix` prints the changes from a past revision, in order, as `PUT`/`DELETE` lines.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_watch_prints_changes_from_a_revision() {
    let cluster = Cluster::start(ClusterOptions::default()).await;
    let client = Client::connect(&cluster.endpoints(), ClientOptions::default()).unwrap();
    let o = CallOptions::default();
    let first = client.put(b"cfg/a", b"1", &o).await.unwrap();
    client.put(b"other", b"x", &o).await.unwrap();
    client.delete(b"cfg/a", &o).await.unwrap();
    let third = client.put(b"cfg/b", b"2", &o).await.unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_kiwi"))
        .args(["watch", "--prefix", "cfg/", "--rev", &first.to_string()])
        .env("KIWI_ENDPOINTS", cluster.endpoints().join(","))
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let lines = tokio::task::spawn_blocking({
        let out = child.stdout.take().unwrap();
        move || {
            BufReader::new(out)
                .lines()
                .take(3)
                .map(Result::unwrap)
                .collect::<Vec<_>>()
        }
    });
    let lines = tokio::time::timeout(Duration::from_secs(30), lines)
        .await
        .expect("three lines")
        .unwrap();
    child.kill().unwrap();
    let _ = child.wait();
    assert_eq!(lines[0], format!("PUT cfg/a 1 rev={first}"));
    assert!(lines[1].starts_with("DELETE cfg/a rev="), "{lines:?}");
    assert_eq!(lines[2], format!("PUT cfg/b 2 rev={third}"));
}

/// `kiwi txn` reads etcdctl's plain form from stdin and prints SUCCESS/FAILURE with each answer;
/// `kiwi get --rev` reads the past; `kiwi compact` drops it, after which the same read is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_txn_get_at_a_revision_and_compact() {
    let cluster = Cluster::start(ClusterOptions::default()).await;
    let client = Client::connect(&cluster.endpoints(), ClientOptions::default()).unwrap();
    let o = CallOptions::default();
    let first = client.put(b"acct/a", b"100", &o).await.unwrap();
    let txn = |input: String| {
        let mut child = Command::new(env!("CARGO_BIN_EXE_kiwi"))
            .arg("txn")
            .env("KIWI_ENDPOINTS", cluster.endpoints().join(","))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        std::io::Write::write_all(&mut child.stdin.take().unwrap(), input.as_bytes()).unwrap();
        child.wait_with_output().unwrap()
    };
    let transfer = format!(
        "mod(\"acct/a\") = \"{first}\"\n\nput acct/a 90\nput acct/b \"1 10\"\n\nget acct/a\n"
    );
    let out = txn(transfer.clone());
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(stdout(&out), "SUCCESS\n\nOK\n\nOK\n");
    assert_eq!(
        client.get(b"acct/b", &o).await.unwrap().as_deref(),
        Some(&b"1 10"[..])
    );
    // The same again: acct/a moved on, so the failure branch reads it.
    let out = txn(transfer);
    assert_eq!(stdout(&out), "FAILURE\n\nacct/a\n90\n");
    let out = txn("size(\"acct/a\") = \"1\"\n".into());
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("bad compare"));

    let old = kiwi(&cluster, &["get", "acct/a", "--rev", &first.to_string()]);
    assert_eq!(stdout(&old), "100\n");
    let then = kiwi(
        &cluster,
        &["scan", "--prefix", "acct/", "--rev", &first.to_string()],
    );
    assert_eq!(stdout(&then), "acct/a\t100\n", "acct/b did not exist yet");
    let now = client.get_kv(b"acct/a", 0, &o).await.unwrap().unwrap();
    let compact = kiwi(&cluster, &["compact", &now.mod_revision.to_string()]);
    assert!(compact.status.success(), "{compact:?}");
    let refused = kiwi(&cluster, &["get", "acct/a", "--rev", &first.to_string()]);
    assert!(!refused.status.success());
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("compacted"),
        "{refused:?}"
    );
}

/// `[watch] history_retention_revisions`: the leader compacts the history by itself, so a read at an
/// old revision is refused as compacted once the history moved past it, while recent ones are served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_leader_compacts_the_history_to_its_retention() {
    let cluster = Cluster::start(ClusterOptions {
        extra_config: "\n[watch]\nhistory_retention_revisions = 20\n".into(),
        ..ClusterOptions::default()
    })
    .await;
    let client = Client::connect(&cluster.endpoints(), ClientOptions::default()).unwrap();
    let o = CallOptions::default();
    let first = client.put(b"k", b"0", &o).await.unwrap();
    let mut last = first;
    for i in 1..60 {
        last = client
            .put(b"k", format!("{i}").as_bytes(), &o)
            .await
            .unwrap();
    }
    // Checked every 10 s on the leader.
    let deadline = Instant::now() + Duration::from_secs(40);
    loop {
        match client.get_kv(b"k", first, &o).await {
            Err(Error::Rpc(s)) if s.code() == tonic::Code::OutOfRange => break,
            Ok(kv) => assert_eq!(kv.unwrap().value, b"0", "the old value until compacted"),
            Err(e) => panic!("{e}"),
        }
        assert!(Instant::now() < deadline, "never compacted");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let recent = client.get_kv(b"k", last - 5, &o).await.unwrap().unwrap();
    assert!(recent.mod_revision <= last - 5);
}

/// Bank transfers as transactions (compare both accounts' mod_revision, then write both) from four
/// clients while readers sum every balance in one Scan, with the leader SIGKILLed half way: the total
/// never changes, and transfers go on after the election.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bank_transfers_as_transactions_keep_the_total_through_a_leader_crash() {
    use kiwi_client::{Compare, KeyRange, ScanOptions, TxnOp, compare, txn_op};
    const ACCOUNTS: u64 = 5;
    const TOTAL: i64 = 500;
    let mut cluster = Cluster::start(ClusterOptions::default()).await;
    let leader = cluster.wait_leader().await;
    let client = std::sync::Arc::new(
        Client::connect(&cluster.endpoints(), ClientOptions::default()).unwrap(),
    );
    let o = CallOptions::default();
    let account = |i: u64| format!("bank/{i}").into_bytes();
    for i in 0..ACCOUNTS {
        client.put(&account(i), b"100", &o).await.unwrap();
    }
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let done = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let mut tasks = Vec::new();
    for t in 0..4u64 {
        let (client, stop, done) = (client.clone(), stop.clone(), done.clone());
        tasks.push(tokio::spawn(async move {
            let o = CallOptions::default();
            let mut n = t;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                n += 1;
                let (from, to) = (account(n % ACCOUNTS), account((n * 7 + 3) % ACCOUNTS));
                if from == to {
                    continue;
                }
                let (Ok(Some(a)), Ok(Some(b))) = (
                    client.get_kv(&from, 0, &o).await,
                    client.get_kv(&to, 0, &o).await,
                ) else {
                    continue;
                };
                let balance = |v: &[u8]| std::str::from_utf8(v).unwrap().parse::<i64>().unwrap();
                let amount = (n % 13) as i64;
                let unchanged = |kv: &kiwi_client::KeyValue| Compare {
                    result: compare::CompareResult::Equal as i32,
                    target: compare::CompareTarget::Mod as i32,
                    key: kv.key.clone(),
                    target_union: Some(compare::TargetUnion::ModRevision(kv.mod_revision)),
                    range_end: Vec::new(),
                };
                let set = |key: &[u8], v: i64| TxnOp {
                    op: Some(txn_op::Op::Put(txn_op::Put {
                        key: key.to_vec(),
                        value: v.to_string().into_bytes(),
                        prev_kv: false,
                        lease: 0,
                    })),
                };
                let ops = vec![
                    set(&from, balance(&a.value) - amount),
                    set(&to, balance(&b.value) + amount),
                ];
                // An unknown outcome (the leader died under it) applied both writes or neither.
                if let Ok(r) = client
                    .txn(vec![unchanged(&a), unchanged(&b)], ops, vec![], &o)
                    .await
                    && r.succeeded
                {
                    done.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
            }
        }));
    }
    let sum = || async {
        let page = client
            .scan_range(
                &KeyRange::Prefix(b"bank/".to_vec()),
                &ScanOptions {
                    limit: 100,
                    ..ScanOptions::default()
                },
                &CallOptions::default(),
            )
            .await?;
        Ok::<i64, Error>(
            page.kvs
                .iter()
                .map(|(_, v)| std::str::from_utf8(v).unwrap().parse::<i64>().unwrap())
                .sum(),
        )
    };
    let mut sums = 0;
    let until = |d: u64| Instant::now() + Duration::from_secs(d);
    let mut phase_end = until(2);
    let mut killed = false;
    let mut before_kill = 0;
    loop {
        if let Ok(total) = sum().await {
            assert_eq!(total, TOTAL, "a reader saw money appear or vanish");
            sums += 1;
        }
        if Instant::now() >= phase_end {
            if killed {
                break;
            }
            before_kill = done.load(std::sync::atomic::Ordering::Relaxed);
            cluster.kill(leader);
            killed = true;
            phase_end = until(4);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for t in tasks {
        t.await.unwrap();
    }
    let after = done.load(std::sync::atomic::Ordering::Relaxed);
    assert!(before_kill > 0, "transfers ran before the crash");
    assert!(after > before_kill, "transfers went on after the election");
    assert!(sums > 20, "the readers read ({sums} sums)");
    assert_eq!(sum().await.unwrap(), TOTAL);
}

/// The events of one transaction arrive together, in one answer, at one revision.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transactions_events_arrive_together() {
    use kiwi_client::{KeyRange, TxnOp, WatchUpdate, txn_op};
    let cluster = Cluster::start(ClusterOptions::default()).await;
    let client = Client::connect(&cluster.endpoints(), ClientOptions::default()).unwrap();
    let o = CallOptions::default();
    let before = client.put(b"t/0", b"x", &o).await.unwrap();
    let put = |k: &str| TxnOp {
        op: Some(txn_op::Op::Put(txn_op::Put {
            key: k.as_bytes().to_vec(),
            value: b"v".to_vec(),
            prev_kv: false,
            lease: 0,
        })),
    };
    let delete = TxnOp {
        op: Some(txn_op::Op::DeleteRange(txn_op::DeleteRange {
            key: b"t/0".to_vec(),
            range_end: Vec::new(),
            prev_kv: false,
        })),
    };
    let answer = client
        .txn(
            vec![],
            vec![put("t/1"), put("t/2"), delete, put("t/3")],
            vec![],
            &o,
        )
        .await
        .unwrap();
    let rev = answer.header.unwrap().revision;
    let mut watcher = client.watch(&KeyRange::Prefix(b"t/".to_vec()), before + 1, false);
    let update = tokio::time::timeout(Duration::from_secs(30), watcher.next())
        .await
        .unwrap()
        .unwrap();
    let WatchUpdate::Events(events) = update else {
        panic!("{update:?}")
    };
    let got: Vec<_> = events
        .iter()
        .map(|e| {
            let kv = e.kv.as_ref().unwrap();
            (
                String::from_utf8_lossy(&kv.key).into_owned(),
                kv.mod_revision,
                e.r#type,
            )
        })
        .collect();
    let (put_t, del_t) = (
        kiwi_client::key_event::EventType::Put as i32,
        kiwi_client::key_event::EventType::Delete as i32,
    );
    assert_eq!(
        got,
        [
            ("t/1".to_string(), rev, put_t),
            ("t/2".to_string(), rev, put_t),
            ("t/0".to_string(), rev, del_t),
            ("t/3".to_string(), rev, put_t),
        ],
        "the whole transaction in one answer, in its order"
    );
}

/// `[watch] history_retention_sec`: the leader drops writes older than the retention by itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_leader_compacts_the_history_by_age() {
    let cluster = Cluster::start(ClusterOptions {
        extra_config: "\n[watch]\nhistory_retention_revisions = 0\nhistory_retention_sec = 2\n"
            .into(),
        ..ClusterOptions::default()
    })
    .await;
    let client = Client::connect(&cluster.endpoints(), ClientOptions::default()).unwrap();
    let o = CallOptions::default();
    // Taken before the write: the compaction that drops it comes at least 2 s after this.
    let written = Instant::now();
    let first = client.put(b"k", b"old", &o).await.unwrap();
    client.put(b"k", b"new", &o).await.unwrap();
    let deadline = written + Duration::from_secs(30);
    loop {
        match client.get_kv(b"k", first, &o).await {
            Err(Error::Rpc(s)) if s.code() == tonic::Code::OutOfRange => break,
            Ok(kv) => assert_eq!(kv.unwrap().value, b"old"),
            Err(e) => panic!("{e}"),
        }
        assert!(Instant::now() < deadline, "never compacted");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        written.elapsed() >= Duration::from_secs(2),
        "not before the writes were 2 s old ({:?})",
        written.elapsed()
    );
}

/// etcd's own command-line tool against the playground's etcd ports: every command checked by its
/// output. Needs Debian's `etcd-client` (`make deps`).
#[test]
fn etcdctl_works_against_the_etcd_api() {
    let _serial = kiwi_tests::cluster::serial();
    let dir = tempfile::tempdir().unwrap();
    let mut pg = Playground::start(&dir.path().join("pg"), &["--no-control"]);
    let endpoints = pg
        .lines
        .iter()
        .find_map(|l| l.split("ETCDCTL_ENDPOINTS=").nth(1))
        .expect("the playground printed ETCDCTL_ENDPOINTS")
        .trim()
        .to_string();
    assert!(
        pg.lines.iter().any(|l| l.contains("export ETCDCTL_API=3 ")),
        "{:?}",
        pg.lines
    );
    let etcdctl = |args: &[&str], input: Option<&str>| {
        let mut c = Command::new("etcdctl");
        c.args(args)
            .env("ETCDCTL_API", "3")
            .env("ETCDCTL_ENDPOINTS", &endpoints)
            .env("ETCDCTL_DIAL_TIMEOUT", "5s")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = c
            .spawn()
            .expect("etcdctl (Debian's etcd-client; make deps installs it)");
        if let Some(i) = input {
            use std::io::Write as _;
            child.stdin.take().unwrap().write_all(i.as_bytes()).unwrap();
        }
        drop(child.stdin.take());
        child.wait_with_output().unwrap()
    };
    let ok = |args: &[&str]| {
        let o = etcdctl(args, None);
        assert!(o.status.success(), "etcdctl {args:?}: {o:?}");
        stdout(&o)
    };

    // KV: put, get (prefix, keys only, limit, sort, revision), del (prev kv, prefix).
    assert_eq!(ok(&["put", "foo", "bar"]), "OK\n");
    assert_eq!(ok(&["get", "foo"]), "foo\nbar\n");
    let first: serde_json::Value =
        serde_json::from_str(&ok(&["get", "foo", "-w", "json"])).unwrap();
    let rev1 = first["kvs"][0]["mod_revision"].as_i64().unwrap();
    assert_eq!(ok(&["put", "foo", "baz"]), "OK\n");
    assert_eq!(
        ok(&["get", "foo", "--rev", &rev1.to_string()]),
        "foo\nbar\n"
    );
    for k in ["p/a", "p/b", "p/c"] {
        ok(&["put", k, &format!("v-{k}")]);
    }
    assert_eq!(
        ok(&["get", "p/", "--prefix", "--keys-only"]),
        "p/a\n\np/b\n\np/c\n\n"
    );
    assert_eq!(
        ok(&["get", "p/", "--prefix", "--limit", "1"]),
        "p/a\nv-p/a\n"
    );
    assert_eq!(
        ok(&[
            "get",
            "p/",
            "--prefix",
            "--sort-by",
            "CREATE",
            "--order",
            "DESCEND",
            "--keys-only"
        ]),
        "p/c\n\np/b\n\np/a\n\n"
    );
    let limited: serde_json::Value = serde_json::from_str(&ok(&[
        "get", "p/", "--prefix", "--limit", "1", "-w", "json",
    ]))
    .unwrap();
    assert_eq!(
        (limited["count"].as_i64(), limited["more"].as_bool()),
        (Some(3), Some(true))
    );
    assert_eq!(ok(&["del", "p/a", "--prev-kv"]), "1\np/a\nv-p/a\n");
    assert_eq!(ok(&["del", "p/", "--prefix"]), "2\n");

    // A transaction from stdin: compares, then success ops, then failure ops.
    let txn = etcdctl(
        &["txn"],
        Some("value(\"foo\") = \"baz\"\n\nput foo qux\nget foo\n\nput foo nope\n\n"),
    );
    assert!(txn.status.success(), "{txn:?}");
    assert_eq!(stdout(&txn), "SUCCESS\n\nOK\n\nfoo\nqux\n");

    // Watch in the background while writes go on.
    let mut watch = Command::new("etcdctl")
        .args(["watch", "w/", "--prefix", "--prev-kv"])
        .env("ETCDCTL_API", "3")
        .env("ETCDCTL_ENDPOINTS", &endpoints)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut seen = BufReader::new(watch.stdout.take().unwrap()).lines();
    std::thread::sleep(Duration::from_millis(500));
    ok(&["put", "w/1", "one"]);
    ok(&["put", "w/1", "two"]);
    ok(&["del", "w/1"]);
    // Each event: its type, the previous pair (key, value) when there was one, then the pair.
    let got: Vec<String> = (0..13).map(|_| seen.next().unwrap().unwrap()).collect();
    assert_eq!(
        got,
        [
            "PUT", "w/1", "one", "PUT", "w/1", "one", "w/1", "two", "DELETE", "w/1", "two", "w/1",
            ""
        ],
        "{got:?}"
    );
    watch.kill().unwrap();
    watch.wait().unwrap();

    // Leases.
    let granted = ok(&["lease", "grant", "60"]);
    let id = granted.split_whitespace().nth(1).unwrap().to_string();
    assert!(granted.ends_with("granted with TTL(60s)\n"), "{granted}");
    assert_eq!(ok(&["put", "svc/a", "up", "--lease", &id]), "OK\n");
    let ttl = ok(&["lease", "timetolive", &id, "--keys"]);
    assert!(
        ttl.contains("granted with TTL(60s)") && ttl.contains("attached keys([svc/a])"),
        "{ttl}"
    );
    assert!(ok(&["lease", "list"]).contains(&id));
    assert!(ok(&["lease", "keep-alive", "--once", &id]).contains("keepalived with TTL(60)"));
    assert!(ok(&["lease", "revoke", &id]).contains("revoked"));
    assert_eq!(ok(&["get", "svc/a"]), "");
    assert!(ok(&["lease", "timetolive", &id]).contains("already expired"));

    // etcdctl's own lock (etcd's concurrency package on Kiwi's leases, transactions and watches): two
    // holders never overlap.
    let log = dir.path().join("lock.log");
    let script = format!("echo start >> {0}; sleep 1; echo end >> {0}", log.display());
    let spawn_lock = || {
        Command::new("etcdctl")
            .args(["lock", "mylock", "--", "sh", "-c", &script])
            .env("ETCDCTL_API", "3")
            .env("ETCDCTL_ENDPOINTS", &endpoints)
            .stdout(Stdio::null())
            .spawn()
            .unwrap()
    };
    let (mut a, mut b) = (spawn_lock(), spawn_lock());
    assert!(a.wait().unwrap().success());
    assert!(b.wait().unwrap().success());
    assert_eq!(
        std::fs::read_to_string(&log).unwrap(),
        "start\nend\nstart\nend\n"
    );

    // etcdctl elect: the second candidate leads once the first one's process is stopped (SIGINT: it
    // closes its session; etcdctl 3.4's session TTL is 60 s, so a SIGKILL would hand over in a minute).
    let spawn_elect = |value: &str| {
        Command::new("etcdctl")
            .args(["elect", "myelection", value])
            .env("ETCDCTL_API", "3")
            .env("ETCDCTL_ENDPOINTS", &endpoints)
            .stdout(Stdio::piped())
            .spawn()
            .unwrap()
    };
    let mut e1 = spawn_elect("one");
    let mut e1_out = BufReader::new(e1.stdout.take().unwrap()).lines();
    assert!(e1_out.next().unwrap().unwrap().starts_with("myelection/"));
    assert_eq!(e1_out.next().unwrap().unwrap(), "one");
    let mut e2 = spawn_elect("two");
    Command::new("kill")
        .args(["-INT", &e1.id().to_string()])
        .status()
        .unwrap();
    e1.wait().unwrap();
    let mut e2_out = BufReader::new(e2.stdout.take().unwrap()).lines();
    assert!(e2_out.next().unwrap().unwrap().starts_with("myelection/"));
    assert_eq!(e2_out.next().unwrap().unwrap(), "two");
    e2.kill().unwrap();
    e2.wait().unwrap();

    // Members and status.
    let members = ok(&["member", "list"]);
    assert_eq!(members.lines().count(), 3, "{members}");
    assert!(members.contains("node-1"), "{members}");
    let status = ok(&["endpoint", "status", "-w", "json"]);
    let status: serde_json::Value = serde_json::from_str(&status).unwrap();
    assert_eq!(status[0]["Status"]["version"], "3.4.0", "{status}");
    assert!(status[0]["Status"]["leader"].as_u64().unwrap() > 0);
    // etcdctl 3.4 prints health to stderr.
    let health = etcdctl(&["endpoint", "health"], None);
    assert!(health.status.success(), "{health:?}");
    assert_eq!(
        String::from_utf8_lossy(&health.stderr)
            .matches("is healthy")
            .count(),
        3,
        "{health:?}"
    );

    // No alarms; every member hashes its keys at one revision alike; leadership moves on request.
    assert_eq!(ok(&["alarm", "list"]), "");
    let head: serde_json::Value = serde_json::from_str(&ok(&["get", "foo", "-w", "json"])).unwrap();
    let rev = head["header"]["revision"].as_i64().unwrap().to_string();
    let deadline = Instant::now() + Duration::from_secs(10);
    let hashes = loop {
        let o = etcdctl(&["endpoint", "hashkv", "--rev", &rev, "-w", "json"], None);
        if o.status.success() {
            let v: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
            break v;
        }
        // A follower that has not applied `rev` yet answers "future revision": ask again.
        assert!(Instant::now() < deadline, "{o:?}");
        std::thread::sleep(Duration::from_millis(100));
    };
    let hashes: Vec<u64> = hashes
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["HashKV"]["hash"].as_u64().unwrap())
        .collect();
    assert_eq!(hashes.len(), 3);
    assert!(hashes.iter().all(|h| *h == hashes[0]), "{hashes:?}");
    let leader = status[0]["Status"]["leader"].as_u64().unwrap();
    let to = (1..=3).find(|id| *id != leader).unwrap();
    let moved = ok(&["move-leader", &format!("{to:x}")]);
    assert!(moved.contains("Leadership transferred"), "{moved}");
    let after: serde_json::Value =
        serde_json::from_str(&ok(&["endpoint", "status", "-w", "json"])).unwrap();
    assert_eq!(after[0]["Status"]["leader"].as_u64(), Some(to), "{after}");

    // `snapshot save` stores Kiwi's backup (etcdctl wants one endpoint), which `kiwi snapshot status`
    // checks; `defrag` compacts every member's storage engine.
    let first = endpoints.split(',').next().unwrap().to_string();
    let file = dir.path().join("etcd.snapshot");
    let saved = Command::new("etcdctl")
        .args(["snapshot", "save", file.to_str().unwrap()])
        .env("ETCDCTL_API", "3")
        .env("ETCDCTL_ENDPOINTS", &first)
        .output()
        .unwrap();
    assert!(saved.status.success(), "{saved:?}");
    assert!(stdout(&saved).contains("Snapshot saved at"), "{saved:?}");
    let st = Command::new(env!("CARGO_BIN_EXE_kiwi"))
        .args(["snapshot", "status", file.to_str().unwrap(), "--json"])
        .output()
        .unwrap();
    assert!(st.status.success(), "{st:?}");
    let st: serde_json::Value = serde_json::from_slice(&st.stdout).unwrap();
    let keys = ok(&["get", "", "--from-key", "--keys-only", "-w", "json"]);
    let keys: serde_json::Value = serde_json::from_str(&keys).unwrap();
    assert_eq!(st["keys"], keys["count"], "{st} vs {keys}");
    let defrag = ok(&["defrag"]);
    assert_eq!(
        defrag.matches("Finished defragmenting etcd member").count(),
        3,
        "{defrag}"
    );

    // Compaction, and a read below it gets etcd's "compacted" error.
    let head: serde_json::Value = serde_json::from_str(&ok(&["get", "foo", "-w", "json"])).unwrap();
    let now = head["header"]["revision"].as_i64().unwrap();
    assert!(ok(&["compaction", &now.to_string()]).contains(&format!("compacted revision {now}")));
    let old = etcdctl(&["get", "foo", "--rev", &rev1.to_string()], None);
    assert!(!old.status.success());
    assert!(
        String::from_utf8_lossy(&old.stderr).contains("required revision has been compacted"),
        "{old:?}"
    );

    // The leader's process is SIGKILLed: with every member among its endpoints, etcdctl keeps working
    // (a command during the election may fail; each write is tried again until it is acknowledged).
    let st: serde_json::Value =
        serde_json::from_str(&ok(&["endpoint", "status", "-w", "json"])).unwrap();
    let leader = st[0]["Status"]["leader"].as_u64().unwrap();
    let pid = Command::new("pgrep")
        .arg("-f")
        .arg(format!(
            "{}/node-{leader}/",
            dir.path().join("pg").display()
        ))
        .output()
        .unwrap();
    let pid = String::from_utf8_lossy(&pid.stdout).trim().to_string();
    assert!(!pid.is_empty(), "the leader's process");
    Command::new("kill").args(["-9", &pid]).status().unwrap();
    for i in 0..5 {
        let value = format!("after-kill-{i}");
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let o = etcdctl(&["put", "k/failover", &value], None);
            if o.status.success() {
                break;
            }
            assert!(Instant::now() < deadline, "put {i} never succeeded: {o:?}");
            std::thread::sleep(Duration::from_millis(200));
        }
        assert_eq!(
            ok(&["get", "k/failover", "--print-value-only"]),
            format!("{value}\n")
        );
    }
    // The dead member is removed through the etcd API (a follower passes it to the leader).
    let removed = ok(&["member", "remove", &format!("{leader:x}")]);
    assert!(removed.contains("removed from cluster"), "{removed}");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let members = ok(&["member", "list"]);
        if members.lines().count() == 2 {
            assert!(!members.contains(&format!("node-{leader},")), "{members}");
            break;
        }
        assert!(Instant::now() < deadline, "{members}");
        std::thread::sleep(Duration::from_millis(200));
    }

    Command::new("kill")
        .args(["-INT", &pg.child.id().to_string()])
        .status()
        .unwrap();
    assert!(pg.child.wait().unwrap().success());
}

/// The playground's `ETCDCTL_ENDPOINTS`.
fn etcd_endpoints(pg: &Playground) -> String {
    pg.exports()
        .into_iter()
        .find_map(|(k, v)| (k == "ETCDCTL_API").then_some(v))
        .and_then(|v| v.split("ETCDCTL_ENDPOINTS=").nth(1).map(str::to_owned))
        .expect("the playground printed ETCDCTL_ENDPOINTS")
}

fn etcdctl_at(endpoints: &str, args: &[&str]) -> Output {
    Command::new("etcdctl")
        .args(args)
        .env("ETCDCTL_API", "3")
        .env("ETCDCTL_ENDPOINTS", endpoints)
        .env("ETCDCTL_DIAL_TIMEOUT", "5s")
        .output()
        .expect("etcdctl (Debian's etcd-client; make deps installs it)")
}

/// `etcdctl make-mirror` copies a prefix from one Kiwi cluster to another, following puts and
/// deletes as they happen; `etcdctl check perf` runs its 60-second load and gives its verdict; meanwhile
/// an `etcdctl elect` leader is SIGKILLed and the waiting candidate takes over once its lease expires.
#[test]
fn etcdctl_make_mirror_and_check_perf() {
    let _serial = kiwi_tests::cluster::serial();
    let dir = tempfile::tempdir().unwrap();
    let mut source = Playground::start(&dir.path().join("a"), &["--no-control"]);
    let mut dest = Playground::start(&dir.path().join("b"), &["--no-control", "--nodes", "1"]);
    let (from, to) = (etcd_endpoints(&source), etcd_endpoints(&dest));
    let ok = |endpoints: &str, args: &[&str]| {
        let o = etcdctl_at(endpoints, args);
        assert!(o.status.success(), "etcdctl {args:?}: {o:?}");
        stdout(&o)
    };
    for i in 0..3 {
        ok(&from, &["put", &format!("m/{i}"), &format!("v{i}")]);
    }
    ok(&from, &["put", "other", "not mirrored"]);
    let to_first = to.split(',').next().unwrap().to_string();
    let mut mirror = Command::new("etcdctl")
        .args(["make-mirror", "--prefix", "m/", &to_first])
        .env("ETCDCTL_API", "3")
        .env("ETCDCTL_ENDPOINTS", &from)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // What is there is copied, then what follows.
    let want = "m/0\nv0\nm/2\nv2\nm/3\nv3\n";
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut wrote = false;
    loop {
        let got = ok(&to, &["get", "m/", "--prefix"]);
        if got == "m/0\nv0\nm/1\nv1\nm/2\nv2\n" && !wrote {
            ok(&from, &["put", "m/3", "v3"]);
            ok(&from, &["del", "m/1"]);
            wrote = true;
        }
        if got == want {
            break;
        }
        assert!(Instant::now() < deadline, "the mirror holds {got:?}");
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(ok(&to, &["get", "other"]), "");
    mirror.kill().unwrap();
    mirror.wait().unwrap();

    // `etcdctl elect` hands over when the leader's process is SIGKILLed: its session's lease (etcdctl's
    // fixed 60 s) expires and the waiting candidate is elected. The minute passes during `check perf`.
    let spawn_elect = |value: &str| {
        let mut child = Command::new("etcdctl")
            .args(["elect", "handover", value])
            .env("ETCDCTL_API", "3")
            .env("ETCDCTL_ENDPOINTS", &from)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let out = child.stdout.take().unwrap();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    return;
                }
            }
        });
        (child, rx)
    };
    let (mut first, first_out) = spawn_elect("first");
    let wait_for = |rx: &std::sync::mpsc::Receiver<String>, want: &str, within: Duration| {
        let deadline = Instant::now() + within;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(line) if line == want => return,
                Ok(_) => {}
                Err(e) => panic!("etcdctl elect never printed {want:?}: {e}"),
            }
        }
    };
    wait_for(&first_out, "first", Duration::from_secs(10));
    let (mut second, second_out) = spawn_elect("second");
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        second_out
            .try_recv()
            .map_or(true, |l| l.starts_with("handover/")),
        "the second candidate was elected while the first led"
    );
    first.kill().unwrap();
    first.wait().unwrap();
    let killed = Instant::now();

    let perf = etcdctl_at(&from, &["check", "perf", "--load", "s"]);
    let out = stdout(&perf);
    assert!(out.contains("Throughput is"), "{perf:?}");
    assert!(out.contains("Slowest request took"), "{perf:?}");
    let verdict = out.lines().last().unwrap_or_default();
    assert!(verdict == "PASS" || verdict == "FAIL", "{perf:?}");
    wait_for(
        &second_out,
        "second",
        Duration::from_secs(90).saturating_sub(killed.elapsed()),
    );
    second.kill().unwrap();
    second.wait().unwrap();

    for pg in [&mut source, &mut dest] {
        Command::new("kill")
            .args(["-INT", &pg.child.id().to_string()])
            .status()
            .unwrap();
        assert!(pg.child.wait().unwrap().success());
    }
}

/// etcd's membership calls through etcdctl: `member add --learner` (Kiwi picks the next id), the node
/// started with that id joins, `member promote` makes it a voter; `member add` of a voter is refused
/// with the way to do it; `member list` gives every member's etcd URL, so `--cluster` commands reach
/// them all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcdctl_adds_promotes_and_lists_members() {
    let mut cluster = kiwi_tests::cluster::Cluster::start(kiwi_tests::cluster::ClusterOptions {
        etcd_ports: true,
        ..kiwi_tests::cluster::ClusterOptions::default()
    })
    .await;
    let endpoints = cluster
        .ids()
        .into_iter()
        .map(|id| cluster.etcd_addr(id).unwrap().to_string())
        .collect::<Vec<_>>()
        .join(",");
    let run = |args: &[&str]| etcdctl_at(&endpoints, args);
    let ok = |args: &[&str]| {
        let o = run(args);
        assert!(o.status.success(), "etcdctl {args:?}: {o:?}");
        stdout(&o)
    };

    let list: serde_json::Value =
        serde_json::from_str(&ok(&["member", "list", "-w", "json"])).unwrap();
    let members = list["members"].as_array().unwrap();
    assert_eq!(members.len(), 3, "{list}");
    for m in members {
        let url = m["clientURLs"][0].as_str().unwrap_or_default();
        assert!(endpoints.contains(url) && !url.is_empty(), "{m}");
    }
    let hashes = ok(&["endpoint", "hashkv", "--cluster", "-w", "json"]);
    let hashes: serde_json::Value = serde_json::from_str(&hashes).unwrap();
    assert_eq!(hashes.as_array().unwrap().len(), 3, "{hashes}");

    ok(&["put", "before-join", "1"]);
    let voter = run(&[
        "member",
        "add",
        "node-9",
        "--peer-urls",
        "http://127.0.0.1:1",
    ]);
    assert!(!voter.status.success());
    assert!(
        String::from_utf8_lossy(&voter.stderr).contains("--learner"),
        "{voter:?}"
    );

    let id = cluster.spawn_joining_node();
    let addr = cluster.addr(id);
    let added = ok(&[
        "member",
        "add",
        "node-4",
        "--peer-urls",
        &format!("http://{addr}"),
        "--learner",
    ]);
    assert!(
        added.contains(&format!("Member {id:16x} added"))
            || added.contains(&format!("Member {id:x} added")),
        "{added}"
    );
    let promoted = ok(&["member", "promote", &format!("{id:x}")]);
    assert!(promoted.contains("promoted"), "{promoted}");
    let status = cluster.status(cluster.wait_leader().await).await.unwrap();
    assert!(status.voters.contains(&id), "{status:?}");
    // The new member has the data and serves etcd's API, listed by the others.
    let list: serde_json::Value =
        serde_json::from_str(&ok(&["member", "list", "-w", "json"])).unwrap();
    let new = list["members"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["ID"].as_u64() == Some(id))
        .cloned()
        .unwrap_or_default();
    assert_eq!(new["ID"].as_u64(), Some(id), "{list}");
    assert!(!new["isLearner"].as_bool().unwrap_or(false), "{list}");
    let url = new["clientURLs"][0]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert_eq!(url, cluster.etcd_addr(id).unwrap().to_string(), "{list}");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let o = etcdctl_at(
            &url,
            &[
                "get",
                "before-join",
                "--print-value-only",
                "--consistency",
                "s",
            ],
        );
        if stdout(&o) == "1\n" {
            break;
        }
        assert!(Instant::now() < deadline, "{o:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Every `NAME=value` of every `export` line the playground printed (several per line).
fn all_exports(pg: &Playground) -> Vec<(String, String)> {
    pg.lines
        .iter()
        .filter_map(|l| l.trim().strip_prefix("export "))
        .flat_map(|l| l.split_whitespace())
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// etcdctl against `kiwi playground --secure`: TLS with the cluster CA, a principal and its token as
/// etcd's user and password (the playground prints the exports), roles as on the client port (a read
/// token cannot write), followers passing writes and keepalives to the leader with the caller's token,
/// clear refusals without a token, with a wrong one, and for etcd's user management.
#[test]
fn etcdctl_with_tls_and_tokens() {
    let _serial = kiwi_tests::cluster::serial();
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("pg");
    let mut pg = Playground::start(&data, &["--secure", "--no-metrics", "--no-control"]);
    let env = all_exports(&pg);
    let var = |k: &str| {
        env.iter()
            .find(|(n, _)| n == k)
            .map(|(_, v)| v.clone())
            .unwrap_or_else(|| panic!("the playground exports {k}: {:?}", pg.lines))
    };
    let (endpoints, ca, user) = (
        var("ETCDCTL_ENDPOINTS"),
        var("ETCDCTL_CACERT"),
        var("ETCDCTL_USER"),
    );
    let etcdctl = |endpoints: &str, user: Option<&str>, args: &[&str]| {
        let mut c = Command::new("etcdctl");
        c.args(args)
            .env("ETCDCTL_API", "3")
            .env("ETCDCTL_ENDPOINTS", endpoints)
            .env("ETCDCTL_CACERT", &ca)
            .env("ETCDCTL_DIAL_TIMEOUT", "5s");
        if let Some(u) = user {
            c.env("ETCDCTL_USER", u);
        }
        c.output().unwrap()
    };
    let ok = |endpoints: &str, user: Option<&str>, args: &[&str]| {
        let o = etcdctl(endpoints, user, args);
        assert!(o.status.success(), "etcdctl {args:?}: {o:?}");
        stdout(&o)
    };
    let stderr = |o: &Output| String::from_utf8_lossy(&o.stderr).into_owned();

    // Through each member in turn: followers pass writes to the leader as the caller.
    for (i, ep) in endpoints.split(',').enumerate() {
        assert_eq!(
            ok(ep, Some(&user), &["put", &format!("s/{i}"), "v"]),
            "OK\n"
        );
        let lease = ok(ep, Some(&user), &["lease", "grant", "60"]);
        let id = lease.split_whitespace().nth(1).unwrap().to_string();
        let kept = ok(ep, Some(&user), &["lease", "keep-alive", "--once", &id]);
        assert!(kept.contains("keepalived with TTL"), "{kept}");
    }
    assert_eq!(
        ok(
            &endpoints,
            Some(&user),
            &["get", "s/", "--prefix", "--keys-only"]
        ),
        "s/0\n\ns/1\n\ns/2\n\n"
    );
    // `--cluster` lists the members before logging in: every member is reached.
    let status = ok(
        &endpoints,
        Some(&user),
        &["endpoint", "status", "--cluster", "-w", "json"],
    );
    let status: serde_json::Value = serde_json::from_str(&status).unwrap();
    assert_eq!(status.as_array().unwrap().len(), 3, "{status}");

    // The rest of the etcdctl suite over TLS with the token: a watch while writes go on, a
    // transaction from stdin, a range delete with the previous pairs, compaction, a lock, the member
    // list, a snapshot and defragmentation.
    let mut watch = Command::new("etcdctl")
        .args(["watch", "--prefix", "w/"])
        .env("ETCDCTL_API", "3")
        .env("ETCDCTL_ENDPOINTS", &endpoints)
        .env("ETCDCTL_CACERT", &ca)
        .env("ETCDCTL_USER", &user)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let (tx, watched) = std::sync::mpsc::channel();
    let out = watch.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    let deadline = Instant::now() + Duration::from_secs(15);
    let mut seen = Vec::new();
    let mut n = 0;
    while !seen.iter().any(|l: &String| l == "w/last") {
        ok(&endpoints, Some(&user), &["put", &format!("w/{n}"), "x"]);
        ok(&endpoints, Some(&user), &["put", "w/last", "x"]);
        n += 1;
        while let Ok(l) = watched.recv_timeout(Duration::from_millis(200)) {
            seen.push(l);
        }
        assert!(Instant::now() < deadline, "the watch saw {seen:?}");
    }
    watch.kill().unwrap();
    watch.wait().unwrap();
    let mut txn = Command::new("etcdctl")
        .args(["txn"])
        .env("ETCDCTL_API", "3")
        .env("ETCDCTL_ENDPOINTS", &endpoints)
        .env("ETCDCTL_CACERT", &ca)
        .env("ETCDCTL_USER", &user)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    {
        use std::io::Write as _;
        txn.stdin
            .take()
            .unwrap()
            .write_all(b"value(\"s/0\") = \"v\"\n\nput s/0 \"txn\"\n\nput s/0 \"no\"\n\n")
            .unwrap();
    }
    let txn = txn.wait_with_output().unwrap();
    assert!(stdout(&txn).starts_with("SUCCESS"), "{txn:?}");
    let deleted = ok(
        &endpoints,
        Some(&user),
        &["del", "--prefix", "--prev-kv", "s/"],
    );
    assert!(deleted.starts_with("3\ns/0\ntxn\n"), "{deleted}");
    let head: serde_json::Value = serde_json::from_str(&ok(
        &endpoints,
        Some(&user),
        &["get", "w/last", "-w", "json"],
    ))
    .unwrap();
    let rev = head["header"]["revision"].as_i64().unwrap().to_string();
    assert!(ok(&endpoints, Some(&user), &["compaction", &rev]).contains("compacted revision"));
    let locked = ok(
        &endpoints,
        Some(&user),
        &["lock", "tls-lock", "echo", "held"],
    );
    assert!(locked.contains("held"), "{locked}");
    assert_eq!(
        ok(&endpoints, Some(&user), &["member", "list"])
            .lines()
            .count(),
        3
    );
    let first = endpoints.split(',').next().unwrap();
    let snap = dir.path().join("tls.snapshot");
    let saved = ok(
        first,
        Some(&user),
        &["snapshot", "save", snap.to_str().unwrap()],
    );
    assert!(saved.contains("Snapshot saved at"), "{saved}");
    let defrag = ok(&endpoints, Some(&user), &["defrag"]);
    assert_eq!(
        defrag.matches("Finished defragmenting").count(),
        3,
        "{defrag}"
    );
    ok(&endpoints, Some(&user), &["put", "s/0", "v"]);

    let none = etcdctl(&endpoints, None, &["get", "s/0"]);
    assert!(!none.status.success());
    assert!(stderr(&none).contains("--user NAME:TOKEN"), "{none:?}");
    let wrong = etcdctl(
        &endpoints,
        Some("playground:not-the-token"),
        &["get", "s/0"],
    );
    assert!(!wrong.status.success());
    assert!(
        stderr(&wrong).contains("authentication failed"),
        "{wrong:?}"
    );
    let users = etcdctl(&endpoints, Some(&user), &["user", "list"]);
    assert!(!users.status.success());
    assert!(stderr(&users).contains("kiwi token new"), "{users:?}");

    // A read-only principal, added to the tokens file and loaded by SIGHUP.
    let made = Command::new(env!("CARGO_BIN_EXE_kiwi"))
        .args(["token", "new", "--principal", "reader", "--role", "read"])
        .output()
        .unwrap();
    assert!(made.status.success(), "{made:?}");
    let made = stdout(&made);
    let token = made
        .lines()
        .find_map(|l| l.strip_prefix("token ")?.split(": ").nth(1))
        .unwrap_or_else(|| panic!("{made}"))
        .trim()
        .to_string();
    let entry: String = made
        .lines()
        .skip_while(|l| !l.starts_with("[[token]]"))
        .map(|l| format!("{l}\n"))
        .collect();
    let tokens = data.join("secrets").join("tokens.toml");
    let mut all = std::fs::read_to_string(&tokens).unwrap();
    all.push('\n');
    all.push_str(&entry);
    std::fs::write(&tokens, all).unwrap();
    Command::new("pkill")
        .args(["-HUP", "-f", &format!("{}/node-", data.display())])
        .status()
        .unwrap();
    let reader = format!("reader:{token}");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let o = etcdctl(
            &endpoints,
            Some(&reader),
            &["get", "s/0", "--print-value-only"],
        );
        if o.status.success() {
            assert_eq!(stdout(&o), "v\n");
            break;
        }
        assert!(Instant::now() < deadline, "the reader never got in: {o:?}");
        std::thread::sleep(Duration::from_millis(200));
    }
    let denied = etcdctl(&endpoints, Some(&reader), &["put", "s/0", "w"]);
    assert!(!denied.status.success());
    assert!(
        stderr(&denied).contains("needs the write role"),
        "{denied:?}"
    );

    Command::new("kill")
        .args(["-INT", &pg.child.id().to_string()])
        .status()
        .unwrap();
    assert!(pg.child.wait().unwrap().success());
}

/// With nothing listening at its endpoints, a command fails at once (not after its deadline) and says
/// what to do.
#[test]
fn cli_without_a_cluster_says_what_to_do() {
    let free = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = free.local_addr().unwrap().to_string();
    drop(free);
    let o = Command::new(env!("CARGO_BIN_EXE_kiwi"))
        .args(["--endpoints", &addr, "--timeout", "120s", "get", "foo"])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2), "{o:?}");
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("cannot connect to any endpoint"), "{err}");
    assert!(err.contains(&addr) && err.contains("make run"), "{err}");
}

/// The web console in a real browser (headless Chromium) against a live playground: three nodes and a
/// leader; a SIGKILLed node turns down; a policy set from the page reaches the nodes; a fault scheduled
/// and cancelled from the page ends.
#[test]
fn the_console_shows_the_cluster_and_changes_it_in_a_browser() {
    let _serial = kiwi_tests::cluster::serial();
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("pg");
    let mut pg = Playground::start(&data, &["--fault-injection"]);
    let console = pg
        .lines
        .iter()
        .find_map(|l| l.split("metrics (every node): ").nth(1))
        .and_then(|u| u.split_whitespace().next())
        .expect("the playground printed the control plane's HTTP address")
        .replace("/metrics", "/ui");
    let kiwi = |args: &[&str]| {
        let mut c = Command::new(env!("CARGO_BIN_EXE_kiwi"));
        for (k, v) in pg.exports() {
            c.env(k, v);
        }
        let o = c.args(args).output().unwrap();
        assert!(o.status.success(), "kiwi {args:?}: {o:?}");
        serde_json::from_slice::<serde_json::Value>(&o.stdout).unwrap_or_default()
    };
    let browser = kiwi_tests::browser::Browser::start();
    browser.goto(&console);
    let wait = Duration::from_secs(20);
    browser.wait_for(
        "three nodes and a leader",
        "return document.querySelectorAll('#nodes tr').length === 3 \
         && document.querySelectorAll('#nodes tr[data-role=leader]').length === 1",
        wait,
    );

    // A node's process is SIGKILLed: its row turns down.
    let leader: u64 = browser
        .eval("return +document.querySelector('#nodes tr[data-role=leader]').id.split('-')[1]")
        .as_u64()
        .unwrap();
    let victim = (1..=3).find(|id| *id != leader).unwrap();
    let pid = Command::new("pgrep")
        .arg("-f")
        .arg(format!("{}/node-{victim}/", data.display()))
        .output()
        .unwrap();
    let pid = String::from_utf8_lossy(&pid.stdout).trim().to_string();
    Command::new("kill").args(["-9", &pid]).status().unwrap();
    browser.wait_for(
        "the killed node down",
        &format!("return document.getElementById('node-{victim}').dataset.state === 'down'"),
        wait,
    );
    browser.wait_for(
        "the event log telling it",
        "return document.getElementById('events').innerText.includes('node_down')",
        wait,
    );

    // Priority scheduling off, from the page: the running nodes get it.
    browser.wait_for(
        "the policy form filled",
        "return document.getElementById('policy-form').w0.value !== ''",
        wait,
    );
    browser.eval(
        "const f = document.getElementById('policy-form'); f.priority.checked = false; \
         document.getElementById('policy-apply').click(); return true",
    );
    browser.wait_for(
        "the policy set",
        "return document.getElementById('policy-result').innerText.includes('set')",
        wait,
    );
    let deadline = Instant::now() + wait;
    loop {
        let rt = kiwi(&["runtime", "--json"]);
        let up: Vec<&serde_json::Value> = rt["nodes"]
            .as_array()
            .map(|n| {
                n.iter()
                    .filter(|n| n["priority_enabled"].is_boolean())
                    .collect()
            })
            .unwrap_or_default();
        if up.len() == 2 && up.iter().all(|n| n["priority_enabled"] == false) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the policy never reached the nodes: {rt}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }

    // A fault scheduled from the page, then cancelled from the page, ends.
    browser.eval(&format!(
        "const f = document.getElementById('fault-form'); f.kind.value = 'delay'; f.node.value = {leader}; \
         f.duration.value = 50; f.amount.value = 20; f.requestSubmit(); return true"
    ));
    let id = browser.wait_for(
        "the fault active",
        "const r = document.querySelector('#faults tr[data-state=active]'); return r ? +r.id.split('-')[1] : 0",
        wait,
    );
    browser.eval(&format!(
        "document.getElementById('cancel-{id}').click(); return true"
    ));
    browser.wait_for(
        "the fault cancelled",
        &format!("return document.getElementById('fault-{id}').dataset.state === 'cancelled'"),
        wait,
    );
    drop(browser);
    Command::new("kill")
        .args(["-INT", &pg.child.id().to_string()])
        .status()
        .unwrap();
    pg.child.wait().unwrap();
}

/// `kiwi scan ... | head`: the CLI ends quietly when its reader goes away, as Unix tools do.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_output_into_a_closed_pipe_ends_quietly() {
    let cluster = Cluster::start(ClusterOptions::default()).await;
    let c = Client::connect(&cluster.endpoints(), ClientOptions::default()).unwrap();
    let value = vec![b'v'; 1024];
    for i in 0..300 {
        c.put(
            format!("pipe/{i:04}").as_bytes(),
            &value,
            &CallOptions::default(),
        )
        .await
        .unwrap();
    }
    let o = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "{} scan --prefix pipe/ --limit 300 | head -c 10",
            env!("CARGO_BIN_EXE_kiwi")
        ))
        .env("KIWI_ENDPOINTS", cluster.endpoints().join(","))
        .output()
        .unwrap();
    assert_eq!(stdout(&o), "pipe/0000\t");
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!err.contains("panicked"), "{err}");
}
