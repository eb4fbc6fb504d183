//! The node's retention limits around a checkpoint into its store (`[checkpoint] keep`,
//! `max_bytes`): one that could not fit is refused before anything is frozen, and once one is
//! committed the checkpoints the limits give up are removed. The library's
//! [`retention`](kybernate_checkpoint::retention) decides both; here is only when.

use std::path::{Component, Path};

use kybernate_checkpoint::retention::{self, Incoming, RetentionError, RetentionPolicy};
use kybernate_checkpoint::Store;
use log::{info, warn};

use crate::container::Container;
use crate::error::CheckpointError;

/// The store, the limits and the checkpoint's `<namespace>/<container>`, when a limit is set and
/// `target` is a checkpoint directory of the node's store (containerd's own dir or any other
/// place holds no store to keep within limits).
fn in_store(c: &Container, target: &Path) -> Option<(Store, RetentionPolicy, String, String)> {
    let config = &c.checkpoint_config;
    let policy = RetentionPolicy::new(config.keep, config.max_bytes);
    if policy.is_unlimited() {
        return None;
    }
    let root = std::fs::canonicalize(&config.root).unwrap_or_else(|_| config.root.clone());
    let rel = target.strip_prefix(&root).or_else(|_| target.strip_prefix(&config.root)).ok()?;
    let parts: Option<Vec<&str>> = rel
        .components()
        .map(|c| match c {
            Component::Normal(s) => s.to_str(),
            _ => None,
        })
        .collect();
    let [namespace, container, _] = parts?[..] else { return None };
    Some((Store::new(root), policy, namespace.to_string(), container.to_string()))
}

/// Refuses a checkpoint of `c` into `target` of about `bytes` (the memory to dump plus the
/// container's file changes, as the disk check estimates it) that `max_bytes` has no room for
/// even after pruning, with the numbers; called before anything is frozen. A store that cannot
/// be listed refuses nothing here (the checkpoint's own writes will tell).
pub fn check_fits(c: &Container, bytes: u64, target: &Path) -> Result<(), CheckpointError> {
    let Some((store, policy, namespace, container)) = in_store(c, target) else { return Ok(()) };
    if policy.max_bytes.is_none() {
        return Ok(());
    }
    let incoming = Incoming { namespace: &namespace, container: &container, bytes };
    match retention::plan_prune(&store, &policy, &[], Some(incoming)) {
        Ok(_) => Ok(()),
        Err(e @ RetentionError::CannotFit { .. }) => {
            Err(CheckpointError::Retention { id: c.id.clone(), source: Box::new(e) })
        }
        Err(e) => {
            warn!("container {}: retention: cannot tell whether the checkpoint fits: {e}", c.id);
            Ok(())
        }
    }
}

/// After the checkpoint `target` of `c` was committed: removes what the limits give up (never
/// `target`). Best effort: the checkpoint is done, a failure here is only logged.
pub fn prune_after_commit(c: &Container, target: &Path) {
    let Some((store, policy, ..)) = in_store(c, target) else { return };
    let plan = match retention::plan_prune(&store, &policy, &[target.to_path_buf()], None) {
        Ok(plan) => plan,
        Err(e) => {
            warn!("container {}: retention: cannot plan pruning of {}: {e}", c.id, store.root().display());
            return;
        }
    };
    for r in &plan.remove {
        info!(
            "container {}: retention ({:?}): removing {} ({} bytes, {:?}{})",
            c.id,
            r.reason,
            r.path.display(),
            r.bytes,
            r.source,
            if r.broken { ", broken" } else { "" }
        );
    }
    for (path, e) in retention::apply(&plan) {
        warn!("container {}: retention: cannot remove {}: {e}", c.id, path.display());
    }
    if plan.over_limit {
        warn!(
            "container {}: the store {} holds {} bytes after pruning, above [checkpoint] max_bytes ({:?}): what is left \
             is protected or some container's newest checkpoint",
            c.id,
            store.root().display(),
            plan.after_bytes,
            policy.max_bytes
        );
    }
}
