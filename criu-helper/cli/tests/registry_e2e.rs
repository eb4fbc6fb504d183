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

use common::{
    assert_exit, assert_exit_ok, bed_with, edit_checkpoint_json, json, task_status, text, wait_for, Bed, RUNTIME,
};
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

    // A crafted image reference: the checkpoint names a popular tag as the image it ran
    // (`config.dump`'s rootfsImageName, re-hashed, and the manifest's `image`). Node B must never
    // pull or tag it (containerd's CVE-2026-50195 poisoned image caches that way).
    let popular = "docker.io/library/nginx:latest";
    let cp_dir = a.store.join(&cp_id);
    edit_checkpoint_json(&cp_dir, "config.dump", |v| v["rootfsImageName"] = popular.into());
    let manifest_path = cp_dir.join("kybernate.json");
    let mut m: Value = serde_json::from_slice(&fs::read(&manifest_path).unwrap()).unwrap();
    m["image"] = popular.into();
    fs::write(&manifest_path, serde_json::to_vec_pretty(&m).unwrap()).unwrap();

    // Pushed (plain HTTP through [registry] insecure), with the JSON the interface promises.
    let out = a.kybernate(&["-o", "json", "push", &cp_id, &format!("{repo}:v1")]);
    assert_exit_ok(&out);
    let pushed = json(&out);
    let digest = pushed["digest"].as_str().expect("digest").to_string();
    assert!(digest.starts_with("sha256:") && digest.len() == 71, "{pushed}");
    assert_eq!(pushed["ref"], format!("{repo}:v1"), "{pushed}");
    let total = pushed["bytes_total"].as_u64().unwrap();
    assert!(total > 0 && pushed["bytes_uploaded"].as_u64() == Some(total), "a first push uploads everything: {pushed}");

    // The image as other tools see it: the manifest carries CRI-O's checkpoint annotation (its
    // mark of a checkpoint image), and its layers unpacked in order give the checkpoint archive
    // layout that the real checkpointctl reads.
    let image = registry_manifest(&registry_dir, &digest);
    assert_eq!(image["annotations"]["io.kubernetes.cri-o.annotations.checkpoint.name"], id.as_str(), "{image}");
    let unpacked = scratch.path().join("unpacked");
    fs::create_dir(&unpacked).unwrap();
    for layer in image["layers"].as_array().unwrap() {
        let blob = blob_path(&registry_dir, layer["digest"].as_str().unwrap());
        let out = Command::new("tar").arg("-xf").arg(&blob).arg("-C").arg(&unpacked).output().unwrap();
        assert!(out.status.success(), "tar -xf {}: {}", blob.display(), text(&out.stderr));
    }
    let archive = scratch.path().join("image.tar");
    let out = Command::new("tar").arg("-cf").arg(&archive).arg("-C").arg(&unpacked).arg(".").output().unwrap();
    assert!(out.status.success(), "tar -cf: {}", text(&out.stderr));
    let out = Command::new(kybernate_testbed::CHECKPOINTCTL).arg("show").arg(&archive).output().unwrap();
    assert!(out.status.success(), "checkpointctl show (the image's layers): {}", text(&out.stderr));
    let table = text(&out.stdout);
    assert!(table.contains(&id[..12]) && table.contains(popular), "checkpointctl show: {table}");

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
    // The image the checkpoint names is not pulled for the new container either: the restore
    // asks for one the node holds.
    let out = b.kybernate(&["restore", &format!("oci://{repo}:v1"), "--as", &new_id]);
    assert_exit(&out, 2, &[popular, "not found in containerd namespace", "--image"]);
    b.assert_nothing_named(&new_id);
    let out = b.kybernate(&["-o", "json", "restore", &format!("oci://{repo}:v1"), "--as", &new_id, "--image", IMAGE]);
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
    let images = b.tb.ctr_ok(&["images", "ls", "-q"]);
    assert_eq!(images, images_before, "a pull and two restores changed B's images");
    assert!(!images.contains("nginx"), "the image the checkpoint names was pulled or tagged: {images}");
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
    // mtime of the rootfs's /tmp, a header in the diff). Reading the big file between the two
    // checkpoints changes its atime, which the diff's headers do not carry.
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
        "dd if=/dev/urandom of=/big bs=1M count=12 2>/dev/null; touch /ready; exec sleep 100000",
    ]);
    a.wait_running(&big);
    let rootfs =
        a.tb.dir().join("state/io.containerd.runtime.v2.task").join(a.tb.namespace()).join(&big).join("rootfs");
    wait_for("the big file", || rootfs.join("ready").exists().then_some(()));
    let big_repo = format!("{repo}-big:latest");
    let mut uploads = Vec::new();
    let mut big_ids = Vec::new();
    for round in 0..2 {
        if round == 1 {
            a.tb.ctr_ok(&["task", "exec", "--exec-id", "read", &big, "sh", "-c", "cat /big >/dev/null"]);
        }
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

/// A TLS registry with a test CA and htpasswd basic auth: a bad CA or bad credentials are
/// refused with clear errors; then the whole move over TLS between two nodes with signatures:
/// node A signs, node B trusts A's key and restores by annotation (its shim's pull goes through
/// the CA and the credentials of B's config); the namespace policy, an untrusted signer, a
/// missing signature and a signature of another manifest are refused with nothing left.
#[test]
fn signed_checkpoints_move_over_tls_and_everything_else_is_refused() {
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
    // CLI-only nodes (push/pull need no containerd): a config each, with a store of its own
    // (`cli_node`) or the first one's (`config`).
    let config = |name: &str, store: &Path, extra: &str| {
        let path = scratch.path().join(format!("{name}.toml"));
        fs::write(&path, format!("[checkpoint]\nroot = \"{}\"\n{extra}", store.display())).unwrap();
        path
    };
    let cli_node = |name: &str, extra: &str| {
        let store = scratch.path().join(format!("store-{name}"));
        (config(name, &store, extra), store)
    };
    let tls = format!("[registry]\nauth_file = \"{}\"\nca_file = \"{}\"\n", good.display(), ca.display());
    let (plain, plain_store) = cli_node("plain", &tls);
    let unsigned = common::fake_checkpoint(
        &kybernate_checkpoint::Store::new(&plain_store),
        "default",
        "web",
        std::time::SystemTime::now(),
    );
    let unsigned = unsigned.as_str();
    let reference = format!("{host}/ckpt/web:v1");

    // Without the CA: a TLS error naming the registry.
    let no_ca = config("no-ca", &plain_store, &format!("[registry]\nauth_file = \"{}\"\n", good.display()));
    assert_exit(&run(&no_ca, &["push", unsigned, &reference]), 1, &["TLS failed", &host, "ca_file"]);
    // With the CA and wrong credentials: unauthorised.
    let wrong = config(
        "wrong",
        &plain_store,
        &format!("[registry]\nauth_file = \"{}\"\nca_file = \"{}\"\n", bad.display(), ca.display()),
    );
    assert_exit(&run(&wrong, &["push", unsigned, &reference]), 1, &["unauthorised", &host]);
    // No credentials for this registry: unauthorised too, saying so.
    let none = scratch.path().join("none.json");
    fs::write(&none, r#"{"auths": {}}"#).unwrap();
    let anonymous = config(
        "anon",
        &plain_store,
        &format!("[registry]\nca_file = \"{}\"\nauth_file = \"{}\"\n", ca.display(), none.display()),
    );
    assert_exit(&run(&anonymous, &["push", unsigned, &reference]), 1, &["unauthorised", "has none for it"]);
    // With both: pushed, then pulled back (the store already holds it: a second copy under another namespace).
    let out = run(&plain, &["-o", "json", "push", unsigned, &reference]);
    assert_exit_ok(&out);
    let digest = json(&out)["digest"].as_str().unwrap().to_string();
    let out = run(&plain, &["-o", "json", "-n", "elsewhere", "pull", &reference]);
    assert_exit_ok(&out);
    let pulled = json(&out);
    assert_eq!(
        (pulled["digest"].as_str(), pulled["namespace"].as_str()),
        (Some(digest.as_str()), Some("elsewhere")),
        "{pulled}"
    );
    assert_eq!(pulled["status"], "ok", "{pulled}");
    // Pulling with the wrong credentials: refused, nothing new in the store.
    let before = store_entries(&plain_store);
    assert_exit(&run(&wrong, &["pull", &reference]), 1, &["unauthorised", &host]);
    assert_eq!(store_entries(&plain_store), before);

    // Two key pairs: A's (node A signs with it, node B trusts it) and another one.
    let keys = |name: &str| {
        let dir = scratch.path().join(format!("keys-{name}"));
        let out = run(&plain, &["-o", "json", "keygen", dir.to_str().unwrap()]);
        assert_exit_ok(&out);
        (dir.join("kybernate.key"), dir.join("kybernate.pub"), json(&out)["key_id"].as_str().unwrap().to_string())
    };
    let (a_key, a_pub, a_key_id) = keys("a");
    let (_, other_pub, _) = keys("other");
    let a = bed_with(|b| b, &format!("signing_key = \"{}\"\n{tls}", a_key.display()));
    let b = bed_with(|b| b, &format!("[trust]\nkeys = [\"{}\"]\n{tls}", a_pub.display()));

    // Node A: a counter of pod namespace team-a, checkpointed (signed) and stopped, pushed over TLS.
    let pod = |ns: &str| ["--annotation".to_string(), format!("io.kubernetes.cri.sandbox-namespace={ns}")];
    let id = unique_name("signed");
    let mut flags = vec!["--seccomp".to_string()];
    flags.extend(pod("team-a"));
    a.run_counter_with(&id, RUNTIME, &flags.iter().map(String::as_str).collect::<Vec<_>>());
    a.wait_counter(&id, 20);
    let out = a.kybernate(&["-o", "json", "checkpoint", &id, "--exit"]);
    assert_exit_ok(&out);
    let cp_id = json(&out)["id"].as_str().expect("id").to_string();
    assert!(a.store.join(&cp_id).join("kybernate.sig").is_file(), "node A did not sign {cp_id}");
    wait_for("the counter to stop", || (task_status(&a.tb, &id).as_deref() != Some("RUNNING")).then_some(()));
    let at_checkpoint = a.counter(&id).expect("the checkpointed counter");
    let signed_ref = format!("{host}/ckpt/{}:signed", unique_name("counter"));
    assert_exit_ok(&a.kybernate(&["-o", "json", "push", &cp_id, &signed_ref]));
    a.remove(&id);

    // Node B: restored by annotation into a pod of the same namespace; its shim pulls over TLS
    // (B's CA and credentials), checks A's signature, and the counter counts on.
    let on_b = unique_name("onb-tls");
    let restore_from = format!("kybernate.io/restore-from=oci://{signed_ref}");
    let mut flags = vec!["--seccomp".to_string(), "--annotation".to_string(), restore_from.clone()];
    flags.extend(pod("team-a"));
    b.run_counter_with(&on_b, RUNTIME, &flags.iter().map(String::as_str).collect::<Vec<_>>());
    let first = wait_for("the counter restored over TLS", || b.counter(&on_b));
    assert!(first >= at_checkpoint, "restored counter {first} < {at_checkpoint} at checkpoint");
    wait_for("the restored counter to increase", || b.counter(&on_b).filter(|&n| n > first));
    b.remove(&on_b);
    let stored = checkpoints(&b.store);
    assert_eq!(stored.len(), 1, "{stored:?}");

    // The same checkpoint into a pod of another namespace: the namespace policy refuses it (the
    // pull finds the digest in the store), nothing is created.
    let other_ns = unique_name("onb-team-b");
    let out = b.tb.ctr(&[
        "run",
        "-d",
        "--runtime",
        RUNTIME,
        "--annotation",
        &restore_from,
        "--annotation",
        "io.kubernetes.cri.sandbox-namespace=team-b",
        IMAGE,
        &other_ns,
        "true",
    ]);
    let err = text(&out.stderr);
    assert!(!out.status.success(), "a checkpoint of team-a was restored into team-b");
    for want in ["\"team-a\" cannot be restored into namespace \"team-b\"", "allow_cross_namespace_restore"] {
        assert!(err.contains(want), "{want:?} not in {err}");
    }
    let _ = b.tb.ctr(&["containers", "delete", &other_ns]);
    b.assert_nothing_named(&other_ns);
    assert_eq!(checkpoints(&b.store), stored);

    // Pulls that the trust policy refuses, each into a store of its own, which stays empty.
    let refused = |config: &Path, store: &Path, reference: &str, want: &[&str]| {
        assert_exit(&run(config, &["pull", reference]), 1, want);
        assert_eq!(store_entries(store), Vec::<String>::new(), "a refused pull left something in {}", store.display());
    };
    // Trusted keys without A's: refused, naming the key that signed it.
    let (untrusting, untrusting_store) =
        cli_node("untrusting", &format!("[trust]\nkeys = [\"{}\"]\n{tls}", other_pub.display()));
    refused(
        &untrusting,
        &untrusting_store,
        &signed_ref,
        &["signed by key", &a_key_id, "not one of this node's trusted keys"],
    );
    // No signature while signatures are required (B's policy).
    let (b_cli, b_cli_store) = cli_node("b-cli", &format!("[trust]\nkeys = [\"{}\"]\n{tls}", a_pub.display()));
    refused(&b_cli, &b_cli_store, &reference, &["not signed", "require_signature = false"]);
    // A's valid signature beside another checkpoint's manifest.
    let forged = common::fake_checkpoint(
        &kybernate_checkpoint::Store::new(&plain_store),
        "default",
        "forged",
        std::time::SystemTime::now(),
    );
    fs::copy(a.store.join(&cp_id).join("kybernate.sig"), plain_store.join(&forged).join("kybernate.sig")).unwrap();
    let forged_ref = format!("{host}/ckpt/forged:v1");
    assert_exit_ok(&run(&plain, &["push", &forged, &forged_ref]));
    refused(&b_cli, &b_cli_store, &forged_ref, &["signature by trusted key", &a_key_id, "does not match"]);
    // Unsigned ones allowed explicitly: the same unsigned image pulls.
    let (lenient, lenient_store) =
        cli_node("lenient", &format!("[trust]\nkeys = [\"{}\"]\nrequire_signature = false\n{tls}", a_pub.display()));
    assert_exit_ok(&run(&lenient, &["pull", &reference]));
    assert_eq!(checkpoints(&lenient_store).len(), 1, "{:?}", store_entries(&lenient_store));
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
