//! Talking to containerd: the connection, namespaces, our runtime's name, and containerd's gRPC
//! errors as the CLI's errors. Shared by every command that calls containerd (`checkpoint`,
//! `restore`, pod resolution, `doctor`); it imports no command.

use std::path::Path;

use containerd_client::services::v1::namespaces_client::NamespacesClient;
use containerd_client::services::v1::ListNamespacesRequest;
use containerd_client::tonic::transport::Channel;
use containerd_client::tonic::{Code, Status};

use crate::error::CliError;

/// Our runtime: only its shim writes checkpoints into the store.
pub const RUNTIME: &str = "io.containerd.kybernate.v1";
/// The namespace of Kubernetes' containers, the default when containerd has it.
const K8S_NAMESPACE: &str = "k8s.io";

/// The one-thread async runtime a containerd call runs on (the CLI does one thing at a time).
pub fn async_runtime() -> Result<tokio::runtime::Runtime, CliError> {
    tokio::runtime::Builder::new_current_thread()
        .enable_io()
        // `checkpoint` polls the store when containerd's answer is lost.
        .enable_time()
        .build()
        .map_err(|e| CliError::Failed(format!("cannot start the async runtime: {e}; please report this as a bug")))
}

/// A channel to containerd at `address`; a failure says why with the whole error chain.
pub async fn connect(address: &Path) -> Result<Channel, CliError> {
    containerd_client::connect(address)
        .await
        .map_err(|e| CliError::Unreachable { address: address.to_path_buf(), reason: chain(&e) })
}

/// `k8s.io` when containerd has that namespace (a Kubernetes node), else `default`.
pub async fn default_namespace(channel: Channel) -> Result<String, Status> {
    let list = NamespacesClient::new(channel).list(ListNamespacesRequest { filter: String::new() }).await?;
    let k8s = list.into_inner().namespaces.iter().any(|n| n.name == K8S_NAMESPACE);
    Ok(if k8s { K8S_NAMESPACE } else { "default" }.into())
}

/// containerd's namespace rule (letters, digits, and `.`, `_`, `-` between them), checked here so
/// that a bad `--namespace` is a usage error rather than an invalid gRPC header.
pub fn check_namespace(ns: &str) -> Result<(), CliError> {
    if !kybernate_checkpoint::manifest::valid_identifier(ns) {
        return Err(CliError::Usage(format!(
            "invalid containerd namespace {ns:?}: letters and digits, separated by '.', '_' or '-'; e.g. -n k8s.io"
        )));
    }
    Ok(())
}

/// A gRPC error other than the ones a command expects (not found).
pub fn grpc_error(address: &Path, what: &str, s: Status) -> CliError {
    match s.code() {
        Code::Unavailable => CliError::Unreachable { address: address.to_path_buf(), reason: s.message().into() },
        code => CliError::Failed(format!(
            "containerd at {} could not {what}: {} ({code:?}); check containerd's log",
            address.display(),
            s.message()
        )),
    }
}

/// An error and its sources, joined with ": " (tonic's transport error alone says only "transport error").
pub fn chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let s_text = s.to_string();
        if !text.ends_with(&s_text) {
            text.push_str(": ");
            text.push_str(&s_text);
        }
        source = s.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn namespaces_are_checked() {
        for good in ["k8s.io", "default", "kyb-test_1"] {
            assert!(check_namespace(good).is_ok(), "{good}");
        }
        for bad in ["", "a..b", "-a", "a b", "a\nb", "ns/x"] {
            assert!(check_namespace(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn an_unavailable_containerd_is_unreachable_and_other_errors_name_the_step() {
        let at = Path::new("/run/containerd/containerd.sock");
        assert!(matches!(grpc_error(at, "get the task", Status::unavailable("gone")), CliError::Unreachable { .. }));
        let e = grpc_error(at, "get the task", Status::internal("boom")).to_string();
        assert!(e.contains("could not get the task: boom (Internal)"), "{e}");
    }
}
