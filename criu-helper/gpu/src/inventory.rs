//! The node's NVIDIA driver and GPUs, read from the driver's procfs files
//! (`/proc/driver/nvidia/version` and `/proc/driver/nvidia/gpus/<bus>/information`), and the
//! check that a checkpoint is restored onto the same GPU models and count: the CUDA state in an
//! image only fits the kind of GPU it was taken on.
//!
//! Procfs rather than NVML or `nvidia-smi`: it needs no library or binary on the node, works in
//! the shim's minimal environment, and a fake tree is enough to test it. Everything here tolerates
//! missing or malformed files: a node without the driver simply has no GPUs.

use std::io::Read;
use std::path::Path;

use super::GpuInfo;

/// Procfs files are small; anything bigger than this is not the driver's and is not read whole.
const MAX_PROC_FILE: u64 = 1 << 20;

/// The node's NVIDIA driver and GPUs, from `<proc_root>/driver/nvidia/`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NodeGpus {
    /// Kernel module version, e.g. "580.65.06"; `None` without the driver.
    pub driver_version: Option<String>,
    /// One entry per GPU the driver serves, sorted by PCI bus location; `index` is the position.
    pub gpus: Vec<GpuInfo>,
}

/// Reads the driver version and the GPUs under `<proc_root>/driver/nvidia/` (`proc_root` is
/// `/proc` in production). A missing driver directory gives no GPUs and no version.
///
/// Every `gpus/<bus>` directory counts as a GPU, even when its `information` file cannot be read
/// or parsed (its fields are then left empty and `bus_id` is the directory name): the count
/// matters for the compatibility check, and an unparseable entry is still a GPU.
pub fn node_gpus(proc_root: &Path) -> NodeGpus {
    let base = proc_root.join("driver").join("nvidia");
    let driver_version = read_capped(&base.join("version")).and_then(|t| parse_driver_version(&t));

    let mut gpus = Vec::new();
    let gpus_dir = base.join("gpus");
    match std::fs::read_dir(&gpus_dir) {
        Ok(entries) => {
            for entry in entries.flatten() {
                let is_dir = entry.file_type().map(|t| t.is_dir()).unwrap_or(false);
                if !is_dir {
                    continue;
                }
                let dir_name = entry.file_name().to_string_lossy().into_owned();
                let info_path = entry.path().join("information");
                let gpu = match read_capped(&info_path) {
                    Some(text) => {
                        let gpu = parse_gpu_information(&text, &dir_name);
                        if gpu.model.is_empty() {
                            log::warn!("{}: no \"Model:\" line; GPU model unknown", info_path.display());
                        }
                        gpu
                    }
                    None => {
                        log::warn!("{}: unreadable; GPU model unknown", info_path.display());
                        GpuInfo { bus_id: dir_name, ..GpuInfo::default() }
                    }
                };
                gpus.push(gpu);
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => log::warn!("{}: {e}; no GPUs listed", gpus_dir.display()),
    }

    gpus.sort_by_key(|g| bus_sort_key(&g.bus_id));
    for (i, gpu) in gpus.iter_mut().enumerate() {
        gpu.index = u32::try_from(i).unwrap_or(u32::MAX);
    }
    NodeGpus { driver_version, gpus }
}

/// The kernel module version from the text of `/proc/driver/nvidia/version`.
///
/// Its first line is `NVRM version: <id>` where the id is e.g.
/// `NVIDIA UNIX x86_64 Kernel Module  580.65.06  Sun Jul 27 07:09:52 UTC 2025` (proprietary) or
/// `NVIDIA UNIX Open Kernel Module for x86_64  580.65.06  Release Build  (…)  <date>` (open).
/// The version is the first word made of dot-separated numbers (at least two of them).
pub fn parse_driver_version(text: &str) -> Option<String> {
    let line = text.lines().find(|l| l.trim_start().starts_with("NVRM version:"))?;
    let (_, rest) = line.split_once("NVRM version:")?;
    rest.split_whitespace().find(|w| is_version_word(w)).map(str::to_string)
}

/// The major number of a driver version ("580.65.06" → 580), for "driver ≥ N" checks.
pub fn driver_major(v: &str) -> Option<u32> {
    let first = v.trim().split('.').next()?;
    if first.is_empty() || !first.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    first.parse().ok()
}

/// The oldest driver whose checkpoint API restores onto other GPUs (`cuCheckpointProcessRestore`
/// with GPU pairs, `cuda-checkpoint --device-map`): r580, the driver of CUDA 13.0.
pub const REMAP_MIN_DRIVER_MAJOR: u32 = 580;

/// The CUDA driver API version a driver branch brings ("580.65.06" → "13.0"), from NVIDIA's
/// table of toolkit releases and their minimum drivers: a node's CUDA version without loading
/// libcuda (the shim never does). `None` below r525 (CUDA 12.0) or for an unparseable version.
pub fn cuda_for_driver(version: &str) -> Option<&'static str> {
    const TABLE: [(u32, &str); 11] = [
        (580, "13.0"),
        (575, "12.9"),
        (570, "12.8"),
        (565, "12.7"),
        (560, "12.6"),
        (555, "12.5"),
        (550, "12.4"),
        (545, "12.3"),
        (535, "12.2"),
        (530, "12.1"),
        (525, "12.0"),
    ];
    let major = driver_major(version)?;
    TABLE.iter().find(|(min, _)| major >= *min).map(|(_, cuda)| *cuda)
}

/// Parses one `gpus/<bus>/information` file (`Key: \t value` lines, as the driver's
/// nv-procfs.c writes them). `dir_name` is the fallback bus id when the file lacks
/// `Bus Location:`. Unknown and malformed lines are ignored; `index` is left 0.
pub fn parse_gpu_information(text: &str, dir_name: &str) -> GpuInfo {
    let mut gpu = GpuInfo::default();
    for line in text.lines() {
        let Some((key, value)) = line.split_once(':') else { continue };
        let value = value.trim();
        match key.trim() {
            "Model" => gpu.model = normalize_model(value),
            "GPU UUID" => gpu.uuid = value.to_string(),
            "Bus Location" => gpu.bus_id = value.to_string(),
            "Device Minor" => gpu.minor = value.parse().ok(),
            _ => {}
        }
    }
    if gpu.bus_id.is_empty() {
        gpu.bus_id = dir_name.to_string();
    }
    gpu
}

/// Why a checkpoint may not be restored on this node's GPUs.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct GpuMismatch {
    /// Models of the GPUs the checkpoint was taken on, in order.
    pub recorded: Vec<String>,
    /// Models of this node's GPUs, in order.
    pub node: Vec<String>,
    /// The whole explanation, with how to override it.
    pub message: String,
}

/// Refuses a restore when the GPU count or the models (in order) differ between the checkpoint
/// and this node. UUIDs, bus ids and minors differ between nodes and are not compared.
pub fn check_compatible(recorded: &[GpuInfo], node: &[GpuInfo]) -> Result<(), GpuMismatch> {
    let same = recorded.len() == node.len()
        && recorded.iter().zip(node).all(|(a, b)| normalize_model(&a.model) == normalize_model(&b.model));
    if same {
        return Ok(());
    }
    let recorded: Vec<String> = recorded.iter().map(|g| normalize_model(&g.model)).collect();
    let node: Vec<String> = node.iter().map(|g| normalize_model(&g.model)).collect();
    let message = format!(
        "checkpoint was taken on {} GPU(s) [{}], this node has {} [{}]; restore on matching GPUs, or allow it \
         with [checkpoint] allow_gpu_mismatch = true or the annotation kybernate.io/allow-gpu-mismatch=true",
        recorded.len(),
        summarize_models(&recorded),
        node.len(),
        summarize_models(&node),
    );
    Err(GpuMismatch { recorded, node, message })
}

/// "A ×2, B" for [A, A, B]: runs of the same model are counted, order is kept.
fn summarize_models(models: &[String]) -> String {
    if models.is_empty() {
        return "none".to_string();
    }
    let mut parts: Vec<String> = Vec::new();
    let mut i = 0;
    while i < models.len() {
        let model = &models[i];
        let run = models[i..].iter().take_while(|m| *m == model).count();
        let name = if model.is_empty() { "unknown model" } else { model.as_str() };
        if run > 1 {
            parts.push(format!("{name} ×{run}"));
        } else {
            parts.push(name.to_string());
        }
        i += run.max(1);
    }
    parts.join(", ")
}

/// Collapses runs of whitespace, so that padding differences do not count as another model.
fn normalize_model(model: &str) -> String {
    model.split_whitespace().collect::<Vec<_>>().join(" ")
}

fn is_version_word(w: &str) -> bool {
    let parts: Vec<&str> = w.split('.').collect();
    parts.len() >= 2 && parts.iter().all(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()))
}

/// Orders PCI locations numerically ("0000:18:00.0" < "0000:a1:00.0", whatever the domain
/// width or letter case); unparseable ones go last, by text.
fn bus_sort_key(bus: &str) -> (Option<(u64, u64, u64, u64)>, String) {
    (parse_pci(bus), bus.to_ascii_lowercase())
}

fn parse_pci(bus: &str) -> Option<(u64, u64, u64, u64)> {
    let bus = bus.trim();
    let (domain, rest) = bus.split_once(':')?;
    let (bus_no, rest) = rest.split_once(':')?;
    let (slot, func) = rest.split_once('.')?;
    let hex = |s: &str| u64::from_str_radix(s, 16).ok();
    Some((hex(domain)?, hex(bus_no)?, hex(slot)?, hex(func)?))
}

/// The file's text, or `None` when it is missing, unreadable, not UTF-8 or oversized.
fn read_capped(path: &Path) -> Option<String> {
    let file = std::fs::File::open(path).ok()?;
    let mut bytes = Vec::new();
    file.take(MAX_PROC_FILE).read_to_end(&mut bytes).ok()?;
    String::from_utf8(bytes).ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;
    use std::path::PathBuf;

    const PROPRIETARY: &str =
        "NVRM version: NVIDIA UNIX x86_64 Kernel Module  580.65.06  Sun Jul 27 07:09:52 UTC 2025\n\
                               GCC version:  gcc version 12.3.0 (Ubuntu 12.3.0-1ubuntu1~22.04)\n";
    const OPEN: &str = "NVRM version: NVIDIA UNIX Open Kernel Module for x86_64  570.133.20  Release Build  \
                        (dvs-builder@U16-I1-N07-12-3)  Fri Mar 14 12:34:56 UTC 2025\n\
                        GCC version:  gcc version 13.2.0\n";

    fn information(model: &str, uuid: &str, bus: &str, minor: u32) -> String {
        format!(
            "Model: \t\t {model}\nIRQ:   \t\t 17\nGPU UUID: \t {uuid}\nVideo BIOS: \t 96.00.99.00.01\n\
             Bus Type: \t PCIe\nDMA Size: \t 52 bits\nDMA Mask: \t 0xfffffffffffff\nBus Location: \t {bus}\n\
             Device Minor: \t {minor}\nGPU Firmware: \t 580.65.06\nGPU Excluded:\t No\n"
        )
    }

    fn proc_tree(version: Option<&str>, gpus: &[(&str, String)]) -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path().join("driver/nvidia");
        fs::create_dir_all(&base).unwrap();
        if let Some(v) = version {
            fs::write(base.join("version"), v).unwrap();
        }
        for (bus, info) in gpus {
            let d = base.join("gpus").join(bus);
            fs::create_dir_all(&d).unwrap();
            fs::write(d.join("information"), info).unwrap();
        }
        let root = dir.path().to_path_buf();
        (dir, root)
    }

    fn gpu(model: &str) -> GpuInfo {
        GpuInfo { model: model.into(), ..GpuInfo::default() }
    }

    #[test]
    fn driver_version_from_proprietary_and_open_modules() {
        assert_eq!(parse_driver_version(PROPRIETARY).as_deref(), Some("580.65.06"));
        assert_eq!(parse_driver_version(OPEN).as_deref(), Some("570.133.20"));
        assert_eq!(parse_driver_version("").as_deref(), None);
        assert_eq!(parse_driver_version("NVRM version: garbage x86_64 2025\n").as_deref(), None);
        assert_eq!(parse_driver_version("GCC version: 12.3.0\n").as_deref(), None, "only the NVRM line counts");
        assert_eq!(driver_major("580.65.06"), Some(580));
        assert_eq!(driver_major("555.42"), Some(555));
        assert_eq!(driver_major(""), None);
        assert_eq!(driver_major("x.1"), None);
        assert_eq!(driver_major("-1.2"), None);
        assert_eq!(driver_major("99999999999.1"), None);
    }

    #[test]
    fn cuda_versions_follow_the_driver_branch() {
        assert_eq!(cuda_for_driver("580.65.06"), Some("13.0"));
        assert_eq!(cuda_for_driver("590.1"), Some("13.0"), "a newer branch brings at least 13.0");
        assert_eq!(cuda_for_driver("575.57.08"), Some("12.9"));
        assert_eq!(cuda_for_driver("570.133.20"), Some("12.8"));
        assert_eq!(cuda_for_driver("550.54"), Some("12.4"));
        assert_eq!(cuda_for_driver("470.1"), None);
        assert_eq!(cuda_for_driver("x"), None);
        assert!(driver_major("579.9").unwrap() < REMAP_MIN_DRIVER_MAJOR);
    }

    #[test]
    fn no_driver_directory_means_no_gpus() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(node_gpus(dir.path()), NodeGpus::default());
        assert_eq!(node_gpus(&dir.path().join("missing")), NodeGpus::default());
    }

    #[test]
    fn driver_without_gpus() {
        let (_d, root) = proc_tree(Some(PROPRIETARY), &[]);
        let node = node_gpus(&root);
        assert_eq!(node.driver_version.as_deref(), Some("580.65.06"));
        assert!(node.gpus.is_empty());
    }

    #[test]
    fn one_gpu() {
        let (_d, root) = proc_tree(
            Some(OPEN),
            &[("0000:18:00.0", information("NVIDIA H100 80GB HBM3", "GPU-aaaa", "0000:18:00.0", 0))],
        );
        let node = node_gpus(&root);
        assert_eq!(node.driver_version.as_deref(), Some("570.133.20"));
        assert_eq!(
            node.gpus,
            vec![GpuInfo {
                index: 0,
                model: "NVIDIA H100 80GB HBM3".into(),
                uuid: "GPU-aaaa".into(),
                bus_id: "0000:18:00.0".into(),
                minor: Some(0),
            }]
        );
    }

    #[test]
    fn two_gpus_sorted_by_bus_location() {
        // Created in reverse order, and with a hex bus number that sorts wrong as decimal text.
        let (_d, root) = proc_tree(
            Some(PROPRIETARY),
            &[
                ("0000:ab:00.0", information("NVIDIA A100-SXM4-40GB", "GPU-bbbb", "0000:ab:00.0", 0)),
                ("0000:18:00.0", information("NVIDIA H100 80GB HBM3", "GPU-aaaa", "0000:18:00.0", 1)),
            ],
        );
        let node = node_gpus(&root);
        let got: Vec<(u32, &str, &str, Option<u32>)> =
            node.gpus.iter().map(|g| (g.index, g.bus_id.as_str(), g.uuid.as_str(), g.minor)).collect();
        assert_eq!(got, vec![(0, "0000:18:00.0", "GPU-aaaa", Some(1)), (1, "0000:ab:00.0", "GPU-bbbb", Some(0))]);
        assert_eq!(node.gpus[1].model, "NVIDIA A100-SXM4-40GB");
    }

    #[test]
    fn malformed_information_files_still_count() {
        let (_d, root) = proc_tree(
            Some("garbage\n"),
            &[
                ("0000:3b:00.0", "no colons here\n\u{0}\u{1}:::\nDevice Minor: \t minus one\n".to_string()),
                ("0000:1a:00.0", String::new()),
            ],
        );
        // A file that is not valid UTF-8, and a stray regular file next to the GPU directories.
        let bad = root.join("driver/nvidia/gpus/0000:5e:00.0");
        fs::create_dir_all(&bad).unwrap();
        fs::write(bad.join("information"), [0xff, 0xfe, b'\n']).unwrap();
        fs::write(root.join("driver/nvidia/gpus/README"), "not a gpu").unwrap();
        // A GPU directory without an information file at all.
        fs::create_dir_all(root.join("driver/nvidia/gpus/0000:7f:00.0")).unwrap();

        let node = node_gpus(&root);
        assert_eq!(node.driver_version, None);
        let got: Vec<(u32, &str, &str, Option<u32>)> =
            node.gpus.iter().map(|g| (g.index, g.bus_id.as_str(), g.model.as_str(), g.minor)).collect();
        assert_eq!(
            got,
            vec![
                (0, "0000:1a:00.0", "", None),
                (1, "0000:3b:00.0", "", None),
                (2, "0000:5e:00.0", "", None),
                (3, "0000:7f:00.0", "", None),
            ]
        );
    }

    #[test]
    fn information_parsing_tolerates_odd_values() {
        let g = parse_gpu_information("Model:   NVIDIA   L40S  \nDevice Minor: \t 4294967296\n", "dir");
        assert_eq!(g.model, "NVIDIA L40S");
        assert_eq!(g.minor, None, "out of range minor is dropped, not wrapped");
        assert_eq!(g.bus_id, "dir");
    }

    #[test]
    fn compatible_when_models_match_in_order_whatever_the_uuids() {
        let a = vec![
            GpuInfo { uuid: "GPU-1".into(), bus_id: "0000:18:00.0".into(), ..gpu("NVIDIA H100 80GB HBM3") },
            GpuInfo { uuid: "GPU-2".into(), ..gpu("NVIDIA H100 80GB HBM3") },
        ];
        let b = vec![
            GpuInfo { uuid: "GPU-9".into(), bus_id: "0000:99:00.0".into(), ..gpu("NVIDIA H100 80GB HBM3") },
            GpuInfo { uuid: "GPU-8".into(), ..gpu("NVIDIA  H100 80GB HBM3") },
        ];
        assert_eq!(check_compatible(&a, &b), Ok(()));
        assert_eq!(check_compatible(&[], &[]), Ok(()));
    }

    #[test]
    fn count_differs() {
        let recorded = vec![gpu("NVIDIA H100 80GB HBM3"), gpu("NVIDIA H100 80GB HBM3")];
        let node = vec![gpu("NVIDIA A100-SXM4-40GB")];
        let err = check_compatible(&recorded, &node).unwrap_err();
        assert_eq!(err.recorded, vec!["NVIDIA H100 80GB HBM3", "NVIDIA H100 80GB HBM3"]);
        assert_eq!(err.node, vec!["NVIDIA A100-SXM4-40GB"]);
        assert_eq!(
            err.to_string(),
            "checkpoint was taken on 2 GPU(s) [NVIDIA H100 80GB HBM3 ×2], this node has 1 [NVIDIA A100-SXM4-40GB]; \
             restore on matching GPUs, or allow it with [checkpoint] allow_gpu_mismatch = true or the annotation \
             kybernate.io/allow-gpu-mismatch=true"
        );
        let err = check_compatible(&[gpu("NVIDIA H100 80GB HBM3")], &[]).unwrap_err();
        assert!(err.to_string().contains("this node has 0 [none]"), "{err}");
        assert!(check_compatible(&[], &[gpu("NVIDIA H100 80GB HBM3")]).is_err());
    }

    #[test]
    fn model_differs() {
        let recorded = vec![gpu("NVIDIA H100 80GB HBM3"), gpu("NVIDIA A100-SXM4-40GB")];
        let swapped = vec![gpu("NVIDIA A100-SXM4-40GB"), gpu("NVIDIA H100 80GB HBM3")];
        let err = check_compatible(&recorded, &swapped).unwrap_err();
        assert!(
            err.to_string().starts_with(
                "checkpoint was taken on 2 GPU(s) [NVIDIA H100 80GB HBM3, NVIDIA A100-SXM4-40GB], this node has 2 \
                 [NVIDIA A100-SXM4-40GB, NVIDIA H100 80GB HBM3];"
            ),
            "{err}"
        );
        let err = check_compatible(&[gpu("")], &[gpu("NVIDIA L4")]).unwrap_err();
        assert!(err.to_string().contains("[unknown model]"), "{err}");
    }

    #[test]
    fn model_summary_counts_runs() {
        let m = |v: &[&str]| summarize_models(&v.iter().map(|s| s.to_string()).collect::<Vec<_>>());
        assert_eq!(m(&["A", "A", "B", "A"]), "A ×2, B, A");
        assert_eq!(m(&[]), "none");
    }
}
