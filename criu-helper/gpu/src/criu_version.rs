//! A CRIU release number, which CRIU features depend on.
//!
//! Here, in the lowest crate, because two checks compare against it: CRIU's CUDA plugin
//! ([`crate::cuda::preflight`]) and Kybernate's own minimum (`kybernate-checkpoint`'s preflight,
//! which also parses `criu --version`).

use std::fmt;

/// A CRIU release number.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, serde::Serialize, serde::Deserialize)]
pub struct CriuVersion {
    pub major: u32,
    pub minor: u32,
    pub patch: u32,
}

impl fmt::Display for CriuVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}.{}", self.major, self.minor, self.patch)
    }
}
