//! `kiwi-control`'s configuration: one TOML file, typed, unknown keys refused, every problem named.
//! `config/kiwi-control.example.toml` lists every key with its default.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Default gRPC address.
pub const DEFAULT_LISTEN_ADDR: &str = "127.0.0.1:7390";
/// Default data directory.
pub const DEFAULT_DATA_DIR: &str = "kiwi-control-data";

/// The control plane's configuration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ControlConfig {
    /// gRPC address: `NodeLink` for nodes, `ControlService` for operators, health and reflection.
    pub listen_addr: SocketAddr,
    /// Where the event log and the cluster's identity are kept (RocksDB).
    pub data_dir: PathBuf,
    /// The metrics endpoint and history.
    pub metrics: MetricsConfig,
    /// Authentication.
    pub security: SecurityConfig,
    /// Logging.
    pub log: LogConfig,
    /// What the control plane keeps, and for how long.
    pub retention: RetentionConfig,
    /// What a connection may hold.
    pub connections: ConnectionsConfig,
}

/// `[connections]`
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ConnectionsConfig {
    /// A connection with no call in progress for this many seconds is closed (a node's link stream
    /// counts as a call, HTTP/2 pings do not); clients reconnect on their next call. 0: never.
    pub idle_timeout_sec: u64,
}

impl Default for ConnectionsConfig {
    fn default() -> Self {
        ConnectionsConfig {
            idle_timeout_sec: 600,
        }
    }
}

impl ConnectionsConfig {
    /// The idle time, `None` for never.
    pub fn idle(&self) -> Option<Duration> {
        (self.idle_timeout_sec > 0).then(|| Duration::from_secs(self.idle_timeout_sec))
    }
}

/// `[retention]`: bounds on what the control plane keeps, so that its store and memory do not grow
/// without end.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RetentionConfig {
    /// Events kept in the event log (the oldest go first).
    pub events: u64,
    /// Finished fault schedules (done or cancelled) kept (the oldest go first).
    pub finished_faults: u64,
    /// A node down this long is forgotten (it registers again when it comes back), in seconds.
    pub departed_node_sec: u64,
}

impl Default for RetentionConfig {
    fn default() -> Self {
        RetentionConfig {
            events: 100_000,
            finished_faults: 1_000,
            departed_node_sec: 86_400,
        }
    }
}

impl RetentionConfig {
    /// How long a down node is kept.
    pub fn departed_node(&self) -> Duration {
        Duration::from_secs(self.departed_node_sec)
    }
}

/// `[security]`, shared with the node.
pub use kiwi_proto::security::SecurityConfig;

/// `[metrics]`
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MetricsConfig {
    /// HTTP address of `/metrics`, every node's figures with a `node` label (unset: not served). Any
    /// address other than loopback needs `token_file`.
    pub addr: Option<SocketAddr>,
    /// File holding the bearer token `/metrics` requires (unset: none, allowed on loopback only).
    pub token_file: Option<PathBuf>,
    /// Requests per second per client IP on `/metrics`; more get 429.
    pub rate_limit_per_sec: u32,
    /// How long every node's heartbeat history is kept (`kiwi control history`), in seconds.
    pub retention_sec: u64,
}

/// Default `metrics.rate_limit_per_sec` (the node's default too).
pub const DEFAULT_METRICS_RATE_LIMIT: u32 = 10;
/// Default `metrics.retention_sec`.
pub const DEFAULT_RETENTION_SEC: u64 = 300;
/// Largest `metrics.retention_sec` (a day).
pub const MAX_RETENTION_SEC: u64 = 86_400;

impl Default for MetricsConfig {
    fn default() -> Self {
        MetricsConfig {
            addr: None,
            token_file: None,
            rate_limit_per_sec: DEFAULT_METRICS_RATE_LIMIT,
            retention_sec: DEFAULT_RETENTION_SEC,
        }
    }
}

impl MetricsConfig {
    /// The history retention.
    pub fn retention(&self) -> Duration {
        Duration::from_secs(self.retention_sec)
    }
}

/// `[log]`
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LogConfig {
    /// A `tracing` filter such as `info`; `RUST_LOG` overrides it.
    pub level: String,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            level: "info".into(),
        }
    }
}

impl Default for ControlConfig {
    fn default() -> Self {
        ControlConfig {
            listen_addr: DEFAULT_LISTEN_ADDR.parse().expect("valid default address"),
            data_dir: PathBuf::from(DEFAULT_DATA_DIR),
            metrics: MetricsConfig::default(),
            security: SecurityConfig::default(),
            log: LogConfig::default(),
            retention: RetentionConfig::default(),
            connections: ConnectionsConfig::default(),
        }
    }
}

/// A configuration problem.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("invalid configuration: {0}")]
    Invalid(String),
}

impl ControlConfig {
    /// Reads and validates a TOML file.
    ///
    /// # Errors
    /// [`ConfigError`] naming the file and the key.
    pub fn from_file(path: &Path) -> Result<ControlConfig, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let config: ControlConfig = toml::from_str(&text).map_err(|e| ConfigError::Parse {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
        config.validate()?;
        Ok(config)
    }

    /// Checks what types cannot.
    ///
    /// # Errors
    /// [`ConfigError::Invalid`] naming the field.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.data_dir.as_os_str().is_empty() {
            return Err(ConfigError::Invalid("data_dir: must not be empty".into()));
        }
        if let Some((field, message)) = self.security.problems(self.listen_addr).into_iter().next()
        {
            return Err(ConfigError::Invalid(format!("{field}: {message}")));
        }
        let m = &self.metrics;
        if m.addr.is_some_and(|a| !a.ip().is_loopback())
            && m.token_file.is_none()
            && self.security.tokens_file.is_none()
        {
            return Err(ConfigError::Invalid(format!(
                "metrics.token_file: must be set when metrics.addr is not a loopback address ({}): \
                 the per-node figures would be open to anyone who can reach it",
                m.addr.map(|a| a.to_string()).unwrap_or_default()
            )));
        }
        if !(1..=100_000).contains(&m.rate_limit_per_sec) {
            return Err(ConfigError::Invalid(format!(
                "metrics.rate_limit_per_sec: must be 1 to 100000, got {}",
                m.rate_limit_per_sec
            )));
        }
        if !(1..=MAX_RETENTION_SEC).contains(&m.retention_sec) {
            return Err(ConfigError::Invalid(format!(
                "metrics.retention_sec: must be 1 to {MAX_RETENTION_SEC}, got {}",
                m.retention_sec
            )));
        }
        let r = &self.retention;
        for (field, value, range) in [
            ("retention.events", r.events, 100..=100_000_000),
            (
                "retention.finished_faults",
                r.finished_faults,
                1..=1_000_000,
            ),
            (
                "retention.departed_node_sec",
                r.departed_node_sec,
                60..=31_536_000,
            ),
        ] {
            if !range.contains(&value) {
                return Err(ConfigError::Invalid(format!(
                    "{field}: must be {} to {}, got {value}",
                    range.start(),
                    range.end()
                )));
            }
        }
        if let Err(e) = tracing_subscriber::EnvFilter::try_new(&self.log.level) {
            return Err(ConfigError::Invalid(format!(
                "log.level: {:?} is not a log filter such as \"info\": {e}",
                self.log.level
            )));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_example_file_is_the_defaults() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/kiwi-control.example.toml");
        assert_eq!(
            ControlConfig::from_file(&path).unwrap(),
            ControlConfig::default()
        );
    }

    #[test]
    fn unknown_keys_and_bad_values_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("c.toml");
        std::fs::write(&p, "listen_adr = \"127.0.0.1:1\"\n").unwrap();
        let e = ControlConfig::from_file(&p).unwrap_err().to_string();
        assert!(e.contains("listen_adr"), "{e}");
        std::fs::write(&p, "[log]\nlevel = \"=?!\"\n").unwrap();
        let e = ControlConfig::from_file(&p).unwrap_err().to_string();
        assert!(e.contains("log.level"), "{e}");
        std::fs::write(&p, "[metrics]\naddr = \"0.0.0.0:7391\"\n").unwrap();
        let e = ControlConfig::from_file(&p).unwrap_err().to_string();
        assert!(e.contains("metrics.token_file"), "{e}");
        std::fs::write(&p, "[metrics]\nretention_sec = 0\n").unwrap();
        let e = ControlConfig::from_file(&p).unwrap_err().to_string();
        assert!(e.contains("metrics.retention_sec"), "{e}");
        std::fs::write(&p, "[metrics]\nrate_limit_per_sec = 0\n").unwrap();
        let e = ControlConfig::from_file(&p).unwrap_err().to_string();
        assert!(e.contains("metrics.rate_limit_per_sec"), "{e}");
    }
}
