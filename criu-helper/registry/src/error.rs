//! Why a push or pull failed: every variant names the registry and reference (or the file) and
//! what went wrong, in words an operator can act on.

use std::io;
use std::path::PathBuf;

use kybernate_checkpoint::{StoreError, VerifyError};

use crate::auth::AuthFileError;
use crate::reference::ReferenceError;

/// Where a registry error happened: `<reference> (registry <host>)`.
#[derive(Debug, Clone)]
pub struct Target {
    pub registry: String,
    pub reference: String,
}

impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} (registry {})", self.reference, self.registry)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error(transparent)]
    Reference(#[from] ReferenceError),
    /// No HTTP answer: connection refused, DNS, timeout, a reset.
    #[error("{target}: cannot reach the registry ({what}): {reason}")]
    Connect { target: Target, what: String, reason: String },
    /// The TLS handshake failed (unknown CA, wrong name, a plain-HTTP registry spoken to over TLS).
    #[error("{target}: TLS failed ({what}): {reason}")]
    Tls { target: Target, what: String, reason: String },
    #[error("{target}: unauthorised ({what}): {detail}")]
    Unauthorized { target: Target, what: String, detail: String },
    #[error("{target}: not found: {what}")]
    NotFound { target: Target, what: String },
    /// Any other answer we did not expect.
    #[error("{target}: {what}: HTTP {status}{}", if detail.is_empty() { String::new() } else { format!(": {detail}") })]
    Status { target: Target, what: String, status: u16, detail: String },
    /// Content whose sha256 (or size) is not what its descriptor or reference says.
    #[error("{target}: digest mismatch in {what}: expected {expected}, got {actual}")]
    DigestMismatch { target: Target, what: String, expected: String, actual: String },
    /// An image that is not a Kybernate checkpoint image, or a malformed/hostile one.
    #[error("{target}: refused image: {reason}")]
    BadImage { target: Target, reason: String },
    #[error("registry auth file {0}")]
    AuthFile(#[from] AuthFileError),
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: io::Error,
    },
    /// The checkpoint to push, or the one pulled, does not verify.
    #[error("{}: {source}", path.display())]
    Verify {
        path: PathBuf,
        #[source]
        source: VerifyError,
    },
    /// The pulled checkpoint is refused by this node's checks (identity, trust, space).
    #[error("{target}: {reason}")]
    Refused { target: Target, reason: String },
    #[error(transparent)]
    Store(#[from] StoreError),
}

pub(crate) fn io_ctx(context: impl Into<String>) -> impl FnOnce(io::Error) -> RegistryError {
    let context = context.into();
    move |source| RegistryError::Io { context, source }
}
