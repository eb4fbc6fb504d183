# shellcheck shell=bash disable=SC2034 # constants for the scripts that source this file
# Constants shared by test/setup.sh, test/lib/testbed.sh and the demo.
# The Rust harness (test/harness/src/lib.rs) mirrors them: change both together.

# Where setup.sh keeps what it builds (image archive, CRIU .debs and apt state for the suite they come from).
KBT_STATE_DIR=/var/lib/kybernate-test
# Private prefix for Debian testing's CRIU and its libraries (bookworm's CRIU fails on kernel 6.x).
KBT_CRIU_PREFIX=/opt/kybernate-test/criu
# The `criu` wrapper; /usr/local/sbin precedes /usr/sbin in every default root PATH, so runc finds it.
KBT_CRIU_WRAPPER=/usr/local/sbin/criu
# Minimum CRIU version that works on the test machines' kernels.
# 4.2: CRIU 4.1 cannot dump any inet socket on kernel >= 6.16 (SO_PASSCRED/SO_PASSSEC getsockopt
# now fails with EOPNOTSUPP there); Debian testing carries 4.2.1.
KBT_CRIU_MIN_VERSION=4.2
KBT_CRIU_SUITE=forky
# containerd releases the tests also run under, beside bookworm's own 1.6 (the system one, on PATH):
# "<release> <Debian suite>"; setup.sh unpacks each suite's containerd into $KBT_CONTAINERD_BASE-<release>
# (its binaries in usr/bin) and checks that its version is <release>.x.
KBT_CONTAINERD_RELEASES=("1.7 trixie" "2 forky")
KBT_CONTAINERD_BASE=/opt/kybernate-test/containerd
# Debian's docker-registry, unpacked (no service): tests push images to a loopback registry of their own.
KBT_REGISTRY_PREFIX=/opt/kybernate-test/registry
# Debian's prometheus, unpacked (no service): the metrics test scrapes `kybernate metrics --listen` with it
# (criu-helper/cli/tests/metrics_e2e.rs mirrors the path).
KBT_PROMETHEUS_PREFIX=/opt/kybernate-test/prometheus
# The busybox OCI image: archive written by setup.sh, and the name it imports under.
KBT_IMAGE_ARCHIVE=$KBT_STATE_DIR/busybox-oci.tar
KBT_IMAGE=docker.io/kybernate/busybox:test
# Where test beds put their private containerd dirs (on disk, so overlayfs works; short, as unix socket paths max out at 108 bytes).
KBT_RUN_BASE=$KBT_STATE_DIR/run
# Image tools for the installer image test (test/harness/src/lib.rs mirrors KBT_BASE_ROOTFS and KBT_NODE_DEBS,
# criu-helper/cli/tests/installer.rs KBT_BUILDAH and KBT_BASE_IMAGE): buildah (>= $KBT_BUILDAH_MIN_VERSION) from Debian $KBT_BUILDAH_SUITE unpacked into
# $KBT_IMAGE_TOOLS_PREFIX/buildah (patched to load that suite's glibc), bookworm's mmdebstrap and patchelf in
# $KBT_IMAGE_TOOLS_PREFIX/bootstrap, and $KBT_BUILDAH, the wrapper that runs buildah isolated:
#   kbt-buildah DIR ARGS...   (storage, config, temp files under DIR; nothing under /var/lib/containers,
#                              /run/containers or /etc/containers on the host)
KBT_IMAGE_TOOLS_PREFIX=/opt/kybernate-test/image-tools
KBT_BUILDAH=$KBT_IMAGE_TOOLS_PREFIX/bin/kbt-buildah
KBT_BUILDAH_SUITE=forky
KBT_BUILDAH_MIN_VERSION=1.40
# The installer image's base (FROM debian:bookworm-slim; no Docker Hub here): a minbase bookworm rootfs made
# by mmdebstrap once and cached as a tarball; tests commit it under KBT_BASE_IMAGE in their buildah storage.
KBT_BASE_ROOTFS=$KBT_STATE_DIR/debian-bookworm-slim-rootfs.tar
KBT_BASE_IMAGE=docker.io/library/debian:bookworm-slim
# The Debian package test's node is that rootfs with Debian's own containerd and runc .debs beside our package
# (bookworm's, downloaded once), so `apt-get install ./kybernate_*.deb` resolves the Depends without a network.
KBT_NODE_DEBS=$KBT_STATE_DIR/node-debs-bookworm
# The installer image test also builds the image with `docker build` (criu-helper/cli/tests/installer.rs mirrors
# KBT_DOCKERD): this release's docker.io unpacked into $KBT_DOCKER_PREFIX, and the wrapper that runs a private
# dockerd (state, exec root and API socket under DIR; nothing under /etc/docker, /var/lib/docker or /run):
#   kbt-dockerd DIR
KBT_DOCKER_PREFIX=/opt/kybernate-test/docker
KBT_DOCKERD=$KBT_DOCKER_PREFIX/bin/kbt-dockerd
# checkpointctl from Debian $KBT_CRIU_SUITE (the checkpoint-archive inspector CRI-O and Kubernetes users read archives
# with), unpacked, and the wrapper that runs it on that suite's glibc (test/harness/src/lib.rs mirrors KBT_CHECKPOINTCTL).
KBT_CHECKPOINTCTL_PREFIX=/opt/kybernate-test/checkpointctl
KBT_CHECKPOINTCTL=$KBT_CHECKPOINTCTL_PREFIX/bin/checkpointctl
