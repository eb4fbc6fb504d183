//! Progress of a running checkpoint, on one stderr line: the shim writes the checkpoint into a
//! hidden sibling of its target (`<parent>/.<name>.partial-<pid>-<nanos>`, see the library's
//! `PartialCheckpoint`); we watch that directory's size and its phase file (GPU lock, GPU copy,
//! CRIU dump), and the shim's own files appearing: `spec.dump` is written right after CRIU's
//! dump and the phase file goes away before the commit, so then the shim is hashing and syncing.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{self, RecvTimeoutError, Sender};
use std::thread::JoinHandle;
use std::time::Duration;

use kybernate_checkpoint::{dir_size, PHASE_CRIU_DUMP, PHASE_FILE, PHASE_GPU_CHECKPOINT, PHASE_GPU_LOCK, SPEC_DUMP};

use crate::output::human_size;

const INTERVAL: Duration = Duration::from_millis(250);

/// Where a checkpoint is, as far as its partial dir tells.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// The CUDA processes are being locked (their GPU work drains).
    GpuLock,
    /// Device memory moves into host memory.
    GpuCopy,
    /// CRIU writes its images (no manifest yet).
    Dump,
    /// The shim hashes the files and writes the manifest, then renames the dir onto the target.
    Commit,
}

impl Phase {
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::GpuLock => "GPU lock",
            Phase::GpuCopy => "GPU copy",
            Phase::Dump => "CRIU dump",
            Phase::Commit => "commit (hashing and syncing)",
        }
    }
}

/// The partial dir of `target` (the newest when there are several), its phase and bytes written;
/// None while there is none (before the dump starts, and after the commit).
pub fn partial_state(target: &Path) -> Option<(Phase, u64)> {
    let dir = partial_dir(target)?;
    let phase = match fs::read_to_string(dir.join(PHASE_FILE)).ok().as_deref().map(str::trim) {
        Some(PHASE_GPU_LOCK) => Phase::GpuLock,
        Some(PHASE_GPU_CHECKPOINT) => Phase::GpuCopy,
        Some(PHASE_CRIU_DUMP) => Phase::Dump,
        _ if dir.join(SPEC_DUMP).exists() => Phase::Commit,
        _ => Phase::Dump,
    };
    Some((phase, dir_size(&dir)))
}

fn partial_dir(target: &Path) -> Option<PathBuf> {
    let parent = target.parent()?;
    let prefix = format!(".{}.partial-", target.file_name()?.to_string_lossy());
    fs::read_dir(parent)
        .ok()?
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with(&prefix))
        .max_by_key(|e| e.file_name())
        .map(|e| e.path())
}

/// The line shown for a state.
pub fn line(state: Option<(Phase, u64)>) -> String {
    match state {
        None => "checkpoint: waiting for the shim".into(),
        Some((phase, bytes)) => format!("checkpoint: {}, {} written", phase.as_str(), human_size(bytes)),
    }
}

/// A thread redrawing the progress line on stderr every 250 ms; dropping it clears the line.
pub struct Progress {
    stop: Option<Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl Progress {
    pub fn start(target: PathBuf) -> Self {
        let (stop, stopped) = mpsc::channel::<()>();
        let thread = std::thread::spawn(move || loop {
            let mut err = std::io::stderr().lock();
            // \x1b[K: erase the rest of a longer previous line.
            let _ = write!(err, "\r{}\x1b[K", line(partial_state(&target)));
            let _ = err.flush();
            drop(err);
            match stopped.recv_timeout(INTERVAL) {
                Err(RecvTimeoutError::Timeout) => continue,
                _ => break,
            }
        });
        Self { stop: Some(stop), thread: Some(thread) }
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        drop(self.stop.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let mut err = std::io::stderr().lock();
        let _ = write!(err, "\r\x1b[K");
        let _ = err.flush();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn phase_and_size_from_the_partial_dir() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("20261123T212501.123Z");
        assert_eq!(partial_state(&target), None);
        // Another checkpoint's partial dir is not ours.
        fs::create_dir(dir.path().join(".other.partial-1-2")).unwrap();
        assert_eq!(partial_state(&target), None);

        let partial = dir.path().join(".20261123T212501.123Z.partial-42-1000");
        fs::create_dir_all(partial.join("checkpoint")).unwrap();
        assert_eq!(partial_state(&target), Some((Phase::Dump, 0)));
        // The shim's phase file: GPU steps, then the dump (its own 8 or 14 bytes count as written).
        fs::write(partial.join(PHASE_FILE), PHASE_GPU_LOCK).unwrap();
        assert_eq!(line(partial_state(&target)), "checkpoint: GPU lock, 8 B written");
        fs::write(partial.join(PHASE_FILE), PHASE_GPU_CHECKPOINT).unwrap();
        assert_eq!(partial_state(&target).map(|s| s.0), Some(Phase::GpuCopy));
        fs::write(partial.join(PHASE_FILE), PHASE_CRIU_DUMP).unwrap();
        fs::write(partial.join("checkpoint/pages-1.img"), vec![0u8; 3000]).unwrap();
        assert_eq!(partial_state(&target), Some((Phase::Dump, 3009)));
        fs::remove_file(partial.join(PHASE_FILE)).unwrap();
        assert_eq!(line(partial_state(&target)), "checkpoint: CRIU dump, 2.9 KiB written");
        fs::write(partial.join(SPEC_DUMP), "{}").unwrap();
        assert_eq!(partial_state(&target), Some((Phase::Commit, 3002)));
        assert_eq!(line(None), "checkpoint: waiting for the shim");
    }
}
