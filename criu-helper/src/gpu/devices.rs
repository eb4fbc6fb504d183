//! CONTRACT STUB (helper B replaces this file).
use std::path::Path;

use super::GpuDevices;

pub fn record(_spec: &serde_json::Value, _container_root: &Path, _container_mountinfo: &str, _host_mountinfo: &str) -> GpuDevices { GpuDevices::default() }

pub fn inject(_spec: &mut serde_json::Value, _gpu: &GpuDevices) -> Vec<String> { Vec::new() }
