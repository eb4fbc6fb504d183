//! `kybernate restore` end to end: a private containerd 1.6 (the test bed: `test/setup.sh`; the
//! whole flow also under 1.7 and 2.x)
//! running our shim, runc and CRIU. The SRE's whole flow — checkpoint, list, inspect, export, rm,
//! import, restore — ends with the counter container running again, counting on from where it was.
//!
//! Needs our shim built (`cargo build -p containerd-shim-kybernate-v1`): see common/mod.rs.

mod common;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::SystemTime;

use common::{
    assert_exit, assert_exit_ok, bed, bed_with, edit_checkpoint_json, fake_checkpoint, fake_gpu_runtime_binary, json,
    task_status, text, wait_for, Bed, KYBERNATE, RUNTIME,
};
use kybernate_checkpoint::Store;
use kybernate_testbed::fakes::{nvidia_device_node, FakeCuda};
use kybernate_testbed::{unique_name, Containerd, IMAGE};
use serde_json::Value;

fn list_ids(bed: &Bed) -> Vec<String> {
    let out = bed.kybernate(&["-o", "json", "list"]);
    assert_exit_ok(&out);
    json(&out).as_array().unwrap().iter().filter_map(|c| c["id"].as_str().map(str::to_string)).collect()
}

#[test]
fn checkpoint_export_import_and_restore_continues_the_counter() {
    checkpoint_export_import_and_restore(bed());
}

/// The same SRE flow under containerd 1.7 and 2.x (`test/setup.sh` unpacks them): 2.x hands the
/// shim `image_path` itself as the checkpoint path, and a shim that put its content-store pointer
/// there broke every checkpoint (`kybernate-pointer.json: not listed in the manifest`).
#[test]
fn checkpoint_export_import_and_restore_continues_the_counter_on_containerd_1_7() {
    checkpoint_export_import_and_restore(bed_with(|b| b.containerd(Containerd::V1_7), ""));
}

#[test]
fn checkpoint_export_import_and_restore_continues_the_counter_on_containerd_2() {
    checkpoint_export_import_and_restore(bed_with(|b| b.containerd(Containerd::V2), ""));
}

fn checkpoint_export_import_and_restore(bed: Bed) {
    let id = unique_name("rs");
    // With containerd's RuntimeDefault seccomp profile: the checkpoint's spec grants nothing
    // beyond the image defaults, so no --trust-spec is needed.
    bed.run_counter_with(&id, RUNTIME, &["--seccomp"]);
    bed.wait_counter(&id, 30);

    // Checkpoint and stop it. The container was made by `ctr run`, not CRI: its image comes
    // from containerd's record, so that the restore below needs no --image.
    let out = bed.kybernate(&["-o", "json", "checkpoint", &id, "--exit"]);
    assert_exit_ok(&out);
    let cp_id = json(&out)["id"].as_str().expect("id").to_string();
    assert_eq!(json(&out)["image"], IMAGE, "the image of a ctr-run container is recorded");
    wait_for(&format!("{id} to stop after --exit"), || {
        (task_status(&bed.tb, &id).as_deref() != Some("RUNNING")).then_some(())
    });
    // The value the checkpoint holds: the stopped container's rootfs stays mounted until its task
    // is deleted, and nothing counts any more.
    let at_checkpoint = bed.counter(&id).expect("the counter of the checkpointed container");
    assert!(at_checkpoint >= 30, "counter at checkpoint: {at_checkpoint}");

    assert_eq!(list_ids(&bed), [cp_id.as_str()]);
    assert_exit_ok(&bed.kybernate(&["inspect", &cp_id]));

    // Move it out of the store and back, as to another node.
    let archive = bed.dir.path().join("checkpoint.tar");
    let archive_arg = archive.to_str().unwrap();
    assert_exit_ok(&bed.kybernate(&["export", &cp_id, archive_arg]));
    assert_exit_ok(&bed.kybernate(&["rm", &cp_id]));
    assert!(list_ids(&bed).is_empty(), "rm left the checkpoint listed");
    let out = bed.kybernate(&["-o", "json", "import", archive_arg]);
    assert_exit_ok(&out);
    let imported = json(&out)["id"].as_str().expect("id").to_string();
    assert_eq!(list_ids(&bed), [imported.as_str()]);

    // Restored under a new id without --image: the manifest names the image.
    let new_id = unique_name("restored");
    let out = bed.kybernate(&["-o", "json", "restore", &imported, "--as", &new_id]);
    if !out.status.success() {
        panic!("restore failed: {}\n--- containerd log ---\n{}", text(&out.stderr), bed.tb.log_tail(40));
    }
    let restored = json(&out);
    assert_eq!(restored["container"], new_id.as_str(), "{restored}");
    assert_eq!(restored["namespace"], bed.tb.namespace(), "{restored}");
    assert!(restored["pid"].as_u64().is_some_and(|p| p > 0), "{restored}");
    assert!(restored["duration_ms"].is_u64(), "{restored}");
    assert_eq!(restored["checkpoint"]["id"], imported.as_str(), "{restored}");
    assert_eq!(restored["spec"], format!("spec.dump of {imported}"), "{restored}");
    assert_eq!(restored["privileges"], serde_json::json!([]), "{restored}");

    assert_eq!(task_status(&bed.tb, &new_id).as_deref(), Some("RUNNING"));
    let labels = bed.tb.ctr_ok(&["containers", "info", &new_id]);
    assert!(labels.contains("kybernate.io/restored-from"), "label missing: {labels}");
    // It counts on from the checkpoint (a fresh start would begin at 1), and keeps counting.
    let first = wait_for("the restored counter", || bed.counter(&new_id));
    eprintln!("counter: {at_checkpoint} at checkpoint, {first} after restore");
    assert!(first >= at_checkpoint, "restored counter {first} < {at_checkpoint} at checkpoint: not restored");
    wait_for("the restored counter to increase", || bed.counter(&new_id).filter(|&n| n > first));
    assert_eq!(task_status(&bed.tb, &new_id).as_deref(), Some("RUNNING"));

    bed.remove(&new_id);
    bed.remove(&id);
}

#[test]
fn restore_refuses_bad_input_and_creates_nothing() {
    let bed = bed();
    let id = unique_name("rsbad");
    bed.run_counter(&id, RUNTIME);
    bed.wait_counter(&id, 1);
    let out = bed.kybernate(&["-o", "json", "checkpoint", &id]);
    assert_exit_ok(&out);
    let cp_id = json(&out)["id"].as_str().expect("id").to_string();
    let cp_path = PathBuf::from(json(&out)["path"].as_str().expect("path"));
    let before = bed.containers();

    // `ctr run` without --seccomp: the spec grants exactly one thing beyond the image defaults,
    // and that alone needs --trust-spec. Refused before containerd is asked.
    let unconfined = "seccomp unconfined (no profile)";
    let refused = unique_name("untrusted");
    let out = bed.kybernate(&["-o", "json", "restore", &cp_id, "--as", &refused, "--image", IMAGE]);
    assert_exit(&out, 2, &["refused", unconfined, "--trust-spec", "--spec FILE", "nothing was created"]);
    let v = json(&out);
    assert_eq!(v["privileges"], serde_json::json!([unconfined]), "{v}");
    assert_eq!((v["restore"].as_bool(), v["dry_run"].as_bool()), (Some(false), Some(false)), "{v}");
    assert_eq!(v["spec"], format!("spec.dump of {cp_id}"), "{v}");
    assert_eq!(v["credentials"]["ok"], true, "the checkpoint's processes need nothing beyond it: {v}");
    let out = bed.kybernate(&["restore", &cp_id, "--as", &refused, "--image", IMAGE]);
    assert_exit(&out, 2, &[unconfined]);
    assert_eq!(
        text(&out.stdout),
        format!("the spec (spec.dump of {cp_id}) grants beyond the image defaults:\n  {unconfined}\n")
    );
    // --dry-run: the same verdict without and with --trust-spec, and nothing created.
    let out = bed.kybernate(&["restore", &cp_id, "--as", &refused, "--image", IMAGE, "--dry-run"]);
    assert_exit(&out, 2, &[unconfined]);
    assert!(text(&out.stdout).contains("would be refused as"), "{}", text(&out.stdout));
    let out = bed.kybernate(&[
        "-o",
        "json",
        "restore",
        &cp_id,
        "--as",
        &refused,
        "--image",
        IMAGE,
        "--dry-run",
        "--trust-spec",
    ]);
    assert_exit_ok(&out);
    let v = json(&out);
    assert_eq!((v["dry_run"].as_bool(), v["restore"].as_bool(), v["error"].is_null()), (Some(true), Some(true), true));
    assert_eq!(v["privileges"], serde_json::json!([unconfined]), "{v}");
    assert!(v["credentials"]["processes"].as_u64().is_some_and(|n| n >= 1), "{v}");
    bed.assert_nothing_named(&refused);
    assert_eq!(bed.containers(), before, "nothing may be created");

    assert_exit(&bed.kybernate(&["restore", "nope/nope/nope", "--image", IMAGE]), 2, &["not found"]);
    // The id of an existing container (the original is still running).
    let trusted = |args: &[&str]| {
        let mut all = vec!["restore", &cp_id, "--trust-spec"];
        all.extend_from_slice(args);
        all.into_iter().map(str::to_string).collect::<Vec<_>>()
    };
    let run = |args: Vec<String>| bed.kybernate(&args.iter().map(String::as_str).collect::<Vec<_>>());
    assert_exit(&run(trusted(&["--as", &id, "--image", IMAGE])), 2, &["already exists", "--as"]);
    let missing_image = "docker.io/kybernate/missing:none";
    assert_exit(&run(trusted(&["--image", missing_image])), 2, &["not found", missing_image]);
    assert_exit(&run(trusted(&["--as", "bad/id", "--image", IMAGE])), 2, &["invalid container id"]);
    let args = trusted(&["--image", IMAGE]);
    let out = bed.kybernate_at(
        Path::new("/nonexistent.sock"),
        bed.tb.namespace(),
        &args.iter().map(String::as_str).collect::<Vec<_>>(),
    );
    assert_exit(&out, 1, &["cannot reach containerd at /nonexistent.sock", "is containerd running?"]);
    assert_eq!(bed.containers(), before, "nothing may be created");

    // The table form, with the default id, while the original still runs (in its own cgroup).
    let out = bed.kybernate(&["restore", &cp_id, "--image", IMAGE, "--trust-spec"]);
    if !out.status.success() {
        panic!("restore failed: {}\n--- containerd log ---\n{}", text(&out.stderr), bed.tb.log_tail(40));
    }
    let table = text(&out.stdout);
    let header = format!("the spec (spec.dump of {cp_id}) grants beyond the image defaults:\n  {unconfined}\n");
    let table = table.strip_prefix(&header).unwrap_or_else(|| panic!("no privileges before the summary:\n{table}"));
    let prefix = format!("{id}-restored-");
    let new_id = table
        .lines()
        .find_map(|l| l.strip_prefix("container:").map(str::trim))
        .filter(|c| c.starts_with(&prefix))
        .unwrap_or_else(|| panic!("no container: {prefix}<seconds> line:\n{table}"))
        .to_string();
    assert!(table.starts_with(&format!("restored {cp_id} as {new_id}\n")), "{table}");
    for want in [
        "namespace:",
        "pid:",
        "checkpoint:",
        "duration:",
        "privileges: 1 beyond the image defaults, allowed by --trust-spec",
    ] {
        assert!(table.contains(want), "table lacks {want:?}:\n{table}");
    }
    assert_eq!(task_status(&bed.tb, &new_id).as_deref(), Some("RUNNING"));
    assert_eq!(task_status(&bed.tb, &id).as_deref(), Some("RUNNING"));
    bed.remove(&new_id);

    // A failure in the shim, after the container was created: a checkpoint of this namespace
    // restored into another one is refused by the shim's policy. Everything made is removed.
    let other = format!("{}-other", bed.tb.namespace());
    let ctr_other = |args: &[&str]| {
        let out = bed.tb.ctr_command().args(["--namespace", &other]).args(args).output().unwrap();
        assert!(out.status.success(), "ctr -n {other} {args:?}: {}", text(&out.stderr));
        text(&out.stdout)
    };
    ctr_other(&["images", "import", kybernate_testbed::IMAGE_ARCHIVE]);
    let crossed = unique_name("crossed");
    let out = bed.kybernate_at(
        bed.tb.address(),
        &other,
        &["restore", &cp_id, "--as", &crossed, "--image", IMAGE, "--trust-spec"],
    );
    assert_exit(&out, 1, &["restore of container", &crossed, "cannot be restored into namespace"]);
    assert_eq!(ctr_other(&["containers", "ls", "-q"]).trim(), "", "the failed restore's container must be removed");
    let snapshots = ctr_other(&["snapshots", "ls"]);
    assert!(!snapshots.contains(&crossed), "the failed restore's snapshot must be removed: {snapshots}");

    // A garbage inventory.img that the manifest vouches for (its checksum rewritten): the CLI's
    // credentials check cannot read CRIU's images and refuses before containerd is asked.
    let out = bed.kybernate(&["-o", "json", "checkpoint", &id, "--name", "garbage"]);
    assert_exit_ok(&out);
    let garbage = json(&out);
    let garbage_path = PathBuf::from(garbage["path"].as_str().unwrap());
    rewrite_file(&garbage_path, "checkpoint/inventory.img", b"not a CRIU image");
    assert_exit_ok(&bed.kybernate(&["inspect", garbage["id"].as_str().unwrap()]));
    let unreadable = unique_name("unreadable");
    let out = bed.kybernate(&[
        "restore",
        garbage["id"].as_str().unwrap(),
        "--as",
        &unreadable,
        "--image",
        IMAGE,
        "--trust-spec",
    ]);
    assert_exit(&out, 2, &["the credentials check failed", "inventory.img"]);
    bed.assert_nothing_named(&unreadable);
    assert_eq!(bed.containers(), before, "a refused restore must create nothing");

    // A failure at Start: CRIU cannot read a garbage pagemap image (which the credentials check
    // does not read), so the task is created, fails to start, and is deleted.
    let out = bed.kybernate(&["-o", "json", "checkpoint", &id, "--name", "badpages"]);
    assert_exit_ok(&out);
    let badpages = json(&out);
    let badpages_path = PathBuf::from(badpages["path"].as_str().unwrap());
    let pagemap = fs::read_dir(badpages_path.join("checkpoint"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .find(|n| n.starts_with("pagemap-") && n.ends_with(".img"))
        .expect("a pagemap image");
    rewrite_file(&badpages_path, &format!("checkpoint/{pagemap}"), b"not a CRIU image");
    assert_exit_ok(&bed.kybernate(&["inspect", badpages["id"].as_str().unwrap()]));
    let failing = unique_name("failing");
    let out = bed.kybernate(&[
        "restore",
        badpages["id"].as_str().unwrap(),
        "--as",
        &failing,
        "--image",
        IMAGE,
        "--trust-spec",
    ]);
    assert_exit(&out, 1, &["restore of container", &failing]);
    assert_eq!(bed.containers(), before, "the failed restore's container must be removed");
    assert_eq!(task_status(&bed.tb, &failing), None, "the failed restore's task must be deleted");
    let snapshots = bed.tb.ctr_ok(&["snapshots", "ls"]);
    assert!(!snapshots.contains(&failing), "the failed restore's snapshot must be removed: {snapshots}");

    // A byte flipped in the memory image (same size, so only the checksum tells).
    let pages = cp_path.join("checkpoint/pages-1.img");
    let mut bytes = fs::read(&pages).unwrap();
    bytes[0] ^= 0xff;
    fs::write(&pages, bytes).unwrap();
    let out = bed.kybernate(&["restore", &cp_id, "--as", &unique_name("tampered"), "--image", IMAGE, "--trust-spec"]);
    assert_exit(&out, 1, &["pages-1.img", "failed verification"]);
    assert_eq!(bed.containers(), before, "a tampered checkpoint must create nothing");
    let snapshots = bed.tb.ctr_ok(&["snapshots", "ls"]);
    assert!(!snapshots.contains("tampered"), "a tampered checkpoint must create no snapshot: {snapshots}");

    bed.remove(&id);
}

/// `--pod-annotation` needs no containerd: a checkpoint written straight into a scratch store.
#[test]
fn pod_annotation_names_the_checkpoint() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("store");
    let config = tmp.path().join("config.toml");
    fs::write(&config, format!("[checkpoint]\nroot = {:?}\n", root.to_str().unwrap())).unwrap();
    let store = Store::new(&root);
    let id = fake_checkpoint(&store, "k8s.io", "abc123", SystemTime::now());

    let run = |args: &[&str]| {
        Command::new(KYBERNATE)
            .args(["--address", "/nonexistent.sock", "--config"])
            .arg(&config)
            .args(args)
            .env_remove("CONTAINERD_NAMESPACE")
            .env_remove("KYBERNATE_CONFIG")
            .output()
            .unwrap()
    };
    let out = run(&["restore", &id, "--pod-annotation"]);
    assert_exit_ok(&out);
    let table = text(&out.stdout);
    assert_eq!(table.lines().next(), Some(format!("kybernate.io/restore-from: {id}").as_str()), "{table}");
    for want in
        ["namespace: team-a", "runtimeClassName: kybernate", "image: docker.io/library/busybox:1", "pod_annotations"]
    {
        assert!(table.contains(want), "snippet lacks {want:?}:\n{table}");
    }

    let out = run(&["-o", "json", "restore", &id, "--pod-annotation"]);
    assert_exit_ok(&out);
    let v = json(&out);
    assert_eq!(v["annotation"], serde_json::json!({ "kybernate.io/restore-from": id }), "{v}");
    assert_eq!(v["checkpoint"]["id"], id.as_str(), "{v}");
    assert_eq!(v["checkpoint"]["status"], "ok", "{v}");

    // --pod-annotation creates nothing, so --as makes no sense with it.
    assert_exit(&run(&["restore", &id, "--pod-annotation", "--as", "x"]), 2, &[]);
}

/// The counter beside two long-lived "GPU workers" holding the (fake) NVIDIA control device open,
/// which is how CUDA processes look from /proc (as in shim/tests/gpu.rs); FAKE_CUDA_CONTEXT=1
/// makes the fake driver know them as CUDA processes (it refuses unmarked ones, as the real driver
/// refuses processes without a CUDA context).
const GPU_COUNTER: &str = "FAKE_CUDA_CONTEXT=1 sleep 100000 </dev/nvidiactl & FAKE_CUDA_CONTEXT=1 sleep 100001 \
     </dev/nvidiactl & i=0; while true; \
     do i=$((i+1)); echo $i > /tmp/counter.new; mv /tmp/counter.new /tmp/counter; usleep 100000; done";

/// Host pids of the task's processes that hold /dev/nvidiactl open: its two CUDA workers.
fn cuda_pids(bed: &Bed, id: &str) -> Vec<i32> {
    wait_for(&format!("the CUDA workers of {id}"), || {
        let ps = bed.tb.ctr_ok(&["tasks", "ps", id]);
        let pids: Vec<i32> = ps
            .lines()
            .skip(1)
            .filter_map(|l| l.split_whitespace().next()?.parse().ok())
            .filter(|pid| {
                fs::read_dir(format!("/proc/{pid}/fd")).is_ok_and(|d| {
                    d.flatten().any(|e| fs::read_link(e.path()).is_ok_and(|t| t == Path::new("/dev/nvidiactl")))
                })
            })
            .collect();
        (pids.len() == 2).then_some(pids)
    })
}

/// A GPU checkpoint whose manifest records GPUs this node does not have (one H100; the node has
/// none) is refused by `kybernate restore` without `--allow-gpu-mismatch`, creating nothing, and
/// restored with it: the container runs again and counts on, its CUDA workers get their GPU
/// state back (restore, unlock) at their new pids. GPUs cannot exist here, so the same doubles
/// as shim/tests/gpu.rs stand in: the fake `nvidia-container-runtime` (spec edits on create,
/// everything else to runc) and the fake `libcuda.so.1` (the driver's checkpoint API); containerd,
/// our shim, runc and CRIU are real.
#[test]
fn a_gpu_checkpoint_from_other_gpus_is_refused_then_restored_with_allow_gpu_mismatch() {
    let scratch = kybernate_testbed::scratch_dir().expect("scratch dir");
    let d = scratch.path();
    let cuda = FakeCuda::build(&d.join("cuda"), true);
    let nvidia = d.join("nvidia");
    fs::create_dir_all(&nvidia).unwrap();
    fs::copy(fake_gpu_runtime_binary(), nvidia.join("nvidia-container-runtime")).unwrap();
    // What the GPU runtime adds on create; /dev/nvidiactl has /dev/null's numbers so that the
    // workers can open it.
    let edits = serde_json::json!({
        "devices": [
            {"path": "/dev/nvidia0", "type": "c", "major": 195, "minor": 0, "fileMode": 438, "uid": 0, "gid": 0},
            {"path": "/dev/nvidiactl", "type": "c", "major": 1, "minor": 3, "fileMode": 438, "uid": 0, "gid": 0}
        ],
        "rules": [{"allow": true, "type": "c", "major": 195, "minor": 0, "access": "rwm"}],
        "mounts": []
    });
    fs::write(nvidia.join("edits.json"), edits.to_string()).unwrap();
    // The container's GPU evidence: a char device of major 195 (`ctr run --device`).
    let device = nvidia_device_node(&d.join("dev/nvidia0"));
    let extra = format!("libcuda = \"{}\"\ncuda = \"driver-api\"\n", cuda.lib.display());
    let bed = bed_with(|b| b.path_prepend(&nvidia), &extra);

    let id = unique_name("gpu-mm");
    let device_arg = device.display().to_string();
    bed.tb.ctr_ok(&["run", "-d", "--runtime", RUNTIME, "--device", &device_arg, IMAGE, &id, "sh", "-c", GPU_COUNTER]);
    bed.wait_running(&id);
    cuda_pids(&bed, &id);
    bed.wait_counter(&id, 10);

    let out = bed.kybernate(&["-o", "json", "checkpoint", &id, "--exit"]);
    assert_exit_ok(&out);
    let cp = json(&out);
    assert_eq!(cp["gpu"], true, "{cp}");
    let cp_id = cp["id"].as_str().expect("id").to_string();
    let cp_path = PathBuf::from(cp["path"].as_str().expect("path"));
    wait_for(&format!("{id} to stop after --exit"), || {
        (task_status(&bed.tb, &id).as_deref() != Some("RUNNING")).then_some(())
    });
    let at_checkpoint = bed.counter(&id).expect("the counter of the checkpointed container");

    // The checkpoint as a node with one H100 would have recorded it (this node has no GPU).
    let manifest_path = cp_path.join("kybernate.json");
    let mut m: Value = serde_json::from_slice(&fs::read(&manifest_path).unwrap()).unwrap();
    assert_eq!(m["gpu"]["mode"], "driver-api", "{m}");
    assert_eq!(m["gpu"]["processes"].as_array().map(Vec::len), Some(2), "{m}");
    m["gpu"]["gpus"] = serde_json::json!([{"index": 0, "model": "NVIDIA H100 80GB HBM3", "uuid": "GPU-5a3c",
        "bus_id": "0000:18:00.0", "minor": 0}]);
    fs::write(&manifest_path, serde_json::to_vec_pretty(&m).unwrap()).unwrap();
    assert_exit_ok(&bed.kybernate(&["inspect", &cp_id]));

    // Without the flag: refused before containerd is asked, naming both sides and the way out.
    let new_id = unique_name("gpu-mm-r");
    let before = bed.containers();
    let out = bed.kybernate(&["restore", &cp_id, "--as", &new_id, "--image", IMAGE]);
    assert_exit(&out, 1, &["NVIDIA H100 80GB HBM3", "this node has 0", "--allow-gpu-mismatch"]);
    assert_eq!(bed.containers(), before, "a refused restore must create nothing");
    assert!(!bed.tb.ctr_ok(&["snapshots", "ls"]).contains(&new_id), "a refused restore must prepare no snapshot");

    // With it: restored through containerd, the shim and the GPU runtime.
    let calls_before = cuda.calls().len();
    // Its spec.dump names the GPU devices (`ctr run --device`, the GPU runtime's edits) and no
    // seccomp profile: beyond the image defaults, so --trust-spec.
    let out = bed.kybernate(&[
        "-o",
        "json",
        "restore",
        &cp_id,
        "--as",
        &new_id,
        "--image",
        IMAGE,
        "--allow-gpu-mismatch",
        "--trust-spec",
    ]);
    if !out.status.success() {
        panic!("restore failed: {}\n--- containerd log ---\n{}", text(&out.stderr), bed.tb.log_tail(40));
    }
    assert_eq!(json(&out)["container"], new_id.as_str());
    let privileges = json(&out)["privileges"].clone();
    assert!(
        privileges.as_array().is_some_and(|p| p.iter().any(|p| p.as_str().is_some_and(|p| p.starts_with("device ")))),
        "{privileges}"
    );
    assert_eq!(task_status(&bed.tb, &new_id).as_deref(), Some("RUNNING"));
    let info: Value = serde_json::from_str(&bed.tb.ctr_ok(&["containers", "info", &new_id])).unwrap();
    assert_eq!(info["Spec"]["annotations"]["kybernate.io/allow-gpu-mismatch"], "true", "{info}");
    let first = wait_for("the restored counter", || bed.counter(&new_id));
    assert!(first >= at_checkpoint, "restored counter {first} < {at_checkpoint} at checkpoint: not restored");
    wait_for("the restored counter to increase", || bed.counter(&new_id).filter(|&n| n > first + 2));
    let nvidia_calls = fs::read_to_string(nvidia.join("calls.log")).unwrap();
    assert!(
        nvidia_calls.lines().any(|l| l.contains(" restore ") && l.ends_with(&new_id)),
        "the restore did not go through the GPU runtime:\n{nvidia_calls}"
    );
    let calls = cuda.calls()[calls_before..].to_vec();
    for pid in cuda_pids(&bed, &new_id) {
        let of = |f: &str| calls.iter().position(|c| c.function == f && c.pid == pid && c.code == 0);
        let (restore, unlock) = (of("cuCheckpointProcessRestore"), of("cuCheckpointProcessUnlock"));
        assert!(restore.is_some() && unlock.is_some() && restore < unlock, "pid {pid}: {calls:?}");
        assert_eq!(cuda.state_of_pid(pid).as_deref(), Some("running"), "pid {pid}");
    }

    bed.remove(&new_id);
    bed.remove(&id);
}

/// Replaces `file` of the checkpoint in `dir` with `data`, and its size and digests in the manifest:
/// the checkpoint still verifies.
fn rewrite_file(dir: &Path, file: &str, data: &[u8]) {
    fs::write(dir.join(file), data).unwrap();
    let manifest_path = dir.join("kybernate.json");
    let mut m: Value = serde_json::from_slice(&fs::read(&manifest_path).unwrap()).unwrap();
    let entry = kybernate_checkpoint::digest::hash_entry(&dir.join(file)).unwrap();
    m["files"][file] = serde_json::to_value(entry).unwrap();
    fs::write(&manifest_path, serde_json::to_vec(&m).unwrap()).unwrap();
}

/// Every privilege `kybernate restore` must name for the edited spec.dump below, in its order
/// (the prestart hook goes before the CRIU config file).
const EDITED_PRIVILEGES: [&str; 11] = [
    "privileged: all capabilities",
    "host pid namespace",
    "host network namespace",
    "/sys read-write",
    "host bind mount / at /host (rw)",
    "device /dev/sda (b 8:0)",
    "devices cgroup allows all devices (a *:* rwm)",
    "seccomp unconfined (no profile)",
    "masked paths removed: /proc/acpi, /proc/asound, /proc/kcore, /proc/keys, /proc/latency_stats, /proc/timer_list, \
     /proc/timer_stats, /proc/sched_debug, /sys/firmware, /proc/scsi",
    "no_new_privs off (setuid binaries and file capabilities can raise privileges)",
    "CRIU config file /etc/kybernate-test-criu.conf (org.criu.config: CRIU options, scripts included, run as root)",
];

/// A checkpoint whose `spec.dump` (and `config.dump`) were edited to grant everything — all
/// capabilities, host namespaces, a host bind mount, a device, no seccomp, no masked paths, a
/// prestart hook and a CRIU config file — with the manifest's sums recomputed, so that it
/// verifies: `kybernate restore` refuses it (exit 2) without --trust-spec, naming each, and
/// creates nothing in containerd (the hook never runs); --dry-run says the same and creates
/// nothing either; --spec with a clean spec restores it, and the counter counts on.
#[test]
fn an_edited_spec_dump_is_refused_without_trust_spec_and_a_clean_spec_restores() {
    let bed = bed();
    let id = unique_name("rsspec");
    bed.run_counter_with(&id, RUNTIME, &["--seccomp"]);
    bed.wait_counter(&id, 10);
    let out = bed.kybernate(&["-o", "json", "checkpoint", &id, "--exit"]);
    assert_exit_ok(&out);
    let cp_id = json(&out)["id"].as_str().expect("id").to_string();
    let cp_path = PathBuf::from(json(&out)["path"].as_str().expect("path"));
    wait_for(&format!("{id} to stop after --exit"), || {
        (task_status(&bed.tb, &id).as_deref() != Some("RUNNING")).then_some(())
    });
    let at_checkpoint = bed.counter(&id).expect("the counter of the checkpointed container");

    // The spec as the shim recorded it: containerd's defaults with RuntimeDefault. Kept aside as
    // the operator's clean spec.
    let clean = bed.dir.path().join("clean-spec.json");
    fs::copy(cp_path.join("spec.dump"), &clean).unwrap();
    let dry = bed.kybernate(&["-o", "json", "restore", &cp_id, "--image", IMAGE, "--dry-run"]);
    assert_exit_ok(&dry);
    assert_eq!(json(&dry)["privileges"], serde_json::json!([]), "the recorded spec grants nothing extra");

    let hook_ran = bed.dir.path().join("hook-ran");
    let hook = format!("touch {}", hook_ran.display());
    edit_checkpoint_json(&cp_path, "spec.dump", |spec| {
        let caps = serde_json::json!(kybernate_checkpoint::grants::caps::NAMES.to_vec());
        for set in ["bounding", "effective", "permitted", "inheritable", "ambient"] {
            spec["process"]["capabilities"][set] = caps.clone();
        }
        spec["process"]["noNewPrivileges"] = false.into();
        let linux = &mut spec["linux"];
        linux.as_object_mut().unwrap().remove("seccomp");
        linux["maskedPaths"] = serde_json::json!([]);
        linux["namespaces"]
            .as_array_mut()
            .expect("linux.namespaces")
            .retain(|n| n["type"] != "network" && n["type"] != "pid");
        linux["devices"] =
            serde_json::json!([{"path": "/dev/sda", "type": "b", "major": 8, "minor": 0, "fileMode": 432}]);
        linux["resources"]["devices"] = serde_json::json!([{"allow": true, "access": "rwm"}]);
        let mounts = spec["mounts"].as_array_mut().expect("mounts");
        for m in mounts.iter_mut().filter(|m| m["destination"] == "/sys") {
            m["options"] = serde_json::json!(["nosuid", "noexec", "nodev", "rw"]);
        }
        mounts.push(
            serde_json::json!({"destination": "/host", "type": "bind", "source": "/", "options": ["rbind", "rw"]}),
        );
        spec["hooks"] = serde_json::json!({"prestart": [{"path": "/bin/sh", "args": ["sh", "-c", hook]}]});
        spec["annotations"] = serde_json::json!({"org.criu.config": "/etc/kybernate-test-criu.conf"});
    });
    edit_checkpoint_json(&cp_path, "config.dump", |c| {
        c["privileged"] = true.into();
        c["hostNetwork"] = true.into();
        c["hostPID"] = true.into();
        c["mounts"] = serde_json::json!([{"containerPath": "/host", "hostPath": "/"}]);
        c["devices"] = serde_json::json!([{"containerPath": "/dev/sda", "hostPath": "/dev/sda", "permissions": "rwm"}]);
    });
    assert_exit_ok(&bed.kybernate(&["inspect", &cp_id]));
    let hook_line = format!("hooks: prestart /bin/sh -c {hook} (runs on the host as root)");
    let mut want: Vec<String> = EDITED_PRIVILEGES.iter().map(|p| p.to_string()).collect();
    want.insert(10, hook_line.clone());

    let before = bed.containers();
    let new_id = unique_name("rsspec-r");
    let assert_nothing_created = || {
        bed.assert_nothing_named(&new_id);
        assert_eq!(bed.containers(), before, "a refused restore must create nothing");
        assert!(!hook_ran.exists(), "the spec's prestart hook ran");
    };

    // Refused, naming each: on stderr (one line) and, for a table, on stdout one per line.
    let out = bed.kybernate(&["restore", &cp_id, "--as", &new_id, "--image", IMAGE]);
    let mut stderr_has: Vec<&str> = want.iter().map(String::as_str).collect();
    stderr_has.extend(["refused", "--trust-spec", "--spec FILE"]);
    assert_exit(&out, 2, &stderr_has);
    assert_eq!(text(&out.stderr).trim_end().lines().count(), 1, "one error line");
    let table = text(&out.stdout);
    let lines: Vec<&str> = table.lines().collect();
    assert_eq!(lines[0], format!("the spec (spec.dump of {cp_id}) grants beyond the image defaults:"), "{table}");
    assert_eq!(lines[1..].iter().map(|l| l.trim_start()).collect::<Vec<_>>(), want, "{table}");
    assert_nothing_created();

    // JSON: the same list, the refusal, and the credentials check, which refuses too: without
    // the masked paths the checkpoint's masks (/dev/null bound over /proc/kcore, ...) are host
    // mounts this spec does not make. Every reason at once.
    let out = bed.kybernate(&["-o", "json", "restore", &cp_id, "--as", &new_id, "--image", IMAGE]);
    assert_exit(&out, 2, &["refused", "--trust-spec", "the checkpoint's processes hold more than the spec"]);
    let v = json(&out);
    assert_eq!(v["privileges"], serde_json::json!(want), "{v}");
    assert_eq!(v["restore"], false, "{v}");
    assert_eq!(v["credentials"]["ok"], false, "{v}");
    let excesses = v["credentials"]["excesses"].to_string();
    assert!(excesses.contains("with the host's /dev/null, the new spec masks no paths"), "{v}");
    assert!(v["error"].as_str().is_some_and(|e| e.contains("--trust-spec")), "{v}");
    assert_nothing_created();

    // --dry-run says the same, and creates nothing either.
    let out = bed.kybernate(&["restore", &cp_id, "--as", &new_id, "--image", IMAGE, "--dry-run"]);
    assert_exit(&out, 2, &["refused"]);
    let table = text(&out.stdout);
    for want in want.iter().map(String::as_str).chain([
        "would be refused as",
        "nothing was created",
        "not allowed without --trust-spec",
        "credentials: refused: the checkpoint masks /proc/",
        "with the host's /dev/null, the new spec masks no paths",
    ]) {
        assert!(table.contains(want), "dry run lacks {want:?}:\n{table}");
    }
    let out = bed.kybernate(&["-o", "json", "restore", &cp_id, "--as", &new_id, "--image", IMAGE, "--dry-run"]);
    assert_exit(&out, 2, &["refused"]);
    let v = json(&out);
    assert_eq!((v["dry_run"].as_bool(), v["restore"].as_bool()), (Some(true), Some(false)), "{v}");
    assert_eq!(v["privileges"], serde_json::json!(want), "{v}");
    // --trust-spec allows what the spec grants, never what the checkpoint's processes hold
    // beyond it: still refused, for that reason only.
    let out = bed.kybernate(&[
        "-o",
        "json",
        "restore",
        &cp_id,
        "--as",
        &new_id,
        "--image",
        IMAGE,
        "--dry-run",
        "--trust-spec",
    ]);
    assert_exit(&out, 2, &["the checkpoint's processes hold more than the spec"]);
    assert!(!text(&out.stderr).contains("pass --trust-spec"), "{}", text(&out.stderr));
    let v = json(&out);
    assert_eq!((v["dry_run"].as_bool(), v["restore"].as_bool()), (Some(true), Some(false)), "{v}");
    assert_nothing_created();

    // A --spec file that cannot be read is bad input.
    let missing = bed.dir.path().join("missing.json");
    let out = bed.kybernate(&["restore", &cp_id, "--image", IMAGE, "--spec", missing.to_str().unwrap()]);
    assert_exit(&out, 2, &["--spec", "missing.json", "cannot read"]);

    // The operator's clean spec: restored, counting on from the checkpoint.
    let out = bed.kybernate(&[
        "-o",
        "json",
        "restore",
        &cp_id,
        "--as",
        &new_id,
        "--image",
        IMAGE,
        "--spec",
        clean.to_str().unwrap(),
    ]);
    if !out.status.success() {
        panic!("restore failed: {}\n--- containerd log ---\n{}", text(&out.stderr), bed.tb.log_tail(40));
    }
    let v = json(&out);
    assert_eq!(v["spec"], clean.to_str().unwrap(), "{v}");
    assert_eq!(v["privileges"], serde_json::json!([]), "{v}");
    assert_eq!(task_status(&bed.tb, &new_id).as_deref(), Some("RUNNING"));
    let info: Value = serde_json::from_str(&bed.tb.ctr_ok(&["containers", "info", &new_id])).unwrap();
    assert!(info["Spec"].get("hooks").is_none(), "{info}");
    assert!(info["Spec"]["annotations"].get("org.criu.config").is_none(), "{info}");
    assert!(info["Spec"]["linux"]["seccomp"].is_object(), "the clean spec's profile: {info}");
    let first = wait_for("the restored counter", || bed.counter(&new_id));
    assert!(first >= at_checkpoint, "restored counter {first} < {at_checkpoint} at checkpoint: not restored");
    wait_for("the restored counter to increase", || bed.counter(&new_id).filter(|&n| n > first));
    assert!(!hook_ran.exists(), "the edited spec's prestart hook ran");

    bed.remove(&new_id);
    bed.remove(&id);
}

/// containerd restarts while `kybernate checkpoint` waits for its answer: the shim goes on and
/// commits, the container keeps running, and the CLI reports the committed checkpoint (with a
/// note) instead of containerd's transport error. The container holds some memory so that the
/// dump and the commit's hashing outlast containerd's stop.
#[test]
fn a_checkpoint_that_outlives_a_containerd_restart_is_reported_from_the_store() {
    let mut bed = bed();
    let id = unique_name("cdr");
    let hold = "x=$(head -c 64000000 /dev/zero | tr '\\0' a); echo held > /tmp/held; sleep 1000";
    bed.tb.ctr_ok(&["run", "-d", "--runtime", RUNTIME, IMAGE, &id, "sh", "-c", hold]);
    bed.wait_running(&id);
    let rootfs =
        bed.tb.dir().join("state/io.containerd.runtime.v2.task").join(bed.tb.namespace()).join(&id).join("rootfs");
    wait_for("the container to hold its memory", || rootfs.join("tmp/held").exists().then_some(()));

    let cli = Command::new(KYBERNATE)
        .arg("--address")
        .arg(bed.tb.address())
        .args(["-n", bed.tb.namespace(), "-o", "json"])
        .arg("--config")
        .arg(&bed.config)
        .args(["checkpoint", &id])
        .env_remove("KYBERNATE_CONFIG")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let container_dir = bed.store.join(bed.tb.namespace()).join(&id);
    wait_for("the shim's partial checkpoint", || {
        fs::read_dir(&container_dir)
            .ok()?
            .flatten()
            .any(|e| e.file_name().to_string_lossy().contains(".partial-"))
            .then_some(())
    });
    bed.tb.restart_containerd();
    let out = cli.wait_with_output().unwrap();
    eprintln!("stdout:\n{}stderr:\n{}", text(&out.stdout), text(&out.stderr));
    assert_exit_ok(&out);
    assert!(text(&out.stderr).contains("kybernate: note: containerd's answer was lost"), "{}", text(&out.stderr));
    let v = json(&out);
    assert_eq!(v["status"], "ok", "{v}");
    assert!(v["note"].as_str().is_some_and(|n| n.contains("committed")), "{v}");
    assert_eq!(task_status(&bed.tb, &id).as_deref(), Some("RUNNING"), "the container keeps running");
    assert_exit_ok(&bed.kybernate(&["inspect", v["id"].as_str().unwrap()]));
    bed.remove(&id);
}
