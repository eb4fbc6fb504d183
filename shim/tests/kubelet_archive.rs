//! A kubelet checkpoint taken WITHOUT Kybernate restores on a Kybernate node: containerd 2.1's
//! CRI `CheckpointContainer` (what `kubectl`'s checkpoint API and `crictl checkpoint --export`
//! call) checkpoints a counter that runs under the stock runc handler, so the archive holds no
//! manifest of ours; `kybernate import` (the CLI binary) checks it and generates one; a pod under
//! our handler with `kybernate.io/restore-from` comes up restored from the store. One containerd
//! 2.x test bed serves both handlers; the refusals ride along on the same archive.
//!
//! Needs the `kybernate` binary beside the shim's (`cargo build -p kybernate-cli`; `cargo test
//! --workspace` builds it).

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use k8s_cri::v1::ContainerState;
use kybernate_testbed::Containerd;

mod common;

use common::ckpt::COUNTER;
use common::cri::*;
use common::{text, wait_for, SHIM};

/// The CLI binary of the same build as the shim.
fn kybernate_binary() -> PathBuf {
    let bin = Path::new(SHIM).with_file_name("kybernate");
    assert!(bin.is_file(), "{} not found: build it first: cargo build -p kybernate-cli", bin.display());
    bin
}

/// `kybernate --config CONFIG ARGS`, with nothing of the caller's environment steering it.
fn kybernate(config: &Path, args: &[&str]) -> Output {
    let out = Command::new(kybernate_binary())
        .arg("--config")
        .arg(config)
        .args(args)
        .env_remove("CONTAINERD_NAMESPACE")
        .env_remove("KYBERNATE_CONFIG")
        .output()
        .expect("running kybernate");
    eprintln!("kybernate {args:?}: {}\nstdout:\n{}stderr:\n{}", out.status, text(&out.stdout), text(&out.stderr));
    out
}

fn counter(cri: &Cri, id: &str) -> Option<u64> {
    let r = cri.exec(id, &["cat", "/tmp/counter"]).ok()?;
    (r.exit_code == 0).then(|| text(&r.stdout).trim().parse().ok()).flatten()
}

/// What the store's root holds: namespaces of checkpoints, or an import's leftover work dir.
fn store_entries(store: &Path) -> Vec<String> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(store).into_iter().flatten().flatten() {
        out.push(e.file_name().to_string_lossy().into_owned());
    }
    out
}

#[test]
fn a_kubelet_archive_of_runcs_handler_is_imported_and_restored_through_our_shim() {
    let b = cri_bed_with(Style::RuntimeType, Setup { containerd: Containerd::V2, ..Setup::default() });
    let config = b.store.parent().expect("the store's dir").join("kybernate.toml");

    // The counter under the stock runc handler: Kybernate takes no part in its checkpoint.
    let pod_config = pod_config(&b.tb, "default", &[]);
    let pod_id = b.cri.run_pod_on(&pod_config, "runc").unwrap_or_else(|e| panic!("RunPodSandbox (runc): {e}"));
    let pod = Pod { id: pod_id, config: pod_config };
    let shim_binary =
        std::fs::read_to_string(b.tb.cri_bundle_dir(&pod.id).join("shim-binary-path")).unwrap_or_default();
    assert!(shim_binary.trim().ends_with("/containerd-shim-runc-v2"), "the runc pod runs on {shim_binary}");
    let id = b.run(&pod, "counter", &["sh", "-c", COUNTER], &[]);
    wait_for("the counter to reach 3", || counter(&b.cri, &id).filter(|&n| n >= 3));
    let r = b.cri.exec(&id, &["sh", "-c", "echo kept > /data.txt"]).expect("ExecSync");
    assert_eq!(r.exit_code, 0, "writing /data.txt: {}", text(&r.stderr));

    let archive = b.tb.dir().join("checkpoint-counter.tar");
    let before = counter(&b.cri, &id).expect("counter before the checkpoint");
    b.cri.checkpoint(&id, &archive).unwrap_or_else(|e| panic!("CheckpointContainer: {e}\n{}", b.tb.log_tail(30)));
    let listing = Command::new("tar").arg("-tf").arg(&archive).output().expect("tar -tf");
    let entries = text(&listing.stdout);
    for want in ["checkpoint/inventory.img", "config.dump", "spec.dump", "rootfs-diff.tar"] {
        assert!(entries.lines().any(|l| l == want), "no {want} in the archive:\n{entries}");
    }
    assert!(!entries.contains("kybernate.json"), "a manifest of ours in runc's archive:\n{entries}");
    assert_eq!(b.cri.status(&id).expect("ContainerStatus").state, ContainerState::ContainerRunning as i32);
    b.cri.stop(&id, 0).expect("StopContainer");
    b.cri.remove(&id).expect("RemoveContainer");
    b.cri.stop_pod(&pod.id).expect("StopPodSandbox");
    b.cri.remove_pod(&pod.id).expect("RemovePodSandbox");

    // Refused, nothing left: the real archive repacked without CRIU's inventory ...
    let unpacked = b.tb.dir().join("unpacked");
    std::fs::create_dir(&unpacked).expect("a dir to unpack into");
    let tar = |args: &[&std::ffi::OsStr]| {
        let out = Command::new("tar").args(args).output().expect("running tar");
        assert!(out.status.success(), "tar {args:?}: {}", text(&out.stderr));
    };
    tar(&["-xf".as_ref(), archive.as_ref(), "-C".as_ref(), unpacked.as_ref()]);
    std::fs::remove_file(unpacked.join("checkpoint/inventory.img")).expect("removing inventory.img");
    let broken = b.tb.dir().join("no-inventory.tar");
    tar(&["-cf".as_ref(), broken.as_ref(), "-C".as_ref(), unpacked.as_ref(), ".".as_ref()]);
    let out = kybernate(&config, &["import", broken.to_str().unwrap()]);
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("\"checkpoint/inventory.img\"") && err.contains("nothing was imported"), "{err}");
    assert!(store_entries(&b.store).is_empty(), "{:?}", store_entries(&b.store));

    // ... and the archive itself on a node that requires signatures: a kubelet archive has none.
    let keys = kybernate_checkpoint::signing::write_key_pair(&b.tb.dir().join("keys"), false).expect("a key pair");
    let strict = b.tb.dir().join("strict.toml");
    let strict_config =
        format!("[checkpoint]\nroot = \"{}\"\n[trust]\nkeys = [\"{}\"]\n", b.store.display(), keys.public.display());
    std::fs::write(&strict, strict_config).expect("writing the strict config");
    let out = kybernate(&strict, &["import", archive.to_str().unwrap()]);
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("trust policy") && err.contains("never signed") && err.contains("not signed"), "{err}");
    assert!(err.contains(&keys.key_id) && err.contains("require_signature = false"), "{err}");
    assert!(store_entries(&b.store).is_empty(), "{:?}", store_entries(&b.store));

    // Imported: a generated manifest, marked as imported.
    let out = kybernate(&config, &["-o", "json", "import", archive.to_str().unwrap()]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let cp: serde_json::Value = serde_json::from_slice(&out.stdout).expect("import's JSON");
    let reference = cp["id"].as_str().expect("the checkpoint's id").to_string();
    assert!(reference.starts_with(&format!("k8s.io/{id}/")), "{cp}");
    assert_eq!(
        (cp["pod_namespace"].as_str(), cp["container_name"].as_str()),
        (Some("default"), Some("counter")),
        "{cp}"
    );
    assert_eq!(cp["status"], "ok", "{cp}");
    let dir = b.store.join(&reference);
    let manifest = kybernate_checkpoint::verify(&dir).expect("the imported checkpoint verifies");
    assert!(manifest.rootfs_diff && !manifest.flat && manifest.gpu.is_none(), "{manifest:?}");
    assert!(manifest.files.contains_key("checkpoint/inventory.img") && manifest.files.contains_key("spec.dump"));
    assert!(manifest.criu.version.starts_with('4'), "CRIU's version from dump.log: {:?}", manifest.criu);
    let origin = kybernate_checkpoint::read_origin(&dir).expect("the origin marker");
    assert!(matches!(origin, Some(kybernate_checkpoint::Origin::Import { .. })), "{origin:?}");

    // Restored through our shim by the pod annotation: the counter goes on, the file is back.
    let pod = b.run_pod("default", &[(RESTORE_ANNOTATION, &reference)]).expect("RunPodSandbox (kybernate)");
    let restored = b.run(&pod, "counter", &["sh", "-c", COUNTER], &[]);
    let first = wait_for("the restored counter", || counter(&b.cri, &restored));
    assert!(first >= before, "the counter restarted: {first} after a checkpoint at {before}");
    wait_for("the restored counter to advance", || counter(&b.cri, &restored).filter(|&n| n >= first + 3));
    let r = b.cri.exec(&restored, &["cat", "/data.txt"]).expect("ExecSync");
    assert_eq!((r.exit_code, text(&r.stdout)), (0, "kept\n".to_string()), "the rootfs diff was not applied");
    let log = std::fs::read_to_string(b.tb.log_path()).expect("containerd log");
    assert!(
        log.lines().any(|l| l.contains(&format!("container {restored}: restoring from")) && l.contains(&reference)),
        "our shim did not restore {restored}:\n{}",
        b.tb.log_tail(30)
    );
    b.cri.stop_pod(&pod.id).expect("StopPodSandbox");
    b.cri.remove_pod(&pod.id).expect("RemovePodSandbox");
    b.assert_nothing_left(&[&restored, &pod.id]);
}
