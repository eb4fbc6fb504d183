//! The kubelet's side of CRI for the shim's integration tests: a blocking CRI v1 client over
//! containerd's socket that removes the pods it made, pod and container configs as the kubelet
//! builds them for host-network pods, and a test bed whose CRI plugin runs our shim under the
//! runtime handler [`HANDLER`] in either registration style (docs/installation.md).

use std::collections::HashMap;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

use hyper_util::rt::TokioIo;
use k8s_cri::v1::image_service_client::ImageServiceClient;
use k8s_cri::v1::runtime_service_client::RuntimeServiceClient;
use k8s_cri::v1::{
    CheckpointContainerRequest, Container, ContainerConfig, ContainerFilter, ContainerMetadata, ContainerStatus,
    ContainerStatusRequest, CreateContainerRequest, ExecSyncRequest, ExecSyncResponse, ImageSpec, ImageStatusRequest,
    KeyValue, LinuxContainerConfig, LinuxContainerSecurityContext, LinuxPodSandboxConfig, LinuxSandboxSecurityContext,
    ListContainersRequest, NamespaceMode, NamespaceOption, PodSandboxConfig, PodSandboxMetadata, PodSandboxStatus,
    PodSandboxStatusRequest, RemoveContainerRequest, RemovePodSandboxRequest, RunPodSandboxRequest,
    StartContainerRequest, StatusRequest, StatusResponse, StopContainerRequest, StopPodSandboxRequest, VersionRequest,
};
use kybernate_testbed::{
    unique_name, Containerd, CriRuntime, Testbed, CONTAINERD_RUNC_ROOT, CRI_NAMESPACE, IMAGE, PAUSE_IMAGE,
};
use tonic::transport::{Channel, Endpoint, Uri};
use tonic::Status;

use super::{fake_gpu_runtime_binary, shim_dir, text, wait_for, SHIM};

/// The runtime handler (RuntimeClass `handler`) our shim runs under.
pub const HANDLER: &str = "kybernate";
/// Bound on one CRI call: StartContainer of a restore runs CRIU; CI machines have 2 cores.
pub const CRI_TIMEOUT: Duration = Duration::from_secs(120);
/// The restore annotation (shim/src/restore.rs `RESTORE_ANNOTATION`).
pub const RESTORE_ANNOTATION: &str = "kybernate.io/restore-from";
/// A container command that runs until SIGTERM and then exits 0 at once.
pub const SLEEPER: [&str; 3] = ["sh", "-c", "trap 'exit 0' TERM; while :; do sleep 3600 & wait; done"];

/// How the test bed's CRI plugin starts our shim (kybernate_testbed::CriStyle).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Style {
    /// `runtime_type = "io.containerd.kybernate.v1"`, `options.ConfigPath` = the test's config;
    /// the shim is found on containerd's PATH.
    RuntimeType,
    /// `runtime_type = "io.containerd.runc.v2"`, `runtime_path` = our shim; the config comes
    /// from `KYBERNATE_CONFIG` (runc options have no ConfigPath). The shim is not on PATH.
    RuntimePath,
}

/// A CRI test bed. Field order matters: the client drops first and removes its pods while
/// containerd still runs; then the test bed; then the scratch dir.
pub struct CriBed {
    pub cri: Cri,
    pub tb: Testbed,
    pub style: Style,
    /// The checkpoint store of the kybernate config the shim reads.
    pub store: PathBuf,
    /// The fake GPU runtime's directory (calls.log), when asked for.
    pub nvidia: Option<PathBuf>,
    _dir: tempfile::TempDir,
}

/// Options for [`cri_bed_with`].
#[derive(Default)]
pub struct Setup {
    /// Put the fake GPU runtime on containerd's PATH as `nvidia-container-runtime`.
    pub fake_gpu_runtime: bool,
    /// Replaces the handler's `pod_annotations` (default `["kybernate.io/*"]`).
    pub pod_annotations: Option<Vec<&'static str>>,
    /// The containerd release to run (default: the system's 1.6).
    pub containerd: Containerd,
    /// More `[checkpoint]` keys for the node's config (e.g. `allow_env_restore = true`).
    pub checkpoint_config: &'static str,
    /// containerd's log level (default `info`; `debug` shows CRI's runtime introspection).
    pub log_level: Option<&'static str>,
}

pub fn cri_bed(style: Style) -> CriBed {
    cri_bed_with(style, Setup::default())
}

pub fn cri_bed_with(style: Style, setup: Setup) -> CriBed {
    let scratch = kybernate_testbed::scratch_dir().expect("scratch dir");
    let dir = scratch.path();
    let store = dir.join("checkpoints");
    let config = dir.join("kybernate.toml");
    std::fs::write(&config, format!("[checkpoint]\nroot = \"{}\"\n{}", store.display(), setup.checkpoint_config))
        .expect("writing the config");
    let mut runtime = match style {
        Style::RuntimeType => CriRuntime::runtime_type(HANDLER, Some(&config)),
        Style::RuntimePath => CriRuntime::runtime_path(HANDLER, Path::new(SHIM)),
    };
    if let Some(patterns) = &setup.pod_annotations {
        runtime = runtime.pod_annotations(patterns);
    }
    let mut builder = Testbed::builder().containerd(setup.containerd).cri_runtime(runtime);
    if let Some(level) = setup.log_level {
        builder = builder.log_level(level);
    }
    builder = match style {
        Style::RuntimeType => builder.path_prepend(shim_dir()),
        Style::RuntimePath => builder.env("KYBERNATE_CONFIG", &config),
    };
    let nvidia = setup.fake_gpu_runtime.then(|| {
        let nvidia = dir.join("nvidia");
        std::fs::create_dir_all(&nvidia).expect("creating the fake GPU runtime's dir");
        std::fs::copy(fake_gpu_runtime_binary(), nvidia.join("nvidia-container-runtime"))
            .expect("copying the fake GPU runtime");
        nvidia
    });
    if let Some(dir) = &nvidia {
        builder = builder.path_prepend(dir);
    }
    let tb = builder.start().expect("CRI test bed (run test/setup.sh first)");
    let cri = Cri::connect(tb.cri_socket());
    CriBed { cri, tb, style, store, nvidia, _dir: scratch }
}

/// A pod as the kubelet runs it: its id and the config every CreateContainer repeats.
pub struct Pod {
    pub id: String,
    pub config: PodSandboxConfig,
}

impl CriBed {
    /// RunPodSandbox of a host-network pod in Kubernetes namespace `namespace`.
    pub fn run_pod(&self, namespace: &str, annotations: &[(&str, &str)]) -> Result<Pod, Status> {
        let config = pod_config(&self.tb, namespace, annotations);
        let id = self.cri.run_pod(&config)?;
        Ok(Pod { id, config })
    }

    /// CreateContainer `name` running `command` (with `env`) in `pod`.
    pub fn create(&self, pod: &Pod, name: &str, command: &[&str], env: &[(&str, &str)]) -> Result<String, Status> {
        self.cri.create(&pod.id, container_config(name, command, env), &pod.config)
    }

    /// CreateContainer + StartContainer, panicking on failure.
    pub fn run(&self, pod: &Pod, name: &str, command: &[&str], env: &[(&str, &str)]) -> String {
        let id = self.create(pod, name, command, env).unwrap_or_else(|e| panic!("CreateContainer {name}: {e}"));
        self.cri.start(&id).unwrap_or_else(|e| panic!("StartContainer {name}: {e}\n{}", self.tb.log_tail(30)));
        id
    }

    /// The runtime decision our shim recorded for a container or sandbox.
    pub fn runtime_record(&self, id: &str) -> serde_json::Value {
        let file = self.tb.cri_bundle_dir(id).join("kybernate-runtime.json");
        let bytes = std::fs::read(&file).unwrap_or_else(|e| panic!("reading {}: {e}", file.display()));
        serde_json::from_slice(&bytes).unwrap_or_else(|e| panic!("{}: {e}", file.display()))
    }

    /// Our shim processes serving this test bed's CRI namespace: (pid, `-id` argument).
    pub fn shims(&self) -> Vec<(u32, String)> {
        let address = self.tb.address().to_string_lossy().into_owned();
        let mut out = Vec::new();
        for entry in std::fs::read_dir("/proc").expect("/proc").flatten() {
            let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else { continue };
            let Ok(cmd) = std::fs::read(format!("/proc/{pid}/cmdline")) else { continue };
            let args: Vec<String> = text(&cmd).split('\0').map(String::from).collect();
            let arg = |flag: &str| args.windows(2).find(|w| w[0] == flag).map(|w| w[1].clone());
            if args.first().is_some_and(|a| a.ends_with("containerd-shim-kybernate-v1"))
                && arg("-namespace").as_deref() == Some(CRI_NAMESPACE)
                && arg("-address").as_deref() == Some(address.as_str())
            {
                out.push((pid, arg("-id").unwrap_or_default()));
            }
        }
        out
    }

    /// Asserts that nothing of these containers and sandboxes is left: no task or container in
    /// containerd, no runc state, no bundle, and (eventually) no shim for this test bed.
    pub fn assert_nothing_left(&self, ids: &[&str]) {
        let tasks = self.tb.ctr_ok_in(CRI_NAMESPACE, &["tasks", "ls", "-q"]);
        let containers = self.tb.ctr_ok_in(CRI_NAMESPACE, &["containers", "ls", "-q"]);
        for id in ids {
            assert!(!tasks.lines().any(|l| l.trim() == *id), "task {id} left:\n{tasks}");
            assert!(!containers.lines().any(|l| l.trim() == *id), "container {id} left:\n{containers}");
            let state = Path::new(CONTAINERD_RUNC_ROOT).join(CRI_NAMESPACE).join(id);
            assert!(!state.exists(), "runc state {} left", state.display());
            let bundle = self.tb.cri_bundle_dir(id);
            assert!(!bundle.exists(), "bundle {} left", bundle.display());
        }
        wait_for("the pod's shim to exit", || self.shims().is_empty().then_some(()));
    }
}

/// A host-network pod's config as the kubelet sends it (labels, log dir, namespaces), with a
/// unique name and uid, and the test bed's cgroup parent so that cleanup finds its cgroups.
pub fn pod_config(tb: &Testbed, namespace: &str, annotations: &[(&str, &str)]) -> PodSandboxConfig {
    let name = unique_name("pod");
    let log_directory = tb.dir().join("pods").join(&name);
    std::fs::create_dir_all(&log_directory).expect("creating the pod's log dir");
    host_network_pod(&name, &log_directory, &tb.cri_cgroup_parent(), namespace, annotations)
}

/// The config of host-network pod `name` (also its uid): `log_directory` as containerd sees it,
/// made by the caller; an empty `cgroup_parent` leaves containerd's default (`/<ns>/<id>`).
pub fn host_network_pod(
    name: &str,
    log_directory: &Path,
    cgroup_parent: &str,
    namespace: &str,
    annotations: &[(&str, &str)],
) -> PodSandboxConfig {
    let name = name.to_string();
    let labels = HashMap::from([
        ("io.kubernetes.pod.name".to_string(), name.clone()),
        ("io.kubernetes.pod.namespace".to_string(), namespace.to_string()),
        ("io.kubernetes.pod.uid".to_string(), name.clone()),
    ]);
    PodSandboxConfig {
        metadata: Some(PodSandboxMetadata {
            name: name.clone(),
            uid: name.clone(),
            namespace: namespace.to_string(),
            attempt: 0,
        }),
        log_directory: log_directory.display().to_string(),
        labels,
        annotations: annotations.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
        linux: Some(LinuxPodSandboxConfig {
            cgroup_parent: cgroup_parent.to_string(),
            security_context: Some(LinuxSandboxSecurityContext {
                namespace_options: Some(namespaces()),
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// hostNetwork: true; the kubelet's defaults otherwise (own PID namespace, the pod's IPC).
fn namespaces() -> NamespaceOption {
    NamespaceOption {
        network: NamespaceMode::Node as i32,
        pid: NamespaceMode::Container as i32,
        ipc: NamespaceMode::Pod as i32,
        ..Default::default()
    }
}

/// A container config as the kubelet sends it, from the test image.
pub fn container_config(name: &str, command: &[&str], env: &[(&str, &str)]) -> ContainerConfig {
    ContainerConfig {
        metadata: Some(ContainerMetadata { name: name.to_string(), attempt: 0 }),
        image: Some(ImageSpec { image: IMAGE.to_string(), ..Default::default() }),
        command: command.iter().map(|s| s.to_string()).collect(),
        envs: env.iter().map(|(k, v)| KeyValue { key: k.to_string(), value: v.to_string() }).collect(),
        labels: HashMap::from([("io.kubernetes.container.name".to_string(), name.to_string())]),
        log_path: format!("{name}/0.log"),
        linux: Some(LinuxContainerConfig {
            security_context: Some(LinuxContainerSecurityContext {
                namespace_options: Some(namespaces()),
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// A blocking CRI v1 client (RuntimeService and ImageService) on a unix socket. Every pod it
/// ran is stopped and removed on drop (with its containers), so a failing test leaves nothing
/// in the CRI namespace for the test bed's cleanup to force.
pub struct Cri {
    rt: tokio::runtime::Runtime,
    runtime: RuntimeServiceClient<Channel>,
    images: ImageServiceClient<Channel>,
    pods: Mutex<Vec<String>>,
}

impl Cri {
    /// Connects and waits until CRI answers and sees the test bed's images (it learns about
    /// images imported with ctr from containerd's events, asynchronously).
    pub fn connect(socket: &Path) -> Cri {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("a tokio runtime");
        let channel = {
            let _in_runtime = rt.enter();
            let socket = socket.to_path_buf();
            // The URI is a placeholder: the connector dials the unix socket.
            Endpoint::from_static("http://[::]:0").connect_with_connector_lazy(tower::service_fn(move |_: Uri| {
                let socket = socket.clone();
                async move { Ok::<_, std::io::Error>(TokioIo::new(tokio::net::UnixStream::connect(socket).await?)) }
            }))
        };
        let cri = Cri {
            rt,
            runtime: RuntimeServiceClient::new(channel.clone()),
            images: ImageServiceClient::new(channel),
            pods: Mutex::new(Vec::new()),
        };
        wait_for("CRI's RuntimeService to answer", || {
            let mut c = cri.runtime.clone();
            cri.call(async move { c.version(VersionRequest::default()).await }).ok()
        });
        for image in [PAUSE_IMAGE, IMAGE] {
            cri.wait_image(image);
        }
        cri
    }

    /// Waits until CRI lists `image` (it learns about images made with ctr asynchronously).
    pub fn wait_image(&self, image: &str) {
        wait_for(&format!("CRI to list {image}"), || {
            let mut c = self.images.clone();
            let req = ImageStatusRequest {
                image: Some(ImageSpec { image: image.to_string(), ..Default::default() }),
                verbose: false,
            };
            self.call(async move { c.image_status(req).await }).ok()?.image
        });
    }

    /// Runs one call to completion, bounded by [`CRI_TIMEOUT`].
    fn call<T>(&self, fut: impl Future<Output = Result<tonic::Response<T>, Status>>) -> Result<T, Status> {
        // The timer is made inside the runtime (it needs its time driver).
        match self.rt.block_on(async { tokio::time::timeout(CRI_TIMEOUT, fut).await }) {
            Ok(r) => r.map(tonic::Response::into_inner),
            Err(_) => Err(Status::deadline_exceeded(format!("no answer from CRI in {CRI_TIMEOUT:?}"))),
        }
    }

    /// RunPodSandbox with our handler; the pod is removed on drop unless removed before.
    pub fn run_pod(&self, config: &PodSandboxConfig) -> Result<String, Status> {
        self.run_pod_on(config, HANDLER)
    }

    /// RunPodSandbox with runtime handler `handler` (e.g. `runc`, the test bed's stock one).
    pub fn run_pod_on(&self, config: &PodSandboxConfig, handler: &str) -> Result<String, Status> {
        let mut c = self.runtime.clone();
        let req = RunPodSandboxRequest { config: Some(config.clone()), runtime_handler: handler.to_string() };
        let id = self.call(async move { c.run_pod_sandbox(req).await })?.pod_sandbox_id;
        self.pods.lock().expect("pods lock").push(id.clone());
        Ok(id)
    }

    pub fn pod_status(&self, id: &str) -> Result<PodSandboxStatus, Status> {
        let mut c = self.runtime.clone();
        let req = PodSandboxStatusRequest { pod_sandbox_id: id.to_string(), verbose: false };
        let status = self.call(async move { c.pod_sandbox_status(req).await })?.status;
        status.ok_or_else(|| Status::not_found(format!("no status for pod {id}")))
    }

    pub fn stop_pod(&self, id: &str) -> Result<(), Status> {
        let mut c = self.runtime.clone();
        let req = StopPodSandboxRequest { pod_sandbox_id: id.to_string() };
        self.call(async move { c.stop_pod_sandbox(req).await }).map(drop)
    }

    /// RemovePodSandbox (removes its containers too).
    pub fn remove_pod(&self, id: &str) -> Result<(), Status> {
        let mut c = self.runtime.clone();
        let req = RemovePodSandboxRequest { pod_sandbox_id: id.to_string() };
        self.call(async move { c.remove_pod_sandbox(req).await })?;
        self.pods.lock().expect("pods lock").retain(|p| p != id);
        Ok(())
    }

    /// CreateContainer, with the pod's labels on the container as the kubelet puts them there
    /// (kuberuntime's `newContainerLabels`: pod name, namespace and uid); CRI copies them onto
    /// containerd's container, where `kybernate checkpoint --pod` finds it.
    pub fn create(
        &self,
        pod: &str,
        mut config: ContainerConfig,
        pod_config: &PodSandboxConfig,
    ) -> Result<String, Status> {
        if let Some(m) = &pod_config.metadata {
            for (key, value) in [
                ("io.kubernetes.pod.name", &m.name),
                ("io.kubernetes.pod.namespace", &m.namespace),
                ("io.kubernetes.pod.uid", &m.uid),
            ] {
                config.labels.entry(key.to_string()).or_insert_with(|| value.clone());
            }
        }
        let mut c = self.runtime.clone();
        let req = CreateContainerRequest {
            pod_sandbox_id: pod.to_string(),
            config: Some(config),
            sandbox_config: Some(pod_config.clone()),
        };
        self.call(async move { c.create_container(req).await }).map(|r| r.container_id)
    }

    pub fn start(&self, id: &str) -> Result<(), Status> {
        let mut c = self.runtime.clone();
        let req = StartContainerRequest { container_id: id.to_string() };
        self.call(async move { c.start_container(req).await }).map(drop)
    }

    /// StopContainer: SIGTERM, then SIGKILL after `timeout_s`.
    pub fn stop(&self, id: &str, timeout_s: i64) -> Result<(), Status> {
        let mut c = self.runtime.clone();
        let req = StopContainerRequest { container_id: id.to_string(), timeout: timeout_s };
        self.call(async move { c.stop_container(req).await }).map(drop)
    }

    pub fn remove(&self, id: &str) -> Result<(), Status> {
        let mut c = self.runtime.clone();
        let req = RemoveContainerRequest { container_id: id.to_string() };
        self.call(async move { c.remove_container(req).await }).map(drop)
    }

    pub fn status(&self, id: &str) -> Result<ContainerStatus, Status> {
        let mut c = self.runtime.clone();
        let req = ContainerStatusRequest { container_id: id.to_string(), verbose: false };
        let status = self.call(async move { c.container_status(req).await })?.status;
        status.ok_or_else(|| Status::not_found(format!("no status for container {id}")))
    }

    /// ListContainers of one pod.
    pub fn list(&self, pod: &str) -> Result<Vec<Container>, Status> {
        let mut c = self.runtime.clone();
        let req = ListContainersRequest {
            filter: Some(ContainerFilter { pod_sandbox_id: pod.to_string(), ..Default::default() }),
        };
        self.call(async move { c.list_containers(req).await }).map(|r| r.containers)
    }

    /// CheckpointContainer (containerd >= 2.0): the container checkpointed into the archive
    /// `location`, as `kubectl`'s checkpoint API and `crictl checkpoint --export` ask for it.
    pub fn checkpoint(&self, id: &str, location: &Path) -> Result<(), Status> {
        let mut c = self.runtime.clone();
        let req = CheckpointContainerRequest {
            container_id: id.to_string(),
            location: location.display().to_string(),
            timeout: CRI_TIMEOUT.as_secs() as i64,
        };
        self.call(async move { c.checkpoint_container(req).await }).map(drop)
    }

    /// The runtime's Status (conditions, per-handler features), `verbose` adding containerd's info.
    pub fn runtime_status(&self, verbose: bool) -> Result<StatusResponse, Status> {
        let mut c = self.runtime.clone();
        self.call(async move { c.status(StatusRequest { verbose }).await })
    }

    /// ExecSync with a 60 s timeout (CRI's own, on top of [`CRI_TIMEOUT`]).
    pub fn exec(&self, id: &str, cmd: &[&str]) -> Result<ExecSyncResponse, Status> {
        let mut c = self.runtime.clone();
        let req = ExecSyncRequest {
            container_id: id.to_string(),
            cmd: cmd.iter().map(|s| s.to_string()).collect(),
            timeout: 60,
        };
        self.call(async move { c.exec_sync(req).await })
    }
}

impl Drop for Cri {
    fn drop(&mut self) {
        let pods = std::mem::take(&mut *self.pods.lock().unwrap_or_else(|e| e.into_inner()));
        for pod in pods {
            if let Err(e) = self.stop_pod(&pod).and_then(|()| self.remove_pod(&pod)) {
                eprintln!("cri test client: removing pod {pod}: {e}");
            }
        }
    }
}
