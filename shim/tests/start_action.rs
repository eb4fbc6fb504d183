//! The shim binary's `start` action run the way containerd 1.6 runs it: in the bundle dir, with
//! `-namespace -address -publish-binary -id start`, `TTRPC_ADDRESS` set, the runtime options as
//! a marshalled `Any` on stdin, and stdout and stderr read together as the socket address. The
//! daemon it spawns talks to the test bed's containerd (events) and is shut down over its socket.
//! Needs the test bed (`test/setup.sh`) and root (cgroups, OOM scores).
//!
//! Only polling with generous deadlines: nothing here asserts on how long something took.

use std::fs::File;
use std::io::{Read, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use containerd_shim_protos::api::{ConnectRequest, ShutdownRequest};
use containerd_shim_protos::protobuf::well_known_types::any::Any;
use containerd_shim_protos::protobuf::Message;
use containerd_shim_protos::shim::oci::Options as RuncOptions;
use containerd_shim_protos::ttrpc::context;
use containerd_shim_protos::{Client, TaskClient};
use kybernate_testbed::{unique_name, Testbed};
use nix::sys::signal::{kill, Signal};
use nix::sys::stat::Mode;
use nix::unistd::{mkfifo, Pid};
use serde_json::json;

mod common;

use common::{testbed, text, wait_for, wait_until, SHIM, TIMEOUT};

const RUNC_OPTIONS_URL: &str = "containerd.runc.v1.Options";
const GROUP_ANNOTATION: &str = "io.containerd.runc.v2.group";
const SOCKET_DIR: &str = "/run/containerd/s/";

// ---------------------------------------------------------------------------------------------
// Bundles, the start action, the daemon

/// A bundle dir as containerd prepares it before `start`: `config.json` (only its annotations
/// matter to `start`) and the `log` FIFO, which the daemon opens for writing before it serves
/// (containerd holds the read end; so do we, without reading: the shim logs little).
struct StartBundle {
    dir: PathBuf,
    _log: File,
}

impl StartBundle {
    fn new(tb: &Testbed, id: &str, annotations: serde_json::Value) -> StartBundle {
        let dir = tb.dir().join("start-bundles").join(id);
        std::fs::create_dir_all(&dir).unwrap();
        let config = json!({"ociVersion": "1.0.2", "annotations": annotations});
        std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
        let log = dir.join("log");
        mkfifo(&log, Mode::from_bits_truncate(0o600)).unwrap();
        let reader = std::fs::OpenOptions::new().read(true).custom_flags(libc::O_NONBLOCK).open(&log).unwrap();
        StartBundle { dir, _log: reader }
    }

    fn address_file(&self) -> String {
        std::fs::read_to_string(self.dir.join("address")).unwrap_or_else(|e| panic!("reading address: {e}"))
    }
}

/// What one `start` printed.
#[derive(Debug)]
struct Started {
    success: bool,
    stdout: String,
    stderr: String,
}

/// Runs `SHIM ... -id <id> start` in `bundle` as containerd 1.6 does, feeding `stdin`; kills it
/// and panics if it does not finish within [`TIMEOUT`].
fn start(tb: &Testbed, bundle: &StartBundle, id: &str, stdin: &[u8]) -> Started {
    let address = tb.address().to_str().unwrap();
    let mut child = Command::new(SHIM)
        .args(["-namespace", tb.namespace(), "-address", address, "-publish-binary", "/usr/bin/containerd"])
        .args(["-id", id, "start"])
        .current_dir(&bundle.dir)
        .env("TTRPC_ADDRESS", format!("{address}.ttrpc"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawning the shim's start action");
    {
        let mut input = child.stdin.take().unwrap();
        input.write_all(stdin).unwrap();
    }
    let mut out = child.stdout.take().unwrap();
    let mut err = child.stderr.take().unwrap();
    let out = std::thread::spawn(move || {
        let mut b = Vec::new();
        let _ = out.read_to_end(&mut b);
        b
    });
    let err = std::thread::spawn(move || {
        let mut b = Vec::new();
        let _ = err.read_to_end(&mut b);
        b
    });
    let deadline = Instant::now() + TIMEOUT;
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("`start` of {id} did not finish within {TIMEOUT:?}");
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    };
    // The daemon's stdio is /dev/null: both pipes closed when `start` exited.
    Started { success: status.success(), stdout: text(&out.join().unwrap()), stderr: text(&err.join().unwrap()) }
}

/// Checks what containerd 1.6 needs from `start` (exit 0, the address alone on stdout+stderr, in
/// `./address` too) and returns the address.
fn expect_started(s: &Started, bundle: &StartBundle) -> String {
    assert!(s.success, "start failed: {s:#?}");
    assert_eq!(s.stderr, "", "containerd 1.6 reads stderr with stdout as the address: {s:#?}");
    let address = s.stdout.clone();
    let hash = address.strip_prefix(&format!("unix://{SOCKET_DIR}")).unwrap_or_else(|| panic!("address {address:?}"));
    assert!(
        hash.len() == 64 && hash.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)),
        "address {address:?} is not unix://{SOCKET_DIR}<sha256 hex>"
    );
    assert_eq!(bundle.address_file(), address, "./address differs from what start printed");
    address
}

fn ctx() -> context::Context {
    context::with_duration(TIMEOUT)
}

fn connect(address: &str) -> TaskClient {
    TaskClient::new(Client::connect(address).unwrap_or_else(|e| panic!("connecting to the shim at {address}: {e}")))
}

/// The daemon's pid, as it reports it.
fn shim_pid(client: &TaskClient, id: &str) -> i32 {
    let req = ConnectRequest { id: id.to_string(), ..Default::default() };
    let resp = client.connect(ctx(), &req).unwrap_or_else(|e| panic!("Connect: {e}"));
    resp.shim_pid as i32
}

fn cmdline(pid: i32) -> Vec<String> {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|b| b.split(|c| *c == 0).filter(|a| !a.is_empty()).map(text).collect())
        .unwrap_or_default()
}

fn arg_after<'a>(args: &'a [String], flag: &str) -> Option<&'a str> {
    args.iter().position(|a| a == flag).and_then(|i| args.get(i + 1)).map(String::as_str)
}

/// Live shim daemons (processes with `-socket`) of `namespace`: `(pid, socket address)`.
fn daemons(namespace: &str) -> Vec<(i32, String)> {
    let Ok(dir) = std::fs::read_dir("/proc") else { return Vec::new() };
    let mut found: Vec<(i32, String)> = dir
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter_map(|pid| {
            let args = cmdline(pid);
            (arg_after(&args, "-namespace") == Some(namespace))
                .then(|| arg_after(&args, "-socket").map(|s| (pid, s.to_string())))
                .flatten()
        })
        .collect();
    found.sort();
    found
}

/// Neither running nor a zombie (the daemon's parent, `start`, is gone: whoever adopted it reaps).
fn gone(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(stat) => stat.rsplit_once(')').is_some_and(|(_, rest)| rest.trim_start().starts_with(['Z', 'X'])),
    }
}

fn oom_score_adj(pid: &str) -> i64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/oom_score_adj")).unwrap();
    s.trim().parse().unwrap()
}

/// Asks the daemon to exit (it has no containers) and waits until it has, and its socket is gone.
fn shutdown(address: &str, id: &str, pid: i32) {
    let client = connect(address);
    let req = ShutdownRequest { id: id.to_string(), ..Default::default() };
    // The daemon may exit before the reply is out: what counts is that it goes.
    let _ = client.shutdown(ctx(), &req);
    wait_until("the shim daemon to exit after Shutdown", || (pid, gone(pid), cmdline(pid)), |s| s.1);
    let socket = address.trim_start_matches("unix://").to_string();
    wait_until("the shim to remove its socket", || Path::new(&socket).exists(), |e| !e);
}

/// Kills (SIGKILL) every shim daemon of the test bed's namespace still alive when the test ends,
/// and removes their sockets, whether the test passed or not. Declare it after the test bed.
struct ShimGuard {
    namespace: String,
}

impl Drop for ShimGuard {
    fn drop(&mut self) {
        for (pid, socket) in daemons(&self.namespace) {
            let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
            if let Some(path) = socket.strip_prefix("unix://") {
                if path.starts_with(SOCKET_DIR) {
                    let _ = std::fs::remove_file(path);
                }
            }
        }
    }
}

fn guard(tb: &Testbed) -> ShimGuard {
    ShimGuard { namespace: tb.namespace().to_string() }
}

// ---------------------------------------------------------------------------------------------
// Cgroups

/// A cgroup made for the shim in every hierarchy `containerd_shim::cgroup::add_task_to_cgroup`
/// writes to (cgroups-rs: all v1 hierarchies, or the unified one), removed on drop.
struct ShimCgroup {
    /// What `ShimCgroup` says: the path relative to each hierarchy's root.
    path: String,
    dirs: Vec<PathBuf>,
}

impl ShimCgroup {
    fn new() -> ShimCgroup {
        let name = unique_name("shimcg");
        let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
        // (mount point, fs type) of cgroup mounts.
        let mounts: Vec<(String, String)> = mountinfo
            .lines()
            .filter_map(|l| {
                let (left, right) = l.split_once(" - ")?;
                let point = left.split_whitespace().nth(4)?.to_string();
                let fstype = right.split_whitespace().next()?.to_string();
                fstype.starts_with("cgroup").then_some((point, fstype))
            })
            .collect();
        let unified = mounts.iter().any(|(p, t)| p == "/sys/fs/cgroup" && t == "cgroup2");
        let roots: Vec<&String> = mounts
            .iter()
            .filter(|(p, t)| if unified { p == "/sys/fs/cgroup" } else { t == "cgroup" })
            .map(|(p, _)| p)
            .collect();
        assert!(!roots.is_empty(), "no cgroup hierarchies in /proc/self/mountinfo");
        let mut cg = ShimCgroup { path: format!("/{name}"), dirs: Vec::new() };
        for root in roots {
            let dir = Path::new(root).join(&name);
            std::fs::create_dir(&dir).unwrap_or_else(|e| panic!("mkdir {}: {e}", dir.display()));
            cg.dirs.push(dir.clone());
            // A v1 cpuset starts empty and takes no tasks until given CPUs and memory nodes.
            for f in ["cpuset.cpus", "cpuset.mems"] {
                if let Ok(v) = std::fs::read_to_string(Path::new(root).join(f)) {
                    std::fs::write(dir.join(f), v.trim()).unwrap_or_else(|e| panic!("{f}: {e}"));
                }
            }
        }
        cg
    }

    /// The hierarchies whose copy of this cgroup does not list `pid`.
    fn missing(&self, pid: i32) -> Vec<PathBuf> {
        self.dirs
            .iter()
            .filter(|d| {
                let procs = std::fs::read_to_string(d.join("cgroup.procs")).unwrap_or_default();
                !procs.lines().any(|l| l.trim() == pid.to_string())
            })
            .cloned()
            .collect()
    }
}

impl Drop for ShimCgroup {
    fn drop(&mut self) {
        for dir in &self.dirs {
            // A killed daemon may take a moment to leave.
            let deadline = Instant::now() + TIMEOUT;
            while std::fs::remove_dir(dir).is_err() && dir.exists() && Instant::now() < deadline {
                std::thread::sleep(std::time::Duration::from_millis(50));
            }
        }
    }
}

fn runc_options_any(opts: &RuncOptions) -> Vec<u8> {
    let any = Any { type_url: RUNC_OPTIONS_URL.into(), value: opts.write_to_bytes().unwrap(), ..Default::default() };
    any.write_to_bytes().unwrap()
}

// ---------------------------------------------------------------------------------------------
// Tests

#[test]
fn start_joins_the_shim_cgroup_and_raises_the_oom_score() {
    let tb = testbed();
    let cg = ShimCgroup::new();
    let _guard = guard(&tb);
    let id = unique_name("start-cg");
    let bundle = StartBundle::new(&tb, &id, json!({}));
    let opts = RuncOptions { shim_cgroup: cg.path.clone(), ..Default::default() };

    let started = start(&tb, &bundle, &id, &runc_options_any(&opts));
    let address = expect_started(&started, &bundle);

    let pid = shim_pid(&connect(&address), &id);
    let listed = daemons(tb.namespace());
    assert_eq!(listed, vec![(pid, address.clone())], "want exactly the daemon Connect reported");

    let missing = cg.missing(pid);
    let own_cgroups = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap_or_default();
    assert!(missing.is_empty(), "daemon {pid} is not in {missing:?}; its /proc/pid/cgroup:\n{own_cgroups}");

    let want = (oom_score_adj("self") + 1).min(1000);
    assert_eq!(oom_score_adj(&pid.to_string()), want, "daemon's oom_score_adj should be its starter's parent's + 1");

    shutdown(&address, &id, pid);
}

#[test]
fn start_reuses_the_live_shim_of_a_group() {
    let tb = testbed();
    let _guard = guard(&tb);
    let group = unique_name("group");
    let (id1, id2) = (unique_name("start-g1"), unique_name("start-g2"));
    let b1 = StartBundle::new(&tb, &id1, json!({ GROUP_ANNOTATION: group }));
    let b2 = StartBundle::new(&tb, &id2, json!({ GROUP_ANNOTATION: group }));

    let address = expect_started(&start(&tb, &b1, &id1, b""), &b1);
    let pid = shim_pid(&connect(&address), &id1);

    let again = expect_started(&start(&tb, &b2, &id2, b""), &b2);
    assert_eq!(again, address, "a second container of the group must get the group's shim");
    // The second start finds the socket live and spawns nothing: the group keeps one daemon.
    assert_eq!(daemons(tb.namespace()), vec![(pid, address.clone())], "one daemon for the group");
    assert_eq!(shim_pid(&connect(&address), &id2), pid, "Connect for the second id answered by another process");

    shutdown(&address, &id1, pid);
}

#[test]
fn start_with_empty_stdin_and_garbage_stdin_still_starts() {
    let tb = testbed();
    let _guard = guard(&tb);
    let unknown_type =
        Any { type_url: "example.com/not.an.Options".into(), value: vec![1, 2, 3], ..Default::default() };
    let malformed_runc = Any { type_url: RUNC_OPTIONS_URL.into(), value: vec![0xff; 7], ..Default::default() };
    let cases: [(&str, Vec<u8>); 4] = [
        ("empty", Vec::new()),
        ("garbage", vec![0xff, 0xfe, 0x00, 0x13, 0x37, 0xff, 0xff, 0xff]),
        ("unknown-type", unknown_type.write_to_bytes().unwrap()),
        ("bad-runc", malformed_runc.write_to_bytes().unwrap()),
    ];
    for (what, stdin) in cases {
        let id = unique_name(what);
        let bundle = StartBundle::new(&tb, &id, json!({}));
        let started = start(&tb, &bundle, &id, &stdin);
        let address = expect_started(&started, &bundle);
        let pid = wait_for("the daemon to answer Connect", || {
            Client::connect(&address).ok().map(TaskClient::new).map(|c| shim_pid(&c, &id))
        });
        assert_eq!(daemons(tb.namespace()), vec![(pid, address.clone())], "stdin {what}");
        shutdown(&address, &id, pid);
    }
}

/// `start` binds the socket (replacing one a killed shim left) and the daemon serves that very
/// socket: root-only, and close-on-exec in the daemon so that no runtime inherits it.
#[test]
fn start_replaces_a_dead_shims_socket_and_the_daemon_keeps_it_to_itself() {
    let tb = testbed();
    let _guard = guard(&tb);
    let id = unique_name("start-stale");
    let bundle = StartBundle::new(&tb, &id, json!({}));
    let want = containerd_shim::socket_address(tb.address().to_str().unwrap(), tb.namespace(), &id);
    let path = PathBuf::from(want.strip_prefix("unix://").unwrap());
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    drop(std::os::unix::net::UnixListener::bind(&path).unwrap()); // the file stays, nobody listens

    let address = expect_started(&start(&tb, &bundle, &id, b""), &bundle);
    assert_eq!(address, want);
    let pid = wait_for("the daemon to answer Connect", || {
        Client::connect(&address).ok().map(TaskClient::new).map(|c| shim_pid(&c, &id))
    });
    let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "the shim socket must be root-only");

    // The listening socket bound at `path` (its inode in /proc/net/unix) is one of the daemon's fds.
    let unix = std::fs::read_to_string("/proc/net/unix").unwrap();
    let inode = unix
        .lines()
        .find_map(|l| {
            let cols: Vec<&str> = l.split_whitespace().collect();
            (cols.len() >= 8 && Path::new(cols[7]) == path && cols[3] == "00010000").then(|| cols[6].to_string())
        })
        .unwrap_or_else(|| panic!("no listening socket at {} in /proc/net/unix", path.display()));
    let fd = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .flatten()
        .find(|e| std::fs::read_link(e.path()).is_ok_and(|l| l == Path::new(&format!("socket:[{inode}]"))))
        .unwrap_or_else(|| panic!("daemon {pid} does not hold the socket bound at {}", path.display()))
        .file_name();
    let fdinfo = std::fs::read_to_string(format!("/proc/{pid}/fdinfo/{}", fd.to_string_lossy())).unwrap();
    let flags = fdinfo.lines().find_map(|l| l.strip_prefix("flags:")).map(str::trim).unwrap();
    let flags = u32::from_str_radix(flags, 8).unwrap();
    assert_ne!(flags & libc::O_CLOEXEC as u32, 0, "the daemon's listening fd must be close-on-exec: {fdinfo}");

    shutdown(&address, &id, pid);
}

/// A daemon started with a listening fd that is not one fails at once and names the variable.
#[test]
fn a_daemon_handed_a_bad_listen_fd_says_so() {
    for bad in ["", "abc", "2", "9"] {
        let out = Command::new(SHIM)
            .args(["-namespace", "kbt-none", "-id", "x", "-address", "/nonexistent", "-socket", "unix:///nonexistent"])
            .env(kybernate_shim::bootstrap::LISTEN_FD_ENV, bad)
            .env("TTRPC_ADDRESS", "/nonexistent.ttrpc")
            .stdin(Stdio::null())
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(1), "{bad:?}: {out:?}");
        let err = text(&out.stderr);
        assert!(err.contains(kybernate_shim::bootstrap::LISTEN_FD_ENV), "{bad:?}: {err}");
    }
}
