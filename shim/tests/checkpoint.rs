//! Checkpoint and restore through the shim with real containerd 1.6, runc and CRIU 4.1 (the
//! test bed: `test/setup.sh`). The subject is a counter container that writes an increasing
//! number to /tmp/counter every 100 ms: after each restore it must continue from at least its
//! value at checkpoint time and keep increasing.
//!
//! `ctr` sends no checkpoint options for runtime names other than runc's, so requests that need
//! options (image_path into the node's store, exit, open TCP) go straight to the shim's ttrpc
//! socket, as containerd would forward them.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use containerd_shim_protos::api::Status;
use containerd_shim_protos::shim::oci::CheckpointOptions;
use containerd_shim_protos::ttrpc::Code;

mod common;

use common::ckpt::*;
use common::{bundle_dir, runc_state_entries, shim_dir, task_status, text, wait_for, RUNTIME, TIMEOUT};
use kybernate_testbed::{unique_name, Containerd, Testbed, IMAGE};

// ---------------------------------------------------------------------------------------------
// Checkpoint through ctr and containerd's content store

#[test]
fn ctr_task_checkpoint_leaves_the_container_running() {
    let bed = bed();
    let tb = &bed.tb;
    let id = unique_name("ctr-t");
    run_counter(tb, &id, &[]);
    wait_counter(tb, &id, 3);
    let mut events = tb
        .ctr_command()
        .arg("events")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("ctr events");
    let seen = common::read_to_eof(events.stdout.take().unwrap().into());
    std::thread::sleep(Duration::from_millis(300));
    let name = tb.ctr_ok(&["tasks", "checkpoint", &id]);
    let name = name.trim();
    assert!(!name.is_empty(), "ctr printed no checkpoint name");
    assert!(tb.ctr_ok(&["images", "ls", "-q"]).lines().any(|l| l == name), "checkpoint image {name} not listed");
    // No options from ctr for our runtime name: the default is to leave the container running.
    assert_running(tb, &id, "after ctr tasks checkpoint");
    let _ = events.kill();
    let _ = events.wait();
    let events = seen.recv_timeout(TIMEOUT).expect("ctr events output");
    assert!(
        events.lines().any(|l| l.contains("/tasks/checkpointed") && l.contains(&id)),
        "no /tasks/checkpointed event for {id}:\n{events}"
    );

    // ctr sets --exit, --image-path and --work-path only for runc's runtime names: with ours they
    // have no effect. The container keeps running, the checkpoint still goes into containerd's
    // content store, and the given directories stay unused. (A second container: containerd 1.6
    // refuses a second checkpoint of the same one while its spec blob is in the content store.)
    let other = unique_name("ctr-tx");
    run_counter(tb, &other, &[]);
    wait_counter(tb, &other, 3);
    let scratch = kybernate_testbed::scratch_dir().unwrap();
    let (images, work) = (scratch.path().join("images"), scratch.path().join("work"));
    std::fs::create_dir_all(&images).unwrap();
    std::fs::create_dir_all(&work).unwrap();
    let (images_arg, work_arg) = (images.display().to_string(), work.display().to_string());
    let image_names = || tb.ctr_ok(&["images", "ls", "-q"]).lines().map(str::to_string).collect::<Vec<_>>();
    let before = image_names();
    // ctr itself prints no image name when given --image-path (it expects no image then).
    let printed =
        tb.ctr_ok(&["tasks", "checkpoint", "--exit", "--image-path", &images_arg, "--work-path", &work_arg, &other]);
    assert_eq!(printed.trim(), "", "ctr printed a checkpoint name despite --image-path");
    let new: Vec<String> = image_names().into_iter().filter(|n| !before.contains(n)).collect();
    assert!(
        new.len() == 1 && new[0].starts_with(&format!("containerd.io/checkpoint/{other}:")),
        "want one new checkpoint image of {other}, got {new:?}"
    );
    assert_running(tb, &other, "after ctr tasks checkpoint --exit");
    assert!(entries(&images).is_empty(), "--image-path was used: {:?}", entries(&images));
    assert!(entries(&work).is_empty(), "--work-path was used: {:?}", entries(&work));
    remove(tb, &other);
    remove(tb, &id);
}

/// containerd 2.x's `ctr` sends `--exit`, `--image-path` and `--work-path` for every runtime (1.6's
/// only for runc's names, above), and 2.x's task service hands the shim `image_path` itself as
/// the checkpoint path. Into the node's store that is a checkpoint like the CLI's: the container
/// stops, the checkpoint verifies (the content-store pointer the shim leaves for 1.6/1.7 must not
/// land in it), CRIU's log is in the work path, and a container restored from it counts on.
/// 2.x's client still records a checkpoint image (the container's spec and rootfs, no task
/// state: it skips that only for the runtime `io.containerd.runc.v2`, client/task.go).
#[test]
fn ctr_task_checkpoint_into_the_store_under_containerd_2() {
    let bed = bed_with(|b| b.containerd(Containerd::V2), "");
    let tb = &bed.tb;
    let id = unique_name("ctr2");
    run_counter(tb, &id, &[]);
    let before = wait_counter(tb, &id, 3);
    let target = store_path(&bed, &id);
    let scratch = kybernate_testbed::scratch_dir().unwrap();
    let work = scratch.path().join("work");
    std::fs::create_dir_all(&work).unwrap();
    let images = || tb.ctr_ok(&["images", "ls", "-q"]).lines().map(str::to_string).collect::<Vec<_>>();
    let images_before = images();
    let (target_arg, work_arg) = (target.display().to_string(), work.display().to_string());
    let printed =
        tb.ctr_ok(&["tasks", "checkpoint", "--exit", "--image-path", &target_arg, "--work-path", &work_arg, &id]);
    assert_eq!(printed.trim(), "");
    wait_for("the checkpointed task to stop", || (task_status(tb, &id).as_deref() == Some("STOPPED")).then_some(()));
    let manifest = kybernate_checkpoint::verify(&target).unwrap_or_else(|e| panic!("{}: {e}", target.display()));
    assert_eq!(manifest.container_id, id);
    assert!(work.join("dump.log").is_file(), "no dump.log in the work path: {:?}", entries(&work));
    let new: Vec<String> = images().into_iter().filter(|n| !images_before.contains(n)).collect();
    assert!(
        new.len() == 1 && new[0].starts_with(&format!("containerd.io/checkpoint/{id}:")),
        "want the client's checkpoint image of {id}, got {new:?}"
    );

    let restored = unique_name("ctr2-r");
    run_restored_ok(&bed, &target, &restored, &[]);
    assert_counter_continues(tb, &restored, before);
    remove(tb, &restored);
    remove(tb, &id);
    tb.ctr_ok(&["images", "rm", &new[0]]);
}

#[test]
fn ctr_container_checkpoint_and_live_restore_with_rw() {
    let bed = bed();
    let tb = &bed.tb;
    let id = unique_name("ctr-c");
    let reference = format!("kybernate.test/{}:cp", unique_name("ref"));
    run_counter(tb, &id, &[]);
    // Far enough that a fresh start (from 1) is seen below it, for the restore without --live.
    let before = wait_counter(tb, &id, 15);
    tb.ctr_ok(&["containers", "checkpoint", "--task", "--rw", &id, &reference]);
    let at_checkpoint = counter(tb, &id).unwrap();
    remove(tb, &id);

    tb.ctr_ok(&["containers", "restore", "--live", "--rw", &id, &reference]);
    wait_for("restored task to run", || (task_status(tb, &id).as_deref() == Some("RUNNING")).then_some(()));
    assert_counter_continues(tb, &id, at_checkpoint);
    remove(tb, &id);

    // Without --live the container is only recreated from the image (with --rw: and its writable
    // layer, whose /tmp/counter holds at least `before`) and started fresh: the counter starts
    // again from 1 instead of continuing.
    tb.ctr_ok(&["containers", "restore", "--rw", &id, &reference]);
    wait_for("recreated task to run", || (task_status(tb, &id).as_deref() == Some("RUNNING")).then_some(()));
    let fresh = wait_for(&format!("counter of {id} to start again below {before}"), || {
        counter(tb, &id).filter(|&n| n < before)
    });
    wait_counter(tb, &id, fresh + 3);
    remove(tb, &id);
}

// ---------------------------------------------------------------------------------------------
// Checkpoints in the node's store and restore on create

#[test]
fn leave_running_vs_exit() {
    let bed = bed();
    let tb = &bed.tb;
    let id = unique_name("exit");
    run_counter(tb, &id, &[]);
    let (dir, _) = store_checkpoint(&bed, &id, false);
    assert!(dir.join("kybernate.json").is_file() && dir.join("checkpoint/inventory.img").is_file());
    assert_running(tb, &id, "after a leave-running checkpoint");

    let (dir2, _) = store_checkpoint(&bed, &id, true);
    assert!(dir2.join("kybernate.json").is_file());
    wait_for("the checkpointed container to stop", || {
        (task_status(tb, &id).as_deref() == Some("STOPPED")).then_some(())
    });
    tb.ctr_ok(&["tasks", "delete", &id]);
    tb.ctr_ok(&["containers", "delete", &id]);
}

#[test]
fn store_layout_is_root_only_and_checkpointctl_shaped() {
    let bed = bed();
    let tb = &bed.tb;
    let id = unique_name("layout");
    run_counter(tb, &id, &[]);
    let (dir, _) = store_checkpoint(&bed, &id, false);
    for d in [dir.as_path(), dir.parent().unwrap(), dir.parent().unwrap().parent().unwrap(), &dir.join("checkpoint")] {
        let mode = std::fs::metadata(d).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o700, "{} has mode {mode:o}", d.display());
    }
    for f in ["config.dump", "spec.dump", "stats-dump", "rootfs-diff.tar", "kybernate.json"] {
        assert!(dir.join(f).is_file(), "{f} missing in {}", dir.display());
    }
    let m: serde_json::Value = serde_json::from_slice(&std::fs::read(dir.join("kybernate.json")).unwrap()).unwrap();
    assert_eq!(m["container_id"], id.as_str());
    assert_eq!(m["namespace"], tb.namespace());
    assert!(m["criu"]["version"].as_str().unwrap().starts_with("4."), "{m}");
    assert!(m["runtime"]["version"].as_str().unwrap().contains("runc"), "{m}");
    assert!(m["files"]["checkpoint/inventory.img"]["blake3"].as_str().unwrap().len() == 64, "{m}");
    assert!(m["files"]["stats-dump"]["blake3"].as_str().unwrap().len() == 64, "{m}");
    assert_eq!((m["format_version"].as_u64(), m["digest"]["algorithm"].as_str()), (Some(2), Some("blake3")), "{m}");
    assert!(m["rootfs_diff"].as_bool().unwrap());
    // How long it was frozen (freeze to thaw), and CRIU's own account of the dump.
    let frozen = m["frozen_ms"].as_u64().expect("frozen_ms recorded");
    let criu_frozen = m["dump_stats"]["frozen_ms"].as_u64().expect("CRIU's frozen time recorded");
    assert!(criu_frozen <= frozen + 1, "CRIU's {criu_frozen} ms frozen lies within ours ({frozen} ms): {m}");
    assert!(m["dump_stats"]["pages_written"].as_u64().unwrap() > 0, "{m}");
    // Nothing but the finished checkpoint in the container's dir: no partial siblings.
    assert_eq!(entries(dir.parent().unwrap()), vec![dir.file_name().unwrap().to_string_lossy().into_owned()]);
    remove(tb, &id);
}

#[test]
fn restore_on_create_from_the_annotation() {
    let bed = bed();
    let tb = &bed.tb;
    let id = unique_name("anno");
    run_counter(tb, &id, &[]);
    let (dir, at_checkpoint) = store_checkpoint(&bed, &id, true);
    let restored = unique_name("anno-r");
    run_restored_ok(&bed, &dir, &restored, &[]);
    assert_counter_continues(tb, &restored, at_checkpoint);
    remove(tb, &restored);
    let _ = tb.ctr(&["tasks", "delete", &id]);
}

#[test]
fn restore_on_create_from_restore_from_env() {
    // RESTORE_FROM is off by default (any pod can set it): the node's admin opts in.
    let bed = bed_with(|b| b, "allow_env_restore = true\n");
    let tb = &bed.tb;
    let id = unique_name("env");
    run_counter(tb, &id, &[]);
    let (dir, at_checkpoint) = store_checkpoint(&bed, &id, false);
    let restored = unique_name("env-r");
    let env = format!("RESTORE_FROM={}", dir.display());
    tb.ctr_ok(&["run", "-d", "--runtime", RUNTIME, "--env", &env, IMAGE, &restored, "sleep", "1000"]);
    assert_counter_continues(tb, &restored, at_checkpoint);
    // The original kept running (leave-running) beside its restored copy.
    assert_running(tb, &id, "after its checkpoint was restored elsewhere");
    remove(tb, &restored);
    remove(tb, &id);
}

#[test]
fn open_tcp_connections_survive_checkpoint_and_restore() {
    let bed = bed();
    let tb = &bed.tb;
    let id = unique_name("tcp");
    // The containers join a named network namespace, as the containers of a Kubernetes pod join
    // the sandbox's: runc restores an anonymous one empty (loopback down), and CRIU cannot
    // reconnect TCP sockets there. runc treats a netns given by path as external on both sides.
    let netns = NetNs::new(&unique_name("net"));
    let with_ns = format!("network:{}", netns.path().display());
    // An HTTP server on loopback plus a client holding an established connection to it.
    let script = "mkdir -p /www && echo hello-from-httpd > /www/index.html && httpd -f -p 8080 -h /www & \
                  sleep 1; (sleep 100000 | nc 127.0.0.1 8080) & sleep 1; touch /tmp/connected; wait";
    tb.ctr_ok(&["run", "-d", "--runtime", RUNTIME, "--with-ns", &with_ns, IMAGE, &id, "sh", "-c", script]);
    let fetch = |cid: &str| {
        let exec_id = unique_name("wget");
        tb.ctr(&["tasks", "exec", "--exec-id", &exec_id, cid, "wget", "-qO-", "http://127.0.0.1:8080/index.html"])
    };
    wait_for("httpd to answer", || fetch(&id).status.success().then_some(()));
    wait_for("the client to connect", || bundle_dir(tb, &id).join("rootfs/tmp/connected").exists().then_some(()));
    let established = tb.ctr_ok(&["tasks", "exec", "--exec-id", &unique_name("ns"), &id, "netstat", "-tn"]);
    assert!(established.contains("ESTABLISHED"), "no established connection in the container:\n{established}");
    let target = store_path(&bed, &id);
    let without_tcp =
        checkpoint(tb, &id, CheckpointOptions { image_path: target.display().to_string(), ..Default::default() });
    let (_, message) = error_of(without_tcp);
    assert!(message.contains("--- from ") && message.contains("Error ("), "no CRIU log excerpt in: {message}");
    // The whole log stays in the bundle.
    let log = message.split("--- from ").nth(1).and_then(|r| r.split(" ---").next()).unwrap();
    assert!(log.starts_with(bundle_dir(tb, &id).to_str().unwrap()) && Path::new(log).is_file(), "{log}");
    assert!(!target.exists(), "a failed checkpoint left {}", target.display());
    assert!(fetch(&id).status.success(), "httpd stopped answering after a failed checkpoint");

    checkpoint(
        tb,
        &id,
        CheckpointOptions {
            open_tcp: true,
            exit: true,
            image_path: target.display().to_string(),
            ..Default::default()
        },
    )
    .expect("checkpoint with open TCP");
    wait_for("the checkpointed container to stop", || {
        (task_status(tb, &id).as_deref() == Some("STOPPED")).then_some(())
    });
    let restored = unique_name("tcp-r");
    let annotation = format!("kybernate.io/restore-from={}", target.display());
    tb.ctr_ok(&[
        "run",
        "-d",
        "--runtime",
        RUNTIME,
        "--with-ns",
        &with_ns,
        "--annotation",
        &annotation,
        IMAGE,
        &restored,
        "sleep",
        "1000",
    ]);
    let out = wait_for("restored httpd to answer", || Some(fetch(&restored)).filter(|o| o.status.success()));
    assert_eq!(text(&out.stdout).trim(), "hello-from-httpd");
    remove(tb, &restored);
}

/// A named network namespace with loopback up (`ip netns add`), deleted on drop.
struct NetNs(String);

impl NetNs {
    fn new(name: &str) -> Self {
        let ip = |args: &[&str]| {
            let st = std::process::Command::new("ip").args(args).status().expect("run ip");
            assert!(st.success(), "ip {args:?} failed");
        };
        ip(&["netns", "add", name]);
        let ns = NetNs(name.to_string());
        ip(&["-n", name, "link", "set", "lo", "up"]);
        ns
    }

    fn path(&self) -> PathBuf {
        Path::new("/var/run/netns").join(&self.0)
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

/// `ctr run -d -t ...` with a pseudo-terminal as ctr's stdin (`script`), as an SRE's shell has.
fn ctr_run_tty(tb: &Testbed, args: &[&str]) {
    let mut cmd = tb.ctr_command();
    let mut run = vec!["run", "-d", "-t"];
    run.extend_from_slice(args);
    cmd.args(tb.ctr_args(&run));
    let program = cmd.get_program().to_string_lossy().into_owned();
    let words: Vec<String> = std::iter::once(program)
        .chain(cmd.get_args().map(|a| a.to_string_lossy().into_owned()))
        .map(|w| format!("'{}'", w.replace('\'', "'\\''")))
        .collect();
    let out = std::process::Command::new("script")
        .args(["-qec", &words.join(" "), "/dev/null"])
        .envs(cmd.get_envs().filter_map(|(k, v)| v.map(|v| (k, v))))
        .stdin(std::process::Stdio::null())
        .output()
        .expect("run script");
    assert!(out.status.success(), "ctr run -t {args:?} failed: {}{}", text(&out.stdout), text(&out.stderr));
}

#[test]
fn a_tty_container_is_checkpointed_as_a_shell_job_and_restored() {
    let bed = bed();
    let tb = &bed.tb;
    let id = unique_name("tty");
    ctr_run_tty(tb, &["--runtime", RUNTIME, IMAGE, &id, "sh", "-c", COUNTER]);
    // No options: the shim knows the container has a terminal and asks for a shell job itself.
    let (dir, at_checkpoint) = store_checkpoint(&bed, &id, true);
    let m: serde_json::Value = serde_json::from_slice(&std::fs::read(dir.join("kybernate.json")).unwrap()).unwrap();
    assert_eq!(m["options"]["terminal"], true, "{m}");
    let restored = unique_name("tty-r");
    ctr_run_tty(
        tb,
        &["--runtime", RUNTIME, "--annotation", &annotation(dir.to_str().unwrap()), IMAGE, &restored, "sleep", "1000"],
    );
    assert_counter_continues(tb, &restored, at_checkpoint);
    remove(tb, &restored);
    let _ = tb.ctr(&["tasks", "delete", &id]);
}

// ---------------------------------------------------------------------------------------------
// Faults: each leaves the container running and no partial checkpoint visible

#[test]
fn criu_missing_is_a_clear_error() {
    // containerd's PATH without /usr/local/sbin, where the test bed's CRIU lives.
    let path = format!("{}:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", shim_dir().display());
    let bed = bed_with(|b| b.env("PATH", &path), "");
    let tb = &bed.tb;
    let id = unique_name("nocriu");
    run_counter(tb, &id, &[]);
    wait_counter(tb, &id, 3);
    let target = store_path(&bed, &id);
    let r = checkpoint(tb, &id, CheckpointOptions { image_path: target.display().to_string(), ..Default::default() });
    let (code, message) = error_of(r);
    assert_eq!(code, Code::FAILED_PRECONDITION, "{message}");
    assert!(message.contains("criu") && message.contains("not found"), "{message}");
    assert!(!target.exists() && entries(target.parent().unwrap()).is_empty(), "partial checkpoint left");
    assert_running(tb, &id, "after a checkpoint without CRIU");
    remove(tb, &id);
}

#[test]
fn checkpoint_onto_a_full_filesystem_is_refused_before_freezing() {
    let bed = bed();
    let tb = &bed.tb;
    let id = unique_name("full");
    let mnt = tb.dir().join("tiny");
    std::fs::create_dir_all(&mnt).unwrap();
    nix::mount::mount(Some("tmpfs"), &mnt, Some("tmpfs"), nix::mount::MsFlags::empty(), Some("size=1m,mode=0700"))
        .expect("mount a tiny tmpfs");
    struct Unmount(PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = nix::mount::umount2(&self.0, nix::mount::MntFlags::MNT_DETACH);
        }
    }
    let _unmount = Unmount(mnt.clone());
    let _ = std::fs::write(mnt.join("filler"), vec![0u8; 2 << 20]);
    run_counter(tb, &id, &[]);
    wait_counter(tb, &id, 3);
    let target = mnt.join("cp");
    let (code, message) = error_of(checkpoint(
        tb,
        &id,
        CheckpointOptions { image_path: target.display().to_string(), ..Default::default() },
    ));
    assert_eq!(code, Code::FAILED_PRECONDITION, "{message}");
    assert!(message.contains("not enough free space"), "{message}");
    assert_eq!(entries(&mnt), vec!["filler".to_string()], "partial checkpoint left on the full filesystem");
    assert_running(tb, &id, "after a refused checkpoint");
    remove(tb, &id);
}

/// A counter container whose rootfs holds `mib` MiB of file changes (`/tmp/big`) before it counts:
/// its checkpoints carry them in their rootfs diff, and the size estimate counts them.
fn run_counter_with_changes(tb: &Testbed, id: &str, mib: u32) {
    let command = format!("dd if=/dev/zero of=/tmp/big bs=1M count={mib} 2>/dev/null; {COUNTER}");
    tb.ctr_ok(&["run", "-d", "--runtime", RUNTIME, IMAGE, id, "sh", "-c", &command]);
}

/// The node's retention limits: with `keep = 2`, three checkpoints of one container leave the
/// newest two (nothing half-removed beside them); a checkpoint that `max_bytes` has no room for,
/// even after pruning, is refused before anything is frozen, with the numbers, and removes nothing.
#[test]
fn retention_keeps_the_newest_and_refuses_what_cannot_fit_before_freezing() {
    let bed = bed_with(|b| b, "keep = 2\nmax_bytes = \"24MiB\"\n");
    let tb = &bed.tb;
    let store = kybernate_checkpoint::Store::new(&bed.store);
    let into = |id: &str| {
        let target = store.new_checkpoint_path(tb.namespace(), id, std::time::SystemTime::now()).unwrap();
        (target.clone(), CheckpointOptions { image_path: target.display().to_string(), ..Default::default() })
    };
    // Each checkpoint of `a` holds about 8 MiB: two fit, and the third replaces the oldest.
    let a = unique_name("keep");
    run_counter_with_changes(tb, &a, 8);
    wait_counter(tb, &a, 3);
    let mut taken = Vec::new();
    for _ in 0..3 {
        let (target, o) = into(&a);
        checkpoint(tb, &a, o).unwrap_or_else(|e| panic!("checkpoint of {a}: {e}"));
        taken.push(target.file_name().unwrap().to_string_lossy().into_owned());
    }
    let a_dir = bed.store.join(tb.namespace()).join(&a);
    let mut left = entries(&a_dir);
    left.sort();
    assert_eq!(left, taken[1..], "keep = 2 leaves the newest two");

    // `b` would bring about 20 MiB: alone it would fit, but a's newest checkpoint stays.
    let b = unique_name("big");
    run_counter_with_changes(tb, &b, 20);
    wait_counter(tb, &b, 3);
    let (target, o) = into(&b);
    let (code, message) = error_of(checkpoint(tb, &b, o));
    assert_eq!(code, Code::FAILED_PRECONDITION, "{message}");
    for part in [
        &format!("checkpoint {b}: refused, nothing was frozen: the checkpoint (about 2"),
        "max_bytes is 24.0 MiB (25165824 bytes), the store holds ",
        "and pruning could free ",
    ] {
        assert!(message.contains(part), "{part:?} in {message}");
    }
    assert!(!target.parent().unwrap().exists(), "the refused checkpoint wrote something");
    assert_eq!(entries(&a_dir).len(), 2, "a refused checkpoint prunes nothing");
    assert_running(tb, &b, "after a refused checkpoint");
    // Never frozen: its journal entry has no freeze and no frozen time.
    let journal = std::fs::read_to_string(bed.store.join(".journal/attempts.jsonl")).unwrap();
    let attempt: serde_json::Value = journal
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .rfind(|v| v["container"] == b.as_str())
        .expect("b's attempt in the journal");
    assert_eq!(attempt["error_class"], "retention", "{attempt}");
    assert!(attempt.get("frozen_ms").is_none() && attempt["phases_ms"].get("freeze").is_none(), "{attempt}");
    remove(tb, &b);
    remove(tb, &a);
}

/// A dir holding a `criu` that sleeps `secs` before each dump (runc runs `criu swrk`), then execs
/// the real one: put it first on the test bed's PATH.
fn slow_criu(secs: u32) -> tempfile::TempDir {
    let wrappers = kybernate_testbed::scratch_dir().unwrap();
    let wrapper = wrappers.path().join("criu");
    let script = format!("#!/bin/sh\n[ \"$1\" = swrk ] && sleep {secs}\nexec {} \"$@\"\n", kybernate_testbed::CRIU);
    std::fs::write(&wrapper, script).unwrap();
    std::fs::set_permissions(&wrapper, std::fs::Permissions::from_mode(0o755)).unwrap();
    wrappers
}

#[test]
fn a_grouped_container_answers_while_its_neighbour_checkpoints() {
    // A slow CRIU: 3 s before the real dump starts.
    let wrappers = slow_criu(3);
    let bed = bed_with(|b| b.path_prepend(wrappers.path()), "");
    let tb = &bed.tb;
    let group = format!("io.containerd.runc.v2.group={}", unique_name("pod"));
    let (a, b) = (unique_name("grp-a"), unique_name("grp-b"));
    run_counter(tb, &a, &["--annotation", &group]);
    tb.ctr_ok(&["run", "-d", "--runtime", RUNTIME, "--annotation", &group, IMAGE, &b, "sleep", "1000"]);
    assert_eq!(
        std::fs::read_to_string(bundle_dir(tb, &a).join("address")).unwrap(),
        std::fs::read_to_string(bundle_dir(tb, &b).join("address")).unwrap(),
        "the two containers do not share a shim"
    );
    wait_counter(tb, &a, 3);
    let target = store_path(&bed, &a);
    let o = CheckpointOptions { image_path: target.display().to_string(), ..Default::default() };
    let dumping = checkpoint_in_background(tb, &a, o);
    std::thread::sleep(Duration::from_millis(500));
    // While A's checkpoint runs: B answers, is killed, and its exit is reported.
    assert_eq!(shim_status(tb, &b), Some(Status::RUNNING));
    tb.ctr_ok(&["tasks", "kill", "-s", "SIGKILL", &b]);
    wait_for("B's exit to be reported", || (task_status(tb, &b).as_deref() == Some("STOPPED")).then_some(()));
    assert!(!dumping.is_finished(), "the checkpoint finished before B's exit was seen: the test proves nothing");
    dumping.join().unwrap().expect("checkpoint of A");
    tb.ctr_ok(&["tasks", "delete", &b]);
    tb.ctr_ok(&["containers", "delete", &b]);
    remove(tb, &a);
}

#[test]
fn exit_stops_the_container_only_once_its_checkpoint_is_safe() {
    // A slow CRIU (2 s before the dump), so the test can get in the way of the commit.
    let wrappers = slow_criu(2);
    let bed = bed_with(|b| b.path_prepend(wrappers.path()), "");
    let tb = &bed.tb;
    let id = unique_name("safe");
    run_counter(tb, &id, &[]);
    wait_counter(tb, &id, 3);
    let target = store_path(&bed, &id);
    let o = CheckpointOptions { exit: true, image_path: target.display().to_string(), ..Default::default() };
    let dumping = checkpoint_in_background(tb, &id, o);
    // While CRIU is slow to start, something else takes the target: the dump succeeds, the
    // commit cannot, and the container asked to exit must not have been killed.
    std::thread::sleep(Duration::from_millis(500));
    std::fs::create_dir_all(&target).unwrap();
    std::fs::write(target.join("someone-elses"), b"x").unwrap();
    let (_, message) = error_of(dumping.join().unwrap());
    assert!(message.contains("already exists"), "{message}");
    assert_eq!(entries(&target), vec!["someone-elses".to_string()]);
    assert_eq!(entries(target.parent().unwrap()), vec![target.file_name().unwrap().to_string_lossy().into_owned()]);
    assert_running(tb, &id, "after a checkpoint with exit whose commit failed");

    // Without interference the same request checkpoints and then stops the container.
    let (_, _) = store_checkpoint(&bed, &id, true);
    wait_for("the checkpointed container to stop", || {
        (task_status(tb, &id).as_deref() == Some("STOPPED")).then_some(())
    });
    tb.ctr_ok(&["tasks", "delete", &id]);
    tb.ctr_ok(&["containers", "delete", &id]);
}

// ---------------------------------------------------------------------------------------------
// Bad input: each a clear error, and nothing left behind

/// Tries to restore `reference` into a new container; returns ctr's error output.
fn failed_restore(bed: &Bed, extra: &[&str]) -> String {
    let tb = &bed.tb;
    let id = unique_name("bad");
    let mut args = vec!["run", "-d", "--runtime", RUNTIME];
    args.extend_from_slice(extra);
    args.extend_from_slice(&[IMAGE, &id, "sleep", "1000"]);
    let out = tb.ctr(&args);
    assert!(!out.status.success(), "restore of {extra:?} succeeded");
    let _ = tb.ctr(&["containers", "delete", &id]);
    assert!(!runc_state_entries(tb).contains(&id), "runtime state left for {id}");
    assert!(!bundle_dir(tb, &id).join("rootfs").exists() || !is_mountpoint(&bundle_dir(tb, &id).join("rootfs")));
    text(&out.stderr)
}

fn is_mountpoint(p: &Path) -> bool {
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    mounts.lines().any(|l| l.split(' ').nth(4) == Some(p.to_str().unwrap_or_default()))
}

fn annotation(dir: &str) -> String {
    format!("kybernate.io/restore-from={dir}")
}

#[test]
fn tampered_truncated_foreign_and_escaping_checkpoints_are_refused() {
    // RESTORE_FROM too, below: the node allows it.
    let bed = bed_with(|b| b, "allow_env_restore = true\n");
    let tb = &bed.tb;
    let id = unique_name("src");
    run_counter(tb, &id, &[]);
    let (dir, _) = store_checkpoint(&bed, &id, false);
    remove(tb, &id);
    let copy = |name: &str| {
        let to = dir.parent().unwrap().join(name);
        let status = std::process::Command::new("cp").arg("-a").arg(&dir).arg(&to).status().unwrap();
        assert!(status.success());
        to
    };

    // A flipped byte in a CRIU image.
    let corrupt = copy("corrupt");
    let pages = std::fs::read_dir(corrupt.join("checkpoint"))
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .find(|p| p.file_name().unwrap().to_string_lossy().starts_with("pages-"))
        .expect("a pages image");
    let mut bytes = std::fs::read(&pages).unwrap();
    bytes[0] ^= 0xff;
    std::fs::write(&pages, bytes).unwrap();
    let err = failed_restore(&bed, &["--annotation", &annotation(corrupt.to_str().unwrap())]);
    assert!(err.contains(pages.file_name().unwrap().to_str().unwrap()) && err.contains("checksum"), "{err}");

    // A truncated manifest.
    let truncated = copy("truncated");
    let manifest = std::fs::read(truncated.join("kybernate.json")).unwrap();
    std::fs::write(truncated.join("kybernate.json"), &manifest[..manifest.len() / 2]).unwrap();
    let err = failed_restore(&bed, &["--annotation", &annotation(truncated.to_str().unwrap())]);
    assert!(err.contains("kybernate.json"), "{err}");

    // Outside the store: `../` and a symlink pointing out.
    let outside = tb.dir().join("outside");
    std::process::Command::new("cp").arg("-a").arg(&dir).arg(&outside).status().unwrap();
    let err = failed_restore(&bed, &["--annotation", &annotation(&format!("{}/../outside", bed.store.display()))]);
    assert!(err.contains("outside"), "{err}");
    let link = dir.parent().unwrap().join("link");
    std::os::unix::fs::symlink(&outside, &link).unwrap();
    let err = failed_restore(&bed, &["--annotation", &annotation(link.to_str().unwrap())]);
    assert!(err.contains("outside"), "{err}");
    let err = failed_restore(&bed, &["--env", &format!("RESTORE_FROM={}", outside.display())]);
    assert!(err.contains("outside"), "{err}");

    // Another tenant's checkpoint under the default policy.
    let err = failed_restore(
        &bed,
        &["--annotation", &annotation(dir.to_str().unwrap()), "--annotation", "io.kubernetes.pod.namespace=team-b"],
    );
    assert!(err.contains("team-b") && err.contains("allow_cross_namespace_restore"), "{err}");

    // A checkpoint whose runtime binary is gone.
    let gone = copy("gone");
    let mut m: serde_json::Value =
        serde_json::from_slice(&std::fs::read(gone.join("kybernate.json")).unwrap()).unwrap();
    m["runtime"]["path"] = "/nonexistent/bin/runc".into();
    std::fs::write(gone.join("kybernate.json"), serde_json::to_vec(&m).unwrap()).unwrap();
    let err = failed_restore(&bed, &["--annotation", &annotation(gone.to_str().unwrap())]);
    assert!(err.contains("/nonexistent/bin/runc"), "{err}");

    // A name that is not there.
    let err = failed_restore(&bed, &["--annotation", &annotation("no/such/checkpoint")]);
    assert!(err.contains("no/such/checkpoint"), "{err}");
}

#[test]
fn cross_namespace_restore_is_allowed_when_configured() {
    let bed = bed_with(|b| b, "allow_cross_namespace_restore = true\n");
    let tb = &bed.tb;
    let id = unique_name("xns");
    run_counter(tb, &id, &[]);
    let (dir, at_checkpoint) = store_checkpoint(&bed, &id, true);
    let restored = unique_name("xns-r");
    let a = annotation(dir.to_str().unwrap());
    tb.ctr_ok(&[
        "run",
        "-d",
        "--runtime",
        RUNTIME,
        "--annotation",
        &a,
        "--annotation",
        "io.kubernetes.pod.namespace=team-b",
        IMAGE,
        &restored,
        "sleep",
        "1000",
    ]);
    assert_counter_continues(tb, &restored, at_checkpoint);
    remove(tb, &restored);
}

#[test]
fn a_failed_restore_is_reported_and_the_container_can_be_removed() {
    let bed = bed();
    let tb = &bed.tb;
    let id = unique_name("src2");
    run_counter(tb, &id, &[]);
    let (dir, _) = store_checkpoint(&bed, &id, true);
    // A checkpoint that verifies (its manifest no longer lists mm-1.img) and passes the credentials
    // check (which never reads memory images) but that CRIU cannot restore.
    std::fs::remove_file(dir.join("checkpoint/mm-1.img")).unwrap();
    let mut m: serde_json::Value = serde_json::from_slice(&std::fs::read(dir.join("kybernate.json")).unwrap()).unwrap();
    m["files"].as_object_mut().unwrap().remove("checkpoint/mm-1.img");
    std::fs::write(dir.join("kybernate.json"), serde_json::to_vec(&m).unwrap()).unwrap();

    let restored = unique_name("broken");
    let a = annotation(dir.to_str().unwrap());
    let out = tb.ctr(&["run", "-d", "--runtime", RUNTIME, "--annotation", &a, IMAGE, &restored, "sleep", "1000"]);
    assert!(!out.status.success(), "restore of a checkpoint without mm-1.img succeeded");
    let err = text(&out.stderr);
    assert!(err.contains("restore") && err.contains("restore.log"), "{err}");
    // ctr's own cleanup path: kill (nothing runs), wait, delete. None of it may hang.
    tb.ctr_ok(&["tasks", "delete", "--force", &restored]);
    tb.ctr_ok(&["containers", "delete", &restored]);
    assert!(!runc_state_entries(tb).contains(&restored), "runtime state left behind");
    assert!(!is_mountpoint(&bundle_dir(tb, &restored).join("rootfs")), "rootfs left mounted");
    let _ = tb.ctr(&["tasks", "delete", &id]);
}
