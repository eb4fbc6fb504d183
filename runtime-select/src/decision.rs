//! The decision itself: which runtime binary a bundle is exec'd with, and why.

use std::ffi::OsString;
use std::fmt;
use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::config::{Config, ConfigError, ConfigSource, OnMissingGpuRuntime, CONFIG_ENV};
use crate::evidence::{self, Evidence};
use crate::resolve::{resolve, ResolveError};
use crate::spec::{BundleError, SpecView};

/// Environment override: forces one runtime for every container (seed design).
pub const RUNTIME_ENV: &str = "KYBERNATE_RUNTIME";
/// Annotation a pod may use to pick a runtime, if the config allows it.
pub const RUNTIME_ANNOTATION: &str = "kybernate.io/runtime";

/// Which rule made the decision (first match wins, in this order).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Source {
    /// `$KYBERNATE_RUNTIME` in the shim's environment.
    Env,
    /// `BinaryName` in containerd's runc options.
    Options,
    /// The `kybernate.io/runtime` annotation.
    Annotation,
    /// GPU evidence in the bundle.
    Gpu,
    /// Nothing else matched (or the GPU runtime was missing under `fallback`).
    Default,
}

impl Source {
    /// The name used in `--json` output and in the shim's runtime record.
    pub fn as_str(self) -> &'static str {
        match self {
            Source::Env => "env",
            Source::Options => "options",
            Source::Annotation => "annotation",
            Source::Gpu => "gpu",
            Source::Default => "default",
        }
    }
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Source::Env => "env KYBERNATE_RUNTIME",
            Source::Options => "containerd runc option BinaryName",
            Source::Annotation => "annotation kybernate.io/runtime",
            Source::Gpu => "GPU evidence",
            Source::Default => "default runtime",
        })
    }
}

/// The outcome, with everything needed to explain it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    /// Absolute path of the binary to exec.
    pub runtime: PathBuf,
    /// Whether the container gets GPU devices (`NVIDIA_VISIBLE_DEVICES=none` alone does not).
    pub gpu: bool,
    pub source: Source,
    /// Every item of GPU evidence found, whichever rule decided.
    pub evidence: Vec<Evidence>,
    /// Things an operator should know (a fallback, an ignored annotation).
    pub warnings: Vec<String>,
}

/// The stable JSON form printed by `kybernate-select --json`.
#[derive(Debug, Serialize)]
pub struct DecisionJson<'a> {
    pub runtime: &'a Path,
    pub gpu: bool,
    pub source: Source,
    pub evidence: Vec<String>,
}

impl Decision {
    pub fn to_json(&self) -> DecisionJson<'_> {
        DecisionJson {
            runtime: &self.runtime,
            gpu: self.gpu,
            source: self.source,
            evidence: self.evidence.iter().map(ToString::to_string).collect(),
        }
    }
}

/// What the shim knows besides the bundle.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Context {
    /// Value of `$KYBERNATE_RUNTIME`, if set.
    pub env_override: Option<String>,
    /// `BinaryName` from `containerd.runc.v1.Options`, if containerd sent one.
    pub binary_name: Option<String>,
    /// `$PATH` to search for runtimes by name.
    pub search_path: Option<OsString>,
}

impl Context {
    /// The context of the current process (`$KYBERNATE_RUNTIME`, `$PATH`).
    pub fn from_process_env(binary_name: Option<String>) -> Self {
        Self { env_override: std::env::var(RUNTIME_ENV).ok(), binary_name, search_path: std::env::var_os("PATH") }
    }
}

/// Why no runtime could be chosen.
#[derive(Debug, thiserror::Error)]
pub enum SelectError {
    #[error(transparent)]
    Bundle(#[from] BundleError),
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("runtime from {source_rule} cannot be used: {err}")]
    Runtime {
        source_rule: Source,
        #[source]
        err: ResolveError,
    },
    #[error("{config}: the bundle wants GPUs ({evidence}) but the GPU runtime ([runtime] gpu = {gpu:?}) cannot be used: {err}; install it, or set [runtime] on_missing_gpu_runtime = \"fallback\" to start such containers with the default runtime")]
    GpuRuntimeMissing {
        config: PathBuf,
        gpu: String,
        evidence: String,
        #[source]
        err: ResolveError,
    },
    #[error(
        "{config}: annotation {RUNTIME_ANNOTATION}={value:?} names a runtime not in [runtime] allowed {allowed:?}"
    )]
    AnnotationNotAllowed { config: PathBuf, value: String, allowed: Vec<String> },
    #[error("{config}: default runtime ([runtime] default = {default:?}) cannot be used: {err}")]
    DefaultRuntime {
        config: PathBuf,
        default: String,
        #[source]
        err: ResolveError,
    },
}

/// Reads `<bundle>/config.json` as a lenient [`SpecView`].
pub fn load_spec(bundle: &Path) -> Result<SpecView, BundleError> {
    SpecView::load(bundle)
}

/// A loaded config plus the process context: makes decisions for bundles.
#[derive(Debug, Clone)]
pub struct Selector {
    pub config: Config,
    /// The file the config came from (or would have), for messages.
    pub config_path: PathBuf,
    pub context: Context,
}

impl Selector {
    /// Loads the config the documented way: `config_path` (containerd's
    /// `ConfigPath`, `--config`) first, then `$KYBERNATE_CONFIG`, then the default file.
    pub fn load(config_path: Option<&Path>, context: Context) -> Result<Self, ConfigError> {
        let source = ConfigSource::resolve(config_path, std::env::var_os(CONFIG_ENV).as_deref());
        let config = Config::load(&source)?;
        Ok(Self { config, config_path: source.path().to_path_buf(), context })
    }

    /// Decides for the bundle in directory `bundle`.
    pub fn select_bundle(&self, bundle: &Path) -> Result<Decision, SelectError> {
        let spec = load_spec(bundle)?;
        self.select(&spec)
    }

    /// Decides for an already parsed spec.
    pub fn select(&self, spec: &SpecView) -> Result<Decision, SelectError> {
        let evidence = evidence::collect(spec);
        let gpu = evidence.iter().any(Evidence::wants_gpu_devices);
        let mut warnings = Vec::new();
        let search = self.context.search_path.as_deref();
        let decided = |runtime: PathBuf, source: Source, evidence: Vec<Evidence>, warnings: Vec<String>| Decision {
            runtime,
            gpu,
            source,
            evidence,
            warnings,
        };
        let forced = |value: &str, source_rule: Source| {
            resolve(value, search).map_err(|err| SelectError::Runtime { source_rule, err })
        };

        if let Some(name) = non_empty(&self.context.env_override) {
            return Ok(decided(forced(name, Source::Env)?, Source::Env, evidence, warnings));
        }
        if let Some(name) = non_empty(&self.context.binary_name) {
            return Ok(decided(forced(name, Source::Options)?, Source::Options, evidence, warnings));
        }

        let rt = &self.config.runtime;
        let annotation = spec.annotation(RUNTIME_ANNOTATION);
        if let Some(value) = annotation {
            if !rt.allow_annotation_override {
                warnings.push(format!(
                    "annotation {RUNTIME_ANNOTATION}={value:?} ignored: [runtime] allow_annotation_override is false in {}",
                    self.config_path.display()
                ));
            } else if !rt.allowed.iter().any(|a| a == value) {
                return Err(SelectError::AnnotationNotAllowed {
                    config: self.config_path.clone(),
                    value: value.to_string(),
                    allowed: rt.allowed.clone(),
                });
            } else {
                return Ok(decided(forced(value, Source::Annotation)?, Source::Annotation, evidence, warnings));
            }
        }

        if !evidence.is_empty() {
            match resolve(&rt.gpu, search) {
                Ok(path) => return Ok(decided(path, Source::Gpu, evidence, warnings)),
                Err(err) if rt.on_missing_gpu_runtime == OnMissingGpuRuntime::Error => {
                    return Err(SelectError::GpuRuntimeMissing {
                        config: self.config_path.clone(),
                        gpu: rt.gpu.clone(),
                        evidence: evidence[0].to_string(),
                        err,
                    });
                }
                Err(err) => warnings.push(format!(
                    "GPU evidence found but the GPU runtime cannot be used ({err}); falling back to the default runtime \
                     because [runtime] on_missing_gpu_runtime = \"fallback\" in {}: the container gets no GPUs",
                    self.config_path.display()
                )),
            }
        }

        let default = resolve(&rt.default, search).map_err(|err| SelectError::DefaultRuntime {
            config: self.config_path.clone(),
            default: rt.default.clone(),
            err,
        })?;
        Ok(decided(default, Source::Default, evidence, warnings))
    }
}

fn non_empty(v: &Option<String>) -> Option<&str> {
    v.as_deref().filter(|s| !s.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn source_names_match_the_json_form() {
        for s in [Source::Env, Source::Options, Source::Annotation, Source::Gpu, Source::Default] {
            assert_eq!(serde_json::to_value(s).unwrap(), serde_json::Value::from(s.as_str()));
        }
    }
}
