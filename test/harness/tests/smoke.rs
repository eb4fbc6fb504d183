//! The test bed's own smoke test: the pieces later tests stand on work on this machine.
//! Needs root and `test/setup.sh`.

use std::path::Path;
use std::time::{Duration, Instant};

use kybernate_testbed::{criu_version, scratch_dir, unique_name, Bundle, Runc, Testbed, CRIU, CRIU_MIN_VERSION, IMAGE};

/// Generous bound for things that normally take well under a second.
const PATIENCE: Duration = Duration::from_secs(20);

/// Polls `f` every 50 ms until it returns Some, or panics after [`PATIENCE`] with `what`.
fn wait_for<T>(what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + PATIENCE;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out after {PATIENCE:?} waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn containerd_runs_busybox_through_the_stock_runc_shim() {
    let tb = Testbed::start().expect("test bed");
    tb.import_image();
    let id = unique_name("hello");
    let out = tb.ctr_ok(&[
        "run",
        "--rm",
        "--runtime",
        "io.containerd.runc.v2",
        IMAGE,
        &id,
        "sh",
        "-c",
        "echo hello-from-busybox $((6 * 7)) pid=$$",
    ]);
    assert!(out.contains("hello-from-busybox 42"), "unexpected output: {out:?}");
    assert!(out.contains("pid=1\n"), "sh should be PID 1 of its own pid namespace: {out:?}");

    // --rm: the container, its task and runc's state are gone.
    let containers = tb.ctr_ok(&["containers", "ls", "-q"]);
    assert!(!containers.lines().any(|l| l.trim() == id), "container left behind: {containers}");
    let tasks = tb.ctr_ok(&["tasks", "ls", "-q"]);
    assert!(tasks.trim().is_empty(), "tasks left behind: {tasks}");
    let runc_state = Path::new("/run/containerd/runc").join(tb.namespace()).join(&id);
    assert!(!runc_state.exists(), "runc state left behind: {}", runc_state.display());
}

#[test]
fn criu_is_recent_and_checks_out() {
    let (major, minor, patch) = criu_version().expect("criu --version");
    assert!((major, minor) >= CRIU_MIN_VERSION, "CRIU {major}.{minor}.{patch} is too old; need {CRIU_MIN_VERSION:?}");
    let out = std::process::Command::new(CRIU).arg("check").output().expect("running criu check");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success() && text.contains("Looks good."), "criu check failed ({}): {text}", out.status);
}

/// The value the counter container last wrote, if it wrote one yet.
fn counter(bundle: &Bundle) -> Option<u64> {
    std::fs::read_to_string(bundle.rootfs().join("tmp/counter")).ok()?.trim().parse().ok()
}

#[test]
fn raw_runc_checkpoints_and_restores_a_counter() {
    let scratch = scratch_dir().expect("scratch dir");
    // Writes 1, 2, 3, ... every 100 ms; the rename makes each value appear whole.
    let script = "i=0; while true; do i=$((i+1)); echo $i > /tmp/counter.new; mv /tmp/counter.new /tmp/counter; usleep 100000; done";
    let bundle = Bundle::busybox(&scratch.path().join("bundle"), &["sh", "-c", script]).expect("bundle");
    let runc = Runc::new(scratch.path().join("runc-state")).expect("runc");
    let id = unique_name("counter");
    let images = scratch.path().join("checkpoint");
    let images_arg = images.to_str().unwrap();
    let bundle_arg = bundle.dir().to_str().unwrap();

    runc.detached(&["run", "--detach", "--bundle", bundle_arg, &id]);
    wait_for("the counter to reach 3", || counter(&bundle).filter(|&n| n >= 3));

    runc.ok(&["checkpoint", "--image-path", images_arg, &id]);
    assert!(images.join("inventory.img").exists(), "no CRIU images in {}", images.display());
    assert_ne!(runc.status(&id).as_deref(), Some("running"), "container still running after checkpoint");
    let at_checkpoint = counter(&bundle).expect("counter value at checkpoint");
    // The process is gone: the value stays put (a short look; a change proves it is still running).
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(counter(&bundle), Some(at_checkpoint), "counter moved while checkpointed");

    runc.detached(&["restore", "--detach", "--image-path", images_arg, "--bundle", bundle_arg, &id]);
    assert_eq!(runc.status(&id).as_deref(), Some("running"), "restored container is not running");

    // Continues from where it was (a fresh start would write 1, 2, ...) and keeps counting.
    let mut last = at_checkpoint;
    wait_for("the restored counter to advance by 5", || {
        if let Some(n) = counter(&bundle) {
            assert!(n >= at_checkpoint, "counter restarted: {n} after checkpoint at {at_checkpoint}");
            assert!(n >= last, "counter went backwards: {last} -> {n}");
            last = n;
        }
        (last >= at_checkpoint + 5).then_some(())
    });

    runc.ok(&["delete", "--force", &id]);
    assert_eq!(runc.status(&id), None, "container still known to runc after delete");
}

#[test]
fn containers_survive_a_containerd_restart() {
    let mut tb = Testbed::start().expect("test bed");
    tb.import_image();
    let id = unique_name("survivor");
    tb.ctr_ok(&["run", "--detach", IMAGE, &id, "sleep", "1000"]);
    let pid_before = tb.ctr_ok(&["tasks", "ls"]);
    assert!(pid_before.contains("RUNNING"), "task not running: {pid_before}");

    tb.restart_containerd();

    let tasks = tb.ctr_ok(&["tasks", "ls"]);
    assert_eq!(tasks, pid_before, "task list changed across the restart");
    let out = tb.ctr_ok(&["tasks", "exec", "--exec-id", "probe", &id, "echo", "still-here"]);
    assert_eq!(out.trim(), "still-here");
    // Left running on purpose: Drop must clean it up.
}

#[test]
fn containerd_finds_shims_in_prepended_dirs() {
    // A shim under our own runtime name, found only through path_prepend: a script that notes
    // its arguments, then runs the stock runc shim.
    use std::os::unix::fs::PermissionsExt;
    let scratch = scratch_dir().expect("scratch dir");
    let bin = scratch.path().join("bin");
    let marker = scratch.path().join("shim-calls");
    std::fs::create_dir(&bin).unwrap();
    let shim = bin.join("containerd-shim-kbtsmoke-v1");
    let script =
        format!("#!/bin/sh\necho \"$*\" >> {}\nexec /usr/bin/containerd-shim-runc-v2 \"$@\"\n", marker.display());
    std::fs::write(&shim, script).unwrap();
    std::fs::set_permissions(&shim, std::fs::Permissions::from_mode(0o755)).unwrap();

    let tb = Testbed::builder()
        .path_prepend(&bin)
        .extra_config("[plugins.\"io.containerd.internal.v1.restart\"]\n  interval = \"7s\"\n")
        .start()
        .expect("test bed");
    let config = std::fs::read_to_string(tb.dir().join("config.toml")).unwrap();
    assert!(config.contains("interval = \"7s\""), "extra config missing: {config}");
    tb.import_image();
    let id = unique_name("shim");
    let out =
        tb.ctr_ok(&["run", "--rm", "--runtime", "io.containerd.kbtsmoke.v1", IMAGE, &id, "echo", "via-prepended-shim"]);
    assert_eq!(out.trim(), "via-prepended-shim");
    let calls = std::fs::read_to_string(&marker).unwrap_or_default();
    assert!(
        calls.lines().any(|l| l.contains(&format!("-namespace {} ", tb.namespace())) && l.ends_with(" start")),
        "containerd did not start the prepended shim; calls: {calls:?}"
    );
}
