//! The driver-api cycle around a CRIU dump, as an explicit state machine per process:
//! `Running → Locked → Checkpointed`, and back through `restore` + `unlock`.
//!
//! The rule that matters: a failed checkpoint must never leave a GPU process locked or
//! checkpointed (a locked process hangs in its next CUDA call; a checkpointed one has no device
//! memory). Every process we touched is remembered with its stage, and whatever happens —
//! an error at any step, an early return, a panic unwinding — `restore` + `unlock` bring each
//! one back to running: [`GpuSession::resume`] does it explicitly, `Drop` as the last resort.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use log::{info, warn};

use super::driver::{CudaDriver, CudaError, ProcessState};
use super::procs::{self, CudaProcess};
use crate::CudaProcessRecord;

/// Phase names, as they appear in the manifest's `phases_ms`.
pub const PHASE_LOCK: &str = "gpu-lock";
pub const PHASE_CHECKPOINT: &str = "gpu-checkpoint";
pub const PHASE_RESTORE: &str = "gpu-restore";
pub const PHASE_UNLOCK: &str = "gpu-unlock";

/// Where one process is in the cycle, as far as we moved it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stage {
    Untouched,
    Locked,
    Checkpointed,
}

struct Tracked {
    process: CudaProcess,
    stage: Stage,
    state_before: Option<ProcessState>,
    state_checkpointed: Option<ProcessState>,
    rss_before: u64,
    bytes: u64,
}

/// A GPU checkpoint step failed; what was rolled back is in `rollback`.
#[derive(Debug, thiserror::Error)]
#[error("GPU {step} failed: {source}{}", rollback_text(.rollback))]
pub struct GpuStepError {
    pub step: &'static str,
    #[source]
    pub source: CudaError,
    /// Problems while putting the processes back (empty: all of them run again).
    pub rollback: Vec<CudaError>,
}

fn rollback_text(rollback: &[CudaError]) -> String {
    if rollback.is_empty() {
        "; every CUDA process touched was restored and unlocked".into()
    } else {
        let list: Vec<String> = rollback.iter().map(ToString::to_string).collect();
        format!("; putting the processes back also failed: {}", list.join("; "))
    }
}

/// Restoring and unlocking after a checkpoint failed for some processes.
#[derive(Debug, thiserror::Error)]
#[error("GPU restore + unlock failed: {}", .0.iter().map(ToString::to_string).collect::<Vec<_>>().join("; "))]
pub struct GpuResumeError(pub Vec<CudaError>);

/// The CUDA processes of one container, through one checkpoint.
pub struct GpuSession<'a> {
    driver: &'a dyn CudaDriver,
    proc_root: PathBuf,
    procs: Vec<Tracked>,
    phases: BTreeMap<String, u64>,
}

impl<'a> GpuSession<'a> {
    pub fn new(driver: &'a dyn CudaDriver, proc_root: &Path, processes: Vec<CudaProcess>) -> Self {
        let procs = processes
            .into_iter()
            .map(|process| Tracked {
                process,
                stage: Stage::Untouched,
                state_before: None,
                state_checkpointed: None,
                rss_before: 0,
                bytes: 0,
            })
            .collect();
        Self { driver, proc_root: proc_root.to_path_buf(), procs, phases: BTreeMap::new() }
    }

    /// Locks every process (each waits up to `timeout_ms` for its GPU work), then checkpoints
    /// every one (device memory into host memory); see [`lock_all`](Self::lock_all) and
    /// [`checkpoint_all`](Self::checkpoint_all).
    pub fn lock_and_checkpoint(&mut self, timeout_ms: u32) -> Result<(), GpuStepError> {
        self.lock_all(timeout_ms)?;
        self.checkpoint_all()
    }

    /// Locks every process. All are locked before any is checkpointed, so that none of them
    /// keeps talking to a peer whose memory is already gone from the GPU. On failure every
    /// process locked so far is unlocked before this returns.
    pub fn lock_all(&mut self, timeout_ms: u32) -> Result<(), GpuStepError> {
        let started = Instant::now();
        for i in 0..self.procs.len() {
            let pid = self.procs[i].process.pid;
            self.procs[i].state_before = self.driver.state(pid).ok();
            self.procs[i].rss_before = procs::rss_bytes(&self.proc_root, pid);
            if let Err(e) = self.driver.lock(pid, timeout_ms) {
                return Err(self.fail("lock", e));
            }
            self.procs[i].stage = Stage::Locked;
        }
        self.phase(PHASE_LOCK, started);
        Ok(())
    }

    /// Checkpoints every (locked) process: its device memory moves into host memory. On failure
    /// every process touched is restored and unlocked before this returns.
    pub fn checkpoint_all(&mut self) -> Result<(), GpuStepError> {
        let started = Instant::now();
        for i in 0..self.procs.len() {
            let pid = self.procs[i].process.pid;
            if let Err(e) = self.driver.checkpoint(pid) {
                return Err(self.fail("checkpoint", e));
            }
            self.procs[i].stage = Stage::Checkpointed;
            self.procs[i].state_checkpointed = self.driver.state(pid).ok();
            let rss = procs::rss_bytes(&self.proc_root, pid);
            self.procs[i].bytes = rss.saturating_sub(self.procs[i].rss_before);
        }
        self.phase(PHASE_CHECKPOINT, started);
        for t in &self.procs {
            info!(
                "pid {} (ns pid {}): GPU checkpointed, {} bytes staged in host memory, state {}",
                t.process.pid,
                t.process.ns_pid,
                t.bytes,
                t.state_checkpointed.map(ProcessState::as_str).unwrap_or("unknown")
            );
        }
        Ok(())
    }

    /// After the dump, with the container left running (or after any later failure): restore
    /// and unlock every process this session moved.
    pub fn resume(&mut self) -> Result<(), GpuResumeError> {
        let errors = self.put_back();
        if errors.is_empty() {
            Ok(())
        } else {
            Err(GpuResumeError(errors))
        }
    }

    /// The container was killed after its checkpoint (exit): its processes are gone, nothing
    /// is left to put back.
    pub fn processes_exited(&mut self) {
        for t in &mut self.procs {
            t.stage = Stage::Untouched;
        }
    }

    /// What the manifest records per process.
    pub fn records(&self) -> Vec<CudaProcessRecord> {
        self.procs
            .iter()
            .map(|t| CudaProcessRecord {
                pid: t.process.pid,
                ns_pid: t.process.ns_pid,
                evidence: t.process.evidence.clone(),
                state_before: t.state_before,
                state_checkpointed: t.state_checkpointed,
                bytes: t.bytes,
                gpu_minors: t.process.gpu_minors.clone(),
            })
            .collect()
    }

    /// Milliseconds per phase so far.
    pub fn phases(&self) -> &BTreeMap<String, u64> {
        &self.phases
    }

    fn phase(&mut self, name: &str, started: Instant) {
        let ms = started.elapsed().as_millis() as u64;
        *self.phases.entry(name.to_string()).or_default() += ms;
    }

    fn fail(&mut self, step: &'static str, source: CudaError) -> GpuStepError {
        warn!("GPU {step} failed: {source}; restoring and unlocking the CUDA processes touched");
        GpuStepError { step, source, rollback: self.put_back() }
    }

    /// Restore (if checkpointed) and unlock (if locked) every process, in reverse order; each
    /// process is tried even when another one fails.
    fn put_back(&mut self) -> Vec<CudaError> {
        let mut errors = Vec::new();
        // (milliseconds, calls) per phase; a phase appears once it ran, even below 1 ms.
        let (mut restore, mut unlock) = ((0u64, 0u32), (0u64, 0u32));
        for t in self.procs.iter_mut().rev() {
            let pid = t.process.pid;
            if t.stage == Stage::Checkpointed {
                let started = Instant::now();
                let r = self.driver.restore(pid);
                restore = (restore.0 + started.elapsed().as_millis() as u64, restore.1 + 1);
                match r {
                    Ok(()) => t.stage = Stage::Locked,
                    Err(e) => {
                        errors.push(e);
                        continue;
                    }
                }
            }
            if t.stage == Stage::Locked {
                let started = Instant::now();
                let r = self.driver.unlock(pid);
                unlock = (unlock.0 + started.elapsed().as_millis() as u64, unlock.1 + 1);
                match r {
                    Ok(()) => t.stage = Stage::Untouched,
                    Err(e) => errors.push(e),
                }
            }
        }
        for (name, (ms, calls)) in [(PHASE_RESTORE, restore), (PHASE_UNLOCK, unlock)] {
            if calls > 0 {
                *self.phases.entry(name.into()).or_default() += ms;
            }
        }
        errors
    }
}

impl Drop for GpuSession<'_> {
    fn drop(&mut self) {
        if self.procs.iter().any(|t| t.stage != Stage::Untouched) {
            warn!("GPU session ended with CUDA processes still locked or checkpointed: restoring and unlocking them");
            for e in self.put_back() {
                warn!("{e}");
            }
        }
    }
}

/// A recorded CUDA process that could not be given its GPU state back after a restore.
#[derive(Debug, thiserror::Error)]
pub enum GpuRestoreError {
    #[error("CUDA process with namespace pid {ns_pid} (pid {old_pid} at checkpoint) is not in the restored container")]
    Missing { ns_pid: i32, old_pid: i32 },
    #[error(transparent)]
    Driver(#[from] CudaError),
}

/// After the runtime restored a container: restore + unlock each recorded CUDA process at its
/// restored host pid (found by its namespace pid among `pids`). Every process is tried; the
/// errors of all that failed are returned. Phase timings go into `phases`.
pub fn restore_processes(
    driver: &dyn CudaDriver,
    proc_root: &Path,
    records: &[CudaProcessRecord],
    pids: &[i32],
    phases: &mut BTreeMap<String, u64>,
) -> Result<Vec<i32>, Vec<GpuRestoreError>> {
    let mut errors = Vec::new();
    let mut restored = Vec::new();
    for r in records {
        let Some(pid) = procs::host_pid_for(proc_root, pids, r.ns_pid) else {
            errors.push(GpuRestoreError::Missing { ns_pid: r.ns_pid, old_pid: r.pid });
            continue;
        };
        let started = Instant::now();
        if let Err(e) = driver.restore(pid) {
            errors.push(e.into());
            continue;
        }
        *phases.entry(PHASE_RESTORE.into()).or_default() += started.elapsed().as_millis() as u64;
        let started = Instant::now();
        if let Err(e) = driver.unlock(pid) {
            errors.push(e.into());
            continue;
        }
        *phases.entry(PHASE_UNLOCK.into()).or_default() += started.elapsed().as_millis() as u64;
        let state = driver.state(pid).map(ProcessState::as_str).unwrap_or("unknown");
        info!("pid {pid} (ns pid {}): GPU state restored and unlocked, state {state}", r.ns_pid);
        restored.push(pid);
    }
    if errors.is_empty() {
        Ok(restored)
    } else {
        Err(errors)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::sync::Mutex;

    /// A recording driver double: keeps each pid's state like the driver, logs every call, and
    /// fails the calls it is told to.
    #[derive(Default)]
    pub struct Recorder {
        pub calls: Mutex<Vec<(String, i32)>>,
        pub states: Mutex<BTreeMap<i32, ProcessState>>,
        /// (step, pid or 0 for any)
        pub fail: Mutex<Vec<(&'static str, i32)>>,
    }

    impl Recorder {
        fn step(
            &self,
            call: &'static str,
            step: &'static str,
            pid: i32,
            from: ProcessState,
            to: ProcessState,
        ) -> Result<(), CudaError> {
            self.calls.lock().unwrap().push((step.to_string(), pid));
            let err = |code, name: &str| CudaError { call, pid, code, name: name.into() };
            if self.fail.lock().unwrap().iter().any(|&(s, p)| s == step && (p == 0 || p == pid)) {
                return Err(err(999, "CUDA_ERROR_UNKNOWN"));
            }
            let mut states = self.states.lock().unwrap();
            let st = states.entry(pid).or_insert(ProcessState::Running);
            if *st != from {
                return Err(err(401, "CUDA_ERROR_ILLEGAL_STATE"));
            }
            *st = to;
            Ok(())
        }

        pub fn calls(&self) -> Vec<(String, i32)> {
            self.calls.lock().unwrap().clone()
        }

        fn state_of(&self, pid: i32) -> ProcessState {
            *self.states.lock().unwrap().get(&pid).unwrap_or(&ProcessState::Running)
        }
    }

    impl CudaDriver for Recorder {
        fn driver_version(&self) -> Result<i32, CudaError> {
            Ok(12080)
        }
        fn lock(&self, pid: i32, _timeout_ms: u32) -> Result<(), CudaError> {
            self.step("cuCheckpointProcessLock", "lock", pid, ProcessState::Running, ProcessState::Locked)
        }
        fn checkpoint(&self, pid: i32) -> Result<(), CudaError> {
            self.step(
                "cuCheckpointProcessCheckpoint",
                "checkpoint",
                pid,
                ProcessState::Locked,
                ProcessState::Checkpointed,
            )
        }
        fn restore(&self, pid: i32) -> Result<(), CudaError> {
            self.step("cuCheckpointProcessRestore", "restore", pid, ProcessState::Checkpointed, ProcessState::Locked)
        }
        fn unlock(&self, pid: i32) -> Result<(), CudaError> {
            self.step("cuCheckpointProcessUnlock", "unlock", pid, ProcessState::Locked, ProcessState::Running)
        }
        fn state(&self, pid: i32) -> Result<ProcessState, CudaError> {
            Ok(self.state_of(pid))
        }
        fn restore_thread_id(&self, pid: i32) -> Result<i32, CudaError> {
            Ok(pid)
        }
    }

    fn procs(pids: &[i32]) -> Vec<CudaProcess> {
        pids.iter()
            .map(|&pid| CudaProcess { pid, ns_pid: pid, evidence: "/dev/nvidiactl open".into(), gpu_minors: vec![0] })
            .collect()
    }

    fn all_running(d: &Recorder, pids: &[i32]) -> bool {
        pids.iter().all(|&p| d.state_of(p) == ProcessState::Running)
    }

    #[test]
    fn locks_all_then_checkpoints_all_then_resumes_all() {
        let d = Recorder::default();
        let root = Path::new("/nonexistent");
        let mut s = GpuSession::new(&d, root, procs(&[1, 2]));
        s.lock_and_checkpoint(100).unwrap();
        assert!([1, 2].iter().all(|&p| d.state_of(p) == ProcessState::Checkpointed));
        let recs = s.records();
        assert_eq!(recs[0].state_before, Some(ProcessState::Running));
        assert_eq!(recs[1].state_checkpointed, Some(ProcessState::Checkpointed));
        s.resume().unwrap();
        let calls: Vec<String> = d.calls().iter().map(|(c, p)| format!("{c} {p}")).collect();
        assert_eq!(
            calls,
            ["lock 1", "lock 2", "checkpoint 1", "checkpoint 2", "restore 2", "unlock 2", "restore 1", "unlock 1"]
        );
        assert!(all_running(&d, &[1, 2]));
        assert!(s.phases().contains_key(PHASE_LOCK) && s.phases().contains_key(PHASE_CHECKPOINT));
        drop(s);
        assert_eq!(d.calls().len(), 8, "drop after resume must not touch the driver again");
    }

    #[test]
    fn a_failure_at_any_step_for_any_process_leaves_every_process_running() {
        for step in ["lock", "checkpoint"] {
            for pid in [1, 2, 3] {
                let d = Recorder::default();
                d.fail.lock().unwrap().push((step, pid));
                let mut s = GpuSession::new(&d, Path::new("/nonexistent"), procs(&[1, 2, 3]));
                let e = s.lock_and_checkpoint(100).unwrap_err();
                assert_eq!(e.step, step);
                assert_eq!(e.source.pid, pid);
                assert!(e.rollback.is_empty(), "{e}");
                assert!(e.to_string().contains("every CUDA process touched was restored and unlocked"), "{e}");
                assert!(all_running(&d, &[1, 2, 3]), "{step} {pid}: {:?}", d.states.lock().unwrap());
                // Untouched processes were never restored or unlocked.
                let calls = d.calls();
                for p in [1, 2, 3] {
                    let locked = calls.iter().any(|(c, q)| c == "lock" && *q == p && !(step == "lock" && p == pid));
                    let unlocked = calls.iter().any(|(c, q)| c == "unlock" && *q == p);
                    assert_eq!(locked, unlocked, "{step} {pid}: pid {p}: {calls:?}");
                }
            }
        }
    }

    #[test]
    fn a_failing_restore_is_reported_and_the_others_are_still_put_back() {
        let d = Recorder::default();
        d.fail.lock().unwrap().push(("restore", 2));
        let mut s = GpuSession::new(&d, Path::new("/nonexistent"), procs(&[1, 2, 3]));
        s.lock_and_checkpoint(0).unwrap();
        let e = s.resume().unwrap_err();
        assert_eq!(e.0.len(), 1);
        assert_eq!(e.0[0].pid, 2);
        assert!(e.to_string().contains("cuCheckpointProcessRestore (pid 2)"), "{e}");
        assert_eq!(d.state_of(1), ProcessState::Running);
        assert_eq!(d.state_of(3), ProcessState::Running);
        assert_eq!(d.state_of(2), ProcessState::Checkpointed);
    }

    #[test]
    fn dropping_a_session_mid_way_puts_everything_back() {
        let d = Recorder::default();
        {
            let mut s = GpuSession::new(&d, Path::new("/nonexistent"), procs(&[1, 2]));
            s.lock_and_checkpoint(0).unwrap();
            // e.g. the CRIU dump failed and the caller returned early
        }
        assert!(all_running(&d, &[1, 2]));
    }

    #[test]
    fn after_exit_nothing_is_put_back() {
        let d = Recorder::default();
        {
            let mut s = GpuSession::new(&d, Path::new("/nonexistent"), procs(&[1]));
            s.lock_and_checkpoint(0).unwrap();
            s.processes_exited();
        }
        assert_eq!(d.calls().len(), 2);
    }

    #[test]
    fn restore_after_the_runtime_restore_finds_processes_by_namespace_pid() {
        let d = Recorder::default();
        // Our own process plays the restored one (its namespace pid is its pid on a host).
        let me = std::process::id() as i32;
        d.states.lock().unwrap().insert(me, ProcessState::Checkpointed);
        let rec = CudaProcessRecord {
            pid: 1,
            ns_pid: me,
            evidence: String::new(),
            state_before: None,
            state_checkpointed: None,
            bytes: 0,
            gpu_minors: vec![],
        };
        let mut phases = BTreeMap::new();
        let pids = restore_processes(&d, Path::new("/proc"), std::slice::from_ref(&rec), &[me], &mut phases).unwrap();
        assert_eq!(pids, vec![me]);
        assert_eq!(d.state_of(me), ProcessState::Running);
        assert!(phases.contains_key(PHASE_RESTORE) && phases.contains_key(PHASE_UNLOCK));
        let missing = CudaProcessRecord { ns_pid: -5, ..rec };
        let errs = restore_processes(&d, Path::new("/proc"), &[missing], &[me], &mut phases).unwrap_err();
        assert!(errs[0].to_string().contains("namespace pid -5"), "{}", errs[0]);
        d.states.lock().unwrap().insert(me, ProcessState::Running);
        let rec = CudaProcessRecord {
            ns_pid: me,
            pid: 1,
            evidence: String::new(),
            state_before: None,
            state_checkpointed: None,
            bytes: 0,
            gpu_minors: vec![],
        };
        let errs = restore_processes(&d, Path::new("/proc"), &[rec], &[me], &mut phases).unwrap_err();
        assert!(errs[0].to_string().contains("CUDA_ERROR_ILLEGAL_STATE"), "{}", errs[0]);
    }
}
