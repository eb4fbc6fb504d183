//! CUDA-aware checkpointing: which processes of a container use CUDA, the driver's checkpoint
//! API (loaded at run time, no build-time CUDA dependency), the lock → checkpoint → … → restore
//! → unlock cycle around CRIU, and the preconditions of CRIU's own CUDA plugin.

pub mod driver;
pub mod libcuda;
pub mod preflight;
pub mod procs;
pub mod remote;
pub mod session;

pub use driver::{parse_gpu_uuid, CudaDriver, CudaError, GpuPair, ProcessState, REMAP_MIN_DRIVER};
pub use libcuda::{LibCuda, LoadError};
pub use preflight::{check_criu_plugin, choose, Chosen, ModeError, PluginPreflightError, PluginReady, Wanted};
pub use procs::{find_cuda_processes, find_unsupported, CudaProcess, Unsupported};
pub use remote::{HelperError, RemoteDriver};
pub use session::{restore_processes, rollback, GpuRestoreError, GpuSession, GpuStepError, NotBroughtBack};
