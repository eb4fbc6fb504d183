//! Checkpoint signatures: Ed25519 key pairs in PEM files, and `kybernate.sig`, a signature over
//! the exact bytes of the checkpoint's manifest (which lists every file by digest).
//!
//! Keys are PEM: PKCS#8 for the private key, SPKI for the public one (what `openssl pkey`
//! reads and writes). A key is named by its id, `sha256:` and the first 16 hex digits of the
//! SHA-256 of its SPKI DER, so a refusal can say which key signed a checkpoint. Every file read
//! here can come from outside the node: a malformed one is an error naming it, never a panic.

use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use base64::Engine as _;
use ed25519_dalek::pkcs8::spki::der::pem::LineEnding;
use ed25519_dalek::pkcs8::{DecodePrivateKey, DecodePublicKey, EncodePrivateKey, EncodePublicKey};
use ed25519_dalek::Signer as _;
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

use crate::manifest::MANIFEST_FILE;

/// The signature beside a checkpoint's manifest (never listed in it: it signs the manifest).
pub const SIGNATURE_FILE: &str = "kybernate.sig";
/// `kybernate keygen DIR` writes `DIR/kybernate.key` (private, 0600) and `DIR/kybernate.pub`.
pub const PRIVATE_KEY_FILE: &str = "kybernate.key";
pub const PUBLIC_KEY_FILE: &str = "kybernate.pub";
/// The only algorithm a signature file may name.
pub const ALGORITHM: &str = "ed25519";

/// Key and signature files are a few hundred bytes; anything much larger is not one.
const MAX_SMALL_FILE: u64 = 64 * 1024;
/// A manifest lists every file of a checkpoint; even millions of files stay below this.
const MAX_MANIFEST: u64 = 256 * 1024 * 1024;

/// A key or signature file that cannot be used. Every variant names the file.
#[derive(Debug, thiserror::Error)]
pub enum SigningError {
    #[error("{}: cannot {what}: {source}", path.display())]
    Io {
        path: PathBuf,
        what: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("{}: not an Ed25519 {kind} key in PEM ({pem}): {reason}", path.display())]
    BadKey { path: PathBuf, kind: &'static str, pem: &'static str, reason: String },
    #[error("{}: invalid checkpoint signature file: {reason}", path.display())]
    BadSignatureFile { path: PathBuf, reason: String },
    #[error("{}: unsupported signature algorithm {found:?} (this Kybernate verifies \"{ALGORITHM}\" signatures)", path.display())]
    UnknownAlgorithm { path: PathBuf, found: String },
    #[error("{}: a key already exists there (pass --force to replace it; checkpoints signed by the old key then no longer verify against the new one)", path.display())]
    KeyExists { path: PathBuf },
}

fn io_err(what: &'static str, path: &Path) -> impl FnOnce(io::Error) -> SigningError {
    let path = path.to_path_buf();
    move |source| SigningError::Io { path, what, source }
}

/// Reads a regular file (not through a symlink) of at most `max` bytes.
pub(crate) fn read_bounded(path: &Path, max: u64) -> io::Result<Vec<u8>> {
    let f = OpenOptions::new().read(true).custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK).open(path)?;
    let meta = f.metadata()?;
    if !meta.is_file() {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, "not a regular file"));
    }
    if meta.len() > max {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("{} bytes, more than the {max} such a file can have", meta.len()),
        ));
    }
    let mut out = Vec::with_capacity(meta.len() as usize);
    f.take(max + 1).read_to_end(&mut out)?;
    if out.len() as u64 > max {
        return Err(io::Error::new(io::ErrorKind::InvalidData, format!("more than {max} bytes")));
    }
    Ok(out)
}

/// Writes `bytes` to `path` (created or truncated, not through a symlink) with `mode`, synced.
fn write_synced(path: &Path, bytes: &[u8], mode: u32) -> io::Result<()> {
    let mut f = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)?;
    // An existing file keeps its mode on open: set it (a private key must never stay readable).
    f.set_permissions(fs::Permissions::from_mode(mode))?;
    f.write_all(bytes)?;
    f.sync_all()
}

fn sync_parent(path: &Path) -> io::Result<()> {
    let dir = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    File::open(dir)?.sync_all()
}

/// The key id of an SPKI DER public key: `sha256:` + the first 16 hex digits of its SHA-256.
fn key_id_of(spki_der: &[u8]) -> String {
    let digest = Sha256::digest(spki_der);
    let hex: String = digest.iter().take(8).map(|b| format!("{b:02x}")).collect();
    format!("sha256:{hex}")
}

/// A public key a node trusts (or a signer's own), with its id.
#[derive(Clone, PartialEq, Eq)]
pub struct PublicKey {
    key: ed25519_dalek::VerifyingKey,
    id: String,
}

impl fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PublicKey").field("id", &self.id).finish()
    }
}

impl PublicKey {
    fn new(key: ed25519_dalek::VerifyingKey) -> Self {
        // Encoding 32 bytes as SPKI cannot fail; fall back to the raw bytes all the same.
        let id = match key.to_public_key_der() {
            Ok(der) => key_id_of(der.as_bytes()),
            Err(_) => key_id_of(key.as_bytes()),
        };
        Self { key, id }
    }

    /// Reads an SPKI PEM public key file (`-----BEGIN PUBLIC KEY-----`).
    pub fn load(path: &Path) -> Result<Self, SigningError> {
        let bytes = read_bounded(path, MAX_SMALL_FILE).map_err(io_err("read public key", path))?;
        let bad = |reason: String| SigningError::BadKey {
            path: path.to_path_buf(),
            kind: "public",
            pem: "-----BEGIN PUBLIC KEY-----, as `kybernate keygen` writes",
            reason,
        };
        let text = std::str::from_utf8(&bytes).map_err(|_| bad("not text".into()))?;
        Self::from_pem(text).map_err(bad)
    }

    /// Parses SPKI PEM text; the error says what is wrong with it.
    pub fn from_pem(text: &str) -> Result<Self, String> {
        let key = ed25519_dalek::VerifyingKey::from_public_key_pem(text.trim()).map_err(|e| e.to_string())?;
        if key.is_weak() {
            return Err("a weak (small-order) Ed25519 point, which would verify forged signatures".into());
        }
        Ok(Self::new(key))
    }

    /// The key as SPKI PEM text.
    pub fn to_pem(&self) -> String {
        self.key.to_public_key_pem(LineEnding::LF).unwrap_or_default()
    }

    /// `sha256:` + 16 hex digits: what refusals and `kybernate inspect` name the key by.
    pub fn key_id(&self) -> &str {
        &self.id
    }

    /// Whether `signature` is this key's (strict Ed25519: no malleable encodings) over `message`.
    pub fn verifies(&self, message: &[u8], signature: &Signature) -> bool {
        self.key.verify_strict(message, &signature.signature).is_ok()
    }
}

/// A private key, kept by the node that signs its checkpoints (`[checkpoint] signing_key`).
/// The secret is zeroed when dropped (ed25519-dalek's `zeroize`).
#[derive(Clone)]
pub struct SigningKey {
    key: ed25519_dalek::SigningKey,
    public: PublicKey,
}

impl fmt::Debug for SigningKey {
    // Never the secret.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SigningKey").field("id", &self.public.id).finish_non_exhaustive()
    }
}

impl SigningKey {
    fn new(key: ed25519_dalek::SigningKey) -> Self {
        let public = PublicKey::new(key.verifying_key());
        Self { key, public }
    }

    /// A fresh key from the kernel's random source (`getrandom(2)`).
    pub fn generate() -> io::Result<Self> {
        let mut seed = [0u8; 32];
        let mut filled = 0;
        while filled < seed.len() {
            // SAFETY: writes at most the remaining length into our own buffer.
            let n = unsafe { libc::getrandom(seed[filled..].as_mut_ptr().cast(), seed.len() - filled, 0) };
            if n < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
            filled += n as usize;
        }
        let key = ed25519_dalek::SigningKey::from_bytes(&seed);
        seed.fill(0);
        Ok(Self::new(key))
    }

    /// Reads a PKCS#8 PEM private key file (`-----BEGIN PRIVATE KEY-----`).
    pub fn load(path: &Path) -> Result<Self, SigningError> {
        let bytes = read_bounded(path, MAX_SMALL_FILE).map_err(io_err("read private key", path))?;
        let bad = |reason: String| SigningError::BadKey {
            path: path.to_path_buf(),
            kind: "private",
            pem: "PKCS#8, -----BEGIN PRIVATE KEY-----, as `kybernate keygen` writes",
            reason,
        };
        let text = std::str::from_utf8(&bytes).map_err(|_| bad("not text".into()))?;
        let key = ed25519_dalek::SigningKey::from_pkcs8_pem(text.trim()).map_err(|e| bad(e.to_string()))?;
        Ok(Self::new(key))
    }

    pub fn public(&self) -> &PublicKey {
        &self.public
    }

    pub fn key_id(&self) -> &str {
        self.public.key_id()
    }

    /// The signature file's content for `message` (the manifest's bytes).
    pub fn sign(&self, message: &[u8]) -> SignatureFile {
        let signature = self.key.sign(message);
        SignatureFile {
            algorithm: ALGORITHM.to_string(),
            key_id: self.public.id.clone(),
            signature: base64::engine::general_purpose::STANDARD.encode(signature.to_bytes()),
        }
    }

    /// Signs the manifest in `dir` as it is on disk: writes and syncs `dir/kybernate.sig` (0600).
    pub fn sign_dir(&self, dir: &Path) -> Result<(), SigningError> {
        let manifest = dir.join(MANIFEST_FILE);
        let bytes = read_bounded(&manifest, MAX_MANIFEST).map_err(io_err("read", &manifest))?;
        let sig = self.sign(&bytes);
        let path = dir.join(SIGNATURE_FILE);
        let mut text = serde_json::to_vec_pretty(&sig).map_err(|e| io_err("serialise", &path)(io::Error::other(e)))?;
        text.push(b'\n');
        write_synced(&path, &text, 0o600).map_err(io_err("write", &path))?;
        sync_parent(&path).map_err(io_err("sync the directory of", &path))
    }
}

/// `kybernate.sig` as stored: JSON `{"algorithm": "ed25519", "key_id": …, "signature": base64}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SignatureFile {
    pub algorithm: String,
    /// The signer's key id as the signer states it: only a trusted key's verification makes it true.
    pub key_id: String,
    pub signature: String,
}

/// A parsed, well-formed signature (not yet verified against any key).
#[derive(Debug, Clone)]
pub struct Signature {
    /// The key id the signature names (see [`SignatureFile::key_id`]).
    pub key_id: String,
    signature: ed25519_dalek::Signature,
}

/// Key ids as `kybernate keygen` makes them; a forged one is shown in errors, so keep it tame.
fn valid_key_id(id: &str) -> bool {
    id.len() <= 80 && !id.is_empty() && id.bytes().all(|b| b.is_ascii_alphanumeric() || b":-_.".contains(&b))
}

/// Reads and checks the form of `dir/kybernate.sig`; `None` when there is none.
pub fn read_signature(dir: &Path) -> Result<Option<Signature>, SigningError> {
    let path = dir.join(SIGNATURE_FILE);
    let bytes = match read_bounded(&path, MAX_SMALL_FILE) {
        Ok(b) => b,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io_err("read", &path)(e)),
    };
    parse_signature(&path, &bytes).map(Some)
}

/// Parses a signature file's bytes; `path` names it in errors.
pub fn parse_signature(path: &Path, bytes: &[u8]) -> Result<Signature, SigningError> {
    let bad = |reason: String| SigningError::BadSignatureFile { path: path.to_path_buf(), reason };
    let file: SignatureFile = serde_json::from_slice(bytes).map_err(|e| {
        bad(format!(
            "{e} (expected {{\"algorithm\": \"{ALGORITHM}\", \"key_id\": \"sha256:…\", \"signature\": base64}})"
        ))
    })?;
    if file.algorithm != ALGORITHM {
        let found = file.algorithm.chars().take(64).collect();
        return Err(SigningError::UnknownAlgorithm { path: path.to_path_buf(), found });
    }
    if !valid_key_id(&file.key_id) {
        return Err(bad(format!("key_id {:?} is not a key id (sha256:<16 hex digits>)", shorten(&file.key_id))));
    }
    let raw = base64::engine::general_purpose::STANDARD
        .decode(file.signature.trim())
        .map_err(|e| bad(format!("signature is not base64: {e}")))?;
    let raw: [u8; 64] = raw
        .as_slice()
        .try_into()
        .map_err(|_| bad(format!("signature is {} bytes, an Ed25519 signature is 64", raw.len())))?;
    Ok(Signature { key_id: file.key_id, signature: ed25519_dalek::Signature::from_bytes(&raw) })
}

fn shorten(s: &str) -> String {
    let mut out: String = s.chars().take(80).collect();
    if out.len() < s.len() {
        out.push('…');
    }
    out
}

/// Reads the manifest's bytes, exactly as the signature covers them.
pub fn read_manifest_bytes(dir: &Path) -> Result<Vec<u8>, SigningError> {
    let path = dir.join(MANIFEST_FILE);
    read_bounded(&path, MAX_MANIFEST).map_err(io_err("read", &path))
}

/// Where `kybernate keygen` put a key pair.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct KeyPairFiles {
    pub private: PathBuf,
    pub public: PathBuf,
    pub key_id: String,
}

/// Generates a key pair into `dir` (created 0700 if missing): `kybernate.key` (0600) and
/// `kybernate.pub` (0644). An existing private key is kept unless `force`.
pub fn write_key_pair(dir: &Path, force: bool) -> Result<KeyPairFiles, SigningError> {
    use std::os::unix::fs::DirBuilderExt;
    fs::DirBuilder::new().recursive(true).mode(0o700).create(dir).map_err(io_err("create directory", dir))?;
    let private = dir.join(PRIVATE_KEY_FILE);
    let public = dir.join(PUBLIC_KEY_FILE);
    if !force && fs::symlink_metadata(&private).is_ok() {
        return Err(SigningError::KeyExists { path: private });
    }
    let key = SigningKey::generate().map_err(io_err("get random bytes for", &private))?;
    let pem = key
        .key
        .to_pkcs8_pem(LineEnding::LF)
        .map_err(|e| io_err("encode", &private)(io::Error::other(e.to_string())))?;
    // The private key first: a public key without its private key is worse than neither.
    write_synced(&private, pem.as_bytes(), 0o600).map_err(io_err("write", &private))?;
    write_synced(&public, key.public.to_pem().as_bytes(), 0o644).map_err(io_err("write", &public))?;
    sync_parent(&private).map_err(io_err("sync the directory of", &private))?;
    Ok(KeyPairFiles { private, public, key_id: key.key_id().to_string() })
}

/// What `kybernate inspect` shows: whether a checkpoint carries a (well-formed) signature.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SignatureState {
    Unsigned,
    /// Signed, as the signature says, by this key id (not verified: that needs the trust policy).
    Signed {
        key_id: String,
    },
    /// A `kybernate.sig` that cannot be read or parsed: the error's text.
    Invalid {
        reason: String,
    },
}

impl fmt::Display for SignatureState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Unsigned => f.write_str("unsigned"),
            Self::Signed { key_id } => write!(f, "signed by key {key_id}"),
            Self::Invalid { reason } => write!(f, "invalid signature: {reason}"),
        }
    }
}

/// The signature state of the checkpoint in `dir`.
pub fn signature_state(dir: &Path) -> SignatureState {
    match read_signature(dir) {
        Ok(None) => SignatureState::Unsigned,
        Ok(Some(sig)) => SignatureState::Signed { key_id: sig.key_id },
        Err(e) => SignatureState::Invalid { reason: e.to_string() },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    fn checkpoint(manifest: &[u8]) -> tempfile::TempDir {
        let d = tempfile::tempdir().unwrap();
        fs::write(d.path().join(MANIFEST_FILE), manifest).unwrap();
        d
    }

    fn verifies(dir: &Path, key: &PublicKey) -> bool {
        let sig = read_signature(dir).unwrap().unwrap();
        key.verifies(&read_manifest_bytes(dir).unwrap(), &sig)
    }

    #[test]
    fn a_signature_verifies_only_its_manifest_with_its_key() {
        let key = SigningKey::generate().unwrap();
        let other = SigningKey::generate().unwrap();
        let a = checkpoint(br#"{"files":{"a":1}}"#);
        key.sign_dir(a.path()).unwrap();
        assert!(verifies(a.path(), key.public()), "valid signature");
        assert!(!verifies(a.path(), other.public()), "wrong key");
        let sig = read_signature(a.path()).unwrap().unwrap();
        assert_eq!(sig.key_id, key.key_id());
        assert_eq!(fs::metadata(a.path().join(SIGNATURE_FILE)).unwrap().mode() & 0o777, 0o600);

        // The signature of another manifest, copied beside this one.
        let b = checkpoint(br#"{"files":{"a":2}}"#);
        fs::copy(a.path().join(SIGNATURE_FILE), b.path().join(SIGNATURE_FILE)).unwrap();
        assert!(!verifies(b.path(), key.public()), "signature of another manifest");

        // One byte of the manifest changed.
        let mut bytes = fs::read(a.path().join(MANIFEST_FILE)).unwrap();
        bytes[10] ^= 1;
        fs::write(a.path().join(MANIFEST_FILE), &bytes).unwrap();
        assert!(!verifies(a.path(), key.public()), "tampered manifest");
    }

    #[test]
    fn malformed_signature_files_are_errors_naming_the_file() {
        let key = SigningKey::generate().unwrap();
        let d = checkpoint(b"{}");
        key.sign_dir(d.path()).unwrap();
        let path = d.path().join(SIGNATURE_FILE);
        let good = fs::read_to_string(&path).unwrap();
        let file: SignatureFile = serde_json::from_str(&good).unwrap();
        let cases: Vec<(String, &str)> = vec![
            (good[..good.len() / 2].to_string(), "invalid checkpoint signature file"),
            ("\u{0}garbage\u{ff}".to_string(), "invalid checkpoint signature file"),
            (good.replace("\"ed25519\"", "\"rsa-pss\""), "unsupported signature algorithm \"rsa-pss\""),
            (good.replace(&file.signature, "AAAA"), "signature is 3 bytes"),
            (good.replace(&file.signature, "not base64!"), "not base64"),
            (good.replace(&file.key_id, "x\\u001b[2Jy"), "is not a key id"),
            (good.replace("}", ", \"extra\": 1}"), "unknown field"),
        ];
        for (text, want) in cases {
            fs::write(&path, &text).unwrap();
            let err = read_signature(d.path()).unwrap_err().to_string();
            assert!(err.contains(want) && err.contains(&path.display().to_string()), "{text:?}: {err}");
            assert!(matches!(signature_state(d.path()), SignatureState::Invalid { .. }));
        }
        fs::remove_file(&path).unwrap();
        assert!(read_signature(d.path()).unwrap().is_none());
        assert_eq!(signature_state(d.path()), SignatureState::Unsigned);
        std::os::unix::fs::symlink("/etc/hostname", &path).unwrap();
        let err = read_signature(d.path()).unwrap_err().to_string();
        assert!(err.contains(&path.display().to_string()), "{err}");
    }

    #[test]
    fn keygen_writes_a_private_key_only_its_owner_reads_and_keeps_it() {
        let d = tempfile::tempdir().unwrap();
        let dir = d.path().join("keys");
        let pair = write_key_pair(&dir, false).unwrap();
        assert_eq!(fs::metadata(&pair.private).unwrap().mode() & 0o777, 0o600);
        assert!(fs::read_to_string(&pair.private).unwrap().starts_with("-----BEGIN PRIVATE KEY-----"));
        assert!(fs::read_to_string(&pair.public).unwrap().starts_with("-----BEGIN PUBLIC KEY-----"));
        let private = SigningKey::load(&pair.private).unwrap();
        let public = PublicKey::load(&pair.public).unwrap();
        assert_eq!(private.public(), &public);
        assert_eq!(public.key_id(), pair.key_id);
        assert!(pair.key_id.starts_with("sha256:") && pair.key_id.len() == 7 + 16, "{}", pair.key_id);

        let err = write_key_pair(&dir, false).unwrap_err().to_string();
        assert!(err.contains("--force") && err.contains(PRIVATE_KEY_FILE), "{err}");
        assert_eq!(SigningKey::load(&pair.private).unwrap().key_id(), pair.key_id, "kept");
        let again = write_key_pair(&dir, true).unwrap();
        assert_ne!(again.key_id, pair.key_id);
    }

    #[test]
    fn malformed_key_files_are_errors_naming_the_file() {
        let d = tempfile::tempdir().unwrap();
        let pair = write_key_pair(d.path(), false).unwrap();
        let garbage = d.path().join("garbage.pem");
        fs::write(&garbage, b"-----BEGIN PUBLIC KEY-----\nnot base64\n-----END PUBLIC KEY-----\n").unwrap();
        for (path, private) in [(&garbage, false), (&garbage, true), (&pair.private, false), (&pair.public, true)] {
            let err = if private {
                SigningKey::load(path).unwrap_err().to_string()
            } else {
                PublicKey::load(path).unwrap_err().to_string()
            };
            assert!(err.contains(&path.display().to_string()) && err.contains("not an Ed25519"), "{err}");
        }
        let missing = d.path().join("missing.pub");
        let err = PublicKey::load(&missing).unwrap_err().to_string();
        assert!(err.contains("missing.pub") && err.contains("cannot read public key"), "{err}");
        let err = PublicKey::load(d.path()).unwrap_err().to_string();
        assert!(err.contains("not a regular file"), "{err}");
    }
}
