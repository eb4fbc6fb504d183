//! Property tests: what runc tolerates, the decision tolerates. Adding fields the spec does not
//! define, anywhere, or values no runtime-spec release defines yet in enum-like fields, never
//! changes the runtime decision and never makes it fail (issue 23: "never refuse what runc runs").

mod common;

use std::path::Path;

use common::FakeRuntimes;
use kybernate_runtime_select::{Config, Context, Decision, Selector};
use proptest::prelude::*;
use serde_json::{json, Value};

/// Real specs: the Kubernetes fixtures (CPU and GPU) and `runc spec`'s shape with a GPU env.
fn bases() -> Vec<Value> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    let mut v: Vec<Value> = ["k8s-cpu-config.json", "k8s-gpu-config.json"]
        .iter()
        .map(|f| serde_json::from_slice(&std::fs::read(dir.join(f)).unwrap()).unwrap())
        .collect();
    v.push(json!({
        "ociVersion": "1.0.2-dev",
        "process": {"terminal": true, "user": {"uid": 0, "gid": 0}, "args": ["sh"],
            "env": ["PATH=/usr/bin", "TERM=xterm", "NVIDIA_VISIBLE_DEVICES=all"], "cwd": "/",
            "capabilities": {"bounding": ["CAP_AUDIT_WRITE", "CAP_KILL"], "effective": ["CAP_KILL"]},
            "rlimits": [{"type": "RLIMIT_NOFILE", "hard": 1024, "soft": 1024}], "noNewPrivileges": true},
        "root": {"path": "rootfs", "readonly": true},
        "hostname": "runc",
        "mounts": [{"destination": "/proc", "type": "proc", "source": "proc"}],
        "linux": {"namespaces": [{"type": "pid"}, {"type": "mount"}],
            "maskedPaths": ["/proc/kcore"], "readonlyPaths": ["/proc/bus"]}
    }));
    v
}

/// One mutation of a spec that runc (Go's encoding/json, runc 1.1's lenient capability and
/// personality handling) accepts or rejects on its own, and that must not move our decision.
#[derive(Debug, Clone)]
enum Mutation {
    /// A field no release defines, at a path of objects (created where missing).
    UnknownField { at: Vec<String>, key: String, value: Value },
    /// A value no release defines yet, in an enum-like field.
    FutureValue { field: usize, value: String },
}

/// Enum-like fields (JSON pointers to arrays we append to, or strings we set).
const ENUM_FIELDS: &[(&str, bool)] = &[
    ("/process/capabilities/bounding", true),
    ("/process/capabilities/effective", true),
    ("/process/capabilities/permitted", true),
    ("/process/capabilities/ambient", true),
    ("/linux/personality/domain", false),
    ("/linux/seccomp/defaultAction", false),
    ("/linux/seccomp/architectures", true),
    ("/linux/rootfsPropagation", false),
    ("/process/ioPriority/class", false),
    ("/process/scheduler/policy", false),
    ("/process/apparmorProfile", false),
    ("/linux/mountLabel", false),
];

const KNOWN_TOP: &[&str] =
    &["ociVersion", "process", "root", "hostname", "mounts", "linux", "annotations", "hooks", "domainname"];

fn arb_leaf() -> impl Strategy<Value = Value> {
    prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(|n| json!(n)),
        "[ -~]{0,16}".prop_map(Value::String),
        prop::collection::vec("[a-z]{0,6}".prop_map(Value::String), 0..3).prop_map(Value::Array),
    ]
}

fn arb_mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        (
            prop::collection::vec(prop_oneof![Just("process"), Just("linux"), Just("root"), Just("x")], 0..3),
            "[a-z][a-zA-Z]{0,10}",
            arb_leaf()
        )
            .prop_map(|(at, key, value)| Mutation::UnknownField {
                at: at.into_iter().map(str::to_string).collect(),
                key: format!("future{key}"),
                value
            }),
        (0..ENUM_FIELDS.len(), "[A-Z][A-Z_0-9]{0,20}")
            .prop_map(|(field, v)| Mutation::FutureValue { field, value: format!("FUTURE_{v}") }),
    ]
}

fn object_at<'a>(spec: &'a mut Value, at: &[String]) -> &'a mut serde_json::Map<String, Value> {
    // Stop before a known field of another shape: mutate beside it instead.
    let mut depth = 0;
    let mut probe: &Value = spec;
    for seg in at {
        match probe.get(seg) {
            Some(v) if v.is_object() => probe = v,
            Some(_) => break,
            None => {
                depth = at.len();
                break;
            }
        }
        depth += 1;
    }
    let mut cur = spec;
    for seg in &at[..depth] {
        cur = cur.as_object_mut().unwrap().entry(seg.clone()).or_insert_with(|| json!({}));
    }
    cur.as_object_mut().unwrap()
}

fn apply(spec: &mut Value, m: &Mutation) {
    match m {
        Mutation::UnknownField { at, key, value } => {
            // `x` stands for an unknown object at the top level.
            let at: Vec<String> =
                at.iter().map(|s| if s == "x" { "futureSection".into() } else { s.clone() }).collect();
            let obj = object_at(spec, &at);
            if !KNOWN_TOP.contains(&key.as_str()) {
                obj.insert(key.clone(), value.clone());
            }
        }
        Mutation::FutureValue { field, value } => {
            let (pointer, is_array) = ENUM_FIELDS[*field];
            let segs: Vec<String> = pointer.trim_start_matches('/').split('/').map(str::to_string).collect();
            let (last, parents) = segs.split_last().unwrap();
            let obj = object_at(spec, parents);
            if is_array {
                let arr = obj.entry(last.clone()).or_insert_with(|| json!([]));
                if let Some(a) = arr.as_array_mut() {
                    a.push(Value::String(value.clone()));
                }
            } else {
                obj.insert(last.clone(), Value::String(value.clone()));
            }
        }
    }
}

fn decide(rt: &FakeRuntimes, spec: &Value) -> Decision {
    let selector = Selector {
        config: Config::default(),
        config_path: "/etc/kybernate/config.toml".into(),
        context: Context { search_path: Some(rt.dir.path().as_os_str().to_owned()), ..Context::default() },
    };
    let b = tempfile::tempdir().unwrap();
    std::fs::write(b.path().join("config.json"), serde_json::to_vec(spec).unwrap()).unwrap();
    selector.select_bundle(b.path()).unwrap_or_else(|e| panic!("the decision failed: {e}\n{spec}"))
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn unknown_fields_and_future_values_never_change_or_fail_the_decision(
        base in 0usize..3,
        mutations in prop::collection::vec(arb_mutation(), 1..8),
    ) {
        let rt = FakeRuntimes::new();
        let original = bases().swap_remove(base);
        let before = decide(&rt, &original);
        let mut spec = original.clone();
        for m in &mutations {
            apply(&mut spec, m);
        }
        let after = decide(&rt, &spec);
        prop_assert_eq!(
            (&before.runtime, before.gpu, before.source, &before.evidence),
            (&after.runtime, after.gpu, after.source, &after.evidence),
            "mutations {:?}", mutations
        );
    }
}

/// The examples measured in issue 23, spelled out: each was refused at create with
/// `malformed OCI runtime spec` before the lenient view.
#[test]
fn the_measured_refusals_now_decide() {
    let rt = FakeRuntimes::new();
    for (field, value) in [
        ("/process/capabilities/bounding", json!(["CAP_CHECKPOINT_RESTORE", "CAP_FUTURE_42"])),
        ("/linux/personality", json!({"domain": "LINUX_FUTURE", "flags": ["FUTURE"]})),
        ("/linux/namespaces", json!([{"type": "future"}])),
        ("/process/user", Value::Null),
    ] {
        for base in bases() {
            let before = decide(&rt, &base);
            let mut spec = base.clone();
            let segs: Vec<String> = field.trim_start_matches('/').split('/').map(str::to_string).collect();
            let (last, parents) = segs.split_last().unwrap();
            let obj = object_at(&mut spec, parents);
            if value.is_null() {
                obj.remove(last);
            } else {
                obj.insert(last.clone(), value.clone());
            }
            let after = decide(&rt, &spec);
            assert_eq!((before.runtime, before.gpu), (after.runtime, after.gpu), "{field}");
        }
    }
}
