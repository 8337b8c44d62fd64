//! The link to the control plane (`[control] addr`): one long-lived `NodeLink.Link` stream on which the
//! node registers, then sends a heartbeat with its metrics snapshot every `heartbeat_interval_ms`. The
//! control plane answers on the same stream; it never dials the node.
//!
//! The link is a side task: the node serves clients the same whether the control plane is reachable or
//! not. A failed or broken link is retried with backoff (100 ms, doubling, at most 5 s); a refusal (another
//! cluster, a duplicate node id) is logged at error level and retried at the longest backoff, since only a
//! configuration change fixes it.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use kiwi_proto::v1::control_message::Msg as ControlMsg;
use kiwi_proto::v1::node_link_client::NodeLinkClient;
use kiwi_proto::v1::node_message::Msg as NodeMsg;
use kiwi_proto::v1::{Heartbeat, NodeMessage};
use tokio_util::sync::CancellationToken;
use tonic::Code;

use crate::service::KvServer;

/// First retry delay after a failed link.
const FIRST_BACKOFF: Duration = Duration::from_millis(100);
/// Longest retry delay.
const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// Starts the link task; it runs until `stop` is cancelled.
pub fn spawn(
    kv: Arc<KvServer>,
    addr: String,
    heartbeat_interval: Duration,
    stop: CancellationToken,
) -> tokio::task::JoinHandle<()> {
    let started = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
    tokio::spawn(async move {
        let mut backoff = FIRST_BACKOFF;
        let mut reported = false;
        loop {
            let outcome = tokio::select! {
                r = link_once(&kv, &addr, heartbeat_interval, started) => r,
                () = stop.cancelled() => return,
            };
            match outcome {
                Ok(Linked::Registered) => backoff = FIRST_BACKOFF,
                Ok(Linked::Refused(status)) => {
                    tracing::error!(control = %addr, code = ?status.code(), reason = status.message(), "the control plane refused this node");
                    backoff = MAX_BACKOFF;
                }
                Err(e) => {
                    // Once per outage at warn level; the retries are quiet.
                    if reported {
                        tracing::debug!(control = %addr, error = %e, "control plane unreachable");
                    } else {
                        tracing::warn!(control = %addr, error = %e, "control plane unreachable; retrying in the background");
                        reported = true;
                    }
                }
            }
            tokio::select! {
                () = tokio::time::sleep(backoff) => {}
                () = stop.cancelled() => return,
            }
            backoff = (backoff * 2).min(MAX_BACKOFF);
        }
    })
}

enum Linked {
    /// The node was registered and the link later ended.
    Registered,
    /// The control plane refused the node.
    Refused(tonic::Status),
}

async fn link_once(
    kv: &Arc<KvServer>,
    addr: &str,
    heartbeat_interval: Duration,
    started: u64,
) -> Result<Linked, Box<dyn std::error::Error + Send + Sync>> {
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))?
        .connect_timeout(Duration::from_secs(1))
        .tcp_nodelay(true)
        .connect()
        .await?;
    let mut client = NodeLinkClient::new(channel);
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tx.send(NodeMessage {
        msg: Some(NodeMsg::Register(
            kv.registration(heartbeat_interval, started),
        )),
    })
    .await?;
    let mut inbound = match client
        .link(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
    {
        Ok(r) => r.into_inner(),
        Err(s)
            if matches!(
                s.code(),
                Code::FailedPrecondition | Code::AlreadyExists | Code::InvalidArgument
            ) =>
        {
            return Ok(Linked::Refused(s));
        }
        Err(s) => return Err(s.into()),
    };
    match inbound.message().await? {
        Some(m) if matches!(m.msg, Some(ControlMsg::Registered(_))) => {
            tracing::info!(control = %addr, "registered with the control plane");
        }
        other => return Err(format!("expected Registered, got {other:?}").into()),
    }
    let mut tick = tokio::time::interval(heartbeat_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {
                let metrics = kv.heartbeat_metrics().await;
                if tx.send(NodeMessage { msg: Some(NodeMsg::Heartbeat(Heartbeat { metrics: Some(metrics) })) }).await.is_err() {
                    return Ok(Linked::Registered);
                }
            }
            m = inbound.message() => match m {
                // Commands arrive here (none are defined yet).
                Ok(Some(_)) => {}
                Ok(None) => return Ok(Linked::Registered),
                Err(s) => {
                    tracing::warn!(control = %addr, error = %s, "the control plane closed the link");
                    return Ok(Linked::Registered);
                }
            },
        }
    }
}
