#!/usr/bin/env bash
# Kybernate node uninstaller: the reverse of install.sh, with the same environment variables.
#
#  1. removes the runtime from containerd's config with `kybernate containerd-config uninstall`
#     (only its table; a backup is kept next to the config),
#  2. restarts containerd only when its config changed (or an earlier run's restart failed),
#  3. removes the three binaries from the host's /usr/local/bin,
#  4. sleeps like install.sh (KYBERNATE_INSTALL_ONESHOT=1: exit instead).
#
# /etc/kybernate/config.toml and the checkpoint store (/var/lib/kybernate/checkpoints) are kept:
# they are the admin's data. Delete or move the pods that use the RuntimeClass first: once
# containerd has restarted without the runtime, their containers can no longer be started, and
# without the shim binary containerd cannot clean up after them.
set -euo pipefail

HOST_ROOT="${HOST_ROOT:-/host}"
KYBERNATE_BIN_DIR="${KYBERNATE_BIN_DIR:-/opt/kybernate/bin}"
HOST_BIN_DIR="${HOST_BIN_DIR:-/usr/local/bin}"
CONTAINERD_CONFIG="${CONTAINERD_CONFIG:-/etc/containerd/config.toml}"
CONTAINERD_RESTART="${CONTAINERD_RESTART:-nsenter -t 1 -m -u -i -n -p -- systemctl restart containerd}"
KYBERNATE_HANDLER="${KYBERNATE_HANDLER:-kybernate}"
KYBERNATE_INSTALL_ONESHOT="${KYBERNATE_INSTALL_ONESHOT:-0}"

BINARIES=(kybernate containerd-shim-kybernate-v1 kybernate-select)

log() { printf 'kybernate-uninstall: %s\n' "$*"; }
script_dir="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=packaging/kubernetes/installer/lib.sh
. "$script_dir/lib.sh"
die() { printf 'kybernate-uninstall: error: %s\n' "$*" >&2; exit 1; }

[[ -d "$HOST_ROOT" ]] || die "HOST_ROOT $HOST_ROOT is not a directory (mount the host's / there)"
[[ -x "$KYBERNATE_BIN_DIR/kybernate" ]] || die "$KYBERNATE_BIN_DIR/kybernate is missing or not executable"

# 1. containerd's config (a missing config has nothing to remove).
host_containerd_config="$HOST_ROOT$CONTAINERD_CONFIG"
before="$(fingerprint "$host_containerd_config")"
"$KYBERNATE_BIN_DIR/kybernate" containerd-config uninstall \
    --containerd-config "$host_containerd_config" --handler "$KYBERNATE_HANDLER"
after="$(fingerprint "$host_containerd_config")"

# 2. Restart containerd only for a changed config, or after an earlier run's failed restart.
restart_containerd_if_changed "$before" "$after"

# 3. The binaries, after containerd no longer names the runtime.
for bin in "${BINARIES[@]}"; do
    dest="$HOST_ROOT$HOST_BIN_DIR/$bin"
    if [[ -e "$dest" || -L "$dest" ]]; then
        rm -f "$dest"
        log "removed $HOST_BIN_DIR/$bin"
    fi
done
log "done; kept the Kybernate config and the checkpoint store"

stay_running
