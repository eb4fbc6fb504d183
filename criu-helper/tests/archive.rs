//! Export/import round trips, and archives that must be refused.

use std::collections::BTreeMap;
use std::fs;
use std::path::Path;

use kybernate_criu::manifest::{FORMAT_VERSION, MANIFEST_FILE};
use kybernate_criu::{export, import, ArchiveError, CheckpointFlags, Manifest, PartialCheckpoint, Store, ToolInfo};

fn checkpoint(target: &Path) -> Manifest {
    let p = PartialCheckpoint::begin(target).unwrap();
    fs::write(p.images_dir().join("inventory.img"), b"inventory").unwrap();
    fs::write(p.images_dir().join("pages-1.img"), vec![0xabu8; 300_000]).unwrap();
    fs::write(p.dir().join("config.dump"), br#"{"id":"c1"}"#).unwrap();
    fs::write(p.dir().join("spec.dump"), b"{}").unwrap();
    let m = Manifest {
        format_version: FORMAT_VERSION,
        namespace: "k8s.io".into(),
        container_id: "c1".into(),
        pod_namespace: Some("team-a".into()),
        pod_name: Some("web-0".into()),
        container_name: Some("web".into()),
        image: Some("nginx:1".into()),
        runtime: ToolInfo { path: "/usr/bin/runc".into(), version: "runc version 1.2.5".into() },
        criu: ToolInfo { path: "/usr/sbin/criu".into(), version: "4.1.1".into() },
        kernel: "6.1.0".into(),
        host: "node-1".into(),
        created: "2026-11-23T21:25:01Z".into(),
        options: CheckpointFlags { open_tcp: true, ..Default::default() },
        rootfs_diff: false,
        duration_ms: 5,
        files: BTreeMap::new(),
        gpu: Some(kybernate_criu::gpu::GpuRecord {
            mode: kybernate_criu::gpu::GpuMode::DriverApi,
            processes: vec![],
            gpus: vec![],
            driver_version: Some("580.65.06".into()),
            cuda_driver_version: Some("12.8".into()),
            bytes_per_gpu: BTreeMap::new(),
            bytes_total: 0,
            phases_ms: BTreeMap::new(),
            devices: Default::default(),
        }),
        flat: false,
    };
    p.commit(m).unwrap()
}

fn entries(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> =
        fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
    v.sort();
    v
}

#[test]
fn export_import_round_trip() {
    let d = tempfile::tempdir().unwrap();
    let m = checkpoint(&d.path().join("src/ns/c1/t1"));
    let out = d.path().join("c1.tar");
    assert_eq!(export(&d.path().join("src/ns/c1/t1"), &out).unwrap(), m);
    assert_eq!(entries(d.path()), ["c1.tar", "src"], "temp file left behind");

    // The checkpointctl layout: files at the archive root.
    let mut names: Vec<String> = tar::Archive::new(fs::File::open(&out).unwrap())
        .entries()
        .unwrap()
        .map(|e| e.unwrap().path().unwrap().display().to_string())
        .collect();
    names.sort();
    let want = [
        "checkpoint/",
        "checkpoint/inventory.img",
        "checkpoint/pages-1.img",
        "config.dump",
        MANIFEST_FILE,
        "spec.dump",
    ];
    assert_eq!(names, want);

    let store = Store::new(d.path().join("store"));
    let (path, imported) = import(&out, &store).unwrap();
    assert_eq!(imported, m);
    assert_eq!(path, store.root().join("k8s.io/c1/20261123T212501.000Z"));
    assert_eq!(kybernate_criu::verify(&path).unwrap(), m);
    assert_eq!(entries(store.root()), ["k8s.io"]);

    // Importing again does not overwrite: it lands at "now".
    let (again, _) = import(&out, &store).unwrap();
    assert_ne!(again, path);
    assert_eq!(again.parent(), path.parent());
}

#[test]
fn tampered_archive_is_refused_and_leaves_nothing() {
    let d = tempfile::tempdir().unwrap();
    checkpoint(&d.path().join("cp"));
    let out = d.path().join("c1.tar");
    export(&d.path().join("cp"), &out).unwrap();
    let mut bytes = fs::read(&out).unwrap();
    // Flip a byte inside the page image's data (the only run of 0xab bytes).
    let at = bytes.windows(64).position(|w| w.iter().all(|&b| b == 0xab)).unwrap() + 1000;
    bytes[at] ^= 0xff;
    let tampered = d.path().join("tampered.tar");
    fs::write(&tampered, &bytes).unwrap();

    let store = Store::new(d.path().join("store"));
    let err = import(&tampered, &store).unwrap_err();
    assert!(matches!(&err, ArchiveError::Verify { .. }), "{err}");
    let msg = err.to_string();
    assert!(
        msg.contains("tampered.tar") && msg.contains("checkpoint/pages-1.img") && msg.contains("checksum"),
        "{msg}"
    );
    assert!(entries(store.root()).is_empty(), "{:?}", entries(store.root()));

    // Truncated in the middle of the page image.
    let truncated = d.path().join("truncated.tar");
    fs::write(&truncated, &bytes[..at]).unwrap();
    let err = import(&truncated, &store).unwrap_err();
    assert!(err.to_string().contains("truncated.tar"), "{err}");
    assert!(entries(store.root()).is_empty());
}

fn raw_entry(b: &mut tar::Builder<Vec<u8>>, name: &str, kind: tar::EntryType, data: &[u8]) {
    let mut h = tar::Header::new_gnu();
    // Raw name: set_path refuses "..", which is what is being tested.
    h.as_gnu_mut().unwrap().name[..name.len()].copy_from_slice(name.as_bytes());
    h.set_entry_type(kind);
    h.set_size(data.len() as u64);
    h.set_mode(0o600);
    if kind == tar::EntryType::Symlink {
        h.set_link_name("/etc/passwd").unwrap();
    }
    h.set_cksum();
    b.append(&h, data).unwrap();
}

#[test]
fn unsafe_entries_are_refused() {
    let d = tempfile::tempdir().unwrap();
    let store = Store::new(d.path().join("store"));
    let cases = [
        ("../evil", tar::EntryType::Regular, "'..'"),
        ("checkpoint/../../evil", tar::EntryType::Regular, "'..'"),
        ("/evil", tar::EntryType::Regular, "absolute"),
        ("checkpoint/link", tar::EntryType::Symlink, "symlinks"),
        ("checkpoint/dev", tar::EntryType::Char, "only directories and regular files"),
    ];
    for (name, kind, reason) in cases {
        let mut b = tar::Builder::new(Vec::new());
        raw_entry(&mut b, "config.dump", tar::EntryType::Regular, b"{}");
        raw_entry(&mut b, name, kind, if kind == tar::EntryType::Regular { b"x" } else { b"" });
        let archive = d.path().join("bad.tar");
        fs::write(&archive, b.into_inner().unwrap()).unwrap();
        let err = import(&archive, &store).unwrap_err();
        assert!(matches!(&err, ArchiveError::Entry { entry, .. } if entry == name), "{name}: {err}");
        assert!(err.to_string().contains(reason), "{err}");
        assert!(entries(store.root()).is_empty());
        assert!(!d.path().join("evil").exists());
    }
}

#[test]
fn export_refuses_an_invalid_checkpoint() {
    let d = tempfile::tempdir().unwrap();
    let cp = d.path().join("cp");
    checkpoint(&cp);
    fs::write(cp.join("extra"), b"x").unwrap();
    let out = d.path().join("x.tar");
    let err = export(&cp, &out).unwrap_err();
    assert!(matches!(&err, ArchiveError::Verify { .. }), "{err}");
    assert!(err.to_string().contains("extra"), "{err}");
    assert!(!out.exists());
}
