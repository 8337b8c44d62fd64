//! Leases, sessions, locks and elections against real 3-node clusters: expiry by the leader's clock
//! only, keys deleted at one revision with watch events, leases kept alive through leader kills and a
//! whole-cluster restart, `kiwi lock` and elections.

use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use kiwi_client::concurrency::{Election, Mutex, Session};
use kiwi_client::{CallOptions, Client, ClientOptions, Error, KeyRange, WatchUpdate, key_event};
use kiwi_tests::cluster::{Cluster, ClusterOptions};

fn client(cluster: &Cluster) -> Client {
    Client::connect(&cluster.endpoints(), ClientOptions::default()).unwrap()
}

fn not_found(e: &Error) -> bool {
    matches!(e, Error::Rpc(s) if s.code() == tonic::Code::NotFound)
}

/// Keeps `id` alive every 300 ms until `stop`; records whether a keepalive ever found it gone.
fn keep_alive(
    client: Arc<Client>,
    id: u64,
    stop: Arc<AtomicBool>,
) -> tokio::task::JoinHandle<bool> {
    tokio::spawn(async move {
        let opts = CallOptions {
            timeout: Some(Duration::from_millis(800)),
            ..CallOptions::default()
        };
        while !stop.load(Ordering::Relaxed) {
            if let Ok(0) = client.lease_keep_alive(id, &opts).await {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
        true
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lease_takes_its_keys_after_its_ttl_not_before_and_revocation_is_one_write() {
    let cluster = Cluster::start(ClusterOptions::default()).await;
    let c = client(&cluster);
    let o = CallOptions::default();
    // A TTL of 0 is refused, naming the field; the floor is 1.5 election timeouts (10 ticks of
    // 50 ms) rounded up to 1 s.
    let e = c.lease_grant(0, 0, &o).await.unwrap_err();
    assert!(
        matches!(&e, Error::InvalidArgument(m) if m.contains("ttl")),
        "{e}"
    );
    let (short, ttl) = c.lease_grant(1, 0, &o).await.unwrap();
    assert_eq!(ttl, 1);
    c.lease_revoke(short, &o).await.unwrap();
    let (id, ttl) = c.lease_grant(3, 0, &o).await.unwrap();
    let granted = Instant::now();
    assert_eq!(ttl, 3);
    // A chosen id, and the same id again.
    assert_eq!(c.lease_grant(5, 77, &o).await.unwrap(), (77, 5));
    let e = c.lease_grant(5, 77, &o).await.unwrap_err();
    assert!(e.to_string().contains("lease 77 already exists"), "{e}");

    let from = c.put(b"l/free", b"0", &o).await.unwrap();
    c.put_leased(b"l/a", b"1", id, &o).await.unwrap();
    c.put_leased(b"l/b", b"1", id, &o).await.unwrap();
    c.put_leased(b"l/c", b"1", id, &o).await.unwrap();
    // A put without the lease detaches the key; a put on a lease that does not exist is refused.
    c.put(b"l/c", b"2", &o).await.unwrap();
    let e = c.put_leased(b"l/x", b"1", 12345, &o).await.unwrap_err();
    assert!(
        not_found(&e) && e.to_string().contains("lease 12345 not found"),
        "{e}"
    );
    assert_eq!(c.get_kv(b"l/a", 0, &o).await.unwrap().unwrap().lease, id);
    let t = c.lease_time_to_live(id, true, &o).await.unwrap();
    assert_eq!(t.granted_ttl, 3);
    assert!(t.ttl >= 1 && t.ttl <= 3, "{t:?}");
    assert_eq!(t.keys, vec![b"l/a".to_vec(), b"l/b".to_vec()]);
    assert!(c.lease_leases(&o).await.unwrap().contains(&id));

    // Nobody keeps it alive: its keys go after the TTL, both at one revision, and not before.
    let mut w = c.watch(&KeyRange::Prefix(b"l/".to_vec()), from + 1, false);
    let mut deletes = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    while deletes.len() < 2 {
        let left = deadline.saturating_duration_since(Instant::now());
        let update = tokio::time::timeout(left, w.next())
            .await
            .expect("the lease's keys were deleted within 30 s")
            .unwrap();
        let WatchUpdate::Events(events) = update else {
            panic!("compacted")
        };
        for e in events {
            if e.r#type == key_event::EventType::Delete as i32 {
                let kv = e.kv.unwrap();
                deletes.push((kv.key, kv.mod_revision));
            }
        }
    }
    assert!(
        granted.elapsed() >= Duration::from_secs(3),
        "deleted {:?} after the grant, before its TTL",
        granted.elapsed()
    );
    assert_eq!(deletes[0].1, deletes[1].1, "one revision: {deletes:?}");
    assert_eq!(
        deletes.iter().map(|d| d.0.clone()).collect::<Vec<_>>(),
        vec![b"l/a".to_vec(), b"l/b".to_vec()]
    );
    assert_eq!(c.get(b"l/c", &o).await.unwrap().as_deref(), Some(&b"2"[..]));
    assert_eq!(
        c.get(b"l/free", &o).await.unwrap().as_deref(),
        Some(&b"0"[..])
    );
    let e = c.lease_time_to_live(id, false, &o).await.unwrap_err();
    assert!(not_found(&e), "{e}");
    assert_eq!(c.lease_keep_alive(id, &o).await.unwrap(), 0);
    let e = c.put_leased(b"l/a", b"again", id, &o).await.unwrap_err();
    assert!(not_found(&e), "{e}");

    // Revoked by hand: what is attached goes at once, and the answer counts it.
    c.put_leased(b"l/m", b"1", 77, &o).await.unwrap();
    assert_eq!(c.lease_revoke(77, &o).await.unwrap(), 1);
    assert_eq!(c.get(b"l/m", &o).await.unwrap(), None);
    assert!(not_found(&c.lease_revoke(77, &o).await.unwrap_err()));
    assert!(!c.lease_leases(&o).await.unwrap().contains(&77));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leases_kept_alive_survive_ten_leader_kills() {
    let mut cluster = Cluster::start(ClusterOptions::default()).await;
    let c = Arc::new(client(&cluster));
    let o = CallOptions::default();
    let (id, _) = c.lease_grant(2, 0, &o).await.unwrap();
    let from = c.put_leased(b"alive", b"1", id, &o).await.unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let keeper = keep_alive(Arc::clone(&c), id, Arc::clone(&stop));
    // The key's deletion would show in this watch.
    let watcher = {
        let c = Arc::clone(&c);
        tokio::spawn(async move {
            let mut w = c.watch(&KeyRange::key(b"alive"), from + 1, false);
            loop {
                if let Ok(WatchUpdate::Events(events)) = w.next().await
                    && events
                        .iter()
                        .any(|e| e.r#type == key_event::EventType::Delete as i32)
                {
                    return;
                }
            }
        })
    };
    for round in 0..10 {
        let leader = cluster.wait_leader().await;
        cluster.kill(leader);
        // A new leader elected by the others (with a fresh full TTL for the lease).
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(l) = cluster.current_leader().await
                && l != leader
            {
                break;
            }
            assert!(Instant::now() < deadline, "round {round}: no new leader");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        cluster.restart(leader);
        // Keepalives reach the new leader before the next kill.
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            match c.lease_keep_alive(id, &o).await {
                Ok(ttl) => {
                    assert_ne!(ttl, 0, "round {round}: the lease expired");
                    break;
                }
                Err(e) => assert!(Instant::now() < deadline, "round {round}: {e}"),
            }
        }
    }
    stop.store(true, Ordering::Relaxed);
    assert!(keeper.await.unwrap(), "a keepalive found the lease gone");
    assert!(!watcher.is_finished(), "the kept-alive key was deleted");
    watcher.abort();
    assert_eq!(
        c.get(b"alive", &o).await.unwrap().as_deref(),
        Some(&b"1"[..])
    );
    assert_eq!(
        c.lease_time_to_live(id, true, &o).await.unwrap().keys,
        vec![b"alive".to_vec()]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_whole_cluster_restart_keeps_live_leases_and_expires_the_rest() {
    let mut cluster = Cluster::start(ClusterOptions::default()).await;
    let c = Arc::new(client(&cluster));
    let o = CallOptions::default();
    let (kept, _) = c.lease_grant(3, 0, &o).await.unwrap();
    let (dropped, _) = c.lease_grant(3, 0, &o).await.unwrap();
    c.put_leased(b"kept", b"1", kept, &o).await.unwrap();
    c.put_leased(b"dropped", b"1", dropped, &o).await.unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let keeper = keep_alive(Arc::clone(&c), kept, Arc::clone(&stop));
    // A power cut: every node SIGKILLed, then started again.
    for id in cluster.ids() {
        cluster.kill(id);
    }
    for id in cluster.ids() {
        cluster.restart(id);
    }
    cluster.wait_leader().await;
    let restarted = Instant::now();
    // The lease nobody keeps alive goes a TTL after the new leader's election; the other stays.
    let deadline = Instant::now() + Duration::from_secs(30);
    while c.get(b"dropped", &o).await.unwrap().is_some() {
        assert!(Instant::now() < deadline, "the dropped lease's key stayed");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(restarted.elapsed() >= Duration::from_secs(2));
    tokio::time::sleep(Duration::from_secs(4)).await;
    stop.store(true, Ordering::Relaxed);
    assert!(
        keeper.await.unwrap(),
        "a keepalive found the kept lease gone"
    );
    assert_eq!(
        c.get(b"kept", &o).await.unwrap().as_deref(),
        Some(&b"1"[..])
    );
    assert!(not_found(
        &c.lease_time_to_live(dropped, false, &o).await.unwrap_err()
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn locks_and_elections_serve_in_order_and_pass_on_when_a_holder_goes() {
    let cluster = Cluster::start(ClusterOptions::default()).await;
    let c = Arc::new(client(&cluster));
    // Three sessions queue for one lock: each gets it after the previous one lets go, in order.
    let s1 = Session::new(Arc::clone(&c), 2).await.unwrap();
    let s2 = Session::new(Arc::clone(&c), 2).await.unwrap();
    let s3 = Session::new(Arc::clone(&c), 2).await.unwrap();
    let mut m1 = Mutex::new(&s1, "locks/x");
    m1.lock().await.unwrap();
    let order = Arc::new(std::sync::Mutex::new(Vec::new()));
    let waiter = |s: &Session, n: u32| {
        let mut m = Mutex::new(s, "locks/x");
        let order = Arc::clone(&order);
        async move {
            m.lock().await.unwrap();
            order.lock().unwrap().push(n);
            m
        }
    };
    let w2 = tokio::spawn(waiter(&s2, 2));
    tokio::time::sleep(Duration::from_millis(300)).await;
    let w3 = tokio::spawn(waiter(&s3, 3));
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(order.lock().unwrap().is_empty(), "nobody got a held lock");
    m1.unlock().await.unwrap();
    let m2 = w2.await.unwrap();
    assert_eq!(*order.lock().unwrap(), vec![2]);
    // The holder's session ends without an unlock (dropped: its lease is revoked): the lock passes on.
    drop(s2);
    let m3 = tokio::time::timeout(Duration::from_secs(30), w3)
        .await
        .expect("the lock passed on after the holder's lease ended")
        .unwrap();
    assert_eq!(*order.lock().unwrap(), vec![2, 3]);
    assert!(m3.revision() > m2.revision());

    // Elections: the first candidate leads; the second leads once the first resigns.
    let mut e1 = Election::new(&s1, "elect/x");
    e1.campaign(b"one").await.unwrap();
    let mut e3 = Election::new(&s3, "elect/x");
    let second = tokio::spawn(async move {
        e3.campaign(b"three").await.unwrap();
        e3
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(e1.leader().await.unwrap().unwrap().value, b"one");
    e1.proclaim(b"one again").await.unwrap();
    assert_eq!(e1.leader().await.unwrap().unwrap().value, b"one again");
    assert!(!second.is_finished());
    e1.resign().await.unwrap();
    let e3 = tokio::time::timeout(Duration::from_secs(10), second)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(e3.leader().await.unwrap().unwrap().value, b"three");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_leases_and_two_kiwi_locks_never_overlap() {
    let cluster = Cluster::start(ClusterOptions::default()).await;
    let eps = cluster.endpoints().join(",");
    let kiwi = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_kiwi"))
            .args(args)
            .env("KIWI_ENDPOINTS", &eps)
            .output()
            .unwrap()
    };
    let out = kiwi(&["lease", "grant", "30s"]);
    assert!(out.status.success(), "{out:?}");
    let line = String::from_utf8_lossy(&out.stdout).into_owned();
    let id = line.split_whitespace().nth(1).unwrap().to_string();
    assert!(line.contains("granted with TTL 30s"), "{line}");
    assert!(
        kiwi(&["put", "svc/a", "up", "--lease", &id])
            .status
            .success()
    );
    let ttl = kiwi(&["--json", "lease", "ttl", &id, "--keys"]);
    let v: serde_json::Value = serde_json::from_slice(&ttl.stdout).unwrap();
    assert_eq!(v["granted_ttl"], 30);
    assert_eq!(v["keys"], serde_json::json!(["svc/a"]));
    assert!(String::from_utf8_lossy(&kiwi(&["lease", "list"]).stdout).contains(&id));
    let kept = kiwi(&["lease", "keep-alive", &id, "--once"]);
    assert!(
        String::from_utf8_lossy(&kept.stdout).contains("TTL 30s"),
        "{kept:?}"
    );
    let revoked = kiwi(&["lease", "revoke", &id]);
    assert!(String::from_utf8_lossy(&revoked.stdout).contains("1 keys deleted"));
    assert_eq!(kiwi(&["get", "svc/a"]).status.code(), Some(1));
    assert_eq!(kiwi(&["lease", "ttl", &id]).status.code(), Some(1));
    let bad = kiwi(&["put", "svc/b", "x", "--lease", "zz"]);
    assert!(String::from_utf8_lossy(&bad.stderr).contains("not a lease id"));

    // Two `kiwi lock` runs on one lock: their critical sections never overlap.
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("log");
    let script = format!("echo start >> {0}; sleep 1; echo end >> {0}", log.display());
    let spawn = || {
        Command::new(env!("CARGO_BIN_EXE_kiwi"))
            .args(["lock", "jobs", "--", "sh", "-c", &script])
            .env("KIWI_ENDPOINTS", &eps)
            .spawn()
            .unwrap()
    };
    let (mut a, mut b) = (spawn(), spawn());
    assert!(a.wait().unwrap().success());
    assert!(b.wait().unwrap().success());
    let lines = std::fs::read_to_string(&log).unwrap();
    assert_eq!(lines, "start\nend\nstart\nend\n", "overlapping sections");
    // The command's exit status is kiwi lock's.
    let failed = kiwi(&["lock", "jobs", "--", "sh", "-c", "exit 3"]);
    assert_eq!(failed.status.code(), Some(3));

    // A holder killed with SIGKILL: the lock passes on once its lease (2 s) expires.
    let mut holder = Command::new(env!("CARGO_BIN_EXE_kiwi"))
        .args(["lock", "jobs", "--ttl", "2s", "--", "sleep", "60"])
        .env("KIWI_ENDPOINTS", &eps)
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut err = std::io::BufReader::new(holder.stderr.take().unwrap());
    let mut first = String::new();
    std::io::BufRead::read_line(&mut err, &mut first).unwrap();
    assert!(first.contains("holding lock"), "{first}");
    holder.kill().unwrap();
    holder.wait().unwrap();
    let killed = Instant::now();
    let next = kiwi(&["lock", "jobs", "--", "true"]);
    assert!(next.status.success(), "{next:?}");
    assert!(
        killed.elapsed() >= Duration::from_secs(1),
        "the lock passed on before the lease could expire"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_elect_leads_until_killed_and_listen_follows_the_leaders() {
    use std::io::BufRead as _;
    let cluster = Cluster::start(ClusterOptions::default()).await;
    let eps = cluster.endpoints().join(",");
    let spawn = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_kiwi"))
            .args(args)
            .env("KIWI_ENDPOINTS", &eps)
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap()
    };
    let mut a = spawn(&["elect", "sched", "node-a", "--ttl", "2s"]);
    let mut a_out = std::io::BufReader::new(a.stdout.take().unwrap()).lines();
    assert_eq!(a_out.next().unwrap().unwrap(), "elected: sched = node-a");
    let mut b = spawn(&["elect", "sched", "node-b", "--ttl", "2s"]);
    let mut listen = spawn(&["elect", "sched", "--listen"]);
    let mut heard = std::io::BufReader::new(listen.stdout.take().unwrap()).lines();
    assert_eq!(heard.next().unwrap().unwrap(), "node-a");
    // The leader dies without resigning: the next candidate leads once its lease expires.
    a.kill().unwrap();
    a.wait().unwrap();
    let mut b_out = std::io::BufReader::new(b.stdout.take().unwrap()).lines();
    assert_eq!(b_out.next().unwrap().unwrap(), "elected: sched = node-b");
    assert_eq!(heard.next().unwrap().unwrap(), "node-b");
    for mut p in [b, listen] {
        p.kill().unwrap();
        p.wait().unwrap();
    }
}
