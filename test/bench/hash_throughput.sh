#!/usr/bin/env bash
# What integrity costs per GiB on this machine's CPU, to predict another's: the hashing of checkpoint
# files as commit and restore do it (kybernate_checkpoint::digest), format 2 (BLAKE3 in 8 MiB chunks)
# on one thread and on every core, and format 1 (SHA-256, one thread per file), on a file of MIB MiB
# in the page cache of the store's filesystem; then BLAKE3 and SHA-256 of a buffer in memory (the
# CPU's ceiling, no page-cache copies). A `dd conv=fdatasync` of the same size gives the disk's rate:
# hashing on every core must beat it for integrity to cost nothing visible.
# Usage: bash test/bench/hash_throughput.sh [RUNS] [MIB]   defaults 5 1024
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
RUNS=${1:-5}
MIB=${2:-1024}
BASE=/var/lib/kybernate-bench/hash-$$
trap 'rm -rf "$BASE"; rmdir /var/lib/kybernate-bench 2>/dev/null || true' EXIT
# shellcheck source=test/bench/build.sh
. test/bench/build.sh
bench_build_examples hash_throughput
BIN=$PWD/target/release/examples/hash_throughput
mkdir -p "$BASE"
echo "== machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //'), $(uname -r)"
echo "== file: $BASE on $(findmnt -no SOURCE,FSTYPE -T "$BASE" | tr -s ' ')"
sync
t0=$(date +%s%N)
dd if=/dev/urandom of="$BASE/pages.img" bs=1M count="$MIB" conv=fdatasync status=none
t1=$(date +%s%N)
echo "   written from /dev/urandom with conv=fdatasync in $(((t1 - t0) / 1000000)) ms (urandom + disk)"
sync
t0=$(date +%s%N)
dd if=/dev/zero of="$BASE/zero.img" bs=1M count="$MIB" conv=fdatasync status=none
t1=$(date +%s%N)
rm -f "$BASE/zero.img"
echo "   dd $MIB MiB from /dev/zero to the same fs (conv=fdatasync, as test/bench/checkpoint.sh): $((MIB * 1000000000 / (t1 - t0))) MiB/s"
"$BIN" "$BASE/pages.img" "$RUNS"
"$BIN" --memory "$MIB" "$RUNS"
