//! `kybernate push` and `kybernate pull`: checkpoints to and from OCI registries, with the
//! node's `[registry]` settings and trust policy (the library is `kybernate-registry`).

use std::process::ExitCode;
use std::time::{Duration, Instant};

use kybernate_checkpoint::trust::TrustPolicy;
use kybernate_checkpoint::Store;
use kybernate_registry::{Reference, RegistryError, Settings, Transfer, OCI_PREFIX};
use kybernate_runtime_select::Config;
use serde::Serialize;

use crate::error::CliError;
use crate::output::{self, human_size, Output};
use crate::store::{self, Checkpoint};

/// The registry settings of the node's config, with `--plain-http`.
pub fn settings(config: &Config, plain_http: bool) -> Settings {
    Settings {
        insecure: config.registry.insecure.clone(),
        plain_http,
        auth_file: config.registry.auth_file.clone(),
        ca_file: config.registry.ca_file.clone(),
    }
}

/// A reference as the user wrote it, `oci://` optional.
pub fn parse_reference(text: &str) -> Result<Reference, CliError> {
    Reference::parse(text.strip_prefix(OCI_PREFIX).unwrap_or(text))
        .map_err(|e| CliError::Usage(format!("{e}; write it as host[:port]/repository:tag or …@sha256:<digest>")))
}

/// A registry failure with what to do next.
fn failed(e: RegistryError) -> CliError {
    let hint = match &e {
        RegistryError::Reference(_) => return CliError::Usage(e.to_string()),
        RegistryError::Connect { .. } => "check that the registry runs and is reachable from this node",
        RegistryError::Tls { .. } => {
            "for a private CA set [registry] ca_file; for a plain-HTTP registry use --plain-http or [registry] insecure"
        }
        RegistryError::Unauthorized { .. } => {
            "check the credentials for this registry in [registry] auth_file (Docker's config.json)"
        }
        RegistryError::NotFound { .. } => "check the repository and tag (push it first)",
        RegistryError::DigestMismatch { .. } => {
            "the registry's copy is damaged or was replaced; nothing was stored; push the checkpoint again"
        }
        RegistryError::BadImage { .. } => "it is not a checkpoint image pushed by `kybernate push`; nothing was stored",
        RegistryError::Verify { .. } => "the checkpoint does not verify; nothing was stored",
        RegistryError::Refused { .. } => "nothing was stored",
        RegistryError::AuthFile(_) => "fix the file or [registry] auth_file in the Kybernate config",
        _ => "nothing was changed",
    };
    CliError::Failed(format!("{e}; {hint}"))
}

/// `kybernate push CHECKPOINT REF`.
pub fn push(
    store: &Store,
    config: &Config,
    out: Output,
    checkpoint: &str,
    reference: &str,
    plain_http: bool,
) -> Result<ExitCode, CliError> {
    let cp = store::resolve(store, checkpoint)?;
    let reference = parse_reference(reference)?;
    let mut line = Line::new(out, "push");
    let pushed = kybernate_registry::push(&cp.path, &reference, &settings(config, plain_http), &mut |t| line.show(t))
        .map_err(|e| match e {
        e @ RegistryError::Verify { .. } => {
            CliError::Failed(format!("{e}; the checkpoint is broken, nothing was pushed"))
        }
        e => failed(e),
    })?;
    drop(line);
    match out {
        Output::Json => output::json(&pushed)?,
        Output::Table => output::write(&format!(
            "pushed {} to {} ({}, {} of {} uploaded)\n",
            cp.id,
            pushed.reference,
            pushed.digest,
            human_size(pushed.bytes_uploaded),
            human_size(pushed.bytes_total)
        ))?,
    }
    Ok(ExitCode::SUCCESS)
}

/// `kybernate pull -o json`: the checkpoint object plus where it came from.
#[derive(Serialize)]
struct PulledJson<'a> {
    #[serde(flatten)]
    checkpoint: &'a Checkpoint,
    digest: &'a str,
    bytes_downloaded: u64,
}

/// Pulls `reference` into the store (verified, trust-checked) and returns the checkpoint.
pub fn pull_into_store(
    store: &Store,
    config: &Config,
    reference: &Reference,
    plain_http: bool,
    namespace: Option<&str>,
    progress: &mut dyn FnMut(Transfer),
) -> Result<(Checkpoint, kybernate_registry::Pulled), CliError> {
    let trust = TrustPolicy::load(&config.trust.keys, config.trust.require_signature)
        .map_err(|e| CliError::Failed(format!("{e}; fix [trust] keys in the Kybernate config")))?;
    let options = kybernate_registry::PullOptions {
        settings: settings(config, plain_http),
        namespace: namespace.map(str::to_string),
        trust: &trust,
    };
    let pulled = kybernate_registry::pull(reference, store, &options, progress).map_err(failed)?;
    let root = std::fs::canonicalize(store.root()).unwrap_or_else(|_| store.root().to_path_buf());
    let path = std::fs::canonicalize(&pulled.path).unwrap_or_else(|_| pulled.path.clone());
    Ok((Checkpoint::load(&root, &path), pulled))
}

/// `kybernate pull REF`.
pub fn pull(
    store: &Store,
    config: &Config,
    out: Output,
    reference: &str,
    plain_http: bool,
    namespace: Option<&str>,
) -> Result<ExitCode, CliError> {
    let reference = parse_reference(reference)?;
    let mut line = Line::new(out, "pull");
    let (cp, pulled) = pull_into_store(store, config, &reference, plain_http, namespace, &mut |t| line.show(t))?;
    drop(line);
    match out {
        Output::Json => output::json(&PulledJson {
            checkpoint: &cp,
            digest: &pulled.digest,
            bytes_downloaded: pulled.bytes_downloaded,
        })?,
        Output::Table => {
            let how = if pulled.bytes_downloaded == 0 {
                "already in the store".to_string()
            } else {
                format!("{} downloaded", human_size(pulled.bytes_downloaded))
            };
            output::write(&format!(
                "pulled {reference} ({}, {how}) as {}\n{}",
                pulled.digest,
                cp.id,
                output::table(std::slice::from_ref(&cp))
            ))?
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Whether a CHECKPOINT argument is a registry reference.
pub fn is_oci(reference: &str) -> bool {
    reference.starts_with(OCI_PREFIX)
}

/// A progress line on stderr (a terminal, table output only), redrawn at most every 250 ms.
struct Line {
    verb: &'static str,
    shown: bool,
    last: Option<Instant>,
}

impl Line {
    fn new(out: Output, verb: &'static str) -> Self {
        let shown = out == Output::Table && std::io::IsTerminal::is_terminal(&std::io::stderr());
        Self { verb, shown, last: None }
    }

    fn show(&mut self, t: Transfer) {
        use std::io::Write;
        let now = Instant::now();
        if !self.shown || self.last.is_some_and(|l| now.duration_since(l) < Duration::from_millis(250)) {
            return;
        }
        self.last = Some(now);
        let mut err = std::io::stderr().lock();
        let _ = write!(err, "\r{}: {} of {}\x1b[K", self.verb, human_size(t.done), human_size(t.total));
        let _ = err.flush();
    }
}

impl Drop for Line {
    fn drop(&mut self) {
        use std::io::Write;
        if self.shown && self.last.is_some() {
            let mut err = std::io::stderr().lock();
            let _ = write!(err, "\r\x1b[K");
            let _ = err.flush();
        }
    }
}
