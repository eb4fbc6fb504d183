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
        ttrpc::Error::RpcStatus(ttrpc::get_status(e.code(), e.to_string()))
    }
}
