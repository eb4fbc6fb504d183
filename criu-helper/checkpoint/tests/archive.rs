//! Export/import round trips, and archives that must be refused.

use std::collections::BTreeMap;
use std::fs;
use std::path::Path;

use kybernate_checkpoint::manifest::{FORMAT_VERSION, MANIFEST_FILE};
use kybernate_checkpoint::{
    export, import, ArchiveError, CheckpointFlags, Manifest, PartialCheckpoint, Store, ToolInfo,
};

mod common;

use common::{kubelet_archive, oci_layer};

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
        frozen_ms: None,
        dump_stats: None,
        digest: None, // set by commit
        files: BTreeMap::new(),
        gpu: Some(kybernate_gpu::GpuRecord {
            mode: kybernate_gpu::GpuMode::DriverApi,
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
    assert_eq!(kybernate_checkpoint::verify(&path).unwrap(), m);
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

// ---------------------------------------------------------------------------------------------
// kubelet/crictl archives (containerd 2.x's CRI CheckpointContainer through our shim)

#[test]
fn a_kubelet_archive_taken_through_our_shim_is_imported_as_a_checkpoint_of_the_store() {
    let d = tempfile::tempdir().unwrap();
    let archive = kubelet_archive(d.path(), |_| {}, &[]);
    let store = Store::new(d.path().join("store"));
    let (path, m) = import(&archive, &store).unwrap();

    assert_eq!(path.parent().unwrap(), store.root().join("k8s.io/abc123"));
    assert_eq!((m.tenant(), m.flat, m.rootfs_diff), ("default", false, true));
    assert_eq!(kybernate_checkpoint::verify(&path).unwrap(), m, "the store's checkpoint does not verify");
    let listed: Vec<&str> = m.files.keys().map(String::as_str).collect();
    assert_eq!(
        listed,
        [
            "checkpoint/inventory.img",
            "checkpoint/pages-1.img",
            "config.dump",
            "container.log",
            "rootfs-diff.tar",
            "spec.dump",
            "status",
            "status.dump"
        ]
    );
    assert!(!path.join("checkpoint").join(MANIFEST_FILE).exists(), "the shim's flat manifest stays behind");

    // The diff is ours now: plain tar, the deletion a whiteout the restore applies.
    let rootfs = d.path().join("rootfs");
    fs::create_dir_all(rootfs.join("etc")).unwrap();
    fs::write(rootfs.join("etc/gone"), b"old").unwrap();
    kybernate_checkpoint::apply_rootfs_diff(&path.join("rootfs-diff.tar"), &rootfs).unwrap();
    assert_eq!(fs::read_to_string(rootfs.join("data.txt")).unwrap(), "kept\n");
    assert_eq!(fs::read_to_string(rootfs.join("tmp/counter")).unwrap(), "42");
    assert!(!rootfs.join("etc/gone").exists() && !rootfs.join("etc/.wh.gone").exists());

    // The imported checkpoint exports and imports like any other.
    let out = d.path().join("again.tar");
    assert_eq!(export(&path, &out).unwrap(), m);
    let (again, m2) = import(&out, &store).unwrap();
    assert_eq!((m2, again.parent()), (m, path.parent()));
}

#[test]
fn kubelet_archives_we_cannot_vouch_for_are_refused_and_leave_nothing() {
    let d = tempfile::tempdir().unwrap();
    let store = Store::new(d.path().join("store"));
    let refused = |archive: &Path| {
        let err = import(archive, &store).unwrap_err();
        let left: Vec<_> =
            fs::read_dir(store.root()).map(|r| r.flatten().map(|e| e.path()).collect()).unwrap_or_default();
        assert!(left.is_empty(), "{err}: left {left:?}");
        err
    };

    // An image changed after the shim recorded it.
    let archive =
        kubelet_archive(d.path(), |flat| fs::write(flat.join("pages-1.img"), vec![0xacu8; 300_000]).unwrap(), &[]);
    let err = refused(&archive);
    assert!(matches!(&err, ArchiveError::Verify { .. }) && err.to_string().contains("pages-1.img"), "{err}");

    // Taken through another runtime (the stock runc shim, CRI-O): no manifest of ours.
    let archive = kubelet_archive(d.path(), |flat| fs::remove_file(flat.join(MANIFEST_FILE)).unwrap(), &[]);
    let err = refused(&archive);
    assert!(matches!(&err, ArchiveError::CriArchive { .. }), "{err}");
    assert!(err.to_string().contains("not taken through the Kybernate shim"), "{err}");

    // A manifest in checkpoint/ that is not the shim's flat one.
    let archive = kubelet_archive(
        d.path(),
        |flat| {
            let mut m = kybernate_checkpoint::read_manifest(flat).unwrap();
            m.flat = false;
            m.files = BTreeMap::from([("checkpoint/inventory.img".into(), m.files["inventory.img"].clone())]);
            fs::create_dir(flat.join("checkpoint")).unwrap();
            fs::rename(flat.join("inventory.img"), flat.join("checkpoint/inventory.img")).unwrap();
            fs::remove_file(flat.join("pages-1.img")).unwrap();
            fs::write(flat.join(MANIFEST_FILE), serde_json::to_vec(&m).unwrap()).unwrap();
        },
        &[],
    );
    let err = refused(&archive);
    assert!(matches!(&err, ArchiveError::Entry { entry, .. } if entry == "checkpoint/kybernate.json"), "{err}");
    assert!(err.to_string().contains("flat"), "{err}");

    // A rootfs diff with an opaque marker for a directory it does not carry.
    let diff = oci_layer(&[("data.txt", b"x"), ("var/.wh..wh..opq", b"")]);
    let archive = kubelet_archive(d.path(), |_| {}, &[("rootfs-diff.tar", diff)]);
    let err = refused(&archive);
    assert!(matches!(&err, ArchiveError::RootfsDiff { .. }) && err.to_string().contains("opaque"), "{err}");
}

// ---------------------------------------------------------------------------------------------
// zstd-compressed archives (`kybernate export --compress zstd`)

use kybernate_checkpoint::archive::{export_with, import_with, Compression, Step, ZSTD_MAGIC};

fn export_zstd(cp: &Path, out: &Path) -> Vec<Step> {
    let mut steps = Vec::new();
    export_with(cp, out, Compression::Zstd, &mut |s| steps.push(s)).unwrap();
    steps
}

#[test]
fn a_zstd_export_round_trips_and_is_known_by_its_magic() {
    let d = tempfile::tempdir().unwrap();
    let cp = d.path().join("src/ns/c1/t1");
    let m = checkpoint(&cp);
    let (plain, packed) = (d.path().join("c1.tar"), d.path().join("c1.tar.zst"));
    export(&cp, &plain).unwrap();
    let steps = export_zstd(&cp, &packed);
    assert_eq!(steps.first(), Some(&Step::Verify), "{steps:?}");
    let Some(Step::Copy { done, total }) = steps.last().copied() else { panic!("{steps:?}") };
    assert_eq!(done, fs::metadata(&plain).unwrap().len(), "the whole tar went through the encoder");
    assert!(total >= done);
    let bytes = fs::read(&packed).unwrap();
    assert_eq!(bytes[..4], ZSTD_MAGIC);
    assert!(bytes.len() * 20 < fs::metadata(&plain).unwrap().len() as usize, "0xab pages compress");
    assert_eq!(entries(d.path()), ["c1.tar", "c1.tar.zst", "src"], "temp file left behind");

    let store = Store::new(d.path().join("store"));
    let mut steps = Vec::new();
    let (path, imported) = import_with(&packed, &store, &mut |s| steps.push(s)).unwrap();
    assert_eq!(imported, m);
    assert_eq!(kybernate_checkpoint::verify(&path).unwrap(), m);
    assert!(steps.contains(&Step::Copy { done: bytes.len() as u64, total: bytes.len() as u64 }), "{steps:?}");
    assert_eq!(steps.last(), Some(&Step::Verify));
    // The plain tar still imports, through the same call.
    let (again, _) = import(&plain, &store).unwrap();
    assert_eq!(kybernate_checkpoint::verify(&again).unwrap(), m);
}

/// Imports `bytes` as `name`; the error, after checking that nothing was left in the store.
fn refused(d: &Path, name: &str, bytes: &[u8]) -> ArchiveError {
    let archive = d.join(name);
    fs::write(&archive, bytes).unwrap();
    let store = Store::new(d.join("store"));
    let err = import(&archive, &store).unwrap_err();
    assert!(err.to_string().contains(name), "names the archive: {err}");
    assert!(entries(store.root()).is_empty(), "{name}: {:?}", entries(store.root()));
    err
}

#[test]
fn damaged_zstd_streams_are_refused_naming_where_and_leave_nothing() {
    let d = tempfile::tempdir().unwrap();
    let cp = d.path().join("cp");
    checkpoint(&cp);
    let packed = d.path().join("c1.tar.zst");
    export_zstd(&cp, &packed);
    let bytes = fs::read(&packed).unwrap();

    // Cut in the middle of the stream.
    let err = refused(d.path(), "truncated.tar.zst", &bytes[..bytes.len() / 2]);
    assert!(matches!(&err, ArchiveError::Compressed { .. }), "{err}");
    assert!(err.to_string().contains("truncated: the archive ends inside a zstd frame"), "{err}");
    // Cut in the frame's last bytes (its checksum), after the whole tar came out.
    let err = refused(d.path(), "short.tar.zst", &bytes[..bytes.len() - 2]);
    assert!(matches!(&err, ArchiveError::Compressed { .. }), "{err}");

    // The magic, then garbage.
    let mut garbage = ZSTD_MAGIC.to_vec();
    garbage.extend((0..4096u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8));
    let err = refused(d.path(), "garbage.tar.zst", &garbage);
    assert!(matches!(&err, ArchiveError::Compressed { .. }), "{err}");
    assert!(err.to_string().contains("corrupt zstd stream near byte"), "{err}");

    // A complete stream with bytes after it that are no zstd frame.
    let mut trailing = bytes.clone();
    trailing.extend_from_slice(b"not a frame, but appended by someone");
    let err = refused(d.path(), "trailing.tar.zst", &trailing);
    assert!(matches!(&err, ArchiveError::Compressed { .. }), "{err}");

    // A flipped byte in the middle: zstd's block decoding or its frame checksum catches it, or
    // else the tar or the manifest's hashes do; never an import.
    let mut flipped = bytes.clone();
    let at = flipped.len() / 2;
    flipped[at] ^= 0x55;
    refused(d.path(), "flipped.tar.zst", &flipped);
}

/// A zstd stream of `bytes`, one frame, compressed at level 1.
fn zstd_of(bytes: &[u8]) -> Vec<u8> {
    zstd::encode_all(bytes, 1).unwrap()
}

#[test]
fn a_zstd_archive_that_expands_past_its_manifest_is_refused_without_unpacking_it() {
    let d = tempfile::tempdir().unwrap();
    let cp = d.path().join("cp");
    checkpoint(&cp);
    // The manifest first, as `kybernate export` writes it, then a GNU long-name entry claiming
    // 2 GiB: the tar parser would read it into memory whole. 2 GiB of zeros as 2048 copies of
    // one small frame of 1 MiB (the decoder reads concatenated frames as one stream).
    let mut b = tar::Builder::new(Vec::new());
    b.append_path_with_name(cp.join(MANIFEST_FILE), MANIFEST_FILE).unwrap();
    let mut h = tar::Header::new_gnu();
    h.as_gnu_mut().unwrap().name[..13].copy_from_slice(b"././@LongLink");
    h.set_entry_type(tar::EntryType::GNULongName);
    h.set_size(2 << 30);
    h.set_mode(0o644);
    h.set_cksum();
    let mut head = b.into_inner().unwrap();
    head.extend_from_slice(h.as_bytes());
    let mut bomb = zstd_of(&head);
    let zeros = zstd_of(&vec![0u8; 1 << 20]);
    for _ in 0..2048 {
        bomb.extend_from_slice(&zeros);
    }
    assert!(bomb.len() < 1 << 20, "{} bytes", bomb.len());
    let err = refused(d.path(), "bomb.tar.zst", &bomb);
    assert!(matches!(&err, ArchiveError::Oversized { .. }), "{err}");
    assert!(err.to_string().contains("more than the files its manifest declares"), "{err}");
}

#[test]
fn an_archive_whose_manifest_declares_more_than_the_store_can_hold_is_refused() {
    let d = tempfile::tempdir().unwrap();
    let cp = d.path().join("cp");
    checkpoint(&cp);
    let mut m: serde_json::Value = serde_json::from_slice(&fs::read(cp.join(MANIFEST_FILE)).unwrap()).unwrap();
    m["files"]["checkpoint/pages-1.img"]["size"] = serde_json::json!(1u64 << 60);
    let mut b = tar::Builder::new(Vec::new());
    let text = serde_json::to_vec(&m).unwrap();
    let mut h = tar::Header::new_gnu();
    h.set_size(text.len() as u64);
    h.set_mode(0o600);
    b.append_data(&mut h, MANIFEST_FILE, text.as_slice()).unwrap();
    let tar = b.into_inner().unwrap();
    for (name, bytes) in [("huge.tar", tar.clone()), ("huge.tar.zst", zstd_of(&tar))] {
        let err = refused(d.path(), name, &bytes);
        assert!(matches!(&err, ArchiveError::NoSpace { .. }), "{name}: {err}");
        assert!(err.to_string().contains("bytes free"), "{err}");
    }
}
