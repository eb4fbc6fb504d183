//! The checkpoint image format: which files go into which layer, the layers' deterministic tar
//! streams, and the media types and annotations (docs/architecture.md, "Checkpoint images").
//!
//! Unpacked together, the layers give the checkpoint's directory (the checkpointctl archive
//! layout plus `kybernate.json` and `kybernate.sig`). Each file of at least [`LARGE_FILE`] bytes
//! has a layer of its own, the small files share the first one. Tar headers carry no time, owner
//! or varying mode, so an unchanged file gives the same layer digest in every push.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{self, Read};
use std::path::{Path, PathBuf};

use kybernate_checkpoint::{Manifest, MANIFEST_FILE};
use sha2::{Digest as _, Sha256};
use tar::{EntryType, Header};

use crate::client::hex;

/// Uncompressed tar layers: checkpoints are mostly memory pages, which compress poorly and
/// whose compression would cost more time than the network saves on a cluster's links.
pub const LAYER_MEDIA_TYPE: &str = "application/vnd.oci.image.layer.v1.tar";
pub const CONFIG_MEDIA_TYPE: &str = "application/vnd.oci.image.config.v1+json";
/// Files this large get a layer of their own (memory pages, the rootfs diff).
pub const LARGE_FILE: u64 = 8 << 20;
/// The signature beside the manifest (contract 1), carried in the small-files layer when present.
pub use kybernate_checkpoint::signing::SIGNATURE_FILE;
/// This node's record of where a checkpoint came from: never accepted from an image.
pub use kybernate_checkpoint::trust::ORIGIN_FILE;

/// CRI-O's (and Podman's) mark of a checkpoint image: the container's name.
pub const ANNOTATION_CRIO_NAME: &str = "io.kubernetes.cri-o.annotations.checkpoint.name";
/// checkpointctl's annotations (`org.criu.checkpoint.*`), as `checkpointctl build` sets them.
pub const ANNOTATION_ENGINE: &str = "org.criu.checkpoint.engine.name";
pub const ANNOTATION_NAME: &str = "org.criu.checkpoint.container.name";
pub const ANNOTATION_POD: &str = "org.criu.checkpoint.pod.name";
pub const ANNOTATION_NAMESPACE: &str = "org.criu.checkpoint.pod.namespace";
pub const ANNOTATION_ROOTFS_IMAGE_NAME: &str = "org.criu.checkpoint.rootfsImageName";
pub const ANNOTATION_RUNTIME_NAME: &str = "org.criu.checkpoint.runtime.name";
pub const ANNOTATION_CRIU_VERSION: &str = "org.criu.checkpoint.criu.version";
pub const ANNOTATION_HOST_KERNEL: &str = "org.criu.checkpoint.host.kernel";
pub const ANNOTATION_HOST_ARCH: &str = "org.criu.checkpoint.host.arch";
/// Ours: the image format version (its presence marks a Kybernate checkpoint image).
pub const ANNOTATION_FORMAT: &str = "io.kybernate.checkpoint.format";
pub const IMAGE_FORMAT: &str = "1";
/// Ours, on the manifest: the containerd namespace, container id and time of the checkpoint.
pub const ANNOTATION_CK_NAMESPACE: &str = "io.kybernate.checkpoint.namespace";
pub const ANNOTATION_CK_CONTAINER: &str = "io.kybernate.checkpoint.container-id";
pub const ANNOTATION_CK_CREATED: &str = "io.kybernate.checkpoint.created";
/// Ours, on a large file's layer: `<path>:<size>:<digest from kybernate.json>`, so that the
/// next push of the same tag finds an unchanged file's layer without reading the file.
pub const ANNOTATION_LAYER_CONTENT: &str = "io.kybernate.layer.content";
/// The standard OCI title annotation: the layer's one file (large layers only).
pub const ANNOTATION_TITLE: &str = "org.opencontainers.image.title";

/// One layer to be pushed: its files (relative paths, sizes) in order.
#[derive(Debug, Clone)]
pub struct LayerPlan {
    pub files: Vec<(String, u64)>,
    /// For a large file's layer: [`ANNOTATION_LAYER_CONTENT`]'s value.
    pub content: Option<String>,
}

impl LayerPlan {
    /// The directories to announce before the files, each once, in order.
    fn dirs(&self) -> Vec<String> {
        let mut dirs: Vec<String> = Vec::new();
        for (rel, _) in &self.files {
            let parts: Vec<&str> = rel.split('/').collect();
            for i in 1..parts.len() {
                let d = parts[..i].join("/");
                if !dirs.contains(&d) {
                    dirs.push(d);
                }
            }
        }
        dirs
    }

    /// The tar stream's exact length: a header per directory and file, the data padded to 512,
    /// and the two zero blocks at the end.
    pub fn len(&self) -> u64 {
        let data: u64 = self.files.iter().map(|(_, size)| 512 + size.div_ceil(512) * 512).sum();
        self.dirs().len() as u64 * 512 + data + 1024
    }

    pub fn is_empty(&self) -> bool {
        self.files.is_empty()
    }
}

/// The layers of a checkpoint's image: the manifest, the signature (if any) and every small
/// file first, then each large file alone, in the manifest's order.
pub fn plan(dir: &Path, manifest: &Manifest) -> io::Result<Vec<LayerPlan>> {
    let mut small = Vec::new();
    for extra in [MANIFEST_FILE, SIGNATURE_FILE] {
        match std::fs::symlink_metadata(dir.join(extra)) {
            Ok(m) if m.is_file() => small.push((extra.to_string(), m.len())),
            Ok(_) => return Err(io::Error::new(io::ErrorKind::InvalidData, format!("{extra} is not a regular file"))),
            Err(e) if e.kind() == io::ErrorKind::NotFound && extra != MANIFEST_FILE => {}
            Err(e) => return Err(e),
        }
    }
    let mut large = Vec::new();
    for (rel, entry) in &manifest.files {
        if entry.size >= LARGE_FILE {
            let content = format!("{rel}:{}:{}", entry.size, entry.digest_text());
            large.push(LayerPlan { files: vec![(rel.clone(), entry.size)], content: Some(content) });
        } else {
            small.push((rel.clone(), entry.size));
        }
    }
    let mut layers = vec![LayerPlan { files: small, content: None }];
    layers.extend(large);
    Ok(layers)
}

/// A deterministic ustar header.
fn header(path: &str, kind: EntryType, size: u64) -> io::Result<[u8; 512]> {
    let mut h = Header::new_ustar();
    h.set_path(path)?;
    h.set_entry_type(kind);
    h.set_size(size);
    h.set_mode(if kind == EntryType::Directory { 0o700 } else { 0o600 });
    h.set_uid(0);
    h.set_gid(0);
    h.set_mtime(0);
    h.set_cksum();
    Ok(*h.as_bytes())
}

enum Segment {
    Bytes(Vec<u8>),
    File { path: PathBuf, size: u64 },
    Zeros(u64),
}

/// A layer's tar stream, produced while it is read (no temporary file, bounded memory), hashed
/// (sha256) and counted on the way. A file that is shorter than planned fails the read.
pub struct LayerReader<'a> {
    segments: std::vec::IntoIter<Segment>,
    current: Option<(Segment, u64, Option<File>)>,
    hasher: Sha256,
    pub done: u64,
    progress: &'a mut dyn FnMut(u64),
}

impl<'a> LayerReader<'a> {
    /// The stream of `layer`'s files under `dir`. `progress` gets every read's byte count.
    pub fn new(dir: &Path, layer: &LayerPlan, progress: &'a mut dyn FnMut(u64)) -> io::Result<Self> {
        let mut segments = Vec::new();
        for d in layer.dirs() {
            segments.push(Segment::Bytes(header(&format!("{d}/"), EntryType::Directory, 0)?.to_vec()));
        }
        for (rel, size) in &layer.files {
            segments.push(Segment::Bytes(header(rel, EntryType::Regular, *size)?.to_vec()));
            segments.push(Segment::File { path: dir.join(rel), size: *size });
            let pad = size.div_ceil(512) * 512 - size;
            if pad > 0 {
                segments.push(Segment::Zeros(pad));
            }
        }
        segments.push(Segment::Zeros(1024));
        Ok(Self { segments: segments.into_iter(), current: None, hasher: Sha256::new(), done: 0, progress })
    }

    /// `sha256:<hex>` of everything read so far.
    pub fn digest(&self) -> String {
        format!("sha256:{}", hex(&self.hasher.clone().finalize()))
    }
}

impl Read for LayerReader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            if self.current.is_none() {
                match self.segments.next() {
                    Some(s) => self.current = Some((s, 0, None)),
                    None => return Ok(0),
                }
            }
            let (segment, pos, file) = self.current.as_mut().expect("set above");
            let n = match segment {
                Segment::Bytes(bytes) => {
                    let rest = &bytes[*pos as usize..];
                    let n = rest.len().min(buf.len());
                    buf[..n].copy_from_slice(&rest[..n]);
                    n
                }
                Segment::Zeros(len) => {
                    let n = ((*len - *pos) as usize).min(buf.len());
                    buf[..n].fill(0);
                    n
                }
                Segment::File { path, size } => {
                    if file.is_none() {
                        *file = Some(
                            File::open(&*path)
                                .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", path.display())))?,
                        );
                    }
                    let want = ((*size - *pos) as usize).min(buf.len());
                    if want == 0 {
                        0
                    } else {
                        let n = file.as_mut().expect("opened above").read(&mut buf[..want])?;
                        if n == 0 {
                            return Err(io::Error::new(
                                io::ErrorKind::UnexpectedEof,
                                format!("{}: shorter than the {size} bytes its manifest lists", path.display()),
                            ));
                        }
                        n
                    }
                }
            };
            let total = match segment {
                Segment::Bytes(b) => b.len() as u64,
                Segment::Zeros(len) => *len,
                Segment::File { size, .. } => *size,
            };
            *pos += n as u64;
            if *pos >= total {
                self.current = None;
            }
            if n == 0 {
                continue;
            }
            self.hasher.update(&buf[..n]);
            self.done += n as u64;
            (self.progress)(n as u64);
            return Ok(n);
        }
    }
}

/// The manifest's annotations: CRI-O's and checkpointctl's (so those tools recognise a
/// checkpoint image) and ours.
pub fn annotations(manifest: &Manifest) -> BTreeMap<String, String> {
    let mut a = BTreeMap::new();
    let name = manifest.container_name.clone().unwrap_or_else(|| manifest.container_id.clone());
    a.insert(ANNOTATION_CRIO_NAME.to_string(), name.clone());
    a.insert(ANNOTATION_ENGINE.to_string(), "kybernate".to_string());
    a.insert(ANNOTATION_NAME.to_string(), name);
    if let Some(pod) = &manifest.pod_name {
        a.insert(ANNOTATION_POD.to_string(), pod.clone());
    }
    if let Some(ns) = &manifest.pod_namespace {
        a.insert(ANNOTATION_NAMESPACE.to_string(), ns.clone());
    }
    if let Some(image) = &manifest.image {
        a.insert(ANNOTATION_ROOTFS_IMAGE_NAME.to_string(), image.clone());
    }
    a.insert(ANNOTATION_RUNTIME_NAME.to_string(), manifest.runtime.path.display().to_string());
    a.insert(ANNOTATION_CRIU_VERSION.to_string(), manifest.criu.version.clone());
    a.insert(ANNOTATION_HOST_KERNEL.to_string(), manifest.kernel.clone());
    a.insert(ANNOTATION_HOST_ARCH.to_string(), oci_arch().to_string());
    a.insert(ANNOTATION_FORMAT.to_string(), IMAGE_FORMAT.to_string());
    a.insert(ANNOTATION_CK_NAMESPACE.to_string(), manifest.namespace.clone());
    a.insert(ANNOTATION_CK_CONTAINER.to_string(), manifest.container_id.clone());
    a.insert(ANNOTATION_CK_CREATED.to_string(), manifest.created.clone());
    a
}

/// This machine's architecture in OCI's words.
pub fn oci_arch() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_layer_stream_is_a_deterministic_tar_of_the_planned_length() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("checkpoint")).unwrap();
        std::fs::write(dir.path().join("checkpoint/pages-1.img"), vec![7u8; 1000]).unwrap();
        std::fs::write(dir.path().join("kybernate.json"), b"{}").unwrap();
        let layer = LayerPlan {
            files: vec![("kybernate.json".into(), 2), ("checkpoint/pages-1.img".into(), 1000)],
            content: None,
        };
        let read = || {
            let mut noop = |_| {};
            let mut r = LayerReader::new(dir.path(), &layer, &mut noop).unwrap();
            let mut out = Vec::new();
            r.read_to_end(&mut out).unwrap();
            (out, r.digest())
        };
        let (bytes, digest) = read();
        assert_eq!(bytes.len() as u64, layer.len());
        assert_eq!(read().1, digest, "the same files give the same digest");
        let mut archive = tar::Archive::new(&bytes[..]);
        let names: Vec<String> =
            archive.entries().unwrap().map(|e| e.unwrap().path().unwrap().display().to_string()).collect();
        assert_eq!(names, ["checkpoint/", "kybernate.json", "checkpoint/pages-1.img"]);

        std::fs::write(dir.path().join("checkpoint/pages-1.img"), vec![7u8; 999]).unwrap();
        let mut noop = |_| {};
        let mut r = LayerReader::new(dir.path(), &layer, &mut noop).unwrap();
        let err = r.read_to_end(&mut Vec::new()).unwrap_err();
        assert!(err.to_string().contains("shorter than"), "{err}");
    }
}
