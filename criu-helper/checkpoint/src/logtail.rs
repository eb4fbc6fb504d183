//! The end of CRIU's logs, for error messages: "runc checkpoint failed" alone
//! sends the operator digging for a work dir that is already gone.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::Path;

/// How much of the file end is read: CRIU logs can be hundreds of MiB.
const MAX_TAIL: u64 = 64 * 1024;

/// The last `n` lines of a text file (CRIU's dump.log/restore.log), lossy UTF-8; None if unreadable.
pub fn tail_lines(path: &Path, n: usize) -> Option<String> {
    let mut f = File::open(path).ok()?;
    let len = f.metadata().ok()?.len();
    let start = len.saturating_sub(MAX_TAIL);
    f.seek(SeekFrom::Start(start)).ok()?;
    let mut buf = Vec::new();
    f.take(MAX_TAIL).read_to_end(&mut buf).ok()?;
    let text = String::from_utf8_lossy(&buf);
    let mut lines: Vec<&str> = text.lines().collect();
    if start > 0 && !lines.is_empty() {
        lines.remove(0); // starts mid-line
    }
    let from = lines.len().saturating_sub(n);
    Some(lines[from..].join("\n"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn last_lines() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("dump.log");
        std::fs::write(&p, "a\nb\nc\nd\n").unwrap();
        assert_eq!(tail_lines(&p, 2).unwrap(), "c\nd");
        assert_eq!(tail_lines(&p, 10).unwrap(), "a\nb\nc\nd");
        assert_eq!(tail_lines(&p, 0).unwrap(), "");
        assert!(tail_lines(&d.path().join("missing"), 3).is_none());
    }

    #[test]
    fn big_file_reads_only_the_end() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("restore.log");
        let mut text: Vec<u8> = (0..20_000).flat_map(|i| format!("(00.{i:06}) line {i}\n").into_bytes()).collect();
        text.extend_from_slice(b"Error (criu/cr-restore.c:1): \xff\n");
        std::fs::write(&p, text).unwrap();
        let tail = tail_lines(&p, 2).unwrap();
        assert_eq!(tail, "(00.019999) line 19999\nError (criu/cr-restore.c:1): \u{fffd}");
        let many = tail_lines(&p, 100_000).unwrap();
        assert!(many.lines().count() < 20_000 && many.lines().all(|l| l.starts_with('(') || l.starts_with("Error")));
    }
}
