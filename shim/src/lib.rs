//! containerd-shim-kybernate-v1: a containerd shim v2 that chooses the OCI
//! runtime per container (runc or nvidia-container-runtime) and execs it
//! directly. Modules map to concepts (see docs/architecture.md):
//!
//! - [`service`]: the shim process (start, delete, the daemon)
//! - [`task`]: the Task API; [`container`] and [`process`] hold the state machine
//! - [`runtime`]: invoking the OCI runtime binary with argument vectors
//! - [`io`]: process stdio through pipes and the console socket
//! - [`events`]: publishing task events without blocking
//! - [`oom`], [`stats`], [`cgroups`]: cgroup OOM events and metrics
//! - [`checkpoint`]: checkpoint and restore with CRIU; [`gpu`]: CUDA state and device access of GPU containers
//! - [`options`]: containerd's runtime options; [`error`]: errors and their ttrpc codes

pub mod bootstrap;
pub mod cgroups;
pub mod checkpoint;
pub mod container;
pub mod error;
pub mod events;
pub mod gpu;
pub mod info;
pub mod io;
pub mod oom;
pub mod options;
pub mod process;
pub mod runtime;
pub mod service;
pub mod stats;
pub mod task;
