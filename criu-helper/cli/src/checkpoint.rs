//! `kybernate checkpoint`: checkpoints a running container of our runtime into the node's store,
//! through containerd's gRPC API (Tasks.Checkpoint). containerd forwards runc's
//! `CheckpointOptions` to our shim, which writes the checkpoint and its manifest to `image_path`.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant, SystemTime};

use containerd_client::services::v1::containers_client::ContainersClient;
use containerd_client::services::v1::tasks_client::TasksClient;
use containerd_client::services::v1::{CheckpointTaskRequest, GetContainerRequest, GetRequest};
use containerd_client::tonic::{Code, Request, Status};
use containerd_client::types::v1::Status as TaskStatus;
use containerd_client::with_namespace;
use kybernate_checkpoint::Store;
use serde::Serialize;

use crate::containerd::{self, async_runtime, check_namespace, default_namespace, grpc_error, RUNTIME};
use crate::error::CliError;
use crate::output::Output;
use crate::output::{self, human_size};
use crate::store::Checkpoint;

/// Our shim's file name: a runc runtime whose `runtime_path` names it is ours too.
const SHIM_BINARY: &str = "containerd-shim-kybernate-v1";
/// The type containerd (and our shim) expect checkpoint options under.
const OPTIONS_TYPE: &str = "containerd.runc.v1.CheckpointOptions";

/// runc's `CheckpointOptions` (containerd api/types/runc/options/oci.proto), which
/// containerd-client does not generate.
#[derive(Clone, PartialEq, prost::Message)]
struct CheckpointOptions {
    #[prost(bool, tag = "1")]
    exit: bool,
    #[prost(bool, tag = "2")]
    open_tcp: bool,
    #[prost(bool, tag = "3")]
    external_unix_sockets: bool,
    #[prost(bool, tag = "4")]
    terminal: bool,
    #[prost(bool, tag = "5")]
    file_locks: bool,
    #[prost(string, repeated, tag = "6")]
    empty_namespaces: Vec<String>,
    #[prost(string, tag = "7")]
    cgroups_mode: String,
    #[prost(string, tag = "8")]
    image_path: String,
    #[prost(string, tag = "9")]
    work_path: String,
    /// Ours, not runc's (`kybernate_checkpoint::predump::OPTIONS_PRE_DUMP_FIELD`): pre-dump rounds,
    /// sent only when asked for, so that an explicit 0 overrides the container's annotation.
    #[prost(uint32, optional, tag = "1001")]
    pre_dump_rounds: Option<u32>,
}

/// What `kybernate checkpoint` was asked to do.
#[derive(Debug)]
pub struct Args {
    /// The containerd container id; empty when `pod` names the container.
    pub container: String,
    /// `--pod/--pod-namespace/--container`: the container found by its CRI labels instead.
    pub pod: Option<crate::pods::PodContainer>,
    /// Stop the container after the checkpoint (default: leave it running).
    pub exit: bool,
    pub tcp: bool,
    /// The checkpoint's directory name instead of the timestamp.
    pub name: Option<String>,
    /// `--pre-dump N`; unset: the container's annotation or the config decides (in the shim).
    pub pre_dump: Option<u32>,
    /// `[checkpoint] signing_key`: the image this CLI records in a signed manifest is signed again
    /// with it (see [`record_image`]).
    pub signing_key: Option<PathBuf>,
}

/// `checkpoint -o json`: the checkpoint object plus how long the checkpoint took.
#[derive(Serialize)]
struct Checkpointed<'a> {
    #[serde(flatten)]
    checkpoint: &'a Checkpoint,
    duration_ms: u64,
    /// Set when containerd's answer was lost (containerd restarted) but the checkpoint committed.
    #[serde(skip_serializing_if = "Option::is_none")]
    note: Option<&'a str>,
}

pub fn checkpoint(
    store: &Store,
    out: Output,
    address: &Path,
    namespace: Option<&str>,
    req: &Args,
) -> Result<ExitCode, CliError> {
    if let Some(ns) = namespace {
        check_namespace(ns)?;
    }
    if let Some(name) = &req.name {
        check_name(name)?;
    }
    let runtime = async_runtime()?;
    // Progress only for a person watching: stderr a terminal, and not JSON.
    let progress = out == Output::Table && std::io::IsTerminal::is_terminal(&std::io::stderr());
    let done = runtime.block_on(run(store, address, namespace, req, progress))?;
    // The shim records the image only from CRI's annotation; containerd's record has it for a
    // container of any client (`ctr run`, nerdctl), so that `restore --as` needs no --image.
    if let Err(e) = record_image(&done.target, &done.image, req.signing_key.as_deref()) {
        eprintln!(
            "kybernate: warning: cannot record image {:?} in the checkpoint's manifest: {e}; restore it with --image",
            done.image
        );
    }
    // The store root may have been created by the shim just now: canonicalise it to build the id.
    let root = fs::canonicalize(store.root()).unwrap_or_else(|_| store.root().to_path_buf());
    let target = fs::canonicalize(&done.target).unwrap_or(done.target);
    let cp = Checkpoint::load(&root, &target);
    let duration_ms = u64::try_from(done.duration.as_millis()).unwrap_or(u64::MAX);
    if let Some(note) = &done.note {
        eprintln!("kybernate: note: {note}");
    }
    match out {
        Output::Json => output::json(&Checkpointed { checkpoint: &cp, duration_ms, note: done.note.as_deref() })?,
        Output::Table => output::write(&summary(&cp, req, done.duration))?,
    }
    Ok(ExitCode::SUCCESS)
}

/// Records the container's image (containerd's record) in the manifest the shim wrote. The
/// signature covers the manifest's bytes, so a signed manifest is rewritten only when this CLI
/// holds the same key (`[checkpoint] signing_key`) and signs it again; otherwise the manifest stays
/// as signed, and the error says why.
fn record_image(dir: &Path, image: &str, signing_key: Option<&Path>) -> Result<(), String> {
    use kybernate_checkpoint::signing::{read_signature, SigningKey};
    let signature = read_signature(dir).map_err(|e| e.to_string())?;
    let key = match (&signature, signing_key) {
        (None, _) => None,
        (Some(sig), None) => {
            return Err(format!("it is signed by {} and [checkpoint] signing_key is not set here", sig.key_id))
        }
        (Some(sig), Some(path)) => {
            let key = SigningKey::load(path).map_err(|e| e.to_string())?;
            if key.key_id() != sig.key_id {
                return Err(format!(
                    "it is signed by {}, not by this node's [checkpoint] signing_key {}",
                    sig.key_id,
                    key.key_id()
                ));
            }
            Some(key)
        }
    };
    if crate::store::record_image(dir, image).map_err(|e| e.to_string())? {
        if let Some(key) = key {
            key.sign_dir(dir).map_err(|e| format!("the manifest changed and signing it again failed: {e}"))?;
        }
    }
    Ok(())
}

/// What a checkpoint request ended with: where it went, how long it took, the container's image
/// (containerd's record; empty when it has none), and a note when containerd's answer was lost
/// but the store shows the checkpoint committed.
struct Done {
    target: PathBuf,
    duration: Duration,
    image: String,
    note: Option<String>,
}

/// The human summary: where it went, how big, how long, and the GPU mode (with what the GPU
/// part moved and how long each phase took, for GPU containers).
fn summary(cp: &Checkpoint, req: &Args, duration: Duration) -> String {
    let mut lines = vec![
        ("checkpoint", cp.id.clone()),
        ("path", cp.path.display().to_string()),
        ("size", format!("{} ({} bytes)", human_size(cp.size_bytes), cp.size_bytes)),
        ("duration", humantime::format_duration(Duration::from_millis(duration.as_millis() as u64)).to_string()),
    ];
    match cp.manifest.as_ref().and_then(|m| m.gpu.as_ref()) {
        None => lines.push(("gpu mode", "none".into())),
        Some(gpu) => lines.extend(output::gpu_lines(gpu)),
    }
    lines.push(("container", if req.exit { "stopped".into() } else { "left running".into() }));
    let mut text = format!("checkpointed {} into the store\n", cp.container);
    for (k, v) in lines {
        text.push_str(&format!("{:<11} {v}\n", format!("{k}:")));
    }
    text
}

/// Everything that talks to containerd; returns the checkpoint directory and the RPC's duration.
async fn run(
    store: &Store,
    address: &Path,
    namespace: Option<&str>,
    req: &Args,
    progress: bool,
) -> Result<Done, CliError> {
    let unreachable = |e: String| CliError::Unreachable { address: address.to_path_buf(), reason: e };
    let channel = containerd::connect(address).await?;
    let ns = match namespace {
        Some(ns) => ns.to_string(),
        None => default_namespace(channel.clone()).await.map_err(|e| grpc_error(address, "list namespaces", e))?,
    };
    let resolved = match &req.pod {
        Some(pod) => crate::pods::resolve(channel.clone(), address, &ns, pod).await?,
        None => req.container.clone(),
    };
    let id = resolved.as_str();
    // Before the lookups: a name that is taken is refused whatever state the container is in.
    let target = target_path(store, &ns, id, req.name.as_deref())?;

    let mut containers = ContainersClient::new(channel.clone());
    let container = match containers.get(with_namespace!(GetContainerRequest { id: id.into() }, ns)).await {
        Ok(r) => r.into_inner().container,
        Err(s) if s.code() == Code::NotFound => None,
        Err(s) => return Err(grpc_error(address, "get the container", s)),
    };
    let Some(container) = container else {
        return Err(CliError::Usage(format!(
            "container {id:?} not found in namespace {ns:?}; list them with `ctr -n {ns} containers ls`, or name another namespace with -n"
        )));
    };
    let runtime = container.runtime.map(|r| r.name).unwrap_or_default();
    let image = container.image;

    let mut tasks = TasksClient::new(channel);
    let get = GetRequest { container_id: id.into(), exec_id: String::new() };
    let process = match tasks.get(with_namespace!(get, ns)).await {
        Ok(r) => r.into_inner().process,
        Err(s) if s.code() == Code::NotFound => None,
        Err(s) => return Err(grpc_error(address, "get the task", s)),
    };
    // Our runtime type, or a runtime whose shim is ours (CRI's `runtime_path` style: the container
    // is recorded as a runc runtime). Any other shim would write a plain runc checkpoint, without
    // a manifest, into the store.
    if runtime != RUNTIME {
        let shim = process.as_ref().and_then(|p| shim_binary_of(p.pid));
        if shim.as_deref() != Some(SHIM_BINARY) {
            let served = shim.map(|s| format!(", served by {s}")).unwrap_or_default();
            return Err(CliError::Usage(format!(
                "container {id:?} runs under runtime {runtime:?}{served}; only containers of Kybernate's runtime {RUNTIME}, or of a runtime whose runtime_path is {SHIM_BINARY}, can be checkpointed into the store"
            )));
        }
    }
    match process.map(|p| p.status()) {
        Some(TaskStatus::Running) => {}
        None => {
            return Err(CliError::Usage(format!(
                "container {id:?} has no task (it was never started or has been deleted); start it, then checkpoint it"
            )))
        }
        Some(s) => {
            return Err(CliError::Usage(format!(
                "container {id:?} is {}, not running; only a running container can be checkpointed",
                s.as_str_name().to_lowercase()
            )))
        }
    }

    let options = CheckpointOptions {
        exit: req.exit,
        open_tcp: req.tcp,
        image_path: target.display().to_string(),
        pre_dump_rounds: req.pre_dump,
        ..Default::default()
    };
    let request = CheckpointTaskRequest {
        container_id: id.into(),
        parent_checkpoint: String::new(),
        options: Some(prost_types::Any {
            type_url: OPTIONS_TYPE.into(),
            value: prost::Message::encode_to_vec(&options),
        }),
    };
    let started = Instant::now();
    let shown = progress.then(|| crate::progress::Progress::start(target.clone()));
    let result = tasks.checkpoint(with_namespace!(request, ns)).await;
    let done = |note| Done { target: target.clone(), duration: started.elapsed(), image: image.clone(), note };
    let Err(s) = result else {
        drop(shown);
        return Ok(done(None));
    };
    // containerd 1.6 also stores the container's spec in its content store for every
    // checkpoint; the second checkpoint of an unchanged container finds that blob there and
    // fails with "content sha256:…: already exists" (no gRPC code) after our shim has
    // written the checkpoint. The checkpoint itself is complete: accept it when it verifies.
    if is_content_exists(&s) && kybernate_checkpoint::verify_quick(&target).is_ok() {
        drop(shown);
        return Ok(done(None));
    }
    // The answer was lost (containerd restarted or crashed while the shim worked): the shim
    // goes on and commits, so the store, not the error, tells the outcome.
    let lost = is_lost_answer(&s);
    let outcome = settle(&target, &ns, id, lost, |pid| Path::new(&format!("/proc/{pid}")).exists()).await;
    drop(shown); // clears the progress line
    match outcome {
        Outcome::Committed => Ok(done(Some(format!(
            "containerd's answer was lost ({}: {}), but the checkpoint was committed to the store; check the container's state with `ctr -n {ns} tasks ls`",
            code_name(s.code()),
            s.message()
        )))),
        Outcome::Absent if lost => Err(unreachable(format!(
            "{} ({}); no checkpoint was committed",
            s.message(),
            code_name(s.code())
        ))),
        Outcome::Absent => Err(CliError::CheckpointFailed { id: id.into(), message: s.message().to_string() }),
    }
}

/// An error that says nothing about the checkpoint itself: the connection to containerd broke
/// (containerd restarted, crashed or was stopped) before its answer arrived.
fn is_lost_answer(s: &Status) -> bool {
    match s.code() {
        Code::Unavailable | Code::Cancelled | Code::Aborted => true,
        Code::Unknown | Code::Internal => {
            let m = s.message().to_ascii_lowercase();
            ["transport error", "connection", "broken pipe", "stream closed", "h2 protocol error"]
                .iter()
                .any(|w| m.contains(w))
        }
        _ => false,
    }
}

fn code_name(code: Code) -> String {
    format!("{code:?}")
}

/// What the store says about a checkpoint request.
#[derive(Debug, PartialEq, Eq)]
enum Outcome {
    /// The target is a committed checkpoint of this container.
    Committed,
    /// Nothing committed (and, when waited for, nothing being written any more).
    Absent,
}

/// How long a checkpoint whose answer was lost is waited for while its writer still works on it.
const SETTLE_LIMIT: Duration = Duration::from_secs(30 * 60);

/// The outcome of the checkpoint into `target`: committed there for `ns`/`id`, or not. When the
/// answer was `lost`, a partial checkpoint whose writer (the shim, by the pid in its name) is
/// still `alive` is waited for: the shim commits or removes it.
async fn settle(target: &Path, ns: &str, id: &str, lost: bool, alive: impl Fn(u32) -> bool) -> Outcome {
    let deadline = Instant::now() + SETTLE_LIMIT;
    loop {
        if committed(target, ns, id) {
            return Outcome::Committed;
        }
        if !lost || Instant::now() > deadline || !being_written(target, &alive) {
            // The commit is a rename: one last look closes the race with a writer just done.
            return if committed(target, ns, id) { Outcome::Committed } else { Outcome::Absent };
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// `target` is a committed checkpoint (it verifies, cheaply) of container `id` in `ns`.
fn committed(target: &Path, ns: &str, id: &str) -> bool {
    kybernate_checkpoint::verify_quick(target).is_ok_and(|m| m.namespace == ns && m.container_id == id)
}

/// A partial checkpoint for `target` (`.<name>.partial-<pid>-<nanos>` beside it) whose writer lives.
fn being_written(target: &Path, alive: &impl Fn(u32) -> bool) -> bool {
    let (Some(parent), Some(name)) = (target.parent(), target.file_name()) else { return false };
    let prefix = format!(".{}.partial-", name.to_string_lossy());
    let Ok(entries) = fs::read_dir(parent) else { return false };
    entries.flatten().any(|e| {
        let entry = e.file_name();
        let Some(rest) = entry.to_str().and_then(|n| n.strip_prefix(&prefix)) else { return false };
        rest.split('-').next().and_then(|pid| pid.parse().ok()).is_some_and(alive)
    })
}

/// The file name of the shim serving the task whose init process is `pid` (as this node's
/// `/proc` sees it): the init's parent, since a shim is the subreaper its runtime's init is
/// reparented to. `None` when `/proc` does not show it (another PID namespace, a gone process).
fn shim_binary_of(pid: u32) -> Option<String> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let ppid: u32 = status.lines().find_map(|l| l.strip_prefix("PPid:"))?.trim().parse().ok()?;
    let exe = std::fs::read_link(format!("/proc/{ppid}/exe")).ok()?;
    let name = exe.file_name()?.to_string_lossy().into_owned();
    // A binary replaced since the shim started (an upgrade) reads "<name> (deleted)".
    Some(name.strip_suffix(" (deleted)").map(str::to_string).unwrap_or(name))
}

/// containerd's "content sha256:<digest>: already exists" (sent as AlreadyExists or, by
/// containerd 1.6's tasks service, without a code).
fn is_content_exists(s: &Status) -> bool {
    matches!(s.code(), Code::AlreadyExists | Code::Unknown)
        && s.message().starts_with("content sha256:")
        && s.message().ends_with("already exists")
}

/// `<root>/<ns>/<container>/<timestamp or NAME>`; an existing directory is refused.
fn target_path(store: &Store, ns: &str, id: &str, name: Option<&str>) -> Result<PathBuf, CliError> {
    let stamped = store.new_checkpoint_path(ns, id, SystemTime::now()).map_err(|e| CliError::Usage(e.to_string()))?;
    let target = match name {
        Some(name) => stamped.with_file_name(name),
        None => stamped,
    };
    if fs::symlink_metadata(&target).is_ok() {
        let rel = target.strip_prefix(store.root()).unwrap_or(&target).display().to_string();
        return Err(CliError::Usage(format!(
            "checkpoint {rel:?} already exists; choose another --name, or remove it first with `kybernate rm {rel}`"
        )));
    }
    Ok(target)
}

/// `--name`: the store's rules for a path component (non-empty, not `.` or `..`, no `/` or NUL),
/// and not hidden (the store treats names starting with '.' as work in progress and never lists them).
fn check_name(name: &str) -> Result<(), CliError> {
    if name.is_empty() || name == "." || name == ".." || name.contains(['/', '\0']) || name.starts_with('.') {
        return Err(CliError::Usage(format!(
            "invalid checkpoint name {name:?}: must be non-empty, without '/' or NUL, and not start with '.'; e.g. --name before-upgrade"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options_encode_like_runc() {
        let o = CheckpointOptions { exit: true, image_path: "/x".into(), ..Default::default() };
        // field 1 varint 1; field 8 length-delimited "/x"
        assert_eq!(prost::Message::encode_to_vec(&o), vec![0x08, 0x01, 0x42, 0x02, b'/', b'x']);
    }

    /// `--pre-dump N` rides in a field of our own; an explicit 0 is sent too (it overrides the
    /// container's annotation), and nothing at all without the flag.
    #[test]
    fn pre_dump_rounds_travel_in_field_1001() {
        assert_eq!(kybernate_checkpoint::predump::OPTIONS_PRE_DUMP_FIELD, 1001);
        let key = [0xc8, 0x3e]; // (1001 << 3) | 0 as a varint
        for (rounds, value) in [(Some(0), 0u8), (Some(3), 3)] {
            let o = CheckpointOptions { pre_dump_rounds: rounds, ..Default::default() };
            assert_eq!(prost::Message::encode_to_vec(&o), vec![key[0], key[1], value]);
        }
        assert!(prost::Message::encode_to_vec(&CheckpointOptions::default()).is_empty());
    }

    /// The image goes into a signed manifest only together with a new signature by the same key;
    /// otherwise the manifest stays byte for byte as signed.
    #[test]
    fn a_signed_manifest_gets_the_image_only_when_signed_again_by_its_key() {
        use kybernate_checkpoint::signing::{read_manifest_bytes, read_signature, write_key_pair, PublicKey};
        let d = tempfile::tempdir().unwrap();
        let (cp, keys, other) = (d.path().join("cp"), d.path().join("keys"), d.path().join("other"));
        fs::create_dir(&cp).unwrap();
        fs::write(cp.join("kybernate.json"), br#"{"container_id": "web"}"#).unwrap();
        // Unsigned: recorded.
        record_image(&cp, "docker.io/library/busybox:1", None).unwrap();
        assert!(String::from_utf8(fs::read(cp.join("kybernate.json")).unwrap()).unwrap().contains("busybox:1"));

        fs::write(cp.join("kybernate.json"), br#"{"container_id": "web"}"#).unwrap();
        let pair = write_key_pair(&keys, false).unwrap();
        let other = write_key_pair(&other, false).unwrap();
        kybernate_checkpoint::signing::SigningKey::load(&pair.private).unwrap().sign_dir(&cp).unwrap();
        let signed = fs::read(cp.join("kybernate.json")).unwrap();
        let err = record_image(&cp, "busybox", None).unwrap_err();
        assert!(err.contains(&pair.key_id) && err.contains("signing_key is not set"), "{err}");
        let err = record_image(&cp, "busybox", Some(&other.private)).unwrap_err();
        assert!(err.contains(&pair.key_id) && err.contains(&other.key_id), "{err}");
        assert_eq!(fs::read(cp.join("kybernate.json")).unwrap(), signed, "changed without a new signature");

        record_image(&cp, "busybox", Some(&pair.private)).unwrap();
        let bytes = read_manifest_bytes(&cp).unwrap();
        assert!(String::from_utf8_lossy(&bytes).contains("busybox"));
        let public = PublicKey::load(&pair.public).unwrap();
        assert!(public.verifies(&bytes, &read_signature(&cp).unwrap().unwrap()), "the new signature does not verify");
    }

    /// A child's shim, as this reads it, is its parent: here, this test binary.
    #[test]
    fn the_shim_of_a_process_is_its_parents_binary() {
        let mut child = std::process::Command::new("sleep").arg("30").spawn().unwrap();
        let me = std::env::current_exe().unwrap();
        let seen = shim_binary_of(child.id());
        child.kill().unwrap();
        child.wait().unwrap();
        assert_eq!(seen.as_deref(), me.file_name().and_then(|n| n.to_str()));
        assert_eq!(shim_binary_of(u32::MAX), None);
    }

    fn manifest(ns: &str, id: &str) -> kybernate_checkpoint::Manifest {
        serde_json::from_value(serde_json::json!({
            "format_version": kybernate_checkpoint::manifest::FORMAT_VERSION, "namespace": ns, "container_id": id,
            "runtime": {"path": "/usr/bin/runc", "version": "1"}, "criu": {"path": "/usr/sbin/criu", "version": "4.2"},
            "kernel": "6", "host": "h", "created": kybernate_checkpoint::manifest::now_rfc3339(),
            "options": kybernate_checkpoint::CheckpointFlags::default(), "files": {},
        }))
        .unwrap()
    }

    /// A partial checkpoint for `target` as the shim writes it, committed on `commit`.
    fn partial(target: &Path) -> kybernate_checkpoint::PartialCheckpoint {
        let p = kybernate_checkpoint::PartialCheckpoint::begin(target).unwrap();
        fs::write(p.images_dir().join("inventory.img"), b"inv").unwrap();
        p
    }

    fn settled(target: &Path, id: &str, lost: bool, alive: impl Fn(u32) -> bool) -> Outcome {
        async_runtime().unwrap().block_on(settle(target, "default", id, lost, alive))
    }

    /// containerd restarted during `kybernate checkpoint`: the store, not the lost answer, says
    /// whether the checkpoint committed; a live writer's partial checkpoint is waited for.
    #[test]
    fn a_lost_answer_is_settled_by_the_store() {
        let root = tempfile::tempdir().unwrap();
        let target = root.path().join("default/web/20260101T000000.000Z");
        assert_eq!(settled(&target, "web", true, |_| true), Outcome::Absent, "nothing written");

        // The shim (here: this process) is still writing; it commits a moment later.
        let p = partial(&target);
        let writer = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(300));
            p.commit(manifest("default", "web")).unwrap();
        });
        let me = std::process::id();
        assert_eq!(settled(&target, "web", true, |pid| pid == me), Outcome::Committed);
        writer.join().unwrap();
        assert_eq!(settled(&target, "web", false, |_| false), Outcome::Committed, "any error: the store decides");
        assert_eq!(settled(&target, "db", true, |_| true), Outcome::Absent, "another container's checkpoint");

        // A writer that died (the shim was killed) leaves a partial that never commits.
        let other = root.path().join("default/web/20260101T000001.000Z");
        let p = partial(&other);
        assert_eq!(settled(&other, "web", true, |pid| pid != me), Outcome::Absent);
        // Not waited for when the error is the shim's own.
        let started = Instant::now();
        assert_eq!(settled(&other, "web", false, |_| true), Outcome::Absent);
        assert!(started.elapsed() < Duration::from_secs(1));
        drop(p);
    }

    #[test]
    fn transport_errors_are_lost_answers_and_the_shims_errors_are_not() {
        assert!(is_lost_answer(&Status::unknown("transport error")));
        assert!(is_lost_answer(&Status::unavailable("error trying to connect")));
        assert!(is_lost_answer(&Status::cancelled("h2 protocol error: stream no longer needed")));
        assert!(!is_lost_answer(&Status::unknown("runc checkpoint failed: criu dump: exit status 1")));
        assert!(!is_lost_answer(&Status::failed_precondition("container is paused")));
    }

    #[test]
    fn names_are_checked() {
        for good in ["first", "before-upgrade", "20261123T212501.123Z"] {
            assert!(check_name(good).is_ok(), "{good}");
        }
        for bad in ["", ".", "..", "a/b", ".hidden", "a\0b"] {
            assert!(check_name(bad).is_err(), "{bad:?}");
        }
    }
}
