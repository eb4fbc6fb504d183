//! Process IO: connects the stdio containerd asked for (FIFO paths, `file://`
//! and `binary://` URIs, or a terminal) to an init or exec process.
//!
//! The runtime never sees containerd's FIFOs. We hand it pipes (or, for a
//! terminal, receive the pty master through `--console-socket`) and copy on
//! our own threads, as the Go shim does: passing FIFO paths to runc caused
//! exec IO drain hangs in rust-extensions. Owning the copy lets us
//!
//! * keep the child's stdin open until CloseIO, whatever containerd's writer does;
//! * drain stdout/stderr completely before the exit is reported ([`ProcessIo::wait_output`]);
//! * copy output only once the runtime call succeeded, so that runc's own failure message (it
//!   writes it to its stderr, the process's) stays out of the container's log ([`ProcessIo::prepare`]);
//! * survive a containerd restart: we hold a read side of each output FIFO, so
//!   writes block until a reader returns instead of failing with EPIPE.
//!
//! Every fd this module keeps is close-on-exec, so runtime processes spawned
//! concurrently by other RPCs never inherit our pipe ends (which would keep
//! EOF from ever arriving).

use std::fmt;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use log::warn;
use nix::fcntl::{open, OFlag};
use nix::sys::stat::Mode;
use nix::unistd::{fchown, Gid, Uid};

use crate::sync::lock;

mod console;
mod copy;
mod error;
mod fd;
mod logger;
mod uri;

pub use error::IoError;

use console::ConsoleSocket;
use copy::*;
use error::os;
use fd::*;
use logger::spawn_logger;
use uri::*;

/// How long `attach` waits for the runtime to send the pty master.
const CONSOLE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a `binary://` logger gets to signal readiness (Go waits unbounded).
const LOGGER_READY_TIMEOUT: Duration = Duration::from_secs(10);
/// How long `Drop` waits for stopped copy threads before detaching them.
const STOP_TIMEOUT: Duration = Duration::from_secs(2);

/// The stdio containerd asked for, per process: FIFO paths or URIs
/// (`""` = not used), and whether the process gets a terminal.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StdioConfig {
    pub stdin: String,
    pub stdout: String,
    pub stderr: String,
    pub terminal: bool,
}

impl StdioConfig {
    /// No stream is used: everything is /dev/null.
    pub fn is_null(&self) -> bool {
        self.stdin.is_empty() && self.stdout.is_empty() && self.stderr.is_empty()
    }
}

/// Who owns the pipes handed to the runtime child: containerd's runc options
/// `IoUid`/`IoGid`, so a process in a user namespace can reopen its stdio
/// (`/proc/self/fd/N`, `/dev/stdout`) as go-runc's `NewPipeIO` allows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IoOwner {
    pub uid: u32,
    pub gid: u32,
}

/// The runtime child's stdio (`runc create`/`exec`, which passes it on to the
/// container process). `None` means /dev/null. Empty for a terminal.
#[derive(Debug, Default)]
pub struct ChildStdio {
    pub stdin: Option<OwnedFd>,
    pub stdout: Option<OwnedFd>,
    pub stderr: Option<OwnedFd>,
}

/// Gives a pipe to `owner`. Both ends of a pipe share one inode, so chowning
/// the child's end covers ours too (go-runc likewise chowns only that end).
fn chown_pipe(fd: &OwnedFd, owner: IoOwner, what: &str) -> Result<(), IoError> {
    fchown(fd, Some(Uid::from_raw(owner.uid)), Some(Gid::from_raw(owner.gid)))
        .map_err(os(format!("chown {what} pipe to {}:{}", owner.uid, owner.gid)))
}

/// Terminal state between `prepare` and `attach`.
struct PendingConsole {
    socket: ConsoleSocket,
    stdin: Option<OwnedFd>,
    stdout: Arc<Sink>,
}

/// The IO of one init or exec process. Dropping it stops the copy threads and
/// closes everything we hold (a `binary://` logger keeps running until its
/// pipes reach EOF).
pub struct ProcessIo {
    id: String,
    terminal: bool,
    copiers: Arc<Copiers>,
    /// Our writer on the stdin FIFO: the copier sees EOF only once this and
    /// containerd's writer are both closed. Dropped by `close_stdin`.
    stdin_keepalive: Mutex<Option<OwnedFd>>,
    pending: Option<PendingConsole>,
    master: Option<Arc<OwnedFd>>,
    console_path: Option<PathBuf>,
    logger_pid: Option<u32>,
    console_timeout: Duration,
    /// Output pipes whose copying starts at [`attach`](ProcessIo::attach): `(thread name, read
    /// end, sink)`. Until then the runtime's own stderr is the process's; see `prepare`.
    outputs: Vec<(String, Arc<OwnedFd>, Arc<Sink>)>,
}

impl fmt::Debug for ProcessIo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ProcessIo")
            .field("id", &self.id)
            .field("terminal", &self.terminal)
            .field("console_socket", &self.console_path)
            .field("attached", &self.master.is_some())
            .field("logger_pid", &self.logger_pid)
            .finish()
    }
}

/// Opens the stdin FIFO without blocking (containerd may not have opened its
/// end yet) plus our keep-alive writer, which also needs the reader to exist.
fn open_stdin(path: &Path) -> Result<(OwnedFd, Option<OwnedFd>), IoError> {
    let what = path.display();
    let reader = open(path, OFlag::O_RDONLY | OFlag::O_NONBLOCK | OFlag::O_CLOEXEC, Mode::empty())
        .map_err(os(format!("open stdin {what}")))?;
    let is_fifo = std::fs::metadata(path).map(|m| m.file_type().is_fifo()).unwrap_or(false);
    if !is_fifo {
        return Ok((reader, None));
    }
    let keepalive = open(path, OFlag::O_WRONLY | OFlag::O_NONBLOCK | OFlag::O_CLOEXEC, Mode::empty())
        .map_err(os(format!("open stdin {what} for writing")))?;
    Ok((reader, Some(keepalive)))
}

/// Opens the sink for a non-binary destination.
fn open_sink(dest: &Dest, what: String) -> Result<Arc<Sink>, IoError> {
    Ok(Arc::new(match dest {
        Dest::Null => Sink::discard(what),
        Dest::Path(p) => Sink::fifo_or_file(p)?,
        Dest::File(p) => Sink::append_file(p)?,
        Dest::Binary(_) => return Err(IoError::Logger { path: what, reason: "not a sink".into() }),
    }))
}

impl ProcessIo {
    /// Before the runtime call: opens containerd's side, creates the pipes (or
    /// the console socket) and, without a terminal, starts copying stdin. Returns
    /// the fds for the runtime child (all `None` for a terminal).
    ///
    /// Output copying waits for [`attach`](Self::attach): the runtime's stderr
    /// is the process's (it hands its stdio on), and runc prints a failure there
    /// as well as in its log. Copied only after the call succeeded, as in
    /// containerd's runc shim, a refused create or exec never lands in the
    /// container's log; the error names runc's message instead.
    ///
    /// `work_dir` (the bundle) hosts the console socket when its path is short
    /// enough; `id` and `namespace` go to a `binary://` logger.
    pub fn prepare(
        cfg: &StdioConfig,
        work_dir: &Path,
        id: &str,
        namespace: &str,
    ) -> Result<(ProcessIo, ChildStdio), IoError> {
        Self::prepare_owned(cfg, work_dir, id, namespace, None)
    }

    /// [`prepare`](Self::prepare), with the child's pipes chowned to `owner`
    /// (runc options `IoUid`/`IoGid`). As in Go, a terminal's console socket
    /// and pty are left alone: the runtime creates the pty inside the container.
    pub fn prepare_owned(
        cfg: &StdioConfig,
        work_dir: &Path,
        id: &str,
        namespace: &str,
        owner: Option<IoOwner>,
    ) -> Result<(ProcessIo, ChildStdio), IoError> {
        Self::prepare_with(cfg, work_dir, id, namespace, owner, LOGGER_READY_TIMEOUT)
    }

    fn prepare_with(
        cfg: &StdioConfig,
        work_dir: &Path,
        id: &str,
        namespace: &str,
        owner: Option<IoOwner>,
        logger_timeout: Duration,
    ) -> Result<(ProcessIo, ChildStdio), IoError> {
        let stdin_path = parse_stdin(&cfg.stdin)?;
        let out = parse_dest("stdout", &cfg.stdout)?;
        // A logger takes both streams (containerd passes the same URI twice);
        // with a terminal there is no separate stderr at all.
        let err = match (&out, cfg.terminal) {
            (Dest::Binary(_), _) | (_, true) => Dest::Null,
            _ => match parse_dest("stderr", &cfg.stderr)? {
                Dest::Binary(_) => {
                    return Err(IoError::InvalidUri {
                        stream: "stderr",
                        uri: cfg.stderr.clone(),
                        reason: "binary:// is only supported when stdout uses it too".into(),
                    })
                }
                d => d,
            },
        };

        let mut io = ProcessIo {
            id: id.to_string(),
            terminal: cfg.terminal,
            copiers: Copiers::new()?,
            stdin_keepalive: Mutex::new(None),
            pending: None,
            master: None,
            console_path: None,
            logger_pid: None,
            console_timeout: CONSOLE_TIMEOUT,
            outputs: Vec::new(),
        };
        let mut child = ChildStdio::default();

        let stdin = match &stdin_path {
            Some(p) => {
                let (reader, keepalive) = open_stdin(p)?;
                *lock(&io.stdin_keepalive) = keepalive;
                Some(reader)
            }
            None => None,
        };

        if cfg.terminal {
            let stdout = match &out {
                Dest::Binary(uri) => {
                    // Go's CopyConsole: the logger's stderr pipe exists but stays empty.
                    let (out_r, out_w) = pipe("logger stdout")?;
                    let (err_r, _err_w) = pipe("logger stderr")?;
                    set_nonblocking(&out_w, "logger stdout")?;
                    io.logger_pid = Some(spawn_logger(uri, id, namespace, out_r, err_r, logger_timeout)?);
                    Arc::new(Sink::fd(Arc::new(out_w), PIPE_BUF, format!("logger {}", uri.path.display())))
                }
                d => open_sink(d, format!("{id} stdout"))?,
            };
            let socket = ConsoleSocket::new(work_dir)?;
            io.console_path = Some(socket.path.clone());
            io.pending = Some(PendingConsole { socket, stdin, stdout });
            return Ok((io, child));
        }

        // Open every destination before starting anything, so a bad path fails cleanly.
        let same = !cfg.stdout.is_empty() && cfg.stdout == cfg.stderr;
        let (out_sink, err_sink) = match &out {
            Dest::Binary(_) | Dest::Null => {
                (None, if err == Dest::Null { None } else { Some(open_sink(&err, format!("{id} stderr"))?) })
            }
            _ => {
                let o = open_sink(&out, format!("{id} stdout"))?;
                let e = match &err {
                    Dest::Null => None,
                    _ if same => Some(o.clone()),
                    d => Some(open_sink(d, format!("{id} stderr"))?),
                };
                (Some(o), e)
            }
        };

        if let Dest::Binary(uri) = &out {
            let (out_r, out_w) = pipe("logger stdout")?;
            let (err_r, err_w) = pipe("logger stderr")?;
            io.logger_pid = Some(spawn_logger(uri, id, namespace, out_r, err_r, logger_timeout)?);
            child.stdout = Some(out_w);
            child.stderr = Some(err_w);
        }
        for (stream, sink) in [("stdout", out_sink), ("stderr", err_sink)] {
            let Some(sink) = sink else { continue };
            let (r, w) = pipe(stream)?;
            set_nonblocking(&r, stream)?;
            io.outputs.push((format!("io-{stream}-{id}"), Arc::new(r), sink));
            match stream {
                "stdout" => child.stdout = Some(w),
                _ => child.stderr = Some(w),
            }
        }
        if let Some(reader) = stdin {
            let (r, w) = pipe("stdin")?;
            set_nonblocking(&w, "stdin pipe")?;
            let sink = Sink::fd(Arc::new(w), BUF_SIZE, format!("{id} stdin pipe"));
            start_stdin(&io.copiers, format!("io-stdin-{id}"), reader, sink, None)?;
            child.stdin = Some(r);
        }
        if let Some(owner) = owner {
            for (stream, fd) in [("stdin", &child.stdin), ("stdout", &child.stdout), ("stderr", &child.stderr)] {
                if let Some(fd) = fd {
                    chown_pipe(fd, owner, stream)?;
                }
            }
        }
        Ok((io, child))
    }

    /// The `--console-socket` path for the runtime (terminal processes only).
    pub fn console_socket(&self) -> Option<&Path> {
        self.console_path.as_deref()
    }

    /// The `binary://` logger's pid, if one was started. It is not ours to wait
    /// for: the shim's reaper collects it.
    pub fn logger_pid(&self) -> Option<u32> {
        self.logger_pid
    }

    /// After the runtime call succeeded: starts copying the output pipes; for
    /// a terminal, receives the pty master (bounded wait) and starts copying,
    /// the socket removed either way. Later calls do nothing. Never called
    /// after a failed call: dropping the IO then discards what the runtime wrote.
    pub fn attach(&mut self) -> Result<(), IoError> {
        for (name, src, dst) in std::mem::take(&mut self.outputs) {
            start_output(&self.copiers, name, src, dst)?;
        }
        let Some(pending) = self.pending.take() else { return Ok(()) };
        let received = pending.socket.receive(self.console_timeout);
        drop(pending.socket);
        self.console_path = None;
        let master = Arc::new(received?);
        set_nonblocking(&master, "pty master")?;
        self.master = Some(master.clone());
        start_output(&self.copiers, format!("io-pty-{}", self.id), master.clone(), pending.stdout)?;
        if let Some(reader) = pending.stdin {
            let sink = Sink::fd(master.clone(), BUF_SIZE, format!("{} pty", self.id));
            start_stdin(&self.copiers, format!("io-stdin-{}", self.id), reader, sink, Some(master))?;
        }
        Ok(())
    }

    /// CloseIO: drops our writer on the stdin FIFO. The child's stdin ends once
    /// containerd's writer is closed too and buffered input has been copied
    /// (with a terminal: VEOF is typed). Idempotent.
    pub fn close_stdin(&self) {
        lock(&self.stdin_keepalive).take();
    }

    /// Sets the terminal size; a no-op without a terminal (as in Go).
    pub fn resize(&self, width: u32, height: u32) -> Result<(), IoError> {
        let Some(master) = &self.master else { return Ok(()) };
        let ws = libc::winsize {
            ws_row: height.min(u16::MAX as u32) as u16,
            ws_col: width.min(u16::MAX as u32) as u16,
            ws_xpixel: 0,
            ws_ypixel: 0,
        };
        // SAFETY: TIOCSWINSZ reads one winsize from a valid pointer.
        let rc = unsafe { libc::ioctl(master.as_raw_fd(), libc::TIOCSWINSZ, &ws as *const libc::winsize) };
        if rc < 0 {
            return Err(os(format!("resize terminal of {}", self.id))(std::io::Error::last_os_error()));
        }
        Ok(())
    }

    /// Waits (bounded) until stdout/stderr reached EOF and everything read was
    /// written out. Call after the exit and before reporting it. `false` = timed
    /// out, e.g. a daemonized grandchild still holds the pipe; copying goes on
    /// until drop. Nothing to wait for with a `binary://` logger.
    pub fn wait_output(&self, timeout: Duration) -> bool {
        let drained = self.copiers.wait_for(timeout, |c| c.outputs);
        if !drained {
            warn!("{}: output not drained within {timeout:?}", self.id);
        }
        drained
    }
}

impl Drop for ProcessIo {
    fn drop(&mut self) {
        lock(&self.stdin_keepalive).take();
        self.copiers.stop();
        if !self.copiers.wait_for(STOP_TIMEOUT, |c| c.all) {
            warn!("{}: IO copiers did not stop within {STOP_TIMEOUT:?}; leaving them", self.id);
        }
        for h in std::mem::take(&mut *lock(&self.copiers.handles)) {
            if h.is_finished() {
                let _ = h.join();
            }
        }
    }
}

#[cfg(test)]
mod tests;
