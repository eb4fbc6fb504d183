//! The restore verdict at Create, with real containerd, runc and CRIU (the test bed:
//! `test/setup.sh`): a checkpoint records what a restore needs of the node (architecture, CPU
//! features, cgroup mode, external mounts); a restore whose checkpoint needs what this node or the
//! new container lacks is refused before anything is created (FailedPrecondition), every mismatch
//! named at once; the same checkpoint, unedited, restores here.

use std::path::Path;
use std::process::Output;

mod common;

use common::ckpt::*;
use common::{bundle_dir, runc_state_entries, task_row, text};
use kybernate_testbed::{unique_name, Testbed};

/// Asserts that nothing of the refused restore `id` is left: no task, no runtime state, nothing
/// mounted on its bundle; removes the container record `ctr run` leaves.
fn assert_nothing_left(tb: &Testbed, id: &str) {
    assert_eq!(task_row(tb, id), None, "a task {id} exists after its restore was refused");
    assert!(!runc_state_entries(tb).contains(&id.to_string()), "runtime state left for {id}");
    let bundle = bundle_dir(tb, id);
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let left: Vec<&str> =
        mounts.lines().filter_map(|l| l.split(' ').nth(4)).filter(|m| Path::new(m).starts_with(&bundle)).collect();
    assert!(left.is_empty(), "mounts left on the bundle of {id}: {left:?}");
    let _ = tb.ctr(&["containers", "delete", id]);
}

fn refused(out: &Output) -> String {
    assert!(!out.status.success(), "the restore went ahead: {}", text(&out.stdout));
    text(&out.stderr)
}

#[test]
fn a_checkpoint_this_node_cannot_take_is_refused_at_create_with_every_mismatch() {
    let bed = bed();
    let tb = &bed.tb;
    let src = tb.dir().join("host-data");
    std::fs::create_dir_all(&src).unwrap();
    let mount = format!("type=bind,src={},dst=/host,options=rbind:rw", src.display());
    let id = unique_name("verdict");
    run_counter(tb, &id, &["--mount", &mount]);
    let (dir, at_checkpoint) = store_checkpoint(&bed, &id, true);

    // What the shim recorded of this node and of the container's external mounts.
    let manifest_path = dir.join("kybernate.json");
    let original = std::fs::read(&manifest_path).unwrap();
    let m: serde_json::Value = serde_json::from_slice(&original).unwrap();
    let needs = &m["needs"];
    assert_eq!(needs["arch"], std::env::consts::ARCH, "{m:#}");
    assert!(needs["cgroup"].is_string(), "{needs}");
    assert!(needs["cpu_features"].as_array().is_some_and(|f| !f.is_empty()), "{needs}");
    assert!(needs["external_mounts"].as_array().unwrap().iter().any(|d| d == "/host"), "{needs}");

    // Edited to need what this node lacks (the manifest is not hashed: the checkpoint verifies),
    // and restored into a spec without the bind mount: every mismatch in one refusal.
    let mut edited = m.clone();
    edited["criu"]["version"] = "99.1.0".into();
    edited["needs"]["arch"] = "riscv64".into();
    edited["needs"]["cpu_features"].as_array_mut().unwrap().push("avx1024_imaginary".into());
    edited["gpu"] = serde_json::json!({
        "mode": "driver-api",
        "processes": [{"pid": 4711, "ns_pid": 1, "evidence": "maps libcuda.so.1", "bytes": 1u64 << 30, "gpu_minors": [0]}],
        "gpus": [{"index": 0, "model": "NVIDIA H100 80GB HBM3", "uuid": "GPU-5a3c", "bus_id": "0000:18:00.0", "minor": 0}],
        "driver_version": "580.65.06",
    });
    std::fs::write(&manifest_path, serde_json::to_vec_pretty(&edited).unwrap()).unwrap();
    let r = unique_name("verdict-no");
    let err = refused(&run_restored(&bed, &dir, &r, &[]));
    eprintln!("--- the refusal:\n{err}");
    assert!(
        err.contains("refused: this node or container cannot take it, nothing was created: 7 mismatch(es)"),
        "{err}"
    );
    for named in [
        "criu-version: checkpoint dumped by CRIU 99.1.0, this node has CRIU ",
        "arch: checkpoint taken on \"riscv64\", this node is ",
        "cpu-features: checkpoint taken on a CPU with [avx1024_imaginary]",
        "mounts: checkpoint's processes had mounts at /host",
        "gpu-driver-missing: checkpoint's CUDA state was taken with NVIDIA driver 580.65.06",
        "gpu-node-count: checkpoint taken on a node with 1 GPU(s) [NVIDIA H100 80GB HBM3], this node has 0",
        "gpu-count: the checkpoint used 1 GPU (/dev/nvidia0); this container has none",
    ] {
        assert!(err.contains(named), "{named:?} not in {err}");
    }
    assert!(err.to_lowercase().contains("failed precondition") || err.contains("FailedPrecondition"), "{err}");
    assert_nothing_left(tb, &r);
    let line = tb.wait_log_line(&[&format!("restore {r}: verdict in "), "7 mismatch(es)"]);
    eprintln!("time to verdict (the shim's log): {line}");
    // Journaled as a refused restore of its own class.
    let journal = std::fs::read_to_string(bed.store.join(".journal/attempts.jsonl")).unwrap_or_default();
    let attempt: serde_json::Value = journal
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find(|a| a["container"] == r.as_str())
        .unwrap_or_else(|| panic!("no journal entry for {r}:\n{journal}"));
    assert_eq!(attempt["error_class"], "incompatible", "{attempt}");

    // The checkpoint as taken: this node and a spec with the mount take it, and it restores.
    std::fs::write(&manifest_path, &original).unwrap();
    let ok = unique_name("verdict-ok");
    run_restored_ok(&bed, &dir, &ok, &["--mount", &mount]);
    assert_counter_continues(tb, &ok, at_checkpoint);
    let line = tb.wait_log_line(&[&format!("restore {ok}: verdict in "), "0 mismatch(es)"]);
    eprintln!("time to verdict (the shim's log): {line}");
    remove(tb, &ok);
    let _ = tb.ctr(&["tasks", "delete", &id]);
}
