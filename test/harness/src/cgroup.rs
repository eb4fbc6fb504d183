//! Which cgroup hierarchy a test bed's containerd (and every shim, runc and CRIU below it) runs on.
//!
//! The test machines mount the cgroup v1 controllers at `/sys/fs/cgroup` and the (nearly empty)
//! cgroup2 hierarchy at `/sys/fs/cgroup/unified`; GPU nodes run cgroup v2. A v2 test bed starts
//! containerd in a private mount namespace whose `/sys/fs/cgroup` is that cgroup2 hierarchy, so
//! runc runs in unified mode (freezer `cgroup.freeze`, devices as an eBPF program) and CRIU
//! dumps and restores v2 cgroups. Only `/sys` is made private there: the test bed's own
//! directory is a shared mount, so the rootfs mounts the shim makes inside the namespace show up
//! in the test's namespace too, where tests read them and cleanup unmounts them (the namespace
//! itself: [`crate::mountns`]).
//!
//! What v2 mode cannot exercise here: the controllers other than `hugetlb` stay bound to v1
//! kernel-wide, so memory, cpu, pids and io limits, OOM kills (`memory.events`) and memory
//! statistics do not exist in it (docs/testing.md).

use std::ffi::CString;
use std::path::{Path, PathBuf};

use crate::{Error, Result};

/// Selects the whole suite's mode when a test does not choose one: `v2` or `host`.
pub const CGROUP_ENV: &str = "KBT_CGROUP";
/// Where the cgroup2 hierarchy is mounted in the test's own namespace on these machines.
const UNIFIED: &str = "/sys/fs/cgroup/unified";
pub(crate) const CGROUP_ROOT: &str = "/sys/fs/cgroup";

/// A test bed's cgroup hierarchy.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum CgroupMode {
    /// Whatever the machine has at `/sys/fs/cgroup` (v1 on the test machines).
    #[default]
    Host,
    /// cgroup v2 (unified): the machine's own when `/sys/fs/cgroup` is cgroup2, else the cgroup2
    /// hierarchy in a private mount namespace (see the module docs).
    V2,
}

impl CgroupMode {
    /// From [`CGROUP_ENV`]: `v2` selects [`CgroupMode::V2`]; unset, empty or `host` the host's.
    pub fn from_env() -> Result<Self> {
        Self::parse(&std::env::var(CGROUP_ENV).unwrap_or_default())
    }

    fn parse(value: &str) -> Result<Self> {
        match value {
            "" | "host" => Ok(Self::Host),
            "v2" => Ok(Self::V2),
            other => Err(Error::NotSetUp(format!("{CGROUP_ENV}={other:?}: expected \"v2\" or \"host\""))),
        }
    }
}

/// How a v2 test bed gets its hierarchy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum V2Setup {
    /// `/sys/fs/cgroup` is cgroup2 already: nothing to do.
    Native,
    /// containerd runs in a private mount namespace with cgroup2 mounted at `/sys/fs/cgroup`.
    PrivateNamespace,
}

/// What a v2 test bed needs on this machine, or why it cannot have it.
pub(crate) fn v2_setup() -> Result<V2Setup> {
    if is_cgroup2(Path::new(CGROUP_ROOT)) {
        Ok(V2Setup::Native)
    } else if is_cgroup2(Path::new(UNIFIED)) {
        Ok(V2Setup::PrivateNamespace)
    } else {
        Err(Error::NotSetUp(format!("no cgroup2 hierarchy at {CGROUP_ROOT} or {UNIFIED}: a v2 test bed needs one")))
    }
}

/// Where the test's own namespace sees the v2 cgroup `path` (as in `/proc/PID/cgroup`'s `0::`
/// line) of a v2 test bed's containers.
pub(crate) fn v2_dir(setup: &V2Setup, path: &str) -> PathBuf {
    let root = if *setup == V2Setup::Native { CGROUP_ROOT } else { UNIFIED };
    Path::new(root).join(path.trim_start_matches('/'))
}

/// Whether the cgroup2 hierarchy a v2 test bed of this machine runs on has `controller` (its
/// root's `cgroup.controllers`): for tests that must decide before they start a test bed.
pub fn v2_hierarchy_has(controller: &str) -> bool {
    has_controller(controller)
}

/// Whether the cgroup2 hierarchy has `controller` (its root's `cgroup.controllers`).
pub(crate) fn has_controller(controller: &str) -> bool {
    let root = if is_cgroup2(Path::new(CGROUP_ROOT)) { CGROUP_ROOT } else { UNIFIED };
    std::fs::read_to_string(Path::new(root).join("cgroup.controllers"))
        .is_ok_and(|c| c.split_whitespace().any(|c| c == controller))
}

fn is_cgroup2(path: &Path) -> bool {
    let Ok(c) = CString::new(path.as_os_str().as_encoded_bytes()) else { return false };
    // SAFETY: c is NUL-terminated; st is written by statfs.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    (unsafe { libc::statfs(c.as_ptr(), &mut st) } == 0) && st.f_type == libc::CGROUP2_SUPER_MAGIC
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_suite_mode_is_v2_or_host_and_typos_are_errors() {
        assert_eq!(CgroupMode::parse("v2").unwrap(), CgroupMode::V2);
        assert_eq!(CgroupMode::parse("host").unwrap(), CgroupMode::Host);
        assert_eq!(CgroupMode::parse("").unwrap(), CgroupMode::Host);
        assert!(CgroupMode::parse("2").unwrap_err().to_string().contains("KBT_CGROUP=\"2\""));
    }

    #[test]
    fn v2_cgroup_paths_are_read_where_the_test_sees_the_hierarchy() {
        assert_eq!(v2_dir(&V2Setup::Native, "/ns/web"), Path::new("/sys/fs/cgroup/ns/web"));
        assert_eq!(v2_dir(&V2Setup::PrivateNamespace, "/ns/web"), Path::new("/sys/fs/cgroup/unified/ns/web"));
    }
}
