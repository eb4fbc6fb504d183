//! containerd-shim-kybernate-v1: a containerd shim v2 that chooses the OCI
//! runtime per container (runc or nvidia-container-runtime) and execs it
//! directly. Modules map to concepts and import each other one way, from the
//! request down to the runtime call (see docs/architecture.md):
//!
//! - [`service`]: the shim binary's actions (`start`, `delete`); [`bootstrap`]: the start path
//!   (the group's socket, the daemon)
//! - [`task`]: the Task API; [`factory`]: building a container at Create
//! - [`container`] and [`process`]: what they are, and the process state machine
//! - [`checkpoint`]: checkpointing a running container; [`restore`]: restoring one from a
//!   checkpoint; [`criu_proxy`]: holding a restore until its checkpoint is verified; [`gpu`]:
//!   CUDA state and device access of GPU containers
//! - [`runtime`]: OCI runtime commands with argument vectors; [`spawn`]: spawning and reaping
//!   their processes
//! - [`io`]: process stdio through pipes and the console socket
//! - [`events`]: publishing task events without blocking
//! - [`oom`], [`stats`], [`cgroups`]: cgroup OOM events and metrics
//! - [`options`]: containerd's runtime options; [`info`]: the `-info` answer
//! - [`error`]: errors and their ttrpc codes; [`sync`]: poison-tolerant locking;
//!   [`testhook`]: test-only stop points

pub mod bootstrap;
pub mod cgroups;
pub mod checkpoint;
pub mod container;
pub mod criu_proxy;
pub mod error;
pub mod events;
pub mod factory;
pub mod gpu;
pub mod info;
pub mod io;
pub mod oom;
pub mod options;
pub mod predump;
pub mod process;
pub mod pull;
pub mod restore;
pub mod retention;
pub mod runtime;
pub mod service;
pub mod spawn;
pub mod stats;
pub mod sync;
pub mod task;
pub mod testhook;
