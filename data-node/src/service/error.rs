//! What a KV or admin request can fail with, and the one mapping to `tonic::Status`.

use std::time::Duration;

use kiwi_proto::v1::NotLeader;
use prost::Message as _;
use tonic::Status;

use super::*;
use crate::raft::driver::ProposeError;
use crate::runtime::priority_channel::Refused;

/// What a KV request can fail with.
#[derive(Debug, thiserror::Error)]
pub enum KvError {
    #[error("{0}")]
    InvalidArgument(String),
    #[error("node {node} is not the leader")]
    NotLeader {
        node: u64,
        leader: u64,
        leader_addr: Option<String>,
    },
    #[error("no leader is known yet; retry shortly")]
    NoLeader,
    #[error("{0}")]
    Dropped(ProposeError),
    #[error("node is overloaded; retry shortly")]
    Overloaded,
    /// The request never reached Raft (or was a read): nothing was written.
    #[error("node is shutting down or stopped")]
    Stopped,
    /// A snapshot install replaced the data while the read ran; nothing was read.
    #[error("this node is installing a Raft snapshot; retry the read (or read from the leader)")]
    Installing,
    /// This node is no longer a member of the cluster.
    #[error("node {0} was removed from the cluster and no longer serves requests")]
    Removed(u64),
    #[error("deadline exceeded after {0:?}; a write's outcome is unknown")]
    Timeout(Duration),
    #[error("storage error: {0}")]
    Storage(kiwi_storage::Error),
    #[error("{0}")]
    Precondition(String),
    #[error("{0}")]
    Unknown(String),
    /// Refused by admission control; did nothing.
    #[error("{0}")]
    Shed(Refused),
    /// Answers the connection's client has not read hold its share of the answer budget (or the node's
    /// whole budget is held) until the request's deadline; nothing was done.
    #[error("{0}")]
    NoRoom(kiwi_proto::connections::NoRoom),
    /// The deadline passed while the request waited in the queue; it never ran.
    #[error("deadline of {0:?} exceeded while queued; the request never ran")]
    Expired(Duration),
    /// The revision asked for is older than the kept history (etcd's message; the oldest kept revision
    /// is in [`COMPACT_REVISION_METADATA`]).
    #[error(
        "required revision has been compacted: revision {asked} is older than the oldest kept revision {oldest}"
    )]
    Compacted { asked: u64, oldest: u64 },
    /// A per-node or per-stream limit is reached; nothing was done.
    #[error("{0}")]
    TooMany(String),
    /// A valid command the state machine refused (a lease that does not exist, a limit).
    #[error("{0}")]
    Refused(crate::raft::state_machine::Refusal),
    /// The disk is nearly full (`[storage] min_free_bytes`); nothing was written. Not worth retrying
    /// until space is freed.
    #[error("{0}")]
    NoSpace(String),
    /// The revision asked for is newer than the store's.
    #[error(
        "required revision is a future revision: {asked} is newer than the store's revision {current}"
    )]
    FutureRevision { asked: u64, current: u64 },
}

/// Metadata key with the oldest kept revision on a "compacted" status.
pub const COMPACT_REVISION_METADATA: &str = "kiwi-compact-revision";

impl KvError {
    /// The one mapping to gRPC statuses; keeps leader hints (metadata and `NotLeader` details) and
    /// retryability (the code).
    pub fn into_status(self) -> Status {
        let retry_safe = matches!(
            self,
            KvError::NotLeader { .. }
                | KvError::NoLeader
                | KvError::Dropped(_)
                | KvError::Overloaded
                | KvError::Shed(_)
                | KvError::Expired(_)
                | KvError::Stopped
                | KvError::Installing
                | KvError::Removed(_)
                | KvError::NoRoom(_)
                | KvError::TooMany(_)
        );
        let retry_after = match &self {
            KvError::Shed(r) => r.retry_after(),
            _ => None,
        };
        let mut status = self.status();
        if retry_safe {
            status.metadata_mut().insert(
                RETRY_SAFE_METADATA,
                tonic::metadata::MetadataValue::from_static("true"),
            );
        }
        if let Some(after) = retry_after
            && let Ok(v) = after.as_millis().max(1).to_string().parse()
        {
            status.metadata_mut().insert(RETRY_AFTER_METADATA, v);
        }
        status
    }

    fn status(self) -> Status {
        let msg = self.to_string();
        match self {
            KvError::InvalidArgument(_) => Status::invalid_argument(msg),
            KvError::NotLeader {
                leader,
                leader_addr,
                ..
            } => {
                let hint = NotLeader {
                    leader_id: leader,
                    leader_addr: leader_addr.clone().unwrap_or_default(),
                };
                let text = match &leader_addr {
                    Some(a) => format!("{msg}; the leader is node {leader} at {a}"),
                    None => msg,
                };
                let mut status = Status::with_details(
                    tonic::Code::FailedPrecondition,
                    text,
                    hint.encode_to_vec().into(),
                );
                let md = status.metadata_mut();
                if let Ok(v) = leader.to_string().parse() {
                    md.insert(LEADER_ID_METADATA, v);
                }
                if let Some(Ok(v)) = leader_addr.map(|a| a.parse()) {
                    md.insert(LEADER_ADDR_METADATA, v);
                }
                status
            }
            KvError::NoLeader
            | KvError::Dropped(_)
            | KvError::Stopped
            | KvError::Unknown(_)
            | KvError::Installing => Status::unavailable(msg),
            KvError::Removed(_) => Status::failed_precondition(msg),
            KvError::Overloaded | KvError::Shed(_) | KvError::NoRoom(_) | KvError::TooMany(_) => {
                Status::resource_exhausted(msg)
            }
            KvError::Expired(_) => Status::deadline_exceeded(msg),
            KvError::NoSpace(_) => Status::resource_exhausted(msg),
            KvError::Precondition(_) => Status::failed_precondition(msg),
            KvError::Timeout(_) => Status::deadline_exceeded(msg),
            KvError::Compacted { oldest, .. } => {
                let mut status = Status::out_of_range(msg);
                if let Ok(v) = oldest.to_string().parse() {
                    status.metadata_mut().insert(COMPACT_REVISION_METADATA, v);
                }
                status
            }
            KvError::FutureRevision { .. } => Status::out_of_range(msg),
            KvError::Refused(r) => {
                use crate::raft::state_machine::Refusal;
                match r {
                    Refusal::Invalid(_) => Status::invalid_argument(msg),
                    Refusal::LeaseNotFound(_) => Status::not_found(msg),
                    Refusal::LeaseExists(_) => Status::failed_precondition(msg),
                    Refusal::TooMany(_) => Status::resource_exhausted(msg),
                }
            }
            KvError::Storage(e) => match e {
                kiwi_storage::Error::EmptyKey { .. }
                | kiwi_storage::Error::KeyTooLarge { .. }
                | kiwi_storage::Error::ValueTooLarge { .. }
                | kiwi_storage::Error::ZeroScanLimit => Status::invalid_argument(e.to_string()),
                _ => Status::internal(format!("storage error: {e}")),
            },
        }
    }
}
