//! Moving checkpoints between nodes through OCI registries: a checkpoint pushed as an OCI image
//! (`format`) over the distribution API (`client`), and pulled back into a store with every
//! byte verified before it becomes visible (`pull`).
//!
//! Blocking and streamed: the shim and the CLI are synchronous, and a checkpoint holds tens of
//! GiB, so no blob is ever held in memory (docs/architecture.md, "Checkpoint images").

pub mod auth;
pub mod client;
pub mod error;
pub mod format;
pub mod pull;
pub mod push;
pub mod reference;

pub use client::Settings;
pub use error::{RegistryError, Target};
pub use pull::{pull, PullOptions, Pulled};
pub use push::{push, Pushed, Transfer};
pub use reference::{Reference, ReferenceError};

/// The prefix that marks a registry reference where a checkpoint id or path is expected
/// (`kybernate restore oci://…`, `kybernate.io/restore-from: oci://…`).
pub const OCI_PREFIX: &str = "oci://";
