#!/usr/bin/env bash
# Exit latency of a container without a PID namespace of its own, containerd-shim-kybernate-v1
# against the stock containerd-shim-runc-v2, in one run on one private containerd
# (docs/benchmarks.md has the figures and how to read them).
#   `ctr run --rm --with-ns pid:<holder's> IMAGE id sh -c 'sleep 6011 & exit 0'`: init exits at once
#   while its child holds stdout; ctr returns once the exit is reported and the task deleted. Both
#   shims kill the child when init exits (containerd's ShouldKillAllOnExit); without that, the exit
#   waits for the output drain to give up (2 s in ours).
#   Control: the same command in a PID namespace of its own (the child dies with init).
# hyperfine in rounds of rotated order (as test/bench/shim.sh), medians and ratios.
# Usage (root, after test/setup.sh): bash test/bench/shared_pid_exit.sh [RUNS]
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
RUNS=${1:-30}
OUT=${BENCH_OUT:-target/bench-shared-pid}
mkdir -p "$OUT"

# shellcheck source=test/bench/build.sh
. test/bench/build.sh
bench_build_bins
TB_PATH_PREPEND=$PWD/target/release
export TB_PATH_PREPEND
# shellcheck source=test/lib/testbed.sh
. test/lib/testbed.sh
tb_start
tb_import_image
CTR="ctr --address $TB_ADDRESS --namespace $TB_NS"
RUNTIMES=(runc-v2=io.containerd.runc.v2 kybernate=io.containerd.kybernate.v1)

echo "== machine: $(nproc) cores, $(uname -r), containerd $(containerd --version | awk '{print $3}'), runc $(runc --version | awk 'NR==1{print $3}')"

# The PID namespace the measured containers join (a pod's shared one, in Kubernetes terms). Its
# init (sleep) reaps nothing: the killed children stay zombies until the holder goes.
holder=holder-$$
$CTR run -d --runtime io.containerd.runc.v2 "$KBT_IMAGE" "$holder" sleep 100000 >/dev/null
holder_pid=$($CTR tasks ls | awk -v id="$holder" '$1==id {print $2}')
[ -n "$holder_pid" ] && [ "$holder_pid" != 0 ] || { echo "no pid for $holder" >&2; exit 1; }

echo "== exit of init leaving a child on stdout: ctr run --rm ... sh -c 'sleep 6011 & exit 0' ($RUNS runs each)"
rounds=$(((RUNS + 4) / 5))
rm -f "$OUT"/exit-*.json
for ((round = 0; round < rounds; round++)); do
    cmds=()
    for ((k = 0; k < ${#RUNTIMES[@]}; k++)); do
        r=${RUNTIMES[$(((k + round) % ${#RUNTIMES[@]}))]}
        run="$CTR run --rm --runtime ${r#*=}"
        cmds+=(-n "shared ${r%%=*}" "$run --with-ns pid:/proc/$holder_pid/ns/pid $KBT_IMAGE s-\$RANDOM\$RANDOM sh -c 'sleep 6011 & exit 0'")
        cmds+=(-n "own ${r%%=*}" "$run $KBT_IMAGE o-\$RANDOM\$RANDOM sh -c 'sleep 6011 & exit 0'")
    done
    hyperfine --shell=bash --warmup 1 --runs 5 --style none --export-json "$OUT/exit-$round.json" "${cmds[@]}" >/dev/null
done
python3 - "$OUT" "${RUNTIMES[@]%%=*}" <<'PY'
import glob, json, statistics, sys
out, names = sys.argv[1], sys.argv[2:]
times = {}
for f in glob.glob(f"{out}/exit-*.json"):
    for r in json.load(open(f))["results"]:
        times.setdefault(r["command"], []).extend(r["times"])
for ns in ("shared", "own"):
    base = statistics.median(times[f"{ns} {names[0]}"])
    label = "shared PID namespace" if ns == "shared" else "own PID namespace (control)"
    print(f"   {label}:")
    for n in names:
        t = times[f"{ns} {n}"]
        m = statistics.median(t)
        print(f"     {n:<12} median {m * 1000:7.1f} ms, max {max(t) * 1000:7.1f} ms of {len(t)} runs, "
              f"ratio to {names[0]} {m / base:.2f}x")
PY
# Nothing may be left running in the shared namespace: each run's child was killed.
left=$(pgrep -x -f 'sleep 6011' || true)
[ -z "$left" ] || { echo "children left running: $left" >&2; exit 1; }
