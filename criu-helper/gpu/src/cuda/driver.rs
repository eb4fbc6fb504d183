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
}

impl ProcessState {
    /// From the driver's `CU_PROCESS_STATE_*` value.
    pub fn from_raw(raw: i32) -> Option<Self> {
        Some(match raw {
            0 => Self::Running,
            1 => Self::Locked,
            2 => Self::Checkpointed,
            3 => Self::Failed,
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
        }
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
    /// `cuCheckpointProcessUnlock`: lets a locked process make CUDA calls again.
    fn unlock(&self, pid: i32) -> Result<(), CudaError>;
    /// `cuCheckpointProcessGetState`.
    fn state(&self, pid: i32) -> Result<ProcessState, CudaError>;
    /// `cuCheckpointProcessGetRestoreThreadId`.
    fn restore_thread_id(&self, pid: i32) -> Result<i32, CudaError>;
}
