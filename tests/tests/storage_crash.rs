//! Durability and atomicity under SIGKILL, on the engines that persist (RocksDB, LevelDB).
//!
//! A child process (`kiwi-crash-writer`) writes batches with sync on and prints each acknowledgement; the
//! test kills it with SIGKILL at a random point (usually in the middle of a batch), reopens the store and
//! checks that every acknowledged batch is complete and that no batch is partially there. Three rounds
//! run on the same directory, so recovery after a crash is itself crashed into.
//!
//! Randomness: the seed is printed; set `KIWI_TEST_SEED` to replay it.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

use kiwi_storage::{BackendKind, KeySpace, OpenOptions, Scan, ScanRange};
use rand::{Rng, SeedableRng};

const BATCH_SIZE: u32 = 100;
const VALUE_SIZE: usize = 1024;

fn value_for(n: u64, i: u32) -> Vec<u8> {
    let seed = format!("{n}:{i};");
    seed.as_bytes()
        .iter()
        .copied()
        .cycle()
        .take(VALUE_SIZE)
        .collect()
}

fn crash_and_check(kind: BackendKind) {
    let seed: u64 = std::env::var("KIWI_TEST_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random);
    eprintln!("{kind}: KIWI_TEST_SEED={seed}");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("data");
    let mut acked: Vec<u64> = Vec::new();

    for round in 0..3u64 {
        let first = round * 1_000_000;
        let kill_after = rng.random_range(5..60);
        let mut child = Command::new(env!("CARGO_BIN_EXE_kiwi-crash-writer"))
            .arg(kind.as_str())
            .arg(&path)
            .args([
                first.to_string(),
                BATCH_SIZE.to_string(),
                VALUE_SIZE.to_string(),
            ])
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let mut this_round = 0;
        while this_round < kill_after {
            let line = lines
                .next()
                .unwrap_or_else(|| {
                    panic!("{kind} round {round}: writer exited after {this_round} acks")
                })
                .unwrap();
            let n: u64 = line.strip_prefix("ack ").unwrap().parse().unwrap();
            acked.push(n);
            this_round += 1;
        }
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        // Acks written before the kill but not yet read are real acknowledgements too.
        for line in lines.map_while(Result::ok) {
            if let Some(n) = line.strip_prefix("ack ") {
                acked.push(n.parse().unwrap());
            }
        }

        let store = kiwi_storage::open(&OpenOptions::new(kind, &path)).unwrap();
        let last = store
            .read(KeySpace::Raft, b"meta/last_batch")
            .unwrap()
            .expect("some batch is there");
        let last = u64::from_be_bytes(last.try_into().unwrap());
        assert!(
            last >= *acked.last().unwrap(),
            "{kind} round {round} seed {seed}: last durable batch {last} is older than the last ack {}",
            acked.last().unwrap()
        );
        for &n in &acked {
            let pairs = store
                .scan(
                    KeySpace::Data,
                    &Scan::forward(
                        ScanRange::half_open(
                            format!("b{n:010}/").as_bytes(),
                            format!("b{n:010}0").as_bytes(),
                        ),
                        10_000,
                    ),
                )
                .unwrap();
            assert_eq!(
                pairs.len(),
                BATCH_SIZE as usize,
                "{kind} round {round} seed {seed}: acked batch {n} incomplete"
            );
            for (i, (_, v)) in pairs.iter().enumerate() {
                assert_eq!(
                    v,
                    &value_for(n, i as u32),
                    "{kind} seed {seed}: batch {n} key {i} has a wrong value"
                );
            }
        }
        // Nothing partial anywhere: every batch present is complete, and none beyond `last` exists.
        let everything = store
            .scan(KeySpace::Data, &Scan::forward(ScanRange::all(), 10_000_000))
            .unwrap();
        let mut counts = std::collections::BTreeMap::<u64, u32>::new();
        for (k, _) in &everything {
            let n: u64 = std::str::from_utf8(&k[1..11]).unwrap().parse().unwrap();
            *counts.entry(n).or_default() += 1;
        }
        for (n, c) in &counts {
            assert_eq!(
                *c, BATCH_SIZE,
                "{kind} round {round} seed {seed}: batch {n} is partial ({c} keys)"
            );
            assert!(
                *n <= last,
                "{kind} seed {seed}: batch {n} present beyond last_batch {last}"
            );
        }
        eprintln!(
            "{kind} round {round}: {} batches acknowledged so far, {} present after SIGKILL",
            acked.len(),
            counts.len()
        );
    }
}

#[test]
fn rocksdb_acknowledged_batches_survive_sigkill() {
    crash_and_check(BackendKind::RocksDb);
}

#[test]
fn leveldb_acknowledged_batches_survive_sigkill() {
    crash_and_check(BackendKind::LevelDb);
}
