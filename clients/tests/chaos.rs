//! The chaos suite: `kiwi chaos` runs random fault plans (every fault type, the leader targeted often)
//! through a real `kiwi-control` against three real `kiwi-node`s with fault injection enabled, while this
//! test restarts the nodes the plans crash; every run's history must be linearizable.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use kiwi_proto::v1::ClusterStatusRequest;
use kiwi_proto::v1::control_service_client::ControlServiceClient;
use kiwi_tests::cluster::{Cluster, ClusterOptions, node_binary};

/// Random plans run in the suite, and the length of each.
const PLANS: u64 = 10;
const PLAN_LENGTH: &str = "15s";

struct Control(Child);

impl Drop for Control {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_fault_plans_keep_the_history_linearizable() {
    let dir = tempfile::tempdir().unwrap();
    let addr = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let control_bin = node_binary().with_file_name("kiwi-control");
    let _control = Control(
        Command::new(&control_bin)
            .arg("--listen-addr")
            .arg(addr.to_string())
            .arg("--data-dir")
            .arg(dir.path().join("control"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start kiwi-control"),
    );
    let mut cluster = Cluster::start(ClusterOptions {
        extra_config: format!(
            "\n[control]\naddr = \"{addr}\"\nheartbeat_interval_ms = 100\n\n\
             [raft.fault_injection]\nenabled = true\nmax_duration_sec = 60\n"
        ),
        ..ClusterOptions::default()
    })
    .await;
    cluster.wait_leader().await;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(mut c) = ControlServiceClient::connect(format!("http://{addr}")).await
            && let Ok(s) = c.cluster_status(ClusterStatusRequest {}).await
            && s.get_ref().nodes.iter().filter(|n| n.up).count() == 3
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "nodes never linked to the control plane"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let endpoints: Vec<String> = cluster
        .ids()
        .iter()
        .map(|&id| cluster.addr(id).to_string())
        .collect();
    let mut totals = (0u64, 0u64);
    for seed in 1..=PLANS {
        let out = dir.path().join(format!("run-{seed}"));
        let mut chaos = tokio::process::Command::new(env!("CARGO_BIN_EXE_kiwi"))
            .args([
                "--endpoints",
                &endpoints.join(","),
                "chaos",
                "--random",
                "--quiet",
            ])
            .args(["--seed", &seed.to_string(), "--duration", PLAN_LENGTH])
            .args([
                "--control",
                &addr.to_string(),
                "--prefix",
                &format!("s{seed}"),
            ])
            .arg("--out")
            .arg(&out)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        // Crashed nodes come back, as the playground's --restart-crashed does.
        let status = loop {
            tokio::select! {
                s = chaos.wait() => break s.unwrap(),
                () = tokio::time::sleep(Duration::from_millis(200)) => {
                    cluster.restart_exited();
                }
            }
        };
        let output = chaos.wait_with_output().await.unwrap();
        let stdout = String::from_utf8_lossy(&output.stdout);
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(
            status.success() && stdout.contains("verdict: linearizable"),
            "seed {seed}: {status}\n{stdout}\n{stderr}"
        );
        let summary: serde_json::Value =
            serde_json::from_str(stdout.lines().last().unwrap_or("{}")).unwrap();
        let ops = summary["operations"].as_u64().unwrap();
        assert!(ops > 50, "seed {seed}: the workload ran: {summary}");
        totals.0 += ops;
        totals.1 += summary["unknown_outcomes"].as_u64().unwrap();
        assert!(out.join("timeline.svg").exists() && out.join("history.json").exists());
        cluster.restart_exited();
        cluster.wait_leader().await;
    }
    eprintln!(
        "{PLANS} random plans: {} operations checked, {} with unknown outcome, all linearizable",
        totals.0, totals.1
    );
}
