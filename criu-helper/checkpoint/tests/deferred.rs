//! A restore's verification in two parts: everything but the memory pages at once, the pages in
//! the background, and together exactly what `verify` checks.

use std::fs;
use std::time::{Duration, SystemTime};

use kybernate_checkpoint::deferred::{verify_for_restore, Pending, Verdict};
use kybernate_checkpoint::{verify, Store, VerifyError};

mod common;

fn flip(path: &std::path::Path, at: usize) {
    let mut data = fs::read(path).unwrap();
    data[at] ^= 1;
    fs::write(path, &data).unwrap();
}

#[test]
fn the_pages_are_left_for_the_background_and_everything_else_is_checked_now() {
    let d = tempfile::tempdir().unwrap();
    let store = Store::new(d.path());
    let dir = d.path().join(common::fake_checkpoint(&store, "default", "c1", SystemTime::now()));
    let pages = dir.join("checkpoint/pages-1.img");

    let (manifest, deferred) = verify_for_restore(&dir).unwrap();
    assert_eq!(manifest.container_id, "c1");
    assert_eq!((deferred.files(), deferred.bytes()), (1, 50_000));
    deferred.run().unwrap();
    assert_eq!(deferred.spawn().wait(Some(Duration::from_secs(30))), Some(Verdict::Verified));

    // A changed page passes the part checked now and fails in the background, named.
    flip(&pages, 20_000);
    let (_, deferred) = verify_for_restore(&dir).unwrap();
    let pending: std::sync::Arc<Pending> = deferred.spawn();
    match pending.wait(Some(Duration::from_secs(30))) {
        Some(Verdict::Failed(text)) => assert!(text.contains("pages-1.img") && text.contains("checksum"), "{text}"),
        other => panic!("{other:?}"),
    }
    assert!(matches!(pending.take_error(), Some(VerifyError::Checksum { file, .. }) if file == pages));
    assert!(verify(&dir).is_err(), "verify agrees");
    flip(&pages, 20_000);

    // What the caller reads itself fails now: a changed spec.dump, a truncated page file.
    let spec = dir.join(kybernate_checkpoint::SPEC_DUMP);
    flip(&spec, 3);
    assert!(matches!(verify_for_restore(&dir).unwrap_err(), VerifyError::Checksum { file, .. } if file == spec));
    flip(&spec, 3);
    let data = fs::read(&pages).unwrap();
    fs::write(&pages, &data[..10]).unwrap();
    assert!(matches!(verify_for_restore(&dir).unwrap_err(), VerifyError::Size { found: 10, .. }));
}
