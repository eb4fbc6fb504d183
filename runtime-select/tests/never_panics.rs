//! Property tests: no input makes selection panic (it runs inside the shim,
//! where a panic orphans containers).

mod common;

use std::path::Path;

use common::FakeRuntimes;
use kybernate_runtime_select::{load_spec, Config, Context, Selector};
use proptest::prelude::*;
use serde_json::{json, Map, Value};

fn arb_json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(|n| json!(n)),
        any::<f64>().prop_filter("finite", |f| f.is_finite()).prop_map(|f| json!(f)),
        ".*".prop_map(Value::String),
    ];
    leaf.prop_recursive(4, 64, 8, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..8).prop_map(Value::Array),
            prop::collection::hash_map("[a-zA-Z]{0,12}", inner, 0..8)
                .prop_map(|m| Value::Object(m.into_iter().collect::<Map<_, _>>())),
        ]
    })
}

/// Specs shaped like real ones, with hostile strings where evidence is read.
fn arb_spec() -> impl Strategy<Value = Value> {
    let key = prop_oneof![Just("NVIDIA_VISIBLE_DEVICES".to_string()), "[A-Z_]{0,8}"];
    let env = prop::collection::vec((key, ".*").prop_map(|(k, v)| format!("{k}={v}")), 0..6);
    let ann_key = prop_oneof![Just("cdi.k8s.io/x".to_string()), Just("kybernate.io/runtime".to_string()), ".*"];
    let annotations = prop::collection::hash_map(ann_key, ".*", 0..4);
    let path =
        prop_oneof![Just("/dev/nvidia0".to_string()), Just("/var/run/nvidia-container-devices/a".to_string()), ".*"];
    let device = (path.clone(), any::<i64>(), prop_oneof![Just("c"), Just("b"), Just("u"), Just("p")])
        .prop_map(|(p, major, t)| json!({"path": p, "type": t, "major": major, "minor": 0}));
    let mount = (path.clone(), prop::option::of(path)).prop_map(|(d, s)| json!({"destination": d, "source": s}));
    (env, annotations, prop::collection::vec(device, 0..4), prop::collection::vec(mount, 0..4)).prop_map(
        |(env, ann, devices, mounts)| {
            json!({
                "ociVersion": "1.0.2",
                "process": {"user": {"uid": 0, "gid": 0}, "args": ["sh"], "env": env, "cwd": "/"},
                "annotations": ann,
                "linux": {"devices": devices},
                "mounts": mounts
            })
        },
    )
}

fn selector(rt: &FakeRuntimes, override_on: bool) -> Selector {
    let toml =
        format!("[runtime]\nallow_annotation_override = {override_on}\nallowed = [\"runc\", \"\", \"/\", \"..\"]\n");
    Selector {
        config: Config::parse(&toml, Path::new("t.toml")).unwrap(),
        config_path: "t.toml".into(),
        context: Context { search_path: Some(rt.dir.path().as_os_str().to_owned()), ..Context::default() },
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn arbitrary_json_never_panics(v in arb_json(), override_on in any::<bool>()) {
        let rt = FakeRuntimes::new();
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("config.json"), serde_json::to_vec(&v).unwrap()).unwrap();
        let _ = selector(&rt, override_on).select_bundle(dir.path());
    }

    #[test]
    fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("config.json"), &bytes).unwrap();
        let _ = load_spec(dir.path());
    }

    #[test]
    fn spec_shaped_json_never_panics_and_always_decides_or_explains(v in arb_spec(), override_on in any::<bool>()) {
        let rt = FakeRuntimes::new();
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("config.json"), serde_json::to_vec(&v).unwrap()).unwrap();
        match selector(&rt, override_on).select_bundle(dir.path()) {
            Ok(d) => prop_assert!(d.runtime.is_absolute()),
            Err(e) => prop_assert!(!e.to_string().is_empty()),
        }
    }

    #[test]
    fn arbitrary_config_text_never_panics(text in ".*") {
        let _ = Config::parse(&text, Path::new("t.toml"));
    }
}
