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
            skipped: vec![],
            gpus: vec![],
            driver_version: Some("580.65.06".into()),
            cuda_driver_version: Some("12.8".into()),
            bytes_per_gpu: BTreeMap::new(),
            bytes_total: 0,
            phases_ms: BTreeMap::new(),
            devices: Default::default(),
        }),
        flat: false,
        needs: None,
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

    // Taken through another runtime, with images that are not CRIU's: no manifest of ours
    // vouches for them, and they do not read as a process tree.
    let archive = kubelet_archive(d.path(), |flat| fs::remove_file(flat.join(MANIFEST_FILE)).unwrap(), &[]);
    let err = refused(&archive);
    assert!(matches!(&err, ArchiveError::Entry { entry, .. } if entry == "checkpoint/inventory.img"), "{err}");
    assert!(err.to_string().contains("not CRIU's images"), "{err}");

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

// ---------------------------------------------------------------------------------------------
// kubelet/crictl/Podman archives taken WITHOUT our shim (containerd 2.x's runc handler, CRI-O)

use kybernate_checkpoint::archive::{import_opts, ImportOptions, KUBELET_ARCHIVE_NAMESPACE};
use kybernate_checkpoint::images::proto::{
    CoreEntry, CredsEntry, InventoryEntry, PstreeEntry, TaskCoreEntry, TaskKobjIdsEntry, ThreadCoreEntry,
};
use kybernate_checkpoint::images::{CORE_MAGIC, IDS_MAGIC, IMG_COMMON_MAGIC, INVENTORY_MAGIC, PSTREE_MAGIC};
use kybernate_checkpoint::{read_origin, Origin, TrustPolicy};
use prost::Message;

/// A CRIU image as CRIU frames it: the common magic (not for the inventory), the image's magic,
/// then each entry length-prefixed.
fn criu_image(magic: u32, entries: &[Vec<u8>]) -> Vec<u8> {
    let mut out = Vec::new();
    if magic != INVENTORY_MAGIC {
        out.extend_from_slice(&IMG_COMMON_MAGIC.to_le_bytes());
    }
    out.extend_from_slice(&magic.to_le_bytes());
    for e in entries {
        out.extend_from_slice(&(e.len() as u32).to_le_bytes());
        out.extend_from_slice(e);
    }
    out
}

/// The files of a kubelet archive containerd 2.1 writes for a container under runc's handler
/// (no manifest of ours): a one-process CRIU dump, CRI's dumps naming pod `team-a/web-0`, its
/// container `web`, CRIU's log, and a gzipped OCI layer as the rootfs diff.
fn runc_kubelet_files() -> BTreeMap<String, Vec<u8>> {
    let ids = TaskKobjIdsEntry { pid_ns_id: Some(1), mnt_ns_id: Some(2), ..Default::default() };
    let core = CoreEntry {
        tc: Some(TaskCoreEntry { task_state: 1, ..Default::default() }),
        thread_core: Some(ThreadCoreEntry {
            creds: Some(CredsEntry { cap_eff: vec![0, 0], ..Default::default() }),
            seccomp_mode: Some(0),
            ..Default::default()
        }),
    };
    let inventory = InventoryEntry { img_version: 2, root_ids: Some(ids.clone()), lsmtype: Some(0) };
    let pstree = PstreeEntry { pid: 1, ppid: 0, threads: vec![1] };
    let spec = serde_json::json!({
        "ociVersion": "1.2.1",
        "annotations": {
            "io.kubernetes.cri.container-type": "container",
            "io.kubernetes.cri.sandbox-namespace": "team-a",
            "io.kubernetes.cri.sandbox-name": "web-0",
            "io.kubernetes.cri.container-name": "web",
        }
    });
    let config = serde_json::json!({
        "id": "3f1c0de5",
        "name": "web_web-0_team-a_uid_0",
        "rootfsImageName": "docker.io/library/busybox:1",
        "runtime": "io.containerd.runc.v2",
        "createdTime": "2026-11-24T06:00:00.5+01:00",
        "checkpointedTime": "2026-11-24T06:28:41.123456789+01:00",
        "restoredTime": "0001-01-01T00:00:00Z",
    });
    let log = "(00.000000) Version: 4.2.1 (gitid 0)\n(00.000010) Running on node-7 Linux 6.18.0 #1 SMP x86_64\n";
    BTreeMap::from([
        ("checkpoint/inventory.img".into(), criu_image(INVENTORY_MAGIC, &[inventory.encode_to_vec()])),
        ("checkpoint/pstree.img".into(), criu_image(PSTREE_MAGIC, &[pstree.encode_to_vec()])),
        ("checkpoint/core-1.img".into(), criu_image(CORE_MAGIC, &[core.encode_to_vec()])),
        ("checkpoint/ids-1.img".into(), criu_image(IDS_MAGIC, &[ids.encode_to_vec()])),
        ("checkpoint/pages-1.img".into(), vec![0x5au8; 40_000]),
        ("checkpoint/tcp-stream-1a2b.img".into(), b"tcp".to_vec()),
        ("checkpoint/descriptors.json".into(), b"[\"/dev/null\"]".to_vec()),
        ("config.dump".into(), serde_json::to_vec(&config).unwrap()),
        ("spec.dump".into(), serde_json::to_vec(&spec).unwrap()),
        ("status.dump".into(), br#"{"id":"3f1c0de5","labels":{"io.kubernetes.pod.namespace":"team-a"}}"#.to_vec()),
        ("dump.log".into(), log.as_bytes().to_vec()),
        ("container.log".into(), Vec::new()),
        ("rootfs-diff.tar".into(), oci_layer(&[("data.txt", b"kept\n")])),
    ])
}

fn tar_of(dir: &Path, name: &str, files: &BTreeMap<String, Vec<u8>>) -> std::path::PathBuf {
    let mut b = tar::Builder::new(Vec::new());
    for (name, data) in files {
        let mut h = tar::Header::new_gnu();
        h.set_mode(0o600);
        h.set_size(data.len() as u64);
        b.append_data(&mut h, name, &data[..]).unwrap();
    }
    let archive = dir.join(name);
    fs::write(&archive, b.into_inner().unwrap()).unwrap();
    archive
}

#[test]
fn a_kubelet_archive_taken_without_our_shim_gets_a_generated_manifest() {
    let d = tempfile::tempdir().unwrap();
    let archive = tar_of(d.path(), "checkpoint-web_team-a-web-2026-11-24T05:28:41Z.tar", &runc_kubelet_files());
    let store = Store::new(d.path().join("store"));
    let (path, m) = import(&archive, &store).unwrap();

    // The checkpointed time (+01:00) in UTC; the CRI namespace, CRI's identity of the container.
    assert_eq!(path, store.root().join("k8s.io/3f1c0de5/20261124T052841.000Z"));
    assert_eq!((m.namespace.as_str(), m.container_id.as_str()), (KUBELET_ARCHIVE_NAMESPACE, "3f1c0de5"));
    assert_eq!(
        (m.pod_namespace.as_deref(), m.pod_name.as_deref(), m.container_name.as_deref()),
        (Some("team-a"), Some("web-0"), Some("web"))
    );
    assert_eq!(m.created, "2026-11-24T05:28:41Z");
    assert_eq!(
        (m.image.as_deref(), m.runtime.version.as_str()),
        (Some("docker.io/library/busybox:1"), "io.containerd.runc.v2")
    );
    assert!(m.runtime.path.as_os_str().is_empty(), "the node's own runtime restores it: {:?}", m.runtime);
    assert_eq!((m.criu.version.as_str(), m.host.as_str(), m.kernel.as_str()), ("4.2.1", "node-7", "6.18.0"));
    assert!(m.options.open_tcp, "CRIU dumped an established connection: restore needs --tcp-established");
    assert!(m.rootfs_diff && !m.flat && m.gpu.is_none(), "{m:?}");
    assert_eq!(m.format_version, FORMAT_VERSION);
    assert_eq!(m.files.len(), 13, "every file hashed: {:?}", m.files.keys());
    assert!(m.files.values().all(|f| f.blake3.is_some()));
    assert_eq!(kybernate_checkpoint::verify(&path).unwrap(), m);
    assert_eq!(read_origin(&path).unwrap(), Some(Origin::Import { archive: archive.display().to_string() }));
    let rootfs = d.path().join("rootfs");
    fs::create_dir(&rootfs).unwrap();
    kybernate_checkpoint::apply_rootfs_diff(&path.join("rootfs-diff.tar"), &rootfs).unwrap();
    assert_eq!(fs::read_to_string(rootfs.join("data.txt")).unwrap(), "kept\n");

    // Another namespace on request; a checkpointed time in the future (or none) becomes now.
    let mut files = runc_kubelet_files();
    let mut config: serde_json::Value = serde_json::from_slice(&files["config.dump"]).unwrap();
    config["checkpointedTime"] = "9999-01-01T00:00:00Z".into();
    files.insert("config.dump".into(), serde_json::to_vec(&config).unwrap());
    fs::remove_file(&archive).unwrap();
    let archive = tar_of(d.path(), "future.tar", &files);
    let opts = ImportOptions { namespace: Some("prod"), trust: None };
    let before = std::time::SystemTime::now() - std::time::Duration::from_secs(1);
    let (path, m) = import_opts(&archive, &store, &opts, &mut |_| {}).unwrap();
    assert!(path.starts_with(store.root().join("prod/3f1c0de5")), "{}", path.display());
    assert!(humantime::parse_rfc3339(&m.created).unwrap() >= before, "{}", m.created);
    let opts = ImportOptions { namespace: Some("../x"), trust: None };
    let err = import_opts(&archive, &store, &opts, &mut |_| {}).unwrap_err();
    assert!(matches!(&err, ArchiveError::BadNamespace { .. }), "{err}");
}

#[test]
fn hostile_kubelet_archives_are_refused_naming_the_entry_and_leave_nothing() {
    let d = tempfile::tempdir().unwrap();
    let store = Store::new(d.path().join("store"));
    let check = |name: &str, files: BTreeMap<String, Vec<u8>>, entry: &str, reason: &str| {
        let archive = tar_of(d.path(), name, &files);
        let err = import(&archive, &store).unwrap_err();
        assert!(matches!(&err, ArchiveError::Entry { entry: e, .. } if e == entry), "{name}: {err}");
        assert!(err.to_string().contains(reason), "{name}: {err}");
        let left: Vec<_> =
            fs::read_dir(store.root()).map(|r| r.flatten().map(|e| e.path()).collect()).unwrap_or_default();
        assert!(left.is_empty(), "{name}: left {left:?}");
    };
    type Files = BTreeMap<String, Vec<u8>>;
    let edit = |f: &dyn Fn(&mut Files)| {
        let mut files = runc_kubelet_files();
        f(&mut files);
        files
    };

    let files = edit(&|f| drop(f.remove("checkpoint/inventory.img")));
    check("no-inventory.tar", files, "checkpoint/inventory.img", "missing");
    let files = edit(&|f| drop(f.insert("checkpoint/inventory.img".into(), b"not criu".to_vec())));
    check("bad-inventory.tar", files, "checkpoint/inventory.img", "not CRIU's images");
    let files = edit(&|f| drop(f.remove("checkpoint/core-1.img")));
    check("no-core.tar", files, "checkpoint/core-1.img", "missing");
    let files = edit(&|f| drop(f.remove("spec.dump")));
    check("no-spec.tar", files, "spec.dump", "missing");
    let files = edit(&|f| drop(f.insert("config.dump".into(), br#"{"name":"x"}"#.to_vec())));
    check("no-id.tar", files, "config.dump", "no container id");
    let files = edit(&|f| drop(f.insert("config.dump".into(), br#"{"id":"../../etc"}"#.to_vec())));
    check("bad-id.tar", files, "config.dump", "container_id \"../../etc\" is not a valid");
    let files = edit(&|f| drop(f.insert("config.dump".into(), vec![b' '; 5 << 20])));
    check("huge-config.tar", files, "config.dump", "more than the 4194304");
    let spec = br#"{"annotations":{"io.kubernetes.cri.sandbox-namespace":"Team_A"}}"#.to_vec();
    let files = edit(&|f| drop(f.insert("spec.dump".into(), spec.clone())));
    check("bad-pod-namespace.tar", files, "spec.dump", "pod_namespace \"Team_A\" is not a valid");
    let status = br#"{"labels":{"io.kubernetes.container.name":"web\u001b[31m"}}"#.to_vec();
    let files = edit(&|f| {
        f.insert("spec.dump".into(), b"{}".to_vec());
        f.insert("status.dump".into(), status.clone());
    });
    check("bad-name.tar", files, "status.dump", "container_name");
    let files = edit(&|f| drop(f.insert("kybernate.origin".into(), br#"{"source":"import"}"#.to_vec())));
    check("origin.tar", files, "kybernate.origin", "must not bring one");
    let files = edit(&|f| drop(f.insert("kybernate.sig".into(), b"{}".to_vec())));
    check("sig.tar", files, "kybernate.sig", "no manifest of ours");

    // A header that claims a terabyte in a small archive: refused before anything of it is written.
    let mut b = tar::Builder::new(Vec::new());
    for (name, data) in runc_kubelet_files() {
        raw_entry(&mut b, &name, tar::EntryType::Regular, &data);
    }
    let mut h = tar::Header::new_gnu();
    h.as_gnu_mut().unwrap().name[..8].copy_from_slice(b"huge.img");
    h.set_entry_type(tar::EntryType::Regular);
    h.set_size(1 << 40);
    h.set_mode(0o600);
    h.set_cksum();
    b.append(&h, &b"x"[..]).unwrap();
    let archive = d.path().join("huge-entry.tar");
    fs::write(&archive, b.into_inner().unwrap()).unwrap();
    let err = import(&archive, &store).unwrap_err();
    assert!(matches!(&err, ArchiveError::Entry { entry, .. } if entry == "huge.img"), "{err}");
    assert!(err.to_string().contains("claims 1099511627776 bytes"), "{err}");
    assert!(fs::read_dir(store.root()).unwrap().next().is_none());
}

#[test]
fn imports_are_marked_and_checked_against_the_trust_policy() {
    let d = tempfile::tempdir().unwrap();
    let store = Store::new(d.path().join("store"));
    let keys = kybernate_checkpoint::signing::write_key_pair(&d.path().join("keys"), false).unwrap();
    let strict = TrustPolicy::load(std::slice::from_ref(&keys.public), None).unwrap();
    let lenient = TrustPolicy::load(std::slice::from_ref(&keys.public), Some(false)).unwrap();
    let empty = |store: &Store| fs::read_dir(store.root()).unwrap().next().is_none();

    // A kubelet archive is never signed: refused where signatures are required, saying why.
    let kubelet = tar_of(d.path(), "kubelet.tar", &runc_kubelet_files());
    let opts = ImportOptions { namespace: None, trust: Some(&strict) };
    let err = import_opts(&kubelet, &store, &opts, &mut |_| {}).unwrap_err();
    assert!(matches!(&err, ArchiveError::Untrusted { kubelet: true, .. }), "{err}");
    let text = err.to_string();
    assert!(text.contains("never signed") && text.contains("not signed") && text.contains(&keys.key_id), "{text}");
    assert!(!text.contains(".import-"), "the hidden work dir is no news to the user: {text}");
    assert!(empty(&store));
    let opts = ImportOptions { namespace: None, trust: Some(&lenient) };
    import_opts(&kubelet, &store, &opts, &mut |_| {}).unwrap();

    // Our own archives too: marked as imported, refused unsigned under the strict policy.
    let store = Store::new(d.path().join("store2"));
    let cp = d.path().join("src/ns/c1/t1");
    checkpoint(&cp);
    let out = d.path().join("c1.tar");
    export(&cp, &out).unwrap();
    let opts = ImportOptions { namespace: Some("ignored"), trust: Some(&strict) };
    let err = import_opts(&out, &store, &opts, &mut |_| {}).unwrap_err();
    assert!(matches!(&err, ArchiveError::Untrusted { kubelet: false, .. }), "{err}");
    assert!(empty(&store));
    let (path, m) = import(&out, &store).unwrap();
    assert_eq!(m.namespace, "k8s.io", "an archive of ours keeps its namespace");
    assert_eq!(read_origin(&path).unwrap(), Some(Origin::Import { archive: out.display().to_string() }));
    assert!(read_origin(&cp).unwrap().is_none(), "the source checkpoint is local");
}
