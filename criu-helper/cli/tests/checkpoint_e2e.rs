//! `kybernate checkpoint` end to end: a private containerd 1.6 (the test bed: `test/setup.sh`)
//! running our shim, runc and CRIU, driven through containerd's gRPC API by the CLI.
//!
//! Needs our shim built (`cargo build -p containerd-shim-kybernate-v1`): see common/mod.rs.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::{assert_exit, assert_exit_ok, bed, json, show, task_status, text, wait_for, KYBERNATE, RUNTIME};
use kybernate_testbed::{unique_name, CHECKPOINTCTL};

#[test]
fn checkpoint_leaves_the_container_running_and_lists_it() {
    let bed = bed();
    let id = unique_name("cp");
    bed.run_counter(&id, RUNTIME);

    let out = bed.kybernate(&["-o", "json", "checkpoint", &id]);
    assert_exit_ok(&out);
    let cp = json(&out);
    let path = PathBuf::from(cp["path"].as_str().expect("path"));
    let store = std::fs::canonicalize(&bed.store).unwrap();
    assert!(path.starts_with(store.join(bed.tb.namespace()).join(&id)), "{} not in the store", path.display());
    assert!(cp["size_bytes"].as_u64().unwrap() > 0, "size_bytes: {cp}");
    assert!(cp["duration_ms"].is_u64(), "duration_ms: {cp}");
    assert_eq!(cp["status"], "ok", "{cp}");
    assert_eq!(cp["gpu"], false, "{cp}");
    assert_eq!(cp["container"], id.as_str());
    assert!(path.join("kybernate.json").is_file());
    assert!(path.join("checkpoint/inventory.img").is_file());
    // Without --tcp the manifest records that no open TCP connections were checkpointed.
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(path.join("kybernate.json")).unwrap()).unwrap();
    assert_eq!(manifest["options"]["open_tcp"], false, "{manifest}");
    assert_eq!(manifest["options"]["exit"], false, "{manifest}");
    // Left running (the default).
    assert_eq!(task_status(&bed.tb, &id).as_deref(), Some("RUNNING"));

    let listed = json(&bed.kybernate(&["-o", "json", "list"]));
    let ids: Vec<&str> = listed.as_array().unwrap().iter().filter_map(|c| c["id"].as_str()).collect();
    assert_eq!(ids, [cp["id"].as_str().unwrap()]);

    // The table form: where, how big, how long, the GPU mode. --leave-running on its own (the
    // default, spelled out) leaves the container running too.
    let out = bed.kybernate(&["checkpoint", &id, "--leave-running"]);
    assert_exit_ok(&out);
    let table = text(&out.stdout);
    for want in ["path:", "size:", "duration:"] {
        assert!(table.contains(want), "table lacks {want:?}:\n{table}");
    }
    assert!(
        table.lines().any(|l| l.starts_with("gpu mode:") && l.ends_with(" none")),
        "table lacks \"gpu mode: none\":\n{table}"
    );
    assert!(
        table.lines().any(|l| l.starts_with("container:") && l.ends_with(" left running")),
        "table lacks \"container: left running\":\n{table}"
    );
    assert_eq!(task_status(&bed.tb, &id).as_deref(), Some("RUNNING"), "after --leave-running");
    bed.wait_counter(&id, bed.counter(&id).unwrap_or(0) + 3);
    // A second checkpoint of the same container works too (containerd 1.6 then finds the
    // container's spec blob already in its content store; see checkpoint.rs), and both are listed.
    let listed = json(&bed.kybernate(&["-o", "json", "list", "--container", &id]));
    assert_eq!(listed.as_array().unwrap().len(), 2, "{listed}");
    let second = listed.as_array().unwrap().iter().find(|c| c["id"] != cp["id"]).expect("the second checkpoint");
    assert_eq!(second["status"], "ok", "{second}");

    // --tcp: the shim checkpoints with CRIU's --tcp-established, and the manifest records it
    // (a restore must repeat it); inspect shows it among the options.
    let out = bed.kybernate(&["-o", "json", "checkpoint", &id, "--tcp"]);
    assert_exit_ok(&out);
    let tcp = json(&out);
    assert_eq!(tcp["status"], "ok", "{tcp}");
    let tcp_id = tcp["id"].as_str().unwrap();
    let inspected = json(&bed.kybernate(&["-o", "json", "inspect", tcp_id]));
    assert_eq!(inspected["manifest"]["options"]["open_tcp"], true, "{inspected}");
    assert_eq!(inspected["manifest"]["options"]["exit"], false, "{inspected}");
    assert_eq!(inspected["verification"]["ok"], true, "{inspected}");
    let out = bed.kybernate(&["inspect", tcp_id]);
    assert_exit_ok(&out);
    let table = text(&out.stdout);
    assert!(
        table.lines().any(|l| l.starts_with("options:") && l.ends_with(" open_tcp")),
        "inspect lacks \"options: open_tcp\":\n{table}"
    );
    assert_eq!(task_status(&bed.tb, &id).as_deref(), Some("RUNNING"), "after --tcp");
    let listed = json(&bed.kybernate(&["-o", "json", "list", "--container", &id]));
    assert_eq!(listed.as_array().unwrap().len(), 3, "{listed}");
    bed.remove(&id);
}

#[test]
fn checkpoint_with_exit_and_name() {
    let bed = bed();
    let id = unique_name("cpx");
    bed.run_counter(&id, RUNTIME);

    let out = bed.kybernate(&["-o", "json", "checkpoint", &id, "--exit", "--name", "first"]);
    assert_exit_ok(&out);
    let cp = json(&out);
    let path = PathBuf::from(cp["path"].as_str().unwrap());
    assert_eq!(path.file_name().unwrap(), "first");
    assert_eq!(cp["id"].as_str().unwrap(), format!("{}/{id}/first", bed.tb.namespace()));
    assert!(path.join("checkpoint/inventory.img").is_file());
    wait_for(&format!("{id} to stop after --exit"), || {
        (task_status(&bed.tb, &id).as_deref() != Some("RUNNING")).then_some(())
    });

    let again = bed.kybernate(&["checkpoint", &id, "--name", "first"]);
    assert_exit(&again, 2, &["already exists"]);
    assert!(path.join("kybernate.json").is_file(), "the first checkpoint must stay");

    // A stopped task cannot be checkpointed.
    assert_exit(&bed.kybernate(&["checkpoint", &id]), 2, &["not running"]);
    // --leave-running and --exit exclude each other; a hidden name is refused.
    assert_exit(&bed.kybernate(&["checkpoint", &id, "--exit", "--leave-running"]), 2, &[]);
    assert_exit(&bed.kybernate(&["checkpoint", &id, "--name", ".x"]), 2, &["invalid checkpoint name"]);
    bed.remove(&id);
}

/// docs/architecture.md says checkpointctl can read our checkpoints: the real one (Debian's, from
/// the checkpoint-restore project) reads an exported archive of a real checkpoint, CRIU's dump
/// statistics included (CRI-O and containerd 2.x put `stats-dump` at the archive root; before we
/// did, `inspect --all` failed on "open .../stats-dump").
#[test]
fn checkpointctl_reads_an_exported_checkpoint() {
    assert!(Path::new(CHECKPOINTCTL).is_file(), "{CHECKPOINTCTL} missing: run test/setup.sh");
    let bed = bed();
    let id = unique_name("cctl");
    bed.run_counter(&id, RUNTIME);
    let cp = json(&bed.kybernate(&["-o", "json", "checkpoint", &id]));
    let dir = tempfile::tempdir().unwrap();
    let archive = dir.path().join(format!("{id}.tar"));
    assert_exit_ok(&bed.kybernate(&["export", cp["id"].as_str().unwrap(), archive.to_str().unwrap()]));
    let checkpointctl = |args: &[&str]| {
        let out = Command::new(CHECKPOINTCTL).args(args).arg(&archive).output().unwrap();
        assert!(out.status.success(), "checkpointctl {args:?}: {}", show(&out));
        text(&out.stdout)
    };

    let table = checkpointctl(&["show"]);
    assert!(table.contains(&id[..12]) && table.contains("containerd"), "{table}");
    let inspected: serde_json::Value =
        serde_json::from_str(&checkpointctl(&["inspect", "--all", "--format", "json"])).unwrap();
    let c = &inspected[0];
    assert_eq!(c["id"], id.as_str(), "{inspected}");
    assert_eq!(c["engine"], "containerd", "{inspected}");
    assert_eq!(c["runtime"], cp["runtime"]["path"], "{inspected}");
    assert!(c["checkpoint_size"]["memory_pages_size"].as_u64().unwrap() > 0, "{inspected}");
    assert!(c["checkpoint_size"]["root_fs_diff_size"].as_u64().unwrap() > 0, "{inspected}");
    assert!(c["statistics"]["pages_written"].as_u64().unwrap() > 0, "{inspected}");
    assert!(c["statistics"]["frozen_time"].as_u64().unwrap() > 0, "{inspected}");
    // The counter: `sh -c 'while ...; do ... usleep ...'`, CRIU's pid 1 in the container.
    assert_eq!(c["process_tree"]["pid"], 1, "{inspected}");
    assert_eq!(c["process_tree"]["command"], "sh", "{inspected}");
    let mounts: Vec<&str> = c["mounts"].as_array().unwrap().iter().filter_map(|m| m["destination"].as_str()).collect();
    assert!(mounts.contains(&"/proc") && mounts.contains(&"/dev"), "{inspected}");

    // checkpointctl reads zstd-compressed archives too (Podman exports zstd by default), and
    // `kybernate import` reads back a compressed archive of real CRIU images.
    let zst = dir.path().join(format!("{id}.tar.zst"));
    let cp_id = cp["id"].as_str().unwrap();
    let exported = bed.kybernate(&["-o", "json", "export", "--compress", "zstd", cp_id, zst.to_str().unwrap()]);
    assert_exit_ok(&exported);
    assert_eq!(json(&exported)["archive"]["compression"], "zstd");
    let out = Command::new(CHECKPOINTCTL).arg("show").arg(&zst).output().unwrap();
    assert!(out.status.success() && text(&out.stdout).contains(&id[..12]), "checkpointctl .tar.zst: {}", show(&out));
    assert_exit_ok(&bed.kybernate(&["rm", cp_id]));
    let imported = bed.kybernate(&["-o", "json", "import", zst.to_str().unwrap()]);
    assert_exit_ok(&imported);
    assert_exit_ok(&bed.kybernate(&["inspect", json(&imported)["id"].as_str().unwrap()]));
    bed.remove(&id);
}

#[test]
fn checkpoint_refuses_what_it_cannot_checkpoint() {
    let bed = bed();
    let missing = unique_name("nope");
    assert_exit(&bed.kybernate(&["checkpoint", &missing]), 2, &["not found", &missing]);

    let runc = unique_name("runc");
    bed.run_counter(&runc, "io.containerd.runc.v2");
    // The stock runc shim would write a plain runc checkpoint, without a manifest: refused, and
    // the error names it (a runc runtime whose runtime_path is our shim is accepted:
    // shim/tests/cri.rs, kubelet_pods_on_a_containerd_2_node_the_installer_set_up_in_style_b).
    let stock = ["io.containerd.runc.v2", "served by containerd-shim-runc-v2", RUNTIME];
    assert_exit(&bed.kybernate(&["checkpoint", &runc]), 2, &stock);
    assert!(!bed.store.join(bed.tb.namespace()).join(&runc).exists(), "nothing may be written for {runc}");

    // Without -n: CONTAINERD_NAMESPACE, else k8s.io when containerd has it (a Kubernetes node), else default.
    let no_ns = |env_ns: Option<&str>| {
        let mut cmd = Command::new(KYBERNATE);
        cmd.arg("--address").arg(bed.tb.address()).arg("--config").arg(&bed.config).args(["checkpoint", &runc]);
        cmd.env_remove("CONTAINERD_NAMESPACE").env_remove("KYBERNATE_CONFIG");
        if let Some(ns) = env_ns {
            cmd.env("CONTAINERD_NAMESPACE", ns);
        }
        cmd.output().unwrap()
    };
    assert_exit(&no_ns(None), 2, &["not found", "\"default\""]);
    bed.tb.ctr_ok(&["namespaces", "create", "k8s.io"]);
    assert_exit(&no_ns(None), 2, &["not found", "\"k8s.io\""]);
    assert_exit(&no_ns(Some(bed.tb.namespace())), 2, &stock);
    bed.tb.ctr_ok(&["namespaces", "remove", "k8s.io"]);

    let out = Command::new(KYBERNATE)
        .args(["--address", "/nonexistent.sock", "--config"])
        .arg(&bed.config)
        .args(["checkpoint", &runc])
        .output()
        .unwrap();
    assert_exit(&out, 1, &["cannot reach containerd at /nonexistent.sock", "is containerd running?"]);
    bed.remove(&runc);
}
