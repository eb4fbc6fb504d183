//! OOM notifications for a container's memory cgroup.
//!
//! containerd expects a `TaskOOM` event when the kernel OOM-kills inside a
//! container; the shim has to watch for it itself. cgroup v1 signals OOM through
//! an eventfd registered on `memory.oom_control`; cgroup v2 bumps the
//! `oom_kill` counter in `memory.events`, which we watch with inotify.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::fd::{AsFd, AsRawFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::{self, JoinHandle};

use nix::errno::Errno;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::eventfd::{EfdFlags, EventFd};
use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify, WatchDescriptor};
use thiserror::Error;

use crate::cgroups::{Cgroup, CgroupError};

/// Called once per OOM notification; runs on the watcher thread, so keep it short
/// (e.g. enqueue a `TaskOOM` event).
pub type OnOom = Box<dyn FnMut() + Send + 'static>;

/// Why an OOM watch could not be set up.
#[derive(Debug, Error)]
pub enum OomError {
    #[error(transparent)]
    Cgroup(#[from] CgroupError),
    #[error("process {pid} has no v1 memory cgroup")]
    NoMemoryCgroup { pid: u32 },
    /// cgroup v2 without the memory controller in this cgroup: no `memory.events`, so the
    /// kernel counts no OOM kills we could watch (not a failure of the container).
    #[error(
        "{} does not exist: the memory controller is not enabled for this cgroup v2 group (not in its \
         cgroup.controllers), so the kernel reports no OOM kills there",
        path.display()
    )]
    NoMemoryEvents { path: PathBuf },
    #[error("{action} {path}: {source}")]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{action}: {source}")]
    Sys {
        action: &'static str,
        #[source]
        source: Errno,
    },
    #[error("spawn OOM watcher thread: {0}")]
    Spawn(#[source] io::Error),
}

/// A running OOM watch; dropping it stops the watch and waits for its thread,
/// so `on_oom` is never called after the drop returns.
#[derive(Debug)]
pub struct OomWatcher {
    stop: Arc<EventFd>,
    thread: Option<JoinHandle<()>>,
}

impl OomWatcher {
    /// True once the watch ended by itself (the cgroup went away) or failed.
    pub fn is_finished(&self) -> bool {
        self.thread.as_ref().map_or(true, JoinHandle::is_finished)
    }
}

impl Drop for OomWatcher {
    fn drop(&mut self) {
        if let Err(e) = self.stop.write(1) {
            log::warn!("stop OOM watcher: {e}");
        }
        if let Some(thread) = self.thread.take() {
            // Joining from inside on_oom (the watcher dropping itself) would deadlock.
            if thread.thread().id() != thread::current().id() {
                let _ = thread.join();
            }
        }
    }
}

impl OomError {
    /// The host or the cgroup offers nothing to watch (no memory controller): worth saying once,
    /// not at every container, and never an error of the container itself.
    pub fn is_unsupported(&self) -> bool {
        matches!(self, OomError::NoMemoryCgroup { .. } | OomError::NoMemoryEvents { .. })
    }
}

/// Set once this shim has said that OOM kills cannot be watched here.
static UNSUPPORTED_SAID: AtomicBool = AtomicBool::new(false);

/// Logs why container `id` gets no OOM notifications. A node without the memory controller is
/// said once per shim (at warn; later containers at debug), not at every container: the
/// container runs on, containerd gets no error, and no watcher thread is left polling.
pub fn log_unwatched(id: &str, err: &OomError) {
    if !err.is_unsupported() {
        log::warn!("container {id}: no OOM notifications: {err}");
    } else if !UNSUPPORTED_SAID.swap(true, Ordering::Relaxed) {
        log::warn!("container {id}: no OOM notifications (TaskOOM) from this shim: {err}");
    } else {
        log::debug!("container {id}: no OOM notifications: {err}");
    }
}

/// Watches the memory cgroup of `pid` (v1 or v2, whichever this host uses).
pub fn watch(pid: u32, on_oom: OnOom) -> Result<OomWatcher, OomError> {
    match Cgroup::for_pid(pid)? {
        Cgroup::V2(dir) => watch_v2(&dir, on_oom),
        v1 => match v1.v1_dir("memory") {
            Some(dir) => watch_v1(dir, on_oom),
            None => Err(OomError::NoMemoryCgroup { pid }),
        },
    }
}

/// Watches a cgroup v1 memory cgroup directory via `cgroup.event_control`.
///
/// Ends by itself when the cgroup is removed (the kernel signals the eventfd then too).
pub fn watch_v1(dir: &Path, mut on_oom: OnOom) -> Result<OomWatcher, OomError> {
    let oom_control_path = dir.join("memory.oom_control");
    let event_control_path = dir.join("cgroup.event_control");
    let oom_control = File::open(&oom_control_path).map_err(|source| OomError::Io {
        action: "open",
        path: oom_control_path.clone(),
        source,
    })?;
    let event = EventFd::from_flags(EfdFlags::EFD_CLOEXEC)
        .map_err(|source| OomError::Sys { action: "create eventfd", source })?;
    let registration = format!("{} {}", event.as_raw_fd(), oom_control.as_raw_fd());
    OpenOptions::new()
        .write(true)
        .open(&event_control_path)
        .and_then(|mut f| f.write_all(registration.as_bytes()))
        .map_err(|source| OomError::Io { action: "register with", path: event_control_path.clone(), source })?;

    spawn(move |stop| {
        // Keep memory.oom_control open for as long as the registration is in use.
        let _oom_control = oom_control;
        loop {
            match wait_readable(&event, stop) {
                Ok(Wake::Stop) => return,
                Ok(Wake::Event) => {}
                Err(e) => {
                    log::warn!("OOM watcher for {}: poll: {e}", event_control_path.display());
                    return;
                }
            }
            if let Err(e) = event.read() {
                log::warn!("OOM watcher for {}: read eventfd: {e}", event_control_path.display());
                return;
            }
            // The eventfd also fires when the cgroup is removed.
            if !event_control_path.exists() {
                return;
            }
            on_oom();
        }
    })
}

/// Watches a cgroup v2 directory's `memory.events` and calls `on_oom` when `oom_kill` grows.
///
/// Ends by itself when `memory.events` disappears or `cgroup.events` reports
/// `populated 0` (no process left that could be OOM-killed).
pub fn watch_v2(dir: &Path, mut on_oom: OnOom) -> Result<OomWatcher, OomError> {
    let events_path = dir.join("memory.events");
    let populated_path = dir.join("cgroup.events");
    if !events_path.exists() && dir.join("cgroup.procs").exists() {
        return Err(OomError::NoMemoryEvents { path: events_path });
    }
    let inotify = Inotify::init(InitFlags::IN_CLOEXEC | InitFlags::IN_NONBLOCK)
        .map_err(|source| OomError::Sys { action: "create inotify", source })?;
    let events_wd = inotify
        .add_watch(&events_path, AddWatchFlags::IN_MODIFY | AddWatchFlags::IN_DELETE_SELF)
        .map_err(|source| OomError::Io { action: "watch", path: events_path.clone(), source: source.into() })?;
    // Absent on fake trees and on the root cgroup; then only memory.events decides.
    let populated_wd = inotify.add_watch(&populated_path, AddWatchFlags::IN_MODIFY).ok();
    // Read the baseline after the watch exists, so no increase can slip in between.
    let mut last = read_oom_kill(&events_path).unwrap_or(None).unwrap_or(0);

    spawn(move |stop| loop {
        match wait_readable(&inotify, stop) {
            Ok(Wake::Stop) => return,
            Ok(Wake::Event) => {}
            Err(e) => {
                log::warn!("OOM watcher for {}: poll: {e}", events_path.display());
                return;
            }
        }
        let (events_gone, populated_changed) = match drain(&inotify, &events_wd, populated_wd.as_ref()) {
            Ok(flags) => flags,
            Err(e) => {
                log::warn!("OOM watcher for {}: read inotify: {e}", events_path.display());
                return;
            }
        };
        match read_oom_kill(&events_path) {
            Ok(Some(count)) => {
                if count > last {
                    on_oom();
                }
                last = count;
            }
            // Partially written (a truncate seen before the write): wait for the next change.
            Ok(None) => {}
            Err(_) => return,
        }
        if events_gone || (populated_changed && is_unpopulated(&populated_path)) {
            return;
        }
    })
}

/// The `oom_kill` counter of a `memory.events` file's contents.
pub fn parse_oom_kill(memory_events: &str) -> Option<u64> {
    memory_events.lines().find_map(|line| {
        let (key, value) = line.split_once(char::is_whitespace)?;
        if key == "oom_kill" {
            value.trim().parse().ok()
        } else {
            None
        }
    })
}

/// Whether a `cgroup.events` file's contents say no process is left.
pub fn parse_unpopulated(cgroup_events: &str) -> bool {
    cgroup_events.lines().any(|line| line.split_whitespace().eq(["populated", "0"]))
}

enum Wake {
    Event,
    Stop,
}

fn spawn(body: impl FnOnce(&EventFd) + Send + 'static) -> Result<OomWatcher, OomError> {
    let stop = Arc::new(
        EventFd::from_flags(EfdFlags::EFD_CLOEXEC)
            .map_err(|source| OomError::Sys { action: "create eventfd", source })?,
    );
    let thread_stop = Arc::clone(&stop);
    let thread =
        thread::Builder::new().name("kyb-oom".into()).spawn(move || body(&thread_stop)).map_err(OomError::Spawn)?;
    Ok(OomWatcher { stop, thread: Some(thread) })
}

/// Blocks until `fd` is readable or `stop` is signalled.
fn wait_readable(fd: &impl AsFd, stop: &EventFd) -> Result<Wake, Errno> {
    loop {
        let mut fds = [PollFd::new(fd.as_fd(), PollFlags::POLLIN), PollFd::new(stop.as_fd(), PollFlags::POLLIN)];
        match poll(&mut fds, PollTimeout::NONE) {
            Err(Errno::EINTR) => continue,
            Err(e) => return Err(e),
            Ok(_) => {}
        }
        // A pending notification wins over stop: the OOM kill signals the fd before the victim
        // dies, and its exit is what stops the watch (handle_exit in task.rs), so both can be ready
        // at once if this thread was slow to wake. Checking stop first lost that TaskOOM.
        // The next poll sees stop; events are rare, so stop cannot be starved.
        if fds[0].revents().is_some_and(|r| !r.is_empty()) {
            return Ok(Wake::Event);
        }
        if fds[1].revents().is_some_and(|r| !r.is_empty()) {
            return Ok(Wake::Stop);
        }
    }
}

/// Reads all queued inotify events: (memory.events gone, cgroup.events changed).
fn drain(
    inotify: &Inotify,
    events_wd: &WatchDescriptor,
    populated_wd: Option<&WatchDescriptor>,
) -> Result<(bool, bool), Errno> {
    let mut gone = false;
    let mut populated_changed = false;
    loop {
        let batch = match inotify.read_events() {
            Ok(batch) => batch,
            Err(Errno::EAGAIN) => return Ok((gone, populated_changed)),
            Err(Errno::EINTR) => continue,
            Err(e) => return Err(e),
        };
        for event in batch {
            if event.wd == *events_wd
                && event.mask.intersects(AddWatchFlags::IN_DELETE_SELF | AddWatchFlags::IN_IGNORED)
            {
                gone = true;
            }
            if populated_wd == Some(&event.wd) {
                populated_changed = true;
            }
        }
    }
}

/// `Ok(None)` when the file has no `oom_kill` line (yet); `Err` when it cannot be read.
fn read_oom_kill(path: &Path) -> io::Result<Option<u64>> {
    std::fs::read_to_string(path).map(|content| parse_oom_kill(&content))
}

fn is_unpopulated(path: &Path) -> bool {
    std::fs::read_to_string(path).map(|content| parse_unpopulated(&content)).unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::{Child, Command, Stdio};
    use std::sync::mpsc;
    use std::time::{Duration, Instant};

    fn channel_callback() -> (OnOom, mpsc::Receiver<()>) {
        let (tx, rx) = mpsc::channel();
        (
            Box::new(move || {
                let _ = tx.send(());
            }),
            rx,
        )
    }

    fn wait_finished(watcher: &OomWatcher) -> bool {
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if watcher.is_finished() {
                return true;
            }
            thread::sleep(Duration::from_millis(10));
        }
        false
    }

    const EVENTS_0: &str = "low 0\nhigh 0\nmax 0\noom 0\noom_kill 0\noom_group_kill 0\n";

    #[test]
    fn parses_oom_kill() {
        assert_eq!(parse_oom_kill(EVENTS_0), Some(0));
        assert_eq!(parse_oom_kill("low 0\nmax 12\noom 3\noom_kill 2\n"), Some(2));
        assert_eq!(parse_oom_kill("oom_group_kill 4\n"), None);
        assert_eq!(parse_oom_kill(""), None);
        assert_eq!(parse_oom_kill("oom_kill x\n"), None);
    }

    #[test]
    fn parses_populated() {
        assert!(parse_unpopulated("populated 0\nfrozen 0\n"));
        assert!(!parse_unpopulated("populated 1\nfrozen 0\n"));
        assert!(!parse_unpopulated(""));
    }

    #[test]
    fn v2_fires_when_oom_kill_grows() {
        let dir = tempfile::tempdir().unwrap();
        let events = dir.path().join("memory.events");
        std::fs::write(&events, EVENTS_0.replace("oom_kill 0", "oom_kill 4")).unwrap();
        let (on_oom, rx) = channel_callback();
        let watcher = watch_v2(dir.path(), on_oom).unwrap();

        // Other counters changing is not an OOM kill.
        std::fs::write(&events, EVENTS_0.replace("max 0", "max 9").replace("oom_kill 0", "oom_kill 4")).unwrap();
        assert!(rx.recv_timeout(Duration::from_millis(300)).is_err(), "fired without an oom_kill increase");

        std::fs::write(&events, EVENTS_0.replace("oom_kill 0", "oom_kill 5")).unwrap();
        rx.recv_timeout(Duration::from_secs(5)).expect("no OOM callback");
        std::fs::write(&events, EVENTS_0.replace("oom_kill 0", "oom_kill 7")).unwrap();
        rx.recv_timeout(Duration::from_secs(5)).expect("no second OOM callback");
        assert!(!watcher.is_finished());

        // The file going away (cgroup removed) ends the watch.
        std::fs::remove_file(&events).unwrap();
        assert!(wait_finished(&watcher), "watcher did not stop after memory.events was removed");
        assert!(rx.try_recv().is_err());
    }

    #[test]
    fn v2_stops_when_cgroup_is_unpopulated() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("memory.events"), EVENTS_0).unwrap();
        std::fs::write(dir.path().join("cgroup.events"), "populated 1\nfrozen 0\n").unwrap();
        let (on_oom, rx) = channel_callback();
        let watcher = watch_v2(dir.path(), on_oom).unwrap();

        // The last process is OOM-killed: the counter and populated change together.
        std::fs::write(dir.path().join("memory.events"), EVENTS_0.replace("oom_kill 0", "oom_kill 1")).unwrap();
        std::fs::write(dir.path().join("cgroup.events"), "populated 0\nfrozen 0\n").unwrap();
        rx.recv_timeout(Duration::from_secs(5)).expect("no OOM callback");
        assert!(wait_finished(&watcher), "watcher did not stop after populated 0");
    }

    #[test]
    fn drop_stops_the_watch() {
        let dir = tempfile::tempdir().unwrap();
        let events = dir.path().join("memory.events");
        std::fs::write(&events, EVENTS_0).unwrap();
        let (on_oom, rx) = channel_callback();
        let watcher = watch_v2(dir.path(), on_oom).unwrap();
        drop(watcher);
        std::fs::write(&events, EVENTS_0.replace("oom_kill 0", "oom_kill 1")).unwrap();
        assert!(rx.recv_timeout(Duration::from_millis(200)).is_err());
    }

    #[test]
    fn an_oom_pending_when_the_watch_stops_is_still_reported() {
        // The container's exit stops the watch, and may do so before this thread woke up for
        // the OOM that killed it: the OOM must be reported before drop returns, not lost.
        for i in 0..50 {
            let dir = tempfile::tempdir().unwrap();
            let events = dir.path().join("memory.events");
            std::fs::write(&events, EVENTS_0).unwrap();
            let (on_oom, rx) = channel_callback();
            let watcher = watch_v2(dir.path(), on_oom).unwrap();
            std::fs::write(&events, EVENTS_0.replace("oom_kill 0", "oom_kill 1")).unwrap();
            drop(watcher);
            assert!(rx.try_recv().is_ok(), "round {i}: OOM pending at stop was lost");
        }
    }

    #[test]
    fn missing_memory_events_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let (on_oom, _rx) = channel_callback();
        let err = watch_v2(dir.path(), on_oom).unwrap_err();
        assert!(matches!(err, OomError::Io { .. }), "{err}");
        assert!(!err.is_unsupported(), "not a cgroup at all: a real error");
        let (on_oom, _rx) = channel_callback();
        let err = watch_v1(dir.path(), on_oom).unwrap_err();
        assert!(matches!(err, OomError::Io { .. }), "{err}");
    }

    #[test]
    fn a_v2_cgroup_without_the_memory_controller_is_unsupported_and_says_why() {
        // A cgroup's files on a v2 hierarchy without the memory controller (cgroup.procs there,
        // memory.events not): no thread is started, and the error names the file and the cause.
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("cgroup.procs"), "4242\n").unwrap();
        std::fs::write(dir.path().join("cgroup.controllers"), "hugetlb\n").unwrap();
        std::fs::write(dir.path().join("cgroup.events"), "populated 1\nfrozen 0\n").unwrap();
        let (on_oom, _rx) = channel_callback();
        let err = watch_v2(dir.path(), on_oom).unwrap_err();
        assert!(matches!(&err, OomError::NoMemoryEvents { path } if path.ends_with("memory.events")), "{err}");
        assert!(err.is_unsupported());
        let text = err.to_string();
        assert!(text.contains("memory.events does not exist") && text.contains("memory controller"), "{text}");
        assert!(OomError::NoMemoryCgroup { pid: 1 }.is_unsupported());
    }

    /// A v1 memory cgroup made for one test; kills its processes and removes it on drop.
    struct TestCgroup {
        dir: PathBuf,
        child: Option<Child>,
    }

    impl Drop for TestCgroup {
        fn drop(&mut self) {
            if let Some(child) = self.child.as_mut() {
                let _ = child.kill();
                let _ = child.wait();
            }
            let _ = std::fs::remove_dir(&self.dir);
        }
    }

    fn memory_v1_root() -> Option<PathBuf> {
        let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
        crate::cgroups::parse_mountinfo(&mountinfo).into_iter().find_map(|m| match m.kind {
            crate::cgroups::MountKind::V1 { options } if options.iter().any(|o| o == "memory") && m.root == "/" => {
                Some(m.mount_point)
            }
            _ => None,
        })
    }

    #[test]
    fn v1_real_cgroup_oom_fires_and_removal_ends_the_watch() {
        let Some(root) = memory_v1_root() else {
            eprintln!("SKIPPED: no cgroup v1 memory hierarchy mounted on this host");
            return;
        };
        let dir = root.join(format!("kbt-oom-test-{}", std::process::id()));
        if let Err(e) = std::fs::create_dir(&dir) {
            panic!(
                "cannot create test memory cgroup {} ({e}); this test needs root and a writable cgroup v1 \
                 memory hierarchy",
                dir.display()
            );
        }
        let mut cg = TestCgroup { dir: dir.clone(), child: None };
        let limit = (16u64 << 20).to_string();
        std::fs::write(dir.join("memory.limit_in_bytes"), &limit).unwrap();
        if dir.join("memory.memsw.limit_in_bytes").exists() {
            // Without this the allocation could go to swap instead of OOM.
            std::fs::write(dir.join("memory.memsw.limit_in_bytes"), &limit).unwrap();
        }

        let (on_oom, rx) = channel_callback();
        let watcher = watch_v1(&dir, on_oom).unwrap();

        // The child waits on stdin until it is in the cgroup, then allocates a 64 MiB buffer.
        let mut child = Command::new("/bin/sh")
            .args(["-c", "read go; exec dd if=/dev/zero of=/dev/null bs=64M count=1"])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        std::fs::write(dir.join("cgroup.procs"), child.id().to_string()).unwrap();
        let mut stdin = child.stdin.take().unwrap();
        cg.child = Some(child);
        stdin.write_all(b"go\n").unwrap();
        drop(stdin);

        rx.recv_timeout(Duration::from_secs(20)).expect("no OOM notification from the v1 memory cgroup");
        let status = cg.child.as_mut().unwrap().wait().unwrap();
        cg.child = None;
        assert!(!status.success(), "dd survived a 16 MiB limit: {status:?}");
        let oom_control = std::fs::read_to_string(dir.join("memory.oom_control")).unwrap();
        assert!(
            parse_v1_oom_kill(&oom_control).is_some_and(|n| n >= 1),
            "memory.oom_control shows no kill: {oom_control}"
        );

        std::fs::remove_dir(&dir).unwrap();
        assert!(wait_finished(&watcher), "watcher did not stop after the cgroup was removed");
    }

    fn parse_v1_oom_kill(oom_control: &str) -> Option<u64> {
        oom_control.lines().find_map(|l| l.strip_prefix("oom_kill ")?.trim().parse().ok())
    }
}
