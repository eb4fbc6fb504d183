#!/usr/bin/env bash
# Push and pull throughput of a checkpoint through an OCI registry (issue #25): a checkpoint
# holding MIB MiB of incompressible pages (written by the bench_checkpoint example, no CRIU) is
# pushed to the test bed's docker-registry on 127.0.0.1 with `kybernate push` and pulled into a
# second store with `kybernate pull`; the same bytes as one uncompressed image layer are pushed
# with `ctr images push` (a private containerd 1.6) to the same registry, in the same run. Then a
# second checkpoint whose pages did not change is pushed: bytes uploaded. Medians of RUNS.
# Needs about 4 x MIB of free disk under /var/lib.
# Usage: bash test/bench/registry.sh [RUNS] [MIB]   defaults 3 1024
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
RUNS=${1:-3}
MIB=${2:-1024}
REGISTRY_BIN=${KBT_REGISTRY_PREFIX:-/opt/kybernate-test/registry}/usr/bin/docker-registry
BASE=/var/lib/kybernate-bench/registry-$$
PIDS=()
cleanup() {
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; wait "$p" 2>/dev/null || true; done
    rm -rf "$BASE"
    rmdir /var/lib/kybernate-bench 2>/dev/null || true
}
trap cleanup EXIT
# shellcheck source=test/bench/build.sh
. test/bench/build.sh
bench_build_bins
bench_build_examples bench_checkpoint
KYB=$PWD/target/release/kybernate
MAKE=$PWD/target/release/examples/bench_checkpoint
mkdir -p "$BASE"
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
med() { printf '%s\n' "$@" | sort -n | awk '{a[NR]=$1} END {print a[int((NR + 1) / 2)]}'; }
now() { date +%s%N; }
mibs() { echo $((MIB * 1000000000 / ($2 - $1))); }

PORT=$(free_port)
HOST=127.0.0.1:$PORT
printf 'version: 0.1\nlog:\n  level: error\nstorage:\n  filesystem:\n    rootdirectory: %s\nhttp:\n  addr: %s\n' \
    "$BASE/registry" "$HOST" >"$BASE/registry.yml"
"$REGISTRY_BIN" serve "$BASE/registry.yml" >"$BASE/registry.log" 2>&1 &
PIDS+=($!)
for _ in $(seq 100); do curl -sf "http://$HOST/v2/" >/dev/null && break; sleep 0.1; done

for node in a b; do
    printf '[checkpoint]\nroot = "%s"\n[registry]\ninsecure = ["%s"]\n' "$BASE/store-$node" "$HOST" >"$BASE/$node.toml"
done
echo "== machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //'), $(uname -r)"
echo "== registry: docker-registry $("$REGISTRY_BIN" --version | awk '{print $3}') on $HOST, storage on $(findmnt -no SOURCE,FSTYPE -T "$BASE" | tr -s ' ')"

ID=$("$MAKE" "$BASE/store-a" "$MIB")
PAGES=$BASE/store-a/$ID/checkpoint/pages-1.img

# containerd 1.6 (private) with the same bytes as a one-layer image.
CTRD=$BASE/containerd
mkdir -p "$CTRD"
cat >"$CTRD/config.toml" <<EOF
version = 2
root = "$CTRD/root"
state = "$CTRD/state"
disabled_plugins = ["io.containerd.grpc.v1.cri"]
[grpc]
  address = "$CTRD/containerd.sock"
[ttrpc]
  address = "$CTRD/containerd.sock.ttrpc"
EOF
containerd --config "$CTRD/config.toml" >"$CTRD/log" 2>&1 &
PIDS+=($!)
CTR=(ctr --address "$CTRD/containerd.sock" -n kybernate-bench)
for _ in $(seq 100); do "${CTR[@]}" version >/dev/null 2>&1 && break; sleep 0.1; done
LAYOUT=$BASE/layout
mkdir -p "$LAYOUT/blobs/sha256" "$BASE/layerdir"
ln "$PAGES" "$BASE/layerdir/pages-1.img"
tar -cf "$BASE/layer.tar" -C "$BASE/layerdir" pages-1.img
blob() { local d; d=$(sha256sum "$1" | cut -d' ' -f1); mv "$1" "$LAYOUT/blobs/sha256/$d"; echo "$d"; }
LSIZE=$(stat -c %s "$BASE/layer.tar")
LD=$(blob "$BASE/layer.tar")
printf '{"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":["sha256:%s"]}}' "$LD" >"$BASE/config.json"
CSIZE=$(stat -c %s "$BASE/config.json")
CD=$(blob "$BASE/config.json")
printf '{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"sha256:%s","size":%s},"layers":[{"mediaType":"application/vnd.oci.image.layer.v1.tar","digest":"sha256:%s","size":%s}]}' \
    "$CD" "$CSIZE" "$LD" "$LSIZE" >"$BASE/manifest.json"
MSIZE=$(stat -c %s "$BASE/manifest.json")
MD=$(blob "$BASE/manifest.json")
printf '{"schemaVersion":2,"manifests":[{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"sha256:%s","size":%s,"annotations":{"org.opencontainers.image.ref.name":"bench"}}]}' \
    "$MD" "$MSIZE" >"$LAYOUT/index.json"
echo '{"imageLayoutVersion":"1.0.0"}' >"$LAYOUT/oci-layout"
tar -cf "$BASE/image.tar" -C "$LAYOUT" .
rm -rf "$LAYOUT"
"${CTR[@]}" images import --no-unpack --index-name "bench/pages:v1" "$BASE/image.tar" >/dev/null
rm -f "$BASE/image.tar"

push=() pull=() ctr_push=()
for i in $(seq "$RUNS"); do
    sync
    t0=$(now)
    /usr/bin/time -f %M -o "$BASE/push.rss" "$KYB" --config "$BASE/a.toml" -o json push "$ID" "$HOST/bench/kyb$i:v1" >"$BASE/push.json"
    t1=$(now)
    rm -rf "$BASE/store-b"
    /usr/bin/time -f %M -o "$BASE/pull.rss" "$KYB" --config "$BASE/b.toml" -o json pull "$HOST/bench/kyb$i:v1" >"$BASE/pull.json"
    t2=$(now)
    rm -rf "$BASE/store-b"
    "${CTR[@]}" images tag "bench/pages:v1" "$HOST/bench/ctr$i:v1" >/dev/null
    t3=$(now)
    "${CTR[@]}" images push --plain-http "$HOST/bench/ctr$i:v1" >/dev/null
    t4=$(now)
    push+=("$(mibs "$t0" "$t1")") pull+=("$(mibs "$t1" "$t2")") ctr_push+=("$(mibs "$t3" "$t4")")
    # The next run starts from an empty registry (and the disk holds one copy at a time).
    rm -rf "$BASE/registry/docker"
done
echo "== $MIB MiB checkpoint (median of $RUNS, MiB/s of the pages file)"
echo "   kybernate push: $(med "${push[@]}") MiB/s, max RSS $(($(cat "$BASE/push.rss") / 1024)) MiB   (bytes: $(tr -d '\n ' <"$BASE/push.json"))"
echo "   kybernate pull: $(med "${pull[@]}") MiB/s, max RSS $(($(cat "$BASE/pull.rss") / 1024)) MiB   (verified into a second store)"
echo "   ctr images push (same bytes, one tar layer): $(med "${ctr_push[@]}") MiB/s"

# A second checkpoint of unchanged pages, pushed to the same tag: only the small layer and the
# config go up.
"$KYB" --config "$BASE/a.toml" -o json push "$ID" "$HOST/bench/kyb:v1" >/dev/null
ID2=$("$MAKE" "$BASE/store-a" "$MIB" "$PAGES")
"$KYB" --config "$BASE/a.toml" -o json push "$ID2" "$HOST/bench/kyb:v1" >"$BASE/push2.json"
echo "   second checkpoint, same tag: $(tr -d '\n ' <"$BASE/push2.json")"
