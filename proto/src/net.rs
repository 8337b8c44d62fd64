//! Loopback ports for local clusters whose nodes are restarted (`kiwi playground`, the test harness).
//!
//! A port the kernel hands out for `127.0.0.1:0` comes from its ephemeral range, the range it also picks
//! the source ports of outgoing connections from. Once a node is SIGKILLed, any new connection on the
//! machine (another client, a peer reconnecting) may take its port as a source port, and the
//! restarted node then cannot listen on it. [`free_addr`] therefore hands out ports below the ephemeral
//! range, never the same one twice in a process, and only ports that are free when it is called.

use std::net::{SocketAddr, TcpListener};
use std::sync::atomic::{AtomicU32, Ordering};

/// The lowest port handed out.
const FIRST: u32 = 10_000;

/// The first port of the kernel's ephemeral range (`net.ipv4.ip_local_port_range`), 32768 when unknown.
fn ephemeral_start() -> u32 {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .filter(|&p| p > FIRST + 1_000)
        .unwrap_or(32_768)
}

/// A loopback address that is free now, outside the ephemeral port range, and not returned before by this
/// process.
///
/// # Errors
/// `AddrNotAvailable` when every port below the ephemeral range is taken.
pub fn free_loopback_addr() -> std::io::Result<SocketAddr> {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let span = ephemeral_start() - FIRST;
    // Test binaries run one after another; a per-process offset keeps one from reusing the ports a
    // previous one's processes may still hold in TIME_WAIT.
    let offset = std::process::id().wrapping_mul(7_919) % span;
    for _ in 0..span {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let port = FIRST + (offset + n) % span;
        let addr: SocketAddr = ([127, 0, 0, 1], port as u16).into();
        if TcpListener::bind(addr).is_ok() {
            return Ok(addr);
        }
    }
    Err(std::io::Error::new(
        std::io::ErrorKind::AddrNotAvailable,
        format!("no free loopback port between {FIRST} and {}", FIRST + span),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports_are_free_distinct_and_below_the_ephemeral_range() {
        let a = free_loopback_addr().unwrap();
        let b = free_loopback_addr().unwrap();
        assert_ne!(a, b);
        for addr in [a, b] {
            assert!(addr.ip().is_loopback());
            assert!(u32::from(addr.port()) >= FIRST);
            assert!(u32::from(addr.port()) < ephemeral_start());
            TcpListener::bind(addr).expect("the port is free");
        }
    }
}
