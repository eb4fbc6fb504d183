//! CUDA-aware checkpointing: which processes of a container use CUDA, the driver's checkpoint
//! API (loaded at run time, no build-time CUDA dependency), the lock → checkpoint → … → restore
//! → unlock cycle around CRIU, and the preconditions of CRIU's own CUDA plugin.

pub mod driver;
pub mod libcuda;

pub use driver::{CudaDriver, CudaError, ProcessState};
pub use libcuda::{LibCuda, LoadError};
