//! The node's checkpoint store, writing checkpoints atomically, and verifying
//! them before a restore.
//!
//! Checkpoints hold process memory (secrets included), so every directory is
//! 0700, and a reference from an annotation is only followed inside the store.

use std::collections::BTreeMap;
use std::fs::{self, DirBuilder, File};
use std::io::{self, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

use crate::digest::{self, Algorithm, Hashed, Job};
use crate::follow::{Follower, Prehashed};
use crate::manifest::{
    clamp_time, FileEntry, Manifest, FORMAT_VERSION, IMAGES_DIR, MANIFEST_FILE, OLDEST_FORMAT_VERSION, ROOTFS_DIFF,
};
use crate::signing::{SigningKey, SIGNATURE_FILE};
use crate::trust::ORIGIN_FILE;

/// Files beside the manifest at the top of a checkpoint that the manifest does not list: the
/// manifest itself, its signature, and this node's origin marker. Only as regular files.
pub const SIDE_FILES: [&str; 3] = [MANIFEST_FILE, SIGNATURE_FILE, ORIGIN_FILE];

/// The file CRIU writes first and restore reads first: without it there is no checkpoint.
pub const INVENTORY: &str = "checkpoint/inventory.img";
/// CRIU's inventory image's file name (at the top of a flat checkpoint).
pub const INVENTORY_FILE: &str = "inventory.img";

/// A store operation that failed. Every variant names the path or value at fault.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("invalid {what} {value:?}: must be non-empty, not \".\" or \"..\", without '/' or NUL")]
    BadName { what: &'static str, value: String },
    #[error("checkpoint {reference:?} resolves to {} which is not inside the checkpoint store {}", resolved.display(), root.display())]
    OutsideRoot { reference: String, resolved: PathBuf, root: PathBuf },
    #[error("checkpoint {reference:?} not found")]
    NotFound { reference: String },
    /// Inside the store, but in a directory whose name starts with '.': the work directory of a
    /// checkpoint being written, removed or imported, which is never restored from.
    #[error("checkpoint {reference:?} resolves to {}: {hidden:?} is a hidden work directory (a checkpoint being written, removed or imported), not a committed checkpoint", resolved.display())]
    Hidden { reference: String, resolved: PathBuf, hidden: String },
    /// Inside the store, but not `<root>/<namespace>/<container>/<checkpoint>` holding the manifest.
    #[error("checkpoint {reference:?} resolves to {}, which is not a checkpoint directory ({}/<namespace>/<container>/<checkpoint> holding {MANIFEST_FILE}): {why}", resolved.display(), root.display())]
    NotACheckpoint { reference: String, resolved: PathBuf, root: PathBuf, why: &'static str },
    #[error("{}: already exists and is not an empty directory", target.display())]
    TargetExists { target: PathBuf },
    #[error("{}: unexpected {what} in checkpoint (only directories and regular files are allowed)", path.display())]
    Unexpected { path: PathBuf, what: &'static str },
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: io::Error,
    },
    /// `[checkpoint] signing_key` is set and the manifest could not be signed: the checkpoint is
    /// not committed (a node that signs never leaves an unsigned checkpoint behind).
    #[error("cannot sign the checkpoint: {0}")]
    Sign(#[from] crate::signing::SigningError),
}

/// A checkpoint directory that must not be restored. Every variant names the file at fault.
#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    #[error("{}: invalid checkpoint manifest: {reason}", path.display())]
    Manifest { path: PathBuf, reason: String },
    #[error("{}: unsupported checkpoint format version {found} (this Kybernate reads versions {oldest} to {supported})", path.display())]
    Unsupported { path: PathBuf, found: u32, oldest: u32, supported: u32 },
    #[error("{}: manifest lists {entry:?}, which is not a plain relative path inside the checkpoint", path.display())]
    BadPath { path: PathBuf, entry: String },
    #[error("{}: checkpoint is incomplete: CRIU's inventory is not in the manifest", missing.display())]
    Incomplete { missing: PathBuf },
    #[error("{}: listed in the manifest but missing", file.display())]
    Missing { file: PathBuf },
    #[error("{}: not a regular file (symlinks and special files are not allowed in a checkpoint)", file.display())]
    NotRegular { file: PathBuf },
    #[error("{}: size is {found} bytes, the manifest says {expected}", file.display())]
    Size { file: PathBuf, expected: u64, found: u64 },
    /// A unit of the file hashes to another digest than the manifest's: bytes `start..end`, chunk
    /// `chunk` of `chunks` (format 1 and files of one chunk: the whole file, chunk 1 of 1).
    #[error("{}: checksum mismatch in bytes {start}..{end} (chunk {chunk} of {chunks}): the file failed verification (corrupted or tampered with)", file.display())]
    Checksum { file: PathBuf, start: u64, end: u64, chunk: u64, chunks: u64 },
    #[error("{}: not listed in the manifest", file.display())]
    Unlisted { file: PathBuf },
    /// The memory pages failed their verification while the restore waited for it (see
    /// [`crate::deferred`]): CRIU was stopped before the restored process ran.
    #[error("{source}; the restore was stopped before the restored process ran")]
    Held {
        #[source]
        source: Box<VerifyError>,
    },
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: io::Error,
    },
}

fn store_io(what: &str, path: &Path) -> impl FnOnce(io::Error) -> StoreError {
    let context = format!("{}: cannot {what}", path.display());
    move |source| StoreError::Io { context, source }
}

fn verify_io(what: &str, path: &Path) -> impl FnOnce(io::Error) -> VerifyError {
    let context = format!("{}: cannot {what}", path.display());
    move |source| VerifyError::Io { context, source }
}

/// The node's checkpoint store: `<root>/<namespace>/<container>/<timestamp>/`, every directory 0700 root.
#[derive(Debug, Clone)]
pub struct Store {
    root: PathBuf,
}

/// The time a checkpoint directory's name gives (`20261123T212501.123Z`, as
/// [`Store::new_checkpoint_path`] makes it); None for any other name.
pub fn checkpoint_dir_time(name: &str) -> Option<SystemTime> {
    let b = name.as_bytes();
    if b.len() < 16 || !name.is_ascii() || b[8] != b'T' {
        return None;
    }
    let text =
        format!("{}-{}-{}T{}:{}:{}", &name[..4], &name[4..6], &name[6..8], &name[9..11], &name[11..13], &name[13..]);
    humantime::parse_rfc3339_weak(&text).ok()
}

impl Store {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Path for a new checkpoint: `root/ns/container/<timestamp>`, the timestamp UTC
    /// `20261123T212501.123Z` (sorts by time, no ':' which some tools treat as a host separator).
    pub fn new_checkpoint_path(&self, namespace: &str, container: &str, at: SystemTime) -> Result<PathBuf, StoreError> {
        check_name("namespace", namespace)?;
        check_name("container id", container)?;
        let stamp: String = humantime::format_rfc3339_millis(clamp_time(at))
            .to_string()
            .chars()
            .filter(|c| !"-:".contains(*c))
            .collect();
        Ok(self.root.join(namespace).join(container).join(stamp))
    }

    /// Resolves a checkpoint reference from a user, annotation or env var: an absolute path, or a
    /// path relative to the root. Both are canonicalised and the result must be strictly inside
    /// the root, so `../` and symlinks cannot reach another tenant's files or the host; and it
    /// must be a committed checkpoint, `<root>/<namespace>/<container>/<checkpoint>` holding the
    /// manifest with no hidden component, so that a checkpoint still being written, removed or
    /// imported (or a directory above or inside one) is never restored from.
    pub fn resolve(&self, reference: &str) -> Result<PathBuf, StoreError> {
        if reference.is_empty() {
            return Err(StoreError::NotFound { reference: reference.into() });
        }
        let root = fs::canonicalize(&self.root).map_err(store_io("resolve checkpoint store", &self.root))?;
        let resolved = match fs::canonicalize(self.root.join(reference)) {
            Ok(p) => p,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(StoreError::NotFound { reference: reference.into() })
            }
            Err(source) => return Err(StoreError::Io { context: format!("checkpoint {reference:?}"), source }),
        };
        let Ok(rel) = resolved.strip_prefix(&root) else {
            return Err(StoreError::OutsideRoot { reference: reference.into(), resolved, root });
        };
        let parts: Vec<&std::ffi::OsStr> = rel.iter().collect();
        if parts.is_empty() {
            return Err(StoreError::OutsideRoot { reference: reference.into(), resolved, root });
        }
        if let Some(hidden) = parts.iter().find(|p| p.as_encoded_bytes().starts_with(b".")) {
            let hidden = hidden.to_string_lossy().into_owned();
            return Err(StoreError::Hidden { reference: reference.into(), resolved, hidden });
        }
        let why = match parts.len() {
            1 => "it is a namespace directory",
            2 => "it is a container directory",
            3 if resolved.join(MANIFEST_FILE).is_file() => return Ok(resolved),
            3 => "it holds no manifest",
            _ => "it lies below a checkpoint directory",
        };
        Err(StoreError::NotACheckpoint { reference: reference.into(), resolved, root, why })
    }

    /// Hidden work directories whose writer is gone: partial checkpoints (`.<name>.partial-<pid>-<n>`),
    /// removals (`.<name>.removing-<pid>-<n>`), imports (`.import-<pid>-<n>`) and pulls
    /// (`.pull-<pid>-<n>`) left by a shim or CLI that was killed mid-way. They never look like checkpoints, but they hold disk space.
    /// `alive(pid)` says whether the writer still runs (normally: `/proc/<pid>` exists).
    pub fn stale_work_dirs(&self, alive: impl Fn(u32) -> bool) -> Vec<PathBuf> {
        let mut out = Vec::new();
        let mut level = vec![self.root.clone()];
        for _depth in 0..3 {
            let mut next = Vec::new();
            for dir in &level {
                let Ok(entries) = fs::read_dir(dir) else { continue };
                for e in entries.flatten() {
                    let (name, path) = (e.file_name().to_string_lossy().into_owned(), e.path());
                    if !e.file_type().is_ok_and(|t| t.is_dir()) {
                        continue;
                    }
                    match work_dir_writer(&name) {
                        Some(pid) if !alive(pid) => out.push(path),
                        Some(_) => {}
                        None if !name.starts_with('.') => next.push(path),
                        None => {}
                    }
                }
            }
            level = next;
        }
        out.sort();
        out
    }

    /// Every checkpoint (a directory at depth 3 holding the manifest) with its parsed and
    /// validated manifest ([`Manifest::validate`]); partial checkpoints (names starting with '.')
    /// are skipped. A missing root is an empty store.
    #[allow(clippy::type_complexity)] // spelt out: the shim and the CLI are written against it
    pub fn list(&self) -> Result<Vec<(PathBuf, Result<Manifest, VerifyError>)>, StoreError> {
        let mut found = Vec::new();
        let now = SystemTime::now();
        for ns in subdirs(&self.root)? {
            for container in subdirs(&ns)? {
                for cp in subdirs(&container)? {
                    if cp.join(MANIFEST_FILE).is_file() {
                        let manifest = read_manifest(&cp).and_then(|m| validated(&cp, m, now));
                        found.push((cp, manifest));
                    }
                }
            }
        }
        Ok(found)
    }
}

/// The visible subdirectories of `dir`, sorted; a missing `dir` has none.
fn subdirs(dir: &Path) -> Result<Vec<PathBuf>, StoreError> {
    let entries = match fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(store_io("list", dir)(e)),
    };
    let mut out = Vec::new();
    for entry in entries {
        let entry = entry.map_err(store_io("list", dir))?;
        let hidden = entry.file_name().as_encoded_bytes().starts_with(b".");
        if !hidden && entry.file_type().is_ok_and(|t| t.is_dir()) {
            out.push(entry.path());
        }
    }
    out.sort();
    Ok(out)
}

fn check_name(what: &'static str, value: &str) -> Result<(), StoreError> {
    if value.is_empty() || value == "." || value == ".." || value.contains(['/', '\0']) {
        return Err(StoreError::BadName { what, value: value.into() });
    }
    Ok(())
}

/// Creates `dir` and its missing parents with mode 0700; existing ones are left as they are.
pub(crate) fn create_private_dirs(dir: &Path) -> Result<(), StoreError> {
    let missing: Vec<&Path> = dir.ancestors().take_while(|p| !p.as_os_str().is_empty() && !p.exists()).collect();
    for p in missing.into_iter().rev() {
        match DirBuilder::new().mode(0o700).create(p) {
            Err(e) if e.kind() != io::ErrorKind::AlreadyExists => return Err(store_io("create directory", p)(e)),
            _ => {}
        }
        // The umask may have removed bits we wanted; 0700 only removes.
        fs::set_permissions(p, fs::Permissions::from_mode(0o700)).map_err(store_io("chmod", p))?;
    }
    Ok(())
}

/// A unique hidden sibling name for work in progress.
pub(crate) fn hidden_sibling(target: &Path, kind: &str) -> Option<PathBuf> {
    let parent = target.parent()?;
    let name = target.file_name()?.to_string_lossy();
    let nanos = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_nanos());
    Some(parent.join(format!(".{name}.{kind}-{}-{nanos}", std::process::id())))
}

/// The writer's pid of a hidden work directory name (see [`Store::stale_work_dirs`]).
fn work_dir_writer(name: &str) -> Option<u32> {
    let rest = name.strip_prefix('.')?;
    let (kind_part, nanos) = rest.rsplit_once('-')?;
    let (kind_part, pid) = kind_part.rsplit_once('-')?;
    let known = kind_part == "import"
        || kind_part == "pull"
        || [".partial", ".removing"].iter().any(|k| kind_part.ends_with(k));
    (known && nanos.bytes().all(|b| b.is_ascii_digit()) && !nanos.is_empty()).then(|| pid.parse().ok()).flatten()
}

pub(crate) fn fsync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// A checkpoint being written. It lives in a hidden 0700 sibling of its target
/// (`<parent>/.<target-name>.partial-<pid>-<nanos>`), so an interrupted checkpoint never looks like a valid one;
/// dropping it without `commit` removes it.
#[derive(Debug)]
pub struct PartialCheckpoint {
    dir: PathBuf,
    target: PathBuf,
    committed: bool,
    /// CRIU's images at the top (see `Manifest::flat`).
    flat: bool,
    /// Hashing the images while CRIU writes them ([`follow_dump`](Self::follow_dump)).
    follower: Option<Follower>,
    /// Signs the manifest at commit ([`sign_with`](Self::sign_with)).
    signing_key: Option<SigningKey>,
}

/// Where a commit's time went, for the journal's phases.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CommitTimes {
    /// Hashing what the dump follower had not hashed, and each file's fsync (interleaved: a file
    /// is synced as soon as its last chunk is hashed).
    pub hash: Duration,
    /// Writing the manifest, syncing the directories and the rename into place.
    pub sync_and_rename: Duration,
    /// Bytes the dump follower had hashed during the dump (taken, not hashed again).
    pub followed_bytes: u64,
}

/// File in a partial checkpoint naming its current phase (never part of a finished checkpoint).
pub const PHASE_FILE: &str = ".phase";
/// Phases a partial checkpoint goes through before its commit (the GPU ones only in the
/// driver-api mode); the commit itself shows as `spec.dump` present and no phase file.
pub const PHASE_GPU_LOCK: &str = "gpu-lock";
pub const PHASE_GPU_CHECKPOINT: &str = "gpu-checkpoint";
pub const PHASE_CRIU_DUMP: &str = "criu-dump";

impl PartialCheckpoint {
    /// Creates missing parents of `target` (0700), then the partial dir and its `checkpoint/` (0700).
    /// `target` must not exist, or be an empty directory (containerd hands us a fresh temp dir).
    pub fn begin(target: &Path) -> Result<Self, StoreError> {
        let partial = Self::begin_dir(target, false)?;
        let images = partial.images_dir();
        DirBuilder::new().mode(0o700).create(&images).map_err(store_io("create directory", &images))?;
        Ok(partial)
    }

    /// Like [`begin`](Self::begin), for a checkpoint whose CRIU images sit at the top of the
    /// directory (containerd's own checkpoint dir, see `Manifest::flat`).
    pub fn begin_flat(target: &Path) -> Result<Self, StoreError> {
        Self::begin_dir(target, true)
    }

    /// The hidden partial dir beside `target` (0700, parents created 0700).
    fn begin_dir(target: &Path, flat: bool) -> Result<Self, StoreError> {
        let bad = || StoreError::BadName { what: "checkpoint path", value: target.display().to_string() };
        let dir = hidden_sibling(target, "partial").ok_or_else(bad)?;
        let parent = target.parent().ok_or_else(bad)?;
        create_private_dirs(parent)?;
        remove_stale_partials(parent);
        check_target_free(target)?;
        DirBuilder::new().mode(0o700).create(&dir).map_err(store_io("create directory", &dir))?;
        Ok(Self { dir, target: target.to_path_buf(), committed: false, flat, follower: None, signing_key: None })
    }

    /// Whether CRIU's images go to the top of the directory.
    pub fn is_flat(&self) -> bool {
        self.flat
    }

    /// The partial dir.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Where CRIU writes its images: `dir()/checkpoint`, or `dir()` itself when flat.
    pub fn images_dir(&self) -> PathBuf {
        if self.flat {
            self.dir.clone()
        } else {
            self.dir.join(IMAGES_DIR)
        }
    }

    pub fn target(&self) -> &Path {
        &self.target
    }

    /// Tells watchers (`kybernate checkpoint`'s progress line) which phase the checkpoint is in:
    /// one of the `PHASE_*` names, in [`PHASE_FILE`], removed before the commit hashes the files.
    /// Best effort: progress display must never fail a checkpoint.
    pub fn set_phase(&self, phase: &str) {
        let path = self.dir.join(PHASE_FILE);
        if let Err(e) = fs::write(&path, phase) {
            log::debug!("{}: {e}", path.display());
        }
    }

    /// Starts hashing the images, and writing them back, while CRIU writes them (`follow`): call it
    /// right before the dump; [`commit`](Self::commit) then hashes only what was left. Once only.
    pub fn follow_dump(&mut self) {
        if self.follower.is_none() {
            self.follower = Some(Follower::start(&self.dir, Algorithm::current()));
        }
    }

    /// Signs the checkpoint with `key` at commit: `kybernate.sig` is written and synced after the
    /// manifest and before the rename, so a visible checkpoint is signed or not there at all.
    pub fn sign_with(&mut self, key: SigningKey) {
        self.signing_key = Some(key);
    }

    /// Records every file under `dir()` in `manifest.files`, writes the manifest, syncs everything
    /// and renames `dir()` onto the target. On error the partial dir is removed (by drop).
    pub fn commit(self, manifest: Manifest) -> Result<Manifest, StoreError> {
        self.commit_timed(manifest).map(|(manifest, _)| manifest)
    }

    /// [`commit`](Self::commit), also saying where its time went.
    pub fn commit_timed(mut self, mut manifest: Manifest) -> Result<(Manifest, CommitTimes), StoreError> {
        // The dump is over: what the follower hashed is final (or is checked again below).
        let prehashed = self.follower.take().map(Follower::finish).unwrap_or_default();
        let started = Instant::now();
        // Start the disk writes of everything CRIU wrote now, so that they run while we hash
        // (from the page cache); the fsync after each file's hash then waits only for the rest.
        start_writeback(&self.dir);
        // From here the phase is "commit": watchers see spec.dump and no phase file.
        let phase = self.dir.join(PHASE_FILE);
        match fs::remove_file(&phase) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(store_io("remove", &phase)(e)),
            _ => {}
        }
        let mut files = BTreeMap::new();
        let followed = collect_files_known(&self.dir, "", &[], &mut files, &prehashed)?;
        drop(prehashed);
        files.remove(MANIFEST_FILE);
        let hashed = Instant::now();
        manifest.format_version = FORMAT_VERSION;
        manifest.digest = Algorithm::current().params();
        manifest.files = files;
        manifest.flat = self.flat;
        write_manifest(&self.dir, &manifest)?;
        if let Some(key) = &self.signing_key {
            key.sign_dir(&self.dir)?;
        }
        check_target_free(&self.target)?;
        // rename(2) atomically replaces an empty directory.
        fs::rename(&self.dir, &self.target).map_err(|source| StoreError::Io {
            context: format!("cannot move {} to {}", self.dir.display(), self.target.display()),
            source,
        })?;
        self.committed = true;
        if let Some(parent) = self.target.parent() {
            if let Err(e) = fsync_dir(parent) {
                log::warn!("{}: cannot sync directory: {e}", parent.display());
            }
        }
        let times = CommitTimes { hash: hashed - started, sync_and_rename: hashed.elapsed(), followed_bytes: followed };
        Ok((manifest, times))
    }
}

impl Drop for PartialCheckpoint {
    fn drop(&mut self) {
        // Stop reading the files before they are removed.
        drop(self.follower.take());
        if !self.committed {
            if let Err(e) = fs::remove_dir_all(&self.dir) {
                log::warn!("{}: cannot remove partial checkpoint: {e}", self.dir.display());
            }
        }
    }
}

/// Removes the partial checkpoints in `parent` whose writer is gone (a shim killed mid-checkpoint):
/// the next checkpoint beside them cleans up after it. Best effort; a writer whose pid was reused
/// keeps its directory until `kybernate prune` or a later checkpoint.
fn remove_stale_partials(parent: &Path) {
    let Ok(entries) = fs::read_dir(parent) else { return };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(pid) = work_dir_writer(&name).filter(|_| name.contains(".partial-")) else { continue };
        let gone = pid != std::process::id() && !Path::new(&format!("/proc/{pid}")).exists();
        if gone && e.file_type().is_ok_and(|t| t.is_dir()) {
            match fs::remove_dir_all(e.path()) {
                Ok(()) => {
                    log::info!("{}: removed a partial checkpoint whose writer (pid {pid}) is gone", e.path().display())
                }
                Err(err) => log::warn!("{}: cannot remove stale partial checkpoint: {err}", e.path().display()),
            }
        }
    }
}

/// The target must be absent or an empty directory (not a symlink to one).
fn check_target_free(target: &Path) -> Result<(), StoreError> {
    match fs::symlink_metadata(target) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(store_io("stat", target)(e)),
        Ok(m) if m.is_dir() => {
            let mut entries = fs::read_dir(target).map_err(store_io("list", target))?;
            if entries.next().is_none() {
                Ok(())
            } else {
                Err(StoreError::TargetExists { target: target.to_path_buf() })
            }
        }
        Ok(_) => Err(StoreError::TargetExists { target: target.to_path_buf() }),
    }
}

/// Writes `manifest` as `dir`'s `kybernate.json` (0600) and syncs it and `dir`.
pub(crate) fn write_manifest(dir: &Path, manifest: &Manifest) -> Result<(), StoreError> {
    let path = dir.join(MANIFEST_FILE);
    let text = serde_json::to_vec_pretty(manifest).map_err(|e| StoreError::Io {
        context: format!("{}: cannot serialise manifest", path.display()),
        source: io::Error::other(e),
    })?;
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&path)
        .map_err(store_io("create", &path))?;
    f.write_all(&text).and_then(|()| f.sync_all()).map_err(store_io("write", &path))?;
    fsync_dir(dir).map_err(store_io("sync", dir))
}

/// Records every regular file under `dir` (hashed in the current format on every core, and
/// synced) in `out`, by path relative to the checkpoint with `prefix`, except the entries of `dir`
/// named in `skip`; anything but directories and regular files is an error. The directories are
/// synced after their files.
pub(crate) fn collect_files(
    dir: &Path,
    prefix: &str,
    skip: &[&str],
    out: &mut BTreeMap<String, FileEntry>,
) -> Result<(), StoreError> {
    collect_files_known(dir, prefix, skip, out, &Prehashed::default()).map(|_| ())
}

/// [`collect_files`], taking the leading chunks `prehashed` holds for a file where they still
/// hold ([`digest::Known::usable`]); returns the bytes so taken.
fn collect_files_known(
    dir: &Path,
    prefix: &str,
    skip: &[&str],
    out: &mut BTreeMap<String, FileEntry>,
    prehashed: &Prehashed,
) -> Result<u64, StoreError> {
    let (mut files, mut dirs) = (Vec::new(), Vec::new());
    list_files(dir, prefix, skip, &mut files, &mut dirs)?;
    let jobs: Vec<Job> = files.iter().map(|(_, path)| Job { path: path.clone(), size: None }).collect();
    let known: Vec<_> = files.iter().map(|(_, path)| prehashed.get(path)).collect();
    let algorithm = Algorithm::current();
    let hashed = digest::hash_files_known(&jobs, &known, algorithm, true, digest::default_threads())
        .map_err(|e| store_io("read", &e.path)(e.source))?;
    let mut taken = 0;
    for (((rel, path), h), k) in files.into_iter().zip(&hashed).zip(&known) {
        out.insert(rel, digest::entry(algorithm, h));
        if let (Some(k), Ok(meta), Algorithm::Blake3 { chunk_size }) = (k, fs::metadata(&path), algorithm) {
            taken += k.usable(algorithm, meta.dev(), meta.ino(), h.size) as u64 * chunk_size;
        }
    }
    for d in dirs.iter().rev() {
        fsync_dir(d).map_err(store_io("sync", d))?;
    }
    Ok(taken)
}

/// The regular files under `dir` (relative name with `prefix`, path) and the directories, `dir`
/// first; entries of `dir` named in `skip` are left out.
fn list_files(
    dir: &Path,
    prefix: &str,
    skip: &[&str],
    files: &mut Vec<(String, PathBuf)>,
    dirs: &mut Vec<PathBuf>,
) -> Result<(), StoreError> {
    dirs.push(dir.to_path_buf());
    for (name, path, meta) in read_dir_sorted(dir).map_err(|(p, e)| store_io("list", &p)(e))? {
        if skip.contains(&name.as_str()) {
            continue;
        }
        // The signature and origin marker sit beside the manifest, unlisted (regular files only).
        if prefix.is_empty() && SIDE_FILES[1..].contains(&name.as_str()) {
            if meta.is_file() {
                continue;
            }
            let what =
                if meta.is_dir() { "directory where a signature or origin file belongs" } else { file_kind(&meta) };
            return Err(StoreError::Unexpected { path, what });
        }
        let rel = format!("{prefix}{name}");
        if meta.is_dir() {
            list_files(&path, &format!("{rel}/"), &[], files, dirs)?;
        } else if meta.is_file() {
            files.push((rel, path));
        } else {
            return Err(StoreError::Unexpected { path, what: file_kind(&meta) });
        }
    }
    Ok(())
}

/// Asks the kernel to start writing back every regular file under `dir` without waiting
/// (`sync_file_range(SYNC_FILE_RANGE_WRITE)`). Best effort: durability comes from the fsyncs.
fn start_writeback(dir: &Path) {
    let Ok(entries) = read_dir_sorted(dir) else { return };
    for (_, path, meta) in entries {
        if meta.is_dir() {
            start_writeback(&path);
        } else if meta.is_file() {
            if let Ok(f) = File::open(&path) {
                // SAFETY: plain syscall on an fd we own; offset 0 / length 0 means the whole file.
                let rc = unsafe { libc::sync_file_range(f.as_raw_fd(), 0, 0, libc::SYNC_FILE_RANGE_WRITE) };
                if rc != 0 {
                    log::debug!("{}: sync_file_range: {}", path.display(), io::Error::last_os_error());
                }
            }
        }
    }
}

type DirEntries = Vec<(String, PathBuf, fs::Metadata)>;

/// Entries of `dir` without following symlinks, sorted; names must be UTF-8 so
/// they can be manifest keys.
fn read_dir_sorted(dir: &Path) -> Result<DirEntries, (PathBuf, io::Error)> {
    let wrap = |e| (dir.to_path_buf(), e);
    let mut out = Vec::new();
    for entry in fs::read_dir(dir).map_err(wrap)? {
        let entry = entry.map_err(wrap)?;
        let path = entry.path();
        let meta = entry.metadata().map_err(|e| (path.clone(), e))?;
        let Ok(name) = entry.file_name().into_string() else {
            return Err((path, io::Error::new(io::ErrorKind::InvalidData, "file name is not UTF-8")));
        };
        out.push((name, path, meta));
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(out)
}

fn file_kind(meta: &fs::Metadata) -> &'static str {
    use std::os::unix::fs::FileTypeExt;
    let t = meta.file_type();
    if t.is_symlink() {
        "symlink"
    } else if t.is_fifo() {
        "fifo"
    } else if t.is_socket() {
        "socket"
    } else {
        "device"
    }
}

/// Reads and parses the manifest without checking files (for listing).
pub fn read_manifest(dir: &Path) -> Result<Manifest, VerifyError> {
    let path = dir.join(MANIFEST_FILE);
    let text = match fs::read(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return Err(VerifyError::Manifest { path, reason: "missing".into() })
        }
        Err(e) => return Err(VerifyError::Manifest { path, reason: e.to_string() }),
    };
    serde_json::from_slice(&text).map_err(|e| VerifyError::Manifest { path, reason: e.to_string() })
}

/// `manifest` (read from `dir`) if its fields validate ([`Manifest::validate`]); a manifest that
/// does not is a broken checkpoint, reported with the field and value.
fn validated(dir: &Path, manifest: Manifest, now: SystemTime) -> Result<Manifest, VerifyError> {
    manifest
        .validate(now)
        .map_err(|e| VerifyError::Manifest { path: dir.join(MANIFEST_FILE), reason: e.to_string() })?;
    Ok(manifest)
}

/// Verifies a checkpoint directory before restore: the manifest parses, has a format version we
/// read and valid fields, CRIU's inventory is listed, and the files present are exactly those
/// listed, each with the recorded size and digests (hashed in parallel on every core; a changed
/// chunk is named by its byte range).
pub fn verify(dir: &Path) -> Result<Manifest, VerifyError> {
    let manifest = verify_quick(dir)?;
    verify_digests(dir, &manifest, |_| true, digest::default_threads())?;
    Ok(manifest)
}

/// [`verify_quick`], plus the digests of every file except the bulk that only CRIU (or the
/// rootfs diff's unpacking) reads: memory pages (`pages-*.img`) and the rootfs diff. For a caller
/// that reads the small files itself (the CLI's restore checks: spec.dump, CRIU's metadata
/// images) and then hands the checkpoint to the shim, whose [`verify`] hashes everything once.
pub fn verify_metadata(dir: &Path) -> Result<Manifest, VerifyError> {
    let manifest = verify_quick(dir)?;
    verify_digests(dir, &manifest, |rel| !is_bulk(rel), digest::default_threads())?;
    Ok(manifest)
}

/// Whether a checkpoint file is bulk data no caller but CRIU and the rootfs unpacking reads.
fn is_bulk(rel: &str) -> bool {
    let name = rel.rsplit('/').next().unwrap_or(rel);
    rel == ROOTFS_DIFF || (name.starts_with("pages-") && name.ends_with(".img"))
}

/// Hashes the listed files `include` selects (sizes already checked) on `threads` threads and
/// compares the digests.
pub(crate) fn verify_digests(
    dir: &Path,
    manifest: &Manifest,
    include: impl Fn(&str) -> bool,
    threads: usize,
) -> Result<(), VerifyError> {
    let algorithm = algorithm_of(dir, manifest)?;
    let selected: Vec<(&String, &FileEntry)> = manifest.files.iter().filter(|(rel, _)| include(rel)).collect();
    let jobs: Vec<Job> = selected.iter().map(|(rel, e)| Job { path: dir.join(rel), size: Some(e.size) }).collect();
    let hashed =
        digest::hash_files(&jobs, algorithm, false, threads).map_err(|e| verify_io("read", &e.path)(e.source))?;
    for ((rel, entry), h) in selected.into_iter().zip(&hashed) {
        compare(dir, rel, entry, h, algorithm)?;
    }
    Ok(())
}

/// The first unit of `hashed` whose digest is not the manifest's, as a `Checksum` error; a
/// format-2 whole-file digest that does not match the (matching) chunks is a broken manifest.
fn compare(dir: &Path, rel: &str, entry: &FileEntry, hashed: &Hashed, algorithm: Algorithm) -> Result<(), VerifyError> {
    let file = dir.join(rel);
    let expected: Vec<Option<digest::Digest32>> = match algorithm {
        Algorithm::Sha256 => vec![entry.sha256.as_deref().and_then(digest::parse_hex)],
        Algorithm::Blake3 { chunk_size } if entry.size > chunk_size => {
            entry.chunks.iter().map(|c| digest::parse_hex(c)).collect()
        }
        Algorithm::Blake3 { .. } => vec![entry.blake3.as_deref().and_then(digest::parse_hex)],
    };
    let chunks = hashed.units.len() as u64;
    for (i, (got, want)) in hashed.units.iter().zip(&expected).enumerate() {
        if Some(*got) != *want {
            let (start, end) = algorithm.range(entry.size, i as u64);
            return Err(VerifyError::Checksum { file, start, end, chunk: i as u64 + 1, chunks });
        }
    }
    if let Algorithm::Blake3 { chunk_size } = algorithm {
        if entry.size > chunk_size {
            let root = digest::blake3_root(&hashed.units, entry.size, chunk_size);
            if entry.blake3.as_deref().and_then(digest::parse_hex) != Some(root) {
                return Err(VerifyError::Manifest {
                    path: dir.join(MANIFEST_FILE),
                    reason: format!("{rel}: its blake3 does not match its chunk digests"),
                });
            }
        }
    }
    Ok(())
}

/// The algorithm a manifest's format uses (format 2: as its `digest` names it).
fn algorithm_of(dir: &Path, manifest: &Manifest) -> Result<Algorithm, VerifyError> {
    let bad = |reason: String| VerifyError::Manifest { path: dir.join(MANIFEST_FILE), reason };
    match (manifest.format_version, &manifest.digest) {
        (1, None) => Ok(Algorithm::Sha256),
        (1, Some(_)) => Err(bad("format version 1 names no digest; it hashes with sha256".into())),
        (_, Some(params)) => Algorithm::from_params(params).map_err(bad),
        (_, None) => Err(bad(format!("format version {} must name its digest", manifest.format_version))),
    }
}

/// Every entry carries the digests its format needs, well formed: a forged or truncated manifest
/// is refused before any file is hashed.
fn check_entries(dir: &Path, manifest: &Manifest) -> Result<(), VerifyError> {
    let algorithm = algorithm_of(dir, manifest)?;
    let bad = |rel: &str, reason: &str| VerifyError::Manifest {
        path: dir.join(MANIFEST_FILE),
        reason: format!("{rel}: {reason}"),
    };
    let hex = |d: &Option<String>| d.as_deref().and_then(digest::parse_hex).is_some();
    for (rel, e) in &manifest.files {
        match algorithm {
            Algorithm::Sha256 if !hex(&e.sha256) => return Err(bad(rel, "no valid sha256 (format 1)")),
            Algorithm::Sha256 => {}
            Algorithm::Blake3 { .. } if !hex(&e.blake3) => return Err(bad(rel, "no valid blake3 (format 2)")),
            Algorithm::Blake3 { chunk_size } => {
                let want = if e.size > chunk_size { algorithm.units(e.size) } else { 0 };
                if e.chunks.len() as u64 != want {
                    let reason = format!("{} chunk digests for {} bytes, expected {want}", e.chunks.len(), e.size);
                    return Err(bad(rel, &reason));
                }
                if e.chunks.iter().any(|c| digest::parse_hex(c).is_none()) {
                    return Err(bad(rel, "a chunk digest is not 64 hex digits"));
                }
            }
        }
    }
    Ok(())
}

/// Everything [`verify`] checks except the checksums (their presence and form included): cheap enough to run on every checkpoint
/// when listing the store, and it still catches truncated, missing and extra files.
pub fn verify_quick(dir: &Path) -> Result<Manifest, VerifyError> {
    let manifest = read_manifest(dir)?;
    let manifest_path = dir.join(MANIFEST_FILE);
    if !(OLDEST_FORMAT_VERSION..=FORMAT_VERSION).contains(&manifest.format_version) {
        return Err(VerifyError::Unsupported {
            path: manifest_path,
            found: manifest.format_version,
            oldest: OLDEST_FORMAT_VERSION,
            supported: FORMAT_VERSION,
        });
    }
    let manifest = validated(dir, manifest, SystemTime::now())?;
    check_entries(dir, &manifest)?;
    for entry in manifest.files.keys() {
        if !is_plain_relative(entry) || SIDE_FILES.contains(&entry.as_str()) {
            return Err(VerifyError::BadPath { path: manifest_path, entry: entry.clone() });
        }
    }
    let inventory = if manifest.flat { INVENTORY_FILE } else { INVENTORY };
    if !manifest.files.contains_key(inventory) {
        return Err(VerifyError::Incomplete { missing: dir.join(inventory) });
    }
    let mut present = BTreeMap::new();
    present_files(dir, "", &mut present)?;
    for side in SIDE_FILES {
        // An empty directory by that name would leave nothing in `present`: refuse it here.
        if fs::symlink_metadata(dir.join(side)).is_ok_and(|meta| !meta.is_file()) {
            return Err(VerifyError::NotRegular { file: dir.join(side) });
        }
        present.remove(side);
    }
    if let Some((_, file)) = present.iter().find(|(rel, _)| !manifest.files.contains_key(*rel)) {
        return Err(VerifyError::Unlisted { file: file.0.clone() });
    }
    // Sizes first: cheap, and they catch truncation before hashing GiBs.
    for (rel, entry) in &manifest.files {
        let file = dir.join(rel);
        let Some(found) = present.get(rel.as_str()).map(|(_, size)| *size) else {
            return Err(VerifyError::Missing { file });
        };
        if found != entry.size {
            return Err(VerifyError::Size { file, expected: entry.size, found });
        }
    }
    Ok(manifest)
}

/// A manifest key must name a file strictly inside the checkpoint.
pub(crate) fn is_plain_relative(entry: &str) -> bool {
    !entry.is_empty()
        && !entry.contains('\0')
        && Path::new(entry).components().all(|c| matches!(c, Component::Normal(_)))
        && !entry.split('/').any(|c| c.is_empty() || c == "." || c == "..")
}

/// Every regular file under `dir` with its full path and size; anything but directories
/// and regular files is an error.
fn present_files(dir: &Path, prefix: &str, out: &mut BTreeMap<String, (PathBuf, u64)>) -> Result<(), VerifyError> {
    let entries = read_dir_sorted(dir).map_err(|(p, e)| verify_io("list", &p)(e))?;
    for (name, path, meta) in entries {
        let rel = format!("{prefix}{name}");
        if meta.is_dir() {
            present_files(&path, &format!("{rel}/"), out)?;
        } else if meta.is_file() {
            out.insert(rel, (path, meta.len()));
        } else {
            return Err(VerifyError::NotRegular { file: path });
        }
    }
    Ok(())
}

/// Best-effort sum of regular file sizes under `dir` (symlinks not followed).
pub fn dir_size(dir: &Path) -> u64 {
    let Ok(entries) = fs::read_dir(dir) else { return 0 };
    entries
        .flatten()
        .map(|e| match e.metadata() {
            Ok(m) if m.is_dir() => dir_size(&e.path()),
            Ok(m) if m.is_file() => m.len(),
            _ => 0,
        })
        .fold(0u64, u64::saturating_add)
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::symlink;

    use super::*;
    use crate::manifest::sample;

    /// A store with one committed checkpoint `ns/c1/t1` and the work dirs the shim and the CLI
    /// leave beside it while they write, remove or import one, each holding a manifest.
    struct Fixture {
        _tmp: tempfile::TempDir,
        store: Store,
        root: PathBuf,
    }

    fn fixture() -> Fixture {
        let tmp = tempfile::tempdir().unwrap();
        let store = Store::new(tmp.path().join("store"));
        let p = PartialCheckpoint::begin(&store.root().join("ns/c1/t1")).unwrap();
        fs::write(p.images_dir().join(INVENTORY_FILE), b"inventory").unwrap();
        p.commit(sample()).unwrap();
        let root = fs::canonicalize(store.root()).unwrap();
        for work in ["ns/c1/.t2.partial-4242-1", "ns/c1/.t0.removing-4242-2", ".import-4242-3", "ns/.keep", "ns/c1/.t3"]
        {
            fs::create_dir_all(root.join(work).join(IMAGES_DIR)).unwrap();
            fs::copy(root.join("ns/c1/t1").join(MANIFEST_FILE), root.join(work).join(MANIFEST_FILE)).unwrap();
        }
        Fixture { _tmp: tmp, store, root }
    }

    #[test]
    fn checkpoint_dir_names_parse_as_times() {
        let t = checkpoint_dir_time("20261123T212501.123Z").unwrap();
        assert_eq!(humantime::format_rfc3339_millis(t).to_string(), "2026-11-23T21:25:01.123Z");
        for bad in ["", "x", "20261123X212501.123Z", "20261323T212501.123Z", "ééééééééééééééééé"] {
            assert!(checkpoint_dir_time(bad).is_none(), "{bad}");
        }
    }

    #[test]
    fn a_new_checkpoint_removes_partials_of_dead_writers_beside_it() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("ns/c1");
        // pid 2^22 + 1 is above any pid_max: its writer is surely gone.
        let dead = dir.join(".t2.partial-4194305-1");
        let live = dir.join(format!(".t3.partial-{}-1", std::process::id()));
        let removal = dir.join(".t4.removing-4194305-1");
        for d in [&dead, &live, &removal] {
            fs::create_dir_all(d.join(IMAGES_DIR)).unwrap();
        }
        let p = PartialCheckpoint::begin(&dir.join("t5")).unwrap();
        assert!(!dead.exists(), "the dead writer's partial checkpoint is removed");
        assert!(live.exists() && removal.exists(), "a live writer's partial and other work dirs stay");
        drop(p);
    }

    #[test]
    fn a_committed_checkpoint_resolves() {
        let f = fixture();
        let cp = f.root.join("ns/c1/t1");
        assert_eq!(f.store.resolve("ns/c1/t1").unwrap(), cp);
        assert_eq!(f.store.resolve(cp.to_str().unwrap()).unwrap(), cp);
        assert_eq!(f.store.resolve("ns/c1/.t3/../t1").unwrap(), cp, "judged by where it leads");
        // A visible or hidden link to a committed checkpoint is that checkpoint.
        symlink("t1", f.root.join("ns/c1/latest")).unwrap();
        symlink("t1", f.root.join("ns/c1/.latest")).unwrap();
        assert_eq!(f.store.resolve("ns/c1/latest").unwrap(), cp);
        assert_eq!(f.store.resolve("ns/c1/.latest").unwrap(), cp);
    }

    #[test]
    fn hidden_work_dirs_are_no_restore_sources() {
        let f = fixture();
        symlink(".t2.partial-4242-1", f.root.join("ns/c1/t2")).unwrap();
        let absolute = f.root.join("ns/c1/.t2.partial-4242-1");
        for (reference, hidden) in [
            ("ns/c1/.t2.partial-4242-1", ".t2.partial-4242-1"),
            ("ns/c1/.t0.removing-4242-2", ".t0.removing-4242-2"),
            (".import-4242-3", ".import-4242-3"),
            ("ns/.keep", ".keep"),
            ("ns/c1/.t3", ".t3"),
            // A visible name that leads into a work dir, and a path inside one.
            ("ns/c1/t2", ".t2.partial-4242-1"),
            ("ns/c1/.t2.partial-4242-1/checkpoint", ".t2.partial-4242-1"),
            (absolute.to_str().unwrap(), ".t2.partial-4242-1"),
        ] {
            let err = f.store.resolve(reference).unwrap_err();
            assert!(
                matches!(&err, StoreError::Hidden { reference: r, hidden: h, .. } if r == reference && h == hidden),
                "{reference}: {err}"
            );
            let text = err.to_string();
            assert!(text.starts_with(&format!("checkpoint {reference:?} resolves to ")), "{text}");
            let why = "is a hidden work directory (a checkpoint being written, removed or imported), not a \
                       committed checkpoint";
            assert!(text.ends_with(&format!("{hidden:?} {why}")), "{text}");
        }
    }

    #[test]
    fn only_checkpoint_directories_are_restore_sources() {
        let f = fixture();
        fs::create_dir_all(f.root.join("ns/c1/empty")).unwrap();
        fs::write(f.root.join("ns/c1/file"), b"x").unwrap();
        symlink("c1", f.root.join("ns/link-to-container")).unwrap();
        for (reference, why) in [
            ("ns", "it is a namespace directory"),
            ("ns/c1", "it is a container directory"),
            ("ns/link-to-container", "it is a container directory"),
            ("ns/c1/t1/checkpoint", "it lies below a checkpoint directory"),
            ("ns/c1/t1/kybernate.json", "it lies below a checkpoint directory"),
            ("ns/c1/empty", "it holds no manifest"),
            ("ns/c1/file", "it holds no manifest"),
        ] {
            let err = f.store.resolve(reference).unwrap_err();
            assert!(
                matches!(&err, StoreError::NotACheckpoint { reference: r, why: w, .. } if r == reference && *w == why),
                "{reference}: {err}"
            );
            let text = err.to_string();
            let layout = format!("{}/<namespace>/<container>/<checkpoint> holding kybernate.json", f.root.display());
            assert!(text.contains("which is not a checkpoint directory") && text.contains(&layout), "{text}");
        }
        // Unchanged: the root itself and what lies outside, and what does not exist.
        assert!(matches!(f.store.resolve("."), Err(StoreError::OutsideRoot { .. })));
        assert!(matches!(f.store.resolve("ns/../.."), Err(StoreError::OutsideRoot { .. })));
        assert!(matches!(f.store.resolve("ns/c1/t9"), Err(StoreError::NotFound { .. })));
        assert!(matches!(f.store.resolve(""), Err(StoreError::NotFound { .. })));
    }

    #[test]
    fn list_and_verify_refuse_manifests_that_do_not_validate() {
        let f = fixture();
        let cp = f.root.join("ns/c1/t1");
        assert!(verify(&cp).is_ok());
        let mut m = read_manifest(&cp).unwrap();
        m.created = "9999-01-01T00:00:00Z".into();
        write_manifest(&cp, &m).unwrap();
        for err in
            [verify_quick(&cp).unwrap_err(), verify(&cp).unwrap_err(), f.store.list().unwrap().remove(0).1.unwrap_err()]
        {
            assert!(matches!(&err, VerifyError::Manifest { path, .. } if *path == cp.join(MANIFEST_FILE)), "{err}");
            assert!(
                err.to_string()
                    .contains(r#"invalid checkpoint manifest: created "9999-01-01T00:00:00Z" is in the future"#),
                "{err}"
            );
        }
        // Read as stored, for inspect to show.
        assert_eq!(read_manifest(&cp).unwrap().created, "9999-01-01T00:00:00Z");
        m.created = sample().created;
        m.container_id = "../../c1".into();
        write_manifest(&cp, &m).unwrap();
        let err = verify(&cp).unwrap_err();
        let why = r#"container_id "../../c1" is not a valid containerd identifier (letters and digits, separated by "#;
        assert!(err.to_string().ends_with(&format!("{why}single '.', '_' or '-', at most 76 characters)")), "{err}");
    }

    #[test]
    fn signature_and_origin_beside_the_manifest_are_tolerated_only_there_and_as_files() {
        let tmp = tempfile::tempdir().unwrap();
        let target = tmp.path().join("store/ns/c1/t1");
        let mut p = PartialCheckpoint::begin(&target).unwrap();
        fs::write(p.images_dir().join(INVENTORY_FILE), b"inventory").unwrap();
        let key = SigningKey::generate().unwrap();
        let public = key.public().clone();
        p.sign_with(key);
        // An import marks its work dir before the commit: the marker is not listed either.
        crate::trust::write_origin(p.dir(), &crate::trust::Origin::Import { archive: "a.tar".into() }).unwrap();
        let m = p.commit(sample()).unwrap();
        assert!(!m.files.keys().any(|k| SIDE_FILES.contains(&k.as_str())), "{:?}", m.files.keys());
        assert!(verify(&target).is_ok() && verify_quick(&target).is_ok() && verify_metadata(&target).is_ok());
        let sig = crate::signing::read_signature(&target).unwrap().expect("signed at commit");
        assert!(public.verifies(&fs::read(target.join(MANIFEST_FILE)).unwrap(), &sig));

        // Anywhere else they are files the manifest does not list.
        fs::copy(target.join(SIGNATURE_FILE), target.join(IMAGES_DIR).join(SIGNATURE_FILE)).unwrap();
        assert!(matches!(verify_quick(&target), Err(VerifyError::Unlisted { .. })));
        fs::remove_file(target.join(IMAGES_DIR).join(SIGNATURE_FILE)).unwrap();
        // As anything but a regular file they are refused.
        for side in [SIGNATURE_FILE, ORIGIN_FILE] {
            let path = target.join(side);
            let saved = fs::read(&path).unwrap();
            fs::remove_file(&path).unwrap();
            symlink("/etc/hostname", &path).unwrap();
            assert!(matches!(verify_quick(&target), Err(VerifyError::NotRegular { file }) if file == path));
            fs::remove_file(&path).unwrap();
            fs::create_dir(&path).unwrap();
            assert!(matches!(verify_quick(&target), Err(VerifyError::NotRegular { file }) if file == path));
            let mut out = BTreeMap::new();
            let err = collect_files(&target, "", &[], &mut out).unwrap_err();
            assert!(matches!(&err, StoreError::Unexpected { path: p, .. } if *p == path), "{err}");
            fs::remove_dir(&path).unwrap();
            fs::write(&path, saved).unwrap();
        }
        assert!(verify(&target).is_ok());
        // A manifest may not list them.
        let mut m = read_manifest(&target).unwrap();
        let entry = m.files.values().next().unwrap().clone();
        m.files.insert(SIGNATURE_FILE.into(), entry);
        write_manifest(&target, &m).unwrap();
        assert!(matches!(verify_quick(&target), Err(VerifyError::BadPath { entry, .. }) if entry == SIGNATURE_FILE));
    }

    #[test]
    fn a_commit_with_something_else_in_the_signatures_place_leaves_nothing() {
        let tmp = tempfile::tempdir().unwrap();
        let target = tmp.path().join("store/ns/c1/t1");
        let mut p = PartialCheckpoint::begin(&target).unwrap();
        fs::write(p.images_dir().join(INVENTORY_FILE), b"inventory").unwrap();
        p.sign_with(SigningKey::generate().unwrap());
        // A directory where the signature goes: refused before anything is renamed into place.
        fs::create_dir(p.dir().join(SIGNATURE_FILE)).unwrap();
        let err = p.commit(sample()).unwrap_err();
        assert!(matches!(err, StoreError::Unexpected { .. }), "{err}");
        assert!(!target.exists());
        assert_eq!(fs::read_dir(target.parent().unwrap()).unwrap().count(), 0, "the partial dir is gone");
    }
}
