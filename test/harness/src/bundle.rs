//! Plain OCI bundles and a runc with a private state root, for tests below containerd.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use serde_json::{json, Value};

use crate::cleanup;
use crate::{describe_output, file_tail, Error, IoContext, Result, BUSYBOX};

/// An OCI bundle: `rootfs/` with static busybox and its applets, and `config.json`.
#[derive(Debug, Clone)]
pub struct Bundle {
    dir: PathBuf,
}

impl Bundle {
    /// Writes a busybox bundle into `dir` (created if missing) whose process runs `args`,
    /// without a terminal (so it can run detached and be checkpointed), with a writable rootfs
    /// (so tests can watch files the container writes, under [`Bundle::rootfs`]) and the
    /// namespaces `runc spec` gives (pid, network, ipc, uts, mount).
    pub fn busybox(dir: &Path, args: &[&str]) -> Result<Bundle> {
        let rootfs = dir.join("rootfs");
        for sub in ["bin", "dev", "etc", "proc", "root", "sys", "tmp"] {
            std::fs::create_dir_all(rootfs.join(sub)).ctx(|| format!("creating {}/{sub}", rootfs.display()))?;
        }
        set_mode(&rootfs.join("tmp"), 0o1777)?;
        let bin = rootfs.join("bin");
        std::fs::copy(BUSYBOX, bin.join("busybox")).ctx(|| format!("copying {BUSYBOX}"))?;
        let list = Command::new(BUSYBOX).arg("--list").output().ctx(|| format!("running {BUSYBOX} --list"))?;
        if !list.status.success() {
            return Err(Error::NotSetUp(describe_output("busybox --list", &list)));
        }
        for applet in String::from_utf8_lossy(&list.stdout).lines().map(str::trim) {
            if applet.is_empty() || applet == "busybox" || applet.contains('/') {
                continue;
            }
            let link = bin.join(applet);
            if link.symlink_metadata().is_err() {
                std::os::unix::fs::symlink("busybox", &link).ctx(|| format!("linking {}", link.display()))?;
            }
        }
        std::fs::write(rootfs.join("etc/passwd"), "root:x:0:0:root:/root:/bin/sh\n")
            .ctx(|| "writing etc/passwd".into())?;
        std::fs::write(rootfs.join("etc/group"), "root:x:0:\n").ctx(|| "writing etc/group".into())?;
        let bundle = Bundle { dir: dir.to_path_buf() };
        bundle.write_config(&default_config(args))?;
        Ok(bundle)
    }

    /// The bundle directory (what `runc --bundle` takes).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The container's root file system as seen from the host.
    pub fn rootfs(&self) -> PathBuf {
        self.dir.join("rootfs")
    }

    /// Path of `config.json`.
    pub fn config_path(&self) -> PathBuf {
        self.dir.join("config.json")
    }

    /// Reads `config.json`, lets `edit` change it, writes it back (e.g. to add annotations).
    pub fn edit_config(&self, edit: impl FnOnce(&mut Value)) -> Result<()> {
        let path = self.config_path();
        let text = std::fs::read_to_string(&path).ctx(|| format!("reading {}", path.display()))?;
        let mut config: Value = serde_json::from_str(&text)
            .map_err(|e| Error::Io { context: format!("parsing {}", path.display()), source: e.into() })?;
        edit(&mut config);
        self.write_config(&config)
    }

    fn write_config(&self, config: &Value) -> Result<()> {
        let path = self.config_path();
        let text = serde_json::to_string_pretty(config).expect("a JSON value serialises");
        std::fs::write(&path, text).ctx(|| format!("writing {}", path.display()))
    }
}

/// `runc spec` (runc 1.1.5) with a non-terminal process running `args` and a writable rootfs.
fn default_config(args: &[&str]) -> Value {
    let caps = json!(["CAP_AUDIT_WRITE", "CAP_KILL", "CAP_NET_BIND_SERVICE"]);
    json!({
        "ociVersion": "1.0.2-dev",
        "process": {
            "terminal": false,
            "user": { "uid": 0, "gid": 0 },
            "args": args,
            "env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],
            "cwd": "/",
            "capabilities": {
                "bounding": caps, "effective": caps, "permitted": caps, "ambient": caps
            },
            "rlimits": [{ "type": "RLIMIT_NOFILE", "hard": 1024, "soft": 1024 }],
            "noNewPrivileges": true
        },
        "root": { "path": "rootfs", "readonly": false },
        "hostname": "kybernate-test",
        "mounts": [
            { "destination": "/proc", "type": "proc", "source": "proc" },
            { "destination": "/dev", "type": "tmpfs", "source": "tmpfs",
              "options": ["nosuid", "strictatime", "mode=755", "size=65536k"] },
            { "destination": "/dev/pts", "type": "devpts", "source": "devpts",
              "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620", "gid=5"] },
            { "destination": "/dev/shm", "type": "tmpfs", "source": "shm",
              "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"] },
            { "destination": "/dev/mqueue", "type": "mqueue", "source": "mqueue",
              "options": ["nosuid", "noexec", "nodev"] },
            { "destination": "/sys", "type": "sysfs", "source": "sysfs",
              "options": ["nosuid", "noexec", "nodev", "ro"] },
            { "destination": "/sys/fs/cgroup", "type": "cgroup", "source": "cgroup",
              "options": ["nosuid", "noexec", "nodev", "relatime", "ro"] }
        ],
        "linux": {
            "resources": { "devices": [{ "allow": false, "access": "rwm" }] },
            "namespaces": [
                { "type": "pid" }, { "type": "network" }, { "type": "ipc" },
                { "type": "uts" }, { "type": "mount" }
            ],
            "maskedPaths": [
                "/proc/acpi", "/proc/asound", "/proc/kcore", "/proc/keys", "/proc/latency_stats",
                "/proc/timer_list", "/proc/timer_stats", "/proc/sched_debug", "/sys/firmware", "/proc/scsi"
            ],
            "readonlyPaths": ["/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger"]
        }
    })
}

fn set_mode(path: &Path, mode: u32) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).ctx(|| format!("chmod {}", path.display()))
}

/// runc with a private state root (`--root`), so raw-runc tests never see other containers.
/// Dropping it deletes (`--force`) every container left in that root. Use container ids from
/// [`crate::unique_name`]: runc's cgroup paths are global.
#[derive(Debug)]
pub struct Runc {
    root: PathBuf,
    log: PathBuf,
}

impl Runc {
    /// A runc whose state lives in `root` (created); its `--log` goes to `<root>.log`.
    pub fn new(root: impl Into<PathBuf>) -> Result<Runc> {
        let root = root.into();
        std::fs::create_dir_all(&root).ctx(|| format!("creating {}", root.display()))?;
        let mut log = root.clone().into_os_string();
        log.push(".log");
        Ok(Runc { root, log: log.into() })
    }

    /// The state root.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// `runc --root ROOT --log LOG` with stdin on /dev/null; add the subcommand and arguments.
    pub fn command(&self) -> Command {
        let mut cmd = Command::new("runc");
        cmd.arg("--root").arg(&self.root).arg("--log").arg(&self.log).stdin(Stdio::null());
        cmd
    }

    /// Runs `runc ARGS` with captured output and returns stdout; panics with runc's output, its log
    /// and the CRIU logs (dump.log, restore.log in `--image-path`/`--work-path`) on failure.
    /// Not for `run -d` / `restore -d`: the container would inherit the capture pipes.
    pub fn ok(&self, args: &[&str]) -> String {
        let out = self.command().args(args).output().unwrap_or_else(|e| panic!("cannot run runc {args:?}: {e}"));
        if !out.status.success() {
            self.fail(args, &out);
        }
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Runs `runc ARGS` with stdin, stdout and stderr on /dev/null, for commands that leave a
    /// detached container behind (`run -d`, `restore -d`): the container inherits runc's stdio.
    /// Panics with runc's log and CRIU logs on failure.
    pub fn detached(&self, args: &[&str]) {
        let status = self
            .command()
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .unwrap_or_else(|e| panic!("cannot run runc {args:?}: {e}"));
        if !status.success() {
            let out = Output { status, stdout: vec![], stderr: b"(on /dev/null; see runc log)".to_vec() };
            self.fail(args, &out);
        }
    }

    /// The container's status from `runc state` ("running", "stopped", ...), or None if runc
    /// does not know it.
    pub fn status(&self, id: &str) -> Option<String> {
        let out = self.command().args(["state", id]).output().ok()?;
        if !out.status.success() {
            return None;
        }
        let state: Value = serde_json::from_slice(&out.stdout).ok()?;
        state.get("status")?.as_str().map(String::from)
    }

    fn fail(&self, args: &[&str], out: &Output) -> ! {
        let mut msg = describe_output(&format!("runc {}", args.join(" ")), out);
        msg.push_str(&format!("\n--- runc log ---\n{}", file_tail(&self.log, 20)));
        for pair in args.windows(2) {
            if pair[0] == "--image-path" || pair[0] == "--work-path" {
                for name in ["dump.log", "restore.log"] {
                    let log = Path::new(pair[1]).join(name);
                    if log.exists() {
                        msg.push_str(&format!("\n--- {} (last 40 lines) ---\n{}", log.display(), file_tail(&log, 40)));
                    }
                }
            }
        }
        panic!("{msg}");
    }
}

impl Drop for Runc {
    fn drop(&mut self) {
        cleanup::runc_delete_all(&self.root);
    }
}
