//! GPU containers end to end on a machine without a GPU: real containerd, runc and CRIU, with
//! faithful doubles where the real thing cannot exist here — `nvidia-container-runtime`
//! (shim/examples/fake_nvidia_runtime.rs: edits the spec on create like its CDI mode, passes
//! everything else to runc, logs and can fail every call) and `libcuda.so.1`
//! (test/fakes/libcuda.c: the driver's checkpoint API with per-process state, a call log and
//! failure injection at any step).
//!
//! The container is a counter beside two long-lived CUDA processes that hold `/dev/nvidiactl`
//! open (marked so that the fake driver knows them as CUDA processes, as the real driver knows
//! processes with a CUDA context), and a third process holding `/dev/nvidiactl` without CUDA (a
//! forked data-loader worker, an NVML sidecar) that the checkpoint must skip. Its GPU evidence is
//! a char device of major 195 in its spec (`ctr run --device` of a node made for the test).
//! A restored container asks for its GPU itself (a `cdi.k8s.io` annotation or
//! `NVIDIA_VISIBLE_DEVICES`), resolved through the test bed's own CDI spec dir (never /etc/cdi).

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use containerd_shim_protos::shim::oci::CheckpointOptions;
use containerd_shim_protos::ttrpc::Code;
use kybernate_testbed::fakes::{
    cuda_worker_sh, nvidia_device_node, nvidia_gpu_node, FakeCall, FakeCuda, FakeGpu, FakeNvidiaProc, CUDA_IPC_MARK,
    CUDA_MARK,
};
use kybernate_testbed::{unique_name, IMAGE};
use serde_json::Value;

mod common;

use common::ckpt::*;
use common::{bundle_dir, fake_gpu_runtime_binary, task_row, task_status, text, wait_for, RUNTIME};

/// The counter, beside two long-lived CUDA processes holding the (fake) NVIDIA control device
/// open, as a tensor-parallel server runs one CUDA process per GPU (neither is init), and a
/// worker that holds it without CUDA.
fn gpu_counter() -> String {
    format!(
        "{} {} sleep 100002 </dev/nvidiactl & i=0; while true; do i=$((i+1)); echo $i > /tmp/counter.new; \
         mv /tmp/counter.new /tmp/counter; usleep 100000; done",
        cuda_worker_sh(100000, &[]),
        cuda_worker_sh(100001, &[])
    )
}
/// A driver library the fake GPU runtime bind-mounts, as the real one mounts libnvidia-ml.
const DRIVER_MOUNT: &str = "/usr/lib/x86_64-linux-gnu/libnvidia-ml.so.1";
const DRIVER_TEXT: &str = "fake NVIDIA management library\n";
/// How a restored container asks for GPU 0 through CDI (`ctr run --annotation`).
const CDI_GPU0: &str = "cdi.k8s.io/gpu=nvidia.com/gpu=0";

struct GpuBed {
    bed: Bed,
    cuda: FakeCuda,
    /// The fake GPU runtime's directory (calls.log, fail).
    nvidia: PathBuf,
    /// The host device node given to containers with `--device` (char 195:0).
    device: PathBuf,
    /// The driver file the GPU runtime (and the CDI spec) mounts at [`DRIVER_MOUNT`].
    driver: PathBuf,
    /// Exists → the CRIU wrapper fails every dump and restore.
    criu_fail: PathBuf,
    /// The node's CDI spec dir (`[checkpoint] cdi_spec_dirs`).
    cdi: PathBuf,
    _dir: tempfile::TempDir,
}

/// A test bed with the fake GPU runtime and a CRIU wrapper (which records each CRIU run in the
/// fake driver's call log, so the order of driver calls and the dump can be checked) on PATH,
/// and a config whose `[checkpoint]` gets `extra` and `libcuda` pointing at the fake.
fn gpu_bed(extra: &str) -> GpuBed {
    gpu_bed_with(extra, false, |b| b)
}

/// `hook_mount`: the driver mount is made by the GPU runtime's prestart hook (its legacy mode)
/// instead of being put into the spec.
fn gpu_bed_with(
    extra: &str,
    hook_mount: bool,
    configure: impl FnOnce(kybernate_testbed::Builder) -> kybernate_testbed::Builder,
) -> GpuBed {
    let dir = kybernate_testbed::scratch_dir().expect("scratch dir");
    let d = dir.path();
    let cuda = FakeCuda::build(&d.join("cuda"), true);

    let nvidia = d.join("nvidia");
    std::fs::create_dir_all(&nvidia).unwrap();
    let fake = fake_gpu_runtime_binary();
    std::fs::copy(&fake, nvidia.join("nvidia-container-runtime")).unwrap();
    let driver = d.join("driver/libnvidia-ml.so.1");
    std::fs::create_dir_all(driver.parent().unwrap()).unwrap();
    std::fs::write(&driver, DRIVER_TEXT).unwrap();
    let mut edits = serde_json::json!({
        // /dev/nvidiactl is /dev/null's numbers here: a CUDA process must be able to open it.
        "devices": [
            {"path": "/dev/nvidia0", "type": "c", "major": 195, "minor": 0, "fileMode": 438, "uid": 0, "gid": 0},
            {"path": "/dev/nvidiactl", "type": "c", "major": 1, "minor": 3, "fileMode": 438, "uid": 0, "gid": 0}
        ],
        "rules": [{"allow": true, "type": "c", "major": 195, "minor": 0, "access": "rwm"}],
        "mounts": [{"destination": DRIVER_MOUNT, "type": "bind", "source": driver, "options": ["rbind", "ro", "nosuid", "nodev"]}]
    });
    if hook_mount {
        edits["hook_mounts"] = edits["mounts"].take();
        edits["mounts"] = serde_json::json!([]);
    }
    std::fs::write(nvidia.join("edits.json"), edits.to_string()).unwrap();

    let device = nvidia_device_node(&d.join("dev/nvidia0"));
    write_cdi_spec(&d.join("cdi"), &[(0, &device)], &driver);

    let criu_bin = d.join("criu-bin");
    std::fs::create_dir_all(&criu_bin).unwrap();
    let real_criu = kybernate_checkpoint::find_criu(None, std::env::var_os("PATH").as_deref()).expect("criu on PATH");
    let criu_fail = d.join("criu-fail");
    let wrapper = criu_bin.join("criu");
    std::fs::write(
        &wrapper,
        format!(
            "#!/bin/sh\nif [ \"$1\" = swrk ]; then\n  printf 'criu 0 0 libs=%s\\n' \"$CRIU_LIBS_DIR\" >> {log}\n  [ -e {fail} ] && exit 1\nfi\nexec {real} \"$@\"\n",
            log = cuda.dir.join("calls.log").display(),
            fail = criu_fail.display(),
            real = real_criu.display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&wrapper, std::fs::Permissions::from_mode(0o755)).unwrap();

    let config =
        format!("libcuda = \"{}\"\ncdi_spec_dirs = [\"{}\"]\n{extra}", cuda.lib.display(), d.join("cdi").display());
    let bed = bed_with(|b| configure(b.path_prepend(&nvidia).path_prepend(&criu_bin)), &config);
    GpuBed { bed, cuda, nvidia, device, driver, criu_fail, cdi: d.join("cdi"), _dir: dir }
}

/// The node's CDI spec, as `nvidia-ctk cdi generate` would describe this fake node: GPU "N" is
/// the test's char 195:N node of `gpus` (minor, host node), and every device gets the control
/// node (here /dev/null's numbers, so that CUDA processes can open it) and the driver library
/// mount.
fn write_cdi_spec(dir: &Path, gpus: &[(u32, &Path)], driver: &Path) {
    std::fs::create_dir_all(dir).unwrap();
    let devices: String = gpus
        .iter()
        .map(|(minor, host)| {
            format!(
                "- name: \"{minor}\"\n  containerEdits:\n    deviceNodes:\n    - path: /dev/nvidia{minor}\n      \
                 hostPath: {}\n",
                host.display()
            )
        })
        .collect();
    let yaml = format!(
        "---\ncdiVersion: 0.5.0\nkind: nvidia.com/gpu\ndevices:\n{devices}containerEdits:\n  deviceNodes:\n  \
         - path: /dev/nvidiactl\n    hostPath: /dev/null\n  mounts:\n  - hostPath: {driver}\n    \
         containerPath: {DRIVER_MOUNT}\n    options: [ro, nosuid, nodev, bind]\n",
        driver = driver.display(),
    );
    std::fs::write(dir.join("nvidia.yaml"), yaml).unwrap();
}

/// Edits a checkpoint's manifest (which is not hashed: anyone who can write the store can do
/// this) so that its record of devices and mounts claims more than the container had: its
/// driver mount from a host file of /etc, a mount of the host's /etc, and the host's disk.
fn poison_record(dir: &Path) {
    let path = dir.join("kybernate.json");
    let mut m = manifest(dir);
    let devices = &mut m["gpu"]["devices"];
    for mount in devices["mounts"].as_array_mut().unwrap() {
        mount["source"] = "/etc/passwd".into();
    }
    devices["mounts"].as_array_mut().unwrap().push(serde_json::json!(
        {"destination": POISON_MOUNT, "source": "/etc", "type": "bind", "options": ["rbind"]}
    ));
    devices["devices"]
        .as_array_mut()
        .unwrap()
        .push(serde_json::json!({"path": "/dev/sda", "type": "b", "major": 8, "minor": 0, "fileMode": 432}));
    devices["rules"]
        .as_array_mut()
        .unwrap()
        .push(serde_json::json!({"allow": true, "type": "b", "major": 8, "minor": 0, "access": "rwm"}));
    std::fs::write(&path, serde_json::to_vec_pretty(&m).unwrap()).unwrap();
}

/// Where [`poison_record`] claims the host's /etc was mounted.
const POISON_MOUNT: &str = "/usr/lib/nvidia-host-etc";

/// The restored container got nothing of a poisoned record: no disk, no rule for it, no mount
/// from /etc; its driver mount is the CDI spec's.
fn assert_nothing_from_the_record(g: &GpuBed, id: &str) {
    let tb = &g.bed.tb;
    let spec: Value = serde_json::from_slice(&std::fs::read(bundle_dir(tb, id).join("config.json")).unwrap()).unwrap();
    let list = |ptr: &str| spec.pointer(ptr).and_then(Value::as_array).cloned().unwrap_or_default();
    assert!(!list("/linux/devices").iter().any(|d| d["path"] == "/dev/sda" || d["major"] == 8), "{spec}");
    assert!(!list("/linux/resources/devices").iter().any(|r| r["major"] == 8), "{spec}");
    let from_etc = |m: &Value| m["source"].as_str().is_some_and(|s| s.starts_with("/etc"));
    assert!(!list("/mounts").iter().any(|m| from_etc(m) || m["destination"] == POISON_MOUNT), "{spec}");
    let mounts = list("/mounts");
    let driver: Vec<&Value> = mounts.iter().filter(|m| m["destination"] == DRIVER_MOUNT).collect();
    assert_eq!(driver.len(), 1, "{spec}");
    assert_eq!(driver[0]["source"], g.driver.to_str().unwrap(), "{spec}");
    let out = tb.ctr(&["tasks", "exec", "--exec-id", "sda", id, "ls", "/dev/sda", POISON_MOUNT]);
    assert!(!out.status.success(), "{}", text(&out.stdout));
}

fn run_gpu_counter(g: &GpuBed, id: &str) {
    let device = g.device.display().to_string();
    g.bed.tb.ctr_ok(&["run", "-d", "--runtime", RUNTIME, "--device", &device, IMAGE, id, "sh", "-c", &gpu_counter()]);
}

/// Host pids of a task (`ctr t ps`).
fn task_pids(g: &GpuBed, id: &str) -> Vec<i32> {
    let out = g.bed.tb.ctr_ok(&["tasks", "ps", id]);
    out.lines().skip(1).filter_map(|l| l.split_whitespace().next()?.parse().ok()).collect()
}

/// The CUDA processes of a running GPU counter: its two marked workers.
fn cuda_pids(g: &GpuBed, id: &str) -> Vec<i32> {
    wait_for("the GPU counter's CUDA workers", || {
        let pids: Vec<i32> = task_pids(g, id).into_iter().filter(|&p| holds_nvidiactl(p) && is_cuda(p)).collect();
        (pids.len() == 2 && no_cuda_pid(g, id).is_some()).then_some(pids)
    })
}

/// The GPU counter's worker that holds `/dev/nvidiactl` without CUDA.
fn no_cuda_pid(g: &GpuBed, id: &str) -> Option<i32> {
    task_pids(g, id).into_iter().find(|&p| holds_nvidiactl(p) && !is_cuda(p))
}

/// Whether the fake driver knows `pid` as a CUDA process (its environment is marked; a process
/// not yet past its exec counts as neither).
fn is_cuda(pid: i32) -> bool {
    std::fs::read(format!("/proc/{pid}/environ")).is_ok_and(|e| e.split(|&b| b == 0).any(|v| v == CUDA_MARK.as_bytes()))
}

fn holds_nvidiactl(pid: i32) -> bool {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.flatten().any(|e| std::fs::read_link(e.path()).is_ok_and(|t| t == Path::new("/dev/nvidiactl"))))
        .unwrap_or(false)
}

fn ns_pid(pid: i32) -> i32 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("NSpid:")).unwrap();
    line.split_whitespace().last().unwrap().parse().unwrap()
}

fn calls_of(calls: &[FakeCall], function: &str, pid: i32) -> Vec<usize> {
    calls.iter().enumerate().filter(|(_, c)| c.function == function && c.pid == pid).map(|(i, _)| i).collect()
}

fn manifest(dir: &Path) -> Value {
    serde_json::from_slice(&std::fs::read(dir.join("kybernate.json")).unwrap()).unwrap()
}

#[test]
fn driver_api_checkpoint_and_restore_give_back_cuda_state_devices_and_mounts() {
    let g = gpu_bed("cuda = \"driver-api\"\n");
    let tb = &g.bed.tb;
    let id = unique_name("gpu");
    run_gpu_counter(&g, &id);
    let pids = cuda_pids(&g, &id);
    let worker = no_cuda_pid(&g, &id).unwrap();
    // Each GPU checkpoint takes 300 ms in the fake: they overlap (through the driver helper).
    g.cuda.delay("checkpoint", None, 300);
    let (dir, at_checkpoint) = store_checkpoint(&g.bed, &id, false);

    // Every CUDA process: lock (with the configured timeout) → checkpoint, all before CRIU
    // runs (with an empty plugin dir), then restore → unlock after it, since it keeps running.
    let calls = g.cuda.calls();
    let dump = calls.iter().position(|c| c.function == "criu").expect("CRIU never ran");
    assert!(calls[dump].extra.as_deref().unwrap_or("").ends_with("/criu-no-plugins"), "{:?}", calls[dump]);
    for &pid in &pids {
        let lock = calls_of(&calls, "cuCheckpointProcessLock", pid);
        let checkpoint = calls_of(&calls, "cuCheckpointProcessCheckpoint", pid);
        let restore = calls_of(&calls, "cuCheckpointProcessRestore", pid);
        let unlock = calls_of(&calls, "cuCheckpointProcessUnlock", pid);
        assert!(
            lock.len() == 1 && checkpoint.len() == 1 && restore.len() == 1 && unlock.len() == 1,
            "{pid}: {calls:?}"
        );
        assert_eq!(calls[lock[0]].extra.as_deref(), Some("timeout=10000"));
        assert!(
            lock[0] < checkpoint[0] && checkpoint[0] < dump && dump < restore[0] && restore[0] < unlock[0],
            "{calls:?}"
        );
        assert_eq!(g.cuda.state_of_pid(pid).as_deref(), Some("running"), "pid {pid}");
    }
    let begins: Vec<usize> = calls
        .iter()
        .enumerate()
        .filter(|(_, c)| c.function == "cuCheckpointProcessCheckpoint.begin")
        .map(|(i, _)| i)
        .collect();
    let first_done = calls.iter().position(|c| c.function == "cuCheckpointProcessCheckpoint").unwrap();
    assert!(begins.len() == 2 && begins.iter().all(|&b| b < first_done), "checkpoints did not overlap: {calls:?}");
    // The worker without CUDA was asked for its restore thread only (the driver said "no CUDA").
    let of_worker: Vec<&FakeCall> = calls.iter().filter(|c| c.pid == worker).collect();
    assert_eq!(of_worker.len(), 1, "{of_worker:?}");
    assert_eq!((of_worker[0].function.as_str(), of_worker[0].code), ("cuCheckpointProcessGetRestoreThreadId", 3));
    assert!(calls.iter().filter(|c| c.pid != worker).all(|c| c.code == 0), "{calls:?}");
    assert_running_gpu(&g, &id);
    assert_driver_stayed_out_of_the_shim(&g, &id);

    let m = manifest(&dir);
    let gpu = &m["gpu"];
    assert_eq!(gpu["mode"], "driver-api", "{m}");
    let procs = gpu["processes"].as_array().unwrap();
    let mut recorded: Vec<i64> = procs.iter().map(|p| p["pid"].as_i64().unwrap()).collect();
    recorded.sort();
    let mut want: Vec<i64> = pids.iter().map(|&p| i64::from(p)).collect();
    want.sort();
    assert_eq!(recorded, want, "{m}");
    assert!(procs.iter().all(|p| p["evidence"].as_str().unwrap().contains("/dev/nvidiactl open")), "{m}");
    let skipped = gpu["skipped"].as_array().unwrap();
    assert_eq!(skipped.len(), 1, "{m}");
    assert_eq!(skipped[0]["pid"], worker, "{m}");
    assert_eq!(skipped[0]["driver_answer"], "CUDA_ERROR_NOT_INITIALIZED (3)", "{m}");
    assert!(skipped[0]["evidence"].as_str().unwrap().contains("/dev/nvidiactl open"), "{m}");
    assert!(procs.iter().all(|p| p["state_checkpointed"] == "checkpointed" && p["state_before"] == "running"), "{m}");
    for phase in ["gpu-lock", "gpu-checkpoint", "criu-dump", "gpu-restore", "gpu-unlock"] {
        assert!(gpu["phases_ms"][phase].is_u64(), "phase {phase} missing: {m}");
    }
    println!(
        "2 CUDA processes × 300 ms of GPU checkpoint each: gpu-checkpoint {} ms",
        gpu["phases_ms"]["gpu-checkpoint"]
    );
    assert_eq!(gpu["cuda_driver_version"], "12.8", "{m}");
    let devices = &gpu["devices"];
    assert!(
        devices["devices"].as_array().unwrap().iter().any(|d| d["path"] == "/dev/nvidia0" && d["major"] == 195),
        "{m}"
    );
    assert!(devices["rules"].as_array().unwrap().iter().any(|r| r["major"] == 195 && r["allow"] == true), "{m}");
    assert!(devices["mounts"].as_array().unwrap().iter().any(|r| r["destination"] == DRIVER_MOUNT), "{m}");

    // Restore on create (the Kubernetes path): a fresh spec that never went through the GPU
    // runtime's create, and asks for its GPU by CDI annotation, so devices, rule and driver
    // mount must come from the node's CDI spec — never from the checkpoint's record, which
    // anyone who can write the store can edit.
    poison_record(&dir);
    let restored = unique_name("gpu-r");
    run_restored_ok(&g.bed, &dir, &restored, &["--annotation", CDI_GPU0]);
    assert_counter_continues(tb, &restored, at_checkpoint);
    let nvidia_calls = std::fs::read_to_string(g.nvidia.join("calls.log")).unwrap();
    assert!(
        nvidia_calls.lines().any(|l| l.contains(" restore ") && l.ends_with(&restored)),
        "the restore did not go through the checkpoint's runtime:\n{nvidia_calls}"
    );

    // Each restored CUDA process got its GPU state back and was unlocked, at its new pid.
    let new_pids = cuda_pids(&g, &restored);
    let calls = g.cuda.calls();
    for &pid in &new_pids {
        let restore = calls_of(&calls, "cuCheckpointProcessRestore", pid);
        let unlock = calls_of(&calls, "cuCheckpointProcessUnlock", pid);
        assert!(restore.len() == 1 && unlock.len() == 1 && restore[0] < unlock[0], "{pid}: {calls:?}");
        assert_eq!(g.cuda.state_of_pid(pid).as_deref(), Some("running"), "pid {pid}");
    }
    let mut old_ns: Vec<i32> = pids.iter().map(|&p| ns_pid_recorded(procs, p)).collect();
    let mut new_ns: Vec<i32> = new_pids.iter().map(|&p| ns_pid(p)).collect();
    old_ns.sort();
    new_ns.sort();
    assert_eq!(old_ns, new_ns, "restored CUDA processes keep their namespace pids");

    let spec: Value =
        serde_json::from_slice(&std::fs::read(bundle_dir(tb, &restored).join("config.json")).unwrap()).unwrap();
    let has = |ptr: &str, f: &dyn Fn(&Value) -> bool| {
        spec.pointer(ptr).and_then(Value::as_array).is_some_and(|a| a.iter().any(f))
    };
    assert!(has("/linux/devices", &|d| d["path"] == "/dev/nvidia0" && d["major"] == 195), "{spec}");
    assert!(has("/linux/resources/devices", &|r| r["major"] == 195 && r["allow"] == true), "{spec}");
    assert!(has("/mounts", &|m| m["destination"] == DRIVER_MOUNT), "{spec}");
    assert_nothing_from_the_record(&g, &restored);
    // What was given is logged (the refusal tests rely on these lines).
    let log = std::fs::read_to_string(tb.log_path()).unwrap_or_default();
    assert!(log.contains(&format!("container {restored}: restore: device /dev/nvidia0 (c 195:0)")), "not logged");
    let out = tb.ctr_ok(&["tasks", "exec", "--exec-id", "lib", &restored, "cat", DRIVER_MOUNT]);
    assert_eq!(out, DRIVER_TEXT);
    let out = tb.ctr_ok(&["tasks", "exec", "--exec-id", "dev", &restored, "ls", "-l", "/dev/nvidia0"]);
    assert!(out.starts_with('c') && out.contains("195,"), "{out}");
    let cgroup = spec["linux"]["cgroupsPath"].as_str().unwrap_or_default().to_string();
    let list = Path::new("/sys/fs/cgroup/devices").join(cgroup.trim_start_matches('/')).join("devices.list");
    if let Ok(list) = std::fs::read_to_string(&list) {
        assert!(list.lines().any(|l| l.starts_with("c 195:0 ")), "{}: {list}", "devices.list");
    }

    assert_driver_stayed_out_of_the_shim(&g, &restored);

    remove(tb, &restored);
    remove(tb, &id);
}

/// The driver calls above were made (the fake logged them), but by helper processes: the shim
/// serving `id` never mapped the driver library, and no helper outlived its operation.
fn assert_driver_stayed_out_of_the_shim(g: &GpuBed, id: &str) {
    let (init, _) = task_row(&g.bed.tb, id).expect("the task is listed");
    let shim = ppid(init as i32);
    let maps = std::fs::read_to_string(format!("/proc/{shim}/maps")).unwrap();
    let lib = g.cuda.lib.to_string_lossy();
    assert!(!maps.contains(lib.as_ref()), "shim {shim} (of {id}) has {lib} mapped:\n{maps}");
    let helpers: Vec<String> = std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|&pid| ppid(pid) == shim)
        .filter_map(|pid| std::fs::read(format!("/proc/{pid}/cmdline")).ok())
        .map(|c| String::from_utf8_lossy(&c).replace('\0', " "))
        .filter(|c| c.contains(" cuda-driver "))
        .collect();
    assert!(helpers.is_empty(), "driver helpers left under shim {shim}: {helpers:?}");
}

/// The parent of `pid` (/proc/PID/stat: `pid (comm) state ppid ...`); -1 when it is gone.
fn ppid(pid: i32) -> i32 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let after_comm = stat.rsplit_once(')').map_or("", |(_, rest)| rest);
    after_comm.split_whitespace().nth(1).and_then(|f| f.parse().ok()).unwrap_or(-1)
}

#[test]
fn the_driver_helper_answers_on_its_own_stdout_and_reports_what_does_not_load() {
    use std::io::Write;
    use std::process::{Command, Stdio};
    let dir = kybernate_testbed::scratch_dir().expect("scratch dir");
    let cuda = FakeCuda::build(&dir.path().join("cuda"), true);
    let helper = |lib: &Path, input: &str| {
        let mut child = Command::new(common::SHIM)
            .arg("cuda-driver")
            .arg(lib)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        child.stdin.take().unwrap().write_all(input.as_bytes()).unwrap();
        child.wait_with_output().unwrap()
    };

    let out = helper(&cuda.lib, "{\"call\":\"driver-version\"}\n{\"call\":\"unlock\",\"pid\":4242}\n");
    assert!(out.status.success(), "{out:?}");
    let lines: Vec<Value> = text(&out.stdout).lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(lines[0], "ready", "{lines:?}");
    assert_eq!(lines[1], serde_json::json!({"number": 12080}), "{lines:?}");
    // The fake's own answer for a process it never locked, code and name as the driver gave them.
    assert!(lines[2]["failed"]["code"].as_i64().is_some_and(|c| c != 0 && c != 999), "{lines:?}");
    assert!(lines[2]["failed"]["name"].as_str().is_some_and(|n| n.starts_with("CUDA_ERROR_")), "{lines:?}");
    assert!(cuda.calls().iter().any(|c| c.function == "cuCheckpointProcessUnlock" && c.pid == 4242));

    let old = FakeCuda::build(&dir.path().join("old"), false);
    let out = helper(&old.lib, "");
    assert!(out.status.success(), "{out:?}");
    let hello: Value = serde_json::from_str(text(&out.stdout).trim()).unwrap();
    assert!(hello["load-failed"].as_str().is_some_and(|m| m.contains("cuCheckpointProcessLock")), "{hello}");

    let out = Command::new(common::SHIM).arg("cuda-driver").output().unwrap();
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert!(text(&out.stderr).contains("usage"), "{out:?}");
}

fn ns_pid_recorded(procs: &[Value], pid: i32) -> i32 {
    let p = procs.iter().find(|p| p["pid"] == pid).unwrap();
    p["ns_pid"].as_i64().unwrap() as i32
}

fn assert_running_gpu(g: &GpuBed, id: &str) {
    assert_eq!(task_status(&g.bed.tb, id).as_deref(), Some("RUNNING"), "{id} not running");
    let n = wait_counter(&g.bed.tb, id, 1);
    wait_counter(&g.bed.tb, id, n + 3);
}

/// Checkpoint into the store through the shim; the error when it fails.
fn failing_checkpoint(g: &GpuBed, id: &str) -> (Code, String, PathBuf) {
    let target = store_path(&g.bed, id);
    let r =
        checkpoint(&g.bed.tb, id, CheckpointOptions { image_path: target.display().to_string(), ..Default::default() });
    let (code, message) = error_of(r);
    (code, message, target)
}

/// After a failed checkpoint: every CUDA process runs unlocked, the container counts on, and
/// no checkpoint (or partial one) is left.
fn assert_nothing_left_locked(g: &GpuBed, id: &str, pids: &[i32], target: &Path) {
    for &pid in pids {
        assert_eq!(g.cuda.state_of_pid(pid).as_deref().unwrap_or("running"), "running", "pid {pid}");
        let calls = g.cuda.calls();
        let locked =
            calls.iter().filter(|c| c.function == "cuCheckpointProcessLock" && c.pid == pid && c.code == 0).count();
        let unlocked =
            calls.iter().filter(|c| c.function == "cuCheckpointProcessUnlock" && c.pid == pid && c.code == 0).count();
        assert_eq!(locked, unlocked, "pid {pid}: {calls:?}");
    }
    assert_running_gpu(g, id);
    let parent = target.parent().unwrap();
    assert!(entries(parent).is_empty(), "left in {}: {:?}", parent.display(), entries(parent));
}

#[test]
fn a_failing_gpu_step_or_dump_leaves_every_cuda_process_unlocked() {
    let g = gpu_bed("cuda = \"driver-api\"\n");
    let id = unique_name("gpu-f");
    run_gpu_counter(&g, &id);
    let pids = cuda_pids(&g, &id);
    wait_counter(&g.bed.tb, &id, 3);

    // The second process's GPU checkpoint fails: the first was already checkpointed.
    g.cuda.fail("checkpoint", Some(pids[1]), 999);
    let (code, message, target) = failing_checkpoint(&g, &id);
    assert_eq!(code, Code::UNKNOWN, "{message}");
    assert!(
        message.contains("cuCheckpointProcessCheckpoint")
            && message.contains("CUDA_ERROR_UNKNOWN")
            && message.contains("restored and unlocked"),
        "{message}"
    );
    assert_nothing_left_locked(&g, &id, &pids, &target);

    // A lock that times out.
    g.cuda.clear_failures();
    g.cuda.fail("lock", Some(pids[0]), 909);
    let (_, message, target) = failing_checkpoint(&g, &id);
    assert!(message.contains("cuCheckpointProcessLock") && message.contains("CUDA_ERROR_TIMEOUT"), "{message}");
    assert_nothing_left_locked(&g, &id, &pids, &target);

    // The CRIU dump fails after both processes were checkpointed.
    g.cuda.clear_failures();
    std::fs::write(&g.criu_fail, "").unwrap();
    let before = g.cuda.calls().len();
    let (_, message, target) = failing_checkpoint(&g, &id);
    assert!(message.contains("checkpoint") && message.contains("failed"), "{message}");
    let calls = g.cuda.calls()[before..].to_vec();
    for &pid in &pids {
        assert_eq!(calls_of(&calls, "cuCheckpointProcessCheckpoint", pid).len(), 1, "{calls:?}");
        assert_eq!(calls_of(&calls, "cuCheckpointProcessRestore", pid).len(), 1, "{calls:?}");
    }
    std::fs::remove_file(&g.criu_fail).unwrap();
    assert_nothing_left_locked(&g, &id, &pids, &target);

    // The driver leaves the second process checkpointed after its failed checkpoint (as the
    // real one can): the rollback asks, then restores and unlocks it.
    g.cuda.fail_then("checkpoint", Some(pids[1]), 999, "checkpointed");
    let before = g.cuda.calls().len();
    let (_, message, target) = failing_checkpoint(&g, &id);
    assert!(message.contains("CUDA_ERROR_UNKNOWN") && message.contains("restored and unlocked"), "{message}");
    let calls = g.cuda.calls()[before..].to_vec();
    assert_eq!(calls_of(&calls, "cuCheckpointProcessRestore", pids[1]).len(), 1, "{calls:?}");
    assert_nothing_left_locked(&g, &id, &pids, &target);

    // Left FAILED: nothing brings it back, and the error names it with the driver's answer;
    // the other process still runs unlocked.
    g.cuda.clear_failures();
    g.cuda.fail_then("checkpoint", Some(pids[1]), 999, "failed");
    let (_, message, _) = failing_checkpoint(&g, &id);
    let named =
        format!("pid {} (ns pid {}) cannot be brought back: the driver says it is failed", pids[1], ns_pid(pids[1]));
    assert!(message.contains(&named), "{message}");
    assert_eq!(g.cuda.state_of_pid(pids[0]).as_deref(), Some("running"));
    assert_eq!(g.cuda.state_of_pid(pids[1]).as_deref(), Some("failed"));

    remove(&g.bed.tb, &id);
}

#[test]
fn a_failed_gpu_restore_stops_the_container_and_other_gpus_are_refused() {
    let g = gpu_bed("cuda = \"driver-api\"\n");
    let tb = &g.bed.tb;
    let id = unique_name("gpu-rf");
    run_gpu_counter(&g, &id);
    cuda_pids(&g, &id);
    let (dir, _) = store_checkpoint(&g.bed, &id, true);
    let device = g.device.display().to_string();
    let run = |name: &str, extra: &[&str]| {
        run_restored(&g.bed, &dir, name, &[&["--device", &device, "--annotation", CDI_GPU0], extra].concat())
    };

    // The driver refuses the GPU restore: Start fails, nothing of the container keeps running.
    g.cuda.fail("restore", None, 999);
    let r = unique_name("gpu-rf-r");
    let out = run(&r, &[]);
    assert!(!out.status.success());
    let err = text(&out.stderr);
    assert!(err.contains("cuCheckpointProcessRestore") && err.contains("CUDA_ERROR_UNKNOWN"), "{err}");
    assert_ne!(task_status(tb, &r).as_deref(), Some("RUNNING"));
    let _ = tb.ctr(&["tasks", "delete", "--force", &r]);
    tb.ctr_ok(&["containers", "delete", &r]);
    g.cuda.clear_failures();

    // A checkpoint taken on other GPUs (its manifest says one H100; this node has none).
    let path = dir.join("kybernate.json");
    let mut m = manifest(&dir);
    m["gpu"]["gpus"] = serde_json::json!([{"index": 0, "model": "NVIDIA H100 80GB HBM3", "uuid": "GPU-1", "bus_id": "0000:18:00.0", "minor": 0}]);
    std::fs::write(&path, serde_json::to_vec_pretty(&m).unwrap()).unwrap();
    let r = unique_name("gpu-mm");
    let out = run(&r, &[]);
    assert!(!out.status.success());
    let err = text(&out.stderr);
    assert!(err.contains("NVIDIA H100 80GB HBM3") && err.contains("allow_gpu_mismatch"), "{err}");
    let _ = tb.ctr(&["containers", "delete", &r]);

    // Allowed for this one container by its annotation.
    let r = unique_name("gpu-mm-ok");
    let out = run(&r, &["--annotation", "kybernate.io/allow-gpu-mismatch=true"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    wait_counter(tb, &r, 1);
    remove(tb, &r);
}

#[test]
fn cuda_modes_are_chosen_and_refused_with_their_reasons() {
    // criu-plugin on a node without what CRIU's CUDA plugin needs: each missing precondition is
    // refused up front with its own message (CRIU's plugin dir and cuda-checkpoint's PATH are the
    // shim's environment, i.e. containerd's), nothing frozen or locked.
    let extra = kybernate_testbed::scratch_dir().unwrap();
    let (plugins, bin) = (extra.path().join("criu-plugins"), extra.path().join("bin"));
    std::fs::create_dir_all(&plugins).unwrap();
    std::fs::create_dir_all(&bin).unwrap();
    let g = gpu_bed_with("cuda = \"criu-plugin\"\n", false, |b| b.env("CRIU_LIBS_DIR", &plugins).path_prepend(&bin));
    let id = unique_name("gpu-pl");
    run_gpu_counter(&g, &id);
    let pids = cuda_pids(&g, &id);
    wait_counter(&g.bed.tb, &id, 3);
    let refused = |want: &[&str]| {
        let (code, message, target) = failing_checkpoint(&g, &id);
        assert_eq!(code, Code::FAILED_PRECONDITION, "{message}");
        assert!(message.contains("[checkpoint] cuda = \"criu-plugin\""), "{message}");
        assert!(want.iter().all(|w| message.contains(w)), "want {want:?} in: {message}");
        assert_nothing_left_locked(&g, &id, &pids, &target);
    };
    refused(&["cuda_plugin.so", plugins.to_str().unwrap()]);
    std::fs::write(plugins.join("cuda_plugin.so"), b"").unwrap();
    refused(&["cuda-checkpoint is not on PATH", "ln -s"]);
    let cc = bin.join("cuda-checkpoint");
    std::fs::write(&cc, "#!/bin/sh\nexit 0\n").unwrap();
    std::fs::set_permissions(&cc, std::fs::Permissions::from_mode(0o755)).unwrap();
    refused(&["no NVIDIA driver", "/proc/driver/nvidia/version"]);
    assert!(g.cuda.calls().iter().all(|c| !c.function.starts_with("cuCheckpointProcess")), "{:?}", g.cuda.calls());
    remove(&g.bed.tb, &id);
    drop(g);

    // auto (the default): without the plugin, the driver API is used where libcuda has it.
    let g = gpu_bed("");
    let id = unique_name("gpu-auto");
    run_gpu_counter(&g, &id);
    cuda_pids(&g, &id);
    let (dir, _) = store_checkpoint(&g.bed, &id, false);
    assert_eq!(manifest(&dir)["gpu"]["mode"], "driver-api");
    remove(&g.bed.tb, &id);
}

#[test]
fn a_driver_mount_made_by_a_hook_is_declared_to_criu_and_given_back() {
    // The legacy mode: nvidia-container-cli mounts the driver files from a prestart hook, so they
    // are in the container's mountinfo but not in its spec, and runc does not declare them to CRIU.
    let g = gpu_bed_with("cuda = \"driver-api\"\n", true, |b| b);
    let tb = &g.bed.tb;
    let id = unique_name("gpu-hook");
    run_gpu_counter(&g, &id);
    cuda_pids(&g, &id);
    let spec: Value = serde_json::from_slice(&std::fs::read(bundle_dir(tb, &id).join("config.json")).unwrap()).unwrap();
    assert!(!spec["mounts"].as_array().unwrap().iter().any(|m| m["destination"] == DRIVER_MOUNT), "in the spec");
    let out = tb.ctr_ok(&["tasks", "exec", "--exec-id", "lib", &id, "cat", DRIVER_MOUNT]);
    assert_eq!(out, DRIVER_TEXT, "the hook did not mount the driver file");

    let (dir, at_checkpoint) = store_checkpoint(&g.bed, &id, false);
    let conf = std::fs::read_to_string(bundle_dir(tb, &id).join("kybernate-criu.conf")).unwrap();
    assert!(conf.contains(&format!("external mnt[{DRIVER_MOUNT}]:{DRIVER_MOUNT}")), "{conf}");
    let m = manifest(&dir);
    let mounts = m["gpu"]["devices"]["mounts"].as_array().unwrap().clone();
    assert!(
        mounts.iter().any(|x| x["destination"] == DRIVER_MOUNT && x["source"] == g.driver.to_str().unwrap()),
        "{mounts:?}"
    );

    // The restored container asks for GPU 0 by NVIDIA_VISIBLE_DEVICES (the node has a CDI spec
    // for nvidia.com/gpu, so through it): the driver mount comes from the CDI spec, declared to
    // CRIU by runc as a spec bind mount, not from the (poisoned) record.
    poison_record(&dir);
    let restored = unique_name("gpu-hook-r");
    run_restored_ok(&g.bed, &dir, &restored, &["--env", "NVIDIA_VISIBLE_DEVICES=0"]);
    assert_counter_continues(tb, &restored, at_checkpoint);
    assert_nothing_from_the_record(&g, &restored);
    let out = tb.ctr_ok(&["tasks", "exec", "--exec-id", "lib", &restored, "cat", DRIVER_MOUNT]);
    assert_eq!(out, DRIVER_TEXT);
    remove(tb, &restored);
    remove(tb, &id);
}

/// The refusal of a restore at Create: `ctr run` fails naming it, no task exists, runc never
/// created the container, and the shim logged no device access given to it.
fn assert_refused(g: &GpuBed, id: &str, out: &std::process::Output, want: &str) {
    let tb = &g.bed.tb;
    assert!(!out.status.success(), "{id} was restored");
    let err = text(&out.stderr);
    assert!(err.contains(want), "want {want:?} in: {err}");
    assert_eq!(task_row(tb, id), None, "{id} has a task");
    assert!(!common::runc_state_entries(tb).contains(&id.to_string()), "runc created {id}");
    let decision = format!("restore decision: container {id} (pod -), checkpoint ");
    let log = wait_for(&format!("the refusal of {id} in the log"), || {
        let log = std::fs::read_to_string(tb.log_path()).ok()?;
        log.lines().any(|l| l.contains(&decision) && l.contains("refused: ") && l.contains(want)).then_some(log)
    });
    let given = format!("container {id}: restore: ");
    assert!(!log.lines().any(|l| l.contains(&given)), "{id} was given device access");
    let _ = tb.ctr(&["containers", "delete", id]);
}

#[test]
fn a_cpu_container_restoring_a_gpu_checkpoint_is_refused_and_gets_nothing() {
    let g = gpu_bed("cuda = \"driver-api\"\n");
    let id = unique_name("gpu-cpu");
    run_gpu_counter(&g, &id);
    cuda_pids(&g, &id);
    let (dir, _) = store_checkpoint(&g.bed, &id, false);

    // No NVIDIA device, no cdi.k8s.io annotation, no NVIDIA_VISIBLE_DEVICES: a pod that asked
    // for no GPU, restoring a checkpoint that recorded one (and, edited, more).
    poison_record(&dir);
    let r = unique_name("gpu-cpu-r");
    let out = run_restored(&g.bed, &dir, &r, &[]);
    assert_refused(
        &g,
        &r,
        &out,
        "the checkpoint used 1 GPU (/dev/nvidia0); this container has none (its spec requests no GPU: no NVIDIA \
         device, no cdi.k8s.io annotation, no NVIDIA_VISIBLE_DEVICES)",
    );
    // Asking for no GPU explicitly is the same.
    let r = unique_name("gpu-void-r");
    let out = run_restored(&g.bed, &dir, &r, &["--env", "NVIDIA_VISIBLE_DEVICES=void"]);
    assert_refused(&g, &r, &out, "this container has none (its spec requests no GPU: ");
    assert_running_gpu(&g, &id);
    remove(&g.bed.tb, &id);
}

#[test]
fn a_container_with_fewer_gpus_than_the_checkpoint_used_is_refused() {
    let g = gpu_bed("cuda = \"driver-api\"\n");
    let tb = &g.bed.tb;
    let id = unique_name("gpu-two");
    run_gpu_counter(&g, &id);
    cuda_pids(&g, &id);
    let (dir, at_checkpoint) = store_checkpoint(&g.bed, &id, true);

    // The record claims a second GPU (as a checkpoint of a two-GPU container would); the new
    // container asks for one.
    let path = dir.join("kybernate.json");
    let original = std::fs::read(&path).unwrap();
    let mut m = manifest(&dir);
    m["gpu"]["devices"]["devices"]
        .as_array_mut()
        .unwrap()
        .push(serde_json::json!({"path": "/dev/nvidia1", "type": "c", "major": 195, "minor": 1, "fileMode": 438}));
    std::fs::write(&path, serde_json::to_vec_pretty(&m).unwrap()).unwrap();
    let r = unique_name("gpu-one-r");
    let out = run_restored(&g.bed, &dir, &r, &["--annotation", CDI_GPU0]);
    assert_refused(
        &g,
        &r,
        &out,
        "the checkpoint used 2 GPUs (/dev/nvidia0, /dev/nvidia1); this container has 1 (/dev/nvidia0)",
    );

    // The same for a second GPU one of its CUDA processes held open.
    m["gpu"]["devices"]["devices"].as_array_mut().unwrap().pop();
    m["gpu"]["processes"][0]["gpu_minors"] = serde_json::json!([0, 1]);
    std::fs::write(&path, serde_json::to_vec_pretty(&m).unwrap()).unwrap();
    let r = unique_name("gpu-one-p");
    let out = run_restored(&g.bed, &dir, &r, &["--env", "NVIDIA_VISIBLE_DEVICES=0"]);
    assert_refused(
        &g,
        &r,
        &out,
        "the checkpoint used 2 GPUs (/dev/nvidia0, /dev/nvidia1); this container has 1 (/dev/nvidia0)",
    );

    // As recorded (one GPU), the same request restores.
    std::fs::write(&path, original).unwrap();
    let r = unique_name("gpu-one-ok");
    run_restored_ok(&g.bed, &dir, &r, &["--annotation", CDI_GPU0]);
    assert_counter_continues(tb, &r, at_checkpoint);
    remove(tb, &r);
    let _ = tb.ctr(&["tasks", "delete", &id]);
}

/// A job that uses NCCL (here: a CUDA process holding one of NCCL's shared-memory segments, its
/// intra-node transport) is refused before anything is locked or frozen: the driver's checkpoint
/// does not support NCCL, and a half-checkpointed collective would hang its peers.
#[test]
fn a_job_that_uses_nccl_is_refused_up_front_and_nothing_is_locked() {
    let g = gpu_bed("cuda = \"driver-api\"\n");
    let id = unique_name("gpu-nccl");
    let device = g.device.display().to_string();
    let script = format!(
        "touch /dev/shm/nccl-kbt; env {CUDA_MARK} sleep 100003 </dev/nvidiactl 3</dev/shm/nccl-kbt & {}",
        gpu_counter()
    );
    g.bed.tb.ctr_ok(&["run", "-d", "--runtime", RUNTIME, "--device", &device, IMAGE, &id, "sh", "-c", &script]);
    wait_counter(&g.bed.tb, &id, 3);
    let (code, message, target) = failing_checkpoint(&g, &id);
    assert_eq!(code, Code::FAILED_PRECONDITION, "{message}");
    assert!(
        message.contains("uses NCCL")
            && message.contains("/dev/shm/nccl-kbt open")
            && message.contains("nothing was locked"),
        "{message}"
    );
    assert!(g.cuda.calls().iter().all(|c| !c.function.starts_with("cuCheckpointProcess")), "{:?}", g.cuda.calls());
    assert_running_gpu(&g, &id);
    let parent = target.parent().unwrap();
    assert!(entries(parent).is_empty(), "left in {}: {:?}", parent.display(), entries(parent));
    remove(&g.bed.tb, &id);
}

/// The board of both GPUs of the remapping node, and another one.
const H100: &str = "NVIDIA H100 80GB HBM3";
const A100: &str = "NVIDIA A100-SXM4-80GB";
/// The UUIDs of GPU 0 and GPU 1 (lower-case hex, as the driver prints a `CUuuid`).
const GPU0: &str = "GPU-5f0e7a1c-3b2d-4c8e-9a61-0d4b7e2f9c10";
const GPU1: &str = "GPU-a7c3e915-62f0-4d1b-8e3a-f19b0c6d2e71";

/// The remapping node's driver tree: GPU 0 an H100 at 0000:18:00.0, GPU 1 a `model1` at
/// 0000:2a:00.0, under driver `version`.
fn two_gpus(proc: &FakeNvidiaProc, version: &str, model1: &str) {
    let gpu = |model: &str, uuid: &str, bus_id: &str, minor| FakeGpu {
        model: model.into(),
        uuid: uuid.into(),
        bus_id: bus_id.into(),
        minor,
    };
    proc.set_version(version);
    proc.set_gpus(&[gpu(H100, GPU0, "0000:18:00.0", 0), gpu(model1, GPU1, "0000:2a:00.0", 1)], version);
}

/// The NVIDIA devices (major 195) of a restored container's spec, and its allow rules for them.
fn spec_gpu_access(g: &GpuBed, id: &str) -> (Vec<(String, i64)>, Vec<Value>) {
    let spec: Value =
        serde_json::from_slice(&std::fs::read(bundle_dir(&g.bed.tb, id).join("config.json")).unwrap()).unwrap();
    let list = |ptr: &str| spec.pointer(ptr).and_then(Value::as_array).cloned().unwrap_or_default();
    let devices = list("/linux/devices")
        .iter()
        .filter(|d| d["major"] == 195)
        .map(|d| (d["path"].as_str().unwrap_or_default().to_string(), d["minor"].as_i64().unwrap_or(-1)))
        .collect();
    let rules =
        list("/linux/resources/devices").into_iter().filter(|r| r["allow"] == true && r["major"] == 195).collect();
    (devices, rules)
}

/// The remapping node: a fake `/proc/driver` bound over the real one in containerd's mount
/// namespace (the shim and the restore verdict read it where they read it on a node) listing two
/// H100s at driver `version` (GPU 0 and 1: device nodes 195:0 and 195:1, CDI devices "0" and
/// "1", the fake libcuda's GPU list with their UUIDs, at `cuda_version`), and a CUDA counter on
/// GPU 0 checkpointed there through the driver API (with exit). Returns the node's files, the bed,
/// the checkpoint and the counter at checkpoint.
fn remap_bed(version: &str, cuda_version: i32) -> (tempfile::TempDir, FakeNvidiaProc, GpuBed, PathBuf, u64) {
    let node = kybernate_testbed::scratch_dir().expect("scratch dir");
    let proc = FakeNvidiaProc::create(&node.path().join("driver"));
    two_gpus(&proc, version, H100);
    let g = gpu_bed_with("cuda = \"driver-api\"\n", false, |b| b.bind_over("/proc/driver", &proc.dir));
    // Only containerd's namespace sees the fake: nothing propagated to the test's (the host's).
    let fake = std::fs::read_to_string(proc.dir.join("nvidia/version")).unwrap();
    assert_ne!(std::fs::read_to_string("/proc/driver/nvidia/version").ok(), Some(fake), "the fake driver leaked");
    g.cuda.set_gpus(&[(GPU0, H100), (GPU1, H100)]);
    g.cuda.set_driver_version(cuda_version);
    let gpu1 = nvidia_gpu_node(&node.path().join("dev/nvidia1"), 1);
    write_cdi_spec(&g.cdi, &[(0, &g.device), (1, &gpu1)], &g.driver);

    let id = unique_name("gpu-remap");
    run_gpu_counter(&g, &id);
    cuda_pids(&g, &id);
    let (dir, at_checkpoint) = store_checkpoint(&g.bed, &id, true);
    // The shim read the node's driver where a node has it.
    let m = manifest(&dir);
    assert_eq!(m["gpu"]["driver_version"], version, "{m}");
    let uuids: Vec<&str> = m["gpu"]["gpus"].as_array().unwrap().iter().filter_map(|x| x["uuid"].as_str()).collect();
    assert_eq!(uuids, [GPU0, GPU1], "{m}");
    let _ = g.bed.tb.ctr(&["tasks", "delete", &id]);
    (node, proc, g, dir, at_checkpoint)
}

/// How the restored containers ask for GPU 1.
const VISIBLE_1: [&str; 2] = ["--env", "NVIDIA_VISIBLE_DEVICES=1"];

/// Issue 26's refusals end to end: a checkpoint of GPU 0 restored into a container given GPU 1
/// is refused before create — below driver r580 (no remapping), when GPU 1 is another model, and
/// for a container given no GPU — naming both sides, with nothing created.
#[test]
fn a_checkpoint_on_gpu_0_is_refused_onto_gpus_it_cannot_move_to() {
    let (_node, proc, g, dir, _) = remap_bed("575.57.08", 12090);

    // Driver r575 (CUDA 12.9) cannot move CUDA state onto another GPU.
    let r = unique_name("gpu-r575");
    let out = run_restored(&g.bed, &dir, &r, &VISIBLE_1);
    assert_refused(
        &g,
        &r,
        &out,
        &format!(
            "gpu-remap-driver: checkpoint's GPUs are not this container's ({GPU0} → {GPU1}): restoring onto other \
             GPUs needs NVIDIA driver ≥ 580 (CUDA 13.0), this node has 575.57.08 (CUDA 12.9)"
        ),
    );

    // On r580, GPU 1 replaced by another board: the pair is named with both models.
    two_gpus(&proc, "580.65.06", A100);
    g.cuda.set_driver_version(13000);
    let r = unique_name("gpu-a100");
    let out = run_restored(&g.bed, &dir, &r, &VISIBLE_1);
    assert_refused(&g, &r, &out, &format!("{GPU0} is a {H100} and {GPU1} a {A100} (the same model is needed)"));

    // No GPU at all: fewer than the checkpoint used.
    two_gpus(&proc, "580.65.06", H100);
    let r = unique_name("gpu-none");
    let out = run_restored(&g.bed, &dir, &r, &["--env", "NVIDIA_VISIBLE_DEVICES=void"]);
    assert_refused(&g, &r, &out, "the checkpoint used 1 GPU (/dev/nvidia0); this container has none");
    // The driver was never asked to restore anything.
    let calls = g.cuda.calls();
    assert!(!calls.iter().any(|c| c.function == "cuCheckpointProcessRestore"), "{calls:?}");
}

/// Issue 26's remapping end to end: on driver r580 a checkpoint of GPU 0 restores into a new
/// container given GPU 1 by its own `NVIDIA_VISIBLE_DEVICES`; the driver gets exactly the pair
/// GPU 0 → GPU 1 for each CUDA process, and the container GPU 1's device node and rule only.
#[test]
fn a_checkpoint_on_gpu_0_restores_into_a_container_given_gpu_1() {
    let (_node, _proc, g, dir, at_checkpoint) = remap_bed("580.65.06", 13000);
    let tb = &g.bed.tb;
    let before = g.cuda.calls().len();
    let r = unique_name("gpu-on-1");
    run_restored_ok(&g.bed, &dir, &r, &VISIBLE_1);
    assert_counter_continues(tb, &r, at_checkpoint);
    let new_pids = cuda_pids(&g, &r);
    let calls = g.cuda.calls()[before..].to_vec();
    let pair = format!("pairs={GPU0}>{GPU1}");
    for &pid in &new_pids {
        let restore = calls_of(&calls, "cuCheckpointProcessRestore", pid);
        let unlock = calls_of(&calls, "cuCheckpointProcessUnlock", pid);
        assert!(restore.len() == 1 && unlock.len() == 1 && restore[0] < unlock[0], "{pid}: {calls:?}");
        assert_eq!(calls[restore[0]].extra.as_deref(), Some(pair.as_str()), "{pid}: {calls:?}");
        assert_eq!(g.cuda.gpus_of_pid(pid).unwrap_or_default(), [GPU1], "pid {pid} lives on GPU 1");
        assert_eq!(g.cuda.state_of_pid(pid).as_deref(), Some("running"), "pid {pid}");
    }
    let restores = calls.iter().filter(|c| c.function == "cuCheckpointProcessRestore").count();
    assert_eq!(restores, new_pids.len(), "one restore per CUDA process: {calls:?}");

    // GPU 1's device node and rule only: nothing of GPU 0 (195:0).
    let (devices, rules) = spec_gpu_access(&g, &r);
    assert_eq!(devices, [("/dev/nvidia1".to_string(), 1)], "{rules:?}");
    assert!(!rules.is_empty() && rules.iter().all(|r| r["minor"] == 1), "{rules:?}");
    let out = tb.ctr_ok(&["tasks", "exec", "--exec-id", "dev", &r, "ls", "/dev"]);
    let nodes: Vec<&str> = out.split_whitespace().filter(|n| n.starts_with("nvidia") && *n != "nvidiactl").collect();
    assert_eq!(nodes, ["nvidia1"], "{out}");
    // Device access as the kernel enforces it (devices cgroup on v1, runc's eBPF filter on v2):
    // GPU 1 opens as far as the driver (none here: ENXIO, not EPERM), GPU 0 is refused.
    let script = "cat /dev/nvidia1 2>&1; mknod /tmp/gpu0 c 195 0 && cat /tmp/gpu0 2>&1; rm -f /tmp/gpu0";
    let out = tb.ctr(&["tasks", "exec", "--exec-id", "open", &r, "sh", "-c", script]);
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    let lines: Vec<&str> = text.lines().collect();
    assert!(lines.first().is_some_and(|l| l.contains("No such device or address")), "GPU 1 not reachable: {text}");
    assert!(lines.get(1).is_some_and(|l| l.contains("Operation not permitted")), "GPU 0 not refused: {text}");
    // CRIU restored from a work copy of the images with GPU 1's node in /dev: gone once restored.
    assert!(!bundle_dir(tb, &r).join("kybernate-images").exists());
    let spec: Value = serde_json::from_slice(&std::fs::read(bundle_dir(tb, &r).join("config.json")).unwrap()).unwrap();
    let cgroup = spec["linux"]["cgroupsPath"].as_str().unwrap_or_default().to_string();
    let list = Path::new("/sys/fs/cgroup/devices").join(cgroup.trim_start_matches('/')).join("devices.list");
    if let Ok(list) = std::fs::read_to_string(&list) {
        assert!(list.lines().any(|l| l.starts_with("c 195:1 ")), "devices.list: {list}");
        assert!(!list.lines().any(|l| l.starts_with("c 195:0 ")), "devices.list: {list}");
    }
    remove(tb, &r);
}

/// GPU 2 and GPU 3 of the four-GPU node.
const GPU2: &str = "GPU-3c9d1e47-8a2b-4f60-b5d3-6e0a9f1c7b24";
const GPU3: &str = "GPU-e15b7a80-4c3f-49d2-a8e6-27f0d3b91c5a";
/// Device memory of each multi-GPU worker per GPU (`FAKE_CUDA_BYTES`).
const WORKER_BYTES: u64 = 1 << 20;

/// A node with four H100s at driver r580 (minors 0–3: device nodes 195:N, CDI devices "N", the
/// fake driver's GPU list), whose GPU runtime gives a new container GPUs 0 and 1.
fn four_gpu_bed() -> (tempfile::TempDir, FakeNvidiaProc, GpuBed) {
    let node = kybernate_testbed::scratch_dir().expect("scratch dir");
    let proc = FakeNvidiaProc::create(&node.path().join("driver"));
    let uuids = [GPU0, GPU1, GPU2, GPU3];
    let gpus: Vec<FakeGpu> = uuids
        .iter()
        .enumerate()
        .map(|(i, uuid)| FakeGpu {
            model: H100.into(),
            uuid: (*uuid).into(),
            bus_id: format!("0000:{:02x}:00.0", 0x18 + 0x12 * i),
            minor: i as u32,
        })
        .collect();
    proc.set_version("580.65.06");
    proc.set_gpus(&gpus, "580.65.06");
    let g = gpu_bed_with("cuda = \"driver-api\"\n", false, |b| b.bind_over("/proc/driver", &proc.dir));
    g.cuda.set_gpus(&uuids.map(|u| (u, H100)));
    g.cuda.set_driver_version(13000);
    let mut hosts = vec![(0, g.device.clone())];
    for minor in 1..4 {
        hosts.push((minor, nvidia_gpu_node(&node.path().join(format!("dev/nvidia{minor}")), minor)));
    }
    let cdi: Vec<(u32, &Path)> = hosts.iter().map(|(m, p)| (*m, p.as_path())).collect();
    write_cdi_spec(&g.cdi, &cdi, &g.driver);
    let node_for = |minor: u32| {
        serde_json::json!({"path": format!("/dev/nvidia{minor}"), "type": "c", "major": 195, "minor": minor,
                           "fileMode": 438, "uid": 0, "gid": 0})
    };
    let rule =
        |minor: u32| serde_json::json!({"allow": true, "type": "c", "major": 195, "minor": minor, "access": "rwm"});
    let edits = serde_json::json!({
        "devices": [node_for(0), node_for(1),
            {"path": "/dev/nvidiactl", "type": "c", "major": 1, "minor": 3, "fileMode": 438, "uid": 0, "gid": 0}],
        "rules": [rule(0), rule(1)],
        "mounts": [{"destination": DRIVER_MOUNT, "type": "bind", "source": g.driver, "options": ["rbind", "ro", "nosuid", "nodev"]}]
    });
    std::fs::write(g.nvidia.join("edits.json"), edits.to_string()).unwrap();
    (node, proc, g)
}

/// The counter beside a tensor-parallel job on GPUs 0 and 1: a CUDA process per GPU (sleep
/// 100010 on GPU 0, 100011 on GPU 1), one on both (100012), each holding
/// [`WORKER_BYTES`] per GPU, and a worker holding `/dev/nvidiactl` without CUDA (100013).
fn multi_gpu_job() -> String {
    let bytes = format!("FAKE_CUDA_BYTES={WORKER_BYTES}");
    format!(
        "{} {} {} sleep 100013 </dev/nvidiactl & i=0; while true; do i=$((i+1)); echo $i > /tmp/counter.new; \
         mv /tmp/counter.new /tmp/counter; usleep 100000; done",
        cuda_worker_sh(100010, &["FAKE_CUDA_GPUS=0", &bytes]),
        cuda_worker_sh(100011, &["FAKE_CUDA_GPUS=1", &bytes]),
        cuda_worker_sh(100012, &["FAKE_CUDA_GPUS=0,1", &bytes]),
    )
}

/// The host pids of a multi-GPU job's workers by their `sleep` argument, once all four run.
fn job_workers(g: &GpuBed, id: &str) -> std::collections::BTreeMap<u32, i32> {
    wait_for("the multi-GPU job's workers", || {
        let workers: std::collections::BTreeMap<u32, i32> = task_pids(g, id)
            .into_iter()
            .filter(|&p| holds_nvidiactl(p))
            .filter_map(|p| {
                let cmdline = std::fs::read(format!("/proc/{p}/cmdline")).ok()?;
                let args: Vec<&[u8]> = cmdline.split(|&b| b == 0).collect();
                let seconds: u32 = std::str::from_utf8(args.get(1)?).ok()?.parse().ok()?;
                (args.first()?.ends_with(b"sleep") && (100010..=100013).contains(&seconds)).then_some((seconds, p))
            })
            .collect();
        let marked = workers.iter().filter(|(s, p)| (**s == 100013) != is_cuda(**p)).count();
        (workers.len() == 4 && marked == 4).then_some(workers)
    })
}

/// One restore of the multi-GPU checkpoint into a container given `visible`, whose GPUs (in
/// minor order) are `assigned`: the recorded GPUs 0 and 1 are paired with them in minor order,
/// whatever the order of `NVIDIA_VISIBLE_DEVICES`. Every CUDA process is restored exactly once
/// with the whole map (none holds a `/dev/nvidiaN`, so its context may span both GPUs), its
/// state ends up on the assigned GPUs its own GPUs map to, the container sees exactly the
/// assigned GPUs' nodes and rules, and the work copy of the images is gone.
fn restore_multi_gpu(g: &GpuBed, dir: &Path, at_checkpoint: u64, visible: &str, assigned: [(u32, &str); 2]) {
    let tb = &g.bed.tb;
    let before = g.cuda.calls().len();
    let r = unique_name("gpu-multi-r");
    run_restored_ok(&g.bed, dir, &r, &["--env", &format!("NVIDIA_VISIBLE_DEVICES={visible}")]);
    assert_counter_continues(tb, &r, at_checkpoint);
    let workers = job_workers(g, &r);
    let calls = g.cuda.calls()[before..].to_vec();
    let pairs = format!("pairs={GPU0}>{},{GPU1}>{}", assigned[0].1, assigned[1].1);
    let onto: std::collections::BTreeMap<u32, Vec<&str>> =
        [(100010, vec![assigned[0].1]), (100011, vec![assigned[1].1]), (100012, vec![assigned[0].1, assigned[1].1])]
            .into();
    for (seconds, want) in &onto {
        let pid = workers[seconds];
        let restore = calls_of(&calls, "cuCheckpointProcessRestore", pid);
        let unlock = calls_of(&calls, "cuCheckpointProcessUnlock", pid);
        assert!(restore.len() == 1 && unlock.len() == 1 && restore[0] < unlock[0], "{visible}: {pid}: {calls:?}");
        assert_eq!(calls[restore[0]].extra.as_deref(), Some(pairs.as_str()), "{visible}: {pid}: {calls:?}");
        assert_eq!(g.cuda.gpus_of_pid(pid).unwrap_or_default(), *want, "{visible}: sleep {seconds} (pid {pid})");
        assert_eq!(g.cuda.state_of_pid(pid).as_deref(), Some("running"), "{visible}: pid {pid}");
    }
    let restores = calls.iter().filter(|c| c.function == "cuCheckpointProcessRestore").count();
    assert_eq!(restores, 3, "{visible}: one restore per CUDA process: {calls:?}");
    // The worker without CUDA was restored by CRIU and left alone by the driver helper.
    let worker = workers[&100013];
    assert!(!calls.iter().any(|c| c.pid == worker), "{calls:?}");

    let (mut devices, rules) = spec_gpu_access(g, &r);
    devices.sort();
    let want: Vec<(String, i64)> = assigned.iter().map(|(m, _)| (format!("/dev/nvidia{m}"), i64::from(*m))).collect();
    assert_eq!(devices, want, "{visible}: {rules:?}");
    let mut rule_minors: Vec<i64> = rules.iter().filter_map(|r| r["minor"].as_i64()).collect();
    rule_minors.sort();
    rule_minors.dedup();
    assert_eq!(rule_minors, want.iter().map(|(_, m)| *m).collect::<Vec<_>>(), "{visible}: {rules:?}");
    let out = tb.ctr_ok(&["tasks", "exec", "--exec-id", "dev", &r, "ls", "/dev"]);
    let mut nodes: Vec<&str> =
        out.split_whitespace().filter(|n| n.starts_with("nvidia") && *n != "nvidiactl").collect();
    nodes.sort();
    let want_nodes: Vec<String> = assigned.iter().map(|(m, _)| format!("nvidia{m}")).collect();
    assert_eq!(nodes, want_nodes, "{visible}: {out}");
    assert!(!bundle_dir(tb, &r).join("kybernate-images").exists(), "{visible}: the work copy is left");
    // On cgroup v1 the devices cgroup shows the rules runc applied: the assigned GPUs' only.
    let spec: Value = serde_json::from_slice(&std::fs::read(bundle_dir(tb, &r).join("config.json")).unwrap()).unwrap();
    let cgroup = spec["linux"]["cgroupsPath"].as_str().unwrap_or_default().to_string();
    let list = Path::new("/sys/fs/cgroup/devices").join(cgroup.trim_start_matches('/')).join("devices.list");
    if let Ok(list) = std::fs::read_to_string(&list) {
        for minor in 0..4 {
            let given = assigned.iter().any(|(m, _)| *m == minor);
            let has = list.lines().any(|l| l.starts_with(&format!("c 195:{minor} ")));
            assert_eq!(has, given, "{visible}: 195:{minor} in devices.list: {list}");
        }
    }
    remove(tb, &r);
}

/// Issue 26's multi-GPU remap end to end: a container given GPUs 0 and 1 runs a CUDA process per
/// GPU, one on both, and a worker without CUDA; checkpointed with exit, it restores into a
/// container given GPUs 3 and 2 (listed in that order) and into one given GPUs 1 and 2, which
/// overlaps the recorded ones (recorded nvidia0 → nvidia1 while nvidia1 → nvidia2).
#[test]
fn a_multi_gpu_job_restores_onto_other_and_overlapping_gpus() {
    let (_node, _proc, g) = four_gpu_bed();
    let tb = &g.bed.tb;
    let id = unique_name("gpu-multi");
    let device = g.device.display().to_string();
    tb.ctr_ok(&["run", "-d", "--runtime", RUNTIME, "--device", &device, IMAGE, &id, "sh", "-c", &multi_gpu_job()]);
    let workers = job_workers(&g, &id);
    let (dir, at_checkpoint) = store_checkpoint(&g.bed, &id, true);

    // Every CUDA process locked before any was checkpointed; each moved its bytes per GPU.
    let calls = g.cuda.calls();
    let last_lock = calls.iter().rposition(|c| c.function == "cuCheckpointProcessLock").unwrap();
    let first_checkpoint = calls.iter().position(|c| c.function == "cuCheckpointProcessCheckpoint").unwrap();
    assert!(last_lock < first_checkpoint, "all locked before any checkpoint: {calls:?}");
    for (seconds, gpus) in [(100010, 1), (100011, 1), (100012, 2)] {
        let pid = workers[&seconds];
        let checkpoint = calls_of(&calls, "cuCheckpointProcessCheckpoint", pid);
        assert_eq!(checkpoint.len(), 1, "{calls:?}");
        let moved = format!("bytes={}", WORKER_BYTES * gpus);
        assert_eq!(calls[checkpoint[0]].extra.as_deref(), Some(moved.as_str()), "sleep {seconds}: {calls:?}");
    }
    let m = manifest(&dir);
    let gpu = &m["gpu"];
    let mut recorded: Vec<i64> =
        gpu["processes"].as_array().unwrap().iter().map(|p| p["pid"].as_i64().unwrap()).collect();
    recorded.sort();
    let mut want: Vec<i64> = [100010, 100011, 100012].iter().map(|s| i64::from(workers[s])).collect();
    want.sort();
    assert_eq!(recorded, want, "{m}");
    assert_eq!(gpu["skipped"].as_array().map(|s| s.len()), Some(1), "{m}");
    assert_eq!(gpu["skipped"][0]["pid"], workers[&100013], "{m}");
    let uuids: Vec<&str> = gpu["gpus"].as_array().unwrap().iter().filter_map(|x| x["uuid"].as_str()).collect();
    assert_eq!(uuids, [GPU0, GPU1, GPU2, GPU3], "{m}");
    // Bytes per GPU are what the processes' resident memory grew by (the real driver stages
    // device memory there), split over the GPUs each held open; the fake cannot grow another
    // process's memory, so here they sum to the (zero) total — consistent, not a measurement.
    let per_gpu: u64 =
        gpu["bytes_per_gpu"].as_object().expect("bytes_per_gpu").values().filter_map(Value::as_u64).sum();
    assert_eq!(per_gpu, gpu["bytes_total"].as_u64().unwrap_or(0), "{m}");
    let mut used: Vec<i64> = gpu["devices"]["devices"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|d| d["major"] == 195)
        .filter_map(|d| d["minor"].as_i64())
        .collect();
    used.sort();
    used.dedup();
    assert_eq!(used, [0, 1], "{m}");

    restore_multi_gpu(&g, &dir, at_checkpoint, "3,2", [(2, GPU2), (3, GPU3)]);
    restore_multi_gpu(&g, &dir, at_checkpoint, "1,2", [(1, GPU1), (2, GPU2)]);
    let _ = tb.ctr(&["tasks", "delete", &id]);
    let _ = tb.ctr(&["containers", "delete", &id]);
}

/// A CUDA process holding CUDA IPC memory: the driver locks it, then answers
/// CUDA_ERROR_NOT_SUPPORTED to its checkpoint (no trace in /proc tells before). The checkpoint
/// fails naming the process and the likely causes; every process is unlocked and running (as
/// the driver says), no checkpoint is left in the store, and the container runs on.
#[test]
fn a_cuda_ipc_process_fails_the_checkpoint_with_the_reason_and_nothing_stays_locked() {
    let g = gpu_bed("cuda = \"driver-api\"\n");
    let id = unique_name("gpu-ipc");
    let device = g.device.display().to_string();
    let script = format!(
        "{} i=0; while true; do i=$((i+1)); echo $i > /tmp/counter.new; mv /tmp/counter.new /tmp/counter; \
         usleep 100000; done",
        [cuda_worker_sh(100020, &[CUDA_IPC_MARK]), cuda_worker_sh(100021, &[])].join(" ")
    );
    g.bed.tb.ctr_ok(&["run", "-d", "--runtime", RUNTIME, "--device", &device, IMAGE, &id, "sh", "-c", &script]);
    let pids = wait_for("the IPC job's CUDA processes", || {
        let pids: Vec<i32> = task_pids(&g, &id).into_iter().filter(|&p| holds_nvidiactl(p) && is_cuda(p)).collect();
        (pids.len() == 2).then_some(pids)
    });
    let ipc = *pids
        .iter()
        .find(|&&p| {
            std::fs::read(format!("/proc/{p}/environ"))
                .is_ok_and(|e| e.split(|&b| b == 0).any(|v| v == CUDA_IPC_MARK.as_bytes()))
        })
        .expect("the IPC process");
    wait_counter(&g.bed.tb, &id, 3);

    let (code, message, target) = failing_checkpoint(&g, &id);
    // Retrying cannot help: a precondition of the job, not a transient failure.
    assert_eq!(code, Code::FAILED_PRECONDITION, "{message}");
    let named =
        format!("the driver does not support checkpointing the CUDA state of pid {ipc} (ns pid {})", ns_pid(ipc));
    for want in [
        "cuCheckpointProcessCheckpoint",
        "CUDA_ERROR_NOT_SUPPORTED (801)",
        named.as_str(),
        "CUDA IPC memory",
        "UVM (managed) memory",
        "MPS",
        "nothing was left locked",
    ] {
        assert!(message.contains(want), "want {want:?} in: {message}");
    }
    // Both were locked; the IPC one failed its checkpoint and was unlocked as the driver left it
    // (locked), the other one's checkpoint, if it ran, was restored.
    let calls = g.cuda.calls();
    let refused = calls_of(&calls, "cuCheckpointProcessCheckpoint", ipc);
    assert!(refused.len() == 1 && calls[refused[0]].code == 801, "{calls:?}");
    for &pid in &pids {
        assert_eq!(g.cuda.state_of_pid(pid).as_deref(), Some("running"), "pid {pid}: {calls:?}");
    }
    assert!(!calls.iter().any(|c| c.function == "criu"), "CRIU ran: {calls:?}");
    assert_nothing_left_locked(&g, &id, &pids, &target);
    remove(&g.bed.tb, &id);
}
