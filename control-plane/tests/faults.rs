//! Faults scheduled through the control plane on real `kiwi-node` processes, each effect observed rather
//! than assumed: a partition of the leader elects another on the majority side, the old leader commits
//! nothing meanwhile, and the partition heals at its duration even though the control plane was SIGKILLed
//! during it; a delay on a follower shows in its replication latency on the leader; 30% message loss still
//! commits; a crash kills the process and the restarted node lost no acknowledged write; a disk stall on
//! the leader shows in its fsync time; a cluster without `[raft.fault_injection]` refuses every fault.

use std::time::{Duration, Instant};

use kiwi_proto::v1::fault_spec::Kind;
use kiwi_proto::v1::{
    DiskStall, FaultSchedule, FaultSpec, ListFaultsRequest, MessageLoss, NetworkDelay,
    NetworkPartition, NodeCrash, RaftMetricsRequest, ScheduleFaultRequest,
};
use kiwi_tests::cluster::{Cluster, ClusterOptions, DEADLINE};
use tonic::Code;

use kiwi_tests::control::{ControlProc, HEARTBEAT_MS, free_addr, up};

/// A cluster linked to `control`, with fault injection enabled unless `enabled` is false.
async fn cluster(control: &ControlProc, enabled: bool) -> Cluster {
    Cluster::start(ClusterOptions {
        extra_config: format!(
            "\n[control]\naddr = \"{}\"\nheartbeat_interval_ms = {HEARTBEAT_MS}\n\n\
             [raft.fault_injection]\nenabled = {enabled}\nmax_duration_sec = 60\n",
            control.addr
        ),
        ..ClusterOptions::default()
    })
    .await
}

async fn linked(control: &ControlProc, cluster: &Cluster) -> u64 {
    let leader = cluster.wait_leader().await;
    control
        .wait_status("every node linked, the leader known", |s| {
            up(s) == [1, 2, 3] && s.leader_id == leader
        })
        .await;
    leader
}

fn spec(kind: Kind) -> Option<FaultSpec> {
    Some(FaultSpec {
        kind: Some(kind),
        peers: Vec::new(),
    })
}

async fn schedule(
    control: &ControlProc,
    kind: Kind,
    targets: Vec<u64>,
    duration: Duration,
) -> Result<FaultSchedule, tonic::Status> {
    control
        .client()
        .await
        .schedule_fault(ScheduleFaultRequest {
            spec: spec(kind),
            targets,
            start_after_ms: 0,
            duration_ms: u64::try_from(duration.as_millis()).unwrap(),
        })
        .await
        .map(tonic::Response::into_inner)
}

async fn fault(control: &ControlProc, id: u64) -> FaultSchedule {
    control
        .client()
        .await
        .list_faults(ListFaultsRequest {})
        .await
        .unwrap()
        .into_inner()
        .faults
        .into_iter()
        .find(|f| f.id == id)
        .expect("the fault is listed")
}

/// Polls the fault's schedule until every node reports `state`.
async fn wait_nodes(control: &ControlProc, id: u64, state: &str) -> FaultSchedule {
    let deadline = Instant::now() + DEADLINE;
    loop {
        let f = fault(control, id).await;
        if f.nodes.iter().all(|n| n.state == state) {
            return f;
        }
        assert!(
            Instant::now() < deadline,
            "fault {id}: not every node {state}: {f:#?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_without_fault_injection_refuses_every_fault() {
    let dir = tempfile::tempdir().unwrap();
    let control = ControlProc::start(free_addr(), &dir.path().join("control"));
    let cluster = cluster(&control, false).await;
    let leader = linked(&control, &cluster).await;
    let e = schedule(
        &control,
        Kind::Crash(NodeCrash {}),
        vec![leader],
        Duration::from_secs(1),
    )
    .await
    .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    assert!(
        e.message().contains("raft.fault_injection.enabled"),
        "{e:?}"
    );
    let listed = control
        .client()
        .await
        .list_faults(ListFaultsRequest {})
        .await
        .unwrap()
        .into_inner();
    assert!(listed.faults.is_empty(), "nothing scheduled: {listed:?}");
    assert!(
        cluster.status(leader).await.is_ok(),
        "the leader still runs"
    );
    cluster.must_put(b"k", b"v").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partitioned_leader_is_replaced_and_heals_on_time_without_the_control_plane() {
    let dir = tempfile::tempdir().unwrap();
    let addr = free_addr();
    let mut control = ControlProc::start(addr, &dir.path().join("control"));
    let cluster = cluster(&control, true).await;
    let old = linked(&control, &cluster).await;
    cluster.must_put(b"before", b"1").await;
    let partition = Duration::from_secs(8);
    let started = Instant::now();
    let f = schedule(
        &control,
        Kind::Partition(NetworkPartition {
            isolated_nodes: vec![old],
        }),
        vec![],
        partition,
    )
    .await
    .unwrap();
    assert_eq!(f.targets, [1, 2, 3], "every node gets the partition");
    wait_nodes(&control, f.id, "started").await;
    let old_commit = cluster.status(old).await.unwrap().commit_index;

    // The majority elects another leader and keeps writing.
    let others: Vec<u64> = cluster.ids().into_iter().filter(|&id| id != old).collect();
    let deadline = Instant::now() + DEADLINE;
    let new = loop {
        let mut leaders = Vec::new();
        for &id in &others {
            if let Ok(s) = cluster.status(id).await
                && s.leader_id != 0
                && s.leader_id != old
            {
                leaders.push(s.leader_id);
            }
        }
        if leaders.len() == 2 && leaders[0] == leaders[1] {
            break leaders[0];
        }
        assert!(
            Instant::now() < deadline,
            "no new leader on the majority side"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let mut kv = cluster.kv(new);
    for i in 0..10 {
        kv.put(kiwi_proto::v1::PutRequest {
            prev_kv: false,
            header: Some(kiwi_tests::cluster::header()),
            key: format!("during{i}").into_bytes(),
            value: b"x".to_vec(),
            lease: 0,
        })
        .await
        .expect("the majority side commits");
    }
    // The control plane dies during the partition: the nodes end it on time by themselves.
    control.kill();
    let status = cluster.status(old).await.unwrap();
    assert_eq!(
        status.commit_index, old_commit,
        "the isolated old leader commits nothing"
    );
    let new_commit = cluster.status(new).await.unwrap().commit_index;
    assert!(new_commit > old_commit);
    let deadline = started + partition + Duration::from_secs(10);
    loop {
        let s = cluster.status(old).await.unwrap();
        if s.applied_index >= new_commit {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the old leader never caught up after the partition's end: {s:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        started.elapsed() >= partition - Duration::from_millis(500),
        "healed before the partition's end"
    );
    assert_eq!(
        cluster
            .must_get_local(old, b"during9", new_commit)
            .await
            .as_deref(),
        Some(&b"x"[..])
    );

    // Restarted, the control plane hears how it ended from every node (queued while it was down).
    let control = ControlProc::start(addr, &dir.path().join("control"));
    let f = wait_nodes(&control, f.id, "expired").await;
    assert!(
        f.nodes.iter().any(|n| n.messages_dropped > 0),
        "the partition dropped messages: {f:#?}"
    );
    let events = control.events().await;
    for kind in ["fault_scheduled", "fault_started", "fault_expired"] {
        assert!(
            events.iter().any(|e| e.kind == kind),
            "{kind} in {events:#?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delay_loss_stall_and_crash_have_their_effect() {
    let dir = tempfile::tempdir().unwrap();
    let control = ControlProc::start(free_addr(), &dir.path().join("control"));
    let mut cluster = cluster(&control, true).await;
    let leader = linked(&control, &cluster).await;
    let follower = cluster.ids().into_iter().find(|&id| id != leader).unwrap();

    // A 100 ms delay on a follower's traffic: the leader sees its replication latency rise above it.
    let f = schedule(
        &control,
        Kind::Delay(NetworkDelay {
            delay_ms: 100,
            jitter_ms: 10,
        }),
        vec![follower],
        Duration::from_secs(40),
    )
    .await
    .unwrap();
    wait_nodes(&control, f.id, "started").await;
    // Writes go on until the leader's moving average for that follower shows the delay.
    let deadline = Instant::now() + DEADLINE;
    let mut i = 0;
    loop {
        cluster.must_put(format!("d{i}").as_bytes(), b"v").await;
        i += 1;
        let s = control.status().await;
        let avg = s
            .nodes
            .iter()
            .find(|n| n.node_id == leader)
            .and_then(|n| n.metrics.as_ref())
            .and_then(|m| m.followers.iter().find(|fm| fm.node_id == follower))
            .map_or(0, |fm| fm.replication_latency_avg_us);
        if avg >= 100_000 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the follower's replication latency never reached the delay: {avg} us after {i} writes"
        );
    }
    control
        .client()
        .await
        .cancel_fault(kiwi_proto::v1::CancelFaultRequest { id: f.id })
        .await
        .unwrap();
    let ended = wait_nodes(&control, f.id, "cancelled").await;
    assert!(ended.nodes[0].messages_delayed > 0, "{ended:#?}");

    // 30% message loss on every node: writes still commit.
    let f = schedule(
        &control,
        Kind::Loss(MessageLoss { drop_rate: 0.3 }),
        vec![1, 2, 3],
        Duration::from_secs(3),
    )
    .await
    .unwrap();
    wait_nodes(&control, f.id, "started").await;
    let mut acked = Vec::new();
    for i in 0..20 {
        let key = format!("loss{i}");
        cluster.must_put(key.as_bytes(), b"v").await;
        acked.push(key);
    }
    let f = wait_nodes(&control, f.id, "expired").await;
    assert!(
        f.nodes.iter().map(|n| n.messages_dropped).sum::<u64>() > 0,
        "messages were dropped: {f:#?}"
    );

    // A 50 ms disk stall on the leader shows in its log fsync time; leadership stays.
    let leader = cluster.wait_leader().await;
    let f = schedule(
        &control,
        Kind::DiskStall(DiskStall { delay_ms: 50 }),
        vec![leader],
        Duration::from_secs(3),
    )
    .await
    .unwrap();
    wait_nodes(&control, f.id, "started").await;
    for i in 0..10 {
        cluster.must_put(format!("stall{i}").as_bytes(), b"v").await;
    }
    let m = cluster
        .admin(leader)
        .get_raft_metrics(RaftMetricsRequest {
            without_history: true,
        })
        .await
        .unwrap()
        .into_inner();
    let fsync = m.log_fsync.unwrap_or_default();
    assert!(
        fsync.max_us >= 50_000,
        "fsync time shows the stall: {fsync:?}"
    );
    assert_eq!(
        cluster.wait_leader().await,
        leader,
        "a 50 ms stall moves no leadership"
    );
    wait_nodes(&control, f.id, "expired").await;

    // A crash kills the process at once; restarted, it has every acknowledged write.
    let applied = cluster.must_put(b"before-crash", b"v").await;
    cluster.wait_applied(follower, applied).await;
    let f = schedule(
        &control,
        Kind::Crash(NodeCrash {}),
        vec![follower],
        Duration::from_secs(1),
    )
    .await
    .unwrap();
    let status = cluster.wait_exit(follower).await;
    assert!(!status.success(), "the node died: {status:?}");
    assert_eq!(fault(&control, f.id).await.nodes[0].state, "sent");
    cluster.restart(follower);
    for key in acked.iter().map(String::as_str).chain(["before-crash"]) {
        assert_eq!(
            cluster
                .must_get_local(follower, key.as_bytes(), applied)
                .await
                .as_deref(),
            Some(&b"v"[..]),
            "{key} after the crash"
        );
    }
}

/// A 60 s disk stall on a follower, cancelled while its Raft thread is stuck in it: the heartbeats go on
/// (marked `raft_stale`), so the node stays up and reads the cancel, and the cancel wakes the stalled
/// write. Before, the heartbeat waited for the stalled driver (the node looked down and the cancel was
/// read only when the stall ended), and the stall slept its full delay whatever happened to its fault.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_disk_stall_ends_at_once_and_the_node_stays_up() {
    let dir = tempfile::tempdir().unwrap();
    let control = ControlProc::start(free_addr(), &dir.path().join("control"));
    let cluster = cluster(&control, true).await;
    let leader = linked(&control, &cluster).await;
    let follower = cluster.ids().into_iter().find(|&id| id != leader).unwrap();
    let f = schedule(
        &control,
        Kind::DiskStall(DiskStall { delay_ms: 60_000 }),
        vec![follower],
        Duration::from_secs(60),
    )
    .await
    .unwrap();
    wait_nodes(&control, f.id, "started").await;
    // A write reaches the follower, whose Raft thread stalls persisting it; the others commit it.
    let index = cluster.must_put(b"during-stall", b"v").await;
    control
        .wait_status("the stalled follower's heartbeats say so", |s| {
            s.nodes.iter().any(|n| {
                n.node_id == follower && n.up && n.metrics.as_ref().is_some_and(|m| m.raft_stale)
            })
        })
        .await;
    let cancelled = Instant::now();
    control
        .client()
        .await
        .cancel_fault(kiwi_proto::v1::CancelFaultRequest { id: f.id })
        .await
        .unwrap();
    wait_nodes(&control, f.id, "cancelled").await;
    cluster.wait_applied(follower, index).await;
    assert!(
        cancelled.elapsed() < Duration::from_secs(30),
        "the stall ended with its fault, not after its 60 s"
    );
    let s = control.status().await;
    assert!(
        s.nodes.iter().any(|n| n.node_id == follower && n.up),
        "the node never looked down: {s:#?}"
    );
}
