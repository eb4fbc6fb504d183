//! GPU containers through a checkpoint and a restore: which way CUDA state is handled
//! (`[checkpoint] cuda`), the driver-api cycle around the dump, what the manifest records
//! (mode, processes, skipped candidates, GPUs, bytes, phases, device access), and giving a
//! restored container its devices, driver mounts and CUDA state back — onto the GPUs its own
//! request was given (GPU pairs for the driver, checked at Create), refusing NCCL jobs up front.
//!
//! The CUDA driver sits behind `kybernate_gpu::cuda::CudaDriver`. The shim never loads
//! `libcuda.so.1` (the `[checkpoint] libcuda` key) itself: a helper process, this binary run as
//! [`DRIVER_HELPER`], makes the driver calls of one checkpoint or restore and exits (see
//! `kybernate_gpu::cuda::remote` for why).

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::io::{BufReader, Write};
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

pub use kybernate_checkpoint::devimage::NodeSwap;
use kybernate_gpu::cuda::{
    self, preflight::CRIU_LIBS_DIR, Chosen, CudaDriver, CudaProcess, GpuSession, HelperError, PluginReady,
    RemoteDriver, Wanted,
};
use kybernate_gpu::{self as gpu, GpuDevices, GpuMode, GpuRecord, GpuRequest};
use kybernate_runtime_select::{CheckpointConfig, CudaMode};
use log::{info, warn};

use crate::spawn::{MonitorSpawner, Spawner};

/// `argv[1]` that makes this binary the CUDA driver helper instead of a shim.
pub const DRIVER_HELPER: &str = "cuda-driver";
/// How long a helper may take to exit once its input is closed, before it is killed.
const HELPER_EXIT_GRACE: Duration = Duration::from_secs(10);

/// `/proc` of the host (the shim runs in the host's pid namespace).
pub const PROC: &str = "/proc";
/// `/dev` of the host: device nodes of a restored container's GPUs when there are no CDI specs.
pub const DEV: &str = "/dev";
/// Annotation that lets one restore proceed onto different GPUs.
pub const ALLOW_MISMATCH_ANNOTATION: &str = "kybernate.io/allow-gpu-mismatch";
/// Phase name of the CRIU dump in the manifest's `phases_ms`.
pub const PHASE_DUMP: &str = "criu-dump";
/// The annotation runc reads a container's CRIU config file from (at create; CRIU ≥ 3.11).
pub const CRIU_CONFIG_ANNOTATION: &str = "org.criu.config";
/// Our CRIU config file in the bundle: declares the driver mounts that are not in the spec.
pub const CRIU_CONFIG_FILE: &str = "kybernate-criu.conf";

/// Why the GPU side of a checkpoint or restore failed.
#[derive(Debug, thiserror::Error)]
pub enum GpuError {
    #[error("{0}")]
    Mode(#[from] cuda::ModeError),
    #[error("{0}")]
    Step(#[from] cuda::GpuStepError),
    #[error("{0}")]
    Resume(#[from] cuda::session::GpuResumeError),
    #[error("GPU restore: {}", .0.iter().map(ToString::to_string).collect::<Vec<_>>().join("; "))]
    Restore(Vec<cuda::GpuRestoreError>),
    #[error("cannot load the CUDA driver for the restore: {0}")]
    Load(#[from] HelperError),
    #[error("{0}")]
    Driver(#[from] cuda::CudaError),
    #[error("{0}")]
    Mismatch(#[from] gpu::GpuMismatch),
    #[error("{0}")]
    Cdi(#[from] gpu::CdiError),
    /// The container's own GPU request cannot be given on this node, or gives fewer GPUs than
    /// the checkpoint used.
    #[error("{0}")]
    Assignment(#[from] gpu::AssignmentError),
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
}

/// What a checkpoint of a GPU container does about CUDA.
pub struct GpuCheckpoint {
    pub mode: GpuMode,
    /// Device nodes, rules and driver mounts the running container has.
    pub devices: GpuDevices,
    /// The CUDA processes found before the dump.
    pub processes: Vec<CudaProcess>,
    driver: Option<RemoteDriver>,
    pub plugin: Option<PluginReady>,
    lock_timeout_ms: u32,
}

impl GpuCheckpoint {
    /// Decides, before anything is frozen, whether container `id` (bundle `bundle`, `gpu`: the
    /// runtime decision at create chose the GPU runtime) is a GPU container and how its CUDA
    /// state is handled. `None`: a CPU container (no GPU runtime decision, no CUDA process).
    pub fn prepare(
        spawner: &dyn Spawner,
        id: &str,
        bundle: &Path,
        gpu: bool,
        init_pid: u32,
        pids: &[i32],
        cfg: &CheckpointConfig,
    ) -> Result<Option<Self>, GpuError> {
        let processes = cuda::find_cuda_processes(Path::new(PROC), pids);
        if !gpu && processes.is_empty() {
            return Ok(None);
        }
        let pids_text: Vec<String> = processes.iter().map(|p| format!("{} ({})", p.pid, p.evidence)).collect();
        info!("container {id}: GPU container, CUDA processes: [{}]", pids_text.join("; "));
        // The final spec, as the GPU runtime left it: read once for both.
        let spec = read_spec(bundle)?;
        let devices = record_devices(&spec, init_pid);
        declare_external_mounts(id, bundle, &spec, &devices)?;
        let base = |mode| Self {
            mode,
            devices: devices.clone(),
            processes: Vec::new(),
            driver: None,
            plugin: None,
            lock_timeout_ms: 0,
        };
        if processes.is_empty() {
            // Devices only: nothing holds GPU state right now.
            return Ok(Some(base(GpuMode::None)));
        }
        if cfg.cuda != CudaMode::Off {
            let unsupported = cuda::find_unsupported(Path::new(PROC), pids);
            if !unsupported.is_empty() {
                return Err(cuda::ModeError::Unsupported(unsupported).into());
            }
        }
        let wanted = match cfg.cuda {
            CudaMode::Off => {
                warn!(
                    "container {id}: [checkpoint] cuda = \"off\": the CUDA state of {} process(es) is not checkpointed",
                    processes.len()
                );
                return Ok(Some(base(GpuMode::None)));
            }
            CudaMode::Auto => Wanted::Auto,
            CudaMode::CriuPlugin => Wanted::CriuPlugin,
            CudaMode::DriverApi => Wanted::DriverApi,
        };
        let path_env = std::env::var_os("PATH");
        let libs_dir = std::env::var_os(CRIU_LIBS_DIR);
        let plugin = || {
            cuda::check_criu_plugin(
                &cuda::preflight::plugin_dirs(libs_dir.as_deref()),
                path_env.as_deref(),
                &Path::new(PROC).join("driver/nvidia/version"),
            )
        };
        let chosen = cuda::choose(wanted, plugin, || start_driver(spawner, cfg.libcuda.as_ref()))?;
        let mut me = base(GpuMode::None);
        me.processes = processes;
        me.lock_timeout_ms = cfg.cuda_lock_timeout_ms;
        match chosen {
            Chosen::CriuPlugin(ready) => {
                info!(
                    "container {id}: CUDA state through CRIU's plugin {} ({}, driver {})",
                    ready.plugin.display(),
                    ready.cuda_checkpoint.display(),
                    ready.driver_version
                );
                me.mode = GpuMode::CriuPlugin;
                me.plugin = Some(ready);
            }
            Chosen::DriverApi(driver) => {
                info!("container {id}: CUDA state through the driver API ({})", cfg.libcuda);
                me.mode = GpuMode::DriverApi;
                me.driver = Some(driver);
            }
        }
        Ok(Some(me))
    }

    /// The driver-api session over the CUDA processes (`None` in the other modes).
    pub fn session(&self) -> Option<GpuSession<'_>> {
        let driver = self.driver.as_ref()?;
        Some(GpuSession::new(driver as &dyn CudaDriver, Path::new(PROC), self.processes.clone()))
    }

    pub fn lock_timeout_ms(&self) -> u32 {
        self.lock_timeout_ms
    }

    /// CRIU's plugin needs the process's threads running to lock them: no freezing before the dump.
    pub fn freeze_before_dump(&self) -> bool {
        self.mode != GpuMode::CriuPlugin
    }

    /// The manifest's `gpu` section.
    pub fn record(&self, session: Option<&GpuSession<'_>>, dump_ms: u64) -> GpuRecord {
        let node = gpu::node_gpus(Path::new(PROC));
        let processes = match session {
            Some(s) => s.records(),
            None => self
                .processes
                .iter()
                .map(|p| gpu::CudaProcessRecord {
                    pid: p.pid,
                    ns_pid: p.ns_pid,
                    evidence: p.evidence.clone(),
                    state_before: None,
                    state_checkpointed: None,
                    bytes: 0,
                    gpu_minors: p.gpu_minors.clone(),
                })
                .collect(),
        };
        let mut phases: BTreeMap<String, u64> = session.map(|s| s.phases().clone()).unwrap_or_default();
        phases.insert(PHASE_DUMP.into(), dump_ms);
        let bytes_per_gpu = bytes_per_gpu(&processes, &node.gpus);
        let cuda_driver_version = self
            .driver
            .as_ref()
            .and_then(|d| d.driver_version().ok())
            .map(|v| format!("{}.{}", v / 1000, (v % 1000) / 10));
        GpuRecord {
            mode: self.mode,
            bytes_total: processes.iter().map(|p| p.bytes).sum(),
            processes,
            skipped: session.map(|s| s.skipped().to_vec()).unwrap_or_default(),
            gpus: node.gpus,
            driver_version: node.driver_version.or_else(|| self.plugin.as_ref().map(|p| p.driver_version.clone())),
            cuda_driver_version,
            bytes_per_gpu,
            phases_ms: phases,
            devices: self.devices.clone(),
        }
    }
}

/// Attributes each process's bytes to the GPUs it holds open (split evenly), by UUID.
fn bytes_per_gpu(processes: &[gpu::CudaProcessRecord], gpus: &[gpu::GpuInfo]) -> BTreeMap<String, u64> {
    let mut out = BTreeMap::new();
    for p in processes.iter().filter(|p| p.bytes > 0) {
        let uuids: Vec<String> = p
            .gpu_minors
            .iter()
            .map(|m| {
                gpus.iter()
                    .find(|g| g.minor == Some(*m))
                    .map(|g| g.uuid.clone())
                    .unwrap_or_else(|| format!("minor-{m}"))
            })
            .collect();
        if uuids.is_empty() {
            *out.entry("unknown".to_string()).or_default() += p.bytes;
            continue;
        }
        let share = p.bytes / uuids.len() as u64;
        for u in uuids {
            *out.entry(u).or_default() += share;
        }
    }
    out
}

/// What the running container has of NVIDIA devices, rules and driver mounts: its final `spec`
/// (as the GPU runtime left it) and, for what a hook mounted, its init's mountinfo and /dev.
fn record_devices(spec: &serde_json::Value, init_pid: u32) -> GpuDevices {
    let proc_dir = Path::new(PROC).join(init_pid.to_string());
    let read = |p: PathBuf| std::fs::read_to_string(&p).unwrap_or_default();
    gpu::record(
        spec,
        &proc_dir.join("root"),
        &read(proc_dir.join("mountinfo")),
        &read(Path::new(PROC).join("self/mountinfo")),
    )
}

/// At create of a GPU container: points runc's `org.criu.config` at our file in the bundle (an
/// empty one for now), unless the spec names its own. runc reads the annotation only at create,
/// and a checkpoint may later have to declare driver mounts that a hook (the GPU runtime's
/// legacy mode) made outside the spec: CRIU refuses to dump mounts it cannot place. Edits
/// `spec` (the bundle's config.json, which the caller writes); returns whether it changed it.
pub fn attach_criu_config(id: &str, bundle: &Path, spec: &mut serde_json::Value) -> Result<bool, GpuError> {
    if let Some(own) = annotation(spec, CRIU_CONFIG_ANNOTATION) {
        info!(
            "container {id}: keeps its own CRIU config {own}; driver mounts outside its spec are not declared to CRIU"
        );
        return Ok(false);
    }
    let file = bundle.join(CRIU_CONFIG_FILE);
    write_file(&file, b"# Written by containerd-shim-kybernate-v1 at checkpoint time.\n")?;
    let Some(obj) = spec.as_object_mut() else { return Ok(false) };
    let annotations = obj.entry("annotations").or_insert_with(|| serde_json::Value::Object(Default::default()));
    let Some(a) = annotations.as_object_mut() else { return Ok(false) };
    a.insert(CRIU_CONFIG_ANNOTATION.into(), serde_json::Value::String(file.display().to_string()));
    Ok(true)
}

/// Before a dump: driver mounts the container has but its spec lacks (runc declares only spec
/// bind mounts to CRIU) go into our CRIU config as external mounts, keyed by their destination
/// as runc keys its own, so that a restore with them in the spec maps them back.
fn declare_external_mounts(
    id: &str,
    bundle: &Path,
    spec: &serde_json::Value,
    devices: &GpuDevices,
) -> Result<(), GpuError> {
    let in_spec: Vec<&str> = spec
        .get("mounts")
        .and_then(|m| m.as_array())
        .map(|a| a.iter().filter_map(|m| m.get("destination")?.as_str()).collect())
        .unwrap_or_default();
    let outside: Vec<&str> =
        devices.mounts.iter().map(|m| m.destination.as_str()).filter(|d| !in_spec.contains(d)).collect();
    let Some(ours) = own_criu_config(bundle, spec) else {
        if !outside.is_empty() {
            warn!("container {id}: driver mounts outside the spec ({}) cannot be declared to CRIU: the container has its own CRIU config", outside.join(", "));
        }
        return Ok(());
    };
    let mut text = String::from("# Written by containerd-shim-kybernate-v1: driver mounts made outside the spec.\n");
    for dest in &outside {
        text.push_str(&format!("external mnt[{dest}]:{dest}\n"));
    }
    if !outside.is_empty() {
        info!("container {id}: driver mounts declared to CRIU as external: {}", outside.join(", "));
    }
    write_file(&ours, text.as_bytes())
}

/// Our CRIU config file in `bundle` when the spec's `org.criu.config` names it ([`attach_criu_config`]);
/// `None` when the container brings its own (or none is attached).
pub fn own_criu_config(bundle: &Path, spec: &serde_json::Value) -> Option<PathBuf> {
    let ours = bundle.join(CRIU_CONFIG_FILE);
    (annotation(spec, CRIU_CONFIG_ANNOTATION).as_deref() == Some(ours.to_string_lossy().as_ref())).then_some(ours)
}

fn annotation(spec: &serde_json::Value, key: &str) -> Option<String> {
    spec.get("annotations")?.get(key)?.as_str().filter(|v| !v.is_empty()).map(str::to_string)
}

fn read_spec(bundle: &Path) -> Result<serde_json::Value, GpuError> {
    let config = bundle.join("config.json");
    let bytes = std::fs::read(&config)
        .map_err(|source| GpuError::Io { context: format!("read {}", config.display()), source })?;
    serde_json::from_slice(&bytes)
        .map_err(|e| GpuError::Io { context: format!("parse {}", config.display()), source: e.into() })
}

fn write_file(path: &Path, bytes: &[u8]) -> Result<(), GpuError> {
    std::fs::write(path, bytes).map_err(|source| GpuError::Io { context: format!("write {}", path.display()), source })
}

/// An empty directory given to CRIU as its plugin dir in the driver-api mode, so that a CUDA
/// plugin installed on the node does not also act on processes we already checkpointed.
pub fn empty_plugin_dir(bundle: &Path) -> Result<PathBuf, GpuError> {
    let dir = bundle.join("criu-no-plugins");
    std::fs::create_dir_all(&dir)
        .map_err(|source| GpuError::Io { context: format!("create {}", dir.display()), source })?;
    Ok(dir)
}

/// Where a restore looks up a container's own GPU assignment on this node (seams for tests).
#[derive(Debug, Clone)]
struct NodeRoots {
    /// `[checkpoint] cdi_spec_dirs`, lowest priority first.
    cdi_dirs: Vec<PathBuf>,
    /// The host's `/proc` (the driver's GPU list).
    proc: PathBuf,
    /// The host's `/dev` (GPU and control device nodes).
    dev: PathBuf,
}

impl NodeRoots {
    fn of(cfg: &CheckpointConfig) -> Self {
        Self { cdi_dirs: cfg.cdi_spec_dirs.clone(), proc: PathBuf::from(PROC), dev: PathBuf::from(DEV) }
    }
}

/// At Create from a GPU checkpoint: refuses different GPUs (unless allowed), gives the container
/// the devices, cgroup rules and driver mounts of its own GPU request (see `own_devices`) in
/// its config.json, and refuses it when that is fewer GPUs than the checkpoint used. The
/// checkpoint's record of devices and mounts is never injected (a checkpoint is untrusted: see
/// `kybernate_gpu::assign`). Edits `spec` (the bundle's config.json, which the caller writes
/// unless this refuses); returns one line per change.
pub fn prepare_restore(
    id: &str,
    spec: &mut serde_json::Value,
    record: &GpuRecord,
    cfg: &CheckpointConfig,
) -> Result<RestoreGpus, GpuError> {
    // Only a restore that moves CUDA state onto other GPUs asks the driver (in a helper).
    let driver_version = || Ok(start_driver(&MonitorSpawner, cfg.libcuda.as_ref())?.driver_version()?);
    prepare_restore_in(id, spec, record, cfg.allow_gpu_mismatch, &NodeRoots::of(cfg), &driver_version)
}

/// What [`prepare_restore`] decided for a restore's GPUs.
#[derive(Debug, Default)]
pub struct RestoreGpus {
    /// One line per change of the spec.
    pub changes: Vec<String>,
    /// The recorded GPU nodes the restored `/dev` must hold as the assigned ones instead
    /// (empty when the container was given the checkpoint's GPUs).
    pub swaps: Vec<NodeSwap>,
}

/// [`prepare_restore`] on the node seen under `roots`.
fn prepare_restore_in(
    id: &str,
    spec: &mut serde_json::Value,
    record: &GpuRecord,
    allow_gpu_mismatch: bool,
    roots: &NodeRoots,
    driver_version: &dyn Fn() -> Result<i32, GpuError>,
) -> Result<RestoreGpus, GpuError> {
    let allowed = allow_gpu_mismatch
        || spec
            .pointer(&format!("/annotations/{}", ALLOW_MISMATCH_ANNOTATION.replace('/', "~1")))
            .and_then(|v| v.as_str())
            .is_some_and(|v| v.eq_ignore_ascii_case("true"));
    let node = gpu::node_gpus(&roots.proc);
    if let Err(e) = gpu::check_compatible(&record.gpus, &node.gpus) {
        if !allowed {
            return Err(e.into());
        }
        warn!("restore {id}: {e} (allowed)");
    }
    let request = gpu::gpu_request(spec);
    let devices = own_devices(id, &request, roots)?;
    let changes = gpu::inject(spec, &devices);
    gpu::check_gpu_count(record, spec, &request)?;
    let assigned = gpu::gpus_by_minor(&gpu::devices::spec_devices(spec), &node.gpus);
    let pairs = remap_pairs(id, record, &assigned, &node.gpus, allowed)?;
    if !pairs.is_empty() {
        let version = driver_version()?;
        if version < cuda::REMAP_MIN_DRIVER {
            let list: Vec<String> = pairs.iter().map(ToString::to_string).collect();
            return Err(gpu::AssignmentError::RemapDriver {
                message: format!(
                    "this container was given other GPUs than the checkpoint used ({}): moving CUDA state onto them \
                     needs driver r580 (CUDA 13.0) or newer, and this node's driver is CUDA {}.{}; give the container \
                     the checkpoint's GPUs, or upgrade the driver",
                    list.join(", "),
                    version / 1000,
                    (version % 1000) / 10
                ),
            }
            .into());
        }
        info!(
            "restore {id}: CUDA state will move onto the assigned GPUs: {}",
            pairs.iter().map(ToString::to_string).collect::<Vec<_>>().join(", ")
        );
    }
    log_recorded_mounts(id, record, spec);
    let swaps = node_swaps(id, &pairs, &record.gpus, &node.gpus);
    Ok(RestoreGpus { changes, swaps })
}

/// The device node swaps of `pairs`: each recorded GPU's minor (from the checkpoint's record)
/// and its assigned GPU's (from this node's inventory). Same minors need no swap.
fn node_swaps(id: &str, pairs: &[cuda::GpuPair], recorded: &[gpu::GpuInfo], node: &[gpu::GpuInfo]) -> Vec<NodeSwap> {
    let minor = |gpus: &[gpu::GpuInfo], uuid: &str| gpus.iter().find(|g| g.uuid == uuid).and_then(|g| g.minor);
    pairs
        .iter()
        .filter_map(|p| match (minor(recorded, &p.old), minor(node, &p.new)) {
            (Some(recorded), Some(assigned)) => Some(NodeSwap { recorded, assigned }),
            _ => {
                warn!("restore {id}: {p}: no device minor known for one side; its /dev node is not replaced");
                None
            }
        })
        .filter(|s| s.recorded != s.assigned)
        .collect()
}

/// The GPU pairs a driver-api checkpoint's CUDA state needs to reach `assigned` (the restored
/// container's GPUs in the node's inventory `node`), see `kybernate_gpu::gpu_pairs`. None where
/// this node has no inventory to name its GPUs by, and for a CRIU-plugin checkpoint, which is
/// refused when it would need pairs; under an allowed mismatch a refusal is a warning and nothing
/// is remapped.
fn remap_pairs(
    id: &str,
    record: &GpuRecord,
    assigned: &[gpu::GpuInfo],
    node: &[gpu::GpuInfo],
    allowed: bool,
) -> Result<Vec<cuda::GpuPair>, GpuError> {
    let plugin = record.mode == GpuMode::CriuPlugin;
    if !plugin && (record.mode != GpuMode::DriverApi || record.processes.is_empty()) {
        return Ok(Vec::new());
    }
    if node.is_empty() {
        info!("restore {id}: this node's driver lists no GPUs (/proc/driver/nvidia/gpus): CUDA state restores onto the GPUs it was taken on");
        return Ok(Vec::new());
    }
    match gpu::gpu_pairs(record, assigned) {
        // CRIU's plugin restores through `cuda-checkpoint` without a device map (none can be passed
        // to it yet): the state would go back to the recorded GPUs, which this container lacks.
        Ok(pairs) if plugin && !pairs.is_empty() && !allowed => {
            let list: Vec<String> = pairs.iter().map(ToString::to_string).collect();
            Err(gpu::AssignmentError::RemapDriver {
                message: format!(
                    "this container was given other GPUs than the checkpoint used ({}): the checkpoint was taken \
                     through CRIU's CUDA plugin, which cannot hand cuda-checkpoint a device map yet; give the \
                     container the checkpoint's GPUs, or take checkpoints with [checkpoint] cuda = \"driver-api\"",
                    list.join(", ")
                ),
            }
            .into())
        }
        Ok(pairs) if plugin => {
            if !pairs.is_empty() {
                warn!("restore {id}: other GPUs than the checkpoint's, through CRIU's plugin (allowed: no remapping)");
            }
            Ok(Vec::new())
        }
        Ok(pairs) => Ok(pairs),
        Err(e) if allowed => {
            warn!("restore {id}: {e} (allowed: restored without remapping)");
            Ok(Vec::new())
        }
        Err(e) => Err(e.into()),
    }
}

/// The GPUs a running (restored) container has: the NVIDIA GPU nodes of its `/dev`, as runc made
/// them from its spec, in the node's inventory under `proc_root`.
fn container_gpus(proc_root: &Path, pid: i32) -> Vec<gpu::GpuInfo> {
    let dev = proc_root.join(pid.to_string()).join("root/dev");
    let nodes: Vec<gpu::DeviceNode> = std::fs::read_dir(&dev)
        .map(|d| {
            d.flatten()
                .filter(|e| e.file_name().to_string_lossy().starts_with("nvidia"))
                .filter_map(|e| {
                    // Not followed: a link inside the container is the container's.
                    let md = std::fs::symlink_metadata(e.path()).ok()?;
                    gpu::devices::device_node_from_metadata(&format!("/dev/{}", e.file_name().to_string_lossy()), &md)
                })
                .collect()
        })
        .unwrap_or_default();
    gpu::gpus_by_minor(&nodes, &gpu::node_gpus(proc_root).gpus)
}

/// The container's own GPU request resolved on this node (`kybernate_gpu::own_devices`),
/// logged with how it was resolved.
fn own_devices(id: &str, request: &GpuRequest, roots: &NodeRoots) -> Result<GpuDevices, GpuError> {
    let dirs: Vec<&Path> = roots.cdi_dirs.iter().map(PathBuf::as_path).collect();
    let (devices, how) = gpu::own_devices(request, &dirs, &roots.proc, &roots.dev).map_err(|e| match e {
        gpu::OwnDevicesError::Cdi(e) => GpuError::Cdi(e),
        gpu::OwnDevicesError::Assignment(e) => GpuError::Assignment(e),
    })?;
    match (how, request) {
        (gpu::Resolution::Cdi, GpuRequest::Cdi(names)) => {
            info!("restore {id}: its CDI devices [{}] resolved through {dirs:?}", names.join(", "));
        }
        (gpu::Resolution::VisibleDevicesAsCdi(names), GpuRequest::VisibleDevices { value, .. }) => info!(
            "restore {id}: NVIDIA_VISIBLE_DEVICES={value} as CDI devices [{}], resolved through {dirs:?}",
            names.join(", ")
        ),
        (gpu::Resolution::NodeDevices, GpuRequest::VisibleDevices { value, .. }) => info!(
            "restore {id}: NVIDIA_VISIBLE_DEVICES={value}: no CDI spec for {} in {dirs:?}, so this node's device \
             nodes [{}] and no driver mounts (without CDI there is no trusted list of them)",
            gpu::NVIDIA_GPU_KIND,
            devices.devices.iter().map(|d| d.path.as_str()).collect::<Vec<_>>().join(", ")
        ),
        _ => {}
    }
    Ok(devices)
}

/// Which recorded driver mounts the container's own mounts cover. Those they do not are not
/// given; the restore's credentials check then names any the checkpoint's processes need.
fn log_recorded_mounts(id: &str, record: &GpuRecord, spec: &serde_json::Value) {
    let own = gpu::devices::spec_mount_destinations(spec);
    let (covered, missing): (Vec<&str>, Vec<&str>) = record
        .devices
        .mounts
        .iter()
        .map(|m| m.destination.as_str())
        .partition(|d| own.contains(&gpu::devices::normalize_dest(d)));
    if !covered.is_empty() {
        info!("restore {id}: recorded driver mounts its own mounts cover: {}", covered.join(", "));
    }
    if !missing.is_empty() {
        info!(
            "restore {id}: recorded driver mounts not given (its own GPU request does not mount them): {}",
            missing.join(", ")
        );
    }
}

/// Starts the driver helper for `libcuda` (this binary again, through `/proc/self/exe`, so it is
/// the same build even after the file was replaced by an upgrade). Dropping the driver ends it.
pub fn start_driver(spawner: &dyn Spawner, libcuda: &OsStr) -> Result<RemoteDriver, HelperError> {
    let mut cmd = Command::new("/proc/self/exe");
    cmd.arg(DRIVER_HELPER).arg(libcuda).stderr(Stdio::null());
    let child = spawner.start_piped(cmd).map_err(HelperError::Start)?;
    let (pid, wait) = (child.pid, child.wait);
    let finish = Box::new(move || match wait(HELPER_EXIT_GRACE) {
        0 => {}
        code => warn!("CUDA driver helper (pid {pid}) exited with {code}"),
    });
    RemoteDriver::connect(Box::new(child.stdin), Box::new(child.stdout), finish)
}

/// The helper's `main`: serves driver calls for the library named in `args` on stdin/stdout.
/// Returns the exit code.
pub fn serve_driver(args: &[std::ffi::OsString]) -> i32 {
    let [library] = args else {
        eprintln!("usage: containerd-shim-kybernate-v1 {DRIVER_HELPER} LIBCUDA");
        return 2;
    };
    // The answers get stdout to themselves: whatever the driver library prints goes to stderr.
    let answers = match std::io::stdout().as_fd().try_clone_to_owned() {
        Ok(fd) => fd,
        Err(e) => {
            eprintln!("{DRIVER_HELPER}: {e}");
            return 1;
        }
    };
    // SAFETY: dup2 of two fds this process owns; stdout is not used through std from here on.
    if unsafe { libc::dup2(libc::STDERR_FILENO, libc::STDOUT_FILENO) } < 0 {
        eprintln!("{DRIVER_HELPER}: {}", std::io::Error::last_os_error());
        return 1;
    }
    let mut out = std::fs::File::from(answers);
    let served = kybernate_gpu::cuda::remote::serve_library(library, BufReader::new(std::io::stdin()), &mut out);
    let _ = out.flush();
    match served {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("{DRIVER_HELPER}: {e}");
            1
        }
    }
}

/// After the runtime restored a driver-api checkpoint: restore + unlock each recorded CUDA
/// process at its restored pid. Returns the phase timings.
pub fn restore_cuda(
    spawner: &dyn Spawner,
    id: &str,
    record: &GpuRecord,
    pids: &[i32],
    cfg: &CheckpointConfig,
) -> Result<BTreeMap<String, u64>, GpuError> {
    let mut phases = BTreeMap::new();
    if record.mode != GpuMode::DriverApi || record.processes.is_empty() {
        return Ok(phases);
    }
    // The GPUs it was given (checked against the record at Create): where they differ from
    // the checkpoint's, the driver moves the state onto them.
    let proc_root = Path::new(PROC);
    let node = gpu::node_gpus(proc_root).gpus;
    let assigned = pids.first().map(|&pid| container_gpus(proc_root, pid)).unwrap_or_default();
    // Refusals were made at Create (or allowed there): here a mismatch only means no remapping.
    let pairs = remap_pairs(id, record, &assigned, &node, true)?;
    let driver = start_driver(spawner, cfg.libcuda.as_ref())?;
    let restored =
        cuda::restore_processes(&driver, proc_root, &record.processes, pids, &pairs, &record.gpus, &mut phases)
            .map_err(GpuError::Restore)?;
    info!("restore {id}: CUDA state of pids {restored:?} restored and unlocked ({phases:?} ms)");
    Ok(phases)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use std::fs;

    /// A node under a temp dir: `proc` with one GPU (minor 0), `dev` with its node and
    /// /dev/nvidiactl (real char devices: `None` where mknod is not permitted, and the caller
    /// skips), `cdi` empty, and a bundle holding `spec` as config.json.
    struct Node {
        dir: tempfile::TempDir,
        roots: NodeRoots,
        bundle: PathBuf,
    }

    impl Node {
        fn new(spec: &serde_json::Value) -> Option<Self> {
            let dir = tempfile::tempdir().unwrap();
            let roots = NodeRoots {
                cdi_dirs: vec![dir.path().join("cdi")],
                proc: dir.path().join("proc"),
                dev: dir.path().join("dev"),
            };
            let gpu = roots.proc.join("driver/nvidia/gpus/0000:18:00.0");
            fs::create_dir_all(&gpu).unwrap();
            fs::write(
                gpu.join("information"),
                "Model: \t NVIDIA H100\nGPU UUID: \t GPU-aaaa\nBus Location: \t 0000:18:00.0\nDevice Minor: \t 0\n",
            )
            .unwrap();
            fs::create_dir_all(&roots.dev).unwrap();
            fs::create_dir_all(&roots.cdi_dirs[0]).unwrap();
            let node = |name: &str, minor| {
                nix::sys::stat::mknod(
                    &roots.dev.join(name),
                    nix::sys::stat::SFlag::S_IFCHR,
                    nix::sys::stat::Mode::from_bits_truncate(0o666),
                    nix::sys::stat::makedev(195, minor),
                )
            };
            if let Err(e) = node("nvidia0", 0).and_then(|_| node("nvidiactl", 255)) {
                eprintln!("skipped: mknod not permitted here: {e}");
                return None;
            }
            let bundle = dir.path().join("bundle");
            fs::create_dir_all(&bundle).unwrap();
            fs::write(bundle.join("config.json"), serde_json::to_vec(spec).unwrap()).unwrap();
            Some(Node { dir, roots, bundle })
        }

        /// A second GPU on the node: its driver information and its device node.
        fn add_gpu(&self, bus: &str, uuid: &str, model: &str, minor: u32) {
            let gpu = self.roots.proc.join("driver/nvidia/gpus").join(bus);
            fs::create_dir_all(&gpu).unwrap();
            fs::write(
                gpu.join("information"),
                format!("Model: \t {model}\nGPU UUID: \t {uuid}\nBus Location: \t {bus}\nDevice Minor: \t {minor}\n"),
            )
            .unwrap();
            nix::sys::stat::mknod(
                &self.roots.dev.join(format!("nvidia{minor}")),
                nix::sys::stat::SFlag::S_IFCHR,
                nix::sys::stat::Mode::from_bits_truncate(0o666),
                nix::sys::stat::makedev(195, minor.into()),
            )
            .unwrap();
        }

        /// A restore's GPU edits as the container factory makes them: config.json read, edited,
        /// and written back only when the edit succeeded and changed it.
        fn restore(&self, record: &GpuRecord) -> Result<Vec<String>, GpuError> {
            let mut spec = self.spec();
            let changes = prepare_restore_in("c1", &mut spec, record, false, &self.roots, &|| Ok(12080))?.changes;
            if !changes.is_empty() {
                fs::write(self.bundle.join("config.json"), serde_json::to_vec(&spec).unwrap()).unwrap();
            }
            Ok(changes)
        }

        fn spec(&self) -> serde_json::Value {
            serde_json::from_slice(&fs::read(self.bundle.join("config.json")).unwrap()).unwrap()
        }

        /// A CDI spec for nvidia.com/gpu device "0" with a driver mount from `lib`.
        fn write_cdi(&self) -> PathBuf {
            let lib = self.dir.path().join("libnvidia-ml.so.1");
            fs::write(&lib, "lib").unwrap();
            let cdi = json!({
                "cdiVersion": "0.5.0", "kind": "nvidia.com/gpu",
                "devices": [{"name": "0", "containerEdits": {"deviceNodes": [{"path": "/dev/nvidia0", "hostPath": self.roots.dev.join("nvidia0")}]}}],
                "containerEdits": {"mounts": [{"hostPath": lib, "containerPath": "/usr/lib/libnvidia-ml.so.1", "options": ["ro", "nosuid", "nodev", "bind"]}]}
            });
            fs::write(self.roots.cdi_dirs[0].join("nvidia.json"), cdi.to_string()).unwrap();
            lib
        }
    }

    /// A GPU checkpoint's record: one GPU, plus what an edited manifest could claim (a disk, a
    /// host directory mounted over a driver path).
    fn record(gpus: &[u32]) -> GpuRecord {
        let mut devices: Vec<gpu::DeviceNode> = gpus
            .iter()
            .map(|&m| gpu::DeviceNode {
                path: format!("/dev/nvidia{m}"),
                kind: "c".into(),
                major: 195,
                minor: i64::from(m),
                file_mode: None,
                uid: None,
                gid: None,
            })
            .collect();
        devices.push(gpu::DeviceNode {
            path: "/dev/sda".into(),
            kind: "b".into(),
            major: 8,
            minor: 0,
            file_mode: None,
            uid: None,
            gid: None,
        });
        GpuRecord {
            mode: GpuMode::None,
            processes: vec![],
            skipped: vec![],
            // The node's: the model check passes.
            gpus: vec![gpu::GpuInfo { model: "NVIDIA H100".into(), ..Default::default() }],
            driver_version: None,
            cuda_driver_version: None,
            bytes_per_gpu: BTreeMap::new(),
            bytes_total: 0,
            phases_ms: BTreeMap::new(),
            devices: GpuDevices {
                devices,
                rules: vec![gpu::DeviceRule {
                    allow: true,
                    kind: Some("b".into()),
                    major: Some(8),
                    minor: Some(0),
                    access: Some("rwm".into()),
                }],
                mounts: vec![gpu::MountRecord {
                    destination: "/usr/lib/libnvidia-ml.so.1".into(),
                    source: "/etc".into(),
                    kind: "bind".into(),
                    options: vec!["rbind".into()],
                }],
                cdi_devices: vec!["nvidia.com/gpu=0".into()],
            },
        }
    }

    fn paths(spec: &serde_json::Value, ptr: &str, key: &str) -> Vec<String> {
        spec.pointer(ptr)
            .and_then(|v| v.as_array())
            .map(|a| a.iter().filter_map(|d| d.get(key)?.as_str().map(str::to_string)).collect())
            .unwrap_or_default()
    }

    #[test]
    fn a_container_without_a_gpu_request_gets_nothing_and_is_refused() {
        let spec = json!({"process": {"env": ["PATH=/bin"]}, "linux": {}});
        let Some(node) = Node::new(&spec) else { return };
        node.write_cdi();
        let err = node.restore(&record(&[0])).unwrap_err();
        assert!(matches!(err, GpuError::Assignment(gpu::AssignmentError::FewerGpus { .. })), "{err:?}");
        assert!(
            err.to_string().starts_with(
                "the checkpoint used 1 GPU (/dev/nvidia0); this container has none (its spec requests no GPU: no \
                 NVIDIA device, no cdi.k8s.io annotation, no NVIDIA_VISIBLE_DEVICES)"
            ),
            "{err}"
        );
        assert_eq!(node.spec(), spec, "nothing written");
        // A checkpoint that used no GPU (devices only, none a GPU) restores into it unchanged.
        assert_eq!(node.restore(&record(&[])).unwrap(), Vec::<String>::new());
        assert_eq!(node.spec(), spec);
    }

    #[test]
    fn cdi_annotations_give_the_cdi_spec_never_the_record() {
        let spec = json!({"annotations": {"cdi.k8s.io/gpu": "nvidia.com/gpu=0"}, "mounts": []});
        let Some(node) = Node::new(&spec) else { return };
        let lib = node.write_cdi();
        node.restore(&record(&[0])).unwrap();
        let got = node.spec();
        assert_eq!(paths(&got, "/linux/devices", "path"), ["/dev/nvidia0"]);
        assert_eq!(
            got["linux"]["resources"]["devices"],
            json!([{"allow": true, "type": "c", "major": 195, "minor": 0, "access": "rwm"}])
        );
        assert_eq!(paths(&got, "/mounts", "source"), [lib.to_str().unwrap()], "not the record's /etc");

        // The checkpoint used two GPUs; the container asks for one.
        let Some(node) = Node::new(&spec) else { return };
        node.write_cdi();
        let err = node.restore(&record(&[0, 1])).unwrap_err();
        assert!(
            err.to_string().starts_with(
                "the checkpoint used 2 GPUs (/dev/nvidia0, /dev/nvidia1); this container has 1 (/dev/nvidia0)"
            ),
            "{err}"
        );
        assert_eq!(node.spec(), spec, "nothing written");

        // A CDI device the node's specs lack.
        let spec = json!({"annotations": {"cdi.k8s.io/gpu": "nvidia.com/gpu=3"}});
        let Some(node) = Node::new(&spec) else { return };
        node.write_cdi();
        assert!(matches!(node.restore(&record(&[0])), Err(GpuError::Cdi(_))));
    }

    /// The spec edits (CRIU config annotation, device re-injection) keep every part they do not
    /// understand: fields and values of later runtime-spec releases, and wrong shapes, are runc's.
    #[test]
    fn spec_edits_keep_what_they_do_not_understand() {
        let future = json!({
            "ociVersion": "1.3.0",
            "futureTop": {"x": [1, {"y": null}]},
            "process": {"args": ["true"], "capabilities": {"bounding": ["CAP_FUTURE_42"]}, "ioPriority": {"class": "IOPRIO_CLASS_FUTURE"}},
            "annotations": {"cdi.k8s.io/gpu": "nvidia.com/gpu=0", "n": "1"},
            "mounts": [{"destination": "/m", "type": "futurefs", "options": ["futureopt"], "uidMappings": []}],
            "linux": {"personality": {"domain": "LINUX_FUTURE"}, "namespaces": [{"type": "future"}],
                "resources": {"futureController": {"a": 1}}, "futureLinux": true}
        });
        let Some(node) = Node::new(&future) else { return };
        let mut spec = node.spec();
        assert!(attach_criu_config("c1", &node.bundle, &mut spec).unwrap());
        fs::write(node.bundle.join("config.json"), serde_json::to_vec(&spec).unwrap()).unwrap();
        let mut want = future.clone();
        want["annotations"][CRIU_CONFIG_ANNOTATION] = json!(node.bundle.join(CRIU_CONFIG_FILE).display().to_string());
        assert_eq!(node.spec(), want);

        node.write_cdi();
        node.restore(&record(&[0])).unwrap();
        let mut got = node.spec();
        // Only the parts the re-injection owns changed; the rest is byte for byte the original.
        assert_eq!(paths(&got, "/linux/devices", "path"), ["/dev/nvidia0"]);
        let mounts = got["mounts"].as_array().unwrap().clone();
        assert_eq!(mounts[0], future["mounts"][0]);
        for v in [&mut got, &mut want] {
            let linux = v["linux"].as_object_mut().unwrap();
            linux.remove("devices");
            linux["resources"].as_object_mut().unwrap().remove("devices");
            v.as_object_mut().unwrap().remove("mounts");
        }
        assert_eq!(got, want);
    }

    #[test]
    fn visible_devices_through_cdi_or_the_nodes_device_nodes() {
        let spec = json!({"process": {"env": ["NVIDIA_VISIBLE_DEVICES=0"]}});
        // With a CDI spec for nvidia.com/gpu: the CDI device, driver mount included.
        let Some(node) = Node::new(&spec) else { return };
        let lib = node.write_cdi();
        node.restore(&record(&[0])).unwrap();
        assert_eq!(paths(&node.spec(), "/linux/devices", "path"), ["/dev/nvidia0"]);
        assert_eq!(paths(&node.spec(), "/mounts", "source"), [lib.to_str().unwrap()]);

        // Without: the node's device node and control node, each with its rule; no mounts.
        let Some(node) = Node::new(&spec) else { return };
        let changes = node.restore(&record(&[0])).unwrap();
        let got = node.spec();
        assert_eq!(paths(&got, "/linux/devices", "path"), ["/dev/nvidia0", "/dev/nvidiactl"], "{changes:?}");
        let rules: Vec<(i64, i64)> = got["linux"]["resources"]["devices"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| (r["major"].as_i64().unwrap(), r["minor"].as_i64().unwrap()))
            .collect();
        assert_eq!(rules, [(195, 0), (195, 255)]);
        assert!(got.get("mounts").is_none(), "{got}");

        // A GPU the node does not have.
        let spec = json!({"process": {"env": ["NVIDIA_VISIBLE_DEVICES=GPU-zzzz"]}});
        let Some(node) = Node::new(&spec) else { return };
        let err = node.restore(&record(&[0])).unwrap_err();
        assert!(matches!(err, GpuError::Assignment(gpu::AssignmentError::UnknownGpu { .. })), "{err:?}");
        assert!(err.to_string().contains("GPU-aaaa"), "{err}");
    }

    #[test]
    fn its_own_nvidia_devices_stay_and_count() {
        // `ctr run --device` of a host node: its own, a GPU (minor 0), nothing else asked for.
        let spec = json!({"linux": {"devices": [{"path": "/tmp/d/nvidia0", "type": "c", "major": 195, "minor": 0}]}});
        let Some(node) = Node::new(&spec) else { return };
        node.write_cdi();
        assert_eq!(node.restore(&record(&[0])).unwrap(), Vec::<String>::new());
        assert_eq!(node.spec(), spec);
        assert!(node.restore(&record(&[0, 1])).is_err());
    }

    /// A driver-api checkpoint taken on GPU 0 restored into a container given GPU 1: the
    /// container gets GPU 1's node and rule only, and the move is checked up front (driver r580,
    /// same model, same count).
    #[test]
    fn a_container_given_another_gpu_gets_it_and_the_move_is_checked_up_front() {
        let spec = json!({"process": {"env": ["NVIDIA_VISIBLE_DEVICES=1"]}});
        let Some(node) = Node::new(&spec) else { return };
        node.add_gpu("0000:3b:00.0", "GPU-bbbb", "NVIDIA H100", 1);
        let mut rec = record(&[0]);
        rec.mode = GpuMode::DriverApi;
        rec.devices.devices.retain(|d| d.major == 195);
        rec.processes = vec![gpu::CudaProcessRecord {
            pid: 10,
            ns_pid: 7,
            evidence: "/dev/nvidia0 open".into(),
            state_before: None,
            state_checkpointed: None,
            bytes: 0,
            gpu_minors: vec![0],
        }];
        rec.gpus = gpu::node_gpus(&node.roots.proc).gpus;
        let run = |version: i32| {
            let mut spec = node.spec();
            prepare_restore_in("c1", &mut spec, &rec, false, &node.roots, &|| Ok(version)).map(|_| spec)
        };
        let err = run(12080).unwrap_err();
        assert!(matches!(err, GpuError::Assignment(gpu::AssignmentError::RemapDriver { .. })), "{err:?}");
        assert!(err.to_string().contains("GPU-aaaa=GPU-bbbb") && err.to_string().contains("CUDA 12.8"), "{err}");
        // Through CRIU's plugin the state cannot move (no device map reaches cuda-checkpoint): refused
        // up front, whatever the driver.
        let mut plugin = rec.clone();
        plugin.mode = GpuMode::CriuPlugin;
        let mut spec = node.spec();
        let err = prepare_restore_in("c1", &mut spec, &plugin, false, &node.roots, &|| Ok(13000)).unwrap_err();
        assert!(
            err.to_string().contains("CRIU's CUDA plugin") && err.to_string().contains("GPU-aaaa=GPU-bbbb"),
            "{err}"
        );
        let got = run(13000).unwrap();
        assert_eq!(paths(&got, "/linux/devices", "path"), ["/dev/nvidia1", "/dev/nvidiactl"]);
        let rules: Vec<i64> = got["linux"]["resources"]["devices"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r["minor"].as_i64().unwrap())
            .collect();
        assert_eq!(rules, [1, 255], "GPU 1's rule and the control node's only");
        // The same GPU needs no driver check at all.
        let spec0 = json!({"process": {"env": ["NVIDIA_VISIBLE_DEVICES=0"]}});
        let mut s0 = spec0.clone();
        prepare_restore_in("c1", &mut s0, &rec, false, &node.roots, &|| panic!("no remap, no driver")).unwrap();

        // Given a GPU of another model (on a node of mixed GPUs, as recorded): refused naming
        // both sides, whatever the driver.
        let Some(node) = Node::new(&spec) else { return };
        node.add_gpu("0000:3b:00.0", "GPU-cccc", "NVIDIA A100", 1);
        let mut rec = rec.clone();
        rec.gpus = gpu::node_gpus(&node.roots.proc).gpus;
        let mut spec = node.spec();
        let err = prepare_restore_in("c1", &mut spec, &rec, false, &node.roots, &|| Ok(13000)).unwrap_err();
        assert!(err.to_string().contains("GPU-aaaa is a NVIDIA H100 and GPU-cccc a NVIDIA A100"), "{err}");
        // Allowed for this container: restored without remapping.
        let mut spec = node.spec();
        prepare_restore_in("c1", &mut spec, &rec, true, &node.roots, &|| panic!("not asked")).unwrap();
    }

    /// At Start the assigned GPUs are read from the restored container's own /dev (as runc made
    /// it from its spec); a symlink there is the container's and is not followed.
    #[test]
    fn a_restored_container_s_gpus_are_read_from_its_dev() {
        let Some(node) = Node::new(&json!({})) else { return };
        node.add_gpu("0000:3b:00.0", "GPU-bbbb", "NVIDIA H100", 1);
        let dev = node.roots.proc.join("4242/root/dev");
        fs::create_dir_all(&dev).unwrap();
        for (name, minor) in [("nvidia1", 1), ("nvidiactl", 255)] {
            nix::sys::stat::mknod(
                &dev.join(name),
                nix::sys::stat::SFlag::S_IFCHR,
                nix::sys::stat::Mode::from_bits_truncate(0o666),
                nix::sys::stat::makedev(195, minor),
            )
            .unwrap();
        }
        std::os::unix::fs::symlink(node.roots.dev.join("nvidia0"), dev.join("nvidia0")).unwrap();
        let got: Vec<String> = container_gpus(&node.roots.proc, 4242).into_iter().map(|g| g.uuid).collect();
        assert_eq!(got, ["GPU-bbbb"]);
        assert!(container_gpus(&node.roots.proc, 4243).is_empty());
    }

    #[test]
    fn bytes_go_to_the_gpus_a_process_holds() {
        let p = |bytes, minors: Vec<u32>| gpu::CudaProcessRecord {
            pid: 1,
            ns_pid: 1,
            evidence: String::new(),
            state_before: None,
            state_checkpointed: None,
            bytes,
            gpu_minors: minors,
        };
        let gpus = vec![
            gpu::GpuInfo { index: 0, model: "H100".into(), uuid: "GPU-a".into(), bus_id: "0".into(), minor: Some(0) },
            gpu::GpuInfo { index: 1, model: "H100".into(), uuid: "GPU-b".into(), bus_id: "1".into(), minor: Some(1) },
        ];
        let out =
            bytes_per_gpu(&[p(100, vec![0]), p(50, vec![0, 1]), p(7, vec![]), p(0, vec![1]), p(3, vec![9])], &gpus);
        assert_eq!(out.get("GPU-a"), Some(&125));
        assert_eq!(out.get("GPU-b"), Some(&25));
        assert_eq!(out.get("unknown"), Some(&7));
        assert_eq!(out.get("minor-9"), Some(&3));
    }

    /// The /dev swaps of a remap: recorded minor to assigned minor by UUID; a pair between
    /// GPUs of the same minor needs none, and one whose minor is unknown is left out.
    #[test]
    fn node_swaps_follow_the_pairs_by_uuid() {
        let info = |uuid: &str, minor| gpu::GpuInfo { uuid: uuid.into(), minor, ..Default::default() };
        let recorded = [info("GPU-a", Some(0)), info("GPU-b", Some(1)), info("GPU-c", None)];
        let node = [info("GPU-x", Some(3)), info("GPU-y", Some(1)), info("GPU-z", Some(2))];
        let pair = |old: &str, new: &str| cuda::GpuPair { old: old.into(), new: new.into() };
        let pairs = [pair("GPU-a", "GPU-x"), pair("GPU-b", "GPU-y"), pair("GPU-c", "GPU-z")];
        assert_eq!(node_swaps("c1", &pairs, &recorded, &node), [NodeSwap { recorded: 0, assigned: 3 }]);
        assert!(node_swaps("c1", &[], &recorded, &node).is_empty());
    }
}
