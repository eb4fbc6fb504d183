//! `binary://` loggers: the process containerd's `NewBinaryIO` would start for a stream, with
//! its fds, its environment and its readiness pipe.

use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use nix::fcntl::{fcntl, FcntlArg};
use nix::poll::PollFlags;
use nix::sys::signal::{kill, Signal};
use nix::unistd::{access, AccessFlags, Pid};

use super::error::{os, IoError};
use super::fd::{pipe, wait_fd};
use super::uri::BinaryUri;

/// Starts a `binary://` logger like containerd's `NewBinaryIO`: fd 3 = stdout
/// read end, 4 = stderr read end, 5 = a ready pipe it writes to or closes;
/// env is only CONTAINER_ID, CONTAINER_NAMESPACE and `env.*` query entries.
///
/// The logger is never waited for: the shim's reaper collects every child
/// with `waitpid(-1)`, and the logger exits by itself once every writer of its
/// pipes (the container process) is gone.
pub(super) fn spawn_logger(
    uri: &BinaryUri,
    id: &str,
    namespace: &str,
    stdout_r: OwnedFd,
    stderr_r: OwnedFd,
    timeout: Duration,
) -> Result<u32, IoError> {
    let shown = uri.path.display().to_string();
    let fail = |reason: String| IoError::Logger { path: shown.clone(), reason };
    // Checked up front: std reports exec failures with a waitpid of its own,
    // which the shim's reaper can win, so we want exec not to fail.
    let meta = std::fs::metadata(&uri.path).map_err(os(format!("logging binary {shown}")))?;
    if !meta.is_file() {
        return Err(fail("not a regular file".into()));
    }
    access(&uri.path, AccessFlags::X_OK).map_err(os(format!("logging binary {shown}")))?;

    let (ready_r, ready_w) = pipe("logger ready")?;
    // Copies above 5, so installing fds 3, 4 and 5 in the child never
    // overwrites a source that is still to be installed.
    let dup_high = |fd: &OwnedFd| -> Result<OwnedFd, IoError> {
        let raw = fcntl(fd, FcntlArg::F_DUPFD_CLOEXEC(10)).map_err(os("duplicate logger pipe"))?;
        // SAFETY: F_DUPFD_CLOEXEC just returned this new fd; we are its only owner.
        Ok(unsafe { OwnedFd::from_raw_fd(raw) })
    };
    let high = (dup_high(&stdout_r)?, dup_high(&stderr_r)?, dup_high(&ready_w)?);
    let sources = [high.0.as_raw_fd(), high.1.as_raw_fd(), high.2.as_raw_fd()];

    let mut cmd = Command::new(&uri.path);
    cmd.args(&uri.args)
        .env_clear()
        .envs(uri.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .env("CONTAINER_ID", id)
        .env("CONTAINER_NAMESPACE", namespace)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    // SAFETY: only dup2 (async-signal-safe) runs between fork and exec; no allocation.
    unsafe {
        cmd.pre_exec(move || {
            for (target, src) in (3..).zip(sources) {
                if libc::dup2(src, target) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
    // std panics if its own waitpid after a failed exec loses to the reaper.
    let spawned = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| cmd.spawn()));
    drop(cmd);
    drop((high, stdout_r, stderr_r, ready_w));
    let child = match spawned {
        Ok(Ok(child)) => child,
        Ok(Err(e)) => return Err(os(format!("start logging binary {shown}"))(e)),
        Err(_) => return Err(fail("exec failed".into())),
    };
    let pid = child.id();
    drop(child); // never waited for, see above

    // A byte or EOF on the ready pipe both mean ready, as in Go.
    let ready = wait_fd(ready_r.as_fd(), PollFlags::POLLIN, Instant::now() + timeout);
    match ready {
        Ok(true) => Ok(pid),
        Ok(false) | Err(_) => {
            // Still alive (it holds fd 5), so the pid cannot have been reused.
            let _ = kill(Pid::from_raw(pid as i32), Signal::SIGKILL);
            Err(match ready {
                Err(e) => os(format!("wait for logging binary {shown}"))(e),
                _ => fail(format!("not ready within {timeout:?}")),
            })
        }
    }
}
