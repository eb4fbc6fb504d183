//! The CRIU proxy of a restore: how the restored process is held until every byte it was
//! restored from is verified, while the verification itself overlaps CRIU's work.
//!
//! At Create the shim verifies what it reads or applies itself and starts hashing the memory
//! pages in the background (`kybernate_checkpoint::deferred`). At Start it runs `runc --criu
//! <this binary> restore`: runc starts us as `<binary> swrk 3` (runc ≥ 1.2 ignores `--criu` and
//! runs `criu` from PATH, so a `criu` link to us heads runc's PATH too), we start the real CRIU
//! as `criu swrk 3` on a socketpair of ours and relay every message both ways unchanged, file
//! descriptors (SCM_RIGHTS) included.
//!
//! The hold is CRIU's `post-restore` notification: CRIU sends it once every task is restored
//! (all memory read) and before any of them runs a single instruction of its own, and it aborts
//! the restore, killing the restored tree, when the answer is a failure. `pre-resume` comes
//! later but CRIU only logs a failed answer to it and resumes the tasks anyway (cr-restore.c),
//! so it cannot stop anything. At `post-restore` we ask the shim for its verdict over a unix
//! socket in the bundle ([`VerdictServer`]): verified, and the notification goes on to runc;
//! failed, no answer in time, or the shim gone, and CRIU gets a failed answer from us (runc never
//! sees the notification), aborts, and runc reports the failed restore, whose cleanup the shim's
//! restore guard does. The error the user sees is the verification's, naming the file.
//!
//! Every CRIU that speaks RPC notifications sends `post-restore` when runc asks for
//! notifications (runc always does for a restore); a RESTORE request without `notify_scripts` is
//! refused before CRIU starts. Should a RESTORE answer still arrive before any hold, it is passed
//! on only once the verdict is in, and a failed verdict kills the restored tree and fails the
//! restore.
//!
//! Two details of CRIU's RPC matter for a proxy: CRIU opens the images and work directories as
//! `/proc/<peer pid>/fd/<n>`, the peer being whoever created its socketpair (us); so runc's
//! descriptors named in the request are mirrored into this process under the same numbers. And
//! runc moves CRIU's process (us) into the container's cgroup before it sends its request, so
//! the real CRIU is started only after that request arrives, inside that cgroup.
//!
//! Nothing here trusts the container or a client: the real CRIU's path and the verdict socket
//! come from the environment the shim gave runc; the socket lives in the bundle, which only root
//! can write; the verdict is taken only from a peer with our own uid; and anything missing or
//! unexpected fails the restore, never lets it go on unverified.

use std::ffi::{OsStr, OsString};
use std::io::{self, IoSlice, IoSliceMut, Read, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use kybernate_checkpoint::deferred::{Pending, Verdict};
use nix::errno::Errno;
use nix::fcntl::{fcntl, FcntlArg, FdFlag, OFlag};
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::socket::{
    getsockopt, recvmsg, sendmsg, shutdown, socketpair, sockopt, AddressFamily, ControlMessage, ControlMessageOwned,
    MsgFlags, Shutdown, SockFlag, SockType,
};

use crate::error::{CheckpointError, Error};
use crate::runtime::OciRuntime;

/// `argv[1]` of the proxy mode: what runc passes CRIU (`criu swrk <fd>`).
pub const PROXY_MODE: &str = "swrk";
/// The real CRIU binary (absolute path), set by the shim on the runtime's environment.
pub const CRIU_ENV: &str = "KYBERNATE_CRIU_PROXY_CRIU";
/// The shim's verdict socket for this restore.
pub const VERDICT_ENV: &str = "KYBERNATE_CRIU_PROXY_VERDICT";
/// How long the proxy waits for the verdict, in seconds.
pub const TIMEOUT_ENV: &str = "KYBERNATE_CRIU_PROXY_TIMEOUT";
/// Where the proxy writes what went wrong (its stderr is the container's).
pub const LOG_ENV: &str = "KYBERNATE_CRIU_PROXY_LOG";
/// Names in the bundle: the verdict socket, the proxy's log, the dir with the `criu` link.
pub const VERDICT_SOCKET: &str = "criu-verdict.sock";
pub const PROXY_LOG: &str = "criu-proxy.log";
pub const PROXY_PATH_DIR: &str = "criu-proxy";
/// The largest message relayed; runc reads CRIU's with a 40 KiB buffer.
pub const MAX_MESSAGE: usize = 64 * 1024;
/// The most descriptors one message may carry (CRIU sends one, with `orphan-pts-master`).
const MAX_FDS: usize = 16;
/// The verdict wait when the shim names none: the shim answers as soon as the hashing ends, and
/// at once when it is gone; this bounds a shim that hangs.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30 * 60);

/// CRIU's request and response types (images/rpc.proto, `criu_req_type`).
const RESTORE: u64 = 2;
const NOTIFY: u64 = 6;
const POST_RESTORE: &str = "post-restore";

#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: io::Error,
    },
    /// A message that is not what CRIU's RPC protocol allows.
    #[error("{0}")]
    Protocol(String),
    /// The proxy was not started the way the shim starts it.
    #[error("{0}")]
    Setup(String),
}

fn os(what: impl Into<String>) -> impl FnOnce(Errno) -> ProxyError {
    let what = what.into();
    move |e| ProxyError::Io { what, source: io::Error::from(e) }
}

// ---------------------------------------------------------------------------------------------
// The few protobuf fields the proxy reads (proto2 wire format, images/rpc.proto)

/// One field of a protobuf message: a varint, or the bytes of a length-delimited one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Field<'a> {
    Varint(u64),
    Bytes(&'a [u8]),
    Fixed,
}

fn varint(buf: &[u8], at: &mut usize) -> Result<u64, ProxyError> {
    let mut v = 0u64;
    for shift in (0..70).step_by(7) {
        let b = *buf.get(*at).ok_or_else(|| ProxyError::Protocol("truncated varint".into()))?;
        *at += 1;
        v |= u64::from(b & 0x7f) << shift.min(63);
        if b & 0x80 == 0 {
            return Ok(v);
        }
    }
    Err(ProxyError::Protocol("varint longer than 10 bytes".into()))
}

/// The fields of `buf`, in order.
fn fields(buf: &[u8]) -> Result<Vec<(u64, Field<'_>)>, ProxyError> {
    let mut out = Vec::new();
    let mut at = 0;
    while at < buf.len() {
        let key = varint(buf, &mut at)?;
        let (number, wire) = (key >> 3, key & 7);
        let take = |at: &mut usize, n: usize| -> Result<&[u8], ProxyError> {
            let end = at.checked_add(n).filter(|e| *e <= buf.len());
            let end = end.ok_or_else(|| ProxyError::Protocol(format!("field {number} runs past the message")))?;
            let bytes = &buf[*at..end];
            *at = end;
            Ok(bytes)
        };
        let field = match wire {
            0 => Field::Varint(varint(buf, &mut at)?),
            1 => take(&mut at, 8).map(|_| Field::Fixed)?,
            2 => {
                let len = usize::try_from(varint(buf, &mut at)?).unwrap_or(usize::MAX);
                Field::Bytes(take(&mut at, len)?)
            }
            5 => take(&mut at, 4).map(|_| Field::Fixed)?,
            other => return Err(ProxyError::Protocol(format!("field {number} has wire type {other}"))),
        };
        out.push((number, field));
    }
    Ok(out)
}

fn int32(v: u64) -> i32 {
    v as i64 as i32
}

/// What the proxy needs of runc's `criu_req`.
#[derive(Debug, Default, PartialEq, Eq)]
struct Request {
    kind: u64,
    /// `opts.images_dir_fd`, `opts.work_dir_fd`, `opts.status_fd`: runc's descriptors CRIU opens
    /// through `/proc/<peer>/fd`.
    peer_fds: Vec<RawFd>,
    notify_scripts: bool,
}

fn parse_request(buf: &[u8]) -> Result<Request, ProxyError> {
    let mut r = Request::default();
    for (number, field) in fields(buf)? {
        match (number, field) {
            (1, Field::Varint(v)) => r.kind = v,
            (2, Field::Bytes(opts)) => {
                for (n, f) in fields(opts)? {
                    match (n, f) {
                        (1 | 17 | 49, Field::Varint(v)) if int32(v) >= 0 => r.peer_fds.push(int32(v)),
                        (12, Field::Varint(v)) => r.notify_scripts = v != 0,
                        _ => {}
                    }
                }
            }
            _ => {}
        }
    }
    r.peer_fds.sort_unstable();
    r.peer_fds.dedup();
    Ok(r)
}

/// What the proxy needs of CRIU's `criu_resp`.
#[derive(Debug, Default, PartialEq, Eq)]
struct Response {
    kind: u64,
    success: bool,
    /// `notify.script`.
    script: Option<String>,
    /// `restore.pid`: the restored tree's root.
    restored_pid: Option<i32>,
}

fn parse_response(buf: &[u8]) -> Result<Response, ProxyError> {
    let mut r = Response::default();
    for (number, field) in fields(buf)? {
        match (number, field) {
            (1, Field::Varint(v)) => r.kind = v,
            (2, Field::Varint(v)) => r.success = v != 0,
            (4, Field::Bytes(restore)) => {
                for (n, f) in fields(restore)? {
                    if let (1, Field::Varint(v)) = (n, f) {
                        r.restored_pid = Some(int32(v));
                    }
                }
            }
            (5, Field::Bytes(notify)) => {
                for (n, f) in fields(notify)? {
                    if let (1, Field::Bytes(s)) = (n, f) {
                        r.script = Some(String::from_utf8_lossy(s).into_owned());
                    }
                }
            }
            _ => {}
        }
    }
    Ok(r)
}

/// `criu_req { type: NOTIFY, notify_success }`: the answer to a notification.
fn notify_answer(success: bool) -> Vec<u8> {
    vec![0x08, NOTIFY as u8, 0x18, u8::from(success)]
}

/// `criu_resp { type, success: false, cr_errmsg }`: a failure for runc.
fn failure_response(kind: u64, message: &str) -> Vec<u8> {
    let mut out = vec![0x08];
    put_varint(&mut out, kind);
    out.extend([0x10, 0x00, 0x4a]);
    let msg = &message.as_bytes()[..message.len().min(4096)];
    put_varint(&mut out, msg.len() as u64);
    out.extend_from_slice(msg);
    out
}

fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

// ---------------------------------------------------------------------------------------------
// Messages on SOCK_SEQPACKET sockets

/// One message with the descriptors it carried (closed when dropped, after forwarding).
#[derive(Debug, Default)]
pub struct Message {
    pub data: Vec<u8>,
    pub fds: Vec<OwnedFd>,
}

/// The next message on `fd`; `None` at end of file. A message over [`MAX_MESSAGE`] bytes or with
/// more than 16 descriptors is an error (the kernel would have cut it).
pub fn recv(fd: BorrowedFd<'_>) -> Result<Option<Message>, ProxyError> {
    let mut buf = vec![0u8; MAX_MESSAGE];
    let mut space = nix::cmsg_space!([RawFd; MAX_FDS]);
    loop {
        let mut iov = [IoSliceMut::new(&mut buf)];
        match recvmsg::<()>(fd.as_raw_fd(), &mut iov, Some(&mut space), MsgFlags::MSG_CMSG_CLOEXEC) {
            Ok(msg) => {
                let mut fds = Vec::new();
                let cmsgs = msg.cmsgs();
                if let Ok(cmsgs) = cmsgs {
                    for c in cmsgs {
                        if let ControlMessageOwned::ScmRights(raw) = c {
                            // SAFETY: the kernel just installed these descriptors for us; nobody
                            // else owns them.
                            fds.extend(raw.into_iter().map(|fd| unsafe { OwnedFd::from_raw_fd(fd) }));
                        }
                    }
                }
                let (bytes, flags) = (msg.bytes, msg.flags);
                if flags.contains(MsgFlags::MSG_TRUNC) {
                    return Err(ProxyError::Protocol(format!("a message over {MAX_MESSAGE} bytes")));
                }
                if flags.contains(MsgFlags::MSG_CTRUNC) {
                    return Err(ProxyError::Protocol(format!("a message with more than {MAX_FDS} descriptors")));
                }
                if bytes == 0 && fds.is_empty() {
                    return Ok(None);
                }
                buf.truncate(bytes);
                return Ok(Some(Message { data: buf, fds }));
            }
            Err(Errno::EINTR) => {}
            // The peer closed with our last message unread: it is gone, as at end of file.
            Err(Errno::ECONNRESET) => return Ok(None),
            Err(e) => return Err(os("receive a message")(e)),
        }
    }
}

/// Sends `m` on `fd`, its descriptors with it.
pub fn send(fd: BorrowedFd<'_>, m: &Message) -> Result<(), ProxyError> {
    let raw: Vec<RawFd> = m.fds.iter().map(AsRawFd::as_raw_fd).collect();
    let cmsgs = if raw.is_empty() { vec![] } else { vec![ControlMessage::ScmRights(&raw)] };
    loop {
        match sendmsg::<()>(fd.as_raw_fd(), &[IoSlice::new(&m.data)], &cmsgs, MsgFlags::MSG_NOSIGNAL, None) {
            Ok(_) => return Ok(()),
            Err(Errno::EINTR) => {}
            Err(e) => return Err(os("send a message")(e)),
        }
    }
}

fn send_data(fd: BorrowedFd<'_>, data: Vec<u8>) -> Result<(), ProxyError> {
    send(fd, &Message { data, fds: vec![] })
}

// ---------------------------------------------------------------------------------------------
// The relay

/// Where the proxy gets its verdict from.
pub trait Gate {
    /// `Ok` once every byte is verified; `Err` with why not (failed, timed out, shim gone).
    fn verdict(&self) -> Result<(), String>;
}

/// How a relayed session ended.
#[derive(Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Relayed to the end.
    Done,
    /// The restore was stopped: CRIU was told to abort (or its tree killed), and runc got a
    /// failure.
    Refused(String),
}

#[derive(Debug, PartialEq, Eq)]
enum Hold {
    /// Not a restore: nothing to hold.
    None,
    /// A restore not yet verified.
    Waiting,
    Verified,
    Refused(String),
}

/// Relays `first` (runc's request) to CRIU, then every message both ways until CRIU closes its
/// socket; a restore is held at `post-restore` until `gate` answers.
pub fn relay(
    runc: BorrowedFd<'_>,
    criu: BorrowedFd<'_>,
    first: Message,
    gate: &dyn Gate,
) -> Result<Outcome, ProxyError> {
    let request = parse_request(&first.data)?;
    let mut hold = if request.kind == RESTORE { Hold::Waiting } else { Hold::None };
    send(criu, &first)?;
    drop(first);
    let mut runc_open = true;
    loop {
        let mut polled = vec![PollFd::new(criu, PollFlags::POLLIN)];
        if runc_open {
            polled.push(PollFd::new(runc, PollFlags::POLLIN));
        }
        match poll(&mut polled, PollTimeout::NONE) {
            Ok(_) => {}
            Err(Errno::EINTR) => continue,
            Err(e) => return Err(os("poll the runtime's and CRIU's sockets")(e)),
        }
        let ready = |p: &PollFd<'_>| p.revents().is_some_and(|r| !r.is_empty());
        let (criu_ready, runc_ready) = (ready(&polled[0]), polled.get(1).is_some_and(ready));
        drop(polled);
        if criu_ready {
            match recv(criu)? {
                None => break,
                Some(msg) => from_criu(runc, criu, msg, &mut hold, gate)?,
            }
        }
        if runc_ready {
            match recv(runc)? {
                Some(msg) => send(criu, &msg)?,
                None => {
                    // runc is done (it closes its write side after CRIU's answer): so is CRIU.
                    runc_open = false;
                    let _ = shutdown(criu.as_raw_fd(), Shutdown::Write);
                }
            }
        }
    }
    Ok(match hold {
        Hold::Refused(why) => Outcome::Refused(why),
        _ => Outcome::Done,
    })
}

/// One message from CRIU: passed on, or held for the verdict.
fn from_criu(
    runc: BorrowedFd<'_>,
    criu: BorrowedFd<'_>,
    msg: Message,
    hold: &mut Hold,
    gate: &dyn Gate,
) -> Result<(), ProxyError> {
    if *hold == Hold::None {
        return send(runc, &msg);
    }
    let resp = match parse_response(&msg.data) {
        Ok(r) => r,
        Err(e) => {
            if *hold == Hold::Verified {
                return send(runc, &msg);
            }
            // Not knowing what CRIU said, we cannot let the restore go on: its next read of
            // our answer fails when we close, and CRIU aborts.
            return Err(ProxyError::Protocol(format!("an unreadable message from CRIU during a restore: {e}")));
        }
    };
    match (&*hold, resp.kind, resp.script.as_deref()) {
        (Hold::Waiting, NOTIFY, Some(POST_RESTORE)) => match gate.verdict() {
            Ok(()) => {
                *hold = Hold::Verified;
                send(runc, &msg)
            }
            Err(why) => {
                // CRIU aborts on a failed post-restore answer and kills what it restored; runc
                // never hears of the notification and gets CRIU's failed RESTORE answer.
                *hold = Hold::Refused(why);
                send_data(criu, notify_answer(false))
            }
        },
        // After a refusal nothing more is asked of runc: every notification fails.
        (Hold::Refused(_), NOTIFY, _) => send_data(criu, notify_answer(false)),
        (Hold::Verified, _, _) => send(runc, &msg),
        (_, RESTORE, _) if !resp.success => send(runc, &msg),
        (Hold::Waiting, RESTORE, _) => {
            // A RESTORE answer before any hold (a CRIU without post-restore): pass it on only
            // once verified, else kill the restored tree and fail the restore.
            match gate.verdict() {
                Ok(()) => {
                    *hold = Hold::Verified;
                    send(runc, &msg)
                }
                Err(why) => {
                    kill_tree(resp.restored_pid);
                    let text = format!("the restored processes were killed: {why}");
                    *hold = Hold::Refused(why);
                    send_data(runc, failure_response(RESTORE, &text))
                }
            }
        }
        (Hold::Refused(why), RESTORE, _) => {
            // CRIU said success despite the failed answer: it must not stand.
            kill_tree(resp.restored_pid);
            let text = format!("the restored processes were killed: {why}");
            send_data(runc, failure_response(RESTORE, &text))
        }
        _ => send(runc, &msg),
    }
}

/// SIGKILL to a restored tree's root (its pid namespace's init: the whole tree goes with it).
fn kill_tree(pid: Option<i32>) {
    if let Some(pid) = pid.filter(|p| *p > 1) {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL);
    }
}

// ---------------------------------------------------------------------------------------------
// The proxy process

/// The verdict over the shim's socket ([`VerdictServer`]).
pub struct SocketGate {
    pub path: PathBuf,
    pub timeout: Duration,
}

impl Gate for SocketGate {
    fn verdict(&self) -> Result<(), String> {
        let stream = connect_short(&self.path)
            .map_err(|e| format!("cannot reach the shim's verdict socket {}: {e}", self.path.display()))?;
        let peer = getsockopt(&stream, sockopt::PeerCredentials)
            .map_err(|e| format!("cannot tell who serves {}: {e}", self.path.display()))?;
        if peer.uid() != nix::unistd::geteuid().as_raw() {
            return Err(format!("{} is served by uid {}, not by the shim", self.path.display(), peer.uid()));
        }
        read_verdict(stream, self.timeout)
    }
}

/// Reads one verdict line within `timeout`.
fn read_verdict(mut stream: UnixStream, timeout: Duration) -> Result<(), String> {
    let deadline = Instant::now() + timeout;
    let mut line = Vec::new();
    let mut buf = [0u8; 1024];
    while !line.contains(&b'\n') && line.len() < 8192 {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(format!("no verdict from the shim within {} s", timeout.as_secs()));
        }
        let _ = stream.set_read_timeout(Some(left));
        match stream.read(&mut buf) {
            Ok(0) => return Err("the shim closed the verdict socket without a verdict (gone?)".into()),
            Ok(n) => line.extend_from_slice(&buf[..n]),
            Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => {
                return Err(format!("no verdict from the shim within {} s", timeout.as_secs()))
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(format!("reading the verdict: {e}")),
        }
    }
    let text = String::from_utf8_lossy(&line);
    let text = text.lines().next().unwrap_or_default();
    match text.split_once(' ').unwrap_or((text, "")) {
        ("verified", _) => Ok(()),
        ("failed", why) => Err(why.to_string()),
        _ => Err(format!("not a verdict: {text:?}")),
    }
}

/// Connects to a socket whose path may be longer than a sockaddr_un holds (CRI's 64-hex ids
/// make bundle paths that are): through `/proc/self/fd/<dir>/<name>`.
fn connect_short(path: &Path) -> io::Result<UnixStream> {
    let (dir, name) = split(path)?;
    let dir = open_dir(dir)?;
    UnixStream::connect(Path::new(&format!("/proc/self/fd/{}", dir.as_raw_fd())).join(name))
}

fn bind_short(path: &Path) -> io::Result<UnixListener> {
    let (dir, name) = split(path)?;
    let dir = open_dir(dir)?;
    UnixListener::bind(Path::new(&format!("/proc/self/fd/{}", dir.as_raw_fd())).join(name))
}

fn split(path: &Path) -> io::Result<(&Path, &OsStr)> {
    match (path.parent(), path.file_name()) {
        (Some(dir), Some(name)) => Ok((dir, name)),
        _ => Err(io::Error::new(io::ErrorKind::InvalidInput, format!("{}: not a socket path", path.display()))),
    }
}

fn open_dir(dir: &Path) -> io::Result<OwnedFd> {
    let fd =
        nix::fcntl::open(dir, OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC, nix::sys::stat::Mode::empty())?;
    Ok(fd)
}

/// The proxy's log: a file the shim named (its stderr belongs to the container).
struct ProxyLog(Option<PathBuf>);

impl ProxyLog {
    fn line(&self, text: &str) {
        let Some(path) = &self.0 else { return };
        let file = std::fs::OpenOptions::new().create(true).append(true).open(path);
        if let Ok(mut f) = file {
            let _ = writeln!(f, "{text}");
        }
    }
}

/// The proxy mode (`<shim> swrk <fd>`, started by runc in CRIU's place): returns the exit code.
pub fn serve(args: &[OsString]) -> i32 {
    let log = ProxyLog(std::env::var_os(LOG_ENV).map(PathBuf::from));
    match run_proxy(args, &log) {
        Ok(code) => code,
        Err(e) => {
            log.line(&format!("criu proxy: {e}"));
            1
        }
    }
}

fn run_proxy(args: &[OsString], log: &ProxyLog) -> Result<i32, ProxyError> {
    let n: RawFd = match args {
        [mode, fd] if mode == PROXY_MODE => fd
            .to_str()
            .and_then(|s| s.parse().ok())
            .filter(|n| *n > 2)
            .ok_or_else(|| ProxyError::Setup(format!("not a descriptor number: {fd:?}")))?,
        _ => return Err(ProxyError::Setup(format!("usage: {PROXY_MODE} <fd> (as runc starts CRIU), got {args:?}"))),
    };
    // SAFETY: runc passed us this descriptor for this purpose; nothing else here uses it.
    let runc = unsafe { OwnedFd::from_raw_fd(n) };
    match getsockopt(&runc, sockopt::SockType) {
        Ok(SockType::SeqPacket) => {}
        _ => return Err(ProxyError::Setup(format!("descriptor {n} is not runc's SOCK_SEQPACKET socket"))),
    }
    fcntl(&runc, FcntlArg::F_SETFD(FdFlag::FD_CLOEXEC)).map_err(os("mark runc's socket close-on-exec"))?;
    let criu_bin = std::env::var_os(CRIU_ENV).map(PathBuf::from).filter(|p| p.is_absolute());
    let Some(criu_bin) = criu_bin else {
        return Err(ProxyError::Setup(format!("{CRIU_ENV} names no absolute CRIU path: not started by the shim")));
    };

    // runc moves us into the container's cgroup before it sends its request: CRIU starts after.
    let Some(first) = recv(runc.as_fd())? else { return Ok(1) };
    let request = parse_request(&first.data)?;
    let gate = if request.kind == RESTORE {
        let refuse = |why: String| -> Result<i32, ProxyError> {
            log.line(&format!("criu proxy: restore refused: {why}"));
            send_data(runc.as_fd(), failure_response(RESTORE, &why))?;
            Ok(1)
        };
        let Some(path) = std::env::var_os(VERDICT_ENV).map(PathBuf::from) else {
            return refuse(format!("{VERDICT_ENV} is not set: nobody verifies this restore"));
        };
        if !request.notify_scripts {
            return refuse(
                "the restore request asks for no CRIU notifications: it could not be held until verified".into(),
            );
        }
        let timeout = std::env::var(TIMEOUT_ENV)
            .ok()
            .and_then(|s| s.parse::<u64>().ok())
            .map_or(DEFAULT_TIMEOUT, Duration::from_secs);
        Some(SocketGate { path, timeout })
    } else {
        None
    };

    let runc_pid = getsockopt(&runc, sockopt::PeerCredentials).map_err(os("read runc's credentials"))?.pid();
    let (runc, _mirrors) = mirror(runc, runc_pid, &request.peer_fds)?;
    let (ours, theirs) = socketpair(AddressFamily::Unix, SockType::SeqPacket, None, SockFlag::SOCK_CLOEXEC)
        .map_err(os("create CRIU's socketpair"))?;
    let theirs_raw = theirs.as_raw_fd();
    let mut cmd = std::process::Command::new(&criu_bin);
    cmd.arg(PROXY_MODE).arg(n.to_string());
    for key in [CRIU_ENV, VERDICT_ENV, TIMEOUT_ENV, LOG_ENV] {
        cmd.env_remove(key);
    }
    // SAFETY: only dup2 and fcntl, which are async-signal-safe, between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            if theirs_raw == n {
                if libc::fcntl(n, libc::F_SETFD, 0) < 0 {
                    return Err(io::Error::last_os_error());
                }
            } else if libc::dup2(theirs_raw, n) < 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => {
            let why = format!("cannot start {}: {e}", criu_bin.display());
            send_data(runc.as_fd(), failure_response(request.kind, &why))?;
            return Err(ProxyError::Setup(why));
        }
    };
    drop(theirs);
    let outcome = match &gate {
        Some(g) => relay(runc.as_fd(), ours.as_fd(), first, g),
        None => relay(runc.as_fd(), ours.as_fd(), first, &NoGate),
    };
    // Closing our end makes a CRIU still waiting for an answer abort (and kill what it restored).
    drop(ours);
    let status = child.wait().map_err(|source| ProxyError::Io { what: "wait for CRIU".into(), source })?;
    let code =
        status.code().unwrap_or_else(|| 128 + std::os::unix::process::ExitStatusExt::signal(&status).unwrap_or(0));
    match outcome {
        Ok(Outcome::Done) => Ok(code),
        Ok(Outcome::Refused(why)) => {
            log.line(&format!("criu proxy: restore stopped before the restored process ran: {why}"));
            Ok(if code == 0 { 1 } else { code })
        }
        Err(e) => {
            log.line(&format!("criu proxy: {e}"));
            Ok(if code == 0 { 1 } else { code })
        }
    }
}

/// A session that is no restore never asks.
struct NoGate;

impl Gate for NoGate {
    fn verdict(&self) -> Result<(), String> {
        Err("not a restore".into())
    }
}

/// Puts a copy of runc's descriptor `t` (of process `pid`) at number `t` here, for each `t` of
/// `targets`, because CRIU opens them as `/proc/<our pid>/fd/<t>`. runc's socket moves out of
/// the way when it holds such a number; any other descriptor there (one runc passed on to CRIU)
/// is a conflict we cannot resolve, and an error.
fn mirror(runc: OwnedFd, pid: i32, targets: &[RawFd]) -> Result<(OwnedFd, Vec<OwnedFd>), ProxyError> {
    let Some(&top) = targets.iter().max() else { return Ok((runc, vec![])) };
    let runc = if targets.contains(&runc.as_raw_fd()) {
        let moved = fcntl(&runc, FcntlArg::F_DUPFD_CLOEXEC(top + 1)).map_err(os("move runc's socket"))?;
        // SAFETY: F_DUPFD_CLOEXEC returned a new descriptor that only we hold.
        unsafe { OwnedFd::from_raw_fd(moved) }
    } else {
        runc
    };
    for t in targets {
        // SAFETY: F_GETFD only asks whether the number is open.
        if unsafe { libc::fcntl(*t, libc::F_GETFD) } >= 0 {
            return Err(ProxyError::Setup(format!(
                "runc's descriptor {t}, which CRIU opens through this process, is taken here by one runc passed on"
            )));
        }
    }
    let mut mirrors = Vec::new();
    for t in targets {
        let source = format!("/proc/{pid}/fd/{t}");
        let opened = nix::fcntl::open(source.as_str(), OFlag::O_PATH | OFlag::O_CLOEXEC, nix::sys::stat::Mode::empty())
            .map_err(os(format!("open {source}")))?;
        if opened.as_raw_fd() == *t {
            mirrors.push(opened);
            continue;
        }
        // SAFETY: `t` is free (checked above, and nothing since took it); dup3 gives us a new
        // descriptor at that number.
        let placed = unsafe { libc::dup3(opened.as_raw_fd(), *t, libc::O_CLOEXEC) };
        if placed < 0 {
            return Err(ProxyError::Io { what: format!("place {source} at {t}"), source: io::Error::last_os_error() });
        }
        // SAFETY: dup3 returned `t`, now ours.
        mirrors.push(unsafe { OwnedFd::from_raw_fd(placed) });
    }
    Ok((runc, mirrors))
}

// ---------------------------------------------------------------------------------------------
// The shim's side

/// The shim's verdict socket for one restore: answers every connection (from our uid) with the
/// background verification's verdict once it is in. Removed when dropped.
pub struct VerdictServer {
    path: PathBuf,
    stop: Arc<AtomicBool>,
    asked: Arc<AtomicBool>,
}

impl VerdictServer {
    /// Serves `pending`'s verdict on `path` (a stale socket there is replaced).
    pub fn start(path: &Path, pending: Arc<Pending>) -> io::Result<Self> {
        match std::fs::remove_file(path) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        let listener = bind_short(path)?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
        listener.set_nonblocking(true)?;
        let stop = Arc::new(AtomicBool::new(false));
        let asked = Arc::new(AtomicBool::new(false));
        let (s, a) = (stop.clone(), asked.clone());
        std::thread::Builder::new()
            .name("criu-verdict".into())
            .spawn(move || serve_verdicts(listener, pending, s, a))?;
        Ok(Self { path: path.to_path_buf(), stop, asked })
    }

    /// Whether a proxy asked for the verdict (the restore was held).
    pub fn asked(&self) -> bool {
        self.asked.load(Ordering::SeqCst)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for VerdictServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = std::fs::remove_file(&self.path);
    }
}

fn serve_verdicts(listener: UnixListener, pending: Arc<Pending>, stop: Arc<AtomicBool>, asked: Arc<AtomicBool>) {
    let euid = nix::unistd::geteuid().as_raw();
    while !stop.load(Ordering::SeqCst) {
        let mut polled = [PollFd::new(listener.as_fd(), PollFlags::POLLIN)];
        if !matches!(poll(&mut polled, PollTimeout::from(200u16)), Ok(n) if n > 0) {
            continue;
        }
        let Ok((mut stream, _)) = listener.accept() else { continue };
        let Ok(peer) = getsockopt(&stream, sockopt::PeerCredentials) else { continue };
        if peer.uid() != euid {
            log::warn!("verdict socket: refused a connection from uid {} (pid {})", peer.uid(), peer.pid());
            continue;
        }
        asked.store(true, Ordering::SeqCst);
        let _ = stream.set_nonblocking(false);
        let line = match pending.wait(None) {
            Some(Verdict::Verified) => "verified\n".to_string(),
            Some(Verdict::Failed(why)) => format!("failed {}\n", why.replace('\n', " ")),
            None => "failed the verification ended without a verdict\n".to_string(),
        };
        let _ = stream.write_all(line.as_bytes());
    }
}

/// One restore's gate at Start: the verdict socket, the runtime handle that runs CRIU through
/// the proxy, and the verdict afterwards.
pub struct CriuGate {
    server: VerdictServer,
    pending: Arc<Pending>,
    log: PathBuf,
    path_dir: PathBuf,
    proxy: PathBuf,
}

impl CriuGate {
    /// Opens the verdict socket in `bundle` for `pending`; the proxy is this binary.
    pub fn open(bundle: &Path, pending: Arc<Pending>) -> io::Result<Self> {
        let proxy = std::env::current_exe()?;
        let path_dir = bundle.join(PROXY_PATH_DIR);
        let _ = std::fs::remove_dir_all(&path_dir);
        std::fs::create_dir(&path_dir)?;
        std::fs::set_permissions(&path_dir, std::fs::Permissions::from_mode(0o700))?;
        std::os::unix::fs::symlink(&proxy, path_dir.join("criu"))?;
        let log = bundle.join(PROXY_LOG);
        let _ = std::fs::remove_file(&log);
        let server = VerdictServer::start(&bundle.join(VERDICT_SOCKET), pending.clone())?;
        Ok(Self { server, pending, log, path_dir, proxy })
    }

    /// The gate of a restore whose pages are still being verified (`pages`), else `None` (a
    /// checkpoint without a manifest: nothing to hold it for).
    pub fn for_restore(id: &str, bundle: &Path, pages: Option<&Arc<Pending>>) -> Result<Option<Self>, Error> {
        let Some(pages) = pages else { return Ok(None) };
        Self::open(bundle, pages.clone()).map(Some).map_err(|source| Error::Os {
            context: format!("restore {id}: open the verdict socket in {}", bundle.display()),
            source,
        })
    }

    /// A restore that failed: the verification's failure when that is why (CRIU was stopped at
    /// the hold), else `None` and the runtime's error stands.
    pub fn refusal(&self, id: &str) -> Option<Error> {
        if let Some(log) = self.proxy_log() {
            log::warn!("restore {id}: {log}");
        }
        let source = self.failure()?;
        Some(CheckpointError::Verify { id: id.to_string(), source }.into())
    }

    /// After a successful restore: [`confirm`](Self::confirm) as the shim's error.
    pub fn confirmed(&self, id: &str) -> Result<(), Error> {
        self.confirm().map_err(|source| CheckpointError::Verify { id: id.to_string(), source })?;
        let took = self.pending.took().unwrap_or_default();
        if self.asked() {
            log::info!(
                "restore {id}: held at CRIU's post-restore until the memory pages verified ({} bytes hashed in {} ms since Create)",
                self.pending.bytes(),
                took.as_millis()
            );
        }
        Ok(())
    }

    /// `base` running CRIU through the proxy: `--criu <proxy>` (runc 1.1), `criu` on PATH (runc
    /// ≥ 1.2), and the real CRIU and the verdict socket in the environment.
    pub fn runtime(&self, base: &OciRuntime, criu: &Path) -> OciRuntime {
        let mut path = OsString::from(self.path_dir.as_os_str());
        if let Some(old) = std::env::var_os("PATH") {
            path.push(":");
            path.push(old);
        }
        base.with_criu(self.proxy.clone())
            .with_criu_env(CRIU_ENV, criu.as_os_str())
            .with_criu_env(VERDICT_ENV, self.server.path().as_os_str())
            .with_criu_env(LOG_ENV, self.log.as_os_str())
            .with_criu_env("PATH", path)
    }

    /// The verification's failure, when it failed (the error names the file; taken once).
    pub fn failure(&self) -> Option<kybernate_checkpoint::VerifyError> {
        match self.pending.now()? {
            Verdict::Verified => None,
            Verdict::Failed(text) => Some(held(self.pending.take_error(), text)),
        }
    }

    /// After a successful restore: the verdict must be in and good (the proxy held CRIU until it
    /// was); a restore that was not held waits for it here, and fails on a bad one.
    pub fn confirm(&self) -> Result<(), kybernate_checkpoint::VerifyError> {
        if !self.server.asked() {
            log::warn!(
                "restore: the CRIU proxy never asked for the verdict (runtime ignored --criu and PATH?); waiting for it now"
            );
        }
        match self.pending.wait(None) {
            Some(Verdict::Failed(text)) => Err(held(self.pending.take_error(), text)),
            _ => Ok(()),
        }
    }

    /// What the proxy logged (why it stopped a restore), if anything.
    pub fn proxy_log(&self) -> Option<String> {
        std::fs::read_to_string(&self.log).ok().map(|s| s.trim().to_string()).filter(|s| !s.is_empty())
    }

    pub fn asked(&self) -> bool {
        self.server.asked()
    }
}

impl Drop for CriuGate {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path_dir);
    }
}

fn held(error: Option<kybernate_checkpoint::VerifyError>, text: String) -> kybernate_checkpoint::VerifyError {
    let source = error.unwrap_or(kybernate_checkpoint::VerifyError::Io {
        context: text,
        source: io::Error::other("failed verification"),
    });
    kybernate_checkpoint::VerifyError::Held { source: Box::new(source) }
}

#[cfg(test)]
mod tests;
