//! `kiwi chaos`: runs a fault plan through the control plane while concurrent clients issue puts,
//! linearizable gets and compare-and-swaps on a few keys, transactions, range deletes and scans on a group
//! of keys, and bank transfers ([`workload`]), then checks the recorded history for linearizability
//! (`kiwi_client::linearizability`; a transaction is one operation on several keys), checks that every scan of the bank
//! found the opening total, and prints and saves a timeline.
//!
//! Every operation is recorded with its invocation and completion times and its outcome: ok, failed
//! (certainly did nothing: `INVALID_ARGUMENT`; failed reads tell nothing either) or unknown (a write that may
//! or may not have happened: every other error of a write, including a deadline). Values are unique per
//! write, so a read names the write it saw.
//!
//! A plan (TOML) is a run length and steps at offsets:
//!
//! ```toml
//! duration = "20s"
//! [[steps]]
//! at = "3s"
//! fault = "partition"   # delay | partition | loss | crash | stall
//! nodes = ["leader"]    # node ids as strings, "leader" or "follower" (resolved when the step runs)
//! for = "5s"            # how long (not for crash)
//! # delay = "100ms", jitter = "10ms" (delay, stall); rate = 0.3 (loss); peers = ["1"] (delay, loss)
//! ```
//!
//! Watchers (`--watchers`, default 2) follow the keys from the revision before the run, each dropping its
//! watch every few seconds and resuming from its last revision + 1 on a random node (through crashes and
//! partitions too). At the end each watcher's events must be exactly the committed writes to the keys: in
//! revision order, none twice, every acknowledged write there, nothing that no client wrote (nor a delete
//! nobody asked for), a transaction's writes at one revision and nothing else there, each key's last event
//! what a final linearizable read finds, and the same sequence for every watcher.
//!
//! Lockers (`--lockers`, default 2) take a lease-backed lock, increment a counter under it (the write
//! fenced by the lock) and let go, now and then abandoning a held lock as a crashed holder would
//! ([`lockers`]): no two critical sections may overlap, and the counter must count them.
//!
//! `kiwi control chaos run PLAN` runs only the plan. `kiwi chaos --random --seed N` makes a random plan.
//! Crashed nodes must be restarted by whatever runs them (`kiwi playground --restart-crashed`).

mod lockers;
mod workload;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Args;
use kiwi_client::{CallOptions, Client, ClientOptions};
use kiwi_proto::v1::fault_spec::Kind;
use kiwi_proto::v1::{
    ClusterStatusRequest, DiskStall, FaultSpec, MessageLoss, NetworkDelay, NetworkPartition,
    NodeCrash, ScheduleFaultRequest,
};
use rand::{Rng, SeedableRng};
use serde::Deserialize;
use serde_json::json;

use kiwi_client::linearizability::{self as checker, Action, Op, Verdict};

/// A fault plan.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Plan {
    #[serde(with = "humantime_serde_str")]
    pub duration: Duration,
    #[serde(default)]
    pub steps: Vec<Step>,
}

/// One step of a plan.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Step {
    #[serde(with = "humantime_serde_str")]
    pub at: Duration,
    pub fault: String,
    #[serde(default)]
    pub nodes: Vec<String>,
    #[serde(rename = "for", default, with = "humantime_serde_opt")]
    pub lasts: Option<Duration>,
    #[serde(default, with = "humantime_serde_opt")]
    pub delay: Option<Duration>,
    #[serde(default, with = "humantime_serde_opt")]
    pub jitter: Option<Duration>,
    pub rate: Option<f64>,
    #[serde(default)]
    pub peers: Vec<String>,
}

mod humantime_serde_str {
    use serde::Deserialize as _;
    pub fn deserialize<'de, D: serde::Deserializer<'de>>(
        d: D,
    ) -> Result<std::time::Duration, D::Error> {
        let s = String::deserialize(d)?;
        humantime::parse_duration(&s).map_err(serde::de::Error::custom)
    }
}

mod humantime_serde_opt {
    use serde::Deserialize as _;
    pub fn deserialize<'de, D: serde::Deserializer<'de>>(
        d: D,
    ) -> Result<Option<std::time::Duration>, D::Error> {
        let s = String::deserialize(d)?;
        humantime::parse_duration(&s)
            .map(Some)
            .map_err(serde::de::Error::custom)
    }
}

impl Plan {
    /// Reads and checks a plan file.
    ///
    /// # Errors
    /// The file cannot be read, is not a plan, or a step is malformed (named).
    pub fn from_file(path: &Path) -> anyhow::Result<Plan> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read the plan {}", path.display()))?;
        let plan: Plan = toml::from_str(&text)
            .with_context(|| format!("{} is not a fault plan", path.display()))?;
        for (i, s) in plan.steps.iter().enumerate() {
            s.spec_check()
                .with_context(|| format!("{}: step {}", path.display(), i + 1))?;
        }
        Ok(plan)
    }

    /// A random plan of `duration`: one to three faults at a time, each of any type, often on the leader.
    pub fn random(seed: u64, duration: Duration, nodes: u64) -> Plan {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let mut steps = Vec::new();
        let mut t = Duration::from_secs(1);
        let end = duration.saturating_sub(Duration::from_secs(3));
        while t < end {
            let lasts = Duration::from_millis(rng.random_range(1500..5000));
            let who = |rng: &mut rand::rngs::StdRng| -> String {
                match rng.random_range(0..3) {
                    0 | 1 => "leader".into(),
                    _ => rng.random_range(1..=nodes).to_string(),
                }
            };
            let fault = ["partition", "delay", "loss", "crash", "stall"][rng.random_range(0..5)];
            let step = Step {
                at: t,
                fault: fault.into(),
                nodes: vec![who(&mut rng)],
                lasts: (fault != "crash").then_some(lasts),
                delay: match fault {
                    "delay" => Some(Duration::from_millis(rng.random_range(20..200))),
                    "stall" => Some(Duration::from_millis(rng.random_range(10..100))),
                    _ => None,
                },
                jitter: (fault == "delay").then(|| Duration::from_millis(rng.random_range(0..50))),
                rate: (fault == "loss").then(|| rng.random_range(0.1..0.5)),
                peers: Vec::new(),
            };
            steps.push(step);
            t += Duration::from_millis(rng.random_range(1000..4000));
        }
        Plan { duration, steps }
    }
}

impl Step {
    fn spec_check(&self) -> anyhow::Result<()> {
        match self.fault.as_str() {
            "delay" if self.delay.is_none() => bail!("a delay needs `delay`"),
            "stall" if self.delay.is_none() => bail!("a stall needs `delay`"),
            "loss" if self.rate.is_none() => bail!("a loss needs `rate`"),
            "delay" | "stall" | "loss" | "partition" | "crash" => {}
            other => bail!("unknown fault {other:?}: delay, partition, loss, crash or stall"),
        }
        if self.fault != "crash" && self.lasts.is_none() {
            bail!("a {} needs `for` (its duration)", self.fault);
        }
        if self.nodes.is_empty() {
            bail!("`nodes` must name at least one node, \"leader\" or \"follower\"");
        }
        Ok(())
    }

    fn describe(&self) -> String {
        let mut s = format!("{} on {:?}", self.fault, self.nodes);
        if let Some(d) = self.delay {
            s += &format!(" delay {d:?}");
        }
        if let Some(r) = self.rate {
            s += &format!(" rate {r:.2}");
        }
        if let Some(l) = self.lasts {
            s += &format!(" for {l:?}");
        }
        s
    }
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// Resolves "leader", "follower" and ids against the control plane's view now.
async fn resolve(
    control: &mut kiwi_client::control::ControlClient,
    names: &[String],
    rng: &mut rand::rngs::StdRng,
) -> anyhow::Result<Vec<u64>> {
    let s = control
        .cluster_status(ClusterStatusRequest {})
        .await?
        .into_inner();
    let up: Vec<u64> = s.nodes.iter().filter(|n| n.up).map(|n| n.node_id).collect();
    let mut out = Vec::new();
    for n in names {
        let id = match n.as_str() {
            "leader" if s.leader_id != 0 => s.leader_id,
            "leader" | "follower" => {
                let others: Vec<u64> = up.iter().copied().filter(|&id| id != s.leader_id).collect();
                if others.is_empty() {
                    bail!("no node is up to pick for {n:?}");
                }
                others[rng.random_range(0..others.len())]
            }
            id => id
                .parse()
                .with_context(|| format!("{id:?} is not a node id, \"leader\" or \"follower\""))?,
        };
        out.push(id);
    }
    out.sort_unstable();
    out.dedup();
    Ok(out)
}

/// A fault window for the report: (start, end, what), in seconds since the run started.
type Window = (f64, f64, String);

/// Runs the plan's steps at their offsets from `started`. Returns the windows.
async fn run_plan(
    target: &kiwi_client::control::ControlTarget,
    plan: &Plan,
    started: Instant,
    seed: u64,
    quiet: bool,
) -> anyhow::Result<Vec<Window>> {
    let mut control = kiwi_client::control::connect(target).await?;
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed ^ 0x5eed);
    let mut windows = Vec::new();
    for step in &plan.steps {
        tokio::time::sleep_until((started + step.at).into()).await;
        let nodes = match resolve(&mut control, &step.nodes, &mut rng).await {
            Ok(n) => n,
            Err(e) => {
                eprintln!("chaos: step at {:?} skipped: {e:#}", step.at);
                continue;
            }
        };
        let peers = step.peers.iter().filter_map(|p| p.parse().ok()).collect();
        let (kind, targets) = match step.fault.as_str() {
            "delay" => (
                Kind::Delay(NetworkDelay {
                    delay_ms: millis(step.delay.unwrap_or_default()),
                    jitter_ms: millis(step.jitter.unwrap_or_default()),
                }),
                nodes.clone(),
            ),
            "partition" => (
                Kind::Partition(NetworkPartition {
                    isolated_nodes: nodes.clone(),
                }),
                Vec::new(),
            ),
            "loss" => (
                Kind::Loss(MessageLoss {
                    drop_rate: step.rate.unwrap_or(0.3),
                }),
                nodes.clone(),
            ),
            "crash" => (Kind::Crash(NodeCrash {}), nodes.clone()),
            _ => (
                Kind::DiskStall(DiskStall {
                    delay_ms: millis(step.delay.unwrap_or_default()),
                }),
                nodes.clone(),
            ),
        };
        let lasts = step.lasts.unwrap_or(Duration::from_secs(1));
        let r = control
            .schedule_fault(ScheduleFaultRequest {
                spec: Some(FaultSpec {
                    kind: Some(kind),
                    peers,
                }),
                targets,
                start_after_ms: 0,
                duration_ms: millis(lasts),
            })
            .await;
        let at = started.elapsed().as_secs_f64();
        match r {
            Ok(f) => {
                let what = format!("{} on {nodes:?}", step.fault);
                if !quiet {
                    eprintln!(
                        "chaos: {at:>6.1}s  fault {}: {}",
                        f.into_inner().id,
                        step.describe()
                    );
                }
                windows.push((at, at + lasts.as_secs_f64(), what));
            }
            Err(e) => eprintln!(
                "chaos: {at:>6.1}s  {} refused: {}",
                step.describe(),
                e.message()
            ),
        }
    }
    Ok(windows)
}

#[derive(Debug, Args)]
pub struct ChaosArgs {
    /// The fault plan (TOML): `duration = "20s"`, then `[[steps]]` with `at`, `fault` (delay, partition,
    /// loss, crash, stall), `nodes` (ids, "leader", "follower"), `for`, and `delay`/`jitter`/`rate`/`peers`
    /// as the fault needs; examples in control-plane/plans/, details in the README (Fault injection).
    #[arg(long, conflicts_with = "random")]
    plan: Option<PathBuf>,
    /// A random plan instead (mixing every fault type, the leader targeted often).
    #[arg(long)]
    random: bool,
    /// Seed of the random plan and of the workload.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Length of a random plan.
    #[arg(long, default_value = "20s", value_parser = humantime::parse_duration)]
    duration: Duration,
    /// The control plane that schedules the faults.
    #[arg(long, env = "KIWI_CONTROL", default_value = kiwi_client::control::DEFAULT_CONTROL)]
    control: String,
    /// Token of an admin principal, for a control plane with `[security] tokens_file`.
    #[arg(long, env = "KIWI_CONTROL_TOKEN", hide_env_values = true)]
    control_token: Option<String>,
    /// Concurrent clients.
    #[arg(long, default_value_t = 4)]
    clients: usize,
    /// Keys they share (few keys: many conflicts).
    #[arg(long, default_value_t = 5)]
    keys: usize,
    /// Where the history, timeline (JSON and SVG) and verdict go (default: a new directory under the
    /// system temp dir).
    #[arg(long)]
    out: Option<PathBuf>,
    /// A prefix for the keys (each run should use its own).
    #[arg(long, default_value = "chaos")]
    prefix: String,
    /// Watchers of the keys that disconnect and resume on random nodes; their events are checked
    /// against the writes (0: none).
    #[arg(long, default_value_t = 2)]
    watchers: usize,
    /// Lockers that loop "lock, read the counter, write it + 1 (fenced by the lock), unlock" with a
    /// lease-backed mutex (2 s TTL), now and then abandoning a held lock as a crashed holder would; no two
    /// critical sections may overlap (0: none).
    #[arg(long, default_value_t = 2)]
    lockers: usize,
    /// Less output.
    #[arg(long)]
    quiet: bool,
}

/// The outcome of one run, for the exit status.
pub enum ChaosVerdict {
    Linearizable,
    Violation,
    Unknown,
}

/// One second of the timeline: (second, ok, errors, p99 ms).
type Point = (u64, u64, u64, f64);

/// Puts `key` = `value` until it is known to be applied (an unknown outcome is read back); returns
/// the revision it was applied at.
async fn put_retried(client: &Client, key: &str, value: &str) -> anyhow::Result<u64> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match client
            .put(key.as_bytes(), value.as_bytes(), &CallOptions::default())
            .await
        {
            Ok(rev) => return Ok(rev),
            Err(e) if Instant::now() >= deadline => bail!("cannot write {key}: {e}"),
            Err(_) => {
                if let Ok(Some(kv)) = client
                    .get_kv(key.as_bytes(), 0, &CallOptions::default())
                    .await
                    && kv.value == value.as_bytes()
                {
                    return Ok(kv.mod_revision);
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
}

/// One watched change: (revision, key, value; `None` for a delete).
type Seen = (u64, String, Option<String>);

/// Follows `prefix` from revision `from` until the event of `end_key`, dropping the watch every 1-4 s and
/// resuming from the last revision + 1 with a random node first. Returns the events before the end.
async fn watch_loop(
    endpoints: Vec<String>,
    (token, tls): (Option<String>, Option<tonic::transport::ClientTlsConfig>),
    prefix: String,
    from: u64,
    end_key: String,
    seed: u64,
) -> anyhow::Result<Vec<Seen>> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut seen: Vec<Seen> = Vec::new();
    let mut next = from;
    loop {
        let mut order = endpoints.clone();
        let first = rng.random_range(0..order.len().max(1));
        order.rotate_left(first);
        let client = Client::connect(
            &order,
            ClientOptions {
                timeout: Duration::from_secs(2),
                token: token.clone(),
                tls: tls.clone(),
                ..ClientOptions::default()
            },
        )?;
        let range = kiwi_client::KeyRange::Prefix(prefix.clone().into_bytes());
        let mut watcher = client.watch(&range, next, false);
        let session = tokio::time::sleep(Duration::from_millis(rng.random_range(1000..4000)));
        tokio::pin!(session);
        loop {
            let update = tokio::select! {
                u = watcher.next() => u?,
                () = &mut session => break,
            };
            let kiwi_client::WatchUpdate::Events(events) = update else {
                bail!("the history the watcher needed (from revision {next}) was compacted");
            };
            for e in events {
                let kv = e.kv.unwrap_or_default();
                let key = String::from_utf8_lossy(&kv.key).into_owned();
                if key == end_key {
                    return Ok(seen);
                }
                next = kv.mod_revision + 1;
                let value = (e.r#type == kiwi_client::key_event::EventType::Put as i32)
                    .then(|| String::from_utf8_lossy(&kv.value).into_owned());
                seen.push((kv.mod_revision, key, value));
            }
        }
    }
}

/// Checks one watcher's events against the recorded operations and the final values (`finals`: every
/// key the clients write, `None` if absent at the end).
fn check_watch(
    events: &[Seen],
    ops: &[Op],
    finals: &BTreeMap<String, Option<String>>,
    end: u64,
) -> Result<(), String> {
    use std::collections::{HashMap, HashSet};
    if let Some(w) = events.windows(2).find(|w| w[0].0 > w[1].0) {
        return Err(format!(
            "revisions out of order: {:?} then {:?}",
            w[0], w[1]
        ));
    }
    let mut changed = HashSet::new();
    if let Some(e) = events.iter().find(|e| !changed.insert((e.0, &e.1))) {
        return Err(format!("a key changed twice at one revision: {e:?}"));
    }
    if let Some(e) = events.iter().find(|e| e.0 >= end) {
        return Err(format!(
            "an event at or after the end marker's revision {end}: {e:?}"
        ));
    }
    // Who wrote each (key, value), and whether that write is acknowledged; the keys any op may delete.
    let mut writer: HashMap<(&str, &str), (usize, bool)> = HashMap::new();
    let mut deletable: HashSet<&str> = HashSet::new();
    let mut acknowledged_deletes = 0u64;
    for (i, o) in ops.iter().enumerate() {
        let done = o.completed.is_some();
        match &o.action {
            Action::Put { key, value } => {
                writer.insert((key, value), (i, done));
            }
            Action::Cas {
                key,
                new,
                succeeded,
                ..
            } => {
                writer.insert((key, new), (i, done && *succeeded));
            }
            Action::Txn {
                writes, succeeded, ..
            } => {
                for (k, v) in writes {
                    match v {
                        Some(v) => {
                            writer.insert((k, v), (i, done && *succeeded));
                        }
                        None => {
                            deletable.insert(k);
                        }
                    }
                }
            }
            Action::DeleteRange { keys, deleted } => {
                deletable.extend(keys.iter().map(String::as_str));
                if done {
                    acknowledged_deletes += deleted;
                }
            }
            Action::Get { .. } | Action::Scan { .. } => {}
        }
    }
    // Each delivered write: its op and revision.
    let mut delivered: HashMap<(&str, &str), u64> = HashMap::new();
    let mut op_at: BTreeMap<u64, usize> = BTreeMap::new();
    let mut deletes = 0u64;
    for (rev, key, value) in events {
        let Some(value) = value else {
            if !deletable.contains(key.as_str()) {
                return Err(format!(
                    "a delete of {key} at revision {rev} that no client asked for"
                ));
            }
            deletes += 1;
            continue;
        };
        let Some(&(op, _)) = writer.get(&(key.as_str(), value.as_str())) else {
            return Err(format!(
                "an event no client wrote: {key} = {value} at revision {rev}"
            ));
        };
        if delivered.insert((key, value), *rev).is_some() {
            return Err(format!("a write delivered twice: {key} = {value}"));
        }
        if let Some(other) = op_at.insert(*rev, op)
            && other != op
        {
            return Err(format!(
                "two writes at revision {rev}: {:?} and {:?}",
                ops[other].action, ops[op].action
            ));
        }
    }
    if let Some(((k, v), _)) = writer
        .iter()
        .find(|(w, (_, acked))| *acked && !delivered.contains_key(*w))
    {
        return Err(format!(
            "an acknowledged write was never delivered: {k} = {v}"
        ));
    }
    if deletes < acknowledged_deletes {
        return Err(format!(
            "{deletes} delete events, but acknowledged range deletes removed {acknowledged_deletes} keys"
        ));
    }
    // A transaction's writes arrive together: all at one revision, or none.
    for (i, o) in ops.iter().enumerate() {
        let Action::Txn { writes, .. } = &o.action else {
            continue;
        };
        let revs: Vec<Option<u64>> = writes
            .iter()
            .filter_map(|(k, v)| v.as_ref().map(|v| delivered.get(&(k.as_str(), v.as_str()))))
            .map(|r| r.copied())
            .collect();
        if revs.windows(2).any(|w| w[0] != w[1]) {
            return Err(format!(
                "transaction {i}'s writes were delivered apart: {:?} at {revs:?}",
                o.action
            ));
        }
    }
    for (key, value) in finals {
        if let Some(last) = events.iter().rev().find(|e| &e.1 == key)
            && &last.2 != value
        {
            return Err(format!(
                "{key}'s last event is {:?}, a final read finds {value:?}",
                last.2
            ));
        }
    }
    Ok(())
}

/// The timeline picture: ops/s and errors/s on the left scale, p99 latency on the right one, the fault
/// windows shaded, their labels in as many rows as they need not to overlap.
fn svg(timeline: &[Point], windows: &[Window], seconds: f64) -> String {
    // Label rows: a label goes in the first row whose last label ends before it starts.
    let char_px = 6.5;
    let (w, pad_x) = (960.0, 56.0);
    let x = |s: f64| pad_x + s / seconds.max(1.0) * (w - 2.0 * pad_x);
    let mut row_ends: Vec<f64> = Vec::new();
    let rows: Vec<usize> = windows
        .iter()
        .map(|(a, _, what)| {
            let start = x(*a);
            let end = start + what.len() as f64 * char_px + 6.0;
            match row_ends.iter().position(|e| *e <= start) {
                Some(r) => {
                    row_ends[r] = end;
                    r
                }
                None => {
                    row_ends.push(end);
                    row_ends.len() - 1
                }
            }
        })
        .collect();
    let label_h = 13.0;
    let top = 24.0 + row_ends.len() as f64 * label_h;
    let plot_h = 240.0;
    let h = top + plot_h + 40.0;
    let max_ops = nice(timeline.iter().map(|t| t.1 + t.2).max().unwrap_or(1).max(1) as f64);
    let max_ms = nice(timeline.iter().map(|t| t.3).fold(0.0, f64::max).max(1.0));
    let y = |v: f64, max: f64| top + plot_h - v / max * plot_h;
    let mut out = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" font-family=\"sans-serif\" font-size=\"11\">\n\
         <rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n\
         <text x=\"{pad_x}\" y=\"14\">ops/s (green) and errors/s (red), left scale; p99 latency (blue, dashed), right scale; fault windows shaded</text>\n"
    );
    for ((a, b, what), row) in windows.iter().zip(&rows) {
        let label_y = 24.0 + (*row as f64 + 1.0) * label_h - 3.0;
        out += &format!(
            "<rect x=\"{:.1}\" y=\"{top}\" width=\"{:.1}\" height=\"{plot_h}\" fill=\"#f4a261\" fill-opacity=\"0.25\"><title>{what}</title></rect>\n\
             <line x1=\"{0:.1}\" y1=\"{label_y:.1}\" x2=\"{0:.1}\" y2=\"{top}\" stroke=\"#9c4a1a\" stroke-opacity=\"0.4\"/>\n\
             <text x=\"{:.1}\" y=\"{label_y:.1}\" fill=\"#9c4a1a\">{what}</text>\n",
            x(*a),
            (x(*b) - x(*a)).max(1.0),
            x(*a) + 2.0,
        );
    }
    // Scales: three ticks on each side, and the seconds along the bottom.
    for i in 0..=2 {
        let f = f64::from(i) / 2.0;
        let yy = y(f * max_ops, max_ops);
        out += &format!(
            "<line x1=\"{pad_x}\" y1=\"{yy:.1}\" x2=\"{:.1}\" y2=\"{yy:.1}\" stroke=\"#ddd\"/>\n\
             <text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"end\">{:.0}</text>\n\
             <text x=\"{:.1}\" y=\"{:.1}\" fill=\"#1d3557\">{:.0} ms</text>\n",
            w - pad_x,
            pad_x - 4.0,
            yy + 4.0,
            f * max_ops,
            w - pad_x + 4.0,
            yy + 4.0,
            f * max_ms
        );
    }
    let step = ((seconds / 10.0).ceil() as u64).max(1);
    for s in (0..=seconds as u64).step_by(step as usize) {
        out += &format!(
            "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\">{s} s</text>\n",
            x(s as f64),
            top + plot_h + 16.0
        );
    }
    let line = |pick: &dyn Fn(&Point) -> f64, max: f64, style: &str| {
        let pts: Vec<String> = timeline
            .iter()
            .map(|t| format!("{:.1},{:.1}", x(t.0 as f64 + 0.5), y(pick(t), max)))
            .collect();
        format!(
            "<polyline fill=\"none\" {style} points=\"{}\"/>\n",
            pts.join(" ")
        )
    };
    out += &line(
        &|t| t.1 as f64,
        max_ops,
        "stroke=\"#2a9d8f\" stroke-width=\"2\"",
    );
    out += &line(
        &|t| t.2 as f64,
        max_ops,
        "stroke=\"#e63946\" stroke-width=\"2\"",
    );
    out += &line(
        &|t| t.3,
        max_ms,
        "stroke=\"#1d3557\" stroke-width=\"1.5\" stroke-dasharray=\"4 3\"",
    );
    out += &format!(
        "<line x1=\"{pad_x}\" y1=\"{0:.1}\" x2=\"{1:.1}\" y2=\"{0:.1}\" stroke=\"black\"/>\n</svg>\n",
        top + plot_h,
        w - pad_x
    );
    out
}

/// `v` rounded up to 1, 2 or 5 times a power of ten (a scale's top).
fn nice(v: f64) -> f64 {
    let p = 10f64.powf(v.log10().floor());
    [1.0, 2.0, 5.0, 10.0]
        .into_iter()
        .map(|m| m * p)
        .find(|c| *c >= v)
        .unwrap_or(v)
}

/// Runs `kiwi chaos`.
///
/// # Errors
/// The plan or the cluster cannot be used; writing the results fails.
pub async fn run(
    args: ChaosArgs,
    endpoints: &[String],
    conn: &crate::Conn,
) -> anyhow::Result<ChaosVerdict> {
    let control_addr = args.control.clone();
    let target = kiwi_client::control::ControlTarget {
        addr: control_addr.clone(),
        token: args.control_token.clone(),
        tls: conn.tls.clone(),
    };
    let mut control = kiwi_client::control::connect(&target).await?;
    let status = control
        .cluster_status(ClusterStatusRequest {})
        .await?
        .into_inner();
    if status.nodes.is_empty() {
        bail!("no node is registered with the control plane at {control_addr}");
    }
    let plan = match (&args.plan, args.random) {
        (Some(p), _) => Plan::from_file(p)?,
        (None, true) => Plan::random(args.seed, args.duration, status.nodes.len() as u64),
        (None, false) => bail!("give --plan FILE or --random"),
    };
    let out = match &args.out {
        Some(d) => d.clone(),
        None => {
            std::env::temp_dir().join(format!("kiwi-chaos-{}-{}", args.seed, std::process::id()))
        }
    };
    std::fs::create_dir_all(&out).with_context(|| format!("cannot create {}", out.display()))?;
    let client = Arc::new(Client::connect(
        endpoints,
        ClientOptions {
            timeout: Duration::from_secs(2),
            token: conn.token.clone(),
            tls: conn.tls.clone(),
            ..ClientOptions::default()
        },
    )?);
    let layout = workload::Layout::new(&args.prefix, args.keys);
    // The bank opens before the run; then what every key holds (read linearizably, retried).
    let total = workload::open_bank(&client, &layout).await?;
    let initial = workload::read_all(&client, &layout).await?;
    if !args.quiet {
        eprintln!(
            "chaos: {} steps over {:?}, {} clients on {} registers, a group of {} keys and a bank of {} \
             accounts; results in {}",
            plan.steps.len(),
            plan.duration,
            args.clients,
            layout.registers.len(),
            layout.group.len(),
            layout.accounts.len(),
            out.display()
        );
    }
    let rec = Arc::new(workload::Recorder {
        ops: Mutex::new(Vec::new()),
        seconds: Mutex::new(BTreeMap::new()),
        bank_violations: Mutex::new(Vec::new()),
        total,
    });
    // Watchers start after a marker write: every write of the run comes after it.
    let marker = |name: &str| format!("{}/~{name}", args.prefix);
    let from = put_retried(&client, &marker("start"), "start").await? + 1;
    let watchers: Vec<_> = (0..args.watchers)
        .map(|i| {
            tokio::spawn(watch_loop(
                endpoints.to_vec(),
                (conn.token.clone(), conn.tls.clone()),
                format!("{}/", args.prefix),
                from,
                marker("end"),
                args.seed.wrapping_mul(131).wrapping_add(i as u64),
            ))
        })
        .collect();
    let started = Instant::now();
    let until = started + plan.duration;
    let mut tasks = Vec::new();
    for id in 0..args.clients.max(1) {
        tasks.push(tokio::spawn(workload::client_loop(
            Arc::clone(&client),
            id,
            layout.clone(),
            (started, until),
            Arc::clone(&rec),
            args.seed,
        )));
    }
    let counter_key = lockers::counter_key(&args.prefix);
    let counter_before = lockers::counter(
        client
            .get(counter_key.as_bytes(), &CallOptions::default())
            .await?
            .as_deref(),
    );
    let lock_record = Arc::new(lockers::Record::default());
    for id in 0..args.lockers {
        tasks.push(tokio::spawn(lockers::locker_loop(
            Arc::clone(&client),
            id,
            args.prefix.clone(),
            until,
            Arc::clone(&lock_record),
            args.seed,
        )));
    }
    let windows = run_plan(&target, &plan, started, args.seed, args.quiet).await?;
    for t in tasks {
        t.await?;
    }
    let end = put_retried(&client, &marker("end"), "end").await?;
    let elapsed = started.elapsed().as_secs_f64();
    let ops = std::mem::take(
        &mut *rec
            .ops
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner),
    );
    let unknown = ops.iter().filter(|o| o.completed.is_none()).count();

    // The verdict, object by object.
    let mut by_object: BTreeMap<String, Vec<Op>> = BTreeMap::new();
    for o in &ops {
        by_object
            .entry(o.object.clone())
            .or_default()
            .push(o.clone());
    }
    let mut verdict = ChaosVerdict::Linearizable;
    let mut report = Vec::new();
    let at_end = workload::read_all(&client, &layout).await?;
    let finals: BTreeMap<String, Option<String>> = layout
        .all()
        .map(|k| (k.clone(), at_end.get(k).cloned()))
        .collect();
    let mut bank_violations = std::mem::take(
        &mut *rec
            .bank_violations
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner),
    );
    let final_total: u64 = layout
        .accounts
        .iter()
        .filter_map(|a| at_end.get(a).and_then(|v| workload::balance(v)))
        .sum();
    if final_total != total {
        bank_violations.push(format!(
            "the final balances sum to {final_total}, not {total}"
        ));
    }
    for why in &bank_violations {
        verdict = ChaosVerdict::Violation;
        eprintln!("chaos: bank: the total changed: {why}");
    }
    let sections = std::mem::take(
        &mut *lock_record
            .sections
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner),
    );
    let counter_after = lockers::counter(
        client
            .get(counter_key.as_bytes(), &CallOptions::default())
            .await?
            .as_deref(),
    );
    let abandoned = *lock_record
        .abandoned
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    if let Err(why) = lockers::check(&sections, counter_before, counter_after) {
        verdict = ChaosVerdict::Violation;
        eprintln!("chaos: lock: mutual exclusion broken: {why}");
    }
    let mut sequences = Vec::new();
    for (i, w) in watchers.into_iter().enumerate() {
        let events = tokio::time::timeout(Duration::from_secs(60), w)
            .await
            .map_err(|_| {
                anyhow::anyhow!("watcher {i} did not reach the end marker within 60 s")
            })???;
        if let Err(why) = check_watch(&events, &ops, &finals, end) {
            verdict = ChaosVerdict::Violation;
            eprintln!("chaos: watcher {i}: {why}");
        }
        sequences.push(events);
    }
    if sequences.windows(2).any(|w| w[0] != w[1]) {
        verdict = ChaosVerdict::Violation;
        eprintln!("chaos: the watchers saw different sequences of events");
    }
    for (object, mut history) in by_object {
        history.sort_by_key(|o| o.invoked);
        let start: checker::State = initial
            .iter()
            .filter(|(k, _)| layout.object_of(k) == object)
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        let v = checker::check(&history, &start, 2_000_000);
        match &v {
            Verdict::Linearizable => {}
            Verdict::Unknown => {
                if matches!(verdict, ChaosVerdict::Linearizable) {
                    verdict = ChaosVerdict::Unknown;
                }
                eprintln!("chaos: {object}: the search budget ran out (verdict unknown)");
            }
            Verdict::Violation { placed, stuck } => {
                verdict = ChaosVerdict::Violation;
                eprintln!(
                    "chaos: {object}: NOT linearizable: {placed} completed operations could be ordered, \
                     then none fits; the operations around the first that cannot be placed:"
                );
                for o in checker::window(&history, *stuck) {
                    eprintln!(
                        "    client {} {:?} invoked {:.3}s completed {}",
                        o.client,
                        o.action,
                        o.invoked as f64 / 1e9,
                        o.completed
                            .map_or("unknown".into(), |c| format!("{:.3}s", c as f64 / 1e9))
                    );
                }
            }
        }
        report.push(
            json!({"object": object, "operations": history.len(), "verdict": format!("{v:?}")}),
        );
    }

    // The timeline: ops/s, errors/s and p99 per second, with the fault windows.
    let seconds = std::mem::take(
        &mut *rec
            .seconds
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner),
    );
    // Every second of the run, those in which nothing completed included (they are the unavailability).
    let mut seconds = seconds;
    let timeline: Vec<Point> = (0..elapsed.ceil() as u64)
        .map(|s| {
            let (ok, err, mut lat) = seconds.remove(&s).unwrap_or_default();
            lat.sort_unstable();
            let p99 = lat
                .get((lat.len() * 99 / 100).min(lat.len().saturating_sub(1)))
                .copied()
                .unwrap_or(0);
            (s, ok, err, p99 as f64 / 1000.0)
        })
        .collect();
    let longest_gap = {
        let mut gap = 0u64;
        let mut run = 0u64;
        for s in 0..elapsed.ceil() as u64 {
            let ok = timeline.iter().find(|t| t.0 == s).map_or(0, |t| t.1);
            run = if ok == 0 { run + 1 } else { 0 };
            gap = gap.max(run);
        }
        gap
    };
    let committed_txns = ops
        .iter()
        .filter(|o| {
            o.completed.is_some()
                && matches!(
                    o.action,
                    Action::Txn {
                        succeeded: true,
                        ..
                    }
                )
        })
        .count();
    let range_deletes = ops
        .iter()
        .filter(|o| matches!(o.action, Action::DeleteRange { .. }))
        .count();
    let name = match verdict {
        ChaosVerdict::Linearizable => "linearizable",
        ChaosVerdict::Violation => "NOT linearizable",
        ChaosVerdict::Unknown => "unknown (search budget exceeded)",
    };
    let summary = json!({
        "verdict": name, "seed": args.seed, "operations": ops.len(), "unknown_outcomes": unknown,
        "seconds": elapsed, "faults": windows.iter().map(|w| json!({"start_s": w.0, "end_s": w.1, "fault": w.2})).collect::<Vec<_>>(),
        "longest_unavailability_s": longest_gap, "objects": report,
        "transactions_committed": committed_txns, "range_deletes": range_deletes,
        "bank_total": total, "bank_violations": bank_violations,
        "lock_sections": sections.len(), "locks_abandoned": abandoned, "counter": counter_after,
        "watchers": sequences.len(), "watched_events": sequences.first().map_or(0, Vec::len),
        "timeline": timeline.iter().map(|t| json!({"t_s": t.0, "ok": t.1, "errors": t.2, "p99_ms": t.3})).collect::<Vec<_>>(),
    });
    std::fs::write(out.join("history.json"), serde_json::to_string(&ops)?)?;
    std::fs::write(
        out.join("timeline.json"),
        serde_json::to_string_pretty(&summary)?,
    )?;
    std::fs::write(out.join("timeline.svg"), svg(&timeline, &windows, elapsed))?;
    if !args.quiet {
        println!(
            "{:>5} {:>7} {:>7} {:>8}  faults",
            "sec", "ok/s", "err/s", "p99 ms"
        );
        for t in &timeline {
            let active: Vec<&str> = windows
                .iter()
                .filter(|w| w.0 <= t.0 as f64 + 1.0 && w.1 >= t.0 as f64)
                .map(|w| w.2.as_str())
                .collect();
            println!(
                "{:>5} {:>7} {:>7} {:>8.1}  {}",
                t.0,
                t.1,
                t.2,
                t.3,
                active.join(", ")
            );
        }
    }
    println!(
        "verdict: {name}; {} operations ({unknown} with unknown outcome) over {elapsed:.1} s, {} faults, \
         longest second-granular unavailability {longest_gap} s; history and timeline in {}",
        ops.len(),
        windows.len(),
        out.display()
    );
    println!(
        "{}",
        json!({"chaos": summary["verdict"], "seed": args.seed, "operations": ops.len(),
                          "unknown_outcomes": unknown, "faults": windows.len(),
                          "longest_unavailability_s": longest_gap, "out": out.display().to_string(),
                          "watchers": summary["watchers"], "watched_events": summary["watched_events"],
                          "transactions_committed": committed_txns, "range_deletes": range_deletes,
                          "lock_sections": sections.len(), "locks_abandoned": abandoned})
    );
    Ok(verdict)
}

/// `kiwi control chaos run PLAN`: only the plan, no workload.
///
/// # Errors
/// The plan cannot be read or the control plane reached.
pub async fn run_plan_only(
    target: &kiwi_client::control::ControlTarget,
    path: &Path,
) -> anyhow::Result<()> {
    let plan = Plan::from_file(path)?;
    let windows = run_plan(target, &plan, Instant::now(), 1, false).await?;
    tokio::time::sleep(plan.duration.saturating_sub(Duration::ZERO)).await;
    println!("{} faults scheduled", windows.len());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_timeline_picture_keeps_labels_apart_and_has_scales() {
        let timeline: Vec<Point> = (0..20u64)
            .map(|s| (s, if s == 7 { 0 } else { 900 }, u64::from(s == 7), 3.0))
            .collect();
        let windows = vec![
            (5.0, 9.0, "partition node 1".to_string()),
            (6.0, 8.0, "delay 50ms node 2".to_string()),
            (15.0, 16.0, "crash node 3".to_string()),
        ];
        let pic = svg(&timeline, &windows, 20.0);
        let label_y = |what: &str| {
            let at = pic.find(&format!(">{what}</text>")).unwrap();
            let tag = &pic[pic[..at].rfind("<text").unwrap()..at];
            tag.split("y=\"")
                .nth(1)
                .unwrap()
                .split('"')
                .next()
                .unwrap()
                .to_string()
        };
        // The two overlapping windows' labels are on different rows; the far one reuses the first.
        assert_ne!(label_y("partition node 1"), label_y("delay 50ms node 2"));
        assert_eq!(label_y("partition node 1"), label_y("crash node 3"));
        assert!(
            pic.contains(">1000</text>") && pic.contains("5 ms</text>"),
            "{pic}"
        );
        assert!(pic.contains("stroke-dasharray"), "a latency curve");
        assert_eq!((nice(900.0), nice(3.0), nice(1.0)), (1000.0, 5.0, 1.0));
    }

    fn op(action: Action, done: bool) -> Op {
        Op {
            client: 0,
            object: "a".into(),
            action,
            invoked: 0,
            completed: done.then_some(1),
        }
    }

    fn put(key: &str, value: &str, done: bool) -> Op {
        op(
            Action::Put {
                key: key.into(),
                value: value.into(),
            },
            done,
        )
    }

    fn seen(v: &[(u64, &str, Option<&str>)]) -> Vec<Seen> {
        v.iter()
            .map(|(r, k, val)| (*r, (*k).to_string(), val.map(str::to_string)))
            .collect()
    }

    #[test]
    fn a_watcher_must_see_exactly_the_committed_writes() {
        // a=1 and a=2 acknowledged; a=3 unknown (it may or may not be seen).
        let ops = [
            put("a", "1", true),
            put("a", "2", true),
            put("a", "3", false),
        ];
        let finals = BTreeMap::from([("a".to_string(), Some("2".to_string()))]);
        let check = |v: &[(u64, &str)]| {
            let v: Vec<_> = v.iter().map(|(r, val)| (*r, "a", Some(*val))).collect();
            check_watch(&seen(&v), &ops, &finals, 10)
        };
        assert_eq!(check(&[(5, "1"), (7, "2")]), Ok(()));
        let err = |v: &[(u64, &str)]| check(v).unwrap_err();
        assert!(err(&[(5, "1")]).contains("never delivered"));
        assert!(err(&[(5, "1"), (6, "1"), (7, "2")]).contains("twice"));
        assert!(err(&[(5, "1"), (7, "2"), (8, "1")]).contains("twice"));
        assert!(err(&[(7, "2"), (5, "1")]).contains("out of order"));
        assert!(err(&[(5, "1"), (6, "9"), (7, "2")]).contains("no client wrote"));
        assert!(err(&[(5, "1"), (7, "2"), (12, "3")]).contains("end marker"));
        assert!(err(&[(5, "2"), (7, "1")]).contains("final read"));
    }

    #[test]
    fn a_watcher_sees_transactions_whole_and_deletes_asked_for() {
        let txn = |writes: &[(&str, Option<&str>)], ok: bool, done: bool| {
            op(
                Action::Txn {
                    compare: Vec::new(),
                    writes: writes
                        .iter()
                        .map(|(k, v)| ((*k).to_string(), v.map(str::to_string)))
                        .collect(),
                    succeeded: ok,
                    reads: Vec::new(),
                },
                done,
            )
        };
        let ops = [
            txn(&[("a", Some("1")), ("b", Some("2"))], true, true),
            txn(&[("a", Some("3")), ("b", None)], true, false),
            op(
                Action::DeleteRange {
                    keys: vec!["c".into()],
                    deleted: 1,
                },
                true,
            ),
        ];
        let finals = BTreeMap::from([
            ("a".to_string(), Some("3".to_string())),
            ("b".to_string(), None),
            ("c".to_string(), None),
        ]);
        let check = |v: &[(u64, &str, Option<&str>)]| check_watch(&seen(v), &ops, &finals, 20);
        let good = [
            (5, "a", Some("1")),
            (5, "b", Some("2")),
            (6, "c", None),
            (7, "a", Some("3")),
            (7, "b", None),
        ];
        assert_eq!(check(&good), Ok(()));
        let err = |v: &[(u64, &str, Option<&str>)]| check(v).unwrap_err();
        // One transaction's writes at two revisions, or two writes at one revision.
        assert!(err(&[(5, "a", Some("1")), (6, "b", Some("2")), (6, "c", None)]).contains("apart"));
        assert!(
            err(&[
                (5, "b", Some("2")),
                (5, "a", Some("3")),
                (6, "a", Some("1"))
            ])
            .contains("two writes")
        );
        // A delete nobody asked for; the acknowledged range delete missing.
        assert!(
            err(&[(5, "a", Some("1")), (5, "b", Some("2")), (6, "d", None)])
                .contains("no client asked")
        );
        assert!(
            err(&[(5, "a", Some("1")), (5, "b", Some("2"))]).contains("acknowledged range deletes")
        );
        // The same key twice at one revision.
        assert!(
            err(&[
                (5, "a", Some("1")),
                (5, "b", Some("2")),
                (6, "c", None),
                (6, "c", None)
            ])
            .contains("twice at one revision")
        );
        // The last event of b is a put, but the final read finds it absent.
        assert!(
            err(&[(5, "a", Some("1")), (5, "b", Some("2")), (6, "c", None)]).contains("final read")
        );
    }

    #[test]
    fn the_example_plans_parse() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../control-plane/plans");
        let mut n = 0;
        for e in std::fs::read_dir(&dir).unwrap() {
            let p = e.unwrap().path();
            let plan = Plan::from_file(&p).unwrap_or_else(|e| panic!("{}: {e:#}", p.display()));
            assert!(!plan.steps.is_empty(), "{}", p.display());
            n += 1;
        }
        assert!(n >= 4);
    }

    #[test]
    fn bad_plans_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("p.toml");
        std::fs::write(
            &p,
            "duration = \"10s\"\n[[steps]]\nat = \"1s\"\nfault = \"flood\"\nnodes = [\"1\"]\n",
        )
        .unwrap();
        let e = format!("{:#}", Plan::from_file(&p).unwrap_err());
        assert!(e.contains("flood") && e.contains("step 1"), "{e}");
        std::fs::write(&p, "duration = \"10s\"\n[[steps]]\nat = \"1s\"\nfault = \"delay\"\nnodes = [\"1\"]\nfor = \"1s\"\n").unwrap();
        let e = format!("{:#}", Plan::from_file(&p).unwrap_err());
        assert!(e.contains("delay"), "{e}");
        std::fs::write(&p, "duration = \"10s\"\nstep = []\n").unwrap();
        assert!(Plan::from_file(&p).is_err(), "unknown key");
    }

    #[test]
    fn random_plans_mix_faults_and_fit_their_duration() {
        let plan = Plan::random(7, Duration::from_secs(30), 3);
        assert!(plan.steps.len() >= 4);
        for s in &plan.steps {
            s.spec_check().unwrap();
            assert!(s.at + s.lasts.unwrap_or_default() <= Duration::from_secs(33));
        }
        let kinds: std::collections::BTreeSet<&str> = (0..20)
            .flat_map(|seed| Plan::random(seed, Duration::from_secs(20), 3).steps)
            .map(|s| match s.fault.as_str() {
                "delay" => "delay",
                "partition" => "partition",
                "loss" => "loss",
                "crash" => "crash",
                _ => "stall",
            })
            .collect();
        assert_eq!(kinds.len(), 5, "every type appears: {kinds:?}");
    }
}
