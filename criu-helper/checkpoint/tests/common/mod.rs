//! Checkpoints written with the library for tests (no CRIU: fake images), and the archives that
//! other tools write: shared by this crate's tests and the CLI's (`kybernate-cli`'s
//! tests/common/mod.rs includes this file).

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use kybernate_checkpoint::manifest::FORMAT_VERSION;
use kybernate_checkpoint::{CheckpointFlags, Manifest, PartialCheckpoint, Store, ToolInfo};

/// A manifest as the shim would write it for `ns/container` at `at` (`files` is filled by commit).
pub fn fake_manifest(ns: &str, container: &str, at: SystemTime) -> Manifest {
    Manifest {
        format_version: FORMAT_VERSION,
        namespace: ns.into(),
        container_id: container.into(),
        pod_namespace: Some("team-a".into()),
        pod_name: Some(format!("{container}-0")),
        container_name: Some("app".into()),
        image: Some("docker.io/library/busybox:1".into()),
        runtime: ToolInfo { path: "/usr/bin/runc".into(), version: "runc version 1.2.5".into() },
        criu: ToolInfo { path: "/usr/sbin/criu".into(), version: "4.2".into() },
        kernel: "6.1.0".into(),
        host: "node-1".into(),
        created: humantime::format_rfc3339_seconds(at).to_string(),
        options: CheckpointFlags { open_tcp: true, ..Default::default() },
        rootfs_diff: false,
        duration_ms: 42,
        frozen_ms: None,
        dump_stats: None,
        digest: None, // set by commit
        files: BTreeMap::new(),
        gpu: None,
        flat: false,
        needs: None,
    }
}

/// A committed checkpoint of `ns/container` taken at `at`, written with the library (no CRIU:
/// a fake inventory and pages image); returns its id.
pub fn fake_checkpoint(store: &Store, ns: &str, container: &str, at: SystemTime) -> String {
    fake_checkpoint_with(store, fake_manifest(ns, container, at), at)
}

/// [`fake_checkpoint`] with a manifest of the caller's (e.g. with a GPU record).
pub fn fake_checkpoint_with(store: &Store, manifest: Manifest, at: SystemTime) -> String {
    let target = store.new_checkpoint_path(&manifest.namespace, &manifest.container_id, at).unwrap();
    let p = PartialCheckpoint::begin(&target).unwrap();
    std::fs::write(p.images_dir().join("inventory.img"), b"inventory").unwrap();
    std::fs::write(p.images_dir().join("pages-1.img"), vec![7u8; 50_000]).unwrap();
    std::fs::write(p.dir().join(kybernate_checkpoint::SPEC_DUMP), b"{\"ociVersion\": \"1.0.2\"}").unwrap();
    p.commit(manifest).unwrap();
    target.strip_prefix(store.root()).unwrap().to_str().unwrap().to_string()
}

/// The rootfs diff containerd 2.x's CRI writes: a gzipped OCI layer, deletions as `.wh.` files.
pub fn oci_layer(entries: &[(&str, &[u8])]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for (path, data) in entries {
        let mut h = tar::Header::new_gnu();
        h.set_mode(0o644);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(1_700_000_000);
        h.set_size(data.len() as u64);
        b.append_data(&mut h, path, *data).unwrap();
    }
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    std::io::Write::write_all(&mut gz, &b.into_inner().unwrap()).unwrap();
    gz.finish().unwrap()
}

/// A kubelet/crictl archive as containerd 2.1 writes it from our shim's flat checkpoint: CRIU's
/// images and the shim's manifest in `checkpoint/`, CRI's files beside them. `images` may change
/// the flat checkpoint's files after the shim recorded them; `root` adds or replaces root files.
pub fn kubelet_archive(dir: &Path, images: impl FnOnce(&Path), root: &[(&str, Vec<u8>)]) -> PathBuf {
    let flat = dir.join("ctrd-checkpoint");
    let p = PartialCheckpoint::begin_flat(&flat).unwrap();
    std::fs::write(p.images_dir().join("inventory.img"), b"inventory").unwrap();
    std::fs::write(p.images_dir().join("pages-1.img"), vec![0xabu8; 300_000]).unwrap();
    let mut m = fake_manifest("k8s.io", "abc123", SystemTime::UNIX_EPOCH + Duration::from_secs(1_795_498_121));
    m.pod_namespace = Some("default".into());
    p.commit(m).unwrap();
    images(&flat);

    fn add(files: &mut BTreeMap<String, Vec<u8>>, dir: &Path, prefix: &str) {
        for e in std::fs::read_dir(dir).unwrap().flatten() {
            let name = format!("{prefix}/{}", e.file_name().to_str().unwrap());
            if e.path().is_dir() {
                add(files, &e.path(), &name);
            } else {
                files.insert(name, std::fs::read(e.path()).unwrap());
            }
        }
    }
    let mut files = BTreeMap::new();
    add(&mut files, &flat, "checkpoint");
    files.insert("config.dump".into(), br#"{"id":"abc123","name":"counter","rootfsImageRef":"r@sha256:1"}"#.to_vec());
    files.insert("spec.dump".into(), br#"{"ociVersion":"1.2.1"}"#.to_vec());
    files.insert("status.dump".into(), br#"{"id":"abc123","state":1}"#.to_vec());
    files.insert("status".into(), br#"{"Version":"v1"}"#.to_vec());
    files.insert("container.log".into(), Vec::new());
    files.insert(
        "rootfs-diff.tar".into(),
        oci_layer(&[("data.txt", b"kept\n"), ("etc/.wh.gone", b""), ("tmp/counter", b"42")]),
    );
    for (name, data) in root {
        files.insert(name.to_string(), data.clone());
    }
    let mut b = tar::Builder::new(Vec::new());
    for (name, data) in &files {
        let mut h = tar::Header::new_gnu();
        h.set_mode(0o600);
        h.set_size(data.len() as u64);
        b.append_data(&mut h, name, &data[..]).unwrap();
    }
    let archive = dir.join("checkpoint-counter_default-counter-2026-11-24T05:28:41Z.tar");
    std::fs::write(&archive, b.into_inner().unwrap()).unwrap();
    std::fs::remove_dir_all(&flat).unwrap();
    archive
}
