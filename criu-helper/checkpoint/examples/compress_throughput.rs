//! Whether zstd pays for checkpoints, for `test/bench/compress.sh`: `compress_throughput DIR [MIB]
//! [RUNS]` builds MIB MiB (default 1024) of three kinds of memory — memhog's pages (the xorshift64
//! words of test/bench/memhog.c, which is what CRIU's `pages-*.img` holds for it: incompressible),
//! float32 series like a training job's weights, and mostly zero pages — and prints, per kind, the
//! median of RUNS (default 3): zstd's compress rate at levels -1, 1, 3 on one thread and on every
//! core, its decompress rate, the ratio, and end to end on DIR's filesystem: writing the bytes plain
//! vs through zstd (both to an fdatasync'd file), and reading them back cold (the file's pages
//! dropped with `posix_fadvise`) plain vs through zstd. With `--file PATH` a real image (e.g. a
//! `pages-1.img` of a memhog dump) is measured as a fourth kind.

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

const MIB: f64 = (1u64 << 20) as f64;
const CHUNK: usize = 1 << 20;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Median seconds of `runs` calls of `f` (after one warm-up call).
fn secs(runs: usize, mut f: impl FnMut()) -> f64 {
    f();
    median(
        (0..runs)
            .map(|_| {
                let t = Instant::now();
                f();
                t.elapsed().as_secs_f64()
            })
            .collect(),
    )
}

/// memhog.c's words: every 8-byte word the next xorshift64 value.
fn memhog(bytes: usize) -> Vec<u8> {
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15 ^ 4242;
    let mut v = Vec::with_capacity(bytes);
    while v.len() < bytes {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v.extend_from_slice(&x.to_le_bytes());
    }
    v
}

/// A random walk of float32 with roughly normal steps (sum of four uniforms), like weights or
/// activations: the sign/exponent bytes repeat, the mantissas do not.
fn floats(bytes: usize) -> Vec<u8> {
    let mut x: u64 = 0x2545_f491_4f6c_dd1d;
    let mut next = || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        (x >> 40) as f32 / (1u64 << 24) as f32
    };
    let mut v = Vec::with_capacity(bytes);
    let mut w = 0.0f32;
    while v.len() < bytes {
        let step = (next() + next() + next() + next() - 2.0) * 0.01;
        w = (w + step).clamp(-4.0, 4.0);
        v.extend_from_slice(&w.to_le_bytes());
    }
    v
}

/// Seven of every eight 4 KiB pages zero, the eighth floats (a sparse heap, untouched buffers).
fn sparse(bytes: usize) -> Vec<u8> {
    let data = floats(bytes / 8 + 4096);
    let mut v = vec![0u8; bytes];
    for (i, page) in v.chunks_mut(4096).enumerate() {
        if i % 8 == 7 {
            let at = (i / 8) * 4096;
            page.copy_from_slice(&data[at..at + page.len()]);
        }
    }
    v
}

fn encoder<W: Write>(w: W, level: i32, threads: u32) -> io::Result<zstd::Encoder<'static, W>> {
    let mut e = zstd::Encoder::new(w, level)?;
    if threads > 0 {
        e.multithread(threads)?;
    }
    Ok(e)
}

fn compress(data: &[u8], level: i32, threads: u32) -> Vec<u8> {
    let mut e = encoder(Vec::with_capacity(data.len() / 2), level, threads).expect("encoder");
    for c in data.chunks(CHUNK) {
        e.write_all(c).expect("compress");
    }
    e.finish().expect("finish")
}

fn decompress(z: &[u8]) -> u64 {
    let mut d = zstd::Decoder::new(z).expect("decoder");
    let mut buf = vec![0u8; CHUNK];
    let mut n = 0u64;
    loop {
        match d.read(&mut buf).expect("decompress") {
            0 => return n,
            k => n += k as u64,
        }
    }
}

fn drop_cache(f: &File) {
    // SAFETY: a valid fd; fadvise only drops clean cached pages of this file.
    unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
}

/// Writes `data` (plain, or through zstd at `level` on `threads`) to `path` and fdatasyncs it.
fn write_file(path: &Path, data: &[u8], z: Option<(i32, u32)>) -> u64 {
    let f = File::create(path).expect("create");
    let f = match z {
        None => {
            let mut f = f;
            for c in data.chunks(CHUNK) {
                f.write_all(c).expect("write");
            }
            f
        }
        Some((level, threads)) => {
            let mut e = encoder(f, level, threads).expect("encoder");
            for c in data.chunks(CHUNK) {
                e.write_all(c).expect("write");
            }
            e.finish().expect("finish")
        }
    };
    f.sync_data().expect("fdatasync");
    drop_cache(&f);
    f.metadata().map(|m| m.len()).unwrap_or(0)
}

/// Reads `path` cold, plain or through zstd, into a sink.
fn read_file(path: &Path, z: bool) -> u64 {
    let f = File::open(path).expect("open");
    drop_cache(&f);
    let mut buf = vec![0u8; CHUNK];
    let mut r: Box<dyn Read> = if z { Box::new(zstd::Decoder::new(f).expect("decoder")) } else { Box::new(f) };
    let mut n = 0u64;
    loop {
        match r.read(&mut buf).expect("read") {
            0 => return n,
            k => n += k as u64,
        }
    }
}

fn main() -> ExitCode {
    let mut args: Vec<String> = std::env::args().skip(1).collect();
    let mut file = None;
    if let Some(i) = args.iter().position(|a| a == "--file") {
        file = args.get(i + 1).map(PathBuf::from);
        args.drain(i..(i + 2).min(args.len()));
    }
    let Some(dir) = args.first().map(PathBuf::from) else {
        eprintln!("usage: compress_throughput DIR [MIB] [RUNS] [--file PAGES_IMG]");
        return ExitCode::from(1);
    };
    let mib: usize = args.get(1).and_then(|a| a.parse().ok()).unwrap_or(1024);
    let runs: usize = args.get(2).and_then(|a| a.parse().ok()).unwrap_or(3);
    let all = std::thread::available_parallelism().map_or(1, |n| n.get()) as u32;
    let bytes = mib << 20;
    let mut kinds: Vec<(&str, Vec<u8>)> =
        vec![("memhog", memhog(bytes)), ("float32", floats(bytes)), ("zero7/8", sparse(bytes))];
    if let Some(f) = &file {
        match std::fs::read(f) {
            Ok(v) => kinds.push(("pages-img", v)),
            Err(e) => {
                eprintln!("{}: {e}", f.display());
                return ExitCode::from(1);
            }
        }
    }
    let path = dir.join(format!(".compress-throughput-{}", std::process::id()));
    println!("kind,codec,level,threads,ratio,compress_mibs,decompress_mibs,e2e_write_mibs,e2e_read_mibs");
    for (kind, data) in &kinds {
        let n = data.len() as f64 / MIB;
        let w = secs(runs, || {
            write_file(&path, data, None);
        });
        let r = secs(runs, || {
            read_file(&path, false);
        });
        println!("{kind},none,0,1,1.000,,,{:.0},{:.0}", n / w, n / r);
        for level in [-1, 1, 3] {
            for threads in [0, all] {
                let mut z = Vec::new();
                let c = secs(runs, || z = compress(data, level, threads));
                let ratio = data.len() as f64 / z.len() as f64;
                let d = secs(runs, || {
                    assert_eq!(decompress(&z), data.len() as u64);
                });
                let ew = secs(runs, || {
                    write_file(&path, data, Some((level, threads)));
                });
                let er = secs(runs, || {
                    read_file(&path, true);
                });
                println!(
                    "{kind},zstd,{level},{},{ratio:.3},{:.0},{:.0},{:.0},{:.0}",
                    threads.max(1),
                    n / c,
                    n / d,
                    n / ew,
                    n / er
                );
            }
        }
    }
    let _ = std::fs::remove_file(&path);
    ExitCode::SUCCESS
}
