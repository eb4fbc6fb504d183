//! Checkpoint signatures and the trust policy on the command line: `kybernate keygen`, what
//! `kybernate inspect` shows of a checkpoint's signature and origin, and the trust check of
//! `kybernate restore` (the shim checks it again at Create).

use std::path::Path;
use std::process::ExitCode;

use kybernate_checkpoint::signing::{self, SignatureState, SigningError};
use kybernate_checkpoint::trust::{self, Origin, TrustVerdict};
use kybernate_runtime_select::TrustConfig;
use serde::Serialize;

use crate::error::CliError;
use crate::output::{self, Output};

/// `kybernate keygen DIR [--force]`: a new Ed25519 key pair in `DIR`.
pub fn keygen(out: Output, dir: &Path, force: bool) -> Result<ExitCode, CliError> {
    let pair = signing::write_key_pair(dir, force).map_err(|e| match e {
        e @ SigningError::KeyExists { .. } => CliError::Usage(e.to_string()),
        e => CliError::Failed(format!("{e}; check that {} is writable by you", dir.display())),
    })?;
    match out {
        Output::Json => output::json(&pair)?,
        Output::Table => output::write(&format!(
            "key id:  {}\nprivate: {} (0600: keep it on the signing node only; [checkpoint] signing_key)\npublic:  {} (copy it to the nodes that restore; [trust] keys)\n",
            pair.key_id,
            pair.private.display(),
            pair.public.display()
        ))?,
    }
    Ok(ExitCode::SUCCESS)
}

/// `kybernate restore`'s trust check, before anything of the checkpoint is read: the refusal
/// names the key that signed it, or says that none did.
pub fn check_restore(id: &str, dir: &Path, trust: &TrustConfig) -> Result<TrustVerdict, CliError> {
    trust::check_trust_configured(dir, &trust.keys, trust.require_signature)
        .map_err(|e| CliError::Refused { id: id.to_string(), reasons: e.to_string() })
}

/// `inspect -o json`'s `signature`: `{"state": "signed"|"unsigned"|"invalid", "key_id", "error"}`.
#[derive(Debug, Serialize, PartialEq, Eq)]
pub struct SignatureInfo {
    pub state: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub key_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// `inspect -o json`'s `origin`: `{"source": "local"}`, or the marker's fields
/// (`"import"` with `archive`, `"pull"` with `reference` and `digest`, and `at`), or
/// `{"source": "invalid", "error"}`.
#[derive(Debug, Serialize, PartialEq, Eq)]
pub struct OriginInfo {
    pub source: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub archive: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reference: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub digest: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub at: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

pub fn signature_info(dir: &Path) -> SignatureInfo {
    match signing::signature_state(dir) {
        SignatureState::Unsigned => SignatureInfo { state: "unsigned", key_id: None, error: None },
        SignatureState::Signed { key_id } => SignatureInfo { state: "signed", key_id: Some(key_id), error: None },
        SignatureState::Invalid { reason } => SignatureInfo { state: "invalid", key_id: None, error: Some(reason) },
    }
}

pub fn origin_info(dir: &Path) -> OriginInfo {
    let mut info = OriginInfo { source: "local", archive: None, reference: None, digest: None, at: None, error: None };
    match trust::read_origin_record(dir) {
        Ok(None) => {}
        Ok(Some(record)) => {
            info.at = Some(record.at);
            match record.origin {
                Origin::Import { archive } => (info.source, info.archive) = ("import", Some(archive)),
                Origin::Pull { reference, digest } => {
                    (info.source, info.reference, info.digest) = ("pull", Some(reference), Some(digest))
                }
            }
        }
        Err(e) => (info.source, info.error) = ("invalid", Some(e.to_string())),
    }
    info
}

/// `inspect`'s human lines: `signature` and `origin`.
pub fn detail_lines(dir: &Path) -> Vec<(&'static str, String)> {
    let signature = match signing::signature_state(dir) {
        SignatureState::Signed { key_id } => {
            format!("signed by key {key_id} (checked against [trust] keys at restore)")
        }
        SignatureState::Unsigned => "unsigned".to_string(),
        SignatureState::Invalid { reason } => format!("INVALID: {reason}"),
    };
    let origin = match trust::read_origin_record(dir) {
        Ok(None) => "taken on this node".to_string(),
        Ok(Some(record)) => format!("{} at {}", record.origin, record.at),
        Err(e) => format!("INVALID: {e}"),
    };
    vec![("signature", signature), ("origin", origin)]
}
