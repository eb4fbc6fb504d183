//! Moving checkpoints between nodes as single tar files, in the layout
//! checkpointctl and `kubectl checkpoint` archives use.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::{self, DirBuilder, File};
use std::io::{self, BufReader, BufWriter, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use tar::{Archive, Builder, EntryType, Header};

use crate::manifest::{Manifest, CONFIG_DUMP, IMAGES_DIR, MANIFEST_FILE, ROOTFS_DIFF, SPEC_DUMP};
use crate::rootfs::{overlay_diff_from_oci_layer, RootfsError};
use crate::store::{
    collect_files, create_private_dirs, fsync_dir, hidden_sibling, is_plain_relative, verify, write_manifest, Store,
    StoreError,
};
use crate::VerifyError;

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
    Entry { archive: PathBuf, entry: String, reason: &'static str },
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: io::Error,
    },
    /// A kubelet/crictl (CRI) checkpoint archive not taken through our shim: CRIU's images and
    /// CRI's dumps, but no manifest of ours in `checkpoint/`, so nothing to verify the images against.
    #[error("{}: a kubelet/crictl checkpoint archive (checkpoint/, {CONFIG_DUMP}, {SPEC_DUMP}) that was not taken through the Kybernate shim: it has no {IMAGES_DIR}/{MANIFEST_FILE} to verify CRIU's images against", archive.display())]
    CriArchive { archive: PathBuf },
    /// The rootfs diff of a kubelet/crictl archive could not be made ours.
    #[error("{}: {source}", archive.display())]
    RootfsDiff {
        archive: PathBuf,
        #[source]
        source: RootfsError,
    },
    #[error(transparent)]
    Store(#[from] StoreError),
}

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
    let manifest = verify(dir).map_err(|source| ArchiveError::Verify { path: dir.to_path_buf(), source })?;
    let tmp = hidden_sibling(out, "tmp").ok_or_else(|| ArchiveError::Io {
        context: format!("{}: not a file path", out.display()),
        source: io::ErrorKind::InvalidInput.into(),
    })?;
    let ctx = || format!("{}: cannot write archive", out.display());
    let file = fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(&tmp).map_err(io_ctx(ctx()))?;
    let mut guard = Cleanup(Some(tmp.clone()));
    let mut builder = Builder::new(BufWriter::new(file));
    builder.follow_symlinks(false);
    let written = append_checkpoint(&mut builder, dir, &manifest)
        .and_then(|()| builder.into_inner()?.into_inner().map_err(io::IntoInnerError::into_error)?.sync_all());
    written.map_err(io_ctx(ctx()))?;
    fs::rename(&tmp, out).map_err(io_ctx(ctx()))?;
    guard.0 = None;
    if let Some(parent) = out.parent().filter(|p| !p.as_os_str().is_empty()) {
        if let Err(e) = fsync_dir(parent) {
            log::warn!("{}: cannot sync directory: {e}", parent.display());
        }
    }
    Ok(manifest)
}

/// The manifest, then every listed file, each directory announced once before its first file so
/// that plain `tar -x` recreates it with our mode.
fn append_checkpoint<W: Write>(builder: &mut Builder<W>, dir: &Path, manifest: &Manifest) -> io::Result<()> {
    let mut dirs = BTreeSet::new();
    let mtime = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_secs());
    for rel in std::iter::once(MANIFEST_FILE).chain(manifest.files.keys().map(String::as_str)) {
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
    create_private_dirs(store.root())?;
    let nanos = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_nanos());
    let work = store.root().join(format!(".import-{}-{nanos}", std::process::id()));
    DirBuilder::new()
        .mode(0o700)
        .create(&work)
        .map_err(io_ctx(format!("{}: cannot create directory", work.display())))?;
    let mut guard = Cleanup(Some(work.clone()));
    unpack(archive, &work)?;
    let manifest = if is_cri_archive(&work) {
        adopt_cri_checkpoint(archive, &work)?
    } else {
        verify(&work).map_err(|source| ArchiveError::Verify { path: archive.to_path_buf(), source })?
    };

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

/// The shape of the archives CRI writes for the kubelet (containerd ≥ 2.0, CRI-O): CRIU's images
/// under `checkpoint/`, the container's config beside them, and no manifest of ours at the root.
fn is_cri_archive(dir: &Path) -> bool {
    !dir.join(MANIFEST_FILE).exists()
        && dir.join(IMAGES_DIR).is_dir()
        && (dir.join(CONFIG_DUMP).is_file() || dir.join(SPEC_DUMP).is_file())
}

/// Makes an unpacked kubelet/crictl archive (containerd 2.x's CRI, taken through our shim) a
/// checkpoint of our store, in place. The shim's flat manifest in `checkpoint/` vouches for CRIU's
/// images, which are verified against it first; CRI's own files (`config.dump`, `spec.dump`,
/// `status.dump`, the rootfs diff, ...) carry no checksum, so the new manifest records them as
/// they arrived. The rootfs diff, an OCI layer there, is rewritten in our form.
fn adopt_cri_checkpoint(archive: &Path, work: &Path) -> Result<Manifest, ArchiveError> {
    let images = work.join(IMAGES_DIR);
    if !images.join(MANIFEST_FILE).is_file() {
        return Err(ArchiveError::CriArchive { archive: archive.to_path_buf() });
    }
    let verified = verify(&images).map_err(|source| ArchiveError::Verify { path: archive.to_path_buf(), source })?;
    if !verified.flat {
        return Err(ArchiveError::Entry {
            archive: archive.to_path_buf(),
            entry: format!("{IMAGES_DIR}/{MANIFEST_FILE}"),
            reason: "not the manifest our shim writes beside CRIU's images for CRI (flat)",
        });
    }
    let inner = images.join(MANIFEST_FILE);
    fs::remove_file(&inner).map_err(io_ctx(format!("{}: cannot remove", inner.display())))?;

    let diff = work.join(ROOTFS_DIFF);
    let rootfs_diff = diff.is_file();
    if rootfs_diff {
        let ours = work.join(format!(".{ROOTFS_DIFF}"));
        overlay_diff_from_oci_layer(&diff, &ours)
            .map_err(|source| ArchiveError::RootfsDiff { archive: archive.to_path_buf(), source })?;
        fs::rename(&ours, &diff).map_err(io_ctx(format!("cannot move {} to {}", ours.display(), diff.display())))?;
    }

    // CRIU's images as verified; every other file as it arrived (hashed once, here).
    let mut files: BTreeMap<_, _> =
        verified.files.iter().map(|(rel, entry)| (format!("{IMAGES_DIR}/{rel}"), entry.clone())).collect();
    collect_files(work, "", &[IMAGES_DIR], &mut files)?;
    let manifest = Manifest { files, flat: false, rootfs_diff, ..verified };
    write_manifest(work, &manifest)?;
    Ok(manifest)
}

fn unpack(archive: &Path, work: &Path) -> Result<(), ArchiveError> {
    let read_ctx = || format!("{}: cannot read archive", archive.display());
    let file = File::open(archive).map_err(io_ctx(read_ctx()))?;
    let mut tar = Archive::new(BufReader::new(file));
    for entry in tar.entries().map_err(io_ctx(read_ctx()))? {
        let mut entry = entry.map_err(io_ctx(read_ctx()))?;
        let raw = String::from_utf8_lossy(&entry.path_bytes()).into_owned();
        let refuse = |reason| ArchiveError::Entry { archive: archive.to_path_buf(), entry: raw.clone(), reason };
        let rel = raw.strip_prefix("./").unwrap_or(&raw).trim_end_matches('/');
        if rel.is_empty() || rel == "." {
            continue;
        }
        if !is_plain_relative(rel) {
            return Err(refuse("absolute path or '..'"));
        }
        let dst = work.join(rel);
        let write_ctx = || format!("{}: cannot unpack {raw:?} to {}", archive.display(), dst.display());
        match entry.header().entry_type() {
            EntryType::Directory => create_private_dirs(&dst)?,
            EntryType::Regular | EntryType::Continuous => {
                if let Some(parent) = dst.parent() {
                    create_private_dirs(parent)?;
                }
                let mut f = match fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(&dst) {
                    Err(e) if e.kind() == io::ErrorKind::AlreadyExists => return Err(refuse("duplicate entry")),
                    other => other.map_err(io_ctx(write_ctx()))?,
                };
                // A short read here is a truncated archive: report it as such.
                io::copy(&mut entry, &mut f).map_err(io_ctx(read_ctx()))?;
                f.flush().and_then(|()| f.sync_all()).map_err(io_ctx(write_ctx()))?;
            }
            EntryType::Symlink => return Err(refuse("symlinks are not allowed in a checkpoint")),
            EntryType::Link => return Err(refuse("hard links are not allowed in a checkpoint")),
            _ => return Err(refuse("only directories and regular files are allowed in a checkpoint")),
        }
    }
    Ok(())
}
