//! Test bed for Kybernate's integration tests.
//!
//! Real containers need real infrastructure: [`Testbed`] runs a private containerd per test (own
//! root, state, sockets and namespace, so tests run in parallel and never touch a system
//! containerd), [`IMAGE`] is a busybox image built locally by `test/setup.sh` (there is no
//! registry), and [`Bundle`] + [`Runc`] drive raw `runc` (and through it CRIU) without containerd.
//!
//! With [`Builder::cri`] / [`Builder::cri_runtime`] the private containerd also runs its CRI
//! plugin (the kubelet's API, on the same socket) for host-network pods, with a pause-like
//! sandbox image ([`PAUSE_IMAGE`]) built from [`IMAGE`] at start ([`cri`]).
//!
//! [`Builder::bind_over`] runs the private containerd (and every shim, runc and CRIU it starts)
//! in a mount namespace of its own where a test's file tree replaces a node path, e.g. a fake
//! NVIDIA driver under `/proc/driver` ([`fakes::FakeNvidiaProc`]): node files the product reads
//! at fixed paths, without a test-only setting in the product.
//!
//! [`Node`] boots this machine's root as a container whose PID 1 is systemd (`test/lib/kbt-node`),
//! for what needs `systemctl` and `journalctl`: containerd as the `containerd.service` unit.
//!
//! Everything needs root and a machine prepared by `test/setup.sh`; [`check_preconditions`] says
//! what is missing. The shell side of the same test bed is `test/lib/testbed.sh`, and the
//! constants below mirror `test/lib/common.sh`: change both together.
//!
//! Cleanup is the point of this crate: every guard ([`Testbed`], [`Runc`]) tears down what it
//! started in `Drop`, also when the test panicked, and the first test bed of a process sweeps up
//! what earlier, killed test processes left behind (see [`unique_name`]).

mod bundle;
pub mod cgroup;
mod cleanup;
pub mod cri;
pub mod fakes;
mod mountns;
mod node;
mod registry;
mod testbed;

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};

pub use bundle::{Bundle, Runc};
pub use cgroup::CgroupMode;
pub use cri::{CriRuntime, CriStyle, CRI_NAMESPACE, PAUSE_IMAGE};
pub use node::{kbt_node, Node};
pub use registry::{Registry, REGISTRY_BINARY};
pub use testbed::{Builder, Testbed};

/// Name the test image is imported under (from the `io.containerd.image.name` annotation).
pub const IMAGE: &str = "docker.io/kybernate/busybox:test";
/// OCI archive of [`IMAGE`], written by `test/setup.sh`.
pub const IMAGE_ARCHIVE: &str = "/var/lib/kybernate-test/busybox-oci.tar";
/// Parent of every test bed's and scratch directory; on disk so that overlayfs works, and short
/// because unix socket paths are limited to 108 bytes.
pub const RUN_BASE: &str = "/var/lib/kybernate-test/run";
/// A minbase Debian bookworm rootfs (test/setup.sh's KBT_BASE_ROOTFS, made by mmdebstrap): the
/// installer image's base and the Debian package test's fresh node.
pub const BASE_ROOTFS: &str = "/var/lib/kybernate-test/debian-bookworm-slim-rootfs.tar";
/// bookworm's containerd and runc .debs (test/setup.sh's KBT_NODE_DEBS), for apt on [`BASE_ROOTFS`].
pub const NODE_DEBS: &str = "/var/lib/kybernate-test/node-debs-bookworm";
/// checkpointctl (Debian testing's, run on that suite's glibc by test/setup.sh's wrapper,
/// KBT_CHECKPOINTCTL): the archive inspector Kubernetes and CRI-O users read checkpoints with.
pub const CHECKPOINTCTL: &str = "/opt/kybernate-test/checkpointctl/bin/checkpointctl";
/// The `criu` wrapper (Debian testing's CRIU >= 4.2 in a private prefix); runc finds it on PATH.
pub const CRIU: &str = "/usr/local/sbin/criu";
/// Oldest CRIU that works on the test machines' kernels (3.17 fails on the vDSO check).
pub const CRIU_MIN_VERSION: (u32, u32) = (4, 1);
/// Static busybox from Debian's busybox-static: the only binary in test images and bundles.
pub const BUSYBOX: &str = "/bin/busybox";
/// PATH given to containerd (after any prepended dirs); /usr/local/sbin comes first so runc, started
/// by the shim with containerd's environment, finds the CRIU wrapper before any /usr/sbin/criu.
pub const SYSTEM_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
/// Where runc keeps container state for containerd's runc shims: `<this>/<namespace>`, whatever
/// containerd's own state dir is. Per-test namespaces keep tests apart here.
pub const CONTAINERD_RUNC_ROOT: &str = "/run/containerd/runc";

/// Where `test/setup.sh` unpacks the containerd releases beside the system's (`KBT_CONTAINERD_BASE`).
pub const CONTAINERD_BASE: &str = "/opt/kybernate-test/containerd";

/// A containerd release a test bed can run: bookworm's 1.6 is the system one (on PATH);
/// `test/setup.sh` unpacks Debian trixie's 1.7 and Debian testing's 2.x beside it
/// (`KBT_CONTAINERD_RELEASES`), so the shim and the CRI path are tested under every containerd a
/// node may run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Containerd {
    /// Debian bookworm's containerd 1.6 (`/usr/bin`).
    #[default]
    V1_6,
    /// containerd 1.7 (Debian trixie's).
    V1_7,
    /// containerd 2.x (Debian testing's).
    V2,
}

impl Containerd {
    /// Every release, oldest first.
    pub const ALL: [Containerd; 3] = [Containerd::V1_6, Containerd::V1_7, Containerd::V2];

    /// The release as `test/setup.sh` names it (`1.6`, `1.7`, `2`).
    pub fn name(self) -> &'static str {
        match self {
            Containerd::V1_6 => "1.6",
            Containerd::V1_7 => "1.7",
            Containerd::V2 => "2",
        }
    }

    /// The directory holding this release's `containerd`, `ctr` and `containerd-shim-runc-v2`;
    /// `None` for the system's, found on [`SYSTEM_PATH`].
    pub fn bin_dir(self) -> Option<PathBuf> {
        match self {
            Containerd::V1_6 => None,
            other => Some(PathBuf::from(format!("{CONTAINERD_BASE}-{}/usr/bin", other.name()))),
        }
    }
}

const SETUP_HINT: &str = "run `test/setup.sh` as root from the repository root first";

/// Errors from starting a test bed; everything after start panics with diagnostics instead,
/// since callers are tests. `Debug` prints the message, so `.expect()` shows the setup hint.
#[derive(thiserror::Error)]
pub enum Error {
    /// The test bed needs root: containerd, runc, mounts and CRIU all do.
    #[error("the test bed needs root (containerd, runc and CRIU do); running as uid {0}")]
    NotRoot(u32),
    /// Something `test/setup.sh` installs is missing.
    #[error("test bed not set up: {0}; {SETUP_HINT}")]
    NotSetUp(String),
    /// A file-system or process operation failed.
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
    /// containerd exited or did not answer in time; carries the tail of its log.
    #[error("private containerd did not come up: {0}")]
    ContainerdStart(String),
}

impl std::fmt::Debug for Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Display::fmt(self, f)
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Adds a context string to io errors.
pub(crate) trait IoContext<T> {
    fn ctx(self, context: impl FnOnce() -> String) -> Result<T>;
}

impl<T> IoContext<T> for std::io::Result<T> {
    fn ctx(self, context: impl FnOnce() -> String) -> Result<T> {
        self.map_err(|source| Error::Io { context: context(), source })
    }
}

/// Checks that this process can run a test bed: root, and everything `test/setup.sh` provides.
/// `path` is the PATH containerd will get; the binaries must be found there.
pub fn check_preconditions(path: &OsStr) -> Result<()> {
    // SAFETY: geteuid has no preconditions.
    let uid = unsafe { libc::geteuid() };
    if uid != 0 {
        return Err(Error::NotRoot(uid));
    }
    for bin in ["containerd", "ctr", "runc", "containerd-shim-runc-v2"] {
        if find_in_path(bin, path).is_none() {
            return Err(Error::NotSetUp(format!("`{bin}` not found on PATH {}", path.to_string_lossy())));
        }
    }
    for (file, what) in
        [(CRIU, "the CRIU wrapper"), (BUSYBOX, "busybox-static"), (IMAGE_ARCHIVE, "the busybox OCI image archive")]
    {
        if !Path::new(file).exists() {
            return Err(Error::NotSetUp(format!("{what} ({file}) is missing")));
        }
    }
    // On the system PATH, not `path`: a test may prepend its own `criu` wrapper (a fault injector).
    match find_in_path("criu", OsStr::new(SYSTEM_PATH)) {
        Some(p) if p == Path::new(CRIU) => Ok(()),
        other => Err(Error::NotSetUp(format!("`criu` on the system PATH is {other:?}, not the wrapper {CRIU}"))),
    }
}

/// First executable named `bin` in the colon-separated `path`.
pub fn find_in_path(bin: &str, path: &OsStr) -> Option<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    std::env::split_paths(path)
        .map(|dir| dir.join(bin))
        .find(|p| p.metadata().map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0).unwrap_or(false))
}

/// A child's output as text (lossy: tests print it, they do not parse bytes).
pub fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// Polls `f` every 50 ms until it returns a value, panicking after `timeout` with `what`.
///
/// For tests: waits on real containerd, runc and CRIU have no upper bound we could assert, only one
/// generous enough to tell "stuck" from "slow".
pub fn wait_for_within<T>(timeout: std::time::Duration, what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = std::time::Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(std::time::Instant::now() < deadline, "timed out after {timeout:?} waiting for {what}");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

/// Sends SIGTERM to `child` (not yet reaped, so its pid is still ours) and waits up to `timeout`
/// for it to exit, reaping it. Returns false if it is still running: killing it then, and how
/// (the child alone, or its process group), is the caller's choice.
pub fn sigterm_and_wait(child: &mut std::process::Child, timeout: std::time::Duration) -> bool {
    // SAFETY: signalling our own child, which is not reaped yet (so its pid is still ours).
    unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
    let deadline = std::time::Instant::now() + timeout;
    while std::time::Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            return true;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    false
}

/// A name unique in this machine for as long as this process lives: `kbt-<pid>-<n>[-tag]`.
///
/// Use it for namespaces, container ids (runc's cgroup paths are global) and scratch dirs. The
/// `kbt-<pid>-` prefix is what lets a later test process recognise leftovers of a dead one.
pub fn unique_name(tag: &str) -> String {
    static COUNTER: AtomicUsize = AtomicUsize::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let pid = std::process::id();
    if tag.is_empty() {
        format!("kbt-{pid}-{n}")
    } else {
        format!("kbt-{pid}-{n}-{tag}")
    }
}

/// A fresh directory under [`RUN_BASE`], removed on drop (and by the stale sweep if this process
/// is killed). Declare it before any [`Runc`] whose bundle or state lives in it, so that the
/// containers are deleted first.
pub fn scratch_dir() -> Result<tempfile::TempDir> {
    cleanup::sweep_stale_once();
    std::fs::create_dir_all(RUN_BASE).ctx(|| format!("creating {RUN_BASE}"))?;
    tempfile::Builder::new()
        .prefix(&format!("{}-", unique_name("scratch")))
        .tempdir_in(RUN_BASE)
        .ctx(|| format!("creating a scratch dir in {RUN_BASE}"))
}

/// Version of the CRIU that runc will use (via [`CRIU`]), as (major, minor, patch).
pub fn criu_version() -> Result<(u32, u32, u32)> {
    let out = Command::new(CRIU).arg("--version").output().ctx(|| format!("running {CRIU} --version"))?;
    let text = String::from_utf8_lossy(&out.stdout);
    parse_criu_version(&text)
        .ok_or_else(|| Error::NotSetUp(format!("cannot read a version from `criu --version`: {text:?}")))
}

/// Parses `Version: 4.1.1` (patch optional) out of `criu --version`'s output.
fn parse_criu_version(text: &str) -> Option<(u32, u32, u32)> {
    let v = text.lines().find_map(|l| l.trim().strip_prefix("Version:"))?.trim();
    let mut parts = v.split(|c: char| !c.is_ascii_digit()).filter(|s| !s.is_empty());
    let major = parts.next()?.parse().ok()?;
    let minor = parts.next()?.parse().ok()?;
    let patch = parts.next().and_then(|p| p.parse().ok()).unwrap_or(0);
    Some((major, minor, patch))
}

/// Formats a command's output for a panic message.
pub(crate) fn describe_output(what: &str, out: &std::process::Output) -> String {
    format!(
        "{what} failed ({})\n--- stdout ---\n{}\n--- stderr ---\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout).trim_end(),
        String::from_utf8_lossy(&out.stderr).trim_end()
    )
}

/// Last `n` lines of a text file ("" if it cannot be read).
pub(crate) fn file_tail(path: &Path, n: usize) -> String {
    let text = std::fs::read(path).map(|b| String::from_utf8_lossy(&b).into_owned()).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_criu_versions() {
        assert_eq!(parse_criu_version("Version: 4.1.1\n"), Some((4, 1, 1)));
        assert_eq!(parse_criu_version("Version: 3.17\nGitID: v3.17\n"), Some((3, 17, 0)));
        assert_eq!(parse_criu_version("nothing"), None);
    }

    #[test]
    fn unique_names_carry_pid_and_differ() {
        let a = unique_name("");
        let b = unique_name("x");
        assert!(a.starts_with(&format!("kbt-{}-", std::process::id())));
        assert!(b.ends_with("-x"));
        assert_ne!(a, b);
    }

    #[test]
    fn tail_keeps_last_lines() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("log");
        std::fs::write(&f, "1\n2\n3\n").unwrap();
        assert_eq!(file_tail(&f, 2), "2\n3");
        assert_eq!(file_tail(&f, 10), "1\n2\n3");
        assert_eq!(file_tail(&dir.path().join("none"), 3), "");
    }
}
