//! The checkpoint store: naming, resolving references, atomic commit, verify.

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::{symlink, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use kybernate_checkpoint::manifest::{FORMAT_VERSION, MANIFEST_FILE};
use kybernate_checkpoint::{
    verify, CheckpointFlags, Manifest, PartialCheckpoint, Store, StoreError, ToolInfo, VerifyError,
};

fn manifest() -> Manifest {
    Manifest {
        format_version: FORMAT_VERSION,
        namespace: "k8s.io".into(),
        container_id: "c1".into(),
        pod_namespace: Some("team-a".into()),
        pod_name: None,
        container_name: None,
        image: None,
        runtime: ToolInfo { path: "/usr/bin/runc".into(), version: "runc version 1.2.5".into() },
        criu: ToolInfo { path: "/usr/sbin/criu".into(), version: "4.1.1".into() },
        kernel: "6.1.0".into(),
        host: "node-1".into(),
        created: "2026-11-23T21:25:01Z".into(),
        options: CheckpointFlags::default(),
        rootfs_diff: false,
        duration_ms: 12,
        frozen_ms: None,
        dump_stats: None,
        digest: None, // set by commit
        files: BTreeMap::new(),
        gpu: None,
        flat: false,
        needs: None,
    }
}

/// A committed checkpoint at `target` with a fake inventory, one page image and config.dump.
fn checkpoint(target: &Path) -> Manifest {
    let p = PartialCheckpoint::begin(target).unwrap();
    fs::write(p.images_dir().join("inventory.img"), b"inventory").unwrap();
    fs::write(p.images_dir().join("pages-1.img"), vec![7u8; 100_000]).unwrap();
    fs::write(p.dir().join("config.dump"), b"{}").unwrap();
    p.commit(manifest()).unwrap()
}

fn mode(p: &Path) -> u32 {
    fs::metadata(p).unwrap().permissions().mode() & 0o777
}

#[test]
fn checkpoint_paths_are_sortable_and_names_checked() {
    let s = Store::new("/var/lib/kybernate/checkpoints");
    let at = SystemTime::UNIX_EPOCH + Duration::from_millis(1_795_469_101_123);
    let p = s.new_checkpoint_path("k8s.io", "c1", at).unwrap();
    assert_eq!(p, Path::new("/var/lib/kybernate/checkpoints/k8s.io/c1/20261123T212501.123Z"));
    for bad in ["", ".", "..", "a/b", "a\0b"] {
        let err = s.new_checkpoint_path(bad, "c1", at).unwrap_err();
        assert!(matches!(&err, StoreError::BadName { what: "namespace", value } if value == bad), "{err}");
        assert!(matches!(s.new_checkpoint_path("ns", bad, at), Err(StoreError::BadName { .. })));
    }
}

#[test]
fn resolve_stays_inside_the_store() {
    let d = tempfile::tempdir().unwrap();
    let root = d.path().join("store");
    let cp = root.join("ns/c1/t1");
    checkpoint(&cp);
    fs::create_dir_all(d.path().join("outside")).unwrap();
    let s = Store::new(&root);
    let canon = |p: &Path| fs::canonicalize(p).unwrap();

    assert_eq!(s.resolve("ns/c1/t1").unwrap(), canon(&cp));
    assert_eq!(s.resolve(cp.to_str().unwrap()).unwrap(), canon(&cp));
    symlink("c1/t1", root.join("ns/latest")).unwrap();
    assert_eq!(s.resolve("ns/latest").unwrap(), canon(&cp));

    let err = s.resolve("../outside").unwrap_err();
    assert!(matches!(&err, StoreError::OutsideRoot { reference, .. } if reference == "../outside"), "{err}");
    assert!(err.to_string().contains("not inside the checkpoint store"), "{err}");
    assert!(matches!(s.resolve("ns/c1/../../../outside"), Err(StoreError::OutsideRoot { .. })));
    assert!(matches!(s.resolve(d.path().join("outside").to_str().unwrap()), Err(StoreError::OutsideRoot { .. })));
    symlink(d.path().join("outside"), root.join("ns/evil")).unwrap();
    assert!(matches!(s.resolve("ns/evil"), Err(StoreError::OutsideRoot { .. })));
    assert!(matches!(s.resolve("."), Err(StoreError::OutsideRoot { .. })));
    assert!(matches!(s.resolve(root.to_str().unwrap()), Err(StoreError::OutsideRoot { .. })));
    let err = s.resolve("ns/c1/nope").unwrap_err();
    assert!(matches!(&err, StoreError::NotFound { reference } if reference == "ns/c1/nope"), "{err}");
}

/// The shim's own work dir while it writes a checkpoint is no restore source; the same checkpoint
/// is, once committed. (Every kind of refusal: the unit tests of `store.rs`.)
#[test]
fn only_committed_checkpoints_resolve() {
    let d = tempfile::tempdir().unwrap();
    let s = Store::new(d.path().join("store"));
    let target = s.root().join("k8s.io/web/t1");
    let p = PartialCheckpoint::begin(&target).unwrap();
    fs::write(p.images_dir().join("inventory.img"), b"inventory").unwrap();
    // Hand-made manifest: a partial dir that looks complete is still not committed.
    fs::write(p.dir().join(MANIFEST_FILE), serde_json::to_vec(&manifest()).unwrap()).unwrap();
    let partial = p.dir().to_path_buf();
    let name = partial.file_name().unwrap().to_str().unwrap().to_string();
    let by_id = format!("k8s.io/web/{name}");
    for reference in [by_id.as_str(), partial.to_str().unwrap()] {
        let err = s.resolve(reference).unwrap_err();
        assert!(matches!(&err, StoreError::Hidden { hidden, .. } if *hidden == name), "{reference}: {err}");
        let why =
            "is a hidden work directory (a checkpoint being written, removed or imported), not a committed checkpoint";
        assert!(err.to_string().contains(why), "{err}");
    }
    fs::remove_file(partial.join(MANIFEST_FILE)).unwrap();
    p.commit(manifest()).unwrap();
    assert_eq!(s.resolve("k8s.io/web/t1").unwrap(), fs::canonicalize(&target).unwrap());
    let err = s.resolve("k8s.io/web").unwrap_err();
    assert!(matches!(&err, StoreError::NotACheckpoint { why: "it is a container directory", .. }), "{err}");
    assert!(err.to_string().contains("is not a checkpoint directory ("), "{err}");
}

#[test]
fn dropping_a_partial_checkpoint_removes_it() {
    let d = tempfile::tempdir().unwrap();
    let target = d.path().join("store/ns/c1/t1");
    let p = PartialCheckpoint::begin(&target).unwrap();
    let dir = p.dir().to_path_buf();
    assert!(dir.file_name().unwrap().to_str().unwrap().starts_with(".t1.partial-"));
    assert_eq!(dir.parent(), target.parent());
    fs::write(p.images_dir().join("pages-1.img"), b"x").unwrap();
    assert_eq!(mode(&dir), 0o700);
    assert_eq!(mode(&p.images_dir()), 0o700);
    for created in ["store", "store/ns", "store/ns/c1"] {
        assert_eq!(mode(&d.path().join(created)), 0o700, "{created}");
    }
    drop(p);
    assert!(!dir.exists());
    assert!(!target.exists());
    assert_eq!(fs::read_dir(d.path().join("store/ns/c1")).unwrap().count(), 0);
}

#[test]
fn commit_renames_and_lists_files_with_checksums() {
    let d = tempfile::tempdir().unwrap();
    let target = d.path().join("ns/c1/t1");
    let m = checkpoint(&target);
    assert_eq!(
        m.files.keys().collect::<Vec<_>>(),
        ["checkpoint/inventory.img", "checkpoint/pages-1.img", "config.dump"]
    );
    let inv = &m.files["checkpoint/inventory.img"];
    assert_eq!(inv.size, 9);
    assert_eq!(inv.blake3.as_deref(), Some(blake3::hash(b"inventory").to_hex().as_str()));
    assert_eq!((inv.sha256.as_deref(), inv.chunks.len()), (None, 0), "format 2, one chunk");
    assert_eq!(m.format_version, FORMAT_VERSION);
    assert_eq!(m.digest.as_ref().map(|d| (d.algorithm.as_str(), d.chunk_size)), Some(("blake3", 8 << 20)));
    assert_eq!(m.total_size(), 9 + 100_000 + 2);
    assert_eq!(mode(&target), 0o700);
    let on_disk: Manifest = serde_json::from_slice(&fs::read(target.join(MANIFEST_FILE)).unwrap()).unwrap();
    assert_eq!(on_disk, m);
    assert_eq!(mode(&target.join(MANIFEST_FILE)), 0o600);
    assert_eq!(fs::read_dir(target.parent().unwrap()).unwrap().count(), 1, "partial dir left behind");
    assert_eq!(verify(&target).unwrap(), m);
    let listed = Store::new(d.path()).list().unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].0, target);
    assert_eq!(listed[0].1.as_ref().unwrap(), &m);
}

#[test]
fn target_must_be_absent_or_empty() {
    let d = tempfile::tempdir().unwrap();
    let target = d.path().join("given");
    fs::create_dir(&target).unwrap();
    fs::write(target.join("junk"), b"x").unwrap();
    let err = PartialCheckpoint::begin(&target).unwrap_err();
    assert!(matches!(&err, StoreError::TargetExists { target: t } if *t == target), "{err}");
    let file = d.path().join("file");
    fs::write(&file, b"x").unwrap();
    assert!(matches!(PartialCheckpoint::begin(&file), Err(StoreError::TargetExists { .. })));

    // containerd's fresh, empty temp dir is replaced.
    let empty = d.path().join("empty");
    fs::create_dir(&empty).unwrap();
    checkpoint(&empty);
    assert!(empty.join(MANIFEST_FILE).is_file());
    verify(&empty).unwrap();
}

#[test]
fn commit_refuses_symlinks() {
    let d = tempfile::tempdir().unwrap();
    let target = d.path().join("t");
    let p = PartialCheckpoint::begin(&target).unwrap();
    let dir = p.dir().to_path_buf();
    symlink("/etc/passwd", p.images_dir().join("link")).unwrap();
    let err = p.commit(manifest()).unwrap_err();
    assert!(matches!(&err, StoreError::Unexpected { what: "symlink", .. }), "{err}");
    assert!(!dir.exists() && !target.exists());
}

fn verify_err(dir: &Path) -> VerifyError {
    verify(dir).unwrap_err()
}

#[test]
fn verify_catches_tampering() {
    let d = tempfile::tempdir().unwrap();
    let target = d.path().join("t");
    checkpoint(&target);
    let pages = target.join("checkpoint/pages-1.img");

    // One byte flipped.
    let mut data = fs::read(&pages).unwrap();
    data[5000] ^= 1;
    fs::write(&pages, &data).unwrap();
    let err = verify_err(&target);
    assert!(matches!(&err, VerifyError::Checksum { file, .. } if *file == pages), "{err}");
    assert!(err.to_string().contains(&pages.display().to_string()), "{err}");
    data[5000] ^= 1;
    fs::write(&pages, &data).unwrap();
    verify(&target).unwrap();

    // Truncated.
    fs::write(&pages, &data[..10]).unwrap();
    assert!(matches!(verify_err(&target), VerifyError::Size { expected: 100_000, found: 10, .. }));
    fs::write(&pages, &data).unwrap();

    // Unlisted extra file.
    let extra = target.join("checkpoint/extra.img");
    fs::write(&extra, b"x").unwrap();
    assert!(matches!(verify_err(&target), VerifyError::Unlisted { file } if file == extra));
    fs::remove_file(&extra).unwrap();

    // Missing listed file.
    let config = target.join("config.dump");
    fs::remove_file(&config).unwrap();
    assert!(matches!(verify_err(&target), VerifyError::Missing { file } if file == config));
    fs::write(&config, b"{}").unwrap();
    verify(&target).unwrap();

    // Truncated manifest.
    let mpath = target.join(MANIFEST_FILE);
    let text = fs::read(&mpath).unwrap();
    fs::write(&mpath, &text[..text.len() / 2]).unwrap();
    let err = verify_err(&target);
    assert!(matches!(&err, VerifyError::Manifest { path, .. } if *path == mpath), "{err}");
    assert!(err.to_string().contains("kybernate.json"), "{err}");
    fs::remove_file(&mpath).unwrap();
    assert!(verify_err(&target).to_string().contains("kybernate.json: invalid checkpoint manifest: missing"));
}

fn rewrite_manifest(dir: &Path, edit: impl FnOnce(&mut Manifest)) {
    let p = dir.join(MANIFEST_FILE);
    let mut m: Manifest = serde_json::from_slice(&fs::read(&p).unwrap()).unwrap();
    edit(&mut m);
    fs::write(&p, serde_json::to_vec(&m).unwrap()).unwrap();
}

#[test]
fn verify_checks_manifest_contents() {
    let d = tempfile::tempdir().unwrap();
    let target = d.path().join("t");
    let p = PartialCheckpoint::begin(&target).unwrap();
    fs::write(p.images_dir().join("pages-1.img"), b"x").unwrap();
    p.commit(manifest()).unwrap();
    let err = verify_err(&target);
    assert!(matches!(&err, VerifyError::Incomplete { missing } if *missing == target.join("checkpoint/inventory.img")));

    let target = d.path().join("t2");
    checkpoint(&target);
    rewrite_manifest(&target, |m| m.format_version = 3);
    assert!(matches!(verify_err(&target), VerifyError::Unsupported { found: 3, oldest: 1, supported: 2, .. }));
    for bad in ["../../etc/passwd", "/etc/passwd", "checkpoint/../config.dump", "checkpoint//x", "kybernate.json"] {
        rewrite_manifest(&target, |m| {
            m.format_version = FORMAT_VERSION;
            let e = m.files["config.dump"].clone();
            m.files.retain(|k, _| !k.contains("..") && !k.starts_with('/') && !k.contains("//") && k != MANIFEST_FILE);
            m.files.insert(bad.into(), e);
        });
        let err = verify_err(&target);
        assert!(matches!(&err, VerifyError::BadPath { entry, .. } if entry == bad), "{bad}: {err}");
    }
}

/// The manifest is not covered by the checksums: its fields are validated wherever it is read
/// for a decision (verify before restore, list for prune).
#[test]
fn verify_and_list_refuse_manifests_whose_fields_do_not_validate() {
    let d = tempfile::tempdir().unwrap();
    let s = Store::new(d.path().join("store"));
    let target = s.root().join("k8s.io/c1/t1");
    checkpoint(&target);
    let mpath = target.join(MANIFEST_FILE);
    let soon = humantime::format_rfc3339_seconds(SystemTime::now() + Duration::from_secs(60)).to_string();
    let later = humantime::format_rfc3339_seconds(SystemTime::now() + Duration::from_secs(600)).to_string();
    let future = format!("created {later:?} is in the future");
    let cases = [
        ("created", "9999-01-01T00:00:00Z", r#"created "9999-01-01T00:00:00Z" is in the future"#),
        ("created", &later, &future),
        ("created", "../../x", r#"created "../../x" is not an RFC 3339"#),
        ("created", "", r#"created "" is not an RFC 3339"#),
        ("namespace", "../k8s.io", r#"namespace "../k8s.io" is not a valid containerd identifier"#),
        ("pod_namespace", "Team-A", r#"pod_namespace "Team-A" is not a valid Kubernetes name"#),
    ];
    for (field, value, reason) in cases {
        let edit = |m: &mut Manifest| match field {
            "created" => m.created = value.into(),
            "namespace" => m.namespace = value.into(),
            _ => m.pod_namespace = Some(value.into()),
        };
        rewrite_manifest(&target, |m| *m = Manifest { files: m.files.clone(), digest: m.digest.clone(), ..manifest() });
        verify(&target).unwrap();
        rewrite_manifest(&target, edit);
        let err = verify_err(&target);
        assert!(matches!(&err, VerifyError::Manifest { path, .. } if *path == mpath), "{reason}: {err}");
        assert!(err.to_string().contains(&format!("kybernate.json: invalid checkpoint manifest: {reason}")), "{err}");
        let listed = s.list().unwrap();
        assert!(
            matches!(&listed[0].1, Err(VerifyError::Manifest { reason: r, .. }) if r.starts_with(reason)),
            "{reason}: {listed:?}"
        );
    }
    // A minute ahead is clock skew between nodes, not a forgery.
    rewrite_manifest(&target, |m| {
        *m = Manifest { files: m.files.clone(), digest: m.digest.clone(), created: soon.clone(), ..manifest() }
    });
    verify(&target).unwrap();
    assert!(s.list().unwrap()[0].1.is_ok());
}

#[test]
fn list_reports_bad_manifests_and_skips_partials() {
    let d = tempfile::tempdir().unwrap();
    let s = Store::new(d.path().join("store"));
    assert!(s.list().unwrap().is_empty());
    checkpoint(&s.root().join("ns/c1/t1"));
    let broken: PathBuf = s.root().join("ns/c2/t1");
    fs::create_dir_all(&broken).unwrap();
    fs::write(broken.join(MANIFEST_FILE), b"{").unwrap();
    let _partial = PartialCheckpoint::begin(&s.root().join("ns/c1/t2")).unwrap();
    let listed = s.list().unwrap();
    assert_eq!(listed.len(), 2);
    assert!(listed[0].1.is_ok());
    assert_eq!(listed[1].0, broken);
    assert!(matches!(listed[1].1, Err(VerifyError::Manifest { .. })));
    assert!(kybernate_checkpoint::dir_size(s.root()) > 100_000);
}

#[test]
fn verify_quick_checks_everything_but_the_checksums() {
    let tmp = tempfile::tempdir().unwrap();
    let target = tmp.path().join("k8s.io/c1/20261123T212501.123Z");
    checkpoint(&target);
    assert_eq!(kybernate_checkpoint::verify_quick(&target).unwrap(), verify(&target).unwrap());

    // Same size, other bytes: only the full verification sees it.
    fs::write(target.join("checkpoint/pages-1.img"), vec![8u8; 100_000]).unwrap();
    assert!(kybernate_checkpoint::verify_quick(&target).is_ok());
    assert!(matches!(verify(&target), Err(VerifyError::Checksum { .. })));

    fs::write(target.join("checkpoint/pages-1.img"), b"short").unwrap();
    assert!(matches!(kybernate_checkpoint::verify_quick(&target), Err(VerifyError::Size { .. })));
    fs::write(target.join("extra"), b"x").unwrap();
    assert!(matches!(kybernate_checkpoint::verify_quick(&target), Err(VerifyError::Unlisted { .. })));
}

#[test]
fn stale_work_dirs_are_those_whose_writer_is_gone() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::new(dir.path().join("store"));
    let done = store.new_checkpoint_path("k8s.io", "web", SystemTime::now()).unwrap();
    checkpoint(&done);
    let parent = done.parent().unwrap();
    // Left by writers 4242 (dead) and 7 (alive): a partial checkpoint, a removal, an import.
    let dead_partial = parent.join(".20261123T212501.123Z.partial-4242-1700000000");
    let live_partial = parent.join(".20261123T212502.123Z.partial-7-1700000001");
    let dead_removal = parent.join(".20261123T212400.000Z.removing-4242-1700000002");
    let dead_import = store.root().join(".import-4242-1700000003");
    // Look-alikes that are not work dirs: a plain hidden dir, a file.
    let other_hidden = parent.join(".keep-me");
    for d in [&dead_partial, &live_partial, &dead_removal, &dead_import, &other_hidden] {
        fs::create_dir_all(d).unwrap();
    }
    fs::write(parent.join(".x.partial-4242-1"), b"a file, not a dir").unwrap();
    let stale = store.stale_work_dirs(|pid| pid == 7);
    let mut want = vec![dead_partial, dead_removal, dead_import];
    want.sort();
    assert_eq!(stale, want);
    assert!(store.stale_work_dirs(|_| true).is_empty());
}

#[test]
fn a_flat_checkpoint_keeps_criu_images_at_the_top_and_verifies() {
    // containerd's own checkpoint dir (an empty temp dir it made): images beside the manifest.
    let tmp = tempfile::tempdir().unwrap();
    let target = tmp.path().join("ctrd-checkpoint1");
    fs::create_dir(&target).unwrap();
    let p = PartialCheckpoint::begin_flat(&target).unwrap();
    assert_eq!(p.images_dir(), p.dir());
    fs::write(p.images_dir().join("inventory.img"), b"inventory").unwrap();
    fs::write(p.images_dir().join("pages-1.img"), vec![7u8; 1000]).unwrap();
    let m = p.commit(manifest()).unwrap();
    assert!(m.flat && m.images_rel().is_empty());
    let mut names: Vec<String> =
        fs::read_dir(&target).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
    names.sort();
    assert_eq!(names, ["inventory.img", "kybernate.json", "pages-1.img"], "plain files only, at the top");
    assert!(verify(&target).unwrap().flat);
    // A store-layout manifest over flat files is incomplete (no checkpoint/inventory.img).
    let text = fs::read_to_string(target.join(MANIFEST_FILE)).unwrap().replace("\"flat\": true", "\"flat\": false");
    fs::write(target.join(MANIFEST_FILE), text).unwrap();
    assert!(matches!(verify(&target), Err(VerifyError::Incomplete { .. })));
}
