#!/usr/bin/env bash
# Runs COMMAND inside the arm64 root, as jobs/arm64_check.sh does. Call it only inside a private mount and
# PID namespace (`unshare --mount --pid --fork --kill-child --propagation private`): every mount below then
# belongs to that namespace and disappears with it, even if this script or the check is killed.
#
#   enter.sh ROOT FAKE STORES RESULTS COMMAND...
#
# ROOT: the unpacked root; FAKE: FAKE/cpuinfo and FAKE/cpu, an arm64 /proc/cpuinfo and
# /sys/devices/system/cpu (QEMU 7.2 shows the host's x86 ones; torch's cpuinfo library crashes on the
# x86 cpuinfo); STORES: the x86 host's stores, mounted read-only at /stores; RESULTS: a host folder
# mounted at /results.
set -euo pipefail
ROOT=$1 FAKE=$2 STORES=$3 RESULTS=$4
shift 4
[ "$$" = 1 ] || { echo "enter.sh: run me as PID 1 of a new PID namespace (see the header)" >&2; exit 2; }

mount -t proc proc "$ROOT/proc"
mount --bind "$FAKE/cpuinfo" "$ROOT/proc/cpuinfo"
mount --rbind /dev "$ROOT/dev"
mount -t tmpfs -o mode=1777,size=1g shm "$ROOT/dev/shm"   # Open MPI's shared-memory segments, not the host's
mount -t sysfs sysfs "$ROOT/sys"
mount --bind "$FAKE/cpu" "$ROOT/sys/devices/system/cpu"
mount -t tmpfs -o mode=1777 tmp "$ROOT/tmp"
mkdir -p "$ROOT/stores" "$ROOT/results"
mount --bind -o ro "$STORES" "$ROOT/stores"
mount --bind "$RESULTS" "$ROOT/results"

# QEMU_CPU: with QEMU's default CPU ("max", which has SVE) OpenBLAS takes SVE kernels that QEMU emulates
# about 20x slower than NEON ones. Neoverse N1 is the core of many ARM servers and close to a
# Raspberry Pi 5's Cortex-A76 (both Armv8.2-A, NEON, no SVE).
exec chroot "$ROOT" /usr/bin/env -i PATH=/opt/venv/bin:/usr/bin:/bin HOME=/root LANG=C.UTF-8 \
  QEMU_CPU="${QEMU_CPU:-neoverse-n1}" "$@"
