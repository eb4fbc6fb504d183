//! Moving checkpoints between nodes as single tar files, in the layout
//! checkpointctl and `kubectl checkpoint` archives use, plain or zstd-compressed.

use std::borrow::Cow;
use std::cell::{Cell, RefCell};
use std::collections::{BTreeMap, BTreeSet};
use std::fs::{self, DirBuilder, File};
use std::io::{self, BufRead, BufReader, BufWriter, Read, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::time::SystemTime;

use tar::{Archive, Builder, EntryType, Header};

use crate::digest::Algorithm;
use crate::fsutil::{AtomicFile, Durability};
use crate::images::{CheckpointImages, ImageError};
use crate::manifest::{
    clamp_time, rfc3339, validate_identity, DumpStats, Identity, Manifest, ManifestError, ToolInfo, CONFIG_DUMP,
    FORMAT_VERSION, IMAGES_DIR, MANIFEST_FILE, OLDEST_FORMAT_VERSION, ROOTFS_DIFF, SPEC_DUMP, STATS_DUMP,
};
use crate::rootfs::{overlay_diff_from_oci_layer, RootfsError};
use crate::signing::SIGNATURE_FILE;
use crate::store::{
    collect_files, create_private_dirs, fsync_dir, is_plain_relative, verify, write_manifest, Store, StoreError,
    VerifyError, SIDE_FILES,
};
use crate::trust::{self, Origin, TrustError, TrustPolicy, ORIGIN_FILE};

/// Why a checkpoint could not be exported or imported. Every variant names the file at fault.
#[derive(Debug, thiserror::Error)]
pub enum ArchiveError {
    #[error("{}: {source}", path.display())]
    Verify {
        /// The checkpoint directory (export) or the archive (import).
        path: PathBuf,
        #[source]
        source: VerifyError,
    },
    #[error("{}: refused archive entry {entry:?}: {reason}", archive.display())]
    Entry { archive: PathBuf, entry: String, reason: Cow<'static, str> },
    /// The archive's manifest (or, in a kubelet archive, the shim's manifest beside CRIU's
    /// images) is not one this version writes: unparsable, another format version, or a field
    /// (namespace, container id, created, a file path) the store cannot hold.
    #[error("{}: entry {entry:?}: invalid checkpoint manifest: {reason}", archive.display())]
    Manifest { archive: PathBuf, entry: String, reason: String },
    /// Not a tar archive, or one damaged inside a header: `offset` is where the bad header
    /// starts, `after` the last entry read whole.
    #[error("{}: not a valid tar archive at byte {offset} (entry {index}{}): {reason}", archive.display(), after.as_ref().map(|a| format!(", after {a:?}")).unwrap_or_default())]
    Malformed { archive: PathBuf, index: usize, offset: u64, after: Option<String>, reason: String },
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: io::Error,
    },
    /// The node's trust policy refuses the checkpoint (`[trust] keys` with signatures required):
    /// unsigned, or signed by a key the node does not trust. `kubelet`: a kubelet/crictl/Podman
    /// archive, whose manifest this import generated, so it can carry no signature of ours.
    #[error("{}: import refused by this node's trust policy{}: {}", archive.display(), if *kubelet { " (a kubelet/crictl/Podman checkpoint archive is never signed: Kybernate generates its manifest on import)" } else { "" }, trust_refusal(source))]
    Untrusted {
        archive: PathBuf,
        kubelet: bool,
        #[source]
        source: Box<TrustError>,
    },
    /// The rootfs diff of a kubelet/crictl archive could not be made ours.
    #[error("{}: {source}", archive.display())]
    RootfsDiff {
        archive: PathBuf,
        #[source]
        source: RootfsError,
    },
    /// A zstd archive whose stream does not decode: truncated, corrupt, or followed by bytes that
    /// are no zstd frame. `compressed` is how far the archive was read (to within a buffer),
    /// `decompressed` how much of the tar inside it came out.
    #[error("{}: corrupt zstd stream near byte {compressed} of the archive ({decompressed} bytes of tar decompressed{}): {reason}", archive.display(), after.as_ref().map(|a| format!(", after entry {a:?}")).unwrap_or_default())]
    Compressed { archive: PathBuf, compressed: u64, decompressed: u64, after: Option<String>, reason: String },
    /// A zstd archive that decompresses to more than its manifest declares (or, before a
    /// manifest, to more than [`MAX_UNLISTED_BYTES`]): refused before the excess is written.
    #[error("{}: decompresses to more than {limit} bytes, {why}", archive.display())]
    Oversized { archive: PathBuf, limit: u64, why: &'static str },
    /// The files the archive's manifest declares do not fit into the store's filesystem.
    #[error("{}: its manifest declares {declared} bytes of files, the store's filesystem ({}) has {available} bytes free", archive.display(), store.display())]
    NoSpace { archive: PathBuf, store: PathBuf, declared: u64, available: u64 },
    /// The namespace an import was given for a kubelet archive's checkpoint is not a
    /// containerd identifier.
    #[error("namespace {value:?} is not a valid containerd identifier (letters and digits, separated by single '.', '_' or '-', at most 76 characters)")]
    BadNamespace { value: String },
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Why the trust policy refuses an import, without the hidden work dir the check ran on.
fn trust_refusal(e: &TrustError) -> String {
    match e {
        TrustError::Unsigned { trusted, .. } => format!(
            "not signed (no {SIGNATURE_FILE}); this node takes checkpoints from outside only when signed by a key in [trust] keys ({trusted})"
        ),
        TrustError::Untrusted { key_id, trusted, .. } => {
            format!("signed by key {key_id}, which is not one of this node's trusted keys ([trust] keys: {trusted})")
        }
        TrustError::BadSignature { key_id, key_path, .. } => format!(
            "the signature by trusted key {key_id} ({}) does not match the archive's manifest: it was tampered with, or the signature belongs to another checkpoint",
            key_path.display()
        ),
        other => other.to_string(),
    }
}

/// How `export` writes the tar. Reading needs no choice: `import` knows zstd by its magic.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Compression {
    /// A plain tar: the fastest on a local disk (docs/benchmarks.md, "Compression").
    #[default]
    None,
    /// One zstd stream (level [`ZSTD_LEVEL`], on every core, with frame checksums) around the tar.
    Zstd,
}

/// zstd's level for exports: level -1 is faster but gives up float arrays' 18% (ratio 1.0), level 3
/// is 20-40% slower for at most 2% more (docs/benchmarks.md, "Compression").
pub const ZSTD_LEVEL: i32 = 1;
/// Every zstd frame starts with these bytes (RFC 8878), and no tar does (a tar starts with a name).
pub const ZSTD_MAGIC: [u8; 4] = [0x28, 0xB5, 0x2F, 0xFD];

/// Where an export or import is, for a progress line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// Every byte of the checkpoint is being hashed (before an export, after an import's unpack).
    Verify,
    /// `done` of `total` bytes: an export's tar written (before compression), an import's
    /// archive read (as stored, compressed or not).
    Copy { done: u64, total: u64 },
}

/// How often progress is reported while bytes move.
const PROGRESS_EVERY: u64 = 16 << 20;

fn io_ctx(context: String) -> impl FnOnce(io::Error) -> ArchiveError {
    move |source| ArchiveError::Io { context, source }
}

/// Removes a path on drop unless disarmed: nothing half-written is left behind.
struct Cleanup(Option<PathBuf>);

impl Drop for Cleanup {
    fn drop(&mut self) {
        let Some(p) = self.0.take() else { return };
        let result = if p.is_dir() { fs::remove_dir_all(&p) } else { fs::remove_file(&p) };
        if let Err(e) = result {
            if e.kind() != io::ErrorKind::NotFound {
                log::warn!("{}: cannot remove: {e}", p.display());
            }
        }
    }
}

/// Writes one checkpoint as a single uncompressed tar with the checkpoint's files at the archive root
/// (checkpoint/..., config.dump, spec.dump, rootfs-diff.tar, kybernate.json — the checkpointctl layout).
/// The checkpoint is verified first; the tar is written to a hidden sibling of `out` and renamed when complete.
pub fn export(dir: &Path, out: &Path) -> Result<Manifest, ArchiveError> {
    export_with(dir, out, Compression::None, &mut |_| {})
}

/// [`export`], compressed as asked, reporting progress.
pub fn export_with(
    dir: &Path,
    out: &Path,
    compression: Compression,
    progress: &mut dyn FnMut(Step),
) -> Result<Manifest, ArchiveError> {
    progress(Step::Verify);
    let manifest = verify(dir).map_err(|source| ArchiveError::Verify { path: dir.to_path_buf(), source })?;
    let ctx = || format!("{}: cannot write archive", out.display());
    let mut file = AtomicFile::create(out, 0o600, Durability::Machine).map_err(io_ctx(ctx()))?;
    let total = manifest.files.values().map(|f| f.size).sum::<u64>();
    let sink = BufWriter::with_capacity(1 << 20, file.file());
    let written = match compression {
        Compression::None => write_tar(sink, dir, &manifest, total, progress).map(drop),
        Compression::Zstd => zstd_encoder(sink)
            .and_then(|enc| write_tar(enc, dir, &manifest, total, progress))
            .and_then(|enc| enc.finish())
            // The frame's end is in the buffer: write it out here, where an error is seen.
            .and_then(|mut sink| sink.flush()),
    };
    written.and_then(|()| file.commit()).map_err(io_ctx(ctx()))?;
    Ok(manifest)
}

fn zstd_encoder<W: Write>(w: W) -> io::Result<zstd::Encoder<'static, W>> {
    let mut enc = zstd::Encoder::new(w, ZSTD_LEVEL)?;
    enc.include_checksum(true)?;
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get()) as u32;
    if threads > 1 {
        enc.multithread(threads)?;
    }
    Ok(enc)
}

/// The tar of the checkpoint into `w` (flushed); returns `w` for the caller to finish.
fn write_tar<W: Write>(
    w: W,
    dir: &Path,
    manifest: &Manifest,
    total: u64,
    progress: &mut dyn FnMut(Step),
) -> io::Result<W> {
    let mut builder = Builder::new(Counting { inner: w, done: 0, total, reported: 0, progress });
    builder.follow_symlinks(false);
    append_checkpoint(&mut builder, dir, manifest)?;
    let mut counted = builder.into_inner()?;
    counted.inner.flush()?;
    (counted.progress)(Step::Copy { done: counted.done, total: counted.done.max(total) });
    Ok(counted.inner)
}

/// Counts the tar's bytes on their way to the (compressing) writer, for progress.
struct Counting<'a, W> {
    inner: W,
    done: u64,
    total: u64,
    reported: u64,
    progress: &'a mut dyn FnMut(Step),
}

impl<W: Write> Write for Counting<'_, W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.done += n as u64;
        if self.done - self.reported >= PROGRESS_EVERY {
            self.reported = self.done;
            (self.progress)(Step::Copy { done: self.done, total: self.total.max(self.done) });
        }
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// The manifest, then every listed file, each directory announced once before its first file so
/// that plain `tar -x` recreates it with our mode.
fn append_checkpoint<W: Write>(builder: &mut Builder<W>, dir: &Path, manifest: &Manifest) -> io::Result<()> {
    let mut dirs = BTreeSet::new();
    let mtime = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_secs());
    // The signature travels with the checkpoint, right after the manifest it signs (never the
    // origin marker: that is this node's own record).
    let signature = fs::symlink_metadata(dir.join(SIGNATURE_FILE)).is_ok_and(|m| m.is_file()).then_some(SIGNATURE_FILE);
    let listed = manifest.files.keys().map(String::as_str);
    for rel in std::iter::once(MANIFEST_FILE).chain(signature).chain(listed) {
        let parts: Vec<&str> = rel.split('/').collect();
        for i in 1..parts.len() {
            let d = parts[..i].join("/");
            if dirs.insert(d.clone()) {
                let mut h = Header::new_gnu();
                h.set_entry_type(EntryType::Directory);
                h.set_mode(0o700);
                h.set_mtime(mtime);
                h.set_size(0);
                builder.append_data(&mut h, format!("{d}/"), io::empty())?;
            }
        }
        builder.append_path_with_name(dir.join(rel), rel)?;
    }
    Ok(())
}

/// Imports an archive into the store: unpacks it into a hidden dir under the store root (only plain
/// relative directories and regular files are accepted), verifies it, then moves it to
/// `store.new_checkpoint_path(namespace, container_id, created)` (or now, if that exists).
/// Returns the final path and manifest; on any error nothing is left in the store.
pub fn import(archive: &Path, store: &Store) -> Result<(PathBuf, Manifest), ArchiveError> {
    import_with(archive, store, &mut |_| {})
}

/// [`import`], reporting progress. A zstd archive (known by [`ZSTD_MAGIC`]) is decompressed
/// as it is read, under the same checks, and never to more than its manifest declares.
pub fn import_with(
    archive: &Path,
    store: &Store,
    progress: &mut dyn FnMut(Step),
) -> Result<(PathBuf, Manifest), ArchiveError> {
    import_opts(archive, store, &ImportOptions::default(), progress)
}

/// The containerd namespace of a kubelet/crictl/Podman archive's checkpoint when the import names
/// none: CRI's (the kubelet's containers live there, and its restore annotation resolves there).
pub const KUBELET_ARCHIVE_NAMESPACE: &str = "k8s.io";

/// What an import needs beyond the archive and the store.
#[derive(Debug, Default, Clone, Copy)]
pub struct ImportOptions<'a> {
    /// The containerd namespace a kubelet/crictl/Podman archive's checkpoint is stored under
    /// (such an archive records none); default [`KUBELET_ARCHIVE_NAMESPACE`]. An archive of ours
    /// keeps its manifest's namespace.
    pub namespace: Option<&'a str>,
    /// The node's trust policy, checked on the unpacked checkpoint (origin marker written)
    /// before it becomes visible; `None`: not checked here (the restore paths check it).
    pub trust: Option<&'a TrustPolicy>,
}

/// [`import_with`] with [`ImportOptions`]. Every import marks the checkpoint with its origin
/// (`kybernate.origin`: imported from `archive`) before it becomes visible; an archive that
/// carries such a marker itself is refused.
pub fn import_opts(
    archive: &Path,
    store: &Store,
    opts: &ImportOptions<'_>,
    progress: &mut dyn FnMut(Step),
) -> Result<(PathBuf, Manifest), ArchiveError> {
    if let Some(value) = opts.namespace.filter(|ns| !crate::manifest::valid_identifier(ns)) {
        return Err(ArchiveError::BadNamespace { value: value.to_string() });
    }
    create_private_dirs(store.root())?;
    let nanos = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_nanos());
    let work = store.root().join(format!(".import-{}-{nanos}", std::process::id()));
    DirBuilder::new()
        .mode(0o700)
        .create(&work)
        .map_err(io_ctx(format!("{}: cannot create directory", work.display())))?;
    let mut guard = Cleanup(Some(work.clone()));
    unpack(archive, &work, progress)?;
    progress(Step::Verify);
    let kubelet = is_cri_archive(&work);
    let manifest = if !kubelet {
        verify(&work).map_err(|source| ArchiveError::Verify { path: archive.to_path_buf(), source })?
    } else if work.join(INNER_MANIFEST).exists() {
        adopt_cri_checkpoint(archive, &work)?
    } else {
        let namespace = opts.namespace.unwrap_or(KUBELET_ARCHIVE_NAMESPACE);
        adopt_kubelet_archive(archive, &work, namespace, SystemTime::now())?
    };
    let origin = Origin::Import { archive: archive.display().to_string() };
    trust::write_origin(&work, &origin).map_err(io_ctx(format!("{}: cannot write {ORIGIN_FILE}", work.display())))?;
    if let Some(policy) = opts.trust {
        trust::check_trust(&work, policy).map_err(|source| ArchiveError::Untrusted {
            archive: archive.to_path_buf(),
            kubelet,
            source: Box::new(source),
        })?;
    }

    let created = humantime::parse_rfc3339_weak(&manifest.created).unwrap_or_else(|_| SystemTime::now());
    let mut dest = store.new_checkpoint_path(&manifest.namespace, &manifest.container_id, created)?;
    if fs::symlink_metadata(&dest).is_ok() {
        dest = store.new_checkpoint_path(&manifest.namespace, &manifest.container_id, SystemTime::now())?;
    }
    if let Some(parent) = dest.parent() {
        create_private_dirs(parent)?;
    }
    if fs::symlink_metadata(&dest).is_ok() {
        return Err(StoreError::TargetExists { target: dest }.into());
    }
    fs::rename(&work, &dest).map_err(io_ctx(format!("cannot move {} to {}", work.display(), dest.display())))?;
    guard.0 = None;
    if let Some(parent) = dest.parent() {
        if let Err(e) = fsync_dir(parent) {
            log::warn!("{}: cannot sync directory: {e}", parent.display());
        }
    }
    Ok((dest, manifest))
}

/// The shape of the archives CRI writes for the kubelet (containerd ≥ 2.0, CRI-O; Podman's
/// `--export` too): CRIU's images under `checkpoint/`, the container's config beside them, and
/// no manifest of ours at the root. What is missing of that shape is named later.
fn is_cri_archive(dir: &Path) -> bool {
    !dir.join(MANIFEST_FILE).exists()
        && (dir.join(IMAGES_DIR).is_dir() || dir.join(CONFIG_DUMP).is_file() || dir.join(SPEC_DUMP).is_file())
}

/// A signature beside a manifest this import replaces (a kubelet archive's) signs nothing here.
fn refuse_signature(archive: &Path, work: &Path) -> Result<(), ArchiveError> {
    if fs::symlink_metadata(work.join(SIGNATURE_FILE)).is_ok() {
        return Err(ArchiveError::Entry {
            archive: archive.to_path_buf(),
            entry: SIGNATURE_FILE.into(),
            reason: "a signature in a kubelet/crictl archive, which has no manifest of ours for it to sign".into(),
        });
    }
    Ok(())
}

/// Rewrites an unpacked archive's rootfs diff (an OCI layer, gzipped by containerd 2.x) in our
/// form, in place; whether there is one.
fn adopt_rootfs_diff(archive: &Path, work: &Path) -> Result<bool, ArchiveError> {
    let diff = work.join(ROOTFS_DIFF);
    if !diff.is_file() {
        return Ok(false);
    }
    let ours = work.join(format!(".{ROOTFS_DIFF}"));
    overlay_diff_from_oci_layer(&diff, &ours)
        .map_err(|source| ArchiveError::RootfsDiff { archive: archive.to_path_buf(), source })?;
    fs::rename(&ours, &diff).map_err(io_ctx(format!("cannot move {} to {}", ours.display(), diff.display())))?;
    Ok(true)
}

/// Makes an unpacked kubelet/crictl archive (containerd 2.x's CRI, taken through our shim) a
/// checkpoint of our store, in place. The shim's flat manifest in `checkpoint/` vouches for CRIU's
/// images, which are verified against it first; CRI's own files (`config.dump`, `spec.dump`,
/// `status.dump`, the rootfs diff, ...) carry no checksum, so the new manifest records them as
/// they arrived. The rootfs diff, an OCI layer there, is rewritten in our form.
fn adopt_cri_checkpoint(archive: &Path, work: &Path) -> Result<Manifest, ArchiveError> {
    refuse_signature(archive, work)?;
    let images = work.join(IMAGES_DIR);
    let verified = verify(&images).map_err(|source| ArchiveError::Verify { path: archive.to_path_buf(), source })?;
    if !verified.flat {
        return Err(ArchiveError::Entry {
            archive: archive.to_path_buf(),
            entry: INNER_MANIFEST.into(),
            reason: "not the manifest our shim writes beside CRIU's images for CRI (flat)".into(),
        });
    }
    let inner = images.join(MANIFEST_FILE);
    fs::remove_file(&inner).map_err(io_ctx(format!("{}: cannot remove", inner.display())))?;
    let rootfs_diff = adopt_rootfs_diff(archive, work)?;

    // CRIU's images as verified; every other file as it arrived (hashed once, here). Images of an
    // older format are hashed again in the current one (just verified, in our private work dir),
    // so that one manifest never mixes formats.
    let current = Algorithm::current();
    let mut files = BTreeMap::new();
    if verified.format_version == FORMAT_VERSION && verified.digest == current.params() {
        files.extend(verified.files.iter().map(|(rel, entry)| (format!("{IMAGES_DIR}/{rel}"), entry.clone())));
        collect_files(work, "", &[IMAGES_DIR], &mut files)?;
    } else {
        collect_files(work, "", &[], &mut files)?;
    }
    let manifest = Manifest {
        format_version: FORMAT_VERSION,
        digest: current.params(),
        files,
        flat: false,
        rootfs_diff,
        ..verified
    };
    write_manifest(work, &manifest)?;
    Ok(manifest)
}

/// The most of `config.dump`, `spec.dump` and `status.dump` read into memory (an OCI spec with
/// every annotation and mount is tens of KiB).
const MAX_DUMP_BYTES: u64 = 4 << 20;
/// The most of CRIU's `dump.log` read for its version lines (they are its first).
const DUMP_LOG_HEAD: u64 = 64 << 10;
/// CRIU's log of the dump, which containerd 2.x and CRI-O put into their archives.
const DUMP_LOG: &str = "dump.log";
/// CRI's status of the container at the checkpoint (its labels name the pod).
const STATUS_DUMP: &str = "status.dump";
/// Where CRI and CRI-O record a container's pod and name: annotations of its spec (containerd's
/// first, then the kubelet's labels as CRI-O copies them), then the labels of `status.dump`.
const POD_NAMESPACE_KEYS: [&str; 2] = ["io.kubernetes.cri.sandbox-namespace", "io.kubernetes.pod.namespace"];
const POD_NAME_KEYS: [&str; 2] = ["io.kubernetes.cri.sandbox-name", "io.kubernetes.pod.name"];
const CONTAINER_NAME_KEYS: [&str; 2] = ["io.kubernetes.cri.container-name", "io.kubernetes.container.name"];
/// The longest free text (image name, runtime, host, kernel) taken from an archive's files.
const MAX_TEXT: usize = 512;

/// Makes an unpacked kubelet/crictl/Podman checkpoint archive taken without our shim (containerd
/// 2.x's CRI with runc's handler, CRI-O, Podman) a checkpoint of our store, in place, under
/// `namespace`. Nothing in such an archive vouches for it, so it is checked for what a restore
/// needs: CRIU's images under `checkpoint/` that read as a process tree (the same reading the
/// restore's credentials check does), `config.dump` naming the container, `spec.dump`; the
/// container's identity taken from them is validated like a manifest of ours. The generated
/// manifest (format 2) hashes every file as it arrived. CRIU's flags are derived from its images
/// (`--tcp-established` when it dumped established connections); nothing in `spec.dump` is used to
/// grant the restored container anything.
fn adopt_kubelet_archive(
    archive: &Path,
    work: &Path,
    namespace: &str,
    now: SystemTime,
) -> Result<Manifest, ArchiveError> {
    let refuse = |entry: &str, reason: String| ArchiveError::Entry {
        archive: archive.to_path_buf(),
        entry: entry.to_string(),
        reason: reason.into(),
    };
    refuse_signature(archive, work)?;
    let images = work.join(IMAGES_DIR);
    for (rel, what) in [
        (IMAGES_DIR, "a kubelet/crictl checkpoint archive holds CRIU's images in checkpoint/"),
        (CONFIG_DUMP, "a kubelet/crictl checkpoint archive names its container in config.dump"),
        (SPEC_DUMP, "a kubelet/crictl checkpoint archive holds the container's OCI spec in spec.dump"),
    ] {
        let present = if rel == IMAGES_DIR { images.is_dir() } else { work.join(rel).is_file() };
        if !present {
            return Err(refuse(rel, format!("missing: {what}")));
        }
    }
    CheckpointImages::read(&images).map_err(|e| image_refusal(archive, work, &e))?;

    let config = read_json(archive, work, CONFIG_DUMP)?;
    let spec = read_json(archive, work, SPEC_DUMP)?;
    let status = match work.join(STATUS_DUMP).is_file() {
        true => Some(read_json(archive, work, STATUS_DUMP)?),
        false => None,
    };
    let container_id = text_field(&config, "id")
        .ok_or_else(|| refuse(CONFIG_DUMP, "no container id (\"id\") in it".into()))?
        .to_string();
    // Each identity field with the entry it came from, for the error that names it.
    let lookup = |keys: &[&str]| -> Option<(String, &'static str)> {
        let from_spec = keys.iter().find_map(|k| text_field(&spec["annotations"], k)).map(|v| (v, SPEC_DUMP));
        from_spec
            .or_else(|| {
                let status = status.as_ref()?;
                keys.iter()
                    .find_map(|k| text_field(&status["labels"], k).or_else(|| text_field(&status["annotations"], k)))
                    .map(|v| (v, STATUS_DUMP))
            })
            .map(|(v, entry)| (v.to_string(), entry))
    };
    let (pod_namespace, pod_name, container_name) =
        (lookup(&POD_NAMESPACE_KEYS), lookup(&POD_NAME_KEYS), lookup(&CONTAINER_NAME_KEYS));
    let identity = Identity {
        namespace,
        container_id: &container_id,
        pod_namespace: pod_namespace.as_ref().map(|(v, _)| v.as_str()),
        pod_name: pod_name.as_ref().map(|(v, _)| v.as_str()),
        container_name: container_name.as_ref().map(|(v, _)| v.as_str()),
    };
    validate_identity(&identity).map_err(|e| {
        let entry = match &e {
            ManifestError::BadField { field: "namespace", .. } => {
                return ArchiveError::BadNamespace { value: namespace.into() };
            }
            ManifestError::BadField { field: "pod_namespace", .. } => pod_namespace.as_ref().map(|f| f.1),
            ManifestError::BadField { field: "pod_name", .. } => pod_name.as_ref().map(|f| f.1),
            ManifestError::BadField { field: "container_name", .. } => container_name.as_ref().map(|f| f.1),
            _ => None,
        };
        refuse(entry.unwrap_or(CONFIG_DUMP), e.to_string())
    })?;

    // A time in the future cannot be the checkpoint's: such a one (or none) becomes now.
    let checkpointed = text_field(&config, "checkpointedTime").and_then(parse_go_time).filter(|t| *t <= now);
    let created = rfc3339(clamp_time(checkpointed.unwrap_or(now)));
    let (criu_version, host, kernel) = dump_log_versions(&work.join(DUMP_LOG));
    let dump_stats = crate::criu_stats::read_dump(&work.join(STATS_DUMP)).ok().map(|t| DumpStats::from(&t));
    let open_tcp = fs::read_dir(&images)
        .map_err(io_ctx(format!("{}: cannot list", images.display())))?
        .flatten()
        .any(|e| e.file_name().to_str().is_some_and(|n| n.starts_with("tcp-stream-") && n.ends_with(".img")));
    let rootfs_diff = adopt_rootfs_diff(archive, work)?;

    let mut files = BTreeMap::new();
    collect_files(work, "", &[], &mut files)?;
    let manifest = Manifest {
        format_version: FORMAT_VERSION,
        namespace: namespace.to_string(),
        container_id,
        pod_namespace: pod_namespace.map(|f| f.0),
        pod_name: pod_name.map(|f| f.0),
        container_name: container_name.map(|f| f.0),
        image: text_field(&config, "rootfsImageName").and_then(plain_text),
        // No path: the node's own runtime restores it (the shim's default), as for CRI.
        runtime: ToolInfo {
            path: PathBuf::new(),
            version: text_field(&config, "runtime").and_then(plain_text).unwrap_or_default(),
        },
        criu: ToolInfo { path: PathBuf::new(), version: criu_version.unwrap_or_default() },
        kernel: kernel.unwrap_or_else(|| "unknown".into()),
        host: host.unwrap_or_else(|| "unknown".into()),
        created,
        options: crate::CheckpointFlags { open_tcp, ..Default::default() },
        rootfs_diff,
        duration_ms: 0,
        frozen_ms: None,
        dump_stats,
        digest: Algorithm::current().params(),
        files,
        gpu: None,
        flat: false,
        needs: None,
    };
    manifest.validate(now).map_err(|e| refuse(CONFIG_DUMP, e.to_string()))?;
    write_manifest(work, &manifest)?;
    Ok(manifest)
}

/// A CRIU image that does not read, as the refusal of the archive entry it came from.
fn image_refusal(archive: &Path, work: &Path, e: &ImageError) -> ArchiveError {
    let file = match e {
        ImageError::Io { file, .. }
        | ImageError::Missing { file }
        | ImageError::TooBig { file, .. }
        | ImageError::Magic { file, .. }
        | ImageError::Truncated { file, .. }
        | ImageError::Decode { file, .. }
        | ImageError::Malformed { file, .. } => file,
    };
    let entry = file.strip_prefix(work).unwrap_or(file).display().to_string();
    let text = e.to_string();
    let reason = text.strip_prefix(&format!("{}: ", file.display())).unwrap_or(&text).to_string();
    ArchiveError::Entry {
        archive: archive.to_path_buf(),
        entry,
        reason: format!("not CRIU's images of a process tree: {reason}").into(),
    }
}

/// An unpacked JSON file of the archive, bounded.
fn read_json(archive: &Path, work: &Path, rel: &str) -> Result<serde_json::Value, ArchiveError> {
    let refuse = |reason: String| ArchiveError::Entry {
        archive: archive.to_path_buf(),
        entry: rel.to_string(),
        reason: reason.into(),
    };
    let path = work.join(rel);
    let bytes = crate::signing::read_bounded(&path, MAX_DUMP_BYTES).map_err(|e| match e.kind() {
        io::ErrorKind::InvalidData => refuse(e.to_string()),
        _ => refuse(format!("cannot read: {e}")),
    })?;
    let value: serde_json::Value = serde_json::from_slice(&bytes).map_err(|e| refuse(format!("not JSON: {e}")))?;
    if !value.is_object() {
        return Err(refuse("not a JSON object".into()));
    }
    Ok(value)
}

/// A non-empty string field of a JSON object.
fn text_field<'a>(v: &'a serde_json::Value, key: &str) -> Option<&'a str> {
    v.get(key)?.as_str().filter(|s| !s.is_empty())
}

/// Free text from an archive kept for display only: printable, bounded, else dropped.
fn plain_text(s: &str) -> Option<String> {
    (s.len() <= MAX_TEXT && s.chars().all(|c| !c.is_control())).then(|| s.to_string())
}

/// Go's `time.Time` in JSON (RFC 3339 with nanoseconds and the writer's zone offset, `Z` or
/// `+02:00`); `None` for anything else, and for times before 1970 (Go's zero time).
fn parse_go_time(s: &str) -> Option<SystemTime> {
    if let Some(base) = s.strip_suffix('Z').or_else(|| s.strip_suffix('z')) {
        return humantime::parse_rfc3339_weak(&format!("{base}Z")).ok();
    }
    let split = s.len().checked_sub(6).filter(|&i| s.is_char_boundary(i))?;
    let (base, zone) = s.split_at(split);
    let z = zone.as_bytes();
    let digits = |r: std::ops::Range<usize>| z[r].iter().all(u8::is_ascii_digit);
    if !matches!(z[0], b'+' | b'-') || z[3] != b':' || !digits(1..3) || !digits(4..6) {
        return None;
    }
    let (h, m): (u64, u64) = (zone[1..3].parse().ok()?, zone[4..6].parse().ok()?);
    if h > 23 || m > 59 {
        return None;
    }
    let sign = z[0];
    let local = humantime::parse_rfc3339_weak(&format!("{base}Z")).ok()?;
    let offset = std::time::Duration::from_secs(h * 3600 + m * 60);
    // Local time = UTC + offset.
    if sign == b'+' {
        local.checked_sub(offset)
    } else {
        local.checked_add(offset)
    }
}

/// CRIU's version, the dump host's name and kernel release from the first lines of its log
/// (`Version: 4.2.1 (gitid …)`, `Running on HOST Linux RELEASE …`); each `None` when absent.
fn dump_log_versions(path: &Path) -> (Option<String>, Option<String>, Option<String>) {
    let Ok(f) = File::open(path) else { return (None, None, None) };
    let mut head = Vec::new();
    if f.take(DUMP_LOG_HEAD).read_to_end(&mut head).is_err() {
        return (None, None, None);
    }
    let text = String::from_utf8_lossy(&head);
    let word = |s: &str| Some(s.to_string()).filter(|w| w.len() <= 64 && w.chars().all(|c| c.is_ascii_graphic()));
    let after = |marker: &str| text.lines().find_map(|l| l.split_once(marker).map(|(_, rest)| rest.to_string()));
    let version = after("Version: ").and_then(|rest| rest.split_whitespace().next().and_then(word));
    let running = after("Running on ");
    let fields: Vec<&str> = running.as_deref().map(|r| r.split_whitespace().collect()).unwrap_or_default();
    let host = fields.first().and_then(|h| word(h));
    let kernel = fields.get(2).and_then(|k| word(k));
    (version, host, kernel)
}

/// How deep an archive's paths may go: a checkpoint's files are at most two levels deep
/// (`checkpoint/pages-1.img`); the margin is for formats to come, not for 2000-level bombs.
pub const MAX_DEPTH: usize = 8;
/// How many entries may be unpacked before a manifest says which belong. `kybernate export` writes
/// the manifest first, so this bounds only kubelet archives (whose order is CRI's) and archives
/// repacked by hand; CRIU writes a few images per process and one per thread.
pub const MAX_UNLISTED_ENTRIES: usize = 10_000;
/// The largest manifest read into memory (about 100 bytes per listed file).
const MAX_MANIFEST_BYTES: u64 = 64 << 20;
/// How much a zstd archive may decompress to before a manifest says how much it holds. A plain
/// tar is bounded by its own size; a compressed one is not (a few KiB of zstd can expand to
/// TiBs). `kybernate export` writes the manifest first, so this bounds only archives repacked
/// by hand; a kubelet archive compressed by hand must be decompressed (`zstd -d`) first.
pub const MAX_UNLISTED_BYTES: u64 = 1 << 30;
/// Tar's own bytes per listed file, beyond its data padded to 512: its header, a GNU long-name
/// entry (two blocks) and its directory's entry with another long name.
const TAR_OVERHEAD_PER_FILE: u64 = 8 * 512;
/// Tar's end: two zero blocks, padded to a record (10 KiB for GNU tar, more for some writers).
const TAR_END_SLACK: u64 = 1 << 20;
/// The manifest our shim writes beside CRIU's images for CRI (a kubelet archive's).
const INNER_MANIFEST: &str = "checkpoint/kybernate.json";
/// A signature file is a few hundred bytes.
const MAX_SIGNATURE_BYTES: u64 = 64 << 10;

/// Decides, entry by entry while the archive is read, what may be unpacked: once a manifest is
/// read, only the files it lists (with their sizes) and the directories holding them; before,
/// a bounded number of entries, checked against the manifest when it arrives. So a tar bomb is
/// refused at its first unlisted entry (or at the bound), never after extracting it all.
#[derive(Default)]
struct Admission {
    /// The root manifest's files and sizes, once read.
    root: Option<BTreeMap<String, u64>>,
    /// A kubelet archive's: the shim's manifest in `checkpoint/` (its keys relative to it).
    inner: Option<BTreeMap<String, u64>>,
    /// Entries unpacked before a manifest governed them: path, and size (None: a directory).
    early: Vec<(String, Option<u64>)>,
}

impl Admission {
    /// Whether `rel` (a directory when `size` is None) may be unpacked.
    fn admit(&mut self, rel: &str, size: Option<u64>) -> Result<(), Cow<'static, str>> {
        if rel.split('/').count() > MAX_DEPTH {
            return Err(
                format!("nested deeper than {MAX_DEPTH} levels; a checkpoint's files are at most 2 deep").into()
            );
        }
        if rel.rsplit('/').next() == Some(ORIGIN_FILE) {
            return Err(format!(
                "{ORIGIN_FILE} is the record a node keeps of where its checkpoints came from; an archive must not bring one"
            )
            .into());
        }
        // The signature beside the manifest is not listed in it (it signs the manifest).
        if rel == SIGNATURE_FILE {
            return match size {
                Some(size) if size <= MAX_SIGNATURE_BYTES => Ok(()),
                Some(size) => Err(format!("{size} bytes, too big for a signature").into()),
                None => Err("a directory named like the signature".into()),
            };
        }
        if let Some(files) = &self.root {
            return listed(files, rel, size);
        }
        if let (Some(files), Some(inner)) = (&self.inner, rel.strip_prefix(&format!("{IMAGES_DIR}/"))) {
            return listed(files, inner, size);
        }
        if self.early.len() >= MAX_UNLISTED_ENTRIES {
            return Err(format!(
                "more than {MAX_UNLISTED_ENTRIES} entries before the archive's manifest ({MANIFEST_FILE}, the first entry `kybernate export` writes)"
            )
            .into());
        }
        self.early.push((rel.to_string(), size));
        Ok(())
    }

    /// Takes the root manifest's list; the entries unpacked before it must be on it.
    fn set_root(&mut self, files: BTreeMap<String, u64>) -> Result<(), (String, Cow<'static, str>)> {
        for (rel, size) in self.early.iter().filter(|(rel, _)| rel != MANIFEST_FILE) {
            listed(&files, rel, *size).map_err(|why| (rel.clone(), why))?;
        }
        self.root = Some(files);
        Ok(())
    }

    /// Takes the inner manifest's list; the `checkpoint/` entries unpacked before it must be on it.
    fn set_inner(&mut self, files: BTreeMap<String, u64>) -> Result<(), (String, Cow<'static, str>)> {
        let prefix = format!("{IMAGES_DIR}/");
        for (rel, size) in self.early.iter().filter(|(rel, _)| rel != INNER_MANIFEST) {
            if let Some(inner) = rel.strip_prefix(&prefix) {
                listed(&files, inner, *size).map_err(|why| (rel.clone(), why))?;
            }
        }
        self.inner = Some(files);
        Ok(())
    }
}

/// A file on the list with the listed size, or a directory holding a listed file.
fn listed(files: &BTreeMap<String, u64>, rel: &str, size: Option<u64>) -> Result<(), Cow<'static, str>> {
    match size {
        None => {
            let prefix = format!("{rel}/");
            match files.range(prefix.clone()..).next() {
                Some((first, _)) if first.starts_with(&prefix) => Ok(()),
                _ => Err("a directory with no file listed in the archive's manifest".into()),
            }
        }
        Some(size) => match files.get(rel) {
            None => Err("not listed in the archive's manifest".into()),
            Some(&want) if want != size => Err(format!("{size} bytes, the archive's manifest says {want}").into()),
            Some(_) => Ok(()),
        },
    }
}

/// Parses and checks a manifest read from the archive, before anything it lists is unpacked:
/// the format version, the fields the store builds paths from, the file paths.
fn parse_manifest(bytes: &[u8]) -> Result<Manifest, String> {
    let manifest: Manifest = serde_json::from_slice(bytes).map_err(|e| format!("not a manifest: {e}"))?;
    if !(OLDEST_FORMAT_VERSION..=FORMAT_VERSION).contains(&manifest.format_version) {
        return Err(format!(
            "format version {} (this Kybernate reads versions {OLDEST_FORMAT_VERSION} to {FORMAT_VERSION})",
            manifest.format_version
        ));
    }
    manifest.validate(SystemTime::now()).map_err(|e| e.to_string())?;
    if let Some(bad) = manifest.files.keys().find(|k| !is_plain_relative(k) || SIDE_FILES.contains(&k.as_str())) {
        return Err(format!("lists {bad:?}, which is not a plain relative path inside the checkpoint"));
    }
    Ok(manifest)
}

/// The tar crate's message without the raw bytes it quotes (`...: <bytes> when getting cksum
/// for <name>` becomes `... (cksum field)`).
fn clean_tar_error(e: &io::Error) -> String {
    let text = e.to_string();
    let head = text.split(": ").next().unwrap_or(&text);
    let field = text.split(" when getting ").nth(1).and_then(|rest| rest.split(' ').next());
    let head: String = head.chars().filter(|c| !c.is_control()).collect();
    match field {
        Some(f) if f.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') => format!("{head} ({f} field)"),
        _ => head,
    }
}

/// What the readers under the tar parser saw: how far the archive was read, how much came out of
/// zstd, the bound on that, and why the stream failed. Shared with the parser's loop, which
/// raises the bound when a manifest arrives, and consulted when the parser reports an error.
#[derive(Default)]
struct Stream {
    /// Bytes of the archive file read (compressed, when it is).
    raw: Cell<u64>,
    /// Bytes decompressed; the limit on them (a zstd archive only).
    out: Cell<u64>,
    limit: Cell<u64>,
    /// Whether a manifest set the limit (else it is [`MAX_UNLISTED_BYTES`]).
    listed: Cell<bool>,
    /// A plain tar's size: no entry of it can hold more.
    plain_size: Cell<Option<u64>>,
    fault: RefCell<Option<Fault>>,
    /// The last entry whose header was read, for error messages.
    after: RefCell<Option<String>>,
}

enum Fault {
    /// zstd's own error (corrupt data, a bad checksum, a truncated frame).
    Corrupt(String),
    /// More bytes than the bound.
    Oversized,
}

/// The archive file, counted, reporting progress.
struct Source<'a> {
    file: File,
    total: u64,
    reported: u64,
    stream: Rc<Stream>,
    progress: &'a mut dyn FnMut(Step),
}

impl Read for Source<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.file.read(buf)?;
        let raw = self.stream.raw.get() + n as u64;
        self.stream.raw.set(raw);
        if raw - self.reported >= PROGRESS_EVERY || (n == 0 && raw != self.reported) {
            self.reported = raw;
            (self.progress)(Step::Copy { done: raw, total: self.total.max(raw) });
        }
        Ok(n)
    }
}

/// zstd's output, counted and bounded: past the limit, or on zstd's error, the fault is recorded
/// for `unpack` to name and the read fails, so nothing past the bound reaches the disk.
struct Inflate<R: BufRead> {
    decoder: zstd::Decoder<'static, R>,
    stream: Rc<Stream>,
}

impl<R: BufRead> Inflate<R> {
    fn fail(&self, fault: Fault) -> io::Error {
        let text = match &fault {
            Fault::Corrupt(reason) => reason.clone(),
            Fault::Oversized => "decompressed size limit reached".into(),
        };
        self.stream.fault.borrow_mut().get_or_insert(fault);
        io::Error::new(io::ErrorKind::InvalidData, text)
    }
}

impl<R: BufRead> Read for Inflate<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let (out, limit) = (self.stream.out.get(), self.stream.limit.get());
        // At the limit, one more byte tells an exact fit from an excess.
        let room = usize::try_from(limit - out).unwrap_or(usize::MAX).max(1).min(buf.len());
        let n = match self.decoder.read(&mut buf[..room]) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
                return Err(self.fail(Fault::Corrupt("truncated: the archive ends inside a zstd frame".into())))
            }
            Err(e) => return Err(self.fail(Fault::Corrupt(e.to_string()))),
        };
        if out + n as u64 > limit {
            return Err(self.fail(Fault::Oversized));
        }
        self.stream.out.set(out + n as u64);
        Ok(n)
    }
}

/// Unpacks a plain or zstd tar (by its first bytes) into `work`, entry by entry under
/// [`Admission`]; a zstd stream must then end cleanly (nothing after it but more frames).
fn unpack(archive: &Path, work: &Path, progress: &mut dyn FnMut(Step)) -> Result<(), ArchiveError> {
    let read_ctx = || format!("{}: cannot read archive", archive.display());
    let file = File::open(archive).map_err(io_ctx(read_ctx()))?;
    let total = file.metadata().map_or(0, |m| m.len());
    let stream = Rc::new(Stream::default());
    let source = Source { file, total, reported: 0, stream: stream.clone(), progress };
    let mut reader = BufReader::with_capacity(1 << 20, source);
    let zstd = reader.fill_buf().map_err(io_ctx(read_ctx()))?.starts_with(&ZSTD_MAGIC);
    let result = if zstd {
        stream.limit.set(MAX_UNLISTED_BYTES);
        let fault = |e: io::Error| ArchiveError::Compressed {
            archive: archive.to_path_buf(),
            compressed: 0,
            decompressed: 0,
            after: None,
            reason: e.to_string(),
        };
        let decoder = zstd::Decoder::with_buffer(reader).map_err(fault)?;
        let mut inflate = Inflate { decoder, stream: stream.clone() };
        unpack_entries(Archive::new(&mut inflate), archive, work, &stream)
            // Past the tar's end: the rest of the stream must decode (and stay in bounds).
            .and_then(|()| io::copy(&mut inflate, &mut io::sink()).map(drop).map_err(io_ctx(read_ctx())))
    } else {
        stream.limit.set(u64::MAX);
        stream.plain_size.set(Some(total));
        unpack_entries(Archive::new(reader), archive, work, &stream)
    };
    let Err(e) = result else { return Ok(()) };
    let archive = archive.to_path_buf();
    let fault = stream.fault.borrow_mut().take();
    Err(match fault {
        None => e,
        Some(Fault::Corrupt(reason)) => ArchiveError::Compressed {
            archive,
            compressed: stream.raw.get(),
            decompressed: stream.out.get(),
            after: stream.after.borrow_mut().take(),
            reason,
        },
        Some(Fault::Oversized) => ArchiveError::Oversized {
            archive,
            limit: stream.limit.get(),
            why: if stream.listed.get() {
                "more than the files its manifest declares and their tar headers"
            } else {
                "and no manifest came first to say how much it holds (`kybernate export` writes it first)"
            },
        },
    })
}

/// The files a manifest declares must fit into the store; a zstd archive may decompress to them
/// and their tar headers, no more.
fn admit_sizes(
    files: &BTreeMap<String, u64>,
    archive: &Path,
    work: &Path,
    stream: &Stream,
) -> Result<(), ArchiveError> {
    let declared = files.values().fold(0u64, |sum, size| sum.saturating_add(*size));
    if let Ok(available) = crate::preflight::free_bytes(work) {
        if declared > available {
            return Err(ArchiveError::NoSpace {
                archive: archive.to_path_buf(),
                store: work.parent().unwrap_or(work).to_path_buf(),
                declared,
                available,
            });
        }
    }
    if stream.limit.get() != u64::MAX {
        let padded = files.values().fold(0u64, |sum, size| {
            sum.saturating_add(size.div_ceil(512).saturating_mul(512)).saturating_add(TAR_OVERHEAD_PER_FILE)
        });
        stream.limit.set(stream.out.get().saturating_add(padded).saturating_add(TAR_END_SLACK));
        stream.listed.set(true);
    }
    Ok(())
}

/// An entry's size before anything of it is written: never more than a plain tar holds, and,
/// while no manifest declared the sizes (checked then by [`admit_sizes`]), never more than the
/// store's filesystem has free. So a header claiming terabytes is refused by name at once.
fn check_entry_size(size: u64, unlisted: bool, work: &Path, stream: &Stream) -> Result<(), Cow<'static, str>> {
    if let Some(total) = stream.plain_size.get().filter(|total| size > *total) {
        return Err(format!("claims {size} bytes, more than the whole archive ({total} bytes)").into());
    }
    if unlisted {
        if let Ok(free) = crate::preflight::free_bytes(work) {
            if size > free {
                return Err(format!("{size} bytes, more than the {free} bytes free in the store's filesystem").into());
            }
        }
    }
    Ok(())
}

fn unpack_entries<R: Read>(
    mut tar: Archive<R>,
    archive: &Path,
    work: &Path,
    stream: &Stream,
) -> Result<(), ArchiveError> {
    let read_ctx = || format!("{}: cannot read archive", archive.display());
    let mut admission = Admission::default();
    // For a header that does not parse: where it starts and the last entry read whole.
    let (mut index, mut offset, mut after) = (0usize, 0u64, None::<String>);
    for entry in tar.entries().map_err(io_ctx(read_ctx()))? {
        index += 1;
        let mut entry = entry.map_err(|e| ArchiveError::Malformed {
            archive: archive.to_path_buf(),
            index,
            offset,
            after: after.clone(),
            reason: clean_tar_error(&e),
        })?;
        let size = entry.header().entry_size().unwrap_or(0);
        offset = entry.raw_file_position().saturating_add(size.div_ceil(512) * 512);
        let raw = String::from_utf8_lossy(&entry.path_bytes()).into_owned();
        let refuse = |reason: Cow<'static, str>| ArchiveError::Entry {
            archive: archive.to_path_buf(),
            entry: raw.clone(),
            reason,
        };
        let rel = raw.strip_prefix("./").unwrap_or(&raw).trim_end_matches('/').to_string();
        after = Some(raw.clone());
        *stream.after.borrow_mut() = Some(raw.clone());
        if rel.is_empty() || rel == "." {
            continue;
        }
        if !is_plain_relative(&rel) {
            return Err(refuse("absolute path or '..'".into()));
        }
        let dst = work.join(&rel);
        let write_ctx = || format!("{}: cannot unpack {raw:?} to {}", archive.display(), dst.display());
        match entry.header().entry_type() {
            EntryType::Directory => {
                admission.admit(&rel, None).map_err(refuse)?;
                create_private_dirs(&dst)?;
            }
            EntryType::Regular | EntryType::Continuous => {
                let manifest = rel == MANIFEST_FILE || (rel == INNER_MANIFEST && admission.root.is_none());
                if manifest && size > MAX_MANIFEST_BYTES {
                    return Err(refuse(format!("{size} bytes, too big for a manifest").into()));
                }
                admission.admit(&rel, Some(size)).map_err(refuse)?;
                check_entry_size(size, admission.root.is_none(), work, stream).map_err(refuse)?;
                if let Some(parent) = dst.parent() {
                    create_private_dirs(parent)?;
                }
                let mut f = match fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(&dst) {
                    Err(e) if e.kind() == io::ErrorKind::AlreadyExists => return Err(refuse("duplicate entry".into())),
                    other => other.map_err(io_ctx(write_ctx()))?,
                };
                let copied = if manifest {
                    let mut bytes = Vec::new();
                    (&mut entry).take(MAX_MANIFEST_BYTES).read_to_end(&mut bytes).map_err(io_ctx(read_ctx()))?;
                    f.write_all(&bytes).map_err(io_ctx(write_ctx()))?;
                    if bytes.len() as u64 == size {
                        let bad = |reason| ArchiveError::Manifest {
                            archive: archive.to_path_buf(),
                            entry: rel.clone(),
                            reason,
                        };
                        let parsed = parse_manifest(&bytes).map_err(bad)?;
                        let files: BTreeMap<String, u64> =
                            parsed.files.iter().map(|(k, v)| (k.clone(), v.size)).collect();
                        if rel == MANIFEST_FILE {
                            admit_sizes(&files, archive, work, stream)?;
                        }
                        let set =
                            if rel == MANIFEST_FILE { admission.set_root(files) } else { admission.set_inner(files) };
                        set.map_err(|(entry, reason)| ArchiveError::Entry {
                            archive: archive.to_path_buf(),
                            entry,
                            reason,
                        })?;
                    }
                    bytes.len() as u64
                } else {
                    io::copy(&mut entry, &mut f).map_err(io_ctx(read_ctx()))?
                };
                if copied != size {
                    return Err(refuse(
                        format!("truncated: the archive ends after {copied} of its {size} bytes").into(),
                    ));
                }
                f.flush().and_then(|()| f.sync_all()).map_err(io_ctx(write_ctx()))?;
            }
            EntryType::Symlink => return Err(refuse("symlinks are not allowed in a checkpoint".into())),
            EntryType::Link => return Err(refuse("hard links are not allowed in a checkpoint".into())),
            _ => return Err(refuse("only directories and regular files are allowed in a checkpoint".into())),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn files(list: &[(&str, u64)]) -> BTreeMap<String, u64> {
        list.iter().map(|(k, v)| (k.to_string(), *v)).collect()
    }

    #[test]
    fn entries_before_a_manifest_are_bounded_and_checked_when_it_arrives() {
        let mut a = Admission::default();
        for i in 0..MAX_UNLISTED_ENTRIES {
            a.admit(&format!("f{i}"), Some(0)).unwrap();
        }
        let why = a.admit("one-more", Some(0)).unwrap_err();
        assert!(why.starts_with(&format!("more than {MAX_UNLISTED_ENTRIES} entries before")), "{why}");

        let mut a = Admission::default();
        a.admit(MANIFEST_FILE, Some(10)).unwrap();
        a.admit("checkpoint", None).unwrap();
        a.admit("checkpoint/inventory.img", Some(3)).unwrap();
        a.admit("stray", Some(1)).unwrap();
        let (entry, why) = a.set_root(files(&[("checkpoint/inventory.img", 3)])).unwrap_err();
        assert_eq!((entry.as_str(), why.as_ref()), ("stray", "not listed in the archive's manifest"));

        let mut a = Admission::default();
        a.set_root(files(&[("checkpoint/inventory.img", 3), ("spec.dump", 2)])).unwrap();
        assert!(a.admit("checkpoint", None).is_ok());
        assert!(a.admit("checkpoint/inventory.img", Some(3)).is_ok());
        assert_eq!(a.admit("checkpoint/inventory.img", Some(4)).unwrap_err(), "4 bytes, the archive's manifest says 3");
        assert!(a.admit("check", None).is_err(), "a directory holding no listed file");
        assert!(a.admit("spec.dump/x", Some(0)).is_err());
        let deep = ["checkpoint"; MAX_DEPTH + 1].join("/");
        assert!(a.admit(&deep, None).unwrap_err().starts_with("nested deeper than"));
    }

    #[test]
    fn a_kubelet_archives_images_are_checked_against_the_shims_manifest() {
        let mut a = Admission::default();
        a.admit("config.dump", Some(5)).unwrap();
        a.admit("checkpoint/pages-1.img", Some(8)).unwrap();
        a.admit(INNER_MANIFEST, Some(100)).unwrap();
        a.set_inner(files(&[("pages-1.img", 8), ("inventory.img", 1)])).unwrap();
        assert!(a.admit("checkpoint/inventory.img", Some(1)).is_ok());
        assert!(a.admit("checkpoint/evil.img", Some(1)).is_err());
        assert!(a.admit("status.dump", Some(1)).is_ok(), "CRI's own files are bounded, not listed");
        let mut a = Admission::default();
        a.admit("checkpoint/evil.img", Some(1)).unwrap();
        assert_eq!(a.set_inner(files(&[("pages-1.img", 8)])).unwrap_err().0, "checkpoint/evil.img");
    }

    #[test]
    fn zstd_output_stops_at_its_bound() {
        let packed = zstd::encode_all(&[7u8; 5000][..], 1).unwrap();
        let read = |limit: u64| {
            let stream = Rc::new(Stream::default());
            stream.limit.set(limit);
            let decoder = zstd::Decoder::with_buffer(&packed[..]).unwrap();
            let mut inflate = Inflate { decoder, stream: stream.clone() };
            let result = io::copy(&mut inflate, &mut io::sink());
            let fault = stream.fault.borrow_mut().take();
            (result.ok(), stream.out.get(), fault)
        };
        assert!(matches!(read(5000), (Some(5000), 5000, None)), "an exact fit is fine");
        let (copied, out, fault) = read(4999);
        assert_eq!((copied, out), (None, 4999), "nothing past the bound comes out");
        assert!(matches!(fault, Some(Fault::Oversized)));
        assert!(matches!(read(MAX_UNLISTED_BYTES), (Some(5000), 5000, None)));
    }

    #[test]
    fn go_times_in_any_zone_become_utc() {
        let utc = |s: &str| parse_go_time(s).map(|t| humantime::format_rfc3339_nanos(t).to_string());
        assert_eq!(utc("2026-11-24T05:28:41.123456789Z").as_deref(), Some("2026-11-24T05:28:41.123456789Z"));
        assert_eq!(utc("2026-11-24T06:28:41.5+01:00").as_deref(), Some("2026-11-24T05:28:41.500000000Z"));
        assert_eq!(utc("2026-11-23T21:58:41-07:30").as_deref(), Some("2026-11-24T05:28:41.000000000Z"));
        for bad in ["0001-01-01T00:00:00Z", "", "yesterday", "2026-11-24T06:28:41+1:000", "2026-11-24T06:28:41é0:00"] {
            assert_eq!(utc(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn criu_versions_come_from_the_first_lines_of_its_log() {
        let d = tempfile::tempdir().unwrap();
        let log = d.path().join("dump.log");
        fs::write(
            &log,
            "(00.000000) Version: 4.2.1 (gitid 0)\n(00.000011) Running on node-7 Linux 6.18.0 #1 SMP x86_64\n",
        )
        .unwrap();
        let want = (Some("4.2.1".to_string()), Some("node-7".to_string()), Some("6.18.0".to_string()));
        assert_eq!(dump_log_versions(&log), want);
        fs::write(&log, "(00.0) Version: \u{1b}[31m\n").unwrap();
        assert_eq!(dump_log_versions(&log), (None, None, None), "control characters are dropped");
        assert_eq!(dump_log_versions(&d.path().join("none")), (None, None, None));
    }

    #[test]
    fn tar_errors_lose_the_raw_bytes_they_quote() {
        let e =
            io::Error::other("numeric field did not have utf-8 text: \u{fffd}\u{1}\u{2} when getting cksum for \u{3}");
        assert_eq!(clean_tar_error(&e), "numeric field did not have utf-8 text (cksum field)");
        assert_eq!(
            clean_tar_error(&io::Error::other("archive header checksum mismatch")),
            "archive header checksum mismatch"
        );
    }
}
