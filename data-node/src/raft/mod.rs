//! The replicated core: one Raft group over the node's storage backend.
//!
//! - [`backup`]: backup files of the state machine: writing one from a view, restoring one into a new
//!   member's data directory (through the snapshot install).
//! - [`driver`]: the Raft driver thread, sole owner of `raft::RawNode`; everything else talks to it through
//!   its [`driver::DriverHandle`]. It owns the [`driver::MessageSink`] and [`driver::PeerEvent`] types the
//!   transport implements and reports, so it depends on no transport.
//! - [`guard`]: checks every Raft message from the network before raft-rs may see it.
//! - [`lease`]: the leader lease behind `raft.lease_reads` and the clock assumptions it rests on.
//! - [`lease_state`]: clients' leases as replicated state (records, the keys attached, the count).
//! - [`log_store`]: raft-rs's `Storage`: the Raft log in files of its own (`raft-log/`, or in the backend
//!   for the in-memory one) and the membership and truncation point in the backend.
//! - [`mvcc`]: revisions, each key's counters and the kept history (reads and watches at a past revision).
//! - [`state_machine`]: applies committed commands to user data with the applied index.
//! - [`snapshot`]: reads, stages and installs Raft snapshots of the state machine.
//! - [`transport`]: the `RaftTransport` gRPC client and server; uses the driver's handle.

pub mod backup;
pub mod driver;
pub mod guard;
pub mod lease;
pub mod lease_state;
pub mod log_store;
pub mod mvcc;
pub mod snapshot;
pub mod state_machine;
pub mod transport;
