//! What hashing while CRIU writes saves, for `test/bench/follow.sh`: `follow_bench DIR MIB
//! RATE_MIB_S RUNS` writes a checkpoint of one `pages-1.img` of MIB MiB into a partial checkpoint
//! under DIR, from a writer thread at RATE_MIB_S (the pace of a dump), then commits it; once with
//! the dump follower (`PartialCheckpoint::follow_dump`) and once without, interleaved, RUNS times.
//! It prints the median time from the writer's last byte to the commit's end (what a frozen
//! `--exit` container waits after CRIU returns), the commit's hash and sync/rename parts, and the
//! writer's own time (whether the follower slowed the "dump"; a huge RATE writes flat out).

use std::io::Write;
use std::path::Path;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use kybernate_checkpoint::{CommitTimes, Manifest, PartialCheckpoint};

fn manifest() -> Manifest {
    let value = serde_json::json!({
        "format_version": 2, "namespace": "bench", "container_id": "c1",
        "runtime": {"path": "/usr/bin/runc", "version": "bench"},
        "criu": {"path": "/usr/sbin/criu", "version": "bench"},
        "kernel": "bench", "host": "bench", "created": "2026-12-07T00:00:00Z",
        "options": {}, "files": {},
    });
    serde_json::from_value(value).expect("the bench manifest parses")
}

/// One checkpoint's times: the writer's, from its last write to the commit's end, the commit's parts.
struct Run {
    write: Duration,
    after: Duration,
    commit: CommitTimes,
}

/// One checkpoint: written at `rate` MiB/s (at most), committed.
fn once(target: &Path, mib: u64, rate: f64, follow: bool) -> Result<Run, String> {
    let mut partial = PartialCheckpoint::begin(target).map_err(|e| e.to_string())?;
    if follow {
        partial.follow_dump();
    }
    let images = partial.images_dir();
    let pages = images.join("pages-1.img");
    let mut f = std::fs::File::create(&pages).map_err(|e| format!("{}: {e}", pages.display()))?;
    let mut piece: Vec<u8> = (0..1u32 << 20).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect();
    let started = Instant::now();
    for i in 0..mib {
        piece[..8].copy_from_slice(&i.to_le_bytes()); // every MiB differs
        f.write_all(&piece).map_err(|e| format!("{}: {e}", pages.display()))?;
        let due = Duration::from_secs_f64((i + 1) as f64 / rate);
        if let Some(wait) = due.checked_sub(started.elapsed()) {
            std::thread::sleep(wait);
        }
    }
    drop(f);
    std::fs::write(images.join("inventory.img"), b"inventory").map_err(|e| e.to_string())?;
    let (write, written) = (started.elapsed(), Instant::now());
    let (_, commit) = partial.commit_timed(manifest()).map_err(|e| e.to_string())?;
    Ok(Run { write, after: written.elapsed(), commit })
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn ms(d: Duration) -> String {
    format!("{:.0} ms", d.as_secs_f64() * 1e3)
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [dir, mib, rate, runs] = args.as_slice() else {
        eprintln!("usage: follow_bench DIR MIB RATE_MIB_S RUNS");
        return ExitCode::from(1);
    };
    let (Ok(mib), Ok(rate), Ok(runs)) = (mib.parse::<u64>(), rate.parse::<f64>(), runs.parse::<usize>()) else {
        eprintln!("follow_bench: MIB, RATE_MIB_S and RUNS are numbers");
        return ExitCode::from(1);
    };
    let mut results: [Vec<Run>; 2] = [Vec::new(), Vec::new()];
    for run in 0..runs {
        // Interleaved, the order swapped every run, each from a clean page cache of dirty pages.
        for k in 0..2 {
            let follow = (run + k) % 2 == 1;
            // SAFETY: sync(2) takes no arguments and cannot fail.
            unsafe { libc::sync() };
            let target = Path::new(dir).join(format!("ns/c1/run{run}-{}", if follow { "follow" } else { "plain" }));
            match once(&target, mib, rate, follow) {
                Ok(r) => {
                    println!(
                        "run {run} {:>8}: writer {:>7}, after it {:>6} (hash+fsync {}, manifest+rename {}, followed {} MiB)",
                        if follow { "follower" } else { "plain" },
                        ms(r.write),
                        ms(r.after),
                        ms(r.commit.hash),
                        ms(r.commit.sync_and_rename),
                        r.commit.followed_bytes >> 20
                    );
                    results[usize::from(follow)].push(r);
                }
                Err(e) => {
                    eprintln!("follow_bench: {e}");
                    return ExitCode::from(1);
                }
            }
            let _ = std::fs::remove_dir_all(&target);
        }
    }
    for (follow, r) in results.iter().enumerate() {
        println!(
            "{mib} MiB at {rate} MiB/s, {}: median after the writer {} (hash+fsync {}, manifest+rename {}), \
             writer {}, over {runs} runs",
            if follow == 1 { "with the follower" } else { "without (hash after the dump)" },
            ms(median(r.iter().map(|x| x.after).collect())),
            ms(median(r.iter().map(|x| x.commit.hash).collect())),
            ms(median(r.iter().map(|x| x.commit.sync_and_rename).collect())),
            ms(median(r.iter().map(|x| x.write).collect())),
        );
    }
    ExitCode::SUCCESS
}
