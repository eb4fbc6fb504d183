//! Task metrics for `ctr t metrics` and CRI, read straight from cgroupfs.
//!
//! containerd 1.6 decodes `StatsResponse.stats` only when its type URL is exactly
//! `io.containerd.cgroups.v1.Metrics` or `io.containerd.cgroups.v2.Metrics`, so the
//! `Any` is built by hand (`Any::pack` would add a `type.googleapis.com/` prefix),
//! and each cgroup version fills its own message type.

use std::collections::{BTreeMap, HashMap};
use std::io;
use std::path::{Path, PathBuf};

use containerd_shim::protos::cgroups::metrics as v1;
use containerd_shim::protos::cgroups_v2::metrics as v2;
use containerd_shim::protos::protobuf::well_known_types::any::Any;
use containerd_shim::protos::protobuf::{self, MessageField};
use thiserror::Error;

use crate::cgroups::{Cgroup, CgroupError};

/// Type URL containerd resolves to cgroup v1 `Metrics`.
pub const V1_METRICS_TYPE_URL: &str = "io.containerd.cgroups.v1.Metrics";
/// Type URL containerd resolves to cgroup v2 `Metrics`.
pub const V2_METRICS_TYPE_URL: &str = "io.containerd.cgroups.v2.Metrics";

/// `USER_HZ`, the unit of `cpuacct.stat`; fixed at 100 in the Linux ABI (Go's cgroups hard-codes it too).
const CLOCK_TICKS_PER_SEC: u64 = 100;

/// Why metrics could not be collected.
#[derive(Debug, Error)]
pub enum StatsError {
    #[error(transparent)]
    Cgroup(#[from] CgroupError),
    #[error("cgroup {path} does not exist (has the task exited?)")]
    Gone { path: PathBuf },
    #[error("read {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("parse {path}: {value:?} is not a number")]
    Parse { path: PathBuf, value: String },
    #[error("encode metrics: {0}")]
    Encode(#[from] protobuf::Error),
}

/// Metrics of the cgroup `pid` is in, as containerd's `StatsResponse.stats`.
pub fn collect(pid: u32) -> Result<Any, StatsError> {
    collect_cgroup(&Cgroup::for_pid(pid)?)
}

/// Metrics of an already resolved cgroup.
pub fn collect_cgroup(cgroup: &Cgroup) -> Result<Any, StatsError> {
    match cgroup {
        Cgroup::V1(dirs) => to_any(V1_METRICS_TYPE_URL, &v1_metrics(dirs)?),
        Cgroup::V2(dir) => to_any(V2_METRICS_TYPE_URL, &v2_metrics(dir)?),
    }
}

fn to_any(type_url: &str, metrics: &dyn protobuf::MessageDyn) -> Result<Any, StatsError> {
    let mut any = Any::new();
    any.type_url = type_url.to_owned();
    any.value = metrics.write_to_bytes_dyn()?;
    Ok(any)
}

/// cgroup v1 metrics from per-controller directories (`memory`, `cpu`, `cpuacct`, `pids`, `blkio`).
///
/// Missing controllers and files are skipped, as containerd's own shim does
/// (`IgnoreNotExist`); only a cgroup with none of its directories left is an error.
pub fn v1_metrics(dirs: &BTreeMap<String, PathBuf>) -> Result<v1::Metrics, StatsError> {
    let existing = |controller: &str| dirs.get(controller).filter(|d| d.is_dir());
    if !dirs.values().any(|d| d.is_dir()) {
        let path = dirs.get("memory").or_else(|| dirs.values().next()).cloned().unwrap_or_default();
        return Err(StatsError::Gone { path });
    }

    let mut metrics = v1::Metrics::new();
    if let Some(dir) = existing("pids") {
        let mut pids = v1::PidsStat::new();
        pids.current = read_u64(&dir.join("pids.current"))?.unwrap_or(0);
        // Go's v1 cgroups reports an unlimited "max" as 0.
        pids.limit = read_limit(&dir.join("pids.max"), 0)?.unwrap_or(0);
        metrics.pids = MessageField::some(pids);
    }
    if existing("cpuacct").is_some() || existing("cpu").is_some() {
        metrics.cpu = MessageField::some(v1_cpu(existing("cpuacct"), existing("cpu"))?);
    }
    if let Some(dir) = existing("memory") {
        metrics.memory = MessageField::some(v1_memory(dir)?);
        if let Some(oom) = read_flat(&dir.join("memory.oom_control"))? {
            let mut control = v1::MemoryOomControl::new();
            control.oom_kill_disable = oom.get("oom_kill_disable").copied().unwrap_or(0);
            control.under_oom = oom.get("under_oom").copied().unwrap_or(0);
            control.oom_kill = oom.get("oom_kill").copied().unwrap_or(0);
            metrics.memory_oom_control = MessageField::some(control);
        }
    }
    if let Some(dir) = existing("blkio") {
        metrics.blkio = MessageField::some(v1_blkio(dir)?);
    }
    Ok(metrics)
}

fn v1_cpu(cpuacct: Option<&PathBuf>, cpu: Option<&PathBuf>) -> Result<v1::CPUStat, StatsError> {
    let mut stat = v1::CPUStat::new();
    if let Some(dir) = cpuacct {
        let mut usage = v1::CPUUsage::new();
        usage.total = read_u64(&dir.join("cpuacct.usage"))?.unwrap_or(0);
        usage.per_cpu = read_u64_list(&dir.join("cpuacct.usage_percpu"))?.unwrap_or_default();
        // Nanoseconds where the kernel has them; else cpuacct.stat's clock ticks.
        let user = read_u64(&dir.join("cpuacct.usage_user"))?;
        let kernel = read_u64(&dir.join("cpuacct.usage_sys"))?;
        match (user, kernel) {
            (Some(user), Some(kernel)) => {
                usage.user = user;
                usage.kernel = kernel;
            }
            _ => {
                if let Some(ticks) = read_flat(&dir.join("cpuacct.stat"))? {
                    let to_ns = |t: u64| t.saturating_mul(1_000_000_000 / CLOCK_TICKS_PER_SEC);
                    usage.user = to_ns(ticks.get("user").copied().unwrap_or(0));
                    usage.kernel = to_ns(ticks.get("system").copied().unwrap_or(0));
                }
            }
        }
        stat.usage = MessageField::some(usage);
    }
    if let Some(dir) = cpu {
        if let Some(cpu_stat) = read_flat(&dir.join("cpu.stat"))? {
            let mut throttle = v1::Throttle::new();
            throttle.periods = cpu_stat.get("nr_periods").copied().unwrap_or(0);
            throttle.throttled_periods = cpu_stat.get("nr_throttled").copied().unwrap_or(0);
            throttle.throttled_time = cpu_stat.get("throttled_time").copied().unwrap_or(0);
            stat.throttling = MessageField::some(throttle);
        }
    }
    Ok(stat)
}

/// Copies `key` values of a flat-keyed file into same-typed fields; absent keys become 0.
macro_rules! copy_keys {
    ($target:expr, $source:expr, { $($field:ident : $key:literal),* $(,)? }) => {
        $( $target.$field = $source.get($key).copied().unwrap_or(0); )*
    };
}

fn v1_memory(dir: &Path) -> Result<v1::MemoryStat, StatsError> {
    let mut memory = v1::MemoryStat::new();
    if let Some(stat) = read_flat(&dir.join("memory.stat"))? {
        copy_keys!(memory, stat, {
            cache: "cache", rss: "rss", rss_huge: "rss_huge", mapped_file: "mapped_file", dirty: "dirty",
            writeback: "writeback", pg_pg_in: "pgpgin", pg_pg_out: "pgpgout", pg_fault: "pgfault",
            pg_maj_fault: "pgmajfault", inactive_anon: "inactive_anon", active_anon: "active_anon",
            inactive_file: "inactive_file", active_file: "active_file", unevictable: "unevictable",
            hierarchical_memory_limit: "hierarchical_memory_limit",
            hierarchical_swap_limit: "hierarchical_memsw_limit",
            total_cache: "total_cache", total_rss: "total_rss", total_rss_huge: "total_rss_huge",
            total_mapped_file: "total_mapped_file", total_dirty: "total_dirty", total_writeback: "total_writeback",
            total_pg_pg_in: "total_pgpgin", total_pg_pg_out: "total_pgpgout", total_pg_fault: "total_pgfault",
            total_pg_maj_fault: "total_pgmajfault", total_inactive_anon: "total_inactive_anon",
            total_active_anon: "total_active_anon", total_inactive_file: "total_inactive_file",
            total_active_file: "total_active_file", total_unevictable: "total_unevictable",
        });
    }
    // Always present (possibly zero), as Go fills them: CRI reads usage without nil checks on v1.
    memory.usage = MessageField::some(v1_memory_entry(dir, "memory")?);
    memory.swap = MessageField::some(v1_memory_entry(dir, "memory.memsw")?);
    memory.kernel = MessageField::some(v1_memory_entry(dir, "memory.kmem")?);
    memory.kernel_tcp = MessageField::some(v1_memory_entry(dir, "memory.kmem.tcp")?);
    Ok(memory)
}

fn v1_memory_entry(dir: &Path, prefix: &str) -> Result<v1::MemoryEntry, StatsError> {
    let mut entry = v1::MemoryEntry::new();
    entry.usage = read_u64(&dir.join(format!("{prefix}.usage_in_bytes")))?.unwrap_or(0);
    entry.limit = read_u64(&dir.join(format!("{prefix}.limit_in_bytes")))?.unwrap_or(0);
    entry.max = read_u64(&dir.join(format!("{prefix}.max_usage_in_bytes")))?.unwrap_or(0);
    entry.failcnt = read_u64(&dir.join(format!("{prefix}.failcnt")))?.unwrap_or(0);
    Ok(entry)
}

fn v1_blkio(dir: &Path) -> Result<v1::BlkIOStat, StatsError> {
    // The throttle files exist whatever the IO scheduler; prefer the recursive variants.
    let entries = |name: &str| -> Result<Vec<v1::BlkIOEntry>, StatsError> {
        let recursive = dir.join(format!("blkio.throttle.{name}_recursive"));
        let path = if recursive.exists() { recursive } else { dir.join(format!("blkio.throttle.{name}")) };
        Ok(read_optional(&path)?.map(|content| parse_blkio(&content)).unwrap_or_default())
    };
    let mut blkio = v1::BlkIOStat::new();
    blkio.io_service_bytes_recursive = entries("io_service_bytes")?;
    blkio.io_serviced_recursive = entries("io_serviced")?;
    Ok(blkio)
}

/// Parses v1 blkio lines `MAJ:MIN Op value`; the `Total` line is skipped.
pub fn parse_blkio(content: &str) -> Vec<v1::BlkIOEntry> {
    content
        .lines()
        .filter_map(|line| {
            let mut fields = line.split_whitespace();
            let (major, minor) = fields.next()?.split_once(':')?;
            let op = fields.next()?;
            let value = fields.next()?.parse().ok()?;
            let mut entry = v1::BlkIOEntry::new();
            entry.major = major.parse().ok()?;
            entry.minor = minor.parse().ok()?;
            entry.op = op.to_owned();
            entry.value = value;
            Some(entry)
        })
        .collect()
}

/// cgroup v2 metrics from a unified cgroup directory.
///
/// A controller that is not enabled for the cgroup has no interface files there (a v2 host
/// without the memory controller has no `memory.current`, `memory.events` or `memory.stat`):
/// its part of the metrics is left out rather than reported as zeros or as an error, so
/// CRI and `ctr` see "not measured", not "uses nothing". `cpu.stat` (usage, user, system) is a
/// core file of every non-root cgroup and so is always there; the PSI files (`*.pressure`)
/// exist whenever the kernel has PSI. Files inside an enabled controller that an older kernel
/// lacks (`memory.peak`, `memory.swap.*`) read as 0. Only a vanished directory is an error.
pub fn v2_metrics(dir: &Path) -> Result<v2::Metrics, StatsError> {
    if !dir.is_dir() {
        return Err(StatsError::Gone { path: dir.to_owned() });
    }
    let mut metrics = v2::Metrics::new();

    if let Some(current) = read_u64(&dir.join("pids.current"))? {
        let mut pids = v2::PidsStat::new();
        pids.current = current;
        // Go's v2 cgroups reports an unlimited "max" as u64::MAX (unlike v1).
        pids.limit = read_limit(&dir.join("pids.max"), u64::MAX)?.unwrap_or(0);
        metrics.pids = MessageField::some(pids);
    }

    let mut cpu = v2::CPUStat::new();
    if let Some(stat) = read_flat(&dir.join("cpu.stat"))? {
        // usage/user/system_usec always; the nr_*/throttled/burst keys only with the cpu controller.
        copy_keys!(cpu, stat, {
            usage_usec: "usage_usec", user_usec: "user_usec", system_usec: "system_usec",
            nr_periods: "nr_periods", nr_throttled: "nr_throttled", throttled_usec: "throttled_usec",
            nr_bursts: "nr_bursts", burst_usec: "burst_usec",
        });
    }
    cpu.psi = read_psi(&dir.join("cpu.pressure"))?.into();
    metrics.cpu = MessageField::some(cpu);

    let usage = read_u64(&dir.join("memory.current"))?;
    let stat = read_flat(&dir.join("memory.stat"))?;
    if usage.is_some() || stat.is_some() {
        let mut memory = v2::MemoryStat::new();
        if let Some(mut stat) = stat {
            // Since Linux 5.9 these are split into _anon and _file.
            for key in ["workingset_refault", "workingset_activate"] {
                if !stat.contains_key(key) {
                    let split = ["anon", "file"].iter().filter_map(|kind| stat.get(&format!("{key}_{kind}"))).sum();
                    stat.insert(key.to_owned(), split);
                }
            }
            copy_keys!(memory, stat, {
                anon: "anon", file: "file", kernel_stack: "kernel_stack", slab: "slab", sock: "sock", shmem: "shmem",
                file_mapped: "file_mapped", file_dirty: "file_dirty", file_writeback: "file_writeback",
                anon_thp: "anon_thp", inactive_anon: "inactive_anon", active_anon: "active_anon",
                inactive_file: "inactive_file", active_file: "active_file", unevictable: "unevictable",
                slab_reclaimable: "slab_reclaimable", slab_unreclaimable: "slab_unreclaimable", pgfault: "pgfault",
                pgmajfault: "pgmajfault", workingset_refault: "workingset_refault",
                workingset_activate: "workingset_activate", workingset_nodereclaim: "workingset_nodereclaim",
                pgrefill: "pgrefill", pgscan: "pgscan", pgsteal: "pgsteal", pgactivate: "pgactivate",
                pgdeactivate: "pgdeactivate", pglazyfree: "pglazyfree", pglazyfreed: "pglazyfreed",
                thp_fault_alloc: "thp_fault_alloc", thp_collapse_alloc: "thp_collapse_alloc",
            });
        }
        memory.usage = usage.unwrap_or(0);
        memory.usage_limit = read_limit(&dir.join("memory.max"), u64::MAX)?.unwrap_or(0);
        memory.max_usage = read_u64(&dir.join("memory.peak"))?.unwrap_or(0);
        memory.swap_usage = read_u64(&dir.join("memory.swap.current"))?.unwrap_or(0);
        memory.swap_limit = read_limit(&dir.join("memory.swap.max"), u64::MAX)?.unwrap_or(0);
        memory.swap_max_usage = read_u64(&dir.join("memory.swap.peak"))?.unwrap_or(0);
        memory.psi = read_psi(&dir.join("memory.pressure"))?.into();
        metrics.memory = MessageField::some(memory);
    }

    if let Some(stat) = read_flat(&dir.join("memory.events"))? {
        let mut events = v2::MemoryEvents::new();
        copy_keys!(events, stat, {
            low: "low", high: "high", max: "max", oom: "oom", oom_kill: "oom_kill", oom_group_kill: "oom_group_kill",
        });
        metrics.memory_events = MessageField::some(events);
    }

    let io_usage = read_optional(&dir.join("io.stat"))?.map(|content| parse_io_stat(&content));
    let io_psi = read_psi(&dir.join("io.pressure"))?;
    if io_usage.is_some() || io_psi.is_some() {
        let mut io_stat = v2::IOStat::new();
        io_stat.usage = io_usage.unwrap_or_default();
        io_stat.psi = io_psi.into();
        metrics.io = MessageField::some(io_stat);
    }

    metrics.hugetlb = v2_hugetlb(dir)?;
    Ok(metrics)
}

/// One entry per huge page size the cgroup has `hugetlb.<size>.current` for (`2MB`, `1GB`, the
/// kernel's names), ordered by name as Go's cgroups lists them; an unlimited `max` is u64::MAX.
/// `failcnt` is the `max` count of `hugetlb.<size>.events` (allocations refused by the limit).
fn v2_hugetlb(dir: &Path) -> Result<Vec<v2::HugeTlbStat>, StatsError> {
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == io::ErrorKind::NotFound || e.raw_os_error() == Some(libc::ENODEV) => {
            return Ok(Vec::new())
        }
        Err(source) => return Err(StatsError::Read { path: dir.to_owned(), source }),
    };
    let mut sizes: Vec<String> = entries
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().into_string().ok()?;
            let size = name.strip_prefix("hugetlb.")?.strip_suffix(".current")?;
            // `hugetlb.2MB.rsvd.current` is the reservation counter, not a page size of its own.
            (!size.contains('.')).then(|| size.to_owned())
        })
        .collect();
    sizes.sort();
    let mut out = Vec::with_capacity(sizes.len());
    for size in sizes {
        let Some(current) = read_u64(&dir.join(format!("hugetlb.{size}.current")))? else { continue };
        let mut stat = v2::HugeTlbStat::new();
        stat.current = current;
        stat.max = read_limit(&dir.join(format!("hugetlb.{size}.max")), u64::MAX)?.unwrap_or(0);
        stat.failcnt = read_flat(&dir.join(format!("hugetlb.{size}.events")))?
            .and_then(|events| events.get("max").copied())
            .unwrap_or(0);
        stat.pagesize = size;
        out.push(stat);
    }
    Ok(out)
}

/// Parses v2 `io.stat` lines `MAJ:MIN rbytes=.. wbytes=.. rios=.. wios=.. ...`.
pub fn parse_io_stat(content: &str) -> Vec<v2::IOEntry> {
    content
        .lines()
        .filter_map(|line| {
            let mut fields = line.split_whitespace();
            let (major, minor) = fields.next()?.split_once(':')?;
            let mut entry = v2::IOEntry::new();
            entry.major = major.parse().ok()?;
            entry.minor = minor.parse().ok()?;
            for (key, value) in fields.filter_map(|f| f.split_once('=')) {
                let value = value.parse().unwrap_or(0);
                match key {
                    "rbytes" => entry.rbytes = value,
                    "wbytes" => entry.wbytes = value,
                    "rios" => entry.rios = value,
                    "wios" => entry.wios = value,
                    _ => {}
                }
            }
            Some(entry)
        })
        .collect()
}

/// Parses a PSI file (`some avg10=0.00 avg60=0.00 avg300=0.00 total=0`, then `full ...`).
pub fn parse_psi(content: &str) -> v2::PSIStats {
    let mut stats = v2::PSIStats::new();
    for line in content.lines() {
        let mut fields = line.split_whitespace();
        let kind = fields.next();
        let mut data = v2::PSIData::new();
        for (key, value) in fields.filter_map(|f| f.split_once('=')) {
            match key {
                "avg10" => data.avg10 = value.parse().unwrap_or(0.0),
                "avg60" => data.avg60 = value.parse().unwrap_or(0.0),
                "avg300" => data.avg300 = value.parse().unwrap_or(0.0),
                "total" => data.total = value.parse().unwrap_or(0),
                _ => {}
            }
        }
        match kind {
            Some("some") => stats.some = MessageField::some(data),
            Some("full") => stats.full = MessageField::some(data),
            _ => {}
        }
    }
    stats
}

/// Parses a flat-keyed file (`key value` per line); lines that don't fit are skipped.
pub fn parse_flat(content: &str) -> HashMap<String, u64> {
    content
        .lines()
        .filter_map(|line| {
            let mut fields = line.split_whitespace();
            let key = fields.next()?;
            let value = fields.next()?.parse().ok()?;
            Some((key.to_owned(), value))
        })
        .collect()
}

/// File contents, or `None` when the file (or its cgroup) does not exist.
fn read_optional(path: &Path) -> Result<Option<String>, StatsError> {
    match std::fs::read_to_string(path) {
        Ok(content) => Ok(Some(content)),
        // ENODEV: the cgroup was removed while we read it.
        Err(e) if e.kind() == io::ErrorKind::NotFound || e.raw_os_error() == Some(libc::ENODEV) => Ok(None),
        Err(source) => Err(StatsError::Read { path: path.to_owned(), source }),
    }
}

fn read_u64(path: &Path) -> Result<Option<u64>, StatsError> {
    read_number(path, None)
}

/// A single-number file where `max` means "unlimited", reported as `unlimited`.
fn read_limit(path: &Path, unlimited: u64) -> Result<Option<u64>, StatsError> {
    read_number(path, Some(unlimited))
}

fn read_number(path: &Path, unlimited: Option<u64>) -> Result<Option<u64>, StatsError> {
    let Some(content) = read_optional(path)? else {
        return Ok(None);
    };
    let value = content.trim();
    match (value, unlimited) {
        ("max", Some(unlimited)) => Ok(Some(unlimited)),
        _ => value.parse().map(Some).map_err(|_| StatsError::Parse { path: path.to_owned(), value: value.to_owned() }),
    }
}

fn read_u64_list(path: &Path) -> Result<Option<Vec<u64>>, StatsError> {
    let Some(content) = read_optional(path)? else {
        return Ok(None);
    };
    content
        .split_whitespace()
        .map(|v| v.parse().map_err(|_| StatsError::Parse { path: path.to_owned(), value: v.to_owned() }))
        .collect::<Result<Vec<_>, _>>()
        .map(Some)
}

fn read_flat(path: &Path) -> Result<Option<HashMap<String, u64>>, StatsError> {
    Ok(read_optional(path)?.map(|content| parse_flat(&content)))
}

fn read_psi(path: &Path) -> Result<Option<v2::PSIStats>, StatsError> {
    Ok(read_optional(path)?.map(|content| parse_psi(&content)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use containerd_shim::protos::protobuf::{Message, MessageFull};

    fn write(dir: &Path, files: &[(&str, &str)]) {
        std::fs::create_dir_all(dir).unwrap();
        for (name, content) in files {
            std::fs::write(dir.join(name), content).unwrap();
        }
    }

    /// A fake v1 hierarchy laid out like /sys/fs/cgroup/<controller>/<path>.
    fn fake_v1(root: &Path) -> BTreeMap<String, PathBuf> {
        let dirs: BTreeMap<String, PathBuf> = ["memory", "cpu", "cpuacct", "pids", "blkio"]
            .iter()
            .map(|c| (c.to_string(), root.join(c).join("kyb/c1")))
            .collect();
        write(&dirs["pids"], &[("pids.current", "7\n"), ("pids.max", "max\n")]);
        write(
            &dirs["cpuacct"],
            &[
                ("cpuacct.usage", "5000000000\n"),
                ("cpuacct.usage_percpu", "3000000000 2000000000 \n"),
                ("cpuacct.usage_user", "4000000000\n"),
                ("cpuacct.usage_sys", "1000000000\n"),
                ("cpuacct.stat", "user 1\nsystem 2\n"),
            ],
        );
        write(&dirs["cpu"], &[("cpu.stat", "nr_periods 10\nnr_throttled 3\nthrottled_time 4500\nnr_bursts 0\n")]);
        write(
            &dirs["memory"],
            &[
                ("memory.usage_in_bytes", "10485760\n"),
                ("memory.limit_in_bytes", "16777216\n"),
                ("memory.max_usage_in_bytes", "12582912\n"),
                ("memory.failcnt", "2\n"),
                ("memory.memsw.usage_in_bytes", "11000000\n"),
                ("memory.kmem.usage_in_bytes", "65536\n"),
                (
                    "memory.stat",
                    "cache 4096\nrss 8192\nmapped_file 1024\npgfault 77\npgmajfault 1\ninactive_file 2048\n\
                     hierarchical_memory_limit 16777216\nhierarchical_memsw_limit 33554432\ntotal_cache 40960\n\
                     total_rss 81920\ntotal_inactive_file 20480\ntotal_pgfault 770\nworkingset_refault_file 3\n",
                ),
                ("memory.oom_control", "oom_kill_disable 0\nunder_oom 0\noom_kill 3\n"),
            ],
        );
        write(
            &dirs["blkio"],
            &[
                ("blkio.throttle.io_service_bytes_recursive", "8:0 Read 4096\n8:0 Write 8192\nTotal 12288\n"),
                ("blkio.throttle.io_serviced", "8:0 Read 99\nTotal 99\n"),
                ("blkio.throttle.io_serviced_recursive", "8:0 Read 1\n8:16 Write 2\nTotal 3\n"),
            ],
        );
        dirs
    }

    #[test]
    fn v1_fake_tree_round_trips_through_any() {
        let tmp = tempfile::tempdir().unwrap();
        let dirs = fake_v1(tmp.path());
        let any = collect_cgroup(&Cgroup::V1(dirs)).unwrap();
        assert_eq!(any.type_url, "io.containerd.cgroups.v1.Metrics");
        let m = v1::Metrics::parse_from_bytes(&any.value).unwrap();

        assert_eq!((m.pids.current, m.pids.limit), (7, 0));
        let usage = &m.cpu.usage;
        assert_eq!((usage.total, usage.user, usage.kernel), (5_000_000_000, 4_000_000_000, 1_000_000_000));
        assert_eq!(usage.per_cpu, vec![3_000_000_000, 2_000_000_000]);
        let throttling = &m.cpu.throttling;
        assert_eq!((throttling.periods, throttling.throttled_periods, throttling.throttled_time), (10, 3, 4500));

        let mem = &m.memory;
        assert_eq!(
            (mem.usage.usage, mem.usage.limit, mem.usage.max, mem.usage.failcnt),
            (10485760, 16777216, 12582912, 2)
        );
        assert_eq!(mem.swap.usage, 11_000_000);
        assert_eq!(mem.kernel.usage, 65536);
        assert_eq!(mem.kernel_tcp.usage, 0, "missing files read as 0");
        assert_eq!((mem.cache, mem.rss, mem.mapped_file, mem.pg_fault, mem.pg_maj_fault), (4096, 8192, 1024, 77, 1));
        assert_eq!((mem.hierarchical_memory_limit, mem.hierarchical_swap_limit), (16777216, 33554432));
        assert_eq!(
            (mem.total_cache, mem.total_rss, mem.total_inactive_file, mem.total_pg_fault),
            (40960, 81920, 20480, 770)
        );
        assert_eq!(m.memory_oom_control.oom_kill, 3);

        let bytes = &m.blkio.io_service_bytes_recursive;
        assert_eq!(bytes.len(), 2);
        assert_eq!((bytes[1].major, bytes[1].minor, bytes[1].op.as_str(), bytes[1].value), (8, 0, "Write", 8192));
        let serviced = &m.blkio.io_serviced_recursive;
        assert_eq!(serviced.iter().map(|e| e.value).collect::<Vec<_>>(), vec![1, 2], "recursive file preferred");
    }

    #[test]
    fn v1_cpu_falls_back_to_clock_ticks() {
        let tmp = tempfile::tempdir().unwrap();
        let dirs = fake_v1(tmp.path());
        std::fs::remove_file(dirs["cpuacct"].join("cpuacct.usage_user")).unwrap();
        let m = v1_metrics(&dirs).unwrap();
        assert_eq!((m.cpu.usage.user, m.cpu.usage.kernel), (10_000_000, 20_000_000));
    }

    #[test]
    fn v1_missing_controllers_are_skipped_but_a_vanished_cgroup_is_an_error() {
        let tmp = tempfile::tempdir().unwrap();
        let mut dirs = fake_v1(tmp.path());
        dirs.insert("pids".into(), tmp.path().join("pids/nonexistent"));
        let m = v1_metrics(&dirs).unwrap();
        assert!(m.pids.is_none());
        assert_eq!(m.memory.usage.usage, 10485760);

        std::fs::remove_dir_all(tmp.path()).unwrap();
        let err = v1_metrics(&dirs).unwrap_err();
        assert!(matches!(err, StatsError::Gone { .. }), "{err}");
    }

    #[test]
    fn garbage_in_a_single_value_file_is_a_parse_error() {
        let tmp = tempfile::tempdir().unwrap();
        let dirs = fake_v1(tmp.path());
        std::fs::write(dirs["memory"].join("memory.usage_in_bytes"), "lots\n").unwrap();
        let err = v1_metrics(&dirs).unwrap_err();
        assert!(matches!(&err, StatsError::Parse { value, .. } if value == "lots"), "{err}");
    }

    fn fake_v2(dir: &Path) {
        write(
            dir,
            &[
                ("pids.current", "3\n"),
                ("pids.max", "max\n"),
                (
                    "cpu.stat",
                    "usage_usec 2500\nuser_usec 2000\nsystem_usec 500\nnr_periods 40\nnr_throttled 4\n\
                     throttled_usec 900\nnr_bursts 1\nburst_usec 5\n",
                ),
                ("cpu.pressure", "some avg10=1.50 avg60=0.25 avg300=0.00 total=12345\nfull avg10=0.00 avg60=0.00 avg300=0.00 total=6\n"),
                ("memory.current", "8388608\n"),
                ("memory.max", "16777216\n"),
                ("memory.peak", "9000000\n"),
                ("memory.swap.current", "0\n"),
                ("memory.swap.max", "max\n"),
                (
                    "memory.stat",
                    "anon 4096\nfile 8192\nkernel_stack 16384\nshmem 0\ninactive_file 1024\npgfault 55\n\
                     workingset_refault_anon 2\nworkingset_refault_file 5\n",
                ),
                ("memory.events", "low 0\nhigh 1\nmax 9\noom 2\noom_kill 1\noom_group_kill 0\n"),
                ("io.stat", "8:16 rbytes=1024 wbytes=2048 rios=3 wios=4 dbytes=0 dios=0\n"),
            ],
        );
    }

    #[test]
    fn v2_fake_tree_round_trips_through_any() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("kubepods/c1");
        fake_v2(&dir);
        let any = collect_cgroup(&Cgroup::V2(dir)).unwrap();
        assert_eq!(any.type_url, "io.containerd.cgroups.v2.Metrics");
        let m = v2::Metrics::parse_from_bytes(&any.value).unwrap();

        assert_eq!((m.pids.current, m.pids.limit), (3, u64::MAX));
        let cpu = &m.cpu;
        assert_eq!((cpu.usage_usec, cpu.user_usec, cpu.system_usec), (2500, 2000, 500));
        assert_eq!(
            (cpu.nr_periods, cpu.nr_throttled, cpu.throttled_usec, cpu.nr_bursts, cpu.burst_usec),
            (40, 4, 900, 1, 5)
        );
        assert_eq!((cpu.psi.some.avg10, cpu.psi.some.total, cpu.psi.full.total), (1.5, 12345, 6));

        let mem = &m.memory;
        assert_eq!((mem.usage, mem.usage_limit, mem.max_usage), (8388608, 16777216, 9000000));
        assert_eq!((mem.swap_usage, mem.swap_limit), (0, u64::MAX));
        assert_eq!(
            (mem.anon, mem.file, mem.kernel_stack, mem.inactive_file, mem.pgfault),
            (4096, 8192, 16384, 1024, 55)
        );
        assert_eq!(mem.workingset_refault, 7, "split _anon/_file counters are summed");
        assert!(mem.psi.is_none());

        let events = &m.memory_events;
        assert_eq!((events.high, events.max, events.oom, events.oom_kill), (1, 9, 2, 1));
        let io = &m.io.usage;
        assert_eq!(io.len(), 1);
        assert_eq!(
            (io[0].major, io[0].minor, io[0].rbytes, io[0].wbytes, io[0].rios, io[0].wios),
            (8, 16, 1024, 2048, 3, 4)
        );
    }

    /// The files of a container's cgroup on a v2 hierarchy whose only controller is hugetlb, as
    /// on the test machines (every other controller bound to v1): the core files (cpu.stat's
    /// four usage keys on 6.x, PSI, cgroup.*) and hugetlb's, but no memory, pids or io file.
    /// Formats as Documentation/admin-guide/cgroup-v2.rst gives them; names as listed by the
    /// 6.18 kernel for a cgroup made there.
    fn fake_v2_hugetlb_only(dir: &Path) {
        let psi = "some avg10=0.00 avg60=0.00 avg300=0.00 total=0\nfull avg10=0.00 avg60=0.00 avg300=0.00 total=0\n";
        write(
            dir,
            &[
                ("cgroup.controllers", "hugetlb\n"),
                ("cgroup.events", "populated 1\nfrozen 0\n"),
                ("cgroup.freeze", "0\n"),
                ("cgroup.type", "domain\n"),
                ("cgroup.procs", "4242\n"),
                ("cpu.stat", "usage_usec 1830\nuser_usec 1200\nsystem_usec 630\nnice_usec 0\n"),
                ("cpu.stat.local", "throttled_usec 0\n"),
                ("cpu.pressure", psi),
                ("memory.pressure", psi),
                ("io.pressure", psi),
                ("hugetlb.2MB.current", "4194304\n"),
                ("hugetlb.2MB.max", "max\n"),
                ("hugetlb.2MB.events", "max 3\n"),
                ("hugetlb.2MB.events.local", "max 3\n"),
                ("hugetlb.2MB.rsvd.current", "0\n"),
                ("hugetlb.2MB.rsvd.max", "max\n"),
                ("hugetlb.2MB.numa_stat", "total=4194304 N0=4194304\n"),
                ("hugetlb.1GB.current", "0\n"),
                ("hugetlb.1GB.max", "1073741824\n"),
                ("hugetlb.1GB.events", "max 0\n"),
                ("hugetlb.1GB.rsvd.current", "0\n"),
                ("hugetlb.1GB.rsvd.max", "max\n"),
            ],
        );
    }

    #[test]
    fn v2_without_the_memory_pids_and_io_controllers_reports_what_exists() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("default/c1");
        fake_v2_hugetlb_only(&dir);
        let any = collect_cgroup(&Cgroup::V2(dir)).unwrap();
        let m = v2::Metrics::parse_from_bytes(&any.value).unwrap();

        assert_eq!((m.cpu.usage_usec, m.cpu.user_usec, m.cpu.system_usec), (1830, 1200, 630));
        assert_eq!((m.cpu.nr_periods, m.cpu.nr_throttled), (0, 0), "no cpu controller: no throttling keys");
        assert!(m.cpu.psi.some.is_some());
        assert!(m.pids.is_none(), "no pids controller: no pids stats, not zeros: {:?}", m.pids);
        assert!(m.memory.is_none(), "no memory controller: no memory stats, not zeros: {:?}", m.memory);
        assert!(m.memory_events.is_none());
        assert!(m.io.usage.is_empty(), "no io controller: no io.stat");
        assert!(m.io.psi.some.is_some(), "io pressure is a core file and is reported");

        let sizes: Vec<(&str, u64, u64, u64)> =
            m.hugetlb.iter().map(|h| (h.pagesize.as_str(), h.current, h.max, h.failcnt)).collect();
        assert_eq!(sizes, vec![("1GB", 0, 1 << 30, 0), ("2MB", 4 << 20, u64::MAX, 3)]);
    }

    #[test]
    fn v2_a_controller_disabled_midway_is_left_out_not_an_error() {
        // The memory controller enabled, pids not: memory is reported in full, pids is absent.
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("c1");
        fake_v2(&dir);
        std::fs::remove_file(dir.join("pids.current")).unwrap();
        std::fs::remove_file(dir.join("pids.max")).unwrap();
        std::fs::remove_file(dir.join("io.stat")).unwrap();
        let m = v2_metrics(&dir).unwrap();
        assert!(m.pids.is_none());
        assert!(m.io.is_none(), "neither io.stat nor io.pressure: no io stats");
        assert_eq!(m.memory.usage, 8388608);
        assert!(m.hugetlb.is_empty());
    }

    #[test]
    fn v2_missing_dir_is_gone() {
        let tmp = tempfile::tempdir().unwrap();
        let err = collect_cgroup(&Cgroup::V2(tmp.path().join("nope"))).unwrap_err();
        assert!(matches!(err, StatsError::Gone { .. }), "{err}");
    }

    #[test]
    fn type_urls_match_the_message_full_names() {
        assert_eq!(v1::Metrics::descriptor().full_name(), V1_METRICS_TYPE_URL);
        assert_eq!(v2::Metrics::descriptor().full_name(), V2_METRICS_TYPE_URL);
    }

    #[test]
    fn parsers_tolerate_odd_lines() {
        assert_eq!(parse_flat("a 1\nb\nc x\n d 4 \n"), HashMap::from([("a".to_owned(), 1), ("d".to_owned(), 4)]));
        assert!(parse_blkio("Total 5\nbogus\n8:0 Read\n").is_empty());
        assert!(parse_io_stat("\nnot-a-device rbytes=1\n").is_empty());
        assert!(parse_psi("").some.is_none());
    }

    #[test]
    fn real_collect_on_this_host() {
        let pid = std::process::id();
        let cgroup = Cgroup::for_pid(pid).unwrap();
        let any = collect(pid).unwrap();
        match cgroup {
            Cgroup::V1(_) => {
                assert_eq!(any.type_url, V1_METRICS_TYPE_URL);
                let m = v1::Metrics::parse_from_bytes(&any.value).unwrap();
                assert!(m.memory.usage.usage > 0, "{m:?}");
                assert!(m.memory.usage.limit > 0, "{m:?}");
                assert!(m.cpu.usage.total > 0, "{m:?}");
                assert!(!m.cpu.usage.per_cpu.is_empty(), "{m:?}");
            }
            Cgroup::V2(_) => {
                assert_eq!(any.type_url, V2_METRICS_TYPE_URL);
                let m = v2::Metrics::parse_from_bytes(&any.value).unwrap();
                assert!(m.cpu.usage_usec > 0, "{m:?}");
            }
        }
    }
}
