//! The Debian package from packaging/deb/build.sh, built from the binaries cargo built for this
//! test run (debug ones: the test is about the package): its control data, its contents, and a
//! real install, upgrade, remove and purge with dpkg into a scratch root (`dpkg --root`), and an
//! `apt-get install` on a fresh Debian bookworm rootfs next to Debian's containerd and runc.

use std::collections::BTreeSet;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use kybernate_runtime_select::Config;
use kybernate_testbed::{BASE_ROOTFS, NODE_DEBS};

mod common;

use common::{built_binaries, show, BINARIES};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn run(cmd: &mut Command) -> String {
    let out = cmd.stdin(Stdio::null()).output().unwrap();
    assert!(out.status.success(), "{cmd:?}: {}", show(&out));
    String::from_utf8(out.stdout).unwrap()
}

fn arch() -> String {
    run(Command::new("dpkg").arg("--print-architecture")).trim().to_string()
}

/// `packaging/deb/build.sh --bin-dir BIN --out OUT --version VERSION --compression none`.
fn build(bin: &Path, out: &Path, version: &str) -> PathBuf {
    let stdout = run(Command::new("bash")
        .arg(repo().join("packaging/deb/build.sh"))
        .arg("--bin-dir")
        .arg(bin)
        .arg("--out")
        .arg(out)
        .args(["--version", version, "--compression", "none"]));
    let deb = PathBuf::from(stdout.trim());
    assert_eq!(deb, out.join(format!("kybernate_{version}_{}.deb", arch())));
    assert!(deb.is_file());
    deb
}

/// `ar t DEB`: the members of a .deb, in order.
fn members(deb: &Path) -> Vec<String> {
    run(Command::new("ar").arg("t").arg(deb)).lines().map(String::from).collect()
}

fn field(deb: &Path, name: &str) -> String {
    run(Command::new("dpkg-deb").arg("--field").arg(deb).arg(name)).trim().to_string()
}

fn same_file_content(a: &Path, b: &Path) -> bool {
    Command::new("cmp").arg("-s").arg(a).arg(b).status().unwrap().success()
}

#[test]
fn package_metadata_and_contents() {
    let tmp = tempfile::tempdir().unwrap();
    let bin = built_binaries(&tmp.path().join("bin"));
    let deb = build(&bin, &tmp.path().join("out"), "1.2.3~test1");

    let info = run(Command::new("dpkg-deb").arg("--info").arg(&deb));
    assert!(info.contains(" Package: kybernate\n"), "{info}");
    // --compression none: plain tar members.
    assert_eq!(members(&deb), ["debian-binary", "control.tar", "data.tar"]);
    assert_eq!(field(&deb, "Version"), "1.2.3~test1");
    assert_eq!(field(&deb, "Architecture"), arch());
    let depends = field(&deb, "Depends");
    for dep in ["libc6 (>= ", "containerd (>= 1.6)", "runc"] {
        assert!(depends.contains(dep), "Depends lacks {dep}: {depends}");
    }
    assert_eq!(field(&deb, "Recommends"), "criu (>= 4.1), iptables");
    assert!(field(&deb, "Maintainer").contains('<'));

    // Contents: paths, modes and root ownership.
    let contents = run(Command::new("dpkg-deb").arg("--contents").arg(&deb));
    let entries: Vec<(&str, &str, &str)> = contents
        .lines()
        .map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f[0], f[1], *f.last().unwrap())
        })
        .collect();
    assert!(entries.iter().all(|(_, owner, _)| *owner == "root/root"), "{contents}");
    let mode_of = |path: &str| entries.iter().find(|(_, _, p)| *p == path).map(|(m, _, _)| *m);
    for name in BINARIES {
        assert_eq!(mode_of(&format!("./usr/bin/{name}")), Some("-rwxr-xr-x"), "{contents}");
    }
    for path in [
        "./etc/kybernate/config.toml",
        "./usr/share/kybernate/containerd/v2-runtime-type.toml",
        "./usr/share/kybernate/containerd/v2-runtime-path.toml",
        "./usr/share/kybernate/containerd/v3-runtime-type.toml",
        "./usr/share/kybernate/containerd/v3-runtime-path.toml",
        "./usr/share/kybernate/kubernetes/runtimeclass.yaml",
        "./usr/share/kybernate/kubernetes/runtimeclass-gpu.yaml",
        "./usr/share/doc/kybernate/README.md",
        "./usr/share/doc/kybernate/copyright",
        "./usr/share/doc/kybernate/docs/installation.md",
    ] {
        assert_eq!(mode_of(path), Some("-rw-r--r--"), "{path}: {contents}");
    }
    assert!(entries.iter().filter(|(m, _, _)| m.starts_with('d')).all(|(m, _, _)| *m == "drwxr-xr-x"), "{contents}");

    // Extracted: the files are the ones from the tree and the build.
    let x = tmp.path().join("x");
    run(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&x));
    for name in BINARIES {
        assert!(same_file_content(&x.join("usr/bin").join(name), &bin.join(name)), "{name}");
    }
    let read = |p: &Path| fs::read_to_string(p).unwrap();
    assert_eq!(read(&x.join("etc/kybernate/config.toml")), read(&repo().join("packaging/deb/config.toml")));
    for page in fs::read_dir(repo().join("docs")).unwrap().map(|e| e.unwrap().path()) {
        if page.extension().is_some_and(|e| e == "md") {
            let name = page.file_name().unwrap();
            assert_eq!(read(&x.join("usr/share/doc/kybernate/docs").join(name)), read(&page), "{name:?}");
        }
    }
    let copyright = read(&x.join("usr/share/doc/kybernate/copyright"));
    assert!(copyright.contains("License: Apache-2.0"), "{copyright}");
    assert!(copyright.contains("/usr/share/common-licenses/Apache-2.0"), "{copyright}");

    // Control files: the conffile list, and md5sums that check out.
    let ctrl = tmp.path().join("DEBIAN");
    run(Command::new("dpkg-deb").arg("-e").arg(&deb).arg(&ctrl));
    assert_eq!(read(&ctrl.join("conffiles")), "/etc/kybernate/config.toml\n");
    let md5sums = read(&ctrl.join("md5sums"));
    assert!(!md5sums.contains("etc/kybernate"), "conffiles are not in md5sums: {md5sums}");
    assert!(md5sums.contains("  usr/bin/kybernate\n"), "{md5sums}");
    run(Command::new("md5sum").arg("--check").arg("--quiet").arg(ctrl.join("md5sums")).current_dir(&x));
    let scripts: Vec<String> =
        fs::read_dir(&ctrl).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into()).collect();
    let scripts: BTreeSet<String> = scripts.into_iter().collect();
    assert_eq!(scripts, ["conffiles", "control", "md5sums"].map(String::from).into(), "no maintainer scripts");
}

/// build.sh with its defaults (no --version, no --compression) and with `--maintainer`. The
/// binaries are small stand-ins (copies of /usr/bin/true): xz over the 300 MB of debug binaries
/// would take a minute or more on two cores, and the other tests check the real ones.
#[test]
fn defaults_compress_with_xz_and_maintainer_reaches_the_control_file() {
    let tmp = tempfile::tempdir().unwrap();
    let bin = tmp.path().join("bin");
    fs::create_dir_all(&bin).unwrap();
    for name in BINARIES {
        fs::copy("/usr/bin/true", bin.join(name)).unwrap();
    }
    let workspace = fs::read_to_string(repo().join("Cargo.toml")).unwrap();
    let version = workspace
        .split("[workspace.package]")
        .nth(1)
        .and_then(|s| s.lines().find_map(|l| l.strip_prefix("version = \"")))
        .and_then(|v| v.strip_suffix('"'))
        .expect("the workspace version");
    let build = |out: &str, args: &[&str], env_maintainer: Option<&str>| -> PathBuf {
        let mut cmd = Command::new("bash");
        cmd.arg(repo().join("packaging/deb/build.sh"))
            .arg("--bin-dir")
            .arg(&bin)
            .arg("--out")
            .arg(tmp.path().join(out));
        cmd.args(args).env_remove("DEB_MAINTAINER");
        if let Some(m) = env_maintainer {
            cmd.env("DEB_MAINTAINER", m);
        }
        let deb = PathBuf::from(run(&mut cmd).trim());
        assert_eq!(deb, tmp.path().join(out).join(format!("kybernate_{version}_{}.deb", arch())));
        deb
    };

    // Defaults: the workspace's version, xz, the placeholder maintainer.
    let deb = build("default", &[], None);
    assert_eq!(field(&deb, "Version"), version);
    assert_eq!(members(&deb), ["debian-binary", "control.tar.xz", "data.tar.xz"]);
    let data = Command::new("ar").arg("p").arg(&deb).arg("data.tar.xz").output().unwrap();
    assert!(data.status.success(), "{}", show(&data));
    assert!(data.stdout.starts_with(b"\xfd7zXZ\0"), "data.tar.xz is not xz data");
    let info = run(Command::new("dpkg-deb").arg("--info").arg(&deb));
    assert!(info.contains(" Maintainer: Kybernate developers <noreply@kybernate.invalid>\n"), "{info}");
    let contents = run(Command::new("dpkg-deb").arg("--contents").arg(&deb));
    assert!(contents.lines().any(|l| l.ends_with(" ./usr/bin/kybernate")), "{contents}");

    // DEB_MAINTAINER, and --maintainer over it.
    let deb = build("env", &[], Some("Env Builder <env@example.org>"));
    assert_eq!(field(&deb, "Maintainer"), "Env Builder <env@example.org>");
    let maintainer = "Jane Doe <jane.doe@example.org>";
    let deb = build("flag", &["--maintainer", maintainer], Some("Env Builder <env@example.org>"));
    assert_eq!(field(&deb, "Maintainer"), maintainer);
    let ctrl = tmp.path().join("DEBIAN");
    run(Command::new("dpkg-deb").arg("-e").arg(&deb).arg(&ctrl));
    let control = fs::read_to_string(ctrl.join("control")).unwrap();
    assert_eq!(
        control.lines().filter(|l| l.starts_with("Maintainer:")).collect::<Vec<_>>(),
        [format!("Maintainer: {maintainer}")]
    );
}

/// A dpkg database in a scratch root: `dpkg --root=ROOT` installs into it as into a node.
struct ScratchRoot {
    root: PathBuf,
}

impl ScratchRoot {
    fn new(root: PathBuf) -> Self {
        let db = root.join("var/lib/dpkg");
        for dir in ["updates", "info", "triggers"] {
            fs::create_dir_all(db.join(dir)).unwrap();
        }
        fs::write(db.join("status"), "").unwrap();
        fs::write(db.join("available"), "").unwrap();
        Self { root }
    }

    /// dpkg --root=ROOT ARGS, without the node's dependencies (containerd, libc6) in its database.
    fn dpkg(&self, args: &[&str]) -> String {
        run(Command::new("dpkg")
            .arg(format!("--root={}", self.root.display()))
            .args(["--force-not-root", "--force-depends", "--force-confold"])
            .args(args))
    }

    fn status(&self) -> String {
        let out = Command::new("dpkg-query")
            .arg(format!("--root={}", self.root.display()))
            .args(["--show", "--showformat=${Status} ${Version}", "kybernate"])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

#[test]
fn installs_upgrades_and_removes_in_a_scratch_root() {
    let tmp = tempfile::tempdir().unwrap();
    let bin = built_binaries(&tmp.path().join("bin"));
    let deb = build(&bin, &tmp.path().join("out"), "0.1.0");
    let node = ScratchRoot::new(tmp.path().join("root"));
    let root = &node.root;

    node.dpkg(&["--install", deb.to_str().unwrap()]);
    assert_eq!(node.status(), "install ok installed 0.1.0");
    let listed = node.dpkg(&["-L", "kybernate"]);
    for path in [
        "/usr/bin/kybernate",
        "/usr/bin/containerd-shim-kybernate-v1",
        "/usr/bin/kybernate-select",
        "/etc/kybernate/config.toml",
        "/usr/share/kybernate/containerd/v2-runtime-type.toml",
    ] {
        assert!(listed.lines().any(|l| l == path), "{path} not listed:\n{listed}");
    }
    let version = run(Command::new(root.join("usr/bin/kybernate")).arg("--version"));
    assert!(version.starts_with("kybernate "), "{version}");
    let conffiles = fs::read_to_string(root.join("var/lib/dpkg/info/kybernate.conffiles")).unwrap();
    assert_eq!(conffiles, "/etc/kybernate/config.toml\n");
    // The installed CLI accepts the installed default config (exit 0; a bad key would be exit 2).
    run(Command::new(root.join("usr/bin/kybernate"))
        .arg("--config")
        .arg(root.join("etc/kybernate/config.toml"))
        .args(["-o", "json", "list"]));

    // The admin's edit of the conffile survives an upgrade.
    let edited = "[checkpoint]\nroot = \"/srv/checkpoints\"\n";
    fs::write(root.join("etc/kybernate/config.toml"), edited).unwrap();
    let upgrade = build(&bin, &tmp.path().join("out"), "0.1.1");
    node.dpkg(&["--install", upgrade.to_str().unwrap()]);
    assert_eq!(node.status(), "install ok installed 0.1.1");
    assert_eq!(fs::read_to_string(root.join("etc/kybernate/config.toml")).unwrap(), edited);

    // Remove: the files go, the conffile stays; purge takes it too.
    node.dpkg(&["--remove", "kybernate"]);
    assert_eq!(node.status(), "deinstall ok config-files 0.1.1");
    for name in BINARIES {
        assert!(!root.join("usr/bin").join(name).exists(), "{name} left behind");
    }
    assert!(!root.join("usr/share/kybernate").exists());
    assert!(!root.join("usr/share/doc/kybernate").exists());
    assert_eq!(fs::read_to_string(root.join("etc/kybernate/config.toml")).unwrap(), edited);
    node.dpkg(&["--purge", "kybernate"]);
    assert!(!root.join("etc/kybernate").exists());
}

/// A fresh Debian node: the minbase bookworm rootfs, chrooted in private mount and PID namespaces
/// (its /proc mounted there; nothing it starts outlives the command).
struct FreshDebian {
    root: PathBuf,
}

impl FreshDebian {
    fn new(root: PathBuf) -> Self {
        fs::create_dir_all(&root).unwrap();
        run(Command::new("tar").arg("-xf").arg(BASE_ROOTFS).arg("-C").arg(&root));
        // Debian's way of keeping package scripts in a chroot from starting services.
        let policy = root.join("usr/sbin/policy-rc.d");
        fs::write(&policy, "#!/bin/sh\nexit 101\n").unwrap();
        fs::set_permissions(&policy, fs::Permissions::from_mode(0o755)).unwrap();
        Self { root }
    }

    /// ARGS run inside, with a clean environment.
    fn command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new("unshare");
        cmd.args(["--mount", "--pid", "--fork"])
            .arg(format!("--mount-proc={}", self.root.join("proc").display()))
            .arg("chroot")
            .arg(&self.root)
            .args(["env", "-i", "PATH=/usr/sbin:/usr/bin:/sbin:/bin", "DEBIAN_FRONTEND=noninteractive"])
            .args(args)
            .stdin(Stdio::null());
        cmd
    }

    fn run(&self, args: &[&str]) -> String {
        run(&mut self.command(args))
    }

    fn status(&self, package: &str) -> String {
        let out = self.command(&["dpkg-query", "--show", "--showformat=${Status}", package]).output().unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

/// `apt-get install ./kybernate_*.deb` on a fresh Debian bookworm, as installation.md gives it:
/// apt refuses it while no containerd and runc can be had, and installs it with Debian's own
/// containerd and runc (the .debs apt would fetch, from test/setup.sh). Then the installed CLI
/// registers the runtime, and Debian's containerd reads the result.
#[test]
fn apt_installs_the_package_on_a_fresh_debian_with_debians_containerd_and_runc() {
    let tmp = tempfile::tempdir().unwrap();
    let bin = built_binaries(&tmp.path().join("bin"));
    let node = FreshDebian::new(tmp.path().join("root"));
    let debs = node.root.join("tmp/debs");
    let deb = build(&bin, &debs, "0.1.0");
    let ours = format!("/tmp/debs/{}", deb.file_name().unwrap().to_str().unwrap());
    let mut theirs = Vec::new();
    for package in ["containerd", "runc"] {
        let found: Vec<PathBuf> = fs::read_dir(NODE_DEBS)
            .unwrap_or_else(|e| panic!("{NODE_DEBS}: {e} (run test/setup.sh)"))
            .map(|e| e.unwrap().path())
            .filter(|p| p.file_name().unwrap().to_str().unwrap().starts_with(&format!("{package}_")))
            .collect();
        assert_eq!(found.len(), 1, "{package} in {NODE_DEBS}: {found:?}");
        let name = found[0].file_name().unwrap().to_str().unwrap();
        fs::copy(&found[0], debs.join(name)).unwrap();
        theirs.push(format!("/tmp/debs/{name}"));
    }
    let install = ["apt-get", "install", "-q", "-y", "--no-install-recommends"];

    // Alone, our package does not install: its Depends name containerd and runc.
    let out = node.command(&[&install[..], &[ours.as_str()]].concat()).output().unwrap();
    assert!(!out.status.success(), "{}", show(&out));
    let said = String::from_utf8_lossy(&out.stdout);
    for dep in ["Depends: containerd (>= 1.6)", "containerd.io (>= 1.6)", "Depends: runc"] {
        assert!(said.contains(dep), "{dep}: {}", show(&out));
    }
    assert_eq!(node.status("kybernate"), "");

    // With them it does; apt set up all three.
    let args: Vec<&str> =
        install.iter().copied().chain([ours.as_str()]).chain(theirs.iter().map(String::as_str)).collect();
    node.run(&args);
    for package in ["kybernate", "containerd", "runc"] {
        assert_eq!(node.status(package), "install ok installed", "{package}");
    }
    let version = node.run(&["kybernate", "--version"]);
    assert!(version.starts_with("kybernate 0.1.0"), "{version}");

    // The installed CLI registers the runtime (installation.md's next step) in Debian's stock
    // containerd config, and Debian's containerd 1.6 reads the runtime back from it.
    let stock = fs::read_to_string(node.root.join("etc/containerd/config.toml")).unwrap();
    let said = node.run(&["kybernate", "containerd-config", "install"]);
    assert!(said.contains("result              installed"), "{said}");
    let dumped = node.run(&["containerd", "--config", "/etc/containerd/config.toml", "config", "dump"]);
    let table = dumped
        .split("[plugins.\"io.containerd.grpc.v1.cri\".containerd.runtimes.kybernate]")
        .nth(1)
        .unwrap_or_else(|| panic!("containerd does not list the runtime:\n{dumped}"));
    let table =
        &table[..table.find("[plugins.\"io.containerd.grpc.v1.cri\".containerd.runtimes.runc]").unwrap_or(table.len())];
    for line in [
        "runtime_type = \"io.containerd.kybernate.v1\"",
        "pod_annotations = [\"kybernate.io/*\"]",
        "ConfigPath = \"/etc/kybernate/config.toml\"",
    ] {
        assert!(table.contains(line), "{line}:\n{table}");
    }
    let backups: Vec<String> = fs::read_dir(node.root.join("etc/containerd"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("config.toml.kybernate-backup-"))
        .collect();
    assert_eq!(backups.len(), 1, "{backups:?}");
    assert_eq!(fs::read_to_string(node.root.join("etc/containerd").join(&backups[0])).unwrap(), stock);
    let doctor = node.command(&["kybernate", "doctor"]).output().unwrap();
    let said = String::from_utf8_lossy(&doctor.stdout);
    assert!(said.lines().any(|l| l.starts_with("ok    cri runtime")), "{}", show(&doctor));
    assert!(said.lines().any(|l| l.starts_with("ok    runc")), "{}", show(&doctor));

    // apt removes it again; the conffile goes with --purge.
    node.run(&["apt-get", "purge", "-q", "-y", "kybernate"]);
    assert_eq!(node.status("kybernate"), "");
    for name in BINARIES {
        assert!(!node.root.join("usr/bin").join(name).exists(), "{name} left behind");
    }
    assert!(!node.root.join("etc/kybernate").exists());
    assert_eq!(node.status("containerd"), "install ok installed");
}

/// packaging/deb/config.toml: as shipped (all commented) it is the defaults, and uncommenting
/// every key also gives exactly the defaults, with every key there is.
#[test]
fn default_config_documents_every_key_with_its_default() {
    let path = repo().join("packaging/deb/config.toml");
    let text = fs::read_to_string(&path).unwrap();
    assert_eq!(Config::parse(&text, &path).unwrap(), Config::default());
    let uncommented: String = text
        .lines()
        .map(|l| match l.strip_prefix('#') {
            Some(rest) if rest.split_once(" = ").is_some_and(|(k, _)| !k.is_empty() && !k.contains(' ')) => rest,
            _ => l,
        })
        .map(|l| format!("{l}\n"))
        .collect();
    assert_eq!(Config::parse(&uncommented, &path).unwrap(), Config::default(), "{uncommented}");

    let documented: BTreeSet<String> = toml::from_str::<toml::Table>(&uncommented)
        .unwrap()
        .iter()
        .flat_map(|(t, keys)| keys.as_table().unwrap().keys().map(move |k| format!("{t}.{k}")))
        .collect();
    let all: BTreeSet<String> = toml::Table::try_from(Config::default())
        .unwrap()
        .iter()
        .flat_map(|(t, keys)| keys.as_table().unwrap().keys().map(move |k| format!("{t}.{k}")))
        .collect();
    assert_eq!(documented, all);
}

#[test]
fn build_script_refuses_bad_input() {
    let tmp = tempfile::tempdir().unwrap();
    let script = repo().join("packaging/deb/build.sh");
    let empty = tmp.path().join("empty");
    fs::create_dir_all(&empty).unwrap();
    let bin = built_binaries(&tmp.path().join("bin"));
    for (args, expect) in [
        (vec!["--bin-dir", empty.to_str().unwrap()], "is missing"),
        (vec!["--bin-dir", bin.to_str().unwrap(), "--version", "v1"], "bad version"),
        (vec!["--bin-dir", bin.to_str().unwrap(), "--compression", "lz4"], "--compression"),
        (vec!["--version"], "needs a value"),
        (vec!["--frobnicate"], "unknown argument"),
    ] {
        let out = Command::new("bash")
            .arg(&script)
            .args(["--out", tmp.path().join("out").to_str().unwrap()])
            .args(&args)
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2), "{args:?}: {}", show(&out));
        assert!(String::from_utf8_lossy(&out.stderr).contains(expect), "{args:?}: {}", show(&out));
    }
    assert!(!tmp.path().join("out").exists() || fs::read_dir(tmp.path().join("out")).unwrap().next().is_none());
}
