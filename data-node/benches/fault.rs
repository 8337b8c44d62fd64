//! Cost of the fault injector's hooks on the Raft transport's path: per message with no fault active
//! (one atomic load, the price every message pays on a node with fault injection compiled in) and with an
//! unrelated fault active (a delay on another peer, so the message passes after the slow path).
//!
//! `cargo bench -p kiwi-node --bench fault`

use std::hint::black_box;
use std::time::{Duration, Instant};

use kiwi_node::fault::FaultInjector;
use kiwi_proto::v1::fault_command::Cmd;
use kiwi_proto::v1::fault_spec::Kind;
use kiwi_proto::v1::{FaultCommand, FaultSpec, NetworkDelay, StartFault};

const CALLS: u32 = 5_000_000;

fn per_call(f: &FaultInjector) -> f64 {
    let started = Instant::now();
    for i in 0..CALLS {
        black_box(f.message(black_box(u64::from(i % 3) + 2)));
        black_box(f.delay(black_box(2)));
    }
    started.elapsed().as_nanos() as f64 / f64::from(CALLS)
}

fn main() {
    let (f, _events) = FaultInjector::new(
        1,
        true,
        Duration::from_secs(600),
        &opentelemetry::global::meter("bench"),
    );
    let idle = per_call(&f);
    f.command(FaultCommand {
        cmd: Some(Cmd::Start(StartFault {
            fault_id: 1,
            spec: Some(FaultSpec {
                kind: Some(Kind::Delay(NetworkDelay {
                    delay_ms: 10,
                    jitter_ms: 0,
                })),
                peers: vec![99],
            }),
            duration_ms: 600_000,
        })),
    });
    let active = per_call(&f);
    println!("fault hooks per message (message verdict + delay), {CALLS} calls:");
    println!("  no fault active:                   {idle:>7.1} ns");
    println!("  a fault active on another peer:    {active:>7.1} ns");
}
