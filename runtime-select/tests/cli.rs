//! `kybernate-select` as operators and scripts use it: output forms and exit codes.

mod common;

use std::process::{Command, Output};

use common::{bundle, spec, write_config, FakeRuntimes};
use serde_json::{json, Value};

fn select(rt: &FakeRuntimes, args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_kybernate-select"));
    cmd.env_clear().env("PATH", rt.dir.path()).args(args);
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().unwrap()
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn json_output_is_exactly_one_object_with_the_documented_keys() {
    let rt = FakeRuntimes::new();
    let b = bundle(&spec(&["NVIDIA_VISIBLE_DEVICES=all"], json!({})));
    let cfg = tempfile::tempdir().unwrap();
    let cfg = write_config(cfg.path(), "");
    let o = select(&rt, &[b.path().to_str().unwrap(), "--config", cfg.to_str().unwrap(), "--json"], &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    let out = stdout(&o);
    assert_eq!(out.lines().count(), 1, "{out}");
    let v: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(
        v,
        json!({
            "runtime": rt.path("nvidia-container-runtime"),
            "gpu": true,
            "source": "gpu",
            "evidence": ["env NVIDIA_VISIBLE_DEVICES=all"]
        })
    );
}

/// Bundles runc runs are decided on, however minimal or new: no `process.user` (issue 23), a
/// capability or personality domain no release knows, fields of a future runtime-spec.
#[test]
fn minimal_and_future_bundles_that_runc_runs_are_decided() {
    let rt = FakeRuntimes::new();
    let cfg = tempfile::tempdir().unwrap();
    let cfg = write_config(cfg.path(), "");
    for doc in [
        json!({"ociVersion": "1.0.2", "process": {"args": ["true"], "cwd": "/"}, "root": {"path": "rootfs"}}),
        json!({"ociVersion": "1.3.0", "process": {"args": ["true"], "cwd": "/", "user": {"uid": 0, "gid": 0},
            "capabilities": {"bounding": ["CAP_FUTURE_42"]}, "ioPriority": {"class": "IOPRIO_CLASS_FUTURE"}},
            "root": {"path": "rootfs"}, "linux": {"personality": {"domain": "LINUX_FUTURE"}, "futureField": 1},
            "futureTop": {"x": [1]}}),
    ] {
        let b = bundle(&doc);
        let o = select(&rt, &[b.path().to_str().unwrap(), "--config", cfg.to_str().unwrap(), "--json"], &[]);
        assert!(o.status.success(), "{doc}: {}", stderr(&o));
        let v: Value = serde_json::from_str(&stdout(&o)).unwrap();
        assert_eq!(v["gpu"], json!(false), "{doc}");
    }
}

#[test]
fn human_output_explains_the_decision() {
    let rt = FakeRuntimes::new();
    let b = bundle(&spec(&[], json!({})));
    let cfg = tempfile::tempdir().unwrap();
    let cfg = write_config(cfg.path(), "");
    let o = select(&rt, &[b.path().to_str().unwrap()], &[("KYBERNATE_CONFIG", cfg.to_str().unwrap())]);
    assert!(o.status.success(), "{}", stderr(&o));
    let out = stdout(&o);
    assert!(out.contains(&format!("runtime:  {}", rt.path("runc").display())), "{out}");
    assert!(out.contains("source:   default runtime") && out.contains("evidence: none"), "{out}");
}

#[test]
fn env_override_and_binary_name_flag_are_honoured() {
    let rt = FakeRuntimes::new();
    let b = bundle(&spec(&["NVIDIA_VISIBLE_DEVICES=all"], json!({})));
    let dir = b.path().to_str().unwrap();
    let o = select(&rt, &[dir, "--json"], &[("KYBERNATE_RUNTIME", "runc")]);
    let v: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["source"], "env");
    let o = select(&rt, &[dir, "--json", "--binary-name", "kata-runtime"], &[]);
    let v: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!((v["source"].as_str(), v["runtime"].as_str()), (Some("options"), rt.path("kata-runtime").to_str()));
}

#[test]
fn config_from_env_is_used() {
    let rt = FakeRuntimes::new();
    let b = bundle(&spec(&[], json!({})));
    let cfg = tempfile::tempdir().unwrap();
    let cfg = write_config(cfg.path(), "[runtime]\ndefault = \"kata-runtime\"\n");
    let o = select(&rt, &[b.path().to_str().unwrap(), "--json"], &[("KYBERNATE_CONFIG", cfg.to_str().unwrap())]);
    let v: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["runtime"].as_str(), rt.path("kata-runtime").to_str());
}

/// Exit 2 with exactly one line on stderr that names `file`, and nothing on stdout.
fn assert_usage_error(o: &Output, file: &str, what: &str) {
    assert_eq!(o.status.code(), Some(2), "stdout={} stderr={}", stdout(o), stderr(o));
    assert!(o.stdout.is_empty(), "{}", stdout(o));
    let err = stderr(o);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains(file) && err.contains(what), "want {file:?} and {what:?} in {err}");
}

#[test]
fn missing_bundle_config_exits_2_naming_the_file() {
    let rt = FakeRuntimes::new();
    let dir = tempfile::tempdir().unwrap();
    let o = select(&rt, &[dir.path().to_str().unwrap(), "--json"], &[]);
    assert_usage_error(&o, &format!("{}/config.json", dir.path().display()), "cannot read");
}

#[test]
fn malformed_bundle_config_exits_2_naming_the_file() {
    let rt = FakeRuntimes::new();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("config.json"), "{\"process\": ").unwrap();
    let o = select(&rt, &[dir.path().to_str().unwrap()], &[]);
    assert_usage_error(&o, &format!("{}/config.json", dir.path().display()), "malformed");
}

#[test]
fn malformed_config_file_exits_2_naming_file_key_and_line() {
    let rt = FakeRuntimes::new();
    let b = bundle(&spec(&[], json!({})));
    let cfg = tempfile::tempdir().unwrap();
    let cfg = write_config(cfg.path(), "[runtime]\ndefault = \"runc\"\n\n[checkpoint]\ncuda = 1\n");
    let o = select(&rt, &[b.path().to_str().unwrap(), "--config", cfg.to_str().unwrap()], &[]);
    assert_usage_error(&o, &format!("{}:5:", cfg.display()), "checkpoint.cuda");
}

#[test]
fn missing_explicit_config_file_exits_2() {
    let rt = FakeRuntimes::new();
    let b = bundle(&spec(&[], json!({})));
    let o = select(&rt, &[b.path().to_str().unwrap(), "--config", "/nonexistent/kybernate.toml"], &[]);
    assert_usage_error(&o, "/nonexistent/kybernate.toml", "cannot read");
}

#[test]
fn missing_gpu_runtime_exits_2_and_fallback_warns() {
    let rt = FakeRuntimes::new();
    std::fs::remove_file(rt.path("nvidia-container-runtime")).unwrap();
    let b = bundle(&spec(
        &[],
        json!({"linux": {"devices": [{"path": "/dev/nvidia0", "type": "c", "major": 195, "minor": 0}]}}),
    ));
    let cfg_dir = tempfile::tempdir().unwrap();
    // A name no machine has, so /usr/bin & co. cannot satisfy it either.
    let cfg = write_config(cfg_dir.path(), "[runtime]\ngpu = \"kbt-absent-nvidia-runtime\"\n");
    let o = select(&rt, &[b.path().to_str().unwrap(), "--config", cfg.to_str().unwrap(), "--json"], &[]);
    assert_usage_error(&o, cfg.to_str().unwrap(), "wants GPUs");

    let cfg = write_config(
        cfg_dir.path(),
        "[runtime]\ngpu = \"kbt-absent-nvidia-runtime\"\non_missing_gpu_runtime = \"fallback\"\n",
    );
    let o = select(&rt, &[b.path().to_str().unwrap(), "--config", cfg.to_str().unwrap(), "--json"], &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    let v: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!((v["source"].as_str(), v["gpu"].as_bool()), (Some("default"), Some(true)));
    assert!(stderr(&o).starts_with("warning: "), "{}", stderr(&o));
}

#[test]
fn bad_arguments_exit_2() {
    let rt = FakeRuntimes::new();
    assert_eq!(select(&rt, &[], &[]).status.code(), Some(2));
    assert_eq!(select(&rt, &["/tmp", "--no-such-flag"], &[]).status.code(), Some(2));
}
