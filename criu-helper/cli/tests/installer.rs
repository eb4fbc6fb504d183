//! The Kubernetes installer (packaging/kubernetes/installer/install.sh and uninstall.sh) against a
//! fake host root in a temp dir, with the binaries cargo built and a fake containerd restart that
//! records its calls; the Dockerfile and the manifests are checked for consistency. The image
//! itself is built from the Dockerfile with buildah (no Docker, no Docker Hub: test/setup.sh
//! unpacks buildah and builds a debian:bookworm-slim stand-in) and run as the DaemonSet runs it on
//! a node booted with systemd (test/lib/kbt-node), whose containerd.service it restarts; the
//! documented source-checkout install runs on such a node too.

use std::collections::HashMap;
use std::fs;
use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde::Deserialize;
use serde_json::Value as Json;
use serde_yaml_ng::Value as Yaml;

mod common;

use common::{built_binaries, show, text, wait_for, BINARIES};
use kybernate_testbed::{sigterm_and_wait, unique_name, Node, BASE_ROOTFS};

/// Mirrors test/lib/common.sh's KBT_BUILDAH: `kbt-buildah DIR ARGS...` runs buildah with all its
/// state under DIR, in a private mount namespace (written by test/setup.sh).
const KBT_BUILDAH: &str = "/opt/kybernate-test/image-tools/bin/kbt-buildah";
/// Mirrors test/lib/common.sh's KBT_BASE_IMAGE: what the Dockerfile's `FROM debian:bookworm-slim` resolves to.
const KBT_BASE_IMAGE: &str = "docker.io/library/debian:bookworm-slim";

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn fixture(name: &str) -> String {
    fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/containerd").join(name)).unwrap()
}

/// A fake node: `root` is the host's /, `bin` the image's binaries, `restarts` what the fake
/// restart command recorded.
struct Host {
    _tmp: tempfile::TempDir,
    root: PathBuf,
    bin: PathBuf,
    restart: PathBuf,
    restarts: PathBuf,
}

impl Host {
    fn new() -> Self {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("host");
        fs::create_dir_all(&root).unwrap();
        let bin = built_binaries(&tmp.path().join("image-bin"));
        let restarts = tmp.path().join("restarts.log");
        let restart = tmp.path().join("fake-restart");
        fs::write(
            &restart,
            "#!/bin/sh\n# Records the call; fails while a file named `fail` is next to it.\n\
             echo \"$*\" >>\"$(dirname \"$0\")/restarts.log\"\n\
             [ ! -e \"$(dirname \"$0\")/fail\" ]\n",
        )
        .unwrap();
        fs::set_permissions(&restart, fs::Permissions::from_mode(0o755)).unwrap();
        Self { _tmp: tmp, root, bin, restart, restarts }
    }

    fn path(&self, host_path: &str) -> PathBuf {
        self.root.join(host_path.trim_start_matches('/'))
    }

    fn write(&self, host_path: &str, text: &str) {
        let p = self.path(host_path);
        fs::create_dir_all(p.parent().unwrap()).unwrap();
        fs::write(p, text).unwrap();
    }

    fn read(&self, host_path: &str) -> String {
        fs::read_to_string(self.path(host_path)).unwrap()
    }

    fn command(&self, script: &str, env: &[(&str, &str)]) -> Command {
        let mut cmd = Command::new("bash");
        cmd.arg(repo().join("packaging/kubernetes/installer").join(script))
            .env("HOST_ROOT", &self.root)
            .env("KYBERNATE_BIN_DIR", &self.bin)
            .env("CONTAINERD_RESTART", format!("{} containerd", self.restart.display()))
            .env("KYBERNATE_INSTALL_ONESHOT", "1")
            .env_remove("KYBERNATE_CONFIG")
            .env_remove("KYBERNATE_DEFAULT_CONFIG")
            .env_remove("CONTAINERD_CONFIG")
            .env_remove("KYBERNATE_STYLE");
        for (k, v) in env {
            cmd.env(k, v);
        }
        cmd
    }

    fn run(&self, script: &str, env: &[(&str, &str)]) -> Output {
        self.command(script, env).output().unwrap()
    }

    fn run_ok(&self, script: &str, env: &[(&str, &str)]) -> String {
        let out = self.run(script, env);
        assert_eq!(out.status.code(), Some(0), "{script}: {}", show(&out));
        String::from_utf8(out.stdout).unwrap()
    }

    fn restarts(&self) -> Vec<String> {
        fs::read_to_string(&self.restarts).unwrap_or_default().lines().map(String::from).collect()
    }

    fn backups(&self, host_dir: &str) -> Vec<String> {
        backups_in(&self.path(host_dir))
    }
}

/// Whether the containerd with main PID `pid` on `node` loaded the runtime `kybernate` with our
/// runtime type: containerd 1.6 logs its whole CRI config when it starts.
fn loads_our_runtime(node: &Node, pid: u32) -> bool {
    let journal = node.run_ok(&["journalctl", &format!("_PID={pid}"), "--no-pager", "-o", "cat"]);
    let cri = journal
        .lines()
        .find(|l| l.contains("Start cri plugin with config"))
        .unwrap_or_else(|| panic!("containerd {pid} logged no CRI config:\n{journal}"));
    cri.contains("kybernate:{Type:io.containerd.kybernate.v1")
}

/// The installer's backups (`*.kybernate-backup-*`) in `dir`, sorted.
fn backups_in(dir: &Path) -> Vec<String> {
    let mut found: Vec<String> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains(".kybernate-backup-"))
        .collect();
    found.sort();
    found
}

fn same_file_content(a: &Path, b: &Path) -> bool {
    Command::new("cmp").arg("-s").arg(a).arg(b).status().unwrap().success()
}

fn mode(p: &Path) -> u32 {
    fs::metadata(p).unwrap().permissions().mode() & 0o7777
}

#[test]
fn install_rerun_and_uninstall_on_a_fake_host() {
    let host = Host::new();
    let original = fixture("gpu-node.toml");
    host.write("/etc/containerd/config.toml", &original);

    let stdout = host.run_ok("install.sh", &[]);
    for name in BINARIES {
        let installed = host.path(&format!("/usr/local/bin/{name}"));
        assert_eq!(mode(&installed), 0o755, "{name}");
        assert!(same_file_content(&installed, &host.bin.join(name)), "{name} differs");
    }
    let merged = host.read("/etc/containerd/config.toml");
    assert!(merged.contains("[plugins.\"io.containerd.grpc.v1.cri\".containerd.runtimes.kybernate]"), "{merged}");
    assert!(merged.contains("runtime_type = \"io.containerd.kybernate.v1\""), "{merged}");
    assert!(merged.contains("ConfigPath = \"/etc/kybernate/config.toml\""), "{merged}");
    assert!(!merged.contains("runtime_path = \"/usr/local"), "runtime-type style names no shim path: {merged}");
    let backups = host.backups("/etc/containerd");
    assert_eq!(backups.len(), 1, "{backups:?}");
    assert_eq!(host.read(&format!("/etc/containerd/{}", backups[0])), original);
    let default_config = fs::read_to_string(repo().join("packaging/deb/config.toml")).unwrap();
    assert_eq!(host.read("/etc/kybernate/config.toml"), default_config);
    assert_eq!(mode(&host.path("/etc/kybernate/config.toml")), 0o644);
    assert_eq!(host.restarts(), ["containerd"], "{stdout}");
    assert!(!host.path("/var/lib/kybernate/installer").exists(), "restart marker left behind");

    // The admin edits the Kybernate config; a second run changes nothing and restarts nothing.
    host.write("/etc/kybernate/config.toml", "[checkpoint]\nroot = \"/srv/checkpoints\"\n");
    let second = host.run_ok("install.sh", &[]);
    assert!(second.contains("already installed"), "{second}");
    assert!(second.contains("containerd not restarted"), "{second}");
    assert_eq!(host.restarts(), ["containerd"]);
    assert_eq!(host.read("/etc/containerd/config.toml"), merged);
    assert_eq!(host.backups("/etc/containerd").len(), 1);
    assert_eq!(host.read("/etc/kybernate/config.toml"), "[checkpoint]\nroot = \"/srv/checkpoints\"\n");

    // Uninstall: our runtime and the binaries go, containerd restarts, the admin's data stays.
    host.run_ok("uninstall.sh", &[]);
    assert_eq!(host.read("/etc/containerd/config.toml"), original, "uninstall must restore the original bytes");
    for name in BINARIES {
        assert!(!host.path(&format!("/usr/local/bin/{name}")).exists(), "{name} left behind");
    }
    assert_eq!(host.restarts(), ["containerd", "containerd"]);
    assert_eq!(host.read("/etc/kybernate/config.toml"), "[checkpoint]\nroot = \"/srv/checkpoints\"\n");
    assert_eq!(host.backups("/etc/containerd").len(), 2);

    // Uninstalling again: nothing to do, no restart.
    host.run_ok("uninstall.sh", &[]);
    assert_eq!(host.restarts().len(), 2);
}

/// A node without a containerd config gets one; the runtime-path style names the host's shim.
#[test]
fn missing_config_and_runtime_path_style() {
    let host = Host::new();
    host.run_ok("install.sh", &[("KYBERNATE_STYLE", "runtime-path")]);
    let created = host.read("/etc/containerd/config.toml");
    assert!(created.contains("version = 2"), "{created}");
    assert!(created.contains("runtime_path = \"/usr/local/bin/containerd-shim-kybernate-v1\""), "{created}");
    assert!(created.contains("containerd.runtimes.runc]"), "runc must be defined too: {created}");
    assert_eq!(host.restarts(), ["containerd"]);
    host.run_ok("install.sh", &[("KYBERNATE_STYLE", "runtime-path")]);
    assert_eq!(host.restarts(), ["containerd"]);
}

/// k3s: the template is created from k3s's generated config, and only the template is edited.
#[test]
fn k3s_template_is_created_from_the_generated_config() {
    let host = Host::new();
    let dir = "/var/lib/rancher/k3s/agent/etc/containerd";
    let generated = fixture("containerd-1.6-default.toml");
    host.write(&format!("{dir}/config.toml"), &generated);
    let template = format!("{dir}/config.toml.tmpl");
    let restart = format!("{} k3s", host.restart.display());
    host.run_ok("install.sh", &[("CONTAINERD_CONFIG", &template), ("CONTAINERD_RESTART", &restart)]);
    assert_eq!(host.read(&format!("{dir}/config.toml")), generated, "k3s's own file must stay");
    let tmpl = host.read(&template);
    assert!(tmpl.contains("containerd.runtimes.kybernate]"), "{tmpl}");
    assert_eq!(host.restarts(), ["k3s"]);
}

/// The MicroK8s settings as docs/installation.md gives them: `(CONTAINERD_CONFIG, CONTAINERD_RESTART)`.
/// install.sh's header and the DaemonSet's comment must say the same.
fn documented_microk8s_settings() -> (String, String) {
    let docs = fs::read_to_string(repo().join("docs/installation.md")).unwrap();
    let bullet = docs.split("\n- MicroK8s: ").nth(1).expect("a MicroK8s bullet in docs/installation.md");
    let bullet = bullet.split("\n\n").next().unwrap().replace('\n', " ");
    let config = bullet.split("`CONTAINERD_CONFIG=").nth(1).and_then(|s| s.split('`').next()).expect("its config");
    let restart =
        bullet.split("`CONTAINERD_RESTART=\"").nth(1).and_then(|s| s.split("\"`").next()).expect("its restart");
    let script = fs::read_to_string(repo().join("packaging/kubernetes/installer/install.sh")).unwrap();
    assert!(script.contains(&format!("# MicroK8s: CONTAINERD_CONFIG={config} and")), "install.sh's header differs");
    assert!(script.contains(&format!("CONTAINERD_RESTART=\"{restart}\"")), "install.sh's header differs");
    let daemonset = fs::read_to_string(repo().join("packaging/kubernetes/installer/daemonset.yaml")).unwrap();
    assert!(daemonset.contains(&format!("# MicroK8s: {config}\n")), "daemonset.yaml's comment differs");
    assert!(daemonset.contains(&format!("CONTAINERD_RESTART \"{restart}\"")), "daemonset.yaml's comment differs");
    (config.to_string(), restart.to_string())
}

/// What MicroK8s does with its template at each start of its containerd (the `sed` in its
/// run-containerd-with-args): every placeholder replaced by this node's value.
fn render_microk8s_template(template: &str) -> String {
    [
        ("${SNAP_DATA}", "/var/snap/microk8s/current"),
        ("${SNAP}", "/snap/microk8s/current"),
        ("${SNAPSHOTTER}", "overlayfs"),
        ("${RUNTIME_TYPE}", "io.containerd.runc.v2"),
        ("${RUNTIME}", "runc"),
    ]
    .iter()
    .fold(template.to_string(), |text, (placeholder, value)| text.replace(placeholder, value))
}

/// MicroK8s: its stock containerd-template.toml (placeholders such as `${RUNTIME}` and
/// `${SNAP_DATA}` that MicroK8s fills in when it renders the file) gets our runtime and nothing
/// else: the placeholders stay verbatim, the rendered file is one containerd loads, and the
/// restart is the documented `snap restart` (through a recording `nsenter` on PATH).
#[test]
fn microk8s_template_keeps_its_placeholders() {
    let host = Host::new();
    let (config, restart) = documented_microk8s_settings();
    assert_eq!(config, "/var/snap/microk8s/current/args/containerd-template.toml");
    let template = fixture("microk8s-template.toml");
    let placeholders = ["${SNAPSHOTTER}", "${RUNTIME}", "${RUNTIME_TYPE}", "${SNAP_DATA}"];
    for p in placeholders {
        assert!(template.contains(&format!("\"{p}")), "the fixture lacks {p}");
    }
    host.write(&config, &template);

    // A stand-in for nsenter that records its arguments: the documented command, split on
    // spaces as install.sh splits it, reaches it unchanged.
    let bin = host.root.parent().unwrap().join("path-bin");
    fs::create_dir_all(&bin).unwrap();
    let calls = host.root.parent().unwrap().join("nsenter.log");
    fs::write(bin.join("nsenter"), format!("#!/bin/sh\nprintf '%s\\n' \"$*\" >>'{}'\n", calls.display())).unwrap();
    fs::set_permissions(bin.join("nsenter"), fs::Permissions::from_mode(0o755)).unwrap();
    let path = format!("{}:{}", bin.display(), std::env::var("PATH").unwrap());
    let env = [("CONTAINERD_CONFIG", config.as_str()), ("CONTAINERD_RESTART", restart.as_str()), ("PATH", &path)];
    let recorded = || fs::read_to_string(&calls).unwrap_or_default();

    let first = host.run_ok("install.sh", &env);
    let merged = host.read(&config);
    // Our table, and only it, was added: the template's lines are all there, in order, and
    // taking our table out again gives back the original bytes.
    let added: Vec<&str> = {
        let mut original = template.lines().peekable();
        merged
            .lines()
            .filter(|line| {
                if original.peek() == Some(line) {
                    original.next();
                    false
                } else {
                    true
                }
            })
            .collect()
    };
    let ours = [
        "    [plugins.\"io.containerd.grpc.v1.cri\".containerd.runtimes.kybernate]",
        "      runtime_type = \"io.containerd.kybernate.v1\"",
        "      pod_annotations = [\"kybernate.io/*\"]",
        "",
        "      [plugins.\"io.containerd.grpc.v1.cri\".containerd.runtimes.kybernate.options]",
        "        ConfigPath = \"/etc/kybernate/config.toml\"",
        "",
    ];
    assert_eq!(added, ours, "{merged}");
    for p in placeholders {
        assert_eq!(merged.matches(p).count(), template.matches(p).count(), "{p}: {merged}");
    }
    assert!(merged.contains("    default_runtime_name = \"${RUNTIME}\"\n"), "{merged}");
    assert!(!merged.contains("runtimes.runc]\n      runtime_type = \"io.containerd.runc.v2\""), "runc untouched");
    // The CLI's notes reach the pod's log: ${RUNTIME} is no missing runtime.
    assert!(first.contains("placeholder"), "{first}");
    assert!(!first.contains("will not load"), "a false warning about ${{RUNTIME}}: {first}");

    let dir = config.rsplit_once('/').unwrap().0;
    let backups = host.backups(dir);
    assert_eq!(backups.len(), 1, "{backups:?}");
    assert_eq!(host.read(&format!("{dir}/{}", backups[0])), template);
    assert_eq!(recorded(), "-t 1 -m -u -i -n -p -- snap restart microk8s.daemon-containerd\n", "{first}");
    assert!(host.restarts().is_empty(), "the Host's own restart command must not run");

    // Rendered as MicroK8s renders it, containerd 1.6 loads it and finds our runtime.
    let rendered = host.root.parent().unwrap().join("containerd.toml");
    fs::write(&rendered, render_microk8s_template(&merged)).unwrap();
    let out = Command::new("containerd").arg("--config").arg(&rendered).args(["config", "dump"]).output().unwrap();
    assert!(out.status.success(), "containerd config dump: {}", show(&out));
    let dump: toml::Table = toml::from_str(&text(&out.stdout)).unwrap();
    let cri = &dump["plugins"]["io.containerd.grpc.v1.cri"]["containerd"];
    assert_eq!(cri["default_runtime_name"].as_str(), Some("runc"));
    assert_eq!(cri["runtimes"]["kybernate"]["runtime_type"].as_str(), Some("io.containerd.kybernate.v1"));
    assert_eq!(cri["runtimes"]["runc"]["runtime_type"].as_str(), Some("io.containerd.runc.v2"));

    // A second run changes nothing and restarts nothing.
    let second = host.run_ok("install.sh", &env);
    assert!(second.contains("already installed"), "{second}");
    assert!(second.contains("containerd not restarted"), "{second}");
    assert_eq!(host.read(&config), merged);
    assert_eq!(host.backups(dir), backups);
    assert_eq!(recorded().lines().count(), 1, "{second}");
}

/// A bad config stops the installer before any restart; a failed restart is retried by the next run.
#[test]
fn failures_neither_restart_nor_lose_a_restart() {
    let host = Host::new();
    let malformed = fixture("malformed.toml");
    host.write("/etc/containerd/config.toml", &malformed);
    let out = host.run("install.sh", &[]);
    assert_eq!(out.status.code(), Some(2), "{}", show(&out));
    assert!(String::from_utf8_lossy(&out.stderr).contains("not valid TOML at line 4"), "{}", show(&out));
    assert_eq!(host.read("/etc/containerd/config.toml"), malformed);
    assert!(host.restarts().is_empty());

    host.write("/etc/containerd/config.toml", &fixture("gpu-node.toml"));
    let fail = host.restart.parent().unwrap().join("fail");
    fs::write(&fail, "").unwrap();
    let out = host.run("install.sh", &[]);
    assert_ne!(out.status.code(), Some(0), "a failed restart must fail the pod: {}", show(&out));
    assert_eq!(host.restarts().len(), 1);
    fs::remove_file(&fail).unwrap();
    // The config is merged already, but the restart is still owed.
    host.run_ok("install.sh", &[]);
    assert_eq!(host.restarts().len(), 2);
    host.run_ok("install.sh", &[]);
    assert_eq!(host.restarts().len(), 2);
}

/// Without KYBERNATE_INSTALL_ONESHOT the script stays up (a DaemonSet pod) and ends on SIGTERM.
#[test]
fn daemonset_mode_sleeps_and_ends_on_sigterm() {
    let host = Host::new();
    host.write("/etc/containerd/config.toml", &fixture("gpu-node.toml"));
    let log = host.root.parent().unwrap().join("daemonset.log");
    let mut child = host
        .command("install.sh", &[("KYBERNATE_INSTALL_ONESHOT", "0")])
        .stdout(fs::File::create(&log).unwrap())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    while !fs::read_to_string(&log).unwrap().contains("kybernate-install: done") {
        assert!(child.try_wait().unwrap().is_none(), "the installer exited: {}", fs::read_to_string(&log).unwrap());
        assert!(Instant::now() < deadline, "no `done`: {}", fs::read_to_string(&log).unwrap());
        std::thread::sleep(Duration::from_millis(50));
    }
    std::thread::sleep(Duration::from_millis(300));
    assert!(child.try_wait().unwrap().is_none(), "the installer must keep running");
    // SAFETY: kill with a pid we spawned.
    assert_eq!(unsafe { libc::kill(child.id() as i32, libc::SIGTERM) }, 0);
    let deadline = Instant::now() + Duration::from_secs(5);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        assert!(Instant::now() < deadline, "SIGTERM did not end the installer");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(status.code(), Some(0));
}

#[test]
fn scripts_pass_bash_syntax_check() {
    for script in ["install.sh", "uninstall.sh"] {
        let path = repo().join("packaging/kubernetes/installer").join(script);
        let text = fs::read_to_string(&path).unwrap();
        assert!(text.starts_with("#!/usr/bin/env bash\n"), "{script}");
        assert!(text.contains("\nset -euo pipefail\n"), "{script}");
        assert_eq!(mode(&path) & 0o111, 0o111, "{script} must be executable (the image runs it directly)");
        let out = Command::new("bash").arg("-n").arg(&path).output().unwrap();
        assert!(out.status.success(), "{script}: {}", show(&out));
    }
}

fn yaml_docs(rel: &str) -> Vec<Yaml> {
    let text = fs::read_to_string(repo().join(rel)).unwrap();
    serde_yaml_ng::Deserializer::from_str(&text).map(|d| Yaml::deserialize(d).unwrap()).collect()
}

fn at<'a>(v: &'a Yaml, path: &str) -> &'a Yaml {
    path.split('.').fold(v, |v, key| match key.parse::<usize>() {
        Ok(i) => &v[i],
        Err(_) => &v[key],
    })
}

#[test]
fn runtime_classes_name_our_handler() {
    let plain = yaml_docs("packaging/kubernetes/runtimeclass.yaml");
    assert_eq!(plain.len(), 1);
    let rc = &plain[0];
    assert_eq!(rc["apiVersion"], "node.k8s.io/v1");
    assert_eq!(rc["kind"], "RuntimeClass");
    assert_eq!(at(rc, "metadata.name"), "kybernate");
    assert_eq!(rc["handler"], "kybernate");
    assert!(rc.get("scheduling").is_none(), "the plain RuntimeClass schedules anywhere");

    let gpu = &yaml_docs("packaging/kubernetes/runtimeclass-gpu.yaml")[0];
    assert_eq!(gpu["apiVersion"], "node.k8s.io/v1");
    assert_eq!(gpu["handler"], "kybernate");
    assert_eq!(at(gpu, "scheduling.nodeSelector")["nvidia.com/gpu.present"], "true");
    assert_eq!(at(gpu, "scheduling.tolerations.0.key"), "nvidia.com/gpu");
}

#[test]
fn daemonset_runs_the_installer_privileged_with_the_host_root() {
    let docs = yaml_docs("packaging/kubernetes/installer/daemonset.yaml");
    let ns = docs.iter().find(|d| d["kind"] == "Namespace").expect("a Namespace");
    let ds = docs.iter().find(|d| d["kind"] == "DaemonSet").expect("a DaemonSet");
    assert_eq!(at(ds, "metadata.namespace"), at(ns, "metadata.name"));
    assert_eq!(at(ds, "metadata.namespace"), "kybernate-system");
    let pod = at(ds, "spec.template.spec");
    assert_eq!(pod["hostPID"].as_bool(), Some(true));
    assert_eq!(at(ds, "spec.selector.matchLabels"), at(ds, "spec.template.metadata.labels"));
    let c = &pod["containers"][0];
    assert_eq!(at(c, "securityContext.privileged").as_bool(), Some(true));
    assert_eq!(c["command"][0], "/opt/kybernate/install.sh");
    let env: Vec<(&str, &str)> = c["env"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|e| (e["name"].as_str().unwrap(), e["value"].as_str().unwrap()))
        .collect();
    assert!(env.contains(&("HOST_ROOT", "/host")), "{env:?}");
    let mount = &c["volumeMounts"][0];
    assert_eq!(mount["mountPath"], "/host");
    let volume = pod["volumes"].as_sequence().unwrap().iter().find(|v| v["name"] == mount["name"]).unwrap();
    assert_eq!(at(volume, "hostPath.path"), "/");
    let tolerations = pod["tolerations"].as_sequence().unwrap();
    assert!(tolerations.iter().any(|t| t["key"] == "nvidia.com/gpu" && t["operator"] == "Exists"), "{tolerations:?}");
}

/// The Dockerfile copies files that exist (or, under target/release, the three binaries), the
/// repository's .dockerignore lets exactly those through, and the paths match what install.sh expects.
#[test]
fn dockerfile_copies_what_the_installer_needs() {
    let dir = repo().join("packaging/kubernetes/installer");
    let text = fs::read_to_string(dir.join("Dockerfile")).unwrap().replace("\\\n", " ");
    let mut sources = Vec::new();
    for line in text.lines().filter(|l| l.starts_with("COPY ")) {
        let words: Vec<&str> = line.split_whitespace().skip(1).collect();
        let (dest, srcs) = words.split_last().unwrap();
        assert!(dest.starts_with("/opt/kybernate/"), "{line}");
        sources.extend(srcs.iter().map(|s| s.to_string()));
    }
    for src in &sources {
        match src.strip_prefix("target/release/") {
            Some(bin) => assert!(BINARIES.contains(&bin), "{src}"),
            None => assert!(repo().join(src).is_file(), "{src} does not exist"),
        }
    }
    assert_eq!(sources.iter().filter(|s| s.starts_with("target/release/")).count(), 3);
    assert!(text.contains("ENTRYPOINT [\"/opt/kybernate/install.sh\"]"));
    assert!(text.contains("KYBERNATE_BIN_DIR=/opt/kybernate/bin"));
    assert!(
        !dir.join("Dockerfile.dockerignore").exists(),
        "Docker's classic builder ignores <Dockerfile>.dockerignore"
    );
    let ignore = fs::read_to_string(repo().join(".dockerignore")).unwrap();
    let mut allowed: Vec<String> = ignore.lines().filter_map(|l| l.strip_prefix('!')).map(String::from).collect();
    allowed.sort();
    sources.sort();
    assert_eq!(allowed, sources);
}

/// Every variable docs/installation.md's DaemonSet section documents is one install.sh reads.
#[test]
fn documented_variables_exist() {
    let docs = fs::read_to_string(repo().join("docs/installation.md")).unwrap();
    let section = docs.split("## Installing on Kubernetes (DaemonSet)").nth(1).unwrap().split("\n## ").next().unwrap();
    let script = fs::read_to_string(repo().join("packaging/kubernetes/installer/install.sh")).unwrap();
    let mut seen = 0;
    for row in section.lines().filter(|l| l.starts_with("| `")) {
        for var in row.split('|').nth(1).unwrap().split(',').map(|v| v.trim().trim_matches('`')) {
            assert!(script.contains(&format!("{var}=\"${{{var}:-")), "install.sh does not read {var}");
            seen += 1;
        }
    }
    assert!(seen >= 8, "{seen} variables documented");
}

/// Runs a build step; panics with its output if it fails. Returns stdout.
fn step(what: &str, cmd: &mut Command) -> String {
    let out = cmd.stdin(Stdio::null()).output().unwrap_or_else(|e| panic!("{what}: cannot run {cmd:?}: {e}"));
    assert!(out.status.success(), "{what} failed: {cmd:?}\n{}", show(&out));
    text(&out.stdout)
}

/// `kbt-buildah DIR ARGS...`: buildah with its storage, config and temp files under `dir`.
fn buildah(dir: &Path, args: &[&str]) -> String {
    step(&format!("buildah {}", args.first().unwrap_or(&"")), Command::new(KBT_BUILDAH).arg(dir).args(args))
}

/// The config blob (`{"config": {...}, "rootfs": ...}`) of the one image in an OCI archive.
fn oci_archive_config(archive: &Path) -> Json {
    let mut small: HashMap<String, Vec<u8>> = HashMap::new();
    let mut tar = tar::Archive::new(fs::File::open(archive).unwrap());
    for entry in tar.entries().unwrap() {
        let mut entry = entry.unwrap();
        if entry.size() > 1 << 20 {
            continue; // a layer
        }
        let name = entry.path().unwrap().to_string_lossy().trim_start_matches("./").to_string();
        let mut bytes = Vec::new();
        entry.read_to_end(&mut bytes).unwrap();
        small.insert(name, bytes);
    }
    let json = |name: &str| -> Json {
        let bytes = small.get(name).unwrap_or_else(|| panic!("{name} not in {}", archive.display()));
        serde_json::from_slice(bytes).unwrap()
    };
    let blob = |digest: &Json| format!("blobs/sha256/{}", digest.as_str().unwrap().trim_start_matches("sha256:"));
    let index = json("index.json");
    let manifests = index["manifests"].as_array().unwrap();
    assert_eq!(manifests.len(), 1, "{index}");
    let manifest = json(&blob(&manifests[0]["digest"]));
    json(&blob(&manifest["config"]["digest"]))
}

/// Stages a build context in `ctx` as the repository root would give it, with only what the
/// Dockerfile copies, at the same relative paths (the debug binaries standing in for the release
/// ones under target/release: CI builds no release), the Dockerfile and the .dockerignore. Returns
/// where the binaries are.
fn stage_context(ctx: &Path, dockerfile: &str) -> PathBuf {
    let mut copied: Vec<&str> = dockerfile
        .lines()
        .filter_map(|l| l.strip_prefix("COPY "))
        .flat_map(|l| {
            let words: Vec<&str> = l.split_whitespace().collect();
            words[..words.len() - 1].to_vec()
        })
        .collect();
    let bin = built_binaries(&ctx.join("target/release"));
    let binaries: Vec<String> = BINARIES.iter().map(|b| format!("target/release/{b}")).collect();
    copied.retain(|src| !binaries.iter().any(|b| b == src));
    assert_eq!(copied.len(), 4, "the Dockerfile copies the three binaries and four other files: {copied:?}");
    for rel in copied.into_iter().chain(["packaging/kubernetes/installer/Dockerfile", ".dockerignore"]) {
        let dest = ctx.join(rel);
        fs::create_dir_all(dest.parent().unwrap()).unwrap();
        fs::copy(repo().join(rel), &dest).unwrap(); // keeps the mode: install.sh is executable
    }
    bin
}

/// The real Dockerfile, built with buildah from a context holding exactly what it copies (the
/// debug binaries standing in for the release ones), then run on a systemd node (kbt-node) by its
/// containerd as the DaemonSet runs it: privileged, the node's / at /host, hostPID, restarting that
/// containerd through `nsenter -t 1 ... systemctl`; installed, run again (nothing to do), uninstalled.
#[test]
fn the_installer_image_builds_from_its_dockerfile_and_installs_a_node() {
    for tool in [KBT_BUILDAH, BASE_ROOTFS] {
        assert!(Path::new(tool).is_file(), "{tool} missing: run test/setup.sh");
    }
    let dockerfile =
        fs::read_to_string(repo().join("packaging/kubernetes/installer/Dockerfile")).unwrap().replace("\\\n", " ");
    let host_dirs = ["/var/lib/containers", "/run/containers", "/etc/containers"];
    let host_dirs_before: Vec<bool> = host_dirs.iter().map(|d| Path::new(d).exists()).collect();

    // A temp dir rather than a test bed's scratch dir: kbt-buildah refuses dirs under /var/lib.
    let scratch = tempfile::Builder::new().prefix("kbt-installer-image-").tempdir().unwrap();
    let scratch_path = scratch.path().to_path_buf();
    let ctx = scratch.path().join("context");
    let storage = scratch.path().join("buildah");
    let archive = scratch.path().join("installer-oci.tar");
    let bin = stage_context(&ctx, &dockerfile);

    // The base image, from the rootfs test/setup.sh built; then the Dockerfile, unchanged (buildah
    // reads the context's .dockerignore by itself).
    let image = format!("localhost/kybernate-installer:{}", unique_name("test"));
    let c = buildah(&storage, &["from", "scratch"]);
    let c = c.trim();
    buildah(&storage, &["add", c, BASE_ROOTFS, "/"]);
    let path_env = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
    buildah(&storage, &["config", "--os", "linux", "--cmd", "[\"bash\"]", "--env", path_env, c]);
    buildah(&storage, &["commit", "-q", "--rm", c, KBT_BASE_IMAGE]);
    let ctx_s = ctx.to_str().unwrap();
    let built = Instant::now();
    buildah(
        &storage,
        &[
            "build",
            "--pull=never",
            "--isolation=chroot",
            "-f",
            &format!("{ctx_s}/packaging/kubernetes/installer/Dockerfile"),
            "-t",
            &image,
            ctx_s,
        ],
    );
    eprintln!("buildah build: {:?}", built.elapsed());
    buildah(&storage, &["push", "-q", &image, &format!("oci-archive:{}:{image}", archive.display())]);

    // The image config says what the Dockerfile says.
    let config = oci_archive_config(&archive);
    let entrypoint = dockerfile.lines().find_map(|l| l.strip_prefix("ENTRYPOINT ")).expect("an ENTRYPOINT");
    let entrypoint: Json = serde_json::from_str(entrypoint).unwrap();
    assert_eq!(config["config"]["Entrypoint"], entrypoint, "{config}");
    assert_eq!(entrypoint, serde_json::json!(["/opt/kybernate/install.sh"]));
    assert!(
        config["config"]["Cmd"].as_array().map_or(true, Vec::is_empty),
        "ENTRYPOINT must reset the base's CMD (install.sh takes no arguments): {config}"
    );
    let env: Vec<&str> = config["config"]["Env"].as_array().unwrap().iter().map(|e| e.as_str().unwrap()).collect();
    let env_line = dockerfile.lines().find_map(|l| l.strip_prefix("ENV ")).expect("an ENV");
    let want: Vec<&str> = env_line.split_whitespace().collect();
    for var in [
        "HOST_ROOT=/host",
        "KYBERNATE_BIN_DIR=/opt/kybernate/bin",
        "KYBERNATE_DEFAULT_CONFIG=/opt/kybernate/config.toml",
    ] {
        assert!(want.contains(&var), "the Dockerfile's ENV lacks {var}: {env_line}");
    }
    for var in want.iter().chain([&path_env]) {
        assert!(env.contains(var), "image Env lacks {var}: {env:?}");
    }

    // Import it into a systemd node's containerd and run it there as the DaemonSet runs it:
    // privileged, the node's / at /host, in the node's PID namespace (hostPID), with the default
    // CONTAINERD_RESTART, `nsenter -t 1 ... systemctl restart containerd`. The node's containerd
    // starts from containerd 1.6's stock config. The installer restarts the containerd that runs
    // it: `ctr run -d`, its output to a file, as a pod's survives kubelet's reconnect.
    let node = Node::boot().expect("a systemd node (kbt-node)");
    let stock = fixture("containerd-1.6-default.toml");
    fs::write(node.path("/etc/containerd/config.toml"), &stock).unwrap();
    node.run_ok(&["systemctl", "restart", "containerd"]);
    let ns = unique_name("installer");
    let on_node = "/var/tmp/installer-oci.tar";
    fs::copy(&archive, node.path(on_node)).unwrap();
    node.run_ok(&["ctr", "-n", &ns, "images", "import", on_node]);
    let images = node.run_ok(&["ctr", "-n", &ns, "images", "ls", "-q"]);
    assert!(images.lines().any(|l| l.trim() == image), "{image} not listed after import: {images}");
    let run = |n: u32, command: &[&str]| -> String {
        let id = format!("installer-{n}");
        let log = format!("/var/log/{id}.log");
        let mut args = vec![
            "ctr",
            "-n",
            &ns,
            "run",
            "-d",
            "--privileged",
            "--with-ns",
            "pid:/proc/1/ns/pid",
            "--mount",
            "type=bind,src=/,dst=/host,options=rbind:rw",
            "--env",
            "KYBERNATE_INSTALL_ONESHOT=1",
        ];
        let log_uri = format!("file://{log}");
        args.extend(["--log-uri", &log_uri, &image, &id]);
        args.extend(command);
        node.run_ok(&args);
        wait_for(&format!("installer run {n} to end"), || {
            let tasks = node.run_ok(&["ctr", "-n", &ns, "tasks", "ls"]);
            tasks.lines().any(|l| l.starts_with(&format!("{id} ")) && l.contains("STOPPED")).then_some(())
        });
        let output = fs::read_to_string(node.path(&log)).unwrap_or_default();
        // `ctr tasks delete` warns of a non-zero exit status (and exits 0).
        let deleted = node.run(&["ctr", "-n", &ns, "tasks", "delete", &id]);
        assert!(
            deleted.status.success() && !text(&deleted.stderr).contains("exit code"),
            "installer run {n}: {}\n{output}",
            show(&deleted)
        );
        node.run_ok(&["ctr", "-n", &ns, "containers", "delete", &id]);
        output
    };

    let before = node.main_pid("containerd");
    assert!(!loads_our_runtime(&node, before));
    let first = run(1, &[]);
    let restarted = node.wait_for_restart("containerd", before);
    assert!(first.contains("done"), "{first}");
    assert!(loads_our_runtime(&node, restarted), "the restarted containerd has no runtime kybernate\n{first}");
    for name in BINARIES {
        let installed = node.path(&format!("/usr/local/bin/{name}"));
        assert_eq!(mode(&installed), 0o755, "{name}: {first}");
        assert!(same_file_content(&installed, &bin.join(name)), "{name} differs from the built one");
    }
    let default_config = fs::read_to_string(repo().join("packaging/deb/config.toml")).unwrap();
    assert_eq!(fs::read_to_string(node.path("/etc/kybernate/config.toml")).unwrap(), default_config);
    let merged = fs::read_to_string(node.path("/etc/containerd/config.toml")).unwrap();
    assert!(merged.contains("[plugins.\"io.containerd.grpc.v1.cri\".containerd.runtimes.kybernate]"), "{merged}");
    assert!(merged.contains("runtime_type = \"io.containerd.kybernate.v1\""), "{merged}");
    let backups = backups_in(&node.path("/etc/containerd"));
    assert_eq!(backups.len(), 1, "{backups:?}");
    assert_eq!(fs::read_to_string(node.path(&format!("/etc/containerd/{}", backups[0]))).unwrap(), stock);

    // The installer's task went on through the restart, as a pod's does. A second run changes
    // nothing and restarts nothing.
    let second = run(2, &[]);
    assert!(second.contains("already installed"), "{second}");
    assert!(second.contains("containerd not restarted"), "{second}");
    assert_eq!(node.main_pid("containerd"), restarted, "{second}");
    assert_eq!(fs::read_to_string(node.path("/etc/containerd/config.toml")).unwrap(), merged);
    assert_eq!(backups_in(&node.path("/etc/containerd")), backups);

    // The documented uninstall: the same image with uninstall.sh as its command.
    let third = run(3, &["/opt/kybernate/uninstall.sh"]);
    let after_uninstall = node.wait_for_restart("containerd", restarted);
    assert!(!loads_our_runtime(&node, after_uninstall), "{third}");
    for name in BINARIES {
        assert!(!node.path(&format!("/usr/local/bin/{name}")).exists(), "{name} left: {third}");
    }
    assert_eq!(fs::read_to_string(node.path("/etc/kybernate/config.toml")).unwrap(), default_config);
    node.run_ok(&["ctr", "-n", &ns, "images", "rm", &image]);
    drop(node);

    scratch.close().expect("removing the build's scratch dir");
    assert!(!scratch_path.exists(), "{} left behind", scratch_path.display());
    for (dir, before) in host_dirs.iter().zip(host_dirs_before) {
        assert_eq!(Path::new(dir).exists(), before, "{dir}: buildah wrote outside its dir");
    }
}

/// Mirrors test/lib/common.sh's KBT_DOCKERD: `kbt-dockerd DIR` runs Debian's dockerd with all its
/// state and its API socket under DIR, in a private mount namespace (written by test/setup.sh).
const KBT_DOCKERD: &str = "/opt/kybernate-test/docker/bin/kbt-dockerd";

/// A private dockerd (kbt-dockerd) for one test; stopped, with its own containerd, on drop.
struct Dockerd {
    dir: PathBuf,
    child: std::process::Child,
}

impl Dockerd {
    fn start(dir: &Path) -> Self {
        let log = fs::File::create(dir.with_extension("log")).unwrap();
        let child = Command::new(KBT_DOCKERD)
            .arg(dir)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .process_group(0) // so that drop can take down dockerd's containerd with it
            .spawn()
            .unwrap_or_else(|e| panic!("{KBT_DOCKERD}: {e} (run test/setup.sh)"));
        let dockerd = Self { dir: dir.to_path_buf(), child };
        wait_for("dockerd to serve its API", || {
            let out = dockerd.docker().args(["version", "--format", "{{.Server.Version}}"]).output().unwrap();
            out.status.success().then_some(())
        });
        dockerd
    }

    /// The docker CLI of the same package, talking to this dockerd; its own config dir, not ~/.docker.
    fn docker(&self) -> Command {
        let mut cmd = Command::new(Path::new(KBT_DOCKERD).parent().unwrap().join("../usr/bin/docker"));
        cmd.env("DOCKER_HOST", format!("unix://{}/docker.sock", self.dir.display()))
            .env("DOCKER_CONFIG", self.dir.join("client"))
            .stdin(Stdio::null());
        cmd
    }

    fn docker_ok(&self, args: &[&str]) -> String {
        step(&format!("docker {}", args.first().unwrap_or(&"")), self.docker().args(args))
    }

    fn log(&self) -> String {
        fs::read_to_string(self.dir.with_extension("log")).unwrap_or_default()
    }
}

impl Drop for Dockerd {
    fn drop(&mut self) {
        let pid = self.child.id() as libc::pid_t;
        if sigterm_and_wait(&mut self.child, Duration::from_secs(30)) {
            return;
        }
        // SAFETY: the process group this test spawned (dockerd's leader is not reaped yet).
        unsafe { libc::killpg(pid, libc::SIGKILL) };
        let _ = self.child.wait();
    }
}

/// How many bytes a builder says it sent as the build context: the last `MARKER 123.4MB` in its
/// output (Docker's decimal units).
fn context_bytes(output: &str, marker: &str) -> f64 {
    let size = output
        .rsplit(marker)
        .next()
        .filter(|_| output.contains(marker))
        .and_then(|rest| rest.split_whitespace().next())
        .unwrap_or_else(|| panic!("no `{marker}` in the build's output:\n{output}"));
    let split = size.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(size.len());
    let number: f64 = size[..split].parse().unwrap_or_else(|_| panic!("context size {size:?}"));
    let unit = match &size[split..] {
        "B" => 1.0,
        "kB" => 1e3,
        "MB" => 1e6,
        "GB" => 1e9,
        other => panic!("context size unit {other:?} in {size:?}"),
    };
    number * unit
}

/// The documented `docker build` line (docs/installation.md), run as written from a context that
/// also holds build output under target/ as a working tree does, with Debian's Docker 20.10: its
/// classic builder (the default before Docker 23) and BuildKit. Both must send only what the
/// Dockerfile copies (before the root .dockerignore, the classic builder sent all of target/ and
/// failed), and the image must hold exactly those files, with their bytes and modes.
#[test]
fn docker_builds_the_installer_image_with_the_documented_command() {
    for tool in [KBT_DOCKERD, BASE_ROOTFS] {
        assert!(Path::new(tool).is_file(), "{tool} missing: run test/setup.sh");
    }
    let docs = fs::read_to_string(repo().join("docs/installation.md")).unwrap();
    let documented: Vec<&str> = docs
        .lines()
        .find(|l| l.starts_with("docker build "))
        .expect("docs/installation.md has a `docker build` line")
        .split_whitespace()
        .collect();
    let dockerfile =
        fs::read_to_string(repo().join("packaging/kubernetes/installer/Dockerfile")).unwrap().replace("\\\n", " ");
    let host_dirs = ["/etc/docker", "/var/lib/docker", "/run/docker", "/root/.docker"];
    let host_dirs_before: Vec<bool> = host_dirs.iter().map(|d| Path::new(d).exists()).collect();

    // /tmp and a short name: dockerd's containerd puts its sockets under the dir.
    let scratch = tempfile::Builder::new().prefix("kbt-dk-").tempdir_in("/tmp").unwrap();
    let scratch_path = scratch.path().to_path_buf();
    let ctx = scratch.path().join("ctx");
    let bin = stage_context(&ctx, &dockerfile);
    let wanted_bytes = kybernate_checkpoint::dir_size(&ctx);
    // What a working tree also has: 512 MiB of build output (sparse: it costs no disk).
    let junk = ctx.join("target/debug/build-output");
    fs::create_dir_all(junk.parent().unwrap()).unwrap();
    fs::File::create(&junk).unwrap().set_len(512 << 20).unwrap();

    let dockerd = Dockerd::start(&scratch.path().join("d"));
    let path_env = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
    dockerd.docker_ok(&[
        "import",
        "--change",
        "CMD [\"bash\"]",
        "--change",
        &format!("ENV {path_env}"),
        BASE_ROOTFS,
        KBT_BASE_IMAGE,
    ]);

    for (builder, buildkit, marker) in
        [("classic", "0", "Sending build context to Docker daemon"), ("buildkit", "1", "transferring context:")]
    {
        let tag = format!("kybernate-installer:{builder}");
        let mut args: Vec<&str> = documented[1..].to_vec();
        let t = args.iter().position(|a| *a == "-t").expect("the documented line names its tag with -t");
        args[t + 1] = &tag;
        let started = Instant::now();
        let out = dockerd.docker().current_dir(&ctx).env("DOCKER_BUILDKIT", buildkit).args(&args).output().unwrap();
        let output = format!("{}{}", text(&out.stdout), text(&out.stderr));
        assert!(
            out.status.success(),
            "{builder}: docker {args:?} failed\n{output}\n--- dockerd ---\n{}",
            dockerd.log()
        );
        eprintln!("docker build ({builder}): {:?}", started.elapsed());
        let sent = context_bytes(&output, marker);
        let wanted = wanted_bytes as f64;
        assert!(
            sent > wanted * 0.98 - 1e6 && sent < wanted * 1.02 + 1e6,
            "{builder}: sent a {sent} byte context, the Dockerfile copies {wanted} bytes\n{output}"
        );

        // The image config says what the Dockerfile says.
        let config: Json =
            serde_json::from_str(&dockerd.docker_ok(&["image", "inspect", "--format", "{{json .Config}}", &tag]))
                .unwrap();
        assert_eq!(config["Entrypoint"], serde_json::json!(["/opt/kybernate/install.sh"]), "{builder}: {config}");
        assert!(config["Cmd"].as_array().map_or(true, Vec::is_empty), "{builder}: CMD must be reset: {config}");
        let env: Vec<&str> = config["Env"].as_array().unwrap().iter().map(|e| e.as_str().unwrap()).collect();
        for var in [
            "HOST_ROOT=/host",
            "KYBERNATE_BIN_DIR=/opt/kybernate/bin",
            "KYBERNATE_DEFAULT_CONFIG=/opt/kybernate/config.toml",
            path_env,
        ] {
            assert!(env.contains(&var), "{builder}: image Env lacks {var}: {env:?}");
        }

        // /opt/kybernate holds exactly the copied files, byte for byte, with their modes.
        let id = dockerd.docker_ok(&["create", &tag]).trim().to_string();
        let tar = dockerd.docker().args(["cp", &format!("{id}:/opt/kybernate"), "-"]).output().unwrap();
        assert!(tar.status.success(), "{builder}: docker cp: {}", show(&tar));
        dockerd.docker_ok(&["rm", &id]);
        let mut files = HashMap::new();
        let mut archive = tar::Archive::new(tar.stdout.as_slice());
        for entry in archive.entries().unwrap() {
            let mut entry = entry.unwrap();
            if entry.header().entry_type().is_file() {
                let path = entry.path().unwrap().to_string_lossy().into_owned();
                let mode = entry.header().mode().unwrap() & 0o7777;
                let mut bytes = Vec::new();
                entry.read_to_end(&mut bytes).unwrap();
                files.insert(path, (mode, bytes));
            }
        }
        let mut expected: Vec<(String, PathBuf)> = BINARIES
            .iter()
            .map(|b| (format!("kybernate/bin/{b}"), bin.join(b)))
            .chain(
                ["install.sh", "uninstall.sh", "lib.sh"]
                    .map(|f| (format!("kybernate/{f}"), ctx.join("packaging/kubernetes/installer").join(f))),
            )
            .chain([("kybernate/config.toml".to_string(), ctx.join("packaging/deb/config.toml"))])
            .collect();
        expected.sort();
        let mut listed: Vec<&String> = files.keys().collect();
        listed.sort();
        assert_eq!(listed, expected.iter().map(|(p, _)| p).collect::<Vec<_>>(), "{builder}: /opt/kybernate");
        for (path, source) in &expected {
            let (image_mode, bytes) = &files[path];
            assert_eq!(*image_mode, mode(source), "{builder}: {path}'s mode");
            assert!(*bytes == fs::read(source).unwrap(), "{builder}: {path} differs from {}", source.display());
        }
    }

    // Nothing is left: dockerd, its containerd and their mounts go with its namespace; the scratch
    // dir (data root included) goes, and dockerd wrote nothing outside it.
    drop(dockerd);
    scratch.close().expect("removing the build's scratch dir");
    assert!(!scratch_path.exists(), "{} left behind", scratch_path.display());
    for (dir, before) in host_dirs.iter().zip(host_dirs_before) {
        assert_eq!(Path::new(dir).exists(), before, "{dir}: docker wrote outside its dir");
    }
}

/// The documented source-checkout install (docs/installation.md), run as written on a systemd
/// node (kbt-node) from a checkout there (the debug binaries standing in for target/release):
/// `systemctl restart containerd` restarts the unit with our runtime loaded, a container runs
/// through the installed shim, its log is in `journalctl -u containerd` as docs/troubleshooting.md
/// says, and the same line with uninstall.sh takes it all out again.
#[test]
fn documented_source_install_on_a_systemd_node() {
    let docs = fs::read_to_string(repo().join("docs/installation.md")).unwrap();
    let start = docs.find("HOST_ROOT=/ KYBERNATE_BIN_DIR=target/release").expect("the source-checkout install line");
    let block = &docs[start..start + docs[start..].find("\n```").unwrap()];
    let line = block.replace("\\\n", " ");
    assert!(line.contains("CONTAINERD_RESTART=\"systemctl restart containerd\""), "{line}");
    assert!(line.trim_end().ends_with("bash packaging/kubernetes/installer/install.sh"), "{line}");

    let node = Node::boot().expect("a systemd node (kbt-node)");
    let checkout = "/root/kybernate";
    built_binaries(&node.path(checkout).join("target/release"));
    step(
        "copying packaging/ to the node",
        Command::new("cp").arg("-a").arg(repo().join("packaging")).arg(node.path(checkout)),
    );
    let in_checkout = |line: &str| node.run_ok(&["env", "-C", checkout, "bash", "-c", line]);

    let before = node.main_pid("containerd");
    assert!(!loads_our_runtime(&node, before));
    let installed = in_checkout(&line);
    assert!(installed.contains("done"), "{installed}");
    let restarted = node.wait_for_restart("containerd", before);
    assert!(loads_our_runtime(&node, restarted), "the restarted containerd has no runtime kybernate\n{installed}");

    // A container through the installed shim: containerd finds it on the unit's PATH.
    let ns = unique_name("node");
    let archive = "/var/tmp/busybox-oci.tar";
    fs::copy(kybernate_testbed::IMAGE_ARCHIVE, node.path(archive)).unwrap();
    node.run_ok(&["ctr", "-n", &ns, "images", "import", archive]);
    let id = unique_name("hello");
    let out = node.run_ok(&[
        "ctr",
        "-n",
        &ns,
        "run",
        "--rm",
        "--runtime",
        "io.containerd.kybernate.v1",
        kybernate_testbed::IMAGE,
        &id,
        "echo",
        "hello from the node",
    ]);
    assert_eq!(out.trim(), "hello from the node");
    let journal = node.run_ok(&["journalctl", "-u", "containerd"]);
    let ours: Vec<&str> = journal.lines().filter(|l| l.contains(&format!("started for namespace {ns}"))).collect();
    assert_eq!(ours.len(), 1, "our shim's log is not in `journalctl -u containerd`:\n{journal}");
    assert!(
        journal
            .lines()
            .any(|l| l.contains(&format!("container {id}: process {id}")) && l.contains("exited with status 0")),
        "{journal}"
    );
    node.run_ok(&["ctr", "-n", &ns, "images", "rm", kybernate_testbed::IMAGE]);

    // The same line with uninstall.sh.
    let uninstall = line.replace("installer/install.sh", "installer/uninstall.sh");
    let removed = in_checkout(&uninstall);
    let after = node.wait_for_restart("containerd", restarted);
    assert!(!loads_our_runtime(&node, after), "{removed}");
    for name in BINARIES {
        assert!(!node.path(&format!("/usr/local/bin/{name}")).exists(), "{name} left: {removed}");
    }
}
