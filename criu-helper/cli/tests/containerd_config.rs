//! `kybernate containerd-config` on real containerd config files in temp dirs: what it adds, that
//! everything else stays byte for byte, backups, idempotence, refusals. Where containerd 1.6 is
//! installed, the merged files also go through `containerd config dump`, and (as root) a private
//! containerd checks that the CRI plugin loads with them.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;
use toml_edit::DocumentMut;

mod common;

use common::show;

const CONTAINERD: &str = "/usr/bin/containerd";
const V2_RUNTIMES: &[&str] = &["plugins", "io.containerd.grpc.v1.cri", "containerd", "runtimes"];
const V3_RUNTIMES: &[&str] = &["plugins", "io.containerd.cri.v1.runtime", "containerd", "runtimes"];

fn fixture(name: &str) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/containerd").join(name);
    fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn repo_file(rel: &str) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..").join(rel);
    fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn kybernate(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_kybernate"))
        .args(args)
        .env_remove("KYBERNATE_CONFIG")
        .env_remove("CONTAINERD_NAMESPACE")
        .output()
        .unwrap()
}

/// `kybernate -o json containerd-config ACTION --containerd-config CONFIG EXTRA...`, expecting exit 0.
fn json(action: &str, config: &Path, extra: &[&str]) -> Value {
    let out = kybernate(
        &[&["-o", "json", "containerd-config", action, "--containerd-config", config.to_str().unwrap()], extra]
            .concat(),
    );
    assert_eq!(out.status.code(), Some(0), "{}", show(&out));
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {}", show(&out)))
}

/// A temp dir holding `config.toml` with `text`.
fn node(text: &str) -> (tempfile::TempDir, PathBuf) {
    let tmp = tempfile::tempdir().unwrap();
    let config = tmp.path().join("config.toml");
    fs::write(&config, text).unwrap();
    (tmp, config)
}

/// Every file in `dir` whose name holds `.kybernate-backup-`.
fn backups(dir: &Path) -> Vec<PathBuf> {
    let mut found: Vec<PathBuf> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.file_name().unwrap().to_string_lossy().contains(".kybernate-backup-"))
        .collect();
    found.sort();
    found
}

fn names(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> =
        fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into()).collect();
    names.sort();
    names
}

fn doc(text: &str) -> DocumentMut {
    text.parse().unwrap_or_else(|e| panic!("{e}\n{text}"))
}

/// The table at `path` + `name`, if any.
fn table<'a>(doc: &'a DocumentMut, path: &[&str], name: &str) -> Option<&'a dyn toml_edit::TableLike> {
    let mut t: &dyn toml_edit::TableLike = doc.as_table();
    for key in path.iter().chain([&name]) {
        t = t.get(key)?.as_table_like()?;
    }
    Some(t)
}

fn str_at<'a>(t: &'a dyn toml_edit::TableLike, dotted: &str) -> Option<&'a str> {
    let mut parts: Vec<&str> = dotted.split('.').collect();
    let last = parts.pop()?;
    let mut t = t;
    for p in parts {
        t = t.get(p)?.as_table_like()?;
    }
    t.get(last)?.as_str()
}

/// Asserts that our runtime-type registration is in `text` under `path`.
fn assert_runtime_type_style(text: &str, path: &[&str]) {
    let d = doc(text);
    let t = table(&d, path, "kybernate").unwrap_or_else(|| panic!("no kybernate runtime in\n{text}"));
    assert_eq!(str_at(t, "runtime_type"), Some("io.containerd.kybernate.v1"), "{text}");
    assert_eq!(str_at(t, "options.ConfigPath"), Some("/etc/kybernate/config.toml"), "{text}");
    let ann = t.get("pod_annotations").and_then(|a| a.as_array()).expect("pod_annotations");
    assert_eq!(ann.iter().filter_map(|v| v.as_str()).collect::<Vec<_>>(), ["kybernate.io/*"]);
}

/// `a`'s lines appear in `b` in the same order (b = a plus inserted lines).
fn is_subsequence(a: &str, b: &str) -> bool {
    let mut b_lines = b.lines();
    a.lines().all(|line| b_lines.any(|l| l == line))
}

/// `containerd --config FILE config dump` (containerd 1.6.20 here): exit 0 and the dump's text;
/// None where containerd is not installed.
fn containerd_dump(config: &Path) -> Option<String> {
    if !Path::new(CONTAINERD).exists() {
        eprintln!("containerd not installed: `config dump` check skipped");
        return None;
    }
    let out = Command::new(CONTAINERD).arg("--config").arg(config).args(["config", "dump"]).output().unwrap();
    assert_eq!(out.status.code(), Some(0), "containerd config dump {}: {}", config.display(), show(&out));
    Some(String::from_utf8(out.stdout).unwrap())
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// A private containerd on `config_text` with its root, state and sockets moved into `dir`.
struct Containerd {
    child: Child,
    socket: PathBuf,
    log: PathBuf,
}

impl Containerd {
    /// None where containerd/ctr are missing or we are not root (it must create its state dirs).
    fn start(config_text: &str, dir: &Path) -> Option<Self> {
        if !Path::new(CONTAINERD).exists() || !Path::new("/usr/bin/ctr").exists() || !is_root() {
            eprintln!("containerd, ctr or root missing: CRI plugin load check skipped");
            return None;
        }
        let mut d = doc(config_text);
        let at = |name: &str| dir.join(name).to_str().unwrap().to_string();
        d["root"] = toml_edit::value(at("root"));
        d["state"] = toml_edit::value(at("state"));
        d["grpc"]["address"] = toml_edit::value(at("c.sock"));
        d["ttrpc"]["address"] = toml_edit::value(at("t.sock"));
        let config = dir.join("private.toml");
        fs::write(&config, d.to_string()).unwrap();
        let log = dir.join("containerd.log");
        let child = Command::new(CONTAINERD)
            .arg("--config")
            .arg(&config)
            .stdout(Stdio::null())
            .stderr(fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        let mut c = Self { child, socket: dir.join("c.sock"), log };
        let deadline = Instant::now() + Duration::from_secs(20);
        while !c.socket.exists() {
            assert!(Instant::now() < deadline, "containerd did not start: {}", fs::read_to_string(&c.log).unwrap());
            if let Some(status) = c.child.try_wait().unwrap() {
                panic!("containerd exited ({status}): {}", fs::read_to_string(&c.log).unwrap());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Some(c)
    }

    /// The CRI plugin's status in `ctr plugins ls` ("ok" or "error").
    fn cri_status(&self) -> String {
        let out = Command::new("ctr").arg("--address").arg(&self.socket).args(["plugins", "ls"]).output().unwrap();
        assert!(out.status.success(), "{}", show(&out));
        let text = String::from_utf8(out.stdout).unwrap();
        let line = text
            .lines()
            .find(|l| l.split_whitespace().take(2).eq(["io.containerd.grpc.v1", "cri"]))
            .unwrap_or_else(|| panic!("no cri plugin in\n{text}"));
        line.split_whitespace().last().unwrap().to_string()
    }

    fn log(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Whether containerd's CRI plugin loads with `config_text` (None: not checkable here).
fn cri_loads(config_text: &str) -> Option<bool> {
    let dir = tempfile::tempdir().unwrap();
    let c = Containerd::start(config_text, dir.path())?;
    let status = c.cri_status();
    if status != "ok" {
        eprintln!("cri plugin {status}; containerd log:\n{}", c.log());
    }
    Some(status == "ok")
}

/// (1) containerd 1.6's stock config (`containerd config default`, else the checked-in copy).
#[test]
fn stock_default_config_gets_our_runtime_and_nothing_else_changes() {
    let generated = Command::new(CONTAINERD).args(["config", "default"]).output().ok().filter(|o| o.status.success());
    let original = match generated {
        Some(out) => String::from_utf8(out.stdout).unwrap(),
        None => fixture("containerd-1.6-default.toml"),
    };
    let (tmp, config) = node(&original);
    let report = json("install", &config, &[]);
    assert_eq!(report["status"], "installed", "{report:#}");
    assert_eq!(report["config_version"], 2);
    assert_eq!(report["changed"], true);
    assert_eq!(report["written"], true);
    assert_eq!(report["table"], "plugins.\"io.containerd.grpc.v1.cri\".containerd.runtimes.kybernate");
    let text = fs::read_to_string(&config).unwrap();
    assert_runtime_type_style(&text, V2_RUNTIMES);
    assert!(is_subsequence(&original, &text), "lines of the original were changed:\n{text}");
    // Exactly our table was added: 3 keys, 2 headers, 2 blank lines, the option.
    assert_eq!(text.lines().count(), original.lines().count() + 7, "{text}");
    // runc stays as it was, and no second runc.
    assert_eq!(text.matches("containerd.runtimes.runc]").count(), 1);

    let backup = backups(tmp.path());
    assert_eq!(backup.len(), 1, "{:?}", names(tmp.path()));
    assert_eq!(report["backup"], backup[0].to_str().unwrap());
    assert_eq!(fs::read_to_string(&backup[0]).unwrap(), original);

    if let Some(dump) = containerd_dump(&config) {
        assert_runtime_type_style(&dump, V2_RUNTIMES);
    }
    if let Some(ok) = cri_loads(&text) {
        assert!(ok, "the CRI plugin does not load with the merged config");
    }
}

/// (2) nvidia-ctk's config (nvidia is the default runtime, no runc): kept untouched.
#[test]
fn nvidia_runtime_is_kept_untouched() {
    let original = fixture("nvidia-ctk.toml");
    let (_tmp, config) = node(&original);
    let report = json("install", &config, &[]);
    assert_eq!(report["status"], "installed", "{report:#}");
    let text = fs::read_to_string(&config).unwrap();
    // The whole original is a prefix: our table went after nvidia's, nothing else moved.
    assert!(text.starts_with(&original), "{text}");
    assert_runtime_type_style(&text, V2_RUNTIMES);
    let d = doc(&text);
    let nvidia = table(&d, V2_RUNTIMES, "nvidia").unwrap();
    assert_eq!(str_at(nvidia, "options.BinaryName"), Some("/usr/bin/nvidia-container-runtime"));
    // nvidia stays the default, and runc is not needed (nor added) for it.
    assert!(text.contains("default_runtime_name = \"nvidia\""));
    assert!(table(&d, V2_RUNTIMES, "runc").is_none(), "{text}");
    if let Some(dump) = containerd_dump(&config) {
        assert_runtime_type_style(&dump, V2_RUNTIMES);
        let d = doc(&dump);
        assert_eq!(
            str_at(table(&d, V2_RUNTIMES, "nvidia").unwrap(), "options.BinaryName"),
            Some("/usr/bin/nvidia-container-runtime")
        );
    }
    if let Some(ok) = cri_loads(&text) {
        assert!(ok, "the CRI plugin does not load with the merged nvidia config");
    }
}

/// The runtime-path style takes runc's SystemdCgroup (kubelet's cgroup driver) along.
#[test]
fn runtime_path_style_follows_runcs_cgroup_driver() {
    let original = fixture("gpu-node.toml");
    let (_tmp, config) = node(&original);
    let report =
        json("install", &config, &["--style", "runtime-path", "--shim", "/usr/bin/containerd-shim-kybernate-v1"]);
    assert_eq!(report["style"], "runtime-path");
    let text = fs::read_to_string(&config).unwrap();
    let d = doc(&text);
    let t = table(&d, V2_RUNTIMES, "kybernate").unwrap();
    assert_eq!(str_at(t, "runtime_type"), Some("io.containerd.runc.v2"));
    assert_eq!(str_at(t, "runtime_path"), Some("/usr/bin/containerd-shim-kybernate-v1"));
    assert_eq!(t.get("options").and_then(|o| o.get("SystemdCgroup")).and_then(|v| v.as_bool()), Some(true));
    assert!(t.get("options").and_then(|o| o.get("ConfigPath")).is_none(), "{text}");
    if let Some(dump) = containerd_dump(&config) {
        let d = doc(&dump);
        assert_eq!(
            str_at(table(&d, V2_RUNTIMES, "kybernate").unwrap(), "runtime_path"),
            Some("/usr/bin/containerd-shim-kybernate-v1")
        );
    }

    // Switching styles rewrites our table (and only it); switching back restores the first form.
    let report = json("install", &config, &[]);
    assert_eq!(report["status"], "updated", "{report:#}");
    let back = fs::read_to_string(&config).unwrap();
    assert_runtime_type_style(&back, V2_RUNTIMES);
    assert!(!back.contains("runtime_path = \"/usr/bin"), "{back}");
}

/// (3) A second install changes nothing, makes no backup, and says so.
#[test]
fn second_install_changes_nothing_and_makes_no_backup() {
    for style in ["runtime-type", "runtime-path"] {
        let (tmp, config) = node(&fixture("gpu-node.toml"));
        let first = json("install", &config, &["--style", style]);
        assert_eq!(first["status"], "installed");
        let after_first = fs::read(&config).unwrap();
        let modified = fs::metadata(&config).unwrap().modified().unwrap();
        assert_eq!(backups(tmp.path()).len(), 1);

        let second = json("install", &config, &["--style", style]);
        assert_eq!(second["status"], "already_installed", "{second:#}");
        assert_eq!(second["changed"], false);
        assert_eq!(second["written"], false);
        assert_eq!(second["backup"], Value::Null);
        assert_eq!(second["changes"], serde_json::json!([]));
        assert_eq!(fs::read(&config).unwrap(), after_first);
        assert_eq!(fs::metadata(&config).unwrap().modified().unwrap(), modified, "the file was rewritten");
        assert_eq!(backups(tmp.path()).len(), 1, "{:?}", names(tmp.path()));

        let table = kybernate(&[
            "containerd-config",
            "install",
            "--containerd-config",
            config.to_str().unwrap(),
            "--style",
            style,
        ]);
        assert_eq!(table.status.code(), Some(0));
        assert!(String::from_utf8_lossy(&table.stdout).contains("already installed"), "{}", show(&table));
    }
}

/// (4) A version 3 config (containerd 2.x): the runtime goes under io.containerd.cri.v1.runtime.
#[test]
fn version_3_config_uses_the_cri_runtime_plugin() {
    let original = fixture("version3.toml");
    let (_tmp, config) = node(&original);
    let report = json("install", &config, &[]);
    assert_eq!(report["config_version"], 3);
    assert_eq!(report["table"], "plugins.\"io.containerd.cri.v1.runtime\".containerd.runtimes.kybernate");
    let text = fs::read_to_string(&config).unwrap();
    assert_runtime_type_style(&text, V3_RUNTIMES);
    assert!(is_subsequence(&original, &text), "{text}");
    // The header reuses the file's own spelling of the plugin key.
    assert!(text.contains("[plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.kybernate]"), "{text}");
    let d = doc(&text);
    assert!(table(&d, V2_RUNTIMES, "kybernate").is_none(), "nothing may go to the v2 plugin in a v3 file");
    assert_eq!(json("install", &config, &[])["status"], "already_installed");

    // runtime-path style in v3 takes runc's SystemdCgroup too.
    let (_tmp, config) = node(&original);
    json("install", &config, &["--style", "runtime-path"]);
    let d = doc(&fs::read_to_string(&config).unwrap());
    let t = table(&d, V3_RUNTIMES, "kybernate").unwrap();
    assert_eq!(str_at(t, "runtime_path"), Some("/usr/local/bin/containerd-shim-kybernate-v1"));
    assert_eq!(t.get("options").and_then(|o| o.get("SystemdCgroup")).and_then(|v| v.as_bool()), Some(true));
}

/// (5) Uninstall removes our table and nothing else: runc and nvidia stay byte for byte.
#[test]
fn uninstall_leaves_runc_and_nvidia_byte_identical() {
    let original = fixture("gpu-node.toml");
    // From "# The stock runtime" to the end of nvidia's options: runc and nvidia, with comments.
    let start = original.find("    # The stock runtime").unwrap();
    let end = original.find("\n# Registry mirrors").unwrap();
    let runc_and_nvidia = &original[start..end];
    for style in ["runtime-type", "runtime-path"] {
        let (tmp, config) = node(&original);
        json("install", &config, &["--style", style]);
        let installed = fs::read_to_string(&config).unwrap();
        assert!(installed.contains(runc_and_nvidia), "install changed runc or nvidia:\n{installed}");

        let report = json("uninstall", &config, &[]);
        assert_eq!(report["status"], "removed", "{report:#}");
        assert_eq!(fs::read_to_string(&config).unwrap(), original, "uninstall did not restore the original bytes");
        let found = backups(tmp.path());
        assert_eq!(found.len(), 2, "one backup per change: {found:?}");
        assert_eq!(report["backup"], found[1].to_str().unwrap());
        assert_eq!(fs::read_to_string(&found[1]).unwrap(), installed);

        let again = json("uninstall", &config, &[]);
        assert_eq!(again["status"], "not_installed");
        assert_eq!(again["written"], false);
        assert_eq!(backups(tmp.path()).len(), 2);
        assert_eq!(fs::read_to_string(&config).unwrap(), original);
    }
}

/// Uninstall refuses to remove a runtime that is not ours, or the default runtime.
#[test]
fn uninstall_removes_only_our_runtime() {
    let (tmp, config) = node(&fixture("gpu-node.toml"));
    let out = kybernate(&[
        "containerd-config",
        "uninstall",
        "--containerd-config",
        config.to_str().unwrap(),
        "--handler",
        "nvidia",
    ]);
    assert_eq!(out.status.code(), Some(2), "{}", show(&out));
    assert!(String::from_utf8_lossy(&out.stderr).contains("is not Kybernate's"), "{}", show(&out));
    assert_eq!(fs::read_to_string(&config).unwrap(), fixture("gpu-node.toml"));
    assert!(backups(tmp.path()).is_empty());

    let ours_as_default =
        fixture("gpu-node.toml").replace("default_runtime_name = \"runc\"", "default_runtime_name = \"kybernate\"");
    let (_tmp, config) = node(&ours_as_default);
    json("install", &config, &[]);
    let out = kybernate(&["containerd-config", "uninstall", "--containerd-config", config.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2), "{}", show(&out));
    assert!(String::from_utf8_lossy(&out.stderr).contains("default_runtime_name"), "{}", show(&out));
}

/// (6) Malformed TOML: exit 2 with the line, the file untouched, no backup, no temp file.
#[test]
fn malformed_config_is_left_untouched() {
    let original = fixture("malformed.toml");
    let (tmp, config) = node(&original);
    for action in ["install", "uninstall"] {
        let out = kybernate(&["containerd-config", action, "--containerd-config", config.to_str().unwrap()]);
        assert_eq!(out.status.code(), Some(2), "{}", show(&out));
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.starts_with("kybernate: "), "{err}");
        assert!(err.contains("not valid TOML at line 4"), "{err}");
        assert!(err.contains("the file was not changed"), "{err}");
        assert_eq!(err.trim_end().lines().count(), 1, "one line: {err}");
        assert_eq!(fs::read_to_string(&config).unwrap(), original);
        assert_eq!(names(tmp.path()), ["config.toml"]);
    }
}

/// Version 1 (no `version` key) and unknown versions are refused with exit 2.
#[test]
fn version_1_and_unknown_versions_are_refused() {
    for (text, expect) in
        [(fixture("version1.toml"), "config version 1"), ("version = 4\n".to_string(), "`version = 4`")]
    {
        let (tmp, config) = node(&text);
        let out = kybernate(&["containerd-config", "install", "--containerd-config", config.to_str().unwrap()]);
        assert_eq!(out.status.code(), Some(2), "{}", show(&out));
        assert!(String::from_utf8_lossy(&out.stderr).contains(expect), "{}", show(&out));
        assert_eq!(fs::read_to_string(&config).unwrap(), text);
        assert_eq!(names(tmp.path()), ["config.toml"]);
    }
}

/// (7) The admin's comments, blank lines and order survive install.
#[test]
fn comments_and_order_are_preserved() {
    let original = fixture("gpu-node.toml");
    let (_tmp, config) = node(&original);
    json("install", &config, &[]);
    let text = fs::read_to_string(&config).unwrap();
    let comments = |t: &str| t.lines().filter(|l| l.contains('#')).map(String::from).collect::<Vec<_>>();
    assert_eq!(comments(&text), comments(&original), "{text}");
    assert!(is_subsequence(&original, &text), "{text}");
    // Our table sits with the runtimes (after nvidia), before the registry section and its comment,
    // indented like its siblings.
    let ours = text
        .find("    [plugins.\"io.containerd.grpc.v1.cri\".containerd.runtimes.kybernate]\n      runtime_type")
        .unwrap();
    assert!(ours > text.find("runtimes.nvidia.options]").unwrap());
    assert!(ours < text.find("# Registry mirrors").unwrap());
    assert!(text.ends_with("# end of file\n"), "{text}");
}

/// A missing config is created with `version = 2`, runc and our runtime; the CRI plugin loads it.
#[test]
fn missing_config_is_created_with_runc() {
    let tmp = tempfile::tempdir().unwrap();
    let config = tmp.path().join("etc/containerd/config.toml");
    let dry = json("install", &config, &["--dry-run"]);
    assert_eq!(dry["status"], "installed");
    assert_eq!(dry["written"], false);
    assert!(!config.exists(), "--dry-run wrote the file");

    let report = json("install", &config, &[]);
    assert_eq!(report["created"], true);
    assert_eq!(report["backup"], Value::Null);
    assert!(report["notes"].to_string().contains("built-in defaults"), "{report:#}");
    let text = fs::read_to_string(&config).unwrap();
    assert_eq!(fs::metadata(&config).unwrap().permissions().mode() & 0o777, 0o644);
    assert!(text.contains("\nversion = 2\n"), "{text}");
    assert_runtime_type_style(&text, V2_RUNTIMES);
    let d = doc(&text);
    assert_eq!(str_at(table(&d, V2_RUNTIMES, "runc").unwrap(), "runtime_type"), Some("io.containerd.runc.v2"));
    if let Some(dump) = containerd_dump(&config) {
        assert_runtime_type_style(&dump, V2_RUNTIMES);
    }
    if let Some(ok) = cri_loads(&text) {
        assert!(ok, "the CRI plugin does not load with the created config");
        // The control: without the runc we added, the CRI plugin refuses to load.
        let without_runc = text.replace("[plugins.\"io.containerd.grpc.v1.cri\".containerd.runtimes.runc]\nruntime_type = \"io.containerd.runc.v2\"\n", "");
        assert_ne!(without_runc, text);
        assert_eq!(cri_loads(&without_runc), Some(false));
    }
    assert_eq!(json("install", &config, &[])["status"], "already_installed");
}

/// Mode and owner are kept, the backup goes to --backup-dir with the same mode, a symlinked
/// config stays a symlink, and --dry-run writes nothing.
#[test]
fn files_keep_mode_and_links_and_dry_run_writes_nothing() {
    let original = fixture("gpu-node.toml");
    let tmp = tempfile::tempdir().unwrap();
    let real = tmp.path().join("real.toml");
    fs::write(&real, &original).unwrap();
    fs::set_permissions(&real, fs::Permissions::from_mode(0o600)).unwrap();
    let link = tmp.path().join("config.toml");
    std::os::unix::fs::symlink("real.toml", &link).unwrap();

    let dry = kybernate(&["containerd-config", "install", "--containerd-config", link.to_str().unwrap(), "--dry-run"]);
    assert_eq!(dry.status.code(), Some(0), "{}", show(&dry));
    let stdout = String::from_utf8_lossy(&dry.stdout);
    assert!(stdout.contains("would install (dry run: nothing written)"), "{stdout}");
    assert!(stdout.contains("ConfigPath = \"/etc/kybernate/config.toml\""), "the dry run shows the table: {stdout}");
    assert_eq!(fs::read_to_string(&real).unwrap(), original);
    assert_eq!(names(tmp.path()), ["config.toml", "real.toml"]);

    let backup_dir = tmp.path().join("backups");
    let report = json("install", &link, &["--backup-dir", backup_dir.to_str().unwrap()]);
    assert!(fs::symlink_metadata(&link).unwrap().file_type().is_symlink(), "the symlink was replaced");
    assert_runtime_type_style(&fs::read_to_string(&real).unwrap(), V2_RUNTIMES);
    assert_eq!(fs::metadata(&real).unwrap().permissions().mode() & 0o7777, 0o600);
    let found = backups(&backup_dir);
    assert_eq!(found.len(), 1);
    assert!(found[0].file_name().unwrap().to_string_lossy().starts_with("real.toml.kybernate-backup-2"), "{found:?}");
    assert_eq!(report["backup"], found[0].to_str().unwrap());
    assert_eq!(fs::metadata(&found[0]).unwrap().permissions().mode() & 0o7777, 0o600);
    assert_eq!(fs::read_to_string(&found[0]).unwrap(), original);
    assert_eq!(names(tmp.path()), ["backups", "config.toml", "real.toml"], "no temp file left");
}

/// A runtime named like ours that is not ours is refused (exit 2), the file untouched.
#[test]
fn foreign_runtime_with_our_handler_is_refused() {
    let original = fixture("gpu-node.toml");
    let (tmp, config) = node(&original);
    let out = kybernate(&[
        "containerd-config",
        "install",
        "--containerd-config",
        config.to_str().unwrap(),
        "--handler",
        "nvidia",
    ]);
    assert_eq!(out.status.code(), Some(2), "{}", show(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("runtime `nvidia` is already defined and is not Kybernate's"),
        "{}",
        show(&out)
    );
    assert_eq!(fs::read_to_string(&config).unwrap(), original);
    assert!(backups(tmp.path()).is_empty());
    for bad in [
        ["--handler", "runc"],
        ["--handler", "Kybernate"],
        ["--shim", "bin/shim"],
        ["--shim", "/usr/bin/containerd-shim-kybernate-v1"],
    ] {
        let out = kybernate(
            &[&["containerd-config", "install", "--containerd-config", config.to_str().unwrap()], &bad[..]].concat(),
        );
        assert_eq!(out.status.code(), Some(2), "{bad:?}: {}", show(&out));
    }
    assert_eq!(fs::read_to_string(&config).unwrap(), original);
}

/// The drop-ins in packaging/containerd/: containerd 1.6 accepts the v2 ones merged into a minimal
/// config (and its CRI plugin loads them); the v3 ones have containerd 2.x's layout. Each
/// registers what `containerd-config install` writes.
#[test]
fn packaged_drop_ins_match_the_tool() {
    let runc_v2 = "version = 2\n[plugins.\"io.containerd.grpc.v1.cri\".containerd.runtimes.runc]\n  runtime_type = \"io.containerd.runc.v2\"\n  [plugins.\"io.containerd.grpc.v1.cri\".containerd.runtimes.runc.options]\n    SystemdCgroup = true\n";
    let runc_v3 = runc_v2
        .replace("version = 2", "version = 3")
        .replace("io.containerd.grpc.v1.cri", "io.containerd.cri.v1.runtime");
    for (file, base, path, style) in [
        ("v2-runtime-type.toml", runc_v2.to_string(), V2_RUNTIMES, "runtime-type"),
        ("v2-runtime-path.toml", runc_v2.to_string(), V2_RUNTIMES, "runtime-path"),
        ("v3-runtime-type.toml", runc_v3.clone(), V3_RUNTIMES, "runtime-type"),
        ("v3-runtime-path.toml", runc_v3.clone(), V3_RUNTIMES, "runtime-path"),
    ] {
        let snippet = repo_file(&format!("packaging/containerd/{file}"));
        let merged = format!("{base}{snippet}");
        let (_tmp, config) = node(&merged);
        // What the tool writes into the same base config, as values.
        let (_tmp2, tool_config) = node(&base);
        json("install", &tool_config, &["--style", style]);
        let ours = |text: &str| {
            let d = doc(text);
            let t = table(&d, path, "kybernate").unwrap_or_else(|| panic!("{file}: no runtime"));
            let mut values: Vec<(String, String)> = Vec::new();
            for (k, v) in t.iter() {
                match v.as_table_like() {
                    Some(o) => values
                        .extend(o.iter().map(|(ok, ov)| (format!("options.{ok}"), ov.to_string().trim().to_string()))),
                    None => values.push((k.to_string(), v.to_string().trim().to_string())),
                }
            }
            values.sort();
            values
        };
        assert_eq!(ours(&merged), ours(&fs::read_to_string(&tool_config).unwrap()), "{file} and the tool differ");
        if path == V2_RUNTIMES {
            if let Some(dump) = containerd_dump(&config) {
                let d = doc(&dump);
                let t = table(&d, V2_RUNTIMES, "kybernate").unwrap_or_else(|| panic!("{file}: not in the dump"));
                let expected =
                    if style == "runtime-type" { "io.containerd.kybernate.v1" } else { "io.containerd.runc.v2" };
                assert_eq!(str_at(t, "runtime_type"), Some(expected), "{file}");
            }
            if let Some(ok) = cri_loads(&merged) {
                assert!(ok, "{file}: the CRI plugin does not load");
            }
        }
    }
}

/// The commands of docs/installation.md's "containerd config merge" section, run in order on a
/// copy of the stock config: each succeeds, and the last (uninstall) restores the original.
#[test]
fn documented_commands_work() {
    let docs = repo_file("docs/installation.md");
    let section = docs.split("## containerd config merge").nth(1).expect("the section");
    let block = section.split("```sh\n").nth(1).and_then(|b| b.split("```").next()).expect("a sh block");
    let commands: Vec<&str> = block.lines().filter(|l| l.starts_with("kybernate ")).collect();
    assert!(commands.len() >= 4, "{block}");
    let original = fixture("containerd-1.6-default.toml");
    let (_tmp, config) = node(&original);
    for line in &commands {
        let line = line.replace("/etc/containerd/config.toml", config.to_str().unwrap());
        let args: Vec<&str> = line.split_whitespace().skip(1).collect();
        let out = kybernate(&args);
        assert_eq!(out.status.code(), Some(0), "{line}: {}", show(&out));
        if line.contains("--dry-run") {
            assert!(String::from_utf8_lossy(&out.stdout).contains("would update"), "{line}: {}", show(&out));
        }
    }
    assert!(commands.last().unwrap().contains("uninstall"));
    assert_eq!(fs::read_to_string(&config).unwrap(), original);
}

/// docs/cli.md's containerd-config examples (default path) on a copy of the stock config, named
/// with `--containerd-config`: install, a dry run of the other style, uninstall back to the original.
#[test]
fn cli_reference_examples_work() {
    let docs = repo_file("docs/cli.md");
    let section = docs.split("### `kybernate containerd-config ").nth(1).expect("the section");
    let block = section.split("```sh\n").nth(1).and_then(|b| b.split("```").next()).expect("a sh block");
    let commands: Vec<&str> =
        block.lines().map(|l| l.split(" #").next().unwrap().trim()).filter(|l| l.starts_with("kybernate ")).collect();
    assert_eq!(commands.len(), 3, "{block}");
    let original = fixture("containerd-1.6-default.toml");
    let (_tmp, config) = node(&original);
    let said: Vec<String> = commands
        .iter()
        .map(|line| {
            let mut args: Vec<&str> = line.split_whitespace().skip(1).collect();
            args.extend(["--containerd-config", config.to_str().unwrap()]);
            let out = kybernate(&args);
            assert_eq!(out.status.code(), Some(0), "{line}: {}", show(&out));
            String::from_utf8_lossy(&out.stdout).into_owned()
        })
        .collect();
    assert!(said[0].contains("result              installed"), "{}", said[0]);
    assert!(said[1].contains("would update"), "{}", said[1]);
    assert!(said[2].contains("result              removed"), "{}", said[2]);
    assert_eq!(fs::read_to_string(&config).unwrap(), original);
}

/// The CLI's global `--config` names the Kybernate config: before the subcommand it must never be
/// taken for containerd's file (which install would edit, or create).
#[test]
fn global_config_flag_is_not_containerds() {
    let tmp = tempfile::tempdir().unwrap();
    let kybernate_config = tmp.path().join("kybernate.toml");
    let containerd_config = tmp.path().join("containerd.toml");
    let k = kybernate_config.to_str().unwrap();
    let c = containerd_config.to_str().unwrap();
    let out = kybernate(&["--config", k, "containerd-config", "install", "--containerd-config", c]);
    assert_eq!(out.status.code(), Some(0), "{}", show(&out));
    assert!(containerd_config.exists());
    assert!(!kybernate_config.exists(), "the Kybernate config path was written");

    // Only the global one: containerd's default path is meant (read only here: --dry-run).
    let out = kybernate(&["--config", k, "-o", "json", "containerd-config", "install", "--dry-run"]);
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(!text.contains(k), "{}", show(&out));
    assert!(!kybernate_config.exists());
}

/// containerd 1.7 and 2.x as `test/setup.sh` unpacks them (Debian trixie's and testing's).
const CONTAINERD_1_7: &str = "/opt/kybernate-test/containerd-1.7/usr/bin/containerd";
const CONTAINERD_2: &str = "/opt/kybernate-test/containerd-2/usr/bin/containerd";
/// Where the packaging drop-ins of style (b) point `runtime_path`.
const SHIM_PATH: &str = "/usr/local/bin/containerd-shim-kybernate-v1";

/// `<binary> --config FILE config dump`; None where that containerd is not unpacked (a developer
/// machine without test/setup.sh); as root (CI runs setup first) it must be there.
fn dump_with(binary: &str, config: &Path) -> Option<String> {
    if !Path::new(binary).exists() {
        assert!(!is_root(), "{binary} missing: run test/setup.sh");
        eprintln!("{binary} not installed: check skipped");
        return None;
    }
    let out = Command::new(binary).arg("--config").arg(config).args(["config", "dump"]).output().unwrap();
    assert_eq!(out.status.code(), Some(0), "{binary} config dump {}: {}", config.display(), show(&out));
    Some(String::from_utf8(out.stdout).unwrap())
}

/// The runtime `kybernate` of a config dump, and its `runtime_type` / `runtime_path`.
fn dumped_runtime(dump: &str, path: &[&str]) -> (String, String) {
    let d = doc(dump);
    let t = table(&d, path, "kybernate").unwrap_or_else(|| panic!("no runtime kybernate at {path:?} in\n{dump}"));
    (str_at(t, "runtime_type").unwrap_or_default().into(), str_at(t, "runtime_path").unwrap_or_default().into())
}

/// The packaging drop-ins (packaging/containerd/) and what `install` writes, read by the
/// containerd each is for: version 3 by containerd 2.x, version 2 by 1.7 (and by 2.x, which
/// migrates version 2). Our runtime lands where CRI looks it up, with its type and path.
#[test]
fn containerd_1_7_and_2_read_our_runtime_where_cri_looks() {
    let cases = [
        (CONTAINERD_2, "version3.toml", "v3-runtime-type.toml", ("io.containerd.kybernate.v1", "")),
        (CONTAINERD_2, "version3.toml", "v3-runtime-path.toml", ("io.containerd.runc.v2", SHIM_PATH)),
        (CONTAINERD_1_7, "containerd-1.6-default.toml", "v2-runtime-type.toml", ("io.containerd.kybernate.v1", "")),
        (CONTAINERD_1_7, "containerd-1.6-default.toml", "v2-runtime-path.toml", ("io.containerd.runc.v2", SHIM_PATH)),
        (CONTAINERD_2, "containerd-1.6-default.toml", "v2-runtime-type.toml", ("io.containerd.kybernate.v1", "")),
    ];
    for (binary, base, dropin, (want_type, want_path)) in cases {
        let text = format!("{}\n{}", fixture(base), repo_file(&format!("packaging/containerd/{dropin}")));
        let (_tmp, config) = node(&text);
        let Some(dump) = dump_with(binary, &config) else { continue };
        // containerd 2.x dumps every config as version 3.
        let path = if binary == CONTAINERD_2 { V3_RUNTIMES } else { V2_RUNTIMES };
        let got = dumped_runtime(&dump, path);
        assert_eq!((got.0.as_str(), got.1.as_str()), (want_type, want_path), "{binary} with {base} + {dropin}");
    }
    // `install` into a version 3 config, read by containerd 2.x.
    let (_tmp, config) = node(&fixture("version3.toml"));
    json("install", &config, &[]);
    if let Some(dump) = dump_with(CONTAINERD_2, &config) {
        assert_eq!(dumped_runtime(&dump, V3_RUNTIMES).0, "io.containerd.kybernate.v1");
    }
}

/// containerd's default config directory, which `install` without `--containerd-config` edits.
const DEFAULT_DIR: &str = "/etc/containerd";

/// A private mount namespace (`unshare --mount --propagation private`, held open by a `sleep`)
/// with a tmpfs over /etc/containerd: commands run in it with `nsenter -t PID -m`, and the test
/// reads and writes its /etc/containerd through /proc/PID/root. Nothing of it reaches the host's
/// mount table; dropping it (also on a panic) kills the holder, and the namespace and its tmpfs
/// go with it. The holder dies with the test thread too (PR_SET_PDEATHSIG).
struct PrivateEtc {
    holder: Child,
}

impl PrivateEtc {
    fn new() -> Self {
        let mut cmd = Command::new("unshare");
        cmd.args(["--mount", "--propagation", "private", "--", "sleep", "600"]).stdin(Stdio::null());
        // SAFETY: prctl is async-signal-safe; nothing else runs between fork and exec.
        unsafe {
            std::os::unix::process::CommandExt::pre_exec(&mut cmd, || {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let ns = Self { holder: cmd.spawn().expect("unshare (util-linux)") };
        let own = fs::read_link("/proc/self/ns/mnt").unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        // unshare execs sleep in the same process once the namespace is made.
        while fs::read_link(ns.proc("ns/mnt")).ok().as_ref() == Some(&own)
            || fs::read_to_string(ns.proc("comm")).unwrap_or_default().trim() != "sleep"
        {
            assert!(Instant::now() < deadline, "unshare made no mount namespace");
            std::thread::sleep(Duration::from_millis(20));
        }
        let out = ns.nsenter("mount", &["-t", "tmpfs", "-o", "mode=0755", "kbt-etc-containerd", DEFAULT_DIR]);
        assert!(out.status.success(), "mount: {}", show(&out));
        ns
    }

    fn proc(&self, rel: &str) -> PathBuf {
        Path::new("/proc").join(self.holder.id().to_string()).join(rel)
    }

    /// `/etc/containerd/<name>` as the namespace sees it.
    fn path(&self, name: &str) -> PathBuf {
        self.proc("root").join(DEFAULT_DIR.trim_start_matches('/')).join(name)
    }

    /// `nsenter -t PID -m -- PROGRAM ARGS`.
    fn nsenter(&self, program: &str, args: &[&str]) -> Output {
        Command::new("nsenter")
            .arg("-t")
            .arg(self.holder.id().to_string())
            .args(["-m", "--", program])
            .args(args)
            .env_remove("KYBERNATE_CONFIG")
            .env_remove("CONTAINERD_NAMESPACE")
            .stdin(Stdio::null())
            .output()
            .unwrap()
    }

    /// `kybernate ARGS` in the namespace; exit 0 expected; stdout.
    fn kybernate(&self, args: &[&str]) -> String {
        let out = self.nsenter(env!("CARGO_BIN_EXE_kybernate"), args);
        assert_eq!(out.status.code(), Some(0), "kybernate {args:?}: {}", show(&out));
        String::from_utf8(out.stdout).unwrap()
    }

    fn backups(&self) -> Vec<String> {
        let mut b: Vec<String> =
            names(&self.path("")).into_iter().filter(|n| n.contains(".kybernate-backup-")).collect();
        b.sort();
        b
    }
}

impl Drop for PrivateEtc {
    fn drop(&mut self) {
        let _ = self.holder.kill();
        let _ = self.holder.wait();
    }
}

/// Every entry of a directory with its mode and bytes (a subdirectory: its mode only).
fn dir_snapshot(dir: &Path) -> Vec<(String, u32, Option<Vec<u8>>)> {
    let mut entries: Vec<(String, u32, Option<Vec<u8>>)> = fs::read_dir(dir)
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            let meta = fs::symlink_metadata(e.path()).unwrap();
            let bytes = meta.is_file().then(|| fs::read(e.path()).unwrap());
            (e.file_name().to_string_lossy().into_owned(), meta.permissions().mode(), bytes)
        })
        .collect();
    entries.sort();
    entries
}

/// Whether the host's mount table has a mount at `path`.
fn host_mounts(path: &str) -> bool {
    fs::read_to_string("/proc/self/mountinfo").unwrap().lines().any(|l| l.split(' ').nth(4) == Some(path))
}

/// `install` and `uninstall` without `--containerd-config` edit /etc/containerd/config.toml: run
/// for real in a private mount namespace whose /etc/containerd is a tmpfs, so that the host's
/// file is never touched (compared byte for byte afterwards). A missing file is created; a
/// present one is backed up beside it with its mode; a second run writes nothing; each write,
/// and only a write, ends with the documented hint to restart containerd.
#[test]
fn install_at_the_default_path_in_a_private_mount_namespace() {
    assert!(is_root(), "needs root (a mount namespace and a tmpfs)");
    assert!(Path::new(DEFAULT_DIR).is_dir(), "{DEFAULT_DIR} missing: run test/setup.sh (it installs containerd)");
    let host_before = dir_snapshot(Path::new(DEFAULT_DIR));
    assert!(!host_mounts(DEFAULT_DIR), "something is mounted at the host's {DEFAULT_DIR}");
    let restart_hint =
        "note: restart containerd to apply (systemctl restart containerd); running containers keep running";
    {
        let ns = PrivateEtc::new();
        assert!(names(&ns.path("")).is_empty(), "the private {DEFAULT_DIR} starts empty");
        assert!(!host_mounts(DEFAULT_DIR), "the tmpfs leaked into the host's mount table");
        let config = ns.path("config.toml");

        // No file: created at the default path, 0644, with runc and ours.
        let out = ns.kybernate(&["containerd-config", "install"]);
        assert!(
            out.lines().next().is_some_and(|l| l.ends_with("/etc/containerd/config.toml (version 2), created")),
            "{out}"
        );
        assert!(out.contains(restart_hint), "{out}");
        let created = fs::read_to_string(&config).unwrap();
        assert_runtime_type_style(&created, V2_RUNTIMES);
        assert!(table(&doc(&created), V2_RUNTIMES, "runc").is_some(), "{created}");
        assert_eq!(fs::metadata(&config).unwrap().permissions().mode() & 0o7777, 0o644);
        assert!(ns.backups().is_empty(), "nothing to back up");
        let again = ns.kybernate(&["-o", "json", "containerd-config", "install"]);
        let again: Value = serde_json::from_str(&again).unwrap();
        assert_eq!(again["config"], "/etc/containerd/config.toml", "{again}");
        assert_eq!(again["status"], "already_installed", "{again}");
        assert_eq!(again["written"], false, "{again}");
        assert_eq!(fs::read_to_string(&config).unwrap(), created);

        // The stock config (mode 0600: configs can hold registry credentials): merged, backed up
        // beside it with its mode, then left alone.
        let stock = fixture("containerd-1.6-default.toml");
        fs::write(&config, &stock).unwrap();
        fs::set_permissions(&config, fs::Permissions::from_mode(0o600)).unwrap();
        let out = ns.kybernate(&["containerd-config", "install"]);
        assert!(out.contains("result              installed\n"), "{out}");
        assert!(out.contains(restart_hint), "{out}");
        let backups = ns.backups();
        assert_eq!(backups.len(), 1, "{backups:?}");
        assert!(out.contains(&format!("backup              /etc/containerd/{}\n", backups[0])), "{out}");
        assert_eq!(fs::read_to_string(ns.path(&backups[0])).unwrap(), stock);
        assert_eq!(fs::metadata(ns.path(&backups[0])).unwrap().permissions().mode() & 0o7777, 0o600);
        let merged = fs::read_to_string(&config).unwrap();
        assert!(is_subsequence(&stock, &merged), "{merged}");
        assert_runtime_type_style(&merged, V2_RUNTIMES);
        assert_eq!(fs::metadata(&config).unwrap().permissions().mode() & 0o7777, 0o600);
        let out = ns.kybernate(&["containerd-config", "install"]);
        assert!(out.contains("result              already installed\n"), "{out}");
        assert!(!out.contains("restart containerd"), "nothing written, nothing to restart: {out}");
        assert_eq!(fs::read_to_string(&config).unwrap(), merged);
        assert_eq!(ns.backups(), backups);

        // uninstall at the default path gives back the stock bytes.
        let out = ns.kybernate(&["containerd-config", "uninstall"]);
        assert!(out.contains("result              removed\n"), "{out}");
        assert!(out.contains("note: restart containerd to apply (systemctl restart containerd)\n"), "{out}");
        assert_eq!(fs::read_to_string(&config).unwrap(), stock);
        assert_eq!(ns.backups().len(), 2);
    }
    assert!(!host_mounts(DEFAULT_DIR), "a mount outlived the namespace");
    assert_eq!(dir_snapshot(Path::new(DEFAULT_DIR)), host_before, "the host's {DEFAULT_DIR} changed");
}
