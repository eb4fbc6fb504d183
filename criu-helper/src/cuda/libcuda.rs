//! CONTRACT STUB (helper A replaces this file).
use std::ffi::OsStr;
use std::path::PathBuf;

use super::driver::{CudaDriver, CudaError, ProcessState};

/// The default library name (found by the dynamic loader).
pub const LIBCUDA: &str = "libcuda.so.1";

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("cannot load {path}: {message}")]
    Open { path: PathBuf, message: String },
    #[error("{path} has no {symbol}: the CUDA driver's checkpoint API needs driver r570 or newer (CUDA 12.8)")]
    MissingApi { path: PathBuf, symbol: &'static str },
}

pub struct LibCuda {}

impl LibCuda {
    pub fn load(path: &OsStr) -> Result<Self, LoadError> {
        Err(LoadError::Open { path: path.into(), message: "stub".into() })
    }
}

impl CudaDriver for LibCuda {
    fn driver_version(&self) -> Result<i32, CudaError> { unreachable!() }
    fn lock(&self, _pid: i32, _timeout_ms: u32) -> Result<(), CudaError> { unreachable!() }
    fn checkpoint(&self, _pid: i32) -> Result<(), CudaError> { unreachable!() }
    fn restore(&self, _pid: i32) -> Result<(), CudaError> { unreachable!() }
    fn unlock(&self, _pid: i32) -> Result<(), CudaError> { unreachable!() }
    fn state(&self, _pid: i32) -> Result<ProcessState, CudaError> { unreachable!() }
    fn restore_thread_id(&self, _pid: i32) -> Result<i32, CudaError> { unreachable!() }
}
