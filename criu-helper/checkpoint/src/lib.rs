//! Checkpoint/restore of containers for Kybernate, shared by the shim and the `kybernate` CLI.
//!
//! The shim drives `runc checkpoint`/`runc restore` (which drive CRIU); this
//! crate holds everything around that call that must be right for a restore
//! to be safe: the runtime arguments, checks made before the container is
//! frozen, the on-disk store with its atomically written and checksummed
//! checkpoints (hashed on every core, `digest`), the rootfs diff, archives for moving checkpoints between
//! nodes, the cross-namespace restore policy, and the credentials check of a restore (CRIU's
//! images against the new spec). GPU state is `kybernate-gpu`'s: a manifest records it.

pub mod archive;
pub mod criu_stats;
pub mod deferred;
pub mod devimage;
pub mod digest;
pub mod flags;
pub mod follow;
pub mod fsutil;
pub mod grants;
pub mod images;
pub mod journal;
pub mod logtail;
pub mod manifest;
pub mod policy;
pub mod predump;
pub mod preflight;
pub mod retention;
pub mod rootfs;
pub mod signing;
pub mod store;
pub mod trust;
pub mod verdict;

// Everything is also at the crate root: callers write `criu::verify`, `criu::MANIFEST_FILE`.
pub use archive::{export, import, ArchiveError};
pub use flags::{CheckpointFlags, FlagsError, RestoreArgs, CGROUPS_MODES, EMPTY_NS_ALLOWED};
pub use follow::{Follower, Prehashed};
pub use fsutil::{write_atomic, AtomicFile, Durability};
pub use logtail::tail_lines;
pub use manifest::{
    host_name, kernel_release, now_rfc3339, validate_identity, ConfigDump, DigestParams, FileEntry, Identity, Manifest,
    ManifestError, ToolInfo, CONFIG_DUMP, FORMAT_VERSION, IMAGES_DIR, MANIFEST_FILE, OLDEST_FORMAT_VERSION,
    ROOTFS_DIFF, SPEC_DUMP, STATS_DUMP,
};
pub use policy::{check_namespace, PolicyError};
pub use predump::{
    cached_dirty_tracking, parse_dirty_tracking, probe_dirty_tracking, require_dirty_tracking, DirtyTracking,
    PreDumpLayout, RoundsError, MAX_PRE_DUMP_ROUNDS, PRE_DUMP_ANNOTATION,
};
pub use preflight::{
    check_space, find_criu, free_bytes, memory_estimate, parse_criu_version, require_criu_version, CriuVersion,
    PreflightError, MIN_CRIU, SPACE_HEADROOM,
};
pub use rootfs::{apply_rootfs_diff, overlay_diff_from_oci_layer, overlay_upperdir, write_rootfs_diff, RootfsError};
pub use signing::{PublicKey, SignatureState, SigningError, SigningKey, SIGNATURE_FILE};
pub use store::{
    checkpoint_dir_time, dir_size, read_manifest, verify, verify_metadata, verify_quick, CommitTimes,
    PartialCheckpoint, Store, StoreError, VerifyError, INVENTORY, PHASE_CRIU_DUMP, PHASE_FILE, PHASE_GPU_CHECKPOINT,
    PHASE_GPU_LOCK,
};
pub use trust::{check_trust, read_origin, write_origin, Origin, TrustError, TrustPolicy, TrustVerdict, ORIGIN_FILE};

/// Any error of this crate, for callers that do not care which step failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Flags(#[from] FlagsError),
    #[error(transparent)]
    Preflight(#[from] PreflightError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Verify(#[from] VerifyError),
    #[error(transparent)]
    Rootfs(#[from] RootfsError),
    #[error(transparent)]
    Archive(#[from] ArchiveError),
    #[error(transparent)]
    Policy(#[from] PolicyError),
}
