#!/usr/bin/env bash
# Installs what tests/test_neon_qemu.py needs to build and run the NEON kernel on an x86 machine: the
# aarch64 cross compiler (Debian's g++-aarch64-linux-gnu, which brings the aarch64 libc/libstdc++ used for
# the static link) and the user-mode emulator qemu-aarch64 (Debian's qemu-user).
# Idempotent: does nothing when both tools are already on PATH; runs `apt-get update` only when the
# package lists do not know the packages yet. Needs root (or sudo) for apt-get.
set -euo pipefail

need=()
command -v aarch64-linux-gnu-g++ >/dev/null 2>&1 || need+=(g++-aarch64-linux-gnu)
command -v qemu-aarch64 >/dev/null 2>&1 || command -v qemu-aarch64-static >/dev/null 2>&1 || need+=(qemu-user)
if [ ${#need[@]} -eq 0 ]; then
  echo "install_cross_deps: aarch64-linux-gnu-g++ and qemu-aarch64 already present" >&2
  exit 0
fi

sudo=()
if [ "$(id -u)" -ne 0 ]; then
  command -v sudo >/dev/null 2>&1 || { echo "install_cross_deps: need root or sudo to install ${need[*]}" >&2; exit 1; }
  sudo=(sudo)
fi

# A fresh container has empty package lists: `apt-cache show` fails there, and only then do we update.
for pkg in "${need[@]}"; do
  if ! apt-cache show "$pkg" >/dev/null 2>&1; then
    "${sudo[@]}" apt-get update -q >&2
    break
  fi
done
echo "install_cross_deps: installing ${need[*]}" >&2
"${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${need[@]}" >&2
command -v aarch64-linux-gnu-g++ >/dev/null 2>&1 || { echo "install_cross_deps: aarch64-linux-gnu-g++ still missing" >&2; exit 1; }
command -v qemu-aarch64 >/dev/null 2>&1 || command -v qemu-aarch64-static >/dev/null 2>&1 ||
  { echo "install_cross_deps: qemu-aarch64 still missing" >&2; exit 1; }
echo "install_cross_deps: done" >&2
