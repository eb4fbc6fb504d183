//! The OCI distribution API, blocking and streamed: ping and authenticate once per session
//! (anonymous, Basic, or a Bearer token for the repository's scope), then blobs and manifests.
//! Bodies are `Read`ers in both directions, so memory stays bounded whatever a blob's size.

use std::io::Read;
use std::path::PathBuf;
use std::time::Duration;

use sha2::{Digest as _, Sha256};
use ureq::http::Response;
use ureq::tls::{parse_pem, PemItem, RootCerts, TlsConfig};
use ureq::{Agent, Body, RequestBuilder, SendBody};

use crate::auth::{self, Challenge, Credentials};
use crate::error::{RegistryError, Target};
use crate::reference::Reference;

/// The media type of our image manifests.
pub const MANIFEST_MEDIA_TYPE: &str = "application/vnd.oci.image.manifest.v1+json";
/// The largest manifest (or token answer, or error body) read into memory.
pub const MAX_MANIFEST_BYTES: u64 = 4 << 20;
/// Where Docker keeps credentials; used when it exists and no `auth_file` is configured.
pub const DEFAULT_AUTH_FILE: &str = "/root/.docker/config.json";
/// The system's CA bundle (Debian's ca-certificates), trusted beside `ca_file`.
const SYSTEM_CA_BUNDLE: &str = "/etc/ssl/certs/ca-certificates.crt";

/// How to reach registries: the node's `[registry]` config plus the command's flags.
#[derive(Debug, Clone, Default)]
pub struct Settings {
    /// `host:port`s spoken to over plain HTTP (`[registry] insecure`).
    pub insecure: Vec<String>,
    /// Plain HTTP for this command's registry (`--plain-http`).
    pub plain_http: bool,
    /// Docker's `config.json` (`[registry] auth_file`); None: [`DEFAULT_AUTH_FILE`] when present.
    pub auth_file: Option<PathBuf>,
    /// A PEM bundle of extra CAs (`[registry] ca_file`).
    pub ca_file: Option<PathBuf>,
}

/// One session with one repository of one registry.
pub struct Client {
    agent: Agent,
    /// `http(s)://host[:port]`.
    base: String,
    pub(crate) reference: Reference,
    /// The `Authorization` header value, once authenticated.
    authorization: Option<String>,
}

impl Client {
    /// Opens a session for `reference`: checks that the registry answers (`GET /v2/`) and
    /// authenticates as it asks, for pulling (and pushing, if `push`).
    pub fn connect(reference: &Reference, settings: &Settings, push: bool) -> Result<Client, RegistryError> {
        let host = reference.api_host().to_string();
        let plain = settings.plain_http || settings.insecure.iter().any(|h| h == &reference.registry || h == &host);
        let base = format!("{}://{host}", if plain { "http" } else { "https" });
        let mut builder = Agent::config_builder()
            .http_status_as_error(false)
            .timeout_connect(Some(Duration::from_secs(30)))
            // A registry may hash a whole blob before it answers the upload's last request.
            .timeout_recv_response(Some(Duration::from_secs(600)))
            .user_agent(concat!("kybernate/", env!("CARGO_PKG_VERSION")));
        if !plain {
            builder = builder.tls_config(tls_config(settings)?);
        }
        let agent = Agent::new_with_config(builder.build());
        let mut client = Client { agent, base, reference: reference.clone(), authorization: None };
        client.authenticate(settings, push)?;
        Ok(client)
    }

    pub(crate) fn target(&self) -> Target {
        Target { registry: self.reference.registry.clone(), reference: self.reference.to_string() }
    }

    fn authenticate(&mut self, settings: &Settings, push: bool) -> Result<(), RegistryError> {
        let what = "GET /v2/";
        let url = format!("{}/v2/", self.base);
        let resp = self.agent.get(&url).call().map_err(|e| self.transport(what, e))?;
        match resp.status().as_u16() {
            200..=299 => return Ok(()),
            401 => {}
            status => return Err(self.status_error(what, status, resp)),
        }
        let header = resp.headers().get("www-authenticate").and_then(|v| v.to_str().ok()).unwrap_or("").to_string();
        let challenge = auth::parse_challenge(&header).ok_or_else(|| RegistryError::Unauthorized {
            target: self.target(),
            what: what.into(),
            detail: format!("unsupported authentication challenge {:?}", header.chars().take(200).collect::<String>()),
        })?;
        let credentials = self.credentials(settings)?;
        match challenge {
            Challenge::Basic => {
                let Some(creds) = credentials else {
                    return Err(
                        self.unauthorized(what, "the registry requires credentials and the auth file has none for it")
                    );
                };
                self.authorization = Some(creds.basic());
                let resp = self.call_get(&url, what)?;
                match resp.status().as_u16() {
                    200..=299 => Ok(()),
                    401 => Err(self.unauthorized(
                        what,
                        &format!("the registry refused the credentials of user {:?}", creds.username),
                    )),
                    status => Err(self.status_error(what, status, resp)),
                }
            }
            Challenge::Bearer { realm, service, .. } => {
                let actions = if push { "pull,push" } else { "pull" };
                let scope = format!("repository:{}:{actions}", self.reference.repository);
                let token = self.fetch_token(&realm, service.as_deref(), &scope, credentials.as_ref())?;
                self.authorization = Some(format!("Bearer {token}"));
                Ok(())
            }
        }
    }

    fn credentials(&self, settings: &Settings) -> Result<Option<Credentials>, RegistryError> {
        let path = match &settings.auth_file {
            Some(p) => p.clone(),
            None if std::path::Path::new(DEFAULT_AUTH_FILE).is_file() => PathBuf::from(DEFAULT_AUTH_FILE),
            None => return Ok(None),
        };
        Ok(auth::credentials_for(&path, &self.reference.registry)?)
    }

    /// The token service's answer for `scope` (`{"token": …}` or `{"access_token": …}`).
    fn fetch_token(
        &self,
        realm: &str,
        service: Option<&str>,
        scope: &str,
        creds: Option<&Credentials>,
    ) -> Result<String, RegistryError> {
        let what = "token request";
        let mut url = format!("{realm}{}scope={}", if realm.contains('?') { '&' } else { '?' }, encode(scope));
        if let Some(service) = service {
            url.push_str(&format!("&service={}", encode(service)));
        }
        let mut req = self.agent.get(&url);
        if let Some(c) = creds {
            req = req.header("Authorization", c.basic());
        }
        let mut resp = req.call().map_err(|e| self.transport(what, e))?;
        match resp.status().as_u16() {
            200..=299 => {}
            401 | 403 => return Err(self.unauthorized(what, "the token service refused the credentials")),
            status => return Err(self.status_error(what, status, resp)),
        }
        let body = read_limited(&mut resp).map_err(|e| self.transport(what, e))?;
        #[derive(serde::Deserialize)]
        struct Token {
            token: Option<String>,
            access_token: Option<String>,
        }
        let t: Token = serde_json::from_slice(&body).map_err(|e| RegistryError::Unauthorized {
            target: self.target(),
            what: what.into(),
            detail: format!("the token service's answer is not a token: {e}"),
        })?;
        t.token
            .or(t.access_token)
            .filter(|t| !t.is_empty())
            .ok_or_else(|| self.unauthorized(what, "no token in the answer"))
    }

    fn url(&self, rest: &str) -> String {
        format!("{}/v2/{}/{rest}", self.base, self.reference.repository)
    }

    /// `req` with our credentials, when `url` is on the registry itself (never sent elsewhere).
    fn authed<B>(&self, req: RequestBuilder<B>, url: &str) -> RequestBuilder<B> {
        match &self.authorization {
            Some(a) if url.starts_with(&format!("{}/", self.base)) => req.header("Authorization", a),
            _ => req,
        }
    }

    fn call_get(&self, url: &str, what: &str) -> Result<Response<Body>, RegistryError> {
        self.authed(self.agent.get(url), url).call().map_err(|e| self.transport(what, e))
    }

    /// Whether the registry holds blob `digest` with `size` bytes.
    pub fn blob_exists(&self, digest: &str, size: u64) -> Result<bool, RegistryError> {
        let what = format!("HEAD blob {digest}");
        let url = self.url(&format!("blobs/{digest}"));
        let resp = self.authed(self.agent.head(&url), &url).call().map_err(|e| self.transport(&what, e))?;
        match resp.status().as_u16() {
            200..=299 => {
                let len = resp.headers().get("content-length").and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
                Ok(len.map_or(true, |l| l == size))
            }
            404 => Ok(false),
            status => Err(self.status_error(&what, status, resp)),
        }
    }

    /// Uploads a blob of `len` bytes read from `body` in one streamed request (`POST` an upload,
    /// then `PUT <location>?digest=` with the body and its `Content-Length`). `digest` must be
    /// known before (the caller hashed it, or streams a reader whose digest it precomputed).
    pub fn upload_blob(&self, body: &mut dyn Read, len: u64, digest: &str) -> Result<(), RegistryError> {
        let what = format!("upload of blob {digest}");
        let location = self.start_upload(&what)?;
        let sep = if location.contains('?') { '&' } else { '?' };
        let url = format!("{location}{sep}digest={}", encode(digest));
        let resp = self
            .authed(self.agent.put(&url), &url)
            .header("Content-Type", "application/octet-stream")
            .header("Content-Length", len.to_string())
            .send(SendBody::from_reader(body))
            .map_err(|e| self.transport(&what, e))?;
        self.expect_created(&what, resp)
    }

    /// Uploads a blob whose digest is learnt while it streams (one pass over the data): `POST`
    /// an upload, one `PATCH` with the body (`len` bytes, `Content-Length` set), then `PUT
    /// ?digest=` with what `digest_of` says of the reader once it is drained.
    pub fn upload_streamed<R: Read>(
        &self,
        body: &mut R,
        len: u64,
        digest_of: impl Fn(&R) -> String,
    ) -> Result<String, RegistryError> {
        let what = "streamed blob upload".to_string();
        let location = self.start_upload(&what)?;
        let resp = self
            .authed(self.agent.patch(&location), &location)
            .header("Content-Type", "application/octet-stream")
            .header("Content-Length", len.to_string())
            .header("Content-Range", format!("0-{}", len.saturating_sub(1)))
            .send(SendBody::from_reader(&mut *body))
            .map_err(|e| self.transport(&what, e))?;
        let status = resp.status().as_u16();
        if !(200..=299).contains(&status) {
            return Err(self.status_error(&what, status, resp));
        }
        let location = self.location(&resp).unwrap_or(location);
        let digest = digest_of(body);
        let sep = if location.contains('?') { '&' } else { '?' };
        let url = format!("{location}{sep}digest={}", encode(&digest));
        let resp = self
            .authed(self.agent.put(&url), &url)
            .header("Content-Length", "0")
            .send_empty()
            .map_err(|e| self.transport(&what, e))?;
        self.expect_created(&format!("commit of blob {digest}"), resp)?;
        Ok(digest)
    }

    fn start_upload(&self, what: &str) -> Result<String, RegistryError> {
        let url = self.url("blobs/uploads/");
        let resp = self
            .authed(self.agent.post(&url), &url)
            .header("Content-Length", "0")
            .send_empty()
            .map_err(|e| self.transport(what, e))?;
        let status = resp.status().as_u16();
        if status != 202 {
            return Err(self.status_error(what, status, resp));
        }
        self.location(&resp).ok_or_else(|| RegistryError::Status {
            target: self.target(),
            what: what.into(),
            status,
            detail: "no Location header in the upload's answer".into(),
        })
    }

    /// The absolute form of a response's `Location`.
    fn location(&self, resp: &Response<Body>) -> Option<String> {
        let loc = resp.headers().get("location")?.to_str().ok()?;
        Some(if loc.starts_with("http://") || loc.starts_with("https://") {
            loc.to_string()
        } else if loc.starts_with('/') {
            format!("{}{loc}", self.base)
        } else {
            format!("{}/{loc}", self.base)
        })
    }

    fn expect_created(&self, what: &str, resp: Response<Body>) -> Result<(), RegistryError> {
        match resp.status().as_u16() {
            200..=299 => Ok(()),
            status => Err(self.status_error(what, status, resp)),
        }
    }

    /// The manifest at `reference` (a tag or digest): its bytes (at most [`MAX_MANIFEST_BYTES`])
    /// and content type. None when the registry has no such manifest.
    pub fn get_manifest(&self, reference: &str) -> Result<Option<(Vec<u8>, String)>, RegistryError> {
        let what = format!("GET manifest {reference}");
        let url = self.url(&format!("manifests/{reference}"));
        let mut resp = self
            .authed(self.agent.get(&url), &url)
            .header("Accept", MANIFEST_MEDIA_TYPE)
            .call()
            .map_err(|e| self.transport(&what, e))?;
        match resp.status().as_u16() {
            200..=299 => {}
            404 => return Ok(None),
            status => return Err(self.status_error(&what, status, resp)),
        }
        let kind = resp.headers().get("content-type").and_then(|v| v.to_str().ok()).unwrap_or("").to_string();
        let body = read_limited(&mut resp).map_err(|e| self.transport(&what, e))?;
        Ok(Some((body, kind)))
    }

    /// Stores `bytes` (an image manifest) under `tag`; returns its digest.
    pub fn put_manifest(&self, tag: &str, bytes: &[u8]) -> Result<String, RegistryError> {
        let what = format!("PUT manifest {tag}");
        let url = self.url(&format!("manifests/{tag}"));
        let resp = self
            .authed(self.agent.put(&url), &url)
            .header("Content-Type", MANIFEST_MEDIA_TYPE)
            .send(bytes)
            .map_err(|e| self.transport(&what, e))?;
        self.expect_created(&what, resp)?;
        Ok(sha256_digest(bytes))
    }

    /// The blob `digest` as a stream (unverified: the caller hashes what it reads).
    pub fn get_blob(&self, digest: &str) -> Result<impl Read + 'static, RegistryError> {
        let what = format!("GET blob {digest}");
        let url = self.url(&format!("blobs/{digest}"));
        let resp = self.call_get(&url, &what)?;
        match resp.status().as_u16() {
            200..=299 => Ok(resp.into_body().into_reader()),
            404 => Err(RegistryError::NotFound { target: self.target(), what: format!("blob {digest}") }),
            status => Err(self.status_error(&what, status, resp)),
        }
    }

    fn unauthorized(&self, what: &str, detail: &str) -> RegistryError {
        RegistryError::Unauthorized { target: self.target(), what: what.into(), detail: detail.into() }
    }

    /// An unexpected answer: 401/403 as unauthorised, 404 as not found, else the status with
    /// the registry's error text (its `errors[].message`, or the first line of the body).
    pub(crate) fn status_error(&self, what: &str, status: u16, mut resp: Response<Body>) -> RegistryError {
        let body = read_limited(&mut resp).unwrap_or_default();
        let detail = registry_message(&body);
        match status {
            401 | 403 => RegistryError::Unauthorized {
                target: self.target(),
                what: what.into(),
                detail: if detail.is_empty() { format!("HTTP {status}") } else { detail },
            },
            404 => RegistryError::NotFound {
                target: self.target(),
                what: if detail.is_empty() { what.to_string() } else { format!("{what}: {detail}") },
            },
            _ => RegistryError::Status { target: self.target(), what: what.into(), status, detail },
        }
    }

    fn transport(&self, what: &str, e: ureq::Error) -> RegistryError {
        let reason = e.to_string();
        let tls = is_tls_error(&e);
        if tls {
            RegistryError::Tls { target: self.target(), what: what.into(), reason }
        } else {
            RegistryError::Connect { target: self.target(), what: what.into(), reason }
        }
    }
}

/// Whether ureq's error is the TLS layer's.
fn is_tls_error(e: &ureq::Error) -> bool {
    match e {
        ureq::Error::Tls(_) | ureq::Error::Rustls(_) => true,
        // A failed handshake surfaces as rustls's error inside an I/O error.
        ureq::Error::Io(io) => io.get_ref().is_some_and(|inner| inner.is::<rustls::Error>()),
        _ => false,
    }
}

/// The TLS roots: the system bundle (when present) and `ca_file`.
fn tls_config(settings: &Settings) -> Result<TlsConfig, RegistryError> {
    let mut certs = Vec::new();
    let mut add = |path: &std::path::Path, required: bool| -> Result<(), RegistryError> {
        let pem = match std::fs::read(path) {
            Ok(p) => p,
            Err(e) if !required && e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(crate::error::io_ctx(format!("{}: cannot read CA file", path.display()))(e)),
        };
        let before = certs.len();
        for item in parse_pem(&pem) {
            if let Ok(PemItem::Certificate(c)) = item {
                certs.push(c.to_owned());
            }
        }
        if required && certs.len() == before {
            return Err(RegistryError::Io {
                context: format!("{}: CA file", path.display()),
                source: std::io::Error::new(std::io::ErrorKind::InvalidData, "no PEM certificate in it"),
            });
        }
        Ok(())
    };
    add(std::path::Path::new(SYSTEM_CA_BUNDLE), false)?;
    if let Some(ca) = &settings.ca_file {
        add(ca, true)?;
    }
    let roots = if certs.is_empty() { RootCerts::WebPki } else { RootCerts::new_with_certs(&certs) };
    Ok(TlsConfig::builder().root_certs(roots).build())
}

/// At most [`MAX_MANIFEST_BYTES`] of a response's body.
fn read_limited(resp: &mut Response<Body>) -> Result<Vec<u8>, ureq::Error> {
    resp.body_mut().with_config().limit(MAX_MANIFEST_BYTES).read_to_vec()
}

/// The registry's own words from an error body (`{"errors":[{"code":…,"message":…}]}`).
fn registry_message(body: &[u8]) -> String {
    #[derive(serde::Deserialize)]
    struct Errors {
        errors: Vec<Entry>,
    }
    #[derive(serde::Deserialize)]
    struct Entry {
        #[serde(default)]
        code: String,
        #[serde(default)]
        message: String,
    }
    let text = match serde_json::from_slice::<Errors>(body) {
        Ok(e) => e
            .errors
            .iter()
            .map(|e| format!("{} {}", e.code, e.message).trim().to_string())
            .collect::<Vec<_>>()
            .join("; "),
        Err(_) => String::from_utf8_lossy(body).lines().next().unwrap_or("").to_string(),
    };
    text.chars().filter(|c| !c.is_control()).take(300).collect()
}

/// `sha256:<hex>` of `bytes`.
pub fn sha256_digest(bytes: &[u8]) -> String {
    format!("sha256:{}", hex(&Sha256::digest(bytes)))
}

pub(crate) fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Percent-encodes a query value.
fn encode(s: &str) -> String {
    s.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}
