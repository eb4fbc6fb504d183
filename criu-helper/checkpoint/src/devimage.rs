//! A restore onto other GPUs: CRIU restores the container's `/dev` tmpfs from its image
//! (`tmpfs-dev-<root_dev>.tar.gz.img`, a gzip'd tar that CRIU feeds to `tar --extract`), which
//! holds the recorded GPUs' nodes (`/dev/nvidia0`, c 195:0). The restore gets a work copy of the
//! image dir instead: a symlink to each image of the verified checkpoint (CRIU opens images with
//! `openat`, which follows them), except the tmpfs images holding a recorded GPU's node, which
//! are rewritten with the assigned GPU's node in its place (same mode, owner and time). Every
//! other entry is copied header and data as it was.

use std::fs;
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

/// The NVIDIA driver's character device major (`/dev/nvidia<minor>`, nvidiactl is 255).
pub const NVIDIA_MAJOR: u32 = 195;
/// A tmpfs image that large is not a `/dev` (the credentials check has the same bound).
const MAX_TMPFS_BYTES: u64 = 64 << 20;
/// CRIU's name of the stats file it writes into the image dir at restore: never a link.
const STATS_RESTORE: &str = "stats-restore";

/// One recorded GPU node and the assigned one that replaces it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NodeSwap {
    /// The minor of the checkpoint's `/dev/nvidia<recorded>`.
    pub recorded: u32,
    /// The minor of the new container's `/dev/nvidia<assigned>`.
    pub assigned: u32,
}

#[derive(Debug, thiserror::Error)]
pub enum DevImageError {
    #[error("{context}: {source}")]
    Io { context: String, source: io::Error },
    #[error("{file}: not a tar.gz archive CRIU could have written: {reason}")]
    Malformed { file: PathBuf, reason: String },
    #[error("{file}: larger than {max} bytes unpacked: not a /dev tmpfs")]
    TooBig { file: PathBuf, max: u64 },
    #[error(
        "the checkpoint's /dev ({images}) has no node {} of a recorded GPU to replace with the assigned GPU's{}",
        missing.iter().map(|m| format!("/dev/nvidia{m} (c 195:{m})")).collect::<Vec<_>>().join(", "),
        if unreadable.is_empty() { String::new() } else { format!(" (tmpfs images not rewritten: {})", unreadable.join("; ")) }
    )]
    MissingNode { images: PathBuf, missing: Vec<u32>, unreadable: Vec<String> },
    #[error("{file}: {reason}")]
    Unsupported { file: PathBuf, reason: String },
    /// An assigned GPU's node is in the checkpoint's `/dev` and stays there (it is not itself a
    /// recorded node being replaced): two nodes would have one name.
    #[error(
        "{file}: {name} would be there twice (an assigned GPU's node is already in the checkpoint's /dev and is not \
         itself replaced)"
    )]
    Conflict { file: PathBuf, name: String },
}

type Result<T> = std::result::Result<T, DevImageError>;

/// Builds `work` (created afresh) as the image dir CRIU restores from: `images` with every
/// recorded GPU node of `swaps` replaced in the tmpfs images that hold one. Returns the number
/// of image files rewritten. Refuses when a recorded node is in none of them.
pub fn work_copy(images: &Path, work: &Path, swaps: &[NodeSwap]) -> Result<usize> {
    let io_err = |context: String| move |source| DevImageError::Io { context, source };
    match fs::remove_dir_all(work) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(io_err(format!("remove the stale {}", work.display()))(e)),
    }
    fs::create_dir_all(work).map_err(io_err(format!("create {}", work.display())))?;
    // Relative links between the real paths: CRIU opens some images (a task's pagemap and
    // pages) after it entered the container's root, where an absolute target would name a path
    // inside the container; a relative one is resolved from the image dir's descriptor, on the host.
    let real = |p: &Path| fs::canonicalize(p).map_err(io_err(format!("resolve {}", p.display())));
    let up = relative(&real(work)?, &real(images)?);
    let mut names: Vec<_> = fs::read_dir(images)
        .map_err(io_err(format!("read {}", images.display())))?
        .map(|e| e.map(|e| e.file_name()))
        .collect::<io::Result<_>>()
        .map_err(io_err(format!("read {}", images.display())))?;
    names.sort();
    let mut found = Vec::new();
    let mut unreadable = Vec::new();
    let mut rewritten = 0;
    for name in names {
        let (from, to) = (images.join(&name), work.join(&name));
        let text = name.to_string_lossy();
        if text == STATS_RESTORE {
            continue;
        }
        if is_tmpfs_image(&text) && fs::symlink_metadata(&from).is_ok_and(|m| m.is_file()) {
            let mut out = Vec::new();
            match rewrite_file(&from, &mut out, swaps) {
                Ok(replaced) if !replaced.is_empty() => {
                    fs::write(&to, out).map_err(io_err(format!("write {}", to.display())))?;
                    found.extend(replaced);
                    rewritten += 1;
                    continue;
                }
                Ok(_) => {}
                // The /dev with the recorded nodes, which cannot take the assigned ones.
                Err(e @ (DevImageError::Io { .. } | DevImageError::Conflict { .. })) => return Err(e),
                // Another tmpfs (a large or sparse /dev/shm) stays as it is; were it the /dev
                // with a recorded node, the missing node is refused below with this reason.
                Err(e) => unreadable.push(e.to_string()),
            }
        }
        std::os::unix::fs::symlink(up.join(&name), &to).map_err(io_err(format!(
            "link {} to {}",
            to.display(),
            from.display()
        )))?;
    }
    let missing: Vec<u32> = swaps.iter().map(|s| s.recorded).filter(|m| !found.contains(m)).collect();
    if !missing.is_empty() {
        return Err(DevImageError::MissingNode { images: images.into(), missing, unreadable });
    }
    Ok(rewritten)
}

/// The relative path from directory `from` to `to` (both absolute and resolved).
fn relative(from: &Path, to: &Path) -> PathBuf {
    let (a, b): (Vec<_>, Vec<_>) = (from.components().collect(), to.components().collect());
    let common = a.iter().zip(&b).take_while(|(x, y)| x == y).count();
    let mut out = PathBuf::new();
    for _ in common..a.len() {
        out.push("..");
    }
    for c in &b[common..] {
        out.push(c);
    }
    out
}

/// CRIU's tmpfs images: `tmpfs-dev-<root_dev>.tar.gz.img`.
fn is_tmpfs_image(name: &str) -> bool {
    name.starts_with("tmpfs-dev-") && name.ends_with(".tar.gz.img")
}

/// Rewrites one tmpfs image into `out`; returns the recorded minors it replaced.
fn rewrite_file(file: &Path, out: &mut Vec<u8>, swaps: &[NodeSwap]) -> Result<Vec<u32>> {
    let f = fs::File::open(file)
        .map_err(|source| DevImageError::Io { context: format!("open {}", file.display()), source })?;
    let mut input = Bounded { inner: flate2::read::GzDecoder::new(f), left: MAX_TMPFS_BYTES + 1 };
    let encoder = flate2::write::GzEncoder::new(out, flate2::Compression::default());
    let (encoder, replaced) = match rewrite(&mut input, encoder, swaps, file) {
        Err(_) if input.left == 0 => return Err(DevImageError::TooBig { file: file.into(), max: MAX_TMPFS_BYTES }),
        other => other?,
    };
    if input.left == 0 {
        return Err(DevImageError::TooBig { file: file.into(), max: MAX_TMPFS_BYTES });
    }
    encoder.finish().map_err(|source| DevImageError::Io { context: format!("compress {}", file.display()), source })?;
    Ok(replaced)
}

/// Copies the tar stream `input` into `output` entry by entry (raw: headers as they are,
/// extension headers included), replacing each recorded GPU node of `swaps` by its assigned
/// one. Returns the writer and the recorded minors it replaced.
pub fn rewrite<R: Read, W: Write>(input: R, output: W, swaps: &[NodeSwap], file: &Path) -> Result<(W, Vec<u32>)> {
    let bad = |e: io::Error| DevImageError::Malformed { file: file.into(), reason: e.to_string() };
    let mut archive = tar::Archive::new(input);
    let mut builder = tar::Builder::new(output);
    let mut replaced = Vec::new();
    let mut after_extension = false;
    let mut names = Vec::new();
    for entry in archive.entries().map_err(bad)?.raw(true) {
        let mut entry = entry.map_err(bad)?;
        let mut header = entry.header().clone();
        let kind = header.entry_type();
        if kind.is_gnu_sparse() {
            return Err(DevImageError::Unsupported {
                file: file.into(),
                reason: "a sparse file in a tmpfs with GPU nodes cannot be rewritten".into(),
            });
        }
        let name = String::from_utf8_lossy(&header.path_bytes()).into_owned();
        if let Some(swap) = swap_of(&header, &name, swaps).map_err(bad)? {
            if after_extension {
                return Err(DevImageError::Unsupported {
                    file: file.into(),
                    reason: format!("{name} follows an extension header"),
                });
            }
            let new_name = renamed(&name, swap);
            set_name(&mut header, &new_name).map_err(bad)?;
            header.set_device_minor(swap.assigned).map_err(bad)?;
            header.set_cksum();
            replaced.push(swap.recorded);
            names.push(new_name);
        } else if kind == tar::EntryType::Char || kind == tar::EntryType::Block {
            names.push(name.clone());
        }
        after_extension = kind.is_gnu_longname() || kind.is_gnu_longlink() || kind.is_pax_local_extensions();
        builder.append(&header, &mut entry).map_err(bad)?;
    }
    names.sort();
    // Judged after all rewrites: a recorded node that is itself replaced frees its name
    // (given GPUs 1 and 2 for recorded 0 and 1, nvidia1 is both a target and replaced).
    if let Some(w) = names.windows(2).find(|w| w[0] == w[1]) {
        return Err(DevImageError::Conflict { file: file.into(), name: w[0].clone() });
    }
    let output = builder.into_inner().map_err(bad)?;
    Ok((output, replaced))
}

/// The swap for a char device entry of the driver's major named `nvidia<recorded>`.
fn swap_of(header: &tar::Header, name: &str, swaps: &[NodeSwap]) -> io::Result<Option<NodeSwap>> {
    if header.entry_type() != tar::EntryType::Char || header.device_major()? != Some(NVIDIA_MAJOR) {
        return Ok(None);
    }
    let Some(minor) = header.device_minor()? else { return Ok(None) };
    let Some(swap) = swaps.iter().find(|s| s.recorded == minor) else { return Ok(None) };
    let base = name.trim_end_matches('/').rsplit('/').next().unwrap_or_default();
    if base != format!("nvidia{minor}") {
        return Ok(None);
    }
    Ok(Some(*swap))
}

/// Writes `name` into the header's name field as it is (`set_path` would drop a leading `./`,
/// which GNU tar writes).
fn set_name(header: &mut tar::Header, name: &str) -> io::Result<()> {
    let field = &mut header.as_old_mut().name;
    if name.len() >= field.len() {
        return Err(io::Error::other(format!("name {name} too long for a tar header")));
    }
    field.fill(0);
    field[..name.len()].copy_from_slice(name.as_bytes());
    Ok(())
}

/// `./nvidia0` → `./nvidia1`: the same directory, the assigned GPU's name.
fn renamed(name: &str, swap: NodeSwap) -> String {
    let dir = name.rsplit_once('/').map_or("", |(dir, _)| dir);
    let base = format!("nvidia{}", swap.assigned);
    if dir.is_empty() && !name.contains('/') {
        base
    } else {
        format!("{dir}/{base}")
    }
}

/// A reader that gives at most `left` bytes (`left` reaches 0 when the limit was hit).
struct Bounded<R> {
    inner: R,
    left: u64,
}

impl<R: Read> Read for Bounded<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.left == 0 {
            return Ok(0);
        }
        let want = buf.len().min(usize::try_from(self.left).unwrap_or(usize::MAX));
        let n = self.inner.read(&mut buf[..want])?;
        self.left -= n as u64;
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One entry of a test archive.
    enum E<'a> {
        Dir(&'a str),
        Char(&'a str, u32, u32),
        Link(&'a str, &'a str),
        File(&'a str, &'a [u8]),
    }

    /// A tar as GNU tar writes CRIU's (GNU headers, numeric owners).
    fn tar_of(entries: &[E<'_>]) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        for e in entries {
            let mut h = tar::Header::new_gnu();
            h.set_mtime(1_700_000_000);
            h.set_uid(0);
            h.set_gid(5);
            let data: &[u8] = match e {
                E::Dir(p) => {
                    h.set_entry_type(tar::EntryType::Directory);
                    h.set_mode(0o755);
                    set_name(&mut h, p).unwrap();
                    &[]
                }
                E::Char(p, major, minor) => {
                    h.set_entry_type(tar::EntryType::Char);
                    h.set_mode(0o666);
                    set_name(&mut h, p).unwrap();
                    h.set_device_major(*major).unwrap();
                    h.set_device_minor(*minor).unwrap();
                    &[]
                }
                E::Link(p, target) => {
                    h.set_entry_type(tar::EntryType::Symlink);
                    h.set_mode(0o777);
                    set_name(&mut h, p).unwrap();
                    h.set_link_name(target).unwrap();
                    &[]
                }
                E::File(p, data) => {
                    h.set_entry_type(tar::EntryType::Regular);
                    h.set_mode(0o644);
                    set_name(&mut h, p).unwrap();
                    data
                }
            };
            h.set_size(data.len() as u64);
            h.set_cksum();
            b.append(&h, data).unwrap();
        }
        b.into_inner().unwrap()
    }

    /// (path, type, major, minor, mode, uid, gid, mtime, link, data) of each entry.
    type Row = (String, u8, Option<u32>, Option<u32>, u32, u64, u64, u64, Option<String>, Vec<u8>);

    fn rows(tar: &[u8]) -> Vec<Row> {
        let mut a = tar::Archive::new(tar);
        a.entries()
            .unwrap()
            .map(|e| {
                let mut e = e.unwrap();
                let h = e.header().clone();
                let mut data = Vec::new();
                e.read_to_end(&mut data).unwrap();
                (
                    String::from_utf8_lossy(&h.path_bytes()).into_owned(),
                    h.entry_type().as_byte(),
                    h.device_major().ok().flatten(),
                    h.device_minor().ok().flatten(),
                    h.mode().unwrap(),
                    h.uid().unwrap(),
                    h.gid().unwrap(),
                    h.mtime().unwrap(),
                    h.link_name().unwrap().map(|l| l.to_string_lossy().into_owned()),
                    data,
                )
            })
            .collect()
    }

    const SWAP_0_1: [NodeSwap; 1] = [NodeSwap { recorded: 0, assigned: 1 }];

    #[test]
    fn the_assigned_gpu_s_node_replaces_the_recorded_one_and_the_rest_is_equal() {
        let before = tar_of(&[
            E::Dir("./"),
            E::Char("./null", 1, 3),
            E::Char("./nvidia0", 195, 0),
            E::Char("./nvidiactl", 195, 255),
            E::Dir("./pts/"),
            E::Link("./fd", "/proc/self/fd"),
            E::File("./shm-note", b"hello"),
            E::Char("./other195", 10, 0),
        ]);
        let (after, replaced) = rewrite(&before[..], Vec::new(), &SWAP_0_1, Path::new("t")).unwrap();
        assert_eq!(replaced, [0]);
        let (mut want, got) = (rows(&before), rows(&after));
        want[2].0 = "./nvidia1".into();
        want[2].3 = Some(1);
        assert_eq!(got, want);
        // The replaced node keeps mode, owner and time.
        assert_eq!((got[2].4, got[2].5, got[2].6, got[2].7), (0o666, 0, 5, 1_700_000_000));
    }

    #[test]
    fn a_node_of_another_major_or_another_name_is_untouched() {
        let before = tar_of(&[E::Char("./nvidia0", 10, 0), E::Char("./gpu", 195, 0)]);
        let (after, replaced) = rewrite(&before[..], Vec::new(), &SWAP_0_1, Path::new("t")).unwrap();
        assert!(replaced.is_empty());
        assert_eq!(rows(&after), rows(&before));
    }

    #[test]
    fn two_gpus_swapped_both_ways_and_a_duplicate_refused() {
        let before = tar_of(&[E::Char("./nvidia0", 195, 0), E::Char("./nvidia1", 195, 1)]);
        let both = [NodeSwap { recorded: 0, assigned: 1 }, NodeSwap { recorded: 1, assigned: 0 }];
        let (after, replaced) = rewrite(&before[..], Vec::new(), &both, Path::new("t")).unwrap();
        assert_eq!(replaced, [0, 1]);
        let got: Vec<(String, Option<u32>)> = rows(&after).into_iter().map(|r| (r.0, r.3)).collect();
        assert_eq!(got, [("./nvidia1".into(), Some(1)), ("./nvidia0".into(), Some(0))]);
        let err = rewrite(&before[..], Vec::new(), &SWAP_0_1, Path::new("t")).unwrap_err();
        assert!(err.to_string().contains("./nvidia1 would be there twice"), "{err}");
    }

    /// A container given GPUs that overlap the recorded ones (recorded 0 and 1, given 1 and 2):
    /// nvidia1 is both an assigned node and a recorded one being replaced, so the image is judged
    /// after all rewrites; only a node that stays in the image conflicts.
    #[test]
    fn an_overlapping_assignment_is_judged_after_all_rewrites() {
        let before =
            tar_of(&[E::Char("./nvidia0", 195, 0), E::Char("./nvidia1", 195, 1), E::Char("./nvidia3", 195, 3)]);
        let chain = [NodeSwap { recorded: 0, assigned: 1 }, NodeSwap { recorded: 1, assigned: 2 }];
        let (after, replaced) = rewrite(&before[..], Vec::new(), &chain, Path::new("t")).unwrap();
        assert_eq!(replaced, [0, 1]);
        let got: Vec<(String, Option<u32>)> = rows(&after).into_iter().map(|r| (r.0, r.3)).collect();
        assert_eq!(got, [("./nvidia1".into(), Some(1)), ("./nvidia2".into(), Some(2)), ("./nvidia3".into(), Some(3))]);
        // nvidia3 is not replaced: moving GPU 1 onto it would leave two.
        let onto_kept = [NodeSwap { recorded: 0, assigned: 1 }, NodeSwap { recorded: 1, assigned: 3 }];
        let err = rewrite(&before[..], Vec::new(), &onto_kept, Path::new("t")).unwrap_err();
        assert!(err.to_string().contains("./nvidia3 would be there twice"), "{err}");
        // The work copy refuses with that reason, not as a recorded node missing.
        let dir = tempfile::tempdir().unwrap();
        let images = dir.path().join("images");
        fs::create_dir(&images).unwrap();
        fs::write(images.join("tmpfs-dev-77.tar.gz.img"), gz(&before)).unwrap();
        let err = work_copy(&images, &dir.path().join("work"), &onto_kept).unwrap_err();
        assert!(matches!(&err, DevImageError::Conflict { name, .. } if name == "./nvidia3"), "{err:?}");
        assert!(err.to_string().contains("tmpfs-dev-77.tar.gz.img: ./nvidia3 would be there twice"), "{err}");
    }

    fn gz(bytes: &[u8]) -> Vec<u8> {
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        e.write_all(bytes).unwrap();
        e.finish().unwrap()
    }

    #[test]
    fn the_work_copy_links_every_image_and_rewrites_the_dev_tmpfs_only() {
        let dir = tempfile::tempdir().unwrap();
        let images = dir.path().join("images");
        fs::create_dir(&images).unwrap();
        let dev = tar_of(&[E::Dir("./"), E::Char("./null", 1, 3), E::Char("./nvidia0", 195, 0)]);
        let shm = tar_of(&[E::Dir("./"), E::File("./x", b"data")]);
        fs::write(images.join("tmpfs-dev-77.tar.gz.img"), gz(&dev)).unwrap();
        fs::write(images.join("tmpfs-dev-78.tar.gz.img"), gz(&shm)).unwrap();
        fs::write(images.join("pages-1.img"), b"pages").unwrap();
        fs::write(images.join("stats-restore"), b"old").unwrap();
        fs::create_dir(dir.path().join("pre-1")).unwrap();
        std::os::unix::fs::symlink("../pre-1", images.join("parent")).unwrap();
        let work = dir.path().join("bundle/kybernate-images");
        fs::create_dir_all(work.join("stale")).unwrap();
        assert_eq!(work_copy(&images, &work, &SWAP_0_1).unwrap(), 1);

        let mut names: Vec<String> =
            fs::read_dir(&work).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
        names.sort();
        assert_eq!(names, ["pages-1.img", "parent", "tmpfs-dev-77.tar.gz.img", "tmpfs-dev-78.tar.gz.img"]);
        for link in ["pages-1.img", "parent", "tmpfs-dev-78.tar.gz.img"] {
            assert_eq!(fs::read_link(work.join(link)).unwrap(), Path::new("../../images").join(link));
            assert_eq!(fs::canonicalize(work.join(link)).unwrap(), fs::canonicalize(images.join(link)).unwrap());
        }
        assert_eq!(relative(Path::new("/a/b/c"), Path::new("/a/x")), Path::new("../../x"));
        let rewritten = fs::read(work.join("tmpfs-dev-77.tar.gz.img")).unwrap();
        let mut tar = Vec::new();
        flate2::read::GzDecoder::new(&rewritten[..]).read_to_end(&mut tar).unwrap();
        let got: Vec<(String, Option<u32>)> = rows(&tar).into_iter().map(|r| (r.0, r.3)).collect();
        assert_eq!(got, [("./".into(), None), ("./null".into(), Some(3)), ("./nvidia1".into(), Some(1))]);
        // The checkpoint's own image is untouched.
        assert_eq!(fs::read(images.join("tmpfs-dev-77.tar.gz.img")).unwrap(), gz(&dev));
    }

    #[test]
    fn a_recorded_node_missing_from_the_images_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let images = dir.path().join("images");
        fs::create_dir(&images).unwrap();
        let dev = tar_of(&[E::Dir("./"), E::Char("./null", 1, 3), E::Char("./nvidia0", 195, 0)]);
        fs::write(images.join("tmpfs-dev-77.tar.gz.img"), gz(&dev)).unwrap();
        // A tmpfs image that is no tar is left as it is, and named when a node is missing.
        fs::write(images.join("tmpfs-dev-79.tar.gz.img"), gz(b"not a tar")).unwrap();
        let swaps = [NodeSwap { recorded: 0, assigned: 2 }, NodeSwap { recorded: 3, assigned: 1 }];
        let err = work_copy(&images, &dir.path().join("work"), &swaps).unwrap_err();
        assert!(err.to_string().contains("tmpfs images not rewritten") && err.to_string().contains("79"), "{err}");
        assert!(matches!(&err, DevImageError::MissingNode { missing, .. } if missing == &[3]), "{err:?}");
        assert!(err.to_string().contains("/dev/nvidia3"), "{err}");
    }
}
