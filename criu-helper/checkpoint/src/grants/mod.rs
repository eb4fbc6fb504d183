//! The credentials check of a restore: what CRIU will restore (its images) against what the new
//! container's own spec grants. A restore may proceed only when the checkpoint's processes need no
//! more than that spec would give a fresh container; otherwise every excess is named.
//!
//! CRIU restores each task's credentials (capabilities, uids and gids, securebits,
//! no_new_privs, seccomp filters, LSM labels) and its mount tree from its images; runc only
//! builds namespaces, cgroups and the external mounts from the spec. Without this check a
//! privileged container's checkpoint restored into an unprivileged pod keeps its privileges.
//! `spec.dump` and the manifest are never consulted: only the images decide what is restored.

pub mod caps;
pub mod defaults;
pub mod spec;

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::path::Path;

pub use spec::{clean_path, is_under, SpecError, SpecGrants};

use crate::images::{self, CheckpointImages, DeviceNode, ImageError, Mount, NsKind, Seccomp, Task};

/// The source of runc's masks over files.
const DEV_NULL: &str = "/dev/null";
/// `SECBIT_NO_SETUID_FIXUP`: keeps capabilities across uid changes; setting it needs CAP_SETPCAP.
const SECBIT_NO_SETUID_FIXUP: u32 = 1 << 2;
/// Device nodes runc creates in every container's `/dev` (`libcontainer/specconv`'s
/// AllowedDevices that it also creates): null, zero, full, random, urandom, tty.
const RUNC_DEFAULT_DEVICES: [(char, u64, u64); 6] =
    [('c', 1, 3), ('c', 1, 5), ('c', 1, 7), ('c', 1, 8), ('c', 1, 9), ('c', 5, 0)];

/// Why a restore is refused (or cannot be checked).
#[derive(Debug, thiserror::Error)]
pub enum GrantError {
    #[error("the checkpoint's CRIU images cannot be checked: {0}")]
    Images(#[from] ImageError),
    #[error("the new container's spec cannot be checked: {0}")]
    Spec(#[from] SpecError),
    /// Everything the checkpoint's processes would get beyond the new spec.
    #[error("{}", Excesses(.0))]
    Excess(Vec<Excess>),
}

struct Excesses<'a>(&'a [Excess]);

impl fmt::Display for Excesses<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("; ")?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

/// What this node contributes to the comparison.
pub struct Host<'a> {
    /// The LSM label a process of the new container runs with when its spec names none: the one
    /// runc inherits from the shim (`/proc/self/attr/current`), `None` without an LSM.
    pub default_label: Option<String>,
    /// Whether a `/proc` or `/sys` path exists here: runc masks and write-protects only paths that
    /// exist, and the container's `/proc` and `/sys` are this kernel's.
    pub proc_path_exists: &'a dyn Fn(&str) -> bool,
}

impl Host<'static> {
    /// This node, as the shim and the CLI see it.
    pub fn this_node() -> Self {
        let label = std::fs::read_to_string("/proc/self/attr/current")
            .ok()
            .map(|s| s.trim_end_matches(['\n', '\0']).to_string())
            .filter(|s| !s.is_empty());
        Host { default_label: label, proc_path_exists: &|p: &str| Path::new(p).exists() }
    }
}

/// Reads the CRIU images in `images_dir` and checks them against `spec` (the new container's
/// `config.json`, as runc will run it). `Ok` means the restore gives the checkpoint's processes
/// nothing the spec does not.
pub fn check_restore(images_dir: &Path, spec: &serde_json::Value, host: &Host<'_>) -> Result<Summary, GrantError> {
    let grants = SpecGrants::from_spec(spec)?;
    let images = CheckpointImages::read(images_dir)?;
    let mut excesses = check(&images, &grants, host);
    excesses.extend(check_devices(images_dir, &images, &grants)?);
    if excesses.is_empty() {
        Ok(Summary::of(&images))
    } else {
        Err(GrantError::Excess(excesses))
    }
}

/// What a passed check looked at, for the log line of the restore.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Summary {
    pub processes: usize,
    pub threads: usize,
    pub mounts: usize,
}

impl Summary {
    fn of(images: &CheckpointImages) -> Self {
        Self {
            processes: images.tasks.len(),
            threads: images.tasks.iter().map(|t| t.threads.len()).sum(),
            mounts: images.mount_namespaces.values().map(Vec::len).sum(),
        }
    }
}

impl fmt::Display for Summary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} processes, {} threads, {} mounts", self.processes, self.threads, self.mounts)
    }
}

/// One thing the checkpoint's processes would get that the new spec does not grant.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Excess {
    /// Capabilities in the named sets of the listed processes.
    Capabilities { caps: u64, sets: Vec<&'static str>, pids: Vec<u32> },
    /// Uids or gids (`what`: "uid", "gid", "supplementary group") the spec does not let them have.
    Ids { what: &'static str, ids: Vec<u32>, pids: Vec<u32>, why: String },
    /// no_new_privs is off (or unrecorded) where the spec sets it.
    NoNewPrivs { pids: Vec<u32>, unrecorded: bool },
    /// Securebits that loosen uid-change rules, which the spec's capabilities cannot set.
    Securebits { bits: u32, pids: Vec<u32> },
    /// No seccomp filter where the spec installs one.
    Seccomp { pids: Vec<u32>, spec_action: Option<String> },
    /// A filter index `seccomp.img` does not have.
    SeccompImage { pid: u32, index: u32, count: usize },
    /// An LSM label other than the one the spec gives.
    Lsm { label: String, expected: String, pids: Vec<u32> },
    /// AppArmor policies CRIU would load into the kernel.
    AppArmorPolicies { names: Vec<String> },
    /// The checkpoint was taken in the host's namespace of a kind the spec creates for the container.
    HostNamespace { kind: NsKind },
    /// Processes in a namespace other than the container's: the host's, or nested ones.
    OtherNamespace { kind: NsKind, pids: Vec<u32>, host: bool },
    /// An external (host) mount the spec does not make.
    HostMount { key: String, at: Vec<String> },
    /// Read-write where the spec mounts read-only (a spec mount, a read-only path, the root).
    Writable { path: String, why: &'static str },
    /// A mount of another filesystem type than the spec's at the same place.
    MountType { path: String, found: String, want: String },
    /// A path the spec masks that the checkpoint leaves visible.
    Unmasked { path: String },
    /// A mount the spec does not make, which it grants no CAP_SYS_ADMIN to make.
    ExtraMount { path: String, fstype: String },
    /// Device nodes in the container's `/dev` that the spec does not give it.
    Devices { nodes: Vec<DeviceNode> },
}

impl fmt::Display for Excess {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Excess::Capabilities { caps: c, sets, pids } => {
                let names = caps::names(*c);
                let them = if names.len() == 1 { "it" } else { "them" };
                write!(
                    f,
                    "checkpoint processes ({}) hold {} ({}), the new spec does not grant {them}",
                    pid_list(pids),
                    names.join(", "),
                    set_list(sets)
                )
            }
            Excess::Ids { what, ids, pids, why } => write!(
                f,
                "checkpoint processes ({}) run with {what} {}, {why}",
                pid_list(pids),
                ids.iter().map(u32::to_string).collect::<Vec<_>>().join(", ")
            ),
            Excess::NoNewPrivs { pids, unrecorded: false } => write!(
                f,
                "no_new_privs: checkpoint processes ({}) run without it, the new spec sets it",
                pid_list(pids)
            ),
            Excess::NoNewPrivs { pids, unrecorded: true } => write!(
                f,
                "no_new_privs: the checkpoint does not record it for processes ({}), the new spec sets it",
                pid_list(pids)
            ),
            Excess::Securebits { bits, pids } => write!(
                f,
                "securebits {bits:#x} (SECBIT_NO_SETUID_FIXUP) of checkpoint processes ({}) need CAP_SETPCAP, which the new spec does not grant",
                pid_list(pids)
            ),
            Excess::Seccomp { pids, spec_action } => write!(
                f,
                "seccomp: the checkpoint has none for processes ({}), the spec requires one{}",
                pid_list(pids),
                spec_action.as_deref().map(|a| format!(" (defaultAction {a})")).unwrap_or_default()
            ),
            Excess::SeccompImage { pid, index, count } => write!(
                f,
                "seccomp: process {pid} refers to filter {index}, seccomp.img has {count}: the checkpoint is malformed"
            ),
            Excess::Lsm { label, expected, pids } => write!(
                f,
                "LSM label: checkpoint processes ({}) run as \"{}\", the new container's processes run as \"{}\"",
                pid_list(pids),
                shown(label),
                shown(expected)
            ),
            Excess::AppArmorPolicies { names } => write!(
                f,
                "the checkpoint would load AppArmor policies {} into the kernel, which needs CAP_MAC_ADMIN, not granted by the new spec",
                names.iter().map(|n| shown(n)).collect::<Vec<_>>().join(", ")
            ),
            Excess::HostNamespace { kind } => write!(
                f,
                "the checkpoint was taken in the host's {kind} namespace, the new spec gives the container its own (CRIU would restore it into the host's)"
            ),
            Excess::OtherNamespace { kind, pids, host: true } => write!(
                f,
                "checkpoint processes ({}) live in the host's {kind} namespace, which the new spec does not share",
                pid_list(pids)
            ),
            Excess::OtherNamespace { kind, pids, host: false } => write!(
                f,
                "checkpoint processes ({}) live in a nested {kind} namespace; creating one needs CAP_SYS_ADMIN, which the new spec does not grant",
                pid_list(pids)
            ),
            Excess::HostMount { key, at } if key == DEV_NULL => write!(
                f,
                "the checkpoint masks {} with the host's /dev/null, the new spec masks no paths",
                at.iter().map(|p| shown(p)).collect::<Vec<_>>().join(", ")
            ),
            Excess::HostMount { key, at } if at.iter().all(|p| p == key) => {
                write!(f, "the checkpoint has a host mount at {}, the new spec does not mount anything there", shown(key))
            }
            Excess::HostMount { key, at } => write!(
                f,
                "the checkpoint has host mount {} at {}, the new spec does not mount anything at {}",
                shown(key),
                at.iter().map(|p| shown(p)).collect::<Vec<_>>().join(", "),
                shown(key)
            ),
            Excess::Writable { path, why } => write!(f, "{} is read-write in the checkpoint, {why}", shown(path)),
            Excess::MountType { path, found, want } => write!(
                f,
                "the checkpoint has a {} mount at {}, the new spec mounts a {} there",
                shown(found),
                shown(path),
                shown(want)
            ),
            Excess::Unmasked { path } => {
                write!(f, "{} is not masked in the checkpoint, the new spec masks it", shown(path))
            }
            Excess::ExtraMount { path, fstype } => write!(
                f,
                "the checkpoint has a {} mount at {} that the new spec does not make; mounting needs CAP_SYS_ADMIN, which it does not grant",
                shown(fstype),
                shown(path)
            ),
            Excess::Devices { nodes } => {
                const SHOWN: usize = 8;
                let mut list: Vec<String> =
                    nodes.iter().take(SHOWN).map(|d| format!("{} ({} {}:{})", shown(&d.path), d.kind, d.major, d.minor)).collect();
                if nodes.len() > SHOWN {
                    list.push(format!("and {} more", nodes.len() - SHOWN));
                }
                write!(
                    f,
                    "the checkpoint's /dev has device nodes {}, the new spec does not give the container these devices",
                    list.join(", ")
                )
            }
        }
    }
}

/// The longest piece of image or spec text shown; both are untrusted and a terminal is not a
/// log file.
const MAX_SHOWN: usize = 200;

/// Untrusted text (from CRIU's images or a spec) made safe for a message, the log and a terminal
/// line: control characters escaped (no escape sequences, no line breaks), at most
/// [`MAX_SHOWN`] characters.
pub(crate) fn shown(s: &str) -> String {
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i == MAX_SHOWN {
            out.push('…');
            break;
        }
        if c.is_control() {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    out
}

fn pid_list(pids: &[u32]) -> String {
    const SHOWN: usize = 8;
    let word = if pids.len() == 1 { "pid" } else { "pids" };
    let mut s: Vec<String> = pids.iter().take(SHOWN).map(u32::to_string).collect();
    if pids.len() > SHOWN {
        s.push(format!("and {} more", pids.len() - SHOWN));
    }
    format!("{word} {}", s.join(", "))
}

fn set_list(sets: &[&str]) -> String {
    match sets {
        [one] => format!("{one} set"),
        [init @ .., last] => format!("{} and {last} sets", init.join(", ")),
        [] => String::new(),
    }
}

/// Everything but the device nodes (which need the `/dev` archive): see [`check_restore`].
pub fn check(images: &CheckpointImages, spec: &SpecGrants, host: &Host<'_>) -> Vec<Excess> {
    let mut out = Vec::new();
    let live: Vec<&Task> = images.tasks.iter().filter(|t| !t.is_dead()).collect();
    check_caps(&live, spec, &mut out);
    check_ids(&live, spec, &mut out);
    check_nnp_securebits(&live, spec, &mut out);
    check_seccomp(&live, images, spec, &mut out);
    check_lsm(&live, images, spec, host, &mut out);
    check_namespaces(images, &live, spec, &mut out);
    check_mounts(images, spec, host, &mut out);
    out
}

/// Pids of the live tasks for which `bad` holds for any thread.
fn pids_where(live: &[&Task], bad: impl Fn(&images::Thread) -> bool) -> Vec<u32> {
    live.iter().filter(|t| t.threads.iter().any(&bad)).map(|t| t.pid).collect()
}

fn check_caps(live: &[&Task], spec: &SpecGrants, out: &mut Vec<Excess>) {
    let holdable = spec.holdable();
    let c = &spec.caps;
    type Set = (&'static str, u64, fn(&images::CapSets) -> u64);
    let sets: [Set; 5] = [
        ("effective", holdable, |s| s.effective),
        ("permitted", holdable, |s| s.permitted),
        ("inheritable", c.inheritable, |s| s.inheritable),
        ("bounding", c.bounding, |s| s.bounding),
        ("ambient", c.ambient, |s| s.ambient),
    ];
    // Same capabilities over the same processes in several sets read as one finding.
    let mut found: BTreeMap<(u64, Vec<u32>), Vec<&'static str>> = BTreeMap::new();
    for (name, allowed, get) in sets {
        let mut excess = 0u64;
        let mut pids = BTreeSet::new();
        for t in live {
            for th in &t.threads {
                let extra = get(&th.creds.caps) & !allowed;
                if extra != 0 {
                    excess |= extra;
                    pids.insert(t.pid);
                }
            }
        }
        if excess != 0 {
            found.entry((excess, pids.into_iter().collect())).or_default().push(name);
        }
    }
    for ((caps, pids), sets) in found {
        out.push(Excess::Capabilities { caps, sets, pids });
    }
}

fn check_ids(live: &[&Task], spec: &SpecGrants, out: &mut Vec<Excess>) {
    let holdable = spec.holdable();
    let userns = spec.user_namespace();
    let may_setuid = caps::has(holdable, caps::SETUID);
    let may_setgid = caps::has(holdable, caps::SETGID);
    let mut spec_groups: BTreeSet<u32> = spec.additional_gids.iter().copied().collect();
    spec_groups.insert(spec.gid);
    type Ids = (&'static str, fn(&images::Creds) -> Vec<u32>);
    let kinds: [Ids; 3] =
        [("uid", |c| c.uids.to_vec()), ("gid", |c| c.gids.to_vec()), ("supplementary group", |c| c.groups.clone())];
    for (what, get) in kinds {
        let is_uid = what == "uid";
        let mut bad_ids = BTreeSet::new();
        let mut pids = BTreeSet::new();
        for t in live {
            for th in &t.threads {
                for id in get(&th.creds) {
                    let ok = if userns {
                        if is_uid {
                            spec.uid_mapped(id)
                        } else {
                            spec.gid_mapped(id)
                        }
                    } else if is_uid {
                        id == spec.uid || may_setuid
                    } else if what == "gid" {
                        id == spec.gid || may_setgid
                    } else {
                        spec_groups.contains(&id) || may_setgid
                    };
                    if !ok {
                        bad_ids.insert(id);
                        pids.insert(t.pid);
                    }
                }
            }
        }
        if bad_ids.is_empty() {
            continue;
        }
        let why = if userns {
            format!(
                "which the new spec's user namespace does not map ({what}s are mapped by linux.{}Mappings)",
                if is_uid { "uid" } else { "gid" }
            )
        } else if is_uid {
            format!("the new spec runs its processes as uid {} and grants no CAP_SETUID to change it", spec.uid)
        } else {
            format!(
                "the new spec gives its processes gid {} and groups {:?} and grants no CAP_SETGID to change them",
                spec.gid, spec.additional_gids
            )
        };
        out.push(Excess::Ids { what, ids: bad_ids.into_iter().collect(), pids: pids.into_iter().collect(), why });
    }
}

fn check_nnp_securebits(live: &[&Task], spec: &SpecGrants, out: &mut Vec<Excess>) {
    if spec.no_new_privs {
        let off = pids_where(live, |th| th.creds.no_new_privs == Some(false));
        if !off.is_empty() {
            out.push(Excess::NoNewPrivs { pids: off, unrecorded: false });
        }
        let unknown = pids_where(live, |th| th.creds.no_new_privs.is_none());
        if !unknown.is_empty() {
            out.push(Excess::NoNewPrivs { pids: unknown, unrecorded: true });
        }
    }
    if !caps::has(spec.holdable(), caps::SETPCAP) {
        let pids = pids_where(live, |th| th.creds.secbits & SECBIT_NO_SETUID_FIXUP != 0);
        if !pids.is_empty() {
            out.push(Excess::Securebits { bits: SECBIT_NO_SETUID_FIXUP, pids });
        }
    }
}

fn check_seccomp(live: &[&Task], images: &CheckpointImages, spec: &SpecGrants, out: &mut Vec<Excess>) {
    let count = images.seccomp_filters.len();
    for t in live {
        for th in &t.threads {
            if let Seccomp::Filter(Some(index)) = th.seccomp {
                if index as usize >= count {
                    out.push(Excess::SeccompImage { pid: t.pid, index, count });
                    return;
                }
            }
        }
    }
    if spec.seccomp {
        let pids = pids_where(live, |th| matches!(th.seccomp, Seccomp::Disabled | Seccomp::Filter(None)));
        if !pids.is_empty() {
            out.push(Excess::Seccomp { pids, spec_action: spec.seccomp_default_action.clone() });
        }
    }
}

/// An AppArmor label without its mode (`profile (enforce)` → `profile`), and the mode.
fn apparmor_parts(label: &str) -> (&str, &str) {
    match label.rsplit_once(" (") {
        Some((name, mode)) => (name, mode.trim_end_matches(')')),
        None => (label, ""),
    }
}

fn check_lsm(live: &[&Task], images: &CheckpointImages, spec: &SpecGrants, host: &Host<'_>, out: &mut Vec<Excess>) {
    const SELINUX: i32 = 1;
    const APPARMOR: i32 = 2;
    let expected = match images.lsm_type {
        SELINUX => spec.selinux_label.clone().or_else(|| host.default_label.clone()),
        APPARMOR => spec.apparmor_profile.clone().or_else(|| host.default_label.clone()),
        _ => None,
    };
    let ok = |label: &str| -> bool {
        let Some(want) = expected.as_deref() else { return true };
        if images.lsm_type == APPARMOR {
            let (want_name, _) = apparmor_parts(want);
            let (name, mode) = apparmor_parts(label);
            // Unconfined grants everything, so any profile is within it; otherwise the same
            // profile, enforced.
            want_name == "unconfined" || (name == want_name && (mode.is_empty() || mode == "enforce"))
        } else {
            label == want
        }
    };
    let mut by_label: BTreeMap<String, BTreeSet<u32>> = BTreeMap::new();
    for t in live {
        for th in &t.threads {
            for label in [&th.creds.lsm_profile, &th.creds.lsm_sockcreate].into_iter().flatten() {
                if !ok(label) {
                    by_label.entry(label.clone()).or_default().insert(t.pid);
                }
            }
        }
    }
    for (label, pids) in by_label {
        out.push(Excess::Lsm {
            label,
            expected: expected.clone().unwrap_or_default(),
            pids: pids.into_iter().collect(),
        });
    }
    if !caps::has(spec.holdable(), caps::MAC_ADMIN) {
        let mut names = images.apparmor_policies.clone();
        if live.iter().any(|t| t.threads.iter().any(|th| th.creds.apparmor_data)) {
            names.push("(per-task AppArmor namespace data)".into());
        }
        if !names.is_empty() {
            out.push(Excess::AppArmorPolicies { names });
        }
    }
}

fn check_namespaces(images: &CheckpointImages, live: &[&Task], spec: &SpecGrants, out: &mut Vec<Excess>) {
    let Some(init_ns) = images.init().ns else { return };
    let host = images.dump_host_ns.unwrap_or_default();
    let may_create = caps::has(spec.caps.bounding, caps::SYS_ADMIN);
    for kind in NsKind::ALL {
        let init_id = init_ns.get(kind);
        let host_id = host.get(kind);
        // A namespace the spec joins by path is the one runc has CRIU restore into, whichever it
        // is; a new one the host's namespace of the dump must not stand in for.
        if spec.creates_namespace(kind) && init_id.is_some() && init_id == host_id {
            out.push(Excess::HostNamespace { kind });
        }
        let (mut in_host, mut nested) = (Vec::new(), Vec::new());
        for t in live.iter().filter(|t| t.pid != images.init().pid) {
            let id = t.ns.and_then(|n| n.get(kind));
            if id.is_none() || id == init_id {
                continue;
            }
            if id == host_id {
                in_host.push(t.pid);
            } else if !may_create {
                nested.push(t.pid);
            }
        }
        if !in_host.is_empty() {
            out.push(Excess::OtherNamespace { kind, pids: in_host, host: true });
        }
        if !nested.is_empty() {
            out.push(Excess::OtherNamespace { kind, pids: nested, host: false });
        }
    }
}

/// CRIU's name of a mount's filesystem type.
fn fstype_name(m: &Mount) -> String {
    let known = match m.fstype {
        1 => "proc",
        2 => "sysfs",
        3 => "devtmpfs",
        4 => "binfmt_misc",
        5 => "tmpfs",
        6 => "devpts",
        8 => "pstore",
        9 => "securityfs",
        10 => "fusectl",
        11 => "debugfs",
        12 => "cgroup",
        14 => "mqueue",
        15 => "fuse",
        17 => "overlay",
        18 => "autofs",
        19 => "tracefs",
        23 => "cgroup2",
        _ => "",
    };
    if known.is_empty() {
        m.fsname.clone().filter(|n| !n.is_empty()).unwrap_or_else(|| format!("type-{}", m.fstype))
    } else {
        known.to_string()
    }
}

/// Whether a checkpoint mount of `m`'s type is what runc makes for a spec mount of type `kind`
/// (`None`: the spec type says nothing checkable, e.g. a bind mount).
fn type_matches(kind: &str, m: &Mount) -> Option<bool> {
    let t = m.fstype;
    Some(match kind {
        "proc" => t == images::FSTYPE_PROC,
        "sysfs" => t == images::FSTYPE_SYSFS,
        "tmpfs" => t == images::FSTYPE_TMPFS,
        "devpts" => t == images::FSTYPE_DEVPTS,
        "mqueue" => t == images::FSTYPE_MQUEUE,
        // cgroup v1 without a cgroup namespace: runc mounts a tmpfs and binds each controller.
        "cgroup" => [images::FSTYPE_CGROUP, images::FSTYPE_CGROUP2, images::FSTYPE_TMPFS].contains(&t),
        "cgroup2" => t == images::FSTYPE_CGROUP2,
        _ => return None,
    })
}

fn check_mounts(images: &CheckpointImages, spec: &SpecGrants, host: &Host<'_>, out: &mut Vec<Excess>) {
    let cgroup_dirs: Vec<&str> = spec
        .mounts
        .iter()
        .filter(|m| m.kind == "cgroup" || m.kind == "cgroup2")
        .map(|m| m.destination.as_str())
        .collect();
    let device_paths: BTreeSet<&str> = spec.devices.iter().map(|d| d.path.as_str()).collect();
    // The keys runc maps to sources at restore (libcontainer's restore mounts): the spec's bind
    // mounts and devices by destination, cgroup v1 controllers under the spec's cgroup mount,
    // and "/dev/null", the source of the masks over files, when the spec masks paths.
    let external_ok = |key: &str| {
        spec.mounts.iter().any(|m| m.is_bind() && m.destination == key)
            || cgroup_dirs.iter().any(|d| is_under(key, d))
            || device_paths.contains(key)
            || (key == DEV_NULL && !spec.masked_paths.is_empty())
    };
    // Host mounts in any mount namespace CRIU rebuilds, by key, with where they are mounted.
    let mut keys: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for mounts in images.mount_namespaces.values() {
        for m in mounts {
            if let Some(key) = &m.external {
                let key = clean_path(key);
                if !external_ok(&key) {
                    keys.entry(key).or_default().insert(mountpoint(m));
                }
            }
        }
    }
    out.extend(keys.into_iter().map(|(key, at)| Excess::HostMount { key, at: at.into_iter().collect() }));

    let Some(mounts) = images.container_mounts() else { return };
    let may_mount = caps::has(spec.caps.bounding, caps::SYS_ADMIN);
    // The last mount at a place is the one the container sees.
    let mut at: BTreeMap<String, &Mount> = BTreeMap::new();
    for m in mounts {
        at.insert(mountpoint(m), m);
    }
    if spec.root_readonly && at.get("/").is_some_and(|m| !m.readonly) {
        out.push(Excess::Writable { path: "/".into(), why: "the new spec makes the root filesystem read-only" });
    }
    let exists = |p: &str| !(is_under(p, "/proc") || is_under(p, "/sys")) || (host.proc_path_exists)(p);
    for (path, m) in &at {
        if path == "/" {
            continue;
        }
        if m.external.is_some() {
            // The spec's own source is mounted there at restore (checked above), with the
            // checkpoint's mount flags; cgroup v1 controllers are bound read-only under a
            // read-only cgroup mount.
            let ro = spec.mount_at(path).is_some_and(|sm| sm.readonly())
                || spec.mounts.iter().any(|sm| sm.kind == "cgroup" && sm.readonly() && is_under(path, &sm.destination));
            if ro && !m.readonly {
                out.push(Excess::Writable { path: path.clone(), why: "the new spec mounts it read-only" });
            }
            continue;
        }
        if let Some(sm) = spec.mount_at(path) {
            // runc emulates a cgroup v1 mount with a writable tmpfs holding read-only controllers.
            let v1_cgroup_tmpfs = sm.kind == "cgroup" && m.fstype == images::FSTYPE_TMPFS;
            if type_matches(&sm.kind, m) == Some(false) {
                out.push(Excess::MountType { path: path.clone(), found: fstype_name(m), want: sm.kind.clone() });
            } else if sm.readonly() && !m.readonly && !v1_cgroup_tmpfs {
                out.push(Excess::Writable { path: path.clone(), why: "the new spec mounts it read-only" });
            }
            continue;
        }
        if spec.masked_paths.contains(path) || spec.readonly_paths.contains(path) {
            continue; // checked below
        }
        if device_paths.contains(path.as_str()) || (spec.terminal && path == "/dev/console") {
            continue; // runc binds these itself
        }
        if cgroup_dirs.iter().any(|d| is_under(path, d)) {
            continue; // cgroup v1 controllers under the spec's cgroup mount
        }
        if !may_mount {
            out.push(Excess::ExtraMount { path: path.clone(), fstype: fstype_name(m) });
        }
    }
    for p in &spec.readonly_paths {
        if !exists(p) {
            continue;
        }
        match at.get(p) {
            Some(m) if m.readonly => {}
            _ => out.push(Excess::Writable {
                path: p.clone(),
                why: "the new spec makes it read-only (linux.readonlyPaths)",
            }),
        }
    }
    for p in &spec.masked_paths {
        if exists(p) && !at.get(p).is_some_and(|m| is_mask(m)) {
            out.push(Excess::Unmasked { path: p.clone() });
        }
    }
}

/// Whether `m` hides what is under it as runc's masks do: `/dev/null` bound over a file (the
/// host's, declared external, or the container's own from its /dev tmpfs), or a read-only tmpfs
/// over a directory.
fn is_mask(m: &Mount) -> bool {
    m.external.as_deref() == Some(DEV_NULL) || (m.fstype == images::FSTYPE_TMPFS && (m.readonly || m.root == "/null"))
}

/// A mount's place in the container, cleaned ("/" for the root).
fn mountpoint(m: &Mount) -> String {
    clean_path(m.mountpoint.trim_start_matches('.'))
}

/// The device nodes of the container's `/dev` tmpfs (from its archive in the images) that are
/// neither in the spec's `linux.devices` nor among runc's defaults.
pub fn check_devices(
    images_dir: &Path,
    images: &CheckpointImages,
    spec: &SpecGrants,
) -> Result<Vec<Excess>, GrantError> {
    let Some(mounts) = images.container_mounts() else { return Ok(Vec::new()) };
    let Some(dev) = mounts.iter().rev().find(|m| mountpoint(m) == "/dev" && m.fstype == images::FSTYPE_TMPFS) else {
        return Ok(Vec::new());
    };
    let Some(nodes) = images::tmpfs_device_nodes(images_dir, dev.root_dev, "/dev")? else { return Ok(Vec::new()) };
    let granted = |n: &DeviceNode| {
        RUNC_DEFAULT_DEVICES.contains(&(n.kind, n.major, n.minor))
            || spec.devices.iter().any(|d| {
                (d.kind == n.kind || (d.kind == 'u' && n.kind == 'c'))
                    && u64::try_from(d.major).ok() == Some(n.major)
                    && u64::try_from(d.minor).ok() == Some(n.minor)
            })
    };
    let extra: Vec<DeviceNode> = nodes.into_iter().filter(|n| !granted(n)).collect();
    Ok(if extra.is_empty() { Vec::new() } else { vec![Excess::Devices { nodes: extra }] })
}

#[cfg(test)]
mod tests;
