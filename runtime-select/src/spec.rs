//! What Kybernate reads from an OCI `config.json`: a lenient view over the whole document.
//!
//! The shim is a drop-in for runc's shim, so it must never refuse a spec that runc runs.
//! runc itself (Go's `encoding/json`) ignores unknown fields, and runc 1.1 ignores capability
//! names and personality domains it does not know; new runtime-spec releases add fields and
//! enum values all the time. So nothing here deserialises the spec into a strict type: each
//! decision reads only the parts it needs, and a part of the wrong shape counts as absent.
//! Validation stays the runtime's job, and when runc refuses a spec the user sees runc's own
//! message. Editors of the spec work on [`SpecView::value`], which keeps everything else as it was.

use std::path::{Path, PathBuf};

use serde_json::{Map, Value};

/// Why a bundle's `config.json` cannot be read as a JSON object (then nothing can be decided
/// from it; runc would refuse it too).
#[derive(Debug, thiserror::Error)]
pub enum BundleError {
    #[error("{path}: cannot read OCI runtime spec: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: malformed OCI runtime spec: the top level must be a JSON object")]
    NotAnObject { path: PathBuf },
    #[error("{path}: malformed OCI runtime spec: {source}")]
    Parse {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
}

/// A `config.json` as a JSON object, with typed readers for the parts Kybernate decides on.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct SpecView {
    value: Map<String, Value>,
}

/// A `linux.devices` entry as far as it could be read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceView<'a> {
    /// `c`, `b`, `u`, `p`, or whatever the spec says.
    pub typ: &'a str,
    pub path: &'a str,
    pub major: Option<i64>,
    pub minor: Option<i64>,
}

/// A `mounts` entry as far as it could be read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountView<'a> {
    pub destination: &'a str,
    pub source: Option<&'a str>,
    pub typ: Option<&'a str>,
    pub options: Vec<&'a str>,
}

/// A `linux.namespaces` entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NamespaceView<'a> {
    pub typ: &'a str,
    /// The namespace joined, if any (`None`: a new one).
    pub path: Option<&'a str>,
}

impl SpecView {
    /// Reads `<bundle>/config.json`.
    pub fn load(bundle: &Path) -> Result<Self, BundleError> {
        let path = bundle.join("config.json");
        let bytes = std::fs::read(&path).map_err(|source| BundleError::Read { path: path.clone(), source })?;
        Self::from_slice(&bytes).map_err(|e| match e {
            FromSliceError::Parse(source) => BundleError::Parse { path, source },
            FromSliceError::NotAnObject => BundleError::NotAnObject { path },
        })
    }

    /// Parses a document; it must be a JSON object (runc refuses anything else too).
    pub fn from_slice(bytes: &[u8]) -> Result<Self, FromSliceError> {
        match serde_json::from_slice::<Value>(bytes).map_err(FromSliceError::Parse)? {
            Value::Object(value) => Ok(Self { value }),
            _ => Err(FromSliceError::NotAnObject),
        }
    }

    /// A view of an already parsed document (a non-object reads as empty).
    pub fn from_value(value: Value) -> Self {
        match value {
            Value::Object(value) => Self { value },
            _ => Self::default(),
        }
    }

    /// The whole document, unknown fields included.
    pub fn value(&self) -> &Map<String, Value> {
        &self.value
    }

    /// Only the document's `annotations`: what later requests on a container still ask of its
    /// spec (pod names, checkpoint options), kept instead of reading `config.json` again.
    pub fn annotations_only(&self) -> SpecView {
        let mut value = Map::new();
        if let Some(a) = self.value.get("annotations") {
            value.insert("annotations".into(), a.clone());
        }
        SpecView { value }
    }

    /// The whole document, for editors that must keep what they do not understand.
    pub fn into_value(self) -> Value {
        Value::Object(self.value)
    }

    fn at(&self, pointer: &str) -> Option<&Value> {
        // Map has no `pointer`; the first segment is looked up here.
        let rest = pointer.strip_prefix('/')?;
        let (first, tail) = rest.split_once('/').map_or((rest, ""), |(a, b)| (a, b));
        let v = self.value.get(first)?;
        if tail.is_empty() {
            Some(v)
        } else {
            v.pointer(&format!("/{tail}"))
        }
    }

    fn str_at(&self, pointer: &str) -> Option<&str> {
        self.at(pointer)?.as_str()
    }

    fn array_at(&self, pointer: &str) -> &[Value] {
        self.at(pointer).and_then(Value::as_array).map_or(&[], Vec::as_slice)
    }

    /// Every annotation whose value is a string (others are runc's to refuse).
    pub fn annotations(&self) -> impl Iterator<Item = (&str, &str)> {
        self.value
            .get("annotations")
            .and_then(Value::as_object)
            .into_iter()
            .flatten()
            .filter_map(|(k, v)| Some((k.as_str(), v.as_str()?)))
    }

    /// A non-empty annotation.
    pub fn annotation(&self, key: &str) -> Option<&str> {
        self.value.get("annotations")?.get(key)?.as_str().filter(|v| !v.is_empty())
    }

    /// `process.env`, the string entries in order.
    pub fn env(&self) -> Vec<&str> {
        self.array_at("/process/env").iter().filter_map(Value::as_str).collect()
    }

    /// The value of `key` in `process.env`; the last entry wins, as in the NVIDIA toolkit and
    /// in the environment the process gets.
    pub fn env_value(&self, key: &str) -> Option<&str> {
        self.env().into_iter().rev().find_map(|kv| kv.strip_prefix(key)?.strip_prefix('='))
    }

    /// `process.terminal`.
    pub fn terminal(&self) -> bool {
        self.at("/process/terminal").and_then(Value::as_bool).unwrap_or(false)
    }

    /// `linux.devices` entries that have at least a path.
    pub fn devices(&self) -> Vec<DeviceView<'_>> {
        self.array_at("/linux/devices")
            .iter()
            .filter_map(|d| {
                Some(DeviceView {
                    typ: d.get("type").and_then(Value::as_str).unwrap_or(""),
                    path: d.get("path")?.as_str()?,
                    major: d.get("major").and_then(Value::as_i64),
                    minor: d.get("minor").and_then(Value::as_i64),
                })
            })
            .collect()
    }

    /// `mounts` entries that have at least a destination.
    pub fn mounts(&self) -> Vec<MountView<'_>> {
        self.array_at("/mounts")
            .iter()
            .filter_map(|m| {
                Some(MountView {
                    destination: m.get("destination")?.as_str()?,
                    source: m.get("source").and_then(Value::as_str),
                    typ: m.get("type").and_then(Value::as_str),
                    options: m
                        .get("options")
                        .and_then(Value::as_array)
                        .map(|o| o.iter().filter_map(Value::as_str).collect())
                        .unwrap_or_default(),
                })
            })
            .collect()
    }

    /// `linux.namespaces` entries that have a type.
    pub fn namespaces(&self) -> Vec<NamespaceView<'_>> {
        self.array_at("/linux/namespaces")
            .iter()
            .filter_map(|n| {
                Some(NamespaceView {
                    typ: n.get("type")?.as_str()?,
                    path: n.get("path").and_then(Value::as_str).filter(|p| !p.is_empty()),
                })
            })
            .collect()
    }

    /// Whether the container gets a PID namespace of its own: a `pid` entry without a path.
    /// Without one it shares the host's or joins another's, and its init's exit does not end
    /// its other processes.
    pub fn has_own_pid_namespace(&self) -> bool {
        self.namespaces().iter().any(|n| n.typ == "pid" && n.path.is_none())
    }

    /// `linux.cgroupsPath`.
    pub fn cgroups_path(&self) -> Option<&str> {
        self.str_at("/linux/cgroupsPath").filter(|p| !p.is_empty())
    }

    /// `root.readonly`.
    pub fn root_readonly(&self) -> bool {
        self.at("/root/readonly").and_then(Value::as_bool).unwrap_or(false)
    }
}

/// Why a document is not a spec we can read at all.
#[derive(Debug, thiserror::Error)]
pub enum FromSliceError {
    #[error("not JSON: {0}")]
    Parse(#[source] serde_json::Error),
    #[error("the document is not a JSON object")]
    NotAnObject,
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn view(v: Value) -> SpecView {
        SpecView::from_value(v)
    }

    #[test]
    fn reads_the_parts_decisions_need() {
        let s = view(json!({
            "process": {"env": ["A=1", "NVIDIA_VISIBLE_DEVICES=0", 7, "NVIDIA_VISIBLE_DEVICES=1"], "terminal": true},
            "annotations": {"a": "x", "b": 3, "c": ""},
            "root": {"path": "rootfs", "readonly": true},
            "mounts": [{"destination": "/d", "source": "/s", "type": "bind", "options": ["rbind", 1]}, {"source": "/x"}],
            "linux": {
                "devices": [{"type": "c", "path": "/dev/nvidia0", "major": 195, "minor": 0}, {"type": "c"}],
                "namespaces": [{"type": "pid", "path": "/proc/1/ns/pid"}, {"type": "mount"}, {"path": "/x"}],
                "cgroupsPath": "/k8s/x"
            }
        }));
        assert_eq!(s.env_value("NVIDIA_VISIBLE_DEVICES"), Some("1"));
        assert!(s.terminal());
        assert_eq!(s.annotations().collect::<Vec<_>>(), vec![("a", "x"), ("c", "")]);
        assert_eq!(s.annotation("c"), None);
        assert!(s.root_readonly());
        assert_eq!(s.mounts().len(), 1);
        assert_eq!(s.mounts()[0].options, vec!["rbind"]);
        assert_eq!(s.devices(), vec![DeviceView { typ: "c", path: "/dev/nvidia0", major: Some(195), minor: Some(0) }]);
        assert_eq!(s.namespaces().len(), 2);
        assert!(!s.has_own_pid_namespace());
        assert_eq!(s.cgroups_path(), Some("/k8s/x"));
    }

    #[test]
    fn parts_of_the_wrong_shape_count_as_absent() {
        let s = view(json!({
            "process": "no", "annotations": [1], "mounts": {"a": 1}, "linux": {"devices": "x", "namespaces": 3},
            "root": {"readonly": "yes"}
        }));
        assert!(s.env().is_empty() && s.annotations().next().is_none() && s.mounts().is_empty());
        assert!(s.devices().is_empty() && s.namespaces().is_empty() && !s.root_readonly());
        assert!(!s.has_own_pid_namespace());
        assert_eq!(SpecView::from_slice(b"[1]").unwrap_err().to_string(), "the document is not a JSON object");
        assert!(SpecView::from_slice(b"{").is_err());
    }

    #[test]
    fn a_pid_namespace_of_its_own() {
        assert!(view(json!({"linux": {"namespaces": [{"type": "pid"}]}})).has_own_pid_namespace());
        assert!(view(json!({"linux": {"namespaces": [{"type": "pid", "path": ""}]}})).has_own_pid_namespace());
        // The host's (no entry), a pod's or another container's (a path), no linux section at all.
        assert!(!view(json!({"linux": {"namespaces": [{"type": "network"}]}})).has_own_pid_namespace());
        assert!(!view(json!({"linux": {"namespaces": [{"type": "pid", "path": "/proc/7/ns/pid"}]}}))
            .has_own_pid_namespace());
        assert!(!view(json!({"ociVersion": "1.0.2"})).has_own_pid_namespace());
        // Unknown fields and values elsewhere change nothing.
        assert!(view(json!({"linux": {"personality": {"domain": "LINUX99"},
            "namespaces": [{"type": "time"}, {"type": "pid", "x-future": 1}]}}))
        .has_own_pid_namespace());
    }

    #[test]
    fn annotations_only_keeps_the_annotations_and_nothing_else() {
        let s = view(json!({"process": {"env": ["A=1"]}, "annotations": {"a": "x", "b": ""}}));
        let a = s.annotations_only();
        assert_eq!(a.annotation("a"), Some("x"));
        assert!(a.env().is_empty());
        assert_eq!(a.into_value(), json!({"annotations": {"a": "x", "b": ""}}));
        assert_eq!(view(json!({"ociVersion": "1"})).annotations_only(), SpecView::default());
    }

    #[test]
    fn the_document_round_trips_unknown_fields_and_all() {
        let doc = json!({"ociVersion": "1.3.0", "future": {"x": [1, 2]}, "process": {"capabilities": {"bounding": ["CAP_FUTURE"]}}});
        assert_eq!(view(doc.clone()).into_value(), doc);
    }
}
