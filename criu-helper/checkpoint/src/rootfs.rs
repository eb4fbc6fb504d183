//! The container's filesystem changes (`rootfs-diff.tar`).
//!
//! CRIU restores processes, not files: whatever the container wrote to its
//! rootfs must be put back before restore, or open files will be missing.
//! The diff is the overlay upper dir, with whiteouts kept as overlay writes
//! them (char device 0/0) so that deletions survive too.

use std::collections::BTreeSet;
use std::ffi::CString;
use std::fs::{self, File};
use std::io::{self, BufReader, BufWriter, Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};

use tar::{Archive, Builder, EntryType, Header, HeaderMode};

/// PAX records marking an overlay opaque directory (whose lower contents are hidden).
const OPAQUE_XATTRS: [&str; 2] = ["trusted.overlay.opaque", "user.overlay.opaque"];
const PAX_XATTR_PREFIX: &str = "SCHILY.xattr.";

/// Why a rootfs diff could not be written or applied. Every variant names the path at fault.
#[derive(Debug, thiserror::Error)]
pub enum RootfsError {
    #[error("{}: rootfs diff entry {entry:?} would be written outside the rootfs", tar.display())]
    Escape { tar: PathBuf, entry: String },
    #[error("{}: rootfs diff entry {entry:?} is a {what}, which cannot be restored", tar.display())]
    Unsupported { tar: PathBuf, entry: String, what: String },
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: io::Error,
    },
}

fn io_ctx(context: String) -> impl FnOnce(io::Error) -> RootfsError {
    move |source| RootfsError::Io { context, source }
}

/// The overlay upperdir of a containerd rootfs mount, from its options ("upperdir=/x/fs"): None for bind/other mounts.
pub fn overlay_upperdir(mount_type: &str, options: &[String]) -> Option<PathBuf> {
    let overlay = mount_type == "overlay" || mount_type.ends_with("overlayfs");
    if !overlay {
        return None;
    }
    options.iter().find_map(|o| o.strip_prefix("upperdir=")).filter(|p| p.starts_with('/')).map(PathBuf::from)
}

/// Writes the changes of an overlay upper dir as a tar (paths relative, like CRI-O's rootfs-diff.tar): regular
/// files, dirs, symlinks, fifos, and overlay whiteouts (char device 0/0). Returns Ok(false) and writes nothing
/// if the upper dir is empty. Sockets and other devices are skipped with a warning: they cannot be recreated
/// meaningfully (CRIU recreates the sockets it needs).
pub fn write_rootfs_diff(upper: &Path, out: &Path) -> Result<bool, RootfsError> {
    let mut entries =
        fs::read_dir(upper).map_err(io_ctx(format!("{}: cannot list overlay upper dir", upper.display())))?;
    if entries.next().is_none() {
        return Ok(false);
    }
    let ctx = || format!("{}: cannot write rootfs diff", out.display());
    let file = fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(out);
    let mut builder = Builder::new(BufWriter::new(file.map_err(io_ctx(ctx()))?));
    builder.follow_symlinks(false);
    let written = append_tree(&mut builder, upper, Path::new("")).and_then(|()| {
        let file = builder.into_inner()?.into_inner().map_err(io::IntoInnerError::into_error)?;
        file.sync_all()
    });
    if let Err(e) = written {
        let _ = fs::remove_file(out);
        return Err(RootfsError::Io { context: ctx(), source: e });
    }
    Ok(true)
}

fn append_tree<W: io::Write>(builder: &mut Builder<W>, dir: &Path, rel: &Path) -> io::Result<()> {
    let mut entries = fs::read_dir(dir)?.collect::<io::Result<Vec<_>>>()?;
    entries.sort_by_key(|e| e.file_name());
    for entry in entries {
        let path = entry.path();
        let name = rel.join(entry.file_name());
        let meta = entry.metadata()?;
        let t = meta.file_type();
        if t.is_dir() {
            if let Some(key) = opaque_xattr(&path) {
                builder.append_pax_extensions([(format!("{PAX_XATTR_PREFIX}{key}").as_str(), &b"y"[..])])?;
            }
            builder.append_path_with_name(&path, &name)?;
            append_tree(builder, &path, &name)?;
        } else if t.is_file() || t.is_symlink() {
            builder.append_path_with_name(&path, &name)?;
        } else if t.is_fifo() || (t.is_char_device() && meta.rdev() == 0) {
            // By hand: tar's own special-file path stores the source path instead of `name`.
            let mut h = Header::new_gnu();
            h.set_metadata_in_mode(&meta, HeaderMode::Complete);
            h.set_entry_type(if t.is_fifo() { EntryType::Fifo } else { EntryType::Char });
            h.set_device_major(0)?;
            h.set_device_minor(0)?;
            h.set_size(0);
            builder.append_data(&mut h, &name, io::empty())?;
        } else {
            log::warn!("{}: not carried in the rootfs diff (socket or device)", path.display());
        }
    }
    Ok(())
}

/// The xattr marking `dir` opaque, if set to "y".
fn opaque_xattr(dir: &Path) -> Option<&'static str> {
    let cpath = CString::new(dir.as_os_str().as_bytes()).ok()?;
    OPAQUE_XATTRS.into_iter().find(|key| {
        let Ok(ckey) = CString::new(*key) else { return false };
        let mut buf = [0u8; 2];
        // SAFETY: both strings are NUL-terminated and buf's length is passed.
        let n = unsafe { libc::lgetxattr(cpath.as_ptr(), ckey.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
        n == 1 && buf[0] == b'y'
    })
}

/// Applies a diff written by [`write_rootfs_diff`] onto a mounted rootfs: whiteouts delete the path,
/// opaque directories lose their previous contents, everything else is unpacked with
/// permissions, ownership and mtimes. Entries that would land outside `rootfs` are refused.
pub fn apply_rootfs_diff(tar: &Path, rootfs: &Path) -> Result<(), RootfsError> {
    let read_ctx = || format!("{}: cannot read rootfs diff", tar.display());
    let file = File::open(tar).map_err(io_ctx(read_ctx()))?;
    let root = rootfs.canonicalize().map_err(io_ctx(format!("{}: cannot resolve rootfs", rootfs.display())))?;
    let mut archive = Archive::new(BufReader::new(file));
    archive.set_preserve_permissions(true);
    archive.set_preserve_ownerships(true);
    archive.set_preserve_mtime(true);
    archive.set_overwrite(true);
    archive.set_unpack_xattrs(false);
    for entry in archive.entries().map_err(io_ctx(read_ctx()))? {
        let mut entry = entry.map_err(io_ctx(read_ctx()))?;
        let raw = String::from_utf8_lossy(&entry.path_bytes()).into_owned();
        let escape = || RootfsError::Escape { tar: tar.to_path_buf(), entry: raw.clone() };
        let rel = entry.path().ok().and_then(|p| plain_relative(&p)).ok_or_else(escape)?;
        if rel.as_os_str().is_empty() {
            continue; // the upper dir itself
        }
        let dst = root.join(&rel);
        let parent_inside = match dst.parent().map(Path::canonicalize) {
            Some(Ok(p)) => Some(p.starts_with(&root)),
            _ => None, // missing parent: unpack_in creates it, checking each level
        };
        if parent_inside == Some(false) {
            return Err(escape());
        }
        let existing = fs::symlink_metadata(&dst).ok();
        let header = entry.header();
        let kind = header.entry_type();
        let ctx = |what: &str| format!("{}: cannot {what} {}", tar.display(), dst.display());
        match kind {
            EntryType::Char | EntryType::Block => {
                let dev = (header.device_major().ok().flatten(), header.device_minor().ok().flatten());
                if kind != EntryType::Char || dev != (Some(0), Some(0)) {
                    let what = format!("device {kind:?}");
                    return Err(RootfsError::Unsupported { tar: tar.to_path_buf(), entry: raw, what });
                }
                if parent_inside.is_some() && existing.is_some() {
                    remove_path(&dst, existing.as_ref()).map_err(io_ctx(ctx("delete (whiteout)")))?;
                }
                continue;
            }
            EntryType::Fifo => {
                let (mode, uid, gid) = (header.mode().unwrap_or(0o644), header.uid().ok(), header.gid().ok());
                remove_path(&dst, existing.as_ref()).map_err(io_ctx(ctx("replace")))?;
                make_fifo(&dst, mode, uid, gid).map_err(io_ctx(ctx("create fifo")))?;
                continue;
            }
            _ => {}
        }
        match &existing {
            Some(m) if kind.is_dir() && !m.is_dir() => fs::remove_file(&dst).map_err(io_ctx(ctx("replace")))?,
            Some(_) if kind.is_dir() && is_opaque(&mut entry) => clear_dir(&dst).map_err(io_ctx(ctx("clear")))?,
            Some(m) if !kind.is_dir() && m.is_dir() => fs::remove_dir_all(&dst).map_err(io_ctx(ctx("replace")))?,
            _ => {}
        }
        if !entry.unpack_in(&root).map_err(io_ctx(ctx("unpack")))? {
            return Err(escape());
        }
    }
    Ok(())
}

/// OCI layer whiteouts: `.wh.NAME` deletes NAME, `.wh..wh..opq` makes its directory opaque.
const OCI_WHITEOUT_PREFIX: &str = ".wh.";
const OCI_OPAQUE_MARKER: &str = ".wh..wh..opq";

/// Rewrites a rootfs diff in OCI layer form into ours, as [`apply_rootfs_diff`] reads it. That is
/// what containerd 2.x's CRI puts in a kubelet/crictl checkpoint archive: gzip-compressed (plain
/// tar is read too), deletions as `.wh.` files. Whiteouts become char 0/0 entries, opaque markers
/// an xattr record on their directory's entry. Two passes over `src`, as a marker may come after
/// its directory. `dst` must not exist; on error it is removed.
pub fn overlay_diff_from_oci_layer(src: &Path, dst: &Path) -> Result<(), RootfsError> {
    let read_ctx = || format!("{}: cannot read rootfs diff", src.display());
    let mut opaque = BTreeSet::new();
    for entry in layer_entries(src)?.entries().map_err(io_ctx(read_ctx()))? {
        let entry = entry.map_err(io_ctx(read_ctx()))?;
        let (rel, raw) = layer_path(src, &entry)?;
        if rel.file_name().is_some_and(|n| n == OCI_OPAQUE_MARKER) {
            let dir = rel.parent().unwrap_or(Path::new("")).to_path_buf();
            if dir.as_os_str().is_empty() {
                let what = "opaque marker for the rootfs itself".to_string();
                return Err(RootfsError::Unsupported { tar: src.to_path_buf(), entry: raw, what });
            }
            opaque.insert(dir);
        }
    }
    let write_ctx = || format!("{}: cannot write rootfs diff", dst.display());
    let file = fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(dst);
    let mut builder = Builder::new(BufWriter::new(file.map_err(io_ctx(write_ctx()))?));
    let converted = convert_layer(src, &mut builder, &mut opaque).and_then(|()| {
        let file = builder.into_inner().and_then(|w| w.into_inner().map_err(io::IntoInnerError::into_error));
        file.and_then(|f| f.sync_all()).map_err(io_ctx(write_ctx()))
    });
    if converted.is_err() {
        let _ = fs::remove_file(dst);
    }
    converted
}

/// The second pass of [`overlay_diff_from_oci_layer`]; `opaque` loses each directory it meets.
fn convert_layer<W: Write>(
    src: &Path,
    builder: &mut Builder<W>,
    opaque: &mut BTreeSet<PathBuf>,
) -> Result<(), RootfsError> {
    let read_ctx = || format!("{}: cannot read rootfs diff", src.display());
    let write_ctx = || format!("{}: cannot convert rootfs diff", src.display());
    for entry in layer_entries(src)?.entries().map_err(io_ctx(read_ctx()))? {
        let mut entry = entry.map_err(io_ctx(read_ctx()))?;
        let (rel, raw) = layer_path(src, &entry)?;
        if rel.as_os_str().is_empty() {
            continue; // the layer's root
        }
        let name = rel.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        let mut header = entry.header().clone();
        let kind = header.entry_type();
        let written = if name == OCI_OPAQUE_MARKER {
            Ok(())
        } else if let Some(target) = name.strip_prefix(OCI_WHITEOUT_PREFIX) {
            // `.wh.`, `.wh..` and `.wh...` would name the directory itself or its parent.
            if matches!(target, "" | "." | "..") {
                let what = "whiteout that names no file".to_string();
                return Err(RootfsError::Unsupported { tar: src.to_path_buf(), entry: raw, what });
            }
            let mut h = Header::new_gnu();
            h.set_entry_type(EntryType::Char);
            h.set_mode(0);
            h.set_uid(0);
            h.set_gid(0);
            h.set_mtime(header.mtime().unwrap_or(0));
            h.set_size(0);
            h.set_device_major(0)
                .and_then(|()| h.set_device_minor(0))
                .and_then(|()| builder.append_data(&mut h, rel.with_file_name(target), io::empty()))
        } else if kind.is_dir() {
            let marked = if opaque.remove(&rel) {
                builder.append_pax_extensions([(format!("{PAX_XATTR_PREFIX}{}", OPAQUE_XATTRS[0]).as_str(), &b"y"[..])])
            } else {
                Ok(())
            };
            marked.and_then(|()| builder.append_data(&mut header, &rel, io::empty()))
        } else if matches!(kind, EntryType::Symlink | EntryType::Link) {
            match entry.link_name() {
                Ok(Some(target)) => builder.append_link(&mut header, &rel, target),
                _ => {
                    let what = format!("{kind:?} without a target");
                    return Err(RootfsError::Unsupported { tar: src.to_path_buf(), entry: raw, what });
                }
            }
        } else if matches!(
            kind,
            EntryType::Regular | EntryType::Continuous | EntryType::Char | EntryType::Block | EntryType::Fifo
        ) {
            builder.append_data(&mut header, &rel, &mut entry)
        } else {
            let what = format!("tar entry of type {kind:?}");
            return Err(RootfsError::Unsupported { tar: src.to_path_buf(), entry: raw, what });
        };
        written.map_err(io_ctx(write_ctx()))?;
    }
    if let Some(dir) = opaque.iter().next() {
        let what = "opaque marker for a directory the diff has no entry for".to_string();
        return Err(RootfsError::Unsupported { tar: src.to_path_buf(), entry: dir.display().to_string(), what });
    }
    Ok(())
}

/// A tar reader over `path`, gunzipping it when it starts with gzip's magic.
fn layer_entries(path: &Path) -> Result<Archive<Box<dyn Read>>, RootfsError> {
    let ctx = || format!("{}: cannot read rootfs diff", path.display());
    let mut file = BufReader::new(File::open(path).map_err(io_ctx(ctx()))?);
    let gzip = io::BufRead::fill_buf(&mut file).map_err(io_ctx(ctx()))?.starts_with(&[0x1f, 0x8b]);
    let reader: Box<dyn Read> = if gzip { Box::new(flate2::bufread::GzDecoder::new(file)) } else { Box::new(file) };
    Ok(Archive::new(reader))
}

/// The entry's path made plain and relative, with its raw form for messages.
fn layer_path<R: Read>(tar: &Path, entry: &tar::Entry<'_, R>) -> Result<(PathBuf, String), RootfsError> {
    let raw = String::from_utf8_lossy(&entry.path_bytes()).into_owned();
    match entry.path().ok().and_then(|p| plain_relative(&p)) {
        Some(rel) => Ok((rel, raw)),
        None => Err(RootfsError::Escape { tar: tar.to_path_buf(), entry: raw }),
    }
}

/// `p` with `.` dropped, or None if it is absolute or climbs with `..`.
fn plain_relative(p: &Path) -> Option<PathBuf> {
    let mut out = PathBuf::new();
    for c in p.components() {
        match c {
            Component::CurDir => {}
            Component::Normal(part) => out.push(part),
            Component::ParentDir | Component::RootDir | Component::Prefix(_) => return None,
        }
    }
    Some(out)
}

fn is_opaque<R: io::Read>(entry: &mut tar::Entry<'_, R>) -> bool {
    let Ok(Some(exts)) = entry.pax_extensions() else { return false };
    exts.flatten().any(|e| {
        let key = e.key().unwrap_or("");
        key.strip_prefix(PAX_XATTR_PREFIX).is_some_and(|k| OPAQUE_XATTRS.contains(&k)) && e.value_bytes() == b"y"
    })
}

fn remove_path(p: &Path, meta: Option<&fs::Metadata>) -> io::Result<()> {
    let result = match meta {
        Some(m) if m.is_dir() => fs::remove_dir_all(p),
        Some(_) => fs::remove_file(p),
        None => return Ok(()),
    };
    match result {
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        other => other,
    }
}

fn clear_dir(dir: &Path) -> io::Result<()> {
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        remove_path(&entry.path(), Some(&entry.metadata()?))?;
    }
    Ok(())
}

fn make_fifo(dst: &Path, mode: u32, uid: Option<u64>, gid: Option<u64>) -> io::Result<()> {
    let perm = nix::sys::stat::Mode::from_bits_truncate(mode & 0o7777);
    nix::unistd::mkfifo(dst, perm).map_err(io::Error::from)?;
    let id = |v: Option<u64>| v.and_then(|v| u32::try_from(v).ok());
    std::os::unix::fs::lchown(dst, id(uid), id(gid))?;
    fs::set_permissions(dst, fs::Permissions::from_mode(mode & 0o7777))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    fn mknod_whiteout(p: &Path) -> bool {
        let c = CString::new(p.as_os_str().as_bytes()).unwrap();
        // SAFETY: c is a valid C string.
        unsafe { libc::mknod(c.as_ptr(), libc::S_IFCHR | 0o600, 0) == 0 }
    }

    #[test]
    fn upperdir_from_mount_options() {
        let opts = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let o = opts(&["index=off", "workdir=/s/1/work", "upperdir=/s/1/fs", "lowerdir=/s/0/fs"]);
        assert_eq!(overlay_upperdir("overlay", &o), Some(PathBuf::from("/s/1/fs")));
        assert_eq!(overlay_upperdir("bind", &opts(&["rbind", "rw"])), None);
        assert_eq!(overlay_upperdir("overlay", &opts(&["lowerdir=/a:/b"])), None);
        assert_eq!(overlay_upperdir("fuse3.fuse-overlayfs", &o), Some(PathBuf::from("/s/1/fs")));
    }

    #[test]
    fn empty_upper_writes_nothing() {
        let d = tempfile::tempdir().unwrap();
        fs::create_dir(d.path().join("upper")).unwrap();
        let out = d.path().join("diff.tar");
        assert!(!write_rootfs_diff(&d.path().join("upper"), &out).unwrap());
        assert!(!out.exists());
    }

    #[test]
    fn round_trip_with_whiteouts() {
        let d = tempfile::tempdir().unwrap();
        let upper = d.path().join("upper");
        fs::create_dir_all(upper.join("etc")).unwrap();
        fs::create_dir_all(upper.join("var/data")).unwrap();
        fs::write(upper.join("etc/app.conf"), "new").unwrap();
        fs::set_permissions(upper.join("etc/app.conf"), fs::Permissions::from_mode(0o640)).unwrap();
        fs::write(upper.join("var/data/log"), "x".repeat(10_000)).unwrap();
        symlink("app.conf", upper.join("etc/link")).unwrap();
        if !mknod_whiteout(&upper.join("etc/gone")) || !mknod_whiteout(&upper.join("olddir")) {
            eprintln!("skipping: cannot mknod whiteouts here (not root?)");
            return;
        }
        // An opaque dir hides what the image had there; a fifo is carried as a fifo.
        fs::create_dir_all(upper.join("cache")).unwrap();
        fs::write(upper.join("cache/new"), "n").unwrap();
        let opaque = set_opaque(&upper.join("cache"));
        nix::unistd::mkfifo(&upper.join("var/fifo"), nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
        fs::set_permissions(upper.join("var/fifo"), fs::Permissions::from_mode(0o620)).unwrap();
        let tar = d.path().join("diff.tar");
        assert!(write_rootfs_diff(&upper, &tar).unwrap());

        let rootfs = d.path().join("rootfs");
        fs::create_dir_all(rootfs.join("etc")).unwrap();
        fs::create_dir_all(rootfs.join("olddir/sub")).unwrap();
        fs::write(rootfs.join("olddir/sub/f"), "old").unwrap();
        fs::write(rootfs.join("etc/gone"), "old").unwrap();
        fs::write(rootfs.join("etc/app.conf"), "old").unwrap();
        fs::write(rootfs.join("etc/keep"), "keep").unwrap();
        fs::create_dir_all(rootfs.join("cache")).unwrap();
        fs::write(rootfs.join("cache/old"), "o").unwrap();
        apply_rootfs_diff(&tar, &rootfs).unwrap();

        assert_eq!(fs::read_to_string(rootfs.join("etc/app.conf")).unwrap(), "new");
        let mode = fs::metadata(rootfs.join("etc/app.conf")).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o640);
        assert_eq!(fs::read_to_string(rootfs.join("etc/keep")).unwrap(), "keep");
        assert_eq!(fs::read_link(rootfs.join("etc/link")).unwrap(), Path::new("app.conf"));
        assert_eq!(fs::read(rootfs.join("var/data/log")).unwrap().len(), 10_000);
        assert!(!rootfs.join("etc/gone").exists());
        assert!(fs::symlink_metadata(rootfs.join("olddir")).is_err());
        assert!(rootfs.join("cache/new").exists());
        assert_eq!(rootfs.join("cache/old").exists(), !opaque, "opaque xattr set: {opaque}");
        let fifo = fs::symlink_metadata(rootfs.join("var/fifo")).unwrap();
        assert!(fifo.file_type().is_fifo());
        assert_eq!(fifo.permissions().mode() & 0o777, 0o620);
    }

    /// An OCI layer as containerd's differ writes one (gzip or not): `.wh.` whiteouts, an opaque
    /// marker after its directory, a symlink, a hard link and a name past tar's 100 bytes.
    fn oci_layer(gzip: bool, extra: &[(&str, EntryType)]) -> Vec<u8> {
        let long = format!("deep/{}/file", "d".repeat(120));
        let mut entries: Vec<(String, EntryType)> = [
            ("etc/", EntryType::Directory),
            ("etc/app.conf", EntryType::Regular),
            ("etc/.wh.gone", EntryType::Regular),
            (".wh.olddir", EntryType::Regular),
            ("cache/", EntryType::Directory),
            ("cache/new", EntryType::Regular),
            ("cache/.wh..wh..opq", EntryType::Regular),
            ("etc/link", EntryType::Symlink),
            ("etc/hard", EntryType::Link),
            (long.as_str(), EntryType::Regular),
        ]
        .iter()
        .chain(extra)
        .map(|(p, k)| (p.to_string(), *k))
        .collect();
        entries.insert(0, ("./".into(), EntryType::Directory));
        let mut b = Builder::new(Vec::new());
        for (path, kind) in entries {
            let mut h = Header::new_gnu();
            h.set_entry_type(kind);
            h.set_mode(if kind.is_dir() { 0o755 } else { 0o640 });
            h.set_uid(0);
            h.set_gid(0);
            h.set_mtime(1_700_000_000);
            let data: &[u8] = if kind == EntryType::Regular && !path.contains(".wh.") { b"new" } else { b"" };
            h.set_size(data.len() as u64);
            match kind {
                EntryType::Symlink => b.append_link(&mut h, &path, "app.conf").unwrap(),
                EntryType::Link => b.append_link(&mut h, &path, "etc/app.conf").unwrap(),
                _ => b.append_data(&mut h, &path, data).unwrap(),
            }
        }
        let tar = b.into_inner().unwrap();
        if !gzip {
            return tar;
        }
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(&tar).unwrap();
        gz.finish().unwrap()
    }

    #[test]
    fn an_oci_layer_becomes_our_diff_with_its_deletions() {
        for gzip in [true, false] {
            let d = tempfile::tempdir().unwrap();
            let (layer, ours) = (d.path().join("rootfs-diff.tar"), d.path().join("ours.tar"));
            fs::write(&layer, oci_layer(gzip, &[])).unwrap();
            overlay_diff_from_oci_layer(&layer, &ours).unwrap();

            let rootfs = d.path().join("rootfs");
            fs::create_dir_all(rootfs.join("olddir/sub")).unwrap();
            fs::create_dir_all(rootfs.join("etc")).unwrap();
            fs::create_dir_all(rootfs.join("cache")).unwrap();
            fs::write(rootfs.join("etc/gone"), "old").unwrap();
            fs::write(rootfs.join("etc/keep"), "keep").unwrap();
            fs::write(rootfs.join("cache/old"), "old").unwrap();
            apply_rootfs_diff(&ours, &rootfs).unwrap();

            assert_eq!(fs::read_to_string(rootfs.join("etc/app.conf")).unwrap(), "new", "gzip: {gzip}");
            assert_eq!(fs::metadata(rootfs.join("etc/app.conf")).unwrap().permissions().mode() & 0o777, 0o640);
            assert!(!rootfs.join("etc/gone").exists(), "a whiteout was not applied (gzip: {gzip})");
            assert!(!rootfs.join("olddir").exists(), "a directory whiteout was not applied (gzip: {gzip})");
            assert!(!rootfs.join("etc/.wh.gone").exists() && !rootfs.join("cache/.wh..wh..opq").exists());
            assert_eq!(fs::read_to_string(rootfs.join("etc/keep")).unwrap(), "keep");
            assert!(rootfs.join("cache/new").exists() && !rootfs.join("cache/old").exists(), "cache/ not opaque");
            assert_eq!(fs::read_link(rootfs.join("etc/link")).unwrap(), Path::new("app.conf"));
            assert_eq!(fs::read_to_string(rootfs.join("etc/hard")).unwrap(), "new");
            let long = rootfs.join("deep").join("d".repeat(120)).join("file");
            assert_eq!(fs::read_to_string(long).unwrap(), "new");
        }
    }

    #[test]
    fn a_layer_that_cannot_be_converted_leaves_no_output() {
        let d = tempfile::tempdir().unwrap();
        let (layer, ours) = (d.path().join("rootfs-diff.tar"), d.path().join("ours.tar"));
        // An opaque marker whose directory has no entry of its own.
        fs::write(&layer, oci_layer(true, &[("var/.wh..wh..opq", EntryType::Regular)])).unwrap();
        let err = overlay_diff_from_oci_layer(&layer, &ours).unwrap_err();
        assert!(matches!(err, RootfsError::Unsupported { ref entry, .. } if entry == "var"), "{err}");
        assert!(!ours.exists());
        // A device node is carried over, and refused where every diff's devices are: on apply.
        fs::write(&layer, oci_layer(false, &[("dev/sda", EntryType::Block)])).unwrap();
        overlay_diff_from_oci_layer(&layer, &ours).unwrap();
        let rootfs = d.path().join("rootfs");
        fs::create_dir(&rootfs).unwrap();
        let err = apply_rootfs_diff(&ours, &rootfs).unwrap_err();
        assert!(matches!(err, RootfsError::Unsupported { ref entry, .. } if entry == "dev/sda"), "{err}");
        fs::remove_file(&ours).unwrap();
        // Whiteouts that would delete their own directory or its parent.
        for bad in ["etc/.wh.", "etc/.wh..", "etc/.wh..."] {
            fs::write(&layer, oci_layer(true, &[(bad, EntryType::Regular)])).unwrap();
            let err = overlay_diff_from_oci_layer(&layer, &ours).unwrap_err();
            assert!(matches!(err, RootfsError::Unsupported { ref entry, .. } if entry == bad), "{bad}: {err}");
            assert!(!ours.exists());
        }
        // An entry that climbs out, and a truncated archive.
        fs::write(&layer, tar_with(b"../evil", None)).unwrap();
        let err = overlay_diff_from_oci_layer(&layer, &ours).unwrap_err();
        assert!(matches!(err, RootfsError::Escape { .. }), "{err}");
        assert!(!ours.exists());
        let whole = oci_layer(true, &[]);
        fs::write(&layer, &whole[..whole.len() / 2]).unwrap();
        let err = overlay_diff_from_oci_layer(&layer, &ours).unwrap_err();
        assert!(err.to_string().contains("cannot read rootfs diff"), "{err}");
        assert!(!ours.exists());
    }

    /// Marks `dir` opaque as overlayfs does; false where the filesystem refuses trusted xattrs.
    fn set_opaque(dir: &Path) -> bool {
        let c = CString::new(dir.as_os_str().as_bytes()).unwrap();
        // SAFETY: valid C strings, and the value length is passed.
        unsafe { libc::lsetxattr(c.as_ptr(), c"trusted.overlay.opaque".as_ptr(), b"y".as_ptr().cast(), 1, 0) == 0 }
    }

    fn tar_with(path: &[u8], link: Option<&str>) -> Vec<u8> {
        let mut b = Builder::new(Vec::new());
        let mut h = tar::Header::new_gnu();
        // Write the raw name: set_path refuses "..", which is the point of the test.
        h.as_gnu_mut().unwrap().name[..path.len()].copy_from_slice(path);
        h.set_size(if link.is_some() { 0 } else { 2 });
        h.set_mode(0o644);
        if let Some(l) = link {
            h.set_entry_type(EntryType::Symlink);
            h.set_link_name(l).unwrap();
        }
        h.set_cksum();
        b.append(&h, &b"hi"[..if link.is_some() { 0 } else { 2 }]).unwrap();
        b.into_inner().unwrap()
    }

    #[test]
    fn escaping_entries_are_refused() {
        let d = tempfile::tempdir().unwrap();
        let rootfs = d.path().join("rootfs");
        fs::create_dir(&rootfs).unwrap();
        let tar = d.path().join("bad.tar");
        fs::write(&tar, tar_with(b"../evil", None)).unwrap();
        let err = apply_rootfs_diff(&tar, &rootfs).unwrap_err();
        assert!(matches!(err, RootfsError::Escape { ref entry, .. } if entry == "../evil"), "{err}");
        assert!(!d.path().join("evil").exists());

        // A symlink in the rootfs pointing out must not be followed.
        let outside = d.path().join("outside");
        fs::create_dir(&outside).unwrap();
        symlink(&outside, rootfs.join("out")).unwrap();
        fs::write(&tar, tar_with(b"out/evil", None)).unwrap();
        let err = apply_rootfs_diff(&tar, &rootfs).unwrap_err();
        assert!(matches!(err, RootfsError::Escape { .. }), "{err}");
        assert!(!outside.join("evil").exists());
    }
}
