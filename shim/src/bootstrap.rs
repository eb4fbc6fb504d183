//! How the shim daemon comes up: `start` binds the group's socket itself and hands the listening
//! fd to the daemon it spawns, then exits at once, as containerd's Go shim does. containerd
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
use std::os::fd::{AsRawFd, FromRawFd, IntoRawFd, OwnedFd, RawFd};
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;

use containerd_shim::monitor::monitor_notify_by_pid;
use containerd_shim::protos::shim::shim_ttrpc::{create_task, Task};
use containerd_shim::protos::ttrpc::{MethodHandler, Server};
use containerd_shim::{logger, Config, Shim, StartOpts};
use log::{debug, info, warn};
use nix::errno::Errno;
use nix::fcntl::{fcntl, FcntlArg, FdFlag};
use nix::sys::socket::{getsockopt, sockopt};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use signal_hook::consts::{SIGCHLD, SIGINT, SIGPIPE, SIGTERM};
use signal_hook::iterator::Signals;

use crate::error::{Error, Result};
use crate::events::RemoteEvents;
use crate::service::Service;

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
pub fn serve(runtime_id: &str, listener: OwnedFd) -> Result<()> {
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

    let mut config = Config::default();
    let mut shim = Service::new(runtime_id, &flags, &mut config);
    logger::init(flags.debug, &config.default_log_level, &flags.namespace, &flags.id)
        .map_err(Error::shim("opening containerd's log FIFO"))?;
    let events = RemoteEvents::connect(ttrpc_address)
        .map_err(|e| Error::Shim { context: "connecting to containerd's events".into(), message: e.to_string() })?;
    let task: Arc<dyn Task + Send + Sync> = Arc::new(shim.task_service(events));
    let ttrpc = |context: &'static str| {
        move |e: containerd_shim::protos::ttrpc::Error| Error::Shim { context: context.into(), message: e.to_string() }
    };
    // Idle ttrpc workers per connection: 2 to start, topped up when fewer than 1 is idle (a worker
    // blocked in Wait is not idle, so long calls never starve the rest), at most 3 kept idle.
    // ttrpc's defaults (3, 1, 5) cost threads a shim holding one container never uses.
    let mut server = Server::new()
        .set_thread_count_default(2)
        .set_thread_count_min(1)
        .set_thread_count_max(3)
        .add_listener(listener.into_raw_fd())
        .map_err(ttrpc("serving the inherited socket"))?
        .register_service(create_task(task.clone()))
        .register_service(as_task_v3(create_task(task)));
    server.start().map_err(ttrpc("starting the ttrpc server"))?;
    info!("serving on {}", flags.socket);

    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || reap_children(signals))
        .map_err(Error::os("starting the signal thread"))?;
    shim.wait();

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
}
