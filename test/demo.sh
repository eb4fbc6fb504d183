#!/usr/bin/env bash
# The README demo: prepares the machine, builds Kybernate's shim, brings up a private containerd
# that finds it, and runs busybox containers through it (runtime io.containerd.kybernate.v1):
# a CPU container, which the shim runs with runc, and one that asks for GPUs, which it runs with
# the GPU runtime (a stand-in that logs its calls and execs runc, as no GPU exists here).
# Shows each container's output and the shim's runtime decision from its log; cleans up on exit.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

RUNTIME=io.containerd.kybernate.v1

bash test/setup.sh
command -v cargo >/dev/null || export PATH="$HOME/.cargo/bin:$PATH"
echo
echo "== building containerd-shim-kybernate-v1"
cargo build -q -p containerd-shim-kybernate-v1

# The GPU runtime stand-in: records its argv, then execs runc (nvidia-container-runtime would edit
# the spec first). It lives in a private dir that only the demo's containerd has on its PATH.
fake=$(mktemp -d /tmp/kybernate-demo.XXXXXX)
cat >"$fake/nvidia-container-runtime" <<EOS
#!/bin/sh
printf '%s\n' "\$*" >>"$fake/gpu-runtime-calls.log"
exec runc "\$@"
EOS
chmod 755 "$fake/nvidia-container-runtime"

TB_PATH_PREPEND=$PWD/target/debug:$fake
export TB_PATH_PREPEND
# shellcheck source=test/lib/testbed.sh
. test/lib/testbed.sh
trap 'rm -rf "$fake"' EXIT

echo "== starting a private containerd (shim found through its PATH)"
tb_start
trap 'tb_cleanup; rm -rf "$fake"' EXIT   # tb_start set its own trap; keep both
echo "   socket $TB_ADDRESS, namespace $TB_NS, log $TB_LOG"
tb_import_image

id=demo-cpu-$$
echo
echo "== ctr run --rm --runtime $RUNTIME $KBT_IMAGE $id sh -c ..."
# shellcheck disable=SC2016 # expanded by the container's shell
tb_ctr run --rm --runtime "$RUNTIME" "$KBT_IMAGE" "$id" sh -c '
    echo "hello from busybox: pid $$ in its own pid namespace"
    echo "root file system: $(ls /bin | wc -l) entries in /bin"'
echo "-- the shim's decision (from containerd's log):"
grep -o "container $id: runtime [^\"]*" "$TB_LOG" | sed 's/^/   /'

gid=demo-gpu-$$
echo
echo "== ctr run --rm --runtime $RUNTIME --env NVIDIA_VISIBLE_DEVICES=all $KBT_IMAGE $gid echo ..."
tb_ctr run --rm --runtime "$RUNTIME" --env NVIDIA_VISIBLE_DEVICES=all "$KBT_IMAGE" "$gid" \
    echo "hello from a container that asked for GPUs"
echo "-- the shim's decision (from containerd's log):"
grep -o "container $gid: runtime [^\"]*" "$TB_LOG" | sed 's/^/   /'
echo "-- calls the GPU runtime received:"
sed 's/^/   /' "$fake/gpu-runtime-calls.log"

cid=demo-counter-$$
ref=kybernate.demo/$cid:checkpoint
bundle=$TB_DIR/state/io.containerd.runtime.v2.task/$TB_NS/$cid
count() { cat "$bundle/rootfs/tmp/counter" 2>/dev/null || echo 0; }
echo
echo "== checkpoint and restore: a counter that writes 1, 2, 3, ... to /tmp/counter every 100 ms"
# shellcheck disable=SC2016 # expanded by the container's shell
tb_ctr run -d --runtime "$RUNTIME" "$KBT_IMAGE" "$cid" sh -c \
    'i=0; while true; do i=$((i+1)); echo $i > /tmp/counter.new; mv /tmp/counter.new /tmp/counter; usleep 100000; done'
sleep 1
echo "   counter is at $(count)"
echo "-- ctr containers checkpoint --task --rw $cid $ref   (the shim runs runc checkpoint, i.e. CRIU)"
tb_ctr containers checkpoint --task --rw "$cid" "$ref"
echo "   counter at checkpoint: $(count)"
echo "-- removing the container"
tb_ctr tasks kill -s SIGKILL "$cid"
for _ in $(seq 100); do tb_ctr tasks ls | grep -q "^$cid .*RUNNING" || break; sleep 0.1; done
tb_ctr tasks delete "$cid" >/dev/null
tb_ctr containers delete "$cid"
echo "   containers named $cid: $(tb_ctr containers ls -q | grep -c "^$cid$" || true)"
echo "-- ctr containers restore --live --rw $cid $ref   (the shim runs runc restore)"
tb_ctr containers restore --live --rw "$cid" "$ref"
sleep 0.3
echo "   restored; counter is at $(count)"
sleep 1
echo "   one second later: $(count) (it continued from its checkpointed value, not from 1)"
tb_ctr tasks kill -s SIGKILL "$cid"
for _ in $(seq 100); do tb_ctr tasks ls | grep -q "^$cid .*RUNNING" || break; sleep 0.1; done
tb_ctr tasks delete "$cid" >/dev/null
tb_ctr containers delete "$cid"
echo "-- the shim's log about it:"
grep -o "container $cid: \(checkpoint\|restor\)[^\"]*" "$TB_LOG" | sed 's/^/   /'

echo
echo "== after --rm: containers left in $TB_NS: $(tb_ctr containers ls -q | wc -l)"
echo "== cleaning up"
