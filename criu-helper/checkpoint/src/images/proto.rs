//! The CRIU image messages the restore check reads, with CRIU's own field numbers (its
//! `images/*.proto`, protobuf 2). Only the fields we read are declared; prost skips the others,
//! so images of newer CRIU releases with more fields still decode.

/// `inventory.img`: `inventory_entry`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct InventoryEntry {
    #[prost(uint32, required, tag = "1")]
    pub img_version: u32,
    /// The namespaces of the CRIU that dumped (the dump host's, as runc runs CRIU there).
    #[prost(message, optional, tag = "3")]
    pub root_ids: Option<TaskKobjIdsEntry>,
    /// `lsmtype`: 0 none, 1 SELinux, 2 AppArmor.
    #[prost(int32, optional, tag = "6")]
    pub lsmtype: Option<i32>,
}

/// `task_kobj_ids_entry` (in `ids-<pid>.img` and the inventory): which namespace of each kind a
/// task is in, as ids unique within one dump.
#[derive(Clone, PartialEq, prost::Message)]
pub struct TaskKobjIdsEntry {
    #[prost(uint32, optional, tag = "5")]
    pub pid_ns_id: Option<u32>,
    #[prost(uint32, optional, tag = "6")]
    pub net_ns_id: Option<u32>,
    #[prost(uint32, optional, tag = "7")]
    pub ipc_ns_id: Option<u32>,
    #[prost(uint32, optional, tag = "8")]
    pub uts_ns_id: Option<u32>,
    #[prost(uint32, optional, tag = "9")]
    pub mnt_ns_id: Option<u32>,
    #[prost(uint32, optional, tag = "10")]
    pub user_ns_id: Option<u32>,
    #[prost(uint32, optional, tag = "11")]
    pub cgroup_ns_id: Option<u32>,
}

/// `pstree.img`: one `pstree_entry` per process.
#[derive(Clone, PartialEq, prost::Message)]
pub struct PstreeEntry {
    #[prost(uint32, required, tag = "1")]
    pub pid: u32,
    #[prost(uint32, required, tag = "2")]
    pub ppid: u32,
    /// Thread ids, the leader's own included.
    #[prost(uint32, repeated, packed = "false", tag = "5")]
    pub threads: Vec<u32>,
}

/// `core-<tid>.img`: `core_entry`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct CoreEntry {
    #[prost(message, optional, tag = "3")]
    pub tc: Option<TaskCoreEntry>,
    #[prost(message, optional, tag = "5")]
    pub thread_core: Option<ThreadCoreEntry>,
}

/// `task_core_entry`: per process (in the leader's core).
#[derive(Clone, PartialEq, prost::Message)]
pub struct TaskCoreEntry {
    /// CRIU's task state: 1 alive, 2 dead, 3 stopped, 6 zombie.
    #[prost(uint32, required, tag = "1")]
    pub task_state: u32,
    /// Seccomp of images older than per-thread seccomp (`seccomp_mode`).
    #[prost(int32, optional, tag = "11")]
    pub old_seccomp_mode: Option<i32>,
    #[prost(uint32, optional, tag = "12")]
    pub old_seccomp_filter: Option<u32>,
}

/// `thread_core_entry`: per thread.
#[derive(Clone, PartialEq, prost::Message)]
pub struct ThreadCoreEntry {
    #[prost(message, optional, tag = "10")]
    pub creds: Option<CredsEntry>,
    /// `seccomp_mode`: 0 disabled, 1 strict, 2 filter.
    #[prost(int32, optional, tag = "11")]
    pub seccomp_mode: Option<i32>,
    /// Index of the thread's innermost filter in `seccomp.img`.
    #[prost(uint32, optional, tag = "12")]
    pub seccomp_filter: Option<u32>,
}

/// `creds_entry`: a thread's credentials (`thread_core.creds`, or `creds-<pid>.img` in old images).
#[derive(Clone, PartialEq, prost::Message)]
pub struct CredsEntry {
    #[prost(uint32, required, tag = "1")]
    pub uid: u32,
    #[prost(uint32, required, tag = "2")]
    pub gid: u32,
    #[prost(uint32, required, tag = "3")]
    pub euid: u32,
    #[prost(uint32, required, tag = "4")]
    pub egid: u32,
    #[prost(uint32, required, tag = "5")]
    pub suid: u32,
    #[prost(uint32, required, tag = "6")]
    pub sgid: u32,
    #[prost(uint32, required, tag = "7")]
    pub fsuid: u32,
    #[prost(uint32, required, tag = "8")]
    pub fsgid: u32,
    /// Capability sets as 32-bit words, lowest capabilities first.
    #[prost(uint32, repeated, packed = "false", tag = "9")]
    pub cap_inh: Vec<u32>,
    #[prost(uint32, repeated, packed = "false", tag = "10")]
    pub cap_prm: Vec<u32>,
    #[prost(uint32, repeated, packed = "false", tag = "11")]
    pub cap_eff: Vec<u32>,
    #[prost(uint32, repeated, packed = "false", tag = "12")]
    pub cap_bnd: Vec<u32>,
    #[prost(uint32, required, tag = "13")]
    pub secbits: u32,
    #[prost(uint32, repeated, packed = "false", tag = "14")]
    pub groups: Vec<u32>,
    #[prost(string, optional, tag = "15")]
    pub lsm_profile: Option<String>,
    #[prost(string, optional, tag = "16")]
    pub lsm_sockcreate: Option<String>,
    #[prost(bytes = "vec", optional, tag = "17")]
    pub apparmor_data: Option<Vec<u8>>,
    #[prost(uint32, optional, tag = "18")]
    pub no_new_privs: Option<u32>,
    #[prost(uint32, repeated, packed = "false", tag = "19")]
    pub cap_amb: Vec<u32>,
}

/// `seccomp.img`: every filter of the dump, chained by `prev`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct SeccompEntry {
    #[prost(message, repeated, tag = "1")]
    pub seccomp_filters: Vec<SeccompFilter>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct SeccompFilter {
    /// The classic BPF program (`struct sock_filter` array).
    #[prost(bytes = "vec", required, tag = "1")]
    pub filter: Vec<u8>,
    /// Index of the filter installed before this one.
    #[prost(uint32, optional, tag = "2")]
    pub prev: Option<u32>,
    #[prost(uint32, optional, tag = "3")]
    pub flags: Option<u32>,
}

/// `mountpoints-<mnt ns id>.img`: one `mnt_entry` per mount of a mount namespace.
#[derive(Clone, PartialEq, prost::Message)]
pub struct MntEntry {
    /// CRIU's `fstype` enum (1 proc, 2 sysfs, 5 tmpfs, 6 devpts, 12 cgroup, 14 mqueue, 17 overlay, 23 cgroup2, 0 other: see `fsname`).
    #[prost(uint32, required, tag = "1")]
    pub fstype: u32,
    #[prost(uint32, required, tag = "2")]
    pub mnt_id: u32,
    #[prost(uint32, required, tag = "3")]
    pub root_dev: u32,
    #[prost(uint32, required, tag = "4")]
    pub parent_mnt_id: u32,
    /// Per-mount flags (`MS_RDONLY` = 1, ...).
    #[prost(uint32, required, tag = "5")]
    pub flags: u32,
    #[prost(string, required, tag = "6")]
    pub root: String,
    #[prost(string, required, tag = "7")]
    pub mountpoint: String,
    #[prost(string, required, tag = "8")]
    pub source: String,
    #[prost(string, required, tag = "9")]
    pub options: String,
    /// Set by old CRIU releases for an external mount; current ones set only `ext_key`.
    #[prost(bool, optional, tag = "13")]
    pub ext_mount: Option<bool>,
    #[prost(string, optional, tag = "14")]
    pub fsname: Option<String>,
    /// Superblock flags (`MS_RDONLY` = 1 for a read-only filesystem).
    #[prost(uint32, optional, tag = "17")]
    pub sb_flags: Option<u32>,
    /// The key of an external mount (a bind mount from outside the container): the restoring
    /// side maps it to a source.
    #[prost(string, optional, tag = "18")]
    pub ext_key: Option<String>,
}

/// `userns-<id>.img`: the id maps of a user namespace CRIU will create.
#[derive(Clone, PartialEq, prost::Message)]
pub struct UsernsEntry {
    #[prost(message, repeated, tag = "1")]
    pub uid_map: Vec<UidGidExtent>,
    #[prost(message, repeated, tag = "2")]
    pub gid_map: Vec<UidGidExtent>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct UidGidExtent {
    #[prost(uint32, required, tag = "1")]
    pub first: u32,
    #[prost(uint32, required, tag = "2")]
    pub lower_first: u32,
    #[prost(uint32, required, tag = "3")]
    pub count: u32,
}

/// `apparmor.img`: AppArmor namespaces and policies CRIU would load into the kernel.
#[derive(Clone, PartialEq, prost::Message)]
pub struct ApparmorEntry {
    #[prost(message, repeated, tag = "1")]
    pub namespaces: Vec<AaNamespace>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct AaNamespace {
    #[prost(string, required, tag = "1")]
    pub name: String,
    #[prost(message, repeated, tag = "2")]
    pub policies: Vec<AaPolicy>,
    #[prost(message, repeated, tag = "3")]
    pub namespaces: Vec<AaNamespace>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct AaPolicy {
    #[prost(string, required, tag = "1")]
    pub name: String,
}
