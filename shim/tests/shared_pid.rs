//! How a container's end reaches the user, checked against the stock shim's behaviour: init's exit
//! in a container without a PID namespace of its own (its other processes are killed before the
//! exit is reported, as containerd's runc shim does), and a create that runc refuses (runc's
//! message in the error, nothing in the container's log). Driven by `ctr` on a private
//! containerd 1.6; needs the test bed (`test/setup.sh`).
//!
//! Only polling with generous deadlines: nothing here asserts on how long something took
//! (test/bench/shared_pid_exit.sh measures the exit latency).

use std::path::Path;

mod common;

use common::{bundle_dir, task_row, task_status, testbed, text, wait_for, wait_until, RUNTIME};
use kybernate_testbed::{unique_name, Testbed, IMAGE};
use serde_json::{json, Value};

/// Pids of live (not zombie) processes whose command line is exactly `args`.
fn live_processes(args: &[&str]) -> Vec<u32> {
    let want: Vec<u8> = args.iter().flat_map(|a| a.bytes().chain([0])).collect();
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|c| c == want))
        .filter(|pid| {
            // A zombie has no command line any more; one read in between is caught here.
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            let state = stat.rsplit_once(") ").and_then(|(_, rest)| rest.chars().next());
            !matches!(state, None | Some('Z') | Some('X'))
        })
        .collect()
}

/// What init runs: leaves `sleep <tag>` behind holding its stdout, and exits.
fn leave_a_child(tag: &str) -> [String; 3] {
    ["sh".into(), "-c".into(), format!("sleep {tag} & sleep 1; echo bye; exit 3")]
}

/// Starts `id` detached (`run`: flags and image; `cmd`: the command, unless the spec has it), waits
/// for its init to leave `sleep <tag>` behind and exit, then asserts that the child was gone when
/// the exit was reported (task STOPPED).
fn exit_kills_the_child(tb: &Testbed, id: &str, run: &[&str], cmd: &[String], tag: &str) {
    let mut args = vec!["run", "-d", "--runtime", RUNTIME];
    args.extend_from_slice(run);
    args.push(id);
    args.extend(cmd.iter().map(String::as_str));
    tb.ctr_ok(&args);
    let child = ["sleep", tag];
    // Seen while init still runs (it sleeps 1 s): the test's premise, not its subject.
    let seen = wait_for("the background child to start", || live_processes(&child).first().copied());
    wait_until("the task to stop", || task_status(tb, id), |s| s.as_deref() == Some("STOPPED"));
    let left = live_processes(&child);
    assert!(
        left.is_empty(),
        "{id}: init's exit was reported while its child {seen} (`sleep {tag}`) still ran: {left:?}\n\
         --- containerd log ---\n{}",
        tb.log_tail(30)
    );
    tb.ctr_ok(&["tasks", "delete", id]);
    tb.ctr_ok(&["containers", "delete", id]);
}

/// A container joining another container's PID namespace (a pod's, with shareProcessNamespace),
/// and one in the host's (no `pid` entry: CRI's hostPID): when init exits, a background child
/// holding its stdout is killed before the exit is reported, instead of holding the report up
/// until the output drain gives up. Containers with their own PID namespace are covered by every
/// other e2e test (their processes die with init).
#[test]
fn init_exit_kills_the_rest_when_the_pid_namespace_is_shared() {
    let tb = testbed();
    let holder = unique_name("holder");
    tb.ctr_ok(&["run", "-d", "--runtime", RUNTIME, IMAGE, &holder, "sleep", "1000"]);
    let (holder_pid, _) = wait_for("the holder's pid", || task_row(&tb, &holder).filter(|(pid, _)| *pid != 0));
    // Unique per test process, so that no other test's sleep matches.
    let tag = |n: u32| (1_000_000 + std::process::id() * 10 + n).to_string();

    let joiner = unique_name("joiner");
    let ns = format!("pid:/proc/{holder_pid}/ns/pid");
    exit_kills_the_child(&tb, &joiner, &["--with-ns", &ns, IMAGE], &leave_a_child(&tag(1)), &tag(1));

    // The host's PID namespace: a spec with no `pid` entry at all. ctr has no flag for that, so the
    // holder's spec, edited, is passed whole (no image: the holder's mounted rootfs, read-only).
    let host = unique_name("hostpid");
    let mut spec: Value =
        serde_json::from_slice(&std::fs::read(bundle_dir(&tb, &holder).join("config.json")).unwrap()).unwrap();
    spec["process"]["args"] = json!(leave_a_child(&tag(2)));
    spec["linux"]["namespaces"].as_array_mut().unwrap().retain(|ns| ns["type"] != "pid");
    spec["linux"]["cgroupsPath"] = json!(format!("/{}/{host}", tb.namespace()));
    spec["root"] = json!({ "path": bundle_dir(&tb, &holder).join("rootfs"), "readonly": true });
    let config = tb.dir().join(format!("{host}.json"));
    std::fs::write(&config, serde_json::to_vec(&spec).unwrap()).unwrap();
    exit_kills_the_child(&tb, &host, &["--config", config.to_str().unwrap()], &[], &tag(2));

    tb.ctr_ok(&["tasks", "kill", "-s", "SIGKILL", &holder]);
    wait_until("the holder to stop", || task_status(&tb, &holder), |s| s.as_deref() == Some("STOPPED"));
    tb.ctr_ok(&["tasks", "delete", &holder]);
    tb.ctr_ok(&["containers", "delete", &holder]);
}

/// `ctr run` with its output in a file; returns ctr's stderr and the file's content.
fn refused_run(tb: &Testbed, runtime: &str, log: &Path) -> (String, String) {
    let id = unique_name("refused");
    let uri = format!("file://{}", log.display());
    let out =
        tb.ctr(&["--timeout", "60s", "run", "--rm", "--runtime", runtime, "--log-uri", &uri, IMAGE, &id, "/no/such"]);
    assert!(!out.status.success(), "{runtime}: a missing binary ran: {}", text(&out.stdout));
    // ctr leaves the container record of a failed task behind.
    let _ = tb.ctr(&["containers", "delete", &id]);
    (text(&out.stderr), std::fs::read_to_string(log).unwrap_or_default())
}

/// runc refuses a create (the process's binary is not in the rootfs) and prints the reason on its
/// stderr, which is the container's: the user sees runc's message in the error and nothing in the
/// container's log, with our shim as with the stock one.
#[test]
fn a_refused_create_names_runcs_error_and_leaves_the_container_log_empty() {
    let tb = testbed();
    for runtime in ["io.containerd.runc.v2", RUNTIME] {
        let log = tb.dir().join(format!("{}.log", unique_name("refused")));
        let (error, logged) = refused_run(&tb, runtime, &log);
        assert!(error.contains("/no/such") && error.contains("no such file or directory"), "{runtime}: {error}");
        assert_eq!(logged, "", "{runtime}: the container's log has the runtime's own diagnostics");
    }
}
