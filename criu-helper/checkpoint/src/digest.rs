//! Checkpoint file digests, hashed in parallel on every core with bounded memory.
//!
//! Format 2 hashes each file with BLAKE3 in fixed-size chunks ([`CHUNK_SIZE`], a power of two):
//! every chunk is a complete subtree of BLAKE3's own tree, so chunks of one big `pages-*.img`
//! are hashed on different threads, a changed chunk is named by its byte range, and the chunks'
//! chaining values merge into the file's ordinary BLAKE3 hash (what `b3sum` prints). Format 1
//! (one SHA-256 per file) is still read: its files are hashed in parallel, each on one thread.
//!
//! Work is a flat list of (file, chunk) items taken by `threads` workers from one atomic counter;
//! each worker owns one [`READ_BUF`] buffer and reads with `pread`, so memory is
//! `threads × READ_BUF` whatever the file sizes, and a file is opened only while it is read.
//! Leading chunks already hashed while CRIU wrote them ([`Known`], from `follow`) are taken as
//! they are when they still hold for the file at commit, and only the rest is read.

use std::fs::File;
use std::io;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Mutex, OnceLock};

use blake3::hazmat::{left_subtree_len, merge_subtrees_non_root, merge_subtrees_root, HasherExt, Mode};
use sha2::{Digest as _, Sha256};

use crate::manifest::{DigestParams, FileEntry};

/// The algorithm format-2 manifests name.
pub const BLAKE3: &str = "blake3";
/// Bytes per chunk in format 2: large enough that the per-chunk work dwarfs scheduling and the
/// manifest stays small (128 digests per GiB), small enough to spread a 1 GiB image over 128
/// threads. A power of two, as BLAKE3's subtrees must be.
pub const CHUNK_SIZE: u64 = 8 << 20;
/// Bytes each worker reads at a time; BLAKE3 needs only a few KiB per call for its SIMD lanes.
pub const READ_BUF: usize = 1 << 20;
/// The most hashing threads: beyond this the disk, not the CPU, is the limit, and memory stays
/// bounded (16 MiB of buffers).
pub const MAX_THREADS: usize = 16;
/// Smallest and largest chunk size a manifest may name (a forged one must not make us allocate
/// or loop absurdly).
const MIN_CHUNK: u64 = 64 << 10;
const MAX_CHUNK: u64 = 1 << 30;

/// One digest: a SHA-256 or BLAKE3 hash, or a BLAKE3 chaining value.
pub type Digest32 = [u8; 32];

/// How the files are hashed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Algorithm {
    /// Format 1: SHA-256 of the whole file.
    Sha256,
    /// Format 2: BLAKE3, one chaining value per `chunk_size` bytes (files of at most one chunk:
    /// just the hash).
    Blake3 { chunk_size: u64 },
}

impl Algorithm {
    /// What new checkpoints use.
    pub fn current() -> Self {
        Self::Blake3 { chunk_size: CHUNK_SIZE }
    }

    /// A format-2 manifest's parameters, checked: the algorithm we know, a power-of-two chunk size
    /// within bounds.
    pub fn from_params(params: &DigestParams) -> Result<Self, String> {
        if params.algorithm != BLAKE3 {
            return Err(format!("digest algorithm {:?} is not {BLAKE3:?}", params.algorithm));
        }
        let c = params.chunk_size;
        if !c.is_power_of_two() || !(MIN_CHUNK..=MAX_CHUNK).contains(&c) {
            return Err(format!("digest chunk_size {c} is not a power of two from {MIN_CHUNK} to {MAX_CHUNK}"));
        }
        Ok(Self::Blake3 { chunk_size: c })
    }

    /// The manifest's record of this algorithm (none for format 1).
    pub fn params(self) -> Option<DigestParams> {
        match self {
            Self::Sha256 => None,
            Self::Blake3 { chunk_size } => Some(DigestParams { algorithm: BLAKE3.into(), chunk_size }),
        }
    }

    /// How many work items a file of `size` bytes is: its chunks (format 2), or 1.
    pub fn units(self, size: u64) -> u64 {
        match self {
            Self::Blake3 { chunk_size } if size > chunk_size => size.div_ceil(chunk_size),
            _ => 1,
        }
    }

    /// The byte range of unit `index` of a file of `size` bytes.
    pub fn range(self, size: u64, index: u64) -> (u64, u64) {
        match self {
            Self::Blake3 { chunk_size } if size > chunk_size => {
                let start = index * chunk_size;
                (start, size.min(start + chunk_size))
            }
            _ => (0, size),
        }
    }
}

/// The number of hashing threads for `units` work items on this machine.
pub fn default_threads() -> usize {
    std::thread::available_parallelism().map_or(1, usize::from).clamp(1, MAX_THREADS)
}

/// A file to hash. `size`: the size it must have (verification: the manifest's), or None to take
/// it from the file (commit).
#[derive(Debug, Clone)]
pub struct Job {
    pub path: PathBuf,
    pub size: Option<u64>,
}

/// Leading units of a file hashed before its commit (by the dump follower, `follow`): valid only
/// for the same inode (`dev`, `ino`) and while the file is still longer than these units, so that
/// each was a full chunk of a multi-chunk file when it was hashed and still is.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Known {
    pub dev: u64,
    pub ino: u64,
    /// Digests of units `0..units.len()`.
    pub units: Vec<Digest32>,
}

impl Known {
    /// How many of these units hold for the file (`dev`, `ino`) of `size` bytes: all of them, or
    /// none (another inode, a file no longer past the last of them, or format 1, never followed).
    /// Always fewer than the file's units: the last one is hashed at commit.
    pub fn usable(&self, algorithm: Algorithm, dev: u64, ino: u64, size: u64) -> usize {
        match algorithm {
            Algorithm::Blake3 { chunk_size }
                if (self.dev, self.ino) == (dev, ino) && size > self.units.len() as u64 * chunk_size =>
            {
                self.units.len()
            }
            _ => 0,
        }
    }
}

/// The digests of one file: its size and one digest per unit, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hashed {
    pub size: u64,
    pub units: Vec<Digest32>,
}

/// Why hashing stopped: the file and the error.
#[derive(Debug)]
pub struct HashError {
    pub path: PathBuf,
    pub source: io::Error,
}

/// Hashes every job's file with `algorithm` on `threads` threads; `sync` fsyncs each file once
/// its last unit is hashed (by the thread that hashed it, while the others go on hashing).
/// Results are in job order. A file whose size is not the expected one, or changes while it is
/// read, is an error.
pub fn hash_files(jobs: &[Job], algorithm: Algorithm, sync: bool, threads: usize) -> Result<Vec<Hashed>, HashError> {
    hash_files_known(jobs, &[], algorithm, sync, threads)
}

/// [`hash_files`], taking `known[j]` (when present and [`Known::usable`] for job `j`'s file as it
/// is now) as the digests of job `j`'s leading units and hashing only the rest. The results are
/// those of hashing everything; each file is still fsynced after its last unit, which is never
/// known.
pub fn hash_files_known(
    jobs: &[Job],
    known: &[Option<&Known>],
    algorithm: Algorithm,
    sync: bool,
    threads: usize,
) -> Result<Vec<Hashed>, HashError> {
    // Sizes first (one stat each), so that the work can be laid out in chunks.
    let mut sizes = Vec::with_capacity(jobs.len());
    let mut skips = Vec::with_capacity(jobs.len());
    for (j, job) in jobs.iter().enumerate() {
        let meta = std::fs::metadata(&job.path).map_err(|source| HashError { path: job.path.clone(), source })?;
        let found = meta.len();
        if let Some(want) = job.size.filter(|want| *want != found) {
            let source = io::Error::new(io::ErrorKind::InvalidData, format!("size is {found} bytes, expected {want}"));
            return Err(HashError { path: job.path.clone(), source });
        }
        let usable = known.get(j).copied().flatten().map_or(0, |k| k.usable(algorithm, meta.dev(), meta.ino(), found));
        sizes.push(found);
        skips.push(usable as u64);
    }
    // The work items, biggest files' chunks interleaved with small files in job order; each
    // item is (job, unit). A file's last unit is never known (a followed unit was followed by
    // more bytes), so every file has work left, and its fsync and final size check follow it.
    let work = |j: usize| skips[j]..algorithm.units(sizes[j]);
    let items: Vec<(usize, u64)> = (0..jobs.len()).flat_map(|j| work(j).map(move |u| (j, u))).collect();
    let slots: Vec<Vec<OnceLock<Digest32>>> =
        sizes.iter().map(|&s| (0..algorithm.units(s)).map(|_| OnceLock::new()).collect()).collect();
    for (j, slot) in slots.iter().enumerate() {
        if let Some(k) = known.get(j).copied().flatten() {
            for (cell, digest) in slot.iter().zip(&k.units).take(skips[j] as usize) {
                let _ = cell.set(*digest);
            }
        }
    }
    let remaining: Vec<AtomicUsize> = (0..jobs.len()).map(|j| AtomicUsize::new(work(j).count())).collect();
    let next = AtomicUsize::new(0);
    let failed = AtomicBool::new(false);
    let error: Mutex<Option<HashError>> = Mutex::new(None);
    let threads = threads.clamp(1, MAX_THREADS).min(items.len().max(1));

    let worker = || {
        let mut buf = vec![0u8; READ_BUF];
        loop {
            let i = next.fetch_add(1, Ordering::Relaxed);
            let Some(&(j, unit)) = items.get(i) else { break };
            if failed.load(Ordering::Relaxed) {
                break;
            }
            let job = &jobs[j];
            let done = hash_unit(&job.path, sizes[j], algorithm, unit, &mut buf).and_then(|digest| {
                let _ = slots[j][unit as usize].set(digest);
                if remaining[j].fetch_sub(1, Ordering::AcqRel) == 1 && sync {
                    File::open(&job.path)?.sync_all()?;
                }
                Ok(())
            });
            if let Err(source) = done {
                failed.store(true, Ordering::Relaxed);
                let mut slot = error.lock().unwrap_or_else(|e| e.into_inner());
                slot.get_or_insert(HashError { path: job.path.clone(), source });
                break;
            }
        }
    };
    if threads == 1 {
        worker();
    } else {
        std::thread::scope(|s| {
            for _ in 0..threads {
                s.spawn(worker);
            }
        });
    }
    if let Some(e) = error.into_inner().unwrap_or_else(|e| e.into_inner()) {
        return Err(e);
    }
    let hashed = sizes
        .into_iter()
        .zip(slots)
        .map(|(size, units)| Hashed {
            size,
            units: units.into_iter().map(|u| u.into_inner().unwrap_or_default()).collect(),
        })
        .collect();
    Ok(hashed)
}

/// The digest of unit `unit` of the file at `path` (`size` bytes): read with `pread` through `buf`.
fn hash_unit(path: &Path, size: u64, algorithm: Algorithm, unit: u64, buf: &mut [u8]) -> io::Result<Digest32> {
    let file = File::open(path)?;
    let digest = hash_open_unit(&file, size, algorithm, unit, buf)?;
    // The last unit also checks that nothing was appended while we read.
    if algorithm.range(size, unit).1 == size {
        check_size(&file, size)?;
    }
    Ok(digest)
}

/// The file still has the `size` it had when its hashing began.
fn check_size(file: &File, size: u64) -> io::Result<()> {
    let now = file.metadata()?.len();
    if now != size {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("changed while it was hashed: {size} bytes when hashing began, {now} now"),
        ));
    }
    Ok(())
}

/// The digest of unit `unit` of the open `file`, taken as `size` bytes long (the dump follower
/// passes the size it saw, which a growing file has at least).
pub(crate) fn hash_open_unit(
    file: &File,
    size: u64,
    algorithm: Algorithm,
    unit: u64,
    buf: &mut [u8],
) -> io::Result<Digest32> {
    let (start, end) = algorithm.range(size, unit);
    let mut feed = |update: &mut dyn FnMut(&[u8])| -> io::Result<()> {
        let mut at = start;
        while at < end {
            let n = usize::try_from(end - at).unwrap_or(usize::MAX).min(buf.len());
            file.read_exact_at(&mut buf[..n], at).map_err(|e| changed(e, size))?;
            update(&buf[..n]);
            at += n as u64;
        }
        Ok(())
    };
    let digest = match algorithm {
        Algorithm::Sha256 => {
            let mut h = Sha256::new();
            feed(&mut |b| h.update(b))?;
            h.finalize().into()
        }
        Algorithm::Blake3 { chunk_size } if size > chunk_size => {
            let mut h = blake3::Hasher::new();
            h.set_input_offset(start);
            feed(&mut |b| {
                h.update(b);
            })?;
            h.finalize_non_root()
        }
        Algorithm::Blake3 { .. } => {
            let mut h = blake3::Hasher::new();
            feed(&mut |b| {
                h.update(b);
            })?;
            *h.finalize().as_bytes()
        }
    };
    Ok(digest)
}

fn changed(e: io::Error, size: u64) -> io::Error {
    if e.kind() == io::ErrorKind::UnexpectedEof {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("shorter than its {size} bytes: it changed while it was hashed"),
        )
    } else {
        e
    }
}

/// The whole-file BLAKE3 hash from a multi-chunk file's chunk chaining values (`chunk_size` bytes
/// each, the last maybe short; `size` > `chunk_size`), merged along BLAKE3's tree: the left
/// subtree of `n` bytes is the largest power of two below `n`, always a whole number of chunks.
pub fn blake3_root(cvs: &[Digest32], size: u64, chunk_size: u64) -> Digest32 {
    fn merge(cvs: &[Digest32], len: u64, chunk_size: u64, root: bool) -> Digest32 {
        if cvs.len() <= 1 {
            return cvs.first().copied().unwrap_or_default();
        }
        let left_len = left_subtree_len(len);
        let split = usize::try_from(left_len / chunk_size).unwrap_or(usize::MAX).min(cvs.len());
        let left = merge(&cvs[..split], left_len, chunk_size, false);
        let right = merge(&cvs[split..], len - left_len, chunk_size, false);
        if root {
            *merge_subtrees_root(&left, &right, Mode::Hash).as_bytes()
        } else {
            merge_subtrees_non_root(&left, &right, Mode::Hash)
        }
    }
    merge(cvs, size, chunk_size, true)
}

/// The manifest entry of a hashed file.
pub fn entry(algorithm: Algorithm, hashed: &Hashed) -> FileEntry {
    match algorithm {
        Algorithm::Sha256 => {
            FileEntry { size: hashed.size, sha256: hashed.units.first().map(hex), ..Default::default() }
        }
        Algorithm::Blake3 { chunk_size } => {
            let (whole, chunks) = if hashed.size > chunk_size {
                (blake3_root(&hashed.units, hashed.size, chunk_size), hashed.units.iter().map(hex).collect())
            } else {
                (hashed.units.first().copied().unwrap_or_default(), Vec::new())
            };
            FileEntry { size: hashed.size, blake3: Some(hex(&whole)), chunks, ..Default::default() }
        }
    }
}

/// Hashes one file as new checkpoints do (for tests and tools that edit a checkpoint on purpose).
pub fn hash_entry(path: &Path) -> io::Result<FileEntry> {
    let job = Job { path: path.to_path_buf(), size: None };
    let algorithm = Algorithm::current();
    let hashed = hash_files(&[job], algorithm, false, default_threads()).map_err(|e| e.source)?;
    Ok(entry(algorithm, &hashed[0]))
}

/// Lowercase hex.
pub fn hex(d: &Digest32) -> String {
    d.iter().map(|b| format!("{b:02x}")).collect()
}

/// A 64-digit hex digest (either case), or None.
pub fn parse_hex(s: &str) -> Option<Digest32> {
    if s.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, pair) in s.as_bytes().chunks(2).enumerate() {
        let text = std::str::from_utf8(pair).ok()?;
        out[i] = u8::from_str_radix(text, 16).ok()?;
    }
    Some(out)
}

/// Deterministic test bytes (xorshift from `seed`) that differ every few bytes, so that a wrong
/// offset or order shows in a digest; for this module's and the follower's tests.
#[cfg(test)]
pub(crate) fn test_bytes(seed: u64, len: u64) -> Vec<u8> {
    let mut x = 0x9e37_79b9_7f4a_7c15u64 ^ seed;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(len: usize) -> Vec<u8> {
        test_bytes(0, len as u64)
    }

    #[test]
    fn chunked_blake3_is_the_files_ordinary_blake3_whatever_the_threads() {
        let tmp = tempfile::tempdir().unwrap();
        let chunk = MIN_CHUNK;
        let algorithm = Algorithm::Blake3 { chunk_size: chunk };
        // Around every boundary that changes the tree's shape: one chunk, just over, powers of two.
        let sizes =
            [0, 1, 1024, chunk - 1, chunk, chunk + 1, 2 * chunk, 3 * chunk - 7, 4 * chunk, 5 * chunk + 1, 9 * chunk];
        let mut jobs = Vec::new();
        for (i, &size) in sizes.iter().enumerate() {
            let path = tmp.path().join(format!("f{i}"));
            std::fs::write(&path, data(size as usize)).unwrap();
            jobs.push(Job { path, size: Some(size) });
        }
        let one = hash_files(&jobs, algorithm, false, 1).unwrap();
        for threads in [2, 3, 8] {
            assert_eq!(hash_files(&jobs, algorithm, true, threads).unwrap(), one, "{threads} threads");
        }
        for (hashed, &size) in one.iter().zip(&sizes) {
            let e = entry(algorithm, hashed);
            let want = blake3::hash(&data(size as usize));
            assert_eq!(e.blake3.as_deref(), Some(want.to_hex().as_str()), "{size} bytes");
            assert_eq!(e.chunks.len() as u64, if size > chunk { size.div_ceil(chunk) } else { 0 }, "{size} bytes");
            assert_eq!(e.size, size);
        }
    }

    #[test]
    fn known_units_are_taken_only_where_they_still_hold() {
        let tmp = tempfile::tempdir().unwrap();
        let c = MIN_CHUNK;
        let algorithm = Algorithm::Blake3 { chunk_size: c };
        for size in [0, 1, c - 1, c, c + 1, 2 * c, 2 * c + 1, 5 * c - 3] {
            let path = tmp.path().join(format!("f{size}"));
            std::fs::write(&path, data(size as usize)).unwrap();
            let meta = std::fs::metadata(&path).unwrap();
            let jobs = [Job { path, size: None }];
            let scratch = hash_files(&jobs, algorithm, false, 1).unwrap();
            let with = |known: &Known| hash_files_known(&jobs, &[Some(known)], algorithm, true, 2).unwrap();
            // Every prefix a follower could have hashed (the file strictly longer than it) is
            // taken: poisoned digests show that it was, the true ones give the scratch result.
            let followable = size.saturating_sub(1) / c;
            for n in 0..=followable as usize {
                let true_units = Known { dev: meta.dev(), ino: meta.ino(), units: scratch[0].units[..n].to_vec() };
                assert_eq!(with(&true_units), scratch, "{size} bytes, {n} known");
                let poisoned = Known { units: vec![[7; 32]; n], ..true_units };
                assert_eq!(with(&poisoned).first().map(|h| h.units[..n].to_vec()), Some(vec![[7; 32]; n]));
            }
            // Too many units for the size (no longer strictly longer), or another inode: all are
            // discarded and the file is hashed from scratch.
            let ino = meta.ino();
            for known in [
                Known { dev: meta.dev(), ino, units: vec![[7; 32]; followable as usize + 1] },
                Known { dev: meta.dev(), ino: ino + 1, units: vec![[7; 32]; followable as usize] },
                Known { dev: meta.dev() + 1, ino, units: vec![[7; 32]; followable as usize] },
            ] {
                assert_eq!(with(&known), scratch, "{size} bytes: {known:?} is not taken");
            }
            // Format 1 is never followed.
            let sha = hash_files(&jobs, Algorithm::Sha256, false, 1).unwrap();
            let one = Known { dev: meta.dev(), ino, units: vec![[7; 32]] };
            assert_eq!(hash_files_known(&jobs, &[Some(&one)], Algorithm::Sha256, false, 1).unwrap(), sha);
        }
    }

    #[test]
    fn sha256_units_are_whole_files() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("f");
        let bytes = data(3 * READ_BUF + 5);
        std::fs::write(&path, &bytes).unwrap();
        let hashed = hash_files(&[Job { path, size: None }], Algorithm::Sha256, false, 4).unwrap();
        let e = entry(Algorithm::Sha256, &hashed[0]);
        let want: Digest32 = Sha256::digest(&bytes).into();
        assert_eq!(e.sha256, Some(hex(&want)));
        assert!(e.blake3.is_none() && e.chunks.is_empty());
    }

    #[test]
    fn a_wrong_size_or_missing_file_names_the_file() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("f");
        std::fs::write(&path, b"abc").unwrap();
        let err = hash_files(&[Job { path: path.clone(), size: Some(4) }], Algorithm::current(), false, 2).unwrap_err();
        assert_eq!(err.path, path);
        assert!(err.source.to_string().contains("size is 3 bytes, expected 4"), "{}", err.source);
        let gone = tmp.path().join("gone");
        let err = hash_files(&[Job { path: gone.clone(), size: None }], Algorithm::current(), false, 2).unwrap_err();
        assert_eq!((err.path, err.source.kind()), (gone, io::ErrorKind::NotFound));
    }

    #[test]
    fn params_are_checked() {
        let p = |algorithm: &str, chunk_size| DigestParams { algorithm: algorithm.into(), chunk_size };
        assert_eq!(Algorithm::from_params(&p("blake3", CHUNK_SIZE)), Ok(Algorithm::current()));
        assert_eq!(Algorithm::current().params(), Some(p("blake3", CHUNK_SIZE)));
        assert!(Algorithm::from_params(&p("md5", CHUNK_SIZE)).unwrap_err().contains("\"md5\""));
        for bad in [0, 1000, 3 << 20, 1024, 2 << 30] {
            assert!(Algorithm::from_params(&p("blake3", bad)).is_err(), "{bad}");
        }
        assert_eq!(parse_hex(&hex(&[0xab; 32])), Some([0xab; 32]));
        assert_eq!(parse_hex(&"AB".repeat(32)), Some([0xab; 32]));
        assert_eq!(parse_hex("ab"), None);
        assert_eq!(parse_hex(&"zz".repeat(32)), None);
    }
}
