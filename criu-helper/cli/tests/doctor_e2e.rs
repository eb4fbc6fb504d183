//! `kybernate doctor` end to end against the test bed's private containerd (`test/setup.sh`).

mod common;

use std::path::Path;
use std::process::{Command, Output};

use common::{json, text, KYBERNATE};
use kybernate_testbed::{CgroupMode, Testbed};
use serde_json::Value;

/// The test bed's PATH without /usr/local/sbin, where its `criu` wrapper lives.
const PATH_WITHOUT_CRIU: &str = "/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// `kybernate --address ADDRESS --config CONFIG -o json doctor --containerd-config CC`, with `path` as PATH if given.
fn doctor(address: &Path, config: &Path, containerd_config: &Path, path: Option<&str>) -> (Output, Vec<Value>) {
    let mut cmd = Command::new(KYBERNATE);
    cmd.arg("--address")
        .arg(address)
        .arg("--config")
        .arg(config)
        .args(["-o", "json", "doctor", "--containerd-config"])
        .arg(containerd_config)
        .env_remove("CONTAINERD_ADDRESS")
        .env_remove("KYBERNATE_CONFIG");
    if let Some(path) = path {
        cmd.env("PATH", path);
    }
    let out = cmd.output().expect("running kybernate");
    eprintln!("kybernate doctor: {}\nstdout:\n{}stderr:\n{}", out.status, text(&out.stdout), text(&out.stderr));
    let checks = json(&out).as_array().expect("a JSON array").clone();
    for c in &checks {
        for key in ["check", "status", "detail", "fix"] {
            assert!(c.get(key).is_some(), "{key} missing in {c}");
        }
    }
    (out, checks)
}

fn check<'a>(checks: &'a [Value], name: &str) -> &'a Value {
    checks.iter().find(|c| c["check"] == name).unwrap_or_else(|| panic!("no check {name:?} in {checks:?}"))
}

#[test]
fn doctor_on_the_test_bed() {
    let tb = Testbed::start().expect("test bed (run test/setup.sh first)");
    let scratch = kybernate_testbed::scratch_dir().expect("scratch dir");
    let config = scratch.path().join("kybernate.toml");
    let store = scratch.path().join("checkpoints");
    std::fs::write(&config, format!("[checkpoint]\nroot = \"{}\"\n", store.display())).unwrap();
    let containerd_config = tb.dir().join("config.toml");

    // Everything is there: no check fails.
    let (out, checks) = doctor(tb.address(), &config, &containerd_config, None);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    for c in &checks {
        assert!(c["status"] == "ok" || c["status"] == "warn", "{c}");
        assert_eq!(c["fix"].is_null(), c["status"] == "ok", "{c}");
    }
    let containerd = check(&checks, "containerd");
    assert_eq!(containerd["status"], "ok");
    assert!(containerd["detail"].as_str().unwrap().starts_with("containerd "), "{containerd}");
    let criu = check(&checks, "criu");
    assert_eq!(criu["status"], "ok", "{criu}");
    assert!(criu["detail"].as_str().unwrap().contains("criu 4."), "{criu}");
    let root = check(&checks, "checkpoint root");
    assert!(root["detail"].as_str().unwrap().contains("created on first checkpoint"), "{root}");
    // The test bed does not register our runtime for CRI: a warning, not a failure.
    assert_eq!(check(&checks, "cri runtime")["status"], "warn");
    for gpu in ["gpu", "gpu driver", "criu cuda plugin", "cuda-checkpoint", "cuda driver api"] {
        assert_eq!(check(&checks, gpu)["status"], "ok");
    }

    // A config registering our runtime with runtime_type: ok.
    let registered = scratch.path().join("containerd.toml");
    let typed = "version = 2\n[plugins.\"io.containerd.grpc.v1.cri\".containerd.runtimes.kyb]\n  runtime_type = \"io.containerd.kybernate.v1\"\n";
    std::fs::write(&registered, typed).unwrap();
    let (_, checks) = doctor(tb.address(), &config, &registered, None);
    let cri = check(&checks, "cri runtime");
    assert_eq!(cri["status"], "ok", "{cri}");
    assert!(cri["detail"].as_str().unwrap().contains("kyb"), "{cri}");
    // Only by runtime_path: the test bed's containerd 1.6 ignores it (its CRI runs the stock runc shim).
    std::fs::write(
        &registered,
        "version = 2\n[plugins.\"io.containerd.grpc.v1.cri\".containerd.runtimes.kyb]\n  runtime_type = \"io.containerd.runc.v2\"\n  runtime_path = \"/usr/local/bin/containerd-shim-kybernate-v1\"\n",
    )
    .unwrap();
    let (_, checks) = doctor(tb.address(), &config, &registered, None);
    let cri = check(&checks, "cri runtime");
    assert_eq!(cri["status"], "warn", "{cri}");
    assert!(cri["detail"].as_str().unwrap().contains("ignores"), "{cri}");

    // No CRIU on PATH: the CRIU check fails, and says to install it.
    let (out, checks) = doctor(tb.address(), &config, &containerd_config, Some(PATH_WITHOUT_CRIU));
    assert_eq!(out.status.code(), Some(1));
    let criu = check(&checks, "criu");
    assert_eq!(criu["status"], "fail", "{criu}");
    assert!(criu["fix"].as_str().unwrap().contains("install CRIU"), "{criu}");
    assert_eq!(check(&checks, "containerd")["status"], "ok");

    // containerd not reachable.
    let (out, checks) = doctor(Path::new("/nonexistent.sock"), &config, &containerd_config, None);
    assert_eq!(out.status.code(), Some(1));
    let containerd = check(&checks, "containerd");
    assert_eq!(containerd["status"], "fail", "{containerd}");
    assert!(containerd["fix"].as_str().unwrap().contains("start containerd"), "{containerd}");
}

#[test]
fn doctor_table_form() {
    let scratch = kybernate_testbed::scratch_dir().expect("scratch dir");
    let config = scratch.path().join("kybernate.toml");
    std::fs::write(&config, format!("[checkpoint]\nroot = \"{}\"\n", scratch.path().join("cp").display())).unwrap();
    let out = Command::new(KYBERNATE)
        .args(["--address", "/nonexistent.sock", "--config"])
        .arg(&config)
        .args(["doctor", "--containerd-config", "/nonexistent.toml"])
        .env_remove("CONTAINERD_ADDRESS")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let table = text(&out.stdout);
    assert!(table.lines().any(|l| l.starts_with("fail  containerd")), "{table}");
    assert!(table.contains("fix: start containerd"), "{table}");
    assert!(table.lines().last().unwrap().ends_with("1 fail"), "{table}");
}

/// `kybernate -o json doctor` run by `cmd` (a plain command or one entering a test bed's mount
/// namespace), against test bed `tb`: its `cgroups` check.
fn cgroups_check(tb: &Testbed, mut cmd: Command) -> Value {
    let scratch = kybernate_testbed::scratch_dir().expect("scratch dir");
    let config = scratch.path().join("kybernate.toml");
    std::fs::write(&config, format!("[checkpoint]\nroot = \"{}\"\n", scratch.path().join("cp").display())).unwrap();
    cmd.arg("--address")
        .arg(tb.address())
        .arg("--config")
        .arg(&config)
        .args(["-o", "json", "doctor", "--containerd-config"])
        .arg(tb.dir().join("config.toml"))
        .env_remove("CONTAINERD_ADDRESS")
        .env_remove("KYBERNATE_CONFIG");
    let out = cmd.output().expect("running kybernate doctor");
    eprintln!("kybernate doctor: {}\nstdout:\n{}stderr:\n{}", out.status, text(&out.stdout), text(&out.stderr));
    let checks = json(&out).as_array().expect("a JSON array").clone();
    check(&checks, "cgroups").clone()
}

#[test]
fn doctor_reports_the_cgroup_mode_here_and_on_a_cgroup_v2_test_bed() {
    // This machine: what /sys/fs/cgroup is (hybrid here: v1 controllers, cgroup2 at unified/).
    let tb = Testbed::start().expect("test bed (run test/setup.sh first)");
    let host = cgroups_check(&tb, Command::new(KYBERNATE));
    let want = kybernate_checkpoint::verdict::cgroup_mode(Path::new("/sys/fs/cgroup"));
    assert_eq!(host["cgroup"]["mode"], serde_json::to_value(want).unwrap(), "{host}");
    assert!(host["status"] == "ok" || host["status"] == "warn", "{host}");
    let mode = host["cgroup"]["mode"].as_str().unwrap_or_default();
    assert!(host["detail"].as_str().unwrap().starts_with(&format!("cgroup {mode}")), "{host}");
    drop(tb);

    // Where a v2 test bed's containerd and shims run (cgroup2 at /sys/fs/cgroup): unified, and
    // a warning for each controller a feature needs that this hierarchy lacks.
    let tb = Testbed::builder().cgroup(CgroupMode::V2).start().expect("a cgroup v2 test bed");
    let v2 = cgroups_check(&tb, tb.command_in_namespace(KYBERNATE));
    assert_eq!(v2["cgroup"]["mode"], "v2", "{v2}");
    assert!(v2["detail"].as_str().unwrap().starts_with("cgroup v2 (unified)"), "{v2}");
    let missing: Vec<&str> = ["memory", "cpu", "pids", "io"].into_iter().filter(|c| !tb.v2_has_controller(c)).collect();
    let reported: Vec<&str> = v2["cgroup"]["missing"].as_array().unwrap().iter().map(|c| c.as_str().unwrap()).collect();
    assert_eq!(reported, missing, "{v2}");
    if missing.is_empty() {
        assert_eq!(v2["status"], "ok", "{v2}");
    } else {
        assert_eq!(v2["status"], "warn", "{v2}");
        for c in &missing {
            assert!(v2["detail"].as_str().unwrap().contains(&format!("{c} (")), "{c} not named: {v2}");
        }
        assert!(v2["fix"].as_str().unwrap().contains("cgroup v1"), "{v2}");
    }
    if tb.v2_has_controller("hugetlb") {
        assert!(v2["cgroup"]["controllers"].as_array().unwrap().iter().any(|c| c == "hugetlb"), "{v2}");
    }
}
