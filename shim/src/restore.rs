//! Restoring a container from a checkpoint, decided at Create and run at Start: which checkpoint
//! a new container asks for (containerd's, or one of the node's store named by an annotation or
//! `RESTORE_FROM`), whether the node's policy allows it, the checkpoint verified and its
//! processes checked against the new container's spec, and the arguments of `runtime restore`.
//!
//! Before the checkpoint's bytes are verified, the restore verdict ([`Judge`],
//! `kybernate_checkpoint::verdict`) compares its manifest with this node and the new container's
//! spec and refuses with every mismatch at once (FailedPrecondition), before anything is created.
//!
//! Every decision is logged (see [`log_restore_decision`]). Nothing here knows a running
//! container: the Task service runs the restore that [`RestorePlan`] describes.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::time::Instant;

use kybernate_checkpoint::journal::{Attempt, Clock, Kind};
use kybernate_checkpoint::verdict::{self, ContainerFacts, NodeFacts, NodeSources};
use kybernate_checkpoint::{self as criu, CheckpointFlags, Manifest, Store};
use kybernate_runtime_select::{CheckpointConfig, SpecView, TrustConfig};
use log::{info, warn};

use crate::error::{CheckpointError, Error};
use crate::gpu;
use crate::pull::{self, Puller};
use crate::spawn::Spawner;
use crate::testhook::{test_stop_point, STOP_RESTORE_VERIFY};

/// Annotation naming a checkpoint in the node's store to restore on create (Kubernetes path).
pub const RESTORE_ANNOTATION: &str = "kybernate.io/restore-from";
/// Process environment variable with the same meaning (parity with the original prototype).
pub const RESTORE_ENV: &str = "RESTORE_FROM";
/// File left in containerd's checkpoint dir when the checkpoint went to `image_path` instead
/// (see `checkpoint::write_pointer`).
pub const POINTER_FILE: &str = "kybernate-pointer.json";
/// The work copy of a checkpoint's images in the bundle, for a restore onto other GPUs (see
/// [`Restoring::prepare`]): removed after the runtime restore, and with the bundle.
pub const WORK_IMAGES_DIR: &str = "kybernate-images";
/// CRI annotations naming the pod's Kubernetes namespace (sandbox first, as CRI sets both).
pub(crate) const POD_NAMESPACE_ANNOTATIONS: [&str; 2] =
    ["io.kubernetes.cri.sandbox-namespace", "io.kubernetes.pod.namespace"];
pub(crate) const POD_NAME_ANNOTATIONS: [&str; 2] = ["io.kubernetes.cri.sandbox-name", "io.kubernetes.pod.name"];
/// CRI's "sandbox" or "container".
const CONTAINER_TYPE_ANNOTATION: &str = "io.kubernetes.cri.container-type";

type Result<T, E = CheckpointError> = std::result::Result<T, E>;

/// A restore the container's Start will run.
#[derive(Debug, Clone)]
pub struct RestorePlan {
    /// The checkpoint directory (ours: with `checkpoint/` and the manifest; or a bare image dir).
    pub dir: PathBuf,
    /// CRIU images: the verified checkpoint's, or after [`Restoring::prepare`] for a restore
    /// onto other GPUs, the work copy in the bundle that CRIU and the credentials check read.
    pub images: PathBuf,
    /// The flags the checkpoint was taken with (restore needs the matching ones).
    pub flags: CheckpointFlags,
    pub manifest: Option<Manifest>,
    /// The restore attempt's times from its decision on, for the journal.
    pub clock: Clock,
    /// The memory pages' verification, running since Create; `None` for a checkpoint without a
    /// manifest (nothing to verify).
    pub pages: Option<std::sync::Arc<criu::deferred::Pending>>,
}

impl RestorePlan {
    /// containerd's checkpoint directory (`ctr c restore --live`, CRI in containerd 2.x): our
    /// layout, verified; or a bare CRIU image dir as containerd's runc shim writes it, which has
    /// no manifest to verify (containerd's content store checked its digests).
    pub fn from_containerd(id: &str, dir: &Path) -> Result<Self> {
        Self::from_containerd_judged(id, dir, None)
    }

    /// [`from_containerd`](Self::from_containerd), with the restore verdict before the bytes
    /// are verified.
    fn from_containerd_judged(id: &str, dir: &Path, judge: Option<&Judge<'_>>) -> Result<Self> {
        if dir.join(criu::MANIFEST_FILE).exists() || dir.join(criu::IMAGES_DIR).exists() {
            // Ours, flat (CRIU's images beside the manifest) or in the store layout.
            return Self::verified(id, dir, judge);
        }
        if let Ok(text) = std::fs::read_to_string(dir.join(POINTER_FILE)) {
            return Err(CheckpointError::Restore {
                id: id.into(),
                message: format!(
                    "{}: this checkpoint image only points to a checkpoint in a node's store ({}); restore that one with the annotation {RESTORE_ANNOTATION}",
                    dir.display(),
                    text.trim()
                ),
            });
        }
        if dir.join("inventory.img").is_file() {
            warn!(
                "restore {id}: {} has no {} (not taken by this shim): not verified",
                dir.display(),
                criu::MANIFEST_FILE
            );
            return Ok(Self {
                dir: dir.into(),
                images: dir.into(),
                flags: Default::default(),
                manifest: None,
                clock: Clock::start(),
                pages: None,
            });
        }
        Err(CheckpointError::Restore {
            id: id.into(),
            message: format!(
                "{}: not a checkpoint (no {} and no CRIU inventory.img)",
                dir.display(),
                criu::MANIFEST_FILE
            ),
        })
    }

    /// A checkpoint named by the restore annotation or `RESTORE_FROM`: confined to the store,
    /// trusted by the node's `[trust]` policy (before any of it is hashed or read), judged
    /// against this node and the new container (`judge`), verified, and owned by the restoring
    /// container's tenant unless the config allows otherwise.
    pub fn from_store(
        id: &str,
        reference: &str,
        config: &CheckpointConfig,
        trust: &TrustConfig,
        tenant: &str,
        judge: Option<&Judge<'_>>,
    ) -> Result<Self> {
        let store = Store::new(&config.root);
        let dir = store.resolve(reference).map_err(|source| CheckpointError::Store {
            what: "restore",
            id: id.to_string(),
            source: Box::new(source),
        })?;
        check_trust(id, &dir, trust)?;
        let plan = Self::verified(id, &dir, judge)?;
        if let Some(m) = &plan.manifest {
            criu::check_namespace(m, tenant, config.allow_cross_namespace_restore)
                .map_err(|source| CheckpointError::Policy { id: id.to_string(), source })?;
        }
        Ok(plan)
    }

    fn verified(id: &str, dir: &Path, judge: Option<&Judge<'_>>) -> Result<Self> {
        test_stop_point(id, STOP_RESTORE_VERIFY);
        let mut clock = Clock::start();
        // The verdict reads only the manifest, before the bytes are hashed: a checkpoint this
        // node cannot take is refused in milliseconds, whatever its size.
        if let Some(judge) = judge {
            clock.phase("verdict", || judge.check(id, dir))?;
        }
        // Everything but the memory pages now (the shim reads or applies it before the restore);
        // the pages are hashed in the background, and the restore is held until they verify
        // (criu_proxy.rs).
        let (manifest, pages) = clock
            .phase("verify", || criu::deferred::verify_for_restore(dir))
            .map_err(|source| CheckpointError::Verify { id: id.to_string(), source })?;
        info!("restore {id}: verifying {} bytes of memory pages in the background", pages.bytes());
        Ok(Self {
            dir: dir.into(),
            images: dir.join(manifest.images_rel()),
            flags: manifest.options.clone(),
            manifest: Some(manifest),
            clock,
            pages: Some(pages.spawn()),
        })
    }

    /// The steps of this restore at Start, in the order they run.
    pub fn steps(&self) -> Vec<RestoreStep> {
        let mut steps = vec![RestoreStep::Restore];
        if self.gpu().is_some() {
            steps.push(RestoreStep::GpuRestore);
        }
        steps
    }

    /// The runtime binary that took the checkpoint, which must restore it; refused when it is gone.
    pub fn runtime_binary(&self, id: &str) -> Result<Option<PathBuf>> {
        let Some(m) = &self.manifest else { return Ok(None) };
        let bin = &m.runtime.path;
        if bin.as_os_str().is_empty() {
            return Ok(None);
        }
        if !bin.is_file() {
            return Err(CheckpointError::Restore {
                id: id.into(),
                message: format!(
                    "checkpoint {} was taken with runtime {}, which does not exist on this node; install it to restore",
                    self.dir.display(),
                    bin.display()
                ),
            });
        }
        Ok(Some(bin.clone()))
    }

    /// The GPU record of the checkpoint (a GPU container's), if any.
    pub fn gpu(&self) -> Option<&kybernate_gpu::GpuRecord> {
        self.manifest.as_ref()?.gpu.as_ref()
    }

    /// `rootfs-diff.tar` of a store checkpoint, to apply before the restore.
    pub fn rootfs_diff(&self) -> Option<PathBuf> {
        self.manifest.as_ref().filter(|m| m.rootfs_diff && !m.flat).map(|_| self.dir.join(criu::ROOTFS_DIFF))
    }

    /// Applies a store checkpoint's `rootfs-diff.tar` onto the freshly mounted `rootfs`.
    pub fn apply_rootfs_diff(&self, id: &str, rootfs: &Path) -> Result<(), Error> {
        let Some(diff) = self.rootfs_diff() else { return Ok(()) };
        criu::apply_rootfs_diff(&diff, rootfs).map_err(|source| {
            CheckpointError::ApplyRootfsDiff {
                id: id.to_string(),
                diff: diff.clone(),
                rootfs: rootfs.to_path_buf(),
                source: Box::new(source),
            }
            .into()
        })
    }

    /// Arguments of `runtime restore`.
    pub fn restore_args(
        &self,
        bundle: &Path,
        work: &Path,
        pid_file: &Path,
        console_socket: Option<&Path>,
        no_pivot: bool,
    ) -> Vec<OsString> {
        criu::RestoreArgs {
            images: self.images.clone(),
            work: work.to_path_buf(),
            bundle: bundle.to_path_buf(),
            pid_file: pid_file.to_path_buf(),
            console_socket: console_socket.map(Path::to_path_buf),
            no_pivot,
            flags: self.flags.clone(),
        }
        .args()
    }
}

/// How the shim learns the node's side of the restore verdict: CRIU is run for its version
/// through the shim's spawner (reaper-safe), the rest read from procfs and sysfs.
pub struct NodeProbe<'a> {
    pub spawner: &'a dyn Spawner,
    /// The runc option `CriuPath`, else `criu` on PATH (as runc finds it).
    pub criu: Option<&'a Path>,
}

impl NodeProbe<'_> {
    /// This node's facts for the verdict.
    pub fn facts(&self) -> NodeFacts {
        let path = std::env::var_os("PATH");
        let criu = criu::find_criu(self.criu, path.as_deref())
            .map_err(|e| e.to_string())
            .and_then(|bin| crate::runtime::tool_output(self.spawner, &bin, "--version").map_err(|e| e.to_string()));
        let libs = std::env::var_os(kybernate_gpu::cuda::preflight::CRIU_LIBS_DIR);
        let sources = NodeSources {
            proc: Path::new(gpu::PROC),
            cgroup_root: Path::new("/sys/fs/cgroup"),
            plugin_dirs: kybernate_gpu::cuda::preflight::plugin_dirs(libs.as_deref()),
            path_env: path.as_deref(),
        };
        NodeFacts::gather(&sources, verdict::criu_version_of(criu))
    }
}

/// The restore verdict at Create: the checkpoint's manifest against this node and the new
/// container's spec (its own GPU request resolved as [`gpu::prepare_restore`] will resolve it).
pub struct Judge<'a> {
    spec: &'a SpecView,
    config: &'a CheckpointConfig,
    node: &'a NodeProbe<'a>,
}

impl Judge<'_> {
    /// Refuses with every hard mismatch; logs the warnings and the time to verdict. A manifest
    /// that cannot be read is left to the verification, which names what is wrong with it.
    fn check(&self, id: &str, dir: &Path) -> Result<()> {
        let started = Instant::now();
        let Ok(manifest) = criu::read_manifest(dir) else { return Ok(()) };
        let node = self.node.facts();
        let spec = serde_json::Value::Object(self.spec.value().clone());
        let cdi: Vec<&Path> = self.config.cdi_spec_dirs.iter().map(PathBuf::as_path).collect();
        let container = ContainerFacts::from_spec(&spec, &cdi, Path::new(gpu::PROC), Path::new(gpu::DEV), &node.gpus);
        let allow = self.config.allow_gpu_mismatch
            || self.spec.annotation(gpu::ALLOW_MISMATCH_ANNOTATION).is_some_and(|v| v.eq_ignore_ascii_case("true"));
        let judged = verdict::judge(&manifest, &node, Some(&container), allow);
        for w in &judged.warnings {
            warn!("restore {id}: {} (restoring anyway)", w);
        }
        let took = started.elapsed();
        info!(
            "restore {id}: verdict in {:.1} ms: {} mismatch(es), {} warning(s)",
            took.as_secs_f64() * 1000.0,
            judged.mismatches.len(),
            judged.warnings.len()
        );
        judged.into_result().map(drop).map_err(|e| CheckpointError::Incompatible {
            id: id.to_string(),
            checkpoint: dir.display().to_string(),
            source: Box::new(e),
        })
    }
}

/// What asks a new container to be restored from the node's store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RestoreTrigger {
    /// The annotation `kybernate.io/restore-from` (a pod annotation the admin let through).
    Annotation(String),
    /// `RESTORE_FROM` in the container's environment (any pod can set it).
    Env(String),
}

impl RestoreTrigger {
    pub fn reference(&self) -> &str {
        match self {
            RestoreTrigger::Annotation(r) | RestoreTrigger::Env(r) => r,
        }
    }

    pub fn source(&self) -> &'static str {
        match self {
            RestoreTrigger::Annotation(_) => "annotation kybernate.io/restore-from",
            RestoreTrigger::Env(_) => "environment variable RESTORE_FROM",
        }
    }

    /// `None` when the node's config allows this kind of trigger, else the config key that
    /// switches it on.
    pub fn disabled_by(&self, config: &CheckpointConfig) -> Option<&'static str> {
        match self {
            RestoreTrigger::Annotation(_) if !config.allow_annotation_restore => {
                Some("[checkpoint] allow_annotation_restore = false")
            }
            RestoreTrigger::Env(_) if !config.allow_env_restore => Some("[checkpoint] allow_env_restore = false"),
            _ => None,
        }
    }
}

/// The node's trust policy for the checkpoint in `dir`: one taken on this node passes; one from
/// outside (it carries this node's origin marker: imported, pulled) must be signed by a key of
/// `[trust] keys` when signatures are required. The keys are read only for such a checkpoint, so
/// a broken key file never stops the restore of a local one. Refusals name the signer's key id.
pub fn check_trust(id: &str, dir: &Path, trust: &TrustConfig) -> Result<criu::TrustVerdict> {
    let refused = |source: criu::TrustError| CheckpointError::Trust { id: id.to_string(), source: Box::new(source) };
    let verdict = criu::trust::check_trust_configured(dir, &trust.keys, trust.require_signature).map_err(refused)?;
    if verdict != criu::TrustVerdict::Local {
        info!("restore {id}: {}: {verdict}", dir.display());
    }
    Ok(verdict)
}

/// The checkpoint a new container asks to be restored from: the annotation, else the last
/// `RESTORE_FROM` in its process environment. Never for a pod's sandbox (pause) container: CRI
/// copies pod annotations into the sandbox's spec too, and the checkpoint is the app container's.
pub fn restore_trigger(spec: &SpecView) -> Option<RestoreTrigger> {
    if spec_annotation(Some(spec), CONTAINER_TYPE_ANNOTATION).as_deref() == Some("sandbox") {
        return None;
    }
    if let Some(v) = spec_annotation(Some(spec), RESTORE_ANNOTATION) {
        return Some(RestoreTrigger::Annotation(v));
    }
    spec.env()
        .into_iter()
        .rev()
        .find_map(|e| e.strip_prefix(RESTORE_ENV)?.strip_prefix('=').filter(|v| !v.is_empty()))
        .map(|v| RestoreTrigger::Env(v.to_string()))
}

/// The pod a container belongs to, as CRI annotates it, for log lines: `namespace/name`, or
/// `-` outside Kubernetes.
pub fn pod_of(spec: &SpecView) -> String {
    let ns = POD_NAMESPACE_ANNOTATIONS.iter().find_map(|k| spec_annotation(Some(spec), k));
    let name = POD_NAME_ANNOTATIONS.iter().find_map(|k| spec_annotation(Some(spec), k));
    match (ns, name) {
        (None, None) => "-".into(),
        (ns, name) => format!("{}/{}", ns.as_deref().unwrap_or("?"), name.as_deref().unwrap_or("?")),
    }
}

/// The id a store checkpoint goes by (`<namespace>/<container>/<checkpoint>`), else its path.
pub fn checkpoint_name(dir: &Path, config: &CheckpointConfig) -> String {
    let root = std::fs::canonicalize(&config.root).unwrap_or_else(|_| config.root.clone());
    dir.strip_prefix(&root).map_or_else(|_| dir.display().to_string(), |rel| rel.display().to_string())
}

/// Every restore decision is logged at info: who asked (container, pod, trigger), which
/// checkpoint, and what became of it.
pub fn log_restore_decision(id: &str, pod: &str, checkpoint: &str, trigger: &str, decision: &str) {
    info!("restore decision: container {id} (pod {pod}), checkpoint {checkpoint} ({trigger}): {decision}");
}

/// The credentials check of a restore: the checkpoint's CRIU images against the new
/// container's spec as runc will run it (`config.json` after the GPU edits). Nothing is read
/// from `spec.dump` or the manifest for this.
pub fn check_grants(
    id: &str,
    checkpoint: &str,
    images: &Path,
    spec: &serde_json::Value,
) -> Result<criu::grants::Summary> {
    criu::grants::check_restore(images, spec, &criu::grants::Host::this_node()).map_err(|source| {
        CheckpointError::Grants { id: id.into(), checkpoint: checkpoint.into(), source: Box::new(source) }
    })
}

/// Who owns a container for the restore policy: its pod's Kubernetes namespace, else the
/// containerd namespace.
pub fn tenant(spec: &SpecView, containerd_namespace: &str) -> String {
    POD_NAMESPACE_ANNOTATIONS
        .iter()
        .find_map(|k| spec_annotation(Some(spec), k))
        .unwrap_or_else(|| containerd_namespace.to_string())
}

pub(crate) fn spec_annotation(spec: Option<&SpecView>, key: &str) -> Option<String> {
    spec?.annotation(key).map(str::to_string)
}

/// One step of a restore at Start (the checks ran at Create: [`Restoring`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RestoreStep {
    /// `runtime restore --detach`: CRIU brings the processes back; the IO is attached.
    Restore,
    /// A GPU checkpoint's CUDA state goes back to the GPUs and the processes are unlocked.
    GpuRestore,
}

/// The rollback guard of a restore at Start: armed once the runtime may hold state of the
/// container, it deletes that state (and kills a half-restored process) when dropped armed.
pub struct RestoreGuard<'a> {
    pub runtime: &'a crate::runtime::OciRuntime,
    pub id: &'a str,
    pub bundle: &'a Path,
    pub armed: bool,
}

impl Drop for RestoreGuard<'_> {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        if let Err(e) = self.runtime.delete(self.id, self.bundle, true) {
            if !e.is_not_found() {
                warn!("restore {}: cleanup after the failed restore: {e}", self.id);
            }
        }
    }
}

/// Removes the work copy of the images ([`WORK_IMAGES_DIR`]) when the restore at Start is over,
/// restored or not: CRIU no longer needs it, and the checkpoint stays in the store.
pub struct WorkImages(pub PathBuf);

impl WorkImages {
    /// The work copy `plan` restores from in `bundle`, if it restores from one.
    pub fn of(plan: &RestorePlan, bundle: &Path) -> Option<Self> {
        let work = bundle.join(WORK_IMAGES_DIR);
        (plan.images == work).then_some(Self(work))
    }
}

impl Drop for WorkImages {
    fn drop(&mut self) {
        if let Err(e) = std::fs::remove_dir_all(&self.0) {
            if e.kind() != std::io::ErrorKind::NotFound {
                warn!("remove {}: {e}", self.0.display());
            }
        }
    }
}

/// A restore decided at Create, carried out at Start.
pub struct Restoring {
    pub plan: RestorePlan,
    who: RestoreLog,
    /// Where a refusal is journaled: the store root and this shim's containerd namespace.
    journal: (PathBuf, String),
}

/// What the rest of a restore's decision gives the new container.
#[derive(Debug, Default)]
pub struct Prepared {
    /// The runtime that took the checkpoint, when the manifest records it.
    pub runtime: Option<PathBuf>,
    /// A GPU checkpoint: the container gets the CRIU config of GPU containers.
    pub gpu: bool,
    /// The GPU edits changed the spec.
    pub spec_changed: bool,
}

impl Restoring {
    /// The restore a new container asks for, verified and allowed by the node's policy (trigger
    /// switches, store confinement, tenant), or `None` for a fresh start. `checkpoint`:
    /// containerd's checkpoint dir of the Create request (may be empty); `namespace`: this
    /// shim's containerd namespace; `puller`: how an `oci://` reference is pulled into the store
    /// first. Refusals and ignored triggers are logged here; the rest of the decision in
    /// [`prepare`](Self::prepare).
    #[allow(clippy::too_many_arguments)]
    pub fn plan(
        id: &str,
        checkpoint: &str,
        spec: &SpecView,
        config: &CheckpointConfig,
        trust: &TrustConfig,
        namespace: &str,
        puller: &Puller<'_>,
        node: &NodeProbe<'_>,
    ) -> Result<Option<Self>, Error> {
        let pod = pod_of(spec);
        let judge = Judge { spec, config, node };
        if !checkpoint.is_empty() {
            let who = RestoreLog {
                id: id.to_string(),
                pod,
                checkpoint: checkpoint.to_string(),
                trigger: "containerd's checkpoint",
            };
            let journal = (config.root.clone(), namespace.to_string());
            // containerd's own checkpoint dir carries no origin marker of ours (taken on a node,
            // or unpacked by containerd from its content store): the policy checks one that does.
            let containerd = check_trust(id, Path::new(checkpoint), trust)
                .and_then(|_| RestorePlan::from_containerd_judged(id, Path::new(checkpoint), Some(&judge)));
            return match containerd {
                Ok(plan) => Ok(Some(Self { plan, who, journal })),
                Err(e) => {
                    let e = e.into();
                    who.log(&format!("refused: {e}"));
                    who.record_refusal(&journal, &e);
                    Err(e)
                }
            };
        }
        let Some(trigger) = restore_trigger(spec) else { return Ok(None) };
        let mut who = RestoreLog {
            id: id.to_string(),
            pod,
            checkpoint: trigger.reference().to_string(),
            trigger: trigger.source(),
        };
        if let Some(key) = trigger.disabled_by(config) {
            who.log(&format!("ignored ({key} on this node): the container starts fresh"));
            warn!("container {id}: {} ignored: {key}; the container starts fresh", trigger.source());
            return Ok(None);
        }
        let tenant = tenant(spec, namespace);
        let journal = (config.root.clone(), namespace.to_string());
        // `oci://REF`: pulled into the store by the node's CLI (its checks: digests, trust,
        // identity; nothing left on failure), under this shim's containerd namespace, then
        // restored from the store exactly as a local reference is, every check again.
        let reference = match pull::oci_reference(trigger.reference()) {
            None => trigger.reference().to_string(),
            Some(oci) => {
                who.log("pulling it into the store");
                match puller.pull(oci, namespace) {
                    Ok(pulled) => {
                        who.log(&format!(
                            "pulled {} into the store as {} ({} bytes downloaded)",
                            pulled.digest, pulled.id, pulled.bytes_downloaded
                        ));
                        pulled.id
                    }
                    Err(e) => {
                        let e: Error = CheckpointError::Restore { id: id.to_string(), message: e.to_string() }.into();
                        who.log(&format!("refused: {e}"));
                        who.record_refusal(&journal, &e);
                        return Err(e);
                    }
                }
            }
        };
        match RestorePlan::from_store(id, &reference, config, trust, &tenant, Some(&judge)) {
            Ok(plan) => {
                who.checkpoint = checkpoint_name(&plan.dir, config);
                Ok(Some(Self { plan, who, journal }))
            }
            Err(e) => {
                let e = e.into();
                who.log(&format!("refused: {e}"));
                who.record_refusal(&journal, &e);
                Err(e)
            }
        }
    }

    /// The rest of the decision, once the checkpoint is verified: the runtime that took it, a
    /// GPU checkpoint's devices from this container's own GPU request (edited into `spec`), then
    /// the credentials check of CRIU's images against `spec` as runc will run it. A restore onto
    /// other GPUs restores from a work copy of the images in `bundle` ([`WORK_IMAGES_DIR`]),
    /// whose `/dev` holds the assigned GPUs' nodes instead of the recorded ones; the check and
    /// CRIU see that copy. The caller logs a refusal ([`refused`](Self::refused)).
    pub fn prepare(
        &mut self,
        id: &str,
        spec: &mut serde_json::Value,
        config: &CheckpointConfig,
        bundle: &Path,
    ) -> Result<Prepared, Error> {
        let mut prepared = Prepared { runtime: self.plan.runtime_binary(id)?, ..Default::default() };
        if let Some(gpu) = self.plan.gpu() {
            let gpu_err =
                |source| CheckpointError::Gpu { what: "restore", id: id.to_string(), source: Box::new(source) };
            let gpus = gpu::prepare_restore(id, spec, gpu, config).map_err(gpu_err)?;
            for change in &gpus.changes {
                info!("container {id}: restore: {change}");
            }
            prepared.gpu = true;
            prepared.spec_changed = !gpus.changes.is_empty();
            if !gpus.swaps.is_empty() {
                let work = bundle.join(WORK_IMAGES_DIR);
                let rewritten = criu::devimage::work_copy(&self.plan.images, &work, &gpus.swaps).map_err(|e| {
                    // Nothing half-built is left in the bundle.
                    let _ = std::fs::remove_dir_all(&work);
                    CheckpointError::Restore { id: id.into(), message: format!("the assigned GPUs' /dev: {e}") }
                })?;
                info!(
                    "container {id}: restore: CRIU restores from {} ({rewritten} /dev image(s) with the assigned GPUs' \
                     nodes: {})",
                    work.display(),
                    gpus.swaps
                        .iter()
                        .map(|s| format!("/dev/nvidia{} -> /dev/nvidia{}", s.recorded, s.assigned))
                        .collect::<Vec<_>>()
                        .join(", ")
                );
                self.plan.images = work;
            }
        }
        let summary = check_grants(id, &self.who.checkpoint, &self.plan.images, spec)?;
        self.who.log(&format!("allowed: its processes need nothing this container's spec does not grant ({summary})"));
        Ok(prepared)
    }

    /// Logs the refusal of this restore.
    pub fn refused(&self, e: &Error) {
        self.who.log(&format!("refused: {e}"));
        self.who.record_refusal(&self.journal, e);
    }
}

/// Who asked for a restore of which checkpoint, for the decision log line.
struct RestoreLog {
    id: String,
    pod: String,
    checkpoint: String,
    trigger: &'static str,
}

impl RestoreLog {
    fn log(&self, decision: &str) {
        log_restore_decision(&self.id, &self.pod, &self.checkpoint, self.trigger, decision);
    }

    /// A restore refused at Create goes into the journal as a failed attempt.
    fn record_refusal(&self, (root, namespace): &(PathBuf, String), e: &Error) {
        let mut a = Attempt::new(Kind::Restore, &Clock::start());
        a.namespace = namespace.clone();
        a.container = self.id.clone();
        a.pod = Some(self.pod.clone()).filter(|p| p != "-");
        a.checkpoint = self.checkpoint.clone();
        a.failed(crate::checkpoint::error_class(e), &e.to_string());
        crate::checkpoint::record(root, &a);
    }
}

/// Journals a restore run at Start: `a` names the container, `clock` holds the phases (verify at
/// Create, the runtime restore and the GPU restore at Start). Its duration is the sum of the
/// phases: the wait between Create and Start is the client's, not the restore's.
pub fn record_restore(mut a: Attempt, plan: &RestorePlan, config: &CheckpointConfig, result: &Result<(), Error>) {
    a.duration_ms = a.phases_ms.values().sum();
    a.checkpoint = checkpoint_name(&plan.dir, config);
    match result {
        Ok(()) => {
            a.bytes = plan.manifest.as_ref().map_or(0, Manifest::total_size);
            a.gpu_bytes = plan.gpu().map_or(0, |g| g.bytes_total);
        }
        Err(e) => a.failed(crate::checkpoint::error_class(e), &e.to_string()),
    }
    crate::checkpoint::record(&config.root, &a);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(json: serde_json::Value) -> SpecView {
        SpecView::from_value(json)
    }

    #[test]
    fn restore_trigger_prefers_the_annotation_then_the_last_env_entry() {
        let s = spec(serde_json::json!({
            "ociVersion": "1.0.2",
            "annotations": {"kybernate.io/restore-from": "default/a/1"},
            "process": {"cwd": "/", "user": {"uid": 0, "gid": 0}, "args": ["sh"], "env": ["RESTORE_FROM=x", "RESTORE_FROM=y"]}
        }));
        assert_eq!(restore_trigger(&s), Some(RestoreTrigger::Annotation("default/a/1".into())));
        let s = spec(serde_json::json!({
            "ociVersion": "1.0.2",
            "process": {"cwd": "/", "user": {"uid": 0, "gid": 0}, "args": ["sh"], "env": ["RESTORE_FROM=x", "RESTORE_FROM_NOT=z", "RESTORE_FROM=y"]}
        }));
        assert_eq!(restore_trigger(&s), Some(RestoreTrigger::Env("y".into())));
        let s = spec(
            serde_json::json!({"ociVersion": "1.0.2", "process": {"cwd": "/", "user": {"uid": 0, "gid": 0}, "args": ["sh"], "env": ["RESTORE_FROM="]}}),
        );
        assert_eq!(restore_trigger(&s), None);
        // A pod's sandbox carries the pod annotation too: never restored.
        let s = spec(serde_json::json!({
            "ociVersion": "1.0.2",
            "annotations": {"kybernate.io/restore-from": "k8s.io/a/1", "io.kubernetes.cri.container-type": "sandbox"}
        }));
        assert_eq!(restore_trigger(&s), None);
    }

    #[test]
    fn tenant_is_the_pod_namespace_else_containerds() {
        let s =
            spec(serde_json::json!({"ociVersion": "1.0.2", "annotations": {"io.kubernetes.pod.namespace": "team-a"}}));
        assert_eq!(tenant(&s, "k8s.io"), "team-a");
        let s = spec(serde_json::json!({"ociVersion": "1.0.2"}));
        assert_eq!(tenant(&s, "default"), "default");
    }
}
