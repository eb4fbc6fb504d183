//! The CUDA driver in a child process: [`RemoteDriver`] is a [`CudaDriver`] whose calls a short
//! helper process makes ([`serve_library`] on its stdin and stdout), one helper per checkpoint or
//! restore.
//!
//! Why not load `libcuda.so.1` into the caller: the shim lives as long as its pod. Once loaded
//! (and after `cuInit`) the proprietary driver stays mapped in it for good, with its threads and
//! memory, and a crash inside the driver would kill the shim and orphan the pod's containers.
//! NVIDIA's own `cuda-checkpoint` is a process per call for the same reasons; a helper per
//! operation keeps one `cuInit` per restore instead of one per call.
//!
//! The protocol is one JSON object per line: the helper first says whether the library loaded
//! ([`Hello`]), then answers each [`Request`] with one [`Reply`], and exits at end of input
//! (after the calls under way have answered). A request with an `id` ([`Tagged`]) is served in
//! a thread of its own and answered as [`Answer`] `{"id", "reply"}`, so that the checkpoints or
//! restores of several processes overlap in the driver; one without is answered in order.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Condvar, Mutex, PoisonError};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::driver::{CudaDriver, CudaError, GpuPair, ProcessState};
use super::libcuda::LibCuda;

/// `CUDA_ERROR_UNKNOWN`: the code reported when the helper, not the driver, failed a call.
const CUDA_ERROR_UNKNOWN: i32 = 999;

/// The helper's first line.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Hello {
    /// The library loaded and has the checkpoint API.
    Ready,
    /// It did not ([`super::LoadError`]'s text).
    LoadFailed(String),
}

/// One driver call.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "call", rename_all = "kebab-case")]
pub enum Request {
    DriverVersion,
    Lock {
        pid: i32,
        timeout_ms: u32,
    },
    Checkpoint {
        pid: i32,
    },
    Restore {
        pid: i32,
        /// GPU remapping (CUDA 13.0+); absent: onto the GPUs the process had.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        pairs: Vec<GpuPair>,
    },
    Unlock {
        pid: i32,
    },
    State {
        pid: i32,
    },
    RestoreThreadId {
        pid: i32,
    },
}

impl Request {
    /// The driver function the call maps to, as [`CudaError::call`] names it.
    pub fn function(&self) -> &'static str {
        match self {
            Request::DriverVersion => "cuDriverGetVersion",
            Request::Lock { .. } => "cuCheckpointProcessLock",
            Request::Checkpoint { .. } => "cuCheckpointProcessCheckpoint",
            Request::Restore { .. } => "cuCheckpointProcessRestore",
            Request::Unlock { .. } => "cuCheckpointProcessUnlock",
            Request::State { .. } => "cuCheckpointProcessGetState",
            Request::RestoreThreadId { .. } => "cuCheckpointProcessGetRestoreThreadId",
        }
    }

    fn pid(&self) -> i32 {
        match *self {
            Request::DriverVersion => 0,
            Request::Lock { pid, .. }
            | Request::Checkpoint { pid }
            | Request::Restore { pid, .. }
            | Request::Unlock { pid }
            | Request::State { pid }
            | Request::RestoreThreadId { pid } => pid,
        }
    }
}

/// The answer to one [`Request`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Reply {
    Done,
    Number(i32),
    State(ProcessState),
    /// The driver returned an error: its `CUresult` and name.
    Failed {
        code: i32,
        name: String,
    },
}

/// A request with an optional id: with one, it is served concurrently and answered as [`Answer`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Tagged {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<u64>,
    #[serde(flatten)]
    pub request: Request,
}

/// The answer to a [`Tagged`] request with an id.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Answer {
    pub id: u64,
    pub reply: Reply,
}

/// Answers `input`'s requests with `driver` until end of input, then waits for the calls under
/// way. Requests with an id run in threads of their own (answers in any order); others in order.
/// Lines that are not requests get a `Failed` reply naming the problem, so the caller is never
/// left waiting.
pub fn serve(driver: &dyn CudaDriver, input: impl BufRead, output: impl Write + Send) -> io::Result<()> {
    let output = Mutex::new(output);
    let out = &output;
    let write = |value: &dyn erased::Line| value.write_to(&mut *out.lock().unwrap_or_else(PoisonError::into_inner));
    std::thread::scope(|scope| {
        for line in input.lines() {
            let line = line?;
            if line.trim().is_empty() {
                continue;
            }
            match serde_json::from_str::<Tagged>(&line) {
                Ok(Tagged { id: Some(id), request }) => {
                    scope.spawn(move || {
                        let answer = Answer { id, reply: call(driver, request) };
                        // A caller that went away learns nothing more; the helper ends with its input.
                        let _ = write(&answer);
                    });
                }
                Ok(Tagged { id: None, request }) => write(&call(driver, request))?,
                Err(e) => {
                    write(&Reply::Failed { code: CUDA_ERROR_UNKNOWN, name: format!("bad request {line:?}: {e}") })?
                }
            }
        }
        Ok(())
    })
}

/// Writing any of the protocol's values as one line, through one `dyn` (the closure above).
mod erased {
    use super::*;

    pub trait Line {
        fn write_to(&self, output: &mut dyn Write) -> io::Result<()>;
    }

    impl<T: Serialize> Line for T {
        fn write_to(&self, mut output: &mut dyn Write) -> io::Result<()> {
            write_line(&mut output, self)
        }
    }
}

fn call(driver: &dyn CudaDriver, request: Request) -> Reply {
    let result = match request {
        Request::DriverVersion => driver.driver_version().map(Reply::Number),
        Request::Lock { pid, timeout_ms } => driver.lock(pid, timeout_ms).map(|()| Reply::Done),
        Request::Checkpoint { pid } => driver.checkpoint(pid).map(|()| Reply::Done),
        Request::Restore { pid, pairs } => driver.restore_onto(pid, &pairs).map(|()| Reply::Done),
        Request::Unlock { pid } => driver.unlock(pid).map(|()| Reply::Done),
        Request::State { pid } => driver.state(pid).map(Reply::State),
        Request::RestoreThreadId { pid } => driver.restore_thread_id(pid).map(Reply::Number),
    };
    result.unwrap_or_else(|e| Reply::Failed { code: e.code, name: e.name })
}

/// The helper's whole life: load `library`, say how that went, serve until end of input.
pub fn serve_library(library: &OsStr, input: impl BufRead, mut output: impl Write + Send) -> io::Result<()> {
    match LibCuda::load(library) {
        Ok(driver) => {
            write_line(&mut output, &Hello::Ready)?;
            serve(&driver, input, output)
        }
        Err(e) => write_line(&mut output, &Hello::LoadFailed(e.to_string())),
    }
}

fn write_line(output: &mut impl Write, value: &impl Serialize) -> io::Result<()> {
    let mut line = serde_json::to_vec(value).map_err(io::Error::other)?;
    line.push(b'\n');
    output.write_all(&line)?;
    output.flush()
}

/// Why a helper could not be used.
#[derive(Debug, thiserror::Error)]
pub enum HelperError {
    #[error("cannot start the CUDA driver helper: {0}")]
    Start(#[source] io::Error),
    /// The helper could not load the library (the text says why, as [`super::LoadError`] does).
    #[error("{0}")]
    Load(String),
    #[error("the CUDA driver helper did not answer: {0}")]
    Protocol(String),
}

/// The pipes to a helper, shared by concurrent calls: one writes at a time; whoever holds
/// `from` reads answers for everyone and files them under their ids.
struct Conn {
    to: Mutex<Box<dyn Write + Send>>,
    from: Mutex<BufReader<Box<dyn Read + Send>>>,
    shared: Mutex<Shared>,
    arrived: Condvar,
    next_id: AtomicU64,
}

#[derive(Default)]
struct Shared {
    /// Answers read for calls that have not picked them up yet.
    answers: HashMap<u64, Reply>,
    /// Set once the helper is unusable; every later call fails with it.
    broken: Option<String>,
}

impl Conn {
    fn lock(&self) -> std::sync::MutexGuard<'_, Shared> {
        self.shared.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn break_with(&self, why: String) {
        self.lock().broken.get_or_insert(why);
        self.arrived.notify_all();
    }

    /// Sends `request` with a fresh id and waits for its answer, reading for the others while
    /// no one else does.
    fn exchange(&self, request: &Request) -> Result<Reply, String> {
        if let Some(why) = &self.lock().broken {
            return Err(why.clone());
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let tagged = Tagged { id: Some(id), request: request.clone() };
        let sent = write_line(&mut *self.to.lock().unwrap_or_else(PoisonError::into_inner), &tagged);
        if let Err(e) = sent {
            let why = format!("cannot send {}: {e}", request.function());
            self.break_with(why.clone());
            return Err(why);
        }
        loop {
            {
                let mut shared = self.lock();
                if let Some(reply) = shared.answers.remove(&id) {
                    return Ok(reply);
                }
                if let Some(why) = &shared.broken {
                    return Err(why.clone());
                }
            }
            let Ok(mut from) = self.from.try_lock() else {
                // Another call reads; it wakes us when it filed an answer (or gives up reading).
                let shared = self.lock();
                if !shared.answers.contains_key(&id) && shared.broken.is_none() {
                    let _ = self.arrived.wait_timeout(shared, Duration::from_millis(20));
                }
                continue;
            };
            if let Some(reply) = self.lock().answers.remove(&id) {
                return Ok(reply);
            }
            let read = read_line::<Answer>(&mut *from);
            drop(from);
            match read {
                Ok(Answer { id: got, reply }) if got == id => {
                    self.arrived.notify_all(); // someone else takes over reading
                    return Ok(reply);
                }
                Ok(Answer { id: got, reply }) => {
                    self.lock().answers.insert(got, reply);
                    self.arrived.notify_all();
                }
                Err(why) => {
                    self.break_with(why.clone());
                    return Err(why);
                }
            }
        }
    }
}

/// A [`CudaDriver`] whose calls a helper process makes; calls from several threads overlap in
/// the helper. Dropping it closes the helper's input (it exits) and then runs the `finish` the
/// caller gave, which waits for the helper.
pub struct RemoteDriver {
    conn: Option<Conn>,
    finish: Mutex<Option<Box<dyn FnOnce() + Send>>>,
}

impl std::fmt::Debug for RemoteDriver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RemoteDriver").finish_non_exhaustive()
    }
}

impl RemoteDriver {
    /// Takes over a started helper's pipes and reads its [`Hello`]. `finish` runs once the pipes
    /// are closed, also when this fails.
    pub fn connect(
        to: Box<dyn Write + Send>,
        from: Box<dyn Read + Send>,
        finish: Box<dyn FnOnce() + Send>,
    ) -> Result<RemoteDriver, HelperError> {
        let mut from = BufReader::new(from);
        let hello = read_line::<Hello>(&mut from);
        let me = RemoteDriver {
            conn: Some(Conn {
                to: Mutex::new(to),
                from: Mutex::new(from),
                shared: Mutex::new(Shared::default()),
                arrived: Condvar::new(),
                next_id: AtomicU64::new(1),
            }),
            finish: Mutex::new(Some(finish)),
        };
        match hello {
            Ok(Hello::Ready) => Ok(me),
            Ok(Hello::LoadFailed(message)) => Err(HelperError::Load(message)),
            Err(e) => Err(HelperError::Protocol(e)),
        }
    }

    fn call(&self, request: &Request) -> Result<Reply, CudaError> {
        let Some(conn) = self.conn.as_ref() else { return Err(helper_failed(request, "closed")) };
        match conn.exchange(request) {
            Ok(Reply::Failed { code, name }) => {
                Err(CudaError { call: request.function(), pid: request.pid(), code, name })
            }
            Ok(reply) => Ok(reply),
            Err(why) => Err(helper_failed(request, &why)),
        }
    }

    fn unexpected(&self, request: &Request, reply: Reply) -> CudaError {
        let why = format!("unexpected answer {reply:?}");
        if let Some(conn) = self.conn.as_ref() {
            conn.break_with(why.clone());
        }
        helper_failed(request, &why)
    }

    fn done(&self, request: Request) -> Result<(), CudaError> {
        match self.call(&request)? {
            Reply::Done => Ok(()),
            other => Err(self.unexpected(&request, other)),
        }
    }

    fn number(&self, request: Request) -> Result<i32, CudaError> {
        match self.call(&request)? {
            Reply::Number(n) => Ok(n),
            other => Err(self.unexpected(&request, other)),
        }
    }
}

/// A call that failed because of the helper, not the driver.
fn helper_failed(request: &Request, why: &str) -> CudaError {
    CudaError {
        call: request.function(),
        pid: request.pid(),
        code: CUDA_ERROR_UNKNOWN,
        name: format!("CUDA driver helper: {why}"),
    }
}

/// One line of JSON; end of input or an unreadable line is an error that says so.
fn read_line<T: for<'de> Deserialize<'de>>(from: &mut impl BufRead) -> Result<T, String> {
    let mut line = String::new();
    match from.read_line(&mut line) {
        Ok(0) => Err("it exited".into()),
        Ok(_) => serde_json::from_str(&line).map_err(|e| format!("unreadable answer {:?}: {e}", line.trim_end())),
        Err(e) => Err(format!("cannot read its answer: {e}")),
    }
}

impl Drop for RemoteDriver {
    fn drop(&mut self) {
        // Closing its stdin ends the helper; only then is waiting for it bounded.
        drop(self.conn.take());
        if let Some(finish) = self.finish.get_mut().unwrap_or_else(PoisonError::into_inner).take() {
            finish();
        }
    }
}

impl CudaDriver for RemoteDriver {
    fn driver_version(&self) -> Result<i32, CudaError> {
        self.number(Request::DriverVersion)
    }

    fn lock(&self, pid: i32, timeout_ms: u32) -> Result<(), CudaError> {
        self.done(Request::Lock { pid, timeout_ms })
    }

    fn checkpoint(&self, pid: i32) -> Result<(), CudaError> {
        self.done(Request::Checkpoint { pid })
    }

    fn restore(&self, pid: i32) -> Result<(), CudaError> {
        self.done(Request::Restore { pid, pairs: Vec::new() })
    }

    fn restore_onto(&self, pid: i32, pairs: &[GpuPair]) -> Result<(), CudaError> {
        self.done(Request::Restore { pid, pairs: pairs.to_vec() })
    }

    fn unlock(&self, pid: i32) -> Result<(), CudaError> {
        self.done(Request::Unlock { pid })
    }

    fn state(&self, pid: i32) -> Result<ProcessState, CudaError> {
        let request = Request::State { pid };
        match self.call(&request)? {
            Reply::State(state) => Ok(state),
            other => Err(self.unexpected(&request, other)),
        }
    }

    fn restore_thread_id(&self, pid: i32) -> Result<i32, CudaError> {
        self.number(Request::RestoreThreadId { pid })
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::net::UnixStream;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    use std::thread;
    use std::time::Duration;

    use super::*;
    use crate::cuda::session::tests::Recorder;

    /// A helper served by a thread over a socket pair, with `driver` behind it.
    fn helper(driver: Arc<Recorder>, hello: Hello) -> (Result<RemoteDriver, HelperError>, Arc<AtomicBool>) {
        let (ours, theirs) = UnixStream::pair().unwrap();
        let server = thread::spawn(move || {
            let mut out = theirs.try_clone().unwrap();
            write_line(&mut out, &hello).unwrap();
            if hello == Hello::Ready {
                serve(driver.as_ref(), BufReader::new(theirs), out).unwrap();
            }
        });
        let finished = Arc::new(AtomicBool::new(false));
        let flag = finished.clone();
        let finish = Box::new(move || {
            server.join().unwrap();
            flag.store(true, Ordering::SeqCst);
        });
        let to = Box::new(ours.try_clone().unwrap());
        (RemoteDriver::connect(to, Box::new(ours), finish), finished)
    }

    #[test]
    fn every_call_goes_through_and_errors_keep_the_drivers_code_and_name() {
        let driver = Arc::new(Recorder::default());
        driver.fail.lock().unwrap().push(("checkpoint", 8));
        let (remote, finished) = helper(driver.clone(), Hello::Ready);
        let remote = remote.unwrap();
        assert_eq!(remote.driver_version().unwrap(), 12080);
        remote.lock(7, 500).unwrap();
        assert_eq!(remote.state(7).unwrap(), ProcessState::Locked);
        remote.checkpoint(7).unwrap();
        remote.restore(7).unwrap();
        remote.unlock(7).unwrap();
        assert_eq!(remote.state(7).unwrap(), ProcessState::Running);
        assert_eq!(remote.restore_thread_id(7).unwrap(), 7);

        remote.lock(8, 0).unwrap();
        let err = remote.checkpoint(8).unwrap_err();
        assert_eq!(
            err,
            CudaError { call: "cuCheckpointProcessCheckpoint", pid: 8, code: 999, name: "CUDA_ERROR_UNKNOWN".into() }
        );
        // An illegal transition is the driver's error, passed on unchanged.
        let err = remote.unlock(9).unwrap_err();
        assert_eq!(
            (err.call, err.pid, err.code, err.name.as_str()),
            ("cuCheckpointProcessUnlock", 9, 401, "CUDA_ERROR_ILLEGAL_STATE")
        );
        // The helper stays usable after a failed call.
        assert_eq!(remote.state(8).unwrap(), ProcessState::Locked);

        let calls: Vec<(String, i32)> = driver.calls.lock().unwrap().clone();
        let steps: Vec<&str> =
            calls.iter().filter(|c| c.1 == 7 && c.0 != "restore_tid").map(|c| c.0.as_str()).collect();
        assert_eq!(steps, ["lock", "checkpoint", "restore", "unlock"], "{calls:?}");
        assert!(!finished.load(Ordering::SeqCst));
        drop(remote);
        assert!(finished.load(Ordering::SeqCst), "dropping the driver ends and waits for the helper");
    }

    #[test]
    fn restore_pairs_reach_the_driver_and_old_requests_still_read() {
        let driver = Arc::new(Recorder::default());
        let (remote, _) = helper(driver.clone(), Hello::Ready);
        let remote = remote.unwrap();
        remote.lock(7, 0).unwrap();
        remote.checkpoint(7).unwrap();
        let pairs = vec![GpuPair { old: "GPU-a".into(), new: "GPU-b".into() }];
        remote.restore_onto(7, &pairs).unwrap();
        assert_eq!(*driver.pairs.lock().unwrap(), [(7, pairs)]);
        // A request without pairs (as an older shim sends it) is a plain restore.
        let r: Request = serde_json::from_str("{\"call\":\"restore\",\"pid\":3}").unwrap();
        assert_eq!(r, Request::Restore { pid: 3, pairs: vec![] });
        assert_eq!(serde_json::to_string(&r).unwrap(), "{\"call\":\"restore\",\"pid\":3}");
    }

    /// A driver whose checkpoint takes 200 ms and records when each began and ended.
    #[derive(Default)]
    struct Slow {
        spans: Mutex<Vec<(i32, std::time::Instant, std::time::Instant)>>,
    }

    impl CudaDriver for Slow {
        fn driver_version(&self) -> Result<i32, CudaError> {
            Ok(13000)
        }
        fn lock(&self, _: i32, _: u32) -> Result<(), CudaError> {
            Ok(())
        }
        fn checkpoint(&self, pid: i32) -> Result<(), CudaError> {
            let began = std::time::Instant::now();
            thread::sleep(Duration::from_millis(200));
            self.spans.lock().unwrap().push((pid, began, std::time::Instant::now()));
            if pid == 2 {
                return Err(CudaError { call: "cuCheckpointProcessCheckpoint", pid, code: 2, name: "oom".into() });
            }
            Ok(())
        }
        fn restore(&self, _: i32) -> Result<(), CudaError> {
            Ok(())
        }
        fn unlock(&self, _: i32) -> Result<(), CudaError> {
            Ok(())
        }
        fn state(&self, _: i32) -> Result<ProcessState, CudaError> {
            Ok(ProcessState::Running)
        }
        fn restore_thread_id(&self, pid: i32) -> Result<i32, CudaError> {
            Ok(pid)
        }
    }

    /// Calls from several threads overlap in the helper, and each gets its own answer.
    #[test]
    fn concurrent_calls_overlap_in_the_helper_and_get_their_own_answers() {
        let driver = Arc::new(Slow::default());
        let (ours, theirs) = UnixStream::pair().unwrap();
        let served = driver.clone();
        let server = thread::spawn(move || {
            let mut out = theirs.try_clone().unwrap();
            write_line(&mut out, &Hello::Ready).unwrap();
            serve(served.as_ref(), BufReader::new(theirs), out).unwrap();
        });
        let remote = RemoteDriver::connect(
            Box::new(ours.try_clone().unwrap()),
            Box::new(ours),
            Box::new(move || server.join().unwrap()),
        )
        .unwrap();
        let results: Vec<(i32, Result<(), CudaError>)> = thread::scope(|scope| {
            let handles: Vec<_> = (1..=4)
                .map(|pid| {
                    scope.spawn({
                        let r = &remote;
                        move || (pid, r.checkpoint(pid))
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        for (pid, r) in &results {
            match pid {
                2 => assert_eq!(r.as_ref().unwrap_err().pid, 2, "pid 2 gets its own failure"),
                _ => assert!(r.is_ok(), "pid {pid}: {r:?}"),
            }
        }
        let spans = driver.spans.lock().unwrap().clone();
        let first_end = spans.iter().map(|s| s.2).min().unwrap();
        assert_eq!(spans.len(), 4);
        assert!(spans.iter().all(|s| s.1 < first_end), "the calls did not overlap: {spans:?}");
        // Plain calls still work after concurrent ones.
        assert_eq!(remote.driver_version().unwrap(), 13000);
        drop(remote);
    }

    #[test]
    fn a_library_the_helper_cannot_load_is_a_load_error_with_its_reason() {
        let (remote, finished) = helper(
            Arc::new(Recorder::default()),
            Hello::LoadFailed("libcuda.so.1 has no cuCheckpointProcessLock".into()),
        );
        match remote {
            Err(HelperError::Load(m)) => assert!(m.contains("has no cuCheckpointProcessLock"), "{m}"),
            other => panic!("{other:?}"),
        }
        assert!(finished.load(Ordering::SeqCst), "the helper is waited for on failure too");
    }

    #[test]
    fn a_helper_that_dies_fails_this_and_every_later_call_with_the_reason() {
        let (ours, theirs) = UnixStream::pair().unwrap();
        let server = thread::spawn(move || {
            let mut out = theirs.try_clone().unwrap();
            write_line(&mut out, &Hello::Ready).unwrap();
            // Reads one request, then "crashes" without answering.
            let mut line = String::new();
            BufReader::new(theirs).read_line(&mut line).unwrap();
        });
        let remote =
            RemoteDriver::connect(Box::new(ours.try_clone().unwrap()), Box::new(ours), Box::new(|| ())).unwrap();
        let err = remote.lock(5, 0).unwrap_err();
        server.join().unwrap();
        assert_eq!((err.call, err.pid, err.code), ("cuCheckpointProcessLock", 5, 999));
        assert!(err.name.contains("it exited"), "{err}");
        let err = remote.unlock(5).unwrap_err();
        assert_eq!(err.call, "cuCheckpointProcessUnlock");
        assert!(err.name.contains("it exited"), "{err}");
    }

    #[test]
    fn a_helper_that_says_nothing_is_a_protocol_error() {
        let (ours, theirs) = UnixStream::pair().unwrap();
        drop(theirs);
        let err =
            RemoteDriver::connect(Box::new(ours.try_clone().unwrap()), Box::new(ours), Box::new(|| ())).unwrap_err();
        assert!(matches!(err, HelperError::Protocol(ref m) if m.contains("exited")), "{err}");
    }

    #[test]
    fn lines_that_are_not_requests_get_an_answer_naming_them() {
        let input = "{\"call\":\"lock\",\"pid\":3,\"timeout_ms\":0}\nnonsense\n\n{\"call\":\"fly\"}\n";
        let mut out = Vec::new();
        serve(&Recorder::default(), input.as_bytes(), &mut out).unwrap();
        let replies: Vec<Reply> =
            String::from_utf8(out).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
        assert_eq!(replies.len(), 3, "{replies:?}");
        assert_eq!(replies[0], Reply::Done);
        assert!(matches!(&replies[1], Reply::Failed { code: 999, name } if name.contains("nonsense")), "{replies:?}");
        assert!(matches!(&replies[2], Reply::Failed { code: 999, name } if name.contains("fly")), "{replies:?}");
    }

    #[test]
    fn a_library_that_does_not_load_is_reported_as_the_first_line() {
        let mut out = Vec::new();
        serve_library(OsStr::new("/nonexistent/libcuda.so.1"), "".as_bytes(), &mut out).unwrap();
        let hello: Hello = serde_json::from_slice(&out).unwrap();
        assert!(matches!(&hello, Hello::LoadFailed(m) if m.contains("/nonexistent/libcuda.so.1")), "{hello:?}");
    }
}
