//! The storage stage's scheduling: where client requests wait and which threads run them.
//!
//! - [`priority_channel`]: the `PriorityMessageChannel` between the gRPC handlers and the storage workers
//!   (strict CRITICAL, weighted HIGH/NORMAL/LOW, bounded queues, admission control).
//! - [`worker_pool`]: the storage worker threads and the `ThreadPoolScaler` that sizes them; uses
//!   `priority_channel`.

pub mod priority_channel;
pub mod worker_pool;
