//! Push and pull against the test bed's registry (Debian's docker-registry, `test/setup.sh`),
//! plain HTTP, with checkpoints written by the library: the round trip, a re-push that uploads
//! nothing, and crafted images that a pull must refuse, leaving nothing in the store.

#[path = "../../checkpoint/tests/common/mod.rs"]
mod common;

use std::path::Path;
use std::time::SystemTime;

use kybernate_checkpoint::trust::{read_origin, Origin, TrustPolicy};
use kybernate_checkpoint::Store;
use kybernate_registry::client::{sha256_digest, Client};
use kybernate_registry::{pull, push, PullOptions, Reference, RegistryError, Settings};
use kybernate_testbed::Registry;

fn settings() -> Settings {
    Settings { plain_http: true, ..Settings::default() }
}

fn entries(root: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for e in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
            out.push(e.path().strip_prefix(root).unwrap().display().to_string());
            if e.file_type().unwrap().is_dir() {
                stack.push(e.path());
            }
        }
    }
    out.sort();
    out
}

/// A one-entry tar layer holding `name` (a symlink when `link` is set).
fn layer(name: &str, data: &[u8], link: Option<&str>) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    let mut h = tar::Header::new_ustar();
    h.set_path(name).unwrap();
    h.set_mode(0o600);
    match link {
        Some(target) => {
            h.set_entry_type(tar::EntryType::Symlink);
            h.set_link_name(target).unwrap();
            h.set_size(0);
            h.set_cksum();
            b.append(&h, std::io::empty()).unwrap();
        }
        None => {
            h.set_size(data.len() as u64);
            h.set_cksum();
            b.append(&h, data).unwrap();
        }
    }
    b.into_inner().unwrap()
}

#[test]
fn push_pull_round_trip_and_crafted_images_are_refused() {
    let scratch = tempfile::tempdir().unwrap();
    let registry = Registry::start(&scratch.path().join("registry")).expect("registry (run test/setup.sh first)");
    let a = Store::new(scratch.path().join("a"));
    let b = Store::new(scratch.path().join("b"));
    let id = common::fake_checkpoint(&a, "default", "web", SystemTime::now());
    let dir = a.root().join(&id);
    let reference = Reference::parse(&format!("{}/ckpt/web:v1", registry.host())).unwrap();

    let first = push(&dir, &reference, &settings(), &mut |_| {}).unwrap();
    assert_eq!(first.bytes_uploaded, first.bytes_total, "{first:?}");
    let again = push(&dir, &reference, &settings(), &mut |_| {}).unwrap();
    assert_eq!((again.bytes_uploaded, &again.digest), (0, &first.digest), "the registry had every blob: {again:?}");

    let trust = TrustPolicy::default();
    let options = PullOptions { settings: settings(), namespace: None, trust: &trust };
    let by_digest = reference.with_digest(&first.digest);
    let pulled = pull(&by_digest, &b, &options, &mut |_| {}).unwrap();
    assert!(pulled.bytes_downloaded > 0);
    assert_eq!(pulled.manifest.namespace, "default");
    kybernate_checkpoint::verify(&pulled.path).unwrap();
    assert_eq!(
        read_origin(&pulled.path).unwrap(),
        Some(Origin::Pull { reference: by_digest.to_string(), digest: first.digest.clone() })
    );
    let again = pull(&reference, &b, &options, &mut |_| {}).unwrap();
    assert_eq!((again.bytes_downloaded, &again.path), (0, &pulled.path), "the store holds that digest");

    // A wrong digest in the reference: not found (the registry has no such manifest).
    let wrong = reference.with_digest(&format!("sha256:{}", "0".repeat(64)));
    assert!(matches!(pull(&wrong, &b, &options, &mut |_| {}), Err(RegistryError::NotFound { .. })));

    // Crafted images: the pushed one plus a layer with the origin marker, or with a symlink, or
    // an unlisted file; and a manifest without our format annotation.
    let client = Client::connect(&reference, &settings(), true).unwrap();
    let (bytes, _) = client.get_manifest(&first.digest).unwrap().unwrap();
    let image: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
    let craft = |tag: &str, extra: Option<Vec<u8>>, edit: &dyn Fn(&mut serde_json::Value)| {
        let mut image = image.clone();
        if let Some(extra) = extra {
            let digest = sha256_digest(&extra);
            client.upload_blob(&mut &extra[..], extra.len() as u64, &digest).unwrap();
            image["layers"].as_array_mut().unwrap().push(serde_json::json!({
                "mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": digest, "size": extra.len(),
            }));
        }
        edit(&mut image);
        client.put_manifest(tag, &serde_json::to_vec(&image).unwrap()).unwrap();
        Reference::parse(&format!("{}/ckpt/web:{tag}", registry.host())).unwrap()
    };
    let before = entries(b.root());
    let cases: Vec<(Reference, &str)> = vec![
        (craft("origin", Some(layer("kybernate.origin", b"{}", None)), &|_| {}), "kybernate.origin"),
        (craft("symlink", Some(layer("checkpoint/x.img", b"", Some("/etc/shadow"))), &|_| {}), "links are not allowed"),
        (craft("unlisted", Some(layer("evil", b"x", None)), &|_| {}), "not listed in kybernate.json"),
        (
            craft("foreign", None, &|i| {
                i["annotations"].as_object_mut().unwrap().remove("io.kybernate.checkpoint.format");
            }),
            "not a Kybernate checkpoint image",
        ),
    ];
    for (crafted, want) in cases {
        let err = pull(&crafted, &b, &options, &mut |_| {}).unwrap_err();
        assert!(matches!(err, RegistryError::BadImage { .. }), "{crafted}: {err}");
        assert!(err.to_string().contains(want), "{crafted}: {err}");
        assert!(err.to_string().contains(&registry.host()), "names the registry: {err}");
        assert_eq!(entries(b.root()), before, "{crafted} left something in the store");
    }

    // Signed on A, pulled into a store that trusts A's key: the signature still verifies, and a
    // store trusting another key refuses it naming A's key.
    let key = kybernate_checkpoint::signing::SigningKey::generate().unwrap();
    let signed_id = common::fake_checkpoint(&a, "default", "signed", SystemTime::now());
    let signed_dir = a.root().join(&signed_id);
    key.sign_dir(&signed_dir).unwrap();
    let signed_ref = Reference::parse(&format!("{}/ckpt/signed:v1", registry.host())).unwrap();
    push(&signed_dir, &signed_ref, &settings(), &mut |_| {}).unwrap();
    let trusting = TrustPolicy::new(vec![("a.pub".into(), key.public().clone())], Some(true));
    let t = Store::new(scratch.path().join("t"));
    let pulled =
        pull(&signed_ref, &t, &PullOptions { settings: settings(), namespace: None, trust: &trusting }, &mut |_| {})
            .unwrap();
    assert_eq!(
        std::fs::read(pulled.path.join("kybernate.json")).unwrap(),
        std::fs::read(signed_dir.join("kybernate.json")).unwrap()
    );
    let other = kybernate_checkpoint::signing::SigningKey::generate().unwrap();
    let untrusting = TrustPolicy::new(vec![("other.pub".into(), other.public().clone())], Some(true));
    let u = Store::new(scratch.path().join("u"));
    let err =
        pull(&signed_ref, &u, &PullOptions { settings: settings(), namespace: None, trust: &untrusting }, &mut |_| {})
            .unwrap_err();
    assert!(err.to_string().contains(key.key_id()), "{err}");
    assert!(entries(u.root()).is_empty(), "{:?}", entries(u.root()));

    // Signatures required, none there: refused, nothing stored.
    let strict = TrustPolicy::new(Vec::new(), Some(true));
    let c = Store::new(scratch.path().join("c"));
    let err = pull(&reference, &c, &PullOptions { settings: settings(), namespace: None, trust: &strict }, &mut |_| {})
        .unwrap_err();
    assert!(err.to_string().contains("not signed"), "{err}");
    assert!(entries(c.root()).is_empty(), "{:?}", entries(c.root()));
}
