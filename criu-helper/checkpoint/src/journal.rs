//! The attempt journal: one JSON line per checkpoint and restore attempt, failed ones too, kept
//! in the store (`<root>/.journal/`) for `kybernate metrics`.
//!
//! Every shim of the node appends to the same file. A line is written with one `write` on an
//! `O_APPEND` descriptor, under an `flock` on the journal's lock file, so that lines of
//! concurrent shims never interleave and a rotation never loses one. The file is bounded: past
//! [`MAX_BYTES`] it becomes `attempts.jsonl.1`, and the attempts of the `.1` it replaces are
//! first added to `totals.json`, so that counters computed from the journal never go back.
//! Recording never fails a checkpoint or a restore: [`record`] logs its own errors.
//!
//! The journal directory is hidden, so the store's listing and `resolve` never take it for a
//! namespace; it and its files are root-only (attempts name containers and pods).

use std::collections::BTreeMap;
use std::fs::{self, DirBuilder, File, OpenOptions};
use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use nix::fcntl::{Flock, FlockArg};
use serde::{Deserialize, Serialize};

use crate::fsutil::{write_atomic, Durability};

/// The journal's directory under the store root (hidden: never a namespace).
pub const JOURNAL_DIR: &str = ".journal";
/// The file being appended to.
pub const JOURNAL_FILE: &str = "attempts.jsonl";
/// The previous file, after a rotation.
pub const ROTATED_FILE: &str = "attempts.jsonl.1";
/// What the attempts of rotated-out files added up to.
pub const TOTALS_FILE: &str = "totals.json";
const LOCK_FILE: &str = "lock";
/// Size past which the journal is rotated: about 5,000 attempts per file.
pub const MAX_BYTES: u64 = 4 << 20;
/// Longest error message kept in a line (a line stays one small write).
const MAX_ERROR_CHARS: usize = 512;
/// Most bytes read from one journal file (a file is only ever a line past [`MAX_BYTES`]).
const MAX_READ_BYTES: u64 = 4 * MAX_BYTES;

/// Upper bounds (seconds) of the checkpoint and restore duration histograms: a small container
/// takes a fraction of a second, a GPU job's host memory minutes.
pub const DURATION_BUCKETS: [f64; 14] =
    [0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1200.0, 3600.0];
/// Upper bounds (seconds) of the frozen-time histogram: what a container's users notice.
pub const FROZEN_BUCKETS: [f64; 15] =
    [0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0];

/// Checkpoint or restore.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    Checkpoint,
    Restore,
}

/// How an attempt ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Outcome {
    Ok,
    Error,
}

/// One line of the journal.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Attempt {
    pub kind: Kind,
    pub result: Outcome,
    /// A short, stable name of what failed (`criu`, `verify`, `store`, …), for a metric label.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error_class: Option<String>,
    /// The error message, cut to [`MAX_ERROR_CHARS`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// RFC 3339 UTC, milliseconds.
    pub started: String,
    pub duration_ms: u64,
    /// containerd namespace.
    pub namespace: String,
    pub container: String,
    /// `<namespace>/<name>` of the Kubernetes pod, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod: Option<String>,
    /// The checkpoint's id in the store, else its directory.
    #[serde(default)]
    pub checkpoint: String,
    /// Milliseconds per phase (`freeze`, `dump`, `rootfs_diff`, `commit`, `verify`, `restore`, `gpu_*`).
    #[serde(default)]
    pub phases_ms: BTreeMap<String, u64>,
    /// Bytes of the checkpoint written (checkpoint) or read (restore).
    #[serde(default)]
    pub bytes: u64,
    /// Bytes of GPU device memory in it.
    #[serde(default)]
    pub gpu_bytes: u64,
    /// How long the container was frozen: freeze to thaw, or to the kill of `exit`. Absent when
    /// it was not frozen by the checkpoint (paused by the client, or failed before the freeze).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub frozen_ms: Option<u64>,
    /// CRIU's own freezing plus frozen time of the dump (its `stats-dump`, see `criu_stats`): the
    /// share of `frozen_ms` a raw `runc checkpoint` would have cost too. Absent when CRIU wrote none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub criu_frozen_ms: Option<u64>,
    /// A checkpoint that stops the container.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub exit: bool,
}

impl Attempt {
    /// A successful attempt of `kind` with `clock`'s times; the caller fills in the rest.
    pub fn new(kind: Kind, clock: &Clock) -> Self {
        Self {
            kind,
            result: Outcome::Ok,
            error_class: None,
            error: None,
            started: rfc3339_millis(clock.started),
            duration_ms: millis(clock.t0.elapsed()),
            namespace: String::new(),
            container: String::new(),
            pod: None,
            checkpoint: String::new(),
            phases_ms: clock.phases.clone(),
            bytes: 0,
            gpu_bytes: 0,
            frozen_ms: clock.frozen().map(millis),
            criu_frozen_ms: None,
            exit: false,
        }
    }

    /// Marks it failed with `class` and `message` (cut short).
    pub fn failed(&mut self, class: &str, message: &str) {
        self.result = Outcome::Error;
        self.error_class = Some(class.to_string());
        let mut msg: String = message.chars().take(MAX_ERROR_CHARS).collect();
        if msg.len() < message.len() {
            msg.push('…');
        }
        self.error = Some(msg);
    }
}

/// The times of one attempt as it runs: its start, its phases, and how long it kept the container frozen.
#[derive(Debug, Clone)]
pub struct Clock {
    started: SystemTime,
    t0: Instant,
    phases: BTreeMap<String, u64>,
    frozen: Duration,
    frozen_since: Option<Instant>,
    froze: bool,
}

impl Default for Clock {
    fn default() -> Self {
        Self::start()
    }
}

impl Clock {
    pub fn start() -> Self {
        Self {
            started: SystemTime::now(),
            t0: Instant::now(),
            phases: BTreeMap::new(),
            frozen: Duration::ZERO,
            frozen_since: None,
            froze: false,
        }
    }

    /// Runs `f` as phase `name` (a phase run twice adds up).
    pub fn phase<T>(&mut self, name: &str, f: impl FnOnce() -> T) -> T {
        let t = Instant::now();
        let r = f();
        self.add_phase(name, t.elapsed());
        r
    }

    pub fn add_phase(&mut self, name: &str, d: Duration) {
        *self.phases.entry(name.to_string()).or_default() += millis(d);
    }

    /// The container is frozen from now (no-op while it is).
    pub fn freeze(&mut self) {
        if self.frozen_since.is_none() {
            self.frozen_since = Some(Instant::now());
            self.froze = true;
        }
    }

    /// The container runs again, or is dead (no-op while it is not frozen).
    pub fn thaw(&mut self) {
        if let Some(since) = self.frozen_since.take() {
            self.frozen += since.elapsed();
        }
    }

    /// Time frozen so far (still counting while frozen); `None` if never frozen.
    pub fn frozen(&self) -> Option<Duration> {
        self.froze.then(|| self.frozen + self.frozen_since.map_or(Duration::ZERO, |s| s.elapsed()))
    }
}

#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    #[error("journal {}: {context}: {source}", path.display())]
    Io {
        context: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("journal: encode attempt: {0}")]
    Encode(#[from] serde_json::Error),
}

fn io_err<'p>(context: &'static str, path: &'p Path) -> impl FnOnce(io::Error) -> JournalError + 'p {
    move |source| JournalError::Io { context, path: path.to_path_buf(), source }
}

/// Appends `attempt` to the journal of the store at `root`; an error is logged, never returned:
/// the attempt itself succeeded or failed on its own.
pub fn record(root: &Path, attempt: &Attempt) {
    if let Err(e) = Journal::in_store(root).append(attempt) {
        log::warn!("{e} (the {:?} of {} is not in the metrics)", attempt.kind, attempt.container);
    }
}

/// The journal of one store.
#[derive(Debug, Clone)]
pub struct Journal {
    dir: PathBuf,
    max_bytes: u64,
}

impl Journal {
    pub fn in_store(root: &Path) -> Self {
        Self { dir: root.join(JOURNAL_DIR), max_bytes: MAX_BYTES }
    }

    /// A journal rotated past `max_bytes` instead of [`MAX_BYTES`] (tests).
    pub fn with_max_bytes(mut self, max_bytes: u64) -> Self {
        self.max_bytes = max_bytes;
        self
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Appends one line: rotates first when it would pass the size bound.
    pub fn append(&self, attempt: &Attempt) -> Result<(), JournalError> {
        let mut line = serde_json::to_vec(attempt)?;
        line.push(b'\n');
        if !self.dir.is_dir() {
            DirBuilder::new().recursive(true).mode(0o700).create(&self.dir).map_err(io_err("create", &self.dir))?;
        }
        let _lock = self.lock(true)?;
        let path = self.dir.join(JOURNAL_FILE);
        let size = fs::metadata(&path).map_or(0, |m| m.len());
        if size > 0 && size + line.len() as u64 > self.max_bytes {
            self.rotate()?;
        }
        let mut f = OpenOptions::new()
            .append(true)
            .create(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(&path)
            .map_err(io_err("open", &path))?;
        // One write of the whole line: O_APPEND puts it at the end as one piece.
        f.write_all(&line).map_err(io_err("append", &path))
    }

    /// Holds the journal's lock until dropped. A reader (`create` false) opens the lock file
    /// read-only, so that it can read a store mounted read-only; `None` when there is none yet
    /// (nothing was ever appended).
    fn lock(&self, create: bool) -> Result<Option<Flock<File>>, JournalError> {
        let path = self.dir.join(LOCK_FILE);
        let f = OpenOptions::new()
            .create(create)
            .truncate(false)
            .read(true)
            .write(create)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(&path);
        let f = match f {
            Err(e) if !create && e.kind() == io::ErrorKind::NotFound => return Ok(None),
            f => f.map_err(io_err("open", &path))?,
        };
        Flock::lock(f, FlockArg::LockExclusive).map(Some).map_err(|(_, errno)| JournalError::Io {
            context: "lock",
            path,
            source: errno.into(),
        })
    }

    /// The current file becomes the rotated one; the attempts of the rotated one it replaces go
    /// into the totals first. `folded` marks that file, so that a crash between the two steps
    /// neither loses nor double-counts it.
    fn rotate(&self) -> Result<(), JournalError> {
        let old = self.dir.join(ROTATED_FILE);
        let mut totals = self.read_totals()?;
        if let Ok(meta) = fs::symlink_metadata(&old) {
            if totals.folded != Some(meta.ino()) {
                let (attempts, skipped) = read_lines(&old)?;
                attempts.iter().for_each(|a| totals.add(a));
                totals.skipped_lines += skipped;
                totals.folded = Some(meta.ino());
                self.write_totals(&totals)?;
            }
        }
        let cur = self.dir.join(JOURNAL_FILE);
        fs::rename(&cur, &old).map_err(io_err("rotate", &cur))?;
        // The folded file is gone: its inode number may come back for a new file.
        if totals.folded.take().is_some() {
            self.write_totals(&totals)?;
        }
        Ok(())
    }

    fn read_totals(&self) -> Result<Totals, JournalError> {
        let path = self.dir.join(TOTALS_FILE);
        match fs::read(&path) {
            // A totals file that does not parse (hand-edited, older layout) counts as a fresh start.
            Ok(bytes) => Ok(serde_json::from_slice(&bytes).unwrap_or_else(|e| {
                log::warn!("{}: unreadable ({e}): counting from zero", path.display());
                Totals::default()
            })),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(Totals::default()),
            Err(e) => Err(io_err("read", &path)(e)),
        }
    }

    fn write_totals(&self, totals: &Totals) -> Result<(), JournalError> {
        let path = self.dir.join(TOTALS_FILE);
        let bytes = serde_json::to_vec_pretty(totals)?;
        write_atomic(&path, &bytes, 0o600, Durability::Machine).map_err(io_err("write", &path))
    }

    /// Everything the journal holds, added up: the totals of rotated-out files, then the
    /// rotated file (unless already in the totals) and the current one. Lines that do not parse
    /// are skipped and counted; a last line still being written is ignored. A missing journal
    /// is an empty one.
    pub fn totals(&self) -> Result<Totals, JournalError> {
        if !self.dir.is_dir() {
            return Ok(Totals::default());
        }
        // Under the lock: a rotation between reading the totals and the files would hide a file.
        let _lock = self.lock(false)?;
        let mut totals = self.read_totals()?;
        let old = self.dir.join(ROTATED_FILE);
        for path in [old, self.dir.join(JOURNAL_FILE)] {
            let meta = match fs::symlink_metadata(&path) {
                Ok(m) => m,
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(io_err("stat", &path)(e)),
            };
            if totals.folded == Some(meta.ino()) {
                continue;
            }
            let (attempts, skipped) = match read_lines(&path) {
                Err(JournalError::Io { source, .. }) if source.kind() == io::ErrorKind::NotFound => continue,
                r => r?,
            };
            attempts.iter().for_each(|a| totals.add(a));
            totals.skipped_lines += skipped;
        }
        totals.folded = None;
        Ok(totals)
    }
}

/// The complete lines of `path` that parse, and how many did not.
fn read_lines(path: &Path) -> Result<(Vec<Attempt>, u64), JournalError> {
    let f = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)
        .map_err(io_err("open", path))?;
    let mut r = BufReader::new(f.take(MAX_READ_BYTES));
    let (mut attempts, mut skipped) = (Vec::new(), 0);
    let mut line = Vec::new();
    loop {
        line.clear();
        let n = r.read_until(b'\n', &mut line).map_err(io_err("read", path))?;
        if n == 0 || line.last() != Some(&b'\n') {
            break; // the end, or a line still being written
        }
        match serde_json::from_slice::<Attempt>(&line) {
            Ok(a) => attempts.push(a),
            Err(_) if line.iter().all(u8::is_ascii_whitespace) => {}
            Err(_) => skipped += 1,
        }
    }
    Ok((attempts, skipped))
}

/// A histogram over fixed bounds: counts per bucket (not cumulative; the last is +Inf), sum, count.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Histogram {
    pub buckets: Vec<u64>,
    pub sum: f64,
    pub count: u64,
}

impl Histogram {
    fn observe(&mut self, bounds: &[f64], value: f64) {
        if self.buckets.len() != bounds.len() + 1 {
            // Other bounds (an older totals file): keep count and sum, restart the buckets.
            self.buckets = vec![0; bounds.len() + 1];
        }
        let i = bounds.iter().position(|b| value <= *b).unwrap_or(bounds.len());
        self.buckets[i] += 1;
        self.sum += value;
        self.count += 1;
    }

    /// Cumulative counts per bound of `bounds`, then +Inf (= `count`), as Prometheus wants them.
    pub fn cumulative(&self, bounds: &[f64]) -> Vec<u64> {
        let mut acc = 0;
        let mut out: Vec<u64> = (0..bounds.len())
            .map(|i| {
                acc += self.buckets.get(i).copied().unwrap_or(0);
                acc
            })
            .collect();
        out.push(self.count);
        out
    }
}

/// What the attempts of one kind add up to.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct KindTotals {
    pub ok: u64,
    pub error: u64,
    /// Failed attempts per error class.
    pub errors: BTreeMap<String, u64>,
    /// Durations of successful attempts (seconds, [`DURATION_BUCKETS`]).
    pub duration: Histogram,
    /// Frozen time of every attempt that froze the container, failed ones too (seconds, [`FROZEN_BUCKETS`]).
    pub frozen: Histogram,
    /// Seconds spent per phase, every attempt.
    pub phase_seconds: BTreeMap<String, f64>,
    /// Bytes and GPU bytes of successful attempts.
    pub bytes: u64,
    pub gpu_bytes: u64,
    /// Unix time (seconds) of the last successful attempt's end.
    #[serde(default)]
    pub last_success: f64,
}

/// Everything the journal adds up to.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Totals {
    pub checkpoint: KindTotals,
    pub restore: KindTotals,
    /// Journal lines that did not parse.
    pub skipped_lines: u64,
    /// Inode of the rotated file already added in (internal to rotation).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    folded: Option<u64>,
}

impl Totals {
    pub fn add(&mut self, a: &Attempt) {
        let k = match a.kind {
            Kind::Checkpoint => &mut self.checkpoint,
            Kind::Restore => &mut self.restore,
        };
        match a.result {
            Outcome::Ok => {
                k.ok += 1;
                k.duration.observe(&DURATION_BUCKETS, a.duration_ms as f64 / 1000.0);
                k.bytes += a.bytes;
                k.gpu_bytes += a.gpu_bytes;
                if let Ok(at) = humantime::parse_rfc3339_weak(&a.started) {
                    let end =
                        at.duration_since(UNIX_EPOCH).unwrap_or_default().as_secs_f64() + a.duration_ms as f64 / 1000.0;
                    k.last_success = k.last_success.max(end);
                }
            }
            Outcome::Error => {
                k.error += 1;
                *k.errors.entry(a.error_class.clone().unwrap_or_else(|| "unknown".into())).or_default() += 1;
            }
        }
        if let Some(ms) = a.frozen_ms {
            k.frozen.observe(&FROZEN_BUCKETS, ms as f64 / 1000.0);
        }
        for (phase, ms) in &a.phases_ms {
            *k.phase_seconds.entry(phase.clone()).or_default() += *ms as f64 / 1000.0;
        }
    }
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// RFC 3339 UTC with milliseconds; clamped to what humantime can print (it panics outside 1970..=9999).
fn rfc3339_millis(at: SystemTime) -> String {
    let max = UNIX_EPOCH + Duration::from_secs(253_402_300_799);
    humantime::format_rfc3339_millis(at.clamp(UNIX_EPOCH, max)).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn attempt(kind: Kind, ok: bool, ms: u64) -> Attempt {
        let mut a = Attempt::new(kind, &Clock::start());
        a.namespace = "default".into();
        a.container = "c".into();
        a.duration_ms = ms;
        a.bytes = 1000;
        a.frozen_ms = Some(ms / 2);
        if !ok {
            a.failed("criu", "dump failed");
        }
        a
    }

    #[test]
    fn attempts_add_up_and_a_missing_journal_is_empty() {
        let root = tempfile::tempdir().unwrap();
        let j = Journal::in_store(root.path());
        assert_eq!(j.totals().unwrap(), Totals::default());
        j.append(&attempt(Kind::Checkpoint, true, 300)).unwrap();
        j.append(&attempt(Kind::Checkpoint, false, 50)).unwrap();
        j.append(&attempt(Kind::Restore, true, 2000)).unwrap();
        let t = j.totals().unwrap();
        assert_eq!((t.checkpoint.ok, t.checkpoint.error, t.restore.ok), (1, 1, 1));
        assert_eq!(t.checkpoint.errors.get("criu"), Some(&1));
        assert_eq!(t.checkpoint.bytes, 1000, "bytes of successful checkpoints only");
        assert_eq!(t.checkpoint.frozen.count, 2, "a failed checkpoint froze the container too");
        assert_eq!(t.checkpoint.duration.cumulative(&DURATION_BUCKETS)[..3], [0, 0, 1]);
        assert_eq!(t.restore.duration.sum, 2.0);
        assert!(t.checkpoint.last_success > 1.0e9);
        use std::os::unix::fs::PermissionsExt;
        let mode = |p: &Path| fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!((mode(j.dir()), mode(&j.dir().join(JOURNAL_FILE))), (0o700, 0o600));
    }

    #[test]
    fn a_corrupt_line_is_skipped_and_counted_and_a_partial_last_line_ignored() {
        let root = tempfile::tempdir().unwrap();
        let j = Journal::in_store(root.path());
        j.append(&attempt(Kind::Checkpoint, true, 10)).unwrap();
        let path = j.dir().join(JOURNAL_FILE);
        let mut f = OpenOptions::new().append(true).open(&path).unwrap();
        f.write_all(b"{not json\n\n").unwrap();
        drop(f);
        j.append(&attempt(Kind::Checkpoint, true, 10)).unwrap();
        let mut f = OpenOptions::new().append(true).open(&path).unwrap();
        f.write_all(br#"{"kind":"checkpoint","#).unwrap();
        let t = j.totals().unwrap();
        assert_eq!((t.checkpoint.ok, t.skipped_lines), (2, 1));
    }

    #[test]
    fn rotation_keeps_every_count_and_the_files_bounded() {
        let root = tempfile::tempdir().unwrap();
        let j = Journal::in_store(root.path()).with_max_bytes(2000);
        for i in 0..60 {
            j.append(&attempt(Kind::Checkpoint, i % 3 != 0, 100 * i)).unwrap();
            if i == 30 {
                // A corrupt line in a file that is later folded into the totals still counts.
                let mut f = OpenOptions::new().append(true).open(j.dir().join(JOURNAL_FILE)).unwrap();
                f.write_all(b"garbage\n").unwrap();
            }
        }
        let t = j.totals().unwrap();
        assert_eq!((t.checkpoint.ok, t.checkpoint.error, t.skipped_lines), (40, 20, 1));
        assert_eq!(t.checkpoint.frozen.count, 60);
        assert!(j.dir().join(TOTALS_FILE).is_file() && j.dir().join(ROTATED_FILE).is_file());
        for f in [JOURNAL_FILE, ROTATED_FILE] {
            assert!(fs::metadata(j.dir().join(f)).unwrap().len() <= 2000, "{f} over its bound");
        }
        // A crash between writing the totals and the rename: the folded file is not counted twice.
        let mut folded = j.read_totals().unwrap();
        let old = j.dir().join(ROTATED_FILE);
        let (attempts, _) = read_lines(&old).unwrap();
        attempts.iter().for_each(|a| folded.add(a));
        folded.folded = Some(fs::metadata(&old).unwrap().ino());
        j.write_totals(&folded).unwrap();
        assert_eq!(j.totals().unwrap(), t);
        j.rotate().unwrap();
        assert_eq!(j.totals().unwrap(), t, "the half-done rotation finished without counting twice");
    }

    #[test]
    fn concurrent_appends_never_interleave_or_get_lost() {
        let root = tempfile::tempdir().unwrap();
        let j = Journal::in_store(root.path()).with_max_bytes(20_000);
        let threads: Vec<_> = (0..8)
            .map(|_| {
                let j = j.clone();
                std::thread::spawn(move || {
                    for i in 0..50 {
                        let mut a = attempt(Kind::Restore, true, i);
                        a.error = Some("x".repeat(300)); // long lines, several pages per file
                        j.append(&a).unwrap();
                    }
                })
            })
            .collect();
        threads.into_iter().for_each(|t| t.join().unwrap());
        let t = j.totals().unwrap();
        assert_eq!((t.restore.ok, t.skipped_lines), (400, 0));
    }

    #[test]
    fn clock_counts_frozen_time_across_freezes_and_errors_are_cut_short() {
        let mut c = Clock::start();
        assert_eq!(c.frozen(), None);
        c.freeze();
        std::thread::sleep(Duration::from_millis(20));
        c.thaw();
        c.thaw();
        c.freeze();
        std::thread::sleep(Duration::from_millis(20));
        c.thaw();
        let f = c.frozen().unwrap();
        assert!(f >= Duration::from_millis(40) && f < Duration::from_millis(1000), "{f:?}");
        c.phase("dump", || std::thread::sleep(Duration::from_millis(5)));
        let mut a = Attempt::new(Kind::Checkpoint, &c);
        assert!(a.phases_ms["dump"] >= 5 && a.frozen_ms >= Some(40));
        a.failed("criu", &"é".repeat(2000));
        assert_eq!(a.error.as_ref().unwrap().chars().count(), MAX_ERROR_CHARS + 1);
        assert!(a.started.ends_with('Z') && a.started.contains('.'), "{}", a.started);
    }

    /// CRIU's frozen time is written only when known; lines written before it existed still read.
    #[test]
    fn criu_frozen_time_is_optional_in_a_line() {
        let mut a = attempt(Kind::Checkpoint, true, 300);
        let line = serde_json::to_string(&a).unwrap();
        assert!(!line.contains("criu_frozen_ms"), "{line}");
        assert_eq!(serde_json::from_str::<Attempt>(&line).unwrap(), a);
        a.criu_frozen_ms = Some(120);
        let line = serde_json::to_string(&a).unwrap();
        assert!(line.contains(r#""criu_frozen_ms":120"#), "{line}");
        assert_eq!(serde_json::from_str::<Attempt>(&line).unwrap(), a);
    }
}
