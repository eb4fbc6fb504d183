//! The spec corpus: every spec the stock shim (`containerd-shim-runc-v2` + runc) runs, ours runs
//! the same way with the same GPU decision; every spec runc refuses, ours refuses with runc's
//! message (issue #23, "Never refuse what runc runs").
//!
//! Each case is a base spec from `shim/tests/specs/` (containerd's default, a CRI container's
//! with the default seccomp profile, `runc spec`, a minimal one) plus an edit: a runtime-spec
//! 1.0 → 1.2 field, a made-up future value in an enum-like field, unknown fields, a field of the
//! wrong shape, a GPU request. Each case runs once under `io.containerd.runc.v2` and once under
//! ours, on one private containerd 1.6.
//!
//! The spec bytes go to containerd through its Containers API as they are, and the task is
//! created through the Tasks API: `ctr` would decode the spec into containerd's Go structs first,
//! dropping every field they do not know (and refusing wrong shapes itself), so the shims would
//! never see them.
//!
//! Our shim's runtime decision (its runtime record, or its log line where create failed) must be
//! the one for the same GPU request on the unedited base spec. GPU cases go to
//! `nvidia-container-runtime`: the fake from shim/examples/fake_nvidia_runtime.rs, which passes
//! through to runc; the stock shim, which knows nothing of GPUs, gives the expected outcome.
//!
//! To add a case, see docs/testing.md ("The spec corpus").

use std::path::Path;
use std::time::{Duration, Instant};

use containerd_client::services::v1::container::Runtime;
use containerd_client::services::v1::containers_client::ContainersClient;
use containerd_client::services::v1::snapshots::snapshots_client::SnapshotsClient;
use containerd_client::services::v1::snapshots::{PrepareSnapshotRequest, RemoveSnapshotRequest, StatSnapshotRequest};
use containerd_client::services::v1::tasks_client::TasksClient;
use containerd_client::services::v1::{
    Container, CreateContainerRequest, CreateTaskRequest, DeleteContainerRequest, DeleteTaskRequest, StartRequest,
    WaitRequest,
};
use containerd_client::tonic::transport::Channel;
use containerd_client::tonic::Request;
use containerd_client::with_namespace;
use kybernate_testbed::{unique_name, Testbed, IMAGE};
use serde_json::{json, Value};

mod common;

use common::{bundle_dir, fake_gpu_runtime_binary, shim_dir, RUNTIME};

/// The stock shim's runtime name.
const STOCK: &str = "io.containerd.runc.v2";
/// What every container runs: an exit status and output that cannot come from anything else.
const ARGS: [&str; 3] = ["/bin/sh", "-c", "echo spec-corpus; exit 7"];
/// containerd's type URL for an OCI runtime spec in its metadata.
const SPEC_TYPE_URL: &str = "types.containerd.io/opencontainers/runtime-spec/1/Spec";
const SNAPSHOTTER: &str = "overlayfs";
/// Bound on each containerd API call (create, start, wait ...): a stuck shim fails the case.
const CALL_TIMEOUT: Duration = Duration::from_secs(30);

// ---------------------------------------------------------------------------------------------
// The corpus

/// A GPU request put into a case's spec (before its edit).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Gpu {
    None,
    /// `NVIDIA_VISIBLE_DEVICES=all`.
    Env,
    /// `NVIDIA_VISIBLE_DEVICES=none`: driver only, no devices.
    DriverOnly,
    /// A `cdi.k8s.io/…` annotation naming an `nvidia.com/gpu` device.
    Cdi,
    /// `/dev/nvidia0` (char 195:0) in `linux.devices`.
    Device,
}

impl Gpu {
    /// The runtime and GPU flag runtime-select's rules give (docs/architecture.md): any GPU
    /// request goes to the GPU runtime; only `none` asks for no devices.
    fn decision(self) -> (&'static str, bool) {
        match self {
            Gpu::None => ("runc", false),
            Gpu::DriverOnly => ("nvidia-container-runtime", false),
            Gpu::Env | Gpu::Cdi | Gpu::Device => ("nvidia-container-runtime", true),
        }
    }
}

struct Case {
    name: &'static str,
    /// File stem in shim/tests/specs/.
    base: &'static str,
    gpu: Gpu,
    edit: fn(&mut Value),
}

const fn case(name: &'static str, base: &'static str, edit: fn(&mut Value)) -> Case {
    Case { name, base, gpu: Gpu::None, edit }
}

const fn gpu_case(name: &'static str, gpu: Gpu, edit: fn(&mut Value)) -> Case {
    Case { name, base: DEFAULT, gpu, edit }
}

const DEFAULT: &str = "containerd-default";
const CRI: &str = "cri";
const RUNC: &str = "runc-spec";
const MINIMAL: &str = "minimal";

fn unchanged(_: &mut Value) {}

/// Every case. The unedited base specs come first: their decisions are the references for the
/// cases built on them (same base, same GPU request).
fn corpus() -> Vec<Case> {
    vec![
        // The bases as their tools write them.
        case("containerd default (ctr oci spec)", DEFAULT, unchanged),
        case("CRI container with the default seccomp profile", CRI, unchanged),
        case("runc spec", RUNC, unchanged),
        case("minimal: no user, env, capabilities, cgroups path", MINIMAL, unchanged),
        gpu_case("GPU: NVIDIA_VISIBLE_DEVICES=all", Gpu::Env, unchanged),
        gpu_case("GPU: NVIDIA_VISIBLE_DEVICES=none", Gpu::DriverOnly, unchanged),
        gpu_case("GPU: CDI annotation", Gpu::Cdi, unchanged),
        gpu_case("GPU: /dev/nvidia0 device", Gpu::Device, unchanged),
        // CRI with an AppArmor profile (these machines have no AppArmor: whatever runc makes of it).
        case("CRI + AppArmor profile", CRI, |s| set(s, "/process/apparmorProfile", json!("cri-containerd.apparmor.d"))),
        // runtime-spec 1.0.x fields.
        case("1.0 hooks", DEFAULT, |s| {
            let hook = json!([{"path": "/bin/true", "args": ["true"], "env": ["A=1"], "timeout": 10}]);
            for h in ["prestart", "createRuntime", "createContainer", "startContainer", "poststart", "poststop"] {
                set(s, &format!("/hooks/{h}"), hook.clone());
            }
        }),
        case("1.0 rlimits, sysctl, oomScoreAdj", DEFAULT, |s| {
            push(s, "/process/rlimits", json!({"type": "RLIMIT_NPROC", "hard": 4096, "soft": 4096}));
            set(s, "/linux/sysctl", json!({"kernel.shm_rmid_forced": "1"}));
            set(s, "/process/oomScoreAdj", json!(500));
        }),
        case("1.0 extra device", DEFAULT, |s| {
            push(
                s,
                "/linux/devices",
                json!({"path": "/dev/fuse", "type": "c", "major": 10, "minor": 229, "fileMode": 438}),
            );
        }),
        case("1.0 other platforms' sections", DEFAULT, |s| {
            set(s, "/solaris", json!({"milestone": "svc:/milestone/container:default"}));
            set(s, "/windows", json!({"layerFolders": ["C:\\layers\\1"], "ignoreFlushesDuringBoot": true}));
            set(s, "/vm", json!({"kernel": {"path": "/boot/vmlinuz"}}));
            set(s, "/zos", json!({"namespaces": []}));
        }),
        // runtime-spec 1.1 fields.
        case("1.1 linux.personality LINUX", DEFAULT, |s| set(s, "/linux/personality", json!({"domain": "LINUX"}))),
        case("1.1 process.ioPriority", DEFAULT, |s| {
            set(s, "/process/ioPriority", json!({"class": "IOPRIO_CLASS_BE", "priority": 4}))
        }),
        case("1.1 process.user.umask", DEFAULT, |s| set(s, "/process/user/umask", json!(18))),
        case("1.0.2 seccomp defaultErrnoRet", CRI, |s| set(s, "/linux/seccomp/defaultErrnoRet", json!(1))),
        case("1.1 seccomp flags", CRI, |s| set(s, "/linux/seccomp/flags", json!(["SECCOMP_FILTER_FLAG_SPEC_ALLOW"]))),
        case("1.1 seccomp listener without a path", CRI, |s| {
            set(s, "/linux/seccomp/listenerMetadata", json!("corpus"))
        }),
        case("1.1 linux.resources.unified", DEFAULT, |s| {
            set(s, "/linux/resources/unified", json!({"pids.max": "100"}))
        }),
        // runtime-spec 1.2 fields.
        case("1.2 domainname", DEFAULT, |s| set(s, "/domainname", json!("corpus.example"))),
        case("1.2 process.scheduler", DEFAULT, |s| {
            set(s, "/process/scheduler", json!({"policy": "SCHED_OTHER", "nice": 0}))
        }),
        case("1.2 linux.timeOffsets", DEFAULT, |s| {
            set(s, "/linux/timeOffsets", json!({"monotonic": {"secs": 1, "nanosecs": 0}, "boottime": {"secs": 1}}))
        }),
        case("1.2 mount idmap fields", DEFAULT, |s| {
            let map = json!([{"containerID": 0, "hostID": 100000, "size": 65536}]);
            push(
                s,
                "/mounts",
                json!({"destination": "/idmapped", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid"],
                       "uidMappings": map, "gidMappings": map}),
            );
        }),
        case("1.2 mount option rro", DEFAULT, |s| {
            push(s, "/mounts", json!({"destination": "/rro", "type": "tmpfs", "source": "tmpfs", "options": ["rro"]}))
        }),
        case("1.2 linux.netDevices", DEFAULT, |s| set(s, "/linux/netDevices", json!({"eth42": {"name": "eth42"}}))),
        case("1.2 linux.intelRdt", DEFAULT, |s| {
            set(s, "/linux/intelRdt", json!({"closID": "corpus", "l3CacheSchema": "L3:0=f", "enableMonitoring": true}))
        }),
        case("1.2 linux.memoryPolicy", DEFAULT, |s| {
            set(
                s,
                "/linux/memoryPolicy",
                json!({"mode": "MPOL_INTERLEAVE", "nodes": "0", "flags": ["MPOL_F_STATIC_NODES"]}),
            )
        }),
        case("1.2 process.execCPUAffinity", DEFAULT, |s| {
            set(s, "/process/execCPUAffinity", json!({"initial": "0", "final": "0"}))
        }),
        // Made-up future values in every enum-like field.
        case("future capability", DEFAULT, |s| {
            for set_name in ["bounding", "effective", "permitted", "inheritable", "ambient"] {
                push(s, &format!("/process/capabilities/{set_name}"), json!("CAP_FUTURE_42"));
            }
        }),
        case("future personality domain and flag", DEFAULT, |s| {
            set(s, "/linux/personality", json!({"domain": "LINUX_FUTURE", "flags": ["FUTURE_FLAG"]}))
        }),
        case("future namespace type", DEFAULT, |s| push(s, "/linux/namespaces", json!({"type": "future"}))),
        case("future seccomp default action", CRI, |s| {
            set(s, "/linux/seccomp/defaultAction", json!("SCMP_ACT_FUTURE"))
        }),
        case("future seccomp architecture", CRI, |s| {
            push(s, "/linux/seccomp/architectures", json!("SCMP_ARCH_FUTURE"))
        }),
        case("future seccomp flag", CRI, |s| set(s, "/linux/seccomp/flags", json!(["SECCOMP_FILTER_FLAG_FUTURE"]))),
        case("future syscall name", CRI, |s| {
            push(s, "/linux/seccomp/syscalls", json!({"names": ["future_syscall_42"], "action": "SCMP_ACT_ERRNO"}))
        }),
        case("future seccomp rule action", CRI, |s| {
            push(s, "/linux/seccomp/syscalls", json!({"names": ["getcwd"], "action": "SCMP_ACT_FUTURE"}))
        }),
        case("future seccomp argument operator", CRI, |s| {
            push(
                s,
                "/linux/seccomp/syscalls",
                json!({"names": ["personality"], "action": "SCMP_ACT_ALLOW",
                       "args": [{"index": 0, "value": 8, "op": "SCMP_CMP_FUTURE"}]}),
            )
        }),
        case("future mount type", DEFAULT, |s| {
            push(s, "/mounts", json!({"destination": "/future", "type": "futurefs", "source": "none"}))
        }),
        case("future mount option", DEFAULT, |s| {
            push(
                s,
                "/mounts",
                json!({"destination": "/future", "type": "tmpfs", "source": "tmpfs", "options": ["future-opt"]}),
            )
        }),
        case("future rlimit type", DEFAULT, |s| {
            push(s, "/process/rlimits", json!({"type": "RLIMIT_FUTURE", "hard": 1, "soft": 1}))
        }),
        case("future device type", DEFAULT, |s| {
            push(s, "/linux/devices", json!({"path": "/dev/future", "type": "z", "major": 1, "minor": 3}))
        }),
        case("future device cgroup rule type", DEFAULT, |s| {
            push(
                s,
                "/linux/resources/devices",
                json!({"allow": true, "type": "z", "major": 1, "minor": 3, "access": "r"}),
            )
        }),
        case("future hook name", DEFAULT, |s| set(s, "/hooks/futureHook", json!([{"path": "/bin/false"}]))),
        case("future ioPriority class", DEFAULT, |s| {
            set(s, "/process/ioPriority", json!({"class": "IOPRIO_CLASS_FUTURE", "priority": 4}))
        }),
        case("future scheduler policy and flag", DEFAULT, |s| {
            set(s, "/process/scheduler", json!({"policy": "SCHED_FUTURE", "flags": ["SCHED_FLAG_FUTURE"]}))
        }),
        case("future time offset clock", DEFAULT, |s| {
            set(s, "/linux/timeOffsets", json!({"future_clock": {"secs": 1}}))
        }),
        case("future memory policy mode", DEFAULT, |s| set(s, "/linux/memoryPolicy", json!({"mode": "MPOL_FUTURE"}))),
        case("future rootfs propagation", DEFAULT, |s| set(s, "/linux/rootfsPropagation", json!("future"))),
        case("future ociVersion", DEFAULT, |s| set(s, "/ociVersion", json!("1.9.0-future"))),
        case("unknown fields at every level", DEFAULT, add_unknown_fields),
        case("unknown fields in the CRI spec", CRI, add_unknown_fields),
        case("unknown fields in runc spec", RUNC, add_unknown_fields),
        // Wrong shapes: runc's JSON decoder refuses them; so must we, with its words.
        case("wrong shape: process.env as an object", DEFAULT, |s| set(s, "/process/env", json!({"A": "B"}))),
        case("wrong shape: process.user.uid as a string", DEFAULT, |s| set(s, "/process/user/uid", json!("zero"))),
        case("wrong shape: linux.devices as an object", DEFAULT, |s| {
            set(s, "/linux/devices", json!({"path": "/dev/x"}))
        }),
        // GPU requests with future values and unknown fields: the same decision as without.
        gpu_case("GPU env + future values", Gpu::Env, add_future_values),
        gpu_case("GPU none + future values", Gpu::DriverOnly, add_future_values),
        gpu_case("GPU CDI + future values", Gpu::Cdi, add_future_values),
        gpu_case("GPU device + future values", Gpu::Device, |s| {
            add_future_values(s);
            // The NVIDIA device entry itself grows a field.
            let devices = s.pointer_mut("/linux/devices").and_then(Value::as_array_mut).expect("linux.devices");
            for d in devices.iter_mut().filter(|d| d["major"] == 195) {
                d["futureField"] = json!({"x": 1});
            }
        }),
    ]
}

/// Values runc 1.1.5 ignores, that a strict decoder would not know.
fn add_future_values(s: &mut Value) {
    push(s, "/process/capabilities/bounding", json!("CAP_FUTURE_42"));
    set(s, "/linux/personality", json!({"domain": "LINUX_FUTURE"}));
    set(s, "/process/ioPriority", json!({"class": "IOPRIO_CLASS_FUTURE", "priority": 1}));
    add_unknown_fields(s);
}

fn add_unknown_fields(s: &mut Value) {
    set(s, "/futureTopLevel", json!({"nested": [1, {"deep": true}]}));
    set(s, "/process/futureField", json!("x"));
    set(s, "/process/user/futureField", json!(1));
    set(s, "/process/capabilities/futureSet", json!(["CAP_CHOWN"]));
    set(s, "/root/futureField", json!(null));
    set(s, "/linux/futureField", json!({"a": "b"}));
    set(s, "/linux/resources/futureController", json!({"limit": 1}));
    for ptr in ["/mounts/0", "/linux/namespaces/0"] {
        if let Some(Value::Object(o)) = s.pointer_mut(ptr) {
            o.insert("futureField".into(), json!(true));
        }
    }
}

/// Sets the value at a JSON pointer, creating objects on the way.
fn set(v: &mut Value, ptr: &str, value: Value) {
    let mut cur = v;
    let mut parts = ptr.trim_start_matches('/').split('/').peekable();
    while let Some(raw) = parts.next() {
        let key = &raw.replace("~1", "/").replace("~0", "~");
        if parts.peek().is_none() {
            match cur {
                Value::Object(o) => {
                    o.insert(key.clone(), value);
                }
                Value::Array(a) => a[key.parse::<usize>().expect("array index")] = value,
                other => panic!("cannot set {ptr}: {other} is not a container"),
            }
            return;
        }
        cur = match cur {
            Value::Object(o) => o.entry(key.clone()).or_insert_with(|| json!({})),
            Value::Array(a) => &mut a[key.parse::<usize>().expect("array index")],
            other => panic!("cannot set {ptr}: {other} is not a container"),
        };
    }
}

/// Appends to the array at a JSON pointer, creating it if missing.
fn push(v: &mut Value, ptr: &str, value: Value) {
    if v.pointer(ptr).is_none() {
        set(v, ptr, json!([]));
    }
    v.pointer_mut(ptr).and_then(Value::as_array_mut).unwrap_or_else(|| panic!("{ptr} is not an array")).push(value);
}

fn base_spec(name: &str) -> Value {
    if name == MINIMAL {
        return json!({
            "ociVersion": "1.0.2",
            "process": {"args": [], "cwd": "/"},
            "root": {"path": "rootfs"},
            "mounts": [{"destination": "/proc", "type": "proc", "source": "proc"}],
            "linux": {"namespaces": [{"type": "mount"}, {"type": "pid"}, {"type": "ipc"}, {"type": "uts"}]}
        });
    }
    let file = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/specs").join(format!("{name}.json"));
    let bytes = std::fs::read(&file).unwrap_or_else(|e| panic!("reading {}: {e}", file.display()));
    serde_json::from_slice(&bytes).unwrap_or_else(|e| panic!("{}: {e}", file.display()))
}

/// The spec of `case` for container `id`: its base with what every container needs here (our
/// command, no terminal, the rootfs containerd mounts, a cgroup of its own), its GPU request, then
/// its edit.
fn spec_for(case: &Case, tb: &Testbed, id: &str) -> Value {
    let mut s = base_spec(case.base);
    set(&mut s, "/process/args", json!(ARGS));
    set(&mut s, "/process/terminal", json!(false));
    set(&mut s, "/root/path", json!("rootfs"));
    if s.pointer("/linux/cgroupsPath").is_some() {
        set(&mut s, "/linux/cgroupsPath", json!(format!("/{}/{id}", tb.namespace())));
    }
    match case.gpu {
        Gpu::None => {}
        Gpu::Env => push(&mut s, "/process/env", json!("NVIDIA_VISIBLE_DEVICES=all")),
        Gpu::DriverOnly => push(&mut s, "/process/env", json!("NVIDIA_VISIBLE_DEVICES=none")),
        Gpu::Cdi => set(&mut s, "/annotations/cdi.k8s.io~1gpu", json!("nvidia.com/gpu=0")),
        Gpu::Device => push(
            &mut s,
            "/linux/devices",
            json!({"path": "/dev/nvidia0", "type": "c", "major": 195, "minor": 0, "fileMode": 438, "uid": 0, "gid": 0}),
        ),
    }
    (case.edit)(&mut s);
    s
}

// ---------------------------------------------------------------------------------------------
// Running a spec

/// What one shim made of one spec.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Outcome {
    /// The container ran: its exit status and output.
    Ran { code: u32, stdout: String },
    /// Create or start failed: containerd's error message.
    Refused(String),
}

/// Our shim's runtime decision for a container: from its runtime record in the bundle
/// (`kybernate-runtime.json`) when the task was created, else from its log line.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Decision {
    /// The runtime binary's file name.
    runtime: String,
    gpu: bool,
    /// The evidence items as the shim words them, joined by "; ".
    evidence: String,
}

impl Decision {
    /// From the runtime record (read leniently: only what the comparison needs).
    fn from_record(record: &Value) -> Option<Decision> {
        let runtime = Path::new(record.get("binary")?.as_str()?).file_name()?.to_string_lossy().into_owned();
        let evidence: Vec<&str> =
            record.get("evidence")?.as_array()?.iter().map(|e| e.as_str().unwrap_or_default()).collect();
        Some(Decision { runtime, gpu: record.get("gpu")?.as_bool()?, evidence: evidence.join("; ") })
    }
}

/// The private containerd's Containers, Snapshots and Tasks APIs, called synchronously.
struct Api {
    rt: tokio::runtime::Runtime,
    containers: ContainersClient<Channel>,
    snapshots: SnapshotsClient<Channel>,
    tasks: TasksClient<Channel>,
    ns: String,
}

impl Api {
    fn connect(tb: &Testbed) -> Api {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("tokio runtime");
        let channel = rt
            .block_on(containerd_client::connect(tb.address()))
            .unwrap_or_else(|e| panic!("connecting to {}: {e}", tb.address().display()));
        Api {
            rt,
            containers: ContainersClient::new(channel.clone()),
            snapshots: SnapshotsClient::new(channel.clone()),
            tasks: TasksClient::new(channel),
            ns: tb.namespace().to_string(),
        }
    }

    /// Runs a call with [`CALL_TIMEOUT`]; the error is containerd's message.
    fn call<T>(
        &self,
        what: &str,
        f: impl std::future::Future<Output = Result<T, containerd_client::tonic::Status>>,
    ) -> Result<T, String> {
        match self.rt.block_on(async { tokio::time::timeout(CALL_TIMEOUT, f).await }) {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(status)) => Err(status.message().to_string()),
            Err(_) => Err(format!("{what}: no answer within {CALL_TIMEOUT:?}")),
        }
    }

    /// The snapshot the image's rootfs is: the parent of a container's snapshot made by `ctr`.
    fn image_snapshot(&self, tb: &Testbed) -> String {
        let probe = unique_name("probe");
        tb.ctr_ok(&["containers", "create", IMAGE, &probe]);
        let req = StatSnapshotRequest { snapshotter: SNAPSHOTTER.into(), key: probe.clone() };
        let mut snapshots = self.snapshots.clone();
        let info = self.call("stat", snapshots.stat(with_namespace!(req, self.ns))).expect("stat the probe's snapshot");
        tb.ctr_ok(&["containers", "delete", &probe]);
        info.into_inner().info.expect("snapshot info").parent
    }

    /// Runs `spec` as container `id` under `runtime` to its exit, then removes it. Also returns
    /// our shim's runtime record, read from the bundle between create and start.
    fn run(&self, tb: &Testbed, runtime: &str, id: &str, parent: &str, spec: &Value) -> (Outcome, Option<Value>) {
        let ns = self.ns.clone();
        let mut snapshots = self.snapshots.clone();
        let mut containers = self.containers.clone();
        let mut tasks = self.tasks.clone();
        let prepare = PrepareSnapshotRequest {
            snapshotter: SNAPSHOTTER.into(),
            key: id.into(),
            parent: parent.into(),
            // Kept from containerd's garbage collection until removed below: nothing refers to
            // it before its container exists.
            labels: [("containerd.io/gc.root".to_string(), "spec-corpus".to_string())].into(),
        };
        let mounts =
            self.call("prepare", snapshots.prepare(with_namespace!(prepare, ns))).expect("prepare").into_inner();
        let container = Container {
            id: id.into(),
            image: IMAGE.into(),
            runtime: Some(Runtime { name: runtime.into(), options: None }),
            spec: Some(prost_types::Any {
                type_url: SPEC_TYPE_URL.into(),
                value: serde_json::to_vec(spec).expect("spec to JSON"),
            }),
            snapshotter: SNAPSHOTTER.into(),
            snapshot_key: id.into(),
            ..Default::default()
        };
        let req = CreateContainerRequest { container: Some(container) };
        self.call("create container", containers.create(with_namespace!(req, ns))).expect("create the container");

        let out_dir = tb.dir().join("spec-corpus");
        std::fs::create_dir_all(&out_dir).expect("the output dir");
        let (stdout, stderr) = (out_dir.join(format!("{id}.out")), out_dir.join(format!("{id}.err")));
        let mut record = None;
        let create = CreateTaskRequest {
            container_id: id.into(),
            rootfs: mounts.mounts,
            stdout: format!("file://{}", stdout.display()),
            stderr: format!("file://{}", stderr.display()),
            ..Default::default()
        };
        let outcome = match self.call("create task", tasks.create(with_namespace!(create, ns))) {
            Err(e) => Outcome::Refused(e),
            Ok(_) => {
                let file = bundle_dir(tb, id).join("kybernate-runtime.json");
                record = std::fs::read(&file).ok().and_then(|b| serde_json::from_slice(&b).ok());
                let start = StartRequest { container_id: id.into(), ..Default::default() };
                match self.call("start", tasks.start(with_namespace!(start, ns))) {
                    Err(e) => Outcome::Refused(e),
                    Ok(_) => {
                        let wait = WaitRequest { container_id: id.into(), ..Default::default() };
                        match self.call("wait", tasks.wait(with_namespace!(wait, ns))) {
                            Err(e) => Outcome::Refused(format!("wait: {e}")),
                            Ok(r) => Outcome::Ran { code: r.into_inner().exit_status, stdout: String::new() },
                        }
                    }
                }
            }
        };
        // A task that was created is deleted whatever happened after; one that was not is absent.
        let delete = DeleteTaskRequest { container_id: id.into() };
        let _ = self.call("delete task", tasks.delete(with_namespace!(delete, ns)));
        let req = DeleteContainerRequest { id: id.into() };
        self.call("delete container", containers.delete(with_namespace!(req, ns))).expect("delete the container");
        let req = RemoveSnapshotRequest { snapshotter: SNAPSHOTTER.into(), key: id.into() };
        let _ = self.call("remove snapshot", snapshots.remove(with_namespace!(req, ns)));
        let outcome = match outcome {
            // Read after the task's delete: both shims have copied all output by then.
            Outcome::Ran { code, .. } => {
                Outcome::Ran { code, stdout: std::fs::read_to_string(&stdout).unwrap_or_default() }
            }
            refused => refused,
        };
        (outcome, record)
    }
}

/// runc's own words in a refusal: containerd's and the shim's prefixes and gRPC's `: unknown`
/// suffix removed, the container id replaced by `<id>`.
fn runc_words(message: &str, id: &str) -> String {
    let m = message.trim();
    let m = m.strip_suffix(": unknown").unwrap_or(m);
    let m =
        ["runc create failed: ", "runc start failed: ", "OCI runtime create failed: ", "failed to create shim task: "]
            .iter()
            .find_map(|p| m.rfind(p).map(|i| &m[i + p.len()..]))
            .unwrap_or(m);
    m.replace(id, "<id>")
}

/// Our shim's decision for `id` from its log line `container ID: runtime PATH (source: …, gpu: …,
/// evidence: […])`, which containerd copies into its log; for containers whose create failed
/// (their bundle is gone). `None` if it logged none: it refused the spec before deciding.
fn logged_decision(tb: &Testbed, id: &str) -> Option<Decision> {
    let marker = format!("container {id}: runtime ");
    let deadline = Instant::now() + Duration::from_secs(2);
    loop {
        let log = std::fs::read(tb.log_path()).map(|b| String::from_utf8_lossy(&b).into_owned()).unwrap_or_default();
        if let Some(line) = log.lines().find(|l| l.contains(&marker)) {
            let rest = &line[line.find(&marker).unwrap() + marker.len()..];
            let (runtime, rest) = rest.split_once(" (source: ")?;
            let gpu = rest.split_once("gpu: ")?.1.starts_with("true");
            let evidence = rest.split_once("evidence: [")?.1;
            let evidence = &evidence[..evidence.rfind(']')?];
            return Some(Decision {
                runtime: Path::new(runtime).file_name()?.to_string_lossy().into_owned(),
                gpu,
                evidence: evidence.to_string(),
            });
        }
        if Instant::now() > deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

// ---------------------------------------------------------------------------------------------
// The test

/// A test bed whose containerd finds our shim and the fake GPU runtime (passing through to the
/// system's runc) on its PATH; the scratch dir holds the fake.
fn corpus_bed() -> (Testbed, tempfile::TempDir) {
    let scratch = kybernate_testbed::scratch_dir().expect("scratch dir");
    let nvidia = scratch.path().join("nvidia");
    std::fs::create_dir_all(&nvidia).unwrap();
    std::fs::copy(fake_gpu_runtime_binary(), nvidia.join("nvidia-container-runtime")).unwrap();
    let runc = kybernate_testbed::find_in_path("runc", std::ffi::OsStr::new(kybernate_testbed::SYSTEM_PATH))
        .expect("runc on the system PATH");
    std::fs::write(nvidia.join("runc"), runc.display().to_string()).unwrap();
    let tb = Testbed::builder()
        .path_prepend(shim_dir())
        .path_prepend(&nvidia)
        .start()
        .expect("test bed (run test/setup.sh first)");
    tb.import_image();
    (tb, scratch)
}

/// What differs between the stock shim's and ours for one case, if anything.
fn compare(
    stock: &Outcome,
    stock_id: &str,
    ours: &Outcome,
    our_id: &str,
    decision: &Option<Decision>,
    reference: Option<&Option<Decision>>,
) -> Vec<String> {
    let mut diffs = Vec::new();
    match (stock, ours) {
        (Outcome::Ran { .. }, Outcome::Ran { .. }) if stock == ours => {}
        (Outcome::Ran { code, stdout }, Outcome::Ran { code: c, stdout: o }) => {
            diffs.push(format!("stock: exit {code} printing {stdout:?}; ours: exit {c} printing {o:?}"))
        }
        (Outcome::Ran { code, .. }, Outcome::Refused(e)) => {
            diffs.push(format!("stock ran it (exit {code}); ours refused: {e}"))
        }
        (Outcome::Refused(e), Outcome::Ran { code, .. }) => {
            diffs.push(format!("stock refused ({e}); ours ran it (exit {code})"))
        }
        (Outcome::Refused(s), Outcome::Refused(o)) => {
            let want = runc_words(s, stock_id);
            if !o.replace(our_id, "<id>").contains(&want) {
                diffs.push(format!("both refused, but ours without runc's words {want:?}: {o}"));
            }
        }
    }
    match reference {
        Some(want) if decision != want => {
            diffs.push(format!("GPU decision {decision:?}; the unedited spec's: {want:?}"))
        }
        _ => {}
    }
    diffs
}

/// The whole corpus, stock shim first then ours for each case, on one containerd. Fails listing
/// every case that differed and how; prints every case's outcome either way.
#[test]
fn every_spec_runc_runs_runs_alike_and_every_refusal_carries_runcs_words() {
    let t0 = Instant::now();
    let (tb, _scratch) = corpus_bed();
    let api = Api::connect(&tb);
    let parent = api.image_snapshot(&tb);

    let cases = corpus();
    let mut references: Vec<((&str, Gpu), Option<Decision>)> = Vec::new();
    let mut report = Vec::new();
    let mut failures = Vec::new();
    for case in &cases {
        let stock_id = unique_name("sc-stock");
        let our_id = unique_name("sc-ours");
        let (stock, _) = api.run(&tb, STOCK, &stock_id, &parent, &spec_for(case, &tb, &stock_id));
        let (ours, record) = api.run(&tb, RUNTIME, &our_id, &parent, &spec_for(case, &tb, &our_id));
        let decision = match record {
            Some(r) => Decision::from_record(&r),
            None => logged_decision(&tb, &our_id),
        };
        let key = (case.base, case.gpu);
        let reference = references.iter().find(|(k, _)| *k == key).map(|(_, d)| d);
        let diffs = compare(&stock, &stock_id, &ours, &our_id, &decision, reference);
        if reference.is_none() {
            // The first case of a base and GPU request is its unedited form: its decision is
            // the one every edit must keep. A refused or undecided base fails above already.
            match &decision {
                None => failures.push(format!("{}: our shim logged no runtime decision ({ours:?})", case.name)),
                Some(d) if (d.runtime.as_str(), d.gpu) != case.gpu.decision() => failures.push(format!(
                    "{}: decision {d:?}; runtime-select's rules want {:?}",
                    case.name,
                    case.gpu.decision()
                )),
                Some(_) => {}
            }
            references.push((key, decision.clone()));
        }
        report.push(format!(
            "{}\n    stock: {}\n    ours:  {}\n    decision: {}",
            case.name,
            brief(&stock, &stock_id),
            brief(&ours, &our_id),
            decision
                .as_ref()
                .map_or("none".into(), |d| format!("{}, gpu {}, evidence [{}]", d.runtime, d.gpu, d.evidence))
        ));
        for d in diffs {
            failures.push(format!("{}: {d}", case.name));
        }
    }
    eprintln!("spec corpus: {} cases in {:.1?}\n  {}", cases.len(), t0.elapsed(), report.join("\n  "));
    assert!(
        failures.is_empty(),
        "{} of {} spec corpus cases differ from the stock shim:\n  {}",
        failures.len(),
        cases.len(),
        failures.join("\n  ")
    );
}

/// One outcome in a line of the report: a refusal by runc's words.
fn brief(o: &Outcome, id: &str) -> String {
    match o {
        Outcome::Ran { code, stdout } => format!("ran, exit {code}, {:?}", stdout.trim()),
        Outcome::Refused(e) => format!("refused: {}", runc_words(e, id).chars().take(90).collect::<String>()),
    }
}

#[test]
fn runcs_words_are_found_behind_both_shims_prefixes() {
    let stock = "failed to create shim task: OCI runtime create failed: runc create failed: unable to start \
                 container process: error during container init: x in /run/c/kbt-1-2/rootfs: unknown";
    assert_eq!(
        runc_words(stock, "kbt-1-2"),
        "unable to start container process: error during container init: x in /run/c/<id>/rootfs"
    );
    assert_eq!(
        runc_words("failed to create shim task: json: cannot unmarshal: unknown", "x"),
        "json: cannot unmarshal"
    );
    let mut s = json!({"a": [{"b": 1}]});
    set(&mut s, "/a/0/c/d", json!(2));
    push(&mut s, "/e", json!(3));
    assert_eq!(s, json!({"a": [{"b": 1, "c": {"d": 2}}], "e": [3]}));
}
