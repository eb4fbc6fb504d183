#!/usr/bin/env bash
# The README demo: prepares the machine, brings up a private containerd, imports the local busybox
# image and runs a container through a containerd shim, showing its output; cleans up on exit.
# DEMO_RUNTIME picks the shim (today the stock io.containerd.runc.v2; later Kybernate's).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

RUNTIME=${DEMO_RUNTIME:-io.containerd.runc.v2}

bash test/setup.sh
# shellcheck source=test/lib/testbed.sh
. test/lib/testbed.sh

echo
echo "== starting a private containerd"
tb_start
echo "   socket $TB_ADDRESS, namespace $TB_NS, log $TB_LOG"

echo "== importing $KBT_IMAGE"
tb_import_image
tb_ctr images ls

id=demo-$$
echo "== ctr run --rm --runtime $RUNTIME $KBT_IMAGE $id"
# shellcheck disable=SC2016 # expanded by the container's shell
tb_ctr run --rm --runtime "$RUNTIME" "$KBT_IMAGE" "$id" sh -c '
    echo "hello from busybox: pid $$ in its own pid namespace, hostname $(hostname)"
    echo "root file system: $(ls /bin | wc -l) entries in /bin"
    echo "kernel: $(uname -sr)"'

echo "== after --rm: containers left in $TB_NS: $(tb_ctr containers ls -q | wc -l)"
echo "== cleaning up"
