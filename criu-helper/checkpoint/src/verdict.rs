//! The restore verdict: whether this node and the new container can take a checkpoint, decided
//! from the checkpoint's manifest before anything is created, frozen or hashed.
//!
//! Without it a mismatch surfaces late and one at a time: CRIU fails on a missing plugin or CPU
//! feature after the rootfs is set up, the driver fails on another GPU after CRIU restored the
//! processes. [`judge`] compares what the manifest records (CRIU version, kernel, architecture,
//! CPU features, cgroup mode, external mounts, the GPU record) with the node ([`NodeFacts`]) and
//! the new container's spec ([`ContainerFacts`]) and returns every hard mismatch at once, each
//! with a stable code and both sides named, and the soft differences as warnings.
//!
//! Hard or soft is decided the way CRIU and the CUDA driver decide: an older CRIU than the one
//! that dumped, another architecture, CPU features the dumped processes could use (CRIU's
//! cpuinfo check), another cgroup mode, a missing external mount or CUDA plugin, a GPU checkpoint
//! on a node without the driver, fewer or other GPUs, a remap on a driver below r580: hard. A
//! newer CRIU, kernel or driver: a warning.
//!
//! Only small files are read (the manifest, procfs, sysfs, CDI specs); nothing is hashed. The
//! manifest is read, never trusted: it can only add requirements (a refusal), never a grant; a
//! restore that passes is still verified byte by byte and checked against CRIU's own images.

use std::collections::BTreeSet;
use std::ffi::OsStr;
use std::fmt;
use std::io::Read;
use std::path::{Path, PathBuf};

use kybernate_gpu::{self as gpu, GpuMode, GpuRecord, GpuRequest, NodeGpus};
use serde::ser::SerializeStruct;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::manifest::Manifest;
use crate::preflight::{parse_criu_version, CriuVersion};

/// Specs, CRIU configs and procfs files are small; more than this is not read.
const MAX_FILE: u64 = 1 << 20;
/// How much of `/proc/cpuinfo` is read: its first CPU's block, on a node of any size.
const CPUINFO_HEAD: u64 = 64 << 10;

/// The x86 `/proc/cpuinfo` flags that name instruction sets and register state a process can use
/// without asking the kernel: CRIU's default cpu-cap (fpu, ins) refuses a restore onto a CPU
/// without those of the dump. Flags about the machine (hypervisor, tsc, bugs) change between
/// hosts of one fleet and say nothing about a process, so they are not recorded.
const X86_FEATURES: [&str; 62] = [
    "fpu",
    "cx8",
    "cmov",
    "mmx",
    "fxsr",
    "sse",
    "sse2",
    "pni",
    "ssse3",
    "sse4_1",
    "sse4_2",
    "sse4a",
    "fma",
    "fma4",
    "cx16",
    "movbe",
    "popcnt",
    "aes",
    "pclmulqdq",
    "xsave",
    "xsaveopt",
    "xsavec",
    "xsaves",
    "avx",
    "avx2",
    "f16c",
    "rdrand",
    "rdseed",
    "bmi1",
    "bmi2",
    "abm",
    "adx",
    "erms",
    "fsrm",
    "sha_ni",
    "clflushopt",
    "clwb",
    "lm",
    "xop",
    "tbm",
    "avx512f",
    "avx512dq",
    "avx512ifma",
    "avx512cd",
    "avx512bw",
    "avx512vl",
    "avx512vbmi",
    "avx512_vbmi2",
    "avx512_vnni",
    "avx512_bitalg",
    "avx512_vpopcntdq",
    "avx512_bf16",
    "avx512_fp16",
    "avx_vnni",
    "gfni",
    "vaes",
    "vpclmulqdq",
    "pku",
    "amx_bf16",
    "amx_tile",
    "amx_int8",
    "movdiri",
];

/// How other GPU models or counts are allowed, everywhere a restore is asked for.
const ALLOW_GPU_HINT: &str = "restore on matching GPUs, or allow it with [checkpoint] allow_gpu_mismatch = true, the \
                              annotation kybernate.io/allow-gpu-mismatch=true or `kybernate restore --allow-gpu-mismatch`";

/// CRIU's config directive that declares an external mount: `external mnt[KEY]:VALUE`.
const EXTERNAL_MNT: &str = "external mnt[";

/// What a checkpoint needs of the node that restores it, recorded at checkpoint time (the
/// manifest's `needs`; absent in checkpoints of older shims, whose restores skip these checks).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RestoreNeeds {
    /// The dumping node's architecture (`x86_64`, `aarch64`): CRIU's images hold its registers.
    #[serde(default)]
    pub arch: String,
    /// The dumping node's cgroup mode: CRIU restores the cgroup state of its images.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cgroup: Option<CgroupMode>,
    /// Instruction-set features of the dumping node's CPU that its processes could use.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub cpu_features: Vec<String>,
    /// Destinations of the mounts CRIU dumped as external (the spec's bind mounts, driver mounts
    /// declared in the container's CRIU config): a restore must map every one.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub external_mounts: Vec<String>,
}

impl RestoreNeeds {
    /// This node's needs for the container of `bundle` (its `config.json` as runc ran it) and
    /// `criu_config` (its CRIU config file, if any): what [`judge`] compares at restore.
    pub fn for_bundle(bundle: &Path, criu_config: Option<&Path>) -> Self {
        let spec = read_small(&bundle.join("config.json")).and_then(|t| serde_json::from_str::<Value>(&t).ok());
        let config = criu_config.and_then(read_small);
        let arch = std::env::consts::ARCH;
        Self {
            arch: arch.to_string(),
            cgroup: cgroup_mode(Path::new("/sys/fs/cgroup")),
            cpu_features: cpu_features(&read_head(Path::new("/proc/cpuinfo")), arch).into_iter().collect(),
            external_mounts: external_mounts(spec.as_ref().unwrap_or(&Value::Null), config.as_deref()),
        }
    }
}

/// How the node mounts cgroups.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CgroupMode {
    /// Only cgroup v1 hierarchies.
    V1,
    /// cgroup v2 at the root (unified).
    V2,
    /// v1 hierarchies with cgroup v2 at `unified/` (systemd's hybrid mode).
    Hybrid,
}

impl fmt::Display for CgroupMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::V1 => "cgroup v1",
            Self::V2 => "cgroup v2",
            Self::Hybrid => "cgroup hybrid (v1 with v2 at unified/)",
        })
    }
}

/// The cgroup mode of the hierarchy at `root` (`/sys/fs/cgroup`): its filesystem type, as runc
/// and systemd tell it. `None` when nothing is mounted there.
pub fn cgroup_mode(root: &Path) -> Option<CgroupMode> {
    use nix::sys::statfs::{statfs, CGROUP2_SUPER_MAGIC};
    let fs = statfs(root).ok()?;
    if fs.filesystem_type() == CGROUP2_SUPER_MAGIC {
        return Some(CgroupMode::V2);
    }
    let unified = statfs(&root.join("unified")).is_ok_and(|u| u.filesystem_type() == CGROUP2_SUPER_MAGIC);
    Some(if unified { CgroupMode::Hybrid } else { CgroupMode::V1 })
}

/// The CPU features of `/proc/cpuinfo`'s text that a restore needs: on x86 the instruction-set
/// flags of its first `flags` line ([`X86_FEATURES`]); elsewhere every word of its `Features`
/// line (arm64's hwcaps are all instruction sets).
pub fn cpu_features(cpuinfo: &str, arch: &str) -> BTreeSet<String> {
    let line = |key: &str| {
        cpuinfo.lines().find_map(|l| {
            let (k, v) = l.split_once(':')?;
            (k.trim() == key).then_some(v)
        })
    };
    if arch == "x86_64" || arch == "x86" {
        let Some(flags) = line("flags") else { return BTreeSet::new() };
        return flags.split_whitespace().filter(|f| X86_FEATURES.contains(f)).map(str::to_string).collect();
    }
    line("Features").map(|v| v.split_whitespace().map(str::to_string).collect()).unwrap_or_default()
}

/// The destinations CRIU dumps as external mounts for a container of `spec`: its bind mounts
/// (runc declares each to CRIU by its destination), and the keys of `external mnt[KEY]` lines
/// of its CRIU config `criu_config` (driver mounts made outside the spec). Normalized, sorted.
pub fn external_mounts(spec: &Value, criu_config: Option<&str>) -> Vec<String> {
    let mut out = BTreeSet::new();
    for m in spec.get("mounts").and_then(Value::as_array).into_iter().flatten() {
        let Some(dest) = m.get("destination").and_then(Value::as_str) else { continue };
        let typ = m.get("type").and_then(Value::as_str).unwrap_or_default();
        let options = m.get("options").and_then(Value::as_array);
        let bind_option = options.into_iter().flatten().any(|o| matches!(o.as_str(), Some("bind" | "rbind")));
        if typ == "bind" || bind_option {
            out.insert(gpu::devices::normalize_dest(dest));
        }
    }
    for line in criu_config.unwrap_or_default().lines() {
        let Some(rest) = line.trim().strip_prefix(EXTERNAL_MNT) else { continue };
        if let Some((key, _)) = rest.split_once(']') {
            if key.starts_with('/') {
                out.insert(gpu::devices::normalize_dest(key));
            }
        }
    }
    out.into_iter().collect()
}

/// What the restoring node has, gathered by [`NodeFacts::gather`] or given by a test.
#[derive(Debug, Clone)]
pub struct NodeFacts {
    pub arch: String,
    /// uname release.
    pub kernel: String,
    /// The CRIU runc will run: its version, or why there is none.
    pub criu: Result<CriuVersion, String>,
    /// What a checkpoint taken through CRIU's CUDA plugin would lack here (`cuda_plugin.so`,
    /// `cuda-checkpoint`); empty when both are there.
    pub cuda_plugin_missing: Vec<String>,
    pub cpu_features: BTreeSet<String>,
    pub cgroup: Option<CgroupMode>,
    /// The NVIDIA driver and GPUs (`/proc/driver/nvidia`).
    pub gpus: NodeGpus,
}

/// Where [`NodeFacts::gather`] looks: the real node's paths, or a test's scratch tree.
#[derive(Debug, Clone)]
pub struct NodeSources<'a> {
    /// `/proc`.
    pub proc: &'a Path,
    /// `/sys/fs/cgroup`.
    pub cgroup_root: &'a Path,
    /// CRIU's plugin directories (`kybernate_gpu::cuda::preflight::plugin_dirs`).
    pub plugin_dirs: Vec<PathBuf>,
    /// `$PATH` (where CRIU's plugin finds `cuda-checkpoint`).
    pub path_env: Option<&'a OsStr>,
}

impl<'a> NodeSources<'a> {
    /// This node, as the caller's environment sees it (`$CRIU_LIBS_DIR`, `$PATH` given).
    pub fn system(path_env: Option<&'a OsStr>) -> Self {
        let libs = std::env::var_os(gpu::cuda::preflight::CRIU_LIBS_DIR);
        Self {
            proc: Path::new("/proc"),
            cgroup_root: Path::new("/sys/fs/cgroup"),
            plugin_dirs: gpu::cuda::preflight::plugin_dirs(libs.as_deref()),
            path_env,
        }
    }
}

impl NodeFacts {
    /// Reads the node's facts from small files and directory lookups; runs nothing. `criu`:
    /// the version of the CRIU runc will run (`criu --version`, run by the caller its own way:
    /// the shim through its reaper-safe spawner), or why there is none.
    pub fn gather(src: &NodeSources<'_>, criu: Result<CriuVersion, String>) -> Self {
        let arch = std::env::consts::ARCH.to_string();
        let cpu_features = cpu_features(&read_head(&src.proc.join("cpuinfo")), &arch);
        let mut cuda_plugin_missing = Vec::new();
        let plugin = gpu::cuda::preflight::CUDA_PLUGIN;
        if !src.plugin_dirs.iter().any(|d| d.join(plugin).is_file()) {
            let dirs: Vec<String> = src.plugin_dirs.iter().map(|d| d.display().to_string()).collect();
            cuda_plugin_missing.push(format!("CRIU's {plugin} (in {})", dirs.join(", ")));
        }
        let tool = gpu::cuda::preflight::CUDA_CHECKPOINT;
        if gpu::cuda::preflight::find_in_path(tool, src.path_env).is_none() {
            cuda_plugin_missing.push(format!("{tool} on PATH"));
        }
        Self {
            arch,
            kernel: crate::manifest::kernel_release(),
            criu,
            cuda_plugin_missing,
            cpu_features,
            cgroup: cgroup_mode(src.cgroup_root),
            gpus: gpu::node_gpus(src.proc),
        }
    }
}

/// The version in a `criu --version` output, or why there is none (for [`NodeFacts::criu`]).
pub fn criu_version_of(output: Result<String, String>) -> Result<CriuVersion, String> {
    parse_criu_version(&output?).map_err(|e| e.to_string())
}

/// A GPU the new container is given.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GivenGpu {
    /// Its device node in the container, e.g. "/dev/nvidia0".
    pub path: String,
    pub minor: u32,
    /// Model and UUID from the node's driver ("" when the driver does not list the minor).
    pub model: String,
    pub uuid: String,
}

/// What the new container's spec gives it, as the shim will resolve it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContainerFacts {
    /// Its GPUs, by minor: its own GPU request resolved on this node (CDI specs, else the node's
    /// device nodes) plus GPU devices its spec already has; never the checkpoint's record.
    pub gpus: Vec<GivenGpu>,
    /// How its spec asks for GPUs, for messages ("NVIDIA_VISIBLE_DEVICES=0").
    pub request: String,
    /// Why its GPU request cannot be given on this node.
    pub gpu_error: Option<String>,
    /// Destinations of its mounts (its spec's and its GPU request's driver mounts), normalized.
    pub mounts: BTreeSet<String>,
    /// Its spec with its own GPU request's devices added, and that request: what the shim's
    /// GPU count check (`kybernate_gpu::check_gpu_count`) looks at, which the verdict runs first.
    pub spec: Value,
    pub gpu_request: GpuRequest,
}

impl ContainerFacts {
    /// The facts of a container whose `config.json` is `spec`, on the node whose GPUs are `node`
    /// (CDI specs in `cdi_dirs`, device nodes under `dev_root`, the driver under `proc_root`).
    pub fn from_spec(spec: &Value, cdi_dirs: &[&Path], proc_root: &Path, dev_root: &Path, node: &NodeGpus) -> Self {
        let request = gpu::gpu_request(spec);
        let mut with_own = spec.clone();
        let gpu_error = match gpu::own_devices(&request, cdi_dirs, proc_root, dev_root) {
            Ok((devices, _)) => {
                gpu::inject(&mut with_own, &devices);
                None
            }
            Err(e) => Some(e.to_string()),
        };
        let gpus = gpu::assign::gpus_of(&gpu::devices::spec_devices(&with_own))
            .into_iter()
            .map(|(minor, path)| {
                let known = node.gpus.iter().find(|g| g.minor == Some(minor));
                GivenGpu {
                    path,
                    minor,
                    model: known.map(|g| normalize_model(&g.model)).unwrap_or_default(),
                    uuid: known.map(|g| g.uuid.clone()).unwrap_or_default(),
                }
            })
            .collect();
        Self {
            gpus,
            request: describe_request(&request),
            gpu_error,
            mounts: gpu::devices::spec_mount_destinations(&with_own),
            spec: with_own,
            gpu_request: request,
        }
    }
}

fn describe_request(request: &GpuRequest) -> String {
    match request {
        GpuRequest::Cdi(names) => format!("its cdi.k8s.io annotations [{}]", names.join(", ")),
        GpuRequest::VisibleDevices { value, .. } => format!("its NVIDIA_VISIBLE_DEVICES={value}"),
        GpuRequest::Nothing { visible: None } => "its spec, which requests no GPU".into(),
        GpuRequest::Nothing { visible: Some(v) } => format!("its NVIDIA_VISIBLE_DEVICES={v:?}, which requests no GPU"),
    }
}

/// One difference between a checkpoint and the node or container that would restore it. Each
/// has a stable [`code`](Self::code); whether it is a mismatch or a warning is [`judge`]'s call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Difference {
    /// Another CPU architecture.
    Arch { checkpoint: String, node: String },
    /// Another kernel release.
    Kernel { checkpoint: String, node: String },
    /// No usable CRIU on this node.
    CriuMissing { checkpoint: String, why: String },
    /// Another CRIU release.
    CriuVersion { checkpoint: CriuVersion, node: CriuVersion },
    /// The checkpoint's CUDA state went through CRIU's CUDA plugin, which this node lacks.
    CriuPlugin { missing: Vec<String> },
    /// CPU features of the dumping node this node's CPU lacks.
    CpuFeatures { missing: Vec<String> },
    /// Another cgroup mode; `ignored`: the checkpoint was taken with `--manage-cgroups-mode ignore`.
    Cgroup { checkpoint: CgroupMode, node: Option<CgroupMode>, ignored: bool },
    /// A GPU checkpoint with CUDA state on a node without the NVIDIA driver.
    GpuDriverMissing { checkpoint: String },
    /// Another NVIDIA driver release.
    GpuDriverVersion { checkpoint: String, node: String },
    /// Other GPU models: (the checkpoint's, this node's or the container's), per differing GPU.
    GpuModel { pairs: Vec<(String, String)> },
    /// A node with another number of GPUs: models of the checkpoint's node and of this node.
    GpuNodeCount { checkpoint: Vec<String>, node: Vec<String> },
    /// The new container is given fewer GPUs than the checkpoint used.
    /// `message`: the shim's GPU count check's own words (`kybernate_gpu::check_gpu_count`).
    GpuCount { used: Vec<String>, given: Vec<String>, message: String },
    /// The new container's GPU request cannot be given on this node.
    GpuRequest { request: String, error: String },
    /// The new container's GPUs are other GPUs than the checkpoint's (UUID pairs): the driver
    /// must remap the CUDA state; `driver`: this node's.
    GpuRemapDriver { pairs: Vec<(String, String)>, driver: String },
    /// The checkpoint's CUDA state cannot move onto the new container's GPUs (another count or
    /// model): the shim's pairing's own words (`kybernate_gpu::gpu_pairs`).
    GpuRemap { message: String },
    /// External mounts of the checkpoint the new container's spec lacks.
    Mounts { missing: Vec<String> },
}

impl Difference {
    /// The stable code scripts match on.
    pub fn code(&self) -> &'static str {
        match self {
            Self::Arch { .. } => "arch",
            Self::Kernel { .. } => "kernel",
            Self::CriuMissing { .. } => "criu-missing",
            Self::CriuVersion { .. } => "criu-version",
            Self::CriuPlugin { .. } => "criu-cuda-plugin",
            Self::CpuFeatures { .. } => "cpu-features",
            Self::Cgroup { .. } => "cgroup-mode",
            Self::GpuDriverMissing { .. } => "gpu-driver-missing",
            Self::GpuDriverVersion { .. } => "gpu-driver-version",
            Self::GpuModel { .. } => "gpu-model",
            Self::GpuNodeCount { .. } => "gpu-node-count",
            Self::GpuCount { .. } => "gpu-count",
            Self::GpuRequest { .. } => "gpu-request",
            Self::GpuRemapDriver { .. } => "gpu-remap-driver",
            Self::GpuRemap { .. } => "gpu-remap",
            Self::Mounts { .. } => "mounts",
        }
    }

    /// The checkpoint's side, in a few words.
    pub fn checkpoint_side(&self) -> String {
        match self {
            Self::Arch { checkpoint, .. } | Self::Kernel { checkpoint, .. } => checkpoint.clone(),
            Self::CriuMissing { checkpoint, .. } => format!("CRIU {checkpoint}"),
            Self::CriuVersion { checkpoint, .. } => format!("CRIU {checkpoint}"),
            Self::CriuPlugin { .. } => "CRIU's CUDA plugin".into(),
            Self::CpuFeatures { missing } => missing.join(" "),
            Self::Cgroup { checkpoint, .. } => checkpoint.to_string(),
            Self::GpuDriverMissing { checkpoint } | Self::GpuDriverVersion { checkpoint, .. } => {
                driver_with_cuda(checkpoint)
            }
            Self::GpuModel { pairs } => pairs.iter().map(|(c, _)| c.as_str()).collect::<Vec<_>>().join(", "),
            Self::GpuNodeCount { checkpoint, .. } => models_text(checkpoint),
            Self::GpuCount { used, .. } => gpus_text(used),
            Self::GpuRequest { .. } => "-".into(),
            Self::GpuRemapDriver { pairs, .. } => pairs.iter().map(|(c, _)| c.as_str()).collect::<Vec<_>>().join(", "),
            Self::GpuRemap { .. } => "its GPUs".into(),
            Self::Mounts { missing } => missing.join(", "),
        }
    }

    /// This node's (or the new container's) side, in a few words.
    pub fn node_side(&self) -> String {
        match self {
            Self::Arch { node, .. } | Self::Kernel { node, .. } => node.clone(),
            Self::CriuMissing { why, .. } => why.clone(),
            Self::CriuVersion { node, .. } => format!("CRIU {node}"),
            Self::CriuPlugin { missing } => format!("lacks {}", missing.join(", ")),
            Self::CpuFeatures { missing } => format!("lacks {}", missing.join(" ")),
            Self::Cgroup { node, .. } => node.map_or_else(|| "no cgroup mount".into(), |n| n.to_string()),
            Self::GpuDriverMissing { .. } => "no NVIDIA driver".into(),
            Self::GpuDriverVersion { node, .. } => driver_with_cuda(node),
            Self::GpuModel { pairs } => pairs.iter().map(|(_, n)| n.as_str()).collect::<Vec<_>>().join(", "),
            Self::GpuNodeCount { node, .. } => models_text(node),
            Self::GpuCount { given, .. } => gpus_text(given),
            Self::GpuRequest { request, .. } => request.clone(),
            Self::GpuRemap { .. } => "this container's GPUs".into(),
            Self::GpuRemapDriver { pairs, driver } => format!(
                "{} on driver {}",
                pairs.iter().map(|(_, n)| n.as_str()).collect::<Vec<_>>().join(", "),
                driver_with_cuda(driver)
            ),
            Self::Mounts { .. } => "none there".into(),
        }
    }

    /// What differs, naming both sides, and what it means (without the code).
    pub fn message(&self) -> String {
        match self {
            Self::Arch { checkpoint, node } => format!(
                "checkpoint taken on {checkpoint:?}, this node is {node:?}: CRIU's images hold one architecture's \
                 registers and code"
            ),
            Self::Kernel { checkpoint, node } => {
                let how = match (kernel_version(checkpoint), kernel_version(node)) {
                    (Some(c), Some(n)) if n < c => {
                        "an older kernel: CRIU fails if the processes used a feature it lacks"
                    }
                    _ => "CRIU restores onto another kernel when it has every feature the processes used",
                };
                format!("checkpoint taken on kernel {checkpoint}, this node runs {node} ({how})")
            }
            Self::CriuMissing { checkpoint, why } => {
                format!("checkpoint dumped by CRIU {checkpoint}, this node has no usable CRIU: {why}")
            }
            Self::CriuVersion { checkpoint, node } if node < checkpoint => format!(
                "checkpoint dumped by CRIU {checkpoint}, this node has CRIU {node}: an older CRIU may not read newer \
                 images; install CRIU {checkpoint} or newer"
            ),
            Self::CriuVersion { checkpoint, node } => {
                format!(
                    "checkpoint dumped by CRIU {checkpoint}, this node has CRIU {node} (newer: it reads older images)"
                )
            }
            Self::CriuPlugin { missing } => format!(
                "checkpoint's CUDA state was taken through CRIU's CUDA plugin, this node lacks {}: CRIU refuses the \
                 restore (\"Missing required plugin\")",
                missing.join(" and ")
            ),
            Self::CpuFeatures { missing } => format!(
                "checkpoint taken on a CPU with [{}], this node's CPU lacks them: its processes may use those \
                 instructions (CRIU's cpuinfo check refuses)",
                missing.join(", ")
            ),
            Self::Cgroup { checkpoint, node, ignored } => {
                let node = node.map_or_else(|| "no cgroup mount at /sys/fs/cgroup".into(), |n| n.to_string());
                let why = if *ignored {
                    "taken with --manage-cgroups-mode ignore, so CRIU leaves cgroups alone"
                } else {
                    "CRIU restores the cgroup state of its images into the node's hierarchy"
                };
                format!("checkpoint taken on {checkpoint}, this node has {node}: {why}")
            }
            Self::GpuDriverMissing { checkpoint } => format!(
                "checkpoint's CUDA state was taken with NVIDIA driver {}, this node has no NVIDIA driver \
                 (/proc/driver/nvidia/version)",
                driver_with_cuda(checkpoint)
            ),
            Self::GpuDriverVersion { checkpoint, node } => {
                let older = matches!(
                    (gpu::inventory::driver_major(checkpoint), gpu::inventory::driver_major(node)),
                    (Some(c), Some(n)) if n < c
                );
                let how = if older {
                    "an older driver branch does not read a newer one's CUDA state"
                } else {
                    "a newer driver reads the state of an older one"
                };
                format!(
                    "checkpoint's CUDA state was taken with NVIDIA driver {}, this node has {} ({how})",
                    driver_with_cuda(checkpoint),
                    driver_with_cuda(node)
                )
            }
            Self::GpuModel { pairs } => {
                let each: Vec<String> =
                    pairs.iter().map(|(c, n)| format!("checkpoint taken on {c:?}, this node has {n:?}")).collect();
                format!("{}: CUDA state only fits the GPU model it was taken on; {ALLOW_GPU_HINT}", each.join("; "))
            }
            Self::GpuNodeCount { checkpoint, node } => format!(
                "checkpoint taken on a node with {} GPU(s) [{}], this node has {} [{}]; {ALLOW_GPU_HINT}",
                checkpoint.len(),
                models_text(checkpoint),
                node.len(),
                models_text(node)
            ),
            Self::GpuCount { message, .. } => message.clone(),
            Self::GpuRequest { request, error } => {
                format!("this container's GPUs ({request}) cannot be given on this node: {error}")
            }
            Self::GpuRemap { message } => message.clone(),
            Self::GpuRemapDriver { pairs, driver } => {
                let each: Vec<String> = pairs.iter().map(|(c, n)| format!("{c} → {n}")).collect();
                let major = gpu::inventory::REMAP_MIN_DRIVER_MAJOR;
                if gpu::inventory::driver_major(driver).is_some_and(|m| m >= major) {
                    format!(
                        "checkpoint's GPUs are not this container's ({}): driver {} remaps the CUDA state onto them",
                        each.join(", "),
                        driver_with_cuda(driver)
                    )
                } else {
                    format!(
                        "checkpoint's GPUs are not this container's ({}): restoring onto other GPUs needs NVIDIA driver \
                         ≥ {major} (CUDA 13.0), this node has {}",
                        each.join(", "),
                        driver_with_cuda(driver)
                    )
                }
            }
            Self::Mounts { missing } => format!(
                "checkpoint's processes had mounts at {} (CRIU dumped them as external), the new container's spec \
                 has none there: CRIU cannot restore them",
                missing.join(", ")
            ),
        }
    }
}

impl fmt::Display for Difference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.code(), self.message())
    }
}

/// `{"code", "message", "checkpoint", "node"}`.
impl Serialize for Difference {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut st = s.serialize_struct("Difference", 4)?;
        st.serialize_field("code", self.code())?;
        st.serialize_field("message", &self.message())?;
        st.serialize_field("checkpoint", &self.checkpoint_side())?;
        st.serialize_field("node", &self.node_side())?;
        st.end()
    }
}

/// Whether a restore may go ahead: every hard mismatch, and the soft differences.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Verdict {
    pub mismatches: Vec<Difference>,
    pub warnings: Vec<Difference>,
}

impl Verdict {
    pub fn compatible(&self) -> bool {
        self.mismatches.is_empty()
    }

    /// `Ok(self)` when compatible, else every mismatch as one error.
    pub fn into_result(self) -> Result<Self, Incompatible> {
        if self.compatible() {
            Ok(self)
        } else {
            Err(Incompatible(self))
        }
    }

    fn hard(&mut self, d: Difference) {
        self.mismatches.push(d);
    }

    fn soft(&mut self, d: Difference) {
        self.warnings.push(d);
    }

    fn either(&mut self, hard: bool, d: Difference) {
        if hard {
            self.hard(d)
        } else {
            self.soft(d)
        }
    }
}

/// `{"compatible": bool, "mismatches": [...], "warnings": [...]}`.
impl Serialize for Verdict {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut st = s.serialize_struct("Verdict", 3)?;
        st.serialize_field("compatible", &self.compatible())?;
        st.serialize_field("mismatches", &self.mismatches)?;
        st.serialize_field("warnings", &self.warnings)?;
        st.end()
    }
}

/// A verdict with mismatches, as an error: every one named, in one line.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{} mismatch(es): {}", .0.mismatches.len(), .0.mismatches.iter().map(ToString::to_string).collect::<Vec<_>>().join("; "))]
pub struct Incompatible(pub Verdict);

/// Compares checkpoint `m` with `node` and, when known, the new `container`; returns every
/// difference, hard ones as mismatches. `allow_gpu_mismatch` (the node's config or the
/// restore's annotation/flag) turns other GPU models and GPU counts of the node into warnings,
/// as the shim's GPU check allows them; never fewer GPUs for the container or a missing driver.
pub fn judge(m: &Manifest, node: &NodeFacts, container: Option<&ContainerFacts>, allow_gpu_mismatch: bool) -> Verdict {
    let mut v = Verdict::default();
    let recorded_criu = recorded_criu_version(&m.criu.version);
    match (&node.criu, recorded_criu) {
        (Err(why), _) => {
            let checkpoint = recorded_criu.map_or_else(|| m.criu.version.clone(), |c| c.to_string());
            v.hard(Difference::CriuMissing { checkpoint, why: why.clone() })
        }
        (Ok(n), Some(c)) if *n != c => v.either(*n < c, Difference::CriuVersion { checkpoint: c, node: *n }),
        _ => {}
    }
    if !m.kernel.is_empty() && m.kernel != "unknown" && m.kernel != node.kernel {
        v.soft(Difference::Kernel { checkpoint: m.kernel.clone(), node: node.kernel.clone() });
    }
    if let Some(needs) = &m.needs {
        if !needs.arch.is_empty() && needs.arch != node.arch {
            v.hard(Difference::Arch { checkpoint: needs.arch.clone(), node: node.arch.clone() });
        }
        let missing: Vec<String> =
            needs.cpu_features.iter().filter(|f| !node.cpu_features.contains(*f)).cloned().collect();
        if !missing.is_empty() {
            v.hard(Difference::CpuFeatures { missing });
        }
        if let Some(c) = needs.cgroup.filter(|c| Some(*c) != node.cgroup) {
            let ignored = m.options.cgroups_mode == "ignore";
            v.either(!ignored, Difference::Cgroup { checkpoint: c, node: node.cgroup, ignored });
        }
        if let Some(ct) = container {
            let missing: Vec<String> =
                needs.external_mounts.iter().filter(|d| !ct.mounts.contains(d.as_str())).cloned().collect();
            if !missing.is_empty() {
                v.hard(Difference::Mounts { missing });
            }
        }
    }
    if let Some(g) = &m.gpu {
        judge_gpu(g, node, container, allow_gpu_mismatch, &mut v);
    }
    v
}

fn judge_gpu(
    g: &GpuRecord,
    node: &NodeFacts,
    container: Option<&ContainerFacts>,
    allow_gpu_mismatch: bool,
    v: &mut Verdict,
) {
    let cuda_state = g.mode != GpuMode::None && !g.processes.is_empty();
    let node_driver = node.gpus.driver_version.as_deref();
    match (g.driver_version.as_deref(), node_driver) {
        (Some(c), None) if cuda_state => v.hard(Difference::GpuDriverMissing { checkpoint: c.into() }),
        (Some(c), Some(n)) if c != n => {
            let older = matches!(
                (gpu::inventory::driver_major(c), gpu::inventory::driver_major(n)),
                (Some(c), Some(n)) if n < c
            );
            v.either(cuda_state && older, Difference::GpuDriverVersion { checkpoint: c.into(), node: n.into() })
        }
        _ => {}
    }
    if g.mode == GpuMode::CriuPlugin && cuda_state && !node.cuda_plugin_missing.is_empty() {
        v.hard(Difference::CriuPlugin { missing: node.cuda_plugin_missing.clone() });
    }
    // The shim's node-wide check (`kybernate_gpu::check_compatible`), so that the verdict gives
    // its answer first: the same count and models, in order.
    let node_wide = gpu::check_compatible(&g.gpus, &node.gpus.gpus).is_err();
    if node_wide {
        let recorded: Vec<String> = g.gpus.iter().map(|x| normalize_model(&x.model)).collect();
        let here: Vec<String> = node.gpus.gpus.iter().map(|x| normalize_model(&x.model)).collect();
        let d = if recorded.len() == here.len() {
            let pairs = recorded.into_iter().zip(here).filter(|(a, b)| a != b).collect();
            Difference::GpuModel { pairs }
        } else {
            Difference::GpuNodeCount { checkpoint: recorded, node: here }
        };
        v.either(!allow_gpu_mismatch, d);
    }
    let Some(ct) = container else { return };
    if let Some(error) = &ct.gpu_error {
        v.hard(Difference::GpuRequest { request: ct.request.clone(), error: error.clone() });
        return;
    }
    // The shim's own count check, on the spec as the shim will have edited it: the same answer
    // in the same words.
    if let Err(e) = gpu::check_gpu_count(g, &ct.spec, &ct.gpu_request) {
        let (used, given) = match &e {
            gpu::AssignmentError::FewerGpus { used, has, .. } => (used.clone(), has.clone()),
            _ => (Vec::new(), Vec::new()),
        };
        v.hard(Difference::GpuCount { used, given, message: e.to_string() });
        return;
    }
    if !cuda_state {
        return;
    }
    if g.mode == GpuMode::DriverApi {
        // The shim's own pairing (`kybernate_gpu::gpu_pairs`, where this node lists its GPUs):
        // what it refuses, the verdict refuses first, in its words.
        if node.gpus.gpus.is_empty() {
            return;
        }
        let assigned = gpu::gpus_by_minor(&gpu::devices::spec_devices(&ct.spec), &node.gpus.gpus);
        match gpu::gpu_pairs(g, &assigned) {
            Ok(pairs) if !pairs.is_empty() => {
                let pairs = pairs.into_iter().map(|p| (p.old, p.new)).collect();
                remap_driver(pairs, node_driver, v);
            }
            Ok(_) => {}
            Err(e) => v.either(!allow_gpu_mismatch, Difference::GpuRemap { message: e.to_string() }),
        }
        return;
    }
    // CRIU's plugin: the checkpoint's GPUs go onto the container's in order of minor.
    let used = gpu::recorded_gpus(g);
    let (mut models, mut remap) = (Vec::new(), Vec::new());
    for (minor, given) in used.keys().zip(&ct.gpus) {
        let Some(rec) = g.gpus.iter().find(|x| x.minor == Some(*minor)) else { continue };
        let rec_model = normalize_model(&rec.model);
        if !rec_model.is_empty() && !given.model.is_empty() && rec_model != given.model {
            models.push((rec_model, given.model.clone()));
        }
        if !rec.uuid.is_empty() && !given.uuid.is_empty() && !rec.uuid.eq_ignore_ascii_case(&given.uuid) {
            remap.push((rec.uuid.clone(), given.uuid.clone()));
        }
    }
    if !models.is_empty() && !node_wide {
        v.either(!allow_gpu_mismatch, Difference::GpuModel { pairs: models });
    }
    if !remap.is_empty() {
        remap_driver(remap, node_driver, v);
    }
}

/// Other GPUs than the checkpoint's (UUID pairs): the driver must remap, which r580 does.
fn remap_driver(pairs: Vec<(String, String)>, node_driver: Option<&str>, v: &mut Verdict) {
    let driver = node_driver.unwrap_or("none").to_string();
    let can = gpu::inventory::driver_major(&driver).is_some_and(|m| m >= gpu::inventory::REMAP_MIN_DRIVER_MAJOR);
    v.either(!can, Difference::GpuRemapDriver { pairs, driver });
}

/// A manifest's CRIU version text ("4.1.1", or `criu --version`'s "Version: 4.1.1"); `None`
/// for what is not one (a kubelet archive's empty text): nothing to compare then.
fn recorded_criu_version(text: &str) -> Option<CriuVersion> {
    parse_criu_version(text).or_else(|_| parse_criu_version(&format!("Version: {}", text.trim()))).ok()
}

/// `major.minor` of a kernel release ("6.18.44-amd64" → (6, 18)).
fn kernel_version(release: &str) -> Option<(u32, u32)> {
    let mut parts = release.split(|c: char| !c.is_ascii_digit());
    Some((parts.next()?.parse().ok()?, parts.next()?.parse().ok()?))
}

/// "580.65.06 (CUDA 13.0)", or the version alone below CUDA 12.
fn driver_with_cuda(version: &str) -> String {
    match gpu::inventory::cuda_for_driver(version) {
        Some(cuda) => format!("{version} (CUDA {cuda})"),
        None => version.to_string(),
    }
}

/// "none", or "2 GPU(s): /dev/nvidia0, /dev/nvidia1".
fn gpus_text(paths: &[String]) -> String {
    if paths.is_empty() {
        return "none".into();
    }
    format!("{} GPU(s): {}", paths.len(), paths.join(", "))
}

fn models_text(models: &[String]) -> String {
    if models.is_empty() {
        return "none".into();
    }
    models.iter().map(|m| if m.is_empty() { "unknown model" } else { m.as_str() }).collect::<Vec<_>>().join(", ")
}

fn normalize_model(model: &str) -> String {
    model.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// The first [`CPUINFO_HEAD`] bytes of a file as text, up to its last whole line ("" when
/// unreadable): `/proc/cpuinfo` repeats one block per CPU, and the first block names the features.
fn read_head(path: &Path) -> String {
    let mut bytes = Vec::new();
    if let Ok(f) = std::fs::File::open(path) {
        let _ = f.take(CPUINFO_HEAD).read_to_end(&mut bytes);
    }
    if bytes.len() as u64 == CPUINFO_HEAD {
        let end = bytes.iter().rposition(|b| *b == b'\n').map_or(0, |i| i + 1);
        bytes.truncate(end);
    }
    String::from_utf8_lossy(&bytes).into_owned()
}

/// A small file's text; `None` when missing, unreadable, not UTF-8 or bigger than [`MAX_FILE`].
fn read_small(path: &Path) -> Option<String> {
    let mut bytes = Vec::new();
    std::fs::File::open(path).ok()?.take(MAX_FILE + 1).read_to_end(&mut bytes).ok()?;
    if bytes.len() as u64 > MAX_FILE {
        return None;
    }
    String::from_utf8(bytes).ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use kybernate_gpu::GpuInfo;
    use serde_json::json;
    use std::time::Instant;

    const H100: &str = "NVIDIA H100 80GB HBM3";
    const A100: &str = "NVIDIA A100-SXM4-80GB";

    fn v(major: u32, minor: u32, patch: u32) -> CriuVersion {
        CriuVersion { major, minor, patch }
    }

    fn gpu_info(index: u32, model: &str, uuid: &str) -> GpuInfo {
        GpuInfo {
            index,
            model: model.into(),
            uuid: uuid.into(),
            bus_id: format!("0000:{index:02x}:00.0"),
            minor: Some(index),
        }
    }

    /// A node like the one the checkpoint was taken on: same everything.
    fn node() -> NodeFacts {
        NodeFacts {
            arch: "x86_64".into(),
            kernel: "6.8.0".into(),
            criu: Ok(v(4, 2, 0)),
            cuda_plugin_missing: Vec::new(),
            cpu_features: ["sse4_2", "avx2", "avx512f"].map(String::from).into(),
            cgroup: Some(CgroupMode::V2),
            gpus: NodeGpus { driver_version: Some("580.65.06".into()), gpus: vec![gpu_info(0, H100, "GPU-aaaa")] },
        }
    }

    /// The new container's spec: GPU 0 (its device node, as the GPU runtime or CDI gives it)
    /// and the checkpoint's bind mount.
    fn spec() -> Value {
        json!({
            "mounts": [{"destination": "/proc", "type": "proc"}, {"destination": "/data", "type": "bind"}],
            "linux": {"devices": [{"path": "/dev/nvidia0", "type": "c", "major": 195, "minor": 0}]}
        })
    }

    /// The container of `spec` on node `n` (no CDI specs, no driver tree to resolve a request in).
    fn container_on(n: &NodeFacts, spec: &Value) -> ContainerFacts {
        let none = Path::new("/nonexistent");
        ContainerFacts::from_spec(spec, &[], none, none, &n.gpus)
    }

    /// A GPU checkpoint (driver-api, one CUDA process on GPU 0) taken on [`node`].
    fn manifest() -> Manifest {
        let mut m = crate::manifest::sample();
        m.criu.version = "4.2.0".into();
        m.kernel = "6.8.0".into();
        m.needs = Some(RestoreNeeds {
            arch: "x86_64".into(),
            cgroup: Some(CgroupMode::V2),
            cpu_features: ["avx2", "avx512f"].map(String::from).into(),
            external_mounts: vec!["/data".into()],
        });
        // From JSON, as a manifest holds it: the record may grow fields this test does not set.
        m.gpu = Some(
            serde_json::from_value(json!({
                "mode": "driver-api",
                "processes": [{"pid": 10, "ns_pid": 1, "evidence": "maps libcuda.so.1", "bytes": 1u64 << 30, "gpu_minors": [0]}],
                "gpus": [gpu_info(0, H100, "GPU-aaaa")],
                "driver_version": "580.65.06",
                "cuda_driver_version": "13.0",
                "bytes_total": 1u64 << 30,
                "devices": {"devices": [{"path": "/dev/nvidia0", "type": "c", "major": 195, "minor": 0}]},
            }))
            .unwrap(),
        );
        m
    }

    fn codes(ds: &[Difference]) -> Vec<&'static str> {
        ds.iter().map(Difference::code).collect()
    }

    fn judged(m: &Manifest, n: &NodeFacts, spec: &Value) -> Verdict {
        judge(m, n, Some(&container_on(n, spec)), false)
    }

    fn without_devices(mut s: Value) -> Value {
        s["linux"]["devices"] = json!([]);
        s
    }

    #[test]
    fn the_same_node_and_container_are_compatible() {
        let verdict = judged(&manifest(), &node(), &spec());
        assert_eq!(verdict, Verdict::default(), "{verdict:?}");
        assert!(verdict.compatible() && verdict.clone().into_result().is_ok());
        // An old checkpoint without `needs`, and a CPU container: nothing to compare but CRIU.
        let mut m = crate::manifest::sample();
        m.criu.version = "4.2.0".into();
        m.kernel = "6.8.0".into();
        assert_eq!(judge(&m, &node(), None, false), Verdict::default());
    }

    /// Each hard mismatch alone, named with both sides.
    #[test]
    fn each_mismatch_alone_is_named_with_both_sides() {
        type Edit = Box<dyn Fn(&mut Manifest, &mut NodeFacts, &mut Value)>;
        let cases: Vec<(&str, Edit, &[&str])> = vec![
            ("arch", Box::new(|_, n, _| n.arch = "aarch64".into()), &["\"x86_64\"", "\"aarch64\""]),
            ("criu-version", Box::new(|_, n, _| n.criu = Ok(v(4, 1, 1))), &["CRIU 4.2.0", "CRIU 4.1.1"]),
            (
                "criu-missing",
                Box::new(|_, n, _| n.criu = Err("criu not found: searched /usr/sbin/criu".into())),
                &["CRIU 4.2.0", "criu not found"],
            ),
            (
                "criu-cuda-plugin",
                Box::new(|m, n, _| {
                    m.gpu.as_mut().unwrap().mode = GpuMode::CriuPlugin;
                    n.cuda_plugin_missing = vec!["CRIU's cuda_plugin.so (in /usr/lib/criu)".into()];
                }),
                &["CRIU's CUDA plugin", "cuda_plugin.so"],
            ),
            (
                "cpu-features",
                Box::new(|_, n, _| assert!(n.cpu_features.remove("avx512f"))),
                &["[avx512f]", "lacks them"],
            ),
            ("cgroup-mode", Box::new(|_, n, _| n.cgroup = Some(CgroupMode::V1)), &["cgroup v2", "cgroup v1"]),
            (
                "gpu-driver-missing",
                Box::new(|_, n, _| n.gpus.driver_version = None),
                &["driver 580.65.06 (CUDA 13.0)", "no NVIDIA driver"],
            ),
            (
                "gpu-driver-version",
                Box::new(|_, n, _| n.gpus.driver_version = Some("570.133.20".into())),
                &["580.65.06 (CUDA 13.0)", "570.133.20 (CUDA 12.8)"],
            ),
            (
                "gpu-model",
                Box::new(|_, n, _| n.gpus.gpus[0].model = A100.into()),
                &["checkpoint taken on \"NVIDIA H100 80GB HBM3\", this node has \"NVIDIA A100-SXM4-80GB\""],
            ),
            (
                "gpu-node-count",
                Box::new(|_, n, _| n.gpus.gpus.push(gpu_info(1, H100, "GPU-bbbb"))),
                &["1 GPU(s) [NVIDIA H100 80GB HBM3]", "this node has 2"],
            ),
            (
                "gpu-count",
                Box::new(|_, _, s| *s = without_devices(s.clone())),
                &["the checkpoint used 1 GPU (/dev/nvidia0); this container has none (its spec requests no GPU"],
            ),
            (
                "gpu-request",
                Box::new(|_, _, s| s["process"] = json!({"env": ["NVIDIA_VISIBLE_DEVICES=3"]})),
                &["its NVIDIA_VISIBLE_DEVICES=3", "GPU \"3\""],
            ),
            (
                "gpu-remap-driver",
                Box::new(|m, n, _| {
                    m.gpu.as_mut().unwrap().driver_version = Some("570.133.20".into());
                    n.gpus.driver_version = Some("570.133.20".into());
                    n.gpus.gpus[0].uuid = "GPU-bbbb".into();
                }),
                &["GPU-aaaa → GPU-bbbb", "needs NVIDIA driver ≥ 580 (CUDA 13.0), this node has 570.133.20"],
            ),
            (
                "gpu-remap",
                Box::new(|_, n, s| {
                    // Two GPUs given where the checkpoint used one: the driver maps every GPU.
                    n.gpus.gpus[0].uuid = "GPU-bbbb".into();
                    n.gpus.gpus.push(gpu_info(1, H100, "GPU-cccc"));
                    s["linux"]["devices"]
                        .as_array_mut()
                        .unwrap()
                        .push(json!({"path": "/dev/nvidia1", "type": "c", "major": 195, "minor": 1}));
                }),
                &["cannot move onto this container's GPUs", "GPU-cccc"],
            ),
            ("mounts", Box::new(|_, _, s| s["mounts"] = json!([])), &["at /data", "none there"]),
        ];
        for (code, edit, both_sides) in &cases {
            let (mut m, mut n, mut s) = (manifest(), node(), spec());
            edit(&mut m, &mut n, &mut s);
            // The node-count case also differs node-wide; only its own code is asked for then.
            let verdict = judged(&m, &n, &s);
            let got = codes(&verdict.mismatches);
            let expected: &[&str] = if *code == "gpu-remap" { &["gpu-node-count", "gpu-remap"] } else { &[*code] };
            assert_eq!(got, expected, "{code}: {verdict:#?}");
            let d = verdict.mismatches.iter().find(|d| d.code() == *code).unwrap();
            let text = d.to_string();
            eprintln!("{text}");
            assert!(text.starts_with(&format!("{code}: ")), "{text}");
            let json = serde_json::to_string(d).unwrap();
            for side in *both_sides {
                assert!(text.contains(side) || json.contains(side), "{code}: {side:?} not in {text} / {json}");
            }
            let err = verdict.into_result().unwrap_err().to_string();
            assert!(err.contains(&format!("{code}: ")), "{err}");
        }
    }

    #[test]
    fn several_mismatches_are_all_named_at_once() {
        let (m, mut n) = (manifest(), node());
        n.arch = "aarch64".into();
        n.criu = Ok(v(4, 1, 0));
        n.cpu_features.clear();
        n.cgroup = Some(CgroupMode::Hybrid);
        n.gpus = NodeGpus::default();
        let s = json!({"mounts": []});
        let verdict = judged(&m, &n, &s);
        assert_eq!(
            codes(&verdict.mismatches),
            [
                "criu-version",
                "arch",
                "cpu-features",
                "cgroup-mode",
                "mounts",
                "gpu-driver-missing",
                "gpu-node-count",
                "gpu-count"
            ],
            "{verdict:#?}"
        );
        let err = verdict.into_result().unwrap_err();
        let text = err.to_string();
        assert!(text.starts_with("8 mismatch(es): criu-version: "), "{text}");
        for code in ["arch: ", "; cpu-features: ", "; gpu-count: "] {
            assert!(text.contains(code), "{code} not in {text}");
        }
    }

    #[test]
    fn newer_tools_and_other_kernels_are_only_warnings() {
        let (m, mut n) = (manifest(), node());
        n.criu = Ok(v(4, 3, 0));
        n.kernel = "6.18.1".into();
        n.gpus.driver_version = Some("590.10".into());
        n.cpu_features.insert("amx_tile".into());
        let verdict = judged(&m, &n, &spec());
        assert!(verdict.compatible(), "{verdict:#?}");
        assert_eq!(codes(&verdict.warnings), ["criu-version", "kernel", "gpu-driver-version"]);
        assert!(verdict.warnings[0].message().contains("newer"), "{}", verdict.warnings[0]);
        // An older kernel is a warning too (CRIU checks features, not releases), said as such.
        n.kernel = "5.15.0".into();
        let verdict = judged(&m, &n, &spec());
        assert!(verdict.compatible());
        assert!(verdict.warnings[1].message().contains("an older kernel"), "{}", verdict.warnings[1]);
        // Another GPU of the same model on a driver that remaps: a warning that says so.
        let mut n = node();
        n.gpus.gpus[0].uuid = "GPU-bbbb".into();
        let verdict = judged(&m, &n, &spec());
        assert!(verdict.compatible(), "{verdict:#?}");
        assert_eq!(codes(&verdict.warnings), ["gpu-remap-driver"]);
        assert!(verdict.warnings[0].message().contains("remaps the CUDA state"), "{}", verdict.warnings[0]);
        // cgroups left alone by the checkpoint: another mode is a warning.
        let mut m = manifest();
        m.options.cgroups_mode = "ignore".into();
        let mut n = node();
        n.cgroup = Some(CgroupMode::V1);
        let verdict = judged(&m, &n, &spec());
        assert!(verdict.compatible() && codes(&verdict.warnings) == ["cgroup-mode"], "{verdict:#?}");
    }

    /// `allow_gpu_mismatch` lets other models and node GPU counts through (as the shim's GPU
    /// check), never fewer GPUs for the container or a missing driver.
    #[test]
    fn allowing_a_gpu_mismatch_turns_only_models_and_node_counts_into_warnings() {
        let (m, mut n) = (manifest(), node());
        n.gpus.gpus[0].model = A100.into();
        n.gpus.gpus.push(gpu_info(1, A100, "GPU-cccc"));
        assert_eq!(codes(&judged(&m, &n, &spec()).mismatches), ["gpu-node-count"]);
        let allowed = judge(&m, &n, Some(&container_on(&n, &spec())), true);
        assert!(allowed.compatible() && codes(&allowed.warnings) == ["gpu-node-count"], "{allowed:#?}");
        // Same count: the model names both.
        n.gpus.gpus.pop();
        let refused = judged(&m, &n, &spec());
        assert_eq!(codes(&refused.mismatches), ["gpu-model"]);
        assert_eq!(
            refused.mismatches[0].message(),
            format!(
                "checkpoint taken on \"NVIDIA H100 80GB HBM3\", this node has \"NVIDIA A100-SXM4-80GB\": CUDA state \
                 only fits the GPU model it was taken on; {ALLOW_GPU_HINT}"
            )
        );
        assert!(judge(&m, &n, Some(&container_on(&n, &spec())), true).compatible());
        n.gpus = NodeGpus::default();
        let s = without_devices(spec());
        let still = judge(&m, &n, Some(&container_on(&n, &s)), true);
        assert_eq!(codes(&still.mismatches), ["gpu-driver-missing", "gpu-count"], "{still:#?}");
    }

    /// The same answers as the shim's GPU checks (`check_compatible`, `check_gpu_count`,
    /// `gpu_pairs`) that still run after it: the verdict only comes first, with everything else.
    #[test]
    fn the_verdict_agrees_with_the_shims_gpu_checks() {
        let m = manifest();
        let rec = m.gpu.as_ref().unwrap();
        let nodes = [
            vec![],
            vec![gpu_info(0, H100, "x")],
            vec![gpu_info(0, A100, "y")],
            vec![gpu_info(0, H100, "x"), gpu_info(1, H100, "z")],
        ];
        for node_gpus in nodes {
            let mut n = node();
            n.gpus.gpus = node_gpus.clone();
            let verdict = judge(&m, &n, None, false);
            let refused = verdict.mismatches.iter().any(|d| matches!(d.code(), "gpu-model" | "gpu-node-count"));
            assert_eq!(refused, gpu::check_compatible(&rec.gpus, &node_gpus).is_err(), "{node_gpus:?}: {verdict:#?}");
        }
        let s = without_devices(spec());
        let e = gpu::check_gpu_count(rec, &s, &gpu::gpu_request(&s)).unwrap_err();
        let verdict = judged(&m, &node(), &s);
        assert_eq!(codes(&verdict.mismatches), ["gpu-count"]);
        assert_eq!(verdict.mismatches[0].message(), e.to_string(), "in the shim's own words");
    }

    #[test]
    fn the_json_shape() {
        let mut n = node();
        n.arch = "aarch64".into();
        n.kernel = "6.9.0".into();
        let value = serde_json::to_value(judged(&manifest(), &n, &spec())).unwrap();
        assert_eq!(value["compatible"], false);
        assert_eq!(value["mismatches"][0]["code"], "arch");
        assert_eq!(value["mismatches"][0]["checkpoint"], "x86_64");
        assert_eq!(value["mismatches"][0]["node"], "aarch64");
        assert!(value["mismatches"][0]["message"].as_str().unwrap().starts_with("checkpoint taken on \"x86_64\""));
        assert_eq!(value["warnings"][0]["code"], "kernel");
        assert_eq!(
            serde_json::to_value(Verdict::default()).unwrap(),
            json!({"compatible": true, "mismatches": [], "warnings": []})
        );
    }

    /// A manifest without `needs` (older shims) reads; one with it round-trips.
    #[test]
    fn needs_are_optional_in_the_manifest() {
        let m = manifest();
        let text = serde_json::to_string(&m).unwrap();
        assert_eq!(serde_json::from_str::<Manifest>(&text).unwrap(), m);
        let mut v = serde_json::to_value(&m).unwrap();
        v.as_object_mut().unwrap().remove("needs");
        assert_eq!(serde_json::from_value::<Manifest>(v).unwrap().needs, None);
        let partial: RestoreNeeds = serde_json::from_str(r#"{"arch": "x86_64"}"#).unwrap();
        assert_eq!(partial, RestoreNeeds { arch: "x86_64".into(), ..Default::default() });
    }

    #[test]
    fn cpu_features_keep_instruction_sets_only() {
        let x86 =
            "processor\t: 0\nflags\t\t: fpu vme hypervisor sse4_2 avx2 avx512f constant_tsc\nbugs\t: spectre_v1\n\
                   processor\t: 1\nflags\t\t: fpu\n";
        let got: Vec<String> = cpu_features(x86, "x86_64").into_iter().collect();
        assert_eq!(got, ["avx2", "avx512f", "fpu", "sse4_2"]);
        let arm = "processor\t: 0\nFeatures\t: fp asimd aes sve\n";
        assert_eq!(cpu_features(arm, "aarch64").len(), 4);
        assert!(cpu_features("", "x86_64").is_empty());
    }

    #[test]
    fn external_mounts_are_bind_mounts_and_declared_ones() {
        let spec = json!({"mounts": [
            {"destination": "/proc", "type": "proc", "source": "proc"},
            {"destination": "/data/", "type": "bind", "source": "/srv"},
            {"destination": "/etc/hosts", "type": "none", "source": "/h", "options": ["rbind", "ro"]},
            {"destination": 7}
        ]});
        let config = "# ours\nexternal mnt[/usr/lib/libcuda.so.1]:/usr/lib/libcuda.so.1\nexternal mnt[notapath]:x\n";
        assert_eq!(external_mounts(&spec, Some(config)), ["/data", "/etc/hosts", "/usr/lib/libcuda.so.1"]);
        assert!(external_mounts(&Value::Null, None).is_empty());
    }

    /// The container's side, from a spec: its mounts, its GPUs, its GPU request resolved (or not).
    #[test]
    fn container_facts_from_a_spec() {
        let dir = tempfile::tempdir().unwrap();
        let n = node();
        let c = container_on(&n, &spec());
        assert!(c.mounts.contains("/data") && c.mounts.contains("/proc"), "{c:?}");
        let given = GivenGpu { path: "/dev/nvidia0".into(), minor: 0, model: H100.into(), uuid: "GPU-aaaa".into() };
        assert_eq!(c.gpus, [given]);
        let spec = json!({"mounts": [{"destination": "/data//", "type": "bind"}], "process": {"env": ["NVIDIA_VISIBLE_DEVICES=3"]}});
        let c = ContainerFacts::from_spec(&spec, &[dir.path()], dir.path(), dir.path(), &NodeGpus::default());
        assert!(c.mounts.contains("/data"), "{c:?}");
        assert_eq!(c.request, "its NVIDIA_VISIBLE_DEVICES=3");
        assert!(c.gpu_error.as_deref().is_some_and(|e| e.contains("\"3\"")), "{c:?}");
        let c = ContainerFacts::from_spec(&json!({}), &[dir.path()], dir.path(), dir.path(), &NodeGpus::default());
        assert_eq!((c.gpus.len(), c.gpu_error, c.request.as_str()), (0, None, "its spec, which requests no GPU"));
    }

    /// Time to verdict on this node: gathering its facts and judging (no GPU here; CRIU's version
    /// given). The goal is well under 100 ms; asserted loosely.
    #[test]
    fn the_verdict_is_fast() {
        let started = Instant::now();
        let node = NodeFacts::gather(&NodeSources::system(None), Ok(v(4, 2, 0)));
        let container = ContainerFacts::from_spec(
            &json!({"mounts": [{"destination": "/data", "type": "bind"}]}),
            &[],
            Path::new("/proc"),
            Path::new("/dev"),
            &node.gpus,
        );
        let verdict = judge(&manifest(), &node, Some(&container), false);
        let took = started.elapsed();
        eprintln!(
            "time to verdict: {took:?} ({} mismatch(es), {} warning(s))",
            verdict.mismatches.len(),
            verdict.warnings.len()
        );
        assert!(took.as_secs() < 2, "{took:?}");
        assert!(!node.arch.is_empty() && !node.kernel.is_empty());
        assert!(node.cgroup.is_some(), "this node mounts cgroups at /sys/fs/cgroup");
    }
}
