//! Coordination on leases, with etcd's algorithms (and key layout, so the two interoperate in spirit):
//!
//! - [`Session`]: a lease kept alive in the background (a keepalive every third of the TTL); it ends when
//!   closed or dropped (the lease is revoked) or when the lease is lost (expired, or not kept alive for a
//!   whole TTL), which [`Session::lost`] reports.
//! - [`Mutex`]: `NAME/` + the session's lease id (hex) is put with the lease if absent; its
//!   `create_revision` is the place in line. The holder is the key with the lowest `create_revision`; a
//!   waiter watches the key just before its own until it is deleted, then looks again. Waiters acquire in
//!   order of arrival, and a crashed holder's key goes with its lease.
//! - [`Election`]: the same line; the first in line is the leader and its key's value is the proclaimed
//!   value. [`Election::observe`] follows the leader.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use crate::{
    CallOptions, Client, Compare, Error, KeyRange, KeyValue, ScanOptions, TxnOp, WatchUpdate,
    compare, key_event, txn_op, txn_op_response,
};

/// A lease kept alive in the background.
pub struct Session {
    client: Arc<Client>,
    lease: u64,
    ttl: i64,
    lost: watch::Receiver<Option<String>>,
    keeper: tokio::task::JoinHandle<()>,
    revoke_on_drop: bool,
}

impl Session {
    /// Grants a lease of `ttl` seconds and keeps it alive until the session ends.
    ///
    /// # Errors
    /// The grant failed.
    pub async fn new(client: Arc<Client>, ttl: i64) -> Result<Session, Error> {
        let (lease, ttl) = client.lease_grant(ttl, 0, &CallOptions::default()).await?;
        let (tx, lost) = watch::channel(None);
        let every = Duration::from_millis(u64::try_from(ttl).unwrap_or(1).max(1) * 1000 / 3);
        let keeper = {
            let client = Arc::clone(&client);
            tokio::spawn(async move {
                let full = Duration::from_secs(u64::try_from(ttl).unwrap_or(1));
                let mut kept = tokio::time::Instant::now();
                loop {
                    tokio::time::sleep(every.min(Duration::from_secs(1))).await;
                    if kept.elapsed() < every {
                        continue;
                    }
                    let opts = CallOptions {
                        timeout: Some(every.max(Duration::from_millis(500))),
                        ..CallOptions::default()
                    };
                    match client.lease_keep_alive(lease, &opts).await {
                        Ok(0) => {
                            let _ =
                                tx.send(Some(format!("lease {lease:x} expired or was revoked")));
                            return;
                        }
                        Ok(_) => kept = tokio::time::Instant::now(),
                        Err(e) if kept.elapsed() >= full => {
                            let _ = tx.send(Some(format!(
                                "lease {lease:x} could not be kept alive for its TTL of {ttl} s: {e}"
                            )));
                            return;
                        }
                        Err(_) => {}
                    }
                }
            })
        };
        Ok(Session {
            client,
            lease,
            ttl,
            lost,
            keeper,
            revoke_on_drop: true,
        })
    }

    /// The session's lease id.
    pub fn lease(&self) -> u64 {
        self.lease
    }

    /// The TTL granted (seconds).
    pub fn ttl(&self) -> i64 {
        self.ttl
    }

    /// Why the session is lost, if it is.
    pub fn is_lost(&self) -> Option<String> {
        self.lost.borrow().clone()
    }

    /// Waits until the session is lost; returns why.
    pub async fn lost(&self) -> String {
        let mut rx = self.lost.clone();
        match rx.wait_for(Option::is_some).await {
            Ok(why) => why.clone().unwrap_or_default(),
            Err(_) => "the session ended".into(),
        }
    }

    /// Stops the keepalives without revoking the lease, as a crashed holder would: its keys (its locks,
    /// its candidacy) stay until the lease expires. For failure tests.
    pub fn abandon(mut self) {
        self.keeper.abort();
        self.revoke_on_drop = false;
    }

    /// Ends the session: stops the keepalives and revokes the lease (its keys go with it).
    ///
    /// # Errors
    /// The revocation failed (the lease then expires after its TTL).
    pub async fn close(mut self) -> Result<(), Error> {
        self.keeper.abort();
        self.revoke_on_drop = false;
        match self
            .client
            .lease_revoke(self.lease, &CallOptions::default())
            .await
        {
            Ok(_) => Ok(()),
            Err(Error::Rpc(s)) if s.code() == tonic::Code::NotFound => Ok(()),
            Err(e) => Err(e),
        }
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        self.keeper.abort();
        if !self.revoke_on_drop {
            return;
        }
        // Best effort: revoke now rather than let the lease run out.
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            let (client, lease) = (Arc::clone(&self.client), self.lease);
            rt.spawn(async move {
                let _ = client.lease_revoke(lease, &CallOptions::default()).await;
            });
        }
    }
}

/// The line of keys under a prefix, each put with a session's lease; first come, first served.
struct Line {
    client: Arc<Client>,
    prefix: String,
    key: String,
    lease: u64,
    /// Our key's create_revision, once in line.
    rev: u64,
}

impl Line {
    fn new(session: &Session, name: &str) -> Line {
        let prefix = format!("{}/", name.trim_end_matches('/'));
        Line {
            client: Arc::clone(&session.client),
            key: format!("{prefix}{:x}", session.lease),
            prefix,
            lease: session.lease,
            rev: 0,
        }
    }

    /// Puts our key with `value` unless it is there; learns our place (its create_revision).
    async fn enter(&mut self, value: &[u8]) -> Result<(), Error> {
        let key = self.key.as_bytes().to_vec();
        let absent = Compare {
            result: compare::CompareResult::Equal as i32,
            target: compare::CompareTarget::Create as i32,
            key: key.clone(),
            target_union: Some(compare::TargetUnion::CreateRevision(0)),
            range_end: Vec::new(),
        };
        let put = TxnOp {
            op: Some(txn_op::Op::Put(txn_op::Put {
                key: key.clone(),
                value: value.to_vec(),
                prev_kv: false,
                lease: self.lease,
            })),
        };
        let get = TxnOp {
            op: Some(txn_op::Op::Range(txn_op::Range {
                key,
                ..txn_op::Range::default()
            })),
        };
        let r = self
            .client
            .txn(vec![absent], vec![put], vec![get], &CallOptions::default())
            .await?;
        self.rev = if r.succeeded {
            r.header.map_or(0, |h| h.revision)
        } else {
            match r.responses.first().and_then(|o| o.response.as_ref()) {
                Some(txn_op_response::Response::Range(g)) => {
                    g.kvs.first().map_or(0, |kv| kv.create_revision)
                }
                _ => 0,
            }
        };
        Ok(())
    }

    /// Every key in line, by create_revision, and the revision they were read at.
    async fn everyone(&self) -> Result<(Vec<KeyValue>, u64), Error> {
        let scan = ScanOptions {
            limit: 10_000,
            ..ScanOptions::default()
        };
        let range = KeyRange::Prefix(self.prefix.clone().into_bytes());
        let (mut kvs, _, rev) = self
            .client
            .scan_kvs(&range, &scan, &CallOptions::default())
            .await?;
        kvs.sort_by_key(|kv| kv.create_revision);
        Ok((kvs, rev))
    }

    /// Waits until no key ahead of ours is left.
    async fn wait_turn(&self) -> Result<(), Error> {
        loop {
            let (kvs, at) = self.everyone().await?;
            let Some(ahead) = kvs
                .iter()
                .filter(|kv| kv.create_revision < self.rev)
                .max_by_key(|kv| kv.create_revision)
            else {
                return Ok(());
            };
            // Wait for the key just ahead to go (its holder unlocks, or its lease ends).
            let mut w = self.client.watch(&KeyRange::key(&ahead.key), at + 1, false);
            loop {
                match w.next().await? {
                    WatchUpdate::Events(events)
                        if events
                            .iter()
                            .any(|e| e.r#type == key_event::EventType::Delete as i32) =>
                    {
                        break;
                    }
                    WatchUpdate::Events(_) => {}
                    // The history moved past: look again from now.
                    WatchUpdate::Compacted { .. } => break,
                }
            }
        }
    }

    async fn leave(&mut self) -> Result<(), Error> {
        self.client
            .delete(self.key.as_bytes(), &CallOptions::default())
            .await?;
        self.rev = 0;
        Ok(())
    }
}

/// A distributed lock (etcd's algorithm; see the module doc).
pub struct Mutex {
    line: Line,
}

impl Mutex {
    /// The lock `name` for `session`'s holder.
    pub fn new(session: &Session, name: &str) -> Mutex {
        Mutex {
            line: Line::new(session, name),
        }
    }

    /// Waits until the lock is held by this session.
    ///
    /// # Errors
    /// [`Error`] from the cluster.
    pub async fn lock(&mut self) -> Result<(), Error> {
        self.line.enter(b"").await?;
        if let Err(e) = self.line.wait_turn().await {
            let _ = self.line.leave().await;
            return Err(e);
        }
        Ok(())
    }

    /// Releases the lock.
    ///
    /// # Errors
    /// [`Error`] from the cluster (the lock then goes with the session's lease).
    pub async fn unlock(&mut self) -> Result<(), Error> {
        self.line.leave().await
    }

    /// The key this session holds the lock with (while it does): writes may compare its revision.
    pub fn key(&self) -> &str {
        &self.line.key
    }

    /// The lock key's create_revision (0 while not in line).
    pub fn revision(&self) -> u64 {
        self.line.rev
    }
}

/// A leader election (etcd's algorithm; see the module doc).
pub struct Election {
    line: Line,
}

impl Election {
    /// The election `name`, for `session`'s candidate.
    pub fn new(session: &Session, name: &str) -> Election {
        Election {
            line: Line::new(session, name),
        }
    }

    /// Waits until this candidate leads, proclaiming `value`.
    ///
    /// # Errors
    /// [`Error`] from the cluster.
    pub async fn campaign(&mut self, value: &[u8]) -> Result<(), Error> {
        self.line.enter(value).await?;
        self.line.wait_turn().await?;
        // Already in line from before: make the value the one asked for.
        self.proclaim(value).await
    }

    /// Changes the leader's value (while this candidate leads).
    ///
    /// # Errors
    /// FAILED_PRECONDITION-like [`Error::Rpc`] when this candidate is not the leader any more.
    pub async fn proclaim(&mut self, value: &[u8]) -> Result<(), Error> {
        let key = self.line.key.as_bytes().to_vec();
        let ours = Compare {
            result: compare::CompareResult::Equal as i32,
            target: compare::CompareTarget::Create as i32,
            key: key.clone(),
            target_union: Some(compare::TargetUnion::CreateRevision(self.line.rev)),
            range_end: Vec::new(),
        };
        let put = TxnOp {
            op: Some(txn_op::Op::Put(txn_op::Put {
                key,
                value: value.to_vec(),
                prev_kv: false,
                lease: self.line.lease,
            })),
        };
        let r = self
            .line
            .client
            .txn(vec![ours], vec![put], Vec::new(), &CallOptions::default())
            .await?;
        if r.succeeded {
            Ok(())
        } else {
            Err(Error::Rpc(tonic::Status::failed_precondition(
                "this candidate's key is gone: it is not the leader any more",
            )))
        }
    }

    /// Steps down (the next in line leads).
    ///
    /// # Errors
    /// [`Error`] from the cluster.
    pub async fn resign(&mut self) -> Result<(), Error> {
        self.line.leave().await
    }

    /// The current leader's key and value, if anyone leads.
    ///
    /// # Errors
    /// [`Error`] from the cluster.
    pub async fn leader(&self) -> Result<Option<KeyValue>, Error> {
        Ok(self.line.everyone().await?.0.into_iter().next())
    }
}

/// Follows election `name`: calls `on_change` with each new leader (key and value; `None` when nobody
/// leads) until it returns false.
///
/// # Errors
/// [`Error`] from the cluster.
pub async fn observe(
    client: &Client,
    name: &str,
    mut on_change: impl FnMut(Option<&KeyValue>) -> bool,
) -> Result<(), Error> {
    let prefix = format!("{}/", name.trim_end_matches('/'));
    let range = KeyRange::Prefix(prefix.into_bytes());
    let scan = ScanOptions {
        limit: 10_000,
        ..ScanOptions::default()
    };
    let mut last: Option<(Vec<u8>, Vec<u8>)> = None;
    let mut first = true;
    loop {
        let (mut kvs, _, at) = client
            .scan_kvs(&range, &scan, &CallOptions::default())
            .await?;
        kvs.sort_by_key(|kv| kv.create_revision);
        let leader = kvs.first();
        let now = leader.map(|kv| (kv.key.clone(), kv.value.clone()));
        if (first || now != last) && !on_change(leader) {
            return Ok(());
        }
        first = false;
        last = now;
        // Any change under the prefix: look again.
        let mut w = client.watch(&range, at + 1, false);
        w.next().await?;
    }
}
