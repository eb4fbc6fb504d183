//! `containerd-shim-kybernate-v1`: started by containerd for runtime `io.containerd.kybernate.v1`.

use kybernate_shim::service::{exit_dir, Service, ADDRESS_ENV};

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.iter().any(|a| a == "-v" || a == "--version" || a == "-version") {
        println!("containerd-shim-kybernate-v1 {}", env!("CARGO_PKG_VERSION"));
        return;
    }
    // Keep our socket address for the exit path (see Service::wait).
    if let Some(pos) = args.iter().position(|a| a == "-socket") {
        if let Some(sock) = args.get(pos + 1) {
            std::env::set_var(ADDRESS_ENV, sock);
        }
    }
    // A panic in the shim orphans containers: make sure one at least reaches containerd's log.
    std::panic::set_hook(Box::new(|info| log::error!("shim panic: {info}")));
    containerd_shim::run::<Service>("io.containerd.kybernate.v1", None);
    let _ = std::fs::remove_dir_all(exit_dir());
}
