#!/usr/bin/env bash
# The driver-api path on a real GPU (docs/benchmarks.md#gpu): a PyTorch process holds GIB of random data on the
# GPU with a known checksum; `kybernate cuda-checkpoint --toggle` (the driver calls the shim makes: lock +
# checkpoint, then restore + unlock) moves its device memory to host memory and back in place, RUNS times; the
# checksum must be identical after each round; time per GiB is reported next to a device-to-host copy of the same
# tensor (pinned and pageable) measured by the process itself in the same run.
# Usage (root, on a GPU node with the NVIDIA driver >= 570 and python3 + torch):
#   bash test/bench/gpu.sh [GIB] [RUNS]        GIB default 8, RUNS default 3
#   KYBERNATE=path/to/kybernate (default target/release/kybernate; built here when missing and cargo exists)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
GIB=${1:-8}
RUNS=${2:-3}
KYB=${KYBERNATE:-target/release/kybernate}
if [ ! -x "$KYB" ]; then
    command -v cargo >/dev/null || export PATH="$HOME/.cargo/bin:$PATH"
    cargo build --release -q -p kybernate-cli --bin kybernate
fi
WORK=$(mktemp -d)
IN=$WORK/in
mkfifo "$IN"
HOLDER=
cleanup() {
    local rc=$?
    [ -n "$HOLDER" ] && kill "$HOLDER" 2>/dev/null && wait "$HOLDER" 2>/dev/null
    rm -rf "$WORK"
    return "$rc"
}
trap cleanup EXIT

python3 test/bench/gpu_hold.py "$GIB" <"$IN" >"$WORK/out" &
HOLDER=$!
exec 3>"$IN" # keeps the holder's stdin open
json() { python3 -c 'import json,sys; print(json.loads(sys.argv[1])[sys.argv[2]])' "$1" "$2"; }
first=
for _ in $(seq 600); do
    first=$(head -n 1 "$WORK/out" 2>/dev/null || true)
    [ -n "$first" ] && break
    kill -0 "$HOLDER" || { echo "the GPU holder died" >&2; exit 1; }
    sleep 0.5
done
[ -n "$first" ] || { echo "the GPU holder did not start" >&2; exit 1; }
PID=$(json "$first" pid)
BYTES=$(json "$first" bytes)
SUM=$(json "$first" checksum)
echo "holder: pid $PID, $(json "$first" gpu), $BYTES bytes, checksum $SUM"
echo "d2h copy: pinned $(json "$first" d2h_pinned_s) s, pageable $(json "$first" d2h_pageable_s) s"
"$KYB" --version
nvidia-smi --query-gpu=name,driver_version,memory.used --format=csv,noheader || true

now() { date +%s.%N; }
rss() { awk '/^VmRSS:/ {print $2 * 1024}' "/proc/$PID/status"; }
lines=1
printf 'run,checkpoint_s,restore_s,rss_before,rss_checkpointed,checksum_ok\n' >"$WORK/runs.csv"
for run in $(seq "$RUNS"); do
    [ "$("$KYB" cuda-checkpoint --get-state --pid "$PID")" = running ]
    before=$(rss)
    t0=$(now)
    "$KYB" cuda-checkpoint --toggle --pid "$PID"
    t1=$(now)
    [ "$("$KYB" cuda-checkpoint --get-state --pid "$PID")" = checkpointed ]
    during=$(rss)
    t2=$(now)
    "$KYB" cuda-checkpoint --toggle --pid "$PID"
    t3=$(now)
    [ "$("$KYB" cuda-checkpoint --get-state --pid "$PID")" = running ]
    echo check >&3
    lines=$((lines + 1))
    for _ in $(seq 600); do [ "$(wc -l <"$WORK/out")" -ge "$lines" ] && break; sleep 0.1; done
    got=$(json "$(sed -n "${lines}p" "$WORK/out")" checksum)
    ok=$([ "$got" = "$SUM" ] && echo yes || echo no)
    printf '%s,%s,%s,%s,%s,%s\n' "$run" "$(awk -v a="$t0" -v b="$t1" 'BEGIN { print b - a }')" "$(awk -v a="$t2" -v b="$t3" 'BEGIN { print b - a }')" "$before" "$during" "$ok" \
        | tee -a "$WORK/runs.csv"
    [ "$ok" = yes ] || { echo "checksum changed: $got != $SUM" >&2; exit 1; }
done
mkdir -p target/bench-gpu
cp "$WORK/runs.csv" target/bench-gpu/runs.csv
printf '%s\n' "$first" >target/bench-gpu/holder.json
echo "per-run figures in target/bench-gpu/runs.csv"
