//! `LibCuda` against the fake driver of test/fakes/libcuda.c, built into a temp dir per test:
//! the calls it makes (order, pids, lock timeout, cuInit before restore), the errors it reports,
//! and what it refuses to load.

use std::ffi::OsStr;
use std::process::Command;

use kybernate_gpu::cuda::{CudaDriver, CudaError, LibCuda, LoadError, ProcessState};
use kybernate_testbed::fakes::{FakeCall, FakeCuda, Sleeper};

fn fake(with_api: bool) -> (tempfile::TempDir, FakeCuda) {
    let dir = tempfile::tempdir().expect("temp dir");
    let fake = FakeCuda::build(dir.path(), with_api);
    (dir, fake)
}

fn load(fake: &FakeCuda) -> LibCuda {
    LibCuda::load(fake.lib.as_os_str()).expect("loading the fake libcuda")
}

/// The calls, without the error-name lookups.
fn driver_calls(fake: &FakeCuda) -> Vec<FakeCall> {
    fake.calls().into_iter().filter(|c| !c.function.starts_with("cuGetError")).collect()
}

fn call(function: &str, pid: i32, code: i32, extra: Option<&str>) -> FakeCall {
    FakeCall { function: function.into(), pid, code, extra: extra.map(str::to_string) }
}

#[test]
fn full_cycle_calls_the_driver_in_order() {
    let (_dir, fake) = fake(true);
    let cuda = load(&fake);
    let p = Sleeper::start();
    let pid = p.pid();

    assert_eq!(cuda.state(pid).unwrap(), ProcessState::Running);
    assert_eq!(cuda.restore_thread_id(pid).unwrap(), pid);
    cuda.lock(pid, 10_000).unwrap();
    assert_eq!(cuda.state(pid).unwrap(), ProcessState::Locked);
    cuda.checkpoint(pid).unwrap();
    assert_eq!(cuda.state(pid).unwrap(), ProcessState::Checkpointed);
    assert_eq!(fake.state_of(pid).as_deref(), Some("checkpointed"));
    cuda.restore(pid).unwrap();
    assert_eq!(cuda.state(pid).unwrap(), ProcessState::Locked);
    cuda.unlock(pid).unwrap();
    assert_eq!(cuda.state(pid).unwrap(), ProcessState::Running);
    assert_eq!(fake.state_of(pid).as_deref(), Some("running"));
    assert!(cuda.init_error().is_none());

    let get_state = |code| call("cuCheckpointProcessGetState", pid, code, None);
    assert_eq!(
        driver_calls(&fake),
        vec![
            get_state(0),
            call("cuCheckpointProcessGetRestoreThreadId", pid, 0, None),
            call("cuCheckpointProcessLock", pid, 0, Some("timeout=10000")),
            get_state(0),
            call("cuCheckpointProcessCheckpoint", pid, 0, None),
            get_state(0),
            call("cuInit", 0, 0, None),
            call("cuCheckpointProcessRestore", pid, 0, None),
            get_state(0),
            call("cuCheckpointProcessUnlock", pid, 0, None),
            get_state(0),
        ]
    );
}

#[test]
fn cu_init_runs_once_and_only_for_restore() {
    let (_dir, fake) = fake(true);
    let cuda = load(&fake);
    let p = Sleeper::start();
    let pid = p.pid();
    for _ in 0..2 {
        cuda.lock(pid, 0).unwrap();
        cuda.checkpoint(pid).unwrap();
        cuda.restore(pid).unwrap();
        cuda.unlock(pid).unwrap();
    }
    let calls = driver_calls(&fake);
    let inits: Vec<usize> = calls.iter().enumerate().filter(|(_, c)| c.function == "cuInit").map(|(i, _)| i).collect();
    assert_eq!(inits, vec![2], "one cuInit, right before the first restore: {calls:#?}");
    assert_eq!(calls[0].extra.as_deref(), Some("timeout=0"));
}

#[test]
fn driver_version_is_read_from_the_driver() {
    let (_dir, fake) = fake(true);
    let cuda = load(&fake);
    assert_eq!(cuda.driver_version().unwrap(), 12080);
    fake.set_driver_version(13000);
    assert_eq!(cuda.driver_version().unwrap(), 13000);
    fake.fail("driver_version", None, 3);
    let err = cuda.driver_version().unwrap_err();
    assert_eq!(
        err,
        CudaError { call: "cuDriverGetVersion", pid: 0, code: 3, name: "CUDA_ERROR_NOT_INITIALIZED".into() }
    );
}

#[test]
fn injected_failure_is_reported_with_call_pid_code_and_name() {
    let (_dir, fake) = fake(true);
    let cuda = load(&fake);
    let p = Sleeper::start();
    let pid = p.pid();

    fake.fail("lock", Some(pid), 909);
    let err = cuda.lock(pid, 500).unwrap_err();
    assert_eq!(err, CudaError { call: "cuCheckpointProcessLock", pid, code: 909, name: "CUDA_ERROR_TIMEOUT".into() });
    assert_eq!(err.to_string(), format!("cuCheckpointProcessLock (pid {pid}): CUDA_ERROR_TIMEOUT (909)"));
    // A failed call changes nothing and is logged with its code.
    assert_eq!(cuda.state(pid).unwrap(), ProcessState::Running);
    assert!(driver_calls(&fake).contains(&call("cuCheckpointProcessLock", pid, 909, Some("timeout=500"))));
    // The driver was asked for the name.
    assert!(fake.calls().contains(&call("cuGetErrorName", 0, 0, Some("error=909"))));

    fake.clear_failures();
    cuda.lock(pid, 500).unwrap();
    fake.fail("checkpoint", None, 999);
    let err = cuda.checkpoint(pid).unwrap_err();
    assert_eq!(
        (err.call, err.pid, err.code, err.name.as_str()),
        ("cuCheckpointProcessCheckpoint", pid, 999, "CUDA_ERROR_UNKNOWN")
    );
    assert_eq!(cuda.state(pid).unwrap(), ProcessState::Locked);
}

#[test]
fn codes_without_a_name_fall_back_to_the_number() {
    let (_dir, fake) = fake(true);
    let cuda = load(&fake);
    let p = Sleeper::start();
    fake.fail("get_state", None, 12345);
    let err = cuda.state(p.pid()).unwrap_err();
    assert_eq!((err.code, err.name.as_str()), (12345, "12345"));
}

#[test]
fn illegal_transitions_give_illegal_state() {
    let (_dir, fake) = fake(true);
    let cuda = load(&fake);
    let p = Sleeper::start();
    let pid = p.pid();
    let illegal = |r: Result<(), CudaError>, call: &str| {
        let err = r.unwrap_err();
        assert_eq!((err.call, err.pid, err.code, err.name.as_str()), (call, pid, 401, "CUDA_ERROR_ILLEGAL_STATE"));
    };
    illegal(cuda.checkpoint(pid), "cuCheckpointProcessCheckpoint"); // running
    illegal(cuda.restore(pid), "cuCheckpointProcessRestore"); // running
    illegal(cuda.unlock(pid), "cuCheckpointProcessUnlock"); // running
    cuda.lock(pid, 0).unwrap();
    illegal(cuda.lock(pid, 0), "cuCheckpointProcessLock"); // locked
    illegal(cuda.restore(pid), "cuCheckpointProcessRestore"); // locked
    cuda.checkpoint(pid).unwrap();
    illegal(cuda.unlock(pid), "cuCheckpointProcessUnlock"); // checkpointed
    illegal(cuda.checkpoint(pid), "cuCheckpointProcessCheckpoint"); // checkpointed
    assert_eq!(cuda.state(pid).unwrap(), ProcessState::Checkpointed);
}

#[test]
fn a_vanished_process_is_an_invalid_value() {
    let (_dir, fake) = fake(true);
    let cuda = load(&fake);
    let pid = {
        let p = Sleeper::start();
        p.pid()
    }; // killed and reaped
    let err = cuda.lock(pid, 0).unwrap_err();
    assert_eq!((err.code, err.name.as_str()), (1, "CUDA_ERROR_INVALID_VALUE"));
}

#[test]
fn failed_cu_init_is_recorded_and_restore_reports_its_own_error() {
    let (_dir, fake) = fake(true);
    let cuda = load(&fake);
    let p = Sleeper::start();
    let pid = p.pid();
    cuda.lock(pid, 0).unwrap();
    cuda.checkpoint(pid).unwrap();
    fake.fail("init", None, 999);
    let err = cuda.restore(pid).unwrap_err();
    // The fake, like the driver, restores only for a caller that initialised CUDA.
    assert_eq!(
        (err.call, err.code, err.name.as_str()),
        ("cuCheckpointProcessRestore", 3, "CUDA_ERROR_NOT_INITIALIZED")
    );
    assert_eq!(
        cuda.init_error(),
        Some(&CudaError { call: "cuInit", pid: 0, code: 999, name: "CUDA_ERROR_UNKNOWN".into() })
    );
    assert_eq!(cuda.state(pid).unwrap(), ProcessState::Checkpointed);
}

#[test]
fn driver_without_the_checkpoint_api_is_refused() {
    let (_dir, fake) = fake(false);
    match LibCuda::load(fake.lib.as_os_str()) {
        Err(e @ LoadError::MissingApi { .. }) => {
            let LoadError::MissingApi { path, symbol } = &e else { unreachable!() };
            assert_eq!(*symbol, "cuCheckpointProcessLock");
            assert_eq!(path, &fake.lib);
            assert!(e.to_string().contains("r570"), "{e}");
        }
        other => panic!("expected MissingApi, got {other:?}"),
    }
}

#[test]
fn nonexistent_path_is_an_open_error() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("libcuda.so.1");
    match LibCuda::load(missing.as_os_str()) {
        Err(LoadError::Open { path, message }) => {
            assert_eq!(path, missing);
            assert!(message.contains("libcuda.so.1"), "{message}");
        }
        other => panic!("expected LoadError::Open, got {other:?}"),
    }
    assert!(matches!(LibCuda::load(OsStr::new("")), Err(LoadError::Open { .. })));
}

/// The fake keys its state by the in-namespace pid, as the real driver keeps it inside the
/// process: a container restored by CRIU has the same in-namespace pids under new host pids.
#[test]
fn state_is_kept_by_the_innermost_pid() {
    let (_dir, fake) = fake(true);
    let cuda = load(&fake);
    // A `sleep` that is pid 1 of a new pid namespace (a user namespace too when not root).
    let mut unshare = Command::new("unshare");
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        unshare.args(["--user", "--map-root-user"]);
    }
    let child = unshare
        .args(["--pid", "--fork", "--kill-child", "sleep", "30"])
        .spawn()
        .expect("starting unshare (util-linux) for a pid namespace");
    let outer = Sleeper(child);
    let children = format!("/proc/{}/task/{}/children", outer.pid(), outer.pid());
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let pid = loop {
        let text = std::fs::read_to_string(&children).unwrap_or_default();
        if let Some(pid) = text.split_whitespace().next().and_then(|p| p.parse::<i32>().ok()) {
            break pid;
        }
        assert!(std::time::Instant::now() < deadline, "unshare started no child: can this host create pid namespaces?");
        std::thread::sleep(std::time::Duration::from_millis(20));
    };
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    assert!(status.lines().any(|l| l.starts_with("NSpid:") && l.trim_end().ends_with("\t1")), "{status}");

    cuda.lock(pid, 0).unwrap();
    assert_eq!(fake.state_of(1).as_deref(), Some("locked"));
    assert_eq!(fake.state_of(pid), None);
    assert_eq!(cuda.state(pid).unwrap(), ProcessState::Locked);
}
