//! The example config and `kiwi-node --config-check`, run as a real process.

use std::path::PathBuf;
use std::process::Command;

use kiwi_node::NodeConfig;

fn example_path() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("config/kiwi-node.example.toml")
}

fn kiwi_node() -> Command {
    Command::new(env!("CARGO_BIN_EXE_kiwi-node"))
}

#[test]
fn example_config_is_the_defaults() {
    let config = NodeConfig::from_file(&example_path()).unwrap();
    config.validate().unwrap();
    assert_eq!(
        config,
        NodeConfig::default(),
        "the example must document the defaults"
    );
}

/// Every key the config knows appears in the example, so the example is complete documentation.
#[test]
fn example_config_lists_every_key() {
    fn keys(prefix: &str, t: &toml::Table, out: &mut Vec<String>) {
        for (k, v) in t {
            let path = format!("{prefix}{k}");
            match v {
                toml::Value::Table(inner) => keys(&format!("{path}."), inner, out),
                _ => out.push(path),
            }
        }
    }
    let mut all = Vec::new();
    keys(
        "",
        &toml::Table::try_from(NodeConfig::default()).unwrap(),
        &mut all,
    );
    let example: toml::Table = std::fs::read_to_string(example_path())
        .unwrap()
        .parse()
        .unwrap();
    let mut documented = Vec::new();
    keys("", &example, &mut documented);
    all.sort();
    documented.sort();
    assert_eq!(documented, all);
}

#[test]
fn config_check_accepts_the_example() {
    let out = kiwi_node()
        .arg("--config")
        .arg(example_path())
        .arg("--config-check")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("configuration is valid"));
}

fn check_file(contents: &str) -> (bool, String) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("node.toml");
    std::fs::write(&path, contents).unwrap();
    let out = kiwi_node()
        .arg("--config")
        .arg(&path)
        .arg("--config-check")
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn config_check_rejects_an_unknown_key_by_name() {
    let (ok, stderr) = check_file("[runtime.scaling]\nmax_threads = 8\n");
    assert!(!ok);
    assert!(stderr.contains("max_threads"), "{stderr}");
}

#[test]
fn config_check_rejects_broken_relations_by_field() {
    let (ok, stderr) = check_file(
        "[runtime.scaling]\nmin_storage_threads = 8\nmax_storage_threads = 4\n[runtime.priority]\nlow_priority_weight = 0\n",
    );
    assert!(!ok);
    assert!(stderr.contains("runtime.scaling.min_storage_threads: must not exceed runtime.scaling.max_storage_threads (4), got 8"), "{stderr}");
    assert!(
        stderr.contains("runtime.priority.low_priority_weight"),
        "{stderr}"
    );
}

#[test]
fn config_check_runs_every_check_the_start_runs() {
    // Each of these used to pass --config-check and then abort, freeze or fail the node at start.
    for (text, field) in [
        (
            "[runtime.scaling]\nmin_storage_threads = 4294967295\nmax_storage_threads = 4294967295\n",
            "runtime.scaling.max_storage_threads",
        ),
        (
            "[raft]\ntick_interval_ms = 18446744073709551615\n",
            "raft.tick_interval_ms",
        ),
        ("[log]\nlevel = \"kiwi_node=loud\"\n", "log.level"),
        (
            "[runtime.scaling]\nevaluation_interval_ms = 4294967295\n",
            "runtime.scaling.evaluation_interval_ms",
        ),
        ("[[raft.peers]]\nid = 1\naddr = \":\"\n", "raft.peers"),
        // A data directory the start could not create or write.
        ("data_dir = \"\"\n", "data_dir"),
        ("data_dir = \"/proc/kiwi-data\"\n", "data_dir"),
        ("data_dir = \"/etc/hostname/data\"\n", "data_dir"),
        // Security files the start could not read.
        (
            "[security]\ncert_file = \"/nonexistent/n.crt\"\nkey_file = \"/nonexistent/n.key\"\n",
            "security.cert_file",
        ),
    ] {
        let (ok, stderr) = check_file(text);
        assert!(!ok, "{text} passed the check");
        assert!(stderr.contains(field), "{text}: {stderr}");
    }
}

#[test]
fn config_check_rejects_malformed_toml() {
    let (ok, stderr) = check_file("[storage\nbackend = ");
    assert!(!ok);
    assert!(stderr.contains("invalid config file"), "{stderr}");
}

#[test]
fn flags_override_the_file() {
    let out = kiwi_node()
        .arg("--config")
        .arg(example_path())
        .args(["--node-id", "7", "--backend", "leveldb", "--print-config"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let printed = NodeConfig::from_toml(&String::from_utf8_lossy(&out.stdout)).unwrap();
    assert_eq!(printed.raft.node_id, 7);
    assert_eq!(printed.storage.backend, kiwi_storage::BackendKind::LevelDb);
}

#[test]
fn missing_config_file_is_a_clear_error() {
    let out = kiwi_node()
        .args(["--config", "/nonexistent/kiwi.toml", "--config-check"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("cannot read config file /nonexistent/kiwi.toml"),
        "{stderr}"
    );
}
