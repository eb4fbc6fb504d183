//! `containerd-shim-kybernate-v1`: started by containerd for runtime `io.containerd.kybernate.v1`.

use kybernate_shim::bootstrap;
use kybernate_shim::service::{exit_dir, Service, ADDRESS_ENV};

const RUNTIME_ID: &str = "io.containerd.kybernate.v1";

fn main() {
    one_malloc_arena();
    // The CUDA driver helper the shim starts for a GPU checkpoint or restore (gpu.rs).
    let raw: Vec<std::ffi::OsString> = std::env::args_os().collect();
    if raw.get(1).is_some_and(|a| a == kybernate_shim::gpu::DRIVER_HELPER) {
        std::process::exit(kybernate_shim::gpu::serve_driver(&raw[2..]));
    }
    // runc starts CRIU as `<criu> swrk <fd>`; for a restore the shim names this binary as the
    // CRIU (criu_proxy.rs), which relays to the real one and holds the restore until verified.
    if raw.get(1).is_some_and(|a| a == kybernate_shim::criu_proxy::PROXY_MODE) {
        std::process::exit(kybernate_shim::criu_proxy::serve(&raw[1..]));
    }
    let args: Vec<String> = raw.into_iter().map(|a| a.to_string_lossy().into_owned()).collect();
    if args.iter().any(|a| a == "-v" || a == "--version" || a == "-version") {
        println!("containerd-shim-kybernate-v1 {}", env!("CARGO_PKG_VERSION"));
        return;
    }
    // containerd 2.x's introspection (info.rs): options on stdin, a RuntimeInfo on stdout. Both
    // spellings, as Go's flag package (the stock shim's) takes them.
    if args.iter().any(|a| a == "-info" || a == "--info") {
        std::process::exit(kybernate_shim::info::main(RUNTIME_ID));
    }
    // A panic in the shim orphans containers: make sure one at least reaches containerd's log.
    std::panic::set_hook(Box::new(|info| log::error!("shim panic: {info}")));
    // The daemon our own `start` spawned serves the socket it was handed (bootstrap.rs); the
    // `start` and `delete` actions, and a daemon started any other way, go through containerd-shim.
    match bootstrap::inherited_listener() {
        Some(Ok(listener)) => {
            if let Err(e) = bootstrap::serve(listener) {
                log::error!("shim daemon: {e}");
                eprintln!("{RUNTIME_ID}: {e}");
                std::process::exit(1);
            }
        }
        Some(Err(e)) => {
            eprintln!("{RUNTIME_ID}: {e}");
            std::process::exit(1);
        }
        None => {
            // containerd-shim's own exit path removes the socket named in `./address`: keep our
            // address for it (see Service::wait). Our `serve` removes its socket by path itself.
            if let Some(pos) = args.iter().position(|a| a == "-socket") {
                if let Some(sock) = args.get(pos + 1) {
                    std::env::set_var(ADDRESS_ENV, sock);
                }
            }
            containerd_shim::run::<Service>(RUNTIME_ID, None);
            let _ = std::fs::remove_dir_all(exit_dir());
        }
    }
}

/// One malloc arena for the whole process. glibc gives threads that allocate at the same time arenas
/// of their own (up to 8 per core); the daemon's threads are idle nearly all the time, yet ended up
/// holding 14 arenas of partly used pages: ~100 KiB of every pod's memory, for no throughput
/// (docs/benchmarks.md). Set before any thread starts; `MALLOC_ARENA_MAX` in the environment is
/// overridden.
fn one_malloc_arena() {
    #[cfg(target_env = "gnu")]
    // SAFETY: mallopt only tunes the allocator; it takes two integers and touches no memory of ours.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 1);
    }
}
