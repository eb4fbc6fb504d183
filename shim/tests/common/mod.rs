//! Helpers shared by the shim's integration tests (each test file is its own crate,
//! so not every helper is used by every file).

#![allow(dead_code)]

pub mod ckpt;
pub mod cri;
pub mod procs;

use std::io::Read;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use kybernate_shim::runtime::{ContainerStatus, OciRuntime};
use kybernate_testbed::{Testbed, CONTAINERD_RUNC_ROOT};

pub const RUNTIME: &str = "io.containerd.kybernate.v1";
pub const SHIM: &str = env!("CARGO_BIN_EXE_containerd-shim-kybernate-v1");
/// Deadline for anything we poll for; generous because CI machines have 2 cores.
pub const TIMEOUT: Duration = Duration::from_secs(30);

/// The directory holding our shim binary, for containerd's PATH.
pub fn shim_dir() -> PathBuf {
    Path::new(SHIM).parent().unwrap().to_path_buf()
}

/// A test bed whose containerd finds our shim on its PATH, with the image imported.
pub fn testbed() -> Testbed {
    let tb = Testbed::builder().path_prepend(shim_dir()).start().expect("test bed (run test/setup.sh first)");
    tb.import_image();
    tb
}

pub use kybernate_testbed::text;

/// Polls `f` every 50 ms until it returns `Some`, panicking after [`TIMEOUT`] with `what`.
pub fn wait_for<T>(what: &str, f: impl FnMut() -> Option<T>) -> T {
    kybernate_testbed::wait_for_within(TIMEOUT, what, f)
}

/// Polls `state()` every 50 ms until `ok` holds, panicking after [`TIMEOUT`] with `what` and the
/// state as it was last seen.
pub fn wait_until<S: std::fmt::Debug>(what: &str, mut state: impl FnMut() -> S, ok: impl Fn(&S) -> bool) {
    let deadline = Instant::now() + TIMEOUT;
    loop {
        let s = state();
        if ok(&s) {
            return;
        }
        assert!(Instant::now() < deadline, "timed out after {TIMEOUT:?} waiting for {what}; last seen: {s:#?}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// `(pid, status)` of the task `id` in `ctr tasks ls`, if listed.
pub fn task_row(tb: &Testbed, id: &str) -> Option<(u32, String)> {
    task_row_in(&tb.ctr_ok(&["tasks", "ls"]), id)
}

/// `(pid, status)` of the task `id` in the output of `ctr tasks ls`, if listed.
pub fn task_row_in(out: &str, id: &str) -> Option<(u32, String)> {
    out.lines().find_map(|l| {
        let cols: Vec<&str> = l.split_whitespace().collect();
        (cols.first() == Some(&id)).then(|| {
            (
                cols.get(1).and_then(|p| p.parse().ok()).unwrap_or(0),
                cols.get(2).map(|s| s.to_string()).unwrap_or_default(),
            )
        })
    })
}

pub fn task_status(tb: &Testbed, id: &str) -> Option<String> {
    task_row(tb, id).map(|(_, s)| s)
}

/// runc's state directory for this test bed's namespace (one entry per container).
pub fn runc_state_dir(tb: &Testbed) -> PathBuf {
    Path::new(CONTAINERD_RUNC_ROOT).join(tb.namespace())
}

pub fn runc_state_entries(tb: &Testbed) -> Vec<String> {
    std::fs::read_dir(runc_state_dir(tb))
        .map(|d| d.flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect())
        .unwrap_or_default()
}

/// containerd's bundle dir for a task (its `rootfs` is where the shim mounts the snapshot).
pub fn bundle_dir(tb: &Testbed, id: &str) -> PathBuf {
    tb.dir().join("state/io.containerd.runtime.v2.task").join(tb.namespace()).join(id)
}

pub fn pipe() -> (OwnedFd, OwnedFd) {
    nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).expect("pipe2")
}

/// Reads a pipe to EOF on a thread; the caller bounds `recv` so a stuck writer fails the test instead of hanging it.
pub fn read_to_eof(fd: OwnedFd) -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut s = String::new();
        let _ = std::fs::File::from(fd).read_to_string(&mut s);
        let _ = tx.send(s);
    });
    rx
}

/// Polls the runtime's `state` until container `id` is `want`, for up to 20 s.
pub fn wait_for_status(rt: &OciRuntime, id: &str, bundle: &Path, want: ContainerStatus) {
    const STATE_TIMEOUT: Duration = Duration::from_secs(20);
    let deadline = Instant::now() + STATE_TIMEOUT;
    loop {
        let status = rt.state(id, bundle).expect("state").status;
        if status == want {
            return;
        }
        assert!(Instant::now() < deadline, "container {id} is {status:?}, not {want:?}, after {STATE_TIMEOUT:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The fake `nvidia-container-runtime` (shim/examples/fake_nvidia_runtime.rs), which `cargo test`
/// builds with the shim's examples.
pub fn fake_gpu_runtime_binary() -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    let profile = exe.parent().and_then(Path::parent).expect("target profile dir");
    let bin = profile.join("examples/fake_nvidia_runtime");
    assert!(
        bin.is_file(),
        "{} missing: run `cargo test -p containerd-shim-kybernate-v1` (which builds the examples)",
        bin.display()
    );
    bin
}
