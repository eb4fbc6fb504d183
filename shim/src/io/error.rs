//! Why process IO failed: a stdio string that cannot be interpreted, or the host failing us.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum IoError {
    /// A stdio string we cannot interpret (unknown scheme, bad escape, no path).
    #[error("{stream} {uri:?}: {reason}")]
    InvalidUri { stream: &'static str, uri: String, reason: String },
    #[error("{context}: {source}")]
    Os {
        context: String,
        #[source]
        source: std::io::Error,
    },
    #[error("logging binary {path}: {reason}")]
    Logger { path: String, reason: String },
    #[error("console socket {path}: {reason}")]
    Console { path: PathBuf, reason: String },
}

impl IoError {
    /// The request itself was wrong (as opposed to the host failing us).
    pub fn is_invalid_argument(&self) -> bool {
        matches!(self, IoError::InvalidUri { .. })
    }
}

/// Wraps an OS error with what we were doing.
pub(super) fn os<E: Into<std::io::Error>>(context: impl Into<String>) -> impl FnOnce(E) -> IoError {
    let context = context.into();
    move |e| IoError::Os { context, source: e.into() }
}
