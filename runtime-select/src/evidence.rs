//! GPU evidence: what in an OCI spec says the container wants NVIDIA GPUs.
//!
//! The rules follow what the NVIDIA container toolkit itself reacts to, so that
//! a bundle we send to runc is one nvidia-container-runtime would not have
//! changed either (see docs/architecture.md, "Runtime selection").

use std::fmt;
use std::path::{Component, Path, PathBuf};

use oci_spec::runtime::{LinuxDeviceType, Spec};
use serde::Serialize;

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
pub fn collect(spec: &Spec) -> Vec<Evidence> {
    let mut found = Vec::new();

    if let Some(value) = spec.process().as_ref().and_then(|p| env_value(p.env().as_deref()?, NVIDIA_VISIBLE_DEVICES)) {
        match value.trim() {
            "" | "void" => {}
            "none" => found.push(Evidence::DriverOnly),
            _ => found.push(Evidence::VisibleDevices { value: value.to_string() }),
        }
    }

    if let Some(annotations) = spec.annotations() {
        let mut keys: Vec<&String> = annotations.keys().filter(|k| k.starts_with(CDI_ANNOTATION_PREFIX)).collect();
        keys.sort();
        for key in keys {
            for device in annotations[key].split(',').map(str::trim) {
                if cdi_kind(device) == Some(CDI_NVIDIA_GPU_KIND) {
                    found.push(Evidence::CdiDevice { annotation: key.clone(), device: device.to_string() });
                }
            }
        }
    }

    if let Some(devices) = spec.linux().as_ref().and_then(|l| l.devices().as_ref()) {
        for d in devices {
            let char_195 = d.major() == NVIDIA_MAJOR && matches!(d.typ(), LinuxDeviceType::C | LinuxDeviceType::U);
            if char_195 || is_nvidia_dev_node(d.path()) {
                found.push(Evidence::DeviceNode { path: d.path().clone(), major: d.major() });
            }
        }
    }

    if let Some(mounts) = spec.mounts() {
        for m in mounts {
            let hit = |p: &Path| is_nvidia_dev_node(p) || DEVICE_LIST_DIRS.iter().any(|dir| is_strictly_under(p, dir));
            if hit(m.destination()) || m.source().as_deref().is_some_and(hit) {
                found.push(Evidence::Mount { source: m.source().clone(), destination: m.destination().clone() });
            }
        }
    }

    found
}

/// The value of `key` in an OCI env list. The last entry wins, as in the NVIDIA
/// toolkit (which builds a map from the list).
pub fn env_value<'a>(env: &'a [String], key: &str) -> Option<&'a str> {
    env.iter().rev().find_map(|kv| kv.strip_prefix(key)?.strip_prefix('='))
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
        let env = vec!["NVIDIA_VISIBLE_DEVICES=all".to_string(), "NVIDIA_VISIBLE_DEVICES=void".to_string()];
        assert_eq!(env_value(&env, NVIDIA_VISIBLE_DEVICES), Some("void"));
        let env = vec!["NVIDIA_VISIBLE_DEVICES_X=1".to_string()];
        assert_eq!(env_value(&env, NVIDIA_VISIBLE_DEVICES), None);
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
