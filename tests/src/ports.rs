//! Loopback ports for the processes the tests start, from [`kiwi_proto::net::free_loopback_addr`]: outside
//! the kernel's ephemeral range, so that a killed node's port is still free when it restarts.

use std::net::SocketAddr;

/// A free loopback address outside the ephemeral range, never the same twice in a test process.
///
/// # Panics
/// When no such port is free.
pub fn free_addr() -> SocketAddr {
    kiwi_proto::net::free_loopback_addr().expect("a free loopback port")
}
