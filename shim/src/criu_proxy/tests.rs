//! The relay against a fake runc and a fake CRIU (socketpairs), and the verdict socket.

use std::os::fd::{AsFd, OwnedFd};
use std::sync::mpsc;
use std::sync::Mutex;
use std::thread::JoinHandle;

use kybernate_checkpoint::VerifyError;

use super::*;

fn seqpacket() -> (OwnedFd, OwnedFd) {
    socketpair(AddressFamily::Unix, SockType::SeqPacket, None, SockFlag::SOCK_CLOEXEC).unwrap()
}

/// `criu_req { type, opts { images_dir_fd, notify_scripts } }` as runc encodes it.
fn request(kind: u64, images_dir_fd: i64, notify_scripts: bool) -> Vec<u8> {
    let mut opts = vec![0x08];
    put_varint(&mut opts, images_dir_fd as u64);
    if notify_scripts {
        opts.extend([0x60, 0x01]); // field 12, varint
    }
    let mut out = vec![0x08];
    put_varint(&mut out, kind);
    out.push(0x12);
    put_varint(&mut out, opts.len() as u64);
    out.extend(opts);
    out
}

/// `criu_resp { type: NOTIFY, success: true, notify { script, pid } }` as CRIU sends it.
fn notification(script: &str, pid: u64) -> Vec<u8> {
    let mut notify = vec![0x0a, script.len() as u8];
    notify.extend(script.as_bytes());
    notify.push(0x10);
    put_varint(&mut notify, pid);
    let mut out = vec![0x08, NOTIFY as u8, 0x10, 0x01, 0x2a, notify.len() as u8];
    out.extend(notify);
    out
}

/// `criu_resp { type: RESTORE, success, restore { pid } }`.
fn restore_answer(success: bool, pid: u64) -> Vec<u8> {
    let mut restore = vec![0x08];
    put_varint(&mut restore, pid);
    let mut out = vec![0x08, RESTORE as u8, 0x10, u8::from(success), 0x22, restore.len() as u8];
    out.extend(restore);
    out
}

fn msg(data: Vec<u8>) -> Message {
    Message { data, fds: vec![] }
}

fn got(fd: &OwnedFd) -> Message {
    recv(fd.as_fd()).unwrap().expect("a message, not end of file")
}

/// Nothing arrives on `fd` within 300 ms.
fn silent(fd: &OwnedFd) -> bool {
    let mut p = [PollFd::new(fd.as_fd(), PollFlags::POLLIN)];
    poll(&mut p, PollTimeout::from(300u16)).unwrap() == 0
}

/// A gate that answers what the test sends it, and counts the questions.
struct Scripted {
    answers: Mutex<mpsc::Receiver<Result<(), String>>>,
    asked: Mutex<usize>,
}

impl Gate for Scripted {
    fn verdict(&self) -> Result<(), String> {
        *self.asked.lock().unwrap() += 1;
        self.answers.lock().unwrap().recv().unwrap_or_else(|_| Err("the test went away".into()))
    }
}

/// A relay on its own thread between a fake runc and a fake CRIU; the test holds their ends.
struct Session {
    runc: OwnedFd,
    criu: OwnedFd,
    answer: mpsc::Sender<Result<(), String>>,
    gate: Arc<Scripted>,
    relay: JoinHandle<Result<Outcome, ProxyError>>,
}

fn session(first: Vec<u8>) -> Session {
    let (runc, runc_proxy) = seqpacket();
    let (criu_proxy, criu) = seqpacket();
    let (answer, answers) = mpsc::channel();
    let gate = Arc::new(Scripted { answers: Mutex::new(answers), asked: Mutex::new(0) });
    let g = gate.clone();
    let relay = std::thread::spawn(move || relay(runc_proxy.as_fd(), criu_proxy.as_fd(), msg(first), g.as_ref()));
    Session { runc, criu, answer, gate, relay }
}

impl Session {
    fn asked(&self) -> usize {
        *self.gate.asked.lock().unwrap()
    }

    fn end(self) -> Result<Outcome, ProxyError> {
        drop(self.criu);
        self.relay.join().unwrap()
    }
}

#[test]
fn a_session_that_is_no_restore_is_relayed_unchanged_both_ways() {
    let version = vec![0x08, 10];
    let s = session(version.clone());
    assert_eq!(got(&s.criu).data, version);
    let answer = vec![0x08, 10, 0x10, 0x01, 0x52, 0x04, 0x08, 0x04, 0x10, 0x02];
    send_data(s.criu.as_fd(), answer.clone()).unwrap();
    assert_eq!(got(&s.runc).data, answer);
    // runc closing its side reaches CRIU as end of file.
    shutdown(s.runc.as_raw_fd(), Shutdown::Write).unwrap();
    assert!(recv(s.criu.as_fd()).unwrap().is_none());
    assert_eq!(s.asked(), 0);
    assert_eq!(s.end().unwrap(), Outcome::Done);
}

#[test]
fn a_restore_is_held_at_post_restore_until_verified_and_fds_pass_both_ways() {
    let first = request(RESTORE, 7, true);
    let s = session(first.clone());
    assert_eq!(got(&s.criu).data, first);

    // A notification before the hold goes straight through, and so does runc's answer.
    send_data(s.criu.as_fd(), notification("setup-namespaces", 4242)).unwrap();
    assert_eq!(got(&s.runc).data, notification("setup-namespaces", 4242));
    send_data(s.runc.as_fd(), notify_answer(true)).unwrap();
    assert_eq!(got(&s.criu).data, notify_answer(true));

    // orphan-pts-master carries a descriptor: runc gets a working copy.
    let (r, w) = nix::unistd::pipe().unwrap();
    send(s.criu.as_fd(), &Message { data: notification("orphan-pts-master", 0), fds: vec![r] }).unwrap();
    let m = got(&s.runc);
    assert_eq!(m.data, notification("orphan-pts-master", 0));
    assert_eq!(m.fds.len(), 1);
    nix::unistd::write(&w, b"pty").unwrap();
    let mut buf = [0u8; 3];
    nix::unistd::read(&m.fds[0], &mut buf).unwrap();
    assert_eq!(&buf, b"pty");
    send_data(s.runc.as_fd(), notify_answer(true)).unwrap();
    assert_eq!(got(&s.criu).data, notify_answer(true));

    // post-restore waits for the verdict: runc hears nothing meanwhile.
    send_data(s.criu.as_fd(), notification(POST_RESTORE, 4242)).unwrap();
    assert!(silent(&s.runc), "post-restore passed before the verdict");
    assert_eq!(s.asked(), 1);
    s.answer.send(Ok(())).unwrap();
    assert_eq!(got(&s.runc).data, notification(POST_RESTORE, 4242));
    send_data(s.runc.as_fd(), notify_answer(true)).unwrap();
    assert_eq!(got(&s.criu).data, notify_answer(true));
    send_data(s.criu.as_fd(), notification("pre-resume", 4242)).unwrap();
    assert_eq!(got(&s.runc).data, notification("pre-resume", 4242));
    send_data(s.criu.as_fd(), restore_answer(true, 4242)).unwrap();
    assert_eq!(got(&s.runc).data, restore_answer(true, 4242));
    assert_eq!(s.asked(), 1, "asked once");
    assert_eq!(s.end().unwrap(), Outcome::Done);
}

#[test]
fn a_failed_verdict_fails_post_restore_and_runc_never_hears_of_it() {
    let s = session(request(RESTORE, 7, true));
    got(&s.criu);
    send_data(s.criu.as_fd(), notification(POST_RESTORE, 4242)).unwrap();
    s.answer.send(Err("/s/checkpoint/pages-1.img: checksum mismatch".into())).unwrap();
    // CRIU gets a failed answer (it aborts and kills what it restored) ...
    assert_eq!(got(&s.criu).data, notify_answer(false));
    assert!(silent(&s.runc), "runc heard of the post-restore");
    // ... and a later notification fails too, without runc.
    send_data(s.criu.as_fd(), notification("network-unlock", 0)).unwrap();
    assert_eq!(got(&s.criu).data, notify_answer(false));
    // CRIU's failed RESTORE answer is what runc gets.
    send_data(s.criu.as_fd(), restore_answer(false, 0)).unwrap();
    assert_eq!(got(&s.runc).data, restore_answer(false, 0));
    assert_eq!(s.end().unwrap(), Outcome::Refused("/s/checkpoint/pages-1.img: checksum mismatch".into()));
}

#[test]
fn a_restore_answer_without_a_hold_waits_for_the_verdict_and_a_bad_one_fails_it() {
    let s = session(request(RESTORE, 7, true));
    got(&s.criu);
    // pid 0 is never signalled (kill_tree skips it).
    send_data(s.criu.as_fd(), restore_answer(true, 0)).unwrap();
    assert!(silent(&s.runc));
    s.answer.send(Err("pages-2.img: size is 1 bytes".into())).unwrap();
    let m = got(&s.runc);
    let r = parse_response(&m.data).unwrap();
    assert_eq!((r.kind, r.success), (RESTORE, false));
    assert!(String::from_utf8_lossy(&m.data).contains("pages-2.img"), "{:?}", m.data);
    assert!(matches!(s.end().unwrap(), Outcome::Refused(_)));

    let s = session(request(RESTORE, 7, true));
    got(&s.criu);
    send_data(s.criu.as_fd(), restore_answer(true, 0)).unwrap();
    s.answer.send(Ok(())).unwrap();
    assert_eq!(got(&s.runc).data, restore_answer(true, 0));
    assert_eq!(s.end().unwrap(), Outcome::Done);
}

#[test]
fn garbage_or_oversize_from_criu_during_a_restore_ends_the_relay() {
    let s = session(request(RESTORE, 7, true));
    got(&s.criu);
    send_data(s.criu.as_fd(), vec![0x0b, 0xff]).unwrap(); // wire type 3: a group
    let e = s.relay.join().unwrap().unwrap_err();
    assert!(e.to_string().contains("unreadable message from CRIU"), "{e}");
    // runc gets no message, only the end of the relay (the proxy then fails the restore).
    assert!(recv(s.runc.as_fd()).unwrap().is_none());

    let s = session(request(RESTORE, 7, true));
    got(&s.criu);
    send_data(s.criu.as_fd(), vec![0u8; MAX_MESSAGE + 1]).unwrap();
    let e = s.relay.join().unwrap().unwrap_err();
    assert!(e.to_string().contains("over 65536 bytes"), "{e}");
}

#[test]
fn requests_and_answers_are_read_as_criu_encodes_them() {
    let r = parse_request(&request(RESTORE, 9, true)).unwrap();
    assert_eq!(r, Request { kind: RESTORE, peer_fds: vec![9], notify_scripts: true });
    // images_dir_fd = -1 (a 10-byte varint) names no descriptor.
    let r = parse_request(&request(RESTORE, -1, false)).unwrap();
    assert_eq!(r, Request { kind: RESTORE, peer_fds: vec![], notify_scripts: false });
    assert_eq!(parse_response(&notification("post-restore", 77)).unwrap().script.as_deref(), Some("post-restore"));
    assert_eq!(parse_response(&restore_answer(true, 300)).unwrap().restored_pid, Some(300));
    let f = parse_response(&failure_response(RESTORE, "why")).unwrap();
    assert_eq!((f.kind, f.success), (RESTORE, false));
    for bad in [vec![0x08], vec![0x12, 0x05, 0x01], vec![0x0b]] {
        assert!(parse_request(&bad).is_err(), "{bad:?}");
    }
}

#[test]
fn the_verdict_socket_answers_with_the_background_verdict_even_on_a_long_path() {
    let dir = tempfile::tempdir().unwrap();
    // Longer than a sockaddr_un holds, as CRI bundle paths are.
    let bundle = dir.path().join("b".repeat(100));
    std::fs::create_dir(&bundle).unwrap();
    let path = bundle.join(VERDICT_SOCKET);
    let gate = SocketGate { path: path.clone(), timeout: Duration::from_secs(10) };

    let server = VerdictServer::start(&path, Pending::finished(Ok(()))).unwrap();
    assert!(!server.asked());
    assert_eq!(gate.verdict(), Ok(()));
    assert!(server.asked());
    drop(server);
    assert!(!path.exists(), "the socket is removed");

    let failed = Pending::finished(Err(VerifyError::Missing { file: "/s/pages-1.img".into() }));
    let _server = VerdictServer::start(&path, failed).unwrap();
    let e = gate.verdict().unwrap_err();
    assert!(e.contains("/s/pages-1.img") && e.contains("missing"), "{e}");
}

#[test]
fn no_shim_a_silent_shim_or_a_shim_that_hangs_up_is_a_refusal() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(VERDICT_SOCKET);
    let gate = SocketGate { path: path.clone(), timeout: Duration::from_millis(300) };
    assert!(gate.verdict().unwrap_err().contains("cannot reach"));

    let listener = UnixListener::bind(&path).unwrap();
    let server = std::thread::spawn(move || {
        let (first, _) = listener.accept().unwrap();
        drop(first); // hangs up
        let (second, _) = listener.accept().unwrap();
        std::thread::sleep(Duration::from_secs(2)); // says nothing
        drop(second);
    });
    assert!(gate.verdict().unwrap_err().contains("without a verdict"));
    assert!(gate.verdict().unwrap_err().contains("no verdict from the shim within"));
    server.join().unwrap();
}
