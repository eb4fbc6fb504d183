//! A private containerd per test.

use std::ffi::{OsStr, OsString};
use std::fs::OpenOptions;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use crate::cgroup::{self, CgroupMode, V2Setup};
use crate::cleanup;
use crate::cri::{self, CriRuntime, CRI_NAMESPACE, PAUSE_IMAGE};
use crate::mountns::{self, BindOver, PrivateMounts};
use crate::{
    check_preconditions, describe_output, find_in_path, sigterm_and_wait, unique_name, Containerd, Error, IoContext,
    Result,
};
use crate::{IMAGE, IMAGE_ARCHIVE, RUN_BASE, SYSTEM_PATH};

/// How long containerd may take to answer after start (generous: CI machines have 2 cores).
const START_TIMEOUT: Duration = Duration::from_secs(30);
/// How long containerd may take to exit after SIGTERM before it gets SIGKILL.
const STOP_TIMEOUT: Duration = Duration::from_secs(15);
/// Bound on each ctr call made during cleanup, so a hung shim cannot hang the test run.
const CLEANUP_CTR_TIMEOUT: &str = "20s";

/// Configures a [`Testbed`] before it starts.
#[derive(Debug, Default, Clone)]
pub struct Builder {
    path_prepend: Vec<PathBuf>,
    extra_config: String,
    cri: bool,
    cri_runtimes: Vec<CriRuntime>,
    env: Vec<(OsString, OsString)>,
    release: Containerd,
    log_level: Option<String>,
    cgroup: Option<CgroupMode>,
    binds: Vec<BindOver>,
}

impl Builder {
    /// Runs this containerd release (default: the system's 1.6). Its `containerd`, `ctr` and
    /// `containerd-shim-runc-v2` come first on containerd's PATH; the config stays version 2,
    /// which containerd 2.x migrates in memory as it does on upgraded nodes.
    pub fn containerd(mut self, release: Containerd) -> Self {
        self.release = release;
        self
    }

    /// Puts `dir` ahead of [`SYSTEM_PATH`] in containerd's PATH: containerd resolves runtime
    /// `io.containerd.<name>.<v>` to the binary `containerd-shim-<name>-<v>` on its PATH (our shim
    /// lives in `target/debug`), and shims inherit the PATH to find runc and CRIU.
    pub fn path_prepend(mut self, dir: impl Into<PathBuf>) -> Self {
        self.path_prepend.push(dir.into());
        self
    }

    /// TOML appended to the generated config.toml. Write only tables (`[plugins."…"]`): bare keys
    /// would land in the table before them. With [`Builder::cri`], the tables
    /// `[plugins."io.containerd.grpc.v1.cri"]`, its `.cni`, `.containerd`, `.containerd.runtimes.runc`
    /// and those of [`Builder::cri_runtime`] handlers already exist; add other sub-tables instead.
    pub fn extra_config(mut self, toml: impl AsRef<str>) -> Self {
        self.extra_config.push_str(toml.as_ref());
        self.extra_config.push('\n');
        self
    }

    /// Enables containerd's CRI plugin (off by default: plain containers do not need it), set up
    /// for host-network pods without CNI: `restrict_oom_score_adj = true` (these VMs need it), the
    /// stock `runc` runtime (the plugin does not load without its default runtime),
    /// `sandbox_image` = [`PAUSE_IMAGE`], a stream server on a free loopback port, private CNI
    /// dirs. At start [`PAUSE_IMAGE`] and [`IMAGE`] are imported into [`CRI_NAMESPACE`]. The
    /// CRI socket is [`Testbed::address`].
    ///
    /// CRI works in the namespace `k8s.io`, so runc state of CRI containers lands in
    /// `/run/containerd/runc/k8s.io` and their cgroups (without a pod `cgroup_parent`) under
    /// `k8s.io/`, shared with other test beds and a node's containerd: cleanup removes only the
    /// containers whose bundles this test bed made. Give pods
    /// [`Testbed::cri_cgroup_parent`] so that their cgroups are swept by name too.
    pub fn cri(mut self, enabled: bool) -> Self {
        self.cri = enabled;
        self
    }

    /// Adds a CRI runtime handler running Kybernate's shim (enables CRI, see [`Builder::cri`]).
    pub fn cri_runtime(mut self, runtime: CriRuntime) -> Self {
        self.cri = true;
        self.cri_runtimes.push(runtime);
        self
    }

    /// containerd's `[debug] level` (default `info`); `debug` shows, e.g., CRI's runtime introspection.
    pub fn log_level(mut self, level: &str) -> Self {
        self.log_level = Some(level.to_string());
        self
    }

    /// The cgroup hierarchy containerd, the shims, runc and CRIU run on (default: the suite's,
    /// [`cgroup::CGROUP_ENV`], else the host's). See [`CgroupMode`].
    pub fn cgroup(mut self, mode: CgroupMode) -> Self {
        self.cgroup = Some(mode);
        self
    }

    /// Runs containerd (and so every shim, runc and CRIU it starts) in a private mount namespace
    /// where `source` is bind-mounted over `target`, e.g. a fake NVIDIA driver tree
    /// ([`crate::fakes::FakeNvidiaProc`]) over `/proc/driver`: the product reads such node files at
    /// fixed paths and has no test-only setting for them. Only `target` changes there; the
    /// mount holding it is made private first, so nothing propagates to the host, and the test
    /// bed's directory stays shared (as on a cgroup v2 bed). Both must exist and be of the same
    /// kind; what `source` holds may change while the bed runs (a bind shows the live tree).
    /// With a [v2 bed](CgroupMode::V2) it is the same namespace.
    pub fn bind_over(mut self, target: impl Into<PathBuf>, source: impl Into<PathBuf>) -> Self {
        self.binds.push(BindOver { target: target.into(), source: source.into() });
        self
    }

    /// Sets an environment variable for containerd, and so for the shims it starts.
    pub fn env(mut self, key: impl AsRef<OsStr>, value: impl AsRef<OsStr>) -> Self {
        self.env.push((key.as_ref().to_owned(), value.as_ref().to_owned()));
        self
    }

    /// Checks preconditions, writes the config and starts containerd; returns once it answers.
    pub fn start(self) -> Result<Testbed> {
        let mut dirs: Vec<PathBuf> = self.release.bin_dir().into_iter().collect();
        if let Some(dir) = dirs.first() {
            if !dir.join("containerd").exists() {
                return Err(Error::NotSetUp(format!(
                    "containerd {} is not in {} (test/setup.sh installs it)",
                    self.release.name(),
                    dir.display()
                )));
            }
        }
        dirs.extend(self.path_prepend.iter().cloned());
        dirs.extend(std::env::split_paths(SYSTEM_PATH));
        let path = std::env::join_paths(dirs).map_err(|e| Error::NotSetUp(format!("invalid path_prepend: {e}")))?;
        check_preconditions(&path)?;
        let v2 = match self.cgroup.map_or_else(CgroupMode::from_env, Ok)? {
            CgroupMode::Host => None,
            CgroupMode::V2 => Some(cgroup::v2_setup()?),
        };
        for bind in &self.binds {
            bind.check()?;
        }
        cleanup::sweep_stale_once();

        let namespace = unique_name("");
        let dir = Path::new(RUN_BASE).join(&namespace);
        if dir.exists() {
            // Left by an earlier process with our pid; nothing of ours can be in it yet.
            cleanup::scrub(&namespace, &dir);
        }
        std::fs::create_dir_all(&dir).ctx(|| format!("creating {}", dir.display()))?;
        let containerd = find_in_path("containerd", &path).expect("checked by check_preconditions");
        let ctr = find_in_path("ctr", &path).expect("checked by check_preconditions");
        let mut tb = Testbed {
            config: dir.join("config.toml"),
            log: dir.join("containerd.log"),
            address: dir.join("containerd.sock"),
            namespace,
            dir,
            path,
            env: self.env,
            containerd_bin: containerd,
            ctr_bin: ctr,
            child: None,
            cri: self.cri,
            release: self.release,
            v2,
            binds: self.binds,
        };
        if tb.private_namespace() {
            mountns::share(&tb.dir)?;
        }
        let cri_runtimes = self.cri.then_some(self.cri_runtimes.as_slice());
        let config = tb.config_toml(cri_runtimes, &self.extra_config, self.log_level.as_deref().unwrap_or("info"));
        if self.cri {
            for sub in ["cni/bin", "cni/net.d"] {
                let d = tb.dir.join(sub);
                std::fs::create_dir_all(&d).ctx(|| format!("creating {}", d.display()))?;
            }
        }
        std::fs::write(&tb.config, config).ctx(|| format!("writing {}", tb.config.display()))?;
        // On error `tb` drops here and cleans up what was made.
        tb.start_containerd()?;
        if self.cri {
            tb.import_cri_images()?;
        }
        Ok(tb)
    }
}

/// A private containerd with its own root, state, sockets and namespace; torn down on drop.
///
/// Shims still put sockets under `/run/containerd/s/` and runc keeps state under
/// `/run/containerd/runc/<namespace>`, whatever containerd's dirs are: the per-test-bed
/// namespace ([`unique_name`]) is what keeps parallel tests apart.
///
/// containerd gets SIGTERM when the test process dies (PR_SET_PDEATHSIG), and a later test bed
/// sweeps up shims and containers that were left running.
#[derive(Debug)]
pub struct Testbed {
    namespace: String,
    dir: PathBuf,
    config: PathBuf,
    log: PathBuf,
    address: PathBuf,
    path: OsString,
    env: Vec<(OsString, OsString)>,
    containerd_bin: PathBuf,
    ctr_bin: PathBuf,
    child: Option<Child>,
    cri: bool,
    release: Containerd,
    /// Set for a cgroup v2 test bed: how it gets its hierarchy.
    v2: Option<V2Setup>,
    /// Bind mounts of containerd's private mount namespace ([`Builder::bind_over`]).
    binds: Vec<BindOver>,
}

impl Testbed {
    /// A test bed with default settings (no CRI, stock PATH).
    pub fn start() -> Result<Testbed> {
        Builder::default().start()
    }

    /// Starts configuring a test bed.
    pub fn builder() -> Builder {
        Builder::default()
    }

    /// The containerd namespace every `ctr` call of this test bed uses (`kbt-<pid>-<n>`).
    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    /// The cgroup hierarchy this test bed runs on.
    pub fn cgroup_mode(&self) -> CgroupMode {
        if self.v2.is_some() {
            CgroupMode::V2
        } else {
            CgroupMode::Host
        }
    }

    /// Where the test reads the v2 cgroup `path` (as in `/proc/PID/cgroup`'s `0::` line) of this
    /// test bed's processes; `None` unless it runs on cgroup v2.
    pub fn v2_cgroup_dir(&self, path: &str) -> Option<PathBuf> {
        self.v2.as_ref().map(|setup| cgroup::v2_dir(setup, path))
    }

    /// Whether this test bed runs on cgroup v2 with `controller` enabled at the hierarchy's root.
    pub fn v2_has_controller(&self, controller: &str) -> bool {
        self.v2.is_some() && cgroup::has_controller(controller)
    }

    /// Whether containerd runs in a mount namespace of its own (a cgroup v2 bed on a v1 machine,
    /// or [`Builder::bind_over`]); the test bed's directory is then a shared bind mount of itself.
    pub fn private_namespace(&self) -> bool {
        self.v2 == Some(V2Setup::PrivateNamespace) || !self.binds.is_empty()
    }

    /// containerd's PID, while it runs.
    pub fn containerd_pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// `program` to run where containerd runs: in its mount namespace when it has one of its own
    /// ([`Testbed::private_namespace`]: e.g. a v2 bed's cgroup2 `/sys/fs/cgroup`), through
    /// `nsenter -m -t PID --wd=.`; else a plain command. For tools that must see what the shims
    /// see. The command's `current_dir` holds inside too (entering a mount namespace alone
    /// would leave the program in its `/`).
    pub fn command_in_namespace(&self, program: impl AsRef<OsStr>) -> Command {
        match self.containerd_pid().filter(|_| self.private_namespace()) {
            Some(pid) => {
                let mut cmd = Command::new("nsenter");
                cmd.arg("-m").arg("-t").arg(pid.to_string()).arg("--wd=.").arg("--").arg(program);
                cmd
            }
            None => Command::new(program),
        }
    }

    /// containerd's gRPC socket.
    pub fn address(&self) -> &Path {
        &self.address
    }

    /// The test bed's directory (config, log, root, state); scratch space for the test too.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// containerd's log file (stdout and stderr, kept across restarts).
    pub fn log_path(&self) -> &Path {
        &self.log
    }

    /// The PATH containerd runs with.
    pub fn path_env(&self) -> &OsStr {
        &self.path
    }

    /// A `ctr` command bound to this test bed's address and namespace, for callers that need to
    /// set stdio or spawn; prefer [`Testbed::ctr`] / [`Testbed::ctr_ok`].
    pub fn ctr_command(&self) -> Command {
        let mut cmd = Command::new(&self.ctr_bin);
        cmd.arg("--address").arg(&self.address).arg("--namespace").arg(&self.namespace);
        cmd.stdin(Stdio::null());
        cmd
    }

    /// The containerd release this test bed runs ([`Builder::containerd`]).
    pub fn release(&self) -> Containerd {
        self.release
    }

    /// The running containerd's version as (major, minor), from `containerd --version`.
    pub fn containerd_version(&self) -> (u32, u32) {
        let out = Command::new(&self.containerd_bin).arg("--version").output().expect("containerd --version");
        let text = String::from_utf8_lossy(&out.stdout);
        let version = text.split_whitespace().nth(2).unwrap_or_default();
        let mut parts = version.split(|c: char| !c.is_ascii_digit()).filter_map(|p| p.parse().ok());
        match (parts.next(), parts.next()) {
            (Some(major), Some(minor)) => (major, minor),
            _ => panic!("cannot read a version from `containerd --version`: {text}"),
        }
    }

    /// Whether containerd's CRI plugin runs ([`Builder::cri`]).
    pub fn cri_enabled(&self) -> bool {
        self.cri
    }

    /// The CRI socket: containerd serves CRI on its gRPC socket ([`Testbed::address`]).
    pub fn cri_socket(&self) -> &Path {
        &self.address
    }

    /// A pod `cgroup_parent` (`/<namespace>`) whose cgroups this test bed's cleanup removes, also
    /// after a killed test process; without one, CRI puts them under the shared `k8s.io/`.
    pub fn cri_cgroup_parent(&self) -> String {
        format!("/{}", self.namespace)
    }

    /// containerd's bundle dir for a CRI container or sandbox (in [`CRI_NAMESPACE`]).
    pub fn cri_bundle_dir(&self, id: &str) -> PathBuf {
        self.dir.join("state/io.containerd.runtime.v2.task").join(CRI_NAMESPACE).join(id)
    }

    /// Runs `ctr ARGS` in containerd namespace `namespace` (e.g. [`CRI_NAMESPACE`]) and returns
    /// its output, whatever the exit status.
    pub fn ctr_in(&self, namespace: &str, args: &[&str]) -> Output {
        let mut cmd = Command::new(&self.ctr_bin);
        cmd.arg("--address").arg(&self.address).arg("--namespace").arg(namespace).args(self.ctr_args(args));
        cmd.stdin(Stdio::null()).output().unwrap_or_else(|e| panic!("cannot run ctr {args:?}: {e}"))
    }

    /// [`Testbed::ctr_in`], panicking with the output and containerd's log tail if it fails.
    pub fn ctr_ok_in(&self, namespace: &str, args: &[&str]) -> String {
        let out = self.ctr_in(namespace, args);
        if !out.status.success() {
            panic!(
                "{}\n--- containerd log (last 30 lines) ---\n{}",
                describe_output(&format!("ctr -n {namespace} {}", args.join(" ")), &out),
                self.log_tail(30)
            );
        }
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Runs `ctr ARGS` against this test bed and returns its output, whatever the exit status.
    pub fn ctr(&self, args: &[&str]) -> Output {
        self.ctr_command().args(self.ctr_args(args)).output().unwrap_or_else(|e| panic!("cannot run ctr {args:?}: {e}"))
    }

    /// `args` as this test bed runs them: on a [v2 test bed](CgroupMode::V2) of these machines
    /// `ctr run` gets `--cpu-shares 0` unless it names its own: its default (1024) makes runc
    /// write `cpu.weight`, which a hierarchy without the cpu controller lacks, for any shim.
    /// [`Testbed::ctr`] and friends apply it; callers of [`Testbed::ctr_command`] use it.
    pub fn ctr_args<'a>(&self, args: &[&'a str]) -> Vec<&'a str> {
        let mut out = args.to_vec();
        let no_cpu = self.v2 == Some(V2Setup::PrivateNamespace) && !cgroup::has_controller("cpu");
        if !no_cpu || args.iter().any(|a| a.starts_with("--cpu-shares")) {
            return out;
        }
        // The subcommand: the first word after ctr's global flags (`--timeout 60s run …`).
        let mut i = 0;
        while let Some(a) = args.get(i) {
            match *a {
                "--timeout" | "--connect-timeout" | "--namespace" | "-n" | "--address" | "-a" => i += 2,
                a if a.starts_with('-') => i += 1,
                "run" => {
                    out.splice(i + 1..i + 1, ["--cpu-shares", "0"]);
                    break;
                }
                _ => break,
            }
        }
        out
    }

    /// Runs `ctr ARGS`, returns its stdout; panics with stdout, stderr and containerd's log tail
    /// if it fails.
    pub fn ctr_ok(&self, args: &[&str]) -> String {
        let out = self.ctr(args);
        if !out.status.success() {
            panic!(
                "{}\n--- containerd log (last 30 lines) ---\n{}",
                describe_output(&format!("ctr {}", args.join(" ")), &out),
                self.log_tail(30)
            );
        }
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Imports [`IMAGE`] from [`IMAGE_ARCHIVE`] into this namespace (and unpacks it); panics on
    /// failure.
    pub fn import_image(&self) {
        self.ctr_ok(&["images", "import", IMAGE_ARCHIVE]);
        let images = self.ctr_ok(&["images", "ls", "-q"]);
        assert!(images.lines().any(|l| l.trim() == IMAGE), "{IMAGE} not listed after import: {images}");
    }

    /// Builds [`PAUSE_IMAGE`] and imports it and [`IMAGE`] into [`CRI_NAMESPACE`] (where CRI
    /// looks for images; with no registry, a missing sandbox image would fail every pod).
    fn import_cri_images(&self) -> Result<()> {
        let archive = self.dir.join("pause-oci.tar");
        cri::build_pause_archive(&archive, &self.dir.join("pause-oci"))?;
        for (file, name) in [(archive.as_path(), PAUSE_IMAGE), (Path::new(IMAGE_ARCHIVE), IMAGE)] {
            let file = file.to_string_lossy();
            let out = self.ctr_in(CRI_NAMESPACE, &["images", "import", &file]);
            if !out.status.success() {
                return Err(Error::NotSetUp(describe_output(&format!("importing {name} into {CRI_NAMESPACE}"), &out)));
            }
        }
        let _ = std::fs::remove_dir_all(self.dir.join("pause-oci"));
        Ok(())
    }

    /// Last `n` lines of containerd's log, leaving out its start-up "loading plugin" chatter.
    pub fn log_tail(&self, n: usize) -> String {
        let text = std::fs::read(&self.log).map(|b| String::from_utf8_lossy(&b).into_owned()).unwrap_or_default();
        let lines: Vec<&str> = text.lines().filter(|l| !l.contains("msg=\"loading plugin")).collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }

    /// Waits (up to 10 s) for a line of containerd's log, which carries the shims', holding every
    /// one of `needles`; returns it.
    pub fn wait_log_line(&self, needles: &[&str]) -> String {
        crate::wait_for_within(Duration::from_secs(10), &format!("a log line with {needles:?}"), || {
            let log = std::fs::read(&self.log).map(|b| String::from_utf8_lossy(&b).into_owned()).ok()?;
            log.lines().find(|l| needles.iter().all(|n| l.contains(n))).map(str::to_string)
        })
    }

    /// Stops containerd (SIGTERM) and starts it again with the same config, leaving shims and
    /// containers running, as a containerd upgrade or crash would; panics if it does not come back.
    pub fn restart_containerd(&mut self) {
        self.stop_containerd();
        if let Err(e) = self.start_containerd() {
            panic!("restarting containerd: {e}");
        }
    }

    /// containerd's config; `cri`: the CRI plugin with these runtime handlers, else CRI disabled.
    fn config_toml(&self, cri: Option<&[CriRuntime]>, extra: &str, log_level: &str) -> String {
        let d = self.dir.display();
        let mut toml = format!(
            r#"# Written by kybernate-testbed for namespace {ns}.
version = 2
root = "{d}/root"
state = "{d}/state"
{disabled}
[grpc]
  address = "{d}/containerd.sock"

[ttrpc]
  address = "{d}/containerd.sock.ttrpc"

[debug]
  level = "{log_level}"

[plugins."io.containerd.internal.v1.opt"]
  path = "{d}/opt"

# containerd >= 1.7's NRI (on by default in 2.x) listens on the host-wide /var/run/nri/nri.sock:
# two beds at once would collide there, and a killed one would leave the file behind.
# (containerd 1.6 has no NRI plugin and ignores the table.)
[plugins."io.containerd.nri.v1.nri"]
  socket_path = "{d}/nri/nri.sock"
  plugin_path = "{d}/nri/plugins"
  plugin_config_path = "{d}/nri/conf.d"
"#,
            ns = self.namespace,
            disabled = if cri.is_some() { "" } else { r#"disabled_plugins = ["io.containerd.grpc.v1.cri"]"# },
        );
        if let Some(runtimes) = cri {
            toml.push_str(&cri::config_toml(&self.dir, runtimes));
        }
        if !extra.is_empty() {
            toml.push_str("\n# extra_config\n");
            toml.push_str(extra);
        }
        toml
    }

    fn start_containerd(&mut self) -> Result<()> {
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .ctx(|| format!("opening {}", self.log.display()))?;
        let log2 = log.try_clone().ctx(|| "duplicating the log fd".into())?;
        let mut cmd = Command::new(&self.containerd_bin);
        cmd.arg("--config").arg(&self.config);
        cmd.env("PATH", &self.path).envs(self.env.iter().map(|(k, v)| (k, v)));
        cmd.stdin(Stdio::null()).stdout(log).stderr(log2);
        let parent = std::process::id() as libc::pid_t;
        let cgroup2_at = (self.v2 == Some(V2Setup::PrivateNamespace)).then_some(cgroup::CGROUP_ROOT);
        let private = if self.private_namespace() { Some(PrivateMounts::new(cgroup2_at, &self.binds)?) } else { None };
        // SAFETY: only async-signal-safe calls (prctl, getppid, unshare, mount) between fork and exec.
        unsafe {
            cmd.pre_exec(move || {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM as libc::c_ulong) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                if libc::getppid() != parent {
                    // The test process died between fork and prctl.
                    return Err(std::io::Error::from_raw_os_error(libc::ESRCH));
                }
                if let Some(private) = &private {
                    private.enter()?;
                }
                Ok(())
            });
        }
        let child = spawn_on_keeper_thread(cmd).ctx(|| format!("starting {}", self.containerd_bin.display()))?;
        self.child = Some(child);
        self.wait_ready()
    }

    /// Polls `ctr version` until containerd answers; fails early if containerd exits.
    fn wait_ready(&mut self) -> Result<()> {
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if let Some(status) = self.child.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                self.child = None;
                return Err(Error::ContainerdStart(format!(
                    "containerd exited with {status}; log tail:\n{}",
                    self.log_tail(30)
                )));
            }
            if self.address.exists() {
                let ok = self
                    .ctr_command()
                    .args(["--timeout", "2s", "version"])
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .status()
                    .map(|s| s.success())
                    .unwrap_or(false);
                if ok {
                    return Ok(());
                }
            }
            if Instant::now() > deadline {
                return Err(Error::ContainerdStart(format!(
                    "no answer on {} after {START_TIMEOUT:?}; log tail:\n{}",
                    self.address.display(),
                    self.log_tail(30)
                )));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// SIGTERM, then SIGKILL after [`STOP_TIMEOUT`]; reaps the child.
    fn stop_containerd(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        if sigterm_and_wait(&mut child, STOP_TIMEOUT) {
            return;
        }
        eprintln!("kybernate-testbed: containerd ignored SIGTERM for {STOP_TIMEOUT:?}; killing it");
        let _ = child.kill();
        let _ = child.wait();
    }

    /// Deletes every task and container through containerd, in every namespace of this private
    /// containerd (ours, and `k8s.io` where CRI made pods), so shims shut down the normal way.
    /// Bounded by ctr's --timeout; whatever is left is scrubbed afterwards. Never panics: it runs
    /// in Drop.
    fn delete_all_through_containerd(&self) {
        let ctr = |ns: &str, args: &[&str]| -> Option<Output> {
            let out = Command::new(&self.ctr_bin)
                .arg("--address")
                .arg(&self.address)
                .args(["--namespace", ns, "--timeout", CLEANUP_CTR_TIMEOUT])
                .args(args)
                .stdin(Stdio::null())
                .output();
            match out {
                Ok(out) if out.status.success() => Some(out),
                Ok(out) => {
                    let what = format!("ctr -n {ns} {}", args.join(" "));
                    eprintln!("kybernate-testbed: cleanup: {}", describe_output(&what, &out));
                    None
                }
                Err(e) => {
                    eprintln!("kybernate-testbed: cleanup: cannot run ctr: {e}");
                    None
                }
            }
        };
        let list = |ns: &str, what: &str| -> Vec<String> {
            ctr(ns, &[what, "ls", "-q"])
                .map(|out| {
                    let text = String::from_utf8_lossy(&out.stdout);
                    text.split_whitespace().map(String::from).collect()
                })
                .unwrap_or_default()
        };
        let mut namespaces = list(&self.namespace, "namespaces");
        if !namespaces.contains(&self.namespace) {
            namespaces.push(self.namespace.clone());
        }
        for ns in &namespaces {
            for task in list(ns, "tasks") {
                ctr(ns, &["tasks", "delete", "--force", &task]);
            }
            for container in list(ns, "containers") {
                ctr(ns, &["containers", "delete", &container]);
            }
        }
    }
}

impl Drop for Testbed {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let kept = std::env::temp_dir().join(format!("kybernate-testbed-{}.log", self.namespace));
            let kept_msg = match std::fs::copy(&self.log, &kept) {
                Ok(_) => format!("full log kept at {}", kept.display()),
                Err(e) => format!("could not keep the log: {e}"),
            };
            eprintln!(
                "--- containerd log of test bed {} (last 60 lines; {kept_msg}) ---\n{}\n--- end of containerd log ---",
                self.namespace,
                self.log_tail(60)
            );
        }
        if self.child.is_some() {
            self.delete_all_through_containerd();
        }
        self.stop_containerd();
        cleanup::scrub(&self.namespace, &self.dir);
    }
}

/// Spawns `cmd` from a thread that lives as long as the process. PR_SET_PDEATHSIG fires when the
/// *thread* that forked the child exits, and test threads end (or restart containerd from
/// helper threads) while the containerd they started should keep running.
fn spawn_on_keeper_thread(cmd: Command) -> std::io::Result<Child> {
    type Job = (Command, mpsc::Sender<std::io::Result<Child>>);
    static KEEPER: OnceLock<mpsc::Sender<Job>> = OnceLock::new();
    let keeper = KEEPER.get_or_init(|| {
        let (tx, rx) = mpsc::channel::<Job>();
        std::thread::Builder::new()
            .name("kybernate-testbed-spawner".into())
            .spawn(move || {
                for (mut cmd, reply) in rx {
                    let _ = reply.send(cmd.spawn());
                }
            })
            .expect("spawning the spawner thread");
        tx
    });
    let (reply_tx, reply_rx) = mpsc::channel();
    if keeper.send((cmd, reply_tx)).is_err() {
        return Err(std::io::Error::other("spawner thread is gone"));
    }
    reply_rx.recv().unwrap_or_else(|_| Err(std::io::Error::other("spawner thread is gone")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bed(dir: &str) -> Testbed {
        Testbed {
            namespace: "kbt-1-2".into(),
            dir: PathBuf::from(dir),
            config: PathBuf::new(),
            log: PathBuf::new(),
            address: PathBuf::new(),
            path: OsString::new(),
            env: vec![],
            containerd_bin: PathBuf::new(),
            ctr_bin: PathBuf::new(),
            child: None,
            cri: false,
            release: Containerd::V1_6,
            v2: None,
            binds: vec![],
        }
    }

    #[test]
    fn config_has_private_dirs_and_no_cri_by_default() {
        let tb = bed("/x/kbt-1-2");
        let toml = tb.config_toml(None, "[plugins.\"a\"]\n  b = 1\n", "info");
        assert!(toml.contains("root = \"/x/kbt-1-2/root\""));
        assert!(toml.contains("state = \"/x/kbt-1-2/state\""));
        assert!(toml.contains("address = \"/x/kbt-1-2/containerd.sock\""));
        assert!(toml.contains("address = \"/x/kbt-1-2/containerd.sock.ttrpc\""));
        assert!(toml.contains("socket_path = \"/x/kbt-1-2/nri/nri.sock\""));
        assert!(toml.contains("disabled_plugins = [\"io.containerd.grpc.v1.cri\"]"));
        assert!(toml.trim_end().ends_with("b = 1"));
        // Leaked into `tb`'s Drop otherwise: nothing to clean for a fake.
        std::mem::forget(tb);
    }

    #[test]
    fn ctr_run_on_a_v2_bed_without_the_cpu_controller_asks_for_no_cpu_shares() {
        let mut tb = bed("/x/kbt-1-2");
        assert_eq!(tb.ctr_args(&["run", "img", "id"]), ["run", "img", "id"], "a host-cgroup bed adds nothing");
        tb.v2 = Some(V2Setup::PrivateNamespace);
        let run = tb.ctr_args(&["run", "-d", "img", "id"]);
        if cgroup::has_controller("cpu") {
            assert_eq!(run, ["run", "-d", "img", "id"]);
        } else {
            assert_eq!(run, ["run", "--cpu-shares", "0", "-d", "img", "id"]);
        }
        assert_eq!(tb.ctr_args(&["run", "--cpu-shares", "2", "img"]), ["run", "--cpu-shares", "2", "img"]);
        assert_eq!(tb.ctr_args(&["task", "ls"]), ["task", "ls"]);
        let global = tb.ctr_args(&["--timeout", "60s", "run", "img"]);
        if !cgroup::has_controller("cpu") {
            assert_eq!(global, ["--timeout", "60s", "run", "--cpu-shares", "0", "img"]);
        }
        assert_eq!(tb.ctr_args(&["images", "run"]), ["images", "run"], "only ctr's own run subcommand");
        std::mem::forget(tb);
    }

    #[test]
    fn cri_config_restricts_oom_score_adj() {
        let tb = bed("/x/kbt-1-2");
        let toml = tb.config_toml(Some(&[]), "", "info");
        assert!(!toml.contains("disabled_plugins"));
        assert!(toml.contains("restrict_oom_score_adj = true"));
        std::mem::forget(tb);
    }
}
