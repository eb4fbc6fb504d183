//! Pre-dump: copies of a running container's memory taken before its final dump, so that only
//! the pages written since the last copy are dumped while it is frozen.
//!
//! CRIU finds those pages through the kernel's soft-dirty page bits (`CONFIG_MEM_SOFT_DIRTY`,
//! CRIU's "memory dirty tracking"). Without them `runc checkpoint --pre-dump` fails only once
//! runc has started CRIU ("CRIU is missing features"), so a pre-dump request is refused up
//! front on such a kernel, before anything is frozen or written.
//!
//! Layout inside a checkpoint: round `k` (1-based) writes `pre-<k>/`; each round's images dir
//! gets CRIU's `parent` link to the round before it, and the final dump's images dir one to the
//! last round, so that CRIU's restore finds every page without extra arguments.

use std::collections::HashMap;
use std::ffi::OsString;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use crate::preflight::PreflightError;

/// Container annotation asking for `N` pre-dump rounds on each checkpoint of the container
/// (containerd and CRI checkpoints, which carry no Kybernate options of their own).
pub const PRE_DUMP_ANNOTATION: &str = "kybernate.io/checkpoint-pre-dump";
/// Most rounds one checkpoint may ask for: past a few rounds the delta stops shrinking, and each
/// round costs a full walk of the container's memory.
pub const MAX_PRE_DUMP_ROUNDS: u32 = 8;
/// Field number of the pre-dump round count that `kybernate checkpoint` adds to runc's
/// `CheckpointOptions` (fields 1–9 are runc's; containerd forwards the bytes untouched). A varint;
/// present means "exactly this many", so that 0 can override an annotation or the config.
pub const OPTIONS_PRE_DUMP_FIELD: u32 = 1001;
/// `criu check --feature mem_dirty_track`: exit 0 and "… is supported" when CRIU can track
/// memory changes on this kernel.
pub const DIRTY_TRACK_CHECK: [&str; 3] = ["check", "--feature", "mem_dirty_track"];
/// How long the probe may take (it only reads kernel facts; a hung CRIU must not hang a checkpoint).
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(10);
/// Name of CRIU's link from an images dir to its parent's (criu/include/image.h `CR_PARENT_LINK`).
pub const PARENT_LINK: &str = "parent";
/// Directory of pre-dump round `k` inside a checkpoint: `pre-<k>`.
pub const PRE_DUMP_PREFIX: &str = "pre-";

/// Whether CRIU can track memory changes (and so pre-dump) on this node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DirtyTracking {
    Available,
    /// CRIU says the kernel has no soft-dirty bits; `criu_says` is its own words.
    Off {
        criu_says: String,
    },
    /// CRIU gave no usable answer (not runnable, timed out, an unknown feature name).
    Unknown {
        reason: String,
    },
}

impl DirtyTracking {
    pub fn is_available(&self) -> bool {
        *self == DirtyTracking::Available
    }
}

/// Reads CRIU's answer to [`DIRTY_TRACK_CHECK`]: exit status `code` and its output.
pub fn parse_dirty_tracking(code: i32, stdout: &str, stderr: &str) -> DirtyTracking {
    let said = |s: &str| s.lines().map(str::trim).filter(|l| !l.is_empty()).collect::<Vec<_>>().join("; ");
    let words = [said(stdout), said(stderr)].into_iter().filter(|s| !s.is_empty()).collect::<Vec<_>>().join("; ");
    if code == 0 {
        if stdout.contains("is supported") || stderr.contains("is supported") {
            return DirtyTracking::Available;
        }
        return DirtyTracking::Unknown { reason: format!("criu exited 0 without saying it is supported: {words:?}") };
    }
    // cr-check.c: "Dirty tracking is OFF. Memory snapshot will not work."
    if words.to_ascii_lowercase().contains("dirty tracking is off") {
        return DirtyTracking::Off { criu_says: strip_log_prefix(&words) };
    }
    let words = if words.is_empty() { "no output".to_string() } else { words };
    DirtyTracking::Unknown { reason: format!("criu exited with status {code}: {words}") }
}

/// "Warn  (criu/cr-check.c:824): Dirty tracking is OFF. …" → "Dirty tracking is OFF. …".
fn strip_log_prefix(words: &str) -> String {
    match words.split_once("): ") {
        Some((head, rest)) if head.starts_with("Warn") || head.starts_with("Error") => rest.to_string(),
        _ => words.to_string(),
    }
}

/// Runs [`DIRTY_TRACK_CHECK`] with `criu`, killed after `timeout`. For processes where nothing
/// else reaps children (the CLI, `kybernate doctor`); the shim runs it through its own spawner.
pub fn probe_dirty_tracking(criu: &Path, timeout: Duration) -> DirtyTracking {
    let unknown = |reason: String| DirtyTracking::Unknown { reason };
    let mut child = match Command::new(criu)
        .args(DIRTY_TRACK_CHECK)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
    {
        Ok(c) => c,
        Err(e) => return unknown(format!("cannot run {}: {e}", criu.display())),
    };
    let deadline = Instant::now() + timeout;
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(10)),
            Ok(None) => {
                let _ = child.kill();
                let _ = child.wait();
                return unknown(format!(
                    "`{} {}` did not answer within {timeout:?}",
                    criu.display(),
                    DIRTY_TRACK_CHECK.join(" ")
                ));
            }
            Err(e) => return unknown(format!("waiting for {}: {e}", criu.display())),
        }
    };
    // The answer is a line or two: it fits the pipes, so reading after the exit cannot block.
    let read = |r: Option<&mut dyn Read>| {
        let mut s = String::new();
        if let Some(r) = r {
            let _ = r.read_to_string(&mut s);
        }
        s
    };
    let stdout = read(child.stdout.as_mut().map(|r| r as &mut dyn Read));
    let stderr = read(child.stderr.as_mut().map(|r| r as &mut dyn Read));
    parse_dirty_tracking(status.code().unwrap_or(128), &stdout, &stderr)
}

/// `probe`'s answer for `criu`, asked once per process: the kernel does not gain or lose
/// soft-dirty bits while we run. Unknown answers (a timeout, say) are not kept.
pub fn cached_dirty_tracking(criu: &Path, probe: impl FnOnce() -> DirtyTracking) -> DirtyTracking {
    static CACHE: OnceLock<Mutex<HashMap<PathBuf, DirtyTracking>>> = OnceLock::new();
    let cache = CACHE.get_or_init(Default::default);
    if let Some(known) = cache.lock().unwrap_or_else(|p| p.into_inner()).get(criu) {
        return known.clone();
    }
    // Not under the lock: a slow probe must not hold up other containers' checkpoints.
    let answer = probe();
    if !matches!(answer, DirtyTracking::Unknown { .. }) {
        cache.lock().unwrap_or_else(|p| p.into_inner()).insert(criu.to_path_buf(), answer.clone());
    }
    answer
}

/// Ok for `rounds == 0` or a node that can pre-dump; else why not, naming the kernel feature.
pub fn require_dirty_tracking(rounds: u32, criu: &Path, tracking: &DirtyTracking) -> Result<(), PreflightError> {
    match tracking {
        _ if rounds == 0 => Ok(()),
        DirtyTracking::Available => Ok(()),
        DirtyTracking::Off { criu_says } => {
            Err(PreflightError::NoDirtyTracking { rounds, criu: criu.to_path_buf(), criu_says: criu_says.clone() })
        }
        DirtyTracking::Unknown { reason } => {
            Err(PreflightError::DirtyTrackingUnknown { rounds, criu: criu.to_path_buf(), reason: reason.clone() })
        }
    }
}

/// A pre-dump round count that cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RoundsError {
    #[error("pre-dump rounds {value:?} is not a whole number from 0 to {MAX_PRE_DUMP_ROUNDS}")]
    NotANumber { value: String },
    #[error("pre-dump rounds {value} is more than the {MAX_PRE_DUMP_ROUNDS} allowed")]
    TooMany { value: u64 },
}

/// Checks a round count from any source against [`MAX_PRE_DUMP_ROUNDS`].
pub fn check_rounds(value: u64) -> Result<u32, RoundsError> {
    u32::try_from(value).ok().filter(|&n| n <= MAX_PRE_DUMP_ROUNDS).ok_or(RoundsError::TooMany { value })
}

/// Parses an annotation's value ("0" … "8", surrounding blanks allowed).
pub fn parse_rounds(text: &str) -> Result<u32, RoundsError> {
    let t = text.trim();
    if t.is_empty() || !t.bytes().all(|b| b.is_ascii_digit()) {
        return Err(RoundsError::NotANumber { value: text.into() });
    }
    check_rounds(t.parse().map_err(|_| RoundsError::TooMany { value: u64::MAX })?)
}

/// Where the rounds of one checkpoint go, and how each images dir names its parent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PreDumpLayout {
    /// The checkpoint's top directory (the partial one while it is written).
    pub dir: PathBuf,
    /// The final dump's images dir: `dir/checkpoint`, or `dir` itself for a flat checkpoint.
    pub images: PathBuf,
    pub rounds: u32,
}

impl PreDumpLayout {
    /// Images dir of round `k` (1-based).
    pub fn round_dir(&self, k: u32) -> PathBuf {
        self.dir.join(format!("{PRE_DUMP_PREFIX}{k}"))
    }

    /// `--parent-path` of round `k`: the round before, relative to round `k`'s images dir as
    /// runc requires; none for the first.
    pub fn round_parent(&self, k: u32) -> Option<PathBuf> {
        (k > 1).then(|| PathBuf::from(format!("../{PRE_DUMP_PREFIX}{}", k - 1)))
    }

    /// `--parent-path` of the final dump: the last round, relative to the final images dir.
    pub fn final_parent(&self) -> Option<PathBuf> {
        if self.rounds == 0 {
            return None;
        }
        let last = format!("{PRE_DUMP_PREFIX}{}", self.rounds);
        Some(if self.images == self.dir { PathBuf::from(last) } else { Path::new("..").join(last) })
    }

    /// After the final dump: turns CRIU's chain of `parent` links (final → round N → … → round 1)
    /// into nested directories (`<images>/parent/`, `<images>/parent/parent/`, …). CRIU's restore
    /// opens `parent` in each images dir and does not care whether it is a link or a directory;
    /// the store holds regular files and directories only, so every round is then an ordinary
    /// part of the checkpoint, listed and hashed in its manifest, and the checkpoint restores
    /// with no extra arguments wherever it is moved.
    pub fn nest_rounds(&self) -> std::io::Result<()> {
        let mut at = self.images.clone();
        for k in (1..=self.rounds).rev() {
            let link = at.join(PARENT_LINK);
            let expected = if k == self.rounds { self.final_parent() } else { self.round_parent(k + 1) };
            let found = std::fs::read_link(&link)
                .map_err(|e| std::io::Error::new(e.kind(), format!("{}: CRIU's parent link: {e}", link.display())))?;
            if Some(&found) != expected.as_ref() {
                return Err(std::io::Error::other(format!(
                    "{}: CRIU's parent link points at {}, not at pre-dump round {k}",
                    link.display(),
                    found.display()
                )));
            }
            std::fs::remove_file(&link)?;
            std::fs::rename(self.round_dir(k), &link)?;
            at = link;
        }
        // Round 1 had no parent; a link there would point outside the checkpoint.
        match std::fs::symlink_metadata(at.join(PARENT_LINK)) {
            Ok(_) if self.rounds > 0 => Err(std::io::Error::other(format!(
                "{}: the first pre-dump round has a parent link",
                at.join(PARENT_LINK).display()
            ))),
            _ => Ok(()),
        }
    }

    /// Removes every round's dir (after a failed round or dump: the checkpoint is abandoned).
    pub fn remove_rounds(&self) {
        for k in 1..=self.rounds {
            let dir = self.round_dir(k);
            match std::fs::remove_dir_all(&dir) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                    log::warn!("{}: cannot remove pre-dump: {e}", dir.display())
                }
                _ => {}
            }
        }
    }
}

/// Whether `target` is a `parent` link target our layout writes: `pre-<k>` or `../pre-<k>`.
pub fn is_pre_dump_link(target: &Path) -> bool {
    let text = target.to_string_lossy();
    let name = text.strip_prefix("../").unwrap_or(&text);
    name.strip_prefix(PRE_DUMP_PREFIX)
        .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()) && !n.starts_with('0'))
}

/// `--parent-path P` for a runc checkpoint call.
pub fn parent_args(parent: Option<&Path>) -> Vec<OsString> {
    parent.map(|p| vec!["--parent-path".into(), p.into()]).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    /// A fake `criu` that answers `criu check --feature mem_dirty_track` with `script`.
    fn fake_criu(dir: &Path, script: &str) -> PathBuf {
        let p = dir.join("criu");
        std::fs::write(
            &p,
            format!("#!/bin/sh\n[ \"$1 $2 $3\" = \"check --feature mem_dirty_track\" ] || exit 64\n{script}\n"),
        )
        .unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
        p
    }

    #[test]
    fn criu_answers_are_read_both_ways() {
        let d = tempfile::tempdir().unwrap();
        let yes = fake_criu(d.path(), "echo 'mem_dirty_track is supported'");
        assert_eq!(probe_dirty_tracking(&yes, PROBE_TIMEOUT), DirtyTracking::Available);

        let d = tempfile::tempdir().unwrap();
        let no = fake_criu(
            d.path(),
            "echo 'Warn  (criu/cr-check.c:824): Dirty tracking is OFF. Memory snapshot will not work.' >&2; exit 1",
        );
        let off = probe_dirty_tracking(&no, PROBE_TIMEOUT);
        assert_eq!(
            off,
            DirtyTracking::Off { criu_says: "Dirty tracking is OFF. Memory snapshot will not work.".into() }
        );
        let err = require_dirty_tracking(2, &no, &off).unwrap_err();
        let msg = err.to_string();
        for want in
            ["CONFIG_MEM_SOFT_DIRTY", "soft-dirty", "Dirty tracking is OFF", "--pre-dump 0", PRE_DUMP_ANNOTATION]
        {
            assert!(msg.contains(want), "{want:?} missing from {msg}");
        }
        require_dirty_tracking(0, &no, &off).unwrap();
        require_dirty_tracking(3, &yes, &DirtyTracking::Available).unwrap();
    }

    #[test]
    fn no_answer_is_unknown_and_refused() {
        let d = tempfile::tempdir().unwrap();
        let bogus =
            fake_criu(d.path(), "echo 'Error (criu/cr-check.c:1901): Unknown feature mem_dirty_track' >&2; exit 1");
        let unknown = probe_dirty_tracking(&bogus, PROBE_TIMEOUT);
        assert!(
            matches!(&unknown, DirtyTracking::Unknown { reason } if reason.contains("Unknown feature")),
            "{unknown:?}"
        );
        let msg = require_dirty_tracking(1, &bogus, &unknown).unwrap_err().to_string();
        assert!(msg.contains("could not tell") && msg.contains("Unknown feature"), "{msg}");

        let slow = fake_criu(d.path(), "sleep 30");
        let started = Instant::now();
        let hung = probe_dirty_tracking(&slow, Duration::from_millis(300));
        assert!(started.elapsed() < Duration::from_secs(5), "the probe was not bounded");
        assert!(matches!(&hung, DirtyTracking::Unknown { reason } if reason.contains("did not answer")), "{hung:?}");
        let missing = probe_dirty_tracking(&d.path().join("nope"), PROBE_TIMEOUT);
        assert!(matches!(missing, DirtyTracking::Unknown { .. }));
        assert!(matches!(parse_dirty_tracking(0, "", ""), DirtyTracking::Unknown { .. }));
    }

    #[test]
    fn answers_are_cached_per_criu_but_unknown_ones_are_not() {
        let d = tempfile::tempdir().unwrap();
        let criu = d.path().join("criu-cached");
        let mut asked = 0;
        for _ in 0..3 {
            let got = cached_dirty_tracking(&criu, || {
                asked += 1;
                DirtyTracking::Off { criu_says: "off".into() }
            });
            assert!(!got.is_available());
        }
        assert_eq!(asked, 1, "asked CRIU more than once");
        let other = d.path().join("criu-flaky");
        for _ in 0..2 {
            cached_dirty_tracking(&other, || {
                asked += 1;
                DirtyTracking::Unknown { reason: "timed out".into() }
            });
        }
        assert_eq!(asked, 3, "an unknown answer was kept");
    }

    #[test]
    fn rounds_are_bounded_numbers() {
        assert_eq!(parse_rounds(" 3 "), Ok(3));
        assert_eq!(parse_rounds("0"), Ok(0));
        assert_eq!(parse_rounds("8"), Ok(MAX_PRE_DUMP_ROUNDS));
        assert_eq!(parse_rounds("9"), Err(RoundsError::TooMany { value: 9 }));
        for bad in ["", "-1", "two", "1.5", "+2"] {
            assert!(matches!(parse_rounds(bad), Err(RoundsError::NotANumber { .. })), "{bad:?}");
        }
        assert!(parse_rounds("99999999999999999999999").is_err());
        assert_eq!(check_rounds(u64::from(u32::MAX) + 1), Err(RoundsError::TooMany { value: u64::from(u32::MAX) + 1 }));
    }

    #[test]
    fn parents_chain_rounds_to_the_final_dump() {
        let l = PreDumpLayout { dir: "/c".into(), images: "/c/checkpoint".into(), rounds: 3 };
        assert_eq!(l.round_dir(1), Path::new("/c/pre-1"));
        assert_eq!(l.round_parent(1), None);
        assert_eq!(l.round_parent(3), Some(PathBuf::from("../pre-2")));
        assert_eq!(l.final_parent(), Some(PathBuf::from("../pre-3")));
        let flat = PreDumpLayout { dir: "/c".into(), images: "/c".into(), rounds: 2 };
        assert_eq!(flat.final_parent(), Some(PathBuf::from("pre-2")));
        let none = PreDumpLayout { rounds: 0, ..flat };
        assert_eq!(none.final_parent(), None);
        // CRIU's links, as a dump with three rounds leaves them, become nested directories.
        let d = tempfile::tempdir().unwrap();
        let l = PreDumpLayout { dir: d.path().into(), images: d.path().join("checkpoint"), rounds: 3 };
        std::fs::create_dir(&l.images).unwrap();
        std::os::unix::fs::symlink("../pre-3", l.images.join(PARENT_LINK)).unwrap();
        for k in 1..=3 {
            std::fs::create_dir(l.round_dir(k)).unwrap();
            std::fs::write(l.round_dir(k).join("pages-1.img"), k.to_string()).unwrap();
            if let Some(p) = l.round_parent(k) {
                std::os::unix::fs::symlink(p, l.round_dir(k).join(PARENT_LINK)).unwrap();
            }
        }
        l.nest_rounds().unwrap();
        for (k, rel) in [(3, "parent"), (2, "parent/parent"), (1, "parent/parent/parent")] {
            let dir = l.images.join(rel);
            assert!(std::fs::symlink_metadata(&dir).unwrap().is_dir(), "{rel}");
            assert_eq!(std::fs::read_to_string(dir.join("pages-1.img")).unwrap(), k.to_string(), "{rel}");
            assert!(!l.round_dir(k).exists());
        }
        assert!(!l.images.join("parent/parent/parent/parent").exists());
        // A link that is not the one CRIU was told to write is refused.
        let d = tempfile::tempdir().unwrap();
        let l = PreDumpLayout { dir: d.path().into(), images: d.path().join("checkpoint"), rounds: 1 };
        std::fs::create_dir_all(l.round_dir(1)).unwrap();
        std::fs::create_dir(&l.images).unwrap();
        std::os::unix::fs::symlink("/etc", l.images.join(PARENT_LINK)).unwrap();
        assert!(l.nest_rounds().unwrap_err().to_string().contains("not at pre-dump round 1"));

        for ok in ["pre-1", "../pre-12"] {
            assert!(is_pre_dump_link(Path::new(ok)), "{ok}");
        }
        for bad in ["/c/pre-1", "../../pre-1", "pre-", "pre-01", "../pre-1/..", "x", "../checkpoint", "pre-1/../../etc"]
        {
            assert!(!is_pre_dump_link(Path::new(bad)), "{bad}");
        }
        assert_eq!(parent_args(Some(Path::new("../pre-1"))), vec![OsString::from("--parent-path"), "../pre-1".into()]);
    }
}
