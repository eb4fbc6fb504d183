//! The checkpoint manifest (`kybernate.json`) and the CRI-O compatible `config.dump`.
//!
//! The directory layout follows Kubernetes/CRI-O checkpoint archives
//! (`checkpoint/`, `config.dump`, `spec.dump`, `rootfs-diff.tar`) so that
//! checkpointctl can inspect our exports; the manifest adds what a safe
//! restore needs: who owns the checkpoint, the flags it was dumped with, and
//! a checksum of every file (format 2: BLAKE3 in chunks, see `digest`; format 1: SHA-256).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{Duration, SystemTime};

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
/// Bumped on any change an older restore could misread. 2: files hashed with BLAKE3 in chunks
/// (`digest`, [`FileEntry::blake3`], [`FileEntry::chunks`]); 1: one SHA-256 per file.
pub const FORMAT_VERSION: u32 = 2;
/// The oldest format this version still reads and verifies.
pub const OLDEST_FORMAT_VERSION: u32 = 1;
/// How far a manifest's `created` may lie ahead of this node's clock. Node clocks differ slightly
/// and checkpoints move between nodes (export/import), so a checkpoint taken a moment ago on a
/// node whose clock runs ahead is still good; anything further ahead is a forged or broken
/// manifest, which would otherwise sort as the newest checkpoint (`kybernate prune --keep`).
pub const MAX_CLOCK_SKEW: Duration = Duration::from_secs(5 * 60);
/// containerd's limit on identifiers (namespaces, container ids).
pub const MAX_IDENTIFIER_LEN: usize = 76;
/// Kubernetes' limit on DNS-1123 labels (namespaces, container names).
const MAX_DNS_LABEL_LEN: usize = 63;
/// Kubernetes' limit on DNS-1123 subdomains (pod names).
const MAX_DNS_SUBDOMAIN_LEN: usize = 253;
/// How much of a bad value an error message quotes: enough to recognise it, not a whole file.
const MAX_SHOWN: usize = 100;

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
    /// How long the container was frozen by the checkpoint, as the shim measured it: from the
    /// freeze to the thaw (leave-running), or with `exit` until the manifest was written (the
    /// commit and the kill follow, frozen). Absent when the checkpoint did not freeze it (paused
    /// by the client) and in older checkpoints.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub frozen_ms: Option<u64>,
    /// CRIU's own times of the dump (its `stats-dump`): the like-for-like part of the frozen time
    /// to compare with a raw `runc checkpoint`. Absent when CRIU wrote none and in older checkpoints.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dump_stats: Option<DumpStats>,
    /// How the files are hashed (format 2; absent in format 1, where every file has a SHA-256).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub digest: Option<DigestParams>,
    /// Every file of the checkpoint except the manifest itself, by path relative to the checkpoint dir ('/'-separated).
    pub files: BTreeMap<String, FileEntry>,
    /// CUDA state, GPUs and device access of a GPU container; null for CPU containers.
    #[serde(default)]
    pub gpu: Option<kybernate_gpu::GpuRecord>,
    /// CRIU's images at the top of the directory instead of in `checkpoint/`: a checkpoint written
    /// into containerd's own checkpoint dir, which containerd 2.x's CRI unpacks file by file as
    /// its archive's `checkpoint/` (only images and this manifest; no spec.dump or rootfs diff,
    /// which containerd and CRI keep themselves).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub flat: bool,
    /// What a restore needs of the node (architecture, CPU features, cgroup mode, external
    /// mounts), for the restore verdict (`verdict`). Absent in checkpoints of older shims and in
    /// imported kubelet archives: their restores skip those checks.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub needs: Option<crate::verdict::RestoreNeeds>,
}

/// A binary that took part in the checkpoint.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ToolInfo {
    pub path: PathBuf,
    pub version: String,
}

/// CRIU's account of a dump (`criu_stats::DumpTimes`), in milliseconds (rounded) and pages.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct DumpStats {
    /// Freezing the tasks: near zero when the shim froze the container before the dump.
    pub freezing_ms: u64,
    /// From the tasks frozen to CRIU letting them go, all images (pages included) written.
    pub frozen_ms: u64,
    /// Dumping the memory, its writing into the images (`memwrite_ms`) included; both within `frozen_ms`.
    pub memdump_ms: u64,
    pub memwrite_ms: u64,
    #[serde(default)]
    pub pages_scanned: u64,
    /// Pages a pre-dump round had already written (unchanged since).
    #[serde(default)]
    pub pages_skipped_parent: u64,
    #[serde(default)]
    pub pages_written: u64,
}

impl DumpStats {
    /// How long CRIU kept the tasks from running: freezing plus frozen (the journal's `criu_frozen_ms`).
    pub fn stopped_ms(&self) -> u64 {
        self.freezing_ms.saturating_add(self.frozen_ms)
    }
}

/// The digest a format-2 manifest's files are hashed with: `{"algorithm": "blake3", "chunk_size": 8388608}`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct DigestParams {
    pub algorithm: String,
    /// Bytes per chunk digest (a power of two).
    pub chunk_size: u64,
}

/// Size and checksum of one checkpoint file: `sha256` in format 1; `blake3` and `chunks` in
/// format 2. Digests are lowercase hex.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct FileEntry {
    pub size: u64,
    /// Format 1: SHA-256 of the file.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sha256: Option<String>,
    /// Format 2: BLAKE3 of the file (what `b3sum` prints).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub blake3: Option<String>,
    /// Format 2, files larger than one chunk: the BLAKE3 chaining value of each `chunk_size`
    /// bytes (a subtree of the file's BLAKE3 tree), in order; they merge into `blake3`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub chunks: Vec<String>,
}

impl FileEntry {
    /// The file's whole digest as `algorithm:hex`, for display.
    pub fn digest_text(&self) -> String {
        match (&self.blake3, &self.sha256) {
            (Some(b), _) => format!("blake3:{b}"),
            (None, Some(s)) => format!("sha256:{s}"),
            (None, None) => "-".into(),
        }
    }
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

/// A manifest field that is not what our shim writes. The manifest is not covered by the
/// checksums, so its fields are checked before anyone trusts them: ids name store directories and
/// the restore policy's tenant, `created` orders checkpoints for `prune`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ManifestError {
    #[error("created {value:?} is not an RFC 3339 UTC time such as \"2026-11-23T21:25:01Z\" ({reason})")]
    CreatedNotRfc3339 { value: String, reason: String },
    #[error("created {value:?} is in the future (this node's clock says {now}; at most {} of clock skew between nodes is allowed)", humantime::format_duration(MAX_CLOCK_SKEW))]
    CreatedInFuture { value: String, now: String },
    #[error("{field} {value:?} is not a valid {rule}")]
    BadField { field: &'static str, value: String, rule: &'static str },
}

const CONTAINERD_ID: &str =
    "containerd identifier (letters and digits, separated by single '.', '_' or '-', at most 76 characters)";
const DNS_LABEL: &str = "Kubernetes name (DNS-1123 label: lowercase letters, digits and '-', starting and ending \
                         with a letter or digit, at most 63 characters)";
const DNS_SUBDOMAIN: &str = "Kubernetes name (DNS-1123 subdomain: lowercase letters, digits, '-' and '.', each part \
                             starting and ending with a letter or digit, at most 253 characters)";

impl Manifest {
    /// Checks the fields a restore and the store's tools rely on: `created` is an RFC 3339 UTC
    /// time no more than [`MAX_CLOCK_SKEW`] after `now`; `namespace` and `container_id` are
    /// containerd identifiers; the pod fields, when present, are Kubernetes names. The format
    /// version is checked by `verify_quick` (its own error), the files by the checksums.
    pub fn validate(&self, now: SystemTime) -> Result<(), ManifestError> {
        let created = humantime::parse_rfc3339(&self.created)
            .map_err(|e| ManifestError::CreatedNotRfc3339 { value: shown(&self.created), reason: e.to_string() })?;
        if now.checked_add(MAX_CLOCK_SKEW).is_some_and(|latest| created > latest) {
            return Err(ManifestError::CreatedInFuture { value: shown(&self.created), now: rfc3339(now) });
        }
        validate_identity(&Identity {
            namespace: &self.namespace,
            container_id: &self.container_id,
            pod_namespace: self.pod_namespace.as_deref(),
            pod_name: self.pod_name.as_deref(),
            container_name: self.container_name.as_deref(),
        })
    }
}

/// Who a checkpoint belongs to, as its manifest records it.
#[derive(Debug, Clone, Copy)]
pub struct Identity<'a> {
    pub namespace: &'a str,
    pub container_id: &'a str,
    pub pod_namespace: Option<&'a str>,
    pub pod_name: Option<&'a str>,
    pub container_name: Option<&'a str>,
}

/// The identity rules of [`Manifest::validate`], for a checkpoint about to be taken: the shim
/// refuses to write a checkpoint that could never be restored.
pub fn validate_identity(id: &Identity<'_>) -> Result<(), ManifestError> {
    let fields = [
        ("namespace", Some(id.namespace), valid_identifier as fn(&str) -> bool, CONTAINERD_ID),
        ("container_id", Some(id.container_id), valid_identifier, CONTAINERD_ID),
        ("pod_namespace", id.pod_namespace, valid_dns_label, DNS_LABEL),
        ("pod_name", id.pod_name, valid_dns_subdomain, DNS_SUBDOMAIN),
        ("container_name", id.container_name, valid_dns_label, DNS_LABEL),
    ];
    for (field, value, valid, rule) in fields {
        if let Some(value) = value.filter(|v| !valid(v)) {
            return Err(ManifestError::BadField { field, value: shown(value), rule });
        }
    }
    Ok(())
}

/// containerd's identifier rule (namespaces, container ids): letters and digits, separated by
/// single '.', '_' or '-', at most [`MAX_IDENTIFIER_LEN`] characters.
pub fn valid_identifier(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= MAX_IDENTIFIER_LEN
        && s.split(['.', '_', '-']).all(|part| !part.is_empty() && part.bytes().all(|b| b.is_ascii_alphanumeric()))
}

/// Kubernetes' DNS-1123 label (namespaces, container names): lowercase letters, digits and '-',
/// starting and ending with a letter or digit, at most 63 characters.
pub fn valid_dns_label(s: &str) -> bool {
    s.len() <= MAX_DNS_LABEL_LEN && dns_label_chars(s)
}

/// Kubernetes' DNS-1123 subdomain (pod names): DNS-1123 label characters in parts separated by
/// single '.', at most 253 characters.
pub fn valid_dns_subdomain(s: &str) -> bool {
    s.len() <= MAX_DNS_SUBDOMAIN_LEN && s.split('.').all(dns_label_chars)
}

fn dns_label_chars(s: &str) -> bool {
    let b = s.as_bytes();
    let alnum = |c: &u8| c.is_ascii_lowercase() || c.is_ascii_digit();
    b.first().is_some_and(alnum) && b.last().is_some_and(alnum) && b.iter().all(|c| alnum(c) || *c == b'-')
}

/// `value`, cut to [`MAX_SHOWN`] characters, for error messages.
fn shown(value: &str) -> String {
    match value.char_indices().nth(MAX_SHOWN) {
        Some((cut, _)) => format!("{}...", &value[..cut]),
        None => value.to_string(),
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
        frozen_ms: None,
        dump_stats: None,
        digest: crate::digest::Algorithm::current().params(),
        files: BTreeMap::new(),
        gpu: None,
        flat: false,
        needs: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn manifest_round_trips_and_skips_empty_options() {
        let mut m = sample();
        m.files.insert(
            "checkpoint/inventory.img".into(),
            FileEntry { size: 3, blake3: Some("ab".into()), ..Default::default() },
        );
        m.files.insert("config.dump".into(), FileEntry { size: 4, sha256: Some("cd".into()), ..Default::default() });
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

    /// The frozen time and CRIU's stats are optional: manifests without them (formats 1 and 2
    /// as written before) still parse, and a manifest without them writes neither key.
    #[test]
    fn frozen_time_and_criu_stats_are_optional() {
        let mut m = sample();
        let v = serde_json::to_value(&m).unwrap();
        assert!(v.get("frozen_ms").is_none() && v.get("dump_stats").is_none(), "{v}");
        assert_eq!(serde_json::from_value::<Manifest>(v).unwrap(), m);

        m.frozen_ms = Some(420);
        m.dump_stats = Some(DumpStats { freezing_ms: 1, frozen_ms: 390, pages_written: 262_144, ..Default::default() });
        let v = serde_json::to_value(&m).unwrap();
        assert_eq!(v["frozen_ms"], 420);
        assert_eq!(v["dump_stats"]["frozen_ms"], 390);
        assert_eq!(v["dump_stats"]["memwrite_ms"], 0);
        assert_eq!(m.dump_stats.unwrap().stopped_ms(), 391);
        assert_eq!(serde_json::from_value::<Manifest>(v).unwrap(), m);

        // Only the four times are required of a recorded `dump_stats`.
        let mut v = serde_json::to_value(sample()).unwrap();
        v["dump_stats"] = serde_json::json!({"freezing_ms": 2, "frozen_ms": 3, "memdump_ms": 4, "memwrite_ms": 5});
        let back: Manifest = serde_json::from_value(v).unwrap();
        assert_eq!(back.dump_stats.unwrap().pages_written, 0);
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

    const NOW_SECS: u64 = 1_796_644_800; // 2026-12-07T12:00:00Z
    fn now() -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(NOW_SECS)
    }

    fn with_created(created: &str) -> Manifest {
        Manifest { created: created.into(), ..sample() }
    }

    #[test]
    fn created_must_be_an_rfc3339_time_not_in_the_future() {
        let in_future = |d: Duration| rfc3339(now() + d);
        let good =
            ["2026-11-23T21:25:01Z", "2026-11-23T21:25:01.123Z", &rfc3339(now()), &in_future(Duration::from_secs(60))];
        for created in good {
            assert_eq!(with_created(created).validate(now()), Ok(()), "{created}");
        }
        assert!(with_created(&in_future(MAX_CLOCK_SKEW)).validate(now()).is_ok(), "the skew itself is allowed");

        for created in ["../../x", "", "2026-11-23 21:25:01", "2026-11-23T21:25:01+02:00", "yesterday"] {
            let err = with_created(created).validate(now()).unwrap_err();
            assert!(matches!(&err, ManifestError::CreatedNotRfc3339 { value, .. } if value == created), "{err}");
            let text = err.to_string();
            assert!(text.starts_with(&format!("created {created:?} is not an RFC 3339")), "{text}");
        }
        for created in [
            "9999-01-01T00:00:00Z",
            &in_future(Duration::from_secs(600)),
            &in_future(MAX_CLOCK_SKEW + Duration::from_secs(1)),
        ] {
            let err = with_created(created).validate(now()).unwrap_err();
            assert!(matches!(&err, ManifestError::CreatedInFuture { value, .. } if value == created), "{err}");
            let text = err.to_string();
            assert!(text.starts_with(&format!("created {created:?} is in the future")), "{text}");
            assert!(text.contains("2026-12-07T12:00:00Z") && text.contains("5m"), "{text}");
        }
        // The real clock: a checkpoint written now validates now.
        assert_eq!(with_created(&now_rfc3339()).validate(SystemTime::now()), Ok(()));
    }

    /// `m` with `field` set to `value` (the pod fields to `Some(value)`).
    fn with_field(field: &str, value: &str) -> Manifest {
        let mut m = sample();
        let v = value.to_string();
        match field {
            "namespace" => m.namespace = v,
            "container_id" => m.container_id = v,
            "pod_namespace" => m.pod_namespace = Some(v),
            "pod_name" => m.pod_name = Some(v),
            "container_name" => m.container_name = Some(v),
            other => panic!("no field {other}"),
        }
        m
    }

    #[test]
    fn identifiers_must_be_containerd_and_kubernetes_names() {
        let long = |n: usize| "a".repeat(n);
        let subdomain_253 = format!("{}.{}.{}.{}", long(63), long(63), long(63), long(61));
        assert_eq!(subdomain_253.len(), 253);
        let good = [
            ("container_id", "3f1c".repeat(16)),
            ("namespace", "My_NS-1.x".into()),
            ("container_id", "C1_b.c-D".into()),
            ("container_id", long(76)),
            ("pod_namespace", long(63)),
            ("pod_name", subdomain_253.clone()),
            ("pod_name", "web-0.shard-1".into()),
            ("container_name", "0app".into()),
        ];
        for (field, value) in &good {
            assert_eq!(with_field(field, value).validate(now()), Ok(()), "{field} {value:?}");
        }
        let mut m = sample();
        (m.pod_namespace, m.pod_name, m.container_name) = (None, None, None);
        assert_eq!(m.validate(now()), Ok(()), "the pod fields are optional");

        let bad = [
            ("namespace", String::new()),
            ("namespace", "../../etc".into()),
            ("namespace", "a/b".into()),
            ("namespace", ".hidden".into()),
            ("container_id", "-c1".into()),
            ("container_id", "c1..2".into()),
            ("container_id", "c 1".into()),
            ("container_id", "é".into()),
            ("container_id", long(77)),
            ("pod_namespace", "Team-A".into()),
            ("pod_namespace", "team_a".into()),
            ("pod_namespace", "team.a".into()),
            ("pod_namespace", String::new()),
            ("pod_namespace", long(64)),
            ("pod_name", "web-".into()),
            ("pod_name", "web..0".into()),
            ("pod_name", "../x".into()),
            ("pod_name", format!("{subdomain_253}a")),
            ("container_name", "-web".into()),
            ("container_name", "web.1".into()),
            ("container_name", "web\n\x1b[31m".into()),
        ];
        for (field, value) in &bad {
            let err = with_field(field, value).validate(now()).unwrap_err();
            let shown = shown(value);
            assert!(
                matches!(&err, ManifestError::BadField { field: f, value: v, .. } if f == field && *v == shown),
                "{field} {value:?}: {err}"
            );
            assert!(err.to_string().starts_with(&format!("{field} {shown:?} is not a valid ")), "{err}");
        }
        // A long value is quoted in part.
        let mut m = sample();
        m.pod_name = Some("X".repeat(10_000));
        let text = m.validate(now()).unwrap_err().to_string();
        assert!(text.len() < 500 && text.contains(&format!("{}...", "X".repeat(MAX_SHOWN))), "{text}");
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
