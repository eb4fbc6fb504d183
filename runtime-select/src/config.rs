//! Kybernate's node configuration (`/etc/kybernate/config.toml`).
//!
//! One file serves the shim, `kybernate-select` and the CLI, so every key is
//! defined here once. Unknown keys are errors: a misspelt
//! `allow_anotation_override` silently falling back to a default is exactly the
//! kind of surprise an admin cannot debug on a busy node.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// Where the config is read from when nobody names a file.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/kybernate/config.toml";
/// Environment variable naming the config file (below containerd's `ConfigPath`).
pub const CONFIG_ENV: &str = "KYBERNATE_CONFIG";

/// The whole configuration file.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub runtime: RuntimeConfig,
    pub checkpoint: CheckpointConfig,
    pub trust: TrustConfig,
    pub registry: RegistryConfig,
}

/// `[runtime]`: which OCI runtime binary a container gets.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RuntimeConfig {
    /// Runtime for containers without GPU evidence (name or absolute path).
    pub default: String,
    /// Runtime for containers with GPU evidence (name or absolute path).
    pub gpu: String,
    /// What to do when a bundle wants GPUs and `gpu` cannot be found.
    pub on_missing_gpu_runtime: OnMissingGpuRuntime,
    /// Whether the `kybernate.io/runtime` annotation may choose the runtime.
    pub allow_annotation_override: bool,
    /// What the annotation may name (compared literally).
    pub allowed: Vec<String>,
}

impl Default for RuntimeConfig {
    fn default() -> Self {
        Self {
            default: "runc".into(),
            gpu: "nvidia-container-runtime".into(),
            on_missing_gpu_runtime: OnMissingGpuRuntime::Error,
            allow_annotation_override: false,
            allowed: vec!["runc".into(), "nvidia-container-runtime".into()],
        }
    }
}

/// A GPU job silently started without GPUs is worse than a failed start, so
/// `Error` is the default.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnMissingGpuRuntime {
    Error,
    Fallback,
}

/// `[checkpoint]`: where checkpoints live and how CUDA state is handled.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CheckpointConfig {
    /// Root of the node's checkpoint store.
    pub root: PathBuf,
    /// How CUDA state is checkpointed.
    pub cuda: CudaMode,
    /// Checkpoints hold process memory (secrets included): restoring one into
    /// another Kubernetes namespace must be an explicit decision.
    pub allow_cross_namespace_restore: bool,
    /// The CUDA driver library for the `driver-api` mode (a name the dynamic
    /// loader finds, or an absolute path when the driver lives elsewhere).
    pub libcuda: String,
    /// How long to wait for a CUDA process's submitted GPU work before its
    /// lock gives up (milliseconds; 0 waits forever).
    pub cuda_lock_timeout_ms: u32,
    /// Restoring CUDA state onto GPUs of another model or count fails in the
    /// driver, often late; refuse it unless this (or the container's
    /// `kybernate.io/allow-gpu-mismatch` annotation) allows it.
    pub allow_gpu_mismatch: bool,
    /// Whether the `RESTORE_FROM` environment variable restores a container on create. Any pod
    /// can set an environment variable, and no `pod_annotations` entry stands in its way, so it
    /// is off unless the node's admin opts in.
    pub allow_env_restore: bool,
    /// Whether the `kybernate.io/restore-from` annotation restores a container on create (it
    /// only reaches the shim where the admin listed it in the runtime's `pod_annotations`). On
    /// by default for compatibility with the installer; off switches restore-on-create off.
    pub allow_annotation_restore: bool,
    /// Where CDI specs are read from when a restored GPU container's own devices are resolved
    /// (containerd's CRI option of the same name).
    pub cdi_spec_dirs: Vec<PathBuf>,
    /// Pre-dump rounds for a checkpoint that asks for none itself (`kybernate checkpoint
    /// --pre-dump`, the `kybernate.io/checkpoint-pre-dump` annotation): memory copied while the
    /// container runs, so that less is dumped frozen. Needs the kernel's soft-dirty bits; 0 = none.
    pub pre_dump_rounds: u32,
    /// Per container (`<namespace>/<container>` in the store): the newest `keep` checkpoints stay,
    /// older ones are removed after each checkpoint the node takes and by `kybernate prune`; 0
    /// (the default): no limit.
    pub keep: u32,
    /// The whole store's limit in bytes (`214748364800` or `"200GiB"`): after each checkpoint the
    /// oldest are removed (pulled copies first, then imported ones, then the node's own; never a
    /// container's newest own one), and a checkpoint that could not fit even so is refused before
    /// anything is frozen. Unset: no limit.
    #[serde(deserialize_with = "de_size")]
    pub max_bytes: Option<u64>,
    /// How `kybernate export` writes archives: `none` (plain tar, the fastest on a local disk)
    /// or `zstd` (for archives moved over a network or onto slow disks). The store itself stays
    /// uncompressed: CRIU reads its images there directly (docs/benchmarks.md, "Compression").
    pub compress: Compression,
    /// A PKCS#8 PEM Ed25519 private key (`kybernate keygen`): every checkpoint the node takes is
    /// signed with it (`kybernate.sig`). A key that cannot be read refuses the checkpoint before
    /// anything is frozen. Absolute path; unset: checkpoints are not signed.
    pub signing_key: Option<PathBuf>,
}

impl Default for CheckpointConfig {
    fn default() -> Self {
        Self {
            root: PathBuf::from("/var/lib/kybernate/checkpoints"),
            cuda: CudaMode::Auto,
            allow_cross_namespace_restore: false,
            libcuda: "libcuda.so.1".into(),
            cuda_lock_timeout_ms: 10_000,
            allow_gpu_mismatch: false,
            allow_env_restore: false,
            allow_annotation_restore: true,
            cdi_spec_dirs: vec![PathBuf::from("/etc/cdi"), PathBuf::from("/var/run/cdi")],
            pre_dump_rounds: 0,
            keep: 0,
            max_bytes: None,
            compress: Compression::None,
            signing_key: None,
        }
    }
}

/// `[trust]`: which checkpoints from outside the node (imported, pulled) it restores. A
/// checkpoint holds process memory: whoever can hand the node one must not be able to make it
/// run memory it did not vouch for.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TrustConfig {
    /// SPKI PEM public keys (absolute paths) whose signatures this node accepts.
    pub keys: Vec<PathBuf>,
    /// Whether a checkpoint from outside must be signed by one of `keys`; unset: true exactly
    /// when `keys` is not empty. Checkpoints this node took are always restored.
    pub require_signature: Option<bool>,
}

/// `[registry]`: how `kybernate push`/`pull` and `oci://` restores reach OCI registries.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RegistryConfig {
    /// Registries (`host:port`, as in references) spoken to over plain HTTP.
    pub insecure: Vec<String>,
    /// Docker's `config.json` with credentials; unset: `/root/.docker/config.json` when present.
    pub auth_file: Option<PathBuf>,
    /// A PEM bundle of CAs trusted beside the system's, for private registries.
    pub ca_file: Option<PathBuf>,
}

/// `[checkpoint] max_bytes`: an integer of bytes, or a string with a binary unit.
fn de_size<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
    struct Size;
    impl serde::de::Visitor<'_> for Size {
        type Value = u64;
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("a size: bytes (214748364800) or a number with KiB, MiB, GiB or TiB (\"200GiB\")")
        }
        fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<u64, E> {
            u64::try_from(v).map_err(|_| E::custom(SIZE_NOT_POSITIVE)).and_then(|v| self.visit_u64(v))
        }
        fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<u64, E> {
            if v == 0 {
                return Err(E::custom(SIZE_NOT_POSITIVE));
            }
            Ok(v)
        }
        fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<u64, E> {
            parse_size(v).map_err(E::custom)
        }
    }
    d.deserialize_any(Size).map(Some)
}

const SIZE_NOT_POSITIVE: &str = "must be more than 0 bytes; leave it out for no limit";

/// `"200GiB"`, `"512 MiB"`, `"4096"`, `"4096B"`: a positive size with a binary unit (decimal
/// units such as GB are refused: 200GB and 200GiB differ by 7%, too much to guess).
pub fn parse_size(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let (number, unit) = t.split_at(t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len()));
    let shift = match unit.trim() {
        "" | "B" => 0,
        "KiB" => 10,
        "MiB" => 20,
        "GiB" => 30,
        "TiB" => 40,
        _ => {
            return Err(format!(
                "{text:?} is not a size: write bytes (214748364800) or a number with KiB, MiB, GiB or TiB (\"200GiB\")"
            ))
        }
    };
    let n: u64 = number.parse().map_err(|_| format!("{text:?} is not a size: it needs a number (\"200GiB\")"))?;
    match n.checked_mul(1u64 << shift) {
        Some(0) => Err(SIZE_NOT_POSITIVE.into()),
        Some(bytes) => Ok(bytes),
        None => Err(format!("{text:?} is too large")),
    }
}

/// `[checkpoint] compress`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Compression {
    #[default]
    None,
    Zstd,
}

/// `[checkpoint] cuda`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum CudaMode {
    Auto,
    CriuPlugin,
    DriverApi,
    Off,
}

/// A config file that could not be used. Every variant names the file.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{path}: cannot read config file: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}:{line}: {key}{message}")]
    Invalid {
        path: PathBuf,
        /// 1-based line of the offending key or value (0 when unknown).
        line: usize,
        /// `key `runtime.gpu`: ` style prefix, empty when the error is not about one key.
        key: String,
        message: String,
    },
}

/// Which file to read, and whether its absence is fine.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConfigSource {
    /// Named explicitly (containerd's `ConfigPath`, `--config`, `$KYBERNATE_CONFIG`):
    /// the file must exist.
    Explicit(PathBuf),
    /// The default path: a missing file means built-in defaults.
    Default(PathBuf),
}

impl ConfigSource {
    /// The precedence the issue and the docs promise: an explicit path (from
    /// containerd's runtime options or a CLI flag), then `$KYBERNATE_CONFIG`,
    /// then the default path.
    pub fn resolve(explicit: Option<&Path>, env_value: Option<&OsStr>) -> Self {
        match (explicit, env_value) {
            (Some(p), _) if !p.as_os_str().is_empty() => Self::Explicit(p.to_path_buf()),
            (_, Some(v)) if !v.is_empty() => Self::Explicit(PathBuf::from(v)),
            _ => Self::Default(PathBuf::from(DEFAULT_CONFIG_PATH)),
        }
    }

    pub fn path(&self) -> &Path {
        match self {
            Self::Explicit(p) | Self::Default(p) => p,
        }
    }
}

impl Config {
    /// Loads the config named by `source`.
    pub fn load(source: &ConfigSource) -> Result<Self, ConfigError> {
        let path = source.path();
        match read_config_file(path) {
            Ok(text) => Self::parse(&text, path),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && matches!(source, ConfigSource::Default(_)) => {
                Ok(Self::default())
            }
            Err(e) => Err(ConfigError::Read { path: path.to_path_buf(), source: e }),
        }
    }

    /// Parses config text; `path` is only used in error messages.
    pub fn parse(text: &str, path: &Path) -> Result<Self, ConfigError> {
        let invalid = |err: &toml::de::Error, key: String| ConfigError::Invalid {
            path: path.to_path_buf(),
            line: err.span().map(|s| line_of(text, s.start)).unwrap_or(0),
            key,
            message: err.message().trim_end().to_string(),
        };
        let de = toml::Deserializer::parse(text).map_err(|e| invalid(&e, String::new()))?;
        let config: Self = serde_path_to_error::deserialize(de).map_err(|e| {
            let key = e.path().to_string();
            let key = if key == "." || key.is_empty() { String::new() } else { format!("key `{key}`: ") };
            invalid(e.inner(), key)
        })?;
        config.check_paths(text, path)?;
        Ok(config)
    }

    /// Paths that the shim, `kybernate-select` and the CLI must read alike: a relative
    /// `[checkpoint] root` would name a different store in each (each resolves it against its own
    /// working directory), so it is refused here with the key and its line.
    fn check_paths(&self, text: &str, path: &Path) -> Result<(), ConfigError> {
        check_key_paths(text, path)?;
        if self.checkpoint.root.is_absolute() {
            return Ok(());
        }
        Err(ConfigError::Invalid {
            path: path.to_path_buf(),
            line: root_line(text).unwrap_or(0),
            key: "key `checkpoint.root`: ".into(),
            message: format!(
                "{:?} is a relative path; the store's root must be absolute, e.g. \"/var/lib/kybernate/checkpoints\"",
                self.checkpoint.root
            ),
        })
    }
}

/// The largest config file read: a config is a few hundred bytes; anything much bigger is not one.
pub const MAX_CONFIG_BYTES: u64 = 1 << 20;

/// Reads a config file without ever blocking on what the path names: opened non-blocking (a
/// FIFO opens at once instead of waiting for a writer), then the open file itself is checked
/// (no race between a check and the open), and only a regular file of at most
/// [`MAX_CONFIG_BYTES`] is read. Symlinks are followed: config maps mount their files as links.
fn read_config_file(path: &Path) -> std::io::Result<String> {
    use std::io::Read;
    use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
    let file = std::fs::OpenOptions::new().read(true).custom_flags(libc::O_NONBLOCK).open(path)?;
    let meta = file.metadata()?;
    let kind = meta.file_type();
    let what = if kind.is_file() {
        None
    } else if kind.is_dir() {
        Some("a directory")
    } else if kind.is_fifo() {
        Some("a FIFO")
    } else if kind.is_socket() {
        Some("a socket")
    } else {
        Some("a device")
    };
    if let Some(what) = what {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("{what}, not a regular file; name the config file itself"),
        ));
    }
    if meta.len() > MAX_CONFIG_BYTES {
        return Err(too_big());
    }
    let mut bytes = Vec::new();
    // The size may change after the fstat: never read more than the limit.
    file.take(MAX_CONFIG_BYTES + 1).read_to_end(&mut bytes)?;
    if bytes.len() as u64 > MAX_CONFIG_BYTES {
        return Err(too_big());
    }
    String::from_utf8(bytes)
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::InvalidData, "not UTF-8 text; a config is TOML"))
}

fn too_big() -> std::io::Error {
    std::io::Error::new(
        std::io::ErrorKind::InvalidData,
        format!("larger than {} KiB, too big for a config file", MAX_CONFIG_BYTES >> 10),
    )
}

/// The 1-based line of `[checkpoint] root`, read with spans (the typed parse has none).
fn root_line(text: &str) -> Option<usize> {
    #[derive(Deserialize)]
    struct Doc {
        checkpoint: Option<Section>,
    }
    #[derive(Deserialize)]
    struct Section {
        root: Option<toml::Spanned<toml::Value>>,
    }
    let doc: Doc = toml::from_str(text).ok()?;
    let span = doc.checkpoint?.root?.span();
    Some(line_of(text, span.start))
}

/// `[checkpoint] signing_key` and `[trust] keys` must be absolute, like the store's root: the
/// shim and the CLI run in different directories.
fn check_key_paths(text: &str, path: &Path) -> Result<(), ConfigError> {
    #[derive(Deserialize)]
    struct Doc {
        checkpoint: Option<Checkpoint>,
        trust: Option<Trust>,
    }
    #[derive(Deserialize)]
    struct Checkpoint {
        signing_key: Option<toml::Spanned<PathBuf>>,
    }
    #[derive(Deserialize)]
    struct Trust {
        keys: Option<Vec<toml::Spanned<PathBuf>>>,
    }
    // The typed parse already reported any other kind of error.
    let Ok(doc) = toml::from_str::<Doc>(text) else { return Ok(()) };
    let signing = doc.checkpoint.and_then(|c| c.signing_key).map(|k| ("checkpoint.signing_key", k));
    let trusted = doc.trust.and_then(|t| t.keys).unwrap_or_default().into_iter().map(|k| ("trust.keys", k));
    for (key, value) in signing.into_iter().chain(trusted) {
        if !value.get_ref().is_absolute() {
            return Err(ConfigError::Invalid {
                path: path.to_path_buf(),
                line: line_of(text, value.span().start),
                key: format!("key `{key}`: "),
                message: format!("{:?} is a relative path; key files must be named by absolute paths", value.get_ref()),
            });
        }
    }
    Ok(())
}

/// 1-based line number of byte offset `at` in `text`.
fn line_of(text: &str, at: usize) -> usize {
    let at = at.min(text.len());
    text.as_bytes()[..at].iter().filter(|&&b| b == b'\n').count() + 1
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(text, Path::new("/etc/kybernate/config.toml"))
    }

    #[test]
    fn empty_file_gives_defaults() {
        assert_eq!(parse("").unwrap(), Config::default());
    }

    #[test]
    fn documented_example_parses() {
        let c = parse(
            r#"
[runtime]
default = "runc"
gpu = "/usr/local/nvidia/toolkit/nvidia-container-runtime"
on_missing_gpu_runtime = "fallback"
allow_annotation_override = true
allowed = ["runc"]
[checkpoint]
root = "/srv/ckpt"
cuda = "driver-api"
allow_cross_namespace_restore = true
libcuda = "/usr/local/nvidia/lib64/libcuda.so.1"
cuda_lock_timeout_ms = 30000
allow_gpu_mismatch = true
allow_env_restore = true
allow_annotation_restore = false
cdi_spec_dirs = ["/srv/cdi"]
pre_dump_rounds = 2
compress = "zstd"
"#,
        )
        .unwrap();
        assert_eq!(c.runtime.on_missing_gpu_runtime, OnMissingGpuRuntime::Fallback);
        assert!(c.runtime.allow_annotation_override);
        assert_eq!(c.runtime.allowed, vec!["runc".to_string()]);
        assert_eq!(c.checkpoint.cuda, CudaMode::DriverApi);
        assert_eq!(c.checkpoint.root, PathBuf::from("/srv/ckpt"));
        assert!(c.checkpoint.allow_cross_namespace_restore);
        assert_eq!(c.checkpoint.libcuda, "/usr/local/nvidia/lib64/libcuda.so.1");
        assert_eq!(c.checkpoint.cuda_lock_timeout_ms, 30_000);
        assert!(c.checkpoint.allow_gpu_mismatch);
        assert!(c.checkpoint.allow_env_restore && !c.checkpoint.allow_annotation_restore);
        assert_eq!(c.checkpoint.cdi_spec_dirs, vec![PathBuf::from("/srv/cdi")]);
        assert_eq!(c.checkpoint.pre_dump_rounds, 2);
        assert_eq!(CheckpointConfig::default().pre_dump_rounds, 0, "pre-dump is opt-in");
        assert_eq!(c.checkpoint.compress, Compression::Zstd);
        assert_eq!(CheckpointConfig::default().compress, Compression::None, "docs/benchmarks.md: Compression");
    }

    #[test]
    fn signing_and_trust_keys_parse_and_must_be_absolute() {
        let c = parse(
            "[checkpoint]\nsigning_key = \"/etc/kybernate/keys/kybernate.key\"\n[trust]\nkeys = [\"/etc/kybernate/trusted/a.pub\"]\nrequire_signature = false\n",
        )
        .unwrap();
        assert_eq!(c.checkpoint.signing_key, Some(PathBuf::from("/etc/kybernate/keys/kybernate.key")));
        assert_eq!(c.trust.keys, vec![PathBuf::from("/etc/kybernate/trusted/a.pub")]);
        assert_eq!(c.trust.require_signature, Some(false));
        assert_eq!(parse("").unwrap().trust, TrustConfig::default());
        let msg = parse("[trust]\nkeys = [\n  \"/a.pub\",\n  \"b.pub\",\n]\n").unwrap_err().to_string();
        assert!(
            msg.starts_with("/etc/kybernate/config.toml:4: key `trust.keys`: \"b.pub\" is a relative path"),
            "{msg}"
        );
        let msg = parse("[checkpoint]\nsigning_key = \"k.key\"\n").unwrap_err().to_string();
        assert!(msg.starts_with("/etc/kybernate/config.toml:2: key `checkpoint.signing_key`: "), "{msg}");
        let msg = parse("[trust]\nrequire_signature = \"yes\"\n").unwrap_err().to_string();
        assert!(msg.contains("key `trust.require_signature`"), "{msg}");
        let msg = parse("[trust]\nkey = [\"/a.pub\"]\n").unwrap_err().to_string();
        assert!(msg.contains("unknown field `key`"), "{msg}");
    }

    #[test]
    fn restore_triggers_default_to_annotation_only() {
        let c = CheckpointConfig::default();
        assert!(!c.allow_env_restore, "any pod can set RESTORE_FROM: off unless the admin opts in");
        assert!(c.allow_annotation_restore);
    }

    #[test]
    fn retention_limits_take_bytes_or_binary_units() {
        let c = parse("[checkpoint]\nkeep = 3\nmax_bytes = \"200GiB\"\n").unwrap().checkpoint;
        assert_eq!((c.keep, c.max_bytes), (3, Some(200 << 30)));
        assert_eq!(parse("[checkpoint]\nmax_bytes = 4096\n").unwrap().checkpoint.max_bytes, Some(4096));
        for (text, bytes) in [("512 MiB", 512 << 20), ("1TiB", 1 << 40), ("7KiB", 7 << 10), ("10B", 10), ("10", 10)] {
            assert_eq!(parse_size(text), Ok(bytes), "{text}");
        }
        let d = CheckpointConfig::default();
        assert_eq!((d.keep, d.max_bytes), (0, None), "no limits unless the admin sets them");
        for (value, why) in [
            ("0", "must be more than 0 bytes"),
            ("-1", "must be more than 0 bytes"),
            ("\"0GiB\"", "must be more than 0 bytes"),
            ("\"200GB\"", "\"200GB\" is not a size"),
            ("\"GiB\"", "it needs a number"),
            ("\"99999999TiB\"", "is too large"),
            ("true", "a size: bytes"),
        ] {
            let msg = parse(&format!("[checkpoint]\n\nmax_bytes = {value}\n")).unwrap_err().to_string();
            assert!(msg.starts_with("/etc/kybernate/config.toml:3: key `checkpoint.max_bytes`: "), "{value}: {msg}");
            assert!(msg.contains(why), "{value}: {msg}");
        }
        let msg = parse("[checkpoint]\nkeep = -2\n").unwrap_err().to_string();
        assert!(msg.starts_with("/etc/kybernate/config.toml:2: key `checkpoint.keep`: "), "{msg}");
    }

    #[test]
    fn unknown_key_names_file_key_and_line() {
        let err = parse("[runtime]\ndefault = \"runc\"\nallow_anotation_override = true\n").unwrap_err();
        let msg = err.to_string();
        assert!(msg.starts_with("/etc/kybernate/config.toml:3: "), "{msg}");
        assert!(msg.contains("allow_anotation_override"), "{msg}");
        assert!(msg.contains("runtime"), "{msg}");
    }

    #[test]
    fn unknown_table_is_an_error() {
        let msg = parse("[runtimes]\ndefault = \"runc\"\n").unwrap_err().to_string();
        assert!(msg.starts_with("/etc/kybernate/config.toml:1: "), "{msg}");
        assert!(msg.contains("runtimes"), "{msg}");
    }

    #[test]
    fn wrong_type_names_the_key_and_line() {
        let msg = parse("[checkpoint]\n\nallow_cross_namespace_restore = \"yes\"\n").unwrap_err().to_string();
        assert!(
            msg.starts_with("/etc/kybernate/config.toml:3: key `checkpoint.allow_cross_namespace_restore`: "),
            "{msg}"
        );
    }

    #[test]
    fn bad_enum_value_is_an_error() {
        let msg = parse("[checkpoint]\ncuda = \"sometimes\"\n").unwrap_err().to_string();
        assert!(msg.contains("key `checkpoint.cuda`"), "{msg}");
        assert!(msg.contains(":2:"), "{msg}");
        let msg = parse("[runtime]\non_missing_gpu_runtime = \"ignore\"\n").unwrap_err().to_string();
        assert!(msg.contains("key `runtime.on_missing_gpu_runtime`"), "{msg}");
        let msg = parse("[checkpoint]\ncompress = \"gzip\"\n").unwrap_err().to_string();
        assert!(msg.starts_with("/etc/kybernate/config.toml:2: key `checkpoint.compress`: "), "{msg}");
        assert!(msg.contains("`none`") && msg.contains("`zstd`"), "names the allowed values: {msg}");
    }

    #[test]
    fn syntax_error_names_line() {
        let msg = parse("[runtime]\ndefault = runc\n").unwrap_err().to_string();
        assert!(msg.starts_with("/etc/kybernate/config.toml:2: "), "{msg}");
    }

    #[test]
    fn source_precedence() {
        let explicit = Path::new("/a.toml");
        let env = OsStr::new("/b.toml");
        assert_eq!(ConfigSource::resolve(Some(explicit), Some(env)), ConfigSource::Explicit("/a.toml".into()));
        assert_eq!(ConfigSource::resolve(None, Some(env)), ConfigSource::Explicit("/b.toml".into()));
        assert_eq!(
            ConfigSource::resolve(Some(Path::new("")), Some(OsStr::new(""))),
            ConfigSource::Default(DEFAULT_CONFIG_PATH.into())
        );
    }

    #[test]
    fn a_relative_store_root_is_refused_with_its_key_file_and_line() {
        let msg =
            parse("[runtime]\ndefault = \"runc\"\n[checkpoint]\nroot = \"ckpt/store\"\n").unwrap_err().to_string();
        assert!(msg.starts_with("/etc/kybernate/config.toml:4: key `checkpoint.root`: "), "{msg}");
        assert!(msg.contains("\"ckpt/store\" is a relative path"), "{msg}");
        let msg = parse("checkpoint.root = \".\"\n").unwrap_err().to_string();
        assert!(msg.starts_with("/etc/kybernate/config.toml:1: key `checkpoint.root`"), "{msg}");
        assert_eq!(parse("[checkpoint]\nroot = \"/srv/x\"\n").unwrap().checkpoint.root, PathBuf::from("/srv/x"));
    }

    #[test]
    fn registry_keys_parse_and_unknown_ones_are_named() {
        let c = parse(
            "[registry]\ninsecure = [\"127.0.0.1:5000\"]\nauth_file = \"/root/a.json\"\nca_file = \"/etc/ca.pem\"\n",
        )
        .unwrap();
        assert_eq!(c.registry.insecure, ["127.0.0.1:5000"]);
        assert_eq!(c.registry.auth_file.as_deref(), Some(Path::new("/root/a.json")));
        assert_eq!(c.registry.ca_file.as_deref(), Some(Path::new("/etc/ca.pem")));
        assert_eq!(parse("").unwrap().registry, RegistryConfig::default());
        let msg = parse("[registry]\ninsecur = []\n").unwrap_err().to_string();
        assert!(msg.contains("insecur"), "{msg}");
    }

    /// Loads `path` as an explicit config on a thread: the error, or a panic if it blocks.
    fn load_within(path: &Path, limit: std::time::Duration) -> String {
        let (tx, rx) = std::sync::mpsc::channel();
        let source = ConfigSource::Explicit(path.to_path_buf());
        std::thread::spawn(move || tx.send(Config::load(&source).map(|_| ()).map_err(|e| e.to_string())));
        match rx.recv_timeout(limit) {
            Ok(r) => r.expect_err("only a regular file is a config"),
            // The blocked thread stays behind; the test process ends with the test.
            Err(_) => panic!("loading {} blocked for {limit:?}", path.display()),
        }
    }

    /// containerd's `ConfigPath` naming a FIFO (or anything but a regular file) must fail the
    /// create at once, not hang it waiting for a writer.
    #[test]
    fn a_fifo_directory_or_oversized_config_is_refused_without_blocking() {
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("config.toml");
        let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
        // SAFETY: plain syscall with a valid NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0, "{}", std::io::Error::last_os_error());
        let limit = std::time::Duration::from_secs(5);
        let msg = load_within(&fifo, limit);
        assert!(
            msg.starts_with(&format!("{}: cannot read config file: a FIFO, not a regular file", fifo.display())),
            "{msg}"
        );
        // Through a symlink too (followed: config maps mount links), and a directory.
        let link = dir.path().join("link.toml");
        std::os::unix::fs::symlink(&fifo, &link).unwrap();
        assert!(load_within(&link, limit).contains("a FIFO, not a regular file"));
        assert!(load_within(dir.path(), limit).contains("a directory, not a regular file"));
        assert!(load_within(Path::new("/dev/null"), limit).contains("a device, not a regular file"));
        let big = dir.path().join("big.toml");
        std::fs::File::create(&big).unwrap().set_len(MAX_CONFIG_BYTES + 1).unwrap();
        assert!(load_within(&big, limit).contains("too big for a config file"));
        let ok = dir.path().join("ok.toml");
        std::fs::write(&ok, "[checkpoint]\nroot = \"/srv/x\"\n").unwrap();
        assert_eq!(Config::load(&ConfigSource::Explicit(ok)).unwrap().checkpoint.root, PathBuf::from("/srv/x"));
    }

    #[test]
    fn missing_default_file_means_defaults_but_missing_explicit_file_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("config.toml");
        assert_eq!(Config::load(&ConfigSource::Default(missing.clone())).unwrap(), Config::default());
        let msg = Config::load(&ConfigSource::Explicit(missing.clone())).unwrap_err().to_string();
        assert!(msg.starts_with(&format!("{}: cannot read config file", missing.display())), "{msg}");
    }
}
