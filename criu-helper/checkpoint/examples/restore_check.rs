//! The restore checks on their own, for `test/bench/restore_check.sh`: `check IMAGES_DIR SPEC_JSON`
//! runs the credentials check (CRIU's metadata images against a spec) as the shim does at
//! Create; `verify CHECKPOINT_DIR` hashes every file against the manifest as every restore does
//! first (the yardstick). Exit status: 0 allowed / verified, 2 refused, 1 unusable input.

use std::path::Path;
use std::process::ExitCode;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.iter().map(String::as_str).collect::<Vec<_>>().as_slice() {
        ["check", images, spec] => {
            let spec = match std::fs::read(spec)
                .map_err(|e| e.to_string())
                .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).map_err(|e| e.to_string()))
            {
                Ok(s) => s,
                Err(e) => {
                    eprintln!("restore_check: {spec}: {e}");
                    return ExitCode::from(1);
                }
            };
            match kybernate_checkpoint::grants::check_restore(
                Path::new(images),
                &spec,
                &kybernate_checkpoint::grants::Host::this_node(),
            ) {
                Ok(summary) => {
                    println!("allowed: {summary}");
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    println!("refused: {e}");
                    ExitCode::from(2)
                }
            }
        }
        ["verify", dir] => match kybernate_checkpoint::verify(Path::new(dir)) {
            Ok(m) => {
                println!("verified: {} files, {} bytes", m.files.len(), m.total_size());
                ExitCode::SUCCESS
            }
            Err(e) => {
                println!("refused: {e}");
                ExitCode::from(2)
            }
        },
        _ => {
            eprintln!("usage: restore_check check IMAGES_DIR SPEC_JSON | verify CHECKPOINT_DIR");
            ExitCode::from(1)
        }
    }
}
