//! `kybernate doctor`: is this node ready for Kybernate? Each check says ok, warn or fail, what
//! it found, and for warn/fail how to fix it. Exit 0 when no check failed, 1 otherwise.
//!
//! The checks take what they look at (PATH, files, directories) as arguments, so the tests can
//! point them at scratch directories; `doctor` passes the node's real ones.

use std::ffi::OsStr;
use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::time::Duration;

use containerd_client::services::v1::version_client::VersionClient;
use kybernate_checkpoint::verdict::{CgroupMode, Verdict};
use kybernate_checkpoint::{
    find_criu, free_bytes, kernel_release, parse_criu_version, require_criu_version, DirtyTracking, MIN_CRIU,
};
use kybernate_gpu::cuda::CudaDriver;
use serde::Serialize;

use crate::containerd::RUNTIME;
use crate::error::CliError;
use crate::output::Output;
use crate::output::{self, human_size};

/// The binary containerd runs for runtime `io.containerd.kybernate.v1`.
const SHIM: &str = "containerd-shim-kybernate-v1";
/// What a GPU check says on a node without NVIDIA GPUs.
const NO_GPU: &str = "no NVIDIA GPU on this node; not needed";
/// The CRIU release needed on kernels ≥ 6.16 (4.1 cannot dump TCP sockets there).
const CRIU_NEW_KERNEL: (u32, u32) = (4, 2);
/// Free space under which the checkpoint root gets a warning.
const LOW_SPACE: u64 = 1024 * 1024 * 1024;
/// How long containerd may take to answer the Version call.
const CONTAINERD_TIMEOUT: Duration = Duration::from_secs(5);
const CAP_SYS_ADMIN: u32 = 21;
const CAP_CHECKPOINT_RESTORE: u32 = 40;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Ok,
    Warn,
    Fail,
}

impl Status {
    fn as_str(self) -> &'static str {
        match self {
            Status::Ok => "ok",
            Status::Warn => "warn",
            Status::Fail => "fail",
        }
    }
}

/// One check's result: `{"check", "status", "detail", "fix"}` in JSON (`fix` null when ok).
#[derive(Debug, Clone, Serialize)]
pub struct Check {
    pub check: &'static str,
    pub status: Status,
    pub detail: String,
    pub fix: Option<String>,
    /// The `cgroups` check's findings for scripts (`{"mode", "controllers", "missing"}`); absent
    /// from the other checks.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cgroup: Option<CgroupReport>,
}

impl Check {
    fn ok(check: &'static str, detail: impl Into<String>) -> Self {
        Self { check, status: Status::Ok, detail: detail.into(), fix: None, cgroup: None }
    }
    fn warn(check: &'static str, detail: impl Into<String>, fix: impl Into<String>) -> Self {
        Self { check, status: Status::Warn, detail: detail.into(), fix: Some(fix.into()), cgroup: None }
    }
    fn fail(check: &'static str, detail: impl Into<String>, fix: impl Into<String>) -> Self {
        Self { check, status: Status::Fail, detail: detail.into(), fix: Some(fix.into()), cgroup: None }
    }
}

/// Where the node's pieces are; `Node::system` is the real node.
pub struct Node {
    pub path: Option<std::ffi::OsString>,
    pub dev: PathBuf,
    pub nvidia_version: PathBuf,
    pub criu_plugin_dirs: Vec<PathBuf>,
    pub proc_status: PathBuf,
    /// Where the cgroup hierarchy is mounted (`/sys/fs/cgroup`).
    pub cgroup_root: PathBuf,
    /// The mount table naming the v1 hierarchies (`/proc/self/mountinfo`).
    pub mountinfo: PathBuf,
}

impl Node {
    pub fn system() -> Self {
        let mut criu_plugin_dirs = vec![PathBuf::from("/usr/lib/criu"), PathBuf::from("/usr/local/lib/criu")];
        if let Some(dir) = std::env::var_os("CRIU_LIBS_DIR").filter(|d| !d.is_empty()) {
            criu_plugin_dirs.push(PathBuf::from(dir));
        }
        Self {
            path: std::env::var_os("PATH"),
            dev: PathBuf::from("/dev"),
            nvidia_version: PathBuf::from("/proc/driver/nvidia/version"),
            criu_plugin_dirs,
            proc_status: PathBuf::from("/proc/self/status"),
            cgroup_root: PathBuf::from("/sys/fs/cgroup"),
            mountinfo: PathBuf::from("/proc/self/mountinfo"),
        }
    }
}

pub fn doctor(
    out: Output,
    address: &Path,
    containerd_config: &Path,
    checkpoint_root: &Path,
    libcuda: &str,
    checkpoint: Option<(String, Result<Verdict, CliError>)>,
) -> Result<ExitCode, CliError> {
    let node = Node::system();
    let mut checks = run_checks(&node, address, containerd_config, checkpoint_root);
    // After the CUDA plugin's checks: whether the driver API can stand in for them.
    let at = checks.iter().position(|c| c.check == "cuda-checkpoint").map_or(checks.len(), |i| i + 1);
    let plugin_ready = checks
        .iter()
        .filter(|c| c.check == "criu cuda plugin" || c.check == "cuda-checkpoint")
        .all(|c| c.status == Status::Ok);
    let gpus = !nvidia_gpus(&node.dev).is_empty();
    checks.insert(at, cuda_driver_api(gpus, plugin_ready, || kybernate_gpu::cuda::LibCuda::load(libcuda.as_ref())));
    if let Some((id, verdict)) = checkpoint {
        checks.push(restore_verdict(&id, verdict));
    }
    match out {
        Output::Json => output::json(&checks)?,
        Output::Table => output::write(&table(&checks))?,
    }
    let failed = checks.iter().any(|c| c.status == Status::Fail);
    Ok(if failed { ExitCode::from(crate::error::FAILED) } else { ExitCode::SUCCESS })
}

/// Every check, in the order they are printed.
pub fn run_checks(node: &Node, address: &Path, containerd_config: &Path, root: &Path) -> Vec<Check> {
    let path = node.path.as_deref();
    let gpus = nvidia_gpus(&node.dev);
    let (containerd_check, containerd_version) = containerd(address);
    vec![
        containerd_check,
        shim_on_path(path),
        shim_registered(containerd_config, containerd_version.as_deref()),
        runc(path),
        nvidia_runtime(path, !gpus.is_empty()),
        criu(path),
        pre_dump(path),
        iptables_restore(path),
        gpu_devices(&gpus),
        gpu_driver(&node.nvidia_version, !gpus.is_empty()),
        cuda_plugin(&node.criu_plugin_dirs, !gpus.is_empty()),
        cuda_checkpoint(path, !gpus.is_empty()),
        capabilities(&node.proc_status),
        cgroups(&node.cgroup_root, &node.mountinfo),
        checkpoint_root(root),
    ]
}

/// `STATUS  CHECK  DETAIL`, each fix on an indented line below, then a count.
fn table(checks: &[Check]) -> String {
    let width = checks.iter().map(|c| c.check.len()).max().unwrap_or(0);
    let mut text = String::new();
    for c in checks {
        text.push_str(&format!("{:<4}  {:<width$}  {}\n", c.status.as_str(), c.check, c.detail));
        if let Some(fix) = &c.fix {
            text.push_str(&format!("{:<4}  {:<width$}  fix: {fix}\n", "", ""));
        }
    }
    let count = |s| checks.iter().filter(|c| c.status == s).count();
    text.push_str(&format!("{} ok, {} warn, {} fail\n", count(Status::Ok), count(Status::Warn), count(Status::Fail)));
    text
}

/// containerd answers the Version call at `address`.
/// The containerd check, and containerd's version when it answered (for the registration check).
pub fn containerd(address: &Path) -> (Check, Option<String>) {
    const NAME: &str = "containerd";
    let fix = format!("start containerd (systemctl start containerd) / check --address (now {})", address.display());
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            return (
                Check::fail(NAME, format!("cannot start the async runtime: {e}"), "please report this as a bug"),
                None,
            )
        }
    };
    let result = runtime.block_on(async {
        tokio::time::timeout(CONTAINERD_TIMEOUT, async {
            let channel = containerd_client::connect(address).await.map_err(|e| crate::containerd::chain(&e))?;
            let v = VersionClient::new(channel).version(()).await.map_err(|s| s.message().to_string())?;
            Ok::<_, String>(v.into_inner())
        })
        .await
        .unwrap_or_else(|_| Err(format!("no answer within {CONTAINERD_TIMEOUT:?}")))
    });
    match result {
        Ok(v) => (
            Check::ok(NAME, format!("containerd {} (revision {}) at {}", v.version, v.revision, address.display())),
            Some(v.version),
        ),
        Err(e) => (Check::fail(NAME, format!("cannot reach containerd at {}: {e}", address.display()), fix), None),
    }
}

/// `bin` in the absolute directories of `path_env`, if there and executable.
pub fn find_in_path(bin: &str, path_env: Option<&OsStr>) -> Option<PathBuf> {
    path_env
        .into_iter()
        .flat_map(std::env::split_paths)
        .filter(|d| d.is_absolute())
        .map(|d| d.join(bin))
        .find(|p| fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0))
}

/// The first line of `bin --version` (stdout, else stderr).
fn version_line(bin: &Path) -> Result<String, String> {
    let out = Command::new(bin).arg("--version").output().map_err(|e| e.to_string())?;
    let text = String::from_utf8_lossy(&out.stdout);
    let text = if text.trim().is_empty() { String::from_utf8_lossy(&out.stderr) } else { text };
    text.lines().map(str::trim).find(|l| !l.is_empty()).map(String::from).ok_or_else(|| "no output".into())
}

pub fn shim_on_path(path_env: Option<&OsStr>) -> Check {
    const NAME: &str = "shim";
    match find_in_path(SHIM, path_env) {
        Some(p) => Check::ok(NAME, format!("{SHIM} at {}", p.display())),
        None => Check::warn(
            NAME,
            format!("{SHIM} not on PATH"),
            format!("install {SHIM} into a directory on containerd's PATH, e.g. /usr/local/bin (containerd finds runtime {RUNTIME} by PATH); see docs/installation.md"),
        ),
    }
}

/// Our runtime registered in containerd's CRI config (either style of docs/installation.md).
/// `containerd_version`: what containerd said (e.g. "1.6.20~ds1"), when it answered.
pub fn shim_registered(config: &Path, containerd_version: Option<&str>) -> Check {
    const NAME: &str = "cri runtime";
    let fix = format!(
        "register the runtime in {} under [plugins.\"io.containerd.grpc.v1.cri\".containerd.runtimes.kybernate] with runtime_type = \"{RUNTIME}\" (see docs/installation.md) and restart containerd; needed for Kubernetes; ctr works without",
        config.display()
    );
    let text = match fs::read_to_string(config) {
        Ok(t) => t,
        Err(e) => return Check::warn(NAME, format!("{}: cannot read: {e}", config.display()), fix),
    };
    match registered_runtimes(&text) {
        Err(e) => Check::warn(NAME, format!("{}: not valid TOML: {e}", config.display()), fix),
        Ok(found) if found.is_empty() => {
            Check::warn(NAME, format!("no CRI runtime in {} uses {SHIM}", config.display()), fix)
        }
        Ok(found) => {
            let names: Vec<&str> = found.iter().map(|(n, _)| n.as_str()).collect();
            let detail = format!("registered in {} as {}", config.display(), names.join(", "));
            // containerd 1.6's CRI ignores runtime_path and runs the stock runc shim (measured).
            let old = containerd_version.and_then(major_minor).is_some_and(|v| v < (1, 7));
            let by_path: Vec<&str> = found.iter().filter(|(_, by_path)| *by_path).map(|(n, _)| n.as_str()).collect();
            if old && !by_path.is_empty() {
                Check::warn(
                    NAME,
                    format!(
                        "{detail}; but {} only by runtime_path, which containerd {} ignores: those pods run containerd-shim-runc-v2",
                        by_path.join(", "),
                        containerd_version.unwrap_or_default()
                    ),
                    fix,
                )
            } else {
                Check::ok(NAME, detail)
            }
        }
    }
}

/// `(major, minor)` of a version such as "1.6.20~ds1" or "v2.0.0".
fn major_minor(version: &str) -> Option<(u32, u32)> {
    let mut parts = version.trim_start_matches('v').split(|c: char| !c.is_ascii_digit());
    Some((parts.next()?.parse().ok()?, parts.next()?.parse().ok()?))
}

/// The CRI runtimes in containerd's config that run our shim, each with whether only its
/// `runtime_path` (not `runtime_type = "io.containerd.kybernate.v1"`) names our shim. Config
/// version 2 (containerd 1.x) keeps them under `io.containerd.grpc.v1.cri`, version 3
/// (containerd 2.x) under `io.containerd.cri.v1.runtime`.
pub fn registered_runtimes(config_toml: &str) -> Result<Vec<(String, bool)>, String> {
    let value: toml::Table = config_toml.parse().map_err(|e: toml::de::Error| e.message().to_string())?;
    let mut found = Vec::new();
    for plugin in ["io.containerd.grpc.v1.cri", "io.containerd.cri.v1.runtime"] {
        let runtimes = value
            .get("plugins")
            .and_then(|p| p.get(plugin))
            .and_then(|c| c.get("containerd"))
            .and_then(|c| c.get("runtimes"))
            .and_then(|r| r.as_table());
        for (name, r) in runtimes.into_iter().flatten() {
            let typed = r.get("runtime_type").and_then(|v| v.as_str()) == Some(RUNTIME);
            let path = r.get("runtime_path").and_then(|v| v.as_str());
            let by_path = path.is_some_and(|p| Path::new(p).file_name() == Some(OsStr::new(SHIM)));
            if typed || by_path {
                found.push((name.clone(), !typed));
            }
        }
    }
    Ok(found)
}

pub fn runc(path_env: Option<&OsStr>) -> Check {
    const NAME: &str = "runc";
    let fix = "install runc (≥ 1.2 recommended) on containerd's PATH, e.g. apt-get install runc";
    match find_in_path("runc", path_env) {
        None => Check::fail(NAME, "runc not on PATH", fix),
        Some(p) => match version_line(&p) {
            Ok(v) => Check::ok(NAME, format!("{v} at {}", p.display())),
            Err(e) => Check::fail(NAME, format!("{}: `runc --version` failed: {e}", p.display()), fix),
        },
    }
}

pub fn nvidia_runtime(path_env: Option<&OsStr>, gpus: bool) -> Check {
    const NAME: &str = "nvidia runtime";
    match find_in_path("nvidia-container-runtime", path_env) {
        Some(p) => match version_line(&p) {
            Ok(v) => Check::ok(NAME, format!("{v} at {}", p.display())),
            Err(e) => Check::warn(
                NAME,
                format!("{}: `nvidia-container-runtime --version` failed: {e}", p.display()),
                "reinstall the NVIDIA Container Toolkit",
            ),
        },
        None if !gpus => Check::ok(NAME, "nvidia-container-runtime not installed (needed only for GPU containers)"),
        None => Check::warn(
            NAME,
            "this node has NVIDIA GPUs but nvidia-container-runtime is not on PATH",
            "install the NVIDIA Container Toolkit (nvidia-container-runtime) for GPU containers",
        ),
    }
}

/// `major.minor` of a kernel release such as "6.16.3-amd64".
fn kernel_version(release: &str) -> Option<(u32, u32)> {
    let mut parts = release.split(|c: char| !c.is_ascii_digit());
    Some((parts.next()?.parse().ok()?, parts.next()?.parse().ok()?))
}

/// CRIU found like runc finds it, new enough, and `criu check` happy.
pub fn criu(path_env: Option<&OsStr>) -> Check {
    criu_for_kernel(path_env, &kernel_release())
}

fn criu_for_kernel(path_env: Option<&OsStr>, kernel: &str) -> Check {
    const NAME: &str = "criu";
    let new_kernel = kernel_version(kernel).is_some_and(|k| k >= (6, 16));
    let min = if new_kernel { format!("{}.{}", CRIU_NEW_KERNEL.0, CRIU_NEW_KERNEL.1) } else { MIN_CRIU.to_string() };
    let install = format!(
        "install CRIU ≥ {MIN_CRIU} (≥ 4.2 on kernels ≥ 6.16; this is {kernel}) on containerd's PATH, or name it with the runc option CriuPath"
    );
    let criu = match find_criu(None, path_env) {
        Ok(p) => p,
        Err(e) => return Check::fail(NAME, e.to_string(), install),
    };
    let version = match Command::new(&criu).arg("--version").output() {
        Ok(o) => parse_criu_version(&String::from_utf8_lossy(&o.stdout)),
        Err(e) => return Check::fail(NAME, format!("{}: cannot run: {e}", criu.display()), install),
    };
    let version = match version {
        Ok(v) => v,
        Err(e) => return Check::fail(NAME, format!("{}: {e}", criu.display()), install),
    };
    if let Err(e) = require_criu_version(version) {
        return Check::fail(NAME, format!("{}: {e}", criu.display()), install);
    }
    let found = format!("criu {version} at {}", criu.display());
    let check = Command::new(&criu).arg("check").output();
    let looks_good = match &check {
        Ok(o) => {
            let all = format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));
            if all.contains("Looks good") {
                None
            } else {
                Some(all.lines().rev().find(|l| !l.trim().is_empty()).unwrap_or("no output").trim().to_string())
            }
        }
        Err(e) => Some(format!("cannot run: {e}")),
    };
    if let Some(why) = looks_good {
        return Check::fail(
            NAME,
            format!("{found}: `criu check` failed: {why}"),
            format!(
                "run `{} check` to see what the kernel lacks; use a kernel with CRIU support or {install}",
                criu.display()
            ),
        );
    }
    if new_kernel && (version.major, version.minor) < CRIU_NEW_KERNEL {
        return Check::warn(
            NAME,
            format!("{found}; `criu check`: looks good, but kernel {kernel} needs CRIU ≥ {min} to dump TCP sockets"),
            install,
        );
    }
    Check::ok(NAME, format!("{found}; `criu check`: looks good"))
}

/// Whether checkpoints can pre-dump here: CRIU's memory dirty tracking needs the kernel's
/// soft-dirty bits. Optional, so its absence is a warning: checkpoints work without it.
pub fn pre_dump(path_env: Option<&OsStr>) -> Check {
    const NAME: &str = "pre-dump";
    let Ok(criu) = find_criu(None, path_env) else {
        return Check::warn(NAME, "unknown: no CRIU found (see the criu check)", "install CRIU, then run doctor again");
    };
    let without = "checkpoints work without pre-dump (--pre-dump 0, [checkpoint] pre_dump_rounds = 0); for pre-dump, \
                   run on a kernel built with CONFIG_MEM_SOFT_DIRTY=y (most distribution kernels are)";
    match kybernate_checkpoint::probe_dirty_tracking(&criu, kybernate_checkpoint::predump::PROBE_TIMEOUT) {
        DirtyTracking::Available => {
            Check::ok(NAME, "available: CRIU tracks memory changes on this kernel (soft-dirty bits)")
        }
        DirtyTracking::Off { criu_says } => Check::warn(
            NAME,
            format!(
                "not available: this kernel has no soft-dirty bits (CONFIG_MEM_SOFT_DIRTY), so CRIU cannot track \
                 memory changes (`criu check --feature mem_dirty_track`: {criu_says}); pre-dump requests are refused"
            ),
            without,
        ),
        DirtyTracking::Unknown { reason } => {
            Check::warn(NAME, format!("unknown: {reason}; pre-dump requests are refused"), without)
        }
    }
}

pub fn iptables_restore(path_env: Option<&OsStr>) -> Check {
    const NAME: &str = "iptables-restore";
    match find_in_path("iptables-restore", path_env) {
        Some(p) => Check::ok(NAME, format!("{} (CRIU locks the container's network with it)", p.display())),
        None => Check::fail(
            NAME,
            "iptables-restore not on PATH (CRIU locks the container's network with it)",
            "install iptables, e.g. apt-get install iptables",
        ),
    }
}

/// `/dev/nvidia0`, `/dev/nvidia1`, ...: the node's NVIDIA GPUs.
pub fn nvidia_gpus(dev: &Path) -> Vec<PathBuf> {
    let mut gpus: Vec<PathBuf> = fs::read_dir(dev)
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| {
            let name = e.file_name();
            let name = name.to_string_lossy();
            name.strip_prefix("nvidia").is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
        })
        .map(|e| e.path())
        .collect();
    gpus.sort();
    gpus
}

pub fn gpu_devices(gpus: &[PathBuf]) -> Check {
    const NAME: &str = "gpu";
    if gpus.is_empty() {
        return Check::ok(NAME, NO_GPU);
    }
    let names: Vec<String> = gpus.iter().map(|g| g.display().to_string()).collect();
    Check::ok(NAME, format!("{} NVIDIA GPU(s): {}", gpus.len(), names.join(", ")))
}

pub fn gpu_driver(version_file: &Path, gpus: bool) -> Check {
    const NAME: &str = "gpu driver";
    if !gpus {
        return Check::ok(NAME, NO_GPU);
    }
    let fix = "install the NVIDIA driver (≥ 570 for CUDA checkpoints) and load its kernel module";
    let min = kybernate_gpu::cuda::preflight::MIN_DRIVER_MAJOR;
    match fs::read_to_string(version_file) {
        Ok(text) => match kybernate_gpu::inventory::parse_driver_version(&text) {
            Some(v) if kybernate_gpu::inventory::driver_major(&v).is_some_and(|m| m >= min) => {
                Check::ok(NAME, format!("NVIDIA driver {v}"))
            }
            Some(v) => Check::warn(NAME, format!("NVIDIA driver {v}: CUDA checkpoints need ≥ {min}"), fix),
            None => Check::warn(NAME, format!("{}: no driver version in it", version_file.display()), fix),
        },
        Err(e) => Check::fail(NAME, format!("{}: {e}", version_file.display()), fix),
    }
}

/// `[checkpoint] cuda = driver-api` (and `auto` without the plugin): libcuda with the checkpoint API.
/// A failure only fails the node when CRIU's plugin path is not ready either.
pub fn cuda_driver_api<D: CudaDriver, E: std::fmt::Display>(
    gpus: bool,
    plugin_ready: bool,
    load: impl FnOnce() -> Result<D, E>,
) -> Check {
    const NAME: &str = "cuda driver api";
    if !gpus {
        return Check::ok(NAME, NO_GPU);
    }
    let fix = "install the NVIDIA driver ≥ 570 (libcuda.so.1 with cuCheckpointProcess*), or name it with [checkpoint] libcuda";
    match load() {
        Ok(d) => match d.driver_version() {
            Ok(v) => Check::ok(NAME, format!("checkpoint API present (CUDA {}.{})", v / 1000, (v % 1000) / 10)),
            Err(e) => Check::warn(NAME, format!("checkpoint API present, but cuDriverGetVersion failed: {e}"), fix),
        },
        Err(e) if plugin_ready => Check::warn(NAME, format!("{e} (CRIU's CUDA plugin can do the work)"), fix),
        Err(e) => Check::fail(
            NAME,
            format!("{e}; nor is CRIU's CUDA plugin ready: GPU containers cannot be checkpointed"),
            fix,
        ),
    }
}

pub fn cuda_plugin(dirs: &[PathBuf], gpus: bool) -> Check {
    const NAME: &str = "criu cuda plugin";
    if !gpus {
        return Check::ok(NAME, NO_GPU);
    }
    match dirs.iter().map(|d| d.join("cuda_plugin.so")).find(|p| p.is_file()) {
        Some(p) => Check::ok(NAME, p.display().to_string()),
        None => {
            let searched: Vec<String> = dirs.iter().map(|d| d.display().to_string()).collect();
            Check::warn(
                NAME,
                format!("cuda_plugin.so not found in {}", searched.join(", ")),
                "for [checkpoint] cuda = \"criu-plugin\": install CRIU's CUDA plugin (cuda_plugin.so in /usr/lib/criu, or set $CRIU_LIBS_DIR); auto and driver-api use the driver API instead",
            )
        }
    }
}

pub fn cuda_checkpoint(path_env: Option<&OsStr>, gpus: bool) -> Check {
    const NAME: &str = "cuda-checkpoint";
    if !gpus {
        return Check::ok(NAME, NO_GPU);
    }
    match find_in_path("cuda-checkpoint", path_env) {
        Some(p) => Check::ok(NAME, p.display().to_string()),
        None => Check::warn(
            NAME,
            "cuda-checkpoint not on PATH",
            "for CRIU's CUDA plugin: install NVIDIA's cuda-checkpoint, or link ours: ln -s /usr/local/bin/kybernate /usr/local/bin/cuda-checkpoint",
        ),
    }
}

/// The effective capability set from `/proc/self/status` (`CapEff:` in hex).
fn cap_eff(status: &str) -> Option<u64> {
    let hex = status.lines().find_map(|l| l.strip_prefix("CapEff:"))?;
    u64::from_str_radix(hex.trim(), 16).ok()
}

pub fn capabilities(proc_status: &Path) -> Check {
    const NAME: &str = "capabilities";
    let caps = match fs::read_to_string(proc_status).ok().as_deref().and_then(cap_eff) {
        Some(c) => c,
        None => return Check::warn(NAME, format!("cannot read CapEff from {}", proc_status.display()), "run as root"),
    };
    let has = |bit: u32| caps & (1u64 << bit) != 0;
    let cr = if has(CAP_CHECKPOINT_RESTORE) { "present" } else { "absent" };
    let detail = format!(
        "CapEff {caps:#x}: CAP_SYS_ADMIN {}, CAP_CHECKPOINT_RESTORE {cr}",
        if has(CAP_SYS_ADMIN) { "present" } else { "absent" }
    );
    if has(CAP_SYS_ADMIN) {
        Check::ok(NAME, detail)
    } else {
        Check::fail(NAME, detail, "run as root (CRIU and the checkpoint store need CAP_SYS_ADMIN)")
    }
}

/// The cgroups check's findings, in the JSON output.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CgroupReport {
    /// `v1`, `v2` (unified) or `hybrid` (v1 controllers, cgroup2 at `unified/`); null when
    /// nothing is mounted at the cgroup root.
    pub mode: Option<CgroupMode>,
    /// The controllers containers get: v2's root `cgroup.controllers`, or the mounted v1 ones.
    pub controllers: Vec<String>,
    /// Of the controllers a feature needs ([`V2_NEEDED`], [`V1_NEEDED`]), those missing.
    pub missing: Vec<String>,
}

/// cgroup v2 controllers a feature of ours (or of Kubernetes) needs, with what. Devices need
/// none on v2 (runc attaches an eBPF program), nor does the freezer (`cgroup.freeze`, core).
pub const V2_NEEDED: [(&str, &str); 4] = [
    ("memory", "OOM events (memory.events, TaskOOM), memory statistics and limits"),
    ("cpu", "CPU shares and quotas: Kubernetes sets cpu.weight on every container, which fails without it"),
    ("pids", "pids limits and statistics"),
    ("io", "io statistics and limits"),
];

/// cgroup v1 controllers a feature needs, with what.
pub const V1_NEEDED: [(&str, &str); 6] = [
    ("memory", "OOM events, memory statistics and limits"),
    ("cpu", "CPU shares and quotas"),
    ("cpuacct", "CPU statistics"),
    ("pids", "pids limits and statistics"),
    ("freezer", "pause and the checkpoint's freeze"),
    ("devices", "device access rules (GPU devices after a restore)"),
];

/// The v1 controllers the kernel knows, to tell them from other super options in mountinfo.
const V1_CONTROLLERS: [&str; 14] = [
    "cpu",
    "cpuacct",
    "cpuset",
    "memory",
    "devices",
    "freezer",
    "net_cls",
    "net_prio",
    "blkio",
    "perf_event",
    "hugetlb",
    "pids",
    "rdma",
    "misc",
];

/// The node's cgroup mode (v1, hybrid, unified v2) and whether the controllers our features
/// need are there: on v2 the root's `cgroup.controllers` (a controller bound to v1 is missing
/// from it, and so from every container's cgroup), on v1 and hybrid the mounted v1 hierarchies.
pub fn cgroups(root: &Path, mountinfo: &Path) -> Check {
    let mode = kybernate_checkpoint::verdict::cgroup_mode(root);
    let unified = match mode {
        Some(CgroupMode::V2) => Some(root.to_path_buf()),
        Some(CgroupMode::Hybrid) => Some(root.join("unified")),
        _ => None,
    };
    let v2_controllers = unified.map(|dir| fs::read_to_string(dir.join("cgroup.controllers")).unwrap_or_default());
    let mounts = fs::read_to_string(mountinfo).unwrap_or_default();
    cgroup_check(root, mode, v2_controllers.as_deref(), &mounts, &kernel_release())
}

/// [`cgroups`] from what it read: `v2_controllers` is the unified root's `cgroup.controllers`
/// (v2 and hybrid), `mountinfo` names the v1 hierarchies, `kernel` the release (v2's freezer
/// needs 5.2).
pub fn cgroup_check(
    root: &Path,
    mode: Option<CgroupMode>,
    v2_controllers: Option<&str>,
    mountinfo: &str,
    kernel: &str,
) -> Check {
    const NAME: &str = "cgroups";
    let words = |s: Option<&str>| s.unwrap_or_default().split_whitespace().map(String::from).collect::<Vec<_>>();
    let v1_mounted = || -> Vec<String> {
        let mut found: Vec<String> = kybernate_gpu::devices::parse_mountinfo(mountinfo)
            .into_iter()
            .filter(|m| m.fs_type == "cgroup")
            .flat_map(|m| m.super_options)
            .filter(|o| V1_CONTROLLERS.contains(&o.as_str()))
            .collect();
        found.sort();
        found.dedup();
        found
    };
    let Some(mode) = mode else {
        let mut check = Check::warn(
            NAME,
            format!("no cgroup filesystem mounted at {}", root.display()),
            "mount cgroup2 at /sys/fs/cgroup (systemd does it at boot); runc cannot run containers without cgroups",
        );
        check.cgroup = Some(CgroupReport { mode: None, controllers: Vec::new(), missing: Vec::new() });
        return check;
    };
    let (controllers, needed): (Vec<String>, &[(&str, &str)]) = match mode {
        CgroupMode::V2 => (words(v2_controllers), &V2_NEEDED),
        CgroupMode::V1 | CgroupMode::Hybrid => (v1_mounted(), &V1_NEEDED),
    };
    let missing: Vec<(&str, &str)> =
        needed.iter().copied().filter(|(c, _)| !controllers.iter().any(|have| have == c)).collect();
    let shown = if controllers.is_empty() { "none".to_string() } else { controllers.join(" ") };
    let mut detail = match mode {
        CgroupMode::V2 => format!(
            "cgroup v2 (unified) at {}; controllers: {shown}; device access through eBPF (runc), freezer cgroup.freeze",
            root.display()
        ),
        CgroupMode::Hybrid => format!(
            "cgroup hybrid: v1 controllers mounted: {shown}; cgroup2 at {}/unified (controllers: {}), whose controllers runc does not use in hybrid mode",
            root.display(),
            v2_controllers.map(str::trim).filter(|c| !c.is_empty()).unwrap_or("none")
        ),
        CgroupMode::V1 => format!("cgroup v1; controllers mounted: {shown}"),
    };
    let old_kernel = mode == CgroupMode::V2 && kernel_version(kernel).is_some_and(|v| v < (5, 2));
    if old_kernel {
        detail.push_str(&format!(
            "; kernel {kernel} has no cgroup.freeze (5.2+): pause and the checkpoint's freeze fail"
        ));
    }
    let report = CgroupReport {
        mode: Some(mode),
        controllers: controllers.clone(),
        missing: missing.iter().map(|(c, _)| c.to_string()).collect(),
    };
    let mut check = if missing.is_empty() && !old_kernel {
        Check::ok(NAME, detail)
    } else {
        if !missing.is_empty() {
            let list: Vec<String> = missing.iter().map(|(c, why)| format!("{c} ({why})")).collect();
            detail.push_str(&format!("; missing: {}", list.join(", ")));
        }
        let fix = match mode {
            CgroupMode::V2 => "a controller missing from the cgroup2 root is bound to a cgroup v1 hierarchy or not built into the kernel: boot with systemd.unified_cgroup_hierarchy=1 (and without cgroup_no_v1 exceptions), see /proc/cgroups; without it those features are off (docs/installation.md)",
            _ => "mount the missing v1 controllers under /sys/fs/cgroup (systemd does at boot), or boot the node on cgroup v2 (systemd.unified_cgroup_hierarchy=1); see docs/installation.md",
        };
        let fix = if old_kernel && missing.is_empty() {
            "upgrade the kernel to 5.2 or later for cgroup v2's freezer"
        } else {
            fix
        };
        Check::warn(NAME, detail, fix)
    };
    check.cgroup = Some(report);
    check
}

/// `--checkpoint`: the restore verdict of that checkpoint on this node (`kybernate inspect
/// --compat`): fail on a hard mismatch, warn on soft differences, each named with both sides.
pub fn restore_verdict(id: &str, verdict: Result<Verdict, CliError>) -> Check {
    const NAME: &str = "restore verdict";
    let verdict = match verdict {
        Ok(v) => v,
        Err(e) => {
            return Check::fail(NAME, format!("checkpoint {id}: {e}"), "see `kybernate inspect` for the checkpoint")
        }
    };
    let all = |ds: &[kybernate_checkpoint::verdict::Difference]| {
        ds.iter().map(ToString::to_string).collect::<Vec<_>>().join("; ")
    };
    let summary = output::verdict_line(&verdict);
    if !verdict.compatible() {
        let mut detail = format!("checkpoint {id}: {summary}: {}", all(&verdict.mismatches));
        if !verdict.warnings.is_empty() {
            detail.push_str(&format!("; warnings: {}", all(&verdict.warnings)));
        }
        return Check::fail(
            NAME,
            detail,
            "restore it on a node (and into a container) that has what it needs, or fix this node;              `kybernate inspect --compat` lists each side",
        );
    }
    if !verdict.warnings.is_empty() {
        return Check::warn(
            NAME,
            format!("checkpoint {id}: {summary}: {}", all(&verdict.warnings)),
            "nothing needs fixing to restore it; the warnings say what differs from where it was taken",
        );
    }
    Check::ok(NAME, format!("checkpoint {id}: {summary}"))
}

/// The checkpoint root: private (root, 0700) and with room; or where it will be created.
pub fn checkpoint_root(root: &Path) -> Check {
    const NAME: &str = "checkpoint root";
    let space = |dir: &Path| free_bytes(dir).map_err(|e| e.to_string());
    match fs::metadata(root) {
        Ok(m) if !m.is_dir() => Check::fail(
            NAME,
            format!("{} exists but is not a directory", root.display()),
            "remove it, or name another [checkpoint] root in the Kybernate config",
        ),
        Ok(m) => {
            let free = match space(root) {
                Ok(f) => f,
                Err(e) => return Check::warn(NAME, format!("{}: {e}", root.display()), "check the directory"),
            };
            let mode = m.permissions().mode() & 0o7777;
            let detail =
                format!("{} (owner uid {}, mode {mode:04o}), {} free", root.display(), m.uid(), human_size(free));
            if m.uid() != 0 || mode != 0o700 {
                Check::warn(
                    NAME,
                    detail,
                    format!("checkpoints hold process memory: chown root:root {0} && chmod 700 {0}", root.display()),
                )
            } else if free < LOW_SPACE {
                Check::warn(NAME, detail, "free space under the checkpoint root (a checkpoint needs about the container's memory), or name another [checkpoint] root")
            } else {
                Check::ok(NAME, detail)
            }
        }
        Err(_) => {
            let parent = root.ancestors().skip(1).find(|p| p.is_dir());
            let Some(parent) = parent else {
                return Check::warn(
                    NAME,
                    format!("{} does not exist, nor any parent", root.display()),
                    "name an absolute [checkpoint] root",
                );
            };
            match space(parent) {
                Ok(free) => {
                    let detail = format!(
                        "{} does not exist yet: created on first checkpoint; {} free in {}",
                        root.display(),
                        human_size(free),
                        parent.display()
                    );
                    if free < LOW_SPACE {
                        Check::warn(
                            NAME,
                            detail,
                            format!("free space in {}, or name another [checkpoint] root", parent.display()),
                        )
                    } else {
                        Check::ok(NAME, detail)
                    }
                }
                Err(e) => Check::warn(NAME, format!("{}: {e}", parent.display()), "check the directory"),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::OpenOptionsExt;

    fn exe(dir: &Path, name: &str, script: &str) {
        let p = dir.join(name);
        fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o755).open(&p).unwrap();
        fs::write(&p, format!("#!/bin/sh\n{script}\n")).unwrap();
    }

    #[test]
    fn registration_in_either_style() {
        let typed = r#"
[plugins."io.containerd.grpc.v1.cri".containerd.runtimes.kybernate]
  runtime_type = "io.containerd.kybernate.v1"
[plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
  runtime_type = "io.containerd.runc.v2"
"#;
        assert_eq!(registered_runtimes(typed).unwrap(), [("kybernate".to_string(), false)]);
        let path = r#"
version = 2
[plugins."io.containerd.grpc.v1.cri".containerd.runtimes.kybernate-runc]
  runtime_type = "io.containerd.runc.v2"
  runtime_path = "/usr/local/bin/containerd-shim-kybernate-v1"
"#;
        assert_eq!(registered_runtimes(path).unwrap(), [("kybernate-runc".to_string(), true)]);
        assert!(registered_runtimes("version = 2\n[plugins.x]\na = 1\n").unwrap().is_empty());
        assert!(registered_runtimes("[[[").is_err());
        // containerd 2.x (config version 3).
        let v3 = r#"
version = 3
[plugins."io.containerd.cri.v1.runtime".containerd.runtimes.kybernate]
  runtime_type = "io.containerd.kybernate.v1"
"#;
        assert_eq!(registered_runtimes(v3).unwrap(), [("kybernate".to_string(), false)]);

        // containerd 1.6 ignores runtime_path: registered that way only, the check warns there.
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("config.toml");
        fs::write(&file, path).unwrap();
        let c = shim_registered(&file, Some("1.6.20~ds1"));
        assert!(c.status == Status::Warn && c.detail.contains("containerd 1.6.20~ds1 ignores"), "{c:?}");
        assert_eq!(shim_registered(&file, Some("v1.7.13")).status, Status::Ok);
        assert_eq!(shim_registered(&file, None).status, Status::Ok);
        fs::write(&file, typed).unwrap();
        assert_eq!(shim_registered(&file, Some("1.6.20")).status, Status::Ok);
    }

    #[test]
    fn binaries_on_path() {
        let dir = tempfile::tempdir().unwrap();
        exe(dir.path(), "runc", "echo 'runc version 1.2.5'; echo 'commit: x'");
        exe(dir.path(), "criu", "echo 'Version: 3.17'");
        let path = dir.path().as_os_str();
        let r = runc(Some(path));
        assert_eq!(r.status, Status::Ok, "{r:?}");
        assert!(r.detail.starts_with("runc version 1.2.5 at "), "{r:?}");
        assert_eq!(runc(Some(OsStr::new("/nonexistent"))).status, Status::Fail);
        assert_eq!(iptables_restore(Some(OsStr::new("/nonexistent"))).status, Status::Fail);
        assert_eq!(shim_on_path(Some(OsStr::new("/nonexistent"))).status, Status::Warn);

        let old = criu_for_kernel(Some(path), "6.1.0");
        assert_eq!(old.status, Status::Fail, "{old:?}");
        assert!(old.detail.contains("too old"), "{old:?}");
        let missing = criu_for_kernel(Some(OsStr::new("/nonexistent")), "6.17.1");
        assert_eq!(missing.status, Status::Fail);
        assert!(missing.fix.as_deref().unwrap().contains("install CRIU"), "{missing:?}");

        exe(dir.path(), "criu", "[ \"$1\" = check ] && echo 'Looks good.' || echo 'Version: 4.1'");
        assert_eq!(criu_for_kernel(Some(path), "6.12.0").status, Status::Ok);
        assert_eq!(criu_for_kernel(Some(path), "6.16.2-amd64").status, Status::Warn);
        exe(
            dir.path(),
            "criu",
            "[ \"$1\" = check ] && { echo 'Error: no userfaultfd' >&2; exit 1; } || echo 'Version: 4.2'",
        );
        let bad = criu_for_kernel(Some(path), "6.12.0");
        assert_eq!(bad.status, Status::Fail);
        assert!(bad.detail.contains("no userfaultfd"), "{bad:?}");
    }

    #[test]
    fn pre_dump_is_reported_both_ways() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().as_os_str();
        exe(dir.path(), "criu", "echo 'mem_dirty_track is supported'");
        let yes = pre_dump(Some(path));
        assert_eq!(yes.status, Status::Ok, "{yes:?}");
        assert!(yes.detail.starts_with("available"), "{yes:?}");
        exe(
            dir.path(),
            "criu",
            "echo 'Warn  (criu/cr-check.c:824): Dirty tracking is OFF. Memory snapshot will not work.' >&2; exit 1",
        );
        let no = pre_dump(Some(path));
        assert_eq!(no.status, Status::Warn, "{no:?}");
        assert!(no.detail.contains("CONFIG_MEM_SOFT_DIRTY") && no.detail.contains("Dirty tracking is OFF"), "{no:?}");
        assert!(no.fix.as_deref().unwrap().contains("--pre-dump 0"), "{no:?}");
        assert_eq!(pre_dump(Some(OsStr::new("/nonexistent"))).status, Status::Warn);
    }

    #[test]
    fn gpu_checks_without_and_with_gpus() {
        let dev = tempfile::tempdir().unwrap();
        fs::write(dev.path().join("nvidiactl"), "").unwrap();
        assert!(nvidia_gpus(dev.path()).is_empty());
        for c in [
            gpu_devices(&[]),
            gpu_driver(Path::new("/nonexistent"), false),
            cuda_plugin(&[], false),
            cuda_checkpoint(None, false),
        ] {
            assert_eq!((c.status, c.detail.as_str()), (Status::Ok, NO_GPU), "{c:?}");
        }
        assert_eq!(nvidia_runtime(None, false).status, Status::Ok);
        assert_eq!(nvidia_runtime(None, true).status, Status::Warn);

        fs::write(dev.path().join("nvidia0"), "").unwrap();
        fs::write(dev.path().join("nvidia1"), "").unwrap();
        assert_eq!(nvidia_gpus(dev.path()).len(), 2);
        let version = dev.path().join("version");
        fs::write(&version, "NVRM version: NVIDIA UNIX x86_64 Kernel Module  570.86.15  Thu Jan 1 2025\n").unwrap();
        assert_eq!(gpu_driver(&version, true).detail, "NVIDIA driver 570.86.15");
        assert_eq!(gpu_driver(&dev.path().join("none"), true).status, Status::Fail);
        fs::write(&version, "NVRM version: NVIDIA UNIX x86_64 Kernel Module  550.54.15  Tue Mar  5 2024\n").unwrap();
        let old = gpu_driver(&version, true);
        assert!(old.status == Status::Warn && old.detail.contains("need ≥ 570"), "{old:?}");
        // CRIU's plugin path missing is a warning: the driver API can do the work.
        assert_eq!(cuda_plugin(&[dev.path().to_path_buf()], true).status, Status::Warn);
        fs::write(dev.path().join("cuda_plugin.so"), "").unwrap();
        assert_eq!(cuda_plugin(&[dev.path().to_path_buf()], true).status, Status::Ok);
        assert_eq!(cuda_checkpoint(Some(OsStr::new("/nonexistent")), true).status, Status::Warn);
    }

    #[test]
    fn the_driver_api_check_fails_only_when_no_way_is_left() {
        use kybernate_gpu::cuda::{CudaError, ProcessState};
        struct Driver;
        impl CudaDriver for Driver {
            fn driver_version(&self) -> Result<i32, CudaError> {
                Ok(12080)
            }
            fn lock(&self, _: i32, _: u32) -> Result<(), CudaError> {
                Ok(())
            }
            fn checkpoint(&self, _: i32) -> Result<(), CudaError> {
                Ok(())
            }
            fn restore(&self, _: i32) -> Result<(), CudaError> {
                Ok(())
            }
            fn unlock(&self, _: i32) -> Result<(), CudaError> {
                Ok(())
            }
            fn state(&self, _: i32) -> Result<ProcessState, CudaError> {
                Ok(ProcessState::Running)
            }
            fn restore_thread_id(&self, pid: i32) -> Result<i32, CudaError> {
                Ok(pid)
            }
        }
        let gone = || Err::<Driver, _>("cannot load libcuda.so.1");
        assert_eq!(cuda_driver_api(false, false, gone).detail, NO_GPU);
        let ok = cuda_driver_api(true, false, || Ok::<_, String>(Driver));
        assert!(ok.status == Status::Ok && ok.detail.contains("CUDA 12.8"), "{ok:?}");
        assert_eq!(cuda_driver_api(true, true, gone).status, Status::Warn);
        let none = cuda_driver_api(true, false, gone);
        assert!(none.status == Status::Fail && none.detail.contains("cannot be checkpointed"), "{none:?}");
    }

    #[test]
    fn the_restore_verdict_check_fails_warns_or_passes() {
        use kybernate_checkpoint::verdict::Difference;
        let kernel = Difference::Kernel { checkpoint: "6.1.0".into(), node: "6.8.0".into() };
        let arch = Difference::Arch { checkpoint: "x86_64".into(), node: "aarch64".into() };
        let ok = restore_verdict("default/web/1", Ok(Verdict::default()));
        assert_eq!((ok.status, ok.detail.as_str()), (Status::Ok, "checkpoint default/web/1: compatible"));
        let warned =
            restore_verdict("default/web/1", Ok(Verdict { mismatches: vec![], warnings: vec![kernel.clone()] }));
        assert!(warned.status == Status::Warn && warned.detail.contains("kernel: checkpoint taken on kernel 6.1.0"));
        let failed = restore_verdict("default/web/1", Ok(Verdict { mismatches: vec![arch], warnings: vec![kernel] }));
        assert_eq!(failed.status, Status::Fail);
        assert!(
            failed
                .detail
                .starts_with("checkpoint default/web/1: incompatible: 1 mismatch (arch), 1 warning (kernel): arch: ")
                && failed.detail.contains("; warnings: kernel: "),
            "{failed:?}"
        );
        let unreadable = restore_verdict("x", Err(CliError::Failed("gone".into())));
        assert!(unreadable.status == Status::Fail && unreadable.detail == "checkpoint x: gone", "{unreadable:?}");
    }

    #[test]
    fn capabilities_and_root() {
        let dir = tempfile::tempdir().unwrap();
        let status = dir.path().join("status");
        fs::write(&status, "Name:\tx\nCapEff:\t000001fffeffffff\n").unwrap();
        let c = capabilities(&status);
        assert_eq!(c.status, Status::Ok);
        assert!(c.detail.contains("CAP_CHECKPOINT_RESTORE present"), "{c:?}");
        fs::write(&status, "CapEff:\t0000000000000000\n").unwrap();
        let c = capabilities(&status);
        assert_eq!(c.status, Status::Fail);
        assert!(c.fix.as_deref().unwrap().contains("run as root"));

        let root = dir.path().join("a/b/checkpoints");
        let c = checkpoint_root(&root);
        assert!(c.detail.contains("created on first checkpoint"), "{c:?}");
        assert!(c.detail.contains(&dir.path().display().to_string()), "{c:?}");
        fs::create_dir_all(&root).unwrap();
        fs::set_permissions(&root, fs::Permissions::from_mode(0o755)).unwrap();
        let c = checkpoint_root(&root);
        assert_eq!(c.status, Status::Warn, "{c:?}");
        assert!(c.fix.as_deref().unwrap().contains("chmod 700"), "{c:?}");
    }

    /// This test machine's mount table, shortened: v1 controllers and a cgroup2 at `unified/`.
    const HYBRID_MOUNTINFO: &str = "\
25 18 0:22 / /sys/fs/cgroup ro,nosuid,nodev,noexec shared:9 - tmpfs tmpfs ro,mode=755
26 25 0:23 / /sys/fs/cgroup/unified rw,nosuid,nodev,noexec,relatime shared:10 - cgroup2 cgroup2 rw,nsdelegate
27 25 0:24 / /sys/fs/cgroup/systemd rw,nosuid - cgroup cgroup rw,xattr,name=systemd
30 25 0:27 / /sys/fs/cgroup/cpu,cpuacct rw,nosuid - cgroup cgroup rw,cpu,cpuacct
31 25 0:28 / /sys/fs/cgroup/memory rw,nosuid - cgroup cgroup rw,memory
32 25 0:29 / /sys/fs/cgroup/pids rw,nosuid - cgroup cgroup rw,pids
33 25 0:30 / /sys/fs/cgroup/freezer rw,nosuid - cgroup cgroup rw,freezer
34 25 0:31 / /sys/fs/cgroup/devices rw,nosuid - cgroup cgroup rw,devices
";

    #[test]
    fn cgroups_report_the_mode_and_the_missing_controllers() {
        let root = Path::new("/sys/fs/cgroup");
        // Unified with every controller: ok, mode v2 in JSON.
        let all = "cpuset cpu io memory hugetlb pids rdma misc\n";
        let c = cgroup_check(root, Some(CgroupMode::V2), Some(all), "", "6.8.0-45-generic");
        assert_eq!(c.status, Status::Ok, "{c:?}");
        assert!(c.detail.starts_with("cgroup v2 (unified)") && c.detail.contains("eBPF"), "{c:?}");
        let json = serde_json::to_value(&c).unwrap();
        assert_eq!(json["cgroup"]["mode"], "v2");
        assert_eq!(json["cgroup"]["missing"], serde_json::json!([]));

        // The v2 hierarchy of these test machines in a private namespace: hugetlb only.
        let c = cgroup_check(root, Some(CgroupMode::V2), Some("hugetlb\n"), "", "6.18.4");
        assert_eq!(c.status, Status::Warn, "{c:?}");
        for (controller, _) in V2_NEEDED {
            assert!(c.detail.contains(&format!("{controller} (")), "{controller} not named: {}", c.detail);
        }
        assert!(c.detail.contains("OOM events") && c.detail.contains("cpu.weight"), "{}", c.detail);
        assert!(c.fix.as_deref().unwrap().contains("unified_cgroup_hierarchy"), "{c:?}");
        let report = c.cgroup.as_ref().unwrap();
        assert_eq!(report.controllers, vec!["hugetlb"]);
        assert_eq!(report.missing, vec!["memory", "cpu", "pids", "io"]);

        // v2 on a kernel without cgroup.freeze.
        let c = cgroup_check(root, Some(CgroupMode::V2), Some(all), "", "4.19.0");
        assert_eq!(c.status, Status::Warn);
        assert!(c.detail.contains("no cgroup.freeze") && c.fix.unwrap().contains("5.2"));

        // Hybrid (these machines): the v1 controllers count; name=systemd and rw are not controllers.
        let c = cgroup_check(root, Some(CgroupMode::Hybrid), Some("hugetlb\n"), HYBRID_MOUNTINFO, "6.18.4");
        assert_eq!(c.status, Status::Ok, "{c:?}");
        assert!(c.detail.starts_with("cgroup hybrid") && c.detail.contains("(controllers: hugetlb)"), "{c:?}");
        let report = c.cgroup.as_ref().unwrap();
        assert_eq!(report.mode, Some(CgroupMode::Hybrid));
        assert_eq!(report.controllers, vec!["cpu", "cpuacct", "devices", "freezer", "memory", "pids"]);
        assert_eq!(serde_json::to_value(&c).unwrap()["cgroup"]["mode"], "hybrid");

        // v1 without the freezer: pause and checkpoints are named.
        let no_freezer: String =
            HYBRID_MOUNTINFO.lines().filter(|l| !l.contains("freezer")).map(|l| format!("{l}\n")).collect();
        let c = cgroup_check(root, Some(CgroupMode::V1), None, &no_freezer, "6.1.0");
        assert_eq!(c.status, Status::Warn);
        assert!(c.detail.starts_with("cgroup v1") && c.detail.contains("freezer (pause"), "{c:?}");
        assert_eq!(c.cgroup.unwrap().missing, vec!["freezer"]);

        // Nothing mounted.
        let c = cgroup_check(root, None, None, "", "6.1.0");
        assert_eq!(c.status, Status::Warn);
        assert_eq!(serde_json::to_value(&c).unwrap()["cgroup"]["mode"], serde_json::Value::Null);

        // Other checks carry no cgroup field.
        assert!(serde_json::to_value(Check::ok("x", "y")).unwrap().get("cgroup").is_none());
    }

    #[test]
    fn cgroups_on_this_machine() {
        let c = cgroups(Path::new("/sys/fs/cgroup"), Path::new("/proc/self/mountinfo"));
        let report = c.cgroup.clone().unwrap();
        assert_eq!(report.mode, kybernate_checkpoint::verdict::cgroup_mode(Path::new("/sys/fs/cgroup")), "{c:?}");
        assert!(!report.controllers.is_empty(), "{c:?}");
    }

    #[test]
    fn kernel_versions() {
        assert_eq!(kernel_version("6.16.3-amd64"), Some((6, 16)));
        assert_eq!(kernel_version("5.15.0"), Some((5, 15)));
        assert_eq!(kernel_version("x"), None);
    }
}
