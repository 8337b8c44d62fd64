//! Replication scenarios on real `kiwi-node` processes over loopback gRPC (RocksDB unless stated). Each
//! asserts on what clients were told: acknowledged writes, answered reads, CAS outcomes.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use kiwi_proto::v1::{
    AddNodeRequest, CompareAndSwapRequest, Consistency, GetRequest, RaftRole, RemoveNodeRequest,
    TransferLeaderRequest, compare_and_swap_request,
};
use kiwi_tests::cluster::{Cluster, ClusterOptions, DEADLINE, header, is_retryable, leader_hint};
use tonic::Code;

fn opts(backend: &str) -> ClusterOptions {
    ClusterOptions {
        backend: backend.into(),
        ..ClusterOptions::default()
    }
}

/// A Get of `key` with `consistency`.
fn get_request(key: &[u8], consistency: Consistency) -> GetRequest {
    GetRequest {
        revision: 0,
        header: Some(header()),
        key: key.to_vec(),
        consistency: consistency as i32,
    }
}

/// Asserts every acknowledged key is present, with its value, on every node in `ids`.
async fn assert_all_present(
    cluster: &Cluster,
    ids: &[u64],
    acked: &[(String, Instant, Instant)],
    min_applied: u64,
) {
    for &id in ids {
        let data = cluster.local_data(id, min_applied).await;
        let missing: Vec<&String> = acked
            .iter()
            .map(|(k, _, _)| k)
            .filter(|k| data.get(k.as_bytes()).map(Vec::as_slice) != Some(k.as_bytes()))
            .collect();
        assert!(
            missing.is_empty(),
            "node {id} lost {} of {} acknowledged writes, e.g. {:?}",
            missing.len(),
            acked.len(),
            &missing[..missing.len().min(5)]
        );
    }
}

/// The highest commit index any running node reports.
async fn max_commit(cluster: &Cluster) -> u64 {
    let mut max = 0;
    for id in cluster.running() {
        if let Ok(s) = cluster.status(id).await {
            max = max.max(s.commit_index);
        }
    }
    max
}

async fn elect_and_replicate(backend: &str) {
    let cluster = Cluster::start(opts(backend)).await;
    let leader = cluster.wait_leader().await;
    let mut roles = BTreeMap::new();
    for id in cluster.ids() {
        let s = cluster.status(id).await.unwrap();
        assert_eq!(s.leader_id, leader, "node {id} follows another leader");
        assert_eq!(s.storage_backend, backend);
        roles.insert(id, s.role);
    }
    let leaders = roles
        .values()
        .filter(|r| **r == RaftRole::Leader as i32)
        .count();
    assert_eq!(leaders, 1, "exactly one leader: {roles:?}");
    // Logs written to a file are plain text (no terminal colour codes).
    let log = cluster.log_tail(leader, 100_000);
    assert!(log.contains("INFO"), "{log}");
    assert!(!log.contains('\x1b'), "colour codes in a log file: {log:?}");

    let mut last = 0;
    for i in 0..50 {
        last = cluster
            .must_put(
                format!("key-{i:03}").as_bytes(),
                format!("value-{i}").as_bytes(),
            )
            .await;
    }
    for id in cluster.ids() {
        for i in 0..50 {
            let got = cluster
                .must_get_local(id, format!("key-{i:03}").as_bytes(), last)
                .await;
            assert_eq!(
                got,
                Some(format!("value-{i}").into_bytes()),
                "node {id} key-{i:03}"
            );
        }
    }
    // A follower refuses writes and names the leader, so a client redirects in one hop.
    let follower = cluster.ids().into_iter().find(|id| *id != leader).unwrap();
    let err = cluster
        .kv(follower)
        .put(kiwi_proto::v1::PutRequest {
            prev_kv: false,
            header: Some(header()),
            key: b"k".to_vec(),
            value: b"v".to_vec(),
            lease: 0,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err}");
    assert_eq!(leader_hint(&err), Some(leader));
    let addr = err
        .metadata()
        .get("kiwi-leader-addr")
        .unwrap()
        .to_str()
        .unwrap();
    assert_eq!(addr, cluster.addr(leader).to_string());
}

/// Scenario 1.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_elect_one_leader_and_replicate() {
    elect_and_replicate("rocksdb").await;
}

/// Scenario 7 (1 on LevelDB).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leveldb_three_nodes_elect_one_leader_and_replicate() {
    elect_and_replicate("leveldb").await;
}

/// Scenario 2: SIGKILL the leader under a steady write load. Prints the failover time: from the SIGKILL to
/// the first acknowledgement of a write sent after it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leader_killed_under_load_loses_no_acknowledged_write() {
    let mut cluster = Cluster::start(opts("rocksdb")).await;
    let old = cluster.wait_leader().await;
    let load = cluster.start_load(8, "s2");
    load.wait_more(300).await;
    let killed_at = Instant::now();
    cluster.kill(old);
    let new = cluster.wait_leader().await;
    assert_ne!(new, old);
    load.wait_more(300).await;
    let acked = load.finish().await;
    // Only writes sent after the kill count: a reply the old leader sent just before dying can arrive
    // after the kill.
    let first_after = acked
        .iter()
        .filter(|(_, sent, _)| *sent > killed_at)
        .map(|(_, _, ack)| *ack)
        .min()
        .expect("writes succeeded after the kill");
    let failover = first_after - killed_at;
    println!(
        "FAILOVER: leader {old} SIGKILLed; node {new} leads; first acknowledged write {:.0} ms after the \
         kill ({} writes acknowledged in total)",
        failover.as_secs_f64() * 1000.0,
        acked.len()
    );

    cluster.restart(old);
    let commit = max_commit(&cluster).await;
    assert_all_present(&cluster, &cluster.ids(), &acked, commit).await;
}

/// Scenario 3, first half: a follower down during 10,000+ writes catches up from the log.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lagging_follower_catches_up_from_the_log() {
    let mut cluster = Cluster::start(opts("rocksdb")).await;
    let leader = cluster.wait_leader().await;
    let follower = cluster.ids().into_iter().find(|id| *id != leader).unwrap();
    cluster.kill(follower);
    let load = cluster.start_load(32, "s3");
    load.wait_more(10_000).await;
    let acked = load.finish().await;
    assert!(acked.len() >= 10_000);
    let leader_status = cluster.status(cluster.wait_leader().await).await.unwrap();
    assert_eq!(leader_status.log_first_index, 2, "nothing was compacted");

    cluster.restart(follower);
    assert_all_present(&cluster, &[follower], &acked, leader_status.commit_index).await;
    let s = cluster.status(follower).await.unwrap();
    assert_eq!(
        s.log_first_index, 2,
        "the follower replayed the log; it got no snapshot"
    );
}

/// Scenario 3, second half: a follower down past a compaction catches up from a snapshot.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn follower_behind_a_compaction_catches_up_from_a_snapshot() {
    let mut cluster = Cluster::start(ClusterOptions {
        compaction_threshold: 500,
        ..opts("rocksdb")
    })
    .await;
    let leader = cluster.wait_leader().await;
    let follower = cluster.ids().into_iter().find(|id| *id != leader).unwrap();
    cluster.must_put(b"before", b"1").await;
    // Data the follower has but the cluster will delete while it is down: the snapshot must remove it.
    let idx = cluster.must_put(b"doomed", b"x").await;
    cluster.wait_applied(follower, idx).await;
    cluster.kill(follower);
    let mut client = cluster.kv(leader);
    client
        .delete(kiwi_proto::v1::DeleteRequest {
            header: Some(header()),
            key: b"doomed".to_vec(),
        })
        .await
        .unwrap();
    let load = cluster.start_load(16, "s3b");
    load.wait_more(3_000).await;
    let acked = load.finish().await;
    let leader = cluster.wait_leader().await;
    let leader_status = cluster.status(leader).await.unwrap();
    assert!(
        leader_status.log_first_index > idx + 1,
        "the leader compacted past the follower's log (first index {})",
        leader_status.log_first_index
    );

    cluster.restart(follower);
    assert_all_present(&cluster, &[follower], &acked, leader_status.commit_index).await;
    let data = cluster
        .local_data(follower, leader_status.commit_index)
        .await;
    assert_eq!(data.get(&b"before"[..]).map(Vec::as_slice), Some(&b"1"[..]));
    assert!(
        !data.contains_key(&b"doomed"[..]),
        "the snapshot replaced the follower's old data"
    );
    let s = cluster.status(follower).await.unwrap();
    assert!(
        s.log_first_index > idx + 1,
        "the follower installed a snapshot (its log starts at {})",
        s.log_first_index
    );
    // The leader's Raft metrics count the snapshot it streamed to the follower (if it still leads).
    let leader = cluster.wait_leader().await;
    if leader == leader_status.node_id {
        let m = cluster
            .admin(leader)
            .get_raft_metrics(kiwi_proto::v1::RaftMetricsRequest {
                without_history: true,
            })
            .await
            .unwrap()
            .into_inner();
        let f = m
            .followers
            .iter()
            .find(|f| f.node_id == follower)
            .unwrap_or_else(|| panic!("follower {follower} in {m:?}"));
        assert!(f.snapshots_sent >= 1, "{f:?}");
        assert!(f.snapshot_duration.unwrap().count >= 1, "{f:?}");
    }
    // And it keeps replicating normally afterwards.
    let last = cluster.must_put(b"after", b"2").await;
    assert_eq!(
        cluster.must_get_local(follower, b"after", last).await,
        Some(b"2".to_vec())
    );
}

async fn all_killed_keep_acknowledged_writes(backend: &str) {
    let mut cluster = Cluster::start(opts(backend)).await;
    let load = cluster.start_load(16, "s4");
    load.wait_more(500).await;
    for id in cluster.ids() {
        cluster.kill(id);
    }
    let acked = load.finish().await;
    assert!(acked.len() >= 500);
    for id in cluster.ids() {
        cluster.restart(id);
    }
    cluster.wait_leader().await;
    // Commit a new entry so every node's commit index covers everything acknowledged before the crash.
    let idx = cluster.must_put(b"after-restart", b"1").await;
    assert_all_present(&cluster, &cluster.ids(), &acked, idx).await;
}

/// Scenario 4.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn all_nodes_killed_under_load_keep_acknowledged_writes() {
    all_killed_keep_acknowledged_writes("rocksdb").await;
}

/// Scenario 7 (4 on LevelDB).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leveldb_all_nodes_killed_under_load_keep_acknowledged_writes() {
    all_killed_keep_acknowledged_writes("leveldb").await;
}

/// Scenario 5: the old leader is frozen (SIGSTOP) while the others elect a new leader and overwrite a
/// key; then the others are frozen and the old leader resumed. It still believes it leads, but it must
/// not answer a linearizable read with the old value.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn isolated_old_leader_never_serves_a_stale_linearizable_read() {
    isolated_old_leader(opts("rocksdb")).await;
}

/// Scenario 5 with `raft.lease_reads`: the old leader holds a lease it has been answering reads from when
/// it is frozen. Resumed, nothing tells it that it was deposed (the others are frozen): only its clock
/// says the lease ran out while it was stopped, so it must fall back to a ReadIndex round, which no
/// quorum answers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn isolated_old_leader_with_lease_reads_never_serves_a_stale_linearizable_read() {
    isolated_old_leader(ClusterOptions {
        raft_extra: "lease_reads = true".into(),
        ..opts("rocksdb")
    })
    .await;
}

async fn isolated_old_leader(opts: ClusterOptions) {
    let cluster = Cluster::start(opts).await;
    let old = cluster.wait_leader().await;
    cluster.must_put(b"k", b"old").await;
    // Reads on the leader: with lease reads, these take and use its lease. The connection stays open for
    // the read below.
    let mut reader = cluster.kv(old);
    for _ in 0..20 {
        let r = reader
            .get(get_request(b"k", Consistency::Linearizable))
            .await
            .expect("a linearizable read on the leader");
        assert_eq!(r.into_inner().value, b"old");
    }
    cluster.pause(old);
    let others: Vec<u64> = cluster.ids().into_iter().filter(|id| *id != old).collect();
    // The remaining two elect a leader and overwrite the key.
    let deadline = Instant::now() + DEADLINE;
    let new = loop {
        let mut found = None;
        for &id in &others {
            if let Ok(s) = cluster.status(id).await
                && s.role == RaftRole::Leader as i32
            {
                found = Some(id);
            }
        }
        if let Some(id) = found {
            break id;
        }
        assert!(Instant::now() < deadline, "no new leader among {others:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let mut put_ok = false;
    for _ in 0..100 {
        let r = cluster
            .kv(new)
            .put(kiwi_proto::v1::PutRequest {
                prev_kv: false,
                header: Some(header()),
                key: b"k".to_vec(),
                value: b"new".to_vec(),
                lease: 0,
            })
            .await;
        if r.is_ok() {
            put_ok = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(put_ok, "the new leader {new} accepted the overwrite");
    for &id in &others {
        cluster.pause(id);
    }
    // The read is sent while the old leader is still frozen, so that it waits in the socket beside the
    // new leader's messages and may be handled before them.
    let read = tokio::spawn(async move {
        reader
            .get(get_request(b"k", Consistency::Linearizable))
            .await
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    cluster.resume(old);
    let answer = read.await.expect("the read task");
    match answer {
        Ok(r) => panic!(
            "the isolated old leader answered a linearizable read: {:?}",
            String::from_utf8_lossy(&r.into_inner().value)
        ),
        Err(e) => assert!(
            matches!(
                e.code(),
                Code::Unavailable | Code::DeadlineExceeded | Code::FailedPrecondition
            ),
            "expected a retryable error, got {e}"
        ),
    }
    // A serializable read is allowed to be stale, and says which index it reflects.
    let r = cluster
        .kv(old)
        .get(get_request(b"k", Consistency::Serializable))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.value, b"old");
    for &id in &others {
        cluster.resume(id);
    }
}

/// Scenario 6: compare-and-swap increments from 8 concurrent clients on one counter.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_compare_and_swap_counts_exactly() {
    let cluster = Cluster::start(opts("rocksdb")).await;
    cluster.must_put(b"counter", b"0").await;
    let clients = cluster.clients();
    let leader = cluster.wait_leader().await;
    let successes = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let clients = clients.clone();
        let successes = Arc::clone(&successes);
        tasks.push(tokio::spawn(async move {
            let mut client = clients.get(leader);
            for _ in 0..25 {
                let current = client
                    .get(get_request(b"counter", Consistency::Linearizable))
                    .await
                    .expect("linearizable get")
                    .into_inner()
                    .value;
                let n: u64 = String::from_utf8(current.clone()).unwrap().parse().unwrap();
                let r = client
                    .compare_and_swap(CompareAndSwapRequest {
                        header: Some(header()),
                        key: b"counter".to_vec(),
                        expected: Some(compare_and_swap_request::Expected::ExpectedValue(current)),
                        new: Some(compare_and_swap_request::New::NewValue(
                            (n + 1).to_string().into_bytes(),
                        )),
                    })
                    .await;
                match r {
                    Ok(r) if r.get_ref().succeeded => {
                        successes.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(r) => assert!(r.get_ref().previous_found, "the counter exists"),
                    Err(e) => panic!("CAS failed with an unknown outcome: {e}"),
                }
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let total = successes.load(Ordering::Relaxed);
    assert!(total > 0);
    let r = cluster
        .kv(leader)
        .get(get_request(b"counter", Consistency::Linearizable))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(String::from_utf8(r.value).unwrap(), total.to_string());
}

/// Scenario 8: add a fourth node (learner, then voter), remove one, hand leadership over; the cluster
/// keeps serving throughout. Every node serves Raft on its own port, so Raft addresses travel through
/// the configuration, the membership change and the snapshot the new node starts from.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn membership_add_a_node_remove_a_node_transfer_leadership() {
    let mut cluster = Cluster::start(ClusterOptions {
        compaction_threshold: 200,
        raft_ports: true,
        ..opts("rocksdb")
    })
    .await;
    for i in 0..300 {
        cluster
            .must_put(format!("pre-{i:03}").as_bytes(), b"v")
            .await;
    }
    let new = cluster.spawn_joining_node();
    let leader = cluster.wait_leader().await;
    let resp = cluster
        .admin(leader)
        .add_node(AddNodeRequest {
            node_id: new,
            addr: cluster.addr(new).to_string(),
            raft_addr: cluster.raft_addr(new).unwrap().to_string(),
            ..AddNodeRequest::default()
        })
        .await
        .unwrap_or_else(|e| panic!("AddNode failed: {e}"))
        .into_inner();
    assert!(resp.voters.contains(&new), "node {new} votes: {resp:?}");
    assert!(resp.learners.is_empty(), "{resp:?}");
    let idx = cluster.must_put(b"with-four", b"4").await;
    assert_eq!(
        cluster.must_get_local(new, b"with-four", idx).await,
        Some(b"4".to_vec())
    );
    assert_eq!(
        cluster.must_get_local(new, b"pre-000", idx).await,
        Some(b"v".to_vec())
    );
    let s = cluster.status(new).await.unwrap();
    assert_eq!(s.voters.len(), 4, "{s:?}");

    // Adding it again is refused with a clear error.
    let err = cluster
        .admin(cluster.wait_leader().await)
        .add_node(AddNodeRequest {
            node_id: new,
            addr: cluster.addr(new).to_string(),
            raft_addr: String::new(),
            ..AddNodeRequest::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert!(err.message().contains("already a voter"), "{err}");

    // Remove a follower that is not the new node.
    let leader = cluster.wait_leader().await;
    let victim = cluster
        .ids()
        .into_iter()
        .find(|id| *id != leader && *id != new)
        .unwrap();
    let resp = cluster
        .admin(leader)
        .remove_node(RemoveNodeRequest { node_id: victim })
        .await
        .unwrap_or_else(|e| panic!("RemoveNode failed: {e}"))
        .into_inner();
    assert!(!resp.voters.contains(&victim), "{resp:?}");
    assert_eq!(resp.voters.len(), 3);
    cluster.kill(victim);
    let idx = cluster.must_put(b"with-three", b"3").await;
    assert_eq!(
        cluster.must_get_local(new, b"with-three", idx).await,
        Some(b"3".to_vec())
    );

    // Hand leadership to the new node.
    let leader = cluster.wait_leader().await;
    if leader != new {
        let r = cluster
            .admin(leader)
            .transfer_leader(TransferLeaderRequest { node_id: new })
            .await
            .unwrap_or_else(|e| panic!("TransferLeader failed: {e}"))
            .into_inner();
        assert_eq!(r.leader_id, new);
    }
    let s = cluster.status(new).await.unwrap();
    assert_eq!(s.role, RaftRole::Leader as i32);
    cluster.must_put(b"led-by-new", b"1").await;

    // A founder restarted finds the others at their Raft ports again.
    let founder = cluster.running().into_iter().find(|id| *id != new).unwrap();
    cluster.kill(founder);
    cluster.restart(founder);
    let idx = cluster.must_put(b"after-restart", b"1").await;
    assert_eq!(
        cluster.must_get_local(founder, b"after-restart", idx).await,
        Some(b"1".to_vec())
    );
}

/// Bad input gets INVALID_ARGUMENT naming the limit, and writes nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_are_refused_and_write_nothing() {
    let cluster = Cluster::start(ClusterOptions {
        nodes: 1,
        ..opts("rocksdb")
    })
    .await;
    let mut kv = cluster.kv(1);
    let put = |key: Vec<u8>, value: Vec<u8>| kiwi_proto::v1::PutRequest {
        prev_kv: false,
        header: Some(header()),
        key,
        value,
        lease: 0,
    };
    let e = kv.put(put(Vec::new(), b"v".to_vec())).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().contains("empty"), "{e}");
    let e = kv
        .put(put(vec![b'k'; 8 * 1024 + 1], b"v".to_vec()))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().contains("8192"), "names the limit: {e}");
    let e = kv
        .put(put(b"k".to_vec(), vec![0; 4 * 1024 * 1024 + 1]))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().contains("4194304"), "names the limit: {e}");
    let e = kv
        .scan(kiwi_proto::v1::ScanRequest {
            header: Some(header()),
            limit: 0,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().contains("limit"), "{e}");
    // Unknown priorities are served as NORMAL.
    let mut h = header();
    h.priority = 42;
    kv.put(kiwi_proto::v1::PutRequest {
        prev_kv: false,
        header: Some(h),
        key: b"ok".to_vec(),
        value: b"1".to_vec(),
        lease: 0,
    })
    .await
    .unwrap();
    let data = cluster.local_data(1, 0).await;
    assert_eq!(data.len(), 1, "only the valid put wrote: {data:?}");
    assert!(is_retryable(&tonic::Status::unavailable("x")));
}
