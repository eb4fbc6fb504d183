//! The Task service in process, without containerd: a fake runtime behind the [`Spawner`] seam
//! (no runc, CRIU or container runs), a recording event publisher, and exits injected as the
//! reaper would report them. Every RPC and the state machine's transitions, the event-order
//! guarantees, and the behaviour of each RPC while a checkpoint runs.

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::process::Command;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use containerd_shim::api::{
    CheckpointTaskRequest, CreateTaskRequest, DeleteRequest, ExecProcessRequest, KillRequest, Options as RuncOptions,
    StartRequest, StateRequest, Status, UpdateTaskRequest,
};
use containerd_shim::protos::events::task::{TaskExit, TaskStart};
use containerd_shim::protos::protobuf::well_known_types::any::Any;
use containerd_shim::protos::protobuf::Message;
use containerd_shim::protos::ttrpc::Code;
use containerd_shim::ExitSignal;

use super::*;
use crate::container::RuntimeRecord;
use crate::events::RecordingPublisher;
use crate::runtime::{OciRuntime, RuntimeOpts};
use crate::spawn::{Capture, PipedChild, RunOutput};
use crate::sync::unpoison;

const NS: &str = "task-tests";
/// Above any kernel's `pid_max` (2^22): a signal to one of these pids can never hit a process.
const FIRST_FAKE_PID: u32 = 1 << 30;

/// What the fake runtime was asked to do, and what it is told to do next.
#[derive(Default)]
struct FakeState {
    /// Each invocation: the program's file name, then its arguments after the global flags.
    calls: Vec<Vec<String>>,
    next_pid: u32,
    /// The pid the next `create` reports instead of a fake one.
    next_create_pid: Option<u32>,
    /// Calls (`runc create`, `criu --version`) that block until released, and those blocked now.
    held: HashSet<String>,
    blocked: HashSet<String>,
    /// Calls that fail, with the error the runtime logs.
    fail: HashMap<String, String>,
    /// Container id → the pids it reported (for `ps`).
    pids: HashMap<String, Vec<u32>>,
}

/// A runtime (runc's CLI) and a CRIU that run nothing: they answer each call as runc would, write
/// pid files with pids no process has, and can be held or made to fail per call.
#[derive(Default)]
struct FakeRuntime {
    state: Mutex<FakeState>,
    changed: Condvar,
}

impl FakeRuntime {
    fn lock(&self) -> MutexGuard<'_, FakeState> {
        lock(&self.state)
    }

    /// Makes `call` (e.g. "runc create", "criu --version") block until [`release`](Self::release).
    fn hold(&self, call: &str) {
        self.lock().held.insert(call.into());
    }

    fn release(&self, call: &str) {
        self.lock().held.remove(call);
        self.changed.notify_all();
    }

    /// Waits until a held `call` is blocked in the fake.
    fn wait_blocked(&self, call: &str) {
        let s = self.lock();
        let waited = self.changed.wait_timeout_while(s, Duration::from_secs(10), |s| !s.blocked.contains(call));
        let (s, timeout) = unpoison(waited);
        assert!(!timeout.timed_out(), "{call} never ran; calls: {:?}", s.calls);
    }

    fn fail(&self, call: &str, message: &str) {
        self.lock().fail.insert(call.into(), message.into());
    }

    fn calls(&self) -> Vec<String> {
        self.lock().calls.iter().map(|c| c.join(" ")).collect()
    }

    fn count(&self, prefix: &str) -> usize {
        self.calls().iter().filter(|c| c.starts_with(prefix)).count()
    }
}

impl Spawner for FakeRuntime {
    fn run(&self, cmd: Command, _stdin: Option<&[u8]>, _capture: Capture) -> std::io::Result<RunOutput> {
        let program = PathBuf::from(cmd.get_program()).file_name().unwrap_or_default().to_string_lossy().into_owned();
        let args: Vec<String> = cmd.get_args().map(|a| a.to_string_lossy().into_owned()).collect();
        let flag = |name: &str| args.iter().position(|a| a == name).and_then(|i| args.get(i + 1)).cloned();
        // Past the global flags: the subcommand, its flags, the id last.
        let mut rest = args.as_slice();
        while let [first, tail @ ..] = rest {
            match first.as_str() {
                "--root" | "--log" | "--log-format" | "--criu" => rest = tail.get(1..).unwrap_or_default(),
                f if f.starts_with("--") && program == "runc" => rest = tail,
                _ => break,
            }
        }
        let sub = rest.first().cloned().unwrap_or_default();
        let call = format!("{program} {sub}");
        let id = rest.last().cloned().unwrap_or_default();
        let mut s = self.lock();
        s.calls.push(std::iter::once(program.clone()).chain(rest.iter().cloned()).collect());
        if s.held.contains(&call) {
            s.blocked.insert(call.clone());
            self.changed.notify_all();
            s = unpoison(self.changed.wait_while(s, |s| s.held.contains(&call)));
            s.blocked.remove(&call);
        }
        if let Some(message) = s.fail.get(&call).cloned() {
            if let Some(log) = flag("--log") {
                let line = serde_json::json!({"level": "error", "msg": message, "time": "2024-01-01T00:00:00Z"});
                let mut text = std::fs::read_to_string(&log).unwrap_or_default();
                text.push_str(&format!("{line}\n"));
                std::fs::write(&log, text)?;
            }
            return Ok(RunOutput { code: 1, stdout: vec![], stderr: message.into_bytes() });
        }
        let mut stdout = Vec::new();
        match call.as_str() {
            "runc create" | "runc restore" | "runc exec" => {
                let pid = match s.next_create_pid.take().filter(|_| sub == "create") {
                    Some(pid) => pid,
                    None => {
                        s.next_pid += 1;
                        FIRST_FAKE_PID + s.next_pid
                    }
                };
                s.pids.entry(id).or_default().push(pid);
                if let Some(file) = flag("--pid-file") {
                    std::fs::write(file, pid.to_string())?;
                }
            }
            "runc ps" => stdout = serde_json::to_vec(&s.pids.get(&id).cloned().unwrap_or_default())?,
            "runc state" => {
                let pid = s.pids.get(&id).and_then(|p| p.first()).copied().unwrap_or_default();
                stdout = serde_json::to_vec(&serde_json::json!({"id": id, "pid": pid, "status": "running"}))?;
            }
            "criu --version" => stdout = b"Version: 4.2.1\n".to_vec(),
            _ => {}
        }
        Ok(RunOutput { code: 0, stdout, stderr: vec![] })
    }

    fn start_piped(&self, _cmd: Command) -> std::io::Result<PipedChild> {
        Err(std::io::Error::other("the fake runtime starts no helper"))
    }
}

/// One Task service over the fakes, with its bundles in a temporary directory.
struct Harness {
    svc: TaskService,
    rt: Arc<FakeRuntime>,
    published: Arc<RecordingPublisher>,
    dir: tempfile::TempDir,
}

impl Harness {
    fn new() -> Harness {
        let dir = tempfile::tempdir().unwrap();
        for bin in ["runc", "criu"] {
            // Found and checked for being executable; never run.
            let path = dir.path().join(bin);
            std::fs::write(&path, "#!/bin/sh\nexit 99\n").unwrap();
            std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
        }
        let rt = Arc::new(FakeRuntime::default());
        let published = Arc::new(RecordingPublisher::new());
        let events = EventQueue::start(published.clone(), NS.into());
        let svc = TaskService::new(NS.into(), events, rt.clone(), Arc::new(ExitSignal::default()), None);
        Harness { svc, rt, published, dir }
    }

    fn inner(&self) -> &Arc<Inner> {
        &self.svc.inner
    }

    /// A bundle with a spec that has its own PID namespace (no kill-all at init's exit).
    fn bundle(&self, id: &str) -> PathBuf {
        let bundle = self.dir.path().join("bundles").join(id);
        std::fs::create_dir_all(&bundle).unwrap();
        let spec = serde_json::json!({
            "ociVersion": "1.0.2",
            "process": {"args": ["sleep", "inf"], "cwd": "/"},
            "root": {"path": "rootfs"},
            "linux": {"namespaces": [{"type": "pid"}, {"type": "mount"}]}
        });
        std::fs::write(bundle.join("config.json"), spec.to_string()).unwrap();
        bundle
    }

    /// runc options naming the fake runtime and CRIU (`CriuPath` is field 8, gone from the protos).
    fn options(&self) -> Any {
        let o = RuncOptions {
            binary_name: self.dir.path().join("runc").display().to_string(),
            root: self.dir.path().join("root").display().to_string(),
            ..Default::default()
        };
        let mut value = o.write_to_bytes().unwrap();
        let criu = self.dir.path().join("criu").display().to_string();
        value.push((8 << 3) | 2);
        value.push(criu.len() as u8);
        value.extend_from_slice(criu.as_bytes());
        Any { type_url: crate::options::RUNC_OPTIONS.into(), value, ..Default::default() }
    }

    fn create_req(&self, id: &str) -> CreateTaskRequest {
        CreateTaskRequest {
            id: id.into(),
            bundle: self.bundle(id).display().to_string(),
            options: Some(self.options()).into(),
            ..Default::default()
        }
    }

    fn create(&self, id: &str) -> u32 {
        self.inner().create(&self.create_req(id)).unwrap()
    }

    fn start(&self, id: &str, exec_id: &str) -> Result<u32> {
        self.inner().start(&StartRequest { id: id.into(), exec_id: exec_id.into(), ..Default::default() })
    }

    fn running(&self, id: &str) -> u32 {
        self.create(id);
        self.start(id, "").unwrap()
    }

    fn exec(&self, id: &str, exec_id: &str) -> Result<()> {
        let spec = serde_json::json!({"args": ["true"], "cwd": "/"});
        let any = Any {
            type_url: "types.containerd.io/opencontainers/runtime-spec/1/Process".into(),
            value: spec.to_string().into_bytes(),
            ..Default::default()
        };
        self.inner().exec(&ExecProcessRequest {
            id: id.into(),
            exec_id: exec_id.into(),
            spec: Some(any).into(),
            ..Default::default()
        })
    }

    fn kill(&self, id: &str, exec_id: &str, signal: u32) -> Result<()> {
        self.inner().kill(&KillRequest { id: id.into(), exec_id: exec_id.into(), signal, ..Default::default() })
    }

    fn delete(&self, id: &str, exec_id: &str) -> Result<api::DeleteResponse> {
        self.inner().delete(&DeleteRequest { id: id.into(), exec_id: exec_id.into(), ..Default::default() })
    }

    fn state(&self, id: &str, exec_id: &str) -> StateResponse {
        self.inner().state(&StateRequest { id: id.into(), exec_id: exec_id.into(), ..Default::default() }).unwrap()
    }

    fn status(&self, id: &str, exec_id: &str) -> Status {
        self.state(id, exec_id).status.enum_value_or_default()
    }

    fn internal(&self, id: &str) -> ProcessStatus {
        self.inner().container(id).unwrap().init.state().status
    }

    /// The reaper saw `pid` exit.
    fn exit(&self, pid: u32, code: u32) {
        self.inner().on_exit(pid, code);
    }

    /// Waits until the process has exited and its TaskExit was published.
    fn wait_exit(&self, id: &str, exec_id: &str) {
        let (_, p) = self.inner().process(id, exec_id).unwrap();
        assert!(p.wait_timeout(Duration::from_secs(10)).is_some(), "{id}/{exec_id} never exited");
        // The exit is recorded and published under one lock.
        drop(lock(&self.inner().exit_order));
    }

    /// Topics published so far, with the ids they concern.
    fn events(&self) -> Vec<String> {
        self.inner().events.flush(Duration::from_secs(5)).unwrap();
        self.published
            .events()
            .iter()
            .map(|e| {
                let v = &e.event.value;
                match e.event.topic.as_str() {
                    "/tasks/exit" => format!("exit {}", TaskExit::parse_from_bytes(v).unwrap().id),
                    "/tasks/start" => format!("start {}", TaskStart::parse_from_bytes(v).unwrap().container_id),
                    t => t.trim_start_matches("/tasks/").to_string(),
                }
            })
            .collect()
    }

    fn checkpoint_req(&self, id: &str) -> CheckpointTaskRequest {
        CheckpointTaskRequest {
            id: id.into(),
            path: self.dir.path().join("ckpt").display().to_string(),
            ..Default::default()
        }
    }
}

fn code<T>(r: Result<T>) -> (Code, String) {
    let e = r.err().expect("refused");
    (e.code(), e.to_string())
}

/// Runs `f` on another thread; the handle gives its result.
fn spawn<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> std::thread::JoinHandle<T> {
    std::thread::spawn(f)
}

#[test]
fn full_lifecycle_through_every_rpc() {
    let h = Harness::new();
    let pid = h.create("c1");
    assert!(pid > FIRST_FAKE_PID);
    assert_eq!(h.status("c1", ""), Status::CREATED);
    assert_eq!(h.state("c1", "").pid, pid);
    assert_eq!(h.start("c1", "").unwrap(), pid);
    assert_eq!(h.status("c1", ""), Status::RUNNING);
    assert_eq!(code(h.start("c1", "")).0, Code::FAILED_PRECONDITION, "a second start");

    h.inner().pause("c1", true).unwrap();
    assert_eq!(h.status("c1", ""), Status::PAUSED);
    assert_eq!(code(h.inner().pause("c1", true)).0, Code::FAILED_PRECONDITION);
    assert_eq!(code(h.exec("c1", "e0")).0, Code::FAILED_PRECONDITION, "no exec in a paused container");
    h.inner().pause("c1", false).unwrap();
    assert_eq!(h.status("c1", ""), Status::RUNNING);

    let resources = Any { value: br#"{"cpu":{"shares":512}}"#.to_vec(), ..Default::default() };
    h.inner()
        .update(&UpdateTaskRequest { id: "c1".into(), resources: Some(resources).into(), ..Default::default() })
        .unwrap();
    assert_eq!(h.inner().pids("c1").unwrap().processes.len(), 1);

    h.exec("c1", "e1").unwrap();
    assert_eq!(code(h.exec("c1", "e1")).0, Code::ALREADY_EXISTS);
    assert_eq!(h.status("c1", "e1"), Status::CREATED);
    let epid = h.start("c1", "e1").unwrap();
    assert_eq!(h.status("c1", "e1"), Status::RUNNING);
    let pids = h.inner().pids("c1").unwrap();
    assert_eq!(pids.processes.len(), 2);
    assert!(pids.processes.iter().any(|p| p.pid == epid && p.info.is_some()), "the exec is named");
    // The exec's pid is no process: the signal finds none.
    assert_eq!(code(h.kill("c1", "e1", 15)).0, Code::NOT_FOUND);
    h.exit(epid, 143);
    h.wait_exit("c1", "e1");
    assert_eq!(h.status("c1", "e1"), Status::STOPPED);
    assert_eq!(code(h.kill("c1", "e1", 15)).0, Code::NOT_FOUND, "a finished exec");
    assert_eq!(h.delete("c1", "e1").unwrap().exit_status, 143);
    assert_eq!(code(h.inner().process("c1", "e1")).0, Code::NOT_FOUND);

    assert_eq!(code(h.delete("c1", "")).0, Code::FAILED_PRECONDITION, "a running init");
    h.kill("c1", "", 9).unwrap();
    h.exit(pid, 137);
    h.wait_exit("c1", "");
    assert_eq!(h.status("c1", ""), Status::STOPPED);
    assert_eq!(code(h.inner().pause("c1", true)).0, Code::NOT_FOUND, "a finished process");
    let deleted = h.delete("c1", "").unwrap();
    assert_eq!((deleted.pid, deleted.exit_status), (pid, 137));
    assert_eq!(code(h.inner().container("c1")).0, Code::NOT_FOUND);

    assert_eq!(
        h.events(),
        ["create", "start c1", "paused", "resumed", "exec-added", "exec-started", "exit e1", "exit c1", "delete"]
    );
    let calls = h.rt.calls();
    for want in [
        "runc create",
        "runc start c1",
        "runc pause c1",
        "runc resume c1",
        "runc update",
        "runc exec",
        "runc kill c1 9",
        "runc delete c1",
    ] {
        assert!(calls.iter().any(|c| c.starts_with(want)), "no {want:?} in {calls:?}");
    }
}

#[test]
fn a_second_create_of_an_id_in_flight_is_refused_and_touches_nothing() {
    let h = Arc::new(Harness::new());
    h.rt.hold("runc create");
    let first = {
        let h = h.clone();
        spawn(move || h.inner().create(&h.create_req("c1")))
    };
    h.rt.wait_blocked("runc create");
    let (tx, rx) = std::sync::mpsc::channel();
    {
        let h = h.clone();
        spawn(move || tx.send(h.inner().create(&h.create_req("c1")).map_err(|e| (e.code(), e.to_string()))));
    }
    // A second create that went on to the runtime would block there: fail, do not hang.
    let second = rx.recv_timeout(Duration::from_secs(5));
    if second.is_err() {
        h.rt.release("runc create");
        panic!("the second create did not return at once");
    }
    let (c, msg) = second.unwrap().expect_err("refused");
    assert_eq!(c, Code::ALREADY_EXISTS, "{msg}");
    let (c, msg) = code(h.inner().state(&StateRequest { id: "c1".into(), ..Default::default() }));
    assert_eq!(c, Code::FAILED_PRECONDITION, "{msg}");
    assert!(msg.contains("create is still running"), "{msg}");
    h.rt.release("runc create");
    first.join().unwrap().unwrap();
    assert_eq!(h.rt.count("runc create"), 1);
    assert_eq!(h.rt.count("runc delete"), 0, "the refused create deleted nothing: {:?}", h.rt.calls());
    assert_eq!(h.status("c1", ""), Status::CREATED);
    assert_eq!(h.events(), ["create"]);
}

#[test]
fn a_failed_create_frees_its_id_and_cleans_up_only_its_own_state() {
    let h = Harness::new();
    h.rt.fail("runc create", "container_linux.go: no such file: /bin/nope");
    let (c, msg) = code(h.inner().create(&h.create_req("c1")));
    assert!(msg.contains("/bin/nope"), "runc's message reaches the client: {c:?} {msg}");
    assert_eq!(h.rt.count("runc delete --force c1"), 1, "{:?}", h.rt.calls());
    assert_eq!(code(h.inner().container("c1")).0, Code::NOT_FOUND);
    h.rt.lock().fail.clear();
    h.create("c1");
    assert_eq!(h.events(), ["create"]);
}

#[test]
fn task_start_comes_before_the_exit_of_a_process_that_dies_at_once() {
    let h = Arc::new(Harness::new());
    let pid = h.create("c1");
    h.rt.hold("runc start");
    let start = {
        let h = h.clone();
        spawn(move || h.start("c1", ""))
    };
    h.rt.wait_blocked("runc start");
    assert_eq!(h.internal("c1"), ProcessStatus::Starting);
    h.exit(pid, 1);
    std::thread::sleep(Duration::from_millis(100));
    assert!(h.events().iter().all(|e| !e.starts_with("exit")), "the exit waits for the start");
    h.rt.release("runc start");
    start.join().unwrap().unwrap();
    h.wait_exit("c1", "");
    assert_eq!(h.events(), ["create", "start c1", "exit c1"]);
    assert_eq!(h.status("c1", ""), Status::STOPPED);
}

#[test]
fn exec_exits_come_before_inits_exit_and_task_delete_after_it() {
    let h = Harness::new();
    let pid = h.running("c1");
    h.exec("c1", "e1").unwrap();
    let epid = h.start("c1", "e1").unwrap();
    // Init dies first (the PID namespace goes with it); the reaper may see the exec later.
    h.exit(pid, 137);
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(h.status("c1", ""), Status::RUNNING, "init waits for its execs");
    h.exit(epid, 137);
    h.wait_exit("c1", "");
    h.delete("c1", "").unwrap();
    assert_eq!(h.events(), ["create", "start c1", "exec-added", "exec-started", "exit e1", "exit c1", "delete"]);
}

#[test]
fn an_exit_that_arrives_before_its_pid_is_known_is_kept() {
    let h = Harness::new();
    // The next pids the fake hands out: init's at create, then the exec's.
    let next = h.rt.lock().next_pid;
    h.exit(FIRST_FAKE_PID + next + 1, 3);
    h.exit(FIRST_FAKE_PID + next + 2, 4);
    let pid = h.create("c1");
    assert_eq!(pid, FIRST_FAKE_PID + next + 1);
    h.wait_exit("c1", "");
    assert_eq!(h.state("c1", "").exit_status, 3);
    assert_eq!(h.events(), ["create", "exit c1"], "TaskCreate first");

    let h = Harness::new();
    h.running("c2");
    let next = h.rt.lock().next_pid;
    h.exit(FIRST_FAKE_PID + next + 1, 4);
    h.exec("c2", "e1").unwrap();
    h.start("c2", "e1").unwrap();
    h.wait_exit("c2", "e1");
    assert_eq!(h.state("c2", "e1").exit_status, 4);
    assert_eq!(h.events(), ["create", "start c2", "exec-added", "exec-started", "exit e1"]);
}

#[test]
fn every_rpc_while_a_checkpoint_runs() {
    let h = Arc::new(Harness::new());
    // A real pid for init, so that Stats has a process to read.
    h.rt.lock().next_create_pid = Some(std::process::id());
    let pid = h.running("c1");
    h.exec("c1", "e1").unwrap();
    h.rt.hold("criu --version");
    let checkpoint = {
        let h = h.clone();
        spawn(move || h.inner().checkpoint(&h.checkpoint_req("c1")))
    };
    h.rt.wait_blocked("criu --version");
    assert_eq!(h.internal("c1"), ProcessStatus::Checkpointing { paused: false });

    // Answered.
    assert_eq!(h.status("c1", ""), Status::RUNNING);
    assert_eq!(h.inner().pids("c1").unwrap().processes.len(), 1);
    if let Err(e) = h.inner().stats("c1") {
        panic!("stats: {e}");
    }
    // Refused, naming the checkpoint.
    let resources = Any { value: b"{}".to_vec(), ..Default::default() };
    let refused = [
        ("pause", code(h.inner().pause("c1", true))),
        ("resume", code(h.inner().pause("c1", false))),
        (
            "update",
            code(h.inner().update(&UpdateTaskRequest {
                id: "c1".into(),
                resources: Some(resources).into(),
                ..Default::default()
            })),
        ),
        ("exec", code(h.exec("c1", "e2"))),
        ("exec start", code(h.start("c1", "e1"))),
        ("delete", code(h.delete("c1", ""))),
    ];
    for (what, (c, msg)) in refused {
        assert_eq!(c, Code::FAILED_PRECONDITION, "{what}: {msg}");
        assert!(msg.contains("a checkpoint of this container is running"), "{what}: {msg}");
    }
    let (c, msg) = code(h.inner().checkpoint(&h.checkpoint_req("c1")));
    assert_eq!(c, Code::FAILED_PRECONDITION, "{msg}");
    assert!(msg.contains("already running"), "{msg}");

    // Kill is delivered; the exit is published once the checkpoint has given up.
    h.kill("c1", "", 9).unwrap();
    assert_eq!(h.rt.count("runc kill c1 9"), 1);
    h.exit(pid, 137);
    std::thread::sleep(Duration::from_millis(100));
    assert!(h.events().iter().all(|e| !e.starts_with("exit")), "the exit waits for the checkpoint");
    h.rt.fail("criu --version", "criu: killed");
    h.rt.release("criu --version");
    assert!(checkpoint.join().unwrap().is_err(), "the checkpoint of a killed container fails");
    h.wait_exit("c1", "");
    assert_eq!(h.status("c1", ""), Status::STOPPED);
    h.delete("c1", "").unwrap();
    assert_eq!(h.events(), ["create", "start c1", "exec-added", "exit c1", "delete"]);
}

#[test]
fn a_checkpoint_that_fails_leaves_the_container_as_it_was() {
    let h = Harness::new();
    h.running("c1");
    h.inner().pause("c1", true).unwrap();
    h.rt.fail("criu --version", "no criu");
    assert!(h.inner().checkpoint(&h.checkpoint_req("c1")).is_err());
    assert_eq!(h.internal("c1"), ProcessStatus::Paused);
    h.inner().pause("c1", false).unwrap();
    assert!(h.inner().checkpoint(&h.checkpoint_req("c1")).is_err());
    assert_eq!(h.internal("c1"), ProcessStatus::Running);
    // A checkpoint needs a live process.
    let h = Harness::new();
    h.create("c2");
    assert_eq!(code(h.inner().checkpoint(&h.checkpoint_req("c2"))).0, Code::FAILED_PRECONDITION);
}

/// A container created from a checkpoint, as Create leaves it (the plan's checks are the
/// checkpoint module's, tested with real CRIU images in the e2e suites).
fn restoring(h: &Harness, id: &str) -> Arc<Container> {
    let bundle = h.bundle(id);
    let record = RuntimeRecord {
        binary: h.dir.path().join("runc"),
        root: h.dir.path().join("root"),
        systemd_cgroup: false,
        source: "options".into(),
        gpu: false,
        evidence: vec![],
    };
    let runtime = OciRuntime::new(
        RuntimeOpts {
            binary: record.binary.clone(),
            root: record.root.clone(),
            systemd_cgroup: false,
            criu: Some(h.dir.path().join("criu")),
            criu_env: vec![],
        },
        h.rt.clone(),
    );
    let init = Arc::new(Process::new(id.into(), None, StdioConfig::default(), None));
    init.transition(Action::Created { restore: true }).unwrap();
    let c = Arc::new(Container::new(id.into(), bundle, runtime, record, init, false));
    let images = h.dir.path().join("images");
    c.set_restore(RestorePlan {
        dir: images.clone(),
        images,
        flags: Default::default(),
        manifest: None,
        clock: Default::default(),
        pages: None,
    });
    lock(&h.inner().containers).insert(id.into(), Slot::Ready(c.clone()));
    c
}

#[test]
fn kill_of_a_container_whose_restore_is_pending_ends_it_without_a_runtime_call() {
    let h = Harness::new();
    restoring(&h, "r1");
    assert_eq!(h.internal("r1"), ProcessStatus::Restoring);
    assert_eq!(h.status("r1", ""), Status::CREATED);
    h.kill("r1", "", 15).unwrap();
    h.wait_exit("r1", "");
    assert_eq!((h.status("r1", ""), h.state("r1", "").exit_status), (Status::STOPPED, 143));
    assert_eq!(code(h.start("r1", "")).0, Code::NOT_FOUND, "a stopped container does not start");
    assert_eq!(h.delete("r1", "").unwrap().exit_status, 143);
    assert_eq!(h.rt.count("runc kill"), 0);
    assert_eq!(h.rt.count("runc restore"), 0);
    assert_eq!(h.events(), ["exit r1", "delete"]);
}

#[test]
fn kill_during_a_running_restore_waits_for_its_pid() {
    let h = Arc::new(Harness::new());
    restoring(&h, "r1");
    h.rt.hold("runc restore");
    let start = {
        let h = h.clone();
        spawn(move || h.start("r1", ""))
    };
    h.rt.wait_blocked("runc restore");
    assert_eq!(h.internal("r1"), ProcessStatus::Starting);
    let kill = {
        let h = h.clone();
        spawn(move || h.kill("r1", "", 9))
    };
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(h.rt.count("runc kill"), 0, "the kill waits for the restore");
    let released = Instant::now();
    h.rt.release("runc restore");
    let pid = start.join().unwrap().unwrap();
    kill.join().unwrap().unwrap();
    assert!(released.elapsed() < Duration::from_secs(5));
    assert_eq!(h.rt.count("runc kill r1 9"), 1, "{:?}", h.rt.calls());
    assert_eq!(h.status("r1", ""), Status::RUNNING);
    h.exit(pid, 137);
    h.wait_exit("r1", "");
    assert_eq!(h.events(), ["start r1", "exit r1"]);
}

#[test]
fn a_failed_restore_leaves_a_created_container_that_kill_ends() {
    let h = Harness::new();
    restoring(&h, "r1");
    h.rt.fail("runc restore", "criu failed: type RESTORE errno 0");
    let (_, msg) = code(h.start("r1", ""));
    assert!(msg.contains("restore"), "{msg}");
    assert_eq!(h.internal("r1"), ProcessStatus::Created);
    assert_eq!(h.rt.count("runc delete --force r1"), 1, "the half-restored state is removed");
    h.kill("r1", "", 9).unwrap();
    h.wait_exit("r1", "");
    h.delete("r1", "").unwrap();
    assert_eq!(h.events(), ["exit r1", "delete"]);
}

#[test]
fn a_failed_delete_can_be_retried() {
    let h = Harness::new();
    let pid = h.create("c1");
    h.rt.fail("runc delete", "cannot remove cgroup: device or resource busy");
    let (_, msg) = code(h.delete("c1", ""));
    assert!(msg.contains("resource busy"), "{msg}");
    assert_eq!(h.internal("c1"), ProcessStatus::Created);
    h.rt.lock().fail.clear();
    // The forced delete kills the created init; its exit arrives.
    h.exit(pid, 137);
    h.wait_exit("c1", "");
    assert_eq!(h.delete("c1", "").unwrap().exit_status, 137);
    assert_eq!(h.events(), ["create", "exit c1", "delete"]);
}
