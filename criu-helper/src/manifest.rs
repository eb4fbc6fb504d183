//! The checkpoint manifest (`kybernate.json`) and the CRI-O compatible `config.dump`.
//!
//! The directory layout follows Kubernetes/CRI-O checkpoint archives
//! (`checkpoint/`, `config.dump`, `spec.dump`, `rootfs-diff.tar`) so that
//! checkpointctl can inspect our exports; the manifest adds what a safe
//! restore needs: who owns the checkpoint, the flags it was dumped with, and
//! a checksum of every file.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::SystemTime;

use crate::flags::CheckpointFlags;

pub const MANIFEST_FILE: &str = "kybernate.json";
/// CRIU images, as in Kubernetes/CRI-O checkpoint archives.
pub const IMAGES_DIR: &str = "checkpoint";
pub const CONFIG_DUMP: &str = "config.dump";
pub const SPEC_DUMP: &str = "spec.dump";
pub const ROOTFS_DIFF: &str = "rootfs-diff.tar";
/// CRIU's dump statistics (its work dir's `stats-dump`), at the root as in CRI-O's and containerd
/// 2.x's archives, where `checkpointctl inspect --stats` reads them.
pub const STATS_DUMP: &str = "stats-dump";
/// Bumped on any change an older restore could misread.
pub const FORMAT_VERSION: u32 = 1;

/// What `kybernate.json` records about one checkpoint.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Manifest {
    pub format_version: u32,
    /// containerd namespace.
    pub namespace: String,
    pub container_id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod_namespace: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod_name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub container_name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    /// OCI runtime binary + its version text (first line of `--version`).
    pub runtime: ToolInfo,
    pub criu: ToolInfo,
    /// uname release: CRIU images do not always restore on another kernel.
    pub kernel: String,
    /// hostname.
    pub host: String,
    /// RFC 3339 UTC, seconds.
    pub created: String,
    pub options: CheckpointFlags,
    #[serde(default)]
    pub rootfs_diff: bool,
    #[serde(default)]
    pub duration_ms: u64,
    /// Every file of the checkpoint except the manifest itself, by path relative to the checkpoint dir ('/'-separated).
    pub files: BTreeMap<String, FileEntry>,
    /// CUDA state, GPUs and device access of a GPU container; null for CPU containers.
    #[serde(default)]
    pub gpu: Option<crate::gpu::GpuRecord>,
    /// CRIU's images at the top of the directory instead of in `checkpoint/`: a checkpoint written
    /// into containerd's own checkpoint dir, which containerd 2.x's CRI unpacks file by file as
    /// its archive's `checkpoint/` (only images and this manifest; no spec.dump or rootfs diff,
    /// which containerd and CRI keep themselves).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub flat: bool,
}

/// A binary that took part in the checkpoint.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ToolInfo {
    pub path: PathBuf,
    pub version: String,
}

/// Size and checksum of one checkpoint file.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct FileEntry {
    pub size: u64,
    /// Lowercase hex.
    pub sha256: String,
}

impl Manifest {
    /// The namespace that owns the checkpoint for restore policy: pod_namespace if set, else namespace.
    pub fn tenant(&self) -> &str {
        self.pod_namespace.as_deref().unwrap_or(&self.namespace)
    }

    /// Where CRIU's images are, relative to the checkpoint directory ("" when flat).
    pub fn images_rel(&self) -> &'static str {
        if self.flat {
            ""
        } else {
            IMAGES_DIR
        }
    }

    /// Sum of the recorded file sizes.
    pub fn total_size(&self) -> u64 {
        self.files.values().fold(0u64, |sum, f| sum.saturating_add(f.size))
    }
}

/// `config.dump` as CRI-O/checkpointctl write it (their `ContainerConfig`), so
/// their tools can show our checkpoints.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct ConfigDump {
    pub id: String,
    pub name: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub rootfs_image: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub rootfs_image_ref: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub rootfs_image_name: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub runtime: String,
    /// RFC 3339.
    pub created_time: String,
    /// RFC 3339.
    pub checkpointed_time: String,
    pub restored: bool,
}

/// The current time as RFC 3339 UTC with seconds ("2026-11-23T21:25:01Z").
pub fn now_rfc3339() -> String {
    rfc3339(SystemTime::now())
}

/// `at` as RFC 3339 UTC seconds; clamped to what RFC 3339 can express, as
/// humantime panics outside 1970..=9999.
pub(crate) fn rfc3339(at: SystemTime) -> String {
    humantime::format_rfc3339_seconds(clamp_time(at)).to_string()
}

pub(crate) fn clamp_time(at: SystemTime) -> SystemTime {
    // 9999-12-31T23:59:59Z
    let max = SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(253_402_300_799);
    at.clamp(SystemTime::UNIX_EPOCH, max)
}

/// The kernel release (`uname -r`); "unknown" on error.
pub fn kernel_release() -> String {
    nix::sys::utsname::uname().map_or_else(|_| "unknown".into(), |u| u.release().to_string_lossy().into_owned())
}

/// The host name; "unknown" on error.
pub fn host_name() -> String {
    nix::unistd::gethostname().map_or_else(|_| "unknown".into(), |h| h.to_string_lossy().into_owned())
}

#[cfg(test)]
pub(crate) fn sample() -> Manifest {
    Manifest {
        format_version: FORMAT_VERSION,
        namespace: "k8s.io".into(),
        container_id: "c1".into(),
        pod_namespace: Some("team-a".into()),
        pod_name: Some("web-0".into()),
        container_name: Some("web".into()),
        image: Some("docker.io/library/nginx:1".into()),
        runtime: ToolInfo { path: "/usr/bin/runc".into(), version: "runc version 1.2.5".into() },
        criu: ToolInfo { path: "/usr/sbin/criu".into(), version: "4.1.1".into() },
        kernel: kernel_release(),
        host: host_name(),
        created: "2026-11-23T21:25:01Z".into(),
        options: CheckpointFlags { open_tcp: true, ..Default::default() },
        rootfs_diff: false,
        duration_ms: 0,
        files: BTreeMap::new(),
        gpu: None,
        flat: false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn manifest_round_trips_and_skips_empty_options() {
        let mut m = sample();
        m.files.insert("checkpoint/inventory.img".into(), FileEntry { size: 3, sha256: "ab".into() });
        m.files.insert("config.dump".into(), FileEntry { size: 4, sha256: "cd".into() });
        assert_eq!(m.total_size(), 7);
        assert_eq!(m.tenant(), "team-a");
        let text = serde_json::to_string(&m).unwrap();
        assert_eq!(serde_json::from_str::<Manifest>(&text).unwrap(), m);

        m.pod_namespace = None;
        assert_eq!(m.tenant(), "k8s.io");
        let v = serde_json::to_value(&m).unwrap();
        assert!(v.get("pod_namespace").is_none());
        assert!(v["gpu"].is_null());
    }

    #[test]
    fn config_dump_uses_crio_field_names() {
        let d = ConfigDump {
            id: "c1".into(),
            name: "web".into(),
            rootfs_image_name: "nginx:1".into(),
            created_time: "2026-01-01T00:00:00Z".into(),
            checkpointed_time: now_rfc3339(),
            ..Default::default()
        };
        let v = serde_json::to_value(&d).unwrap();
        assert_eq!(v["rootfsImageName"], "nginx:1");
        assert_eq!(v["createdTime"], "2026-01-01T00:00:00Z");
        assert_eq!(v["restored"], false);
        assert!(v.get("rootfsImageRef").is_none());
        let back: ConfigDump = serde_json::from_str(r#"{"id":"x","name":"y","rootfsImage":"sha"}"#).unwrap();
        assert_eq!(back.rootfs_image, "sha");
    }

    #[test]
    fn times_are_rfc3339_seconds_and_never_panic() {
        let now = now_rfc3339();
        assert!(humantime::parse_rfc3339(&now).is_ok(), "{now}");
        assert_eq!(now.len(), "2026-11-23T21:25:01Z".len());
        assert_eq!(rfc3339(SystemTime::UNIX_EPOCH - std::time::Duration::from_secs(5)), "1970-01-01T00:00:00Z");
        assert!(!kernel_release().is_empty() && !host_name().is_empty());
    }
}
