//! Signed checkpoints and the node's trust policy through the shim (issue #25), with real
//! containerd 1.6, runc and CRIU (the test bed: `test/setup.sh`).
//!
//! A node with `[checkpoint] signing_key` signs every checkpoint it takes; a checkpoint that came
//! from outside (here: exported and imported, so it carries the node's origin marker) restores
//! on create only when a key of `[trust] keys` signed it. A refusal names the signer's key id
//! and creates nothing; a signing key that cannot be read refuses the checkpoint before anything
//! is frozen. One containerd, one checkpoint, two restores.

use containerd_shim_protos::shim::oci::CheckpointOptions;
use containerd_shim_protos::ttrpc::Code;
use kybernate_checkpoint::signing::{read_signature, write_key_pair, KeyPairFiles};
use kybernate_checkpoint::trust::{read_origin, Origin};
use kybernate_checkpoint::{export, import, Store};
use kybernate_testbed::unique_name;

mod common;

use common::ckpt::*;
use common::{runc_state_entries, task_row, text};

/// The shims read the bed's config at every create: rewriting it changes the next restore's policy.
fn set_config(bed: &Bed, extra: &str) {
    let config = bed.store.parent().expect("the bed's dir").join("kybernate.toml");
    std::fs::write(&config, format!("[checkpoint]\nroot = \"{}\"\n{extra}", bed.store.display())).unwrap();
}

fn config(signer: &KeyPairFiles, trusted: &KeyPairFiles) -> String {
    format!("signing_key = \"{}\"\n[trust]\nkeys = [\"{}\"]\n", signer.private.display(), trusted.public.display())
}

#[test]
fn an_imported_checkpoint_restores_only_when_signed_by_a_trusted_key() {
    let keys = tempfile::tempdir().unwrap();
    let signer = write_key_pair(&keys.path().join("a"), false).unwrap();
    let other = write_key_pair(&keys.path().join("b"), false).unwrap();
    let bed = bed_with(|b| b, &config(&signer, &other));
    let tb = &bed.tb;

    // A signing key that cannot be read (the config names it at create, the file is read at each
    // checkpoint) refuses the checkpoint before anything is frozen.
    let id = unique_name("signed");
    run_counter(tb, &id, &[]);
    let moved = keys.path().join("moved.key");
    std::fs::rename(&signer.private, &moved).unwrap();
    let target = store_path(&bed, &id);
    let o = CheckpointOptions { image_path: target.display().to_string(), ..Default::default() };
    let (code, message) = error_of(checkpoint(tb, &id, o));
    std::fs::rename(&moved, &signer.private).unwrap();
    assert_eq!(code, Code::FAILED_PRECONDITION, "{message}");
    let key = signer.private.display().to_string();
    assert!(message.contains(&key) && message.contains("nothing was frozen"), "{message}");
    assert!(!target.exists(), "a refused checkpoint left {}", target.display());
    assert_running(tb, &id, "after a checkpoint refused for its signing key");

    // Signed at commit, by the node's signing key.
    let (dir, at_checkpoint) = store_checkpoint(&bed, &id, true);
    let signature = read_signature(&dir).unwrap().expect("a checkpoint taken with signing_key is signed");
    assert_eq!(signature.key_id, signer.key_id);

    // Exported and imported again: now a checkpoint from outside.
    let archive = keys.path().join("cp.tar");
    export(&dir, &archive).unwrap();
    let (imported, _) = import(&archive, &Store::new(&bed.store)).unwrap();
    assert!(matches!(read_origin(&imported).unwrap(), Some(Origin::Import { .. })), "import writes the origin");
    assert_eq!(read_signature(&imported).unwrap().map(|s| s.key_id), Some(signer.key_id.clone()));

    // Trusting another key: refused, naming the signer's key id; nothing is created.
    let denied = unique_name("signed-no");
    let out = run_restored(&bed, &imported, &denied, &[]);
    let err = text(&out.stderr);
    assert!(!out.status.success(), "restore of {denied} succeeded:\n{}\n{err}", text(&out.stdout));
    eprintln!("--- refusal:\n{err}");
    assert!(err.contains(&format!("signed by key {}", signer.key_id)), "{err}");
    assert!(err.contains("not one of this node's trusted keys") && err.contains(&other.key_id), "{err}");
    assert_eq!(task_row(tb, &denied), None, "a task {denied} exists after its restore was refused");
    assert!(!runc_state_entries(tb).contains(&denied), "runtime state left for {denied}");
    let _ = tb.ctr(&["containers", "delete", &denied]);

    // Trusting the signer: restores, and the counter continues.
    set_config(&bed, &config(&signer, &signer));
    let restored = unique_name("signed-r");
    run_restored_ok(&bed, &imported, &restored, &[]);
    assert_counter_continues(tb, &restored, at_checkpoint);
    remove(tb, &restored);
    let _ = tb.ctr(&["tasks", "delete", &id]);
}
