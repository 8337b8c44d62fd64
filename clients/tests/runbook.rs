//! The README's runbook, step by step with the real `kiwi` CLI against real clusters while 16 writers
//! go on: replace a failed machine (remove it, add a fresh node as a learner, promote it), grow from 3
//! to 5 voters, shrink from 5 to 3 (the leader among the removed). After each, every write acknowledged
//! at any time is readable, and the new members hold the data.

use std::collections::BTreeSet;
use std::process::{Command, Output};

use kiwi_client::{CallOptions, Client, ClientOptions, KeyRange, ScanOptions};
use kiwi_tests::cluster::{Cluster, ClusterOptions, Load};

fn kiwi(cluster: &Cluster, args: &[&str]) -> Output {
    let endpoints: Vec<String> = cluster
        .running()
        .into_iter()
        .map(|id| cluster.addr(id).to_string())
        .collect();
    let o = Command::new(env!("CARGO_BIN_EXE_kiwi"))
        .args(args)
        .env("KIWI_ENDPOINTS", endpoints.join(","))
        .args(["--timeout", "60s"])
        .output()
        .expect("run kiwi");
    assert!(o.status.success(), "kiwi {args:?}: {o:?}");
    o
}

/// Every key under `prefix`, read linearizably from the running members.
async fn keys(cluster: &Cluster, prefix: &str) -> BTreeSet<String> {
    let endpoints: Vec<String> = cluster
        .running()
        .into_iter()
        .map(|id| cluster.addr(id).to_string())
        .collect();
    let c = Client::connect(&endpoints, ClientOptions::default()).unwrap();
    let mut out = BTreeSet::new();
    let mut start = prefix.as_bytes().to_vec();
    let mut end = prefix.as_bytes().to_vec();
    end.push(0xFF);
    loop {
        let range = KeyRange::Between {
            start: start.clone(),
            end: end.clone(),
        };
        let scan = ScanOptions {
            limit: 10_000,
            keys_only: true,
            ..ScanOptions::default()
        };
        let (kvs, more, _) = c
            .scan_kvs(&range, &scan, &CallOptions::default())
            .await
            .unwrap();
        if let Some(last) = kvs.last() {
            start = last.key.clone();
            start.push(0);
        }
        out.extend(kvs.into_iter().map(|kv| String::from_utf8(kv.key).unwrap()));
        if !more {
            return out;
        }
    }
}

/// Stops `load` and checks that every write it had acknowledged is in the cluster; returns those keys.
async fn no_write_lost(cluster: &Cluster, load: Load, prefix: &str) -> Vec<String> {
    let acked = load.finish().await;
    assert!(acked.len() > 50, "only {} writes acknowledged", acked.len());
    let have = keys(cluster, prefix).await;
    let lost: Vec<&String> = acked
        .iter()
        .map(|(k, _, _)| k)
        .filter(|k| !have.contains(*k))
        .collect();
    assert!(
        lost.is_empty(),
        "{} acknowledged writes lost: {:?}",
        lost.len(),
        &lost[..lost.len().min(5)]
    );
    acked.into_iter().map(|(k, _, _)| k).collect()
}

/// `kiwi member add` of a node started with `raft.join = true`; returns its id.
fn add(cluster: &mut Cluster, learner: bool) -> u64 {
    let id = cluster.spawn_joining_node();
    let (id_s, addr) = (id.to_string(), cluster.addr(id).to_string());
    let raft = cluster.raft_addr(id).unwrap().to_string();
    let mut args = vec!["member", "add", &id_s, &addr, "--raft-addr", &raft];
    if learner {
        args.push("--learner");
    }
    kiwi(cluster, &args);
    id
}

fn voters(cluster: &Cluster) -> serde_json::Value {
    let o = kiwi(cluster, &["member", "list", "--json"]);
    serde_json::from_slice(&o.stdout).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replace_a_failed_machine_with_writes_going_on() {
    let mut cluster = Cluster::start(ClusterOptions {
        raft_ports: true,
        compaction_threshold: 500,
        ..ClusterOptions::default()
    })
    .await;
    let load = cluster.start_load(16, "replace");
    load.wait_more(200).await;
    // A follower's machine dies.
    let leader = cluster.wait_leader().await;
    let dead = cluster.ids().into_iter().find(|id| *id != leader).unwrap();
    cluster.kill(dead);
    load.wait_more(200).await;
    // Remove it, then add its replacement (a fresh data directory) as a learner and promote it.
    kiwi(&cluster, &["member", "remove", &dead.to_string()]);
    let new = add(&mut cluster, true);
    let list = voters(&cluster);
    assert!(list.to_string().contains("learner"), "{list}");
    kiwi(&cluster, &["member", "promote", &new.to_string()]);
    load.wait_more(200).await;
    let status = cluster.status(cluster.wait_leader().await).await.unwrap();
    assert_eq!(status.voters.len(), 3, "{status:?}");
    assert!(
        status.voters.contains(&new) && !status.voters.contains(&dead),
        "{status:?}"
    );
    let n = no_write_lost(&cluster, load, "replace").await.len();
    // The replacement holds everything.
    let idx = cluster.must_put(b"replace-last", b"1").await;
    let local = cluster.local_data(new, idx).await;
    assert!(
        local.keys().filter(|k| k.starts_with(b"replace-")).count() >= n,
        "node {new} holds {} of {n} keys",
        local.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grow_three_to_five_then_shrink_back_with_writes_going_on() {
    let mut cluster = Cluster::start(ClusterOptions {
        raft_ports: true,
        compaction_threshold: 500,
        ..ClusterOptions::default()
    })
    .await;
    let load = cluster.start_load(16, "grow");
    load.wait_more(200).await;
    // Grow: each new node joins as a learner and is promoted once caught up (one command each).
    let a = add(&mut cluster, false);
    load.wait_more(100).await;
    let b = add(&mut cluster, false);
    load.wait_more(200).await;
    let status = cluster.status(cluster.wait_leader().await).await.unwrap();
    assert_eq!(status.voters.len(), 5, "{status:?}");
    assert!(status.voters.contains(&a) && status.voters.contains(&b));
    let grown = no_write_lost(&cluster, load, "grow").await;

    // Shrink: remove two founders, the leader among them (it hands leadership over first).
    let load = cluster.start_load(16, "shrink");
    load.wait_more(200).await;
    let leader = cluster.wait_leader().await;
    let founder = (1..=3).find(|id| *id != leader).unwrap();
    let removed = [leader, founder];
    kiwi(&cluster, &["member", "remove", &founder.to_string()]);
    cluster.kill(founder);
    load.wait_more(100).await;
    kiwi(
        &cluster,
        &["member", "remove", &leader.to_string(), "--yes"],
    );
    cluster.kill(leader);
    load.wait_more(200).await;
    let status = cluster.status(cluster.wait_leader().await).await.unwrap();
    assert_eq!(status.voters.len(), 3, "{status:?}");
    assert!(
        removed.iter().all(|id| !status.voters.contains(id)),
        "{status:?}"
    );
    no_write_lost(&cluster, load, "shrink").await;
    let have = keys(&cluster, "grow").await;
    assert!(
        grown.iter().all(|k| have.contains(k)),
        "a write from before the shrink is gone"
    );
}
