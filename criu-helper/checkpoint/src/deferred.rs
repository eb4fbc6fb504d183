//! A restore's verification in two parts, so that hashing the memory pages overlaps CRIU's
//! restore instead of coming before it: [`verify_for_restore`] checks now everything a caller
//! reads or applies itself (the manifest, sizes, CRIU's metadata images, `spec.dump`, the rootfs
//! diff) and hands back the rest, the `pages-*.img` files that only CRIU reads, as a
//! [`Deferred`]. [`Deferred::spawn`] hashes those on a thread of their own; the restore's caller
//! must not let the restored process run before [`Pending`] says [`Verdict::Verified`] (the
//! shim holds CRIU at its `post-restore` notification until then: `shim/src/criu_proxy.rs`).
//! What is checked is exactly what [`crate::verify`] checks, each byte hashed once.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use crate::digest;
use crate::manifest::Manifest;
use crate::store::{verify_digests, verify_quick, VerifyError};

/// Whether a listed file is CRIU's memory pages, which nothing but CRIU reads.
pub fn is_pages(rel: &str) -> bool {
    let name = rel.rsplit('/').next().unwrap_or(rel);
    name.starts_with("pages-") && name.ends_with(".img")
}

/// [`crate::verify_quick`] and the digests of every file but the memory pages, now; the pages
/// are left in the returned [`Deferred`], which must be verified before the restored process runs.
pub fn verify_for_restore(dir: &Path) -> Result<(Manifest, Deferred), VerifyError> {
    let manifest = verify_quick(dir)?;
    verify_digests(dir, &manifest, |rel| !is_pages(rel), digest::default_threads())?;
    let mut pages = manifest.clone();
    pages.files.retain(|rel, _| is_pages(rel));
    let bytes = pages.files.values().map(|e| e.size).sum();
    Ok((manifest, Deferred { dir: dir.to_path_buf(), pages, bytes }))
}

/// The memory pages of a checkpoint whose other files [`verify_for_restore`] verified.
#[derive(Debug, Clone)]
pub struct Deferred {
    dir: PathBuf,
    /// The checkpoint's manifest, listing only the pages.
    pages: Manifest,
    bytes: u64,
}

impl Deferred {
    /// How many bytes are left to hash.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// How many files are left to hash.
    pub fn files(&self) -> usize {
        self.pages.files.len()
    }

    /// Hashes the pages now and compares them with the manifest: on every core but one, which
    /// CRIU's restore (single-threaded, running at the same time) needs. Measured on 2 cores: with
    /// both, the hashing slowed CRIU's 1 GiB restore by ~140 ms (docs/benchmarks.md); one BLAKE3
    /// thread (~4.4 GiB/s) still finishes well before CRIU has read the pages (~1.4 GiB/s).
    pub fn run(&self) -> Result<(), VerifyError> {
        if self.pages.files.is_empty() {
            return Ok(());
        }
        verify_digests(&self.dir, &self.pages, |_| true, restore_threads())
    }

    /// Hashes the pages on a thread of their own; the handle answers when they are done. When no
    /// thread can be started they are hashed here, before this returns.
    pub fn spawn(self) -> Arc<Pending> {
        let pending = Arc::new(Pending::new(self.bytes));
        let done = pending.clone();
        let work = self.clone();
        let spawned = std::thread::Builder::new().name("verify-pages".into()).spawn(move || done.finish(work.run()));
        if spawned.is_err() {
            pending.finish(self.run());
        }
        pending
    }
}

/// Hashing threads beside a running CRIU restore: all cores but one, at least one.
fn restore_threads() -> usize {
    digest::default_threads().saturating_sub(1).max(1)
}

/// What a finished verification says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    Verified,
    /// The error's text, which names the file and where in it.
    Failed(String),
}

#[derive(Debug)]
enum State {
    Running,
    Verified,
    /// The text stays; the error itself goes to the first caller of [`Pending::take_error`].
    Failed(String, Option<VerifyError>),
}

/// A verification running in the background ([`Deferred::spawn`]); shared by whoever must wait
/// for it.
#[derive(Debug)]
pub struct Pending {
    state: Mutex<State>,
    changed: Condvar,
    started: Instant,
    bytes: u64,
    took: Mutex<Option<Duration>>,
}

impl Pending {
    fn new(bytes: u64) -> Self {
        Self {
            state: Mutex::new(State::Running),
            changed: Condvar::new(),
            started: Instant::now(),
            bytes,
            took: Mutex::new(None),
        }
    }

    /// A verification that has already ended with `result` (for callers that verified inline,
    /// and for tests).
    pub fn finished(result: Result<(), VerifyError>) -> Arc<Self> {
        let p = Arc::new(Self::new(0));
        p.finish(result);
        p
    }

    fn finish(&self, result: Result<(), VerifyError>) {
        *self.took.lock().unwrap_or_else(|e| e.into_inner()) = Some(self.started.elapsed());
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        *state = match result {
            Ok(()) => State::Verified,
            Err(e) => State::Failed(e.to_string(), Some(e)),
        };
        self.changed.notify_all();
    }

    /// The verdict once the verification has ended; `None` when `timeout` passed first. `None`
    /// as the timeout waits as long as it takes.
    pub fn wait(&self, timeout: Option<Duration>) -> Option<Verdict> {
        let deadline = timeout.map(|t| Instant::now() + t);
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            match &*state {
                State::Verified => return Some(Verdict::Verified),
                State::Failed(text, _) => return Some(Verdict::Failed(text.clone())),
                State::Running => {}
            }
            state = match deadline {
                None => self.changed.wait(state).unwrap_or_else(|e| e.into_inner()),
                Some(deadline) => {
                    let left = deadline.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        return None;
                    }
                    self.changed.wait_timeout(state, left).unwrap_or_else(|e| e.into_inner()).0
                }
            };
        }
    }

    /// The verdict now, without waiting.
    pub fn now(&self) -> Option<Verdict> {
        self.wait(Some(Duration::ZERO))
    }

    /// The failure itself (once; later calls get `None`), for a caller that reports it typed.
    pub fn take_error(&self) -> Option<VerifyError> {
        match &mut *self.state.lock().unwrap_or_else(|e| e.into_inner()) {
            State::Failed(_, e) => e.take(),
            _ => None,
        }
    }

    /// Bytes this verification hashes.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// How long the hashing took, once it has ended.
    pub fn took(&self) -> Option<Duration> {
        *self.took.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pages_are_criu_memory_images_only() {
        assert!(is_pages("checkpoint/pages-1.img") && is_pages("pages-12.img"));
        assert!(!is_pages("checkpoint/pagemap-1.img") && !is_pages("rootfs-diff.tar") && !is_pages("pages-1.img.x"));
    }

    #[test]
    fn a_pending_verdict_times_out_then_answers_everyone() {
        let p = Arc::new(Pending::new(7));
        assert_eq!(p.wait(Some(Duration::from_millis(20))), None);
        assert_eq!(p.now(), None);
        let waiter = {
            let p = p.clone();
            std::thread::spawn(move || p.wait(None))
        };
        p.finish(Err(VerifyError::Missing { file: "/x/pages-1.img".into() }));
        let want = Some(Verdict::Failed("/x/pages-1.img: listed in the manifest but missing".into()));
        assert_eq!(waiter.join().unwrap(), want);
        assert_eq!(p.now(), want);
        assert!(matches!(p.take_error(), Some(VerifyError::Missing { .. })));
        assert!(p.take_error().is_none(), "the error goes to one caller");
        assert_eq!(p.now(), want, "the text stays");
        assert!(p.took().is_some() && p.bytes() == 7);
        assert_eq!(Pending::finished(Ok(())).now(), Some(Verdict::Verified));
    }
}
