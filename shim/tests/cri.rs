//! The kubelet's view, end to end: CRI v1 calls (what the kubelet sends) into a real containerd
//! (bookworm's 1.6 unless a test names 1.7 or 2.x, which `test/setup.sh` unpacks beside it) whose
//! CRI plugin runs our shim under the runtime handler `kybernate`, with real runc and CRIU. Pods
//! are host-network (no CNI here); see shim/tests/common/cri.rs for the client and the test bed,
//! and docs/testing.md ("CRI / kubelet") for what each test shows.
//!
//! Two registration styles (docs/installation.md): (a) `runtime_type =
//! "io.containerd.kybernate.v1"` + `options.ConfigPath`, and (b) `runtime_type =
//! "io.containerd.runc.v2"` + `runtime_path` = our shim. Measured here: containerd 1.6.20's CRI
//! ignores `runtime_path` and starts the stock `containerd-shim-runc-v2` for style (b) pods
//! (1.7.24 and 2.1.9 honour it), and containerd 2.1's restore from a checkpoint archive ignores it
//! too (it reaches our pod shim through the stock one, over task API v3). So everything that
//! needs our shim under CRI uses style (a); the `lifecycle_runtime_path*` tests and
//! `containerd_2_style_b_*` pin what style (b) gets.

use std::path::{Path, PathBuf};

use containerd_shim_protos::api::{
    CheckpointTaskRequest, CreateTaskRequest, DeleteRequest, KillRequest, PauseRequest, ResumeRequest, StartRequest,
    StateRequest, Status as TaskStatus, WaitRequest,
};
use containerd_shim_protos::protobuf::well_known_types::any::Any;
use containerd_shim_protos::protobuf::Message;
use containerd_shim_protos::shim::oci::{CheckpointOptions, Options as RuncOptions};
use containerd_shim_protos::ttrpc::context;
use containerd_shim_protos::{Client, TaskClient};
use k8s_cri::v1::ImageSpec;
use k8s_cri::v1::{ContainerState, PodSandboxState};
use kybernate_testbed::{
    unique_name, Containerd, Node, Registry, CONTAINERD_RUNC_ROOT, CRI_NAMESPACE, IMAGE, PAUSE_IMAGE,
};

mod common;

use common::ckpt::{CHECKPOINT_TIMEOUT, COUNTER};
use common::cri::*;
use common::{text, wait_for, wait_until, SHIM};

// ---------------------------------------------------------------------------------------------
// Helpers

/// Under `KBT_CGROUP=v2` on a machine whose cgroup2 hierarchy lacks the cpu controller (these
/// test machines: docs/testing.md, cgroup v2), a CRI test cannot run: the CRI plugin always asks
/// for CPU shares (the pod sandbox's default shares, and each container's), which runc writes
/// to `cpu.weight`, so every RunPodSandbox would fail with "cpu.weight: no such file" for any
/// runtime, ours or runc's. Says so and returns true then.
fn skipped_on_v2(test: &str) -> bool {
    let v2 = matches!(kybernate_testbed::CgroupMode::from_env(), Ok(kybernate_testbed::CgroupMode::V2));
    if !v2 || kybernate_testbed::cgroup::v2_hierarchy_has("cpu") {
        return false;
    }
    eprintln!(
        "{test}: SKIPPED on the cgroup v2 test bed (KBT_CGROUP=v2): CRI always sets CPU shares (the sandbox's \
         default and each container's), which runc writes to cpu.weight, and this machine's cgroup2 \
         hierarchy has no cpu controller (\"cpu.weight: no such file\", for any shim); it runs in the \
         host-mode run (docs/testing.md, cgroup v2)"
    );
    true
}

/// The tests on a systemd node (kbt-node) run on the node's own cgroups, this machine's (v1),
/// whatever `KBT_CGROUP` says: under `KBT_CGROUP=v2` they would only repeat the host-mode run.
fn node_test_skipped_on_v2(test: &str) -> bool {
    if !matches!(kybernate_testbed::CgroupMode::from_env(), Ok(kybernate_testbed::CgroupMode::V2)) {
        return false;
    }
    eprintln!(
        "{test}: SKIPPED under KBT_CGROUP=v2: it runs on a systemd node (kbt-node) that uses this machine's \
         own cgroup v1 hierarchies, which KBT_CGROUP does not change; it runs in the host-mode run \
         (docs/testing.md, cgroup v2)"
    );
    true
}

/// The shim's ttrpc socket for a CRI container: its bundle's `address` file, or from containerd
/// 2.x on, `bootstrap.json`'s `address`.
fn shim_client(b: &CriBed, id: &str) -> TaskClient {
    let dir = b.tb.cri_bundle_dir(id);
    let address = match std::fs::read_to_string(dir.join("bootstrap.json")) {
        Ok(json) => {
            let v: serde_json::Value = serde_json::from_str(&json).expect("bootstrap.json");
            v["address"].as_str().unwrap_or_else(|| panic!("no address in bootstrap.json: {json}")).to_string()
        }
        Err(_) => {
            let file = dir.join("address");
            std::fs::read_to_string(&file).unwrap_or_else(|e| panic!("reading {}: {e}", file.display()))
        }
    };
    let client = Client::connect(address.trim()).unwrap_or_else(|e| panic!("connecting to the shim: {e}"));
    TaskClient::new(client)
}

/// The counter of a container, read through ExecSync as a kubelet probe would.
fn counter(cri: &Cri, id: &str) -> Option<u64> {
    let r = cri.exec(id, &["cat", "/tmp/counter"]).ok()?;
    (r.exit_code == 0).then(|| text(&r.stdout).trim().parse().ok()).flatten()
}

fn wait_counter(cri: &Cri, id: &str, at_least: u64) -> u64 {
    wait_for(&format!("counter of {id} to reach {at_least}"), || counter(cri, id).filter(|&n| n >= at_least))
}

/// Asserts that the counter of `id` continues from `from` (not from 1) and advances by 5 more.
fn assert_counter_continues(cri: &Cri, id: &str, from: u64) {
    let first = wait_for(&format!("counter of {id}"), || counter(cri, id));
    assert!(first >= from, "counter of {id} restarted: {first} after a checkpoint at {from}");
    let mut last = first;
    wait_for(&format!("counter of {id} to advance past {}", from + 5), || {
        let n = counter(cri, id)?;
        assert!(n >= last, "counter of {id} went backwards: {last} -> {n}");
        last = n;
        (n >= from + 5).then_some(())
    });
}

fn state(b: &CriBed, id: &str) -> i32 {
    b.cri.status(id).unwrap_or_else(|e| panic!("ContainerStatus {id}: {e}")).state
}

/// Runs a pod in `namespace` (panicking with containerd's log on failure).
fn pod(b: &CriBed, namespace: &str, annotations: &[(&str, &str)]) -> Pod {
    b.run_pod(namespace, annotations).unwrap_or_else(|e| panic!("RunPodSandbox: {e}\n{}", b.tb.log_tail(40)))
}

/// StopPodSandbox + RemovePodSandbox, then nothing of `ids` may be left.
fn remove_pod(b: &CriBed, pod: &Pod, ids: &[&str]) {
    b.cri.stop_pod(&pod.id).expect("StopPodSandbox");
    b.cri.remove_pod(&pod.id).expect("RemovePodSandbox");
    let mut all = ids.to_vec();
    all.push(&pod.id);
    b.assert_nothing_left(&all);
}

// ---------------------------------------------------------------------------------------------
// Lifecycle

/// What [`lifecycle`] saw of the shim.
struct Seen {
    /// The shim binary containerd started for the pod (the sandbox bundle's `shim-binary-path`).
    shim: String,
    /// Our shim's runtime decision for the container (`kybernate-runtime.json`), if it made one.
    record: Option<serde_json::Value>,
}

/// The kubelet's calls for one container, with every status checked.
fn lifecycle(b: &CriBed) -> Seen {
    let pod = pod(b, "default", &[]);
    let st = b.cri.pod_status(&pod.id).expect("PodSandboxStatus");
    assert_eq!(st.state, PodSandboxState::SandboxReady as i32, "{st:?}");
    let shim = shim_binary_of(b, &pod.id);

    let id = b.create(&pod, "app", &SLEEPER, &[]).unwrap_or_else(|e| panic!("CreateContainer: {e}"));
    assert_eq!(state(b, &id), ContainerState::ContainerCreated as i32);
    b.cri.start(&id).unwrap_or_else(|e| panic!("StartContainer: {e}\n{}", b.tb.log_tail(30)));
    assert_eq!(state(b, &id), ContainerState::ContainerRunning as i32);
    let record = std::fs::read(b.tb.cri_bundle_dir(&id).join("kybernate-runtime.json"))
        .ok()
        .map(|bytes| serde_json::from_slice(&bytes).expect("kybernate-runtime.json"));

    let r = b.cri.exec(&id, &["sh", "-c", "echo out; echo err >&2; exit 3"]).expect("ExecSync");
    assert_eq!((r.exit_code, text(&r.stdout), text(&r.stderr)), (3, "out\n".into(), "err\n".into()));
    let r = b.cri.exec(&id, &["cat", "/proc/1/cmdline"]).expect("ExecSync");
    assert_eq!(r.exit_code, 0);
    assert!(text(&r.stdout).starts_with("sh\0-c\0trap"), "the container runs something else: {:?}", text(&r.stdout));

    let listed = b.cri.list(&pod.id).expect("ListContainers");
    assert_eq!(listed.len(), 1, "{listed:?}");
    assert_eq!((listed[0].id.as_str(), listed[0].state), (id.as_str(), ContainerState::ContainerRunning as i32));
    assert_eq!(listed[0].metadata.as_ref().map(|m| m.name.as_str()), Some("app"));

    // SIGTERM reaches the process (it exits 0 at once), and the exit is reported.
    b.cri.stop(&id, 30).expect("StopContainer");
    let st = b.cri.status(&id).expect("ContainerStatus");
    assert_eq!((st.state, st.exit_code), (ContainerState::ContainerExited as i32, 0), "{st:?}");
    assert!(st.finished_at > 0 && st.started_at > 0, "{st:?}");
    let runc_state = Path::new(CONTAINERD_RUNC_ROOT).join(CRI_NAMESPACE).join(&id);
    b.cri.remove(&id).expect("RemoveContainer");
    assert!(b.cri.status(&id).is_err(), "ContainerStatus of a removed container answered");
    assert!(b.cri.list(&pod.id).expect("ListContainers").is_empty());
    assert!(!runc_state.exists(), "runc state {} left after RemoveContainer", runc_state.display());

    b.cri.stop_pod(&pod.id).expect("StopPodSandbox");
    let st = b.cri.pod_status(&pod.id).expect("PodSandboxStatus");
    assert_eq!(st.state, PodSandboxState::SandboxNotready as i32, "{st:?}");
    b.cri.remove_pod(&pod.id).expect("RemovePodSandbox");
    assert!(b.cri.pod_status(&pod.id).is_err(), "PodSandboxStatus of a removed pod answered");
    b.assert_nothing_left(&[&id, &pod.id]);
    Seen { shim, record }
}

/// The shim binary containerd started for a sandbox (its bundle's `shim-binary-path`).
fn shim_binary_of(b: &CriBed, sandbox: &str) -> String {
    let file = b.tb.cri_bundle_dir(sandbox).join("shim-binary-path");
    std::fs::read_to_string(&file).unwrap_or_else(|e| panic!("reading {}: {e}", file.display())).trim().to_string()
}

/// Style (a) under `release`: the pod runs on our shim, which records its runtime decision.
fn lifecycle_runtime_type_on(release: Containerd) {
    let b = cri_bed_with(Style::RuntimeType, Setup { containerd: release, ..Setup::default() });
    let seen = lifecycle(&b);
    assert!(seen.shim.ends_with("/containerd-shim-kybernate-v1"), "the pod ran on {}", seen.shim);
    let record = seen.record.expect("no runtime decision recorded: our shim did not create the container");
    assert_eq!(record["source"], "default", "{record}");
    assert!(record["binary"].as_str().is_some_and(|p| p.ends_with("/runc")), "{record}");
    assert_eq!(record["root"], format!("{CONTAINERD_RUNC_ROOT}/{CRI_NAMESPACE}"), "{record}");
}

#[test]
fn lifecycle_runtime_type() {
    if skipped_on_v2("lifecycle_runtime_type") {
        return;
    }
    lifecycle_runtime_type_on(Containerd::V1_6);
}

#[test]
fn lifecycle_runtime_type_containerd_1_7() {
    if skipped_on_v2("lifecycle_runtime_type_containerd_1_7") {
        return;
    }
    lifecycle_runtime_type_on(Containerd::V1_7);
}

#[test]
fn lifecycle_runtime_type_containerd_2() {
    if skipped_on_v2("lifecycle_runtime_type_containerd_2") {
        return;
    }
    lifecycle_runtime_type_on(Containerd::V2);
}

/// Style (b) works for the whole lifecycle, but which shim runs depends on containerd: 1.6.20's
/// CRI does not pass `runtime_path` on (measured: `shim-binary-path` in the bundles and the
/// process are the stock `/usr/bin/containerd-shim-runc-v2`); 1.7 and 2.x start the shim it names.
fn lifecycle_runtime_path_on(release: Containerd) {
    let b = cri_bed_with(Style::RuntimePath, Setup { containerd: release, ..Setup::default() });
    let seen = lifecycle(&b);
    let version = b.tb.containerd_version();
    if version < (1, 7) {
        assert!(
            seen.shim.ends_with("/containerd-shim-runc-v2") && seen.record.is_none(),
            "containerd {version:?} ran the pod on {} (record {:?}): runtime_path is honoured now; update \
             docs/installation.md and run the style (b) variants",
            seen.shim,
            seen.record
        );
    } else {
        assert_eq!(seen.shim, SHIM, "containerd {version:?} ignored runtime_path");
        let record = seen.record.expect("no runtime decision recorded");
        assert!(record["binary"].as_str().is_some_and(|p| p.ends_with("/runc")), "{record}");
    }
}

#[test]
fn lifecycle_runtime_path() {
    if skipped_on_v2("lifecycle_runtime_path") {
        return;
    }
    lifecycle_runtime_path_on(Containerd::V1_6);
}

#[test]
fn lifecycle_runtime_path_containerd_1_7() {
    if skipped_on_v2("lifecycle_runtime_path_containerd_1_7") {
        return;
    }
    lifecycle_runtime_path_on(Containerd::V1_7);
}

#[test]
fn lifecycle_runtime_path_containerd_2() {
    if skipped_on_v2("lifecycle_runtime_path_containerd_2") {
        return;
    }
    lifecycle_runtime_path_on(Containerd::V2);
}

// ---------------------------------------------------------------------------------------------
// One shim per pod

#[test]
fn a_pods_sandbox_and_containers_share_one_shim() {
    if skipped_on_v2("a_pods_sandbox_and_containers_share_one_shim") {
        return;
    }
    let b = cri_bed(Style::RuntimeType);
    let pod = pod(&b, "default", &[]);
    let one = b.run(&pod, "one", &SLEEPER, &[]);
    let two = b.run(&pod, "two", &SLEEPER, &[]);
    let shims = b.shims();
    assert_eq!(shims.len(), 1, "want one shim for the pod, found {shims:?}");
    assert_eq!(shims[0].1, pod.id, "the pod's shim was started for another id");
    let address = |id: &str| std::fs::read_to_string(b.tb.cri_bundle_dir(id).join("address")).expect("address file");
    assert_eq!(address(&one), address(&pod.id));
    assert_eq!(address(&two), address(&pod.id));
    let tasks = b.tb.ctr_ok_in(CRI_NAMESPACE, &["tasks", "ls"]);
    for id in [&pod.id, &one, &two] {
        assert!(
            tasks.lines().any(|l| l.starts_with(id.as_str()) && l.contains("RUNNING")),
            "{id} not running:\n{tasks}"
        );
    }
    // The shim stays while any container of the pod is left.
    b.cri.stop(&one, 30).expect("StopContainer");
    b.cri.remove(&one).expect("RemoveContainer");
    assert_eq!(b.shims(), shims, "the shim changed after removing one container");
    assert_eq!(state(&b, &two), ContainerState::ContainerRunning as i32);
    remove_pod(&b, &pod, &[&one, &two]);
}

// ---------------------------------------------------------------------------------------------
// Runtime choice per container

#[test]
fn gpu_evidence_goes_through_the_gpu_runtime_and_the_rest_through_runc() {
    if skipped_on_v2("gpu_evidence_goes_through_the_gpu_runtime_and_the_rest_through_runc") {
        return;
    }
    let b = cri_bed_with(Style::RuntimeType, Setup { fake_gpu_runtime: true, ..Default::default() });
    let calls = b.nvidia.as_ref().expect("fake GPU runtime dir").join("calls.log");
    let pod = pod(&b, "default", &[]);
    let gpu = b.run(&pod, "gpu", &SLEEPER, &[("NVIDIA_VISIBLE_DEVICES", "all")]);
    let cpu = b.run(&pod, "cpu", &SLEEPER, &[]);

    let log = std::fs::read_to_string(&calls).unwrap_or_else(|e| panic!("reading {}: {e}", calls.display()));
    let creates: Vec<&str> = log.lines().filter(|l| l.split_whitespace().any(|w| w == "create")).collect();
    assert_eq!(creates.len(), 1, "want one create through the GPU runtime:\n{log}");
    assert!(creates[0].split_whitespace().last() == Some(gpu.as_str()), "{log}");
    assert!(
        !log.contains(&cpu) && !log.contains(&pod.id),
        "CPU container or sandbox went through the GPU runtime:\n{log}"
    );

    let record = b.runtime_record(&gpu);
    assert_eq!(record["gpu"], true, "{record}");
    assert!(record["binary"].as_str().is_some_and(|p| p.ends_with("/nvidia-container-runtime")), "{record}");
    assert!(record["evidence"].to_string().contains("NVIDIA_VISIBLE_DEVICES=all"), "{record}");
    for id in [&cpu, &pod.id] {
        let record = b.runtime_record(id);
        assert_eq!((record["gpu"].as_bool(), record["source"].as_str()), (Some(false), Some("default")), "{record}");
        assert!(record["binary"].as_str().is_some_and(|p| p.ends_with("/runc")), "{record}");
    }
    // Later calls for the GPU container use its runtime too (exec, kill, delete).
    let r = b.cri.exec(&gpu, &["echo", "hi"]).expect("ExecSync");
    assert_eq!((r.exit_code, text(&r.stdout)), (0, "hi\n".into()));
    let log = std::fs::read_to_string(&calls).expect("calls.log");
    assert!(log.lines().any(|l| l.contains(" exec ") && l.contains(&gpu)), "exec did not go through it:\n{log}");
    remove_pod(&b, &pod, &[&gpu, &cpu]);
}

// ---------------------------------------------------------------------------------------------
// Restore on create from the pod annotation

/// Runs a counter pod in Kubernetes namespace `namespace` and checkpoints it (exit) into the
/// store as `<store>/k8s.io/<id>/<name>`, as `kybernate checkpoint` does; returns the reference
/// relative to the store and the counter at checkpoint time.
fn checkpointed_counter(b: &CriBed, namespace: &str) -> (String, u64) {
    let pod = pod(b, namespace, &[]);
    let id = b.run(&pod, "counter", &["sh", "-c", COUNTER], &[]);
    wait_counter(&b.cri, &id, 3);
    let name = unique_name("cp");
    let target = b.store.join(CRI_NAMESPACE).join(&id).join(&name);
    let before = counter(&b.cri, &id).expect("counter before the checkpoint");
    let o = CheckpointOptions { exit: true, image_path: target.display().to_string(), ..Default::default() };
    let req = CheckpointTaskRequest { id: id.clone(), options: Some(runc_options(&o)).into(), ..Default::default() };
    shim_client(b, &id)
        .checkpoint(context::with_duration(CHECKPOINT_TIMEOUT), &req)
        .unwrap_or_else(|e| panic!("checkpoint of {id}: {e}"));
    assert!(target.join("kybernate.json").is_file(), "no checkpoint at {}", target.display());
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(target.join("kybernate.json")).expect("manifest")).expect("manifest");
    assert_eq!(manifest["pod_namespace"], namespace, "{manifest}");
    // exit: the container stops once the checkpoint is safe, and CRI sees it.
    wait_until(
        "the checkpointed container to exit",
        || state(b, &id),
        |s| *s == ContainerState::ContainerExited as i32,
    );
    remove_pod(b, &pod, &[&id]);
    (format!("{CRI_NAMESPACE}/{id}/{name}"), before)
}

fn runc_options(o: &CheckpointOptions) -> Any {
    Any {
        type_url: "containerd.runc.v1.CheckpointOptions".into(),
        value: o.write_to_bytes().expect("encoding CheckpointOptions"),
        ..Default::default()
    }
}

/// CRI copies the pod's passed-through annotations into the sandbox's spec too (containerd
/// pkg/cri/server/sandbox_run_linux.go `sandboxContainerSpec`): the shim must restore only the
/// pod's containers, never its sandbox (`io.kubernetes.cri.container-type: sandbox`), or
/// RunPodSandbox fails ("mnt: No mapping for ... mountpoint").
#[test]
fn a_pod_annotation_restores_its_container_from_the_store() {
    if skipped_on_v2("a_pod_annotation_restores_its_container_from_the_store") {
        return;
    }
    let b = cri_bed(Style::RuntimeType);
    let namespace = unique_name("team");
    let (reference, before) = checkpointed_counter(&b, &namespace);

    let pod = pod(&b, &namespace, &[(RESTORE_ANNOTATION, &reference)]);
    let id = b.run(&pod, "counter", &["sh", "-c", COUNTER], &[]);
    assert_counter_continues(&b.cri, &id, before);
    let r = b.cri.exec(&id, &["cat", "/proc/1/cmdline"]).expect("ExecSync");
    assert!(text(&r.stdout).contains("counter.new"), "not the counter: {:?}", text(&r.stdout));
    // The sandbox keeps its own process: the annotation is meant for the pod's containers.
    assert_sandbox_runs_pause(&b, &pod);
    remove_pod(&b, &pod, &[&id]);
}

/// The other way to name a checkpoint, `RESTORE_FROM` in the container's environment (a pod's
/// `env`), on a node whose admin allowed it (`allow_env_restore`: any pod can set a variable),
/// reaches only that container: the restore itself works under CRI (CRI's mounts, the pod's IPC
/// namespace, host network), and the sandbox is left alone.
#[test]
fn restore_from_in_a_containers_env_restores_it_under_cri() {
    if skipped_on_v2("restore_from_in_a_containers_env_restores_it_under_cri") {
        return;
    }
    let b = cri_bed_with(
        Style::RuntimeType,
        Setup { checkpoint_config: "allow_env_restore = true\n", ..Default::default() },
    );
    let namespace = unique_name("team");
    let (reference, before) = checkpointed_counter(&b, &namespace);

    let pod = pod(&b, &namespace, &[]);
    let id = b.run(&pod, "counter", &["sh", "-c", COUNTER], &[("RESTORE_FROM", &reference)]);
    assert_counter_continues(&b.cri, &id, before);
    assert_sandbox_runs_pause(&b, &pod);
    // The restored container stops, and is removed, like any other.
    b.cri.stop(&id, 2).expect("StopContainer");
    assert_eq!(state(&b, &id), ContainerState::ContainerExited as i32);
    remove_pod(&b, &pod, &[&id]);
}

/// The sandbox's init is the pause command, not a restored process.
fn assert_sandbox_runs_pause(b: &CriBed, pod: &Pod) {
    let file = b.tb.cri_bundle_dir(&pod.id).join("init.pid");
    let pid = std::fs::read_to_string(&file).unwrap_or_else(|e| panic!("reading {}: {e}", file.display()));
    let cmdline = std::fs::read(format!("/proc/{}/cmdline", pid.trim())).expect("the sandbox's cmdline");
    assert!(text(&cmdline).contains("trap"), "the sandbox runs {:?}, not the pause command", text(&cmdline));
}

#[test]
fn a_pod_in_another_namespace_cannot_restore_the_checkpoint() {
    if skipped_on_v2("a_pod_in_another_namespace_cannot_restore_the_checkpoint") {
        return;
    }
    let b = cri_bed(Style::RuntimeType);
    let (reference, _) = checkpointed_counter(&b, &unique_name("team"));
    let other = unique_name("other");

    // Refused at whichever step reaches the shim's restore first; nothing is left either way.
    let mut made = Vec::new();
    let err = match b.run_pod(&other, &[(RESTORE_ANNOTATION, &reference)]) {
        Err(e) => e,
        Ok(pod) => {
            made.push(pod.id.clone());
            let result = b.create(&pod, "counter", &["sh", "-c", COUNTER], &[]).and_then(|id| {
                made.push(id.clone());
                b.cri.start(&id)
            });
            let err = result.expect_err("a container restored from another namespace's checkpoint");
            let pod_id = pod.id.clone();
            b.cri.stop_pod(&pod_id).expect("StopPodSandbox");
            b.cri.remove_pod(&pod_id).expect("RemovePodSandbox");
            err
        }
    };
    assert!(err.message().contains("cannot be restored into namespace"), "{err}");
    assert!(err.message().contains(&format!("{other:?}")), "{err}");
    let ids: Vec<&str> = made.iter().map(String::as_str).collect();
    b.assert_nothing_left(&ids);
    // Nothing at all: the first pod was removed, and whatever the refused one made is gone too.
    assert!(b.cri.list("").expect("ListContainers").is_empty());
    for what in ["tasks", "containers"] {
        let left = b.tb.ctr_ok_in(CRI_NAMESPACE, &[what, "ls", "-q"]);
        assert!(left.trim().is_empty(), "{what} left in {CRI_NAMESPACE}: {left}");
    }
}

// ---------------------------------------------------------------------------------------------
// containerd 2.x's CRI CheckpointContainer, as it reaches the shim

/// What containerd 2.x sends our shim for `crictl checkpoint` / the kubelet's checkpoint API
/// (CRI `CheckpointContainer`), sent here straight to the shim's ttrpc socket so that each
/// request field is pinned (the real containerd 2.x flow is tested further down, under
/// "The kubelet's checkpoint and restore under a real containerd 2.x"). Read from containerd/containerd:
/// - `internal/cri/server/container_checkpoint_linux.go` (`CheckpointContainer`,
///   `withCheckpointOpts`): `task.Checkpoint` with, for the runtime name `io.containerd.runc.v2`
///   only, `containerd.runc.v1.CheckpointOptions{exit: false, work_path: <CRI root>/containers/<id>}`
///   (newer revisions: `<CRI root>/containers/<id>/ctrd-checkpoint`), no `image_path`; for any
///   other runtime name (ours, style (a)) no options at all. CRI then copies `stats-dump` (and
///   `dump.log` if present) out of that work path (older revisions fail without `stats-dump`),
///   unpacks the task checkpoint blob file by file into `checkpoint/` of the archive
///   (`writeCriuCheckpointData`: `os.Create` per tar entry, so only plain files at the top), and
///   adds `rootfs-diff.tar`, `spec.dump`, `config.dump`, `status.dump`.
/// - `client/task.go` (`Checkpoint`): pauses the task first and resumes it afterwards.
/// - `plugins/services/tasks/local.go` (`Checkpoint`): with no `image_path`, the shim's `path` is
///   a fresh `os.MkdirTemp($XDG_RUNTIME_DIR, "ctrd-checkpoint")`, tarred into the content store
///   as the task checkpoint blob after the shim returns. Restore (`Create`): the shim gets
///   `checkpoint = <CRI root>/containers/<new id>/checkpoint` (that unpacked directory).
fn checkpoint_as_containerd_2(b: &CriBed, id: &str, options: Option<Any>) -> PathBuf {
    let cri_root = b.tb.dir().join("root/io.containerd.grpc.v1.cri/containers").join(id);
    assert!(cri_root.is_dir(), "no CRI container dir {}", cri_root.display());
    let path = tempfile::Builder::new().prefix("ctrd-checkpoint").tempdir_in(b.tb.dir()).expect("temp dir").keep();
    let shim = shim_client(b, id);
    let ctx = || context::with_duration(CHECKPOINT_TIMEOUT);
    shim.pause(ctx(), &PauseRequest { id: id.into(), ..Default::default() }).expect("Pause");
    let req = CheckpointTaskRequest {
        id: id.into(),
        path: path.display().to_string(),
        options: options.into(),
        ..Default::default()
    };
    let result = shim.checkpoint(ctx(), &req);
    shim.resume(ctx(), &ResumeRequest { id: id.into(), ..Default::default() }).expect("Resume");
    result.unwrap_or_else(|e| panic!("Checkpoint as containerd 2.x sends it: {e}"));
    let st = shim.state(ctx(), &StateRequest { id: id.into(), ..Default::default() }).expect("State");
    assert_eq!(st.status.enum_value_or(TaskStatus::UNKNOWN), TaskStatus::RUNNING, "exit=false must leave it running");
    path
}

/// What CRI 2.x needs in the shim's `path`: CRIU's images as plain files at the top level.
fn assert_flat_criu_images(path: &Path) {
    let entries: Vec<(String, bool)> = std::fs::read_dir(path)
        .expect("checkpoint dir")
        .flatten()
        .map(|e| (e.file_name().to_string_lossy().into_owned(), e.file_type().map(|t| t.is_file()).unwrap_or(false)))
        .collect();
    assert!(
        entries.iter().any(|(n, f)| n == "inventory.img" && *f),
        "no inventory.img at the top of {} (containerd 2.x unpacks this directory as the archive's checkpoint/): {entries:?}",
        path.display()
    );
    let not_files: Vec<&String> = entries.iter().filter(|(_, f)| !f).map(|(n, _)| n).collect();
    assert!(
        not_files.is_empty(),
        "entries CRI 2.x's writeCriuCheckpointData cannot unpack (not plain files): {not_files:?}"
    );
}

/// Plays containerd 2.x restoring a CRI checkpoint archive (CRImportCheckpoint, then
/// StartContainer): a new CRI container `restored` in `pod` (created, not started, so that it has
/// its spec and a fresh snapshot), the RW layer of `from` copied into its snapshot (containerd
/// 2.x applies the archive's `rootfs-diff.tar`), and then the shim's `Create` with
/// `checkpoint` = `images` (2.x: `<CRI root>/containers/<id>/checkpoint`) and `Start`. Returns
/// the new id and its bundle; its counter must continue from `before`.
fn restore_as_containerd_2(b: &CriBed, pod: &Pod, from: &str, images: &Path, options: Option<Any>, before: u64) {
    let id = b.create(pod, "restored", &["sh", "-c", COUNTER], &[]).expect("CreateContainer");
    let info: serde_json::Value =
        serde_json::from_str(&b.tb.ctr_ok_in(CRI_NAMESPACE, &["containers", "info", &id])).expect("containers info");
    let mounts = |container: &str| -> Vec<String> {
        let info: serde_json::Value =
            serde_json::from_str(&b.tb.ctr_ok_in(CRI_NAMESPACE, &["containers", "info", container]))
                .expect("containers info");
        let key = info["SnapshotKey"].as_str().expect("SnapshotKey");
        let line =
            b.tb.ctr_ok_in(CRI_NAMESPACE, &["snapshots", "--snapshotter", "overlayfs", "mounts", "/unused", key]);
        // `mount -t overlay overlay -o OPTIONS /unused`
        let words: Vec<&str> = line.split_whitespace().collect();
        let at = words.iter().position(|w| *w == "-o").expect("mount options");
        words[at + 1].split(',').map(String::from).collect()
    };
    let upper = |options: &[String]| -> PathBuf {
        PathBuf::from(options.iter().find_map(|o| o.strip_prefix("upperdir=")).expect("upperdir"))
    };
    let new_mounts = mounts(&id);
    // The source counter still runs (the checkpoint left it running) and renames its files every
    // 100 ms: frozen, its layer is as consistent as the diff 2.x takes at checkpoint time, and
    // `cp` cannot list a file that is gone when it copies it.
    b.tb.ctr_ok_in(CRI_NAMESPACE, &["tasks", "pause", from]);
    let out = std::process::Command::new("cp")
        .arg("-a")
        .arg(format!("{}/.", upper(&mounts(from)).display()))
        .arg(upper(&new_mounts))
        .output()
        .expect("cp");
    b.tb.ctr_ok_in(CRI_NAMESPACE, &["tasks", "resume", from]);
    assert!(out.status.success(), "copying the RW layer: {}", text(&out.stderr));

    let bundle = b.tb.dir().join("bundles-2x").join(&id);
    std::fs::create_dir_all(bundle.join("rootfs")).expect("bundle dir");
    std::fs::write(bundle.join("config.json"), info["Spec"].to_string()).expect("config.json");
    let rootfs = containerd_shim_protos::types::mount::Mount {
        type_: "overlay".into(),
        source: "overlay".into(),
        options: new_mounts,
        ..Default::default()
    };
    let task = DirectTask { shim: shim_client(b, &pod.id), id: id.clone() };
    let req = CreateTaskRequest {
        id: id.clone(),
        bundle: bundle.display().to_string(),
        rootfs: vec![rootfs],
        checkpoint: images.display().to_string(),
        options: options.into(),
        ..Default::default()
    };
    let ctx = || context::with_duration(CHECKPOINT_TIMEOUT);
    task.shim.create(ctx(), &req).unwrap_or_else(|e| panic!("Create with checkpoint {}: {e}", images.display()));
    task.shim
        .start(ctx(), &StartRequest { id: id.clone(), ..Default::default() })
        .unwrap_or_else(|e| panic!("Start (restore) from {}: {e}", images.display()));
    let read = || std::fs::read_to_string(bundle.join("rootfs/tmp/counter")).ok()?.trim().parse::<u64>().ok();
    let first = wait_for("the restored counter", read);
    assert!(first >= before, "the counter restarted at {first}: not restored (checkpoint at {before})");
    wait_for("the restored counter to advance", || read().filter(|&n| n >= first + 5));
    drop(task);
    b.cri.remove(&id).expect("RemoveContainer");
}

/// Style (b) under containerd 2.x: with no `image_path` the shim writes CRIU's images (and its
/// manifest) as plain files into containerd's `path`, which CRI 2.x unpacks file by file as the
/// archive's `checkpoint/` (a directory entry would make its `os.Create` fail); its work files
/// (`stats-dump`) land in `work_path` as CRI expects; the restore verifies the manifest.
#[test]
fn containerd_2_cri_checkpoint_of_a_runc_v2_runtime() {
    if skipped_on_v2("containerd_2_cri_checkpoint_of_a_runc_v2_runtime") {
        return;
    }
    let b = cri_bed(Style::RuntimeType);
    let pod = pod(&b, "default", &[]);
    let id = b.run(&pod, "counter", &["sh", "-c", COUNTER], &[]);
    wait_counter(&b.cri, &id, 3);
    let before = counter(&b.cri, &id).expect("counter");
    let work = b.tb.dir().join("root/io.containerd.grpc.v1.cri/containers").join(&id);
    let o = CheckpointOptions { exit: false, work_path: work.display().to_string(), ..Default::default() };
    let path = checkpoint_as_containerd_2(&b, &id, Some(runc_options(&o)));
    let n = counter(&b.cri, &id).expect("counter");
    wait_counter(&b.cri, &id, n + 3);
    assert!(work.join("stats-dump").is_file(), "no stats-dump in the work path {} (CRI copies it)", work.display());
    assert_flat_criu_images(&path);
    // Restore as 2.x does for a runc-type runtime: the images in `checkpoint` and in
    // runc.v1.Options.CriuImagePath.
    let images = b.tb.dir().join("cri-2x-archive/checkpoint");
    unpack_like_cri_2(&path, &images);
    let o = RuncOptions { criu_image_path: images.display().to_string(), ..Default::default() };
    let options = Any {
        type_url: "containerd.runc.v1.Options".into(),
        value: o.write_to_bytes().expect("encoding Options"),
        ..Default::default()
    };
    restore_as_containerd_2(&b, &pod, &id, &images, Some(options), before);
    remove_pod(&b, &pod, &[&id]);
}

/// Style (a) under containerd 2.x: no options at all. CRI revisions that copy `stats-dump` out of
/// their own container dir still fail for this style (the shim cannot know that dir: no
/// `work_path`); the checkpoint and its restore themselves work.
#[test]
fn containerd_2_cri_checkpoint_of_our_runtime_type() {
    if skipped_on_v2("containerd_2_cri_checkpoint_of_our_runtime_type") {
        return;
    }
    let b = cri_bed(Style::RuntimeType);
    let pod = pod(&b, "default", &[]);
    let id = b.run(&pod, "counter", &["sh", "-c", COUNTER], &[]);
    wait_counter(&b.cri, &id, 3);
    let before = counter(&b.cri, &id).expect("counter");
    let path = checkpoint_as_containerd_2(&b, &id, None);
    let n = counter(&b.cri, &id).expect("counter");
    wait_counter(&b.cri, &id, n + 3);
    assert_flat_criu_images(&path);
    let images = b.tb.dir().join("cri-2x-archive/checkpoint");
    unpack_like_cri_2(&path, &images);
    restore_as_containerd_2(&b, &pod, &id, &images, None, before);
    remove_pod(&b, &pod, &[&id]);
}

/// A task created straight through a shim, which containerd does not know: killed and deleted
/// through the shim on drop, also when the test fails.
struct DirectTask {
    shim: TaskClient,
    id: String,
}

impl Drop for DirectTask {
    fn drop(&mut self) {
        let ctx = || context::with_duration(CHECKPOINT_TIMEOUT);
        let id = self.id.clone();
        let _ = self.shim.kill(ctx(), &KillRequest { id: id.clone(), signal: 9, ..Default::default() });
        let _ = self.shim.wait(ctx(), &WaitRequest { id: id.clone(), ..Default::default() });
        if let Err(e) = self.shim.delete(ctx(), &DeleteRequest { id: id.clone(), ..Default::default() }) {
            eprintln!("deleting task {id} through the shim: {e}");
        }
    }
}

/// CRI 2.x's `writeCriuCheckpointData`: every entry of the task checkpoint becomes a file in
/// `checkpoint/` of the archive (then of `<CRI root>/containers/<id>/` on restore).
fn unpack_like_cri_2(path: &Path, images: &Path) {
    std::fs::create_dir_all(images).expect("checkpoint dir");
    for e in std::fs::read_dir(path).expect("checkpoint").flatten() {
        std::fs::copy(e.path(), images.join(e.file_name()))
            .unwrap_or_else(|err| panic!("CRI 2.x could not unpack {:?}: {err}", e.file_name()));
    }
}

// ---------------------------------------------------------------------------------------------
// The kubelet's checkpoint and restore under a real containerd 2.x

/// A counter pod under containerd 2.x whose image comes from a loopback registry (containerd
/// 2.x's restore pulls the checkpoint's base image by repo digest, whatever the node holds),
/// with a file written into its RW layer; returns the bed, the registry, the pod and the id.
fn counter_pod_on_containerd_2(style: Style) -> (CriBed, Registry, Pod, String) {
    let b = cri_bed_with(style, Setup { containerd: Containerd::V2, ..Setup::default() });
    let registry = Registry::start(&b.tb.dir().join("registry")).expect("a loopback registry (test/setup.sh)");
    let image = registry.push(&b.tb, CRI_NAMESPACE, IMAGE, "kybernate/busybox:test");
    b.cri.wait_image(&image);
    let pod = pod(&b, "default", &[]);
    let mut config = container_config("counter", &["sh", "-c", COUNTER], &[]);
    config.image = Some(ImageSpec { image, ..Default::default() });
    let id = b.cri.create(&pod.id, config, &pod.config).unwrap_or_else(|e| panic!("CreateContainer: {e}"));
    b.cri.start(&id).unwrap_or_else(|e| panic!("StartContainer: {e}\n{}", b.tb.log_tail(30)));
    wait_counter(&b.cri, &id, 3);
    let r = b.cri.exec(&id, &["sh", "-c", "echo kept > /data.txt"]).expect("ExecSync");
    assert_eq!(r.exit_code, 0, "writing /data.txt: {}", text(&r.stderr));
    (b, registry, pod, id)
}

/// `kubectl`'s checkpoint API / `crictl checkpoint --export` (CRI CheckpointContainer) into an
/// archive; asserts what the archive holds (with `also` beside the usual files) and that the
/// container ran on. Returns the archive and the counter read just before the checkpoint.
fn cri_checkpoint_archive(b: &CriBed, id: &str, also: &[&str]) -> (PathBuf, u64) {
    let archive = b.tb.dir().join("checkpoint.tar");
    let before = counter(&b.cri, id).expect("counter before the checkpoint");
    b.cri.checkpoint(id, &archive).unwrap_or_else(|e| panic!("CheckpointContainer: {e}\n{}", b.tb.log_tail(30)));
    let out = std::process::Command::new("tar").arg("-tf").arg(&archive).output().expect("tar -tf");
    assert!(out.status.success(), "tar -tf {}: {}", archive.display(), text(&out.stderr));
    let entries = text(&out.stdout);
    let usual =
        ["checkpoint/inventory.img", "checkpoint/kybernate.json", "config.dump", "spec.dump", "rootfs-diff.tar"];
    for want in usual.iter().chain(also) {
        assert!(entries.lines().any(|l| l == *want), "no {want} in the archive:\n{entries}");
    }
    assert!(
        entries.lines().all(|l| l == "checkpoint/" || !l.starts_with("checkpoint/") || !l.ends_with('/')),
        "directories under checkpoint/ (CRI unpacks it file by file):\n{entries}"
    );
    // The kubelet's checkpoint leaves the container running.
    assert_eq!(state(b, id), ContainerState::ContainerRunning as i32);
    assert_counter_continues(&b.cri, id, before);
    (archive, before)
}

/// CreateContainer whose image is a checkpoint archive, as the kubelet sends it for a pod that
/// restores one (containerd 2.x: `CRImportCheckpoint`).
fn create_from_archive(b: &CriBed, pod: &Pod, archive: &Path) -> Result<String, tonic::Status> {
    let mut config = container_config("counter", &[], &[]);
    config.image = Some(ImageSpec { image: archive.display().to_string(), ..Default::default() });
    b.cri.create(&pod.id, config, &pod.config)
}

/// The whole kubelet flow under containerd 2.x: CheckpointContainer writes an archive from our
/// shim's flat checkpoint; the container runs on; then, as after a move to another node, it is
/// removed and a new pod's CreateContainer names the archive as its image: containerd applies the
/// rootfs diff, our shim restores CRIU's images from the unpacked `checkpoint/`, and the counter
/// goes on from where it was, with the file written before. Returns the bed, the new pod, the
/// restored container and the pod's shim pid.
fn kubelet_checkpoint_and_restore_from_the_archive(style: Style) -> (CriBed, Registry, Pod, String, u32) {
    let (b, registry, pod, id) = counter_pod_on_containerd_2(style);
    assert_eq!(shim_binary_of(&b, &pod.id), SHIM, "the pod is not on our shim");
    // Style (b) gets runc options with a work_path, from which containerd copies CRIU's stats-dump.
    let stats: &[&str] = if style == Style::RuntimePath { &["stats-dump"] } else { &[] };
    let (archive, before) = cri_checkpoint_archive(&b, &id, stats);
    b.cri.stop(&id, 0).expect("StopContainer");
    b.cri.remove(&id).expect("RemoveContainer");
    remove_pod(&b, &pod, &[]);

    let pod = self::pod(&b, "default", &[]);
    let restored = create_from_archive(&b, &pod, &archive).unwrap_or_else(|e| panic!("CreateContainer: {e}"));
    b.cri.start(&restored).unwrap_or_else(|e| panic!("StartContainer (restore): {e}\n{}", b.tb.log_tail(30)));
    assert_counter_continues(&b.cri, &restored, before);
    let r = b.cri.exec(&restored, &["cat", "/data.txt"]).expect("ExecSync");
    assert_eq!((r.exit_code, text(&r.stdout)), (0, "kept\n".to_string()), "the RW layer was not restored");
    // Our shim made the container (its runtime record) and ran the restore.
    let record = b.runtime_record(&restored);
    assert!(record["binary"].as_str().is_some_and(|p| p.ends_with("/runc")), "{record}");
    let log = std::fs::read_to_string(b.tb.log_path()).expect("containerd log");
    assert!(
        log.lines().any(|l| l.contains(&format!("container {restored}: restoring from")) && l.contains("/checkpoint")),
        "our shim did not restore {restored}:\n{}",
        b.tb.log_tail(30)
    );
    // ... in the pod's own shim process.
    let shim_pid = |id: &str| {
        let r = shim_client(&b, id).connect(context::with_duration(CHECKPOINT_TIMEOUT), &Default::default());
        r.unwrap_or_else(|e| panic!("Connect to the shim of {id}: {e}")).shim_pid
    };
    let pid = shim_pid(&pod.id);
    assert_eq!(shim_pid(&restored), pid, "the restored container is not in its pod's shim");
    assert_eq!(shim_binary_of(&b, &pod.id), SHIM, "the pod is not on our shim");
    (b, registry, pod, restored, pid)
}

/// Style (a): containerd knows our runtime type all along.
#[test]
fn containerd_2_kubelet_checkpoint_and_restore_from_the_archive() {
    if skipped_on_v2("containerd_2_kubelet_checkpoint_and_restore_from_the_archive") {
        return;
    }
    let (b, _registry, pod, restored, _) = kubelet_checkpoint_and_restore_from_the_archive(Style::RuntimeType);
    assert_eq!(shim_binary_of(&b, &restored), SHIM);
    remove_pod(&b, &pod, &[&restored]);
}

/// Style (b) under containerd 2.x. CheckpointContainer sends runc options with a `work_path`, and
/// the archive gets our `stats-dump` and `dump.log` from there. The restore path of containerd
/// 2.1 does not apply `runtime_path`: it starts the stock `containerd-shim-runc-v2`, whose `start`
/// finds the pod's shim socket (ours) and hands it out as its own, announcing task API v3. Our
/// shim serves v3 as well as v2, so the restore lands in the pod's shim all the same; containerd
/// records the stock shim for that container (measured on 2.1.9), and when the pod's shim is
/// killed, cleans the container up through it.
#[test]
fn containerd_2_style_b_kubelet_checkpoint_and_restore_from_the_archive() {
    if skipped_on_v2("containerd_2_style_b_kubelet_checkpoint_and_restore_from_the_archive") {
        return;
    }
    let (b, _registry, pod, restored, shim) = kubelet_checkpoint_and_restore_from_the_archive(Style::RuntimePath);
    let recorded = shim_binary_of(&b, &restored);
    assert!(recorded.ends_with("/containerd-shim-runc-v2"), "the restored container's shim-binary-path: {recorded}");

    nix::sys::signal::kill(nix::unistd::Pid::from_raw(shim as i32), nix::sys::signal::Signal::SIGKILL)
        .expect("SIGKILL to the pod's shim");
    wait_until(
        "the restored container to be reported exited",
        || state(&b, &restored),
        |s| *s == ContainerState::ContainerExited as i32,
    );
    b.cri.remove(&restored).expect("RemoveContainer");
    remove_pod(&b, &pod, &[&restored]);
}

/// The kubelet's archive moved to a node without containerd 2.x: containerd 2.1's CRI checkpoints
/// the counter through our shim into an archive, `kybernate import` (the library call behind it)
/// makes that a checkpoint of another node's store, and a pod on containerd 1.6 (no
/// CheckpointContainer, no archive restore) with `kybernate.io/restore-from` comes up restored:
/// the counter goes on, and the file written before the checkpoint is back from containerd's
/// gzipped rootfs diff.
#[test]
fn a_kubelet_archive_imported_into_the_store_restores_on_containerd_1_6() {
    if skipped_on_v2("a_kubelet_archive_imported_into_the_store_restores_on_containerd_1_6") {
        return;
    }
    let (b2, _registry, pod2, id) = counter_pod_on_containerd_2(Style::RuntimeType);
    let (archive, before) = cri_checkpoint_archive(&b2, &id, &[]);
    b2.cri.stop(&id, 0).expect("StopContainer");
    b2.cri.remove(&id).expect("RemoveContainer");
    remove_pod(&b2, &pod2, &[]);

    let b = cri_bed(Style::RuntimeType);
    let store = kybernate_checkpoint::Store::new(&b.store);
    let (path, manifest) = kybernate_checkpoint::import(&archive, &store)
        .unwrap_or_else(|e| panic!("importing the kubelet's archive: {e}"));
    assert_eq!((manifest.tenant(), manifest.container_id.as_str()), ("default", id.as_str()));
    assert!(manifest.rootfs_diff && !manifest.flat, "{manifest:?}");
    let reference = path.strip_prefix(&b.store).expect("inside the store").display().to_string();

    let pod = pod(&b, "default", &[(RESTORE_ANNOTATION, &reference)]);
    let restored = b.run(&pod, "counter", &["sh", "-c", COUNTER], &[]);
    assert_counter_continues(&b.cri, &restored, before);
    let r = b.cri.exec(&restored, &["cat", "/data.txt"]).expect("ExecSync");
    assert_eq!((r.exit_code, text(&r.stdout)), (0, "kept\n".to_string()), "the rootfs diff was not applied");
    assert_sandbox_runs_pause(&b, &pod);
    remove_pod(&b, &pod, &[&restored]);
}

// ---------------------------------------------------------------------------------------------
// A node as the installer leaves it

/// `containerd config default` of containerd 1.6, the file the installer merges into (also the
/// installer tests' "stock" fixture).
const STOCK_CONTAINERD_CONFIG: &str =
    include_str!("../../criu-helper/cli/tests/fixtures/containerd/containerd-1.6-default.toml");

/// The value of the first `key = "value"` (or, as containerd 2.x writes it, `key = 'value'`)
/// line of a containerd config.
fn config_value<'a>(config: &'a str, key: &str) -> &'a str {
    config
        .lines()
        .find_map(|l| {
            let quoted = l.trim().strip_prefix(key)?.trim().strip_prefix('=')?.trim();
            let quote = quoted.chars().next().filter(|q| *q == '"' || *q == '\'')?;
            quoted[1..].strip_suffix(quote)
        })
        .unwrap_or_else(|| panic!("no {key} in the config"))
}

/// `(pid, status)` of the task `id` in the node's `k8s.io` namespace, if listed.
fn node_task(node: &Node, id: &str) -> Option<(u32, String)> {
    common::task_row_in(&node.run_ok(&["ctr", "-n", CRI_NAMESPACE, "tasks", "ls"]), id)
}

/// `kybernate -o json ARGS` on the node, a checkpoint command: its checkpoint object and id.
fn node_checkpoint(node: &Node, args: &[&str]) -> (serde_json::Value, String) {
    let out = node.run_ok(&[&["kybernate", "-o", "json"], args].concat());
    let checkpoint: serde_json::Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"));
    let reference = checkpoint["id"].as_str().unwrap_or_else(|| panic!("no id: {checkpoint}")).to_string();
    (checkpoint, reference)
}

/// Our shims on the node, as the node's `ps` lists them: (pid there, `-id` argument).
fn node_shims(node: &Node) -> Vec<(u32, String)> {
    let ps = node.run_ok(&["ps", "-eo", "pid=,args="]);
    ps.lines()
        .filter_map(|l| {
            let args: Vec<&str> = l.split_whitespace().collect();
            let pid = args.first()?.parse().ok()?;
            args.get(1).filter(|a| a.ends_with("containerd-shim-kybernate-v1"))?;
            let id = args.windows(2).find(|w| w[0] == "-id").map(|w| w[1].to_string()).unwrap_or_default();
            Some((pid, id))
        })
        .collect()
}

/// Makes the node a node of containerd `release`, as the package upgrade would: the release's
/// binaries (`containerd`, `ctr`, `containerd-shim-runc-v2`) and unit file replace Debian's,
/// systemd reloads, and containerd restarts from the release's own `containerd config default`
/// (for 2.x a version 3 file, as containerd's and kubeadm's guides have admins write it). Returns
/// that config. For bookworm's 1.6 nothing is replaced, and the config is 1.6's stock one (the
/// installer tests' fixture). Either way it is edited only by `edits` (each a text replacement
/// that must apply) and `restrict_oom_score_adj = true`: this machine's root lacks
/// CAP_SYS_RESOURCE, as a nested node's does, so runc cannot give the sandbox its -998 (the test
/// beds set it for the same reason, docs/testing.md).
fn containerd_release_on(node: &Node, release: Containerd, edits: &[(&str, &str)]) -> String {
    let stock = match release.bin_dir() {
        None => STOCK_CONTAINERD_CONFIG.to_string(),
        Some(dir) => {
            let out = std::process::Command::new(dir.join("containerd")).args(["config", "default"]).output();
            let out = out.unwrap_or_else(|e| panic!("{}/containerd config default: {e}", dir.display()));
            assert!(out.status.success(), "containerd config default: {}", String::from_utf8_lossy(&out.stderr));
            String::from_utf8(out.stdout).expect("containerd config default")
        }
    };
    let mut config = stock;
    for (from, to) in [("restrict_oom_score_adj = false", "restrict_oom_score_adj = true")].iter().chain(edits) {
        assert!(config.contains(from), "the stock config has no {from}");
        config = config.replace(from, to);
    }
    std::fs::write(node.path("/etc/containerd/config.toml"), &config).expect("writing the stock config");
    let Some(dir) = release.bin_dir() else { return config };

    // Replaced by rename, as dpkg does: the running containerd keeps its file.
    let mut files: Vec<(PathBuf, String)> = ["containerd", "ctr", "containerd-shim-runc-v2"]
        .map(|name| (dir.join(name), format!("/usr/bin/{name}")))
        .into();
    let unit = "/lib/systemd/system/containerd.service";
    files.push((dir.join("../lib/systemd/system/containerd.service"), unit.to_string()));
    for (from, to) in &files {
        let staged = node.path(&format!("{to}.kbt-new"));
        std::fs::copy(from, &staged).unwrap_or_else(|e| panic!("copying {} to the node: {e}", from.display()));
        std::fs::rename(&staged, node.path(to)).unwrap_or_else(|e| panic!("replacing {to} on the node: {e}"));
    }
    let before = node.main_pid("containerd");
    node.run_ok(&["systemctl", "daemon-reload"]);
    node.run_ok(&["systemctl", "restart", "containerd"]);
    node.wait_for_restart("containerd", before);
    let version = node.run_ok(&["ctr", "version"]);
    let server = version.split("Server:").nth(1).unwrap_or_default();
    assert!(server.contains(&format!("Version:  {}.", release.name())), "not containerd {}: {version}", release.name());
    config
}

/// A systemd node (kbt-node) running containerd `release` as Debian's unit from the release's
/// stock config ([`containerd_release_on`]), Kybernate put there by the installer (install.sh:
/// the three binaries, the default config, the runtime merged into containerd's config in
/// `style`, containerd restarted), and the sandbox and app images imported as on an air-gapped
/// node; with a CRI client on the node's socket. `edits` are the admin's to the stock config.
fn installed_node(release: Containerd, style: Style, edits: &[(&str, &str)]) -> NodeBed {
    let node = Node::boot().expect("a systemd node (kbt-node)");
    let config = containerd_release_on(&node, release, edits);

    // The installer, from a copy of the checkout's packaging/ and the built binaries.
    let checkout = NODE_CHECKOUT;
    let bin = format!("{checkout}/bin");
    std::fs::create_dir_all(node.path(&bin)).expect("creating the binaries' dir");
    for name in ["containerd-shim-kybernate-v1", "kybernate", "kybernate-select"] {
        let built = common::shim_dir().join(name);
        assert!(built.is_file(), "{} missing: build the workspace (cargo test --workspace)", built.display());
        std::fs::copy(&built, node.path(&format!("{bin}/{name}"))).expect("copying a binary");
    }
    let packaging = Path::new(env!("CARGO_MANIFEST_DIR")).join("../packaging");
    let copied = std::process::Command::new("cp").arg("-a").arg(&packaging).arg(node.path(checkout)).status();
    assert!(copied.is_ok_and(|s| s.success()), "copying packaging/ to the node");
    let installed = run_installer(&node, "install.sh", style);
    assert!(installed.contains("done"), "{installed}");
    let merged = std::fs::read_to_string(node.path("/etc/containerd/config.toml")).expect("the merged config");
    assert!(merged.contains("restrict_oom_score_adj = true"), "the merge lost a setting:\n{merged}");
    let version = |text: &str| text.lines().find(|l| l.starts_with("version")).map(str::to_string);
    assert_eq!(version(&merged), version(&config), "the merge changed the config's version");

    // The images, as on a node without a registry: the pause image under the config's sandbox
    // image (1.6/1.7: `sandbox_image`; 2.x: `pinned_images.sandbox`), which the installer left alone.
    let sandbox_image = config_value(&merged, if release == Containerd::V2 { "sandbox" } else { "sandbox_image" });
    let pause_archive = "/var/tmp/pause-oci.tar";
    kybernate_testbed::cri::build_pause_archive(&node.path(pause_archive), &node.path("/var/tmp/pause-oci"))
        .expect("building the pause image");
    let busybox_archive = "/var/tmp/busybox-oci.tar";
    std::fs::copy(kybernate_testbed::IMAGE_ARCHIVE, node.path(busybox_archive)).expect("copying the image");
    for archive in [pause_archive, busybox_archive] {
        node.run_ok(&["ctr", "-n", CRI_NAMESPACE, "images", "import", archive]);
    }
    node.run_ok(&["ctr", "-n", CRI_NAMESPACE, "images", "tag", PAUSE_IMAGE, sandbox_image]);

    let cri = Cri::connect(&node.path("/run/containerd/containerd.sock"));
    cri.wait_image(sandbox_image);
    NodeBed { cri, node, style, config }
}

/// Where [`installed_node`] puts a copy of the checkout's packaging/ and the built binaries.
const NODE_CHECKOUT: &str = "/root/kybernate";

/// Runs the installer's `script` (install.sh or uninstall.sh) on the node as a source checkout
/// would (docs/installation.md), for `style`, and waits for the containerd restart it makes.
fn run_installer(node: &Node, script: &str, style: Style) -> String {
    let before = node.main_pid("containerd");
    let out = node.run_ok(&[
        "env",
        "HOST_ROOT=/",
        &format!("KYBERNATE_BIN_DIR={NODE_CHECKOUT}/bin"),
        "CONTAINERD_RESTART=systemctl restart containerd",
        "KYBERNATE_INSTALL_ONESHOT=1",
        match style {
            Style::RuntimeType => "KYBERNATE_STYLE=runtime-type",
            Style::RuntimePath => "KYBERNATE_STYLE=runtime-path",
        },
        "bash",
        &format!("{NODE_CHECKOUT}/packaging/kubernetes/installer/{script}"),
    ]);
    node.wait_for_restart("containerd", before);
    out
}

/// A node and a CRI client on it. Field order matters: the client drops first and removes its
/// pods while the node's containerd still runs.
struct NodeBed {
    cri: Cri,
    node: Node,
    style: Style,
    /// containerd's config as it was before the installer ran.
    config: String,
}

/// RunPodSandbox of a host-network pod with our handler on the node; `cgroup_parent` as the
/// kubelet sends it ("" for containerd's default).
fn node_pod(cri: &Cri, node: &Node, namespace: &str, cgroup_parent: &str, annotations: &[(&str, &str)]) -> Pod {
    let name = unique_name("pod");
    let logs = PathBuf::from(format!("/var/log/pods/{namespace}_{name}_{name}"));
    std::fs::create_dir_all(node.path(&logs.display().to_string())).expect("creating the pod's log dir");
    let config = host_network_pod(&name, &logs, cgroup_parent, namespace, annotations);
    let id =
        cri.run_pod(&config).unwrap_or_else(|e| panic!("RunPodSandbox: {e}\n{}", node.journal_tail("containerd", 40)));
    Pod { id, config }
}

/// CreateContainer + StartContainer of the counter in `pod` on the node.
fn node_counter(cri: &Cri, node: &Node, pod: &Pod) -> String {
    let id = cri
        .create(&pod.id, container_config("counter", &["sh", "-c", COUNTER], &[]), &pod.config)
        .unwrap_or_else(|e| panic!("CreateContainer: {e}\n{}", node.journal_tail("containerd", 40)));
    cri.start(&id).unwrap_or_else(|e| panic!("StartContainer: {e}\n{}", node.journal_tail("containerd", 40)));
    id
}

/// The kubelet's path and the SRE's runbook on a node as a cluster admin gets it
/// ([`installed_node`]), over the node's CRI socket: the installed `kybernate doctor` finds the
/// node ready; a pod with the handler `kybernate` runs its sandbox and a counter through one
/// shim of ours; the installed `kybernate checkpoint --pod …
/// --exit` (no flags but the pod's names: the default config and socket) takes it into the
/// store; a new pod in the same namespace annotated `kybernate.io/restore-from` comes up
/// restored and counting; `systemctl restart containerd` keeps it running in the same shim, and
/// ExecSync reaches it through the restarted containerd; removing the pods leaves nothing on the
/// node; the uninstall gives containerd's config back as it was.
#[test]
fn kubelet_pods_on_a_node_the_installer_set_up() {
    if node_test_skipped_on_v2("kubelet_pods_on_a_node_the_installer_set_up") {
        return;
    }
    kubelet_pods_on(installed_node(Containerd::V1_6, Style::RuntimeType, &[]));
}

/// The same on a containerd 2.x node: the installer merges into 2.x's own version 3 config
/// (`plugins.'io.containerd.cri.v1.runtime'`), and 2.x's CRI loads it.
#[test]
fn kubelet_pods_on_a_containerd_2_node_the_installer_set_up() {
    if node_test_skipped_on_v2("kubelet_pods_on_a_containerd_2_node_the_installer_set_up") {
        return;
    }
    kubelet_pods_on(installed_node(Containerd::V2, Style::RuntimeType, &[]));
}

/// The same on a containerd 2.x node installed in style (b): a runc runtime whose `runtime_path`
/// is our shim (containerd ≥ 1.7 honours it).
#[test]
fn kubelet_pods_on_a_containerd_2_node_the_installer_set_up_in_style_b() {
    if node_test_skipped_on_v2("kubelet_pods_on_a_containerd_2_node_the_installer_set_up_in_style_b") {
        return;
    }
    kubelet_pods_on(installed_node(Containerd::V2, Style::RuntimePath, &[]));
}

/// The same on a containerd 1.7 node (Debian trixie's package) installed in style (b): 1.7 is the
/// first release that honours a runc runtime's `runtime_path`, and still reads version 2 configs.
#[test]
fn kubelet_pods_on_a_containerd_1_7_node_the_installer_set_up_in_style_b() {
    if node_test_skipped_on_v2("kubelet_pods_on_a_containerd_1_7_node_the_installer_set_up_in_style_b") {
        return;
    }
    kubelet_pods_on(installed_node(Containerd::V1_7, Style::RuntimePath, &[]));
}

fn kubelet_pods_on(bed: NodeBed) {
    let (cri, node) = (&bed.cri, &bed.node);
    let containerd = node.main_pid("containerd");

    // First a plain `ctr run -d` under the unit, with a short id: runc given containerd's
    // NOTIFY_SOCKET would block in `start` until the container said READY=1 (it never does).
    let short = unique_name("ctr");
    let started = node.run(&[
        "timeout",
        "30",
        "ctr",
        "-n",
        CRI_NAMESPACE,
        "run",
        "-d",
        "--runtime",
        "io.containerd.kybernate.v1",
        IMAGE,
        &short,
        "sleep",
        "600",
    ]);
    assert!(started.status.success(), "ctr run -d: {started:?}\n{}", node.journal_tail("containerd", 20));
    let status = node_task(node, &short).map(|(_, status)| status);
    assert_eq!(status.as_deref(), Some("RUNNING"), "ctr task {short}");
    assert_eq!(node.main_pid("containerd"), containerd, "containerd's unit changed its main PID");
    node.run_ok(&["ctr", "-n", CRI_NAMESPACE, "tasks", "kill", "-s", "SIGKILL", &short]);
    wait_for("the ctr container to stop", || node_task(node, &short).filter(|(_, s)| s == "STOPPED"));
    node.run_ok(&["ctr", "-n", CRI_NAMESPACE, "tasks", "delete", &short]);
    node.run_ok(&["ctr", "-n", CRI_NAMESPACE, "containers", "delete", &short]);

    // The installed doctor, with its defaults, finds the node ready and names our handler in
    // containerd's config (version 2 or 3).
    let doctor = node.run_ok(&["kybernate", "-o", "json", "doctor"]);
    let checks: Vec<serde_json::Value> = serde_json::from_str(&doctor).unwrap_or_else(|e| panic!("{e}: {doctor}"));
    let check = |name: &str| checks.iter().find(|c| c["check"] == name).unwrap_or_else(|| panic!("{name}: {doctor}"));
    for name in ["containerd", "shim", "cri runtime", "runc", "criu"] {
        assert_eq!(check(name)["status"], "ok", "{}", check(name));
    }
    let cri_runtime = check("cri runtime")["detail"].as_str().unwrap_or_default().to_string();
    assert!(cri_runtime.contains(HANDLER), "{cri_runtime}");

    let namespace = unique_name("team");
    let running = |id: &str| cri.status(id).is_ok_and(|s| s.state == ContainerState::ContainerRunning as i32);

    // A pod through our shim: one shim process for its sandbox and its container.
    let pod1 = node_pod(cri, node, &namespace, "", &[]);
    let id1 = node_counter(cri, node, &pod1);
    for id in [&pod1.id, &id1] {
        let info = node.run_ok(&["ctr", "-n", CRI_NAMESPACE, "containers", "info", id]);
        let info: serde_json::Value = serde_json::from_str(&info).expect("ctr containers info");
        let runtime = match bed.style {
            Style::RuntimeType => "io.containerd.kybernate.v1",
            Style::RuntimePath => "io.containerd.runc.v2",
        };
        assert_eq!(info["Runtime"]["Name"], runtime, "{id}: {info}");
    }
    let shims = node_shims(node);
    assert_eq!(shims.iter().map(|(_, id)| id.as_str()).collect::<Vec<_>>(), [pod1.id.as_str()], "{shims:?}");
    wait_counter(cri, &id1, 3);

    // The SRE's checkpoint, with the installed CLI and its defaults.
    let pod_name = &pod1.config.metadata.as_ref().expect("pod metadata").name;
    let before = counter(cri, &id1).expect("counter before the checkpoint");
    let (checkpoint, reference) = node_checkpoint(
        node,
        &["checkpoint", "--pod", pod_name, "--pod-namespace", &namespace, "--container", "counter", "--exit"],
    );
    assert!(reference.starts_with(&format!("{CRI_NAMESPACE}/{id1}/")), "{checkpoint}");
    assert_eq!(checkpoint["path"], format!("/var/lib/kybernate/checkpoints/{reference}"), "{checkpoint}");
    assert_eq!(checkpoint["pod_namespace"], namespace.as_str(), "{checkpoint}");
    assert_eq!(checkpoint["status"], "ok", "{checkpoint}");
    wait_for("the checkpointed container to exit", || {
        cri.status(&id1).is_ok_and(|s| s.state == ContainerState::ContainerExited as i32).then_some(())
    });
    cri.stop_pod(&pod1.id).expect("StopPodSandbox");
    cri.remove_pod(&pod1.id).expect("RemovePodSandbox");

    // Restored on create by the pod annotation the installer let through.
    let pod2 = node_pod(cri, node, &namespace, "", &[(RESTORE_ANNOTATION, &reference)]);
    let id2 = node_counter(cri, node, &pod2);
    assert_counter_continues(cri, &id2, before);
    let shim = node_shims(node);
    assert_eq!(shim.iter().map(|(_, id)| id.as_str()).collect::<Vec<_>>(), [pod2.id.as_str()], "{shim:?}");

    // containerd restarts (an upgrade, the installer's next run): the pod runs on in the same
    // shim, and the kubelet's calls reach it through the new containerd.
    node.run_ok(&["systemctl", "restart", "containerd"]);
    node.wait_for_restart("containerd", containerd);
    wait_for("CRI to answer after the restart", || running(&id2).then_some(()));
    assert_eq!(node_shims(node), shim, "the shim changed over containerd's restart");
    let n = counter(cri, &id2).expect("ExecSync after the restart");
    wait_counter(cri, &id2, n + 3);

    cri.stop_pod(&pod2.id).expect("StopPodSandbox");
    cri.remove_pod(&pod2.id).expect("RemovePodSandbox");
    let tasks = node.run_ok(&["ctr", "-n", CRI_NAMESPACE, "tasks", "ls", "-q"]);
    let containers = node.run_ok(&["ctr", "-n", CRI_NAMESPACE, "containers", "ls", "-q"]);
    for id in [&pod1.id, &id1, &pod2.id, &id2] {
        assert!(!tasks.contains(id.as_str()) && !containers.contains(id.as_str()), "{id} left:\n{tasks}\n{containers}");
        for dir in ["/run/containerd/runc/k8s.io", "/run/containerd/io.containerd.runtime.v2.task/k8s.io"] {
            let left = node.path(&format!("{dir}/{id}"));
            assert!(!left.exists(), "{} left", left.display());
        }
    }
    wait_for("our shims on the node to exit", || node_shims(node).is_empty().then_some(()));

    // The documented uninstall: containerd's config is as it was before the install, and the
    // restarted containerd no longer knows the handler.
    let removed = run_installer(node, "uninstall.sh", bed.style);
    let config = std::fs::read_to_string(node.path("/etc/containerd/config.toml")).expect("containerd's config");
    assert_eq!(config, bed.config, "uninstall did not restore containerd's config\n{removed}");
    let name = unique_name("pod");
    let pod = host_network_pod(&name, Path::new("/var/log/pods"), "", &namespace, &[]);
    let refused = wait_for("CRI to answer after the uninstall", || match cri.run_pod(&pod) {
        Ok(id) => panic!("a pod with handler {HANDLER} ran after the uninstall: {id}"),
        // The client's connection to the containerd that the uninstall stopped.
        Err(e) if e.message() == "transport error" => None,
        Err(e) => Some(e),
    });
    assert!(refused.message().contains(HANDLER), "{refused:?}");
}

/// Where a task's init process sits in `hierarchy` on the node (`/proc/<pid>/cgroup` there).
fn node_cgroup(node: &Node, id: &str, hierarchy: &str) -> String {
    let (pid, _) = node_task(node, id).unwrap_or_else(|| panic!("no task {id} on the node"));
    let cgroups = node.run_ok(&["cat", &format!("/proc/{pid}/cgroup")]);
    cgroups
        .lines()
        .find_map(|l| {
            let (_, rest) = l.split_once(':')?;
            let (controllers, path) = rest.split_once(':')?;
            controllers.split(',').any(|c| c == hierarchy).then(|| path.to_string())
        })
        .unwrap_or_else(|| panic!("no {hierarchy} line for {id}:\n{cgroups}"))
}

/// The kubelet's systemd cgroup driver (kubeadm's default since Kubernetes 1.22) hands CRI a
/// pod cgroup parent that is a systemd slice; CRI turns it into runc's `slice:prefix:name` form
/// (`kubepods-besteffort-pod<uid>.slice:cri-containerd:<id>`), which runc understands only with
/// `--systemd-cgroup`: then systemd puts each container in a scope of the pod's slice, where the
/// kubelet's QoS limits apply. Style (a) carries no `SystemdCgroup` option, so the shim must read
/// the form itself.
#[test]
fn pods_of_a_systemd_cgroup_driver_kubelet_land_in_their_slice() {
    if node_test_skipped_on_v2("pods_of_a_systemd_cgroup_driver_kubelet_land_in_their_slice") {
        return;
    }
    pods_land_in_their_slice(installed_node(Containerd::V1_6, Style::RuntimeType, &[]));
}

/// The same on a containerd 2.x node in style (b), set up as kubeadm's guide says for its
/// systemd driver (`SystemdCgroup = true` on the runc runtime): the installer copies the option
/// to our runtime, containerd sends it, and the shim runs runc with `--systemd-cgroup` because of
/// it (without the edit the containers land in containerd's own cgroup: checked by leaving it
/// out).
#[test]
fn pods_of_a_systemd_cgroup_driver_kubelet_land_in_their_slice_on_containerd_2_in_style_b() {
    if node_test_skipped_on_v2("pods_of_a_systemd_cgroup_driver_kubelet_land_in_their_slice_on_containerd_2_in_style_b")
    {
        return;
    }
    let edits = [("SystemdCgroup = false", "SystemdCgroup = true")];
    pods_land_in_their_slice(installed_node(Containerd::V2, Style::RuntimePath, &edits));
}

fn pods_land_in_their_slice(bed: NodeBed) {
    let (cri, node) = (&bed.cri, &bed.node);
    let scopes = || node.run_ok(&["systemctl", "list-units", "--no-legend", "--plain", "cri-containerd-*.scope"]);
    // The kubelet's pod slice: the uid's dashes become underscores (a dash nests slices).
    let pod_slice = || {
        let uid = unique_name("uid").replace('-', "_");
        format!("/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{uid}.slice")
    };
    let assert_in_scopes = |parent: &str, tasks: [&str; 2]| {
        for task in tasks {
            let scope = format!("{parent}/cri-containerd-{task}.scope");
            for hierarchy in ["name=systemd", "memory", "pids"] {
                let path = node_cgroup(node, task, hierarchy);
                assert!(path.ends_with(&scope), "{task} is in {hierarchy} {path}, not in {scope}");
            }
            assert!(scopes().contains(&format!("cri-containerd-{task}.scope")), "{}", scopes());
        }
    };
    let parent = pod_slice();
    let pod = node_pod(cri, node, "default", &parent, &[]);
    let id = node_counter(cri, node, &pod);
    wait_counter(cri, &id, 3);
    assert_in_scopes(&parent, [&pod.id, &id]);

    // A checkpoint and a restore into another pod's slice: runc restores the process into a new
    // scope there (CRIU itself does not touch the cgroups).
    let before = counter(cri, &id).expect("counter before the checkpoint");
    let (_, reference) = node_checkpoint(node, &["-n", CRI_NAMESPACE, "checkpoint", &id, "--exit"]);
    cri.stop_pod(&pod.id).expect("StopPodSandbox");
    cri.remove_pod(&pod.id).expect("RemovePodSandbox");
    let parent2 = pod_slice();
    let pod2 = node_pod(cri, node, "default", &parent2, &[(RESTORE_ANNOTATION, &reference)]);
    let id2 = node_counter(cri, node, &pod2);
    assert_counter_continues(cri, &id2, before);
    assert_in_scopes(&parent2, [&pod2.id, &id2]);

    cri.stop_pod(&pod2.id).expect("StopPodSandbox");
    cri.remove_pod(&pod2.id).expect("RemovePodSandbox");
    wait_for("the pods' scopes to go", || {
        let left = scopes();
        [&pod.id, &id, &pod2.id, &id2].iter().all(|t| !left.contains(t.as_str())).then_some(())
    });
    wait_for("our shims on the node to exit", || node_shims(node).is_empty().then_some(()));
}
