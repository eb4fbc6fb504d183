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
//!   appended to `linux.devices`, `linux.resources.devices` and `mounts` on `create` (CDI mode);
//!   and `"hook_mounts": [{"source", "destination"}]`: bind mounts made by a prestart hook
//!   (this binary, called as `nvidia-container-runtime-hook prestart`) inside the container's
//!   mount namespace, never in the spec — as the legacy mode's nvidia-container-cli does;
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
    if args.first().map(String::as_str) == Some("prestart") {
        if let Err(e) = prestart_hook(&dir) {
            eprintln!("fake nvidia-container-runtime-hook: {e}");
            exit(1);
        }
        return;
    }
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
    if edits.get("hook_mounts").and_then(Value::as_array).is_some_and(|m| !m.is_empty()) {
        let me = dir.join("nvidia-container-runtime");
        let hook = serde_json::json!({"path": me, "args": ["nvidia-container-runtime-hook", "prestart"]});
        array_at(&mut spec, "/hooks/prestart")?.push(hook);
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

/// The legacy-mode hook: runc calls it after the container's mounts are set up and before
/// pivot_root, with the container state (pid, bundle) on stdin. It bind-mounts each hook mount
/// read-only under the container's rootfs, inside the container's mount namespace.
fn prestart_hook(dir: &Path) -> Result<(), String> {
    let state: Value = serde_json::from_reader(std::io::stdin()).map_err(|e| format!("state on stdin: {e}"))?;
    let pid = state["pid"].as_i64().ok_or("state has no pid")?;
    let bundle = PathBuf::from(state["bundle"].as_str().ok_or("state has no bundle")?);
    let edits: Value = serde_json::from_slice(&std::fs::read(dir.join("edits.json")).map_err(|e| e.to_string())?)
        .map_err(|e| e.to_string())?;
    let spec: Value = serde_json::from_slice(&std::fs::read(bundle.join("config.json")).map_err(|e| e.to_string())?)
        .map_err(|e| e.to_string())?;
    let root = spec["root"]["path"].as_str().unwrap_or("rootfs");
    let rootfs = bundle.join(root);
    let ns =
        std::fs::File::open(format!("/proc/{pid}/ns/mnt")).map_err(|e| format!("mount namespace of {pid}: {e}"))?;
    // SAFETY: setns on an fd we own; this process is single-threaded.
    if unsafe { libc::setns(std::os::fd::AsRawFd::as_raw_fd(&ns), libc::CLONE_NEWNS) } != 0 {
        return Err(format!("setns: {}", std::io::Error::last_os_error()));
    }
    for m in edits["hook_mounts"].as_array().into_iter().flatten() {
        let (Some(source), Some(dest)) = (m["source"].as_str(), m["destination"].as_str()) else { continue };
        let target = rootfs.join(dest.trim_start_matches('/'));
        if let Some(parent) = target.parent() {
            std::fs::create_dir_all(parent).map_err(|e| format!("{}: {e}", parent.display()))?;
        }
        std::fs::write(&target, b"").map_err(|e| format!("{}: {e}", target.display()))?;
        bind(source, &target, 0)?;
        bind(source, &target, libc::MS_REMOUNT | libc::MS_RDONLY)?;
    }
    Ok(())
}

fn bind(source: &str, target: &Path, extra: libc::c_ulong) -> Result<(), String> {
    use std::ffi::CString;
    use std::os::unix::ffi::OsStrExt;
    let src = CString::new(source).map_err(|e| e.to_string())?;
    let dst = CString::new(target.as_os_str().as_bytes()).map_err(|e| e.to_string())?;
    // SAFETY: valid NUL-terminated paths; no filesystem type or data for a bind mount.
    let rc =
        unsafe { libc::mount(src.as_ptr(), dst.as_ptr(), std::ptr::null(), libc::MS_BIND | extra, std::ptr::null()) };
    if rc != 0 {
        return Err(format!("mount --bind {source} {}: {}", target.display(), std::io::Error::last_os_error()));
    }
    Ok(())
}
