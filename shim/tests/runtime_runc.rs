//! `OciRuntime` against the real runc 1.1.5: a busybox container's whole life through every method,
//! and runc's own words when it fails. Needs root and busybox-static (see `test/setup.sh`).
//!
//! `DirectSpawner`: no reaper thread runs in a test process. The container's processes outlive the
//! runc invocations that made them and get reparented to PID 1, which reaps them.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use kybernate_shim::runtime::{
    ChildStdio, ContainerStatus, CreateOpts, DirectSpawner, ExecOpts, OciRuntime, RuntimeError, RuntimeOpts,
};
mod common;

use common::{pipe, read_to_eof, wait_for_status};
use kybernate_testbed::{scratch_dir, unique_name, Bundle, Runc};

const RUNC: &str = "/usr/bin/runc";
const TIMEOUT: Duration = Duration::from_secs(20);

fn check_preconditions() {
    // SAFETY: geteuid has no preconditions.
    assert_eq!(unsafe { libc::geteuid() }, 0, "runtime_runc tests need root (runc does)");
    assert!(Path::new(RUNC).exists(), "{RUNC} is missing; run test/setup.sh");
}

fn runtime(root: &Path) -> OciRuntime {
    let opts =
        RuntimeOpts { binary: RUNC.into(), root: root.into(), systemd_cgroup: false, criu: None, criu_env: vec![] };
    OciRuntime::new(opts, Arc::new(DirectSpawner))
}

fn create_opts(bundle: &Path) -> CreateOpts {
    CreateOpts { pid_file: bundle.join("init.pid"), console_socket: None, no_pivot: false, no_new_keyring: false }
}

fn recv(rx: &mpsc::Receiver<String>, what: &str) -> String {
    rx.recv_timeout(TIMEOUT).unwrap_or_else(|e| panic!("no EOF on {what} within {TIMEOUT:?}: {e}"))
}

fn read_pid(path: &Path) -> i32 {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    text.trim().parse().unwrap_or_else(|e| panic!("pid file {} holds {text:?}: {e}", path.display()))
}

/// The memory limit of `pid`'s cgroup, on cgroup v1 or v2.
fn memory_limit(pid: i32) -> String {
    let cgroups = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).expect("reading /proc/PID/cgroup");
    for line in cgroups.lines() {
        let mut parts = line.splitn(3, ':');
        let (_, controllers, path) = (parts.next(), parts.next().unwrap_or(""), parts.next().unwrap_or(""));
        let path = path.trim_start_matches('/');
        if controllers.split(',').any(|c| c == "memory") {
            let file = PathBuf::from("/sys/fs/cgroup/memory").join(path).join("memory.limit_in_bytes");
            return std::fs::read_to_string(&file).expect("memory.limit_in_bytes").trim().to_string();
        }
        if controllers.is_empty() && Path::new("/sys/fs/cgroup/cgroup.controllers").exists() {
            let file = PathBuf::from("/sys/fs/cgroup").join(path).join("memory.max");
            return std::fs::read_to_string(&file).expect("memory.max").trim().to_string();
        }
    }
    panic!("no memory cgroup for pid {pid} in {cgroups:?}");
}

fn alive(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat.rsplit_once(')').map(|(_, rest)| !rest.trim_start().starts_with('Z')).unwrap_or(false),
        Err(_) => false,
    }
}

#[test]
fn container_lifecycle_through_every_method() {
    check_preconditions();
    let scratch = scratch_dir().expect("scratch dir");
    let root = scratch.path().join("runc");
    // Declared after the scratch dir: on a panic it deletes the containers before the dir goes.
    let _guard = Runc::new(&root).expect("runc root");
    let id = unique_name("life");
    let bundle_dir = scratch.path().join("bundle");
    let script = "read name; echo hello $name; echo to-stderr >&2; exec sleep 1000 </dev/null >/dev/null 2>&1";
    let bundle = Bundle::busybox(&bundle_dir, &["sh", "-c", script]).expect("bundle");
    let b = bundle.dir();
    let rt = runtime(&root);

    // create, with the container's stdio on our pipes.
    let (in_r, in_w) = pipe();
    let (out_r, out_w) = pipe();
    let (err_r, err_w) = pipe();
    let stdio = ChildStdio { stdin: Some(in_r), stdout: Some(out_w), stderr: Some(err_w) };
    rt.create(&id, b, &create_opts(b), stdio).expect("create");
    let out = read_to_eof(out_r);
    let err = read_to_eof(err_r);
    let pid = read_pid(&b.join("init.pid"));
    let state = rt.state(&id, b).expect("state after create");
    assert_eq!((state.id.as_str(), state.pid, state.status), (id.as_str(), pid, ContainerStatus::Created));
    assert_eq!(state.bundle, b);

    // start: the process reads our stdin and writes to our pipes.
    rt.start(&id, b).expect("start");
    let mut stdin = std::fs::File::from(in_w);
    stdin.write_all(b"kybernate\n").expect("writing the container's stdin");
    drop(stdin);
    assert_eq!(recv(&out, "stdout"), "hello kybernate\n");
    assert_eq!(recv(&err, "stderr"), "to-stderr\n");
    wait_for_status(&rt, &id, b, ContainerStatus::Running);

    assert!(rt.ps(&id, b).expect("ps").contains(&pid));

    // exec, with its own stdio; the process file is gone afterwards.
    let (exec_out_r, exec_out_w) = pipe();
    let exec_out = read_to_eof(exec_out_r);
    let mut process = oci_spec::runtime::Process::default();
    process.set_args(Some(vec!["sh".into(), "-c".into(), "echo exec says $MARK".into()]));
    process.set_env(Some(vec!["PATH=/bin".into(), "MARK=hi".into()]));
    let process = serde_json::to_value(&process).unwrap();
    let exec_opts = ExecOpts { pid_file: b.join("e1.pid"), console_socket: None };
    let exec_stdio = ChildStdio { stdin: None, stdout: Some(exec_out_w), stderr: None };
    rt.exec(&id, b, &process, &exec_opts, exec_stdio).expect("exec");
    assert!(read_pid(&b.join("e1.pid")) > 0);
    assert_eq!(recv(&exec_out, "exec stdout"), "exec says hi\n");
    let leftovers: Vec<String> = std::fs::read_dir(b)
        .expect("listing the bundle")
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains("process"))
        .collect();
    assert!(leftovers.is_empty(), "exec process files left: {leftovers:?}");

    rt.pause(&id, b).expect("pause");
    assert_eq!(rt.state(&id, b).expect("state").status, ContainerStatus::Paused);
    rt.resume(&id, b).expect("resume");
    assert_eq!(rt.state(&id, b).expect("state").status, ContainerStatus::Running);

    let limit: u64 = 48 << 20;
    rt.update(&id, b, &serde_json::json!({ "memory": { "limit": limit } })).expect("update");
    assert_eq!(memory_limit(pid), limit.to_string());

    // A container that is running cannot be deleted without force: runc's words come back.
    let e = rt.delete(&id, b, false).expect_err("delete of a running container");
    assert!(matches!(e, RuntimeError::Failed { .. }), "{e:?}");
    assert!(e.to_string().contains("running"), "{e}");

    rt.kill(&id, b, 9, false).expect("kill");
    wait_for_status(&rt, &id, b, ContainerStatus::Stopped);
    let e = rt.kill(&id, b, 9, false).expect_err("kill of a stopped container");
    assert!(e.is_not_running(), "{e}");

    rt.delete(&id, b, false).expect("delete");
    assert!(!root.join(&id).exists(), "runc state left in {}", root.display());
    let e = rt.state(&id, b).expect_err("state after delete");
    assert!(e.is_not_found(), "{e}");
    let e = rt.kill(&id, b, 9, false).expect_err("kill after delete");
    assert!(e.is_not_found(), "{e}");
    let e = rt.delete(&id, b, false).expect_err("delete after delete");
    assert!(e.is_not_found(), "{e}");
    rt.delete(&id, b, true).expect("delete --force of an unknown container succeeds");
}

#[test]
fn failing_create_carries_runcs_message() {
    check_preconditions();
    let scratch = scratch_dir().expect("scratch dir");
    let root = scratch.path().join("runc");
    let _guard = Runc::new(&root).expect("runc root");
    let id = unique_name("fail");
    let bundle = Bundle::busybox(&scratch.path().join("bundle"), &["/nonexistent"]).expect("bundle");
    let b = bundle.dir();
    let rt = runtime(&root);

    let e = rt.create(&id, b, &create_opts(b), ChildStdio::default()).expect_err("create of /nonexistent");
    match &e {
        RuntimeError::Failed { subcommand, code, message, .. } => {
            assert_eq!(subcommand, "create");
            assert_ne!(*code, 0);
            assert!(message.contains("/nonexistent") && message.contains("no such file"), "{message}");
        }
        other => panic!("expected Failed, got {other:?}"),
    }
    let text = e.to_string();
    assert!(text.starts_with("runc create failed: ") && !text.contains("failed: runc create failed"), "{text}");

    rt.delete(&id, b, true).expect("delete --force after a failed create");
    assert!(!root.join(&id).exists(), "runc state left in {}", root.display());
    assert!(rt.state(&id, b).expect_err("state after delete").is_not_found());
}

#[test]
fn delete_force_kills_a_running_container_and_leaves_no_state() {
    check_preconditions();
    let scratch = scratch_dir().expect("scratch dir");
    let root = scratch.path().join("runc");
    let _guard = Runc::new(&root).expect("runc root");
    let id = unique_name("force");
    let bundle = Bundle::busybox(&scratch.path().join("bundle"), &["sleep", "1000"]).expect("bundle");
    let b = bundle.dir();
    let rt = runtime(&root);

    rt.create(&id, b, &create_opts(b), ChildStdio::default()).expect("create");
    rt.start(&id, b).expect("start");
    let pid = read_pid(&b.join("init.pid"));
    wait_for_status(&rt, &id, b, ContainerStatus::Running);

    rt.delete(&id, b, true).expect("delete --force");
    assert!(!root.join(&id).exists(), "runc state left in {}", root.display());
    assert!(rt.state(&id, b).expect_err("state after delete").is_not_found());
    let deadline = Instant::now() + TIMEOUT;
    while alive(pid) {
        assert!(Instant::now() < deadline, "container init {pid} still alive after delete --force");
        std::thread::sleep(Duration::from_millis(20));
    }
}
