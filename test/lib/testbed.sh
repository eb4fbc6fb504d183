# shellcheck shell=bash
# A private containerd for scripts (the demo, benchmarks): the shell twin of the Rust crate
# kybernate-testbed (test/harness). Needs root and test/setup.sh.
#
#   . test/lib/testbed.sh
#   TB_PATH_PREPEND=$PWD/target/debug     # optional: dirs put ahead of containerd's PATH (our shim)
#   TB_EXTRA_CONFIG='[plugins."..."]'     # optional: TOML tables appended to config.toml
#   TB_CRI=1                              # optional: enable the CRI plugin (off by default)
#   tb_start                              # sets TB_NS TB_DIR TB_ADDRESS TB_LOG; cleans up on EXIT
#   tb_import_image                       # imports $KBT_IMAGE
#   tb_ctr run --rm "$KBT_IMAGE" id echo hi
#
# Shims put sockets under /run/containerd/s/ and runc keeps state under
# /run/containerd/runc/<namespace> whatever containerd's dirs are: each test bed gets its own
# namespace (kbt-<pid>-sh<n>, a name the Rust harness's stale sweep also recognises).

# shellcheck source=test/lib/common.sh
. "$(dirname "${BASH_SOURCE[0]}")/common.sh"

TB_SYSTEM_PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
TB_NS='' TB_DIR='' TB_ADDRESS='' TB_LOG='' TB_PID=''
_tb_count=0

_tb_log() { printf '[testbed] %s\n' "$*" >&2; }

# Starts the private containerd and installs the cleanup trap.
tb_start() {
    local path p
    [ "$(id -u)" -eq 0 ] || { _tb_log "needs root"; return 1; }
    for p in containerd ctr runc containerd-shim-runc-v2 setpriv; do
        command -v "$p" >/dev/null || { _tb_log "$p missing: run test/setup.sh first"; return 1; }
    done
    for p in "$KBT_CRIU_WRAPPER" "$KBT_IMAGE_ARCHIVE" /bin/busybox; do
        [ -e "$p" ] || { _tb_log "$p missing: run test/setup.sh first"; return 1; }
    done
    [ -z "$TB_PID" ] || { _tb_log "a test bed is already running in this shell ($TB_NS)"; return 1; }

    _tb_count=$((_tb_count + 1))
    TB_NS=kbt-$$-sh$_tb_count
    TB_DIR=$KBT_RUN_BASE/$TB_NS
    TB_ADDRESS=$TB_DIR/containerd.sock
    TB_LOG=$TB_DIR/containerd.log
    rm -rf "$TB_DIR"
    mkdir -p "$TB_DIR"
    {
        printf '# Written by test/lib/testbed.sh for namespace %s.\nversion = 2\n' "$TB_NS"
        printf 'root = "%s/root"\nstate = "%s/state"\n' "$TB_DIR" "$TB_DIR"
        [ "${TB_CRI:-0}" = 1 ] || printf 'disabled_plugins = ["io.containerd.grpc.v1.cri"]\n'
        printf '\n[grpc]\n  address = "%s"\n\n[ttrpc]\n  address = "%s.ttrpc"\n' "$TB_ADDRESS" "$TB_ADDRESS"
        printf '\n[debug]\n  level = "info"\n\n[plugins."io.containerd.internal.v1.opt"]\n  path = "%s/opt"\n' "$TB_DIR"
        if [ "${TB_CRI:-0}" = 1 ]; then
            # runc cannot lower oom_score_adj on these VMs (no CAP_SYS_RESOURCE).
            printf '\n[plugins."io.containerd.grpc.v1.cri"]\n  restrict_oom_score_adj = true\n'
        fi
        [ -z "${TB_EXTRA_CONFIG:-}" ] || printf '\n# TB_EXTRA_CONFIG\n%s\n' "$TB_EXTRA_CONFIG"
    } >"$TB_DIR/config.toml"

    trap 'tb_cleanup' EXIT
    trap 'exit 130' INT
    trap 'exit 143' TERM
    path=$TB_SYSTEM_PATH
    [ -z "${TB_PATH_PREPEND:-}" ] || path=$TB_PATH_PREPEND:$path
    # --pdeathsig: containerd goes when this shell dies without running its trap (SIGKILL).
    PATH=$path setpriv --pdeathsig TERM -- containerd --config "$TB_DIR/config.toml" \
        </dev/null >>"$TB_LOG" 2>&1 &
    TB_PID=$!

    local deadline=$((SECONDS + 30))
    until ctr --address "$TB_ADDRESS" --timeout 2s version >/dev/null 2>&1; do
        if ! kill -0 "$TB_PID" 2>/dev/null; then
            _tb_log "containerd exited; log tail:"; tail -n 30 "$TB_LOG" >&2; return 1
        fi
        if [ "$SECONDS" -ge "$deadline" ]; then
            _tb_log "containerd did not answer on $TB_ADDRESS in 30s; log tail:"; tail -n 30 "$TB_LOG" >&2; return 1
        fi
        sleep 0.05
    done
}

# ctr bound to the test bed's address and namespace.
tb_ctr() {
    ctr --address "$TB_ADDRESS" --namespace "$TB_NS" "$@"
}

# Imports the busybox image ($KBT_IMAGE) into the test bed's namespace.
tb_import_image() {
    tb_ctr images import "$KBT_IMAGE_ARCHIVE" >/dev/null
    tb_ctr images ls -q | grep -qxF "$KBT_IMAGE" || { _tb_log "$KBT_IMAGE missing after import"; return 1; }
}

# Pids of processes whose argument vector contains "$1" "$2" in a row (e.g. -namespace NS).
_tb_pids_with_args() {
    local p args i
    for p in /proc/[0-9]*; do
        { mapfile -d '' -t args <"$p/cmdline"; } 2>/dev/null || continue
        for ((i = 0; i + 1 < ${#args[@]}; i++)); do
            if [ "${args[i]}" = "$1" ] && [ "${args[i + 1]}" = "$2" ]; then
                echo "${p#/proc/}"
                break
            fi
        done
    done
}

# Tears everything down: tasks, containers, containerd, leftover runc containers and shims,
# mounts, cgroups, dirs. Runs from the EXIT trap; safe to call twice.
tb_cleanup() {
    local rc=$? id ns pid i runc_root addr errexit=0
    [ -n "$TB_NS" ] || return "$rc"
    case $- in *e*) errexit=1 ;; esac
    set +e
    if [ "$rc" -ne 0 ] && [ -f "$TB_LOG" ]; then
        cp "$TB_LOG" "/tmp/kybernate-testbed-$TB_NS.log"
        _tb_log "failed (exit $rc); containerd log kept at /tmp/kybernate-testbed-$TB_NS.log, last lines:"
        grep -v 'msg="loading plugin' "$TB_LOG" | tail -n 30 >&2
    fi
    if [ -n "$TB_PID" ] && kill -0 "$TB_PID" 2>/dev/null; then
        # Every namespace of the private containerd is ours (k8s.io too, where CRI made pods).
        for ns in $(ctr --address "$TB_ADDRESS" namespaces ls -q 2>/dev/null) "$TB_NS"; do
            for id in $(ctr --address "$TB_ADDRESS" -n "$ns" --timeout 20s tasks ls -q 2>/dev/null); do
                ctr --address "$TB_ADDRESS" -n "$ns" --timeout 20s tasks delete --force "$id" >/dev/null 2>&1
            done
            for id in $(ctr --address "$TB_ADDRESS" -n "$ns" --timeout 20s containers ls -q 2>/dev/null); do
                ctr --address "$TB_ADDRESS" -n "$ns" --timeout 20s containers delete "$id" >/dev/null 2>&1
            done
        done
        kill -TERM "$TB_PID" 2>/dev/null
        for ((i = 0; i < 300; i++)); do kill -0 "$TB_PID" 2>/dev/null || break; sleep 0.05; done
        kill -KILL "$TB_PID" 2>/dev/null
        wait "$TB_PID" 2>/dev/null
    fi
    runc_root=/run/containerd/runc/$TB_NS
    if [ -d "$runc_root" ]; then
        for id in $(runc --root "$runc_root" list -q 2>/dev/null); do
            runc --root "$runc_root" delete --force "$id" >/dev/null 2>&1
        done
    fi
    for pid in $(_tb_pids_with_args -namespace "$TB_NS"); do kill -KILL "$pid" 2>/dev/null; done
    for addr in "$TB_DIR"/state/io.containerd.runtime.v2.task/"$TB_NS"/*/address; do
        [ -f "$addr" ] || continue
        addr=$(cat "$addr"); addr=${addr#unix://}
        case "$addr" in /run/containerd/s/*) rm -f "$addr" ;; esac
    done
    awk -v d="$TB_DIR" '$5 == d || index($5, d "/") == 1 { print $5 }' /proc/self/mountinfo |
        sort -r | while read -r m; do umount -l "$m"; done
    rm -rf "$TB_DIR" "$runc_root"
    for d in /sys/fs/cgroup/*/"$TB_NS"; do
        [ -d "$d" ] && find "$d" -depth -type d -exec rmdir {} + 2>/dev/null
    done
    TB_NS='' TB_DIR='' TB_ADDRESS='' TB_LOG='' TB_PID=''
    [ "$errexit" = 0 ] || set -e
    return "$rc"
}
