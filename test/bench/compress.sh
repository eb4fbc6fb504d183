#!/usr/bin/env bash
# Whether zstd pays for checkpoints on this machine's disk (issue #24, `[checkpoint] compress`):
# dumps test/bench/memhog.c holding MIB MiB with CRIU itself (a real pages-*.img, incompressible
# like most process memory), then runs the compress_throughput example on the store's filesystem:
# zstd levels -1, 1, 3 on one thread and on every core, compress/decompress rates in memory,
# ratio, and end to end (plain write + fdatasync vs zstd + write + fdatasync; cold read plain vs
# read + decompress) for memhog's pages, float32 series, 7/8 zero pages and the real image.
# `dd conv=fdatasync` and a page-cache read give the disk's own rates. Medians of RUNS.
# Usage: bash test/bench/compress.sh [RUNS] [MIB]   defaults 3 1024
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
RUNS=${1:-3}
MIB=${2:-1024}
BASE=/var/lib/kybernate-bench/compress-$$
PID=
cleanup() {
    [ -n "$PID" ] && kill "$PID" 2>/dev/null || true
    rm -rf "$BASE"
    rmdir /var/lib/kybernate-bench 2>/dev/null || true
}
trap cleanup EXIT
# shellcheck source=test/bench/build.sh
. test/bench/build.sh
bench_build_examples compress_throughput
BIN=$PWD/target/release/examples/compress_throughput
mkdir -p "$BASE/dump"
echo "== machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //'), $(uname -r)"
echo "== store: $BASE on $(findmnt -no SOURCE,FSTYPE -T "$BASE" | tr -s ' ')"

gcc -O2 -static -o "$BASE/memhog" test/bench/memhog.c
setsid "$BASE/memhog" "$MIB" "$BASE/ready" </dev/null >/dev/null 2>&1 &
PID=$!
disown "$PID" # CRIU kills it: no "Killed" job notice
for _ in $(seq 600); do [ -e "$BASE/ready" ] && break; sleep 0.1; done
[ -e "$BASE/ready" ] || { echo "memhog did not start" >&2; exit 1; }
criu dump -t "$PID" -D "$BASE/dump" -o dump.log >/dev/null 2>&1 || { cat "$BASE/dump/dump.log" >&2; exit 1; }
PID=
PAGES=$(ls -S "$BASE"/dump/pages-*.img | head -1)
echo "   CRIU dumped memhog $MIB MiB: $(basename "$PAGES") $(stat -c %s "$PAGES") bytes"

w=() r=()
for _ in $(seq "$RUNS"); do
    sync
    t0=$(date +%s%N)
    dd if=/dev/zero of="$BASE/zero.img" bs=1M count="$MIB" conv=fdatasync status=none
    t1=$(date +%s%N)
    dd if="$BASE/zero.img" of=/dev/null bs=1M status=none # page cache: just written
    t2=$(date +%s%N)
    w+=($((MIB * 1000000000 / (t1 - t0)))) r+=($((MIB * 1000000000 / (t2 - t1))))
    rm -f "$BASE/zero.img"
done
med() { printf '%s\n' "$@" | sort -n | awk '{a[NR]=$1} END {print a[int((NR + 1) / 2)]}'; }
echo "   dd $MIB MiB: $(med "${w[@]}") MiB/s with conv=fdatasync, $(med "${r[@]}") MiB/s read from the page cache (median of $RUNS)"
echo "== zstd (MiB/s of uncompressed bytes; e2e_write: write+fdatasync, e2e_read: cold read; median of $RUNS)"
"$BIN" "$BASE" "$MIB" "$RUNS" --file "$PAGES" | column -t -s,
