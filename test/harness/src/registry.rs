//! A private OCI registry on loopback (Debian's `docker-registry`, installed by `test/setup.sh`).
//!
//! containerd 2.x restores a CRI checkpoint archive by *pulling* the checkpoint's base image by
//! its repo digest (`config.dump` `rootfsImageRef`), whether or not the node already holds it;
//! with no registry reachable, that restore cannot be tested. containerd talks plain HTTP to
//! loopback registries by default, so images pushed here can be pulled without TLS.

use std::net::{Ipv4Addr, SocketAddrV4, TcpListener, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::{describe_output, Error, IoContext, Result, Testbed};

/// The registry binary (Debian's `docker-registry`, unpacked by `test/setup.sh`: `KBT_REGISTRY_PREFIX`).
pub const REGISTRY_BINARY: &str = "/opt/kybernate-test/registry/usr/bin/docker-registry";
/// How long the registry may take to accept connections.
const START_TIMEOUT: Duration = Duration::from_secs(20);

/// A running registry with its storage in a scratch dir; stopped and removed on drop.
#[derive(Debug)]
pub struct Registry {
    child: Child,
    port: u16,
    dir: PathBuf,
}

impl Registry {
    /// Starts a registry on a free loopback port, storing under `dir` (created, removed on drop).
    pub fn start(dir: &Path) -> Result<Registry> {
        Self::start_with(dir, "")
    }

    /// [`Registry::start`] with `extra` appended to its YAML config, right after `http.addr`:
    /// indented lines extend `http` (`  tls: …`), unindented ones add sections (`auth: …`).
    pub fn start_with(dir: &Path, extra: &str) -> Result<Registry> {
        if !Path::new(REGISTRY_BINARY).exists() {
            return Err(Error::NotSetUp(format!(
                "{REGISTRY_BINARY} is missing (test/setup.sh unpacks Debian's docker-registry there)"
            )));
        }
        std::fs::create_dir_all(dir).ctx(|| format!("creating {}", dir.display()))?;
        // A free port: bound and released; the registry binds it a moment later.
        let port = TcpListener::bind(SocketAddrV4::new(Ipv4Addr::LOCALHOST, 0))
            .and_then(|l| l.local_addr())
            .ctx(|| "finding a free loopback port".into())?
            .port();
        let config = dir.join("config.yml");
        let yaml = format!(
            "version: 0.1\nlog:\n  level: warn\nstorage:\n  filesystem:\n    rootdirectory: {}\nhttp:\n  addr: 127.0.0.1:{port}\n{extra}",
            dir.join("data").display()
        );
        std::fs::write(&config, yaml).ctx(|| format!("writing {}", config.display()))?;
        let log = std::fs::File::create(dir.join("registry.log")).ctx(|| "creating the registry log".into())?;
        let log2 = log.try_clone().ctx(|| "duplicating the log fd".into())?;
        let mut cmd = Command::new(REGISTRY_BINARY);
        cmd.arg("serve").arg(&config).stdin(Stdio::null()).stdout(log).stderr(log2);
        // SAFETY: prctl is async-signal-safe; the registry dies with the test process.
        unsafe {
            cmd.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd.spawn().ctx(|| format!("starting {REGISTRY_BINARY}"))?;
        let mut registry = Registry { child, port, dir: dir.to_path_buf() };
        let deadline = Instant::now() + START_TIMEOUT;
        while TcpStream::connect((Ipv4Addr::LOCALHOST, port)).is_err() {
            if let Ok(Some(status)) = registry.child.try_wait() {
                let log = std::fs::read_to_string(dir.join("registry.log")).unwrap_or_default();
                return Err(Error::NotSetUp(format!("docker-registry exited with {status}: {log}")));
            }
            if Instant::now() > deadline {
                return Err(Error::NotSetUp(format!(
                    "docker-registry not listening on port {port} after {START_TIMEOUT:?}"
                )));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(registry)
    }

    /// `127.0.0.1:<port>`, the registry host part of image names.
    pub fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Pushes `image` (present in containerd namespace `namespace` of `tb`) as
    /// `<host>/<repo>:<tag>` and returns that name. The image also gets the name
    /// `<host>/<repo>@<digest>`, as a pull gives it: CRI records that repo digest as a container's
    /// image ref (else the bare image id, which containerd 2.x's restore cannot pull).
    pub fn push(&self, tb: &Testbed, namespace: &str, image: &str, repo_tag: &str) -> String {
        let name = format!("{}/{repo_tag}", self.host());
        tb.ctr_ok_in(namespace, &["images", "tag", "--force", image, &name]);
        let out = tb.ctr_in(namespace, &["images", "push", "--plain-http", &name]);
        assert!(out.status.success(), "{}", describe_output(&format!("ctr images push {name}"), &out));
        let filter = format!("name=={name}");
        let listing = tb.ctr_ok_in(namespace, &["images", "ls", &filter]);
        let digest = listing
            .lines()
            .nth(1)
            .and_then(|row| row.split_whitespace().find(|w| w.starts_with("sha256:")))
            .unwrap_or_else(|| panic!("no digest for {name} in `ctr images ls`: {listing}"));
        let repo = name.rsplit_once(':').map_or(name.as_str(), |(repo, _tag)| repo);
        tb.ctr_ok_in(namespace, &["images", "tag", "--force", &name, &format!("{repo}@{digest}")]);
        name
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
