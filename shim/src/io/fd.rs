//! Small fd helpers of the copying: pipes, non-blocking mode, waiting on an fd (with a
//! deadline, or until a stop signal).

use std::os::fd::{BorrowedFd, OwnedFd};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::fcntl::{fcntl, FcntlArg, OFlag};
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::unistd::pipe2;

use super::error::{os, IoError};

pub(super) fn pipe(what: &str) -> Result<(OwnedFd, OwnedFd), IoError> {
    pipe2(OFlag::O_CLOEXEC).map_err(os(format!("create {what} pipe")))
}

/// Only ever applied to our own open file descriptions (pipe ends are separate
/// descriptions), so the child's ends stay blocking.
pub(super) fn set_nonblocking(fd: &OwnedFd, what: &str) -> Result<(), IoError> {
    let flags = fcntl(fd, FcntlArg::F_GETFL).map_err(os(format!("get flags of {what}")))?;
    let flags = OFlag::from_bits_truncate(flags) | OFlag::O_NONBLOCK;
    fcntl(fd, FcntlArg::F_SETFL(flags)).map_err(os(format!("make {what} non-blocking")))?;
    Ok(())
}

pub(super) fn poll_timeout(d: Duration) -> PollTimeout {
    // Round up so a short remainder does not turn into a busy loop.
    PollTimeout::try_from(d + Duration::from_micros(999)).unwrap_or(PollTimeout::MAX)
}

/// Waits until `fd` has `events` or the deadline passes. `Ok(false)` = timed out.
pub(super) fn wait_fd(fd: BorrowedFd<'_>, events: PollFlags, deadline: Instant) -> Result<bool, Errno> {
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let mut fds = [PollFd::new(fd, events)];
        match poll(&mut fds, poll_timeout(left)) {
            Ok(0) if Instant::now() >= deadline => return Ok(false),
            Ok(0) | Err(Errno::EINTR) => continue,
            Ok(_) => return Ok(true),
            Err(e) => return Err(e),
        }
    }
}

/// Why a wait on a copy fd ended.
pub(super) enum Ready {
    Fd,
    Stopped,
}

/// Waits for `fd` (no timeout) unless the stop eventfd fires first.
pub(super) fn wait_or_stop(fd: BorrowedFd<'_>, events: PollFlags, stop: BorrowedFd<'_>) -> Result<Ready, Errno> {
    loop {
        let mut fds = [PollFd::new(stop, PollFlags::POLLIN), PollFd::new(fd, events)];
        match poll(&mut fds, PollTimeout::NONE) {
            Ok(_) => {
                if fds[0].any().unwrap_or(false) {
                    return Ok(Ready::Stopped);
                }
                return Ok(Ready::Fd);
            }
            Err(Errno::EINTR) => continue,
            Err(e) => return Err(e),
        }
    }
}
