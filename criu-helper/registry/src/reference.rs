//! Image references (`host[:port]/path[:tag][@sha256:…]`): what a user names, parsed once and
//! checked strictly, because each part ends up in a URL.

use std::fmt;

/// Docker Hub's name in references, and the host its API answers on.
const DOCKER_HUB: &str = "docker.io";
const DOCKER_HUB_API: &str = "registry-1.docker.io";

/// A parsed reference. `tag` and `digest` may both be set (`repo:tag@sha256:…`): the digest wins.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reference {
    /// As written in references (`127.0.0.1:5000`, `ghcr.io`, `docker.io`).
    pub registry: String,
    /// The repository path (`team/job`; `library/x` for Docker Hub's single names).
    pub repository: String,
    pub tag: Option<String>,
    /// `sha256:<64 hex>`.
    pub digest: Option<String>,
}

/// Why a reference was refused.
#[derive(Debug, thiserror::Error)]
#[error("invalid image reference {reference:?}: {reason}")]
pub struct ReferenceError {
    pub reference: String,
    pub reason: &'static str,
}

impl Reference {
    /// Parses `[host[:port]/]path[:tag][@sha256:hex]`; a missing tag and digest means `latest`.
    /// The first path part is a host when it has a '.' or ':' or is `localhost` (Docker's rule).
    pub fn parse(text: &str) -> Result<Reference, ReferenceError> {
        let bad = |reason| ReferenceError { reference: text.chars().take(300).collect(), reason };
        if text.is_empty() || text.len() > 512 {
            return Err(bad("empty or longer than 512 characters"));
        }
        let (rest, digest) = match text.split_once('@') {
            Some((rest, digest)) => {
                let hex = digest.strip_prefix("sha256:").ok_or_else(|| bad("only sha256 digests are supported"))?;
                if hex.len() != 64 || !hex.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)) {
                    return Err(bad("a digest is sha256: and 64 lowercase hex digits"));
                }
                (rest, Some(digest.to_string()))
            }
            None => (text, None),
        };
        // A tag is after the last ':' that follows the last '/' (a port's ':' comes before one).
        let last_slash = rest.rfind('/').map_or(0, |i| i + 1);
        let (name, tag) = match rest[last_slash..].rfind(':') {
            Some(i) => (&rest[..last_slash + i], Some(rest[last_slash + i + 1..].to_string())),
            None => (rest, None),
        };
        if let Some(tag) = &tag {
            let ok = !tag.is_empty()
                && tag.len() <= 128
                && tag.bytes().next().is_some_and(|b| b.is_ascii_alphanumeric() || b == b'_')
                && tag.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
            if !ok {
                return Err(bad(
                    "a tag is letters, digits, '_', '.' and '-' (at most 128, not starting with '.' or '-')",
                ));
            }
        }
        let (registry, path) = match name.split_once('/') {
            Some((first, path)) if first.contains(['.', ':']) || first == "localhost" => (first.to_string(), path),
            _ => (DOCKER_HUB.to_string(), name),
        };
        if !valid_host(&registry) {
            return Err(bad("the registry must be a host name or address, with an optional port"));
        }
        if path.is_empty() || !path.split('/').all(valid_component) {
            return Err(bad(
                "a repository is '/'-separated parts of lowercase letters and digits, joined by '.', '_', '__' or '-'",
            ));
        }
        let repository =
            if registry == DOCKER_HUB && !path.contains('/') { format!("library/{path}") } else { path.into() };
        let tag = if tag.is_none() && digest.is_none() { Some("latest".to_string()) } else { tag };
        Ok(Reference { registry, repository, tag, digest })
    }

    /// Where the registry's API answers (`host[:port]`).
    pub fn api_host(&self) -> &str {
        if self.registry == DOCKER_HUB {
            DOCKER_HUB_API
        } else {
            &self.registry
        }
    }

    /// The digest if there is one, else the tag: what `/v2/<repo>/manifests/<this>` takes.
    pub fn manifest_ref(&self) -> &str {
        self.digest.as_deref().or(self.tag.as_deref()).unwrap_or("latest")
    }

    /// The same repository at `digest`.
    pub fn with_digest(&self, digest: &str) -> Reference {
        Reference { digest: Some(digest.to_string()), ..self.clone() }
    }
}

impl fmt::Display for Reference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.registry, self.repository)?;
        if let Some(tag) = &self.tag {
            write!(f, ":{tag}")?;
        }
        if let Some(digest) = &self.digest {
            write!(f, "@{digest}")?;
        }
        Ok(())
    }
}

/// `name[:port]` with a DNS-ish name or an IPv4 address (no IPv6 literals).
fn valid_host(host: &str) -> bool {
    let (name, port) = match host.rsplit_once(':') {
        Some((name, port)) => (name, Some(port)),
        None => (host, None),
    };
    let port_ok = port.map_or(true, |p| !p.is_empty() && p.len() <= 5 && p.bytes().all(|b| b.is_ascii_digit()));
    let name_ok = !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
                && !label.starts_with('-')
                && !label.ends_with('-')
        });
    port_ok && name_ok
}

/// One repository path part: `[a-z0-9]+` runs joined by one '.', one or two '_', or '-'s.
fn valid_component(part: &str) -> bool {
    if part.is_empty() || part.len() > 128 {
        return false;
    }
    let alnum = |b: u8| b.is_ascii_lowercase() || b.is_ascii_digit();
    let bytes = part.as_bytes();
    if !alnum(bytes[0]) || !alnum(bytes[bytes.len() - 1]) {
        return false;
    }
    let mut sep = String::new();
    for &b in bytes {
        if alnum(b) {
            if !(sep.is_empty() || sep == "." || sep == "_" || sep == "__" || sep.bytes().all(|c| c == b'-')) {
                return false;
            }
            sep.clear();
        } else if b".-_".contains(&b) {
            sep.push(b as char);
        } else {
            return false;
        }
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn references_parse_like_dockers() {
        let r = Reference::parse("127.0.0.1:5000/team/job:v1").unwrap();
        assert_eq!(
            (r.registry.as_str(), r.repository.as_str(), r.tag.as_deref()),
            ("127.0.0.1:5000", "team/job", Some("v1"))
        );
        assert_eq!(r.manifest_ref(), "v1");
        let r = Reference::parse("localhost:5000/job").unwrap();
        assert_eq!((r.registry.as_str(), r.tag.as_deref()), ("localhost:5000", Some("latest")));
        let r = Reference::parse("busybox").unwrap();
        assert_eq!((r.api_host(), r.repository.as_str()), ("registry-1.docker.io", "library/busybox"));
        let d = format!("sha256:{}", "a".repeat(64));
        let r = Reference::parse(&format!("ghcr.io/o/job@{d}")).unwrap();
        assert_eq!((r.tag.as_deref(), r.manifest_ref()), (None, d.as_str()));
        assert_eq!(r.to_string(), format!("ghcr.io/o/job@{d}"));
        for bad in
            ["", "Upper/x", "h:5000/x/../y", "h:5000/x:ta g", "h:5000/x@md5:00", "h:5000/x:-t", "a b/c", "h:99x/y"]
        {
            assert!(Reference::parse(bad).is_err(), "{bad:?}");
        }
    }
}
