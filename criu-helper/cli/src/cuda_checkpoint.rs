//! `kybernate cuda-checkpoint`: a drop-in for NVIDIA's `cuda-checkpoint` utility over the CUDA
//! driver's checkpoint API, so that CRIU's CUDA plugin works on nodes that have the driver (r570+)
//! but not NVIDIA's binary. Installed as a symlink named `cuda-checkpoint` on CRIU's PATH, the
//! binary behaves as this subcommand (argv[0] dispatch).
//!
//! CRIU's plugin runs the tool with stdout and stderr on one pipe and parses what comes back, so
//! the formats are NVIDIA's, not the CLI's (`--output` does not apply):
//! - `-h`/`--help` exits 0 and mentions `--action` (the plugin's check for r555+ support);
//! - `--get-state` prints the state word (`running`, `locked`, `checkpointed`, `failed`) and a
//!   newline, nothing else (compared by prefix);
//! - `--get-restore-tid` prints the decimal thread id and a newline (parsed with strtol, only
//!   whitespace may follow); a non-zero exit means "no CUDA in this process";
//! - `--action` and `--toggle` print nothing on success.
//!
//! `--device-map/-d OLD=NEW,...` (NVIDIA's syntax, driver r580 / CUDA 13.0+) restores onto other
//! GPUs: with `--action restore`, or `--toggle` of a checkpointed process; every GPU the process
//! was checkpointed on is listed once.
//!
//! A `--toggle` that fails half-way asks the driver where the process is and undoes by the
//! answer (checkpointed → restore + unlock, locked → unlock); a process that cannot be brought
//! back (failed, stuck) is named with the driver's answer. A failed `--action` reports the state
//! the driver gives afterwards.
//!
//! Failures exit 1 with one line on stderr naming the driver call and the CUDA error; usage
//! errors exit 2.

use std::ffi::OsString;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{ArgGroup, Parser, ValueEnum};
use kybernate_gpu::cuda::{self, CudaDriver, CudaError, GpuPair, LibCuda, ProcessState, REMAP_MIN_DRIVER};
use kybernate_runtime_select::config::CONFIG_ENV;
use kybernate_runtime_select::{Config, ConfigSource};

use crate::error::{self, CliError};

/// The name CRIU's plugin runs; a symlink of this name to `kybernate` selects this command.
pub const TOOL_NAME: &str = "cuda-checkpoint";

/// Lock timeout without `--timeout`: 0, the driver's "no limit" (NVIDIA's tool passes no
/// timeout unless asked; CRIU's plugin always passes its own).
pub const DEFAULT_LOCK_TIMEOUT_MS: u32 = 0;

/// Exactly NVIDIA's flags: one operation and `--pid`.
#[derive(Debug, Clone, clap::Args)]
#[command(group(ArgGroup::new("operation").required(true).args(["get_state", "action", "toggle", "get_restore_tid"])))]
pub struct Args {
    /// Print the CUDA checkpoint state of the process: running, locked, checkpointed or failed.
    #[arg(long)]
    pub get_state: bool,
    /// Perform one step of the checkpoint cycle on the process (lock, then checkpoint; restore,
    /// then unlock).
    #[arg(long, value_enum, value_name = "ACTION")]
    pub action: Option<Action>,
    /// Toggle the process between running and checkpointed (lock + checkpoint, or restore + unlock).
    #[arg(long)]
    pub toggle: bool,
    /// Print the thread id of the process's CUDA restore thread.
    #[arg(long)]
    pub get_restore_tid: bool,
    /// The process to operate on.
    #[arg(short, long, value_name = "PID", required = true, value_parser = clap::value_parser!(i32).range(1..))]
    pub pid: i32,
    /// For the lock (--action lock, --toggle): wait at most this long for the process's submitted
    /// GPU work [default: no limit].
    #[arg(short, long, value_name = "MS")]
    pub timeout: Option<u32>,
    /// For a restore (--action restore, --toggle of a checkpointed process): restore onto other
    /// GPUs, OLD=NEW GPU UUIDs separated by commas, every checkpointed GPU listed once (needs
    /// driver r580 / CUDA 13.0).
    #[arg(short = 'd', long, value_name = "OLD=NEW,...", value_delimiter = ',', value_parser = parse_pair)]
    pub device_map: Vec<GpuPair>,
}

/// One `OLD=NEW` of `--device-map`.
fn parse_pair(text: &str) -> Result<GpuPair, String> {
    let (old, new) = text.split_once('=').ok_or_else(|| format!("{text:?} is not OLD=NEW"))?;
    let (old, new) = (old.trim(), new.trim());
    for uuid in [old, new] {
        if cuda::parse_gpu_uuid(uuid).is_none() {
            return Err(format!("{uuid:?} is not a GPU UUID (GPU-xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx)"));
        }
    }
    Ok(GpuPair { old: old.to_string(), new: new.to_string() })
}

/// `--action`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Action {
    Lock,
    Checkpoint,
    Restore,
    Unlock,
}

/// The command line when the binary runs as `cuda-checkpoint`.
#[derive(Debug, Parser)]
#[command(
    name = TOOL_NAME,
    about = "CUDA checkpoint and restore of one process through the CUDA driver (Kybernate's cuda-checkpoint)",
    disable_version_flag = true
)]
struct Standalone {
    /// Kybernate config file [default: $KYBERNATE_CONFIG, else /etc/kybernate/config.toml].
    #[arg(long, value_name = "FILE", hide = true)]
    config: Option<PathBuf>,
    #[command(flatten)]
    args: Args,
}

/// When the binary was started under the name `cuda-checkpoint`: runs as that tool and returns
/// its exit code; otherwise None.
pub fn main_by_argv0() -> Option<ExitCode> {
    let argv: Vec<OsString> = std::env::args_os().collect();
    let name = argv.first().map(Path::new).and_then(Path::file_name)?;
    if name != TOOL_NAME {
        return None;
    }
    let cli = match Standalone::try_parse_from(&argv) {
        Ok(cli) => cli,
        Err(e) if !e.use_stderr() => e.exit(), // --help: print, exit 0
        Err(e) => {
            let line = error::usage_line(&e).replace("`kybernate --help`", "`cuda-checkpoint --help`");
            eprintln!("{TOOL_NAME}: {line}");
            return Some(ExitCode::from(error::USAGE));
        }
    };
    Some(match run(cli.config.as_deref(), &cli.args) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("{TOOL_NAME}: {e}");
            ExitCode::from(e.exit_code())
        }
    })
}

/// Runs one operation against the driver library named by the config's `[checkpoint] libcuda`.
pub fn run(config: Option<&Path>, args: &Args) -> Result<ExitCode, CliError> {
    if args.timeout.is_some() && !(args.toggle || args.action == Some(Action::Lock)) {
        return Err(CliError::Usage(
            "--timeout applies to the lock only (--action lock or --toggle); see --help".into(),
        ));
    }
    if !args.device_map.is_empty() {
        if !(args.toggle || args.action == Some(Action::Restore)) {
            return Err(CliError::Usage(
                "--device-map applies to a restore only (--action restore or --toggle); see --help".into(),
            ));
        }
        let lower = |s: &str| s.to_ascii_lowercase();
        for (i, p) in args.device_map.iter().enumerate() {
            if let Some(q) = args.device_map[..i].iter().find(|q| lower(&q.old) == lower(&p.old)) {
                return Err(CliError::Usage(format!("--device-map maps {} twice ({q} and {p})", p.old)));
            }
            if let Some(q) = args.device_map[..i].iter().find(|q| lower(&q.new) == lower(&p.new)) {
                return Err(CliError::Usage(format!("--device-map maps two GPUs onto {} ({q} and {p})", p.new)));
            }
        }
    }
    let source = ConfigSource::resolve(config, std::env::var_os(CONFIG_ENV).as_deref());
    let libcuda = Config::load(&source)?.checkpoint.libcuda;
    let cuda = LibCuda::load(libcuda.as_ref()).map_err(|e| {
        CliError::Failed(format!("{e}; install the NVIDIA driver (r570+), or name its libcuda.so.1 in [checkpoint] libcuda of the Kybernate config"))
    })?;
    let pid = args.pid;
    let timeout = args.timeout.unwrap_or(DEFAULT_LOCK_TIMEOUT_MS);
    if !args.device_map.is_empty() {
        let version = cuda.driver_version().map_err(|e| failed(&cuda, e))?;
        if version < REMAP_MIN_DRIVER {
            return Err(CliError::Failed(format!(
                "--device-map needs driver r580 (CUDA 13.0) or newer: this driver is CUDA {}.{}, whose restore cannot \
                 move a process onto other GPUs",
                version / 1000,
                (version % 1000) / 10
            )));
        }
    }

    if args.get_state {
        let state = cuda.state(pid).map_err(|e| failed(&cuda, e))?;
        print_line(state.as_str())?;
    } else if args.get_restore_tid {
        let tid = cuda.restore_thread_id(pid).map_err(|e| failed(&cuda, e))?;
        print_line(&tid.to_string())?;
    } else if args.toggle {
        toggle(&cuda, pid, timeout, &args.device_map)?;
    } else if let Some(action) = args.action {
        let result = match action {
            Action::Lock => cuda.lock(pid, timeout),
            Action::Checkpoint => cuda.checkpoint(pid),
            Action::Restore => cuda.restore_onto(pid, &args.device_map),
            Action::Unlock => cuda.unlock(pid),
        };
        result.map_err(|e| with_state(&cuda, failed(&cuda, e.clone()), &e))?;
    } else {
        // clap's required "operation" group makes this unreachable.
        return Err(CliError::Usage("name an operation: --get-state, --action, --toggle or --get-restore-tid".into()));
    }
    Ok(ExitCode::SUCCESS)
}

/// Running → lock + checkpoint; checkpointed → restore (onto `pairs`) + unlock, as NVIDIA's
/// `--toggle`. A failure half-way is undone by the state the driver then reports (see
/// [`cuda::rollback`]), so the process is not left locked; one that cannot be brought back is
/// named with the driver's answer.
fn toggle(cuda: &LibCuda, pid: i32, timeout_ms: u32, pairs: &[GpuPair]) -> Result<(), CliError> {
    match cuda.state(pid).map_err(|e| failed(cuda, e))? {
        ProcessState::Running if !pairs.is_empty() => Err(CliError::Failed(format!(
            "process {pid} is running: --device-map applies to the restore of a checkpointed process"
        ))),
        ProcessState::Running => {
            let step = cuda.lock(pid, timeout_ms).and_then(|()| cuda.checkpoint(pid));
            let Err(e) = step else { return Ok(()) };
            let err = failed(cuda, e);
            Err(match cuda::rollback(cuda, pid, pid) {
                Ok(()) => CliError::Failed(format!("{err} (the process was put back and keeps running)")),
                Err(stuck) => CliError::Failed(format!("{err}; {stuck}")),
            })
        }
        ProcessState::Checkpointed => {
            if let Err(e) = cuda.restore_onto(pid, pairs) {
                let err = failed(cuda, e);
                // The restore may have got as far as LOCKED; a process still checkpointed keeps
                // its memory in host RAM and can be restored again.
                return Err(match cuda.state(pid) {
                    Ok(ProcessState::Locked) => match cuda.unlock(pid) {
                        Ok(()) => CliError::Failed(format!("{err} (the driver left it locked; it was unlocked)")),
                        Err(u) => CliError::Failed(format!("{err}; unlocking it failed too: {}", describe(&u))),
                    },
                    Ok(ProcessState::Checkpointed) => CliError::Failed(format!(
                        "{err} (the process is still checkpointed, its GPU memory held in host memory)"
                    )),
                    Ok(state) => CliError::Failed(format!(
                        "{err}; process {pid} cannot be brought back: the driver says it is {state}"
                    )),
                    Err(s) => CliError::Failed(format!("{err}; its state cannot be read: {}", describe(&s))),
                });
            }
            cuda.unlock(pid).map_err(|e| with_state(cuda, failed(cuda, e.clone()), &e))
        }
        state => Err(CliError::Failed(format!(
            "process {pid} is {state}: --toggle works on running or checkpointed processes; use --action (checkpoint or unlock) for a locked one"
        ))),
    }
}

/// `err`, with the state the driver reports for the failed call's process afterwards.
fn with_state(cuda: &LibCuda, err: CliError, e: &CudaError) -> CliError {
    match (err, cuda.state(e.pid)) {
        (CliError::Failed(text), Ok(state)) => {
            CliError::Failed(format!("{text} (the driver now says process {} is {state})", e.pid))
        }
        (err, _) => err,
    }
}

/// `cuCheckpointProcessLock failed for pid 4711: CUDA_ERROR_TIMEOUT (909)`.
fn describe(e: &CudaError) -> String {
    if e.pid > 0 {
        format!("{} failed for pid {}: {} ({})", e.call, e.pid, e.name, e.code)
    } else {
        format!("{} failed: {} ({})", e.call, e.name, e.code)
    }
}

/// A driver error as the CLI reports it: what failed, and what to do next.
fn failed(cuda: &LibCuda, e: CudaError) -> CliError {
    let hint = match e.code {
        1 => "check that the pid is right and that the process uses CUDA",
        3 if e.call == "cuCheckpointProcessRestore" => "enable persistence mode (nvidia-smi -pm 1) and try again",
        3 => "the process has not initialised CUDA (yet)",
        401 => "the process is in the wrong state for this step; see --get-state",
        909 => "the process's GPU work did not finish in time; try a longer --timeout",
        801 => {
            "the driver does not support checkpointing this process's CUDA state; likely causes: CUDA IPC memory, \
             UVM (managed) memory, or MPS (docs/gpu.md, Limits)"
        }
        _ => "see the NVIDIA driver's log (dmesg) for details",
    };
    let init = match (e.call, cuda.init_error()) {
        ("cuCheckpointProcessRestore", Some(init)) => format!(" (after {})", describe(init)),
        _ => String::new(),
    };
    CliError::Failed(format!("{}{init}; {hint}", describe(&e)))
}

fn print_line(text: &str) -> Result<(), CliError> {
    let mut out = std::io::stdout().lock();
    writeln!(out, "{text}").and_then(|()| out.flush()).map_err(CliError::Stdout)
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    use super::*;

    #[test]
    fn standalone_definition_is_consistent() {
        Standalone::command().debug_assert();
    }

    #[test]
    fn parses_nvidia_style_command_lines() {
        let p = |args: &[&str]| Standalone::try_parse_from([TOOL_NAME].iter().chain(args)).map(|c| c.args);
        let a = p(&["--action", "lock", "--pid", "42", "--timeout", "10000"]).unwrap();
        assert_eq!((a.action, a.pid, a.timeout), (Some(Action::Lock), 42, Some(10000)));
        let a = p(&["--get-state", "-p", "7"]).unwrap();
        assert!(a.get_state && a.pid == 7);
        assert!(p(&["--get-state"]).is_err(), "--pid is required");
        assert!(p(&["--pid", "7"]).is_err(), "an operation is required");
        assert!(p(&["--toggle", "--get-state", "--pid", "7"]).is_err(), "one operation only");
        assert!(p(&["--action", "freeze", "--pid", "7"]).is_err());
        assert!(p(&["--get-state", "--pid", "0"]).is_err());
        let g0 = "GPU-00000000-0000-0000-0000-000000000000";
        let g1 = "GPU-11111111-1111-1111-1111-111111111111";
        let a = p(&["--action", "restore", "-p", "7", "-d", &format!("{g0}={g1},{g1}={g0}")]).unwrap();
        assert_eq!(
            a.device_map,
            [GpuPair { old: g0.into(), new: g1.into() }, GpuPair { old: g1.into(), new: g0.into() }]
        );
        assert!(p(&["--toggle", "-p", "7", "--device-map", &format!("{g0}={g1}")]).is_ok());
        assert!(p(&["--toggle", "-p", "7", "--device-map", g0]).is_err(), "not OLD=NEW");
        assert!(p(&["--toggle", "-p", "7", "--device-map", "0=1"]).is_err(), "indices are not UUIDs");
    }
}
