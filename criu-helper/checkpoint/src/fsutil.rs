//! Replacing a file atomically: readers see the old content or the new, never a partial file.
//!
//! The new content goes into a hidden temporary file created exclusively (`O_EXCL`, so a
//! leftover or a racing writer is never written through) beside the target, gets the target's
//! mode, and is renamed over the target. [`Durability`] says whether it must also survive a
//! crash of the machine.

use std::fs::{self, File, OpenOptions, Permissions};
use std::io::{self, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::SystemTime;

/// What a completed write survives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Durability {
    /// A crash of the process (the rename is atomic), not of the machine: for files on tmpfs
    /// (`/run`), which a reboot empties anyway. No fsync.
    Process,
    /// A crash of the machine too: the file's data is synced before the rename, and the
    /// directory after it, so the new name never points at missing data.
    Machine,
}

/// A file being written to replace `target`; [`commit`](Self::commit) puts it in place, dropping
/// it without a commit removes it.
#[derive(Debug)]
pub struct AtomicFile {
    file: File,
    tmp: PathBuf,
    target: PathBuf,
    mode: u32,
    durability: Durability,
    committed: bool,
}

impl AtomicFile {
    /// Starts replacing `target` with a file of `mode` (permission bits, set exactly, whatever the
    /// umask); the temporary file is a hidden sibling of `target`.
    pub fn create(target: &Path, mode: u32, durability: Durability) -> io::Result<Self> {
        let dir = match target.parent() {
            Some(p) if !p.as_os_str().is_empty() => p,
            _ => Path::new("."),
        };
        Self::create_in(dir, target, mode, durability)
    }

    /// [`create`](Self::create) with the temporary file in `dir` (on the target's filesystem):
    /// for a target whose own directory must never hold anything unlisted (a checkpoint).
    pub fn create_in(dir: &Path, target: &Path, mode: u32, durability: Durability) -> io::Result<Self> {
        let name = target
            .file_name()
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "not a file path"))?
            .to_string_lossy();
        let nanos = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_nanos());
        let tmp = dir.join(format!(".{name}.tmp-{}-{nanos}", std::process::id()));
        // 0600 until the content is complete: the mode is set just before the rename.
        let file = OpenOptions::new().write(true).create_new(true).mode(0o600).open(&tmp)?;
        Ok(Self { file, tmp, target: target.to_path_buf(), mode, durability, committed: false })
    }

    /// The temporary file, to write the content (or change its owner) through.
    pub fn file(&mut self) -> &mut File {
        &mut self.file
    }

    /// Sets the mode, syncs as [`Durability`] says, and renames the file over the target.
    pub fn commit(mut self) -> io::Result<()> {
        // After the caller's writes and any fchown (which clears set-id bits).
        self.file.set_permissions(Permissions::from_mode(self.mode & 0o7777))?;
        if self.durability == Durability::Machine {
            self.file.sync_all()?;
        }
        fs::rename(&self.tmp, &self.target)?;
        self.committed = true;
        if self.durability == Durability::Machine {
            let dir = self.target.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
            File::open(dir)?.sync_all()?;
        }
        Ok(())
    }
}

impl Drop for AtomicFile {
    fn drop(&mut self) {
        if !self.committed {
            let _ = fs::remove_file(&self.tmp);
        }
    }
}

/// Replaces `path` with `bytes` atomically, as a file of `mode` (see [`AtomicFile`]).
pub fn write_atomic(path: &Path, bytes: &[u8], mode: u32, durability: Durability) -> io::Result<()> {
    let mut f = AtomicFile::create(path, mode, durability)?;
    f.file().write_all(bytes)?;
    f.commit()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    fn names(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> =
            fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
        v.sort();
        v
    }

    #[test]
    fn replaces_the_content_with_the_mode_asked_for_whatever_the_umask() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.toml");
        fs::write(&path, b"old").unwrap();
        for (mode, durability) in
            [(0o644, Durability::Machine), (0o600, Durability::Process), (0o755, Durability::Machine)]
        {
            write_atomic(&path, b"new", mode, durability).unwrap();
            assert_eq!(fs::read(&path).unwrap(), b"new");
            assert_eq!(fs::metadata(&path).unwrap().mode() & 0o7777, mode);
        }
        assert_eq!(names(dir.path()), ["config.toml"], "no temporary file left");
    }

    #[test]
    fn an_uncommitted_write_leaves_the_target_and_no_temporary_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("kybernate.json");
        fs::write(&path, b"old").unwrap();
        let mut f = AtomicFile::create(&path, 0o600, Durability::Machine).unwrap();
        f.file().write_all(b"half").unwrap();
        drop(f);
        assert_eq!(fs::read(&path).unwrap(), b"old");
        assert_eq!(names(dir.path()), ["kybernate.json"]);
    }

    #[test]
    fn the_temporary_file_can_live_outside_the_targets_directory() {
        let dir = tempfile::tempdir().unwrap();
        let inner = dir.path().join("checkpoint");
        fs::create_dir(&inner).unwrap();
        let target = inner.join("kybernate.json");
        let mut f = AtomicFile::create_in(dir.path(), &target, 0o600, Durability::Machine).unwrap();
        f.file().write_all(b"{}").unwrap();
        assert_eq!(names(&inner), Vec::<String>::new(), "nothing inside the target's directory while writing");
        f.commit().unwrap();
        assert_eq!(names(&inner), ["kybernate.json"]);
        assert_eq!(names(dir.path()), ["checkpoint"]);
    }

    #[test]
    fn a_missing_directory_is_an_error_and_two_writers_never_share_a_temporary_file() {
        let dir = tempfile::tempdir().unwrap();
        assert!(write_atomic(&dir.path().join("no/such/file"), b"x", 0o600, Durability::Process).is_err());
        let target = dir.path().join("t");
        let a = AtomicFile::create(&target, 0o600, Durability::Process).unwrap();
        let b = AtomicFile::create(&target, 0o600, Durability::Process).unwrap();
        assert_ne!(a.tmp, b.tmp, "two writers get two temporary files");
    }
}
