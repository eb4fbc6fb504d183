//! containerd's CRI plugin in the test bed: its config (runtime handlers in both of Kybernate's
//! registration styles, host-network pods without CNI) and the pause-like sandbox image.
//!
//! CRI works in the containerd namespace [`CRI_NAMESPACE`], whatever the test bed's own one is,
//! so runc state of CRI containers lands in `/run/containerd/runc/k8s.io`, shared with every
//! other test bed and with a real node's containerd. Ids there are containerd's random 64-hex
//! ones; cleanup (`cleanup::scrub_cri`) touches only those whose bundle lies in the test bed's dir.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use serde_json::Value;

use crate::{describe_output, Error, IoContext, Result, IMAGE_ARCHIVE};

/// The containerd namespace the CRI plugin uses for pods and images.
pub const CRI_NAMESPACE: &str = "k8s.io";
/// The sandbox ("pause") image of CRI test beds, built from [`IMAGE_ARCHIVE`] at test-bed start.
pub const PAUSE_IMAGE: &str = "docker.io/kybernate/pause:test";
/// Its command: waits forever, and exits at once on SIGTERM (as pause does) so that a stopped
/// sandbox does not hold up its pod for the stop timeout.
pub const PAUSE_COMMAND: [&str; 3] = ["sh", "-c", "trap 'exit 0' TERM; while :; do sleep 3600 & wait; done"];
/// Runtime type of Kybernate's shim (style [`CriStyle::RuntimeType`]).
pub const KYBERNATE_RUNTIME_TYPE: &str = "io.containerd.kybernate.v1";
/// Runtime type of containerd's runc shim, which style [`CriStyle::RuntimePath`] borrows.
pub const RUNC_RUNTIME_TYPE: &str = "io.containerd.runc.v2";
/// The pod annotations the kybernate handler lets through by default (docs/installation.md).
pub const KYBERNATE_POD_ANNOTATIONS: &str = "kybernate.io/*";

/// How the CRI plugin starts Kybernate's shim for a runtime handler (docs/installation.md).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CriStyle {
    /// (a) `runtime_type = "io.containerd.kybernate.v1"`: containerd finds the shim on its PATH
    /// and sends `runtimeoptions.v1.Options`, which carry only `ConfigPath`.
    RuntimeType { config_path: Option<PathBuf> },
    /// (b) `runtime_type = "io.containerd.runc.v2"` + `runtime_path = <shim>`: containerd sends runc
    /// options (never `BinaryName` here: it would force one runtime for every container) and
    /// applies its runc-only checkpoint and restore paths. Measured: containerd 1.6.20's CRI
    /// ignores `runtime_path` and starts the stock `containerd-shim-runc-v2` instead.
    RuntimePath { shim: PathBuf },
}

/// A CRI runtime handler (`containerd.runtimes.<name>`) running Kybernate's shim.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CriRuntime {
    /// The handler's name: `RunPodSandboxRequest.runtime_handler`, a RuntimeClass's `handler`.
    pub name: String,
    pub style: CriStyle,
    /// `pod_annotations`: which pod annotations reach the OCI spec of the pod's containers.
    pub pod_annotations: Vec<String>,
}

impl CriRuntime {
    /// Style (a), with `options.ConfigPath = config_path` when given.
    pub fn runtime_type(name: &str, config_path: Option<&Path>) -> Self {
        Self::new(name, CriStyle::RuntimeType { config_path: config_path.map(Path::to_path_buf) })
    }

    /// Style (b): our shim binary as the runc runtime's `runtime_path`.
    pub fn runtime_path(name: &str, shim: &Path) -> Self {
        Self::new(name, CriStyle::RuntimePath { shim: shim.to_path_buf() })
    }

    fn new(name: &str, style: CriStyle) -> Self {
        Self { name: name.to_string(), style, pod_annotations: vec![KYBERNATE_POD_ANNOTATIONS.to_string()] }
    }

    /// Replaces the default `pod_annotations` (`["kybernate.io/*"]`).
    pub fn pod_annotations(mut self, patterns: &[&str]) -> Self {
        self.pod_annotations = patterns.iter().map(|p| p.to_string()).collect();
        self
    }

    fn toml(&self) -> String {
        let table = format!("[plugins.\"io.containerd.grpc.v1.cri\".containerd.runtimes.{}]", toml_key(&self.name));
        let annotations: Vec<String> = self.pod_annotations.iter().map(|a| toml_str(a)).collect();
        let mut out = format!("\n  {table}\n    pod_annotations = [{}]\n", annotations.join(", "));
        match &self.style {
            CriStyle::RuntimeType { config_path } => {
                out.push_str(&format!("    runtime_type = {}\n", toml_str(KYBERNATE_RUNTIME_TYPE)));
                if let Some(path) = config_path {
                    out.push_str(&format!(
                        "    {}\n      ConfigPath = {}\n",
                        options_table(&table),
                        toml_str(&path.to_string_lossy())
                    ));
                }
            }
            CriStyle::RuntimePath { shim } => {
                out.push_str(&format!(
                    "    runtime_type = {}\n    runtime_path = {}\n    # runc options reach the shim; no BinaryName\n    {}\n      SystemdCgroup = false\n",
                    toml_str(RUNC_RUNTIME_TYPE),
                    toml_str(&shim.to_string_lossy()),
                    options_table(&table)
                ));
            }
        }
        out
    }
}

fn options_table(table: &str) -> String {
    format!("{}.options]", table.trim_end_matches(']'))
}

/// A TOML basic string (JSON's string escapes are a subset of TOML's).
fn toml_str(s: &str) -> String {
    serde_json::Value::String(s.to_string()).to_string()
}

/// A bare TOML key when it can be one, else a quoted key.
fn toml_key(s: &str) -> String {
    if !s.is_empty() && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_') {
        s.to_string()
    } else {
        toml_str(s)
    }
}

/// The `[plugins."io.containerd.grpc.v1.cri"]` section of a test bed whose dir is `dir`.
pub(crate) fn config_toml(dir: &Path, runtimes: &[CriRuntime]) -> String {
    let d = dir.display();
    let mut toml = format!(
        r#"
[plugins."io.containerd.grpc.v1.cri"]
  # runc cannot lower oom_score_adj here (no CAP_SYS_RESOURCE)
  restrict_oom_score_adj = true
  # imported at test-bed start (there is no registry to pull registry.k8s.io/pause from)
  sandbox_image = {pause}
  # exec/attach/port-forward URLs: loopback, a free port per test bed, plain HTTP
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
  enable_tls_streaming = false

  # Host-network pods only: no CNI plugin runs. Private dirs, so a node's CNI config is not loaded.
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "{d}/cni/bin"
    conf_dir = "{d}/cni/net.d"

  [plugins."io.containerd.grpc.v1.cri".containerd]
    default_runtime_name = "runc"

  # The CRI plugin does not load without the runtime default_runtime_name names.
  [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
    runtime_type = {runc}
"#,
        pause = toml_str(PAUSE_IMAGE),
        runc = toml_str(RUNC_RUNTIME_TYPE),
    );
    for r in runtimes {
        toml.push_str(&r.toml());
    }
    toml
}

/// Writes an OCI archive of [`PAUSE_IMAGE`] to `out`: [`crate::IMAGE`]'s layer with a config whose
/// command is [`PAUSE_COMMAND`] (new config, manifest and index; `work` is scratch space).
pub fn build_pause_archive(out: &Path, work: &Path) -> Result<()> {
    std::fs::create_dir_all(work).ctx(|| format!("creating {}", work.display()))?;
    run(Command::new("tar").arg("-xf").arg(IMAGE_ARCHIVE).arg("-C").arg(work), "unpacking the image archive")?;
    let index_path = work.join("index.json");
    let mut index = read_json(&index_path)?;
    let manifest_digest = index["manifests"][0]["digest"]
        .as_str()
        .ok_or_else(|| not_set_up(format!("{IMAGE_ARCHIVE}: index.json names no manifest")))?
        .to_string();
    let mut manifest = read_json(&blob_path(work, &manifest_digest)?)?;
    let config_digest = manifest["config"]["digest"]
        .as_str()
        .ok_or_else(|| not_set_up(format!("{IMAGE_ARCHIVE}: the manifest names no config")))?
        .to_string();
    let mut config = read_json(&blob_path(work, &config_digest)?)?;
    config["config"]["Cmd"] = serde_json::json!(PAUSE_COMMAND);
    if let Some(c) = config["config"].as_object_mut() {
        c.remove("Entrypoint");
    }
    let (digest, size) = write_blob(work, &config)?;
    manifest["config"]["digest"] = digest.into();
    manifest["config"]["size"] = size.into();
    let (digest, size) = write_blob(work, &manifest)?;
    let entry = &mut index["manifests"][0];
    entry["digest"] = digest.into();
    entry["size"] = size.into();
    entry["annotations"] = serde_json::json!({
        "io.containerd.image.name": PAUSE_IMAGE,
        "org.opencontainers.image.ref.name": PAUSE_IMAGE.rsplit(':').next().unwrap_or("test"),
    });
    let text = serde_json::to_vec(&index).map_err(|e| not_set_up(format!("encoding index.json: {e}")))?;
    std::fs::write(&index_path, text).ctx(|| format!("writing {}", index_path.display()))?;
    run(
        Command::new("tar").arg("-cf").arg(out).arg("-C").arg(work).args(["oci-layout", "index.json", "blobs"]),
        "packing the pause image archive",
    )?;
    Ok(())
}

fn not_set_up(what: String) -> Error {
    Error::NotSetUp(what)
}

fn read_json(path: &Path) -> Result<Value> {
    let bytes = std::fs::read(path).ctx(|| format!("reading {}", path.display()))?;
    serde_json::from_slice(&bytes).map_err(|e| not_set_up(format!("{}: {e}", path.display())))
}

/// `blobs/sha256/<hex>` of a `sha256:<hex>` digest (refusing anything else).
fn blob_path(work: &Path, digest: &str) -> Result<PathBuf> {
    match digest.strip_prefix("sha256:") {
        Some(hex) if hex.len() == 64 && hex.bytes().all(|b| b.is_ascii_hexdigit()) => {
            Ok(work.join("blobs/sha256").join(hex))
        }
        _ => Err(not_set_up(format!("{IMAGE_ARCHIVE}: unexpected digest {digest:?}"))),
    }
}

/// Writes `value` as a content-addressed blob; returns its digest and size.
fn write_blob(work: &Path, value: &Value) -> Result<(String, u64)> {
    let bytes = serde_json::to_vec(value).map_err(|e| not_set_up(format!("encoding a blob: {e}")))?;
    let tmp = work.join("blob.tmp");
    std::fs::write(&tmp, &bytes).ctx(|| format!("writing {}", tmp.display()))?;
    let out = run(Command::new("sha256sum").arg(&tmp), "hashing a blob")?;
    let hex = out.split_whitespace().next().unwrap_or_default().to_string();
    let digest = format!("sha256:{hex}");
    let dest = blob_path(work, &digest)?;
    std::fs::rename(&tmp, &dest).ctx(|| format!("renaming a blob to {}", dest.display()))?;
    Ok((digest, bytes.len() as u64))
}

/// Runs a command; its stdout, or an error with its output.
fn run(cmd: &mut Command, what: &str) -> Result<String> {
    let out = cmd.stdin(Stdio::null()).output().ctx(|| format!("{what}: running {cmd:?}"))?;
    if !out.status.success() {
        return Err(not_set_up(describe_output(what, &out)));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runtime_type_style_names_our_type_and_config() {
        let r = CriRuntime::runtime_type("kybernate", Some(Path::new("/x/k.toml")));
        let toml = r.toml();
        assert!(toml.contains("[plugins.\"io.containerd.grpc.v1.cri\".containerd.runtimes.kybernate]"), "{toml}");
        assert!(toml.contains("runtime_type = \"io.containerd.kybernate.v1\""), "{toml}");
        assert!(toml.contains("[plugins.\"io.containerd.grpc.v1.cri\".containerd.runtimes.kybernate.options]"));
        assert!(toml.contains("ConfigPath = \"/x/k.toml\""), "{toml}");
        assert!(toml.contains("pod_annotations = [\"kybernate.io/*\"]"), "{toml}");
        assert!(!toml.contains("runtime_path"));
    }

    #[test]
    fn runtime_path_style_borrows_runc_without_binary_name() {
        let r =
            CriRuntime::runtime_path("kybernate", Path::new("/t/containerd-shim-kybernate-v1")).pod_annotations(&[]);
        let toml = r.toml();
        assert!(toml.contains("runtime_type = \"io.containerd.runc.v2\""), "{toml}");
        assert!(toml.contains("runtime_path = \"/t/containerd-shim-kybernate-v1\""), "{toml}");
        assert!(toml.contains("pod_annotations = []"), "{toml}");
        assert!(!toml.contains("BinaryName ="), "{toml}");
    }

    #[test]
    fn section_has_runc_pause_image_and_private_cni_dirs() {
        let toml = config_toml(Path::new("/b/kbt-1-2"), &[]);
        assert!(toml.contains("restrict_oom_score_adj = true"));
        assert!(toml.contains(&format!("sandbox_image = \"{PAUSE_IMAGE}\"")));
        assert!(toml.contains("[plugins.\"io.containerd.grpc.v1.cri\".containerd.runtimes.runc]"));
        assert!(toml.contains("conf_dir = \"/b/kbt-1-2/cni/net.d\""));
        assert!(toml.contains("stream_server_port = \"0\""));
    }

    #[test]
    fn keys_and_strings_are_quoted_when_needed() {
        assert_eq!(toml_key("kybernate-runc"), "kybernate-runc");
        assert_eq!(toml_key("a.b"), "\"a.b\"");
        assert_eq!(toml_str("a\"b\\c"), "\"a\\\"b\\\\c\"");
    }
}
