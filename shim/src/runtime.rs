//! Invoking the OCI runtime binary: runc, or nvidia-container-runtime, which has runc's CLI.
//!
//! Every call is an argument vector (never a shell): global flags, subcommand, its flags, the id.
//! When the runtime fails, the error carries the runtime's own message, read from the lines it
//! appended to its `--log` file during that call.
//!
//! The runtime process is run through a [`Spawner`] (crate::spawn), which owns how children are
//! forked and reaped.

use std::collections::HashMap;
use std::ffi::OsString;
use std::fs::OpenOptions;
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::fd::OwnedFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use serde::{Deserialize, Deserializer};

/// Name of the runtime's log file in the bundle (what containerd's runc shim uses too).
pub const LOG_FILE: &str = "log.json";

/// How much of the log file's new tail we parse for error lines.
const MAX_LOG_TAIL: u64 = 1 << 20;
/// Subcommands that get the global `--criu` flag (nothing else uses CRIU).
const CRIU_SUBCOMMANDS: [&str; 2] = ["checkpoint", "restore"];

/// What containerd's runc options and the runtime selection give us.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuntimeOpts {
    /// Absolute path of the runtime binary.
    pub binary: PathBuf,
    /// The runtime's state root (`--root`), e.g. `/run/containerd/runc/<namespace>`.
    pub root: PathBuf,
    /// `--systemd-cgroup`: cgroupsPath is `slice:prefix:name`.
    pub systemd_cgroup: bool,
    /// `--criu`, given to checkpoint and restore only.
    pub criu: Option<PathBuf>,
    /// Environment for the runtime and the CRIU it starts (which inherits it), e.g.
    /// `CRIU_LIBS_DIR`; set only on the runtime handle used for a checkpoint or restore.
    pub criu_env: Vec<(OsString, OsString)>,
}

/// The stdio fds handed to the runtime process (made by the IO module).
pub use crate::io::ChildStdio;
/// The spawning seam, re-exported: the runtime's callers name it with the runtime.
pub use crate::spawn::{Capture, DirectSpawner, GroupRecord, MonitorSpawner, PipedChild, RunOutput, Spawner};

/// Flags of `create`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CreateOpts {
    /// Where the runtime writes the init process's host pid.
    pub pid_file: PathBuf,
    /// Unix socket that receives the pty master (terminal containers).
    pub console_socket: Option<PathBuf>,
    pub no_pivot: bool,
    pub no_new_keyring: bool,
}

/// Flags of `exec`. The process JSON goes to a temporary 0600 file in the bundle, because runc
/// reads `--process` from a path; it is removed when the call returns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExecOpts {
    /// Where the runtime writes the exec process's host pid.
    pub pid_file: PathBuf,
    /// Unix socket that receives the pty master (terminal execs).
    pub console_socket: Option<PathBuf>,
}

/// A container's status as the runtime reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ContainerStatus {
    Creating,
    Created,
    Running,
    Pausing,
    Paused,
    Stopped,
    /// A status this code does not know.
    #[serde(other)]
    Unknown,
}

/// Output of `state`: the OCI state plus runc's extras.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct RuntimeState {
    pub id: String,
    /// Host pid of the init process (0 once it is gone).
    #[serde(default)]
    pub pid: i32,
    pub status: ContainerStatus,
    #[serde(default)]
    pub bundle: PathBuf,
    #[serde(default)]
    pub rootfs: PathBuf,
    /// Creation time, RFC 3339.
    #[serde(default)]
    pub created: String,
    #[serde(default, deserialize_with = "null_as_default")]
    pub annotations: HashMap<String, String>,
}

fn null_as_default<'de, D: Deserializer<'de>, T: Default + Deserialize<'de>>(d: D) -> Result<T, D::Error> {
    Ok(Option::<T>::deserialize(d)?.unwrap_or_default())
}

/// Why a runtime call failed.
#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    /// The runtime process could not be started (or waited for).
    #[error("cannot run {} {subcommand}: {source}", binary.display())]
    Spawn {
        binary: PathBuf,
        subcommand: String,
        #[source]
        source: io::Error,
    },
    /// The runtime exited non-zero; `message` is its own error text.
    #[error("{}", failed_text(binary, subcommand, message))]
    Failed { binary: PathBuf, subcommand: String, code: i32, message: String },
    /// The runtime succeeded but its output was not what its CLI documents.
    #[error("cannot decode the output of {} {subcommand}: {source}", file_name(binary))]
    Decode {
        binary: PathBuf,
        subcommand: String,
        #[source]
        source: serde_json::Error,
    },
    /// Input for the runtime could not be serialised.
    #[error("cannot encode {what} for the runtime: {source}")]
    Encode {
        what: &'static str,
        #[source]
        source: serde_json::Error,
    },
    /// A file the call needs (the exec process file) could not be written.
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: io::Error,
    },
}

/// Reads the pid file a runtime call (`create`, `exec`, `restore`) wrote.
pub fn read_pid_file(path: &Path) -> Result<u32, RuntimeError> {
    let io_err = |source| RuntimeError::Io { context: format!("read pid file {}", path.display()), source };
    let text = std::fs::read_to_string(path).map_err(io_err)?;
    text.trim()
        .parse::<u32>()
        .ok()
        .filter(|p| *p > 0)
        .ok_or_else(|| io_err(io::Error::new(io::ErrorKind::InvalidData, format!("not a pid: {:?}", text))))
}

impl RuntimeError {
    /// The process is already gone: for a stopped container runc says "container not running",
    /// and "no such process" when the process exited between its check and kill(2). containerd
    /// expects NOT_FOUND ("process already finished") from kill then.
    ///
    /// Text matching, because runc exits 1 for every failure and says which only in words. It is
    /// confined here so that one runtime's wording is matched in one place.
    pub fn is_not_running(&self) -> bool {
        self.message_contains(&["container not running", "no such process", "process already finished"])
    }

    /// The runtime does not know the container ("container does not exist"): already deleted, or
    /// never created. Text matching, for the reason given at [`RuntimeError::is_not_running`].
    pub fn is_not_found(&self) -> bool {
        self.message_contains(&["does not exist", "not exist"])
    }

    fn message_contains(&self, needles: &[&str]) -> bool {
        match self {
            RuntimeError::Failed { message, .. } => {
                let m = message.to_lowercase();
                needles.iter().any(|n| m.contains(n))
            }
            _ => false,
        }
    }
}

/// `runc create failed: <msg>`, without repeating that prefix when runc's message has it already.
fn failed_text(binary: &Path, subcommand: &str, message: &str) -> String {
    let prefix = format!("{} {subcommand} failed", file_name(binary));
    if message.starts_with(&prefix) {
        message.to_string()
    } else {
        format!("{prefix}: {message}")
    }
}

fn file_name(binary: &Path) -> String {
    binary.file_name().unwrap_or(binary.as_os_str()).to_string_lossy().into_owned()
}

/// The runtime's log file for a bundle.
pub fn log_file(bundle: &Path) -> PathBuf {
    bundle.join(LOG_FILE)
}

/// How the runtime process's stdio is set up for one call.
enum CallIo<'a> {
    /// `create`/`exec`: the container process inherits these. Nothing is captured, since the
    /// container would hold a capture pipe open for its whole life.
    Child(ChildStdio),
    /// Calls that leave no process behind: stdin is `input` (else /dev/null), stderr is captured
    /// as a fallback error message, stdout is captured if asked for.
    Captured { input: Option<&'a [u8]>, stdout: bool },
}

/// One OCI runtime binary with its global flags.
#[derive(Clone)]
pub struct OciRuntime {
    opts: RuntimeOpts,
    spawner: Arc<dyn Spawner>,
}

impl std::fmt::Debug for OciRuntime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OciRuntime").field("opts", &self.opts).finish_non_exhaustive()
    }
}

impl OciRuntime {
    pub fn new(opts: RuntimeOpts, spawner: Arc<dyn Spawner>) -> Self {
        OciRuntime { opts, spawner }
    }

    pub fn binary(&self) -> &Path {
        &self.opts.binary
    }

    pub fn opts(&self) -> &RuntimeOpts {
        &self.opts
    }

    /// `create --bundle B --pid-file F [--console-socket S] [--no-pivot] [--no-new-keyring] ID`.
    pub fn create(&self, id: &str, bundle: &Path, o: &CreateOpts, stdio: ChildStdio) -> Result<(), RuntimeError> {
        let mut args: Vec<OsString> =
            vec!["--bundle".into(), bundle.into(), "--pid-file".into(), o.pid_file.clone().into()];
        if let Some(socket) = &o.console_socket {
            args.extend(["--console-socket".into(), socket.into()]);
        }
        if o.no_pivot {
            args.push("--no-pivot".into());
        }
        if o.no_new_keyring {
            args.push("--no-new-keyring".into());
        }
        args.push(id.into());
        self.call(bundle, "create", args, CallIo::Child(stdio)).map(drop)
    }

    /// `start ID`: runs the user process of a created container.
    pub fn start(&self, id: &str, bundle: &Path) -> Result<(), RuntimeError> {
        self.simple(bundle, "start", [id])
    }

    /// `exec --process FILE --detach --pid-file F [--console-socket S] ID`.
    pub fn exec(
        &self,
        id: &str,
        bundle: &Path,
        process: &serde_json::Value,
        o: &ExecOpts,
        stdio: ChildStdio,
    ) -> Result<(), RuntimeError> {
        let file = ProcessFile::write(bundle, process)?;
        let mut args: Vec<OsString> = vec![
            "--process".into(),
            file.path().into(),
            "--detach".into(),
            "--pid-file".into(),
            o.pid_file.clone().into(),
        ];
        if let Some(socket) = &o.console_socket {
            args.extend(["--console-socket".into(), socket.into()]);
        }
        args.push(id.into());
        self.call(bundle, "exec", args, CallIo::Child(stdio)).map(drop)
    }

    /// `kill [--all] ID SIGNAL`. See [`RuntimeError::is_not_running`] for a finished process.
    pub fn kill(&self, id: &str, bundle: &Path, signal: u32, all: bool) -> Result<(), RuntimeError> {
        let signal = signal.to_string();
        if all {
            self.simple(bundle, "kill", ["--all", id, &signal])
        } else {
            self.simple(bundle, "kill", [id, &signal])
        }
    }

    /// `delete [--force] ID`. With `force`, runc also kills a running container and succeeds for
    /// one it does not know.
    pub fn delete(&self, id: &str, bundle: &Path, force: bool) -> Result<(), RuntimeError> {
        if force {
            self.simple(bundle, "delete", ["--force", id])
        } else {
            self.simple(bundle, "delete", [id])
        }
    }

    /// `pause ID` (freezes the container's cgroup).
    pub fn pause(&self, id: &str, bundle: &Path) -> Result<(), RuntimeError> {
        self.simple(bundle, "pause", [id])
    }

    /// `resume ID`.
    pub fn resume(&self, id: &str, bundle: &Path) -> Result<(), RuntimeError> {
        self.simple(bundle, "resume", [id])
    }

    /// `update --resources - ID` with the LinuxResources JSON on stdin.
    pub fn update(&self, id: &str, bundle: &Path, resources: &serde_json::Value) -> Result<(), RuntimeError> {
        let json =
            serde_json::to_vec(resources).map_err(|source| RuntimeError::Encode { what: "resources", source })?;
        let args: Vec<OsString> = vec!["--resources".into(), "-".into(), id.into()];
        self.call(bundle, "update", args, CallIo::Captured { input: Some(&json), stdout: false }).map(drop)
    }

    /// `ps --format json ID`: host pids of every process in the container.
    pub fn ps(&self, id: &str, bundle: &Path) -> Result<Vec<i32>, RuntimeError> {
        let args = ["--format", "json", id].map(OsString::from);
        let out = self.call(bundle, "ps", args, CallIo::Captured { input: None, stdout: true })?;
        // runc encodes an empty (nil) list as `null`.
        let pids: Option<Vec<i32>> = serde_json::from_slice(&out).map_err(|source| self.decode_error("ps", source))?;
        Ok(pids.unwrap_or_default())
    }

    /// The same runtime with `--criu` set for checkpoint and restore: the CRIU binary the
    /// preflight checked is the one the runtime runs.
    pub fn with_criu(&self, criu: PathBuf) -> OciRuntime {
        let mut opts = self.opts.clone();
        opts.criu = Some(criu);
        OciRuntime { opts, spawner: self.spawner.clone() }
    }

    /// The same runtime with `key=value` in its environment (and so in CRIU's).
    pub fn with_criu_env(&self, key: &str, value: impl Into<OsString>) -> OciRuntime {
        let mut opts = self.opts.clone();
        opts.criu_env.retain(|(k, _)| k != key);
        opts.criu_env.push((key.into(), value.into()));
        OciRuntime { opts, spawner: self.spawner.clone() }
    }

    /// `checkpoint ARGS ID`, the flags built by `kybernate_checkpoint::CheckpointFlags::checkpoint_args`.
    pub fn checkpoint(&self, id: &str, bundle: &Path, args: Vec<OsString>) -> Result<(), RuntimeError> {
        let args = args.into_iter().chain([OsString::from(id)]);
        self.call(bundle, "checkpoint", args, CallIo::Captured { input: None, stdout: false }).map(drop)
    }

    /// `restore ARGS ID` (ARGS from `kybernate_checkpoint::RestoreArgs`, `--detach` among them). Like
    /// `create`, the restored process inherits `stdio`: CRIU maps the pipes it had onto them.
    pub fn restore(&self, id: &str, bundle: &Path, args: Vec<OsString>, stdio: ChildStdio) -> Result<(), RuntimeError> {
        let args = args.into_iter().chain([OsString::from(id)]);
        self.call(bundle, "restore", args, CallIo::Child(stdio)).map(drop)
    }

    /// First line of `BINARY --version`, for checkpoint manifests.
    pub fn version(&self) -> Result<String, RuntimeError> {
        tool_version(self.spawner.as_ref(), &self.opts.binary, "--version")
    }

    /// `state ID`.
    pub fn state(&self, id: &str, bundle: &Path) -> Result<RuntimeState, RuntimeError> {
        let out = self.call(bundle, "state", [OsString::from(id)], CallIo::Captured { input: None, stdout: true })?;
        serde_json::from_slice(&out).map_err(|source| self.decode_error("state", source))
    }

    fn decode_error(&self, subcommand: &str, source: serde_json::Error) -> RuntimeError {
        RuntimeError::Decode { binary: self.opts.binary.clone(), subcommand: subcommand.into(), source }
    }

    /// A call with no input and no output of interest.
    fn simple<const N: usize>(&self, bundle: &Path, subcommand: &str, args: [&str; N]) -> Result<(), RuntimeError> {
        let args = args.into_iter().map(OsString::from);
        self.call(bundle, subcommand, args, CallIo::Captured { input: None, stdout: false }).map(drop)
    }

    /// The global flags: `--root R --log B/log.json --log-format json [--systemd-cgroup] [--criu C]`.
    fn global_args(&self, bundle: &Path, subcommand: &str) -> Vec<OsString> {
        let mut args: Vec<OsString> = vec![
            "--root".into(),
            self.opts.root.clone().into(),
            "--log".into(),
            log_file(bundle).into(),
            "--log-format".into(),
            "json".into(),
        ];
        if self.opts.systemd_cgroup {
            args.push("--systemd-cgroup".into());
        }
        if let (Some(criu), true) = (&self.opts.criu, CRIU_SUBCOMMANDS.contains(&subcommand)) {
            args.extend(["--criu".into(), criu.into()]);
        }
        args
    }

    /// Runs `binary GLOBAL subcommand args`; returns captured stdout, or the runtime's error.
    fn call(
        &self,
        bundle: &Path,
        subcommand: &str,
        args: impl IntoIterator<Item = OsString>,
        io: CallIo<'_>,
    ) -> Result<Vec<u8>, RuntimeError> {
        let log = log_file(bundle);
        let log_start = std::fs::metadata(&log).map(|m| m.len()).unwrap_or(0);

        let mut cmd = Command::new(&self.opts.binary);
        cmd.args(self.global_args(bundle, subcommand)).arg(subcommand).args(args);
        cmd.envs(self.opts.criu_env.iter().map(|(k, v)| (k, v)));
        cmd.env_remove(NOTIFY_SOCKET);
        let (input, capture) = match io {
            CallIo::Child(stdio) => {
                cmd.stdin(stdio_or_null(stdio.stdin))
                    .stdout(stdio_or_null(stdio.stdout))
                    .stderr(stdio_or_null(stdio.stderr));
                (None, Capture::default())
            }
            CallIo::Captured { input, stdout } => {
                cmd.stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::null());
                (input, Capture { stdout, stderr: true })
            }
        };
        log::debug!("running {:?}", cmd);
        let spawn_error =
            |source| RuntimeError::Spawn { binary: self.opts.binary.clone(), subcommand: subcommand.into(), source };
        let out = if CRIU_SUBCOMMANDS.contains(&subcommand) {
            let group = GroupRecord::in_bundle(bundle);
            let out = self.spawner.run_grouped(cmd, input, capture, &group);
            // No CRIU outlives its runtime. A restored container's processes are never in the
            // runtime's group (CRIU gives them their own sessions), but a successful restore has
            // nothing to clean up anyway.
            if subcommand == "checkpoint" || !matches!(out, Ok(RunOutput { code: 0, .. })) {
                group.kill_leftovers();
            } else {
                group.remove();
            }
            out.map_err(spawn_error)?
        } else {
            self.spawner.run(cmd, input, capture).map_err(spawn_error)?
        };
        if out.code == 0 {
            return Ok(out.stdout);
        }
        let message = last_logged_error(&log, log_start)
            .or_else(|| stderr_message(&out.stderr))
            .unwrap_or_else(|| format!("exited with status {}", out.code));
        Err(RuntimeError::Failed {
            binary: self.opts.binary.clone(),
            subcommand: subcommand.into(),
            code: out.code,
            message,
        })
    }
}

/// systemd's readiness socket, in the environment of a containerd run as a `Type=notify` unit
/// (Debian's, Ubuntu's and upstream's containerd.service) and so in ours. runc reads it as a
/// request to proxy it into the container: `create` binds a socket in its state dir (too long a
/// path for a unix socket with CRI's 64-hex ids: every pod failed on such a node, measured) and
/// `start` blocks until the container sends READY=1 or exits, then passes it on to containerd's
/// unit with the container's pid as MAINPID (runc's notify_socket.go). go-runc drops it from
/// every runtime call; so do we.
const NOTIFY_SOCKET: &str = "NOTIFY_SOCKET";

/// Output of `BINARY ARG` (e.g. `criu --version`), all of stdout, run through `spawner`.
/// Fails like a runtime call when the tool cannot run or exits non-zero.
pub fn tool_output(spawner: &dyn Spawner, binary: &Path, arg: &str) -> Result<String, RuntimeError> {
    let mut cmd = Command::new(binary);
    cmd.arg(arg).stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::null());
    let out = spawner.run(cmd, None, Capture { stdout: true, stderr: true }).map_err(|source| RuntimeError::Spawn {
        binary: binary.to_path_buf(),
        subcommand: arg.into(),
        source,
    })?;
    if out.code != 0 {
        return Err(RuntimeError::Failed {
            binary: binary.to_path_buf(),
            subcommand: arg.into(),
            code: out.code,
            message: stderr_message(&out.stderr).unwrap_or_else(|| format!("exited with status {}", out.code)),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// First non-empty line of [`tool_output`].
pub fn tool_version(spawner: &dyn Spawner, binary: &Path, arg: &str) -> Result<String, RuntimeError> {
    let text = tool_output(spawner, binary, arg)?;
    Ok(text.lines().map(str::trim).find(|l| !l.is_empty()).unwrap_or_default().to_string())
}

fn stdio_or_null(fd: Option<OwnedFd>) -> Stdio {
    fd.map(Stdio::from).unwrap_or_else(Stdio::null)
}

/// One line of the runtime's JSON log (logrus format).
#[derive(Deserialize)]
struct LogLine {
    #[serde(default)]
    level: String,
    #[serde(default)]
    msg: String,
}

/// The last error-level message appended to `log` after byte `start`, as containerd's runc shim
/// reports it. Lines from earlier calls are skipped, so an old failure is never blamed for a new
/// one; a concurrent call on the same bundle may still interleave its lines.
fn last_logged_error(log: &Path, start: u64) -> Option<String> {
    let mut file = std::fs::File::open(log).ok()?;
    let len = file.metadata().ok()?.len();
    // A shorter file was truncated or replaced since: all of it is new.
    let mut from = if len < start { 0 } else { start };
    from = from.max(len.saturating_sub(MAX_LOG_TAIL));
    file.seek(SeekFrom::Start(from)).ok()?;
    let mut text = Vec::new();
    file.take(len - from).read_to_end(&mut text).ok()?;
    text.rsplit(|b| *b == b'\n')
        .filter_map(|line| serde_json::from_slice::<LogLine>(line).ok())
        .find(|l| matches!(l.level.as_str(), "error" | "fatal" | "panic") && !l.msg.trim().is_empty())
        .map(|l| l.msg.trim().to_string())
}

/// Captured stderr as a message, when the log had none (e.g. a wrapper that fails before runc).
fn stderr_message(stderr: &[u8]) -> Option<String> {
    let text = String::from_utf8_lossy(stderr);
    let text = text.trim();
    if text.is_empty() {
        return None;
    }
    // Keep the end: that is where the final error is.
    const MAX: usize = 4096;
    let cut = text.len().saturating_sub(MAX);
    let start = (cut..text.len()).find(|i| text.is_char_boundary(*i)).unwrap_or(text.len());
    Some(text[start..].to_string())
}

/// An exec's process JSON in a fresh 0600 file in the bundle (it may hold secrets in its env);
/// removed on drop, whatever the outcome of the call.
struct ProcessFile(PathBuf);

impl ProcessFile {
    fn write(bundle: &Path, process: &serde_json::Value) -> Result<ProcessFile, RuntimeError> {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let json =
            serde_json::to_vec(process).map_err(|source| RuntimeError::Encode { what: "the exec process", source })?;
        let io_err = |path: &Path| {
            let context = format!("writing the exec process file {}", path.display());
            move |source| RuntimeError::Io { context, source }
        };
        // create_new: never write through a name someone else made (a link, a leftover).
        for _ in 0..16 {
            let n = NEXT.fetch_add(1, Ordering::Relaxed);
            let path = bundle.join(format!(".exec-process-{}-{n}.json", std::process::id()));
            match OpenOptions::new().write(true).create_new(true).mode(0o600).open(&path) {
                Ok(mut f) => {
                    let file = ProcessFile(path);
                    f.write_all(&json).map_err(io_err(&file.0))?;
                    return Ok(file);
                }
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(io_err(&path)(e)),
            }
        }
        let path = bundle.join(".exec-process-*.json");
        Err(io_err(&path)(io::Error::from(io::ErrorKind::AlreadyExists)))
    }

    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for ProcessFile {
    fn drop(&mut self) {
        if let Err(e) = std::fs::remove_file(&self.0) {
            log::warn!("cannot remove {}: {e}", self.0.display());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    /// A fake runtime: records its argv, and does per subcommand `<sub>` what files in its state
    /// dir (the parent of `--root`) say: `log-<sub>` is appended to the `--log` file,
    /// `stderr-<sub>` goes to stderr, `exit-<sub>` holds an exit code, `signal-<sub>` makes it
    /// SIGKILL itself. `create` echoes a stdin line to stdout and stderr when `echo-stdio` exists;
    /// `update` saves its stdin; `exec` saves its process file, its mode and its path; `state` and
    /// `ps` print `state.json` and `ps.json`.
    const FAKE_RUNTIME: &str = r#"#!/bin/sh
root=""; log=""; sub=""; skip=""
for a in "$@"; do
    if [ -n "$skip" ]; then
        case "$skip" in --root) root=$a ;; --log) log=$a ;; esac
        skip=""; continue
    fi
    case "$a" in
        --root|--log|--log-format|--criu) [ -z "$sub" ] && skip=$a ;;
        -*) ;;
        *) [ -z "$sub" ] && sub=$a ;;
    esac
done
d=$(dirname "$root")
for a in "$@"; do printf '%s\037' "$a"; done >> "$d/calls"
printf '\n' >> "$d/calls"
case "$sub" in
    create)
        if [ -e "$d/echo-stdio" ]; then IFS= read -r line; echo "out:$line"; echo "err:$line" >&2; fi ;;
    update) cat > "$d/update-stdin" ;;
    exec)
        prev=""
        for a in "$@"; do
            if [ "$prev" = --process ]; then
                cp "$a" "$d/exec-process.json"; stat -c %a "$a" > "$d/exec-mode"; echo "$a" > "$d/exec-path"
            fi
            prev=$a
        done ;;
    state) cat "$d/state.json" ;;
    ps) cat "$d/ps.json" ;;
esac
[ -e "$d/log-$sub" ] && cat "$d/log-$sub" >> "$log"
[ -e "$d/stderr-$sub" ] && cat "$d/stderr-$sub" >&2
[ -e "$d/signal-$sub" ] && kill -9 $$
[ -e "$d/exit-$sub" ] && exit "$(cat "$d/exit-$sub")"
exit 0
"#;

    struct Fake {
        dir: tempfile::TempDir,
        rt: OciRuntime,
    }

    impl Fake {
        fn new() -> Fake {
            Fake::with(|_| {})
        }

        fn with(edit: impl FnOnce(&mut RuntimeOpts)) -> Fake {
            let dir = tempfile::tempdir().unwrap();
            let src = dir.path().join("fake-runtime.sh");
            std::fs::write(&src, FAKE_RUNTIME).unwrap();
            std::fs::set_permissions(&src, std::fs::Permissions::from_mode(0o755)).unwrap();
            // Copied by another process: a binary we wrote ourselves could be exec'd while a
            // concurrent test's fork still holds our write fd (ETXTBSY).
            let bin = dir.path().join("runc");
            let cp = Command::new("cp").arg(&src).arg(&bin).status().unwrap();
            assert!(cp.success());
            std::fs::create_dir(dir.path().join("bundle")).unwrap();
            let mut opts = RuntimeOpts {
                binary: bin,
                root: dir.path().join("root"),
                systemd_cgroup: false,
                criu: None,
                criu_env: vec![],
            };
            edit(&mut opts);
            let rt = OciRuntime::new(opts, Arc::new(DirectSpawner));
            Fake { dir, rt }
        }

        fn bundle(&self) -> PathBuf {
            self.dir.path().join("bundle")
        }

        fn set(&self, name: &str, content: &str) {
            std::fs::write(self.dir.path().join(name), content).unwrap();
        }

        fn read(&self, name: &str) -> String {
            std::fs::read_to_string(self.dir.path().join(name)).unwrap()
        }

        /// Argument vectors of every invocation so far.
        fn calls(&self) -> Vec<Vec<String>> {
            let text = std::fs::read_to_string(self.dir.path().join("calls")).unwrap_or_default();
            text.lines().map(|l| l.split('\u{1f}').filter(|a| !a.is_empty()).map(String::from).collect()).collect()
        }

        /// The global flags every invocation starts with.
        fn global(&self) -> Vec<String> {
            let root = self.dir.path().join("root");
            let log = self.bundle().join("log.json");
            vec![
                "--root".into(),
                root.display().to_string(),
                "--log".into(),
                log.display().to_string(),
                "--log-format".into(),
                "json".into(),
            ]
        }

        fn expect(&self, rest: &[&str]) -> Vec<String> {
            let mut v = self.global();
            v.extend(rest.iter().map(|s| s.to_string()));
            v
        }
    }

    fn error_line(msg: &str) -> String {
        format!("{}\n", serde_json::json!({"level": "error", "msg": msg, "time": "2024-01-01T00:00:00Z"}))
    }

    fn info_line(msg: &str) -> String {
        format!("{}\n", serde_json::json!({"level": "info", "msg": msg, "time": "2024-01-01T00:00:00Z"}))
    }

    #[test]
    fn every_method_builds_its_argument_vector() {
        let f = Fake::new();
        let b = f.bundle();
        let bs = b.display().to_string();
        f.set("state.json", r#"{"id":"c1","pid":42,"status":"running"}"#);
        f.set("ps.json", "[42]");

        let create = CreateOpts {
            pid_file: b.join("init.pid"),
            console_socket: Some("/run/console.sock".into()),
            no_pivot: true,
            no_new_keyring: true,
        };
        f.rt.create("c1", &b, &create, ChildStdio::default()).unwrap();
        let plain =
            CreateOpts { pid_file: b.join("init.pid"), console_socket: None, no_pivot: false, no_new_keyring: false };
        f.rt.create("c1", &b, &plain, ChildStdio::default()).unwrap();
        f.rt.start("c1", &b).unwrap();
        let exec = ExecOpts { pid_file: b.join("e1.pid"), console_socket: Some("/run/e1.sock".into()) };
        f.rt.exec("c1", &b, &serde_json::json!({"args": ["true"]}), &exec, ChildStdio::default()).unwrap();
        let exec_path = f.read("exec-path").trim().to_string();
        f.rt.kill("c1", &b, 15, false).unwrap();
        f.rt.kill("c1", &b, 9, true).unwrap();
        f.rt.delete("c1", &b, false).unwrap();
        f.rt.delete("c1", &b, true).unwrap();
        f.rt.pause("c1", &b).unwrap();
        f.rt.resume("c1", &b).unwrap();
        f.rt.update("c1", &b, &serde_json::json!({})).unwrap();
        f.rt.ps("c1", &b).unwrap();
        f.rt.state("c1", &b).unwrap();

        let init_pid = format!("{bs}/init.pid");
        let e1_pid = format!("{bs}/e1.pid");
        let want = vec![
            f.expect(&[
                "create",
                "--bundle",
                &bs,
                "--pid-file",
                &init_pid,
                "--console-socket",
                "/run/console.sock",
                "--no-pivot",
                "--no-new-keyring",
                "c1",
            ]),
            f.expect(&["create", "--bundle", &bs, "--pid-file", &init_pid, "c1"]),
            f.expect(&["start", "c1"]),
            f.expect(&[
                "exec",
                "--process",
                &exec_path,
                "--detach",
                "--pid-file",
                &e1_pid,
                "--console-socket",
                "/run/e1.sock",
                "c1",
            ]),
            f.expect(&["kill", "c1", "15"]),
            f.expect(&["kill", "--all", "c1", "9"]),
            f.expect(&["delete", "c1"]),
            f.expect(&["delete", "--force", "c1"]),
            f.expect(&["pause", "c1"]),
            f.expect(&["resume", "c1"]),
            f.expect(&["update", "--resources", "-", "c1"]),
            f.expect(&["ps", "--format", "json", "c1"]),
            f.expect(&["state", "c1"]),
        ];
        assert_eq!(f.calls(), want);
    }

    #[test]
    fn systemd_cgroup_is_global_and_criu_only_for_checkpoint_and_restore() {
        let f = Fake::with(|o| {
            o.systemd_cgroup = true;
            o.criu = Some("/usr/local/sbin/criu".into());
        });
        let b = f.bundle();
        f.rt.start("c1", &b).unwrap();
        let mut want = f.global();
        want.extend(["--systemd-cgroup".to_string(), "start".into(), "c1".into()]);
        assert_eq!(f.calls(), vec![want]);

        let mut with_criu: Vec<OsString> = f.global().into_iter().map(OsString::from).collect();
        with_criu.extend(["--systemd-cgroup", "--criu", "/usr/local/sbin/criu"].map(OsString::from));
        assert_eq!(f.rt.global_args(&b, "checkpoint"), with_criu);
        assert_eq!(f.rt.global_args(&b, "restore"), with_criu);
        assert!(!f.rt.global_args(&b, "create").contains(&OsString::from("--criu")));
    }

    #[test]
    fn update_passes_the_resources_on_stdin() {
        let f = Fake::new();
        let resources = serde_json::json!({"memory": {"limit": 67108864}, "cpu": {"shares": 512}});
        f.rt.update("c1", &f.bundle(), &resources).unwrap();
        let got: serde_json::Value = serde_json::from_str(&f.read("update-stdin")).unwrap();
        assert_eq!(got, resources);
    }

    #[test]
    fn failure_carries_the_last_error_this_call_logged() {
        let f = Fake::new();
        let b = f.bundle();
        f.set("exit-kill", "1");
        f.set(
            "log-kill",
            &format!("{}{}{}", error_line("first"), info_line("chatter"), error_line("container not running")),
        );
        let e = f.rt.kill("c1", &b, 9, false).unwrap_err();
        match &e {
            RuntimeError::Failed { subcommand, code, message, binary } => {
                assert_eq!(subcommand, "kill");
                assert_eq!(*code, 1);
                assert_eq!(message, "container not running");
                assert_eq!(binary, f.rt.binary());
            }
            other => panic!("unexpected {other:?}"),
        }
        assert_eq!(e.to_string(), "runc kill failed: container not running");
        assert!(e.is_not_running());
        assert!(!e.is_not_found());
    }

    #[test]
    fn errors_logged_by_earlier_calls_are_not_reported() {
        let f = Fake::new();
        let b = f.bundle();
        std::fs::write(log_file(&b), error_line("an old create problem")).unwrap();
        f.set("exit-delete", "3");
        f.set("log-delete", &info_line("only info this time"));
        let e = f.rt.delete("c1", &b, false).unwrap_err();
        assert_eq!(e.to_string(), "runc delete failed: exited with status 3");

        f.set("log-delete", &error_line("container does not exist"));
        let e = f.rt.delete("c1", &b, false).unwrap_err();
        assert_eq!(e.to_string(), "runc delete failed: container does not exist");
        assert!(e.is_not_found());

        // The same file again, with nothing new: the previous call's error is not repeated.
        std::fs::remove_file(f.dir.path().join("log-delete")).unwrap();
        let e = f.rt.delete("c1", &b, false).unwrap_err();
        assert!(matches!(e, RuntimeError::Failed { code: 3, ref message, .. } if message == "exited with status 3"));
    }

    #[test]
    fn stderr_is_the_fallback_message() {
        let f = Fake::new();
        f.set("exit-pause", "1");
        f.set("stderr-pause", "\n  wrapper: cannot find runc  \n\n");
        let e = f.rt.pause("c1", &f.bundle()).unwrap_err();
        assert_eq!(e.to_string(), "runc pause failed: wrapper: cannot find runc");

        // The log wins over stderr when both have something.
        f.set("log-pause", &error_line("container not running"));
        let e = f.rt.pause("c1", &f.bundle()).unwrap_err();
        assert_eq!(e.to_string(), "runc pause failed: container not running");
    }

    #[test]
    fn a_killed_runtime_reports_128_plus_signal() {
        let f = Fake::new();
        f.set("signal-resume", "");
        let e = f.rt.resume("c1", &f.bundle()).unwrap_err();
        assert!(matches!(e, RuntimeError::Failed { code: 137, .. }), "{e:?}");
        assert_eq!(e.to_string(), "runc resume failed: exited with status 137");
    }

    #[test]
    fn runtime_prefix_is_not_repeated() {
        let f = Fake::new();
        f.set("exit-create", "1");
        let msg = "runc create failed: unable to start container process: exec: \"/x\": no such file or directory";
        f.set("log-create", &error_line(msg));
        let o =
            CreateOpts { pid_file: f.bundle().join("p"), console_socket: None, no_pivot: false, no_new_keyring: false };
        let e = f.rt.create("c1", &f.bundle(), &o, ChildStdio::default()).unwrap_err();
        assert_eq!(e.to_string(), msg);
        assert!(!e.is_not_found() && !e.is_not_running());
    }

    #[test]
    fn child_stdio_reaches_the_runtime() {
        use nix::fcntl::OFlag;
        use nix::unistd::pipe2;
        let f = Fake::new();
        f.set("echo-stdio", "");
        let (in_r, in_w) = pipe2(OFlag::O_CLOEXEC).unwrap();
        let (out_r, out_w) = pipe2(OFlag::O_CLOEXEC).unwrap();
        let (err_r, err_w) = pipe2(OFlag::O_CLOEXEC).unwrap();
        let mut stdin = std::fs::File::from(in_w);
        stdin.write_all(b"ping\n").unwrap();
        drop(stdin);
        let stdio = ChildStdio { stdin: Some(in_r), stdout: Some(out_w), stderr: Some(err_w) };
        let o =
            CreateOpts { pid_file: f.bundle().join("p"), console_socket: None, no_pivot: false, no_new_keyring: false };
        f.rt.create("c1", &f.bundle(), &o, stdio).unwrap();
        // Our copies of the write ends are closed by now, so these reads end.
        let mut out = String::new();
        std::fs::File::from(out_r).read_to_string(&mut out).unwrap();
        let mut err = String::new();
        std::fs::File::from(err_r).read_to_string(&mut err).unwrap();
        assert_eq!(out, "out:ping\n");
        assert_eq!(err, "err:ping\n");
    }

    #[test]
    fn ps_and_state_are_parsed() {
        let f = Fake::new();
        let b = f.bundle();
        f.set("ps.json", "[101,102]\n");
        assert_eq!(f.rt.ps("c1", &b).unwrap(), vec![101, 102]);
        f.set("ps.json", "null\n");
        assert_eq!(f.rt.ps("c1", &b).unwrap(), Vec::<i32>::new());

        // runc 1.1.5's output for a running container.
        f.set(
            "state.json",
            r#"{
  "ociVersion": "1.0.2-dev",
  "id": "c1",
  "pid": 4242,
  "status": "running",
  "bundle": "/b",
  "rootfs": "/b/rootfs",
  "created": "2024-05-01T10:00:00.123456789Z",
  "annotations": {"a": "b"},
  "owner": ""
}"#,
        );
        let s = f.rt.state("c1", &b).unwrap();
        assert_eq!(
            s,
            RuntimeState {
                id: "c1".into(),
                pid: 4242,
                status: ContainerStatus::Running,
                bundle: "/b".into(),
                rootfs: "/b/rootfs".into(),
                created: "2024-05-01T10:00:00.123456789Z".into(),
                annotations: HashMap::from([("a".to_string(), "b".to_string())]),
            }
        );
        f.set("state.json", r#"{"id":"c1","pid":0,"status":"stopped","annotations":null}"#);
        let s = f.rt.state("c1", &b).unwrap();
        assert_eq!((s.status, s.pid, s.annotations.len()), (ContainerStatus::Stopped, 0, 0));
        f.set("state.json", r#"{"id":"c1","status":"hibernating"}"#);
        assert_eq!(f.rt.state("c1", &b).unwrap().status, ContainerStatus::Unknown);
    }

    #[test]
    fn undecodable_output_is_a_decode_error() {
        let f = Fake::new();
        f.set("ps.json", "1 2 3");
        let e = f.rt.ps("c1", &f.bundle()).unwrap_err();
        assert!(matches!(e, RuntimeError::Decode { ref subcommand, .. } if subcommand == "ps"), "{e:?}");
        assert!(e.to_string().starts_with("cannot decode the output of runc ps: "), "{e}");
    }

    #[test]
    fn exec_process_file_is_private_and_removed() {
        let f = Fake::new();
        let b = f.bundle();
        // A capability and a field no release defines: passed on to the runtime as they are.
        let process = serde_json::json!({
            "args": ["/bin/echo", "hi"], "env": ["SECRET=1"], "cwd": "/",
            "capabilities": {"bounding": ["CAP_FUTURE_42"]}, "futureField": {"x": 1}
        });
        let o = ExecOpts { pid_file: b.join("e1.pid"), console_socket: None };
        f.rt.exec("c1", &b, &process, &o, ChildStdio::default()).unwrap();

        let written: serde_json::Value = serde_json::from_str(&f.read("exec-process.json")).unwrap();
        assert_eq!(written, process);
        assert_eq!(f.read("exec-mode").trim(), "600");
        let path = PathBuf::from(f.read("exec-path").trim());
        assert_eq!(path.parent(), Some(b.as_path()));
        assert!(!path.exists());

        // Also removed when the runtime fails.
        f.set("exit-exec", "1");
        assert!(f.rt.exec("c1", &b, &process, &o, ChildStdio::default()).is_err());
        let path = PathBuf::from(f.read("exec-path").trim());
        assert!(!path.exists());
        let left: Vec<_> = std::fs::read_dir(&b).unwrap().flatten().map(|e| e.file_name()).collect();
        assert!(left.iter().all(|n| n == LOG_FILE), "left in the bundle: {left:?}");
    }

    /// One command's environment edits: set (`Some`) or removed (`None`).
    type EnvEdits = Vec<(OsString, Option<OsString>)>;

    /// Records each command's environment edits instead of running it.
    #[derive(Default)]
    struct EnvRecorder(std::sync::Mutex<Vec<EnvEdits>>);

    impl Spawner for EnvRecorder {
        fn run(&self, cmd: Command, _: Option<&[u8]>, _: Capture) -> io::Result<RunOutput> {
            let envs = cmd.get_envs().map(|(k, v)| (k.to_owned(), v.map(std::ffi::OsStr::to_owned))).collect();
            self.0.lock().unwrap().push(envs);
            Ok(RunOutput { code: 0, stdout: vec![], stderr: vec![] })
        }

        fn start_piped(&self, _: Command) -> io::Result<PipedChild> {
            Err(io::Error::other("EnvRecorder starts nothing"))
        }
    }

    #[test]
    fn systemds_notify_socket_never_reaches_the_runtime() {
        let recorder = Arc::new(EnvRecorder::default());
        let opts = RuntimeOpts {
            binary: "/usr/bin/runc".into(),
            root: "/run/containerd/runc/k8s.io".into(),
            systemd_cgroup: false,
            criu: None,
            criu_env: vec![],
        };
        let rt = OciRuntime::new(opts, recorder.clone()).with_criu_env("CRIU_CONFIG_FILE", "/dev/null");
        let bundle = Path::new("/nonexistent/bundle");
        rt.start("c1", bundle).unwrap();
        rt.kill("c1", bundle, 15, false).unwrap();
        rt.delete("c1", bundle, true).unwrap();
        let calls = recorder.0.lock().unwrap();
        assert_eq!(calls.len(), 3);
        for envs in calls.iter() {
            assert!(envs.contains(&(NOTIFY_SOCKET.into(), None)), "{envs:?}");
            // The runtime's own additions stay.
            assert!(envs.contains(&("CRIU_CONFIG_FILE".into(), Some("/dev/null".into()))), "{envs:?}");
        }
    }

    #[test]
    fn a_missing_binary_is_a_spawn_error() {
        let f = Fake::with(|o| o.binary = "/nonexistent/runc".into());
        let e = f.rt.start("c1", &f.bundle()).unwrap_err();
        match &e {
            RuntimeError::Spawn { binary, subcommand, source } => {
                assert_eq!(binary, Path::new("/nonexistent/runc"));
                assert_eq!(subcommand, "start");
                assert_eq!(source.kind(), io::ErrorKind::NotFound);
            }
            other => panic!("unexpected {other:?}"),
        }
        assert!(e.to_string().starts_with("cannot run /nonexistent/runc start: "), "{e}");
    }

    #[test]
    fn large_stdout_and_stderr_do_not_deadlock() {
        let f = Fake::new();
        let pids: Vec<i32> = (1..=200_000).collect();
        f.set("ps.json", &serde_json::to_string(&pids).unwrap());
        f.set("stderr-ps", &"warning: lots of noise\n".repeat(20_000));
        assert_eq!(f.rt.ps("c1", &f.bundle()).unwrap(), pids);
    }

    #[test]
    fn classifies_runc_kill_and_delete_messages() {
        let failed = |message: &str| RuntimeError::Failed {
            binary: "/usr/bin/runc".into(),
            subcommand: "kill".into(),
            code: 1,
            message: message.into(),
        };
        assert!(failed("container not running").is_not_running());
        assert!(failed("no such process").is_not_running());
        assert!(failed("os: process already finished").is_not_running());
        assert!(failed("container does not exist").is_not_found());
        assert!(failed("Container Does Not Exist").is_not_found());
        assert!(!failed("container does not exist").is_not_running());
        assert!(!failed("permission denied").is_not_running());
        assert!(!failed("permission denied").is_not_found());
        let spawn = RuntimeError::Spawn {
            binary: "/usr/bin/runc".into(),
            subcommand: "kill".into(),
            source: io::Error::from(io::ErrorKind::NotFound),
        };
        assert!(!spawn.is_not_found() && !spawn.is_not_running());
    }

    #[test]
    fn log_reading_handles_truncation_and_garbage() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("log.json");
        assert_eq!(last_logged_error(&log, 0), None);
        std::fs::write(&log, format!("not json\n{}{{\"level\":\"error\"", error_line("real"))).unwrap();
        assert_eq!(last_logged_error(&log, 0).as_deref(), Some("real"));
        // A file shorter than where we started was replaced: read it all.
        assert_eq!(last_logged_error(&log, 1 << 30).as_deref(), Some("real"));
        std::fs::write(&log, format!("{}{}", error_line("fatal one"), error_line("  "))).unwrap();
        assert_eq!(last_logged_error(&log, 0).as_deref(), Some("fatal one"));
    }
}
