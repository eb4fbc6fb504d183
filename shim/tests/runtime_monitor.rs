//! `MonitorSpawner` under the conditions of the running shim: a thread reaps every child with
//! `waitpid(-1)` and reports exits through containerd-shim's monitor (what its SIGCHLD thread
//! does), and this process is a child subreaper, so container processes come back to it.
//!
//! One test only: the reaper would steal the children of any test running beside it. Everything
//! that uses `Command::output` (bundle setup, the cleanup guard) runs while the reaper is stopped.

use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use containerd_shim::monitor::monitor_notify_by_pid;
use kybernate_shim::runtime::{
    Capture, ChildStdio, ContainerStatus, CreateOpts, MonitorSpawner, OciRuntime, RunOutput, RuntimeError, RuntimeOpts,
    Spawner,
};
mod common;

use common::{pipe, read_to_eof, wait_for_status};
use kybernate_testbed::{scratch_dir, unique_name, Bundle, Runc};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};

const RUNC: &str = "/usr/bin/runc";
const TIMEOUT: Duration = Duration::from_secs(20);

/// Emulates containerd-shim's reaper: `waitpid(-1)` for every child, exits to the monitor.
struct Reaper {
    stop: Arc<AtomicBool>,
    reaped: Arc<AtomicUsize>,
    thread: Option<JoinHandle<()>>,
}

impl Reaper {
    fn start() -> Reaper {
        let stop = Arc::new(AtomicBool::new(false));
        let reaped = Arc::new(AtomicUsize::new(0));
        let (s, r) = (Arc::clone(&stop), Arc::clone(&reaped));
        let thread = std::thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                let (pid, code) = match waitpid(None, Some(WaitPidFlag::WNOHANG)) {
                    Ok(WaitStatus::Exited(pid, code)) => (pid, code),
                    Ok(WaitStatus::Signaled(pid, sig, _)) => (pid, 128 + sig as i32),
                    Ok(_) | Err(_) => {
                        std::thread::sleep(Duration::from_micros(200));
                        continue;
                    }
                };
                r.fetch_add(1, Ordering::Relaxed);
                monitor_notify_by_pid(pid.as_raw(), code).expect("monitor notify");
            }
        });
        Reaper { stop, reaped, thread: Some(thread) }
    }

    fn reaped(&self) -> usize {
        self.reaped.load(Ordering::Relaxed)
    }
}

impl Drop for Reaper {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[test]
fn monitor_spawner_survives_a_reaper_thread() {
    // SAFETY: geteuid has no preconditions.
    assert_eq!(unsafe { libc::geteuid() }, 0, "runtime_monitor needs root (runc does)");
    let scratch = scratch_dir().expect("scratch dir");
    let root = scratch.path().join("runc");
    let _guard = Runc::new(&root).expect("runc root");
    let id = unique_name("mon");
    let bundle = Bundle::busybox(&scratch.path().join("bundle"), &["sh", "-c", "echo up; exec sleep 1000 >/dev/null"])
        .expect("bundle");
    let failing = Bundle::busybox(&scratch.path().join("failing"), &["/nonexistent"]).expect("bundle");
    nix::sys::prctl::set_child_subreaper(true).expect("PR_SET_CHILD_SUBREAPER");

    let reaper = Reaper::start();

    // Many short runs: every exit code and all output arrive although the reaper reaps them all.
    let runs = 300;
    for i in 0..runs {
        let mut cmd = Command::new("/bin/sh");
        cmd.args(["-c", "cat; echo e$0 >&2; exit 3", &i.to_string()]).stdout(Stdio::null()).stderr(Stdio::null());
        let out = MonitorSpawner.run(cmd, Some(b"in"), Capture { stdout: true, stderr: true }).expect("run");
        assert_eq!(out, RunOutput { code: 3, stdout: b"in".to_vec(), stderr: format!("e{i}\n").into_bytes() });
    }
    let mut cmd = Command::new("/bin/sh");
    cmd.args(["-c", "kill -9 $$"]);
    assert_eq!(MonitorSpawner.run(cmd, None, Capture::default()).expect("run").code, 137);
    let e = MonitorSpawner.run(Command::new("/nonexistent/runc"), None, Capture::default()).expect_err("no binary");
    assert_eq!(e.kind(), std::io::ErrorKind::NotFound);
    assert!(reaper.reaped() > runs, "the reaper reaped only {} children", reaper.reaped());

    // A real container whose processes come back to this subreaper, as they do to the shim.
    let opts =
        RuntimeOpts { binary: RUNC.into(), root: root.clone(), systemd_cgroup: false, criu: None, criu_env: vec![] };
    let rt = OciRuntime::new(opts, Arc::new(MonitorSpawner));
    let b = bundle.dir();
    let create =
        CreateOpts { pid_file: b.join("init.pid"), console_socket: None, no_pivot: false, no_new_keyring: false };
    let (out_r, out_w) = pipe();
    rt.create(&id, b, &create, ChildStdio { stdin: None, stdout: Some(out_w), stderr: None }).expect("create");
    let out = read_to_eof(out_r);
    rt.start(&id, b).expect("start");
    assert_eq!(out.recv_timeout(TIMEOUT).expect("container output"), "up\n");
    wait_for_status(&rt, &id, b, ContainerStatus::Running);
    let pid: i32 = std::fs::read_to_string(b.join("init.pid")).expect("pid file").trim().parse().expect("pid");
    assert!(rt.ps(&id, b).expect("ps").contains(&pid));
    rt.kill(&id, b, 9, false).expect("kill");
    wait_for_status(&rt, &id, b, ContainerStatus::Stopped);
    assert!(rt.kill(&id, b, 9, false).expect_err("kill of a stopped container").is_not_running());
    rt.delete(&id, b, false).expect("delete");
    assert!(rt.state(&id, b).expect_err("state after delete").is_not_found());

    let f = failing.dir();
    let create =
        CreateOpts { pid_file: f.join("init.pid"), console_socket: None, no_pivot: false, no_new_keyring: false };
    let e = rt.create(&id, f, &create, ChildStdio::default()).expect_err("create of /nonexistent");
    assert!(matches!(e, RuntimeError::Failed { .. }) && e.to_string().contains("/nonexistent"), "{e}");
    rt.delete(&id, f, true).expect("delete --force");

    drop(reaper);
}
