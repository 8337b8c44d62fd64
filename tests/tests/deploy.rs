//! The deployment examples in `docs/deploy` work as shipped: `systemd-analyze verify` finds nothing to
//! say about the units (with the binaries where the units expect them), and the three-machine example
//! configurations pass the node's and the control plane's own validation.

use std::path::{Path, PathBuf};
use std::process::Command;

use kiwi_tests::cluster::node_binary;
use kiwi_tests::control::control_binary;

fn deploy_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/deploy")
}

#[test]
fn systemd_units_verify_clean() {
    let dir = tempfile::tempdir().unwrap();
    let bin_dir = node_binary().parent().unwrap().to_path_buf();
    let mut units = Vec::new();
    for entry in std::fs::read_dir(deploy_dir().join("systemd")).unwrap() {
        let path = entry.unwrap().path();
        // The units name the installed binaries; verify checks that they exist, so point at the built ones.
        let text = std::fs::read_to_string(&path)
            .unwrap()
            .replace("/usr/local/bin/", &format!("{}/", bin_dir.display()));
        let copy = dir.path().join(path.file_name().unwrap());
        std::fs::write(&copy, text).unwrap();
        units.push(copy);
    }
    assert!(units.len() >= 4, "{units:?}");
    let out = Command::new("systemd-analyze")
        .args(["verify", "--man=no"])
        .args(&units)
        .output()
        .expect("systemd-analyze (make deps installs systemd)");
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && said.trim().is_empty(),
        "systemd-analyze verify: {out:?}"
    );
}

#[test]
fn example_configurations_are_valid() {
    let config = deploy_dir().join("config");
    for (bin, file) in [
        (node_binary(), "node-1.toml"),
        (control_binary(), "control.toml"),
    ] {
        let out = Command::new(&bin)
            .arg("--config")
            .arg(config.join(file))
            .arg("--print-config")
            .output()
            .unwrap();
        assert!(out.status.success(), "{file}: {out:?}");
    }
}
