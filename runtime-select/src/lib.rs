//! Runtime selection for Kybernate.
//!
//! The shim calls this on every container create to decide whether the bundle
//! is exec'd with `runc` or with `nvidia-container-runtime`, so that one
//! Kubernetes RuntimeClass serves CPU and GPU pods. `kybernate-select` exposes
//! the same decision to operators. The order of the rules, and why, is in
//! docs/architecture.md ("Runtime selection").

pub mod config;
pub mod decision;
pub mod evidence;
pub mod resolve;
pub mod spec;

pub use config::{
    CheckpointConfig, Compression, Config, ConfigError, ConfigSource, CudaMode, OnMissingGpuRuntime, RuntimeConfig,
    TrustConfig,
};
pub use decision::{load_spec, Context, Decision, SelectError, Selector, Source, RUNTIME_ANNOTATION, RUNTIME_ENV};
pub use evidence::Evidence;
pub use resolve::{resolve, ResolveError};
pub use spec::{BundleError, SpecView};
