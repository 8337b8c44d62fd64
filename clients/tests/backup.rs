//! Backups end to end with the real CLI and real clusters: `kiwi snapshot save` under a 64-worker write
//! load, `kiwi snapshot status`, refusals of damaged and truncated files, and `kiwi snapshot restore`
//! into a fresh 3-node cluster that holds exactly the source's keyspace at the backup's revision.

use std::collections::BTreeMap;
use std::process::{Command, Output};
use std::time::Instant;

use kiwi_client::{CallOptions, Client, ClientOptions, KeyRange, ScanOptions};
use kiwi_proto::v1::KeyValue;
use kiwi_tests::cluster::{Cluster, ClusterOptions};

fn client(cluster: &Cluster) -> Client {
    Client::connect(&cluster.endpoints(), ClientOptions::default()).unwrap()
}

fn kiwi(endpoints: &[String], args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_kiwi"))
        .args(args)
        .env("KIWI_ENDPOINTS", endpoints.join(","))
        .output()
        .expect("run kiwi")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// Every key (with its counters) at `revision` (0: now, linearizable), in key order.
async fn keyspace(c: &Client, revision: u64) -> BTreeMap<Vec<u8>, KeyValue> {
    let mut out = BTreeMap::new();
    let mut start = Vec::new();
    loop {
        let scan = ScanOptions {
            limit: 5000,
            revision,
            ..ScanOptions::default()
        };
        let range = KeyRange::Between {
            start: start.clone(),
            end: Vec::new(),
        };
        let (kvs, more, _) = c
            .scan_kvs(&range, &scan, &CallOptions::default())
            .await
            .unwrap();
        if let Some(last) = kvs.last() {
            start = last.key.clone();
            start.push(0);
        }
        out.extend(kvs.into_iter().map(|kv| (kv.key.clone(), kv)));
        if !more {
            return out;
        }
    }
}

fn assert_refused(o: &Output, says: &str) {
    let err = text(&o.stderr);
    assert!(!o.status.success(), "expected a refusal: {o:?}");
    assert!(err.contains(says), "expected {says:?} in: {err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backup_saved_under_load_restores_into_a_new_cluster_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("backup.kiwi");
    let file_s = file.to_str().unwrap();
    let o = CallOptions::default();

    let source = Cluster::start(ClusterOptions::default()).await;
    let eps = source.endpoints();
    let c = client(&source);
    // Keys with history (overwritten, deleted), binary keys, a lease with keys attached.
    for i in 0..500u32 {
        c.put(format!("pre/{i:04}").as_bytes(), &i.to_be_bytes(), &o)
            .await
            .unwrap();
    }
    for i in 0..50u32 {
        c.put(format!("pre/{i:04}").as_bytes(), b"again", &o)
            .await
            .unwrap();
        c.delete(format!("pre/{:04}", 100 + i).as_bytes(), &o)
            .await
            .unwrap();
    }
    c.put(&[0, 0xFF, 7], &[0xFE; 3000], &o).await.unwrap();
    let (lease, _) = c.lease_grant(600, 0, &o).await.unwrap();
    for i in 0..5 {
        c.put_leased(format!("leased/{i}").as_bytes(), b"x", lease, &o)
            .await
            .unwrap();
    }

    // Save from a follower while 64 writers go on.
    let load = source.start_load(64, "load");
    load.wait_more(300).await;
    let save_started = Instant::now();
    let leader = source.wait_leader().await;
    let follower = source.ids().into_iter().find(|&id| id != leader).unwrap();
    // The follower first: it sends the client to the leader (a consistent copy needs a ReadIndex).
    let first = source.addr(follower).to_string();
    let mut from = vec![first.clone()];
    from.extend(eps.iter().filter(|a| **a != first).cloned());
    let saved = kiwi(
        &from,
        &["snapshot", "save", file_s, "--consistent", "--json"],
    );
    assert!(saved.status.success(), "{saved:?}");
    let summary: serde_json::Value = serde_json::from_slice(&saved.stdout).unwrap();
    load.wait_more(100).await;
    let acked = load.finish().await;
    let revision = summary["revision"].as_u64().unwrap();

    // The source's keyspace at the backup's revision is the backup's.
    let expected = keyspace(&c, revision).await;
    assert_eq!(summary["keys"].as_u64().unwrap(), expected.len() as u64);
    assert_eq!(summary["leases"].as_u64().unwrap(), 1);
    let before: Vec<&String> = acked
        .iter()
        .filter(|(_, _, at)| *at < save_started)
        .map(|(k, _, _)| k)
        .collect();
    assert!(before.len() >= 300, "{} writes acknowledged", before.len());
    for k in &before {
        assert!(
            expected.contains_key(k.as_bytes()),
            "{k} was acknowledged before the save began but is not at its revision {revision}"
        );
    }
    let source_cluster = source.status(leader).await.unwrap().cluster_id;

    // `status` checks the file; a flipped byte and a truncated copy are refused.
    let status = kiwi(&[], &["snapshot", "status", file_s, "--json"]);
    assert!(status.status.success(), "{status:?}");
    let st: serde_json::Value = serde_json::from_slice(&status.stdout).unwrap();
    assert_eq!(st["sha256"], summary["sha256"]);
    assert_eq!(st["keys"], summary["keys"]);
    let bytes = std::fs::read(&file).unwrap();
    let flipped = dir.path().join("flipped.kiwi");
    let mut bad = bytes.clone();
    let at = bad.len() / 2;
    bad[at] ^= 0x40;
    std::fs::write(&flipped, &bad).unwrap();
    assert_refused(
        &kiwi(&[], &["snapshot", "status", flipped.to_str().unwrap()]),
        "damaged",
    );
    let truncated = dir.path().join("truncated.kiwi");
    std::fs::write(&truncated, &bytes[..bytes.len() - 100]).unwrap();
    assert_refused(
        &kiwi(&[], &["snapshot", "status", truncated.to_str().unwrap()]),
        "truncated",
    );
    drop(c);
    drop(source);

    // Restore every member of a new cluster from the file; damaged files first, which write nothing.
    let mut restored = Cluster::prepare(ClusterOptions::default());
    let config = restored.config_path(1);
    for bad in [&flipped, &truncated] {
        let o = kiwi(
            &[],
            &[
                "snapshot",
                "restore",
                bad.to_str().unwrap(),
                "--config",
                config.to_str().unwrap(),
            ],
        );
        assert_refused(&o, "nothing was restored");
        assert!(
            !restored.data_dir(1).join("storage").exists(),
            "a refused restore wrote {}",
            restored.data_dir(1).display()
        );
    }
    // Member 1 from its config file, the others from flags alone, as etcdctl's restore takes them.
    let peers = restored
        .ids()
        .iter()
        .map(|id| format!("{id}={}", restored.addr(*id)))
        .collect::<Vec<_>>()
        .join(",");
    for id in restored.ids() {
        let config = restored.config_path(id);
        let data_dir = restored.data_dir(id);
        let node_id = id.to_string();
        let args: Vec<&str> = if id == 1 {
            vec![
                "snapshot",
                "restore",
                file_s,
                "--config",
                config.to_str().unwrap(),
            ]
        } else {
            vec![
                "snapshot",
                "restore",
                file_s,
                "--data-dir",
                data_dir.to_str().unwrap(),
                "--node-id",
                &node_id,
                "--peers",
                &peers,
            ]
        };
        let o = kiwi(&[], &args);
        assert!(o.status.success(), "{o:?}");
        assert!(
            text(&o.stdout).contains(&format!("restored {} keys", expected.len())),
            "{o:?}"
        );
    }
    // A second restore into a used directory is refused.
    assert_refused(
        &kiwi(
            &[],
            &[
                "snapshot",
                "restore",
                file_s,
                "--config",
                config.to_str().unwrap(),
            ],
        ),
        "already holds a node's data",
    );
    restored.start_prepared().await;
    let c = client(&restored);
    let got = keyspace(&c, 0).await;
    assert_eq!(got.len(), expected.len());
    for (k, kv) in &expected {
        assert_eq!(got.get(k), Some(kv), "key {}", text(k));
    }
    // A new cluster (its own id), with the lease and its keys, writing after the backup's revision.
    let leader = restored.wait_leader().await;
    let status = restored.status(leader).await.unwrap();
    assert_ne!(status.cluster_id, source_cluster);
    let ttl = c.lease_time_to_live(lease, true, &o).await.unwrap();
    assert!(ttl.ttl > 0 && ttl.granted_ttl == 600, "{ttl:?}");
    assert_eq!(ttl.keys.len(), 5);
    let rev = c.put(b"after", b"restore", &o).await.unwrap();
    assert!(
        rev > revision,
        "revision {rev} after a restore at {revision}"
    );
    c.lease_revoke(lease, &o).await.unwrap();
    assert_eq!(
        c.count(&KeyRange::Prefix(b"leased/".to_vec()), &o)
            .await
            .unwrap(),
        0
    );
}

/// `kiwi defrag` compacts each node's engine in turn and reports the space given back; `--node`
/// picks one; `kiwi status` shows each node's data size.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn defrag_gives_back_the_space_of_deleted_and_compacted_data() {
    let cluster = Cluster::start(ClusterOptions {
        // The Raft log is truncated soon, so that the deleted values live only in the data and history.
        compaction_threshold: 50,
        ..ClusterOptions::default()
    })
    .await;
    let eps = cluster.endpoints();
    let c = client(&cluster);
    let o = CallOptions::default();
    let value = vec![b'v'; 64 * 1024];
    for i in 0..240u32 {
        c.put(format!("big/{i:04}").as_bytes(), &value, &o)
            .await
            .unwrap();
    }
    c.delete_range(&KeyRange::Prefix(b"big/".to_vec()), false, &o)
        .await
        .unwrap();
    let rev = c.put(b"small", b"1", &o).await.unwrap();
    c.compact(rev, &o).await.unwrap();
    for i in 0..60u32 {
        c.put(b"small", i.to_string().as_bytes(), &o).await.unwrap();
    }

    let status = kiwi(&eps, &["status", "--json"]);
    assert!(status.status.success(), "{status:?}");
    let status: serde_json::Value = serde_json::from_slice(&status.stdout).unwrap();
    for m in status["members"].as_array().unwrap() {
        assert!(m["data_dir_bytes"].as_u64().unwrap() > 0, "{m}");
    }

    let one = kiwi(&eps, &["defrag", "--node", "2", "--json"]);
    assert!(one.status.success(), "{one:?}");
    let one: serde_json::Value = serde_json::from_slice(&one.stdout).unwrap();
    assert_eq!(one["nodes"].as_array().unwrap().len(), 1, "{one}");
    assert_eq!(one["nodes"][0]["id"], 2, "{one}");

    let all = kiwi(&eps, &["defrag", "--json"]);
    assert!(all.status.success(), "{all:?}");
    let all: serde_json::Value = serde_json::from_slice(&all.stdout).unwrap();
    let nodes = all["nodes"].as_array().unwrap();
    assert_eq!(nodes.len(), 3, "{all}");
    for n in nodes.iter().filter(|n| n["id"] != 2) {
        let (before, after) = (
            n["bytes_before"].as_u64().unwrap(),
            n["bytes_after"].as_u64().unwrap(),
        );
        // 15 MiB of values were written, deleted and compacted away.
        assert!(
            before > 15 << 20 && after < before / 2,
            "node {}: {before} -> {after} bytes",
            n["id"]
        );
    }
    assert_eq!(c.get(b"small", &o).await.unwrap(), Some(b"59".to_vec()));
}

/// Below `[storage] min_free_bytes` of free disk, writes that add data are refused with
/// RESOURCE_EXHAUSTED naming the key (at once: the client does not retry them), while reads, deletes,
/// range deletes and compaction go on; with the threshold lowered, writes are accepted again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nearly_full_disk_refuses_puts_but_not_deletes() {
    let mut cluster = Cluster::start(ClusterOptions {
        etcd_ports: true,
        ..ClusterOptions::default()
    })
    .await;
    let c = client(&cluster);
    let o = CallOptions::default();
    for i in 0..10 {
        c.put(format!("k/{i}").as_bytes(), b"v", &o).await.unwrap();
    }
    // Every node now needs more free space than any disk has.
    for id in cluster.ids() {
        cluster.set_storage_extra(id, "min_free_bytes = \"4096 PiB\"\n");
        cluster.stop(id);
    }
    for id in cluster.ids() {
        cluster.restart(id);
    }
    cluster.wait_leader().await;
    let e = c.put(b"k/new", b"v", &o).await.unwrap_err();
    match &e {
        kiwi_client::Error::Rpc(s) => {
            assert_eq!(s.code(), tonic::Code::ResourceExhausted, "{e}");
            assert!(
                s.message().contains("k/new") && s.message().contains("min_free_bytes"),
                "{e}"
            );
        }
        other => panic!("expected RESOURCE_EXHAUSTED, got {other}"),
    }
    let e = c
        .compare_and_swap(b"k/1", Some(b"v"), b"w", &o)
        .await
        .unwrap_err();
    assert!(e.to_string().contains("min_free_bytes"), "{e}");
    // etcd's clients get etcd's NOSPACE answer.
    let etcd = cluster
        .etcd_addr(cluster.wait_leader().await)
        .unwrap()
        .to_string();
    let put = Command::new("etcdctl")
        .args(["put", "k/etcd", "v"])
        .env("ETCDCTL_API", "3")
        .env("ETCDCTL_ENDPOINTS", &etcd)
        .output()
        .unwrap();
    assert!(!put.status.success());
    assert!(
        text(&put.stderr).contains("database space exceeded"),
        "{put:?}"
    );
    // What makes space still works.
    assert_eq!(c.get(b"k/1", &o).await.unwrap(), Some(b"v".to_vec()));
    assert!(c.delete(b"k/0", &o).await.unwrap());
    let gone = c
        .delete_range(&KeyRange::Prefix(b"k/".to_vec()), false, &o)
        .await
        .unwrap();
    assert_eq!(gone.deleted, 9);
    assert_eq!(
        c.count(&KeyRange::Prefix(b"k/".to_vec()), &o)
            .await
            .unwrap(),
        0
    );
    let head = c.put(b"x", b"y", &o).await.map_err(|e| e.to_string());
    assert!(head.is_err());

    for id in cluster.ids() {
        cluster.set_storage_extra(id, "min_free_bytes = 0\n");
        cluster.stop(id);
    }
    for id in cluster.ids() {
        cluster.restart(id);
    }
    cluster.wait_leader().await;
    c.put(b"k/new", b"v", &o).await.unwrap();
}

/// A process's `VmRSS` or `VmHWM` (peak) in MiB, from `/proc`; `None` once it is gone.
fn proc_mib(pid: u32, field: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with(field))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024)
}

/// A backup of 1 GiB streams in bounded memory: the CLI holds a chunk or two at a time (its peak RSS
/// stays under 64 MiB) and the node streaming it grows by much less than the file (under 256 MiB: what it
/// holds is its engine's caches and a few chunks in flight, not the backup). The figures are printed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_one_gib_backup_streams_in_bounded_memory() {
    const VALUE: usize = 64 * 1024;
    const KEYS: usize = 16 * 1024;
    let cluster = Cluster::start(ClusterOptions {
        nodes: 1,
        ..ClusterOptions::default()
    })
    .await;
    let c = std::sync::Arc::new(client(&cluster));
    let loaded = Instant::now();
    let next = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut workers = Vec::new();
    for _ in 0..16 {
        let (c, next) = (c.clone(), next.clone());
        workers.push(tokio::spawn(async move {
            let value: Vec<u8> = (0..VALUE).map(|i| (i * 31 % 251) as u8).collect();
            loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if i >= KEYS {
                    return;
                }
                let mut v = value.clone();
                v[..8].copy_from_slice(&(i as u64).to_be_bytes());
                c.put(
                    format!("big/{i:06}").as_bytes(),
                    &v,
                    &CallOptions::default(),
                )
                .await
                .unwrap();
            }
        }));
    }
    for w in workers {
        w.await.unwrap();
    }
    eprintln!(
        "loaded {KEYS} values of {VALUE} bytes in {:.1?}",
        loaded.elapsed()
    );

    let dir = tempfile::tempdir_in(cluster.root()).unwrap();
    let file = dir.path().join("big.kiwi");
    let node = cluster.pid(1);
    let before = proc_mib(node, "VmRSS").unwrap();
    let started = Instant::now();
    let mut save = Command::new(env!("CARGO_BIN_EXE_kiwi"))
        .args(["snapshot", "save", file.to_str().unwrap()])
        .env("KIWI_ENDPOINTS", cluster.endpoints().join(","))
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let (mut node_peak, mut cli_peak) = (before, 0);
    while save.try_wait().unwrap().is_none() {
        node_peak = node_peak.max(proc_mib(node, "VmRSS").unwrap_or(0));
        cli_peak = cli_peak.max(proc_mib(save.id(), "VmHWM").unwrap_or(0));
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let out = save.wait_with_output().unwrap();
    assert!(out.status.success(), "{out:?}");
    let size = std::fs::metadata(&file).unwrap().len();
    eprintln!(
        "backup of {} MiB in {:.1?}: kiwi CLI peak RSS {cli_peak} MiB, node RSS {before} MiB before, \
         {node_peak} MiB at its peak",
        size >> 20,
        started.elapsed()
    );
    assert!(size >= (KEYS * VALUE) as u64, "a {size}-byte backup");
    assert!(
        text(&out.stdout).contains(&format!("{KEYS} keys")),
        "{out:?}"
    );
    assert!(cli_peak > 0, "the CLI's RSS was never sampled");
    assert!(cli_peak < 64, "the kiwi CLI peaked at {cli_peak} MiB");
    assert!(
        node_peak - before < 256,
        "the node grew from {before} to {node_peak} MiB"
    );
    let status = kiwi(&[], &["snapshot", "status", file.to_str().unwrap()]);
    assert!(status.status.success(), "{status:?}");
}
