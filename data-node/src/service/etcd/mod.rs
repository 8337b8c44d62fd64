//! etcd's v3 API on `[etcd] listen_addr`: a translation onto Kiwi's own `KvService` ([`KvApi`]), never a
//! second engine. Each etcd call becomes the Kiwi call(s) with the same meaning (revisions, history,
//! transactions, watches and leases have etcd's semantics in Kiwi already); the answers are translated
//! back, with etcd's error messages where clients match on them.
//!
//! - [`kv`]: `KV` (Range with sort and revision filters, Put with `ignore_value`/`ignore_lease`, DeleteRange,
//!   Txn, Compact).
//! - [`watch`]: `Watch` (a Kiwi watch stream per etcd stream).
//! - [`lease`]: the `Lease` service.
//! - [`maintenance`]: `Cluster` (MemberList, MemberAdd, MemberPromote, MemberRemove) and `Maintenance`
//!   (Alarm, Status, Hash, HashKV, MoveLeader, Defragment, Snapshot).
//! - [`auth`]: `Auth.Authenticate` with Kiwi's tokens, the role each etcd call needs, the caller's token
//!   passed on with forwarded calls.
//!
//! etcd clients send any call to any member. Kiwi answers writes (and leader-only calls) on the leader
//! only, so a member that is not the leader forwards them to the leader's client port ([`Forwarder`]),
//! as etcd's members forward proposals.

mod auth;
mod kv;
mod lease;
mod maintenance;
mod watch;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use kiwi_proto::etcd::etcdserverpb;
use kiwi_proto::v1::kv_service_client::KvServiceClient;
use tonic::transport::{Channel, ClientTlsConfig, Endpoint};
use tonic::{Code, Status};

use super::{KvApi, KvServer};

pub use auth::{CallerTokenLayer, EtcdAuth, method_role};
pub use kv::EtcdKv;
pub use lease::EtcdLease;
pub use maintenance::{EtcdCluster, EtcdMaintenance};
pub use watch::EtcdWatch;

/// The etcd API level served, as `Maintenance.Status` reports it (etcdctl 3.4 checks the major version).
pub const ETCD_VERSION: &str = "3.4.0";

/// What every etcd service holds: Kiwi's API on this node, and the way to the leader.
#[derive(Clone)]
pub struct Etcd {
    kv: KvApi,
    server: Arc<KvServer>,
    forward: Arc<Forwarder>,
    /// This member's etcd URL (`http://` or `https://` and `[etcd] listen_addr`).
    url: String,
    /// Other members' etcd URLs, as they last told them (`NodeAdmin.Status`), by member id.
    urls: Arc<Mutex<HashMap<u64, String>>>,
    /// The tokens, when they are on (`[security] tokens_file`).
    auth: auth::Tokens,
}

impl Etcd {
    /// `url`: this member's etcd URL; `tls`: how to reach another member's client port when it serves
    /// TLS.
    pub fn new(
        server: &Arc<KvServer>,
        url: String,
        tls: Option<ClientTlsConfig>,
        auth: auth::Tokens,
    ) -> Etcd {
        // `NodeAdmin.MemberInfo` tells other members where this one serves etcd's API.
        let _ = server.etcd_url.set(url.clone());
        Etcd {
            kv: KvApi(Arc::clone(server)),
            server: Arc::clone(server),
            url,
            urls: Arc::default(),
            auth,
            forward: Arc::new(Forwarder {
                tls,
                channels: Mutex::new(HashMap::new()),
            }),
        }
    }

    /// etcd's response header for an answer at Kiwi `revision`.
    fn header(&self, revision: u64) -> Option<etcdserverpb::ResponseHeader> {
        let st = self.server.driver.status();
        Some(etcdserverpb::ResponseHeader {
            cluster_id: self
                .server
                .cluster
                .load(std::sync::atomic::Ordering::Relaxed),
            member_id: self.server.node_id,
            revision: i64::try_from(revision).unwrap_or(i64::MAX),
            raft_term: st.term,
        })
    }
}

/// A channel to another member carrying the caller's token.
type Forwarded = tonic::service::interceptor::InterceptedService<Channel, auth::CallerToken>;

/// Channels to other members' client ports, for calls only the leader answers.
pub struct Forwarder {
    tls: Option<ClientTlsConfig>,
    channels: Mutex<HashMap<String, Channel>>,
}

impl Forwarder {
    /// A `NodeAdmin` client on `addr` (a member's client address from a "not the leader" answer),
    /// calling with the current call's token.
    fn admin(
        &self,
        addr: &str,
    ) -> Result<kiwi_proto::v1::node_admin_client::NodeAdminClient<Forwarded>, Status> {
        Ok(
            kiwi_proto::v1::node_admin_client::NodeAdminClient::with_interceptor(
                self.channel(addr)?,
                auth::CallerToken::current(),
            ),
        )
    }

    /// A Kiwi client on `addr` (a member's client address from a "not the leader" answer), calling
    /// with the current call's token.
    fn client(&self, addr: &str) -> Result<KvServiceClient<Forwarded>, Status> {
        Ok(KvServiceClient::with_interceptor(
            self.channel(addr)?,
            auth::CallerToken::current(),
        ))
    }

    fn channel(&self, addr: &str) -> Result<Channel, Status> {
        let mut channels = self
            .channels
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(c) = channels.get(addr) {
            return Ok(c.clone());
        }
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        let mut endpoint = Endpoint::from_shared(format!("{scheme}://{addr}"))
            .map_err(|e| Status::internal(format!("bad leader address {addr:?}: {e}")))?
            .tcp_nodelay(true)
            .connect_timeout(std::time::Duration::from_secs(2));
        if let Some(tls) = &self.tls {
            endpoint = endpoint
                .tls_config(tls.clone())
                .map_err(|e| Status::internal(format!("TLS to the leader: {e}")))?;
        }
        let channel = endpoint.connect_lazy();
        channels.insert(addr.to_string(), channel.clone());
        Ok(channel)
    }
}

/// The leader's client address on a "not the leader" status.
fn leader_addr(s: &Status) -> Option<String> {
    (s.code() == Code::FailedPrecondition)
        .then(|| s.metadata().get(super::LEADER_ADDR_METADATA))
        .flatten()
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
}

/// Runs a Kiwi call on this node; when this node is not the leader, the same call on the leader. The
/// local call is the `KvService` method, or `$local` (same request, a `Response` of the message the
/// leader's client decodes).
macro_rules! via_leader {
    ($etcd:expr, $method:ident, $req:expr) => {
        $crate::service::etcd::via_leader!(
            $etcd,
            $method,
            $req,
            kiwi_proto::v1::kv_service_server::KvService::$method
        )
    };
    ($etcd:expr, $method:ident, $req:expr, $local:path) => {{
        let req = $req;
        match $local(&$etcd.kv, tonic::Request::new(req.clone())).await {
            Ok(r) => Ok(r.into_inner()),
            Err(s) => match $crate::service::etcd::leader_addr(&s) {
                Some(addr) => {
                    let mut c = $etcd.forward.client(&addr)?;
                    c.$method(tonic::Request::new(req))
                        .await
                        .map(tonic::Response::into_inner)
                }
                None => Err(s),
            },
        }
    }};
}
pub(crate) use via_leader;

/// Runs a `NodeAdmin` call on this node; when this node is not the leader, the same call on the leader.
macro_rules! admin_via_leader {
    ($etcd:expr, $method:ident, $req:expr) => {{
        let req = $req;
        let admin = $crate::service::AdminApi(std::sync::Arc::clone(&$etcd.server));
        match kiwi_proto::v1::node_admin_server::NodeAdmin::$method(
            &admin,
            tonic::Request::new(req.clone()),
        )
        .await
        {
            Ok(r) => Ok(r.into_inner()),
            Err(s) => match $crate::service::etcd::leader_addr(&s) {
                Some(addr) => $etcd
                    .forward
                    .admin(&addr)?
                    .$method(tonic::Request::new(req))
                    .await
                    .map(tonic::Response::into_inner),
                None => Err(s),
            },
        }
    }};
}
pub(crate) use admin_via_leader;

/// A Kiwi status as etcd's clients expect it: etcd's message (`etcdserver: ...`) and code where they
/// match on them (clientv3 turns these strings into its typed errors), else Kiwi's message.
fn to_etcd(s: Status) -> Status {
    let m = s.message();
    let (code, text) = match s.code() {
        Code::OutOfRange if m.contains("compacted") => (
            Code::OutOfRange,
            "etcdserver: mvcc: required revision has been compacted",
        ),
        Code::OutOfRange if m.contains("future revision") => (
            Code::OutOfRange,
            "etcdserver: mvcc: required revision is a future revision",
        ),
        Code::NotFound if m.contains("lease") => {
            (Code::NotFound, "etcdserver: requested lease not found")
        }
        Code::FailedPrecondition if m.contains("already exists") => {
            (Code::FailedPrecondition, "etcdserver: lease already exists")
        }
        Code::InvalidArgument if m.contains("duplicate key") => (
            Code::InvalidArgument,
            "etcdserver: duplicate key given in txn request",
        ),
        Code::InvalidArgument if m.contains("key is empty") || m.contains("must not be empty") => {
            (Code::InvalidArgument, "etcdserver: key is not provided")
        }
        Code::Unavailable if m.contains("no leader") => {
            (Code::Unavailable, "etcdserver: no leader")
        }
        Code::DeadlineExceeded => (Code::DeadlineExceeded, "etcdserver: request timed out"),
        // etcd's NOSPACE answer, which its clients know (`rpctypes.ErrGRPCNoSpace`).
        Code::ResourceExhausted if m.contains("min_free_bytes") => (
            Code::ResourceExhausted,
            "etcdserver: mvcc: database space exceeded",
        ),
        code => return Status::new(code, format!("etcdserver: {m}")),
    };
    Status::new(code, text)
}

fn int(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

fn uint(n: i64) -> u64 {
    u64::try_from(n).unwrap_or(0)
}

/// A Kiwi key-value as etcd's.
fn to_etcd_kv(kv: kiwi_proto::v1::KeyValue) -> kiwi_proto::etcd::mvccpb::KeyValue {
    kiwi_proto::etcd::mvccpb::KeyValue {
        key: kv.key,
        create_revision: int(kv.create_revision),
        mod_revision: int(kv.mod_revision),
        version: int(kv.version),
        value: kv.value,
        lease: int(kv.lease),
    }
}
