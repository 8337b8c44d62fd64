//! Authentication on the etcd port: etcd's `Auth.Authenticate` with a Kiwi principal and its token as
//! the password, the role each etcd call needs, and the caller's token passed on with calls forwarded
//! to the leader.
//!
//! etcd's clients authenticate once (`Authenticate(name, password)`) and send the token they get as
//! `token` metadata; Kiwi's tokens are what they are given back, so the port's `AuthLayer` (which also
//! reads `token`) checks them as the client port checks `authorization: Bearer`. A call a follower
//! passes to the leader's client port carries the caller's token there ([`CallerToken`]), so the
//! leader applies the caller's role, not the follower's.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use kiwi_proto::auth::{Authenticator, Role};
use kiwi_proto::etcd::etcdserverpb::{
    AuthenticateRequest, AuthenticateResponse, auth_server::Auth,
};
use tonic::codegen::http;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::{Request, Response, Status};

use super::Etcd;

tokio::task_local! {
    /// The token of the etcd call being served, if it presented one.
    static CALLER: Option<String>;
}

/// The role each etcd method needs when tokens are on (`None`: open). Reads and status need `read`,
/// writes and leases `write`, compaction, membership, leadership, defragmentation and snapshots
/// `admin`. `Auth` is open: `Authenticate` checks the password itself, the rest answer that Kiwi has
/// no users. `MemberList` is open, as in etcd: etcdctl's `--cluster` commands list the members before
/// they log in.
pub fn method_role(path: &str) -> Option<Role> {
    let (service, method) = path.trim_start_matches('/').split_once('/')?;
    match (service, method) {
        ("etcdserverpb.Auth", _) | ("etcdserverpb.Cluster", "MemberList") => None,
        ("etcdserverpb.KV", "Range")
        | ("etcdserverpb.Watch", "Watch")
        | ("etcdserverpb.Lease", "LeaseTimeToLive" | "LeaseLeases")
        | ("etcdserverpb.Maintenance", "Status" | "Alarm" | "Hash" | "HashKV") => Some(Role::Read),
        ("etcdserverpb.KV", "Put" | "DeleteRange" | "Txn")
        | ("etcdserverpb.Lease", "LeaseGrant" | "LeaseRevoke" | "LeaseKeepAlive") => {
            Some(Role::Write)
        }
        _ => Some(Role::Admin),
    }
}

/// The token the current etcd call presented (inside [`CallerTokenLayer`]'s scope).
pub(super) fn caller_token() -> Option<String> {
    CALLER.try_with(Clone::clone).ok().flatten()
}

/// Runs `f` as the call with `token` (for work a call hands to a task of its own).
pub(super) async fn as_caller<F: Future>(token: Option<String>, f: F) -> F::Output {
    CALLER.scope(token, f).await
}

/// An interceptor adding the caller's token to a call forwarded to the leader.
#[derive(Clone)]
pub struct CallerToken(Option<MetadataValue<Ascii>>);

impl CallerToken {
    /// The current call's token, if it presented one.
    pub(super) fn current() -> CallerToken {
        CallerToken(
            caller_token().and_then(|t| MetadataValue::try_from(format!("Bearer {t}")).ok()),
        )
    }
}

impl tonic::service::Interceptor for CallerToken {
    fn call(&mut self, mut r: Request<()>) -> Result<Request<()>, Status> {
        if let Some(t) = &self.0 {
            r.metadata_mut().insert("authorization", t.clone());
        }
        Ok(r)
    }
}

/// The `Auth` service: `Authenticate` only.
#[derive(Clone)]
pub struct EtcdAuth(pub Etcd);

#[tonic::async_trait]
impl Auth for EtcdAuth {
    async fn authenticate(
        &self,
        r: Request<AuthenticateRequest>,
    ) -> Result<Response<AuthenticateResponse>, Status> {
        let etcd = &self.0;
        let Some(auth) = &etcd.auth else {
            return Err(Status::failed_precondition(
                "etcdserver: authentication is not enabled",
            ));
        };
        let r = r.into_inner();
        let refused = || {
            Status::invalid_argument(
                "etcdserver: authentication failed, invalid user ID or password",
            )
        };
        let bearer = format!("Bearer {}", r.password);
        let p = auth
            .authenticate(Some(bearer.as_bytes()))
            .map_err(|_| refused())?;
        if p.name != r.name {
            return Err(refused());
        }
        Ok(Response::new(AuthenticateResponse {
            header: etcd.header(etcd.server.driver.status().applied),
            token: r.password,
        }))
    }
}

/// Wraps every etcd call: runs it as its caller (see [`caller_token`]), and answers etcd's `Auth`
/// calls other than `Authenticate` with what to do instead.
#[derive(Clone, Default)]
pub struct CallerTokenLayer;

impl<S> tower::Layer<S> for CallerTokenLayer {
    type Service = CallerTokenService<S>;

    fn layer(&self, inner: S) -> CallerTokenService<S> {
        CallerTokenService { inner }
    }
}

#[derive(Clone)]
pub struct CallerTokenService<S> {
    inner: S,
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

impl<S, B> tower::Service<http::Request<B>> for CallerTokenService<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<tonic::body::Body>>
        + Send
        + 'static,
    S::Future: Send + 'static,
    B: Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = S::Error;
    type Future = BoxFuture<Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let path = req.uri().path();
        if path.starts_with("/etcdserverpb.Auth/") && path != "/etcdserverpb.Auth/Authenticate" {
            let status = Status::unimplemented(
                "etcdserver: Kiwi keeps no users or roles: make a token with `kiwi token new \
                 --principal NAME --role read|write|admin`, list it in the tokens file, and \
                 authenticate with the principal as the user and the token as the password",
            );
            return Box::pin(async move { Ok(status.into_http()) });
        }
        let token = req
            .headers()
            .get("token")
            .and_then(|t| t.to_str().ok())
            .map(str::to_owned);
        Box::pin(CALLER.scope(token, self.inner.call(req)))
    }
}

/// The authenticator, when tokens are on.
pub type Tokens = Option<Arc<Authenticator>>;
