//! Copying a process's output into its sinks (FIFOs, files, a logger's pipes) and containerd's
//! stdin into the process, on threads of their own that can be stopped and waited for.

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::Path;
use std::sync::{Arc, Condvar, Mutex};
use std::thread::{self, JoinHandle};
use std::time::Duration;

use log::{debug, warn};
use nix::errno::Errno;
use nix::fcntl::{open, OFlag};
use nix::poll::PollFlags;
use nix::sys::eventfd::{EfdFlags, EventFd};
use nix::sys::stat::Mode;
use nix::sys::termios::{tcgetattr, SpecialCharacterIndices};
use nix::unistd::{read, write};

use crate::sync::{lock, unpoison};

use super::error::{os, IoError};
use super::fd::{wait_or_stop, Ready};

/// Copy buffer size; writes to FIFOs are still cut at `PIPE_BUF` (see [`Sink`]).
pub(super) const BUF_SIZE: usize = 32 * 1024;
/// Largest write the kernel keeps atomic on a pipe or FIFO.
pub(super) const PIPE_BUF: usize = libc::PIPE_BUF;

/// Where copied bytes go. Shared (`Arc`) when stdout and stderr name the same target.
pub(super) struct Sink {
    pub(super) fd: Option<Arc<OwnedFd>>,
    /// Writes to FIFOs and pipes are cut at `PIPE_BUF` so that lines of two
    /// streams sharing one FIFO do not interleave mid-chunk.
    pub(super) chunk: usize,
    pub(super) what: String,
}

pub(super) enum WriteEnd {
    Stopped,
    Failed(Errno),
}

impl Sink {
    pub(super) fn discard(what: String) -> Self {
        Sink { fd: None, chunk: BUF_SIZE, what }
    }

    pub(super) fn fd(fd: Arc<OwnedFd>, chunk: usize, what: String) -> Self {
        Sink { fd: Some(fd), chunk, what }
    }

    /// A plain path: a FIFO opened read-write (never blocks at open, never
    /// EPIPE when containerd detaches: our own reader keeps it alive), or an
    /// existing file appended to, as Go does.
    pub(super) fn fifo_or_file(path: &Path) -> Result<Self, IoError> {
        let what = path.display().to_string();
        let meta = std::fs::metadata(path).map_err(os(format!("stat {what}")))?;
        if meta.file_type().is_fifo() {
            let fd = open(path, OFlag::O_RDWR | OFlag::O_NONBLOCK | OFlag::O_CLOEXEC, Mode::empty())
                .map_err(os(format!("open FIFO {what}")))?;
            return Ok(Sink::fd(Arc::new(fd), PIPE_BUF, what));
        }
        let f = std::fs::OpenOptions::new()
            .append(true)
            .custom_flags(libc::O_CLOEXEC)
            .open(path)
            .map_err(os(format!("open {what}")))?;
        Ok(Sink::fd(Arc::new(f.into()), BUF_SIZE, what))
    }

    /// `file://`: creates parent directories and the file, like Go's shim.
    pub(super) fn append_file(path: &Path) -> Result<Self, IoError> {
        let what = path.display().to_string();
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(os(format!("create directory for {what}")))?;
        }
        let f = std::fs::OpenOptions::new()
            .append(true)
            .create(true)
            .mode(0o644)
            .custom_flags(libc::O_CLOEXEC)
            .open(path)
            .map_err(os(format!("open {what}")))?;
        Ok(Sink::fd(Arc::new(f.into()), BUF_SIZE, what))
    }

    pub(super) fn write_all(&self, mut data: &[u8], stop: BorrowedFd<'_>) -> Result<(), WriteEnd> {
        let Some(fd) = &self.fd else { return Ok(()) };
        while !data.is_empty() {
            let n = data.len().min(self.chunk);
            match write(fd, &data[..n]) {
                Ok(w) => data = &data[w..],
                Err(Errno::EINTR) => {}
                Err(Errno::EAGAIN) => match wait_or_stop(fd.as_fd(), PollFlags::POLLOUT, stop) {
                    Ok(Ready::Fd) => {}
                    Ok(Ready::Stopped) => return Err(WriteEnd::Stopped),
                    Err(e) => return Err(WriteEnd::Failed(e)),
                },
                Err(e) => return Err(WriteEnd::Failed(e)),
            }
        }
        Ok(())
    }
}

/// How a copy loop ended.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum End {
    Eof,
    Stopped,
    Failed,
}

/// Copies `src` into `dst` until EOF (EIO from a pty master counts as EOF) or
/// stop. With `keep_draining`, a failing destination does not end the loop:
/// we keep reading so the container never blocks on a full pipe.
pub(super) fn pump(name: &str, src: BorrowedFd<'_>, dst: &Sink, stop: BorrowedFd<'_>, keep_draining: bool) -> End {
    let mut buf = vec![0u8; BUF_SIZE];
    let mut dst_ok = true;
    loop {
        match wait_or_stop(src, PollFlags::POLLIN, stop) {
            Ok(Ready::Fd) => {}
            Ok(Ready::Stopped) => return End::Stopped,
            Err(e) => {
                warn!("{name}: poll: {e}");
                return End::Failed;
            }
        }
        let n = match read(src, &mut buf) {
            Ok(0) | Err(Errno::EIO) => return End::Eof,
            Ok(n) => n,
            Err(Errno::EAGAIN | Errno::EINTR) => continue,
            Err(e) => {
                warn!("{name}: read: {e}");
                return End::Failed;
            }
        };
        if !dst_ok {
            continue;
        }
        match dst.write_all(&buf[..n], stop) {
            Ok(()) => {}
            Err(WriteEnd::Stopped) => return End::Stopped,
            Err(WriteEnd::Failed(e)) => {
                if !keep_draining {
                    debug!("{name}: write to {}: {e}", dst.what);
                    return End::Failed;
                }
                warn!("{name}: write to {}: {e}; discarding further output", dst.what);
                dst_ok = false;
            }
        }
    }
}

// ---------------------------------------------------------------------------
// Copy threads

#[derive(Default)]
pub(super) struct Counts {
    /// Output copiers still running (what `wait_output` waits for).
    pub(super) outputs: usize,
    /// All copiers still running (what `Drop` waits for).
    pub(super) all: usize,
}

/// The copy threads of one process and the eventfd that stops them.
pub(super) struct Copiers {
    pub(super) stop: EventFd,
    pub(super) counts: Mutex<Counts>,
    pub(super) changed: Condvar,
    pub(super) handles: Mutex<Vec<JoinHandle<()>>>,
}

/// Marks a copier finished even if its thread unwinds.
pub(super) struct Finished {
    pub(super) copiers: Arc<Copiers>,
    pub(super) output: bool,
}

impl Drop for Finished {
    fn drop(&mut self) {
        self.copiers.finish(self.output);
    }
}

impl Copiers {
    pub(super) fn new() -> Result<Arc<Self>, IoError> {
        let stop = EventFd::from_flags(EfdFlags::EFD_CLOEXEC).map_err(os("create stop eventfd"))?;
        Ok(Arc::new(Copiers {
            stop,
            counts: Mutex::new(Counts::default()),
            changed: Condvar::new(),
            handles: Mutex::new(Vec::new()),
        }))
    }

    pub(super) fn finish(&self, output: bool) {
        let mut c = lock(&self.counts);
        c.all -= 1;
        if output {
            c.outputs -= 1;
        }
        self.changed.notify_all();
    }

    /// Starts `work` on its own thread; it gets the stop fd to poll.
    pub(super) fn spawn<F>(self: &Arc<Self>, name: String, output: bool, work: F) -> Result<(), IoError>
    where
        F: FnOnce(BorrowedFd<'_>) + Send + 'static,
    {
        {
            // Counted before the thread runs, so wait_output cannot miss it.
            let mut c = lock(&self.counts);
            c.all += 1;
            if output {
                c.outputs += 1;
            }
        }
        let copiers = self.clone();
        let spawned = thread::Builder::new().name(name.clone()).spawn(move || {
            let done = Finished { copiers, output };
            work(done.copiers.stop.as_fd());
        });
        match spawned {
            Ok(h) => {
                lock(&self.handles).push(h);
                Ok(())
            }
            Err(e) => {
                self.finish(output);
                Err(os(format!("start {name} thread"))(e))
            }
        }
    }

    /// Waits until the counter `pick` selects is zero. `true` = it is.
    pub(super) fn wait_for(&self, timeout: Duration, pick: fn(&Counts) -> usize) -> bool {
        let c = lock(&self.counts);
        let (c, _) = unpoison(self.changed.wait_timeout_while(c, timeout, |c| pick(c) > 0));
        pick(&c) == 0
    }

    pub(super) fn stop(&self) {
        if let Err(e) = self.stop.write(1) {
            warn!("stop IO copiers: {e}");
        }
    }
}

/// Output copier: pipe or pty master → sink, draining even if the sink fails.
pub(super) fn start_output(
    copiers: &Arc<Copiers>,
    name: String,
    src: Arc<OwnedFd>,
    dst: Arc<Sink>,
) -> Result<(), IoError> {
    let label = name.clone();
    copiers.spawn(name, true, move |stop| {
        let end = pump(&label, src.as_fd(), &dst, stop, true);
        debug!("{label}: copy ended ({end:?})");
    })
}

/// Stdin copier: FIFO → pipe or pty master. Without a terminal, its end closes
/// the child's stdin (the pipe writer is dropped); with one, we type VEOF.
pub(super) fn start_stdin(
    copiers: &Arc<Copiers>,
    name: String,
    src: OwnedFd,
    dst: Sink,
    eof_char: Option<Arc<OwnedFd>>,
) -> Result<(), IoError> {
    let label = name.clone();
    copiers.spawn(name, false, move |stop| {
        let end = pump(&label, src.as_fd(), &dst, stop, false);
        debug!("{label}: copy ended ({end:?})");
        if end == End::Eof {
            if let Some(master) = eof_char {
                send_veof(&label, &master, &dst, stop);
            }
        }
    })
}

/// Types the terminal's EOF character, so a canonical-mode reader (`cat`,
/// a shell) sees end of input without hanging up the terminal.
pub(super) fn send_veof(name: &str, master: &OwnedFd, dst: &Sink, stop: BorrowedFd<'_>) {
    let veof = tcgetattr(master).map(|t| t.control_chars[SpecialCharacterIndices::VEOF as usize]).unwrap_or(4);
    if veof == 0 {
        return; // _POSIX_VDISABLE: the program turned EOF off
    }
    if let Err(WriteEnd::Failed(e)) = dst.write_all(&[veof], stop) {
        debug!("{name}: write EOF character: {e}");
    }
}
