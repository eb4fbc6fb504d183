//! Shared fixtures: a private PATH with fake runtimes, and bundles written from JSON.

#![allow(dead_code)]

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use serde_json::{json, Value};

/// A directory with executable `runc` and `nvidia-container-runtime` stand-ins
/// (never run: the selector only resolves them).
pub struct FakeRuntimes {
    pub dir: tempfile::TempDir,
}

impl FakeRuntimes {
    pub fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        for name in ["runc", "nvidia-container-runtime", "kata-runtime"] {
            let p = dir.path().join(name);
            fs::write(&p, "#!/bin/sh\nexit 99\n").unwrap();
            fs::set_permissions(&p, fs::Permissions::from_mode(0o755)).unwrap();
        }
        Self { dir }
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
}

/// A minimal valid spec: `runc spec`-like, with `env` and extra top-level fields merged in.
pub fn spec(env: &[&str], extra: Value) -> Value {
    let mut env_list = vec!["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".to_string()];
    env_list.extend(env.iter().map(|s| s.to_string()));
    let mut v = json!({
        "ociVersion": "1.0.2",
        "process": {"terminal": false, "user": {"uid": 0, "gid": 0}, "args": ["sh"], "env": env_list, "cwd": "/"},
        "root": {"path": "rootfs"},
        "mounts": [{"destination": "/proc", "type": "proc", "source": "proc"}],
        "linux": {"namespaces": [{"type": "pid"}, {"type": "mount"}]}
    });
    if let Value::Object(extra) = extra {
        for (k, val) in extra {
            v[k] = val;
        }
    }
    v
}

/// Writes `config` as `<dir>/config.json` and returns the bundle dir.
pub fn bundle(config: &Value) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    fs::write(dir.path().join("config.json"), serde_json::to_vec_pretty(config).unwrap()).unwrap();
    dir
}

pub fn write_config(dir: &Path, text: &str) -> PathBuf {
    let p = dir.join("config.toml");
    fs::write(&p, text).unwrap();
    p
}
