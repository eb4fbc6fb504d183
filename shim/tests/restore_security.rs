//! A restored container gets nothing its own spec did not grant (issue #22), with real
//! containerd 1.6, runc and CRIU (the test bed: `test/setup.sh`).
//!
//! CRIU restores each process's credentials (capabilities, seccomp, ...) and the mount tree from
//! its images; runc builds only namespaces, cgroups and external mounts from the new spec. The
//! shim therefore checks every restore on create against the new container's `config.json` and
//! refuses (PERMISSION_DENIED), naming every excess, when the checkpoint's processes hold more.
//! Also here: which triggers a node honours (`allow_env_restore`, `allow_annotation_restore`),
//! and that only committed checkpoints are restored from (never a hidden work directory).

use std::path::{Path, PathBuf};
use std::process::Output;

use containerd_shim_protos::api::CreateTaskRequest;
use containerd_shim_protos::ttrpc::{context, Code};

mod common;

use common::ckpt::*;
use common::{bundle_dir, runc_state_entries, task_row, task_status, text, wait_for, RUNTIME};
use kybernate_testbed::{unique_name, Testbed, IMAGE};

/// containerd's default capabilities for a container (`oci.WithDefaultSpec`): CapEff of a fresh
/// unprivileged container's init.
const DEFAULT_CAP_EFF: &str = "00000000a80425fb";
const CAP_SYS_ADMIN_BIT: u32 = 21;

// ---------------------------------------------------------------------------------------------
// Helpers

/// `dir` relative to the store root: the checkpoint's name in the store and in log lines.
fn name_of(bed: &Bed, dir: &Path) -> String {
    dir.strip_prefix(&bed.store).expect("a checkpoint of the store").display().to_string()
}

/// `ctr run -d` of a counter container `id` with `RESTORE_FROM=<reference>` in its env: restored
/// where the node allows it, else it runs the counter from 1.
fn run_env(tb: &Testbed, reference: &str, id: &str, extra: &[&str]) -> Output {
    let env = format!("RESTORE_FROM={reference}");
    let mut args = vec!["run", "-d", "--runtime", RUNTIME, "--env", &env];
    args.extend_from_slice(extra);
    args.extend_from_slice(&[IMAGE, id, "sh", "-c", COUNTER]);
    tb.ctr(&args)
}

/// `ctr run -d` of a counter container `id` with the restore annotation naming `reference`.
fn run_annotated_counter(tb: &Testbed, reference: &str, id: &str, extra: &[&str]) -> Output {
    let annotation = format!("kybernate.io/restore-from={reference}");
    let mut args = vec!["run", "-d", "--runtime", RUNTIME, "--annotation", &annotation];
    args.extend_from_slice(extra);
    args.extend_from_slice(&[IMAGE, id, "sh", "-c", COUNTER]);
    tb.ctr(&args)
}

fn assert_ok(out: &Output, what: &str) {
    assert!(out.status.success(), "{what}: {}{}", text(&out.stdout), text(&out.stderr));
}

/// Asserts that the restore of `id` (the output of its `ctr run`) was refused and left nothing
/// behind: no task, no runtime state, nothing mounted on its bundle. Removes the container
/// record `ctr run` leaves after a failed task create; returns ctr's error output.
fn assert_refused(tb: &Testbed, id: &str, out: &Output) -> String {
    let err = text(&out.stderr);
    assert!(!out.status.success(), "restore of {id} succeeded:\n{}\n{err}", text(&out.stdout));
    assert_nothing_left(tb, id);
    err
}

fn assert_nothing_left(tb: &Testbed, id: &str) {
    assert_eq!(task_row(tb, id), None, "a task {id} exists after its restore was refused");
    assert!(!runc_state_entries(tb).contains(&id.to_string()), "runtime state left for {id}");
    let bundle = bundle_dir(tb, id);
    let mounted: Vec<String> = mount_points().into_iter().filter(|m| Path::new(m).starts_with(&bundle)).collect();
    assert!(mounted.is_empty(), "mounts left on the bundle of {id}: {mounted:?}");
    let _ = tb.ctr(&["containers", "delete", id]);
    assert!(
        !tb.ctr_ok(&["containers", "ls", "-q"]).lines().any(|l| l.trim() == id),
        "container {id} still listed after its refused restore"
    );
}

fn mount_points() -> Vec<String> {
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    mounts.lines().filter_map(|l| l.split(' ').nth(4).map(str::to_string)).collect()
}

/// The host pid of the init of the running task `id`.
fn init_pid(tb: &Testbed, id: &str) -> u32 {
    wait_for(&format!("the pid of {id}"), || task_row(tb, id).filter(|(pid, s)| *pid > 0 && s == "RUNNING")).0
}

/// A field of `/proc/<pid>/status` (e.g. "CapEff", "Seccomp").
fn proc_status(pid: u32, field: &str) -> String {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("/proc/<pid>/status");
    status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .unwrap_or_else(|| panic!("no {field} in /proc/{pid}/status"))
        .trim()
        .to_string()
}

fn cap_eff(pid: u32) -> u64 {
    u64::from_str_radix(&proc_status(pid, "CapEff"), 16).expect("CapEff in hex")
}

/// Capability names (`CAP_...`) a message mentions.
fn caps_named(message: &str) -> Vec<String> {
    let mut names: Vec<String> = message
        .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .filter(|w| w.starts_with("CAP_"))
        .map(str::to_string)
        .collect();
    names.sort();
    names.dedup();
    names
}

/// Asserts that the counter of `id` ran fresh: it started again from 1 (seen below `below`, the
/// value a restore would have continued from), and keeps counting.
fn assert_counter_fresh(tb: &Testbed, id: &str, below: u64) {
    let first = wait_for(&format!("counter of {id}"), || counter(tb, id));
    assert!(first < below, "counter of {id} is at {first}: restored (checkpointed at {below}), not started fresh");
    wait_counter(tb, id, first + 3);
}

// ---------------------------------------------------------------------------------------------
// (1) A privileged checkpoint in a default container

#[test]
fn a_privileged_checkpoint_is_refused_in_a_default_container() {
    let bed = bed_with(|b| b, "allow_env_restore = true\n");
    let tb = &bed.tb;
    let id = unique_name("priv");
    run_counter(tb, &id, &["--privileged"]);
    let (dir, _) = store_checkpoint(&bed, &id, true);
    let name = name_of(&bed, &dir);

    for (trigger, source) in
        [("annotation", "annotation kybernate.io/restore-from"), ("env", "environment variable RESTORE_FROM")]
    {
        let restored = unique_name("priv-r");
        let out = match trigger {
            "annotation" => run_restored(&bed, &dir, &restored, &[]),
            _ => run_env(tb, &name, &restored, &[]),
        };
        let err = assert_refused(tb, &restored, &out);
        eprintln!("--- refusal by {trigger}:\n{err}");
        assert!(err.contains(&format!("restore {restored} from {name}: refused: ")), "{err}");
        // The shim answers PERMISSION_DENIED, which containerd 1.6 turns into "unknown" (its
        // errdefs have no such class): the code is checked at the shim, in
        // `an_added_capability_restores_only_where_the_spec_grants_it`.
        for excess in [
            // capabilities
            "CAP_SYS_ADMIN",
            "the new spec does not grant them",
            // a spec mount the new spec makes read-only
            "/sys is read-write in the checkpoint, the new spec mounts it read-only",
            // a readonlyPaths entry
            "/proc/sys is read-write in the checkpoint, the new spec makes it read-only (linux.readonlyPaths)",
            // a masked path (one that exists on every kernel: runc masks only those that exist)
            "/proc/keys is not masked in the checkpoint, the new spec masks it",
            // the host's devices in the checkpoint's /dev
            "the checkpoint's /dev has device nodes",
            "the new spec does not give the container these devices",
        ] {
            assert!(err.contains(excess), "{trigger}: the refusal does not name {excess:?}:\n{err}");
        }
        let line = tb.wait_log_line(&[
            &format!("restore decision: container {restored} (pod -), checkpoint {name} ({source}): refused: "),
            "CAP_SYS_ADMIN",
        ]);
        assert!(line.contains("/proc/keys is not masked"), "{line}");
    }
    let _ = tb.ctr(&["tasks", "delete", &id]);
}

// ---------------------------------------------------------------------------------------------
// (2) default → default

#[test]
fn a_default_checkpoint_restores_in_a_default_container() {
    let bed = bed();
    let tb = &bed.tb;
    let id = unique_name("dflt");
    run_counter(tb, &id, &[]);
    let (dir, at_checkpoint) = store_checkpoint(&bed, &id, true);
    let restored = unique_name("dflt-r");
    run_restored_ok(&bed, &dir, &restored, &[]);
    assert_counter_continues(tb, &restored, at_checkpoint);
    assert_eq!(format!("{:016x}", cap_eff(init_pid(tb, &restored))), DEFAULT_CAP_EFF);
    let name = name_of(&bed, &dir);
    tb.wait_log_line(
        &[&format!(
            "restore decision: container {restored} (pod -), checkpoint {name} (annotation kybernate.io/restore-from): allowed: "
        )],
    );
    remove(tb, &restored);
    let _ = tb.ctr(&["tasks", "delete", &id]);
}

// ---------------------------------------------------------------------------------------------
// (3) An added capability: restores where granted, refused (naming it alone) where not

#[test]
fn an_added_capability_restores_only_where_the_spec_grants_it() {
    let bed = bed();
    let tb = &bed.tb;
    let id = unique_name("capadd");
    let cap_add = ["--cap-add", "CAP_SYS_ADMIN"];
    run_counter(tb, &id, &cap_add);
    let (dir, at_checkpoint) = store_checkpoint(&bed, &id, true);

    // Into a default container: refused, naming CAP_SYS_ADMIN and no other capability.
    let denied = unique_name("capadd-no");
    let err = assert_refused(tb, &denied, &run_restored(&bed, &dir, &denied, &[]));
    eprintln!("--- refusal of CAP_SYS_ADMIN:\n{err}");
    assert!(
        err.contains("refused: ") && err.contains("hold CAP_SYS_ADMIN (") && err.contains("does not grant it"),
        "{err}"
    );
    assert_eq!(caps_named(&err), vec!["CAP_SYS_ADMIN".to_string()], "{err}");

    // The same, asked of the shim directly (as containerd forwards Task.Create): the RPC error is
    // PERMISSION_DENIED. The spec is the checkpoint's own without CAP_SYS_ADMIN.
    let direct = unique_name("capadd-rpc");
    let scratch = kybernate_testbed::scratch_dir().unwrap();
    let bundle = scratch.path().join(&direct);
    std::fs::create_dir_all(bundle.join("rootfs")).unwrap();
    let mut spec: serde_json::Value = serde_json::from_slice(&std::fs::read(dir.join("spec.dump")).unwrap()).unwrap();
    for set in spec["process"]["capabilities"].as_object_mut().expect("process.capabilities").values_mut() {
        set.as_array_mut().unwrap().retain(|c| c != "CAP_SYS_ADMIN");
    }
    spec["annotations"]["kybernate.io/restore-from"] = name_of(&bed, &dir).into();
    std::fs::write(bundle.join("config.json"), serde_json::to_vec(&spec).unwrap()).unwrap();
    let req = CreateTaskRequest { id: direct.clone(), bundle: bundle.display().to_string(), ..Default::default() };
    let (code, message) = error_of(connect(tb, &id).create(context::with_duration(CHECKPOINT_TIMEOUT), &req).map(drop));
    assert_eq!(code, Code::PERMISSION_DENIED, "{message}");
    assert!(message.contains("refused: ") && message.contains("hold CAP_SYS_ADMIN ("), "{message}");
    assert_eq!(caps_named(&message), vec!["CAP_SYS_ADMIN".to_string()], "{message}");
    assert!(!runc_state_entries(tb).contains(&direct), "runtime state left for {direct}");
    assert!(!mount_points().iter().any(|m| Path::new(m).starts_with(&bundle)), "mounts left on {}", bundle.display());

    // Into a container granted the same capability: restores, and its init holds it.
    let restored = unique_name("capadd-r");
    run_restored_ok(&bed, &dir, &restored, &cap_add);
    assert_counter_continues(tb, &restored, at_checkpoint);
    let eff = cap_eff(init_pid(tb, &restored));
    assert!(eff & (1 << CAP_SYS_ADMIN_BIT) != 0, "CapEff {eff:016x} of the restored init lacks CAP_SYS_ADMIN");
    remove(tb, &restored);
    let _ = tb.ctr(&["tasks", "delete", &id]);
}

// ---------------------------------------------------------------------------------------------
// (4) seccomp

#[test]
fn seccomp_required_by_the_spec_must_be_in_the_checkpoint() {
    let bed = bed();
    let tb = &bed.tb;
    // A checkpoint without seccomp, into a container whose spec installs containerd's profile.
    let plain = unique_name("nosec");
    run_counter(tb, &plain, &[]);
    let (plain_dir, _) = store_checkpoint(&bed, &plain, true);
    let denied = unique_name("nosec-r");
    let err = assert_refused(tb, &denied, &run_restored(&bed, &plain_dir, &denied, &["--seccomp"]));
    eprintln!("--- refusal for seccomp:\n{err}");
    assert!(err.contains("seccomp: the checkpoint has none for processes (pid"), "{err}");
    assert!(err.contains("the spec requires one (defaultAction SCMP_ACT_ERRNO)"), "{err}");
    assert!(caps_named(&err).is_empty(), "a default checkpoint into a default+seccomp spec names capabilities: {err}");

    // A checkpoint taken with the profile, into the same: restores, filter in force.
    let filtered = unique_name("sec");
    run_counter(tb, &filtered, &["--seccomp"]);
    assert_eq!(proc_status(init_pid(tb, &filtered), "Seccomp"), "2");
    let (dir, at_checkpoint) = store_checkpoint(&bed, &filtered, true);
    let restored = unique_name("sec-r");
    run_restored_ok(&bed, &dir, &restored, &["--seccomp"]);
    assert_counter_continues(tb, &restored, at_checkpoint);
    assert_eq!(proc_status(init_pid(tb, &restored), "Seccomp"), "2", "the restored init runs without its filter");
    remove(tb, &restored);
    let _ = tb.ctr(&["tasks", "delete", &plain]);
    let _ = tb.ctr(&["tasks", "delete", &filtered]);
}

// ---------------------------------------------------------------------------------------------
// A host bind mount

#[test]
fn a_host_bind_mount_restores_only_into_a_spec_that_makes_it() {
    let bed = bed();
    let tb = &bed.tb;
    let src = tb.dir().join("host-data");
    std::fs::create_dir_all(&src).unwrap();
    let mount = |mode: &str| format!("type=bind,src={},dst=/host,options=rbind:{mode}", src.display());
    let (rw, ro) = (mount("rw"), mount("ro"));
    let id = unique_name("bind");
    run_counter(tb, &id, &["--mount", &rw]);
    let (dir, at_checkpoint) = store_checkpoint(&bed, &id, true);

    // Without the mount: refused, naming it.
    let none = unique_name("bind-none");
    let err = assert_refused(tb, &none, &run_restored(&bed, &dir, &none, &[]));
    eprintln!("--- refusal of a host mount:\n{err}");
    assert!(err.contains("refused: ") && err.contains(" at /host"), "{err}");
    // Read-only where the checkpoint had it read-write: refused.
    let read_only = unique_name("bind-ro");
    let err = assert_refused(tb, &read_only, &run_restored(&bed, &dir, &read_only, &["--mount", &ro]));
    assert!(err.contains("/host is read-write in the checkpoint, the new spec mounts it read-only"), "{err}");
    // The same mount: restores, and the container writes through it.
    let restored = unique_name("bind-r");
    run_restored_ok(&bed, &dir, &restored, &["--mount", &rw]);
    assert_counter_continues(tb, &restored, at_checkpoint);
    tb.ctr_ok(&["tasks", "exec", "--exec-id", &unique_name("w"), &restored, "touch", "/host/written"]);
    assert!(src.join("written").is_file(), "the restored container does not see the host mount");
    remove(tb, &restored);
    let _ = tb.ctr(&["tasks", "delete", &id]);
}

// ---------------------------------------------------------------------------------------------
// (5) spec.dump and config.dump grant nothing

/// Rewrites `file` of checkpoint `dir` with `edit` applied to its JSON, and its size and digests
/// in the manifest, so that the checkpoint still verifies (the manifest itself is not hashed).
fn edit_json(dir: &Path, file: &str, edit: impl FnOnce(&mut serde_json::Value)) {
    let path = dir.join(file);
    let mut v: serde_json::Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    edit(&mut v);
    let bytes = serde_json::to_vec_pretty(&v).unwrap();
    std::fs::write(&path, &bytes).unwrap();
    let manifest = dir.join("kybernate.json");
    let mut m: serde_json::Value = serde_json::from_slice(&std::fs::read(&manifest).unwrap()).unwrap();
    assert!(m["files"].get(file).is_some(), "{file} not in the manifest: {m}");
    m["files"][file] = serde_json::to_value(kybernate_checkpoint::digest::hash_entry(&path).unwrap()).unwrap();
    std::fs::write(&manifest, serde_json::to_vec_pretty(&m).unwrap()).unwrap();
}

#[test]
fn privileges_written_into_spec_dump_and_config_dump_are_not_granted() {
    let bed = bed();
    let tb = &bed.tb;
    let id = unique_name("dump");
    run_counter(tb, &id, &[]);
    let (dir, at_checkpoint) = store_checkpoint(&bed, &id, true);

    edit_json(&dir, "spec.dump", |spec| {
        let caps: Vec<serde_json::Value> =
            kybernate_checkpoint::grants::caps::NAMES.iter().map(|&c| c.into()).collect();
        for set in ["bounding", "effective", "permitted", "inheritable", "ambient"] {
            spec["process"]["capabilities"][set] = caps.clone().into();
        }
        spec["process"]["noNewPrivileges"] = false.into();
        let linux = &mut spec["linux"];
        linux["maskedPaths"] = serde_json::json!([]);
        linux["readonlyPaths"] = serde_json::json!([]);
        let ns = linux["namespaces"].as_array_mut().expect("linux.namespaces");
        ns.retain(|n| n["type"] != "network" && n["type"] != "pid");
        linux["devices"] = serde_json::json!([
            {"path": "/dev/sda", "type": "b", "major": 8, "minor": 0, "fileMode": 432, "uid": 0, "gid": 0}
        ]);
        linux["resources"]["devices"] = serde_json::json!([{"allow": true, "access": "rwm"}]);
        let mounts = spec["mounts"].as_array_mut().expect("mounts");
        for m in mounts.iter_mut() {
            if let Some(opts) = m["options"].as_array_mut() {
                opts.retain(|o| o != "ro");
            }
        }
        mounts.push(
            serde_json::json!({"destination": "/host", "type": "bind", "source": "/", "options": ["rbind", "rw"]}),
        );
        mounts.push(serde_json::json!({"destination": "/etc-host", "type": "bind", "source": "/etc", "options": ["rbind", "rw"]}));
    });
    edit_json(&dir, "config.dump", |c| {
        c["privileged"] = true.into();
        c["hostNetwork"] = true.into();
        c["hostPID"] = true.into();
        c["mounts"] = serde_json::json!([{"containerPath": "/host", "hostPath": "/"}]);
        c["devices"] = serde_json::json!([{"containerPath": "/dev/sda", "hostPath": "/dev/sda", "permissions": "rwm"}]);
    });
    let spec: serde_json::Value = serde_json::from_slice(&std::fs::read(dir.join("spec.dump")).unwrap()).unwrap();
    assert_eq!(
        spec["process"]["capabilities"]["effective"].as_array().unwrap().len(),
        kybernate_checkpoint::grants::caps::NAMES.len()
    );
    kybernate_checkpoint::verify(&dir).unwrap_or_else(|e| panic!("the edited checkpoint does not verify: {e}"));

    let restored = unique_name("dump-r");
    run_restored_ok(&bed, &dir, &restored, &[]);
    assert_counter_continues(tb, &restored, at_checkpoint);
    let pid = init_pid(tb, &restored);
    assert_eq!(format!("{:016x}", cap_eff(pid)), DEFAULT_CAP_EFF, "the restored init's capabilities");
    assert_eq!(proc_status(pid, "NoNewPrivs"), "1", "the restored init lost no_new_privs");
    let root = PathBuf::from(format!("/proc/{pid}/root"));
    for p in ["host", "etc-host", "dev/sda"] {
        assert!(std::fs::symlink_metadata(root.join(p)).is_err(), "/{p} exists in the restored container");
    }
    for ns in ["net", "pid"] {
        let theirs = std::fs::read_link(format!("/proc/{pid}/ns/{ns}")).unwrap();
        let host = std::fs::read_link(format!("/proc/self/ns/{ns}")).unwrap();
        assert_ne!(theirs, host, "the restored container shares the host's {ns} namespace");
    }
    let keys = std::fs::read(format!("/proc/{pid}/root/proc/keys")).map(|b| b.len());
    assert!(matches!(keys, Ok(0)), "/proc/keys is not masked in the restored container: {keys:?}");
    remove(tb, &restored);
    let _ = tb.ctr(&["tasks", "delete", &id]);
}

// ---------------------------------------------------------------------------------------------
// (6) Which triggers a node honours

#[test]
fn restore_from_env_is_ignored_by_default() {
    let bed = bed();
    let tb = &bed.tb;
    let id = unique_name("envoff");
    run_counter(tb, &id, &[]);
    wait_counter(tb, &id, 20);
    let (dir, at_checkpoint) = store_checkpoint(&bed, &id, true);
    let name = name_of(&bed, &dir);
    let fresh = unique_name("envoff-r");
    assert_ok(&run_env(tb, &name, &fresh, &[]), "ctr run with RESTORE_FROM");
    assert_counter_fresh(tb, &fresh, at_checkpoint);
    tb.wait_log_line(
        &[&format!(
            "restore decision: container {fresh} (pod -), checkpoint {name} (environment variable RESTORE_FROM): ignored ([checkpoint] allow_env_restore = false on this node): the container starts fresh"
        )],
    );
    remove(tb, &fresh);
    let _ = tb.ctr(&["tasks", "delete", &id]);
}

#[test]
fn allow_env_restore_and_allow_annotation_restore_switch_the_triggers() {
    let bed = bed_with(|b| b, "allow_env_restore = true\nallow_annotation_restore = false\n");
    let tb = &bed.tb;
    let id = unique_name("sw");
    run_counter(tb, &id, &[]);
    wait_counter(tb, &id, 20);
    let (dir, at_checkpoint) = store_checkpoint(&bed, &id, true);
    let name = name_of(&bed, &dir);

    // The annotation is ignored: the container runs its own command from the start.
    let fresh = unique_name("sw-anno");
    assert_ok(&run_annotated_counter(tb, &name, &fresh, &[]), "ctr run with the annotation");
    assert_counter_fresh(tb, &fresh, at_checkpoint);
    tb.wait_log_line(
        &[&format!(
            "restore decision: container {fresh} (pod -), checkpoint {name} (annotation kybernate.io/restore-from): ignored ([checkpoint] allow_annotation_restore = false on this node): the container starts fresh"
        )],
    );
    remove(tb, &fresh);

    // RESTORE_FROM restores.
    let restored = unique_name("sw-env");
    assert_ok(&run_env(tb, &name, &restored, &[]), "restore by RESTORE_FROM");
    assert_counter_continues(tb, &restored, at_checkpoint);
    tb.wait_log_line(
        &[&format!(
            "restore decision: container {restored} (pod -), checkpoint {name} (environment variable RESTORE_FROM): allowed: "
        )],
    );
    remove(tb, &restored);
    let _ = tb.ctr(&["tasks", "delete", &id]);
}

// ---------------------------------------------------------------------------------------------
// (7) Only committed checkpoints

#[test]
fn hidden_work_directories_in_the_store_are_never_restored_from() {
    let bed = bed();
    let tb = &bed.tb;
    let id = unique_name("hid");
    run_counter(tb, &id, &[]);
    let (dir, _) = store_checkpoint(&bed, &id, true);
    let copy_to = |to: &Path| {
        std::fs::create_dir_all(to.parent().unwrap()).unwrap();
        let status = std::process::Command::new("cp").arg("-a").arg(&dir).arg(to).status().unwrap();
        assert!(status.success());
        kybernate_checkpoint::verify(to).unwrap_or_else(|e| panic!("the copy {} does not verify: {e}", to.display()));
    };
    let container_dir = dir.parent().unwrap();
    let cp = dir.file_name().unwrap().to_string_lossy().into_owned();
    // A partial checkpoint as the shim names it while it writes one, holding a good checkpoint.
    let partial = container_dir.join(format!(".{cp}.partial-{}-0", std::process::id()));
    copy_to(&partial);
    // Any other dot-directory: a hidden container directory, a hidden namespace directory.
    let hidden_container = container_dir.parent().unwrap().join(format!(".{id}")).join(&cp);
    copy_to(&hidden_container);
    let hidden_namespace = bed.store.join(format!(".{}", tb.namespace())).join(&id).join(&cp);
    copy_to(&hidden_namespace);
    // A visible name that leads into a hidden one.
    let alias = container_dir.join("alias");
    std::os::unix::fs::symlink(&partial, &alias).unwrap();

    let cases = [
        (name_of(&bed, &partial), partial.file_name().unwrap().to_string_lossy().into_owned()),
        (partial.display().to_string(), partial.file_name().unwrap().to_string_lossy().into_owned()),
        (name_of(&bed, &hidden_container), format!(".{id}")),
        (name_of(&bed, &hidden_namespace), format!(".{}", tb.namespace())),
        (name_of(&bed, &alias), partial.file_name().unwrap().to_string_lossy().into_owned()),
    ];
    for (reference, hidden) in cases {
        let restored = unique_name("hid-r");
        let err = assert_refused(tb, &restored, &run_annotated_counter(tb, &reference, &restored, &[]));
        assert!(
            err.contains(&format!("{hidden:?} is a hidden work directory"))
                && err.contains("not a committed checkpoint"),
            "{reference}: {err}"
        );
        tb.wait_log_line(&[
            &format!("restore decision: container {restored} (pod -), checkpoint {reference} "),
            "refused: ",
        ]);
    }
    // The committed checkpoint itself restores.
    let restored = unique_name("hid-ok");
    run_restored_ok(&bed, &dir, &restored, &[]);
    assert_eq!(task_status(tb, &restored).as_deref(), Some("RUNNING"));
    remove(tb, &restored);
    let _ = tb.ctr(&["tasks", "delete", &id]);
}

/// CRI names a restore would refuse as broken (`ctr run --annotation io.kubernetes.pod.namespace=Team_A`)
/// are refused at the checkpoint, before anything is frozen: no checkpoint that could never be
/// restored is written, and the container keeps running.
#[test]
fn a_checkpoint_no_restore_would_accept_is_refused_before_freezing() {
    let bed = bed();
    let tb = &bed.tb;
    let id = unique_name("badns");
    run_counter(tb, &id, &["--annotation", "io.kubernetes.pod.namespace=Team_A"]);
    wait_counter(tb, &id, 3);
    let target = store_path(&bed, &id);
    let o = containerd_shim_protos::shim::oci::CheckpointOptions {
        image_path: target.display().to_string(),
        ..Default::default()
    };
    let (code, message) = error_of(checkpoint(tb, &id, o));
    assert_eq!(code, Code::INVALID_ARGUMENT, "{message}");
    assert!(message.contains("pod_namespace \"Team_A\" is not a valid Kubernetes name"), "{message}");
    assert!(!target.exists(), "a checkpoint was written: {}", target.display());
    assert!(entries(target.parent().unwrap()).is_empty(), "partial checkpoint left behind");
    assert_running(tb, &id, "after its refused checkpoint");
    remove(tb, &id);
}
