//! Spawning and reaping the runtime's processes (and the CUDA driver helper): every child is
//! forked by one long-lived thread with a parent-death signal, so that it dies with the shim; a
//! call that starts CRIU gets a process group of its own, recorded in the bundle while it runs.
//!
//! How a child is waited for is a seam ([`Spawner`]): inside the shim, containerd-shim's SIGCHLD
//! thread reaps every child with `waitpid(-1)`, so `Command::wait/status/output` race it and fail
//! with ECHILD; there the exit code must come from the crate's monitor ([`MonitorSpawner`]).
//! Tests have no reaper and use [`DirectSpawner`].

use std::io::{self, Read, Write};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::sync::{mpsc, Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use containerd_shim::monitor::{monitor_subscribe, wait_pid, ExitEvent, Subject, Topic};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use crate::sync::lock;

/// How long captured output may still arrive after the runtime exited. Only a process that
/// inherited the pipe and outlived the runtime makes us wait this long; we then keep what came.
const DRAIN_GRACE: Duration = Duration::from_secs(5);
/// Cap on captured output per stream, so a runaway runtime cannot exhaust the shim's memory.
const MAX_CAPTURE: usize = 16 << 20;
/// Which of the runtime process's output streams the [`Spawner`] reads back.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Capture {
    pub stdout: bool,
    pub stderr: bool,
}

/// Exit code and captured output of one runtime invocation.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RunOutput {
    /// The exit status, or 128 + signal number for a process killed by a signal.
    pub code: i32,
    /// Captured stdout (empty unless [`Capture::stdout`]).
    pub stdout: Vec<u8>,
    /// Captured stderr (empty unless [`Capture::stderr`]).
    pub stderr: Vec<u8>,
}

/// How a runtime process is run and waited for.
pub trait Spawner: Send + Sync {
    /// Spawns `cmd` (stdio already configured by the caller, except that stdin becomes a pipe when
    /// `stdin_data` is given and captured streams become pipes), writes `stdin_data` to its stdin
    /// and closes it, reads the captured streams, and waits for the exit.
    fn run(&self, cmd: Command, stdin_data: Option<&[u8]>, capture: Capture) -> io::Result<RunOutput>;

    /// Like [`run`](Self::run), for a runtime call that starts CRIU (checkpoint, restore): the
    /// runtime gets a process group of its own (CRIU inherits it), recorded in `group.path` while
    /// it runs, so that a `delete` after the shim died can kill a CRIU the runtime left behind.
    /// Doubles that run nothing keep this default.
    fn run_grouped(
        &self,
        cmd: Command,
        stdin_data: Option<&[u8]>,
        capture: Capture,
        group: &GroupRecord,
    ) -> io::Result<RunOutput> {
        let _ = group;
        self.run(cmd, stdin_data, capture)
    }

    /// Starts `cmd` with piped stdin and stdout and leaves it running (the CUDA driver helper,
    /// which answers requests until its stdin closes).
    fn start_piped(&self, cmd: Command) -> io::Result<PipedChild>;
}

/// A child started by [`Spawner::start_piped`].
pub struct PipedChild {
    pub pid: u32,
    pub stdin: ChildStdin,
    pub stdout: ChildStdout,
    /// Waits for the exit and returns the code (128 + signal when killed); a child still running
    /// after the given grace period is killed first, so the wait is bounded.
    pub wait: Box<dyn FnOnce(Duration) -> i32 + Send>,
}

/// The pipes `start_piped` asked for, or an error naming the one that is missing.
fn piped_ends(child: &mut Child) -> io::Result<(ChildStdin, ChildStdout)> {
    let missing = |what| io::Error::other(format!("no {what} pipe to the child"));
    Ok((child.stdin.take().ok_or_else(|| missing("stdin"))?, child.stdout.take().ok_or_else(|| missing("stdout"))?))
}

/// For the shim's serve and `delete` paths, where containerd-shim's reaper thread runs: subscribes
/// to the monitor before spawning and takes the exit code the reaper reports, since our own
/// `wait` would race the reaper.
#[derive(Debug, Clone, Copy, Default)]
pub struct MonitorSpawner;

impl Spawner for MonitorSpawner {
    fn run(&self, cmd: Command, stdin_data: Option<&[u8]>, capture: Capture) -> io::Result<RunOutput> {
        // Before spawning: exits nobody is subscribed to are dropped by the monitor.
        let sub = monitor_subscribe(Topic::Pid).map_err(io::Error::other)?;
        run_child(cmd, stdin_data, capture, move |child| {
            let pid = i32::try_from(child.id()).map_err(io::Error::other)?;
            Ok(wait_pid(pid, sub))
        })
    }

    fn run_grouped(
        &self,
        mut cmd: Command,
        stdin_data: Option<&[u8]>,
        capture: Capture,
        group: &GroupRecord,
    ) -> io::Result<RunOutput> {
        let sub = monitor_subscribe(Topic::Pid).map_err(io::Error::other)?;
        cmd.process_group(0);
        run_child(cmd, stdin_data, capture, move |child| {
            let pid = i32::try_from(child.id()).map_err(io::Error::other)?;
            group.write(child.id());
            Ok(wait_pid(pid, sub))
        })
    }

    fn start_piped(&self, mut cmd: Command) -> io::Result<PipedChild> {
        let sub = monitor_subscribe(Topic::Pid).map_err(io::Error::other)?;
        cmd.stdin(Stdio::piped()).stdout(Stdio::piped());
        let mut child = spawn_tied(cmd)?;
        let pid = child.id();
        let (stdin, stdout) = piped_ends(&mut child)?;
        drop(child); // waited for through the monitor, never by std
        let wait = move |grace: Duration| {
            let mut deadline = Instant::now() + grace;
            let mut killed = false;
            loop {
                match sub.rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
                    Ok(ExitEvent { subject: Subject::Pid(p), exit_code }) if u32::try_from(p) == Ok(pid) => {
                        return exit_code
                    }
                    Ok(_) => {}
                    Err(mpsc::RecvTimeoutError::Timeout) if !killed => {
                        // No exit reported yet, so the pid is still the child's.
                        let _ = kill(Pid::from_raw(pid as i32), Signal::SIGKILL);
                        killed = true;
                        deadline = Instant::now() + grace;
                    }
                    // Killed and still not reported: the reaper reaps it whenever it exits;
                    // the caller is not kept waiting any longer.
                    Err(_) => return 128 + Signal::SIGKILL as i32,
                }
            }
        };
        Ok(PipedChild { pid, stdin, stdout, wait: Box::new(wait) })
    }
}

/// Waits with `Command`'s own `wait`. Only where no thread reaps with `waitpid(-1)`: tests, and
/// the shim's `start` action (containerd-shim runs its reaper only in the serve and `delete` paths).
#[derive(Debug, Clone, Copy, Default)]
pub struct DirectSpawner;

impl Spawner for DirectSpawner {
    fn run(&self, cmd: Command, stdin_data: Option<&[u8]>, capture: Capture) -> io::Result<RunOutput> {
        run_child(cmd, stdin_data, capture, |child| {
            let status = child.wait()?;
            Ok(exit_code(status))
        })
    }

    fn run_grouped(
        &self,
        mut cmd: Command,
        stdin_data: Option<&[u8]>,
        capture: Capture,
        group: &GroupRecord,
    ) -> io::Result<RunOutput> {
        cmd.process_group(0);
        run_child(cmd, stdin_data, capture, |child| {
            group.write(child.id());
            let status = child.wait()?;
            Ok(exit_code(status))
        })
    }

    fn start_piped(&self, mut cmd: Command) -> io::Result<PipedChild> {
        cmd.stdin(Stdio::piped()).stdout(Stdio::piped());
        let mut child = spawn_tied(cmd)?;
        let (stdin, stdout) = piped_ends(&mut child)?;
        let pid = child.id();
        let wait = move |grace: Duration| {
            let deadline = Instant::now() + grace;
            while Instant::now() < deadline {
                match child.try_wait() {
                    Ok(Some(_)) | Err(_) => break,
                    Ok(None) => std::thread::sleep(Duration::from_millis(10)),
                }
            }
            if matches!(child.try_wait(), Ok(None)) {
                let _ = child.kill();
            }
            match child.wait() {
                Ok(status) => exit_code(status),
                Err(_) => 128 + Signal::SIGKILL as i32,
            }
        };
        Ok(PipedChild { pid, stdin, stdout, wait: Box::new(wait) })
    }
}

/// The exit status as a code: 128 + the signal for a process killed by one.
fn exit_code(status: std::process::ExitStatus) -> i32 {
    status.code().unwrap_or_else(|| 128 + status.signal().unwrap_or(0))
}

/// Spawns `cmd` so that it dies with the shim, as go-runc's children do (`Pdeathsig: SIGKILL`):
/// a runtime left running by a killed shim would go on freezing, dumping or restoring a
/// container nobody waits for. The kernel sends the parent-death signal when the *thread* that
/// forked exits, not the process, and the ttrpc server ends idle worker threads; so every child
/// is forked by one thread that lives as long as the process ([`spawner_thread`]).
fn spawn_tied(mut cmd: Command) -> io::Result<Child> {
    let parent = nix::unistd::getpid().as_raw();
    // SAFETY: the closure runs in the child between fork and exec; it only makes the
    // async-signal-safe calls prctl(2), getppid(2) and _exit(2), and allocates nothing.
    unsafe {
        cmd.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong, 0, 0, 0) != 0 {
                return Err(io::Error::last_os_error());
            }
            // The shim died between the fork and the prctl: the signal was never sent.
            if libc::getppid() != parent {
                libc::_exit(128 + libc::SIGKILL);
            }
            Ok(())
        });
    }
    let spawner = spawner_thread().ok_or_else(|| io::Error::other("the runtime spawner thread is not running"))?;
    let (reply, answer) = mpsc::sync_channel(1);
    spawner.send((cmd, reply)).map_err(|_| io::Error::other("the runtime spawner thread is gone"))?;
    answer.recv().map_err(|_| io::Error::other("the runtime spawner thread is gone"))?
}

/// Why the exec of `program` failed, when std lost its errno to the reaper: a missing or
/// non-executable path is told apart (callers report a missing runtime binary as such).
fn exec_failure(program: &std::ffi::OsStr) -> io::Error {
    use std::os::unix::fs::PermissionsExt;
    let path = Path::new(program);
    let what = match std::fs::metadata(path) {
        Err(e) if path.components().count() > 1 => return e,
        Ok(m) if !m.is_file() || m.permissions().mode() & 0o111 == 0 => {
            return io::Error::new(io::ErrorKind::PermissionDenied, format!("{} is not executable", path.display()))
        }
        _ => "exec failed (the reaper took the exit)",
    };
    io::Error::other(format!("{}: {what}", path.display()))
}

/// A command for the spawner thread, and where its child goes.
type SpawnJob = (Command, mpsc::SyncSender<io::Result<Child>>);

/// The thread that forks every runtime and helper process (see [`spawn_tied`]); started on
/// first use, never ended. `None` when it could not be started.
fn spawner_thread() -> Option<&'static mpsc::Sender<SpawnJob>> {
    static SPAWNER: OnceLock<Option<mpsc::Sender<SpawnJob>>> = OnceLock::new();
    SPAWNER
        .get_or_init(|| {
            let (tx, rx) = mpsc::channel::<SpawnJob>();
            let started = std::thread::Builder::new().name("runtime-spawner".into()).spawn(move || {
                for (mut cmd, reply) in rx {
                    // std panics if its own waitpid after a failed exec loses to the reaper, and
                    // the exec's errno is lost with it: say what the program's path says instead.
                    let child = catch_unwind(AssertUnwindSafe(|| cmd.spawn()))
                        .unwrap_or_else(|_| Err(exec_failure(cmd.get_program())));
                    // Closes our copies of the fds handed to the child before the caller reads.
                    drop(cmd);
                    let _ = reply.send(child);
                }
            });
            started.inspect_err(|e| log::error!("cannot start the runtime spawner thread: {e}")).ok().map(|_| tx)
        })
        .as_ref()
}

/// Name of the file in the bundle that records the process group of a running CRIU call.
pub const GROUP_FILE: &str = "runtime-group";

/// The process group of a runtime call that starts CRIU, recorded in the bundle while it runs.
///
/// runc starts `criu swrk` without a parent-death signal, and CRIU goes on dumping (holding the
/// container's processes traced and frozen) after runc is gone. The runtime gets a process group
/// of its own, which CRIU inherits; the record (`<pgid> <start time>`) lets whoever cleans up
/// kill what is left of it. The start time (clock ticks after boot) tells the group's members
/// from unrelated processes that got a recycled pid.
#[derive(Debug, Clone)]
pub struct GroupRecord {
    path: PathBuf,
}

impl GroupRecord {
    pub fn in_bundle(bundle: &Path) -> Self {
        GroupRecord { path: bundle.join(GROUP_FILE) }
    }

    /// Records the group led by `pid` (the runtime, just spawned). Best effort: a missing record
    /// only costs the cleanup after a shim crash.
    fn write(&self, pid: u32) {
        let Some(start) = proc_stat(pid).map(|s| s.start) else { return };
        if let Err(e) = std::fs::write(&self.path, format!("{pid} {start}\n")) {
            log::warn!("{}: {e}", self.path.display());
        }
    }

    fn read(&self) -> Option<(u32, u64)> {
        let text = std::fs::read_to_string(&self.path).ok()?;
        let mut words = text.split_whitespace();
        Some((words.next()?.parse().ok()?, words.next()?.parse().ok()?))
    }

    /// SIGKILLs every live member of the recorded group (a CRIU whose runtime died; the runtime
    /// itself if it still runs) until none is left or 2 s have passed, then removes the record.
    /// Returns how many processes were killed.
    pub fn kill_leftovers(&self) -> usize {
        let Some((pgid, start)) = self.read() else {
            self.remove();
            return 0;
        };
        let deadline = Instant::now() + Duration::from_secs(2);
        let mut killed = std::collections::HashSet::new();
        loop {
            let members = group_members(pgid, start);
            if members.is_empty() || Instant::now() >= deadline {
                if !members.is_empty() {
                    log::warn!("process group {pgid}: {members:?} still alive after SIGKILL");
                }
                break;
            }
            for pid in members {
                if kill(Pid::from_raw(pid as i32), Signal::SIGKILL).is_ok() && killed.insert(pid) {
                    log::warn!("killed pid {pid}, left by a runtime call (process group {pgid})");
                }
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        self.remove();
        killed.len()
    }

    /// Forgets the record (the call ended and left nothing).
    pub fn remove(&self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// What [`proc_stat`] reads of `/proc/<pid>/stat`.
struct ProcStat {
    state: char,
    pgrp: u32,
    /// Start time in clock ticks after boot.
    start: u64,
}

fn proc_stat(pid: u32) -> Option<ProcStat> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may hold spaces and parentheses: the fields start after the last ')'.
    let fields: Vec<&str> = text.get(text.rfind(')')? + 1..)?.split_whitespace().collect();
    Some(ProcStat {
        state: fields.first()?.chars().next()?,
        pgrp: fields.get(2)?.parse().ok()?,
        start: fields.get(19)?.parse().ok()?,
    })
}

/// Live (not zombie) processes in group `pgid` that started at `start` or later.
fn group_members(pgid: u32, start: u64) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else { return Vec::new() };
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&pid| {
            proc_stat(pid).is_some_and(|s| s.pgrp == pgid && s.start >= start && !matches!(s.state, 'Z' | 'X'))
        })
        .collect()
}

/// Spawns, feeds and drains the child on helper threads (so a child that fills one pipe while we
/// wait cannot deadlock), then waits with `wait`. Once spawned, the child is always waited for.
fn run_child(
    mut cmd: Command,
    stdin_data: Option<&[u8]>,
    capture: Capture,
    wait: impl FnOnce(&mut Child) -> io::Result<i32>,
) -> io::Result<RunOutput> {
    if stdin_data.is_some() {
        cmd.stdin(Stdio::piped());
    }
    if capture.stdout {
        cmd.stdout(Stdio::piped());
    }
    if capture.stderr {
        cmd.stderr(Stdio::piped());
    }
    // Our copies of the fds handed to the child are closed with `cmd` by the spawn, so readers
    // of those pipes see EOF when the child side closes them.
    let mut child = spawn_tied(cmd)?;

    let mut setup_error = None;
    let mut collect = |pipe: Option<Box<dyn Read + Send>>| {
        pipe.and_then(|p| Collector::start(p).map_err(|e| setup_error = Some(e)).ok())
    };
    let stdout = collect(child.stdout.take().map(|p| Box::new(p) as Box<dyn Read + Send>));
    let stderr = collect(child.stderr.take().map(|p| Box::new(p) as Box<dyn Read + Send>));
    if let (Some(data), Some(stdin)) = (stdin_data, child.stdin.take()) {
        if let Err(e) = feed(stdin, data.to_vec()) {
            setup_error = Some(e);
        }
    }

    let code = wait(&mut child)?;
    let output = RunOutput {
        code,
        stdout: stdout.map(Collector::finish).unwrap_or_default(),
        stderr: stderr.map(Collector::finish).unwrap_or_default(),
    };
    match setup_error {
        Some(e) => Err(e),
        None => Ok(output),
    }
}

/// Writes `data` to the child's stdin on a detached thread, then closes it. Errors (EPIPE when the
/// child exits without reading) are ignored: the exit code tells what happened.
fn feed(mut stdin: impl Write + Send + 'static, data: Vec<u8>) -> io::Result<()> {
    std::thread::Builder::new().name("runtime-stdin".into()).spawn(move || {
        let _ = stdin.write_all(&data);
    })?;
    Ok(())
}

/// Reads a pipe to EOF on its own thread into a shared buffer.
struct Collector {
    buf: Arc<Mutex<Vec<u8>>>,
    done: mpsc::Receiver<()>,
}

impl Collector {
    fn start(mut pipe: Box<dyn Read + Send>) -> io::Result<Collector> {
        let buf = Arc::new(Mutex::new(Vec::new()));
        let (tx, done) = mpsc::channel();
        let shared = Arc::clone(&buf);
        std::thread::Builder::new().name("runtime-output".into()).spawn(move || {
            let mut chunk = [0u8; 8192];
            loop {
                match pipe.read(&mut chunk) {
                    Ok(0) => break,
                    Ok(n) => {
                        let mut b = lock(&shared);
                        let room = MAX_CAPTURE.saturating_sub(b.len());
                        b.extend_from_slice(&chunk[..n.min(room)]);
                    }
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(_) => break,
                }
            }
            let _ = tx.send(());
        })?;
        Ok(Collector { buf, done })
    }

    /// What was read, after EOF or [`DRAIN_GRACE`], whichever comes first.
    fn finish(self) -> Vec<u8> {
        let _ = self.done.recv_timeout(DRAIN_GRACE);
        std::mem::take(&mut *lock(&self.buf))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn run_output_of_the_direct_spawner() {
        let mut cmd = Command::new("/bin/sh");
        cmd.args(["-c", "cat; echo oops >&2; exit 7"]).stdout(Stdio::null()).stderr(Stdio::null());
        let out = DirectSpawner.run(cmd, Some(b"data"), Capture { stdout: true, stderr: true }).unwrap();
        assert_eq!(out, RunOutput { code: 7, stdout: b"data".to_vec(), stderr: b"oops\n".to_vec() });

        // Uncaptured streams stay where the caller put them.
        let mut cmd = Command::new("/bin/sh");
        cmd.args(["-c", "echo hidden; echo hidden >&2"]).stdout(Stdio::null()).stderr(Stdio::null());
        let out = DirectSpawner.run(cmd, None, Capture::default()).unwrap();
        assert_eq!(out, RunOutput { code: 0, stdout: vec![], stderr: vec![] });
    }

    #[test]
    fn a_piped_child_answers_until_its_stdin_closes_and_is_killed_after_the_grace() {
        use std::io::{BufRead, BufReader};
        let mut cmd = Command::new("/bin/sh");
        cmd.args(["-c", "while read l; do echo \"got $l\"; done; exit 3"]);
        let PipedChild { mut stdin, stdout, wait, .. } = DirectSpawner.start_piped(cmd).unwrap();
        let mut answers = BufReader::new(stdout);
        for word in ["one", "two"] {
            writeln!(stdin, "{word}").unwrap();
            let mut line = String::new();
            answers.read_line(&mut line).unwrap();
            assert_eq!(line, format!("got {word}\n"));
        }
        drop(stdin);
        assert_eq!(wait(Duration::from_secs(10)), 3, "it ended on EOF with its own code");

        // One that ignores EOF is killed once the grace is over, and still waited for.
        let mut cmd = Command::new("/bin/sleep");
        cmd.arg("600");
        let child = DirectSpawner.start_piped(cmd).unwrap();
        let pid = child.pid;
        drop(child.stdin);
        assert_eq!((child.wait)(Duration::from_millis(50)), 128 + 9);
        assert!(!Path::new(&format!("/proc/{pid}")).exists(), "pid {pid} is gone, not a zombie");
    }

    #[test]
    fn a_child_outlives_the_thread_that_asked_for_it() {
        // The parent-death signal follows the forking thread: children come from the spawner
        // thread, so a request thread (a ttrpc worker) that ends kills nothing.
        let child = std::thread::spawn(|| {
            let mut cmd = Command::new("/bin/sleep");
            cmd.arg("600");
            DirectSpawner.start_piped(cmd).unwrap()
        })
        .join()
        .unwrap();
        std::thread::sleep(Duration::from_millis(200));
        let state = proc_stat(child.pid).map(|s| s.state);
        assert!(matches!(state, Some('S' | 'R')), "the child died with the requesting thread: {state:?}");
        drop(child.stdin);
        assert_eq!((child.wait)(Duration::from_millis(50)), 128 + 9);
    }

    #[test]
    fn leftovers_of_a_grouped_call_are_killed_and_the_record_removed() {
        let dir = tempfile::tempdir().unwrap();
        let group = GroupRecord::in_bundle(dir.path());
        let pid_file = dir.path().join("bg.pid");
        // Like runc leaving CRIU behind: the call exits, a process it started stays in its group.
        let mut cmd = Command::new("/bin/sh");
        cmd.args(["-c", "sleep 600 & echo $! > \"$0\"", pid_file.to_str().unwrap()]);
        cmd.stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::null());
        let out = DirectSpawner.run_grouped(cmd, None, Capture::default(), &group).unwrap();
        assert_eq!(out.code, 0);
        let (pgid, _) = group.read().expect("the group is recorded");
        let bg: u32 = std::fs::read_to_string(&pid_file).unwrap().trim().parse().unwrap();
        assert_eq!(proc_stat(bg).map(|s| s.pgrp), Some(pgid), "the leftover is in the runtime's group");
        assert_ne!(pgid, std::process::id(), "the runtime has a group of its own");

        assert_eq!(group.kill_leftovers(), 1);
        assert!(proc_stat(bg).is_none_or(|s| s.state == 'Z'), "the leftover is dead");
        assert!(!dir.path().join(GROUP_FILE).exists());
        // Nothing recorded: nothing to do.
        assert_eq!(group.kill_leftovers(), 0);
    }
}
