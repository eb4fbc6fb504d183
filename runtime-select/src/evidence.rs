//! GPU evidence: what in an OCI spec says the container wants NVIDIA GPUs.
//!
//! The rules follow what the NVIDIA container toolkit itself reacts to, so that
//! a bundle we send to runc is one nvidia-container-runtime would not have
//! changed either (see docs/architecture.md, "Runtime selection").

use std::fmt;
use std::path::{Component, Path, PathBuf};

use serde::Serialize;

use crate::spec::SpecView;

/// The env var the NVIDIA toolkit reads to pick GPUs.
pub const NVIDIA_VISIBLE_DEVICES: &str = "NVIDIA_VISIBLE_DEVICES";
/// Annotation prefix of Container Device Interface device requests.
pub const CDI_ANNOTATION_PREFIX: &str = "cdi.k8s.io/";
/// The CDI kind (`vendor/class`) of NVIDIA GPUs.
pub const CDI_NVIDIA_GPU_KIND: &str = "nvidia.com/gpu";
/// Character-device major of `/dev/nvidia[0-9]*` and `/dev/nvidiactl`.
pub const NVIDIA_MAJOR: i64 = 195;
/// Where the toolkit's volume-mount device list strategy mounts its markers.
const DEVICE_LIST_DIRS: [&str; 2] = ["/var/run/nvidia-container-devices", "/run/nvidia-container-devices"];

/// One item of GPU evidence found in a spec.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Evidence {
    /// `NVIDIA_VISIBLE_DEVICES` names GPUs (`all`, indices, UUIDs, MIG ids).
    VisibleDevices { value: String },
    /// `NVIDIA_VISIBLE_DEVICES=none`: no GPUs, but the toolkit still injects the
    /// driver libraries and utilities, so the GPU runtime is wanted.
    DriverOnly,
    /// A `cdi.k8s.io/*` annotation requesting an `nvidia.com/gpu` device.
    CdiDevice { annotation: String, device: String },
    /// A `linux.devices` entry for an NVIDIA device node.
    DeviceNode { path: PathBuf, major: i64 },
    /// A mount of an NVIDIA device node or device-list marker.
    Mount { source: Option<PathBuf>, destination: PathBuf },
}

impl Evidence {
    /// Whether this item means the container gets GPU devices (`none` does not).
    pub fn wants_gpu_devices(&self) -> bool {
        !matches!(self, Evidence::DriverOnly)
    }
}

impl fmt::Display for Evidence {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Evidence::VisibleDevices { value } => write!(f, "env {NVIDIA_VISIBLE_DEVICES}={value}"),
            Evidence::DriverOnly => write!(
                f,
                "env {NVIDIA_VISIBLE_DEVICES}=none: no GPUs, driver libraries only (GPU runtime wanted for driver injection)"
            ),
            Evidence::CdiDevice { annotation, device } => write!(f, "annotation {annotation} requests CDI device {device}"),
            Evidence::DeviceNode { path, major } => write!(f, "linux.devices: {} (major {major})", path.display()),
            Evidence::Mount { source, destination } => match source {
                Some(s) => write!(f, "mount {} -> {}", s.display(), destination.display()),
                None => write!(f, "mount -> {}", destination.display()),
            },
        }
    }
}

/// Collects every item of GPU evidence in `spec`, in a stable order
/// (env, annotations sorted by key, devices, mounts).
pub fn collect(spec: &SpecView) -> Vec<Evidence> {
    let mut found = Vec::new();

    if let Some(value) = spec.env_value(NVIDIA_VISIBLE_DEVICES) {
        match value.trim() {
            "" | "void" => {}
            "none" => found.push(Evidence::DriverOnly),
            _ => found.push(Evidence::VisibleDevices { value: value.to_string() }),
        }
    }

    let mut cdi: Vec<(&str, &str)> = spec.annotations().filter(|(k, _)| k.starts_with(CDI_ANNOTATION_PREFIX)).collect();
    cdi.sort();
    for (key, value) in cdi {
        for device in value.split(',').map(str::trim) {
            if cdi_kind(device) == Some(CDI_NVIDIA_GPU_KIND) {
                found.push(Evidence::CdiDevice { annotation: key.to_string(), device: device.to_string() });
            }
        }
    }

    for d in spec.devices() {
        // Character devices only: `c` and `u` (unbuffered) are both char devices to runc.
        let char_195 = d.major == Some(NVIDIA_MAJOR) && matches!(d.typ, "c" | "u");
        if char_195 || is_nvidia_dev_node(Path::new(d.path)) {
            found.push(Evidence::DeviceNode { path: PathBuf::from(d.path), major: d.major.unwrap_or(0) });
        }
    }

    for m in spec.mounts() {
        let hit = |p: &Path| is_nvidia_dev_node(p) || DEVICE_LIST_DIRS.iter().any(|dir| is_strictly_under(p, dir));
        if hit(Path::new(m.destination)) || m.source.map(Path::new).is_some_and(hit) {
            found.push(Evidence::Mount {
                source: m.source.map(PathBuf::from),
                destination: PathBuf::from(m.destination),
            });
        }
    }

    found
}

/// `vendor/class` of a fully qualified CDI device name `vendor/class=name`.
fn cdi_kind(device: &str) -> Option<&str> {
    let (kind, name) = device.split_once('=')?;
    let (vendor, class) = kind.split_once('/')?;
    (!vendor.is_empty() && !class.is_empty() && !name.is_empty()).then_some(kind)
}

/// `/dev/nvidia*` (after lexical normalisation, so `/dev/./nvidia0` counts and
/// `/dev/nvidia0/../sda` does not).
fn is_nvidia_dev_node(p: &Path) -> bool {
    let n = normalize(p);
    n.parent() == Some(Path::new("/dev"))
        && n.file_name().and_then(|f| f.to_str()).is_some_and(|f| f.starts_with("nvidia"))
}

fn is_strictly_under(p: &Path, dir: &str) -> bool {
    let n = normalize(p);
    n != Path::new(dir) && n.starts_with(dir)
}

/// Resolves `.` and `..` lexically; relative paths are taken from `/`, as the
/// runtime does for mount destinations.
fn normalize(p: &Path) -> PathBuf {
    let mut out = PathBuf::from("/");
    for c in p.components() {
        match c {
            Component::Normal(s) => out.push(s),
            Component::ParentDir => {
                out.pop();
            }
            Component::RootDir | Component::CurDir | Component::Prefix(_) => {}
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn env_last_entry_wins() {
        let spec = |env: serde_json::Value| SpecView::from_value(serde_json::json!({"process": {"env": env}}));
        let s = spec(serde_json::json!(["NVIDIA_VISIBLE_DEVICES=all", "NVIDIA_VISIBLE_DEVICES=void"]));
        assert_eq!(s.env_value(NVIDIA_VISIBLE_DEVICES), Some("void"));
        assert!(collect(&s).is_empty());
        let s = spec(serde_json::json!(["NVIDIA_VISIBLE_DEVICES_X=1"]));
        assert_eq!(s.env_value(NVIDIA_VISIBLE_DEVICES), None);
    }

    #[test]
    fn cdi_names() {
        assert_eq!(cdi_kind("nvidia.com/gpu=0"), Some("nvidia.com/gpu"));
        assert_eq!(cdi_kind("nvidia.com/gpu=all"), Some("nvidia.com/gpu"));
        assert_eq!(cdi_kind("vendor.com/fpga=1"), Some("vendor.com/fpga"));
        assert_eq!(cdi_kind("nvidia.com/gpu"), None);
        assert_eq!(cdi_kind("nvidia.com/gpu="), None);
        assert_eq!(cdi_kind("/gpu=0"), None);
    }

    #[test]
    fn dev_node_paths() {
        assert!(is_nvidia_dev_node(Path::new("/dev/nvidia0")));
        assert!(is_nvidia_dev_node(Path::new("/dev/nvidia-uvm")));
        assert!(is_nvidia_dev_node(Path::new("/dev/./nvidiactl")));
        assert!(!is_nvidia_dev_node(Path::new("/dev/nvidia0/../sda")));
        assert!(!is_nvidia_dev_node(Path::new("/dev/dri/card0")));
        assert!(!is_nvidia_dev_node(Path::new("/home/dev/nvidia0")));
    }

    #[test]
    fn device_list_dir_must_be_strictly_under() {
        assert!(is_strictly_under(Path::new("/var/run/nvidia-container-devices/GPU-1"), DEVICE_LIST_DIRS[0]));
        assert!(!is_strictly_under(Path::new("/var/run/nvidia-container-devices"), DEVICE_LIST_DIRS[0]));
        assert!(!is_strictly_under(Path::new("/var/run/nvidia-container-devices-x/a"), DEVICE_LIST_DIRS[0]));
    }
}
