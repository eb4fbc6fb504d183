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

/// Whether this v2 test bed lacks the memory controller (these machines). A machine with it
/// (a real v2 node) would report memory and watch OOM kills instead: the next test then says
/// why it does not apply.
fn lacks_memory(tb: &Testbed, test: &str) -> bool {
    if tb.v2_has_controller("memory") {
        eprintln!(
            "{test}: SKIPPED: this cgroup v2 hierarchy has the memory controller, and the test is about a v2 node \
             without it (the shim's unit tests cover the v2 memory files)"
        );
        return false;
    }
    true
}

/// The names of the threads of `pid`.
fn thread_names(pid: u32) -> Vec<String> {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else { return Vec::new() };
    tasks
        .flatten()
        .filter_map(|t| std::fs::read_to_string(t.path().join("comm")).ok())
        .map(|c| c.trim().to_string())
        .collect()
}

#[test]
fn on_cgroup_v2_without_the_memory_controller_metrics_leave_it_out_and_the_oom_watch_says_so_once() {
    let bed: Bed = bed_with(|b| b.cgroup(CgroupMode::V2), "");
    let tb = &bed.tb;
    if !lacks_memory(
        tb,
        "on_cgroup_v2_without_the_memory_controller_metrics_leave_it_out_and_the_oom_watch_says_so_once",
    ) {
        return;
    }
    // Two containers in one shim (a pod's group): the shim says once that it cannot watch OOM
    // kills, starts no watcher thread for either, and both run.
    let group = format!("io.containerd.runc.v2.group={}", unique_name("v2-group"));
    let (first, second) = (unique_name("v2-oom-a"), unique_name("v2-oom-b"));
    for id in [&first, &second] {
        run_counter(tb, id, &["--annotation", &group]);
    }
    wait_counter(tb, &first, 3);
    wait_counter(tb, &second, 3);
    let line = tb.wait_log_line(&["no OOM notifications", "memory.events does not exist"]);
    assert!(line.contains("memory controller"), "the log line does not say why: {line}");
    let (init_a, _) = task_row(tb, &first).unwrap();
    let (init_b, _) = task_row(tb, &second).unwrap();
    let shim = common::procs::stat(init_a).map(|(_, ppid)| ppid).expect("the shim");
    assert_eq!(common::procs::stat(init_b).map(|(_, ppid)| ppid), Some(shim), "not one shim for the group");
    let threads = thread_names(shim);
    assert!(!threads.iter().any(|t| t == "kyb-oom"), "an OOM watcher thread runs without memory.events: {threads:?}");
    // Still once after a while (no retry loop), and the containers count on.
    let n = counter(tb, &second).unwrap();
    wait_counter(tb, &second, n + 2);
    let log = std::fs::read_to_string(tb.log_path()).unwrap();
    let said: Vec<&str> = log.lines().filter(|l| l.contains("no OOM notifications")).collect();
    assert_eq!(said.len(), 1, "want the OOM watch's line once for the shim: {said:#?}");

    // Metrics: the v2 type with what this hierarchy has (cpu.stat's usage, hugetlb), and no
    // memory or pids stats rather than zeros.
    let json = tb.ctr_ok(&["task", "metrics", "--format", "json", &first]);
    eprintln!("ctr task metrics --format json on v2:\n{json}");
    let m: serde_json::Value = serde_json::from_str(&json).unwrap_or_else(|e| panic!("{e}: {json}"));
    assert!(m["cpu"]["usage_usec"].as_u64().is_some_and(|u| u > 0), "no cpu usage: {m}");
    for absent in ["memory", "memory_events", "pids"] {
        assert!(m.get(absent).is_none_or(serde_json::Value::is_null), "{absent} reported without its controller: {m}");
    }
    if tb.v2_has_controller("hugetlb") {
        let sizes = m["hugetlb"].as_array().unwrap_or_else(|| panic!("no hugetlb stats: {m}"));
        assert!(sizes.iter().all(|s| s["pagesize"].as_str().is_some_and(|p| p.ends_with('B'))), "{m}");
        assert!(!sizes.is_empty(), "{m}");
    }
    remove(tb, &first);
    remove(tb, &second);
}

#[test]
fn on_cgroup_v2_a_checkpoint_of_a_paused_container_leaves_it_paused() {
    let bed: Bed = bed_with(|b| b.cgroup(CgroupMode::V2), "");
    let tb = &bed.tb;
    let id = unique_name("v2-paused");
    run_counter(tb, &id, &[]);
    wait_counter(tb, &id, 3);
    let dir = cgroup_dir(tb, &id);
    tb.ctr_ok(&["task", "pause", &id]);
    wait_for(&format!("{id} frozen"), || frozen(&dir).then_some(()));
    let at = counter(tb, &id).unwrap();

    // Leave-running checkpoint of the paused container: runc hands CRIU the v2 freezer, CRIU
    // dumps the frozen tasks and puts the freezer back as it found it.
    let target = common::ckpt::store_path(&bed, &id);
    let o = containerd_shim_protos::shim::oci::CheckpointOptions {
        image_path: target.display().to_string(),
        ..Default::default()
    };
    common::ckpt::checkpoint(tb, &id, o).unwrap_or_else(|e| panic!("checkpoint of paused {id}: {e}"));
    kybernate_checkpoint::verify(&target).unwrap_or_else(|e| panic!("{}: {e}", target.display()));

    assert_eq!(common::task_status(tb, &id).as_deref(), Some("PAUSED"), "the shim's state after the checkpoint");
    assert_eq!(read(&dir, "cgroup.freeze").trim(), "1", "cgroup.freeze after the checkpoint");
    assert!(frozen(&dir), "cgroup.events says thawed after the checkpoint: {}", read(&dir, "cgroup.events"));
    std::thread::sleep(std::time::Duration::from_millis(300));
    assert_eq!(counter(tb, &id), Some(at), "the paused counter moved during or after the checkpoint");

    tb.ctr_ok(&["task", "resume", &id]);
    wait_for(&format!("{id} thawed"), || (!frozen(&dir)).then_some(()));
    wait_counter(tb, &id, at + 2);
    remove(tb, &id);
}

/// A v2 cgroup made for the shim (`ShimCgroup`), removed on drop once empty.
struct ShimCgroupDir(PathBuf);

impl Drop for ShimCgroupDir {
    fn drop(&mut self) {
        let deadline = std::time::Instant::now() + common::TIMEOUT;
        while std::fs::remove_dir(&self.0).is_err() && self.0.exists() && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
    }
}

/// A shim daemon started by a test, SIGKILLed on drop if the test did not shut it down.
struct KillOnDrop(u32);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if common::procs::alive(self.0) {
            let _ =
                nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.0 as i32), nix::sys::signal::Signal::SIGKILL);
        }
    }
}

#[test]
fn on_cgroup_v2_the_shim_joins_its_shim_cgroup() {
    use containerd_shim_protos::protobuf::well_known_types::any::Any;
    use containerd_shim_protos::protobuf::Message;
    use containerd_shim_protos::shim::oci::Options as RuncOptions;
    use containerd_shim_protos::{api, ttrpc::context, Client, TaskClient};
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;

    let tb = Testbed::builder().cgroup(CgroupMode::V2).start().expect("a cgroup v2 test bed");
    let name = unique_name("shimcg");
    let dir = tb.v2_cgroup_dir(&format!("/{name}")).unwrap();
    std::fs::create_dir(&dir).unwrap_or_else(|e| panic!("mkdir {}: {e}", dir.display()));
    let _cg = ShimCgroupDir(dir.clone());

    // The start action as containerd runs it, where containerd runs (cgroup2 at /sys/fs/cgroup):
    // in the bundle dir, with the runc options naming the cgroup on stdin.
    let id = unique_name("v2-start");
    let bundle = tb.dir().join("start-bundles").join(&id);
    std::fs::create_dir_all(&bundle).unwrap();
    std::fs::write(bundle.join("config.json"), r#"{"ociVersion":"1.0.2","annotations":{}}"#).unwrap();
    nix::unistd::mkfifo(&bundle.join("log"), nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
    let _log = std::fs::OpenOptions::new().read(true).custom_flags(libc::O_NONBLOCK).open(bundle.join("log")).unwrap();
    let opts = RuncOptions { shim_cgroup: format!("/{name}"), ..Default::default() };
    let any = Any {
        type_url: "containerd.runc.v1.Options".into(),
        value: opts.write_to_bytes().unwrap(),
        ..Default::default()
    };
    let address = tb.address().to_str().unwrap().to_string();
    let mut start = tb.command_in_namespace(common::SHIM);
    start
        .args(["-namespace", tb.namespace(), "-address", &address, "-publish-binary", "/usr/bin/containerd"])
        .args(["-id", &id, "start"])
        .current_dir(&bundle)
        .env("TTRPC_ADDRESS", format!("{address}.ttrpc"))
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let mut child = start.spawn().expect("the shim's start action");
    child.stdin.take().unwrap().write_all(&any.write_to_bytes().unwrap()).unwrap();
    let out = child.wait_with_output().unwrap();
    let shim_address = String::from_utf8_lossy(&out.stdout).trim().to_string();
    assert!(out.status.success() && shim_address.starts_with("unix://"), "start failed: {out:?}");

    let client = TaskClient::new(Client::connect(&shim_address).expect("connecting to the shim"));
    let ctx = || context::with_duration(common::TIMEOUT);
    let pid = client.connect(ctx(), &api::ConnectRequest { id: id.clone(), ..Default::default() }).unwrap().shim_pid;
    let _daemon = KillOnDrop(pid);
    let cgroups = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap();
    let v2_line = cgroups.lines().find_map(|l| l.strip_prefix("0::")).unwrap_or_default().to_string();
    let procs = std::fs::read_to_string(dir.join("cgroup.procs")).unwrap();
    let _ = client.shutdown(ctx(), &api::ShutdownRequest { id: id.clone(), ..Default::default() });
    wait_for("the shim daemon to exit", || (!common::procs::alive(pid)).then_some(()));
    assert_eq!(v2_line, format!("/{name}"), "the shim daemon is not in its ShimCgroup; /proc/{pid}/cgroup:\n{cgroups}");
    assert!(procs.lines().any(|l| l.trim() == pid.to_string()), "{}/cgroup.procs lacks {pid}: {procs}", dir.display());
}
