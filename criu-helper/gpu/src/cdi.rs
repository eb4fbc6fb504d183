//! CDI (Container Device Interface) device names, resolved through the node's CDI spec files.
//!
//! A container that asked for GPUs through CDI (`cdi.k8s.io/*` annotations naming e.g.
//! `nvidia.com/gpu=0`) got its device nodes and driver mounts from the CDI specs in
//! `/etc/cdi` and `/var/run/cdi` at `create`. A restore does not go through that step, so we
//! resolve the same names against the restore node's specs (whose host paths and device numbers
//! are the ones that are valid there) and put the result into the restored spec.
//!
//! Follows the CDI reference implementation (cncf-tags/container-device-interface, pkg/cdi):
//! spec files are the `*.json` and `*.yaml` files (we also take `*.yml`) directly in each
//! directory; a later directory has priority over an earlier one for the same device; two files
//! of the same directory declaring the same device conflict; a device's edits are applied
//! together with its spec's top-level `containerEdits` (once per spec). Only device nodes and
//! mounts are turned into [`GpuDevices`]: env variables and hooks are not replayed at restore.

use std::collections::{BTreeSet, HashMap};
use std::io::Read;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Deserializer};

use super::{DeviceNode, DeviceRule, GpuDevices, MountRecord};

/// CDI spec directories, lowest priority first (as in the CDI reference implementation).
pub const CDI_DIRS: [&str; 2] = ["/etc/cdi", "/var/run/cdi"];

/// Annotation key prefix under which Kubernetes/containerd pass CDI device names.
pub const CDI_ANNOTATION_PREFIX: &str = "cdi.k8s.io/";

/// Spec files beyond this size are not CDI specs we could sensibly use.
const MAX_SPEC_FILE: u64 = 64 << 20;

/// Why CDI device names could not be resolved.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct CdiError {
    /// The device name the error is about, when it is about one.
    pub device: Option<String>,
    pub message: String,
}

impl CdiError {
    fn new(device: Option<&str>, message: String) -> Self {
        Self { device: device.map(str::to_string), message }
    }
}

/// The CDI device names a container spec (config.json as JSON) asks for: the values of every
/// annotation whose key starts with `cdi.k8s.io/`, comma-separated, trimmed, de-duplicated in
/// order. Names that are not fully qualified (`vendor.com/class=name`) are dropped with a warning.
pub fn cdi_device_names(spec: &serde_json::Value) -> Vec<String> {
    let mut names: Vec<String> = Vec::new();
    let Some(annotations) = spec.get("annotations").and_then(|a| a.as_object()) else {
        return names;
    };
    for (key, value) in annotations {
        if !key.starts_with(CDI_ANNOTATION_PREFIX) {
            continue;
        }
        let Some(value) = value.as_str() else {
            log::warn!("annotation {key}: not a string; ignored");
            continue;
        };
        for name in value.split(',').map(str::trim).filter(|n| !n.is_empty()) {
            if parse_qualified_name(name).is_none() {
                log::warn!("annotation {key}: {name:?} is not a fully-qualified CDI device name; ignored");
                continue;
            }
            if !names.iter().any(|n| n == name) {
                names.push(name.to_string());
            }
        }
    }
    names
}

/// Splits `vendor.com/class=name` into its kind (`vendor.com/class`) and device name.
pub fn parse_qualified_name(name: &str) -> Option<(&str, &str)> {
    let (kind, device) = name.split_once('=')?;
    if device.is_empty() || device.contains('=') || !valid_kind(kind) {
        return None;
    }
    Some((kind, device))
}

fn valid_kind(kind: &str) -> bool {
    match kind.split_once('/') {
        Some((vendor, class)) => !vendor.is_empty() && !class.is_empty() && !class.contains('/'),
        None => false,
    }
}

/// Resolves fully-qualified CDI device names through the spec files in `dirs` (lowest priority
/// first, e.g. [`CDI_DIRS`]) into device nodes, devices-cgroup allow rules and mounts, with
/// `cdi_devices` set to the names.
///
/// Malformed spec files are skipped with a warning; they only matter (and are named in the
/// error) when a requested device is then not found. A device node without major/minor numbers
/// takes them from its host path; when that cannot be stat'ed, that is an error.
pub fn resolve_cdi(names: &[String], dirs: &[&Path]) -> Result<GpuDevices, CdiError> {
    let wanted = qualified(names)?;
    if wanted.is_empty() {
        return Ok(GpuDevices::default());
    }
    resolve_in(&Registry::load(dirs), &wanted, dirs)
}

/// [`resolve_cdi`] where some spec in `dirs` declares devices of `kind` (e.g. `nvidia.com/gpu`);
/// `Ok(None)` where none does, so the caller can fall back to another source of devices.
/// The spec files are read once.
pub fn resolve_cdi_for_kind(names: &[String], dirs: &[&Path], kind: &str) -> Result<Option<GpuDevices>, CdiError> {
    let wanted = qualified(names)?;
    let registry = Registry::load(dirs);
    if !registry.specs.iter().any(|s| s.kind == kind) {
        return Ok(None);
    }
    resolve_in(&registry, &wanted, dirs).map(Some)
}

/// The names trimmed, de-duplicated and split into (name, kind); an error for one that is not
/// fully qualified.
fn qualified(names: &[String]) -> Result<Vec<(&str, &str)>, CdiError> {
    let mut wanted: Vec<(&str, &str)> = Vec::new();
    for name in names {
        let name = name.trim();
        if wanted.iter().any(|(n, _)| *n == name) {
            continue;
        }
        let (kind, _device) = parse_qualified_name(name).ok_or_else(|| {
            CdiError::new(
                Some(name),
                format!("invalid CDI device name {name:?}: expected a fully-qualified name like vendor.com/class=name"),
            )
        })?;
        wanted.push((name, kind));
    }
    Ok(wanted)
}

fn resolve_in(registry: &Registry, wanted: &[(&str, &str)], dirs: &[&Path]) -> Result<GpuDevices, CdiError> {
    let mut out = GpuDevices::default();
    let mut used_specs: BTreeSet<usize> = BTreeSet::new();
    let mut skipped = SkippedEdits::default();
    for (name, kind) in wanted {
        let (spec_idx, dev_idx) = registry.lookup(name, kind, dirs)?;
        let Some(spec) = registry.specs.get(spec_idx) else {
            return Err(CdiError::new(Some(name), format!("CDI device {name:?}: internal lookup error")));
        };
        if used_specs.insert(spec_idx) {
            if let Some(edits) = &spec.container_edits {
                apply_edits(&mut out, edits, name, &spec.path, &mut skipped)?;
            }
        }
        if let Some(dev) = spec.devices.get(dev_idx) {
            apply_edits(&mut out, &dev.container_edits, name, &spec.path, &mut skipped)?;
        }
        out.cdi_devices.push((*name).to_string());
    }
    if skipped.env > 0 || skipped.hooks > 0 || skipped.other > 0 {
        log::info!(
            "CDI devices {}: {} env variable(s), {} hook(s) and {} other edit(s) of their specs are not replayed at \
             restore (the restored process keeps its environment; hooks ran at create)",
            out.cdi_devices.join(", "),
            skipped.env,
            skipped.hooks,
            skipped.other,
        );
    }
    Ok(out)
}

#[derive(Default)]
struct SkippedEdits {
    env: usize,
    hooks: usize,
    other: usize,
}

/// One parsed spec file.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct SpecFile {
    #[serde(default)]
    cdi_version: Option<String>,
    kind: String,
    #[serde(default, deserialize_with = "nullable")]
    devices: Vec<CdiDevice>,
    #[serde(default)]
    container_edits: Option<ContainerEdits>,
    #[serde(skip)]
    path: PathBuf,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct CdiDevice {
    name: String,
    #[serde(default, deserialize_with = "nullable")]
    container_edits: ContainerEdits,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct ContainerEdits {
    #[serde(default, deserialize_with = "nullable")]
    env: Vec<serde::de::IgnoredAny>,
    #[serde(default, deserialize_with = "nullable")]
    device_nodes: Vec<CdiDeviceNode>,
    #[serde(default, deserialize_with = "nullable")]
    mounts: Vec<CdiMount>,
    #[serde(default, deserialize_with = "nullable")]
    hooks: Vec<serde::de::IgnoredAny>,
    #[serde(default, deserialize_with = "nullable")]
    additional_gids: Vec<serde::de::IgnoredAny>,
    #[serde(default, deserialize_with = "nullable")]
    net_devices: Vec<serde::de::IgnoredAny>,
    #[serde(default)]
    intel_rdt: Option<serde::de::IgnoredAny>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct CdiDeviceNode {
    path: String,
    #[serde(default)]
    host_path: Option<String>,
    #[serde(rename = "type", default)]
    kind: Option<String>,
    #[serde(default)]
    major: Option<i64>,
    #[serde(default)]
    minor: Option<i64>,
    #[serde(default)]
    permissions: Option<String>,
    #[serde(default)]
    file_mode: Option<u32>,
    #[serde(default)]
    uid: Option<u32>,
    #[serde(default)]
    gid: Option<u32>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct CdiMount {
    host_path: String,
    container_path: String,
    #[serde(rename = "type", default)]
    kind: Option<String>,
    #[serde(default, deserialize_with = "nullable")]
    options: Vec<String>,
}

/// `null` (or an empty YAML value) reads as the default, as Go's decoder treats it.
fn nullable<'de, D, T>(d: D) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
    T: Default + Deserialize<'de>,
{
    Ok(Option::<T>::deserialize(d)?.unwrap_or_default())
}

/// All readable specs of the directories, and which one provides each device.
struct Registry {
    specs: Vec<SpecFile>,
    /// "kind=name" → (spec index, device index, priority).
    devices: HashMap<String, (usize, usize, usize)>,
    /// Same-priority duplicates: "kind=name" → the files declaring it.
    conflicts: HashMap<String, Vec<PathBuf>>,
    /// Files that could not be used, with why.
    skipped: Vec<(PathBuf, String)>,
}

impl Registry {
    fn load(dirs: &[&Path]) -> Self {
        let mut reg =
            Registry { specs: Vec::new(), devices: HashMap::new(), conflicts: HashMap::new(), skipped: Vec::new() };
        for (priority, dir) in dirs.iter().enumerate() {
            for path in spec_files(dir) {
                match read_spec(&path) {
                    Ok(spec) => reg.add(spec, priority),
                    Err(why) => {
                        log::warn!("CDI spec {}: {why}; skipped", path.display());
                        reg.skipped.push((path, why));
                    }
                }
            }
        }
        reg
    }

    fn add(&mut self, spec: SpecFile, priority: usize) {
        let idx = self.specs.len();
        for (dev_idx, dev) in spec.devices.iter().enumerate() {
            let qualified = format!("{}={}", spec.kind, dev.name);
            match self.devices.get(&qualified) {
                Some(&(other, _, other_prio)) if other_prio == priority => {
                    let entry = self.conflicts.entry(qualified).or_default();
                    if entry.is_empty() {
                        entry.extend(self.specs.get(other).map(|s| s.path.clone()));
                    }
                    entry.push(spec.path.clone());
                }
                _ => {
                    // A later (higher-priority) directory overrides; it also clears a conflict
                    // of a lower one.
                    self.conflicts.remove(&qualified);
                    self.devices.insert(qualified, (idx, dev_idx, priority));
                }
            }
        }
        self.specs.push(spec);
    }

    fn lookup(&self, name: &str, kind: &str, dirs: &[&Path]) -> Result<(usize, usize), CdiError> {
        if let Some(files) = self.conflicts.get(name) {
            let files: Vec<String> = files.iter().map(|p| p.display().to_string()).collect();
            return Err(CdiError::new(
                Some(name),
                format!("conflicting CDI device {name:?}: declared in {} (same directory)", files.join(" and ")),
            ));
        }
        if let Some(&(spec, dev, _)) = self.devices.get(name) {
            return Ok((spec, dev));
        }
        let searched: Vec<String> = dirs.iter().map(|d| d.display().to_string()).collect();
        let mut message = format!("unknown CDI device {name:?}: not found in {}", searched.join(", "));
        let mut available: Vec<&str> = self
            .specs
            .iter()
            .filter(|s| s.kind == kind)
            .flat_map(|s| s.devices.iter().map(|d| d.name.as_str()))
            .collect();
        available.sort_unstable();
        available.dedup();
        if available.is_empty() {
            message.push_str(&format!(" (no spec declares kind {kind})"));
        } else {
            message.push_str(&format!(" (devices of kind {kind}: {})", available.join(", ")));
        }
        if !self.skipped.is_empty() {
            let skipped: Vec<String> = self.skipped.iter().map(|(p, why)| format!("{} ({why})", p.display())).collect();
            message.push_str(&format!("; skipped unreadable spec file(s): {}", skipped.join("; ")));
        }
        Err(CdiError::new(Some(name), message))
    }
}

/// The spec files directly in `dir`, sorted by name; a missing directory has none.
fn spec_files(dir: &Path) -> Vec<PathBuf> {
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) => {
            if e.kind() != std::io::ErrorKind::NotFound {
                log::warn!("CDI spec directory {}: {e}; skipped", dir.display());
            }
            return Vec::new();
        }
    };
    let mut files: Vec<PathBuf> = entries
        .flatten()
        .filter(|e| e.file_type().map(|t| !t.is_dir()).unwrap_or(false))
        .map(|e| e.path())
        .filter(|p| matches!(p.extension().and_then(|x| x.to_str()), Some("json" | "yaml" | "yml")))
        .collect();
    files.sort();
    files
}

fn read_spec(path: &Path) -> Result<SpecFile, String> {
    let file = std::fs::File::open(path).map_err(|e| e.to_string())?;
    let mut bytes = Vec::new();
    file.take(MAX_SPEC_FILE + 1).read_to_end(&mut bytes).map_err(|e| e.to_string())?;
    if bytes.len() as u64 > MAX_SPEC_FILE {
        return Err(format!("larger than {MAX_SPEC_FILE} bytes"));
    }
    let is_json = path.extension().and_then(|x| x.to_str()) == Some("json");
    let mut spec: SpecFile = if is_json {
        serde_json::from_slice(&bytes).map_err(|e| format!("invalid JSON: {e}"))?
    } else {
        serde_yaml_ng::from_slice(&bytes).map_err(|e| format!("invalid YAML: {e}"))?
    };
    if spec.cdi_version.as_deref().map_or(true, |v| v.trim().is_empty()) {
        return Err("no cdiVersion".to_string());
    }
    if !valid_kind(&spec.kind) {
        return Err(format!("invalid kind {:?} (expected vendor.com/class)", spec.kind));
    }
    let mut seen = BTreeSet::new();
    for dev in &spec.devices {
        if dev.name.is_empty() || dev.name.contains('=') {
            return Err(format!("invalid device name {:?}", dev.name));
        }
        if !seen.insert(dev.name.as_str()) {
            return Err(format!("device {:?} declared twice", dev.name));
        }
    }
    spec.path = path.to_path_buf();
    Ok(spec)
}

/// Adds one set of container edits to `out`; a later node or mount for the same path replaces
/// an earlier one, as CDI's editor does.
fn apply_edits(
    out: &mut GpuDevices,
    edits: &ContainerEdits,
    name: &str,
    spec_path: &Path,
    skipped: &mut SkippedEdits,
) -> Result<(), CdiError> {
    skipped.env += edits.env.len();
    skipped.hooks += edits.hooks.len();
    skipped.other += edits.additional_gids.len() + edits.net_devices.len() + usize::from(edits.intel_rdt.is_some());

    for node in &edits.device_nodes {
        let (device, rule) = device_node(node).map_err(|why| {
            CdiError::new(Some(name), format!("CDI device {name:?} (spec {}): {why}", spec_path.display()))
        })?;
        if let Some(rule) = rule {
            if !out.rules.contains(&rule) {
                out.rules.push(rule);
            }
        }
        match out.devices.iter_mut().find(|d| d.path == device.path) {
            Some(existing) => *existing = device,
            None => out.devices.push(device),
        }
    }
    for m in &edits.mounts {
        if m.host_path.is_empty() || m.container_path.is_empty() {
            return Err(CdiError::new(
                Some(name),
                format!(
                    "CDI device {name:?} (spec {}): a mount without hostPath or containerPath",
                    spec_path.display()
                ),
            ));
        }
        let record = MountRecord {
            destination: m.container_path.clone(),
            source: m.host_path.clone(),
            kind: m.kind.clone().filter(|k| !k.is_empty()).unwrap_or_else(|| "bind".to_string()),
            options: m.options.clone(),
        };
        match out.mounts.iter_mut().find(|x| x.destination == record.destination) {
            Some(existing) => *existing = record,
            None => out.mounts.push(record),
        }
    }
    Ok(())
}

/// A CDI device node as an OCI device and its allow rule (none for permissions "none").
fn device_node(node: &CdiDeviceNode) -> Result<(DeviceNode, Option<DeviceRule>), String> {
    if node.path.is_empty() {
        return Err("a device node without a path".to_string());
    }
    let host = node.host_path.as_deref().filter(|h| !h.is_empty()).unwrap_or(&node.path);
    let given_type = node.kind.as_deref().filter(|t| !t.is_empty());
    if let Some(t) = given_type {
        if !matches!(t, "c" | "b" | "u" | "p") {
            return Err(format!("device node {}: invalid type {t:?}", node.path));
        }
    }
    if node.major.is_some_and(|m| m < 0) || node.minor.is_some_and(|m| m < 0) {
        return Err(format!("device node {}: negative device number", node.path));
    }
    let has_numbers = node.major.is_some_and(|m| m != 0) || given_type == Some("p");
    let (kind, major, minor) = if has_numbers {
        (given_type.unwrap_or("c").to_string(), node.major.unwrap_or(0), node.minor.unwrap_or(0))
    } else {
        let md = std::fs::metadata(host).map_err(|e| {
            format!("device node {}: no major/minor given and host path {host} cannot be stat'ed: {e}", node.path)
        })?;
        let ft = md.file_type();
        let stat_type = if ft.is_char_device() {
            "c"
        } else if ft.is_block_device() {
            "b"
        } else if ft.is_fifo() {
            "p"
        } else {
            return Err(format!("device node {}: host path {host} is not a device node", node.path));
        };
        if let Some(t) = given_type {
            let same = t == stat_type || (t == "u" && stat_type == "c");
            if !same {
                log::warn!("CDI device node {}: declared type {t}, but {host} is of type {stat_type}", node.path);
            }
        }
        let rdev = md.rdev();
        let (maj, min) = (nix::sys::stat::major(rdev), nix::sys::stat::minor(rdev));
        (
            given_type.unwrap_or(stat_type).to_string(),
            i64::try_from(maj).unwrap_or(i64::MAX),
            i64::try_from(min).unwrap_or(i64::MAX),
        )
    };
    let device = DeviceNode {
        path: node.path.clone(),
        kind: kind.clone(),
        major,
        minor,
        file_mode: node.file_mode,
        uid: node.uid,
        gid: node.gid,
    };
    let rule_type = match kind.as_str() {
        "c" | "u" => Some("c"),
        "b" => Some("b"),
        _ => None,
    };
    let access = match node.permissions.as_deref() {
        None | Some("") => Some("rwm".to_string()),
        Some("none") => None,
        Some(p) if !p.is_empty() && p.chars().all(|c| matches!(c, 'r' | 'w' | 'm')) => Some(p.to_string()),
        Some(p) => return Err(format!("device node {}: invalid permissions {p:?}", node.path)),
    };
    let rule = match (rule_type, access) {
        (Some(t), Some(access)) => Some(DeviceRule {
            allow: true,
            kind: Some(t.to_string()),
            major: Some(major),
            minor: Some(minor),
            access: Some(access),
        }),
        _ => None,
    };
    Ok((device, rule))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use std::fs;

    const NVIDIA_YAML: &str = r#"---
cdiVersion: 0.5.0
kind: nvidia.com/gpu
devices:
- name: "0"
  containerEdits:
    deviceNodes:
    - path: /dev/nvidia0
      major: 195
      minor: 0
      type: c
      permissions: rw
- name: "1"
  containerEdits:
    deviceNodes:
    - path: /dev/nvidia1
      hostPath: /dev/nvidia1
      type: c
      major: 195
      minor: 1
- name: all
  containerEdits:
    deviceNodes:
    - path: /dev/nvidia0
      type: c
      major: 195
      minor: 0
    - path: /dev/nvidia1
      type: c
      major: 195
      minor: 1
containerEdits:
  env:
  - NVIDIA_VISIBLE_DEVICES=void
  deviceNodes:
  - path: /dev/nvidiactl
    type: c
    major: 195
    minor: 255
  - path: /dev/nvidia-uvm
    type: c
    major: 508
    minor: 0
  hooks:
  - hookName: createContainer
    path: /usr/bin/nvidia-cdi-hook
    args: [nvidia-cdi-hook, update-ldcache]
  mounts:
  - hostPath: /usr/lib/x86_64-linux-gnu/libcuda.so.580.65.06
    containerPath: /usr/lib/x86_64-linux-gnu/libcuda.so.580.65.06
    options: [ro, nosuid, nodev, rbind, rprivate]
  - hostPath: /run/nvidia-persistenced/socket
    containerPath: /run/nvidia-persistenced/socket
    type: bind
    options:
"#;

    fn names(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    fn rule(major: i64, minor: i64, access: &str) -> DeviceRule {
        DeviceRule {
            allow: true,
            kind: Some("c".into()),
            major: Some(major),
            minor: Some(minor),
            access: Some(access.into()),
        }
    }

    fn node(path: &str, major: i64, minor: i64) -> DeviceNode {
        DeviceNode { path: path.into(), kind: "c".into(), major, minor, file_mode: None, uid: None, gid: None }
    }

    struct Dirs {
        _tmp: tempfile::TempDir,
        etc: PathBuf,
        run: PathBuf,
    }

    impl Dirs {
        fn new() -> Self {
            let tmp = tempfile::tempdir().unwrap();
            let etc = tmp.path().join("etc/cdi");
            let run = tmp.path().join("var/run/cdi");
            fs::create_dir_all(&etc).unwrap();
            fs::create_dir_all(&run).unwrap();
            Dirs { _tmp: tmp, etc, run }
        }
        fn resolve(&self, n: &[&str]) -> Result<GpuDevices, CdiError> {
            resolve_cdi(&names(n), &[self.etc.as_path(), self.run.as_path()])
        }
    }

    #[test]
    fn names_from_annotations() {
        let spec = json!({
            "annotations": {
                "cdi.k8s.io/a-plugin": "nvidia.com/gpu=0, nvidia.com/gpu=1,,nvidia.com/gpu=0",
                "cdi.k8s.io/b-other": "nvidia.com/gpu=1,vendor.example/fpga=x",
                "cdi.k8s.io/c-bad": "not-qualified, nvidia.com/gpu=, =x, a/b/c=d",
                "cdi.k8s.io/d-number": 5,
                "io.kubernetes.cri.container-type": "container",
                "example.com/cdi.k8s.io/x": "nvidia.com/gpu=7"
            }
        });
        assert_eq!(cdi_device_names(&spec), names(&["nvidia.com/gpu=0", "nvidia.com/gpu=1", "vendor.example/fpga=x"]));
        assert!(cdi_device_names(&json!({})).is_empty());
        assert!(cdi_device_names(&json!({"annotations": "x"})).is_empty());
        assert!(cdi_device_names(&json!(null)).is_empty());
    }

    #[test]
    fn yaml_spec_single_gpu_with_spec_edits() {
        let d = Dirs::new();
        fs::write(d.etc.join("nvidia.yaml"), NVIDIA_YAML).unwrap();
        let got = d.resolve(&["nvidia.com/gpu=0"]).unwrap();
        assert_eq!(
            got.devices,
            vec![node("/dev/nvidiactl", 195, 255), node("/dev/nvidia-uvm", 508, 0), node("/dev/nvidia0", 195, 0)]
        );
        assert_eq!(got.rules, vec![rule(195, 255, "rwm"), rule(508, 0, "rwm"), rule(195, 0, "rw")]);
        assert_eq!(
            got.mounts,
            vec![
                MountRecord {
                    destination: "/usr/lib/x86_64-linux-gnu/libcuda.so.580.65.06".into(),
                    source: "/usr/lib/x86_64-linux-gnu/libcuda.so.580.65.06".into(),
                    kind: "bind".into(),
                    options: names(&["ro", "nosuid", "nodev", "rbind", "rprivate"]),
                },
                MountRecord {
                    destination: "/run/nvidia-persistenced/socket".into(),
                    source: "/run/nvidia-persistenced/socket".into(),
                    kind: "bind".into(),
                    options: vec![],
                },
            ]
        );
        assert_eq!(got.cdi_devices, names(&["nvidia.com/gpu=0"]));
    }

    #[test]
    fn all_and_several_devices_apply_spec_edits_once() {
        let d = Dirs::new();
        fs::write(d.etc.join("nvidia.yaml"), NVIDIA_YAML).unwrap();
        let got = d.resolve(&["nvidia.com/gpu=all"]).unwrap();
        let paths: Vec<&str> = got.devices.iter().map(|n| n.path.as_str()).collect();
        assert_eq!(paths, ["/dev/nvidiactl", "/dev/nvidia-uvm", "/dev/nvidia0", "/dev/nvidia1"]);
        assert_eq!(got.mounts.len(), 2);

        let got = d.resolve(&["nvidia.com/gpu=0", "nvidia.com/gpu=1", "nvidia.com/gpu=0"]).unwrap();
        let paths: Vec<&str> = got.devices.iter().map(|n| n.path.as_str()).collect();
        assert_eq!(paths, ["/dev/nvidiactl", "/dev/nvidia-uvm", "/dev/nvidia0", "/dev/nvidia1"]);
        assert_eq!(got.rules.len(), 4, "{:?}", got.rules);
        assert_eq!(got.mounts.len(), 2, "spec-level mounts are added once");
        assert_eq!(got.cdi_devices, names(&["nvidia.com/gpu=0", "nvidia.com/gpu=1"]));
    }

    #[test]
    fn json_spec_and_stat_for_missing_numbers() {
        let d = Dirs::new();
        let spec = json!({
            "cdiVersion": "0.6.0",
            "kind": "example.com/dev",
            "devices": [{
                "name": "null",
                "containerEdits": {
                    "deviceNodes": [{"path": "/dev/xnull", "hostPath": "/dev/null", "permissions": "none",
                                     "fileMode": 438, "uid": 0, "gid": 0}],
                    "mounts": [{"hostPath": "/etc/hosts", "containerPath": "/etc/x-hosts", "type": "none",
                                "options": ["rbind"]}]
                }
            }, {
                "name": "gone",
                "containerEdits": {"deviceNodes": [{"path": "/dev/definitely-not-here-xyz"}]}
            }]
        });
        fs::write(d.run.join("example.json"), serde_json::to_vec(&spec).unwrap()).unwrap();
        let got = d.resolve(&["example.com/dev=null"]).unwrap();
        assert_eq!(
            got.devices,
            vec![DeviceNode {
                path: "/dev/xnull".into(),
                kind: "c".into(),
                major: 1,
                minor: 3,
                file_mode: Some(438),
                uid: Some(0),
                gid: Some(0),
            }]
        );
        assert!(got.rules.is_empty(), "permissions none grants nothing: {:?}", got.rules);
        assert_eq!(got.mounts[0].kind, "none");

        let err = d.resolve(&["example.com/dev=gone"]).unwrap_err();
        assert_eq!(err.device.as_deref(), Some("example.com/dev=gone"));
        assert!(err.message.contains("/dev/definitely-not-here-xyz"), "{err}");
        assert!(err.message.contains("example.json"), "{err}");
    }

    #[test]
    fn run_dir_overrides_etc() {
        let d = Dirs::new();
        fs::write(d.etc.join("nvidia.yaml"), NVIDIA_YAML).unwrap();
        fs::write(
            d.run.join("nvidia.json"),
            r#"{"cdiVersion":"0.5.0","kind":"nvidia.com/gpu","devices":[{"name":"0","containerEdits":
                {"deviceNodes":[{"path":"/dev/nvidia0","type":"c","major":195,"minor":7}]}}]}"#,
        )
        .unwrap();
        let got = d.resolve(&["nvidia.com/gpu=0"]).unwrap();
        assert_eq!(got.devices, vec![node("/dev/nvidia0", 195, 7)], "the /var/run/cdi spec, without /etc's edits");
        // Devices only /etc declares still resolve from there.
        let got = d.resolve(&["nvidia.com/gpu=1"]).unwrap();
        assert!(got.devices.contains(&node("/dev/nvidia1", 195, 1)));

        // Reversed priority: /etc last wins.
        let got = resolve_cdi(&names(&["nvidia.com/gpu=0"]), &[d.run.as_path(), d.etc.as_path()]).unwrap();
        assert!(got.devices.contains(&node("/dev/nvidia0", 195, 0)), "{:?}", got.devices);
    }

    #[test]
    fn same_directory_conflict_is_an_error() {
        let d = Dirs::new();
        fs::write(d.etc.join("a.yaml"), NVIDIA_YAML).unwrap();
        fs::write(d.etc.join("b.yml"), NVIDIA_YAML).unwrap();
        let err = d.resolve(&["nvidia.com/gpu=0"]).unwrap_err();
        assert!(err.message.contains("conflicting"), "{err}");
        assert!(err.message.contains("a.yaml") && err.message.contains("b.yml"), "{err}");
        // A higher-priority directory settles it.
        fs::write(d.run.join("c.yaml"), NVIDIA_YAML).unwrap();
        assert!(d.resolve(&["nvidia.com/gpu=0"]).is_ok());
    }

    #[test]
    fn unknown_device_names_the_dirs() {
        let d = Dirs::new();
        fs::write(d.etc.join("nvidia.yaml"), NVIDIA_YAML).unwrap();
        let err = d.resolve(&["nvidia.com/gpu=3"]).unwrap_err();
        assert_eq!(err.device.as_deref(), Some("nvidia.com/gpu=3"));
        let msg = err.to_string();
        assert!(msg.starts_with("unknown CDI device \"nvidia.com/gpu=3\""), "{msg}");
        assert!(msg.contains(&d.etc.display().to_string()) && msg.contains(&d.run.display().to_string()), "{msg}");
        assert!(msg.contains("0, 1, all"), "{msg}");
        let err = d.resolve(&["amd.com/gpu=0"]).unwrap_err();
        assert!(err.to_string().contains("no spec declares kind amd.com/gpu"), "{err}");
        let err = d.resolve(&["no-equals"]).unwrap_err();
        assert!(err.to_string().contains("invalid CDI device name"), "{err}");
    }

    #[test]
    fn malformed_files_are_skipped_but_named() {
        let d = Dirs::new();
        fs::write(d.etc.join("nvidia.yaml"), NVIDIA_YAML).unwrap();
        fs::write(d.etc.join("broken.json"), "{\"cdiVersion\": ").unwrap();
        fs::write(d.etc.join("broken.yaml"), "kind: [unclosed\n").unwrap();
        fs::write(d.etc.join("noversion.yaml"), "kind: x.com/y\ndevices: []\n").unwrap();
        fs::write(d.etc.join("badkind.yaml"), "cdiVersion: 0.5.0\nkind: nokind\n").unwrap();
        fs::write(d.etc.join("binary.yaml"), [0xffu8, 0x00, 0xfe]).unwrap();
        fs::write(
            d.etc.join("twice.yaml"),
            "cdiVersion: 0.5.0\nkind: vendor.example/fpga\ndevices:\n\
             - {name: \"0\", containerEdits: {}}\n- {name: \"0\", containerEdits: {}}\n",
        )
        .unwrap();
        fs::write(d.etc.join("ignored.txt"), "not a spec").unwrap();
        fs::create_dir_all(d.etc.join("sub.yaml")).unwrap();
        // The good spec still resolves.
        let got = d.resolve(&["nvidia.com/gpu=1"]).unwrap();
        assert!(got.devices.contains(&node("/dev/nvidia1", 195, 1)));
        // A name that is not found mentions the skipped files.
        let err = d.resolve(&["vendor.example/fpga=0"]).unwrap_err();
        let msg = err.to_string();
        for f in ["broken.json", "broken.yaml", "noversion.yaml", "badkind.yaml", "binary.yaml", "twice.yaml"] {
            assert!(msg.contains(f), "{f} missing in {msg}");
        }
        assert!(!msg.contains("ignored.txt"), "{msg}");
    }

    #[test]
    fn invalid_device_nodes_are_errors_not_panics() {
        let d = Dirs::new();
        fs::write(
            d.etc.join("x.yaml"),
            "cdiVersion: 0.5.0\nkind: x.com/y\ndevices:\n\
             - name: badtype\n  containerEdits:\n    deviceNodes:\n    - {path: /dev/a, type: z, major: 1}\n\
             - name: neg\n  containerEdits:\n    deviceNodes:\n    - {path: /dev/a, type: c, major: -1}\n\
             - name: perms\n  containerEdits:\n    deviceNodes:\n    - {path: /dev/a, type: c, major: 1, permissions: rx}\n\
             - name: empty\n  containerEdits:\n    deviceNodes:\n    - {path: ''}\n\
             - name: nullmounts\n  containerEdits:\n    mounts: ~\n    deviceNodes: ~\n",
        )
        .unwrap();
        for n in ["badtype", "neg", "perms", "empty"] {
            assert!(d.resolve(&[&format!("x.com/y={n}")]).is_err(), "{n}");
        }
        let got = d.resolve(&["x.com/y=nullmounts"]).unwrap();
        assert!(got.devices.is_empty() && got.mounts.is_empty());
        assert_eq!(got.cdi_devices, names(&["x.com/y=nullmounts"]));
    }

    #[test]
    fn resolving_for_a_kind_says_when_no_spec_declares_it() {
        let d = Dirs::new();
        let dirs = [d.etc.as_path(), d.run.as_path()];
        let gpu0 = names(&["nvidia.com/gpu=0"]);
        assert_eq!(resolve_cdi_for_kind(&gpu0, &dirs, "nvidia.com/gpu"), Ok(None), "no specs at all");
        fs::write(d.etc.join("fpga.yaml"), "cdiVersion: 0.5.0\nkind: vendor.example/fpga\ndevices: []\n").unwrap();
        assert_eq!(resolve_cdi_for_kind(&gpu0, &dirs, "nvidia.com/gpu"), Ok(None), "only other kinds");
        fs::write(d.run.join("nvidia.yaml"), NVIDIA_YAML).unwrap();
        let got = resolve_cdi_for_kind(&gpu0, &dirs, "nvidia.com/gpu").unwrap().unwrap();
        assert!(got.devices.contains(&node("/dev/nvidia0", 195, 0)), "{got:?}");
        // Declared kind, unknown device: an error, not a fallback.
        let err = resolve_cdi_for_kind(&names(&["nvidia.com/gpu=7"]), &dirs, "nvidia.com/gpu").unwrap_err();
        assert!(err.to_string().contains("devices of kind nvidia.com/gpu: 0, 1, all"), "{err}");
        assert!(resolve_cdi_for_kind(&names(&["bad"]), &dirs, "nvidia.com/gpu").is_err());
    }

    #[test]
    fn nothing_requested_reads_nothing() {
        let got = resolve_cdi(&[], &[Path::new("/nonexistent/cdi")]).unwrap();
        assert!(got.is_empty());
        let err = resolve_cdi(&names(&["nvidia.com/gpu=0"]), &[Path::new("/nonexistent/cdi")]).unwrap_err();
        assert!(err.to_string().contains("/nonexistent/cdi"), "{err}");
    }
}
