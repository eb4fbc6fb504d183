//! A systemd node: this machine's own root booted with systemd as PID 1 in a container
//! (`test/lib/kbt-node`, systemd-nspawn), running Debian's containerd as the `containerd.service`
//! unit. For what a private [`crate::Testbed`] cannot show: `systemctl restart containerd`, the
//! installer's `nsenter -t 1 ... systemctl restart containerd`, `journalctl -u containerd`.
//!
//! Nothing a test does on the node reaches the host: the node's root is an overlay whose upper
//! layer is a tmpfs, and it goes when the [`Node`] is dropped.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use crate::{cleanup, sigterm_and_wait, unique_name, wait_for_within, Error, IoContext, Result, RUN_BASE};

/// The wrapper that boots a node (`kbt-node DIR`), in this repository.
pub fn kbt_node() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../lib/kbt-node")
}

/// kbt-node's cgroups are `<hierarchy>/kbt-node-<the node dir's name>` (the name as kbt-node
/// shortens it: test nodes' names are short and plain, so it is the dir's name).
pub(crate) const CGROUP_PREFIX: &str = "kbt-node-";

/// Shuts down the node a dead test process left in `dir`, if one runs: SIGTERM to its kbt-node,
/// which halts the node and removes its cgroups as [`Node`]'s drop does; whatever still runs in
/// the node's cgroups afterwards (or if kbt-node itself was killed) is SIGKILLed.
pub(crate) fn shut_down_abandoned(dir: &Path) {
    let Some(name) = dir.file_name().and_then(|n| n.to_str()) else { return };
    let dir_arg = dir.to_string_lossy();
    let wrappers = cleanup::pids_matching(|args| {
        args.len() == 3 && Path::new(&args[1]).file_name() == Some("kbt-node".as_ref()) && args[2] == dir_arg
    });
    for &pid in &wrappers {
        // SAFETY: plain syscall on a pid whose argv names this dir.
        unsafe { libc::kill(pid, libc::SIGTERM) };
    }
    let deadline = Instant::now() + BOOT_TIMEOUT;
    while wrappers.iter().any(|p| cleanup::alive(*p)) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    for hierarchy in ["/sys/fs/cgroup/systemd", "/sys/fs/cgroup/unified"] {
        let cgroup = Path::new(hierarchy).join(format!("{CGROUP_PREFIX}{name}"));
        if cgroup.is_dir() {
            cleanup::kill_cgroup(&cgroup);
        }
    }
}

/// How long a boot or a shutdown may take (boots take ~2 s; a shutdown waits for the node's units).
const BOOT_TIMEOUT: Duration = Duration::from_secs(120);

/// A booted node; shut down (and its dir removed) on drop.
pub struct Node {
    dir: PathBuf,
    child: Child,
    leader: u32,
}

impl Node {
    /// Boots a node in a fresh dir under [`RUN_BASE`] and waits until systemd has finished
    /// starting it (containerd.service included).
    pub fn boot() -> Result<Node> {
        cleanup::sweep_stale_once();
        let dir = PathBuf::from(RUN_BASE).join(unique_name("node"));
        std::fs::create_dir_all(&dir).ctx(|| format!("creating {}", dir.display()))?;
        let log = std::fs::File::create(dir.with_extension("log")).ctx(|| format!("creating {}.log", dir.display()))?;
        let child = Command::new(kbt_node())
            .arg(&dir)
            .stdin(Stdio::null())
            .stdout(log.try_clone().ctx(|| "cloning the log's handle".to_string())?)
            .stderr(log)
            .spawn()
            .ctx(|| format!("running {}", kbt_node().display()))?;
        let mut node = Node { dir, child, leader: 0 };
        let leader_file = node.dir.join("leader");
        let deadline = Instant::now() + BOOT_TIMEOUT;
        loop {
            if let Some(pid) = std::fs::read_to_string(&leader_file).ok().and_then(|s| s.trim().parse().ok()) {
                node.leader = pid;
                return Ok(node);
            }
            if let Ok(Some(status)) = node.child.try_wait() {
                return Err(Error::NotSetUp(format!("kbt-node exited ({status}) before booting:\n{}", node.log())));
            }
            if Instant::now() > deadline {
                return Err(Error::NotSetUp(format!("the node did not boot in {BOOT_TIMEOUT:?}:\n{}", node.log())));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// `args` run on the node: in all its namespaces and its root, as a login there would.
    pub fn command<S: AsRef<std::ffi::OsStr>>(&self, args: &[S]) -> Command {
        let mut cmd = Command::new("nsenter");
        cmd.args(["-t", &self.leader.to_string(), "-a", "--"]).args(args).stdin(Stdio::null());
        cmd
    }

    pub fn run<S: AsRef<std::ffi::OsStr>>(&self, args: &[S]) -> Output {
        let mut cmd = self.command(args);
        cmd.output().unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"))
    }

    /// Runs `args` on the node; panics with their output (and the node's containerd journal) unless they succeed.
    pub fn run_ok<S: AsRef<std::ffi::OsStr>>(&self, args: &[S]) -> String {
        let out = self.run(args);
        if !out.status.success() {
            let argv: Vec<String> = args.iter().map(|a| a.as_ref().to_string_lossy().into_owned()).collect();
            panic!(
                "on the node: {argv:?} failed ({})\nstdout: {}\nstderr: {}\n--- journalctl -u containerd (tail) ---\n{}",
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr),
                self.journal_tail("containerd", 40)
            );
        }
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// A path on the node, as the host reaches it (through its PID 1's root).
    pub fn path(&self, path: &str) -> PathBuf {
        PathBuf::from(format!("/proc/{}/root", self.leader)).join(path.trim_start_matches('/'))
    }

    /// `systemctl show -p MainPID --value UNIT`, on the node; 0 when the unit is not running.
    pub fn main_pid(&self, unit: &str) -> u32 {
        let out = self.run_ok(&["systemctl", "show", "-p", "MainPID", "--value", unit]);
        out.trim().parse().unwrap_or_else(|_| panic!("MainPID of {unit}: {out:?}"))
    }

    /// Waits until UNIT is active (`systemctl is-active`) with a main PID other than `not`.
    pub fn wait_for_restart(&self, unit: &str, not: u32) -> u32 {
        wait_for_within(BOOT_TIMEOUT, &format!("{unit} to run again with a new main PID"), || {
            let active = self.run(&["systemctl", "is-active", "--quiet", unit]).status.success();
            let pid = self.main_pid(unit);
            (active && pid != 0 && pid != not).then_some(pid)
        })
    }

    /// The last `lines` of UNIT's journal on the node.
    pub fn journal_tail(&self, unit: &str, lines: u32) -> String {
        let out = self.run(&["journalctl", "-u", unit, "--no-pager", "-o", "cat", "-n", &lines.to_string()]);
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// What kbt-node and nspawn printed (the node's console).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.with_extension("log")).unwrap_or_default()
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        // SIGTERM makes kbt-node shut the node down.
        if !sigterm_and_wait(&mut self.child, BOOT_TIMEOUT) {
            eprintln!("kbt-node {} did not shut down in {BOOT_TIMEOUT:?}; killing it", self.dir.display());
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        // The overlay and the tmpfs went with kbt-node's mount namespace; the node's containerd
        // root (image content, snapshots) is left on disk.
        if let Err(e) = std::fs::remove_dir_all(&self.dir) {
            eprintln!("removing {}: {e}", self.dir.display());
        }
        let _ = std::fs::remove_file(self.dir.with_extension("log"));
    }
}
