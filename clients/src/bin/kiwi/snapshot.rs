//! `kiwi snapshot save | status | restore`: backups of a cluster's keyspace (the file format is
//! `kiwi_proto::backup`).

use std::io::Write as _;
use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::Subcommand;
use indicatif::{ProgressBar, ProgressStyle};
use kiwi_client::Client;
use kiwi_proto::backup::{self, Summary};
use serde_json::json;

use crate::Outcome;

#[derive(Debug, Subcommand)]
pub enum SnapshotCommand {
    /// Save a point-in-time copy of the whole keyspace (every key with its revisions and lease, and the
    /// leases) to FILE, from the first endpoint that answers, while writes go on. The file is written
    /// to FILE.part, synced, renamed, and read back to check it. Example:
    ///
    ///   kiwi snapshot save backup.kiwi --consistent
    Save {
        file: PathBuf,
        /// Copy a state holding every write acknowledged before the command started (the node asks the
        /// leader for its commit index first); without it a follower's copy may be a little behind.
        #[arg(long)]
        consistent: bool,
    },
    /// Check FILE (format, every frame, the SHA-256 trailer) and print what it holds: keys, bytes,
    /// revision, leases, the cluster it came from. Exit status 1 when it is damaged or truncated.
    Status { file: PathBuf },
    /// Restore FILE into a new member's empty data directory: runs `kiwi-node --restore FILE` with the
    /// member's settings, from its config file (`--config`) or from flags (`--data-dir`, `--node-id`,
    /// `--peers`, as `etcdctl snapshot restore` takes them). Run it for every member of the new cluster
    /// with the same members, then start the nodes; they form a new cluster (a new cluster id) holding
    /// the backup's keys at its revision. A damaged or truncated file is refused and nothing is
    /// written. Examples:
    ///
    ///   kiwi snapshot restore backup.kiwi --config node-1.toml
    ///
    ///   kiwi snapshot restore backup.kiwi --data-dir /var/lib/kiwi --node-id 1 \
    ///       --peers 1=10.0.0.1:7380,2=10.0.0.2:7380,3=10.0.0.3:7380
    Restore {
        file: PathBuf,
        /// The node's config file (data_dir, storage.backend, raft.node_id, raft.peers); the flags
        /// below override it. Without it, --data-dir, --node-id and --peers are needed.
        #[arg(long, value_name = "FILE", required_unless_present_all = ["data_dir", "node_id", "peers"])]
        config: Option<PathBuf>,
        /// The new member's data directory (empty or absent); overrides the config's `data_dir`.
        #[arg(long, value_name = "DIR")]
        data_dir: Option<PathBuf>,
        /// The new member's Raft id; overrides the config's `raft.node_id`.
        #[arg(long, value_name = "ID")]
        node_id: Option<u64>,
        /// Every member of the new cluster as ID=ADDR[@RAFT_ADDR], separated by commas (ADDR: the
        /// member's gRPC address); overrides the config's `raft.peers`.
        #[arg(long, value_name = "MEMBERS")]
        peers: Option<String>,
        /// The storage backend to restore into (rocksdb or leveldb); overrides `storage.backend`.
        #[arg(long, value_name = "BACKEND")]
        backend: Option<String>,
        /// The kiwi-node binary (default: next to this kiwi binary, else on PATH).
        #[arg(long, value_name = "PATH")]
        node_bin: Option<PathBuf>,
    },
}

pub async fn run(
    command: SnapshotCommand,
    client: impl FnOnce() -> Result<Client, kiwi_client::Error>,
    json: bool,
) -> anyhow::Result<Outcome> {
    match command {
        SnapshotCommand::Save { file, consistent } => {
            save(&client()?, &file, consistent, json).await
        }
        SnapshotCommand::Status { file } => {
            let summary = check(&file)?;
            print_summary(&file, &summary, json);
            Ok(Outcome::Ok)
        }
        SnapshotCommand::Restore {
            file,
            config,
            data_dir,
            node_id,
            peers,
            backend,
            node_bin,
        } => {
            let bin = kiwi_client::playground::sibling_binary(node_bin, "kiwi-node");
            let mut cmd = std::process::Command::new(&bin);
            cmd.arg("--restore").arg(&file);
            if let Some(c) = config {
                cmd.arg("--config").arg(c);
            }
            if let Some(d) = data_dir {
                cmd.arg("--data-dir").arg(d);
            }
            if let Some(id) = node_id {
                cmd.arg("--node-id").arg(id.to_string());
            }
            if let Some(p) = peers {
                cmd.arg("--peers").arg(p);
            }
            if let Some(b) = backend {
                cmd.arg("--backend").arg(b);
            }
            let status = cmd
                .status()
                .with_context(|| format!("cannot run {}", bin.display()))?;
            Ok(match status.code() {
                Some(0) => Outcome::Ok,
                _ => Outcome::Exit(1),
            })
        }
    }
}

async fn save(
    client: &Client,
    file: &Path,
    consistent: bool,
    json: bool,
) -> anyhow::Result<Outcome> {
    let (addr, mut stream) = client.backup(consistent).await?;
    let part = {
        let mut p = file.as_os_str().to_owned();
        p.push(".part");
        PathBuf::from(p)
    };
    let mut out = std::io::BufWriter::new(
        std::fs::File::create(&part)
            .with_context(|| format!("cannot create {}", part.display()))?,
    );
    let bar = progress(&format!("saving from {addr}"));
    let mut written = 0u64;
    loop {
        let piece = match stream.message().await {
            Ok(Some(p)) => p,
            Ok(None) => break,
            Err(s) => {
                bar.abandon();
                drop(out);
                let _ = std::fs::remove_file(&part);
                anyhow::bail!(
                    "the backup from {addr} broke off after {written} bytes: {}",
                    s.message()
                );
            }
        };
        out.write_all(&piece.data)
            .with_context(|| format!("cannot write {}", part.display()))?;
        written += piece.data.len() as u64;
        bar.set_position(written);
    }
    bar.finish_and_clear();
    let f = out
        .into_inner()
        .map_err(|e| anyhow::anyhow!("cannot write {}: {}", part.display(), e.error()))?;
    f.sync_all()
        .with_context(|| format!("cannot sync {}", part.display()))?;
    drop(f);
    let summary = match check(&part) {
        Ok(s) => s,
        Err(e) => {
            let _ = std::fs::remove_file(&part);
            return Err(e.context(format!("the backup {addr} sent does not check out")));
        }
    };
    std::fs::rename(&part, file)
        .with_context(|| format!("cannot rename {} to {}", part.display(), file.display()))?;
    if let Some(dir) = file.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::File::open(dir).and_then(|d| d.sync_all()).ok();
    }
    if json {
        print_summary(file, &summary, true);
    } else {
        println!(
            "Snapshot saved at {} from {addr}: {} keys, {} bytes, revision {}, sha256 {}",
            file.display(),
            summary.keys,
            written,
            summary.header.index,
            summary.sha256
        );
    }
    Ok(Outcome::Ok)
}

/// Reads and checks a whole backup file, showing progress on a terminal.
fn check(file: &Path) -> anyhow::Result<Summary> {
    let f = std::fs::File::open(file).with_context(|| format!("cannot open {}", file.display()))?;
    let bar = progress("checking");
    let summary = backup::verify(std::io::BufReader::new(f), |keys| bar.set_position(keys))
        .with_context(|| format!("{} is not a usable backup", file.display()));
    bar.finish_and_clear();
    summary
}

fn progress(what: &str) -> ProgressBar {
    if !std::io::IsTerminal::is_terminal(&std::io::stderr()) {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new_spinner();
    bar.set_style(
        ProgressStyle::with_template("{spinner} {msg} {pos} ({elapsed})")
            .unwrap_or_else(|_| ProgressStyle::default_spinner()),
    );
    bar.set_message(what.to_string());
    bar.enable_steady_tick(std::time::Duration::from_millis(200));
    bar
}

fn print_summary(file: &Path, s: &Summary, json: bool) {
    let h = &s.header;
    let created = std::time::UNIX_EPOCH
        + std::time::Duration::from_millis(u64::try_from(h.created_unix_ms).unwrap_or(0));
    let created = humantime::format_rfc3339_seconds(created).to_string();
    if json {
        println!(
            "{}",
            json!({
                "file": file.display().to_string(),
                "ok": true,
                "format_version": backup::FORMAT_VERSION,
                "keys": s.keys,
                "bytes": s.bytes,
                "revision": h.index,
                "raft_index": h.index,
                "raft_term": h.term,
                "compact_revision": h.compact_revision,
                "leases": h.leases.len(),
                "cluster_id": format!("{:016x}", h.cluster_id),
                "node_id": h.node_id,
                "members": h.members.iter().map(|m| json!({"id": m.id, "addr": m.addr})).collect::<Vec<_>>(),
                "created": created,
                "sha256": s.sha256,
            })
        );
        return;
    }
    println!("file:        {}", file.display());
    println!("checksum:    ok (sha256 {})", s.sha256);
    println!(
        "keys:        {} ({} bytes of keys and values)",
        s.keys, s.bytes
    );
    println!(
        "revision:    {} (Raft index {}, term {})",
        h.index, h.index, h.term
    );
    println!("leases:      {}", h.leases.len());
    println!(
        "taken from:  node {} of cluster {:016x} ({} members) at {created}",
        h.node_id,
        h.cluster_id,
        h.members.len()
    );
}
