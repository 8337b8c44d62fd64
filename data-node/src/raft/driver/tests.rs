//! The driver's tests: one driver alone (a failing disk, compaction, leases) and three wired together.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use kiwi_proto::v1::{WriteBatchCommand, WriteOp, raft_command, write_op};
use kiwi_storage::{
    BackendKind, KeySpace, KvPair, Limits, MemoryBackend, Scan, StorageSnapshot, WriteBatch,
    WriteOptions,
};

use super::*;

/// A memory backend whose writes start failing (or panicking) on demand (a dying disk).
struct FailingBackend {
    inner: MemoryBackend,
    fail: AtomicBool,
    panic: AtomicBool,
}

impl FailingBackend {
    fn new() -> Arc<Self> {
        Arc::new(FailingBackend {
            inner: MemoryBackend::new(Limits::CEILING),
            fail: AtomicBool::new(false),
            panic: AtomicBool::new(false),
        })
    }
}

fn test_config(threshold: u64, slack: u64) -> DriverConfig {
    DriverConfig {
        node_id: 1,
        tick_interval: Duration::from_millis(5),
        election_ticks: 10,
        heartbeat_ticks: 2,
        compaction_threshold: threshold,
        compaction_slack: slack,
        lease_reads: false,
        metrics: MetricsSettings {
            enabled: true,
            collection_interval: Duration::from_millis(10),
            retention_period: Duration::from_secs(10),
        },
        metrics_export: RaftExport::noop(),
    }
}

/// A driver over `backend` (bootstrapped as a single voter the first time), elected leader.
async fn start_single(
    backend: &Arc<dyn StorageBackend>,
    config: &DriverConfig,
    learners: &[u64],
) -> (
    DriverHandle,
    JoinHandle<()>,
    CancellationToken,
    CancellationToken,
) {
    let mut store = LogStore::in_backend(Arc::clone(backend), Arc::default()).unwrap();
    if !store.is_initialized() {
        store.bootstrap(vec![1]).unwrap();
        if !learners.is_empty() {
            let cs = raft::eraftpb::ConfState {
                voters: vec![1],
                learners: learners.to_vec(),
                ..Default::default()
            };
            let mut batch = WriteBatch::new();
            LogStore::conf_state_batch(&cs, &mut batch).unwrap();
            backend.batch_write(batch, WriteOptions::SYNC).unwrap();
            store = LogStore::in_backend(Arc::clone(backend), Arc::default()).unwrap();
        }
    }
    let (stop, fatal) = (CancellationToken::new(), CancellationToken::new());
    let (handle, thread) = spawn(
        config,
        store,
        Arc::clone(backend),
        Arc::new(NoPeers),
        Arc::default(),
        stop.clone(),
        fatal.clone(),
    )
    .unwrap();
    let mut watch = handle.watch();
    tokio::time::timeout(
        Duration::from_secs(10),
        watch.wait_for(|s| s.role == Role::Leader),
    )
    .await
    .expect("single node elects itself")
    .unwrap();
    (handle, thread, stop, fatal)
}

#[tokio::test]
async fn single_voter_restarts_after_log_compaction() {
    // With one voter every commit advances in the light Ready; the stored commit index must still
    // never fall behind the compacted log start (raft-rs panics on restart otherwise). The same
    // with a learner beside the voter.
    for learners in [vec![], vec![2]] {
        let backend: Arc<dyn StorageBackend> = Arc::new(MemoryBackend::new(Limits::CEILING));
        let config = test_config(100, 0);
        let (handle, thread, stop, _) = start_single(&backend, &config, &learners).await;
        for i in 0..150 {
            handle.propose(put(&format!("k{i}"))).await.unwrap();
        }
        assert!(
            handle.status().first_index > 100,
            "the log was compacted: {:?}",
            handle.status()
        );
        stop.cancel();
        thread.join().unwrap();

        let store = LogStore::in_backend(Arc::clone(&backend), Arc::default()).unwrap();
        let hs = raft::Storage::initial_state(&store).unwrap().hard_state;
        assert!(
            hs.commit >= store.truncated_index(),
            "stored commit {} behind the log start {} (learners {learners:?})",
            hs.commit,
            store.truncated_index()
        );
        let (handle, thread, stop, fatal) = start_single(&backend, &config, &learners).await;
        handle.propose(put("after-restart")).await.unwrap();
        assert!(!fatal.is_cancelled());
        stop.cancel();
        thread.join().unwrap();
    }
}

/// An in-process network between drivers: messages go straight to their destination's handle, except
/// those the current filter drops.
#[derive(Default)]
struct Net {
    handles: std::sync::Mutex<HashMap<u64, DriverHandle>>,
    drop_append_responses: AtomicBool,
    /// A node cut off from the others (0: none).
    isolated: AtomicU64,
    /// From the first `MsgTimeoutNow` to this node on, messages to it are held (in order) instead of
    /// delivered, until `release` (0: none).
    hold_from_timeout_now_to: AtomicU64,
    holding: AtomicBool,
    held: std::sync::Mutex<Vec<Message>>,
    /// Messages to this node are dropped (0: none).
    cut_to: AtomicU64,
    /// Heartbeat responses (which answer ReadIndex rounds) are dropped.
    drop_heartbeat_responses: AtomicBool,
    /// A driver that sends messages blocks in the sink while this is set (its thread stalls).
    stall_senders: AtomicBool,
}

impl Net {
    /// Delivers the held messages in order and stops holding.
    fn release(&self) {
        self.hold_from_timeout_now_to.store(0, Ordering::SeqCst);
        self.holding.store(false, Ordering::SeqCst);
        let held = std::mem::take(&mut *self.held.lock().unwrap());
        let handles = self.handles.lock().unwrap();
        for m in held {
            if let Some(h) = handles.get(&m.to) {
                h.step(m);
            }
        }
    }
}

struct NetSink(Arc<Net>);

impl MessageSink for NetSink {
    fn send(&self, msgs: Vec<Message>) -> Vec<u64> {
        while self.0.stall_senders.load(Ordering::SeqCst) {
            std::thread::sleep(Duration::from_millis(1));
        }
        let handles = self.0.handles.lock().unwrap();
        for m in msgs {
            if self.0.drop_append_responses.load(Ordering::SeqCst)
                && m.get_msg_type() == MessageType::MsgAppendResponse
            {
                continue;
            }
            let isolated = self.0.isolated.load(Ordering::SeqCst);
            if isolated != 0 && (m.to == isolated || m.from == isolated) {
                continue;
            }
            if m.to == self.0.cut_to.load(Ordering::SeqCst) {
                continue;
            }
            if self.0.drop_heartbeat_responses.load(Ordering::SeqCst)
                && m.get_msg_type() == MessageType::MsgHeartbeatResponse
            {
                continue;
            }
            if m.to == self.0.hold_from_timeout_now_to.load(Ordering::SeqCst) {
                if m.get_msg_type() == MessageType::MsgTimeoutNow {
                    self.0.holding.store(true, Ordering::SeqCst);
                }
                if self.0.holding.load(Ordering::SeqCst) {
                    self.0.held.lock().unwrap().push(m);
                    continue;
                }
            }
            if let Some(h) = handles.get(&m.to) {
                h.step(m);
            }
        }
        Vec::new()
    }
    fn add_peer(&self, _id: u64, _addr: String) {}
}

/// Three drivers over `net`, with `config` (each its own id).
fn start_three(
    net: &Arc<Net>,
    config: &DriverConfig,
) -> Vec<(DriverHandle, JoinHandle<()>, CancellationToken)> {
    start_three_each(net, [config.clone(), config.clone(), config.clone()])
}

/// Three drivers over `net`, node `i + 1` with `configs[i]`.
fn start_three_each(
    net: &Arc<Net>,
    configs: [DriverConfig; 3],
) -> Vec<(DriverHandle, JoinHandle<()>, CancellationToken)> {
    let mut nodes = Vec::new();
    let mut settings = Vec::new();
    for (id, config) in (1..=3).zip(configs) {
        let backend: Arc<dyn StorageBackend> = Arc::new(MemoryBackend::new(Limits::CEILING));
        let mut store = LogStore::in_backend(Arc::clone(&backend), Arc::default()).unwrap();
        store.bootstrap(vec![1, 2, 3]).unwrap();
        let (stop, fatal) = (CancellationToken::new(), CancellationToken::new());
        let config = DriverConfig {
            node_id: id,
            ..config
        };
        let (handle, thread) = spawn(
            &config,
            store,
            backend,
            Arc::new(NetSink(Arc::clone(net))),
            Arc::default(),
            stop.clone(),
            fatal,
        )
        .unwrap();
        net.handles.lock().unwrap().insert(id, handle.clone());
        settings.push(config.lease_settings());
        nodes.push((handle, thread, stop));
    }
    // What the transport reports from each peer's batches.
    for (i, (h, ..)) in nodes.iter().enumerate() {
        for (j, s) in settings.iter().enumerate() {
            if i != j {
                h.peer_event(PeerEvent::LeaseSettings {
                    peer: j as u64 + 1,
                    settings: *s,
                });
            }
        }
    }
    nodes
}

/// Stops the drivers [`start_three`] started and waits for their threads.
fn stop_all(nodes: Vec<(DriverHandle, JoinHandle<()>, CancellationToken)>) {
    for (_, thread, stop) in nodes {
        stop.cancel();
        thread.join().unwrap();
    }
}

/// The driver among `nodes` that leads, once one does.
async fn leader_of(nodes: &[(DriverHandle, JoinHandle<()>, CancellationToken)]) -> DriverHandle {
    tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            if let Some((h, ..)) = nodes.iter().find(|(h, ..)| h.status().role == Role::Leader) {
                return h.clone();
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .expect("a leader")
}

/// A test config with lease reads on, `tick` and 40 election ticks (a lease of 38 ticks less 10 %).
fn lease_config(tick: Duration) -> DriverConfig {
    DriverConfig {
        tick_interval: tick,
        election_ticks: 40,
        lease_reads: true,
        ..test_config(1000, 0)
    }
}

/// ReadIndex rounds `h` has completed.
async fn read_rounds(h: &DriverHandle) -> u64 {
    h.raft_metrics(false)
        .await
        .unwrap()
        .unwrap()
        .metrics
        .read_index
        .count
}

#[tokio::test]
async fn with_lease_reads_a_started_node_ignores_vote_requests_for_an_election_timeout() {
    for lease_reads in [false, true] {
        let net = Arc::new(Net::default());
        // 40 ticks of 50 ms: nobody campaigns, and the hold-off lasts, for the first 2 s.
        let config = DriverConfig {
            tick_interval: Duration::from_millis(50),
            election_ticks: 40,
            lease_reads,
            ..test_config(1000, 0)
        };
        let nodes = start_three(&net, &config);
        let node = &nodes[0].0;
        let mut vote = Message::default();
        vote.set_msg_type(MessageType::MsgRequestVote);
        vote.from = 2;
        vote.to = 1;
        vote.term = 5;
        node.step(vote);
        // Handled after the vote request (one inbox, in order).
        let term = node.detailed_status().await.unwrap().status.term;
        if lease_reads {
            assert!(
                term < 5,
                "a just-started node took the vote request's term {term}"
            );
        } else {
            assert_eq!(term, 5, "without lease reads the request is stepped");
        }
        stop_all(nodes);
    }
}

#[tokio::test]
async fn with_lease_reads_a_read_under_the_lease_needs_no_turn_of_the_driver() {
    let net = Arc::new(Net::default());
    // 40 ticks of 50 ms: a 1.71 s lease, and nobody campaigns for 2 s without heartbeats.
    let config = lease_config(Duration::from_millis(50));
    let nodes = start_three(&net, &config);
    let leader = leader_of(&nodes).await;
    leader.propose(put("k")).await.unwrap();
    let index = leader.read_index().await.unwrap();
    // Every driver stalls at its next send (the leader's is at most a heartbeat away): the driver
    // answers nothing, a read under the lease still is.
    net.stall_senders.store(true, Ordering::SeqCst);
    let deadline = Instant::now() + Duration::from_secs(1);
    while tokio::time::timeout(Duration::from_millis(20), leader.detailed_status())
        .await
        .is_ok()
    {
        assert!(
            Instant::now() < deadline,
            "the leader's driver never stalled"
        );
    }
    for _ in 0..10 {
        let read = tokio::time::timeout(Duration::from_millis(100), leader.read_index())
            .await
            .expect("answered while the driver stalls")
            .unwrap();
        assert!(read >= index, "at the commit index: {read} < {index}");
    }
    net.stall_senders.store(false, Ordering::SeqCst);
    stop_all(nodes);
}

#[tokio::test]
async fn with_lease_reads_a_membership_change_ends_the_lease() {
    let net = Arc::new(Net::default());
    // 25 ms ticks and 40 election ticks: an 855 ms lease, renewed after half of it, far longer than
    // the reads below take.
    let config = lease_config(Duration::from_millis(25));
    let nodes = start_three(&net, &config);
    let leader = leader_of(&nodes).await;
    leader.propose(put("k")).await.unwrap();
    leader.read_index().await.unwrap();
    let before = read_rounds(&leader).await;
    leader.read_index().await.unwrap();
    assert!(
        read_rounds(&leader).await <= before + 1,
        "served from the lease (a round may renew it)"
    );
    let mut single = ConfChangeSingle::default();
    single.set_change_type(ConfChangeType::AddLearnerNode);
    single.node_id = 4;
    let mut cc = ConfChangeV2::default();
    cc.set_changes(vec![single].into());
    cc.context = b"127.0.0.1:1".to_vec().into();
    leader.change_membership(cc).await.unwrap();
    let applied = read_rounds(&leader).await;
    leader.read_index().await.unwrap();
    assert!(
        read_rounds(&leader).await > applied,
        "a membership change ends the lease: the next read takes a round"
    );
    stop_all(nodes);
}

#[tokio::test]
async fn with_lease_reads_a_transfer_in_progress_ends_the_lease() {
    let net = Arc::new(Net::default());
    // 50 ms ticks: a 360 ms lease, and a transfer that waits 500 ms before it gives up.
    let config = DriverConfig {
        tick_interval: Duration::from_millis(50),
        lease_reads: true,
        ..test_config(1000, 0)
    };
    let nodes = start_three(&net, &config);
    let leader = leader_of(&nodes).await;
    leader.propose(put("k")).await.unwrap();
    let rounds = || read_rounds(&leader);
    leader.read_index().await.unwrap();
    let before = rounds().await;
    for _ in 0..5 {
        leader.read_index().await.unwrap();
    }
    assert!(
        rounds().await <= before + 1,
        "reads under the lease need no round (one may renew it)"
    );
    // A transfer to a node that hears nothing stays in progress; its target could be elected at any
    // moment, so every read needs a round, and those rounds give no lease either.
    let leader_id = leader.status().leader_id;
    let target = (1..=3).find(|id| *id != leader_id).unwrap();
    net.isolated.store(target, Ordering::SeqCst);
    // raft-rs drops proposals while a transfer is in progress, which tells the test it still is after
    // the reads: it gives up at the leader's next election timeout, which may fall among the reads,
    // and then they are done again.
    for attempt in 1.. {
        assert!(
            attempt <= 20,
            "the transfer never stayed in progress for 5 reads"
        );
        leader.transfer_leader(target).unwrap();
        // Reads are answered from the published lease without the driver: wait until it has taken
        // the transfer (and withdrawn the lease), or the reads may come before it.
        let deadline = Instant::now() + Duration::from_secs(5);
        while leader.status().transferring_to != target {
            assert!(Instant::now() < deadline, "the transfer never started");
            tokio::task::yield_now().await;
        }
        let before = rounds().await;
        for _ in 0..5 {
            leader.read_index().await.unwrap();
        }
        let after = rounds().await;
        if matches!(leader.propose(put("t")).await, Err(ProposeError::Dropped)) {
            // (A renewal round that was in flight when the transfer started may add one.)
            assert!(
                after >= before + 5,
                "one round per read while the transfer is in progress: {} for 5",
                after - before
            );
            break;
        }
    }
    stop_all(nodes);
}

/// raft-rs acts on a `MsgTimeoutNow` whenever it arrives in the same term, even after the leader gave
/// the transfer up. The old target gets it late, is elected by a follower that confirmed the old
/// leader's lease, and commits; the old leader, cut off from it, must not answer from a lease.
#[tokio::test]
async fn with_lease_reads_a_stale_timeout_now_after_an_aborted_transfer_gives_no_stale_read() {
    let net = Arc::new(Net::default());
    // 40 ticks of 50 ms: a 1.71 s lease. The leader gives a transfer up within one election
    // timeout, before the held target's own timer (at least one election timeout since it last
    // heard from the leader) runs out.
    let config = lease_config(Duration::from_millis(50));
    let nodes = start_three(&net, &config);
    let leader = leader_of(&nodes).await;
    let old = leader.status().leader_id;
    leader.propose(put("k")).await.unwrap();
    let target_id = (1..=3).find(|id| *id != old).unwrap();
    let target = nodes[target_id as usize - 1].0.clone();
    // Wait until the target has the whole log: raft-rs then sends MsgTimeoutNow at once, and the
    // target's late campaign can win (nothing is written below until it does).
    tokio::time::timeout(Duration::from_secs(10), async {
        while target.status().applied < leader.status().commit {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .expect("the target caught up");
    net.hold_from_timeout_now_to
        .store(target_id, Ordering::SeqCst);
    leader.transfer_leader(target_id).unwrap();
    let mut watch = leader.watch();
    tokio::time::timeout(
        Duration::from_secs(10),
        watch.wait_for(|s| s.transferring_to == target_id),
    )
    .await
    .expect("the transfer started")
    .unwrap();
    tokio::time::timeout(
        Duration::from_secs(10),
        watch.wait_for(|s| s.transferring_to == 0),
    )
    .await
    .expect("the transfer gave up")
    .unwrap();
    assert_eq!(leader.status().leader_id, old, "still the leader");
    assert!(
        net.held
            .lock()
            .unwrap()
            .iter()
            .any(|m| m.get_msg_type() == MessageType::MsgTimeoutNow),
        "the MsgTimeoutNow is held"
    );
    // Reads confirmed by the third node alone (the target hears nothing): without the fence they
    // give a lease.
    for _ in 0..5 {
        leader.read_index().await.unwrap();
    }
    // The held messages arrive; the target is elected with the third node and commits, and the old
    // leader hears nothing of it.
    net.cut_to.store(old, Ordering::SeqCst);
    net.release();
    let mut watch = target.watch();
    tokio::time::timeout(
        Duration::from_secs(10),
        watch.wait_for(|s| s.role == Role::Leader),
    )
    .await
    .expect("the late MsgTimeoutNow elects the target")
    .unwrap();
    let committed = target.propose(put("new")).await.unwrap().index;
    let stale = tokio::time::timeout(Duration::from_millis(500), leader.read_index()).await;
    assert!(
        !matches!(stale, Ok(Ok(index)) if index < committed),
        "the old leader answered a read at index {stale:?} after the new one committed {committed}"
    );
    stop_all(nodes);
}

/// A lease is computed from the leader's tick and election ticks, the silence it relies on from each
/// follower's; a follower with a faster tick (or without lease reads, so without the hold-off after a
/// restart) breaks the bound. With mixed settings every read takes a round.
#[tokio::test]
async fn with_lease_reads_voters_with_other_settings_give_no_lease() {
    let config = |tick_ms, lease_reads| DriverConfig {
        tick_interval: Duration::from_millis(tick_ms),
        lease_reads,
        ..test_config(1000, 0)
    };
    for (third, what) in [
        (config(25, true), "a faster tick"),
        (config(50, false), "lease reads off"),
        (config(50, true), "the same settings"),
    ] {
        let net = Arc::new(Net::default());
        let nodes = start_three_each(&net, [config(50, true), config(50, true), third]);
        let leader = leader_of(&nodes).await;
        leader.propose(put("k")).await.unwrap();
        leader.read_index().await.unwrap();
        let before = read_rounds(&leader).await;
        for _ in 0..5 {
            leader.read_index().await.unwrap();
        }
        let rounds = read_rounds(&leader).await - before;
        if what == "the same settings" {
            assert!(
                rounds <= 1,
                "{what}: reads under the lease ({rounds} rounds)"
            );
        } else {
            assert_eq!(rounds, 5, "{what}: one round per read");
        }
        stop_all(nodes);
    }
}

/// One ReadIndex round in flight at a time: reads that arrive while a round waits for its quorum share
/// the next round, started as soon as that one is answered, instead of a round each.
#[tokio::test]
async fn reads_arriving_during_a_round_share_the_next_round() {
    let net = Arc::new(Net::default());
    // A long election timeout: the leader keeps leading while heartbeat responses are dropped.
    let config = DriverConfig {
        election_ticks: 200,
        heartbeat_ticks: 2,
        ..test_config(1000, 0)
    };
    let nodes = start_three(&net, &config);
    let leader = leader_of(&nodes).await;
    leader.propose(put("k")).await.unwrap();
    leader.read_index().await.unwrap();
    let before = read_rounds(&leader).await;
    net.drop_heartbeat_responses.store(true, Ordering::SeqCst);
    let mut reads = Vec::new();
    for _ in 0..10 {
        let h = leader.clone();
        reads.push(tokio::spawn(async move { h.read_index().await }));
        // The read is sent before the status request, which is answered after the turn that took
        // the read: each read reaches the leader in a turn of its own.
        tokio::task::yield_now().await;
        leader.detailed_status().await.unwrap();
    }
    assert!(
        reads.iter().all(|r| !r.is_finished()),
        "no round can be answered without heartbeat responses"
    );
    net.drop_heartbeat_responses.store(false, Ordering::SeqCst);
    for r in reads {
        tokio::time::timeout(Duration::from_secs(10), r)
            .await
            .expect("every read is answered")
            .unwrap()
            .unwrap();
    }
    // Two rounds: the first read's, then one for the nine that came while it ran. On a loaded machine
    // the first may go unanswered for `read_retry` (one election timeout, 1 s here) before the responses
    // flow again; it is then retried together with the nine, and that single round answers all ten.
    // Without the rule every read would start a round of its own (ten).
    let rounds = read_rounds(&leader).await - before;
    assert!(
        (1..=2).contains(&rounds),
        "the first read's round, then one for the nine that came while it ran: {rounds} rounds"
    );
    stop_all(nodes);
}

#[tokio::test]
async fn a_read_on_a_new_leader_waits_for_its_first_commit_instead_of_being_lost() {
    let net = Arc::new(Net::default());
    let nodes = start_three(&net, &test_config(1000, 0));
    let leader = async {
        loop {
            if let Some((h, ..)) = nodes.iter().find(|(h, ..)| h.status().role == Role::Leader) {
                return h.clone();
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    };
    let old = tokio::time::timeout(Duration::from_secs(10), leader)
        .await
        .expect("a leader");
    old.propose(put("k")).await.unwrap();
    // A new leader is elected, but no append response reaches it: its first entry stays
    // uncommitted (raft-rs drops read requests until that entry commits).
    let old_id = nodes
        .iter()
        .position(|(h, ..)| h.status().role == Role::Leader)
        .unwrap() as u64
        + 1;
    let new_id = if old_id == 1 { 2 } else { 1 };
    let new = nodes[new_id as usize - 1].0.clone();
    tokio::time::timeout(Duration::from_secs(10), async {
        while old
            .detailed_status()
            .await
            .unwrap()
            .peers
            .iter()
            .any(|p| p.id == new_id && p.match_index < old.status().commit)
        {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .expect("the follower caught up");
    net.drop_append_responses.store(true, Ordering::SeqCst);
    old.transfer_leader(new_id).unwrap();
    let mut watch = new.watch();
    tokio::time::timeout(
        Duration::from_secs(10),
        watch.wait_for(|s| s.role == Role::Leader),
    )
    .await
    .expect("the transfer elects the new leader")
    .unwrap();
    let read = {
        let new = new.clone();
        tokio::spawn(async move { new.read_index().await })
    };
    // The status request is handled after the read: the read has reached the new leader.
    new.detailed_status().await.unwrap();
    assert!(!read.is_finished(), "nothing can commit yet");
    net.drop_append_responses.store(false, Ordering::SeqCst);
    let index = tokio::time::timeout(Duration::from_secs(10), read)
        .await
        .expect("the read is answered once the new leader commits, not lost")
        .unwrap()
        .unwrap();
    assert!(index >= old.status().commit, "read index {index}");
    stop_all(nodes);
}

#[tokio::test]
async fn with_lease_reads_reads_after_a_confirmed_round_need_no_round() {
    for lease_reads in [false, true] {
        let backend: Arc<dyn StorageBackend> = Arc::new(MemoryBackend::new(Limits::CEILING));
        // 50 ms ticks: a 360 ms lease, far longer than the reads below take.
        let config = DriverConfig {
            tick_interval: Duration::from_millis(50),
            lease_reads,
            ..test_config(1000, 0)
        };
        let (handle, thread, stop, _) = start_single(&backend, &config, &[]).await;
        for i in 0..100 {
            let written = handle.propose(put(&format!("k{i}"))).await.unwrap().index;
            let read = handle.read_index().await.unwrap();
            assert!(
                read >= written,
                "read index {read} before the write at {written}"
            );
        }
        let m = handle.raft_metrics(false).await.unwrap().unwrap().metrics;
        if lease_reads {
            assert!(
                (1..10).contains(&m.read_index.count),
                "{} ReadIndex rounds for 100 reads under a lease",
                m.read_index.count
            );
        } else {
            assert_eq!(
                m.read_index.count, 100,
                "one round per read without a lease"
            );
        }
        stop.cancel();
        thread.join().unwrap();
    }
}

#[tokio::test]
async fn metrics_record_proposals_fsyncs_and_history() {
    let backend: Arc<dyn StorageBackend> = Arc::new(MemoryBackend::new(Limits::CEILING));
    let (handle, thread, stop, _) = start_single(&backend, &test_config(1000, 0), &[]).await;
    for i in 0..20 {
        handle.propose(put(&format!("k{i}"))).await.unwrap();
    }
    handle.read_index().await.unwrap();
    let _ = handle.propose(vec![0xff, 0x01]).await;
    // Samples are taken every 10 ms: wait (with a deadline) for a few.
    let deadline = Instant::now() + Duration::from_secs(10);
    let report = loop {
        let r = handle
            .raft_metrics(true)
            .await
            .unwrap()
            .expect("metrics on");
        if r.metrics.history.len() >= 3 && r.metrics.history.last().is_some_and(|h| h.commit >= 22)
        {
            break r;
        }
        assert!(Instant::now() < deadline, "no history: {r:?}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    let m = &report.metrics;
    assert_eq!(m.proposals_committed, 20);
    assert_eq!(m.proposals_rejected, 1);
    assert_eq!(m.propose_to_apply.count, 20);
    assert_eq!(m.read_index.count, 1);
    assert!(m.log_fsync.count >= 1 && m.log_fsync_entries >= 21, "{m:?}");
    assert!(m.ready_handling.count >= 1);
    assert!(m.elections >= 1, "the node campaigned: {m:?}");
    assert!(m.followers.is_empty(), "a single voter has no followers");
    assert_eq!(report.status.role, Role::Leader);
    assert!(report.last_index >= report.status.commit);
    let last = m.history.last().unwrap();
    assert_eq!(last.role, kiwi_proto::v1::RaftRole::Leader);
    stop.cancel();
    thread.join().unwrap();
}

#[tokio::test]
async fn invalid_committed_entries_are_applied_as_no_ops() {
    let backend: Arc<dyn StorageBackend> = Arc::new(MemoryBackend::new(Limits::CEILING));
    let (handle, thread, stop, fatal) = start_single(&backend, &test_config(1000, 0), &[]).await;
    let garbage = handle.propose(vec![0xff, 0xff, 0xff, 0x01]).await;
    assert!(
        matches!(&garbage, Err(ProposeError::Rejected(why)) if why.contains("decode")),
        "{garbage:?}"
    );
    let huge_key = "k".repeat(kiwi_storage::MAX_KEY_BYTES_CEILING + 1);
    let huge = handle.propose(put(&huge_key)).await;
    assert!(
        matches!(&huge, Err(ProposeError::Rejected(why)) if why.contains("ceiling")),
        "{huge:?}"
    );
    let empty_cmd = RaftCommand {
        request_id: "no-command".into(),
        command: None,
    }
    .encode_to_vec();
    let empty = handle.propose(empty_cmd).await;
    assert!(matches!(empty, Err(ProposeError::Rejected(_))), "{empty:?}");
    // The node goes on: the next command applies, after the rejected ones.
    let ok = handle.propose(put("fine")).await.unwrap();
    assert_eq!(state_machine::applied_index(&*backend).unwrap(), ok.index);
    assert_eq!(handle.status().rejected_entries, 3);
    let stored = backend.read(KeySpace::Data, b"fine").unwrap().unwrap();
    assert_eq!(crate::raft::mvcc::decode_stored(&stored).1, b"v");
    assert!(!fatal.is_cancelled(), "an invalid entry is never fatal");
    stop.cancel();
    thread.join().unwrap();
}

#[tokio::test]
async fn compaction_keeps_the_slack_behind_the_applied_index() {
    let backend: Arc<dyn StorageBackend> = Arc::new(MemoryBackend::new(Limits::CEILING));
    let (handle, thread, stop, _) = start_single(&backend, &test_config(10, 50), &[]).await;
    for i in 0..200 {
        handle.propose(put(&format!("k{i}"))).await.unwrap();
    }
    let st = handle.status();
    assert!(st.first_index > 1, "compacted at all: {st:?}");
    assert!(
        st.applied - (st.first_index - 1) >= 50,
        "at least the slack of 50 applied entries stays in the log: {st:?}"
    );
    stop.cancel();
    thread.join().unwrap();
}

#[tokio::test]
async fn a_panic_in_the_driver_stops_the_node() {
    let backend = FailingBackend::new();
    let dyn_backend: Arc<dyn StorageBackend> = backend.clone();
    let (handle, thread, _stop, fatal) =
        start_single(&dyn_backend, &test_config(1000, 0), &[]).await;
    handle.propose(put("a")).await.unwrap();
    backend.panic.store(true, Ordering::SeqCst);
    let res = tokio::time::timeout(Duration::from_secs(10), handle.propose(put("b")))
        .await
        .expect("the caller is answered, not left waiting");
    assert_eq!(res, Err(ProposeError::StoppedAfterSubmit));
    tokio::time::timeout(Duration::from_secs(10), fatal.cancelled())
        .await
        .expect("a panic on the driver thread is reported as a failure (no zombie)");
    thread.join().unwrap();
    assert_eq!(handle.propose(put("c")).await, Err(ProposeError::Stopped));
}

impl StorageBackend for FailingBackend {
    fn kind(&self) -> BackendKind {
        BackendKind::Memory
    }
    fn limits(&self) -> Limits {
        self.inner.limits()
    }
    fn read(&self, space: KeySpace, key: &[u8]) -> kiwi_storage::Result<Option<Vec<u8>>> {
        self.inner.read(space, key)
    }
    fn batch_write(&self, batch: WriteBatch, opts: WriteOptions) -> kiwi_storage::Result<()> {
        assert!(
            !self.panic.load(Ordering::SeqCst),
            "injected panic in the storage engine"
        );
        if self.fail.load(Ordering::SeqCst) {
            return Err(kiwi_storage::Error::Engine {
                backend: BackendKind::Memory,
                detail: "injected I/O error".into(),
            });
        }
        self.inner.batch_write(batch, opts)
    }
    fn scan(&self, space: KeySpace, scan: &Scan) -> kiwi_storage::Result<Vec<KvPair>> {
        self.inner.scan(space, scan)
    }
    fn snapshot(&self) -> kiwi_storage::Result<Box<dyn StorageSnapshot>> {
        self.inner.snapshot()
    }
}

fn put(key: &str) -> Vec<u8> {
    RaftCommand {
        request_id: String::new(),
        command: Some(raft_command::Command::Write(WriteBatchCommand {
            ops: vec![WriteOp {
                op: Some(write_op::Op::Put(write_op::Put {
                    key: key.as_bytes().to_vec(),
                    value: b"v".to_vec(),
                    lease: 0,
                })),
            }],
        })),
    }
    .encode_to_vec()
}

#[tokio::test]
async fn a_storage_error_stops_the_driver_without_acknowledging() {
    let backend = FailingBackend::new();
    let dyn_backend: Arc<dyn StorageBackend> = backend.clone();
    let mut store = LogStore::in_backend(Arc::clone(&dyn_backend), Arc::default()).unwrap();
    store.bootstrap(vec![1]).unwrap();
    let config = DriverConfig {
        node_id: 1,
        tick_interval: Duration::from_millis(5),
        election_ticks: 10,
        heartbeat_ticks: 2,
        compaction_threshold: 1000,
        compaction_slack: 0,
        lease_reads: false,
        metrics: MetricsSettings {
            enabled: true,
            collection_interval: Duration::from_millis(10),
            retention_period: Duration::from_secs(10),
        },
        metrics_export: RaftExport::noop(),
    };
    let (stop, fatal) = (CancellationToken::new(), CancellationToken::new());
    let (handle, thread) = spawn(
        &config,
        store,
        Arc::clone(&dyn_backend),
        Arc::new(NoPeers),
        Arc::default(),
        stop.clone(),
        fatal.clone(),
    )
    .unwrap();
    let mut watch = handle.watch();
    tokio::time::timeout(
        Duration::from_secs(10),
        watch.wait_for(|s| s.role == Role::Leader),
    )
    .await
    .expect("single node elects itself")
    .unwrap();
    let ok = handle.propose(put("a")).await.unwrap();
    let applied_before = state_machine::applied_index(&*dyn_backend).unwrap();
    assert_eq!(applied_before, ok.index);

    backend.fail.store(true, Ordering::SeqCst);
    let res = tokio::time::timeout(Duration::from_secs(10), handle.propose(put("b")))
        .await
        .expect("the caller is answered, not left waiting");
    assert_eq!(res, Err(ProposeError::StoppedAfterSubmit));
    tokio::time::timeout(Duration::from_secs(10), fatal.cancelled())
        .await
        .expect("the driver reports the failure");
    thread.join().unwrap();
    backend.fail.store(false, Ordering::SeqCst);
    assert_eq!(
        state_machine::applied_index(&*dyn_backend).unwrap(),
        applied_before
    );
    assert_eq!(
        backend.read(KeySpace::Data, b"b").unwrap(),
        None,
        "nothing past the failure"
    );
    assert_eq!(handle.propose(put("c")).await, Err(ProposeError::Stopped));
}
