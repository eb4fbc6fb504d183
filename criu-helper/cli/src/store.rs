//! The node's store as the CLI sees it: opening it from the config, turning a user's
//! CHECKPOINT into a checkpoint directory (never outside the store), and the checkpoint object
//! that every command prints.

use std::fs;
use std::path::{Component, Path, PathBuf};
use std::time::SystemTime;

use kybernate_checkpoint::{
    read_manifest, verify_quick, AtomicFile, Durability, Manifest, Store, StoreError, ToolInfo,
};
use kybernate_runtime_select::config::CONFIG_ENV;
use kybernate_runtime_select::{Config, ConfigSource};
use serde::Serialize;

use crate::error::CliError;

/// Opens the store named by the config (`--config`, `$KYBERNATE_CONFIG`, the default file).
/// The root is canonicalised when it exists, so ids and paths match what `resolve` returns.
pub fn open(config: Option<&Path>) -> Result<Store, CliError> {
    let root = load_config(config)?.checkpoint.root;
    let root = fs::canonicalize(&root).unwrap_or(root);
    Ok(Store::new(root))
}

/// The node config (`--config`, `$KYBERNATE_CONFIG`, the default file).
pub fn load_config(config: Option<&Path>) -> Result<Config, CliError> {
    let source = ConfigSource::resolve(config, std::env::var_os(CONFIG_ENV).as_deref());
    Ok(Config::load(&source)?)
}

/// Whether a checkpoint is usable as far as listing can tell (the manifest reads and its fields
/// validate, every file it lists is there with its size); `inspect` adds the checksums.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Ok,
    Broken,
}

/// One checkpoint as every command prints it. The JSON keys are stable (docs/cli.md); values the
/// manifest would give are null when it cannot be read.
#[derive(Debug, Clone, Serialize)]
pub struct Checkpoint {
    /// Path relative to the store root: `<namespace>/<container>/<timestamp>`.
    pub id: String,
    pub path: PathBuf,
    /// containerd namespace and container id, from the store layout.
    pub namespace: String,
    pub container: String,
    /// RFC 3339; from the manifest when it validates, else from the directory name.
    pub created: Option<String>,
    /// Bytes on disk under the directory.
    pub size_bytes: u64,
    pub gpu: Option<bool>,
    /// The manifest's GPU mode ("driver-api", "criu-plugin", "none"); null for CPU checkpoints.
    pub gpu_mode: Option<String>,
    pub pod_namespace: Option<String>,
    pub pod_name: Option<String>,
    pub container_name: Option<String>,
    pub image: Option<String>,
    pub runtime: Option<ToolInfo>,
    pub criu_version: Option<String>,
    pub status: Status,
    pub error: Option<String>,
    #[serde(skip)]
    pub time: Option<SystemTime>,
    #[serde(skip)]
    pub manifest: Option<Manifest>,
}

impl Checkpoint {
    /// Reads what listing needs about the checkpoint at `path` (`root/<ns>/<container>/<timestamp>`).
    pub fn load(root: &Path, path: &Path) -> Self {
        let parts: Vec<String> = path
            .strip_prefix(root)
            .unwrap_or(path)
            .components()
            .map(|c| c.as_os_str().to_string_lossy().into_owned())
            .collect();
        let part = |i: usize| parts.get(i).cloned().unwrap_or_default();
        let manifest = read_manifest(path).ok();
        let error = verify_quick(path).err().map(|e| e.to_string());
        let dir_time = parts.get(2).and_then(|name| kybernate_checkpoint::checkpoint_dir_time(name));
        // Only a manifest whose fields validate gives the time: a forged `created` (year 9999)
        // would otherwise sort first, and `prune --keep` would remove the real newest.
        let valid = manifest.as_ref().filter(|m| m.validate(SystemTime::now()).is_ok());
        let manifest_time = valid.and_then(|m| humantime::parse_rfc3339(&m.created).ok());
        let created = match valid {
            Some(m) => Some(m.created.clone()),
            None => dir_time.map(|t| humantime::format_rfc3339_seconds(t).to_string()),
        };
        let m = manifest.as_ref();
        Self {
            id: parts.join("/"),
            path: fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf()),
            namespace: part(0),
            container: part(1),
            created,
            size_bytes: kybernate_checkpoint::dir_size(path),
            gpu: m.map(|m| m.gpu.is_some()),
            gpu_mode: m.and_then(|m| m.gpu.as_ref()).map(|g| g.mode.as_str().to_string()),
            pod_namespace: m.and_then(|m| m.pod_namespace.clone()),
            pod_name: m.and_then(|m| m.pod_name.clone()),
            container_name: m.and_then(|m| m.container_name.clone()),
            image: m.and_then(|m| m.image.clone()),
            runtime: m.map(|m| m.runtime.clone()),
            criu_version: m.map(|m| m.criu.version.clone()),
            status: if error.is_some() { Status::Broken } else { Status::Ok },
            error,
            time: manifest_time.or(dir_time),
            manifest,
        }
    }

    /// Records the outcome of a full verification (inspect).
    pub fn set_verified(&mut self, error: Option<String>) {
        self.status = if error.is_some() { Status::Broken } else { Status::Ok };
        self.error = error;
    }
}

/// Every checkpoint in the store (broken ones too), optionally of one namespace and container,
/// newest first.
pub fn list(store: &Store, namespace: Option<&str>, container: Option<&str>) -> Result<Vec<Checkpoint>, CliError> {
    let found = store.list().map_err(CliError::Store)?;
    let mut out: Vec<Checkpoint> = found
        .into_iter()
        .map(|(path, _)| Checkpoint::load(store.root(), &path))
        .filter(|c| namespace.map_or(true, |ns| c.namespace == ns) && container.map_or(true, |id| c.container == id))
        .collect();
    sort_newest_first(&mut out);
    Ok(out)
}

/// Newest first; checkpoints without a known time last; ties by id, newest name first.
pub fn sort_newest_first(list: &mut [Checkpoint]) {
    list.sort_by(|a, b| b.time.cmp(&a.time).then_with(|| b.id.cmp(&a.id)));
}

/// Resolves a user's CHECKPOINT: an id (relative to the store root), an absolute path, or a path
/// relative to the working directory (tried when it is no id, or when it starts with `./` or `../`).
/// The result must be a committed checkpoint directory strictly inside the store (the library's
/// [`Store::resolve`] rules: never a hidden work directory).
pub fn resolve(store: &Store, reference: &str) -> Result<Checkpoint, CliError> {
    let not_found = || CliError::NotFound { reference: reference.into(), root: store.root().to_path_buf() };
    if reference.is_empty() || !store.root().is_dir() {
        return Err(not_found());
    }
    let as_path = Path::new(reference);
    let cwd_first = matches!(as_path.components().next(), Some(Component::CurDir | Component::ParentDir));
    let resolved = if cwd_first {
        resolve_cwd_path(store, reference)?
    } else {
        match store.resolve(reference) {
            Ok(p) => p,
            Err(StoreError::NotFound { .. }) if as_path.is_relative() && fs::symlink_metadata(as_path).is_ok() => {
                resolve_cwd_path(store, reference)?
            }
            Err(e) => return Err(store_error(store, e)),
        }
    };
    let root = fs::canonicalize(store.root()).map_err(|source| {
        CliError::Store(StoreError::Io {
            context: format!("{}: cannot resolve checkpoint store", store.root().display()),
            source,
        })
    })?;
    Ok(Checkpoint::load(&root, &resolved))
}

/// A path relative to the working directory: canonicalised first, then held to the store's rules.
fn resolve_cwd_path(store: &Store, reference: &str) -> Result<PathBuf, CliError> {
    let abs = match fs::canonicalize(reference) {
        Ok(p) => p,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(CliError::NotFound { reference: reference.into(), root: store.root().to_path_buf() })
        }
        Err(source) => {
            return Err(CliError::Store(StoreError::Io { context: format!("checkpoint {reference:?}"), source }))
        }
    };
    let Some(abs_str) = abs.to_str() else {
        return Err(CliError::Usage(format!(
            "{}: path is not UTF-8; name the checkpoint by its id from `kybernate list`",
            abs.display()
        )));
    };
    store.resolve(abs_str).map_err(|e| match e {
        // Report what the user typed, not the canonical path we built from it.
        StoreError::NotFound { .. } => {
            CliError::NotFound { reference: reference.into(), root: store.root().to_path_buf() }
        }
        StoreError::OutsideRoot { resolved, root, .. } => {
            CliError::OutsideStore(StoreError::OutsideRoot { reference: reference.into(), resolved, root })
        }
        StoreError::Hidden { resolved, hidden, .. } => {
            store_error(store, StoreError::Hidden { reference: reference.into(), resolved, hidden })
        }
        StoreError::NotACheckpoint { resolved, why, .. } => {
            CliError::NotACheckpoint { reference: reference.into(), path: resolved, why }
        }
        e => store_error(store, e),
    })
}

fn store_error(store: &Store, e: StoreError) -> CliError {
    match e {
        StoreError::NotFound { reference } => CliError::NotFound { reference, root: store.root().to_path_buf() },
        e @ StoreError::OutsideRoot { .. } => CliError::OutsideStore(e),
        // The library's message says what the directory is; a usage error (exit 2) like any
        // other reference that names no checkpoint.
        e @ StoreError::Hidden { .. } => {
            CliError::Usage(format!("{e}; run `kybernate list` to see the committed checkpoints"))
        }
        StoreError::NotACheckpoint { reference, resolved, why, .. } => {
            CliError::NotACheckpoint { reference, path: resolved, why }
        }
        StoreError::BadName { what, value } => {
            CliError::Usage(format!("invalid {what} {value:?}; run `kybernate list` to see the checkpoints"))
        }
        e => CliError::Store(e),
    }
}

/// Removes one checkpoint, then its container and namespace directories if that left them empty
/// (never the store root). The checkpoint is first renamed to a hidden sibling, so a failure
/// half-way never leaves something that looks like a checkpoint.
pub fn remove(store: &Store, checkpoint: &Checkpoint) -> Result<(), CliError> {
    let path = &checkpoint.path;
    let fail = |source| CliError::Remove { path: path.clone(), source };
    let (Some(parent), Some(name)) = (path.parent(), path.file_name()) else {
        return Err(CliError::NotACheckpoint {
            reference: checkpoint.id.clone(),
            path: path.clone(),
            why: "it has no parent directory",
        });
    };
    let nanos = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_nanos());
    let trash = parent.join(format!(".{}.removing-{}-{nanos}", name.to_string_lossy(), std::process::id()));
    fs::rename(path, &trash).map_err(fail)?;
    fs::remove_dir_all(&trash).map_err(|source| CliError::Remove { path: trash.clone(), source })?;
    let root = fs::canonicalize(store.root()).unwrap_or_else(|_| store.root().to_path_buf());
    for dir in path.ancestors().skip(1).take(2) {
        // remove_dir only removes empty directories: a failure means something else lives there.
        if dir == root || !dir.starts_with(&root) || fs::remove_dir(dir).is_err() {
            break;
        }
    }
    Ok(())
}

/// Records `image` in the manifest of the checkpoint at `dir` when the shim could not: it reads
/// the image from the CRI annotation, which a container made by `ctr run` or another containerd
/// client lacks, while containerd's container record has it whoever made the container. The
/// manifest is not covered by the checksums; its other fields (unknown ones included) are kept,
/// and it is replaced atomically (written beside the checkpoint directory, never inside it, so a
/// crash leaves no unlisted file in the checkpoint). Returns whether the manifest changed.
pub fn record_image(dir: &Path, image: &str) -> std::io::Result<bool> {
    use std::io::Write;
    let path = dir.join(kybernate_checkpoint::MANIFEST_FILE);
    let mut doc: serde_json::Value = serde_json::from_slice(&fs::read(&path)?).map_err(std::io::Error::other)?;
    let Some(fields) = doc.as_object_mut() else { return Ok(false) };
    if image.is_empty() || fields.get("image").and_then(serde_json::Value::as_str).is_some_and(|i| !i.is_empty()) {
        return Ok(false);
    }
    fields.insert("image".into(), image.into());
    let text = serde_json::to_vec_pretty(&doc).map_err(std::io::Error::other)?;
    let Some(parent) = dir.parent() else { return Ok(false) };
    let mut f = AtomicFile::create_in(parent, &path, 0o600, Durability::Machine)?;
    f.file().write_all(&text)?;
    f.commit().map(|()| true)
}
