#!/usr/bin/env bash
# What the credentials check of a restore costs (kybernate_checkpoint::grants: CRIU's metadata images of a
# checkpoint against the new container's spec, as the shim runs it at every restore's Create), on a
# checkpoint of PROCS processes holding MIB MiB of dirty memory in all, in one run against:
#   verify: the digest of every checkpoint file against the manifest, which every restore already does;
#   pages:  reading CRIU's memory pages once (`cat pages-*.img`), the floor of anything that reads them.
# The check reads only the small metadata images (process tree, cores, ids, mounts, seccomp, /dev's
# archive), so it must stay flat while the other two grow with the memory. All three read from the page
# cache (warm-up runs first). hyperfine, runs interleaved by hyperfine itself per command.
# Usage (root, after test/setup.sh): bash test/bench/restore_check.sh [RUNS] [PROCS] [MIB]
#   defaults 10 20 1024. Raw numbers: ${BENCH_OUT:-target/bench-restore-check}.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
RUNS=${1:-10}
PROCS=${2:-20}
MIB=${3:-1024}
[ "$PROCS" -ge 2 ] || { echo "PROCS must be at least 2 (a shell and its workers)" >&2; exit 2; }
OUT=${BENCH_OUT:-target/bench-restore-check}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
BASE=/var/lib/kybernate-bench/rc-$$
STORE=$BASE/store
export PATH=/usr/local/sbin:$PATH # the CRIU wrapper

bench_cleanup() { # EXIT trap, before tb_cleanup
    local rc=$?
    rm -rf "$BASE"
    rmdir /var/lib/kybernate-bench 2>/dev/null || true
    return "$rc"
}
trap bench_cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# shellcheck source=test/bench/build.sh
. test/bench/build.sh
bench_build_bins
bench_build_examples checkpoint_rpc restore_check
gcc -O2 -static -o "$OUT/memhog" test/bench/memhog.c
MEMHOG=$OUT/memhog
RPC=$PWD/target/release/examples/checkpoint_rpc
CHECK=$PWD/target/release/examples/restore_check
mkdir -p "$STORE"
printf '[checkpoint]\nroot = "%s"\n' "$STORE" >"$BASE/kybernate.toml"
export KYBERNATE_CONFIG=$BASE/kybernate.toml # containerd passes its environment on to the shims
TB_PATH_PREPEND=$PWD/target/release
export TB_PATH_PREPEND
# shellcheck source=test/lib/testbed.sh
. test/lib/testbed.sh
tb_start
trap 'bench_cleanup; tb_cleanup' EXIT
tb_import_image
TASKS=$TB_DIR/state/io.containerd.runtime.v2.task/$TB_NS

echo "== machine: $(nproc) cores, $(free -g | awk '/^Mem:/ {print $2}') GiB, $(uname -r), criu $(criu --version | awk '/^Version/ {print $2}'), hyperfine $(hyperfine --version | awk '{print $2}')"

# A shell and PROCS-1 workers, each dirtying its share of MIB (the shell is the PROCS-th process).
workers=$((PROCS - 1))
each=$(((MIB + workers - 1) / workers))
id=rc-$$
# shellcheck disable=SC2016 # expanded by the container's shell
tb_ctr run -d --runtime io.containerd.kybernate.v1 --mount "type=bind,src=$MEMHOG,dst=/memhog,options=rbind:ro" \
    "$KBT_IMAGE" "$id" sh -c 'i=0; while [ $i -lt '"$workers"' ]; do i=$((i+1)); /memhog '"$each"' /tmp/ready-$i & done; wait' >/dev/null
deadline=$((SECONDS + 300))
until [ "$(find "$TASKS/$id/rootfs/tmp" -name 'ready-*' 2>/dev/null | wc -l)" -ge "$workers" ]; do
    [ "$SECONDS" -lt "$deadline" ] || { echo "timed out waiting for $workers workers" >&2; exit 1; }
    sleep 0.1
done
dir=$STORE/$TB_NS/$id/cp
"$RPC" "$(cat "$TASKS/$id/address")" "$id" "$dir" --exit
cp "$TASKS/$id/config.json" "$OUT/spec.json" # the spec a restore of it into the same container would get
images=$dir/checkpoint
procs=$(python3 - "$images" <<'PY'
import os, sys
print(sum(1 for f in os.listdir(sys.argv[1]) if f.startswith("core-")))
PY
)
pages=$(du -cb "$images"/pages-*.img | tail -n 1 | cut -f1)
meta=$(find "$images" -type f ! -name 'pages-*.img' -printf '%s\n' | awk '{s += $1} END {print s}')
echo "== checkpoint: $procs threads' cores, pages $((pages / 1048576)) MiB, other images $((meta / 1024)) KiB, whole dir $(($(du -sb "$dir" | cut -f1) / 1048576)) MiB"
"$CHECK" check "$images" "$OUT/spec.json" # the verdict, once: it must be "allowed"

hyperfine -N --runs "$RUNS" --warmup 2 --export-json "$OUT/hyperfine.json" \
    -n check "$CHECK check $images $OUT/spec.json" \
    -n verify "$CHECK verify $dir" \
    -n pages "sh -c 'cat $images/pages-*.img >/dev/null'" >"$OUT/hyperfine.txt"
echo "== medians ($RUNS runs each, page cache warm)"
python3 - "$OUT/hyperfine.json" <<'PY'
import json, sys
r = {x["command"]: x for x in json.load(open(sys.argv[1]))["results"]}
check = r["check"]["median"]
for name in ("check", "verify", "pages"):
    m = r[name]["median"]
    print(f"   {name:8} {m * 1000:10.1f} ms   check / {name}: {check / m:7.4f}")
PY
tb_ctr tasks delete "$id" >/dev/null 2>&1 || true
tb_ctr containers delete "$id" >/dev/null 2>&1 || true
echo "== raw numbers: $OUT/hyperfine.json"
