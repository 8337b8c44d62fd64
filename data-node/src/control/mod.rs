//! The link to the control plane (`[control] addr`): one long-lived `NodeLink.Link` stream on which the
//! node registers, then sends a heartbeat with its metrics snapshot every `heartbeat_interval_ms`. The
//! control plane answers on the same stream; it never dials the node.
//!
//! Policy: a `PolicyUpdate` of another epoch (a control plane with a new store), or of the node's epoch and
//! newer than the version it runs, is applied through the same path as
//! `NodeAdmin.SetRuntimePolicy` (same validation), persisted in `<data_dir>/control-policy.pb` (written to
//! a temporary file, fsynced, renamed), and acknowledged (or refused, naming why) with a `PolicyAck`. At
//! start, [`restore_policy`] applies the persisted policy before the node serves, so a node restarted
//! while the control plane is down runs the last policy it had. An update without a policy (no cluster-wide
//! policy nor override concerns this node any more) returns it to its configuration file's policy.
//!
//! Faults: a `FaultCommand` is handed to the [`crate::fault::FaultInjector`] at once; its events
//! (started, expired, cancelled, refused) are sent on the stream, and queue while the link is down.
//!
//! The link is a side task: the node serves clients the same whether the control plane is reachable or
//! not. A failed or broken link is retried with backoff (100 ms, doubling, at most 5 s); a refusal (another
//! cluster, a duplicate node id) is logged at error level and retried at the longest backoff, since only a
//! configuration change fixes it.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use kiwi_proto::v1::control_message::Msg as ControlMsg;
use kiwi_proto::v1::node_link_client::NodeLinkClient;
use kiwi_proto::v1::node_message::Msg as NodeMsg;
use kiwi_proto::v1::{Heartbeat, NodeMessage, PolicyAck, PolicyUpdate};
use prost::Message as _;
use tokio_util::sync::CancellationToken;
use tonic::Code;

use crate::fault::FaultInjector;
use crate::service::KvServer;

/// Where the control plane is, and the token the node presents to it.
pub struct Target {
    /// `host:port` (plain text) or `https://host:port` (TLS with `tls`).
    pub addr: String,
    pub token: Option<String>,
    pub tls: Option<tonic::transport::ClientTlsConfig>,
}

/// The fault injector and the receiver of its events, which the link forwards.
pub struct Faults {
    pub injector: Arc<FaultInjector>,
    pub events: tokio::sync::mpsc::UnboundedReceiver<kiwi_proto::v1::FaultEvent>,
}

/// First retry delay after a failed link.
const FIRST_BACKOFF: Duration = Duration::from_millis(100);
/// Longest retry delay.
const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// File in the data directory holding the last policy pushed and applied.
pub const POLICY_FILE: &str = "control-policy.pb";

/// The epoch and version of the control plane's policy this node runs, where it is persisted, and the
/// policy of the node's own configuration.
pub struct PolicyState {
    /// (epoch, version); (0, 0): none.
    running: std::sync::Mutex<(u64, u64)>,
    path: PathBuf,
    /// The configuration file's runtime policy, in force when no control-plane policy applies.
    base: kiwi_proto::v1::RuntimePolicy,
}

impl PolicyState {
    /// The (epoch, version) applied ((0, 0): none).
    pub fn running(&self) -> (u64, u64) {
        *self
            .running
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn set_running(&self, epoch: u64, version: u64) {
        *self
            .running
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = (epoch, version);
    }
}

fn persist(path: &Path, update: &PolicyUpdate) -> std::io::Result<()> {
    use std::io::Write as _;
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(&update.encode_to_vec())?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)?;
    if let Some(dir) = path.parent() {
        std::fs::File::open(dir)?.sync_all()?;
    }
    Ok(())
}

/// Applies the policy persisted in `data_dir` (if any) and returns the state the link continues from.
///
/// # Errors
/// The file exists but cannot be read or decoded, or the node refuses the policy in it (named).
pub fn restore_policy(kv: &KvServer, data_dir: &Path) -> Result<Arc<PolicyState>, String> {
    let path = data_dir.join(POLICY_FILE);
    let base = kv.runtime_policy();
    let mut running = (0, 0);
    match std::fs::read(&path) {
        Ok(bytes) => {
            let update = PolicyUpdate::decode(bytes.as_slice())
                .map_err(|e| format!("{}: does not decode: {e}", path.display()))?;
            if let Some(policy) = update.policy {
                kv.set_runtime_policy(policy)
                    .map_err(|e| format!("{}: {e}", path.display()))?;
                tracing::info!(
                    version = update.version,
                    "applied the control plane's policy persisted in the data directory"
                );
            }
            running = (update.epoch, update.version);
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(format!("{}: {e}", path.display())),
    }
    Ok(Arc::new(PolicyState {
        running: std::sync::Mutex::new(running),
        path,
        base,
    }))
}

/// Applies a pushed policy if it is newer; returns the acknowledgement.
fn apply(kv: &KvServer, state: &PolicyState, update: PolicyUpdate) -> PolicyAck {
    let (epoch, current) = state.running();
    let ack = |applied: bool, error: String| PolicyAck {
        version: update.version,
        applied,
        error,
    };
    // Versions compare only within one epoch: a control plane with a new store starts again at 1.
    if update.epoch == epoch && update.version == current {
        return ack(true, String::new());
    }
    if update.epoch == epoch && update.version < current {
        return ack(
            false,
            format!("older than the version this node runs ({current})"),
        );
    }
    let policy = update.policy.unwrap_or(state.base);
    if let Err(e) = kv.set_runtime_policy(policy) {
        tracing::warn!(version = update.version, error = %e, "refused the control plane's policy");
        return ack(false, e.to_string());
    }
    if let Err(e) = persist(&state.path, &update) {
        // Applied but not persisted: said so, and the version is not recorded, so a later update or a
        // restart does not rely on it.
        tracing::error!(error = %e, path = %state.path.display(), "cannot persist the applied policy");
        return ack(
            false,
            format!("applied but not persisted in {}: {e}", state.path.display()),
        );
    }
    state.set_running(update.epoch, update.version);
    tracing::info!(
        version = update.version,
        "applied the control plane's policy"
    );
    ack(true, String::new())
}

/// Starts the link task; it runs until `stop` is cancelled.
pub fn spawn(
    kv: Arc<KvServer>,
    policy: Arc<PolicyState>,
    mut faults: Faults,
    target: Target,
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
                r = link_once(&kv, &policy, &mut faults, &target, heartbeat_interval, started) => r,
                () = stop.cancelled() => return,
            };
            match outcome {
                Ok(Linked::Registered) => {
                    // The next outage is reported at warn level again.
                    reported = false;
                    backoff = FIRST_BACKOFF;
                }
                Ok(Linked::Refused(status)) => {
                    tracing::error!(control = %target.addr, code = ?status.code(), reason = status.message(), "the control plane refused this node");
                    backoff = MAX_BACKOFF;
                }
                Err(e) => {
                    // Once per outage at warn level; the retries are quiet.
                    if reported {
                        tracing::debug!(control = %target.addr, error = %e, "control plane unreachable");
                    } else {
                        tracing::warn!(control = %target.addr, error = %e, "control plane unreachable; retrying in the background");
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
    policy: &Arc<PolicyState>,
    faults: &mut Faults,
    target: &Target,
    heartbeat_interval: Duration,
    started: u64,
) -> Result<Linked, Box<dyn std::error::Error + Send + Sync>> {
    let addr = target.addr.as_str();
    let endpoint = match (&target.tls, addr.strip_prefix("https://")) {
        (Some(tls), Some(_)) => {
            tonic::transport::Endpoint::from_shared(addr.to_string())?.tls_config(tls.clone())?
        }
        _ => tonic::transport::Endpoint::from_shared(format!(
            "http://{}",
            addr.trim_start_matches("http://")
        ))?,
    };
    let channel = kiwi_proto::limits::client(endpoint, kiwi_proto::limits::PEER_KEEPALIVE)
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
    let mut request = tonic::Request::new(tokio_stream::wrappers::ReceiverStream::new(rx));
    if let Some(token) = &target.token {
        request.metadata_mut().insert(
            "authorization",
            format!("Bearer {token}")
                .parse()
                .map_err(|_| "control.token_file: the token cannot travel in a header")?,
        );
    }
    let mut inbound = match client.link(request).await {
        Ok(r) => r.into_inner(),
        Err(s)
            if matches!(
                s.code(),
                Code::FailedPrecondition
                    | Code::AlreadyExists
                    | Code::InvalidArgument
                    | Code::Unauthenticated
                    | Code::PermissionDenied
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
                // The driver's figures wait at most half an interval: a stalled disk must not stop
                // the heartbeats (the node would look down) nor the reading of commands below.
                let mut metrics = kv.heartbeat_metrics(heartbeat_interval / 2).await;
                (metrics.policy_epoch, metrics.policy_version) = policy.running();
                if tx.send(NodeMessage { msg: Some(NodeMsg::Heartbeat(Heartbeat { metrics: Some(metrics) })) }).await.is_err() {
                    return Ok(Linked::Registered);
                }
            }
            Some(event) = faults.events.recv() => {
                if tx.send(NodeMessage { msg: Some(NodeMsg::FaultEvent(event)) }).await.is_err() {
                    return Ok(Linked::Registered);
                }
            }
            m = inbound.message() => match m {
                Ok(Some(m)) => match m.msg {
                    Some(ControlMsg::Policy(update)) => {
                        let kv = Arc::clone(kv);
                        let state = Arc::clone(policy);
                        // Applying persists with fsync: off the async threads.
                        let ack = tokio::task::spawn_blocking(move || apply(&kv, &state, update)).await?;
                        if tx.send(NodeMessage { msg: Some(NodeMsg::PolicyAck(ack)) }).await.is_err() {
                            return Ok(Linked::Registered);
                        }
                    }
                    Some(ControlMsg::Fault(command)) => faults.injector.command(command),
                    _ => {}
                },
                Ok(None) => return Ok(Linked::Registered),
                Err(s) => {
                    tracing::warn!(control = %addr, error = %s, "the control plane closed the link");
                    return Ok(Linked::Registered);
                }
            },
        }
    }
}
