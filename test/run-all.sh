#!/usr/bin/env bash
# The full test suite (what CI runs through .ci/run): prepares the machine, runs the demo as an
# end-to-end check, then every crate's tests. Exits non-zero on any failure.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

command -v cargo >/dev/null || export PATH="$HOME/.cargo/bin:$PATH"

# Each section's header says how long the run has taken so far (CI's budget is 20 minutes).
section() { echo "== [$((SECONDS / 60))m$((SECONDS % 60))s] $*"; }

section "test/setup.sh"
bash test/setup.sh

section "test/demo.sh"
bash test/demo.sh

section "release build (docs/installation.md's command) and its binaries' --version"
cargo build --release -p kybernate-cli -p containerd-shim-kybernate-v1 -p kybernate-runtime-select
for b in kybernate containerd-shim-kybernate-v1 kybernate-select; do
    "target/release/$b" --version
done

section "benchmarks: criterion benches once each (test mode); the shim and checkpoint scripts one short run each"
# The timed runs are not tests (docs/benchmarks.md) and nothing here checks a time: this keeps the
# benchmarks from rotting and runs the release binaries (fat LTO, stripped) through real containers,
# a checkpoint and a restore. gpu.sh needs a GPU: it only has to parse. The scripts build through
# test/bench/build.sh: the binaries above are reused, their tools are one build.
cargo test -q -p kybernate-runtime-select --benches
for script in test/bench/*.sh; do
    bash -n "$script"
done
bash test/bench/shim.sh 5 20
bash test/bench/shared_pid_exit.sh 5
bash test/bench/checkpoint.sh 1 16
bash test/bench/restore_check.sh 1 4 64

section "cgroup v2: the suites that exercise cgroups again, on a v2 test bed (docs/testing.md, cgroup v2)"
# The same tests, every test bed on the cgroup2 hierarchy (a private mount namespace on these v1 machines).
# `--workspace` as below: the same package selection builds the same test binaries once for both runs.
KBT_CGROUP=v2 cargo test --workspace \
    --test checkpoint --test restore_security --test trust --test shim_kill --test faults \
    --test lifecycle --test containerd --test gpu

section "cargo test --workspace"
# Last, so that cargo's own summary closes the output.
cargo test --workspace
