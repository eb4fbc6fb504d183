//! Checkpoint test helpers: a test bed whose shims keep their checkpoint store in the test's
//! scratch dir, a counter container, and Task.Checkpoint straight to the shim (containerd 1.6
//! forwards no options for runtime names other than runc's).

use std::path::{Path, PathBuf};
use std::thread::JoinHandle;
use std::time::Duration;

use containerd_shim_protos::api::{CheckpointTaskRequest, StateRequest, Status};
use containerd_shim_protos::protobuf::well_known_types::any::Any;
use containerd_shim_protos::protobuf::Message;
use containerd_shim_protos::shim::oci::CheckpointOptions;
use containerd_shim_protos::ttrpc::{self, context, Code};
use containerd_shim_protos::{Client, TaskClient};
use kybernate_testbed::{unique_name, Testbed, IMAGE};

use super::{bundle_dir, shim_dir, task_status, wait_for, RUNTIME, TIMEOUT};

/// Writes 1, 2, 3, ... to /tmp/counter (atomically, by rename) every 100 ms.
pub const COUNTER: &str =
    "i=0; while true; do i=$((i+1)); echo $i > /tmp/counter.new; mv /tmp/counter.new /tmp/counter; usleep 100000; done";
/// Checkpoints write a few MiB for this container; CRIU can take a while on a loaded 2-core CI box.
pub const CHECKPOINT_TIMEOUT: Duration = Duration::from_secs(120);

// ---------------------------------------------------------------------------------------------
// Test bed and helpers

/// A test bed whose shims read a config with the checkpoint store under the test bed's dir.
pub struct Bed {
    pub tb: Testbed,
    pub store: PathBuf,
    /// Holds the config and the store; dropped after the test bed.
    _dir: tempfile::TempDir,
}

pub fn bed_with(configure: impl FnOnce(kybernate_testbed::Builder) -> kybernate_testbed::Builder, extra: &str) -> Bed {
    let scratch = kybernate_testbed::scratch_dir().expect("scratch dir");
    let dir = scratch.path();
    let store = dir.join("checkpoints");
    let config = dir.join("kybernate.toml");
    std::fs::write(&config, format!("[checkpoint]\nroot = \"{}\"\n{extra}", store.display())).unwrap();
    let builder = kybernate_testbed::Testbed::builder().path_prepend(shim_dir()).env("KYBERNATE_CONFIG", &config);
    let tb = configure(builder).start().expect("test bed (run test/setup.sh first)");
    tb.import_image();
    Bed { tb, store, _dir: scratch }
}

pub fn bed() -> Bed {
    bed_with(|b| b, "")
}

pub fn run_counter(tb: &Testbed, id: &str, extra: &[&str]) {
    let mut args = vec!["run", "-d", "--runtime", RUNTIME];
    args.extend_from_slice(extra);
    args.extend_from_slice(&[IMAGE, id, "sh", "-c", COUNTER]);
    tb.ctr_ok(&args);
}

/// The value the counter container `id` last wrote, read from its rootfs on the host.
pub fn counter(tb: &Testbed, id: &str) -> Option<u64> {
    std::fs::read_to_string(bundle_dir(tb, id).join("rootfs/tmp/counter")).ok()?.trim().parse().ok()
}

pub fn wait_counter(tb: &Testbed, id: &str, at_least: u64) -> u64 {
    wait_for(&format!("counter of {id} to reach {at_least}"), || counter(tb, id).filter(|&n| n >= at_least))
}

/// Asserts that the counter of `id` continues from `from` and advances by at least 5.
pub fn assert_counter_continues(tb: &Testbed, id: &str, from: u64) {
    let first = wait_for(&format!("counter of {id} after restore"), || counter(tb, id));
    assert!(first >= from, "counter of {id} restarted: {first} after a checkpoint at {from}");
    let mut last = first;
    wait_for(&format!("counter of {id} to advance past {}", from + 5), || {
        let n = counter(tb, id)?;
        assert!(n >= last, "counter of {id} went backwards: {last} -> {n}");
        last = n;
        (n >= from + 5).then_some(())
    });
}

pub fn connect(tb: &Testbed, id: &str) -> TaskClient {
    let file = bundle_dir(tb, id).join("address");
    let address = std::fs::read_to_string(&file).unwrap_or_else(|e| panic!("reading {}: {e}", file.display()));
    let client = Client::connect(address.trim()).unwrap_or_else(|e| panic!("connecting to the shim: {e}"));
    TaskClient::new(client)
}

pub fn options(o: CheckpointOptions) -> Any {
    Any {
        type_url: "containerd.runc.v1.CheckpointOptions".into(),
        value: o.write_to_bytes().unwrap(),
        ..Default::default()
    }
}

/// Task.Checkpoint straight to the shim, into `image_path`.
pub fn checkpoint(tb: &Testbed, id: &str, o: CheckpointOptions) -> ttrpc::Result<()> {
    let shim = connect(tb, id);
    let req = CheckpointTaskRequest { id: id.into(), options: Some(options(o)).into(), ..Default::default() };
    shim.checkpoint(context::with_duration(CHECKPOINT_TIMEOUT), &req).map(drop)
}

/// Task.Checkpoint straight to the shim on another thread, for tests that act during the dump.
pub fn checkpoint_in_background(tb: &Testbed, id: &str, o: CheckpointOptions) -> JoinHandle<ttrpc::Result<()>> {
    let shim = connect(tb, id);
    let req = CheckpointTaskRequest { id: id.into(), options: Some(options(o)).into(), ..Default::default() };
    std::thread::spawn(move || shim.checkpoint(context::with_duration(CHECKPOINT_TIMEOUT), &req).map(drop))
}

pub fn error_of(r: ttrpc::Result<()>) -> (Code, String) {
    match r {
        Err(ttrpc::Error::RpcStatus(s)) => (s.code(), s.message.clone()),
        other => panic!("want an RPC error, got {other:?}"),
    }
}

pub fn shim_status(tb: &Testbed, id: &str) -> Option<Status> {
    let shim = connect(tb, id);
    let st = shim.state(context::with_duration(TIMEOUT), &StateRequest { id: id.into(), ..Default::default() });
    st.ok().map(|s| s.status.enum_value_or(Status::UNKNOWN))
}

pub fn store_path(bed: &Bed, id: &str) -> PathBuf {
    bed.store.join(bed.tb.namespace()).join(id).join(unique_name("cp"))
}

/// Entries of `dir` (hidden ones included), for "nothing partial left behind".
pub fn entries(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .map(|d| d.flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect())
        .unwrap_or_default()
}

pub fn remove(tb: &Testbed, id: &str) {
    let _ = tb.ctr(&["tasks", "kill", "-s", "SIGKILL", id]);
    wait_for("task to stop", || (task_status(tb, id).as_deref() != Some("RUNNING")).then_some(()));
    tb.ctr_ok(&["tasks", "delete", id]);
    tb.ctr_ok(&["containers", "delete", id]);
}

pub fn assert_running(tb: &Testbed, id: &str, why: &str) {
    assert_eq!(task_status(tb, id).as_deref(), Some("RUNNING"), "{id} not running {why}");
    let n = counter(tb, id).unwrap_or(0);
    wait_counter(tb, id, n + 3);
}

/// Checkpoints a running counter into the store with `exit`; returns (checkpoint dir, counter at checkpoint).
pub fn store_checkpoint(bed: &Bed, id: &str, exit: bool) -> (PathBuf, u64) {
    let tb = &bed.tb;
    wait_counter(tb, id, 3);
    let target = store_path(bed, id);
    let before = counter(tb, id).unwrap();
    checkpoint(tb, id, CheckpointOptions { exit, image_path: target.display().to_string(), ..Default::default() })
        .unwrap_or_else(|e| panic!("checkpoint of {id}: {e}"));
    (target, before)
}

/// `ctr run -d` of a new container `new_id` that the shim restores on create from the store
/// checkpoint `dir` (named by the annotation, relative to the store root); `extra` are more `ctr
/// run` flags. Its command is what a fresh start would run: the restore replaces it.
pub fn run_restored(bed: &Bed, dir: &Path, new_id: &str, extra: &[&str]) -> std::process::Output {
    let relative = dir.strip_prefix(&bed.store).expect("a checkpoint of the store").display().to_string();
    let annotation = format!("kybernate.io/restore-from={relative}");
    let mut args = vec!["run", "-d", "--runtime", RUNTIME, "--annotation", &annotation];
    args.extend_from_slice(extra);
    args.extend_from_slice(&[IMAGE, new_id, "sleep", "1000"]);
    bed.tb.ctr(&args)
}

/// [`run_restored`], which must succeed.
pub fn run_restored_ok(bed: &Bed, dir: &Path, new_id: &str, extra: &[&str]) {
    let out = run_restored(bed, dir, new_id, extra);
    assert!(
        out.status.success(),
        "restore of {new_id} from {}: {}",
        dir.display(),
        String::from_utf8_lossy(&out.stderr)
    );
}
