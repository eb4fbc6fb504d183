//! The shim's errors: one type, mapped to ttrpc status codes in one place, and the errors of a
//! checkpoint or a restore that it carries (classified here too, for that mapping).

use std::path::{Path, PathBuf};

use containerd_shim::protos::ttrpc::{self, Code};
use kybernate_checkpoint::{self as criu, PreflightError};

use crate::gpu::GpuError;
use crate::io::IoError;
use crate::options::OptionsError;
use crate::runtime::RuntimeError;
use kybernate_runtime_select::{ConfigError, SelectError};

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Unknown container or exec id, or a process that already finished.
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    AlreadyExists(String),
    /// The task is in the wrong state for the request.
    #[error("{0}")]
    FailedPrecondition(String),
    #[error("{0}")]
    InvalidArgument(String),
    #[error(transparent)]
    Options(#[from] OptionsError),
    #[error(transparent)]
    Select(#[from] SelectError),
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Runtime(#[from] RuntimeError),
    #[error(transparent)]
    Io(#[from] IoError),
    #[error(transparent)]
    Checkpoint(#[from] CheckpointError),
    #[error("{context}: {source}")]
    Os {
        context: String,
        #[source]
        source: std::io::Error,
    },
    /// A containerd-shim or ttrpc call failed (the daemon's start-up, mounting the rootfs).
    #[error("{context}: {source}")]
    Shim {
        context: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// The shim's own data could not be encoded, or read back as written (the runtime record,
    /// a process's details): a fault of the shim or its host, never of the request.
    #[error("{context}: {source}")]
    Internal {
        context: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

impl Error {
    /// Wraps an OS error with what we were doing.
    pub fn os(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> Error {
        let context = context.into();
        move |source| Error::Os { context, source }
    }

    /// Wraps an error of containerd-shim (or its ttrpc) with what we were doing.
    pub fn shim<E: std::error::Error + Send + Sync + 'static>(context: impl Into<String>) -> impl FnOnce(E) -> Error {
        let context = context.into();
        move |e| Error::Shim { context, source: Box::new(e) }
    }

    /// Wraps a failure to encode or read back the shim's own data with what we were doing.
    pub fn internal<E: std::error::Error + Send + Sync + 'static>(
        context: impl Into<String>,
    ) -> impl FnOnce(E) -> Error {
        let context = context.into();
        move |e| Error::Internal { context, source: Box::new(e) }
    }

    pub fn code(&self) -> Code {
        match self {
            Error::NotFound(_) => Code::NOT_FOUND,
            Error::AlreadyExists(_) => Code::ALREADY_EXISTS,
            Error::FailedPrecondition(_) => Code::FAILED_PRECONDITION,
            Error::InvalidArgument(_) | Error::Options(_) | Error::Config(_) => Code::INVALID_ARGUMENT,
            Error::Select(SelectError::Bundle(_) | SelectError::Config(_)) => Code::INVALID_ARGUMENT,
            Error::Select(_) => Code::FAILED_PRECONDITION,
            Error::Runtime(e) if e.is_not_found() || e.is_not_running() => Code::NOT_FOUND,
            Error::Io(e) if e.is_invalid_argument() => Code::INVALID_ARGUMENT,
            Error::Checkpoint(e) if e.is_invalid_argument() => Code::INVALID_ARGUMENT,
            Error::Checkpoint(e) if e.is_permission_denied() => Code::PERMISSION_DENIED,
            Error::Checkpoint(e) if e.is_precondition() => Code::FAILED_PRECONDITION,
            Error::Internal { .. } => Code::INTERNAL,
            Error::Runtime(_) | Error::Io(_) | Error::Checkpoint(_) | Error::Os { .. } | Error::Shim { .. } => {
                Code::UNKNOWN
            }
        }
    }
}

impl From<Error> for ttrpc::Error {
    fn from(e: Error) -> Self {
        ttrpc::Error::RpcStatus(ttrpc::get_status(e.code(), for_containerd(&e.to_string())))
    }
}

/// FULLWIDTH PERCENT SIGN: reads as `%` to a person, but is no formatting verb to Go.
const PERCENT_LOOKALIKE: char = '\u{FF05}';

/// A message safe to hand to containerd, which uses a shim's error text as a Go format string
/// (1.6/1.7's `errdefs.FromGRPC`: `fmt.Errorf(msg + ": %w", cls)`): each `%` becomes
/// [`PERCENT_LOOKALIKE`], else `10% + 16 MiB` reaches the user as `10%! (MISSING)…`. A lookalike
/// rather than a word keeps numbers and URI escapes (`a%20b`) readable; doubling (`%%`) would
/// show as `%%` to any client that does not format the text.
pub fn for_containerd(message: &str) -> String {
    message.replace('%', &PERCENT_LOOKALIKE.to_string())
}

/// How much of CRIU's log goes into an error message (the whole log stays in the work dir).
const LOG_TAIL_LINES: usize = 20;

/// Why a checkpoint or a restore failed. Every message names the container and what to look at.
#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    #[error("checkpoint {id}: {message}")]
    BadRequest { id: String, message: String },
    #[error("checkpoint {id}: a checkpoint of this container is already running")]
    Busy { id: String },
    #[error("{what} {id}: preflight: {source}")]
    Preflight {
        what: &'static str,
        id: String,
        #[source]
        source: PreflightError,
    },
    #[error("{what} {id}: CRIU: {source}")]
    Criu {
        what: &'static str,
        id: String,
        #[source]
        source: RuntimeError,
    },
    #[error("{what} {id}: {source}")]
    Store {
        what: &'static str,
        id: String,
        /// Boxed: its variants carry several paths, and every shim result would pay for them.
        #[source]
        source: Box<criu::StoreError>,
    },
    /// The runtime's checkpoint or restore failed (boxed: it is by far the largest variant).
    #[error(transparent)]
    Runtime(Box<RuntimeFailure>),
    #[error("container {id}: {context}: {source}")]
    Write {
        id: String,
        context: String,
        #[source]
        source: std::io::Error,
    },
    #[error("checkpoint {id}: rootfs changes: {source}")]
    RootfsDiff {
        id: String,
        #[source]
        source: criu::RootfsError,
    },
    /// A store checkpoint's file changes could not be applied to the new container's rootfs.
    #[error("restore {id}: apply {} to {}: {source}", diff.display(), rootfs.display())]
    ApplyRootfsDiff {
        id: String,
        diff: PathBuf,
        rootfs: PathBuf,
        /// Boxed, as [`CheckpointError::Store`]'s source.
        #[source]
        source: Box<criu::RootfsError>,
    },
    #[error("restore {id}: {source}")]
    Verify {
        id: String,
        #[source]
        source: criu::VerifyError,
    },
    #[error("restore {id}: {source}")]
    Policy {
        id: String,
        #[source]
        source: criu::PolicyError,
    },
    /// `[checkpoint] max_bytes` leaves no room for the checkpoint even after pruning.
    #[error("checkpoint {id}: refused, nothing was frozen: {source}")]
    Retention {
        id: String,
        #[source]
        source: Box<criu::retention::RetentionError>,
    },
    #[error("restore {id}: {message}")]
    Restore { id: String, message: String },
    /// The node's trust policy (`[trust]`) refuses the checkpoint: it came from outside the node
    /// and is not signed by a trusted key, or its origin marker or signature cannot be read.
    #[error("restore {id}: {source}")]
    Trust {
        id: String,
        /// Boxed, as [`CheckpointError::Store`]'s source.
        #[source]
        source: Box<criu::TrustError>,
    },
    /// `[checkpoint] signing_key` cannot be read: refused before anything is frozen.
    #[error("checkpoint {id}: [checkpoint] signing_key: {source}; nothing was frozen")]
    SigningKey {
        id: String,
        #[source]
        source: Box<criu::SigningError>,
    },
    /// The credentials check: the checkpoint's processes would get more than the new spec grants
    /// (or its images or the spec cannot be read to tell).
    #[error("restore {id} from {checkpoint}: refused: {source}")]
    Grants {
        id: String,
        checkpoint: String,
        #[source]
        source: Box<criu::grants::GrantError>,
    },
    /// The restore verdict (`criu::verdict`): this node or the new container cannot take the
    /// checkpoint; every mismatch is named, and nothing was created.
    #[error(
        "restore {id} from {checkpoint}: refused: this node or container cannot take it, nothing was created: {source}"
    )]
    Incompatible {
        id: String,
        checkpoint: String,
        /// Boxed, as [`CheckpointError::Store`]'s source.
        #[source]
        source: Box<criu::verdict::Incompatible>,
    },
    /// The CUDA side of a checkpoint or restore (mode preconditions, a driver call, the GPUs).
    #[error("{what} {id}: {source}")]
    Gpu {
        what: &'static str,
        id: String,
        #[source]
        source: Box<GpuError>,
    },
    /// The checkpoint is complete, but its CUDA processes could not all be resumed.
    #[error("checkpoint {id}: complete at {}, but {source}", target.display())]
    GpuResume {
        id: String,
        target: PathBuf,
        #[source]
        source: Box<GpuError>,
    },
    /// A checkpoint step after the dump failed (a write, the rootfs diff, the commit): the run
    /// undid what it had done; `outcome` says what became of the container.
    #[error("checkpoint {id} failed: {source}; {outcome}; nothing of the checkpoint was kept")]
    Abandoned {
        id: String,
        #[source]
        source: Box<CheckpointError>,
        outcome: String,
    },
    /// The checkpoint is complete, but the container asked to exit could not be stopped.
    #[error("checkpoint {id}: complete at {}, but the container could not be stopped: {source}", target.display())]
    Stop {
        id: String,
        target: PathBuf,
        #[source]
        source: Box<RuntimeError>,
    },
}

impl CheckpointError {
    /// Refusals of the request itself (as opposed to failures while carrying it out).
    pub fn is_invalid_argument(&self) -> bool {
        matches!(self, CheckpointError::BadRequest { .. } | CheckpointError::Verify { .. })
            || matches!(self, CheckpointError::Grants { source, .. } if !matches!(**source, criu::grants::GrantError::Excess(_)))
            || matches!(self, CheckpointError::Store { source, .. }
                if matches!(**source, criu::StoreError::Hidden { .. } | criu::StoreError::NotACheckpoint { .. }))
    }

    pub fn is_permission_denied(&self) -> bool {
        matches!(self, CheckpointError::Policy { .. } | CheckpointError::Trust { .. })
            || matches!(self, CheckpointError::Grants { source, .. } if matches!(**source, criu::grants::GrantError::Excess(_)))
            || matches!(self, CheckpointError::Store { source, .. } if matches!(**source, criu::StoreError::OutsideRoot { .. }))
    }

    pub fn is_precondition(&self) -> bool {
        matches!(
            self,
            CheckpointError::Busy { .. }
                | CheckpointError::Preflight { .. }
                | CheckpointError::Restore { .. }
                | CheckpointError::SigningKey { .. }
                | CheckpointError::Retention { .. }
                | CheckpointError::Incompatible { .. }
        ) || matches!(self, CheckpointError::Store { source, .. } if matches!(**source, criu::StoreError::NotFound { .. }))
            || matches!(self, CheckpointError::Gpu { source, .. }
                if matches!(**source, GpuError::Mode(_) | GpuError::Mismatch(_) | GpuError::Cdi(_) | GpuError::Assignment(_))
                    // The driver cannot checkpoint this job (CUDA IPC, UVM, MPS): retrying cannot help.
                    || matches!(&**source, GpuError::Step(s) if s.is_unsupported()))
    }
}

/// The runtime's checkpoint or restore failed: its message, the relevant part of CRIU's log,
/// where the whole log is, and what became of the container.
#[derive(Debug, thiserror::Error)]
#[error("{what} {id} failed: {message}\n--- from {} ---\n{tail}\n--- end of CRIU log excerpt; {outcome}", log.display())]
pub struct RuntimeFailure {
    pub what: &'static str,
    pub id: String,
    pub message: String,
    pub log: PathBuf,
    pub tail: String,
    pub outcome: String,
}

impl CheckpointError {
    /// The runtime's checkpoint or restore failed: its message with the part of CRIU's `log`
    /// that names the cause, and what became of the container (`outcome`).
    pub fn runtime_failure(what: &'static str, id: &str, e: RuntimeError, log: &Path, outcome: String) -> Self {
        let mut message = match &e {
            RuntimeError::Failed { message, .. } => message.clone(),
            other => other.to_string(),
        };
        if criu_vanished(&message) {
            // runc lost its socket to CRIU: CRIU ended without answering.
            message = format!("CRIU ended without an answer (killed, or crashed): {message}");
        }
        let tail = log_excerpt(log).unwrap_or_else(|| "(no CRIU log was written)".into());
        CheckpointError::Runtime(Box::new(RuntimeFailure {
            what,
            id: id.to_string(),
            message,
            log: log.to_path_buf(),
            tail,
            outcome,
        }))
    }
}

/// What of CRIU's log goes into an error: its `Error (...)` lines, which name the cause (the
/// last lines are often only the rollback), else its last lines.
fn log_excerpt(log: &Path) -> Option<String> {
    const MAX_READ: u64 = 4 << 20;
    use std::io::{Read, Seek, SeekFrom};
    let mut f = std::fs::File::open(log).ok()?;
    let len = f.metadata().ok()?.len();
    f.seek(SeekFrom::Start(len.saturating_sub(MAX_READ))).ok()?;
    let mut bytes = Vec::new();
    f.read_to_end(&mut bytes).ok()?;
    let text = String::from_utf8_lossy(&bytes);
    let errors: Vec<&str> = text.lines().filter(|l| l.contains("Error (") && !is_benign(l)).collect();
    if errors.is_empty() {
        let tail = criu::tail_lines(log, LOG_TAIL_LINES)?;
        return Some(tail.lines().filter(|l| !is_benign(l)).collect::<Vec<_>>().join("\n"));
    }
    Some(errors[errors.len().saturating_sub(LOG_TAIL_LINES)..].join("\n"))
}

/// runc's words when CRIU's end of its RPC socket closed without a reply (CRIU killed or
/// crashed mid-call): `read unixpacket @->@: EOF` and the like.
fn criu_vanished(runc_message: &str) -> bool {
    runc_message.contains("unixpacket") && runc_message.trim_end().ends_with("EOF")
}

/// CRIU `Error` lines that every run in a container logs without failing (CRIU cannot raise its
/// own RLIMIT_NOFILE inside a user-limited environment): they would point the reader the wrong way.
fn is_benign(line: &str) -> bool {
    line.contains("Can't setup RLIMIT_NOFILE for self")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_vanished_criu_is_named_and_benign_log_lines_are_left_out() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("dump.log");
        std::fs::write(
            &log,
            "(00.001) Error (criu/util.c:1534): rlimit: Can't setup RLIMIT_NOFILE for self: Operation not permitted\n(00.2) Dumping pages\n",
        )
        .unwrap();
        let e = RuntimeError::Failed {
            binary: "runc".into(),
            subcommand: "checkpoint".into(),
            code: 1,
            message: "read unixpacket @->@: EOF".into(),
        };
        let text = CheckpointError::runtime_failure("checkpoint", "c1", e, &log, "the container is running".into())
            .to_string();
        assert!(text.contains("CRIU ended without an answer (killed, or crashed)"), "{text}");
        assert!(!text.contains("RLIMIT_NOFILE") && text.contains("Dumping pages"), "{text}");
    }

    fn status_of(e: Error) -> (Code, String) {
        match ttrpc::Error::from(e) {
            ttrpc::Error::RpcStatus(s) => (s.code(), s.message().to_string()),
            other => panic!("not a status: {other:?}"),
        }
    }

    #[test]
    fn no_percent_sign_reaches_containerd() {
        let (code, msg) = status_of(Error::FailedPrecondition("need memory + 10% + 16 MiB, %s %d %!".into()));
        assert_eq!(code, Code::FAILED_PRECONDITION);
        assert!(!msg.contains('%'), "{msg}");
        assert_eq!(msg, "need memory + 10％ + 16 MiB, ％s ％d ％!");
        // Wrapped errors are covered too: the text is rewritten once, after formatting.
        let (code, msg) = status_of(Error::os("open /tmp/a%20b")(std::io::Error::from_raw_os_error(2)));
        assert_eq!(code, Code::UNKNOWN);
        assert!(msg.starts_with("open /tmp/a％20b: "), "{msg}");
    }

    #[test]
    fn messages_without_percent_are_unchanged() {
        let (code, msg) = status_of(Error::NotFound("container c1 not found".into()));
        assert_eq!((code, msg.as_str()), (Code::NOT_FOUND, "container c1 not found"));
    }

    /// The request's faults are InvalidArgument; the shim's own are not, and keep their source.
    #[test]
    fn internal_faults_are_not_the_requests() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(crate::container::RUNTIME_RECORD), "{").unwrap();
        let e = crate::container::RuntimeRecord::read(dir.path()).unwrap_err();
        assert!(std::error::Error::source(&e).is_some(), "the serde error is kept: {e:?}");
        assert_eq!(status_of(e).0, Code::INTERNAL);

        let bad_uri =
            IoError::InvalidUri { stream: "stdout", uri: "bogus://x".into(), reason: "unknown scheme".into() };
        assert_eq!(status_of(bad_uri.into()).0, Code::INVALID_ARGUMENT);
        let failed = Error::shim("connecting")(std::io::Error::from_raw_os_error(libc::ECONNREFUSED));
        assert!(std::error::Error::source(&failed).is_some());
        assert_eq!(status_of(failed).0, Code::UNKNOWN);
    }
}
