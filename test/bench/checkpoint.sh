#!/usr/bin/env bash
# Checkpoint + restore round trip of a container holding dirty anonymous memory (test/bench/memhog.c),
# through containerd-shim-kybernate-v1 against raw `runc checkpoint` / `runc restore` on an
# equivalent bundle, in one run, runs interleaved (odd runs ours first, even runs runc first).
#   ours: Task.Checkpoint --exit straight to the shim (target/release/examples/checkpoint_rpc) into the
#         store, then `ctr run -d --annotation kybernate.io/restore-from=DIR` (ctr returns after Start,
#         i.e. after the restore; so this includes creating the container and starting its shim).
#   runc: `runc checkpoint` (exits the container), then `runc restore -d` of the same id and bundle.
# Ours also fsyncs and hashes every file (manifest) and verifies the hashes before restoring; runc
# does neither: that overhead is part of what is measured. A `dd` to the store's filesystem (with and
# without conv=fdatasync) gives the disk's sequential write speed for scale.
# Before that, each run also takes a leave-running checkpoint of the same program (ours: Task.Checkpoint
# without exit, runc: `runc checkpoint --leave-running`), to set the frozen time our shim journals
# (frozen_ms of the attempt in <store>/.journal/attempts.jsonl) beside raw runc's frozen time. Like for
# like, runc's frozen time is CRIU's own: freezing + frozen time from the stats-dump CRIU leaves in runc's
# work dir (read by target/release/examples/dump_stats); runc's wall time would add runc's and CRIU's
# start-up and everything after the thaw. Our checkpoint's stats-dump (CRIU's times inside our dump) and
# the manifest's frozen_ms are recorded too.
# The shim's peak RSS (VmHWM of the shim serving the container, read right after each operation; the
# shim is per container, so the checkpoint's and the restore's shims are two processes) is reported too.
# Usage (root, after test/setup.sh): bash test/bench/checkpoint.sh [RUNS] [SIZES]
#   RUNS default 5; SIZES in MiB, default "256 1024". Raw numbers: ${BENCH_OUT:-target/bench-checkpoint}.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
RUNS=${1:-5}
SIZES=${2:-256 1024}
OUT=${BENCH_OUT:-target/bench-checkpoint}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
# On disk (not tmpfs), like a node's checkpoint store; per run so that two runs never collide.
BASE=/var/lib/kybernate-bench/$$
STORE=$BASE/store RAW=$BASE/runc RROOT=$BASE/runc-root CGROUP=kybernate-bench-$$
export PATH=/usr/local/sbin:$PATH # the CRIU wrapper, for the raw runc too

bench_cleanup() { # EXIT trap, before tb_cleanup: raw runc containers, their cgroups, the store, dd file
    local rc=$? id d
    set +e
    if [ -d "$RROOT" ]; then
        for id in $(runc --root "$RROOT" list -q 2>/dev/null); do
            runc --root "$RROOT" delete --force "$id" >/dev/null 2>&1
        done
    fi
    for d in /sys/fs/cgroup/*/"$CGROUP"; do
        [ -d "$d" ] && find "$d" -depth -type d -exec rmdir {} + 2>/dev/null
    done
    rm -rf "$BASE"
    rmdir /var/lib/kybernate-bench 2>/dev/null
    return "$rc"
}
trap bench_cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# shellcheck source=test/bench/build.sh
. test/bench/build.sh
bench_build_bins
bench_build_examples checkpoint_rpc dump_stats
DUMP_STATS=$PWD/target/release/examples/dump_stats
gcc -O2 -static -o "$OUT/memhog" test/bench/memhog.c
MEMHOG=$OUT/memhog
RPC=$PWD/target/release/examples/checkpoint_rpc
mkdir -p "$STORE" "$RAW" "$RROOT"
printf '[checkpoint]\nroot = "%s"\n' "$STORE" >"$BASE/kybernate.toml"
export KYBERNATE_CONFIG=$BASE/kybernate.toml # containerd passes its environment on to the shims
TB_PATH_PREPEND=$PWD/target/release
export TB_PATH_PREPEND
# shellcheck source=test/lib/testbed.sh
. test/lib/testbed.sh
tb_start
trap 'bench_cleanup; tb_cleanup' EXIT
tb_import_image
OURS=io.containerd.kybernate.v1
TASKS=$TB_DIR/state/io.containerd.runtime.v2.task/$TB_NS

echo "== machine: $(nproc) cores, $(free -g | awk '/^Mem:/ {print $2}') GiB, $(uname -r), containerd $(containerd --version | awk '{print $3}'), runc $(runc --version | awk 'NR==1{print $3}'), criu $(criu --version | awk '/^Version/ {print $2}')"
echo "== store: $STORE on $(findmnt -no SOURCE,FSTYPE -T "$BASE" | tr -s ' ')"

# The raw bundle: busybox-static rootfs (writable, like the image's overlay) + `runc spec`, one per size.
mkdir -p "$RAW/rootfs/bin" "$RAW/rootfs/tmp" "$RAW/rootfs/proc" "$RAW/rootfs/sys" "$RAW/rootfs/dev"
cp /bin/busybox "$RAW/rootfs/bin/"
for a in $(/bin/busybox --list); do [ -e "$RAW/rootfs/bin/$a" ] || ln -s busybox "$RAW/rootfs/bin/$a"; done
(cd "$RAW" && runc spec)
for mib in $SIZES; do
    mkdir -p "$RAW/b-$mib"
    python3 - "$RAW/config.json" "$RAW/b-$mib/config.json" "$RAW/rootfs" "$MEMHOG" "$mib" "/$CGROUP/raw-$mib" <<'PY'
import json, sys
src, dst, rootfs, memhog, mib, cgroup = sys.argv[1:]
s = json.load(open(src))
s["process"]["args"] = ["/memhog", mib, "/tmp/ready"]
s["process"]["terminal"] = False
s["root"] = {"path": rootfs, "readonly": False}
s["mounts"].append({"destination": "/memhog", "type": "bind", "source": memhog, "options": ["rbind", "ro"]})
s["linux"]["cgroupsPath"] = cgroup
json.dump(s, open(dst, "w"), indent=2)
PY
done

# KBT_BENCH_COLD=1: the checkpoint's files are evicted from the page cache before each restore (both sides), as
# on a node that restores a checkpoint taken long ago or elsewhere: then both restores read the images from disk.
evict() { # DIR: drops DIR's files from the page cache (after a sync), binaries and everything else stay cached
    [ "${KBT_BENCH_COLD:-0}" = 1 ] || return 0
    python3 - "$1" <<'PY'
import os, sys
for root, _, files in os.walk(sys.argv[1]):
    for name in files:
        fd = os.open(os.path.join(root, name), os.O_RDONLY | os.O_NOFOLLOW)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
PY
}
now() { date +%s%N; }
ms() { local d=$(($2 - $1)); printf '%d.%03d' $((d / 1000000)) $((d / 1000 % 1000)); }
wait_for() { # DESCRIPTION COMMAND...: polls COMMAND for 120 s
    local deadline=$((SECONDS + 120))
    until "${@:2}"; do
        [ "$SECONDS" -lt "$deadline" ] || { echo "timed out waiting for $1" >&2; return 1; }
        sleep 0.02
    done
}
task_status() { tb_ctr tasks ls | awk -v id="$1" '$1 == id {print $3}'; }
not_running() { [ "$(task_status "$1")" != RUNNING ]; }
log_ns() { # ID MESSAGE: the shim's timestamp (ns) on its last log line "container ID: MESSAGE", if any
    local t
    t=$(grep -F "msg=\"container $1: $2" "$TB_LOG" | tail -n 1 | sed -n 's/^time="\([^"]*\)".*/\1/p') || true
    [ -z "$t" ] || date +%s%N -d "$t"
}
ctr_delete() { # tb_ctr tasks delete ARGS..., without ctr's warning about the exit code (137: killed)
    tb_ctr tasks delete "$@" 2>&1 >/dev/null | { grep -v 'exit with non-zero exit code' || true; } >&2
}
rss_mib() { awk '/^RssAnon:/ {printf "%.0f", $2 / 1024}' "/proc/$1/status"; }
hwm_mib() { awk '/^VmHWM:/ {printf "%.1f", $2 / 1024}' "/proc/$1/status"; } # a process's peak RSS
shim_pid() { # ID: the pid of the shim serving container ID, from its start-up log line
    grep -F "msg=\"shim $1 started for namespace $TB_NS (pid " "$TB_LOG" | tail -n 1 | sed -n 's/.*(pid \([0-9]*\)).*/\1/p'
}
last_frozen_ms() { # frozen_ms of the journal's last successful checkpoint attempt, empty if none
    python3 - "$STORE/.journal/attempts.jsonl" <<'PY'
import json, sys
a = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
a = [x for x in a if x.get("kind") == "checkpoint" and x.get("result") == "ok"]
print(a[-1].get("frozen_ms", "") if a else "")
PY
}
criu_stats_ms() { # STATS_DUMP: CRIU's "freezing,frozen,memdump,memwrite" times in ms, or ",,," without a readable file
    local json
    if json=$("$DUMP_STATS" "$1"); then
        python3 -c 'import json, sys; d = json.loads(sys.argv[1])["dump"] or {}
print(",".join("%.3f" % (d[k] / 1000) if k in d else "" for k in ("freezing_us", "frozen_us", "memdump_us", "memwrite_us")))' "$json"
    else
        echo ",,,"
    fi
}
manifest_field() { # MANIFEST FIELD: a top-level field of a manifest, empty when absent
    python3 -c 'import json, sys; v = json.load(open(sys.argv[1])).get(sys.argv[2]); print("" if v is None else v)' "$1" "$2"
}
CSV=$OUT/runs.csv DDCSV=$OUT/dd.csv
# lr_criu_*: CRIU's own times of the leave-running dump (stats-dump); manifest_frozen_ms: ours, as the manifest records it.
echo "size_mib,impl,run,start_ms,checkpoint_ms,restore_ms,image_bytes,restored_rss_mib,dump_ms,restore_pre_ms,lr_ms,frozen_ms,shim_idle_hwm_mib,shim_lr_hwm_mib,shim_ckpt_hwm_mib,shim_restore_hwm_mib,lr_criu_freezing_ms,lr_criu_frozen_ms,lr_criu_memdump_ms,lr_criu_memwrite_ms,manifest_frozen_ms" >"$CSV"
echo "size_mib,run,fdatasync_ms,cache_ms" >"$DDCSV"

run_ours() { # MIB RUN
    local mib=$1 run=$2 id=c-$1-$2 rid=r-$1-$2 t0 t1 t2 t3 t4 t5 t6 dir pid rss dump pre= spid lr0 lr1 frozen
    local hwm0 hwm1 hwm2 hwm3 lrcriu mfrozen
    local mount="type=bind,src=$MEMHOG,dst=/memhog,options=rbind:ro"
    dir=$STORE/$TB_NS/$id/$run
    t0=$(now)
    tb_ctr run -d --runtime "$OURS" --mount "$mount" "$KBT_IMAGE" "$id" /memhog "$mib" /tmp/ready >/dev/null
    t1=$(now)
    wait_for "$id ready" test -e "$TASKS/$id/rootfs/tmp/ready"
    spid=$(shim_pid "$id")
    hwm0=$(hwm_mib "$spid")
    sync
    lr0=$(now)
    "$RPC" "$(cat "$TASKS/$id/address")" "$id" "$dir-lr" # leave-running: for the frozen time
    lr1=$(now)
    hwm1=$(hwm_mib "$spid")
    frozen=$(last_frozen_ms)
    lrcriu=$(criu_stats_ms "$dir-lr/stats-dump")
    mfrozen=$(manifest_field "$dir-lr/kybernate.json" frozen_ms)
    rm -rf "$dir-lr"
    sync
    t2=$(now)
    "$RPC" "$(cat "$TASKS/$id/address")" "$id" "$dir" --exit
    t3=$(now)
    hwm2=$(hwm_mib "$spid")
    wait_for "$id to stop" not_running "$id"
    ctr_delete "$id"
    tb_ctr containers delete "$id"
    sync
    evict "$dir"
    t4=$(now)
    tb_ctr run -d --runtime "$OURS" --mount "$mount" --annotation "kybernate.io/restore-from=$dir" \
        "$KBT_IMAGE" "$rid" /memhog "$mib" /tmp/ready >/dev/null
    t5=$(now)
    hwm3=$(hwm_mib "$(shim_pid "$rid")")
    pid=$(tb_ctr tasks ls | awk -v id="$rid" '$1 == id {print $2}')
    rss=$(rss_mib "$pid")
    dump=$(python3 -c 'import json, sys; print(json.load(open(sys.argv[1])).get("duration_ms", ""))' "$dir/kybernate.json")
    t6=$(log_ns "$rid" "restoring from") # create, shim start, hash check: until `runc restore`
    [ -z "$t6" ] || pre=$(ms "$t4" "$t6")
    echo "$mib,ours,$run,$(ms "$t0" "$t1"),$(ms "$t2" "$t3"),$(ms "$t4" "$t5"),$(du -sb "$dir" | cut -f1),$rss,$dump,$pre,$(ms "$lr0" "$lr1"),$frozen,$hwm0,$hwm1,$hwm2,$hwm3,$lrcriu,$mfrozen" >>"$CSV"
    ctr_delete --force "$rid"
    tb_ctr containers delete "$rid"
    rm -rf "${dir%/*}"
}

run_runc() { # MIB RUN
    local mib=$1 run=$2 id=raw-$1 t0 t1 t2 t3 t4 t5 img=$RAW/img-$1 pid rss lr0 lr1 lrcriu
    local r=(runc --root "$RROOT")
    rm -f "$RAW/rootfs/tmp/ready"
    t0=$(now)
    "${r[@]}" run -d --bundle "$RAW/b-$mib" "$id" </dev/null >/dev/null 2>&1
    t1=$(now)
    wait_for "$id ready" test -e "$RAW/rootfs/tmp/ready"
    sync
    lr0=$(now)
    "${r[@]}" checkpoint --leave-running --image-path "$img-lr" --work-path "$RAW/work-lr-$mib" "$id"
    lr1=$(now)
    lrcriu=$(criu_stats_ms "$RAW/work-lr-$mib/stats-dump") # CRIU writes it into runc's --work-path
    rm -rf "$img-lr" "$RAW/work-lr-$mib"
    sync
    t2=$(now)
    "${r[@]}" checkpoint --image-path "$img" --work-path "$RAW/work-d-$mib" "$id"
    t3=$(now)
    "${r[@]}" delete "$id" >/dev/null 2>&1 || true
    sync
    evict "$img"
    t4=$(now)
    "${r[@]}" restore -d --image-path "$img" --work-path "$RAW/work-r-$mib" --bundle "$RAW/b-$mib" "$id" \
        </dev/null >/dev/null 2>&1
    t5=$(now)
    pid=$("${r[@]}" state "$id" | python3 -c 'import json, sys; print(json.load(sys.stdin)["pid"])')
    rss=$(rss_mib "$pid")
    echo "$mib,runc,$run,$(ms "$t0" "$t1"),$(ms "$t2" "$t3"),$(ms "$t4" "$t5"),$(du -sb "$img" | cut -f1),$rss,,,$(ms "$lr0" "$lr1"),,,,,,$lrcriu," >>"$CSV"
    "${r[@]}" delete --force "$id" # SIGKILL, wait for it to go, delete
    rm -rf "$img" "$RAW/work-d-$mib" "$RAW/work-r-$mib"
}

run_dd() { # MIB RUN: sequential write to the store's filesystem, synced and page cache only
    local mib=$1 run=$2 t0 t1 t2 t3 f=$BASE/dd.tmp
    sync
    t0=$(now)
    dd if=/dev/zero of="$f" bs=1M count="$mib" conv=fdatasync status=none
    t1=$(now)
    rm -f "$f"
    sync
    t2=$(now)
    dd if=/dev/zero of="$f" bs=1M count="$mib" status=none
    t3=$(now)
    rm -f "$f"
    echo "$mib,$run,$(ms "$t0" "$t1"),$(ms "$t2" "$t3")" >>"$DDCSV"
}

echo "== checkpoint + restore, sizes (MiB) $SIZES, $RUNS runs each, interleaved"
for ((run = 1; run <= RUNS; run++)); do
    for mib in $SIZES; do
        order="ours runc"
        [ $((run % 2)) = 1 ] || order="runc ours"
        for impl in $order; do
            "run_$impl" "$mib" "$run"
            tail -n 1 "$CSV" | awk -F, '{printf "   run %s %5s MiB %-4s checkpoint %8s ms  restore %8s ms  (start %s ms, restored RSS %s MiB; leave-running %s ms, frozen %s ms, CRIU freezing+frozen %s ms, shim VmHWM checkpoint %s / restore %s MiB)\n", $3, $1, $2, $5, $6, $4, $8, $11, ($12 == "" ? "-" : $12), ($18 == "" ? "-" : $17 + $18), ($15 == "" ? "-" : $15), ($16 == "" ? "-" : $16)}'
        done
        run_dd "$mib" "$run"
    done
done

cp "$TB_LOG" "$OUT/containerd.log" # the shims' timestamped lines, for a breakdown of any run
echo "== medians (ratio = ours / runc; throughput = MiB / checkpoint s)"
python3 - "$CSV" "$DDCSV" <<'PY'
import csv, statistics as st, sys
runs = list(csv.DictReader(open(sys.argv[1])))
dd = list(csv.DictReader(open(sys.argv[2])))
def med(rows, f): return st.median(float(r[f]) for r in rows)
for mib in dict.fromkeys(r["size_mib"] for r in runs):
    m = {}
    for impl in ("ours", "runc"):
        rows = [r for r in runs if r["size_mib"] == mib and r["impl"] == impl]
        for r in rows: r["rt_ms"] = float(r["checkpoint_ms"]) + float(r["restore_ms"])
        m[impl] = {f: med(rows, f) for f in ("start_ms", "checkpoint_ms", "restore_ms", "rt_ms", "image_bytes", "lr_ms")}
        # CRIU's own times of the leave-running dump; "stopped": freezing + frozen.
        for r in rows:
            if r["lr_criu_frozen_ms"]: r["lr_criu_stopped_ms"] = float(r["lr_criu_freezing_ms"]) + float(r["lr_criu_frozen_ms"])
        for f in ("lr_criu_stopped_ms", "lr_criu_freezing_ms", "lr_criu_frozen_ms", "lr_criu_memdump_ms", "lr_criu_memwrite_ms"):
            m[impl][f] = med(rows, f) if all(r.get(f) for r in rows) else None
        if impl == "ours":
            m[impl]["dump_ms"] = med(rows, "dump_ms")
            m[impl]["frozen_ms"] = med(rows, "frozen_ms") if all(r["frozen_ms"] for r in rows) else None
            m[impl]["manifest_frozen_ms"] = med(rows, "manifest_frozen_ms") if all(r["manifest_frozen_ms"] for r in rows) else None
            for f in ("shim_idle_hwm_mib", "shim_lr_hwm_mib", "shim_ckpt_hwm_mib", "shim_restore_hwm_mib"):
                m[impl][f] = max(float(r[f]) for r in rows)
            m[impl]["pre_ms"] = med(rows, "restore_pre_ms") if all(r["restore_pre_ms"] for r in rows) else None
    o, r = m["ours"], m["runc"]
    d = [x for x in dd if x["size_mib"] == mib]
    sync_s, cache_s = med(d, "fdatasync_ms") / 1000, med(d, "cache_ms") / 1000
    print(f"-- {mib} MiB ({len([x for x in runs if x['size_mib'] == mib]) // 2} runs each)")
    print(f"   {'':14} {'ours':>10} {'runc':>10} {'ratio':>7}")
    for f, name in (("checkpoint_ms", "checkpoint"), ("restore_ms", "restore"), ("rt_ms", "round trip")):
        print(f"   {name + ' ms':14} {o[f]:10.1f} {r[f]:10.1f} {o[f] / r[f]:6.2f}x")
    n = float(mib)
    print(f"   {'ckpt MiB/s':14} {n / o['checkpoint_ms'] * 1000:10.0f} {n / r['checkpoint_ms'] * 1000:10.0f}")
    print(f"   {'image MiB':14} {o['image_bytes'] / 2**20:10.1f} {r['image_bytes'] / 2**20:10.1f}")
    print(f"   {'start ms':14} {o['start_ms']:10.1f} {r['start_ms']:10.1f}   (ctr run -d / runc run -d, for scale)")
    print(f"   ours: CRIU dump + spec/config/rootfs diff {o['dump_ms']:.0f} ms (manifest duration_ms), "
          f"hash + fsync + commit + RPC {o['checkpoint_ms'] - o['dump_ms']:.0f} ms")
    if o["pre_ms"] is not None: print(f"   ours: restore until the shim runs `runc restore` (ctr create, shim start, hash check) "
          f"{o['pre_ms']:.0f} ms, `runc restore` and after {o['restore_ms'] - o['pre_ms']:.0f} ms")
    print(f"   {'leave-run ms':14} {o['lr_ms']:10.1f} {r['lr_ms']:10.1f} {o['lr_ms'] / r['lr_ms']:6.2f}x   (whole checkpoint --leave-running)")
    rs = r["lr_criu_stopped_ms"]
    if o["frozen_ms"] is not None and rs is not None:
        print(f"   {'frozen ms':14} {o['frozen_ms']:10.1f} {rs:10.1f} {o['frozen_ms'] / rs:6.2f}x   "
              f"(ours: journal frozen_ms; runc: CRIU freezing+frozen time; target <= 1.05x)")
    if o["frozen_ms"] is not None:
        print(f"   {'frozen/lr wall':14} {o['frozen_ms']:10.1f} {r['lr_ms']:10.1f} {o['frozen_ms'] / r['lr_ms']:6.2f}x   "
              f"(ours: journal frozen_ms; runc: its whole checkpoint --leave-running, start-up included)")
    if o["lr_criu_stopped_ms"] is not None and rs is not None:
        print(f"   {'CRIU stop ms':14} {o['lr_criu_stopped_ms']:10.1f} {rs:10.1f} {o['lr_criu_stopped_ms'] / rs:6.2f}x   "
              f"(CRIU freezing+frozen inside each dump)")
        for f, name in (("lr_criu_memdump_ms", "CRIU memdump"), ("lr_criu_memwrite_ms", "CRIU memwrite")):
            if o[f] is not None and r[f] is not None:
                print(f"   {name + ' ms':14} {o[f]:10.1f} {r[f]:10.1f}")
    if o["manifest_frozen_ms"] is not None:
        print(f"   ours: frozen {o['manifest_frozen_ms']:.0f} ms as the manifest records it (frozen_ms)")
    print(f"   shim peak RSS (VmHWM, max over runs): {o['shim_idle_hwm_mib']:.1f} MiB idle, "
          f"{o['shim_lr_hwm_mib']:.1f} after leave-running, {o['shim_ckpt_hwm_mib']:.1f} after checkpoint --exit, "
          f"{o['shim_restore_hwm_mib']:.1f} MiB restore's shim after restore (target < 64)")
    print(f"   dd {mib} MiB to the store's fs: {n / sync_s:.0f} MiB/s with conv=fdatasync, {n / cache_s:.0f} MiB/s page cache")
PY
echo "== raw numbers: $CSV, $DDCSV; the shims' log: $OUT/containerd.log"
