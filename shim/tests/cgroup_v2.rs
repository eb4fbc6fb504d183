//! The shim on cgroup v2 (unified), beside the stock runc shim: a test bed whose containerd,
//! shims, runc and CRIU see a cgroup2 `/sys/fs/cgroup` (kybernate_testbed::CgroupMode::V2; on
//! these machines a private mount namespace, see test/harness/src/cgroup.rs). Run, exec, pause and
//! resume through `cgroup.freeze`, metrics, a checkpoint into the store and a restore by
//! annotation, and device access under the eBPF device filter before and after it. What v2 mode
//! cannot exercise here (memory, cpu, pids, io controllers) is listed in docs/testing.md.

mod common;

use std::path::PathBuf;

use common::ckpt::{assert_counter_continues, Bed};
use common::ckpt::{bed_with, counter, remove, run_counter, run_restored_ok, store_checkpoint, wait_counter};
use common::{task_row, wait_for};
use kybernate_testbed::{unique_name, CgroupMode, Testbed, IMAGE};

/// The stock shim, run the same way: whatever it runs on v2, ours must run too.
const RUNC: &str = "io.containerd.runc.v2";
/// `ctr run` asks for CPU shares (1024) by default, which runc writes to `cpu.weight`: on this
/// hierarchy without a cpu controller that fails for both shims ("cpu.weight: no such file").
/// The test bed adds this to every `ctr run` of a v2 bed; here it is explicit.
const NO_CPU_SHARES: [&str; 2] = ["--cpu-shares", "0"];

/// The v2 cgroup directory of task `id`, as the test sees it, from its init's `0::` line.
fn cgroup_dir(tb: &Testbed, id: &str) -> PathBuf {
    let (pid, _) = task_row(tb, id).unwrap_or_else(|| panic!("no task {id}"));
    let lines = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap();
    let path = lines.lines().find_map(|l| l.strip_prefix("0::")).unwrap_or_else(|| panic!("no v2 line: {lines}"));
    let dir = tb.v2_cgroup_dir(path).expect("a v2 test bed");
    assert!(dir.join("cgroup.procs").is_file(), "{} is not a v2 cgroup of {id}", dir.display());
    dir
}

fn read(dir: &std::path::Path, file: &str) -> String {
    std::fs::read_to_string(dir.join(file)).unwrap_or_else(|e| panic!("{}/{file}: {e}", dir.display()))
}

/// `frozen 0|1` of cgroup.events.
fn frozen(dir: &std::path::Path) -> bool {
    read(dir, "cgroup.events").lines().any(|l| l == "frozen 1")
}

fn pause_and_resume(tb: &Testbed, id: &str) {
    let dir = cgroup_dir(tb, id);
    assert_eq!(read(&dir, "cgroup.freeze").trim(), "0");
    tb.ctr_ok(&["task", "pause", id]);
    assert_eq!(read(&dir, "cgroup.freeze").trim(), "1", "pause did not use cgroup.freeze");
    wait_for(&format!("{id} frozen"), || frozen(&dir).then_some(()));
    assert_eq!(common::task_status(tb, id).as_deref(), Some("PAUSED"));
    tb.ctr_ok(&["task", "resume", id]);
    wait_for(&format!("{id} thawed"), || (!frozen(&dir)).then_some(()));
    assert_eq!(common::task_status(tb, id).as_deref(), Some("RUNNING"));
}

/// Device access under v2's eBPF device filter, from inside container `id`: the device its spec
/// grants (`granted`, char 240:0 of the "local use" range, no driver behind it) opens as far as
/// the kernel goes (ENXIO: the filter let it through), and a node it makes itself for 240:1 is
/// refused by the filter (EPERM). (A major of 195 would make the container a GPU container: the
/// GPU double tests cover those.)
fn assert_device_filter(tb: &Testbed, id: &str, exec_id: &str, granted: &str) {
    let script = format!(
        "cat {granted} 2>&1; mknod /tmp/other-{exec_id} c 240 1 && cat /tmp/other-{exec_id} 2>&1; rm -f /tmp/other-{exec_id}"
    );
    let out = tb.ctr(&["task", "exec", "--exec-id", exec_id, id, "sh", "-c", &script]);
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    let mut lines = text.lines();
    let first = lines.next().unwrap_or_default();
    assert!(first.contains("No such device or address"), "{id}: the granted device did not reach the kernel: {text}");
    let second = lines.next().unwrap_or_default();
    assert!(second.contains("Operation not permitted"), "{id}: a device its spec does not grant was opened: {text}");
}

/// A host device node, removed when dropped.
struct DevNode(String);

impl DevNode {
    fn new(path: &str) -> Self {
        let out = std::process::Command::new("mknod").arg(path).args(["c", "240", "0"]).output().unwrap();
        assert!(out.status.success(), "mknod {path}: {}", String::from_utf8_lossy(&out.stderr));
        Self(path.to_string())
    }
}

impl Drop for DevNode {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

#[test]
fn on_cgroup_v2_run_exec_pause_metrics_checkpoint_and_restore_work_like_the_stock_shim() {
    let bed: Bed = bed_with(|b| b.cgroup(CgroupMode::V2), "");
    let tb = &bed.tb;
    assert_eq!(tb.cgroup_mode(), CgroupMode::V2);

    // The stock shim and ours run the same container; both land in v2 cgroups and pause through
    // cgroup.freeze.
    let stock = unique_name("v2-runc");
    tb.ctr_ok(&["run", "-d", "--runtime", RUNC, "--cpu-shares", "0", IMAGE, &stock, "sleep", "1000"]);
    wait_for("the stock shim's task", || (common::task_status(tb, &stock).as_deref() == Some("RUNNING")).then_some(()));
    pause_and_resume(tb, &stock);
    remove(tb, &stock);

    // A device node the spec grants (char 240:0, no driver behind it). Under /dev: `ctr run
    // --device` keeps the host's path in the container, and a node outside the container's /dev
    // tmpfs would live in the rootfs, which a restore does not carry device nodes of.
    let node = DevNode::new(&format!("/dev/{}", unique_name("kbt-dev240")));
    let device = node.0.as_str();
    let with_device = [NO_CPU_SHARES[0], NO_CPU_SHARES[1], "--device", device];

    let id = unique_name("v2");
    run_counter(tb, &id, &with_device);
    wait_counter(tb, &id, 3);
    pause_and_resume(tb, &id);
    let n = counter(tb, &id).unwrap();
    wait_counter(tb, &id, n + 3);

    // exec: the process joins the container's v2 cgroup (no cgroup namespace in ctr's spec: the
    // path is the host's; the v1 lines are the machine's, which runc leaves alone in unified mode).
    let out = tb.ctr_ok(&["task", "exec", "--exec-id", "cg", &id, "cat", "/proc/self/cgroup"]);
    let v2_line = out.lines().find_map(|l| l.strip_prefix("0::")).unwrap_or_else(|| panic!("no v2 line: {out}"));
    assert_eq!(
        tb.v2_cgroup_dir(v2_line),
        Some(cgroup_dir(tb, &id)),
        "the exec'd process is not in the container's cgroup: {out}"
    );

    assert_device_filter(tb, &id, "dev", device);

    // Metrics: the v2 type, with what the hierarchy has (no memory or cpu controller here), and
    // no error for the missing controllers.
    let metrics = tb.ctr_ok(&["task", "metrics", &id]);
    eprintln!("ctr task metrics on v2:\n{metrics}");
    assert!(!metrics.is_empty());

    // A checkpoint into the store (leave running), then a restore by annotation: the restored
    // counter counts on from the checkpoint, in a v2 cgroup of its own, and pauses.
    let (dir, at) = store_checkpoint(&bed, &id, false);
    assert_eq!(common::task_status(tb, &id).as_deref(), Some("RUNNING"));
    remove(tb, &id);
    let restored = unique_name("v2-restored");
    run_restored_ok(&bed, &dir, &restored, &with_device);
    assert_counter_continues(tb, &restored, at);
    // In the new container's cgroup, not the one it was dumped from (runc 1.1 tells CRIU only on
    // v1; the shim's CRIU config says `cgroup-root`): else pause, limits and stats miss it.
    let dir = cgroup_dir(tb, &restored);
    assert!(dir.ends_with(&restored), "restored into {}, not its own cgroup", dir.display());
    pause_and_resume(tb, &restored);
    // The restored container's device access is its own spec's, enforced by the filter runc
    // attached for it.
    assert_device_filter(tb, &restored, "dev-restored", device);
    remove(tb, &restored);
}
