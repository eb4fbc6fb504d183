//! `kybernate cuda-checkpoint` and the `cuda-checkpoint` symlink against the fake driver of
//! test/fakes/libcuda.c: NVIDIA's command line, and the output formats CRIU's CUDA plugin
//! (plugins/cuda/cuda_plugin.c) parses, with stdout and stderr on one pipe as the plugin reads them.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use kybernate_testbed::fakes::{FakeCall, FakeCuda, Sleeper};

const KYBERNATE: &str = env!("CARGO_BIN_EXE_kybernate");

/// A node: the fake driver, a config whose `[checkpoint] libcuda` names it, and a bin dir with
/// a `cuda-checkpoint` symlink to the binary.
struct Node {
    tmp: tempfile::TempDir,
    fake: FakeCuda,
    config: PathBuf,
    bin: PathBuf,
}

impl Node {
    fn new() -> Self {
        Self::with_driver(true)
    }

    fn with_driver(with_checkpoint_api: bool) -> Self {
        let tmp = tempfile::tempdir().unwrap();
        let fake = FakeCuda::build(&tmp.path().join("driver"), with_checkpoint_api);
        let config = tmp.path().join("config.toml");
        fs::write(&config, format!("[checkpoint]\nlibcuda = {:?}\n", fake.lib.to_str().unwrap())).unwrap();
        let bin = tmp.path().join("bin");
        fs::create_dir(&bin).unwrap();
        std::os::unix::fs::symlink(KYBERNATE, bin.join("cuda-checkpoint")).unwrap();
        Self { tmp, fake, config, bin }
    }

    /// `kybernate --config <config> cuda-checkpoint ARGS`.
    fn kybernate(&self, args: &[&str]) -> Output {
        Command::new(KYBERNATE)
            .arg("--config")
            .arg(&self.config)
            .arg("cuda-checkpoint")
            .args(args)
            .env_remove("KYBERNATE_CONFIG")
            .current_dir(self.tmp.path())
            .output()
            .unwrap()
    }

    /// `cuda-checkpoint ARGS` found on PATH, as CRIU's plugin runs it (execvp), with the config
    /// from `$KYBERNATE_CONFIG`.
    fn tool(&self, args: &[&str]) -> Output {
        let path = format!("{}:/usr/bin:/bin", self.bin.display());
        Command::new("cuda-checkpoint")
            .args(args)
            .env("PATH", path)
            .env("KYBERNATE_CONFIG", &self.config)
            .current_dir(self.tmp.path())
            .output()
            .unwrap()
    }

    fn checkpoint_calls(&self) -> Vec<FakeCall> {
        self.fake.calls().into_iter().filter(|c| !c.function.starts_with("cuGetError")).collect()
    }
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[track_caller]
fn assert_code(out: &Output, code: i32) {
    assert_eq!(out.status.code(), Some(code), "stdout: {}\nstderr: {}", stdout(out), stderr(out));
}

/// Succeeds with exactly `expected` on stdout and nothing on stderr (CRIU reads both as one).
#[track_caller]
fn assert_prints(out: &Output, expected: &str) {
    assert_code(out, 0);
    assert_eq!(stdout(out), expected);
    assert_eq!(stderr(out), "");
}

/// CRIU's parse of `--get-restore-tid`: a decimal, then only whitespace.
fn criu_parse_tid(text: &str) -> Option<i32> {
    let digits = text.trim_end_matches(|c: char| c.is_ascii_whitespace());
    digits.parse().ok().filter(|&v| v > 0)
}

fn call(function: &str, pid: i32, extra: Option<&str>) -> FakeCall {
    FakeCall { function: function.into(), pid, code: 0, extra: extra.map(str::to_string) }
}

#[test]
fn get_state_prints_the_state_word() {
    let node = Node::new();
    let p = Sleeper::start_cuda(&[]);
    let pid = p.pid().to_string();
    assert_prints(&node.kybernate(&["--get-state", "--pid", &pid]), "running\n");
    assert_prints(&node.tool(&["--get-state", "--pid", &pid]), "running\n");
    // --output does not change the format CRIU parses.
    assert_prints(&node.kybernate(&["-o", "json", "--get-state", "--pid", &pid]), "running\n");
    assert_eq!(node.fake.calls().last().unwrap(), &call("cuCheckpointProcessGetState", p.pid(), None));
}

#[test]
fn toggle_twice_round_trips() {
    let node = Node::new();
    let p = Sleeper::start_cuda(&[]);
    let pid = p.pid().to_string();

    assert_prints(&node.tool(&["--toggle", "--pid", &pid]), "");
    assert_prints(&node.tool(&["--get-state", "--pid", &pid]), "checkpointed\n");
    assert_prints(&node.kybernate(&["--toggle", "-p", &pid]), "");
    assert_prints(&node.kybernate(&["--get-state", "-p", &pid]), "running\n");

    let get_state = call("cuCheckpointProcessGetState", p.pid(), None);
    assert_eq!(
        node.checkpoint_calls(),
        vec![
            get_state.clone(),
            call("cuCheckpointProcessLock", p.pid(), Some("timeout=0")),
            call("cuCheckpointProcessCheckpoint", p.pid(), Some("bytes=0")),
            get_state.clone(),
            get_state.clone(),
            call("cuInit", 0, None),
            call("cuCheckpointProcessRestore", p.pid(), None),
            call("cuCheckpointProcessUnlock", p.pid(), None),
            get_state,
        ]
    );
}

#[test]
fn actions_follow_the_cycle_and_lock_passes_the_timeout() {
    let node = Node::new();
    let p = Sleeper::start_cuda(&[]);
    let pid = p.pid().to_string();
    assert_prints(&node.tool(&["--action", "lock", "--pid", &pid, "--timeout", "500"]), "");
    assert_eq!(node.fake.state_of(p.pid()).as_deref(), Some("locked"));
    assert_prints(&node.tool(&["--action", "checkpoint", "--pid", &pid]), "");
    assert_eq!(node.fake.state_of(p.pid()).as_deref(), Some("checkpointed"));
    assert_prints(&node.kybernate(&["--action", "restore", "--pid", &pid]), "");
    assert_prints(&node.kybernate(&["--action", "unlock", "-p", &pid]), "");
    assert_eq!(node.fake.state_of(p.pid()).as_deref(), Some("running"));
    assert_prints(&node.kybernate(&["--action", "lock", "-p", &pid, "-t", "250"]), "");

    let locks: Vec<_> =
        node.checkpoint_calls().into_iter().filter(|c| c.function == "cuCheckpointProcessLock").collect();
    assert_eq!(
        locks,
        vec![
            call("cuCheckpointProcessLock", p.pid(), Some("timeout=500")),
            call("cuCheckpointProcessLock", p.pid(), Some("timeout=250"))
        ]
    );
}

#[test]
fn get_restore_tid_prints_the_tid_as_criu_parses_it() {
    let node = Node::new();
    let p = Sleeper::start_cuda(&[]);
    let pid = p.pid().to_string();
    let out = node.tool(&["--get-restore-tid", "--pid", &pid]);
    assert_prints(&out, &format!("{pid}\n"));
    assert_eq!(criu_parse_tid(&stdout(&out)), Some(p.pid()));
    assert_prints(&node.kybernate(&["--get-restore-tid", "--pid", &pid]), &format!("{pid}\n"));
}

#[test]
fn driver_failure_exits_1_with_the_cuda_error_name() {
    let node = Node::new();
    let p = Sleeper::start_cuda(&[]);
    let pid = p.pid().to_string();
    node.fake.fail("lock", Some(p.pid()), 909);
    for out in [
        node.tool(&["--action", "lock", "--pid", &pid, "--timeout", "500"]),
        node.kybernate(&["--action", "lock", "--pid", &pid]),
    ] {
        assert_code(&out, 1);
        assert_eq!(stdout(&out), "");
        let err = stderr(&out);
        assert!(err.contains("CUDA_ERROR_TIMEOUT"), "{err}");
        assert!(err.contains("cuCheckpointProcessLock") && err.contains(&pid), "{err}");
        assert_eq!(err.lines().count(), 1, "one line: {err}");
    }
    assert_eq!(node.fake.state_of(p.pid()), None, "a failed lock changes nothing");

    // What the driver answers for CUDA IPC, UVM or MPS memory: the likely causes are named.
    let ipc = Sleeper::start_cuda(&[]);
    node.fake.fail("lock", Some(ipc.pid()), 801);
    let out = node.kybernate(&["--action", "lock", "--pid", &ipc.pid().to_string()]);
    assert_code(&out, 1);
    let err = stderr(&out);
    assert!(err.contains("CUDA_ERROR_NOT_SUPPORTED (801)") && err.contains("CUDA IPC memory"), "{err}");

    // For CRIU a failing --get-restore-tid means "no CUDA in this process": non-zero, no number.
    node.fake.fail("restore_tid", None, 1);
    let out = node.tool(&["--get-restore-tid", "--pid", &pid]);
    assert_code(&out, 1);
    assert!(stderr(&out).contains("CUDA_ERROR_INVALID_VALUE"), "{}", stderr(&out));
}

#[test]
fn illegal_step_reports_illegal_state() {
    let node = Node::new();
    let p = Sleeper::start_cuda(&[]);
    let out = node.tool(&["--action", "checkpoint", "--pid", &p.pid().to_string()]);
    assert_code(&out, 1);
    assert!(stderr(&out).contains("CUDA_ERROR_ILLEGAL_STATE"), "{}", stderr(&out));
}

#[test]
fn toggle_unlocks_again_when_the_checkpoint_fails() {
    let node = Node::new();
    let p = Sleeper::start_cuda(&[]);
    let pid = p.pid().to_string();
    node.fake.fail("checkpoint", None, 999);
    let out = node.tool(&["--toggle", "--pid", &pid]);
    assert_code(&out, 1);
    assert!(stderr(&out).contains("CUDA_ERROR_UNKNOWN"), "{}", stderr(&out));
    assert_eq!(node.fake.state_of(p.pid()).as_deref(), Some("running"));
    assert!(stderr(&out).contains("put back and keeps running"), "{}", stderr(&out));
    let calls = node.checkpoint_calls();
    let unlock = calls.iter().rposition(|c| c == &call("cuCheckpointProcessUnlock", p.pid(), None)).unwrap();
    assert!(calls[unlock + 1..].iter().all(|c| c.function == "cuCheckpointProcessGetState"), "{calls:?}");
}

/// The driver can leave the process checkpointed after a failed checkpoint: --toggle asks where
/// it is and undoes by the answer; a stuck process is named with the driver's answer.
#[test]
fn toggle_rolls_back_by_the_state_the_driver_reports() {
    let node = Node::new();
    let p = Sleeper::start_cuda(&[]);
    let pid = p.pid().to_string();
    node.fake.fail_then("checkpoint", Some(p.pid()), 999, "checkpointed");
    let out = node.tool(&["--toggle", "--pid", &pid]);
    assert_code(&out, 1);
    assert!(stderr(&out).contains("put back and keeps running"), "{}", stderr(&out));
    assert_eq!(node.fake.state_of_pid(p.pid()).as_deref(), Some("running"));
    let restores = node.checkpoint_calls().iter().filter(|c| c.function == "cuCheckpointProcessRestore").count();
    assert_eq!(restores, 1);

    // The checkpoint leaves it FAILED: nothing brings it back; the error says so.
    node.fake.clear_failures();
    node.fake.fail_then("checkpoint", Some(p.pid()), 999, "failed");
    let out = node.tool(&["--toggle", "--pid", &pid]);
    assert_code(&out, 1);
    let err = stderr(&out);
    assert!(
        err.contains(&format!("pid {pid} (ns pid {pid}) cannot be brought back: the driver says it is failed")),
        "{err}"
    );
    assert_eq!(err.lines().count(), 1, "{err}");

    // Stuck after an out-of-memory restore: the toggle back fails and says it is still checkpointed.
    let q = Sleeper::start_cuda(&[]);
    let qid = q.pid().to_string();
    node.fake.clear_failures();
    assert_prints(&node.tool(&["--toggle", "--pid", &qid]), "");
    node.fake.fail_then("restore", Some(q.pid()), 2, "stuck");
    let out = node.tool(&["--toggle", "--pid", &qid]);
    assert_code(&out, 1);
    assert!(
        stderr(&out).contains("CUDA_ERROR_OUT_OF_MEMORY") && stderr(&out).contains("still checkpointed"),
        "{}",
        stderr(&out)
    );
    node.fake.clear_failures();
    let out = node.tool(&["--action", "restore", "--pid", &qid]);
    assert_code(&out, 1);
    assert!(
        stderr(&out).contains("CUDA_ERROR_OPERATING_SYSTEM")
            && stderr(&out).contains(&format!("the driver now says process {qid} is checkpointed")),
        "{}",
        stderr(&out)
    );
}

#[test]
fn a_process_without_cuda_has_no_restore_thread() {
    let node = Node::new();
    let p = Sleeper::start();
    let out = node.tool(&["--get-restore-tid", "--pid", &p.pid().to_string()]);
    assert_code(&out, 1);
    assert_eq!(stdout(&out), "");
    assert!(stderr(&out).contains("CUDA_ERROR_NOT_INITIALIZED"), "{}", stderr(&out));
}

const G0: &str = "GPU-00000000-0000-0000-0000-000000000000";
const G1: &str = "GPU-11111111-1111-1111-1111-111111111111";

#[test]
fn device_map_restores_onto_other_gpus_from_cuda_13() {
    let node = Node::new();
    node.fake.set_gpus(&[(G0, "NVIDIA H100 80GB HBM3"), (G1, "NVIDIA H100 80GB HBM3")]);
    let p = Sleeper::start_cuda(&["FAKE_CUDA_GPUS=0"]);
    let pid = p.pid().to_string();
    assert_prints(&node.tool(&["--toggle", "--pid", &pid]), "");
    let map = format!("{G0}={G1}");

    // CUDA 12.8: refused before any restore.
    let out = node.tool(&["--toggle", "--pid", &pid, "--device-map", &map]);
    assert_code(&out, 1);
    assert!(stderr(&out).contains("r580") && stderr(&out).contains("CUDA 12.8"), "{}", stderr(&out));
    assert!(!node.checkpoint_calls().iter().any(|c| c.function == "cuCheckpointProcessRestore"));

    node.fake.set_driver_version(13000);
    assert_prints(&node.tool(&["--toggle", "--pid", &pid, "-d", &map]), "");
    assert_eq!(node.fake.state_of_pid(p.pid()).as_deref(), Some("running"));
    assert_eq!(node.fake.gpus_of_pid(p.pid()), Some(vec![G1.to_string()]));
    let restore = node.checkpoint_calls().into_iter().find(|c| c.function == "cuCheckpointProcessRestore").unwrap();
    assert_eq!(restore.extra.as_deref(), Some(format!("pairs={G0}>{G1}").as_str()));

    // A map that leaves the process's GPU out is the driver's INVALID_VALUE; it stays checkpointed.
    assert_prints(&node.tool(&["--toggle", "--pid", &pid]), "");
    let out = node.kybernate(&["--action", "restore", "--pid", &pid, "--device-map", &format!("{G0}={G1}")]);
    assert_code(&out, 1);
    assert!(stderr(&out).contains("CUDA_ERROR_INVALID_VALUE"), "{}", stderr(&out));
    assert_eq!(node.fake.state_of_pid(p.pid()).as_deref(), Some("checkpointed"));

    // Usage: restore only, each GPU once, UUIDs.
    for args in [
        vec!["--action", "lock", "--pid", &pid, "-d", &map],
        vec!["--action", "restore", "--pid", &pid, "-d", &format!("{G0}={G1},{G0}={G0}")],
        vec!["--action", "restore", "--pid", &pid, "-d", "0=1"],
    ] {
        let out = node.tool(&args);
        assert_code(&out, 2);
        assert_eq!(stderr(&out).lines().count(), 1, "{args:?}: {}", stderr(&out));
    }
}

#[test]
fn usage_errors_exit_2() {
    let node = Node::new();
    let p = Sleeper::start_cuda(&[]);
    let pid = p.pid().to_string();
    let cases: [&[&str]; 5] = [
        &["--get-state"],                                         // no --pid
        &["--action", "freeze", "--pid", &pid],                   // bad action
        &["--pid", &pid],                                         // no operation
        &["--get-state", "--toggle", "--pid", &pid],              // two operations
        &["--action", "unlock", "--pid", &pid, "--timeout", "5"], // timeout is for the lock
    ];
    for args in cases {
        for out in [node.tool(args), node.kybernate(args)] {
            assert_code(&out, 2);
            assert_eq!(stdout(&out), "", "{args:?}");
            assert_eq!(stderr(&out).lines().count(), 1, "{args:?}: {}", stderr(&out));
        }
    }
    assert!(node.fake.calls().is_empty(), "nothing reached the driver: {:?}", node.fake.calls());
}

#[test]
fn help_advertises_action_like_nvidia_tool() {
    let node = Node::new();
    for out in [node.tool(&["-h"]), node.tool(&["--help"]), node.kybernate(&["-h"])] {
        assert_code(&out, 0);
        // CRIU reads at most 2047 bytes of `cuda-checkpoint -h` and looks for "--action".
        let text = [out.stdout.as_slice(), out.stderr.as_slice()].concat();
        let head = &text[..text.len().min(2047)];
        assert!(String::from_utf8_lossy(head).contains("--action"), "{}", String::from_utf8_lossy(&text));
        for flag in ["--get-state", "--toggle", "--get-restore-tid", "--pid", "--timeout", "--device-map"] {
            assert!(String::from_utf8_lossy(&text).contains(flag), "{flag} missing");
        }
    }
}

#[test]
fn old_driver_is_refused_naming_the_missing_symbol() {
    let node = Node::with_driver(false);
    let p = Sleeper::start_cuda(&[]);
    let out = node.tool(&["--get-state", "--pid", &p.pid().to_string()]);
    assert_code(&out, 1);
    let err = stderr(&out);
    assert!(err.contains("cuCheckpointProcessLock") && err.contains("r570"), "{err}");
}

#[test]
fn missing_library_and_config_are_reported() {
    let node = Node::new();
    let p = Sleeper::start_cuda(&[]);
    let pid = p.pid().to_string();
    fs::write(&node.config, "[checkpoint]\nlibcuda = \"/nonexistent/libcuda.so.1\"\n").unwrap();
    let out = node.kybernate(&["--get-state", "--pid", &pid]);
    assert_code(&out, 1);
    assert!(stderr(&out).contains("/nonexistent/libcuda.so.1"), "{}", stderr(&out));

    let out = Command::new(KYBERNATE)
        .args(["--config", "/nonexistent/config.toml", "cuda-checkpoint", "--get-state", "--pid", &pid])
        .output()
        .unwrap();
    assert_code(&out, 2);
    assert!(Path::new(KYBERNATE).is_file());
}
