//! One container process (init or exec) and its state machine: every state it can be in, and
//! the one table ([`ProcessStatus::next`]) that says what each request or outcome does to it.

use std::fmt;
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use containerd_shim::api::Status;
use containerd_shim::protos::protobuf::well_known_types::timestamp::Timestamp;

use crate::error::{Error, Result};
use crate::io::{ProcessIo, StdioConfig};
use crate::sync::{lock, unpoison};

/// Where a process is in its life. Transient states (`Starting`, `Pausing`, `Resuming`,
/// `Checkpointing`, `Deleting`) are held while the runtime call runs, with no lock held, so that
/// a concurrent request sees them and is refused instead of racing the call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProcessStatus {
    /// Init: the container's id is reserved and its runtime `create` runs. An exec: being added.
    Creating,
    /// Created and not started: init exists in the runtime; an exec is known but not run.
    Created,
    /// Init of a container created from a checkpoint: Start restores it instead of starting it.
    /// No process exists yet (pid 0).
    Restoring,
    /// A Start (or the restore it runs) is in flight.
    Starting,
    Running,
    Pausing,
    Paused,
    Resuming,
    /// A checkpoint of the container is in flight; `paused` is whether it was paused before.
    Checkpointing {
        paused: bool,
    },
    /// Exited (the exit is recorded); waits for Delete.
    Stopped,
    /// A Delete is in flight.
    Deleting,
    /// Deleted: gone from the container (kept only by requests still holding it).
    Deleted,
}

/// What a request or an outcome wants to do to a process; [`ProcessStatus::next`] answers.
/// Requests that leave the state as it is (Exec, Update, Kill, Stats) are checked too.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Create succeeded (`restore`: from a checkpoint, Start will restore).
    Created {
        restore: bool,
    },
    Start,
    Pause,
    Resume,
    Checkpoint,
    /// The transient state's runtime call succeeded.
    Done,
    /// The transient state's runtime call failed: back to where it came from.
    Failed,
    /// A Delete failed: back to the state it started from.
    DeleteFailed(ProcessStatus),
    /// The process exited.
    Exit,
    Delete,
    /// Start an exec in this (init) process's container.
    Exec,
    Update,
    /// Signal init through the runtime (`all`: every process of the container).
    Kill {
        all: bool,
    },
    /// Signal an exec directly (it needs a pid).
    Signal,
    Stats,
}

impl Action {
    /// The request's name, for messages.
    fn verb(self) -> &'static str {
        match self {
            Action::Created { .. } => "create",
            Action::Start => "start",
            Action::Pause => "pause",
            Action::Resume => "resume",
            Action::Checkpoint => "checkpoint",
            Action::Done | Action::Failed => "complete",
            Action::DeleteFailed(_) | Action::Delete => "delete",
            Action::Exit => "exit",
            Action::Exec => "exec",
            Action::Update => "update",
            Action::Kill { .. } | Action::Signal => "kill",
            Action::Stats => "stats",
        }
    }
}

impl fmt::Display for ProcessStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ProcessStatus::Checkpointing { .. } => f.write_str("Checkpointing"),
            other => fmt::Debug::fmt(other, f),
        }
    }
}

impl ProcessStatus {
    /// The transition table: the state `action` leads to from `self`, or `None` when the action
    /// is not allowed here. Actions that change nothing return `self`.
    pub fn next(self, action: Action) -> Option<ProcessStatus> {
        use Action as A;
        use ProcessStatus::*;
        let to = match (self, action) {
            (Creating, A::Created { restore: false }) => Created,
            (Creating, A::Created { restore: true }) => Restoring,
            (Created | Restoring, A::Start) => Starting,
            (Starting, A::Done) => Running,
            // A failed restore leaves no process: the container is only created (pid 0).
            (Starting, A::Failed) => Created,
            (Running, A::Pause) => Pausing,
            (Pausing, A::Done) | (Resuming, A::Failed) => Paused,
            (Paused, A::Resume) => Resuming,
            (Resuming, A::Done) | (Pausing, A::Failed) => Running,
            (Running, A::Checkpoint) => Checkpointing { paused: false },
            (Paused, A::Checkpoint) => Checkpointing { paused: true },
            (Checkpointing { paused }, A::Done | A::Failed) => {
                if paused {
                    Paused
                } else {
                    Running
                }
            }
            // An exit is a fact: every live state ends. The requests in flight then settle
            // on Stopped (see below); a process being deleted stays so.
            (
                Created | Restoring | Starting | Running | Pausing | Paused | Resuming | Checkpointing { .. },
                A::Exit,
            ) => Stopped,
            (Stopped | Deleting | Deleted, A::Exit) => self,
            (Stopped, A::Done | A::Failed) => Stopped,
            (Created | Restoring | Stopped, A::Delete) => Deleting,
            (Deleting, A::Done) => Deleted,
            (Deleting, A::DeleteFailed(back @ (Created | Restoring | Stopped))) => back,
            (Running, A::Exec) => Running,
            (Created | Restoring | Starting | Running | Paused, A::Update | A::Stats) => self,
            // Kill is always allowed while the process lives, a checkpoint included: an operator
            // must be able to stop a container whose checkpoint hangs.
            (
                Created | Restoring | Starting | Running | Pausing | Paused | Resuming | Checkpointing { .. },
                A::Kill { .. },
            ) => self,
            (Checkpointing { .. }, A::Stats) => self,
            // With `all`, the rest of the container's processes may outlive init.
            (Stopped, A::Kill { all: true }) => self,
            (Running | Paused, A::Signal) => self,
            _ => return None,
        };
        Some(to)
    }

    /// Whether a runtime call is in flight that an exit must wait for (see [`Process::wait_settled`]).
    pub fn is_transient(self) -> bool {
        matches!(
            self,
            ProcessStatus::Starting
                | ProcessStatus::Pausing
                | ProcessStatus::Resuming
                | ProcessStatus::Checkpointing { .. }
        )
    }

    /// containerd's view, which knows only CREATED, RUNNING, PAUSED and STOPPED here. A
    /// transient state shows as the state it left until its call completes.
    pub fn to_proto(self) -> Status {
        use ProcessStatus::*;
        match self {
            Creating | Created | Restoring | Starting => Status::CREATED,
            Running | Pausing | Checkpointing { paused: false } => Status::RUNNING,
            Paused | Resuming | Checkpointing { paused: true } => Status::PAUSED,
            Stopped | Deleting | Deleted => Status::STOPPED,
        }
    }

    /// Why `action` is refused in this state: the clearest message we have.
    fn refusal(self, action: Action, id: &str) -> Error {
        let verb = action.verb();
        match self {
            ProcessStatus::Stopped | ProcessStatus::Deleted => {
                Error::NotFound(format!("{verb} {id}: process already finished"))
            }
            // Only a process that has ended (or never started) is deleted. containerd's runc shim
            // answers a signal during its delete the same way, and CRI's StopContainer, racing the
            // delete that follows an exit, takes NotFound as "already stopped".
            ProcessStatus::Deleting if matches!(action, Action::Kill { .. } | Action::Signal) => {
                Error::NotFound(format!("{verb} {id}: process already finished"))
            }
            ProcessStatus::Checkpointing { .. } => Error::FailedPrecondition(format!(
                "{verb} {id}: a checkpoint of this container is running; retry when it has finished"
            )),
            from => Error::FailedPrecondition(format!(
                "{verb} {id}: invalid state transition: {from} => {}",
                Target(action)
            )),
        }
    }
}

/// Names what an action would lead to, for the refusal message.
struct Target(Action);

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name = match self.0 {
            Action::Created { restore: false } => "Created",
            Action::Created { restore: true } => "Restoring",
            Action::Start => "Starting",
            Action::Pause => "Pausing",
            Action::Resume => "Resuming",
            Action::Checkpoint => "Checkpointing",
            Action::Done | Action::Failed => "settled",
            Action::DeleteFailed(_) => "undeleted",
            Action::Exit => "Stopped",
            Action::Delete => "Deleting",
            Action::Exec => "exec",
            Action::Update => "update",
            Action::Kill { .. } | Action::Signal => "killed",
            Action::Stats => "stats",
        };
        f.write_str(name)
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
}

/// An init or exec process. Its state lock is only ever held briefly, never
/// across a runtime call, so exits are recorded while an RPC is running.
pub struct Process {
    /// The container id for init, the exec id for an exec.
    pub id: String,
    pub exec_id: Option<String>,
    pub stdio: StdioConfig,
    /// The OCI process of an exec, as the client's JSON (init's is in the bundle).
    pub spec: Option<serde_json::Value>,
    state: Mutex<ProcessState>,
    changed: Condvar,
    io: Mutex<Option<ProcessIo>>,
}

impl Process {
    /// A process in [`ProcessStatus::Creating`].
    pub fn new(id: String, exec_id: Option<String>, stdio: StdioConfig, spec: Option<serde_json::Value>) -> Self {
        Self {
            id,
            exec_id,
            stdio,
            spec,
            state: Mutex::new(ProcessState { status: ProcessStatus::Creating, pid: 0, exit: None }),
            changed: Condvar::new(),
            io: Mutex::new(None),
        }
    }

    fn lock(&self) -> MutexGuard<'_, ProcessState> {
        lock(&self.state)
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

    /// The one place the status changes: applies `action` if the table allows it and returns
    /// the state before, or explains the refusal (FailedPrecondition "invalid state transition",
    /// NotFound for a finished process, or the running checkpoint).
    pub fn transition(&self, action: Action) -> Result<ProcessState> {
        let mut s = self.lock();
        let before = *s;
        let to = s.status.next(action).ok_or_else(|| s.status.refusal(action, &self.id))?;
        if to != s.status {
            s.status = to;
            self.changed.notify_all();
        }
        Ok(before)
    }

    /// Ends a transient state (`ok`: its runtime call succeeded). Never refused: after an exit
    /// the process stays Stopped.
    pub fn settle(&self, ok: bool) {
        if let Err(e) = self.transition(if ok { Action::Done } else { Action::Failed }) {
            log::warn!("process {}: {e}", self.id);
        }
    }

    /// Waits (bounded) until no runtime call is in flight (see [`ProcessStatus::is_transient`]),
    /// so that an exit is published after the start, pause or checkpoint that preceded it.
    pub fn wait_settled(&self, timeout: Duration) {
        let s = self.lock();
        let _ = unpoison(self.changed.wait_timeout_while(s, timeout, |s| s.status.is_transient()));
    }

    /// Records the exit and moves to Stopped; returns false if it was already recorded.
    pub fn set_exited(&self, code: u32, at: SystemTime) -> bool {
        let mut s = self.lock();
        if s.exit.is_some() {
            return false;
        }
        s.exit = Some(Exit { code, at });
        if let Some(to) = s.status.next(Action::Exit) {
            s.status = to;
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
            s = unpoison(self.changed.wait(s));
        }
    }

    /// Like [`wait`](Self::wait), bounded.
    pub fn wait_timeout(&self, timeout: Duration) -> Option<Exit> {
        let s = self.lock();
        let (s, _) = unpoison(self.changed.wait_timeout_while(s, timeout, |s| s.exit.is_none()));
        s.exit
    }

    pub fn set_io(&self, io: ProcessIo) {
        *lock(&self.io) = Some(io);
    }

    /// Runs `f` on the process IO, if any.
    pub fn with_io<T>(&self, f: impl FnOnce(&ProcessIo) -> T) -> Option<T> {
        lock(&self.io).as_ref().map(f)
    }

    /// Drops the IO (stops copiers, closes pipes).
    pub fn close_io(&self) {
        lock(&self.io).take();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use containerd_shim::protos::ttrpc::Code;
    use Action as A;
    use ProcessStatus::*;

    fn p() -> Process {
        let p = Process::new("c1".into(), None, StdioConfig::default(), None);
        p.transition(A::Created { restore: false }).unwrap();
        p
    }

    fn status(p: &Process) -> ProcessStatus {
        p.state().status
    }

    #[test]
    fn legal_lifecycle() {
        let p = p();
        assert_eq!(p.transition(A::Start).unwrap().status, Created);
        p.settle(true);
        p.transition(A::Pause).unwrap();
        assert_eq!(status(&p), Pausing);
        p.settle(true);
        assert_eq!(status(&p), Paused);
        p.transition(A::Resume).unwrap();
        p.settle(false);
        assert_eq!(status(&p), Paused, "a failed resume stays paused");
        p.transition(A::Resume).unwrap();
        p.settle(true);
        assert!(p.set_exited(137, SystemTime::now()));
        assert_eq!(status(&p), Stopped);
        p.transition(A::Delete).unwrap();
        p.transition(A::Done).unwrap();
        assert_eq!(status(&p), Deleted);
    }

    #[test]
    fn a_failed_delete_can_be_retried() {
        let p = p();
        let before = p.transition(A::Delete).unwrap().status;
        assert!(p.transition(A::Delete).is_err(), "one delete at a time");
        p.transition(A::DeleteFailed(before)).unwrap();
        assert_eq!(status(&p), Created);
        p.transition(A::Delete).unwrap();
    }

    #[test]
    fn exit_during_start_waits_for_the_start_to_settle() {
        let p = std::sync::Arc::new(p());
        p.transition(A::Start).unwrap();
        assert!(p.transition(A::Start).is_err(), "a second start is refused");
        let exit_side = {
            let p = p.clone();
            std::thread::spawn(move || {
                p.wait_settled(Duration::from_secs(10));
                status(&p)
            })
        };
        std::thread::sleep(Duration::from_millis(20));
        p.settle(true);
        assert_eq!(exit_side.join().unwrap(), Running);
        assert!(p.set_exited(0, SystemTime::now()));
        assert_eq!(status(&p), Stopped);
        p.settle(true);
        assert_eq!(status(&p), Stopped, "a late settle leaves an exited process stopped");
    }

    #[test]
    fn checkpoint_returns_to_where_it_came_from_and_refuses_the_rest() {
        let p = p();
        p.transition(A::Start).unwrap();
        p.settle(true);
        p.transition(A::Pause).unwrap();
        p.settle(true);
        p.transition(A::Checkpoint).unwrap();
        assert_eq!(status(&p).to_proto(), Status::PAUSED, "containerd sees the state it left");
        for a in [A::Pause, A::Resume, A::Exec, A::Update, A::Checkpoint, A::Delete, A::Start] {
            let e = p.transition(a).unwrap_err();
            assert_eq!(e.code(), Code::FAILED_PRECONDITION, "{a:?}");
            assert!(e.to_string().contains("checkpoint of this container is running"), "{e}");
        }
        for a in [A::Kill { all: false }, A::Kill { all: true }, A::Stats] {
            p.transition(a).unwrap();
        }
        p.settle(false);
        assert_eq!(status(&p), Paused);
    }

    #[test]
    fn a_signal_during_the_delete_finds_the_process_finished() {
        let p = p();
        p.transition(A::Start).unwrap();
        p.settle(true);
        p.set_exited(0, SystemTime::now());
        p.transition(A::Delete).unwrap();
        for a in [A::Kill { all: false }, A::Kill { all: true }, A::Signal] {
            let e = p.transition(a).unwrap_err();
            assert_eq!(e.code(), Code::NOT_FOUND, "{a:?}: {e}");
            assert!(e.to_string().contains("process already finished"), "{e}");
        }
        assert_eq!(p.transition(A::Start).unwrap_err().code(), Code::FAILED_PRECONDITION);
    }

    #[test]
    fn illegal_transitions_are_failed_preconditions() {
        let p = p();
        let err = p.transition(A::Pause).unwrap_err();
        assert_eq!(err.code(), Code::FAILED_PRECONDITION, "{err}");
        assert!(err.to_string().contains("invalid state transition: Created => Pausing"), "{err}");
        p.transition(A::Start).unwrap();
        p.settle(true);
        assert!(p.transition(A::Delete).is_err(), "a running process cannot be deleted");
        assert!(p.transition(A::Created { restore: false }).is_err());
        p.set_exited(0, SystemTime::now());
        let err = p.transition(A::Signal).unwrap_err();
        assert_eq!(err.code(), Code::NOT_FOUND, "{err}");
        p.transition(A::Kill { all: true }).unwrap();
    }

    #[test]
    fn exit_is_recorded_once_and_wakes_waiters() {
        let p = std::sync::Arc::new(p());
        p.transition(A::Start).unwrap();
        p.settle(true);
        let waiter = {
            let p = p.clone();
            std::thread::spawn(move || p.wait())
        };
        assert!(p.wait_timeout(Duration::from_millis(10)).is_none());
        assert!(p.set_exited(7, SystemTime::now()));
        assert!(!p.set_exited(9, SystemTime::now()));
        assert_eq!(waiter.join().unwrap().code, 7);
    }

    #[test]
    fn every_state_maps_to_the_status_containerd_knows() {
        let want = [
            (Creating, Status::CREATED),
            (Created, Status::CREATED),
            (Restoring, Status::CREATED),
            (Starting, Status::CREATED),
            (Running, Status::RUNNING),
            (Pausing, Status::RUNNING),
            (Paused, Status::PAUSED),
            (Resuming, Status::PAUSED),
            (Checkpointing { paused: false }, Status::RUNNING),
            (Checkpointing { paused: true }, Status::PAUSED),
            (Stopped, Status::STOPPED),
            (Deleting, Status::STOPPED),
            (Deleted, Status::STOPPED),
        ];
        for (s, proto) in want {
            assert_eq!(s.to_proto(), proto, "{s:?}");
        }
    }
}
