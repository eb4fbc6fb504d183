#!/usr/bin/env bash
# The full test suite (what CI runs through .ci/run): prepares the machine, runs the demo as an
# end-to-end check, then every crate's tests. Exits non-zero on any failure.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

command -v cargo >/dev/null || export PATH="$HOME/.cargo/bin:$PATH"

echo "== test/setup.sh"
bash test/setup.sh

echo "== test/demo.sh"
bash test/demo.sh

echo "== benchmarks: criterion benches run once each (test mode), bench scripts parse"
# The timed runs are not tests (docs/benchmarks.md); this only keeps the benchmarks from rotting.
cargo test -q -p kybernate-runtime-select --benches
for script in test/bench/*.sh; do
    bash -n "$script"
done

echo "== cargo test --workspace"
# Last, so that cargo's own summary closes the output.
cargo test --workspace
