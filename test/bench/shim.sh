#!/usr/bin/env bash
# Side-by-side benchmark of containerd-shim-kybernate-v1 against the stock containerd-shim-runc-v2,
# in one run on one private containerd (docs/benchmarks.md has the figures and how to read them).
#   1. lifecycle: `ctr run --rm IMAGE id true`, hyperfine in rounds of rotated order, medians and ratios
#   2. a shim holding one sleeping container: RSS and threads
#   3. throughput: N containers (default 1000) at concurrency 4, tasks/s and failures
# Usage (root, after test/setup.sh): bash test/bench/shim.sh [RUNS] [N]   (N=0 skips 3.)
#   KBT_BENCH_CONTAINERD=2   run under the containerd 2.x that setup.sh unpacks (with its own Go shim)
#                            instead of the system's 1.6, and add rust-extensions' Rust runc shim
#                            (crate containerd-runc-shim 0.2.0, task API v3, so 2.x only), built
#                            from crates.io with our release profile into target/bench-tools.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
RUNS=${1:-30}
N=${2:-1000}
OUT=${BENCH_OUT:-target/bench-shim}
mkdir -p "$OUT"

# shellcheck source=test/bench/build.sh
. test/bench/build.sh
bench_build_bins
# shellcheck source=test/lib/common.sh
. test/lib/common.sh
TB_PATH_PREPEND=$PWD/target/release
# name=runtime type, in the order they are reported; ratios are against the first.
RUNTIMES=(runc-v2=io.containerd.runc.v2 kybernate=io.containerd.kybernate.v1)
if [ "${KBT_BENCH_CONTAINERD:-}" = 2 ]; then
    cd2=$KBT_CONTAINERD_BASE-2/usr/bin
    [ -x "$cd2/containerd" ] || { echo "no $cd2/containerd: run test/setup.sh first" >&2; exit 1; }
    tools=$PWD/target/bench-tools
    if [ ! -x "$tools/bin/containerd-shim-runc-v2-rs" ]; then
        echo "== building containerd-runc-shim 0.2.0 (rust-extensions) with our release profile"
        CARGO_PROFILE_RELEASE_OPT_LEVEL=s CARGO_PROFILE_RELEASE_LTO=fat CARGO_PROFILE_RELEASE_CODEGEN_UNITS=1 \
            CARGO_PROFILE_RELEASE_STRIP=true \
            cargo install -q --locked --root "$tools" containerd-runc-shim --version 0.2.0
    fi
    TB_PATH_PREPEND=$cd2:$tools/bin:$TB_PATH_PREPEND
    PATH=$cd2:$PATH # ctr and `containerd --version` below
    RUNTIMES=(runc-v2=io.containerd.runc.v2 rust-runc-v2=io.containerd.runc.v2-rs kybernate=io.containerd.kybernate.v1)
fi
export TB_PATH_PREPEND
# shellcheck source=test/lib/testbed.sh
. test/lib/testbed.sh
tb_start
tb_import_image
CTR="ctr --address $TB_ADDRESS --namespace $TB_NS"

echo "== machine: $(nproc) cores, $(uname -r), containerd $(containerd --version | awk '{print $3}'), runc $(runc --version | awk 'NR==1{print $3}')"

echo "== 1. lifecycle: ctr run --rm IMAGE id true ($RUNS runs each)"
# hyperfine runs one command's runs back to back, and on these machines the later ones drift by
# more than the shims differ; so: rounds of 5 runs each, the order rotated every round.
rounds=$(((RUNS + 4) / 5))
rm -f "$OUT"/lifecycle-*.json
for ((round = 0; round < rounds; round++)); do
    cmds=()
    for ((k = 0; k < ${#RUNTIMES[@]}; k++)); do
        r=${RUNTIMES[$(((k + round) % ${#RUNTIMES[@]}))]}
        cmds+=(-n "${r%%=*}" "$CTR run --rm --runtime ${r#*=} $KBT_IMAGE b-\$RANDOM\$RANDOM true")
    done
    hyperfine --shell=bash --warmup 2 --runs 5 --style none --export-json "$OUT/lifecycle-$round.json" "${cmds[@]}" >/dev/null
done
python3 - "$OUT" "${RUNTIMES[@]%%=*}" <<'PY'
import glob, json, statistics, sys
out, names = sys.argv[1], sys.argv[2:]
times = {}
for f in glob.glob(f"{out}/lifecycle-*.json"):
    for r in json.load(open(f))["results"]:
        times.setdefault(r["command"], []).extend(r["times"])
base = statistics.median(times[names[0]])
for n in names:
    m = statistics.median(times[n])
    print(f"   {n:<14} median {m * 1000:6.1f} ms of {len(times[n])} runs, ratio to {names[0]} {m / base:.2f}x")
PY

echo "== 2. a shim holding one sleeping container"
shim_of() { # ctr's task pid -> its parent = the shim
    local pid; pid=$($CTR tasks ls | awk -v id="$1" '$1==id {print $2}')
    awk '/^PPid:/ {print $2}' "/proc/$pid/status"
}
for r in "${RUNTIMES[@]}"; do
    rt=${r#*=}
    id=mem-${r%%=*}-$$
    $CTR run -d --runtime "$rt" "$KBT_IMAGE" "$id" sleep 1000 >/dev/null
    sleep 1
    spid=$(shim_of "$id")
    # RSS counts the shim's text pages, which every shim on a node shares; PSS splits shared
    # pages among their users; anonymous RSS is what each further pod really adds.
    printf '   %-14s shim pid %-7s RSS %s MiB, PSS %s MiB, anon %s MiB, %s threads, binary %s MB\n' "${r%%=*}" "$spid" \
        "$(awk '/^VmRSS:/ {printf "%.1f", $2/1024}' "/proc/$spid/status")" \
        "$(awk '/^Pss:/ {printf "%.1f", $2/1024}' "/proc/$spid/smaps_rollup")" \
        "$(awk '/^RssAnon:/ {printf "%.1f", $2/1024}' "/proc/$spid/status")" \
        "$(awk '/^Threads:/ {print $2}' "/proc/$spid/status")" \
        "$(stat -L -c %s "/proc/$spid/exe" | awk '{printf "%.1f", $1/1e6}')"
    $CTR tasks kill -s SIGKILL "$id" >/dev/null; sleep 0.5
    $CTR tasks delete "$id" >/dev/null 2>&1 || true; $CTR containers delete "$id" >/dev/null
done

[ "$N" -gt 0 ] || exit 0
echo "== 3. throughput: $N containers (ctr run --rm ... true) at concurrency 4"
for r in "${RUNTIMES[@]}"; do
    rt=${r#*=}
    start=$(date +%s.%N)
    seq "$N" | xargs -P4 -I{} sh -c "$CTR run --rm --runtime $rt $KBT_IMAGE t-{}-\$\$ true >/dev/null 2>&1 || echo FAIL" > "$OUT/tp-${r%%=*}.log" || true
    end=$(date +%s.%N)
    fails=$(grep -c FAIL "$OUT/tp-${r%%=*}.log" || true)
    python3 -c "import sys; n,s,e,f=int(sys.argv[1]),float(sys.argv[2]),float(sys.argv[3]),int(sys.argv[4]); print(f'   {sys.argv[5]:<14} {n/(e-s):.1f} tasks/s ({e-s:.1f} s), failures {f}')" "$N" "$start" "$end" "$fails" "${r%%=*}"
done
