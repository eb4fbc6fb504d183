//! GPU containers through a checkpoint and a restore, for Kybernate: the node's GPUs (for the
//! compatibility check), the NVIDIA device nodes, devices-cgroup rules and driver mounts of the
//! running container (recorded, to compare), what a restored container's own spec gives it
//! (nvidia-container-runtime edits the spec only on `create`, so a `restore` through it would get
//! none of them; [`assign`]), and the CUDA state of its processes ([`cuda`]).
//!
//! The lowest of Kybernate's checkpoint crates: it knows nothing of checkpoints, stores or
//! manifests; `kybernate-checkpoint` records a [`GpuRecord`] in its manifest.

pub mod assign;
pub mod cdi;
pub mod cuda;
pub mod devices;
pub mod inventory;
pub mod record;

pub use assign::{
    check_gpu_count, gpu_pairs, gpu_request, gpus_by_minor, node_device_access, own_devices, recorded_gpus,
    AssignmentError, GpuRequest, OwnDevicesError, Resolution, VisibleDevices, NVIDIA_GPU_KIND,
};
pub use cdi::{cdi_device_names, resolve_cdi, resolve_cdi_for_kind, CdiError, CDI_DIRS};
pub use devices::{inject, record};
pub use inventory::{check_compatible, node_gpus, GpuMismatch, NodeGpus};
pub use record::{
    CudaProcessRecord, DeviceNode, DeviceRule, GpuDevices, GpuInfo, GpuMode, GpuRecord, MountRecord, SkippedProcess,
};
