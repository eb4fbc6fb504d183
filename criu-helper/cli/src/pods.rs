//! Kubernetes pods to containerd containers: CRI labels every container it creates with its
//! pod's name and namespace and its container name; `--pod NAME --pod-namespace NS --container
//! NAME` finds the containerd container id through them (used by `checkpoint`, for `restore` too).

use std::path::Path;

use containerd_client::services::v1::containers_client::ContainersClient;
use containerd_client::services::v1::tasks_client::TasksClient;
use containerd_client::services::v1::{GetRequest, ListContainersRequest};
use containerd_client::tonic::transport::Channel;
use containerd_client::tonic::{Code, Request};
use containerd_client::types::v1::Status as TaskStatus;
use containerd_client::with_namespace;

use crate::containerd::grpc_error;
use crate::error::CliError;

pub const POD_NAME_LABEL: &str = "io.kubernetes.pod.name";
pub const POD_NAMESPACE_LABEL: &str = "io.kubernetes.pod.namespace";
pub const CONTAINER_NAME_LABEL: &str = "io.kubernetes.container.name";
/// `--pod-namespace`'s default, like kubectl's.
pub const DEFAULT_POD_NAMESPACE: &str = "default";

/// A container of a Kubernetes pod, by names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodContainer {
    pub pod: String,
    pub pod_namespace: String,
    pub container: String,
}

impl std::fmt::Display for PodContainer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "container {} in pod {}/{}", self.container, self.pod_namespace, self.pod)
    }
}

/// containerd's filter for the three CRI labels (values quoted, so any characters are safe).
pub fn label_filter(p: &PodContainer) -> String {
    [(POD_NAME_LABEL, &p.pod), (POD_NAMESPACE_LABEL, &p.pod_namespace), (CONTAINER_NAME_LABEL, &p.container)]
        .iter()
        .map(|(label, value)| format!("labels.\"{label}\"=={}", quote(value)))
        .collect::<Vec<_>>()
        .join(",")
}

/// A double-quoted filter value (containerd's filter syntax takes Go-style quoted strings).
fn quote(value: &str) -> String {
    let mut q = String::with_capacity(value.len() + 2);
    q.push('"');
    for c in value.chars() {
        match c {
            '"' | '\\' => {
                q.push('\\');
                q.push(c);
            }
            c => q.push(c),
        }
    }
    q.push('"');
    q
}

/// The containerd id of `p` in namespace `ns`. Several matches (a restarted container leaves its
/// old ones until the kubelet removes them): the one whose task is running; none running, or
/// more than one, is an error listing them (exit 2). No match: exit 2.
pub async fn resolve(channel: Channel, address: &Path, ns: &str, p: &PodContainer) -> Result<String, CliError> {
    let mut containers = ContainersClient::new(channel.clone());
    let list = ListContainersRequest { filters: vec![label_filter(p)] };
    let found = containers
        .list(with_namespace!(list, ns))
        .await
        .map_err(|s| grpc_error(address, "list containers", s))?
        .into_inner()
        .containers;
    let mut ids: Vec<String> = found.into_iter().map(|c| c.id).collect();
    ids.sort();
    match ids.len() {
        0 => Err(CliError::Usage(format!(
            "no {p} (containerd namespace {ns:?}); check the names with `crictl ps --pod <pod id>` or `kubectl get pod -n {} {} -o wide`, or name the namespace with -n",
            p.pod_namespace, p.pod
        ))),
        1 => Ok(ids.remove(0)),
        _ => {
            let mut tasks = TasksClient::new(channel);
            let mut running = Vec::new();
            for id in &ids {
                let get = GetRequest { container_id: id.clone(), exec_id: String::new() };
                match tasks.get(with_namespace!(get, ns)).await {
                    Ok(r) if r.get_ref().process.as_ref().is_some_and(|p| p.status() == TaskStatus::Running) => {
                        running.push(id.clone())
                    }
                    Ok(_) => {}
                    Err(s) if s.code() == Code::NotFound => {}
                    Err(s) => return Err(grpc_error(address, "get a task", s)),
                }
            }
            if running.len() == 1 {
                return Ok(running.remove(0));
            }
            let what = if running.is_empty() { "none of them is running" } else { "more than one is running" };
            Err(CliError::Usage(format!(
                "{} containers match {p} ({}), and {what}; name one as CONTAINER instead of --pod",
                ids.len(),
                ids.join(", ")
            )))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filter_names_all_three_labels() {
        let p = PodContainer { pod: "web".into(), pod_namespace: "team-a".into(), container: "app".into() };
        assert_eq!(
            label_filter(&p),
            r#"labels."io.kubernetes.pod.name"=="web",labels."io.kubernetes.pod.namespace"=="team-a",labels."io.kubernetes.container.name"=="app""#
        );
        assert_eq!(quote(r#"a"b\c"#), r#""a\"b\\c""#);
        assert_eq!(p.to_string(), "container app in pod team-a/web");
    }
}
