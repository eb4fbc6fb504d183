//! Turning a runtime name or path into the absolute path the shim will exec.

use std::ffi::OsStr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

/// Searched after `$PATH`: containerd's environment is often minimal, and the
/// NVIDIA toolkit container installs its runtime under `/usr/local/nvidia/toolkit`.
pub const FALLBACK_DIRS: [&str; 4] = ["/usr/bin", "/usr/sbin", "/usr/local/bin", "/usr/local/nvidia/toolkit"];

/// Why a runtime could not be resolved.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ResolveError {
    #[error("`{0}` is neither a plain name nor an absolute path")]
    NotNameOrAbsolute(String),
    #[error("{} is not an executable file", .0.display())]
    NotExecutable(PathBuf),
    #[error("`{name}` not found in {}", join(.searched))]
    NotFound { name: String, searched: Vec<PathBuf> },
}

fn join(dirs: &[PathBuf]) -> String {
    dirs.iter().map(|d| d.display().to_string()).collect::<Vec<_>>().join(":")
}

/// Resolves `runtime` (a plain name, or an absolute path) against `search_path`
/// (a `$PATH` value) and then [`FALLBACK_DIRS`].
pub fn resolve(runtime: &str, search_path: Option<&OsStr>) -> Result<PathBuf, ResolveError> {
    if runtime.starts_with('/') {
        let p = PathBuf::from(runtime);
        return if is_executable(&p) { Ok(p) } else { Err(ResolveError::NotExecutable(p)) };
    }
    if runtime.is_empty() || runtime.contains('/') || runtime == "." || runtime == ".." {
        return Err(ResolveError::NotNameOrAbsolute(runtime.to_string()));
    }
    let mut searched: Vec<PathBuf> = Vec::new();
    let from_path = search_path.into_iter().flat_map(std::env::split_paths).filter(|d| d.is_absolute());
    for dir in from_path.chain(FALLBACK_DIRS.iter().map(PathBuf::from)) {
        if searched.contains(&dir) {
            continue;
        }
        let candidate = dir.join(runtime);
        if is_executable(&candidate) {
            return Ok(candidate);
        }
        searched.push(dir);
    }
    Err(ResolveError::NotFound { name: runtime.to_string(), searched })
}

fn is_executable(p: &Path) -> bool {
    std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;

    fn exe(dir: &Path, name: &str, mode: u32) -> PathBuf {
        let p = dir.join(name);
        fs::write(&p, "#!/bin/sh\n").unwrap();
        fs::set_permissions(&p, fs::Permissions::from_mode(mode)).unwrap();
        p
    }

    #[test]
    fn path_order_wins_and_non_executables_are_skipped() {
        let a = tempfile::tempdir().unwrap();
        let b = tempfile::tempdir().unwrap();
        exe(a.path(), "kbt-rt", 0o644);
        let want = exe(b.path(), "kbt-rt", 0o755);
        let path = std::env::join_paths([a.path(), b.path()]).unwrap();
        assert_eq!(resolve("kbt-rt", Some(&path)).unwrap(), want);
    }

    #[test]
    fn absolute_paths_must_be_executable_files() {
        let d = tempfile::tempdir().unwrap();
        let good = exe(d.path(), "rt", 0o700);
        assert_eq!(resolve(good.to_str().unwrap(), None).unwrap(), good);
        let bad = exe(d.path(), "data", 0o600);
        assert_eq!(resolve(bad.to_str().unwrap(), None), Err(ResolveError::NotExecutable(bad)));
        let dir = d.path().to_str().unwrap();
        assert!(matches!(resolve(dir, None), Err(ResolveError::NotExecutable(_))));
    }

    #[test]
    fn relative_paths_are_refused() {
        for name in ["./runc", "bin/runc", "", "..", "."] {
            assert!(matches!(resolve(name, None), Err(ResolveError::NotNameOrAbsolute(_))), "{name:?}");
        }
    }

    #[test]
    fn not_found_lists_every_dir_once() {
        let d = tempfile::tempdir().unwrap();
        let path = std::env::join_paths([d.path(), Path::new("/usr/bin"), Path::new("relative")]).unwrap();
        let err = resolve("kybernate-no-such-runtime", Some(&path)).unwrap_err();
        let ResolveError::NotFound { searched, .. } = &err else { panic!("{err:?}") };
        assert_eq!(searched[0], d.path());
        assert_eq!(searched.iter().filter(|p| *p == Path::new("/usr/bin")).count(), 1);
        assert!(searched.contains(&PathBuf::from("/usr/local/nvidia/toolkit")));
        assert!(!searched.contains(&PathBuf::from("relative")));
    }
}
