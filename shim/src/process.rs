//! One container process (init or exec) and its explicit state machine.

use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use containerd_shim::api::Status;
use containerd_shim::protos::protobuf::well_known_types::timestamp::Timestamp;

use crate::error::{Error, Result};
use crate::io::{ProcessIo, StdioConfig};

/// Where a process is in its life. Transitions not listed in [`Status::can_become`] are refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProcessStatus {
    Created,
    Running,
    Paused,
    Stopped,
    Deleted,
}

impl ProcessStatus {
    fn can_become(self, to: ProcessStatus) -> bool {
        use ProcessStatus::*;
        matches!(
            (self, to),
            (Created, Running | Stopped | Deleted)
                | (Running, Paused | Stopped)
                | (Paused, Running | Stopped)
                | (Stopped, Deleted)
        )
    }

    pub fn to_proto(self) -> Status {
        match self {
            ProcessStatus::Created => Status::CREATED,
            ProcessStatus::Running => Status::RUNNING,
            ProcessStatus::Paused => Status::PAUSED,
            ProcessStatus::Stopped | ProcessStatus::Deleted => Status::STOPPED,
        }
    }
}

/// How a process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Exit {
    /// Exit code, 128+signal for a signalled process.
    pub code: u32,
    pub at: SystemTime,
}

impl Exit {
    pub fn timestamp(&self) -> Timestamp {
        Timestamp::from(self.at)
    }
}

#[derive(Debug, Clone, Copy)]
pub struct ProcessState {
    pub status: ProcessStatus,
    /// 0 until the runtime reported one.
    pub pid: u32,
    pub exit: Option<Exit>,
    /// A start RPC is between the runtime call and its TaskStart event: the
    /// exit must wait, so that containerd sees start before exit.
    pub starting: bool,
}

/// An init or exec process. Its state lock is only ever held briefly, never
/// across a runtime call, so exits are recorded while an RPC is running.
pub struct Process {
    /// The container id for init, the exec id for an exec.
    pub id: String,
    pub exec_id: Option<String>,
    pub stdio: StdioConfig,
    /// The OCI process of an exec (init's is in the bundle).
    pub spec: Option<oci_spec::runtime::Process>,
    state: Mutex<ProcessState>,
    changed: Condvar,
    io: Mutex<Option<ProcessIo>>,
}

impl Process {
    pub fn new(
        id: String,
        exec_id: Option<String>,
        stdio: StdioConfig,
        spec: Option<oci_spec::runtime::Process>,
    ) -> Self {
        Self {
            id,
            exec_id,
            stdio,
            spec,
            state: Mutex::new(ProcessState { status: ProcessStatus::Created, pid: 0, exit: None, starting: false }),
            changed: Condvar::new(),
            io: Mutex::new(None),
        }
    }

    fn lock(&self) -> MutexGuard<'_, ProcessState> {
        // A poisoned lock only means another thread panicked mid-update of
        // plain-old-data; the shim must keep serving, so take the data.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn state(&self) -> ProcessState {
        *self.lock()
    }

    pub fn pid(&self) -> u32 {
        self.lock().pid
    }

    pub fn set_pid(&self, pid: u32) {
        self.lock().pid = pid;
    }

    /// Moves to `to`, or explains why not.
    pub fn transition(&self, to: ProcessStatus) -> Result<()> {
        let mut s = self.lock();
        if !s.status.can_become(to) {
            return Err(Error::FailedPrecondition(format!(
                "process {}: invalid state transition: {:?} => {:?}",
                self.id, s.status, to
            )));
        }
        s.status = to;
        self.changed.notify_all();
        Ok(())
    }

    /// Checks that the process is in one of `allowed` (for requests that do not change state).
    pub fn require(&self, what: &str, allowed: &[ProcessStatus]) -> Result<ProcessState> {
        let s = self.state();
        if allowed.contains(&s.status) {
            Ok(s)
        } else if s.status == ProcessStatus::Stopped || s.status == ProcessStatus::Deleted {
            Err(Error::NotFound(format!("{what} {}: process already finished", self.id)))
        } else {
            Err(Error::FailedPrecondition(format!("{what} {}: process is {:?}", self.id, s.status)))
        }
    }

    /// Marks the start of a start RPC (the process must be Created).
    pub fn begin_start(&self) -> Result<()> {
        let mut s = self.lock();
        if s.status != ProcessStatus::Created || s.starting {
            return Err(Error::FailedPrecondition(format!("start {}: process is {:?}", self.id, s.status)));
        }
        s.starting = true;
        Ok(())
    }

    /// Ends a start RPC: Running on success (unless it already exited), and
    /// releases any exit waiting in [`wait_start_settled`](Self::wait_start_settled).
    pub fn end_start(&self, started: bool) {
        let mut s = self.lock();
        if started && s.status == ProcessStatus::Created {
            s.status = ProcessStatus::Running;
        }
        s.starting = false;
        self.changed.notify_all();
    }

    /// Waits (bounded) until no start RPC is in flight.
    pub fn wait_start_settled(&self, timeout: Duration) {
        let s = self.lock();
        let _ = self.changed.wait_timeout_while(s, timeout, |s| s.starting).unwrap_or_else(|p| p.into_inner());
    }

    /// Records the exit; returns false if it was already recorded.
    pub fn set_exited(&self, code: u32, at: SystemTime) -> bool {
        let mut s = self.lock();
        if s.exit.is_some() {
            return false;
        }
        s.exit = Some(Exit { code, at });
        if s.status != ProcessStatus::Deleted {
            s.status = ProcessStatus::Stopped;
        }
        self.changed.notify_all();
        true
    }

    /// Blocks until the process has exited.
    pub fn wait(&self) -> Exit {
        let mut s = self.lock();
        loop {
            if let Some(e) = s.exit {
                return e;
            }
            s = self.changed.wait(s).unwrap_or_else(|p| p.into_inner());
        }
    }

    /// Like [`wait`](Self::wait), bounded.
    pub fn wait_timeout(&self, timeout: Duration) -> Option<Exit> {
        let s = self.lock();
        let (s, _) =
            self.changed.wait_timeout_while(s, timeout, |s| s.exit.is_none()).unwrap_or_else(|p| p.into_inner());
        s.exit
    }

    pub fn set_io(&self, io: ProcessIo) {
        *self.io.lock().unwrap_or_else(|p| p.into_inner()) = Some(io);
    }

    /// Runs `f` on the process IO, if any.
    pub fn with_io<T>(&self, f: impl FnOnce(&ProcessIo) -> T) -> Option<T> {
        self.io.lock().unwrap_or_else(|p| p.into_inner()).as_ref().map(f)
    }

    /// Drops the IO (stops copiers, closes pipes).
    pub fn close_io(&self) {
        self.io.lock().unwrap_or_else(|p| p.into_inner()).take();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ProcessStatus::*;

    fn p() -> Process {
        Process::new("c1".into(), None, StdioConfig::default(), None)
    }

    #[test]
    fn legal_lifecycle() {
        let p = p();
        p.transition(Running).unwrap();
        p.transition(Paused).unwrap();
        p.transition(Running).unwrap();
        assert!(p.set_exited(137, SystemTime::now()));
        assert_eq!(p.state().status, Stopped);
        p.transition(Deleted).unwrap();
    }

    #[test]
    fn start_gate_orders_start_before_exit() {
        let p = std::sync::Arc::new(p());
        p.begin_start().unwrap();
        assert!(p.begin_start().is_err(), "a second start is refused");
        // The process exits before the start RPC finished.
        assert!(p.set_exited(0, SystemTime::now()));
        let exit_side = {
            let p = p.clone();
            std::thread::spawn(move || {
                p.wait_start_settled(Duration::from_secs(10));
                p.state().starting
            })
        };
        std::thread::sleep(Duration::from_millis(20));
        p.end_start(true);
        assert!(!exit_side.join().unwrap());
        assert_eq!(p.state().status, Stopped, "an exited process stays stopped");
    }

    #[test]
    fn illegal_transitions_are_failed_preconditions() {
        let p = p();
        let err = p.transition(Paused).unwrap_err();
        assert!(matches!(err, Error::FailedPrecondition(_)), "{err}");
        assert!(err.to_string().contains("Created => Paused"), "{err}");
        p.transition(Running).unwrap();
        assert!(p.transition(Deleted).is_err(), "a running process cannot be deleted");
        assert!(p.transition(Created).is_err());
    }

    #[test]
    fn exit_is_recorded_once_and_wakes_waiters() {
        let p = std::sync::Arc::new(p());
        p.transition(Running).unwrap();
        let waiter = {
            let p = p.clone();
            std::thread::spawn(move || p.wait())
        };
        assert!(p.wait_timeout(Duration::from_millis(10)).is_none());
        assert!(p.set_exited(7, SystemTime::now()));
        assert!(!p.set_exited(9, SystemTime::now()));
        assert_eq!(waiter.join().unwrap().code, 7);
        assert_eq!(p.require("kill", &[Running]).unwrap_err().code(), containerd_shim::protos::ttrpc::Code::NOT_FOUND);
    }
}
