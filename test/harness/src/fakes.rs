//! Fakes of node software for tests that need no real hardware.
//!
//! [`FakeCuda`] builds `test/fakes/libcuda.c` into a directory of the test's own: a
//! `libcuda.so.1` with the CUDA driver's process checkpoint API and the driver's state machine,
//! keeping its call log, per-process state and failure injection in files next to itself (see the
//! C source for the formats). Each test gets an isolated fake without environment variables, and
//! the state survives across processes (the one that checkpoints, the one that restores).
//!
//! Like the real driver, the fake knows only CUDA processes: a process is one when its
//! environment holds [`CUDA_MARK`] (see [`Sleeper::start_cuda`] and [`cuda_worker_sh`]); for any
//! other process every checkpoint call answers CUDA_ERROR_NOT_INITIALIZED.

use std::fs::{self, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;

/// The environment entry that makes a process a CUDA process for the fake driver.
pub const CUDA_MARK: &str = "FAKE_CUDA_CONTEXT=1";
/// With [`CUDA_MARK`]: the process holds CUDA IPC memory, whose checkpoint the driver does not
/// support (it locks, then its checkpoint answers CUDA_ERROR_NOT_SUPPORTED and leaves it locked).
pub const CUDA_IPC_MARK: &str = "FAKE_CUDA_IPC=1";

/// A shell fragment (for a container's `sh -c`) that starts a CUDA process in the background as
/// the fake driver knows one: `sleep SECONDS` marked with [`CUDA_MARK`] (plus `env`, e.g.
/// `FAKE_CUDA_GPUS=0,1` or `FAKE_CUDA_BYTES=1048576`), holding `/dev/nvidiactl` open.
pub fn cuda_worker_sh(seconds: u32, env: &[&str]) -> String {
    let mut words = vec![CUDA_MARK.to_string()];
    words.extend(env.iter().map(|e| e.to_string()));
    format!("env {} sleep {seconds} </dev/nvidiactl &", words.join(" "))
}

/// The fake's C source, relative to this crate.
const SOURCE: &str = "../fakes/libcuda.c";

/// A fake `libcuda.so.1` built into `dir`.
#[derive(Debug, Clone)]
pub struct FakeCuda {
    /// Where the library and its files (`calls.log`, `state`, `fail`, `driver_version`) live.
    pub dir: PathBuf,
    /// `dir/libcuda.so.1`: what to load (an absolute path when `dir` is).
    pub lib: PathBuf,
}

/// One line of `calls.log`: `<function> <pid> <code> [extra]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FakeCall {
    pub function: String,
    /// The pid the call was made for; 0 for calls without one (cuInit, cuDriverGetVersion).
    pub pid: i32,
    /// The `CUresult` the fake returned.
    pub code: i32,
    /// What else the fake recorded, e.g. `timeout=10000` for a lock.
    pub extra: Option<String>,
}

impl FakeCuda {
    /// Compiles test/fakes/libcuda.c into `dir/libcuda.so.1` (panics with cc's stderr on failure).
    /// Without `with_checkpoint_api` the cuCheckpoint* symbols are left out, like a driver older
    /// than r570.
    pub fn build(dir: &Path, with_checkpoint_api: bool) -> FakeCuda {
        let source = Path::new(env!("CARGO_MANIFEST_DIR")).join(SOURCE);
        fs::create_dir_all(dir).unwrap_or_else(|e| panic!("creating {}: {e}", dir.display()));
        let lib = dir.join("libcuda.so.1");
        let mut cc = Command::new("cc");
        cc.args(["-shared", "-fPIC", "-O1", "-Wall"]);
        if !with_checkpoint_api {
            cc.arg("-DNO_CHECKPOINT_API");
        }
        cc.arg("-o").arg(&lib).arg(&source);
        let out = cc
            .output()
            .unwrap_or_else(|e| panic!("running cc for {}: {e} (is a C compiler installed?)", source.display()));
        if !out.status.success() {
            panic!("{}", crate::describe_output(&format!("cc {}", source.display()), &out));
        }
        FakeCuda { dir: dir.to_path_buf(), lib }
    }

    /// The calls so far, in order (empty if nothing was called yet).
    pub fn calls(&self) -> Vec<FakeCall> {
        let text = fs::read_to_string(self.dir.join("calls.log")).unwrap_or_default();
        text.lines().filter_map(parse_call).collect()
    }

    /// Makes `step` fail with `code` for `pid` (any pid when None) from the next call on; the
    /// process's state does not change.
    /// Steps: init, driver_version, lock, checkpoint, restore, remap (a restore with GPU pairs),
    /// unlock, get_state, restore_tid.
    pub fn fail(&self, step: &str, pid: Option<i32>, code: i32) {
        let pid = pid.map_or_else(|| "*".to_string(), |p| p.to_string());
        self.append("fail", &format!("{step} {pid} {code}"));
    }

    /// Like [`fail`](Self::fail), and the failed call leaves the process in `then`: `running`,
    /// `locked`, `checkpointed`, `failed` (every later step refused) or `stuck` (reported
    /// checkpointed; every later restore fails with CUDA_ERROR_OPERATING_SYSTEM, as after an
    /// out-of-memory restore: NVIDIA/cuda-checkpoint#44).
    pub fn fail_then(&self, step: &str, pid: Option<i32>, code: i32, then: &str) {
        let pid = pid.map_or_else(|| "*".to_string(), |p| p.to_string());
        self.append("fail", &format!("{step} {pid} {code} {then}"));
    }

    /// Makes `step` (lock: the process is busy for that long; checkpoint; restore) take `ms`
    /// for `pid` (any pid when None).
    pub fn delay(&self, step: &str, pid: Option<i32>, ms: u64) {
        let pid = pid.map_or_else(|| "*".to_string(), |p| p.to_string());
        self.append("delay", &format!("{step} {pid} {ms}"));
    }

    /// The node's GPUs as the fake driver knows them (index = position): (UUID, model).
    pub fn set_gpus(&self, gpus: &[(&str, &str)]) {
        let text: String = gpus.iter().enumerate().map(|(i, (uuid, model))| format!("{i} {uuid} {model}\n")).collect();
        let path = self.dir.join("gpus");
        fs::write(&path, text).unwrap_or_else(|e| panic!("writing {}: {e}", path.display()));
    }

    fn append(&self, file: &str, line: &str) {
        let path = self.dir.join(file);
        let mut f = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .unwrap_or_else(|e| panic!("opening {}: {e}", path.display()));
        writeln!(f, "{line}").unwrap_or_else(|e| panic!("writing {}: {e}", path.display()));
    }

    /// Removes every injected failure (and delay).
    pub fn clear_failures(&self) {
        for file in ["fail", "delay"] {
            match fs::remove_file(self.dir.join(file)) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => panic!("removing {}: {e}", self.dir.join(file).display()),
            }
        }
    }

    /// The recorded state (`running`, `locked`, `checkpointed`, `failed`) of the process whose
    /// innermost (in-namespace) pid is `key_pid` (the last one recorded, when a restored copy
    /// shares the key); None when never recorded (the fake says running).
    pub fn state_of(&self, key_pid: i32) -> Option<String> {
        self.states().into_iter().rev().find(|(k, _, _)| *k == key_pid).map(|(_, _, st)| st)
    }

    /// The recorded state of the live process `pid` (host pid): its key and start time
    /// identify it among processes sharing a namespace pid. None when never recorded.
    pub fn state_of_pid(&self, pid: i32) -> Option<String> {
        self.record_of_pid(pid).map(|r| r.state)
    }

    /// The GPUs (UUIDs) the fake holds the live process `pid`'s CUDA state on; None when never
    /// recorded.
    pub fn gpus_of_pid(&self, pid: i32) -> Option<Vec<String>> {
        self.record_of_pid(pid).map(|r| r.gpus)
    }

    /// The bytes the last checkpoint of the live process `pid` moved into its host memory
    /// (`FAKE_CUDA_BYTES` per GPU). The real driver grows the process's RSS by them; the fake
    /// cannot grow another process's memory, so it records them here.
    pub fn moved_bytes(&self, pid: i32) -> Option<u64> {
        self.record_of_pid(pid).map(|r| r.moved)
    }

    fn record_of_pid(&self, pid: i32) -> Option<Record> {
        let status = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
        let last = |prefix: &str| {
            status.lines().find(|l| l.starts_with(prefix))?.split_whitespace().last()?.parse::<i32>().ok()
        };
        let key = last("NStgid:").or_else(|| last("NSpid:")).unwrap_or(pid);
        let tgid = last("Tgid:").unwrap_or(pid);
        let stat = fs::read_to_string(format!("/proc/{tgid}/stat")).ok()?;
        // starttime is field 22; the fields after ")" start at field 3.
        let start: u64 = stat.rsplit_once(')')?.1.split_whitespace().nth(19)?.parse().ok()?;
        self.records().into_iter().find(|r| r.key == key && r.start == start)
    }

    /// (key, start time, state) per line of the state file.
    fn states(&self) -> Vec<(i32, u64, String)> {
        self.records().into_iter().map(|r| (r.key, r.start, r.state)).collect()
    }

    fn records(&self) -> Vec<Record> {
        let text = fs::read_to_string(self.dir.join("state")).unwrap_or_default();
        text.lines()
            .filter_map(|line| {
                let mut f = line.split_whitespace();
                let (key, start, state) = (f.next()?.parse().ok()?, f.next()?.parse().ok()?, f.next()?.to_string());
                let _dumped = f.next();
                let gpus = match f.next() {
                    None | Some("-") => vec![],
                    Some(g) => g.split(',').map(str::to_string).collect(),
                };
                let moved = f.next().and_then(|m| m.parse().ok()).unwrap_or(0);
                Some(Record { key, start, state, gpus, moved })
            })
            .collect()
    }

    /// What cuDriverGetVersion returns from now on (default 12080).
    pub fn set_driver_version(&self, v: i32) {
        let path = self.dir.join("driver_version");
        fs::write(&path, format!("{v}\n")).unwrap_or_else(|e| panic!("writing {}: {e}", path.display()));
    }
}

/// One line of the fake's `state` file.
struct Record {
    key: i32,
    start: u64,
    state: String,
    gpus: Vec<String>,
    moved: u64,
}

fn parse_call(line: &str) -> Option<FakeCall> {
    let mut parts = line.splitn(4, ' ');
    let function = parts.next()?.to_string();
    let pid = parts.next()?.parse().ok()?;
    let code = parts.next()?.parse().ok()?;
    let extra = parts.next().map(str::to_string).filter(|s| !s.is_empty());
    Some(FakeCall { function, pid, code, extra })
}

/// Makes `path` a char device 195:0, the major of NVIDIA's devices: a container given it
/// (`ctr run --device PATH`) shows runtime-select its GPU evidence, with no GPU behind it.
pub fn nvidia_device_node(path: &Path) -> PathBuf {
    nvidia_gpu_node(path, 0)
}

/// Makes `path` the char device 195:`minor`, the node of NVIDIA GPU `minor` (`/dev/nvidia<minor>`).
pub fn nvidia_gpu_node(path: &Path, minor: u32) -> PathBuf {
    fs::create_dir_all(path.parent().expect("a device path with a parent")).expect("the device's dir");
    let c_path = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).expect("no NUL in the path");
    // SAFETY: a valid NUL-terminated path; mknod has no other preconditions.
    let rc = unsafe { libc::mknod(c_path.as_ptr(), libc::S_IFCHR | 0o666, libc::makedev(195, minor)) };
    assert_eq!(rc, 0, "mknod a char 195:{minor} node at {}: {}", path.display(), std::io::Error::last_os_error());
    path.to_path_buf()
}

/// One GPU of a [`FakeNvidiaProc`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FakeGpu {
    /// As the driver names the board, e.g. `NVIDIA H100 80GB HBM3`.
    pub model: String,
    /// `GPU-xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx`, as nvidia-smi and the checkpoint API print it.
    pub uuid: String,
    /// PCI location `dddd:bb:ss.f`, also the name of its directory under `gpus/`.
    pub bus_id: String,
    /// Its device node's minor (`/dev/nvidia<minor>`).
    pub minor: u32,
}

/// A fake `/proc/driver` tree as NVIDIA's kernel module presents it: `nvidia/version` and one
/// `nvidia/gpus/<bus id>/information` per GPU, in the driver's own layout (nv-procfs.c: `Key:`,
/// tabs, value). Bind it over `/proc/driver` for a test bed ([`crate::Builder::bind_over`]): the
/// shim, the restore verdict and the CLI read the node's driver and GPUs there. The files can be
/// rewritten while the bed runs (a driver upgrade, another board in a slot).
#[derive(Debug, Clone)]
pub struct FakeNvidiaProc {
    /// The directory to bind over `/proc/driver`.
    pub dir: PathBuf,
}

impl FakeNvidiaProc {
    /// An empty driver tree (`<dir>/nvidia/gpus`, no version yet) in `dir`.
    pub fn create(dir: &Path) -> Self {
        let gpus = dir.join("nvidia/gpus");
        fs::create_dir_all(&gpus).unwrap_or_else(|e| panic!("creating {}: {e}", gpus.display()));
        Self { dir: dir.to_path_buf() }
    }

    /// `nvidia/version` of the open kernel module of `version` (e.g. `580.65.06`).
    pub fn set_version(&self, version: &str) {
        let text = format!(
            "NVRM version: NVIDIA UNIX Open Kernel Module for x86_64  {version}  Release Build  \
             (dvs-builder@U16-I3-B03-4-3)  Sun Jul 27 06:54:38 UTC 2025\n\
             GCC version:  gcc version 12.3.0 (Ubuntu 12.3.0-1ubuntu1~22.04)\n"
        );
        let path = self.dir.join("nvidia/version");
        fs::write(&path, text).unwrap_or_else(|e| panic!("writing {}: {e}", path.display()));
    }

    /// Replaces the GPU list: one `gpus/<bus id>/information` per GPU (firmware of `firmware`).
    pub fn set_gpus(&self, gpus: &[FakeGpu], firmware: &str) {
        let dir = self.dir.join("nvidia/gpus");
        for old in fs::read_dir(&dir).unwrap_or_else(|e| panic!("listing {}: {e}", dir.display())).flatten() {
            fs::remove_dir_all(old.path()).unwrap_or_else(|e| panic!("removing {}: {e}", old.path().display()));
        }
        for (i, gpu) in gpus.iter().enumerate() {
            let info = format!(
                "Model: \t\t {model}\nIRQ:   \t\t {irq}\nGPU UUID: \t {uuid}\nVideo BIOS: \t 96.00.99.00.01\n\
                 Bus Type: \t PCIe\nDMA Size: \t 52 bits\nDMA Mask: \t 0xfffffffffffff\nBus Location: \t {bus}\n\
                 Device Minor: \t {minor}\nGPU Firmware: \t {firmware}\nGPU Excluded:\t No\n",
                model = gpu.model,
                irq = 160 + i,
                uuid = gpu.uuid,
                bus = gpu.bus_id,
                minor = gpu.minor,
            );
            let d = dir.join(&gpu.bus_id);
            fs::create_dir_all(&d).unwrap_or_else(|e| panic!("creating {}: {e}", d.display()));
            fs::write(d.join("information"), info).unwrap_or_else(|e| panic!("writing {}: {e}", d.display()));
        }
    }
}

/// A real process to point the fake driver at (`sleep 30`); killed and reaped on drop.
pub struct Sleeper(pub std::process::Child);

impl Sleeper {
    /// A process without CUDA (the fake driver answers CUDA_ERROR_NOT_INITIALIZED for it).
    pub fn start() -> Self {
        Self(
            std::process::Command::new("sleep")
                .arg("30")
                .env_remove("FAKE_CUDA_CONTEXT")
                .spawn()
                .expect("starting sleep"),
        )
    }

    /// A CUDA process as the fake driver knows one ([`CUDA_MARK`]), with `env` added (e.g.
    /// `FAKE_CUDA_GPUS=0,1`, `FAKE_CUDA_BYTES=4096`).
    pub fn start_cuda(env: &[&str]) -> Self {
        let mut cmd = std::process::Command::new("sleep");
        cmd.arg("30").env("FAKE_CUDA_CONTEXT", "1");
        for e in env {
            let (k, v) = e.split_once('=').expect("KEY=VALUE");
            cmd.env(k, v);
        }
        let me = Self(cmd.spawn().expect("starting sleep"));
        // Until it has exec'd, the child's environment is still ours (unmarked).
        let environ = format!("/proc/{}/environ", me.pid());
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while !fs::read(&environ).is_ok_and(|e| e.split(|&b| b == 0).any(|v| v == CUDA_MARK.as_bytes())) {
            assert!(std::time::Instant::now() < deadline, "pid {} never exec'd with {CUDA_MARK}", me.pid());
            std::thread::sleep(std::time::Duration::from_millis(2));
        }
        me
    }

    pub fn pid(&self) -> i32 {
        i32::try_from(self.0.id()).expect("pid fits i32")
    }
}

impl Drop for Sleeper {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_call_lines() {
        assert_eq!(
            parse_call("cuCheckpointProcessLock 4711 0 timeout=10000"),
            Some(FakeCall {
                function: "cuCheckpointProcessLock".into(),
                pid: 4711,
                code: 0,
                extra: Some("timeout=10000".into())
            })
        );
        assert_eq!(
            parse_call("cuInit 0 999"),
            Some(FakeCall { function: "cuInit".into(), pid: 0, code: 999, extra: None })
        );
        assert_eq!(parse_call("garbage"), None);
    }
}
