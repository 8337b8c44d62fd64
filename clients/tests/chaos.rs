//! The chaos suite: `kiwi chaos` runs random fault plans (every fault type, the leader targeted often)
//! through a real `kiwi-control` against three real `kiwi-node`s with fault injection enabled, while this
//! test restarts the nodes the plans crash; every run's history (single-key operations, transactions,
//! range deletes, scans, bank transfers) must be linearizable, the bank's total never change, the
//! watchers see exactly the committed writes, and the lockers' critical sections never overlap. A few more plans run
//! with leader-lease reads (`raft.lease_reads`): crashes, pauses, delays and disk stalls of a leader that
//! answers reads from its lease.

use std::process::Stdio;
use std::time::Duration;

use kiwi_tests::cluster::{Cluster, ClusterOptions};
use kiwi_tests::control::{ControlProc, HEARTBEAT_MS, free_addr, up};

/// Random plans run in the suite (and with lease reads), and the length of each.
const PLANS: u64 = 10;
const LEASE_PLANS: u64 = 3;
const PLAN_LENGTH: &str = "15s";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_fault_plans_keep_the_history_linearizable() {
    run_random_plans("", 1..=PLANS).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_fault_plans_with_lease_reads_keep_the_history_linearizable() {
    run_random_plans("lease_reads = true", 101..=100 + LEASE_PLANS).await;
}

/// Runs the random plans of `seeds` against a fresh cluster with `raft_extra` in every node's `[raft]`.
async fn run_random_plans(raft_extra: &str, seeds: std::ops::RangeInclusive<u64>) {
    let plans = seeds.clone().count();
    let dir = tempfile::tempdir().unwrap();
    let addr = free_addr();
    let control = ControlProc::start(addr, &dir.path().join("control"));
    let mut cluster = Cluster::start(ClusterOptions {
        extra_config: format!(
            "\n[control]\naddr = \"{addr}\"\nheartbeat_interval_ms = {HEARTBEAT_MS}\n\n\
             [raft.fault_injection]\nenabled = true\nmax_duration_sec = 60\n"
        ),
        raft_extra: raft_extra.into(),
        ..ClusterOptions::default()
    })
    .await;
    cluster.wait_leader().await;
    control
        .wait_status("every node linked to the control plane", |s| {
            up(s).len() == 3
        })
        .await;
    let endpoints: Vec<String> = cluster
        .ids()
        .iter()
        .map(|&id| cluster.addr(id).to_string())
        .collect();
    let mut totals = (0u64, 0u64);
    for seed in seeds {
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
        if !(status.success() && stdout.contains("verdict: linearizable")) {
            // The run's history, timeline and the nodes' logs are the evidence: kept, not deleted.
            let kept = dir.keep();
            panic!(
                "seed {seed}: {status} (kept: {})\n{stdout}\n{stderr}",
                kept.display()
            );
        }
        let summary: serde_json::Value =
            serde_json::from_str(stdout.lines().last().unwrap_or("{}")).unwrap();
        let ops = summary["operations"].as_u64().unwrap();
        assert!(ops > 50, "seed {seed}: the workload ran: {summary}");
        assert!(
            summary["watched_events"].as_u64().unwrap() > 20,
            "seed {seed}: the watchers followed the writes: {summary}"
        );
        assert!(
            summary["transactions_committed"].as_u64().unwrap() > 5
                && summary["range_deletes"].as_u64().unwrap() > 0,
            "seed {seed}: transactions and range deletes ran: {summary}"
        );
        assert!(
            summary["lock_sections"].as_u64().unwrap() > 3,
            "seed {seed}: the lockers got the lock: {summary}"
        );
        totals.0 += ops;
        totals.1 += summary["unknown_outcomes"].as_u64().unwrap();
        assert!(out.join("timeline.svg").exists() && out.join("history.json").exists());
        cluster.restart_exited();
        cluster.wait_leader().await;
    }
    eprintln!(
        "{plans} random plans ({raft_extra}): {} operations checked, {} with unknown outcome, all \
         linearizable",
        totals.0, totals.1
    );
}
