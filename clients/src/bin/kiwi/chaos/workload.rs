//! The clients of `kiwi chaos` and what they record.
//!
//! Three kinds of objects under the run's prefix, each operation recorded for the [`checker`]:
//! - **registers** `P/0..K`: put, linearizable get, compare-and-swap, one key each;
//! - **a group** `P/m/0..3`: transactions (a value compare on one key, then two writes, one of them
//!   sometimes a delete, and a read), range deletes, scans of the group, puts;
//! - **a bank** `P/bank/0..3`: transfers as transactions (read both accounts, then compare both
//!   `mod_revision`s and write both), and readers that sum every balance in one scan: the total must never
//!   change.
//!
//! [`checker`]: super::checker

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::bail;
use kiwi_client::{
    CallOptions, Client, Compare, Error, KeyRange, ScanOptions, TxnOp, compare, txn_op,
    txn_op_response,
};
use rand::{Rng, SeedableRng};

use kiwi_client::linearizability::{Action, Op};

/// Keys in the group and accounts in the bank.
const GROUP_KEYS: usize = 4;
const ACCOUNTS: usize = 4;
/// Each account's balance when the bank opens.
const OPENING_BALANCE: u64 = 100;

/// The keys of one run.
#[derive(Debug, Clone)]
pub struct Layout {
    pub prefix: String,
    pub registers: Vec<String>,
    pub group: Vec<String>,
    pub accounts: Vec<String>,
}

impl Layout {
    pub fn new(prefix: &str, registers: usize) -> Layout {
        let keys = |sub: &str, n: usize| (0..n).map(|i| format!("{prefix}/{sub}{i}")).collect();
        Layout {
            prefix: prefix.to_owned(),
            registers: keys("", registers.max(1)),
            group: keys("m/", GROUP_KEYS),
            accounts: keys("bank/", ACCOUNTS),
        }
    }

    /// The object (as the checker names it) a key belongs to.
    pub fn object_of(&self, key: &str) -> String {
        if self.group.iter().any(|k| k == key) {
            self.group_prefix()
        } else if self.accounts.iter().any(|k| k == key) {
            self.bank_prefix()
        } else {
            key.to_owned()
        }
    }

    pub fn group_prefix(&self) -> String {
        format!("{}/m/", self.prefix)
    }

    pub fn bank_prefix(&self) -> String {
        format!("{}/bank/", self.prefix)
    }

    /// Every key the clients write.
    pub fn all(&self) -> impl Iterator<Item = &String> {
        self.registers
            .iter()
            .chain(&self.group)
            .chain(&self.accounts)
    }
}

/// One second of the run: operations ok, errors, latencies of the ok ones (us).
pub type Second = (u64, u64, Vec<u64>);

/// What the clients recorded.
pub struct Recorder {
    pub ops: Mutex<Vec<Op>>,
    /// Per second of the run.
    pub seconds: Mutex<BTreeMap<u64, Second>>,
    /// Bank scans whose total was not the opening total.
    pub bank_violations: Mutex<Vec<String>>,
    /// The bank's total.
    pub total: u64,
}

/// The balance a bank value carries (`BALANCE@WRITER`).
pub fn balance(value: &str) -> Option<u64> {
    value.split('@').next()?.parse().ok()
}

/// Reads every key of the layout linearizably (retried for 30 s): what each holds, absent keys left out.
pub async fn read_all(
    client: &Client,
    layout: &Layout,
) -> anyhow::Result<BTreeMap<String, String>> {
    let range = KeyRange::Prefix(format!("{}/", layout.prefix).into_bytes());
    let deadline = Instant::now() + Duration::from_secs(30);
    let page = loop {
        let scan = ScanOptions {
            limit: 10_000,
            ..ScanOptions::default()
        };
        match client
            .scan_range(&range, &scan, &CallOptions::default())
            .await
        {
            Ok(p) => break p,
            Err(_) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(e) => bail!("cannot read the keys under {}/: {e}", layout.prefix),
        }
    };
    let wanted: std::collections::HashSet<&String> = layout.all().collect();
    Ok(page
        .kvs
        .into_iter()
        .map(|(k, v)| {
            (
                String::from_utf8_lossy(&k).into_owned(),
                String::from_utf8_lossy(&v).into_owned(),
            )
        })
        .filter(|(k, _)| wanted.contains(k))
        .collect())
}

/// Opens the bank (every account at the opening balance, in one transaction that only runs when no
/// account exists) unless it is open; returns its total.
pub async fn open_bank(client: &Client, layout: &Layout) -> anyhow::Result<u64> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let now = read_all(client, layout).await?;
        let held: Vec<u64> = layout
            .accounts
            .iter()
            .filter_map(|a| now.get(a))
            .filter_map(|v| balance(v))
            .collect();
        if held.len() == layout.accounts.len() {
            return Ok(held.iter().sum());
        }
        if !held.is_empty() {
            bail!(
                "the bank under {} is half open ({} of {} accounts): use a fresh --prefix",
                layout.bank_prefix(),
                held.len(),
                layout.accounts.len()
            );
        }
        if Instant::now() >= deadline {
            bail!("cannot open the bank under {}", layout.bank_prefix());
        }
        let absent = layout.accounts.iter().map(|a| Compare {
            result: compare::CompareResult::Equal as i32,
            target: compare::CompareTarget::Version as i32,
            key: a.clone().into_bytes(),
            target_union: Some(compare::TargetUnion::Version(0)),
            range_end: Vec::new(),
        });
        let puts = layout
            .accounts
            .iter()
            .map(|a| put_op(a, &format!("{OPENING_BALANCE}@open")));
        // Any outcome: the next round reads what happened.
        let _ = client
            .txn(
                absent.collect(),
                puts.collect(),
                Vec::new(),
                &CallOptions::default(),
            )
            .await;
    }
}

fn put_op(key: &str, value: &str) -> TxnOp {
    TxnOp {
        op: Some(txn_op::Op::Put(txn_op::Put {
            key: key.as_bytes().to_vec(),
            value: value.as_bytes().to_vec(),
            prev_kv: false,
            lease: 0,
        })),
    }
}

fn delete_op(key: &str) -> TxnOp {
    TxnOp {
        op: Some(txn_op::Op::DeleteRange(txn_op::DeleteRange {
            key: key.as_bytes().to_vec(),
            range_end: Vec::new(),
            prev_kv: false,
        })),
    }
}

fn read_op(key: &str) -> TxnOp {
    TxnOp {
        op: Some(txn_op::Op::Range(txn_op::Range {
            key: key.as_bytes().to_vec(),
            ..txn_op::Range::default()
        })),
    }
}

/// A compare that `key` holds `value` (`None`: that it is absent).
fn holds(key: &str, value: Option<&String>) -> Compare {
    let (target, union) = match value {
        Some(v) => (
            compare::CompareTarget::Value,
            compare::TargetUnion::Value(v.clone().into_bytes()),
        ),
        None => (
            compare::CompareTarget::Version,
            compare::TargetUnion::Version(0),
        ),
    };
    Compare {
        result: compare::CompareResult::Equal as i32,
        target: target as i32,
        key: key.as_bytes().to_vec(),
        target_union: Some(union),
        range_end: Vec::new(),
    }
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// An operation's outcome: completed, certainly did nothing (left out), or unknown.
enum Outcome {
    Ok(Action),
    Failed,
    Unknown(Action),
}

/// A write's error: certainly nothing (INVALID_ARGUMENT) or unknown.
fn write_error(e: &Error, action: Action) -> Outcome {
    if matches!(e, Error::InvalidArgument(_)) {
        Outcome::Failed
    } else {
        Outcome::Unknown(action)
    }
}

/// One client: operations on random objects until `until`.
pub async fn client_loop(
    client: Arc<Client>,
    id: usize,
    layout: Layout,
    (started, until): (Instant, Instant),
    rec: Arc<Recorder>,
    seed: u64,
) {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed.wrapping_mul(31).wrapping_add(id as u64));
    let mut w = Worker {
        client,
        id,
        layout,
        opts: CallOptions {
            timeout: Some(Duration::from_secs(2)),
            ..CallOptions::default()
        },
        last_seen: BTreeMap::new(),
        seq: 0,
    };
    let ns = |t: Instant| u64::try_from(t.duration_since(started).as_nanos()).unwrap_or(u64::MAX);
    while Instant::now() < until {
        let invoked = Instant::now();
        let choice = rng.random_range(0..20);
        let (object, outcome) = if choice < 12 {
            w.register(&mut rng).await
        } else if choice < 16 {
            (w.layout.group_prefix(), w.group(&mut rng).await)
        } else {
            (w.layout.bank_prefix(), w.bank(&mut rng, &rec).await)
        };
        let completed = Instant::now();
        let ok = matches!(outcome, Outcome::Ok(_));
        {
            let mut secs = rec
                .seconds
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            let e = secs
                .entry(invoked.duration_since(started).as_secs())
                .or_default();
            if ok {
                e.0 += 1;
                e.2.push(
                    u64::try_from(completed.duration_since(invoked).as_micros())
                        .unwrap_or(u64::MAX),
                );
            } else {
                e.1 += 1;
            }
        }
        let (action, done) = match outcome {
            Outcome::Ok(a) => (a, Some(ns(completed))),
            Outcome::Unknown(a) => (a, None),
            Outcome::Failed => {
                // Give a failing cluster a moment rather than spinning.
                tokio::time::sleep(Duration::from_millis(20)).await;
                continue;
            }
        };
        rec.ops
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .push(Op {
                client: id,
                object,
                action,
                invoked: ns(invoked),
                completed: done,
            });
        if done.is_none() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

struct Worker {
    client: Arc<Client>,
    id: usize,
    layout: Layout,
    opts: CallOptions,
    /// The last value this client saw per key (what its compares expect).
    last_seen: BTreeMap<String, Option<String>>,
    seq: u64,
}

impl Worker {
    /// A value no other write uses.
    fn fresh(&mut self) -> String {
        self.seq += 1;
        format!("c{}-{}", self.id, self.seq)
    }

    async fn register(&mut self, rng: &mut rand::rngs::StdRng) -> (String, Outcome) {
        let key = self.layout.registers[rng.random_range(0..self.layout.registers.len())].clone();
        let value = self.fresh();
        let choice = rng.random_range(0..10);
        let outcome = if choice < 4 {
            match self.client.get(key.as_bytes(), &self.opts).await {
                Ok(v) => {
                    let value = v.map(|b| text(&b));
                    self.last_seen.insert(key.clone(), value.clone());
                    Outcome::Ok(Action::Get {
                        key: key.clone(),
                        value,
                    })
                }
                Err(_) => Outcome::Failed,
            }
        } else if choice < 7 {
            let action = Action::Put {
                key: key.clone(),
                value: value.clone(),
            };
            match self
                .client
                .put(key.as_bytes(), value.as_bytes(), &self.opts)
                .await
            {
                Ok(_) => Outcome::Ok(action),
                Err(e) => write_error(&e, action),
            }
        } else {
            let expected = self.last_seen.get(&key).cloned().flatten();
            let r = self
                .client
                .compare_and_swap(
                    key.as_bytes(),
                    expected.as_deref().map(str::as_bytes),
                    value.as_bytes(),
                    &self.opts,
                )
                .await;
            let mut action = Action::Cas {
                key: key.clone(),
                expected,
                new: value.clone(),
                succeeded: false,
                previous: None,
            };
            match r {
                Ok(o) => {
                    let previous = o.previous.map(|b| text(&b));
                    self.last_seen.insert(
                        key.clone(),
                        if o.succeeded {
                            Some(value)
                        } else {
                            previous.clone()
                        },
                    );
                    if let Action::Cas {
                        succeeded,
                        previous: p,
                        ..
                    } = &mut action
                    {
                        *succeeded = o.succeeded;
                        *p = previous;
                    }
                    Outcome::Ok(action)
                }
                Err(e) => write_error(&e, action),
            }
        };
        (key, outcome)
    }

    /// A transaction, a range delete, a scan or a put on the group.
    async fn group(&mut self, rng: &mut rand::rngs::StdRng) -> Outcome {
        let keys = self.layout.group.clone();
        let pick = |rng: &mut rand::rngs::StdRng| rng.random_range(0..keys.len());
        match rng.random_range(0..10) {
            0..5 => {
                // Compare one key with what this client last saw; write two keys; read the compared one.
                let c = keys[pick(rng)].clone();
                let expected = self.last_seen.get(&c).cloned().flatten();
                let a = pick(rng);
                let b = (a + 1 + rng.random_range(0..keys.len() - 1)) % keys.len();
                let mut writes = vec![(keys[a].clone(), Some(self.fresh()))];
                writes.push((
                    keys[b].clone(),
                    if rng.random_range(0..3) == 0 {
                        None
                    } else {
                        Some(self.fresh())
                    },
                ));
                let mut ops: Vec<TxnOp> = writes
                    .iter()
                    .map(|(k, v)| v.as_ref().map_or_else(|| delete_op(k), |v| put_op(k, v)))
                    .collect();
                ops.push(read_op(&c));
                let r = self
                    .client
                    .txn(
                        vec![holds(&c, expected.as_ref())],
                        ops,
                        vec![read_op(&c)],
                        &self.opts,
                    )
                    .await;
                let mut action = Action::Txn {
                    compare: vec![(c.clone(), expected)],
                    writes,
                    succeeded: false,
                    reads: Vec::new(),
                };
                match r {
                    Ok(t) => {
                        let read = t.responses.last().and_then(|r| match &r.response {
                            Some(txn_op_response::Response::Range(r)) => {
                                Some(r.kvs.first().map(|kv| text(&kv.value)))
                            }
                            _ => None,
                        });
                        let Some(read) = read else {
                            // An answer without its read: what it did is not known.
                            return Outcome::Unknown(action);
                        };
                        self.last_seen.insert(c.clone(), read.clone());
                        if let Action::Txn {
                            succeeded, reads, ..
                        } = &mut action
                        {
                            *succeeded = t.succeeded;
                            *reads = vec![(c, read)];
                        }
                        Outcome::Ok(action)
                    }
                    Err(e) => write_error(&e, action),
                }
            }
            5..7 => {
                let (i, j) = (pick(rng), pick(rng));
                let (from, to) = (i.min(j), i.max(j) + 1);
                let range = KeyRange::Between {
                    start: keys[from].clone().into_bytes(),
                    end: if to < keys.len() {
                        keys[to].clone().into_bytes()
                    } else {
                        kiwi_proto::keys::prefix_end(self.layout.group_prefix().as_bytes())
                    },
                };
                let mut action = Action::DeleteRange {
                    keys: keys[from..to].to_vec(),
                    deleted: 0,
                };
                match self.client.delete_range(&range, false, &self.opts).await {
                    Ok(d) => {
                        if let Action::DeleteRange { deleted, .. } = &mut action {
                            *deleted = d.deleted;
                        }
                        Outcome::Ok(action)
                    }
                    Err(e) => write_error(&e, action),
                }
            }
            7..9 => match self.scan(&self.layout.group_prefix()).await {
                Some(values) => Outcome::Ok(Action::Scan { values }),
                None => Outcome::Failed,
            },
            _ => {
                let key = keys[pick(rng)].clone();
                let value = self.fresh();
                let action = Action::Put {
                    key: key.clone(),
                    value: value.clone(),
                };
                match self
                    .client
                    .put(key.as_bytes(), value.as_bytes(), &self.opts)
                    .await
                {
                    Ok(_) => Outcome::Ok(action),
                    Err(e) => write_error(&e, action),
                }
            }
        }
    }

    /// Every pair under `prefix`, in one linearizable scan (`None`: it failed; remembered as seen).
    async fn scan(&mut self, prefix: &str) -> Option<Vec<(String, String)>> {
        let page = self
            .client
            .scan_range(
                &KeyRange::Prefix(prefix.as_bytes().to_vec()),
                &ScanOptions::default(),
                &self.opts,
            )
            .await
            .ok()?;
        let values: Vec<(String, String)> =
            page.kvs.iter().map(|(k, v)| (text(k), text(v))).collect();
        for k in self.layout.all().filter(|k| k.starts_with(prefix)) {
            let v = values
                .iter()
                .find(|(key, _)| key == k)
                .map(|(_, v)| v.clone());
            self.last_seen.insert(k.clone(), v);
        }
        Some(values)
    }

    /// A transfer between two accounts, or a reader's sum of every balance.
    async fn bank(&mut self, rng: &mut rand::rngs::StdRng, rec: &Recorder) -> Outcome {
        let accounts = self.layout.accounts.clone();
        if rng.random_range(0..3) == 0 {
            let Some(values) = self.scan(&self.layout.bank_prefix()).await else {
                return Outcome::Failed;
            };
            let sum: u64 = values.iter().filter_map(|(_, v)| balance(v)).sum();
            if sum != rec.total || values.len() != accounts.len() {
                rec.bank_violations
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .push(format!(
                        "client {} read the balances {values:?}: {sum} in {} accounts, not {} in {}",
                        self.id,
                        values.len(),
                        rec.total,
                        accounts.len()
                    ));
            }
            return Outcome::Ok(Action::Scan { values });
        }
        // Read both accounts (each read is checked too), then move money if neither changed since.
        let a = rng.random_range(0..accounts.len());
        let b = (a + 1 + rng.random_range(0..accounts.len() - 1)) % accounts.len();
        let mut read = Vec::new();
        for k in [&accounts[a], &accounts[b]] {
            match self.client.get_kv(k.as_bytes(), 0, &self.opts).await {
                Ok(Some(kv)) => read.push((text(&kv.value), kv.mod_revision)),
                _ => return Outcome::Failed,
            }
        }
        let (Some(from), Some(to)) = (balance(&read[0].0), balance(&read[1].0)) else {
            return Outcome::Failed;
        };
        let amount = rng.random_range(0..=from.min(20));
        let tag = self.fresh();
        let writes = vec![
            (
                accounts[a].clone(),
                Some(format!("{}@{tag}a", from - amount)),
            ),
            (accounts[b].clone(), Some(format!("{}@{tag}b", to + amount))),
        ];
        let compares = [(&accounts[a], read[0].1), (&accounts[b], read[1].1)]
            .into_iter()
            .map(|(k, rev)| Compare {
                result: compare::CompareResult::Equal as i32,
                target: compare::CompareTarget::Mod as i32,
                key: k.as_bytes().to_vec(),
                target_union: Some(compare::TargetUnion::ModRevision(rev)),
                range_end: Vec::new(),
            })
            .collect();
        let ops = writes
            .iter()
            .map(|(k, v)| put_op(k, v.as_deref().unwrap_or_default()))
            .collect();
        let r = self.client.txn(compares, ops, Vec::new(), &self.opts).await;
        // Values are unique per write, so "mod_revision is the one read" is "the value is the one read".
        let mut action = Action::Txn {
            compare: vec![
                (accounts[a].clone(), Some(read[0].0.clone())),
                (accounts[b].clone(), Some(read[1].0.clone())),
            ],
            writes,
            succeeded: false,
            reads: Vec::new(),
        };
        match r {
            Ok(t) => {
                if let Action::Txn { succeeded, .. } = &mut action {
                    *succeeded = t.succeeded;
                }
                Outcome::Ok(action)
            }
            Err(e) => write_error(&e, action),
        }
    }
}
