//! Tearing down what containers leave on the host, by name.
//!
//! Containers outlive the processes that made them: runc state under [`CONTAINERD_RUNC_ROOT`],
//! shims (own session, survive containerd), rootfs mounts, cgroups, shim sockets. Everything here
//! is best effort and never panics, as it runs in `Drop`, possibly while a test is panicking.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Once;
use std::time::{Duration, Instant};

use crate::cri::CRI_NAMESPACE;
use crate::{CONTAINERD_RUNC_ROOT, RUN_BASE};

/// Runs [`sweep_stale`] once per process, before the first test bed or scratch dir.
pub(crate) fn sweep_stale_once() {
    static SWEEP: Once = Once::new();
    SWEEP.call_once(sweep_stale);
}

/// Removes leftovers of test processes that died without cleaning up (killed by a timeout, ^C):
/// everything named `kbt-<pid>-…` whose pid is gone.
pub(crate) fn sweep_stale() {
    let stale = |name: &str| match stale_owner(name) {
        Some(pid) => pid != std::process::id() && !Path::new(&format!("/proc/{pid}")).exists(),
        None => false,
    };
    for name in dir_names(Path::new(RUN_BASE)).into_iter().filter(|n| stale(n)) {
        eprintln!("kybernate-testbed: removing leftovers of a dead test process: {RUN_BASE}/{name}");
        let dir = Path::new(RUN_BASE).join(&name);
        // A systemd node first: killing its kbt-node and nspawn (below) would leave the node's
        // systemd, containerd, shims and containers running in their own PID namespace.
        crate::node::shut_down_abandoned(&dir);
        // A containerd whose PDEATHSIG did not fire: anything with an argument inside `dir`.
        kill_matching(|args| args.iter().any(|a| Path::new(a).starts_with(&dir)));
        scrub(&name, &dir);
    }
    for name in dir_names(Path::new(CONTAINERD_RUNC_ROOT)).into_iter().filter(|n| stale(n)) {
        scrub(&name, Path::new("/nonexistent"));
    }
    for ctrl in dir_names(Path::new("/sys/fs/cgroup")) {
        let ctrl = Path::new("/sys/fs/cgroup").join(ctrl);
        for name in dir_names(&ctrl).into_iter().filter(|n| stale(n)) {
            remove_cgroup_tree(&ctrl.join(name));
        }
        // What is left of a node whose kbt-node is gone, found by its cgroup.
        for name in dir_names(&ctrl) {
            if name.strip_prefix(crate::node::CGROUP_PREFIX).is_some_and(stale) {
                kill_cgroup(&ctrl.join(&name));
                remove_cgroup_tree(&ctrl.join(name));
            }
        }
    }
}

/// SIGKILLs every process in the cgroup at `path` and below, until none is left (at most 10 s):
/// a node's PID 1 among them takes its whole PID namespace with it.
pub(crate) fn kill_cgroup(path: &Path) {
    fn procs(path: &Path, out: &mut Vec<i32>) {
        let listed = std::fs::read_to_string(path.join("cgroup.procs")).unwrap_or_default();
        out.extend(listed.lines().filter_map(|l| l.trim().parse::<i32>().ok()));
        for child in dir_names(path) {
            let c = path.join(child);
            if c.is_dir() {
                procs(&c, out);
            }
        }
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let mut pids = Vec::new();
        procs(path, &mut pids);
        pids.retain(|p| alive(*p));
        if pids.is_empty() || Instant::now() > deadline {
            return;
        }
        for pid in pids {
            // SAFETY: plain syscall on a pid listed in the cgroup just now.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The pids of the processes (this one aside) whose argument vector matches.
pub(crate) fn pids_matching(matches: impl Fn(&[String]) -> bool) -> Vec<i32> {
    let me = std::process::id() as i32;
    processes().into_iter().filter(|(pid, args)| *pid != me && matches(args)).map(|(p, _)| p).collect()
}

/// The pid in a `kbt-<pid>-…` name.
fn stale_owner(name: &str) -> Option<u32> {
    name.strip_prefix("kbt-")?.split('-').next()?.parse().ok()
}

/// Removes everything left for one namespace / name: runc containers (in containerd's runc root
/// for `name` and in any runc root under `dir`), shims of namespace `name`, their sockets, mounts
/// under `dir`, cgroups named `name`, and `dir` itself. containerd must already be stopped.
pub(crate) fn scrub(name: &str, dir: &Path) {
    scrub_cri(dir);
    let ns_root = Path::new(CONTAINERD_RUNC_ROOT).join(name);
    let mut roots = vec![ns_root.clone()];
    roots.extend(runc_roots_under(dir));
    for root in &roots {
        runc_delete_all(root);
    }
    kill_matching(|args| args.windows(2).any(|w| w[0] == "-namespace" && w[1] == name));
    remove_shim_sockets(dir, name);
    unmount_under(dir);
    for path in [&ns_root, &dir.to_path_buf()] {
        let removed = match std::fs::symlink_metadata(path) {
            Err(_) => continue,
            Ok(m) if m.is_dir() => std::fs::remove_dir_all(path),
            // A node's console log is a file beside its dir (`<dir>.log`), swept by its name.
            Ok(_) => std::fs::remove_file(path),
        };
        if let Err(e) = removed {
            eprintln!("kybernate-testbed: cannot remove {}: {e}", path.display());
        }
    }
    for ctrl in dir_names(Path::new("/sys/fs/cgroup")) {
        remove_cgroup_tree(&Path::new("/sys/fs/cgroup").join(ctrl).join(name));
    }
}

/// Removes what CRI containers of the test bed in `dir` left in the shared namespace
/// [`CRI_NAMESPACE`], and nothing else there: a runc container is deleted only if its state names
/// a bundle under `dir` (containerd's bundles, or one a test made for a task it created straight
/// through a shim), a shim is killed only if its command line names a path under `dir` (its
/// `-address`), and the cgroups removed are `k8s.io/<id>` of those ids.
pub(crate) fn scrub_cri(dir: &Path) {
    let root = Path::new(CONTAINERD_RUNC_ROOT).join(CRI_NAMESPACE);
    let mut ids = dir_names(&dir.join("state/io.containerd.runtime.v2.task").join(CRI_NAMESPACE));
    for id in dir_names(&root) {
        if runc_bundle(&root.join(&id).join("state.json")).is_some_and(|b| b.starts_with(dir)) {
            runc_delete(&root, &id);
            if !ids.contains(&id) {
                ids.push(id);
            }
        }
    }
    if ids.is_empty() {
        return;
    }
    kill_matching(|args| {
        args.windows(2).any(|w| w[0] == "-namespace" && w[1] == CRI_NAMESPACE)
            && args.iter().any(|a| Path::new(a).starts_with(dir))
    });
    remove_shim_sockets(dir, CRI_NAMESPACE);
    for ctrl in dir_names(Path::new("/sys/fs/cgroup")) {
        for id in &ids {
            remove_cgroup_tree(&Path::new("/sys/fs/cgroup").join(&ctrl).join(CRI_NAMESPACE).join(id));
        }
    }
}

/// The bundle a runc state file names (its `bundle=` label, else its rootfs's parent).
fn runc_bundle(state: &Path) -> Option<PathBuf> {
    let v: serde_json::Value = serde_json::from_slice(&std::fs::read(state).ok()?).ok()?;
    let config = &v["config"];
    let from_label = config["labels"]
        .as_array()
        .into_iter()
        .flatten()
        .find_map(|l| l.as_str()?.strip_prefix("bundle=").map(PathBuf::from));
    from_label.or_else(|| Some(Path::new(config["rootfs"].as_str()?).parent()?.to_path_buf()))
}

/// `runc delete --force` for every container in a runc state root (kills their processes).
pub(crate) fn runc_delete_all(root: &Path) {
    if !root.is_dir() {
        return;
    }
    for id in dir_names(root) {
        if root.join(&id).join("state.json").exists() {
            runc_delete(root, &id);
        }
    }
}

/// `runc --root ROOT delete --force ID`, reporting failures.
fn runc_delete(root: &Path, id: &str) {
    let out =
        Command::new("runc").arg("--root").arg(root).args(["delete", "--force", id]).stdin(Stdio::null()).output();
    if let Ok(out) = out {
        if !out.status.success() && root.join(id).exists() {
            eprintln!(
                "kybernate-testbed: runc delete --force {id} (root {}): {}",
                root.display(),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
    }
}

/// Runc state roots below `dir`: directories holding `<id>/state.json`.
fn runc_roots_under(dir: &Path) -> Vec<PathBuf> {
    fn walk(dir: &Path, depth: usize, out: &mut Vec<PathBuf>) {
        let Ok(entries) = std::fs::read_dir(dir) else {
            return;
        };
        for e in entries.flatten() {
            let Ok(ft) = e.file_type() else { continue };
            if !ft.is_dir() {
                continue;
            }
            let p = e.path();
            if p.join("state.json").is_file() {
                if !out.iter().any(|r| r == dir) {
                    out.push(dir.to_path_buf());
                }
            } else if depth > 0 {
                walk(&p, depth - 1, out);
            }
        }
    }
    let mut out = Vec::new();
    walk(dir, 3, &mut out);
    out
}

/// SIGKILLs every process whose argument vector matches, then waits (briefly) until they are gone.
pub(crate) fn kill_matching(matches: impl Fn(&[String]) -> bool) {
    let pids = pids_matching(matches);
    for &pid in &pids {
        // SAFETY: plain syscall on a pid we just read; a reused pid cannot match the same argv.
        unsafe { libc::kill(pid, libc::SIGKILL) };
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    while pids.iter().any(|p| alive(*p)) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// True while a process exists and is not a zombie.
pub(crate) fn alive(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state letter follows the parenthesised command name.
        Ok(stat) => stat.rsplit_once(')').map(|(_, rest)| !rest.trim_start().starts_with('Z')).unwrap_or(false),
        Err(_) => false,
    }
}

/// (pid, argv) of every process on the host.
fn processes() -> Vec<(i32, Vec<String>)> {
    let mut out = Vec::new();
    for name in dir_names(Path::new("/proc")) {
        let Ok(pid) = name.parse::<i32>() else {
            continue;
        };
        let Ok(raw) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
            continue;
        };
        let args =
            raw.split(|b| *b == 0).filter(|a| !a.is_empty()).map(|a| String::from_utf8_lossy(a).into_owned()).collect();
        out.push((pid, args));
    }
    out
}

/// Removes the sockets of shims for namespace `ns` whose bundles lived under `dir`: a killed shim
/// leaves `/run/containerd/s/<hash>` behind, and the bundle's `address` file names it.
fn remove_shim_sockets(dir: &Path, ns: &str) {
    let tasks = dir.join("state/io.containerd.runtime.v2.task").join(ns);
    for id in dir_names(&tasks) {
        let Ok(addr) = std::fs::read_to_string(tasks.join(id).join("address")) else {
            continue;
        };
        let path = addr.trim().trim_start_matches("unix://");
        if path.starts_with("/run/containerd/s/") {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// Lazily unmounts every mount point at or below `dir`, deepest first.
pub(crate) fn unmount_under(dir: &Path) {
    let mut points: Vec<PathBuf> = mount_points().into_iter().filter(|m| m.starts_with(dir)).collect();
    points.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    for p in points {
        let Ok(c) = std::ffi::CString::new(p.as_os_str().as_encoded_bytes()) else {
            continue;
        };
        // SAFETY: c is a valid NUL-terminated path.
        if unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) } != 0 {
            eprintln!("kybernate-testbed: umount {}: {}", p.display(), std::io::Error::last_os_error());
        }
    }
}

/// Mount points of this mount namespace (field 5 of /proc/self/mountinfo, octal escapes decoded).
fn mount_points() -> Vec<PathBuf> {
    let text = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    text.lines().filter_map(|l| l.split(' ').nth(4)).map(|m| PathBuf::from(unescape_mountinfo(m))).collect()
}

/// Decodes the `\040`-style escapes mountinfo uses for space, tab, newline and backslash.
fn unescape_mountinfo(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 3 < b.len() && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c)) {
            out.push((b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0'));
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Removes a cgroup directory and its children bottom-up (rmdir only succeeds on empty cgroups).
fn remove_cgroup_tree(path: &Path) {
    if !path.is_dir() {
        return;
    }
    for child in dir_names(path) {
        let c = path.join(child);
        if c.is_dir() {
            remove_cgroup_tree(&c);
        }
    }
    let _ = std::fs::remove_dir(path);
}

/// Names of the entries of a directory (empty if unreadable).
pub(crate) fn dir_names(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .map(|rd| rd.flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_owner_pid_from_names() {
        assert_eq!(stale_owner("kbt-123-4"), Some(123));
        assert_eq!(stale_owner("kbt-123-4-scratch-abc"), Some(123));
        assert_eq!(stale_owner("default"), None);
        assert_eq!(stale_owner("kbt-x-1"), None);
    }

    #[test]
    fn finds_the_bundle_of_a_runc_state() {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("state.json");
        std::fs::write(&state, r#"{"config":{"rootfs":"/r/b/rootfs","labels":["x=y","bundle=/b/k8s.io/abc"]}}"#)
            .unwrap();
        assert_eq!(runc_bundle(&state), Some(PathBuf::from("/b/k8s.io/abc")));
        std::fs::write(&state, r#"{"config":{"rootfs":"/r/b/rootfs"}}"#).unwrap();
        assert_eq!(runc_bundle(&state), Some(PathBuf::from("/r/b")));
        assert_eq!(runc_bundle(&dir.path().join("none")), None);
    }

    #[test]
    fn unescapes_mountinfo_paths() {
        assert_eq!(unescape_mountinfo("/a\\040b"), "/a b");
        assert_eq!(unescape_mountinfo("/plain"), "/plain");
        assert_eq!(unescape_mountinfo("/end\\04"), "/end\\04");
    }
}
