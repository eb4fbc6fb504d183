//! The CLI's errors: each says what was wrong and what to do next, and maps to an exit code
//! (1: the operation failed, 2: usage or bad input).

use std::io;
use std::path::PathBuf;

use kybernate_checkpoint::{ArchiveError, StoreError, VerifyError};
use kybernate_runtime_select::ConfigError;

/// Exit code of an operation that failed (I/O, verification, a tampered archive).
pub const FAILED: u8 = 1;
/// Exit code of a usage error or bad input (unknown checkpoint, bad flag, config file error).
pub const USAGE: u8 = 2;

#[derive(Debug, thiserror::Error)]
pub enum CliError {
    #[error("{0}")]
    Usage(String),
    #[error("{0}; fix the file, or name another with --config or $KYBERNATE_CONFIG")]
    Config(#[from] ConfigError),
    #[error("checkpoint {reference:?} not found in {}; run `kybernate list` to see the checkpoints", root.display())]
    NotFound { reference: String, root: PathBuf },
    #[error("{0}; name a checkpoint by its id from `kybernate list` or by a directory inside the store")]
    OutsideStore(StoreError),
    #[error("{reference:?} ({}) is not a checkpoint (a <namespace>/<container>/<timestamp> directory holding kybernate.json): {why}; run `kybernate list` to see the checkpoints", path.display())]
    NotACheckpoint { reference: String, path: PathBuf, why: &'static str },
    #[error("{0}; check that the store is readable and writable by you (usually root) and has free space")]
    Store(StoreError),
    #[error("checkpoint {id:?} failed verification: {source}; do not restore it; remove it with `kybernate rm {id}`")]
    Verify {
        id: String,
        #[source]
        source: VerifyError,
    },
    #[error("{0}; {hint}", hint = export_hint(.0))]
    Export(ArchiveError),
    #[error("{0}; {hint}", hint = import_hint(.0))]
    Import(ArchiveError),
    #[error("{}: {what}; {next}", path.display())]
    BadArchivePath { path: PathBuf, what: &'static str, next: &'static str },
    #[error("{}: cannot remove checkpoint: {source}; check its permissions and run the command again", path.display())]
    Remove {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot reach containerd at {}: {reason}; is containerd running? (--address)", address.display())]
    Unreachable { address: PathBuf, reason: String },
    #[error("checkpoint of container {id:?} failed: {message}; see containerd's log for the shim's details")]
    CheckpointFailed { id: String, message: String },
    /// A restore refused before anything was created: what the spec grants beyond the image
    /// defaults (without `--trust-spec`), or what the checkpoint's processes hold beyond it.
    #[error("restore of checkpoint {id:?} refused: {reasons}; nothing was created")]
    Refused { id: String, reasons: String },
    /// The restore verdict: this node or the new container cannot take the checkpoint (every
    /// mismatch named, with any other refusal); nothing was created.
    #[error("restore of checkpoint {id:?} refused: {reasons}; nothing was created")]
    Incompatible { id: String, reasons: String },
    #[error("{0}")]
    Failed(String),
    #[error("cannot encode JSON output: {0}; please report this as a bug")]
    Json(#[from] serde_json::Error),
    #[error("cannot write to stdout: {0}; check where the output goes")]
    Stdout(#[source] io::Error),
}

impl CliError {
    pub fn exit_code(&self) -> u8 {
        match self {
            Self::Usage(_)
            | Self::Config(_)
            | Self::NotFound { .. }
            | Self::OutsideStore(_)
            | Self::NotACheckpoint { .. }
            | Self::BadArchivePath { .. }
            | Self::Refused { .. } => USAGE,
            Self::Store(_)
            | Self::Verify { .. }
            | Self::Export(_)
            | Self::Import(_)
            | Self::Remove { .. }
            | Self::Unreachable { .. }
            | Self::CheckpointFailed { .. }
            | Self::Incompatible { .. }
            | Self::Failed(_)
            | Self::Json(_)
            | Self::Stdout(_) => FAILED,
        }
    }
}

fn export_hint(e: &ArchiveError) -> &'static str {
    match e {
        ArchiveError::Verify { .. } | ArchiveError::Entry { .. } | ArchiveError::Manifest { .. } => {
            "the checkpoint is damaged and can be neither exported nor restored; see `kybernate inspect`, remove it with `kybernate rm`"
        }
        ArchiveError::Io { .. }
        | ArchiveError::Store(_)
        | ArchiveError::Untrusted { .. }
        | ArchiveError::BadNamespace { .. }
        | ArchiveError::Malformed { .. }
        | ArchiveError::Compressed { .. }
        | ArchiveError::Oversized { .. }
        | ArchiveError::NoSpace { .. }
        | ArchiveError::RootfsDiff { .. } => "check the archive's path, permissions and free space",
    }
}

fn import_hint(e: &ArchiveError) -> &'static str {
    match e {
        ArchiveError::Verify { .. } | ArchiveError::Entry { .. } => {
            "the archive is damaged or was changed after it was written; nothing was imported; export (or checkpoint) the container again on the source node"
        }
        // Also a manifest field the store cannot hold (a namespace or container id that is not a
        // containerd identifier): not a matter of disk space or permissions.
        ArchiveError::Manifest { .. } | ArchiveError::Store(StoreError::BadName { .. }) => {
            "nothing was imported; the archive's manifest is not one this Kybernate writes (another version, or edited by hand); export the checkpoint again with `kybernate export` on the source node"
        }
        ArchiveError::Malformed { .. } => {
            "nothing was imported; `kybernate import` reads the tar files `kybernate export` (or the kubelet) writes, plain or zstd-compressed; copy the archive again from the source node"
        }
        ArchiveError::Compressed { .. } => {
            "nothing was imported; the archive's zstd stream is damaged or incomplete (an interrupted copy?); copy the archive again from the source node"
        }
        ArchiveError::Oversized { .. } => {
            "nothing was imported; the archive holds more than its manifest declares (not as `kybernate export` writes it); export the checkpoint again on the source node"
        }
        ArchiveError::NoSpace { .. } => {
            "nothing was imported; free space in the store (`kybernate prune`) or set [checkpoint] root to a larger filesystem"
        }
        ArchiveError::RootfsDiff { .. } => {
            "nothing was imported; restore the archive through the kubelet or `crictl create` (containerd >= 2.0, docs/operations.md)"
        }
        ArchiveError::Untrusted { kubelet: true, .. } => {
            "nothing was imported; this node restores checkpoints from outside only when signed by a key in [trust] keys: to import kubelet/crictl archives, set [trust] require_signature = false (docs/operations.md, \"Restore a kubelet checkpoint on a Kybernate node\"), or take the checkpoint with `kybernate checkpoint` on a node that signs"
        }
        ArchiveError::Untrusted { .. } => {
            "nothing was imported; sign the checkpoint on the source node with a key this node lists in [trust] keys, or add that node's public key there (docs/operations.md)"
        }
        ArchiveError::BadNamespace { .. } => "nothing was imported; name a containerd namespace with --namespace, e.g. k8s.io",
        ArchiveError::Io { .. } => "check the archive's path and permissions, and the store's free space",
        ArchiveError::Store(_) => "check that the store is writable by you (usually root) and has free space",
    }
}

/// One line for a clap usage error: clap's first line (and its tip, if any), without the
/// multi-line usage block, so every error of the CLI has the same shape.
pub fn usage_line(e: &clap::Error) -> String {
    let text = e.to_string();
    let mut paragraphs = text.split("\n\n").map(str::trim).filter(|p| !p.is_empty());
    // The first paragraph is the message; clap continues a message ending in ':' on indented lines.
    let first = paragraphs.next().unwrap_or("invalid arguments");
    let first = first.strip_prefix("error: ").unwrap_or(first);
    let first = first.split('\n').map(str::trim).collect::<Vec<_>>().join(" ");
    let tip = paragraphs.find_map(|p| p.strip_prefix("tip: "));
    match tip {
        Some(tip) => format!("{first} ({tip}); run `kybernate --help` for usage"),
        None => format!("{first}; run `kybernate --help` for usage"),
    }
}
