//! The shim's one error type, mapped to ttrpc status codes in one place.

use containerd_shim::protos::ttrpc::{self, Code};

use crate::checkpoint::CheckpointError;
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
    #[error("{context}: {message}")]
    Shim { context: String, message: String },
}

impl Error {
    /// Wraps an OS error with what we were doing.
    pub fn os(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> Error {
        let context = context.into();
        move |source| Error::Os { context, source }
    }

    /// Wraps a containerd-shim crate error with what we were doing.
    pub fn shim(context: impl Into<String>) -> impl FnOnce(containerd_shim::Error) -> Error {
        let context = context.into();
        move |e| Error::Shim { context, message: e.to_string() }
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
            Error::Checkpoint(e) if e.is_invalid_argument() => Code::INVALID_ARGUMENT,
            Error::Checkpoint(e) if e.is_permission_denied() => Code::PERMISSION_DENIED,
            Error::Checkpoint(e) if e.is_precondition() => Code::FAILED_PRECONDITION,
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

#[cfg(test)]
mod tests {
    use super::*;

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
}
