//! Pre-dump on a kernel without soft-dirty bits (the CI machines': `criu check --feature
//! mem_dirty_track` says "Dirty tracking is OFF"), end to end with containerd 1.6, our shim, runc
//! and the real CRIU: every way of asking for pre-dump (`kybernate checkpoint --pre-dump N`, the
//! container's annotation, the config default) is refused before anything is frozen or written,
//! naming the missing kernel feature, and the container keeps running; `--pre-dump 0` overrides
//! the annotation; `kybernate doctor` says pre-dump is unavailable. The orchestration itself
//! (rounds, parents, cleanup) is tested against a double in the shim (src/predump.rs).
//!
//! Needs our shim built (`cargo build -p containerd-shim-kybernate-v1`): see common/mod.rs.

mod common;

use std::path::Path;

use common::{bed, json, task_status, text, RUNTIME};
use kybernate_testbed::unique_name;

const ANNOTATION: &str = "kybernate.io/checkpoint-pre-dump";

/// The request was refused for the kernel's sake, and left nothing behind.
fn assert_refused(bed: &common::Bed, id: &str, out: &std::process::Output) {
    let stderr = text(&out.stderr);
    assert!(!out.status.success(), "pre-dump was not refused:\n{stderr}");
    for want in ["pre-dump", "CONFIG_MEM_SOFT_DIRTY", "Dirty tracking is OFF", "--pre-dump 0"] {
        assert!(stderr.contains(want), "{want:?} missing from:\n{stderr}");
    }
    let dir = bed.store.join(bed.tb.namespace()).join(id);
    let left: Vec<String> = std::fs::read_dir(&dir)
        .map(|rd| rd.flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect())
        .unwrap_or_default();
    assert!(left.is_empty(), "left in {}: {left:?}", dir.display());
    let freezer = format!("/sys/fs/cgroup/freezer/{}/{id}/freezer.state", bed.tb.namespace());
    if Path::new(&freezer).exists() {
        assert_eq!(std::fs::read_to_string(&freezer).unwrap().trim(), "THAWED", "container left frozen");
    }
    assert_eq!(task_status(&bed.tb, id).as_deref(), Some("RUNNING"));
    let now = bed.counter(id).unwrap_or(0);
    bed.wait_counter(id, now + 2);
}

#[test]
fn pre_dump_is_refused_on_a_kernel_without_soft_dirty_bits() {
    let bed = bed();

    // doctor: a warning (checkpoints work without pre-dump), naming the kernel feature.
    let out = bed.kybernate(&["-o", "json", "doctor"]);
    let checks = json(&out);
    let check = checks.as_array().unwrap().iter().find(|c| c["check"] == "pre-dump").expect("a pre-dump check").clone();
    assert_eq!(check["status"], "warn", "{check}");
    assert!(check["detail"].as_str().unwrap().contains("CONFIG_MEM_SOFT_DIRTY"), "{check}");

    // The CLI flag.
    let cli = unique_name("pd-cli");
    bed.run_counter(&cli, RUNTIME);
    bed.wait_counter(&cli, 2);
    let out = bed.kybernate(&["checkpoint", &cli, "--pre-dump", "2"]);
    assert_refused(&bed, &cli, &out);
    bed.remove(&cli);

    // The annotation; an explicit `--pre-dump 0` overrides it and checkpoints.
    let annotated = unique_name("pd-ann");
    bed.run_counter_with(&annotated, RUNTIME, &["--annotation", &format!("{ANNOTATION}=1")]);
    bed.wait_counter(&annotated, 2);
    let out = bed.kybernate(&["checkpoint", &annotated]);
    assert_refused(&bed, &annotated, &out);
    let out = bed.kybernate(&["-o", "json", "checkpoint", &annotated, "--pre-dump", "0"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let path = json(&out)["path"].as_str().unwrap().to_string();
    assert!(!Path::new(&path).join("checkpoint/parent").exists(), "a checkpoint without pre-dump has a parent");
    bed.remove(&annotated);

    // The config default, read by the shim of a container created after it is set.
    let config = std::fs::read_to_string(&bed.config).unwrap();
    std::fs::write(&bed.config, format!("{config}pre_dump_rounds = 1\n")).unwrap();
    let configured = unique_name("pd-cfg");
    bed.run_counter(&configured, RUNTIME);
    bed.wait_counter(&configured, 2);
    let out = bed.kybernate(&["checkpoint", &configured]);
    assert_refused(&bed, &configured, &out);
    bed.remove(&configured);
}
