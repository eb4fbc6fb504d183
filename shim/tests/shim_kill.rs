//! The shim killed (SIGKILL: the OOM killer, a crash) at every phase of a checkpoint and of a
//! restore, with real containerd 1.6, runc and CRIU: afterwards nothing may be left — no runc,
//! no CRIU, none of the container's processes, no runtime state, no mount, no cgroup, no partial
//! checkpoint — and the container id must work again.
//!
//! A phase is hit deterministically: the shim stops itself there through the test-only hook
//! `KYBERNATE_TEST_STOP_DIR` (docs/testing.md), or, while CRIU runs, the test stops CRIU itself
//! once it traces the container (the checkpoint) or once it exists (the restore). Then the test
//! kills the shim, and containerd runs the shim's `delete` action, as it does after any crash.
//! All cases share one containerd.

use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use containerd_shim_protos::shim::oci::CheckpointOptions;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

mod common;

use common::procs::{alive, stat};

use common::ckpt::*;
use common::{bundle_dir, runc_state_dir, task_row, wait_for, RUNTIME, SHIM, TIMEOUT};
use kybernate_testbed::{unique_name, IMAGE};

/// Where the shim's stop hook looks for `<container id>` files naming the phase to stop at.
const STOP_ENV: &str = "KYBERNATE_TEST_STOP_DIR";

fn pids() -> Vec<u32> {
    std::fs::read_dir("/proc").unwrap().flatten().filter_map(|e| e.file_name().to_str()?.parse().ok()).collect()
}

fn comm(pid: u32) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default().trim().to_string()
}

fn cmdline(pid: u32) -> Vec<String> {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .unwrap_or_default()
        .split(|b| *b == 0)
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect()
}

fn is_our_shim(pid: u32) -> bool {
    std::fs::read_link(format!("/proc/{pid}/exe")).is_ok_and(|p| p == Path::new(SHIM))
}

/// The one shim of ours that stopped itself at the hook.
fn stopped_shim() -> Option<u32> {
    pids().into_iter().find(|&p| is_our_shim(p) && stat(p).is_some_and(|(s, _)| s == 'T'))
}

/// `criu swrk` as runc starts it (the test bed's `criu` is a wrapper that execs CRIU through
/// its own loader, so the command name says nothing).
fn is_criu(pid: u32) -> bool {
    cmdline(pid).iter().any(|a| a == "swrk")
}

/// The CRIU (runc's child) whose runc is a child of a shim of ours, with that shim.
fn criu_under_a_shim() -> Option<(u32, u32)> {
    pids().into_iter().find_map(|p| {
        let (_, runc) = stat(p)?;
        let (_, shim) = stat(runc)?;
        (is_criu(p) && comm(runc) == "runc" && is_our_shim(shim)).then_some((p, shim))
    })
}

/// Polls `f` every millisecond (CRIU's restore of a small container is over in ~100 ms).
fn catch<T>(what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + TIMEOUT;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out after {TIMEOUT:?} waiting for {what}");
        std::thread::sleep(Duration::from_millis(1));
    }
}

fn tracer_of(pid: u32) -> Option<u32> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let tracer: u32 = status.lines().find_map(|l| l.strip_prefix("TracerPid:"))?.trim().parse().ok()?;
    (tracer != 0).then_some(tracer)
}

fn shim_pid_of(bed: &Bed, id: &str) -> u32 {
    use containerd_shim_protos::api::ConnectRequest;
    let shim = connect(&bed.tb, id);
    let req = ConnectRequest { id: id.into(), ..Default::default() };
    shim.connect(containerd_shim_protos::ttrpc::context::with_duration(TIMEOUT), &req).expect("connect").shim_pid
}

/// What a container holds on the host, to check afterwards that all of it is gone.
struct Footprint {
    id: String,
    /// Processes that must be dead: the container's init, a CRIU.
    pids: Vec<u32>,
    bundle: PathBuf,
    /// The container's freezer cgroup (cgroup v1 here).
    cgroup: Option<PathBuf>,
    /// Where partial checkpoints of it would be.
    store_dir: PathBuf,
}

impl Footprint {
    fn of(bed: &Bed, id: &str) -> Footprint {
        let bundle = bundle_dir(&bed.tb, id);
        let spec: serde_json::Value =
            serde_json::from_slice(&std::fs::read(bundle.join("config.json")).unwrap()).unwrap();
        let cgroup = spec["linux"]["cgroupsPath"]
            .as_str()
            .map(|p| Path::new("/sys/fs/cgroup/freezer").join(p.trim_start_matches('/')));
        let pids = task_row(&bed.tb, id).map(|(pid, _)| vec![pid]).unwrap_or_default();
        let store_dir = bed.store.join(bed.tb.namespace()).join(id);
        Footprint { id: id.into(), pids, bundle, cgroup, store_dir }
    }

    /// Waits (containerd runs `<shim> delete` after the shim died) until the task is gone
    /// from containerd's view, removes the container, then asserts nothing is left.
    fn assert_all_gone(&self, bed: &Bed, phase: &str) {
        let tb = &bed.tb;
        let started = Instant::now();
        // containerd cleans up after a dead shim asynchronously: the task goes once its `delete`
        // action returned (and `ctr tasks delete` fails until then).
        wait_for(&format!("{phase}: task {} to go after the shim died", self.id), || {
            if task_row(tb, &self.id).is_none() {
                return Some(());
            }
            let _ = tb.ctr(&["tasks", "delete", &self.id]);
            None
        });
        tb.ctr_ok(&["containers", "delete", &self.id]);
        let cleaned = started.elapsed();
        assert!(cleaned < Duration::from_secs(5), "{phase}: containerd's cleanup took {cleaned:?}");

        let deadline = Instant::now() + Duration::from_secs(5);
        let left = || -> Vec<String> {
            let mut left: Vec<String> =
                self.pids.iter().filter(|&&p| alive(p)).map(|p| format!("pid {p} ({})", comm(*p))).collect();
            for p in pids() {
                let args = cmdline(p);
                let runtime_call = args.first().is_some_and(|a| a.ends_with("runc")) && args.contains(&self.id);
                if runtime_call && alive(p) {
                    left.push(format!("runtime call {p}: {args:?}"));
                }
                if is_criu(p) && stat(p).is_some_and(|(_, pp)| pp == 1) && alive(p) {
                    left.push(format!("orphaned criu {p}"));
                }
            }
            if runc_state_dir(tb).join(&self.id).exists() {
                left.push("runc state".into());
            }
            let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
            // The rootfs in the bundle, runc's `criu-root` in its state dir: any mount naming the id.
            for m in mounts.lines().filter(|l| l.contains(self.bundle.to_str().unwrap()) || l.contains(&self.id)) {
                left.push(format!("mount {m}"));
            }
            if let Some(cg) = self.cgroup.as_ref().filter(|c| c.exists()) {
                left.push(format!("cgroup {}", cg.display()));
            }
            let partial: Vec<String> =
                entries(&self.store_dir).into_iter().filter(|e| e.contains(".partial-")).collect();
            if !partial.is_empty() {
                left.push(format!("partial checkpoints {partial:?}"));
            }
            left
        };
        loop {
            let l = left();
            if l.is_empty() {
                break;
            }
            assert!(Instant::now() < deadline, "{phase}: left behind after the shim was killed: {l:#?}");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The id works again.
    fn assert_reusable(&self, bed: &Bed, phase: &str) {
        let out = bed.tb.ctr(&["run", "-d", "--runtime", RUNTIME, IMAGE, &self.id, "sleep", "600"]);
        assert!(
            out.status.success(),
            "{phase}: the id {} cannot be used again: {}",
            self.id,
            common::text(&out.stderr)
        );
        remove(&bed.tb, &self.id);
    }
}

fn kill_shim(shim: u32) {
    kill(Pid::from_raw(shim as i32), Signal::SIGKILL).expect("kill the shim");
}

/// A checkpoint of a counter container, into the store, killed at `phase`.
fn checkpoint_killed_at(bed: &Bed, stop_dir: &Path, phase: &str, exit: bool) {
    let tb = &bed.tb;
    let id = unique_name(&format!("kill-{phase}"));
    run_counter(tb, &id, &[]);
    wait_counter(tb, &id, 3);
    let mut footprint = Footprint::of(bed, &id);
    let shim = shim_pid_of(bed, &id);
    let target = store_path(bed, &id);
    let o = CheckpointOptions { exit, image_path: target.display().to_string(), ..Default::default() };
    if phase == "criu-dump" {
        let init = footprint.pids[0];
        let call = checkpoint_in_background(tb, &id, o);
        // CRIU traces the container's processes for the whole dump: stop it right there.
        let criu = catch("CRIU to trace the container", || tracer_of(init));
        kill(Pid::from_raw(criu as i32), Signal::SIGSTOP).unwrap();
        footprint.pids.push(criu);
        kill_shim(shim);
        assert!(call.join().unwrap().is_err(), "the checkpoint cannot succeed");
    } else {
        std::fs::write(stop_dir.join(&id), phase).unwrap();
        let call = checkpoint_in_background(tb, &id, o);
        let stopped = wait_for(&format!("the shim to stop at {phase}"), stopped_shim);
        assert_eq!(stopped, shim);
        kill_shim(shim);
        assert!(call.join().unwrap().is_err(), "the checkpoint cannot succeed");
    }
    footprint.assert_all_gone(bed, phase);
    if phase == "commit" {
        // Killed after the rename: the checkpoint is complete and stays.
        assert!(target.join(kybernate_checkpoint::MANIFEST_FILE).is_file(), "commit: the committed checkpoint is gone");
    } else {
        assert!(!target.exists(), "{phase}: an incomplete checkpoint at {}", target.display());
    }
    footprint.assert_reusable(bed, phase);
}

/// `ctr run -d` of a container restored from `checkpoint`, left running in the background.
fn restore_in_background(bed: &Bed, checkpoint: &Path, id: &str) -> Child {
    let relative = checkpoint.strip_prefix(&bed.store).unwrap().display().to_string();
    let annotation = format!("kybernate.io/restore-from={relative}");
    let args = ["run", "-d", "--runtime", RUNTIME, "--annotation", &annotation, IMAGE, id, "sleep", "1000"];
    bed.tb.ctr_command().args(args).stdout(Stdio::null()).stderr(Stdio::null()).spawn().expect("ctr run")
}

/// A `criu` first on the test bed's PATH that, while its hold file exists, waits 2 s before
/// `criu swrk` (as runc runs it), then execs the real one. A small restore is over in ~100 ms,
/// which a loaded machine's scan of /proc can miss; held, it stays in `runc restore` long enough
/// to be caught there.
struct HeldCriu {
    dir: tempfile::TempDir,
    hold: PathBuf,
}

impl HeldCriu {
    fn new() -> HeldCriu {
        let dir = kybernate_testbed::scratch_dir().unwrap();
        let hold = dir.path().join("hold");
        let script = format!(
            "#!/bin/sh\n[ \"$1\" = swrk ] && [ -e {} ] && sleep 2\nexec {} \"$@\"\n",
            hold.display(),
            kybernate_testbed::CRIU
        );
        let wrapper = dir.path().join("criu");
        std::fs::write(&wrapper, script).unwrap();
        std::fs::set_permissions(&wrapper, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
        HeldCriu { dir, hold }
    }
}

/// A restore from `checkpoint` killed at `phase`.
fn restore_killed_at(bed: &Bed, stop_dir: &Path, checkpoint: &Path, phase: &str, slow: &HeldCriu) {
    let id = unique_name(&format!("kill-{phase}"));
    let mut killed_criu = None;
    let mut ctr = if phase == "runc-restore" {
        std::fs::write(&slow.hold, "").unwrap();
        let ctr = restore_in_background(bed, checkpoint, &id);
        let (criu, shim) = catch("CRIU to restore under the shim", criu_under_a_shim);
        std::fs::remove_file(&slow.hold).unwrap();
        kill(Pid::from_raw(criu as i32), Signal::SIGSTOP).unwrap();
        killed_criu = Some(criu);
        kill_shim(shim);
        ctr
    } else {
        std::fs::write(stop_dir.join(&id), phase).unwrap();
        let ctr = restore_in_background(bed, checkpoint, &id);
        kill_shim(wait_for(&format!("the shim to stop at {phase}"), stopped_shim));
        ctr
    };
    let status = wait_for("ctr run to fail", || ctr.try_wait().unwrap());
    assert!(!status.success(), "{phase}: the restore cannot succeed");
    let footprint = Footprint {
        id: id.clone(),
        pids: killed_criu.into_iter().collect(),
        bundle: bundle_dir(&bed.tb, &id),
        cgroup: Some(Path::new("/sys/fs/cgroup/freezer").join(bed.tb.namespace()).join(&id)),
        store_dir: bed.store.join(bed.tb.namespace()).join(&id),
    };
    footprint.assert_all_gone(bed, phase);
    footprint.assert_reusable(bed, phase);
}

#[test]
fn nothing_is_left_when_the_shim_dies_during_a_checkpoint_or_a_restore() {
    let stop = tempfile::tempdir().unwrap();
    let slow = HeldCriu::new();
    let bed = bed_with(|b| b.env(STOP_ENV, stop.path()).path_prepend(slow.dir.path()), "");
    let started = Instant::now();
    // (phase, exit): with `exit` the container stays frozen until its checkpoint is committed.
    for (phase, exit) in
        [("freeze", false), ("criu-dump", false), ("rootfs-diff", false), ("hashing", true), ("commit", true)]
    {
        checkpoint_killed_at(&bed, stop.path(), phase, exit);
    }
    // A checkpoint to restore from, taken without the hook.
    let id = unique_name("kill-src");
    run_counter(&bed.tb, &id, &[]);
    let (checkpoint, _) = store_checkpoint(&bed, &id, true);
    remove(&bed.tb, &id);
    for phase in ["restore-verify", "runc-restore"] {
        restore_killed_at(&bed, stop.path(), &checkpoint, phase, &slow);
    }
    eprintln!("shim-kill matrix: {:?}", started.elapsed());
}

/// An operator stops a job whose checkpoint hangs (CRIU stopped mid-dump stands for a CRIU that
/// never returns): the Kill is taken, the checkpoint fails and leaves nothing, CRIU is gone, and
/// the container ends; the shim lives on and the id can be cleaned up as usual.
#[test]
fn a_kill_during_a_stuck_checkpoint_ends_the_checkpoint_and_the_container() {
    let bed = bed();
    let tb = &bed.tb;
    let id = unique_name("kill-stuck");
    run_counter(tb, &id, &[]);
    wait_counter(tb, &id, 3);
    let footprint = Footprint::of(&bed, &id);
    let init = footprint.pids[0];
    let target = store_path(&bed, &id);
    let o = CheckpointOptions { exit: false, image_path: target.display().to_string(), ..Default::default() };
    let call = checkpoint_in_background(tb, &id, o);
    let criu = catch("CRIU to trace the container", || tracer_of(init));
    kill(Pid::from_raw(criu as i32), Signal::SIGSTOP).unwrap();

    let started = Instant::now();
    tb.ctr_ok(&["tasks", "kill", "--signal", "SIGKILL", &id]);
    let (code, msg) = error_of(call.join().unwrap());
    assert_ne!(code, containerd_shim_protos::ttrpc::Code::OK, "the abandoned checkpoint fails: {msg}");
    wait_for("the killed container to stop", || {
        (common::task_status(tb, &id).as_deref() == Some("STOPPED")).then_some(())
    });
    eprintln!("kill during a stuck checkpoint: stopped after {:?}: {msg}", started.elapsed());
    assert!(!alive(criu) && !alive(init), "CRIU and the container's init are gone");
    assert!(!target.exists(), "no checkpoint at {}", target.display());
    let partial: Vec<String> = entries(&footprint.store_dir).into_iter().filter(|e| e.contains(".partial-")).collect();
    assert!(partial.is_empty(), "no partial checkpoint: {partial:?}");
    remove(tb, &id);
    footprint.assert_reusable(&bed, "kill during a stuck checkpoint");
}
