//! `kybernate restore`: restores a checkpoint of the node's store as a new container, through
//! containerd's gRPC API, or prints the pod annotation that makes Kubernetes do it.
//!
//! The new container gets the checkpoint's `spec.dump` (or the operator's `--spec FILE`) with
//! the annotation `kybernate.io/restore-from` naming the checkpoint; our shim sees it at Create,
//! verifies the checkpoint, applies its `rootfs-diff.tar` on the fresh rootfs (the image's
//! snapshot) and runs `runc restore` at Start instead of starting the process fresh.
//!
//! `spec.dump` is untrusted: the manifest's sums detect corruption, not tampering, and the spec
//! is what grants the container its capabilities, namespaces, mounts, devices and hooks. So
//! before anything is created the spec is compared with the image defaults
//! (`kybernate_checkpoint::grants::defaults`) and a spec that grants more is refused unless
//! `--trust-spec`; the shim's credentials check (the checkpoint's processes against that spec)
//! runs here too, so that every excess is named at once, before containerd is asked. So does
//! the restore verdict (`kybernate_checkpoint::verdict`): the manifest against this node and the
//! new spec (CRIU, CPU, cgroups, mounts, GPUs), every mismatch named; `kybernate inspect
//! --compat` and `kybernate doctor --checkpoint` print the same verdict.

use std::borrow::Cow;
use std::collections::HashMap;
use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};
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
use kybernate_checkpoint::grants::defaults::{beyond_defaults, Privilege};
use kybernate_checkpoint::grants::{GrantError, Host, Summary};
use kybernate_checkpoint::images::ImageError;
use kybernate_checkpoint::manifest::{valid_identifier, MAX_IDENTIFIER_LEN};
use kybernate_checkpoint::verdict::{self, ContainerFacts, Incompatible, NodeFacts, NodeSources, Verdict};
use kybernate_checkpoint::{Manifest, Store, SPEC_DUMP};
use kybernate_gpu as gpu;
use serde::Serialize;
use serde_json::Value;
use sha2::{Digest, Sha256};

use crate::containerd::{self, async_runtime, check_namespace, grpc_error, RUNTIME};
use crate::error::CliError;
use crate::output;
use crate::output::Output;
use crate::store::{self, Checkpoint};

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
/// Image index and manifest list media types.
const INDEX_TYPES: [&str; 2] =
    ["application/vnd.oci.image.index.v1+json", "application/vnd.docker.distribution.manifest.list.v2+json"];
/// How long the lease that protects what we create from containerd's garbage collection lives
/// if we cannot delete it ourselves.
const LEASE_EXPIRY: Duration = Duration::from_secs(3600);
/// Manifests and image configs are small; anything bigger is not one.
const MAX_BLOB: i64 = 16 << 20;
/// An OCI spec is a few KiB (a seccomp profile included); a bigger `spec.dump` or `--spec` file
/// is not read into memory.
const MAX_SPEC: u64 = 16 << 20;
/// The hint of a refusal for what the spec grants.
const TRUST_HINT_DUMP: &str =
    "pass --trust-spec if you trust where this checkpoint came from, or --spec FILE to create the container from a spec you trust";

/// What `kybernate restore` was asked to do.
#[derive(Debug, Default)]
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
    /// `--spec`: the OCI spec to create the container from instead of the checkpoint's `spec.dump`.
    pub spec: Option<PathBuf>,
    /// `--trust-spec`: create it although the spec grants more than the image defaults.
    pub trust_spec: bool,
    /// `--dry-run`: verify and check, print what the restore would do, create nothing.
    pub dry_run: bool,
    /// `[checkpoint] cdi_spec_dirs`: where the shim resolves a GPU container's CDI devices.
    pub cdi_spec_dirs: Vec<PathBuf>,
    /// `[trust]`: which checkpoints from outside this node restores.
    pub trust: kybernate_runtime_select::TrustConfig,
}

/// Where the new container's spec comes from.
enum SpecSource<'a> {
    /// The checkpoint's `spec.dump`.
    Dump { id: &'a str, path: PathBuf },
    /// `--spec FILE`.
    File(&'a Path),
}

impl SpecSource<'_> {
    fn path(&self) -> &Path {
        match self {
            SpecSource::Dump { path, .. } => path,
            SpecSource::File(path) => path,
        }
    }

    /// How messages name it: `spec.dump of <id>` or the file as given.
    fn label(&self) -> String {
        match self {
            SpecSource::Dump { id, .. } => format!("{SPEC_DUMP} of {id}"),
            SpecSource::File(path) => path.display().to_string(),
        }
    }

    /// How the one-line refusal names it (the checkpoint is named there already).
    fn short_label(&self) -> String {
        match self {
            SpecSource::Dump { .. } => SPEC_DUMP.to_string(),
            SpecSource::File(path) => path.display().to_string(),
        }
    }

    fn trust_hint(&self) -> String {
        match self {
            SpecSource::Dump { .. } => TRUST_HINT_DUMP.to_string(),
            SpecSource::File(path) => format!(
                "pass --trust-spec if the container is meant to have this, or remove it from {}",
                path.display()
            ),
        }
    }
}

/// What the checks before a restore found: the spec's privileges beyond the image defaults and
/// the credentials check of the checkpoint's processes against that spec.
struct Checks {
    spec: String,
    privileges: Vec<String>,
    /// The spec has a field of the wrong shape: what it grants cannot be told.
    unreadable: Option<String>,
    credentials: Result<Summary, GrantError>,
    /// The restore verdict: this node and the spec against the checkpoint's manifest.
    verdict: Verdict,
}

impl Checks {
    /// Why the restore must not go ahead (one line), if it must not.
    fn refusal(&self, source: &SpecSource<'_>, trust_spec: bool) -> Option<String> {
        let mut reasons = Vec::new();
        if let Some(e) = &self.unreadable {
            reasons.push(format!(
                "the spec ({}) cannot be checked: {e}; create the container from a spec you trust (--spec FILE)",
                source.short_label()
            ));
        }
        if !self.privileges.is_empty() && !trust_spec {
            reasons.push(format!(
                "the spec ({}) grants beyond the image defaults: {}; {}",
                source.short_label(),
                self.privileges.join("; "),
                source.trust_hint()
            ));
        }
        match &self.credentials {
            Ok(_) => {}
            // The same field, already named.
            Err(GrantError::Spec(_)) if self.unreadable.is_some() => {}
            Err(GrantError::Excess(excesses)) => reasons.push(format!(
                "the checkpoint's processes hold more than the spec grants: {}; restore it only with a spec that grants this (--spec FILE), and only if you trust the checkpoint",
                excesses.iter().map(ToString::to_string).collect::<Vec<_>>().join("; ")
            )),
            Err(e) => reasons.push(format!("the credentials check failed: {e}")),
        }
        if !self.verdict.compatible() {
            reasons.push(verdict_reason(&self.verdict));
        }
        (!reasons.is_empty()).then(|| reasons.join("; and "))
    }

    fn credentials_json(&self) -> Credentials {
        match &self.credentials {
            Ok(s) => Credentials {
                ok: true,
                processes: Some(s.processes),
                threads: Some(s.threads),
                mounts: Some(s.mounts),
                excesses: Vec::new(),
                error: None,
            },
            Err(GrantError::Excess(excesses)) => Credentials {
                ok: false,
                excesses: excesses.iter().map(ToString::to_string).collect(),
                ..Credentials::default()
            },
            Err(e) => Credentials { ok: false, error: Some(e.to_string()), ..Credentials::default() },
        }
    }

    fn credentials_line(&self) -> String {
        match &self.credentials {
            Ok(s) => format!("ok: the checkpoint's processes need nothing beyond the spec ({s})"),
            Err(GrantError::Excess(excesses)) => {
                format!("refused: {}", excesses.iter().map(ToString::to_string).collect::<Vec<_>>().join("; "))
            }
            Err(e) => format!("failed: {e}"),
        }
    }

    /// The lines printed before anything is created: what the spec grants beyond the defaults.
    fn privileges_text(&self) -> String {
        let mut text = format!("the spec ({}) grants beyond the image defaults:\n", self.spec);
        for p in &self.privileges {
            text.push_str(&format!("  {p}\n"));
        }
        text
    }
}

/// `restore -o json`.
#[derive(Serialize)]
struct Restored<'a> {
    container: &'a str,
    namespace: &'a str,
    pid: u32,
    duration_ms: u64,
    /// The spec the container was created from: `spec.dump of <id>` or the `--spec` file.
    spec: &'a str,
    /// What that spec grants beyond the image defaults (allowed by `--trust-spec`).
    privileges: &'a [String],
    checkpoint: &'a Checkpoint,
}

/// `restore --dry-run -o json`, and `restore -o json` when it is refused.
#[derive(Serialize)]
struct Checked<'a> {
    dry_run: bool,
    /// Whether the restore goes ahead (with the flags given).
    restore: bool,
    container: &'a str,
    namespace: &'a str,
    image: &'a str,
    spec: &'a str,
    privileges: &'a [String],
    trust_spec: bool,
    credentials: Credentials,
    /// The restore verdict: `{"compatible", "mismatches", "warnings"}`.
    verdict: &'a Verdict,
    /// Why it would be refused; `null` when it goes ahead.
    error: Option<&'a str>,
    checkpoint: &'a Checkpoint,
}

/// The credentials check in JSON: `ok`, what it looked at, or why not.
#[derive(Serialize, Default)]
struct Credentials {
    ok: bool,
    processes: Option<usize>,
    threads: Option<usize>,
    mounts: Option<usize>,
    excesses: Vec<String>,
    error: Option<String>,
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
    // Before anything of it is read: a checkpoint from outside must be one the node vouches for.
    crate::signing::check_restore(&cp.id, &cp.path, &args.trust)?;
    // Each restore hashes each byte once, in the shim at Create (mandatory there, whatever a
    // caller claims). Here only what this command reads itself before asking containerd: the
    // manifest, the file list and sizes, and the digests of the small files (spec.dump, CRIU's
    // metadata images), not the memory pages; a damaged page image fails in the shim, whose
    // message names the file and the byte range. A dry run restores nothing: it hashes all.
    let verified = if args.dry_run {
        kybernate_checkpoint::verify(&cp.path)
    } else {
        kybernate_checkpoint::verify_metadata(&cp.path)
    };
    let manifest = match verified {
        Ok(m) => m,
        Err(source) => return Err(CliError::Verify { id: cp.id, source }),
    };
    cp.set_verified(None);
    if args.pod_annotation {
        // The pod may land on any node, into a spec the kubelet makes: the shim judges the
        // restore there (`kybernate doctor --checkpoint` on a node judges it ahead). Only the
        // GPUs are checked here, as before: a GPU pod is usually meant for a node like this one.
        if let Some(gpu) = manifest.gpu.as_ref().filter(|_| !args.allow_gpu_mismatch) {
            let node = kybernate_gpu::node_gpus(Path::new("/proc"));
            if let Err(e) = kybernate_gpu::check_compatible(&gpu.gpus, &node.gpus) {
                return Err(CliError::Failed(format!("checkpoint {:?}: {e} (here: --allow-gpu-mismatch)", cp.id)));
            }
        }
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
    let source = match &args.spec {
        Some(file) => SpecSource::File(file),
        None => SpecSource::Dump { id: &cp.id, path: cp.path.join(SPEC_DUMP) },
    };
    let mut spec = restore_spec(&cp, &manifest, &new_id, &source)?;
    set_gpu_mismatch_annotation(&mut spec, args.allow_gpu_mismatch);
    // Before anything is created: this node and the new spec against the manifest, every
    // mismatch at once (the shim judges again at Create).
    let (judged, _) = judge(&manifest, Some(&spec), &args.cdi_spec_dirs, args.allow_gpu_mismatch);
    let checks = match run_checks(&cp, &manifest, &spec, &source, args, judged.clone()) {
        Ok(checks) => checks,
        // The GPU request the shim would resolve cannot be: the verdict names it with the rest.
        Err(_) if !judged.compatible() => {
            return Err(CliError::Incompatible { id: cp.id.clone(), reasons: verdict_reason(&judged) })
        }
        Err(e) => return Err(e),
    };
    let refusal = checks.refusal(&source, args.trust_spec);
    let refused = |reasons: String| {
        if checks.verdict.compatible() {
            CliError::Refused { id: cp.id.clone(), reasons }
        } else {
            // A node that cannot take it: the operation fails here whatever the flags (exit 1).
            CliError::Incompatible { id: cp.id.clone(), reasons }
        }
    };

    if args.dry_run || refusal.is_some() {
        match out {
            Output::Json => output::json(&Checked {
                dry_run: args.dry_run,
                restore: refusal.is_none(),
                container: &new_id,
                namespace: &ns,
                image: &image,
                spec: &checks.spec,
                privileges: &checks.privileges,
                trust_spec: args.trust_spec,
                credentials: checks.credentials_json(),
                verdict: &checks.verdict,
                error: refusal.as_deref(),
                checkpoint: &cp,
            })?,
            Output::Table => {
                let mut text = if checks.privileges.is_empty() { String::new() } else { checks.privileges_text() };
                if args.dry_run {
                    text.push_str(&dry_run_table(&cp, &new_id, &ns, &image, &checks, args, refusal.is_none()));
                }
                output::write(&text)?;
            }
        }
        return match refusal {
            Some(r) => Err(refused(r)),
            None => Ok(ExitCode::SUCCESS),
        };
    }
    if out == Output::Table && !checks.privileges.is_empty() {
        output::write(&checks.privileges_text())?;
    }
    let plan = Plan { ns: &ns, id: &new_id, image: &image, spec: &spec, checkpoint_id: &cp.id };

    let runtime = async_runtime()?;
    let started = Instant::now();
    let pid = runtime.block_on(run(address, &plan))?;
    let duration = started.elapsed();
    let duration_ms = u64::try_from(duration.as_millis()).unwrap_or(u64::MAX);
    match out {
        Output::Json => output::json(&Restored {
            container: &new_id,
            namespace: &ns,
            pid,
            duration_ms,
            spec: &checks.spec,
            privileges: &checks.privileges,
            checkpoint: &cp,
        })?,
        Output::Table => {
            let lines = [
                ("container", new_id.clone()),
                ("namespace", ns.clone()),
                ("pid", pid.to_string()),
                ("checkpoint", cp.id.clone()),
                ("image", image.clone()),
                ("spec", checks.spec.clone()),
                ("privileges", privileges_summary(&checks.privileges, true)),
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

/// The checks before anything is created: what the spec grants beyond the image defaults, and
/// the credentials check (CRIU's images against the spec as the shim will check it). Both run,
/// so that a refusal names everything at once. Errors: the GPU devices the shim would add cannot
/// be resolved (exit 2), the images cannot be read at all (exit 1).
fn run_checks(
    cp: &Checkpoint,
    manifest: &Manifest,
    spec: &Value,
    source: &SpecSource<'_>,
    args: &Args,
    verdict: Verdict,
) -> Result<Checks, CliError> {
    let (privileges, unreadable) = match beyond_defaults(spec) {
        Ok(found) => (found.iter().map(Privilege::to_string).collect(), None),
        Err(e) => (Vec::new(), Some(e.to_string())),
    };
    let checked = match manifest.gpu {
        Some(_) => with_own_gpu_devices(spec, &args.cdi_spec_dirs).map_err(|e| CliError::Refused {
            id: cp.id.clone(),
            reasons: format!(
                "the GPU devices the shim would give the new container cannot be resolved: {e}; see docs/gpu.md"
            ),
        })?,
        None => Cow::Borrowed(spec),
    };
    let images = cp.path.join("checkpoint");
    let credentials = kybernate_checkpoint::grants::check_restore(&images, &checked, &Host::this_node());
    if let Err(GrantError::Images(e @ ImageError::Io { .. })) = &credentials {
        return Err(CliError::Failed(format!(
            "checkpoint {:?}: cannot read its CRIU images for the credentials check: {e}; check the store's permissions (usually root)",
            cp.id
        )));
    }
    Ok(Checks { spec: source.label(), privileges, unreadable, credentials, verdict })
}

/// The restore verdict on this node for checkpoint `manifest`, with the new container's `spec`
/// when known (`None`: the node alone), and how long it took. CRIU is the one on PATH, as runc
/// finds it; CDI specs in `cdi_dirs`, as the shim resolves a GPU request.
pub fn judge(
    manifest: &Manifest,
    spec: Option<&Value>,
    cdi_dirs: &[PathBuf],
    allow_gpu_mismatch: bool,
) -> (Verdict, Duration) {
    let started = Instant::now();
    let node = node_facts();
    let dirs: Vec<&Path> = cdi_dirs.iter().map(PathBuf::as_path).collect();
    let container =
        spec.map(|s| ContainerFacts::from_spec(s, &dirs, Path::new("/proc"), Path::new("/dev"), &node.gpus));
    let judged = verdict::judge(manifest, &node, container.as_ref(), allow_gpu_mismatch);
    (judged, started.elapsed())
}

/// This node's side of the verdict: CRIU on PATH run for its version, the rest read from files.
fn node_facts() -> NodeFacts {
    let path_env = std::env::var_os("PATH");
    let path = path_env.as_deref();
    let criu = kybernate_checkpoint::find_criu(None, path).map_err(|e| e.to_string()).and_then(|bin| {
        std::process::Command::new(&bin)
            .arg("--version")
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .map_err(|e| format!("{}: cannot run: {e}", bin.display()))
    });
    NodeFacts::gather(&NodeSources::system(path), verdict::criu_version_of(criu))
}

/// A refusal's reason for an incompatible verdict: every mismatch.
fn verdict_reason(judged: &Verdict) -> String {
    format!("this node or container cannot take it: {}; see `kybernate inspect --compat`", Incompatible(judged.clone()))
}

/// The spec as the shim checks it at Create for a GPU checkpoint: with the devices, cgroup rules
/// and driver mounts of the container's own GPU request added (`gpu::own_devices`, as the shim
/// resolves it), never the checkpoint's record.
fn with_own_gpu_devices<'a>(spec: &'a Value, cdi_dirs: &[PathBuf]) -> Result<Cow<'a, Value>, String> {
    let dirs: Vec<&Path> = cdi_dirs.iter().map(PathBuf::as_path).collect();
    let (devices, how) = gpu::own_devices(&gpu::gpu_request(spec), &dirs, Path::new("/proc"), Path::new("/dev"))
        .map_err(|e| e.to_string())?;
    if how == gpu::Resolution::Nothing {
        return Ok(Cow::Borrowed(spec));
    }
    let mut spec = spec.clone();
    gpu::inject(&mut spec, &devices);
    Ok(Cow::Owned(spec))
}

/// "none beyond the image defaults", or how many and whether `--trust-spec` allows them.
fn privileges_summary(privileges: &[String], trusted: bool) -> String {
    match (privileges.len(), trusted) {
        (0, _) => "none beyond the image defaults".into(),
        (n, true) => format!("{n} beyond the image defaults, allowed by --trust-spec (listed above)"),
        (n, false) => format!("{n} beyond the image defaults, not allowed without --trust-spec (listed above)"),
    }
}

/// `--dry-run`'s table: what the restore would do, and whether it goes ahead.
fn dry_run_table(
    cp: &Checkpoint,
    new_id: &str,
    ns: &str,
    image: &str,
    checks: &Checks,
    args: &Args,
    goes_ahead: bool,
) -> String {
    let verdict = if goes_ahead { "would be restored" } else { "would be refused" };
    let mut text = format!("dry run: {} {verdict} as {new_id}; nothing was created\n", cp.id);
    let lines = [
        ("container", new_id.to_string()),
        ("namespace", ns.to_string()),
        ("checkpoint", cp.id.clone()),
        ("verified", "every file's size and checksum".to_string()),
        ("image", image.to_string()),
        ("spec", checks.spec.clone()),
        (
            "privileges",
            match &checks.unreadable {
                Some(e) => format!("cannot be checked: {e}"),
                None => privileges_summary(&checks.privileges, args.trust_spec),
            },
        ),
        ("credentials", checks.credentials_line()),
        ("verdict", output::verdict_line(&checks.verdict)),
    ];
    for (k, v) in lines {
        text.push_str(&format!("{:<12} {v}\n", format!("{k}:")));
    }
    text
}

/// The GPU-mismatch annotation is the CLI's to set (`--allow-gpu-mismatch`): a spec that
/// brings its own would switch the shim's GPU check off unasked.
fn set_gpu_mismatch_annotation(spec: &mut Value, allow: bool) {
    let Some(annotations) = spec.get_mut("annotations").and_then(Value::as_object_mut) else { return };
    if allow {
        annotations.insert(ALLOW_GPU_MISMATCH_ANNOTATION.into(), Value::String("true".into()));
    } else {
        annotations.remove(ALLOW_GPU_MISMATCH_ANNOTATION);
    }
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
    let keep = MAX_IDENTIFIER_LEN.saturating_sub(suffix.len());
    let base: String = container.chars().take(keep).collect();
    let base = base.trim_end_matches(['.', '_', '-']);
    format!("{base}{suffix}")
}

fn check_id(id: &str) -> Result<(), CliError> {
    if !valid_identifier(id) {
        return Err(CliError::Usage(format!(
            "invalid container id {id:?}: letters and digits, separated by '.', '_' or '-', at most {MAX_IDENTIFIER_LEN} characters; e.g. --as web-restored"
        )));
    }
    Ok(())
}

/// The spec the new container is created from (`spec.dump`, or `--spec FILE`), made the new
/// container's: the restore annotation (the checkpoint's absolute directory), the rootfs at
/// `rootfs` in the bundle, its own cgroup. An unreadable `spec.dump` fails the restore (exit 1);
/// an unreadable `--spec` file is bad input (exit 2).
fn restore_spec(cp: &Checkpoint, m: &Manifest, new_id: &str, source: &SpecSource<'_>) -> Result<Value, CliError> {
    let path = source.path();
    let bad = |what: String| match source {
        SpecSource::Dump { .. } => CliError::Failed(format!(
            "{}: {what}; the checkpoint cannot be restored through containerd from its own spec; pass --spec FILE",
            path.display()
        )),
        SpecSource::File(_) => {
            CliError::Usage(format!("--spec {}: {what}; name an OCI runtime spec (config.json)", path.display()))
        }
    };
    let text = read_limited(path).map_err(bad)?;
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

/// A spec file's bytes, at most [`MAX_SPEC`].
fn read_limited(path: &Path) -> Result<Vec<u8>, String> {
    let file = fs::File::open(path).map_err(|e| format!("cannot read: {e}"))?;
    let mut text = Vec::new();
    file.take(MAX_SPEC + 1).read_to_end(&mut text).map_err(|e| format!("cannot read: {e}"))?;
    if text.len() as u64 > MAX_SPEC {
        return Err(format!("more than {MAX_SPEC} bytes, too big for an OCI spec"));
    }
    Ok(text)
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
    let channel = containerd::connect(address).await?;
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

    fn checks(privileges: &[&str], credentials: Result<Summary, GrantError>) -> Checks {
        Checks {
            spec: "spec.dump of default/web/1".into(),
            privileges: privileges.iter().map(|p| p.to_string()).collect(),
            unreadable: None,
            credentials,
            verdict: Verdict::default(),
        }
    }

    fn ok() -> Result<Summary, GrantError> {
        Ok(Summary { processes: 1, threads: 1, mounts: 14 })
    }

    #[test]
    fn privileges_are_refused_without_trust_spec_and_excesses_always() {
        let dump = SpecSource::Dump { id: "default/web/1", path: PathBuf::from("/s/spec.dump") };
        let c = checks(&["seccomp unconfined (no profile)", "host network namespace"], ok());
        let r = c.refusal(&dump, false).expect("refused without --trust-spec");
        assert_eq!(
            r,
            format!(
                "the spec (spec.dump) grants beyond the image defaults: seccomp unconfined (no profile); host network \
                 namespace; {TRUST_HINT_DUMP}"
            )
        );
        assert_eq!(c.refusal(&dump, true), None, "--trust-spec allows what the spec grants");
        assert_eq!(checks(&[], ok()).refusal(&dump, false), None, "nothing beyond the defaults");
        let file = SpecSource::File(Path::new("web.json"));
        assert!(
            c.refusal(&file, false).unwrap().ends_with("or remove it from web.json"),
            "{:?}",
            c.refusal(&file, false)
        );

        // The credentials check is not the spec's to waive.
        let excess = Err(GrantError::Excess(vec![kybernate_checkpoint::grants::Excess::Unmasked {
            path: "/proc/kcore".into(),
        }]));
        let c = checks(&["seccomp unconfined (no profile)"], excess);
        let r = c.refusal(&dump, true).expect("refused with --trust-spec too");
        assert!(
            r.starts_with("the checkpoint's processes hold more than the spec grants: /proc/kcore is not masked"),
            "{r}"
        );
        let both = c.refusal(&dump, false).unwrap();
        assert!(both.contains("seccomp unconfined") && both.contains("/proc/kcore"), "every reason at once: {both}");
        let json = c.credentials_json();
        assert!(!json.ok && json.excesses.len() == 1 && json.processes.is_none());

        // A spec whose fields cannot be read cannot be trusted either; its field is named once.
        let mut c = checks(
            &[],
            Err(GrantError::Spec(kybernate_checkpoint::grants::SpecError {
                field: "hooks".into(),
                reason: "x".into(),
            })),
        );
        c.unreadable = Some("spec field hooks: x".into());
        let r = c.refusal(&dump, true).unwrap();
        assert_eq!(r.matches("spec field hooks").count(), 1, "{r}");
    }

    #[test]
    fn the_gpu_mismatch_annotation_is_the_clis() {
        let mut spec = serde_json::json!({"annotations": {ALLOW_GPU_MISMATCH_ANNOTATION: "true", "x": "y"}});
        set_gpu_mismatch_annotation(&mut spec, false);
        assert_eq!(spec, serde_json::json!({"annotations": {"x": "y"}}));
        set_gpu_mismatch_annotation(&mut spec, true);
        assert_eq!(spec["annotations"][ALLOW_GPU_MISMATCH_ANNOTATION], "true");
    }

    #[test]
    fn spec_files_are_read_up_to_a_limit() {
        let dir = tempfile::tempdir().unwrap();
        let big = dir.path().join("big.json");
        fs::File::create(&big).unwrap().set_len(MAX_SPEC + 1).unwrap();
        assert!(read_limited(&big).unwrap_err().contains("too big"));
        let small = dir.path().join("small.json");
        fs::write(&small, b"{}").unwrap();
        assert_eq!(read_limited(&small).unwrap(), b"{}");
        assert!(read_limited(&dir.path().join("missing")).unwrap_err().starts_with("cannot read: "));
    }

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
        assert_eq!(long.len(), MAX_IDENTIFIER_LEN);
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
