//! Process IO against real pipes, FIFOs, files, loggers and ptys.

use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Mutex;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use nix::fcntl::{fcntl, open, FcntlArg, OFlag};
use nix::sys::signal::{kill, Signal};
use nix::sys::socket::MsgFlags;
use nix::sys::stat::Mode;
use nix::unistd::Pid;

use crate::sync::lock;
use std::fs::File;
use std::io::{BufRead, BufReader, IoSlice, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::process::Child;
use std::sync::MutexGuard;

use nix::sys::socket::{sendmsg, ControlMessage};
use nix::sys::wait::waitpid;
use nix::unistd::mkfifo;

use super::console::*;
use super::uri::*;
use super::*;

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
        sendmsg::<()>(stream.as_raw_fd(), &iov, &[ControlMessage::ScmRights(&fds)], MsgFlags::empty(), None).unwrap();
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
    let (io, child) = ProcessIo::prepare(&StdioConfig { stdout: uri, ..Default::default() }, dir, "c1", "ns").unwrap();
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
