//! The start path: how the shim daemon comes up. `start` binds the group's socket itself and hands
//! the listening fd to the daemon it spawns, then exits at once, as containerd's Go shim does. containerd
//! connects as soon as `start` has printed the address; the kernel queues the connection until
//! the daemon, still loading, accepts it.
//!
//! containerd-shim 0.11's own `spawn` lets the daemon bind and waits until it serves, which put the
//! daemon's whole start-up (exec, dynamic linking, logger, event client, ttrpc server) on the
//! critical path of every container start (docs/benchmarks.md). Its `run` still serves the
//! `start` and `delete` actions; only the daemon's bootstrap is ours.

use std::collections::HashMap;
use std::ffi::OsString;
use std::fs;
use std::io::Read;
use std::os::fd::{AsRawFd, FromRawFd, IntoRawFd, OwnedFd, RawFd};
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;

use containerd_shim::monitor::monitor_notify_by_pid;
use containerd_shim::protos::shim::shim_ttrpc::{create_task, Task};
use containerd_shim::protos::ttrpc::{MethodHandler, Server};
use containerd_shim::{cgroup, logger, util, Config, ExitSignal, StartOpts};
use log::{debug, info, warn};
use nix::errno::Errno;
use nix::fcntl::{fcntl, FcntlArg, FdFlag};
use nix::sys::socket::{getsockopt, sockopt};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use signal_hook::consts::{SIGCHLD, SIGINT, SIGPIPE, SIGTERM};
use signal_hook::iterator::Signals;

use crate::error::{Error, Result};
use crate::events::RemoteEvents;
use crate::options::ShimOptions;
use crate::task::TaskService;

/// Annotations that put containers into one shim process (a pod), in the order the Go shim checks them.
pub const GROUP_ANNOTATIONS: [&str; 2] = ["io.containerd.runc.v2.group", "io.kubernetes.cri.sandbox-id"];

/// The `start` action, in the bundle dir: join the live shim of the container's group, else bind
/// the group's socket and spawn the daemon that serves it. Returns the socket address. Nothing
/// may be printed here: containerd reads stdout and stderr together as the address.
pub fn start(opts: &StartOpts) -> containerd_shim::Result<String> {
    let options = read_start_options();
    let grouping = group_id(Path::new(".")).unwrap_or_else(|| opts.id.clone());
    let address = containerd_shim::socket_address(&opts.address, &opts.namespace, &grouping);
    let listener = match bind_group_socket(&address).map_err(start_error)? {
        GroupSocket::Live => {
            util::write_address(&address)?;
            return Ok(address);
        }
        GroupSocket::Bound(listener) => listener,
    };
    let spawned = spawn_daemon(opts, &address, &listener);
    block_signals_until_exit();
    let pid = match spawned {
        Ok(pid) => pid,
        Err(e) => {
            remove_socket(&address);
            return Err(start_error(e));
        }
    };
    if let Some(cg) = options.shim_cgroup() {
        // Best effort: a missing cgroup must not stop the container (containerd's Go shim fails
        // the start instead). On v2 this is `cgroup.procs` of /sys/fs/cgroup/<path>.
        let _ = cgroup::add_task_to_cgroup(cg, pid);
    }
    // Shims should die before containerd under memory pressure.
    let _ = cgroup::adjust_oom_score(pid);
    util::write_address(&address)?;
    Ok(address)
}

/// Names the fd number of the listening socket `start` hands to the daemon. Only our own `start`
/// sets it; a daemon started without it falls back to containerd-shim's bootstrap, which binds.
pub const LISTEN_FD_ENV: &str = "KYBERNATE_SHIM_LISTEN_FD";

/// What `start` found at the group's socket path.
#[derive(Debug)]
pub enum GroupSocket {
    /// Bound by us: no shim serves this group yet.
    Bound(UnixListener),
    /// A live shim of the group answers there: the new container joins it.
    Live,
}

/// The filesystem path of a `unix://` shim address.
fn socket_path(address: &str) -> &Path {
    Path::new(address.strip_prefix("unix://").unwrap_or(address))
}

fn is_socket(path: &Path) -> bool {
    fs::symlink_metadata(path).map(|m| m.file_type().is_socket()).unwrap_or(false)
}

/// Removes the socket file of `address`, and nothing else that may lie at its path.
pub fn remove_socket(address: &str) {
    let path = socket_path(address);
    if is_socket(path) {
        if let Err(e) = fs::remove_file(path) {
            warn!("removing {}: {e}", path.display());
        }
    }
}

/// Binds the group's socket (root-only), or finds the live shim that holds it. A socket file that
/// nobody answers on (its shim was killed) is removed and bound again.
pub fn bind_group_socket(address: &str) -> Result<GroupSocket> {
    let path = socket_path(address);
    if let Some(parent) = path.parent() {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o711)
            .create(parent)
            .map_err(Error::os(format!("creating {}", parent.display())))?;
    }
    let listener = match UnixListener::bind(path) {
        Ok(l) => l,
        Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => {
            if UnixStream::connect(path).is_ok() {
                return Ok(GroupSocket::Live);
            }
            if !is_socket(path) {
                return Err(Error::os(format!("binding {}: not a socket", path.display()))(e));
            }
            fs::remove_file(path).map_err(Error::os(format!("removing the stale socket {}", path.display())))?;
            UnixListener::bind(path).map_err(Error::os(format!("binding {}", path.display())))?
        }
        Err(e) => return Err(Error::os(format!("binding {}", path.display()))(e)),
    };
    fs::set_permissions(path, fs::Permissions::from_mode(0o600))
        .map_err(Error::os(format!("restricting {} to root", path.display())))?;
    Ok(GroupSocket::Bound(listener))
}

/// Spawns the daemon (this binary, without an action) in the bundle dir with `listener` as an
/// inherited fd, and returns its pid without waiting for it.
pub fn spawn_daemon(opts: &StartOpts, address: &str, listener: &UnixListener) -> Result<u32> {
    let fd = listener.as_raw_fd();
    // `start` is single-threaded: no other child can inherit the fd while close-on-exec is off.
    fcntl(listener, FcntlArg::F_SETFD(FdFlag::empty())).map_err(|e| Error::os("handing the socket on")(e.into()))?;
    let exe = std::env::current_exe().map_err(Error::os("locating the shim binary"))?;
    let mut cmd = Command::new(exe);
    cmd.args(["-namespace", &opts.namespace, "-id", &opts.id, "-address", &opts.address, "-socket", address]);
    cmd.stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::null()).env(LISTEN_FD_ENV, fd.to_string());
    if opts.debug {
        cmd.arg("-debug");
    }
    let child = cmd.spawn().map_err(Error::os("spawning the shim daemon"));
    let _ = fcntl(listener, FcntlArg::F_SETFD(FdFlag::FD_CLOEXEC));
    // Not waited for: `start` exits next and the daemon is adopted.
    Ok(child?.id())
}

/// The listening socket `start` handed down, if this process is such a daemon. Clears the
/// variable, so that no runtime or hook inherits it, and marks the fd close-on-exec.
pub fn inherited_listener() -> Option<std::result::Result<OwnedFd, String>> {
    let value: OsString = std::env::var_os(LISTEN_FD_ENV)?;
    std::env::remove_var(LISTEN_FD_ENV);
    Some(listener_fd(&value))
}

fn listener_fd(value: &OsString) -> std::result::Result<OwnedFd, String> {
    let fd: RawFd = value
        .to_str()
        .and_then(|s| s.parse().ok())
        .filter(|fd| *fd > 2)
        .ok_or_else(|| format!("{LISTEN_FD_ENV}={value:?} is not an fd number above 2"))?;
    // SAFETY: `start` passed this fd for us alone; if it is not open, fcntl fails before we keep it.
    fcntl(unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) }, FcntlArg::F_SETFD(FdFlag::FD_CLOEXEC))
        .map_err(|e| format!("{LISTEN_FD_ENV}: fd {fd}: {e}"))?;
    // SAFETY: the fd is open (above) and nothing else in this process owns it.
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    match getsockopt(&owned, sockopt::AcceptConn) {
        Ok(true) => Ok(owned),
        Ok(false) => Err(format!("{LISTEN_FD_ENV}: fd {fd} is a socket that does not listen")),
        Err(e) => Err(format!("{LISTEN_FD_ENV}: fd {fd} is not a socket: {e}")),
    }
}

/// The daemon: serves the task API on `listener` until the last container is gone.
///
/// The same steps as containerd-shim 0.11's bootstrap, minus the bind: signals registered before
/// any thread starts, child subreaper, logger on containerd's log FIFO, event client, ttrpc server,
/// then a thread that reaps every child and reports its exit to the crate's monitor (runtime
/// invocations and container processes alike subscribe there).
pub fn serve(listener: OwnedFd) -> Result<()> {
    let args: Vec<OsString> = std::env::args_os().collect();
    let flags = containerd_shim::parse(&args[1..]).map_err(Error::shim("parsing the daemon's arguments"))?;
    if flags.namespace.is_empty() {
        return Err(Error::InvalidArgument("the shim daemon needs -namespace".into()));
    }
    // containerd sets it for every shim: where the events go.
    let ttrpc_address =
        std::env::var("TTRPC_ADDRESS").map_err(|_| Error::InvalidArgument("TTRPC_ADDRESS is not set".into()))?;
    let signals = Signals::new([SIGTERM, SIGINT, SIGPIPE, SIGCHLD]).map_err(Error::os("registering signals"))?;
    // SAFETY: prctl with integer arguments only.
    if unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) } != 0 {
        return Err(Error::os("becoming a child subreaper")(std::io::Error::last_os_error()));
    }

    let config = Config::default();
    logger::init(flags.debug, &config.default_log_level, &flags.namespace, &flags.id)
        .map_err(Error::shim("opening containerd's log FIFO"))?;
    let events = RemoteEvents::connect(ttrpc_address).map_err(Error::shim("connecting to containerd's events"))?;
    let exit = Arc::new(ExitSignal::default());
    let task: Arc<dyn Task + Send + Sync> =
        Arc::new(TaskService::for_daemon(&flags.id, &flags.namespace, events, exit.clone()));
    // Idle ttrpc workers per connection: 2 to start, topped up when fewer than 1 is idle (a worker
    // blocked in Wait is not idle, so long calls never starve the rest), at most 3 kept idle.
    // ttrpc's defaults (3, 1, 5) cost threads a shim holding one container never uses.
    let mut server = Server::new()
        .set_thread_count_default(2)
        .set_thread_count_min(1)
        .set_thread_count_max(3)
        .add_listener(listener.into_raw_fd())
        .map_err(Error::shim("serving the inherited socket"))?
        .register_service(create_task(task.clone()))
        .register_service(as_task_v3(create_task(task)));
    server.start().map_err(Error::shim("starting the ttrpc server"))?;
    info!("serving on {}", flags.socket);

    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || reap_children(signals))
        .map_err(Error::os("starting the signal thread"))?;
    exit.wait();

    info!("shutting down");
    server.shutdown();
    remove_socket(&flags.socket);
    Ok(())
}

/// The same handlers under task API v3's method names. containerd 2.x speaks v3 to a shim whose
/// bootstrap said so, and the stock `containerd-shim-runc-v2` hands out the socket of a live shim
/// of the same group as its own: with `runtime_path` registration (style (b)), CRI's restore of a
/// checkpoint archive starts the stock shim, which finds the pod's shim (ours) and containerd then
/// calls `containerd.task.v3.Task/Create` on it. v3's messages are v2's, field for field (v2 adds
/// only `oom_path`, which we do not read); v3's optional `Events` stream is not offered, as our
/// bootstrap never announces it.
fn as_task_v3(
    v2: HashMap<String, Box<dyn MethodHandler + Send + Sync>>,
) -> HashMap<String, Box<dyn MethodHandler + Send + Sync>> {
    v2.into_iter()
        .filter_map(|(path, handler)| {
            let method = path.strip_prefix(TASK_V2)?;
            Some((format!("{TASK_V3}{method}"), handler))
        })
        .collect()
}

const TASK_V2: &str = "/containerd.task.v2.Task/";
const TASK_V3: &str = "/containerd.task.v3.Task/";

/// Waits for every child on SIGCHLD and hands the exit (128+signal when killed) to the monitor.
fn reap_children(mut signals: Signals) {
    for sig in signals.forever() {
        if sig != SIGCHLD {
            debug!("received signal {sig}");
            continue;
        }
        loop {
            let (pid, code) = match waitpid(None, Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::Exited(pid, code)) => (pid, code),
                Ok(WaitStatus::Signaled(pid, sig, _)) => (pid, 128 + sig as i32),
                Ok(WaitStatus::StillAlive) | Err(Errno::ECHILD) => break,
                Ok(_) | Err(Errno::EINTR) => continue,
                Err(e) => {
                    warn!("waitpid: {e}");
                    break;
                }
            };
            if let Err(e) = monitor_notify_by_pid(pid.as_raw(), code) {
                warn!("reporting the exit of {pid}: {e}");
            }
        }
    }
}

/// Blocks the signals containerd-shim handles, for the rest of the `start` action.
///
/// When `start` returns, containerd-shim 0.11 drops its signal-hook iterator, which closes the
/// self-pipe's read end before it unregisters the handlers. A signal in between makes a handler
/// `send` to the closed socket, which raises SIGPIPE, whose handler does the same, forever: the
/// process spins and containerd's `start` (and `ctr run`) never returns. The SIGCHLD that does it
/// comes from the daemon we just spawned when it exits at once (a daemon that fails to come up).
/// `start` is single-threaded and needs no signals after the spawn; the daemon has its own mask
/// (inherited before this call), and pending signals die with this process.
fn block_signals_until_exit() {
    use nix::sys::signal::{pthread_sigmask, SigSet, SigmaskHow, Signal};
    let mut set = SigSet::empty();
    for sig in [Signal::SIGCHLD, Signal::SIGPIPE, Signal::SIGTERM, Signal::SIGINT] {
        set.add(sig);
    }
    // Cannot fail with a valid `how`; if it did, we would only be back to the race.
    let _ = pthread_sigmask(SigmaskHow::SIG_BLOCK, Some(&set), None);
}

/// containerd prints `start`'s stdout and stderr as the error when `start` fails.
fn start_error(e: crate::error::Error) -> containerd_shim::Error {
    containerd_shim::Error::Other(format!("start: {e}"))
}

/// The runtime options containerd writes to `start`'s stdin (empty when none).
fn read_start_options() -> ShimOptions {
    let mut buf = Vec::new();
    if nix::unistd::isatty(std::io::stdin()).unwrap_or(false) {
        return ShimOptions::default();
    }
    match std::io::stdin().read_to_end(&mut buf) {
        Ok(_) => ShimOptions::from_start_stdin(&buf).unwrap_or_else(|e| {
            warn!("ignoring start options: {e}");
            ShimOptions::default()
        }),
        Err(_) => ShimOptions::default(),
    }
}

/// The group a bundle belongs to, from its annotations.
fn group_id(bundle: &Path) -> Option<String> {
    let spec = kybernate_runtime_select::load_spec(bundle).ok()?;
    GROUP_ANNOTATIONS.iter().find_map(|k| spec.annotation(k)).map(str::to_string)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_dead_shims_socket_is_replaced_and_a_live_one_is_joined() {
        let dir = tempfile::tempdir().unwrap();
        let address = format!("unix://{}/s/group", dir.path().display());
        let GroupSocket::Bound(first) = bind_group_socket(&address).unwrap() else { panic!("nothing was bound yet") };
        let path = socket_path(&address);
        assert_eq!(fs::metadata(path).unwrap().permissions().mode() & 0o777, 0o600);
        assert!(matches!(bind_group_socket(&address).unwrap(), GroupSocket::Live));
        drop(first); // the socket file stays, with nobody listening: a killed shim
        assert!(matches!(bind_group_socket(&address).unwrap(), GroupSocket::Bound(_)));
    }

    #[test]
    fn every_task_method_is_served_under_v3_too() {
        struct Defaults;
        impl Task for Defaults {}
        let v3 = as_task_v3(create_task(Arc::new(Defaults)));
        let mut methods: Vec<&str> = v3.keys().map(|k| k.strip_prefix(TASK_V3).expect("a v3 path")).collect();
        methods.sort_unstable();
        // containerd's api/runtime/task/v3/shim.proto, less the optional Events stream.
        let mut want = [
            "State",
            "Create",
            "Start",
            "Delete",
            "Pids",
            "Pause",
            "Resume",
            "Checkpoint",
            "Kill",
            "Exec",
            "ResizePty",
            "CloseIO",
            "Update",
            "Wait",
            "Stats",
            "Connect",
            "Shutdown",
        ];
        want.sort_unstable();
        assert_eq!(methods, want);
    }

    #[test]
    fn a_file_that_is_not_a_socket_is_left_alone() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s").join("group");
        fs::create_dir_all(path.parent().unwrap()).unwrap();
        fs::write(&path, "keep me").unwrap();
        let err = bind_group_socket(&format!("unix://{}", path.display())).unwrap_err();
        assert!(err.to_string().contains("not a socket"), "{err}");
        assert_eq!(fs::read_to_string(&path).unwrap(), "keep me");
    }

    #[test]
    fn the_inherited_fd_must_be_a_listening_socket() {
        let dir = tempfile::tempdir().unwrap();
        let listener = UnixListener::bind(dir.path().join("sock")).unwrap();
        let fd = listener.into_raw_fd();
        let owned = listener_fd(&OsString::from(fd.to_string())).expect("a listening socket");
        let flags = fcntl(&owned, FcntlArg::F_GETFD).unwrap();
        assert!(FdFlag::from_bits_truncate(flags).contains(FdFlag::FD_CLOEXEC), "must not leak into runc");

        let (a, _b) = UnixStream::pair().unwrap();
        let err = listener_fd(&OsString::from(a.into_raw_fd().to_string())).unwrap_err();
        assert!(err.contains("does not listen"), "{err}");
        let file = fs::File::open("/dev/null").unwrap();
        let err = listener_fd(&OsString::from(file.into_raw_fd().to_string())).unwrap_err();
        assert!(err.contains("not a socket"), "{err}");
        for bad in ["", "x", "1", "-4"] {
            let err = listener_fd(&OsString::from(bad)).unwrap_err();
            assert!(err.contains("not an fd number"), "{bad:?}: {err}");
        }
        let err = listener_fd(&OsString::from("987654")).unwrap_err();
        assert!(err.contains("fd 987654"), "{err}");
    }

    #[test]
    fn group_id_prefers_runc_group_then_sandbox_id() {
        let dir = tempfile::tempdir().unwrap();
        let write = |ann: serde_json::Value| {
            std::fs::write(
                dir.path().join("config.json"),
                serde_json::json!({"ociVersion": "1.0.2", "annotations": ann}).to_string(),
            )
            .unwrap()
        };
        write(serde_json::json!({"io.kubernetes.cri.sandbox-id": "pod1", "io.containerd.runc.v2.group": "g1"}));
        assert_eq!(group_id(dir.path()).as_deref(), Some("g1"));
        write(serde_json::json!({"io.kubernetes.cri.sandbox-id": "pod1"}));
        assert_eq!(group_id(dir.path()).as_deref(), Some("pod1"));
        write(serde_json::json!({"io.containerd.runc.v2.group": ""}));
        assert_eq!(group_id(dir.path()), None);
        std::fs::write(dir.path().join("config.json"), "garbage").unwrap();
        assert_eq!(group_id(dir.path()), None);
    }
}
