//! `kybernate restore`: restores a checkpoint of the node's store as a new container, through
//! containerd's gRPC API, or prints the pod annotation that makes Kubernetes do it.
//!
//! The new container gets the checkpoint's `spec.dump` with the annotation
//! `kybernate.io/restore-from` naming the checkpoint; our shim sees it at Create, verifies the
//! checkpoint, applies its `rootfs-diff.tar` on the fresh rootfs (the image's snapshot) and runs
//! `runc restore` at Start instead of starting the process fresh.

use std::collections::HashMap;
use std::fs;
use std::path::Path;
use std::process::ExitCode;
use std::time::{Duration, Instant, SystemTime};

use containerd_client::services::v1::container::Runtime;
use containerd_client::services::v1::containers_client::ContainersClient;
use containerd_client::services::v1::content_client::ContentClient;
use containerd_client::services::v1::images_client::ImagesClient;
use containerd_client::services::v1::leases_client::LeasesClient;
use containerd_client::services::v1::snapshots::snapshots_client::SnapshotsClient;
use containerd_client::services::v1::snapshots::{PrepareSnapshotRequest, RemoveSnapshotRequest};
use containerd_client::services::v1::tasks_client::TasksClient;
use containerd_client::services::v1::{
    Container, CreateContainerRequest, CreateRequest as CreateLeaseRequest, CreateTaskRequest, DeleteContainerRequest,
    DeleteRequest as DeleteLeaseRequest, DeleteTaskRequest, GetContainerRequest, GetImageRequest, ReadContentRequest,
    StartRequest,
};
use containerd_client::tonic::metadata::MetadataValue;
use containerd_client::tonic::transport::Channel;
use containerd_client::tonic::{Code, Request, Status};
use containerd_client::types::Descriptor;
use kybernate_criu::{Manifest, Store, SPEC_DUMP};
use serde::Serialize;
use serde_json::Value;
use sha2::{Digest, Sha256};

use crate::checkpoint::{async_runtime, chain, check_namespace, grpc_error, RUNTIME};
use crate::error::CliError;
use crate::output;
use crate::store::{self, Checkpoint};
use crate::Output;

/// The annotation our shim restores from (shim/src/checkpoint.rs `RESTORE_ANNOTATION`).
pub const RESTORE_ANNOTATION: &str = "kybernate.io/restore-from";
/// The annotation that lets the shim restore a GPU checkpoint onto other GPUs (shim/src/gpu.rs).
pub const ALLOW_GPU_MISMATCH_ANNOTATION: &str = "kybernate.io/allow-gpu-mismatch";
/// The label the new container carries: the checkpoint's id.
const RESTORED_FROM_LABEL: &str = "kybernate.io/restored-from";
/// The snapshotter whose snapshot of the image becomes the new container's rootfs.
const SNAPSHOTTER: &str = "overlayfs";
/// The type containerd stores an OCI runtime spec under.
const SPEC_TYPE: &str = "types.containerd.io/opencontainers/runtime-spec/1/Spec";
/// containerd's limit on the length of an identifier (container id, snapshot key).
const MAX_ID_LEN: usize = 76;
/// Image index and manifest list media types.
const INDEX_TYPES: [&str; 2] =
    ["application/vnd.oci.image.index.v1+json", "application/vnd.docker.distribution.manifest.list.v2+json"];
/// How long the lease that protects what we create from containerd's garbage collection lives
/// if we cannot delete it ourselves.
const LEASE_EXPIRY: Duration = Duration::from_secs(3600);
/// Manifests and image configs are small; anything bigger is not one.
const MAX_BLOB: i64 = 16 << 20;

/// What `kybernate restore` was asked to do.
#[derive(Debug)]
pub struct Args {
    /// Checkpoint id or directory.
    pub checkpoint: String,
    /// `--as`: the new container's id.
    pub new_id: Option<String>,
    /// `--image`: the image whose snapshot becomes the rootfs (default: the manifest's).
    pub image: Option<String>,
    /// `--pod-annotation`: print the annotation and a pod snippet instead of restoring.
    pub pod_annotation: bool,
    /// `--allow-gpu-mismatch`: restore a GPU checkpoint onto other GPUs.
    pub allow_gpu_mismatch: bool,
}

/// `restore -o json`.
#[derive(Serialize)]
struct Restored<'a> {
    container: &'a str,
    namespace: &'a str,
    pid: u32,
    duration_ms: u64,
    checkpoint: &'a Checkpoint,
}

/// `restore --pod-annotation -o json`.
#[derive(Serialize)]
struct Annotation<'a> {
    annotation: HashMap<&'static str, &'a str>,
    checkpoint: &'a Checkpoint,
}

pub fn restore(
    store: &Store,
    out: Output,
    address: &Path,
    namespace: Option<&str>,
    args: &Args,
) -> Result<ExitCode, CliError> {
    let mut cp = store::resolve(store, &args.checkpoint)?;
    // The shim verifies again at Create; verifying here first fails early, before containerd
    // is asked for anything, and names the damaged file.
    let manifest = match kybernate_criu::verify(&cp.path) {
        Ok(m) => m,
        Err(source) => return Err(CliError::Verify { id: cp.id, source }),
    };
    cp.set_verified(None);
    // The shim refuses other GPUs too; saying so here fails before containerd is asked.
    if let Some(gpu) = manifest.gpu.as_ref().filter(|_| !args.allow_gpu_mismatch) {
        let node = kybernate_criu::gpu::node_gpus(Path::new("/proc"));
        if let Err(e) = kybernate_criu::gpu::check_compatible(&gpu.gpus, &node.gpus) {
            return Err(CliError::Failed(format!("checkpoint {:?}: {e} (here: --allow-gpu-mismatch)", cp.id)));
        }
    }
    if args.pod_annotation {
        return print_annotation(out, &cp, &manifest, args);
    }

    let ns = namespace.map_or_else(|| manifest.namespace.clone(), str::to_string);
    check_namespace(&ns)?;
    let new_id = match &args.new_id {
        Some(id) => id.clone(),
        None => default_id(&manifest.container_id, SystemTime::now()),
    };
    check_id(&new_id)?;
    let image = args.image.clone().or_else(|| manifest.image.clone()).filter(|i| !i.is_empty()).ok_or_else(|| {
        CliError::Usage(format!(
            "checkpoint {:?}: the checkpoint does not record its image; pass --image (the image the container ran, e.g. --image docker.io/library/nginx:1)",
            cp.id
        ))
    })?;
    let mut spec = restore_spec(&cp, &manifest, &new_id)?;
    if args.allow_gpu_mismatch {
        spec["annotations"][ALLOW_GPU_MISMATCH_ANNOTATION] = Value::String("true".into());
    }
    let plan = Plan { ns: &ns, id: &new_id, image: &image, spec: &spec, checkpoint_id: &cp.id };

    let runtime = async_runtime()?;
    let started = Instant::now();
    let pid = runtime.block_on(run(address, &plan))?;
    let duration = started.elapsed();
    let duration_ms = u64::try_from(duration.as_millis()).unwrap_or(u64::MAX);
    match out {
        Output::Json => {
            output::json(&Restored { container: &new_id, namespace: &ns, pid, duration_ms, checkpoint: &cp })?
        }
        Output::Table => {
            let lines = [
                ("container", new_id.clone()),
                ("namespace", ns.clone()),
                ("pid", pid.to_string()),
                ("checkpoint", cp.id.clone()),
                ("image", image.clone()),
                ("duration", humantime::format_duration(Duration::from_millis(duration_ms)).to_string()),
            ];
            let mut text = format!("restored {} as {new_id}\n", cp.id);
            for (k, v) in lines {
                text.push_str(&format!("{:<11} {v}\n", format!("{k}:")));
            }
            output::write(&text)?;
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// `--pod-annotation`: what to put on a pod so that the kubelet's container is restored.
fn print_annotation(out: Output, cp: &Checkpoint, m: &Manifest, args: &Args) -> Result<ExitCode, CliError> {
    let mut annotation = HashMap::from([(RESTORE_ANNOTATION, cp.id.as_str())]);
    if args.allow_gpu_mismatch {
        annotation.insert(ALLOW_GPU_MISMATCH_ANNOTATION, "true");
    }
    match out {
        Output::Json => output::json(&Annotation { annotation, checkpoint: cp })?,
        Output::Table => output::write(&pod_snippet(cp, m, args.image.as_deref(), args.allow_gpu_mismatch))?,
    }
    Ok(ExitCode::SUCCESS)
}

fn pod_snippet(cp: &Checkpoint, m: &Manifest, image: Option<&str>, allow_gpu_mismatch: bool) -> String {
    let pod_ns = m.pod_namespace.as_deref().unwrap_or("<the checkpoint's pod namespace>");
    let name = m.pod_name.as_deref().map_or_else(|| "<pod name>".to_string(), |n| format!("{n}-restored"));
    let container = m.container_name.as_deref().unwrap_or("<container name>");
    let image = image.or(m.image.as_deref()).unwrap_or("<the image the checkpoint was taken from>");
    format!(
        "{RESTORE_ANNOTATION}: {id}\n\
         \n\
         # A pod whose container is restored from this checkpoint. The runtime's CRI config must let the\n\
         # annotations through: pod_annotations = [\"kybernate.io/*\"] (see docs/operations.md).\n\
         apiVersion: v1\n\
         kind: Pod\n\
         metadata:\n  name: {name}\n  namespace: {pod_ns}\n  annotations:\n    {RESTORE_ANNOTATION}: {id_yaml}\n{allow}\
         spec:\n  runtimeClassName: kybernate\n  containers:\n    - name: {container}\n      image: {image}\n",
        id = cp.id,
        id_yaml = serde_json::Value::String(cp.id.clone()),
        allow =
            if allow_gpu_mismatch { format!("    {ALLOW_GPU_MISMATCH_ANNOTATION}: \"true\"\n") } else { String::new() },
    )
}

/// `<container>-restored-<unix seconds>`, the container part shortened to fit containerd's limit
/// (Kubernetes container ids are 64 hex digits).
fn default_id(container: &str, now: SystemTime) -> String {
    let secs = now.duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let suffix = format!("-restored-{secs}");
    let keep = MAX_ID_LEN.saturating_sub(suffix.len());
    let base: String = container.chars().take(keep).collect();
    let base = base.trim_end_matches(['.', '_', '-']);
    format!("{base}{suffix}")
}

/// containerd's identifier rule: letters and digits, separated by single '.', '_' or '-', at most 76.
pub(crate) fn valid_identifier(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= MAX_ID_LEN
        && s.split(['.', '_', '-']).all(|part| !part.is_empty() && part.bytes().all(|b| b.is_ascii_alphanumeric()))
}

fn check_id(id: &str) -> Result<(), CliError> {
    if !valid_identifier(id) {
        return Err(CliError::Usage(format!(
            "invalid container id {id:?}: letters and digits, separated by '.', '_' or '-', at most {MAX_ID_LEN} characters; e.g. --as web-restored"
        )));
    }
    Ok(())
}

/// The checkpoint's `spec.dump`, made the new container's: the restore annotation (the
/// checkpoint's absolute directory), the rootfs at `rootfs` in the bundle, its own cgroup.
fn restore_spec(cp: &Checkpoint, m: &Manifest, new_id: &str) -> Result<Value, CliError> {
    let path = cp.path.join(SPEC_DUMP);
    let bad = |what: String| {
        CliError::Failed(format!(
            "{}: {what}; the checkpoint cannot be restored through containerd (the shim needs its spec)",
            path.display()
        ))
    };
    let text = fs::read(&path).map_err(|e| bad(format!("cannot read: {e}")))?;
    let mut spec: Value = serde_json::from_slice(&text).map_err(|e| bad(format!("not an OCI spec: {e}")))?;
    let Some(obj) = spec.as_object_mut() else { return Err(bad("not an OCI spec: not a JSON object".into())) };
    let annotations = obj.entry("annotations").or_insert_with(|| Value::Object(Default::default()));
    if !annotations.is_object() {
        *annotations = Value::Object(Default::default());
    }
    annotations[RESTORE_ANNOTATION] = Value::String(cp.path.display().to_string());
    let root = obj.entry("root").or_insert_with(|| Value::Object(Default::default()));
    if !root.is_object() {
        *root = Value::Object(Default::default());
    }
    root["path"] = Value::String("rootfs".into());
    if let Some(cgroups) = obj.get_mut("linux").and_then(|l| l.get_mut("cgroupsPath")) {
        if let Some(old) = cgroups.as_str() {
            *cgroups = Value::String(cgroups_path(old, &m.container_id, new_id));
        }
    }
    Ok(spec)
}

/// The old container's cgroups path with its id replaced by the new one, so that the two never
/// share a cgroup: `/<ns>/<old>` → `/<ns>/<new>` (any path ending in the old id), systemd's
/// `slice:prefix:name` → `slice:prefix:<new>`, any other path: its last component replaced.
fn cgroups_path(old: &str, old_id: &str, new_id: &str) -> String {
    if old.is_empty() {
        return String::new();
    }
    if let Some(base) = old.strip_suffix(old_id).filter(|b| b.ends_with('/')) {
        return format!("{base}{new_id}");
    }
    let parts: Vec<&str> = old.split(':').collect();
    if parts.len() == 3 && !old.starts_with('/') {
        return format!("{}:{}:{new_id}", parts[0], parts[1]);
    }
    match old.rsplit_once('/') {
        Some((base, _)) => format!("{base}/{new_id}"),
        None => new_id.to_string(),
    }
}

/// Everything the containerd part needs.
struct Plan<'a> {
    ns: &'a str,
    id: &'a str,
    image: &'a str,
    spec: &'a Value,
    checkpoint_id: &'a str,
}

/// What has been made so far, to undo on a failure.
#[derive(Default)]
struct Made {
    snapshot: bool,
    container: bool,
    task: bool,
}

/// A request in the namespace, inside the lease (when there is one).
fn req<T>(msg: T, ns: &str, lease: Option<&str>) -> Request<T> {
    let mut r = Request::new(msg);
    if let Ok(v) = MetadataValue::try_from(ns) {
        r.metadata_mut().insert("containerd-namespace", v);
    }
    if let Some(v) = lease.and_then(|l| MetadataValue::try_from(l).ok()) {
        r.metadata_mut().insert("containerd.lease", v);
    }
    r
}

/// Connects, creates, starts; returns the restored task's pid.
async fn run(address: &Path, plan: &Plan<'_>) -> Result<u32, CliError> {
    let unreachable = |e: String| CliError::Unreachable { address: address.to_path_buf(), reason: e };
    let channel = containerd_client::connect(address).await.map_err(|e| unreachable(chain(&e)))?;
    let ns = plan.ns;
    let id = plan.id;

    // Refuse a taken id before anything is made.
    let mut containers = ContainersClient::new(channel.clone());
    match containers.get(req(GetContainerRequest { id: id.into() }, ns, None)).await {
        Ok(_) => {
            return Err(CliError::Usage(format!(
                "container {id:?} already exists in namespace {ns:?}; choose another id with --as, or remove it first (`ctr -n {ns} containers delete {id}`)"
            )))
        }
        Err(s) if s.code() == Code::NotFound => {}
        Err(s) => return Err(grpc_error(address, "look up the container", s)),
    }
    let image = match ImagesClient::new(channel.clone())
        .get(req(GetImageRequest { name: plan.image.into() }, ns, None))
        .await
    {
        Ok(r) => r.into_inner().image,
        Err(s) if s.code() == Code::NotFound => None,
        Err(s) => return Err(grpc_error(address, "look up the image", s)),
    };
    let Some(target) = image.and_then(|i| i.target) else {
        return Err(CliError::Usage(format!(
            "image {:?} not found in containerd namespace {ns:?}; pull it first (`ctr -n {ns} images pull {}`), or name another with --image",
            plan.image, plan.image
        )));
    };
    let parent = chain_id_of(channel.clone(), address, ns, plan.image, target).await?;

    // Everything we make lives in a lease until the container references the snapshot, so that
    // containerd's garbage collection cannot take the snapshot in between.
    let lease = create_lease(channel.clone(), ns).await;
    let mut made = Made::default();
    let result = create_and_start(channel.clone(), address, plan, &parent, lease.as_deref(), &mut made).await;
    if result.is_err() {
        cleanup(channel.clone(), ns, id, &made).await;
    }
    if let Some(lease) = lease {
        let _ = LeasesClient::new(channel).delete(req(DeleteLeaseRequest { id: lease, sync: false }, ns, None)).await;
    }
    result
}

async fn create_lease(channel: Channel, ns: &str) -> Option<String> {
    let expire = SystemTime::now() + LEASE_EXPIRY;
    let labels =
        HashMap::from([("containerd.io/gc.expire".to_string(), humantime::format_rfc3339_seconds(expire).to_string())]);
    let id = format!(
        "kybernate-restore-{}-{}",
        std::process::id(),
        SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_nanos())
    );
    let created = LeasesClient::new(channel).create(req(CreateLeaseRequest { id, labels }, ns, None)).await;
    created.ok().and_then(|r| r.into_inner().lease).map(|l| l.id)
}

async fn create_and_start(
    channel: Channel,
    address: &Path,
    plan: &Plan<'_>,
    parent: &str,
    lease: Option<&str>,
    made: &mut Made,
) -> Result<u32, CliError> {
    let (ns, id) = (plan.ns, plan.id);
    let prepare = PrepareSnapshotRequest {
        snapshotter: SNAPSHOTTER.into(),
        key: id.into(),
        parent: parent.into(),
        labels: HashMap::new(),
    };
    let mounts = match SnapshotsClient::new(channel.clone()).prepare(req(prepare, ns, lease)).await {
        Ok(r) => r.into_inner().mounts,
        Err(s) if s.code() == Code::AlreadyExists => {
            return Err(CliError::Usage(format!(
                "snapshot {id:?} already exists in snapshotter {SNAPSHOTTER} (namespace {ns:?}); choose another id with --as, or remove it (`ctr -n {ns} snapshots rm {id}`)"
            )))
        }
        Err(s) if s.code() == Code::NotFound => {
            return Err(CliError::Usage(format!(
                "image {:?} is not unpacked for snapshotter {SNAPSHOTTER} ({}); unpack it first (`ctr -n {ns} images unpack --snapshotter {SNAPSHOTTER} {}`)",
                plan.image,
                s.message(),
                plan.image
            )))
        }
        Err(s) => return Err(grpc_error(address, "prepare the rootfs snapshot", s)),
    };
    made.snapshot = true;

    let spec = serde_json::to_vec(plan.spec)?;
    let terminal = plan.spec.pointer("/process/terminal").and_then(Value::as_bool).unwrap_or(false);
    let container = Container {
        id: id.into(),
        labels: HashMap::from([(RESTORED_FROM_LABEL.to_string(), plan.checkpoint_id.to_string())]),
        image: plan.image.into(),
        runtime: Some(Runtime { name: RUNTIME.into(), options: None }),
        spec: Some(prost_types::Any { type_url: SPEC_TYPE.into(), value: spec }),
        snapshotter: SNAPSHOTTER.into(),
        snapshot_key: id.into(),
        ..Default::default()
    };
    let mut containers = ContainersClient::new(channel.clone());
    match containers.create(req(CreateContainerRequest { container: Some(container) }, ns, lease)).await {
        Ok(_) => made.container = true,
        Err(s) if s.code() == Code::AlreadyExists => {
            return Err(CliError::Usage(format!(
                "container {id:?} already exists in namespace {ns:?}; choose another id with --as"
            )))
        }
        Err(s) => return Err(grpc_error(address, "create the container", s)),
    }

    let mut tasks = TasksClient::new(channel);
    let create = CreateTaskRequest { container_id: id.into(), rootfs: mounts, terminal, ..Default::default() };
    let failed = |s: Status| restore_failed(address, id, s);
    tasks.create(req(create, ns, lease)).await.map_err(failed)?;
    made.task = true;
    let started = tasks.start(req(StartRequest { container_id: id.into(), exec_id: String::new() }, ns, lease)).await;
    Ok(started.map_err(failed)?.into_inner().pid)
}

/// A failure of Tasks.Create or Tasks.Start: the shim's message (verification, rootfs diff,
/// `runc restore` with CRIU's log excerpt).
fn restore_failed(address: &Path, id: &str, s: Status) -> CliError {
    if s.code() == Code::Unavailable {
        return CliError::Unreachable { address: address.to_path_buf(), reason: s.message().into() };
    }
    CliError::Failed(format!(
        "restore of container {id:?} failed: {}; the new container was removed again; see containerd's log for the shim's details",
        s.message()
    ))
}

/// Undoes what `create_and_start` made, newest first; errors are reported on stderr, not raised
/// (the restore's own error is the one that matters).
async fn cleanup(channel: Channel, ns: &str, id: &str, made: &Made) {
    if made.task {
        let delete = DeleteTaskRequest { container_id: id.into() };
        if let Err(s) = TasksClient::new(channel.clone()).delete(req(delete, ns, None)).await {
            if s.code() != Code::NotFound {
                eprintln!("kybernate: cleanup: cannot delete task {id:?}: {}", s.message());
            }
        }
    }
    if made.container {
        if let Err(s) =
            ContainersClient::new(channel.clone()).delete(req(DeleteContainerRequest { id: id.into() }, ns, None)).await
        {
            if s.code() != Code::NotFound {
                eprintln!(
                    "kybernate: cleanup: cannot delete container {id:?}: {} (`ctr -n {ns} containers delete {id}`)",
                    s.message()
                );
            }
        }
    }
    if made.snapshot {
        let remove = RemoveSnapshotRequest { snapshotter: SNAPSHOTTER.into(), key: id.into() };
        if let Err(s) = SnapshotsClient::new(channel).remove(req(remove, ns, None)).await {
            if s.code() != Code::NotFound {
                eprintln!(
                    "kybernate: cleanup: cannot remove snapshot {id:?}: {} (`ctr -n {ns} snapshots rm {id}`)",
                    s.message()
                );
            }
        }
    }
}

/// The chain id of the image's layers: the key of its unpacked top snapshot.
async fn chain_id_of(
    channel: Channel,
    address: &Path,
    ns: &str,
    image: &str,
    target: Descriptor,
) -> Result<String, CliError> {
    let bad = |what: String| {
        CliError::Failed(format!("image {image:?}: {what}; check the image (`ctr -n {ns} images check`)"))
    };
    let mut content = ContentClient::new(channel);
    let mut desc = target;
    // An index may point to further indexes; a few levels are plenty.
    for _ in 0..4 {
        let blob = read_blob(&mut content, address, ns, &desc).await?;
        let doc: Value = serde_json::from_slice(&blob).map_err(|e| bad(format!("{} is not JSON: {e}", desc.digest)))?;
        if INDEX_TYPES.contains(&desc.media_type.as_str()) || doc.get("manifests").is_some() {
            desc = pick_manifest(&doc).ok_or_else(|| {
                CliError::Usage(format!(
                    "image {image:?} has no manifest for linux/{}; name an image for this node with --image",
                    host_arch()
                ))
            })?;
            continue;
        }
        let config = doc
            .get("config")
            .and_then(descriptor)
            .ok_or_else(|| bad(format!("manifest {} has no config", desc.digest)))?;
        let blob = read_blob(&mut content, address, ns, &config).await?;
        let config: Value =
            serde_json::from_slice(&blob).map_err(|e| bad(format!("config {} is not JSON: {e}", config.digest)))?;
        let diff_ids: Vec<&str> = config
            .pointer("/rootfs/diff_ids")
            .and_then(Value::as_array)
            .map(|a| a.iter().filter_map(Value::as_str).collect())
            .unwrap_or_default();
        return chain_id(&diff_ids).ok_or_else(|| bad("its config lists no layers (rootfs.diff_ids)".into()));
    }
    Err(bad("too many nested indexes".into()))
}

async fn read_blob(
    content: &mut ContentClient<Channel>,
    address: &Path,
    ns: &str,
    desc: &Descriptor,
) -> Result<Vec<u8>, CliError> {
    if desc.size > MAX_BLOB {
        return Err(CliError::Failed(format!(
            "{} is {} bytes, too big for an image manifest or config; check the image",
            desc.digest, desc.size
        )));
    }
    let read = ReadContentRequest { digest: desc.digest.clone(), offset: 0, size: 0 };
    let what = format!("read {} from its content store", desc.digest);
    let mut stream = content.read(req(read, ns, None)).await.map_err(|s| grpc_error(address, &what, s))?.into_inner();
    let mut data = Vec::new();
    while let Some(chunk) = stream.message().await.map_err(|s| grpc_error(address, &what, s))? {
        data.extend_from_slice(&chunk.data);
    }
    Ok(data)
}

/// A descriptor of a manifest or index JSON.
fn descriptor(v: &Value) -> Option<Descriptor> {
    Some(Descriptor {
        media_type: v.get("mediaType").and_then(Value::as_str).unwrap_or_default().into(),
        digest: v.get("digest")?.as_str()?.into(),
        size: v.get("size").and_then(Value::as_i64).unwrap_or(0),
        annotations: HashMap::new(),
    })
}

/// The manifest of an index for linux and this node's architecture.
fn pick_manifest(index: &Value) -> Option<Descriptor> {
    let arch = host_arch();
    let manifests = index.get("manifests")?.as_array()?;
    let platform_is = |m: &&Value, os: &str, a: &str| {
        m.pointer("/platform/os").and_then(Value::as_str) == Some(os)
            && m.pointer("/platform/architecture").and_then(Value::as_str) == Some(a)
    };
    manifests
        .iter()
        .find(|m| platform_is(m, "linux", arch))
        // An index without platforms (e.g. one image imported from an OCI archive) has one manifest.
        .or_else(|| (manifests.len() == 1 && manifests[0].get("platform").is_none()).then(|| &manifests[0]))
        .and_then(descriptor)
}

/// The OCI name of this node's architecture.
fn host_arch() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        "x86" => "386",
        "powerpc64" => "ppc64le",
        "loongarch64" => "loong64",
        other => other,
    }
}

/// chainID(1) = diffID(1); chainID(n) = sha256(chainID(n-1) + " " + diffID(n)).
fn chain_id(diff_ids: &[&str]) -> Option<String> {
    let (first, rest) = diff_ids.split_first()?;
    Some(rest.iter().fold(first.to_string(), |chain, diff| {
        let digest = Sha256::digest(format!("{chain} {diff}").as_bytes());
        let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
        format!("sha256:{hex}")
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chain_ids_follow_the_oci_rule() {
        assert_eq!(chain_id(&[]), None);
        assert_eq!(chain_id(&["sha256:a"]).unwrap(), "sha256:a");
        let two = chain_id(&["sha256:a", "sha256:b"]).unwrap();
        let hex: String = Sha256::digest(b"sha256:a sha256:b").iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(two, format!("sha256:{hex}"));
        let three = chain_id(&["sha256:a", "sha256:b", "sha256:c"]).unwrap();
        let hex: String =
            Sha256::digest(format!("{two} sha256:c").as_bytes()).iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(three, format!("sha256:{hex}"));
    }

    #[test]
    fn cgroups_paths_get_the_new_id() {
        assert_eq!(cgroups_path("/default/web", "web", "web2"), "/default/web2");
        assert_eq!(cgroups_path("/kubepods/pod1/abc", "abc", "new"), "/kubepods/pod1/new");
        assert_eq!(
            cgroups_path("kubepods-pod1.slice:cri-containerd:abc", "abc", "new"),
            "kubepods-pod1.slice:cri-containerd:new"
        );
        assert_eq!(cgroups_path("/custom/other", "abc", "new"), "/custom/new");
        // Only a whole component is the old id.
        assert_eq!(cgroups_path("/ns/xweb", "web", "new"), "/ns/new");
        assert_eq!(cgroups_path("", "abc", "new"), "");
    }

    #[test]
    fn default_ids_fit_containerds_limit() {
        let t = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        assert_eq!(default_id("web", t), "web-restored-1700000000");
        let long = default_id(&"a".repeat(64), t);
        assert_eq!(long.len(), MAX_ID_LEN);
        assert!(valid_identifier(&long));
        assert!(valid_identifier(&default_id(&format!("{}-b", "a".repeat(53)), t)));
        assert!(!valid_identifier("a/b") && !valid_identifier("-a") && !valid_identifier(&"a".repeat(77)));
    }

    #[test]
    fn index_manifests_are_picked_by_platform() {
        let arch = host_arch();
        let index = serde_json::json!({"manifests": [
            {"mediaType": "m", "digest": "sha256:other", "size": 1, "platform": {"os": "linux", "architecture": "s390x-nope"}},
            {"mediaType": "m", "digest": "sha256:ours", "size": 2, "platform": {"os": "linux", "architecture": arch}},
        ]});
        assert_eq!(pick_manifest(&index).unwrap().digest, "sha256:ours");
        let single = serde_json::json!({"manifests": [{"digest": "sha256:only", "size": 3}]});
        assert_eq!(pick_manifest(&single).unwrap().digest, "sha256:only");
        let none = serde_json::json!({"manifests": [
            {"digest": "sha256:x", "platform": {"os": "windows", "architecture": arch}}]});
        assert!(pick_manifest(&none).is_none());
    }
}
