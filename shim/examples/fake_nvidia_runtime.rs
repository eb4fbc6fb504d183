//! A faithful stand-in for `nvidia-container-runtime`, for tests on machines without GPUs.
//!
//! Like the real one it edits the bundle's spec on `create` only (adding NVIDIA device nodes,
//! devices-cgroup rules and driver mounts, as its CDI mode does) and passes every other
//! subcommand, `checkpoint` and `restore` included, straight to runc. It also records every
//! call and can be told to fail any subcommand.
//!
//! Tests copy the binary into a directory as `nvidia-container-runtime`; everything else lives
//! beside it:
//! - `calls.log`: one line per call, its arguments joined by spaces;
//! - `edits.json`: `{"devices": [...], "rules": [...], "mounts": [...]}` in OCI spec shape,
//!   appended to `linux.devices`, `linux.resources.devices` and `mounts` on `create`;
//! - `fail`: subcommand names (one per line) to fail with exit status 1;
//! - `runc`: optional file naming the runc binary (default /usr/bin/runc).

use std::io::Write;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{exit, Command};

use serde_json::Value;

/// runc's global flags that take a value (they come before the subcommand).
const GLOBAL_WITH_VALUE: [&str; 4] = ["--root", "--log", "--log-format", "--criu"];

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let dir = std::env::current_exe().ok().and_then(|p| p.parent().map(Path::to_path_buf)).unwrap_or_default();
    if let Ok(mut log) = std::fs::OpenOptions::new().create(true).append(true).open(dir.join("calls.log")) {
        let _ = writeln!(log, "{}", args.join(" "));
    }
    let sub = subcommand(&args).unwrap_or_default();
    let failing = std::fs::read_to_string(dir.join("fail")).unwrap_or_default();
    if failing.lines().any(|l| l.trim() == sub) {
        eprintln!("fake nvidia-container-runtime: injected failure in {sub}");
        exit(1);
    }
    if sub == "create" {
        if let Err(e) = edit_spec(&dir, &bundle(&args)) {
            eprintln!("fake nvidia-container-runtime: {e}");
            exit(1);
        }
    }
    let runc =
        std::fs::read_to_string(dir.join("runc")).map(|s| s.trim().to_string()).unwrap_or("/usr/bin/runc".into());
    let e = Command::new(runc).args(&args).exec();
    eprintln!("fake nvidia-container-runtime: exec runc: {e}");
    exit(1);
}

fn subcommand(args: &[String]) -> Option<String> {
    let mut i = 0;
    while i < args.len() {
        let a = &args[i];
        if GLOBAL_WITH_VALUE.contains(&a.as_str()) {
            i += 2;
        } else if a.starts_with('-') {
            i += 1;
        } else {
            return Some(a.clone());
        }
    }
    None
}

fn bundle(args: &[String]) -> PathBuf {
    args.iter()
        .position(|a| a == "--bundle" || a == "-b")
        .and_then(|i| args.get(i + 1))
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("."))
}

fn edit_spec(dir: &Path, bundle: &Path) -> Result<(), String> {
    let Ok(edits) = std::fs::read(dir.join("edits.json")) else { return Ok(()) };
    let edits: Value = serde_json::from_slice(&edits).map_err(|e| format!("edits.json: {e}"))?;
    let path = bundle.join("config.json");
    let mut spec: Value =
        serde_json::from_slice(&std::fs::read(&path).map_err(|e| format!("{}: {e}", path.display()))?)
            .map_err(|e| format!("{}: {e}", path.display()))?;
    for (key, at) in [("devices", "/linux/devices"), ("rules", "/linux/resources/devices"), ("mounts", "/mounts")] {
        let Some(add) = edits.get(key).and_then(Value::as_array) else { continue };
        let list = array_at(&mut spec, at)?;
        list.extend(add.iter().cloned());
    }
    let text = serde_json::to_vec(&spec).map_err(|e| e.to_string())?;
    std::fs::write(&path, text).map_err(|e| format!("{}: {e}", path.display()))
}

/// The array at a JSON pointer, created (with its parents) when missing.
fn array_at<'a>(v: &'a mut Value, pointer: &str) -> Result<&'a mut Vec<Value>, String> {
    let mut cur = v;
    let parts: Vec<&str> = pointer.trim_start_matches('/').split('/').collect();
    for (i, part) in parts.iter().enumerate() {
        let last = i + 1 == parts.len();
        let obj = cur.as_object_mut().ok_or_else(|| format!("{pointer}: not an object"))?;
        cur = obj.entry(part.to_string()).or_insert_with(|| {
            if last {
                Value::Array(vec![])
            } else {
                Value::Object(Default::default())
            }
        });
    }
    cur.as_array_mut().ok_or_else(|| format!("{pointer}: not an array"))
}
