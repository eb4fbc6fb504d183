//! The container factory: turns a Create request into a [`Container`], with its runtime chosen,
//! its spec edited, its rootfs mounted and its init created by the runtime (or, for a restore,
//! its checkpoint verified, run at Start). The Task service only reserves the id, calls the
//! factory, registers what it built and publishes `TaskCreate`.
//!
//! The bundle's `config.json` is read once, leniently (as runc reads it), and written back once,
//! atomically, when an edit changed it (GPU device re-injection of a restore, the CRIU config of
//! GPU containers): the edits keep every part of the document they do not understand.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::Arc;

use containerd_shim::api::CreateTaskRequest;
use containerd_shim::protos::types::mount::Mount;
use kybernate_checkpoint::fsutil::{write_atomic, Durability};
use kybernate_runtime_select::{BundleError, Context as SelectContext, SelectError, Selector, SpecView};
use log::{info, warn};

use crate::container::{Container, RuntimeRecord};
use crate::error::{CheckpointError, Error, Result};
use crate::io::{ProcessIo, StdioConfig};
use crate::options::ShimOptions;
use crate::process::{Action, Process};
use crate::restore::{Prepared, Restoring};
use crate::runtime::{read_pid_file, CreateOpts, OciRuntime, RuntimeOpts};
use crate::spawn::Spawner;

/// What a container is built with beyond its Create request.
pub struct ContainerFactory<'a> {
    /// containerd namespace of this shim.
    pub namespace: &'a str,
    pub spawner: &'a Arc<dyn Spawner>,
}

impl ContainerFactory<'_> {
    /// Builds the container of `req`: init created (its pid set) or, for a restore, `Restoring`
    /// with the plan that Start runs. On failure nothing is left behind: runtime state, process,
    /// mounts.
    pub fn create(&self, req: &CreateTaskRequest) -> Result<Container> {
        let bundle = Path::new(&req.bundle);
        let opts = ShimOptions::from_any(req.options.as_ref())?;
        // Read leniently, as runc reads it; a document that is not even a JSON object is runc's
        // to refuse, in its own words: decide as for an empty spec and let it.
        let (spec, unreadable) = match kybernate_runtime_select::load_spec(bundle) {
            Ok(spec) => (spec, None),
            Err(e) => {
                warn!("container {}: {e}; the runtime decides on it", req.id);
                (SpecView::default(), Some(e))
            }
        };
        let selector =
            Selector::load(opts.config_path.as_deref(), SelectContext::from_process_env(opts.binary_name()))?;
        let decision = selector.select(&spec)?;
        let evidence: Vec<String> = decision.evidence.iter().map(ToString::to_string).collect();
        info!(
            "container {}: runtime {} (source: {}, gpu: {}, evidence: [{}])",
            req.id,
            decision.runtime.display(),
            decision.source,
            decision.gpu,
            evidence.join("; ")
        );
        for w in &decision.warnings {
            warn!("container {}: {w}", req.id);
        }
        // A restore: containerd's checkpoint (`ctr c restore --live`), else a checkpoint of the
        // node's store named by the annotation or RESTORE_FROM, where the node's config allows
        // that trigger. Verified, then checked against this container's own spec, before
        // anything is set up; every decision is logged.
        let config = &selector.config.checkpoint;
        let trust = &selector.config.trust;
        let puller = crate::pull::Puller {
            spawner: self.spawner.as_ref(),
            config: &selector.config_path,
            cli: None,
            timeout: crate::pull::PULL_TIMEOUT,
        };
        let node = crate::restore::NodeProbe { spawner: self.spawner.as_ref(), criu: opts.criu_path.as_deref() };
        let mut restore =
            Restoring::plan(&req.id, &req.checkpoint, &spec, config, trust, self.namespace, &puller, &node)?;
        let cgroups_path = spec.cgroups_path().map(str::to_string);
        let kill_all_on_exit = !spec.has_own_pid_namespace();
        let annotations = spec.annotations_only();

        let mut doc = SpecDoc { value: spec.into_value(), unreadable, changed: false };
        let mut binary = decision.runtime.clone();
        let mut restore_gpu = false;
        if let Some(r) = &mut restore {
            let prepared = doc.edit().and_then(|spec| r.prepare(&req.id, spec, config, bundle));
            let Prepared { runtime, gpu, spec_changed } = prepared.inspect_err(|e| r.refused(e))?;
            if let Some(recorded) = runtime.filter(|b| *b != binary) {
                info!(
                    "container {}: restoring with {}, the runtime that took the checkpoint (selected: {})",
                    req.id,
                    recorded.display(),
                    binary.display()
                );
                binary = recorded;
            }
            restore_gpu = gpu;
            doc.changed |= spec_changed;
        }
        if decision.gpu || restore_gpu {
            let changed = crate::gpu::attach_criu_config(&req.id, bundle, doc.edit()?).map_err(|source| {
                CheckpointError::Gpu { what: "create", id: req.id.clone(), source: Box::new(source) }
            })?;
            doc.changed |= changed;
        }
        let systemd_cgroup = opts.systemd_cgroup(cgroups_path.as_deref());
        if restore.is_some() && crate::cgroups::host_is_v2() {
            doc.changed |= criu_cgroup_root_v2(&req.id, bundle, doc.edit()?, cgroups_path.as_deref(), systemd_cgroup)?;
        }
        doc.write_back(&req.id, bundle)?;

        if systemd_cgroup && opts.runc.is_none() {
            info!("container {}: cgroups through systemd (cgroupsPath {:?} is systemd's form)", req.id, cgroups_path);
        }
        let record = RuntimeRecord {
            binary,
            root: opts.runtime_root(self.namespace),
            systemd_cgroup,
            source: decision.source.as_str().to_string(),
            gpu: decision.gpu,
            evidence,
        };
        record.write(bundle)?;
        let runtime = OciRuntime::new(
            RuntimeOpts {
                binary: record.binary.clone(),
                root: record.root.clone(),
                systemd_cgroup: record.systemd_cgroup,
                criu: opts.criu_path.clone(),
                criu_env: vec![],
            },
            self.spawner.clone(),
        );

        let rootfs = bundle.join("rootfs");
        let mounted = mount_rootfs(&req.rootfs, &rootfs)?;
        let stdio = StdioConfig {
            stdin: req.stdin.clone(),
            stdout: req.stdout.clone(),
            stderr: req.stderr.clone(),
            terminal: req.terminal,
        };
        let created = match &restore {
            // The restore itself runs at Start (as in containerd's runc shim); only the rootfs
            // changes of a store checkpoint are applied now.
            Some(r) => r.plan.apply_rootfs_diff(&req.id, &rootfs).map(|()| None),
            None => self.create_init(&req.id, bundle, &runtime, &opts, &stdio).map(Some),
        };
        let created = match created {
            Ok(v) => v,
            Err(e) => {
                // Leave nothing behind: runtime state, process, mounts.
                if let Err(de) = runtime.delete(&req.id, bundle, true) {
                    if !(de.is_not_found()) {
                        warn!("create {}: cleanup: {de}", req.id);
                    }
                }
                if mounted {
                    unmount_rootfs(&rootfs);
                }
                return Err(e);
            }
        };
        let init = Arc::new(Process::new(req.id.clone(), None, stdio, None));
        init.transition(Action::Created { restore: restore.is_some() })?;
        if let Some((pid, io)) = created {
            init.set_pid(pid);
            init.set_io(io);
        }
        let mut c = Container::new(req.id.clone(), bundle.to_path_buf(), runtime, record, init, mounted)
            .with_io_owner(opts.io_owner());
        c.no_pivot = opts.no_pivot_root();
        c.criu_work = opts.criu_work_path();
        c.rootfs_upper = req.rootfs.iter().find_map(|m| kybernate_checkpoint::overlay_upperdir(&m.type_, &m.options));
        c.checkpoint_config = selector.config.checkpoint.clone();
        c.kill_all_on_exit = kill_all_on_exit;
        c.annotations = annotations;
        if let Some(r) = restore {
            c.set_restore(r.plan);
        }
        Ok(c)
    }

    /// Runs `<runtime> create` with the process IO wired up; returns the init pid.
    fn create_init(
        &self,
        id: &str,
        bundle: &Path,
        runtime: &OciRuntime,
        opts: &ShimOptions,
        stdio: &StdioConfig,
    ) -> Result<(u32, ProcessIo)> {
        let (mut io, child) = ProcessIo::prepare_owned(stdio, bundle, id, self.namespace, opts.io_owner())?;
        let pid_file = bundle.join("init.pid");
        let create = CreateOpts {
            pid_file: pid_file.clone(),
            console_socket: io.console_socket().map(Path::to_path_buf),
            no_pivot: opts.no_pivot_root(),
            no_new_keyring: opts.no_new_keyring(),
        };
        runtime.create(id, bundle, &create, child)?;
        io.attach()?;
        Ok((read_pid_file(&pid_file)?, io))
    }
}

/// The bundle's config.json as read at create, for the edits.
struct SpecDoc {
    value: serde_json::Value,
    /// Why it could not be read: an edit then refuses the create with that reason.
    unreadable: Option<BundleError>,
    changed: bool,
}

impl SpecDoc {
    /// The document to edit; a spec that could not be read cannot be edited.
    fn edit(&mut self) -> Result<&mut serde_json::Value> {
        match self.unreadable.take() {
            Some(e) => Err(SelectError::Bundle(e).into()),
            None => Ok(&mut self.value),
        }
    }

    /// Replaces config.json when an edit changed it, atomically: runc, or a reader of the
    /// bundle, never sees half a spec.
    fn write_back(&self, id: &str, bundle: &Path) -> Result<()> {
        if !self.changed {
            return Ok(());
        }
        let config = bundle.join("config.json");
        let text = serde_json::to_vec(&self.value).map_err(|source| CheckpointError::Write {
            id: id.to_string(),
            context: format!("encode {}", config.display()),
            source: source.into(),
        })?;
        // Keep containerd's mode; the bundle is on tmpfs, so no fsync (see fsutil::Durability).
        let mode = std::fs::metadata(&config).map_or(0o644, |m| m.permissions().mode() & 0o7777);
        write_atomic(&config, &text, mode, Durability::Process)
            .map_err(Error::os(format!("write {}", config.display())))
    }
}

/// Mounts containerd's rootfs mounts on `target`; on failure unmounts what was mounted.
fn mount_rootfs(mounts: &[Mount], target: &Path) -> Result<bool> {
    if mounts.is_empty() {
        return Ok(false);
    }
    std::fs::create_dir_all(target).map_err(Error::os(format!("create {}", target.display())))?;
    for m in mounts {
        let (ty, src) =
            (Some(m.type_.as_str()).filter(|s| !s.is_empty()), Some(m.source.as_str()).filter(|s| !s.is_empty()));
        if let Err(e) = containerd_shim::mount::mount_rootfs(ty, src, &m.options, target) {
            unmount_rootfs(target);
            return Err(Error::shim(format!("mount rootfs {} ({}) on {}", m.source, m.type_, target.display()))(e));
        }
    }
    Ok(true)
}

/// Unmounts the rootfs mounted at create (lazily: a process may still hold it).
pub fn unmount_rootfs(target: &Path) {
    if let Some(t) = target.to_str() {
        if let Err(e) = containerd_shim::mount::umount_recursive(Some(t), libc::MNT_DETACH) {
            warn!("unmount {}: {e}", target.display());
        }
    }
}

/// A restore on cgroup v2: tells CRIU (`cgroup-root` in the CRIU config runc hands it) to restore
/// the processes into this container's cgroup, as runc 1.1 does itself only on v1 (see
/// [`crate::cgroups::restore_root`]). The config is our file in the bundle, attached as for GPU
/// containers; a spec that names its own CRIU config keeps it, with a warning. Returns whether
/// `spec` changed.
fn criu_cgroup_root_v2(
    id: &str,
    bundle: &Path,
    spec: &mut serde_json::Value,
    cgroups_path: Option<&str>,
    systemd: bool,
) -> Result<bool> {
    let Some(root) = crate::cgroups::restore_root(cgroups_path, systemd) else {
        warn!("container {id}: restore on cgroup v2 without a cgroupsPath CRIU can be told: its processes go back to the cgroup they were dumped from");
        return Ok(false);
    };
    let write_err = || format!("container {id}: cannot write the CRIU config for the restore into {root}");
    let changed = crate::gpu::attach_criu_config(id, bundle, spec).map_err(Error::internal(write_err()))?;
    let Some(ours) = crate::gpu::own_criu_config(bundle, spec) else {
        warn!("container {id}: keeps its own CRIU config: on cgroup v2 its processes are restored into the cgroup they were dumped from unless it sets cgroup-root {root}");
        return Ok(changed);
    };
    let mut f = std::fs::OpenOptions::new().append(true).open(&ours).map_err(Error::internal(write_err()))?;
    // `:` names the v2 hierarchy alone (CRIU calls it ""): the v1 hierarchies of a hybrid host
    // keep the paths CRIU dumped.
    std::io::Write::write_all(&mut f, format!("cgroup-root :{root}\n").as_bytes())
        .map_err(Error::internal(write_err()))?;
    info!("container {id}: restore on cgroup v2 into cgroup {root} (CRIU cgroup-root)");
    Ok(changed)
}
