//! The containerd Task API (task v2) over containers whose runtime binary is
//! chosen per container. Request → decision → runtime call → event.
//!
//! Locking: the container map and each process's state are locked only
//! briefly; no lock is held across a runtime call, so a slow runtime call in
//! one container never blocks another container's RPCs or exit reporting.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use containerd_shim::api::{
    CheckpointTaskRequest, CloseIORequest, ConnectRequest, ConnectResponse, CreateTaskRequest, CreateTaskResponse,
    DeleteRequest, Empty, ExecProcessRequest, KillRequest, PauseRequest, PidsRequest, PidsResponse, ResizePtyRequest,
    ResumeRequest, ShutdownRequest, StartRequest, StartResponse, StateRequest, StateResponse, StatsRequest,
    StatsResponse, UpdateTaskRequest, WaitRequest, WaitResponse,
};
use containerd_shim::monitor::{monitor_subscribe, Subject, Subscription, Topic};
use containerd_shim::protos::events::task::{
    TaskCheckpointed, TaskCreate, TaskDelete, TaskExecAdded, TaskExecStarted, TaskExit, TaskIO, TaskOOM, TaskPaused,
    TaskResumed, TaskStart,
};
use containerd_shim::protos::protobuf::well_known_types::any::Any;
use containerd_shim::protos::protobuf::Message;
use containerd_shim::protos::shim::oci::ProcessDetails;
use containerd_shim::protos::types::task::ProcessInfo;
use containerd_shim::{api, ExitSignal, Task, TtrpcContext, TtrpcResult};
use log::{info, warn};

use crate::checkpoint::{self, CheckpointRequest, Checkpointer};
use crate::container::Container;
use crate::error::{CheckpointError, Error, Result};
use crate::events::{EventQueue, RemoteEvents};
use crate::factory::{unmount_rootfs, ContainerFactory};
use crate::io::{ProcessIo, StdioConfig};
use crate::process::{Action, Process, ProcessStatus};
use crate::restore::{RestoreGuard, RestorePlan, RestoreStep};
use crate::runtime::{read_pid_file, ExecOpts};
use crate::spawn::{GroupRecord, MonitorSpawner, Spawner};
use crate::sync::lock;

/// How long an exit waits for the process's output to drain: a daemonised
/// grandchild can hold the pipe open forever.
const OUTPUT_DRAIN_TIMEOUT: Duration = Duration::from_secs(2);
/// How long init's TaskExit waits for exec exits (they die with the PID namespace).
const EXEC_EXIT_TIMEOUT: Duration = Duration::from_secs(10);
/// Exits of pids we do not know yet are kept this long (runtime invocations exit here too).
const PENDING_EXIT_TTL: Duration = Duration::from_secs(60);
/// How long an exit waits for a start, pause, resume or checkpoint in flight (so that its TaskExit
/// follows their events) before it is published anyway.
const SETTLE_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a Kill of a container whose restore runs waits for the restore to give it a pid.
const RESTORE_KILL_TIMEOUT: Duration = Duration::from_secs(30);

/// Which process a pid belongs to, and exits that arrived before we learnt the pid.
/// One lock makes "exit before pid known" and "pid known before exit" race-free.
#[derive(Default)]
struct PidTable {
    known: HashMap<u32, (String, Option<String>)>,
    pending: HashMap<u32, (u32, SystemTime, Instant)>,
}

/// A container id in the map: reserved while its Create runs (init is then
/// [`Creating`](ProcessStatus::Creating), with no `Container` yet), then the container.
enum Slot {
    Creating,
    Ready(Arc<Container>),
}

pub struct TaskService {
    inner: Arc<Inner>,
}

struct Inner {
    namespace: String,
    events: EventQueue,
    spawner: Arc<dyn Spawner>,
    containers: Mutex<HashMap<String, Slot>>,
    pids: Mutex<PidTable>,
    exit_signal: Arc<ExitSignal>,
    /// Held while an exit is recorded and its TaskExit sent; see `handle_exit`.
    exit_order: Mutex<()>,
}

impl TaskService {
    /// The task service of shim daemon `id`: events go to containerd through `events`, every
    /// child exit the shim's reaper sees is subscribed to, and `exit` is signalled at Shutdown.
    pub fn for_daemon(id: &str, namespace: &str, events: RemoteEvents, exit: Arc<ExitSignal>) -> Self {
        let events = EventQueue::start(Arc::new(events), namespace.to_string());
        let exits = monitor_subscribe(Topic::All)
            // Without exits no task ever finishes: say so loudly rather than die silently.
            .inspect_err(|e| log::error!("cannot subscribe to process exits: {e}"))
            .ok();
        info!("shim {id} started for namespace {namespace} (pid {})", std::process::id());
        Self::new(namespace.to_string(), events, Arc::new(MonitorSpawner), exit, exits)
    }

    /// `exits` is a subscription to every child exit the shim's reaper sees
    /// (`None` only if subscribing failed; then no exit is ever reported).
    pub fn new(
        namespace: String,
        events: EventQueue,
        spawner: Arc<dyn Spawner>,
        exit_signal: Arc<ExitSignal>,
        exits: Option<Subscription>,
    ) -> Self {
        let inner = Arc::new(Inner {
            namespace,
            events,
            spawner,
            containers: Mutex::new(HashMap::new()),
            pids: Mutex::new(PidTable::default()),
            exit_signal,
            exit_order: Mutex::new(()),
        });
        let weak = Arc::downgrade(&inner);
        let Some(exits) = exits else { return Self { inner } };
        std::thread::Builder::new()
            .name("exits".into())
            .spawn(move || {
                // The subscription lives as long as this loop: dropping it unsubscribes.
                for ev in exits.rx.iter() {
                    let Some(inner) = weak.upgrade() else { break };
                    if let Subject::Pid(pid) = ev.subject {
                        inner.on_exit(pid as u32, ev.exit_code as u32);
                    }
                }
            })
            .ok();
        Self { inner }
    }
}

impl Inner {
    fn container(&self, id: &str) -> Result<Arc<Container>> {
        match lock(&self.containers).get(id) {
            Some(Slot::Ready(c)) => Ok(c.clone()),
            Some(Slot::Creating) => {
                Err(Error::FailedPrecondition(format!("container {id}: its create is still running")))
            }
            None => Err(Error::NotFound(format!("container {id} not found"))),
        }
    }

    fn process(&self, id: &str, exec_id: &str) -> Result<(Arc<Container>, Arc<Process>)> {
        let c = self.container(id)?;
        let p = c.process(exec_id)?;
        Ok((c, p))
    }

    /// Called from the reaper subscription for every exited child.
    fn on_exit(self: &Arc<Self>, pid: u32, code: u32) {
        let at = SystemTime::now();
        let owner = {
            let mut t = lock(&self.pids);
            match t.known.remove(&pid) {
                Some(owner) => Some(owner),
                None => {
                    let now = Instant::now();
                    t.pending.retain(|_, (_, _, seen)| now.duration_since(*seen) < PENDING_EXIT_TTL);
                    t.pending.insert(pid, (code, at, now));
                    None
                }
            }
        };
        if let Some((cid, exec_id)) = owner {
            let inner = self.clone();
            // Draining output can take a while; never hold up other exits.
            let spawned = std::thread::Builder::new()
                .name("exit".into())
                .spawn(move || inner.handle_exit(&cid, exec_id.as_deref(), pid, code, at));
            if let Err(e) = spawned {
                warn!("cannot start exit handler for pid {pid}: {e}");
            }
        }
    }

    /// Registers a process's pid; if it already exited, handles that exit now.
    fn register_pid(self: &Arc<Self>, cid: &str, exec_id: Option<&str>, pid: u32) {
        let early = {
            let mut t = lock(&self.pids);
            match t.pending.remove(&pid) {
                Some(e) => Some(e),
                None => {
                    t.known.insert(pid, (cid.to_string(), exec_id.map(str::to_string)));
                    None
                }
            }
        };
        if let Some((code, at, _)) = early {
            let (inner, cid, exec_id) = (self.clone(), cid.to_string(), exec_id.map(str::to_string));
            std::thread::spawn(move || inner.handle_exit(&cid, exec_id.as_deref(), pid, code, at));
        }
    }

    fn forget_pid(&self, pid: u32) {
        if pid != 0 {
            lock(&self.pids).known.remove(&pid);
        }
    }

    fn handle_exit(&self, cid: &str, exec_id: Option<&str>, pid: u32, code: u32, at: SystemTime) {
        let Ok((c, p)) = self.process(cid, exec_id.unwrap_or_default()) else { return };
        if exec_id.is_none() && c.kill_all_on_exit {
            kill_the_rest(&c);
        }
        // Output first: once Wait returns, clients (ctr run --rm) stop reading.
        p.with_io(|io| io.wait_output(OUTPUT_DRAIN_TIMEOUT));
        p.wait_settled(SETTLE_TIMEOUT);
        if exec_id.is_none() {
            c.stop_oom_watcher();
            // containerd expects init's exit last. Init stays running until then (as in the Go
            // shim), so that no client can delete it and get TaskDelete out before its TaskExit.
            for e in c.exec_list() {
                if e.state().pid != 0 && e.wait_timeout(EXEC_EXIT_TIMEOUT).is_none() {
                    warn!("container {cid}: exec {} still running {EXEC_EXIT_TIMEOUT:?} after init exited", e.id);
                }
            }
        }
        // Recording an exit releases waiters (init's wait for its execs above, the Wait RPC and
        // so Delete): record and publish under one lock, which they take before they publish,
        // so an exec's TaskExit cannot be overtaken by init's, nor init's by TaskDelete.
        let _order = lock(&self.exit_order);
        if !p.set_exited(code, at) {
            return;
        }
        info!("container {cid}: process {} (pid {pid}) exited with status {code}", p.id);
        self.events.send(TaskExit {
            container_id: cid.to_string(),
            id: p.id.clone(),
            pid,
            exit_status: code,
            exited_at: Some(at.into()).into(),
            ..Default::default()
        });
    }

    /// Reserves the id before any work, so that a second Create of the same id is refused
    /// instead of racing this one (whose runtime state its cleanup would delete).
    fn create(self: &Arc<Self>, req: &CreateTaskRequest) -> Result<u32> {
        if req.id.is_empty() {
            return Err(Error::InvalidArgument("create: empty container id".into()));
        }
        {
            let mut containers = lock(&self.containers);
            if containers.contains_key(&req.id) {
                return Err(Error::AlreadyExists(format!("container {} already exists", req.id)));
            }
            containers.insert(req.id.clone(), Slot::Creating);
        }
        let created = self.create_reserved(req);
        if created.is_err() {
            lock(&self.containers).remove(&req.id);
        }
        created
    }

    /// The factory builds the container; the service registers it and publishes TaskCreate.
    fn create_reserved(self: &Arc<Self>, req: &CreateTaskRequest) -> Result<u32> {
        let factory = ContainerFactory { namespace: &self.namespace, spawner: &self.spawner };
        let c = Arc::new(factory.create(req)?);
        let pid = c.init.pid();
        lock(&self.containers).insert(req.id.clone(), Slot::Ready(c.clone()));
        self.events.send(TaskCreate {
            container_id: req.id.clone(),
            bundle: req.bundle.clone(),
            rootfs: req.rootfs.clone(),
            io: Some(TaskIO {
                stdin: req.stdin.clone(),
                stdout: req.stdout.clone(),
                stderr: req.stderr.clone(),
                terminal: req.terminal,
                ..Default::default()
            })
            .into(),
            checkpoint: req.checkpoint.clone(),
            pid,
            ..Default::default()
        });
        // After TaskCreate: an exit that came before (kept as pending) is published now.
        if pid != 0 {
            self.register_pid(&req.id, None, pid);
            self.watch_oom(&c, pid);
        }
        Ok(pid)
    }

    fn watch_oom(&self, c: &Arc<Container>, pid: u32) {
        let (events, cid) = (self.events.clone(), c.id.clone());
        match crate::oom::watch(
            pid,
            Box::new(move || events.send(TaskOOM { container_id: cid.clone(), ..Default::default() })),
        ) {
            Ok(w) => c.set_oom_watcher(w),
            Err(e) => crate::oom::log_unwatched(&c.id, &e),
        }
    }

    fn start(self: &Arc<Self>, req: &StartRequest) -> Result<u32> {
        let (c, p) = self.process(&req.id, &req.exec_id)?;
        let restore = p.transition(Action::Start)?.status == ProcessStatus::Restoring;
        let started = if req.exec_id.is_empty() { self.start_init(&c, restore) } else { self.start_exec(&c, &p) };
        let pid = p.pid();
        if started.is_ok() {
            if req.exec_id.is_empty() {
                self.events.send(TaskStart { container_id: c.id.clone(), pid, ..Default::default() });
            } else {
                self.events.send(TaskExecStarted {
                    container_id: c.id.clone(),
                    exec_id: req.exec_id.clone(),
                    pid,
                    ..Default::default()
                });
            }
        }
        p.settle(started.is_ok());
        started.map(|_| pid)
    }

    /// `restore`: init was [`Restoring`](ProcessStatus::Restoring), so its plan is there.
    fn start_init(self: &Arc<Self>, c: &Arc<Container>, restore: bool) -> Result<()> {
        if !restore {
            return Ok(c.runtime.start(&c.id, &c.bundle)?);
        }
        let plan = c
            .take_restore()
            .ok_or_else(|| Error::FailedPrecondition(format!("start {}: its restore plan is gone", c.id)))?;
        self.restore_init(c, plan)
    }

    /// Start of a container created from a checkpoint: `runtime restore --detach`, with the
    /// process IO wired up as for a create; from here its exits work as for any container.
    /// The attempt goes into the store's journal, failed or not.
    fn restore_init(self: &Arc<Self>, c: &Arc<Container>, plan: RestorePlan) -> Result<()> {
        let mut clock = plan.clock.clone();
        let result = self.restore_timed(c, &plan, &mut clock);
        let checkpointer = Checkpointer { spawner: self.spawner.as_ref(), namespace: &self.namespace };
        let attempt = checkpointer.attempt(kybernate_checkpoint::journal::Kind::Restore, c, &clock);
        crate::restore::record_restore(attempt, &plan, &c.checkpoint_config, &result);
        result
    }

    /// Runs the plan's steps ([`RestorePlan::steps`]) in order under one rollback guard: a
    /// restore that stops part-way leaves no runtime state and no half-restored process.
    fn restore_timed(
        self: &Arc<Self>,
        c: &Arc<Container>,
        plan: &RestorePlan,
        clock: &mut kybernate_checkpoint::journal::Clock,
    ) -> Result<()> {
        let checkpointer = Checkpointer { spawner: self.spawner.as_ref(), namespace: &self.namespace };
        let (criu_path, _) = checkpointer.criu(c, "restore")?;
        // The pages are still being verified: CRIU runs through the proxy, which holds the
        // restored process until they are (criu_proxy.rs).
        let gate = crate::criu_proxy::CriuGate::for_restore(&c.id, &c.bundle, plan.pages.as_ref())?;
        let mut runtime = match &gate {
            Some(gate) => gate.runtime(&c.runtime, &criu_path),
            None => c.runtime.with_criu(criu_path),
        };
        let gpu_err = |source| CheckpointError::Gpu { what: "restore", id: c.id.clone(), source: Box::new(source) };
        if plan.gpu().is_some_and(|g| g.mode == kybernate_gpu::GpuMode::DriverApi) {
            // Our images carry no CUDA plugin state: a plugin installed on the node stays out.
            let empty = crate::gpu::empty_plugin_dir(&c.bundle).map_err(gpu_err)?;
            runtime = runtime.with_criu_env(kybernate_gpu::cuda::preflight::CRIU_LIBS_DIR, empty);
        }
        let work = checkpoint::work_dir(c, None)?;
        let (mut io, child) = ProcessIo::prepare_owned(&c.init.stdio, &c.bundle, &c.id, &self.namespace, c.io_owner)?;
        let pid_file = c.bundle.join("init.pid");
        let mut child = Some(child);
        let mut guard = RestoreGuard { runtime: &c.runtime, id: &c.id, bundle: &c.bundle, armed: false };
        // A restore onto other GPUs restores from a work copy in the bundle: gone afterwards.
        let _work_images = crate::restore::WorkImages::of(plan, &c.bundle);
        let mut pid = None;
        info!("container {}: restoring from {}, steps {:?}", c.id, plan.dir.display(), plan.steps());
        for step in plan.steps() {
            match step {
                RestoreStep::Restore => {
                    let args = plan.restore_args(&c.bundle, &work, &pid_file, io.console_socket(), c.no_pivot);
                    let child = child.take().ok_or_else(|| restore_out_of_order(&c.id))?;
                    // From here runtime state (and a half-restored process) may exist.
                    guard.armed = true;
                    if let Err(e) = clock.phase("restore", || runtime.restore(&c.id, &c.bundle, args, child)) {
                        if let Some(refused) = gate.as_ref().and_then(|g| g.refusal(&c.id)) {
                            return Err(refused);
                        }
                        let log = work.join("restore.log");
                        let outcome = "the container was not restored".into();
                        return Err(CheckpointError::runtime_failure("restore", &c.id, e, &log, outcome).into());
                    }
                    if let Some(gate) = &gate {
                        gate.confirmed(&c.id)?;
                    }
                    io.attach()?;
                    pid = Some(read_pid_file(&pid_file)?);
                }
                RestoreStep::GpuRestore => {
                    // The restored CUDA processes are locked with their device memory in host
                    // memory: give it back to the GPUs and unlock them. A container whose GPU
                    // state cannot be restored is stopped, not left running half-restored.
                    let Some(gpu) = plan.gpu() else { continue };
                    clock.phase("gpu", || {
                        c.runtime.ps(&c.id, &c.bundle).map_err(Error::from).and_then(|pids| {
                            crate::gpu::restore_cuda(self.spawner.as_ref(), &c.id, gpu, &pids, &c.checkpoint_config)
                                .map_err(|e| gpu_err(e).into())
                        })
                    })?;
                }
            }
        }
        let pid = pid.ok_or_else(|| restore_out_of_order(&c.id))?;
        guard.armed = false;
        c.init.set_pid(pid);
        c.init.set_io(io);
        self.register_pid(&c.id, None, pid);
        self.watch_oom(c, pid);
        Ok(())
    }

    /// Init is [`Checkpointing`](ProcessStatus::Checkpointing) for the whole checkpoint: the
    /// requests that would change the container meanwhile are refused, Kill is not (see
    /// docs/architecture.md, "Task states").
    fn checkpoint(&self, req: &CheckpointTaskRequest) -> Result<()> {
        let c = self.container(&req.id)?;
        let st = c.init.transition(Action::Checkpoint).map_err(|e| match c.init.state().status {
            ProcessStatus::Checkpointing { .. } => CheckpointError::Busy { id: req.id.clone() }.into(),
            _ => e,
        })?;
        let result = self.checkpoint_as(&c, st.pid, st.status == ProcessStatus::Paused, req);
        c.init.settle(result.is_ok());
        result
    }

    fn checkpoint_as(&self, c: &Arc<Container>, pid: u32, was_paused: bool, req: &CheckpointTaskRequest) -> Result<()> {
        let checkpointer = Checkpointer { spawner: self.spawner.as_ref(), namespace: &self.namespace };
        let (request, target) = checkpoint_target(c, req).inspect_err(|e| checkpointer.refused(c, e))?;
        checkpointer.checkpoint(c, pid, &request, &target, was_paused)?;
        if request.image_path.is_some() && !req.path.is_empty() {
            checkpoint::write_pointer(Path::new(&req.path), &target, &c.id);
        }
        self.events.send(TaskCheckpointed {
            container_id: c.id.clone(),
            checkpoint: target.display().to_string(),
            ..Default::default()
        });
        Ok(())
    }

    fn start_exec(self: &Arc<Self>, c: &Container, p: &Arc<Process>) -> Result<()> {
        c.init.transition(Action::Exec)?;
        let spec = p.spec.as_ref().ok_or_else(|| Error::InvalidArgument(format!("exec {}: no process spec", p.id)))?;
        let (mut io, child) = ProcessIo::prepare_owned(&p.stdio, &c.bundle, &p.id, &self.namespace, c.io_owner)?;
        let pid_file = c.bundle.join(format!("{}.pid", exec_file_stem(&p.id)));
        let opts = ExecOpts { pid_file: pid_file.clone(), console_socket: io.console_socket().map(Path::to_path_buf) };
        c.runtime.exec(&c.id, &c.bundle, spec, &opts, child)?;
        io.attach()?;
        let pid = read_pid_file(&pid_file)?;
        let _ = std::fs::remove_file(&pid_file);
        p.set_io(io);
        p.set_pid(pid);
        self.register_pid(&c.id, Some(&p.id), pid);
        Ok(())
    }

    fn delete(&self, req: &DeleteRequest) -> Result<api::DeleteResponse> {
        let (c, p) = self.process(&req.id, &req.exec_id)?;
        // Created (or Restoring) or Stopped; a failed delete goes back there and can be retried.
        let st = p.transition(Action::Delete)?;
        let never_started = matches!(st.status, ProcessStatus::Created | ProcessStatus::Restoring);
        let exit = if req.exec_id.is_empty() {
            if let Err(e) = c.runtime.delete(&c.id, &c.bundle, never_started) {
                if !e.is_not_found() {
                    let _ = p.transition(Action::DeleteFailed(st.status));
                    return Err(e.into());
                }
            }
            // A never-started init is killed by the delete; give its exit a moment to arrive.
            let exit = if st.pid != 0 { p.wait_timeout(Duration::from_secs(5)) } else { p.state().exit };
            p.close_io();
            c.stop_oom_watcher();
            if c.rootfs_mounted {
                unmount_rootfs(&c.rootfs());
            }
            for e in c.exec_list() {
                e.close_io();
                self.forget_pid(e.pid());
            }
            lock(&self.containers).remove(&c.id);
            exit
        } else {
            p.close_io();
            c.remove_exec(&req.exec_id);
            p.state().exit
        };
        self.forget_pid(st.pid);
        let _ = p.transition(Action::Done);
        let (exit_status, exited_at) = match exit {
            Some(e) => (e.code, e.timestamp()),
            None if never_started && st.pid == 0 => (0, Default::default()),
            // Killed by the delete and its exit never arrived: report SIGKILL like the Go shim.
            None => (128 + libc::SIGKILL as u32, SystemTime::now().into()),
        };
        if req.exec_id.is_empty() {
            // After our TaskExit: its sender held this lock from recording the exit we saw.
            let _order = lock(&self.exit_order);
            self.events.send(TaskDelete {
                container_id: c.id.clone(),
                pid: st.pid,
                exit_status,
                exited_at: Some(exited_at.clone()).into(),
                id: c.id.clone(),
                ..Default::default()
            });
        }
        Ok(api::DeleteResponse { pid: st.pid, exit_status, exited_at: Some(exited_at).into(), ..Default::default() })
    }

    fn exec(&self, req: &ExecProcessRequest) -> Result<()> {
        let c = self.container(&req.id)?;
        if req.exec_id.is_empty() {
            return Err(Error::InvalidArgument(format!("exec in {}: empty exec id", req.id)));
        }
        c.init.transition(Action::Exec)?;
        let any = req
            .spec
            .as_ref()
            .ok_or_else(|| Error::InvalidArgument(format!("exec {}: no process spec", req.exec_id)))?;
        // Kept as JSON: runc reads it, and fields or values this shim does not know (a new
        // capability, a future field) are runc's to accept or refuse, as with the stock shim.
        let mut spec = match serde_json::from_slice::<serde_json::Value>(&any.value) {
            Ok(serde_json::Value::Object(o)) => o,
            Ok(_) => {
                return Err(Error::InvalidArgument(format!(
                    "exec {}: the process spec is not a JSON object",
                    req.exec_id
                )))
            }
            Err(e) => return Err(Error::InvalidArgument(format!("exec {}: malformed process spec: {e}", req.exec_id))),
        };
        spec.insert("terminal".into(), serde_json::Value::Bool(req.terminal));
        let spec = serde_json::Value::Object(spec);
        let stdio = StdioConfig {
            stdin: req.stdin.clone(),
            stdout: req.stdout.clone(),
            stderr: req.stderr.clone(),
            terminal: req.terminal,
        };
        let p = Process::new(req.exec_id.clone(), Some(req.exec_id.clone()), stdio, Some(spec));
        p.transition(Action::Created { restore: false })?;
        c.add_exec(Arc::new(p))?;
        self.events.send(TaskExecAdded {
            container_id: c.id.clone(),
            exec_id: req.exec_id.clone(),
            ..Default::default()
        });
        Ok(())
    }

    fn kill(&self, req: &KillRequest) -> Result<()> {
        let (c, p) = self.process(&req.id, &req.exec_id)?;
        if req.exec_id.is_empty() {
            // Allowed in every live state (a checkpoint included); with --all also after init
            // exited, for the processes that may remain.
            p.transition(Action::Kill { all: req.all })?;
            if p.state().pid == 0 {
                // A restore in flight gives init its pid.
                p.wait_settled(RESTORE_KILL_TIMEOUT);
            }
            let st = p.state();
            if st.pid == 0 {
                match st.status {
                    ProcessStatus::Starting => {
                        return Err(Error::FailedPrecondition(format!("kill {}: its restore is still running", c.id)))
                    }
                    // Created from a checkpoint and not restored (yet, or the restore failed):
                    // there is no process to signal. It ends here, as a created runc container would.
                    ProcessStatus::Restoring | ProcessStatus::Created => {
                        self.handle_exit(&c.id, None, 0, 128 + req.signal, SystemTime::now());
                        return Ok(());
                    }
                    _ => {}
                }
            }
            c.runtime.kill(&c.id, &c.bundle, req.signal, req.all)?;
            if matches!(st.status, ProcessStatus::Checkpointing { .. }) && stops(req.signal) {
                abandon_checkpoint(&c, req.signal);
            }
            return Ok(());
        }
        let st = p.transition(Action::Signal)?;
        let sig = nix::sys::signal::Signal::try_from(req.signal as i32)
            .map_err(|_| Error::InvalidArgument(format!("kill: invalid signal {}", req.signal)))?;
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(st.pid as i32), sig).map_err(|e| match e {
            nix::errno::Errno::ESRCH => Error::NotFound(format!("kill {}: process already finished", p.id)),
            e => Error::os(format!("kill exec {} (pid {})", p.id, st.pid))(e.into()),
        })
    }

    fn pause(&self, id: &str, pause: bool) -> Result<()> {
        let c = self.container(id)?;
        // Pausing/Resuming while the runtime call runs: no checkpoint or second pause can start.
        c.init.transition(if pause { Action::Pause } else { Action::Resume })?;
        let done = if pause { c.runtime.pause(&c.id, &c.bundle) } else { c.runtime.resume(&c.id, &c.bundle) };
        if done.is_ok() {
            // Before settling: an exit waits for the settle, so its TaskExit comes after this.
            if pause {
                self.events.send(TaskPaused { container_id: c.id.clone(), ..Default::default() });
            } else {
                self.events.send(TaskResumed { container_id: c.id.clone(), ..Default::default() });
            }
        }
        c.init.settle(done.is_ok());
        Ok(done?)
    }

    fn pids(&self, id: &str) -> Result<PidsResponse> {
        let c = self.container(id)?;
        let pids = c.runtime.ps(&c.id, &c.bundle)?;
        let execs: HashMap<u32, String> = c.exec_list().iter().map(|e| (e.pid(), e.id.clone())).collect();
        let mut resp = PidsResponse::new();
        for pid in pids {
            let mut info = ProcessInfo { pid: pid as u32, ..Default::default() };
            if let Some(exec_id) = execs.get(&(pid as u32)) {
                let details = ProcessDetails { exec_id: exec_id.clone(), ..Default::default() };
                let mut any = Any::new();
                any.type_url = "containerd.runc.v1.ProcessDetails".into();
                any.value = details
                    .write_to_bytes()
                    .map_err(Error::internal(format!("encode the details of exec {exec_id}")))?;
                info.info = Some(any).into();
            }
            resp.processes.push(info);
        }
        Ok(resp)
    }

    fn update(&self, req: &UpdateTaskRequest) -> Result<()> {
        let c = self.container(&req.id)?;
        c.init.transition(Action::Update)?;
        let any =
            req.resources.as_ref().ok_or_else(|| Error::InvalidArgument(format!("update {}: no resources", req.id)))?;
        // Passed on as JSON: fields this shim does not know are runc's to accept or refuse.
        let resources = match serde_json::from_slice::<serde_json::Value>(&any.value) {
            Ok(v @ serde_json::Value::Object(_)) => v,
            Ok(_) => return Err(Error::InvalidArgument(format!("update {}: resources are not a JSON object", req.id))),
            Err(e) => return Err(Error::InvalidArgument(format!("update {}: malformed resources: {e}", req.id))),
        };
        c.runtime.update(&c.id, &c.bundle, &resources)?;
        Ok(())
    }

    fn stats(&self, id: &str) -> Result<StatsResponse> {
        let c = self.container(id)?;
        let pid = c.init.transition(Action::Stats)?.pid;
        let stats = crate::stats::collect(pid)
            .map_err(|e| Error::Os { context: format!("stats {id}"), source: std::io::Error::other(e) })?;
        Ok(StatsResponse { stats: Some(stats).into(), ..Default::default() })
    }

    fn state(&self, req: &StateRequest) -> Result<StateResponse> {
        let (c, p) = self.process(&req.id, &req.exec_id)?;
        let st = p.state();
        Ok(StateResponse {
            id: p.id.clone(),
            bundle: c.bundle.display().to_string(),
            pid: st.pid,
            status: st.status.to_proto().into(),
            stdin: p.stdio.stdin.clone(),
            stdout: p.stdio.stdout.clone(),
            stderr: p.stdio.stderr.clone(),
            terminal: p.stdio.terminal,
            exit_status: st.exit.map(|e| e.code).unwrap_or_default(),
            exited_at: st.exit.map(|e| e.timestamp()).into(),
            exec_id: req.exec_id.clone(),
            ..Default::default()
        })
    }
}

/// Exec ids come from clients: never use them raw in a file name.
/// After init's exit in a container without a PID namespace of its own, kills its other
/// processes (`<runtime> kill --all KILL`, as containerd's runc shim does): nothing else ends them,
/// and a child holding init's stdout would hold up the exit report for [`OUTPUT_DRAIN_TIMEOUT`].
/// Signals that stop a job (kubelet's StopContainer, `ctr task kill`, `kill -9`): sent during a
/// checkpoint, they end it too.
fn stops(signal: u32) -> bool {
    signal == libc::SIGKILL as u32 || signal == libc::SIGTERM as u32
}

/// The options and target directory of a checkpoint request.
fn checkpoint_target(c: &Container, req: &CheckpointTaskRequest) -> Result<(CheckpointRequest, PathBuf)> {
    let mut request = CheckpointRequest::decode(&req.id, req.options.as_ref())?;
    // A terminal container's pty is outside it: CRIU can only dump it as a shell job.
    request.flags.terminal |= c.init.stdio.terminal;
    let target = request
        .image_path
        .clone()
        .or_else(|| Some(PathBuf::from(&req.path)).filter(|p| !p.as_os_str().is_empty()))
        .ok_or_else(|| Error::InvalidArgument(format!("checkpoint {}: neither path nor image_path given", req.id)))?;
    Ok((request, target))
}

/// A Kill during a checkpoint: the checkpoint is abandoned, so that an operator can stop a job
/// whose checkpoint hangs. The signal is pending while CRIU holds the container frozen; killing
/// the runtime call's process group (runc and CRIU) makes the checkpoint fail, its rollback thaws
/// the container, and the signal lands. Past the dump there is no such call, and the checkpoint
/// completes as the container ends.
/// A restore plan whose steps are not one runtime restore followed by what needs its process.
fn restore_out_of_order(id: &str) -> Error {
    Error::Internal {
        context: format!("restore {id}"),
        source: Box::new(std::io::Error::other("the restore plan's steps are out of order")),
    }
}

fn abandon_checkpoint(c: &Container, signal: u32) {
    let killed = GroupRecord::in_bundle(&c.bundle).kill_leftovers();
    if killed > 0 {
        warn!("container {}: signal {signal} during its checkpoint: the checkpoint is abandoned ({killed} runtime process(es) killed)", c.id);
    }
}

fn kill_the_rest(c: &Container) {
    match c.runtime.kill(&c.id, &c.bundle, libc::SIGKILL as u32, true) {
        Ok(()) => info!("container {}: init exited; killed the rest of its processes", c.id),
        Err(e) if e.is_not_found() => {}
        Err(e) => warn!("container {}: init exited; cannot kill the rest of its processes: {e}", c.id),
    }
}

fn exec_file_stem(exec_id: &str) -> String {
    let safe: String =
        exec_id.chars().map(|c| if c.is_ascii_alphanumeric() || c == '-' || c == '_' { c } else { '_' }).collect();
    format!("exec-{safe}")
}

impl Task for TaskService {
    fn state(&self, _: &TtrpcContext, req: StateRequest) -> TtrpcResult<StateResponse> {
        Ok(self.inner.state(&req)?)
    }

    fn create(&self, _: &TtrpcContext, req: CreateTaskRequest) -> TtrpcResult<CreateTaskResponse> {
        let pid = self.inner.create(&req).inspect_err(|e| warn!("create {}: {e}", req.id))?;
        Ok(CreateTaskResponse { pid, ..Default::default() })
    }

    fn start(&self, _: &TtrpcContext, req: StartRequest) -> TtrpcResult<StartResponse> {
        let pid = self.inner.start(&req).inspect_err(|e| warn!("start {} {}: {e}", req.id, req.exec_id))?;
        Ok(StartResponse { pid, ..Default::default() })
    }

    fn delete(&self, _: &TtrpcContext, req: DeleteRequest) -> TtrpcResult<api::DeleteResponse> {
        Ok(self.inner.delete(&req)?)
    }

    fn pids(&self, _: &TtrpcContext, req: PidsRequest) -> TtrpcResult<PidsResponse> {
        Ok(self.inner.pids(&req.id)?)
    }

    fn pause(&self, _: &TtrpcContext, req: PauseRequest) -> TtrpcResult<Empty> {
        self.inner.pause(&req.id, true)?;
        Ok(Empty::new())
    }

    fn resume(&self, _: &TtrpcContext, req: ResumeRequest) -> TtrpcResult<Empty> {
        self.inner.pause(&req.id, false)?;
        Ok(Empty::new())
    }

    fn kill(&self, _: &TtrpcContext, req: KillRequest) -> TtrpcResult<Empty> {
        self.inner.kill(&req)?;
        Ok(Empty::new())
    }

    fn exec(&self, _: &TtrpcContext, req: ExecProcessRequest) -> TtrpcResult<Empty> {
        self.inner.exec(&req)?;
        Ok(Empty::new())
    }

    fn resize_pty(&self, _: &TtrpcContext, req: ResizePtyRequest) -> TtrpcResult<Empty> {
        let (_, p) = self.inner.process(&req.id, &req.exec_id)?;
        p.with_io(|io| io.resize(req.width, req.height)).transpose().map_err(Error::from)?;
        Ok(Empty::new())
    }

    fn close_io(&self, _: &TtrpcContext, req: CloseIORequest) -> TtrpcResult<Empty> {
        let (_, p) = self.inner.process(&req.id, &req.exec_id)?;
        if req.stdin {
            p.with_io(|io| io.close_stdin());
        }
        Ok(Empty::new())
    }

    fn update(&self, _: &TtrpcContext, req: UpdateTaskRequest) -> TtrpcResult<Empty> {
        self.inner.update(&req)?;
        Ok(Empty::new())
    }

    fn wait(&self, _: &TtrpcContext, req: WaitRequest) -> TtrpcResult<WaitResponse> {
        let (_, p) = self.inner.process(&req.id, &req.exec_id)?;
        let exit = p.wait();
        Ok(WaitResponse { exit_status: exit.code, exited_at: Some(exit.timestamp()).into(), ..Default::default() })
    }

    fn stats(&self, _: &TtrpcContext, req: StatsRequest) -> TtrpcResult<StatsResponse> {
        Ok(self.inner.stats(&req.id)?)
    }

    fn checkpoint(&self, _: &TtrpcContext, req: CheckpointTaskRequest) -> TtrpcResult<Empty> {
        self.inner.checkpoint(&req).inspect_err(|e| warn!("checkpoint {}: {e}", req.id))?;
        Ok(Empty::new())
    }

    fn connect(&self, _: &TtrpcContext, req: ConnectRequest) -> TtrpcResult<ConnectResponse> {
        let task_pid = self.inner.container(&req.id).map(|c| c.init.pid()).unwrap_or_default();
        Ok(ConnectResponse { shim_pid: std::process::id(), task_pid, ..Default::default() })
    }

    fn shutdown(&self, _: &TtrpcContext, _req: ShutdownRequest) -> TtrpcResult<Empty> {
        // Another container of the group may still live here.
        if lock(&self.inner.containers).is_empty() {
            if let Err(e) = self.inner.events.flush(Duration::from_secs(5)) {
                warn!("shutdown: {e}");
            }
            self.inner.exit_signal.signal();
        }
        Ok(Empty::new())
    }
}

#[cfg(test)]
mod tests;
