//! Checkpoint faults (issue 24): each fault must leave the container running (or, for a
//! restore, refuse and keep the checkpoint), no partial checkpoint visible, and an error that
//! names what failed. One containerd 1.6 with real runc and CRIU holds every case; each case ends
//! in the same three checks ([`assert_handled`]).
//!
//! The faults are made, never timed: CRIU is a wrapper first on containerd's PATH ([`Control`])
//! that records its pid (so the test can stop or kill it once images are being written) or fills
//! the store's filesystem right before or right after the real dump; a changed chunk is one byte
//! flipped in a committed checkpoint.
//!
//! A killed shim is the one fault whose container cannot keep running: containerd's cleanup
//! after a dead shim ends it, and the client's error can only say that the connection broke.
//! Here the shim is killed in the middle of CRIU's writing, while the dump follower hashes; the
//! stop-hook phases (frozen, rootfs diff, hashing at the commit, committed, and the restore's)
//! are `shim_kill.rs`'s matrix, which needs the hook's variable in containerd's environment and
//! checks more of what the dead shim may leave (mounts, cgroups, runtime calls) for each.
//!
//! Under `KBT_CGROUP=v2` the same cases run on a cgroup v2 test bed (memory read per process,
//! the freezer as `cgroup.freeze`, the full disk mounted where containerd's namespace sees it).

use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::time::Instant;

use containerd_shim_protos::api::Status;
use containerd_shim_protos::shim::oci::CheckpointOptions;
use kybernate_checkpoint::digest::CHUNK_SIZE;
use kybernate_checkpoint::{Store, MANIFEST_FILE};

mod common;

use common::procs::{alive, stat};

use common::ckpt::*;
use common::{runc_state_entries, task_row, text, wait_for, RUNTIME, SHIM};
use kybernate_testbed::{unique_name, IMAGE};

const MIB: u64 = 1 << 20;

/// One fault: makes it happen on the shared test bed and checks what it left.
type Case = fn(&Bed, &Control);

#[test]
fn checkpoint_faults_leave_the_container_running_and_nothing_partial() {
    let control = Control::new();
    let bed = bed_with(|b| b.path_prepend(control.dir()), "");
    let started = Instant::now();
    let cases: [(&str, Case); 5] = [
        ("CRIU killed during the dump", criu_killed_during_the_dump),
        ("the shim SIGKILLed while CRIU writes and the follower hashes", shim_killed_while_criu_writes),
        ("disk full during the final dump", disk_full_during_the_dump),
        ("disk full after the dump, at the commit", disk_full_at_the_commit),
        ("a changed chunk of a committed checkpoint", a_changed_chunk_is_refused_at_restore),
    ];
    let mut failed = Vec::new();
    for (name, case) in cases {
        let t = Instant::now();
        control.reset();
        // Every case runs, so that one fault's regression does not hide another's.
        if catch_unwind(AssertUnwindSafe(|| case(&bed, &control))).is_err() {
            failed.push(name);
        }
        eprintln!("fault {name:?}: {:?}", t.elapsed());
    }
    eprintln!("checkpoint faults: {:?}", started.elapsed());
    assert!(failed.is_empty(), "faults not handled: {failed:?} (see the panics above)");
}

// ---------------------------------------------------------------------------------------------
// The cases

/// CRIU SIGKILLed while it writes the images: the dump fails, CRIU's seized (or frozen) tasks
/// run again.
fn criu_killed_during_the_dump(bed: &Bed, control: &Control) {
    let tb = &bed.tb;
    let id = unique_name("killed");
    // 64 MiB of random data in the container's /dev/shm (a tmpfs CRIU dumps while the container
    // is frozen) keeps the dump busy long enough to kill CRIU in the middle of it.
    let script = format!("dd if=/dev/urandom of=/dev/shm/fill bs=1M count=64 2>/dev/null; {COUNTER}");
    tb.ctr_ok(&["run", "-d", "--runtime", RUNTIME, IMAGE, &id, "sh", "-c", &script]);
    wait_counter(tb, &id, 3);
    let target = store_path(bed, &id);
    // With `exit`: only such dumps are followed (a leave-running dump runs alone).
    let o = CheckpointOptions { image_path: target.display().to_string(), exit: true, ..Default::default() };
    let dumping = checkpoint_in_background(tb, &id, o);
    // Kill CRIU once it writes images into the (hidden) partial checkpoint: the dump is then
    // under way (CRIU holds the tasks and thaws the freezer once it does, restoring its frozen
    // state after a dump).
    let parent = target.parent().unwrap().to_path_buf();
    let criu = wait_for("CRIU to write images", || {
        let pid = control.criu_pid()?;
        let partial = std::fs::read_dir(&parent).ok()?.flatten().find(|e| is_partial(&e.file_name()))?;
        let writing = std::fs::read_dir(partial.path().join("checkpoint")).ok()?.flatten().any(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            (name.starts_with("pages-") || name.starts_with("tmpfs-")) && e.metadata().is_ok_and(|m| m.len() > 0)
        });
        writing.then_some(pid)
    });
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(criu), nix::sys::signal::Signal::SIGKILL).expect("kill CRIU");
    let (_, message) = error_of(dumping.join().unwrap());
    // Whether CRIU died before or after it thawed the freezer, the container must run again.
    assert!(message.contains("is running") || message.contains("has been resumed"), "{message}");
    let words = ["checkpoint", "failed", "CRIU ended without an answer", "dump.log"];
    assert!(!message.contains("RLIMIT_NOFILE"), "a benign CRIU log line points the reader the wrong way: {message}");
    assert_handled(bed, Kept::Running(&id), Some(&target), &message, &words);
    remove(tb, &id);
}

/// The shim SIGKILLed in the middle of the dump, after the follower started hashing CRIU's pages
/// (more than two chunks written): the RPC fails, containerd's cleanup after the dead shim ends
/// the container, CRIU dies with it, the partial checkpoint goes, and the id runs again. (The
/// stop-hook phases, hashing included, are in `shim_kill.rs`.)
fn shim_killed_while_criu_writes(bed: &Bed, control: &Control) {
    let tb = &bed.tb;
    let id = unique_name("shimkill");
    // 96 MiB of random anonymous memory (see the changed-chunk case): CRIU writes it for a few
    // hundred milliseconds, long enough to stop it past two chunks.
    let script = format!("dd if=/dev/urandom bs=96M count=1 iflag=fullblock 2>/dev/null | sleep 100000 & {COUNTER}");
    tb.ctr_ok(&["run", "-d", "--runtime", RUNTIME, IMAGE, &id, "sh", "-c", &script]);
    wait_for("dd to hold 96 MiB", || (container_anon(tb, &id)? >= 96 * MIB).then_some(()));
    wait_counter(tb, &id, 3);
    let (init, _) = task_row(tb, &id).unwrap();
    let target = store_path(bed, &id);
    let o = CheckpointOptions { image_path: target.display().to_string(), ..Default::default() };
    let dumping = checkpoint_in_background(tb, &id, o);
    let parent = target.parent().unwrap().to_path_buf();
    let criu = poll_every_ms("CRIU to write more than two chunks of pages", || {
        let pid = control.criu_pid()?;
        let partial = std::fs::read_dir(&parent).ok()?.flatten().find(|e| is_partial(&e.file_name()))?;
        let past = std::fs::read_dir(partial.path().join("checkpoint")).ok()?.flatten().any(|e| {
            e.file_name().to_string_lossy().starts_with("pages-")
                && e.metadata().is_ok_and(|m| m.len() > 2 * CHUNK_SIZE)
        });
        past.then_some(pid)
    });
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(criu), nix::sys::signal::Signal::SIGSTOP).expect("stop CRIU");
    // CRIU's parent is runc, whose parent is the shim.
    let shim = ppid(ppid(criu as u32).expect("runc")).expect("the shim");
    assert_eq!(std::fs::read_link(format!("/proc/{shim}/exe")).ok().as_deref(), Some(Path::new(SHIM)));
    // A few of the follower's walks (15 ms apart) over the chunks written so far.
    std::thread::sleep(std::time::Duration::from_millis(60));
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(shim as i32), nix::sys::signal::Signal::SIGKILL)
        .expect("kill the shim");
    let message = match dumping.join().unwrap() {
        Ok(()) => panic!("the checkpoint succeeded although its shim was killed"),
        Err(e) => e.to_string(),
    };
    // containerd runs the shim's `delete` action after the crash; the task goes once it returned.
    wait_for("the task to go after its shim died", || {
        let _ = tb.ctr(&["tasks", "delete", &id]);
        task_row(tb, &id).is_none().then_some(())
    });
    tb.ctr_ok(&["containers", "delete", &id]);
    wait_for("CRIU and the container's init to end", || (!alive(criu as u32) && !alive(init)).then_some(()));
    // containerd's cleanup ends with the bundle; runc's state goes with the shim's `delete`.
    wait_for("the bundle and runc's state to go", || {
        (!common::bundle_dir(tb, &id).exists() && !runc_state_entries(tb).contains(&id)).then_some(())
    });
    // The client talked to the shim that died: its error can only say the connection broke.
    assert_handled(bed, Kept::RunsAgain(&id), Some(&target), &message, &[]);
    remove(tb, &id);
}

/// The store's filesystem fills up between the space preflight and CRIU's first write: CRIU's
/// writes fail with ENOSPC. Afterwards, with the space back, the same container checkpoints.
fn disk_full_during_the_dump(bed: &Bed, control: &Control) {
    disk_full(bed, control, FillWhen::BeforeDump);
}

/// The dump succeeds and fills the filesystem to the last byte: the shim's own writes (the spec,
/// the rootfs diff, the manifest) fail with ENOSPC before anything is committed.
fn disk_full_at_the_commit(bed: &Bed, control: &Control) {
    disk_full(bed, control, FillWhen::AfterDump);
}

fn disk_full(bed: &Bed, control: &Control, when: FillWhen) {
    let tb = &bed.tb;
    let id = unique_name("full");
    run_counter(tb, &id, &[]);
    wait_counter(tb, &id, 3);
    let target = store_path(bed, &id);
    // The container's dir in the store on a filesystem of its own, far larger than the preflight
    // asks for this small container (its memory + 10% + 16 MiB).
    let tmpfs = Tmpfs::mount(tb, target.parent().unwrap(), 64 * MIB);
    let filler = tmpfs.dir().join(".filler");
    control.fill(when, &filler);
    let o = CheckpointOptions { image_path: target.display().to_string(), ..Default::default() };
    let (_, message) = error_of(checkpoint(tb, &id, o.clone()));
    assert!(!control.fill_pending(), "the CRIU wrapper never filled the disk: {message}");
    let names: &[&str] = match when {
        // runc's words, then CRIU's log excerpt, which names the failed writes.
        FillWhen::BeforeDump => &["checkpoint", "criu failed", "dump.log", "No space left on device"],
        // The shim's first write after the dump.
        FillWhen::AfterDump => &[
            "checkpoint",
            "failed",
            "write spec.dump",
            "No space left on device",
            "is running",
            "nothing of the checkpoint was kept",
        ],
    };
    assert_handled(bed, Kept::Running(&id), Some(&target), &message, names);
    assert_eq!(entries(tmpfs.dir()), vec![".filler".to_string()], "left on the full filesystem");

    // Nothing broken: with the space back the same container checkpoints into the same place.
    std::fs::remove_file(&filler).unwrap();
    checkpoint(tb, &id, o).unwrap_or_else(|e| panic!("checkpoint after the disk was freed: {e}"));
    let manifest = kybernate_checkpoint::verify(&target).unwrap_or_else(|e| panic!("{}: {e}", target.display()));
    assert_eq!(manifest.container_id, id);
    assert_handled_quietly(bed, &id);
    remove(tb, &id);
    // Store checks of later cases must not see this container's checkpoint vanish with the mount.
    std::fs::remove_dir_all(&target).unwrap();
}

/// One byte flipped in the middle of a committed checkpoint's memory image (several 8 MiB
/// chunks): the restore on create is refused before any process runs, naming the file and the
/// chunk's byte range; the checkpoint stays in the store as it was and `verify` calls it invalid.
fn a_changed_chunk_is_refused_at_restore(bed: &Bed, _: &Control) {
    let tb = &bed.tb;
    let id = unique_name("chunk");
    // 24 MiB of random anonymous memory: busybox dd's buffer, held while dd blocks writing into
    // a pipe nobody reads.
    let script = format!("dd if=/dev/urandom bs=24M count=1 iflag=fullblock 2>/dev/null | sleep 100000 & {COUNTER}");
    tb.ctr_ok(&["run", "-d", "--runtime", RUNTIME, IMAGE, &id, "sh", "-c", &script]);
    wait_for("dd to hold 24 MiB", || (container_anon(tb, &id)? >= 24 * MIB).then_some(()));
    let (dir, _) = store_checkpoint(bed, &id, true);
    wait_for("the checkpointed container to stop", || {
        (common::task_status(tb, &id).as_deref() == Some("STOPPED")).then_some(())
    });
    tb.ctr_ok(&["tasks", "delete", &id]);
    tb.ctr_ok(&["containers", "delete", &id]);

    let pages = std::fs::read_dir(dir.join("checkpoint"))
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.file_name().unwrap().to_string_lossy().starts_with("pages-"))
        .max_by_key(|p| p.metadata().unwrap().len())
        .expect("a pages image");
    let mut bytes = std::fs::read(&pages).unwrap();
    let size = bytes.len() as u64;
    assert!(size >= 2 * CHUNK_SIZE, "{} has {size} bytes, fewer than two chunks", pages.display());
    let at = size / 2;
    bytes[at as usize] ^= 0xff;
    std::fs::write(&pages, &bytes).unwrap();
    let chunk = at / CHUNK_SIZE;
    let (start, end) = (chunk * CHUNK_SIZE, ((chunk + 1) * CHUNK_SIZE).min(size));
    let before = Snapshot::of(&dir);

    let restored = unique_name("chunk-r");
    let out = run_restored(bed, &dir, &restored, &[]);
    assert!(!out.status.success(), "the restore of a changed checkpoint succeeded");
    let message = text(&out.stderr);
    // The memory pages are verified while CRIU restores (the restore is held until they are), so
    // the refusal comes at Start: ctr's task stays created, with no process and no runtime state,
    // until the client deletes it; then the container can be removed.
    if let Some((pid, status)) = task_row(tb, &restored) {
        assert_eq!((pid, status.as_str()), (0, "CREATED"), "the refused task of {restored}");
        tb.ctr_ok(&["tasks", "delete", &restored]);
    }
    assert!(!runc_state_entries(tb).contains(&restored), "runtime state left for {restored}");
    let _ = tb.ctr(&["containers", "delete", &restored]);
    assert!(!tb.ctr_ok(&["containers", "ls", "-q"]).lines().any(|l| l == restored), "{restored} cannot be removed");
    let range = format!("bytes {start}..{end}");
    let name = pages.strip_prefix(&dir).unwrap().display().to_string();
    assert_handled(bed, Kept::Checkpoint(&dir, &before), None, &message, &[&name, &range, "checksum mismatch"]);
    std::fs::remove_dir_all(&dir).unwrap();
}

// ---------------------------------------------------------------------------------------------
// The three invariants

/// What a fault must leave intact.
enum Kept<'a> {
    /// The container `id`, running.
    Running(&'a str),
    /// A container ended with its shim: the id runs again (a new counter container counts).
    RunsAgain(&'a str),
    /// The committed checkpoint a restore was refused from, byte for byte as it was.
    Checkpoint(&'a Path, &'a Snapshot),
}

/// The three checks every fault ends in: (1) the container runs on (or the refused checkpoint is
/// kept as it was); (2) no partial checkpoint is visible anywhere in the store, `target` does not
/// exist, and the store lists only checkpoints that verify (the refused one listed, but
/// invalid); (3) the client's error `message` names what failed (each of `names`).
fn assert_handled(bed: &Bed, kept: Kept, target: Option<&Path>, message: &str, names: &[&str]) {
    eprintln!("the client's error: {message}");
    for name in names {
        let found = message.contains(name) || message.to_lowercase().contains(&name.to_lowercase());
        assert!(found, "the error does not name {name:?}: {message}");
    }
    let invalid = match kept {
        Kept::Running(id) => {
            assert_runs(bed, id);
            None
        }
        Kept::RunsAgain(id) => {
            assert!(task_row(&bed.tb, id).is_none(), "{id} still has a task");
            run_counter(&bed.tb, id, &[]);
            wait_counter(&bed.tb, id, 3);
            assert_runs(bed, id);
            None
        }
        Kept::Checkpoint(dir, before) => {
            assert_eq!(&Snapshot::of(dir), before, "the refused checkpoint {} changed", dir.display());
            Some(dir)
        }
    };
    if let Some(t) = target {
        assert!(!t.exists(), "an incomplete checkpoint at {}", t.display());
    }
    assert_store_complete(bed, invalid);
}

/// [`assert_handled`]'s checks after a checkpoint that succeeded.
fn assert_handled_quietly(bed: &Bed, id: &str) {
    assert_runs(bed, id);
    assert_store_complete(bed, None);
}

/// The container runs: its init is alive, `ctr t ls` and the shim say RUNNING, its freezer cgroup
/// is thawed and its counter counts on.
fn assert_runs(bed: &Bed, id: &str) {
    let tb = &bed.tb;
    let (pid, status) = task_row(tb, id).unwrap_or_else(|| panic!("{id} is not listed by ctr"));
    assert_eq!(status, "RUNNING", "{id} is not running");
    assert!(alive(pid), "{id}'s init {pid} is gone");
    assert_eq!(shim_status(tb, id), Some(Status::RUNNING), "the shim's state of {id}");
    match v2_dir(tb, id) {
        Some(dir) => {
            let read = |f: &str| std::fs::read_to_string(dir.join(f)).unwrap_or_else(|e| panic!("{id}: {f}: {e}"));
            assert_eq!(read("cgroup.freeze").trim(), "0", "{id} left frozen (cgroup.freeze)");
            assert!(read("cgroup.events").lines().any(|l| l == "frozen 0"), "{id} left frozen (cgroup.events)");
        }
        None => {
            let freezer = format!("/sys/fs/cgroup/freezer/{}/{id}/freezer.state", tb.namespace());
            assert_eq!(std::fs::read_to_string(&freezer).unwrap().trim(), "THAWED", "{id} left frozen");
        }
    }
    assert_running(tb, id, "after the fault");
}

/// No hidden work dir (`.…partial-…`) anywhere in the store, and every checkpoint the store lists
/// verifies, except `invalid`, which must be listed and fail verification.
fn assert_store_complete(bed: &Bed, invalid: Option<&Path>) {
    let ns = bed.store.join(bed.tb.namespace());
    for container in entries(&ns) {
        let partial: Vec<String> =
            entries(&ns.join(&container)).into_iter().filter(|e| e.contains(".partial-")).collect();
        assert!(partial.is_empty(), "partial checkpoints of {container} visible: {partial:?}");
    }
    let listed = Store::new(&bed.store).list().expect("list the store");
    for (dir, manifest) in &listed {
        manifest.as_ref().unwrap_or_else(|e| panic!("the store lists a broken checkpoint {}: {e}", dir.display()));
        let verified = kybernate_checkpoint::verify(dir);
        match invalid {
            Some(bad) if bad == dir => assert!(verified.is_err(), "{} verifies after its change", dir.display()),
            _ => {
                verified.unwrap_or_else(|e| panic!("the store lists an incomplete checkpoint {}: {e}", dir.display()));
            }
        }
    }
    if let Some(bad) = invalid {
        assert!(listed.iter().any(|(d, _)| d == bad), "{} is no longer listed", bad.display());
    }
}

// ---------------------------------------------------------------------------------------------
// Fixtures

/// Every file of a checkpoint with its bytes, to see that a refused restore changed nothing.
#[derive(Debug, PartialEq)]
struct Snapshot(Vec<(PathBuf, u64, u64)>);

impl Snapshot {
    fn of(dir: &Path) -> Snapshot {
        let mut files = Vec::new();
        let mut todo = vec![dir.to_path_buf()];
        while let Some(d) = todo.pop() {
            for e in std::fs::read_dir(&d).unwrap().flatten() {
                let p = e.path();
                if e.file_type().unwrap().is_dir() {
                    todo.push(p);
                } else {
                    let bytes = std::fs::read(&p).unwrap();
                    let mut h = std::hash::DefaultHasher::new();
                    std::hash::Hasher::write(&mut h, &bytes);
                    files.push((p, bytes.len() as u64, std::hash::Hasher::finish(&h)));
                }
            }
        }
        files.sort();
        assert!(files.iter().any(|(p, _, _)| p.ends_with(MANIFEST_FILE)), "no manifest in {}", dir.display());
        Snapshot(files)
    }
}

fn ppid(pid: u32) -> Option<u32> {
    stat(pid).map(|(_, p)| p)
}

/// Polls `f` every millisecond (CRIU writes a chunk in a few), for up to [`common::TIMEOUT`].
fn poll_every_ms<T>(what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + common::TIMEOUT;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
}

fn is_partial(name: &std::ffi::OsStr) -> bool {
    name.to_string_lossy().contains(".partial-")
}

fn memory_stat(file: &Path, key: &str) -> Option<u64> {
    let stat = std::fs::read_to_string(file).ok()?;
    stat.lines().find_map(|l| l.strip_prefix(key)?.strip_prefix(' ')?.trim().parse().ok())
}

/// The v2 cgroup directory of container `id` on a cgroup v2 test bed (from its init's `0::`
/// line); `None` on a host-mode bed.
fn v2_dir(tb: &kybernate_testbed::Testbed, id: &str) -> Option<PathBuf> {
    if tb.cgroup_mode() != kybernate_testbed::CgroupMode::V2 {
        return None;
    }
    let (pid, _) = task_row(tb, id)?;
    let lines = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).ok()?;
    let path = lines.lines().find_map(|l| l.strip_prefix("0::"))?;
    tb.v2_cgroup_dir(path)
}

/// Anonymous memory of container `id`'s processes, in bytes: its v1 memory cgroup's `total_rss`;
/// on a cgroup v2 bed the v2 `memory.stat`'s `anon` where the hierarchy has the memory
/// controller, else (these machines) the sum of `RssAnon` of the processes in its v2 cgroup.
fn container_anon(tb: &kybernate_testbed::Testbed, id: &str) -> Option<u64> {
    let Some(dir) = v2_dir(tb, id) else {
        let stat = Path::new("/sys/fs/cgroup/memory").join(tb.namespace()).join(id).join("memory.stat");
        return memory_stat(&stat, "total_rss");
    };
    if tb.v2_has_controller("memory") {
        return memory_stat(&dir.join("memory.stat"), "anon");
    }
    let procs = std::fs::read_to_string(dir.join("cgroup.procs")).ok()?;
    let anon_kib = |pid: &str| -> Option<u64> {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
        status.lines().find_map(|l| l.strip_prefix("RssAnon:")?.trim().strip_suffix("kB")?.trim().parse().ok())
    };
    Some(procs.lines().filter_map(|p| anon_kib(p.trim())).sum::<u64>() * 1024)
}

/// When the CRIU wrapper fills the store's filesystem.
#[derive(Clone, Copy)]
enum FillWhen {
    /// Before runc's dump: CRIU's own writes fail.
    BeforeDump,
    /// After the real CRIU dumped: the shim's writes after the dump fail.
    AfterDump,
}

/// The `criu` first on containerd's PATH. For each `criu swrk` (runc's way of running CRIU: first
/// to ask its version, then for the dump) it records its pid in `criu.pid`, and when a request
/// file names a path, it fills that path's filesystem with a file of zeros, once (it removes the
/// request): `fill-before` at the first swrk, leaving 16 KiB free (runc's `descriptors.json`
/// fits, CRIU's images do not); `fill-after` to the last byte once a real CRIU has written an
/// `inventory.img` there (the dump). Anything else becomes the real CRIU.
struct Control {
    dir: tempfile::TempDir,
}

impl Control {
    fn new() -> Control {
        let dir = kybernate_testbed::scratch_dir().unwrap();
        let d = dir.path().display();
        let real = kybernate_testbed::CRIU;
        let script = format!(
            "#!/bin/sh\n\
             [ \"$1\" = swrk ] || exec {real} \"$@\"\n\
             echo $$ > {d}/criu.pid\n\
             fill() {{ dd if=/dev/zero of=\"$1\" bs=64k 2>/dev/null; [ \"$2\" = 0 ] || truncate -s \"-$2\" \"$1\"; }}\n\
             if [ -f {d}/fill-before ]; then f=$(cat {d}/fill-before); rm {d}/fill-before; fill \"$f\" 16K; fi\n\
             if [ -f {d}/fill-after ]; then\n\
             \x20 f=$(cat {d}/fill-after); {real} \"$@\"; rc=$?\n\
             \x20 if [ -n \"$(find \"${{f%/*}}\" -name inventory.img)\" ]; then rm {d}/fill-after; fill \"$f\" 0; fi\n\
             \x20 exit $rc\n\
             fi\n\
             exec {real} \"$@\"\n"
        );
        let wrapper = dir.path().join("criu");
        std::fs::write(&wrapper, script).unwrap();
        std::fs::set_permissions(&wrapper, std::fs::Permissions::from_mode(0o755)).unwrap();
        Control { dir }
    }

    fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Forgets the last case's pid and requests.
    fn reset(&self) {
        for f in ["criu.pid", "fill-before", "fill-after"] {
            let _ = std::fs::remove_file(self.dir().join(f));
        }
    }

    fn criu_pid(&self) -> Option<i32> {
        std::fs::read_to_string(self.dir().join("criu.pid")).ok()?.trim().parse().ok()
    }

    fn fill(&self, when: FillWhen, filler: &Path) {
        let name = match when {
            FillWhen::BeforeDump => "fill-before",
            FillWhen::AfterDump => "fill-after",
        };
        std::fs::write(self.dir().join(name), filler.as_os_str().as_encoded_bytes()).unwrap();
    }

    fn fill_pending(&self) -> bool {
        ["fill-before", "fill-after"].iter().any(|f| self.dir().join(f).exists())
    }
}

/// A tmpfs of `size` bytes mounted on `dir` (created 0700 with its parents), unmounted on drop.
///
/// When containerd runs in a private mount namespace (a cgroup v2 test bed on a v1 machine), a
/// mount made here on the store would not reach it: the tmpfs is then mounted below the test
/// bed's own directory, a shared mount (so the same tmpfs appears in containerd's namespace),
/// and bound onto `dir` on both sides, so that the test, the shim and CRIU fill one filesystem.
struct Tmpfs {
    dir: PathBuf,
    /// In a private namespace: the tmpfs's own mount point (below the test bed's dir) and
    /// containerd's pid, whose namespace holds the second bind.
    shared: Option<(PathBuf, u32)>,
}

impl Tmpfs {
    fn mount(tb: &kybernate_testbed::Testbed, dir: &Path, size: u64) -> Tmpfs {
        std::fs::DirBuilder::new().recursive(true).mode(0o700).create(dir).unwrap();
        let options = format!("size={size},mode=0700");
        let tmpfs = |at: &Path| {
            nix::mount::mount(Some("tmpfs"), at, Some("tmpfs"), nix::mount::MsFlags::empty(), Some(options.as_str()))
                .unwrap_or_else(|e| panic!("mount a tmpfs on {}: {e}", at.display()))
        };
        let Some(pid) = tb.containerd_pid().filter(|_| tb.private_namespace()) else {
            tmpfs(dir);
            return Tmpfs { dir: dir.to_path_buf(), shared: None };
        };
        let own = tb.dir().join(unique_name("fault-tmpfs"));
        std::fs::DirBuilder::new().mode(0o700).create(&own).unwrap();
        tmpfs(&own);
        let t = Tmpfs { dir: dir.to_path_buf(), shared: Some((own.clone(), pid)) };
        nix::mount::mount(Some(&own), dir, None::<&str>, nix::mount::MsFlags::MS_BIND, None::<&str>)
            .unwrap_or_else(|e| panic!("bind {} onto {}: {e}", own.display(), dir.display()));
        let out = tb.command_in_namespace("mount").arg("--bind").arg(&own).arg(dir).output().unwrap();
        assert!(out.status.success(), "bind in containerd's namespace: {}", text(&out.stderr));
        t
    }

    fn dir(&self) -> &Path {
        &self.dir
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        if let Some((_, pid)) = &self.shared {
            let _ = std::process::Command::new("nsenter")
                .args(["-m", "-t", &pid.to_string(), "--", "umount", "-l"])
                .arg(&self.dir)
                .output();
        }
        let _ = nix::mount::umount2(&self.dir, nix::mount::MntFlags::MNT_DETACH);
        if let Some((own, _)) = &self.shared {
            let _ = nix::mount::umount2(own, nix::mount::MntFlags::MNT_DETACH);
            let _ = std::fs::remove_dir(own);
        }
    }
}
