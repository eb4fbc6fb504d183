//! CRIU's own statistics of a dump (`stats-dump`) or restore (`stats-restore`): how long it took
//! to freeze the tasks, how long they stayed frozen, how long reading and writing their memory took,
//! and how many pages it wrote.
//!
//! The frozen time of a leave-running checkpoint is the figure users feel, and the yardstick for
//! ours is raw runc's: the wall time of `runc checkpoint` also counts runc's and CRIU's start-up
//! and everything after the thaw, so CRIU's own times are what compares like for like.
//!
//! The format (CRIU's `criu/image.c`, `criu/stats.c`, `images/stats.proto`): CRIU's service magic
//! (absent in images of the oldest format), the stats magic, then one entry: a 32-bit
//! little-endian length and that many bytes of a `stats_entry` protobuf. Times are microseconds.
//! A stats file is ~50 bytes; anything that is not exactly that shape is an error naming the
//! file, never a panic.

use std::fs;
use std::io::{self, Read};
use std::path::Path;

use prost::Message;

use crate::images::{take_u32, ImageError};
use crate::manifest::DumpStats;

/// The head magic of CRIU's service files (stats, irmap cache), before their own magic.
pub const IMG_SERVICE_MAGIC: u32 = 0x5510_5940;
/// `stats-dump`'s and `stats-restore`'s magic.
pub const STATS_MAGIC: u32 = 0x5709_3306;
/// The file CRIU writes into its work dir at the end of a restore.
pub const STATS_RESTORE: &str = "stats-restore";
/// Far more than a stats file holds; bounds what a hostile file makes us read.
const MAX_STATS_BYTES: u64 = 64 << 10;

/// `images/stats.proto`, with CRIU's field numbers; only what we read (prost skips the rest,
/// e.g. the page pipe and shared memory counters newer CRIU releases add).
mod proto {
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct DumpStatsEntry {
        #[prost(uint32, required, tag = "1")]
        pub freezing_time: u32,
        #[prost(uint32, required, tag = "2")]
        pub frozen_time: u32,
        #[prost(uint32, required, tag = "3")]
        pub memdump_time: u32,
        #[prost(uint32, required, tag = "4")]
        pub memwrite_time: u32,
        #[prost(uint64, required, tag = "5")]
        pub pages_scanned: u64,
        #[prost(uint64, required, tag = "6")]
        pub pages_skipped_parent: u64,
        #[prost(uint64, required, tag = "7")]
        pub pages_written: u64,
        #[prost(uint32, optional, tag = "8")]
        pub irmap_resolve: Option<u32>,
        #[prost(uint64, optional, tag = "9")]
        pub pages_lazy: Option<u64>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct RestoreStatsEntry {
        #[prost(uint64, required, tag = "1")]
        pub pages_compared: u64,
        #[prost(uint64, required, tag = "2")]
        pub pages_skipped_cow: u64,
        #[prost(uint32, required, tag = "3")]
        pub forking_time: u32,
        #[prost(uint32, required, tag = "4")]
        pub restore_time: u32,
        #[prost(uint64, optional, tag = "5")]
        pub pages_restored: Option<u64>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct StatsEntry {
        #[prost(message, optional, tag = "1")]
        pub dump: Option<DumpStatsEntry>,
        #[prost(message, optional, tag = "2")]
        pub restore: Option<RestoreStatsEntry>,
    }
}

/// CRIU's account of one dump, as it recorded it (microseconds, pages of 4 KiB on x86).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct DumpTimes {
    /// Freezing the tasks (the cgroup freezer, then seizing every thread): short when they were
    /// frozen already (our shim's `runc pause` before the dump).
    pub freezing_us: u64,
    /// From the tasks frozen to CRIU letting them go (after all images are written, pages included).
    pub frozen_us: u64,
    /// Dumping the tasks' memory: collecting the pages and writing them (`memwrite_us` is part of it).
    pub memdump_us: u64,
    /// Writing the pages into the images.
    pub memwrite_us: u64,
    pub pages_scanned: u64,
    /// Pages left to a pre-dump parent (unchanged since).
    pub pages_skipped_parent: u64,
    pub pages_written: u64,
    /// Pages left for lazy restore (`--lazy-pages`).
    pub pages_lazy: u64,
}

impl DumpTimes {
    /// How long CRIU kept the tasks from running: freezing plus frozen (an upper bound: the first
    /// tasks stop during the freezing, the last at its end).
    pub fn stopped_us(&self) -> u64 {
        self.freezing_us.saturating_add(self.frozen_us)
    }
}

impl From<&DumpTimes> for DumpStats {
    fn from(t: &DumpTimes) -> Self {
        Self {
            freezing_ms: us_to_ms(t.freezing_us),
            frozen_ms: us_to_ms(t.frozen_us),
            memdump_ms: us_to_ms(t.memdump_us),
            memwrite_ms: us_to_ms(t.memwrite_us),
            pages_scanned: t.pages_scanned,
            pages_skipped_parent: t.pages_skipped_parent,
            pages_written: t.pages_written,
        }
    }
}

/// CRIU's account of one restore (microseconds).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct RestoreTimes {
    /// Re-creating the process tree.
    pub forking_us: u64,
    /// The whole restore of the tasks.
    pub restore_us: u64,
    pub pages_compared: u64,
    pub pages_skipped_cow: u64,
    /// Absent in files of CRIU releases that did not count them.
    pub pages_restored: Option<u64>,
}

/// One stats file: a dump's (`stats-dump`) or a restore's (`stats-restore`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct CriuStats {
    pub dump: Option<DumpTimes>,
    pub restore: Option<RestoreTimes>,
}

/// Reads a stats file, e.g. `<work dir>/stats-dump` after `runc checkpoint`.
pub fn read(file: &Path) -> Result<CriuStats, ImageError> {
    parse(file, &read_bounded(file)?)
}

/// Reads a `stats-dump`; a file without a dump part (a restore's) is an error.
pub fn read_dump(file: &Path) -> Result<DumpTimes, ImageError> {
    read(file)?.dump.ok_or_else(|| ImageError::Malformed {
        file: file.into(),
        reason: "no dump statistics in it (a restore's stats file?)".into(),
    })
}

/// Decodes the bytes of a stats file; `file` names it in errors.
pub fn parse(file: &Path, bytes: &[u8]) -> Result<CriuStats, ImageError> {
    let mut rest = bytes;
    let mut magic = take_u32(file, &mut rest, "the magic")?;
    if magic == IMG_SERVICE_MAGIC {
        magic = take_u32(file, &mut rest, "the stats magic")?;
    }
    if magic != STATS_MAGIC {
        return Err(ImageError::Magic { file: file.into(), found: magic, want: STATS_MAGIC });
    }
    let len = take_u32(file, &mut rest, "the entry's length")? as usize;
    if len > rest.len() {
        return Err(ImageError::Truncated {
            file: file.into(),
            reason: format!("the entry claims {len} bytes, {} left", rest.len()),
        });
    }
    if len < rest.len() {
        return Err(ImageError::Malformed {
            file: file.into(),
            reason: format!("{} bytes after the entry (a stats file holds one)", rest.len() - len),
        });
    }
    let entry = proto::StatsEntry::decode(rest).map_err(|e| ImageError::Decode {
        file: file.into(),
        index: 0,
        message: "stats_entry",
        reason: e.to_string(),
    })?;
    Ok(CriuStats {
        dump: entry.dump.map(|d| DumpTimes {
            freezing_us: d.freezing_time.into(),
            frozen_us: d.frozen_time.into(),
            memdump_us: d.memdump_time.into(),
            memwrite_us: d.memwrite_time.into(),
            pages_scanned: d.pages_scanned,
            pages_skipped_parent: d.pages_skipped_parent,
            pages_written: d.pages_written,
            pages_lazy: d.pages_lazy.unwrap_or(0),
        }),
        restore: entry.restore.map(|r| RestoreTimes {
            forking_us: r.forking_time.into(),
            restore_us: r.restore_time.into(),
            pages_compared: r.pages_compared,
            pages_skipped_cow: r.pages_skipped_cow,
            pages_restored: r.pages_restored,
        }),
    })
}

/// Microseconds to milliseconds, to the nearest.
fn us_to_ms(us: u64) -> u64 {
    us.saturating_add(500) / 1000
}

fn read_bounded(file: &Path) -> Result<Vec<u8>, ImageError> {
    let f = fs::File::open(file).map_err(|source| match source.kind() {
        io::ErrorKind::NotFound => ImageError::Missing { file: file.into() },
        _ => ImageError::Io { file: file.into(), source },
    })?;
    let mut bytes = Vec::new();
    f.take(MAX_STATS_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(|source| ImageError::Io { file: file.into(), source })?;
    if bytes.len() as u64 > MAX_STATS_BYTES {
        return Err(ImageError::TooBig { file: file.into(), size: bytes.len() as u64, max: MAX_STATS_BYTES });
    }
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `stats-dump` of CRIU 4.2.1 dumping a `sleep` with `--leave-running --display-stats`,
    /// which printed: freezing 111 us, frozen 8705 us, memory dump 540 us, memory write 113 us,
    /// pages scanned 58, skipped from parent 0, written 30, lazy 0 (and fields 10-14, newer
    /// counters we skip).
    const SLEEP_DUMP: [u8; 44] = [
        0x40, 0x59, 0x10, 0x55, 0x06, 0x33, 0x09, 0x57, 0x20, 0x00, 0x00, 0x00, 0x0a, 0x1e, 0x08, 0x6f, 0x10, 0x81,
        0x44, 0x18, 0x9c, 0x04, 0x20, 0x71, 0x28, 0x3a, 0x30, 0x00, 0x38, 0x1e, 0x40, 0x00, 0x48, 0x00, 0x50, 0x06,
        0x58, 0x06, 0x60, 0x00, 0x68, 0x00, 0x70, 0x00,
    ];

    fn file() -> &'static Path {
        Path::new("/work/stats-dump")
    }

    #[test]
    fn reads_what_criu_printed() {
        let s = parse(file(), &SLEEP_DUMP).unwrap();
        assert_eq!(s.restore, None);
        let d = s.dump.unwrap();
        assert_eq!(
            d,
            DumpTimes {
                freezing_us: 111,
                frozen_us: 8705,
                memdump_us: 540,
                memwrite_us: 113,
                pages_scanned: 58,
                pages_skipped_parent: 0,
                pages_written: 30,
                pages_lazy: 0,
            }
        );
        assert_eq!(d.stopped_us(), 8816);
        let m = DumpStats::from(&d);
        assert_eq!((m.freezing_ms, m.frozen_ms, m.memdump_ms, m.memwrite_ms), (0, 9, 1, 0));
        assert_eq!(m.pages_written, 30);
    }

    #[test]
    fn reads_a_file_and_names_it_in_errors() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("stats-dump");
        let err = read_dump(&path).unwrap_err();
        assert!(matches!(err, ImageError::Missing { .. }), "{err}");
        std::fs::write(&path, SLEEP_DUMP).unwrap();
        assert_eq!(read_dump(&path).unwrap().frozen_us, 8705);
        std::fs::write(&path, vec![0u8; MAX_STATS_BYTES as usize + 1]).unwrap();
        let err = read(&path).unwrap_err();
        assert!(matches!(err, ImageError::TooBig { .. }) && err.to_string().contains("stats-dump"), "{err}");
    }

    /// The oldest image format has no service magic before the stats magic.
    #[test]
    fn reads_a_file_without_the_service_magic() {
        let d = parse(file(), &SLEEP_DUMP[4..]).unwrap().dump.unwrap();
        assert_eq!(d.frozen_us, 8705);
    }

    #[test]
    fn reads_a_restores_stats() {
        let entry = proto::StatsEntry {
            dump: None,
            restore: Some(proto::RestoreStatsEntry {
                pages_compared: 1,
                pages_skipped_cow: 2,
                forking_time: 3000,
                restore_time: 45000,
                pages_restored: Some(7),
            }),
        };
        let bytes = framed(&entry.encode_to_vec());
        let s = parse(file(), &bytes).unwrap();
        assert_eq!(s.dump, None);
        assert_eq!(
            s.restore,
            Some(RestoreTimes {
                forking_us: 3000,
                restore_us: 45000,
                pages_compared: 1,
                pages_skipped_cow: 2,
                pages_restored: Some(7)
            })
        );
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(STATS_RESTORE);
        std::fs::write(&path, &bytes).unwrap();
        let err = read_dump(&path).unwrap_err();
        assert!(err.to_string().contains("no dump statistics"), "{err}");
    }

    fn framed(entry: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        out.extend(IMG_SERVICE_MAGIC.to_le_bytes());
        out.extend(STATS_MAGIC.to_le_bytes());
        out.extend((entry.len() as u32).to_le_bytes());
        out.extend(entry);
        out
    }

    /// Every prefix of a real file, and every single-byte change of it, is an error or a value,
    /// never a panic; every proper prefix is an error.
    #[test]
    fn truncated_or_garbled_files_are_errors() {
        for n in 0..SLEEP_DUMP.len() {
            let err = parse(file(), &SLEEP_DUMP[..n]).unwrap_err();
            assert!(err.to_string().starts_with("/work/stats-dump: "), "prefix {n}: {err}");
        }
        for i in 0..SLEEP_DUMP.len() {
            for b in [0x00, 0x01, 0x7f, 0x80, 0xff] {
                let mut bytes = SLEEP_DUMP;
                bytes[i] = b;
                let _ = parse(file(), &bytes);
            }
        }
        let mut longer = SLEEP_DUMP.to_vec();
        longer.push(0);
        assert!(parse(file(), &longer).unwrap_err().to_string().contains("1 bytes after the entry"));
        let err = parse(file(), &[0x16, 0x31, 0x31, 0x58, 0, 0, 0, 0]).unwrap_err();
        assert!(matches!(err, ImageError::Magic { found: 0x5831_3116, .. }), "{err}");
        // A varint that never ends inside the entry.
        let err = parse(file(), &framed(&[0x0a, 0x02, 0x08, 0xff])).unwrap_err();
        assert!(matches!(err, ImageError::Decode { .. }), "{err}");
    }
}
