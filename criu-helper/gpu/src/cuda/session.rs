//! The driver-api cycle around a CRIU dump, as an explicit state machine per process:
//! `Running → Locked → Checkpointed`, and back through `restore` + `unlock`.
//!
//! Two rules that matter:
//! - only processes the driver knows as CUDA processes are locked: before any lock each candidate
//!   (a process holding `/dev/nvidia*` or mapping libcuda) is asked for its restore thread, and
//!   those the driver answers "no CUDA" for (a forked data-loader worker, an NVML sidecar) are
//!   skipped and recorded, as CRIU's CUDA plugin does;
//! - a failed checkpoint never leaves a GPU process locked or checkpointed (a locked process
//!   hangs in its next CUDA call; a checkpointed one has no device memory). The rollback does not
//!   trust what we believe we did: the driver can leave a process LOCKED or CHECKPOINTED after a
//!   failed call, or stuck. For every process touched it asks `cuCheckpointProcessGetState` and
//!   undoes by the answer (checkpointed → restore + unlock, locked → unlock, running → nothing);
//!   a process it cannot bring back (failed, stuck) is reported by pid with the driver's answer.
//!   [`GpuSession::resume`] does it explicitly, `Drop` as the last resort.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use log::{info, warn};

use super::driver::{CudaDriver, CudaError, GpuPair, ProcessState, CUDA_ERROR_NOT_SUPPORTED};
use super::procs::{self, CudaProcess};
use crate::{CudaProcessRecord, GpuInfo, SkippedProcess};

/// Phase names, as they appear in the manifest's `phases_ms`.
pub const PHASE_LOCK: &str = "gpu-lock";
pub const PHASE_CHECKPOINT: &str = "gpu-checkpoint";
pub const PHASE_RESTORE: &str = "gpu-restore";
pub const PHASE_UNLOCK: &str = "gpu-unlock";

/// How long a rollback waits for a process the driver reports mid-checkpoint or mid-restore.
const TRANSIENT_WAIT: Duration = Duration::from_secs(10);

struct Tracked {
    process: CudaProcess,
    /// A lock was attempted: from here on the driver may hold the process in any state.
    touched: bool,
    state_before: Option<ProcessState>,
    state_checkpointed: Option<ProcessState>,
    rss_before: u64,
    bytes: u64,
}

/// A process a rollback could not bring back to running, with what the driver said.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("pid {pid} (ns pid {ns_pid}) cannot be brought back: {}", self.why())]
pub struct NotBroughtBack {
    pub pid: i32,
    pub ns_pid: i32,
    /// The driver's last answer to `cuCheckpointProcessGetState` (None: it gave none).
    pub state: Option<ProcessState>,
    /// The call that failed (the restore or unlock of the rollback, or the state query).
    pub error: Option<CudaError>,
}

impl NotBroughtBack {
    fn why(&self) -> String {
        match (&self.state, &self.error) {
            (Some(state), Some(e)) => format!("the driver says it is {state} after {e}"),
            (Some(state), None) => format!("the driver says it is {state}"),
            (None, Some(e)) => format!("its state cannot be read: {e}"),
            (None, None) => "no answer from the driver".into(),
        }
    }
}

/// A GPU checkpoint step failed; what could not be rolled back is in `rollback`.
#[derive(Debug, thiserror::Error)]
#[error("GPU {step} failed: {source}{}{}", self.unsupported_text(), rollback_text(.rollback))]
pub struct GpuStepError {
    pub step: &'static str,
    #[source]
    pub source: CudaError,
    /// The namespace pid of the process the failed call was for (None: not one of ours).
    pub ns_pid: Option<i32>,
    /// Processes the rollback could not bring back (empty: all of them run again).
    pub rollback: Vec<NotBroughtBack>,
}

impl GpuStepError {
    /// The driver refused to lock or checkpoint the process at all (`CUDA_ERROR_NOT_SUPPORTED`):
    /// its CUDA state uses something the driver's checkpoint cannot move. Retrying cannot help.
    pub fn is_unsupported(&self) -> bool {
        matches!(self.step, "lock" | "checkpoint") && self.source.code == CUDA_ERROR_NOT_SUPPORTED
    }

    /// Why the driver says "not supported", in the user's terms: the real driver gives no more
    /// than the code, and CUDA IPC leaves no trace in /proc to refuse it before anything is locked.
    fn unsupported_text(&self) -> String {
        if !self.is_unsupported() {
            return String::new();
        }
        let ns = self.ns_pid.map(|n| format!(" (ns pid {n})")).unwrap_or_default();
        format!(
            ": the driver does not support checkpointing the CUDA state of pid {}{ns}; likely causes: CUDA IPC \
             memory (device memory shared with or imported from another process), UVM (managed) memory, or MPS",
            self.source.pid
        )
    }
}

fn rollback_text(rollback: &[NotBroughtBack]) -> String {
    if rollback.is_empty() {
        "; every CUDA process touched was restored and unlocked: nothing was left locked".into()
    } else {
        let list: Vec<String> = rollback.iter().map(ToString::to_string).collect();
        format!("; putting the processes back also failed: {}", list.join("; "))
    }
}

/// Restoring and unlocking after a checkpoint failed for some processes.
#[derive(Debug, thiserror::Error)]
#[error("GPU restore + unlock failed: {}", .0.iter().map(ToString::to_string).collect::<Vec<_>>().join("; "))]
pub struct GpuResumeError(pub Vec<NotBroughtBack>);

/// Brings `pid` back to running by what the driver says its state is, trying each undo step
/// once; `phases` gets the restore and unlock times (ms, calls).
fn bring_back(
    driver: &dyn CudaDriver,
    process: &CudaProcess,
    phases: &mut [(u64, u32); 2],
) -> Result<(), NotBroughtBack> {
    let pid = process.pid;
    let stuck = |state, error| NotBroughtBack { pid, ns_pid: process.ns_pid, state, error };
    let (mut restored, mut unlocked, mut last) = (false, false, None);
    let deadline = Instant::now() + TRANSIENT_WAIT;
    loop {
        let state = match driver.state(pid) {
            Ok(state) => state,
            Err(e) => return Err(stuck(None, Some(last.unwrap_or(e)))),
        };
        match state {
            ProcessState::Running => return Ok(()),
            ProcessState::Checkpointed if !restored => {
                restored = true;
                let started = Instant::now();
                let r = driver.restore(pid);
                phases[0] = (phases[0].0 + started.elapsed().as_millis() as u64, phases[0].1 + 1);
                if let Err(e) = r {
                    last = Some(e);
                }
            }
            ProcessState::Locked if !unlocked => {
                unlocked = true;
                let started = Instant::now();
                let r = driver.unlock(pid);
                phases[1] = (phases[1].0 + started.elapsed().as_millis() as u64, phases[1].1 + 1);
                if let Err(e) = r {
                    last = Some(e);
                }
            }
            s if s.is_transient() && Instant::now() < deadline => std::thread::sleep(Duration::from_millis(10)),
            other => return Err(stuck(Some(other), last)),
        }
    }
}

/// Brings the process `pid` back to running by what the driver says its state is
/// (checkpointed → restore + unlock, locked → unlock, running → nothing), trying each undo step
/// once: the rollback of `kybernate cuda-checkpoint --toggle` and of a [`GpuSession`].
pub fn rollback(driver: &dyn CudaDriver, pid: i32, ns_pid: i32) -> Result<(), NotBroughtBack> {
    let process = CudaProcess { pid, ns_pid, evidence: String::new(), gpu_minors: Vec::new() };
    bring_back(driver, &process, &mut [(0, 0); 2])
}

/// The CUDA processes of one container, through one checkpoint.
pub struct GpuSession<'a> {
    driver: &'a dyn CudaDriver,
    proc_root: PathBuf,
    /// Candidates until [`probe`](Self::probe), then the CUDA processes.
    procs: Vec<Tracked>,
    probed: bool,
    skipped: Vec<SkippedProcess>,
    phases: BTreeMap<String, u64>,
}

impl<'a> GpuSession<'a> {
    /// A session over `candidates`: processes that hold NVIDIA devices or map libcuda (see
    /// [`procs::find_cuda_processes`]); the driver decides which of them are CUDA processes.
    pub fn new(driver: &'a dyn CudaDriver, proc_root: &Path, candidates: Vec<CudaProcess>) -> Self {
        let procs = candidates
            .into_iter()
            .map(|process| Tracked {
                process,
                touched: false,
                state_before: None,
                state_checkpointed: None,
                rss_before: 0,
                bytes: 0,
            })
            .collect();
        Self {
            driver,
            proc_root: proc_root.to_path_buf(),
            procs,
            probed: false,
            skipped: Vec::new(),
            phases: BTreeMap::new(),
        }
    }

    /// Asks the driver for each candidate's restore thread: a process it answers "no CUDA"
    /// for (CUDA_ERROR_NOT_INITIALIZED / CUDA_ERROR_INVALID_VALUE) is skipped and recorded; any
    /// other error fails (nothing was touched). Runs once; [`lock_all`](Self::lock_all) calls it.
    pub fn probe(&mut self) -> Result<(), GpuStepError> {
        if self.probed {
            return Ok(());
        }
        let mut kept = Vec::new();
        for t in std::mem::take(&mut self.procs) {
            match self.driver.restore_thread_id(t.process.pid) {
                Ok(_) => kept.push(t),
                Err(e) if e.means_no_cuda() => {
                    info!(
                        "pid {} (ns pid {}, {}): no CUDA context, skipped ({} ({}))",
                        t.process.pid, t.process.ns_pid, t.process.evidence, e.name, e.code
                    );
                    self.skipped.push(SkippedProcess {
                        pid: t.process.pid,
                        ns_pid: t.process.ns_pid,
                        evidence: t.process.evidence.clone(),
                        driver_answer: format!("{} ({})", e.name, e.code),
                    });
                }
                Err(e) => {
                    self.procs = kept;
                    let ns_pid = Some(t.process.ns_pid);
                    return Err(GpuStepError { step: "probe", source: e, ns_pid, rollback: Vec::new() });
                }
            }
        }
        self.procs = kept;
        self.probed = true;
        Ok(())
    }

    /// Locks every process (each waits up to `timeout_ms` for its GPU work), then checkpoints
    /// every one (device memory into host memory); see [`lock_all`](Self::lock_all) and
    /// [`checkpoint_all`](Self::checkpoint_all).
    pub fn lock_and_checkpoint(&mut self, timeout_ms: u32) -> Result<(), GpuStepError> {
        self.lock_all(timeout_ms)?;
        self.checkpoint_all()
    }

    /// Probes the candidates, then locks every CUDA process. All are locked before any is
    /// checkpointed, so that none of them keeps talking to a peer whose memory is already gone
    /// from the GPU. On failure every process touched is brought back before this returns.
    pub fn lock_all(&mut self, timeout_ms: u32) -> Result<(), GpuStepError> {
        self.probe()?;
        let started = Instant::now();
        for i in 0..self.procs.len() {
            let pid = self.procs[i].process.pid;
            let before = self.driver.state(pid).ok();
            self.procs[i].state_before = before;
            self.procs[i].rss_before = procs::rss_bytes(&self.proc_root, pid);
            // A process someone else already holds (locked, checkpointed) is not ours to put
            // back: the lock fails, and the rollback leaves it where it was.
            self.procs[i].touched = matches!(before, None | Some(ProcessState::Running));
            if let Err(e) = self.driver.lock(pid, timeout_ms) {
                return Err(self.fail("lock", e));
            }
        }
        self.phase(PHASE_LOCK, started);
        Ok(())
    }

    /// Checkpoints every (locked) process: its device memory moves into host memory, and the
    /// process's growth in resident memory is what it moved. The processes are independent once
    /// all are locked, so each is checkpointed in a thread of its own (the driver copies one
    /// process's memory sequentially; several processes overlap). On failure every process
    /// touched is brought back before this returns.
    pub fn checkpoint_all(&mut self) -> Result<(), GpuStepError> {
        let started = Instant::now();
        let (driver, root) = (self.driver, self.proc_root.as_path());
        let results: Vec<Result<(Option<ProcessState>, u64), CudaError>> = std::thread::scope(|scope| {
            let handles: Vec<_> = self
                .procs
                .iter()
                .map(|t| {
                    let (pid, before) = (t.process.pid, t.rss_before);
                    scope.spawn(move || {
                        driver.checkpoint(pid)?;
                        let state = driver.state(pid).ok();
                        Ok((state, procs::rss_bytes(root, pid).saturating_sub(before)))
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| {
                    h.join().unwrap_or_else(|_| {
                        Err(CudaError {
                            call: "cuCheckpointProcessCheckpoint",
                            pid: 0,
                            code: 999,
                            name: "a checkpoint thread panicked".into(),
                        })
                    })
                })
                .collect()
        });
        let mut first_error = None;
        for (t, r) in self.procs.iter_mut().zip(results) {
            match r {
                Ok((state, bytes)) => {
                    t.state_checkpointed = state;
                    t.bytes = bytes;
                }
                Err(e) => {
                    first_error.get_or_insert(e);
                }
            }
        }
        if let Some(e) = first_error {
            return Err(self.fail("checkpoint", e));
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

    /// After the dump, with the container left running (or after any later failure): bring
    /// every process this session touched back to running.
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
            t.touched = false;
        }
    }

    /// What the manifest records per CUDA process.
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

    /// The candidates the driver said have no CUDA context.
    pub fn skipped(&self) -> &[SkippedProcess] {
        &self.skipped
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
        warn!("GPU {step} failed: {source}; bringing the CUDA processes touched back by their driver state");
        let ns_pid = self.procs.iter().find(|t| t.process.pid == source.pid).map(|t| t.process.ns_pid);
        GpuStepError { step, source, ns_pid, rollback: self.put_back() }
    }

    /// Brings every touched process back by its driver state, in reverse order; each process
    /// is tried even when another one fails. Those brought back are no longer touched.
    fn put_back(&mut self) -> Vec<NotBroughtBack> {
        let mut errors = Vec::new();
        // (milliseconds, calls) of restore and unlock; a phase appears once it ran, even below 1 ms.
        let mut phases = [(0u64, 0u32); 2];
        for t in self.procs.iter_mut().rev().filter(|t| t.touched) {
            match bring_back(self.driver, &t.process, &mut phases) {
                Ok(()) => t.touched = false,
                Err(e) => {
                    warn!("{e}");
                    errors.push(e);
                }
            }
        }
        for (name, (ms, calls)) in [(PHASE_RESTORE, phases[0]), (PHASE_UNLOCK, phases[1])] {
            if calls > 0 {
                *self.phases.entry(name.into()).or_default() += ms;
            }
        }
        errors
    }
}

impl Drop for GpuSession<'_> {
    fn drop(&mut self) {
        if self.procs.iter().any(|t| t.touched) {
            warn!("GPU session ended with CUDA processes possibly locked or checkpointed: bringing them back");
            self.put_back();
        }
    }
}

/// A recorded CUDA process that could not be given its GPU state back after a restore.
#[derive(Debug, thiserror::Error)]
pub enum GpuRestoreError {
    #[error("CUDA process with namespace pid {ns_pid} (pid {old_pid} at checkpoint) is not in the restored container")]
    Missing { ns_pid: i32, old_pid: i32 },
    /// A driver call failed; `state` is what the driver said about the process afterwards.
    #[error("{source}{}", .state.map(|s| format!("; the driver now says the process is {s}")).unwrap_or_default())]
    Driver {
        #[source]
        source: CudaError,
        state: Option<ProcessState>,
    },
}

impl From<CudaError> for GpuRestoreError {
    fn from(source: CudaError) -> Self {
        Self::Driver { source, state: None }
    }
}

/// After the runtime restored a container: restore (onto the GPUs `pairs` map to) + unlock
/// each recorded CUDA process at its restored host pid (found by its namespace pid among
/// `pids`). `recorded_gpus` is the checkpoint's GPU inventory (minor → UUID). The restores run
/// in parallel (independent processes), then the restored processes are unlocked — none runs
/// again before all have their GPU memory back. Every process is tried; the errors of all that
/// failed are returned, each with the driver's state afterwards. Phase timings go into `phases`.
pub fn restore_processes(
    driver: &dyn CudaDriver,
    proc_root: &Path,
    records: &[CudaProcessRecord],
    pids: &[i32],
    pairs: &[GpuPair],
    recorded_gpus: &[GpuInfo],
    phases: &mut BTreeMap<String, u64>,
) -> Result<Vec<i32>, Vec<GpuRestoreError>> {
    let mut errors = Vec::new();
    let failed = |pid: i32, source: CudaError| GpuRestoreError::Driver { source, state: driver.state(pid).ok() };
    // (record, host pid, its pairs)
    let mut found: Vec<(&CudaProcessRecord, i32, Vec<GpuPair>)> = Vec::new();
    for r in records {
        let Some(pid) = procs::host_pid_for(proc_root, pids, r.ns_pid) else {
            errors.push(GpuRestoreError::Missing { ns_pid: r.ns_pid, old_pid: r.pid });
            continue;
        };
        let held: Vec<&str> = r
            .gpu_minors
            .iter()
            .filter_map(|m| recorded_gpus.iter().find(|g| g.minor == Some(*m)).map(|g| g.uuid.as_str()))
            .collect();
        found.push((r, pid, pairs_for(pairs, &held)));
    }
    let started = Instant::now();
    let results: Vec<Result<(), CudaError>> = std::thread::scope(|scope| {
        let handles: Vec<_> =
            found.iter().map(|(_, pid, mine)| scope.spawn(move || driver.restore_onto(*pid, mine))).collect();
        handles
            .into_iter()
            .map(|h| {
                h.join().unwrap_or_else(|_| {
                    Err(CudaError {
                        call: "cuCheckpointProcessRestore",
                        pid: 0,
                        code: 999,
                        name: "a restore thread panicked".into(),
                    })
                })
            })
            .collect()
    });
    if !found.is_empty() {
        *phases.entry(PHASE_RESTORE.into()).or_default() += started.elapsed().as_millis() as u64;
    }
    let started = Instant::now();
    let mut restored = Vec::new();
    for ((r, pid, mine), result) in found.iter().zip(results) {
        if let Err(e) = result.and_then(|()| driver.unlock(*pid)) {
            errors.push(failed(*pid, e));
            continue;
        }
        let state = driver.state(*pid).map(ProcessState::as_str).unwrap_or("unknown");
        let onto = if mine.is_empty() {
            String::new()
        } else {
            format!(" onto [{}]", mine.iter().map(ToString::to_string).collect::<Vec<_>>().join(", "))
        };
        info!("pid {pid} (ns pid {}): GPU state restored{onto} and unlocked, state {state}", r.ns_pid);
        restored.push(*pid);
    }
    if !restored.is_empty() {
        *phases.entry(PHASE_UNLOCK.into()).or_default() += started.elapsed().as_millis() as u64;
    }
    if errors.is_empty() {
        Ok(restored)
    } else {
        Err(errors)
    }
}

/// The pairs of one process that held the GPUs `held` (UUIDs): those of its GPUs; all of them
/// when it held none by device node (e.g. only `/dev/nvidiactl` open: its context then spans
/// every GPU the container had).
pub fn pairs_for(pairs: &[GpuPair], held: &[&str]) -> Vec<GpuPair> {
    pairs.iter().filter(|p| held.is_empty() || held.iter().any(|h| h.eq_ignore_ascii_case(&p.old))).cloned().collect()
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::sync::Mutex;

    /// An injected failure of the [`Recorder`]: `step` fails for `pid` (0: any) with `code`, and
    /// leaves the process in `then` (None: unchanged), as the real driver can.
    #[derive(Debug, Clone)]
    pub struct Failure {
        pub step: &'static str,
        pub pid: i32,
        pub code: i32,
        pub then: Option<ProcessState>,
    }

    /// A recording driver double: keeps each pid's state like the driver, logs every call, and
    /// fails the calls it is told to — also leaving processes locked, checkpointed, failed or
    /// stuck (every restore fails with CUDA_ERROR_OPERATING_SYSTEM, NVIDIA/cuda-checkpoint#44).
    /// Pids in `no_cuda` are processes without a CUDA context. With `grow` set, a checkpoint
    /// grows `VmRSS` of `<root>/<pid>/status` by the bytes given, as the driver grows the process.
    #[derive(Default)]
    pub struct Recorder {
        pub calls: Mutex<Vec<(String, i32)>>,
        pub states: Mutex<BTreeMap<i32, ProcessState>>,
        /// (step, pid or 0 for any): fails with CUDA_ERROR_UNKNOWN, state unchanged.
        pub fail: Mutex<Vec<(&'static str, i32)>>,
        pub failures: Mutex<Vec<Failure>>,
        pub stuck: Mutex<Vec<i32>>,
        pub no_cuda: Mutex<Vec<i32>>,
        /// The pairs each restore was given.
        pub pairs: Mutex<Vec<(i32, Vec<GpuPair>)>>,
        pub grow: Mutex<Option<(PathBuf, u64)>>,
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
            if self.no_cuda.lock().unwrap().contains(&pid) {
                return Err(err(3, "CUDA_ERROR_NOT_INITIALIZED"));
            }
            if self.fail.lock().unwrap().iter().any(|&(s, p)| s == step && (p == 0 || p == pid)) {
                return Err(err(999, "CUDA_ERROR_UNKNOWN"));
            }
            let injected =
                self.failures.lock().unwrap().iter().find(|f| f.step == step && (f.pid == 0 || f.pid == pid)).cloned();
            if let Some(f) = injected {
                if let Some(then) = f.then {
                    self.states.lock().unwrap().insert(pid, then);
                }
                return Err(err(f.code, "CUDA_ERROR_INJECTED"));
            }
            if step == "restore" && self.stuck.lock().unwrap().contains(&pid) {
                return Err(err(304, "CUDA_ERROR_OPERATING_SYSTEM"));
            }
            let mut states = self.states.lock().unwrap();
            let st = states.entry(pid).or_insert(ProcessState::Running);
            if *st != from {
                return Err(err(401, "CUDA_ERROR_ILLEGAL_STATE"));
            }
            *st = to;
            drop(states);
            if step == "checkpoint" {
                if let Some((root, bytes)) = self.grow.lock().unwrap().clone() {
                    grow_rss(&root, pid, bytes);
                }
            }
            Ok(())
        }

        pub fn calls(&self) -> Vec<(String, i32)> {
            self.calls.lock().unwrap().clone()
        }

        pub fn inject(&self, step: &'static str, pid: i32, code: i32, then: Option<ProcessState>) {
            self.failures.lock().unwrap().push(Failure { step, pid, code, then });
        }

        fn state_of(&self, pid: i32) -> ProcessState {
            *self.states.lock().unwrap().get(&pid).unwrap_or(&ProcessState::Running)
        }
    }

    /// Adds `bytes` to VmRSS in `<root>/<pid>/status`.
    fn grow_rss(root: &Path, pid: i32, bytes: u64) {
        let path = root.join(pid.to_string()).join("status");
        let text = std::fs::read_to_string(&path).unwrap();
        let out: Vec<String> = text
            .lines()
            .map(|l| match l.strip_prefix("VmRSS:") {
                Some(v) => {
                    let kib: u64 = v.trim().trim_end_matches("kB").trim().parse().unwrap();
                    format!("VmRSS:\t{} kB", kib + bytes / 1024)
                }
                None => l.to_string(),
            })
            .collect();
        std::fs::write(&path, out.join("\n") + "\n").unwrap();
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
            self.restore_onto(pid, &[])
        }
        fn restore_onto(&self, pid: i32, pairs: &[GpuPair]) -> Result<(), CudaError> {
            self.pairs.lock().unwrap().push((pid, pairs.to_vec()));
            self.step("cuCheckpointProcessRestore", "restore", pid, ProcessState::Checkpointed, ProcessState::Locked)
        }
        fn unlock(&self, pid: i32) -> Result<(), CudaError> {
            self.step("cuCheckpointProcessUnlock", "unlock", pid, ProcessState::Locked, ProcessState::Running)
        }
        fn state(&self, pid: i32) -> Result<ProcessState, CudaError> {
            if self.no_cuda.lock().unwrap().contains(&pid) {
                return Err(CudaError {
                    call: "cuCheckpointProcessGetState",
                    pid,
                    code: 3,
                    name: "CUDA_ERROR_NOT_INITIALIZED".into(),
                });
            }
            Ok(self.state_of(pid))
        }
        fn restore_thread_id(&self, pid: i32) -> Result<i32, CudaError> {
            self.calls.lock().unwrap().push(("restore_tid".into(), pid));
            let err = |code, name: &str| CudaError {
                call: "cuCheckpointProcessGetRestoreThreadId",
                pid,
                code,
                name: name.into(),
            };
            if self.no_cuda.lock().unwrap().contains(&pid) {
                return Err(err(3, "CUDA_ERROR_NOT_INITIALIZED"));
            }
            if self.fail.lock().unwrap().iter().any(|&(s, p)| s == "restore_tid" && (p == 0 || p == pid)) {
                return Err(err(999, "CUDA_ERROR_UNKNOWN"));
            }
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

    /// The calls without the probe.
    fn steps(d: &Recorder) -> Vec<String> {
        d.calls().iter().filter(|(c, _)| c != "restore_tid").map(|(c, p)| format!("{c} {p}")).collect()
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
        assert_eq!(
            d.calls().iter().take(2).map(|(c, p)| format!("{c} {p}")).collect::<Vec<_>>(),
            ["restore_tid 1", "restore_tid 2"],
            "every candidate is probed before any lock"
        );
        let mut steps = steps(&d);
        // The checkpoints run in parallel: in either order, both after every lock.
        steps[2..4].sort();
        assert_eq!(
            steps,
            ["lock 1", "lock 2", "checkpoint 1", "checkpoint 2", "restore 2", "unlock 2", "restore 1", "unlock 1"]
        );
        assert!(all_running(&d, &[1, 2]));
        assert!(s.phases().contains_key(PHASE_LOCK) && s.phases().contains_key(PHASE_CHECKPOINT));
        assert!(s.skipped().is_empty());
        drop(s);
        assert_eq!(d.calls().len(), 10, "drop after resume must not touch the driver again");
    }

    #[test]
    fn processes_without_cuda_are_skipped_and_recorded_other_probe_errors_fail() {
        let d = Recorder::default();
        d.no_cuda.lock().unwrap().push(2);
        let mut s = GpuSession::new(&d, Path::new("/nonexistent"), procs(&[1, 2, 3]));
        s.lock_and_checkpoint(0).unwrap();
        s.resume().unwrap();
        assert!(!d.calls().iter().any(|(c, p)| *p == 2 && c != "restore_tid"), "{:?}", d.calls());
        assert_eq!(s.records().iter().map(|r| r.pid).collect::<Vec<_>>(), [1, 3]);
        assert_eq!(
            s.skipped(),
            [SkippedProcess {
                pid: 2,
                ns_pid: 2,
                evidence: "/dev/nvidiactl open".into(),
                driver_answer: "CUDA_ERROR_NOT_INITIALIZED (3)".into()
            }]
        );

        // Any other answer is a driver problem: the checkpoint fails before anything is locked.
        let d = Recorder::default();
        d.fail.lock().unwrap().push(("restore_tid", 3));
        let mut s = GpuSession::new(&d, Path::new("/nonexistent"), procs(&[1, 2, 3]));
        let e = s.lock_all(0).unwrap_err();
        assert_eq!((e.step, e.source.pid, e.source.code), ("probe", 3, 999));
        assert!(steps(&d).is_empty(), "{:?}", d.calls());
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

    /// A process whose CUDA state the driver cannot checkpoint (CUDA IPC, UVM, MPS): the driver
    /// answers CUDA_ERROR_NOT_SUPPORTED and leaves it locked (NVIDIA/cuda-checkpoint#51 shows
    /// lock 0, checkpoint 801, unlock 0). The error names the process and the likely causes, and
    /// nothing stays locked; other errors carry no such guess.
    #[test]
    fn a_checkpoint_the_driver_does_not_support_names_the_process_and_its_likely_causes() {
        let d = Recorder::default();
        d.inject("checkpoint", 2, CUDA_ERROR_NOT_SUPPORTED, None);
        let mut candidates = procs(&[1, 2, 3]);
        candidates[1].ns_pid = 12;
        let mut s = GpuSession::new(&d, Path::new("/nonexistent"), candidates);
        let e = s.lock_and_checkpoint(100).unwrap_err();
        assert!(e.is_unsupported() && e.ns_pid == Some(12), "{e:?}");
        let text = e.to_string();
        for want in [
            "cuCheckpointProcessCheckpoint (pid 2): CUDA_ERROR_INJECTED (801)",
            "the driver does not support checkpointing the CUDA state of pid 2 (ns pid 12)",
            "CUDA IPC memory",
            "UVM (managed) memory",
            "MPS",
            "nothing was left locked",
        ] {
            assert!(text.contains(want), "want {want:?} in: {text}");
        }
        assert!(all_running(&d, &[1, 2, 3]), "{:?}", d.states.lock().unwrap());
        let unlocks = d.calls().iter().filter(|(c, _)| c == "unlock").count();
        assert_eq!(unlocks, 3, "{:?}", d.calls());

        let d = Recorder::default();
        d.inject("checkpoint", 2, 999, None);
        let mut s = GpuSession::new(&d, Path::new("/nonexistent"), procs(&[1, 2, 3]));
        let e = s.lock_and_checkpoint(100).unwrap_err();
        assert!(!e.is_unsupported() && !e.to_string().contains("likely causes"), "{e}");
    }

    /// The driver can leave a process elsewhere after a failed call: the rollback undoes by what
    /// it says, not by what we believe happened.
    #[test]
    fn rollback_follows_the_state_the_driver_reports() {
        use ProcessState::*;
        // (failing step, state it leaves, calls of the rollback for that process)
        let cases: [(&str, ProcessState, &[&str]); 4] = [
            ("lock", Locked, &["unlock"]),
            ("lock", Running, &[]),
            ("checkpoint", Checkpointed, &["restore", "unlock"]),
            ("checkpoint", Locked, &["unlock"]),
        ];
        for (step, then, undo) in cases {
            let d = Recorder::default();
            d.inject(step, 2, 909, Some(then));
            let mut s = GpuSession::new(&d, Path::new("/nonexistent"), procs(&[1, 2, 3]));
            let e = s.lock_and_checkpoint(0).unwrap_err();
            assert!(e.rollback.is_empty(), "{step} → {then}: {e}");
            assert!(all_running(&d, &[1, 2, 3]), "{step} → {then}: {:?}", d.states.lock().unwrap());
            let failed_at = d.calls().iter().position(|(c, p)| c == step && *p == 2).unwrap();
            let calls = d.calls();
            let after: Vec<&str> =
                calls[failed_at + 1..].iter().filter(|(_, p)| *p == 2).map(|(c, _)| c.as_str()).collect();
            assert_eq!(after, undo, "{step} → {then}: {:?}", d.calls());
        }
    }

    #[test]
    fn a_process_held_by_someone_else_is_not_put_back_by_us() {
        let d = Recorder::default();
        d.states.lock().unwrap().insert(2, ProcessState::Locked);
        let mut s = GpuSession::new(&d, Path::new("/nonexistent"), procs(&[1, 2]));
        let e = s.lock_and_checkpoint(0).unwrap_err();
        assert_eq!((e.step, e.source.pid, e.source.code), ("lock", 2, 401));
        assert!(e.rollback.is_empty(), "{e}");
        assert_eq!(d.state_of(1), ProcessState::Running);
        assert_eq!(d.state_of(2), ProcessState::Locked, "left as it was");
    }

    #[test]
    fn a_failed_or_stuck_process_is_reported_and_the_others_are_still_brought_back() {
        // The checkpoint of pid 2 fails and leaves it FAILED.
        let d = Recorder::default();
        d.inject("checkpoint", 2, 999, Some(ProcessState::Failed));
        let mut s = GpuSession::new(&d, Path::new("/nonexistent"), procs(&[1, 2, 3]));
        let e = s.lock_and_checkpoint(0).unwrap_err();
        assert_eq!(e.rollback.len(), 1, "{e}");
        assert_eq!((e.rollback[0].pid, e.rollback[0].state), (2, Some(ProcessState::Failed)));
        assert!(e.to_string().contains("pid 2 (ns pid 2) cannot be brought back: the driver says it is failed"), "{e}");
        assert!(all_running(&d, &[1, 3]));
        drop(s);

        // Stuck after an out-of-memory restore: reported checkpointed, every restore fails.
        let d = Recorder::default();
        let mut s = GpuSession::new(&d, Path::new("/nonexistent"), procs(&[1, 2, 3]));
        s.lock_and_checkpoint(0).unwrap();
        d.stuck.lock().unwrap().push(2);
        let e = s.resume().unwrap_err();
        assert_eq!(e.0.len(), 1);
        let stuck = &e.0[0];
        assert_eq!((stuck.pid, stuck.state), (2, Some(ProcessState::Checkpointed)));
        assert_eq!(stuck.error.as_ref().map(|e| e.code), Some(304));
        assert!(
            e.to_string().contains("the driver says it is checkpointed after cuCheckpointProcessRestore (pid 2)"),
            "{e}"
        );
        assert!(all_running(&d, &[1, 3]));
        // Dropping the session tries the stuck one again, once per undo step, and gives up.
        let before = d.calls().len();
        drop(s);
        let again: Vec<_> = d.calls()[before..].to_vec();
        assert_eq!(again, [("restore".to_string(), 2)]);
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
        assert_eq!(steps(&d), ["lock 1", "checkpoint 1"]);
    }

    /// The bytes a checkpoint moved are the process's growth in resident memory.
    #[test]
    fn bytes_moved_are_the_growth_of_resident_memory() {
        let root = tempfile::tempdir().unwrap();
        let real = std::fs::read_to_string("/proc/self/status").unwrap();
        for pid in [1, 2] {
            let dir = root.path().join(pid.to_string());
            std::fs::create_dir_all(&dir).unwrap();
            let status: Vec<String> = real
                .lines()
                .map(|l| if l.starts_with("VmRSS:") { "VmRSS:\t    1000 kB".to_string() } else { l.to_string() })
                .collect();
            std::fs::write(dir.join("status"), status.join("\n") + "\n").unwrap();
        }
        let d = Recorder::default();
        *d.grow.lock().unwrap() = Some((root.path().to_path_buf(), 8 << 20));
        let mut s = GpuSession::new(&d, root.path(), procs(&[1, 2]));
        s.lock_and_checkpoint(0).unwrap();
        assert_eq!(s.records().iter().map(|r| r.bytes).collect::<Vec<_>>(), [8 << 20, 8 << 20]);
        s.resume().unwrap();
    }

    fn record(pid: i32, ns_pid: i32, gpu_minors: Vec<u32>) -> CudaProcessRecord {
        CudaProcessRecord {
            pid,
            ns_pid,
            evidence: String::new(),
            state_before: None,
            state_checkpointed: None,
            bytes: 0,
            gpu_minors,
        }
    }

    #[test]
    fn restore_after_the_runtime_restore_finds_processes_by_namespace_pid() {
        let d = Recorder::default();
        // Our own process plays the restored one (its namespace pid is its pid on a host).
        let me = std::process::id() as i32;
        d.states.lock().unwrap().insert(me, ProcessState::Checkpointed);
        let rec = record(1, me, vec![]);
        let mut phases = BTreeMap::new();
        let pids = restore_processes(&d, Path::new("/proc"), std::slice::from_ref(&rec), &[me], &[], &[], &mut phases)
            .unwrap();
        assert_eq!(pids, vec![me]);
        assert_eq!(d.state_of(me), ProcessState::Running);
        assert!(phases.contains_key(PHASE_RESTORE) && phases.contains_key(PHASE_UNLOCK));
        let missing = CudaProcessRecord { ns_pid: -5, ..rec };
        let errs = restore_processes(&d, Path::new("/proc"), &[missing], &[me], &[], &[], &mut phases).unwrap_err();
        assert!(errs[0].to_string().contains("namespace pid -5"), "{}", errs[0]);
        d.states.lock().unwrap().insert(me, ProcessState::Running);
        let errs = restore_processes(&d, Path::new("/proc"), &[record(1, me, vec![])], &[me], &[], &[], &mut phases)
            .unwrap_err();
        let text = errs[0].to_string();
        assert!(
            text.contains("CUDA_ERROR_ILLEGAL_STATE") && text.contains("the driver now says the process is running"),
            "{text}"
        );
    }

    #[test]
    fn each_restored_process_gets_the_pairs_of_its_gpus() {
        let pair = |o: &str, n: &str| GpuPair { old: o.into(), new: n.into() };
        let pairs = [pair("GPU-a", "GPU-c"), pair("GPU-b", "GPU-d")];
        assert_eq!(pairs_for(&pairs, &["GPU-A"]), [pair("GPU-a", "GPU-c")]);
        assert_eq!(pairs_for(&pairs, &[]), pairs, "no GPU by device node: the whole map");
        assert!(pairs_for(&[], &["GPU-a"]).is_empty());

        let d = Recorder::default();
        let me = std::process::id() as i32;
        d.states.lock().unwrap().insert(me, ProcessState::Checkpointed);
        let gpus = [
            GpuInfo { index: 0, model: "H100".into(), uuid: "GPU-a".into(), bus_id: "0".into(), minor: Some(0) },
            GpuInfo { index: 1, model: "H100".into(), uuid: "GPU-b".into(), bus_id: "1".into(), minor: Some(1) },
        ];
        let mut phases = BTreeMap::new();
        restore_processes(&d, Path::new("/proc"), &[record(1, me, vec![1])], &[me], &pairs, &gpus, &mut phases)
            .unwrap();
        assert_eq!(*d.pairs.lock().unwrap(), [(me, vec![pair("GPU-b", "GPU-d")])]);
    }
}
