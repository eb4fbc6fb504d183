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
    /// The checkpoint is planned first ([`Plan::new`]: CRIU, GPU mode, pre-dump rounds, how the
    /// container is held still, what becomes of it), before anything is frozen or written; a
    /// request that cannot succeed is refused there. Then [`Run`] carries out the plan's steps
    /// in order under one rollback guard: on failure it undoes exactly what was done (thaws
    /// what it froze, gives CUDA processes their GPU state back, removes the partial
    /// checkpoint), so the container is left running and nothing partial is visible.
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
        let result = Plan::new(self, c, pid, req, target, was_paused)
            .and_then(|plan| Run::begin(&plan, &mut clock).and_then(Run::run));
        let mut a = self.attempt(Kind::Checkpoint, c, &clock);
        a.checkpoint = crate::restore::checkpoint_name(target, &c.checkpoint_config);
        a.exit = req.flags.exit;
        match &result {
            Ok(m) => {
                a.bytes = m.total_size();
                a.gpu_bytes = m.gpu.as_ref().map_or(0, |g| g.bytes_total);
                a.criu_frozen_ms = m.dump_stats.map(|d| d.stopped_ms());
            }
            Err(e) => a.failed(checkpoint_error_class(e), &e.to_string()),
        }
        record(&c.checkpoint_config.root, &a);
        if result.is_ok() {
            // The node's limits: what they give up goes once this checkpoint is safe.
            crate::retention::prune_after_commit(c, target);
        }
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
}

/// After a failed dump: CRIU thaws what it froze, but a CRIU that was killed leaves the freezer
/// cgroup frozen, and we may have frozen it ourselves. Resume the container then, unless the
/// client had paused it. Returns what became of the container, for the error message.
fn recover(runtime: &OciRuntime, c: &Container, was_paused: bool) -> String {
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

/// How the container is held still while its memory and files are captured.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Hold {
    /// The client paused it: frozen already, and it stays so.
    ClientPaused,
    /// Frozen by us before the dump (`runtime pause`), so that memory and the rootfs changes
    /// are one moment's state and a container that keeps writing files cannot race the diff.
    FreezeBeforeDump,
    /// CRIU's CUDA plugin must find the threads running: CRIU freezes it for the dump, and we
    /// keep it frozen from the end of the dump until the files are captured.
    FreezeAfterDump,
}

/// One step of a checkpoint, in the order [`Plan::steps`] gives them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Step {
    /// Pre-dump rounds: memory copied while the container runs.
    PreDump,
    /// Driver-API mode: lock every CUDA process, then move its device memory to host memory.
    GpuLock,
    GpuCheckpoint,
    Freeze,
    /// `runtime checkpoint`: CRIU writes the images (hashed and written back as they grow).
    Dump,
    FreezeAfterDump,
    /// The rootfs changes, `spec.dump`, `config.dump` and CRIU's statistics beside the images.
    Capture,
    /// Leave-running: the container runs again (and its CUDA processes get their state back)
    /// while the checkpoint is hashed and synced.
    Thaw,
    /// Hash what is left, sync, write the manifest and rename the checkpoint into place.
    Commit,
    /// `exit`: the container is killed only once its checkpoint is durable, so that a failure
    /// before (a full disk, say) cannot lose the process. CRIU is never given `exit`.
    Kill,
}

/// The steps of a checkpoint with `pre_dump_rounds` rounds, CUDA state moved through the driver
/// API or not, the container held as `hold`, and killed after (`exit`) or left running.
fn steps(pre_dump_rounds: u32, driver_api: bool, hold: Hold, exit: bool) -> Vec<Step> {
    let mut steps = Vec::with_capacity(10);
    if pre_dump_rounds > 0 {
        steps.push(Step::PreDump);
    }
    if driver_api {
        steps.extend([Step::GpuLock, Step::GpuCheckpoint]);
    }
    if hold == Hold::FreezeBeforeDump {
        steps.push(Step::Freeze);
    }
    steps.push(Step::Dump);
    if hold == Hold::FreezeAfterDump {
        steps.push(Step::FreezeAfterDump);
    }
    steps.push(Step::Capture);
    if !exit && hold != Hold::ClientPaused {
        steps.push(Step::Thaw);
    }
    steps.push(Step::Commit);
    if exit {
        steps.push(Step::Kill);
    }
    steps
}

/// What one checkpoint will do, decided before anything is frozen or written.
struct Plan<'a> {
    ckpt: &'a Checkpointer<'a>,
    c: &'a Container,
    req: &'a CheckpointRequest,
    target: &'a Path,
    /// The container's runtime, with CRIU's path (and environment in the driver-API mode).
    runtime: OciRuntime,
    criu_path: PathBuf,
    criu_version: criu::CriuVersion,
    gpu: Option<GpuCheckpoint>,
    pre_dump_rounds: u32,
    hold: Hold,
    /// CRIU's work dir (its logs).
    work: PathBuf,
    /// `[checkpoint] signing_key`, read before anything is frozen; signs at commit.
    signing_key: Option<criu::SigningKey>,
    /// The checkpoint's expected size: the memory to dump and the container's file changes
    /// (rootfs-diff.tar), measured once for the store's limits and the target's free space.
    memory: u64,
    changes: u64,
}

impl<'a> Plan<'a> {
    /// Decides the checkpoint, refusing here (nothing frozen, nothing written) what cannot work:
    /// an identity no restore accepts, CRIU missing or too old, pre-dump on a kernel without
    /// soft-dirty bits or where it cannot apply, CUDA state of a paused container.
    fn new(
        ckpt: &'a Checkpointer<'a>,
        c: &'a Container,
        pid: u32,
        req: &'a CheckpointRequest,
        target: &'a Path,
        was_paused: bool,
    ) -> Result<Self> {
        let id = c.id.as_str();
        ckpt.check_identity(c)?;
        let (criu_path, criu_version) = ckpt.criu(c, "checkpoint")?;
        let mut pre_dump = predump::decide(c, req.pre_dump)?;
        predump::require_dirty_tracking(ckpt.spawner, c, &criu_path, pre_dump)?;
        let mut runtime = c.runtime.with_criu(criu_path.clone());
        let gpu_err = |source| CheckpointError::Gpu { what: "checkpoint", id: id.into(), source: Box::new(source) };
        // GPU containers: decided before anything is frozen.
        let pids = runtime.ps(id, &c.bundle).unwrap_or_else(|e| {
            warn!("container {id}: cannot list its processes for CUDA detection: {e}");
            Vec::new()
        });
        let gpu = GpuCheckpoint::prepare(ckpt.spawner, id, &c.bundle, c.record.gpu, pid, &pids, &c.checkpoint_config)
            .map_err(gpu_err)?;
        let gpu_mode = gpu.as_ref().map_or(GpuMode::None, |g| g.mode);
        if gpu_mode == GpuMode::DriverApi {
            // Our images carry no CUDA plugin state: a plugin installed on the node stays out.
            let empty = gpu::empty_plugin_dir(&c.bundle).map_err(gpu_err)?;
            runtime = runtime.with_criu_env(kybernate_gpu::cuda::preflight::CRIU_LIBS_DIR, empty);
        }
        if was_paused && gpu_mode != GpuMode::None {
            // The driver cannot lock the threads of a frozen process.
            return Err(CheckpointError::BadRequest {
                id: id.into(),
                message: "its CUDA state cannot be checkpointed while it is paused: resume it first".into(),
            });
        }
        if pre_dump.rounds > 0 && (was_paused || gpu_mode != GpuMode::None) {
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
        let hold = if was_paused {
            Hold::ClientPaused
        } else if gpu.as_ref().map_or(true, GpuCheckpoint::freeze_before_dump) {
            Hold::FreezeBeforeDump
        } else {
            Hold::FreezeAfterDump
        };
        let preflight = |source| CheckpointError::Preflight { what: "checkpoint", id: id.to_string(), source };
        let memory = criu::memory_estimate(pid, Path::new("/proc"), Path::new("/sys/fs/cgroup"))
            .map_err(preflight)?
            .unwrap_or(0);
        // rootfs-diff.tar holds the container's file changes too.
        let changes = c.rootfs_upper.as_deref().map(criu::dir_size).unwrap_or(0);
        crate::retention::check_fits(c, memory.saturating_add(changes), target)?;
        let work = work_dir(c, req.work_path.as_deref())?;
        let signing_key = match &c.checkpoint_config.signing_key {
            Some(path) => Some(
                criu::SigningKey::load(path)
                    .map_err(|source| CheckpointError::SigningKey { id: id.into(), source: Box::new(source) })?,
            ),
            None => None,
        };
        Ok(Self {
            ckpt,
            c,
            req,
            target,
            runtime,
            criu_path,
            criu_version,
            gpu,
            pre_dump_rounds: pre_dump.rounds,
            hold,
            work,
            signing_key,
            memory,
            changes,
        })
    }

    /// The steps, in the order they run.
    fn steps(&self) -> Vec<Step> {
        let driver_api = self.gpu.as_ref().is_some_and(|g| g.mode == GpuMode::DriverApi);
        steps(self.pre_dump_rounds, driver_api, self.hold, self.req.flags.exit)
    }

    fn id(&self) -> &str {
        &self.c.id
    }

    fn criu_err(&self, source: crate::runtime::RuntimeError) -> CheckpointError {
        CheckpointError::Criu { what: "checkpoint", id: self.id().into(), source }
    }

    fn gpu_err(&self, source: gpu::GpuError) -> CheckpointError {
        CheckpointError::Gpu { what: "checkpoint", id: self.id().into(), source: Box::new(source) }
    }

    fn write_err(&self, context: String) -> impl FnOnce(std::io::Error) -> CheckpointError + '_ {
        move |source| CheckpointError::Write { id: self.id().into(), context, source }
    }
}

/// What the dump and the capture leave for the commit.
#[derive(Default)]
struct Captured {
    /// The bundle's `config.json` as it was at the dump (read for `spec.dump` and the root's
    /// read-only flag; a flat checkpoint needs neither).
    spec: Option<SpecView>,
    rootfs_diff: bool,
    dump_ms: u64,
    /// CRIU's own account of the dump (its `stats-dump`).
    dump_stats: Option<criu::manifest::DumpStats>,
}

/// A plan being carried out, and the rollback guard over it: it knows what was done, and
/// dropping it before the end undoes exactly that (see [`Run::undo`]).
struct Run<'p, 'c> {
    plan: &'p Plan<'p>,
    clock: &'c mut Clock,
    started: Instant,
    /// Removed when dropped uncommitted.
    partial: Option<PartialCheckpoint>,
    /// Names the partial dir in the bundle while the run lasts (for a dead shim's `delete`).
    _record: PartialRecord,
    pre_dumps: PreDumpLayout,
    /// The driver-API session: dropped with CUDA processes locked, it puts them back.
    session: Option<GpuSession<'p>>,
    /// The container is frozen by this checkpoint (by us or by CRIU for us) and not thawed yet.
    frozen: bool,
    captured: Captured,
    /// A failed GPU resume after a leave-running thaw: reported once the checkpoint is safe.
    gpu_resume: Option<kybernate_gpu::cuda::session::GpuResumeError>,
    /// [`Run::undo`] ran.
    undone: bool,
}

impl<'p, 'c> Run<'p, 'c> {
    /// Creates the partial checkpoint (a hidden sibling of the target) and checks, before
    /// anything is frozen, that the memory and the file changes fit on its filesystem.
    fn begin(plan: &'p Plan<'p>, clock: &'c mut Clock) -> Result<Self> {
        let (c, id) = (plan.c, plan.id());
        // Into containerd's own dir (no image_path): CRIU's images at the top, as containerd's
        // runc shim writes them and containerd 2.x's CRI unpacks them.
        let begin =
            if plan.req.image_path.is_some() { PartialCheckpoint::begin } else { PartialCheckpoint::begin_flat };
        let mut partial = begin(plan.target).map_err(|source| CheckpointError::Store {
            what: "checkpoint",
            id: id.to_string(),
            source: Box::new(source),
        })?;
        if let Some(key) = &plan.signing_key {
            partial.sign_with(key.clone());
        }
        let record = PartialRecord::write(&c.bundle, partial.dir());
        let pre_dumps = PreDumpLayout {
            dir: partial.dir().to_path_buf(),
            images: partial.images_dir(),
            rounds: plan.pre_dump_rounds,
        };
        let preflight = |source| CheckpointError::Preflight { what: "checkpoint", id: id.to_string(), source };
        let (memory, changes) = (plan.memory, plan.changes);
        criu::check_space(partial.dir(), memory.saturating_add(changes)).map_err(preflight)?;
        info!(
            "container {id}: checkpoint into {} (CRIU {}, about {} of memory and {} of file changes), steps {:?}",
            plan.target.display(),
            plan.criu_version,
            mib(memory),
            mib(changes),
            plan.steps()
        );
        Ok(Self {
            plan,
            clock,
            started: Instant::now(),
            partial: Some(partial),
            _record: record,
            pre_dumps,
            session: plan.gpu.as_ref().and_then(GpuCheckpoint::session),
            frozen: false,
            captured: Captured::default(),
            gpu_resume: None,
            undone: false,
        })
    }

    /// Runs every step in order; the first failure undoes what was done ([`Run::abandon`]), as
    /// dropping `self` half-way (a panic) would.
    fn run(mut self) -> Result<Manifest> {
        let mut manifest = None;
        for step in self.plan.steps() {
            let done = match step {
                Step::PreDump => self.pre_dump(),
                Step::GpuLock => self.gpu_lock(),
                Step::GpuCheckpoint => self.gpu_checkpoint(),
                Step::Freeze => self.freeze(),
                Step::Dump => self.dump(),
                Step::FreezeAfterDump => self.freeze_after_dump(),
                Step::Capture => self.capture(),
                Step::Thaw => {
                    self.thaw();
                    Ok(())
                }
                Step::Commit => self.commit().map(|m| manifest = Some(m)),
                Step::Kill => self.kill(),
            };
            if let Err(e) = done {
                return Err(self.abandon(step, e));
            }
        }
        let manifest = manifest.ok_or_else(|| CheckpointError::Write {
            id: self.plan.id().into(),
            context: "the checkpoint plan has no commit step".into(),
            source: std::io::Error::other("no commit"),
        })?;
        let (id, target) = (self.plan.id().to_string(), self.plan.target.to_path_buf());
        info!(
            "container {id}: checkpoint {} complete: {} in {} ms",
            target.display(),
            mib(manifest.total_size()),
            self.started.elapsed().as_millis()
        );
        if let Some(e) = self.gpu_resume.take() {
            return Err(CheckpointError::GpuResume { id, target, source: Box::new(e.into()) });
        }
        Ok(manifest)
    }

    fn set_phase(&self, phase: &str) {
        if let Some(p) = &self.partial {
            p.set_phase(phase);
        }
    }

    fn pre_dump(&mut self) -> Result<()> {
        let plan = self.plan;
        self.set_phase(criu::PHASE_CRIU_DUMP);
        if let (Some(p), true) = (self.partial.as_mut(), plan.req.flags.exit) {
            // The rounds are hashed (and written back) while the container still runs (see `dump`).
            p.follow_dump();
        }
        let (runtime, c, layout) = (&plan.runtime, plan.c, &self.pre_dumps);
        self.clock.phase("pre_dump", || {
            predump::run_rounds(runtime, c, &plan.req.flags, layout, &plan.work, || recover(runtime, c, false))
        })
    }

    fn gpu_lock(&mut self) -> Result<()> {
        let plan = self.plan;
        let timeout = plan.gpu.as_ref().map_or(0, GpuCheckpoint::lock_timeout_ms);
        self.set_phase(criu::PHASE_GPU_LOCK);
        let Some(s) = self.session.as_mut() else { return Ok(()) };
        self.clock.phase("gpu_lock", || s.lock_all(timeout)).map_err(|e| plan.gpu_err(e.into()))
    }

    fn gpu_checkpoint(&mut self) -> Result<()> {
        let plan = self.plan;
        self.set_phase(criu::PHASE_GPU_CHECKPOINT);
        let Some(s) = self.session.as_mut() else { return Ok(()) };
        self.clock.phase("gpu_checkpoint", || s.checkpoint_all()).map_err(|e| plan.gpu_err(e.into()))
    }

    fn freeze(&mut self) -> Result<()> {
        let plan = self.plan;
        // Frozen from the request on: the cgroup freezes during the call.
        self.clock.freeze();
        self.frozen = true;
        self.clock.phase("freeze", || plan.runtime.pause(plan.id(), &plan.c.bundle)).map_err(|e| plan.criu_err(e))?;
        test_stop_point(plan.id(), STOP_FREEZE);
        Ok(())
    }

    fn dump(&mut self) -> Result<()> {
        let plan = self.plan;
        let id = plan.id();
        let partial = self.partial.as_ref().ok_or_else(|| no_partial(id))?;
        // CRIU always leaves the container alive (see `Step::Kill`); it stays frozen if it was.
        let dump_flags = CheckpointFlags { exit: false, ..plan.req.flags.clone() };
        let mut args = dump_flags.checkpoint_args(&partial.images_dir(), &plan.work);
        // After pre-dumps: only the pages changed since the last round (CRIU links it as `parent`).
        args.extend(criu::predump::parent_args(self.pre_dumps.final_parent().as_deref()));
        // The flags after --image-path I --work-path W, for the log.
        let flags: Vec<String> = args.iter().skip(4).map(|a| a.to_string_lossy().into_owned()).collect();
        info!("container {id}: dump with flags [{}]", flags.join(" "));
        // A stats-dump left by an earlier dump must not pass for this one's.
        let _ = std::fs::remove_file(plan.work.join(criu::STATS_DUMP));
        if let Some(p) = self.partial.as_mut() {
            p.set_phase(criu::PHASE_CRIU_DUMP);
            if plan.req.flags.exit {
                // Frozen until the checkpoint is durable: its images are hashed, and written
                // back, while CRIU writes them, so that little is left after the dump. Leave-running,
                // the dump runs alone, as a raw `runc checkpoint`'s: the container runs again
                // before the hashing and the writeback, and the frozen dump keeps the CPU and the disk.
                p.follow_dump();
            }
        }
        if plan.hold == Hold::FreezeAfterDump {
            // CRIU freezes it for the dump; we keep it frozen after.
            self.clock.freeze();
            self.frozen = true;
        }
        let started = Instant::now();
        let dumped = plan.runtime.checkpoint(id, &plan.c.bundle, args);
        self.clock.add_phase("dump", started.elapsed());
        if let Err(e) = dumped {
            let outcome = self.undo();
            return Err(CheckpointError::runtime_failure("checkpoint", id, e, &plan.work.join("dump.log"), outcome));
        }
        self.captured.dump_ms = started.elapsed().as_millis() as u64;
        // CRIU's `parent` links become nested directories: plain files the manifest lists.
        let rounds = self.pre_dumps.rounds;
        self.pre_dumps
            .nest_rounds()
            .map_err(plan.write_err(format!("nest the {rounds} pre-dump round(s) under the final dump")))
    }

    fn freeze_after_dump(&mut self) -> Result<()> {
        let plan = self.plan;
        self.clock.phase("freeze", || plan.runtime.pause(plan.id(), &plan.c.bundle)).map_err(|e| plan.criu_err(e))
    }

    /// Captures the files beside CRIU's images while the container is still frozen. A flat
    /// checkpoint (containerd's own dir) holds CRIU's images and the manifest only: containerd
    /// keeps the spec and the writable layer itself (`ctr c checkpoint --rw`, CRI).
    fn capture(&mut self) -> Result<()> {
        let plan = self.plan;
        let (c, id) = (plan.c, plan.id());
        let partial = self.partial.as_ref().ok_or_else(|| no_partial(id))?;
        let started = Instant::now();
        let stats = plan.work.join(criu::STATS_DUMP);
        match criu::criu_stats::read_dump(&stats) {
            Ok(t) => self.captured.dump_stats = Some(criu::manifest::DumpStats::from(&t)),
            Err(e) => warn!("container {id}: no CRIU dump statistics: {e}"),
        }
        let write = |name: &str, bytes: &[u8]| {
            // Named as in the checkpoint: the hidden partial dir is gone once the error is read.
            std::fs::write(partial.dir().join(name), bytes).map_err(plan.write_err(format!("write {name}")))
        };
        if !partial.is_flat() {
            let config = c.bundle.join("config.json");
            let spec_bytes = std::fs::read(&config).map_err(plan.write_err(format!("read {}", config.display())))?;
            self.captured.spec = SpecView::from_slice(&spec_bytes).ok();
            write(criu::SPEC_DUMP, &spec_bytes)?;
            test_stop_point(id, STOP_ROOTFS_DIFF);
            if let (Some(upper), false) = (&c.rootfs_upper, readonly_root(self.captured.spec.as_ref())) {
                self.captured.rootfs_diff = criu::write_rootfs_diff(upper, &partial.dir().join(criu::ROOTFS_DIFF))
                    .map_err(|source| CheckpointError::RootfsDiff { id: id.into(), source })?;
            }
            if let Ok(bytes) = std::fs::read(&stats) {
                write(criu::STATS_DUMP, &bytes)?;
            }
            write(criu::CONFIG_DUMP, &self.config_dump()?)?;
        }
        self.clock.add_phase("rootfs_diff", started.elapsed());
        Ok(())
    }

    /// `config.dump`, as CRI-O and checkpointctl read it.
    fn config_dump(&self) -> Result<Vec<u8>> {
        let (plan, c) = (self.plan, self.plan.c);
        let annotation = |key: &str| spec_annotation(Some(&c.annotations), key);
        let image = annotation(IMAGE_NAME_ANNOTATION).unwrap_or_default();
        let created = criu::now_rfc3339();
        let config = ConfigDump {
            id: c.id.clone(),
            name: annotation(CONTAINER_NAME_ANNOTATION).unwrap_or_else(|| c.id.clone()),
            rootfs_image: image.clone(),
            rootfs_image_ref: String::new(),
            rootfs_image_name: image,
            runtime: plan.runtime.binary().display().to_string(),
            created_time: created.clone(),
            checkpointed_time: created,
            restored: false,
        };
        serde_json::to_vec_pretty(&config)
            .map_err(|e| plan.write_err("encode config.dump".into())(std::io::Error::other(e)))
    }

    /// Memory and files are captured: the rest (hashing, syncing) runs with the container live.
    fn thaw(&mut self) {
        let plan = self.plan;
        self.clock.phase("thaw", || recover(&plan.runtime, plan.c, false));
        self.clock.thaw();
        self.frozen = false;
        if let Some(s) = self.session.as_mut() {
            self.gpu_resume = s.resume().err();
        }
    }

    /// The manifest, then hashing, syncing and the rename into place.
    fn commit(&mut self) -> Result<Manifest> {
        let plan = self.plan;
        let (c, id) = (plan.c, plan.id());
        let gpu_record = plan.gpu.as_ref().map(|g| g.record(self.session.as_ref(), self.captured.dump_ms));
        if let Some(r) = &gpu_record {
            info!(
                "container {id}: GPU mode {}, {} CUDA process(es), {} bytes of device memory, phases {:?} ms",
                r.mode.as_str(),
                r.processes.len(),
                r.bytes_total,
                r.phases_ms
            );
        }
        let annotation = |keys: &[&str]| keys.iter().find_map(|k| spec_annotation(Some(&c.annotations), k));
        let runtime_version = plan.runtime.version().unwrap_or_else(|e| {
            warn!("container {id}: {e}");
            String::new()
        });
        let partial = self.partial.take().ok_or_else(|| no_partial(id))?;
        let manifest = Manifest {
            format_version: criu::FORMAT_VERSION,
            namespace: plan.ckpt.namespace.to_string(),
            container_id: id.to_string(),
            pod_namespace: annotation(&POD_NAMESPACE_ANNOTATIONS),
            pod_name: annotation(&POD_NAME_ANNOTATIONS),
            container_name: annotation(&[CONTAINER_NAME_ANNOTATION]),
            image: annotation(&[IMAGE_NAME_ANNOTATION]),
            runtime: ToolInfo { path: plan.runtime.binary().to_path_buf(), version: runtime_version },
            criu: ToolInfo { path: plan.criu_path.clone(), version: plan.criu_version.to_string() },
            kernel: criu::kernel_release(),
            host: criu::host_name(),
            created: criu::now_rfc3339(),
            options: plan.req.flags.clone(),
            rootfs_diff: self.captured.rootfs_diff,
            duration_ms: self.started.elapsed().as_millis() as u64,
            digest: None, // set by the commit, which hashes
            files: Default::default(),
            gpu: gpu_record,
            flat: partial.is_flat(),
            // What a restore needs of the node and its spec: the restore verdict (`criu::verdict`).
            needs: Some(criu::verdict::RestoreNeeds::for_bundle(
                &c.bundle,
                Some(&c.bundle.join(crate::gpu::CRIU_CONFIG_FILE)),
            )),
            // Leave-running: thawed already; `exit`: frozen until now, killed right after.
            frozen_ms: self.clock.frozen().map(|d| d.as_millis() as u64),
            dump_stats: self.captured.dump_stats,
        };
        test_stop_point(id, STOP_HASHING);
        let (manifest, times) = partial.commit_timed(manifest).map_err(|source| CheckpointError::Store {
            what: "checkpoint",
            id: id.to_string(),
            source: Box::new(source),
        })?;
        info!(
            "container {id}: {} hashed while CRIU wrote; the rest hashed and synced in {} ms",
            mib(times.followed_bytes),
            times.hash.as_millis()
        );
        // What was left to hash (and sync) after the dump, then the manifest and the rename.
        self.clock.add_phase("hash", times.hash);
        self.clock.add_phase("commit", times.sync_and_rename);
        test_stop_point(id, STOP_COMMIT);
        Ok(manifest)
    }

    fn kill(&mut self) -> Result<()> {
        let plan = self.plan;
        let (c, id) = (plan.c, plan.id());
        // Killed while frozen; `kill --all` thaws the cgroup itself on cgroup v1, else `recover`
        // does, so that the kill is delivered.
        self.clock
            .phase("kill", || plan.runtime.kill(id, &c.bundle, libc::SIGKILL as u32, true))
            .map_err(|e| CheckpointError::Stop { id: id.into(), target: plan.target.into(), source: Box::new(e) })?;
        // Frozen until killed: it never runs again here.
        self.clock.thaw();
        self.frozen = false;
        if let Some(s) = self.session.as_mut() {
            s.processes_exited();
        }
        recover(&plan.runtime, c, false);
        Ok(())
    }

    /// The error of failed `step`, after undoing what was done. Failures after the dump say what
    /// became of the container; the runtime's own failures carry that already, and a failed kill
    /// leaves a complete checkpoint (the container is thawed: it keeps running).
    fn abandon(&mut self, step: Step, e: CheckpointError) -> CheckpointError {
        // A failed dump undid its part already, to say what became of the container.
        let outcome = if self.undone { String::new() } else { self.undo() };
        match (step, &e) {
            (_, CheckpointError::Runtime(_)) => e,
            (Step::Kill, _) => e,
            (Step::Capture | Step::Commit | Step::Dump | Step::FreezeAfterDump, _) => {
                CheckpointError::Abandoned { id: self.plan.id().into(), source: Box::new(e), outcome }
            }
            _ => e,
        }
    }

    /// Undoes what was done: thaws a container this checkpoint froze (or that a killed CRIU left
    /// frozen), then gives the CUDA processes their GPU state back and unlocks them. The partial
    /// checkpoint goes with `self`. Returns what became of the container.
    fn undo(&mut self) -> String {
        let plan = self.plan;
        self.undone = true;
        // A client-paused container stays paused; any other is resumed if it is left frozen (by
        // us, or by a CRIU that was killed).
        let mut outcome = recover(&plan.runtime, plan.c, plan.hold == Hold::ClientPaused);
        if self.frozen && outcome.ends_with("has been resumed") {
            // Frozen by this checkpoint, not left so by accident.
            outcome = "the container has been thawed and is running".into();
        }
        self.frozen = false;
        self.clock.thaw();
        if let Some(s) = self.session.as_mut() {
            if let Err(e) = s.resume() {
                warn!("container {}: after the failed checkpoint: {e}", plan.id());
            }
        }
        outcome
    }
}

/// A step that needs the partial checkpoint ran after the commit consumed it: a plan out of order.
fn no_partial(id: &str) -> CheckpointError {
    CheckpointError::Write {
        id: id.into(),
        context: "checkpoint plan out of order".into(),
        source: std::io::Error::other("the partial checkpoint was already committed"),
    }
}

impl Drop for Run<'_, '_> {
    fn drop(&mut self) {
        // Uncommitted or still frozen: the run stopped at a failed step.
        if !self.undone && (self.partial.is_some() || self.frozen) {
            self.undo();
        }
    }
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
        CheckpointError::Incompatible { .. } => "incompatible",
        CheckpointError::Retention { .. } => "retention",
        CheckpointError::Trust { .. } => "trust",
        CheckpointError::SigningKey { .. } => "signing_key",
        CheckpointError::Gpu { .. } | CheckpointError::GpuResume { .. } => "gpu",
        CheckpointError::Stop { .. } => "stop",
        CheckpointError::Abandoned { source, .. } => checkpoint_error_class(source),
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
    fn the_plan_orders_its_steps() {
        use Step::*;
        let leave_running = steps(0, false, Hold::FreezeBeforeDump, false);
        assert_eq!(leave_running, [Freeze, Dump, Capture, Thaw, Commit]);
        assert_eq!(steps(0, false, Hold::FreezeBeforeDump, true), [Freeze, Dump, Capture, Commit, Kill]);
        // The client's pause is never undone by a leave-running checkpoint.
        assert_eq!(steps(0, false, Hold::ClientPaused, false), [Dump, Capture, Commit]);
        assert_eq!(steps(0, false, Hold::ClientPaused, true), [Dump, Capture, Commit, Kill]);
        // Pre-dump rounds run first, while the container runs; CUDA state moves before the freeze.
        assert_eq!(
            steps(2, true, Hold::FreezeBeforeDump, false),
            [PreDump, GpuLock, GpuCheckpoint, Freeze, Dump, Capture, Thaw, Commit]
        );
        // CRIU's CUDA plugin needs the threads running during the dump.
        assert_eq!(steps(0, false, Hold::FreezeAfterDump, false), [Dump, FreezeAfterDump, Capture, Thaw, Commit]);
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
