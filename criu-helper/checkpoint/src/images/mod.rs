//! What CRIU will restore, read from its own images: every task's credentials, seccomp state and
//! namespaces, the mount trees, user namespace maps, AppArmor policies, and the device nodes in
//! a container's `/dev`.
//!
//! CRIU restores processes with the credentials in its images, not with the new container's spec
//! (runc only builds namespaces, cgroups and mounts from the spec), so these images, not
//! `spec.dump` or the manifest, are what a restore must be checked against. Only the small
//! metadata images are read, never the memory pages: the check costs the same for a 1 MiB and a
//! 50 GiB checkpoint.
//!
//! The format (CRIU's `criu/image.c`, `criu/protobuf.c`): a 32-bit magic (`inventory.img`), or
//! CRIU's common magic followed by the image's own; then entries, each a 32-bit little-endian
//! length and that many bytes of one protobuf message. A hostile image can claim any length, so
//! every file and entry is bounded before it is read.

pub mod proto;

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::io::{self, Read};
use std::path::{Path, PathBuf};

use prost::Message;

/// `inventory.img`'s magic (it has no common magic before it).
pub const INVENTORY_MAGIC: u32 = 0x5831_3116;
/// The magic every other image starts with.
pub const IMG_COMMON_MAGIC: u32 = 0x5456_4319;
pub const PSTREE_MAGIC: u32 = 0x5027_3030;
pub const CORE_MAGIC: u32 = 0x5505_3847;
pub const IDS_MAGIC: u32 = 0x5443_2030;
pub const CREDS_MAGIC: u32 = 0x5402_3547;
pub const MNTS_MAGIC: u32 = 0x5556_3928;
pub const USERNS_MAGIC: u32 = 0x5547_4906;
pub const SECCOMP_MAGIC: u32 = 0x6441_3049;
pub const APPARMOR_MAGIC: u32 = 0x5942_3047;

/// The largest metadata image read (a pstree of a million processes is ~20 MiB).
const MAX_IMAGE_BYTES: u64 = 64 << 20;
/// The largest uncompressed `/dev` tmpfs archive read for its device nodes (a container's
/// `/dev` holds device nodes, links and a few small files: KiBs).
const MAX_DEV_TMPFS_BYTES: u64 = 64 << 20;

/// CRIU task states (`compel/include/uapi/task-state.h`).
pub const TASK_DEAD: u32 = 0x02;
pub const TASK_ZOMBIE: u32 = 0x06;

/// CRIU's `fstype` numbers (images/mnt.proto) the check needs.
pub const FSTYPE_PROC: u32 = 1;
pub const FSTYPE_SYSFS: u32 = 2;
pub const FSTYPE_TMPFS: u32 = 5;
pub const FSTYPE_DEVPTS: u32 = 6;
pub const FSTYPE_CGROUP: u32 = 12;
pub const FSTYPE_MQUEUE: u32 = 14;
pub const FSTYPE_CGROUP2: u32 = 23;

/// `MS_RDONLY`, in both a mount's flags and its superblock's.
pub const MS_RDONLY: u32 = 1;

/// An image that cannot be read as CRIU wrote it. Every variant names the file.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("{}: cannot read: {source}", file.display())]
    Io {
        file: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{}: missing (CRIU's images are incomplete)", file.display())]
    Missing { file: PathBuf },
    #[error("{}: {size} bytes, more than the {max} a CRIU metadata image may have", file.display())]
    TooBig { file: PathBuf, size: u64, max: u64 },
    #[error("{}: not a CRIU image of this kind (magic {found:#010x}, want {want:#010x})", file.display())]
    Magic { file: PathBuf, found: u32, want: u32 },
    #[error("{}: truncated: {reason}", file.display())]
    Truncated { file: PathBuf, reason: String },
    #[error("{}: entry {index}: not a valid {message}: {reason}", file.display())]
    Decode { file: PathBuf, index: usize, message: &'static str, reason: String },
    #[error("{}: {reason}", file.display())]
    Malformed { file: PathBuf, reason: String },
}

/// The ids of the namespaces a task is in, one per kind (absent: not recorded).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct NsIds {
    ids: [Option<u32>; NsKind::ALL.len()],
}

/// A kind of namespace, as the OCI spec names it (`linux.namespaces[].type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum NsKind {
    Pid,
    Network,
    Ipc,
    Uts,
    Mount,
    User,
    Cgroup,
}

impl NsKind {
    pub const ALL: [NsKind; 7] =
        [NsKind::Pid, NsKind::Network, NsKind::Ipc, NsKind::Uts, NsKind::Mount, NsKind::User, NsKind::Cgroup];

    /// The OCI spec's name of the kind.
    pub fn oci_name(self) -> &'static str {
        match self {
            NsKind::Pid => "pid",
            NsKind::Network => "network",
            NsKind::Ipc => "ipc",
            NsKind::Uts => "uts",
            NsKind::Mount => "mount",
            NsKind::User => "user",
            NsKind::Cgroup => "cgroup",
        }
    }

    pub fn from_oci_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|k| k.oci_name() == name)
    }

    fn index(self) -> usize {
        self as usize
    }
}

impl std::fmt::Display for NsKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.oci_name())
    }
}

impl NsIds {
    pub fn get(&self, kind: NsKind) -> Option<u32> {
        self.ids[kind.index()]
    }

    /// Sets the namespace of one kind (building ids for tests and tools).
    pub fn set(&mut self, kind: NsKind, id: Option<u32>) {
        self.ids[kind.index()] = id;
    }

    pub(crate) fn from_proto(p: &proto::TaskKobjIdsEntry) -> Self {
        let mut ids = [None; NsKind::ALL.len()];
        ids[NsKind::Pid.index()] = p.pid_ns_id;
        ids[NsKind::Network.index()] = p.net_ns_id;
        ids[NsKind::Ipc.index()] = p.ipc_ns_id;
        ids[NsKind::Uts.index()] = p.uts_ns_id;
        ids[NsKind::Mount.index()] = p.mnt_ns_id;
        ids[NsKind::User.index()] = p.user_ns_id;
        ids[NsKind::Cgroup.index()] = p.cgroup_ns_id;
        Self { ids }
    }
}

/// The five capability sets of a thread, as bit masks (bit n: capability n).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CapSets {
    pub effective: u64,
    pub permitted: u64,
    pub inheritable: u64,
    pub bounding: u64,
    pub ambient: u64,
}

/// A thread's credentials as CRIU will set them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Creds {
    /// Real, effective, saved and filesystem uid.
    pub uids: [u32; 4],
    /// Real, effective, saved and filesystem gid.
    pub gids: [u32; 4],
    pub groups: Vec<u32>,
    pub caps: CapSets,
    pub secbits: u32,
    /// `None`: an image of a CRIU that did not record it.
    pub no_new_privs: Option<bool>,
    /// The LSM label (`/proc/<pid>/attr/current`), e.g. `docker-default (enforce)`.
    pub lsm_profile: Option<String>,
    pub lsm_sockcreate: Option<String>,
    /// AppArmor policy data CRIU would load for this task.
    pub apparmor_data: bool,
}

impl Creds {
    fn from_proto(c: &proto::CredsEntry) -> Self {
        Self {
            uids: [c.uid, c.euid, c.suid, c.fsuid],
            gids: [c.gid, c.egid, c.sgid, c.fsgid],
            groups: c.groups.clone(),
            caps: CapSets {
                effective: cap_mask(&c.cap_eff),
                permitted: cap_mask(&c.cap_prm),
                inheritable: cap_mask(&c.cap_inh),
                bounding: cap_mask(&c.cap_bnd),
                ambient: cap_mask(&c.cap_amb),
            },
            secbits: c.secbits,
            no_new_privs: c.no_new_privs.map(|v| v != 0),
            lsm_profile: c.lsm_profile.clone().filter(|s| !s.is_empty()),
            lsm_sockcreate: c.lsm_sockcreate.clone().filter(|s| !s.is_empty()),
            apparmor_data: c.apparmor_data.as_ref().is_some_and(|d| !d.is_empty()),
        }
    }
}

/// A capability set of 32-bit words as one mask; words beyond the second would be capabilities
/// ≥ 64, which no kernel has: they are folded in as "all" so that the check refuses them.
fn cap_mask(words: &[u32]) -> u64 {
    let mut mask = 0u64;
    for (i, w) in words.iter().enumerate() {
        match i {
            0 => mask |= u64::from(*w),
            1 => mask |= u64::from(*w) << 32,
            _ if *w != 0 => mask = u64::MAX,
            _ => {}
        }
    }
    mask
}

/// A thread's seccomp state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Seccomp {
    Disabled,
    Strict,
    /// Filtering, with the index of the innermost filter in [`CheckpointImages::seccomp_filters`].
    Filter(Option<u32>),
}

impl Seccomp {
    fn from_mode(mode: Option<i32>, filter: Option<u32>) -> Result<Self, String> {
        match mode.unwrap_or(0) {
            0 => Ok(Seccomp::Disabled),
            1 => Ok(Seccomp::Strict),
            2 => Ok(Seccomp::Filter(filter)),
            other => Err(format!("unknown seccomp mode {other}")),
        }
    }
}

/// One thread of a task.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Thread {
    /// Thread id (in the dumped pid namespace).
    pub tid: u32,
    pub creds: Creds,
    pub seccomp: Seccomp,
}

/// One process of the dump.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Task {
    /// Pid in the container's pid namespace.
    pub pid: u32,
    pub ppid: u32,
    /// CRIU's task state ([`TASK_DEAD`], [`TASK_ZOMBIE`], ...).
    pub state: u32,
    /// `None` for dead tasks, which CRIU records without namespaces.
    pub ns: Option<NsIds>,
    /// Empty for a zombie (it has no credentials left to restore).
    pub threads: Vec<Thread>,
}

impl Task {
    pub fn is_dead(&self) -> bool {
        matches!(self.state, TASK_DEAD | TASK_ZOMBIE)
    }
}

/// A mount of a mount namespace CRIU will rebuild.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mount {
    pub mnt_id: u32,
    pub parent_mnt_id: u32,
    /// Where it is mounted, relative to the container's root ("/" for the root).
    pub mountpoint: String,
    /// The part of the source filesystem mounted there ("/" for a whole filesystem).
    pub root: String,
    pub fstype: u32,
    /// The filesystem's name for types CRIU has no number for.
    pub fsname: Option<String>,
    pub source: String,
    pub options: String,
    pub readonly: bool,
    /// Declared external at dump (a bind mount from the host): the key CRIU restores it from,
    /// whatever the restoring side maps that key to. runc keys the spec's bind mounts and devices
    /// by their destination, cgroup v1 controllers by theirs, and masked files by "/dev/null".
    pub external: Option<String>,
    pub root_dev: u32,
}

/// A device node in a tmpfs CRIU will restore.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceNode {
    /// Path in the container.
    pub path: String,
    /// 'c' or 'b'.
    pub kind: char,
    pub major: u64,
    pub minor: u64,
}

/// Everything of a checkpoint's CRIU images the restore check compares with a spec.
#[derive(Debug, Clone, PartialEq)]
pub struct CheckpointImages {
    /// The namespaces of the CRIU that dumped: a task in one of them was in the host's namespace.
    pub dump_host_ns: Option<NsIds>,
    /// `lsmtype` of the dump host: 0 none, 1 SELinux, 2 AppArmor.
    pub lsm_type: i32,
    /// Every process, the container's init first (pstree order).
    pub tasks: Vec<Task>,
    /// The filters of `seccomp.img`.
    pub seccomp_filters: Vec<proto::SeccompFilter>,
    /// The mounts of each mount namespace, by its id.
    pub mount_namespaces: BTreeMap<u32, Vec<Mount>>,
    /// The id maps of each user namespace CRIU creates, by its id.
    pub user_namespaces: BTreeMap<u32, proto::UsernsEntry>,
    /// Names of AppArmor policies CRIU would load into the kernel.
    pub apparmor_policies: Vec<String>,
}

impl CheckpointImages {
    /// Reads the metadata images of the CRIU image directory `dir` (never `pages-*.img`).
    pub fn read(dir: &Path) -> Result<Self, ImageError> {
        let inventory: proto::InventoryEntry =
            read_one(&dir.join("inventory.img"), None, INVENTORY_MAGIC, "inventory entry")?;
        let pstree_file = dir.join("pstree.img");
        let pstree: Vec<proto::PstreeEntry> = read_all(&pstree_file, PSTREE_MAGIC, "pstree entry")?;
        if pstree.is_empty() {
            return Err(ImageError::Malformed { file: pstree_file, reason: "no processes".into() });
        }
        let mut seen = BTreeSet::new();
        let mut tasks = Vec::with_capacity(pstree.len());
        for e in &pstree {
            if !seen.insert(e.pid) {
                return Err(ImageError::Malformed { file: pstree_file, reason: format!("pid {} listed twice", e.pid) });
            }
            tasks.push(read_task(dir, e)?);
        }
        let seccomp_filters =
            match read_optional::<proto::SeccompEntry>(&dir.join("seccomp.img"), SECCOMP_MAGIC, "seccomp entry")? {
                Some(entries) => entries.into_iter().flat_map(|e| e.seccomp_filters).collect(),
                None => Vec::new(),
            };
        let mut mount_namespaces = BTreeMap::new();
        let mut user_namespaces = BTreeMap::new();
        for (name, id) in numbered_images(dir)? {
            let file = dir.join(&name);
            if name.starts_with("mountpoints-") {
                let entries: Vec<proto::MntEntry> = read_all(&file, MNTS_MAGIC, "mount entry")?;
                mount_namespaces.insert(id, entries.iter().map(mount_from_proto).collect());
            } else if name.starts_with("userns-") {
                let entry: proto::UsernsEntry =
                    read_one(&file, Some(IMG_COMMON_MAGIC), USERNS_MAGIC, "user namespace entry")?;
                user_namespaces.insert(id, entry);
            }
        }
        let apparmor_policies =
            match read_optional::<proto::ApparmorEntry>(&dir.join("apparmor.img"), APPARMOR_MAGIC, "apparmor entry")? {
                Some(entries) => {
                    let mut names = Vec::new();
                    for e in &entries {
                        collect_policies(&e.namespaces, "", &mut names);
                    }
                    names
                }
                None => Vec::new(),
            };
        Ok(Self {
            dump_host_ns: inventory.root_ids.as_ref().map(NsIds::from_proto),
            lsm_type: inventory.lsmtype.unwrap_or(0),
            tasks,
            seccomp_filters,
            mount_namespaces,
            user_namespaces,
            apparmor_policies,
        })
    }

    /// The container's init: the first task of the process tree.
    pub fn init(&self) -> &Task {
        &self.tasks[0]
    }

    /// The mounts of the container's own mount namespace (its init's).
    pub fn container_mounts(&self) -> Option<&[Mount]> {
        let id = self.init().ns?.get(NsKind::Mount)?;
        self.mount_namespaces.get(&id).map(Vec::as_slice)
    }
}

fn collect_policies(namespaces: &[proto::AaNamespace], prefix: &str, out: &mut Vec<String>) {
    for ns in namespaces {
        let path = format!("{prefix}:{}", ns.name);
        out.extend(ns.policies.iter().map(|p| format!("{path}//{}", p.name)));
        collect_policies(&ns.namespaces, &path, out);
    }
}

fn mount_from_proto(m: &proto::MntEntry) -> Mount {
    Mount {
        mnt_id: m.mnt_id,
        parent_mnt_id: m.parent_mnt_id,
        mountpoint: m.mountpoint.clone(),
        root: m.root.clone(),
        fstype: m.fstype,
        fsname: m.fsname.clone(),
        source: m.source.clone(),
        options: m.options.clone(),
        readonly: m.flags & MS_RDONLY != 0 || m.sb_flags.unwrap_or(0) & MS_RDONLY != 0,
        // CRIU ≥ 3.x records an external mount by its key alone (`ext_mount` is from older
        // releases, which keyed it by the mountpoint).
        external: match (&m.ext_key, m.ext_mount) {
            (Some(key), _) if !key.is_empty() => Some(key.clone()),
            (_, Some(true)) => Some(m.mountpoint.clone()),
            _ => None,
        },
        root_dev: m.root_dev,
    }
}

/// One process: its ids, the leader's core (state, old-style seccomp) and every thread's core.
fn read_task(dir: &Path, e: &proto::PstreeEntry) -> Result<Task, ImageError> {
    let leader_file = dir.join(format!("core-{}.img", e.pid));
    let leader: proto::CoreEntry = read_one(&leader_file, Some(IMG_COMMON_MAGIC), CORE_MAGIC, "core entry")?;
    let tc = leader.tc.as_ref().ok_or_else(|| ImageError::Malformed {
        file: leader_file.clone(),
        reason: "no task core (the process's state and credentials are missing)".into(),
    })?;
    let state = tc.task_state;
    let mut task = Task { pid: e.pid, ppid: e.ppid, state, ns: None, threads: Vec::new() };
    if task.is_dead() {
        return Ok(task);
    }
    let ids_file = dir.join(format!("ids-{}.img", e.pid));
    let ids: proto::TaskKobjIdsEntry = read_one(&ids_file, Some(IMG_COMMON_MAGIC), IDS_MAGIC, "task ids entry")?;
    task.ns = Some(NsIds::from_proto(&ids));
    if e.threads.is_empty() {
        return Err(ImageError::Malformed {
            file: dir.join("pstree.img"),
            reason: format!("process {} has no threads", e.pid),
        });
    }
    // Images without per-thread credentials carry one creds image per process (old format).
    let mut shared_creds: Option<Creds> = None;
    for &tid in &e.threads {
        let file = dir.join(format!("core-{tid}.img"));
        let core = if tid == e.pid {
            leader.clone()
        } else {
            read_one(&file, Some(IMG_COMMON_MAGIC), CORE_MAGIC, "core entry")?
        };
        // Without a thread core CRIU restores no credentials at all: the thread would keep
        // CRIU's own (root, every capability). Such an image is refused, not guessed at.
        let thread_core = core.thread_core.as_ref().ok_or_else(|| ImageError::Malformed {
            file: file.clone(),
            reason: format!(
                "thread {tid} has no thread core: CRIU would restore it with its own credentials (root, every capability)"
            ),
        })?;
        let creds = match &thread_core.creds {
            Some(c) => Creds::from_proto(c),
            None => match &shared_creds {
                Some(c) => c.clone(),
                None => {
                    let creds_file = dir.join(format!("creds-{}.img", e.pid));
                    let c: proto::CredsEntry =
                        read_one(&creds_file, Some(IMG_COMMON_MAGIC), CREDS_MAGIC, "creds entry")?;
                    let c = Creds::from_proto(&c);
                    shared_creds = Some(c.clone());
                    c
                }
            },
        };
        // Per-thread seccomp; images older than that keep it in the task core.
        let (mode, filter) = if thread_core.seccomp_mode.is_some() {
            (thread_core.seccomp_mode, thread_core.seccomp_filter)
        } else {
            (tc.old_seccomp_mode, tc.old_seccomp_filter)
        };
        let seccomp =
            Seccomp::from_mode(mode, filter).map_err(|reason| ImageError::Malformed { file: file.clone(), reason })?;
        task.threads.push(Thread { tid, creds, seccomp });
    }
    Ok(task)
}

/// `mountpoints-<n>.img` and `userns-<n>.img` of `dir`, with their numbers.
fn numbered_images(dir: &Path) -> Result<Vec<(String, u32)>, ImageError> {
    let io_err = |source| ImageError::Io { file: dir.to_path_buf(), source };
    let mut out = Vec::new();
    for entry in fs::read_dir(dir).map_err(io_err)? {
        let entry = entry.map_err(io_err)?;
        let Ok(name) = entry.file_name().into_string() else { continue };
        let number = ["mountpoints-", "userns-"]
            .iter()
            .find_map(|p| name.strip_prefix(p)?.strip_suffix(".img")?.parse::<u32>().ok());
        if let Some(n) = number {
            out.push((name, n));
        }
    }
    out.sort();
    Ok(out)
}

/// The whole file, bounded.
fn read_bounded(file: &Path, max: u64) -> Result<Vec<u8>, ImageError> {
    let f = match fs::File::open(file) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Err(ImageError::Missing { file: file.into() }),
        Err(source) => return Err(ImageError::Io { file: file.into(), source }),
    };
    let meta = f.metadata().map_err(|source| ImageError::Io { file: file.into(), source })?;
    if !meta.is_file() {
        return Err(ImageError::Malformed { file: file.into(), reason: "not a regular file".into() });
    }
    if meta.len() > max {
        return Err(ImageError::TooBig { file: file.into(), size: meta.len(), max });
    }
    let mut bytes = Vec::with_capacity(meta.len() as usize);
    f.take(max + 1).read_to_end(&mut bytes).map_err(|source| ImageError::Io { file: file.into(), source })?;
    if bytes.len() as u64 > max {
        return Err(ImageError::TooBig { file: file.into(), size: bytes.len() as u64, max });
    }
    Ok(bytes)
}

/// The next little-endian u32 of an image (a magic or a length), `what` naming it in the error.
pub(crate) fn take_u32(file: &Path, rest: &mut &[u8], what: &str) -> Result<u32, ImageError> {
    let (head, tail) = rest.split_first_chunk::<4>().ok_or_else(|| ImageError::Truncated {
        file: file.into(),
        reason: format!("{} bytes left where {what} should be", rest.len()),
    })?;
    *rest = tail;
    Ok(u32::from_le_bytes(*head))
}

/// The entries of an image: checks the magic(s), then splits the length-prefixed messages.
fn entries<'a>(file: &Path, bytes: &'a [u8], common: Option<u32>, magic: u32) -> Result<Vec<&'a [u8]>, ImageError> {
    let mut rest = bytes;
    for want in common.into_iter().chain([magic]) {
        let found = take_u32(file, &mut rest, "the magic")?;
        if found != want {
            return Err(ImageError::Magic { file: file.into(), found, want });
        }
    }
    let mut out = Vec::new();
    while !rest.is_empty() {
        let len = take_u32(file, &mut rest, "an entry's length")? as usize;
        if len > rest.len() {
            return Err(ImageError::Truncated {
                file: file.into(),
                reason: format!("entry {} claims {len} bytes, {} left", out.len(), rest.len()),
            });
        }
        let (entry, tail) = rest.split_at(len);
        out.push(entry);
        rest = tail;
    }
    Ok(out)
}

fn decode<M: Message + Default>(
    file: &Path,
    index: usize,
    bytes: &[u8],
    message: &'static str,
) -> Result<M, ImageError> {
    M::decode(bytes).map_err(|e| ImageError::Decode { file: file.into(), index, message, reason: e.to_string() })
}

/// Every entry of an image with CRIU's common magic.
fn read_all<M: Message + Default>(file: &Path, magic: u32, message: &'static str) -> Result<Vec<M>, ImageError> {
    let bytes = read_bounded(file, MAX_IMAGE_BYTES)?;
    entries(file, &bytes, Some(IMG_COMMON_MAGIC), magic)?
        .into_iter()
        .enumerate()
        .map(|(i, e)| decode(file, i, e, message))
        .collect()
}

/// [`read_all`] of an image CRIU writes only when there is something to put in it.
fn read_optional<M: Message + Default>(
    file: &Path,
    magic: u32,
    message: &'static str,
) -> Result<Option<Vec<M>>, ImageError> {
    match read_all(file, magic, message) {
        Ok(v) => Ok(Some(v)),
        Err(ImageError::Missing { .. }) => Ok(None),
        Err(e) => Err(e),
    }
}

/// The single entry of an image.
fn read_one<M: Message + Default>(
    file: &Path,
    common: Option<u32>,
    magic: u32,
    message: &'static str,
) -> Result<M, ImageError> {
    let bytes = read_bounded(file, MAX_IMAGE_BYTES)?;
    let entries = entries(file, &bytes, common, magic)?;
    match entries.as_slice() {
        [one] => decode(file, 0, one, message),
        other => Err(ImageError::Malformed { file: file.into(), reason: format!("{} entries, want one", other.len()) }),
    }
}

/// The device nodes in the tmpfs CRIU dumped for the mount with `root_dev` (its
/// `tmpfs-dev-<root_dev>.tar.gz.img`), bounded; `None` when there is no such archive (an empty
/// tmpfs, or one CRIU did not dump).
pub fn tmpfs_device_nodes(dir: &Path, root_dev: u32, mountpoint: &str) -> Result<Option<Vec<DeviceNode>>, ImageError> {
    let file = dir.join(format!("tmpfs-dev-{root_dev}.tar.gz.img"));
    let f = match fs::File::open(&file) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(source) => return Err(ImageError::Io { file, source }),
    };
    if !f.metadata().map_err(|source| ImageError::Io { file: file.clone(), source })?.is_file() {
        return Err(ImageError::Malformed { file, reason: "not a regular file".into() });
    }
    let mut counted = Counted { inner: flate2::read::GzDecoder::new(f), read: 0 };
    let nodes = device_entries(&mut counted, &file, mountpoint);
    if counted.read > MAX_DEV_TMPFS_BYTES {
        return Err(ImageError::TooBig { file, size: counted.read, max: MAX_DEV_TMPFS_BYTES });
    }
    nodes.map(Some)
}

/// The character and block devices of a tar stream.
fn device_entries(reader: &mut impl Read, file: &Path, mountpoint: &str) -> Result<Vec<DeviceNode>, ImageError> {
    let bad = |e: io::Error| ImageError::Malformed { file: file.into(), reason: format!("not a tar.gz archive: {e}") };
    let mut archive = tar::Archive::new(reader);
    let mut out = Vec::new();
    for entry in archive.entries().map_err(bad)? {
        let entry = entry.map_err(bad)?;
        let header = entry.header();
        let kind = match header.entry_type() {
            tar::EntryType::Char => 'c',
            tar::EntryType::Block => 'b',
            _ => continue,
        };
        let rel = entry.path().map_err(bad)?.to_string_lossy().trim_start_matches("./").to_string();
        let (Ok(Some(major)), Ok(Some(minor))) = (header.device_major(), header.device_minor()) else {
            return Err(ImageError::Malformed {
                file: file.into(),
                reason: format!("device entry {rel} without numbers"),
            });
        };
        let path = format!("{}/{rel}", mountpoint.trim_end_matches('/'));
        out.push(DeviceNode { path, kind, major: u64::from(major), minor: u64::from(minor) });
    }
    out.sort_by(|a, b| a.path.cmp(&b.path));
    Ok(out)
}

/// A reader that stops at [`MAX_DEV_TMPFS_BYTES`] (plus one byte, to tell "at the limit" from
/// "over it") and counts what it gave.
struct Counted<R> {
    inner: R,
    read: u64,
}

impl<R: Read> Read for Counted<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let left = (MAX_DEV_TMPFS_BYTES + 1).saturating_sub(self.read);
        if left == 0 {
            return Ok(0);
        }
        let want = buf.len().min(usize::try_from(left).unwrap_or(usize::MAX));
        let n = self.inner.read(&mut buf[..want])?;
        self.read += n as u64;
        Ok(n)
    }
}

#[cfg(test)]
pub(crate) mod tests;
