//! The private mount namespace a test bed's containerd (and every shim, runc and CRIU below it)
//! can run in: the test bed's seam for node files the product reads at fixed paths, so that the
//! product needs no test-only setting.
//!
//! Two things use it: a cgroup v2 test bed on a v1 machine ([`crate::cgroup`]: cgroup2 at
//! `/sys/fs/cgroup`), and [`crate::Builder::bind_over`] (a directory or file bind-mounted over a
//! node path, e.g. a fake NVIDIA driver tree over `/proc/driver`). Whatever is mounted there is
//! made private first, so nothing propagates back to the host. The test bed's own directory
//! stays shared ([`share`]): the rootfs mounts the shim makes inside the namespace show up in
//! the test's namespace too, where tests read them and cleanup unmounts them.

use std::ffi::CString;
use std::path::{Path, PathBuf};

use crate::{Error, Result};

/// Makes `dir` a shared mount (bound onto itself) in the test's namespace, so that mounts made
/// below it in a private namespace copied from this one propagate back here.
pub(crate) fn share(dir: &Path) -> Result<()> {
    let c = cstr(dir)?;
    let io = |what: &str| Error::Io {
        context: format!("{what} {} (test bed in a private mount namespace)", dir.display()),
        source: std::io::Error::last_os_error(),
    };
    // SAFETY: NUL-terminated paths; a null fstype and data are allowed for bind and propagation changes.
    unsafe {
        if libc::mount(c.as_ptr(), c.as_ptr(), std::ptr::null(), libc::MS_BIND, std::ptr::null()) != 0 {
            return Err(io("bind-mounting"));
        }
        if libc::mount(std::ptr::null(), c.as_ptr(), std::ptr::null(), libc::MS_SHARED, std::ptr::null()) != 0 {
            let err = io("making shared");
            libc::umount2(c.as_ptr(), libc::MNT_DETACH);
            return Err(err);
        }
    }
    Ok(())
}

/// `source` bind-mounted over `target` in the private namespace (see [`crate::Builder::bind_over`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct BindOver {
    pub(crate) target: PathBuf,
    pub(crate) source: PathBuf,
}

impl BindOver {
    /// Checks both paths before containerd starts: they exist, are of the same kind (directory
    /// or not), and the target is absolute.
    pub(crate) fn check(&self) -> Result<()> {
        let kind = |p: &Path| {
            std::fs::metadata(p).map(|m| m.is_dir()).map_err(|source| Error::Io {
                context: format!("bind_over: {} (test bed's private mount namespace)", p.display()),
                source,
            })
        };
        if !self.target.is_absolute() {
            return Err(Error::NotSetUp(format!("bind_over: target {} is not absolute", self.target.display())));
        }
        if kind(&self.target)? != kind(&self.source)? {
            return Err(Error::NotSetUp(format!(
                "bind_over: {} and {} are not both directories or both files",
                self.source.display(),
                self.target.display()
            )));
        }
        Ok(())
    }
}

/// The strings the child needs between fork and exec, made before the fork (no allocation there).
pub(crate) struct PrivateMounts {
    cgroup2: Option<Cgroup2>,
    binds: Vec<PreparedBind>,
}

struct Cgroup2 {
    sys: CString,
    root: CString,
    fstype: CString,
}

struct PreparedBind {
    /// The mount holding `target` (made private before the bind: a mount made on a shared one
    /// would propagate to its peers, the host's among them).
    holder: CString,
    target: CString,
    source: CString,
}

impl PrivateMounts {
    /// `cgroup2_at`: mount the cgroup2 hierarchy there (with `/sys` private); `binds` in order.
    pub(crate) fn new(cgroup2_at: Option<&str>, binds: &[BindOver]) -> Result<Self> {
        let cgroup2 = cgroup2_at
            .map(|root| -> Result<Cgroup2> {
                Ok(Cgroup2 {
                    sys: cstr(Path::new("/sys"))?,
                    root: cstr(Path::new(root))?,
                    fstype: cstr(Path::new("cgroup2"))?,
                })
            })
            .transpose()?;
        let mountinfo = std::fs::read_to_string("/proc/self/mountinfo")
            .map_err(|source| Error::Io { context: "reading /proc/self/mountinfo".into(), source })?;
        let points = mount_points(&mountinfo);
        let binds = binds
            .iter()
            .map(|b| {
                let target = b.target.canonicalize().map_err(|source| Error::Io {
                    context: format!("bind_over: resolving {}", b.target.display()),
                    source,
                })?;
                let holder = holder_of(&target, &points);
                Ok(PreparedBind { holder: cstr(&holder)?, target: cstr(&target)?, source: cstr(&b.source)? })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self { cgroup2, binds })
    }

    /// In the child before exec: a mount namespace of its own with the mounts above. Only raw
    /// syscalls (async-signal-safe).
    pub(crate) fn enter(&self) -> std::io::Result<()> {
        let err = std::io::Error::last_os_error;
        let null = std::ptr::null();
        // SAFETY: plain syscalls on NUL-terminated strings owned by self.
        unsafe {
            if libc::unshare(libc::CLONE_NEWNS) != 0 {
                return Err(err());
            }
            if let Some(c) = &self.cgroup2 {
                if libc::mount(null, c.sys.as_ptr(), null, libc::MS_REC | libc::MS_PRIVATE, std::ptr::null()) != 0 {
                    return Err(err());
                }
                if libc::umount2(c.root.as_ptr(), libc::MNT_DETACH) != 0 {
                    return Err(err());
                }
                if libc::mount(c.fstype.as_ptr(), c.root.as_ptr(), c.fstype.as_ptr(), 0, std::ptr::null()) != 0 {
                    return Err(err());
                }
            }
            for b in &self.binds {
                // Only the holder itself: a recursive change would also cut the test bed's shared
                // directory off when the holder is `/`.
                if libc::mount(null, b.holder.as_ptr(), null, libc::MS_PRIVATE, std::ptr::null()) != 0 {
                    return Err(err());
                }
                if libc::mount(
                    b.source.as_ptr(),
                    b.target.as_ptr(),
                    null,
                    libc::MS_BIND | libc::MS_REC,
                    std::ptr::null(),
                ) != 0
                {
                    return Err(err());
                }
                // A bind of a source on a shared mount joins its peer group: leave it.
                if libc::mount(null, b.target.as_ptr(), null, libc::MS_REC | libc::MS_PRIVATE, std::ptr::null()) != 0 {
                    return Err(err());
                }
            }
        }
        Ok(())
    }
}

/// Mount points of a mountinfo text (field 5, octal escapes decoded).
fn mount_points(mountinfo: &str) -> Vec<PathBuf> {
    mountinfo.lines().filter_map(|l| l.split(' ').nth(4)).map(|m| PathBuf::from(unescape(m))).collect()
}

/// The deepest mount point at or above `path` (`/` when none is listed).
fn holder_of(path: &Path, points: &[PathBuf]) -> PathBuf {
    points
        .iter()
        .filter(|p| path.starts_with(p))
        .max_by_key(|p| p.components().count())
        .cloned()
        .unwrap_or_else(|| PathBuf::from("/"))
}

/// Decodes mountinfo's `\040`-style escapes (space, tab, newline, backslash).
fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let octal = b.get(i + 1..i + 4).filter(|d| b[i] == b'\\' && d.iter().all(|c| (b'0'..=b'7').contains(c)));
        match octal {
            Some(d) => {
                out.push((d[0] - b'0') * 64 + (d[1] - b'0') * 8 + (d[2] - b'0'));
                i += 4;
            }
            None => {
                out.push(b[i]);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn cstr(p: &Path) -> Result<CString> {
    CString::new(p.as_os_str().as_encoded_bytes())
        .map_err(|e| Error::Io { context: format!("{}: path with NUL", p.display()), source: std::io::Error::other(e) })
}

#[cfg(test)]
mod tests {
    use super::*;

    const MOUNTINFO: &str = "22 27 0:21 / /proc rw,relatime - proc proc rw\n\
                             27 1 254:0 / / rw,relatime - ext4 /dev/vda rw\n\
                             50 22 0:40 / /proc/sys/fs/binfmt_misc rw - binfmt_misc binfmt_misc rw\n\
                             60 27 254:0 /x /var/lib/a\\040b rw shared:9 - ext4 /dev/vda rw\n";

    #[test]
    fn a_bind_target_is_held_by_its_deepest_mount() {
        let points = mount_points(MOUNTINFO);
        assert_eq!(holder_of(Path::new("/proc/driver"), &points), Path::new("/proc"));
        assert_eq!(holder_of(Path::new("/proc/sys/fs/binfmt_misc"), &points), Path::new("/proc/sys/fs/binfmt_misc"));
        assert_eq!(holder_of(Path::new("/var/lib/a b/c"), &points), Path::new("/var/lib/a b"));
        assert_eq!(holder_of(Path::new("/procx"), &points), Path::new("/"), "whole components only");
        assert_eq!(holder_of(Path::new("/etc"), &[]), Path::new("/"));
    }

    #[test]
    fn bind_overs_are_checked_before_containerd_starts() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("f");
        std::fs::write(&file, "x").unwrap();
        let ok = BindOver { target: dir.path().into(), source: dir.path().into() };
        assert!(ok.check().is_ok());
        let kinds = BindOver { target: dir.path().into(), source: file.clone() };
        assert!(kinds.check().unwrap_err().to_string().contains("not both directories"), "{:?}", kinds.check());
        let missing = BindOver { target: dir.path().into(), source: dir.path().join("none") };
        assert!(missing.check().unwrap_err().to_string().contains("none"));
        let relative = BindOver { target: "proc/driver".into(), source: dir.path().into() };
        assert!(relative.check().unwrap_err().to_string().contains("not absolute"));
    }
}
