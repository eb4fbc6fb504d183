//! CONTRACT STUB (helper B replaces this file).
use std::path::Path;

use super::GpuDevices;

pub const CDI_DIRS: [&str; 2] = ["/etc/cdi", "/var/run/cdi"];

#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct CdiError { pub message: String }

pub fn cdi_device_names(_spec: &serde_json::Value) -> Vec<String> { Vec::new() }

pub fn resolve_cdi(_names: &[String], _dirs: &[&Path]) -> Result<GpuDevices, CdiError> { Ok(GpuDevices::default()) }
