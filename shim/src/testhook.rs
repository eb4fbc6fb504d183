//! Test-only stop points: where a test may have the shim stop itself mid-checkpoint or
//! mid-restore, to kill it at exactly that phase (docs/testing.md). Never set in production.

use std::path::Path;

use log::warn;

/// When the shim's environment names a directory in
/// `KYBERNATE_TEST_STOP_DIR` and `<dir>/<container id>` holds `phase`, the shim stops itself
/// (SIGSTOP) there, so that a test can kill it at exactly that point. Never set in production.
pub const TEST_STOP_ENV: &str = "KYBERNATE_TEST_STOP_DIR";
/// Stop points of [`test_stop_point`]: the container just frozen; before the rootfs diff (still
/// frozen); before the commit hashes the files; after the commit (frozen when `exit` is set);
/// before a restore's checkpoint is verified.
pub const STOP_FREEZE: &str = "freeze";
pub const STOP_ROOTFS_DIFF: &str = "rootfs-diff";
pub const STOP_HASHING: &str = "hashing";
pub const STOP_COMMIT: &str = "commit";
pub const STOP_RESTORE_VERIFY: &str = "restore-verify";

pub fn test_stop_point(id: &str, phase: &str) {
    let Some(dir) = std::env::var_os(TEST_STOP_ENV) else { return };
    if std::fs::read_to_string(Path::new(&dir).join(id)).is_ok_and(|p| p.trim() == phase) {
        warn!("container {id}: test hook {TEST_STOP_ENV}: stopping the shim at {phase}");
        let _ = nix::sys::signal::raise(nix::sys::signal::Signal::SIGSTOP);
    }
}
