#!/usr/bin/env bash
# What hashing while CRIU writes saves (kybernate_checkpoint::follow): a partial checkpoint of one
# MIB MiB pages-1.img written by a thread at RATE MiB/s (the pace of a dump; raw runc's checkpoint
# runs at ~600-770 MiB/s on the test machine), then committed (hash, fsync, manifest, rename), with
# and without the dump follower, interleaved. Reports the median time from the writer's last byte
# to the commit's end: what a frozen `--exit` container waits after CRIU returns.
# Usage: bash test/bench/follow.sh [RUNS] [MIB] [RATE]   defaults 5 1024 700
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
RUNS=${1:-5}
MIB=${2:-1024}
RATE=${3:-700}
BASE=/var/lib/kybernate-bench/follow-$$
trap 'rm -rf "$BASE"; rmdir /var/lib/kybernate-bench 2>/dev/null || true' EXIT
# shellcheck source=test/bench/build.sh
. test/bench/build.sh
bench_build_examples follow_bench
mkdir -p "$BASE"
echo "== machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //'), $(uname -r)"
echo "== store: $BASE on $(findmnt -no SOURCE,FSTYPE -T "$BASE" | tr -s ' ')"
"$PWD/target/release/examples/follow_bench" "$BASE" "$MIB" "$RATE" "$RUNS"
