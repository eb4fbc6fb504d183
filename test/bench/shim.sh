#!/usr/bin/env bash
# Side-by-side benchmark of containerd-shim-kybernate-v1 against the stock containerd-shim-runc-v2,
# in one run on one private containerd (docs/benchmarks.md has the figures and how to read them).
#   1. lifecycle: `ctr run --rm IMAGE id true`, hyperfine, medians and their ratio
#   2. a shim holding one sleeping container: RSS and threads
#   3. throughput: N containers (default 1000) at concurrency 4, tasks/s and failures
# Usage (root, after test/setup.sh): bash test/bench/shim.sh [RUNS] [N]   (N=0 skips 3.)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
RUNS=${1:-30}
N=${2:-1000}
OUT=${BENCH_OUT:-target/bench-shim}
mkdir -p "$OUT"

command -v cargo >/dev/null || export PATH="$HOME/.cargo/bin:$PATH"
cargo build --release -q -p containerd-shim-kybernate-v1
TB_PATH_PREPEND=$PWD/target/release
export TB_PATH_PREPEND
# shellcheck source=test/lib/testbed.sh
. test/lib/testbed.sh
tb_start
tb_import_image
CTR="ctr --address $TB_ADDRESS --namespace $TB_NS"
OURS=io.containerd.kybernate.v1
STOCK=io.containerd.runc.v2

echo "== machine: $(nproc) cores, $(uname -r), containerd $(containerd --version | awk '{print $3}'), runc $(runc --version | awk 'NR==1{print $3}')"

echo "== 1. lifecycle: ctr run --rm IMAGE id true ($RUNS runs each, one after the other)"
hyperfine --shell=bash --warmup 3 --runs "$RUNS" --export-json "$OUT/lifecycle.json" \
    -n runc-v2 "$CTR run --rm --runtime $STOCK $KBT_IMAGE b-\$RANDOM\$RANDOM true" \
    -n kybernate "$CTR run --rm --runtime $OURS $KBT_IMAGE b-\$RANDOM\$RANDOM true"
python3 - "$OUT/lifecycle.json" <<'PY'
import json, statistics, sys
r = {x["command"]: statistics.median(x["times"]) * 1000 for x in json.load(open(sys.argv[1]))["results"]}
print(f"   median runc-v2 {r['runc-v2']:.1f} ms, kybernate {r['kybernate']:.1f} ms, ratio {r['kybernate'] / r['runc-v2']:.2f}x")
PY

echo "== 2. a shim holding one sleeping container"
shim_of() { # ctr's task pid -> its parent = the shim
    local pid; pid=$($CTR tasks ls | awk -v id="$1" '$1==id {print $2}')
    awk '/^PPid:/ {print $2}' "/proc/$pid/status"
}
for rt in $STOCK $OURS; do
    id=mem-${rt##*.}-$$
    $CTR run -d --runtime "$rt" "$KBT_IMAGE" "$id" sleep 1000 >/dev/null
    sleep 1
    spid=$(shim_of "$id")
    # RSS counts the shim's text pages, which every shim on a node shares; PSS splits shared
    # pages among their users; anonymous RSS is what each further pod really adds.
    printf '   %-26s shim pid %-7s RSS %s MiB, PSS %s MiB, anon %s MiB, %s threads\n' "$rt" "$spid" \
        "$(awk '/^VmRSS:/ {printf "%.1f", $2/1024}' "/proc/$spid/status")" \
        "$(awk '/^Pss:/ {printf "%.1f", $2/1024}' "/proc/$spid/smaps_rollup")" \
        "$(awk '/^RssAnon:/ {printf "%.1f", $2/1024}' "/proc/$spid/status")" \
        "$(awk '/^Threads:/ {print $2}' "/proc/$spid/status")"
    $CTR tasks kill -s SIGKILL "$id" >/dev/null; sleep 0.5
    $CTR tasks delete "$id" >/dev/null; $CTR containers delete "$id" >/dev/null
done

[ "$N" -gt 0 ] || exit 0
echo "== 3. throughput: $N containers (ctr run --rm ... true) at concurrency 4"
for rt in $STOCK $OURS; do
    start=$(date +%s.%N)
    seq "$N" | xargs -P4 -I{} sh -c "$CTR run --rm --runtime $rt $KBT_IMAGE t-{}-\$\$ true >/dev/null 2>&1 || echo FAIL" > "$OUT/tp-${rt##*.}.log" || true
    end=$(date +%s.%N)
    fails=$(grep -c FAIL "$OUT/tp-${rt##*.}.log" || true)
    python3 -c "import sys; n,s,e,f=int(sys.argv[1]),float(sys.argv[2]),float(sys.argv[3]),int(sys.argv[4]); print(f'   {sys.argv[5]:<26} {n/(e-s):.1f} tasks/s ({e-s:.1f} s), failures {f}')" "$N" "$start" "$end" "$fails" "$rt"
done
