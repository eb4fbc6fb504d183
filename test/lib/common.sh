# shellcheck shell=bash disable=SC2034 # constants for the scripts that source this file
# Constants shared by test/setup.sh, test/lib/testbed.sh and the demo.
# The Rust harness (test/harness/src/lib.rs) mirrors them: change both together.

# Where setup.sh keeps what it builds (image archive, trixie .debs, apt state for trixie).
KBT_STATE_DIR=/var/lib/kybernate-test
# Private prefix for Debian trixie's CRIU and its libraries (bookworm's CRIU fails on kernel 6.x).
KBT_CRIU_PREFIX=/opt/kybernate-test/criu
# The `criu` wrapper; /usr/local/sbin precedes /usr/sbin in every default root PATH, so runc finds it.
KBT_CRIU_WRAPPER=/usr/local/sbin/criu
# Minimum CRIU version that works on the test machines' kernels.
KBT_CRIU_MIN_VERSION=4.1
# The busybox OCI image: archive written by setup.sh, and the name it imports under.
KBT_IMAGE_ARCHIVE=$KBT_STATE_DIR/busybox-oci.tar
KBT_IMAGE=docker.io/kybernate/busybox:test
# Where test beds put their private containerd dirs (on disk, so overlayfs works; short, as unix socket paths max out at 108 bytes).
KBT_RUN_BASE=$KBT_STATE_DIR/run
