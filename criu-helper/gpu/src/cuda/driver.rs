//! The CUDA driver's checkpoint API as a trait, so the orchestration can be tested with a
//! recording double and run against `libcuda.so.1` (loaded at run time, see `libcuda.rs`).

use serde::{Deserialize, Serialize};

/// `CUprocessState`: where a process is in the driver's checkpoint cycle.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ProcessState {
    Running,
    Locked,
    Checkpointed,
    Failed,
    /// A checkpoint is under way (newer drivers report it while device memory moves).
    Checkpointing,
    /// A restore is under way (newer drivers).
    Restoring,
}

impl ProcessState {
    /// From the driver's `CU_PROCESS_STATE_*` value.
    pub fn from_raw(raw: i32) -> Option<Self> {
        Some(match raw {
            0 => Self::Running,
            1 => Self::Locked,
            2 => Self::Checkpointed,
            3 => Self::Failed,
            4 => Self::Checkpointing,
            5 => Self::Restoring,
            _ => return None,
        })
    }

    /// The word NVIDIA's `cuda-checkpoint --get-state` prints.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Running => "running",
            Self::Locked => "locked",
            Self::Checkpointed => "checkpointed",
            Self::Failed => "failed",
            Self::Checkpointing => "checkpointing",
            Self::Restoring => "restoring",
        }
    }

    /// A state the driver passes through while a checkpoint or restore runs.
    pub fn is_transient(self) -> bool {
        matches!(self, Self::Checkpointing | Self::Restoring)
    }
}

impl std::fmt::Display for ProcessState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A driver call that returned an error (`CUresult` != 0).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{call}{}: {name} ({code})", if *pid > 0 { format!(" (pid {pid})") } else { String::new() })]
pub struct CudaError {
    /// The driver function, e.g. `cuCheckpointProcessLock`.
    pub call: &'static str,
    /// The process it was called for (0 when none).
    pub pid: i32,
    /// The `CUresult`.
    pub code: i32,
    /// `cuGetErrorName`'s text (e.g. `CUDA_ERROR_TIMEOUT`), or the number when unknown.
    pub name: String,
}

/// `CUDA_ERROR_INVALID_VALUE`: for a pid, no such process (or no CUDA in it).
pub const CUDA_ERROR_INVALID_VALUE: i32 = 1;
/// `CUDA_ERROR_NOT_INITIALIZED`: the process has no CUDA context.
pub const CUDA_ERROR_NOT_INITIALIZED: i32 = 3;
/// `CUDA_ERROR_NOT_SUPPORTED`.
pub const CUDA_ERROR_NOT_SUPPORTED: i32 = 801;
/// The first driver whose restore takes GPU pairs (CUDA 13.0, driver r580).
pub const REMAP_MIN_DRIVER: i32 = 13000;

impl CudaError {
    /// The driver's answer for a process without a CUDA context (CRIU's CUDA plugin and NVIDIA's
    /// tools skip such processes on either code of `cuCheckpointProcessGetRestoreThreadId`).
    pub fn means_no_cuda(&self) -> bool {
        matches!(self.code, CUDA_ERROR_INVALID_VALUE | CUDA_ERROR_NOT_INITIALIZED)
    }
}

/// One GPU of a restore's remapping: the checkpoint's GPU (by UUID) and the GPU the process's
/// state goes to.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct GpuPair {
    /// e.g. "GPU-5a3c0f1e-…" as recorded at checkpoint.
    pub old: String,
    /// The assigned GPU's UUID.
    pub new: String,
}

impl std::fmt::Display for GpuPair {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}={}", self.old, self.new)
    }
}

/// The 16 bytes of a `CUuuid` from "GPU-xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx" (the `GPU-` prefix
/// and dashes optional, case ignored); None for anything else (e.g. a MIG id).
pub fn parse_gpu_uuid(text: &str) -> Option<[u8; 16]> {
    let hex: String = text.strip_prefix("GPU-").unwrap_or(text).chars().filter(|&c| c != '-').collect();
    if hex.len() != 32 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    let mut out = [0u8; 16];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).ok()?;
    }
    Some(out)
}

/// The calls of the CUDA driver's process checkpoint API (CUDA 12.8+, driver r570+) we use.
/// Pids are host pids (the caller's pid namespace).
pub trait CudaDriver: Send + Sync {
    /// `cuDriverGetVersion`: e.g. 12080 for CUDA 12.8.
    fn driver_version(&self) -> Result<i32, CudaError>;
    /// `cuCheckpointProcessLock`: blocks further CUDA calls of `pid`, waiting up to
    /// `timeout_ms` (0 = no limit) for its submitted work to finish.
    fn lock(&self, pid: i32, timeout_ms: u32) -> Result<(), CudaError>;
    /// `cuCheckpointProcessCheckpoint`: moves the device memory of a locked process into host memory.
    fn checkpoint(&self, pid: i32) -> Result<(), CudaError>;
    /// `cuCheckpointProcessRestore`: moves a checkpointed process's memory back to the GPU.
    fn restore(&self, pid: i32) -> Result<(), CudaError>;
    /// `cuCheckpointProcessRestore` with GPU pairs (CUDA 13.0+): the process's state moves from
    /// each `old` GPU onto its `new` one. No pairs is [`restore`](Self::restore). A driver that
    /// cannot remap refuses before any call (this default).
    fn restore_onto(&self, pid: i32, pairs: &[GpuPair]) -> Result<(), CudaError> {
        if pairs.is_empty() {
            return self.restore(pid);
        }
        Err(CudaError {
            call: "cuCheckpointProcessRestore",
            pid,
            code: CUDA_ERROR_NOT_SUPPORTED,
            name: "this driver cannot restore onto other GPUs".into(),
        })
    }
    /// `cuCheckpointProcessUnlock`: lets a locked process make CUDA calls again.
    fn unlock(&self, pid: i32) -> Result<(), CudaError>;
    /// `cuCheckpointProcessGetState`.
    fn state(&self, pid: i32) -> Result<ProcessState, CudaError>;
    /// `cuCheckpointProcessGetRestoreThreadId`.
    fn restore_thread_id(&self, pid: i32) -> Result<i32, CudaError>;
}
