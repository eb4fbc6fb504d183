# shellcheck shell=bash
# How the benchmarks build what they run (sourced, from the repository root).
#
# Cargo unifies the features of shared dependencies over the packages one command selects, so two
# commands that select different packages build two different binaries, each a fat-LTO link of
# minutes on a small machine. Every benchmark therefore uses one of these two commands:

command -v cargo >/dev/null || export PATH="$HOME/.cargo/bin:$PATH"

# The release binaries exactly as docs/installation.md (and CI's release build) makes them: the
# shim, CLI and runtime selector a node gets, reused when already built.
bench_build_bins() {
    cargo build --release -q -p kybernate-cli -p containerd-shim-kybernate-v1 -p kybernate-runtime-select
}

# Release examples (the benchmarks' tools and timed programs), in target/release/examples: always
# the whole workspace selected, so every script shares one build of the libraries they link.
bench_build_examples() { # EXAMPLE...
    local args=() e
    for e in "$@"; do args+=(--example "$e"); done
    cargo build --release -q --workspace "${args[@]}"
}
