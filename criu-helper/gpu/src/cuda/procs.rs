//! Which processes of a container use CUDA.
//!
//! Every one of them has to be locked and checkpointed, not only the init process: a
//! tensor-parallel server runs one CUDA process per GPU. A process counts when it holds an
//! NVIDIA device node open (`/dev/nvidiactl`, `/dev/nvidiaN`, `/dev/nvidia-uvm`) or maps the
//! CUDA driver library; both are visible in `/proc` from the host.

use std::path::{Path, PathBuf};

use procfs::process::{FDTarget, MMapPath, Process};

/// A CUDA process of a container.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CudaProcess {
    /// Host pid (what the driver API takes when called from the host).
    pub pid: i32,
    /// Pid in the container's innermost pid namespace (what CRIU restores).
    pub ns_pid: i32,
    /// Why it counts, for the log and the manifest.
    pub evidence: String,
    /// Minors of the `/dev/nvidiaN` nodes it holds open: the GPUs it uses.
    pub gpu_minors: Vec<u32>,
}

/// Device nodes whose open fds mark a CUDA process.
const DEVICE_PREFIX: &str = "/dev/nvidia";
/// The driver library's file name (any version suffix).
const LIBCUDA_NAME: &str = "libcuda.so";

/// The CUDA processes among `pids` (host pids of one container), in the order given.
/// `proc_root` is `/proc` except in tests. Processes that exit meanwhile are skipped.
pub fn find_cuda_processes(proc_root: &Path, pids: &[i32]) -> Vec<CudaProcess> {
    pids.iter().filter_map(|&pid| inspect(&proc_root.join(pid.to_string()), pid)).collect()
}

fn inspect(dir: &Path, pid: i32) -> Option<CudaProcess> {
    let process = Process::new_with_root(dir.to_path_buf()).ok()?;
    let mut devices: Vec<PathBuf> = Vec::new();
    if let Ok(fds) = process.fd() {
        for fd in fds.flatten() {
            if let FDTarget::Path(p) = fd.target {
                if p.to_string_lossy().starts_with(DEVICE_PREFIX) && !devices.contains(&p) {
                    devices.push(p);
                }
            }
        }
    }
    let maps_libcuda = process
        .maps()
        .map(|maps| {
            maps.iter().any(|m| match &m.pathname {
                MMapPath::Path(p) => p.file_name().is_some_and(|n| n.to_string_lossy().starts_with(LIBCUDA_NAME)),
                _ => false,
            })
        })
        .unwrap_or(false);
    if devices.is_empty() && !maps_libcuda {
        return None;
    }
    devices.sort();
    let mut evidence: Vec<String> = devices.iter().map(|d| format!("{} open", d.display())).collect();
    if maps_libcuda {
        evidence.push(format!("maps {LIBCUDA_NAME}"));
    }
    let gpu_minors =
        devices.iter().filter_map(|d| d.to_str()?.strip_prefix(DEVICE_PREFIX)?.parse::<u32>().ok()).collect();
    let ns_pid = process.status().ok().and_then(|s| s.nspid).and_then(|v| v.last().copied()).unwrap_or(pid);
    Some(CudaProcess { pid, ns_pid, evidence: evidence.join(", "), gpu_minors })
}

/// Why a process's CUDA state cannot be checkpointed by the driver at all.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unsupported {
    pub pid: i32,
    pub ns_pid: i32,
    /// What shows it, e.g. "maps libnccl.so.2", "/dev/shm/nccl-Xa3Fq1 open".
    pub evidence: String,
}

/// The processes among `pids` that use NCCL, which the driver's checkpoint does not support
/// (NVIDIA/cuda-checkpoint#30): they map `libnccl.so*`, or hold NCCL's shared-memory segments
/// (`/dev/shm/nccl-*`, its intra-node transport) open or mapped. A job found here is refused
/// before anything is locked, instead of failing half-checkpointed. CUDA IPC without NCCL leaves
/// no such trace in /proc; the driver then fails the checkpoint and the rollback applies.
pub fn find_unsupported(proc_root: &Path, pids: &[i32]) -> Vec<Unsupported> {
    pids.iter().filter_map(|&pid| unsupported(&proc_root.join(pid.to_string()), pid)).collect()
}

fn unsupported(dir: &Path, pid: i32) -> Option<Unsupported> {
    let process = Process::new_with_root(dir.to_path_buf()).ok()?;
    let nccl_shm = |p: &Path| p.to_string_lossy().starts_with("/dev/shm/nccl-");
    let mut evidence: Vec<String> = Vec::new();
    if let Ok(maps) = process.maps() {
        for m in maps.iter() {
            let MMapPath::Path(p) = &m.pathname else { continue };
            let text = if p.file_name().is_some_and(|n| n.to_string_lossy().starts_with("libnccl.so")) {
                format!("maps {}", p.file_name().unwrap_or_default().to_string_lossy())
            } else if nccl_shm(p) {
                format!("maps {}", p.display())
            } else {
                continue;
            };
            if !evidence.contains(&text) {
                evidence.push(text);
            }
        }
    }
    if let Ok(fds) = process.fd() {
        for fd in fds.flatten() {
            if let FDTarget::Path(p) = fd.target {
                let text = format!("{} open", p.display());
                if nccl_shm(&p) && !evidence.contains(&text) {
                    evidence.push(text);
                }
            }
        }
    }
    if evidence.is_empty() {
        return None;
    }
    let ns_pid = process.status().ok().and_then(|s| s.nspid).and_then(|v| v.last().copied()).unwrap_or(pid);
    Some(Unsupported { pid, ns_pid, evidence: evidence.join(", ") })
}

/// The host pid of the process whose innermost namespace pid is `ns_pid`, among `pids`.
/// A restored container's processes keep their namespace pids but get new host pids.
pub fn host_pid_for(proc_root: &Path, pids: &[i32], ns_pid: i32) -> Option<i32> {
    pids.iter().copied().find(|&pid| innermost_pid(proc_root, pid) == Some(ns_pid))
}

fn innermost_pid(proc_root: &Path, pid: i32) -> Option<i32> {
    let process = Process::new_with_root(proc_root.join(pid.to_string())).ok()?;
    process.status().ok()?.nspid?.last().copied()
}

/// Resident memory of `pid` in bytes (0 when unknown): a GPU checkpoint stages device memory
/// in host memory, so the growth across it is what the GPU held.
pub fn rss_bytes(proc_root: &Path, pid: i32) -> u64 {
    Process::new_with_root(proc_root.join(pid.to_string()))
        .ok()
        .and_then(|p| p.status().ok())
        .and_then(|s| s.vmrss)
        .map(|kib| kib.saturating_mul(1024))
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;
    use std::os::unix::fs::symlink;

    /// A real status file (procfs needs all its fields) with the given NSpid and VmRSS lines.
    fn status(nspid: &str) -> String {
        let real = fs::read_to_string("/proc/self/status").unwrap();
        real.lines()
            .map(|l| match l.split(':').next() {
                Some("NSpid") => format!("NSpid:\t{nspid}"),
                Some("VmRSS") => "VmRSS:\t    2048 kB".to_string(),
                _ => l.to_string(),
            })
            .collect::<Vec<_>>()
            .join("\n")
            + "\n"
    }

    /// A fake `/proc/<pid>` with the given fd targets and mapped files.
    fn fake(root: &Path, pid: i32, status: &str, fds: &[&str], maps: &[&str]) {
        let dir = root.join(pid.to_string());
        fs::create_dir_all(dir.join("fd")).unwrap();
        fs::write(dir.join("status"), status).unwrap();
        for (i, target) in fds.iter().enumerate() {
            symlink(target, dir.join("fd").join(i.to_string())).unwrap();
        }
        let maps: Vec<String> = maps
            .iter()
            .enumerate()
            .map(|(i, p)| format!("7f{i:02x}00000000-7f{i:02x}00001000 r-xp 00000000 08:01 1234 {p}"))
            .collect();
        fs::write(dir.join("maps"), maps.join("\n") + "\n").unwrap();
    }

    #[test]
    fn device_fds_and_libcuda_maps_mark_cuda_processes() {
        let root = tempfile::tempdir().unwrap();
        let r = root.path();
        fake(
            r,
            10,
            &status("4711\t7"),
            &["/dev/null", "/dev/nvidiactl", "/dev/nvidia1", "/dev/nvidia-uvm", "/dev/nvidia1"],
            &[],
        );
        fake(r, 11, &status("11\t8"), &["/dev/null", "pipe:[1]"], &["/usr/lib/libc.so.6"]);
        fake(r, 12, &status("12\t9"), &["/dev/null"], &["/usr/lib/x86_64-linux-gnu/libcuda.so.580.65.06"]);
        let found = find_cuda_processes(r, &[10, 11, 12, 13]);
        assert_eq!(found.len(), 2, "{found:?}");
        assert_eq!(found[0].pid, 10);
        assert_eq!(found[0].ns_pid, 7);
        assert_eq!(found[0].gpu_minors, vec![1]);
        assert_eq!(found[0].evidence, "/dev/nvidia-uvm open, /dev/nvidia1 open, /dev/nvidiactl open");
        assert_eq!(found[1].pid, 12);
        assert_eq!(found[1].ns_pid, 9);
        assert_eq!(found[1].evidence, "maps libcuda.so");
        assert!(found[1].gpu_minors.is_empty());
    }

    #[test]
    fn nccl_is_found_by_its_library_or_its_shared_memory() {
        let root = tempfile::tempdir().unwrap();
        let r = root.path();
        fake(
            r,
            20,
            &status("20\t3"),
            &["/dev/nvidiactl"],
            &["/opt/lib/libnccl.so.2.21.5", "/opt/lib/libnccl.so.2.21.5"],
        );
        fake(r, 21, &status("21\t4"), &["/dev/nvidiactl", "/dev/shm/nccl-Xa3Fq1"], &[]);
        fake(r, 22, &status("22\t5"), &["/dev/nvidiactl", "/dev/shm/other"], &["/usr/lib/libcuda.so.1"]);
        let found = find_unsupported(r, &[20, 21, 22]);
        assert_eq!(
            found,
            [
                Unsupported { pid: 20, ns_pid: 3, evidence: "maps libnccl.so.2.21.5".into() },
                Unsupported { pid: 21, ns_pid: 4, evidence: "/dev/shm/nccl-Xa3Fq1 open".into() },
            ]
        );
    }

    #[test]
    fn namespace_pids_map_back_to_host_pids() {
        let root = tempfile::tempdir().unwrap();
        let r = root.path();
        fake(r, 500, &status("500\t1"), &[], &[]);
        fake(r, 501, &status("501\t7"), &[], &[]);
        assert_eq!(host_pid_for(r, &[500, 501], 7), Some(501));
        assert_eq!(host_pid_for(r, &[500, 501], 8), None);
        assert_eq!(rss_bytes(r, 500), 2048 * 1024);
        assert_eq!(rss_bytes(r, 999), 0);
    }

    #[test]
    fn the_test_process_itself_is_not_a_cuda_process() {
        let me = std::process::id() as i32;
        assert!(find_cuda_processes(Path::new("/proc"), &[me]).is_empty());
        assert_eq!(host_pid_for(Path::new("/proc"), &[me], me), Some(me));
        assert!(rss_bytes(Path::new("/proc"), me) > 0);
    }
}
