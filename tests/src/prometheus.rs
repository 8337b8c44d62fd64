//! A real Prometheus server (Debian's `prometheus`, installed by `make deps`) on loopback, for the tests
//! that check what a scraper sees: it scrapes the given jobs with a bearer token, and tests query it
//! through its HTTP API.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// One scrape job: a metrics path on a set of targets.
#[derive(Debug, Clone)]
pub struct Job {
    pub name: String,
    pub path: String,
    pub targets: Vec<SocketAddr>,
}

use crate::ports::free_addr;

/// Percent-encodes a query parameter.
pub fn urlencode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// A real Prometheus server on loopback, killed on drop.
pub struct Prometheus {
    child: Child,
    addr: SocketAddr,
    _dir: tempfile::TempDir,
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn prometheus_binary() -> PathBuf {
    let found = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|p| p.join("prometheus"))
            .find(|p| p.is_file())
    });
    found
        .expect("the prometheus binary is not on PATH: run `make deps` (Debian package prometheus)")
}

impl Prometheus {
    /// Starts Prometheus scraping every job at 1 s with the bearer token in `token`.
    ///
    /// # Panics
    /// When the binary is missing or cannot start.
    pub fn start(jobs: &[Job], token: &Path) -> Prometheus {
        let dir = tempfile::tempdir().unwrap();
        let mut config = String::from(
            "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n  evaluation_interval: 1s\nscrape_configs:\n",
        );
        for job in jobs {
            let list = job
                .targets
                .iter()
                .map(|a| format!("'{a}'"))
                .collect::<Vec<_>>()
                .join(", ");
            config.push_str(&format!(
                "  - job_name: {}\n    metrics_path: {}\n    authorization:\n      \
                 type: Bearer\n      credentials_file: {}\n    static_configs:\n      - targets: [{list}]\n",
                job.name,
                job.path,
                token.display()
            ));
        }
        std::fs::write(dir.path().join("prometheus.yml"), config).unwrap();
        let addr = free_addr();
        let log = std::fs::File::create(dir.path().join("prometheus.log")).unwrap();
        let child = Command::new(prometheus_binary())
            .arg(format!(
                "--config.file={}",
                dir.path().join("prometheus.yml").display()
            ))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address={addr}"))
            .arg("--log.level=warn")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("start prometheus");
        Prometheus {
            child,
            addr,
            _dir: dir,
        }
    }

    /// Prometheus' own log.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self._dir.path().join("prometheus.log")).unwrap_or_default()
    }

    /// `GET /api/v1/<path>`, as JSON; `None` while the server is not answering yet.
    pub async fn api(&self, path: &str) -> Option<serde_json::Value> {
        let connect = tokio::net::TcpStream::connect(self.addr).await;
        if connect.is_err() {
            return None;
        }
        drop(connect);
        let a = crate::http::get(self.addr, &format!("/api/v1/{path}"), None).await;
        serde_json::from_str(&a.body).ok()
    }

    /// An instant query's result vector: (labels, value) pairs.
    pub async fn query(
        &self,
        promql: &str,
    ) -> Result<Vec<(BTreeMap<String, String>, f64)>, String> {
        let v = self
            .api(&format!("query?query={}", urlencode(promql)))
            .await
            .ok_or("no answer")?;
        if v["status"] != "success" {
            return Err(format!("{promql}: {v}"));
        }
        let rows = v["data"]["result"].as_array().cloned().unwrap_or_default();
        Ok(rows
            .iter()
            .map(|r| {
                let labels = r["metric"]
                    .as_object()
                    .map(|m| {
                        m.iter()
                            .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_owned()))
                            .collect()
                    })
                    .unwrap_or_default();
                let value = r["value"][1]
                    .as_str()
                    .and_then(|s| s.parse().ok())
                    .unwrap_or(f64::NAN);
                (labels, value)
            })
            .collect())
    }

    /// Polls `promql` until `ok` holds for its result.
    pub async fn wait_for(
        &self,
        what: &str,
        promql: &str,
        ok: impl Fn(&[(BTreeMap<String, String>, f64)]) -> bool,
    ) -> Vec<(BTreeMap<String, String>, f64)> {
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut last = Err("not queried".to_string());
        while Instant::now() < deadline {
            last = self.query(promql).await;
            if let Ok(rows) = &last
                && ok(rows)
            {
                return rows.clone();
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        panic!(
            "{what}: `{promql}` never held within 60 s; last answer {last:?}\nprometheus log:\n{}",
            self.log()
        );
    }
}
