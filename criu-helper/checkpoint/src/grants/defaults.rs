//! What an OCI spec grants beyond the *image defaults*: the spec containerd makes for a container
//! of an image (`oci.WithDefaultSpec`, as `ctr run` and the CRI plugin start from) with the
//! RuntimeDefault seccomp profile. `kybernate restore` creates the new container from a spec
//! that may come from an untrusted checkpoint (`spec.dump`: its sha256 sums detect corruption,
//! not tampering), so everything such a spec would give the container beyond that baseline is
//! named before anything is created.
//!
//! The baseline: containerd's 14 default capabilities; own pid, ipc, uts, mount and network
//! namespaces (none joined by path); no `linux.devices` beyond runc's own nodes; no devices-cgroup
//! allow rule beyond containerd's and runc's defaults; no bind mounts from the host and no
//! filesystems other than containerd's (proc at /proc, /sys read-only, tmpfs, devpts, mqueue,
//! cgroup read-only); containerd's masked and read-only paths; a seccomp profile that denies
//! what RuntimeDefault denies; AppArmor and SELinux not unconfined; noNewPrivileges set; no hooks;
//! no `org.criu.config`; no CDI device annotations.

use std::fmt;

use serde_json::Value;

use super::spec::{SpecError, SpecGrants, SpecMount};
use super::{caps, shown};
use crate::images::NsKind;

/// containerd's default masked paths (containerd 1.6; later releases add more, never fewer).
pub const MASKED_PATHS: [&str; 10] = [
    "/proc/acpi",
    "/proc/asound",
    "/proc/kcore",
    "/proc/keys",
    "/proc/latency_stats",
    "/proc/timer_list",
    "/proc/timer_stats",
    "/proc/sched_debug",
    "/sys/firmware",
    "/proc/scsi",
];

/// containerd's default read-only paths.
pub const READONLY_PATHS: [&str; 5] = ["/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger"];

/// The namespaces containerd's default spec gives a container of its own.
pub const OWN_NAMESPACES: [NsKind; 5] = [NsKind::Pid, NsKind::Ipc, NsKind::Uts, NsKind::Mount, NsKind::Network];

/// Character devices every container may use (containerd's default devices-cgroup rules, which
/// runc also creates): null, zero, full, random, urandom, tty, console, ptmx; `None`: any minor
/// (136: the pty slaves).
const DEFAULT_CHAR_DEVICES: [(i64, Option<i64>); 9] = [
    (1, Some(3)),
    (1, Some(5)),
    (1, Some(7)),
    (1, Some(8)),
    (1, Some(9)),
    (5, Some(0)),
    (5, Some(1)),
    (5, Some(2)),
    (136, None),
];

/// Filesystems of containerd's default mounts that give nothing of the host wherever they are
/// mounted (a new tmpfs, a new devpts instance, the container's own mqueue).
const HARMLESS_FILESYSTEMS: [&str; 3] = ["tmpfs", "devpts", "mqueue"];

/// Syscalls RuntimeDefault (containerd's default profile, with the default capabilities) does
/// not allow, that reach past the container: keys, BPF, perf, namespaces, mounts, kernel
/// modules and kexec, handles to host files, the clock, swap, reboot, raw I/O ports. A profile
/// that allows any of them is weaker than the baseline. (containerd 1.7 and 2.x allow
/// `name_to_handle_at`, `process_vm_readv` and `process_vm_writev` by default: not listed.)
const DENIED_SYSCALLS: [&str; 46] = [
    "acct",
    "add_key",
    "bpf",
    "clock_settime",
    "clone3",
    "create_module",
    "delete_module",
    "finit_module",
    "fsconfig",
    "fsmount",
    "fsopen",
    "fspick",
    "get_kernel_syms",
    "init_module",
    "ioperm",
    "iopl",
    "kcmp",
    "kexec_file_load",
    "kexec_load",
    "keyctl",
    "lookup_dcookie",
    "mount",
    "mount_setattr",
    "move_mount",
    "nfsservctl",
    "open_by_handle_at",
    "open_tree",
    "perf_event_open",
    "pivot_root",
    "query_module",
    "quotactl",
    "reboot",
    "request_key",
    "setns",
    "settimeofday",
    "swapoff",
    "swapon",
    "syslog",
    "umount",
    "umount2",
    "unshare",
    "uselib",
    "userfaultfd",
    "ustat",
    "vm86",
    "vm86old",
];

/// A spec that lacks at most this many capabilities is called privileged (`ctr run --privileged`
/// grants the capabilities containerd holds, which a node may restrict).
const MAX_MISSING_FOR_PRIVILEGED: u32 = 3;

/// Seccomp actions that let a syscall through.
const ALLOW_ACTIONS: [&str; 2] = ["SCMP_ACT_ALLOW", "SCMP_ACT_LOG"];

/// The annotation runc hands to CRIU as a config file (`--config`), on checkpoint and restore.
pub const CRIU_CONFIG_ANNOTATION: &str = "org.criu.config";
/// The annotation prefix through which CDI devices are requested (the GPU runtime injects them).
pub const CDI_ANNOTATION_PREFIX: &str = "cdi.k8s.io/";

/// Hook stages that run in the runtime's (the host's) namespaces.
const HOST_HOOK_STAGES: [&str; 4] = ["prestart", "createRuntime", "poststart", "poststop"];

/// One thing a spec grants beyond the image defaults. `Display` is one line for a terminal.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Privilege {
    /// Every capability (or no `process.capabilities` at all: runc then drops none).
    AllCapabilities,
    /// Every capability but a few: what `--privileged` gives on a node whose runtime lacks some
    /// (containerd grants the capabilities it holds itself).
    AllCapabilitiesBut(Vec<String>),
    /// Capabilities beyond containerd's defaults, in any of the five sets.
    Capabilities(Vec<String>),
    /// No namespace of this kind in the spec: the host's.
    HostNamespace(NsKind),
    /// A namespace joined by path (whatever namespace that path names when runc runs).
    JoinedNamespace {
        kind: NsKind,
        path: String,
    },
    /// A bind mount of a host path.
    HostBindMount {
        source: String,
        destination: String,
        writable: bool,
    },
    /// A filesystem containerd's default spec does not mount (or not there): a device's
    /// filesystem, debugfs, a second proc or sysfs outside the masked paths, ...
    ExtraMount {
        kind: String,
        source: String,
        destination: String,
        writable: bool,
    },
    /// sysfs or a cgroup filesystem mounted read-write.
    WritableKernelFs {
        kind: String,
        destination: String,
    },
    /// A `linux.devices` entry: a device node runc creates in the container.
    Device {
        path: String,
        kind: char,
        major: i64,
        minor: i64,
    },
    /// A devices-cgroup allow rule beyond the defaults.
    DeviceRule {
        kind: char,
        major: Option<i64>,
        minor: Option<i64>,
        access: String,
    },
    /// No `linux.seccomp`.
    SeccompUnconfined,
    /// A profile that lets through every syscall it does not name.
    SeccompDefaultAllow {
        action: String,
    },
    /// A profile that allows syscalls RuntimeDefault denies.
    SeccompSyscalls(Vec<String>),
    MaskedPathsRemoved(Vec<String>),
    ReadonlyPathsRemoved(Vec<String>),
    AppArmorUnconfined,
    SelinuxUnconfined {
        label: String,
    },
    /// `process.noNewPrivileges` not set.
    NoNewPrivsOff,
    /// A hook: a host binary runc runs as root.
    Hook {
        stage: String,
        path: String,
        args: Vec<String>,
    },
    /// `org.criu.config`: a CRIU config file runc passes to CRIU (which runs as root).
    CriuConfig {
        path: String,
    },
    /// A CDI device request, which the GPU runtime turns into device nodes and host mounts.
    CdiDevices {
        annotation: String,
        devices: String,
    },
}

impl fmt::Display for Privilege {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Privilege::AllCapabilities => f.write_str("privileged: all capabilities"),
            Privilege::AllCapabilitiesBut(missing) => {
                write!(f, "privileged: all capabilities but {}", shown_list(missing))
            }
            Privilege::Capabilities(names) => {
                let word = if names.len() == 1 { "capability" } else { "capabilities" };
                write!(f, "{word} {} added", shown_list(names))
            }
            Privilege::HostNamespace(kind) => write!(f, "host {kind} namespace"),
            Privilege::JoinedNamespace { kind, path } => write!(f, "{kind} namespace joined from {}", shown(path)),
            Privilege::HostBindMount { source, destination, writable } => {
                write!(f, "host bind mount {} at {} ({})", shown(source), shown(destination), rw(*writable))
            }
            Privilege::ExtraMount { kind, source, destination, writable } => {
                let from = if source.starts_with('/') { format!(" from {}", shown(source)) } else { String::new() };
                write!(
                    f,
                    "{} mount at {}{from} ({}; containerd's default spec mounts no such filesystem there)",
                    shown(kind),
                    shown(destination),
                    rw(*writable)
                )
            }
            Privilege::WritableKernelFs { kind, destination } if kind == "sysfs" && destination == "/sys" => {
                f.write_str("/sys read-write")
            }
            Privilege::WritableKernelFs { kind, destination } => {
                write!(f, "{} read-write ({})", shown(destination), shown(kind))
            }
            Privilege::Device { path, kind, major, minor } => {
                write!(f, "device {} ({} {major}:{minor})", shown(path), shown(&kind.to_string()))
            }
            Privilege::DeviceRule { kind, major, minor, access } => {
                let num = |n: &Option<i64>| n.map_or_else(|| "*".to_string(), |n| n.to_string());
                let rule = format!("{} {}:{} {}", shown(&kind.to_string()), num(major), num(minor), shown(access));
                match (kind, major, minor) {
                    ('a', None, None) => write!(f, "devices cgroup allows all devices ({rule})"),
                    ('c', None, None) => write!(f, "devices cgroup allows all character devices ({rule})"),
                    ('b', None, None) => write!(f, "devices cgroup allows all block devices ({rule})"),
                    _ => write!(f, "devices cgroup allows {rule}"),
                }
            }
            Privilege::SeccompUnconfined => f.write_str("seccomp unconfined (no profile)"),
            Privilege::SeccompDefaultAllow { action } => {
                write!(f, "seccomp profile allows every syscall it does not name (defaultAction {})", shown(action))
            }
            Privilege::SeccompSyscalls(names) => write!(
                f,
                "seccomp profile allows {} (containerd's default profile denies {})",
                shown_list(names),
                if names.len() == 1 { "it" } else { "them" }
            ),
            Privilege::MaskedPathsRemoved(paths) => write!(f, "masked paths removed: {}", shown_list(paths)),
            Privilege::ReadonlyPathsRemoved(paths) => write!(f, "read-only paths removed: {}", shown_list(paths)),
            Privilege::AppArmorUnconfined => f.write_str("AppArmor unconfined"),
            Privilege::SelinuxUnconfined { label } => write!(f, "SELinux unconfined (label {})", shown(label)),
            Privilege::NoNewPrivsOff => {
                f.write_str("no_new_privs off (setuid binaries and file capabilities can raise privileges)")
            }
            Privilege::Hook { stage, path, args } => {
                let mut command = shown(path);
                for a in args.iter().skip(1) {
                    command.push(' ');
                    command.push_str(&shown(a));
                }
                let how = if HOST_HOOK_STAGES.contains(&stage.as_str()) {
                    "runs on the host as root"
                } else {
                    "a host binary, runs as root in the container's namespaces"
                };
                write!(f, "hooks: {} {command} ({how})", shown(stage))
            }
            Privilege::CriuConfig { path } => write!(
                f,
                "CRIU config file {} ({CRIU_CONFIG_ANNOTATION}: CRIU options, scripts included, run as root)",
                shown(path)
            ),
            Privilege::CdiDevices { annotation, devices } => write!(
                f,
                "CDI devices {} (annotation {}: the GPU runtime adds their device nodes and host mounts)",
                shown(devices),
                shown(annotation)
            ),
        }
    }
}

fn rw(writable: bool) -> &'static str {
    if writable {
        "rw"
    } else {
        "ro"
    }
}

fn shown_list(items: &[String]) -> String {
    items.iter().map(|s| shown(s)).collect::<Vec<_>>().join(", ")
}

/// Everything `spec` grants beyond the image defaults, in a fixed order (capabilities,
/// namespaces, mounts, devices, seccomp, masked and read-only paths, LSM, no_new_privs, hooks,
/// CRIU config, CDI). Empty: the spec grants nothing a default container would not have.
/// A field of the wrong shape is an error naming it (runc would refuse the spec, or read it in
/// a way this check cannot vouch for).
pub fn beyond_defaults(spec: &Value) -> Result<Vec<Privilege>, SpecError> {
    if !spec.is_object() {
        return Err(SpecError { field: "(document)".into(), reason: "not a JSON object".into() });
    }
    let grants = SpecGrants::from_spec(spec)?;
    let mut out = Vec::new();
    capabilities(&grants, &mut out);
    namespaces(&grants, &mut out);
    mounts(&grants.mounts, &mut out);
    devices(&grants, &mut out);
    device_rules(spec, &mut out)?;
    seccomp(spec, &grants, &mut out)?;
    paths(&grants, &mut out);
    lsm(&grants, &mut out);
    if !grants.no_new_privs {
        out.push(Privilege::NoNewPrivsOff);
    }
    hooks(spec, &mut out)?;
    annotations(spec, &mut out)?;
    Ok(out)
}

fn capabilities(g: &SpecGrants, out: &mut Vec<Privilege>) {
    let c = &g.caps;
    let all = c.effective | c.permitted | c.inheritable | c.bounding | c.ambient;
    let missing = caps::ALL & !all;
    if missing == 0 {
        out.push(Privilege::AllCapabilities);
        return;
    }
    if missing.count_ones() <= MAX_MISSING_FOR_PRIVILEGED {
        out.push(Privilege::AllCapabilitiesBut(caps::names(missing)));
        return;
    }
    let mut added = caps::names(all & !caps::container_defaults());
    added.extend(g.unknown_caps.iter().cloned());
    if !added.is_empty() {
        out.push(Privilege::Capabilities(added));
    }
}

fn namespaces(g: &SpecGrants, out: &mut Vec<Privilege>) {
    for kind in OWN_NAMESPACES {
        match g.namespaces.iter().find(|(k, _)| *k == kind) {
            None => out.push(Privilege::HostNamespace(kind)),
            Some((_, Some(path))) => out.push(Privilege::JoinedNamespace { kind, path: path.clone() }),
            Some((_, None)) => {}
        }
    }
}

fn mounts(mounts: &[SpecMount], out: &mut Vec<Privilege>) {
    for m in mounts {
        let writable = !m.readonly();
        if m.is_bind() {
            out.push(Privilege::HostBindMount {
                source: m.source.clone(),
                destination: m.destination.clone(),
                writable,
            });
            continue;
        }
        match m.kind.as_str() {
            "proc" if m.destination == "/proc" => {}
            "sysfs" if m.destination == "/sys" => {
                if writable {
                    out.push(Privilege::WritableKernelFs { kind: m.kind.clone(), destination: m.destination.clone() });
                }
            }
            "cgroup" | "cgroup2" => {
                if writable {
                    out.push(Privilege::WritableKernelFs { kind: m.kind.clone(), destination: m.destination.clone() });
                }
            }
            kind if HARMLESS_FILESYSTEMS.contains(&kind) => {}
            _ => out.push(Privilege::ExtraMount {
                kind: if m.kind.is_empty() { "(untyped)".into() } else { m.kind.clone() },
                source: m.source.clone(),
                destination: m.destination.clone(),
                writable,
            }),
        }
    }
}

fn is_default_char_device(major: i64, minor: i64) -> bool {
    DEFAULT_CHAR_DEVICES.iter().any(|&(maj, min)| maj == major && min.map_or(true, |m| m == minor))
}

fn devices(g: &SpecGrants, out: &mut Vec<Privilege>) {
    for d in &g.devices {
        if matches!(d.kind, 'c' | 'u') && is_default_char_device(d.major, d.minor) {
            continue;
        }
        out.push(Privilege::Device { path: d.path.clone(), kind: d.kind, major: d.major, minor: d.minor });
    }
}

/// `linux.resources.devices`: allow rules beyond containerd's defaults and runc's `c *:* m`,
/// `b *:* m` (creating nodes is allowed; using them is what the rules decide).
fn device_rules(spec: &Value, out: &mut Vec<Privilege>) -> Result<(), SpecError> {
    let Some(rules) = spec.pointer("/linux/resources/devices").filter(|v| !v.is_null()) else { return Ok(()) };
    let Some(rules) = rules.as_array() else {
        return Err(SpecError { field: "linux.resources.devices".into(), reason: format!("not a list: {rules}") });
    };
    for (i, r) in rules.iter().enumerate() {
        let field = |k: &str| format!("linux.resources.devices[{i}].{k}");
        let bad = |k: &str, v: &Value, what: &str| SpecError { field: field(k), reason: format!("{v} is not {what}") };
        let allow = match r.get("allow") {
            Some(Value::Bool(b)) => *b,
            Some(v) => return Err(bad("allow", v, "true or false")),
            None => return Err(SpecError { field: field("allow"), reason: "missing".into() }),
        };
        if !allow {
            continue;
        }
        let kind = match r.get("type") {
            None | Some(Value::Null) => 'a',
            Some(Value::String(s)) if s.is_empty() => 'a',
            Some(Value::String(s)) if s.len() == 1 => s.chars().next().unwrap_or('a'),
            Some(v) => return Err(bad("type", v, "a device type (a, c or b)")),
        };
        let number = |k: &str| -> Result<Option<i64>, SpecError> {
            match r.get(k) {
                None | Some(Value::Null) => Ok(None),
                Some(v) => match v.as_i64() {
                    Some(n) if n < 0 => Ok(None), // runc: -1 is the wildcard
                    Some(n) => Ok(Some(n)),
                    None => Err(bad(k, v, "a device number")),
                },
            }
        };
        let (major, minor) = (number("major")?, number("minor")?);
        // runc reads a missing or empty access as every access.
        let access = match r.get("access") {
            None | Some(Value::Null) => "rwm".to_string(),
            Some(Value::String(s)) if s.is_empty() => "rwm".to_string(),
            Some(Value::String(s)) => s.clone(),
            Some(v) => return Err(bad("access", v, "a string of r, w and m")),
        };
        let only_mknod = access.chars().all(|c| c == 'm');
        let default_node = kind == 'c'
            && access.chars().all(|c| "rwm".contains(c))
            && major.is_some_and(|maj| {
                DEFAULT_CHAR_DEVICES.iter().any(|&(m, n)| m == maj && (n.is_none() || (minor.is_some() && n == minor)))
            });
        if (only_mknod && matches!(kind, 'a' | 'b' | 'c')) || default_node {
            continue;
        }
        out.push(Privilege::DeviceRule { kind, major, minor, access });
    }
    Ok(())
}

fn seccomp(spec: &Value, g: &SpecGrants, out: &mut Vec<Privilege>) -> Result<(), SpecError> {
    if !g.seccomp {
        out.push(Privilege::SeccompUnconfined);
        return Ok(());
    }
    let Some(profile) = spec.pointer("/linux/seccomp").and_then(Value::as_object) else {
        return Err(SpecError { field: "linux.seccomp".into(), reason: "not an object".into() });
    };
    if let Some(action) = g.seccomp_default_action.as_deref().filter(|a| ALLOW_ACTIONS.contains(a)) {
        out.push(Privilege::SeccompDefaultAllow { action: action.to_string() });
    }
    let rules = match profile.get("syscalls") {
        None | Some(Value::Null) => &[][..],
        Some(Value::Array(a)) => &a[..],
        Some(v) => {
            return Err(SpecError { field: "linux.seccomp.syscalls".into(), reason: format!("not a list: {v}") })
        }
    };
    let mut allowed: Vec<String> = Vec::new();
    for (i, rule) in rules.iter().enumerate() {
        let field = format!("linux.seccomp.syscalls[{i}]");
        let action = rule.get("action").and_then(Value::as_str).unwrap_or_default();
        if !ALLOW_ACTIONS.contains(&action) {
            continue;
        }
        let mut names: Vec<&str> = Vec::new();
        match rule.get("names") {
            None | Some(Value::Null) => {}
            Some(Value::Array(a)) => {
                for n in a {
                    names.push(n.as_str().ok_or_else(|| SpecError {
                        field: format!("{field}.names"),
                        reason: format!("{n} is not a syscall name"),
                    })?);
                }
            }
            Some(v) => return Err(SpecError { field: format!("{field}.names"), reason: format!("not a list: {v}") }),
        }
        let filtered = rule.get("args").and_then(Value::as_array).is_some_and(|a| !a.is_empty());
        for name in names {
            // RuntimeDefault allows clone only without namespace flags (an argument filter).
            let weaker = DENIED_SYSCALLS.contains(&name) || (name == "clone" && !filtered);
            if weaker && !allowed.iter().any(|a| a == name) {
                allowed.push(name.to_string());
            }
        }
    }
    if !allowed.is_empty() {
        allowed.sort();
        out.push(Privilege::SeccompSyscalls(allowed));
    }
    Ok(())
}

fn paths(g: &SpecGrants, out: &mut Vec<Privilege>) {
    let missing = |have: &[String], want: &[&str]| -> Vec<String> {
        want.iter().filter(|p| !have.iter().any(|h| h == *p)).map(|p| (*p).to_string()).collect()
    };
    let masked = missing(&g.masked_paths, &MASKED_PATHS);
    if !masked.is_empty() {
        out.push(Privilege::MaskedPathsRemoved(masked));
    }
    let readonly = missing(&g.readonly_paths, &READONLY_PATHS);
    if !readonly.is_empty() {
        out.push(Privilege::ReadonlyPathsRemoved(readonly));
    }
}

fn lsm(g: &SpecGrants, out: &mut Vec<Privilege>) {
    if g.apparmor_profile.as_deref().is_some_and(|p| p.trim() == "unconfined") {
        out.push(Privilege::AppArmorUnconfined);
    }
    if let Some(label) = &g.selinux_label {
        // user:role:type:level; spc_t is the "super privileged container" type.
        let kind = label.split(':').nth(2).unwrap_or_default();
        if kind == "spc_t" || label.contains("unconfined") {
            out.push(Privilege::SelinuxUnconfined { label: label.clone() });
        }
    }
}

/// Every hook of every stage: all of them run as root with runc's privileges.
fn hooks(spec: &Value, out: &mut Vec<Privilege>) -> Result<(), SpecError> {
    let stages = match spec.get("hooks") {
        None | Some(Value::Null) => return Ok(()),
        Some(Value::Object(o)) => o,
        Some(v) => return Err(SpecError { field: "hooks".into(), reason: format!("not an object: {v}") }),
    };
    for (stage, hooks) in stages {
        let list = match hooks {
            Value::Null => continue,
            Value::Array(a) => a,
            v => {
                return Err(SpecError { field: format!("hooks.{}", shown(stage)), reason: format!("not a list: {v}") })
            }
        };
        for (i, h) in list.iter().enumerate() {
            let field = format!("hooks.{}[{i}]", shown(stage));
            let path = h.get("path").and_then(Value::as_str).ok_or_else(|| SpecError {
                field: format!("{field}.path"),
                reason: "missing or not a string".into(),
            })?;
            let args = match h.get("args") {
                None | Some(Value::Null) => Vec::new(),
                Some(Value::Array(a)) => a
                    .iter()
                    .map(|s| {
                        s.as_str().map(str::to_string).ok_or_else(|| SpecError {
                            field: format!("{field}.args"),
                            reason: format!("{s} is not a string"),
                        })
                    })
                    .collect::<Result<_, _>>()?,
                Some(v) => {
                    return Err(SpecError { field: format!("{field}.args"), reason: format!("not a list: {v}") })
                }
            };
            out.push(Privilege::Hook { stage: stage.clone(), path: path.to_string(), args });
        }
    }
    Ok(())
}

fn annotations(spec: &Value, out: &mut Vec<Privilege>) -> Result<(), SpecError> {
    let map = match spec.get("annotations") {
        None | Some(Value::Null) => return Ok(()),
        Some(Value::Object(o)) => o,
        Some(v) => return Err(SpecError { field: "annotations".into(), reason: format!("not an object: {v}") }),
    };
    let string = |key: &str, v: &Value| -> Result<String, SpecError> {
        v.as_str().map(str::to_string).ok_or_else(|| SpecError {
            field: format!("annotations.{}", shown(key)),
            reason: format!("{v} is not a string"),
        })
    };
    if let Some(v) = map.get(CRIU_CONFIG_ANNOTATION) {
        let path = string(CRIU_CONFIG_ANNOTATION, v)?;
        // An empty value only stops runc from reading its default config file.
        if !path.is_empty() {
            out.push(Privilege::CriuConfig { path });
        }
    }
    for (key, v) in map.iter().filter(|(k, _)| k.starts_with(CDI_ANNOTATION_PREFIX)) {
        let devices = string(key, v)?;
        if !devices.trim().is_empty() {
            out.push(Privilege::CdiDevices { annotation: key.clone(), devices });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// The `config.json` containerd 1.6.20 wrote for `ctr run -d --seccomp
    /// docker.io/kybernate/busybox:test withsec sleep 1000` (its bundle, unchanged): the image
    /// defaults with the RuntimeDefault profile.
    const CONTAINERD_1_6_DEFAULT: &str = r#"
{"ociVersion":"1.0.2-dev","process":{"user":{"uid":0,"gid":0,"additionalGids":[0]},"args":["sleep","1000"],
"env":["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],"cwd":"/",
"capabilities":{"bounding":["CAP_CHOWN","CAP_DAC_OVERRIDE","CAP_FSETID","CAP_FOWNER","CAP_MKNOD","CAP_NET_RAW",
"CAP_SETGID","CAP_SETUID","CAP_SETFCAP","CAP_SETPCAP","CAP_NET_BIND_SERVICE","CAP_SYS_CHROOT","CAP_KILL",
"CAP_AUDIT_WRITE"],"effective":["CAP_CHOWN","CAP_DAC_OVERRIDE","CAP_FSETID","CAP_FOWNER","CAP_MKNOD","CAP_NET_RAW",
"CAP_SETGID","CAP_SETUID","CAP_SETFCAP","CAP_SETPCAP","CAP_NET_BIND_SERVICE","CAP_SYS_CHROOT","CAP_KILL",
"CAP_AUDIT_WRITE"],"permitted":["CAP_CHOWN","CAP_DAC_OVERRIDE","CAP_FSETID","CAP_FOWNER","CAP_MKNOD","CAP_NET_RAW",
"CAP_SETGID","CAP_SETUID","CAP_SETFCAP","CAP_SETPCAP","CAP_NET_BIND_SERVICE","CAP_SYS_CHROOT","CAP_KILL",
"CAP_AUDIT_WRITE"]},"rlimits":[{"type":"RLIMIT_NOFILE","hard":1024,"soft":1024}],"noNewPrivileges":true},
"root":{"path":"rootfs"},"mounts":[{"destination":"/proc","type":"proc","source":"proc","options":["nosuid",
"noexec","nodev"]},{"destination":"/dev","type":"tmpfs","source":"tmpfs","options":["nosuid","strictatime",
"mode=755","size=65536k"]},{"destination":"/dev/pts","type":"devpts","source":"devpts","options":["nosuid",
"noexec","newinstance","ptmxmode=0666","mode=0620","gid=5"]},{"destination":"/dev/shm","type":"tmpfs",
"source":"shm","options":["nosuid","noexec","nodev","mode=1777","size=65536k"]},{"destination":"/dev/mqueue",
"type":"mqueue","source":"mqueue","options":["nosuid","noexec","nodev"]},{"destination":"/sys","type":"sysfs",
"source":"sysfs","options":["nosuid","noexec","nodev","ro"]},{"destination":"/run","type":"tmpfs",
"source":"tmpfs","options":["nosuid","strictatime","mode=755","size=65536k"]}],"linux":{"resources":{"devices":[{
"allow":false,"access":"rwm"},{"allow":true,"type":"c","major":1,"minor":3,"access":"rwm"},{"allow":true,
"type":"c","major":1,"minor":8,"access":"rwm"},{"allow":true,"type":"c","major":1,"minor":7,"access":"rwm"},{
"allow":true,"type":"c","major":5,"minor":0,"access":"rwm"},{"allow":true,"type":"c","major":1,"minor":5,
"access":"rwm"},{"allow":true,"type":"c","major":1,"minor":9,"access":"rwm"},{"allow":true,"type":"c","major":5,
"minor":1,"access":"rwm"},{"allow":true,"type":"c","major":136,"access":"rwm"},{"allow":true,"type":"c",
"major":5,"minor":2,"access":"rwm"}],"cpu":{"shares":1024}},"cgroupsPath":"/default/withsec","namespaces":[{
"type":"pid"},{"type":"ipc"},{"type":"uts"},{"type":"mount"},{"type":"network"}],"seccomp":{
"defaultAction":"SCMP_ACT_ERRNO","architectures":["SCMP_ARCH_X86_64","SCMP_ARCH_X86","SCMP_ARCH_X32"],
"syscalls":[{"names":["accept","accept4","access","adjtimex","alarm","bind","brk","capget","capset","chdir",
"chmod","chown","chown32","clock_adjtime","clock_adjtime64","clock_getres","clock_getres_time64","clock_gettime",
"clock_gettime64","clock_nanosleep","clock_nanosleep_time64","close","close_range","connect","copy_file_range",
"creat","dup","dup2","dup3","epoll_create","epoll_create1","epoll_ctl","epoll_ctl_old","epoll_pwait",
"epoll_pwait2","epoll_wait","epoll_wait_old","eventfd","eventfd2","execve","execveat","exit","exit_group",
"faccessat","faccessat2","fadvise64","fadvise64_64","fallocate","fanotify_mark","fchdir","fchmod","fchmodat",
"fchown","fchown32","fchownat","fcntl","fcntl64","fdatasync","fgetxattr","flistxattr","flock","fork",
"fremovexattr","fsetxattr","fstat","fstat64","fstatat64","fstatfs","fstatfs64","fsync","ftruncate",
"ftruncate64","futex","futex_time64","futimesat","getcpu","getcwd","getdents","getdents64","getegid",
"getegid32","geteuid","geteuid32","getgid","getgid32","getgroups","getgroups32","getitimer","getpeername",
"getpgid","getpgrp","getpid","getppid","getpriority","getrandom","getresgid","getresgid32","getresuid",
"getresuid32","getrlimit","get_robust_list","getrusage","getsid","getsockname","getsockopt","get_thread_area",
"gettid","gettimeofday","getuid","getuid32","getxattr","inotify_add_watch","inotify_init","inotify_init1",
"inotify_rm_watch","io_cancel","ioctl","io_destroy","io_getevents","io_pgetevents","io_pgetevents_time64",
"ioprio_get","ioprio_set","io_setup","io_submit","io_uring_enter","io_uring_register","io_uring_setup","ipc",
"kill","landlock_add_rule","landlock_create_ruleset","landlock_restrict_self","lchown","lchown32","lgetxattr",
"link","linkat","listen","listxattr","llistxattr","_llseek","lremovexattr","lseek","lsetxattr","lstat",
"lstat64","madvise","membarrier","memfd_create","memfd_secret","mincore","mkdir","mkdirat","mknod","mknodat",
"mlock","mlock2","mlockall","mmap","mmap2","mprotect","mq_getsetattr","mq_notify","mq_open","mq_timedreceive",
"mq_timedreceive_time64","mq_timedsend","mq_timedsend_time64","mq_unlink","mremap","msgctl","msgget","msgrcv",
"msgsnd","msync","munlock","munlockall","munmap","nanosleep","newfstatat","_newselect","open","openat",
"openat2","pause","pidfd_open","pidfd_send_signal","pipe","pipe2","pkey_alloc","pkey_free","pkey_mprotect",
"poll","ppoll","ppoll_time64","prctl","pread64","preadv","preadv2","prlimit64","process_mrelease","pselect6",
"pselect6_time64","pwrite64","pwritev","pwritev2","read","readahead","readlink","readlinkat","readv","recv",
"recvfrom","recvmmsg","recvmmsg_time64","recvmsg","remap_file_pages","removexattr","rename","renameat",
"renameat2","restart_syscall","rmdir","rseq","rt_sigaction","rt_sigpending","rt_sigprocmask","rt_sigqueueinfo",
"rt_sigreturn","rt_sigsuspend","rt_sigtimedwait","rt_sigtimedwait_time64","rt_tgsigqueueinfo",
"sched_getaffinity","sched_getattr","sched_getparam","sched_get_priority_max","sched_get_priority_min",
"sched_getscheduler","sched_rr_get_interval","sched_rr_get_interval_time64","sched_setaffinity",
"sched_setattr","sched_setparam","sched_setscheduler","sched_yield","seccomp","select","semctl","semget",
"semop","semtimedop","semtimedop_time64","send","sendfile","sendfile64","sendmmsg","sendmsg","sendto",
"setfsgid","setfsgid32","setfsuid","setfsuid32","setgid","setgid32","setgroups","setgroups32","setitimer",
"setpgid","setpriority","setregid","setregid32","setresgid","setresgid32","setresuid","setresuid32",
"setreuid","setreuid32","setrlimit","set_robust_list","setsid","setsockopt","set_thread_area",
"set_tid_address","setuid","setuid32","setxattr","shmat","shmctl","shmdt","shmget","shutdown","sigaltstack",
"signalfd","signalfd4","sigprocmask","sigreturn","socketcall","socketpair","splice","stat","stat64","statfs",
"statfs64","statx","symlink","symlinkat","sync","sync_file_range","syncfs","sysinfo","tee","tgkill","time",
"timer_create","timer_delete","timer_getoverrun","timer_gettime","timer_gettime64","timer_settime",
"timer_settime64","timerfd_create","timerfd_gettime","timerfd_gettime64","timerfd_settime",
"timerfd_settime64","times","tkill","truncate","truncate64","ugetrlimit","umask","uname","unlink","unlinkat",
"utime","utimensat","utimensat_time64","utimes","vfork","vmsplice","wait4","waitid","waitpid","write",
"writev","socket"],"action":"SCMP_ACT_ALLOW"},{"names":["personality"],"action":"SCMP_ACT_ALLOW","args":[{
"index":0,"value":0,"op":"SCMP_CMP_EQ"}]},{"names":["personality"],"action":"SCMP_ACT_ALLOW","args":[{
"index":0,"value":8,"op":"SCMP_CMP_EQ"}]},{"names":["personality"],"action":"SCMP_ACT_ALLOW","args":[{
"index":0,"value":131072,"op":"SCMP_CMP_EQ"}]},{"names":["personality"],"action":"SCMP_ACT_ALLOW","args":[{
"index":0,"value":131080,"op":"SCMP_CMP_EQ"}]},{"names":["personality"],"action":"SCMP_ACT_ALLOW","args":[{
"index":0,"value":4294967295,"op":"SCMP_CMP_EQ"}]},{"names":["ptrace"],"action":"SCMP_ACT_ALLOW"},{
"names":["arch_prctl","modify_ldt"],"action":"SCMP_ACT_ALLOW"},{"names":["chroot"],"action":"SCMP_ACT_ALLOW"},{
"names":["clone"],"action":"SCMP_ACT_ALLOW","args":[{"index":0,"value":2114060288,"op":"SCMP_CMP_MASKED_EQ"}]},
{"names":["clone3"],"action":"SCMP_ACT_ERRNO","errnoRet":38}]},"maskedPaths":["/proc/acpi","/proc/asound",
"/proc/kcore","/proc/keys","/proc/latency_stats","/proc/timer_list","/proc/timer_stats","/proc/sched_debug",
"/sys/firmware","/proc/scsi"],"readonlyPaths":["/proc/bus","/proc/fs","/proc/irq","/proc/sys",
"/proc/sysrq-trigger"]}}"#;

    fn default_spec() -> Value {
        serde_json::from_str(CONTAINERD_1_6_DEFAULT).expect("the fixture is JSON")
    }

    /// The default spec with `edit` applied; its privileges as display lines.
    fn beyond(edit: impl FnOnce(&mut Value)) -> Vec<String> {
        let mut spec = default_spec();
        edit(&mut spec);
        beyond_defaults(&spec).expect("a readable spec").iter().map(ToString::to_string).collect()
    }

    #[test]
    fn containerds_default_spec_with_runtime_default_grants_nothing() {
        assert_eq!(beyond(|_| {}), Vec::<String>::new());
    }

    #[test]
    fn containerds_default_spec_without_a_profile_is_exactly_seccomp_unconfined() {
        // `ctr run` without --seccomp: the same spec without linux.seccomp.
        let lines = beyond(|s| {
            s["linux"].as_object_mut().unwrap().remove("seccomp");
        });
        assert_eq!(lines, ["seccomp unconfined (no profile)"]);
        assert_eq!(beyond(|s| s["linux"]["seccomp"] = Value::Null), ["seccomp unconfined (no profile)"]);
    }

    #[test]
    fn added_and_all_capabilities() {
        let lines = beyond(|s| {
            for set in ["bounding", "effective", "permitted"] {
                let list = s["process"]["capabilities"][set].as_array_mut().unwrap();
                list.push("CAP_SYS_ADMIN".into());
                list.push("CAP_NET_ADMIN".into());
            }
        });
        assert_eq!(lines, ["capabilities CAP_NET_ADMIN, CAP_SYS_ADMIN added"]);
        // Any set counts: an ambient capability alone is still one the container gets.
        let lines = beyond(|s| s["process"]["capabilities"]["ambient"] = json!(["CAP_SYS_PTRACE"]));
        assert_eq!(lines, ["capability CAP_SYS_PTRACE added"]);
        // A name this table does not know is named too (a newer kernel's capability).
        let lines = beyond(|s| s["process"]["capabilities"]["bounding"] = json!(["CAP_CHOWN", "CAP_FUTURE"]));
        assert_eq!(lines, ["capability CAP_FUTURE added"]);
        let all: Vec<&str> = caps::NAMES.to_vec();
        let lines = beyond(|s| s["process"]["capabilities"]["bounding"] = json!(all));
        assert_eq!(lines, ["privileged: all capabilities"]);
        // `ctr run --privileged` where containerd lacks CAP_SYS_RESOURCE (measured on the test bed).
        let but: Vec<&str> = caps::NAMES.iter().copied().filter(|n| *n != "CAP_SYS_RESOURCE").collect();
        let lines = beyond(|s| s["process"]["capabilities"]["bounding"] = json!(but));
        assert_eq!(lines, ["privileged: all capabilities but CAP_SYS_RESOURCE"]);
        // Without process.capabilities runc drops none.
        let lines = beyond(|s| {
            s["process"].as_object_mut().unwrap().remove("capabilities");
        });
        assert_eq!(lines, ["privileged: all capabilities"]);
        // Fewer capabilities than the defaults grant nothing.
        assert!(beyond(|s| s["process"]["capabilities"] = json!({"bounding": ["CAP_KILL"]})).is_empty());
    }

    #[test]
    fn host_and_joined_namespaces() {
        let lines = beyond(|s| {
            s["linux"]["namespaces"] = json!([
                {"type": "pid", "path": "/proc/1/ns/pid"}, {"type": "ipc"}, {"type": "uts"}, {"type": "mount"},
                {"type": "user"}
            ]);
        });
        assert_eq!(lines, ["pid namespace joined from /proc/1/ns/pid", "host network namespace"]);
        let lines = beyond(|s| s["linux"]["namespaces"] = json!([]));
        assert_eq!(
            lines,
            [
                "host pid namespace",
                "host ipc namespace",
                "host uts namespace",
                "host mount namespace",
                "host network namespace"
            ]
        );
        // An empty path is no path (runc creates the namespace).
        assert!(beyond(|s| s["linux"]["namespaces"][4] = json!({"type": "network", "path": ""})).is_empty());
    }

    fn push_mount(s: &mut Value, m: Value) {
        s["mounts"].as_array_mut().unwrap().push(m);
    }

    #[test]
    fn host_bind_mounts_and_other_filesystems() {
        let lines = beyond(|s| {
            push_mount(s, json!({"destination": "/host", "type": "bind", "source": "/", "options": ["rbind", "rw"]}));
            push_mount(
                s,
                json!({"destination": "/etc/hosts", "type": "none", "source": "/etc/hosts", "options": ["bind", "ro"]}),
            );
            push_mount(s, json!({"destination": "/mnt/disk", "type": "ext4", "source": "/dev/sda1"}));
            push_mount(s, json!({"destination": "/hostproc", "type": "proc", "source": "proc"}));
            push_mount(s, json!({"destination": "/tmp/x", "type": "tmpfs", "source": "tmpfs"}));
        });
        assert_eq!(
            lines,
            [
                "host bind mount / at /host (rw)",
                "host bind mount /etc/hosts at /etc/hosts (ro)",
                "ext4 mount at /mnt/disk from /dev/sda1 (rw; containerd's default spec mounts no such filesystem there)",
                "proc mount at /hostproc (rw; containerd's default spec mounts no such filesystem there)",
            ]
        );
    }

    #[test]
    fn sys_and_cgroups_read_write() {
        let lines = beyond(|s| s["mounts"][5]["options"] = json!(["nosuid", "noexec", "nodev"]));
        assert_eq!(lines, ["/sys read-write"]);
        // CRI's cgroup mount is read-only; read-write it lets the container change its limits.
        assert!(beyond(|s| push_mount(
            s,
            json!({"destination": "/sys/fs/cgroup", "type": "cgroup", "source": "cgroup", "options": ["ro"]})
        ))
        .is_empty());
        let lines = beyond(|s| {
            push_mount(
                s,
                json!({"destination": "/sys/fs/cgroup", "type": "cgroup2", "source": "cgroup", "options": []}),
            )
        });
        assert_eq!(lines, ["/sys/fs/cgroup read-write (cgroup2)"]);
    }

    #[test]
    fn devices_and_device_rules() {
        let lines = beyond(|s| {
            s["linux"]["devices"] = json!([
                {"path": "/dev/sda", "type": "b", "major": 8, "minor": 0},
                {"path": "/dev/null", "type": "c", "major": 1, "minor": 3}
            ]);
        });
        assert_eq!(lines, ["device /dev/sda (b 8:0)"]);
        let lines = beyond(|s| {
            s["linux"]["resources"]["devices"].as_array_mut().unwrap().push(json!({"allow": true, "access": "rwm"}));
        });
        assert_eq!(lines, ["devices cgroup allows all devices (a *:* rwm)"]);
        let lines = beyond(|s| {
            let rules = s["linux"]["resources"]["devices"].as_array_mut().unwrap();
            rules.push(json!({"allow": true, "type": "c", "major": 10, "minor": 229, "access": "rw"}));
            rules.push(json!({"allow": true, "type": "b", "major": -1, "minor": -1, "access": "rwm"}));
            // runc's own defaults: creating any node, and the pty slaves.
            rules.push(json!({"allow": true, "type": "c", "access": "m"}));
            rules.push(json!({"allow": true, "type": "c", "major": 136, "minor": 4, "access": "rw"}));
            rules.push(json!({"allow": false, "type": "b", "major": 8, "access": "rwm"}));
        });
        assert_eq!(lines, ["devices cgroup allows c 10:229 rw", "devices cgroup allows all block devices (b *:* rwm)"]);
    }

    #[test]
    fn weak_seccomp_profiles() {
        let lines = beyond(|s| s["linux"]["seccomp"]["defaultAction"] = json!("SCMP_ACT_ALLOW"));
        assert_eq!(lines, ["seccomp profile allows every syscall it does not name (defaultAction SCMP_ACT_ALLOW)"]);
        let lines = beyond(|s| {
            let rules = s["linux"]["seccomp"]["syscalls"].as_array_mut().unwrap();
            rules.push(json!({"names": ["unshare", "mount", "getpid"], "action": "SCMP_ACT_ALLOW"}));
            rules.push(json!({"names": ["clone"], "action": "SCMP_ACT_ALLOW"}));
            rules.push(json!({"names": ["keyctl"], "action": "SCMP_ACT_ERRNO"}));
        });
        assert_eq!(lines, ["seccomp profile allows clone, mount, unshare (containerd's default profile denies them)"]);
        // What containerd 1.7's and 2.x's RuntimeDefault allow besides 1.6's (measured).
        assert!(beyond(|s| {
            let rules = s["linux"]["seccomp"]["syscalls"].as_array_mut().unwrap();
            rules.push(json!({"names": ["name_to_handle_at", "process_vm_readv", "process_vm_writev"], "action": "SCMP_ACT_ALLOW"}));
        })
        .is_empty());
    }

    #[test]
    fn masked_and_read_only_paths_removed() {
        let lines = beyond(|s| {
            s["linux"]["maskedPaths"] = json!([
                "/proc/acpi",
                "/proc/asound",
                "/proc/latency_stats",
                "/proc/timer_list",
                "/proc/timer_stats",
                "/proc/sched_debug",
                "/sys/firmware",
                "/proc/scsi",
                "/proc/extra"
            ]);
            s["linux"]["readonlyPaths"] = json!(["/proc/bus", "/proc/fs/", "/proc/irq", "/proc/sysrq-trigger"]);
        });
        assert_eq!(lines, ["masked paths removed: /proc/kcore, /proc/keys", "read-only paths removed: /proc/sys"]);
    }

    #[test]
    fn unconfined_lsms_and_no_new_privs() {
        let lines = beyond(|s| {
            s["process"]["apparmorProfile"] = json!("unconfined");
            s["process"]["selinuxLabel"] = json!("system_u:system_r:spc_t:s0");
            s["process"]["noNewPrivileges"] = json!(false);
        });
        assert_eq!(
            lines,
            [
                "AppArmor unconfined",
                "SELinux unconfined (label system_u:system_r:spc_t:s0)",
                "no_new_privs off (setuid binaries and file capabilities can raise privileges)",
            ]
        );
        // Confined profiles are as the defaults.
        assert!(beyond(|s| {
            s["process"]["apparmorProfile"] = json!("cri-containerd.apparmor.d");
            s["process"]["selinuxLabel"] = json!("system_u:system_r:container_t:s0:c1,c2");
        })
        .is_empty());
    }

    #[test]
    fn hooks_run_on_the_host() {
        let lines = beyond(|s| {
            s["hooks"] = json!({
                "prestart": [{"path": "/usr/bin/x"}],
                "createContainer": [{"path": "/bin/sh", "args": ["sh", "-c", "id > /x"]}],
                "poststop": []
            });
        });
        assert_eq!(
            lines,
            [
                "hooks: createContainer /bin/sh -c id > /x (a host binary, runs as root in the container's namespaces)",
                "hooks: prestart /usr/bin/x (runs on the host as root)",
            ]
        );
    }

    #[test]
    fn criu_config_and_cdi_annotations() {
        let lines = beyond(|s| {
            s["annotations"] = json!({
                "org.criu.config": "/x.conf",
                "cdi.k8s.io/gpu": "nvidia.com/gpu=all",
                "kybernate.io/restore-from": "/var/lib/kybernate/checkpoints/default/a/b"
            });
        });
        assert_eq!(
            lines,
            [
                "CRIU config file /x.conf (org.criu.config: CRIU options, scripts included, run as root)",
                "CDI devices nvidia.com/gpu=all (annotation cdi.k8s.io/gpu: the GPU runtime adds their device nodes and host mounts)",
            ]
        );
        // An empty org.criu.config only switches runc's default CRIU config file off.
        assert!(beyond(|s| s["annotations"] = json!({"org.criu.config": ""})).is_empty());
    }

    #[test]
    fn untrusted_text_cannot_drive_the_terminal() {
        let lines = beyond(|s| s["hooks"] = json!({"prestart": [{"path": "/x\u{1b}[2J\nfake line"}]}));
        assert_eq!(lines, ["hooks: prestart /x\\u{1b}[2J\\nfake line (runs on the host as root)"]);
        let long = "/a".repeat(500);
        let lines = beyond(|s| s["hooks"] = json!({"prestart": [{"path": long}]}));
        assert!(lines[0].chars().count() < 260 && lines[0].contains('…'), "{}", lines[0]);
    }

    #[test]
    fn malformed_specs_are_errors_naming_the_field() {
        let err = |edit: fn(&mut Value)| {
            let mut s = default_spec();
            edit(&mut s);
            beyond_defaults(&s).unwrap_err().field
        };
        assert_eq!(err(|s| s["hooks"] = json!("x")), "hooks");
        assert_eq!(err(|s| s["hooks"] = json!({"prestart": [{"args": []}]})), "hooks.prestart[0].path");
        // Keys are spec text too.
        assert_eq!(err(|s| s["hooks"] = json!({"pre\u{1b}[2J": 1})), "hooks.pre\\u{1b}[2J");
        assert_eq!(err(|s| s["annotations"] = json!({"org.criu.config": 1})), "annotations.org.criu.config");
        assert_eq!(
            err(|s| s["linux"]["resources"]["devices"] = json!([{"allow": "yes"}])),
            "linux.resources.devices[0].allow"
        );
        assert_eq!(err(|s| s["linux"]["seccomp"]["syscalls"] = json!({})), "linux.seccomp.syscalls");
        assert_eq!(err(|s| s["linux"]["namespaces"] = json!("pid")), "linux.namespaces");
        assert_eq!(beyond_defaults(&json!([1])).unwrap_err().field, "(document)");
    }

    #[test]
    fn a_privileged_spec_names_everything() {
        // What `ctr run --privileged` changes (containerd's WithPrivileged), plus a host bind.
        let lines = beyond(|s| {
            s["process"]["capabilities"] =
                json!({"bounding": &caps::NAMES[..], "effective": &caps::NAMES[..], "permitted": &caps::NAMES[..]});
            s["process"]["apparmorProfile"] = json!("unconfined");
            s["linux"]["maskedPaths"] = json!([]);
            s["linux"]["readonlyPaths"] = json!([]);
            s["linux"]["resources"]["devices"] = json!([{"allow": true, "access": "rwm"}]);
            s["linux"].as_object_mut().unwrap().remove("seccomp");
            s["mounts"][5]["options"] = json!(["nosuid", "noexec", "nodev", "rw"]);
        });
        let want = [
            "privileged: all capabilities",
            "/sys read-write",
            "devices cgroup allows all devices (a *:* rwm)",
            "seccomp unconfined (no profile)",
        ];
        assert_eq!(&lines[..4], want);
        assert!(lines[4].starts_with("masked paths removed: /proc/acpi, "), "{lines:?}");
        assert!(lines[5].starts_with("read-only paths removed: /proc/bus, "), "{lines:?}");
        assert_eq!(lines[6], "AppArmor unconfined");
        assert_eq!(lines.len(), 7);
    }
}
