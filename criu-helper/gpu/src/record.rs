//! What a checkpoint records about a GPU container (the manifest's `gpu` section): the mode, the
//! node's GPUs, the container's device access and its CUDA processes. A record is evidence for
//! compatibility checks and reports, never a grant (see [`crate::assign`]).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::cuda::ProcessState;

/// How the CUDA state of a checkpoint was handled.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum GpuMode {
    /// We drove the driver's checkpoint API ourselves around CRIU.
    DriverApi,
    /// CRIU's `cuda_plugin.so` did it (through `cuda-checkpoint`).
    CriuPlugin,
    /// A GPU container without CUDA processes at checkpoint time: only its devices are recorded.
    None,
}

impl GpuMode {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::DriverApi => "driver-api",
            Self::CriuPlugin => "criu-plugin",
            Self::None => "none",
        }
    }
}

/// One GPU of a node, in the driver's order (by PCI bus id).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct GpuInfo {
    /// Position in the node's order (0-based).
    pub index: u32,
    /// e.g. "NVIDIA H100 80GB HBM3".
    pub model: String,
    /// e.g. "GPU-5a3c…".
    pub uuid: String,
    /// PCI bus location, e.g. "0000:18:00.0".
    pub bus_id: String,
    /// Minor number of its `/dev/nvidiaN` node.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub minor: Option<u32>,
}

/// A device node the container had (`linux.devices` entry shape).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceNode {
    /// Path in the container, e.g. "/dev/nvidia0".
    pub path: String,
    /// "c" or "b".
    #[serde(rename = "type")]
    pub kind: String,
    pub major: i64,
    pub minor: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub file_mode: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uid: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gid: Option<u32>,
}

/// A devices-cgroup rule (`linux.resources.devices` entry shape).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceRule {
    pub allow: bool,
    #[serde(rename = "type", default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub major: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub minor: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub access: Option<String>,
}

/// A driver mount (`mounts` entry shape), with its host source.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MountRecord {
    pub destination: String,
    pub source: String,
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(default)]
    pub options: Vec<String>,
}

/// The NVIDIA device access of a container (recorded at checkpoint, or resolved for a restored
/// container from its own request).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct GpuDevices {
    #[serde(default)]
    pub devices: Vec<DeviceNode>,
    #[serde(default)]
    pub rules: Vec<DeviceRule>,
    #[serde(default)]
    pub mounts: Vec<MountRecord>,
    /// CDI device names the container asked for (`cdi.k8s.io/*` annotations), e.g. "nvidia.com/gpu=0".
    #[serde(default)]
    pub cdi_devices: Vec<String>,
}

impl GpuDevices {
    pub fn is_empty(&self) -> bool {
        self.devices.is_empty() && self.rules.is_empty() && self.mounts.is_empty() && self.cdi_devices.is_empty()
    }
}

/// One CUDA process of a checkpoint.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CudaProcessRecord {
    /// Host pid at checkpoint time.
    pub pid: i32,
    /// Pid inside the container's pid namespace: CRIU restores it, so it finds the process again.
    pub ns_pid: i32,
    /// Why it counts as a CUDA process ("/dev/nvidiactl open", "maps libcuda.so.1").
    pub evidence: String,
    /// Driver state before we touched it, and after the GPU checkpoint (driver-api).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state_before: Option<ProcessState>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state_checkpointed: Option<ProcessState>,
    /// Host memory the process grew by during the GPU checkpoint (its device memory, staged in RAM).
    #[serde(default)]
    pub bytes: u64,
    /// Minors of the `/dev/nvidiaN` nodes it holds open (which GPUs it uses).
    #[serde(default)]
    pub gpu_minors: Vec<u32>,
}

/// A process that holds NVIDIA devices (or maps libcuda) but that the driver says has no CUDA
/// context — a forked data-loader worker, an NVML-only sidecar. It is not locked or
/// checkpointed (the real driver refuses it); CRIU dumps it like any other process.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SkippedProcess {
    /// Host pid at checkpoint time.
    pub pid: i32,
    /// Pid inside the container's pid namespace.
    pub ns_pid: i32,
    /// Why it looked like a CUDA process ("/dev/nvidiactl open").
    pub evidence: String,
    /// The driver's answer to `cuCheckpointProcessGetRestoreThreadId`, e.g.
    /// "CUDA_ERROR_NOT_INITIALIZED (3)".
    pub driver_answer: String,
}

/// The manifest's `gpu` section.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GpuRecord {
    pub mode: GpuMode,
    #[serde(default)]
    pub processes: Vec<CudaProcessRecord>,
    /// Candidates the driver said have no CUDA context (not checkpointed through the driver).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub skipped: Vec<SkippedProcess>,
    /// The node's GPUs at checkpoint time, in order.
    #[serde(default)]
    pub gpus: Vec<GpuInfo>,
    /// NVIDIA kernel driver version, e.g. "580.65.06".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub driver_version: Option<String>,
    /// CUDA driver API version, e.g. "12.8".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cuda_driver_version: Option<String>,
    /// Device memory moved, by GPU UUID ("unknown" when a process's GPU could not be told).
    #[serde(default)]
    pub bytes_per_gpu: BTreeMap<String, u64>,
    #[serde(default)]
    pub bytes_total: u64,
    /// Milliseconds per phase: "gpu-lock", "gpu-checkpoint", "criu-dump", "gpu-restore", "gpu-unlock".
    #[serde(default)]
    pub phases_ms: BTreeMap<String, u64>,
    /// Device nodes, cgroup rules and driver mounts the container had. Untrusted at restore (anyone
    /// who can edit a checkpoint controls it): only its GPU count is used, never its contents.
    #[serde(default)]
    pub devices: GpuDevices,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Manifests written before `skipped` existed still read; an empty list is not written.
    #[test]
    fn skipped_processes_are_optional_in_the_manifest() {
        let old: GpuRecord = serde_json::from_str(r#"{"mode": "driver-api", "processes": []}"#).unwrap();
        assert!(old.skipped.is_empty());
        assert!(!serde_json::to_string(&old).unwrap().contains("skipped"));
        let mut new = old;
        new.skipped.push(SkippedProcess {
            pid: 4712,
            ns_pid: 8,
            evidence: "/dev/nvidiactl open".into(),
            driver_answer: "CUDA_ERROR_NOT_INITIALIZED (3)".into(),
        });
        let back: GpuRecord = serde_json::from_str(&serde_json::to_string(&new).unwrap()).unwrap();
        assert_eq!(back, new);
    }
}
