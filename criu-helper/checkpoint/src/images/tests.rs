//! Reading CRIU images: a synthetic dump written with CRIU's framing and field numbers, and
//! every way a hostile one can be wrong.

use std::path::Path;

use prost::Message;

use super::proto::*;
use super::*;

/// Writes an image: `common` magic (unless inventory), the image's magic, then each entry
/// length-prefixed, as CRIU's `pb_write_one` does.
pub(crate) fn write_image(path: &Path, magic: u32, entries: &[Vec<u8>]) {
    let mut bytes = Vec::new();
    if magic != INVENTORY_MAGIC {
        bytes.extend_from_slice(&IMG_COMMON_MAGIC.to_le_bytes());
    }
    bytes.extend_from_slice(&magic.to_le_bytes());
    for e in entries {
        bytes.extend_from_slice(&(e.len() as u32).to_le_bytes());
        bytes.extend_from_slice(e);
    }
    std::fs::write(path, bytes).unwrap();
}

pub(crate) fn ids(base: u32) -> TaskKobjIdsEntry {
    TaskKobjIdsEntry {
        pid_ns_id: Some(base),
        net_ns_id: Some(base + 1),
        ipc_ns_id: Some(base + 2),
        uts_ns_id: Some(base + 3),
        mnt_ns_id: Some(base + 4),
        user_ns_id: Some(base + 5),
        cgroup_ns_id: Some(base + 6),
    }
}

/// containerd's default capabilities, as words.
pub(crate) fn default_creds() -> CredsEntry {
    CredsEntry {
        uid: 0,
        gid: 0,
        euid: 0,
        egid: 0,
        suid: 0,
        sgid: 0,
        fsuid: 0,
        fsgid: 0,
        cap_inh: vec![0, 0],
        cap_prm: vec![0xa804_25fb, 0],
        cap_eff: vec![0xa804_25fb, 0],
        cap_bnd: vec![0xa804_25fb, 0],
        secbits: 0,
        groups: vec![0],
        lsm_profile: None,
        lsm_sockcreate: None,
        apparmor_data: None,
        no_new_privs: Some(1),
        cap_amb: vec![0, 0],
    }
}

fn core(state: u32, creds: Option<CredsEntry>, seccomp: i32, filter: Option<u32>) -> Vec<u8> {
    CoreEntry {
        tc: Some(TaskCoreEntry { task_state: state, old_seccomp_mode: None, old_seccomp_filter: None }),
        thread_core: Some(ThreadCoreEntry { creds, seccomp_mode: Some(seccomp), seccomp_filter: filter }),
    }
    .encode_to_vec()
}

fn mount(id: u32, parent: u32, at: &str, fstype: u32, ro: bool) -> MntEntry {
    MntEntry {
        fstype,
        mnt_id: id,
        root_dev: id,
        parent_mnt_id: parent,
        flags: u32::from(ro),
        root: "/".into(),
        mountpoint: at.into(),
        source: "none".into(),
        options: String::new(),
        ext_mount: None,
        fsname: None,
        sb_flags: None,
        ext_key: None,
    }
}

/// A dump of a default container: init (pid 1) and a two-threaded child (pid 7), its mount tree,
/// one seccomp filter used by pid 7's second thread.
pub(crate) fn write_dump(dir: &Path) {
    write_image(
        &dir.join("inventory.img"),
        INVENTORY_MAGIC,
        &[InventoryEntry { img_version: 2, root_ids: Some(ids(1)), lsmtype: Some(0) }.encode_to_vec()],
    );
    let pstree =
        [PstreeEntry { pid: 1, ppid: 0, threads: vec![1] }, PstreeEntry { pid: 7, ppid: 1, threads: vec![7, 8] }];
    write_image(&dir.join("pstree.img"), PSTREE_MAGIC, &pstree.iter().map(Message::encode_to_vec).collect::<Vec<_>>());
    write_image(&dir.join("core-1.img"), CORE_MAGIC, &[core(1, Some(default_creds()), 0, None)]);
    write_image(&dir.join("core-7.img"), CORE_MAGIC, &[core(1, Some(default_creds()), 0, None)]);
    write_image(&dir.join("core-8.img"), CORE_MAGIC, &[core(1, Some(default_creds()), 2, Some(0))]);
    for pid in [1, 7] {
        write_image(&dir.join(format!("ids-{pid}.img")), IDS_MAGIC, &[ids(20).encode_to_vec()]);
    }
    let mounts = [
        mount(1, 0, "/", 17, false),
        mount(2, 1, "/proc", FSTYPE_PROC, false),
        mount(3, 1, "/dev", FSTYPE_TMPFS, false),
        mount(4, 1, "/sys", FSTYPE_SYSFS, true),
        // A host bind mount as CRIU 4.x records it: by its key alone, no `ext_mount`.
        MntEntry { ext_key: Some("/data".into()), ..mount(5, 1, "/data", 0, false) },
    ];
    write_image(
        &dir.join("mountpoints-24.img"),
        MNTS_MAGIC,
        &mounts.iter().map(Message::encode_to_vec).collect::<Vec<_>>(),
    );
    let filters = SeccompEntry { seccomp_filters: vec![SeccompFilter { filter: vec![0; 8], prev: None, flags: None }] };
    write_image(&dir.join("seccomp.img"), SECCOMP_MAGIC, &[filters.encode_to_vec()]);
    // Memory is never read: a pages image that blocks whoever opens it.
    nix::unistd::mkfifo(&dir.join("pages-1.img"), nix::sys::stat::Mode::S_IRUSR).unwrap();
}

/// Reads on another thread, failing the test instead of hanging if the reader blocks (it would
/// on the FIFO standing in for the memory pages).
fn read(dir: &Path) -> Result<CheckpointImages, ImageError> {
    let dir = dir.to_path_buf();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(CheckpointImages::read(&dir));
    });
    rx.recv_timeout(std::time::Duration::from_secs(20)).expect("the reader blocked: did it open the pages image?")
}

#[test]
fn a_dump_reads_back_with_every_thread_and_mount_and_never_its_pages() {
    let d = tempfile::tempdir().unwrap();
    write_dump(d.path());
    let imgs = read(d.path()).unwrap();
    assert_eq!(imgs.tasks.len(), 2);
    assert_eq!(imgs.init().pid, 1);
    let child = &imgs.tasks[1];
    assert_eq!(child.threads.iter().map(|t| t.tid).collect::<Vec<_>>(), vec![7, 8]);
    assert_eq!(child.threads[0].seccomp, Seccomp::Disabled);
    assert_eq!(child.threads[1].seccomp, Seccomp::Filter(Some(0)));
    let c = &child.threads[0].creds;
    assert_eq!(c.caps.effective, 0xa804_25fb);
    assert_eq!(c.caps.inheritable, 0);
    assert_eq!(c.no_new_privs, Some(true));
    assert_eq!(imgs.seccomp_filters.len(), 1);
    assert_eq!(imgs.dump_host_ns.unwrap().get(NsKind::Network), Some(2));
    assert_eq!(child.ns.unwrap().get(NsKind::Mount), Some(24));
    let mounts = imgs.container_mounts().unwrap();
    assert_eq!(mounts.len(), 5);
    assert!(mounts.iter().any(|m| m.mountpoint == "/sys" && m.readonly && m.external.is_none()));
    assert_eq!(mounts.iter().find(|m| m.mountpoint == "/data").unwrap().external.as_deref(), Some("/data"));
}

#[test]
fn capability_words_beyond_64_bits_read_as_every_capability() {
    assert_eq!(cap_mask(&[1, 2]), 1 | (2 << 32));
    assert_eq!(cap_mask(&[1, 0, 0]), 1);
    assert_eq!(cap_mask(&[0, 0, 1]), u64::MAX);
}

fn err_of(dir: &Path) -> String {
    read(dir).unwrap_err().to_string()
}

#[test]
fn hostile_framing_is_refused_with_the_file_named() {
    let d = tempfile::tempdir().unwrap();
    write_dump(d.path());
    let core = d.path().join("core-7.img");

    // Another image's magic.
    write_image(&core, PSTREE_MAGIC, &[vec![]]);
    let e = err_of(d.path());
    assert!(e.contains("core-7.img") && e.contains("not a CRIU image of this kind"), "{e}");

    // An entry longer than the file.
    let mut bytes = IMG_COMMON_MAGIC.to_le_bytes().to_vec();
    bytes.extend_from_slice(&CORE_MAGIC.to_le_bytes());
    bytes.extend_from_slice(&u32::MAX.to_le_bytes());
    bytes.extend_from_slice(b"short");
    std::fs::write(&core, &bytes).unwrap();
    let e = err_of(d.path());
    assert!(e.contains("core-7.img: truncated") && e.contains("claims 4294967295 bytes"), "{e}");

    // Half a length.
    std::fs::write(&core, &bytes[..10]).unwrap();
    assert!(err_of(d.path()).contains("truncated"));

    // Not protobuf.
    write_image(&core, CORE_MAGIC, &[vec![0xff; 16]]);
    let e = err_of(d.path());
    assert!(e.contains("core-7.img: entry 0: not a valid core entry"), "{e}");

    // Two cores in one file.
    let one = self::core(1, Some(default_creds()), 0, None);
    write_image(&core, CORE_MAGIC, &[one.clone(), one]);
    assert!(err_of(d.path()).contains("2 entries, want one"));

    // Bigger than any metadata image: refused before it is read.
    let f = std::fs::File::create(&core).unwrap();
    f.set_len(MAX_IMAGE_BYTES + 1).unwrap();
    let e = err_of(d.path());
    assert!(e.contains("core-7.img") && e.contains("more than the"), "{e}");

    // Missing.
    std::fs::remove_file(&core).unwrap();
    assert!(err_of(d.path()).contains("core-7.img: missing"));

    // A directory where an image should be.
    std::fs::create_dir(&core).unwrap();
    assert!(err_of(d.path()).contains("not a regular file"));
}

#[test]
fn a_thread_without_credentials_is_refused_not_restored_as_root() {
    let d = tempfile::tempdir().unwrap();
    write_dump(d.path());
    let no_thread_core = CoreEntry { tc: None, thread_core: None }.encode_to_vec();
    // The second thread of pid 7 (not the leader, whose task core is also missing then).
    let with_tc = CoreEntry {
        tc: Some(TaskCoreEntry { task_state: 1, old_seccomp_mode: None, old_seccomp_filter: None }),
        thread_core: None,
    };
    write_image(&d.path().join("core-8.img"), CORE_MAGIC, &[with_tc.encode_to_vec()]);
    let e = err_of(d.path());
    assert!(e.contains("core-8.img") && e.contains("its own credentials (root, every capability)"), "{e}");
    write_image(&d.path().join("core-7.img"), CORE_MAGIC, &[no_thread_core]);
    assert!(err_of(d.path()).contains("core-7.img: no task core"));
}

#[test]
fn old_images_carry_credentials_in_a_creds_image() {
    let d = tempfile::tempdir().unwrap();
    write_dump(d.path());
    for tid in [7, 8] {
        write_image(&d.path().join(format!("core-{tid}.img")), CORE_MAGIC, &[core(1, None, 0, None)]);
    }
    // Without the creds image the restore would fail in CRIU; so does the read.
    assert!(err_of(d.path()).contains("creds-7.img: missing"));
    let mut creds = default_creds();
    creds.uid = 1000;
    write_image(&d.path().join("creds-7.img"), CREDS_MAGIC, &[creds.encode_to_vec()]);
    let imgs = read(d.path()).unwrap();
    assert!(imgs.tasks[1].threads.iter().all(|t| t.creds.uids[0] == 1000));
}

#[test]
fn the_process_tree_must_name_each_process_once_with_threads() {
    let d = tempfile::tempdir().unwrap();
    write_dump(d.path());
    let pstree = d.path().join("pstree.img");
    write_image(&pstree, PSTREE_MAGIC, &[]);
    assert!(err_of(d.path()).contains("pstree.img: no processes"));
    let dup = PstreeEntry { pid: 1, ppid: 0, threads: vec![1] }.encode_to_vec();
    write_image(&pstree, PSTREE_MAGIC, &[dup.clone(), dup]);
    assert!(err_of(d.path()).contains("pid 1 listed twice"));
    write_image(&pstree, PSTREE_MAGIC, &[PstreeEntry { pid: 1, ppid: 0, threads: vec![] }.encode_to_vec()]);
    assert!(err_of(d.path()).contains("process 1 has no threads"));
    // A zombie has no credentials and no namespaces left.
    write_image(
        &pstree,
        PSTREE_MAGIC,
        &[
            PstreeEntry { pid: 1, ppid: 0, threads: vec![1] }.encode_to_vec(),
            PstreeEntry { pid: 9, ppid: 1, threads: vec![9] }.encode_to_vec(),
        ],
    );
    write_image(&d.path().join("core-9.img"), CORE_MAGIC, &[core(TASK_ZOMBIE, None, 0, None)]);
    let imgs = read(d.path()).unwrap();
    assert!(imgs.tasks[1].is_dead() && imgs.tasks[1].threads.is_empty() && imgs.tasks[1].ns.is_none());
}

#[test]
fn an_unknown_seccomp_mode_is_malformed() {
    let d = tempfile::tempdir().unwrap();
    write_dump(d.path());
    write_image(&d.path().join("core-1.img"), CORE_MAGIC, &[core(1, Some(default_creds()), 7, None)]);
    assert!(err_of(d.path()).contains("unknown seccomp mode 7"));
}

/// A `/dev` tmpfs archive as CRIU writes it (`tar --gzip` of the mount).
pub(crate) fn write_dev_archive(path: &Path, devices: &[(&str, tar::EntryType, u32, u32)], filler: u64) {
    let f = std::fs::File::create(path).unwrap();
    let gz = flate2::write::GzEncoder::new(f, flate2::Compression::fast());
    let mut b = tar::Builder::new(gz);
    for (name, kind, major, minor) in devices {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(*kind);
        h.set_device_major(*major).unwrap();
        h.set_device_minor(*minor).unwrap();
        h.set_size(0);
        h.set_mode(0o666);
        b.append_data(&mut h, name, std::io::empty()).unwrap();
    }
    if filler > 0 {
        let mut h = tar::Header::new_gnu();
        h.set_size(filler);
        h.set_mode(0o644);
        b.append_data(&mut h, "./big", std::io::repeat(0).take(filler)).unwrap();
    }
    b.into_inner().unwrap().finish().unwrap();
}

#[test]
fn device_nodes_of_a_dev_archive_are_listed_and_a_huge_one_is_refused() {
    let d = tempfile::tempdir().unwrap();
    let archive = d.path().join("tmpfs-dev-3.tar.gz.img");
    write_dev_archive(&archive, &[("./sda", tar::EntryType::Block, 8, 0), ("./null", tar::EntryType::Char, 1, 3)], 0);
    let nodes = tmpfs_device_nodes(d.path(), 3, "/dev").unwrap().unwrap();
    assert_eq!(
        nodes,
        vec![
            DeviceNode { path: "/dev/null".into(), kind: 'c', major: 1, minor: 3 },
            DeviceNode { path: "/dev/sda".into(), kind: 'b', major: 8, minor: 0 },
        ]
    );
    assert_eq!(tmpfs_device_nodes(d.path(), 4, "/dev").unwrap(), None, "no archive: an empty tmpfs");
    write_dev_archive(&archive, &[], MAX_DEV_TMPFS_BYTES + 1);
    let e = tmpfs_device_nodes(d.path(), 3, "/dev").unwrap_err().to_string();
    assert!(e.contains("tmpfs-dev-3.tar.gz.img") && e.contains("more than"), "{e}");
    std::fs::write(&archive, b"not gzip").unwrap();
    assert!(tmpfs_device_nodes(d.path(), 3, "/dev").unwrap_err().to_string().contains("not a tar.gz archive"));
}
