# shellcheck shell=bash
# Shared by install.sh and uninstall.sh (sourced; they set HOST_ROOT, CONTAINERD_RESTART and log()).

# What a config file's content is, to tell whether a merge changed it.
fingerprint() {
    if [[ -e "$1" ]]; then sha256sum <"$1"; else echo absent; fi
}

# Restarts containerd when its config changed ($1 != $2), or when an earlier run's restart failed:
# a marker on the host remembers a restart that was due (the pod then restarts and runs again).
restart_containerd_if_changed() {
    local before=$1 after=$2 restart
    local pending="$HOST_ROOT/var/lib/kybernate/installer/containerd-restart-pending"
    if [[ "$before" != "$after" || -e "$pending" ]]; then
        mkdir -p "$(dirname "$pending")"
        : >"$pending"
        read -r -a restart <<<"$CONTAINERD_RESTART"
        log "containerd's config changed; restarting containerd: ${restart[*]}"
        "${restart[@]}"
        rm -f "$pending"
        rmdir "$(dirname "$pending")" 2>/dev/null || true
    else
        log "containerd's config unchanged; containerd not restarted"
    fi
}

# Keeps the DaemonSet's pod running unless KYBERNATE_INSTALL_ONESHOT=1; exits promptly (and takes
# the sleep along) when the pod is deleted.
stay_running() {
    [[ "$KYBERNATE_INSTALL_ONESHOT" != 1 ]] || return 0
    sleep infinity &
    local sleeper=$!
    # shellcheck disable=SC2064 # expand now: the trap outlives this function's locals
    trap "kill $sleeper 2>/dev/null; exit 0" TERM INT
    wait "$sleeper"
}
