//! Where a process's cgroups live on this host.
//!
//! Both the OOM watcher and the stats collector need the same answer, so the
//! parsing of `/proc/<pid>/cgroup` and `/proc/self/mountinfo` lives here once.
//! The parsers are pure functions so they can be tested with canned text.

use std::collections::BTreeMap;
use std::io;
use std::path::{Path, PathBuf};

use thiserror::Error;

/// Why a process's cgroup could not be located.
#[derive(Debug, Error)]
pub enum CgroupError {
    #[error("read {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("no cgroup hierarchy found for the process (neither a v1 controller nor a v2 mount)")]
    NoHierarchy,
    #[error("cgroup {path} is not under the mount root {root} of {mount_point}")]
    NotVisible { path: String, root: String, mount_point: PathBuf },
}

/// One line of `/proc/<pid>/cgroup`: `hierarchy-id:controllers:path`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProcCgroup {
    pub hierarchy: u32,
    /// Empty for the v2 line (`0::/path`); `name=systemd` style names are kept as is.
    pub controllers: Vec<String>,
    pub path: String,
}

/// Which cgroup filesystem a mount is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MountKind {
    /// `cgroup` with the super options (controllers appear among them, e.g. `rw,cpu,cpuacct`).
    V1 { options: Vec<String> },
    /// `cgroup2`, the unified hierarchy.
    V2,
}

/// A cgroup filesystem mount from mountinfo.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CgroupMount {
    /// The cgroup path that is mounted (field 4 of mountinfo); `/` unless in a nested namespace.
    pub root: String,
    pub mount_point: PathBuf,
    pub kind: MountKind,
}

/// A process's resolved cgroup directories.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Cgroup {
    /// cgroup v1 (or hybrid): controller name (`memory`, `cpuacct`, ...) to directory.
    V1(BTreeMap<String, PathBuf>),
    /// cgroup v2: the single unified directory.
    V2(PathBuf),
}

impl Cgroup {
    /// Resolves the cgroups of `pid` as seen from this process's mount namespace.
    pub fn for_pid(pid: u32) -> Result<Cgroup, CgroupError> {
        let proc_path = PathBuf::from(format!("/proc/{pid}/cgroup"));
        let proc_cgroup = read(&proc_path)?;
        let mountinfo = read(Path::new("/proc/self/mountinfo"))?;
        Cgroup::resolve(&proc_cgroup, &mountinfo)
    }

    /// Resolves from the contents of `/proc/<pid>/cgroup` and `/proc/self/mountinfo`.
    ///
    /// A host with v1 controllers mounted is treated as v1 even when a (controller-less)
    /// unified hierarchy is also mounted, as systemd's hybrid mode does: the controllers,
    /// and so the numbers containerd wants, are in v1.
    pub fn resolve(proc_cgroup: &str, mountinfo: &str) -> Result<Cgroup, CgroupError> {
        let entries = parse_proc_cgroup(proc_cgroup);
        let mounts = parse_mountinfo(mountinfo);

        let mut v1 = BTreeMap::new();
        for entry in entries.iter().filter(|e| e.hierarchy != 0) {
            for controller in entry.controllers.iter().filter(|c| !c.starts_with("name=")) {
                let mount = mounts.iter().find(|m| match &m.kind {
                    MountKind::V1 { options } => options.contains(controller) && is_under(&entry.path, &m.root),
                    MountKind::V2 => false,
                });
                if let Some(mount) = mount {
                    v1.insert(controller.clone(), join_under_mount(mount, &entry.path)?);
                }
            }
        }
        if !v1.is_empty() {
            return Ok(Cgroup::V1(v1));
        }

        let unified = entries.iter().find(|e| e.hierarchy == 0 && e.controllers.is_empty());
        let mount = mounts.iter().find(|m| m.kind == MountKind::V2);
        match (unified, mount) {
            (Some(entry), Some(mount)) => Ok(Cgroup::V2(join_under_mount(mount, &entry.path)?)),
            _ => Err(CgroupError::NoHierarchy),
        }
    }

    /// The v1 directory of `controller`, if this is a v1 cgroup that has it.
    pub fn v1_dir(&self, controller: &str) -> Option<&Path> {
        match self {
            Cgroup::V1(dirs) => dirs.get(controller).map(PathBuf::as_path),
            Cgroup::V2(_) => None,
        }
    }
}

/// Parses `/proc/<pid>/cgroup`; malformed lines are skipped.
pub fn parse_proc_cgroup(content: &str) -> Vec<ProcCgroup> {
    content
        .lines()
        .filter_map(|line| {
            let mut parts = line.splitn(3, ':');
            let hierarchy = parts.next()?.trim().parse().ok()?;
            let controllers = parts.next()?;
            let path = parts.next()?;
            let controllers = controllers.split(',').filter(|c| !c.is_empty()).map(str::to_owned).collect::<Vec<_>>();
            Some(ProcCgroup { hierarchy, controllers, path: path.to_owned() })
        })
        .collect()
}

/// Parses the cgroup and cgroup2 mounts out of a mountinfo file; other lines are skipped.
pub fn parse_mountinfo(content: &str) -> Vec<CgroupMount> {
    content.lines().filter_map(parse_mountinfo_line).collect()
}

fn parse_mountinfo_line(line: &str) -> Option<CgroupMount> {
    // id parent major:minor root mount-point options [optional...] - fstype source super-options
    let (left, right) = line.split_once(" - ")?;
    let left: Vec<&str> = left.split(' ').collect();
    let mut right = right.split(' ');
    let fstype = right.next()?;
    let _source = right.next()?;
    let super_options = right.next().unwrap_or("");
    if left.len() < 6 {
        return None;
    }
    let root = unescape(left[3]);
    let mount_point = PathBuf::from(unescape(left[4]));
    let kind = match fstype {
        "cgroup" => MountKind::V1 { options: super_options.split(',').map(str::to_owned).collect() },
        "cgroup2" => MountKind::V2,
        _ => return None,
    };
    Some(CgroupMount { root, mount_point, kind })
}

/// Undoes mountinfo's octal escapes (`\040` for a space, ...).
fn unescape(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\' && i + 3 < bytes.len() && bytes[i + 1..i + 4].iter().all(|b| (b'0'..=b'7').contains(b)) {
            let value = bytes[i + 1..i + 4].iter().fold(0u32, |acc, b| acc * 8 + u32::from(b - b'0'));
            if let Ok(byte) = u8::try_from(value) {
                out.push(byte);
                i += 4;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn is_under(path: &str, root: &str) -> bool {
    root == "/" || path == root || path.strip_prefix(root).is_some_and(|rest| rest.starts_with('/'))
}

fn join_under_mount(mount: &CgroupMount, path: &str) -> Result<PathBuf, CgroupError> {
    let relative = if mount.root == "/" {
        path
    } else if path == mount.root {
        ""
    } else {
        match path.strip_prefix(mount.root.as_str()).filter(|rest| rest.starts_with('/')) {
            Some(rest) => rest,
            None => {
                return Err(CgroupError::NotVisible {
                    path: path.to_owned(),
                    root: mount.root.clone(),
                    mount_point: mount.mount_point.clone(),
                })
            }
        }
    };
    let relative = relative.trim_start_matches('/');
    Ok(if relative.is_empty() { mount.mount_point.clone() } else { mount.mount_point.join(relative) })
}

fn read(path: &Path) -> Result<String, CgroupError> {
    std::fs::read_to_string(path).map_err(|source| CgroupError::Read { path: path.to_owned(), source })
}

/// Whether this host's `/sys/fs/cgroup` is the unified (v2) hierarchy, as runc decides it.
pub fn host_is_v2() -> bool {
    is_cgroup2(Path::new("/sys/fs/cgroup"))
}

fn is_cgroup2(path: &Path) -> bool {
    let Ok(c) = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()) else { return false };
    // SAFETY: c is NUL-terminated; st is written by statfs.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    (unsafe { libc::statfs(c.as_ptr(), &mut st) } == 0) && st.f_type == libc::CGROUP2_SUPER_MAGIC
}

/// At a restore on cgroup v2: the new container's cgroup, for CRIU's `cgroup-root`.
///
/// runc (1.1) names the new container's cgroups to CRIU only on v1 (one root per controller);
/// on v2 CRIU then puts the restored processes back into the cgroup they were dumped from (the
/// old container's, recreated), where the new container's limits, its freezer (pause, and the
/// checkpoint's own freeze) and its stats do not reach them. `cgroups_path` is the spec's
/// `linux.cgroupsPath`: a path (cgroupfs driver) or `slice:prefix:name` (systemd driver).
/// `None` when the spec names none (runc would pick one we cannot know).
///
/// CRIU's `--manage-cgroups` mode is left to runc's default (none given: CRIU's `soft`), on v2
/// as on v1: runc has made the cgroup and set the new spec's limits before CRIU runs, and in
/// soft mode CRIU only moves the restored tasks into it (below `cgroup-root`) without writing
/// the dumped properties over existing cgroups.
pub fn restore_root(cgroups_path: Option<&str>, systemd: bool) -> Option<String> {
    let relative = cgroups_path.is_some_and(|p| !systemd && !p.is_empty() && !p.starts_with('/'));
    let own = if relative { own_v2_cgroup() } else { None };
    restore_root_with(cgroups_path, systemd, own.as_deref())
}

/// [`restore_root`] with this process's v2 cgroup (the `0::` line of `/proc/self/cgroup`) given:
/// runc, started by the shim, is in the same one, and resolves a relative `cgroupsPath` on v2
/// below that cgroup's parent (libcontainer's fs2 `defaultDirPath`). `None` for a relative
/// path when `own_v2` is unknown.
pub fn restore_root_with(cgroups_path: Option<&str>, systemd: bool, own_v2: Option<&str>) -> Option<String> {
    let path = cgroups_path.filter(|p| !p.is_empty())?;
    if !systemd {
        let inner = clean_path(path);
        if inner.starts_with('/') {
            return Some(inner);
        }
        let parent = clean_path(&format!("{}/..", clean_path(own_v2?)));
        return Some(clean_path(&format!("{parent}/{inner}")));
    }
    // runc: exactly three fields, else it refuses the spec ("expected cgroupsPath to be of
    // format slice:prefix:name").
    let parts: Vec<&str> = path.split(':').collect();
    let [slice, prefix, name] = parts[..] else { return None };
    let slice = if slice.is_empty() { "system.slice" } else { slice };
    let parent = expand_slice(slice)?;
    let unit = if name.ends_with(".slice") { name.to_string() } else { format!("{prefix}-{name}.scope") };
    Some(format!("{}/{unit}", parent.trim_end_matches('/')))
}

/// This process's cgroup v2 path (`0::PATH` of `/proc/self/cgroup`).
fn own_v2_cgroup() -> Option<String> {
    let text = std::fs::read_to_string("/proc/self/cgroup").ok()?;
    parse_proc_cgroup(&text).into_iter().find(|e| e.hierarchy == 0 && e.controllers.is_empty()).map(|e| e.path)
}

/// runc's `CleanPath`: `.`, `..` and repeated slashes resolved lexically, never above the root,
/// relative paths kept relative (`.` when nothing is left), absolute ones absolute. Like runc, a
/// relative path is cleaned as if it were absolute and then made relative again.
fn clean_path(path: &str) -> String {
    let absolute = kybernate_checkpoint::grants::spec::clean_path(path);
    if path.starts_with('/') {
        return absolute;
    }
    match absolute.trim_start_matches('/') {
        "" => ".".into(),
        relative => relative.into(),
    }
}

/// systemd's slice nesting: `a-b-c.slice` is `/a.slice/a-b.slice/a-b-c.slice`, `-.slice` the root.
fn expand_slice(slice: &str) -> Option<String> {
    let stem = slice.strip_suffix(".slice")?;
    if stem == "-" {
        return Some("/".into());
    }
    if stem.is_empty() || stem.starts_with('-') || stem.ends_with('-') || stem.contains("--") || stem.contains('/') {
        return None;
    }
    let mut out = String::new();
    let mut prefix = String::new();
    for (i, part) in stem.split('-').enumerate() {
        if i > 0 {
            prefix.push('-');
        }
        prefix.push_str(part);
        out.push_str(&format!("/{prefix}.slice"));
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    const HYBRID_PROC: &str = "9:name=systemd:/\n8:pids:/kubepods/pod1/c1\n7:blkio:/\n4:memory:/kubepods/pod1/c1\n\
                               2:cpuacct,cpu:/kubepods/pod1/c1\n0::/\n";
    const HYBRID_MOUNTINFO: &str = "\
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu,cpuacct rw,relatime shared:9 - cgroup cgroup rw,cpu,cpuacct
35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
38 31 0:35 / /sys/fs/cgroup/blkio rw,relatime - cgroup cgroup rw,blkio
39 31 0:36 / /sys/fs/cgroup/pids rw,relatime - cgroup cgroup rw,pids
40 31 0:37 / /sys/fs/cgroup/systemd rw,relatime - cgroup cgroup rw,xattr,name=systemd
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
";

    #[test]
    fn parses_proc_cgroup_lines() {
        let entries = parse_proc_cgroup("4:memory:/a/b\n2:cpuacct,cpu:/\n0::/x:y\ngarbage\n");
        assert_eq!(
            entries,
            vec![
                ProcCgroup { hierarchy: 4, controllers: vec!["memory".into()], path: "/a/b".into() },
                ProcCgroup { hierarchy: 2, controllers: vec!["cpuacct".into(), "cpu".into()], path: "/".into() },
                ProcCgroup { hierarchy: 0, controllers: vec![], path: "/x:y".into() },
            ]
        );
    }

    #[test]
    fn parses_mountinfo_cgroup_lines_only() {
        let mounts = parse_mountinfo(HYBRID_MOUNTINFO);
        assert_eq!(mounts.len(), 6);
        assert_eq!(mounts[0].mount_point, PathBuf::from("/sys/fs/cgroup/cpu,cpuacct"));
        assert_eq!(mounts[0].kind, MountKind::V1 { options: vec!["rw".into(), "cpu".into(), "cpuacct".into()] });
        assert_eq!(
            mounts[5],
            CgroupMount { root: "/".into(), mount_point: "/sys/fs/cgroup/unified".into(), kind: MountKind::V2 }
        );
    }

    #[test]
    fn mountinfo_octal_escapes_are_undone() {
        let mounts = parse_mountinfo("50 1 0:40 /a\\040b /mnt/my\\040cg rw - cgroup2 none rw\n");
        assert_eq!(mounts[0].root, "/a b");
        assert_eq!(mounts[0].mount_point, PathBuf::from("/mnt/my cg"));
    }

    #[test]
    fn hybrid_host_resolves_to_v1_controllers() {
        let cg = Cgroup::resolve(HYBRID_PROC, HYBRID_MOUNTINFO).unwrap();
        assert_eq!(cg.v1_dir("memory"), Some(Path::new("/sys/fs/cgroup/memory/kubepods/pod1/c1")));
        assert_eq!(cg.v1_dir("cpu"), Some(Path::new("/sys/fs/cgroup/cpu,cpuacct/kubepods/pod1/c1")));
        assert_eq!(cg.v1_dir("cpuacct"), Some(Path::new("/sys/fs/cgroup/cpu,cpuacct/kubepods/pod1/c1")));
        assert_eq!(cg.v1_dir("pids"), Some(Path::new("/sys/fs/cgroup/pids/kubepods/pod1/c1")));
        assert_eq!(cg.v1_dir("blkio"), Some(Path::new("/sys/fs/cgroup/blkio")));
        assert_eq!(cg.v1_dir("name=systemd"), None);
    }

    #[test]
    fn unified_host_resolves_to_v2_dir() {
        let mountinfo = "30 23 0:26 / /sys/fs/cgroup rw,nosuid - cgroup2 cgroup2 rw,nsdelegate\n";
        let cg = Cgroup::resolve("0::/system.slice/kyb.scope\n", mountinfo).unwrap();
        assert_eq!(cg, Cgroup::V2(PathBuf::from("/sys/fs/cgroup/system.slice/kyb.scope")));
        assert_eq!(cg.v1_dir("memory"), None);
    }

    #[test]
    fn nested_mount_root_is_stripped() {
        let mountinfo = "30 23 0:26 /docker/abc /sys/fs/cgroup rw - cgroup2 cgroup2 rw\n";
        let cg = Cgroup::resolve("0::/docker/abc/inner\n", mountinfo).unwrap();
        assert_eq!(cg, Cgroup::V2(PathBuf::from("/sys/fs/cgroup/inner")));
        let err = Cgroup::resolve("0::/elsewhere\n", mountinfo).unwrap_err();
        assert!(matches!(err, CgroupError::NotVisible { .. }), "{err}");
    }

    #[test]
    fn nothing_mounted_is_an_error() {
        let err = Cgroup::resolve("4:memory:/a\n0::/\n", "").unwrap_err();
        assert!(matches!(err, CgroupError::NoHierarchy), "{err}");
    }

    #[test]
    fn this_process_resolves() {
        let cg = Cgroup::for_pid(std::process::id()).unwrap();
        match &cg {
            Cgroup::V1(dirs) => assert!(dirs.values().all(|d| d.is_dir()), "{cg:?}"),
            Cgroup::V2(dir) => assert!(dir.is_dir(), "{cg:?}"),
        }
    }

    #[test]
    fn the_restore_root_is_the_new_containers_cgroup_for_either_driver() {
        assert_eq!(restore_root(Some("/k8s.io/abc"), false).as_deref(), Some("/k8s.io/abc"));
        assert_eq!(restore_root(Some("//k8s.io/./x/../abc/"), false).as_deref(), Some("/k8s.io/abc"));
        assert_eq!(restore_root(None, false), None);
        assert_eq!(restore_root(Some(""), true), None);
        assert_eq!(
            restore_root(Some("kubepods-besteffort-pod12.slice:cri-containerd:abc"), true).as_deref(),
            Some("/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod12.slice/cri-containerd-abc.scope")
        );
        assert_eq!(
            restore_root(Some(":cri-containerd:abc"), true).as_deref(),
            Some("/system.slice/cri-containerd-abc.scope")
        );
        assert_eq!(restore_root(Some("-.slice:x:y"), true).as_deref(), Some("/x-y.scope"));
        assert_eq!(restore_root(Some("user.slice:x:app.slice"), true).as_deref(), Some("/user.slice/app.slice"));
        // Not systemd's form: no guess (runc refuses these specs too).
        assert_eq!(restore_root(Some("a--b.slice:x:y"), true), None);
        assert_eq!(restore_root(Some("nocolons"), true), None);
        assert_eq!(restore_root(Some("system.slice:x:y:z"), true), None);
        assert_eq!(restore_root(Some("a/b.slice:x:y"), true), None);
        assert_eq!(restore_root(Some(".slice:x:y"), true), None);
    }

    #[test]
    fn a_relative_cgroupfs_path_is_below_the_parent_of_runcs_own_cgroup_as_runc_resolves_it() {
        // runc's fs2 manager: relative to the parent of its own cgroup, which is the shim's.
        let own = Some("/system.slice/containerd.service");
        assert_eq!(restore_root_with(Some("default/web"), false, own).as_deref(), Some("/system.slice/default/web"));
        assert_eq!(restore_root_with(Some("default/web"), false, Some("/")).as_deref(), Some("/default/web"));
        assert_eq!(restore_root_with(Some("../../x"), false, own).as_deref(), Some("/system.slice/x"));
        assert_eq!(restore_root_with(Some("default/web"), false, None), None, "no guess without the own cgroup");
        // Absolute paths and systemd's form do not depend on it.
        assert_eq!(restore_root_with(Some("/default/web"), false, None).as_deref(), Some("/default/web"));
        assert_eq!(
            restore_root_with(Some("kubepods.slice:cri-containerd:abc"), true, None).as_deref(),
            Some("/kubepods.slice/cri-containerd-abc.scope")
        );
        // This process: a relative path lands below its own cgroup's parent.
        let mine = own_v2_cgroup().expect("a 0:: line in /proc/self/cgroup");
        let got = restore_root(Some("kbt/x"), false).unwrap();
        let parent = clean_path(&format!("{mine}/.."));
        assert_eq!(got, clean_path(&format!("{parent}/kbt/x")));
    }

    #[test]
    fn paths_are_cleaned_as_runc_cleans_them() {
        assert_eq!(clean_path("/a//b/./c/.."), "/a/b");
        assert_eq!(clean_path("/../.."), "/");
        assert_eq!(clean_path("a/../../b"), "b");
        assert_eq!(clean_path("a/.."), ".");
        assert_eq!(clean_path("/"), "/");
    }
}
