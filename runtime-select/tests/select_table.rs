//! The decision table: every evidence kind, every precedence level,
//! `void`/empty/`none`, malformed input and a missing GPU runtime — each a test.

mod common;

use std::path::Path;

use common::{bundle, spec, write_config, FakeRuntimes};
use kybernate_runtime_select::{BundleError, Config, ConfigError, Context, Decision, SelectError, Selector, Source};
use serde_json::{json, Value};

/// Runs the selector on `config_json` with fake runtimes on PATH.
struct Case {
    rt: FakeRuntimes,
    config: Config,
    env_override: Option<String>,
    binary_name: Option<String>,
}

impl Case {
    fn new() -> Self {
        Self { rt: FakeRuntimes::new(), config: Config::default(), env_override: None, binary_name: None }
    }

    fn config(mut self, toml: &str) -> Self {
        self.config = Config::parse(toml, Path::new("/etc/kybernate/config.toml")).unwrap();
        self
    }

    fn env(mut self, v: &str) -> Self {
        self.env_override = Some(v.into());
        self
    }

    fn binary_name(mut self, v: &str) -> Self {
        self.binary_name = Some(v.into());
        self
    }

    fn run(&self, config_json: &Value) -> Result<Decision, SelectError> {
        let selector = Selector {
            config: self.config.clone(),
            config_path: "/etc/kybernate/config.toml".into(),
            context: Context {
                env_override: self.env_override.clone(),
                binary_name: self.binary_name.clone(),
                search_path: Some(self.rt.dir.path().as_os_str().to_owned()),
            },
        };
        let b = bundle(config_json);
        selector.select_bundle(b.path())
    }

    fn ok(&self, config_json: &Value) -> Decision {
        self.run(config_json).unwrap_or_else(|e| panic!("unexpected error: {e}"))
    }

    fn assert_runtime(&self, d: &Decision, name: &str, source: Source) {
        assert_eq!(d.runtime, self.rt.path(name), "{d:?}");
        assert_eq!(d.source, source, "{d:?}");
    }
}

fn lines(d: &Decision) -> Vec<String> {
    d.evidence.iter().map(ToString::to_string).collect()
}

// ---- NVIDIA_VISIBLE_DEVICES -------------------------------------------------

#[test]
fn no_evidence_gives_default_runc() {
    let c = Case::new();
    let d = c.ok(&spec(&[], json!({})));
    c.assert_runtime(&d, "runc", Source::Default);
    assert!(!d.gpu);
    assert!(d.evidence.is_empty());
}

#[test]
fn visible_devices_all_selects_gpu_runtime() {
    let c = Case::new();
    let d = c.ok(&spec(&["NVIDIA_VISIBLE_DEVICES=all"], json!({})));
    c.assert_runtime(&d, "nvidia-container-runtime", Source::Gpu);
    assert!(d.gpu);
    assert_eq!(lines(&d), vec!["env NVIDIA_VISIBLE_DEVICES=all"]);
}

#[test]
fn visible_devices_indices_and_uuids_select_gpu_runtime() {
    let c = Case::new();
    for v in ["0,1", "GPU-8f3c7a1e-3b1d-4e0e-9a4b-0123456789ab", "MIG-GPU-1/0/0"] {
        let d = c.ok(&spec(&[&format!("NVIDIA_VISIBLE_DEVICES={v}")], json!({})));
        c.assert_runtime(&d, "nvidia-container-runtime", Source::Gpu);
        assert!(d.gpu, "{v}");
    }
}

#[test]
fn visible_devices_void_is_no_evidence() {
    let c = Case::new();
    let d = c.ok(&spec(&["NVIDIA_VISIBLE_DEVICES=void"], json!({})));
    c.assert_runtime(&d, "runc", Source::Default);
    assert!(d.evidence.is_empty());
}

#[test]
fn visible_devices_empty_is_no_evidence() {
    let c = Case::new();
    let d = c.ok(&spec(&["NVIDIA_VISIBLE_DEVICES="], json!({})));
    c.assert_runtime(&d, "runc", Source::Default);
    assert!(d.evidence.is_empty());
}

#[test]
fn visible_devices_none_wants_driver_injection_but_no_gpus() {
    let c = Case::new();
    let d = c.ok(&spec(&["NVIDIA_VISIBLE_DEVICES=none"], json!({})));
    c.assert_runtime(&d, "nvidia-container-runtime", Source::Gpu);
    assert!(!d.gpu, "none means no GPU devices");
    let l = lines(&d);
    assert_eq!(l.len(), 1);
    assert!(l[0].contains("NVIDIA_VISIBLE_DEVICES=none") && l[0].contains("driver"), "{l:?}");
}

#[test]
fn later_env_entry_overrides_earlier() {
    let c = Case::new();
    let d = c.ok(&spec(&["NVIDIA_VISIBLE_DEVICES=all", "NVIDIA_VISIBLE_DEVICES=void"], json!({})));
    c.assert_runtime(&d, "runc", Source::Default);
}

// ---- CDI annotations -----------------------------------------------------------

#[test]
fn cdi_annotation_for_nvidia_gpu_selects_gpu_runtime() {
    let c = Case::new();
    let d = c.ok(&spec(
        &[],
        json!({"annotations": {"cdi.k8s.io/nvidia-device-plugin_uid": "nvidia.com/gpu=0,nvidia.com/gpu=1"}}),
    ));
    c.assert_runtime(&d, "nvidia-container-runtime", Source::Gpu);
    assert!(d.gpu);
    assert_eq!(
        lines(&d),
        vec![
            "annotation cdi.k8s.io/nvidia-device-plugin_uid requests CDI device nvidia.com/gpu=0",
            "annotation cdi.k8s.io/nvidia-device-plugin_uid requests CDI device nvidia.com/gpu=1",
        ]
    );
}

#[test]
fn cdi_annotation_for_other_vendor_is_no_evidence() {
    let c = Case::new();
    let d = c.ok(&spec(
        &[],
        json!({"annotations": {"cdi.k8s.io/fpga": "vendor.com/fpga=0", "other/x": "nvidia.com/gpu=0"}}),
    ));
    c.assert_runtime(&d, "runc", Source::Default);
    assert!(d.evidence.is_empty());
}

// ---- linux.devices ---------------------------------------------------------------

#[test]
fn char_device_major_195_selects_gpu_runtime() {
    let c = Case::new();
    let d =
        c.ok(&spec(&[], json!({"linux": {"devices": [{"path": "/dev/gpu0", "type": "c", "major": 195, "minor": 0}]}})));
    c.assert_runtime(&d, "nvidia-container-runtime", Source::Gpu);
    assert_eq!(lines(&d), vec!["linux.devices: /dev/gpu0 (major 195)"]);
}

#[test]
fn dev_nvidia_path_with_dynamic_major_selects_gpu_runtime() {
    let c = Case::new();
    let d = c.ok(&spec(
        &[],
        json!({"linux": {"devices": [{"path": "/dev/nvidia-uvm", "type": "c", "major": 508, "minor": 0}]}}),
    ));
    c.assert_runtime(&d, "nvidia-container-runtime", Source::Gpu);
}

#[test]
fn unrelated_and_block_devices_are_no_evidence() {
    let c = Case::new();
    let devices = json!([
        {"path": "/dev/fuse", "type": "c", "major": 10, "minor": 229},
        {"path": "/dev/sdz", "type": "b", "major": 195, "minor": 0}
    ]);
    let d = c.ok(&spec(&[], json!({"linux": {"devices": devices}})));
    c.assert_runtime(&d, "runc", Source::Default);
}

// ---- mounts ---------------------------------------------------------------------------

#[test]
fn mount_of_dev_nvidia_selects_gpu_runtime() {
    let c = Case::new();
    for m in [
        json!({"destination": "/dev/nvidia0", "type": "bind", "source": "/dev/nvidia0", "options": ["bind"]}),
        json!({"destination": "/gpu", "type": "bind", "source": "/dev/nvidiactl", "options": ["bind"]}),
    ] {
        let d = c.ok(&spec(&[], json!({"mounts": [m]})));
        c.assert_runtime(&d, "nvidia-container-runtime", Source::Gpu);
        assert!(lines(&d)[0].starts_with("mount "), "{:?}", lines(&d));
    }
}

#[test]
fn mount_under_device_list_dir_selects_gpu_runtime() {
    let c = Case::new();
    let m = json!({"destination": "/var/run/nvidia-container-devices/all", "type": "bind", "source": "/dev/null"});
    let d = c.ok(&spec(&[], json!({"mounts": [m]})));
    c.assert_runtime(&d, "nvidia-container-runtime", Source::Gpu);
}

#[test]
fn ordinary_mounts_are_no_evidence() {
    let c = Case::new();
    let m = json!([{"destination": "/dev/shm", "type": "tmpfs", "source": "shm"}, {"destination": "/data", "type": "bind", "source": "/srv/nvidia"}]);
    let d = c.ok(&spec(&[], json!({"mounts": m})));
    c.assert_runtime(&d, "runc", Source::Default);
}

#[test]
fn every_item_of_evidence_is_reported() {
    let c = Case::new();
    let d = c.ok(&spec(
        &["NVIDIA_VISIBLE_DEVICES=0"],
        json!({
            "annotations": {"cdi.k8s.io/a": "nvidia.com/gpu=0"},
            "linux": {"devices": [{"path": "/dev/nvidia0", "type": "c", "major": 195, "minor": 0}]},
            "mounts": [{"destination": "/dev/nvidiactl", "type": "bind", "source": "/dev/nvidiactl"}]
        }),
    ));
    assert_eq!(d.evidence.len(), 4, "{:?}", lines(&d));
}

// ---- precedence ------------------------------------------------------------------------

#[test]
fn env_override_beats_everything_and_still_reports_evidence() {
    let c = Case::new().env("runc").binary_name("kata-runtime").config("[runtime]\nallow_annotation_override = true\n");
    let d = c.ok(&spec(
        &["NVIDIA_VISIBLE_DEVICES=all"],
        json!({"annotations": {"kybernate.io/runtime": "nvidia-container-runtime"}}),
    ));
    c.assert_runtime(&d, "runc", Source::Env);
    assert!(d.gpu);
    assert_eq!(d.evidence.len(), 1);
}

#[test]
fn env_override_accepts_an_absolute_path() {
    let c = Case::new();
    let abs = c.rt.path("kata-runtime");
    let c = c.env(abs.to_str().unwrap());
    let d = c.ok(&spec(&[], json!({})));
    c.assert_runtime(&d, "kata-runtime", Source::Env);
}

#[test]
fn options_binary_name_beats_annotation_and_gpu() {
    let c = Case::new()
        .binary_name("kata-runtime")
        .config("[runtime]\nallow_annotation_override = true\nallowed = [\"runc\"]\n");
    let d = c.ok(&spec(&["NVIDIA_VISIBLE_DEVICES=all"], json!({"annotations": {"kybernate.io/runtime": "runc"}})));
    c.assert_runtime(&d, "kata-runtime", Source::Options);
}

#[test]
fn empty_env_override_and_binary_name_are_ignored() {
    let c = Case::new().env("").binary_name("");
    let d = c.ok(&spec(&[], json!({})));
    c.assert_runtime(&d, "runc", Source::Default);
}

#[test]
fn allowed_annotation_beats_gpu_evidence() {
    let c = Case::new().config("[runtime]\nallow_annotation_override = true\n");
    let d = c.ok(&spec(&["NVIDIA_VISIBLE_DEVICES=all"], json!({"annotations": {"kybernate.io/runtime": "runc"}})));
    c.assert_runtime(&d, "runc", Source::Annotation);
    assert!(d.gpu);
}

#[test]
fn annotation_is_ignored_with_a_warning_when_overrides_are_off() {
    let c = Case::new();
    let d = c.ok(&spec(&[], json!({"annotations": {"kybernate.io/runtime": "nvidia-container-runtime"}})));
    c.assert_runtime(&d, "runc", Source::Default);
    assert!(d.warnings.iter().any(|w| w.contains("allow_annotation_override")), "{:?}", d.warnings);
}

#[test]
fn annotation_naming_a_runtime_outside_allowed_is_refused() {
    let c = Case::new().config("[runtime]\nallow_annotation_override = true\n");
    let err = c.run(&spec(&[], json!({"annotations": {"kybernate.io/runtime": "/bin/sh"}}))).unwrap_err();
    assert!(matches!(err, SelectError::AnnotationNotAllowed { .. }), "{err}");
    let msg = err.to_string();
    assert!(msg.starts_with("/etc/kybernate/config.toml: ") && msg.contains("/bin/sh"), "{msg}");
}

#[test]
fn annotation_naming_an_allowed_but_missing_runtime_is_an_error() {
    let c = Case::new().config("[runtime]\nallow_annotation_override = true\nallowed = [\"kbt-absent\"]\n");
    let err = c.run(&spec(&[], json!({"annotations": {"kybernate.io/runtime": "kbt-absent"}}))).unwrap_err();
    assert!(matches!(err, SelectError::Runtime { source_rule: Source::Annotation, .. }), "{err}");
}

#[test]
fn gpu_evidence_beats_default() {
    let c = Case::new().config("[runtime]\ndefault = \"kata-runtime\"\n");
    let d = c.ok(&spec(&["NVIDIA_VISIBLE_DEVICES=all"], json!({})));
    c.assert_runtime(&d, "nvidia-container-runtime", Source::Gpu);
    let d = c.ok(&spec(&[], json!({})));
    c.assert_runtime(&d, "kata-runtime", Source::Default);
}

// ---- missing runtimes ---------------------------------------------------------------------

#[test]
fn missing_gpu_runtime_is_an_error_by_default() {
    let c = Case::new().config("[runtime]\ngpu = \"kbt-no-such-nvidia-runtime\"\n");
    let err = c.run(&spec(&["NVIDIA_VISIBLE_DEVICES=all"], json!({}))).unwrap_err();
    assert!(matches!(err, SelectError::GpuRuntimeMissing { .. }), "{err}");
    let msg = err.to_string();
    assert!(msg.starts_with("/etc/kybernate/config.toml: the bundle wants GPUs"), "{msg}");
    assert!(msg.contains("kbt-no-such-nvidia-runtime") && msg.contains("fallback"), "{msg}");
    assert!(!msg.contains('\n'));
}

#[test]
fn missing_gpu_runtime_falls_back_with_a_warning_when_configured() {
    let c =
        Case::new().config("[runtime]\ngpu = \"kbt-no-such-nvidia-runtime\"\non_missing_gpu_runtime = \"fallback\"\n");
    let d = c.ok(&spec(&["NVIDIA_VISIBLE_DEVICES=all"], json!({})));
    c.assert_runtime(&d, "runc", Source::Default);
    assert!(d.gpu);
    assert!(d.warnings.iter().any(|w| w.contains("falling back")), "{:?}", d.warnings);
}

#[test]
fn missing_default_runtime_is_an_error() {
    let c = Case::new().config("[runtime]\ndefault = \"kbt-no-such-runc\"\n");
    let err = c.run(&spec(&[], json!({}))).unwrap_err();
    assert!(matches!(err, SelectError::DefaultRuntime { .. }), "{err}");
}

#[test]
fn env_override_naming_a_missing_runtime_is_an_error() {
    let c = Case::new().env("kbt-no-such-runtime");
    let err = c.run(&spec(&[], json!({}))).unwrap_err();
    assert!(matches!(err, SelectError::Runtime { source_rule: Source::Env, .. }), "{err}");
    assert!(err.to_string().contains("KYBERNATE_RUNTIME"));
}

// ---- malformed input -------------------------------------------------------------------------

#[test]
fn missing_config_json_is_a_read_error_naming_the_file() {
    let c = Case::new();
    let dir = tempfile::tempdir().unwrap();
    let selector = Selector { config: c.config.clone(), config_path: "/x".into(), context: Context::default() };
    let err = selector.select_bundle(dir.path()).unwrap_err();
    assert!(matches!(err, SelectError::Bundle(BundleError::Read { .. })), "{err}");
    assert!(err.to_string().starts_with(&format!("{}/config.json: ", dir.path().display())));
}

#[test]
fn invalid_json_is_a_parse_error_naming_the_file() {
    let c = Case::new();
    for text in ["{\"ociVersion\": ", "[]", " [\"1.0\"]", "42", "null"] {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("config.json"), text).unwrap();
        let selector = Selector { config: c.config.clone(), config_path: "/x".into(), context: Context::default() };
        let err = selector.select_bundle(dir.path()).unwrap_err();
        assert!(
            matches!(err, SelectError::Bundle(BundleError::Parse { .. } | BundleError::NotAnObject { .. })),
            "{text}: {err}"
        );
        assert!(err.to_string().contains("config.json: malformed OCI runtime spec"), "{err}");
    }
}

/// Parts of the wrong shape are runc's to refuse, with its own message: the decision reads them
/// as absent and never fails on them.
#[test]
fn parts_of_the_wrong_shape_are_left_to_the_runtime() {
    let c = Case::new();
    for text in [
        "{\"process\": {\"env\": 7}}",
        "{\"process\": {\"env\": [\"NVIDIA_VISIBLE_DEVICES=0\", 7]}, \"annotations\": []}",
        "{\"linux\": {\"devices\": [{\"path\": 1}]}}",
        "{\"linux\": {\"devices\": [{\"type\": \"c\", \"path\": \"/dev/x\", \"major\": \"195\"}]}}",
        "{\"mounts\": {\"destination\": \"/dev/nvidia0\"}}",
    ] {
        let d = c.ok(&serde_json::from_str(text).unwrap());
        let want_gpu = text.contains("NVIDIA_VISIBLE_DEVICES=0");
        assert_eq!(d.gpu, want_gpu, "{text}");
    }
}

#[test]
fn malformed_config_file_is_an_error_naming_file_key_and_line() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_config(dir.path(), "[runtime]\ngpu = 3\n");
    let err = Selector::load(Some(&path), Context::default()).unwrap_err();
    assert!(matches!(err, ConfigError::Invalid { line: 2, .. }), "{err}");
    assert!(err.to_string().starts_with(&format!("{}:2: key `runtime.gpu`", path.display())), "{err}");
}

// ---- the benchmark's fixtures are what they claim to be ---------------------------------------

#[test]
fn kubernetes_fixtures_decide_as_expected() {
    let c = Case::new();
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    for (file, runtime, gpu) in
        [("k8s-gpu-config.json", "nvidia-container-runtime", true), ("k8s-cpu-config.json", "runc", false)]
    {
        let v: Value = serde_json::from_slice(&std::fs::read(dir.join(file)).unwrap()).unwrap();
        let d = c.ok(&v);
        assert_eq!((d.runtime, d.gpu), (c.rt.path(runtime), gpu), "{file}");
    }
}
