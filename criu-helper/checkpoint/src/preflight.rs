//! Checks made before a container is frozen: a checkpoint that fails halfway
//! (CRIU too old, disk full) costs the workload a pause for nothing.

use std::ffi::OsStr;
use std::fmt;
use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

/// A CRIU release number.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, serde::Serialize, serde::Deserialize)]
pub struct CriuVersion {
    pub major: u32,
    pub minor: u32,
    pub patch: u32,
}

impl fmt::Display for CriuVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}.{}", self.major, self.minor, self.patch)
    }
}

/// The oldest CRIU Kybernate supports (the first with the CUDA plugin fixes and
/// the restore behaviour runc 1.2+ relies on).
pub const MIN_CRIU: CriuVersion = CriuVersion { major: 4, minor: 1, patch: 0 };

/// Headroom on top of the memory estimate: page images are not the only files
/// CRIU writes, and the estimate misses kernel-side state.
pub const SPACE_HEADROOM: u64 = 16 * MIB;
const MIB: u64 = 1024 * 1024;

/// Why a checkpoint should not be attempted.
#[derive(Debug, thiserror::Error)]
pub enum PreflightError {
    #[error("criu not found: searched {}", join(.searched))]
    CriuNotFound { searched: Vec<PathBuf> },
    #[error("criu {found} is too old: Kybernate needs CRIU {min} or newer")]
    CriuTooOld { found: CriuVersion, min: CriuVersion },
    #[error("cannot parse `criu --version` output {0:?}: expected \"Version: X.Y[.Z]\"")]
    BadVersionOutput(String),
    #[error("{}: checkpoint directory is not writable: {source}", dir.display())]
    NotWritable {
        dir: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "{}: not enough free space for the checkpoint: need about {} (memory {}, plus a tenth and {} of headroom), \
         {} available",
        dir.display(), mib(required_space(*needed)), mib(*needed), mib(SPACE_HEADROOM), mib(*available)
    )]
    NoSpace { dir: PathBuf, needed: u64, available: u64 },
    #[error(
        "pre-dump ({rounds} round(s)) needs memory dirty tracking, which this node's kernel lacks: {} says \"{criu_says}\" \
         (the kernel is built without CONFIG_MEM_SOFT_DIRTY, so it has no soft-dirty page bits); checkpoint without \
         pre-dump (`kybernate checkpoint --pre-dump 0`, no {} annotation, [checkpoint] pre_dump_rounds = 0), \
         or run the container on a node whose kernel has CONFIG_MEM_SOFT_DIRTY=y",
        criu.display(), crate::predump::PRE_DUMP_ANNOTATION
    )]
    NoDirtyTracking { rounds: u32, criu: PathBuf, criu_says: String },
    #[error(
        "pre-dump ({rounds} round(s)) needs memory dirty tracking (the kernel's soft-dirty bits, CONFIG_MEM_SOFT_DIRTY), \
         and {} could not tell whether this node has it: {reason}; checkpoint without pre-dump \
         (`kybernate checkpoint --pre-dump 0`), or check `criu check --feature mem_dirty_track`",
        criu.display()
    )]
    DirtyTrackingUnknown { rounds: u32, criu: PathBuf, reason: String },
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: io::Error,
    },
}

fn join(paths: &[PathBuf]) -> String {
    paths.iter().map(|d| d.display().to_string()).collect::<Vec<_>>().join(", ")
}

/// Rounds up, so "0 MiB available" only ever means nothing at all.
fn mib(bytes: u64) -> String {
    format!("{} MiB", bytes.div_ceil(MIB))
}

/// What [`check_space`] wants free for `needed` bytes of memory.
fn required_space(needed: u64) -> u64 {
    needed.saturating_add(needed / 10).saturating_add(SPACE_HEADROOM)
}

/// Parses `criu --version` output: "Version: 4.1.1\n" or "Version: 4.1\n", possibly followed by "GitID: ..." lines.
pub fn parse_criu_version(output: &str) -> Result<CriuVersion, PreflightError> {
    let bad = || PreflightError::BadVersionOutput(output.trim().chars().take(200).collect());
    let line = output.lines().find_map(|l| l.trim().strip_prefix("Version:")).ok_or_else(bad)?;
    let parts: Vec<&str> = line.trim().split('.').collect();
    if !(2..=3).contains(&parts.len()) {
        return Err(bad());
    }
    let mut nums = [0u32; 3];
    for (n, part) in nums.iter_mut().zip(&parts) {
        if part.is_empty() || !part.bytes().all(|b| b.is_ascii_digit()) {
            return Err(bad());
        }
        *n = part.parse().map_err(|_| bad())?;
    }
    Ok(CriuVersion { major: nums[0], minor: nums[1], patch: nums[2] })
}

/// Err(PreflightError::CriuTooOld{found, min}) when v < MIN_CRIU.
pub fn require_criu_version(v: CriuVersion) -> Result<(), PreflightError> {
    if v < MIN_CRIU {
        return Err(PreflightError::CriuTooOld { found: v, min: MIN_CRIU });
    }
    Ok(())
}

/// Finds the CRIU binary like runc does: `explicit` if given (must exist and be executable),
/// else "criu" searched in `path_env` (a $PATH-style string) only: runc itself looks up `criu`
/// on its PATH, so a CRIU found anywhere else would not be the one runc runs.
pub fn find_criu(explicit: Option<&Path>, path_env: Option<&OsStr>) -> Result<PathBuf, PreflightError> {
    if let Some(p) = explicit.filter(|p| !p.as_os_str().is_empty()) {
        return if is_executable(p) {
            Ok(p.to_path_buf())
        } else {
            Err(PreflightError::CriuNotFound { searched: vec![p.to_path_buf()] })
        };
    }
    let mut searched: Vec<PathBuf> = Vec::new();
    let from_path = path_env.into_iter().flat_map(std::env::split_paths).filter(|d| d.is_absolute());
    for dir in from_path {
        let candidate = dir.join("criu");
        if searched.contains(&candidate) {
            continue;
        }
        if is_executable(&candidate) {
            return Ok(candidate);
        }
        searched.push(candidate);
    }
    Err(PreflightError::CriuNotFound { searched })
}

fn is_executable(p: &Path) -> bool {
    std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// Memory CRIU will have to write for the process tree of `pid`, estimated from its memory cgroup:
/// cgroup v1 `memory.stat` total_rss + total_shmem (fallback rss + shmem), cgroup v2 `memory.stat` anon + shmem.
///
/// `proc_root` is normally "/proc", `cgroup_root` normally "/sys/fs/cgroup". A missing
/// `<proc_root>/<pid>/cgroup` is an error (the process is gone); a cgroup without a
/// readable `memory.stat` (controller not enabled) gives Ok(None).
pub fn memory_estimate(pid: u32, proc_root: &Path, cgroup_root: &Path) -> Result<Option<u64>, PreflightError> {
    let cgroup_file = proc_root.join(pid.to_string()).join("cgroup");
    let text = std::fs::read_to_string(&cgroup_file)
        .map_err(|source| PreflightError::Io { context: format!("{}: cannot read", cgroup_file.display()), source })?;
    let mut v1 = None;
    let mut v2 = None;
    for line in text.lines() {
        let mut fields = line.splitn(3, ':');
        let (Some(_id), Some(controllers), Some(path)) = (fields.next(), fields.next(), fields.next()) else {
            continue;
        };
        let rel = path.trim_start_matches('/');
        if controllers.split(',').any(|c| c == "memory") {
            v1 = Some(cgroup_root.join("memory").join(rel).join("memory.stat"));
        } else if controllers.is_empty() {
            v2 = Some(cgroup_root.join(rel).join("memory.stat"));
        }
    }
    let (stat_file, keys): (PathBuf, &[&[&str]]) = match (v1, v2) {
        (Some(f), _) => (f, &[&["total_rss", "total_shmem"], &["rss", "shmem"]]),
        (None, Some(f)) => (f, &[&["anon", "shmem"]]),
        (None, None) => return Ok(None),
    };
    let stat = match std::fs::read_to_string(&stat_file) {
        Ok(s) => s,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(source) => {
            return Err(PreflightError::Io { context: format!("{}: cannot read", stat_file.display()), source })
        }
    };
    let value =
        |key: &str| stat.lines().find_map(|l| l.strip_prefix(key)?.strip_prefix(' ')?.trim().parse::<u64>().ok());
    // The first key of each set must be present for the set to count; the second may be absent.
    Ok(keys.iter().find_map(|set| Some(value(set[0])?.saturating_add(value(set[1]).unwrap_or(0)))))
}

/// Bytes available to unprivileged users on the filesystem holding `dir`
/// (statvfs `f_bavail * f_frsize`: the root reserve is not ours to fill).
pub fn free_bytes(dir: &Path) -> Result<u64, PreflightError> {
    let st = nix::sys::statvfs::statvfs(dir).map_err(|e| PreflightError::Io {
        context: format!("{}: cannot statvfs", dir.display()),
        source: io::Error::from(e),
    })?;
    #[allow(clippy::useless_conversion)] // the field types differ between libc targets
    Ok(u64::from(st.blocks_available()).saturating_mul(u64::from(st.fragment_size())))
}

/// Checks `dir` (an existing directory) can hold a checkpoint of `needed` bytes: writable
/// (a probe file is created and removed), and at least `needed` + 10% + 16 MiB free.
pub fn check_space(dir: &Path, needed: u64) -> Result<(), PreflightError> {
    let probe = dir.join(format!(".kybernate-probe-{}", std::process::id()));
    let not_writable = |source| PreflightError::NotWritable { dir: dir.to_path_buf(), source };
    std::fs::OpenOptions::new().write(true).create(true).truncate(true).open(&probe).map_err(not_writable)?;
    std::fs::remove_file(&probe).map_err(not_writable)?;
    let available = free_bytes(dir)?;
    if available < required_space(needed) {
        return Err(PreflightError::NoSpace { dir: dir.to_path_buf(), needed, available });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;

    #[test]
    fn parses_versions() {
        let v = parse_criu_version("Version: 4.1.1\nGitID: v4.1.1-12-gdeadbeef\n").unwrap();
        assert_eq!(v, CriuVersion { major: 4, minor: 1, patch: 1 });
        assert_eq!(v.to_string(), "4.1.1");
        assert_eq!(parse_criu_version("Version: 4.1\n").unwrap(), MIN_CRIU);
        require_criu_version(v).unwrap();
        require_criu_version(MIN_CRIU).unwrap();

        let old = parse_criu_version("Version: 3.17.1\n").unwrap();
        let err = require_criu_version(old).unwrap_err();
        assert!(matches!(err, PreflightError::CriuTooOld { found, min } if found == old && min == MIN_CRIU));
        assert_eq!(err.to_string(), "criu 3.17.1 is too old: Kybernate needs CRIU 4.1.0 or newer");

        for bad in ["", "criu: command not found", "Version: 4", "Version: 4.x", "Version: 4.1.1.1", "Version: -4.1"] {
            assert!(matches!(parse_criu_version(bad), Err(PreflightError::BadVersionOutput(_))), "{bad:?}");
        }
    }

    fn write_exe(dir: &Path, mode: u32) -> PathBuf {
        let p = dir.join("criu");
        fs::write(&p, "#!/bin/sh\n").unwrap();
        fs::set_permissions(&p, fs::Permissions::from_mode(mode)).unwrap();
        p
    }

    #[test]
    fn finds_criu_in_path() {
        let a = tempfile::tempdir().unwrap();
        let b = tempfile::tempdir().unwrap();
        write_exe(a.path(), 0o644); // not executable: skipped
        let want = write_exe(b.path(), 0o755);
        let path = std::env::join_paths([a.path(), b.path()]).unwrap();
        assert_eq!(find_criu(None, Some(&path)).unwrap(), want);
        assert_eq!(find_criu(Some(&want), None).unwrap(), want);
    }

    #[test]
    fn explicit_criu_must_be_executable() {
        let d = tempfile::tempdir().unwrap();
        let p = write_exe(d.path(), 0o600);
        let err = find_criu(Some(&p), None).unwrap_err();
        assert!(matches!(&err, PreflightError::CriuNotFound { searched } if searched.len() == 1 && searched[0] == p));
        assert!(err.to_string().contains(&p.display().to_string()), "{err}");
        let missing = d.path().join("nope");
        assert!(find_criu(Some(&missing), None).is_err());
    }

    #[test]
    fn missing_criu_names_every_place_searched() {
        let d = tempfile::tempdir().unwrap();
        write_exe(d.path(), 0o600);
        let path = std::env::join_paths([d.path()]).unwrap();
        match find_criu(None, Some(&path)) {
            Err(PreflightError::CriuNotFound { searched }) => assert_eq!(searched, vec![d.path().join("criu")]),
            other => panic!("want CriuNotFound, got {other:?}"),
        }
    }

    fn fake_tree(cgroup_line: &str, stat_dir: &str, stat: &str) -> tempfile::TempDir {
        let t = tempfile::tempdir().unwrap();
        fs::create_dir_all(t.path().join("proc/42")).unwrap();
        fs::write(t.path().join("proc/42/cgroup"), cgroup_line).unwrap();
        let dir = t.path().join("cg").join(stat_dir);
        fs::create_dir_all(&dir).unwrap();
        fs::write(dir.join("memory.stat"), stat).unwrap();
        t
    }

    fn estimate(t: &tempfile::TempDir) -> Option<u64> {
        memory_estimate(42, &t.path().join("proc"), &t.path().join("cg")).unwrap()
    }

    #[test]
    fn memory_estimate_cgroup_v1() {
        let lines = "12:pids:/kubepods/x\n5:cpuacct,memory:/kubepods/pod1/c1\n0::/\n";
        let t = fake_tree(lines, "memory/kubepods/pod1/c1", "rss 1\nshmem 2\ntotal_rss 1000\ntotal_shmem 24\n");
        assert_eq!(estimate(&t), Some(1024));
        let t = fake_tree("4:memory:/c1\n", "memory/c1", "cache 9\nrss 100\nshmem 10\n");
        assert_eq!(estimate(&t), Some(110));
    }

    #[test]
    fn memory_estimate_cgroup_v2() {
        let t = fake_tree("0::/kubepods.slice/c1.scope\n", "kubepods.slice/c1.scope", "anon 4096\nfile 99\nshmem 8\n");
        assert_eq!(estimate(&t), Some(4104));
    }

    #[test]
    fn memory_estimate_missing() {
        let t = fake_tree("0::/gone\n", "elsewhere", "anon 1\n");
        assert_eq!(estimate(&t), None);
        let t = fake_tree("0::/c\n", "c", "file 1\n");
        assert_eq!(estimate(&t), None);
        let t = fake_tree("3:cpu:/c\n", "c", "anon 1\n");
        assert_eq!(estimate(&t), None);
        let err = memory_estimate(7, &t.path().join("proc"), &t.path().join("cg")).unwrap_err();
        assert!(err.to_string().contains("proc/7/cgroup"), "{err}");
    }

    #[test]
    fn check_space_writable_and_full() {
        let d = tempfile::tempdir().unwrap();
        check_space(d.path(), 1024).unwrap();
        assert!(fs::read_dir(d.path()).unwrap().next().is_none(), "probe file left behind");
        let err = check_space(d.path(), u64::MAX / 4).unwrap_err();
        let PreflightError::NoSpace { needed, available, .. } = &err else { panic!("{err}") };
        assert_eq!(*needed, u64::MAX / 4);
        assert!(*available > 0);
        let msg = err.to_string();
        assert!(msg.starts_with(&format!("{}: not enough free space", d.path().display())), "{msg}");
        assert!(msg.contains("plus a tenth and 16 MiB of headroom)") && msg.contains("available"), "{msg}");
    }

    #[test]
    fn no_space_message() {
        let err = PreflightError::NoSpace { dir: "/x".into(), needed: 256 * MIB, available: 12 * MIB };
        // No `%`: containerd formats a shim's error text (`%` would print as `%!(MISSING)`).
        let want = "/x: not enough free space for the checkpoint: need about 298 MiB (memory 256 MiB, plus a tenth \
                    and 16 MiB of headroom), \
                    12 MiB available";
        assert_eq!(err.to_string(), want);
    }

    #[test]
    fn check_space_not_writable() {
        let d = tempfile::tempdir().unwrap();
        let missing = d.path().join("missing");
        assert!(matches!(check_space(&missing, 0), Err(PreflightError::NotWritable { .. })));
    }
}
