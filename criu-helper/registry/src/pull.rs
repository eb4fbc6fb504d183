//! Pulling a checkpoint image into the store: the manifest checked (its digest when pulled by
//! digest, its shape always), each layer streamed through sha256 into a hidden work dir under
//! the same confinement as an archive import, then every byte verified against `kybernate.json`,
//! the identity, namespace and trust checks, the origin marker, and one rename into the store.
//! Nothing the checkpoint names (its base image) is ever pulled or tagged.

use std::collections::BTreeMap;
use std::fs::{self, DirBuilder, File};
use std::io::{self, Read, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Component, Path, PathBuf};
use std::time::SystemTime;

use kybernate_checkpoint::trust::{check_trust, read_origin, write_origin, Origin, TrustPolicy};
use kybernate_checkpoint::{
    free_bytes, validate_identity, verify, verify_quick, Identity, Manifest, Store, MANIFEST_FILE,
};
use oci_spec::image::ImageManifest;
use sha2::{Digest as _, Sha256};
use tar::{Archive, EntryType};

use crate::client::{hex, sha256_digest, Client, Settings};
use crate::error::{io_ctx, RegistryError};
use crate::format::{ANNOTATION_FORMAT, CONFIG_MEDIA_TYPE, IMAGE_FORMAT, LAYER_MEDIA_TYPE, ORIGIN_FILE};
use crate::reference::Reference;

/// At most this many layers (a checkpoint has a few large files).
const MAX_LAYERS: usize = 4096;
/// At most this many tar entries before `kybernate.json` says which files belong.
const MAX_UNLISTED_ENTRIES: usize = 10_000;
/// The largest `kybernate.json` accepted.
const MAX_MANIFEST_BYTES: u64 = 64 << 20;
/// How deep a path may go (a checkpoint's files are at most 2 deep).
const MAX_DEPTH: usize = 8;

/// What a pull did.
#[derive(Debug, Clone)]
pub struct Pulled {
    pub path: PathBuf,
    pub manifest: Manifest,
    /// The image manifest's digest.
    pub digest: String,
    /// Layer bytes downloaded (0 when the store already held this digest).
    pub bytes_downloaded: u64,
}

/// How to pull.
pub struct PullOptions<'a> {
    pub settings: Settings,
    /// Store it under this containerd namespace instead of the one it was taken in.
    pub namespace: Option<String>,
    /// The node's trust policy, checked on the complete, verified checkpoint (with its origin
    /// marker) before it becomes visible.
    pub trust: &'a TrustPolicy,
}

/// Where a pull is: `done` of `total` layer bytes.
pub type Transfer = crate::push::Transfer;

/// Pulls `reference` into `store` (see the module's description).
pub fn pull(
    reference: &Reference,
    store: &Store,
    options: &PullOptions<'_>,
    progress: &mut dyn FnMut(Transfer),
) -> Result<Pulled, RegistryError> {
    let client = Client::connect(reference, &options.settings, false)?;
    let target = client.target();
    let wanted = reference.manifest_ref().to_string();
    let Some((bytes, _kind)) = client.get_manifest(&wanted)? else {
        return Err(RegistryError::NotFound { target, what: format!("manifest {wanted} (no such tag or digest)") });
    };
    let digest = sha256_digest(&bytes);
    if let Some(expected) = &reference.digest {
        if *expected != digest {
            return Err(RegistryError::DigestMismatch {
                target,
                what: "the image manifest".into(),
                expected: expected.clone(),
                actual: digest,
            });
        }
    }
    if let Some(path) = held(store, &digest, options.namespace.as_deref()) {
        // Verified when it was pulled; a restore verifies every byte again.
        let manifest = verify_quick(&path).map_err(|source| RegistryError::Verify { path: path.clone(), source })?;
        return Ok(Pulled { path, manifest, digest, bytes_downloaded: 0 });
    }
    let image = checked_image(&client, &bytes)?;
    let total: u64 = image.layers().iter().map(|l| l.size()).sum();

    private_dirs(store.root()).map_err(io_ctx(format!("{}: cannot create the store", store.root().display())))?;
    let nanos = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_nanos());
    let work = store.root().join(format!(".pull-{}-{nanos}", std::process::id()));
    DirBuilder::new()
        .mode(0o700)
        .create(&work)
        .map_err(io_ctx(format!("{}: cannot create directory", work.display())))?;
    let mut guard = Cleanup(Some(work.clone()));
    if let Ok(free) = free_bytes(&work) {
        if total > free {
            return Err(RegistryError::Refused {
                target,
                reason: format!("its layers hold {total} bytes, the store's filesystem has {free} bytes free"),
            });
        }
    }

    let mut admission = Admission::default();
    let mut done = 0u64;
    for (index, layer) in image.layers().iter().enumerate() {
        let layer_digest = layer.digest().to_string();
        let stream = client.get_blob(&layer_digest)?;
        let mut verifying = Verifying { inner: stream, hasher: Sha256::new(), read: 0, limit: layer.size() };
        let mut report = |n: u64| {
            done += n;
            progress(Transfer { done, total });
        };
        let mut counted = Counted { inner: &mut verifying, report: &mut report };
        let unpacked = unpack_layer(&mut counted, &work, &mut admission, index);
        // Past the tar's end (or after a refused entry) the rest of the blob is read too: its
        // digest decides whether the registry's bytes were damaged or the image is bad.
        let drained = io::copy(&mut counted, &mut io::sink());
        let actual = format!("sha256:{}", hex(&verifying.hasher.clone().finalize()));
        let what = format!("layer {} ({layer_digest})", index + 1);
        if verifying.read != layer.size() && !matches!(&drained, Err(e) if e.kind() != io::ErrorKind::InvalidData) {
            return Err(RegistryError::DigestMismatch {
                target,
                what,
                expected: format!("{} bytes", layer.size()),
                actual: format!(
                    "{}{} bytes",
                    verifying.read,
                    if verifying.read > layer.size() { " or more" } else { "" }
                ),
            });
        }
        if let Err(e) = drained {
            return Err(RegistryError::Connect { target, what: format!("download of {what}"), reason: e.to_string() });
        }
        if actual != layer_digest {
            return Err(RegistryError::DigestMismatch { target, what, expected: layer_digest, actual });
        }
        if let Err(reason) = unpacked {
            return Err(RegistryError::BadImage { target, reason: format!("{what}: {reason}") });
        }
    }

    // Marked as pulled, then the trust check (it reads only the manifest and the signature), then
    // every byte.
    let origin = Origin::Pull { reference: reference.to_string(), digest: digest.clone() };
    write_origin(&work, &origin).map_err(io_ctx(format!("{}: cannot write the origin marker", work.display())))?;
    check_trust(&work, options.trust)
        .map_err(|e| RegistryError::Refused { target: target.clone(), reason: e.to_string() })?;
    let manifest =
        verify(&work).map_err(|source| RegistryError::Verify { path: PathBuf::from(reference.to_string()), source })?;
    let namespace = options.namespace.clone().unwrap_or_else(|| manifest.namespace.clone());
    validate_identity(&Identity {
        namespace: &namespace,
        container_id: &manifest.container_id,
        pod_namespace: manifest.pod_namespace.as_deref(),
        pod_name: manifest.pod_name.as_deref(),
        container_name: manifest.container_name.as_deref(),
    })
    .map_err(|e| RegistryError::Refused { target: target.clone(), reason: e.to_string() })?;

    let created = humantime::parse_rfc3339_weak(&manifest.created).unwrap_or_else(|_| SystemTime::now());
    let mut dest = store.new_checkpoint_path(&namespace, &manifest.container_id, created)?;
    if fs::symlink_metadata(&dest).is_ok() {
        dest = store.new_checkpoint_path(&namespace, &manifest.container_id, SystemTime::now())?;
    }
    if let Some(parent) = dest.parent() {
        private_dirs(parent).map_err(io_ctx(format!("{}: cannot create directory", parent.display())))?;
    }
    if fs::symlink_metadata(&dest).is_ok() {
        return Err(RegistryError::Refused { target, reason: format!("{} exists already", dest.display()) });
    }
    fs::rename(&work, &dest).map_err(io_ctx(format!("cannot move {} to {}", work.display(), dest.display())))?;
    guard.0 = None;
    if let Some(parent) = dest.parent() {
        if let Err(e) = File::open(parent).and_then(|d| d.sync_all()) {
            log::warn!("{}: cannot sync directory: {e}", parent.display());
        }
    }
    Ok(Pulled { path: dest, manifest, digest, bytes_downloaded: done })
}

/// The image manifest, parsed and checked: our format, tar layers only, bounded.
fn checked_image(client: &Client, bytes: &[u8]) -> Result<ImageManifest, RegistryError> {
    let bad = |reason: String| RegistryError::BadImage { target: client.target(), reason };
    let image: ImageManifest =
        serde_json::from_slice(bytes).map_err(|e| bad(format!("the manifest is not an OCI image manifest: {e}")))?;
    let format = image.annotations().as_ref().and_then(|a| a.get(ANNOTATION_FORMAT));
    match format.map(String::as_str) {
        Some(IMAGE_FORMAT) => {}
        Some(other) => {
            return Err(bad(format!("checkpoint image format {other:?}; this Kybernate reads {IMAGE_FORMAT:?}")))
        }
        None => return Err(bad(format!("not a Kybernate checkpoint image (no {ANNOTATION_FORMAT} annotation)"))),
    }
    if image.config().media_type().to_string() != CONFIG_MEDIA_TYPE {
        return Err(bad(format!("config media type {}", image.config().media_type())));
    }
    if image.layers().is_empty() || image.layers().len() > MAX_LAYERS {
        return Err(bad(format!("{} layers (1 to {MAX_LAYERS} expected)", image.layers().len())));
    }
    for layer in image.layers() {
        if layer.media_type().to_string() != LAYER_MEDIA_TYPE {
            return Err(bad(format!(
                "layer {} has media type {} (only {LAYER_MEDIA_TYPE})",
                layer.digest(),
                layer.media_type()
            )));
        }
        if layer.digest().algorithm().to_string() != "sha256" {
            return Err(bad(format!("layer digest {} is not sha256", layer.digest())));
        }
    }
    Ok(image)
}

/// A checkpoint in the store pulled from `digest` (its origin marker says so), in `namespace`
/// when one is asked for, if any.
fn held(store: &Store, digest: &str, namespace: Option<&str>) -> Option<PathBuf> {
    let subdirs = |p: &Path| -> Vec<PathBuf> {
        fs::read_dir(p)
            .map(|rd| {
                rd.flatten()
                    .filter(|e| !e.file_name().to_string_lossy().starts_with('.'))
                    .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
                    .map(|e| e.path())
                    .collect()
            })
            .unwrap_or_default()
    };
    for ns in subdirs(store.root()) {
        if namespace.is_some_and(|want| ns.file_name().is_some_and(|n| n != want)) {
            continue;
        }
        for container in subdirs(&ns) {
            for cp in subdirs(&container) {
                if let Ok(Some(Origin::Pull { digest: d, .. })) = read_origin(&cp) {
                    if d == digest {
                        return Some(cp);
                    }
                }
            }
        }
    }
    None
}

/// Removes the work dir on drop unless disarmed.
struct Cleanup(Option<PathBuf>);

impl Drop for Cleanup {
    fn drop(&mut self) {
        if let Some(p) = self.0.take() {
            if let Err(e) = fs::remove_dir_all(&p) {
                if e.kind() != io::ErrorKind::NotFound {
                    log::warn!("{}: cannot remove: {e}", p.display());
                }
            }
        }
    }
}

/// A blob's bytes, hashed and counted, never more than `limit` (+1 to notice an excess).
struct Verifying<R> {
    inner: R,
    hasher: Sha256,
    read: u64,
    limit: u64,
}

impl<R: Read> Read for Verifying<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.read > self.limit {
            return Err(io::Error::new(io::ErrorKind::InvalidData, "the blob is longer than its descriptor says"));
        }
        let room = usize::try_from(self.limit - self.read + 1).unwrap_or(usize::MAX).min(buf.len());
        let n = self.inner.read(&mut buf[..room])?;
        self.hasher.update(&buf[..n]);
        self.read += n as u64;
        if self.read > self.limit {
            return Err(io::Error::new(io::ErrorKind::InvalidData, "the blob is longer than its descriptor says"));
        }
        Ok(n)
    }
}

struct Counted<'a, R> {
    inner: &'a mut R,
    report: &'a mut dyn FnMut(u64),
}

impl<R: Read> Read for Counted<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        (self.report)(n as u64);
        Ok(n)
    }
}

/// What may be unpacked: before `kybernate.json` is read, a bounded number of entries (checked
/// against it when it arrives); after, only the files it lists, with their sizes, and the
/// directories holding them. Never `kybernate.origin`.
#[derive(Default)]
struct Admission {
    listed: Option<BTreeMap<String, u64>>,
    early: Vec<(String, Option<u64>)>,
}

impl Admission {
    fn admit(&mut self, rel: &str, size: Option<u64>) -> Result<(), String> {
        if rel == ORIGIN_FILE {
            return Err(format!("{ORIGIN_FILE} is this node's own record and never accepted from an image"));
        }
        if rel.split('/').count() > MAX_DEPTH {
            return Err(format!("nested deeper than {MAX_DEPTH} levels"));
        }
        if let Some(files) = &self.listed {
            return listed(files, rel, size);
        }
        if self.early.len() >= MAX_UNLISTED_ENTRIES {
            return Err(format!("more than {MAX_UNLISTED_ENTRIES} entries before {MANIFEST_FILE}"));
        }
        self.early.push((rel.to_string(), size));
        Ok(())
    }

    fn set_listed(&mut self, files: BTreeMap<String, u64>) -> Result<(), String> {
        for (rel, size) in &self.early {
            listed(&files, rel, *size).map_err(|why| format!("{rel:?}: {why}"))?;
        }
        self.listed = Some(files);
        Ok(())
    }
}

/// A listed file with its size, a directory holding one, or the manifest's companions.
fn listed(files: &BTreeMap<String, u64>, rel: &str, size: Option<u64>) -> Result<(), String> {
    if rel == MANIFEST_FILE || rel == crate::format::SIGNATURE_FILE {
        return Ok(());
    }
    match size {
        None => {
            let prefix = format!("{rel}/");
            match files.range(prefix.clone()..).next() {
                Some((first, _)) if first.starts_with(&prefix) => Ok(()),
                _ => Err("a directory with no file listed in kybernate.json".into()),
            }
        }
        Some(size) => match files.get(rel) {
            None => Err("not listed in kybernate.json".into()),
            Some(&want) if want != size => Err(format!("{size} bytes, kybernate.json says {want}")),
            Some(_) => Ok(()),
        },
    }
}

/// A relative path of plain names (no `..`, no root, no empty parts).
fn is_plain_relative(rel: &str) -> bool {
    !rel.is_empty()
        && Path::new(rel).components().all(|c| matches!(c, Component::Normal(_)))
        && !rel.split('/').any(|p| p.is_empty() || p == "." || p == "..")
}

fn private_dirs(dir: &Path) -> io::Result<()> {
    DirBuilder::new().recursive(true).mode(0o700).create(dir)
}

/// Unpacks one layer's tar entries into `work`: directories and regular files only, each path
/// plain and relative, admitted by `admission`, never over an existing file.
fn unpack_layer(reader: &mut dyn Read, work: &Path, admission: &mut Admission, index: usize) -> Result<(), String> {
    let mut tar = Archive::new(reader);
    let entries = tar.entries().map_err(|e| format!("not a tar: {e}"))?;
    for entry in entries {
        let mut entry = entry.map_err(|e| format!("not a valid tar: {e}"))?;
        let raw = String::from_utf8_lossy(&entry.path_bytes()).into_owned();
        let rel = raw.strip_prefix("./").unwrap_or(&raw).trim_end_matches('/').to_string();
        let refuse = |why: String| format!("entry {raw:?}: {why}");
        if rel.is_empty() || rel == "." {
            continue;
        }
        if !is_plain_relative(&rel) {
            return Err(refuse("absolute path or '..'".into()));
        }
        let dst = work.join(&rel);
        let size = entry.header().entry_size().map_err(|e| refuse(e.to_string()))?;
        match entry.header().entry_type() {
            EntryType::Directory => {
                admission.admit(&rel, None).map_err(refuse)?;
                private_dirs(&dst).map_err(|e| refuse(e.to_string()))?;
            }
            EntryType::Regular | EntryType::Continuous => {
                let is_manifest = rel == MANIFEST_FILE;
                if is_manifest && (size > MAX_MANIFEST_BYTES || index != 0) {
                    return Err(refuse(format!(
                        "{MANIFEST_FILE} must be in the first layer and under {MAX_MANIFEST_BYTES} bytes"
                    )));
                }
                admission.admit(&rel, Some(size)).map_err(refuse)?;
                if let Some(parent) = dst.parent() {
                    private_dirs(parent).map_err(|e| refuse(e.to_string()))?;
                }
                let mut f = match fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(&dst) {
                    Err(e) if e.kind() == io::ErrorKind::AlreadyExists => return Err(refuse("duplicate entry".into())),
                    other => other.map_err(|e| refuse(format!("cannot create {}: {e}", dst.display())))?,
                };
                let copied = if is_manifest {
                    let mut bytes = Vec::new();
                    (&mut entry).take(MAX_MANIFEST_BYTES).read_to_end(&mut bytes).map_err(|e| refuse(e.to_string()))?;
                    f.write_all(&bytes).map_err(|e| refuse(e.to_string()))?;
                    let parsed: Manifest =
                        serde_json::from_slice(&bytes).map_err(|e| refuse(format!("not a manifest: {e}")))?;
                    if let Some(bad) =
                        parsed.files.keys().find(|k| !is_plain_relative(k) || *k == MANIFEST_FILE || *k == ORIGIN_FILE)
                    {
                        return Err(refuse(format!("lists {bad:?}, not a plain relative path inside the checkpoint")));
                    }
                    admission
                        .set_listed(parsed.files.iter().map(|(k, v)| (k.clone(), v.size)).collect())
                        .map_err(refuse)?;
                    bytes.len() as u64
                } else {
                    io::copy(&mut entry, &mut f).map_err(|e| refuse(e.to_string()))?
                };
                if copied != size {
                    return Err(refuse(format!("truncated: {copied} of {size} bytes")));
                }
                f.sync_all().map_err(|e| refuse(e.to_string()))?;
            }
            EntryType::Symlink | EntryType::Link => return Err(refuse("links are not allowed in a checkpoint".into())),
            _ => return Err(refuse("only directories and regular files are allowed in a checkpoint".into())),
        }
    }
    if index == 0 && admission.listed.is_none() {
        return Err(format!("the first layer holds no {MANIFEST_FILE}"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn admission_refuses_the_origin_marker_unlisted_files_and_wrong_sizes() {
        let mut a = Admission::default();
        assert!(a.admit(ORIGIN_FILE, Some(3)).unwrap_err().contains("never accepted"));
        a.admit("checkpoint", None).unwrap();
        a.admit("checkpoint/inventory.img", Some(3)).unwrap();
        a.set_listed([("checkpoint/inventory.img".to_string(), 3), ("spec.dump".to_string(), 5)].into()).unwrap();
        assert!(a.admit("spec.dump", Some(5)).is_ok());
        assert!(a.admit("spec.dump", Some(6)).unwrap_err().contains("says 5"));
        assert!(a.admit("stray", Some(1)).is_err());
        assert!(a.admit("kybernate.sig", Some(64)).is_ok());
        let mut a = Admission::default();
        a.admit("evil", Some(1)).unwrap();
        assert!(a.set_listed([("x".to_string(), 1)].into()).is_err());
        assert!(!is_plain_relative("../x") && !is_plain_relative("/x") && !is_plain_relative("a//b"));
    }

    #[test]
    fn a_blob_longer_than_its_descriptor_is_cut_off() {
        let data = [1u8; 100];
        let mut v = Verifying { inner: &data[..], hasher: Sha256::new(), read: 0, limit: 99 };
        assert!(io::copy(&mut v, &mut io::sink()).is_err());
        assert!(v.read <= 100);
        let mut v = Verifying { inner: &data[..], hasher: Sha256::new(), read: 0, limit: 100 };
        assert_eq!(io::copy(&mut v, &mut io::sink()).unwrap(), 100);
    }
}
