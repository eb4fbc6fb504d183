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

section "builds: release (docs/installation.md's command) and the benchmarks' tools, beside the test suite's build"
# Side by side (target/release and target/debug have cargo locks of their own): for minutes the release
# build's fat-LTO links keep one core busy, and the test suite's build uses the other.
release_builds() {
    cargo build --release -p kybernate-cli -p containerd-shim-kybernate-v1 -p kybernate-runtime-select
    # shellcheck source=test/bench/build.sh
    . test/bench/build.sh
    bench_build_examples checkpoint_rpc dump_stats restore_check
    cargo test -q -p kybernate-runtime-select --benches --no-run
}
mkdir -p target
release_log=target/ci-release-builds.log
release_builds >"$release_log" 2>&1 &
release=$!
trap 'kill "$release" 2>/dev/null || true' EXIT
cargo test --workspace --no-run
if ! wait "$release"; then
    cat "$release_log"
    echo "the release builds failed (above)" >&2
    exit 1
fi
trap - EXIT
echo "-- the release builds' output ($release_log):"
cat "$release_log"
for b in kybernate containerd-shim-kybernate-v1 kybernate-select; do
    "target/release/$b" --version
done

section "benchmarks: criterion benches once each (test mode); the shim and checkpoint scripts one short run each"
# The timed runs are not tests (docs/benchmarks.md) and nothing here checks a time: this keeps the
# benchmarks from rotting and runs the release binaries (fat LTO, stripped) through real containers,
# a checkpoint and a restore. gpu.sh needs a GPU: it only has to parse. The scripts build through
# test/bench/build.sh, which finds everything built above.
cargo test -q -p kybernate-runtime-select --benches
for script in test/bench/*.sh; do
    bash -n "$script"
done
bash test/bench/shim.sh 5 20
bash test/bench/shared_pid_exit.sh 5
bash test/bench/checkpoint.sh 1 16
bash test/bench/restore_check.sh 1 4 64

section "cargo test --workspace"
cargo test --workspace

section "cgroup v2: the suites that exercise cgroups again, on a v2 test bed (docs/testing.md, cgroup v2)"
# The same tests, every test bed on the cgroup2 hierarchy (a private mount namespace on these v1 machines).
# After the run above, with the same package selection (`--workspace`): the test binaries and the examples
# the GPU tests run (fake_nvidia_runtime) are built already, and nothing is built again.
KBT_CGROUP=v2 cargo test --workspace \
    --test checkpoint --test restore_security --test trust --test shim_kill --test faults \
    --test lifecycle --test containerd --test gpu
