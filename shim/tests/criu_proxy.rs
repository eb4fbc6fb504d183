//! A restore through the shim's CRIU proxy (shim/src/criu_proxy.rs) with real containerd, runc
//! and CRIU: the memory pages are verified while CRIU restores, and the restored process is held
//! at CRIU's post-restore until they are. A good checkpoint counts on; one whose pages image has
//! a changed byte (same size, so Create's synchronous checks pass) is stopped before its process
//! runs a single instruction, with the file named, and nothing of it is left.

use std::path::{Path, PathBuf};
use std::time::Duration;

mod common;

use common::ckpt::*;
use common::{bundle_dir, runc_state_entries, task_status, text, wait_for};
use kybernate_testbed::unique_name;

/// The largest `pages-*.img` of a checkpoint.
fn pages_of(dir: &Path) -> PathBuf {
    std::fs::read_dir(dir.join("checkpoint"))
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.file_name().unwrap().to_string_lossy().starts_with("pages-"))
        .max_by_key(|p| p.metadata().unwrap().len())
        .expect("a pages image")
}

#[test]
fn the_restore_is_held_until_its_pages_verify_and_stopped_when_they_do_not() {
    let bed = bed();
    let tb = &bed.tb;
    let id = unique_name("held");
    run_counter(tb, &id, &[]);
    let (dir, at_checkpoint) = store_checkpoint(&bed, &id, true);
    wait_for("the checkpointed container to stop", || {
        (task_status(tb, &id).as_deref() == Some("STOPPED")).then_some(())
    });
    tb.ctr_ok(&["tasks", "delete", &id]);
    tb.ctr_ok(&["containers", "delete", &id]);

    // A copy with one byte of its memory changed, in the middle of the largest pages image.
    let corrupt = dir.parent().unwrap().join("corrupt");
    assert!(std::process::Command::new("cp").arg("-a").arg(&dir).arg(&corrupt).status().unwrap().success());
    let pages = pages_of(&corrupt);
    let mut bytes = std::fs::read(&pages).unwrap();
    let at = bytes.len() / 2;
    bytes[at] ^= 0xff;
    std::fs::write(&pages, &bytes).unwrap();

    // The good one: restored through the proxy, held until verified, counting on.
    let good = unique_name("held-ok");
    run_restored_ok(&bed, &dir, &good, &[]);
    assert_counter_continues(tb, &good, at_checkpoint);
    let log = std::fs::read_to_string(tb.log_path()).unwrap_or_default();
    assert!(log.contains(&format!("restore {good}: held at CRIU's post-restore")), "the restore was not held");
    remove(tb, &good);

    // The changed one: Create passes (its pages are hashed in the background), the restore is
    // stopped at the hold, and the error names the file and says the process never ran.
    let bad = unique_name("held-bad");
    let out = run_restored(&bed, &corrupt, &bad, &[]);
    assert!(!out.status.success(), "the restore of a changed checkpoint succeeded");
    let message = text(&out.stderr);
    eprintln!("the client's error: {message}");
    let name = pages.file_name().unwrap().to_str().unwrap();
    for part in [name, "checksum mismatch", "stopped before the restored process ran"] {
        assert!(message.contains(part), "the error does not say {part:?}: {message}");
    }
    // It was the proxy's hold that stopped it (CRIU aborted at post-restore), not anything before.
    let log = std::fs::read_to_string(tb.log_path()).unwrap_or_default();
    assert!(log.contains("criu proxy: restore stopped before the restored process ran"), "the proxy did not stop it");
    // Its process never ran: the counter its rootfs diff brought back does not move, no task
    // runs, and the runtime keeps no state of it.
    let restored_file = counter(tb, &bad);
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(counter(tb, &bad), restored_file, "the refused container's counter moved: its process ran");
    assert_ne!(task_status(tb, &bad).as_deref(), Some("RUNNING"));
    assert!(!runc_state_entries(tb).contains(&bad), "runtime state left for {bad}");
    // The client removes the task ctr created and the container: nothing is left.
    let _ = tb.ctr(&["tasks", "delete", &bad]);
    tb.ctr_ok(&["containers", "delete", &bad]);
    assert!(!bundle_dir(tb, &bad).exists(), "the bundle of {bad} is left");
    let bundles = bundle_dir(tb, &bad).parent().map(|d| d.to_path_buf()).unwrap();
    let left = std::fs::read_dir(&bundles).map(|d| d.count()).unwrap_or(0);
    assert_eq!(left, 0, "bundles left in {}", bundles.display());
}

/// The proxy started as runc starts CRIU (`<binary> swrk 3`, fd 3 its end of a SOCK_SEQPACKET
/// pair) with `env`: sends `request` and returns (exit code, what came back, whether the real CRIU
/// was started).
fn proxy_run(env: &[(&str, &str)], request: &[u8]) -> (i32, Vec<u8>, bool) {
    use std::io::{IoSlice, IoSliceMut};
    use std::os::fd::AsRawFd;
    use std::os::unix::process::CommandExt;

    use nix::sys::socket::{recvmsg, sendmsg, socketpair, AddressFamily, MsgFlags, SockFlag, SockType};

    let dir = tempfile::tempdir().unwrap();
    let marker = dir.path().join("criu-ran");
    let criu = dir.path().join("criu");
    std::fs::write(&criu, format!("#!/bin/sh\ntouch {}\nsleep 0.5\n", marker.display())).unwrap();
    std::fs::set_permissions(&criu, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let (ours, theirs) = socketpair(AddressFamily::Unix, SockType::SeqPacket, None, SockFlag::SOCK_CLOEXEC).unwrap();
    let mut cmd = std::process::Command::new(common::SHIM);
    cmd.args(["swrk", "3"]).env_clear().env("KYBERNATE_CRIU_PROXY_LOG", dir.path().join("log"));
    for (k, v) in env {
        let v = v.replace("{criu}", criu.to_str().unwrap());
        cmd.env(k, v);
    }
    let fd = theirs.as_raw_fd();
    // SAFETY: dup2 only, between fork and exec.
    unsafe {
        cmd.pre_exec(move || if libc::dup2(fd, 3) < 0 { Err(std::io::Error::last_os_error()) } else { Ok(()) });
    }
    let mut child = cmd.spawn().unwrap();
    drop(theirs);
    let _ = sendmsg::<()>(ours.as_raw_fd(), &[IoSlice::new(request)], &[], MsgFlags::MSG_NOSIGNAL, None);
    let mut buf = vec![0u8; 65536];
    let n = {
        let mut iov = [IoSliceMut::new(&mut buf)];
        recvmsg::<()>(ours.as_raw_fd(), &mut iov, None, MsgFlags::empty()).map(|m| m.bytes).unwrap_or(0)
    };
    buf.truncate(n);
    let code = child.wait().unwrap().code().unwrap_or(-1);
    (code, buf, marker.exists())
}

#[test]
fn a_proxy_not_started_by_the_shim_or_a_restore_it_cannot_hold_is_refused_before_criu_starts() {
    // criu_req { type: RESTORE, opts { images_dir_fd: 1, notify_scripts } }, and without them.
    let restore = [0x08, 0x02, 0x12, 0x04, 0x08, 0x01, 0x60, 0x01];
    let unheld = [0x08, 0x02, 0x12, 0x02, 0x08, 0x01];

    // No real CRIU named: not started by the shim.
    let (code, answer, ran) = proxy_run(&[], &restore);
    assert_eq!((code, answer.len(), ran), (1, 0, false));

    // No verdict socket: nobody verifies this restore.
    let (code, answer, ran) = proxy_run(&[("KYBERNATE_CRIU_PROXY_CRIU", "{criu}")], &restore);
    let text = String::from_utf8_lossy(&answer);
    assert_eq!((code, ran), (1, false));
    assert!(answer.starts_with(&[0x08, 0x02, 0x10, 0x00]) && text.contains("nobody verifies"), "{text}");

    // A restore without notifications could not be held.
    let env = [("KYBERNATE_CRIU_PROXY_CRIU", "{criu}"), ("KYBERNATE_CRIU_PROXY_VERDICT", "/nonexistent/v.sock")];
    let (code, answer, ran) = proxy_run(&env, &unheld);
    let text = String::from_utf8_lossy(&answer);
    assert_eq!((code, ran), (1, false));
    assert!(answer.starts_with(&[0x08, 0x02, 0x10, 0x00]) && text.contains("no CRIU notifications"), "{text}");

    // Any other session is relayed to the real CRIU (here a script that ends without a word).
    let (code, _, ran) = proxy_run(&env, &[0x08, 10]);
    assert_eq!((code, ran), (0, true));
}
