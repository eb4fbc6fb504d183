//! Checkpoints named by an `oci://` reference at Create: pulled into the node's store by the
//! node's `kybernate` CLI (`kybernate pull REF -n NS -o json`), run as a child, before the store
//! restore path takes over.
//!
//! The shim links no registry client: network and TLS code stays out of every pod's shim (its
//! memory is per pod) and the pull's checks are the CLI's own (digests, trust, identity, nothing
//! visible until complete). The CLI reads the same Kybernate config file (`--config`), so
//! `[registry]` and `[trust]` apply as they do for `kybernate pull`.

use std::ffi::OsString;
use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde::Deserialize;

use crate::spawn::Spawner;

/// The prefix of a restore reference that names a checkpoint image in a registry.
pub const OCI_PREFIX: &str = "oci://";
/// The node's CLI, looked for beside the shim's own executable, then on `PATH`.
pub const CLI_NAME: &str = "kybernate";
/// How long a pull at Create may take before it is killed. The registry client bounds connecting
/// (30 s) and each wait for an answer (10 min), but not a body that stops arriving mid-transfer:
/// without a bound a stuck registry would hold the Create forever. One hour covers tens of GiB on
/// a slow link; anything larger is better pulled ahead (`kybernate pull`, then the same
/// annotation finds the digest in the store and downloads nothing).
pub const PULL_TIMEOUT: Duration = Duration::from_secs(3600);
/// What is kept of the CLI's output: its JSON answer, and the end of its error text.
const MAX_STDOUT: usize = 1 << 20;
const MAX_STDERR: usize = 64 << 10;
/// How much of the CLI's error text goes into the refusal.
const ERROR_LINES: usize = 4;
const ERROR_CHARS: usize = 2000;

/// The registry reference of a restore reference `oci://REF`, else `None` (a store reference).
pub fn oci_reference(reference: &str) -> Option<&str> {
    reference.strip_prefix(OCI_PREFIX)
}

/// How this shim pulls: through its [`Spawner`], with the CLI reading `config`.
pub struct Puller<'a> {
    pub spawner: &'a dyn Spawner,
    /// The Kybernate config file this shim read (passed as `--config` when it exists; else the
    /// CLI falls back to the same environment and default the shim did).
    pub config: &'a Path,
    /// The CLI, else found beside the shim or on `PATH` (tests set it).
    pub cli: Option<PathBuf>,
    pub timeout: Duration,
}

/// A checkpoint the CLI pulled into the store (from its `-o json` answer).
#[derive(Debug, Clone, Deserialize)]
pub struct Pulled {
    /// Store id: `<namespace>/<container>/<checkpoint>`.
    pub id: String,
    pub path: PathBuf,
    pub digest: String,
    pub bytes_downloaded: u64,
}

/// Why a pull at Create failed. Messages name the CLI, the reference and what went wrong.
#[derive(Debug, thiserror::Error)]
pub enum PullError {
    #[error("cannot pull {reference}: no `{CLI_NAME}` CLI found (looked for {} and on PATH); install the kybernate package's CLI beside the shim", beside.display())]
    NoCli { reference: String, beside: PathBuf },
    #[error("cannot pull {reference}: cannot run {}: {source}", cli.display())]
    Start { reference: String, cli: PathBuf, source: std::io::Error },
    #[error("pull of {reference} failed ({} exited with {code}): {message}", cli.display())]
    Failed { reference: String, cli: PathBuf, code: i32, message: String },
    #[error("pull of {reference} did not finish within {}s and was stopped (registry stuck or checkpoint too large: pull it ahead with `kybernate pull`)", after.as_secs())]
    TimedOut { reference: String, after: Duration },
    #[error("pull of {reference}: unexpected answer from {}: {message}", cli.display())]
    Answer { reference: String, cli: PathBuf, message: String },
}

impl Puller<'_> {
    /// Pulls `oci://reference` into the store under containerd namespace `namespace`
    /// (`kybernate pull`'s checks; a failed pull leaves nothing in the store).
    pub fn pull(&self, reference: &str, namespace: &str) -> Result<Pulled, PullError> {
        let full = format!("{OCI_PREFIX}{reference}");
        let cli = match &self.cli {
            Some(cli) => cli.clone(),
            None => find_cli().map_err(|beside| PullError::NoCli { reference: full.clone(), beside })?,
        };
        let mut cmd = Command::new(&cli);
        if self.config.is_file() {
            cmd.arg("--config").arg(self.config);
        }
        cmd.args(["-o", "json", "-n", namespace, "pull"]).arg(&full);
        let start = |source| PullError::Start { reference: full.clone(), cli: cli.clone(), source };
        let (err_r, err_w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(|e| start(e.into()))?;
        cmd.stderr(Stdio::from(err_w));
        log::debug!("running {cmd:?}");
        let began = Instant::now();
        let child = self.spawner.start_piped(cmd).map_err(start)?;
        drop(child.stdin); // the CLI reads nothing
        let stderr = read_bounded_thread(std::fs::File::from(err_r), MAX_STDERR, true);
        let stdout = read_bounded_thread(child.stdout, MAX_STDOUT, false);
        let code = (child.wait)(self.timeout);
        let timed_out = began.elapsed() >= self.timeout;
        let stdout = stdout.join().unwrap_or_default();
        let stderr = stderr.join().unwrap_or_default();
        if timed_out && code != 0 {
            return Err(PullError::TimedOut { reference: full, after: self.timeout });
        }
        if code != 0 {
            let message = last_lines(&stderr).unwrap_or_else(|| format!("exited with status {code}"));
            return Err(PullError::Failed { reference: full, cli, code, message });
        }
        serde_json::from_slice(&stdout).map_err(|e| PullError::Answer { reference: full, cli, message: e.to_string() })
    }
}

/// The CLI beside this executable (the packages install both in one directory), else on `PATH`;
/// `Err` carries where it was looked for beside the shim.
fn find_cli() -> Result<PathBuf, PathBuf> {
    let exe = std::fs::read_link("/proc/self/exe").unwrap_or_default();
    let beside = exe.parent().unwrap_or(Path::new("/usr/local/bin")).join(CLI_NAME);
    if is_executable(&beside) {
        return Ok(beside);
    }
    let path = std::env::var_os("PATH").unwrap_or_else(|| OsString::from("/usr/local/bin:/usr/bin:/bin"));
    std::env::split_paths(&path).map(|dir| dir.join(CLI_NAME)).find(|p| is_executable(p)).ok_or(beside)
}

fn is_executable(path: &Path) -> bool {
    std::fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// Reads `from` to its end on a thread, keeping at most `max` bytes: the first ones, or the last
/// ones when `keep_tail` (an error's last lines say what failed).
fn read_bounded_thread(
    mut from: impl Read + Send + 'static,
    max: usize,
    keep_tail: bool,
) -> std::thread::JoinHandle<Vec<u8>> {
    std::thread::spawn(move || {
        let mut kept = Vec::new();
        let mut buf = [0u8; 8192];
        loop {
            match from.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => {
                    kept.extend_from_slice(&buf[..n]);
                    if kept.len() > max {
                        if keep_tail {
                            kept.drain(..kept.len() - max);
                        } else {
                            kept.truncate(max);
                        }
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(_) => break,
            }
        }
        kept
    })
}

/// The last few non-empty lines of the CLI's error output, bounded, without its `kybernate: `
/// prefix; `None` when it said nothing.
fn last_lines(stderr: &[u8]) -> Option<String> {
    let text = String::from_utf8_lossy(stderr);
    let lines: Vec<&str> = text.lines().map(str::trim).filter(|l| !l.is_empty()).collect();
    let tail = &lines[lines.len().saturating_sub(ERROR_LINES)..];
    let joined = tail.iter().map(|l| l.strip_prefix("kybernate: ").unwrap_or(l)).collect::<Vec<_>>().join("; ");
    if joined.is_empty() {
        return None;
    }
    let mut chars = joined.chars();
    let mut out: String = chars.by_ref().take(ERROR_CHARS).collect();
    if chars.next().is_some() {
        out.push('…');
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spawn::DirectSpawner;

    fn script(dir: &Path, body: &str) -> PathBuf {
        let path = dir.join("kybernate");
        std::fs::write(&path, format!("#!/bin/sh\n{body}\n")).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
        path
    }

    fn puller<'a>(cli: PathBuf, config: &'a Path, timeout: Duration) -> Puller<'a> {
        Puller { spawner: &DirectSpawner, config, cli: Some(cli), timeout }
    }

    #[test]
    fn a_pull_passes_the_config_and_namespace_and_reads_the_answer() {
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("config.toml");
        std::fs::write(&config, "").unwrap();
        let args = dir.path().join("args");
        let cli = script(
            dir.path(),
            &format!(
                "echo \"$@\" > {}\necho '{{\"id\": \"ns/c/1\", \"path\": \"/s/ns/c/1\", \"digest\": \"sha256:ab\", \"bytes_downloaded\": 7, \"status\": \"ok\"}}'",
                args.display()
            ),
        );
        let pulled = puller(cli, &config, Duration::from_secs(30)).pull("reg:5000/r:v1", "k8s.io").unwrap();
        assert_eq!((pulled.id.as_str(), pulled.bytes_downloaded), ("ns/c/1", 7));
        let seen = std::fs::read_to_string(&args).unwrap();
        assert_eq!(seen.trim(), format!("--config {} -o json -n k8s.io pull oci://reg:5000/r:v1", config.display()));
    }

    #[test]
    fn a_failed_or_stuck_pull_says_why() {
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("absent.toml");
        let cli = script(dir.path(), "echo progress >&2\necho 'kybernate: reg:5000/r:nope: not found' >&2\nexit 1");
        let err = puller(cli, &config, Duration::from_secs(30)).pull("reg:5000/r:nope", "ns").unwrap_err();
        let text = err.to_string();
        assert!(
            text.contains("oci://reg:5000/r:nope") && text.ends_with("progress; reg:5000/r:nope: not found"),
            "{text}"
        );

        let cli = script(dir.path(), "exec sleep 30");
        let began = Instant::now();
        let err = puller(cli, &config, Duration::from_millis(300)).pull("reg/r:v1", "ns").unwrap_err();
        assert!(matches!(err, PullError::TimedOut { .. }), "{err}");
        assert!(began.elapsed() < Duration::from_secs(10));

        let err = Puller {
            spawner: &DirectSpawner,
            config: &config,
            cli: Some(dir.path().join("none")),
            timeout: PULL_TIMEOUT,
        }
        .pull("reg/r:v1", "ns")
        .unwrap_err();
        assert!(err.to_string().contains("cannot run"), "{err}");
    }
}
