//! What the node tells about itself. Used by the layers it observes through small recording calls; it
//! depends on none of them.
//!
//! - [`raft_metrics`]: the `RaftMetricsCollector`, fed by the Raft driver, read through
//!   `NodeAdmin.GetRaftMetrics` (and `kiwi metrics`).

pub mod raft_metrics;
