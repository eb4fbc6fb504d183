//! The shim's Task API spoken directly over its ttrpc socket, for what `ctr` 1.6 cannot send:
//! CloseIO, Update, Create without Start, ResizePty, and requests that must fail with a
//! particular status code. containerd starts the shim (`ctr run -d`); the tests then connect to
//! the socket containerd itself uses (from the task's `address` file). Needs the test bed
//! (`test/setup.sh`).
//!
//! Only polling with generous deadlines: nothing here asserts on how long something took.

use std::fs::File;
use std::io::Write;
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use containerd_shim_protos::api::{
    CloseIORequest, CreateTaskRequest, DeleteRequest, ExecProcessRequest, KillRequest, PauseRequest, ResizePtyRequest,
    StartRequest, StateRequest, StateResponse, Status, UpdateTaskRequest, WaitRequest, WaitResponse,
};
use containerd_shim_protos::protobuf::well_known_types::any::Any;
use containerd_shim_protos::protobuf::{Message, MessageField};
use containerd_shim_protos::shim::oci::Options as RuncOptions;
use containerd_shim_protos::ttrpc::{self, context, Code};
use containerd_shim_protos::{Client, TaskClient};
mod common;

use common::{testbed, wait_until, RUNTIME, TIMEOUT};
use kybernate_testbed::{unique_name, Bundle, Testbed, CONTAINERD_RUNC_ROOT, IMAGE};
use nix::errno::Errno;
use nix::fcntl::{fcntl, open, FcntlArg, OFlag};
use nix::sys::stat::Mode;
use nix::unistd::mkfifo;
use serde_json::{json, Value};

/// Deadline of RPCs that block until a process exits (Wait).
const WAIT_TIMEOUT: Duration = Duration::from_secs(60);
const PROCESS_SPEC_URL: &str = "types.containerd.io/opencontainers/runtime-spec/1/Process";
const RESOURCES_URL: &str = "types.containerd.io/opencontainers/runtime-spec/1/LinuxResources";

// ---------------------------------------------------------------------------------------------
// Test bed, shim connection, RPC helpers

/// Runs `sleep 1000` as container `id` through containerd and connects to its shim's socket.
fn container_with_shim(tb: &Testbed, id: &str) -> TaskClient {
    tb.ctr_ok(&["run", "-d", "--runtime", RUNTIME, IMAGE, id, "sleep", "1000"]);
    let file = tb.dir().join("state/io.containerd.runtime.v2.task").join(tb.namespace()).join(id).join("address");
    let address = std::fs::read_to_string(&file).unwrap_or_else(|e| panic!("reading {}: {e}", file.display()));
    let address = address.trim();
    assert!(address.starts_with("unix://"), "unexpected shim address {address:?}");
    let client = Client::connect(address).unwrap_or_else(|e| panic!("connecting to the shim at {address}: {e}"));
    TaskClient::new(client)
}

/// Kills and deletes the containerd container `id` (the one whose shim the test used).
fn remove_container(tb: &Testbed, shim: &TaskClient, id: &str) {
    tb.ctr_ok(&["tasks", "kill", "-s", "SIGKILL", id]);
    wait_until("the container to stop", || status(shim, id, ""), |s| *s == Some(Status::STOPPED));
    tb.ctr_ok(&["tasks", "delete", id]);
    tb.ctr_ok(&["containers", "delete", id]);
}

fn ctx() -> context::Context {
    context::with_duration(TIMEOUT)
}

fn wait_ctx() -> context::Context {
    context::with_duration(WAIT_TIMEOUT)
}

/// The status code of a failed RPC; panics if it succeeded or failed below the RPC layer.
fn code_of<T: std::fmt::Debug>(what: &str, r: ttrpc::Result<T>) -> Code {
    match r {
        Err(ttrpc::Error::RpcStatus(s)) => s.code(),
        other => panic!("{what}: want an RPC status error, got {other:?}"),
    }
}

/// The status and message of a failed RPC; panics if it succeeded.
fn status_of<T: std::fmt::Debug>(what: &str, r: ttrpc::Result<T>) -> (Code, String) {
    match r {
        Err(ttrpc::Error::RpcStatus(s)) => (s.code(), s.message.clone()),
        other => panic!("{what}: want an RPC status error, got {other:?}"),
    }
}

fn state(shim: &TaskClient, id: &str, exec_id: &str) -> ttrpc::Result<StateResponse> {
    shim.state(ctx(), &StateRequest { id: id.into(), exec_id: exec_id.into(), ..Default::default() })
}

/// The process's status, or None if the shim does not know it (or the call failed).
fn status(shim: &TaskClient, id: &str, exec_id: &str) -> Option<Status> {
    state(shim, id, exec_id).ok().map(|s| s.status.enum_value_or(Status::UNKNOWN))
}

fn wait(shim: &TaskClient, id: &str, exec_id: &str) -> WaitResponse {
    shim.wait(wait_ctx(), &WaitRequest { id: id.into(), exec_id: exec_id.into(), ..Default::default() })
        .unwrap_or_else(|e| panic!("wait {id}/{exec_id}: {e}"))
}

fn delete(shim: &TaskClient, id: &str, exec_id: &str) -> ttrpc::Result<containerd_shim_protos::api::DeleteResponse> {
    shim.delete(ctx(), &DeleteRequest { id: id.into(), exec_id: exec_id.into(), ..Default::default() })
}

fn start(shim: &TaskClient, id: &str, exec_id: &str) -> ttrpc::Result<u32> {
    shim.start(ctx(), &StartRequest { id: id.into(), exec_id: exec_id.into(), ..Default::default() }).map(|r| r.pid)
}

/// An OCI process as containerd sends it for exec: JSON in an Any.
fn process_spec(args: &[&str], terminal: bool) -> MessageField<Any> {
    let process = json!({
        "args": args,
        "terminal": terminal,
        "cwd": "/",
        "env": ["PATH=/usr/sbin:/usr/bin:/sbin:/bin", "TERM=xterm"],
        "user": { "uid": 0, "gid": 0 },
    });
    any(PROCESS_SPEC_URL, serde_json::to_vec(&process).unwrap())
}

fn any(type_url: &str, value: Vec<u8>) -> MessageField<Any> {
    let mut a = Any::new();
    a.type_url = type_url.into();
    a.value = value;
    Some(a).into()
}

fn path_str(p: &Path) -> String {
    p.to_str().unwrap().to_string()
}

fn pid_exists(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

/// Live pids whose cgroup (any hierarchy) is exactly `cgroup`.
fn pids_in_cgroup(cgroup: &str) -> Vec<u32> {
    let mut pids = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else { continue };
        let Ok(text) = std::fs::read_to_string(format!("/proc/{pid}/cgroup")) else { continue };
        if text.lines().any(|l| l.splitn(3, ':').nth(2) == Some(cgroup)) {
            pids.push(pid);
        }
    }
    pids
}

/// runc's state directory of container `id` in containerd's runc root for `namespace`.
fn runc_state_dir(namespace: &str, id: &str) -> PathBuf {
    Path::new(CONTAINERD_RUNC_ROOT).join(namespace).join(id)
}

/// A busybox bundle for a container created straight through the shim, in the test bed's dir
/// (so the test bed's cleanup covers it), with containerd's cgroup layout `/<namespace>/<id>`.
fn bundle(tb: &Testbed, id: &str, args: &[&str]) -> Bundle {
    let b = Bundle::busybox(&tb.dir().join("bundles").join(id), args).expect("writing a bundle");
    let cgroup = format!("/{}/{id}", tb.namespace());
    b.edit_config(|c| c["linux"]["cgroupsPath"] = Value::String(cgroup)).expect("editing config.json");
    b
}

fn create_request(id: &str, bundle: &Path) -> CreateTaskRequest {
    CreateTaskRequest { id: id.into(), bundle: path_str(bundle), ..Default::default() }
}

// ---------------------------------------------------------------------------------------------
// FIFOs: containerd's side of a process's stdio

/// A scratch dir for FIFOs in the test bed's dir.
fn fifo_dir(tb: &Testbed) -> PathBuf {
    let dir = tb.dir().join("fifos").join(unique_name(""));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn fifo(dir: &Path, name: &str) -> PathBuf {
    let p = dir.join(name);
    mkfifo(&p, Mode::from_bits_truncate(0o600)).unwrap();
    p
}

/// containerd's reader of an output FIFO: opened before the process starts (non-blocking, so the
/// open does not wait for a writer) and read on a thread into a channel until dropped.
struct OutputReader {
    rx: mpsc::Receiver<Vec<u8>>,
    seen: Vec<u8>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl OutputReader {
    fn open(path: &Path) -> Self {
        let fd = open(path, OFlag::O_RDONLY | OFlag::O_NONBLOCK | OFlag::O_CLOEXEC, Mode::empty())
            .unwrap_or_else(|e| panic!("opening {} for reading: {e}", path.display()));
        let (tx, rx) = mpsc::channel();
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while !stopped.load(Ordering::Relaxed) {
                // EOF (no writer yet, or the writer left) and EAGAIN both mean: look again later.
                match nix::unistd::read(fd.as_fd(), &mut buf) {
                    Ok(n) if n > 0 => {
                        if tx.send(buf[..n].to_vec()).is_err() {
                            return;
                        }
                    }
                    Ok(_) | Err(Errno::EAGAIN) | Err(Errno::EINTR) => std::thread::sleep(Duration::from_millis(10)),
                    Err(e) => panic!("reading output FIFO: {e}"),
                }
            }
        });
        OutputReader { rx, seen: Vec::new(), stop, thread: Some(thread) }
    }

    /// Reads until the output so far contains `want`; panics with what came after [`TIMEOUT`].
    fn wait_for(&mut self, want: &str) {
        let deadline = Instant::now() + TIMEOUT;
        while !String::from_utf8_lossy(&self.seen).contains(want) {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.rx.recv_timeout(left) {
                Ok(chunk) => self.seen.extend_from_slice(&chunk),
                Err(mpsc::RecvTimeoutError::Disconnected) => panic!("the FIFO reader thread died (see above)"),
                Err(mpsc::RecvTimeoutError::Timeout) => panic!(
                    "timed out after {TIMEOUT:?} waiting for {want:?} in the output; got {:?}",
                    String::from_utf8_lossy(&self.seen)
                ),
            }
        }
    }
}

impl Drop for OutputReader {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// containerd's writer of a stdin FIFO: opened once the shim has its reader (non-blocking open
/// fails with ENXIO until then), then made blocking.
fn stdin_writer(path: &Path) -> File {
    let fd: OwnedFd = open(path, OFlag::O_WRONLY | OFlag::O_NONBLOCK | OFlag::O_CLOEXEC, Mode::empty())
        .unwrap_or_else(|e| panic!("opening {} for writing (does the shim read it?): {e}", path.display()));
    fcntl(&fd, FcntlArg::F_SETFL(OFlag::empty())).unwrap();
    File::from(fd)
}

/// Execs `cat` in container `id` with a stdin and a stdout FIFO and starts it.
fn start_cat(tb: &Testbed, shim: &TaskClient, id: &str, exec_id: &str) -> (File, OutputReader, PathBuf) {
    let dir = fifo_dir(tb);
    let (stdin, stdout) = (fifo(&dir, "stdin"), fifo(&dir, "stdout"));
    let out = OutputReader::open(&stdout);
    shim.exec(
        ctx(),
        &ExecProcessRequest {
            id: id.into(),
            exec_id: exec_id.into(),
            terminal: false,
            stdin: path_str(&stdin),
            stdout: path_str(&stdout),
            stderr: String::new(),
            spec: process_spec(&["cat"], false),
            ..Default::default()
        },
    )
    .unwrap_or_else(|e| panic!("exec {exec_id}: {e}"));
    let pid = start(shim, id, exec_id).unwrap_or_else(|e| panic!("start {exec_id}: {e}"));
    assert!(pid > 0);
    (stdin_writer(&stdin), out, stdin)
}

/// Checks, a few times over a short while, that the exec is still running. Not a timing
/// assertion: a process that should stay alive must still be alive at every look.
fn assert_still_running(shim: &TaskClient, id: &str, exec_id: &str, why: &str) {
    for _ in 0..10 {
        assert_eq!(status(shim, id, exec_id), Some(Status::RUNNING), "{exec_id} ended: {why}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

// ---------------------------------------------------------------------------------------------
// Tests

#[test]
fn close_io_ends_a_cat() {
    let tb = testbed();
    let id = unique_name("closeio");
    let shim = container_with_shim(&tb, &id);

    // Order 1, as containerd's client does it: our writer closes (stdin reached EOF), then CloseIO.
    let (mut writer, mut out, stdin_path) = start_cat(&tb, &shim, &id, "cat1");
    writer.write_all(b"hello\n").unwrap();
    out.wait_for("hello\n");
    drop(writer);
    // The shim keeps stdin open until CloseIO: a writer that goes away (containerd restarting)
    // does not end the process's input, and a new writer reaches the same process.
    assert_still_running(&shim, &id, "cat1", "closing containerd's writer must not end stdin before CloseIO");
    let mut writer = stdin_writer(&stdin_path);
    writer.write_all(b"again\n").unwrap();
    out.wait_for("hello\nagain\n");
    drop(writer);
    assert_still_running(&shim, &id, "cat1", "stdin must stay open until CloseIO");
    shim.close_io(ctx(), &CloseIORequest { id: id.clone(), exec_id: "cat1".into(), stdin: true, ..Default::default() })
        .expect("close_io cat1");
    let exit = wait(&shim, &id, "cat1");
    assert_eq!(exit.exit_status, 0, "cat ends normally at EOF");
    assert!(exit.exited_at.is_some());
    let st = state(&shim, &id, "cat1").expect("state of the exited cat1");
    assert_eq!(st.status.enum_value_or(Status::UNKNOWN), Status::STOPPED);
    assert_eq!(st.exit_status, 0);
    drop(out);

    // Order 2: CloseIO while our writer is still open; input keeps flowing until the writer closes.
    let (mut writer, mut out, _) = start_cat(&tb, &shim, &id, "cat2");
    shim.close_io(ctx(), &CloseIORequest { id: id.clone(), exec_id: "cat2".into(), stdin: true, ..Default::default() })
        .expect("close_io cat2");
    writer.write_all(b"after close_io\n").unwrap();
    out.wait_for("after close_io\n");
    assert_still_running(&shim, &id, "cat2", "an open writer still feeds stdin after CloseIO");
    drop(writer);
    assert_eq!(wait(&shim, &id, "cat2").exit_status, 0);
    assert_eq!(status(&shim, &id, "cat2"), Some(Status::STOPPED));

    for exec_id in ["cat1", "cat2"] {
        let deleted = delete(&shim, &id, exec_id).unwrap_or_else(|e| panic!("delete {exec_id}: {e}"));
        assert_eq!(deleted.exit_status, 0);
        assert_eq!(code_of("state of a deleted exec", state(&shim, &id, exec_id)), Code::NOT_FOUND);
        assert_eq!(code_of("second delete of an exec", delete(&shim, &id, exec_id)), Code::NOT_FOUND);
    }
    // CloseIO of an unknown process.
    let r = shim
        .close_io(ctx(), &CloseIORequest { id: id.clone(), exec_id: "nope".into(), stdin: true, ..Default::default() });
    assert_eq!(code_of("close_io of an unknown exec", r), Code::NOT_FOUND);
    remove_container(&tb, &shim, &id);
}

/// The memory limit of the cgroup (v1) process `pid` is in.
fn memory_limit(pid: u32) -> u64 {
    let text = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap();
    let path = text
        .lines()
        .find_map(|l| {
            let mut parts = l.splitn(3, ':');
            let (_, ctrls, path) = (parts.next()?, parts.next()?, parts.next()?);
            ctrls.split(',').any(|c| c == "memory").then(|| path.to_string())
        })
        .unwrap_or_else(|| panic!("no memory cgroup (v1) for pid {pid}:\n{text}"));
    let file = format!("/sys/fs/cgroup/memory{path}/memory.limit_in_bytes");
    let limit = std::fs::read_to_string(&file).unwrap_or_else(|e| panic!("reading {file}: {e}"));
    limit.trim().parse().unwrap_or_else(|e| panic!("{file}: {limit:?}: {e}"))
}

#[test]
fn update_changes_the_memory_limit() {
    const LIMIT: u64 = 64 << 20;
    let tb = testbed();
    let id = unique_name("update");
    let shim = container_with_shim(&tb, &id);
    let pid = state(&shim, &id, "").expect("state").pid;
    assert!(pid > 0);
    assert_ne!(memory_limit(pid), LIMIT, "the container starts without that limit");

    let update = |resources: MessageField<Any>| {
        shim.update(ctx(), &UpdateTaskRequest { id: id.clone(), resources, ..Default::default() })
    };
    let resources = serde_json::to_vec(&json!({ "memory": { "limit": LIMIT } })).unwrap();
    update(any(RESOURCES_URL, resources.clone())).expect("update");
    assert_eq!(memory_limit(pid), LIMIT);

    // Wrong requests change nothing and say why.
    assert_eq!(code_of("malformed resources", update(any(RESOURCES_URL, b"{".to_vec()))), Code::INVALID_ARGUMENT);
    assert_eq!(code_of("no resources", update(MessageField::none())), Code::INVALID_ARGUMENT);
    // A shape runc cannot read is runc's to refuse, in its words (the shim passes resources on as
    // JSON, so that fields it does not know reach runc): refused, and the limit stays.
    let wrong_shape = serde_json::to_vec(&json!({ "memory": { "limit": "lots" } })).unwrap();
    let refused = update(any(RESOURCES_URL, wrong_shape)).expect_err("runc refuses a limit that is a string");
    assert!(format!("{refused:?}").contains("unmarshal"), "runc's own message: {refused:?}");
    let unknown = shim.update(
        ctx(),
        &UpdateTaskRequest {
            id: "no-such-container".into(),
            resources: any(RESOURCES_URL, resources),
            ..Default::default()
        },
    );
    assert_eq!(code_of("update of an unknown container", unknown), Code::NOT_FOUND);
    assert_eq!(memory_limit(pid), LIMIT);
    remove_container(&tb, &shim, &id);
}

#[test]
fn delete_of_a_created_never_started_task() {
    let tb = testbed();
    let host = unique_name("host");
    let shim = container_with_shim(&tb, &host);
    let id = unique_name("created");
    let b = bundle(&tb, &id, &["sleep", "1000"]);

    let pid = shim.create(ctx(), &create_request(&id, b.dir())).expect("create").pid;
    assert!(pid > 0, "create returns the init pid");
    assert!(pid_exists(pid), "the created init process (pid {pid}) exists");
    let st = state(&shim, &id, "").expect("state of the created task");
    assert_eq!(st.status.enum_value_or(Status::UNKNOWN), Status::CREATED);
    assert_eq!(st.pid, pid);
    assert!(runc_state_dir(tb.namespace(), &id).exists());

    // Requests a created task refuses.
    let paused = shim.pause(ctx(), &PauseRequest { id: id.clone(), ..Default::default() });
    assert_eq!(code_of("pause of a created task", paused), Code::FAILED_PRECONDITION);
    let exec = shim.exec(
        ctx(),
        &ExecProcessRequest {
            id: id.clone(),
            exec_id: "e".into(),
            spec: process_spec(&["true"], false),
            ..Default::default()
        },
    );
    assert_eq!(code_of("exec in a created task", exec), Code::FAILED_PRECONDITION);

    let deleted = delete(&shim, &id, "").expect("delete of a created task");
    assert_eq!(deleted.pid, pid);
    assert_eq!(deleted.exit_status, 137, "the never-started init is killed by the delete");
    wait_until("the init process to be gone", || pid_exists(pid), |alive| !alive);
    assert!(!runc_state_dir(tb.namespace(), &id).exists(), "runc state left behind");
    assert_eq!(code_of("second delete", delete(&shim, &id, "")), Code::NOT_FOUND);
    assert_eq!(code_of("state after delete", state(&shim, &id, "")), Code::NOT_FOUND);

    // Unknown ids.
    let kill = shim.kill(ctx(), &KillRequest { id: "no-such-container".into(), signal: 9, ..Default::default() });
    assert_eq!(code_of("kill of an unknown container", kill), Code::NOT_FOUND);
    assert_eq!(code_of("state of an unknown container", state(&shim, "no-such-container", "")), Code::NOT_FOUND);
    let w = shim.wait(ctx(), &WaitRequest { id: "no-such-container".into(), ..Default::default() });
    assert_eq!(code_of("wait of an unknown container", w), Code::NOT_FOUND);
    let w = shim.wait(ctx(), &WaitRequest { id: host.clone(), exec_id: "no-such-exec".into(), ..Default::default() });
    assert_eq!(code_of("wait of an unknown exec", w), Code::NOT_FOUND);
    let kill = shim.kill(
        ctx(),
        &KillRequest { id: host.clone(), exec_id: "no-such-exec".into(), signal: 9, ..Default::default() },
    );
    assert_eq!(code_of("kill of an unknown exec", kill), Code::NOT_FOUND);

    // A duplicate exec id.
    let exec = |exec_id: &str| {
        shim.exec(
            ctx(),
            &ExecProcessRequest {
                id: host.clone(),
                exec_id: exec_id.into(),
                spec: process_spec(&["sleep", "1000"], false),
                ..Default::default()
            },
        )
    };
    exec("dup").expect("first exec");
    assert_eq!(code_of("exec with a duplicate id", exec("dup")), Code::ALREADY_EXISTS);
    delete(&shim, &host, "dup").expect("delete of a created, never started exec");
    assert_eq!(code_of("state of the deleted exec", state(&shim, &host, "dup")), Code::NOT_FOUND);

    remove_container(&tb, &shim, &host);
}

#[test]
fn tty_exec_with_resize() {
    let tb = testbed();
    let id = unique_name("tty");
    let shim = container_with_shim(&tb, &id);
    let dir = fifo_dir(&tb);
    let (stdin, stdout) = (fifo(&dir, "stdin"), fifo(&dir, "stdout"));
    let mut out = OutputReader::open(&stdout);
    shim.exec(
        ctx(),
        &ExecProcessRequest {
            id: id.clone(),
            exec_id: "sh".into(),
            terminal: true,
            stdin: path_str(&stdin),
            stdout: path_str(&stdout),
            stderr: String::new(),
            spec: process_spec(&["sh"], true),
            ..Default::default()
        },
    )
    .expect("exec");
    start(&shim, &id, "sh").expect("start");
    let st = state(&shim, &id, "sh").expect("state");
    assert!(st.terminal);
    shim.resize_pty(
        ctx(),
        &ResizePtyRequest { id: id.clone(), exec_id: "sh".into(), width: 100, height: 40, ..Default::default() },
    )
    .expect("resize_pty");
    let mut writer = stdin_writer(&stdin);
    // The input is read only after the resize, so stty sees the new size.
    writer.write_all(b"stty size; exit 0\n").unwrap();
    out.wait_for("40 100");
    assert_eq!(wait(&shim, &id, "sh").exit_status, 0);
    drop(writer);
    delete(&shim, &id, "sh").expect("delete exec");
    // Resizing something without a terminal is accepted and does nothing (as in Go's shim).
    shim.resize_pty(ctx(), &ResizePtyRequest { id: id.clone(), width: 10, height: 10, ..Default::default() })
        .expect("resize_pty of a process without a terminal");
    let gone = shim.resize_pty(
        ctx(),
        &ResizePtyRequest { id: id.clone(), exec_id: "sh".into(), width: 10, height: 10, ..Default::default() },
    );
    assert_eq!(code_of("resize of a deleted exec", gone), Code::NOT_FOUND);
    remove_container(&tb, &shim, &id);
}

/// Checks that nothing of container `id` is left: no runtime state, no process in its cgroup,
/// no mount naming it, and the shim does not know it.
fn assert_nothing_left(tb: &Testbed, shim: &TaskClient, id: &str) {
    assert!(!runc_state_dir(tb.namespace(), id).exists(), "runc state of {id} left behind");
    let cgroup = format!("/{}/{id}", tb.namespace());
    wait_until("no process left in the container's cgroup", || pids_in_cgroup(&cgroup), |p| p.is_empty());
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    assert!(!mounts.contains(id), "mount of {id} left behind");
    assert_eq!(code_of("state of a container whose create failed", state(shim, id, "")), Code::NOT_FOUND);
}

/// `containerd.runc.v1.Options` choosing the runtime binary, as a Go client or CRI's runc
/// runtime type sends them.
fn runc_options(binary: &Path) -> MessageField<Any> {
    let mut o = RuncOptions::new();
    o.binary_name = path_str(binary);
    any("containerd.runc.v1.Options", o.write_to_bytes().unwrap())
}

#[test]
fn create_with_a_missing_runtime_binary_leaves_nothing() {
    let tb = testbed();
    let host = unique_name("host");
    let shim = container_with_shim(&tb, &host);

    // The runtime binary named in the options does not exist.
    let nort = unique_name("nort");
    let b = bundle(&tb, &nort, &["true"]);
    let missing = tb.dir().join("no-such-runtime");
    let req = CreateTaskRequest { options: runc_options(&missing), ..create_request(&nort, b.dir()) };
    let (code, msg) = status_of("create with a missing runtime binary", shim.create(ctx(), &req));
    assert_eq!(code, Code::FAILED_PRECONDITION, "{msg}");
    assert!(msg.contains(&path_str(&missing)), "the error names the binary: {msg}");
    assert_nothing_left(&tb, &shim, &nort);

    // A config.json that is not JSON: runc's to refuse, as with the stock shim (the shim decides
    // on it as on an empty spec); runc's message reaches the client and nothing is left.
    let bad = unique_name("badcfg");
    let b = bundle(&tb, &bad, &["true"]);
    std::fs::write(b.config_path(), "{").unwrap();
    let (code, msg) =
        status_of("create with a malformed config.json", shim.create(ctx(), &create_request(&bad, b.dir())));
    assert_ne!(code, Code::OK, "{msg}");
    assert!(msg.contains("runc") && msg.contains("create"), "runc's refusal reaches the client: {msg}");
    assert_nothing_left(&tb, &shim, &bad);

    // A process binary that does not exist: runc refuses it (at create in runc >= 1.1, else at
    // start), its own message reaches the client, and nothing is left either way.
    let nobin = unique_name("nobin");
    let b = bundle(&tb, &nobin, &["/nonexistent"]);
    let msg = match shim.create(ctx(), &create_request(&nobin, b.dir())) {
        Err(ttrpc::Error::RpcStatus(s)) => s.message.clone(),
        Err(e) => panic!("create failed below the RPC layer: {e}"),
        Ok(created) => {
            let msg = match start(&shim, &nobin, "") {
                Err(ttrpc::Error::RpcStatus(s)) => s.message.clone(),
                other => panic!("start of a container whose binary is missing: {other:?}"),
            };
            // What containerd does after a failed start.
            delete(&shim, &nobin, "").expect("delete after a failed start");
            wait_until("the init process to be gone", || pid_exists(created.pid), |alive| !alive);
            msg
        }
    };
    assert!(msg.contains("/nonexistent"), "runc's message reaches the client: {msg}");
    assert!(msg.contains("runc"), "the error says which runtime failed: {msg}");
    assert_nothing_left(&tb, &shim, &nobin);

    // A rootfs mount that fails after another succeeded: the first is unmounted again.
    let badmnt = unique_name("badmnt");
    let b = bundle(&tb, &badmnt, &["true"]);
    let mount = |type_: &str, source: &str| containerd_shim_protos::types::mount::Mount {
        type_: type_.into(),
        source: source.into(),
        options: vec!["size=1m".into()],
        ..Default::default()
    };
    let req = CreateTaskRequest {
        rootfs: vec![mount("tmpfs", "tmpfs"), mount("kbt-no-such-fs", "none")],
        ..create_request(&badmnt, b.dir())
    };
    let (code, msg) = status_of("create with a failing rootfs mount", shim.create(ctx(), &req));
    assert_eq!(code, Code::UNKNOWN, "{msg}");
    assert!(msg.contains("mount rootfs") && msg.contains("kbt-no-such-fs"), "{msg}");
    let rootfs = path_str(&b.dir().join("rootfs"));
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    assert!(!mounts.lines().any(|l| l.split_whitespace().nth(4) == Some(rootfs.as_str())), "rootfs mount left behind");
    assert_nothing_left(&tb, &shim, &badmnt);

    // The shim still serves its container.
    assert_eq!(status(&shim, &host, ""), Some(Status::RUNNING));
    remove_container(&tb, &shim, &host);
}

#[test]
fn a_runtime_that_fails_after_creating_leaves_nothing() {
    // A runtime wrapper (as nvidia-container-runtime is) whose `create` fails after runc created
    // the container: runc cleans up nothing then, so the shim must delete the container itself.
    let tb = testbed();
    let host = unique_name("host");
    let shim = container_with_shim(&tb, &host);
    let runc = kybernate_testbed::find_in_path("runc", tb.path_env()).expect("runc on containerd's PATH");
    let fake = tb.dir().join("runtime-failing-after-create");
    std::fs::write(
        &fake,
        format!(
            r#"#!/bin/sh
sub=""; skip=""
for a in "$@"; do
    if [ -n "$skip" ]; then skip=""; continue; fi
    case "$a" in
        --root|--log|--log-format|--criu) skip=1 ;;
        -*) ;;
        *) sub=$a; break ;;
    esac
done
{runc} "$@" || exit $?
[ "$sub" = create ] && exit 1
exit 0
"#,
            runc = runc.display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&fake, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();

    let id = unique_name("halfmade");
    let b = bundle(&tb, &id, &["sleep", "1000"]);
    let req = CreateTaskRequest { options: runc_options(&fake), ..create_request(&id, b.dir()) };
    let (_, msg) = status_of("create through a runtime that fails after creating", shim.create(ctx(), &req));
    assert!(msg.contains("runtime-failing-after-create create failed"), "{msg}");
    assert_nothing_left(&tb, &shim, &id);

    assert_eq!(status(&shim, &host, ""), Some(Status::RUNNING));
    remove_container(&tb, &shim, &host);
}
