//! containerd's stdio strings: FIFO paths, `file://` and `binary://` URIs, parsed as
//! containerd's own `NewBinaryIO`/`NewFileIO` read them.

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::PathBuf;

use super::error::IoError;

/// Where one output stream goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Dest {
    Null,
    /// A FIFO (the usual case) or an existing file, as Go's `copyPipes` treats a plain path.
    Path(PathBuf),
    /// `file://`: created if missing, appended to.
    File(PathBuf),
    /// `binary://`: a logging process that reads the container's pipes itself.
    Binary(BinaryUri),
}

/// `binary:///path?k=v&env.NAME=val`, as containerd's `NewBinaryCmd` reads it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct BinaryUri {
    pub(super) path: PathBuf,
    /// `k=v` → `k v`, `k` → `k`, in URI order (Go's map order is random).
    pub(super) args: Vec<String>,
    /// `env.NAME=val` → `NAME=val` (containerd 1.7+); CONTAINER_ID/NAMESPACE cannot be overridden.
    pub(super) env: Vec<(String, String)>,
}

/// Splits `scheme://rest` when the prefix is a valid URI scheme; plain paths give `None`.
pub(super) fn split_scheme(s: &str) -> Option<(&str, &str)> {
    let (scheme, rest) = s.split_once("://")?;
    let mut chars = scheme.chars();
    let first = chars.next()?;
    let valid = first.is_ascii_alphabetic() && chars.all(|c| c.is_ascii_alphanumeric() || "+-.".contains(c));
    valid.then_some((scheme, rest))
}

/// Decodes `%XX` escapes (and `+` as a space in query parts) like Go's `net/url`.
pub(super) fn percent_decode(s: &str, plus_is_space: bool) -> Result<Vec<u8>, String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' => {
                let hex = bytes.get(i + 1..i + 3).and_then(|h| std::str::from_utf8(h).ok());
                let v = hex.and_then(|h| u8::from_str_radix(h, 16).ok()).ok_or("invalid % escape")?;
                out.push(v);
                i += 3;
            }
            b'+' if plus_is_space => {
                out.push(b' ');
                i += 1;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    Ok(out)
}

pub(super) fn decode_string(s: &str) -> Result<String, String> {
    String::from_utf8(percent_decode(s, true)?).map_err(|_| "query is not UTF-8".to_string())
}

/// Parses the part after `scheme://` into a path and its query pairs.
pub(super) fn path_and_query(rest: &str) -> Result<(PathBuf, Vec<(String, String)>), String> {
    let rest = rest.split_once('#').map_or(rest, |(r, _)| r);
    let (hier, query) = rest.split_once('?').unwrap_or((rest, ""));
    // Go's url.Parse puts `host` of `scheme://host/p` aside and uses only the path.
    let path = if hier.starts_with('/') { hier } else { hier.find('/').map_or("", |i| &hier[i..]) };
    if path.is_empty() {
        return Err("no path".into());
    }
    let path = PathBuf::from(OsStr::from_bytes(&percent_decode(path, false)?));
    let mut pairs = Vec::new();
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        pairs.push((decode_string(k)?, decode_string(v)?));
    }
    Ok((path, pairs))
}

pub(super) fn parse_dest(stream: &'static str, s: &str) -> Result<Dest, IoError> {
    if s.is_empty() {
        return Ok(Dest::Null);
    }
    let Some((scheme, rest)) = split_scheme(s) else {
        return Ok(Dest::Path(PathBuf::from(s)));
    };
    let invalid = |reason: String| IoError::InvalidUri { stream, uri: s.to_string(), reason };
    let (path, query) = path_and_query(rest).map_err(invalid)?;
    match scheme.to_ascii_lowercase().as_str() {
        "fifo" => Ok(Dest::Path(path)),
        "file" => Ok(Dest::File(path)),
        "binary" => {
            if !path.is_absolute() {
                return Err(invalid("logging binary path must be absolute".into()));
            }
            let mut uri = BinaryUri { path, args: Vec::new(), env: Vec::new() };
            for (k, v) in query {
                if let Some(name) = k.strip_prefix("env.") {
                    if name != "CONTAINER_ID" && name != "CONTAINER_NAMESPACE" && !name.is_empty() {
                        uri.env.push((name.to_string(), v));
                    }
                } else {
                    uri.args.push(k);
                    if !v.is_empty() {
                        uri.args.push(v);
                    }
                }
            }
            Ok(Dest::Binary(uri))
        }
        other => Err(invalid(format!("unknown stdio scheme {other:?}"))),
    }
}

/// The stdin FIFO path; only plain paths and `fifo://` make sense for input.
pub(super) fn parse_stdin(s: &str) -> Result<Option<PathBuf>, IoError> {
    match parse_dest("stdin", s)? {
        Dest::Null => Ok(None),
        Dest::Path(p) => Ok(Some(p)),
        _ => Err(IoError::InvalidUri { stream: "stdin", uri: s.to_string(), reason: "stdin must be a FIFO".into() }),
    }
}
