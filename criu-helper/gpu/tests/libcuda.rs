//! `LibCuda` against the fake driver of test/fakes/libcuda.c, built into a temp dir per test:
//! the calls it makes (order, pids, lock timeout, cuInit before restore), the errors it reports,
//! and what it refuses to load; and the fake's realism the orchestration depends on: processes
//! without CUDA, lock timeouts and frozen threads, failures that leave processes locked,
//! checkpointed, failed or stuck, transient states, bytes moved, and GPU remapping.

use std::ffi::OsStr;
use std::process::Command;

use std::path::Path;
use std::time::{Duration, Instant};

use kybernate_gpu::cuda::{CudaDriver, CudaError, CudaProcess, GpuPair, GpuSession, LibCuda, LoadError, ProcessState};
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
    let p = Sleeper::start_cuda(&[]);
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
            call("cuCheckpointProcessCheckpoint", pid, 0, Some("bytes=0")),
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
    let p = Sleeper::start_cuda(&[]);
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
    let p = Sleeper::start_cuda(&[]);
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
    let p = Sleeper::start_cuda(&[]);
    fake.fail("get_state", None, 12345);
    let err = cuda.state(p.pid()).unwrap_err();
    assert_eq!((err.code, err.name.as_str()), (12345, "12345"));
}

#[test]
fn illegal_transitions_give_illegal_state() {
    let (_dir, fake) = fake(true);
    let cuda = load(&fake);
    let p = Sleeper::start_cuda(&[]);
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
        let p = Sleeper::start_cuda(&[]);
        p.pid()
    }; // killed and reaped
    let err = cuda.lock(pid, 0).unwrap_err();
    assert_eq!((err.code, err.name.as_str()), (1, "CUDA_ERROR_INVALID_VALUE"));
}

#[test]
fn failed_cu_init_is_recorded_and_restore_reports_its_own_error() {
    let (_dir, fake) = fake(true);
    let cuda = load(&fake);
    let p = Sleeper::start_cuda(&[]);
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
        .env("FAKE_CUDA_CONTEXT", "1")
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

const H100: &str = "NVIDIA H100 80GB HBM3";
const A100: &str = "NVIDIA A100-SXM4-80GB";
const GPU0: &str = "GPU-00000000-0000-0000-0000-000000000000";
const GPU1: &str = "GPU-11111111-1111-1111-1111-111111111111";
const GPU2: &str = "GPU-22222222-2222-2222-2222-222222222222";

fn not_initialized(r: Result<impl std::fmt::Debug, CudaError>, call: &str, pid: i32) {
    let err = r.unwrap_err();
    assert_eq!((err.call, err.pid, err.code, err.name.as_str()), (call, pid, 3, "CUDA_ERROR_NOT_INITIALIZED"));
    assert!(err.means_no_cuda());
}

/// A process without a CUDA context (an NVML sidecar, a forked worker) is refused by every call,
/// as the real driver refuses it; nothing about it is recorded.
#[test]
fn a_process_without_cuda_is_refused_by_every_call() {
    let (_dir, fake) = fake(true);
    let cuda = load(&fake);
    let p = Sleeper::start();
    let pid = p.pid();
    not_initialized(cuda.restore_thread_id(pid), "cuCheckpointProcessGetRestoreThreadId", pid);
    not_initialized(cuda.state(pid), "cuCheckpointProcessGetState", pid);
    not_initialized(cuda.lock(pid, 0), "cuCheckpointProcessLock", pid);
    not_initialized(cuda.checkpoint(pid), "cuCheckpointProcessCheckpoint", pid);
    not_initialized(cuda.restore(pid), "cuCheckpointProcessRestore", pid);
    not_initialized(cuda.unlock(pid), "cuCheckpointProcessUnlock", pid);
    assert_eq!(fake.state_of_pid(pid), None);
}

#[test]
fn the_restore_thread_is_a_thread_of_the_process() {
    let (_dir, fake) = fake(true);
    let cuda = load(&fake);
    let p = Sleeper::start_cuda(&[]);
    let tid = cuda.restore_thread_id(p.pid()).unwrap();
    assert!(Path::new(&format!("/proc/{}/task/{tid}", p.pid())).exists(), "{tid} is not a thread of {}", p.pid());
}

/// A busy process: a lock with a shorter timeout fails with CUDA_ERROR_TIMEOUT after that
/// timeout, a longer one (or none) waits and succeeds.
#[test]
fn lock_honours_its_timeout() {
    let (_dir, fake) = fake(true);
    let cuda = load(&fake);
    let p = Sleeper::start_cuda(&[]);
    let pid = p.pid();
    fake.delay("lock", Some(pid), 300);
    let started = Instant::now();
    let err = cuda.lock(pid, 50).unwrap_err();
    let waited = started.elapsed();
    assert_eq!((err.code, err.name.as_str()), (909, "CUDA_ERROR_TIMEOUT"));
    assert!(waited >= Duration::from_millis(50), "failed after {waited:?}, before its timeout");
    println!("lock with timeout 50 ms on a process busy for 300 ms failed after {waited:?}");
    assert_eq!(cuda.state(pid).unwrap(), ProcessState::Running);
    let started = Instant::now();
    cuda.lock(pid, 5_000).unwrap();
    assert!(started.elapsed() >= Duration::from_millis(300), "{:?}", started.elapsed());
    assert_eq!(cuda.state(pid).unwrap(), ProcessState::Locked);
}

/// The driver cannot lock threads that are stopped (or in a frozen cgroup).
#[test]
fn frozen_threads_cannot_be_locked() {
    let (_dir, fake) = fake(true);
    let cuda = load(&fake);
    let p = Sleeper::start_cuda(&[]);
    let pid = p.pid();
    // SAFETY: signals our own child.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGSTOP) }, 0);
    let stopped = || std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap().contains("State:\tT");
    let deadline = Instant::now() + Duration::from_secs(5);
    while !stopped() {
        assert!(Instant::now() < deadline, "pid {pid} did not stop");
        std::thread::sleep(Duration::from_millis(10));
    }
    let err = cuda.lock(pid, 20).unwrap_err();
    assert_eq!(err.code, 909, "{err}");
    assert!(fake
        .calls()
        .iter()
        .any(|c| c.function == "cuCheckpointProcessLock" && c.extra.as_deref() == Some("timeout=20 frozen")));
    // SAFETY: as above.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGCONT) }, 0);
    let deadline = Instant::now() + Duration::from_secs(5);
    while stopped() {
        assert!(Instant::now() < deadline, "pid {pid} did not continue");
        std::thread::sleep(Duration::from_millis(10));
    }
    cuda.lock(pid, 20).unwrap();
}

/// A failed call can leave the process locked, checkpointed, failed or stuck.
#[test]
fn failures_can_leave_the_process_elsewhere() {
    let (_dir, fake) = fake(true);
    let cuda = load(&fake);
    let p = Sleeper::start_cuda(&[]);
    let pid = p.pid();
    fake.fail_then("lock", Some(pid), 909, "locked");
    assert_eq!(cuda.lock(pid, 10).unwrap_err().code, 909);
    assert_eq!(cuda.state(pid).unwrap(), ProcessState::Locked, "a lock that timed out but locked");
    fake.clear_failures();
    fake.fail_then("checkpoint", Some(pid), 999, "checkpointed");
    assert_eq!(cuda.checkpoint(pid).unwrap_err().code, 999);
    assert_eq!(cuda.state(pid).unwrap(), ProcessState::Checkpointed);

    // An out-of-memory restore that leaves it stuck (NVIDIA/cuda-checkpoint#44): still reported
    // checkpointed, but no restore ever succeeds again, and it cannot be unlocked.
    fake.clear_failures();
    fake.fail_then("restore", Some(pid), 2, "stuck");
    let err = cuda.restore(pid).unwrap_err();
    assert_eq!((err.code, err.name.as_str()), (2, "CUDA_ERROR_OUT_OF_MEMORY"));
    fake.clear_failures();
    assert_eq!(cuda.state(pid).unwrap(), ProcessState::Checkpointed);
    let err = cuda.restore(pid).unwrap_err();
    assert_eq!((err.code, err.name.as_str()), (304, "CUDA_ERROR_OPERATING_SYSTEM"));
    assert_eq!(cuda.unlock(pid).unwrap_err().code, 401);

    let q = Sleeper::start_cuda(&[]);
    fake.fail_then("lock", Some(q.pid()), 999, "failed");
    assert!(cuda.lock(q.pid(), 0).is_err());
    fake.clear_failures();
    assert_eq!(cuda.state(q.pid()).unwrap(), ProcessState::Failed);
    assert_eq!(cuda.unlock(q.pid()).unwrap_err().code, 401);
}

/// While a checkpoint or restore takes time the driver reports CHECKPOINTING / RESTORING.
#[test]
fn slow_steps_pass_through_transient_states() {
    let (_dir, fake) = fake(true);
    let p = Sleeper::start_cuda(&[]);
    let pid = p.pid();
    fake.delay("checkpoint", Some(pid), 400);
    fake.delay("restore", Some(pid), 400);
    let cuda = load(&fake);
    cuda.lock(pid, 0).unwrap();
    let lib = fake.lib.clone();
    for (step, during) in [("checkpoint", ProcessState::Checkpointing), ("restore", ProcessState::Restoring)] {
        let lib = lib.clone();
        let worker = std::thread::spawn(move || {
            let cuda = LibCuda::load(lib.as_os_str()).unwrap();
            if step == "checkpoint" {
                cuda.checkpoint(pid)
            } else {
                cuda.restore(pid)
            }
        });
        let deadline = Instant::now() + Duration::from_secs(5);
        let begin = format!("cuCheckpointProcess{}{}.begin", &step[..1].to_uppercase(), &step[1..]);
        while !fake.calls().iter().any(|c| c.function == begin) {
            assert!(Instant::now() < deadline, "{step} never began: {:?}", fake.calls());
            std::thread::sleep(Duration::from_millis(5));
        }
        assert_eq!(cuda.state(pid).unwrap(), during);
        worker.join().unwrap().unwrap();
    }
    assert_eq!(cuda.state(pid).unwrap(), ProcessState::Locked);
}

#[test]
fn a_checkpoint_records_the_bytes_it_moves() {
    let (_dir, fake) = fake(true);
    fake.set_gpus(&[(GPU0, H100), (GPU1, H100)]);
    let cuda = load(&fake);
    let p = Sleeper::start_cuda(&["FAKE_CUDA_GPUS=0,1", "FAKE_CUDA_BYTES=4096"]);
    cuda.lock(p.pid(), 0).unwrap();
    cuda.checkpoint(p.pid()).unwrap();
    assert_eq!(fake.moved_bytes(p.pid()), Some(8192));
    assert_eq!(fake.gpus_of_pid(p.pid()), Some(vec![GPU0.to_string(), GPU1.to_string()]));
}

fn pair(old: &str, new: &str) -> GpuPair {
    GpuPair { old: old.into(), new: new.into() }
}

fn checkpointed_on(fake: &FakeCuda, cuda: &LibCuda, gpus: &str) -> Sleeper {
    let p = Sleeper::start_cuda(&[&format!("FAKE_CUDA_GPUS={gpus}")]);
    cuda.lock(p.pid(), 0).unwrap();
    cuda.checkpoint(p.pid()).unwrap();
    assert_eq!(fake.state_of_pid(p.pid()).as_deref(), Some("checkpointed"));
    p
}

/// Remapping: CUDA 13.0's restore arguments carry the pairs; a driver before it is refused before
/// any call; the fake checks the map (complete, onto existing GPUs of the same model).
#[test]
fn restore_onto_other_gpus() {
    let (_dir, fake) = fake(true);
    fake.set_gpus(&[(GPU0, H100), (GPU1, H100), (GPU2, A100)]);
    let cuda = load(&fake);

    // CUDA 12.8: refused here, the driver never sees the pairs.
    let p = checkpointed_on(&fake, &cuda, "0");
    let err = cuda.restore_onto(p.pid(), &[pair(GPU0, GPU1)]).unwrap_err();
    assert_eq!(err.code, 801);
    assert!(err.name.contains("CUDA 13.0") && err.name.contains("12.8"), "{err}");
    assert!(!fake.calls().iter().any(|c| c.function == "cuCheckpointProcessRestore"), "{:?}", fake.calls());

    fake.set_driver_version(13000);
    let bad = |pairs: &[GpuPair], code: i32| {
        let err = cuda.restore_onto(p.pid(), pairs).unwrap_err();
        assert_eq!(err.code, code, "{pairs:?}: {err}");
        assert_eq!(fake.state_of_pid(p.pid()).as_deref(), Some("checkpointed"));
    };
    bad(&[pair(GPU0, GPU2)], 101); // another model
    bad(&[pair(GPU1, GPU0)], 1); // not a GPU of the process
    bad(&[pair(GPU0, "GPU-99999999-9999-9999-9999-999999999999")], 101); // no such GPU
    bad(&[pair(GPU0, GPU1), pair(GPU0, GPU1)], 1); // mapped twice
    bad(&[pair("MIG-1", GPU1)], 1); // not a GPU UUID (refused by LibCuda)
    fake.fail("remap", Some(p.pid()), 999);
    bad(&[pair(GPU0, GPU1)], 999);
    fake.clear_failures();

    cuda.restore_onto(p.pid(), &[pair(GPU0, GPU1)]).unwrap();
    cuda.unlock(p.pid()).unwrap();
    assert_eq!(fake.gpus_of_pid(p.pid()), Some(vec![GPU1.to_string()]), "its state moved to GPU 1");
    let restore = fake.calls().into_iter().rfind(|c| c.function == "cuCheckpointProcessRestore" && c.code == 0);
    assert_eq!(restore.unwrap().extra.as_deref(), Some(format!("pairs={GPU0}>{GPU1}").as_str()));

    // Two GPUs swapped; every GPU the process holds must be mapped.
    let q = checkpointed_on(&fake, &cuda, "0,1");
    let err = cuda.restore_onto(q.pid(), &[pair(GPU0, GPU1)]).unwrap_err();
    assert_eq!(err.code, 1, "{err}");
    cuda.restore_onto(q.pid(), &[pair(GPU1, GPU0), pair(GPU0, GPU1)]).unwrap();
    assert_eq!(fake.gpus_of_pid(q.pid()), Some(vec![GPU1.to_string(), GPU0.to_string()]));
}

fn candidate(pid: i32) -> CudaProcess {
    CudaProcess { pid, ns_pid: pid, evidence: "/dev/nvidiactl open".into(), gpu_minors: vec![] }
}

/// The session against the fake: a non-CUDA candidate is skipped, and a failure that leaves a
/// process checkpointed is undone by what the driver reports.
#[test]
fn a_session_skips_processes_without_cuda_and_rolls_back_by_driver_state() {
    let (_dir, fake) = fake(true);
    let cuda = load(&fake);
    let (a, worker, b) = (Sleeper::start_cuda(&[]), Sleeper::start(), Sleeper::start_cuda(&[]));
    fake.fail_then("checkpoint", Some(b.pid()), 999, "checkpointed");
    let mut s = GpuSession::new(
        &cuda,
        Path::new("/proc"),
        vec![candidate(a.pid()), candidate(worker.pid()), candidate(b.pid())],
    );
    let e = s.lock_and_checkpoint(1000).unwrap_err();
    assert!(e.rollback.is_empty(), "{e}");
    assert_eq!(s.skipped().len(), 1);
    assert_eq!(s.skipped()[0].pid, worker.pid());
    assert_eq!(s.skipped()[0].driver_answer, "CUDA_ERROR_NOT_INITIALIZED (3)");
    for p in [&a, &b] {
        assert_eq!(fake.state_of_pid(p.pid()).as_deref(), Some("running"), "pid {}", p.pid());
    }
    let calls = fake.calls();
    assert!(
        !calls.iter().any(|c| c.pid == worker.pid() && c.function != "cuCheckpointProcessGetRestoreThreadId"),
        "{calls:?}"
    );
    // b: its failed checkpoint left it checkpointed, so the rollback restored and unlocked it.
    let of_b: Vec<&str> = calls
        .iter()
        .filter(|c| c.pid == b.pid() && c.function != "cuCheckpointProcessGetState")
        .map(|c| c.function.as_str())
        .collect();
    assert_eq!(
        of_b,
        [
            "cuCheckpointProcessGetRestoreThreadId",
            "cuCheckpointProcessLock",
            "cuCheckpointProcessCheckpoint",
            "cuCheckpointProcessRestore",
            "cuCheckpointProcessUnlock"
        ]
    );
    // All processes were locked before the first checkpoint.
    let last_lock = calls.iter().rposition(|c| c.function == "cuCheckpointProcessLock").unwrap();
    let first_checkpoint = calls.iter().position(|c| c.function == "cuCheckpointProcessCheckpoint").unwrap();
    assert!(last_lock < first_checkpoint, "{calls:?}");
}

const GPU3: &str = "GPU-33333333-3333-3333-3333-333333333333";

fn on_gpus(pid: i32, minors: &[u32]) -> CudaProcess {
    CudaProcess { pid, ns_pid: pid, evidence: "/dev/nvidiactl open".into(), gpu_minors: minors.to_vec() }
}

fn node_gpus() -> Vec<kybernate_gpu::GpuInfo> {
    [GPU0, GPU1, GPU2, GPU3]
        .iter()
        .enumerate()
        .map(|(i, uuid)| kybernate_gpu::GpuInfo {
            index: i as u32,
            model: H100.into(),
            uuid: uuid.to_string(),
            bus_id: format!("0000:{i:02x}:00.0"),
            minor: Some(i as u32),
        })
        .collect()
}

/// A multi-GPU container: a CUDA process per GPU and one on both. All are locked before any is
/// checkpointed; the checkpoints overlap (each takes 300 ms in the fake; the figure is printed);
/// the restore moves every GPU (0 → 2, 1 → 3), each process getting the pairs of its GPUs, the
/// restores overlapping too, and all restored before any is unlocked.
#[test]
fn multi_gpu_processes_are_locked_first_checkpointed_in_parallel_and_remapped() {
    let (_dir, fake) = fake(true);
    fake.set_gpus(&[(GPU0, H100), (GPU1, H100), (GPU2, H100), (GPU3, H100)]);
    fake.set_driver_version(13000);
    let both = Sleeper::start_cuda(&["FAKE_CUDA_GPUS=0,1", "FAKE_CUDA_BYTES=1000"]);
    let first = Sleeper::start_cuda(&["FAKE_CUDA_GPUS=0", "FAKE_CUDA_BYTES=1000"]);
    let second = Sleeper::start_cuda(&["FAKE_CUDA_GPUS=1", "FAKE_CUDA_BYTES=1000"]);
    let all = [&both, &first, &second];
    fake.delay("checkpoint", None, 300);
    let cuda = load(&fake);
    let candidates = vec![on_gpus(both.pid(), &[0, 1]), on_gpus(first.pid(), &[0]), on_gpus(second.pid(), &[1])];
    let mut s = GpuSession::new(&cuda, Path::new("/proc"), candidates);
    let started = Instant::now();
    s.lock_and_checkpoint(0).unwrap();
    let took = started.elapsed();
    println!("3 processes × 300 ms of GPU checkpoint each: {} ms in all (sequential: 900 ms)", took.as_millis());
    let calls = fake.calls();
    let last_lock = calls.iter().rposition(|c| c.function == "cuCheckpointProcessLock").unwrap();
    let first_begin = calls.iter().position(|c| c.function == "cuCheckpointProcessCheckpoint.begin").unwrap();
    assert!(last_lock < first_begin, "all locked before any checkpoint: {calls:?}");
    // Parallel: every checkpoint began before the first one finished.
    let begins: Vec<usize> = calls
        .iter()
        .enumerate()
        .filter(|(_, c)| c.function == "cuCheckpointProcessCheckpoint.begin")
        .map(|(i, _)| i)
        .collect();
    let first_done = calls.iter().position(|c| c.function == "cuCheckpointProcessCheckpoint").unwrap();
    assert_eq!(begins.len(), 3, "{calls:?}");
    assert!(begins.iter().all(|&b| b < first_done), "the checkpoints did not overlap: {calls:?}");
    for p in all {
        assert_eq!(fake.state_of_pid(p.pid()).as_deref(), Some("checkpointed"));
    }
    assert_eq!(fake.moved_bytes(both.pid()), Some(2000));
    let records = s.records();
    s.processes_exited(); // the restore below plays the restored container

    let pair = |o: &str, n: &str| GpuPair { old: o.into(), new: n.into() };
    let pairs = [pair(GPU0, GPU2), pair(GPU1, GPU3)];
    let pids: Vec<i32> = all.iter().map(|p| p.pid()).collect();
    let mut phases = std::collections::BTreeMap::new();
    fake.delay("restore", None, 300);
    let before = fake.calls().len();
    let started = Instant::now();
    kybernate_gpu::cuda::restore_processes(
        &cuda,
        Path::new("/proc"),
        &records,
        &pids,
        &pairs,
        &node_gpus(),
        &mut phases,
    )
    .unwrap();
    println!(
        "3 processes × 300 ms of GPU restore each: {} ms in all (sequential: 900 ms)",
        started.elapsed().as_millis()
    );
    let calls = fake.calls()[before..].to_vec();
    let begins: Vec<usize> = calls
        .iter()
        .enumerate()
        .filter(|(_, c)| c.function == "cuCheckpointProcessRestore.begin")
        .map(|(i, _)| i)
        .collect();
    let first_done = calls.iter().position(|c| c.function == "cuCheckpointProcessRestore").unwrap();
    let first_unlock = calls.iter().position(|c| c.function == "cuCheckpointProcessUnlock").unwrap();
    let last_restore = calls.iter().rposition(|c| c.function == "cuCheckpointProcessRestore").unwrap();
    assert!(begins.len() == 3 && begins.iter().all(|&b| b < first_done), "restores did not overlap: {calls:?}");
    assert!(last_restore < first_unlock, "all restored before any unlocked: {calls:?}");
    assert_eq!(fake.gpus_of_pid(both.pid()), Some(vec![GPU2.to_string(), GPU3.to_string()]));
    assert_eq!(fake.gpus_of_pid(first.pid()), Some(vec![GPU2.to_string()]));
    assert_eq!(fake.gpus_of_pid(second.pid()), Some(vec![GPU3.to_string()]));
    for p in all {
        assert_eq!(fake.state_of_pid(p.pid()).as_deref(), Some("running"));
    }
}

/// Multi-GPU, a failure at every step of every process (also one that leaves the process
/// locked or checkpointed): nothing is left locked or checkpointed.
#[test]
fn multi_gpu_failure_at_every_step_leaves_nothing_locked() {
    for step in ["lock", "checkpoint"] {
        for victim in 0..3 {
            for then in [None, Some("locked"), Some("checkpointed")] {
                if step == "lock" && then == Some("checkpointed") {
                    continue;
                }
                let (_dir, fake) = fake(true);
                fake.set_gpus(&[(GPU0, H100), (GPU1, H100)]);
                let procs = [
                    Sleeper::start_cuda(&["FAKE_CUDA_GPUS=0,1"]),
                    Sleeper::start_cuda(&["FAKE_CUDA_GPUS=0"]),
                    Sleeper::start_cuda(&["FAKE_CUDA_GPUS=1"]),
                ];
                let pid = procs[victim].pid();
                match then {
                    Some(t) => fake.fail_then(step, Some(pid), 999, t),
                    None => fake.fail(step, Some(pid), 999),
                }
                let cuda = load(&fake);
                let candidates = procs.iter().map(|p| on_gpus(p.pid(), &[])).collect();
                let mut s = GpuSession::new(&cuda, Path::new("/proc"), candidates);
                let e = s.lock_and_checkpoint(0).unwrap_err();
                assert!(e.rollback.is_empty(), "{step} {victim} {then:?}: {e}");
                for p in &procs {
                    let state = fake.state_of_pid(p.pid()).unwrap_or_else(|| "running".into());
                    assert_eq!(
                        state,
                        "running",
                        "{step} of process {victim} → {then:?}: pid {}: {:?}",
                        p.pid(),
                        fake.calls()
                    );
                }
            }
        }
    }
}
