//! The credentials check, rule by rule: a default container's dump against specs that grant
//! less, as much, and more. (The end-to-end twins with real CRIU images are in
//! shim/tests/restore_security.rs.)

use serde_json::{json, Value};

use super::*;
use crate::images::{CapSets, Creds, NsIds, Thread};

const DEFAULT_CAPS: u64 = 0xa804_25fb;

fn creds() -> Creds {
    Creds {
        uids: [0; 4],
        gids: [0; 4],
        groups: vec![0],
        caps: CapSets {
            effective: DEFAULT_CAPS,
            permitted: DEFAULT_CAPS,
            inheritable: 0,
            bounding: DEFAULT_CAPS,
            ambient: 0,
        },
        secbits: 0,
        no_new_privs: Some(false),
        lsm_profile: None,
        lsm_sockcreate: None,
        apparmor_data: false,
    }
}

fn ns(base: u32) -> NsIds {
    crate::images::NsIds::from_proto(&crate::images::tests::ids(base))
}

fn task(pid: u32, creds: Creds) -> Task {
    Task {
        pid,
        ppid: 1,
        state: 1,
        ns: Some(ns(20)),
        threads: vec![Thread { tid: pid, creds, seccomp: Seccomp::Disabled }],
    }
}

fn mnt(at: &str, fstype: u32, ro: bool) -> Mount {
    Mount {
        mnt_id: 0,
        parent_mnt_id: 0,
        mountpoint: at.into(),
        root: "/".into(),
        fstype,
        fsname: None,
        source: "none".into(),
        options: String::new(),
        readonly: ro,
        external: None,
        root_dev: 9,
    }
}

/// What runc made for [`default_spec`]: root, /proc, /dev, /sys read-only, /proc/sys read-only,
/// /proc/kcore masked.
fn dump() -> CheckpointImages {
    let mounts = vec![
        mnt("/", 17, false),
        mnt("/proc", images::FSTYPE_PROC, false),
        mnt("/dev", images::FSTYPE_TMPFS, false),
        mnt("/sys", images::FSTYPE_SYSFS, true),
        mnt("/proc/sys", images::FSTYPE_PROC, true),
        Mount { root: "/null".into(), ..mnt("/proc/kcore", images::FSTYPE_TMPFS, false) },
    ];
    CheckpointImages {
        dump_host_ns: Some(ns(1)),
        lsm_type: 0,
        tasks: vec![task(1, creds()), task(7, creds())],
        seccomp_filters: Vec::new(),
        mount_namespaces: BTreeMap::from([(24, mounts)]),
        user_namespaces: BTreeMap::new(),
        apparmor_policies: Vec::new(),
    }
}

/// containerd's default spec, trimmed to what the check reads.
fn default_spec() -> Value {
    let names: Vec<&str> = caps::CONTAINER_DEFAULTS.to_vec();
    json!({
        "process": {"user": {"uid": 0, "gid": 0}, "capabilities": {"bounding": names, "effective": names, "permitted": names}},
        "root": {"path": "rootfs"},
        "mounts": [
            {"destination": "/proc", "type": "proc", "source": "proc"},
            {"destination": "/dev", "type": "tmpfs", "source": "tmpfs"},
            {"destination": "/sys", "type": "sysfs", "source": "sysfs", "options": ["nosuid", "ro"]}
        ],
        "linux": {
            "namespaces": [{"type": "pid"}, {"type": "ipc"}, {"type": "uts"}, {"type": "mount"}, {"type": "network"}],
            "readonlyPaths": ["/proc/sys"],
            "maskedPaths": ["/proc/kcore"]
        }
    })
}

fn host() -> Host<'static> {
    Host { default_label: None, proc_path_exists: &|_| true }
}

fn run(images: &CheckpointImages, spec: &Value) -> Vec<Excess> {
    check(images, &SpecGrants::from_spec(spec).unwrap(), &host())
}

fn text(ex: &[Excess]) -> String {
    Excesses(ex).to_string()
}

fn set(spec: &mut Value, pointer: &str, v: Value) {
    let (parent, key) = pointer.rsplit_once('/').unwrap();
    spec.pointer_mut(parent).unwrap()[key] = v;
}

#[test]
fn a_default_dump_restores_into_a_default_spec() {
    assert_eq!(run(&dump(), &default_spec()), vec![]);
}

#[test]
fn capabilities_beyond_the_spec_are_named_once_per_finding() {
    let mut d = dump();
    let all = caps::ALL & !(1 << 24);
    d.tasks[0].threads[0].creds.caps =
        CapSets { effective: all, permitted: all, inheritable: 0, bounding: all, ambient: 0 };
    let ex = run(&d, &default_spec());
    assert_eq!(ex.len(), 1, "{ex:?}");
    let t = text(&ex);
    assert!(t.starts_with("checkpoint processes (pid 1) hold CAP_DAC_READ_SEARCH"), "{t}");
    assert!(t.contains("CAP_SYS_ADMIN") && !t.contains("CAP_CHOWN") && !t.contains("CAP_SYS_RESOURCE"), "{t}");
    assert!(t.ends_with("(effective, permitted and bounding sets), the new spec does not grant them"), "{t}");
    // One capability added, in one set only.
    let mut d = dump();
    d.tasks[1].threads[0].creds.caps.ambient = 1 << caps::SYS_ADMIN;
    assert_eq!(
        text(&run(&d, &default_spec())),
        "checkpoint processes (pid 7) hold CAP_SYS_ADMIN (ambient set), the new spec does not grant it"
    );
}

#[test]
fn a_root_container_holds_its_bounding_set_whatever_runc_left_permitted() {
    let mut spec = default_spec();
    set(&mut spec, "/process/capabilities/permitted", json!([]));
    set(&mut spec, "/process/capabilities/effective", json!([]));
    assert_eq!(run(&dump(), &spec), vec![], "root gets its bounding set back at every execve");
    set(&mut spec, "/process/user/uid", json!(1000));
    let t = text(&run(&dump(), &spec));
    assert!(t.contains("(effective and permitted sets)"), "{t}");
    assert!(t.contains("run with uid 0, the new spec runs its processes as uid 1000"), "{t}");
}

#[test]
fn ids_need_capabilities_or_the_user_namespace_maps() {
    let mut spec = default_spec();
    let mut d = dump();
    d.tasks[1].threads[0].creds.uids = [1000; 4];
    d.tasks[1].threads[0].creds.groups = vec![0, 44];
    assert_eq!(run(&d, &spec), vec![], "root with CAP_SETUID/CAP_SETGID may become anyone");
    set(&mut spec, "/process/capabilities/bounding", json!(["CAP_CHOWN"]));
    set(&mut spec, "/process/capabilities/permitted", json!(["CAP_CHOWN"]));
    set(&mut spec, "/process/capabilities/effective", json!(["CAP_CHOWN"]));
    let t = text(&run(&d, &spec));
    assert!(
        t.contains("(pid 7) run with uid 1000, the new spec runs its processes as uid 0 and grants no CAP_SETUID"),
        "{t}"
    );
    assert!(t.contains("supplementary group 44"), "{t}");
    // In a user namespace: exactly what the maps cover.
    let mut spec = default_spec();
    spec["linux"]["namespaces"].as_array_mut().unwrap().push(json!({"type": "user"}));
    spec["linux"]["uidMappings"] = json!([{"containerID": 0, "hostID": 100000, "size": 1000}]);
    spec["linux"]["gidMappings"] = json!([{"containerID": 0, "hostID": 100000, "size": 65536}]);
    let mut d = dump();
    d.dump_host_ns = Some(ns(100)); // the checkpoint had its own user namespace too
    d.tasks[1].threads[0].creds.uids = [1000, 999, 999, 999];
    let t = text(&run(&d, &spec));
    assert!(t.contains("run with uid 1000, which the new spec's user namespace does not map"), "{t}");
    d.tasks[1].threads[0].creds.uids = [999; 4];
    assert_eq!(run(&d, &spec), vec![]);
}

#[test]
fn no_new_privs_and_loosening_securebits() {
    let mut spec = default_spec();
    spec["process"]["noNewPrivileges"] = json!(true);
    let mut d = dump();
    d.tasks[0].threads[0].creds.no_new_privs = Some(true);
    d.tasks[1].threads[0].creds.no_new_privs = None;
    let t = text(&run(&d, &spec));
    assert_eq!(t, "no_new_privs: the checkpoint does not record it for processes (pid 7), the new spec sets it");
    d.tasks[1].threads[0].creds.no_new_privs = Some(false);
    assert!(text(&run(&d, &spec)).contains("(pid 7) run without it, the new spec sets it"));
    // The reverse is a restriction the checkpoint keeps.
    assert_eq!(run(&dump(), &default_spec()), vec![]);

    let mut d = dump();
    d.tasks[0].threads[0].creds.secbits = SECBIT_NO_SETUID_FIXUP | 1; // + NOROOT, a restriction
    assert_eq!(run(&d, &default_spec()), vec![], "CAP_SETPCAP is granted");
    let mut spec = default_spec();
    for s in ["bounding", "permitted", "effective"] {
        set(&mut spec, &format!("/process/capabilities/{s}"), json!(["CAP_CHOWN"]));
    }
    d.tasks[0].threads[0].creds.caps = CapSets { effective: 1, permitted: 1, inheritable: 0, bounding: 1, ambient: 0 };
    d.tasks[1].threads[0].creds.caps = d.tasks[0].threads[0].creds.caps;
    let t = text(&run(&d, &spec));
    assert!(t.contains("securebits 0x4") && t.contains("need CAP_SETPCAP"), "{t}");
}

#[test]
fn seccomp_is_required_where_the_spec_installs_a_profile() {
    let mut spec = default_spec();
    spec["linux"]["seccomp"] = json!({"defaultAction": "SCMP_ACT_ERRNO", "syscalls": []});
    assert_eq!(
        text(&run(&dump(), &spec)),
        "seccomp: the checkpoint has none for processes (pids 1, 7), the spec requires one (defaultAction SCMP_ACT_ERRNO)"
    );
    let mut d = dump();
    d.seccomp_filters.push(crate::images::proto::SeccompFilter { filter: vec![0; 8], prev: None, flags: None });
    d.tasks[0].threads[0].seccomp = Seccomp::Filter(Some(0));
    d.tasks[1].threads[0].seccomp = Seccomp::Strict;
    assert_eq!(run(&d, &spec), vec![]);
    d.tasks[1].threads[0].seccomp = Seccomp::Filter(Some(3));
    assert_eq!(
        text(&run(&d, &spec)),
        "seccomp: process 7 refers to filter 3, seccomp.img has 1: the checkpoint is malformed"
    );
}

#[test]
fn lsm_labels_must_be_the_ones_the_container_gets() {
    let mut d = dump();
    d.lsm_type = 2; // AppArmor
    let mut spec = default_spec();
    spec["process"]["apparmorProfile"] = json!("cri-containerd.apparmor.d");
    d.tasks[0].threads[0].creds.lsm_profile = Some("cri-containerd.apparmor.d (enforce)".into());
    d.tasks[1].threads[0].creds.lsm_profile = Some("unconfined".into());
    let t = text(&run(&d, &spec));
    assert_eq!(
        t,
        "LSM label: checkpoint processes (pid 7) run as \"unconfined\", the new container's processes run as \"cri-containerd.apparmor.d\""
    );
    d.tasks[1].threads[0].creds.lsm_profile = Some("cri-containerd.apparmor.d (complain)".into());
    assert!(text(&run(&d, &spec)).contains("(complain)"), "complain mode enforces nothing");
    // No profile in the spec: the runtime's own label; unconfined there admits any profile.
    let h = Host { default_label: Some("unconfined".into()), proc_path_exists: &|_| true };
    assert_eq!(check(&d, &SpecGrants::from_spec(&default_spec()).unwrap(), &h), vec![]);
    // SELinux labels compare exactly.
    d.lsm_type = 1;
    spec["process"]["selinuxLabel"] = json!("system_u:system_r:container_t:s0:c1,c2");
    d.tasks[0].threads[0].creds.lsm_profile = Some("system_u:system_r:container_t:s0:c1,c2".into());
    d.tasks[1].threads[0].creds.lsm_profile = Some("system_u:system_r:spc_t:s0".into());
    assert!(text(&run(&d, &spec)).contains("\"system_u:system_r:spc_t:s0\""));
}

#[test]
fn apparmor_policies_need_mac_admin() {
    let mut d = dump();
    d.apparmor_policies = vec![":root//evil".into()];
    assert!(text(&run(&d, &default_spec())).contains("AppArmor policies :root//evil"));
    let mut spec = default_spec();
    spec["process"]["capabilities"]["bounding"].as_array_mut().unwrap().push(json!("CAP_MAC_ADMIN"));
    // MAC_ADMIN is then holdable (root), but the dump's own processes do not hold it: fine.
    assert_eq!(run(&d, &spec), vec![]);
}

#[test]
fn namespaces_of_the_host_or_nested_ones_are_excesses() {
    // Taken with the host's network (the checkpoint's init shares the dumping CRIU's).
    let mut d = dump();
    let mut host_net = ns(20);
    host_net.set(NsKind::Network, Some(2));
    d.tasks[0].ns = Some(host_net);
    d.tasks[1].ns = Some(host_net);
    assert_eq!(
        text(&run(&d, &default_spec())),
        "the checkpoint was taken in the host's network namespace, the new spec gives the container its own (CRIU would restore it into the host's)"
    );
    // ... fine for a spec that shares the host's network itself, or joins a network namespace
    // by path (a CRI pod's, host network or not): runc restores into the one it names.
    let mut spec = default_spec();
    spec["linux"]["namespaces"] = json!([{"type": "pid"}, {"type": "ipc"}, {"type": "uts"}, {"type": "mount"}]);
    assert_eq!(run(&d, &spec), vec![]);
    spec["linux"]["namespaces"].as_array_mut().unwrap().push(json!({"type": "network", "path": "/proc/42/ns/net"}));
    spec["linux"]["namespaces"].as_array_mut().unwrap().push(json!({"type": "time"}));
    assert_eq!(run(&d, &spec), vec![]);

    // One process entered the host's mount namespace, another made its own.
    let mut d = dump();
    d.tasks.push(task(9, creds()));
    let mut host_mnt = ns(20);
    host_mnt.set(NsKind::Mount, Some(5));
    d.tasks[1].ns = Some(host_mnt);
    let mut nested = ns(20);
    nested.set(NsKind::Mount, Some(77));
    d.tasks[2].ns = Some(nested);
    let t = text(&run(&d, &default_spec()));
    assert!(t.contains("(pid 7) live in the host's mount namespace"), "{t}");
    assert!(t.contains("(pid 9) live in a nested mount namespace; creating one needs CAP_SYS_ADMIN"), "{t}");
    let mut spec = default_spec();
    spec["process"]["capabilities"]["bounding"].as_array_mut().unwrap().push(json!("CAP_SYS_ADMIN"));
    let t = text(&run(&d, &spec));
    assert!(t.contains("host's mount namespace") && !t.contains("nested"), "{t}");
}

#[test]
fn mounts_the_spec_does_not_make_or_protect_are_excesses() {
    let spec = default_spec();
    // Host bind mounts: only where the spec has its own (then its source is used at restore).
    let mut d = dump();
    let mut host = mnt("/host", 0, false);
    host.external = Some("/host".into());
    let mut cgroup = mnt("/sys/fs/cgroup/cpu", 0, false);
    cgroup.external = Some("/sys/fs/cgroup/cpu".into());
    let mut masked = mnt("/proc/kcore", 0, false);
    masked.external = Some("/dev/null".into());
    d.mount_namespaces.get_mut(&24).unwrap().extend([host, cgroup, masked]);
    let t = text(&run(&d, &spec));
    assert_eq!(
        t,
        "the checkpoint has a host mount at /host, the new spec does not mount anything there; \
         the checkpoint has a host mount at /sys/fs/cgroup/cpu, the new spec does not mount anything there"
    );
    let mut spec2 = spec.clone();
    spec2["mounts"].as_array_mut().unwrap().extend([
        json!({"destination": "/host", "type": "bind", "source": "/srv/data", "options": ["rbind"]}),
        json!({"destination": "/sys/fs/cgroup", "type": "cgroup", "source": "cgroup"}),
    ]);
    assert_eq!(run(&d, &spec2), vec![]);
    // A read-only cgroup mount: runc's v1 emulation is a writable tmpfs with read-only controllers.
    let mut ro_cgroup = spec2.clone();
    ro_cgroup["mounts"][4]["options"] = json!(["ro"]);
    d.mount_namespaces.get_mut(&24).unwrap().push(mnt("/sys/fs/cgroup", images::FSTYPE_TMPFS, false));
    assert_eq!(
        text(&run(&d, &ro_cgroup)),
        "/sys/fs/cgroup/cpu is read-write in the checkpoint, the new spec mounts it read-only"
    );
    d.mount_namespaces
        .get_mut(&24)
        .unwrap()
        .iter_mut()
        .find(|m| m.mountpoint == "/sys/fs/cgroup/cpu")
        .unwrap()
        .readonly = true;
    assert_eq!(run(&d, &ro_cgroup), vec![]);
    d.mount_namespaces.get_mut(&24).unwrap().last_mut().unwrap().fstype = images::FSTYPE_CGROUP2;
    assert_eq!(
        text(&run(&d, &ro_cgroup)),
        "/sys/fs/cgroup is read-write in the checkpoint, the new spec mounts it read-only"
    );
    d.mount_namespaces.get_mut(&24).unwrap().pop();
    // The spec's source is mounted with the checkpoint's flags: read-only must stay so.
    let mut ro = spec2.clone();
    ro["mounts"][3]["options"] = json!(["rbind", "ro"]);
    assert_eq!(text(&run(&d, &ro)), "/host is read-write in the checkpoint, the new spec mounts it read-only");
    // Keyed "/dev/null" (runc's masks over files) only where the spec masks something.
    let mut unmasked = spec2.clone();
    unmasked["linux"]["maskedPaths"] = json!([]);
    assert_eq!(
        text(&run(&d, &unmasked)),
        "the checkpoint masks /proc/kcore with the host's /dev/null, the new spec masks no paths"
    );
    // Names from the images reach terminals and logs with control characters escaped.
    let mut evil = mnt("/x\u{1b}[2J", 0, false);
    evil.external = Some("/x\u{1b}[2J".into());
    d.mount_namespaces.get_mut(&24).unwrap().push(evil);
    let t = text(&run(&d, &spec2));
    assert!(t.contains("host mount at /x\\u{1b}[2J") && !t.contains('\u{1b}'), "{t}");

    // /sys writable, /proc/sys writable, /proc/kcore unmasked, a devtmpfs as /dev, a tmpfs of its own.
    let mut d = dump();
    let mounts = d.mount_namespaces.get_mut(&24).unwrap();
    mounts.retain(|m| m.mountpoint != "/proc/sys");
    // A writable tmpfs over /proc/kcore hides nothing from whoever writes it.
    mounts.iter_mut().find(|m| m.mountpoint == "/proc/kcore").unwrap().root = "/".into();
    mounts.iter_mut().find(|m| m.mountpoint == "/sys").unwrap().readonly = false;
    mounts.iter_mut().find(|m| m.mountpoint == "/dev").unwrap().fstype = 3;
    mounts.push(mnt("/mnt", images::FSTYPE_TMPFS, false));
    let t = text(&run(&d, &spec));
    for want in [
        "the checkpoint has a devtmpfs mount at /dev, the new spec mounts a tmpfs there",
        "the checkpoint has a tmpfs mount at /mnt that the new spec does not make; mounting needs CAP_SYS_ADMIN",
        "/sys is read-write in the checkpoint, the new spec mounts it read-only",
        "/proc/sys is read-write in the checkpoint, the new spec makes it read-only (linux.readonlyPaths)",
        "/proc/kcore is not masked in the checkpoint, the new spec masks it",
    ] {
        assert!(t.contains(want), "want {want:?} in: {t}");
    }
    // Paths this kernel does not have are masked by nobody.
    let h = Host { default_label: None, proc_path_exists: &|p| p != "/proc/kcore" && p != "/proc/sys" };
    let t = Excesses(&check(&d, &SpecGrants::from_spec(&spec).unwrap(), &h)).to_string();
    assert!(!t.contains("/proc/kcore") && !t.contains("/proc/sys"), "{t}");

    // A read-only root.
    let mut spec3 = spec.clone();
    spec3["root"]["readonly"] = json!(true);
    assert!(text(&run(&dump(), &spec3))
        .contains("/ is read-write in the checkpoint, the new spec makes the root filesystem read-only"));

    // The console of a terminal container is runc's own bind mount.
    let mut d = dump();
    d.mount_namespaces.get_mut(&24).unwrap().push(mnt("/dev/console", images::FSTYPE_DEVPTS, false));
    assert!(text(&run(&d, &spec)).contains("/dev/console"));
    let mut tty = spec.clone();
    tty["process"]["terminal"] = json!(true);
    assert_eq!(run(&d, &tty), vec![]);
}

#[test]
fn dev_device_nodes_must_be_the_specs_or_runcs() {
    let dir = tempfile::tempdir().unwrap();
    crate::images::tests::write_dev_archive(
        &dir.path().join("tmpfs-dev-9.tar.gz.img"),
        &[
            ("./null", tar::EntryType::Char, 1, 3),
            ("./sda", tar::EntryType::Block, 8, 0),
            ("./nvidia0", tar::EntryType::Char, 195, 0),
        ],
        0,
    );
    let spec = SpecGrants::from_spec(&default_spec()).unwrap();
    let ex = check_devices(dir.path(), &dump(), &spec).unwrap();
    assert_eq!(
        text(&ex),
        "the checkpoint's /dev has device nodes /dev/nvidia0 (c 195:0), /dev/sda (b 8:0), the new spec does not give the container these devices"
    );
    let mut with = default_spec();
    with["linux"]["devices"] = json!([
        {"path": "/dev/nvidia0", "type": "c", "major": 195, "minor": 0},
        {"path": "/dev/xvda", "type": "b", "major": 8, "minor": 0}
    ]);
    assert_eq!(check_devices(dir.path(), &dump(), &SpecGrants::from_spec(&with).unwrap()).unwrap(), vec![]);
}

#[test]
fn check_restore_reads_the_images_and_names_what_is_unreadable() {
    let dir = tempfile::tempdir().unwrap();
    crate::images::tests::write_dump(dir.path());
    let bare = json!({"process": {"user": {"uid": 0}}});
    let e = check_restore(dir.path(), &bare, &host()).unwrap_err();
    assert_eq!(e.to_string(), "the checkpoint has a host mount at /data, the new spec does not mount anything there");
    let with_data = json!({"process": {"user": {"uid": 0}},
                           "mounts": [{"destination": "/data", "type": "bind", "source": "/srv/data", "options": ["rbind"]}]});
    let s = check_restore(dir.path(), &with_data, &host()).unwrap();
    assert_eq!(s.to_string(), "2 processes, 3 threads, 5 mounts");
    let e = check_restore(dir.path(), &json!({"process": {"capabilities": {"bounding": 3}}}), &host()).unwrap_err();
    assert!(matches!(e, GrantError::Spec(_)) && e.to_string().contains("process.capabilities.bounding"), "{e}");
    std::fs::remove_file(dir.path().join("pstree.img")).unwrap();
    let e = check_restore(dir.path(), &default_spec(), &host()).unwrap_err();
    assert!(e.to_string().starts_with("the checkpoint's CRIU images cannot be checked: "), "{e}");
}
