//! `kybernate checkpoint --pod/--pod-namespace/--container` end to end on the test bed: the
//! container is found by the CRI labels (set here with `ctr run --label`, as CRI would).
//!
//! Needs our shim built (`cargo build -p containerd-shim-kybernate-v1`): see common/mod.rs.

mod common;

use std::path::PathBuf;

use common::{bed, task_status, text, COUNTER, RUNTIME};
use kybernate_testbed::{unique_name, IMAGE};
use serde_json::Value;

#[test]
fn checkpoint_by_pod_labels() {
    let bed = bed();
    let tb = &bed.tb;

    let id = unique_name("pod");
    let labels = [
        "--label",
        "io.kubernetes.pod.name=web",
        "--label",
        "io.kubernetes.pod.namespace=team-a",
        "--label",
        "io.kubernetes.container.name=app",
    ];
    let mut run = vec!["run", "-d", "--runtime", RUNTIME];
    run.extend(labels);
    run.extend([IMAGE, id.as_str(), "sh", "-c", COUNTER]);
    tb.ctr_ok(&run);
    bed.wait_running(&id);
    // A stopped container of an earlier run of the same pod container: the running one wins.
    let old = unique_name("pod-old");
    let mut create = vec!["containers", "create", "--runtime", RUNTIME];
    create.extend(labels);
    create.extend([IMAGE, old.as_str(), "true"]);
    tb.ctr_ok(&create);

    let out =
        bed.kybernate(&["checkpoint", "--pod", "web", "--pod-namespace", "team-a", "--container", "app", "-o", "json"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let cp: Value = serde_json::from_slice(&out.stdout).expect("JSON");
    assert_eq!(cp["container"], id.as_str(), "{cp}");
    assert_eq!(cp["status"], "ok", "{cp}");
    assert!(PathBuf::from(cp["path"].as_str().unwrap()).join("checkpoint/inventory.img").is_file());
    assert_eq!(task_status(tb, &id).as_deref(), Some("RUNNING"));

    // Unknown pod, unknown container, wrong pod namespace (the default one): exit 2.
    for args in [
        &["--pod", "nope", "--pod-namespace", "team-a", "--container", "app"][..],
        &["--pod", "web", "--pod-namespace", "team-a", "--container", "nope"][..],
        &["--pod", "web", "--container", "app"][..],
    ] {
        let mut all = vec!["checkpoint"];
        all.extend(args);
        let out = bed.kybernate(&all);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {}", text(&out.stderr));
        assert!(text(&out.stderr).starts_with("kybernate: no container "), "{}", text(&out.stderr));
    }
    // Usage: --pod needs --container; a CONTAINER and --pod exclude each other.
    assert_eq!(bed.kybernate(&["checkpoint", "--pod", "web"]).status.code(), Some(2));
    assert_eq!(bed.kybernate(&["checkpoint", &id, "--pod", "web", "--container", "app"]).status.code(), Some(2));
    assert_eq!(bed.kybernate(&["checkpoint"]).status.code(), Some(2));

    bed.remove(&id);
    tb.ctr_ok(&["containers", "delete", &old]);
}
