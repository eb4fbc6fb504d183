//! Who may restore what. A checkpoint holds process memory, secrets included,
//! so restoring it into another tenant's namespace hands those secrets over.

use crate::manifest::Manifest;

/// A restore the node's policy forbids.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PolicyError {
    #[error(
        "checkpoint from namespace {from:?} cannot be restored into namespace {to:?}: set [checkpoint] \
         allow_cross_namespace_restore = true to allow it (checkpoints hold process memory, secrets included)"
    )]
    CrossNamespace { from: String, to: String },
}

/// Refuses restoring a checkpoint owned by another tenant (Kubernetes namespace) unless allowed.
/// `target_tenant` is the restoring container's pod namespace (CRI annotations) or containerd namespace.
pub fn check_namespace(
    manifest: &Manifest,
    target_tenant: &str,
    allow_cross_namespace: bool,
) -> Result<(), PolicyError> {
    let from = manifest.tenant();
    if from == target_tenant {
        return Ok(());
    }
    if allow_cross_namespace {
        log::info!("restoring checkpoint of namespace {from:?} into {target_tenant:?} (allowed by config)");
        return Ok(());
    }
    Err(PolicyError::CrossNamespace { from: from.into(), to: target_tenant.into() })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_tenant_only_unless_allowed() {
        let m = crate::manifest::sample(); // pod namespace team-a, containerd namespace k8s.io
        check_namespace(&m, "team-a", false).unwrap();
        let err = check_namespace(&m, "team-b", false).unwrap_err();
        let want = "checkpoint from namespace \"team-a\" cannot be restored into namespace \"team-b\": set [checkpoint] \
                    allow_cross_namespace_restore = true to allow it (checkpoints hold process memory, secrets included)";
        assert_eq!(err.to_string(), want);
        check_namespace(&m, "team-b", true).unwrap();
        // The containerd namespace is not the tenant when a pod namespace is known.
        assert!(check_namespace(&m, "k8s.io", false).is_err());
        let plain = Manifest { pod_namespace: None, ..m };
        check_namespace(&plain, "k8s.io", false).unwrap();
    }
}
