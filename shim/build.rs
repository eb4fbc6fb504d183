//! Links the shim as a position-dependent executable (docs/architecture.md, "Memory").
//!
//! A PIE binary is relocated by ld.so at every start: ~15,000 relative relocations that fill
//! ~250 KiB of `.data.rel.ro` (vtables, format strings, panic locations) with this run's
//! addresses, which turns those pages into private memory in every shim, one per pod. Linked
//! at a fixed address they stay clean pages of the file that all shims share, and ld.so no
//! longer reads the 345 KiB relocation table. The stock `containerd-shim-runc-v2` and `runc`
//! of Debian's packages are position-dependent executables too. Only the shim binary: the
//! `kybernate` CLI and the tests stay PIE.
fn main() {
    let target_os = std::env::var("CARGO_CFG_TARGET_OS").unwrap_or_default();
    if target_os == "linux" {
        println!("cargo:rustc-link-arg-bin=containerd-shim-kybernate-v1=-no-pie");
    }
}
