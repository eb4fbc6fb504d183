//! The NVIDIA device nodes, devices-cgroup rules and driver mounts of a running container
//! ([`record`], at checkpoint), and putting them back into a restored bundle's config.json
//! ([`inject`], at restore).
//!
//! nvidia-container-runtime edits the OCI spec only on `create`, and in its legacy (hook) mode
//! nvidia-container-cli creates the device nodes, writes the devices cgroup and bind-mounts the
//! driver files itself, so none of it is in the spec at all. `restore` goes straight to runc, so
//! without this a restored GPU container has no NVIDIA devices, no permission to open them and
//! no driver libraries; and CRIU needs the driver bind mounts declared (runc declares the spec's
//! bind mounts to it as external) or it cannot restore the mount tree. So we record what the
//! container actually has (its spec, its `/dev` and its mountinfo) and add what is missing to the
//! restore spec. Everything works on `serde_json::Value` so that fields we do not know survive.

use std::collections::BTreeSet;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::Path;

use serde_json::{json, Map, Value};

use super::cdi::cdi_device_names;
use super::{DeviceNode, DeviceRule, GpuDevices, MountRecord};

/// Character-device major of `/dev/nvidia[0-9]*`, `/dev/nvidiactl` and `/dev/nvidia-modeset`.
/// (`nvidia-uvm` and `nvidia-caps` get dynamic majors.)
pub const NVIDIA_MAJOR: i64 = 195;

/// Options of a driver bind mount found only in mountinfo ("ro" is added when it was read-only),
/// as nvidia-container-cli mounts them.
const MOUNTINFO_BIND_OPTIONS: [&str; 3] = ["rbind", "nosuid", "nodev"];

/// What a restore must give back to a GPU container: its NVIDIA devices (from the spec and from
/// its `/dev`), the cgroup rules that allow them, its driver mounts (from the spec and from its
/// mountinfo, translated to host paths) and the CDI devices it asked for.
///
/// `spec` is the container's config.json; `container_root` its root (`/proc/<pid>/root`);
/// `container_mountinfo` the text of `/proc/<pid>/mountinfo`; `host_mountinfo` that of the
/// host's `/proc/self/mountinfo`. Malformed input is skipped, never fatal.
pub fn record(spec: &Value, container_root: &Path, container_mountinfo: &str, host_mountinfo: &str) -> GpuDevices {
    let devices = record_devices(spec, container_root);
    let rules = record_rules(spec, &devices);
    let mounts = record_mounts(spec, container_mountinfo, host_mountinfo);
    GpuDevices { devices, rules, mounts, cdi_devices: cdi_device_names(spec) }
}

/// NVIDIA entries of `linux.devices`, then the NVIDIA character devices present in the
/// container's `/dev` (and `/dev/nvidia-caps/`) that the spec does not list; one per path.
fn record_devices(spec: &Value, container_root: &Path) -> Vec<DeviceNode> {
    let mut devices: Vec<DeviceNode> = Vec::new();
    for entry in array_at(spec, &["linux", "devices"]) {
        if let Some(dev) = spec_device(entry) {
            if is_nvidia_device(&dev) && !devices.iter().any(|d| d.path == dev.path) {
                devices.push(dev);
            }
        }
    }
    for dev in scan_dev(container_root) {
        if !devices.iter().any(|d| d.path == dev.path) {
            devices.push(dev);
        }
    }
    devices
}

/// Every `linux.devices` entry of a spec that has a path and device numbers, in order.
pub fn spec_devices(spec: &Value) -> Vec<DeviceNode> {
    array_at(spec, &["linux", "devices"]).iter().filter_map(spec_device).collect()
}

/// The destinations of a spec's `mounts`, normalized ("/a//b/" is "/a/b").
pub fn spec_mount_destinations(spec: &Value) -> BTreeSet<String> {
    array_at(spec, &["mounts"])
        .iter()
        .filter_map(|m| m.get("destination").and_then(Value::as_str))
        .map(normalize_dest)
        .collect()
}

/// An NVIDIA device node: a character device of major 195, or a `/dev/nvidia*` path.
pub fn is_nvidia_device(dev: &DeviceNode) -> bool {
    (matches!(dev.kind.as_str(), "c" | "u") && dev.major == NVIDIA_MAJOR) || dev.path.starts_with("/dev/nvidia")
}

/// A `linux.devices` entry; `None` when it lacks a path or device numbers.
fn spec_device(v: &Value) -> Option<DeviceNode> {
    let path = v.get("path")?.as_str()?;
    let kind = v.get("type").and_then(Value::as_str).unwrap_or("c");
    let (Some(major), Some(minor)) = (v.get("major").and_then(Value::as_i64), v.get("minor").and_then(Value::as_i64))
    else {
        if path.starts_with("/dev/nvidia") {
            log::warn!("spec device {path}: no major/minor; taken from the container's /dev if present there");
        }
        return None;
    };
    let u32_field = |k: &str| v.get(k).and_then(Value::as_u64).and_then(|n| u32::try_from(n).ok());
    Some(DeviceNode {
        path: path.to_string(),
        kind: kind.to_string(),
        major,
        minor,
        file_mode: u32_field("fileMode"),
        uid: u32_field("uid"),
        gid: u32_field("gid"),
    })
}

/// NVIDIA character devices in `<root>/dev/nvidia*` and `<root>/dev/nvidia-caps/*`, sorted by
/// path. Symlinks are not followed (`/proc/<pid>/root` resolution stays inside the container).
fn scan_dev(container_root: &Path) -> Vec<DeviceNode> {
    let dev_dir = container_root.join("dev");
    let mut found = Vec::new();
    for (name, md) in dir_entries(&dev_dir) {
        if !name.starts_with("nvidia") {
            continue;
        }
        if name == "nvidia-caps" && md.is_dir() {
            for (cap, cap_md) in dir_entries(&dev_dir.join("nvidia-caps")) {
                found.extend(device_node_from_metadata(&format!("/dev/nvidia-caps/{cap}"), &cap_md));
            }
            continue;
        }
        found.extend(device_node_from_metadata(&format!("/dev/{name}"), &md));
    }
    found.sort_by(|a, b| a.path.cmp(&b.path));
    found
}

/// Names (UTF-8 only) and `lstat` metadata of a directory's entries; nothing when unreadable.
fn dir_entries(dir: &Path) -> Vec<(String, std::fs::Metadata)> {
    let Ok(entries) = std::fs::read_dir(dir) else { return Vec::new() };
    entries
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().into_string().ok()?;
            let md = std::fs::symlink_metadata(e.path()).ok()?;
            Some((name, md))
        })
        .collect()
}

/// A device node for `path` (its path in the container) from `lstat` metadata: character
/// devices only (a regular file or a symlink named like a device is not one).
pub fn device_node_from_metadata(path: &str, md: &std::fs::Metadata) -> Option<DeviceNode> {
    if !md.file_type().is_char_device() {
        return None;
    }
    let rdev = md.rdev();
    Some(DeviceNode {
        path: path.to_string(),
        kind: "c".to_string(),
        major: i64::try_from(nix::sys::stat::major(rdev)).ok()?,
        minor: i64::try_from(nix::sys::stat::minor(rdev)).ok()?,
        file_mode: Some(md.mode() & 0o7777),
        uid: Some(md.uid()),
        gid: Some(md.gid()),
    })
}

/// Allow rules of `linux.resources.devices` for major 195 or a recorded device's major, then a
/// synthesized `allow c M:m rwm` for each recorded device no such rule covers (in legacy mode
/// nvidia-container-cli writes the cgroup directly, so the spec has none).
fn record_rules(spec: &Value, devices: &[DeviceNode]) -> Vec<DeviceRule> {
    let majors: BTreeSet<i64> = devices.iter().map(|d| d.major).chain([NVIDIA_MAJOR]).collect();
    let mut rules: Vec<DeviceRule> = Vec::new();
    for entry in array_at(spec, &["linux", "resources", "devices"]) {
        let Some(rule) = spec_rule(entry) else { continue };
        if rule.allow && rule.major.is_some_and(|m| majors.contains(&m)) && !rules.contains(&rule) {
            rules.push(rule);
        }
    }
    for dev in devices {
        if !rules.iter().any(|r| rule_covers(r, dev)) {
            rules.push(DeviceRule {
                allow: true,
                kind: Some(rule_type(&dev.kind).to_string()),
                major: Some(dev.major),
                minor: Some(dev.minor),
                access: Some("rwm".to_string()),
            });
        }
    }
    rules
}

/// A `linux.resources.devices` entry; `None` without a boolean `allow`.
fn spec_rule(v: &Value) -> Option<DeviceRule> {
    Some(DeviceRule {
        allow: v.get("allow")?.as_bool()?,
        kind: v.get("type").and_then(Value::as_str).map(str::to_string),
        major: v.get("major").and_then(Value::as_i64),
        minor: v.get("minor").and_then(Value::as_i64),
        access: v.get("access").and_then(Value::as_str).map(str::to_string),
    })
}

/// Cgroup rules know "c", "b" and "a"; OCI's unbuffered "u" is a character device.
fn rule_type(kind: &str) -> &str {
    if kind == "u" {
        "c"
    } else {
        kind
    }
}

/// Whether an allow rule applies to the device (wildcards: no type or "a", no or -1 numbers).
fn rule_covers(rule: &DeviceRule, dev: &DeviceNode) -> bool {
    let kind_ok = match rule.kind.as_deref() {
        None | Some("a") => true,
        Some(k) => rule_type(k) == rule_type(&dev.kind),
    };
    let num_ok = |r: Option<i64>, d: i64| matches!(r, None | Some(-1)) || r == Some(d);
    rule.allow && kind_ok && num_ok(rule.major, dev.major) && num_ok(rule.minor, dev.minor)
}

/// Whether a path is an NVIDIA driver file or directory: names containing "nvidia" (libnvidia-*,
/// nvidia-smi and the other /usr/bin/nvidia-* tools, /proc/driver/nvidia, the persistenced
/// socket, firmware), "libcuda", "libnvcuvid" or "libnvoptix".
pub fn is_driver_path(path: &str) -> bool {
    let lower = path.to_ascii_lowercase();
    ["nvidia", "libcuda", "libnvcuvid", "libnvoptix"].iter().any(|p| lower.contains(p))
}

/// Device nodes are recorded as devices, not mounts.
fn is_dev_path(destination: &str) -> bool {
    destination == "/dev" || destination.starts_with("/dev/")
}

/// Driver bind mounts of the spec, then those only the container's mountinfo shows (legacy
/// mode), with host sources found through the host's mountinfo; one per destination.
fn record_mounts(spec: &Value, container_mountinfo: &str, host_mountinfo: &str) -> Vec<MountRecord> {
    let mut mounts: Vec<MountRecord> = Vec::new();
    let mut spec_destinations: BTreeSet<String> = BTreeSet::new();
    for entry in array_at(spec, &["mounts"]) {
        let Some(destination) = entry.get("destination").and_then(Value::as_str) else { continue };
        spec_destinations.insert(normalize_dest(destination));
        if let Some(m) = spec_driver_mount(entry, destination) {
            if !mounts.iter().any(|x| normalize_dest(&x.destination) == normalize_dest(&m.destination)) {
                mounts.push(m);
            }
        }
    }

    let host = parse_mountinfo(host_mountinfo);
    let mut from_mountinfo: Vec<MountRecord> = Vec::new();
    for entry in parse_mountinfo(container_mountinfo) {
        let dest = normalize_dest(&entry.mount_point);
        if !is_driver_path(&dest) || is_dev_path(&dest) || matches!(dest.as_str(), "/" | "/proc" | "/sys") {
            continue;
        }
        // A whole filesystem mounted for the container (e.g. nvidia-container-cli's tmpfs on
        // /proc/driver/nvidia) is not a bind from the host: CRIU dumps and restores it itself.
        let own_fs = matches!(
            entry.fs_type.as_str(),
            "tmpfs" | "devtmpfs" | "overlay" | "proc" | "sysfs" | "devpts" | "mqueue" | "cgroup" | "cgroup2"
        );
        if own_fs && entry.root == "/" {
            continue;
        }
        if spec_destinations.contains(&dest) {
            continue;
        }
        let Some(source) = host_source(&entry, &host) else {
            log::warn!(
                "driver mount {} ({} {}:{} root {}): no host mount it comes from; not recorded",
                entry.mount_point,
                entry.fs_type,
                entry.major,
                entry.minor,
                entry.root
            );
            continue;
        };
        let mut options: Vec<String> = MOUNTINFO_BIND_OPTIONS.iter().map(|s| s.to_string()).collect();
        if entry.options.iter().any(|o| o == "ro") {
            options.push("ro".to_string());
        }
        let record = MountRecord { destination: dest.clone(), source, kind: "bind".to_string(), options };
        // The last one mounted on a path is the one the container sees.
        match from_mountinfo.iter_mut().find(|m| m.destination == dest) {
            Some(existing) => *existing = record,
            None => from_mountinfo.push(record),
        }
    }
    mounts.extend(from_mountinfo);
    mounts
}

/// A spec `mounts` entry, when it is a bind mount of an NVIDIA driver file.
fn spec_driver_mount(entry: &Value, destination: &str) -> Option<MountRecord> {
    let source = entry.get("source").and_then(Value::as_str).filter(|s| !s.is_empty())?;
    let kind = entry.get("type").and_then(Value::as_str).unwrap_or("");
    let options: Vec<String> = entry
        .get("options")
        .and_then(Value::as_array)
        .map(|a| a.iter().filter_map(Value::as_str).map(str::to_string).collect())
        .unwrap_or_default();
    let is_bind = kind == "bind" || options.iter().any(|o| o == "bind" || o == "rbind");
    if !is_bind || is_dev_path(&normalize_dest(destination)) {
        return None;
    }
    if !is_driver_path(destination) && !is_driver_path(source) {
        return None;
    }
    Some(MountRecord {
        destination: destination.to_string(),
        source: source.to_string(),
        kind: if kind.is_empty() { "bind".to_string() } else { kind.to_string() },
        options,
    })
}

/// "/a/b/" and "/a//b" name the same destination as "/a/b".
pub fn normalize_dest(dest: &str) -> String {
    let parts: Vec<&str> = dest.split('/').filter(|p| !p.is_empty() && *p != ".").collect();
    format!("/{}", parts.join("/"))
}

/// One line of a `/proc/<pid>/mountinfo` file (proc(5)).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountInfo {
    pub mount_id: u64,
    pub parent_id: u64,
    pub major: u32,
    pub minor: u32,
    /// Path of the mounted directory or file within its filesystem.
    pub root: String,
    /// Where it is mounted, relative to the process's root.
    pub mount_point: String,
    /// Per-mount options ("rw", "ro", "nosuid", …).
    pub options: Vec<String>,
    /// Optional fields ("shared:1", "master:2", …).
    pub optional: Vec<String>,
    pub fs_type: String,
    pub source: String,
    pub super_options: Vec<String>,
}

/// Parses mountinfo text, e.g.
/// `36 35 98:0 /mnt1 /mnt2 rw,noatime master:1 - ext3 /dev/root rw,errors=continue`,
/// decoding octal escapes (`\040` for a space) in paths. Malformed lines are skipped.
pub fn parse_mountinfo(text: &str) -> Vec<MountInfo> {
    text.lines().filter_map(parse_mountinfo_line).collect()
}

fn parse_mountinfo_line(line: &str) -> Option<MountInfo> {
    let (left, right) = line.split_once(" - ")?;
    let f: Vec<&str> = left.split(' ').filter(|s| !s.is_empty()).collect();
    if f.len() < 6 {
        return None;
    }
    let (major, minor) = f[2].split_once(':')?;
    let r: Vec<&str> = right.split(' ').filter(|s| !s.is_empty()).collect();
    let split_opts = |s: Option<&&str>| -> Vec<String> {
        s.map(|s| s.split(',').filter(|o| !o.is_empty()).map(str::to_string).collect()).unwrap_or_default()
    };
    Some(MountInfo {
        mount_id: f[0].parse().ok()?,
        parent_id: f[1].parse().ok()?,
        major: major.parse().ok()?,
        minor: minor.parse().ok()?,
        root: unescape_octal(f[3]),
        mount_point: unescape_octal(f[4]),
        options: split_opts(f.get(5)),
        optional: f[6..].iter().map(|s| s.to_string()).collect(),
        fs_type: r.first()?.to_string(),
        source: r.get(1).map(|s| unescape_octal(s)).unwrap_or_default(),
        super_options: split_opts(r.get(2)),
    })
}

/// Decodes the kernel's `\ooo` escapes (space, tab, newline, backslash) in mountinfo paths.
pub fn unescape_octal(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 3 < b.len() {
            let digits = &b[i + 1..i + 4];
            if digits.iter().all(|d| (b'0'..=b'7').contains(d)) {
                let value = digits.iter().fold(0u32, |acc, d| acc * 8 + u32::from(d - b'0'));
                if let Ok(byte) = u8::try_from(value) {
                    out.push(byte);
                    i += 4;
                    continue;
                }
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The host path a container mount shows: among host mounts of the same filesystem
/// (`major:minor`) whose root is a path prefix of the entry's root, the one with the longest
/// root; the source is its mount point plus the rest of the entry's root.
pub fn host_source(entry: &MountInfo, host: &[MountInfo]) -> Option<String> {
    let entry_root = Path::new(&entry.root);
    let mut best: Option<(usize, std::path::PathBuf)> = None;
    for h in host.iter().filter(|h| h.major == entry.major && h.minor == entry.minor) {
        if !h.root.starts_with('/') {
            continue;
        }
        let Ok(rest) = entry_root.strip_prefix(&h.root) else { continue };
        let depth = Path::new(&h.root).components().count();
        // The first of equally long roots wins: usually the original mount, not a later bind.
        if best.as_ref().map_or(true, |(d, _)| *d < depth) {
            let source = if rest.as_os_str().is_empty() {
                Path::new(&h.mount_point).to_path_buf()
            } else {
                Path::new(&h.mount_point).join(rest)
            };
            best = Some((depth, source));
        }
    }
    best.map(|(_, p)| p.to_string_lossy().into_owned())
}

/// Adds to a config.json value what `gpu` has and it lacks: devices (by path) to
/// `linux.devices`, allow rules to the end of `linux.resources.devices` (after the usual
/// leading deny-all, so they take effect), and mounts (by destination) to `mounts`, creating
/// missing sections. Returns one line per change; injecting again changes nothing.
///
/// A mount whose source does not exist on this node is not added (runc would fail the whole
/// restore on it); a "skipped …" line says so, on every call.
pub fn inject(spec: &mut Value, gpu: &GpuDevices) -> Vec<String> {
    inject_with(spec, gpu, &|p: &str| std::fs::metadata(p).is_ok())
}

/// [`inject`] with the "does this host path exist" check given (tests, or a caller that sees
/// the node's files under another root).
pub fn inject_with(spec: &mut Value, gpu: &GpuDevices, source_exists: &dyn Fn(&str) -> bool) -> Vec<String> {
    let mut lines = Vec::new();
    let Some(root) = spec.as_object_mut() else {
        if !gpu.devices.is_empty() || !gpu.rules.is_empty() || !gpu.mounts.is_empty() {
            lines.push("skipped all GPU devices and mounts: the spec is not a JSON object".to_string());
        }
        return lines;
    };
    inject_devices(root, &gpu.devices, &mut lines);
    inject_rules(root, &gpu.rules, &mut lines);
    inject_mounts(root, &gpu.mounts, source_exists, &mut lines);
    lines
}

fn inject_devices(root: &mut Map<String, Value>, devices: &[DeviceNode], lines: &mut Vec<String>) {
    let existing: BTreeSet<String> = root
        .get("linux")
        .and_then(|l| l.get("devices"))
        .and_then(Value::as_array)
        .map(|a| a.iter().filter_map(|d| d.get("path").and_then(Value::as_str)).map(str::to_string).collect())
        .unwrap_or_default();
    let mut missing: Vec<&DeviceNode> = Vec::new();
    for d in devices {
        if !existing.contains(&d.path) && !missing.iter().any(|m| m.path == d.path) {
            missing.push(d);
        }
    }
    if missing.is_empty() {
        return;
    }
    let Some(array) = object_field(root, "linux").and_then(|l| array_field(l, "devices")) else {
        lines.push("skipped GPU devices: linux.devices is not an array".to_string());
        return;
    };
    for d in missing {
        let mut entry = Map::new();
        entry.insert("path".into(), json!(d.path));
        entry.insert("type".into(), json!(d.kind));
        entry.insert("major".into(), json!(d.major));
        entry.insert("minor".into(), json!(d.minor));
        if let Some(mode) = d.file_mode {
            entry.insert("fileMode".into(), json!(mode));
        }
        if let Some(uid) = d.uid {
            entry.insert("uid".into(), json!(uid));
        }
        if let Some(gid) = d.gid {
            entry.insert("gid".into(), json!(gid));
        }
        array.push(Value::Object(entry));
        lines.push(format!("device {} ({} {}:{})", d.path, d.kind, d.major, d.minor));
    }
}

fn inject_rules(root: &mut Map<String, Value>, rules: &[DeviceRule], lines: &mut Vec<String>) {
    let existing: Vec<DeviceRule> = root
        .get("linux")
        .and_then(|l| l.get("resources"))
        .and_then(|r| r.get("devices"))
        .and_then(Value::as_array)
        .map(|a| a.iter().filter_map(spec_rule).collect())
        .unwrap_or_default();
    let mut missing: Vec<&DeviceRule> = Vec::new();
    for r in rules {
        if !existing.contains(r) && !missing.contains(&r) {
            missing.push(r);
        }
    }
    if missing.is_empty() {
        return;
    }
    let Some(array) =
        object_field(root, "linux").and_then(|l| object_field(l, "resources")).and_then(|r| array_field(r, "devices"))
    else {
        lines.push("skipped GPU devices cgroup rules: linux.resources.devices is not an array".to_string());
        return;
    };
    for r in missing {
        let mut entry = Map::new();
        entry.insert("allow".into(), json!(r.allow));
        if let Some(kind) = &r.kind {
            entry.insert("type".into(), json!(kind));
        }
        if let Some(major) = r.major {
            entry.insert("major".into(), json!(major));
        }
        if let Some(minor) = r.minor {
            entry.insert("minor".into(), json!(minor));
        }
        if let Some(access) = &r.access {
            entry.insert("access".into(), json!(access));
        }
        array.push(Value::Object(entry));
        lines.push(format!("devices cgroup rule {}", describe_rule(r)));
    }
}

/// "allow c 195:0 rwm", with "a" and "*" for wildcards.
pub fn describe_rule(r: &DeviceRule) -> String {
    let num = |n: Option<i64>| match n {
        Some(n) if n >= 0 => n.to_string(),
        _ => "*".to_string(),
    };
    format!(
        "{} {} {}:{} {}",
        if r.allow { "allow" } else { "deny" },
        r.kind.as_deref().unwrap_or("a"),
        num(r.major),
        num(r.minor),
        r.access.as_deref().unwrap_or("rwm")
    )
}

fn inject_mounts(
    root: &mut Map<String, Value>,
    mounts: &[MountRecord],
    source_exists: &dyn Fn(&str) -> bool,
    lines: &mut Vec<String>,
) {
    let existing: BTreeSet<String> = root
        .get("mounts")
        .and_then(Value::as_array)
        .map(|a| a.iter().filter_map(|m| m.get("destination").and_then(Value::as_str)).map(normalize_dest).collect())
        .unwrap_or_default();
    let mut missing: Vec<&MountRecord> = Vec::new();
    for m in mounts {
        let dest = normalize_dest(&m.destination);
        if existing.contains(&dest) || missing.iter().any(|x| normalize_dest(&x.destination) == dest) {
            continue;
        }
        if !source_exists(&m.source) {
            lines.push(format!("skipped mount {}: source {} does not exist on this node", m.destination, m.source));
            continue;
        }
        missing.push(m);
    }
    if missing.is_empty() {
        return;
    }
    let Some(array) = array_field(root, "mounts") else {
        lines.push("skipped GPU driver mounts: mounts is not an array".to_string());
        return;
    };
    for m in missing {
        array.push(json!({
            "destination": m.destination,
            "type": m.kind,
            "source": m.source,
            "options": m.options,
        }));
        lines.push(format!("mount {} from {}", m.destination, m.source));
    }
}

/// The object under `key`, created when missing or null; `None` when it is something else.
fn object_field<'a>(map: &'a mut Map<String, Value>, key: &str) -> Option<&'a mut Map<String, Value>> {
    let v = map.entry(key).or_insert(Value::Null);
    if v.is_null() {
        *v = Value::Object(Map::new());
    }
    v.as_object_mut()
}

/// The array under `key`, created when missing or null; `None` when it is something else.
fn array_field<'a>(map: &'a mut Map<String, Value>, key: &str) -> Option<&'a mut Vec<Value>> {
    let v = map.entry(key).or_insert(Value::Null);
    if v.is_null() {
        *v = Value::Array(Vec::new());
    }
    v.as_array_mut()
}

/// The array at a path of object keys, or nothing.
fn array_at<'a>(v: &'a Value, path: &[&str]) -> &'a [Value] {
    let mut cur = v;
    for key in path {
        match cur.get(key) {
            Some(next) => cur = next,
            None => return &[],
        }
    }
    cur.as_array().map(Vec::as_slice).unwrap_or(&[])
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;

    const HOST_MOUNTINFO: &str = "\
22 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw,errors=remount-ro
23 22 0:5 / /proc rw,nosuid,nodev,noexec,relatime shared:12 - proc proc rw
24 22 0:25 / /run rw,nosuid,nodev,noexec,relatime shared:5 - tmpfs tmpfs rw,size=3274488k,mode=755
30 22 8:2 /opt/drivers /srv/nvidia\\040drivers rw,relatime shared:30 - ext4 /dev/sda2 rw
31 22 8:2 / /data rw,relatime shared:31 - ext4 /dev/sda2 rw
";

    fn container_mountinfo() -> String {
        [
            "600 500 0:60 / / rw,relatime master:1 - overlay overlay rw,lowerdir=/l,upperdir=/u,workdir=/w",
            "601 600 0:61 / /proc rw,nosuid,nodev,noexec,relatime - proc proc rw",
            "602 600 0:62 / /dev rw,nosuid - tmpfs tmpfs rw,size=65536k,mode=755",
            // Legacy-mode driver files: not in the spec.
            "610 600 8:1 /usr/lib/x86_64-linux-gnu/libcuda.so.580.65 /usr/lib/x86_64-linux-gnu/libcuda.so.580.65 \
             ro,nosuid,nodev,relatime master:1 - ext4 /dev/sda1 rw",
            "611 600 8:1 /usr/bin/nvidia-smi /usr/bin/nvidia-smi ro,nosuid,nodev,relatime master:1 - ext4 /dev/sda1 rw",
            // From a host mount whose root is not "/" (and a mount point with an escaped space).
            "612 600 8:2 /opt/drivers/lib/libnvidia-ml.so.580.65 /usr/lib/x86_64-linux-gnu/libnvidia-ml.so.580.65 \
             rw,nosuid,nodev master:30 - ext4 /dev/sda2 rw",
            "613 600 8:2 /opt/drivers/my\\040lib/libnvoptix.so.1 /usr/lib/my\\040dir/libnvoptix.so.1 \
             ro,relatime - ext4 /dev/sda2 rw",
            // The persistenced socket, a bind from the host's /run tmpfs.
            "614 600 0:25 /nvidia-persistenced/socket /run/nvidia-persistenced/socket rw,nosuid,nodev - tmpfs tmpfs rw",
            // nvidia-container-cli's own tmpfs on /proc/driver/nvidia, and a GPU's proc dir from the host.
            "615 601 0:70 / /proc/driver/nvidia rw,nosuid,nodev - tmpfs tmpfs rw,mode=555",
            "616 615 0:5 /driver/nvidia/gpus/0000:18:00.0 /proc/driver/nvidia/gpus/0000:18:00.0 ro,nosuid,nodev - proc proc rw",
            // A device node bind: recorded as a device, never as a mount.
            "617 602 0:6 /nvidia0 /dev/nvidia0 rw,nosuid - devtmpfs udev rw",
            // Unmappable: no host mount of 9:9.
            "618 600 9:9 /lib/libcuda.so.1 /usr/lib/libcuda.so.1 ro - ext4 /dev/sdz rw",
            // Already in the spec.
            "619 600 8:1 /usr/lib/x86_64-linux-gnu/libnvidia-ptxjitcompiler.so.580.65 \
             /usr/lib/x86_64-linux-gnu/libnvidia-ptxjitcompiler.so.580.65 ro - ext4 /dev/sda1 rw",
            // Unrelated.
            "620 600 8:1 /etc/hosts /etc/hosts rw - ext4 /dev/sda1 rw",
            "garbage line",
            "1 2 x:y / / rw - ext4 /dev/sda1 rw",
            "",
        ]
        .join("\n")
    }

    fn full_spec() -> Value {
        json!({
            "ociVersion": "1.2.0",
            "process": {"args": ["python", "train.py"], "env": ["NVIDIA_VISIBLE_DEVICES=0"]},
            "annotations": {"cdi.k8s.io/nvidia": "nvidia.com/gpu=0", "x-unknown": "kept"},
            "mounts": [
                {"destination": "/proc", "type": "proc", "source": "proc"},
                {"destination": "/etc/hosts", "type": "bind", "source": "/var/lib/x/hosts", "options": ["rbind", "ro"]},
                {"destination": "/usr/lib/x86_64-linux-gnu/libnvidia-ptxjitcompiler.so.580.65", "type": "bind",
                 "source": "/usr/lib/x86_64-linux-gnu/libnvidia-ptxjitcompiler.so.580.65",
                 "options": ["ro", "nosuid", "nodev", "bind"]},
                {"destination": "/usr/bin/nvidia-cuda-mps-control", "source": "/usr/bin/nvidia-cuda-mps-control",
                 "options": ["rbind", "ro"]},
                {"destination": "/opt/tool", "type": "bind", "source": "/host/nvidia/tool", "options": ["bind"]},
                {"destination": "/dev/nvidia0", "type": "bind", "source": "/dev/nvidia0", "options": ["bind"]},
                {"destination": "/nvidia-tmp", "type": "tmpfs", "source": "tmpfs"}
            ],
            "linux": {
                "devices": [
                    {"path": "/dev/nvidia0", "type": "c", "major": 195, "minor": 0, "fileMode": 438, "uid": 0, "gid": 0},
                    {"path": "/dev/nvidia-uvm", "type": "c", "major": 508, "minor": 0},
                    {"path": "/dev/fuse", "type": "c", "major": 10, "minor": 229},
                    {"path": "/dev/sda", "type": "b", "major": 8, "minor": 0},
                    {"path": "/dev/nvidia-weird"},
                    "not an object"
                ],
                "resources": {
                    "devices": [
                        {"allow": false, "access": "rwm"},
                        {"allow": true, "type": "c", "major": 195, "minor": 0, "access": "rw"},
                        {"allow": true, "type": "c", "major": 10, "minor": 229, "access": "rwm"},
                        {"allow": false, "type": "c", "major": 195, "minor": 1, "access": "rwm"},
                        {"type": "c", "major": 195}
                    ],
                    "memory": {"limit": 1}
                },
                "namespaces": [{"type": "pid"}]
            },
            "x-future-field": {"a": [1, 2]}
        })
    }

    fn names<'a>(v: impl IntoIterator<Item = &'a String>) -> Vec<&'a str> {
        v.into_iter().map(String::as_str).collect()
    }

    #[test]
    fn records_nvidia_devices_rules_and_mounts_of_the_spec_and_mountinfo() {
        let root = tempfile::tempdir().unwrap();
        fs::create_dir_all(root.path().join("dev/nvidia-caps")).unwrap();
        // Named like devices but not char devices: never recorded.
        fs::write(root.path().join("dev/nvidia1"), "regular file").unwrap();
        fs::write(root.path().join("dev/nvidia-caps/nvidia-cap1"), "regular file").unwrap();
        std::os::unix::fs::symlink("/dev/null", root.path().join("dev/nvidiactl")).unwrap();

        let got = record(&full_spec(), root.path(), &container_mountinfo(), HOST_MOUNTINFO);

        let devices: Vec<(&str, &str, i64, i64)> =
            got.devices.iter().map(|d| (d.path.as_str(), d.kind.as_str(), d.major, d.minor)).collect();
        assert_eq!(devices, vec![("/dev/nvidia0", "c", 195, 0), ("/dev/nvidia-uvm", "c", 508, 0)]);
        assert_eq!(got.devices[0].file_mode, Some(438));

        // The spec's allow for 195:0 is kept as it is (rw), the deny and the unrelated rule are
        // not recorded, and nvidia-uvm (no rule in the spec) gets a synthesized one.
        assert_eq!(
            got.rules,
            vec![
                DeviceRule {
                    allow: true,
                    kind: Some("c".into()),
                    major: Some(195),
                    minor: Some(0),
                    access: Some("rw".into())
                },
                DeviceRule {
                    allow: true,
                    kind: Some("c".into()),
                    major: Some(508),
                    minor: Some(0),
                    access: Some("rwm".into())
                },
            ]
        );

        let mounts: Vec<(&str, &str, &str, Vec<&str>)> = got
            .mounts
            .iter()
            .map(|m| (m.destination.as_str(), m.source.as_str(), m.kind.as_str(), names(&m.options)))
            .collect();
        assert_eq!(
            mounts,
            vec![
                (
                    "/usr/lib/x86_64-linux-gnu/libnvidia-ptxjitcompiler.so.580.65",
                    "/usr/lib/x86_64-linux-gnu/libnvidia-ptxjitcompiler.so.580.65",
                    "bind",
                    vec!["ro", "nosuid", "nodev", "bind"]
                ),
                ("/usr/bin/nvidia-cuda-mps-control", "/usr/bin/nvidia-cuda-mps-control", "bind", vec!["rbind", "ro"]),
                ("/opt/tool", "/host/nvidia/tool", "bind", vec!["bind"]),
                (
                    "/usr/lib/x86_64-linux-gnu/libcuda.so.580.65",
                    "/usr/lib/x86_64-linux-gnu/libcuda.so.580.65",
                    "bind",
                    vec!["rbind", "nosuid", "nodev", "ro"]
                ),
                ("/usr/bin/nvidia-smi", "/usr/bin/nvidia-smi", "bind", vec!["rbind", "nosuid", "nodev", "ro"]),
                (
                    "/usr/lib/x86_64-linux-gnu/libnvidia-ml.so.580.65",
                    "/srv/nvidia drivers/lib/libnvidia-ml.so.580.65",
                    "bind",
                    vec!["rbind", "nosuid", "nodev"]
                ),
                (
                    "/usr/lib/my dir/libnvoptix.so.1",
                    "/srv/nvidia drivers/my lib/libnvoptix.so.1",
                    "bind",
                    vec!["rbind", "nosuid", "nodev", "ro"]
                ),
                (
                    "/run/nvidia-persistenced/socket",
                    "/run/nvidia-persistenced/socket",
                    "bind",
                    vec!["rbind", "nosuid", "nodev"]
                ),
                (
                    "/proc/driver/nvidia/gpus/0000:18:00.0",
                    "/proc/driver/nvidia/gpus/0000:18:00.0",
                    "bind",
                    vec!["rbind", "nosuid", "nodev", "ro"]
                ),
            ]
        );
        assert_eq!(got.cdi_devices, vec!["nvidia.com/gpu=0".to_string()]);
    }

    #[test]
    fn empty_and_malformed_input_records_nothing() {
        let dir = tempfile::tempdir().unwrap();
        for spec in [json!(null), json!({}), json!({"linux": 5, "mounts": "x"}), json!([1, 2])] {
            assert!(record(&spec, dir.path(), "", "").is_empty(), "{spec}");
        }
        assert!(record(&json!({}), Path::new("/nonexistent/root"), "1 2 3", "\u{0}").is_empty());
    }

    #[test]
    fn device_numbers_come_from_char_device_metadata_only() {
        let null = fs::symlink_metadata("/dev/null").unwrap();
        let d = device_node_from_metadata("/dev/nvidia0", &null).unwrap();
        assert_eq!((d.path.as_str(), d.kind.as_str(), d.major, d.minor), ("/dev/nvidia0", "c", 1, 3));
        assert_eq!(d.file_mode, Some(null.mode() & 0o7777));

        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join("f"), "").unwrap();
        std::os::unix::fs::symlink("/dev/null", dir.path().join("l")).unwrap();
        for name in ["f", "l"] {
            let md = fs::symlink_metadata(dir.path().join(name)).unwrap();
            assert_eq!(device_node_from_metadata("/dev/nvidia0", &md), None, "{name}");
        }
    }

    /// With root (and a devices cgroup that allows mknod), real NVIDIA nodes in a fake `/dev`
    /// are found, with synthesized rules; skipped elsewhere.
    #[test]
    fn scans_real_char_devices_when_mknod_is_possible() {
        // SAFETY: geteuid has no preconditions and cannot fail.
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("skipped: not root");
            return;
        }
        let root = tempfile::tempdir().unwrap();
        fs::create_dir_all(root.path().join("dev/nvidia-caps")).unwrap();
        let mk = |p: &Path, major: u64, minor: u64| {
            nix::sys::stat::mknod(
                p,
                nix::sys::stat::SFlag::S_IFCHR,
                nix::sys::stat::Mode::from_bits_truncate(0o666),
                nix::sys::stat::makedev(major, minor),
            )
        };
        if let Err(e) = mk(&root.path().join("dev/nvidia0"), 195, 0) {
            eprintln!("skipped: mknod not permitted here: {e}");
            return;
        }
        mk(&root.path().join("dev/nvidiactl"), 195, 255).unwrap();
        mk(&root.path().join("dev/nvidia-caps/nvidia-cap1"), 511, 1).unwrap();
        mk(&root.path().join("dev/fuse"), 10, 229).unwrap();

        let got = record(&json!({}), root.path(), "", "");
        let devices: Vec<(&str, i64, i64)> = got.devices.iter().map(|d| (d.path.as_str(), d.major, d.minor)).collect();
        assert_eq!(
            devices,
            vec![("/dev/nvidia-caps/nvidia-cap1", 511, 1), ("/dev/nvidia0", 195, 0), ("/dev/nvidiactl", 195, 255)]
        );
        assert_eq!(
            got.devices[1].file_mode,
            Some(0o666 & !nix::sys::stat::umask(nix::sys::stat::Mode::empty()).bits())
        );
        let rules: Vec<String> = got.rules.iter().map(describe_rule).collect();
        assert_eq!(rules, ["allow c 511:1 rwm", "allow c 195:0 rwm", "allow c 195:255 rwm"]);

        // A spec wildcard rule for 195 covers the 195 nodes: no synthesized rule for them.
        let spec =
            json!({"linux": {"resources": {"devices": [{"allow": true, "type": "c", "major": 195, "access": "rwm"}]}}});
        let rules: Vec<String> = record(&spec, root.path(), "", "").rules.iter().map(describe_rule).collect();
        assert_eq!(rules, ["allow c 195:* rwm", "allow c 511:1 rwm"]);
    }

    #[test]
    fn mountinfo_parsing_and_escapes() {
        let m =
            parse_mountinfo("36 35 98:0 /mnt1 /mnt2 rw,noatime master:1 shared:2 - ext3 /dev/root rw,errors=continue");
        assert_eq!(
            m,
            vec![MountInfo {
                mount_id: 36,
                parent_id: 35,
                major: 98,
                minor: 0,
                root: "/mnt1".into(),
                mount_point: "/mnt2".into(),
                options: vec!["rw".into(), "noatime".into()],
                optional: vec!["master:1".into(), "shared:2".into()],
                fs_type: "ext3".into(),
                source: "/dev/root".into(),
                super_options: vec!["rw".into(), "errors=continue".into()],
            }]
        );
        assert_eq!(unescape_octal(r"/a\040b\011c\012d\134e"), "/a b\tc\nd\\e");
        assert_eq!(unescape_octal(r"/bad\08x\7\"), r"/bad\08x\7\");
        assert_eq!(unescape_octal(r"\777"), r"\777", "not a byte: kept as is");
        assert!(parse_mountinfo("1 2 3:4 / /x rw").is_empty(), "no separator");
        assert!(parse_mountinfo("1 2 3:4 / - ext4 x rw").is_empty(), "too few fields");
        assert!(parse_mountinfo("a 2 3:4 / /x rw - ext4 x rw").is_empty());
        assert_eq!(parse_mountinfo("1 2 3:4 / /x rw - ext4").len(), 1, "source and super options may be missing");
    }

    #[test]
    fn host_source_takes_the_longest_matching_root() {
        let host = parse_mountinfo(
            "1 0 8:1 / / rw - ext4 /dev/sda1 rw\n\
             2 1 8:1 /var/lib/drivers /opt/d rw - ext4 /dev/sda1 rw\n\
             3 1 8:1 /var/lib/drivers /opt/again rw - ext4 /dev/sda1 rw\n\
             4 1 8:1 /var/lib/drivers2 /opt/d2 rw - ext4 /dev/sda1 rw\n\
             5 1 8:3 /x /y rw - ext4 /dev/sda3 rw\n",
        );
        let entry = |root: &str, dev: (u32, u32)| MountInfo {
            root: root.into(),
            major: dev.0,
            minor: dev.1,
            ..parse_mountinfo("9 1 0:0 / /c rw - ext4 x rw").remove(0)
        };
        assert_eq!(
            host_source(&entry("/usr/lib/x86_64-linux-gnu/libcuda.so.580.65", (8, 1)), &host).as_deref(),
            Some("/usr/lib/x86_64-linux-gnu/libcuda.so.580.65")
        );
        assert_eq!(
            host_source(&entry("/var/lib/drivers/libcuda.so", (8, 1)), &host).as_deref(),
            Some("/opt/d/libcuda.so")
        );
        assert_eq!(host_source(&entry("/var/lib/drivers", (8, 1)), &host).as_deref(), Some("/opt/d"));
        // Prefix is by path component: /var/lib/drivers2x is not under /var/lib/drivers2.
        assert_eq!(host_source(&entry("/var/lib/drivers2x/a", (8, 1)), &host).as_deref(), Some("/var/lib/drivers2x/a"));
        assert_eq!(host_source(&entry("/z", (8, 3)), &host), None, "root /x is no prefix of /z");
        assert_eq!(host_source(&entry("/a", (7, 7)), &host), None, "no mount of that device");
    }

    fn gpu_devices() -> (tempfile::TempDir, GpuDevices) {
        let dir = tempfile::tempdir().unwrap();
        let lib = dir.path().join("libcuda.so.580.65.06");
        fs::write(&lib, "").unwrap();
        let lib = lib.to_string_lossy().into_owned();
        let gpu = GpuDevices {
            devices: vec![
                DeviceNode {
                    path: "/dev/nvidia0".into(),
                    kind: "c".into(),
                    major: 195,
                    minor: 0,
                    file_mode: Some(0o666),
                    uid: Some(0),
                    gid: Some(0),
                },
                DeviceNode {
                    path: "/dev/nvidiactl".into(),
                    kind: "c".into(),
                    major: 195,
                    minor: 255,
                    file_mode: None,
                    uid: None,
                    gid: None,
                },
            ],
            rules: vec![
                DeviceRule {
                    allow: true,
                    kind: Some("c".into()),
                    major: Some(195),
                    minor: Some(0),
                    access: Some("rwm".into()),
                },
                DeviceRule {
                    allow: true,
                    kind: Some("c".into()),
                    major: Some(195),
                    minor: Some(255),
                    access: Some("rwm".into()),
                },
            ],
            mounts: vec![
                MountRecord {
                    destination: "/usr/lib/x86_64-linux-gnu/libcuda.so.580.65.06".into(),
                    source: lib,
                    kind: "bind".into(),
                    options: vec!["rbind".into(), "nosuid".into(), "nodev".into(), "ro".into()],
                },
                MountRecord {
                    destination: "/usr/bin/nvidia-smi".into(),
                    source: dir.path().join("missing/nvidia-smi").to_string_lossy().into_owned(),
                    kind: "bind".into(),
                    options: vec!["rbind".into()],
                },
            ],
            cdi_devices: vec![],
        };
        (dir, gpu)
    }

    #[test]
    fn inject_into_a_minimal_spec_creates_the_sections() {
        let (dir, gpu) = gpu_devices();
        let mut spec = json!({"ociVersion": "1.0.2", "root": {"path": "rootfs"}});
        let lines = inject(&mut spec, &gpu);
        let missing = dir.path().join("missing/nvidia-smi");
        assert_eq!(
            lines,
            vec![
                "device /dev/nvidia0 (c 195:0)".to_string(),
                "device /dev/nvidiactl (c 195:255)".to_string(),
                "devices cgroup rule allow c 195:0 rwm".to_string(),
                "devices cgroup rule allow c 195:255 rwm".to_string(),
                format!("skipped mount /usr/bin/nvidia-smi: source {} does not exist on this node", missing.display()),
                format!("mount /usr/lib/x86_64-linux-gnu/libcuda.so.580.65.06 from {}", gpu.mounts[0].source),
            ]
        );
        assert_eq!(
            spec["linux"]["devices"],
            json!([
                {"path": "/dev/nvidia0", "type": "c", "major": 195, "minor": 0, "fileMode": 438, "uid": 0, "gid": 0},
                {"path": "/dev/nvidiactl", "type": "c", "major": 195, "minor": 255}
            ])
        );
        assert_eq!(
            spec["linux"]["resources"]["devices"],
            json!([
                {"allow": true, "type": "c", "major": 195, "minor": 0, "access": "rwm"},
                {"allow": true, "type": "c", "major": 195, "minor": 255, "access": "rwm"}
            ])
        );
        assert_eq!(
            spec["mounts"],
            json!([{"destination": "/usr/lib/x86_64-linux-gnu/libcuda.so.580.65.06", "type": "bind",
                    "source": gpu.mounts[0].source, "options": ["rbind", "nosuid", "nodev", "ro"]}])
        );
        assert_eq!(spec["root"], json!({"path": "rootfs"}));
        // Again: nothing changes; only the skipped mount is reported again.
        let before = spec.clone();
        let lines = inject(&mut spec, &gpu);
        assert_eq!(spec, before);
        assert_eq!(lines.len(), 1);
        assert!(lines[0].starts_with("skipped mount /usr/bin/nvidia-smi"), "{lines:?}");
    }

    #[test]
    fn inject_into_a_full_spec_appends_and_keeps_everything_else() {
        let (_dir, mut gpu) = gpu_devices();
        gpu.mounts.pop(); // only mounts whose source exists: a second injection returns nothing
        let mut spec = full_spec();
        // The restore spec may already carry some of it (here /dev/nvidia0 and its rule).
        let lines = inject(&mut spec, &gpu);
        assert_eq!(
            lines,
            vec![
                "device /dev/nvidiactl (c 195:255)".to_string(),
                "devices cgroup rule allow c 195:0 rwm".to_string(),
                "devices cgroup rule allow c 195:255 rwm".to_string(),
                format!("mount /usr/lib/x86_64-linux-gnu/libcuda.so.580.65.06 from {}", gpu.mounts[0].source),
            ]
        );
        let rules = spec["linux"]["resources"]["devices"].as_array().unwrap();
        assert_eq!(rules[0], json!({"allow": false, "access": "rwm"}), "the deny-all stays first");
        assert_eq!(rules.len(), 7);
        assert_eq!(rules[5], json!({"allow": true, "type": "c", "major": 195, "minor": 0, "access": "rwm"}));
        assert_eq!(spec["linux"]["devices"].as_array().unwrap().len(), 7);
        assert_eq!(spec["linux"]["devices"][5], json!("not an object"));
        assert_eq!(spec["linux"]["resources"]["memory"], json!({"limit": 1}));
        assert_eq!(spec["linux"]["namespaces"], json!([{"type": "pid"}]));
        assert_eq!(spec["x-future-field"], json!({"a": [1, 2]}));
        assert_eq!(spec["annotations"]["x-unknown"], json!("kept"));
        assert_eq!(spec["mounts"].as_array().unwrap().len(), 8);

        let before = spec.clone();
        assert_eq!(inject(&mut spec, &gpu), Vec::<String>::new());
        assert_eq!(spec, before);
    }

    #[test]
    fn inject_never_panics_on_odd_specs() {
        let (_dir, gpu) = gpu_devices();
        let mut not_object = json!([1]);
        assert_eq!(inject(&mut not_object, &gpu).len(), 1);
        assert_eq!(not_object, json!([1]));

        let mut odd = json!({"linux": {"devices": 3, "resources": "x"}, "mounts": {"a": 1}});
        let lines = inject(&mut odd, &gpu);
        assert!(lines.iter().any(|l| l.contains("linux.devices is not an array")), "{lines:?}");
        assert!(lines.iter().any(|l| l.contains("linux.resources.devices is not an array")), "{lines:?}");
        assert!(lines.iter().any(|l| l.contains("mounts is not an array")), "{lines:?}");
        assert_eq!(odd, json!({"linux": {"devices": 3, "resources": "x"}, "mounts": {"a": 1}}));

        let mut nulls = json!({"linux": null, "mounts": null});
        inject(&mut nulls, &gpu);
        assert_eq!(nulls["linux"]["devices"].as_array().map(Vec::len), Some(2));

        let mut untouched = json!({"a": 1});
        assert!(inject(&mut untouched, &GpuDevices::default()).is_empty());
        assert_eq!(untouched, json!({"a": 1}), "nothing to add: no sections created");
    }

    #[test]
    fn recorded_then_injected_round_trip() {
        let root = tempfile::tempdir().unwrap();
        let spec = full_spec();
        let recorded = record(&spec, root.path(), "", "");
        // Into the spec it came from, only the synthesized uvm rule is new (mount sources do
        // not exist here, so those are skipped, not added).
        let mut again = spec.clone();
        let lines = inject_with(&mut again, &recorded, &|_| true);
        assert_eq!(lines, vec!["devices cgroup rule allow c 508:0 rwm".to_string()]);
        // Into a bare spec, everything comes back.
        let mut bare = json!({});
        inject_with(&mut bare, &recorded, &|_| true);
        assert_eq!(bare["linux"]["devices"].as_array().map(Vec::len), Some(2));
        assert_eq!(bare["mounts"].as_array().map(Vec::len), Some(3));
    }
}
