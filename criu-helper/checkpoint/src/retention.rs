//! Retention: which checkpoints the store gives up to stay within the node's limits (`[checkpoint]
//! keep` per container, `max_bytes` for the whole store), and the refusal of a checkpoint that
//! could not fit even then.
//!
//! `max_bytes` removes checkpoints in the order they are worth least: broken ones (nothing can
//! restore them), then pulled copies (cache entries: the registry still has them), then imported
//! ones, then those taken on this node; oldest first within each. Two kinds never go: those the
//! caller protects (the checkpoint just taken), and each container's newest good checkpoint taken
//! on this node, which is what restoring that container would use (unless a newer one of the same
//! container is being taken: it replaces it). A store full of such checkpoints refuses new ones
//! rather than drop another job's only way back.
//!
//! Removal is the store's: each checkpoint is renamed to a hidden `.<name>.removing-<pid>-<n>`
//! sibling first, so a reader never sees a half-removed checkpoint as one.

use std::cmp::Reverse;
use std::collections::{BTreeMap, HashSet};
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use serde::Serialize;

use crate::store::{dir_size, verify_quick, Store, StoreError};
use crate::trust::{read_origin, Origin};

/// The node's limits: the newest `keep` checkpoints of each `<namespace>/<container>`, and
/// `max_bytes` for the whole store. `None`: no limit.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RetentionPolicy {
    pub keep: Option<u32>,
    pub max_bytes: Option<u64>,
}

impl RetentionPolicy {
    /// From the config's keys: `keep = 0` (the default) means no limit.
    pub fn new(keep: u32, max_bytes: Option<u64>) -> Self {
        Self { keep: (keep > 0).then_some(keep), max_bytes }
    }

    pub fn is_unlimited(&self) -> bool {
        self.keep.is_none() && self.max_bytes.is_none()
    }
}

/// Where a checkpoint came from (`kybernate.origin`), in the order `max_bytes` gives them up.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Source {
    Pulled,
    /// Imported from an archive, or an origin record that cannot be read (it is not ours then).
    Imported,
    /// Taken on this node.
    Local,
}

/// Which limit removes a checkpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Reason {
    Keep,
    MaxBytes,
}

/// One checkpoint the plan removes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Removal {
    pub path: PathBuf,
    pub namespace: String,
    pub container: String,
    /// Bytes on disk (0 when no `max_bytes` is set: not measured then).
    pub bytes: u64,
    pub source: Source,
    pub broken: bool,
    pub reason: Reason,
}

/// What the store gives up, decided before anything is removed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PrunePlan {
    pub remove: Vec<Removal>,
    /// What the store's checkpoints hold now (measured only when `max_bytes` is set).
    pub held_bytes: u64,
    /// What the store holds once `remove` is gone, the incoming checkpoint included.
    pub after_bytes: u64,
    /// `max_bytes` is still exceeded after the plan (only without an incoming checkpoint, which
    /// is refused instead): what is left is protected or some container's newest.
    pub over_limit: bool,
}

/// A checkpoint about to be taken into `<namespace>/<container>/`, of about `bytes`.
#[derive(Debug, Clone, Copy)]
pub struct Incoming<'a> {
    pub namespace: &'a str,
    pub container: &'a str,
    pub bytes: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum RetentionError {
    /// The numbers say what to change: the estimate, the limit, what the store holds, and how
    /// much of that pruning may remove.
    #[error(
        "the checkpoint (about {}) cannot fit in the store {} even after pruning: [checkpoint] max_bytes is {}, \
         the store holds {}, and pruning could free {} (broken, pulled, imported and older checkpoints; never a \
         container's newest checkpoint taken on this node); raise max_bytes, or remove checkpoints with `kybernate rm`",
        size(*incoming), root.display(), size(*max_bytes), size(*held), size(*freeable)
    )]
    CannotFit { root: PathBuf, incoming: u64, max_bytes: u64, held: u64, freeable: u64 },
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// `20.0 MiB (20971520 bytes)`: readable, and exact for whoever compares it with `du -b`.
fn size(bytes: u64) -> String {
    format!("{:.1} MiB ({bytes} bytes)", bytes as f64 / (1u64 << 20) as f64)
}

/// A checkpoint of the store as retention sees it.
#[derive(Debug, Clone)]
struct Entry {
    path: PathBuf,
    /// Canonical, to compare with the caller's protected paths.
    canonical: PathBuf,
    namespace: String,
    container: String,
    name: String,
    /// The manifest's `created` when it validates, else the directory name's time.
    time: Option<SystemTime>,
    /// The directory name's time (milliseconds, where `created` has seconds): breaks ties.
    name_time: Option<SystemTime>,
    bytes: u64,
    source: Source,
    broken: bool,
}

/// Decides what `policy` removes from `store`. `protect`: checkpoints never removed (the one
/// just taken). With `incoming`, the plan is a forecast of the store once that checkpoint is
/// committed (it counts as its container's newest): a checkpoint that could not fit is refused
/// here with [`RetentionError::CannotFit`]; apply such a plan only after the commit, if at all.
pub fn plan_prune(
    store: &Store,
    policy: &RetentionPolicy,
    protect: &[PathBuf],
    incoming: Option<Incoming<'_>>,
) -> Result<PrunePlan, RetentionError> {
    if policy.is_unlimited() {
        return Ok(PrunePlan::default());
    }
    let entries = gather(store, policy.max_bytes.is_some())?;
    let protect: HashSet<PathBuf> = protect.iter().map(|p| fs::canonicalize(p).unwrap_or_else(|_| p.clone())).collect();
    decide(store.root(), &entries, policy, &protect, incoming)
}

/// Every checkpoint of the store with what the decision needs. Sizes are measured only when
/// `max_bytes` needs them (a walk of every file).
fn gather(store: &Store, sizes: bool) -> Result<Vec<Entry>, StoreError> {
    let mut out = Vec::new();
    for (path, manifest) in store.list()? {
        let name = |p: Option<&Path>| p.and_then(Path::file_name).map(|n| n.to_string_lossy().into_owned());
        let container_dir = path.parent();
        let (Some(cp), Some(container), Some(namespace)) =
            (name(Some(path.as_path())), name(container_dir), name(container_dir.and_then(Path::parent)))
        else {
            continue;
        };
        let name_time = crate::store::checkpoint_dir_time(&cp);
        let time = manifest.as_ref().ok().and_then(|m| humantime::parse_rfc3339(&m.created).ok()).or(name_time);
        let source = match read_origin(&path) {
            Ok(None) => Source::Local,
            Ok(Some(Origin::Pull { .. })) => Source::Pulled,
            Ok(Some(Origin::Import { .. })) | Err(_) => Source::Imported,
        };
        out.push(Entry {
            canonical: fs::canonicalize(&path).unwrap_or_else(|_| path.clone()),
            broken: manifest.is_err() || verify_quick(&path).is_err(),
            bytes: if sizes { dir_size(&path) } else { 0 },
            path,
            namespace,
            container,
            name: cp,
            time,
            name_time,
            source,
        });
    }
    Ok(out)
}

/// The decision over `entries` (see the module's doc).
fn decide(
    root: &Path,
    entries: &[Entry],
    policy: &RetentionPolicy,
    protect: &HashSet<PathBuf>,
    incoming: Option<Incoming<'_>>,
) -> Result<PrunePlan, RetentionError> {
    let protected = |e: &Entry| protect.contains(&e.canonical) || protect.contains(&e.path);
    let mut groups: BTreeMap<(&str, &str), Vec<usize>> = BTreeMap::new();
    for (i, e) in entries.iter().enumerate() {
        groups.entry((&e.namespace, &e.container)).or_default().push(i);
    }
    let mut remove: Vec<(usize, Reason)> = Vec::new();
    // Never removed by max_bytes: protected ones and each container's newest good local one.
    let mut pinned: HashSet<usize> = entries.iter().enumerate().filter(|(_, e)| protected(e)).map(|(i, _)| i).collect();
    for (&(ns, container), group) in &mut groups {
        // Newest first; unknown times count as the oldest.
        group.sort_by_key(|&i| Reverse((entries[i].time, entries[i].name_time, &entries[i].name)));
        let superseded = incoming.is_some_and(|i| i.namespace == ns && i.container == container);
        if let Some(n) = policy.keep {
            // All but the newest N good ones; a broken one never takes one of the N places
            // (as `kybernate prune --keep`). The incoming checkpoint is the newest.
            let mut good = u32::from(superseded);
            for &i in group.iter() {
                if good >= n {
                    if !protected(&entries[i]) {
                        remove.push((i, Reason::Keep));
                    }
                } else if !entries[i].broken {
                    good += 1;
                }
            }
        }
        if !superseded {
            let newest_local = group.iter().find(|&&i| !entries[i].broken && entries[i].source == Source::Local);
            pinned.extend(newest_local);
        }
    }
    let held = entries.iter().fold(0u64, |sum, e| sum.saturating_add(e.bytes));
    let removed_bytes =
        |remove: &[(usize, Reason)]| remove.iter().fold(0u64, |s, &(i, _)| s.saturating_add(entries[i].bytes));
    let incoming_bytes = incoming.map_or(0, |i| i.bytes);
    let mut after = held.saturating_sub(removed_bytes(&remove)).saturating_add(incoming_bytes);
    let mut over_limit = false;
    if let Some(max) = policy.max_bytes {
        let gone: HashSet<usize> = remove.iter().map(|&(i, _)| i).collect();
        let mut candidates: Vec<usize> =
            (0..entries.len()).filter(|i| !gone.contains(i) && !pinned.contains(i)).collect();
        candidates.sort_by_key(|&i| {
            let e = &entries[i];
            (!e.broken, e.source, e.time, e.name_time, &e.name)
        });
        for i in candidates {
            if after <= max {
                break;
            }
            remove.push((i, Reason::MaxBytes));
            after = after.saturating_sub(entries[i].bytes);
        }
        if after > max {
            if let Some(incoming) = incoming {
                // What pruning never removes: the pinned ones (unless `keep` did).
                let kept = pinned
                    .iter()
                    .filter(|&&i| !gone.contains(&i))
                    .fold(0u64, |s, &i| s.saturating_add(entries[i].bytes));
                return Err(RetentionError::CannotFit {
                    root: root.to_path_buf(),
                    incoming: incoming.bytes,
                    max_bytes: max,
                    held,
                    freeable: held.saturating_sub(kept),
                });
            }
            over_limit = true;
        }
    }
    let remove = remove
        .into_iter()
        .map(|(i, reason)| {
            let e = &entries[i];
            Removal {
                path: e.path.clone(),
                namespace: e.namespace.clone(),
                container: e.container.clone(),
                bytes: e.bytes,
                source: e.source,
                broken: e.broken,
                reason,
            }
        })
        .collect();
    Ok(PrunePlan { remove, held_bytes: held, after_bytes: after, over_limit })
}

/// Removes the plan's checkpoints, each renamed to a hidden sibling first (see the module's
/// doc). Returns the failures; one already gone (removed by someone else meanwhile) is none.
/// Emptied container directories stay: a checkpoint of that container may be starting in one.
pub fn apply(plan: &PrunePlan) -> Vec<(PathBuf, io::Error)> {
    let mut failed = Vec::new();
    for r in &plan.remove {
        if let Err(e) = remove_checkpoint(&r.path) {
            failed.push((r.path.clone(), e));
        }
    }
    failed
}

fn remove_checkpoint(path: &Path) -> io::Result<()> {
    let (Some(parent), Some(name)) = (path.parent(), path.file_name()) else {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, "not a checkpoint directory"));
    };
    let nanos = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_nanos());
    let trash = parent.join(format!(".{}.removing-{}-{nanos}", name.to_string_lossy(), std::process::id()));
    match fs::rename(path, &trash) {
        Ok(()) => fs::remove_dir_all(&trash),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::manifest::sample;
    use crate::store::{PartialCheckpoint, INVENTORY_FILE};
    use crate::trust::write_origin;

    const MIB: u64 = 1 << 20;

    fn entry(ns: &str, container: &str, name: &str, age_secs: u64, mib: u64, source: Source) -> Entry {
        let path = PathBuf::from(format!("/store/{ns}/{container}/{name}"));
        Entry {
            canonical: path.clone(),
            path,
            namespace: ns.into(),
            container: container.into(),
            name: name.into(),
            time: Some(SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000 - age_secs)),
            name_time: None,
            bytes: mib * MIB,
            source,
            broken: false,
        }
    }

    fn names(plan: &PrunePlan) -> Vec<String> {
        plan.remove
            .iter()
            .map(|r| format!("{}/{}/{}", r.namespace, r.container, r.path.file_name().unwrap().to_string_lossy()))
            .collect()
    }

    fn decide_(
        entries: &[Entry],
        keep: u32,
        max_mib: Option<u64>,
        protect: &[&str],
        incoming: Option<Incoming<'_>>,
    ) -> Result<PrunePlan, RetentionError> {
        let protect: HashSet<PathBuf> = protect.iter().map(|p| PathBuf::from(format!("/store/{p}"))).collect();
        decide(Path::new("/store"), entries, &RetentionPolicy::new(keep, max_mib.map(|m| m * MIB)), &protect, incoming)
    }

    #[test]
    fn keep_applies_per_container_and_broken_ones_never_count() {
        let mut broken_new = entry("a", "c1", "b-new", 1, 1, Source::Local);
        broken_new.broken = true;
        let entries = vec![
            entry("a", "c1", "3", 10, 1, Source::Local),
            entry("a", "c1", "1", 1000, 1, Source::Local),
            entry("a", "c1", "2", 100, 1, Source::Local),
            broken_new,
            entry("a", "c2", "1", 1000, 1, Source::Local),
            entry("b", "c1", "1", 2000, 1, Source::Local),
            entry("b", "c1", "2", 20, 1, Source::Pulled),
        ];
        let plan = decide_(&entries, 2, None, &[], None).unwrap();
        assert_eq!(names(&plan), ["a/c1/1"]);
        assert!(plan.remove.iter().all(|r| r.reason == Reason::Keep));
        let plan = decide_(&entries, 1, None, &[], None).unwrap();
        assert_eq!(names(&plan), ["a/c1/2", "a/c1/1", "b/c1/1"]);
        // The incoming checkpoint is its container's newest: one place fewer for the others.
        let incoming = Incoming { namespace: "a", container: "c2", bytes: MIB };
        assert_eq!(
            names(&decide_(&entries, 1, None, &[], Some(incoming)).unwrap()),
            ["a/c1/2", "a/c1/1", "a/c2/1", "b/c1/1"]
        );
        // Protected: never removed.
        assert_eq!(names(&decide_(&entries, 1, None, &["a/c1/2"], None).unwrap()), ["a/c1/1", "b/c1/1"]);
        assert!(decide_(&entries, 0, None, &[], None).unwrap().remove.is_empty());
    }

    #[test]
    fn max_bytes_prunes_pulled_then_imported_then_local_oldest_first() {
        let mut broken = entry("a", "c3", "b", 1, 2, Source::Local);
        broken.broken = true;
        let entries = vec![
            entry("a", "c1", "l-old", 500, 2, Source::Local),
            entry("a", "c1", "l-new", 10, 2, Source::Local),
            entry("a", "c2", "l-only", 900, 2, Source::Local),
            entry("a", "c1", "i-old", 800, 2, Source::Imported),
            entry("a", "c4", "i-new", 5, 2, Source::Imported),
            entry("a", "c1", "p-new", 1, 2, Source::Pulled),
            entry("a", "c5", "p-old", 700, 2, Source::Pulled),
            broken,
        ];
        // 16 MiB held; each step frees 2 MiB.
        let order = ["a/c3/b", "a/c5/p-old", "a/c1/p-new", "a/c1/i-old", "a/c4/i-new", "a/c1/l-old"];
        for (max, n) in [(16, 0), (15, 1), (12, 2), (8, 4), (4, 6)] {
            let plan = decide_(&entries, 0, Some(max), &[], None).unwrap();
            assert_eq!(names(&plan), order[..n], "max_bytes {max} MiB");
            assert_eq!(
                (plan.held_bytes, plan.after_bytes, plan.over_limit),
                (16 * MIB, (16 - 2 * n as u64) * MIB, false)
            );
            assert!(plan.remove.iter().all(|r| r.reason == Reason::MaxBytes));
        }
        // Each container's newest local checkpoint stays, even over the limit.
        let plan = decide_(&entries, 0, Some(1), &[], None).unwrap();
        assert_eq!(names(&plan), order);
        assert!(plan.over_limit && plan.after_bytes == 4 * MIB);
        // keep first (whatever their origin: c1's newest is the pulled copy), then max_bytes.
        let plan = decide_(&entries, 1, Some(8), &[], None).unwrap();
        assert_eq!(names(&plan), ["a/c1/l-new", "a/c1/l-old", "a/c1/i-old", "a/c3/b"]);
        let reasons: Vec<Reason> = plan.remove.iter().map(|r| r.reason).collect();
        assert_eq!(reasons, [Reason::Keep, Reason::Keep, Reason::Keep, Reason::MaxBytes]);
    }

    #[test]
    fn a_checkpoint_that_cannot_fit_is_refused_with_the_numbers() {
        let entries = vec![
            entry("a", "c1", "old", 100, 3, Source::Local),
            entry("a", "c1", "new", 10, 4, Source::Local),
            entry("a", "c2", "only", 10, 5, Source::Local),
            entry("a", "c9", "pulled", 10, 1, Source::Pulled),
        ];
        // c1's next checkpoint replaces its newest: everything of c1 and the pulled copy can go.
        let c1 = |mib| Some(Incoming { namespace: "a", container: "c1", bytes: mib * MIB });
        let plan = decide_(&entries, 0, Some(12), &[], c1(7)).unwrap();
        assert_eq!(names(&plan), ["a/c9/pulled", "a/c1/old", "a/c1/new"]);
        assert_eq!(plan.after_bytes, 12 * MIB);
        let err = decide_(&entries, 0, Some(12), &[], c1(8)).unwrap_err();
        assert!(
            matches!(err, RetentionError::CannotFit { incoming, max_bytes, held, freeable, .. }
                if (incoming, max_bytes, held, freeable) == (8 * MIB, 12 * MIB, 13 * MIB, 8 * MIB)),
            "{err}"
        );
        let text = err.to_string();
        for part in
            ["about 8.0 MiB (8388608 bytes)", "max_bytes is 12.0 MiB", "holds 13.0 MiB", "could free 8.0 MiB", "/store"]
        {
            assert!(text.contains(part), "{part}: {text}");
        }
        // Another container's checkpoint: c1's newest is its way back and stays.
        let c3 = Some(Incoming { namespace: "a", container: "c3", bytes: 3 * MIB });
        assert!(decide_(&entries, 0, Some(12), &[], c3).is_ok());
        let c3 = Some(Incoming { namespace: "a", container: "c3", bytes: 4 * MIB });
        assert!(
            matches!(decide_(&entries, 0, Some(12), &[], c3), Err(RetentionError::CannotFit { freeable, .. }) if freeable == 4 * MIB)
        );
        // Protected ones stay too.
        assert!(decide_(&entries, 0, Some(12), &["a/c1/old"], c1(7)).is_err());
    }

    /// A committed checkpoint `ns/container/name` of `bytes` in its images, created `age` ago.
    fn commit(
        store: &Store,
        ns: &str,
        container: &str,
        name: &str,
        age: u64,
        bytes: usize,
        origin: Option<Origin>,
    ) -> PathBuf {
        let target = store.root().join(ns).join(container).join(name);
        let p = PartialCheckpoint::begin(&target).unwrap();
        fs::write(p.images_dir().join(INVENTORY_FILE), b"inventory").unwrap();
        fs::write(p.images_dir().join("pages-1.img"), vec![7u8; bytes]).unwrap();
        if let Some(o) = origin {
            write_origin(p.dir(), &o).unwrap();
        }
        let mut m = sample();
        m.namespace = ns.into();
        m.container_id = container.into();
        m.created = humantime::format_rfc3339_seconds(SystemTime::now() - Duration::from_secs(age)).to_string();
        p.commit(m).unwrap();
        target
    }

    #[test]
    fn a_store_is_planned_by_origin_and_pruned_through_hidden_renames() {
        let tmp = tempfile::tempdir().unwrap();
        let store = Store::new(tmp.path().join("store"));
        let pulled =
            Origin::Pull { reference: "registry.test/a:1".into(), digest: format!("sha256:{}", "0".repeat(64)) };
        let imported = Origin::Import { archive: "/tmp/a.tar".into() };
        let l1 = commit(&store, "ns", "c1", "l1", 300, 1 << 20, None);
        let l2 = commit(&store, "ns", "c1", "l2", 200, 1 << 20, None);
        let l3 = commit(&store, "ns", "c1", "l3", 100, 1 << 20, None);
        let p = commit(&store, "ns", "c2", "p", 50, 1 << 20, Some(pulled));
        let i = commit(&store, "ns", "c3", "i", 400, 1 << 20, Some(imported));
        let policy = RetentionPolicy::new(2, Some(3 << 20));
        let plan = plan_prune(&store, &policy, std::slice::from_ref(&l3), None).unwrap();
        let removed: Vec<(&Path, Reason, Source)> =
            plan.remove.iter().map(|r| (r.path.as_path(), r.reason, r.source)).collect();
        assert_eq!(
            removed,
            [
                (l1.as_path(), Reason::Keep, Source::Local),
                (p.as_path(), Reason::MaxBytes, Source::Pulled),
                (i.as_path(), Reason::MaxBytes, Source::Imported)
            ]
        );
        assert!(plan.remove.iter().all(|r| !r.broken && r.bytes > 1 << 20));
        assert!(plan.after_bytes <= 3 << 20 && !plan.over_limit, "{plan:?}");
        assert!(apply(&plan).is_empty());
        let left: Vec<PathBuf> = store.list().unwrap().into_iter().map(|(p, _)| p).collect();
        assert_eq!(left, [l2.clone(), l3.clone()]);
        // Nothing half-removed is left beside them, and a second apply finds them gone.
        let c1: Vec<_> = fs::read_dir(l3.parent().unwrap()).unwrap().flatten().map(|e| e.file_name()).collect();
        assert_eq!(c1.len(), 2, "{c1:?}");
        assert!(apply(&plan).is_empty());
        // The next checkpoint of c1 (2 MiB) fits once l2 goes; 3 MiB does not.
        let c1 = |mib: u64| Some(Incoming { namespace: "ns", container: "c1", bytes: mib << 20 });
        assert!(plan_prune(&store, &policy, &[], c1(1)).is_ok());
        let err = plan_prune(&store, &policy, &[l2], c1(2)).unwrap_err();
        assert!(err.to_string().contains("max_bytes is 3.0 MiB (3145728 bytes)"), "{err}");
        // No limits: nothing is even listed.
        assert_eq!(
            plan_prune(&Store::new("/nonexistent"), &RetentionPolicy::default(), &[], c1(9)).unwrap(),
            PrunePlan::default()
        );
    }
}
