//! Where a checkpoint came from (its origin marker) and whether this node trusts it enough to
//! restore it (the trust policy).
//!
//! A checkpoint holds process memory: restoring one runs whatever it holds. A checkpoint this
//! node took is as trustworthy as the node; one that came from outside (imported from an
//! archive, pulled from a registry) carries `kybernate.origin`, written by this node when it took
//! the checkpoint in, and must then be signed by a key the node trusts (`[trust] keys`) when the
//! policy asks for signatures. The marker is this node's own record: an archive or image that
//! contains one is refused on the way in.

use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::manifest::now_rfc3339;
use crate::signing::{self, PublicKey, SigningError, SIGNATURE_FILE};

/// The origin marker beside a checkpoint's manifest (never listed in it).
pub const ORIGIN_FILE: &str = "kybernate.origin";

/// An origin marker is a few hundred bytes.
const MAX_ORIGIN_BYTES: u64 = 64 * 1024;

/// How a checkpoint that this node did not take got into its store.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "source", rename_all = "lowercase")]
pub enum Origin {
    /// `kybernate import` (a Kybernate export or a kubelet/crictl checkpoint archive).
    Import { archive: String },
    /// `kybernate pull` or restore-on-create from `oci://`.
    Pull { reference: String, digest: String },
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Import { archive } => write!(f, "imported from {archive}"),
            Self::Pull { reference, digest } => write!(f, "pulled from {reference} ({digest})"),
        }
    }
}

/// The marker as stored: `{"source": "import"|"pull", …, "at": rfc3339}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OriginRecord {
    #[serde(flatten)]
    pub origin: Origin,
    /// When this node took the checkpoint in.
    pub at: String,
}

/// A checkpoint this node must not restore, or whose trust cannot be judged. Every variant names
/// the checkpoint or file at fault.
#[derive(Debug, thiserror::Error)]
pub enum TrustError {
    #[error("{}: invalid origin marker: {reason}", path.display())]
    Origin { path: PathBuf, reason: String },
    #[error(transparent)]
    Signing(#[from] SigningError),
    #[error("{}: refusing to restore a checkpoint {origin} that is not signed (no {SIGNATURE_FILE}): this node restores checkpoints from outside only when signed by a key in [trust] keys ({trusted}); set [trust] require_signature = false to allow unsigned ones", dir.display())]
    Unsigned { dir: PathBuf, origin: Origin, trusted: String },
    #[error("{}: refusing to restore a checkpoint {origin} signed by key {key_id}, which is not one of this node's trusted keys ([trust] keys: {trusted})", dir.display())]
    Untrusted { dir: PathBuf, origin: Origin, key_id: String, trusted: String },
    #[error("{}: the signature by trusted key {key_id} ({}) does not match this checkpoint's manifest: it was tampered with, or the signature belongs to another checkpoint", dir.display(), key_path.display())]
    BadSignature { dir: PathBuf, key_id: String, key_path: PathBuf },
}

/// Writes `dir/kybernate.origin` (0600, synced with `dir`). Call it on the hidden work directory
/// before it is renamed into the store, so a visible checkpoint from outside is never unmarked.
pub fn write_origin(dir: &Path, origin: &Origin) -> io::Result<()> {
    let record = OriginRecord { origin: origin.clone(), at: now_rfc3339() };
    let mut text = serde_json::to_vec_pretty(&record).map_err(io::Error::other)?;
    text.push(b'\n');
    let path = dir.join(ORIGIN_FILE);
    let mut f = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(&path)?;
    f.set_permissions(fs::Permissions::from_mode(0o600))?;
    f.write_all(&text)?;
    f.sync_all()?;
    File::open(dir)?.sync_all()
}

/// The origin of the checkpoint in `dir`; `None`: no marker, the checkpoint was taken on this node.
pub fn read_origin(dir: &Path) -> Result<Option<Origin>, TrustError> {
    Ok(read_origin_record(dir)?.map(|r| r.origin))
}

/// [`read_origin`] with the time the checkpoint was taken in.
pub fn read_origin_record(dir: &Path) -> Result<Option<OriginRecord>, TrustError> {
    let path = dir.join(ORIGIN_FILE);
    let bytes = match signing::read_bounded(&path, MAX_ORIGIN_BYTES) {
        Ok(b) => b,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(TrustError::Origin { path, reason: e.to_string() }),
    };
    serde_json::from_slice(&bytes).map(Some).map_err(|e| TrustError::Origin { path, reason: e.to_string() })
}

/// Which checkpoints this node restores: from `[trust] keys` and `[trust] require_signature`.
#[derive(Debug, Clone, Default)]
pub struct TrustPolicy {
    keys: Vec<(PathBuf, PublicKey)>,
    require_signature: bool,
}

impl TrustPolicy {
    /// `require_signature` unset: required exactly when keys are configured.
    pub fn new(keys: Vec<(PathBuf, PublicKey)>, require_signature: Option<bool>) -> Self {
        let require_signature = require_signature.unwrap_or(!keys.is_empty());
        Self { keys, require_signature }
    }

    /// Reads every key in `paths`; a key that cannot be read is an error naming its file (a node
    /// must not silently trust fewer keys than configured, nor restore with a broken policy).
    pub fn load(paths: &[PathBuf], require_signature: Option<bool>) -> Result<Self, SigningError> {
        let keys = paths.iter().map(|p| Ok((p.clone(), PublicKey::load(p)?))).collect::<Result<_, SigningError>>()?;
        Ok(Self::new(keys, require_signature))
    }

    pub fn keys(&self) -> &[(PathBuf, PublicKey)] {
        &self.keys
    }

    pub fn require_signature(&self) -> bool {
        self.require_signature
    }

    /// The trusted keys for an error message: `id (path), …`, or `none configured`.
    fn describe_keys(&self) -> String {
        if self.keys.is_empty() {
            return "none configured".into();
        }
        let keys: Vec<String> = self.keys.iter().map(|(p, k)| format!("{} ({})", k.key_id(), p.display())).collect();
        keys.join(", ")
    }
}

/// Why a checkpoint may be restored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TrustVerdict {
    /// Taken on this node (no origin marker).
    Local,
    /// From outside, signed by this trusted key.
    Trusted { origin: Origin, key_id: String, key_path: PathBuf },
    /// From outside, no signature by a trusted key, and the policy does not require one; `signed_by`
    /// is the key id an (untrusted) signature names, if any.
    Unverified { origin: Origin, signed_by: Option<String> },
}

impl fmt::Display for TrustVerdict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Local => f.write_str("taken on this node"),
            Self::Trusted { origin, key_id, .. } => write!(f, "{origin}, signed by trusted key {key_id}"),
            Self::Unverified { origin, signed_by: None } => {
                write!(f, "{origin}, unsigned (allowed: signatures not required)")
            }
            Self::Unverified { origin, signed_by: Some(id) } => {
                write!(f, "{origin}, signed by untrusted key {id} (allowed: signatures not required)")
            }
        }
    }
}

/// Whether the checkpoint in `dir` may be restored under `policy`. Local checkpoints pass.
/// Outside ones pass when signed by a trusted key; otherwise only when signatures are not
/// required. A signature that names a trusted key but does not verify is refused either way
/// (it is evidence of tampering). Run it before anything of the checkpoint is used.
pub fn check_trust(dir: &Path, policy: &TrustPolicy) -> Result<TrustVerdict, TrustError> {
    let Some(origin) = read_origin(dir)? else { return Ok(TrustVerdict::Local) };
    // A malformed signature is an error even when signatures are not required: never guess.
    let Some(signature) = signing::read_signature(dir)? else {
        if policy.require_signature {
            return Err(TrustError::Unsigned { dir: dir.to_path_buf(), origin, trusted: policy.describe_keys() });
        }
        return Ok(TrustVerdict::Unverified { origin, signed_by: None });
    };
    let manifest = signing::read_manifest_bytes(dir)?;
    // Every trusted key is tried: the key id in the file is only the signer's claim.
    if let Some((path, key)) = policy.keys.iter().find(|(_, k)| k.verifies(&manifest, &signature)) {
        return Ok(TrustVerdict::Trusted { origin, key_id: key.key_id().to_string(), key_path: path.clone() });
    }
    if let Some((path, key)) = policy.keys.iter().find(|(_, k)| k.key_id() == signature.key_id) {
        return Err(TrustError::BadSignature {
            dir: dir.to_path_buf(),
            key_id: key.key_id().to_string(),
            key_path: path.clone(),
        });
    }
    if policy.require_signature {
        return Err(TrustError::Untrusted {
            dir: dir.to_path_buf(),
            origin,
            key_id: signature.key_id,
            trusted: policy.describe_keys(),
        });
    }
    Ok(TrustVerdict::Unverified { origin, signed_by: Some(signature.key_id) })
}

/// [`check_trust`] under the policy of `[trust] keys` and `require_signature`, whose key files
/// are read only for a checkpoint from outside: a broken key file never stops a local restore.
pub fn check_trust_configured(
    dir: &Path,
    keys: &[PathBuf],
    require_signature: Option<bool>,
) -> Result<TrustVerdict, TrustError> {
    if read_origin(dir)?.is_none() {
        return Ok(TrustVerdict::Local);
    }
    check_trust(dir, &TrustPolicy::load(keys, require_signature)?)
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::MetadataExt;

    use super::*;
    use crate::manifest::MANIFEST_FILE;
    use crate::signing::SigningKey;

    fn import() -> Origin {
        Origin::Import { archive: "/tmp/job.tar.zst".into() }
    }

    #[test]
    fn origin_markers_round_trip_and_absence_means_local() {
        let d = tempfile::tempdir().unwrap();
        assert_eq!(read_origin(d.path()).unwrap(), None);
        let pull = Origin::Pull { reference: "registry:5000/jobs/a:v1".into(), digest: "sha256:ab".into() };
        for origin in [import(), pull] {
            write_origin(d.path(), &origin).unwrap();
            assert_eq!(read_origin(d.path()).unwrap(), Some(origin.clone()));
            let path = d.path().join(ORIGIN_FILE);
            assert_eq!(fs::metadata(&path).unwrap().mode() & 0o777, 0o600);
            let json: serde_json::Value = serde_json::from_slice(&fs::read(&path).unwrap()).unwrap();
            assert!(json["source"] == "import" || json["source"] == "pull", "{json}");
            assert!(humantime::parse_rfc3339(json["at"].as_str().unwrap()).is_ok(), "{json}");
        }
    }

    #[test]
    fn malformed_origin_markers_are_errors_naming_the_file() {
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join(ORIGIN_FILE);
        for text in ["", "{", r#"{"source":"teleport","at":"x"}"#, r#"{"source":"import","at":"x"}"#] {
            fs::write(&path, text).unwrap();
            let err = read_origin(d.path()).unwrap_err().to_string();
            assert!(err.contains(&path.display().to_string()) && err.contains("invalid origin marker"), "{err}");
        }
        fs::remove_file(&path).unwrap();
        std::os::unix::fs::symlink("/etc/hostname", &path).unwrap();
        assert!(read_origin(d.path()).is_err(), "a symlink is not followed");
    }

    struct Bed {
        _tmp: tempfile::TempDir,
        dir: PathBuf,
        signer: SigningKey,
        signer_pub: PathBuf,
        other_pub: PathBuf,
    }

    fn bed() -> Bed {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("cp");
        fs::create_dir(&dir).unwrap();
        fs::write(dir.join(MANIFEST_FILE), br#"{"format_version":2}"#).unwrap();
        let a = signing::write_key_pair(&tmp.path().join("a"), false).unwrap();
        let b = signing::write_key_pair(&tmp.path().join("b"), false).unwrap();
        let signer = SigningKey::load(&a.private).unwrap();
        Bed { dir, signer, signer_pub: a.public, other_pub: b.public, _tmp: tmp }
    }

    fn policy(keys: &[&PathBuf], require: Option<bool>) -> TrustPolicy {
        let keys: Vec<PathBuf> = keys.iter().map(|p| (*p).clone()).collect();
        TrustPolicy::load(&keys, require).unwrap()
    }

    #[test]
    fn the_trust_policy_table() {
        let b = bed();
        let none = TrustPolicy::default();
        let signer = policy(&[&b.other_pub, &b.signer_pub], None);
        let other = policy(&[&b.other_pub], None);
        let other_lenient = policy(&[&b.other_pub], Some(false));
        assert!(signer.require_signature() && !none.require_signature());

        // Local checkpoints pass whatever the policy, signed or not.
        for p in [&none, &signer, &other] {
            assert_eq!(check_trust(&b.dir, p).unwrap(), TrustVerdict::Local);
        }

        // Imported, unsigned.
        write_origin(&b.dir, &import()).unwrap();
        let unverified = TrustVerdict::Unverified { origin: import(), signed_by: None };
        assert_eq!(check_trust(&b.dir, &none).unwrap(), unverified, "no keys: nothing required");
        assert_eq!(check_trust(&b.dir, &other_lenient).unwrap(), unverified, "require_signature = false");
        let err = check_trust(&b.dir, &signer).unwrap_err();
        assert!(matches!(err, TrustError::Unsigned { .. }), "{err}");
        assert!(err.to_string().contains("not signed") && err.to_string().contains("require_signature"), "{err}");
        let required = TrustPolicy::new(Vec::new(), Some(true));
        let err = check_trust(&b.dir, &required).unwrap_err().to_string();
        assert!(err.contains("none configured"), "{err}");

        // Imported, signed by the signer.
        b.signer.sign_dir(&b.dir).unwrap();
        let id = b.signer.key_id().to_string();
        match check_trust(&b.dir, &signer).unwrap() {
            TrustVerdict::Trusted { key_id, key_path, .. } => {
                assert_eq!((key_id, key_path), (id.clone(), b.signer_pub.clone()))
            }
            v => panic!("{v:?}"),
        }
        let err = check_trust(&b.dir, &other).unwrap_err();
        assert!(matches!(&err, TrustError::Untrusted { key_id, .. } if *key_id == id), "{err}");
        assert!(err.to_string().contains(&id) && err.to_string().contains("not one of"), "{err}");
        let lenient = check_trust(&b.dir, &other_lenient).unwrap();
        assert_eq!(lenient, TrustVerdict::Unverified { origin: import(), signed_by: Some(id.clone()) });

        // The manifest changed after signing: refused by the trusted key, even when lenient.
        fs::write(b.dir.join(MANIFEST_FILE), br#"{"format_version":3}"#).unwrap();
        let err = check_trust(&b.dir, &signer).unwrap_err();
        assert!(matches!(&err, TrustError::BadSignature { key_id, .. } if *key_id == id), "{err}");
        let lenient_signer = policy(&[&b.signer_pub], Some(false));
        assert!(matches!(check_trust(&b.dir, &lenient_signer), Err(TrustError::BadSignature { .. })));

        // A garbage signature is an error naming the file, under any policy.
        fs::write(b.dir.join(SIGNATURE_FILE), b"garbage").unwrap();
        for p in [&none, &signer] {
            let err = check_trust(&b.dir, p).unwrap_err().to_string();
            assert!(err.contains(SIGNATURE_FILE), "{err}");
        }
    }

    #[test]
    fn a_policy_with_an_unreadable_key_is_an_error_naming_it() {
        let d = tempfile::tempdir().unwrap();
        let missing = d.path().join("gone.pub");
        let keys = [missing];
        let err = TrustPolicy::load(&keys, None).unwrap_err().to_string();
        assert!(err.contains("gone.pub"), "{err}");
        // Read only for a checkpoint from outside.
        assert_eq!(check_trust_configured(d.path(), &keys, None).unwrap(), TrustVerdict::Local);
        write_origin(d.path(), &import()).unwrap();
        let err = check_trust_configured(d.path(), &keys, None).unwrap_err().to_string();
        assert!(err.contains("gone.pub"), "{err}");
    }
}
