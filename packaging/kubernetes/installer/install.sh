#!/usr/bin/env bash
# Kybernate node installer: run by the DaemonSet in daemonset.yaml on every node (privileged,
# hostPID, the host's / mounted at $HOST_ROOT).
#
#  1. copies kybernate, containerd-shim-kybernate-v1 and kybernate-select into the host's
#     /usr/local/bin (mode 0755, replaced by rename so a running shim is never overwritten),
#  2. writes a default /etc/kybernate/config.toml where none exists (an existing one is kept),
#  3. merges the runtime into containerd's config with `kybernate containerd-config install`
#     (a backup is kept next to it; a config that already has it is left alone),
#  4. restarts containerd only when its config changed (running containers keep running), or when
#     an earlier run's restart failed,
#  5. sleeps, so the DaemonSet's pod stays Running (KYBERNATE_INSTALL_ONESHOT=1: exit instead).
#
# Run it again at any time: a second run changes nothing and restarts nothing.
#
# Environment (defaults in brackets):
#   HOST_ROOT                  the host's / inside this container [/host]
#   KYBERNATE_BIN_DIR          where this image keeps the three binaries [/opt/kybernate/bin]
#   KYBERNATE_DEFAULT_CONFIG   the default Kybernate config to install [next to this script, or
#                              packaging/deb/config.toml when run from a source checkout]
#   HOST_BIN_DIR               where the binaries go on the host [/usr/local/bin]
#   KYBERNATE_CONFIG_FILE      the Kybernate config on the host [/etc/kybernate/config.toml]
#   CONTAINERD_CONFIG          containerd's config on the host [/etc/containerd/config.toml]
#   CONTAINERD_RESTART         the command restarting containerd, split on spaces
#                              [nsenter -t 1 -m -u -i -n -p -- systemctl restart containerd]
#   KYBERNATE_STYLE            runtime-type or runtime-path [runtime-type]
#   KYBERNATE_HANDLER          the runtime's name, the RuntimeClass handler [kybernate]
#   KYBERNATE_INSTALL_ONESHOT  1: exit when done instead of sleeping [0]
#
# k3s: containerd's config is generated from a template; set
#   CONTAINERD_CONFIG=/var/lib/rancher/k3s/agent/etc/containerd/config.toml.tmpl
#   CONTAINERD_RESTART="nsenter -t 1 -m -u -i -n -p -- systemctl restart k3s"   (k3s-agent on agents)
# A missing template is first copied from k3s's generated config.toml. A template that uses Go
# template directives ({{ ... }}) is not TOML: the merge refuses it; add the runtime by hand.
# MicroK8s: CONTAINERD_CONFIG=/var/snap/microk8s/current/args/containerd-template.toml and
#   CONTAINERD_RESTART="nsenter -t 1 -m -u -i -n -p -- snap restart microk8s.daemon-containerd"
set -euo pipefail

script_dir="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"

HOST_ROOT="${HOST_ROOT:-/host}"
KYBERNATE_BIN_DIR="${KYBERNATE_BIN_DIR:-/opt/kybernate/bin}"
HOST_BIN_DIR="${HOST_BIN_DIR:-/usr/local/bin}"
KYBERNATE_CONFIG_FILE="${KYBERNATE_CONFIG_FILE:-/etc/kybernate/config.toml}"
CONTAINERD_CONFIG="${CONTAINERD_CONFIG:-/etc/containerd/config.toml}"
CONTAINERD_RESTART="${CONTAINERD_RESTART:-nsenter -t 1 -m -u -i -n -p -- systemctl restart containerd}"
KYBERNATE_STYLE="${KYBERNATE_STYLE:-runtime-type}"
KYBERNATE_HANDLER="${KYBERNATE_HANDLER:-kybernate}"
KYBERNATE_INSTALL_ONESHOT="${KYBERNATE_INSTALL_ONESHOT:-0}"
if [[ -z "${KYBERNATE_DEFAULT_CONFIG:-}" ]]; then
    KYBERNATE_DEFAULT_CONFIG="${script_dir}/config.toml"
    [[ -f "$KYBERNATE_DEFAULT_CONFIG" ]] || KYBERNATE_DEFAULT_CONFIG="${script_dir}/../../deb/config.toml"
fi

BINARIES=(kybernate containerd-shim-kybernate-v1 kybernate-select)

log() { printf 'kybernate-install: %s\n' "$*"; }
# shellcheck source=packaging/kubernetes/installer/lib.sh
. "$script_dir/lib.sh"
die() { printf 'kybernate-install: error: %s\n' "$*" >&2; exit 1; }

[[ -d "$HOST_ROOT" ]] || die "HOST_ROOT $HOST_ROOT is not a directory (mount the host's / there)"
for bin in "${BINARIES[@]}"; do
    [[ -x "$KYBERNATE_BIN_DIR/$bin" ]] || die "$KYBERNATE_BIN_DIR/$bin is missing or not executable"
done
[[ -f "$KYBERNATE_DEFAULT_CONFIG" ]] || die "default config $KYBERNATE_DEFAULT_CONFIG is missing"

# 1. Binaries: only when they differ; install to a temp name, then rename over the old one.
host_bin="$HOST_ROOT$HOST_BIN_DIR"
mkdir -p "$host_bin"
for bin in "${BINARIES[@]}"; do
    dest="$host_bin/$bin"
    if [[ -f "$dest" ]] && cmp -s "$KYBERNATE_BIN_DIR/$bin" "$dest" && [[ "$(stat -c %a "$dest")" == 755 ]]; then
        log "$HOST_BIN_DIR/$bin is up to date"
        continue
    fi
    install -m 0755 "$KYBERNATE_BIN_DIR/$bin" "$dest.kybernate-new"
    mv -f "$dest.kybernate-new" "$dest"
    log "installed $HOST_BIN_DIR/$bin"
done

# 2. The Kybernate config: never overwrite the admin's.
host_kybernate_config="$HOST_ROOT$KYBERNATE_CONFIG_FILE"
if [[ -e "$host_kybernate_config" ]]; then
    log "$KYBERNATE_CONFIG_FILE exists; kept"
else
    mkdir -p "$(dirname "$host_kybernate_config")"
    install -m 0644 "$KYBERNATE_DEFAULT_CONFIG" "$host_kybernate_config"
    log "wrote the default $KYBERNATE_CONFIG_FILE"
fi

# 3. containerd's config.
host_containerd_config="$HOST_ROOT$CONTAINERD_CONFIG"
if [[ "$CONTAINERD_CONFIG" == *.tmpl && ! -e "$host_containerd_config" ]]; then
    generated="${host_containerd_config%.tmpl}"
    if [[ -f "$generated" ]]; then
        cp -p "$generated" "$host_containerd_config"
        log "created $CONTAINERD_CONFIG from ${CONTAINERD_CONFIG%.tmpl}"
    fi
fi
merge=(containerd-config install --containerd-config "$host_containerd_config" --style "$KYBERNATE_STYLE"
    --handler "$KYBERNATE_HANDLER" --kybernate-config "$KYBERNATE_CONFIG_FILE")
# runtime-type: containerd finds the shim on its PATH (systemd's default PATH has /usr/local/bin);
# runtime-path: containerd runs the file named here.
if [[ "$KYBERNATE_STYLE" == runtime-path ]]; then
    merge+=(--shim "$HOST_BIN_DIR/containerd-shim-kybernate-v1")
fi
before="$(fingerprint "$host_containerd_config")"
"$KYBERNATE_BIN_DIR/kybernate" "${merge[@]}"
after="$(fingerprint "$host_containerd_config")"

# 4. Restart containerd only for a changed config (or after an earlier run's failed restart).
restart_containerd_if_changed "$before" "$after"
log "done"

# 5. Keep the DaemonSet's pod running (KYBERNATE_INSTALL_ONESHOT=1: exit).
stay_running
