//! Runtime introspection: the shim's answer to `-info`, which containerd 2.x asks of a runtime.
//!
//! containerd 2.x's CRI plugin runs `<shim> -info` for every handler registered as
//! `runtime_type = "io.containerd.runc.v2"` (style (b): ours through `runtime_path`), with the
//! handler's runtime options (a marshalled `Any`, or nothing) on stdin, and reads a
//! `containerd.types.RuntimeInfo` from stdout. Its `features` carry the OCI runtime's `features`
//! document; from it CRI reports recursive read-only mounts and user namespaces for the handler,
//! and the kubelet refuses pods needing them on a handler without. We answer as the stock runc
//! shim does, for the runtime a plain (non-GPU) container would get from the node's config.
//!
//! As in the Go shim: unreadable options, or no runtime to ask, fail `-info` (a message on stderr,
//! exit 1); a runtime whose `features` fails or prints no JSON object gets an answer without
//! features (containerd then reports none for the handler), and we say why on stderr.

use std::io::{self, Read, Write};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use containerd_shim::protos::protobuf::well_known_types::any::Any;
use containerd_shim::protos::protobuf::{Message, MessageField};
use containerd_shim_protos::types::introspection::{RuntimeInfo, RuntimeVersion};
use kybernate_runtime_select::{ConfigError, Context, Decision, SelectError, Selector, SpecView};

use crate::options::{OptionsError, ShimOptions};

/// The type URL containerd registers for runtime-spec's `features.Features` (the value is JSON),
/// as the stock `containerd-shim-runc-v2 -info` of containerd 2.1 writes it.
pub const FEATURES_TYPE_URL: &str = "types.containerd.io/opencontainers/runtime-spec/1/features/Features";
/// Annotation of the answer naming the OCI runtime whose features it carries.
pub const RUNTIME_ANNOTATION: &str = "kybernate.io/oci-runtime";
/// Annotation of the answer naming the rule that chose it (`default`, `options`, `env`).
pub const RUNTIME_SOURCE_ANNOTATION: &str = "kybernate.io/oci-runtime-source";

/// How long `<runtime> features` may take: containerd waits for `-info` while its CRI plugin
/// starts, and runc answers in milliseconds.
pub const FEATURES_TIMEOUT: Duration = Duration::from_secs(10);
/// The most of `features`' stdout we take (runc 1.1's document is about 3 KiB).
pub const MAX_FEATURES_BYTES: usize = 1 << 20;
/// The most of its stderr kept for a message.
const MAX_STDERR_BYTES: usize = 16 << 10;
/// The most runtime options we read from stdin (a few hundred bytes in practice).
const MAX_OPTIONS_BYTES: u64 = 1 << 20;

/// Why `-info` gives no answer at all.
#[derive(Debug, thiserror::Error)]
pub enum InfoError {
    #[error("cannot read the runtime options from stdin: {0}")]
    ReadOptions(#[source] io::Error),
    #[error("the runtime options on stdin exceed {MAX_OPTIONS_BYTES} bytes")]
    OptionsTooLarge,
    #[error("failed to read runtime options: {0}")]
    Options(#[from] OptionsError),
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("no OCI runtime to introspect: {0}")]
    Select(#[from] SelectError),
    #[error("cannot encode the runtime info: {0}")]
    Encode(#[source] containerd_shim::protos::protobuf::Error),
    #[error("cannot write the runtime info to stdout: {0}")]
    Write(#[source] io::Error),
}

/// Why the answer carries no features.
#[derive(Debug, thiserror::Error)]
pub enum FeaturesError {
    #[error("cannot run `{} features`: {source}", .binary.display())]
    Spawn {
        binary: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("`{} features` did not finish within {after:?}", .binary.display())]
    TimedOut { binary: PathBuf, after: Duration },
    #[error("`{} features` exited with status {code}{}", .binary.display(), stderr_suffix(.stderr))]
    Failed { binary: PathBuf, code: i32, stderr: String },
    #[error("`{} features` printed more than {MAX_FEATURES_BYTES} bytes", .binary.display())]
    TooLarge { binary: PathBuf },
    #[error("`{} features` printed no JSON object: {reason}", .binary.display())]
    NotJson { binary: PathBuf, reason: String },
}

fn stderr_suffix(stderr: &str) -> String {
    if stderr.is_empty() {
        String::new()
    } else {
        format!(": {stderr}")
    }
}

/// `-info` from `main`: reads stdin, writes the answer to stdout, and returns the exit status.
pub fn main(runtime_id: &str) -> i32 {
    match respond(runtime_id, &mut io::stdin().lock(), &mut io::stdout().lock()) {
        Ok(None) => 0,
        Ok(Some(why)) => {
            eprintln!("{runtime_id}: answering -info without runtime features: {why}");
            0
        }
        Err(e) => {
            eprintln!("{runtime_id}: {e}");
            1
        }
    }
}

/// Reads the options from `stdin`, chooses the runtime as the shim would for a plain container
/// (this process's `$KYBERNATE_RUNTIME`, `$KYBERNATE_CONFIG` and `$PATH`), asks it for its
/// features and writes the encoded `RuntimeInfo` to `stdout`. `Ok(Some(_))`: answered, without
/// features, for that reason.
pub fn respond(
    runtime_id: &str,
    stdin: &mut dyn Read,
    stdout: &mut dyn Write,
) -> Result<Option<FeaturesError>, InfoError> {
    let raw = read_options(stdin)?;
    let (info, why) = answer(runtime_id, &raw, choose_runtime)?;
    let bytes = info.write_to_bytes().map_err(InfoError::Encode)?;
    stdout.write_all(&bytes).and_then(|()| stdout.flush()).map_err(InfoError::Write)?;
    Ok(why)
}

/// The answer to options `raw`, for the runtime `choose` picks (the seam the unit tests use).
pub fn answer(
    runtime_id: &str,
    raw: &[u8],
    choose: impl FnOnce(&ShimOptions) -> Result<Decision, InfoError>,
) -> Result<(RuntimeInfo, Option<FeaturesError>), InfoError> {
    let (options, echoed) = decode_options(raw)?;
    let decision = choose(&options)?;
    let (json, why) = match features(&decision.runtime, FEATURES_TIMEOUT) {
        Ok(json) => (Some(json), None),
        Err(e) => (None, Some(e)),
    };
    Ok((runtime_info(runtime_id, echoed, json, &decision), why))
}

fn read_options(stdin: &mut dyn Read) -> Result<Vec<u8>, InfoError> {
    let mut raw = Vec::new();
    stdin.take(MAX_OPTIONS_BYTES + 1).read_to_end(&mut raw).map_err(InfoError::ReadOptions)?;
    if raw.len() as u64 > MAX_OPTIONS_BYTES {
        return Err(InfoError::OptionsTooLarge);
    }
    Ok(raw)
}

/// The options as the shim reads them at `start`, and the `Any` to echo in the answer (the Go
/// shim returns the options it was given; nothing when it got none).
pub fn decode_options(raw: &[u8]) -> Result<(ShimOptions, Option<Any>), OptionsError> {
    let options = ShimOptions::from_start_stdin(raw)?;
    if raw.is_empty() {
        return Ok((options, None));
    }
    // Decoded once more as a bare Any: from_start_stdin has already checked that it is one.
    let any = Any::parse_from_bytes(raw)
        .map_err(|source| OptionsError::Decode { type_url: "google.protobuf.Any".into(), source })?;
    Ok((options, (!any.type_url.is_empty()).then_some(any)))
}

/// The runtime a container without GPU evidence gets: the same [`Selector`] as at create, over
/// an empty spec (no annotation, no GPU evidence), so `$KYBERNATE_RUNTIME`, then `BinaryName`,
/// then `[runtime] default`.
pub fn choose_runtime(options: &ShimOptions) -> Result<Decision, InfoError> {
    let selector = Selector::load(options.config_path.as_deref(), Context::from_process_env(options.binary_name()))?;
    Ok(selector.select(&SpecView::default())?)
}

/// The `RuntimeInfo` containerd decodes: our name and version, the options we were given, the
/// runtime's features document (JSON, under [`FEATURES_TYPE_URL`]), and which runtime it is.
pub fn runtime_info(
    runtime_id: &str,
    options: Option<Any>,
    features: Option<Vec<u8>>,
    decision: &Decision,
) -> RuntimeInfo {
    let mut info = RuntimeInfo::new();
    info.name = runtime_id.to_string();
    let mut version = RuntimeVersion::new();
    version.version = env!("CARGO_PKG_VERSION").to_string();
    info.version = MessageField::some(version);
    info.options = options.into();
    info.features = features
        .map(|json| {
            let mut any = Any::new();
            any.type_url = FEATURES_TYPE_URL.to_string();
            any.value = json;
            any
        })
        .into();
    info.annotations.insert(RUNTIME_ANNOTATION.to_string(), decision.runtime.display().to_string());
    info.annotations.insert(RUNTIME_SOURCE_ANNOTATION.to_string(), decision.source.as_str().to_string());
    info
}

/// Runs `<binary> features` (no shell, stdin closed) for at most `timeout`, and returns its
/// document as compact JSON. The child dies with us (PDEATHSIG) and on timeout (SIGKILL).
pub fn features(binary: &Path, timeout: Duration) -> Result<Vec<u8>, FeaturesError> {
    let mut cmd = Command::new(binary);
    cmd.arg("features").stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
    // SAFETY: prctl is async-signal-safe and touches no memory of ours.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong) != 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let spawn_err = |source| FeaturesError::Spawn { binary: binary.to_path_buf(), source };
    let mut child = cmd.spawn().map_err(spawn_err)?;
    let deadline = Instant::now() + timeout;
    let stdout = child.stdout.take().map(|p| drain(p, MAX_FEATURES_BYTES));
    let stderr = child.stderr.take().map(|p| drain(p, MAX_STDERR_BYTES));
    let timed_out = || FeaturesError::TimedOut { binary: binary.to_path_buf(), after: timeout };

    let Some(code) = wait_until(&mut child, deadline) else {
        return Err(timed_out());
    };
    // A child that left a descendant holding its pipes open must not hold us past the deadline.
    let collect = |rx: Option<mpsc::Receiver<Drained>>| match rx {
        Some(rx) => rx.recv_timeout(deadline.saturating_duration_since(Instant::now())).ok(),
        None => Some(Drained::default()),
    };
    let out = collect(stdout).ok_or_else(timed_out)?;
    let err = collect(stderr).unwrap_or_default();
    if code != 0 {
        let stderr = String::from_utf8_lossy(&err.bytes).trim().to_string();
        return Err(FeaturesError::Failed { binary: binary.to_path_buf(), code, stderr });
    }
    if out.truncated {
        return Err(FeaturesError::TooLarge { binary: binary.to_path_buf() });
    }
    let not_json = |reason: String| FeaturesError::NotJson { binary: binary.to_path_buf(), reason };
    match serde_json::from_slice::<serde_json::Value>(&out.bytes) {
        Ok(doc @ serde_json::Value::Object(_)) => serde_json::to_vec(&doc).map_err(|e| not_json(e.to_string())),
        Ok(_) => Err(not_json("the document is not a JSON object".into())),
        Err(e) => Err(not_json(e.to_string())),
    }
}

/// What a pipe held, up to a limit.
#[derive(Debug, Default)]
struct Drained {
    bytes: Vec<u8>,
    /// More came than the limit; the rest was read and dropped, so the writer never blocks.
    truncated: bool,
}

fn drain(mut pipe: impl Read + Send + 'static, limit: usize) -> mpsc::Receiver<Drained> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut d = Drained::default();
        let mut chunk = [0u8; 8192];
        loop {
            match pipe.read(&mut chunk) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    let room = limit.saturating_sub(d.bytes.len());
                    d.bytes.extend_from_slice(&chunk[..n.min(room)]);
                    d.truncated |= n > room;
                }
            }
        }
        let _ = tx.send(d);
    });
    rx
}

/// The exit code (128 + signal when killed by one), or `None` when `deadline` passed first, in
/// which case the child is killed and reaped. `-info` runs in its own process without a reaper
/// thread, so std's own wait is safe here.
fn wait_until(child: &mut Child, deadline: Instant) -> Option<i32> {
    loop {
        match child.try_wait() {
            Ok(Some(status)) => return Some(status.code().unwrap_or_else(|| 128 + status.signal().unwrap_or(0))),
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(5)),
            Ok(None) | Err(_) => {
                let _ = child.kill();
                let _ = child.wait();
                return None;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use containerd_shim::api::Options as RuncOptions;
    use kybernate_runtime_select::Config;
    use std::os::unix::fs::PermissionsExt;

    /// An executable shell script `name` in `dir` (the fake OCI runtime).
    fn script(dir: &Path, name: &str, body: &str) -> PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, format!("#!/bin/sh\n{body}\n")).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
        p
    }

    fn runc_options_any(binary_name: &str) -> Any {
        let mut o = RuncOptions::new();
        o.binary_name = binary_name.into();
        o.systemd_cgroup = true;
        let mut any = Any::new();
        any.type_url = "containerd.runc.v1.Options".into();
        any.value = o.write_to_bytes().unwrap();
        any
    }

    const DOC: &str = r#"{"ociVersion":"1.0.0","mountOptions":["ro","rro"],"linux":{"namespaces":["user"]}}"#;

    /// [`answer`] with a selector of the built-in config (`[runtime] default` = `default`) and no
    /// process environment, then through the wire and back.
    fn answer_for(raw: &[u8], default: &Path) -> Result<(RuntimeInfo, Option<FeaturesError>), InfoError> {
        let choose = |o: &ShimOptions| {
            let mut config = Config::default();
            config.runtime.default = default.display().to_string();
            let context = Context { env_override: None, binary_name: o.binary_name(), search_path: None };
            let selector = Selector { config, config_path: PathBuf::from("/test/config.toml"), context };
            Ok(selector.select(&SpecView::default())?)
        };
        let (info, why) = answer("io.containerd.kybernate.v1", raw, choose)?;
        Ok((RuntimeInfo::parse_from_bytes(&info.write_to_bytes().unwrap()).unwrap(), why))
    }

    #[test]
    fn answer_decodes_as_runtime_info_with_the_features_document() {
        let dir = tempfile::tempdir().unwrap();
        let rt = script(dir.path(), "fake-runc", &format!("[ \"$1\" = features ] || exit 3\necho '{DOC}'"));
        let options = runc_options_any(&rt.display().to_string());

        let (info, why) = answer_for(&options.write_to_bytes().unwrap(), Path::new("/nonexistent/default")).unwrap();
        assert!(why.is_none(), "{why:?}");
        assert_eq!(info.name, "io.containerd.kybernate.v1");
        assert_eq!(info.version.version, env!("CARGO_PKG_VERSION"));
        assert_eq!(info.options.as_ref(), Some(&options), "the options are echoed");
        let features = info.features.as_ref().expect("features");
        assert_eq!(features.type_url, FEATURES_TYPE_URL);
        let doc: serde_json::Value = serde_json::from_slice(&features.value).unwrap();
        assert_eq!(doc, serde_json::from_str::<serde_json::Value>(DOC).unwrap());
        assert_eq!(info.annotations.get(RUNTIME_ANNOTATION), Some(&rt.display().to_string()));
        assert_eq!(info.annotations.get(RUNTIME_SOURCE_ANNOTATION).map(String::as_str), Some("options"));
    }

    #[test]
    fn without_binary_name_the_configured_default_answers() {
        let dir = tempfile::tempdir().unwrap();
        let rt = script(dir.path(), "my-runc", &format!("echo '{DOC}'"));
        for raw in [Vec::new(), runc_options_any("").write_to_bytes().unwrap()] {
            let (info, why) = answer_for(&raw, &rt).unwrap();
            assert!(why.is_none(), "{why:?}");
            assert_eq!(info.options.is_some(), !raw.is_empty());
            assert_eq!(info.annotations.get(RUNTIME_ANNOTATION), Some(&rt.display().to_string()));
            assert_eq!(info.annotations.get(RUNTIME_SOURCE_ANNOTATION).map(String::as_str), Some("default"));
            assert_eq!(info.features.type_url, FEATURES_TYPE_URL);
        }
    }

    #[test]
    fn a_runtime_without_features_gets_an_answer_without_them() {
        let dir = tempfile::tempdir().unwrap();
        let rt = script(dir.path(), "old-runc", "echo 'No help topic for features' >&2; exit 1");
        let (info, why) = answer_for(b"", &rt).unwrap();
        let msg = why.expect("a reason").to_string();
        assert!(msg.contains("exited with status 1") && msg.contains("No help topic"), "{msg}");
        assert!(info.features.is_none());
        assert_eq!(info.name, "io.containerd.kybernate.v1");
    }

    #[test]
    fn unreadable_options_or_a_missing_runtime_fail() {
        let mut out = Vec::new();
        let err = respond("x", &mut &b"\x0a\xff"[..], &mut out).unwrap_err();
        assert!(matches!(err, InfoError::Options(_)), "{err}");
        assert!(out.is_empty(), "nothing written on failure");
        let bad = runc_options_any("/nonexistent/kbt-runtime").write_to_bytes().unwrap();
        let err = answer_for(&bad, Path::new("/nonexistent/default")).unwrap_err();
        assert!(matches!(err, InfoError::Select(_)), "{err}");
        assert!(err.to_string().contains("/nonexistent/kbt-runtime"), "{err}");
        let err = answer_for(b"", Path::new("/nonexistent/default")).unwrap_err();
        assert!(err.to_string().contains("/nonexistent/default"), "{err}");
    }

    #[test]
    fn options_decode_like_starts_stdin() {
        let (o, echo) = decode_options(b"").unwrap();
        assert_eq!(o, ShimOptions::default());
        assert!(echo.is_none());
        let any = runc_options_any("runc");
        let (o, echo) = decode_options(&any.write_to_bytes().unwrap()).unwrap();
        assert_eq!(o.binary_name().as_deref(), Some("runc"));
        assert_eq!(echo, Some(any));
    }

    #[test]
    fn features_output_is_bounded_checked_and_compacted() {
        let dir = tempfile::tempdir().unwrap();
        let ok = script(dir.path(), "ok", &format!("printf '%s\\n\\n' '{DOC}'"));
        let json = features(&ok, FEATURES_TIMEOUT).unwrap();
        assert_eq!(json, serde_json::to_vec(&serde_json::from_str::<serde_json::Value>(DOC).unwrap()).unwrap());

        let array = script(dir.path(), "array", "echo '[1]'");
        assert!(matches!(features(&array, FEATURES_TIMEOUT), Err(FeaturesError::NotJson { .. })));
        let text = script(dir.path(), "text", "echo hello");
        assert!(matches!(features(&text, FEATURES_TIMEOUT), Err(FeaturesError::NotJson { .. })));
        // 2 MiB of output: read to the end (the writer never blocks), then refused.
        let big = script(dir.path(), "big", "head -c 2097152 /dev/zero");
        assert!(matches!(features(&big, FEATURES_TIMEOUT), Err(FeaturesError::TooLarge { .. })));
        let missing = dir.path().join("missing");
        assert!(matches!(features(&missing, FEATURES_TIMEOUT), Err(FeaturesError::Spawn { .. })));
    }

    #[test]
    fn a_hanging_runtime_is_killed_at_the_deadline() {
        let dir = tempfile::tempdir().unwrap();
        let hang = script(dir.path(), "hang", "exec sleep 30");
        let t = Instant::now();
        let err = features(&hang, Duration::from_millis(300)).unwrap_err();
        assert!(matches!(err, FeaturesError::TimedOut { .. }), "{err}");
        assert!(t.elapsed() < Duration::from_secs(5), "took {:?}", t.elapsed());
    }
}
