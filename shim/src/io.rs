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

use std::ffi::OsStr;
use std::fmt;
use std::io::{ErrorKind, IoSliceMut};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, OpenOptionsExt};
use std::os::unix::net::UnixListener;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use log::{debug, warn};
use nix::errno::Errno;
use nix::fcntl::{fcntl, open, FcntlArg, OFlag};
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::eventfd::{EfdFlags, EventFd};
use nix::sys::signal::{kill, Signal};
use nix::sys::socket::{recvmsg, ControlMessageOwned, MsgFlags};
use nix::sys::stat::Mode;
use nix::sys::termios::{tcgetattr, SpecialCharacterIndices};
use nix::unistd::{access, fchown, isatty, pipe2, read, write, AccessFlags, Gid, Pid, Uid};

/// How long `attach` waits for the runtime to send the pty master.
const CONSOLE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a `binary://` logger gets to signal readiness (Go waits unbounded).
const LOGGER_READY_TIMEOUT: Duration = Duration::from_secs(10);
/// How long `Drop` waits for stopped copy threads before detaching them.
const STOP_TIMEOUT: Duration = Duration::from_secs(2);
/// Copy buffer size; writes to FIFOs are still cut at `PIPE_BUF` (see [`Sink`]).
const BUF_SIZE: usize = 32 * 1024;
/// Largest write the kernel keeps atomic on a pipe or FIFO.
const PIPE_BUF: usize = libc::PIPE_BUF;
/// `sun_path` holds 108 bytes including the terminating NUL.
const MAX_SOCKET_PATH: usize = 107;

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

#[derive(Debug, thiserror::Error)]
pub enum IoError {
    /// A stdio string we cannot interpret (unknown scheme, bad escape, no path).
    #[error("{stream} {uri:?}: {reason}")]
    InvalidUri { stream: &'static str, uri: String, reason: String },
    #[error("{context}: {source}")]
    Os {
        context: String,
        #[source]
        source: std::io::Error,
    },
    #[error("logging binary {path}: {reason}")]
    Logger { path: String, reason: String },
    #[error("console socket {path}: {reason}")]
    Console { path: PathBuf, reason: String },
}

impl IoError {
    /// The request itself was wrong (as opposed to the host failing us).
    pub fn is_invalid_argument(&self) -> bool {
        matches!(self, IoError::InvalidUri { .. })
    }
}

/// Wraps an OS error with what we were doing.
fn os<E: Into<std::io::Error>>(context: impl Into<String>) -> impl FnOnce(E) -> IoError {
    let context = context.into();
    move |e| IoError::Os { context, source: e.into() }
}

// ---------------------------------------------------------------------------
// Parsing containerd's stdio strings

/// Where one output stream goes.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Dest {
    Null,
    /// A FIFO (the usual case) or an existing file, as Go's `copyPipes` treats a plain path.
    Path(PathBuf),
    /// `file://`: created if missing, appended to.
    File(PathBuf),
    /// `binary://`: a logging process that reads the container's pipes itself.
    Binary(BinaryUri),
}

/// `binary:///path?k=v&env.NAME=val`, as containerd's `NewBinaryCmd` reads it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct BinaryUri {
    path: PathBuf,
    /// `k=v` → `k v`, `k` → `k`, in URI order (Go's map order is random).
    args: Vec<String>,
    /// `env.NAME=val` → `NAME=val` (containerd 1.7+); CONTAINER_ID/NAMESPACE cannot be overridden.
    env: Vec<(String, String)>,
}

/// Splits `scheme://rest` when the prefix is a valid URI scheme; plain paths give `None`.
fn split_scheme(s: &str) -> Option<(&str, &str)> {
    let (scheme, rest) = s.split_once("://")?;
    let mut chars = scheme.chars();
    let first = chars.next()?;
    let valid = first.is_ascii_alphabetic() && chars.all(|c| c.is_ascii_alphanumeric() || "+-.".contains(c));
    valid.then_some((scheme, rest))
}

/// Decodes `%XX` escapes (and `+` as a space in query parts) like Go's `net/url`.
fn percent_decode(s: &str, plus_is_space: bool) -> Result<Vec<u8>, String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' => {
                let hex = bytes.get(i + 1..i + 3).and_then(|h| std::str::from_utf8(h).ok());
                let v = hex.and_then(|h| u8::from_str_radix(h, 16).ok()).ok_or("invalid % escape")?;
                out.push(v);
                i += 3;
            }
            b'+' if plus_is_space => {
                out.push(b' ');
                i += 1;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    Ok(out)
}

fn decode_string(s: &str) -> Result<String, String> {
    String::from_utf8(percent_decode(s, true)?).map_err(|_| "query is not UTF-8".to_string())
}

/// Parses the part after `scheme://` into a path and its query pairs.
fn path_and_query(rest: &str) -> Result<(PathBuf, Vec<(String, String)>), String> {
    let rest = rest.split_once('#').map_or(rest, |(r, _)| r);
    let (hier, query) = rest.split_once('?').unwrap_or((rest, ""));
    // Go's url.Parse puts `host` of `scheme://host/p` aside and uses only the path.
    let path = if hier.starts_with('/') { hier } else { hier.find('/').map_or("", |i| &hier[i..]) };
    if path.is_empty() {
        return Err("no path".into());
    }
    let path = PathBuf::from(OsStr::from_bytes(&percent_decode(path, false)?));
    let mut pairs = Vec::new();
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        pairs.push((decode_string(k)?, decode_string(v)?));
    }
    Ok((path, pairs))
}

fn parse_dest(stream: &'static str, s: &str) -> Result<Dest, IoError> {
    if s.is_empty() {
        return Ok(Dest::Null);
    }
    let Some((scheme, rest)) = split_scheme(s) else {
        return Ok(Dest::Path(PathBuf::from(s)));
    };
    let invalid = |reason: String| IoError::InvalidUri { stream, uri: s.to_string(), reason };
    let (path, query) = path_and_query(rest).map_err(invalid)?;
    match scheme.to_ascii_lowercase().as_str() {
        "fifo" => Ok(Dest::Path(path)),
        "file" => Ok(Dest::File(path)),
        "binary" => {
            if !path.is_absolute() {
                return Err(invalid("logging binary path must be absolute".into()));
            }
            let mut uri = BinaryUri { path, args: Vec::new(), env: Vec::new() };
            for (k, v) in query {
                if let Some(name) = k.strip_prefix("env.") {
                    if name != "CONTAINER_ID" && name != "CONTAINER_NAMESPACE" && !name.is_empty() {
                        uri.env.push((name.to_string(), v));
                    }
                } else {
                    uri.args.push(k);
                    if !v.is_empty() {
                        uri.args.push(v);
                    }
                }
            }
            Ok(Dest::Binary(uri))
        }
        other => Err(invalid(format!("unknown stdio scheme {other:?}"))),
    }
}

/// The stdin FIFO path; only plain paths and `fifo://` make sense for input.
fn parse_stdin(s: &str) -> Result<Option<PathBuf>, IoError> {
    match parse_dest("stdin", s)? {
        Dest::Null => Ok(None),
        Dest::Path(p) => Ok(Some(p)),
        _ => Err(IoError::InvalidUri { stream: "stdin", uri: s.to_string(), reason: "stdin must be a FIFO".into() }),
    }
}

// ---------------------------------------------------------------------------
// Small fd helpers

fn pipe(what: &str) -> Result<(OwnedFd, OwnedFd), IoError> {
    pipe2(OFlag::O_CLOEXEC).map_err(os(format!("create {what} pipe")))
}

/// Gives a pipe to `owner`. Both ends of a pipe share one inode, so chowning
/// the child's end covers ours too (go-runc likewise chowns only that end).
fn chown_pipe(fd: &OwnedFd, owner: IoOwner, what: &str) -> Result<(), IoError> {
    fchown(fd, Some(Uid::from_raw(owner.uid)), Some(Gid::from_raw(owner.gid)))
        .map_err(os(format!("chown {what} pipe to {}:{}", owner.uid, owner.gid)))
}

/// Only ever applied to our own open file descriptions (pipe ends are separate
/// descriptions), so the child's ends stay blocking.
fn set_nonblocking(fd: &OwnedFd, what: &str) -> Result<(), IoError> {
    let flags = fcntl(fd, FcntlArg::F_GETFL).map_err(os(format!("get flags of {what}")))?;
    let flags = OFlag::from_bits_truncate(flags) | OFlag::O_NONBLOCK;
    fcntl(fd, FcntlArg::F_SETFL(flags)).map_err(os(format!("make {what} non-blocking")))?;
    Ok(())
}

fn poll_timeout(d: Duration) -> PollTimeout {
    // Round up so a short remainder does not turn into a busy loop.
    PollTimeout::try_from(d + Duration::from_micros(999)).unwrap_or(PollTimeout::MAX)
}

/// Waits until `fd` has `events` or the deadline passes. `Ok(false)` = timed out.
fn wait_fd(fd: BorrowedFd<'_>, events: PollFlags, deadline: Instant) -> Result<bool, Errno> {
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
enum Ready {
    Fd,
    Stopped,
}

/// Waits for `fd` (no timeout) unless the stop eventfd fires first.
fn wait_or_stop(fd: BorrowedFd<'_>, events: PollFlags, stop: BorrowedFd<'_>) -> Result<Ready, Errno> {
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

// ---------------------------------------------------------------------------
// Sinks and the copy loop

/// Where copied bytes go. Shared (`Arc`) when stdout and stderr name the same target.
struct Sink {
    fd: Option<Arc<OwnedFd>>,
    /// Writes to FIFOs and pipes are cut at `PIPE_BUF` so that lines of two
    /// streams sharing one FIFO do not interleave mid-chunk.
    chunk: usize,
    what: String,
}

enum WriteEnd {
    Stopped,
    Failed(Errno),
}

impl Sink {
    fn discard(what: String) -> Self {
        Sink { fd: None, chunk: BUF_SIZE, what }
    }

    fn fd(fd: Arc<OwnedFd>, chunk: usize, what: String) -> Self {
        Sink { fd: Some(fd), chunk, what }
    }

    /// A plain path: a FIFO opened read-write (never blocks at open, never
    /// EPIPE when containerd detaches: our own reader keeps it alive), or an
    /// existing file appended to, as Go does.
    fn fifo_or_file(path: &Path) -> Result<Self, IoError> {
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
    fn append_file(path: &Path) -> Result<Self, IoError> {
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

    fn write_all(&self, mut data: &[u8], stop: BorrowedFd<'_>) -> Result<(), WriteEnd> {
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
enum End {
    Eof,
    Stopped,
    Failed,
}

/// Copies `src` into `dst` until EOF (EIO from a pty master counts as EOF) or
/// stop. With `keep_draining`, a failing destination does not end the loop:
/// we keep reading so the container never blocks on a full pipe.
fn pump(name: &str, src: BorrowedFd<'_>, dst: &Sink, stop: BorrowedFd<'_>, keep_draining: bool) -> End {
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
struct Counts {
    /// Output copiers still running (what `wait_output` waits for).
    outputs: usize,
    /// All copiers still running (what `Drop` waits for).
    all: usize,
}

/// The copy threads of one process and the eventfd that stops them.
struct Copiers {
    stop: EventFd,
    counts: Mutex<Counts>,
    changed: Condvar,
    handles: Mutex<Vec<JoinHandle<()>>>,
}

/// Marks a copier finished even if its thread unwinds.
struct Finished {
    copiers: Arc<Copiers>,
    output: bool,
}

impl Drop for Finished {
    fn drop(&mut self) {
        self.copiers.finish(self.output);
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A poisoned lock only means a copier panicked; the counts are still usable.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Copiers {
    fn new() -> Result<Arc<Self>, IoError> {
        let stop = EventFd::from_flags(EfdFlags::EFD_CLOEXEC).map_err(os("create stop eventfd"))?;
        Ok(Arc::new(Copiers {
            stop,
            counts: Mutex::new(Counts::default()),
            changed: Condvar::new(),
            handles: Mutex::new(Vec::new()),
        }))
    }

    fn finish(&self, output: bool) {
        let mut c = lock(&self.counts);
        c.all -= 1;
        if output {
            c.outputs -= 1;
        }
        self.changed.notify_all();
    }

    /// Starts `work` on its own thread; it gets the stop fd to poll.
    fn spawn<F>(self: &Arc<Self>, name: String, output: bool, work: F) -> Result<(), IoError>
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
    fn wait_for(&self, timeout: Duration, pick: fn(&Counts) -> usize) -> bool {
        let c = lock(&self.counts);
        let (c, _) = self.changed.wait_timeout_while(c, timeout, |c| pick(c) > 0).unwrap_or_else(|p| p.into_inner());
        pick(&c) == 0
    }

    fn stop(&self) {
        if let Err(e) = self.stop.write(1) {
            warn!("stop IO copiers: {e}");
        }
    }
}

/// Output copier: pipe or pty master → sink, draining even if the sink fails.
fn start_output(copiers: &Arc<Copiers>, name: String, src: Arc<OwnedFd>, dst: Arc<Sink>) -> Result<(), IoError> {
    let label = name.clone();
    copiers.spawn(name, true, move |stop| {
        let end = pump(&label, src.as_fd(), &dst, stop, true);
        debug!("{label}: copy ended ({end:?})");
    })
}

/// Stdin copier: FIFO → pipe or pty master. Without a terminal, its end closes
/// the child's stdin (the pipe writer is dropped); with one, we type VEOF.
fn start_stdin(
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
fn send_veof(name: &str, master: &OwnedFd, dst: &Sink, stop: BorrowedFd<'_>) {
    let veof = tcgetattr(master).map(|t| t.control_chars[SpecialCharacterIndices::VEOF as usize]).unwrap_or(4);
    if veof == 0 {
        return; // _POSIX_VDISABLE: the program turned EOF off
    }
    if let Err(WriteEnd::Failed(e)) = dst.write_all(&[veof], stop) {
        debug!("{name}: write EOF character: {e}");
    }
}

// ---------------------------------------------------------------------------
// Console socket

static UNIQUE: AtomicU64 = AtomicU64::new(0);

/// A listening unix socket in a private directory, for `--console-socket`.
struct ConsoleSocket {
    dir: PathBuf,
    path: PathBuf,
    listener: UnixListener,
}

impl ConsoleSocket {
    /// Tries `work_dir`, then /run/kybernate, then the temp dir: bundle paths
    /// with long ids exceed the 107 bytes a socket path may have.
    fn new(work_dir: &Path) -> Result<Self, IoError> {
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

    fn new_in(base: &Path) -> Result<Self, IoError> {
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
    fn receive(&self, timeout: Duration) -> Result<OwnedFd, IoError> {
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

// ---------------------------------------------------------------------------
// binary:// logger

/// Starts a `binary://` logger like containerd's `NewBinaryIO`: fd 3 = stdout
/// read end, 4 = stderr read end, 5 = a ready pipe it writes to or closes;
/// env is only CONTAINER_ID, CONTAINER_NAMESPACE and `env.*` query entries.
///
/// The logger is never waited for: the shim's reaper collects every child
/// with `waitpid(-1)`, and the logger exits by itself once every writer of its
/// pipes (the container process) is gone.
fn spawn_logger(
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

// ---------------------------------------------------------------------------
// ProcessIo

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
mod tests {
    use super::*;
    use std::fs::File;
    use std::io::{BufRead, BufReader, IoSlice, Read, Write};
    use std::os::unix::fs::PermissionsExt;
    use std::os::unix::net::UnixStream;
    use std::process::Child;

    use nix::sys::socket::{sendmsg, ControlMessage};
    use nix::sys::stat::Mode;
    use nix::sys::wait::waitpid;
    use nix::unistd::mkfifo;

    /// Tests spawn children and count fds; one at a time keeps them honest.
    fn serial() -> MutexGuard<'static, ()> {
        static LOCK: Mutex<()> = Mutex::new(());
        lock(&LOCK)
    }

    fn fifo(dir: &Path, name: &str) -> PathBuf {
        let p = dir.join(name);
        mkfifo(&p, Mode::from_bits_truncate(0o600)).unwrap();
        p
    }

    fn cfg(stdin: &Path, stdout: &Path, stderr: &Path) -> StdioConfig {
        let s = |p: &Path| p.to_str().unwrap().to_string();
        StdioConfig { stdin: s(stdin), stdout: s(stdout), stderr: s(stderr), terminal: false }
    }

    /// containerd's reader side of an output FIFO: opened before `prepare`
    /// without blocking, read to EOF on a thread once started.
    struct OutReader(File);

    impl OutReader {
        fn open(p: &Path) -> Self {
            let fd = open(p, OFlag::O_RDONLY | OFlag::O_NONBLOCK | OFlag::O_CLOEXEC, Mode::empty()).unwrap();
            OutReader(File::from(fd))
        }

        /// Call once our writer exists, else a blocking read sees EOF at once.
        fn start(self) -> JoinHandle<Vec<u8>> {
            fcntl(&self.0, FcntlArg::F_SETFL(OFlag::empty())).unwrap();
            thread::spawn(move || {
                let mut f = self.0;
                let mut buf = Vec::new();
                f.read_to_end(&mut buf).unwrap();
                buf
            })
        }
    }

    /// containerd's writer side of the stdin FIFO (needs our reader to exist).
    fn stdin_writer(p: &Path) -> File {
        let fd = open(p, OFlag::O_WRONLY | OFlag::O_NONBLOCK | OFlag::O_CLOEXEC, Mode::empty()).unwrap();
        let f = File::from(fd);
        fcntl(&f, FcntlArg::F_SETFL(OFlag::empty())).unwrap();
        f
    }

    /// Plays the runtime: the container process gets the child fds as stdio.
    fn spawn(child: ChildStdio, script: &str) -> Child {
        let io = |fd: Option<OwnedFd>| fd.map_or_else(Stdio::null, Stdio::from);
        let mut cmd = Command::new("/bin/sh");
        cmd.arg("-c").arg(script).stdin(io(child.stdin)).stdout(io(child.stdout)).stderr(io(child.stderr));
        let c = cmd.spawn().unwrap();
        drop(cmd); // closes our copies of the child ends, as the runtime module must
        c
    }

    fn wait_exit(c: &mut Child, timeout: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Some(s) = c.try_wait().unwrap() {
                return Some(s);
            }
            thread::sleep(Duration::from_millis(10));
        }
        None
    }

    #[test]
    fn pipes_copy_stdin_stdout_stderr() {
        let _g = serial();
        let dir = tempfile::tempdir().unwrap();
        let (i, o, e) = (fifo(dir.path(), "in"), fifo(dir.path(), "out"), fifo(dir.path(), "err"));
        let (out, err) = (OutReader::open(&o), OutReader::open(&e));
        let (mut io, child) = ProcessIo::prepare(&cfg(&i, &o, &e), dir.path(), "c1", "ns").unwrap();
        assert!(child.stdin.is_some() && child.stdout.is_some() && child.stderr.is_some());
        assert!(io.console_socket().is_none());
        io.attach().unwrap();
        let (out, err) = (out.start(), err.start());
        let mut c = spawn(child, "cat; echo err >&2");
        let mut w = stdin_writer(&i);
        w.write_all(b"hello\n").unwrap();
        drop(w);
        io.close_stdin();
        assert!(wait_exit(&mut c, Duration::from_secs(5)).unwrap().success());
        let t = Instant::now();
        assert!(io.wait_output(Duration::from_secs(5)));
        assert!(t.elapsed() < Duration::from_secs(1), "drain took {:?}", t.elapsed());
        assert_eq!(out.join().unwrap(), b"hello\n");
        assert_eq!(err.join().unwrap(), b"err\n");
    }

    #[test]
    fn child_pipes_are_chowned_to_the_io_owner() {
        if !nix::unistd::geteuid().is_root() {
            eprintln!("skipped: chown needs root");
            return;
        }
        let _g = serial();
        let dir = tempfile::tempdir().unwrap();
        let (i, o, e) = (fifo(dir.path(), "in"), fifo(dir.path(), "out"), fifo(dir.path(), "err"));
        let (_out, _err) = (OutReader::open(&o), OutReader::open(&e));
        let owners = |child: &ChildStdio| {
            [&child.stdin, &child.stdout, &child.stderr].map(|fd| {
                let st = nix::sys::stat::fstat(fd.as_ref().unwrap()).unwrap();
                (st.st_uid, st.st_gid)
            })
        };
        let owner = IoOwner { uid: 1234, gid: 5678 };
        let (io, child) = ProcessIo::prepare_owned(&cfg(&i, &o, &e), dir.path(), "c1", "ns", Some(owner)).unwrap();
        assert_eq!(owners(&child), [(1234, 5678); 3]);
        drop((io, child));
        let (io, child) = ProcessIo::prepare_owned(&cfg(&i, &o, &e), dir.path(), "c2", "ns", None).unwrap();
        assert_eq!(owners(&child), [(0, 0); 3]);
        drop((io, child));
    }

    #[test]
    fn large_output_is_fully_drained() {
        let _g = serial();
        let dir = tempfile::tempdir().unwrap();
        let o = fifo(dir.path(), "out");
        let out = OutReader::open(&o);
        let stdio = StdioConfig { stdout: o.to_str().unwrap().into(), ..Default::default() };
        let (mut io, child) = ProcessIo::prepare(&stdio, dir.path(), "c1", "ns").unwrap();
        assert!(child.stdin.is_none() && child.stderr.is_none());
        let out = out.start();
        let mut c = spawn(child, "head -c 8388608 /dev/urandom");
        io.attach().unwrap();
        assert!(wait_exit(&mut c, Duration::from_secs(30)).unwrap().success());
        assert!(io.wait_output(Duration::from_secs(10)));
        assert_eq!(out.join().unwrap().len(), 8 << 20);
    }

    /// A runtime that fails writes its error to the process's stderr (runc does):
    /// without `attach`, none of it reaches containerd's side.
    #[test]
    fn output_before_a_failed_runtime_call_is_discarded() {
        let _g = serial();
        let dir = tempfile::tempdir().unwrap();
        let (i, o, e) = (fifo(dir.path(), "in"), fifo(dir.path(), "out"), fifo(dir.path(), "err"));
        let (out, err) = (OutReader::open(&o), OutReader::open(&e));
        let (io, child) = ProcessIo::prepare(&cfg(&i, &o, &e), dir.path(), "c1", "ns").unwrap();
        let (out, err) = (out.start(), err.start());
        let mut c = spawn(child, "echo 'runc create failed: no such file' >&2; echo partial; exit 1");
        assert!(!wait_exit(&mut c, Duration::from_secs(5)).unwrap().success());
        drop(io);
        assert_eq!(out.join().unwrap(), b"");
        assert_eq!(err.join().unwrap(), b"");
    }

    /// containerd closing its stdin writer is not CloseIO: the child's stdin
    /// stays open until `close_stdin`, as in the Go shim.
    #[test]
    fn stdin_stays_open_until_close_stdin() {
        let _g = serial();
        let dir = tempfile::tempdir().unwrap();
        let (i, o) = (fifo(dir.path(), "in"), fifo(dir.path(), "out"));
        let out = OutReader::open(&o);
        let stdio =
            StdioConfig { stdin: i.to_str().unwrap().into(), stdout: o.to_str().unwrap().into(), ..Default::default() };
        let (mut io, child) = ProcessIo::prepare(&stdio, dir.path(), "c1", "ns").unwrap();
        let out = out.start();
        let mut c = spawn(child, "cat");
        io.attach().unwrap();
        let mut w = stdin_writer(&i);
        w.write_all(b"a").unwrap();
        drop(w);
        // A reattaching client may open a new writer in the meantime.
        thread::sleep(Duration::from_millis(300));
        let mut w = stdin_writer(&i);
        w.write_all(b"b").unwrap();
        drop(w);
        assert!(wait_exit(&mut c, Duration::from_millis(300)).is_none(), "cat ended before CloseIO");
        io.close_stdin();
        io.close_stdin(); // idempotent
        assert!(wait_exit(&mut c, Duration::from_secs(5)).unwrap().success());
        assert!(io.wait_output(Duration::from_secs(5)));
        assert_eq!(out.join().unwrap(), b"ab");
    }

    #[test]
    fn empty_paths_mean_dev_null() {
        let _g = serial();
        let dir = tempfile::tempdir().unwrap();
        let stdio = StdioConfig::default();
        assert!(stdio.is_null());
        let (mut io, child) = ProcessIo::prepare(&stdio, dir.path(), "c1", "ns").unwrap();
        assert!(child.stdin.is_none() && child.stdout.is_none() && child.stderr.is_none());
        io.attach().unwrap();
        io.close_stdin();
        io.resize(80, 24).unwrap();
        assert!(io.wait_output(Duration::ZERO));

        // Only stderr used: the other two stay /dev/null.
        let e = fifo(dir.path(), "err");
        let err = OutReader::open(&e);
        let stdio = StdioConfig { stderr: e.to_str().unwrap().into(), ..Default::default() };
        let (mut io, child) = ProcessIo::prepare(&stdio, dir.path(), "c1", "ns").unwrap();
        assert!(child.stdin.is_none() && child.stdout.is_none() && child.stderr.is_some());
        let err = err.start();
        let mut c = spawn(child, "echo out; echo err >&2; cat");
        io.attach().unwrap();
        assert!(wait_exit(&mut c, Duration::from_secs(5)).unwrap().success());
        assert!(io.wait_output(Duration::from_secs(5)));
        assert_eq!(err.join().unwrap(), b"err\n");
    }

    #[test]
    fn same_fifo_for_stdout_and_stderr() {
        let _g = serial();
        let dir = tempfile::tempdir().unwrap();
        let o = fifo(dir.path(), "out");
        let out = OutReader::open(&o);
        let p = o.to_str().unwrap().to_string();
        let stdio = StdioConfig { stdout: p.clone(), stderr: p, ..Default::default() };
        let (mut io, child) = ProcessIo::prepare(&stdio, dir.path(), "c1", "ns").unwrap();
        let out = out.start();
        let mut c = spawn(child, "echo out; echo err >&2");
        io.attach().unwrap();
        assert!(wait_exit(&mut c, Duration::from_secs(5)).unwrap().success());
        assert!(io.wait_output(Duration::from_secs(5)));
        let text = String::from_utf8(out.join().unwrap()).unwrap();
        let mut lines: Vec<_> = text.lines().collect();
        lines.sort();
        assert_eq!(lines, ["err", "out"]);
    }

    #[test]
    fn file_uri_appends_both_streams() {
        let _g = serial();
        let dir = tempfile::tempdir().unwrap();
        let existing = dir.path().join("existing.log");
        std::fs::write(&existing, "old\n").unwrap();
        let fresh = dir.path().join("sub/dir/fresh.log");
        for target in [&existing, &fresh] {
            let uri = format!("file://{}", target.display());
            let stdio = StdioConfig { stdout: uri.clone(), stderr: uri, ..Default::default() };
            let (mut io, child) = ProcessIo::prepare(&stdio, dir.path(), "c1", "ns").unwrap();
            let mut c = spawn(child, "echo out; echo err >&2");
            io.attach().unwrap();
            assert!(wait_exit(&mut c, Duration::from_secs(5)).unwrap().success());
            assert!(io.wait_output(Duration::from_secs(5)));
        }
        let text = std::fs::read_to_string(&existing).unwrap();
        assert!(text.starts_with("old\n"), "{text:?}");
        let mut lines: Vec<_> = text.lines().skip(1).collect();
        lines.sort();
        assert_eq!(lines, ["err", "out"]);
        let mut lines: Vec<_> = std::fs::read_to_string(&fresh).unwrap().lines().map(str::to_string).collect();
        lines.sort();
        assert_eq!(lines, ["err", "out"]);
        assert_eq!(std::fs::metadata(&fresh).unwrap().permissions().mode() & 0o777, 0o644);
    }

    /// Percent-encodes everything but unreserved characters, for query values.
    fn encode(s: &str) -> String {
        s.bytes()
            .map(|b| match b {
                b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' | b'/' => (b as char).to_string(),
                _ => format!("%{b:02X}"),
            })
            .collect()
    }

    /// A shell logger given as `binary:///bin/sh?-c=SCRIPT` (no executable
    /// file is written, so no ETXTBSY from concurrently forked tests).
    fn logger_uri(script: &str) -> String {
        format!("binary:///bin/sh?-c={}&env.EXTRA=yes&env.CONTAINER_ID=evil", encode(script))
    }

    #[test]
    fn binary_uri_starts_logger_with_fds_and_env() {
        let _g = serial();
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path().join("log");
        let b = base.display();
        let script = format!(
            "PATH=/usr/bin:/bin; echo \"$CONTAINER_ID $CONTAINER_NAMESPACE $EXTRA [$HOME]\" > {b}.env; \
             exec 5>&-; cat <&3 > {b}.out & cat <&4 > {b}.err; wait"
        );
        let uri = logger_uri(&script);
        let stdio = StdioConfig { stdout: uri.clone(), stderr: uri, ..Default::default() };
        let (io, child) = ProcessIo::prepare(&stdio, dir.path(), "c1", "ns1").unwrap();
        // Ready means the logger ran up to closing fd 5.
        assert_eq!(std::fs::read_to_string(format!("{b}.env")).unwrap(), "c1 ns1 yes []\n");
        let pid = io.logger_pid().unwrap();
        assert!(child.stdin.is_none() && child.stdout.is_some() && child.stderr.is_some());
        let mut c = spawn(child, "echo out; echo err >&2");
        assert!(wait_exit(&mut c, Duration::from_secs(5)).unwrap().success());
        assert!(io.wait_output(Duration::ZERO), "nothing of ours to drain");
        // No reaper in tests: collect the logger ourselves; it ends at EOF.
        waitpid(Pid::from_raw(pid as i32), None).unwrap();
        assert_eq!(std::fs::read_to_string(format!("{b}.out")).unwrap(), "out\n");
        assert_eq!(std::fs::read_to_string(format!("{b}.err")).unwrap(), "err\n");
    }

    #[test]
    fn binary_logger_not_ready_times_out() {
        let _g = serial();
        let dir = tempfile::tempdir().unwrap();
        let pidfile = dir.path().join("pid");
        let uri = logger_uri(&format!("echo $$ > {}; exec sleep 30", pidfile.display()));
        let stdio = StdioConfig { stdout: uri, ..Default::default() };
        let t = Instant::now();
        let e = ProcessIo::prepare_with(&stdio, dir.path(), "c1", "ns", None, Duration::from_millis(300)).unwrap_err();
        assert!(matches!(e, IoError::Logger { .. }), "{e}");
        assert!(t.elapsed() < Duration::from_secs(5));
        // It was killed.
        let pid: i32 = std::fs::read_to_string(&pidfile).unwrap().trim().parse().unwrap();
        let st = waitpid(Pid::from_raw(pid), None).unwrap();
        assert!(matches!(st, nix::sys::wait::WaitStatus::Signaled(_, Signal::SIGKILL, _)), "{st:?}");
    }

    #[test]
    fn bad_destinations_are_rejected_before_anything_starts() {
        let _g = serial();
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("missing").display().to_string();
        for (stdio, invalid) in [
            (StdioConfig { stdout: "tcp://host/x".into(), ..Default::default() }, true),
            (StdioConfig { stdout: "binary://relative/logger".into(), ..Default::default() }, false),
            (StdioConfig { stdout: "binary://".into(), ..Default::default() }, true),
            (StdioConfig { stderr: "binary:///bin/logger".into(), ..Default::default() }, true),
            (StdioConfig { stdin: "file:///x".into(), ..Default::default() }, true),
            (StdioConfig { stdout: missing.clone(), ..Default::default() }, false),
            (StdioConfig { stdin: missing, ..Default::default() }, false),
            (StdioConfig { stdout: "binary:///nonexistent/logger".into(), ..Default::default() }, false),
        ] {
            let e = ProcessIo::prepare(&stdio, dir.path(), "c1", "ns").unwrap_err();
            assert_eq!(e.is_invalid_argument(), invalid, "{stdio:?}: {e}");
        }
        // A relative binary path is host-relative to Go but rejected by us.
        let e = parse_dest("stdout", "binary://relative/logger").unwrap();
        assert_eq!(e, Dest::Binary(BinaryUri { path: "/logger".into(), args: vec![], env: vec![] }));
    }

    #[test]
    fn parses_stdio_strings_like_containerd() {
        assert_eq!(parse_dest("stdout", "").unwrap(), Dest::Null);
        assert_eq!(parse_dest("stdout", "/run/x/stdout").unwrap(), Dest::Path("/run/x/stdout".into()));
        assert_eq!(parse_dest("stdout", "fifo:///run/x/out").unwrap(), Dest::Path("/run/x/out".into()));
        assert_eq!(parse_dest("stdout", "file:///var/log/a%20b.log").unwrap(), Dest::File("/var/log/a b.log".into()));
        assert_eq!(
            parse_dest(
                "stdout",
                "binary:///usr/bin/logger?id=a+b&--debug&path=%2Ftmp&env.K=v%3D1&env.CONTAINER_NAMESPACE=x#f"
            )
            .unwrap(),
            Dest::Binary(BinaryUri {
                path: "/usr/bin/logger".into(),
                args: vec!["id".into(), "a b".into(), "--debug".into(), "path".into(), "/tmp".into()],
                env: vec![("K".into(), "v=1".into())],
            })
        );
        assert!(parse_dest("stdout", "binary:///x?a=%zz").unwrap_err().is_invalid_argument());
        assert_eq!(parse_stdin("/run/x/in").unwrap(), Some(PathBuf::from("/run/x/in")));
        assert_eq!(parse_stdin("").unwrap(), None);
    }

    fn set_cloexec(fd: &OwnedFd) {
        fcntl(fd, FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC)).unwrap();
    }

    /// Plays runc: connects to the console socket and sends a fresh pty
    /// master; returns the slave (the container's terminal).
    fn send_pty(sock: PathBuf) -> JoinHandle<OwnedFd> {
        thread::spawn(move || {
            let pty = nix::pty::openpty(None, None).unwrap();
            set_cloexec(&pty.master);
            set_cloexec(&pty.slave);
            let stream = UnixStream::connect(&sock).unwrap();
            let iov = [IoSlice::new(b"/dev/pts/test")];
            let fds = [pty.master.as_raw_fd()];
            sendmsg::<()>(stream.as_raw_fd(), &iov, &[ControlMessage::ScmRights(&fds)], MsgFlags::empty(), None)
                .unwrap();
            pty.slave
        })
    }

    fn winsize(fd: &impl AsRawFd) -> (u16, u16) {
        let mut ws = libc::winsize { ws_row: 0, ws_col: 0, ws_xpixel: 0, ws_ypixel: 0 };
        // SAFETY: TIOCGWINSZ writes one winsize to a valid pointer.
        assert_eq!(unsafe { libc::ioctl(fd.as_raw_fd(), libc::TIOCGWINSZ, &mut ws as *mut libc::winsize) }, 0);
        (ws.ws_col, ws.ws_row)
    }

    #[test]
    fn terminal_copies_through_console_socket() {
        let _g = serial();
        let dir = tempfile::tempdir().unwrap();
        let (i, o) = (fifo(dir.path(), "in"), fifo(dir.path(), "out"));
        let out = OutReader::open(&o);
        let stdio = StdioConfig {
            stdin: i.to_str().unwrap().into(),
            stdout: o.to_str().unwrap().into(),
            stderr: String::new(),
            terminal: true,
        };
        let (mut io, child) = ProcessIo::prepare(&stdio, dir.path(), "t1", "ns").unwrap();
        assert!(child.stdin.is_none() && child.stdout.is_none() && child.stderr.is_none());
        let sock = io.console_socket().unwrap().to_path_buf();
        assert!(sock.starts_with(dir.path()), "{}", sock.display());
        assert!(std::fs::symlink_metadata(&sock).unwrap().file_type().is_socket());
        let slave = send_pty(sock.clone());
        io.attach().unwrap();
        let slave = File::from(slave.join().unwrap());
        assert!(io.console_socket().is_none());
        assert!(!sock.exists() && !sock.parent().unwrap().exists(), "console socket left behind");
        let out = out.start();

        // Container output reaches the stdout FIFO (ONLCR turns \n into \r\n).
        (&slave).write_all(b"hello\n").unwrap();
        // containerd's input reaches the container.
        let mut w = stdin_writer(&i);
        w.write_all(b"typed\n").unwrap();
        let mut line = String::new();
        BufReader::new(&slave).read_line(&mut line).unwrap();
        assert_eq!(line, "typed\n");

        io.resize(100, 30).unwrap();
        assert_eq!(winsize(&slave), (100, 30));

        // CloseIO (after containerd's writer is gone) types VEOF: the reader sees EOF.
        drop(w);
        io.close_stdin();
        let mut buf = [0u8; 16];
        assert_eq!((&slave).read(&mut buf).unwrap(), 0);

        drop(slave); // the container exits
        assert!(io.wait_output(Duration::from_secs(5)));
        let text = String::from_utf8(out.join().unwrap()).unwrap();
        assert!(text.contains("hello\r\n"), "{text:?}");
        assert!(text.contains("typed\r\n"), "echo missing: {text:?}");
    }

    #[test]
    fn terminal_attach_times_out_without_runtime() {
        let _g = serial();
        let dir = tempfile::tempdir().unwrap();
        let o = fifo(dir.path(), "out");
        let _out = OutReader::open(&o);
        let stdio = StdioConfig { stdout: o.to_str().unwrap().into(), terminal: true, ..Default::default() };
        let (mut io, _) = ProcessIo::prepare(&stdio, dir.path(), "t1", "ns").unwrap();
        io.console_timeout = Duration::from_millis(200);
        let sock = io.console_socket().unwrap().to_path_buf();
        let e = io.attach().unwrap_err();
        assert!(matches!(e, IoError::Console { .. }), "{e}");
        assert!(!sock.exists());
        io.attach().unwrap(); // nothing left to attach
        assert!(io.wait_output(Duration::ZERO));
    }

    #[test]
    fn console_socket_avoids_too_long_work_dir() {
        let _g = serial();
        let long = std::env::temp_dir().join("k".repeat(120));
        let s = ConsoleSocket::new(&long).unwrap();
        assert!(s.path.as_os_str().len() <= MAX_SOCKET_PATH);
        assert!(!s.path.starts_with(&long));
        let path = s.path.clone();
        drop(s);
        assert!(!path.exists());
        let _ = std::fs::remove_dir(&long);
    }

    #[test]
    fn wait_output_is_bounded_when_a_grandchild_holds_the_pipe() {
        let _g = serial();
        let dir = tempfile::tempdir().unwrap();
        let o = fifo(dir.path(), "out");
        let out = OutReader::open(&o);
        let stdio = StdioConfig { stdout: o.to_str().unwrap().into(), ..Default::default() };
        let (mut io, child) = ProcessIo::prepare(&stdio, dir.path(), "c1", "ns").unwrap();
        fcntl(&out.0, FcntlArg::F_SETFL(OFlag::empty())).unwrap();
        let mut reader = BufReader::new(out.0);
        let mut c = spawn(child, "sleep 30 & echo $!");
        io.attach().unwrap();
        let mut line = String::new();
        reader.read_line(&mut line).unwrap();
        let daemon = Pid::from_raw(line.trim().parse().unwrap());
        assert!(wait_exit(&mut c, Duration::from_secs(5)).unwrap().success());
        let t = Instant::now();
        assert!(!io.wait_output(Duration::from_millis(200)));
        assert!(t.elapsed() < Duration::from_secs(2));
        let t = Instant::now();
        drop(io);
        assert!(t.elapsed() < Duration::from_secs(1), "drop took {:?}", t.elapsed());
        // Our writer is closed, so the client sees EOF although the daemon lives on.
        let mut rest = Vec::new();
        reader.read_to_end(&mut rest).unwrap();
        let _ = kill(daemon, Signal::SIGKILL);
    }

    fn open_fds() -> Vec<(RawFd, String)> {
        let mut fds: Vec<_> = std::fs::read_dir("/proc/self/fd")
            .unwrap()
            .filter_map(|e| {
                let e = e.ok()?;
                let fd: RawFd = e.file_name().to_str()?.parse().ok()?;
                let target = std::fs::read_link(e.path()).ok()?;
                Some((fd, target.display().to_string()))
            })
            .collect();
        fds.sort();
        fds
    }

    /// One full cycle of each kind of IO, with every handle closed at the end.
    fn exercise_all_kinds(dir: &Path, check_cloexec: &dyn Fn(&str)) {
        // Pipes.
        let (i, o, e) = (fifo(dir, "in"), fifo(dir, "out"), fifo(dir, "err"));
        let (out, err) = (OutReader::open(&o), OutReader::open(&e));
        let (mut io, child) = ProcessIo::prepare(&cfg(&i, &o, &e), dir, "c1", "ns").unwrap();
        io.attach().unwrap();
        check_cloexec("pipes");
        let (out, err) = (out.start(), err.start());
        let mut c = spawn(child, "cat; echo err >&2");
        io.close_stdin();
        assert!(wait_exit(&mut c, Duration::from_secs(5)).is_some());
        assert!(io.wait_output(Duration::from_secs(5)));
        drop(io);
        assert_eq!(out.join().unwrap(), b"");
        assert_eq!(err.join().unwrap(), b"err\n");

        // Terminal.
        let out = OutReader::open(&o);
        let stdio = StdioConfig {
            stdin: cfg(&i, &o, &e).stdin,
            stdout: cfg(&i, &o, &e).stdout,
            terminal: true,
            ..Default::default()
        };
        let (mut io, _) = ProcessIo::prepare(&stdio, dir, "t1", "ns").unwrap();
        let slave = send_pty(io.console_socket().unwrap().to_path_buf());
        io.attach().unwrap();
        let slave = slave.join().unwrap();
        check_cloexec("terminal");
        let out = out.start();
        drop(slave);
        assert!(io.wait_output(Duration::from_secs(5)));
        drop(io);
        out.join().unwrap();

        // Terminal that never attaches, and one that is dropped while copying.
        let (io, _) = ProcessIo::prepare(&stdio, dir, "t2", "ns").unwrap();
        drop(io);
        let (mut io, _) = ProcessIo::prepare(&stdio, dir, "t3", "ns").unwrap();
        let slave = send_pty(io.console_socket().unwrap().to_path_buf());
        io.attach().unwrap();
        drop(io);
        drop(slave.join().unwrap());

        // Logger.
        let uri = logger_uri("exec 5>&-; exec cat <&3 >/dev/null");
        let (io, child) =
            ProcessIo::prepare(&StdioConfig { stdout: uri, ..Default::default() }, dir, "c1", "ns").unwrap();
        check_cloexec("logger");
        let pid = io.logger_pid().unwrap();
        drop((io, child));
        waitpid(Pid::from_raw(pid as i32), None).unwrap();

        // Failures half-way through prepare.
        let missing = dir.join("missing").display().to_string();
        let stdio = StdioConfig { stdin: i.display().to_string(), stdout: missing, ..Default::default() };
        assert!(ProcessIo::prepare(&stdio, dir, "c1", "ns").is_err());
    }

    /// Runs in a fresh test process (see `fd_hygiene`): other tests of the
    /// crate open fds concurrently, which would make the counts meaningless.
    #[test]
    #[ignore = "run by fd_hygiene in its own process"]
    fn fd_hygiene_child() {
        if std::env::var_os("KYB_IO_FD_HYGIENE").is_none() {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let before = open_fds();
        let check_cloexec = |what: &str| {
            for (fd, target) in open_fds().into_iter().filter(|f| !before.contains(f)) {
                // SAFETY: only reads the flags of an fd we just listed as open.
                let flags = unsafe { libc::fcntl(fd, libc::F_GETFD) };
                assert!(flags < 0 || flags & libc::FD_CLOEXEC != 0, "{what}: fd {fd} ({target}) is inheritable");
            }
        };
        exercise_all_kinds(dir.path(), &check_cloexec);
        assert_eq!(open_fds(), before, "fds leaked");
    }

    #[test]
    fn fd_hygiene() {
        let _g = serial();
        let name = format!("{}::fd_hygiene_child", module_path!().split_once("::").map_or("", |(_, m)| m));
        let exe = std::env::current_exe().unwrap();
        let out = Command::new(exe)
            .args([name.as_str(), "--exact", "--ignored", "--nocapture", "--test-threads=1"])
            .env("KYB_IO_FD_HYGIENE", "1")
            .output()
            .unwrap();
        let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        assert!(out.status.success(), "{text}");
        assert!(text.contains("1 passed"), "child test did not run: {text}");
    }
}
