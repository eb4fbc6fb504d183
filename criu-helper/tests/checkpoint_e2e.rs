//! `kybernate checkpoint` end to end: a private containerd 1.6 (the test bed: `test/setup.sh`)
//! running our shim, runc and CRIU, driven through containerd's gRPC API by the CLI.
//!
//! Our shim is not a dependency of this crate: `cargo test --workspace` builds it, or
//! `cargo build -p containerd-shim-kybernate-v1` before `cargo test -p kybernate-criu`. Without it
//! these tests fail (they are never skipped silently).

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use kybernate_testbed::{unique_name, Testbed, IMAGE};
use serde_json::Value;

const KYBERNATE: &str = env!("CARGO_BIN_EXE_kybernate");
const RUNTIME: &str = "io.containerd.kybernate.v1";
/// Writes 1, 2, 3, ... to /tmp/counter (atomically, by rename) every 100 ms.
const COUNTER: &str =
    "i=0; while true; do i=$((i+1)); echo $i > /tmp/counter.new; mv /tmp/counter.new /tmp/counter; usleep 100000; done";
/// Deadline for anything we poll for; generous because CI machines have 2 cores.
const TIMEOUT: Duration = Duration::from_secs(30);

/// The directory holding our shim binary (`<target>/debug`), for containerd's PATH.
fn shim_dir() -> PathBuf {
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let target = match std::env::var_os("CARGO_TARGET_DIR") {
        Some(dir) => workspace.join(dir), // an absolute dir replaces the workspace
        None => workspace.join("target"),
    };
    let dir = target.join("debug");
    let shim = dir.join("containerd-shim-kybernate-v1");
    assert!(
        shim.is_file(),
        "{} not found: build the shim first: cargo build -p containerd-shim-kybernate-v1",
        shim.display()
    );
    dir
}

/// A test bed whose shims and CLI read a config with the checkpoint store in a scratch dir.
struct Bed {
    tb: Testbed,
    store: PathBuf,
    config: PathBuf,
    /// Holds the config and the store; dropped after the test bed.
    _dir: tempfile::TempDir,
}

fn bed() -> Bed {
    let shims = shim_dir();
    let scratch = kybernate_testbed::scratch_dir().expect("scratch dir");
    let store = scratch.path().join("checkpoints");
    let config = scratch.path().join("kybernate.toml");
    std::fs::write(&config, format!("[checkpoint]\nroot = \"{}\"\n", store.display())).unwrap();
    let tb = Testbed::builder()
        .path_prepend(shims)
        .env("KYBERNATE_CONFIG", &config)
        .start()
        .expect("test bed (run test/setup.sh first)");
    tb.import_image();
    Bed { tb, store, config, _dir: scratch }
}

impl Bed {
    /// `kybernate --address <test bed> -n <its namespace> --config <ours> ARGS`.
    fn kybernate(&self, args: &[&str]) -> Output {
        let out = Command::new(KYBERNATE)
            .arg("--address")
            .arg(self.tb.address())
            .args(["-n", self.tb.namespace()])
            .arg("--config")
            .arg(&self.config)
            .args(args)
            .env_remove("CONTAINERD_ADDRESS")
            .env_remove("CONTAINERD_NAMESPACE")
            .env_remove("KYBERNATE_CONFIG")
            .output()
            .expect("running kybernate");
        eprintln!("kybernate {args:?}: {}\nstdout:\n{}stderr:\n{}", out.status, text(&out.stdout), text(&out.stderr));
        out
    }

    fn run_counter(&self, id: &str, runtime: &str) {
        self.tb.ctr_ok(&["run", "-d", "--runtime", runtime, IMAGE, id, "sh", "-c", COUNTER]);
        wait_for(&format!("{id} to run"), || (task_status(&self.tb, id).as_deref() == Some("RUNNING")).then_some(()));
    }

    fn remove(&self, id: &str) {
        let _ = self.tb.ctr(&["tasks", "kill", "-s", "SIGKILL", id]);
        wait_for(&format!("{id} to stop"), || (task_status(&self.tb, id).as_deref() != Some("RUNNING")).then_some(()));
        let _ = self.tb.ctr(&["tasks", "delete", id]);
        self.tb.ctr_ok(&["containers", "delete", id]);
    }
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn wait_for<T>(what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + TIMEOUT;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out after {TIMEOUT:?} waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The task's status column in `ctr tasks ls` (RUNNING, STOPPED, ...), if listed.
fn task_status(tb: &Testbed, id: &str) -> Option<String> {
    tb.ctr_ok(&["tasks", "ls"]).lines().find_map(|l| {
        let cols: Vec<&str> = l.split_whitespace().collect();
        (cols.first() == Some(&id)).then(|| cols.get(2).map(|s| s.to_string()).unwrap_or_default())
    })
}

fn assert_exit(out: &Output, code: i32, stderr_has: &[&str]) {
    assert_eq!(out.status.code(), Some(code), "exit code; stderr: {}", text(&out.stderr));
    let err = text(&out.stderr);
    assert!(err.starts_with("kybernate: "), "error shape: {err}");
    for want in stderr_has {
        assert!(err.contains(want), "stderr lacks {want:?}: {err}");
    }
}

fn json(out: &Output) -> Value {
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("stdout is not JSON ({e}): {}", text(&out.stdout)))
}

#[test]
fn checkpoint_leaves_the_container_running_and_lists_it() {
    let bed = bed();
    let id = unique_name("cp");
    bed.run_counter(&id, RUNTIME);

    let out = bed.kybernate(&["-o", "json", "checkpoint", &id]);
    assert_exit_ok(&out);
    let cp = json(&out);
    let path = PathBuf::from(cp["path"].as_str().expect("path"));
    let store = std::fs::canonicalize(&bed.store).unwrap();
    assert!(path.starts_with(store.join(bed.tb.namespace()).join(&id)), "{} not in the store", path.display());
    assert!(cp["size_bytes"].as_u64().unwrap() > 0, "size_bytes: {cp}");
    assert!(cp["duration_ms"].is_u64(), "duration_ms: {cp}");
    assert_eq!(cp["status"], "ok", "{cp}");
    assert_eq!(cp["gpu"], false, "{cp}");
    assert_eq!(cp["container"], id.as_str());
    assert!(path.join("kybernate.json").is_file());
    assert!(path.join("checkpoint/inventory.img").is_file());
    // Left running (the default).
    assert_eq!(task_status(&bed.tb, &id).as_deref(), Some("RUNNING"));

    let listed = json(&bed.kybernate(&["-o", "json", "list"]));
    let ids: Vec<&str> = listed.as_array().unwrap().iter().filter_map(|c| c["id"].as_str()).collect();
    assert_eq!(ids, [cp["id"].as_str().unwrap()]);

    // The table form: where, how big, how long, the GPU mode.
    let out = bed.kybernate(&["checkpoint", &id]);
    assert_exit_ok(&out);
    let table = text(&out.stdout);
    for want in ["path:", "size:", "duration:"] {
        assert!(table.contains(want), "table lacks {want:?}:\n{table}");
    }
    assert!(
        table.lines().any(|l| l.starts_with("gpu mode:") && l.ends_with(" none")),
        "table lacks \"gpu mode: none\":\n{table}"
    );
    // A second checkpoint of the same container works too (containerd 1.6 then finds the
    // container's spec blob already in its content store; see checkpoint.rs), and both are listed.
    let listed = json(&bed.kybernate(&["-o", "json", "list", "--container", &id]));
    assert_eq!(listed.as_array().unwrap().len(), 2, "{listed}");
    bed.remove(&id);
}

fn assert_exit_ok(out: &Output) {
    assert!(out.status.success(), "kybernate failed: {}\n{}", out.status, text(&out.stderr));
}

#[test]
fn checkpoint_with_exit_and_name() {
    let bed = bed();
    let id = unique_name("cpx");
    bed.run_counter(&id, RUNTIME);

    let out = bed.kybernate(&["-o", "json", "checkpoint", &id, "--exit", "--name", "first"]);
    assert_exit_ok(&out);
    let cp = json(&out);
    let path = PathBuf::from(cp["path"].as_str().unwrap());
    assert_eq!(path.file_name().unwrap(), "first");
    assert_eq!(cp["id"].as_str().unwrap(), format!("{}/{id}/first", bed.tb.namespace()));
    assert!(path.join("checkpoint/inventory.img").is_file());
    wait_for(&format!("{id} to stop after --exit"), || {
        (task_status(&bed.tb, &id).as_deref() != Some("RUNNING")).then_some(())
    });

    let again = bed.kybernate(&["checkpoint", &id, "--name", "first"]);
    assert_exit(&again, 2, &["already exists"]);
    assert!(path.join("kybernate.json").is_file(), "the first checkpoint must stay");

    // A stopped task cannot be checkpointed.
    assert_exit(&bed.kybernate(&["checkpoint", &id]), 2, &["not running"]);
    // --leave-running and --exit exclude each other; a hidden name is refused.
    assert_exit(&bed.kybernate(&["checkpoint", &id, "--exit", "--leave-running"]), 2, &[]);
    assert_exit(&bed.kybernate(&["checkpoint", &id, "--name", ".x"]), 2, &["invalid checkpoint name"]);
    bed.remove(&id);
}

#[test]
fn checkpoint_refuses_what_it_cannot_checkpoint() {
    let bed = bed();
    let missing = unique_name("nope");
    assert_exit(&bed.kybernate(&["checkpoint", &missing]), 2, &["not found", &missing]);

    let runc = unique_name("runc");
    bed.run_counter(&runc, "io.containerd.runc.v2");
    assert_exit(&bed.kybernate(&["checkpoint", &runc]), 2, &["io.containerd.runc.v2", RUNTIME]);
    assert!(!bed.store.join(bed.tb.namespace()).join(&runc).exists(), "nothing may be written for {runc}");

    let out = Command::new(KYBERNATE)
        .args(["--address", "/nonexistent.sock", "--config"])
        .arg(&bed.config)
        .args(["checkpoint", &runc])
        .output()
        .unwrap();
    assert_exit(&out, 1, &["cannot reach containerd at /nonexistent.sock", "is containerd running?"]);
    bed.remove(&runc);
}
