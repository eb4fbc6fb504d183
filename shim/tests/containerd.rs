//! The shim under a real containerd 1.6 with real runc, driven by `ctr`
//! (modelled on containerd's integration/client suite). Needs the test bed:
//! `test/setup.sh`.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

mod common;

use common::{shim_dir, task_status, testbed, text, wait_for, RUNTIME, SHIM};
use kybernate_testbed::{unique_name, Containerd, Testbed, IMAGE};

fn run(tb: &Testbed, args: &[&str]) -> Output {
    let id = unique_name("run");
    let mut full = vec!["run", "--rm", "--runtime", RUNTIME, IMAGE, &id];
    full.extend_from_slice(args);
    tb.ctr(&full)
}

/// Starts a long-running container (`sleep 1000` by default) detached.
fn run_detached(tb: &Testbed, id: &str, args: &[&str]) {
    let mut full = vec!["run", "-d", "--runtime", RUNTIME, IMAGE, id];
    full.extend_from_slice(if args.is_empty() { &["sleep", "1000"] } else { args });
    tb.ctr_ok(&full);
}

fn stop_and_remove(tb: &Testbed, id: &str) {
    let _ = tb.ctr(&["tasks", "kill", "-s", "SIGKILL", id]);
    wait_for("task to stop", || (task_status(tb, id).as_deref() != Some("RUNNING")).then_some(()));
    tb.ctr_ok(&["tasks", "delete", id]);
    tb.ctr_ok(&["containers", "delete", id]);
}

/// Every live process whose command line names our shim binary.
fn shim_pids() -> Vec<u32> {
    let mut pids = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else { continue };
        if let Ok(cmd) = std::fs::read(format!("/proc/{pid}/cmdline")) {
            if text(&cmd).split('\0').next().is_some_and(|a| a.ends_with("containerd-shim-kybernate-v1")) {
                pids.push(pid);
            }
        }
    }
    pids
}

fn shim_pids_for(ns: &str) -> Vec<u32> {
    shim_pids()
        .into_iter()
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|c| text(&c).split('\0').any(|a| a == ns))
        })
        .collect()
}

/// `ctr tasks metrics` of `id` shows memory and pids figures, and CPU usage; on a cgroup v2 test
/// bed whose hierarchy lacks the memory or pids controller (these machines) those are absent
/// (the shim leaves out what the cgroup does not have) and CPU usage (`cpu.stat`) is there.
fn assert_metrics(tb: &Testbed, id: &str) {
    let metrics = tb.ctr_ok(&["tasks", "metrics", id]);
    let v2 = tb.cgroup_mode() == kybernate_testbed::CgroupMode::V2;
    let has = |c: &str| !v2 || tb.v2_has_controller(c);
    let memory = metrics.contains("memory.usage_in_bytes") || metrics.contains("memory.usage");
    assert_eq!(memory, has("memory"), "memory figures iff the memory controller is there: {metrics}");
    assert_eq!(
        metrics.contains("pids.current"),
        has("pids"),
        "pids figures iff the pids controller is there: {metrics}"
    );
    if v2 {
        assert!(metrics.contains("cpu.usage_usec"), "{metrics}");
    }
}

#[test]
fn stdout_and_stderr_are_captured() {
    let tb = testbed();
    let out = run(&tb, &["sh", "-c", "echo to-stdout; echo to-stderr >&2"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout).trim(), "to-stdout");
    assert!(text(&out.stderr).contains("to-stderr"), "{}", text(&out.stderr));
}

#[test]
fn exit_codes_are_reported() {
    let tb = testbed();
    assert_eq!(run(&tb, &["true"]).status.code(), Some(0));
    assert_eq!(run(&tb, &["sh", "-c", "exit 7"]).status.code(), Some(7));
}

#[test]
fn stdin_is_piped_in() {
    let tb = testbed();
    let id = unique_name("stdin");
    let mut child = tb
        .ctr_command()
        .args(tb.ctr_args(&["run", "--rm", "--runtime", RUNTIME, IMAGE, &id, "head", "-n", "2"]))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(b"first line\nsecond line\nthird\n").unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "first line\nsecond line\n");
}

#[test]
fn exec_output_and_exit_code() {
    let tb = testbed();
    let id = unique_name("exec");
    run_detached(&tb, &id, &[]);
    let out =
        tb.ctr(&["tasks", "exec", "--exec-id", "e1", &id, "sh", "-c", "echo from-exec; echo exec-err >&2; exit 3"]);
    assert_eq!(out.status.code(), Some(3), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout).trim(), "from-exec");
    assert!(text(&out.stderr).contains("exec-err"));
    stop_and_remove(&tb, &id);
}

#[test]
fn large_exec_output_is_fully_drained() {
    let tb = testbed();
    let id = unique_name("bigexec");
    run_detached(&tb, &id, &[]);
    // 8 MiB written as fast as possible, the process exits right after.
    let out = tb.ctr(&["tasks", "exec", "--exec-id", "big", &id, "head", "-c", "8388608", "/dev/zero"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(out.stdout.len(), 8 * 1024 * 1024);
    stop_and_remove(&tb, &id);
}

#[test]
fn kill_pause_resume_pids_and_metrics() {
    let tb = testbed();
    let id = unique_name("life");
    run_detached(&tb, &id, &["sh", "-c", "sleep 1000 & sleep 1000 & wait"]);
    assert_eq!(task_status(&tb, &id).as_deref(), Some("RUNNING"));

    let ps = tb.ctr_ok(&["tasks", "ps", &id]);
    assert!(ps.lines().count() >= 4, "want init + 2 sleeps:\n{ps}");

    tb.ctr_ok(&["tasks", "pause", &id]);
    assert_eq!(task_status(&tb, &id).as_deref(), Some("PAUSED"));
    tb.ctr_ok(&["tasks", "resume", &id]);
    assert_eq!(task_status(&tb, &id).as_deref(), Some("RUNNING"));

    assert_metrics(&tb, &id);

    tb.ctr_ok(&["tasks", "kill", "-a", "-s", "SIGKILL", &id]);
    wait_for("the task to stop", || (task_status(&tb, &id).as_deref() == Some("STOPPED")).then_some(()));
    tb.ctr_ok(&["tasks", "delete", &id]);
    tb.ctr_ok(&["containers", "delete", &id]);
}

#[test]
fn a_process_killed_by_a_signal_exits_128_plus_signal() {
    // (From inside, PID 1 ignores signals it has no handler for: kill from outside, as kubelet does.)
    let tb = testbed();
    let id = unique_name("sig");
    let child = tb
        .ctr_command()
        .args(tb.ctr_args(&["run", "--rm", "--runtime", RUNTIME, IMAGE, &id, "sleep", "1000"]))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_for("the task to run", || (task_status(&tb, &id).as_deref() == Some("RUNNING")).then_some(()));
    tb.ctr_ok(&["tasks", "kill", "-s", "SIGKILL", &id]);
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(137), "{}", text(&out.stderr));
}

#[test]
fn a_gpu_bundle_goes_through_the_gpu_runtime_and_a_cpu_one_through_runc() {
    // A faithful stand-in for nvidia-container-runtime: logs its argv, then execs runc.
    let fake = tempfile::tempdir().unwrap();
    let log = fake.path().join("calls.log");
    let script = fake.path().join("nvidia-container-runtime");
    std::fs::write(
        &script,
        format!("#!/bin/sh\nprintf '%s\\n' \"$*\" >> {}\nexec /usr/bin/runc \"$@\"\n", log.display()),
    )
    .unwrap();
    std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();

    let tb = Testbed::builder().path_prepend(shim_dir()).path_prepend(fake.path()).start().expect("test bed");
    tb.import_image();

    let cpu = unique_name("cpu");
    let out = tb.ctr_ok(&["run", "--rm", "--runtime", RUNTIME, IMAGE, &cpu, "echo", "cpu-ok"]);
    assert_eq!(out.trim(), "cpu-ok");
    assert!(
        !log.exists() || !std::fs::read_to_string(&log).unwrap().contains(&cpu),
        "CPU container went through the GPU runtime"
    );

    let gpu = unique_name("gpu");
    let out = tb.ctr_ok(&[
        "run",
        "--rm",
        "--runtime",
        RUNTIME,
        "--env",
        "NVIDIA_VISIBLE_DEVICES=all",
        IMAGE,
        &gpu,
        "echo",
        "gpu-ok",
    ]);
    assert_eq!(out.trim(), "gpu-ok");
    let calls = std::fs::read_to_string(&log).expect("the GPU runtime was never called");
    assert!(calls.lines().any(|l| l.contains(" create ") && l.contains(&gpu)), "{calls}");
    assert!(calls.lines().any(|l| l.contains(" start ") && l.contains(&gpu)), "{calls}");
    assert!(calls.lines().any(|l| l.contains(" delete ") && l.contains(&gpu)), "{calls}");
}

#[test]
fn a_malformed_runtime_choice_fails_create_and_leaves_nothing_behind() {
    // The bundle wants GPUs, but no GPU runtime exists: create must fail, clearly, and clean up.
    let cfg = tempfile::tempdir().unwrap();
    let cfg_path = cfg.path().join("config.toml");
    std::fs::write(&cfg_path, "[runtime]\ngpu = \"kbt-no-such-gpu-runtime\"\n").unwrap();
    let tb = Testbed::builder().path_prepend(shim_dir()).env("KYBERNATE_CONFIG", &cfg_path).start().expect("test bed");
    tb.import_image();
    let id = unique_name("nogpu");
    let out = tb.ctr(&["run", "--rm", "--runtime", RUNTIME, "--env", "NVIDIA_VISIBLE_DEVICES=all", IMAGE, &id, "true"]);
    assert!(!out.status.success());
    let err = text(&out.stderr);
    assert!(err.contains("wants GPUs") && err.contains("kbt-no-such-gpu-runtime"), "{err}");
    // No runtime state, no task, no mount.
    assert!(!Path::new(&format!("/run/containerd/runc/{}/{id}", tb.namespace())).exists());
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    assert!(!mounts.contains(&id), "mount left behind");
    let _ = tb.ctr(&["containers", "delete", &id]);
}

#[test]
fn containers_in_one_group_share_one_shim() {
    let tb = testbed();
    let (a, b) = (unique_name("grp-a"), unique_name("grp-b"));
    let group = format!("io.containerd.runc.v2.group={}", unique_name("g"));
    for id in [&a, &b] {
        tb.ctr_ok(&[
            "run",
            "-d",
            "--runtime",
            RUNTIME,
            "--label",
            &group,
            "--annotation",
            &group,
            IMAGE,
            id,
            "sleep",
            "1000",
        ]);
    }
    let shims = shim_pids_for(tb.namespace());
    assert_eq!(shims.len(), 1, "want one shim for the group, found {shims:?}");
    stop_and_remove(&tb, &a);
    // The shim stays for the other container.
    assert_eq!(shim_pids_for(tb.namespace()).len(), 1);
    stop_and_remove(&tb, &b);
    wait_for("the group's shim to exit", || shim_pids_for(tb.namespace()).is_empty().then_some(()));
}

#[test]
fn unknown_ids_are_not_found() {
    let tb = testbed();
    let id = unique_name("known");
    run_detached(&tb, &id, &[]);
    let out = tb.ctr(&["tasks", "exec", "--exec-id", "x", "no-such-container", "true"]);
    assert!(!out.status.success());
    // Duplicate exec ids are refused.
    let long = tb
        .ctr_command()
        .args(["tasks", "exec", "--exec-id", "dup", &id, "sleep", "5"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    wait_for("the first exec", || (tb.ctr_ok(&["tasks", "ps", &id]).lines().count() >= 3).then_some(()));
    let out = tb.ctr(&["tasks", "exec", "--exec-id", "dup", &id, "true"]);
    assert!(!out.status.success());
    assert!(text(&out.stderr).contains("already exists"), "{}", text(&out.stderr));
    let _ = long;
    stop_and_remove(&tb, &id);
}

#[test]
fn no_shims_or_runtime_state_left_after_many_cycles() {
    let tb = testbed();
    for i in 0..20 {
        let out = run(&tb, &["true"]);
        assert!(out.status.success(), "cycle {i}: {}", text(&out.stderr));
    }
    wait_for("shims to exit", || shim_pids_for(tb.namespace()).is_empty().then_some(()));
    let state = PathBuf::from(format!("/run/containerd/runc/{}", tb.namespace()));
    let left: Vec<_> =
        std::fs::read_dir(&state).map(|d| d.flatten().map(|e| e.file_name()).collect()).unwrap_or_default();
    assert!(left.is_empty(), "runtime state left: {left:?}");
}

#[test]
fn the_shim_binary_prints_its_version() {
    let out = Command::new(SHIM).arg("-v").output().unwrap();
    assert!(out.status.success());
    assert!(text(&out.stdout).starts_with("containerd-shim-kybernate-v1 "));
}

/// The ctr-driven basics under every containerd a node may run: 1.7 (Debian trixie's) and 2.x
/// (Debian testing's) start our shim for `--runtime io.containerd.kybernate.v1` as 1.6 does, and
/// output, exit codes, exec, pause/resume, pids, metrics, kill and delete behave the same.
fn task_api_under(release: Containerd) {
    let tb = Testbed::builder()
        .containerd(release)
        .path_prepend(shim_dir())
        .start()
        .expect("test bed (run test/setup.sh first)");
    tb.import_image();
    let version = tb.containerd_version();
    let out = run(&tb, &["sh", "-c", "echo to-stdout; echo to-stderr >&2; exit 7"]);
    assert_eq!(out.status.code(), Some(7), "containerd {version:?}: {}", text(&out.stderr));
    assert_eq!(text(&out.stdout).trim(), "to-stdout");
    assert!(text(&out.stderr).contains("to-stderr"), "{}", text(&out.stderr));

    let id = unique_name("rel");
    run_detached(&tb, &id, &["sh", "-c", "sleep 1000 & sleep 1000 & wait"]);
    let bundle = tb.dir().join("state/io.containerd.runtime.v2.task").join(tb.namespace()).join(&id);
    let shim = std::fs::read_to_string(bundle.join("shim-binary-path")).unwrap_or_default();
    assert_eq!(shim.trim(), SHIM, "containerd {version:?} started another shim");
    assert!(bundle.join("kybernate-runtime.json").is_file(), "no runtime decision in {}", bundle.display());
    let out = tb.ctr(&["tasks", "exec", "--exec-id", "e1", &id, "sh", "-c", "echo from-exec; exit 3"]);
    assert_eq!((out.status.code(), text(&out.stdout).trim().to_string()), (Some(3), "from-exec".to_string()));
    tb.ctr_ok(&["tasks", "pause", &id]);
    assert_eq!(task_status(&tb, &id).as_deref(), Some("PAUSED"));
    tb.ctr_ok(&["tasks", "resume", &id]);
    assert_eq!(task_status(&tb, &id).as_deref(), Some("RUNNING"));
    let ps = tb.ctr_ok(&["tasks", "ps", &id]);
    assert!(ps.lines().count() >= 4, "want init + 2 sleeps:\n{ps}");
    assert_metrics(&tb, &id);
    tb.ctr_ok(&["tasks", "kill", "-s", "SIGKILL", &id]);
    wait_for("the task to exit", || (task_status(&tb, &id).as_deref() == Some("STOPPED")).then_some(()));
    tb.ctr_ok(&["tasks", "delete", &id]);
    tb.ctr_ok(&["containers", "delete", &id]);
    wait_for("the shim to exit", || shim_pids_for(tb.namespace()).is_empty().then_some(()));
    assert!(!bundle.exists(), "bundle {} left", bundle.display());
}

#[test]
fn the_task_api_works_under_containerd_1_7() {
    task_api_under(Containerd::V1_7);
}

#[test]
fn the_task_api_works_under_containerd_2() {
    task_api_under(Containerd::V2);
}
