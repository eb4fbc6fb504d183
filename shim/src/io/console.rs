//! The console socket: where the runtime sends a terminal process's pty master
//! (`--console-socket`), received through SCM_RIGHTS.

use std::io::{ErrorKind, IoSliceMut};
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::DirBuilderExt;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use log::debug;
use nix::errno::Errno;
use nix::poll::PollFlags;
use nix::sys::socket::{recvmsg, ControlMessageOwned, MsgFlags};
use nix::unistd::isatty;

use super::error::{os, IoError};
use super::fd::wait_fd;

/// `sun_path` holds 108 bytes including the terminating NUL.
pub(super) const MAX_SOCKET_PATH: usize = 107;

pub(super) static UNIQUE: AtomicU64 = AtomicU64::new(0);

/// A listening unix socket in a private directory, for `--console-socket`.
pub(super) struct ConsoleSocket {
    pub(super) dir: PathBuf,
    pub(super) path: PathBuf,
    pub(super) listener: UnixListener,
}

impl ConsoleSocket {
    /// Tries `work_dir`, then /run/kybernate, then the temp dir: bundle paths
    /// with long ids exceed the 107 bytes a socket path may have.
    pub(super) fn new(work_dir: &Path) -> Result<Self, IoError> {
        let bases = [work_dir.to_path_buf(), PathBuf::from("/run/kybernate"), std::env::temp_dir()];
        let mut last = None;
        for base in bases.iter() {
            match Self::new_in(base) {
                Ok(s) => return Ok(s),
                Err(e) => {
                    debug!("console socket under {}: {e}", base.display());
                    last = Some(e);
                }
            }
        }
        Err(last.unwrap_or_else(|| IoError::Console { path: work_dir.into(), reason: "no usable directory".into() }))
    }

    pub(super) fn new_in(base: &Path) -> Result<Self, IoError> {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o711)
            .create(base)
            .map_err(os(format!("create {}", base.display())))?;
        for _ in 0..100 {
            let n = UNIQUE.fetch_add(1, Ordering::Relaxed);
            let dir = base.join(format!(".kyb-console-{}-{n}", std::process::id()));
            let path = dir.join("pty.sock");
            if path.as_os_str().len() > MAX_SOCKET_PATH {
                return Err(IoError::Console { path, reason: "path too long for a unix socket".into() });
            }
            match std::fs::DirBuilder::new().mode(0o700).create(&dir) {
                Ok(()) => {}
                Err(e) if e.kind() == ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(os(format!("create {}", dir.display()))(e)),
            }
            return match UnixListener::bind(&path) {
                Ok(listener) => Ok(ConsoleSocket { dir, path, listener }),
                Err(e) => {
                    let _ = std::fs::remove_dir(&dir);
                    Err(os(format!("bind {}", path.display()))(e))
                }
            };
        }
        Err(IoError::Console { path: base.into(), reason: "no free directory name".into() })
    }

    /// Accepts the runtime's connection and takes the pty master it sends.
    pub(super) fn receive(&self, timeout: Duration) -> Result<OwnedFd, IoError> {
        let deadline = Instant::now() + timeout;
        let fail = |reason: String| IoError::Console { path: self.path.clone(), reason };
        self.listener.set_nonblocking(true).map_err(os("make console socket non-blocking"))?;
        let stream = loop {
            match self.listener.accept() {
                Ok((s, _)) => break s,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) if e.kind() == ErrorKind::WouldBlock => {
                    let ready = wait_fd(self.listener.as_fd(), PollFlags::POLLIN, deadline)
                        .map_err(os(format!("wait on {}", self.path.display())))?;
                    if !ready {
                        return Err(fail(format!("no connection from the runtime within {timeout:?}")));
                    }
                }
                Err(e) => return Err(os(format!("accept on {}", self.path.display()))(e)),
            }
        };
        stream.set_nonblocking(false).map_err(os("make console connection blocking"))?;
        let left = deadline.saturating_duration_since(Instant::now()).max(Duration::from_millis(100));
        stream.set_read_timeout(Some(left)).map_err(os("set console read timeout"))?;

        // runc sends the pty name as payload and the master as SCM_RIGHTS.
        let mut name = [0u8; 4096];
        let mut iov = [IoSliceMut::new(&mut name)];
        let mut space = nix::cmsg_space!([RawFd; 4]);
        let fds: Vec<OwnedFd> = loop {
            match recvmsg::<()>(stream.as_raw_fd(), &mut iov, Some(&mut space), MsgFlags::MSG_CMSG_CLOEXEC) {
                Ok(msg) => {
                    let mut fds = Vec::new();
                    for c in msg.cmsgs().map_err(os("read console control message"))? {
                        if let ControlMessageOwned::ScmRights(raw) = c {
                            // SAFETY: the kernel just installed these fds for us; nobody else owns them.
                            fds.extend(raw.into_iter().map(|fd| unsafe { OwnedFd::from_raw_fd(fd) }));
                        }
                    }
                    break fds;
                }
                Err(Errno::EINTR) => {}
                Err(Errno::EAGAIN) => return Err(fail(format!("no pty master received within {timeout:?}"))),
                Err(e) => return Err(os(format!("receive on {}", self.path.display()))(e)),
            }
        };
        let master = fds.into_iter().next().ok_or_else(|| fail("connection carried no file descriptor".into()))?;
        if !isatty(&master).unwrap_or(false) {
            return Err(fail("received file descriptor is not a terminal".into()));
        }
        Ok(master)
    }
}

impl Drop for ConsoleSocket {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
        let _ = std::fs::remove_dir(&self.dir);
    }
}
