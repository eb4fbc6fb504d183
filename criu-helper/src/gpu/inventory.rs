//! CONTRACT STUB (helper B replaces this file).
use std::path::Path;

use super::GpuInfo;

/// The node's NVIDIA driver and GPUs, from `<proc_root>/driver/nvidia/`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NodeGpus {
    pub driver_version: Option<String>,
    pub gpus: Vec<GpuInfo>,
}

pub fn node_gpus(_proc_root: &Path) -> NodeGpus { NodeGpus::default() }

#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct GpuMismatch { pub message: String }

pub fn check_compatible(_recorded: &[GpuInfo], _node: &[GpuInfo]) -> Result<(), GpuMismatch> { Ok(()) }
