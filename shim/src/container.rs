//! A container: its bundle, the runtime chosen for it, its init process and execs.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use kybernate_checkpoint::fsutil::{write_atomic, Durability};
use kybernate_runtime_select::{CheckpointConfig, SpecView};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::io::IoOwner;
use crate::oom::OomWatcher;
use crate::process::Process;
use crate::restore::RestorePlan;
use crate::runtime::OciRuntime;
use crate::sync::lock;

/// File in the bundle recording which runtime binary the container was
/// created with, so every later call (and `delete` after a shim crash) uses it.
pub const RUNTIME_RECORD: &str = "kybernate-runtime.json";

/// What [`RUNTIME_RECORD`] holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RuntimeRecord {
    pub binary: PathBuf,
    pub root: PathBuf,
    pub systemd_cgroup: bool,
    /// Which rule chose the binary (`env`, `options`, `annotation`, `gpu`, `default`).
    pub source: String,
    pub gpu: bool,
    pub evidence: Vec<String>,
}

impl RuntimeRecord {
    pub fn write(&self, bundle: &Path) -> Result<()> {
        let path = bundle.join(RUNTIME_RECORD);
        let json = serde_json::to_vec_pretty(self).map_err(Error::internal(format!("encode {}", path.display())))?;
        // The bundle is on tmpfs (`/run`): atomic for readers and a crash of the shim; no fsync.
        write_atomic(&path, &json, 0o644, Durability::Process).map_err(Error::os(format!("write {}", path.display())))
    }

    pub fn read(bundle: &Path) -> Result<Self> {
        let path = bundle.join(RUNTIME_RECORD);
        let bytes = std::fs::read(&path).map_err(Error::os(format!("read {}", path.display())))?;
        serde_json::from_slice(&bytes).map_err(Error::internal(format!("{}: malformed runtime record", path.display())))
    }
}

pub struct Container {
    pub id: String,
    pub bundle: PathBuf,
    pub runtime: OciRuntime,
    pub record: RuntimeRecord,
    pub init: Arc<Process>,
    /// Whether we mounted `<bundle>/rootfs` (and so must unmount it).
    pub rootfs_mounted: bool,
    /// Owner of every process's stdio pipes (runc options `IoUid`/`IoGid`),
    /// kept for execs as the runc shim keeps them on its init process.
    pub io_owner: Option<IoOwner>,
    /// runc option `NoPivotRoot`, needed again by a restore at Start.
    pub no_pivot: bool,
    /// runc option `CriuWorkPath`: CRIU's work dir (and logs) unless a request names one.
    pub criu_work: Option<PathBuf>,
    /// The overlay upper dir of the rootfs: the container's file changes, for `rootfs-diff.tar`.
    pub rootfs_upper: Option<PathBuf>,
    /// `[checkpoint]` of the node config as read at create (CUDA mode, libcuda, GPU policy).
    pub checkpoint_config: CheckpointConfig,
    /// Set at create when the spec gives the container no PID namespace of its own (it shares the
    /// host's, a pod's or another container's; `SpecView::has_own_pid_namespace`): its processes
    /// do not die with init, so init's exit kills them, as containerd's runc shim does.
    pub kill_all_on_exit: bool,
    /// The spec's annotations as created (`SpecView::annotations_only`): a checkpoint's identity
    /// check, its pre-dump annotation and its journal line read them here, not from the bundle.
    pub annotations: SpecView,
    /// What Start restores while init is [`Restoring`](crate::process::ProcessStatus::Restoring);
    /// init's status, not this slot, says whether a restore is pending.
    restore: Mutex<Option<RestorePlan>>,
    execs: Mutex<HashMap<String, Arc<Process>>>,
    oom: Mutex<Option<OomWatcher>>,
}

impl Container {
    pub fn new(
        id: String,
        bundle: PathBuf,
        runtime: OciRuntime,
        record: RuntimeRecord,
        init: Arc<Process>,
        rootfs_mounted: bool,
    ) -> Self {
        Self {
            id,
            bundle,
            runtime,
            record,
            init,
            rootfs_mounted,
            io_owner: None,
            no_pivot: false,
            criu_work: None,
            rootfs_upper: None,
            checkpoint_config: CheckpointConfig::default(),
            kill_all_on_exit: false,
            annotations: SpecView::default(),
            restore: Mutex::new(None),
            execs: Mutex::new(HashMap::new()),
            oom: Mutex::new(None),
        }
    }

    /// Sets [`io_owner`](Self::io_owner) (at create, before the container is shared).
    pub fn with_io_owner(mut self, owner: Option<IoOwner>) -> Self {
        self.io_owner = owner;
        self
    }

    /// Records the restore that Start must run instead of `runtime start`.
    pub fn set_restore(&self, plan: RestorePlan) {
        *lock(&self.restore) = Some(plan);
    }

    /// The pending restore, if any (taken: a restore runs at most once).
    pub fn take_restore(&self) -> Option<RestorePlan> {
        lock(&self.restore).take()
    }

    fn execs(&self) -> MutexGuard<'_, HashMap<String, Arc<Process>>> {
        lock(&self.execs)
    }

    /// The init process for an empty exec id, else that exec.
    pub fn process(&self, exec_id: &str) -> Result<Arc<Process>> {
        if exec_id.is_empty() {
            return Ok(self.init.clone());
        }
        self.execs()
            .get(exec_id)
            .cloned()
            .ok_or_else(|| Error::NotFound(format!("exec {exec_id} not found in container {}", self.id)))
    }

    pub fn add_exec(&self, p: Arc<Process>) -> Result<()> {
        let exec_id = p.id.clone();
        let mut execs = self.execs();
        if execs.contains_key(&exec_id) {
            return Err(Error::AlreadyExists(format!("exec {exec_id} already exists in container {}", self.id)));
        }
        execs.insert(exec_id, p);
        Ok(())
    }

    pub fn remove_exec(&self, exec_id: &str) {
        self.execs().remove(exec_id);
    }

    pub fn exec_list(&self) -> Vec<Arc<Process>> {
        self.execs().values().cloned().collect()
    }

    pub fn set_oom_watcher(&self, w: OomWatcher) {
        *lock(&self.oom) = Some(w);
    }

    pub fn stop_oom_watcher(&self) {
        lock(&self.oom).take();
    }

    pub fn rootfs(&self) -> PathBuf {
        self.bundle.join("rootfs")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn record_round_trips_and_malformed_record_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let r = RuntimeRecord {
            binary: "/usr/bin/runc".into(),
            root: "/run/containerd/runc/default".into(),
            systemd_cgroup: false,
            source: "default".into(),
            gpu: false,
            evidence: vec![],
        };
        r.write(dir.path()).unwrap();
        assert_eq!(RuntimeRecord::read(dir.path()).unwrap(), r);
        std::fs::write(dir.path().join(RUNTIME_RECORD), "{").unwrap();
        assert!(RuntimeRecord::read(dir.path()).unwrap_err().to_string().contains("malformed runtime record"));
    }
}
