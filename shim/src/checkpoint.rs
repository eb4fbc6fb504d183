//! Checkpoint orchestration: `Task.Checkpoint` of a running container, from the request's
//! options to a complete checkpoint in place (restoring one is [`crate::restore`]).
//!
//! The dump and the restore are runtime calls (`runc checkpoint` / `runc restore`, which drive
//! CRIU). No shim lock is held across them: a GPU job's dump can take minutes, and the other
//! containers of a grouped pod must keep answering RPCs and reporting exits meanwhile.
//!
//! Every checkpoint is written in the checkpoint-archive layout Kubernetes, CRI-O and
//! checkpointctl use (`checkpoint/`, `config.dump`, `spec.dump`, `stats-dump`, `rootfs-diff.tar`) plus our
//! manifest, into a hidden sibling of its target that is renamed into place only when complete.

use std::path::{Path, PathBuf};
use std::time::Instant;

use containerd_shim::protos::protobuf::well_known_types::any::Any;
use containerd_shim::protos::protobuf::Message;
use containerd_shim::protos::protobuf::UnknownValueRef;
use containerd_shim::protos::shim::oci::CheckpointOptions;
use kybernate_checkpoint::journal::{self, Attempt, Clock, Kind};
use kybernate_checkpoint::{
    self as criu, CheckpointFlags, ConfigDump, Manifest, PartialCheckpoint, PreDumpLayout, ToolInfo,
};
use kybernate_gpu::cuda::GpuSession;
use kybernate_gpu::GpuMode;
use kybernate_runtime_select::SpecView;
use log::{info, warn};

use crate::container::Container;
use crate::error::{CheckpointError, Error};
use crate::gpu::{self, GpuCheckpoint};
use crate::predump;
use crate::restore::{spec_annotation, POD_NAMESPACE_ANNOTATIONS, POD_NAME_ANNOTATIONS, POINTER_FILE};
use crate::runtime::{tool_output, ContainerStatus, OciRuntime};
use crate::spawn::Spawner;
use crate::testhook::{test_stop_point, STOP_COMMIT, STOP_FREEZE, STOP_HASHING, STOP_ROOTFS_DIFF};

/// Type of the checkpoint options containerd forwards (bare URL in containerd 1.6).
const CHECKPOINT_OPTIONS: &str = "containerd.runc.v1.CheckpointOptions";
const CONTAINER_NAME_ANNOTATION: &str = "io.kubernetes.cri.container-name";
const IMAGE_NAME_ANNOTATION: &str = "io.kubernetes.cri.image-name";

type Result<T, E = CheckpointError> = std::result::Result<T, E>;

/// `CheckpointOptions` as we use them. containerd sends none for runtime names other than
/// runc's (`ctr t checkpoint`): then the defaults apply (leave running, images into `path`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CheckpointRequest {
    pub flags: CheckpointFlags,
    /// `image_path`: where the checkpoint goes instead of containerd's `path`.
    pub image_path: Option<PathBuf>,
    /// `work_path`: CRIU's work dir (logs) instead of the container's default.
    pub work_path: Option<PathBuf>,
    /// Pre-dump rounds asked for by `kybernate checkpoint --pre-dump` (our field in the options,
    /// [`criu::predump::OPTIONS_PRE_DUMP_FIELD`]); None: the annotation or the config decides.
    pub pre_dump: Option<u32>,
}

impl CheckpointRequest {
    pub fn decode(id: &str, any: Option<&Any>) -> Result<Self> {
        let bad = |message: String| CheckpointError::BadRequest { id: id.to_string(), message };
        let Some(any) = any.filter(|a| !a.type_url.is_empty()) else { return Ok(Self::default()) };
        let name = any.type_url.rsplit('/').next().unwrap_or_default();
        if name != CHECKPOINT_OPTIONS {
            return Err(bad(format!("unsupported checkpoint options type {name:?} (want {CHECKPOINT_OPTIONS})")));
        }
        let o = CheckpointOptions::parse_from_bytes(&any.value)
            .map_err(|e| bad(format!("malformed {CHECKPOINT_OPTIONS}: {e}")))?;
        let flags = CheckpointFlags {
            exit: o.exit,
            open_tcp: o.open_tcp,
            external_unix_sockets: o.external_unix_sockets,
            terminal: o.terminal,
            file_locks: o.file_locks,
            empty_namespaces: o.empty_namespaces.clone(),
            cgroups_mode: o.cgroups_mode.clone(),
        };
        flags.validate().map_err(|e| bad(e.to_string()))?;
        let path = |s: &str| Some(PathBuf::from(s)).filter(|p| !p.as_os_str().is_empty());
        let pre_dump = match o.special_fields.unknown_fields().get(criu::predump::OPTIONS_PRE_DUMP_FIELD) {
            None => None,
            Some(UnknownValueRef::Varint(n)) => Some(criu::predump::check_rounds(n).map_err(|e| bad(e.to_string()))?),
            Some(_) => return Err(bad("malformed pre-dump rounds (field 1001 must be a varint)".into())),
        };
        let req = Self { flags, image_path: path(&o.image_path), work_path: path(&o.work_path), pre_dump };
        for p in [&req.image_path, &req.work_path].into_iter().flatten() {
            if !p.is_absolute() {
                return Err(bad(format!("{} is not an absolute path", p.display())));
            }
        }
        Ok(req)
    }
}

/// What a checkpoint needs from the shim beyond the container.
pub struct Checkpointer<'a> {
    pub spawner: &'a dyn Spawner,
    /// containerd namespace of this shim.
    pub namespace: &'a str,
}

impl Checkpointer<'_> {
    /// Checkpoints `c` (init pid `pid`) into `target`; returns the manifest written.
    ///
    /// Order: preflight (CRIU, space) → dump into a hidden partial dir → rootfs changes, dumps,
    /// manifest → rename into place → with `exit`, stop the container. On failure the partial dir
    /// is removed and the container is left running: CRIU resumes what it froze, and a cgroup left
    /// frozen by a killed CRIU is thawed.
    ///
    /// The container is frozen (`runtime pause`) before the dump and CRIU leaves it so: memory
    /// and the rootfs changes are then one moment's state, and a container that keeps writing
    /// files cannot race the rootfs diff. Without `exit` it is thawed right after the diff. `exit`
    /// is not handed to CRIU (which would kill the container right after the dump): the container
    /// stays frozen and is killed only once its checkpoint is safely on disk, so that a failure
    /// after the dump (a full disk, say) cannot lose the process.
    ///
    /// Every attempt, failed ones too, is appended to the store's journal with its phases and
    /// the time the container was frozen (`kybernate metrics`).
    pub fn checkpoint(
        &self,
        c: &Container,
        pid: u32,
        req: &CheckpointRequest,
        target: &Path,
        was_paused: bool,
    ) -> Result<Manifest> {
        let mut clock = Clock::start();
        let result = self.checkpoint_timed(c, pid, req, target, was_paused, &mut clock);
        let mut a = self.attempt(Kind::Checkpoint, c, &clock);
        a.checkpoint = crate::restore::checkpoint_name(target, &c.checkpoint_config);
        a.exit = req.flags.exit;
        match &result {
            Ok(m) => {
                a.bytes = m.total_size();
                a.gpu_bytes = m.gpu.as_ref().map_or(0, |g| g.bytes_total);
            }
            Err(e) => a.failed(checkpoint_error_class(e), &e.to_string()),
        }
        record(&c.checkpoint_config.root, &a);
        result
    }

    /// A checkpoint request refused before it started (bad options, no target), for the journal.
    pub fn refused(&self, c: &Container, e: &Error) {
        let mut a = self.attempt(Kind::Checkpoint, c, &Clock::start());
        a.failed(error_class(e), &e.to_string());
        record(&c.checkpoint_config.root, &a);
    }

    /// A journal line for `c` with `clock`'s times.
    pub fn attempt(&self, kind: Kind, c: &Container, clock: &Clock) -> Attempt {
        let mut a = Attempt::new(kind, clock);
        a.namespace = self.namespace.to_string();
        a.container = c.id.clone();
        a.pod = Some(crate::restore::pod_of(&c.annotations)).filter(|p| p != "-");
        a
    }

    fn checkpoint_timed(
        &self,
        c: &Container,
        pid: u32,
        req: &CheckpointRequest,
        target: &Path,
        was_paused: bool,
        clock: &mut Clock,
    ) -> Result<Manifest> {
        let id = c.id.as_str();
        self.check_identity(c)?;
        let (criu_path, criu_version) = self.criu(c, "checkpoint")?;
        // Refused here, before anything is written or frozen, where the kernel cannot pre-dump.
        let mut pre_dump = predump::decide(c, req.pre_dump)?;
        predump::require_dirty_tracking(self.spawner, c, &criu_path, pre_dump)?;
        let mut runtime = c.runtime.with_criu(criu_path.clone());
        let gpu_err = |source| CheckpointError::Gpu { what: "checkpoint", id: id.into(), source: Box::new(source) };

        // GPU containers: decided before anything is frozen; in the driver-api mode every CUDA
        // process is locked and its device memory moved to host memory before the dump.
        let pids = runtime.ps(id, &c.bundle).unwrap_or_else(|e| {
            warn!("container {id}: cannot list its processes for CUDA detection: {e}");
            Vec::new()
        });
        let gpu = GpuCheckpoint::prepare(self.spawner, id, &c.bundle, c.record.gpu, pid, &pids, &c.checkpoint_config)
            .map_err(gpu_err)?;
        if gpu.as_ref().is_some_and(|g| g.mode == GpuMode::DriverApi) {
            let empty = gpu::empty_plugin_dir(&c.bundle).map_err(gpu_err)?;
            runtime = runtime.with_criu_env(kybernate_gpu::cuda::preflight::CRIU_LIBS_DIR, empty);
        }
        if was_paused && gpu.as_ref().is_some_and(|g| g.mode != GpuMode::None) {
            // The driver cannot lock the threads of a frozen process.
            return Err(CheckpointError::BadRequest {
                id: id.into(),
                message: "its CUDA state cannot be checkpointed while it is paused: resume it first".into(),
            });
        }
        if pre_dump.rounds > 0 && (was_paused || gpu.as_ref().is_some_and(|g| g.mode != GpuMode::None)) {
            // A paused container has nothing to gain (it is frozen already); CUDA state is
            // moved only by the final dump's GPU steps. A node default gives way, a request not.
            let why = if was_paused { "it is paused" } else { "it uses CUDA" };
            if pre_dump.source != predump::Source::Config {
                return Err(CheckpointError::BadRequest {
                    id: id.into(),
                    message: format!("pre-dump was asked for, but {why}: checkpoint it without pre-dump"),
                });
            }
            info!("container {id}: no pre-dump ([checkpoint] pre_dump_rounds), since {why}");
            pre_dump.rounds = 0;
        }
        // The partial checkpoint exists from here, so that its phase file shows the GPU steps too.
        // Into containerd's own dir (no image_path): CRIU's images at the top, as containerd's
        // runc shim writes them and containerd 2.x's CRI unpacks them.
        let begin = if req.image_path.is_some() { PartialCheckpoint::begin } else { PartialCheckpoint::begin_flat };
        let partial = begin(target).map_err(|source| CheckpointError::Store {
            what: "checkpoint",
            id: id.to_string(),
            source: Box::new(source),
        })?;
        let _record = PartialRecord::write(&c.bundle, partial.dir());
        // Pre-dump rounds: the container's memory copied while it runs, before any GPU step or
        // freeze, so that the final dump takes only what changed since the last round.
        let pre_dumps =
            PreDumpLayout { dir: partial.dir().to_path_buf(), images: partial.images_dir(), rounds: pre_dump.rounds };
        if pre_dumps.rounds > 0 {
            partial.set_phase(criu::PHASE_CRIU_DUMP);
            let work = work_dir(c, req.work_path.as_deref())?;
            predump::run_rounds(&runtime, c, &req.flags, &pre_dumps, &work, || self.recover(&runtime, c, false))?;
        }
        let mut session = gpu.as_ref().and_then(GpuCheckpoint::session);
        if let (Some(s), Some(g)) = (session.as_mut(), gpu.as_ref()) {
            partial.set_phase(criu::PHASE_GPU_LOCK);
            clock.phase("gpu_lock", || s.lock_all(g.lock_timeout_ms())).map_err(|e| gpu_err(e.into()))?;
            partial.set_phase(criu::PHASE_GPU_CHECKPOINT);
            clock.phase("gpu_checkpoint", || s.checkpoint_all()).map_err(|e| gpu_err(e.into()))?;
        }

        // Frozen (unless the client paused it already) from before the dump until the rootfs
        // changes are written, so that memory and files are one moment's state; with `exit`,
        // until the checkpoint is committed. CRIU's CUDA plugin must find the threads running,
        // so in that mode the freeze starts right after the dump.
        let freeze = !was_paused && gpu.as_ref().map_or(true, GpuCheckpoint::freeze_before_dump);
        let freeze_after_dump = !was_paused && !freeze;
        if freeze {
            // Frozen from the request on: the cgroup freezes during the call.
            clock.freeze();
            clock.phase("freeze", || runtime.pause(id, &c.bundle)).map_err(|source| CheckpointError::Criu {
                what: "checkpoint",
                id: id.into(),
                source,
            })?;
            test_stop_point(id, STOP_FREEZE);
        }
        let thaw_after_dump = (freeze || freeze_after_dump) && !req.flags.exit;
        let frozen = Frozen { was_paused, freeze_after_dump, thaw_after_dump, pre_dumps };
        let gpu_ctx = GpuContext { plan: gpu.as_ref(), session: &mut session };
        let result =
            self.checkpoint_frozen(c, pid, req, partial, frozen, gpu_ctx, &runtime, criu_path, criu_version, clock);
        match (&result, req.flags.exit) {
            (Ok(_), true) => {
                // Killed while frozen; `kill --all` thaws the cgroup itself on cgroup v1, else
                // we do, so that the kill is delivered.
                clock
                    .phase("kill", || runtime.kill(id, &c.bundle, libc::SIGKILL as u32, true))
                    .map_err(|e| CheckpointError::Stop { id: id.into(), target: target.into(), source: Box::new(e) })?;
                // Frozen until killed: it never runs again here.
                clock.thaw();
                if let Some(s) = session.as_mut() {
                    s.processes_exited();
                }
                self.recover(&runtime, c, false);
            }
            (Err(_), _) => {
                // Ours to thaw (the dump's own failure path may have done it already), then
                // the CUDA processes get their GPU state back and are unlocked.
                if freeze || freeze_after_dump {
                    self.recover(&runtime, c, false);
                }
                clock.thaw();
                if let Some(s) = session.as_mut() {
                    if let Err(e) = s.resume() {
                        warn!("container {id}: after the failed checkpoint: {e}");
                    }
                }
            }
            _ => {}
        }
        result
    }

    #[allow(clippy::too_many_arguments)]
    fn checkpoint_frozen(
        &self,
        c: &Container,
        pid: u32,
        req: &CheckpointRequest,
        partial: PartialCheckpoint,
        frozen: Frozen,
        gpu: GpuContext<'_, '_>,
        runtime: &OciRuntime,
        criu_path: PathBuf,
        criu_version: criu::CriuVersion,
        clock: &mut Clock,
    ) -> Result<Manifest> {
        let id = c.id.as_str();
        let started = Instant::now();
        let target = partial.target().to_path_buf();
        let preflight = |source| CheckpointError::Preflight { what: "checkpoint", id: id.to_string(), source };
        let memory = criu::memory_estimate(pid, Path::new("/proc"), Path::new("/sys/fs/cgroup"))
            .map_err(preflight)?
            .unwrap_or(0);
        // rootfs-diff.tar holds the container's file changes too.
        let changes = c.rootfs_upper.as_deref().map(criu::dir_size).unwrap_or(0);
        let needed = memory.saturating_add(changes);
        criu::check_space(partial.dir(), needed).map_err(preflight)?;

        let work = work_dir(c, req.work_path.as_deref())?;
        // CRIU always leaves the container alive (see `checkpoint`); it stays frozen if it was.
        let dump_flags = CheckpointFlags { exit: false, ..req.flags.clone() };
        let mut args = dump_flags.checkpoint_args(&partial.images_dir(), &work);
        // After pre-dumps: only the pages changed since the last round (CRIU links it as `parent`).
        args.extend(criu::predump::parent_args(frozen.pre_dumps.final_parent().as_deref()));
        // The flags after --image-path I --work-path W, for the log.
        let flags: Vec<String> = args.iter().skip(4).map(|a| a.to_string_lossy().into_owned()).collect();
        info!(
            "container {id}: checkpoint into {} (CRIU {criu_version}, flags [{}]{}, about {} of memory and {} of file changes)",
            target.display(),
            flags.join(" "),
            if req.flags.exit { ", then exit" } else { "" },
            mib(memory),
            mib(changes)
        );
        // A stats-dump left by an earlier dump must not pass for this one's.
        let stats = work.join(criu::STATS_DUMP);
        let _ = std::fs::remove_file(&stats);
        let dump_started = Instant::now();
        partial.set_phase(criu::PHASE_CRIU_DUMP);
        if frozen.freeze_after_dump {
            clock.freeze(); // CRIU freezes it for the dump; we keep it frozen after
        }
        let dumped = runtime.checkpoint(id, &c.bundle, args);
        clock.add_phase("dump", dump_started.elapsed());
        if let Err(e) = dumped {
            let outcome = self.recover(runtime, c, frozen.was_paused);
            clock.thaw();
            return Err(CheckpointError::runtime_failure("checkpoint", id, e, &work.join("dump.log"), outcome));
        }
        let dump_ms = dump_started.elapsed().as_millis() as u64;
        // CRIU's `parent` links become nested directories: plain files the manifest lists.
        frozen.pre_dumps.nest_rounds().map_err(|source| CheckpointError::Write {
            id: id.into(),
            context: format!("nest the {} pre-dump round(s) under the final dump", frozen.pre_dumps.rounds),
            source,
        })?;
        if frozen.freeze_after_dump {
            clock.phase("freeze", || runtime.pause(id, &c.bundle)).map_err(|source| CheckpointError::Criu {
                what: "checkpoint",
                id: id.into(),
                source,
            })?;
        }

        let spec_bytes = std::fs::read(c.bundle.join("config.json")).map_err(|source| CheckpointError::Write {
            id: id.into(),
            context: format!("read {}", c.bundle.join("config.json").display()),
            source,
        })?;
        let spec: Option<SpecView> = SpecView::from_slice(&spec_bytes).ok();
        let write = |name: &str, bytes: &[u8]| {
            let path = partial.dir().join(name);
            std::fs::write(&path, bytes).map_err(|source| CheckpointError::Write {
                id: id.into(),
                context: format!("write {}", path.display()),
                source,
            })
        };
        // A flat checkpoint (containerd's own dir) holds CRIU's images and the manifest only:
        // containerd keeps the spec and the writable layer itself (`ctr c checkpoint --rw`, CRI).
        let flat = partial.is_flat();
        if !flat {
            write(criu::SPEC_DUMP, &spec_bytes)?;
        }
        test_stop_point(id, STOP_ROOTFS_DIFF);
        let diff_started = Instant::now();
        let rootfs_diff = match (&c.rootfs_upper, readonly_root(spec.as_ref()), flat) {
            (Some(upper), false, false) => criu::write_rootfs_diff(upper, &partial.dir().join(criu::ROOTFS_DIFF))
                .map_err(|source| CheckpointError::RootfsDiff { id: id.into(), source })?,
            _ => false,
        };
        if !flat {
            match std::fs::read(&stats) {
                Ok(bytes) => write(criu::STATS_DUMP, &bytes)?,
                Err(e) => warn!("container {id}: no CRIU dump statistics in {}: {e}", stats.display()),
            }
        }
        clock.add_phase("rootfs_diff", diff_started.elapsed());
        let mut gpu_resume = None;
        if frozen.thaw_after_dump {
            // Memory and files are captured: the rest (hashing, syncing) runs with the container live.
            clock.phase("thaw", || self.recover(runtime, c, false));
            clock.thaw();
            if let Some(s) = gpu.session.as_mut() {
                gpu_resume = s.resume().err();
            }
        }
        let gpu_record = gpu.plan.map(|g| g.record(gpu.session.as_ref(), dump_ms));
        if let Some(r) = &gpu_record {
            info!(
                "container {id}: GPU mode {}, {} CUDA process(es), {} bytes of device memory, phases {:?} ms",
                r.mode.as_str(),
                r.processes.len(),
                r.bytes_total,
                r.phases_ms
            );
        }
        let annotation = |keys: &[&str]| keys.iter().find_map(|k| spec_annotation(spec.as_ref(), k));
        let created = criu::now_rfc3339();
        let image = annotation(&[IMAGE_NAME_ANNOTATION]);
        let config = ConfigDump {
            id: id.to_string(),
            name: annotation(&[CONTAINER_NAME_ANNOTATION]).unwrap_or_else(|| id.to_string()),
            rootfs_image: image.clone().unwrap_or_default(),
            rootfs_image_ref: String::new(),
            rootfs_image_name: image.clone().unwrap_or_default(),
            runtime: runtime.binary().display().to_string(),
            created_time: created.clone(),
            checkpointed_time: created.clone(),
            restored: false,
        };
        let config = serde_json::to_vec_pretty(&config).map_err(|e| CheckpointError::Write {
            id: id.into(),
            context: "encode config.dump".into(),
            source: std::io::Error::other(e),
        })?;
        if !flat {
            write(criu::CONFIG_DUMP, &config)?;
        }

        let runtime_version = runtime.version().unwrap_or_else(|e| {
            warn!("container {id}: {e}");
            String::new()
        });
        let manifest = Manifest {
            format_version: criu::FORMAT_VERSION,
            namespace: self.namespace.to_string(),
            container_id: id.to_string(),
            pod_namespace: annotation(&POD_NAMESPACE_ANNOTATIONS),
            pod_name: annotation(&POD_NAME_ANNOTATIONS),
            container_name: annotation(&[CONTAINER_NAME_ANNOTATION]),
            image,
            runtime: ToolInfo { path: runtime.binary().to_path_buf(), version: runtime_version },
            criu: ToolInfo { path: criu_path, version: criu_version.to_string() },
            kernel: criu::kernel_release(),
            host: criu::host_name(),
            created,
            options: req.flags.clone(),
            rootfs_diff,
            duration_ms: started.elapsed().as_millis() as u64,
            digest: None, // set by the commit, which hashes
            files: Default::default(),
            gpu: gpu_record,
            flat: partial.is_flat(),
        };
        test_stop_point(id, STOP_HASHING);
        // Hashing, syncing and the rename into place.
        let manifest = clock.phase("commit", || partial.commit(manifest)).map_err(|source| CheckpointError::Store {
            what: "checkpoint",
            id: id.to_string(),
            source: Box::new(source),
        })?;
        test_stop_point(id, STOP_COMMIT);
        info!(
            "container {id}: checkpoint {} complete: {} in {} ms",
            target.display(),
            mib(manifest.total_size()),
            started.elapsed().as_millis()
        );
        if let Some(e) = gpu_resume {
            return Err(CheckpointError::GpuResume { id: id.into(), target, source: Box::new(e.into()) });
        }
        Ok(manifest)
    }

    /// Refuses, before anything is frozen, a checkpoint whose manifest could never be restored:
    /// its namespace, container id and the pod names CRI annotates must be what a restore
    /// accepts (`Manifest::validate`). A hand-made annotation (`ctr run --annotation
    /// io.kubernetes.pod.namespace=Team_A`) would otherwise give a checkpoint that every
    /// restore refuses as broken.
    fn check_identity(&self, c: &Container) -> Result<()> {
        let annotation = |keys: &[&str]| keys.iter().find_map(|k| spec_annotation(Some(&c.annotations), k));
        let (pod_namespace, pod_name, container_name) = (
            annotation(&POD_NAMESPACE_ANNOTATIONS),
            annotation(&POD_NAME_ANNOTATIONS),
            annotation(&[CONTAINER_NAME_ANNOTATION]),
        );
        criu::validate_identity(&criu::Identity {
            namespace: self.namespace,
            container_id: &c.id,
            pod_namespace: pod_namespace.as_deref(),
            pod_name: pod_name.as_deref(),
            container_name: container_name.as_deref(),
        })
        .map_err(|e| CheckpointError::BadRequest {
            id: c.id.clone(),
            message: format!("its checkpoint could not be restored: {e} (from its spec's annotations or ids)"),
        })
    }

    /// Finds CRIU (the runc option `CriuPath`, else `criu` on PATH) and checks its version.
    pub fn criu(&self, c: &Container, what: &'static str) -> Result<(PathBuf, criu::CriuVersion)> {
        let preflight = |source| CheckpointError::Preflight { what, id: c.id.clone(), source };
        let path = std::env::var_os("PATH");
        let criu_path = criu::find_criu(c.runtime.opts().criu.as_deref(), path.as_deref()).map_err(preflight)?;
        let out = tool_output(self.spawner, &criu_path, "--version").map_err(|source| CheckpointError::Criu {
            what,
            id: c.id.clone(),
            source,
        })?;
        let version = criu::parse_criu_version(&out).map_err(preflight)?;
        criu::require_criu_version(version).map_err(preflight)?;
        Ok((criu_path, version))
    }

    /// After a failed dump: CRIU thaws what it froze, but a CRIU that was killed leaves the
    /// freezer cgroup frozen, and for `exit` we froze it ourselves. Resume the container then,
    /// unless the client had paused it.
    fn recover(&self, runtime: &OciRuntime, c: &Container, was_paused: bool) -> String {
        match runtime.state(&c.id, &c.bundle) {
            Ok(st) if matches!(st.status, ContainerStatus::Paused | ContainerStatus::Pausing) && !was_paused => {
                match runtime.resume(&c.id, &c.bundle) {
                    Ok(()) => "the container was left frozen and has been resumed".into(),
                    Err(e) => format!("the container is left frozen and could not be resumed: {e}"),
                }
            }
            Ok(st) => format!("the container is {:?}", st.status).to_lowercase(),
            Err(e) => format!("the container's state is unknown: {e}"),
        }
    }
}

/// How the container is frozen around the dump, and what was copied before the freeze.
#[derive(Debug, Clone)]
struct Frozen {
    /// The client had paused it: never thaw it.
    was_paused: bool,
    /// Freeze once the dump is done (CRIU's CUDA plugin needs running threads during it).
    freeze_after_dump: bool,
    /// Thaw once memory and files are captured (not with `exit`).
    thaw_after_dump: bool,
    /// The pre-dump rounds taken while it ran (none: `rounds` 0): the final dump's parent.
    pre_dumps: PreDumpLayout,
}

/// The GPU side of one checkpoint.
struct GpuContext<'p, 's> {
    plan: Option<&'p GpuCheckpoint>,
    session: &'s mut Option<GpuSession<'p>>,
}

/// containerd 1.6/1.7 commit their own checkpoint dir to the content store even when the
/// checkpoint went to `image_path`. Left empty, that is the same blob every time, and every
/// checkpoint after the first fails in containerd with "content sha256:…: already exists". A
/// small pointer to where the checkpoint really is makes each blob unique and tells whoever
/// finds it in the content store where to look. Best effort: the checkpoint itself is done.
/// containerd 2.x passes `image_path` itself as the path (and commits nothing): then no pointer,
/// or it would sit in the checkpoint, unlisted in its manifest, and break it.
pub fn write_pointer(containerd_dir: &Path, target: &Path, id: &str) {
    if is_same_dir(containerd_dir, target) {
        return;
    }
    let body = serde_json::json!({ "checkpoint": target, "container_id": id, "created": criu::now_rfc3339() });
    let path = containerd_dir.join(POINTER_FILE);
    if let Err(e) = std::fs::write(&path, body.to_string()) {
        warn!("container {id}: cannot write {}: {e}", path.display());
    }
}

/// Whether `a` and `b` name the same directory (same device and inode: spelling, symlinks and
/// trailing slashes aside).
fn is_same_dir(a: &Path, b: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (std::fs::metadata(a), std::fs::metadata(b)) {
        (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
        _ => false,
    }
}

/// File in the bundle naming the partial checkpoint being written, for the `delete` action of a
/// shim that died mid-checkpoint (the partial dir is beside the target, which `delete` does not
/// know otherwise).
pub const PARTIAL_RECORD: &str = "checkpoint-partial";

/// [`PARTIAL_RECORD`] while a checkpoint runs; removed when dropped.
struct PartialRecord(PathBuf);

impl PartialRecord {
    fn write(bundle: &Path, partial: &Path) -> Self {
        let record = bundle.join(PARTIAL_RECORD);
        if let Err(e) = std::fs::write(&record, partial.as_os_str().as_encoded_bytes()) {
            warn!("{}: {e}", record.display());
        }
        PartialRecord(record)
    }
}

impl Drop for PartialRecord {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Removes the partial checkpoint recorded in `bundle` (see [`PARTIAL_RECORD`]), if the record
/// names one: a hidden `.<name>.partial-<pid>-<n>` directory, nothing else.
pub fn remove_recorded_partial(bundle: &Path) {
    let record = bundle.join(PARTIAL_RECORD);
    let Ok(text) = std::fs::read_to_string(&record) else { return };
    let dir = PathBuf::from(text.trim_end_matches('\n'));
    let is_partial = dir.is_absolute()
        && dir.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with('.') && n.contains(".partial-"));
    if is_partial && std::fs::symlink_metadata(&dir).is_ok_and(|m| m.is_dir()) {
        if let Err(e) = std::fs::remove_dir_all(&dir) {
            warn!("{}: cannot remove partial checkpoint: {e}", dir.display());
        }
    }
    let _ = std::fs::remove_file(&record);
}

/// CRIU's work dir (its logs stay there): the request's `work_path`, else the runc option
/// `CriuWorkPath`, else `<bundle>/work` as in containerd's runc shim. Created if missing.
pub fn work_dir(c: &Container, requested: Option<&Path>) -> Result<PathBuf> {
    let work =
        requested.map(Path::to_path_buf).or_else(|| c.criu_work.clone()).unwrap_or_else(|| c.bundle.join("work"));
    std::fs::create_dir_all(&work).map_err(|source| CheckpointError::Write {
        id: c.id.clone(),
        context: format!("create CRIU work dir {}", work.display()),
        source,
    })?;
    Ok(work)
}

fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / f64::from(1u32 << 20))
}

fn readonly_root(spec: Option<&SpecView>) -> bool {
    spec.is_some_and(SpecView::root_readonly)
}

/// Appends `a` to the journal of the store at `root` (never fails: see [`journal::record`]).
/// Unit tests build containers with the default config: their attempts stay out of the host's store.
pub(crate) fn record(root: &Path, a: &Attempt) {
    if cfg!(test) && root == kybernate_runtime_select::CheckpointConfig::default().root {
        return;
    }
    journal::record(root, a);
}

/// The journal's error class of a failed checkpoint or restore: a short, stable label value.
pub(crate) fn error_class(e: &Error) -> &'static str {
    match e {
        Error::Checkpoint(e) => checkpoint_error_class(e),
        Error::NotFound(_) => "not_found",
        Error::AlreadyExists(_) => "already_exists",
        Error::FailedPrecondition(_) => "failed_precondition",
        Error::InvalidArgument(_) | Error::Options(_) => "bad_request",
        Error::Select(_) | Error::Config(_) => "config",
        Error::Runtime(_) => "runtime",
        Error::Io(_) => "io",
        Error::Os { .. } | Error::Shim { .. } | Error::Internal { .. } => "internal",
    }
}

fn checkpoint_error_class(e: &CheckpointError) -> &'static str {
    match e {
        CheckpointError::BadRequest { .. } => "bad_request",
        CheckpointError::Busy { .. } => "busy",
        CheckpointError::Preflight { .. } => "preflight",
        CheckpointError::Criu { .. } | CheckpointError::Runtime(_) => "runtime",
        CheckpointError::Store { .. } => "store",
        CheckpointError::Write { .. } => "write",
        CheckpointError::RootfsDiff { .. } | CheckpointError::ApplyRootfsDiff { .. } => "rootfs_diff",
        CheckpointError::Verify { .. } => "verify",
        CheckpointError::Policy { .. } | CheckpointError::Grants { .. } => "policy",
        CheckpointError::Restore { .. } => "restore",
        CheckpointError::Gpu { .. } | CheckpointError::GpuResume { .. } => "gpu",
        CheckpointError::Stop { .. } => "stop",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::restore::{RestorePlan, RESTORE_ANNOTATION};

    fn any(o: &CheckpointOptions) -> Any {
        Any { type_url: CHECKPOINT_OPTIONS.into(), value: o.write_to_bytes().unwrap(), ..Default::default() }
    }

    #[test]
    fn no_options_mean_leave_running_into_containerds_path() {
        let r = CheckpointRequest::decode("c", None).unwrap();
        assert!(!r.flags.exit);
        assert_eq!(r.image_path, None);
    }

    #[test]
    fn options_map_onto_flags() {
        let o = CheckpointOptions {
            exit: true,
            open_tcp: true,
            terminal: true,
            file_locks: true,
            external_unix_sockets: true,
            empty_namespaces: vec!["network".into()],
            image_path: "/var/lib/x".into(),
            work_path: "/tmp/w".into(),
            ..Default::default()
        };
        let r = CheckpointRequest::decode("c", Some(&any(&o))).unwrap();
        assert!(r.flags.exit && r.flags.open_tcp && r.flags.terminal && r.flags.file_locks);
        assert!(r.flags.external_unix_sockets);
        assert_eq!(r.flags.empty_namespaces, vec!["network".to_string()]);
        assert_eq!(r.image_path, Some(PathBuf::from("/var/lib/x")));
        assert_eq!(r.work_path, Some(PathBuf::from("/tmp/w")));
    }

    #[test]
    fn bad_options_are_refused_with_the_reason() {
        let wrong = Any { type_url: "containerd.runc.v1.Options".into(), ..Default::default() };
        let e = CheckpointRequest::decode("c", Some(&wrong)).unwrap_err();
        assert!(e.is_invalid_argument() && e.to_string().contains("unsupported checkpoint options type"), "{e}");
        let rel = CheckpointOptions { image_path: "relative/dir".into(), ..Default::default() };
        let e = CheckpointRequest::decode("c", Some(&any(&rel))).unwrap_err();
        assert!(e.to_string().contains("relative/dir is not an absolute path"), "{e}");
        let garbage = Any { type_url: CHECKPOINT_OPTIONS.into(), value: vec![0xff, 0xff], ..Default::default() };
        assert!(CheckpointRequest::decode("c", Some(&garbage)).unwrap_err().to_string().contains("malformed"));
        let ns = CheckpointOptions { empty_namespaces: vec!["bogus".into()], ..Default::default() };
        assert!(CheckpointRequest::decode("c", Some(&any(&ns))).is_err());
    }

    #[test]
    fn containerd_dirs_without_a_checkpoint_are_explained() {
        let dir = tempfile::tempdir().unwrap();
        let e = RestorePlan::from_containerd("c", dir.path()).unwrap_err();
        assert!(e.to_string().contains("not a checkpoint"), "{e}");
        write_pointer(dir.path(), Path::new("/var/lib/kybernate/checkpoints/ns/c/1"), "c");
        let e = RestorePlan::from_containerd("c", dir.path()).unwrap_err();
        assert!(
            e.to_string().contains("/var/lib/kybernate/checkpoints/ns/c/1")
                && e.to_string().contains(RESTORE_ANNOTATION),
            "{e}"
        );
        std::fs::remove_file(dir.path().join(POINTER_FILE)).unwrap();
        std::fs::write(dir.path().join("inventory.img"), b"x").unwrap();
        let plan = RestorePlan::from_containerd("c", dir.path()).unwrap();
        assert!(plan.manifest.is_none() && plan.images == dir.path());
    }

    /// containerd 1.6/1.7 hand the shim a temp dir of their own beside `image_path`; 2.x hands it

    #[test]
    fn the_pointer_goes_only_into_a_dir_of_containerds_own() {
        let store = tempfile::tempdir().unwrap();
        let target = store.path().join("ns/c/1");
        std::fs::create_dir_all(&target).unwrap();
        let containerd = tempfile::tempdir().unwrap();
        write_pointer(containerd.path(), &target, "c");
        let pointer: serde_json::Value =
            serde_json::from_slice(&std::fs::read(containerd.path().join(POINTER_FILE)).unwrap()).unwrap();
        assert_eq!(pointer["checkpoint"], target.display().to_string());
        for same in [target.clone(), store.path().join("ns/c/../c/1/")] {
            write_pointer(&same, &target, "c");
            assert!(!target.join(POINTER_FILE).exists(), "pointer written into the checkpoint via {}", same.display());
        }
        let link = store.path().join("link");
        std::os::unix::fs::symlink(&target, &link).unwrap();
        write_pointer(&link, &target, "c");
        assert!(!target.join(POINTER_FILE).exists(), "pointer written into the checkpoint via a symlink");
    }
}
