//! The dump follower: hashes a checkpoint's images, and starts their writeback, while CRIU still
//! writes them, so that little is left for the commit after the dump.
//!
//! CRIU writes each image from start to end (memory pages are appended, `write`/`splice`), so a
//! byte below a file's size is final. In format 2 a file larger than one chunk is hashed chunk by
//! chunk ([`crate::digest`]); chunk `k` is certainly complete and final, and its non-root chaining
//! value right, once the file is strictly longer than `(k + 1) × chunk_size`. One background
//! thread (CRIU needs the other cores) walks the partial checkpoint every [`INTERVAL`], hashes
//! each chunk that became final, and asks the kernel to write it back
//! (`sync_file_range(SYNC_FILE_RANGE_WRITE)`). The commit takes these digests ([`Prehashed`]) for
//! a file of the same inode that is still longer than them, and hashes only the rest. A follower
//! that failed on a file (it vanished, a read error) leaves that file to the commit.
//!
//! Should anything rewrite a range after it was hashed, the manifest would not match the file and
//! the restore, which verifies every byte before the process runs, refuses the checkpoint.

use std::collections::HashMap;
use std::fs::{self, File};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use crate::digest::{hash_open_unit, Algorithm, Known, READ_BUF};

/// How long the follower sleeps between walks: short against a dump of seconds, long against
/// the walk itself (a few dozen `stat`s).
pub const INTERVAL: Duration = Duration::from_millis(15);
/// The follower thread's nice value: it takes the CPU CRIU leaves idle, and yields where they
/// compete (a slower dump is frozen time; what the follower leaves is only hashed at commit).
const NICE: libc::c_int = 10;

/// What the follower hashed: per file (by path), its inode and the digests of its leading chunks.
/// Each file's descriptor is kept open until the commit has used the digests, so that its inode
/// number cannot be reused by another file meanwhile.
#[derive(Debug, Default)]
pub struct Prehashed {
    files: HashMap<PathBuf, (Known, Option<File>)>,
}

impl Prehashed {
    /// The digests hashed for the file at `path`, if any.
    pub fn get(&self, path: &Path) -> Option<&Known> {
        self.files.get(path).map(|(k, _)| k).filter(|k| !k.units.is_empty())
    }

    /// How many chunks were hashed, over all files.
    pub fn units(&self) -> u64 {
        self.files.values().map(|(k, _)| k.units.len() as u64).sum()
    }
}

/// The stop request a follower's thread waits on.
#[derive(Debug, Default)]
struct Stop {
    stopped: Mutex<bool>,
    wake: Condvar,
}

impl Stop {
    fn is_set(&self) -> bool {
        *self.stopped.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn set(&self) {
        *self.stopped.lock().unwrap_or_else(|e| e.into_inner()) = true;
        self.wake.notify_all();
    }

    /// Sleeps `interval` or until stopped; whether to go on.
    fn sleep(&self, interval: Duration) -> bool {
        let guard = self.stopped.lock().unwrap_or_else(|e| e.into_inner());
        let (guard, _) = self.wake.wait_timeout_while(guard, interval, |s| !*s).unwrap_or_else(|e| e.into_inner());
        !*guard
    }
}

/// A running follower. [`finish`](Self::finish) stops it and hands over its digests; dropped
/// without, it stops too (its thread never outlives it).
#[derive(Debug)]
pub struct Follower {
    stop: Arc<Stop>,
    hashed: Arc<AtomicU64>,
    thread: Option<JoinHandle<Prehashed>>,
}

impl Follower {
    /// Starts following the files under `dir` (recursively; symlinks are not followed). Format 1
    /// (SHA-256, one digest per file) cannot be hashed in pieces and is never followed.
    pub fn start(dir: &Path, algorithm: Algorithm) -> Self {
        let stop = Arc::new(Stop::default());
        let hashed = Arc::new(AtomicU64::new(0));
        let thread = match algorithm {
            Algorithm::Blake3 { chunk_size } => {
                let (dir, stop, hashed) = (dir.to_path_buf(), stop.clone(), hashed.clone());
                let spawned = std::thread::Builder::new()
                    .name("dump-follower".into())
                    .spawn(move || follow(&dir, chunk_size, &stop, &hashed));
                match spawned {
                    Ok(t) => Some(t),
                    Err(e) => {
                        log::warn!("cannot start the dump follower, the commit hashes everything: {e}");
                        None
                    }
                }
            }
            Algorithm::Sha256 => None,
        };
        Self { stop, hashed, thread }
    }

    /// How many chunks it has hashed so far.
    pub fn hashed_units(&self) -> u64 {
        self.hashed.load(Ordering::Relaxed)
    }

    /// Stops the follower (within one chunk's hashing) and returns what it hashed.
    pub fn finish(mut self) -> Prehashed {
        self.stop_thread().unwrap_or_default()
    }

    fn stop_thread(&mut self) -> Option<Prehashed> {
        let thread = self.thread.take()?;
        self.stop.set();
        match thread.join() {
            Ok(p) => Some(p),
            Err(_) => {
                log::warn!("the dump follower panicked; the commit hashes everything");
                None
            }
        }
    }
}

impl Drop for Follower {
    fn drop(&mut self) {
        self.stop_thread();
    }
}

/// The follower's thread: walks `dir` until stopped.
fn follow(dir: &Path, chunk_size: u64, stop: &Stop, hashed: &AtomicU64) -> Prehashed {
    // SAFETY: plain syscalls; PRIO_PROCESS with a thread id sets that thread's nice value only.
    if unsafe { libc::setpriority(libc::PRIO_PROCESS, libc::gettid() as libc::id_t, NICE) } != 0 {
        log::debug!("dump follower: cannot lower its priority: {}", io::Error::last_os_error());
    }
    let mut state = Prehashed::default();
    let mut buf = vec![0u8; READ_BUF];
    let mut walk = Walk { chunk_size, stop, hashed, state: &mut state, buf: &mut buf };
    while !stop.is_set() {
        walk.dir(dir);
        if !stop.sleep(INTERVAL) {
            break;
        }
    }
    state
}

/// One walk over the partial checkpoint.
struct Walk<'a> {
    chunk_size: u64,
    stop: &'a Stop,
    hashed: &'a AtomicU64,
    state: &'a mut Prehashed,
    buf: &'a mut [u8],
}

impl Walk<'_> {
    fn dir(&mut self, dir: &Path) {
        // A directory that vanished or cannot be read: the commit will say why, if it matters.
        let Ok(entries) = fs::read_dir(dir) else { return };
        for entry in entries.flatten() {
            if self.stop.is_set() {
                return;
            }
            let Ok(kind) = entry.file_type() else { continue };
            let path = entry.path();
            if kind.is_dir() {
                self.dir(&path);
            } else if kind.is_file() {
                // Only a file longer than one chunk has a chunk to hash: skip the others unopened.
                let Ok(meta) = entry.metadata() else { continue };
                if meta.len() > self.chunk_size {
                    if let Err(e) = self.file(&path, &meta) {
                        log::debug!("dump follower: {}: {e}; hashed at commit", path.display());
                    }
                }
            }
        }
    }

    /// Hashes the chunks of `path` (`meta`: its `lstat`) that became final since the last walk.
    fn file(&mut self, path: &Path, meta: &fs::Metadata) -> io::Result<()> {
        let chunk_size = self.chunk_size;
        let algorithm = Algorithm::Blake3 { chunk_size };
        let (known, pinned) = self.state.files.entry(path.to_path_buf()).or_default();
        if pinned.is_some() && (known.dev, known.ino) != (meta.dev(), meta.ino()) {
            // Another file took the name: follow that one.
            *pinned = None;
        }
        let open = match pinned {
            Some(f) => f,
            None => {
                let f = File::open(path)?;
                let m = f.metadata()?;
                *known = Known { dev: m.dev(), ino: m.ino(), units: Vec::new() };
                pinned.insert(f)
            }
        };
        let size = open.metadata()?.len();
        if size <= known.units.len() as u64 * chunk_size {
            // Shrunk below what was hashed: not the append-only writing we follow; start over.
            known.units.clear();
        }
        // Chunk k is final once the file is strictly longer than (k + 1) chunks.
        let ready = size.saturating_sub(1) / chunk_size;
        for k in known.units.len() as u64..ready {
            if self.stop.is_set() {
                break;
            }
            known.units.push(hash_open_unit(open, size, algorithm, k, self.buf)?);
            self.hashed.fetch_add(1, Ordering::Relaxed);
            let start = libc::off64_t::try_from(k * chunk_size).unwrap_or(libc::off64_t::MAX);
            let len = libc::off64_t::try_from(chunk_size).unwrap_or(libc::off64_t::MAX);
            // SAFETY: plain syscall on an fd we own. Best effort: durability comes from the commit's fsync.
            let rc = unsafe { libc::sync_file_range(open.as_raw_fd(), start, len, libc::SYNC_FILE_RANGE_WRITE) };
            if rc != 0 {
                log::debug!("dump follower: sync_file_range: {}", io::Error::last_os_error());
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;
    use std::time::Instant;

    use super::*;
    use crate::digest::{hash_files, hash_files_known, Job};

    const CHUNK: u64 = 64 << 10;
    const ALGORITHM: Algorithm = Algorithm::Blake3 { chunk_size: CHUNK };

    use crate::digest::test_bytes as data;

    /// Appends `bytes` to `path` in uneven pieces, pausing between them as a dump does.
    fn append_slowly(path: &Path, bytes: &[u8]) {
        let mut f = fs::OpenOptions::new().create(true).append(true).open(path).unwrap();
        let steps = [1, CHUNK as usize - 1, 3 * CHUNK as usize / 2, 7, 2 * CHUNK as usize + 5, 4096];
        let mut at = 0;
        for step in steps.iter().cycle() {
            if at >= bytes.len() {
                break;
            }
            let end = (at + step).min(bytes.len());
            f.write_all(&bytes[at..end]).unwrap();
            at = end;
            std::thread::sleep(Duration::from_millis(3));
        }
    }

    /// Waits until `follower` has hashed `units` chunks in all (or 10 s passed).
    fn wait_for(follower: &Follower, units: u64) {
        let started = Instant::now();
        while follower.hashed_units() < units && started.elapsed() < Duration::from_secs(10) {
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    #[test]
    fn a_followed_dump_gives_the_digests_of_hashing_from_scratch() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        fs::create_dir_all(dir.join("checkpoint/pre-1")).unwrap();
        // Sizes around chunk boundaries, in the partial dir, CRIU's images dir and a pre-dump round.
        let files: Vec<(PathBuf, Vec<u8>)> = [
            ("rootfs-diff.tar", 0),
            ("checkpoint/pages-1.img", 9 * CHUNK + 17),
            ("checkpoint/pages-2.img", 4 * CHUNK),
            ("checkpoint/pages-3.img", 2 * CHUNK + 1),
            ("checkpoint/core-1.img", CHUNK + 1),
            ("checkpoint/inventory.img", CHUNK - 1),
            ("checkpoint/pre-1/pages-1.img", 3 * CHUNK),
        ]
        .iter()
        .enumerate()
        .map(|(i, (rel, len))| (dir.join(rel), data(i as u64, *len)))
        .collect();
        // A file truncated and written anew while followed: its old digests must go.
        let rewritten = dir.join("checkpoint/pages-4.img");
        fs::write(&rewritten, data(99, 6 * CHUNK)).unwrap();

        let follower = Follower::start(dir, ALGORITHM);
        wait_for(&follower, 5);
        std::thread::scope(|s| {
            for (path, bytes) in &files {
                s.spawn(move || append_slowly(path, bytes));
            }
            s.spawn(|| {
                fs::write(&rewritten, b"").unwrap();
                append_slowly(&rewritten, &data(100, 3 * CHUNK + 2));
            });
        });
        let followable = |len: u64| len.saturating_sub(1) / CHUNK;
        // The rewritten file: 5 chunks before, 3 after.
        let total: u64 = files.iter().map(|(_, b)| followable(b.len() as u64)).sum::<u64>() + 5 + 3;
        wait_for(&follower, total);
        let prehashed = follower.finish();

        let mut paths: Vec<PathBuf> = files.iter().map(|(p, _)| p.clone()).collect();
        paths.push(rewritten.clone());
        let jobs: Vec<Job> = paths.iter().map(|p| Job { path: p.clone(), size: None }).collect();
        let scratch = hash_files(&jobs, ALGORITHM, false, 1).unwrap();
        for (path, hashed) in paths.iter().zip(&scratch) {
            let known = prehashed.get(path).map_or(&[][..], |k| &k.units[..]);
            assert_eq!(known.len() as u64, followable(hashed.size), "{}: every final chunk followed", path.display());
            assert_eq!(known, &hashed.units[..known.len()], "{}", path.display());
        }
        let known: Vec<_> = paths.iter().map(|p| prehashed.get(p)).collect();
        assert_eq!(hash_files_known(&jobs, &known, ALGORITHM, true, 2).unwrap(), scratch);
    }

    #[test]
    fn a_follower_stops_when_dropped_or_finished_and_skips_format_1() {
        let tmp = tempfile::tempdir().unwrap();
        fs::write(tmp.path().join("pages-1.img"), data(1, 40 * CHUNK)).unwrap();
        let follower = Follower::start(tmp.path(), ALGORITHM);
        wait_for(&follower, 39);
        let stop = follower.stop.clone();
        // Its directory removed under it (a failed checkpoint), then dropped: the thread ends.
        fs::remove_dir_all(tmp.path()).unwrap();
        std::thread::sleep(INTERVAL * 2);
        drop(follower);
        assert_eq!(Arc::strong_count(&stop), 1, "the follower's thread has ended");

        let tmp = tempfile::tempdir().unwrap();
        fs::write(tmp.path().join("pages-1.img"), data(1, 40 * CHUNK)).unwrap();
        let follower = Follower::start(tmp.path(), Algorithm::Sha256);
        assert!(follower.thread.is_none());
        std::thread::sleep(INTERVAL * 2);
        assert_eq!((follower.hashed_units(), follower.finish().units()), (0, 0));
    }
}
