//! What an OCI spec grants the processes of its container: the parts of `config.json` that decide
//! privileges (user, capabilities, no_new_privs, seccomp, LSM labels, namespaces, id maps,
//! mounts, read-only and masked paths, devices). Read from JSON so that fields this crate does not
//! know never make a spec unreadable.

use serde_json::Value;

use super::caps;
use crate::images::{CapSets, NsKind};

/// A spec field of the wrong shape. Names the field.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("spec field {field}: {reason}")]
pub struct SpecError {
    pub field: String,
    pub reason: String,
}

/// One `linux.uidMappings` / `gidMappings` entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IdMap {
    pub container_id: u32,
    pub host_id: u32,
    pub size: u32,
}

impl IdMap {
    fn contains(&self, id: u32) -> bool {
        id >= self.container_id && u64::from(id) < u64::from(self.container_id) + u64::from(self.size)
    }
}

/// One `mounts[]` entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpecMount {
    /// Lexically cleaned, absolute.
    pub destination: String,
    pub kind: String,
    pub source: String,
    pub options: Vec<String>,
}

impl SpecMount {
    pub fn readonly(&self) -> bool {
        self.options.iter().any(|o| o == "ro")
    }

    pub fn is_bind(&self) -> bool {
        self.kind == "bind" || self.options.iter().any(|o| o == "bind" || o == "rbind")
    }
}

/// One `linux.devices` entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpecDevice {
    pub path: String,
    /// 'c', 'b', 'u' or 'p'.
    pub kind: char,
    pub major: i64,
    pub minor: i64,
}

/// The privilege-relevant parts of a spec.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpecGrants {
    pub uid: u32,
    pub gid: u32,
    pub additional_gids: Vec<u32>,
    /// Without `process.capabilities` runc changes nothing: root keeps every capability.
    pub caps: CapSets,
    /// Capability names in the spec this crate does not know (runc ignores them too).
    pub unknown_caps: Vec<String>,
    pub no_new_privs: bool,
    /// `linux.seccomp` is set: runc installs a filter.
    pub seccomp: bool,
    /// `linux.seccomp.defaultAction`, for messages.
    pub seccomp_default_action: Option<String>,
    pub apparmor_profile: Option<String>,
    pub selinux_label: Option<String>,
    /// `linux.namespaces`: the kinds the container gets its own (or a joined) namespace of, with
    /// the path of a joined one.
    pub namespaces: Vec<(NsKind, Option<String>)>,
    pub uid_mappings: Vec<IdMap>,
    pub gid_mappings: Vec<IdMap>,
    pub mounts: Vec<SpecMount>,
    pub readonly_paths: Vec<String>,
    pub masked_paths: Vec<String>,
    pub root_readonly: bool,
    pub devices: Vec<SpecDevice>,
    pub terminal: bool,
    /// `linux.sysctl` keys.
    pub sysctls: Vec<String>,
}

impl SpecGrants {
    /// Reads a spec (`config.json` as JSON). Missing parts take runc's meaning of their absence.
    pub fn from_spec(spec: &Value) -> Result<Self, SpecError> {
        let process = spec.get("process").unwrap_or(&Value::Null);
        let linux = spec.get("linux").unwrap_or(&Value::Null);
        let user = process.get("user").unwrap_or(&Value::Null);
        let (caps, unknown_caps) = match process.get("capabilities") {
            None | Some(Value::Null) => (
                CapSets {
                    effective: caps::ALL,
                    permitted: caps::ALL,
                    inheritable: caps::ALL,
                    bounding: caps::ALL,
                    ambient: 0,
                },
                Vec::new(),
            ),
            Some(c) => read_caps(c)?,
        };
        let namespaces = array(linux, "namespaces", "linux.namespaces")?
            .iter()
            .enumerate()
            .map(|(i, n)| {
                let field = format!("linux.namespaces[{i}]");
                let kind = str_field(n, "type", &field)?.unwrap_or_default();
                // The time namespace (runc ≥ 1.2) holds only clock offsets: nothing to compare.
                if kind == "time" {
                    return Ok(None);
                }
                let kind = NsKind::from_oci_name(&kind).ok_or_else(|| SpecError {
                    field: format!("{field}.type"),
                    reason: format!("unknown namespace type {kind:?}"),
                })?;
                Ok(Some((kind, str_field(n, "path", &field)?.filter(|p| !p.is_empty()))))
            })
            .filter_map(Result::transpose)
            .collect::<Result<Vec<_>, SpecError>>()?;
        let mounts = array(spec, "mounts", "mounts")?
            .iter()
            .enumerate()
            .map(|(i, m)| {
                let field = format!("mounts[{i}]");
                let destination = str_field(m, "destination", &field)?
                    .ok_or_else(|| SpecError { field: format!("{field}.destination"), reason: "missing".into() })?;
                Ok(SpecMount {
                    destination: clean_path(&destination),
                    kind: str_field(m, "type", &field)?.unwrap_or_default(),
                    source: str_field(m, "source", &field)?.unwrap_or_default(),
                    options: strings(m, "options", &format!("{field}.options"))?,
                })
            })
            .collect::<Result<Vec<_>, SpecError>>()?;
        let devices = array(linux, "devices", "linux.devices")?
            .iter()
            .enumerate()
            .map(|(i, d)| {
                let field = format!("linux.devices[{i}]");
                let path = str_field(d, "path", &field)?.unwrap_or_default();
                let kind = str_field(d, "type", &field)?.and_then(|t| t.chars().next()).unwrap_or('c');
                let num = |k: &str| d.get(k).and_then(Value::as_i64).unwrap_or(-1);
                Ok(SpecDevice { path: clean_path(&path), kind, major: num("major"), minor: num("minor") })
            })
            .collect::<Result<Vec<_>, SpecError>>()?;
        let seccomp = linux.get("seccomp").filter(|s| !s.is_null());
        Ok(Self {
            uid: u32_field(user, "uid", "process.user.uid")?.unwrap_or(0),
            gid: u32_field(user, "gid", "process.user.gid")?.unwrap_or(0),
            additional_gids: array(user, "additionalGids", "process.user.additionalGids")?
                .iter()
                .map(|g| {
                    g.as_u64().and_then(|g| u32::try_from(g).ok()).ok_or_else(|| SpecError {
                        field: "process.user.additionalGids".into(),
                        reason: format!("{g} is not a gid"),
                    })
                })
                .collect::<Result<_, _>>()?,
            caps,
            unknown_caps,
            no_new_privs: process.get("noNewPrivileges").and_then(Value::as_bool).unwrap_or(false),
            seccomp: seccomp.is_some(),
            seccomp_default_action: seccomp
                .and_then(|s| s.get("defaultAction"))
                .and_then(Value::as_str)
                .map(str::to_string),
            apparmor_profile: str_field(process, "apparmorProfile", "process")?.filter(|s| !s.is_empty()),
            selinux_label: str_field(process, "selinuxLabel", "process")?.filter(|s| !s.is_empty()),
            namespaces,
            uid_mappings: id_maps(linux, "uidMappings")?,
            gid_mappings: id_maps(linux, "gidMappings")?,
            mounts,
            readonly_paths: strings(linux, "readonlyPaths", "linux.readonlyPaths")?
                .iter()
                .map(|p| clean_path(p))
                .collect(),
            masked_paths: strings(linux, "maskedPaths", "linux.maskedPaths")?.iter().map(|p| clean_path(p)).collect(),
            root_readonly: spec.pointer("/root/readonly").and_then(Value::as_bool).unwrap_or(false),
            devices,
            terminal: process.get("terminal").and_then(Value::as_bool).unwrap_or(false),
            sysctls: linux
                .get("sysctl")
                .and_then(Value::as_object)
                .map(|m| m.keys().cloned().collect())
                .unwrap_or_default(),
        })
    }

    /// Whether the container gets its own (or a joined) namespace of `kind`, not the host's.
    pub fn has_namespace(&self, kind: NsKind) -> bool {
        self.namespaces.iter().any(|(k, _)| *k == kind)
    }

    /// Whether runc creates a new namespace of `kind` for the container (listed, without a path
    /// to join).
    pub fn creates_namespace(&self, kind: NsKind) -> bool {
        self.namespaces.iter().any(|(k, path)| *k == kind && path.is_none())
    }

    /// Whether the container's uids/gids are those of a user namespace the spec maps.
    pub fn user_namespace(&self) -> bool {
        self.has_namespace(NsKind::User)
    }

    pub fn uid_mapped(&self, id: u32) -> bool {
        self.uid_mappings.iter().any(|m| m.contains(id))
    }

    pub fn gid_mapped(&self, id: u32) -> bool {
        self.gid_mappings.iter().any(|m| m.contains(id))
    }

    /// The capabilities a process of this container can hold in its permitted and effective
    /// sets: the spec's permitted, effective and ambient sets, and for a container that runs as
    /// root also its bounding and inheritable sets (at every execve the kernel gives a root
    /// process its bounding set, whatever runc left in its permitted set).
    pub fn holdable(&self) -> u64 {
        let c = &self.caps;
        let mut mask = c.permitted | c.effective | c.ambient;
        if self.uid == 0 {
            mask |= c.bounding | c.inheritable;
        }
        mask
    }

    /// The mount at `destination`, the last one when several (as runc mounts them in order).
    pub fn mount_at(&self, destination: &str) -> Option<&SpecMount> {
        self.mounts.iter().rev().find(|m| m.destination == destination)
    }
}

fn read_caps(c: &Value) -> Result<(CapSets, Vec<String>), SpecError> {
    let mut unknown = Vec::new();
    let mut set = |name: &str| -> Result<u64, SpecError> {
        let field = format!("process.capabilities.{name}");
        let mut mask = 0u64;
        for n in strings(c, name, &field)? {
            match caps::bit(&n) {
                Some(b) => mask |= 1u64 << b,
                None => {
                    if !unknown.contains(&n) {
                        unknown.push(n);
                    }
                }
            }
        }
        Ok(mask)
    };
    let sets = CapSets {
        effective: set("effective")?,
        permitted: set("permitted")?,
        inheritable: set("inheritable")?,
        bounding: set("bounding")?,
        ambient: set("ambient")?,
    };
    Ok((sets, unknown))
}

fn id_maps(linux: &Value, key: &str) -> Result<Vec<IdMap>, SpecError> {
    array(linux, key, &format!("linux.{key}"))?
        .iter()
        .enumerate()
        .map(|(i, m)| {
            let field = format!("linux.{key}[{i}]");
            let get = |k: &str| {
                u32_field(m, k, &format!("{field}.{k}"))?
                    .ok_or_else(|| SpecError { field: format!("{field}.{k}"), reason: "missing".into() })
            };
            Ok(IdMap { container_id: get("containerID")?, host_id: get("hostID")?, size: get("size")? })
        })
        .collect()
}

fn array<'a>(v: &'a Value, key: &str, field: &str) -> Result<&'a [Value], SpecError> {
    match v.get(key) {
        None | Some(Value::Null) => Ok(&[]),
        Some(Value::Array(a)) => Ok(a),
        Some(other) => Err(SpecError { field: field.into(), reason: format!("not a list: {other}") }),
    }
}

fn strings(v: &Value, key: &str, field: &str) -> Result<Vec<String>, SpecError> {
    array(v, key, field)?
        .iter()
        .map(|s| {
            s.as_str()
                .map(str::to_string)
                .ok_or_else(|| SpecError { field: field.into(), reason: format!("{s} is not a string") })
        })
        .collect()
}

fn str_field(v: &Value, key: &str, field: &str) -> Result<Option<String>, SpecError> {
    match v.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(other) => Err(SpecError { field: format!("{field}.{key}"), reason: format!("{other} is not a string") }),
    }
}

fn u32_field(v: &Value, key: &str, field: &str) -> Result<Option<u32>, SpecError> {
    match v.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(n) => n
            .as_u64()
            .and_then(|n| u32::try_from(n).ok())
            .map(Some)
            .ok_or_else(|| SpecError { field: field.into(), reason: format!("{n} is not a 32-bit unsigned number") }),
    }
}

/// An absolute path with `.`, `..` and repeated or trailing '/' resolved lexically (as runc
/// resolves a mount destination inside the rootfs, where `..` cannot leave `/`).
pub fn clean_path(p: &str) -> String {
    let mut parts: Vec<&str> = Vec::new();
    for c in p.split('/') {
        match c {
            "" | "." => {}
            ".." => {
                parts.pop();
            }
            c => parts.push(c),
        }
    }
    format!("/{}", parts.join("/"))
}

/// Whether `path` is `dir` or lies below it (both cleaned).
pub fn is_under(path: &str, dir: &str) -> bool {
    path == dir || dir == "/" || path.strip_prefix(dir).is_some_and(|rest| rest.starts_with('/'))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_default_spec_reads_as_runc_applies_it() {
        let spec = json!({
            "process": {
                "user": {"uid": 1000, "gid": 1000, "additionalGids": [5, 6]},
                "capabilities": {
                    "bounding": ["CAP_CHOWN", "CAP_KILL", "CAP_BOGUS"],
                    "effective": ["CAP_CHOWN"],
                    "permitted": ["CAP_CHOWN"]
                },
                "noNewPrivileges": true,
                "apparmorProfile": "cri-containerd.apparmor.d"
            },
            "root": {"path": "rootfs", "readonly": true},
            "mounts": [{"destination": "/proc/", "type": "proc", "source": "proc"},
                       {"destination": "/data//x/../y", "type": "bind", "source": "/srv", "options": ["rbind", "ro"]}],
            "linux": {
                "namespaces": [{"type": "pid"}, {"type": "network", "path": "/var/run/netns/x"}, {"type": "user"}],
                "uidMappings": [{"containerID": 0, "hostID": 100000, "size": 65536}],
                "seccomp": {"defaultAction": "SCMP_ACT_ERRNO"},
                "readonlyPaths": ["/proc/sys"],
                "maskedPaths": ["/proc/kcore"],
                "devices": [{"path": "/dev/nvidia0", "type": "c", "major": 195, "minor": 0}]
            }
        });
        let g = SpecGrants::from_spec(&spec).unwrap();
        assert_eq!((g.uid, g.gid, g.additional_gids.clone()), (1000, 1000, vec![5, 6]));
        assert_eq!(g.caps.bounding, (1 << 0) | (1 << 5));
        assert_eq!(g.caps.inheritable, 0);
        assert_eq!(g.unknown_caps, vec!["CAP_BOGUS".to_string()]);
        // Not root: only what runc leaves in its sets (ambient included), not the bounding set.
        assert_eq!(g.holdable(), 1);
        assert!(g.no_new_privs && g.seccomp && g.root_readonly && g.user_namespace());
        assert!(g.has_namespace(NsKind::Network) && !g.has_namespace(NsKind::Mount));
        assert!(g.uid_mapped(0) && g.uid_mapped(65535) && !g.uid_mapped(65536));
        assert!(!g.gid_mapped(0), "no gid maps: nothing mapped");
        assert_eq!(g.mounts[0].destination, "/proc");
        assert_eq!(g.mounts[1].destination, "/data/y");
        assert!(g.mounts[1].is_bind() && g.mounts[1].readonly());
        assert_eq!(g.devices[0].major, 195);
    }

    #[test]
    fn no_capabilities_field_means_runc_drops_nothing() {
        let g = SpecGrants::from_spec(&json!({"process": {"user": {"uid": 0, "gid": 0}}})).unwrap();
        assert_eq!(g.caps.bounding, caps::ALL);
        assert_eq!(g.holdable(), caps::ALL);
        let root =
            SpecGrants::from_spec(&json!({"process": {"capabilities": {"bounding": ["CAP_SYS_ADMIN"]}}})).unwrap();
        assert!(caps::has(root.holdable(), caps::SYS_ADMIN), "root gets its bounding set at execve");
    }

    #[test]
    fn malformed_fields_are_named() {
        let e = SpecGrants::from_spec(&json!({"process": {"capabilities": {"bounding": "CAP_X"}}})).unwrap_err();
        assert_eq!(e.field, "process.capabilities.bounding");
        let e = SpecGrants::from_spec(&json!({"linux": {"namespaces": [{"type": "time"}, {"type": "time-travel"}]}}))
            .unwrap_err();
        assert_eq!(e.field, "linux.namespaces[1].type");
        let e = SpecGrants::from_spec(&json!({"process": {"user": {"uid": -1}}})).unwrap_err();
        assert_eq!(e.field, "process.user.uid");
    }

    #[test]
    fn paths_are_cleaned_lexically() {
        assert_eq!(clean_path("/a/./b//c/"), "/a/b/c");
        assert_eq!(clean_path("/../../etc"), "/etc");
        assert_eq!(clean_path(""), "/");
        assert!(is_under("/sys/fs/cgroup/cpu", "/sys/fs/cgroup"));
        assert!(!is_under("/sys/fs/cgroupx", "/sys/fs/cgroup"));
        assert!(is_under("/x", "/"));
    }
}
