//! `kiwi lease ...`, `kiwi lock` and `kiwi elect`: leases and the coordination built on them. Lease ids
//! are printed and read in hexadecimal, as etcdctl does.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::Subcommand;
use kiwi_client::concurrency::{Election, Mutex, Session};
use kiwi_client::{CallOptions, Client};
use serde_json::json;

use crate::Outcome;

#[derive(Debug, Subcommand)]
pub enum LeaseCommand {
    /// Grant a lease of TTL (e.g. 10s, 1m; at least the cluster's floor of 1.5 election timeouts) and
    /// print its id: `lease 5f3a... granted with TTL 10s`.
    Grant {
        #[arg(value_parser = humantime::parse_duration)]
        ttl: Duration,
    },
    /// Keep lease ID alive until Ctrl-C (a keepalive every third of its TTL), printing each refresh;
    /// exits 1 when the lease is gone.
    KeepAlive {
        #[arg(value_parser = parse_id)]
        id: u64,
        /// One keepalive, then exit.
        #[arg(long)]
        once: bool,
    },
    /// Revoke lease ID now, deleting every key attached to it.
    Revoke {
        #[arg(value_parser = parse_id)]
        id: u64,
    },
    /// Every lease's id.
    List,
    /// Lease ID's remaining and granted TTL (exit 1 if it does not exist).
    Ttl {
        #[arg(value_parser = parse_id)]
        id: u64,
        /// List the keys attached.
        #[arg(long)]
        keys: bool,
    },
}

/// A lease id in hex (as printed), with an optional 0x.
pub fn parse_id(s: &str) -> Result<u64, String> {
    let t = s.trim_start_matches("0x");
    u64::from_str_radix(t, 16)
        .ok()
        .filter(|&id| id != 0)
        .ok_or_else(|| format!("{s:?} is not a lease id (the hex id `kiwi lease grant` prints)"))
}

fn not_found(e: &kiwi_client::Error) -> bool {
    matches!(e, kiwi_client::Error::Rpc(s) if s.code() == tonic::Code::NotFound)
}

pub async fn run(
    command: LeaseCommand,
    client: &Client,
    call: &CallOptions,
    json: bool,
) -> anyhow::Result<Outcome> {
    match command {
        LeaseCommand::Grant { ttl } => {
            let secs = i64::try_from(ttl.as_secs().max(1)).unwrap_or(i64::MAX);
            let (id, ttl) = client.lease_grant(secs, 0, call).await?;
            if json {
                println!("{}", json!({"id": format!("{id:x}"), "ttl": ttl}));
            } else {
                println!("lease {id:x} granted with TTL {ttl}s");
            }
            Ok(Outcome::Ok)
        }
        LeaseCommand::KeepAlive { id, once } => loop {
            let ttl = client.lease_keep_alive(id, call).await?;
            if ttl == 0 {
                eprintln!("lease {id:x} expired or was revoked");
                return Ok(Outcome::Miss);
            }
            if json {
                println!("{}", json!({"id": format!("{id:x}"), "ttl": ttl}));
            } else {
                println!("lease {id:x} kept alive with TTL {ttl}s");
            }
            if once {
                return Ok(Outcome::Ok);
            }
            let every = Duration::from_millis(u64::try_from(ttl).unwrap_or(1) * 1000 / 3);
            tokio::select! {
                () = tokio::time::sleep(every) => {}
                _ = tokio::signal::ctrl_c() => return Ok(Outcome::Ok),
            }
        },
        LeaseCommand::Revoke { id } => match client.lease_revoke(id, call).await {
            Ok(deleted) => {
                if json {
                    println!("{}", json!({"id": format!("{id:x}"), "deleted": deleted}));
                } else {
                    println!("lease {id:x} revoked ({deleted} keys deleted)");
                }
                Ok(Outcome::Ok)
            }
            Err(e) if not_found(&e) => {
                eprintln!("lease {id:x} not found");
                Ok(Outcome::Miss)
            }
            Err(e) => Err(e.into()),
        },
        LeaseCommand::List => {
            let ids = client.lease_leases(call).await?;
            if json {
                let ids: Vec<String> = ids.iter().map(|id| format!("{id:x}")).collect();
                println!("{}", json!({"leases": ids}));
            } else {
                println!("found {} leases", ids.len());
                for id in ids {
                    println!("{id:x}");
                }
            }
            Ok(Outcome::Ok)
        }
        LeaseCommand::Ttl { id, keys } => match client.lease_time_to_live(id, keys, call).await {
            Ok(r) => {
                let keys: Vec<String> = r
                    .keys
                    .iter()
                    .map(|k| String::from_utf8_lossy(k).into_owned())
                    .collect();
                if json {
                    println!(
                        "{}",
                        json!({"id": format!("{id:x}"), "ttl": r.ttl, "granted_ttl": r.granted_ttl, "keys": keys})
                    );
                } else {
                    print!(
                        "lease {id:x} granted with TTL {}s, remaining {}s",
                        r.granted_ttl, r.ttl
                    );
                    if r.keys.is_empty() {
                        println!();
                    } else {
                        println!(", attached keys {keys:?}");
                    }
                }
                Ok(Outcome::Ok)
            }
            Err(e) if not_found(&e) => {
                eprintln!("lease {id:x} not found");
                Ok(Outcome::Miss)
            }
            Err(e) => Err(e.into()),
        },
    }
}

/// `kiwi lock NAME -- COMMAND...`: runs COMMAND holding the lock; exits with its status. If the session
/// is lost while it runs, COMMAND is killed and `kiwi lock` exits 1.
pub async fn lock(
    client: Client,
    name: &str,
    ttl: Duration,
    command: &[String],
) -> anyhow::Result<Outcome> {
    let client = Arc::new(client);
    let secs = i64::try_from(ttl.as_secs().max(1)).unwrap_or(i64::MAX);
    let session = Session::new(Arc::clone(&client), secs)
        .await
        .context("cannot open a session (lease) for the lock")?;
    let mut mutex = Mutex::new(&session, name);
    tokio::select! {
        r = mutex.lock() => r.with_context(|| format!("cannot take the lock {name:?}"))?,
        why = session.lost() => anyhow::bail!("the session ended before the lock was taken: {why}"),
        _ = tokio::signal::ctrl_c() => {
            let _ = session.close().await;
            return Ok(Outcome::Exit(130));
        }
    }
    eprintln!("holding lock {:?} (key {})", name, mutex.key());
    let (program, args) = command
        .split_first()
        .context("give the command to run after --")?;
    let mut child = tokio::process::Command::new(program)
        .args(args)
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("cannot run {program:?}"))?;
    let outcome = tokio::select! {
        status = child.wait() => {
            let status = status?;
            Outcome::Exit(status.code().map_or(1, |c| u8::try_from(c).unwrap_or(1)))
        }
        why = session.lost() => {
            let _ = child.kill().await;
            eprintln!("error: the lock {name:?} was lost while {program:?} ran ({why}); it was killed");
            Outcome::Exit(1)
        }
    };
    let _ = mutex.unlock().await;
    let _ = session.close().await;
    Ok(outcome)
}

/// `kiwi elect NAME VALUE`: campaigns and prints when elected, then leads until Ctrl-C (resigning then);
/// with `--listen`, prints each leader of NAME instead, without campaigning.
pub async fn elect(
    client: Client,
    name: &str,
    value: Option<&str>,
    listen: bool,
    ttl: Duration,
) -> anyhow::Result<Outcome> {
    if listen {
        kiwi_client::concurrency::observe(&client, name, |leader| {
            match leader {
                Some(kv) => println!("{}", String::from_utf8_lossy(&kv.value)),
                None => println!("(no leader)"),
            }
            true
        })
        .await?;
        return Ok(Outcome::Ok);
    }
    let value = value.context("give the VALUE to proclaim (or --listen)")?;
    let client = Arc::new(client);
    let secs = i64::try_from(ttl.as_secs().max(1)).unwrap_or(i64::MAX);
    let session = Session::new(Arc::clone(&client), secs)
        .await
        .context("cannot open a session (lease) for the election")?;
    let mut election = Election::new(&session, name);
    tokio::select! {
        r = election.campaign(value.as_bytes()) => r?,
        _ = tokio::signal::ctrl_c() => {
            let _ = session.close().await;
            return Ok(Outcome::Exit(130));
        }
    }
    println!("elected: {name} = {value}");
    tokio::select! {
        why = session.lost() => {
            eprintln!("error: leadership of {name:?} lost: {why}");
            return Ok(Outcome::Exit(1));
        }
        _ = tokio::signal::ctrl_c() => {}
    }
    let _ = election.resign().await;
    let _ = session.close().await;
    Ok(Outcome::Ok)
}
