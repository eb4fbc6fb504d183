//! `kybernate-select BUNDLE_DIR [--config FILE] [--json]`: explains which OCI
//! runtime the shim would exec for a bundle, and why.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use kybernate_runtime_select::{Context, Decision, Selector};

/// Explain the runtime decision Kybernate's shim makes for an OCI bundle.
#[derive(Debug, Parser)]
#[command(name = "kybernate-select", version)]
struct Args {
    /// OCI bundle directory (the one holding config.json).
    bundle: PathBuf,
    /// Kybernate config file [default: $KYBERNATE_CONFIG, else /etc/kybernate/config.toml].
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Decide as if containerd sent this runc option BinaryName.
    #[arg(long, value_name = "NAME")]
    binary_name: Option<String>,
    /// Print exactly one JSON object.
    #[arg(long)]
    json: bool,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let decision = Selector::load(args.config.as_deref(), Context::from_process_env(args.binary_name))
        .map_err(Into::into)
        .and_then(|s| s.select_bundle(&args.bundle));
    match decision {
        Ok(d) => {
            for w in &d.warnings {
                eprintln!("warning: {w}");
            }
            if args.json {
                match serde_json::to_string(&d.to_json()) {
                    Ok(s) => println!("{s}"),
                    Err(e) => {
                        eprintln!("kybernate-select: cannot encode decision: {e}");
                        return ExitCode::from(1);
                    }
                }
            } else {
                print_human(&d);
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("kybernate-select: {e}");
            ExitCode::from(2)
        }
    }
}

fn print_human(d: &Decision) {
    println!("runtime:  {}", d.runtime.display());
    println!("source:   {}", d.source);
    println!("gpu:      {}", if d.gpu { "yes" } else { "no" });
    if d.evidence.is_empty() {
        println!("evidence: none");
    } else {
        println!("evidence:");
        for e in &d.evidence {
            println!("  - {e}");
        }
    }
}
