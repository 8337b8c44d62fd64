//! Test helper: writes durable batches to a storage backend and reports each one on stdout as it is
//! acknowledged, until it is killed. The crash tests SIGKILL it and then check what survived.
//!
//! Usage: `kiwi-crash-writer BACKEND DIR FIRST_BATCH BATCH_SIZE VALUE_SIZE`
//!
//! Batch `n` puts `BATCH_SIZE` keys `b{n:010}/{i:05}` whose values are `VALUE_SIZE` bytes derived from
//! `(n, i)`, plus `meta/last_batch = n` in the Raft key space. After writing batch `n` with sync on, it
//! prints `ack n`. It stops by itself after 100,000 batches.

use std::io::Write;
use std::process::ExitCode;

use kiwi_storage::{BackendKind, KeySpace, OpenOptions, WriteBatch, WriteOptions};

/// The value batch `n` writes at index `i`: recognisable, and different for every key.
fn value_for(n: u64, i: u32, size: usize) -> Vec<u8> {
    let seed = format!("{n}:{i};");
    seed.as_bytes().iter().copied().cycle().take(size).collect()
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    if args.len() != 6 {
        eprintln!("usage: kiwi-crash-writer BACKEND DIR FIRST_BATCH BATCH_SIZE VALUE_SIZE");
        return ExitCode::from(2);
    }
    let kind: BackendKind = match args[1].parse() {
        Ok(k) => k,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(2);
        }
    };
    let (first, batch_size, value_size): (u64, u32, usize) =
        match (args[3].parse(), args[4].parse(), args[5].parse()) {
            (Ok(a), Ok(b), Ok(c)) => (a, b, c),
            _ => {
                eprintln!("FIRST_BATCH, BATCH_SIZE and VALUE_SIZE must be numbers");
                return ExitCode::from(2);
            }
        };
    let store = match kiwi_storage::open(&OpenOptions::new(kind, &args[2])) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("open: {e}");
            return ExitCode::FAILURE;
        }
    };
    let mut out = std::io::stdout().lock();
    for n in first..first + 100_000 {
        let mut batch = WriteBatch::new();
        for i in 0..batch_size {
            batch.put(
                KeySpace::Data,
                format!("b{n:010}/{i:05}"),
                value_for(n, i, value_size),
            );
        }
        batch.put(KeySpace::Raft, b"meta/last_batch", n.to_be_bytes());
        if let Err(e) = store.batch_write(batch, WriteOptions::SYNC) {
            eprintln!("batch {n}: {e}");
            return ExitCode::FAILURE;
        }
        if writeln!(out, "ack {n}").and_then(|()| out.flush()).is_err() {
            return ExitCode::FAILURE;
        }
    }
    ExitCode::SUCCESS
}
