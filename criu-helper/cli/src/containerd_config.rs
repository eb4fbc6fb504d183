//! `kybernate containerd-config`: registers Kybernate's runtime with containerd's CRI plugin (the
//! handler a Kubernetes RuntimeClass names) in containerd's config.toml, and removes it again.
//!
//! The admin's file is edited, never regenerated: toml_edit keeps comments, order, formatting and
//! every other runtime (runc, nvidia, ...) byte for byte. Version 2 configs (containerd 1.6/1.7)
//! keep runtimes under `plugins."io.containerd.grpc.v1.cri"`, version 3 (containerd 2.x) under
//! `plugins."io.containerd.cri.v1.runtime"`; version 1 is refused. Imports are not followed: in
//! containerd 1.6 an imported file that sets the CRI plugin replaces this file's whole CRI section
//! (measured with 1.6.20), which is why the runtime is merged here rather than dropped in.
//!
//! Before a change the file is copied to `<name>.kybernate-backup-<UTC time>` and the new text
//! replaces it atomically (temp file, fsync, rename), keeping its mode and owner. Running the same
//! install twice changes nothing and leaves no second backup.

use std::ffi::OsStr;
use std::fs::{self, Metadata, OpenOptions, Permissions};
use std::io::{self, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::SystemTime;

use clap::{Subcommand, ValueEnum};
use kybernate_checkpoint::{AtomicFile, Durability};
use kybernate_runtime_select::config::DEFAULT_CONFIG_PATH;
use serde::Serialize;
use toml_edit::{Array, DocumentMut, Item, Key, Table, TableLike, Value};

use crate::error::CliError;
use crate::output;
use crate::output::Output;

/// containerd's default config file.
pub const DEFAULT_CONTAINERD_CONFIG: &str = "/etc/containerd/config.toml";
/// Our runtime type: containerd runs `containerd-shim-kybernate-v1` from its PATH for it.
pub const RUNTIME_TYPE: &str = "io.containerd.kybernate.v1";
/// The stock runc runtime type (also ours in the runtime-path style).
const RUNC_TYPE: &str = "io.containerd.runc.v2";
/// The shim's file name, how a runtime-path registration is recognised as ours.
const SHIM_NAME: &str = "containerd-shim-kybernate-v1";
/// Where the installer puts the shim; `--shim` for the runtime-path style.
pub const DEFAULT_SHIM: &str = "/usr/local/bin/containerd-shim-kybernate-v1";
/// The pod annotations CRI passes to our shim (runtime choice, restore-from-checkpoint, ...).
pub const POD_ANNOTATIONS: &str = "kybernate.io/*";
/// The default RuntimeClass handler (packaging/kubernetes/runtimeclass.yaml).
pub const DEFAULT_HANDLER: &str = "kybernate";

/// Long help examples of `kybernate containerd-config`.
pub const EXAMPLES: &str = "\
Examples:
  kybernate containerd-config install --containerd-config /etc/containerd/config.toml
  kybernate containerd-config install --style runtime-path --dry-run
  kybernate containerd-config install --handler kybernate-gpu --kybernate-config /etc/kybernate/gpu.toml
  kybernate containerd-config uninstall --containerd-config /etc/containerd/config.toml
  kybernate -o json containerd-config install

A version 2 config (containerd 1.6/1.7) gets plugins.\"io.containerd.grpc.v1.cri\".containerd.runtimes.<handler>,
a version 3 config (containerd 2.x) plugins.\"io.containerd.cri.v1.runtime\".containerd.runtimes.<handler>.
Everything else in the file stays as it was. A changed file is first copied to
<file>.kybernate-backup-<UTC time>. Restart containerd to apply (running containers keep running).";

/// `kybernate containerd-config ...`
#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(subcommand)]
    pub action: Action,
}

/// `--containerd-config`: containerd's config file (named like `kybernate doctor`'s; the CLI's
/// global `--config` is the Kybernate config).
#[derive(Debug, clap::Args)]
pub struct ContainerdConfigArg {
    /// containerd's config file (created with `version = 2` when missing).
    #[arg(id = "containerd_config", long = "containerd-config", value_name = "PATH", default_value = DEFAULT_CONTAINERD_CONFIG)]
    pub path: PathBuf,
}

#[derive(Debug, Subcommand)]
pub enum Action {
    /// Add Kybernate's runtime to containerd's config (or bring it up to date); keep everything else.
    #[command(after_long_help = "\
Styles:
  runtime-type  runtime_type = \"io.containerd.kybernate.v1\"; CRI passes options.ConfigPath (--kybernate-config).
  runtime-path  runtime_type = \"io.containerd.runc.v2\", runtime_path = --shim; CRI passes runc's options
                (SystemdCgroup is copied from the runc runtime when it sets one). Needs containerd >= 1.7:
                containerd 1.6 ignores runtime_path and runs the stock runc shim.

When no runtime named by default_runtime_name (default \"runc\") is defined, the stock runc runtime is
added too: the CRI plugin refuses to load without it. Exit 0 also when it was already installed.")]
    Install(InstallArgs),
    /// Remove Kybernate's runtime from containerd's config, and nothing else.
    Uninstall(UninstallArgs),
}

#[derive(Debug, clap::Args)]
pub struct InstallArgs {
    #[command(flatten)]
    pub config: ContainerdConfigArg,
    /// How the runtime is registered (see below).
    #[arg(long, value_enum, default_value_t = Style::RuntimeType)]
    pub style: Style,
    /// The runtime's name: what a RuntimeClass's `handler` names.
    #[arg(long, value_name = "NAME", default_value = DEFAULT_HANDLER, value_parser = parse_handler)]
    pub handler: String,
    /// runtime_path with --style runtime-path: the shim binary as containerd sees it
    /// [default: /usr/local/bin/containerd-shim-kybernate-v1; the Debian package's is in /usr/bin].
    #[arg(long, value_name = "PATH", value_parser = parse_absolute)]
    pub shim: Option<String>,
    /// The Kybernate config the shim reads (options.ConfigPath, runtime-type style only).
    #[arg(long, value_name = "PATH", default_value = DEFAULT_CONFIG_PATH, value_parser = parse_absolute)]
    pub kybernate_config: String,
    /// Where the backup goes [default: next to the config file].
    #[arg(long, value_name = "DIR")]
    pub backup_dir: Option<PathBuf>,
    /// Show what would change; write nothing.
    #[arg(long)]
    pub dry_run: bool,
}

#[derive(Debug, clap::Args)]
pub struct UninstallArgs {
    #[command(flatten)]
    pub config: ContainerdConfigArg,
    /// The runtime's name, as given to install.
    #[arg(long, value_name = "NAME", default_value = DEFAULT_HANDLER, value_parser = parse_handler)]
    pub handler: String,
    /// Where the backup goes [default: next to the config file].
    #[arg(long, value_name = "DIR")]
    pub backup_dir: Option<PathBuf>,
    /// Show what would change; write nothing.
    #[arg(long)]
    pub dry_run: bool,
}

/// How CRI learns about our shim (docs/installation.md compares them).
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Style {
    /// Our own runtime type; CRI sends runtimeoptions (ConfigPath).
    RuntimeType,
    /// A runc runtime whose shim binary is ours; CRI sends runc's options.
    RuntimePath,
}

impl Style {
    fn as_str(self) -> &'static str {
        match self {
            Style::RuntimeType => "runtime-type",
            Style::RuntimePath => "runtime-path",
        }
    }

    fn runtime_type(self) -> &'static str {
        match self {
            Style::RuntimeType => RUNTIME_TYPE,
            Style::RuntimePath => RUNC_TYPE,
        }
    }
}

/// A RuntimeClass handler must be a DNS label (RFC 1123); `runc` is containerd's own runtime.
fn parse_handler(s: &str) -> Result<String, String> {
    let label = !s.is_empty()
        && s.len() <= 63
        && s.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-');
    if !label {
        return Err("must be a lowercase DNS label (a-z, 0-9, '-'; at most 63), like a RuntimeClass handler".into());
    }
    if s == "runc" {
        return Err("`runc` is containerd's stock runtime; choose another name".into());
    }
    Ok(s.to_string())
}

/// containerd resolves relative paths against its own working directory: only absolute ones are meant.
fn parse_absolute(s: &str) -> Result<String, String> {
    if Path::new(s).is_absolute() {
        Ok(s.to_string())
    } else {
        Err("must be an absolute path (as containerd sees it)".into())
    }
}

/// containerd config versions this tool edits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Version {
    /// containerd 1.6/1.7 (and 2.x, which migrates it on load).
    V2,
    /// containerd 2.x.
    V3,
}

impl Version {
    fn number(self) -> i64 {
        match self {
            Version::V2 => 2,
            Version::V3 => 3,
        }
    }

    /// The plugin whose `containerd.runtimes` CRI reads.
    fn cri_plugin(self) -> &'static str {
        match self {
            Version::V2 => "io.containerd.grpc.v1.cri",
            Version::V3 => "io.containerd.cri.v1.runtime",
        }
    }

    fn runtimes_path(self) -> [&'static str; 4] {
        ["plugins", self.cri_plugin(), "containerd", "runtimes"]
    }
}

/// What is wrong with a config file's content. Each leaves the file untouched (exit 2).
#[derive(Debug, thiserror::Error)]
pub enum EditError {
    #[error("not valid TOML at line {line}, column {column}: {message}")]
    Parse { line: usize, column: usize, message: String },
    #[error("not UTF-8 text, so not a TOML file")]
    NotText,
    #[error("no `version = 2` or `3`, so containerd reads it as config version 1, deprecated in containerd 1.x and removed in 2.0; add `version = 2` and rename its plugin sections (containerd's docs/PLUGINS.md), or start from `containerd config default`")]
    Version1,
    #[error("`version = {0}` is not a containerd config version this tool edits (2: containerd 1.6/1.7, 3: containerd 2.x); add the runtime by hand from /usr/share/kybernate/containerd/")]
    UnsupportedVersion(String),
    #[error("`{0}` is not a [table] section (an inline table or a value); add the runtime by hand from /usr/share/kybernate/containerd/")]
    NotATable(String),
    #[error("runtime `{handler}` is already defined and is not Kybernate's (runtime_type {runtime_type:?}); choose another --handler or remove that runtime first")]
    NotOurs { handler: String, runtime_type: String },
    #[error("runtime `{0}` is containerd's default_runtime_name; set default_runtime_name to another runtime first, or the CRI plugin will not load")]
    IsDefault(String),
}

/// A containerd-config failure: the content (exit 2) or the file system (exit 1).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{}: {source}; the file was not changed", path.display())]
    Edit {
        path: PathBuf,
        #[source]
        source: EditError,
    },
    #[error("{}: cannot {action}: {source}; check the path, its permissions and free space", path.display())]
    Io {
        path: PathBuf,
        action: &'static str,
        #[source]
        source: io::Error,
    },
}

impl From<Error> for CliError {
    fn from(e: Error) -> Self {
        match e {
            Error::Edit { .. } => CliError::Usage(e.to_string()),
            Error::Io { .. } => CliError::Failed(e.to_string()),
        }
    }
}

fn io_error<'a>(path: &'a Path, action: &'static str) -> impl FnOnce(io::Error) -> Error + 'a {
    move |source| Error::Io { path: path.to_path_buf(), action, source }
}

fn edit_error(path: &Path) -> impl FnOnce(EditError) -> Error + '_ {
    move |source| Error::Edit { path: path.to_path_buf(), source }
}

/// What install or uninstall found or did to our runtime.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    Installed,
    Updated,
    AlreadyInstalled,
    Removed,
    NotInstalled,
}

impl Status {
    fn describe(self, dry_run: bool) -> &'static str {
        match (self, dry_run) {
            (Status::Installed, false) => "installed",
            (Status::Installed, true) => "would install",
            (Status::Updated, false) => "updated",
            (Status::Updated, true) => "would update",
            (Status::AlreadyInstalled, _) => "already installed",
            (Status::Removed, false) => "removed",
            (Status::Removed, true) => "would remove",
            (Status::NotInstalled, _) => "not installed",
        }
    }
}

/// The runtime install should leave in the file.
#[derive(Debug, Clone)]
pub struct Wanted {
    pub handler: String,
    pub style: Style,
    /// runtime_path, when set.
    pub runtime_path: Option<String>,
    /// options.ConfigPath (runtime-type style).
    pub config_path: String,
}

impl Wanted {
    /// With our own runtime type containerd finds the shim on its PATH: `--shim` belongs to the
    /// runtime-path style only.
    fn from_args(a: &InstallArgs) -> Result<Self, CliError> {
        let runtime_path = match (a.style, &a.shim) {
            (Style::RuntimePath, shim) => Some(shim.clone().unwrap_or_else(|| DEFAULT_SHIM.to_string())),
            (Style::RuntimeType, None) => None,
            (Style::RuntimeType, Some(_)) => {
                return Err(CliError::Usage(
                    "--shim applies to --style runtime-path; with runtime-type containerd finds containerd-shim-kybernate-v1 on its PATH".into(),
                ))
            }
        };
        Ok(Self { handler: a.handler.clone(), style: a.style, runtime_path, config_path: a.kybernate_config.clone() })
    }
}

/// The result of one edit of the document: the status, each change made, and what the admin
/// should know.
#[derive(Debug, Clone)]
pub struct Edit {
    pub status: Status,
    pub changes: Vec<String>,
    pub notes: Vec<String>,
}

/// Parses config text; errors name the line and column.
pub fn parse(text: &str) -> Result<DocumentMut, EditError> {
    text.parse::<DocumentMut>().map_err(|e| {
        let at = e.span().map(|s| s.start).unwrap_or(0).min(text.len());
        let before = &text[..floor_char_boundary(text, at)];
        let line = before.matches('\n').count() + 1;
        let column = before.rsplit('\n').next().map(|l| l.chars().count()).unwrap_or(0) + 1;
        let message = e.message().trim().replace('\n', "; ");
        EditError::Parse { line, column, message }
    })
}

fn floor_char_boundary(text: &str, mut at: usize) -> usize {
    while at > 0 && !text.is_char_boundary(at) {
        at -= 1;
    }
    at
}

/// The config's version; only 2 and 3 are edited.
pub fn detect_version(doc: &DocumentMut) -> Result<Version, EditError> {
    let Some(item) = doc.get("version") else { return Err(EditError::Version1) };
    match item.as_integer() {
        Some(1) => Err(EditError::Version1),
        Some(2) => Ok(Version::V2),
        Some(3) => Ok(Version::V3),
        _ => Err(EditError::UnsupportedVersion(item.to_string().trim().to_string())),
    }
}

/// `plugins."io.containerd.grpc.v1.cri".containerd.runtimes` as TOML writes it.
fn dotted(path: &[&str]) -> String {
    path.iter().map(|k| Key::new(*k).display_repr().into_owned()).collect::<Vec<_>>().join(".")
}

/// The [table] at `path`, created where missing (implicit: no empty headers are written).
fn table_at<'a>(root: &'a mut Table, path: &[&str]) -> Result<&'a mut Table, EditError> {
    let mut table = root;
    for (i, key) in path.iter().enumerate() {
        table = table
            .entry(key)
            .or_insert_with(|| {
                let mut t = Table::new();
                t.set_implicit(true);
                Item::Table(t)
            })
            .as_table_mut()
            .ok_or_else(|| EditError::NotATable(dotted(&path[..=i])))?;
    }
    Ok(table)
}

/// The table (standard or inline) at `path`, if every step exists.
fn lookup_mut<'a>(root: &'a mut Table, path: &[&str]) -> Option<&'a mut dyn TableLike> {
    let mut table: &mut dyn TableLike = root;
    for key in path {
        table = table.get_mut(key)?.as_table_like_mut()?;
    }
    Some(table)
}

fn lookup<'a>(root: &'a Table, path: &[&str]) -> Option<&'a dyn TableLike> {
    let mut table: &dyn TableLike = root;
    for key in path {
        table = table.get(key)?.as_table_like()?;
    }
    Some(table)
}

fn str_of<'a>(t: &'a dyn TableLike, key: &str) -> Option<&'a str> {
    t.get(key).and_then(Item::as_str)
}

/// A runtime is ours when it has our type, or runs our shim binary (runtime-path style).
fn is_ours(t: &dyn TableLike) -> bool {
    str_of(t, "runtime_type") == Some(RUNTIME_TYPE)
        || str_of(t, "runtime_path").is_some_and(|p| Path::new(p).file_name() == Some(OsStr::new(SHIM_NAME)))
}

/// Indentation of the runtimes around ours, so that an indented file (containerd's default
/// config, nvidia-ctk's output) stays consistently indented: the header's, and one step more
/// for each level below it.
#[derive(Debug, Clone, Default)]
struct Indent {
    header: String,
    step: String,
}

impl Indent {
    fn of_siblings(runtimes: &Table) -> Self {
        let sibling = runtimes.iter().find_map(|(_, item)| item.as_table().filter(|t| !t.is_empty()));
        let Some(t) = sibling else { return Self::default() };
        let header = last_line(t.decor().prefix().and_then(|p| p.as_str()));
        let key = t
            .iter()
            .next()
            .and_then(|(k, _)| t.key(k))
            .map(|k| last_line(k.leaf_decor().prefix().and_then(|p| p.as_str())));
        let step = match key {
            Some(key) if key.starts_with(&header) => key[header.len()..].to_string(),
            _ => String::new(),
        };
        Self { header, step }
    }

    fn level(&self, n: usize) -> String {
        format!("{}{}", self.header, self.step.repeat(n))
    }
}

/// The whitespace after the last newline of a decor prefix (comments above stay theirs).
fn last_line(prefix: Option<&str>) -> String {
    let p = prefix.unwrap_or("");
    let tail = p.rsplit('\n').next().unwrap_or("");
    if tail.chars().all(|c| c == ' ' || c == '\t') {
        tail.to_string()
    } else {
        String::new()
    }
}

/// A new key = value at the end of `t`, indented like `indent`.
fn push_value(t: &mut Table, key: &str, value: impl Into<Value>, indent: &str) {
    let mut k = Key::new(key);
    k.leaf_decor_mut().set_prefix(indent.to_string());
    t.insert_formatted(&k, Item::Value(value.into()));
}

/// Sets `key` in an existing table: the value is replaced, the line keeps its place and comments.
fn set_value(t: &mut dyn TableLike, key: &str, value: impl Into<Value>, indent: &str) {
    let mut value = value.into();
    if let Some(Item::Value(old)) = t.get_mut(key) {
        *value.decor_mut() = old.decor().clone();
        *old = value;
        return;
    }
    t.insert(key, Item::Value(value));
    if let Some(mut k) = t.key_mut(key) {
        k.leaf_decor_mut().set_prefix(indent.to_string());
    }
}

fn annotations() -> Array {
    Array::from_iter([POD_ANNOTATIONS])
}

/// The runtime options install sets: ConfigPath for our type; for a runc-type registration the
/// runc runtime's SystemdCgroup (every runtime must follow kubelet's cgroup driver).
fn wanted_options(want: &Wanted, runc_systemd: Option<bool>) -> Vec<(&'static str, Value)> {
    match want.style {
        Style::RuntimeType => vec![("ConfigPath", Value::from(want.config_path.as_str()))],
        Style::RuntimePath => runc_systemd.map(|b| ("SystemdCgroup", Value::from(b))).into_iter().collect(),
    }
}

/// Our runtime's table as a fresh install writes it.
fn runtime_table(want: &Wanted, runc_systemd: Option<bool>, indent: &Indent) -> Table {
    let mut t = Table::new();
    t.decor_mut().set_prefix(format!("\n{}", indent.level(0)));
    push_value(&mut t, "runtime_type", want.style.runtime_type(), &indent.level(1));
    if let Some(path) = &want.runtime_path {
        push_value(&mut t, "runtime_path", path.as_str(), &indent.level(1));
    }
    push_value(&mut t, "pod_annotations", annotations(), &indent.level(1));
    let options = wanted_options(want, runc_systemd);
    if !options.is_empty() {
        let mut o = Table::new();
        o.decor_mut().set_prefix(format!("\n{}", indent.level(1)));
        for (key, value) in options {
            push_value(&mut o, key, value, &indent.level(2));
        }
        t.insert("options", Item::Table(o));
    }
    t
}

/// containerd's stock runc runtime (what its built-in default defines).
fn stock_runc(indent: &Indent) -> Table {
    let mut t = Table::new();
    t.decor_mut().set_prefix(format!("\n{}", indent.level(0)));
    push_value(&mut t, "runtime_type", RUNC_TYPE, &indent.level(1));
    t
}

fn describe_new(want: &Wanted, t: &Table) -> String {
    let mut parts = vec![format!("runtime_type = {:?}", want.style.runtime_type())];
    if let Some(p) = &want.runtime_path {
        parts.push(format!("runtime_path = {p:?}"));
    }
    parts.push(format!("pod_annotations = [{POD_ANNOTATIONS:?}]"));
    if let Some(o) = t.get("options").and_then(Item::as_table) {
        for (k, v) in o.iter() {
            parts.push(format!("options.{k} = {}", v.to_string().trim()));
        }
    }
    parts.join(", ")
}

/// Brings our runtime's existing table (same runtime_type) up to date, key by key: keys the
/// admin added to it stay.
fn update_in_place(
    t: &mut Table,
    want: &Wanted,
    runc_systemd: Option<bool>,
    indent: &Indent,
    changes: &mut Vec<String>,
) {
    let h = &want.handler;
    if let Some(path) = &want.runtime_path {
        if str_of(t, "runtime_path") != Some(path.as_str()) {
            set_value(t, "runtime_path", path.as_str(), &indent.level(1));
            changes.push(format!("runtime {h}: set runtime_path = {path:?}"));
        }
    }
    let has_pattern =
        |item: &Item| item.as_array().is_some_and(|a| a.iter().any(|v| v.as_str() == Some(POD_ANNOTATIONS)));
    match t.get_mut("pod_annotations") {
        Some(item) if has_pattern(item) => {}
        Some(item) if item.as_array().is_some() => {
            if let Some(a) = item.as_array_mut() {
                a.push(POD_ANNOTATIONS);
            }
            changes.push(format!("runtime {h}: added {POD_ANNOTATIONS:?} to pod_annotations"));
        }
        _ => {
            set_value(t, "pod_annotations", annotations(), &indent.level(1));
            changes.push(format!("runtime {h}: set pod_annotations = [{POD_ANNOTATIONS:?}]"));
        }
    }
    let options = wanted_options(want, runc_systemd);
    if options.is_empty() {
        return;
    }
    if !t.get("options").is_some_and(|o| o.is_table_like()) {
        let mut o = Table::new();
        o.decor_mut().set_prefix(format!("\n{}", indent.level(1)));
        t.insert("options", Item::Table(o));
    }
    let Some(o) = t.get_mut("options").and_then(Item::as_table_like_mut) else { return };
    for (key, value) in options {
        let same = match (o.get(key).and_then(Item::as_value), &value) {
            (Some(Value::String(a)), Value::String(b)) => a.value() == b.value(),
            (Some(Value::Boolean(a)), Value::Boolean(b)) => a.value() == b.value(),
            _ => false,
        };
        if !same {
            let shown = value.to_string().trim().to_string();
            set_value(o, key, value, &indent.level(2));
            changes.push(format!("runtime {h}: set options.{key} = {shown}"));
        }
    }
}

/// Adds (or updates) our runtime in `doc`. Everything outside our runtime's table stays, except
/// that the stock runc runtime is added when the default runtime would otherwise be missing.
pub fn install(doc: &mut DocumentMut, version: Version, want: &Wanted) -> Result<Edit, EditError> {
    let runtimes_path = version.runtimes_path();
    let (default_name, legacy_default) = {
        let containerd = table_at(doc.as_table_mut(), &runtimes_path[..3])?;
        let name = str_of(containerd, "default_runtime_name").unwrap_or("runc").to_string();
        // containerd 1.x still turns a non-empty `containerd.default_runtime` into runtime "default".
        let legacy = containerd
            .get("default_runtime")
            .and_then(|d| d.get("runtime_type"))
            .and_then(Item::as_str)
            .is_some_and(|s| !s.is_empty());
        (name, legacy)
    };
    let runtimes = table_at(doc.as_table_mut(), &runtimes_path)?;
    let indent = Indent::of_siblings(runtimes);
    let runc_systemd = runtimes
        .get("runc")
        .and_then(|r| r.get("options"))
        .and_then(|o| o.get("SystemdCgroup"))
        .and_then(Item::as_bool);
    let mut changes = Vec::new();
    let mut notes = Vec::new();
    let h = want.handler.as_str();

    // Refuse before touching anything: a runtime of that name that is not ours stays as it is.
    if let Some(item) = runtimes.get(h) {
        let Some(t) = item.as_table() else {
            return Err(EditError::NotATable(dotted(&[&runtimes_path[..], &[h]].concat())));
        };
        if !is_ours(t) {
            let runtime_type = str_of(t, "runtime_type").unwrap_or("").to_string();
            return Err(EditError::NotOurs { handler: h.to_string(), runtime_type });
        }
    }
    if !legacy_default && default_name == "runc" && !runtimes.contains_key("runc") {
        runtimes.insert("runc", Item::Table(stock_runc(&indent)));
        changes.push(format!("added runtime runc: runtime_type = {RUNC_TYPE:?}"));
        notes.push("added containerd's stock runc runtime: default_runtime_name is \"runc\", and once any runtime is defined the CRI plugin does not load without it".into());
    }

    let status = match runtimes.get_mut(h) {
        None => {
            let t = runtime_table(want, runc_systemd, &indent);
            changes.push(format!("added runtime {h}: {}", describe_new(want, &t)));
            runtimes.insert(h, Item::Table(t));
            Status::Installed
        }
        Some(item) => {
            let Some(t) = item.as_table_mut() else {
                return Err(EditError::NotATable(dotted(&[&runtimes_path[..], &[h]].concat())));
            };
            let before = changes.len();
            if str_of(t, "runtime_type") != Some(want.style.runtime_type()) {
                let old = str_of(t, "runtime_type").unwrap_or("").to_string();
                let mut fresh = runtime_table(want, runc_systemd, &indent);
                *fresh.decor_mut() = t.decor().clone();
                fresh.set_position(t.position());
                changes.push(format!(
                    "replaced runtime {h} (runtime_type {old:?} -> {:?}): {}",
                    want.style.runtime_type(),
                    describe_new(want, &fresh)
                ));
                *t = fresh;
            } else {
                update_in_place(t, want, runc_systemd, &indent, &mut changes);
            }
            if changes.len() == before {
                Status::AlreadyInstalled
            } else {
                Status::Updated
            }
        }
    };

    if is_placeholder(&default_name) {
        notes.push(format!(
            "default_runtime_name is the placeholder {default_name:?}, filled in when this template is rendered (MicroK8s's containerd-template.toml): it must become a runtime defined here"
        ));
    } else if !legacy_default && default_name != "runc" && !runtimes.contains_key(&default_name) {
        notes.push(format!(
            "default_runtime_name is {default_name:?} but no such runtime is defined: the CRI plugin will not load until it is"
        ));
    }
    if want.style == Style::RuntimePath && runc_systemd.is_none() {
        notes.push("the runc runtime sets no SystemdCgroup, so neither does ours; if kubelet uses the systemd cgroup driver, set options.SystemdCgroup = true on both".into());
    }
    Ok(Edit { status, changes, notes })
}

/// A `${NAME}` placeholder, as in MicroK8s's containerd-template.toml (`default_runtime_name =
/// "${RUNTIME}"`), which MicroK8s replaces when it renders the file for containerd: no runtime name.
fn is_placeholder(value: &str) -> bool {
    value.find("${").is_some_and(|start| value[start..].contains('}'))
}

/// Removes our runtime's table from `doc`, and nothing else.
pub fn uninstall(doc: &mut DocumentMut, version: Version, handler: &str) -> Result<Edit, EditError> {
    let runtimes_path = version.runtimes_path();
    let not_installed = || Edit { status: Status::NotInstalled, changes: Vec::new(), notes: Vec::new() };
    let default_name = lookup(doc.as_table(), &runtimes_path[..3])
        .and_then(|c| str_of(c, "default_runtime_name"))
        .unwrap_or("runc")
        .to_string();
    let Some(runtimes) = lookup_mut(doc.as_table_mut(), &runtimes_path) else { return Ok(not_installed()) };
    let Some(item) = runtimes.get(handler) else { return Ok(not_installed()) };
    let Some(t) = item.as_table_like() else {
        return Err(EditError::NotATable(dotted(&[&runtimes_path[..], &[handler]].concat())));
    };
    if !is_ours(t) {
        let runtime_type = str_of(t, "runtime_type").unwrap_or("").to_string();
        return Err(EditError::NotOurs { handler: handler.to_string(), runtime_type });
    }
    if default_name == handler {
        return Err(EditError::IsDefault(handler.to_string()));
    }
    runtimes.remove(handler);
    Ok(Edit {
        status: Status::Removed,
        changes: vec![format!("removed runtime {handler}")],
        notes: vec![format!(
            "pods whose RuntimeClass names handler {handler:?} no longer start on this node once containerd restarts"
        )],
    })
}

/// Our runtime's table alone, formatted plainly, for the report.
fn snippet(doc: &DocumentMut, version: Version, handler: &str) -> Option<String> {
    let path = version.runtimes_path();
    let mut t = lookup(doc.as_table(), &path)?.get(handler)?.as_table()?.clone();
    t.decor_mut().set_prefix("");
    t.fmt();
    for (_, item) in t.iter_mut() {
        if let Some(sub) = item.as_table_mut() {
            sub.decor_mut().set_prefix("\n");
            sub.fmt();
        }
    }
    let mut out = DocumentMut::new();
    table_at(out.as_table_mut(), &path).ok()?.insert(handler, Item::Table(t));
    Some(out.to_string())
}

/// A config for a node that has none: containerd then ran on its built-in defaults, and a file
/// holding only these lines keeps every other default.
fn new_config() -> DocumentMut {
    let mut doc = DocumentMut::new();
    doc.insert("version", toml_edit::value(2));
    doc.decor_mut().set_prefix(
        "# containerd config written by `kybernate containerd-config install`: there was no config file,\n\
         # so containerd ran on its built-in defaults (`containerd config default` prints them). Settings\n\
         # missing here keep those defaults. Defining any runtime replaces the built-in runtime list,\n\
         # so the stock runc runtime is defined here too.\n",
    );
    doc
}

/// What `containerd-config` prints (JSON keys are stable).
#[derive(Debug, Serialize)]
pub struct Report {
    pub action: &'static str,
    pub config: PathBuf,
    pub config_version: Option<i64>,
    pub handler: String,
    pub table: Option<String>,
    pub style: Option<Style>,
    pub status: Status,
    /// The file differs (or would differ, with --dry-run) from what it was.
    pub changed: bool,
    /// The file was written.
    pub written: bool,
    pub dry_run: bool,
    /// There was no config file; install created one.
    pub created: bool,
    pub backup: Option<PathBuf>,
    pub changes: Vec<String>,
    pub notes: Vec<String>,
    /// Our runtime's table as the file has it afterwards (install).
    pub snippet: Option<String>,
}

impl Report {
    fn table_text(&self) -> String {
        let mut rows: Vec<(&str, String)> = Vec::new();
        let version = self.config_version.map(|v| format!(" (version {v})")).unwrap_or_default();
        let created = if self.created && self.written { ", created" } else { "" };
        rows.push(("containerd config", format!("{}{version}{created}", self.config.display())));
        rows.push(("runtime", self.handler.clone()));
        if let Some(t) = &self.table {
            rows.push(("table", t.clone()));
        }
        if let Some(s) = self.style {
            rows.push(("style", s.as_str().to_string()));
        }
        let mut result = self.status.describe(self.dry_run).to_string();
        if self.dry_run && self.changed {
            result.push_str(" (dry run: nothing written)");
        }
        rows.push(("result", result));
        if let Some(b) = &self.backup {
            rows.push(("backup", b.display().to_string()));
        }
        let width = rows.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
        let mut text = String::new();
        for (k, v) in rows {
            text.push_str(&format!("{k:<width$}   {v}\n"));
        }
        if !self.changes.is_empty() {
            text.push_str("changes:\n");
            for c in &self.changes {
                text.push_str(&format!("  {c}\n"));
            }
        }
        for n in &self.notes {
            text.push_str(&format!("note: {n}\n"));
        }
        if let (true, Some(s)) = (self.dry_run, &self.snippet) {
            text.push_str("runtime table after install:\n");
            text.push_str(s);
        }
        text
    }
}

/// Runs `kybernate containerd-config`.
pub fn run(out: Output, args: &Args) -> Result<ExitCode, CliError> {
    let report = match &args.action {
        Action::Install(a) => install_file(&a.config.path, &Wanted::from_args(a)?, a)?,
        Action::Uninstall(a) => uninstall_file(&a.config.path, a)?,
    };
    match out {
        Output::Json => output::json(&report)?,
        Output::Table => output::write(&report.table_text())?,
    }
    Ok(ExitCode::SUCCESS)
}

/// The file to read and replace: a symlinked config is edited where it points, so the link stays.
fn target(config: &Path) -> Result<PathBuf, Error> {
    match fs::symlink_metadata(config) {
        Ok(m) if m.file_type().is_symlink() => fs::canonicalize(config).map_err(io_error(config, "follow the symlink")),
        _ => Ok(config.to_path_buf()),
    }
}

/// The file's text and metadata; None when it does not exist.
fn read(path: &Path) -> Result<Option<(String, Metadata)>, Error> {
    let bytes = match fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io_error(path, "read it")(e)),
    };
    let meta = fs::metadata(path).map_err(io_error(path, "read its metadata"))?;
    let text = String::from_utf8(bytes).map_err(|_| edit_error(path)(EditError::NotText))?;
    Ok(Some((text, meta)))
}

fn install_file(config: &Path, want: &Wanted, a: &InstallArgs) -> Result<Report, Error> {
    let path = target(config)?;
    let current = read(&path)?;
    let mut doc = match &current {
        Some((text, _)) => parse(text).map_err(edit_error(&path))?,
        None => new_config(),
    };
    let version = detect_version(&doc).map_err(edit_error(&path))?;
    let mut edit = install(&mut doc, version, want).map_err(edit_error(&path))?;
    if current.is_none() {
        edit.notes.push("there was no config file, so containerd ran on its built-in defaults; the new file sets `version = 2` and the runtimes, every other setting keeps its default".into());
    }
    if doc.get("imports").and_then(Item::as_array).is_some_and(|a| !a.is_empty()) {
        edit.notes.push("this config imports other files, which were not read: in containerd 1.x an imported file that sets the CRI plugin replaces this file's whole CRI section, our runtime included".into());
    }
    let written = write_if_changed(&path, current.as_ref(), &doc, &edit, a.backup_dir.as_deref(), a.dry_run)?;
    if written.is_some() {
        edit.notes
            .push("restart containerd to apply (systemctl restart containerd); running containers keep running".into());
    }
    Ok(Report {
        action: "install",
        config: path.clone(),
        config_version: Some(version.number()),
        handler: want.handler.clone(),
        table: Some(dotted(&[&version.runtimes_path()[..], &[want.handler.as_str()]].concat())),
        style: Some(want.style),
        status: edit.status,
        changed: !edit.changes.is_empty(),
        written: written.is_some(),
        dry_run: a.dry_run,
        created: current.is_none(),
        backup: written.flatten(),
        changes: edit.changes,
        notes: edit.notes,
        snippet: snippet(&doc, version, &want.handler),
    })
}

fn uninstall_file(config: &Path, a: &UninstallArgs) -> Result<Report, Error> {
    let path = target(config)?;
    let mut report = Report {
        action: "uninstall",
        config: path.clone(),
        config_version: None,
        handler: a.handler.clone(),
        table: None,
        style: None,
        status: Status::NotInstalled,
        changed: false,
        written: false,
        dry_run: a.dry_run,
        created: false,
        backup: None,
        changes: Vec::new(),
        notes: Vec::new(),
        snippet: None,
    };
    let Some((text, meta)) = read(&path)? else {
        report.notes.push("there is no config file".into());
        return Ok(report);
    };
    let mut doc = parse(&text).map_err(edit_error(&path))?;
    let version = detect_version(&doc).map_err(edit_error(&path))?;
    let edit = uninstall(&mut doc, version, &a.handler).map_err(edit_error(&path))?;
    let current = Some((text, meta));
    let written = write_if_changed(&path, current.as_ref(), &doc, &edit, a.backup_dir.as_deref(), a.dry_run)?;
    report.config_version = Some(version.number());
    report.table = Some(dotted(&[&version.runtimes_path()[..], &[a.handler.as_str()]].concat()));
    report.status = edit.status;
    report.changed = !edit.changes.is_empty();
    report.written = written.is_some();
    report.backup = written.flatten();
    report.changes = edit.changes;
    report.notes = edit.notes;
    if report.written {
        report.notes.push("restart containerd to apply (systemctl restart containerd)".into());
    }
    Ok(report)
}

/// Writes the edited document unless nothing changed or this is a dry run. Returns None when
/// nothing was written, else the backup made (None for a file that did not exist).
fn write_if_changed(
    path: &Path,
    current: Option<&(String, Metadata)>,
    doc: &DocumentMut,
    edit: &Edit,
    backup_dir: Option<&Path>,
    dry_run: bool,
) -> Result<Option<Option<PathBuf>>, Error> {
    if edit.changes.is_empty() || dry_run {
        return Ok(None);
    }
    let backup = match current {
        Some((text, meta)) => Some(backup(path, text, meta, backup_dir)?),
        None => None,
    };
    write_atomically(path, &doc.to_string(), current.map(|(_, m)| m))?;
    Ok(Some(backup))
}

/// `20261123T235219.123Z`: sortable, and no ':' (which some tools read as a host separator).
fn compact_utc(t: SystemTime) -> String {
    humantime::format_rfc3339_millis(t).to_string().replace(['-', ':'], "")
}

fn file_name(path: &Path) -> String {
    path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "config.toml".into())
}

fn parent_dir(path: &Path) -> PathBuf {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

/// Copies the original to `<dir>/<name>.kybernate-backup-<UTC time>` with its mode and owner
/// (containerd configs can hold registry credentials). Never overwrites an earlier backup.
fn backup(path: &Path, text: &str, meta: &Metadata, dir: Option<&Path>) -> Result<PathBuf, Error> {
    let dir = match dir {
        Some(d) => {
            fs::create_dir_all(d).map_err(io_error(d, "create the backup directory"))?;
            d.to_path_buf()
        }
        None => parent_dir(path),
    };
    let base = format!("{}.kybernate-backup-{}", file_name(path), compact_utc(SystemTime::now()));
    // "config.toml" names a file in the working directory: keep the backup's name just as short.
    let in_dir = |name: String| if dir == Path::new(".") { PathBuf::from(name) } else { dir.join(name) };
    let mode = meta.mode() & 0o7777;
    for n in 0..1000 {
        let name = if n == 0 { base.clone() } else { format!("{base}-{n}") };
        let candidate = in_dir(name);
        let mut file = match OpenOptions::new().write(true).create_new(true).mode(0o600).open(&candidate) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(io_error(&candidate, "create the backup")(e)),
        };
        let done = file
            .write_all(text.as_bytes())
            .and_then(|()| std::os::unix::fs::fchown(&file, Some(meta.uid()), Some(meta.gid())))
            .and_then(|()| file.set_permissions(Permissions::from_mode(mode)))
            .and_then(|()| file.sync_all());
        return match done {
            Ok(()) => Ok(candidate),
            Err(e) => {
                let _ = fs::remove_file(&candidate);
                Err(io_error(&candidate, "write the backup")(e))
            }
        };
    }
    Err(io_error(&dir, "find a free backup name")(io::Error::from(io::ErrorKind::AlreadyExists)))
}

/// Replaces `path` with `text` so that containerd never reads half a file, with the original's
/// mode and owner (0644 root for a new file), durably ([`AtomicFile`]).
fn write_atomically(path: &Path, text: &str, original: Option<&Metadata>) -> Result<(), Error> {
    if original.is_none() {
        let dir = parent_dir(path);
        fs::create_dir_all(&dir).map_err(io_error(&dir, "create the config's directory"))?;
    }
    let mode = original.map(|m| m.mode() & 0o7777).unwrap_or(0o644);
    let written = AtomicFile::create(path, mode, Durability::Machine).and_then(|mut file| {
        file.file().write_all(text.as_bytes())?;
        if let Some(m) = original {
            std::os::unix::fs::fchown(file.file(), Some(m.uid()), Some(m.gid()))?;
        }
        file.commit()
    });
    written.map_err(io_error(path, "write it"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn want(style: Style) -> Wanted {
        let runtime_path = (style == Style::RuntimePath).then(|| DEFAULT_SHIM.to_string());
        Wanted { handler: "kybernate".into(), style, runtime_path, config_path: DEFAULT_CONFIG_PATH.into() }
    }

    #[test]
    fn versions() {
        assert!(matches!(detect_version(&parse("").unwrap()), Err(EditError::Version1)));
        assert!(matches!(detect_version(&parse("version = 1").unwrap()), Err(EditError::Version1)));
        assert_eq!(detect_version(&parse("version = 2").unwrap()).unwrap(), Version::V2);
        assert_eq!(detect_version(&parse("version = 3").unwrap()).unwrap(), Version::V3);
        assert!(matches!(detect_version(&parse("version = \"2\"").unwrap()), Err(EditError::UnsupportedVersion(_))));
    }

    #[test]
    fn parse_error_names_line_and_column() {
        let err = parse("version = 2\n\n[plugins\nx = 1\n").unwrap_err();
        let EditError::Parse { line, column, .. } = err else { panic!("{err:?}") };
        assert_eq!((line, column), (3, 9));
    }

    #[test]
    fn install_into_empty_v2_adds_runc_then_ours() {
        let mut doc = parse("version = 2\n").unwrap();
        let edit = install(&mut doc, Version::V2, &want(Style::RuntimeType)).unwrap();
        assert_eq!(edit.status, Status::Installed);
        let text = doc.to_string();
        assert_eq!(
            text,
            r#"version = 2

[plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
runtime_type = "io.containerd.runc.v2"

[plugins."io.containerd.grpc.v1.cri".containerd.runtimes.kybernate]
runtime_type = "io.containerd.kybernate.v1"
pod_annotations = ["kybernate.io/*"]

[plugins."io.containerd.grpc.v1.cri".containerd.runtimes.kybernate.options]
ConfigPath = "/etc/kybernate/config.toml"
"#
        );
        let again = install(&mut doc, Version::V2, &want(Style::RuntimeType)).unwrap();
        assert_eq!(again.status, Status::AlreadyInstalled);
        assert!(again.changes.is_empty());
        assert_eq!(doc.to_string(), text);
    }

    #[test]
    fn style_switch_replaces_the_table() {
        let mut doc = parse("version = 3\n").unwrap();
        install(&mut doc, Version::V3, &want(Style::RuntimeType)).unwrap();
        let edit = install(&mut doc, Version::V3, &want(Style::RuntimePath)).unwrap();
        assert_eq!(edit.status, Status::Updated);
        let text = doc.to_string();
        assert!(text.contains("[plugins.\"io.containerd.cri.v1.runtime\".containerd.runtimes.kybernate]\nruntime_type = \"io.containerd.runc.v2\"\nruntime_path = \"/usr/local/bin/containerd-shim-kybernate-v1\""), "{text}");
        assert!(!text.contains("ConfigPath"), "{text}");
    }

    #[test]
    fn foreign_runtime_under_our_name_is_refused() {
        let text = "version = 2\n[plugins.\"io.containerd.grpc.v1.cri\".containerd.runtimes.kybernate]\nruntime_type = \"io.containerd.kata.v2\"\n";
        let mut doc = parse(text).unwrap();
        assert!(matches!(install(&mut doc, Version::V2, &want(Style::RuntimeType)), Err(EditError::NotOurs { .. })));
        assert!(matches!(uninstall(&mut doc, Version::V2, "kybernate"), Err(EditError::NotOurs { .. })));
        assert_eq!(doc.to_string(), text);
    }

    #[test]
    fn a_placeholder_default_runtime_is_no_missing_runtime() {
        let text =
            "version = 2\n[plugins.\"io.containerd.grpc.v1.cri\".containerd]\ndefault_runtime_name = \"${RUNTIME}\"\n";
        let mut doc = parse(text).unwrap();
        let edit = install(&mut doc, Version::V2, &want(Style::RuntimeType)).unwrap();
        assert_eq!(edit.status, Status::Installed);
        assert!(!edit.changes.iter().any(|c| c.contains("runc")), "{:?}", edit.changes);
        assert!(edit.notes.iter().any(|n| n.contains("placeholder \"${RUNTIME}\"")), "{:?}", edit.notes);
        assert!(!edit.notes.iter().any(|n| n.contains("will not load")), "{:?}", edit.notes);
        assert!(is_placeholder("${RUNTIME}") && !is_placeholder("runc") && !is_placeholder("$RUNTIME"));
    }

    #[test]
    fn handler_names() {
        assert!(parse_handler("kybernate-gpu").is_ok());
        for bad in ["", "Kybernate", "-a", "a-", "a.b", "runc", &"a".repeat(64)] {
            assert!(parse_handler(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn backup_names_sort_by_time() {
        let t = SystemTime::UNIX_EPOCH + std::time::Duration::from_millis(1_795_000_000_123);
        assert_eq!(compact_utc(t), "20261118T110640.123Z");
    }
}
