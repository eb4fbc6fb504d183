//! A restored container's own GPU assignment, and how many GPUs a checkpoint needs.
//!
//! A checkpoint is untrusted input: whoever can import one, or edit one and recompute its sums,
//! controls its manifest's record of devices and driver mounts. containerd's CVE-2026-53492 was
//! exactly that (CDI edits from checkpoint metadata re-applied at restore: host devices and
//! mounts for a pod that never asked for them). So what a restored container gets comes from
//! its own spec, as containerd/CRI created it — its `cdi.k8s.io/*` annotations, else its
//! `NVIDIA_VISIBLE_DEVICES` (what the GPU runtime would have resolved at create) — and the
//! record is only counted: CUDA state taken on N GPUs cannot come back on fewer.

use std::collections::BTreeMap;
use std::path::Path;

use serde_json::Value;

use super::cdi::{cdi_device_names, parse_qualified_name, resolve_cdi, resolve_cdi_for_kind, CdiError};
use super::cuda::GpuPair;
use super::devices::{device_node_from_metadata, is_nvidia_device, spec_devices, NVIDIA_MAJOR};
use super::inventory::node_gpus;
use super::{DeviceNode, DeviceRule, GpuDevices, GpuInfo, GpuRecord};

/// The CDI kind of NVIDIA GPUs, as `nvidia-ctk cdi generate` names it.
pub const NVIDIA_GPU_KIND: &str = "nvidia.com/gpu";
/// The variable through which a container asks the NVIDIA toolkit for GPUs.
pub const VISIBLE_DEVICES_ENV: &str = "NVIDIA_VISIBLE_DEVICES";
/// Control nodes a GPU container gets besides its `/dev/nvidiaN` (those the host has).
pub const CONTROL_NODES: [&str; 4] = ["nvidiactl", "nvidia-uvm", "nvidia-uvm-tools", "nvidia-modeset"];

/// The GPUs `NVIDIA_VISIBLE_DEVICES` asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VisibleDevices {
    All,
    /// Indices, UUIDs (or fully-qualified CDI names), in order, without duplicates.
    List(Vec<String>),
}

impl VisibleDevices {
    /// The CDI names the GPU runtime's CDI mode turns them into (`nvidia.com/gpu=<each>`; a
    /// name that is already fully qualified stays as it is).
    pub fn cdi_names(&self) -> Vec<String> {
        match self {
            Self::All => vec![format!("{NVIDIA_GPU_KIND}=all")],
            Self::List(entries) => entries
                .iter()
                .map(|e| if parse_qualified_name(e).is_some() { e.clone() } else { format!("{NVIDIA_GPU_KIND}={e}") })
                .collect(),
        }
    }
}

/// What a container's own spec asks for, in the GPU runtime's order of precedence.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GpuRequest {
    /// CDI device names of its `cdi.k8s.io/*` annotations.
    Cdi(Vec<String>),
    /// `NVIDIA_VISIBLE_DEVICES` naming GPUs: its value as given, and what it names.
    VisibleDevices { value: String, wanted: VisibleDevices },
    /// Neither; `visible` is an `NVIDIA_VISIBLE_DEVICES` that asks for no GPU (empty, void, none).
    Nothing { visible: Option<String> },
}

/// The container's request: its CDI annotations, else its `NVIDIA_VISIBLE_DEVICES`.
pub fn gpu_request(spec: &Value) -> GpuRequest {
    let names = cdi_device_names(spec);
    if !names.is_empty() {
        return GpuRequest::Cdi(names);
    }
    match visible_devices_value(spec) {
        Some(value) => match parse_visible_devices(&value) {
            Some(wanted) => GpuRequest::VisibleDevices { value, wanted },
            None => GpuRequest::Nothing { visible: Some(value) },
        },
        None => GpuRequest::Nothing { visible: None },
    }
}

/// The value of `NVIDIA_VISIBLE_DEVICES` in the spec's `process.env`; the last entry wins, as
/// in the process's environment. Entries that are not strings are ignored.
pub fn visible_devices_value(spec: &Value) -> Option<String> {
    let env = spec.get("process")?.get("env")?.as_array()?;
    env.iter()
        .rev()
        .filter_map(Value::as_str)
        .filter_map(|e| e.split_once('='))
        .find(|(k, _)| *k == VISIBLE_DEVICES_ENV)
        .map(|(_, v)| v.to_string())
}

/// What a value of `NVIDIA_VISIBLE_DEVICES` asks for: `None` for no GPU (empty, "void",
/// "none"), else "all" or the comma-separated entries (trimmed; "all" among them means all).
pub fn parse_visible_devices(value: &str) -> Option<VisibleDevices> {
    let value = value.trim();
    if value.is_empty() || value == "void" || value == "none" {
        return None;
    }
    let mut entries: Vec<String> = Vec::new();
    for e in value.split(',').map(str::trim).filter(|e| !e.is_empty()) {
        if e == "all" {
            return Some(VisibleDevices::All);
        }
        if !entries.iter().any(|x| x == e) {
            entries.push(e.to_string());
        }
    }
    if entries.is_empty() {
        return None;
    }
    Some(VisibleDevices::List(entries))
}

/// Why a container's own GPU assignment cannot be given, or does not fit the checkpoint.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AssignmentError {
    /// The checkpoint's CUDA state was taken on more GPUs than the container has.
    #[error("{message}")]
    FewerGpus {
        /// The GPUs the checkpoint used (device paths), by minor.
        used: Vec<String>,
        /// The GPUs the container has.
        has: Vec<String>,
        message: String,
    },
    /// `NVIDIA_VISIBLE_DEVICES` names a GPU this node cannot give (no such GPU, no device node).
    #[error("{message}")]
    UnknownGpu { entry: String, message: String },
    /// The CUDA state cannot move onto the assigned GPUs: another count or another model.
    #[error("{message}")]
    Remap {
        /// The checkpoint's GPUs, "UUID (model)".
        recorded: Vec<String>,
        /// The container's assigned GPUs, "UUID (model)".
        assigned: Vec<String>,
        message: String,
    },
    /// Moving CUDA state onto other GPUs needs a driver this node does not have.
    #[error("{message}")]
    RemapDriver { message: String },
}

/// GPUs by device minor, with the path shown for each.
pub type GpuSet = BTreeMap<u32, String>;

/// The GPU a device node stands for: its minor, when it is a character device of major 195
/// named `nvidia<digits>` (`/dev/nvidiactl`, `/dev/nvidia-uvm` and the like are not GPUs).
pub fn gpu_minor(dev: &DeviceNode) -> Option<u32> {
    let name = dev.path.rsplit('/').next()?;
    let digits = name.strip_prefix("nvidia")?;
    let numbered = !digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit());
    if !numbered || !matches!(dev.kind.as_str(), "c" | "u") || dev.major != NVIDIA_MAJOR {
        return None;
    }
    u32::try_from(dev.minor).ok()
}

/// The GPUs among `devices`; where two nodes share a minor, the one at `/dev/nvidia<minor>` is
/// shown, else the first.
pub fn gpus_of(devices: &[DeviceNode]) -> GpuSet {
    let mut out = GpuSet::new();
    for d in devices {
        let Some(minor) = gpu_minor(d) else { continue };
        let canonical = d.path == format!("/dev/nvidia{minor}");
        match out.get(&minor) {
            Some(shown) if !canonical || *shown == d.path => {}
            _ => {
                out.insert(minor, d.path.clone());
            }
        }
    }
    out
}

/// The GPUs a checkpoint used: its recorded GPU device nodes and the GPUs its CUDA processes
/// held open.
pub fn recorded_gpus(record: &GpuRecord) -> GpuSet {
    let mut out = gpus_of(&record.devices.devices);
    for minor in record.processes.iter().flat_map(|p| &p.gpu_minors) {
        out.entry(*minor).or_insert_with(|| format!("/dev/nvidia{minor}"));
    }
    out
}

/// Refuses a restore into a container (`spec`: its config.json with its own assignment given)
/// that has fewer GPUs than the checkpoint used, naming both; more is fine.
pub fn check_gpu_count(record: &GpuRecord, spec: &Value, request: &GpuRequest) -> Result<(), AssignmentError> {
    let used = recorded_gpus(record);
    let own = spec_devices(spec);
    let has = gpus_of(&own);
    if has.len() >= used.len() {
        return Ok(());
    }
    let list = |s: &GpuSet| s.values().cloned().collect::<Vec<_>>();
    let (used, has) = (list(&used), list(&has));
    let plural = if used.len() == 1 { "" } else { "s" };
    let this = if has.is_empty() {
        format!("none ({})", why_none(&own, request))
    } else {
        format!("{} ({})", has.len(), has.join(", "))
    };
    let message = format!(
        "the checkpoint used {} GPU{plural} ({}); this container has {this}: its CUDA state cannot be restored onto \
         fewer GPUs; restore it into a container whose own spec requests at least {}",
        used.len(),
        used.join(", "),
        used.len(),
    );
    Err(AssignmentError::FewerGpus { used, has, message })
}

/// Why a container has no GPU, from what its spec asks for.
fn why_none(own: &[DeviceNode], request: &GpuRequest) -> String {
    let nvidia: Vec<&str> = own.iter().filter(|d| is_nvidia_device(d)).map(|d| d.path.as_str()).collect();
    let devices = if nvidia.is_empty() {
        "no NVIDIA device".to_string()
    } else {
        format!("no NVIDIA GPU device (only {})", nvidia.join(", "))
    };
    match request {
        GpuRequest::Nothing { visible: None } => {
            format!("its spec requests no GPU: {devices}, no cdi.k8s.io annotation, no {VISIBLE_DEVICES_ENV}")
        }
        GpuRequest::Nothing { visible: Some(v) } => {
            format!("its spec requests no GPU: {devices}, no cdi.k8s.io annotation, {VISIBLE_DEVICES_ENV}={v:?}")
        }
        GpuRequest::Cdi(names) => {
            format!("its cdi.k8s.io annotations ask for {}, which give no NVIDIA GPU device node", names.join(", "))
        }
        GpuRequest::VisibleDevices { value, .. } => {
            format!("its {VISIBLE_DEVICES_ENV}={value:?} gives no NVIDIA GPU device node on this node")
        }
    }
}

/// How a container's own GPU request was resolved, for the log line of a restore.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Resolution {
    /// It asks for no GPU.
    Nothing,
    /// Its CDI names, through the CDI specs.
    Cdi,
    /// Its `NVIDIA_VISIBLE_DEVICES`, as these CDI names, through the CDI specs.
    VisibleDevicesAsCdi(Vec<String>),
    /// Its `NVIDIA_VISIBLE_DEVICES`, as this node's device nodes (no CDI spec declares the kind).
    NodeDevices,
}

/// Why a container's own GPU request cannot be resolved on this node.
#[derive(Debug, thiserror::Error)]
pub enum OwnDevicesError {
    #[error(transparent)]
    Cdi(#[from] CdiError),
    #[error(transparent)]
    Assignment(#[from] AssignmentError),
}

/// The device access a container's own request means on this node, as the GPU runtime would
/// have given it at create: its CDI names resolved through the CDI specs in `cdi_dirs`; its
/// `NVIDIA_VISIBLE_DEVICES` as `nvidia.com/gpu=<each>` through them where they declare that
/// kind, else as this node's device nodes ([`node_device_access`]). Nothing comes from a
/// checkpoint. The shim injects the result at a restore; the CLI checks a spec with it.
pub fn own_devices(
    request: &GpuRequest,
    cdi_dirs: &[&Path],
    proc_root: &Path,
    dev_root: &Path,
) -> Result<(GpuDevices, Resolution), OwnDevicesError> {
    match request {
        GpuRequest::Nothing { .. } => Ok((GpuDevices::default(), Resolution::Nothing)),
        GpuRequest::Cdi(names) => Ok((resolve_cdi(names, cdi_dirs)?, Resolution::Cdi)),
        GpuRequest::VisibleDevices { wanted, .. } => {
            let names = wanted.cdi_names();
            if let Some(devices) = resolve_cdi_for_kind(&names, cdi_dirs, NVIDIA_GPU_KIND)? {
                return Ok((devices, Resolution::VisibleDevicesAsCdi(names)));
            }
            Ok((node_device_access(wanted, proc_root, dev_root)?, Resolution::NodeDevices))
        }
    }
}

/// The device access `wanted` means on this node without CDI specs: each GPU's `/dev/nvidia<minor>`
/// (index or UUID → minor through the driver's `<proc_root>/driver/nvidia/gpus`, the node in
/// `dev_root`) and the control nodes `dev_root` has, each with an allow rule. No driver mounts:
/// without CDI there is no trusted list of them (the checkpoint's record is not one).
///
/// `proc_root` and `dev_root` are `/proc` and `/dev` in production. A GPU the node does not
/// have, or whose device node is missing, is an error: the GPU runtime would refuse it at create.
pub fn node_device_access(
    wanted: &VisibleDevices,
    proc_root: &Path,
    dev_root: &Path,
) -> Result<GpuDevices, AssignmentError> {
    let node = node_gpus(proc_root);
    let gpus: Vec<(String, &super::GpuInfo)> = match wanted {
        VisibleDevices::All => node.gpus.iter().map(|g| (g.index.to_string(), g)).collect(),
        VisibleDevices::List(entries) => {
            let mut out = Vec::new();
            for e in entries {
                let found = if e.bytes().all(|b| b.is_ascii_digit()) {
                    e.parse::<u32>().ok().and_then(|i| node.gpus.iter().find(|g| g.index == i))
                } else {
                    node.gpus.iter().find(|g| !g.uuid.is_empty() && g.uuid.eq_ignore_ascii_case(e))
                };
                let Some(gpu) = found else {
                    let known: Vec<String> = node.gpus.iter().map(|g| format!("{} {}", g.index, g.uuid)).collect();
                    let mig = if e.contains(':') || e.starts_with("MIG-") {
                        " (MIG devices cannot be checkpointed or restored)"
                    } else {
                        ""
                    };
                    return Err(AssignmentError::UnknownGpu {
                        entry: e.clone(),
                        message: format!(
                            "{VISIBLE_DEVICES_ENV} names GPU {e:?}, which this node does not have{mig}; its GPUs by \
                             index and UUID (from {}): {}",
                            proc_root.join("driver/nvidia/gpus").display(),
                            if known.is_empty() { "none".to_string() } else { known.join(", ") }
                        ),
                    });
                };
                out.push((e.clone(), gpu));
            }
            out
        }
    };
    let mut devices: Vec<DeviceNode> = Vec::new();
    for (entry, gpu) in gpus {
        let unknown = |why: String| AssignmentError::UnknownGpu {
            entry: entry.clone(),
            message: format!("{VISIBLE_DEVICES_ENV}: GPU {entry:?} ({} at {}): {why}", gpu.uuid, gpu.bus_id),
        };
        let Some(minor) = gpu.minor else {
            return Err(unknown(format!(
                "the driver's {} gives no device minor, so its device node is unknown",
                proc_root.join("driver/nvidia/gpus").join(&gpu.bus_id).join("information").display()
            )));
        };
        let name = format!("nvidia{minor}");
        let Some(dev) = host_node(dev_root, &name) else {
            return Err(unknown(format!("{} is not a character device on this node", dev_root.join(&name).display())));
        };
        if !devices.iter().any(|d| d.path == dev.path) {
            devices.push(dev);
        }
    }
    if !devices.is_empty() {
        devices.extend(CONTROL_NODES.iter().filter_map(|name| host_node(dev_root, name)));
    }
    let mut rules: Vec<DeviceRule> = Vec::new();
    for d in &devices {
        let rule = DeviceRule {
            allow: true,
            kind: Some("c".to_string()),
            major: Some(d.major),
            minor: Some(d.minor),
            access: Some("rwm".to_string()),
        };
        if !rules.contains(&rule) {
            rules.push(rule);
        }
    }
    Ok(GpuDevices { devices, rules, mounts: Vec::new(), cdi_devices: Vec::new() })
}

/// The GPU pairs (recorded UUID → assigned UUID) that move a checkpoint's CUDA state onto the
/// GPUs a restored container was given (`assigned`: the node's inventory entries of its GPUs).
///
/// Empty when nothing moves: every GPU the checkpoint used is among the assigned ones (the
/// driver restores onto the same GPUs), or the record cannot tell its GPUs' UUIDs (a checkpoint
/// of a node without the driver's inventory; logged by the caller). Otherwise the map is
/// complete — the driver wants every GPU of the process mapped — pairing the recorded GPUs in
/// minor order with the assigned ones in minor order; the counts must be equal and each pair of
/// the same model (the driver restores onto the same chip only).
pub fn gpu_pairs(record: &GpuRecord, assigned: &[GpuInfo]) -> Result<Vec<GpuPair>, AssignmentError> {
    let used = recorded_gpus(record);
    let mut recorded: Vec<&GpuInfo> = Vec::new();
    for minor in used.keys() {
        match record.gpus.iter().find(|g| g.minor == Some(*minor) && !g.uuid.is_empty()) {
            Some(g) => recorded.push(g),
            None => return Ok(Vec::new()),
        }
    }
    if recorded.is_empty() || recorded.iter().all(|r| assigned.iter().any(|a| a.uuid.eq_ignore_ascii_case(&r.uuid))) {
        return Ok(Vec::new());
    }
    let mut assigned: Vec<&GpuInfo> = assigned.iter().collect();
    assigned.sort_by_key(|g| g.minor);
    let show = |g: &[&GpuInfo]| g.iter().map(|g| format!("{} ({})", g.uuid, g.model)).collect::<Vec<_>>();
    let (r_text, a_text) = (show(&recorded), show(&assigned));
    let refuse = |why: String| AssignmentError::Remap {
        recorded: r_text.clone(),
        assigned: a_text.clone(),
        message: format!(
            "the checkpoint's CUDA state cannot move onto this container's GPUs: {why}; the checkpoint used [{}], \
             this container has [{}]",
            r_text.join(", "),
            a_text.join(", ")
        ),
    };
    if recorded.len() != assigned.len() {
        return Err(refuse(format!(
            "it was taken on {} GPU(s) and this container has {} (remapping needs the same count)",
            recorded.len(),
            assigned.len()
        )));
    }
    let mut pairs = Vec::new();
    for (r, a) in recorded.iter().zip(&assigned) {
        if r.model != a.model {
            return Err(refuse(format!(
                "{} is a {} and {} a {} (the same model is needed)",
                r.uuid, r.model, a.uuid, a.model
            )));
        }
        pairs.push(GpuPair { old: r.uuid.clone(), new: a.uuid.clone() });
    }
    Ok(pairs)
}

/// The node's inventory entries of the GPUs among `devices` (by minor), in minor order.
pub fn gpus_by_minor(devices: &[DeviceNode], node: &[GpuInfo]) -> Vec<GpuInfo> {
    gpus_of(devices).keys().filter_map(|m| node.iter().find(|g| g.minor == Some(*m)).cloned()).collect()
}

/// `<dev_root>/<name>` as the container's `/dev/<name>`, when it is a character device (the
/// host's /dev is trusted: a symlink there is followed).
fn host_node(dev_root: &Path, name: &str) -> Option<DeviceNode> {
    let md = std::fs::metadata(dev_root.join(name)).ok()?;
    device_node_from_metadata(&format!("/dev/{name}"), &md)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{CudaProcessRecord, GpuMode};
    use serde_json::json;
    use std::fs;

    fn node(path: &str, kind: &str, major: i64, minor: i64) -> DeviceNode {
        DeviceNode { path: path.into(), kind: kind.into(), major, minor, file_mode: None, uid: None, gid: None }
    }

    fn record(devices: Vec<DeviceNode>, process_minors: Vec<Vec<u32>>) -> GpuRecord {
        GpuRecord {
            mode: GpuMode::DriverApi,
            skipped: vec![],
            processes: process_minors
                .into_iter()
                .map(|gpu_minors| CudaProcessRecord {
                    pid: 1,
                    ns_pid: 1,
                    evidence: String::new(),
                    state_before: None,
                    state_checkpointed: None,
                    bytes: 0,
                    gpu_minors,
                })
                .collect(),
            gpus: vec![],
            driver_version: None,
            cuda_driver_version: None,
            bytes_per_gpu: Default::default(),
            bytes_total: 0,
            phases_ms: Default::default(),
            devices: GpuDevices { devices, ..GpuDevices::default() },
        }
    }

    fn env_spec(env: Value) -> Value {
        json!({"process": {"env": env}})
    }

    fn list(v: &[&str]) -> Option<VisibleDevices> {
        Some(VisibleDevices::List(v.iter().map(|s| s.to_string()).collect()))
    }

    #[test]
    fn visible_devices_values() {
        for none in ["", "  ", "void", "none", ",", " , "] {
            assert_eq!(parse_visible_devices(none), None, "{none:?}");
        }
        assert_eq!(parse_visible_devices("all"), Some(VisibleDevices::All));
        assert_eq!(parse_visible_devices("0,all"), Some(VisibleDevices::All));
        assert_eq!(parse_visible_devices("0"), list(&["0"]));
        assert_eq!(parse_visible_devices(" 0 , GPU-5a3c,,1,0 "), list(&["0", "GPU-5a3c", "1"]));
        assert_eq!(
            parse_visible_devices("1,nvidia.com/gpu=GPU-x").unwrap().cdi_names(),
            vec!["nvidia.com/gpu=1".to_string(), "nvidia.com/gpu=GPU-x".to_string()]
        );
        assert_eq!(VisibleDevices::All.cdi_names(), vec!["nvidia.com/gpu=all".to_string()]);
    }

    #[test]
    fn visible_devices_from_the_process_env_last_entry_wins() {
        let spec = env_spec(json!(["PATH=/bin", "NVIDIA_VISIBLE_DEVICES=0", 5, "NVIDIA_VISIBLE_DEVICES", "x=y"]));
        assert_eq!(visible_devices_value(&spec).as_deref(), Some("0"));
        let spec = env_spec(json!(["NVIDIA_VISIBLE_DEVICES=0", "NVIDIA_VISIBLE_DEVICES=void"]));
        assert_eq!(gpu_request(&spec), GpuRequest::Nothing { visible: Some("void".into()) });
        let spec = env_spec(json!(["NVIDIA_VISIBLE_DEVICES_X=0", "MY_NVIDIA_VISIBLE_DEVICES=1"]));
        assert_eq!(gpu_request(&spec), GpuRequest::Nothing { visible: None });
        for odd in [json!(null), json!({}), json!({"process": 1}), json!({"process": {"env": "A=1"}}), json!([1])] {
            assert_eq!(gpu_request(&odd), GpuRequest::Nothing { visible: None }, "{odd}");
        }
        let spec = env_spec(json!(["NVIDIA_VISIBLE_DEVICES=all"]));
        assert_eq!(gpu_request(&spec), GpuRequest::VisibleDevices { value: "all".into(), wanted: VisibleDevices::All });
        // CDI annotations come first, as in the GPU runtime.
        let mut spec = env_spec(json!(["NVIDIA_VISIBLE_DEVICES=all"]));
        spec["annotations"] = json!({"cdi.k8s.io/gpu": "nvidia.com/gpu=1"});
        assert_eq!(gpu_request(&spec), GpuRequest::Cdi(vec!["nvidia.com/gpu=1".into()]));
    }

    #[test]
    fn gpus_are_numbered_char_nodes_of_major_195() {
        assert_eq!(gpu_minor(&node("/dev/nvidia0", "c", 195, 0)), Some(0));
        assert_eq!(gpu_minor(&node("/dev/nvidia12", "u", 195, 12)), Some(12));
        assert_eq!(gpu_minor(&node("/tmp/x/dev/nvidia3", "c", 195, 3)), Some(3), "ctr run --device keeps host paths");
        for not_gpu in [
            node("/dev/nvidiactl", "c", 195, 255),
            node("/dev/nvidia-modeset", "c", 195, 254),
            node("/dev/nvidia-uvm", "c", 508, 0),
            node("/dev/nvidia", "c", 195, 0),
            node("/dev/nvidia1", "c", 1, 3),
            node("/dev/nvidia1", "b", 195, 1),
            node("/dev/nvidia1x", "c", 195, 1),
            node("/dev/nvidia1", "c", 195, -1),
            node("/dev/sda", "b", 8, 0),
        ] {
            assert_eq!(gpu_minor(&not_gpu), None, "{not_gpu:?}");
        }
    }

    #[test]
    fn a_checkpoint_used_its_gpu_nodes_and_its_processes_gpus() {
        let r = record(
            vec![
                node("/tmp/x/dev/nvidia0", "c", 195, 0),
                node("/dev/nvidia0", "c", 195, 0),
                node("/dev/nvidiactl", "c", 195, 255),
                node("/dev/nvidia-uvm", "c", 508, 0),
                node("/dev/nvidia1", "c", 1, 3),
                node("/dev/sda", "b", 8, 0),
            ],
            vec![vec![0, 2], vec![], vec![2]],
        );
        let used = recorded_gpus(&r);
        assert_eq!(used, GpuSet::from([(0, "/dev/nvidia0".to_string()), (2, "/dev/nvidia2".to_string())]));
        assert!(recorded_gpus(&record(vec![], vec![])).is_empty());
    }

    fn spec_with(devices: Value, request: Value) -> Value {
        let mut spec = json!({"linux": {"devices": devices}});
        if let Value::Object(extra) = request {
            spec.as_object_mut().unwrap().extend(extra);
        }
        spec
    }

    #[test]
    fn fewer_gpus_are_refused_naming_both() {
        let two = record(vec![node("/dev/nvidia0", "c", 195, 0), node("/dev/nvidia1", "c", 195, 1)], vec![vec![1]]);
        let spec = spec_with(json!([{"path": "/dev/nvidia3", "type": "c", "major": 195, "minor": 3}]), json!({}));
        let err = check_gpu_count(&two, &spec, &GpuRequest::Cdi(vec!["nvidia.com/gpu=3".into()])).unwrap_err();
        assert!(
            err.to_string().starts_with(
                "the checkpoint used 2 GPUs (/dev/nvidia0, /dev/nvidia1); this container has 1 (/dev/nvidia3): "
            ),
            "{err}"
        );
        assert!(matches!(&err, AssignmentError::FewerGpus { used, has, .. } if used.len() == 2 && has.len() == 1));

        // A CPU container: no GPU request at all.
        let one = record(vec![node("/dev/nvidia0", "c", 195, 0)], vec![]);
        let err = check_gpu_count(&one, &json!({}), &GpuRequest::Nothing { visible: None }).unwrap_err();
        assert!(
            err.to_string().starts_with(
                "the checkpoint used 1 GPU (/dev/nvidia0); this container has none (its spec requests no GPU: no \
                 NVIDIA device, no cdi.k8s.io annotation, no NVIDIA_VISIBLE_DEVICES): "
            ),
            "{err}"
        );
        let ctl = spec_with(json!([{"path": "/dev/nvidiactl", "type": "c", "major": 195, "minor": 255}]), json!({}));
        let err = check_gpu_count(&one, &ctl, &GpuRequest::Nothing { visible: Some("none".into()) }).unwrap_err();
        assert!(
            err.to_string().contains("(its spec requests no GPU: no NVIDIA GPU device (only /dev/nvidiactl), no cdi.k8s.io annotation, NVIDIA_VISIBLE_DEVICES=\"none\")"),
            "{err}"
        );
        let wanted = VisibleDevices::All;
        let err =
            check_gpu_count(&one, &json!({}), &GpuRequest::VisibleDevices { value: "all".into(), wanted }).unwrap_err();
        assert!(
            err.to_string().contains("its NVIDIA_VISIBLE_DEVICES=\"all\" gives no NVIDIA GPU device node"),
            "{err}"
        );

        // As many or more: fine; so is a checkpoint that used none.
        let same = spec_with(
            json!([{"path": "/dev/nvidia5", "type": "c", "major": 195, "minor": 5},
                   {"path": "/dev/nvidia6", "type": "c", "major": 195, "minor": 6}]),
            json!({}),
        );
        assert_eq!(check_gpu_count(&two, &same, &GpuRequest::Nothing { visible: None }), Ok(()));
        assert_eq!(check_gpu_count(&one, &same, &GpuRequest::Nothing { visible: None }), Ok(()));
        assert_eq!(
            check_gpu_count(&record(vec![], vec![]), &json!({}), &GpuRequest::Nothing { visible: None }),
            Ok(())
        );
        // The same GPU twice (ctr's host path and /dev/nvidia0) is one.
        let twice = spec_with(
            json!([{"path": "/tmp/x/dev/nvidia0", "type": "c", "major": 195, "minor": 0},
                   {"path": "/dev/nvidia0", "type": "c", "major": 195, "minor": 0}]),
            json!({}),
        );
        let err = check_gpu_count(&two, &twice, &GpuRequest::Nothing { visible: None }).unwrap_err();
        assert!(err.to_string().contains("this container has 1 (/dev/nvidia0)"), "{err}");
    }

    fn information(uuid: &str, bus: &str, minor: Option<u32>) -> String {
        let minor = minor.map(|m| format!("Device Minor: \t {m}\n")).unwrap_or_default();
        format!("Model: \t\t NVIDIA H100 80GB HBM3\nGPU UUID: \t {uuid}\nBus Location: \t {bus}\n{minor}")
    }

    /// A fake `/proc` with two GPUs (minors 3 and 1, the first without one when `broken`) and a
    /// fake `/dev` with char devices standing in for their nodes (symlinks to /dev/null, which
    /// the host's /dev may hold: they are followed).
    fn node_roots(broken: bool) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        for (bus, uuid, minor) in [("0000:18:00.0", "GPU-aaaa", 3), ("0000:2a:00.0", "GPU-bbbb", 1)] {
            let d = dir.path().join("proc/driver/nvidia/gpus").join(bus);
            fs::create_dir_all(&d).unwrap();
            let minor = (!broken || minor != 3).then_some(minor);
            fs::write(d.join("information"), information(uuid, bus, minor)).unwrap();
        }
        let dev = dir.path().join("dev");
        fs::create_dir_all(&dev).unwrap();
        for name in ["nvidia3", "nvidia1", "nvidiactl", "nvidia-uvm"] {
            std::os::unix::fs::symlink("/dev/null", dev.join(name)).unwrap();
        }
        fs::write(dev.join("nvidia-modeset"), "not a device").unwrap();
        dir
    }

    fn access(wanted: Option<VisibleDevices>, roots: &tempfile::TempDir) -> Result<GpuDevices, AssignmentError> {
        node_device_access(&wanted.unwrap(), &roots.path().join("proc"), &roots.path().join("dev"))
    }

    #[test]
    fn without_cdi_gpus_come_from_the_node_by_index_or_uuid() {
        let roots = node_roots(false);
        let paths = |g: &GpuDevices| g.devices.iter().map(|d| d.path.clone()).collect::<Vec<_>>();
        // Index 1 is the second GPU by bus location: minor 1. Control nodes the host has follow.
        let got = access(list(&["1"]), &roots).unwrap();
        assert_eq!(paths(&got), ["/dev/nvidia1", "/dev/nvidiactl", "/dev/nvidia-uvm"]);
        let null = fs::metadata("/dev/null").unwrap();
        let null_node = device_node_from_metadata("/dev/nvidia1", &null).unwrap();
        assert_eq!((got.devices[0].major, got.devices[0].minor), (null_node.major, null_node.minor));
        // One allow rule per device number (here all are /dev/null's).
        assert_eq!(
            got.rules,
            vec![DeviceRule {
                allow: true,
                kind: Some("c".into()),
                major: Some(null_node.major),
                minor: Some(null_node.minor),
                access: Some("rwm".into()),
            }]
        );
        assert!(got.mounts.is_empty(), "no driver mounts without CDI");
        let got = access(list(&["gpu-aaaa", "0"]), &roots).unwrap();
        assert_eq!(paths(&got), ["/dev/nvidia3", "/dev/nvidiactl", "/dev/nvidia-uvm"], "the same GPU once");
        let got = access(Some(VisibleDevices::All), &roots).unwrap();
        assert_eq!(paths(&got), ["/dev/nvidia3", "/dev/nvidia1", "/dev/nvidiactl", "/dev/nvidia-uvm"]);

        // What this node does not have is refused, naming what it has.
        let err = access(list(&["2"]), &roots).unwrap_err();
        let msg = err.to_string();
        assert!(msg.starts_with("NVIDIA_VISIBLE_DEVICES names GPU \"2\", which this node does not have"), "{msg}");
        assert!(msg.contains("0 GPU-aaaa, 1 GPU-bbbb"), "{msg}");
        let err = access(list(&["MIG-1234"]), &roots).unwrap_err();
        assert!(err.to_string().contains("MIG devices cannot be checkpointed"), "{err}");
        fs::remove_file(roots.path().join("dev/nvidia1")).unwrap();
        let err = access(list(&["GPU-bbbb"]), &roots).unwrap_err();
        assert!(err.to_string().contains("/dev/nvidia1 is not a character device on this node"), "{err}");
        assert!(matches!(err, AssignmentError::UnknownGpu { entry, .. } if entry == "GPU-bbbb"));

        // A GPU whose information file lacks its minor.
        let roots = node_roots(true);
        let err = access(list(&["0"]), &roots).unwrap_err();
        assert!(err.to_string().contains("gives no device minor"), "{err}");

        // A node without the driver: no GPU, no control nodes either.
        let empty = tempfile::tempdir().unwrap();
        let got = node_device_access(&VisibleDevices::All, empty.path(), &roots.path().join("dev")).unwrap();
        assert!(got.is_empty(), "{got:?}");
        let err = node_device_access(&list(&["0"]).unwrap(), empty.path(), empty.path()).unwrap_err();
        assert!(err.to_string().contains("its GPUs by index and UUID"), "{err}");
    }

    fn gpu(minor: u32, uuid: &str, model: &str) -> GpuInfo {
        GpuInfo { index: minor, model: model.into(), uuid: uuid.into(), bus_id: format!("{minor}"), minor: Some(minor) }
    }

    #[test]
    fn pairs_move_the_recorded_gpus_onto_the_assigned_ones() {
        let mut r = record(vec![node("/dev/nvidia0", "c", 195, 0)], vec![vec![0]]);
        r.gpus = vec![gpu(0, "GPU-a", "H100"), gpu(1, "GPU-b", "H100")];
        let pair = |o: &str, n: &str| GpuPair { old: o.into(), new: n.into() };
        // Same GPU: nothing moves.
        assert_eq!(gpu_pairs(&r, &[gpu(0, "GPU-a", "H100")]).unwrap(), []);
        // GPU 1 of this node, or a GPU of another node.
        assert_eq!(gpu_pairs(&r, &[gpu(1, "GPU-b", "H100")]).unwrap(), [pair("GPU-a", "GPU-b")]);
        assert_eq!(gpu_pairs(&r, &[gpu(0, "GPU-x", "H100")]).unwrap(), [pair("GPU-a", "GPU-x")]);
        // Another model, another count: refused naming both sides.
        let e = gpu_pairs(&r, &[gpu(1, "GPU-c", "A100")]).unwrap_err();
        assert!(e.to_string().contains("GPU-a is a H100 and GPU-c a A100"), "{e}");
        assert!(e.to_string().contains("the checkpoint used [GPU-a (H100)], this container has [GPU-c (A100)]"), "{e}");
        let e = gpu_pairs(&r, &[gpu(1, "GPU-b", "H100"), gpu(2, "GPU-c", "H100")]).unwrap_err();
        assert!(
            matches!(&e, AssignmentError::Remap { recorded, assigned, .. } if recorded.len() == 1 && assigned.len() == 2),
            "{e}"
        );

        // Two GPUs, one of them kept: the map is complete, identity included.
        let mut r = record(vec![], vec![vec![0, 1]]);
        r.gpus = vec![gpu(0, "GPU-a", "H100"), gpu(1, "GPU-b", "H100")];
        assert_eq!(
            gpu_pairs(&r, &[gpu(1, "GPU-b", "H100"), gpu(2, "GPU-c", "H100")]).unwrap(),
            [pair("GPU-a", "GPU-b"), pair("GPU-b", "GPU-c")]
        );
        // A record without UUIDs cannot be remapped (and is not refused for it).
        r.gpus.clear();
        assert_eq!(gpu_pairs(&r, &[gpu(5, "GPU-z", "A100")]).unwrap(), []);
        assert_eq!(
            gpus_by_minor(
                &[node("/dev/nvidia1", "c", 195, 1), node("/dev/nvidiactl", "c", 195, 255)],
                &[gpu(1, "GPU-b", "H100")]
            ),
            [gpu(1, "GPU-b", "H100")]
        );
    }
}
