//! The store commands: list, inspect, rm, prune, export, import.

use std::collections::{BTreeMap, HashSet};
use std::fs;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, SystemTime};

use kybernate_checkpoint::retention::{self, RetentionError, RetentionPolicy};
use kybernate_checkpoint::{archive, Manifest, Store};
use serde::Serialize;

use crate::error::CliError;
use crate::output::Output;
use crate::output::{self, human_size, yes_no};
use crate::store::{self, Checkpoint};

pub fn list(store: &Store, out: Output, ns: Option<&str>, container: Option<&str>) -> Result<ExitCode, CliError> {
    let found = store::list(store, ns, container)?;
    match out {
        Output::Json => output::json(&found)?,
        // On stderr, so that stdout stays a table (or nothing) for `| awk`.
        Output::Table if found.is_empty() => {
            eprintln!("no checkpoints in {}{}", store.root().display(), filter(ns, container))
        }
        Output::Table => output::write(&output::table(&found))?,
    }
    Ok(ExitCode::SUCCESS)
}

fn filter(ns: Option<&str>, container: Option<&str>) -> String {
    match (ns, container) {
        (None, None) => String::new(),
        (Some(ns), None) => format!(" for namespace {ns:?}"),
        (None, Some(c)) => format!(" for container {c:?}"),
        (Some(ns), Some(c)) => format!(" for namespace {ns:?}, container {c:?}"),
    }
}

/// `inspect -o json`: the checkpoint object plus the manifest and the full verification.
#[derive(Serialize)]
struct Inspected<'a> {
    #[serde(flatten)]
    checkpoint: &'a Checkpoint,
    manifest: Option<&'a Manifest>,
    verification: Verification,
    /// Whether a `kybernate.sig` signs the manifest, and by which key id (as it says).
    signature: crate::signing::SignatureInfo,
    /// Taken on this node, or imported/pulled (`kybernate.origin`).
    origin: crate::signing::OriginInfo,
}

#[derive(Serialize)]
struct Verification {
    ok: bool,
    error: Option<String>,
}

/// Prints everything about one checkpoint, then fails (exit 1) if verification failed: a
/// checkpoint that does not verify must not be restored, and scripts should see that.
pub fn inspect(store: &Store, out: Output, reference: &str) -> Result<ExitCode, CliError> {
    let mut cp = store::resolve(store, reference)?;
    let verified = kybernate_checkpoint::verify(&cp.path);
    let error = verified.as_ref().err().map(ToString::to_string);
    cp.set_verified(error.clone());
    match out {
        Output::Json => output::json(&Inspected {
            checkpoint: &cp,
            manifest: cp.manifest.as_ref(),
            verification: Verification { ok: error.is_none(), error },
            signature: crate::signing::signature_info(&cp.path),
            origin: crate::signing::origin_info(&cp.path),
        })?,
        Output::Table => output::write(&details(&cp))?,
    }
    match verified {
        Ok(_) => Ok(ExitCode::SUCCESS),
        Err(source) => Err(CliError::Verify { id: cp.id, source }),
    }
}

/// `inspect --compat -o json`: the restore verdict, for which checkpoint, and how long it took.
#[derive(Serialize)]
struct Compat<'a> {
    checkpoint: &'a str,
    #[serde(flatten)]
    verdict: &'a kybernate_checkpoint::verdict::Verdict,
    time_ms: f64,
}

/// `inspect --compat`: whether this node can restore the checkpoint, from its manifest alone
/// (no hashing), judged as `kybernate restore` and the shim judge it; the new container is the
/// one its `spec.dump` describes. Exit 1 when incompatible, the mismatches printed first.
pub fn inspect_compat(store: &Store, out: Output, reference: &str, cdi_dirs: &[PathBuf]) -> Result<ExitCode, CliError> {
    let cp = store::resolve(store, reference)?;
    let (verdict, took) = verdict_of(&cp, cdi_dirs)?;
    match out {
        Output::Json => output::json(&Compat {
            checkpoint: &cp.id,
            verdict: &verdict,
            time_ms: (took.as_secs_f64() * 1e6).round() / 1e3,
        })?,
        Output::Table => output::write(&output::verdict_text(&cp.id, &verdict, took))?,
    }
    Ok(if verdict.compatible() { ExitCode::SUCCESS } else { ExitCode::from(crate::error::FAILED) })
}

/// The restore verdict of `cp` on this node and how long it took: its manifest (read, not
/// verified: the verdict only refuses) against this node and the container its `spec.dump`
/// describes (the node alone when there is none, as in a flat checkpoint).
pub fn verdict_of(
    cp: &Checkpoint,
    cdi_dirs: &[PathBuf],
) -> Result<(kybernate_checkpoint::verdict::Verdict, Duration), CliError> {
    const MAX_SPEC: usize = 16 << 20;
    let manifest = kybernate_checkpoint::read_manifest(&cp.path)
        .map_err(|source| CliError::Verify { id: cp.id.clone(), source })?;
    let spec = (!manifest.flat)
        .then(|| fs::read(cp.path.join(kybernate_checkpoint::SPEC_DUMP)).ok())
        .flatten()
        .filter(|bytes| bytes.len() <= MAX_SPEC)
        .and_then(|bytes| serde_json::from_slice::<serde_json::Value>(&bytes).ok())
        .filter(serde_json::Value::is_object);
    Ok(crate::restore::judge(&manifest, spec.as_ref(), cdi_dirs, false))
}

/// `inspect`'s human form: one `key: value` line each, then the files.
fn details(cp: &Checkpoint) -> String {
    let mut lines: Vec<(&str, String)> = vec![
        ("id", cp.id.clone()),
        ("path", cp.path.display().to_string()),
        ("namespace", cp.namespace.clone()),
        ("container", cp.container.clone()),
    ];
    let known = |v: &Option<String>| v.clone().unwrap_or_else(|| "-".into());
    if cp.pod_namespace.is_some() || cp.pod_name.is_some() {
        lines.push(("pod", format!("{}/{}", known(&cp.pod_namespace), known(&cp.pod_name))));
    }
    if let Some(name) = &cp.container_name {
        lines.push(("container name", name.clone()));
    }
    if let Some(image) = &cp.image {
        lines.push(("image", image.clone()));
    }
    lines.push(("created", known(&cp.created)));
    lines.push(("size", format!("{} ({} bytes)", human_size(cp.size_bytes), cp.size_bytes)));
    lines.push(("gpu", yes_no(cp.gpu).into()));
    if let Some(m) = &cp.manifest {
        if let Some(gpu) = &m.gpu {
            lines.extend(output::gpu_lines(gpu));
        }
        lines.push(("runtime", format!("{} ({})", m.runtime.path.display(), m.runtime.version)));
        lines.push(("criu", format!("{} ({})", m.criu.path.display(), m.criu.version)));
        lines.push(("kernel", m.kernel.clone()));
        lines.push(("host", m.host.clone()));
        lines.push(("format", m.format_version.to_string()));
        lines.push(("duration", humantime::format_duration(Duration::from_millis(m.duration_ms)).to_string()));
        lines.extend(frozen_lines(m));
        lines.push(("rootfs diff", yes_no(Some(m.rootfs_diff)).into()));
        lines.push(("options", options(m)));
        lines.push(("files", format!("{}, {} recorded", m.files.len(), human_size(m.total_size()))));
    }
    lines.extend(crate::signing::detail_lines(&cp.path));
    lines.push(("verification", output::status(cp).replace("broken: ", "FAILED: ")));
    let width = lines.iter().map(|(k, _)| k.len()).max().unwrap_or(0) + 1;
    let mut text: String =
        lines.iter().map(|(k, v)| format!("{:<width$} {v}\n", format!("{k}:"), width = width)).collect();
    if let Some(m) = cp.manifest.as_ref().filter(|m| !m.files.is_empty()) {
        let name_width = m.files.keys().map(|k| k.chars().count()).max().unwrap_or(0);
        for (name, f) in &m.files {
            text.push_str(&format!("  {name:<name_width$}  {:>10}  {}\n", human_size(f.size), f.digest_text()));
        }
    }
    text
}

/// How long the container was frozen (the shim's measure) and CRIU's own times of the dump, when
/// the manifest records them (checkpoints of older shims do not).
fn frozen_lines(m: &Manifest) -> Vec<(&'static str, String)> {
    let mut lines = Vec::new();
    if let Some(ms) = m.frozen_ms {
        let until = if m.options.exit { "freeze to commit, then killed" } else { "freeze to thaw" };
        lines.push(("frozen", format!("{ms} ms ({until})")));
    }
    if let Some(d) = &m.dump_stats {
        lines.push((
            "criu times",
            format!(
                "freezing {} ms, frozen {} ms (memory dump {} ms, of which write {} ms), {} of {} pages written",
                d.freezing_ms, d.frozen_ms, d.memdump_ms, d.memwrite_ms, d.pages_written, d.pages_scanned
            ),
        ));
    }
    lines
}

/// The checkpoint flags that were set, e.g. `open_tcp, empty_namespaces=network`; "none" when all are defaults.
fn options(m: &Manifest) -> String {
    let Ok(serde_json::Value::Object(map)) = serde_json::to_value(&m.options) else {
        return "-".into();
    };
    let set: Vec<String> = map
        .into_iter()
        .filter_map(|(k, v)| match v {
            serde_json::Value::Bool(true) => Some(k),
            serde_json::Value::Bool(false) | serde_json::Value::Null => None,
            serde_json::Value::String(s) if s.is_empty() => None,
            serde_json::Value::String(s) => Some(format!("{k}={s}")),
            serde_json::Value::Array(a) if a.is_empty() => None,
            serde_json::Value::Array(a) => Some(format!(
                "{k}={}",
                a.iter().map(|v| v.as_str().map_or_else(|| v.to_string(), String::from)).collect::<Vec<_>>().join(",")
            )),
            other => Some(format!("{k}={other}")),
        })
        .collect();
    if set.is_empty() {
        "none".into()
    } else {
        set.join(", ")
    }
}

/// Resolves every reference before removing anything: one typo removes nothing.
pub fn rm(store: &Store, out: Output, references: &[String]) -> Result<ExitCode, CliError> {
    let mut targets: Vec<Checkpoint> = Vec::new();
    for reference in references {
        let cp = store::resolve(store, reference)?;
        if !targets.iter().any(|t| t.path == cp.path) {
            targets.push(cp);
        }
    }
    remove_all(store, out, targets)
}

/// Removes in order; on a failure, what was removed so far is still reported before the error.
fn remove_all(store: &Store, out: Output, targets: Vec<Checkpoint>) -> Result<ExitCode, CliError> {
    let mut removed = Vec::new();
    for cp in targets {
        if let Err(e) = store::remove(store, &cp) {
            report_removed(out, &removed, false)?;
            return Err(e);
        }
        removed.push(cp);
    }
    report_removed(out, &removed, false)?;
    Ok(ExitCode::SUCCESS)
}

fn report_removed(out: Output, removed: &[Checkpoint], dry_run: bool) -> Result<(), CliError> {
    match out {
        Output::Json => output::json(removed),
        Output::Table if removed.is_empty() => output::write("nothing to remove\n"),
        Output::Table => {
            let bytes = removed.iter().fold(0u64, |sum, c| sum.saturating_add(c.size_bytes));
            let verb = if dry_run { "would remove" } else { "removed" };
            let plural = if removed.len() == 1 { "" } else { "s" };
            let summary = format!("{verb} {} checkpoint{plural}, {}\n", removed.len(), human_size(bytes));
            output::write(&(output::table(removed) + &summary))
        }
    }
}

/// What `prune` removes, per container.
#[derive(Debug, Clone, Copy)]
pub enum Rule {
    /// All but the newest N good (status ok) checkpoints; a broken one is removed when it is
    /// older than the N-th newest good one, and never takes one of the N places.
    Keep(usize),
    /// Those created more than this long ago (checkpoints of unknown age are kept).
    OlderThan(Duration),
    /// What the node's retention policy gives up ([`kybernate_checkpoint::retention`]), as the
    /// shim does after each checkpoint.
    Policy(RetentionPolicy),
}

pub fn prune(
    store: &Store,
    out: Output,
    ns: Option<&str>,
    container: Option<&str>,
    rule: Rule,
    dry_run: bool,
) -> Result<ExitCode, CliError> {
    let all = store::list(store, ns, container)?;
    let victims = match rule {
        Rule::Policy(policy) => policy_victims(store, &all, &policy)?,
        rule => select_for_prune(&all, rule, SystemTime::now()),
    };
    let targets: Vec<Checkpoint> = all.into_iter().filter(|c| victims.contains(&c.id)).collect();
    // Work dirs of a shim or CLI killed mid-way hold disk too; they belong to nobody now.
    sweep_stale_work_dirs(store, dry_run);
    if dry_run {
        report_removed(out, &targets, true)?;
        return Ok(ExitCode::SUCCESS);
    }
    remove_all(store, out, targets)
}

/// Removes (or, dry, names) hidden work dirs whose writer process is gone, one line each on
/// stderr so that `-o json` output stays the list of checkpoints.
fn sweep_stale_work_dirs(store: &Store, dry_run: bool) {
    let alive = |pid: u32| Path::new("/proc").join(pid.to_string()).exists();
    for dir in store.stale_work_dirs(alive) {
        if dry_run {
            eprintln!("kybernate: would remove {} (left by a process that is gone)", dir.display());
        } else if let Err(e) = fs::remove_dir_all(&dir) {
            eprintln!("kybernate: cannot remove {}: {e}", dir.display());
        } else {
            eprintln!("kybernate: removed {} (left by a process that is gone)", dir.display());
        }
    }
}

/// The ids of `all` (the checkpoints the filters chose) that the store's retention policy
/// removes. A store left above max_bytes is told on stderr (stdout stays the list).
fn policy_victims(store: &Store, all: &[Checkpoint], policy: &RetentionPolicy) -> Result<HashSet<String>, CliError> {
    let plan = retention::plan_prune(store, policy, &[], None).map_err(|e| match e {
        RetentionError::Store(e) => CliError::Store(e),
        e => CliError::Failed(e.to_string()),
    })?;
    if plan.over_limit {
        eprintln!(
            "kybernate: the store still holds {} after pruning, above [checkpoint] max_bytes ({}): what is left is \
             each container's newest checkpoint taken on this node; remove some with `kybernate rm` or raise max_bytes",
            human_size(plan.after_bytes),
            human_size(policy.max_bytes.unwrap_or(0))
        );
    }
    let paths: HashSet<PathBuf> =
        plan.remove.iter().map(|r| fs::canonicalize(&r.path).unwrap_or_else(|_| r.path.clone())).collect();
    Ok(all.iter().filter(|c| paths.contains(&c.path)).map(|c| c.id.clone()).collect())
}

/// The ids `rule` removes from `all` (sorted newest first), each container on its own.
///
/// A broken checkpoint cannot be restored, so under `Keep` it never counts as one of the newest:
/// otherwise a newer broken one (a forged `created`, a truncated image) would make prune remove
/// the good checkpoint it displaced. Its time comes from a manifest only when that validates.
fn select_for_prune(all: &[Checkpoint], rule: Rule, now: SystemTime) -> HashSet<String> {
    let mut by_container: BTreeMap<(&str, &str), Vec<&Checkpoint>> = BTreeMap::new();
    for c in all {
        by_container.entry((&c.namespace, &c.container)).or_default().push(c);
    }
    let mut victims = HashSet::new();
    for group in by_container.values() {
        match rule {
            Rule::Keep(n) => {
                // Everything after the N-th newest good checkpoint; nothing if there are fewer.
                let mut good = 0;
                for c in group {
                    if good >= n {
                        victims.insert(c.id.clone());
                    } else if c.status == store::Status::Ok {
                        good += 1;
                    }
                }
            }
            Rule::OlderThan(age) => {
                let Some(cutoff) = now.checked_sub(age) else { continue };
                victims.extend(group.iter().filter(|c| c.time.is_some_and(|t| t < cutoff)).map(|c| c.id.clone()));
            }
            // Decided over the whole store (`policy_victims`), not per container.
            Rule::Policy(_) => {}
        }
    }
    victims
}

/// `export -o json`: the checkpoint object plus where the archive went.
#[derive(Serialize)]
struct Exported<'a> {
    #[serde(flatten)]
    checkpoint: &'a Checkpoint,
    archive: Archive,
}

#[derive(Serialize)]
struct Archive {
    path: PathBuf,
    size_bytes: u64,
    /// "none" or "zstd".
    compression: Compress,
}

/// `kybernate export --compress`, and the config's `[checkpoint] compress` as the CLI knows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Compress {
    /// A plain tar: the fastest on a local disk.
    None,
    /// zstd (level 1, every core): smaller archives for the network or slow disks.
    Zstd,
}

impl From<kybernate_runtime_select::Compression> for Compress {
    fn from(c: kybernate_runtime_select::Compression) -> Self {
        match c {
            kybernate_runtime_select::Compression::None => Self::None,
            kybernate_runtime_select::Compression::Zstd => Self::Zstd,
        }
    }
}

pub fn export(
    store: &Store,
    out: Output,
    reference: &str,
    file: &Path,
    compress: Compress,
) -> Result<ExitCode, CliError> {
    let cp = store::resolve(store, reference)?;
    let dest = archive_destination(store, file)?;
    let compression = match compress {
        Compress::None => archive::Compression::None,
        Compress::Zstd => archive::Compression::Zstd,
    };
    let mut line = ProgressLine::new(out, "export");
    archive::export_with(&cp.path, &dest, compression, &mut |step| line.show(step)).map_err(CliError::Export)?;
    drop(line);
    let size_bytes = fs::metadata(&dest).map(|m| m.len()).unwrap_or(0);
    match out {
        Output::Json => output::json(&Exported {
            checkpoint: &cp,
            archive: Archive { path: dest, size_bytes, compression: compress },
        })?,
        Output::Table => {
            let how = if compress == Compress::Zstd { ", zstd" } else { "" };
            output::write(&format!("exported {} to {} ({}{how})\n", cp.id, dest.display(), human_size(size_bytes)))?
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Where an export or import is, on one stderr line, for people at a terminal (not with
/// `-o json`, not when stderr is a file): redrawn at most every 250 ms, cleared when dropped.
struct ProgressLine {
    verb: &'static str,
    shown: bool,
    last: Option<std::time::Instant>,
}

impl ProgressLine {
    fn new(out: Output, verb: &'static str) -> Self {
        let shown = out == Output::Table && std::io::IsTerminal::is_terminal(&std::io::stderr());
        Self { verb, shown, last: None }
    }

    fn show(&mut self, step: archive::Step) {
        use std::io::Write;
        let now = std::time::Instant::now();
        let due = self.last.map_or(true, |t| now.duration_since(t) >= Duration::from_millis(250));
        if !self.shown || !(due || step == archive::Step::Verify) {
            return;
        }
        self.last = Some(now);
        let text = match step {
            archive::Step::Verify => "verifying every file".to_string(),
            archive::Step::Copy { done, total } => format!("{} of {}", human_size(done), human_size(total)),
        };
        let mut err = std::io::stderr().lock();
        // \x1b[K: erase the rest of a longer previous line.
        let _ = write!(err, "\r{}: {text}\x1b[K", self.verb);
        let _ = err.flush();
    }
}

impl Drop for ProgressLine {
    fn drop(&mut self) {
        use std::io::Write;
        if self.shown && self.last.is_some() {
            let mut err = std::io::stderr().lock();
            let _ = write!(err, "\r\x1b[K");
            let _ = err.flush();
        }
    }
}

/// The absolute archive path: a new file, in an existing directory outside the store (an archive
/// inside a checkpoint would make that checkpoint fail verification).
fn archive_destination(store: &Store, file: &Path) -> Result<PathBuf, CliError> {
    let bad = |what, next| CliError::BadArchivePath { path: file.to_path_buf(), what, next };
    if fs::symlink_metadata(file).is_ok() {
        return Err(bad("already exists", "remove it first or choose another file name"));
    }
    let Some(name) = file.file_name() else {
        return Err(bad("is not a file name", "name the archive to write, e.g. /tmp/checkpoint.tar"));
    };
    let parent = file.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let Ok(parent) = fs::canonicalize(parent) else {
        return Err(bad("its directory does not exist", "create the directory or choose another path"));
    };
    let root = fs::canonicalize(store.root()).unwrap_or_else(|_| store.root().to_path_buf());
    if parent.starts_with(&root) {
        return Err(bad("is inside the checkpoint store", "write the archive outside the store, e.g. under /tmp"));
    }
    Ok(parent.join(name))
}

/// `kybernate import`: an archive of ours, or a kubelet/crictl/Podman checkpoint archive (stored
/// under `namespace`, default k8s.io), marked as imported and checked against the node's trust
/// policy before it becomes visible.
pub fn import(
    store: &Store,
    out: Output,
    file: &Path,
    namespace: Option<&str>,
    trust: &kybernate_runtime_select::config::TrustConfig,
) -> Result<ExitCode, CliError> {
    if !file.is_file() {
        return Err(CliError::BadArchivePath {
            path: file.to_path_buf(),
            what: "not found or not a regular file",
            next: "name an archive written by `kybernate export`, the kubelet, crictl or Podman",
        });
    }
    let policy = kybernate_checkpoint::TrustPolicy::load(&trust.keys, trust.require_signature)
        .map_err(|e| CliError::Usage(format!("{e}; fix [trust] keys in the Kybernate config")))?;
    let opts = archive::ImportOptions { namespace, trust: Some(&policy) };
    let mut line = ProgressLine::new(out, "import");
    let (dest, _) = archive::import_opts(file, store, &opts, &mut |step| line.show(step)).map_err(CliError::Import)?;
    drop(line);
    // The root may have been created just now: canonicalise it to build the id.
    let root = fs::canonicalize(store.root()).unwrap_or_else(|_| store.root().to_path_buf());
    let dest = fs::canonicalize(&dest).unwrap_or(dest);
    let cp = Checkpoint::load(&root, &dest);
    match out {
        Output::Json => output::json(&cp)?,
        Output::Table => output::write(&format!(
            "imported {} as {}\n{}",
            file.display(),
            cp.id,
            output::table(std::slice::from_ref(&cp))
        ))?,
    }
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cp(ns: &str, container: &str, name: &str, secs_ago: Option<u64>, now: SystemTime) -> Checkpoint {
        Checkpoint {
            id: format!("{ns}/{container}/{name}"),
            path: PathBuf::from("/store").join(ns).join(container).join(name),
            namespace: ns.into(),
            container: container.into(),
            created: None,
            size_bytes: 0,
            gpu: None,
            gpu_mode: None,
            pod_namespace: None,
            pod_name: None,
            container_name: None,
            image: None,
            runtime: None,
            criu_version: None,
            status: store::Status::Ok,
            error: None,
            time: secs_ago.map(|s| now - Duration::from_secs(s)),
            manifest: None,
        }
    }

    #[test]
    fn inspect_shows_frozen_time_and_criu_times_when_recorded() {
        let mut m: Manifest = serde_json::from_value(serde_json::json!({
            "format_version": 2, "namespace": "default", "container_id": "web",
            "runtime": {"path": "/usr/bin/runc", "version": "1"}, "criu": {"path": "/usr/sbin/criu", "version": "4.2"},
            "kernel": "6", "host": "h", "created": "2026-12-07T12:00:00Z",
            "options": kybernate_checkpoint::CheckpointFlags::default(), "files": {},
        }))
        .unwrap();
        let mut c = cp("default", "web", "x", None, SystemTime::now());
        c.manifest = Some(m.clone());
        let text = details(&c);
        assert!(!text.contains("frozen") && !text.contains("criu times"), "older manifest:\n{text}");

        m.frozen_ms = Some(412);
        m.dump_stats = Some(kybernate_checkpoint::manifest::DumpStats {
            freezing_ms: 1,
            frozen_ms: 380,
            memdump_ms: 320,
            memwrite_ms: 300,
            pages_scanned: 262_200,
            pages_skipped_parent: 0,
            pages_written: 262_150,
        });
        c.manifest = Some(m.clone());
        let text = details(&c);
        let text = text.split_whitespace().collect::<Vec<_>>().join(" ");
        assert!(text.contains("frozen: 412 ms (freeze to thaw)"), "{text}");
        assert!(
            text.contains("criu times: freezing 1 ms, frozen 380 ms (memory dump 320 ms, of which write 300 ms), 262150 of 262200 pages written"),
            "{text}"
        );
        m.options.exit = true;
        c.manifest = Some(m);
        assert!(details(&c).contains("412 ms (freeze to commit, then killed)"));
    }

    #[test]
    fn prune_rules_apply_per_container() {
        let now = SystemTime::now();
        let mut all = vec![
            cp("a", "c1", "3", Some(10), now),
            cp("a", "c1", "2", Some(100), now),
            cp("a", "c1", "1", Some(1000), now),
            cp("a", "c2", "1", Some(1000), now),
            cp("b", "c1", "1", None, now),
        ];
        store::sort_newest_first(&mut all);
        let keep1 = select_for_prune(&all, Rule::Keep(1), now);
        assert_eq!(keep1, HashSet::from(["a/c1/2".to_string(), "a/c1/1".to_string()]));
        let old = select_for_prune(&all, Rule::OlderThan(Duration::from_secs(500)), now);
        assert_eq!(old, HashSet::from(["a/c1/1".to_string(), "a/c2/1".to_string()]));
        assert!(select_for_prune(&all, Rule::OlderThan(Duration::MAX), now).is_empty());
    }

    fn broken(ns: &str, container: &str, name: &str, secs_ago: Option<u64>, now: SystemTime) -> Checkpoint {
        Checkpoint {
            status: store::Status::Broken,
            error: Some("broken".into()),
            ..cp(ns, container, name, secs_ago, now)
        }
    }

    #[test]
    fn broken_checkpoints_never_count_as_the_newest() {
        let now = SystemTime::now();
        let mut all = vec![
            broken("a", "c1", "b-new", Some(5), now),
            cp("a", "c1", "g1", Some(10), now),
            broken("a", "c1", "b-mid", Some(50), now),
            cp("a", "c1", "g2", Some(100), now),
            cp("a", "c1", "g3", Some(1000), now),
            broken("a", "c1", "b-old", Some(2000), now),
            broken("a", "c1", "b-unknown", None, now),
            broken("a", "only-broken", "1", Some(10), now),
            broken("a", "only-broken", "2", Some(1000), now),
        ];
        store::sort_newest_first(&mut all);
        let ids = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<HashSet<_>>();
        // The newest good one stays, with the broken one newer than it; everything older goes.
        assert_eq!(
            select_for_prune(&all, Rule::Keep(1), now),
            ids(&["a/c1/b-mid", "a/c1/g2", "a/c1/g3", "a/c1/b-old", "a/c1/b-unknown"])
        );
        assert_eq!(select_for_prune(&all, Rule::Keep(2), now), ids(&["a/c1/g3", "a/c1/b-old", "a/c1/b-unknown"]));
        // Fewer good ones than N: nothing goes, broken or not.
        assert!(select_for_prune(&all, Rule::Keep(3), now).contains("a/c1/b-old"));
        assert!(select_for_prune(&all, Rule::Keep(4), now).is_empty());
        // By age, broken ones go like any other; of unknown age they stay.
        assert_eq!(
            select_for_prune(&all, Rule::OlderThan(Duration::from_secs(500)), now),
            ids(&["a/c1/g3", "a/c1/b-old", "a/only-broken/2"])
        );
    }
}
