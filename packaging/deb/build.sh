#!/usr/bin/env bash
# Builds the Debian package kybernate_<version>_<arch>.deb with dpkg-deb from binaries cargo
# already built (no cargo-deb: see packaging/README.md).
#
#   cargo build --release -p kybernate-cli -p containerd-shim-kybernate-v1 -p kybernate-runtime-select
#   packaging/deb/build.sh [--bin-dir DIR] [--out DIR] [--version V] [--compression xz|gzip|none]
#                          [--maintainer "NAME <EMAIL>"]
#
# Defaults: --bin-dir target/release, --out target/deb, --version from the workspace Cargo.toml,
# --compression xz, --maintainer $DEB_MAINTAINER. Prints the package's path.
#
# The package holds: /usr/bin/{kybernate,containerd-shim-kybernate-v1,kybernate-select},
# /etc/kybernate/config.toml (a conffile: every key commented with its default),
# /usr/share/kybernate/containerd/*.toml (config snippets), /usr/share/kybernate/kubernetes/
# (RuntimeClass manifests), /usr/share/doc/kybernate/ (README, docs/, copyright). It has no
# maintainer scripts: registering the runtime with containerd is the admin's explicit step
# (`kybernate containerd-config install`), never a side effect of installing a package.
set -euo pipefail
umask 022

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
bin_dir="$repo_root/target/release"
out_dir="$repo_root/target/deb"
version=""
compression="xz"
maintainer="${DEB_MAINTAINER:-Kybernate developers <noreply@kybernate.invalid>}"

die() { printf 'build.sh: %s\n' "$*" >&2; exit 2; }
usage() { sed -n '2,11p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; }

while (($# > 0)); do
    case "$1" in
        --bin-dir | --out | --version | --compression | --maintainer)
            (($# >= 2)) || die "$1 needs a value"
            case "$1" in
                --bin-dir) bin_dir="$2" ;;
                --out) out_dir="$2" ;;
                --version) version="$2" ;;
                --compression) compression="$2" ;;
                --maintainer) maintainer="$2" ;;
            esac
            shift 2
            ;;
        -h | --help) usage; exit 0 ;;
        *) die "unknown argument $1 (see --help)" ;;
    esac
done

if [[ -z "$version" ]]; then
    version="$(sed -n '/^\[workspace\.package\]/,/^\[/s/^version = "\(.*\)"$/\1/p' "$repo_root/Cargo.toml")"
fi
[[ "$version" =~ ^[0-9][A-Za-z0-9.+~-]*$ ]] || die "bad version '$version' (Debian versions start with a digit)"
case "$compression" in xz | gzip | none) ;; *) die "--compression must be xz, gzip or none" ;; esac
binaries=(kybernate containerd-shim-kybernate-v1 kybernate-select)
for bin in "${binaries[@]}"; do
    [[ -x "$bin_dir/$bin" ]] || die "$bin_dir/$bin is missing: build it first (cargo build --release ...)"
done
arch="$(dpkg --print-architecture)"
mkdir -p "$out_dir"
out_dir="$(cd "$out_dir" && pwd)"

# dpkg-shlibdeps wants the package tree at debian/<package> below a dir holding debian/control.
work="$(mktemp -d "$out_dir/.kybernate-deb.XXXXXX")"
trap 'rm -rf "$work"' EXIT
stage="$work/debian/kybernate"
install -d -m 0755 "$stage"

for bin in "${binaries[@]}"; do
    install -D -m 0755 "$bin_dir/$bin" "$stage/usr/bin/$bin"
done
install -D -m 0644 "$repo_root/packaging/deb/config.toml" "$stage/etc/kybernate/config.toml"
for snippet in "$repo_root"/packaging/containerd/*.toml; do
    install -D -m 0644 "$snippet" "$stage/usr/share/kybernate/containerd/$(basename "$snippet")"
done
for manifest in runtimeclass.yaml runtimeclass-gpu.yaml; do
    install -D -m 0644 "$repo_root/packaging/kubernetes/$manifest" "$stage/usr/share/kybernate/kubernetes/$manifest"
done
doc="$stage/usr/share/doc/kybernate"
install -D -m 0644 "$repo_root/README.md" "$doc/README.md"
for page in "$repo_root"/docs/*.md; do
    install -D -m 0644 "$page" "$doc/docs/$(basename "$page")"
done
install -D -m 0644 "$repo_root/packaging/deb/copyright" "$doc/copyright"

# Shared-library dependencies of the binaries (libc6, libgcc-s1) with their minimum versions.
# (dpkg-shlibdeps finds the package root by its DEBIAN dir.)
install -d -m 0755 "$stage/DEBIAN"
printf 'Source: kybernate\n\nPackage: kybernate\nArchitecture: any\n' >"$work/debian/control"
shlibs="libc6, libgcc-s1"
if command -v dpkg-shlibdeps >/dev/null; then
    shlibs_args=()
    for bin in "${binaries[@]}"; do shlibs_args+=(-e "debian/kybernate/usr/bin/$bin"); done
    # (Its "should already be installed in their package's directory" warning is spurious here.)
    shlibs="$(cd "$work" && dpkg-shlibdeps -O "${shlibs_args[@]}" 2> >(grep -v "should already be installed" >&2))"
    shlibs="${shlibs#shlibs:Depends=}"
fi

installed_size="$(du -sk --apparent-size "$stage" | cut -f1)"
cat >"$stage/DEBIAN/control" <<EOF
Package: kybernate
Version: $version
Architecture: $arch
Maintainer: $maintainer
Installed-Size: $installed_size
Depends: $shlibs, containerd (>= 1.6) | containerd.io (>= 1.6), runc | containerd.io
Recommends: criu (>= 4.1), iptables
Section: admin
Priority: optional
Homepage: https://github.com/kybernate/kybernate
Description: containerd runtime that checkpoints and restores CPU and GPU containers
 Kybernate is a containerd shim v2 (runtime type io.containerd.kybernate.v1) that
 runs each container with runc or the NVIDIA container runtime, as the container
 needs, and checkpoints and restores containers, CUDA state included, with CRIU.
 .
 This package installs the shim, the kybernate CLI, kybernate-select, a default
 /etc/kybernate/config.toml, containerd config snippets and Kubernetes
 RuntimeClass manifests (/usr/share/kybernate). It leaves containerd's config
 alone: "kybernate containerd-config install" registers the runtime.
EOF
echo /etc/kybernate/config.toml >"$stage/DEBIAN/conffiles"
# md5sums of every file but the conffiles (as dh_md5sums writes it).
(cd "$stage" && find . -path ./DEBIAN -prune -o -path ./etc -prune -o -type f -printf '%P\0' | sort -z | xargs -0 md5sum) \
    >"$stage/DEBIAN/md5sums"
chmod 0644 "$stage/DEBIAN/control" "$stage/DEBIAN/conffiles" "$stage/DEBIAN/md5sums"

deb="$out_dir/kybernate_${version}_${arch}.deb"
dpkg-deb --root-owner-group -Z"$compression" --build "$stage" "$deb" >/dev/null
echo "$deb"
