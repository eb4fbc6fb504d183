//! Registry credentials: Docker's `config.json` (`auths.<host>.auth`, base64 `user:password`) and
//! the challenges a registry answers with (`WWW-Authenticate: Basic …` / `Bearer realm=…`).

use std::collections::BTreeMap;
use std::path::Path;

use base64::Engine;
use serde::Deserialize;

/// A user name and password (or token) for one registry.
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    pub username: String,
    pub password: String,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Credentials({:?}, <password>)", self.username)
    }
}

impl Credentials {
    /// The `Authorization` header value for HTTP Basic.
    pub fn basic(&self) -> String {
        let raw = format!("{}:{}", self.username, self.password);
        format!("Basic {}", base64::engine::general_purpose::STANDARD.encode(raw))
    }
}

/// Why the auth file could not be used.
#[derive(Debug, thiserror::Error)]
#[error("{path}: {reason}")]
pub struct AuthFileError {
    pub path: String,
    pub reason: String,
}

#[derive(Deserialize)]
struct DockerConfig {
    #[serde(default)]
    auths: BTreeMap<String, AuthEntry>,
}

#[derive(Deserialize)]
struct AuthEntry {
    #[serde(default)]
    auth: Option<String>,
    #[serde(default)]
    username: Option<String>,
    #[serde(default)]
    password: Option<String>,
}

/// The largest auth file read (Docker's holds a few entries).
const MAX_AUTH_FILE: u64 = 1 << 20;

/// The credentials `path` (Docker's `config.json`) holds for `registry` (`host[:port]`), if any.
/// Keys may be written as `host`, `https://host`, `http://host/v1/`: the host part is compared.
pub fn credentials_for(path: &Path, registry: &str) -> Result<Option<Credentials>, AuthFileError> {
    let err = |reason: String| AuthFileError { path: path.display().to_string(), reason };
    let file = std::fs::File::open(path).map_err(|e| err(format!("cannot read: {e}")))?;
    let mut text = String::new();
    std::io::Read::read_to_string(&mut std::io::Read::take(file, MAX_AUTH_FILE + 1), &mut text)
        .map_err(|e| err(format!("cannot read: {e}")))?;
    if text.len() as u64 > MAX_AUTH_FILE {
        return Err(err(format!("larger than {MAX_AUTH_FILE} bytes")));
    }
    let config: DockerConfig =
        serde_json::from_str(&text).map_err(|e| err(format!("not a Docker config.json: {e}")))?;
    let wanted = normalise(registry);
    let Some((key, entry)) = config.auths.iter().find(|(key, _)| normalise(key) == wanted) else {
        return Ok(None);
    };
    if let Some(auth) = entry.auth.as_deref().filter(|a| !a.is_empty()) {
        let decoded = base64::engine::general_purpose::STANDARD
            .decode(auth.trim())
            .map_err(|e| err(format!("auths.{key:?}.auth is not base64: {e}")))?;
        let text = String::from_utf8(decoded).map_err(|_| err(format!("auths.{key:?}.auth is not UTF-8")))?;
        let (user, pass) =
            text.split_once(':').ok_or_else(|| err(format!("auths.{key:?}.auth is not base64 of user:password")))?;
        return Ok(Some(Credentials { username: user.into(), password: pass.into() }));
    }
    match (&entry.username, &entry.password) {
        (Some(u), Some(p)) => Ok(Some(Credentials { username: u.clone(), password: p.clone() })),
        _ => Ok(None),
    }
}

/// `https://index.docker.io/v1/` → `docker.io`; `http://h:5000/x` → `h:5000`.
fn normalise(key: &str) -> String {
    let host = key.trim_start_matches("https://").trim_start_matches("http://");
    let host = host.split('/').next().unwrap_or(host).to_ascii_lowercase();
    match host.as_str() {
        "index.docker.io" | "registry-1.docker.io" => "docker.io".into(),
        _ => host,
    }
}

/// A registry's `WWW-Authenticate` answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Challenge {
    Basic,
    /// Fetch a token from `realm` for `service` (and the scope we need).
    Bearer {
        realm: String,
        service: Option<String>,
        scope: Option<String>,
    },
}

/// Parses `Basic realm="x"` or `Bearer realm="https://auth",service="reg",scope="repository:a:pull"`.
pub fn parse_challenge(header: &str) -> Option<Challenge> {
    let header = header.trim();
    let (scheme, params) = header.split_once(' ').unwrap_or((header, ""));
    match scheme.to_ascii_lowercase().as_str() {
        "basic" => Some(Challenge::Basic),
        "bearer" => {
            let params = parse_params(params);
            let realm = params.get("realm")?.clone();
            Some(Challenge::Bearer {
                realm,
                service: params.get("service").cloned(),
                scope: params.get("scope").cloned(),
            })
        }
        _ => None,
    }
}

/// `k="v",k2=v2` (quoted values may hold commas).
fn parse_params(text: &str) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let mut rest = text.trim();
    while !rest.is_empty() {
        let Some((key, after)) = rest.split_once('=') else { break };
        let key = key.trim().trim_start_matches(',').trim().to_ascii_lowercase();
        let after = after.trim_start();
        let (value, next) = if let Some(quoted) = after.strip_prefix('"') {
            match quoted.find('"') {
                Some(end) => (quoted[..end].to_string(), &quoted[end + 1..]),
                None => (quoted.to_string(), ""),
            }
        } else {
            match after.find(',') {
                Some(end) => (after[..end].trim().to_string(), &after[end..]),
                None => (after.trim().to_string(), ""),
            }
        };
        out.insert(key, value);
        rest = next.trim_start().trim_start_matches(',').trim_start();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn challenges_parse() {
        assert_eq!(parse_challenge("Basic realm=\"Registry Realm\""), Some(Challenge::Basic));
        assert_eq!(
            parse_challenge(
                "Bearer realm=\"https://auth.example/token\",service=\"reg.example\",scope=\"repository:a/b:pull,push\""
            ),
            Some(Challenge::Bearer {
                realm: "https://auth.example/token".into(),
                service: Some("reg.example".into()),
                scope: Some("repository:a/b:pull,push".into()),
            })
        );
        assert_eq!(parse_challenge("Negotiate"), None);
        assert_eq!(parse_challenge("Bearer service=x"), None, "no realm");
    }

    #[test]
    fn docker_config_auths_are_found_by_host() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.json");
        let auth = base64::engine::general_purpose::STANDARD.encode("alice:s3cr:et");
        std::fs::write(
            &path,
            format!(r#"{{"auths":{{"https://127.0.0.1:5000/v1/":{{"auth":"{auth}"}},"https://index.docker.io/v1/":{{"username":"bob","password":"pw"}}}}}}"#),
        )
        .unwrap();
        let c = credentials_for(&path, "127.0.0.1:5000").unwrap().unwrap();
        assert_eq!((c.username.as_str(), c.password.as_str()), ("alice", "s3cr:et"));
        assert_eq!(credentials_for(&path, "docker.io").unwrap().unwrap().username, "bob");
        assert!(credentials_for(&path, "other:1").unwrap().is_none());
        std::fs::write(&path, r#"{"auths":{"h:1":{"auth":"!!"}}}"#).unwrap();
        assert!(credentials_for(&path, "h:1").unwrap_err().to_string().contains("not base64"));
    }
}
