//! Linux capability names and bit numbers (`include/uapi/linux/capability.h`), for reading specs
//! and naming what a checkpoint holds.

/// Capability names by bit number, as OCI specs spell them.
pub const NAMES: [&str; 41] = [
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_DAC_READ_SEARCH",
    "CAP_FOWNER",
    "CAP_FSETID",
    "CAP_KILL",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_SETPCAP",
    "CAP_LINUX_IMMUTABLE",
    "CAP_NET_BIND_SERVICE",
    "CAP_NET_BROADCAST",
    "CAP_NET_ADMIN",
    "CAP_NET_RAW",
    "CAP_IPC_LOCK",
    "CAP_IPC_OWNER",
    "CAP_SYS_MODULE",
    "CAP_SYS_RAWIO",
    "CAP_SYS_CHROOT",
    "CAP_SYS_PTRACE",
    "CAP_SYS_PACCT",
    "CAP_SYS_ADMIN",
    "CAP_SYS_BOOT",
    "CAP_SYS_NICE",
    "CAP_SYS_RESOURCE",
    "CAP_SYS_TIME",
    "CAP_SYS_TTY_CONFIG",
    "CAP_MKNOD",
    "CAP_LEASE",
    "CAP_AUDIT_WRITE",
    "CAP_AUDIT_CONTROL",
    "CAP_SETFCAP",
    "CAP_MAC_OVERRIDE",
    "CAP_MAC_ADMIN",
    "CAP_SYSLOG",
    "CAP_WAKE_ALARM",
    "CAP_BLOCK_SUSPEND",
    "CAP_AUDIT_READ",
    "CAP_PERFMON",
    "CAP_BPF",
    "CAP_CHECKPOINT_RESTORE",
];

pub const SETGID: u32 = 6;
pub const SETUID: u32 = 7;
pub const SETPCAP: u32 = 8;
pub const SYS_ADMIN: u32 = 21;
pub const MAC_ADMIN: u32 = 33;

/// Every capability this table knows, as a mask.
pub const ALL: u64 = (1u64 << NAMES.len()) - 1;

/// The default capabilities of containerd's and Docker's default spec (runc's `runc spec` has
/// fewer): what a container gets unless its spec adds or drops some.
pub const CONTAINER_DEFAULTS: [&str; 14] = [
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_FSETID",
    "CAP_FOWNER",
    "CAP_MKNOD",
    "CAP_NET_RAW",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_SETFCAP",
    "CAP_SETPCAP",
    "CAP_NET_BIND_SERVICE",
    "CAP_SYS_CHROOT",
    "CAP_KILL",
    "CAP_AUDIT_WRITE",
];

/// The bit of a capability name (`CAP_SYS_ADMIN`, or `SYS_ADMIN`, any case).
pub fn bit(name: &str) -> Option<u32> {
    let upper = name.to_ascii_uppercase();
    let full = if upper.starts_with("CAP_") { upper } else { format!("CAP_{upper}") };
    NAMES.iter().position(|n| *n == full).map(|i| i as u32)
}

/// A mask as names, lowest bit first; bits no name is known for as `cap_<n>`.
pub fn names(mask: u64) -> Vec<String> {
    (0..64)
        .filter(|b| mask & (1u64 << b) != 0)
        .map(|b| NAMES.get(b).map_or_else(|| format!("cap_{b}"), |n| (*n).to_string()))
        .collect()
}

/// The mask of [`CONTAINER_DEFAULTS`].
pub fn container_defaults() -> u64 {
    CONTAINER_DEFAULTS.iter().filter_map(|n| bit(n)).fold(0, |m, b| m | (1u64 << b))
}

pub fn has(mask: u64, cap: u32) -> bool {
    mask & (1u64 << cap) != 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_bits_agree_with_the_kernel() {
        assert_eq!(bit("CAP_SYS_ADMIN"), Some(SYS_ADMIN));
        assert_eq!(bit("sys_admin"), Some(21));
        assert_eq!(bit("CAP_CHECKPOINT_RESTORE"), Some(40));
        assert_eq!(bit("CAP_NOPE"), None);
        // containerd's default set is /proc's CapEff 00000000a80425fb.
        assert_eq!(container_defaults(), 0xa804_25fb);
        assert_eq!(names(0b1_0000_0001), vec!["CAP_CHOWN", "CAP_SETPCAP"]);
        assert_eq!(names(1u64 << 63), vec!["cap_63"]);
        assert_eq!(ALL, 0x1ff_ffff_ffff);
    }
}
