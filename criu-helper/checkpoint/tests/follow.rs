//! A checkpoint hashed while it is written (`PartialCheckpoint::follow_dump`) commits the
//! manifest a commit hashing everything from scratch writes, and verifies.

use std::fs;
use std::io::Write;
use std::path::Path;
use std::time::Duration;

use kybernate_checkpoint::digest::{hash_entry, CHUNK_SIZE};
use kybernate_checkpoint::{verify, Manifest, PartialCheckpoint};

/// A manifest with only the fields every manifest must have (the commit fills in the rest).
fn manifest() -> Manifest {
    serde_json::from_value(serde_json::json!({
        "format_version": 2, "namespace": "k8s.io", "container_id": "c1",
        "runtime": {"path": "/usr/bin/runc", "version": "runc version 1.1.5"},
        "criu": {"path": "/usr/sbin/criu", "version": "4.2.1"},
        "kernel": "6.1.0", "host": "node-1", "created": "2026-11-23T21:25:01Z",
        "options": {}, "files": {},
    }))
    .unwrap()
}

/// Appends `len` bytes (differing per MiB) to `path` in 1 MiB pieces, pausing as a dump does.
fn append_slowly(path: &Path, len: u64, seed: u8) {
    let mut f = fs::OpenOptions::new().create(true).append(true).open(path).unwrap();
    let mut at = 0u64;
    let mut piece = vec![0u8; 1 << 20];
    while at < len {
        let n = (len - at).min(piece.len() as u64) as usize;
        piece.iter_mut().enumerate().for_each(|(i, b)| *b = (i as u64 ^ (at >> 20) ^ u64::from(seed)) as u8);
        f.write_all(&piece[..n]).unwrap();
        at += n as u64;
        std::thread::sleep(Duration::from_millis(2));
    }
}

#[test]
fn a_followed_checkpoint_commits_the_manifest_of_hashing_from_scratch() {
    let tmp = tempfile::tempdir().unwrap();
    let target = tmp.path().join("store/ns/c1/t1");
    let mut partial = PartialCheckpoint::begin(&target).unwrap();
    let images = partial.images_dir();
    fs::create_dir(images.join("pre-1")).unwrap();
    partial.follow_dump();
    // What CRIU writes during the dump: pages growing past several chunks (one exactly at a
    // boundary), a pre-dump round's pages, small images.
    std::thread::scope(|s| {
        s.spawn(|| append_slowly(&images.join("pages-1.img"), 5 * CHUNK_SIZE + 12345, 1));
        s.spawn(|| append_slowly(&images.join("pre-1/pages-1.img"), 2 * CHUNK_SIZE, 2));
        s.spawn(|| append_slowly(&images.join("core-1.img"), 4096, 3));
    });
    fs::write(images.join("inventory.img"), b"inventory").unwrap();
    // Give the follower a few walks to reach the end of what was written (5 + 1 final chunks).
    std::thread::sleep(Duration::from_millis(300));
    let (manifest, times) = partial.commit_timed(manifest()).unwrap();
    assert!(times.followed_bytes > 0 && times.followed_bytes <= 6 * CHUNK_SIZE, "{times:?}");
    assert_eq!(times.followed_bytes % CHUNK_SIZE, 0, "{times:?}");

    for rel in ["checkpoint/pages-1.img", "checkpoint/pre-1/pages-1.img", "checkpoint/core-1.img"] {
        let scratch = hash_entry(&target.join(rel)).unwrap();
        assert_eq!(manifest.files.get(rel), Some(&scratch), "{rel}");
    }
    assert_eq!(manifest.files["checkpoint/pages-1.img"].chunks.len(), 6);
    verify(&target).unwrap();
}

#[test]
fn a_followed_checkpoint_dropped_before_its_commit_is_removed() {
    let tmp = tempfile::tempdir().unwrap();
    let mut partial = PartialCheckpoint::begin(&tmp.path().join("ns/c1/t1")).unwrap();
    partial.follow_dump();
    let images = partial.images_dir();
    append_slowly(&images.join("pages-1.img"), 2 * CHUNK_SIZE + 1, 1);
    let dir = partial.dir().to_path_buf();
    drop(partial);
    assert!(!dir.exists());
}
