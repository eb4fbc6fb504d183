//! Helpers shared by the CLI's integration tests: fake checkpoints written with the library
//! (kybernate-checkpoint's tests/common, included), and the end-to-end tests' test bed
//! (`test/setup.sh`); each test file is its own crate, so not every helper is used by every file.
//!
//! Our shim is not a dependency of this crate: `cargo test --workspace` builds it, or
//! `cargo build -p containerd-shim-kybernate-v1` before `cargo test -p kybernate-cli`. Without it
//! these tests fail (they are never skipped silently). The GPU restore test also needs the shim's
//! `fake_nvidia_runtime` example, which `cargo test --workspace` builds too.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

#[path = "../../../checkpoint/tests/common/mod.rs"]
mod checkpoints;
#[allow(unused_imports)] // not every test file uses every helper
pub use checkpoints::{fake_checkpoint, fake_checkpoint_with, fake_manifest, kubelet_archive, oci_layer};

use kybernate_testbed::{Testbed, IMAGE};
use serde_json::Value;

pub const KYBERNATE: &str = env!("CARGO_BIN_EXE_kybernate");
pub const RUNTIME: &str = "io.containerd.kybernate.v1";
/// Writes 1, 2, 3, ... to /tmp/counter (atomically, by rename) every 100 ms.
pub const COUNTER: &str =
    "i=0; while true; do i=$((i+1)); echo $i > /tmp/counter.new; mv /tmp/counter.new /tmp/counter; usleep 100000; done";
/// Deadline for anything we poll for; generous because CI machines have 2 cores.
pub const TIMEOUT: Duration = Duration::from_secs(60);

/// The directory holding our shim binary (`<target>/debug`), for containerd's PATH.
pub fn shim_dir() -> PathBuf {
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
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
pub struct Bed {
    pub tb: Testbed,
    pub store: PathBuf,
    pub config: PathBuf,
    /// Holds the config and the store; dropped after the test bed.
    pub dir: tempfile::TempDir,
}

pub fn bed() -> Bed {
    bed_with(|b| b, "")
}

/// [`bed`] with the test bed's builder adjusted by `configure` and `extra` appended to the
/// config's `[checkpoint]` table.
pub fn bed_with(configure: impl FnOnce(kybernate_testbed::Builder) -> kybernate_testbed::Builder, extra: &str) -> Bed {
    let shims = shim_dir();
    let scratch = kybernate_testbed::scratch_dir().expect("scratch dir");
    let store = scratch.path().join("checkpoints");
    let config = scratch.path().join("kybernate.toml");
    std::fs::write(&config, format!("[checkpoint]\nroot = \"{}\"\n{extra}", store.display())).unwrap();
    let builder = Testbed::builder().path_prepend(shims).env("KYBERNATE_CONFIG", &config);
    let tb = configure(builder).start().expect("test bed (run test/setup.sh first)");
    tb.import_image();
    Bed { tb, store, config, dir: scratch }
}

/// The fake `nvidia-container-runtime` (shim/examples/fake_nvidia_runtime.rs), which `cargo test
/// --workspace` builds with the shim's examples: `<target>/debug/examples/fake_nvidia_runtime`.
pub fn fake_gpu_runtime_binary() -> PathBuf {
    let bin = shim_dir().join("examples/fake_nvidia_runtime");
    assert!(
        bin.is_file(),
        "{} not found: build it first: cargo build -p containerd-shim-kybernate-v1 --example fake_nvidia_runtime",
        bin.display()
    );
    bin
}

impl Bed {
    /// `kybernate --address <test bed> -n <its namespace> --config <ours> ARGS`.
    pub fn kybernate(&self, args: &[&str]) -> Output {
        self.kybernate_at(self.tb.address(), self.tb.namespace(), args)
    }

    /// `kybernate --address ADDRESS -n NS --config <ours> ARGS`.
    pub fn kybernate_at(&self, address: &Path, ns: &str, args: &[&str]) -> Output {
        let out = Command::new(KYBERNATE)
            .arg("--address")
            .arg(address)
            .args(["-n", ns])
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

    /// Starts the counter under `runtime` and waits until its task runs.
    pub fn run_counter(&self, id: &str, runtime: &str) {
        self.tb.ctr_ok(&["run", "-d", "--runtime", runtime, IMAGE, id, "sh", "-c", COUNTER]);
        self.wait_running(id);
    }

    /// Waits until the task of `id` is RUNNING.
    pub fn wait_running(&self, id: &str) {
        wait_for(&format!("{id} to run"), || (task_status(&self.tb, id).as_deref() == Some("RUNNING")).then_some(()));
    }

    /// Waits until the counter of `id` has counted to `at_least`.
    pub fn wait_counter(&self, id: &str, at_least: u64) {
        wait_for(&format!("{id} to count to {at_least}"), || self.counter(id).filter(|&n| n >= at_least));
    }

    /// The counter in the container's rootfs, as the shim mounted it.
    pub fn counter(&self, id: &str) -> Option<u64> {
        let path = self
            .tb
            .dir()
            .join("state/io.containerd.runtime.v2.task")
            .join(self.tb.namespace())
            .join(id)
            .join("rootfs/tmp/counter");
        std::fs::read_to_string(path).ok()?.trim().parse().ok()
    }

    /// The ids of the namespace's containers.
    pub fn containers(&self) -> Vec<String> {
        self.tb.ctr_ok(&["containers", "ls", "-q"]).lines().map(str::to_string).collect()
    }

    /// Kills and deletes the task (if any) and the container (which must exist); the snapshot
    /// goes with it.
    pub fn remove(&self, id: &str) {
        let _ = self.tb.ctr(&["tasks", "kill", "-s", "SIGKILL", id]);
        wait_for(&format!("{id} to stop"), || (task_status(&self.tb, id).as_deref() != Some("RUNNING")).then_some(()));
        let _ = self.tb.ctr(&["tasks", "delete", id]);
        self.tb.ctr_ok(&["containers", "delete", id]);
        let _ = self.tb.ctr(&["snapshots", "rm", id]);
    }
}

pub use kybernate_testbed::text;

/// Polls `f` every 50 ms until it returns a value, for at most [`TIMEOUT`].
pub fn wait_for<T>(what: &str, f: impl FnMut() -> Option<T>) -> T {
    kybernate_testbed::wait_for_within(TIMEOUT, what, f)
}

/// The task's status column in `ctr tasks ls` (RUNNING, STOPPED, ...), if listed.
pub fn task_status(tb: &Testbed, id: &str) -> Option<String> {
    tb.ctr_ok(&["tasks", "ls"]).lines().find_map(|l| {
        let cols: Vec<&str> = l.split_whitespace().collect();
        (cols.first() == Some(&id)).then(|| cols.get(2).map(|s| s.to_string()).unwrap_or_default())
    })
}

/// Asserts the CLI exited with `code` and an error message containing each of `stderr_has`.
pub fn assert_exit(out: &Output, code: i32, stderr_has: &[&str]) {
    assert_eq!(out.status.code(), Some(code), "exit code; stderr: {}", text(&out.stderr));
    let err = text(&out.stderr);
    assert!(err.starts_with("kybernate: "), "error shape: {err}");
    for want in stderr_has {
        assert!(err.contains(want), "stderr lacks {want:?}: {err}");
    }
}

pub fn assert_exit_ok(out: &Output) {
    assert!(out.status.success(), "kybernate failed: {}\n{}", out.status, text(&out.stderr));
}

/// The CLI's stdout, parsed as JSON.
pub fn json(out: &Output) -> Value {
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("stdout is not JSON ({e}): {}", text(&out.stdout)))
}

/// A command's exit status and output, for assertion messages.
pub fn show(out: &std::process::Output) -> String {
    format!(
        "exit {:?}\nstdout:\n{}\nstderr:\n{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// The three binaries a node gets (packages, installer image).
pub const BINARIES: [&str; 3] = ["kybernate", "containerd-shim-kybernate-v1", "kybernate-select"];

/// The three binaries cargo built (target/<profile>/kybernate and its siblings), linked into
/// `into`; a sibling this test run did not build is stood in for by the kybernate binary (the
/// packaging tests are about packages and scripts, not about what the binaries do).
pub fn built_binaries(into: &Path) -> PathBuf {
    let kybernate = PathBuf::from(env!("CARGO_BIN_EXE_kybernate"));
    let target_dir = kybernate.parent().expect("target dir");
    std::fs::create_dir_all(into).expect("binaries dir");
    for name in BINARIES {
        let built = target_dir.join(name);
        let source = if built.is_file() { built } else { kybernate.clone() };
        let dest = into.join(name);
        // A hard link where possible: the debug binaries are large.
        if std::fs::hard_link(&source, &dest).is_err() {
            std::fs::copy(&source, &dest).expect("copying a binary");
        }
    }
    into.to_path_buf()
}

impl Bed {
    /// [`Bed::run_counter`] with more `ctr run` flags: `--seccomp` gives the container containerd's
    /// RuntimeDefault profile, so that its checkpoint's `spec.dump` grants nothing beyond the image
    /// defaults and `kybernate restore` needs no `--trust-spec`.
    pub fn run_counter_with(&self, id: &str, runtime: &str, extra: &[&str]) {
        let mut args = vec!["run", "-d", "--runtime", runtime];
        args.extend_from_slice(extra);
        args.extend_from_slice(&[IMAGE, id, "sh", "-c", COUNTER]);
        self.tb.ctr_ok(&args);
        self.wait_running(id);
    }

    /// Asserts that containerd has nothing named `id` in the test bed's namespace: no container,
    /// no task, no snapshot.
    pub fn assert_nothing_named(&self, id: &str) {
        assert!(!self.containers().iter().any(|c| c == id), "container {id} was created");
        assert_eq!(task_status(&self.tb, id), None, "task {id} was created");
        let snapshots = self.tb.ctr_ok(&["snapshots", "ls"]);
        assert!(
            !snapshots.lines().any(|l| l.split_whitespace().next() == Some(id)),
            "snapshot {id} was prepared:\n{snapshots}"
        );
    }
}

/// Rewrites the JSON file `file` of the checkpoint in `dir` with `edit` applied, and its size and
/// digests in the manifest, so that the checkpoint still verifies: the manifest itself is not
/// hashed, so whoever can write into the store (or hand over an archive) can do this.
pub fn edit_checkpoint_json(dir: &Path, file: &str, edit: impl FnOnce(&mut Value)) {
    let path = dir.join(file);
    let mut v: Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    edit(&mut v);
    let bytes = serde_json::to_vec_pretty(&v).unwrap();
    std::fs::write(&path, &bytes).unwrap();
    let manifest = dir.join("kybernate.json");
    let mut m: Value = serde_json::from_slice(&std::fs::read(&manifest).unwrap()).unwrap();
    assert!(m["files"].get(file).is_some(), "{file} is not in the manifest: {m}");
    let entry = kybernate_checkpoint::digest::hash_entry(&path).unwrap();
    m["files"][file] = serde_json::to_value(entry).unwrap();
    std::fs::write(&manifest, serde_json::to_vec_pretty(&m).unwrap()).unwrap();
}

/// A scratch node for the store commands: a config naming `<tmp>/store` as the checkpoint root
/// (no containerd: [`Node::without_containerd`] points `--address` nowhere, for commands that
/// must refuse before they would ask it).
pub struct Node {
    pub tmp: tempfile::TempDir,
    pub config: PathBuf,
    pub store: kybernate_checkpoint::Store,
    address: Option<&'static str>,
}

impl Node {
    pub fn new() -> Self {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("store");
        let config = tmp.path().join("config.toml");
        std::fs::write(&config, format!("[checkpoint]\nroot = {:?}\n", root.to_str().unwrap())).unwrap();
        Self { tmp, config, store: kybernate_checkpoint::Store::new(root), address: None }
    }

    /// Every command gets `--address` of a socket that does not exist.
    pub fn without_containerd(mut self) -> Self {
        self.address = Some("/nonexistent/containerd.sock");
        self
    }

    pub fn root(&self) -> PathBuf {
        std::fs::canonicalize(self.store.root()).unwrap()
    }

    /// A committed checkpoint of `ns/container`, created `age` ago; returns its id.
    pub fn checkpoint(&self, ns: &str, container: &str, age: Duration) -> String {
        fake_checkpoint(&self.store, ns, container, std::time::SystemTime::now() - age)
    }

    /// Runs `kybernate --config <config> ARGS` in `cwd` (default: the temp dir), without the
    /// caller's containerd/kybernate environment.
    pub fn run_in(&self, cwd: &Path, args: &[&str]) -> Output {
        Command::new(env!("CARGO_BIN_EXE_kybernate"))
            .arg("--config")
            .arg(&self.config)
            .args(self.address.iter().flat_map(|a| ["--address", *a]))
            .args(args)
            .current_dir(cwd)
            .env_remove("CONTAINERD_NAMESPACE")
            .env_remove("KYBERNATE_CONFIG")
            .output()
            .unwrap()
    }

    pub fn run(&self, args: &[&str]) -> Output {
        self.run_in(self.tmp.path(), args)
    }

    /// Runs with `-o json`, expects `code`, returns stdout as JSON.
    pub fn json(&self, args: &[&str], code: i32) -> Value {
        let out = self.run(&[&["-o", "json"], args].concat());
        assert_eq!(out.status.code(), Some(code), "{}", show(&out));
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {}", show(&out)))
    }
}
