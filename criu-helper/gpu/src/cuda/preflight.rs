//! Choosing how CUDA state is checkpointed, and the preconditions of each way.
//!
//! CRIU's CUDA plugin fails late and quietly when one of its preconditions is missing (it
//! disables itself without `cuda-checkpoint`, or with an old driver, and CRIU then dumps a
//! process whose GPU memory is lost). So every precondition is checked up front and each
//! missing one is refused with its own message and fix.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};

/// CRIU's plugin file.
pub const CUDA_PLUGIN: &str = "cuda_plugin.so";
/// NVIDIA's tool the plugin runs (or `kybernate cuda-checkpoint` linked under that name).
pub const CUDA_CHECKPOINT: &str = "cuda-checkpoint";
/// Driver the checkpoint API (and a dependable plugin) needs.
pub const MIN_DRIVER_MAJOR: u32 = 570;
/// CRIU's built-in plugin directories (distribution builds, source installs).
pub const DEFAULT_PLUGIN_DIRS: [&str; 2] = ["/usr/lib/criu", "/usr/local/lib/criu"];
/// The environment variable CRIU reads its plugin directory from.
pub const CRIU_LIBS_DIR: &str = "CRIU_LIBS_DIR";

/// `[checkpoint] cuda` without `off` (the caller handles `off`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wanted {
    Auto,
    CriuPlugin,
    DriverApi,
}

/// What CRIU's plugin path needs, found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PluginReady {
    pub plugin: PathBuf,
    pub cuda_checkpoint: PathBuf,
    pub driver_version: String,
}

/// One missing precondition of the criu-plugin mode.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PluginPreflightError {
    #[error("CRIU's CUDA plugin ({CUDA_PLUGIN}) is not in {}; install CRIU's cuda plugin there (or point $CRIU_LIBS_DIR at it)", dirs.iter().map(|d| d.display().to_string()).collect::<Vec<_>>().join(", "))]
    PluginMissing { dirs: Vec<PathBuf> },
    #[error("{CUDA_CHECKPOINT} is not on PATH ({path}); install NVIDIA's cuda-checkpoint, or link ours: ln -s \"$(command -v kybernate)\" /usr/local/bin/cuda-checkpoint")]
    CudaCheckpointMissing { path: String },
    #[error("no NVIDIA driver: cannot read {}: {message}", file.display())]
    DriverMissing { file: PathBuf, message: String },
    #[error("NVIDIA driver {found} is too old for CUDA checkpoints (need ≥ {MIN_DRIVER_MAJOR}); upgrade the driver")]
    DriverTooOld { found: String },
}

/// Where the plugin would be loaded from: `$CRIU_LIBS_DIR` when set (CRIU itself prefers it),
/// else CRIU's built-in directories.
pub fn plugin_dirs(criu_libs_dir: Option<&OsStr>) -> Vec<PathBuf> {
    match criu_libs_dir.filter(|d| !d.is_empty()) {
        Some(d) => vec![PathBuf::from(d)],
        None => DEFAULT_PLUGIN_DIRS.iter().map(PathBuf::from).collect(),
    }
}

/// Checks the criu-plugin mode's preconditions in the order an admin would fix them. CRIU's own
/// version is not one of them: Kybernate's minimum (`kybernate_checkpoint::MIN_CRIU`, 4.1, the
/// first whose plugin checkpoints containers) is checked before any checkpoint.
pub fn check_criu_plugin(
    dirs: &[PathBuf],
    path_env: Option<&OsStr>,
    nvidia_version_file: &Path,
) -> Result<PluginReady, PluginPreflightError> {
    let plugin = dirs
        .iter()
        .map(|d| d.join(CUDA_PLUGIN))
        .find(|p| p.is_file())
        .ok_or_else(|| PluginPreflightError::PluginMissing { dirs: dirs.to_vec() })?;
    let cuda_checkpoint =
        find_in_path(CUDA_CHECKPOINT, path_env).ok_or_else(|| PluginPreflightError::CudaCheckpointMissing {
            path: path_env.map(|p| p.to_string_lossy().into_owned()).unwrap_or_default(),
        })?;
    let text = std::fs::read_to_string(nvidia_version_file).map_err(|e| PluginPreflightError::DriverMissing {
        file: nvidia_version_file.to_path_buf(),
        message: e.to_string(),
    })?;
    let version = crate::inventory::parse_driver_version(&text).ok_or_else(|| PluginPreflightError::DriverMissing {
        file: nvidia_version_file.to_path_buf(),
        message: "no driver version in it".into(),
    })?;
    match crate::inventory::driver_major(&version) {
        Some(major) if major >= MIN_DRIVER_MAJOR => {}
        _ => return Err(PluginPreflightError::DriverTooOld { found: version }),
    }
    Ok(PluginReady { plugin, cuda_checkpoint, driver_version: version })
}

/// An executable regular file named `name` in one of `path_env`'s directories.
pub fn find_in_path(name: &str, path_env: Option<&OsStr>) -> Option<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    std::env::split_paths(path_env?)
        .filter(|d| d.is_absolute())
        .map(|d| d.join(name))
        .find(|p| std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0))
}

/// Why no way of checkpointing CUDA state could be used.
#[derive(Debug, thiserror::Error)]
pub enum ModeError {
    #[error("[checkpoint] cuda = \"criu-plugin\": {0}")]
    Plugin(PluginPreflightError),
    #[error("[checkpoint] cuda = \"driver-api\": {0}")]
    Driver(String),
    #[error("[checkpoint] cuda = \"auto\": no way to checkpoint CUDA state here: CRIU's plugin: {plugin}; the driver API: {driver}")]
    Neither { plugin: PluginPreflightError, driver: String },
    /// The job uses what the driver's checkpoint does not support (NCCL): refused before
    /// anything is locked or frozen.
    #[error("{}", unsupported_text(.0))]
    Unsupported(Vec<super::procs::Unsupported>),
}

fn unsupported_text(list: &[super::procs::Unsupported]) -> String {
    let each: Vec<String> =
        list.iter().map(|u| format!("pid {} (ns pid {}: {})", u.pid, u.ns_pid, u.evidence)).collect();
    format!(
        "cannot checkpoint the CUDA state of a job that uses NCCL: {}; the CUDA driver's checkpoint does not support NCCL \
         or CUDA IPC (NVIDIA/cuda-checkpoint#30); nothing was locked or frozen",
        each.join("; ")
    )
}

/// The mode to use, decided from what is wanted and what is there.
#[derive(Debug)]
pub enum Chosen<D> {
    CriuPlugin(PluginReady),
    DriverApi(D),
}

/// `auto`: CRIU's plugin where its preconditions hold, else the driver API where libcuda has
/// it, else refuse with both reasons. `load_driver` is only called when needed.
pub fn choose<D, E: std::fmt::Display>(
    wanted: Wanted,
    plugin: impl FnOnce() -> Result<PluginReady, PluginPreflightError>,
    load_driver: impl FnOnce() -> Result<D, E>,
) -> Result<Chosen<D>, ModeError> {
    match wanted {
        Wanted::CriuPlugin => plugin().map(Chosen::CriuPlugin).map_err(ModeError::Plugin),
        Wanted::DriverApi => load_driver().map(Chosen::DriverApi).map_err(|e| ModeError::Driver(e.to_string())),
        Wanted::Auto => match plugin() {
            Ok(ready) => Ok(Chosen::CriuPlugin(ready)),
            Err(plugin) => match load_driver() {
                Ok(d) => Ok(Chosen::DriverApi(d)),
                Err(e) => Err(ModeError::Neither { plugin, driver: e.to_string() }),
            },
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;
    use std::os::unix::fs::PermissionsExt;

    struct Node {
        _dir: tempfile::TempDir,
        plugins: PathBuf,
        bin: PathBuf,
        version: PathBuf,
    }

    /// A node where every precondition holds.
    fn node() -> Node {
        let dir = tempfile::tempdir().unwrap();
        let plugins = dir.path().join("criu");
        let bin = dir.path().join("bin");
        fs::create_dir_all(&plugins).unwrap();
        fs::create_dir_all(&bin).unwrap();
        fs::write(plugins.join(CUDA_PLUGIN), b"").unwrap();
        let cc = bin.join(CUDA_CHECKPOINT);
        fs::write(&cc, b"#!/bin/sh\n").unwrap();
        fs::set_permissions(&cc, fs::Permissions::from_mode(0o755)).unwrap();
        let version = dir.path().join("version");
        fs::write(
            &version,
            "NVRM version: NVIDIA UNIX x86_64 Kernel Module  580.65.06  Sun Jul 27 07:09:52 UTC 2025\nGCC version:  gcc 12\n",
        )
        .unwrap();
        Node { _dir: dir, plugins, bin, version }
    }

    fn check(n: &Node) -> Result<PluginReady, PluginPreflightError> {
        check_criu_plugin(std::slice::from_ref(&n.plugins), Some(n.bin.as_os_str()), &n.version)
    }

    #[test]
    fn all_preconditions_hold() {
        let n = node();
        let ready = check(&n).unwrap();
        assert_eq!(ready.plugin, n.plugins.join(CUDA_PLUGIN));
        assert_eq!(ready.cuda_checkpoint, n.bin.join(CUDA_CHECKPOINT));
        assert_eq!(ready.driver_version, "580.65.06");
    }

    #[test]
    fn each_missing_precondition_has_its_own_message() {
        let n = node();
        fs::remove_file(n.plugins.join(CUDA_PLUGIN)).unwrap();
        let e = check(&n).unwrap_err().to_string();
        assert!(e.contains("cuda_plugin.so") && e.contains(&n.plugins.display().to_string()), "{e}");

        let n = node();
        fs::set_permissions(n.bin.join(CUDA_CHECKPOINT), fs::Permissions::from_mode(0o644)).unwrap();
        let e = check(&n).unwrap_err().to_string();
        assert!(e.contains("cuda-checkpoint is not on PATH") && e.contains("ln -s"), "{e}");

        let n = node();
        fs::remove_file(&n.version).unwrap();
        let e = check(&n).unwrap_err().to_string();
        assert!(e.starts_with("no NVIDIA driver") && e.contains(&n.version.display().to_string()), "{e}");

        let n = node();
        fs::write(&n.version, "NVRM version: NVIDIA UNIX x86_64 Kernel Module  550.54.15  Tue Mar  5 2024\n").unwrap();
        let e = check(&n).unwrap_err().to_string();
        assert!(e.contains("driver 550.54.15 is too old") && e.contains("570"), "{e}");
    }

    #[test]
    fn plugin_dirs_follow_criu_libs_dir() {
        assert_eq!(plugin_dirs(Some(OsStr::new("/opt/criu/lib"))), vec![PathBuf::from("/opt/criu/lib")]);
        assert_eq!(plugin_dirs(None).len(), 2);
        assert_eq!(plugin_dirs(Some(OsStr::new(""))).len(), 2);
    }

    #[test]
    fn auto_prefers_the_plugin_then_the_driver_api_then_refuses_with_both_reasons() {
        let ok_plugin =
            || Ok(PluginReady { plugin: "/p".into(), cuda_checkpoint: "/c".into(), driver_version: "580.1".into() });
        let no_plugin = || Err(PluginPreflightError::CudaCheckpointMissing { path: "/bin".into() });
        let driver = || Ok::<_, String>(7);
        let no_driver = || Err::<i32, _>("cannot load libcuda.so.1".to_string());
        assert!(matches!(choose(Wanted::Auto, ok_plugin, driver), Ok(Chosen::CriuPlugin(_))));
        assert!(matches!(choose(Wanted::Auto, no_plugin, driver), Ok(Chosen::DriverApi(7))));
        let e = choose(Wanted::Auto, no_plugin, no_driver).unwrap_err().to_string();
        assert!(e.contains("cuda-checkpoint is not on PATH") && e.contains("cannot load libcuda.so.1"), "{e}");
        // An explicit mode never falls back.
        let e = choose(Wanted::CriuPlugin, no_plugin, driver).unwrap_err().to_string();
        assert!(e.starts_with("[checkpoint] cuda = \"criu-plugin\""), "{e}");
        assert!(matches!(choose(Wanted::DriverApi, ok_plugin, driver), Ok(Chosen::DriverApi(7))));
        assert!(choose(Wanted::DriverApi, ok_plugin, no_driver).is_err());
    }
}
