//! Tables for people, JSON for scripts. Everything goes through `write`, so a closed pipe
//! (`kybernate list | head`) ends quietly instead of panicking like `println!`.

use std::io::{self, Write};

use serde::Serialize;

use crate::error::CliError;
use crate::store::{Checkpoint, Status};

/// `--output`: a table for people, JSON for scripts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Output {
    Table,
    Json,
}

pub fn write(text: &str) -> Result<(), CliError> {
    let mut out = io::stdout().lock();
    let text = printable(text);
    match out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
        Err(e) if e.kind() != io::ErrorKind::BrokenPipe => Err(CliError::Stdout(e)),
        _ => Ok(()),
    }
}

/// `text` with every control character but newline and tab written as `\u00XX`. Checkpoints,
/// specs and CRIU images are untrusted and their names reach the terminal (a manifest's pod name,
/// a mount path): an escape sequence in one must not drive it. serde_json already escapes the C0
/// controls; DEL and C1 (which some terminals take as CSI) come out as the same `\u00XX` escape,
/// so JSON stays valid and means the same.
pub fn printable(text: &str) -> std::borrow::Cow<'_, str> {
    let unsafe_char = |c: char| c.is_control() && c != '\n' && c != '\t';
    if !text.chars().any(unsafe_char) {
        return std::borrow::Cow::Borrowed(text);
    }
    text.chars()
        .map(|c| if unsafe_char(c) { format!("\\u{:04x}", c as u32) } else { c.to_string() })
        .collect::<String>()
        .into()
}

/// Pretty JSON and a newline.
pub fn json<T: Serialize + ?Sized>(value: &T) -> Result<(), CliError> {
    let mut text = serde_json::to_string_pretty(value)?;
    text.push('\n');
    write(&text)
}

/// "1.5 MiB": binary units, one decimal above bytes.
pub fn human_size(bytes: u64) -> String {
    const UNITS: [&str; 6] = ["KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];
    if bytes < 1024 {
        return format!("{bytes} B");
    }
    let mut value = bytes as f64 / 1024.0;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    format!("{value:.1} {}", UNITS[unit])
}

pub fn yes_no(value: Option<bool>) -> &'static str {
    match value {
        Some(true) => "yes",
        Some(false) => "no",
        None => "-",
    }
}

pub fn status(c: &Checkpoint) -> String {
    match (c.status, &c.error) {
        (Status::Ok, _) => "ok".into(),
        (Status::Broken, Some(e)) => format!("broken: {e}"),
        (Status::Broken, None) => "broken".into(),
    }
}

/// The checkpoint table of `list`, `rm`, `prune` and `import`, columns padded to their widest cell.
pub fn table(checkpoints: &[Checkpoint]) -> String {
    let header = ["ID", "CONTAINER", "NAMESPACE", "CREATED", "SIZE", "GPU", "STATUS"].map(String::from);
    let rows: Vec<[String; 7]> = std::iter::once(header)
        .chain(checkpoints.iter().map(|c| {
            [
                c.id.clone(),
                c.container.clone(),
                c.namespace.clone(),
                c.created.clone().unwrap_or_else(|| "-".into()),
                human_size(c.size_bytes),
                yes_no(c.gpu).into(),
                // The ID column already says which checkpoint: drop its path from the reason.
                status(c).replace(&format!("{}/", c.path.display()), ""),
            ]
        }))
        .collect();
    let mut widths = [0usize; 7];
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    for row in &rows {
        let mut line = String::new();
        for (i, cell) in row.iter().enumerate() {
            if i + 1 == row.len() {
                line.push_str(cell);
            } else {
                line.push_str(&format!("{cell:<width$}   ", width = widths[i]));
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

/// Table lines describing a checkpoint's GPU record (mode, processes, GPUs, bytes, phases,
/// device access), shared by `checkpoint` and `inspect`.
pub fn gpu_lines(gpu: &kybernate_gpu::GpuRecord) -> Vec<(&'static str, String)> {
    let mut lines = vec![("gpu mode", gpu.mode.as_str().to_string())];
    let pids: Vec<String> = gpu
        .processes
        .iter()
        .map(|p| match p.state_checkpointed {
            Some(st) => format!("{} ({st})", p.pid),
            None => p.pid.to_string(),
        })
        .collect();
    lines.push(("cuda procs", if pids.is_empty() { "none".into() } else { pids.join(", ") }));
    let models: Vec<&str> = gpu.gpus.iter().map(|g| g.model.as_str()).collect();
    lines.push(("gpus", if models.is_empty() { "none recorded".into() } else { models.join(", ") }));
    let versions = [
        gpu.driver_version.as_deref().map(|v| format!("driver {v}")),
        gpu.cuda_driver_version.as_deref().map(|v| format!("CUDA {v}")),
    ];
    let versions: Vec<String> = versions.into_iter().flatten().collect();
    if !versions.is_empty() {
        lines.push(("gpu driver", versions.join(", ")));
    }
    lines.push(("gpu bytes", format!("{} ({} bytes)", human_size(gpu.bytes_total), gpu.bytes_total)));
    let phases: Vec<String> = gpu.phases_ms.iter().map(|(k, v)| format!("{k} {v} ms")).collect();
    if !phases.is_empty() {
        lines.push(("gpu phases", phases.join(", ")));
    }
    let d = &gpu.devices;
    lines.push((
        "gpu access",
        format!(
            "{} device node(s), {} cgroup rule(s), {} driver mount(s)",
            d.devices.len(),
            d.rules.len(),
            d.mounts.len()
        ),
    ));
    lines
}

/// The restore verdict in one line, codes only: "compatible", "compatible, 1 warning (kernel)",
/// "incompatible: 2 mismatches (arch, gpu-count)".
pub fn verdict_line(v: &kybernate_checkpoint::verdict::Verdict) -> String {
    let codes =
        |ds: &[kybernate_checkpoint::verdict::Difference]| ds.iter().map(|d| d.code()).collect::<Vec<_>>().join(", ");
    let count = |n: usize, what: &str| format!("{n} {what}{}", if n == 1 { "" } else { "es" });
    let warnings = match v.warnings.len() {
        0 => String::new(),
        1 => format!(", 1 warning ({})", codes(&v.warnings)),
        n => format!(", {n} warnings ({})", codes(&v.warnings)),
    };
    if v.compatible() {
        format!("compatible{warnings}")
    } else {
        format!("incompatible: {} ({}){warnings}", count(v.mismatches.len(), "mismatch"), codes(&v.mismatches))
    }
}

/// `inspect --compat`'s table: the verdict, then each mismatch and warning with both sides.
pub fn verdict_text(id: &str, v: &kybernate_checkpoint::verdict::Verdict, took: std::time::Duration) -> String {
    let mut text = format!(
        "checkpoint {id} on this node: {} (verdict in {:.1} ms)\n",
        verdict_line(v),
        took.as_secs_f64() * 1000.0
    );
    for (kind, ds) in [("mismatch", &v.mismatches), ("warning", &v.warnings)] {
        for d in ds {
            text.push_str(&format!("  {kind:<8}  {d}\n"));
        }
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verdict_lines_name_codes_and_sides() {
        use kybernate_checkpoint::verdict::{Difference, Verdict};
        let mut v = Verdict::default();
        assert_eq!(verdict_line(&v), "compatible");
        v.warnings.push(Difference::Kernel { checkpoint: "6.1.0".into(), node: "6.8.0".into() });
        assert_eq!(verdict_line(&v), "compatible, 1 warning (kernel)");
        v.mismatches.push(Difference::Arch { checkpoint: "x86_64".into(), node: "aarch64".into() });
        v.mismatches.push(Difference::Mounts { missing: vec!["/data".into()] });
        assert_eq!(verdict_line(&v), "incompatible: 2 mismatches (arch, mounts), 1 warning (kernel)");
        let text = verdict_text("default/web/1", &v, std::time::Duration::from_micros(400));
        assert!(text.starts_with("checkpoint default/web/1 on this node: incompatible: 2 mismatches"), "{text}");
        assert!(
            text.contains(
                "(verdict in 0.4 ms)\n  mismatch  arch: checkpoint taken on \"x86_64\", this node is \"aarch64\""
            ),
            "{text}"
        );
        assert!(
            text.contains("\n  warning   kernel: checkpoint taken on kernel 6.1.0, this node runs 6.8.0"),
            "{text}"
        );
    }

    #[test]
    fn sizes_are_human() {
        assert_eq!(human_size(0), "0 B");
        assert_eq!(human_size(1023), "1023 B");
        assert_eq!(human_size(1536), "1.5 KiB");
        assert_eq!(human_size(5 * 1024 * 1024 * 1024), "5.0 GiB");
        assert_eq!(human_size(u64::MAX), "16.0 EiB");
    }

    #[test]
    fn control_characters_never_reach_the_terminal() {
        assert_eq!(printable("plain\ttext\n"), "plain\ttext\n");
        assert_eq!(printable("pod \u{1b}[2Jx\u{9b}1m\u{7f}"), "pod \\u001b[2Jx\\u009b1m\\u007f");
        // Still the same JSON string.
        let json = serde_json::to_string("a\u{9b}b").unwrap();
        let back: String = serde_json::from_str(&printable(&json)).unwrap();
        assert_eq!(back, "a\u{9b}b");
    }
}
