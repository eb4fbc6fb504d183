//! CRIU's statistics file as JSON, for `test/bench/checkpoint.sh`: `dump_stats FILE` prints
//! `{"file": …, "dump": {"freezing_us": …, "frozen_us": …, …}, "restore": null, "stopped_us": …}`
//! for a `stats-dump` or `stats-restore` (CRIU's work dir, or a checkpoint's `stats-dump`), so that
//! raw runc's frozen time is read the way CRIU measured it. Exit status 1: unreadable file.

use std::path::Path;
use std::process::ExitCode;

use kybernate_checkpoint::criu_stats;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [file] = args.as_slice() else {
        eprintln!("usage: dump_stats FILE (CRIU's stats-dump or stats-restore)");
        return ExitCode::from(1);
    };
    match criu_stats::read(Path::new(file)) {
        Ok(stats) => {
            let out = serde_json::json!({
                "file": file,
                "dump": stats.dump,
                "restore": stats.restore,
                // Freezing plus frozen: how long CRIU kept the tasks from running.
                "stopped_us": stats.dump.map(|d| d.stopped_us()),
            });
            println!("{out}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("dump_stats: {e}");
            ExitCode::from(1)
        }
    }
}
