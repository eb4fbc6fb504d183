//! The shim binary's actions as containerd-shim runs them: `start` (the start path is
//! [`bootstrap`]'s), `delete` (clean up after a dead daemon), and a daemon that containerd-shim's
//! own bootstrap started.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use containerd_shim::publisher::RemotePublisher;
use containerd_shim::{util, Config, DeleteResponse, ExitSignal, Flags, Shim, StartOpts};

use crate::bootstrap;
use crate::checkpoint;
use crate::container::RuntimeRecord;
use crate::events::RemoteEvents;
use crate::factory::unmount_rootfs;
use crate::options::ShimOptions;
use crate::runtime::{ContainerStatus, OciRuntime, RuntimeOpts};
use crate::spawn::{GroupRecord, MonitorSpawner};
use crate::task::TaskService;

pub struct Service {
    id: String,
    namespace: String,
    bundle: PathBuf,
    exit: Arc<ExitSignal>,
}

impl Shim for Service {
    type T = TaskService;

    fn new(_runtime_id: &str, args: &Flags, _config: &mut Config) -> Self {
        Service {
            id: args.id.clone(),
            namespace: args.namespace.clone(),
            bundle: if args.bundle.is_empty() { PathBuf::from(".") } else { PathBuf::from(&args.bundle) },
            exit: Arc::new(ExitSignal::default()),
        }
    }

    /// Runs in the bundle dir: see [`bootstrap::start`].
    fn start_shim(&mut self, opts: StartOpts) -> containerd_shim::Result<String> {
        bootstrap::start(&opts)
    }

    /// containerd calls `delete` when the daemon died: remove what it left, within containerd's
    /// 5 s. A daemon killed during a checkpoint or restore may have left CRIU running (tracing
    /// the container), the container frozen, runtime state without a container, the rootfs
    /// mounted and a partial checkpoint: each is undone here, so that the id can be used again.
    fn delete_shim(&mut self) -> containerd_shim::Result<DeleteResponse> {
        let bundle = self.bundle.clone();
        // First, so that nothing traces or freezes the container while it is deleted, and nothing
        // writes into the partial checkpoint removed below.
        GroupRecord::in_bundle(&bundle).kill_leftovers();
        let record = RuntimeRecord::read(&bundle).ok();
        let binary = match &record {
            Some(r) => Some(r.binary.clone()),
            None => kybernate_runtime_select::resolve("runc", std::env::var_os("PATH").as_deref()).ok(),
        };
        let root = record
            .as_ref()
            .map(|r| r.root.clone())
            .unwrap_or_else(|| ShimOptions::default().runtime_root(&self.namespace));
        // containerd runs this after every shim exit, on the critical path of `ctr run --rm`: after a
        // normal delete the runtime keeps no state (runc: <root>/<id>), and there is nothing to force.
        if let Some(binary) = binary.filter(|_| root.join(&self.id).exists()) {
            let systemd_cgroup = record.as_ref().is_some_and(|r| r.systemd_cgroup);
            let rt = OciRuntime::new(
                RuntimeOpts { binary, root, systemd_cgroup, criu: None, criu_env: vec![] },
                Arc::new(MonitorSpawner),
            );
            force_delete(&rt, &self.id, &bundle);
        }
        unmount_rootfs(&bundle.join("rootfs"));
        // A CRIU killed during a restore leaves its cgroup yard (`.criu.cgyard.*`) mounted in its
        // work dir, `<bundle>/work`, a link into containerd's root, which containerd then cannot remove.
        if let Ok(work) = std::fs::canonicalize(bundle.join("work")) {
            unmount_rootfs(&work);
        }
        checkpoint::remove_recorded_partial(&bundle);
        Ok(DeleteResponse {
            exit_status: 128 + libc::SIGKILL as u32,
            exited_at: Some(util::timestamp()?).into(),
            ..Default::default()
        })
    }

    fn wait(&mut self) {
        self.exit.wait();
        // containerd-shim reads `./address` on the way out to remove the socket; in a
        // grouped shim our cwd is the first container's bundle, which may be gone by now.
        if std::fs::metadata("address").is_err() {
            if let Ok(addr) = std::env::var(ADDRESS_ENV) {
                let dir = exit_dir();
                if std::fs::create_dir_all(&dir).is_ok() && std::env::set_current_dir(&dir).is_ok() {
                    let _ = util::write_address(&addr);
                }
            }
        }
    }

    /// containerd-shim's bootstrap (a daemon not started by ours) connected `publisher`; we send
    /// events through our own connection instead (events.rs says why), dialled lazily here.
    fn create_task_service(&self, publisher: RemotePublisher) -> TaskService {
        drop(publisher);
        let ttrpc_address = std::env::var("TTRPC_ADDRESS").unwrap_or_default();
        TaskService::for_daemon(&self.id, &self.namespace, RemoteEvents::lazy(ttrpc_address), self.exit.clone())
    }
}

/// `delete --force` of a container whose shim died. runc cannot kill a frozen container (the
/// SIGKILL waits for the thaw, and runc gives up after 10 s): a container left frozen by a
/// checkpoint (our pause, or CRIU's freezer) is thawed first. A state dir that runc does not
/// count as a container (no `state.json`: `runc restore` killed before it saved one) would make
/// the next create of this id fail with "file exists": it is removed, with what runc had mounted
/// there.
fn force_delete(rt: &OciRuntime, id: &str, bundle: &Path) {
    if let Ok(st) = rt.state(id, bundle) {
        if matches!(st.status, ContainerStatus::Paused | ContainerStatus::Pausing) {
            if let Err(e) = rt.resume(id, bundle) {
                eprintln!("delete {id}: thaw: {e}");
            }
        }
    }
    if let Err(e) = rt.delete(id, bundle, true) {
        if !e.is_not_found() {
            eprintln!("delete {id}: {e}");
        }
    }
    let state_dir = rt.opts().root.join(id);
    if state_dir.is_dir() && !state_dir.join("state.json").exists() {
        // `runc restore` bind-mounts the rootfs at `<state dir>/criu-root` while CRIU runs.
        unmount_rootfs(&state_dir);
        if let Err(e) = std::fs::remove_dir_all(&state_dir) {
            eprintln!("delete {id}: remove {}: {e}", state_dir.display());
        }
        // runc made the cgroups, but no longer knows them.
        let spec = kybernate_runtime_select::load_spec(bundle).ok();
        if let Some(path) = spec.as_ref().and_then(|s| s.cgroups_path()).filter(|p| p.starts_with('/')) {
            remove_cgroups(id, Path::new(CGROUP_ROOT), path);
        }
    }
}

/// Where the cgroup hierarchies are mounted: one per v1 controller below it, or v2 itself.
const CGROUP_ROOT: &str = "/sys/fs/cgroup";

/// Kills what is left in the cgroup `path` (as `linux.cgroupsPath` gives it, absolute) of every
/// hierarchy under `root`, thawing a frozen v1 freezer so that the kill lands, and removes the
/// cgroups, innermost first. For a container runc no longer knows; systemd-managed paths
/// (`slice:prefix:name`) are not handled. Only a cgroup named for the container (the last part
/// of the path is its id, as containerd and CRI name them): a spec's `cgroupsPath` naming a
/// shared cgroup (`/system.slice`, a pod's) must not get everything in it killed.
fn remove_cgroups(id: &str, root: &Path, path: &str) {
    let rel = path.trim_start_matches('/');
    if rel.is_empty() || rel.split('/').any(|c| c == ".." || c == ".") || rel.rsplit('/').next() != Some(id) {
        eprintln!("delete {id}: cgroup {path} is not named for the container: left alone");
        return;
    }
    let mut dirs: Vec<PathBuf> = vec![root.join(rel)];
    if let Ok(entries) = std::fs::read_dir(root) {
        // v1: each controller's hierarchy (the comma-joined names are links to one of them).
        dirs.extend(entries.flatten().filter(|e| e.file_type().is_ok_and(|t| t.is_dir())).map(|e| e.path().join(rel)));
    }
    dirs.retain(|d| d.is_dir());
    for dir in &dirs {
        let _ = std::fs::write(dir.join("freezer.state"), "THAWED");
        let _ = std::fs::write(dir.join("cgroup.freeze"), "0");
    }
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
    for dir in &dirs {
        while let Some(pids) = cgroup_pids(dir).filter(|p| !p.is_empty()) {
            if std::time::Instant::now() >= deadline {
                eprintln!("delete {id}: {}: processes {pids:?} survive SIGKILL", dir.display());
                break;
            }
            for pid in pids {
                let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL);
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        remove_cgroup_tree(dir);
    }
}

/// The pids in a cgroup and its children (`cgroup.procs` of each).
fn cgroup_pids(dir: &Path) -> Option<Vec<i32>> {
    let mut pids: Vec<i32> =
        std::fs::read_to_string(dir.join("cgroup.procs")).ok()?.lines().filter_map(|l| l.trim().parse().ok()).collect();
    for e in std::fs::read_dir(dir).ok()?.flatten().filter(|e| e.file_type().is_ok_and(|t| t.is_dir())) {
        pids.extend(cgroup_pids(&e.path()).unwrap_or_default());
    }
    Some(pids)
}

/// rmdir of a cgroup and its children (cgroup dirs are removed with rmdir, files and all).
fn remove_cgroup_tree(dir: &Path) {
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten().filter(|e| e.file_type().is_ok_and(|t| t.is_dir())) {
            remove_cgroup_tree(&e.path());
        }
    }
    if let Err(e) = std::fs::remove_dir(dir) {
        if e.kind() != std::io::ErrorKind::NotFound {
            eprintln!("remove cgroup {}: {e}", dir.display());
        }
    }
}

/// Our socket address for [`Shim::wait`]'s fallback (set by `main` from `-socket` when
/// containerd-shim's own bootstrap runs the daemon; ours removes the socket by path).
pub const ADDRESS_ENV: &str = "KYBERNATE_SHIM_SOCKET";

/// Private dir holding a copy of `address` for the exit path.
pub fn exit_dir() -> PathBuf {
    PathBuf::from(format!("/run/kybernate/shim-exit-{}", std::process::id()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_cgroup_named_for_the_container_is_touched() {
        // A plain directory tree stands in for the hierarchy: the thaw writes show what was acted on.
        let root = tempfile::tempdir().unwrap();
        let shared = root.path().join("system.slice");
        let own = root.path().join("default/c1");
        std::fs::create_dir_all(&shared).unwrap();
        std::fs::create_dir_all(&own).unwrap();
        for path in ["/system.slice", "/default", "/default/c1/..", "/", "/x/./c1"] {
            remove_cgroups("c1", root.path(), path);
        }
        assert!(!shared.join("freezer.state").exists() && !own.join("freezer.state").exists());
        assert!(!root.path().join("default/freezer.state").exists());
        remove_cgroups("c1", root.path(), "/default/c1");
        assert_eq!(std::fs::read_to_string(own.join("freezer.state")).unwrap(), "THAWED");
    }
}
