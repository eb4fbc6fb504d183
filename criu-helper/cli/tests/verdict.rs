//! The restore verdict through the `kybernate` binary, on this node (no GPU, real CRIU from
//! `test/setup.sh`): `inspect --compat`, `restore` and `doctor --checkpoint` on checkpoints whose
//! manifest was edited to need what this node lacks. The manifest is not hashed, so the edited
//! checkpoints still verify: the verdict is what refuses them, every mismatch at once, before
//! containerd is asked (none runs here: the address is a path that does not exist).

use std::time::SystemTime;

use kybernate_checkpoint::verdict::{cgroup_mode, CgroupMode, RestoreNeeds};
use serde_json::{json, Value};

mod common;

use common::{fake_checkpoint_with, fake_manifest, show, Node};

/// The cgroup mode this node does not have.
fn other_cgroup_mode() -> CgroupMode {
    match cgroup_mode(std::path::Path::new("/sys/fs/cgroup")) {
        Some(CgroupMode::V2) => CgroupMode::V1,
        _ => CgroupMode::V2,
    }
}

/// A checkpoint as a node unlike this one would have taken it: another architecture, a newer
/// CRIU, a CPU feature no CPU has, the other cgroup mode, a bind mount its spec.dump lacks, and
/// CUDA state on an H100 with driver 580 (this node has no GPU and no driver). Returns its id.
fn foreign_checkpoint(node: &Node) -> String {
    let at = SystemTime::now();
    let mut m = fake_manifest("default", "trainer", at);
    m.criu.version = "99.1.0".into();
    m.needs = Some(RestoreNeeds {
        arch: "riscv64".into(),
        cgroup: Some(other_cgroup_mode()),
        cpu_features: vec!["sse2".into(), "avx1024_imaginary".into()],
        external_mounts: vec!["/data".into()],
    });
    m.gpu = Some(
        serde_json::from_value(json!({
            "mode": "driver-api",
            "processes": [{"pid": 4711, "ns_pid": 7, "evidence": "maps libcuda.so.1", "bytes": 1u64 << 30, "gpu_minors": [0]}],
            "gpus": [{"index": 0, "model": "NVIDIA H100 80GB HBM3", "uuid": "GPU-5a3c", "bus_id": "0000:18:00.0", "minor": 0}],
            "driver_version": "580.65.06",
            "cuda_driver_version": "13.0",
        }))
        .unwrap(),
    );
    fake_checkpoint_with(&node.store, m, at)
}

const FOREIGN_CODES: [&str; 8] = [
    "criu-version",
    "arch",
    "cpu-features",
    "cgroup-mode",
    "mounts",
    "gpu-driver-missing",
    "gpu-node-count",
    "gpu-count",
];

fn codes(v: &Value) -> Vec<String> {
    v.as_array().unwrap().iter().map(|d| d["code"].as_str().unwrap().to_string()).collect()
}

/// `inspect --compat`: every mismatch with its code and both sides, JSON and table, exit 1; a
/// checkpoint like this node's own is compatible (exit 0), its differences only warnings.
#[test]
fn inspect_compat_names_every_mismatch_and_fails_only_on_hard_ones() {
    let node = Node::new().without_containerd();
    let id = foreign_checkpoint(&node);

    let v = node.json(&["inspect", "--compat", &id], 1);
    assert_eq!(v["compatible"], false, "{v}");
    assert_eq!(v["checkpoint"], id.as_str(), "{v}");
    assert_eq!(codes(&v["mismatches"]), FOREIGN_CODES, "{v:#}");
    for d in v["mismatches"].as_array().unwrap() {
        for key in ["code", "message", "checkpoint", "node"] {
            assert!(d[key].as_str().is_some_and(|s| !s.is_empty()), "{key} of {d}");
        }
    }
    let arch = &v["mismatches"][1];
    assert_eq!((arch["checkpoint"].as_str(), arch["node"].as_str()), (Some("riscv64"), Some(std::env::consts::ARCH)));
    let time_ms = v["time_ms"].as_f64().unwrap();
    eprintln!("time to verdict: {time_ms} ms");
    assert!(time_ms < 2000.0, "{time_ms} ms");

    let out = node.run(&["inspect", "--compat", &id]);
    assert_eq!(out.status.code(), Some(1), "{}", show(&out));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.starts_with(&format!("checkpoint {id} on this node: incompatible: 8 mismatches")), "{text}");
    for line in [
        "  mismatch  criu-version: checkpoint dumped by CRIU 99.1.0, this node has CRIU ",
        "  mismatch  arch: checkpoint taken on \"riscv64\"",
        "  mismatch  cpu-features: checkpoint taken on a CPU with [avx1024_imaginary]",
        "  mismatch  mounts: checkpoint's processes had mounts at /data",
        "  mismatch  gpu-driver-missing: checkpoint's CUDA state was taken with NVIDIA driver 580.65.06 (CUDA 13.0)",
        "  mismatch  gpu-count: the checkpoint used 1 GPU (/dev/nvidia0); this container has none",
        "  warning   kernel: checkpoint taken on kernel 6.1.0",
    ] {
        assert!(text.contains(line), "{line:?} not in:\n{text}");
    }

    // The fake checkpoint as the shim writes it on this node (no `needs`: an older shim's), CPU
    // only: compatible, a newer CRIU and another kernel only warnings.
    let plain = common::fake_checkpoint(&node.store, "default", "web", SystemTime::now());
    let v = node.json(&["inspect", "--compat", &plain], 0);
    assert_eq!(v["compatible"], true, "{v}");
    assert_eq!(v["mismatches"], json!([]), "{v}");
    assert!(codes(&v["warnings"]).contains(&"kernel".to_string()), "{v}");
}

/// `restore` judges before anything is made: refused (exit 1) naming every mismatch, before
/// containerd is asked; `--dry-run -o json` carries the verdict; `doctor --checkpoint` fails its
/// restore-verdict check with the same mismatches.
#[test]
fn restore_and_doctor_refuse_with_every_mismatch_before_containerd_is_asked() {
    let node = Node::new().without_containerd();
    let id = foreign_checkpoint(&node);

    let out = node.run(&["restore", &id, "--image", "docker.io/library/busybox:1"]);
    assert_eq!(out.status.code(), Some(1), "{}", show(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("this node or container cannot take it: 8 mismatch(es): criu-version: "), "{err}");
    for code in FOREIGN_CODES {
        assert!(err.contains(&format!("{code}: ")), "{code} not named: {err}");
    }
    assert!(err.trim_end().ends_with("nothing was created"), "{err}");
    assert!(!err.contains("cannot reach containerd"), "containerd was asked: {err}");

    let v = node.json(&["restore", &id, "--image", "docker.io/library/busybox:1", "--dry-run"], 1);
    assert_eq!(v["restore"], false, "{v}");
    assert_eq!(v["verdict"]["compatible"], false, "{v}");
    assert_eq!(codes(&v["verdict"]["mismatches"]), FOREIGN_CODES, "{v:#}");

    let checks = node.json(&["doctor", "--checkpoint", &id], 1);
    let check = checks.as_array().unwrap().iter().find(|c| c["check"] == "restore verdict").expect("a verdict check");
    assert_eq!(check["status"], "fail", "{check}");
    let detail = check["detail"].as_str().unwrap();
    assert!(detail.starts_with(&format!("checkpoint {id}: incompatible: 8 mismatches")), "{detail}");
    assert!(detail.contains("arch: checkpoint taken on \"riscv64\""), "{detail}");
}
