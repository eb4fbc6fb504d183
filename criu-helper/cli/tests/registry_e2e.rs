//! `kybernate push` / `kybernate pull` end to end: two private containerd 1.6 instances as node A
//! and node B, each with its own Kybernate config and store, and the test bed's registry
//! (Debian's docker-registry, `test/setup.sh`) on 127.0.0.1 over plain HTTP, and over TLS with a
//! test CA and htpasswd basic auth.
//!
//! Needs our shim built (`cargo build -p containerd-shim-kybernate-v1`): see common/mod.rs.

mod common;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use common::{assert_exit, assert_exit_ok, bed_with, json, task_status, text, wait_for, Bed, RUNTIME};
use kybernate_testbed::{unique_name, Registry, IMAGE};
use serde_json::Value;

/// A node whose config lets it speak plain HTTP to `registry`. Test beds need containerd
/// namespaces of their own (runc keeps its state per namespace under /run/containerd/runc), where
/// a cluster's nodes share `k8s.io`: node B allows restores across them.
fn node(registry: &str, cross_namespace: bool) -> Bed {
    bed_with(
        |b| b,
        &format!("allow_cross_namespace_restore = {cross_namespace}\n[registry]\ninsecure = [\"{registry}\"]\n"),
    )
}

/// Every entry of the store's root and below, hidden work dirs included.
fn store_entries(store: &Path) -> Vec<String> {
    fn walk(dir: &Path, base: &Path, out: &mut Vec<String>) {
        let Ok(rd) = fs::read_dir(dir) else { return };
        for e in rd.flatten() {
            let p = e.path();
            out.push(p.strip_prefix(base).unwrap().display().to_string());
            if e.file_type().is_ok_and(|t| t.is_dir()) && out.len() < 10_000 {
                walk(&p, base, out);
            }
        }
    }
    let mut out = Vec::new();
    walk(store, store, &mut out);
    out.sort();
    out
}

/// The checkpoints (namespace/container/id) in a store.
fn checkpoints(store: &Path) -> Vec<String> {
    store_entries(store).into_iter().filter(|e| e.split('/').count() == 3 && !e.contains("/.")).collect()
}

#[test]
fn a_checkpoint_pushed_on_node_a_restores_on_node_b_and_bad_pulls_leave_nothing() {
    let scratch = kybernate_testbed::scratch_dir().expect("scratch dir");
    let registry_dir = scratch.path().join("registry");
    let registry = Registry::start(&registry_dir).expect("registry (run test/setup.sh first)");
    let host = registry.host();
    let a = node(&host, false);
    let b = node(&host, true);
    let repo = format!("{host}/ckpt/{}", unique_name("counter"));

    // Node A: the counter, checkpointed and stopped.
    let id = unique_name("mv");
    a.run_counter_with(&id, RUNTIME, &["--seccomp"]);
    a.wait_counter(&id, 20);
    let out = a.kybernate(&["-o", "json", "checkpoint", &id, "--exit"]);
    assert_exit_ok(&out);
    let cp_id = json(&out)["id"].as_str().expect("id").to_string();
    wait_for("the counter to stop", || (task_status(&a.tb, &id).as_deref() != Some("RUNNING")).then_some(()));
    let at_checkpoint = a.counter(&id).expect("the checkpointed counter");

    // Pushed (plain HTTP through [registry] insecure), with the JSON the interface promises.
    let out = a.kybernate(&["-o", "json", "push", &cp_id, &format!("{repo}:v1")]);
    assert_exit_ok(&out);
    let pushed = json(&out);
    let digest = pushed["digest"].as_str().expect("digest").to_string();
    assert!(digest.starts_with("sha256:") && digest.len() == 71, "{pushed}");
    assert_eq!(pushed["ref"], format!("{repo}:v1"), "{pushed}");
    let total = pushed["bytes_total"].as_u64().unwrap();
    assert!(total > 0 && pushed["bytes_uploaded"].as_u64() == Some(total), "a first push uploads everything: {pushed}");

    // Node B: pulled by digest, verified, stored (under B's namespace: the CLI gets `-n`). The image
    // the checkpoint names is never pulled or tagged: B's image store stays as it was.
    let images_before = b.tb.ctr_ok(&["images", "ls", "-q"]);
    let out = b.kybernate(&["-o", "json", "pull", &format!("{repo}@{digest}")]);
    assert_exit_ok(&out);
    let pulled = json(&out);
    assert_eq!(pulled["digest"], digest.as_str(), "{pulled}");
    assert!(pulled["bytes_downloaded"].as_u64().unwrap() > 0, "{pulled}");
    assert_eq!(pulled["status"], "ok", "{pulled}");
    assert_eq!(pulled["namespace"], b.tb.namespace(), "{pulled}");
    let b_id = pulled["id"].as_str().unwrap().to_string();
    assert_eq!(b.tb.ctr_ok(&["images", "ls", "-q"]), images_before, "a pull changed B's images");
    let b_path = PathBuf::from(pulled["path"].as_str().unwrap());
    let origin: Value = serde_json::from_slice(&fs::read(b_path.join("kybernate.origin")).unwrap()).unwrap();
    assert_eq!(
        (origin["source"].as_str(), origin["digest"].as_str()),
        (Some("pull"), Some(digest.as_str())),
        "{origin}"
    );
    // The same digest again (by tag now): nothing downloaded, the same checkpoint.
    let again = json(&b.kybernate(&["-o", "json", "pull", &format!("oci://{repo}:v1")]));
    assert_eq!((again["bytes_downloaded"].as_u64(), again["id"].as_str()), (Some(0), Some(b_id.as_str())), "{again}");

    // Restored on node B by reference (`oci://`: the pull finds the digest in the store), it
    // counts on from the checkpoint.
    let new_id = unique_name("onb");
    let out = b.kybernate(&["-o", "json", "restore", &format!("oci://{repo}:v1"), "--as", &new_id]);
    if !out.status.success() {
        panic!("restore on B failed: {}\n--- containerd log ---\n{}", text(&out.stderr), b.tb.log_tail(40));
    }
    assert_eq!(json(&out)["checkpoint"]["id"], b_id.as_str(), "restored from the pulled checkpoint");
    let first = wait_for("the restored counter", || b.counter(&new_id));
    assert!(first >= at_checkpoint, "restored counter {first} < {at_checkpoint} at checkpoint");
    wait_for("the restored counter to increase", || b.counter(&new_id).filter(|&n| n > first));
    b.remove(&new_id);
    a.remove(&id);

    // Restored on node B by annotation `oci://REF` at Create: the shim runs B's CLI (beside it in
    // target/debug) to pull it again (B's copy removed first, so it downloads) under B's namespace,
    // then restores it from the store; it counts on from the checkpoint.
    fs::remove_dir_all(&b_path).unwrap();
    let by_annotation = unique_name("onb-oci");
    let restore_from = |tag: &str| format!("kybernate.io/restore-from=oci://{repo}:{tag}");
    b.run_counter_with(&by_annotation, RUNTIME, &["--seccomp", "--annotation", &restore_from("v1")]);
    let first = wait_for("the counter restored by annotation", || b.counter(&by_annotation));
    assert!(first >= at_checkpoint, "restored counter {first} < {at_checkpoint} at checkpoint");
    wait_for("the counter restored by annotation to increase", || b.counter(&by_annotation).filter(|&n| n > first));
    let pulled_again = checkpoints(&b.store);
    assert_eq!(pulled_again.len(), 1, "{pulled_again:?}");
    let origin: Value =
        serde_json::from_slice(&fs::read(b.store.join(&pulled_again[0]).join("kybernate.origin")).unwrap()).unwrap();
    assert_eq!(origin["digest"], digest.as_str(), "{origin}");
    b.remove(&by_annotation);
    // An unknown tag by annotation: the create fails naming the registry and the tag; B's store
    // is as it was.
    let before = store_entries(&b.store);
    let bad = unique_name("onb-bad");
    let unknown = restore_from("no-such-tag");
    let out = b.tb.ctr(&["run", "-d", "--runtime", RUNTIME, "--annotation", &unknown, IMAGE, &bad, "true"]);
    let err = text(&out.stderr);
    eprintln!("ctr run with an unknown tag: {err}");
    assert!(!out.status.success(), "a restore from an unknown tag ran: {}", text(&out.stdout));
    for want in ["not found", "no-such-tag", host.as_str()] {
        assert!(err.contains(want), "{want:?} not in {err}");
    }
    let _ = b.tb.ctr(&["containers", "delete", &bad]);
    assert_eq!(store_entries(&b.store), before, "a failed pull at create left something in the store");

    // A container with a large file that does not change: the second checkpoint's push uploads
    // less than its total (the rootfs diff's layer is found through the tag's last manifest). The
    // rootfs diff must then be the same file: /tmp is a tmpfs (each checkpoint here changed the
    // mtime of the rootfs's /tmp, a header in the diff), and the big file is read once first (the
    // diff's GNU headers carry its atime, which a first read would change).
    let big = unique_name("big");
    a.tb.ctr_ok(&[
        "run",
        "-d",
        "--runtime",
        RUNTIME,
        "--mount",
        "type=tmpfs,src=tmpfs,dst=/tmp,options=rw:nosuid:nodev",
        IMAGE,
        &big,
        "sh",
        "-c",
        "dd if=/dev/urandom of=/big bs=1M count=12 2>/dev/null; cat /big >/dev/null; touch /ready; exec sleep 100000",
    ]);
    a.wait_running(&big);
    let rootfs =
        a.tb.dir().join("state/io.containerd.runtime.v2.task").join(a.tb.namespace()).join(&big).join("rootfs");
    wait_for("the big file", || rootfs.join("ready").exists().then_some(()));
    let big_repo = format!("{repo}-big:latest");
    let mut uploads = Vec::new();
    let mut big_ids = Vec::new();
    for _ in 0..2 {
        let out = a.kybernate(&["-o", "json", "checkpoint", &big]);
        assert_exit_ok(&out);
        let cp = json(&out)["id"].as_str().unwrap().to_string();
        let out = a.kybernate(&["-o", "json", "push", &cp, &big_repo]);
        assert_exit_ok(&out);
        let p = json(&out);
        uploads.push((
            p["bytes_uploaded"].as_u64().unwrap(),
            p["bytes_total"].as_u64().unwrap(),
            p["digest"].as_str().unwrap().to_string(),
        ));
        big_ids.push(cp);
    }
    eprintln!("pushes of the big container (uploaded, total, digest): {uploads:?}");
    for cp in &big_ids {
        let m: Value = serde_json::from_slice(&fs::read(a.store.join(cp).join("kybernate.json")).unwrap()).unwrap();
        eprintln!("{cp}: rootfs-diff.tar {}", m["files"]["rootfs-diff.tar"]);
    }
    assert_eq!(uploads[0].0, uploads[0].1, "the first push uploads everything");
    assert!(uploads[1].1 > 12 << 20, "the rootfs diff holds the 12 MiB file: {uploads:?}");
    assert!(uploads[1].0 + (12 << 20) <= uploads[1].1, "the unchanged 12 MiB layer was uploaded again: {uploads:?}");
    a.remove(&big);

    // A blob damaged in the registry's storage: the pull refuses with a digest error, and B's store
    // is as it was.
    let before = store_entries(&b.store);
    let image = registry_manifest(&registry_dir, &uploads[1].2);
    let largest = image["layers"].as_array().unwrap().iter().max_by_key(|l| l["size"].as_u64()).unwrap().clone();
    let blob = blob_path(&registry_dir, largest["digest"].as_str().unwrap());
    let mut data = fs::read(&blob).unwrap();
    let middle = data.len() / 2;
    data[middle] ^= 0xff;
    fs::write(&blob, &data).unwrap();
    let out =
        b.kybernate(&["-o", "json", "pull", &format!("{}@{}", big_repo.trim_end_matches(":latest"), uploads[1].2)]);
    assert_exit(&out, 1, &["digest mismatch", largest["digest"].as_str().unwrap(), &host]);
    assert_eq!(store_entries(&b.store), before, "a refused pull left something in the store");

    // An unknown tag, and a registry that is not there: clear errors, nothing left.
    let out = b.kybernate(&["pull", &format!("{repo}:no-such-tag")]);
    assert_exit(&out, 1, &["not found", "no-such-tag", &host]);
    let gone = Registry::start(&scratch.path().join("gone")).expect("second registry");
    let gone_host = gone.host();
    drop(gone);
    let out = b.kybernate(&["pull", "--plain-http", &format!("{gone_host}/ckpt/x:v1")]);
    assert_exit(&out, 1, &["cannot reach the registry", &gone_host]);
    assert_eq!(store_entries(&b.store), before, "a failed pull left something in the store");
    assert_eq!(checkpoints(&b.store).len(), 1, "{:?}", checkpoints(&b.store));
}

/// The image manifest `digest` as the registry stores it.
fn registry_manifest(dir: &Path, digest: &str) -> Value {
    serde_json::from_slice(&fs::read(blob_path(dir, digest)).unwrap()).unwrap()
}

/// Where docker-registry's filesystem driver keeps blob `digest`.
fn blob_path(dir: &Path, digest: &str) -> PathBuf {
    let hex = digest.strip_prefix("sha256:").unwrap();
    dir.join("data/docker/registry/v2/blobs/sha256").join(&hex[..2]).join(hex).join("data")
}

/// A bcrypt (cost 4) hash of [`PASSWORD`], for the registry's htpasswd file.
const PASSWORD_HASH: &str = "$2b$04$bogkYrT8nzG376IynBJMmuNDf1ZGDqKIkY1ikU4c3Iuk5Y4XuZnty";
const PASSWORD: &str = "kybernate-test-pw";

/// A test CA and a certificate for 127.0.0.1 signed by it, made with openssl (argument vectors).
fn test_ca(dir: &Path) -> (PathBuf, PathBuf, PathBuf) {
    let ca_key = dir.join("ca.key");
    let ca = dir.join("ca.pem");
    let key = dir.join("server.key");
    let csr = dir.join("server.csr");
    let cert = dir.join("server.pem");
    let ext = dir.join("san.ext");
    fs::write(&ext, "subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\n").unwrap();
    let openssl = |args: &[&str]| {
        let out = Command::new("openssl").args(args).output().expect("openssl");
        assert!(out.status.success(), "openssl {args:?}: {}", text(&out.stderr));
    };
    let p = |p: &Path| p.to_str().unwrap().to_string();
    openssl(&[
        "req",
        "-x509",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
        "-keyout",
        &p(&ca_key),
        "-out",
        &p(&ca),
        "-days",
        "2",
        "-subj",
        "/CN=kybernate test CA",
    ]);
    openssl(&[
        "req",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
        "-keyout",
        &p(&key),
        "-out",
        &p(&csr),
        "-subj",
        "/CN=127.0.0.1",
    ]);
    openssl(&[
        "x509",
        "-req",
        "-in",
        &p(&csr),
        "-CA",
        &p(&ca),
        "-CAkey",
        &p(&ca_key),
        "-CAcreateserial",
        "-out",
        &p(&cert),
        "-days",
        "2",
        "-extfile",
        &p(&ext),
    ]);
    (ca, cert, key)
}

#[test]
fn a_tls_registry_with_basic_auth_needs_the_ca_and_the_right_credentials() {
    let scratch = kybernate_testbed::scratch_dir().expect("scratch dir");
    let (ca, cert, key) = test_ca(scratch.path());
    let htpasswd = scratch.path().join("htpasswd");
    fs::write(&htpasswd, format!("alice:{PASSWORD_HASH}\n")).unwrap();
    let extra = format!(
        "  tls:\n    certificate: {}\n    key: {}\nauth:\n  htpasswd:\n    realm: kybernate-test\n    path: {}\n",
        cert.display(),
        key.display(),
        htpasswd.display()
    );
    let registry = Registry::start_with(&scratch.path().join("registry"), &extra).expect("TLS registry");
    let host = registry.host();
    let auth_file = |name: &str, user: &str, password: &str| {
        use std::io::Write;
        let path = scratch.path().join(format!("auth-{name}.json"));
        let token = base64_encode(format!("{user}:{password}").as_bytes());
        let mut f = fs::File::create(&path).unwrap();
        write!(f, r#"{{"auths":{{"{host}":{{"auth":"{token}"}}}}}}"#).unwrap();
        path
    };
    let good = auth_file("good", "alice", PASSWORD);
    let bad = auth_file("bad", "alice", "wrong");
    // One node (no containerd needed for push/pull of a checkpoint written by the library).
    let store = scratch.path().join("store");
    let write_config = |name: &str, extra: &str| {
        let path = scratch.path().join(name);
        fs::write(&path, format!("[checkpoint]\nroot = \"{}\"\n[registry]\n{extra}", store.display())).unwrap();
        path
    };
    let cp = common::fake_checkpoint(
        &kybernate_checkpoint::Store::new(&store),
        "default",
        "web",
        std::time::SystemTime::now(),
    );
    let cp = cp.as_str();
    let reference = format!("{host}/ckpt/web:v1");
    let run = |config: &Path, args: &[&str]| {
        let out = Command::new(common::KYBERNATE)
            .arg("--config")
            .arg(config)
            .args(args)
            .env_remove("KYBERNATE_CONFIG")
            .env_remove("CONTAINERD_NAMESPACE")
            .output()
            .unwrap();
        eprintln!("kybernate {args:?}: {}\nstdout:\n{}stderr:\n{}", out.status, text(&out.stdout), text(&out.stderr));
        out
    };

    // Without the CA: a TLS error naming the registry.
    let no_ca = write_config("no-ca.toml", &format!("auth_file = \"{}\"\n", good.display()));
    assert_exit(&run(&no_ca, &["push", cp, &reference]), 1, &["TLS failed", &host, "ca_file"]);
    // With the CA and wrong credentials: unauthorised.
    let wrong =
        write_config("wrong.toml", &format!("auth_file = \"{}\"\nca_file = \"{}\"\n", bad.display(), ca.display()));
    assert_exit(&run(&wrong, &["push", cp, &reference]), 1, &["unauthorised", &host]);
    // No credentials for this registry: unauthorised too, saying so.
    let none = scratch.path().join("none.json");
    fs::write(&none, r#"{"auths": {}}"#).unwrap();
    let anonymous =
        write_config("anon.toml", &format!("ca_file = \"{}\"\nauth_file = \"{}\"\n", ca.display(), none.display()));
    assert_exit(&run(&anonymous, &["push", cp, &reference]), 1, &["unauthorised", "has none for it"]);
    // With both: pushed, then pulled back (the store already holds it: a second copy under another namespace).
    let ok = write_config("ok.toml", &format!("auth_file = \"{}\"\nca_file = \"{}\"\n", good.display(), ca.display()));
    let out = run(&ok, &["-o", "json", "push", cp, &reference]);
    assert_exit_ok(&out);
    let digest = json(&out)["digest"].as_str().unwrap().to_string();
    let out = run(&ok, &["-o", "json", "-n", "elsewhere", "pull", &reference]);
    assert_exit_ok(&out);
    let pulled = json(&out);
    assert_eq!(
        (pulled["digest"].as_str(), pulled["namespace"].as_str()),
        (Some(digest.as_str()), Some("elsewhere")),
        "{pulled}"
    );
    assert_eq!(pulled["status"], "ok", "{pulled}");
    // Pulling with the wrong credentials: refused, nothing new in the store.
    let before = store_entries(&store);
    assert_exit(&run(&wrong, &["pull", &reference]), 1, &["unauthorised", &host]);
    assert_eq!(store_entries(&store), before);
}

fn base64_encode(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let b = [chunk[0], *chunk.get(1).unwrap_or(&0), *chunk.get(2).unwrap_or(&0)];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(ALPHABET[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}
