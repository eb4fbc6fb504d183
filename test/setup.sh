#!/usr/bin/env bash
# Prepares a Debian bookworm machine (as root) for Kybernate's test bed. Idempotent: a second run
# only verifies and is quick. What it puts in place:
#   - Debian packages: containerd (with containerd-shim-runc-v2), runc, iptables, busybox-static, ...
#   - CRIU >= 4.2 from Debian testing ($KBT_CRIU_SUITE) in a private prefix, plus a `criu` wrapper ahead of /usr/sbin
#     (bookworm's CRIU 3.17 fails `criu check` on kernel 6.x: "Unexpected rt vDSO area bounds")
#   - containerd 1.7 (Debian trixie) and 2.x (Debian testing) unpacked into private prefixes, for the tests
#     that run the shim and the CRI path under every containerd a node may have (not on PATH, not started),
#     and Debian's docker-registry binary (unpacked, no service) for tests that need to pull
#   - Debian's prometheus binary (unpacked, no service) that scrapes `kybernate metrics --listen` in its test
#   - a tiny busybox OCI image archive, built locally (there is no registry here)
#   - systemd-nspawn (systemd-container), with which test/lib/kbt-node boots this machine's own root as a node whose
#     PID 1 is systemd, for the tests of `systemctl restart containerd` and `journalctl -u containerd`
#   - for the installer image test: buildah from Debian testing ($KBT_BUILDAH_SUITE) and bookworm's mmdebstrap in
#     $KBT_IMAGE_TOOLS_PREFIX, the wrapper $KBT_BUILDAH that runs buildah isolated, and a debian:bookworm-slim
#     stand-in rootfs built once with mmdebstrap ($KBT_BASE_ROOTFS; delete it to rebuild), and bookworm's
#     containerd and runc .debs ($KBT_NODE_DEBS) for the Debian package test's apt-get install on that rootfs
# The system containerd service (if any) is left alone: test beds run a private containerd with
# their own root, state, sockets and namespace.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=test/lib/common.sh
. "$HERE/lib/common.sh"

APT_PACKAGES=(
    containerd runc        # the runtime under test and the baseline shim (containerd-shim-runc-v2)
    iptables iproute2      # CRIU locks the network with iptables-restore and saves netns state with ip
    busybox-static         # the only binary in the test image and in raw runc bundles
    mount                  # umount for cleanup
    protobuf-compiler      # protoc, for crates that build CRI/containerd protos
    hyperfine              # benchmarks
    libdevmapper1.02.1     # linked by dockerd (Debian's docker.io, unpacked for the installer image test)
    dpkg-dev               # dpkg-shlibdeps, for the Debian package's library dependencies (packaging/deb)
    systemd-container      # systemd-nspawn: test/lib/kbt-node boots this machine's root as a systemd node
)
CRIU_DEB_DIR=$KBT_STATE_DIR/criu-debs-$KBT_CRIU_SUITE
START=$(date +%s.%N)

log() { printf '[setup] %s\n' "$*"; }
die() { printf '[setup] ERROR: %s\n' "$*" >&2; exit 1; }

[ "$(id -u)" -eq 0 ] || die "must run as root (it installs packages and writes $KBT_STATE_DIR)"
# This machine's Debian release (bookworm): its mirror, and the suite of the packages unpacked beside the system's.
# shellcheck disable=SC1091 # the running system's os-release
CODENAME=$(. /etc/os-release && echo "${VERSION_CODENAME:-}")
[ -n "$CODENAME" ] || die "cannot read VERSION_CODENAME from /etc/os-release"
export DEBIAN_FRONTEND=noninteractive

case "$(dpkg --print-architecture)" in
    amd64) TRIPLET=x86_64-linux-gnu; LDSO=ld-linux-x86-64.so.2 ;;
    arm64) TRIPLET=aarch64-linux-gnu; LDSO=ld-linux-aarch64.so.1 ;;
    *) die "unsupported architecture $(dpkg --print-architecture)" ;;
esac

# ---------------------------------------------------------------------------------------------
# 1. Debian packages (apt-get update only when something has to be installed)
# ---------------------------------------------------------------------------------------------
missing=()
for p in "${APT_PACKAGES[@]}"; do
    if [ "$(dpkg-query -W -f='${db:Status-Status}' "$p" 2>/dev/null || true)" != installed ]; then
        missing+=("$p")
    fi
done
if [ "${#missing[@]}" -gt 0 ]; then
    log "installing Debian packages: ${missing[*]}"
    apt-get update -q
    apt-get install -y -q --no-install-recommends "${missing[@]}"
else
    log "Debian packages already installed"
fi

# ---------------------------------------------------------------------------------------------
# 2. CRIU >= 4.2 from Debian testing, run through $KBT_CRIU_SUITE's own loader and libraries
# ---------------------------------------------------------------------------------------------
version_ge() { [ "$(printf '%s\n%s\n' "$2" "$1" | sort -V | head -n1)" = "$2" ]; }

# install_if_changed TMP DEST: installs the script TMP as DEST (0755) unless DEST already says the same; removes TMP.
install_if_changed() {
    if cmp -s "$1" "$2"; then
        rm -f "$1"
    else
        mkdir -p "$(dirname "$2")"
        install -m 0755 "$1" "$2"
        rm -f "$1"
        log "wrote $2"
    fi
}

criu_version() { { "$KBT_CRIU_WRAPPER" --version 2>/dev/null || true; } | sed -n "s/^Version: *//p"; }

# The URI of this machine's apt source for RELEASE (e.g. bookworm, bookworm-security); empty if none.
apt_source_uri() {
    # shellcheck disable=SC2016 # $(...) are apt's format fields, not shell
    apt-get indextargets --no-release-info --format '$(REPO_URI) $(RELEASE)' 'Created-By: Packages' |
        awk -v r="$1" '$2 == r { print $1; exit }'
}

# The Debian mirror this machine already uses for its own release; $KBT_CRIU_SUITE is read from there too.
debian_mirror() {
    local uri
    uri=$(apt_source_uri "$CODENAME")
    [ -n "$uri" ] || die "no apt source for '$CODENAME' found in /etc/apt/sources.list*; cannot derive a Debian mirror"
    printf '%s\n' "$uri"
}

# apt, reading only SUITE's package lists (kept under $KBT_STATE_DIR/apt-SUITE), never the host's.
suite_apt() {
    local suite=$1 dir=$KBT_STATE_DIR/apt-$1
    shift
    local opts=(
        -o "Dir::State::Lists=$dir/lists"
        -o "Dir::State::status=/dev/null"
        -o "Dir::Cache=$dir/cache"
        -o "Dir::Etc::SourceList=$dir/sources.list"
        -o "Dir::Etc::SourceParts=$dir/empty.d"
        -o "Dir::Etc::Preferences=$dir/empty.d/preferences"
        -o "Dir::Etc::PreferencesParts=$dir/empty.d"
        -o "APT::Sandbox::User=root"
    )
    case "$(cat "$dir/sources.list" 2>/dev/null)" in
        *snapshot.debian.org*) opts+=(-o "Acquire::Check-Valid-Until=false") ;;
    esac
    "$@" "${opts[@]}"
}

# Points suite_apt SUITE at this machine's Debian mirror and reads SUITE's package lists once.
suite_lists() {
    local suite=$1 dir=$KBT_STATE_DIR/apt-$1 mirror
    mirror=$(debian_mirror)
    mkdir -p "$dir/lists/partial" "$dir/cache/archives/partial" "$dir/empty.d"
    printf 'deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] %s %s main\n' \
        "$mirror" "$suite" >"$dir/sources.list"
    if ! compgen -G "$dir/lists/*$suite*Packages*" >/dev/null; then
        log "reading $suite package lists from $mirror"
        suite_apt "$suite" apt-get update -q ||
            die "apt-get update for $suite failed (does debian-archive-keyring carry the $suite keys?)"
    fi
}

# download_debs SUITE DIR PACKAGE...: the .debs DIR does not have yet.
download_debs() {
    local suite=$1 dir=$2 p missing_debs=()
    shift 2
    mkdir -p "$dir"
    for p in "$@"; do
        compgen -G "$dir/${p}_*.deb" >/dev/null || missing_debs+=("$p")
    done
    [ "${#missing_debs[@]}" -gt 0 ] || return 0
    log "downloading from $suite: ${missing_debs[*]}"
    # Package lists kept from an earlier run may name a version the mirror has dropped: refresh once.
    (cd "$dir" && suite_apt "$suite" apt-get download -q "${missing_debs[@]}") ||
        { suite_apt "$suite" apt-get update -q && (cd "$dir" && suite_apt "$suite" apt-get download -q "${missing_debs[@]}"); } ||
        die "apt-get download from $suite failed"
}

# install_unpacked SUITE PACKAGE PREFIX BIN...: SUITE's PACKAGE unpacked into PREFIX (no maintainer scripts run,
# no service installed), its .debs kept in $KBT_STATE_DIR/PACKAGE-debs-SUITE; each BIN (relative to PREFIX) must
# be executable. PREFIX is replaced only once the new tree is complete.
install_unpacked() {
    local suite=$1 package=$2 prefix=$3 debs=$KBT_STATE_DIR/$2-debs-$1 stage b
    shift 3
    suite_lists "$suite"
    download_debs "$suite" "$debs" "$package"
    stage=$(mktemp -d "$(dirname "$prefix")/.$package-stage.XXXXXX")
    dpkg-deb -x "$debs/${package}"_*.deb "$stage"
    for b in "$@"; do
        [ -x "$stage/$b" ] || die "$package from $suite has no $b"
    done
    chmod 755 "$stage"
    rm -rf "$prefix"
    mv "$stage" "$prefix"
}

# Debian packages CRIU needs at run time: the Depends/Pre-Depends closure of criu in $KBT_CRIU_SUITE.
criu_closure() {
    suite_apt "$KBT_CRIU_SUITE" apt-cache depends --recurse --no-recommends --no-suggests --no-conflicts \
        --no-breaks --no-replaces --no-enhances criu |
        grep -v '^[[:space:]<]' | sort -u
}

fetch_criu_debs() {
    local pkgs=() missing_debs=() p
    suite_lists "$KBT_CRIU_SUITE"
    mkdir -p "$CRIU_DEB_DIR"
    mapfile -t pkgs < <(criu_closure)
    [ "${#pkgs[@]}" -gt 1 ] || die "could not resolve criu's dependencies in $KBT_CRIU_SUITE"
    for p in "${pkgs[@]}"; do
        compgen -G "$CRIU_DEB_DIR/${p}_*.deb" >/dev/null || missing_debs+=("$p")
    done
    if [ "${#missing_debs[@]}" -gt 0 ]; then
        log "downloading from $KBT_CRIU_SUITE: ${missing_debs[*]}"
        (cd "$CRIU_DEB_DIR" && suite_apt "$KBT_CRIU_SUITE" apt-get download -q "${missing_debs[@]}") ||
            die "apt-get download from $KBT_CRIU_SUITE failed"
    fi
    printf '%s\n' "${pkgs[@]}" >"$CRIU_DEB_DIR/closure.txt"
}

install_criu() {
    local stage p deb missing_libs
    stage=$(mktemp -d "$(dirname "$KBT_CRIU_PREFIX")/.criu-stage.XXXXXX")
    while read -r p; do
        for deb in "$CRIU_DEB_DIR/${p}"_*.deb; do dpkg-deb -x "$deb" "$stage"; done
    done <"$CRIU_DEB_DIR/closure.txt"
    local lib=$stage/usr/lib/$TRIPLET
    if [ ! -x "$lib/$LDSO" ] || [ ! -x "$stage/usr/sbin/criu" ]; then
        die "$KBT_CRIU_SUITE's loader or criu missing after extraction"
    fi
    # Ask $KBT_CRIU_SUITE's loader which libraries it cannot find: the closure must be complete.
    missing_libs=$("$lib/$LDSO" --library-path "$lib:$stage/lib/$TRIPLET" --list "$stage/usr/sbin/criu" |
        grep 'not found' || true)
    [ -z "$missing_libs" ] || die "criu's libraries incomplete: $missing_libs"
    rm -rf "$KBT_CRIU_PREFIX"
    mv "$stage" "$KBT_CRIU_PREFIX"
    chmod 755 "$KBT_CRIU_PREFIX"
    cp "$CRIU_DEB_DIR/closure.txt" "$KBT_CRIU_PREFIX/.kybernate-closure"
}

write_criu_wrapper() {
    local tmp
    tmp=$(mktemp)
    cat >"$tmp" <<EOF
#!/bin/sh
# Installed by Kybernate's test/setup.sh. Runs Debian $KBT_CRIU_SUITE's CRIU (>= 4.2: bookworm's 3.17 fails on
# kernel 6.x, 4.1 cannot dump TCP sockets on kernel >= 6.16) through $KBT_CRIU_SUITE's own loader and libraries, so bookworm's older glibc does not matter.
# Programs CRIU starts (iptables-restore, ip) run with the host's own libraries.
P=$KBT_CRIU_PREFIX
L=\$P/usr/lib/$TRIPLET
exec "\$L/$LDSO" --argv0 criu --library-path "\$L:\$P/lib/$TRIPLET" "\$P/usr/sbin/criu" "\$@"
EOF
    install_if_changed "$tmp" "$KBT_CRIU_WRAPPER"
}

mkdir -p "$KBT_STATE_DIR" "$(dirname "$KBT_CRIU_PREFIX")"
write_criu_wrapper
if [ -f "$KBT_CRIU_PREFIX/.kybernate-closure" ] && version_ge "$(criu_version)" "$KBT_CRIU_MIN_VERSION"; then
    log "CRIU $(criu_version) already in $KBT_CRIU_PREFIX"
else
    fetch_criu_debs
    install_criu
    log "installed CRIU $(criu_version) into $KBT_CRIU_PREFIX"
fi
CRIU_VERSION=$(criu_version)
version_ge "$CRIU_VERSION" "$KBT_CRIU_MIN_VERSION" ||
    die "criu --version says '${CRIU_VERSION:-nothing}', need >= $KBT_CRIU_MIN_VERSION"
if ! check_out=$("$KBT_CRIU_WRAPPER" check 2>&1) || ! grep -q 'Looks good' <<<"$check_out"; then
    printf '%s\n' "$check_out" >&2
    die "criu check failed"
fi
# runc looks CRIU up as `criu` on PATH; containerd hands its own PATH down to shims and runc.
# Check that the standard root PATH (what systemd and the test beds use) resolves to the wrapper.
resolved=$(PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin command -v criu)
[ "$resolved" = "$KBT_CRIU_WRAPPER" ] || die "criu on the standard PATH resolves to $resolved, not $KBT_CRIU_WRAPPER"

# ---------------------------------------------------------------------------------------------
# 3. containerd 1.7 and 2.x beside the system's 1.6, each in its own prefix (never on PATH), and a registry
# ---------------------------------------------------------------------------------------------
containerd_version_of() { { "$1/usr/bin/containerd" --version 2>/dev/null || true; } | awk '{print $3}'; }

# install_containerd RELEASE SUITE: SUITE's containerd package, unpacked into $KBT_CONTAINERD_BASE-RELEASE.
install_containerd() {
    local release=$1 suite=$2 prefix=$KBT_CONTAINERD_BASE-$1 debs=$KBT_STATE_DIR/containerd-debs-$2 version stage deb
    version=$(containerd_version_of "$prefix")
    if [ -f "$prefix/.kybernate-suite" ] && [[ "$version" == "$release".* ]]; then
        log "containerd $version already in $prefix"
        return
    fi
    suite_lists "$suite"
    mkdir -p "$debs"
    if ! compgen -G "$debs/containerd_*.deb" >/dev/null; then
        log "downloading containerd from $suite"
        # Package lists kept from an earlier run may name a version the mirror has dropped: refresh once.
        (cd "$debs" && suite_apt "$suite" apt-get download -q containerd) ||
            { suite_apt "$suite" apt-get update -q && (cd "$debs" && suite_apt "$suite" apt-get download -q containerd); } ||
            die "apt-get download containerd from $suite failed"
    fi
    stage=$(mktemp -d "$(dirname "$prefix")/.containerd-stage.XXXXXX")
    for deb in "$debs"/containerd_*.deb; do dpkg-deb -x "$deb" "$stage"; done
    version=$(containerd_version_of "$stage")
    [[ "$version" == "$release".* ]] ||
        die "$suite's containerd says version '${version:-nothing}' (does it run on this glibc?), expected $release.x"
    for b in containerd ctr containerd-shim-runc-v2; do
        [ -x "$stage/usr/bin/$b" ] || die "$suite's containerd package has no usr/bin/$b"
    done
    printf '%s\n' "$suite" >"$stage/.kybernate-suite"
    chmod 755 "$stage"
    rm -rf "$prefix"
    mv "$stage" "$prefix"
    log "installed containerd $version from $suite into $prefix"
}

# A registry for loopback pushes (containerd 2.x's CRI restore pulls a checkpoint's base image): the binary of
# this release's docker-registry package, unpacked, so no registry service is installed or started.
install_registry() {
    if [ -x "$KBT_REGISTRY_PREFIX/usr/bin/docker-registry" ]; then
        log "docker-registry already in $KBT_REGISTRY_PREFIX"
        return
    fi
    install_unpacked "$CODENAME" docker-registry "$KBT_REGISTRY_PREFIX" usr/bin/docker-registry
    "$KBT_REGISTRY_PREFIX/usr/bin/docker-registry" --version >/dev/null || die "the unpacked docker-registry does not run"
    log "installed docker-registry into $KBT_REGISTRY_PREFIX"
}

# Prometheus for the metrics test (it scrapes `kybernate metrics --listen` on loopback): the binary of this
# release's prometheus package, unpacked, so no service, user or web assets are installed (a static Go binary).
install_prometheus() {
    if [ -x "$KBT_PROMETHEUS_PREFIX/usr/bin/prometheus" ]; then
        log "prometheus already in $KBT_PROMETHEUS_PREFIX"
        return
    fi
    install_unpacked "$CODENAME" prometheus "$KBT_PROMETHEUS_PREFIX" usr/bin/prometheus
    "$KBT_PROMETHEUS_PREFIX/usr/bin/prometheus" --version >/dev/null || die "the unpacked prometheus does not run"
    log "installed prometheus into $KBT_PROMETHEUS_PREFIX"
}

mkdir -p "$(dirname "$KBT_CONTAINERD_BASE")"
install_registry
install_prometheus
for r in "${KBT_CONTAINERD_RELEASES[@]}"; do
    # shellcheck disable=SC2086 # "<release> <suite>" splits into two arguments
    install_containerd $r
done

# ---------------------------------------------------------------------------------------------
# 4. The busybox OCI image archive (deterministic: the same busybox gives the same bytes)
# ---------------------------------------------------------------------------------------------
BUSYBOX=/bin/busybox
[ -x "$BUSYBOX" ] || die "$BUSYBOX missing (busybox-static)"
if ldd "$BUSYBOX" >/dev/null 2>&1; then die "$BUSYBOX is dynamically linked; busybox-static is required"; fi

# tar flags that make an archive depend on content only.
DET_TAR=(--sort=name --format=gnu --owner=0 --group=0 --numeric-owner --mtime=@0)

sha256() { sha256sum "$1" | cut -d' ' -f1; }
size() { stat -c %s "$1"; }

build_image() {
    local out=$1 work rootfs arch bbver a layer config manifest
    work=$(mktemp -d)
    rootfs=$work/rootfs
    mkdir -p "$rootfs"/{bin,dev,etc,proc,root,sys,tmp,var}
    cp "$BUSYBOX" "$rootfs/bin/busybox"
    for a in $("$BUSYBOX" --list); do
        [ "$a" = busybox ] || ln -s busybox "$rootfs/bin/$a"
    done
    printf 'root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n' >"$rootfs/etc/passwd"
    printf 'root:x:0:\nnogroup:x:65534:\n' >"$rootfs/etc/group"
    find "$rootfs" -type d -exec chmod 0755 {} +
    chmod 1777 "$rootfs/tmp"
    chmod 0755 "$rootfs/bin/busybox"
    chmod 0644 "$rootfs/etc/passwd" "$rootfs/etc/group"

    mkdir -p "$work/oci/blobs/sha256"
    (cd "$rootfs" && LC_ALL=C tar -cf "$work/layer.tar" "${DET_TAR[@]}" bin dev etc proc root sys tmp var)
    layer=$(sha256 "$work/layer.tar")
    arch=$(dpkg --print-architecture)
    bbver=$(dpkg-query -W -f='${Version}' busybox-static)
    printf '{"architecture":"%s","os":"linux","created":"1970-01-01T00:00:00Z","config":{"Env":["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],"Cmd":["sh"],"WorkingDir":"/"},"rootfs":{"type":"layers","diff_ids":["sha256:%s"]},"history":[{"created":"1970-01-01T00:00:00Z","created_by":"kybernate test/setup.sh from busybox-static %s"}]}' \
        "$arch" "$layer" "$bbver" >"$work/config.json"
    config=$(sha256 "$work/config.json")
    printf '{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"sha256:%s","size":%s},"layers":[{"mediaType":"application/vnd.oci.image.layer.v1.tar","digest":"sha256:%s","size":%s}]}' \
        "$config" "$(size "$work/config.json")" "$layer" "$(size "$work/layer.tar")" >"$work/manifest.json"
    manifest=$(sha256 "$work/manifest.json")
    mv "$work/layer.tar" "$work/oci/blobs/sha256/$layer"
    mv "$work/config.json" "$work/oci/blobs/sha256/$config"
    printf '{"schemaVersion":2,"mediaType":"application/vnd.oci.image.index.v1+json","manifests":[{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"sha256:%s","size":%s,"platform":{"architecture":"%s","os":"linux"},"annotations":{"io.containerd.image.name":"%s","org.opencontainers.image.ref.name":"%s"}}]}' \
        "$manifest" "$(size "$work/manifest.json")" "$arch" "$KBT_IMAGE" "${KBT_IMAGE##*:}" >"$work/oci/index.json"
    mv "$work/manifest.json" "$work/oci/blobs/sha256/$manifest"
    printf '{"imageLayoutVersion":"1.0.0"}' >"$work/oci/oci-layout"
    find "$work/oci" -type d -exec chmod 0755 {} +
    find "$work/oci" -type f -exec chmod 0644 {} +
    (cd "$work/oci" && LC_ALL=C tar -cf "$out" "${DET_TAR[@]}" oci-layout index.json blobs)
    rm -rf "$work"
}

new_archive=$(mktemp "$KBT_STATE_DIR/.busybox-oci.XXXXXX")
build_image "$new_archive"
if cmp -s "$new_archive" "$KBT_IMAGE_ARCHIVE"; then
    rm -f "$new_archive"
    log "image archive $KBT_IMAGE_ARCHIVE up to date"
else
    chmod 0644 "$new_archive"
    mv "$new_archive" "$KBT_IMAGE_ARCHIVE"
    log "wrote image archive $KBT_IMAGE_ARCHIVE"
fi
mkdir -p "$KBT_RUN_BASE"

# ---------------------------------------------------------------------------------------------
# 5. Image tools for the installer image test: buildah from $KBT_BUILDAH_SUITE, bookworm's mmdebstrap,
#    and the image's base (debian:bookworm-slim; no Docker Hub here) as a cached rootfs tarball; the Debian
#    package test installs our .deb on that rootfs with apt, next to bookworm's containerd and runc .debs
# ---------------------------------------------------------------------------------------------
IMAGE_TOOLS_DEB_DIR=$KBT_STATE_DIR/image-tools-debs
BUILDAH_ROOT=$KBT_IMAGE_TOOLS_PREFIX/buildah
BOOTSTRAP=$KBT_IMAGE_TOOLS_PREFIX/bootstrap

buildah_version() { { "$BUILDAH_ROOT/usr/bin/buildah" --version 2>/dev/null || true; } | awk '{print $3}'; }
mmdebstrap_version() { { "$BOOTSTRAP/usr/bin/mmdebstrap" --version 2>/dev/null || true; } | awk '{print $2}'; }

# buildah and the libraries it links: the lib* part of its Depends closure in $KBT_BUILDAH_SUITE (the rest
# of the closure is programs and services `buildah build` with chroot isolation never runs), plus
# containers-common. install_image_tools asks the loader whether that is complete.
buildah_closure() {
    local -A seen=()
    local todo=(buildah) next=() p
    while [ "${#todo[@]}" -gt 0 ]; do
        for p in "${todo[@]}"; do seen[$p]=1; done
        mapfile -t next < <(suite_apt "$KBT_BUILDAH_SUITE" apt-cache depends --no-recommends --no-suggests \
            --no-conflicts --no-breaks --no-replaces --no-enhances "${todo[@]}" |
            awk '$1 ~ /^\|?(Pre)?Depends:$/ && $2 ~ /^lib/ { print $2 }' | sort -u)
        todo=()
        for p in "${next[@]}"; do [ -n "${seen[$p]:-}" ] || todo+=("$p"); done
    done
    printf '%s\n' "${!seen[@]}" golang-github-containers-common | sort -u
}

install_image_tools() {
    local pkgs=() stage p deb lib missing_libs version
    suite_lists "$KBT_BUILDAH_SUITE"
    suite_lists "$CODENAME"
    mapfile -t pkgs < <(buildah_closure)
    [ "${#pkgs[@]}" -gt 2 ] || die "could not resolve buildah's libraries in $KBT_BUILDAH_SUITE"
    download_debs "$KBT_BUILDAH_SUITE" "$IMAGE_TOOLS_DEB_DIR/$KBT_BUILDAH_SUITE" "${pkgs[@]}"
    download_debs "$CODENAME" "$IMAGE_TOOLS_DEB_DIR/$CODENAME" mmdebstrap patchelf
    stage=$(mktemp -d "$(dirname "$KBT_IMAGE_TOOLS_PREFIX")/.image-tools-stage.XXXXXX")
    mkdir -p "$stage/buildah" "$stage/bootstrap" "$stage/bin" "$stage/libexec" "$stage/etc"
    for p in "${pkgs[@]}"; do
        for deb in "$IMAGE_TOOLS_DEB_DIR/$KBT_BUILDAH_SUITE/${p}"_*.deb; do dpkg-deb -x "$deb" "$stage/buildah"; done
    done
    for p in mmdebstrap patchelf; do
        for deb in "$IMAGE_TOOLS_DEB_DIR/$CODENAME/${p}"_*.deb; do dpkg-deb -x "$deb" "$stage/bootstrap"; done
    done
    lib=$stage/buildah/usr/lib/$TRIPLET
    if [ ! -x "$lib/$LDSO" ] || [ ! -x "$stage/buildah/usr/bin/buildah" ]; then
        die "$KBT_BUILDAH_SUITE's loader or buildah missing after extraction"
    fi
    missing_libs=$("$lib/$LDSO" --library-path "$lib" --list "$stage/buildah/usr/bin/buildah" | grep 'not found' || true)
    [ -z "$missing_libs" ] || die "buildah's libraries incomplete: $missing_libs"
    # $KBT_BUILDAH_SUITE's glibc needs its own loader, and buildah re-executes /proc/self/exe (so running it
    # as `ld.so buildah`, as the criu wrapper does, would not stick): point PT_INTERP and DT_RPATH into the prefix.
    "$stage/bootstrap/usr/bin/patchelf" --set-interpreter "$KBT_IMAGE_TOOLS_PREFIX/buildah/usr/lib/$TRIPLET/$LDSO" \
        --force-rpath --set-rpath "$KBT_IMAGE_TOOLS_PREFIX/buildah/usr/lib/$TRIPLET" "$stage/buildah/usr/bin/buildah"
    # buildah insists on finding netavark (it never runs it: no RUN steps, chroot isolation, no networks).
    printf '#!/bin/sh\necho "netavark stub (Kybernate test/setup.sh): no container networking here ($*)" >&2\nexit 1\n' \
        >"$stage/libexec/netavark"
    chmod 755 "$stage/libexec/netavark"
    printf '{"default": [{"type": "insecureAcceptAnything"}]}\n' >"$stage/etc/policy.json"
    printf '%s\n' "${pkgs[@]}" >"$stage/.kybernate-closure"
    chmod 755 "$stage"
    rm -rf "$KBT_IMAGE_TOOLS_PREFIX"
    mv "$stage" "$KBT_IMAGE_TOOLS_PREFIX"
    version=$(buildah_version)
    version_ge "$version" "$KBT_BUILDAH_MIN_VERSION" ||
        die "the unpacked buildah says version '${version:-nothing}', need >= $KBT_BUILDAH_MIN_VERSION"
    log "installed buildah $version and mmdebstrap $(mmdebstrap_version) into $KBT_IMAGE_TOOLS_PREFIX"
}

# The entry point: `kbt-buildah DIR ARGS...`. Found relative to itself, so it needs no substitutions.
write_buildah_wrapper() {
    local tmp
    tmp=$(mktemp)
    cat >"$tmp" <<'EOF'
#!/bin/sh
# Installed by Kybernate's test/setup.sh.
#   kbt-buildah DIR ARGS...
# runs the buildah in ../buildah (Debian testing's, with its own glibc) as `buildah ARGS` with everything it
# keeps under DIR (created if missing): vfs storage in DIR/root and DIR/run, its config files in DIR/conf,
# temporary files in DIR/tmp, HOME in DIR/home. As root, buildah also writes /var/lib/containers/cache,
# /run/containers/networks and /run/lock/netavark.lock whatever it is told: it runs in a private mount
# namespace whose /var/lib and /run are overlays with their upper dirs on a tmpfs (DIR/ns) that goes with
# the namespace, so none of that reaches the host. DIR must therefore lie outside /var/lib and /run.
set -eu
P=$(cd "$(dirname "$0")/.." && pwd -P)
[ "$#" -ge 1 ] || { echo "usage: kbt-buildah DIR BUILDAH-ARGS..." >&2; exit 2; }
D=$(realpath -m "$1")
shift
case "$D/" in
    /var/lib/* | /run/* | /var/run/*) echo "kbt-buildah: $D must lie outside /var/lib and /run" >&2; exit 2 ;;
esac
mkdir -p "$D/conf" "$D/tmp" "$D/ns" "$D/home/.config/containers"
printf '[storage]\ndriver = "vfs"\ngraphroot = "%s/root"\nrunroot = "%s/run"\n' "$D" "$D" >"$D/conf/storage.conf"
printf '[engine]\nhelper_binaries_dir = ["%s/libexec"]\nimage_copy_tmp_dir = "%s/tmp"\n\n[network]\nnetwork_config_dir = "%s/networks"\n' \
    "$P" "$D" "$D" >"$D/conf/containers.conf"
printf 'unqualified-search-registries = []\n' >"$D/conf/registries.conf"
# The signature policy: root's ~/.config/containers/policy.json comes before /etc/containers/policy.json.
cp "$P/etc/policy.json" "$D/home/.config/containers/policy.json"
export CONTAINERS_STORAGE_CONF="$D/conf/storage.conf" CONTAINERS_CONF="$D/conf/containers.conf" \
    CONTAINERS_REGISTRIES_CONF="$D/conf/registries.conf" TMPDIR="$D/tmp" HOME="$D/home"
unset XDG_RUNTIME_DIR XDG_CONFIG_HOME XDG_DATA_HOME XDG_CACHE_HOME REGISTRY_AUTH_FILE
exec unshare --mount --propagation private -- sh -c '
    D=$1 P=$2
    shift 2
    mount -t tmpfs -o mode=0700 kbt-buildah "$D/ns" &&
        mkdir "$D/ns/varlib" "$D/ns/varlib.work" "$D/ns/run" "$D/ns/run.work" &&
        mount -t overlay overlay -o "lowerdir=/var/lib,upperdir=$D/ns/varlib,workdir=$D/ns/varlib.work" /var/lib &&
        mount -t overlay overlay -o "lowerdir=/run,upperdir=$D/ns/run,workdir=$D/ns/run.work" /run ||
        { echo "kbt-buildah: cannot set up the private mount namespace" >&2; exit 125; }
    exec "$P/buildah/usr/bin/buildah" --root "$D/root" --runroot "$D/run" --storage-driver vfs "$@"' \
    kbt-buildah "$D" "$P" "$@"
EOF
    install_if_changed "$tmp" "$KBT_BUILDAH"
}

# The base rootfs is valid when it is a bookworm tree (written by rename, so never half a tarball).
base_rootfs_release() { tar -xOf "$KBT_BASE_ROOTFS" ./etc/debian_version 2>/dev/null || true; }

# mmdebstrap --variant=minbase with merged /usr and without docs, man pages and locales, like the official
# debian:bookworm-slim; from this machine's bookworm and bookworm-security mirrors.
build_base_rootfs() {
    local work mirror security t0=$SECONDS
    mirror=$(debian_mirror)
    security=$(apt_source_uri bookworm-security)
    work=$(mktemp -d "$KBT_STATE_DIR/.base-rootfs.XXXXXX")
    printf 'deb %s bookworm main\ndeb %s bookworm-updates main\n' "$mirror" "$mirror" >"$work/sources.list"
    [ -z "$security" ] || printf 'deb %s bookworm-security main\n' "$security" >>"$work/sources.list"
    log "building the installer image's base rootfs with mmdebstrap (from $mirror)"
    # shellcheck disable=SC2016 # "$1" is expanded by mmdebstrap's hook shell
    PATH=$BOOTSTRAP/usr/bin:$PATH "$BOOTSTRAP/usr/bin/mmdebstrap" --variant=minbase \
        --hook-dir="$BOOTSTRAP/usr/share/mmdebstrap/hooks/merged-usr" \
        --dpkgopt='path-exclude=/usr/share/man/*' --dpkgopt='path-exclude=/usr/share/doc/*' \
        --dpkgopt='path-include=/usr/share/doc/*/copyright' --dpkgopt='path-exclude=/usr/share/locale/*' \
        --dpkgopt='path-exclude=/usr/share/info/*' --aptopt='Acquire::Languages "none"' \
        --customize-hook='rm -rf "$1"/var/lib/apt/lists/* "$1"/var/cache/apt/*.bin' \
        bookworm "$work/rootfs.tar" "$work/sources.list" >"$work/mmdebstrap.log" 2>&1 ||
        { tail -n 30 "$work/mmdebstrap.log" >&2; die "mmdebstrap failed (log: $work/mmdebstrap.log)"; }
    chmod 0644 "$work/rootfs.tar"
    mv "$work/rootfs.tar" "$KBT_BASE_ROOTFS"
    rm -rf "$work"
    [[ "$(base_rootfs_release)" == 12.* ]] || die "$KBT_BASE_ROOTFS has no bookworm /etc/debian_version"
    log "wrote $KBT_BASE_ROOTFS ($(du -h "$KBT_BASE_ROOTFS" | cut -f1), $((SECONDS - t0))s)"
}

mkdir -p "$(dirname "$KBT_IMAGE_TOOLS_PREFIX")"
if [ -f "$KBT_IMAGE_TOOLS_PREFIX/.kybernate-closure" ] && version_ge "$(buildah_version)" "$KBT_BUILDAH_MIN_VERSION" &&
    [ -n "$(mmdebstrap_version)" ]; then
    log "buildah $(buildah_version) and mmdebstrap $(mmdebstrap_version) already in $KBT_IMAGE_TOOLS_PREFIX"
else
    install_image_tools
fi
write_buildah_wrapper
if [[ "$(base_rootfs_release)" == 12.* ]]; then
    log "base rootfs $KBT_BASE_ROOTFS up to date (bookworm $(base_rootfs_release))"
else
    build_base_rootfs
fi
suite_lists bookworm
download_debs bookworm "$KBT_NODE_DEBS" containerd runc

# ---------------------------------------------------------------------------------------------
# 6. Docker (this release's docker.io, unpacked: no service installed or started) for the installer image
#    test's `docker build`, and $KBT_DOCKERD, the wrapper that runs a private dockerd
# ---------------------------------------------------------------------------------------------
docker_version() { { "$KBT_DOCKER_PREFIX/usr/bin/docker" --version 2>/dev/null || true; } | awk '{print $3}' | tr -d ,; }

install_docker() {
    local b missing_libs
    install_unpacked "$CODENAME" docker.io "$KBT_DOCKER_PREFIX" usr/sbin/dockerd usr/bin/docker
    for b in usr/sbin/dockerd usr/bin/docker; do
        missing_libs=$(ldd "$KBT_DOCKER_PREFIX/$b" | grep 'not found' || true)
        [ -z "$missing_libs" ] || die "$b's libraries are missing on this machine: $missing_libs"
    done
    log "installed docker $(docker_version) into $KBT_DOCKER_PREFIX"
}

# `kbt-dockerd DIR` runs that dockerd in the foreground with everything it keeps under DIR.
write_dockerd_wrapper() {
    local tmp
    tmp=$(mktemp)
    mkdir -p "$(dirname "$KBT_DOCKERD")"
    cat >"$tmp" <<'EOF'
#!/bin/sh
# Installed by Kybernate's test/setup.sh.
#   kbt-dockerd DIR
# runs the dockerd in .. (Debian's docker.io, unpacked) in the foreground, with its data root, exec root
# (its own containerd's state and sockets included), pid file and config under DIR and its API on
# unix://DIR/docker.sock; no iptables rules and no bridge, so it changes no networking. dockerd also writes
# /etc/docker/key.json and files under /run whatever it is told: it runs in a private mount namespace whose
# /etc and /run are overlays with their upper dirs on a tmpfs (DIR/ns) that goes with the namespace, as do
# its overlay2 mounts. DIR must lie outside /etc and /run, and be short (unix socket paths under it).
set -eu
P=$(cd "$(dirname "$0")/.." && pwd -P)
[ "$#" -eq 1 ] || { echo "usage: kbt-dockerd DIR" >&2; exit 2; }
D=$(realpath -m "$1")
case "$D/" in
    /etc/* | /run/* | /var/run/*) echo "kbt-dockerd: $D must lie outside /etc and /run" >&2; exit 2 ;;
esac
mkdir -p "$D/ns" "$D/data" "$D/exec"
printf '{}\n' >"$D/daemon.json"
export PATH="$P/usr/sbin:$P/usr/bin:$PATH"
exec unshare --mount --propagation private -- sh -c '
    D=$1
    mount -t tmpfs -o mode=0700 kbt-dockerd "$D/ns" &&
        mkdir "$D/ns/etc" "$D/ns/etc.work" "$D/ns/run" "$D/ns/run.work" &&
        mount -t overlay overlay -o "lowerdir=/etc,upperdir=$D/ns/etc,workdir=$D/ns/etc.work" /etc &&
        mount -t overlay overlay -o "lowerdir=/run,upperdir=$D/ns/run,workdir=$D/ns/run.work" /run ||
        { echo "kbt-dockerd: cannot set up the private mount namespace" >&2; exit 125; }
    exec dockerd --data-root "$D/data" --exec-root "$D/exec" --pidfile "$D/docker.pid" \
        -H "unix://$D/docker.sock" --config-file "$D/daemon.json" \
        --iptables=false --ip6tables=false --ip-masq=false --bridge=none' \
    kbt-dockerd "$D"
EOF
    install_if_changed "$tmp" "$KBT_DOCKERD"
}

mkdir -p "$(dirname "$KBT_DOCKER_PREFIX")"
if [ -x "$KBT_DOCKER_PREFIX/usr/sbin/dockerd" ] && [ -n "$(docker_version)" ]; then
    log "docker $(docker_version) already in $KBT_DOCKER_PREFIX"
else
    install_docker
fi
write_dockerd_wrapper

# ---------------------------------------------------------------------------------------------
# 7. checkpointctl (Debian $KBT_CRIU_SUITE's, the checkpoint-archive inspector of the checkpoint-restore
#    project) for the tests that read our archives with it; it needs that suite's glibc, so $KBT_CHECKPOINTCTL
#    runs it through the loader and libraries in $KBT_CRIU_PREFIX, as the criu wrapper does
# ---------------------------------------------------------------------------------------------
install_checkpointctl() {
    install_unpacked "$KBT_CRIU_SUITE" checkpointctl "$KBT_CHECKPOINTCTL_PREFIX" usr/bin/checkpointctl
    log "installed checkpointctl into $KBT_CHECKPOINTCTL_PREFIX"
}

write_checkpointctl_wrapper() {
    local tmp
    tmp=$(mktemp)
    mkdir -p "$(dirname "$KBT_CHECKPOINTCTL")"
    cat >"$tmp" <<EOF
#!/bin/sh
# Installed by Kybernate's test/setup.sh. Runs Debian $KBT_CRIU_SUITE's checkpointctl through that suite's loader and
# libraries (in the CRIU prefix), so bookworm's older glibc does not matter.
L=$KBT_CRIU_PREFIX/usr/lib/$TRIPLET
exec "\$L/$LDSO" --argv0 checkpointctl --library-path "\$L" "$KBT_CHECKPOINTCTL_PREFIX/usr/bin/checkpointctl" "\$@"
EOF
    install_if_changed "$tmp" "$KBT_CHECKPOINTCTL"
}

if [ -x "$KBT_CHECKPOINTCTL_PREFIX/usr/bin/checkpointctl" ]; then
    log "checkpointctl already in $KBT_CHECKPOINTCTL_PREFIX"
else
    install_checkpointctl
fi
write_checkpointctl_wrapper
"$KBT_CHECKPOINTCTL" --help >/dev/null || die "$KBT_CHECKPOINTCTL does not run"

# ---------------------------------------------------------------------------------------------
# Summary
# ---------------------------------------------------------------------------------------------
elapsed=$(awk -v s="$START" -v e="$(date +%s.%N)" 'BEGIN { printf "%.1f", e - s }')
cat <<EOF
[setup] ready in ${elapsed}s
  containerd  $(containerd --version | awk '{print $3}')  (shim: $(command -v containerd-shim-runc-v2))
  containerd  $(for r in "${KBT_CONTAINERD_RELEASES[@]}"; do p=$KBT_CONTAINERD_BASE-${r%% *}; printf '%s in %s  ' "$(containerd_version_of "$p")" "$p"; done)
  runc        $(runc --version | awk 'NR==1 {print $3}')
  criu        $CRIU_VERSION via $KBT_CRIU_WRAPPER -> $KBT_CRIU_PREFIX (criu check: Looks good.)
  image       $KBT_IMAGE <- $KBT_IMAGE_ARCHIVE ($(size "$KBT_IMAGE_ARCHIVE") bytes)
  buildah     $(buildah_version) via $KBT_BUILDAH -> $KBT_IMAGE_TOOLS_PREFIX; base rootfs $KBT_BASE_ROOTFS (bookworm $(base_rootfs_release))
  docker      $(docker_version) via $KBT_DOCKERD -> $KBT_DOCKER_PREFIX (the installer image test's docker build)
  checkpoint  checkpointctl via $KBT_CHECKPOINTCTL -> $KBT_CHECKPOINTCTL_PREFIX
  prometheus  $("$KBT_PROMETHEUS_PREFIX/usr/bin/prometheus" --version 2>&1 | awk 'NR==1 {print $3}') in $KBT_PROMETHEUS_PREFIX (scrapes kybernate metrics in its test)
  node        $(systemd-nspawn --version | awk 'NR==1 {print $1, $2}') for test/lib/kbt-node (systemd nodes: the installer's systemctl restart)
  node debs   $(cd "$KBT_NODE_DEBS" && echo *.deb)  (apt on the base rootfs, in the Debian package test)
  test beds   private containerd dirs under $KBT_RUN_BASE
EOF
