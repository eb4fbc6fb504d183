//! Hash throughput of checkpoint verification, for `test/bench/hash_throughput.sh` and for
//! predicting the next machine: `hash_throughput FILE [RUNS]` hashes FILE (warm in the page cache)
//! with format 2 (BLAKE3 in chunks, as commit and restore do) on 1 thread and on every core
//! (capped at the hashing threads' maximum), and with format 1 (SHA-256, one thread per file), and
//! prints the median GiB/s of each. `hash_throughput --memory MIB [RUNS]` hashes an in-memory
//! buffer instead (no page-cache copies), the CPU's own ceiling.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use kybernate_checkpoint::digest::{default_threads, hash_files, Algorithm, Job};

const GIB: f64 = (1u64 << 30) as f64;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Median GiB/s of `runs` calls of `f`, which hashes `bytes`.
fn rate(bytes: u64, runs: usize, mut f: impl FnMut()) -> f64 {
    f(); // warm-up: page cache, thread start, CPU frequency
    median(
        (0..runs)
            .map(|_| {
                let t = Instant::now();
                f();
                bytes as f64 / GIB / t.elapsed().as_secs_f64()
            })
            .collect(),
    )
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let runs = |i: usize| args.get(i).and_then(|r| r.parse().ok()).unwrap_or(5usize);
    let all = default_threads();
    match args.iter().map(String::as_str).collect::<Vec<_>>().as_slice() {
        ["--memory", mib, ..] => {
            let Ok(mib) = mib.parse::<usize>() else {
                eprintln!("hash_throughput: --memory needs a size in MiB");
                return ExitCode::from(1);
            };
            let runs = runs(2);
            let buf: Vec<u8> = (0..mib << 20).map(|i| (i as u32).wrapping_mul(2_654_435_761) as u8).collect();
            let bytes = buf.len() as u64;
            let one = rate(bytes, runs, || {
                std::hint::black_box(blake3::hash(std::hint::black_box(&buf)));
            });
            let sha = rate(bytes, runs, || {
                use sha2::Digest;
                std::hint::black_box(sha2::Sha256::digest(std::hint::black_box(&buf)));
            });
            println!(
                "memory {mib} MiB: blake3 1 core {one:.2} GiB/s; sha256 1 core {sha:.2} GiB/s ({runs} runs, median)"
            );
            ExitCode::SUCCESS
        }
        [file, ..] if !file.starts_with('-') => {
            let runs = runs(1);
            let path = PathBuf::from(file);
            let bytes = match std::fs::metadata(&path) {
                Ok(m) => m.len(),
                Err(e) => {
                    eprintln!("hash_throughput: {file}: {e}");
                    return ExitCode::from(1);
                }
            };
            let jobs = [Job { path, size: None }];
            let run = |algorithm, threads| {
                rate(bytes, runs, || {
                    if let Err(e) = hash_files(&jobs, algorithm, false, threads) {
                        eprintln!("hash_throughput: {}: {}", e.path.display(), e.source);
                        std::process::exit(1);
                    }
                })
            };
            let one = run(Algorithm::current(), 1);
            let every = run(Algorithm::current(), all);
            let sha = run(Algorithm::Sha256, 1);
            println!(
                "file {} MiB (page cache): blake3 chunks 1 thread {one:.2} GiB/s, {all} threads {every:.2} GiB/s; \
                 sha256 (format 1) {sha:.2} GiB/s ({runs} runs, median)",
                bytes >> 20
            );
            ExitCode::SUCCESS
        }
        _ => {
            eprintln!("usage: hash_throughput FILE [RUNS] | --memory MIB [RUNS]");
            ExitCode::from(1)
        }
    }
}
