//! Checkpoint integrity: format 2 (BLAKE3 in chunks, hashed on every core) round trips and names
//! a changed chunk by its byte range; format-1 checkpoints (one SHA-256 per file) still verify,
//! export and import; the restore's caller can check the metadata without hashing the pages.

mod common;

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use kybernate_checkpoint::digest::CHUNK_SIZE;
use kybernate_checkpoint::manifest::MANIFEST_FILE;
use kybernate_checkpoint::{
    export, import, verify, verify_metadata, verify_quick, Manifest, PartialCheckpoint, Store, VerifyError,
};

const MIB: u64 = 1 << 20;

/// Bytes that differ everywhere (a chunk hashed at the wrong offset or in the wrong order shows).
fn data(len: u64) -> Vec<u8> {
    let mut x = 0x2545_f491_4f6c_dd1du64;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// A committed checkpoint in `store` whose `pages-1.img` is `pages` bytes; returns its dir.
fn committed(store: &Store, container: &str, pages: u64) -> PathBuf {
    let at = SystemTime::now() - Duration::from_secs(60);
    let target = store.new_checkpoint_path("k8s.io", container, at).unwrap();
    let p = PartialCheckpoint::begin(&target).unwrap();
    fs::write(p.images_dir().join("inventory.img"), b"inventory").unwrap();
    fs::write(p.images_dir().join("pages-1.img"), data(pages)).unwrap();
    fs::write(p.images_dir().join("core-1.img"), b"core").unwrap();
    fs::write(p.dir().join("spec.dump"), b"{}").unwrap();
    p.commit(common::fake_manifest("k8s.io", container, at)).unwrap();
    target
}

fn flip(file: &Path, at: u64) {
    let mut bytes = fs::read(file).unwrap();
    bytes[at as usize] ^= 0x01;
    fs::write(file, bytes).unwrap();
}

fn edit_manifest(dir: &Path, edit: impl FnOnce(&mut serde_json::Value)) {
    let p = dir.join(MANIFEST_FILE);
    let mut m: serde_json::Value = serde_json::from_slice(&fs::read(&p).unwrap()).unwrap();
    edit(&mut m);
    fs::write(&p, serde_json::to_vec_pretty(&m).unwrap()).unwrap();
}

#[test]
fn format_2_records_chunk_digests_that_merge_into_the_files_blake3() {
    let tmp = tempfile::tempdir().unwrap();
    let store = Store::new(tmp.path().join("store"));
    let size = 5 * CHUNK_SIZE + 12_345;
    let dir = committed(&store, "big", size);
    let m = verify(&dir).unwrap();
    assert_eq!(m.format_version, 2);
    let e = &m.files["checkpoint/pages-1.img"];
    assert_eq!(e.size, size);
    assert_eq!(e.chunks.len(), 6, "5 whole chunks and a short one");
    // The whole-file digest is the file's ordinary BLAKE3 (b3sum's), computed here in one stream.
    assert_eq!(e.blake3.as_deref(), Some(blake3::hash(&data(size)).to_hex().as_str()));
    assert!(e.sha256.is_none());
    let small = &m.files["spec.dump"];
    assert_eq!((small.blake3.as_deref(), small.chunks.len()), (Some(blake3::hash(b"{}").to_hex().as_str()), 0));
    // What is on disk is what commit returned, and reads back identically.
    let text = fs::read_to_string(dir.join(MANIFEST_FILE)).unwrap();
    assert!(text.contains(r#""algorithm": "blake3""#) && text.contains(r#""chunk_size": 8388608"#), "{text}");
    assert_eq!(serde_json::from_str::<Manifest>(&text).unwrap(), m);
    assert_eq!(store.list().unwrap()[0].1.as_ref().unwrap(), &m);
}

#[test]
fn a_flipped_byte_is_named_with_its_file_and_chunk_range() {
    let tmp = tempfile::tempdir().unwrap();
    let store = Store::new(tmp.path().join("store"));
    let size = 4 * CHUNK_SIZE + MIB;
    let dir = committed(&store, "flip", size);
    let pages = dir.join("checkpoint/pages-1.img");
    flip(&pages, 2 * CHUNK_SIZE + CHUNK_SIZE / 2);
    assert!(verify_quick(&dir).is_ok(), "same size: only the digests tell");
    let err = verify(&dir).unwrap_err();
    let (start, end) = (2 * CHUNK_SIZE, 3 * CHUNK_SIZE);
    assert!(
        matches!(&err, VerifyError::Checksum { file, start: s, end: e, chunk: 3, chunks: 5 }
            if *file == pages && *s == start && *e == end),
        "{err:?}"
    );
    let text = err.to_string();
    let want = format!("{}: checksum mismatch in bytes {start}..{end} (chunk 3 of 5)", pages.display());
    assert!(text.starts_with(&want) && text.contains("failed verification"), "{text}");

    // The short last chunk: its own range, to the end of the file.
    flip(&pages, 2 * CHUNK_SIZE + CHUNK_SIZE / 2);
    assert!(verify(&dir).is_ok());
    flip(&pages, size - 1);
    let err = verify(&dir).unwrap_err();
    assert!(
        matches!(err, VerifyError::Checksum { start, end, chunk: 5, chunks: 5, .. } if start == 4 * CHUNK_SIZE && end == size),
        "{err:?}"
    );
    // A file of one chunk: the whole file.
    flip(&pages, size - 1);
    let spec = dir.join("spec.dump");
    fs::write(&spec, b"{ ").unwrap();
    let err = verify(&dir).unwrap_err();
    assert!(
        matches!(&err, VerifyError::Checksum { file, start: 0, end: 2, chunk: 1, chunks: 1 } if *file == spec),
        "{err:?}"
    );
}

#[test]
fn the_metadata_check_skips_only_the_memory_pages_and_the_rootfs_diff() {
    let tmp = tempfile::tempdir().unwrap();
    let store = Store::new(tmp.path().join("store"));
    let dir = committed(&store, "meta", 3 * MIB);
    flip(&dir.join("checkpoint/pages-1.img"), MIB);
    assert!(verify_metadata(&dir).is_ok(), "the pages are the shim's to verify");
    assert!(matches!(verify(&dir), Err(VerifyError::Checksum { .. })));
    flip(&dir.join("checkpoint/pages-1.img"), MIB);
    let core = dir.join("checkpoint/core-1.img");
    fs::write(&core, b"CORE").unwrap();
    let err = verify_metadata(&dir).unwrap_err();
    assert!(matches!(&err, VerifyError::Checksum { file, .. } if *file == core), "{err:?}");
    fs::write(&core, b"core").unwrap();
    fs::write(dir.join("checkpoint/pages-1.img"), b"short").unwrap();
    assert!(matches!(verify_metadata(&dir), Err(VerifyError::Size { .. })), "sizes are always checked");
}

#[test]
fn forged_or_inconsistent_format_2_manifests_are_refused_before_hashing() {
    let tmp = tempfile::tempdir().unwrap();
    let store = Store::new(tmp.path().join("store"));
    let dir = committed(&store, "forged", 2 * CHUNK_SIZE + 1);
    let original = fs::read(dir.join(MANIFEST_FILE)).unwrap();
    #[allow(non_upper_case_globals)]
    const pages: &str = "checkpoint/pages-1.img";
    type Edit = Box<dyn Fn(&mut serde_json::Value)>;
    let cases: Vec<(Edit, &str)> = vec![
        (Box::new(|m| m["files"][pages]["blake3"] = serde_json::Value::Null), "no valid blake3 (format 2)"),
        (Box::new(|m| m["files"][pages]["blake3"] = "xyz".into()), "no valid blake3 (format 2)"),
        (
            Box::new(|m| m["files"][pages]["chunks"].as_array_mut().unwrap().truncate(2)),
            "2 chunk digests for 16777217 bytes, expected 3",
        ),
        (Box::new(|m| m["files"][pages]["chunks"][1] = "00".into()), "a chunk digest is not 64 hex digits"),
        (Box::new(|m| m["digest"]["algorithm"] = "md5".into()), r#"digest algorithm "md5" is not "blake3""#),
        (Box::new(|m| m["digest"]["chunk_size"] = 1000.into()), "digest chunk_size 1000 is not a power of two"),
        (Box::new(|m| m["digest"] = serde_json::Value::Null), "format version 2 must name its digest"),
        (Box::new(|m| m["format_version"] = 1.into()), "format version 1 names no digest"),
        // Every chunk matches, but the whole-file digest claims other content.
        (
            Box::new(|m| m["files"][pages]["blake3"] = blake3::hash(b"other").to_hex().to_string().into()),
            "checkpoint/pages-1.img: its blake3 does not match its chunk digests",
        ),
    ];
    for (edit, why) in cases {
        fs::write(dir.join(MANIFEST_FILE), &original).unwrap();
        edit_manifest(&dir, |m| edit(m));
        let err = verify(&dir).unwrap_err();
        assert!(matches!(err, VerifyError::Manifest { .. }) && err.to_string().contains(why), "{why}: {err}");
    }
}

/// A format-1 checkpoint exactly as Kybernate up to format 1 wrote it: `{"size", "sha256"}` per
/// file, no `digest`; the sums from `sha256sum`, independently of this crate.
fn format_1_checkpoint(store: &Store, container: &str) -> PathBuf {
    let at = SystemTime::now() - Duration::from_secs(120);
    let dir = store.new_checkpoint_path("k8s.io", container, at).unwrap();
    fs::create_dir_all(dir.join("checkpoint")).unwrap();
    let files: BTreeMap<&str, Vec<u8>> = BTreeMap::from([
        ("checkpoint/inventory.img", b"inventory".to_vec()),
        ("checkpoint/pages-1.img", data(3 * MIB + 17)),
        ("spec.dump", b"{\"ociVersion\": \"1.0.2\"}".to_vec()),
    ]);
    let mut listed = serde_json::Map::new();
    for (rel, bytes) in &files {
        let path = dir.join(rel);
        fs::write(&path, bytes).unwrap();
        let out = std::process::Command::new("sha256sum").arg(&path).output().unwrap();
        let sha = String::from_utf8(out.stdout).unwrap().split_whitespace().next().unwrap().to_string();
        listed.insert(rel.to_string(), serde_json::json!({"size": bytes.len(), "sha256": sha}));
    }
    let mut m = serde_json::to_value(common::fake_manifest("k8s.io", container, at)).unwrap();
    m["format_version"] = 1.into();
    m.as_object_mut().unwrap().remove("digest");
    m["files"] = listed.into();
    fs::write(dir.join(MANIFEST_FILE), serde_json::to_vec_pretty(&m).unwrap()).unwrap();
    dir
}

#[test]
fn format_1_checkpoints_still_verify_export_and_import() {
    let tmp = tempfile::tempdir().unwrap();
    let store = Store::new(tmp.path().join("store"));
    let dir = format_1_checkpoint(&store, "old");
    let m = verify(&dir).unwrap();
    assert_eq!((m.format_version, m.digest.as_ref()), (1, None));
    assert!(m.files.values().all(|e| e.sha256.is_some() && e.blake3.is_none()));

    // Exported and imported as they are: still format 1, still verifying.
    let archive = tmp.path().join("old.tar");
    export(&dir, &archive).unwrap();
    let other = Store::new(tmp.path().join("other"));
    let (imported, im) = import(&archive, &other).unwrap();
    assert_eq!(im, m);
    assert_eq!(verify(&imported).unwrap(), m);

    // A changed byte: the whole file is the unit in format 1.
    let pages = dir.join("checkpoint/pages-1.img");
    flip(&pages, MIB);
    let err = verify(&dir).unwrap_err();
    assert!(
        matches!(&err, VerifyError::Checksum { file, start: 0, end, chunk: 1, chunks: 1 } if *file == pages && *end == 3 * MIB + 17),
        "{err:?}"
    );
    // A format-1 entry without its sha256 is a broken manifest.
    flip(&pages, MIB);
    edit_manifest(&dir, |m| m["files"]["spec.dump"].as_object_mut().unwrap().remove("sha256").map(drop).unwrap());
    let err = verify_quick(&dir).unwrap_err();
    assert!(err.to_string().contains("spec.dump: no valid sha256 (format 1)"), "{err}");
}

#[test]
fn format_2_exports_and_imports_as_format_2() {
    let tmp = tempfile::tempdir().unwrap();
    let store = Store::new(tmp.path().join("store"));
    let dir = committed(&store, "moved", 2 * CHUNK_SIZE + 3);
    let m = verify(&dir).unwrap();
    let archive = tmp.path().join("moved.tar");
    assert_eq!(export(&dir, &archive).unwrap(), m);
    let (imported, im) = import(&archive, &Store::new(tmp.path().join("other"))).unwrap();
    assert_eq!((im.format_version, &im), (2, &m));
    assert_eq!(verify(&imported).unwrap(), m);

    // An archive whose page chunk was changed on the way is refused, naming the chunk.
    let bytes = fs::read(&archive).unwrap();
    let pages = data(2 * CHUNK_SIZE + 3);
    let needle = &pages[CHUNK_SIZE as usize..][..64];
    let at = bytes.windows(64).position(|w| w == needle).unwrap();
    let mut bad = bytes.clone();
    bad[at + 100] ^= 0xff;
    let tampered = tmp.path().join("tampered.tar");
    fs::write(&tampered, bad).unwrap();
    let err = import(&tampered, &Store::new(tmp.path().join("third"))).unwrap_err().to_string();
    assert!(err.contains("pages-1.img: checksum mismatch in bytes 8388608..16777216 (chunk 2 of 3)"), "{err}");
}
