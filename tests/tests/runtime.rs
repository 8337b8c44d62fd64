//! The prioritized, self-scaling request pipeline on a real node: runtime policy through `NodeAdmin`, the
//! storage pool growing under load and shrinking after it, and LOW shed before HIGH on a saturated node.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use kiwi_proto::v1::{
    BatchWriteRequest, Consistency, GetRequest, GetRuntimePolicyRequest, Priority, PutRequest,
    RequestHeader, RuntimeStatsRequest, ScanRequest, WriteOp, write_op,
};
use kiwi_tests::cluster::{Cluster, ClusterOptions, DEADLINE, header};
use tonic::Code;

fn one_node(extra: &str) -> ClusterOptions {
    ClusterOptions {
        nodes: 1,
        extra_config: extra.to_string(),
        ..ClusterOptions::default()
    }
}

/// 20,000 keys of 200 bytes, so a full scan is real storage work.
async fn preload(cluster: &Cluster) {
    let mut kv = cluster.kv(1);
    for chunk in 0..10 {
        let ops = (0..2000)
            .map(|i| WriteOp {
                op: Some(write_op::Op::Put(write_op::Put {
                    key: format!("k{:06}", chunk * 2000 + i).into_bytes(),
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

fn scan(priority: Priority, timeout: Duration) -> ScanRequest {
    ScanRequest {
        header: Some(RequestHeader {
            priority: priority as i32,
            timeout: prost_types::Duration::try_from(timeout).ok(),
            ..RequestHeader::default()
        }),
        limit: 10_000,
        consistency: Consistency::Serializable as i32,
        // Small answers: the work is the storage scan, in the pool, not encoding.
        keys_only: true,
        ..ScanRequest::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_runtime_policy_is_refused_and_the_old_one_stays() {
    let cluster = Cluster::start(one_node("\n[runtime]\nnetwork_threads = 3\n")).await;
    let mut admin = cluster.admin(1);
    let stats = admin
        .runtime_stats(RuntimeStatsRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        stats.network_threads, 3,
        "runtime.network_threads is what runs"
    );
    let before = admin
        .get_runtime_policy(GetRuntimePolicyRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        before.scaling.as_ref().unwrap().min_storage_threads,
        4,
        "the config's defaults"
    );
    let mut bad = before;
    let sc = bad.scaling.as_mut().unwrap();
    sc.min_storage_threads = 40;
    sc.max_storage_threads = 8;
    let err = admin.set_runtime_policy(bad).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(
        err.message()
            .contains("runtime.scaling.min_storage_threads"),
        "{err}"
    );
    let after = admin
        .get_runtime_policy(GetRuntimePolicyRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(after, before, "the old policy stays");

    let mut good = before;
    good.priority.as_mut().unwrap().enabled = false;
    good.scaling.as_mut().unwrap().max_storage_threads = 12;
    let now = admin.set_runtime_policy(good).await.unwrap().into_inner();
    assert_eq!(now, good);
    assert_eq!(
        admin
            .get_runtime_policy(GetRuntimePolicyRequest {})
            .await
            .unwrap()
            .into_inner(),
        good
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_storage_pool_grows_under_a_burst_and_shrinks_after_it() {
    let cluster = Cluster::start(one_node(
        "\n[runtime.scaling]\nmin_storage_threads = 1\nmax_storage_threads = 6\nscale_increment = 1\n\
         scale_up_threshold = 50\nscale_down_threshold = 10\nevaluation_interval_ms = 100\n",
    ))
    .await;
    preload(&cluster).await;
    let mut admin = cluster.admin(1);
    let stats = |s: kiwi_proto::v1::RuntimeStatsResponse| s.storage_pool.unwrap();
    assert_eq!(
        stats(
            admin
                .runtime_stats(RuntimeStatsRequest {})
                .await
                .unwrap()
                .into_inner()
        )
        .current_threads,
        1
    );

    let stop = Arc::new(AtomicBool::new(false));
    let mut tasks = Vec::new();
    for _ in 0..16 {
        let mut kv = cluster.kv(1);
        let stop = Arc::clone(&stop);
        tasks.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let _ = kv
                    .scan(scan(Priority::Normal, Duration::from_secs(10)))
                    .await;
            }
        }));
    }
    let deadline = Instant::now() + DEADLINE;
    let peak = loop {
        let pool = stats(
            admin
                .runtime_stats(RuntimeStatsRequest {})
                .await
                .unwrap()
                .into_inner(),
        );
        if pool.current_threads >= 3 {
            break pool.current_threads;
        }
        assert!(
            Instant::now() < deadline,
            "the pool did not grow under load: {pool:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        t.await.unwrap();
    }
    let deadline = Instant::now() + DEADLINE;
    let pool = loop {
        let pool = stats(
            admin
                .runtime_stats(RuntimeStatsRequest {})
                .await
                .unwrap()
                .into_inner(),
        );
        if pool.current_threads == 1 {
            break pool;
        }
        assert!(
            Instant::now() < deadline,
            "the pool did not shrink back after the burst: {pool:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(peak <= 6, "never above max");
    assert!(
        pool.events.iter().any(|e| e.to_threads > e.from_threads),
        "{:?}",
        pool.events
    );
    assert!(
        pool.events.iter().any(|e| e.to_threads < e.from_threads),
        "{:?}",
        pool.events
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_a_saturated_node_low_is_shed_and_high_keeps_completing() {
    // One fixed storage thread, so a few dozen full scans saturate it.
    let cluster = Cluster::start(one_node(
        "\n[runtime.scaling]\nenabled = false\nmin_storage_threads = 1\nmax_storage_threads = 1\n",
    ))
    .await;
    preload(&cluster).await;
    let stop = Arc::new(AtomicBool::new(false));
    // Per class: served, shed at admission, expired in the queue (never ran).
    let counts = Arc::new([
        AtomicU64::new(0),
        AtomicU64::new(0),
        AtomicU64::new(0),
        AtomicU64::new(0),
        AtomicU64::new(0),
        AtomicU64::new(0),
    ]);
    let mut tasks = Vec::new();
    for i in 0..36 {
        let (priority, slot) = if i < 32 {
            (Priority::Low, 0)
        } else {
            (Priority::High, 3)
        };
        let mut kv = cluster.kv(1);
        let stop = Arc::clone(&stop);
        let counts = Arc::clone(&counts);
        tasks.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                match kv.scan(scan(priority, Duration::from_secs(1))).await {
                    Ok(_) => counts[slot].fetch_add(1, Ordering::Relaxed),
                    Err(e) if e.code() == Code::ResourceExhausted => {
                        assert!(e.metadata().get("retry-after-ms").is_some(), "{e:?}");
                        counts[slot + 1].fetch_add(1, Ordering::Relaxed)
                    }
                    // Admitted before the node had learnt how long these scans take: answered without
                    // running, which is allowed (it did nothing); counted.
                    Err(e)
                        if e.code() == Code::DeadlineExceeded
                            && e.message().contains("never ran") =>
                    {
                        counts[slot + 2].fetch_add(1, Ordering::Relaxed)
                    }
                    Err(e) => panic!("unexpected error for {priority:?}: {e}"),
                };
            }
        }));
    }
    tokio::time::sleep(Duration::from_secs(4)).await;
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        t.await.unwrap();
    }
    let [
        low_ok,
        low_shed,
        low_expired,
        high_ok,
        high_shed,
        high_expired,
    ] = [0, 1, 2, 3, 4, 5].map(|i| counts[i].load(Ordering::Relaxed));
    println!(
        "LOW served {low_ok} shed {low_shed} expired {low_expired}; \
         HIGH served {high_ok} shed {high_shed} expired {high_expired}"
    );
    assert!(low_shed > 0, "LOW is shed on a saturated node");
    assert_eq!(high_shed, 0, "HIGH is not shed while LOW still is");
    assert_eq!(high_expired, 0, "HIGH never waits out its deadline");
    assert!(
        low_expired * 10 < low_shed,
        "LOW is refused at admission, not left to expire: {low_expired} expired, {low_shed} shed"
    );
    assert!(high_ok > 0, "HIGH keeps completing");
    // 4 HIGH clients against 32 LOW ones still get more than their head count's share.
    assert!(high_ok * 8 > low_ok, "HIGH {high_ok} vs LOW {low_ok}");
}

/// The `_count` of a histogram series for `priority` in a Prometheus text answer (0 when absent).
fn histogram_count(text: &str, metric: &str, priority: &str) -> u64 {
    let label = format!("priority=\"{priority}\"");
    text.lines()
        .filter(|l| l.starts_with(&format!("{metric}_count{{")) && l.contains(&label))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_to_an_idle_node_is_handed_to_raft_without_a_worker() {
    let cluster = Cluster::start(one_node("")).await;
    let writes = 30;
    for i in 0..writes {
        cluster.must_put(format!("idle-{i}").as_bytes(), b"v").await;
    }
    let text = kiwi_tests::http::get(cluster.metrics_addr(1), "/metrics/runtime", None)
        .await
        .body;
    let waited = histogram_count(&text, "kiwi_runtime_queue_wait_seconds", "normal");
    let processed = histogram_count(&text, "kiwi_runtime_processing_seconds", "normal");
    // Nothing was queued when each write arrived: it passed the channel with no wait (counted) and its
    // hand-off to Raft ran on the network thread, not on a storage worker.
    assert!(waited >= writes, "queue waits counted: {waited}\n{text}");
    assert_eq!(processed, 0, "writes processed by a worker\n{text}");

    // A write whose deadline has passed by the time it is handed over is not served at once: the queue
    // refuses it as expired, and it never runs.
    let mut kv = cluster.kv(1);
    let err = kv
        .put(PutRequest {
            prev_kv: false,
            header: Some(RequestHeader {
                timeout: Some(prost_types::Duration {
                    seconds: 0,
                    nanos: 1,
                }),
                ..RequestHeader::default()
            }),
            key: b"too-late".to_vec(),
            value: b"v".to_vec(),
            lease: 0,
        })
        .await
        .expect_err("a 1 ns deadline cannot be met");
    assert_eq!(err.code(), Code::DeadlineExceeded, "{err}");
    assert!(err.message().contains("never ran"), "{err}");
    let read = kv
        .get(GetRequest {
            header: Some(header()),
            key: b"too-late".to_vec(),
            ..GetRequest::default()
        })
        .await
        .expect("get")
        .into_inner();
    assert!(!read.found, "the expired write was applied: {read:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_point_read_on_an_idle_node_is_served_without_a_worker_unless_low() {
    let cluster = Cluster::start(one_node("")).await;
    cluster.must_put(b"idle-read", b"v").await;
    let mut kv = cluster.kv(1);
    let reads = 30;
    for priority in [Priority::Normal, Priority::Low] {
        for consistency in [Consistency::Linearizable, Consistency::Serializable] {
            for _ in 0..reads / 2 {
                let got = kv
                    .get(GetRequest {
                        header: Some(RequestHeader {
                            priority: priority as i32,
                            ..header()
                        }),
                        key: b"idle-read".to_vec(),
                        consistency: consistency as i32,
                        ..GetRequest::default()
                    })
                    .await
                    .expect("get")
                    .into_inner();
                assert!(got.found && got.value == b"v", "{got:?}");
            }
        }
    }
    let text = kiwi_tests::http::get(cluster.metrics_addr(1), "/metrics/runtime", None)
        .await
        .body;
    let count = |metric, class| histogram_count(&text, metric, class);
    // Nothing was queued when each NORMAL read arrived: it passed the channel with no wait (counted) and
    // was read on the network thread. LOW reads always take the queue and a worker.
    assert!(
        count("kiwi_runtime_queue_wait_seconds", "normal") >= reads,
        "queue waits counted\n{text}"
    );
    assert_eq!(
        count("kiwi_runtime_processing_seconds", "normal"),
        0,
        "NORMAL point reads processed by a worker\n{text}"
    );
    assert!(
        count("kiwi_runtime_processing_seconds", "low") >= reads,
        "LOW point reads processed by a worker\n{text}"
    );

    // A range read is not a point read: it takes a worker whatever is queued.
    kv.scan(ScanRequest {
        header: Some(header()),
        start_key: b"idle".to_vec(),
        end_key: b"idlf".to_vec(),
        limit: 10,
        ..ScanRequest::default()
    })
    .await
    .expect("scan");
    let text = kiwi_tests::http::get(cluster.metrics_addr(1), "/metrics/runtime", None)
        .await
        .body;
    assert_eq!(
        histogram_count(&text, "kiwi_runtime_processing_seconds", "normal"),
        1,
        "the scan ran on a worker\n{text}"
    );
}
