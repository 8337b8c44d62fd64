//! A `kiwi-control` process on loopback (its log beside its data directory), SIGKILLed on drop, and
//! its operator client; shared by the control plane, chaos and fuzz tests.

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use kiwi_proto::v1::control_service_client::ControlServiceClient;
use kiwi_proto::v1::{ClusterStatusRequest, ClusterStatusResponse, Event, EventsRequest};

/// Heartbeat interval the tests give their nodes (`[control] heartbeat_interval_ms`).
pub const HEARTBEAT_MS: u64 = 100;

/// The `kiwi-control` binary: next to `kiwi-node` (see [`crate::cluster::node_binary`]).
pub fn control_binary() -> std::path::PathBuf {
    crate::cluster::node_binary().with_file_name("kiwi-control")
}

pub use crate::ports::free_addr;

/// A running `kiwi-control`.
pub struct ControlProc {
    child: Child,
    pub addr: SocketAddr,
}

impl ControlProc {
    pub fn start(addr: SocketAddr, data_dir: &Path) -> ControlProc {
        ControlProc::start_with(addr, data_dir, &[])
    }

    pub fn start_with(addr: SocketAddr, data_dir: &Path, extra_args: &[String]) -> ControlProc {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(data_dir.with_extension("log"))
            .unwrap();
        let child = Command::new(control_binary())
            .arg("--listen-addr")
            .arg(addr.to_string())
            .arg("--data-dir")
            .arg(data_dir)
            .args(extra_args)
            .env_remove("RUST_LOG")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("start kiwi-control");
        ControlProc { child, addr }
    }

    /// Whether the process still runs.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    pub async fn client(&self) -> ControlServiceClient<tonic::transport::Channel> {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            match ControlServiceClient::connect(format!("http://{}", self.addr)).await {
                Ok(c) => return c,
                Err(e) => assert!(
                    Instant::now() < deadline,
                    "kiwi-control never answered: {e}"
                ),
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub async fn status(&self) -> ClusterStatusResponse {
        self.client()
            .await
            .cluster_status(ClusterStatusRequest {})
            .await
            .unwrap()
            .into_inner()
    }

    pub async fn events(&self) -> Vec<Event> {
        self.client()
            .await
            .events(EventsRequest {
                after_seq: 0,
                limit: 1000,
            })
            .await
            .unwrap()
            .into_inner()
            .events
    }

    /// Polls the status until `ok` holds.
    pub async fn wait_status(
        &self,
        what: &str,
        ok: impl Fn(&ClusterStatusResponse) -> bool,
    ) -> ClusterStatusResponse {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let s = self.status().await;
            if ok(&s) {
                return s;
            }
            assert!(
                Instant::now() < deadline,
                "{what}: never held; last status {s:#?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for ControlProc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The ids of the nodes the status shows up.
pub fn up(s: &ClusterStatusResponse) -> Vec<u64> {
    s.nodes.iter().filter(|n| n.up).map(|n| n.node_id).collect()
}
