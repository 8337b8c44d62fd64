//! Kiwi's wire protocol, package `kiwi.v1`: the only crate that includes generated code.
//!
//! The `.proto` files in `kiwi/v1/` are the contract other languages generate stubs from:
//! - `kv.proto`: `KvService`, the client API.
//! - `raft.proto`: `RaftTransport`, node-to-node Raft traffic.
//! - `admin.proto`: `NodeAdmin`, per-node administration.
//! - `control.proto`: `NodeLink` (each node's stream to the control plane) and `ControlService` (operators).
//!
//! `etcd/*.proto` are the part of etcd's v3 API the nodes serve (packages `etcdserverpb` and `mvccpb`, in
//! [`etcd`]), with etcd's names and field numbers: what etcd's clients speak.
//!
//! [`policy`] holds the rules of a runtime policy, shared by the node and the control plane; `http`
//! (feature `http`) the guarded Prometheus endpoint both of them serve; `auth` (feature `auth`) bearer tokens and
//! roles for their gRPC servers; `connections` (feature `auth`) what a server's connections may hold (caps,
//! idle close, the budget of unread answers); `security` (feature `auth`) the `[security]` table both configs share; [`tls`]
//! their TLS settings from PEM files; [`net`] loopback ports for local clusters; [`keys`] key ranges (a
//! prefix's end, etcd's `range_end`) as the node and the clients compute them; `backup` (feature `backup`) the
//! backup file's format.
//!
//! [`FILE_DESCRIPTOR_SET`] is the encoded descriptor set of all of them, for `tonic-reflection`.
//!
//! Generated servers decode requests with [`codec::ServerCodec`], which answers a request that is not a
//! valid protobuf message with `INVALID_ARGUMENT` (tonic's default says `INTERNAL`); generated clients
//! use tonic's `ProstCodec` unchanged.

#[cfg(feature = "auth")]
pub mod auth;
#[cfg(feature = "backup")]
pub mod backup;

/// etcd's v3 API as Kiwi serves it (`etcd/rpc.proto`, `etcd/kv.proto`).
pub mod etcd {
    #![allow(clippy::all, clippy::pedantic, non_snake_case)]
    pub mod mvccpb {
        include!(concat!(env!("OUT_DIR"), "/mvccpb.rs"));
    }
    pub mod etcdserverpb {
        include!(concat!(env!("OUT_DIR"), "/etcdserverpb.rs"));
    }
}
pub mod codec;
#[cfg(feature = "auth")]
pub mod connections;
pub mod encoded;
#[cfg(feature = "http")]
pub mod http;
pub mod keys;
pub mod net;
pub mod policy;
#[cfg(feature = "auth")]
pub mod security;
pub mod tls;

/// Limits every Kiwi gRPC server (node and control plane) puts on a connection, so that a slow, idle or
/// greedy client cannot hold resources: at most [`limits::MAX_STREAMS_PER_CONNECTION`] concurrent calls,
/// headers of at most [`limits::MAX_HEADER_BYTES`], HTTP/2 keepalive pings every
/// [`limits::KEEPALIVE_INTERVAL`] (a peer that does not answer within [`limits::KEEPALIVE_TIMEOUT`] is
/// dropped) and TCP keepalive after [`limits::TCP_KEEPALIVE`] idle.
pub mod limits {
    use std::time::Duration;

    pub const MAX_STREAMS_PER_CONNECTION: u32 = 1024;
    pub const MAX_HEADER_BYTES: u32 = 16 * 1024;
    pub const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(30);
    pub const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(20);
    pub const TCP_KEEPALIVE: Duration = Duration::from_secs(60);

    /// How often a node pings its peers and its control plane on an idle or busy connection (HTTP/2
    /// keepalive); a connection whose ping gets no answer within the same time is closed and dialled
    /// again, so a half-open connection does not hold a sender until TCP gives up.
    pub const PEER_KEEPALIVE: Duration = Duration::from_secs(5);

    /// `endpoint` with HTTP/2 keepalive pings every `every` (answered within `every`, also while idle)
    /// and TCP keepalive after [`TCP_KEEPALIVE`] idle.
    pub fn client(
        endpoint: tonic::transport::Endpoint,
        every: Duration,
    ) -> tonic::transport::Endpoint {
        endpoint
            .http2_keep_alive_interval(every)
            .keep_alive_timeout(every)
            .keep_alive_while_idle(true)
            .tcp_keepalive(Some(TCP_KEEPALIVE))
    }

    /// A server builder with these limits.
    pub fn server() -> tonic::transport::Server {
        tonic::transport::Server::builder()
            .max_concurrent_streams(MAX_STREAMS_PER_CONNECTION)
            .http2_max_header_list_size(MAX_HEADER_BYTES)
            .http2_keepalive_interval(Some(KEEPALIVE_INTERVAL))
            .http2_keepalive_timeout(Some(KEEPALIVE_TIMEOUT))
    }
}

/// Generated messages, clients and servers of package `kiwi.v1`.
pub mod v1 {
    #![allow(missing_docs, clippy::all, clippy::pedantic)]
    tonic::include_proto!("kiwi.v1");

    impl RaftRole {
        /// A role's name as people read it (`leader`, `follower`, ...), from its wire value (unknown
        /// values: `unknown`).
        pub fn label(value: i32) -> &'static str {
            match RaftRole::try_from(value).unwrap_or(RaftRole::Unspecified) {
                RaftRole::Leader => "leader",
                RaftRole::Follower => "follower",
                RaftRole::Candidate => "candidate",
                RaftRole::PreCandidate => "pre-candidate",
                RaftRole::Learner => "learner",
                RaftRole::Unspecified => "unknown",
            }
        }
    }

    impl Priority {
        /// The priority a request header asks for: unset and unknown values mean [`Priority::Normal`].
        pub fn from_wire(value: i32) -> Priority {
            match Priority::try_from(value) {
                Ok(Priority::Unspecified) | Err(_) => Priority::Normal,
                Ok(p) => p,
            }
        }
    }
}

/// Encoded `FileDescriptorSet` of every Kiwi `.proto` file (with imports), for server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/kiwi_descriptor.bin"));

#[cfg(test)]
mod tests {
    use super::v1::Priority;

    #[test]
    fn unset_and_unknown_priorities_mean_normal() {
        assert_eq!(Priority::from_wire(0), Priority::Normal);
        assert_eq!(Priority::from_wire(99), Priority::Normal);
        assert_eq!(Priority::from_wire(Priority::Low as i32), Priority::Low);
        assert_eq!(
            Priority::from_wire(Priority::Critical as i32),
            Priority::Critical
        );
    }

    #[test]
    fn descriptor_set_names_every_service() {
        let fds =
            <prost_types::FileDescriptorSet as prost::Message>::decode(super::FILE_DESCRIPTOR_SET)
                .unwrap();
        let services: Vec<_> = fds
            .file
            .iter()
            .flat_map(|f| f.service.iter().map(|s| s.name().to_string()))
            .collect();
        for s in ["KvService", "RaftTransport", "NodeAdmin", "ControlService"] {
            assert!(
                services.iter().any(|n| n == s),
                "{s} missing from {services:?}"
            );
        }
    }
}
